//! Cluster mode against a real local Redis Cluster that each test builds:
//! routing by the namespaced key's slot, hash tags, split multi-key
//! commands, CROSSSLOT refusals, commands that visit every master,
//! transactions, blocking commands and Pub/Sub on the right node, a slot
//! migrated while clients run, and a failover under writes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::cluster::TestCluster;
use common::{ADMIN, ALICE, BOB, Proxy, User, bulk, upstream_prefix};

/// Admins of both projects, for `DBSIZE` and `FLUSHDB`.
const SHIPPING_ADMIN: User = User {
    name: "dispatcher",
    password: "dispatcher-pw",
    project: "shipping",
    access: "admin",
};
const USERS: &[User] = &[ALICE, BOB, ADMIN, SHIPPING_ADMIN];

fn start(masters: usize, replicas: usize) -> (TestCluster, Proxy) {
    let cluster = TestCluster::start(masters, replicas);
    let proxy = Proxy::start_toml(&cluster.proxy_toml(USERS, "", "enabled = false\n"));
    (cluster, proxy)
}

/// The master that holds `key` of `project` upstream, asked of Redis.
fn holder(cluster: &TestCluster, project: &str, key: &str) -> u16 {
    let upstream = format!("{}{key}", upstream_prefix(project));
    cluster.owner_of_slot(TestCluster::slot_of(upstream.as_bytes()))
}

fn array(items: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", items.len()).into_bytes();
    for item in items {
        out.extend_from_slice(item);
    }
    out
}

/// Client keys of Alice's that land on every master.
fn keys_on_every_master(cluster: &TestCluster, count: usize) -> Vec<String> {
    let keys: Vec<String> = (0..count).map(|i| format!("key:{i}")).collect();
    let mut masters: Vec<u16> = keys
        .iter()
        .map(|k| holder(cluster, ALICE.project, k))
        .collect();
    masters.sort_unstable();
    masters.dedup();
    let mut all = cluster.masters();
    all.sort_unstable();
    assert_eq!(masters, all, "the test keys must reach every master");
    keys
}

#[test]
fn keys_live_on_the_master_of_their_namespaced_slot_and_hash_tags_hold() {
    let (cluster, proxy) = start(3, 0);
    let mut alice = proxy.login(&ALICE);
    let keys = keys_on_every_master(&cluster, 30);
    for key in &keys {
        assert_eq!(alice.cmd(&["SET", key, &format!("v-{key}")]), b"+OK\r\n");
    }
    let prefix = upstream_prefix(ALICE.project);
    for key in &keys {
        let master = holder(&cluster, ALICE.project, key);
        let mut direct = cluster.direct(master);
        assert_eq!(
            direct.cmd(&["GET", &format!("{prefix}{key}")]),
            bulk(&format!("v-{key}")),
            "{key} on its slot's master"
        );
        assert_eq!(alice.cmd(&["GET", key]), bulk(&format!("v-{key}")));
    }

    // The prefix has no braces, so the client's hash tag picks the slot:
    // commands that need one slot work on tagged keys.
    assert_eq!(alice.cmd(&["SET", "{user1}:a", "1"]), b"+OK\r\n");
    assert_eq!(alice.cmd(&["RENAME", "{user1}:a", "{user1}:b"]), b"+OK\r\n");
    assert_eq!(alice.cmd(&["SADD", "{user1}:s1", "x"]), b":1\r\n");
    assert_eq!(
        alice.cmd(&["SMOVE", "{user1}:s1", "{user1}:s2", "x"]),
        b":1\r\n"
    );
    assert_eq!(
        alice.cmd(&["MSETNX", "{user1}:n1", "1", "{user1}:n2", "2"]),
        b":1\r\n"
    );
    assert_eq!(alice.cmd(&["GET", "{user1}:b"]), bulk("1"));
    // And the keys live on the master of the tag's own slot.
    let tag_owner = cluster.owner_of_slot(TestCluster::slot_of(b"user1"));
    let mut direct = cluster.direct(tag_owner);
    for (key, value) in [("{user1}:b", "1"), ("{user1}:n2", "2")] {
        assert_eq!(direct.cmd(&["GET", &format!("{prefix}{key}")]), bulk(value));
    }
}

