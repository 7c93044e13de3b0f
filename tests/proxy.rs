//! The proxy as a whole: pipelining, refusals, limits, upstream loss,
//! timeouts, shutdown, and real clients.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn ten_thousand_pipelined_commands_in_one_write_come_back_in_order() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.login(&ALICE);

    let mut batch = Vec::new();
    for i in 0..5000 {
        batch.extend(Raw::encode(&["SET", &format!("k{i}"), &format!("v{i}")]));
        batch.extend(Raw::encode(&["GET", &format!("k{i}")]));
    }
    c.send_bytes(&batch);
    for i in 0..5000 {
        assert_eq!(c.reply(), b"+OK\r\n", "SET #{i}");
        assert_eq!(c.reply(), bulk(&format!("v{i}")), "GET #{i}");
    }
}

#[test]
fn local_and_upstream_replies_keep_request_order_in_a_pipeline() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.login(&ALICE);
    let mut batch = Vec::new();
    for args in [
        &["SET", "a", "1"][..],
        &["PING"],
        &["GET", "a"],
        &["ECHO", "e"],
        &["CONFIG", "GET", "*"],
        &["INCR", "a"],
        &["CLIENT", "ID"],
        &["GET", "a"],
    ] {
        batch.extend(Raw::encode(args));
    }
    c.send_bytes(&batch);
    assert_eq!(c.reply(), b"+OK\r\n");
    assert_eq!(c.reply(), b"+PONG\r\n");
    assert_eq!(c.reply(), bulk("1"));
    assert_eq!(c.reply(), bulk("e"));
    assert!(
        c.reply()
            .starts_with(b"-ERR 'config|get' is not available through redcloak")
    );
    assert_eq!(c.reply(), b":2\r\n");
    assert_eq!(c.reply().first(), Some(&b':'));
    assert_eq!(c.reply(), bulk("2"));
}

#[test]
fn refused_and_unknown_commands_leave_the_connection_usable() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.login(&ALICE);
    for refused in [
        &["CONFIG", "SET", "maxmemory", "1"][..],
        &["FLUSHALL"],
        &["MONITOR"],
        &["DEBUG", "SLEEP", "0"],
        &["SWAPDB", "0", "1"],
        &["MOVE", "k", "1"],
    ] {
        let reply = c.cmd(refused);
        assert_eq!(
            reply.first(),
            Some(&b'-'),
            "{refused:?} must be refused: {}",
            String::from_utf8_lossy(&reply)
        );
        assert_eq!(c.cmd(&["PING"]), b"+PONG\r\n");
    }
    assert_eq!(
        c.cmd(&["NOSUCH", "a", "b"]),
        b"-ERR unknown command 'NOSUCH', with args beginning with: 'a' 'b' \r\n"
    );
    assert!(
        c.cmd(&["CLIENT", "NOSUCH"])
            .starts_with(b"-ERR unknown subcommand")
    );
    assert_eq!(
        c.cmd(&["GET"]),
        b"-ERR wrong number of arguments for 'get' command\r\n"
    );
    assert_eq!(
        c.cmd(&["SELECT", "1"]),
        b"-ERR DB index is out of range\r\n"
    );
    assert_eq!(c.cmd(&["SELECT", "0"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["SET", "k", "v"]), b"+OK\r\n");
    assert!(c.cmd(&["COPY", "k", "k2", "DB", "1"]).starts_with(b"-ERR"));
    assert_eq!(c.cmd(&["GET", "k"]), bulk("v"));
    // Nothing reached another database upstream.
    assert_eq!(
        redis
            .direct()
            .cmd(&["INFO", "keyspace"])
            .windows(3)
            .filter(|w| w == b"db1")
            .count(),
        0
    );
}

#[test]
fn inline_commands_work_like_in_redis() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.raw();
    c.send_bytes(b"AUTH alice alice-pw\r\nSET \"a key\" 'v 1'\r\nGET \"a key\"\r\n\r\nPING\n");
    assert_eq!(c.reply(), b"+OK\r\n");
    assert_eq!(c.reply(), b"+OK\r\n");
    assert_eq!(c.reply(), bulk("v 1"));
    assert_eq!(c.reply(), b"+PONG\r\n");
    c.send_bytes(b"GET \"unbalanced\r\n");
    assert_eq!(
        c.reply(),
        b"-ERR Protocol error: unbalanced quotes in request\r\n"
    );
    assert!(c.is_closed());
}

#[test]
fn a_request_over_the_size_limit_gets_an_error_and_is_closed() {
    let redis = Redis::start();
    let proxy = Proxy::start_with(redis.port, USERS, "max_request_bytes = 4096");
    let mut c = proxy.login(&ALICE);
    let big = "x".repeat(5000);
    c.send(&["SET", "k", &big]);
    assert_eq!(c.reply(), b"-ERR Protocol error: invalid bulk length\r\n");
    assert!(c.is_closed());
    // Others are unaffected.
    let mut d = proxy.login(&ALICE);
    assert_eq!(d.cmd(&["SET", "k", &"y".repeat(1000)]), b"+OK\r\n");
}

