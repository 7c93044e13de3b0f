//! Command families beyond plain keys: Pub/Sub (RESP2 and RESP3, keyspace
//! notifications), streams, scripts.

mod common;

use std::time::Duration;

use common::*;

fn arr(items: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", items.len()).into_bytes();
    for item in items {
        out.extend_from_slice(item);
    }
    out
}

#[test]
fn pubsub_messages_stay_inside_the_project_and_lose_the_prefix() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut sub = proxy.login(&ALICE);
    assert_eq!(
        sub.cmd(&["SUBSCRIBE", "news", "sports"]),
        arr(&[&bulk("subscribe"), &bulk("news"), b":1\r\n"])
    );
    assert_eq!(
        sub.reply(),
        arr(&[&bulk("subscribe"), &bulk("sports"), b":2\r\n"])
    );
    assert_eq!(
        sub.cmd(&["PSUBSCRIBE", "n*"]),
        arr(&[&bulk("psubscribe"), &bulk("n*"), b":3\r\n"])
    );

    // Another project's channel of the same name is another channel.
    let mut bob = proxy.login(&BOB);
    assert_eq!(bob.cmd(&["PUBLISH", "news", "from bob"]), b":0\r\n");
    let mut alice = proxy.login(&ALICE);
    assert_eq!(alice.cmd(&["PUBLISH", "news", "hello"]), b":2\r\n");
    let first = sub.reply();
    let second = sub.reply();
    let message = arr(&[&bulk("message"), &bulk("news"), &bulk("hello")]);
    let pmessage = arr(&[
        &bulk("pmessage"),
        &bulk("n*"),
        &bulk("news"),
        &bulk("hello"),
    ]);
    assert!(
        (first == message && second == pmessage) || (first == pmessage && second == message),
        "{} / {}",
        String::from_utf8_lossy(&first),
        String::from_utf8_lossy(&second)
    );

    // Subscribed mode in RESP2: only Pub/Sub commands, PING, QUIT, RESET.
    assert!(
        sub.cmd(&["GET", "k"])
            .starts_with(b"-ERR Can't execute 'get'")
    );
    assert_eq!(sub.cmd(&["PING"]), arr(&[&bulk("pong"), &bulk("")]));

    // Introspection sees the project's channels only, unprefixed.
    assert_eq!(
        alice.cmd(&["PUBSUB", "NUMSUB", "news", "other"]),
        arr(&[&bulk("news"), b":1\r\n", &bulk("other"), b":0\r\n"])
    );
    let channels = alice.cmd(&["PUBSUB", "CHANNELS"]);
    assert!(
        channels.starts_with(b"*2\r\n"),
        "{}",
        String::from_utf8_lossy(&channels)
    );
    assert!(!channels.windows(8).any(|w| w == b"project:"));
    assert_eq!(bob.cmd(&["PUBSUB", "CHANNELS"]), b"*0\r\n");
    assert_eq!(alice.cmd(&["PUBSUB", "NUMPAT"]), b":1\r\n");
    assert_eq!(bob.cmd(&["PUBSUB", "NUMPAT"]), b":0\r\n");

    // Unsubscribing everything leaves subscribed mode.
    assert_eq!(
        sub.cmd(&["PUNSUBSCRIBE"]),
        arr(&[&bulk("punsubscribe"), &bulk("n*"), b":2\r\n"])
    );
    let a = sub.cmd(&["UNSUBSCRIBE"]);
    let b = sub.reply();
    assert!(
        a.starts_with(b"*3\r\n$11\r\nunsubscribe\r\n") && b.ends_with(b":0\r\n"),
        "{}",
        String::from_utf8_lossy(&b)
    );
    assert_eq!(sub.cmd(&["GET", "k"]), b"$-1\r\n");
    assert_eq!(alice.cmd(&["PUBSUB", "NUMPAT"]), b":0\r\n");
}

#[test]
fn resp3_subscribers_get_push_frames_and_can_keep_issuing_commands() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut sub = proxy.login(&ALICE);
    assert_eq!(sub.cmd(&["HELLO", "3"]).first(), Some(&b'%'));
    assert_eq!(
        sub.cmd(&["SUBSCRIBE", "news"]),
        [
            b">3\r\n".to_vec(),
            bulk("subscribe"),
            bulk("news"),
            b":1\r\n".to_vec()
        ]
        .concat()
    );
    assert_eq!(sub.cmd(&["SET", "k", "v"]), b"+OK\r\n");
    let mut publisher = proxy.login(&ALICE);
    assert_eq!(publisher.cmd(&["PUBLISH", "news", "hi"]), b":1\r\n");
    assert_eq!(
        sub.reply(),
        [
            b">3\r\n".to_vec(),
            bulk("message"),
            bulk("news"),
            bulk("hi")
        ]
        .concat()
    );
    assert_eq!(sub.cmd(&["GET", "k"]), bulk("v"));
}