#[test]
fn multi_key_commands_are_split_across_nodes_and_merged() {
    let (cluster, proxy) = start(3, 0);
    let mut alice = proxy.login(&ALICE);
    let keys = keys_on_every_master(&cluster, 12);

    let mut mset = vec!["MSET"];
    let values: Vec<String> = keys.iter().map(|k| format!("v-{k}")).collect();
    for (key, value) in keys.iter().zip(&values) {
        mset.push(key);
        mset.push(value);
    }
    assert_eq!(alice.cmd(&mset), b"+OK\r\n");

    // MGET answers in the order asked, nulls included.
    let mut mget = vec!["MGET", "missing"];
    mget.extend(keys.iter().map(String::as_str));
    let mut expected: Vec<Vec<u8>> = vec![b"$-1\r\n".to_vec()];
    expected.extend(values.iter().map(|v| bulk(v)));
    let expected: Vec<&[u8]> = expected.iter().map(Vec::as_slice).collect();
    assert_eq!(alice.cmd(&mget), array(&expected));

    let mut exists = vec!["EXISTS", "missing"];
    exists.extend(keys.iter().map(String::as_str));
    exists.push(&keys[0]);
    assert_eq!(
        alice.cmd(&exists),
        format!(":{}\r\n", keys.len() + 1).into_bytes()
    );
    let mut touch = vec!["TOUCH"];
    touch.extend(keys.iter().map(String::as_str));
    assert_eq!(
        alice.cmd(&touch),
        format!(":{}\r\n", keys.len()).into_bytes()
    );

    let (first_half, second_half) = keys.split_at(keys.len() / 2);
    let mut del = vec!["DEL", "missing"];
    del.extend(first_half.iter().map(String::as_str));
    assert_eq!(
        alice.cmd(&del),
        format!(":{}\r\n", first_half.len()).into_bytes()
    );
    let mut unlink = vec!["UNLINK"];
    unlink.extend(second_half.iter().map(String::as_str));
    assert_eq!(
        alice.cmd(&unlink),
        format!(":{}\r\n", second_half.len()).into_bytes()
    );
    assert_eq!(proxy.login(&ADMIN).cmd(&["DBSIZE"]), b":0\r\n");

    // An MSET missing its last value is refused whole, not partly run
    // (Redis Cluster itself answers CROSSSLOT before MSET counts them).
    assert!(
        alice
            .cmd(&["MSET", &keys[0], "1", &keys[1], "2", &keys[2]])
            .starts_with(b"-CROSSSLOT")
    );
    assert_eq!(alice.cmd(&["EXISTS", &keys[0], &keys[1]]), b":0\r\n");

    // Pipelined, the split replies still come back in request order.
    let mut pipeline = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        pipeline.extend(common::Raw::encode(&["SET", key, &i.to_string()]));
        pipeline.extend(common::Raw::encode(&["MGET", key, &keys[0], "missing"]));
    }
    alice.send_bytes(&pipeline);
    // The first key was set to 0 by the first request of the pipeline.
    for i in 0..keys.len() {
        assert_eq!(alice.reply(), b"+OK\r\n");
        assert_eq!(
            alice.reply(),
            array(&[&bulk(&i.to_string()), &bulk("0"), b"$-1\r\n"])
        );
    }
}

