//! Cluster mode against a secured Redis Cluster: the proxy's upstream
//! credentials (`upstream.password`, `upstream.username`) and
//! `[upstream.tls]` apply to every node it learns from CLUSTER SLOTS, not
//! only to the seed it starts from.

mod common;

use std::time::Instant;

use common::cluster::{ClusterOptions, NodeClient, TestCluster};
use common::{ADMIN, ALICE, Proxy, Raw, USERS, bulk, logs_show_a_panic, upstream_prefix};

/// How many keys each test writes; enough to land on every master.
const KEYS: usize = 30;

/// `KEYS` client keys and, for each, the port of the master its
/// namespaced form (what the proxy stores) hashes to.
fn keys_with_owners(cluster: &TestCluster) -> Vec<(String, u16)> {
    let prefix = upstream_prefix(ALICE.project);
    (0..KEYS)
        .map(|i| {
            let key = format!("secured:{i}");
            let slot = TestCluster::slot_of(format!("{prefix}{key}").as_bytes());
            (key, cluster.owner_of_slot(slot))
        })
        .collect()
}

/// An array reply of bulk strings, as RESP2 bytes.
fn bulk_array(items: &[String]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", items.len()).into_bytes();
    for item in items {
        out.extend_from_slice(&bulk(item));
    }
    out
}

/// The last `n` of `lines`.
fn last_lines(mut lines: Vec<String>, n: usize) -> Vec<String> {
    lines.split_off(lines.len().saturating_sub(n))
}

/// Writes the keys through the proxy and checks them through the proxy
/// (GET, MGET across nodes, DBSIZE over every master) and straight on
/// the nodes: every master holds some of them, each on the master of its
/// slot. `direct` opens a logged-in connection to a node.
fn write_and_check_everywhere(
    cluster: &TestCluster,
    proxy: &Proxy,
    mut direct: impl FnMut(u16) -> NodeClient,
) {
    let keys = keys_with_owners(cluster);
    let masters = cluster.masters();
    for master in &masters {
        assert!(
            keys.iter().any(|(_, owner)| owner == master),
            "the test keys miss master {master}: {keys:?}"
        );
    }

    let mut alice = proxy.login(&ALICE);
    for (key, _) in &keys {
        assert_eq!(
            alice.cmd(&["SET", key, &format!("v-{key}")]),
            b"+OK\r\n",
            "SET {key}; the proxy's last log lines: {:#?}",
            last_lines(proxy.logs(), 10)
        );
    }
    for (key, _) in &keys {
        assert_eq!(alice.cmd(&["GET", key]), bulk(&format!("v-{key}")), "{key}");
    }
    let mut mget = vec!["MGET"];
    mget.extend(keys.iter().map(|(k, _)| k.as_str()));
    let values: Vec<String> = keys.iter().map(|(k, _)| format!("v-{k}")).collect();
    assert_eq!(alice.cmd(&mget), bulk_array(&values), "MGET across masters");
    assert_eq!(
        proxy.login(&ADMIN).cmd(&["DBSIZE"]),
        format!(":{KEYS}\r\n").into_bytes(),
        "DBSIZE over every master"
    );

    // Straight on the nodes: each master holds the keys of its slots, and
    // only those.
    let prefix = upstream_prefix(ALICE.project);
    for &master in &masters {
        let mut node = direct(master);
        let mut held = 0;
        for (key, _) in keys.iter().filter(|(_, owner)| *owner == master) {
            assert_eq!(
                node.cmd(&["GET", &format!("{prefix}{key}")]),
                bulk(&format!("v-{key}")),
                "{key} on its master {master}"
            );
            held += 1;
        }
        // Nothing else: the cluster was empty before.
        assert_eq!(
            node.cmd(&["DBSIZE"]),
            format!(":{held}\r\n").into_bytes(),
            "keys on {master}"
        );
    }
    assert!(!logs_show_a_panic(&proxy.logs()));
}

