//! The Prometheus endpoint through the real proxy: `/metrics` scraped over
//! HTTP and parsed after traffic, `/healthz`, and the refusals of the
//! minimal HTTP responder.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use base64::Engine as _;

use common::*;

/// A proxy with sealing, lockout after two failures and metrics on a free
/// port, and the port of its metrics endpoint.
fn proxy_with_metrics(redis: &Redis) -> (Proxy, u16) {
    let key = base64::engine::general_purpose::STANDARD.encode([5u8; 32]);
    let encryption = format!("enabled = true\nkey = \"{key}\"\ncompression_threshold = 64\n");
    let toml = config_toml_with(redis.port, USERS, "", &encryption).replace(
        "[audit]\nenabled = false\n",
        "[audit]\nenabled = false\nfailed_access_threshold = 2\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    let proxy = Proxy::start_toml(&toml);
    let line = wait_for_log(&proxy, "metrics endpoint ready", Duration::from_secs(10))
        .expect("the proxy logs its metrics address");
    let port = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("metrics.addr=127.0.0.1:"))
        .and_then(|p| p.parse().ok())
        .expect("a port in the log line");
    (proxy, port)
}

/// One HTTP exchange; returns the status line and the body.
fn get(port: u16, request: &str) -> (String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

/// Every sample of an OpenMetrics text exposition, by series (name and
/// labels as written) to value.
fn parse(exposition: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in exposition.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("series and value");
        let value: f64 = value.parse().expect("a numeric value");
        samples.insert(series.to_owned(), value);
    }
    samples
}

fn value(samples: &HashMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in {samples:#?}"))
}

#[test]
fn metrics_are_scraped_and_parsed_after_traffic() {
    let redis = Redis::start();
    let (proxy, port) = proxy_with_metrics(&redis);

    let mut alice = proxy.login(&ALICE);
    let long = "compressible text ".repeat(100);
    assert_eq!(alice.cmd(&["SET", "k", &long]), b"+OK\r\n");
    assert_eq!(alice.cmd(&["GET", "k"]), bulk(&long));
    assert_eq!(alice.cmd(&["GET", "k"]), bulk(&long));
    assert!(alice.cmd(&["CONFIG", "GET", "x"]).starts_with(b"-ERR"));

    let key = format!("{}k", upstream_prefix("billing"));
    let mut upstream = redis.direct();
    assert_eq!(
        upstream
            .cmd(&["SETRANGE", &key, "30", "\u{1}\u{2}\u{3}"])
            .first(),
        Some(&b':')
    );
    assert!(
        alice
            .cmd(&["GET", "k"])
            .starts_with(b"-ERR redcloak could not open")
    );

    let mut mallory = proxy.raw();
    let wrongpass = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
    for _ in 0..3 {
        assert_eq!(mallory.cmd(&["AUTH", BOB.name, "guess"]), wrongpass);
    }

    let (status, body) = get(port, "GET /metrics HTTP/1.1\r\nHost: proxy\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.ends_with("# EOF\n"), "{body}");
    let samples = parse(&body);

    assert_eq!(value(&samples, "redcloak_connections_total"), 2.0);
    assert_eq!(value(&samples, "redcloak_open_connections"), 2.0);
    assert_eq!(
        value(
            &samples,
            "redcloak_authentications_total{outcome=\"success\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "redcloak_authentications_total{outcome=\"failure\"}"
        ),
        2.0
    );
    assert_eq!(
        value(
            &samples,
            "redcloak_authentications_total{outcome=\"locked_out\"}"
        ),
        1.0
    );
    assert_eq!(value(&samples, "redcloak_lockouts_total"), 1.0);
    assert_eq!(
        value(
            &samples,
            "redcloak_alerts_total{alert_type=\"SUSPICIOUS_ACTIVITY\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "redcloak_commands_total{command=\"set\",outcome=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "redcloak_commands_total{command=\"get\",outcome=\"ok\"}"
        ),
        2.0
    );
    assert_eq!(
        value(
            &samples,
            "redcloak_commands_total{command=\"get\",outcome=\"error\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "redcloak_commands_total{command=\"config|get\",outcome=\"denied\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "redcloak_integrity_failures_total{reason=\"integrity\"}"
        ),
        1.0
    );
    assert_eq!(
        value(&samples, "redcloak_upstream_latency_seconds_count"),
        4.0
    );
    assert!(value(&samples, "redcloak_upstream_latency_seconds_sum") > 0.0);
    assert_eq!(
        value(
            &samples,
            "redcloak_upstream_latency_seconds_bucket{le=\"+Inf\"}"
        ),
        4.0
    );
    assert_eq!(
        value(&samples, "redcloak_sealed_bytes_total"),
        long.len() as f64
    );
    assert_eq!(
        value(&samples, "redcloak_opened_bytes_total"),
        2.0 * long.len() as f64
    );
    assert!(value(&samples, "redcloak_compression_saved_bytes_total") > 1000.0);
    assert_eq!(value(&samples, "redcloak_audit_events_dropped_total"), 0.0);
}

#[test]
fn healthz_answers_and_other_requests_are_refused() {
    let redis = Redis::start();
    let (_proxy, port) = proxy_with_metrics(&redis);

    assert_eq!(
        get(port, "GET /healthz HTTP/1.1\r\n\r\n"),
        ("HTTP/1.1 200 OK".to_owned(), "ok\n".to_owned())
    );
    assert_eq!(
        get(port, "GET /nothing HTTP/1.1\r\n\r\n").0,
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        get(port, "DELETE /metrics HTTP/1.1\r\n\r\n").0,
        "HTTP/1.1 405 Method Not Allowed"
    );
    assert_eq!(get(port, "hello\r\n\r\n").0, "HTTP/1.1 400 Bad Request");
}

#[test]
fn failed_tls_handshakes_are_counted_by_reason() {
    let redis = Redis::start();
    let certs = tempfile::tempdir().unwrap();
    gen_certs(certs.path(), false);
    let toml = config_toml(redis.port, USERS, "").replace(
        "[audit]\nenabled = false\n",
        "[audit]\nenabled = false\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    ) + &server_tls_toml(certs.path(), false);
    let proxy = Proxy::start_toml(&toml);
    let line = wait_for_log(&proxy, "metrics endpoint ready", Duration::from_secs(10))
        .expect("the proxy logs its metrics address");
    let port: u16 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("metrics.addr=127.0.0.1:"))
        .and_then(|p| p.parse().ok())
        .expect("a port in the log line");

    // A plaintext client on the TLS port.
    let mut plain = proxy.raw();
    plain.send(&["PING"]);
    assert!(plain.try_reply().is_some_and(|r| r.starts_with(b"-ERR")));

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = get(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        let samples = parse(&body);
        let series = "redcloak_tls_handshake_failures_total{reason=\"plaintext\"}";
        if samples.get(series) == Some(&1.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no plaintext failure counted:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