#[test]
fn commands_that_must_be_atomic_across_slots_get_crossslot() {
    let cluster = TestCluster::start(3, 0);
    let toml = cluster.proxy_toml(USERS, "", "enabled = false\n")
        + "[projects.billing]\nallow_scripts = true\n";
    let proxy = Proxy::start_toml(&toml);
    let mut alice = proxy.login(&ALICE);
    let crossslot = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n".to_vec();
    let (a, b) = ("a", "b");
    assert_ne!(
        TestCluster::slot_of(format!("{}{a}", upstream_prefix(ALICE.project)).as_bytes()),
        TestCluster::slot_of(format!("{}{b}", upstream_prefix(ALICE.project)).as_bytes())
    );
    assert_eq!(alice.cmd(&["SET", a, "1"]), b"+OK\r\n");
    assert_eq!(alice.cmd(&["SADD", "s:1", "x"]), b":1\r\n");
    for request in [
        vec!["MSETNX", a, "1", b, "2"],
        vec!["RENAME", a, b],
        vec!["SMOVE", "s:1", "s:2", "x"],
        vec!["SUNIONSTORE", "dest", "s:1", "s:2"],
        vec!["EVAL", "return 1", "2", a, b],
        vec!["BLMOVE", a, b, "LEFT", "RIGHT", "0"],
    ] {
        assert_eq!(alice.cmd(&request), crossslot, "{request:?}");
    }
    // The refusals changed nothing, and the connection goes on.
    assert_eq!(alice.cmd(&["GET", a]), bulk("1"));
    assert_eq!(alice.cmd(&["EXISTS", b]), b":0\r\n");

    // A transaction over one slot runs; over two it is refused whole.
    assert_eq!(alice.cmd(&["MULTI"]), b"+OK\r\n");
    assert_eq!(alice.cmd(&["SET", "{t}x", "1"]), b"+QUEUED\r\n");
    assert_eq!(alice.cmd(&["INCR", "{t}x"]), b"+QUEUED\r\n");
    assert_eq!(alice.cmd(&["EXEC"]), array(&[b"+OK\r\n", b":2\r\n"]));

    // A key on another node: the proxy refuses the command, and Redis the
    // EXEC of the transaction it belonged to.
    assert_ne!(
        holder(&cluster, ALICE.project, a),
        holder(&cluster, ALICE.project, b)
    );
    assert_eq!(alice.cmd(&["MULTI"]), b"+OK\r\n");
    assert_eq!(alice.cmd(&["SET", a, "changed"]), b"+QUEUED\r\n");
    assert_eq!(alice.cmd(&["SET", b, "changed"]), crossslot);
    assert!(alice.cmd(&["EXEC"]).starts_with(b"-EXECABORT"));
    assert_eq!(alice.cmd(&["GET", a]), bulk("1"));
    // Another slot on the same node: queued, and Redis refuses the EXEC.
    let same_node = (0..100)
        .map(|i| format!("same:{i}"))
        .find(|k| {
            holder(&cluster, ALICE.project, k) == holder(&cluster, ALICE.project, a)
                && TestCluster::slot_of(format!("{}{k}", upstream_prefix(ALICE.project)).as_bytes())
                    != TestCluster::slot_of(
                        format!("{}{a}", upstream_prefix(ALICE.project)).as_bytes(),
                    )
        })
        .expect("a key in another slot of the same master");
    assert_eq!(alice.cmd(&["MULTI"]), b"+OK\r\n");
    assert_eq!(alice.cmd(&["SET", a, "changed"]), b"+QUEUED\r\n");
    assert_eq!(alice.cmd(&["SET", &same_node, "changed"]), b"+QUEUED\r\n");
    assert_eq!(alice.cmd(&["EXEC"]), crossslot);
    assert_eq!(alice.cmd(&["GET", a]), bulk("1"));
    assert_eq!(alice.cmd(&["EXISTS", &same_node]), b":0\r\n");

    // A keyless transaction runs somewhere; WATCH then MULTI on one slot.
    assert_eq!(alice.cmd(&["MULTI"]), b"+OK\r\n");
    assert_eq!(alice.cmd(&["PING"]), b"+QUEUED\r\n");
    assert_eq!(alice.cmd(&["EXEC"]), array(&[b"+PONG\r\n"]));
    assert_eq!(alice.cmd(&["WATCH", "{w}k"]), b"+OK\r\n");
    let mut other = proxy.login(&ALICE);
    assert_eq!(other.cmd(&["SET", "{w}k", "meddled"]), b"+OK\r\n");
    assert_eq!(alice.cmd(&["MULTI"]), b"+OK\r\n");
    assert_eq!(alice.cmd(&["SET", "{w}k", "mine"]), b"+QUEUED\r\n");
    assert_eq!(alice.cmd(&["EXEC"]), b"*-1\r\n");
    assert_eq!(alice.cmd(&["GET", "{w}k"]), bulk("meddled"));
    drop(cluster);
}

