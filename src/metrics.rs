//! Prometheus metrics: the counters that sessions, the sealer, lockout and
//! the audit log feed, and the small HTTP endpoint on `[metrics] listen`
//! that serves them (`GET /metrics`) beside a liveness check
//! (`GET /healthz`).
//!
//! Updating a metric is an atomic add, plus a read-locked label lookup for
//! labelled ones, so it is cheap enough for the request path. The exposition
//! text is written by the `prometheus-client` crate; only HTTP framing is
//! done here.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::shutdown::Shutdown;

/// How a command ended, as counted and audited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Answered without an error.
    Ok,
    /// Answered with an error: Redis's, or the proxy's for a request it
    /// could not carry out.
    Error,
    /// Refused because the client may not run it: not logged in, lacking
    /// permission, or a command the proxy never forwards.
    Denied,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Denied => "denied",
        }
    }
}

/// How an authentication attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthOutcome {
    Success,
    /// Wrong password or unknown user.
    Failure,
    /// Refused without checking because the (user, client IP) pair is
    /// locked out.
    LockedOut,
}

impl AuthOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthOutcome::Success => "success",
            AuthOutcome::Failure => "failure",
            AuthOutcome::LockedOut => "locked_out",
        }
    }
}

/// Label values are `&'static str` taken from the command table and from
/// fixed lists, so no label can carry client bytes and the number of series
/// is bounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabels {
    alert_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Byte counters of the sealer, handed to it so that it counts what it
/// seals and opens without knowing about the registry. Clones share the
/// same counters.
#[derive(Clone, Debug, Default)]
pub struct SealCounters {
    sealed: Counter,
    opened: Counter,
    saved: Counter,
}

impl SealCounters {
    /// One value sealed: `plaintext` bytes in, `stored` bytes out, where
    /// sealing it uncompressed would have stored `uncompressed` bytes.
    pub fn sealed(&self, plaintext: usize, stored: usize, uncompressed: usize) {
        self.sealed.inc_by(plaintext as u64);
        self.saved
            .inc_by(uncompressed.saturating_sub(stored) as u64);
    }

    /// One sealed value opened to `plaintext` bytes.
    pub fn opened(&self, plaintext: usize) {
        self.opened.inc_by(plaintext as u64);
    }
}

/// Every metric of the proxy, in one registry. Shared as `Arc<Metrics>`.
pub struct Metrics {
    registry: Registry,
    connections: Counter,
    open_connections: Gauge,
    authentications: Family<OutcomeLabels, Counter>,
    commands: Family<CommandLabels, Counter>,
    upstream_latency: Histogram,
    seal: SealCounters,
    integrity_failures: Family<ReasonLabels, Counter>,
    lockouts: Counter,
    alerts: Family<AlertLabels, Counter>,
    audit_dropped: Counter,
    audit_write_errors: Counter,
    tls_handshake_failures: Family<ReasonLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Counts an open connection while it lives; see [`Metrics::connection`].
#[derive(Debug)]
pub struct ConnectionGuard {
    open: Gauge,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Metrics {
        let metrics = Metrics {
            registry: Registry::with_prefix("redcloak"),
            connections: Counter::default(),
            open_connections: Gauge::default(),
            authentications: Family::default(),
            commands: Family::default(),
            // 100 µs to about 3.3 s, doubling: a local Redis answers in the
            // first buckets, a struggling one in the last.
            upstream_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            seal: SealCounters::default(),
            integrity_failures: Family::default(),
            lockouts: Counter::default(),
            alerts: Family::default(),
            audit_dropped: Counter::default(),
            audit_write_errors: Counter::default(),
            tls_handshake_failures: Family::default(),
        };
        metrics.registered()
    }

    /// Registers every metric (the registry holds clones that share their
    /// values with the fields).
    fn registered(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register(
            "connections",
            "Client connections accepted",
            self.connections.clone(),
        );
        r.register(
            "open_connections",
            "Client connections open now",
            self.open_connections.clone(),
        );
        r.register(
            "authentications",
            "Authentication attempts by outcome (success, failure, locked_out)",
            self.authentications.clone(),
        );
        r.register(
            "commands",
            "Commands by name and outcome (ok, error, denied)",
            self.commands.clone(),
        );
        r.register_with_unit(
            "upstream_latency",
            "Time from sending a request upstream to its reply",
            Unit::Seconds,
            self.upstream_latency.clone(),
        );
        r.register_with_unit(
            "sealed",
            "Plaintext bytes sealed",
            Unit::Bytes,
            self.seal.sealed.clone(),
        );
        r.register_with_unit(
            "opened",
            "Plaintext bytes opened from sealed values",
            Unit::Bytes,
            self.seal.opened.clone(),
        );
        r.register_with_unit(
            "compression_saved",
            "Bytes that compression kept out of Redis",
            Unit::Bytes,
            self.seal.saved.clone(),
        );
        r.register(
            "integrity_failures",
            "Stored values that failed to open, by reason",
            self.integrity_failures.clone(),
        );
        r.register(
            "lockouts",
            "(user, client IP) pairs locked out after failed logins",
            self.lockouts.clone(),
        );
        r.register(
            "alerts",
            "Alerts raised, by alert type",
            self.alerts.clone(),
        );
        r.register(
            "audit_events_dropped",
            "Audit events dropped because the audit writer fell behind",
            self.audit_dropped.clone(),
        );
        r.register(
            "audit_write_errors",
            "Failed writes of the audit log",
            self.audit_write_errors.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "Client TLS handshakes that failed, by reason (plaintext, timeout, refused)",
            self.tls_handshake_failures.clone(),
        );
        self
    }

