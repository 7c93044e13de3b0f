//! Hostile clients: requests left incomplete, pipelines whose replies are
//! never read, oversized and nested frames, connection floods, and a flood
//! of failing `AUTH`, each against the real proxy and a real Redis.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

const REQUEST_TIMED_OUT: &[u8] =
    b"-ERR Protocol error: request not completed within the request timeout\r\n";

#[test]
fn a_request_left_incomplete_is_refused_and_closed_after_the_request_timeout() {
    let redis = Redis::start();
    let proxy = Proxy::start_with(redis.port, USERS, "request_timeout_secs = 1");

    // Logged in or not, a half-sent request is bounded.
    for logged_in in [true, false] {
        let mut c = if logged_in {
            proxy.login(&ALICE)
        } else {
            proxy.raw()
        };
        let started = Instant::now();
        c.send_bytes(b"*2\r\n$3\r\nGET\r\n$1");
        assert_eq!(c.reply(), REQUEST_TIMED_OUT, "logged in: {logged_in}");
        assert!(c.is_closed());
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(900), "{waited:?}");
        assert!(waited < Duration::from_secs(4), "{waited:?}");
    }

    // Trickling bytes does not stretch the bound: it runs from the first
    // byte of the request.
    let mut c = proxy.login(&ALICE);
    let mut trickle = c.try_clone();
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        let request = Raw::encode(&["SET", "k", &"x".repeat(100)]);
        let mut sent = 0;
        for byte in &request {
            if started.elapsed() > Duration::from_secs(4)
                || !trickle.try_send_bytes(std::slice::from_ref(byte))
            {
                break;
            }
            sent += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        sent < request.len()
    });
    assert_eq!(c.reply(), REQUEST_TIMED_OUT);
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    assert!(
        writer.join().expect("the trickling writer"),
        "the trickle was cut short"
    );

    // Complete requests, however far apart, are not affected.
    let mut c = proxy.login(&ALICE);
    for i in 0..4 {
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(c.cmd(&["SET", "slow", &i.to_string()]), b"+OK\r\n");
    }
}