#[test]
fn malformed_protocol_is_answered_then_closed() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.login(&ALICE);
    c.send_bytes(b"*1\r\n*1\r\n");
    assert_eq!(c.reply(), b"-ERR Protocol error: expected '$', got '*'\r\n");
    assert!(c.is_closed());
    let mut d = proxy.login(&ALICE);
    d.send_bytes(b"*x\r\n");
    assert_eq!(
        d.reply(),
        b"-ERR Protocol error: invalid multibulk length\r\n"
    );
    assert!(d.is_closed());
}

#[test]
fn losing_the_upstream_fails_requests_in_flight_and_recovers() {
    let mut redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.login(&ALICE);
    assert_eq!(c.cmd(&["SET", "k", "v"]), b"+OK\r\n");

    // A blocked request is in flight when the upstream dies.
    c.send(&["BLPOP", "never", "30"]);
    std::thread::sleep(Duration::from_millis(200));
    redis.kill();
    assert_eq!(c.reply(), b"-ERR upstream connection lost\r\n");
    assert!(c.is_closed());

    // While the upstream is down, new sessions get a clear error.
    let mut d = proxy.login(&ALICE);
    let reply = d.cmd(&["GET", "k"]);
    assert!(
        reply.starts_with(b"-ERR upstream unavailable"),
        "{}",
        String::from_utf8_lossy(&reply)
    );

    // Once it is back, new sessions work again.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut e = proxy.login(&ALICE);
        if e.cmd(&["SET", "k", "again"]) == b"+OK\r\n" {
            assert_eq!(e.cmd(&["GET", "k"]), bulk("again"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery after the upstream restarted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn pipelined_requests_all_fail_in_order_when_the_upstream_dies() {
    let mut redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.login(&ALICE);
    assert_eq!(c.cmd(&["PING"]), b"+PONG\r\n");
    assert_eq!(c.cmd(&["SET", "k", "v"]), b"+OK\r\n");
    let mut batch = Raw::encode(&["BLPOP", "never", "30"]);
    batch.extend(Raw::encode(&["ECHO", "after"]));
    batch.extend(Raw::encode(&["GET", "k"]));
    c.send_bytes(&batch);
    std::thread::sleep(Duration::from_millis(200));
    redis.kill();
    // BLPOP and GET were in flight; ECHO was answered locally between them.
    assert_eq!(c.reply(), b"-ERR upstream connection lost\r\n");
    assert_eq!(c.reply(), bulk("after"));
    assert_eq!(c.reply(), b"-ERR upstream connection lost\r\n");
    assert!(c.is_closed());
}

#[test]
fn connections_beyond_the_limit_get_an_error_and_are_closed() {
    let redis = Redis::start();
    let proxy = Proxy::start_with(redis.port, USERS, "max_connections = 2");
    let mut a = proxy.login(&ALICE);
    let mut b = proxy.login(&BOB);
    let mut third = proxy.raw();
    assert_eq!(third.reply(), b"-ERR max number of clients reached\r\n");
    assert!(third.is_closed());
    assert_eq!(a.cmd(&["PING"]), b"+PONG\r\n");
    drop(b.cmd(&["QUIT"]));
    assert!(b.is_closed());
    // The freed slot is available again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = proxy.raw();
        if c.cmd(&["AUTH", "alice", "alice-pw"]) == b"+OK\r\n" {
            break;
        }
        assert!(Instant::now() < deadline, "slot was not released");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn idle_connections_are_closed_after_the_timeout() {
    let redis = Redis::start();
    let proxy = Proxy::start_with(redis.port, USERS, "idle_timeout_secs = 1");
    let mut c = proxy.login(&ALICE);
    let started = Instant::now();
    assert!(c.is_closed());
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[test]
fn sigterm_lets_in_flight_requests_finish_and_exits_cleanly() {
    let redis = Redis::start();
    let mut proxy = Proxy::start(redis.port);
    let mut c = proxy.login(&ALICE);
    assert_eq!(c.cmd(&["RPUSH", "q", "x"]), b":1\r\n");
    c.send(&["BLPOP", "empty", "1"]);
    std::thread::sleep(Duration::from_millis(100));
    proxy.signal("TERM");
    // The blocked request still gets its (timeout) reply before the close.
    assert_eq!(c.reply(), b"*-1\r\n");
    assert!(c.is_closed());
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn redis_cli_can_auth_set_get_and_scan() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let cli = |args: &[&str]| proxy.redis_cli(&ALICE, args);
    assert_eq!(cli(&["SET", "greeting", "hello"]), "OK");
    assert_eq!(cli(&["GET", "greeting"]), "hello");
    assert_eq!(cli(&["SCAN", "0"]), "0\ngreeting");
    assert_eq!(cli(&["--scan", "--pattern", "gr*"]), "greeting");
    // Without credentials, nothing but NOAUTH.
    let out = Command::new("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &proxy.port.to_string(),
            "GET",
            "greeting",
        ])
        .output()
        .expect("redis-cli");
    assert!(String::from_utf8_lossy(&out.stdout).contains("NOAUTH"));
}

#[test]
fn hash_password_and_check_config_work_from_the_command_line() {
    let out = run_cli(&["hash-password", "--iterations", "1000"], "s3cret\n");
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(hash.starts_with("$pbkdf2-sha256$i=1000$"), "{hash}");
    let parsed = redcloak::auth::PasswordHash::parse(&hash).unwrap();
    assert!(parsed.verify(b"s3cret"));
    assert!(!parsed.verify(b"s3cret\n"));

    let default = run_cli(&["hash-password"], "pw\n");
    assert!(String::from_utf8_lossy(&default.stdout).starts_with("$pbkdf2-sha256$i=600000$"));

    let dir = tempfile::tempdir().unwrap();
    let good = write_file(dir.path(), "good.toml", &config_toml(6379, USERS, ""));
    let out = run_cli(&["check-config", "--config", good.to_str().unwrap()], "");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("security level:"), "{text}");
    assert!(text.contains("warning:"), "{text}");

    let bad = write_file(
        dir.path(),
        "bad.toml",
        "[server]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n",
    );
    let out = run_cli(&["check-config", "--config", bad.to_str().unwrap()], "");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lisen"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line reason: {err}");
}

#[tokio::test]
async fn the_redis_crate_pipelines_through_the_proxy() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let client = redis::Client::open(proxy.url(&BOB)).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let mut pipe = redis::pipe();
    for i in 0..100 {
        pipe.cmd("SET").arg(format!("p{i}")).arg(i).ignore();
    }
    pipe.cmd("MGET").arg("p0").arg("p99");
    let (values,): (Vec<i64>,) = pipe.query_async(&mut con).await.unwrap();
    assert_eq!(values, vec![0, 99]);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("p9*")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(keys.len(), 11);
    assert!(keys.iter().all(|k| k.starts_with("p9")));
}

#[test]
fn the_proxy_logs_in_to_a_password_protected_upstream() {
    let redis = Redis::start_with(&["--requirepass", "upstream-secret"]);
    let toml = config_toml(redis.port, USERS, "").replace(
        "connect_timeout_ms = 1000\n",
        "connect_timeout_ms = 1000\npassword = \"upstream-secret\"\n",
    );
    let proxy = Proxy::start_toml(&toml);
    let mut c = proxy.login(&ALICE);
    assert_eq!(c.cmd(&["SET", "k", "v"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", "k"]), bulk("v"));
    // RESET logs the client out, and the proxy's own upstream login survives.
    assert_eq!(c.cmd(&["RESET"]), b"+RESET\r\n");
    assert_eq!(c.cmd(&["AUTH", "alice", "alice-pw"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", "k"]), bulk("v"));

    // With a wrong upstream password, clients get a clear error.
    let wrong = Proxy::start_toml(&toml.replace("upstream-secret", "nope"));
    let mut d = wrong.login(&ALICE);
    let reply = d.cmd(&["GET", "k"]);
    assert!(
        reply.starts_with(
            b"-ERR upstream unavailable: the upstream refused the proxy's credentials"
        ),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    let logs = wrong.logs().join("\n") + &proxy.logs().join("\n");
    assert!(
        !logs.contains("upstream-secret"),
        "the upstream password never reaches the logs"
    );
}

#[test]
fn sighup_reloads_users_without_dropping_connections() {
    let redis = Redis::start();
    let proxy = Proxy::start_with(redis.port, &[ALICE], "");
    let mut alice = proxy.login(&ALICE);
    let mut c = proxy.raw();
    assert!(c.cmd(&["AUTH", "bob", "bob-pw"]).starts_with(b"-WRONGPASS"));

    std::fs::write(&proxy.config, config_toml(redis.port, &[ALICE, BOB], "")).unwrap();
    proxy.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.cmd(&["AUTH", "bob", "bob-pw"]) != b"+OK\r\n" {
        assert!(Instant::now() < deadline, "bob was not added by the reload");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        alice.cmd(&["PING"]),
        b"+PONG\r\n",
        "existing sessions stay open"
    );

    // A broken file keeps the running users.
    std::fs::write(&proxy.config, "this is not toml [").unwrap();
    proxy.signal("HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(proxy.login(&BOB).cmd(&["PING"]), b"+PONG\r\n");
}

#[test]
fn requests_sent_just_before_the_client_closes_still_reach_redis() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.raw();
    let mut batch = Raw::encode(&["AUTH", "alice", "alice-pw"]);
    batch.extend(Raw::encode(&["SET", "last-words", "kept"]));
    c.send_bytes(&batch);
    c.shutdown_write();
    assert_eq!(c.reply(), b"+OK\r\n");
    assert_eq!(
        c.reply(),
        b"+OK\r\n",
        "a half-closed client still gets its replies"
    );
    assert_eq!(
        redis
            .direct()
            .cmd(&["GET", &format!("{}last-words", upstream_prefix("billing"))]),
        bulk("kept")
    );
}
