//! Project isolation: the exact upstream key, and two projects with the same
//! key names that never see each other.

mod common;

use common::*;

#[test]
fn keys_are_stored_under_the_contract_prefix() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.login(&ALICE);
    assert_eq!(c.cmd(&["SET", "invoice:42", "paid"]), b"+OK\r\n");

    let expected = format!("{}invoice:42", upstream_prefix("billing"));
    assert_eq!(expected, "project:0c95c7ece1ce1a97:invoice:42");
    let mut direct = redis.direct();
    assert_eq!(
        direct.cmd(&["KEYS", "*"]),
        [b"*1\r\n".to_vec(), bulk(&expected)].concat()
    );
    assert_eq!(direct.cmd(&["GET", &expected]), bulk("paid"));
}

#[test]
fn two_projects_with_the_same_key_names_never_see_each_other() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut alice = proxy.login(&ALICE);
    let mut bob = proxy.login(&BOB);

    assert_eq!(alice.cmd(&["SET", "secret", "alice-data"]), b"+OK\r\n");
    assert_eq!(alice.cmd(&["SET", "only-alice", "1"]), b"+OK\r\n");
    assert_eq!(bob.cmd(&["SET", "secret", "bob-data"]), b"+OK\r\n");

    assert_eq!(alice.cmd(&["GET", "secret"]), bulk("alice-data"));
    assert_eq!(bob.cmd(&["GET", "secret"]), bulk("bob-data"));
    assert_eq!(bob.cmd(&["GET", "only-alice"]), b"$-1\r\n");
    assert_eq!(bob.cmd(&["EXISTS", "only-alice", "secret"]), b":1\r\n");

    // KEYS and SCAN list only the project's own keys, unprefixed.
    assert_eq!(
        bob.cmd(&["KEYS", "*"]),
        [b"*1\r\n".to_vec(), bulk("secret")].concat()
    );
    let scan = bob.cmd(&["SCAN", "0", "COUNT", "1000"]);
    assert_eq!(
        scan,
        [
            b"*2\r\n".to_vec(),
            bulk("0"),
            b"*1\r\n".to_vec(),
            bulk("secret")
        ]
        .concat()
    );
    let mut alice_keys = alice.cmd(&["KEYS", "*"]);
    alice_keys.sort();
    let mut expected = [b"*2\r\n".to_vec(), bulk("only-alice"), bulk("secret")].concat();
    expected.sort();
    assert_eq!(alice_keys, expected);
}

#[test]
fn patterns_and_key_names_cannot_reach_another_namespace() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut alice = proxy.login(&ALICE);
    let mut bob = proxy.login(&BOB);
    assert_eq!(alice.cmd(&["SET", "k", "alice-data"]), b"+OK\r\n");

    let alice_prefix = upstream_prefix("billing");
    let alice_full = format!("{alice_prefix}k");
    let empty = b"*0\r\n".to_vec();
    for pattern in [
        "project:*",
        "*k",
        "*",
        "?*",
        "[p]*",
        "\\*",
        &format!("{alice_prefix}*"),
        "../*",
    ] {
        let keys = bob.cmd(&["KEYS", pattern]);
        assert_eq!(keys, empty, "KEYS {pattern}");
        let scan = bob.cmd(&["SCAN", "0", "MATCH", pattern, "COUNT", "1000"]);
        assert_eq!(
            scan,
            [b"*2\r\n".to_vec(), bulk("0"), empty.clone()].concat(),
            "SCAN MATCH {pattern}"
        );
    }
    // Naming alice's full upstream key only reaches a key inside bob's prefix.
    assert_eq!(bob.cmd(&["GET", &alice_full]), b"$-1\r\n");
    assert_eq!(bob.cmd(&["EXISTS", &alice_full]), b":0\r\n");
    assert_eq!(bob.cmd(&["DEL", &alice_full]), b":0\r\n");
    assert_eq!(alice.cmd(&["GET", "k"]), bulk("alice-data"));
    // SCAN's TYPE filter and a huge COUNT still see only bob's (empty) space.
    assert_eq!(
        bob.cmd(&["SCAN", "0", "TYPE", "string", "COUNT", "100000"]),
        [b"*2\r\n".to_vec(), bulk("0"), empty].concat()
    );
}

#[test]
fn multi_key_commands_rewrite_every_key() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.login(&ALICE);
    assert_eq!(c.cmd(&["MSET", "a", "1", "b", "2"]), b"+OK\r\n");
    assert_eq!(
        c.cmd(&["MGET", "a", "b", "c"]),
        [
            b"*3\r\n".to_vec(),
            bulk("1"),
            bulk("2"),
            b"$-1\r\n".to_vec()
        ]
        .concat()
    );
    assert_eq!(c.cmd(&["RPUSH", "list", "x", "y"]), b":2\r\n");
    assert_eq!(c.cmd(&["RENAME", "list", "list2"]), b"+OK\r\n");
    assert_eq!(
        c.cmd(&["BLPOP", "nothing", "list2", "1"]),
        [b"*2\r\n".to_vec(), bulk("list2"), bulk("x")].concat()
    );
    assert_eq!(c.cmd(&["SADD", "s1", "m1", "m2"]), b":2\r\n");
    assert_eq!(c.cmd(&["SADD", "s2", "m2"]), b":1\r\n");
    assert_eq!(c.cmd(&["SINTERSTORE", "dest", "s1", "s2"]), b":1\r\n");
    assert_eq!(c.cmd(&["ZADD", "z1", "1", "a"]), b":1\r\n");
    assert_eq!(c.cmd(&["ZUNIONSTORE", "z2", "1", "z1"]), b":1\r\n");
    assert_eq!(c.cmd(&["HSET", "h", "f", "v"]), b":1\r\n");
    assert_eq!(c.cmd(&["HGET", "h", "f"]), bulk("v"));

    let prefix = upstream_prefix("billing");
    let mut direct = redis.direct();
    for key in ["a", "b", "list2", "s1", "s2", "dest", "z1", "z2", "h"] {
        assert_eq!(
            direct.cmd(&["EXISTS", &format!("{prefix}{key}")]),
            b":1\r\n",
            "{key}"
        );
    }
    assert_eq!(direct.cmd(&["DBSIZE"]), b":9\r\n");
}

#[test]
fn sort_patterns_stay_inside_the_namespace() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut alice = proxy.login(&ALICE);
    let mut bob = proxy.login(&BOB);
    assert_eq!(bob.cmd(&["SET", "w_1", "5"]), b"+OK\r\n");
    assert_eq!(bob.cmd(&["SET", "o_1", "bob-secret"]), b"+OK\r\n");
    assert_eq!(alice.cmd(&["RPUSH", "ids", "1"]), b":1\r\n");
    assert_eq!(alice.cmd(&["SET", "o_1", "alice-value"]), b"+OK\r\n");
    // GET o_* reads alice's o_1, never bob's.
    assert_eq!(
        alice.cmd(&["SORT", "ids", "BY", "nosort", "GET", "#", "GET", "o_*"]),
        [b"*2\r\n".to_vec(), bulk("1"), bulk("alice-value")].concat()
    );
    assert_eq!(
        alice.cmd(&["SORT", "ids", "BY", "w_*", "STORE", "sorted"]),
        b":1\r\n"
    );
    assert_eq!(
        alice.cmd(&["LRANGE", "sorted", "0", "-1"]),
        [b"*1\r\n".to_vec(), bulk("1")].concat()
    );
}
