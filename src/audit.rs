//! The audit log (SPEC §7): one JSON object per line for each
//! security-relevant event, written by a background task so that no client
//! ever waits for the disk.
//!
//! [`Audit::record`] only puts a [`Record`] on a bounded channel; when the
//! channel is full the record is dropped and counted in
//! `redcloak_audit_events_dropped_total`, never waited for. A writer thread
//! turns records into lines and writes them in batches every
//! [`FLUSH_INTERVAL`], on [`Audit::flush`] and on [`Audit::close`] at
//! shutdown, and reopens the file on [`Audit::reopen`] (`SIGHUP`) so that
//! rotated logs are let go.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self as std_mpsc, RecvTimeoutError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::ser::{Serialize, SerializeMap, Serializer};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::auth::Identity;
use crate::config::AuditSettings;
use crate::metrics::{Metrics, Outcome};

/// Records waiting for the writer. At a few hundred bytes each this bounds
/// the queue to some tens of MiB; a writer that far behind is stuck, and
/// dropping (counted) beats buffering without limit.
pub const QUEUE_CAPACITY: usize = 64 * 1024;

/// How often the writer collects queued records: the longest a record waits
/// before it is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// The writer writes in chunks of about this many bytes.
const BATCH_BYTES: usize = 64 * 1024;

/// How long [`Audit::close`] waits for the writer to finish.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Key names an `access` event lists at most, and the bytes kept of each,
/// when `log_key_names` is on; longer lists and names are cut.
const MAX_LOGGED_KEYS: usize = 32;
const MAX_LOGGED_KEY_BYTES: usize = 512;

/// Why the audit log could not be started. The operator's fault: the path
/// is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    #[error("cannot open the audit log {}: {source}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What happened. Each variant becomes the `event` field and its own fields;
/// none holds a password or a value, and only `Access` may hold key names.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// An authentication attempt. `method` is `password` or `certificate`;
    /// `reason` says why one failed (`wrong_credentials`, `locked_out`).
    Auth {
        success: bool,
        method: &'static str,
        reason: Option<&'static str>,
    },
    /// A (user, client IP) pair was locked out after `failures` failed
    /// logins.
    Lockout { failures: u32, lockout_secs: u64 },
    /// Something worth an operator's attention; see [`Alert`].
    Alert(Alert),
    /// A command refused because the client may not run it; `reason` is
    /// `not_authenticated`, `permission` or `refused`.
    Denied {
        command: &'static str,
        reason: &'static str,
    },
    /// A stored value failed to open; `reason` is a fixed word such as
    /// `integrity` or `unknown_key`.
    IntegrityFailure {
        command: &'static str,
        reason: &'static str,
    },
    /// One command and how it ended; `keys` only with `log_key_names`.
    Access {
        command: &'static str,
        outcome: Outcome,
        keys: Option<Vec<String>>,
    },
    /// A weakened setting, one event per warning at startup.
    ConfigWarning { warning: String },
    /// The running proxy switched to a new current key. Key ids are not
    /// secret; the keys are never logged.
    KeyRotated {
        key_id: String,
        previous_key_id: String,
    },
}

/// The fields of an `alert` event. Only `alert_type` and `severity` are
/// always present.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Alert {
    /// `SUSPICIOUS_ACTIVITY`, `HIGH_FAILED_AUTH_RATE`, `HIGH_ACCESS_VOLUME`
    /// or `SENSITIVE_DATA`.
    pub alert_type: &'static str,
    /// `low`, `medium` or `high`.
    pub severity: &'static str,
    /// How many failures, commands or patterns were seen.
    pub count: Option<u64>,
    pub threshold: Option<u64>,
    pub window_secs: Option<u64>,
    pub command: Option<&'static str>,
    /// The sensitive-data patterns that matched (never the matching text).
    pub patterns: Vec<Arc<str>>,
    /// What the proxy did: `logged`, `rejected`, `redacted`, `locked_out`.
    pub action: Option<&'static str>,
}