#[test]
fn keyspace_commands_cover_every_master_inside_the_project() {
    let (cluster, proxy) = start(3, 0);
    let mut alice = proxy.login(&ALICE);
    let mut bob = proxy.login(&BOB);
    let keys = keys_on_every_master(&cluster, 40);
    for key in &keys {
        assert_eq!(alice.cmd(&["SET", key, "a"]), b"+OK\r\n");
    }
    // Every master holds some of Alice's keys (the cluster was empty).
    for master in cluster.masters() {
        let count = cluster.direct(master).cmd(&["DBSIZE"]);
        assert_ne!(count, b":0\r\n", "master {master} holds keys");
    }
    for i in 0..25 {
        assert_eq!(bob.cmd(&["SET", &format!("bob:{i}"), "b"]), b"+OK\r\n");
    }
    // Bob reaches none of Alice's keys, on whichever node they live.
    for key in &keys {
        assert_eq!(bob.cmd(&["GET", key]), b"$-1\r\n", "{key}");
    }
    let mut mget = vec!["MGET"];
    mget.extend(keys.iter().map(String::as_str));
    let nulls = bob.cmd(&mget);
    assert_eq!(
        nulls.windows(5).filter(|w| w == b"$-1\r\n").count(),
        keys.len()
    );

    let mut admin = proxy.login(&ADMIN);
    let mut shipping_admin = proxy.login(&SHIPPING_ADMIN);
    assert_eq!(
        admin.cmd(&["DBSIZE"]),
        format!(":{}\r\n", keys.len()).into_bytes()
    );
    assert_eq!(shipping_admin.cmd(&["DBSIZE"]), b":25\r\n");
    assert_eq!(
        proxy.redis_cli(&ALICE, &["KEYS", "*"]).lines().count(),
        keys.len()
    );

    // SCAN walks every master, one cursor for the client.
    let mut seen = Vec::new();
    let mut cursor = "0".to_owned();
    let mut calls = 0;
    loop {
        let out = proxy.redis_cli(&ALICE, &["SCAN", &cursor, "COUNT", "7"]);
        let mut lines = out.lines();
        cursor = lines.next().expect("a cursor").to_owned();
        seen.extend(lines.map(str::to_owned));
        calls += 1;
        if cursor == "0" {
            break;
        }
        assert!(calls < 1000, "SCAN ends");
    }
    seen.sort();
    seen.dedup();
    let mut expected = keys.clone();
    expected.sort();
    assert_eq!(seen, expected, "every key once, none of bob's");
    assert_eq!(
        proxy.redis_cli(&ALICE, &["SCAN", "99999999999999999999"]),
        "ERR invalid cursor"
    );

    let random = proxy.redis_cli(&ADMIN, &["RANDOMKEY"]);
    assert!(keys.contains(&random), "{random}");

    // FLUSHDB (an admin's) empties the project on every master, and only it.
    assert_eq!(admin.cmd(&["FLUSHDB"]), b"+OK\r\n");
    assert_eq!(admin.cmd(&["DBSIZE"]), b":0\r\n");
    assert_eq!(shipping_admin.cmd(&["DBSIZE"]), b":25\r\n");
    assert_eq!(bob.cmd(&["GET", "bob:3"]), bulk("b"));
}

