//! The cluster test harness itself, straight against Redis (no proxy):
//! slot hashing, topology, slot migration with ASK then MOVED, failover.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{TestCluster, crc16, hash_tag};
use common::{USERS, bulk};

/// The check value of CRC16/XMODEM, and slots Redis documents.
#[test]
fn slot_of_matches_known_values() {
    assert_eq!(crc16(b"123456789"), 0x31C3);
    assert_eq!(TestCluster::slot_of(b"foo"), 12182);
    assert_eq!(
        TestCluster::slot_of(b"{user1000}.following"),
        TestCluster::slot_of(b"{user1000}.followers")
    );
    assert_eq!(
        TestCluster::slot_of(b"{user1000}.following"),
        TestCluster::slot_of(b"user1000")
    );
    // The cluster spec's hash tag examples.
    assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}");
    assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
    assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
}

#[test]
fn three_masters_with_replicas_agree_with_redis() {
    let started = Instant::now();
    let cluster = TestCluster::start(3, 1);
    eprintln!("3x1 cluster up in {:?}", started.elapsed());

    assert_eq!(cluster.seeds().len(), 6);
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    for &m in &masters {
        assert_eq!(cluster.replicas_of(m).len(), 1, "replicas of {m}");
    }

    let mut raw = cluster.direct(masters[0]);
    for key in [
        "foo",
        "bar",
        "",
        "{user1000}.following",
        "{user1000}.followers",
        "foo{}{bar}",
        "foo{{bar}}zap",
        "foo{bar}{zap}",
        "{}",
        "}{",
        "a{b",
        "{a}b}",
        "project:0123456789abcdef:{tag}x",
    ] {
        let slot = TestCluster::slot_of(key.as_bytes());
        assert_eq!(
            raw.cmd(&["CLUSTER", "KEYSLOT", key]),
            format!(":{slot}\r\n").into_bytes(),
            "slot of {key:?}"
        );
    }

    // The proxy configuration lists every node as a seed.
    let toml = cluster.proxy_toml(USERS, "", "enabled = false\n");
    assert!(toml.contains("mode = \"cluster\""));
    for seed in cluster.seeds() {
        assert!(toml.contains(&format!("\"{seed}\"")));
    }

    // A key lives at its slot's owner; other masters redirect.
    let key = "harness:migrating";
    let slot = TestCluster::slot_of(key.as_bytes());
    let from = cluster.owner_of_slot(slot);
    let to = cluster.another_master(from);
    assert_eq!(cluster.direct(from).cmd(&["SET", key, "v1"]), b"+OK\r\n");
    let moved_to = |port: u16| format!("-MOVED {slot} 127.0.0.1:{port}\r\n").into_bytes();
    assert_eq!(cluster.direct(to).cmd(&["GET", key]), moved_to(from));

    // Migrating: the source still serves the keys it has and sends the
    // rest on with ASK; the target serves the slot only after ASKING.
    cluster.begin_migration(slot, from, to);
    let missing = "{harness:migrating}:missing";
    assert_eq!(TestCluster::slot_of(missing.as_bytes()), slot);
    assert_eq!(cluster.direct(from).cmd(&["GET", key]), bulk("v1"));
    let ask_to = format!("-ASK {slot} 127.0.0.1:{to}\r\n").into_bytes();
    assert_eq!(cluster.direct(from).cmd(&["GET", missing]), ask_to);

    cluster.migrate_keys(slot, from, to);
    assert_eq!(cluster.direct(from).cmd(&["GET", key]), ask_to);
    let mut target = cluster.direct(to);
    assert_eq!(target.cmd(&["GET", key]), moved_to(from));
    assert_eq!(target.cmd(&["ASKING"]), b"+OK\r\n");
    assert_eq!(target.cmd(&["GET", key]), bulk("v1"));

    // Finished: the target owns the slot and the source answers MOVED.
    cluster.finish_migration(slot, to);
    assert_eq!(cluster.owner_of_slot(slot), to);
    assert_eq!(cluster.direct(to).cmd(&["GET", key]), bulk("v1"));
    assert_eq!(cluster.direct(from).cmd(&["GET", key]), moved_to(to));

    // And back again in one call.
    cluster.migrate_slot(slot, to, from);
    assert_eq!(cluster.owner_of_slot(slot), from);
    assert_eq!(cluster.direct(from).cmd(&["GET", key]), bulk("v1"));
}

#[test]
fn a_killed_master_fails_over_to_its_replica() {
    let mut cluster = TestCluster::start(3, 1);
    let key = "harness:failover";
    let slot = TestCluster::slot_of(key.as_bytes());
    let master = cluster.owner_of_slot(slot);
    let replica = cluster.replicas_of(master)[0];
    let mut raw = cluster.direct(master);
    assert_eq!(raw.cmd(&["SET", key, "kept"]), b"+OK\r\n");
    // The write has reached the replica before the master dies.
    assert_eq!(raw.cmd(&["WAIT", "1", "5000"]), b":1\r\n");

    let killed = Instant::now();
    cluster.kill(master);
    let promoted = cluster.wait_for_failover(master, Duration::from_secs(20));
    eprintln!("failover took {:?}", killed.elapsed());
    assert_eq!(promoted, replica);
    assert_eq!(cluster.owner_of_slot(slot), replica);
    assert!(!cluster.masters().contains(&master));
    assert_eq!(cluster.direct(replica).cmd(&["GET", key]), bulk("kept"));

    // The old master comes back as a replica of its replacement.
    let restarted = Instant::now();
    cluster.restart(master);
    eprintln!("rejoined in {:?}", restarted.elapsed());
    assert_eq!(cluster.replicas_of(replica), vec![master]);
    let moved = format!("-MOVED {slot} 127.0.0.1:{replica}\r\n").into_bytes();
    assert_eq!(cluster.direct(master).cmd(&["GET", key]), moved);
}

#[test]
fn clusters_without_replicas_or_with_fewer_than_three_masters() {
    let started = Instant::now();
    let cluster = TestCluster::start(3, 0);
    eprintln!("3x0 cluster up in {:?}", started.elapsed());
    assert_eq!(cluster.masters().len(), 3);
    assert_eq!(cluster.seeds().len(), 3);

    // redis-cli refuses fewer than three masters; the harness builds
    // these by hand.
    let started = Instant::now();
    let cluster = TestCluster::start(1, 1);
    eprintln!("1x1 cluster up in {:?}", started.elapsed());
    let masters = cluster.masters();
    assert_eq!(masters.len(), 1);
    assert_eq!(cluster.replicas_of(masters[0]).len(), 1);
    assert_eq!(cluster.owner_of_slot(0), masters[0]);
    assert_eq!(cluster.owner_of_slot(16383), masters[0]);
}