#[test]
fn keyspace_notifications_show_a_project_its_own_keys_only() {
    let redis = Redis::start_with(&["--notify-keyspace-events", "KEA"]);
    let proxy = Proxy::start(redis.port);
    let mut sub = proxy.login(&ALICE);
    assert_eq!(
        sub.cmd(&["SUBSCRIBE", "__keyevent@0__:set", "__keyspace@0__:mine"])
            .first(),
        Some(&b'*')
    );
    sub.reply();

    let mut bob = proxy.login(&BOB);
    assert_eq!(bob.cmd(&["SET", "mine", "bob's"]), b"+OK\r\n");
    let mut alice = proxy.login(&ALICE);
    assert_eq!(alice.cmd(&["SET", "mine", "alice's"]), b"+OK\r\n");

    let mut seen = vec![sub.reply(), sub.reply()];
    seen.sort();
    let mut expected = vec![
        arr(&[&bulk("message"), &bulk("__keyevent@0__:set"), &bulk("mine")]),
        arr(&[&bulk("message"), &bulk("__keyspace@0__:mine"), &bulk("set")]),
    ];
    expected.sort();
    assert_eq!(seen, expected, "bob's SET was not shown to alice");
    // Nobody may publish on notification channels.
    assert!(
        alice
            .cmd(&["PUBLISH", "__keyevent@0__:set", "fake"])
            .starts_with(b"-ERR")
    );
    std::thread::sleep(Duration::from_millis(100));
}

#[test]
fn stream_reads_return_unprefixed_keys_in_both_protocols() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.login(&ALICE);
    assert_eq!(c.cmd(&["XADD", "events", "1-1", "f", "v"]), bulk("1-1"));
    let entries = arr(&[&arr(&[&bulk("1-1"), &arr(&[&bulk("f"), &bulk("v")])])]);
    assert_eq!(
        c.cmd(&["XREAD", "COUNT", "10", "STREAMS", "events", "0"]),
        arr(&[&arr(&[&bulk("events"), &entries])])
    );
    assert_eq!(c.cmd(&["XGROUP", "CREATE", "events", "g", "0"]), b"+OK\r\n");
    assert_eq!(
        c.cmd(&[
            "XREADGROUP",
            "GROUP",
            "g",
            "c1",
            "BLOCK",
            "100",
            "STREAMS",
            "events",
            ">"
        ]),
        arr(&[&arr(&[&bulk("events"), &entries])])
    );
    assert_eq!(c.cmd(&["HELLO", "3"]).first(), Some(&b'%'));
    assert_eq!(
        c.cmd(&["XREAD", "STREAMS", "events", "0"]),
        [b"%1\r\n".to_vec(), bulk("events"), entries.clone()].concat()
    );
    // A blocking read times out as in Redis.
    assert_eq!(
        c.cmd(&["XREAD", "BLOCK", "100", "STREAMS", "events", "$"]),
        b"_\r\n"
    );
}

#[test]
fn scripts_run_only_for_projects_that_allow_them_with_keys_namespaced() {
    let redis = Redis::start();
    let toml = config_toml(redis.port, USERS, "") + "[projects.billing]\nallow_scripts = true\n";
    let proxy = Proxy::start_toml(&toml);
    let script = "return redis.call('SET', KEYS[1], ARGV[1])";
    let mut alice = proxy.login(&ALICE);
    assert_eq!(
        alice.cmd(&["EVAL", script, "1", "from-script", "v"]),
        b"+OK\r\n"
    );
    assert_eq!(alice.cmd(&["GET", "from-script"]), bulk("v"));
    let key = format!("{}from-script", upstream_prefix("billing"));
    assert_eq!(redis.direct().cmd(&["GET", &key]), bulk("v"));

    let mut bob = proxy.login(&BOB);
    let refused = bob.cmd(&["EVAL", script, "1", "k", "v"]);
    assert!(
        refused
            .starts_with(b"-ERR 'eval' is not available through redcloak: scripts are not allowed"),
        "{}",
        String::from_utf8_lossy(&refused)
    );
    assert!(
        bob.cmd(&["FCALL", "f", "0"])
            .starts_with(b"-ERR 'fcall' is not available")
    );
    assert!(alice.cmd(&["SCRIPT", "FLUSH"]).starts_with(b"-ERR"));
}