#[test]
fn blocking_commands_and_pubsub_use_the_right_node() {
    let (cluster, proxy) = start(3, 0);
    let keys = keys_on_every_master(&cluster, 12);
    let (q1, q2) = (
        &keys[0],
        keys.iter()
            .find(|k| {
                holder(&cluster, ALICE.project, k) != holder(&cluster, ALICE.project, &keys[0])
            })
            .expect("a key on another master"),
    );

    // A blocked BLPOP is woken by a push from another client, on two
    // different nodes in turn over the same connection.
    let mut waiter = proxy.login(&ALICE);
    for queue in [q1, q2] {
        waiter.send(&["BLPOP", queue, "5"]);
        thread::sleep(Duration::from_millis(200));
        let mut pusher = proxy.login(&ALICE);
        assert_eq!(pusher.cmd(&["RPUSH", queue, "job"]), b":1\r\n");
        assert_eq!(waiter.reply(), array(&[&bulk(queue), &bulk("job")]));
    }
    // The connection is back to ordinary requests on any node.
    assert_eq!(waiter.cmd(&["SET", q1, "x"]), b"+OK\r\n");
    assert_eq!(waiter.cmd(&["SET", q2, "y"]), b"+OK\r\n");

    // PUBLISH reaches subscribers on whichever node they listen.
    let mut sub = proxy.login(&ALICE);
    sub.cmd(&["SUBSCRIBE", "news"]);
    let mut bob_sub = proxy.login(&BOB);
    bob_sub.cmd(&["SUBSCRIBE", "news"]);
    let mut publisher = proxy.login(&ALICE);
    publisher.cmd(&["PUBLISH", "news", "hello"]);
    assert_eq!(
        sub.reply(),
        array(&[&bulk("message"), &bulk("news"), &bulk("hello")])
    );
    // Shard channels follow the slot of the namespaced channel, whether
    // published through the shared links or a session's own link (RESP3).
    let mut resp3_publisher = proxy.login(&ALICE);
    assert_eq!(resp3_publisher.cmd(&["HELLO", "3"]).first(), Some(&b'%'));
    for channel in ["orders", "{x}orders", "audit"] {
        let mut shard_sub = proxy.login(&ALICE);
        assert_eq!(
            shard_sub.cmd(&["SSUBSCRIBE", channel]),
            array(&[&bulk("ssubscribe"), &bulk(channel), b":1\r\n"])
        );
        for publisher in [&mut publisher, &mut resp3_publisher] {
            assert_eq!(publisher.cmd(&["SPUBLISH", channel, "item"]), b":1\r\n");
            assert_eq!(
                shard_sub.reply(),
                array(&[&bulk("smessage"), &bulk(channel), &bulk("item")])
            );
        }
    }
    // Bob's subscriber heard nothing of Alice's channel.
    let mut bob_pub = proxy.login(&BOB);
    bob_pub.cmd(&["PUBLISH", "news", "bob's"]);
    assert_eq!(
        bob_sub.reply(),
        array(&[&bulk("message"), &bulk("news"), &bulk("bob's")])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_library_without_cluster_support_works_against_three_masters() {
    let (cluster, proxy) = tokio::task::spawn_blocking(|| start(3, 0)).await.unwrap();
    let client = redis::Client::open(proxy.url(&SHIPPING_ADMIN)).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let mut pipe = redis::pipe();
    for i in 0..200 {
        pipe.cmd("SET").arg(format!("p{i}")).arg(i).ignore();
    }
    pipe.cmd("MGET").arg("p0").arg("p57").arg("p199");
    let (values,): (Vec<i64>,) = pipe.query_async(&mut con).await.unwrap();
    assert_eq!(values, vec![0, 57, 199]);
    let deleted: i64 = redis::cmd("DEL")
        .arg("p1")
        .arg("p2")
        .arg("p3")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(deleted, 3);
    let size: i64 = redis::cmd("DBSIZE").query_async(&mut con).await.unwrap();
    assert_eq!(size, 197);
    let (incremented,): (i64,) = redis::pipe()
        .atomic()
        .cmd("INCR")
        .arg("{c}n")
        .cmd("INCR")
        .arg("{c}n")
        .ignore()
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(incremented, 1);
    let masters = cluster.masters();
    for master in masters {
        let held = cluster.direct(master).cmd(&["DBSIZE"]);
        assert_ne!(held, b":0\r\n");
    }
}

/// A slot migrated while clients read and write it: the proxy follows ASK
/// while the keys move, then MOVED, and no request fails.
#[test]
fn a_slot_migrated_under_load_is_followed_through_ask_then_moved() {
    let (cluster, proxy) = start(3, 0);
    let tagged: Vec<String> = (0..50).map(|i| format!("{{moving}}:{i}")).collect();
    let mut alice = proxy.login(&ALICE);
    for key in &tagged {
        assert_eq!(alice.cmd(&["SET", key, "0"]), b"+OK\r\n");
    }
    let slot = TestCluster::slot_of(b"moving");
    let from = cluster.owner_of_slot(slot);
    let to = cluster.another_master(from);

    // A client keeps incrementing every key while the slot moves.
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let stop = Arc::clone(&stop);
        let tagged = tagged.clone();
        let port = proxy.port;
        thread::spawn(move || {
            let mut c = common::Raw::connect(port);
            assert_eq!(c.cmd(&["AUTH", ALICE.name, ALICE.password]), b"+OK\r\n");
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) || rounds == 0 {
                for key in &tagged {
                    let reply = c.cmd(&["INCR", key]);
                    assert!(
                        reply.starts_with(b":"),
                        "INCR during migration: {}",
                        String::from_utf8_lossy(&reply)
                    );
                }
                rounds += 1;
            }
            rounds
        })
    };
    thread::sleep(Duration::from_millis(200));
    cluster.begin_migration(slot, from, to);
    thread::sleep(Duration::from_millis(200));
    cluster.migrate_keys(slot, from, to);
    thread::sleep(Duration::from_millis(300));
    cluster.finish_migration(slot, to);
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let rounds = worker.join().expect("the writer saw no error");

    assert_eq!(cluster.owner_of_slot(slot), to);
    for key in &tagged {
        assert_eq!(alice.cmd(&["GET", key]), bulk(&rounds.to_string()), "{key}");
    }
    // Both kinds of redirection were met and followed.
    let logs = proxy.logs().join("\n");
    assert!(logs.contains("kind=Ask"), "ASK followed");
    assert!(logs.contains("kind=Moved"), "MOVED followed");
    let upstream = format!("{}{}", upstream_prefix(ALICE.project), tagged[0]);
    assert_eq!(
        cluster.direct(to).cmd(&["GET", &upstream]),
        bulk(&rounds.to_string())
    );
}