    /// Counts a new client connection; it counts as open until the guard
    /// is dropped.
    pub fn connection(&self) -> ConnectionGuard {
        self.connections.inc();
        self.open_connections.inc();
        ConnectionGuard {
            open: self.open_connections.clone(),
        }
    }

    pub fn authentication(&self, outcome: AuthOutcome) {
        self.authentications
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// `command` is the command table's name, or `"unknown"`.
    pub fn command(&self, command: &'static str, outcome: Outcome) {
        self.commands_by(command, outcome, 1);
    }

    /// Counts `count` commands of one name and outcome at once.
    pub fn commands_by(&self, command: &'static str, outcome: Outcome, count: u64) {
        self.commands
            .get_or_create(&CommandLabels {
                command,
                outcome: outcome.as_str(),
            })
            .inc_by(count);
    }

    pub fn upstream_latency(&self, elapsed: Duration) {
        self.upstream_latency.observe(elapsed.as_secs_f64());
    }

    /// The counters the sealer updates.
    pub fn seal_counters(&self) -> SealCounters {
        self.seal.clone()
    }

    /// `reason` is a fixed word such as `integrity` or `unknown_key`.
    pub fn integrity_failure(&self, reason: &'static str) {
        self.integrity_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn lockout(&self) {
        self.lockouts.inc();
    }

    pub fn alert(&self, alert_type: &'static str) {
        self.alerts.get_or_create(&AlertLabels { alert_type }).inc();
    }

    /// Counts a failed client TLS handshake.
    pub fn tls_handshake_failure(&self, reason: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn audit_dropped(&self) {
        self.audit_dropped.inc();
    }

    pub fn audit_write_error(&self) {
        self.audit_write_errors.inc();
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String never fails");
        text
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

/// The longest request head the endpoint reads. A scrape's head is a few
/// hundred bytes; anything longer is refused.
const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// How long one scrape may take, reading and writing, before it is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Scrapes served at once; more connections are closed unanswered.
const MAX_CONCURRENT_REQUESTS: usize = 16;

/// Serves `GET /metrics` and `GET /healthz` on `listener` until `shutdown`.
///
/// A minimal HTTP/1.1 responder, one request per connection
/// (`Connection: close`): the request head is bounded by
/// [`MAX_REQUEST_BYTES`], each exchange by [`REQUEST_TIMEOUT`], and
/// concurrency by [`MAX_CONCURRENT_REQUESTS`]. `/healthz` answers while the
/// process runs; it does not probe the upstream.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, mut shutdown: Shutdown) {
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.announced() => break,
        };
        let socket = match accepted {
            Ok((socket, _)) => socket,
            Err(e) => {
                warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            debug!("too many metrics requests at once; one was closed");
            continue;
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(REQUEST_TIMEOUT, answer(socket, &metrics)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(error = %e, "metrics request failed"),
                Err(_) => debug!("metrics request timed out"),
            }
        });
    }
}

/// Reads one request head and writes the response.
async fn answer(mut socket: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let response = loop {
        if let Some(end) = find_head_end(&head) {
            break respond(&head[..end], metrics);
        }
        if head.len() >= MAX_REQUEST_BYTES {
            break response(431, "text/plain", b"request head too large\n");
        }
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        let room = MAX_REQUEST_BYTES - head.len();
        head.extend_from_slice(&chunk[..n.min(room)]);
    };
    socket.write_all(&response).await?;
    socket.shutdown().await
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// The response to a request head (request line and headers, without the
/// blank line).
fn respond(head: &[u8], metrics: &Metrics) -> Vec<u8> {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return response(400, "text/plain", b"malformed request line\n");
    };
    if !version.starts_with(b"HTTP/1.") {
        return response(400, "text/plain", b"unsupported http version\n");
    }
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    match (method, path) {
        (b"GET", b"/metrics") => response(
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode().as_bytes(),
        ),
        (b"GET", b"/healthz") => response(200, "text/plain", b"ok\n"),
        (b"GET", _) => response(404, "text/plain", b"not found: try /metrics or /healthz\n"),
        _ => response(405, "text/plain", b"only GET is served\n"),
    }
}

fn response(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Request Header Fields Too Large",
    };
    let allow = if status == 405 { "Allow: GET\r\n" } else { "" };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    /// The value of the sample whose line starts with `series `.
    fn sample(exposition: &str, series: &str) -> Option<f64> {
        exposition
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn every_metric_is_exposed_with_its_labels() {
        let metrics = Metrics::new();
        let guard = metrics.connection();
        metrics.authentication(AuthOutcome::Success);
        metrics.authentication(AuthOutcome::LockedOut);
        metrics.command("get", Outcome::Ok);
        metrics.command("get", Outcome::Ok);
        metrics.command("config", Outcome::Denied);
        metrics.upstream_latency(Duration::from_micros(250));
        metrics.seal_counters().sealed(2000, 900, 2100);
        metrics.seal_counters().opened(2000);
        metrics.integrity_failure("integrity");
        metrics.lockout();
        metrics.alert("SUSPICIOUS_ACTIVITY");
        metrics.audit_dropped();
        metrics.audit_write_error();

        let e = metrics.encode();
        let expect = [
            ("redcloak_connections_total", 1.0),
            ("redcloak_open_connections", 1.0),
            ("redcloak_authentications_total{outcome=\"success\"}", 1.0),
            (
                "redcloak_authentications_total{outcome=\"locked_out\"}",
                1.0,
            ),
            (
                "redcloak_commands_total{command=\"get\",outcome=\"ok\"}",
                2.0,
            ),
            (
                "redcloak_commands_total{command=\"config\",outcome=\"denied\"}",
                1.0,
            ),
            ("redcloak_upstream_latency_seconds_count", 1.0),
            ("redcloak_sealed_bytes_total", 2000.0),
            ("redcloak_opened_bytes_total", 2000.0),
            ("redcloak_compression_saved_bytes_total", 1200.0),
            (
                "redcloak_integrity_failures_total{reason=\"integrity\"}",
                1.0,
            ),
            ("redcloak_lockouts_total", 1.0),
            (
                "redcloak_alerts_total{alert_type=\"SUSPICIOUS_ACTIVITY\"}",
                1.0,
            ),
            ("redcloak_audit_events_dropped_total", 1.0),
            ("redcloak_audit_write_errors_total", 1.0),
        ];
        for (series, value) in expect {
            assert_eq!(sample(&e, series), Some(value), "{series} in\n{e}");
        }
        assert!(e.ends_with("# EOF\n"));

        drop(guard);
        assert_eq!(
            sample(&metrics.encode(), "redcloak_open_connections"),
            Some(0.0)
        );
    }

    #[test]
    fn requests_are_routed_by_method_and_path() {
        let metrics = Metrics::new();
        let ok = respond(b"GET /metrics HTTP/1.1\r\nHost: x", &metrics);
        assert!(text(&ok).starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text(&ok).contains("application/openmetrics-text"));
        assert!(text(&ok).ends_with("# EOF\n"));

        let query = respond(b"GET /metrics?name=x HTTP/1.0", &metrics);
        assert!(text(&query).starts_with("HTTP/1.1 200 OK\r\n"));

        let health = respond(b"GET /healthz HTTP/1.1", &metrics);
        assert!(text(&health).ends_with("\r\n\r\nok\n"));

        let cases: [(&[u8], &str); 5] = [
            (b"GET /other HTTP/1.1", "404"),
            (b"POST /metrics HTTP/1.1", "405"),
            (b"GET /metrics", "400"),
            (b"GET /metrics SPDY/3", "400"),
            (b"GET  /metrics HTTP/1.1", "400"),
        ];
        for (head, status) in cases {
            let reply = text(&respond(head, &metrics));
            assert!(
                reply.starts_with(&format!("HTTP/1.1 {status} ")),
                "{head:?}: {reply}"
            );
        }
        assert!(text(&respond(b"PUT /x HTTP/1.1", &metrics)).contains("Allow: GET\r\n"));
    }

    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await.unwrap();
        text(&reply)
    }

    #[tokio::test]
    async fn the_endpoint_serves_metrics_health_and_refuses_huge_heads() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        metrics.command("set", Outcome::Ok);
        let (trigger, shutdown) = crate::shutdown::channel();
        let server = tokio::spawn(serve(listener, Arc::clone(&metrics), shutdown));

        let scraped = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(scraped.contains("redcloak_commands_total{command=\"set\",outcome=\"ok\"} 1"));
        let health = exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(health.starts_with("HTTP/1.1 200 OK") && health.ends_with("ok\n"));

        // Exactly the limit and no blank line: the head can never end.
        let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
        huge.resize(MAX_REQUEST_BYTES, b'a');
        let refused = exchange(addr, &huge).await;
        assert!(refused.starts_with("HTTP/1.1 431 "), "{refused}");

        trigger.fire();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the endpoint stops on shutdown")
            .unwrap();
    }
}