/// One line of the audit log: the event, when it happened, and who caused
/// it where known.
#[derive(Clone, Debug)]
pub struct Record {
    ts: SystemTime,
    event: Event,
    user: Option<Arc<str>>,
    project: Option<Arc<str>>,
    peer: Option<SocketAddr>,
}

impl Record {
    /// An event that happens now.
    pub fn new(event: Event) -> Record {
        Record {
            ts: SystemTime::now(),
            event,
            user: None,
            project: None,
            peer: None,
        }
    }

    /// The client's address.
    pub fn peer(mut self, peer: SocketAddr) -> Record {
        self.peer = Some(peer);
        self
    }

    /// A configured user name. Names a client sent that match no user are
    /// never given here: they may be a password typed in the wrong place.
    pub fn user(mut self, user: Arc<str>) -> Record {
        self.user = Some(user);
        self
    }

    pub fn project(mut self, project: Arc<str>) -> Record {
        self.project = Some(project);
        self
    }

    /// The user and project of an authenticated session, if any.
    pub fn identity(mut self, identity: Option<&Identity>) -> Record {
        if let Some(identity) = identity {
            self.user = Some(Arc::clone(&identity.user));
            self.project = Some(Arc::clone(&identity.project));
        }
        self
    }

    pub fn event(&self) -> &Event {
        &self.event
    }

    /// Appends the record as one JSON line.
    pub fn write_line(&self, out: &mut Vec<u8>) {
        let start = out.len();
        if serde_json::to_writer(&mut *out, self).is_ok() {
            out.push(b'\n');
        } else {
            out.truncate(start);
        }
    }
}

impl Serialize for Record {
    /// `ts` and `event` first, then who, then the event's own fields;
    /// absent fields are left out rather than written as null.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("ts", &rfc3339(self.ts))?;
        map.serialize_entry("event", self.event.name())?;
        if let Some(user) = &self.user {
            map.serialize_entry("user", &**user)?;
        }
        if let Some(project) = &self.project {
            map.serialize_entry("project", &**project)?;
        }
        if let Some(peer) = &self.peer {
            map.serialize_entry("peer", &peer.to_string())?;
        }

        match &self.event {
            Event::Auth {
                success,
                method,
                reason,
            } => {
                map.serialize_entry("success", success)?;
                map.serialize_entry("method", method)?;
                if let Some(reason) = reason {
                    map.serialize_entry("reason", reason)?;
                }
            }
            Event::Lockout {
                failures,
                lockout_secs,
            } => {
                map.serialize_entry("failures", failures)?;
                map.serialize_entry("lockout_secs", lockout_secs)?;
            }
            Event::Alert(alert) => {
                map.serialize_entry("alert_type", alert.alert_type)?;
                map.serialize_entry("severity", alert.severity)?;
                let numbers = [
                    ("count", alert.count),
                    ("threshold", alert.threshold),
                    ("window_secs", alert.window_secs),
                ];
                for (name, value) in numbers {
                    if let Some(value) = value {
                        map.serialize_entry(name, &value)?;
                    }
                }
                if let Some(command) = alert.command {
                    map.serialize_entry("command", command)?;
                }
                if !alert.patterns.is_empty() {
                    let patterns: Vec<&str> = alert.patterns.iter().map(|p| &**p).collect();
                    map.serialize_entry("patterns", &patterns)?;
                }
                if let Some(action) = alert.action {
                    map.serialize_entry("action", action)?;
                }
            }
            Event::Denied { command, reason } | Event::IntegrityFailure { command, reason } => {
                map.serialize_entry("command", command)?;
                map.serialize_entry("reason", reason)?;
            }
            Event::Access {
                command,
                outcome,
                keys,
            } => {
                map.serialize_entry("command", command)?;
                map.serialize_entry("outcome", outcome.as_str())?;
                if let Some(keys) = keys {
                    map.serialize_entry("keys", keys)?;
                }
            }
            Event::ConfigWarning { warning } => map.serialize_entry("warning", warning)?,
            Event::KeyRotated {
                key_id,
                previous_key_id,
            } => {
                map.serialize_entry("key_id", key_id)?;
                map.serialize_entry("previous_key_id", previous_key_id)?;
            }
        }
        map.end()
    }
}