/// A master dies while a client writes; its replica takes over. Requests
/// in flight on the dead master get an error, later ones wait for the new
/// master, and every acknowledged write is readable afterwards.
#[test]
fn a_failover_under_writes_keeps_every_acknowledged_write() {
    let (mut cluster, proxy) = start(3, 1);
    let stop = Arc::new(AtomicBool::new(false));
    // The index of the next write, so the test knows which came after the kill.
    let next = Arc::new(AtomicU64::new(0));
    let writer = {
        let stop = Arc::clone(&stop);
        let next = Arc::clone(&next);
        let port = proxy.port;
        thread::spawn(move || {
            let mut c = common::Raw::connect(port);
            assert_eq!(c.cmd(&["AUTH", ALICE.name, ALICE.password]), b"+OK\r\n");
            let mut acknowledged = Vec::new();
            let mut errors = Vec::new();
            let mut longest = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let i = next.load(Ordering::Relaxed);
                let key = format!("w:{i}");
                let sent = Instant::now();
                let reply = c.cmd(&["SET", &key, &i.to_string()]);
                longest = longest.max(sent.elapsed());
                if reply == b"+OK\r\n" {
                    acknowledged.push(key);
                } else {
                    errors.push(String::from_utf8_lossy(&reply).into_owned());
                }
                next.store(i + 1, Ordering::Relaxed);
            }
            (acknowledged, errors, longest)
        })
    };
    thread::sleep(Duration::from_millis(500));
    let victim = cluster.masters()[0];
    let killed = Instant::now();
    let first_after_kill = next.load(Ordering::Relaxed) + 1;
    cluster.kill(victim);
    let promoted = cluster.wait_for_failover(victim, Duration::from_secs(30));
    let failover = killed.elapsed();
    thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    let (acknowledged, errors, longest) = writer.join().expect("the writer ran");
    eprintln!(
        "failover to {promoted} took {failover:?}; {} writes acknowledged, {} errors {:?}, \
         longest wait {longest:?}",
        acknowledged.len(),
        errors.len(),
        errors.iter().take(3).collect::<Vec<_>>()
    );
    assert!(acknowledged.len() > 100, "writes went on");
    // Including to the slots of the dead master, once its replica took over.
    assert!(
        acknowledged.iter().any(|key| {
            let index: u64 = key.trim_start_matches("w:").parse().expect("w:<index>");
            index > first_after_kill && holder(&cluster, ALICE.project, key) == promoted
        }),
        "no write reached the promoted master {promoted}"
    );
    assert!(
        errors.len() <= 5,
        "only requests in flight on the dead master fail: {errors:?}"
    );
    for e in &errors {
        assert!(e.starts_with("-ERR upstream"), "{e}");
    }

    // Every acknowledged write is there, read through a fresh connection.
    let mut reader = proxy.login(&ALICE);
    for chunk in acknowledged.chunks(200) {
        let mut mget = vec!["MGET"];
        mget.extend(chunk.iter().map(String::as_str));
        let reply = reader.cmd(&mget);
        let nulls = reply.windows(5).filter(|w| w == b"$-1\r\n").count();
        assert_eq!(nulls, 0, "an acknowledged write was lost");
    }
    let last = acknowledged.last().expect("some writes");
    let value = last.trim_start_matches("w:");
    assert_eq!(reader.cmd(&["GET", last]), bulk(value));
}

