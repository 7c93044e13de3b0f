//! The isolation suite: project A holds data of every type under plain key
//! names; project B, using the very same names, can't read, count, detect
//! or change any of it, through any command family.

mod common;

use common::*;

/// A's data: one key of each type.
fn fill(a: &mut Raw) {
    for cmd in [
        &["SET", "s", "A"][..],
        &["HSET", "h", "f", "A"],
        &["RPUSH", "l", "A"],
        &["SADD", "st", "A"],
        &["ZADD", "z", "1", "A"],
        &["XADD", "x", "1-1", "f", "A"],
        &["PFADD", "hl", "A"],
        &["GEOADD", "g", "13.36", "38.11", "A"],
        &["SETBIT", "b", "1", "1"],
        &["EXPIRE", "s", "1000"],
    ] {
        assert_eq!(
            a.cmd(cmd).first().map(|b| *b == b'-'),
            Some(false),
            "{cmd:?}"
        );
    }
}

#[test]
fn another_project_cannot_read_count_or_detect_the_data() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut a = proxy.login(&ALICE);
    fill(&mut a);
    let mut b = proxy.login(&BOB);

    let empty = b"*0\r\n".to_vec();
    let probes: Vec<(&[&str], Vec<u8>)> = vec![
        (&["GET", "s"], b"$-1\r\n".to_vec()),
        (&["STRLEN", "s"], b":0\r\n".to_vec()),
        (
            &["EXISTS", "s", "h", "l", "st", "z", "x", "hl", "g", "b"],
            b":0\r\n".to_vec(),
        ),
        (&["TYPE", "s"], b"+none\r\n".to_vec()),
        (&["TTL", "s"], b":-2\r\n".to_vec()),
        (&["PTTL", "s"], b":-2\r\n".to_vec()),
        (&["EXPIRETIME", "s"], b":-2\r\n".to_vec()),
        (&["DUMP", "s"], b"$-1\r\n".to_vec()),
        (&["OBJECT", "ENCODING", "s"], b"$-1\r\n".to_vec()),
        (&["MEMORY", "USAGE", "s"], b"$-1\r\n".to_vec()),
        (&["TOUCH", "s", "h"], b":0\r\n".to_vec()),
        (&["HGETALL", "h"], empty.clone()),
        (&["HEXISTS", "h", "f"], b":0\r\n".to_vec()),
        (&["HLEN", "h"], b":0\r\n".to_vec()),
        (&["LRANGE", "l", "0", "-1"], empty.clone()),
        (&["LLEN", "l"], b":0\r\n".to_vec()),
        (&["SMEMBERS", "st"], empty.clone()),
        (&["SISMEMBER", "st", "A"], b":0\r\n".to_vec()),
        (&["SINTER", "st", "st"], empty.clone()),
        (&["SCARD", "st"], b":0\r\n".to_vec()),
        (&["ZRANGE", "z", "0", "-1"], empty.clone()),
        (&["ZSCORE", "z", "A"], b"$-1\r\n".to_vec()),
        (&["ZCARD", "z"], b":0\r\n".to_vec()),
        (&["XRANGE", "x", "-", "+"], empty.clone()),
        (&["XLEN", "x"], b":0\r\n".to_vec()),
        (&["XREAD", "STREAMS", "x", "0"], b"*-1\r\n".to_vec()),
        (&["PFCOUNT", "hl"], b":0\r\n".to_vec()),
        (&["GEOPOS", "g", "A"], b"*1\r\n*-1\r\n".to_vec()),
        (&["GETBIT", "b", "1"], b":0\r\n".to_vec()),
        (&["BITCOUNT", "b"], b":0\r\n".to_vec()),
        (&["KEYS", "*"], empty.clone()),
        (
            &["SCAN", "0", "MATCH", "*", "COUNT", "10000"],
            [b"*2\r\n".to_vec(), bulk("0"), empty.clone()].concat(),
        ),
        (&["SORT", "l"], empty.clone()),
        (&["SUNIONSTORE", "dest", "st"], b":0\r\n".to_vec()),
        (&["ZUNIONSTORE", "dest", "1", "z"], b":0\r\n".to_vec()),
        (&["LMOVE", "l", "dest", "LEFT", "LEFT"], b"$-1\r\n".to_vec()),
        (&["COPY", "s", "copied"], b":0\r\n".to_vec()),
        (
            &["RENAME", "s", "renamed"],
            b"-ERR no such key\r\n".to_vec(),
        ),
        (&["BITOP", "OR", "dest", "b"], b":0\r\n".to_vec()),
        (
            &[
                "GEOSEARCH",
                "g",
                "FROMLONLAT",
                "13.36",
                "38.11",
                "BYRADIUS",
                "10",
                "km",
            ],
            empty.clone(),
        ),
        (&["PUBSUB", "CHANNELS"], empty.clone()),
    ];
    for (cmd, expected) in probes {
        let got = b.cmd(cmd);
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&expected),
            "bob: {cmd:?}"
        );
    }

    // Nothing bob did reached alice's data.
    assert_eq!(a.cmd(&["GET", "s"]), bulk("A"));
    assert_eq!(
        a.cmd(&["LRANGE", "l", "0", "-1"]),
        [b"*1\r\n".to_vec(), bulk("A")].concat()
    );
    assert_eq!(
        a.cmd(&["EXISTS", "s", "h", "l", "st", "z", "x", "hl", "g", "b"]),
        b":9\r\n"
    );
}