#[test]
fn admin_emulations_see_only_the_project_and_keep_pipeline_order() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut bob = proxy.login(&BOB);
    assert_eq!(bob.cmd(&["MSET", "b1", "1", "b2", "2"]), b"+OK\r\n");

    let mut admin = proxy.login(&ADMIN);
    // Pipelined: the writes before DBSIZE count, FLUSHDB deletes only the
    // project's keys, and the write after it survives.
    let mut batch = Raw::encode(&["SET", "a1", "1"]);
    batch.extend(Raw::encode(&["SET", "a2", "2"]));
    batch.extend(Raw::encode(&["DBSIZE"]));
    batch.extend(Raw::encode(&["RANDOMKEY"]));
    batch.extend(Raw::encode(&["FLUSHDB"]));
    batch.extend(Raw::encode(&["SET", "after", "3"]));
    batch.extend(Raw::encode(&["DBSIZE"]));
    admin.send_bytes(&batch);
    assert_eq!(admin.reply(), b"+OK\r\n");
    assert_eq!(admin.reply(), b"+OK\r\n");
    assert_eq!(admin.reply(), b":2\r\n");
    let random = admin.reply();
    assert!(
        random == bulk("a1") || random == bulk("a2"),
        "{}",
        String::from_utf8_lossy(&random)
    );
    assert_eq!(admin.reply(), b"+OK\r\n");
    assert_eq!(admin.reply(), b"+OK\r\n");
    assert_eq!(admin.reply(), b":1\r\n");
    // A single server takes the project's keys in one DEL, whatever their
    // slots (only a cluster needs one request per slot).
    let stats = String::from_utf8(redis.direct().cmd(&["INFO", "commandstats"])).unwrap();
    assert!(stats.contains("cmdstat_del:calls=1,"), "{stats}");

    assert_eq!(
        bob.cmd(&["DBSIZE"]).first(),
        Some(&b'-'),
        "DBSIZE is for admins"
    );
    assert_eq!(
        redis.direct().cmd(&["DBSIZE"]),
        b":3\r\n",
        "bob's keys survived FLUSHDB"
    );
    assert_eq!(admin.cmd(&["FLUSHALL", "ASYNC"]), b"+OK\r\n");
    assert_eq!(admin.cmd(&["RANDOMKEY"]), b"$-1\r\n");
    assert_eq!(admin.cmd(&["FLUSHDB", "NOW"]), b"-ERR syntax error\r\n");
}

#[test]
fn info_is_a_project_view_in_redis_layout() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut bob = proxy.login(&BOB);
    assert_eq!(bob.cmd(&["SET", "b", "1"]), b"+OK\r\n");
    let mut alice = proxy.login(&ALICE);
    assert_eq!(alice.cmd(&["MSET", "a", "1", "c", "2"]), b"+OK\r\n");

    let info = String::from_utf8(alice.cmd(&["INFO"])).unwrap();
    assert!(info.contains("# Server\r\nredis_version:7."), "{info}");
    assert!(info.contains("arch_bits:64"));
    assert!(info.contains("connected_clients:1\r\n"), "{info}");
    assert!(info.contains("db0:keys=2\r\n"), "{info}");
    let server = String::from_utf8(alice.cmd(&["INFO", "server"])).unwrap();
    assert!(server.contains("redis_version") && !server.contains("# Keyspace"));
    let replication = String::from_utf8(alice.cmd(&["INFO", "replication"])).unwrap();
    assert_eq!(replication, "$0\r\n\r\n");
}

#[test]
fn command_introspection_describes_what_the_proxy_offers() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.login(&ALICE);
    let count = String::from_utf8(c.cmd(&["COMMAND", "COUNT"])).unwrap();
    let count: usize = count.trim_start_matches(':').trim().parse().unwrap();
    assert!(count > 150, "{count}");
    let all = c.cmd(&["COMMAND"]);
    assert!(
        all.starts_with(format!("*{count}\r\n").as_bytes()),
        "COMMAND lists as many as COUNT says"
    );
    let docs = c.cmd(&["COMMAND", "DOCS"]);
    assert!(docs.windows(5).any(|w| w == b"\r\nget"));
    assert!(
        !docs.windows(8).any(|w| w == b"\r\nconfig"),
        "refused commands are not described"
    );
    let info = c.cmd(&["COMMAND", "INFO", "get", "config"]);
    assert!(
        info.starts_with(b"*2\r\n*") && info.ends_with(b"$-1\r\n"),
        "{}",
        String::from_utf8_lossy(&info)
    );
    assert_eq!(
        c.cmd(&["COMMAND", "GETKEYS", "MSET", "a", "1", "b", "2"]),
        arr(&[&bulk("a"), &bulk("b")])
    );
    // redis-cli 7 asks for COMMAND DOCS at start and works interactively.
    let out = proxy.redis_cli(&ALICE, &["COMMAND", "COUNT"]);
    assert_eq!(out, count.to_string());
}