#[test]
fn sealed_values_open_after_resharding_and_stay_apart_between_projects() {
    let cluster = TestCluster::start(3, 0);
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keyring.json");
    redcloak::keyring::Keyring::generate(&keyring).unwrap();
    let encryption = format!(
        "enabled = true\nkeyring = \"{}\"\ncompression_threshold = 64\n",
        keyring.display()
    );
    let proxy = Proxy::start_toml(&cluster.proxy_toml(USERS, "", &encryption));
    let mut alice = proxy.login(&ALICE);
    let mut bob = proxy.login(&BOB);
    let long = "compressible ".repeat(40);
    let keys: Vec<String> = (0..30)
        .map(|i| format!("{{shard{}}}:secret{i}", i % 5))
        .collect();
    for key in &keys {
        assert_eq!(alice.cmd(&["SET", key, &long]), b"+OK\r\n");
        assert_eq!(bob.cmd(&["SET", key, "bob's"]), b"+OK\r\n");
    }
    // Upstream holds sealed values (the value format's magic and version),
    // never the plaintext, for both projects.
    for (user, plaintext) in [(&ALICE, "compressible"), (&BOB, "bob's")] {
        let stored_key = format!("{}{}", upstream_prefix(user.project), keys[0]);
        let master = holder(&cluster, user.project, &keys[0]);
        let stored = cluster.direct(master).cmd(&["GET", &stored_key]);
        let body_start = stored
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a bulk reply")
            + 2;
        assert_eq!(
            stored.get(body_start..body_start + 4),
            Some(&[0x00, 0x52, 0x43, 0x01][..]),
            "{stored:?}"
        );
        assert!(!String::from_utf8_lossy(&stored).contains(plaintext));
    }

    // Move every slot the keys use to another master.
    for shard in 0..5 {
        let slot = TestCluster::slot_of(format!("shard{shard}").as_bytes());
        let from = cluster.owner_of_slot(slot);
        let to = cluster.another_master(from);
        cluster.migrate_slot(slot, from, to);
    }
    for key in &keys {
        assert_eq!(alice.cmd(&["GET", key]), bulk(&long), "{key}");
        assert_eq!(bob.cmd(&["GET", key]), bulk("bob's"), "{key}");
    }
    assert_eq!(proxy.login(&ADMIN).cmd(&["DBSIZE"]), b":30\r\n");
    assert_eq!(proxy.login(&SHIPPING_ADMIN).cmd(&["DBSIZE"]), b":30\r\n");
}