#[test]
fn another_project_cannot_change_or_delete_the_data() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut a = proxy.login(&ALICE);
    fill(&mut a);
    let mut b = proxy.login(&BOB);

    for cmd in [
        &["DEL", "s", "h", "l", "st", "z", "x", "hl", "g", "b"][..],
        &["UNLINK", "s"],
        &["SET", "s", "B"],
        &["HSET", "h", "f", "B"],
        &["RPUSH", "l", "B"],
        &["SADD", "st", "B"],
        &["ZADD", "z", "2", "B"],
        &["PERSIST", "s"],
        &["EXPIRE", "h", "1"],
        &["SETBIT", "b", "2", "1"],
        &["PFADD", "hl", "B"],
        &["RENAME", "l", "elsewhere"],
    ] {
        b.cmd(cmd);
    }

    assert_eq!(a.cmd(&["GET", "s"]), bulk("A"));
    assert_eq!(a.cmd(&["HGET", "h", "f"]), bulk("A"));
    assert_eq!(
        a.cmd(&["LRANGE", "l", "0", "-1"]),
        [b"*1\r\n".to_vec(), bulk("A")].concat()
    );
    assert_eq!(
        a.cmd(&["SMEMBERS", "st"]),
        [b"*1\r\n".to_vec(), bulk("A")].concat()
    );
    assert_eq!(a.cmd(&["ZCARD", "z"]), b":1\r\n");
    assert_eq!(a.cmd(&["TTL", "h"]), b":-1\r\n");
    assert_eq!(a.cmd(&["BITCOUNT", "b"]), b":1\r\n");
    assert_eq!(a.cmd(&["PFCOUNT", "hl"]), b":1\r\n");
    let ttl = String::from_utf8(a.cmd(&["TTL", "s"])).unwrap();
    assert!(
        ttl.starts_with(":1000") || ttl.starts_with(":99"),
        "alice's TTL kept: {ttl}"
    );
    // Bob's writes live in bob's namespace only.
    assert_eq!(b.cmd(&["GET", "s"]), bulk("B"));
}

#[test]
fn transactions_and_admin_emulations_stay_inside_the_project() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut a = proxy.login(&ALICE);
    fill(&mut a);

    let toml = config_toml(
        redis.port,
        &[
            BOB,
            User {
                name: "bobadmin",
                password: "pw",
                project: "shipping",
                access: "admin",
            },
        ],
        "",
    );
    let bob_proxy = Proxy::start_toml(&toml);
    let mut admin = bob_proxy.raw();
    assert_eq!(admin.cmd(&["AUTH", "bobadmin", "pw"]), b"+OK\r\n");
    assert_eq!(admin.cmd(&["DBSIZE"]), b":0\r\n");
    assert_eq!(admin.cmd(&["RANDOMKEY"]), b"$-1\r\n");
    assert_eq!(admin.cmd(&["FLUSHALL"]), b"+OK\r\n");
    assert_eq!(admin.cmd(&["MULTI"]), b"+OK\r\n");
    assert_eq!(admin.cmd(&["GET", "s"]), b"+QUEUED\r\n");
    assert_eq!(admin.cmd(&["KEYS", "*"]), b"+QUEUED\r\n");
    assert_eq!(admin.cmd(&["EXEC"]), b"*2\r\n$-1\r\n*0\r\n");
    let info = String::from_utf8(admin.cmd(&["INFO", "keyspace"])).unwrap();
    assert!(!info.contains("keys="), "{info}");

    assert_eq!(
        a.cmd(&["EXISTS", "s", "h", "l", "st", "z", "x", "hl", "g", "b"]),
        b":9\r\n"
    );
}
