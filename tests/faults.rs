//! Upstream faults against real `redis-server` processes and a stand-in
//! that hangs or breaks the protocol: what clients see when Redis dies
//! mid-pipeline, comes back, never answers, or answers garbage.

mod common;

use std::time::{Duration, Instant};

use common::*;

const LOST: &[u8] = b"-ERR upstream connection lost\r\n";
const TIMED_OUT: &[u8] = b"-ERR upstream request timed out\r\n";

#[test]
fn every_request_in_flight_fails_in_its_own_place_when_the_upstream_dies() {
    let mut redis = Redis::start();
    let proxy = Proxy::start(redis.port);

    // Each client queues a blocked request, then many more behind it, with
    // replies the proxy makes itself in between: all are in flight at once.
    let mut clients: Vec<Raw> = (0..4).map(|_| proxy.login(&ALICE)).collect();
    for (n, c) in clients.iter_mut().enumerate() {
        let mut batch = Raw::encode(&["BLPOP", "never", "30"]);
        for i in 0..500 {
            let key = format!("c{n}-k{i}");
            batch.extend(Raw::encode(&["SET", &key, "v"]));
            batch.extend(Raw::encode(&["ECHO", &format!("c{n}-e{i}")]));
            batch.extend(Raw::encode(&["GET", &key]));
        }
        c.send_bytes(&batch);
    }
    std::thread::sleep(Duration::from_millis(300));
    redis.kill();

    for (n, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.reply(), LOST, "client {n}: BLPOP");
        for i in 0..500 {
            assert_eq!(c.reply(), LOST, "client {n}: SET #{i}");
            assert_eq!(
                c.reply(),
                bulk(&format!("c{n}-e{i}")),
                "client {n}: ECHO #{i}"
            );
            assert_eq!(c.reply(), LOST, "client {n}: GET #{i}");
        }
        assert!(c.is_closed(), "client {n} is closed after its errors");
    }
    assert!(!logs_show_a_panic(&proxy.logs()));
}

/// What one pipelining client saw when the upstream died under it.
#[derive(Debug, Default)]
struct CutPipeline {
    right: usize,
    errors: usize,
}

/// Writes `SET k v` / `GET k` pairs with unique values until the proxy
/// closes, and checks every reply in order: the right one, or the upstream
/// error, and never a right one after an error.
fn pipeline_until_cut(port: u16, client: usize) -> CutPipeline {
    let mut c = Raw::connect(port);
    assert_eq!(c.cmd(&["AUTH", "alice", "alice-pw"]), b"+OK\r\n");
    let mut reader = c.try_clone();
    let writer = std::thread::spawn(move || {
        let mut sent = 0usize;
        'outer: for round in 0..10_000 {
            let mut batch = Vec::new();
            for i in 0..50 {
                let key = format!("cut{client}-{round}-{i}");
                batch.extend(Raw::encode(&["SET", &key, &format!("{key}-value")]));
                batch.extend(Raw::encode(&["GET", &key]));
            }
            sent += 100;
            if !c.try_send_bytes(&batch) {
                break 'outer;
            }
        }
        sent
    });

    let mut seen = CutPipeline::default();
    let mut n = 0usize;
    while let Some(reply) = reader.try_reply() {
        let (round, i, get) = (n / 100, n % 100 / 2, n % 2 == 1);
        let key = format!("cut{client}-{round}-{i}");
        // In flight when the link died: "connection lost"; sent after it,
        // while Redis stays down: "upstream unavailable".
        if reply == LOST || reply.starts_with(b"-ERR upstream unavailable") {
            seen.errors += 1;
        } else {
            assert_eq!(seen.errors, 0, "client {client}: a reply after an error");
            let expected = if get {
                bulk(&format!("{key}-value"))
            } else {
                b"+OK\r\n".to_vec()
            };
            assert_eq!(reply, expected, "client {client}: reply #{n}");
            seen.right += 1;
        }
        n += 1;
    }
    let sent = writer.join().expect("the writer ends");
    assert!(n <= sent, "client {client}: more replies than requests");
    seen
}