#[test]
fn a_lockout_shared_through_the_cluster_holds_on_every_proxy() {
    let cluster = TestCluster::start(3, 0);
    let toml = cluster.proxy_toml(USERS, "", "enabled = false\n").replace(
        "[audit]\nenabled = false\n",
        "[audit]\nenabled = false\nlockout_shared = true\nfailed_access_threshold = 2\n",
    );
    let first = Proxy::start_toml(&toml);
    let second = Proxy::start_toml(&toml);
    let wrongpass = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
    let (mut a, mut b) = (first.raw(), second.raw());
    assert_eq!(a.cmd(&["AUTH", ALICE.name, "wrong"]), wrongpass);
    assert_eq!(b.cmd(&["AUTH", ALICE.name, "wrong"]), wrongpass);
    // Locked out on both proxies, though each saw one failure.
    assert_eq!(a.cmd(&["AUTH", ALICE.name, ALICE.password]), wrongpass);
    assert_eq!(b.cmd(&["AUTH", ALICE.name, ALICE.password]), wrongpass);
    assert_eq!(b.cmd(&["AUTH", BOB.name, BOB.password]), b"+OK\r\n");

    // The lock lives on one node (the failures it replaced were deleted);
    // its hash tag keeps it in the slot of the pair's failure counts.
    let mut found = Vec::new();
    for master in cluster.masters() {
        let keys = cluster.direct(master).cmd(&["KEYS", "redcloak:*"]);
        let listed = String::from_utf8_lossy(&keys).into_owned();
        if listed.contains("redcloak:") {
            found.push(listed);
        }
    }
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("redcloak:lockout:{"), "{found:?}");
    assert!(!found[0].contains("alice"), "{found:?}");
}

#[test]
fn reencrypt_moves_values_on_every_master_to_the_current_key() {
    let cluster = TestCluster::start(3, 0);
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keyring.json");
    redcloak::keyring::Keyring::generate(&keyring).unwrap();
    let encryption = format!("enabled = true\nkeyring = \"{}\"\n", keyring.display());
    let toml = cluster.proxy_toml(USERS, "", &encryption);
    let config = common::write_file(dir.path(), "redcloak.toml", &toml);
    let proxy = Proxy::start_toml(&toml);
    let mut alice = proxy.login(&ALICE);
    let keys = keys_on_every_master(&cluster, 30);
    for key in &keys {
        assert_eq!(alice.cmd(&["SET", key, &format!("v-{key}")]), b"+OK\r\n");
    }
    assert_eq!(alice.cmd(&["HSET", "h", "f", "hv"]), b":1\r\n");
    assert_eq!(alice.cmd(&["RPUSH", "l", "a", "b"]), b":2\r\n");
    drop(proxy);

    let rotated = redcloak::keyring::Keyring::rotate(&keyring).unwrap();
    let current = rotated
        .list()
        .into_iter()
        .find(|info| info.is_current)
        .expect("a current key")
        .id;
    let stdout = common::reencrypt(&config);
    let rewritten = keys.len() + 1 + 2;
    assert!(
        stdout.contains(&format!("{rewritten} values rewritten")),
        "{stdout}"
    );
    assert!(stdout.contains("marked retired"), "{stdout}");

    // Every master's values now name the current key, and open.
    let prefix = upstream_prefix(ALICE.project);
    for key in &keys {
        let master = holder(&cluster, ALICE.project, key);
        let stored = cluster
            .direct(master)
            .cmd(&["GET", &format!("{prefix}{key}")]);
        let named = stored
            .windows(current.len())
            .any(|w| w == current.as_bytes());
        assert!(named, "{key} is sealed under the current key");
    }
    let proxy = Proxy::start_toml(&toml);
    let mut alice = proxy.login(&ALICE);
    for key in &keys {
        assert_eq!(alice.cmd(&["GET", key]), bulk(&format!("v-{key}")));
    }
    assert_eq!(alice.cmd(&["HGET", "h", "f"]), bulk("hv"));
    assert_eq!(
        alice.cmd(&["LRANGE", "l", "0", "-1"]),
        array(&[&bulk("a"), &bulk("b")])
    );
}