#[test]
fn many_slow_clients_hold_connections_only_until_the_request_timeout() {
    let redis = Redis::start();
    let proxy = Proxy::start_with(
        redis.port,
        USERS,
        "request_timeout_secs = 1\nmax_connections = 40",
    );
    let mut loris: Vec<Raw> = (0..30).map(|_| proxy.raw()).collect();
    for c in loris.iter_mut() {
        c.send_bytes(b"*3\r\n$4\r\nAUTH\r\n$5\r\nalice\r\n$8\r\nalice");
    }

    // Others still get in and are served meanwhile.
    let mut ok = proxy.login(&BOB);
    assert_eq!(ok.cmd(&["SET", "k", "v"]), b"+OK\r\n");

    for c in loris.iter_mut() {
        assert_eq!(c.reply(), REQUEST_TIMED_OUT);
        assert!(c.is_closed());
    }
    // Their slots are free again: 39 more connections fit beside `ok`.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut more = Vec::new();
    while more.len() < 39 {
        let mut c = proxy.raw();
        if c.cmd(&["AUTH", "bob", "bob-pw"]) == b"+OK\r\n" {
            more.push(c);
        } else {
            assert!(Instant::now() < deadline, "slots were not released");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert_eq!(ok.cmd(&["GET", "k"]), bulk("v"));
}

#[test]
fn a_client_that_never_reads_its_replies_keeps_the_proxy_memory_bounded() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let value = "v".repeat(256 * 1024);
    let mut c = proxy.login(&ALICE);
    assert_eq!(c.cmd(&["SET", "big", &value]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", "big"]), bulk(&value));
    let before = rss_kib(proxy.pid());

    // 800 replies of 256 KiB, 200 MiB in all, none of them read.
    const GETS: usize = 800;
    let mut batch = Vec::new();
    for _ in 0..GETS {
        batch.extend(Raw::encode(&["GET", "big"]));
    }
    c.send_bytes(&batch);
    let mut peak = before;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(rss_kib(proxy.pid()));
    }
    let redis_memory = String::from_utf8_lossy(&redis.direct().cmd(&["INFO", "memory"]))
        .lines()
        .find_map(|l| l.strip_prefix("used_memory_human:").map(str::to_owned))
        .unwrap_or_default();
    let growth_mib = (peak.saturating_sub(before)) as f64 / 1024.0;
    println!(
        "unread replies: {} MiB requested, proxy RSS grew {growth_mib:.1} MiB \
         (from {} MiB), Redis used_memory {redis_memory}",
        GETS / 4,
        before / 1024
    );
    assert!(
        growth_mib < 64.0,
        "the proxy buffered {growth_mib:.1} MiB for a client that never reads"
    );

    // Nothing was lost: the replies all come once the client reads.
    c.set_read_timeout(Duration::from_secs(30));
    let expected = bulk(&value);
    for i in 0..GETS {
        assert!(c.reply() == expected, "reply #{i}");
    }
    assert_eq!(c.cmd(&["PING"]), b"+PONG\r\n");
}

#[test]
fn oversized_and_nested_requests_are_refused_before_they_are_buffered() {
    let redis = Redis::start();
    let proxy = Proxy::start_with(redis.port, USERS, "max_request_bytes = 4096");
    let refused = |bytes: &[u8], login: bool, expected: &[u8]| {
        let mut c = if login {
            proxy.login(&ALICE)
        } else {
            proxy.raw()
        };
        let started = Instant::now();
        c.send_bytes(bytes);
        assert_eq!(
            c.reply(),
            expected,
            "{}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
        );
        assert!(c.is_closed());
        // Refused on the header: no waiting for a body that never comes.
        assert!(started.elapsed() < Duration::from_secs(2));
    };

    refused(
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1000000\r\n",
        true,
        b"-ERR Protocol error: invalid bulk length\r\n",
    );
    refused(
        b"*99999999999\r\n",
        true,
        b"-ERR Protocol error: invalid multibulk length\r\n",
    );
    // Small elements add up: refused once past the limit plus one
    // protocol line (64 KiB) of slack.
    let mut many = b"*1000000\r\n".to_vec();
    many.extend(b"$1\r\na\r\n".repeat(20_000));
    refused(
        &many,
        true,
        b"-ERR Protocol error: request larger than the configured limit\r\n",
    );
    refused(
        &b"*1\r\n".repeat(100_000),
        true,
        b"-ERR Protocol error: expected '$', got '*'\r\n",
    );
    refused(
        b"*3\r\n$4\r\nAUTH\r\n$5\r\nalice\r\n$100000\r\n",
        false,
        b"-ERR Protocol error: unauthenticated bulk length\r\n",
    );
    refused(
        b"*11\r\n",
        false,
        b"-ERR Protocol error: unauthenticated multibulk length\r\n",
    );
    refused(
        &[b"GET ".to_vec(), vec![b'a'; 70_000]].concat(),
        true,
        b"-ERR Protocol error: too big inline request\r\n",
    );
    assert!(!logs_show_a_panic(&proxy.logs()));
}

#[test]
fn a_flood_of_connections_beyond_the_limit_is_refused_cleanly() {
    let redis = Redis::start();
    let proxy = Proxy::start_with(redis.port, USERS, "max_connections = 10");
    let mut admitted: Vec<Raw> = (0..10).map(|_| proxy.login(&ALICE)).collect();
    let fds_before = open_fds(proxy.pid());

    let flood: Vec<_> = (0..200).map(|_| proxy.raw()).collect();
    for mut c in flood {
        assert_eq!(c.reply(), b"-ERR max number of clients reached\r\n");
        assert!(c.is_closed());
    }
    for c in admitted.iter_mut() {
        assert_eq!(c.cmd(&["PING"]), b"+PONG\r\n");
    }

    // Refused connections leave nothing open behind them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds(proxy.pid()) > fds_before {
        assert!(Instant::now() < deadline, "refused connections leak");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Once the admitted leave, as many new ones fit again.
    drop(admitted);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut again = Vec::new();
    while again.len() < 10 {
        let mut c = proxy.raw();
        if c.cmd(&["AUTH", "alice", "alice-pw"]) == b"+OK\r\n" {
            again.push(c);
        } else {
            assert!(Instant::now() < deadline, "slots were not released");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// PBKDF2 iterations of the flooded user: enough that each failed `AUTH`
/// costs real CPU in the proxy's debug build, few enough for a short test.
const FLOOD_ITERATIONS: u32 = 20_000;

/// Latencies of `GET`s by logged-in clients over `window`.
fn measure_latency(port: u16, window: Duration) -> Vec<Duration> {
    let workers: Vec<_> = (0..4)
        .map(|n| {
            std::thread::spawn(move || {
                let mut c = Raw::connect(port);
                assert_eq!(c.cmd(&["AUTH", "alice", "alice-pw"]), b"+OK\r\n");
                let key = format!("lat{n}");
                assert_eq!(c.cmd(&["SET", &key, "v"]), b"+OK\r\n");
                let mut samples = Vec::new();
                let started = Instant::now();
                while started.elapsed() < window {
                    let sent = Instant::now();
                    assert_eq!(c.cmd(&["GET", &key]), bulk("v"));
                    samples.push(sent.elapsed());
                }
                samples
            })
        })
        .collect();
    workers
        .into_iter()
        .flat_map(|w| w.join().expect("a latency worker"))
        .collect()
}

#[test]
fn a_flood_of_failing_auth_leaves_other_clients_their_latency() {
    let redis = Redis::start();
    let hash = redcloak::auth::PasswordHash::create(b"victim-pw", FLOOD_ITERATIONS);
    let toml = config_toml(redis.port, USERS, "")
        + &format!(
            "[[users]]\nname = \"victim\"\npassword_hash = \"{hash}\"\n\
             project = \"billing\"\naccess = \"readwrite\"\n"
        );
    let proxy = Proxy::start_toml(&toml);
    let port = proxy.port;
    let window = Duration::from_secs(3);

    let mut baseline = measure_latency(port, window);

    // One flooding client on four connections, each keeping two wrong
    // passwords in flight, until the measurement is over.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let flooders: Vec<_> = (0..4)
        .map(|_| {
            let (stop, failed) = (Arc::clone(&stop), Arc::clone(&failed));
            std::thread::spawn(move || {
                let mut c = Raw::connect(port);
                c.set_read_timeout(Duration::from_secs(60));
                let wrong = Raw::encode(&["AUTH", "victim", "wrong-pw"]);
                c.send_bytes(&wrong);
                while !stop.load(Ordering::Relaxed) {
                    c.send_bytes(&wrong);
                    assert!(c.reply().starts_with(b"-WRONGPASS"));
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                assert!(c.reply().starts_with(b"-WRONGPASS"));
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    let flood_started = Instant::now();
    let failed_before = failed.load(Ordering::Relaxed);
    let mut flooded = measure_latency(port, window);

    // A login that needs its own verification waits behind the flood.
    let login_started = Instant::now();
    let mut reader = proxy.raw();
    reader.set_read_timeout(Duration::from_secs(60));
    assert_eq!(reader.cmd(&["AUTH", "reader", "reader-pw"]), b"+OK\r\n");
    let fresh_login = login_started.elapsed();
    let flood_rate = (failed.load(Ordering::Relaxed) - failed_before) as f64
        / flood_started.elapsed().as_secs_f64();

    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.join().expect("a flooding connection");
    }

    let (b50, b99, bmax) = (
        percentile_ms(&mut baseline, 50.0),
        percentile_ms(&mut baseline, 99.0),
        percentile_ms(&mut baseline, 100.0),
    );
    let (f50, f99, fmax) = (
        percentile_ms(&mut flooded, 50.0),
        percentile_ms(&mut flooded, 99.0),
        percentile_ms(&mut flooded, 100.0),
    );
    println!(
        "AUTH flood ({flood_rate:.1} failed AUTH/s, {FLOOD_ITERATIONS} iterations each): \
         GET latency of 4 logged-in clients p50/p99/max {b50:.2}/{b99:.2}/{bmax:.2} ms \
         without, {f50:.2}/{f99:.2}/{fmax:.2} ms during ({} and {} GETs); \
         a fresh login during the flood took {fresh_login:?}",
        baseline.len(),
        flooded.len()
    );
    assert!(flood_rate > 1.0, "the flood was running");
    assert!(f99 < 200.0, "p99 {f99:.2} ms during the AUTH flood");
    assert!(
        flooded.len() * 4 > baseline.len(),
        "throughput of logged-in clients collapsed"
    );
}

#[test]
fn a_large_counter_inside_exec_keeps_the_reply_stream_in_step() {
    // Found by the reply_path fuzz target: a rewritten reply holding an
    // integer just under a power of ten from 10^16 up was followed by a
    // stray zero byte, so every later reply was read out of step.
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.login(&ALICE);
    for protocol in ["2", "3"] {
        assert!(c.cmd(&["HELLO", protocol]).len() > 1);
        assert_eq!(c.cmd(&["SET", "big", "9999999999999998"]), b"+OK\r\n");
        assert_eq!(c.cmd(&["MULTI"]), b"+OK\r\n");
        assert_eq!(c.cmd(&["INCR", "big"]), b"+QUEUED\r\n");
        // KEYS has its reply rewritten, so EXEC's reply is re-encoded.
        assert_eq!(c.cmd(&["KEYS", "big"]), b"+QUEUED\r\n");
        assert_eq!(
            c.cmd(&["EXEC"]),
            b"*2\r\n:9999999999999999\r\n*1\r\n$3\r\nbig\r\n",
            "RESP{protocol}"
        );
        assert_eq!(c.cmd(&["PING"]), b"+PONG\r\n", "RESP{protocol}");
    }
}