#[test]
fn pipelines_cut_by_the_upstream_dying_get_right_replies_then_errors() {
    let mut redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let port = proxy.port;
    let clients: Vec<_> = (0..3)
        .map(|n| std::thread::spawn(move || pipeline_until_cut(port, n)))
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    redis.kill();

    let mut right = 0;
    let mut errors = 0;
    for client in clients {
        let seen = client.join().expect("every reply was right or an error");
        right += seen.right;
        errors += seen.errors;
    }
    println!("cut pipelines: {right} right replies, then {errors} upstream errors");
    assert!(right > 0, "the pipelines ran before the upstream died");
    assert!(errors > 0, "requests were in flight when the upstream died");
    assert!(!logs_show_a_panic(&proxy.logs()));
}

#[test]
fn after_each_upstream_restart_new_sessions_succeed_within_a_bound() {
    let mut redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let bound = Duration::from_secs(3);
    let mut recoveries = Vec::new();

    for round in 0..3 {
        let mut idle = proxy.login(&BOB);
        assert_eq!(idle.cmd(&["SET", "round", &round.to_string()]), b"+OK\r\n");
        redis.kill();
        // A session with nothing in flight shares its link, so it isn't
        // affected until it sends a request, which then fails at once.
        let reply = idle.cmd(&["GET", "round"]);
        assert!(
            reply.starts_with(b"-ERR upstream"),
            "round {round}: {}",
            String::from_utf8_lossy(&reply)
        );
        assert!(
            idle.is_closed(),
            "round {round}: the failed session is closed"
        );

        let started = Instant::now();
        let mut down = proxy.login(&BOB);
        let reply = down.cmd(&["GET", "round"]);
        assert!(
            reply.starts_with(b"-ERR upstream unavailable"),
            "round {round}: {}",
            String::from_utf8_lossy(&reply)
        );
        assert!(
            started.elapsed() < bound,
            "round {round}: a refused connection fails fast"
        );

        redis.restart();
        let restarted = Instant::now();
        loop {
            let mut c = proxy.login(&BOB);
            if c.cmd(&["SET", "round", "back"]) == b"+OK\r\n" {
                break;
            }
            assert!(
                restarted.elapsed() < bound,
                "round {round}: no recovery within {bound:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        recoveries.push(restarted.elapsed());
    }
    println!("recovery after each upstream restart: {recoveries:?}");
}

#[test]
fn an_upstream_that_never_answers_times_requests_out_with_an_error() {
    let silent = FakeUpstream::silent();
    let toml = with_upstream(
        &config_toml(silent.port, USERS, ""),
        "request_timeout_ms = 500",
    );
    let proxy = Proxy::start_toml(&toml);
    let mut c = proxy.login(&ALICE);

    let started = Instant::now();
    let mut batch = Raw::encode(&["GET", "a"]);
    batch.extend(Raw::encode(&["PING"]));
    batch.extend(Raw::encode(&["SET", "b", "1"]));
    c.send_bytes(&batch);
    assert_eq!(c.reply(), TIMED_OUT);
    let waited = started.elapsed();
    assert_eq!(c.reply(), b"+PONG\r\n", "a local reply keeps its place");
    assert_eq!(c.reply(), TIMED_OUT);
    assert!(c.is_closed());
    println!("silent upstream: requests failed after {waited:?} (timeout 500 ms)");
    assert!(waited >= Duration::from_millis(450), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");

    // The proxy itself is fine, and later sessions meet the same bound.
    let mut d = proxy.login(&BOB);
    assert_eq!(d.cmd(&["PING"]), b"+PONG\r\n");
    assert_eq!(d.cmd(&["GET", "x"]), TIMED_OUT);
}

#[test]
fn an_upstream_that_never_answers_the_login_times_out_the_connect() {
    let silent = FakeUpstream::silent();
    let toml = with_upstream(
        &config_toml(silent.port, USERS, ""),
        "password = \"upstream-secret\"",
    );
    let proxy = Proxy::start_toml(&toml);
    let mut c = proxy.login(&ALICE);
    let started = Instant::now();
    let reply = c.cmd(&["GET", "a"]);
    assert_eq!(
        reply,
        b"-ERR upstream unavailable: connecting to the upstream timed out\r\n"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(c.is_closed());
}

#[test]
fn blocking_commands_and_long_pipelines_outlive_the_upstream_timeout() {
    let redis = Redis::start();
    let toml = with_upstream(
        &config_toml(redis.port, USERS, ""),
        "request_timeout_ms = 300",
    );
    let proxy = Proxy::start_toml(&toml);
    let mut c = proxy.login(&ALICE);

    let started = Instant::now();
    assert_eq!(c.cmd(&["BLPOP", "empty", "1"]), b"*-1\r\n");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(
        c.cmd(&["XREAD", "BLOCK", "800", "STREAMS", "s", "$"]),
        b"*-1\r\n"
    );

    // Many replies take longer in all than the timeout, but keep coming.
    const PIPELINED: usize = 80_000;
    let mut batch = Vec::new();
    for i in 0..PIPELINED {
        batch.extend(Raw::encode(&["SET", &format!("k{i}"), &"v".repeat(200)]));
    }
    let started = Instant::now();
    c.send_bytes(&batch);
    for i in 0..PIPELINED {
        assert_eq!(c.reply(), b"+OK\r\n", "SET #{i}");
    }
    println!(
        "{PIPELINED} pipelined SETs took {:?} (upstream timeout 300 ms)",
        started.elapsed()
    );
    assert_eq!(c.cmd(&["GET", "k0"]), bulk(&"v".repeat(200)));
}

/// Malformed replies, each sent by the stand-in upstream to one session.
const MALFORMED: &[(&str, &[u8])] = &[
    ("an unknown type byte", b"?what\r\n"),
    ("a bulk string without its line end", b"$2\r\nabXY"),
    ("an empty line", b"\r\n"),
    ("a bare line feed", b"\n"),
    ("a bulk length beyond the reply limit", b"$99999999999\r\n"),
    ("a negative array length", b"*-7\r\n"),
    ("a streamed aggregate", b"*?\r\n"),
    ("a map where RESP2 has none", b"%1\r\n+a\r\n+b\r\n"),
];

#[test]
fn malformed_upstream_replies_end_the_session_with_an_error_and_no_panic() {
    let fake = FakeUpstream::silent();
    let proxy = Proxy::start(fake.port);

    for (what, answer) in MALFORMED {
        fake.answer(answer);
        let mut c = proxy.login(&ALICE);
        // KEYS has its reply decoded (keys are unprefixed), so the reply
        // reaches the decoder as well as the scanner.
        assert_eq!(c.cmd(&["KEYS", "*"]), LOST, "{what}");
        assert!(c.is_closed(), "{what}: the session is closed");
    }

    // Nested deeper than any Redis reply: refused without recursion.
    fake.answer(&b"*1\r\n".repeat(100_000));
    let mut c = proxy.login(&ALICE);
    assert_eq!(c.cmd(&["GET", "deep"]), LOST);

    // A reply no request asked for: the shared link it came on is out of
    // step and is dropped; the session already had its own reply.
    fake.answer(b"+OK\r\n+EXTRA\r\n");
    let mut c = proxy.login(&ALICE);
    assert_eq!(c.cmd(&["SET", "k", "v"]), b"+OK\r\n");
    fake.answer(b"+AGAIN\r\n");
    assert_eq!(c.cmd(&["SET", "k", "v"]), b"+AGAIN\r\n", "a new link");

    // On a session's own link (inside a transaction), the same ends the
    // session, since nothing else can have its replies.
    fake.answer(b"+OK\r\n+EXTRA\r\n");
    let mut c = proxy.login(&ALICE);
    assert_eq!(c.cmd(&["MULTI"]), b"+OK\r\n");
    assert!(c.is_closed(), "an unsolicited reply ends the session");

    // The proxy goes on serving.
    fake.answer(b"+PONG\r\n");
    let mut c = proxy.login(&BOB);
    assert_eq!(c.cmd(&["PING"]), b"+PONG\r\n");
    assert_eq!(c.cmd(&["TYPE", "x"]), b"+PONG\r\n");
    assert!(!logs_show_a_panic(&proxy.logs()), "no session panicked");
}