#[test]
fn every_node_is_reached_with_the_proxys_password() {
    let started = Instant::now();
    let options = ClusterOptions {
        password: Some("cluster-secret".into()),
        ..ClusterOptions::default()
    };
    let cluster = TestCluster::start_with(3, 0, options);
    eprintln!("3x0 cluster with a password up in {:?}", started.elapsed());
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    // The nodes do require the password.
    for &port in &masters {
        let reply = Raw::connect(port).cmd(&["GET", "k"]);
        assert!(reply.starts_with(b"-NOAUTH"), "{port}: {reply:?}");
    }

    // One seed only: the other masters are known only from CLUSTER SLOTS.
    let seed = format!("127.0.0.1:{}", masters[0]);
    let toml = cluster.proxy_toml_with_seeds(&[seed], USERS, "", "enabled = false\n");
    assert!(toml.contains("password = \"cluster-secret\"\n"), "{toml}");
    let proxy = Proxy::start_toml(&toml);

    write_and_check_everywhere(&cluster, &proxy, |port| cluster.client(port));

    // A proxy with the wrong password says why in the reply, rather than
    // blaming the cluster, and does not flood its log while it retries
    // (its one warning came at start-up).
    let wrong = Proxy::start_toml(&toml.replace("\"cluster-secret\"", "\"not-it\""));
    let reply = wrong.login(&ALICE).cmd(&["GET", "k"]);
    assert_eq!(
        String::from_utf8_lossy(&reply),
        "-ERR upstream unavailable: the upstream refused the proxy's credentials\r\n"
    );
    let warnings = wrong
        .logs()
        .into_iter()
        .filter(|line| line.contains("WARN") && line.contains("CLUSTER SLOTS"))
        .count();
    assert_eq!(warnings, 0, "no warning per retry");
    eprintln!("test done in {:?}", started.elapsed());
}

#[test]
fn every_node_is_reached_over_tls() {
    let started = Instant::now();
    let options = ClusterOptions {
        password: Some("tls-cluster-secret".into()),
        username: Some("proxy".into()),
        tls: true,
    };
    let cluster = TestCluster::start_with(3, 0, options);
    eprintln!("3x0 TLS cluster up in {:?}", started.elapsed());
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);

    // The nodes speak TLS only, and CLUSTER SLOTS names their TLS ports.
    let slots = cluster.client(masters[0]).cmd(&["CLUSTER", "SLOTS"]);
    let slots = String::from_utf8_lossy(&slots);
    for port in &masters {
        assert!(slots.contains(&format!(":{port}\r\n")), "{port}: {slots}");
    }
    let mut plain = Raw::connect(masters[1]);
    plain.set_read_timeout(std::time::Duration::from_secs(2));
    plain.send(&["PING"]);
    assert!(plain.is_closed(), "a plaintext client was answered");
    // And the ACL user is the only login: not even its password opens
    // the default user.
    let mut node = cluster.client(masters[0]);
    let as_default = node.cmd(&["AUTH", "default", "tls-cluster-secret"]);
    assert!(as_default.starts_with(b"-WRONGPASS"), "{as_default:?}");

    let seed = format!("127.0.0.1:{}", masters[0]);
    let toml = cluster.proxy_toml_with_seeds(&[seed], USERS, "", "enabled = false\n");
    assert!(toml.contains("[upstream.tls]\n"), "{toml}");
    assert!(toml.contains("username = \"proxy\"\n"), "{toml}");
    let proxy = Proxy::start_toml(&toml);

    write_and_check_everywhere(&cluster, &proxy, |port| cluster.client(port));
    eprintln!("test done in {:?}", started.elapsed());
}

#[test]
fn a_slot_moved_between_secured_nodes_is_followed() {
    let started = Instant::now();
    let options = ClusterOptions {
        password: Some("moving-secret".into()),
        username: Some("proxy".into()),
        tls: true,
    };
    // Replicas sync over TLS with the ACL user (masteruser/masterauth).
    let cluster = TestCluster::start_with(3, 1, options);
    eprintln!("3x1 TLS cluster up in {:?}", started.elapsed());
    let proxy = Proxy::start_toml(&cluster.proxy_toml(USERS, "", "enabled = false\n"));
    let mut alice = proxy.login(&ALICE);

    let key = "moving";
    let stored = format!("{}{key}", upstream_prefix(ALICE.project));
    let slot = TestCluster::slot_of(stored.as_bytes());
    let from = cluster.owner_of_slot(slot);
    let to = cluster.another_master(from);
    assert_eq!(alice.cmd(&["SET", key, "before"]), b"+OK\r\n");

    // MIGRATE logs in to the target with AUTH2, over TLS.
    cluster.migrate_slot(slot, from, to);
    assert_eq!(cluster.client(to).cmd(&["GET", &stored]), bulk("before"));
    assert_eq!(alice.cmd(&["GET", key]), bulk("before"));
    assert_eq!(alice.cmd(&["SET", key, "after"]), b"+OK\r\n");
    assert_eq!(cluster.client(to).cmd(&["GET", &stored]), bulk("after"));
    assert!(!logs_show_a_panic(&proxy.logs()));
    eprintln!("test done in {:?}", started.elapsed());
}