impl Event {
    /// The `event` field.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Auth { .. } => "auth",
            Event::Lockout { .. } => "lockout",
            Event::Alert(_) => "alert",
            Event::Denied { .. } => "denied",
            Event::IntegrityFailure { .. } => "integrity_failure",
            Event::Access { .. } => "access",
            Event::ConfigWarning { .. } => "config_warning",
            Event::KeyRotated { .. } => "key_rotated",
        }
    }
}

/// Key names as an `access` event lists them: lossily decoded, at most
/// [`MAX_LOGGED_KEYS`] of [`MAX_LOGGED_KEY_BYTES`] each.
pub fn key_names<'a>(keys: impl IntoIterator<Item = &'a [u8]>) -> Vec<String> {
    keys.into_iter()
        .take(MAX_LOGGED_KEYS)
        .map(|key| {
            String::from_utf8_lossy(&key[..key.len().min(MAX_LOGGED_KEY_BYTES)]).into_owned()
        })
        .collect()
}

/// `ts` as RFC 3339 in UTC with milliseconds, e.g.
/// `2026-12-03T18:25:00.123Z`.
fn rfc3339(ts: SystemTime) -> String {
    let since = ts.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_date((secs / 86_400) as i64);
    let of_day = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01. The calendar
/// repeats every 400 years (146 097 days); counting years from March makes
/// the leap day the last day of a year, so no month-length table is needed.
fn civil_date(days: i64) -> (i64, u32, u32) {
    let shifted = days + 719_468; // days from 0000-03-01
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Requests to the writer besides records, each acknowledged once done.
enum Control {
    Flush(oneshot::Sender<()>),
    Reopen(oneshot::Sender<()>),
    Close(oneshot::Sender<()>),
}

/// The handle every part of the proxy records events through. Cheap to
/// clone; a disabled one accepts records and drops them.
#[derive(Clone)]
pub struct Audit {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    records: mpsc::Sender<Record>,
    control: std_mpsc::Sender<Control>,
    metrics: Arc<Metrics>,
    access_logging: bool,
    log_key_names: bool,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("enabled", &self.inner.is_some())
            .finish_non_exhaustive()
    }
}

impl Audit {
    /// An audit log that records nothing (`audit.enabled = false`).
    pub fn disabled() -> Audit {
        Audit { inner: None }
    }

    /// Opens the configured log (creating it, and its directory, if
    /// needed) and starts the writer thread; a disabled log when
    /// `audit.enabled` is false.
    pub fn start(settings: &AuditSettings, metrics: Arc<Metrics>) -> Result<Audit, AuditError> {
        Audit::start_with_capacity(settings, metrics, QUEUE_CAPACITY)
    }

    /// [`Audit::start`] with a chosen queue length, for tests.
    pub fn start_with_capacity(
        settings: &AuditSettings,
        metrics: Arc<Metrics>,
        capacity: usize,
    ) -> Result<Audit, AuditError> {
        if !settings.enabled {
            return Ok(Audit::disabled());
        }
        let path = PathBuf::from(&settings.path);
        let open_error = |source| AuditError::Open {
            path: path.clone(),
            source,
        };
        let sink = Sink::open(&path).map_err(open_error)?;
        let (records, queue) = mpsc::channel(capacity.max(1));
        let (control, requests) = std_mpsc::channel();
        let writer = Writer {
            sink,
            path: path.clone(),
            buf: Vec::with_capacity(BATCH_BYTES),
            metrics: Arc::clone(&metrics),
            failing: false,
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(queue, requests))
            .map_err(open_error)?;
        Ok(Audit {
            inner: Some(Arc::new(Inner {
                records,
                control,
                metrics,
                access_logging: settings.access_logging,
                log_key_names: settings.log_key_names,
            })),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Whether `access` events are written.
    pub fn access_logging(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.access_logging)
    }

    /// Whether `access` events name their keys.
    pub fn log_key_names(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|i| i.access_logging && i.log_key_names)
    }

    /// Queues `record` for the writer without waiting; a full queue drops
    /// it and counts the drop. The writer collects the queue on its own
    /// schedule, so queueing wakes no thread.
    pub fn record(&self, record: Record) {
        let Some(inner) = &self.inner else {
            return;
        };
        if inner.records.try_send(record).is_err() {
            inner.metrics.audit_dropped();
        }
    }

    /// Returns once every record queued before the call is written to the
    /// operating system.
    pub async fn flush(&self) {
        self.control(Control::Flush).await;
    }

    /// Writes what is queued, then opens the path again: after a rotation
    /// moved the file away, new records go to a fresh file. If the path
    /// can't be opened the old file stays in use.
    pub async fn reopen(&self) {
        self.control(Control::Reopen).await;
    }

    /// Writes every queued record, syncs the file and stops the writer;
    /// later records are dropped. Bounded by a few seconds, so a stuck disk
    /// can't hold up shutdown.
    pub async fn close(&self) {
        if tokio::time::timeout(CLOSE_TIMEOUT, self.control(Control::Close))
            .await
            .is_err()
        {
            warn!("the audit log did not finish writing before shutdown");
        }
    }

    async fn control(&self, request: fn(oneshot::Sender<()>) -> Control) {
        let Some(inner) = &self.inner else {
            return;
        };
        let (ack, done) = oneshot::channel();
        if inner.control.send(request(ack)).is_ok() {
            let _ = done.await;
        }
    }
}

/// Where lines go: a file opened for appending, or standard output.
enum Sink {
    Stdout,
    File(File),
}

impl Sink {
    fn open(path: &Path) -> std::io::Result<Sink> {
        if path == Path::new("-") {
            return Ok(Sink::Stdout);
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut options = OpenOptions::new();
        options.append(true).create(true);
        // Users, projects and addresses are not secrets, but not everyone's
        // business either: owner and group only.
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o640);
        Ok(Sink::File(options.open(path)?))
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Sink::File(file) => file.write_all(bytes),
        }
    }

    fn sync(&mut self) {
        if let Sink::File(file) = self {
            let _ = file.sync_data();
        }
    }
}

/// The writer, on a thread of its own so that disk I/O never occupies the
/// runtime's threads. It wakes every [`FLUSH_INTERVAL`] or for a control
/// request, takes whatever records are queued, and writes them at once.
struct Writer {
    sink: Sink,
    path: PathBuf,
    buf: Vec<u8>,
    metrics: Arc<Metrics>,
    /// Set after a failed write, so a broken disk gives one warning, not
    /// one per batch.
    failing: bool,
}

impl Writer {
    fn run(mut self, mut queue: mpsc::Receiver<Record>, requests: std_mpsc::Receiver<Control>) {
        loop {
            let request = requests.recv_timeout(FLUSH_INTERVAL);
            self.drain(&mut queue);
            match request {
                Ok(Control::Flush(ack)) => {
                    let _ = ack.send(());
                }
                Ok(Control::Reopen(ack)) => {
                    self.reopen();
                    let _ = ack.send(());
                }
                Ok(Control::Close(ack)) => {
                    self.sink.sync();
                    let _ = ack.send(());
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.sink.sync();
                    return;
                }
            }
        }
    }

    /// Writes every queued record, in batches of about [`BATCH_BYTES`].
    fn drain(&mut self, queue: &mut mpsc::Receiver<Record>) {
        while let Ok(record) = queue.try_recv() {
            record.write_line(&mut self.buf);
            if self.buf.len() >= BATCH_BYTES {
                self.write_out();
            }
        }
        self.write_out();
    }

    /// Writes the buffer. A failed write is counted and its lines are lost:
    /// keeping them would let a full disk grow the proxy's memory instead.
    fn write_out(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        match self.sink.write(&self.buf) {
            Ok(()) => self.failing = false,
            Err(e) => {
                self.metrics.audit_write_error();
                if !self.failing {
                    warn!(path = %self.path.display(), error = %e, "writing the audit log failed");
                }
                self.failing = true;
            }
        }
        self.buf.clear();
    }

    fn reopen(&mut self) {
        if matches!(self.sink, Sink::Stdout) {
            return;
        }
        match Sink::open(&self.path) {
            Ok(sink) => {
                self.sink.sync();
                self.sink = sink;
                info!(path = %self.path.display(), "audit log reopened");
            }
            Err(e) => {
                let path = self.path.display();
                warn!(%path, error = %e, "audit log not reopened; writing to the old file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn settings(path: &Path) -> AuditSettings {
        AuditSettings {
            path: path.display().to_string(),
            ..AuditSettings::default()
        }
    }

    fn lines(path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("every line is JSON"))
            .collect()
    }

    fn peer() -> SocketAddr {
        "192.0.2.7:51000".parse().unwrap()
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        let at = |secs: u64, millis: u64| {
            rfc3339(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_700_000_000, 123), "2023-11-14T22:13:20.123Z");
        assert_eq!(at(4_107_542_399, 999), "2100-02-28T23:59:59.999Z");
        assert_eq!(at(253_402_300_799, 0), "9999-12-31T23:59:59.000Z");
        assert_eq!(civil_date(-1), (1969, 12, 31));
    }

    #[test]
    fn a_record_starts_with_ts_and_event_and_leaves_unknown_fields_out() {
        let mut out = Vec::new();
        Record::new(Event::Auth {
            success: false,
            method: "password",
            reason: Some("wrong_credentials"),
        })
        .peer(peer())
        .write_line(&mut out);
        let line = String::from_utf8(out).unwrap();
        assert!(line.starts_with("{\"ts\":\""), "{line}");
        assert!(line.contains("\"event\":\"auth\",\"peer\":\"192.0.2.7:51000\""));
        assert!(!line.contains("user") && !line.contains("null"), "{line}");
        assert!(line.ends_with("}\n"));
    }

    #[tokio::test]
    async fn every_event_is_written_as_one_json_line_with_its_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/audit.log");
        let audit = Audit::start(&settings(&path), Arc::new(Metrics::new())).unwrap();
        let user: Arc<str> = Arc::from("alice");
        let project: Arc<str> = Arc::from("billing");
        let who = |event| {
            Record::new(event)
                .peer(peer())
                .user(Arc::clone(&user))
                .project(Arc::clone(&project))
        };
        let events = vec![
            Event::Auth {
                success: true,
                method: "password",
                reason: None,
            },
            Event::Lockout {
                failures: 5,
                lockout_secs: 300,
            },
            Event::Alert(Alert {
                alert_type: "SENSITIVE_DATA",
                severity: "medium",
                count: Some(1),
                command: Some("set"),
                patterns: vec![Arc::from("password")],
                action: Some("logged"),
                ..Alert::default()
            }),
            Event::Denied {
                command: "config",
                reason: "refused",
            },
            Event::IntegrityFailure {
                command: "get",
                reason: "integrity",
            },
            Event::Access {
                command: "get",
                outcome: Outcome::Ok,
                keys: Some(key_names([&b"invoice:42"[..]])),
            },
        ];
        for event in events {
            audit.record(who(event));
        }
        audit.record(Record::new(Event::ConfigWarning {
            warning: "server.tls is not set".into(),
        }));
        audit.record(Record::new(Event::KeyRotated {
            key_id: "k2".into(),
            previous_key_id: "k1".into(),
        }));
        audit.close().await;

        let written = lines(&path);
        let names: Vec<&str> = written
            .iter()
            .map(|l| l["event"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "auth",
                "lockout",
                "alert",
                "denied",
                "integrity_failure",
                "access",
                "config_warning",
                "key_rotated"
            ]
        );
        for line in &written[..6] {
            assert!(line["ts"].as_str().unwrap().ends_with('Z'));
            assert_eq!(line["user"], "alice");
            assert_eq!(line["project"], "billing");
            assert_eq!(line["peer"], "192.0.2.7:51000");
        }
        assert_eq!(written[0]["success"], true);
        assert_eq!(written[1]["failures"], 5);
        assert_eq!(written[2]["alert_type"], "SENSITIVE_DATA");
        assert_eq!(written[2]["patterns"][0], "password");
        assert_eq!(written[3]["command"], "config");
        assert_eq!(written[4]["reason"], "integrity");
        assert_eq!(written[5]["outcome"], "ok");
        assert_eq!(written[5]["keys"][0], "invoice:42");
        assert_eq!(written[6]["warning"], "server.tls is not set");
        assert!(written[6].get("user").is_none());
        assert_eq!(written[7]["key_id"], "k2");

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0o040, "{mode:o}");
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_records_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let metrics = Arc::new(Metrics::new());
        let audit = Audit::start_with_capacity(&settings(&path), Arc::clone(&metrics), 2).unwrap();
        // Far faster than the writer's interval: the queue holds two, and
        // unless the writer happens to collect in between, three are lost.
        for _ in 0..5 {
            audit.record(Record::new(Event::ConfigWarning {
                warning: "w".into(),
            }));
        }
        audit.close().await;
        let written = lines(&path).len();
        let text = metrics.encode();
        let dropped = text
            .lines()
            .find_map(|l| l.strip_prefix("redcloak_audit_events_dropped_total "))
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap();
        assert!(dropped >= 1, "{text}");
        assert_eq!(written + dropped, 5);
    }

    #[tokio::test]
    async fn records_reach_the_file_within_the_flush_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::start(&settings(&path), Arc::new(Metrics::new())).unwrap();
        audit.record(Record::new(Event::ConfigWarning {
            warning: "w".into(),
        }));
        tokio::time::sleep(FLUSH_INTERVAL * 5).await;
        assert_eq!(lines(&path).len(), 1);
        audit.close().await;
    }

    #[tokio::test]
    async fn reopening_after_a_rotation_writes_a_fresh_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let rotated = dir.path().join("audit.log.1");
        let audit = Audit::start(&settings(&path), Arc::new(Metrics::new())).unwrap();
        let warning = |text: &str| {
            Record::new(Event::ConfigWarning {
                warning: text.into(),
            })
        };

        audit.record(warning("before"));
        audit.flush().await;
        std::fs::rename(&path, &rotated).unwrap();
        audit.record(warning("between"));
        audit.reopen().await;
        audit.record(warning("after"));
        audit.close().await;

        let old: Vec<Value> = lines(&rotated);
        assert_eq!(old.len(), 2);
        assert_eq!(old[1]["warning"], "between");
        let new = lines(&path);
        assert_eq!(new.len(), 1);
        assert_eq!(new[0]["warning"], "after");

        audit.record(warning("after close"));
        audit.flush().await;
        assert_eq!(lines(&path).len(), 1);
    }

    #[tokio::test]
    async fn a_disabled_log_accepts_records_and_writes_nothing() {
        let disabled = AuditSettings {
            enabled: false,
            ..AuditSettings::default()
        };
        let audit = Audit::start(&disabled, Arc::new(Metrics::new())).unwrap();
        assert!(!audit.is_enabled() && !audit.access_logging());
        audit.record(Record::new(Event::ConfigWarning {
            warning: "w".into(),
        }));
        audit.flush().await;
        audit.reopen().await;
        audit.close().await;
    }

    #[test]
    fn an_unusable_path_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "").unwrap();
        let result = Audit::start(
            &settings(&blocker.join("audit.log")),
            Arc::new(Metrics::new()),
        );
        let e = result.expect_err("a file can't be a directory");
        assert!(
            e.to_string().starts_with("cannot open the audit log "),
            "{e}"
        );
    }

    #[test]
    fn logged_key_names_are_bounded() {
        let long = vec![b'k'; 2000];
        let many: Vec<&[u8]> = (0..100).map(|_| &long[..]).collect();
        let names = key_names(many);
        assert_eq!(names.len(), MAX_LOGGED_KEYS);
        assert!(names.iter().all(|n| n.len() == MAX_LOGGED_KEY_BYTES));
    }
}
