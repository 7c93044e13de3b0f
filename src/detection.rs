//! Watching what sessions do. Every login, command, refusal and value that
//! fails to open is reported to the [`Monitor`], which counts it (metrics),
//! records it (audit log), enforces lockout, and raises alerts when failed
//! logins, or one project's commands, pass their per-minute thresholds (the
//! seed document's incident detection).
//!
//! Sessions call one method per fact and never build an event themselves;
//! everything here is non-blocking except a login's lockout check, which
//! may ask the upstream when lockout counters are shared.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use foldhash::HashMap;
use tokio::time::Instant;

use crate::audit::{self, Alert, Audit, Event, Record};
use crate::auth::{Authenticator, Identity};
use crate::command::{self, CommandSpec};
use crate::config::DetectionSettings;
use crate::crypto::OpenError;
use crate::lockout::{Lockout, Pair};
use crate::metrics::{AuthOutcome, Metrics, Outcome};

/// The length of a detection window.
const WINDOW: Duration = Duration::from_secs(60);

/// Alert types, as the `alert_type` field and the `alert_type` label.
pub const SUSPICIOUS_ACTIVITY: &str = "SUSPICIOUS_ACTIVITY";
pub const HIGH_FAILED_AUTH_RATE: &str = "HIGH_FAILED_AUTH_RATE";
pub const HIGH_ACCESS_VOLUME: &str = "HIGH_ACCESS_VOLUME";

/// What a forwarded request carries until its reply arrives: when it was
/// sent, on whose behalf (a pipelined `AUTH` may change the session's user
/// before the reply comes), and its key names if they are to be logged.
#[derive(Debug)]
pub struct Tracking {
    command: &'static str,
    sent: Instant,
    identity: Option<Identity>,
    keys: Option<Vec<String>>,
}

/// The name a command is counted and audited under: the table's name, or
/// `container|subcommand` for a subcommand (`config|get`), as Redis names
/// them in `COMMAND INFO` and ACL rules.
pub fn command_name(spec: &'static CommandSpec) -> &'static str {
    static SUBCOMMANDS: OnceLock<HashMap<usize, &'static str>> = OnceLock::new();
    let names = SUBCOMMANDS.get_or_init(|| {
        command::commands()
            .flat_map(|container| {
                container.subcommands.iter().map(move |sub| {
                    // Leaked once per subcommand of the fixed table, when
                    // the first command is reported: a bounded, one-time
                    // allocation that lets labels stay `&'static str`.
                    let name: &'static str =
                        Box::leak(format!("{}|{}", container.name, sub.name).into_boxed_str());
                    (sub as *const CommandSpec as usize, name)
                })
            })
            .collect()
    });
    names
        .get(&(spec as *const CommandSpec as usize))
        .copied()
        .unwrap_or(spec.name)
}

impl Tracking {
    /// The command's name as audited.
    pub fn command(&self) -> &'static str {
        self.command
    }

    /// Who sent the request, if logged in then.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }
}

/// A count of events in the current one-minute window, updated with one
/// atomic operation: the window number in the high 32 bits, the count in
/// the low 32 (saturating).
#[derive(Debug, Default)]
struct RateWindow {
    state: AtomicU64,
}

impl RateWindow {
    /// Counts one event in window `window` and returns the window's count,
    /// this event included. An event of a later window starts it afresh.
    fn hit(&self, window: u32) -> u64 {
        self.hit_by(window, 1)
    }

    /// Counts `events` events at once, as [`RateWindow::hit`] counts one.
    fn hit_by(&self, window: u32, events: u64) -> u64 {
        let mut current = self.state.load(Ordering::Relaxed);
        loop {
            let (seen, count) = ((current >> 32) as u32, current & 0xffff_ffff);
            let count = if seen == window {
                count.saturating_add(events).min(0xffff_ffff)
            } else {
                events.min(0xffff_ffff)
            };
            let next = (u64::from(window) << 32) | count;
            match self.state.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return count,
                Err(actual) => current = actual,
            }
        }
    }
}

/// The one place sessions report to. Shared by every session.
pub struct Monitor {
    audit: Audit,
    metrics: Arc<Metrics>,
    lockout: Lockout,
    started: Instant,
    /// 0 disables the check.
    failed_auth_per_minute: u64,
    access_per_minute: u64,
    failed_auth: RateWindow,
    /// One window per project, created on its first command. Projects come
    /// from the configured users, so the map stays small.
    access: RwLock<HashMap<Arc<str>, Arc<RateWindow>>>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("audit", &self.audit)
            .field("lockout", &self.lockout)
            .field("failed_auth_per_minute", &self.failed_auth_per_minute)
            .field("access_per_minute", &self.access_per_minute)
            .finish_non_exhaustive()
    }
}

impl Monitor {
    pub fn new(
        audit: Audit,
        metrics: Arc<Metrics>,
        lockout: Lockout,
        detection: &DetectionSettings,
    ) -> Monitor {
        Monitor {
            audit,
            metrics,
            lockout,
            started: Instant::now(),
            failed_auth_per_minute: detection.failed_auth_per_minute,
            access_per_minute: detection.access_per_minute,
            failed_auth: RateWindow::default(),
            access: RwLock::new(HashMap::default()),
        }
    }

    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Checks `AUTH user password` from `peer`, with lockout: a locked-out
    /// (user, client IP) pair is refused without checking the password, so
    /// its replies can't tell a right password from a wrong one. Counts,
    /// audits and alerts as needed; returns the identity on success.
    ///
    /// Failed attempts name the user only when it is a configured one: an
    /// unknown name may be a password typed in the wrong place.
    pub async fn login(
        &self,
        auth: &Authenticator,
        peer: SocketAddr,
        user: &[u8],
        password: &[u8],
    ) -> Option<Identity> {
        let pair = Pair::new(user, peer.ip());
        let target = auth.configured(user);
        let failed = |reason| {
            Record::new(Event::Auth {
                success: false,
                method: "password",
                reason: Some(reason),
            })
            .peer(peer)
            .identity(target.as_ref())
        };

        if self.lockout.is_locked(&pair).await {
            self.metrics.authentication(AuthOutcome::LockedOut);
            self.audit.record(failed("locked_out"));
            self.count_failed_login();
            return None;
        }

        if let Some(identity) = auth.verify(user, password).await {
            self.lockout.succeeded(&pair).await;
            self.logged_in(peer, &identity, "password");
            return Some(identity);
        }

        self.metrics.authentication(AuthOutcome::Failure);
        self.audit.record(failed("wrong_credentials"));
        if let Some(failures) = self.lockout.failed(&pair).await {
            self.metrics.lockout();
            let who = |event| Record::new(event).peer(peer).identity(target.as_ref());
            self.audit.record(who(Event::Lockout {
                failures,
                lockout_secs: self.lockout.lockout_secs(),
            }));
            self.raise(who(Event::Alert(Alert {
                alert_type: SUSPICIOUS_ACTIVITY,
                severity: "high",
                count: Some(u64::from(failures)),
                action: Some("locked_out"),
                ..Alert::default()
            })));
        }
        self.count_failed_login();
        None
    }

    /// A session logged in without `AUTH`, by a verified client
    /// certificate (`method` is then `certificate`), or by `AUTH`.
    pub fn logged_in(&self, peer: SocketAddr, identity: &Identity, method: &'static str) {
        self.metrics.authentication(AuthOutcome::Success);
        self.audit.record(
            Record::new(Event::Auth {
                success: true,
                method,
                reason: None,
            })
            .peer(peer)
            .identity(Some(identity)),
        );
    }

    /// Starts tracking a request about to be sent upstream.
    pub fn track(
        &self,
        identity: Option<&Identity>,
        spec: &'static CommandSpec,
        args: &[Bytes],
    ) -> Tracking {
        let keys = self.audit.log_key_names().then(|| {
            let mut indexes = Vec::new();
            command::key_indexes(spec, args, &mut indexes);
            audit::key_names(indexes.iter().filter_map(|&i| args.get(i)).map(|k| &k[..]))
        });
        Tracking {
            command: command_name(spec),
            sent: Instant::now(),
            identity: identity.cloned(),
            keys,
        }
    }

    /// Starts tracking a request the proxy composed itself on the client's
    /// behalf (no key names are logged for it).
    pub fn track_named(&self, identity: Option<&Identity>, command: &'static str) -> Tracking {
        Tracking {
            command,
            sent: Instant::now(),
            identity: identity.cloned(),
            keys: None,
        }
    }

    /// The reply of a tracked request arrived (or will never arrive:
    /// `Outcome::Error`). Counts the command and its latency, writes the
    /// `access` event, and counts it toward its project's access volume.
    /// Sessions taking many replies at once use a [`ReplyTally`] instead.
    pub fn replied(&self, peer: SocketAddr, tracking: &Tracking, outcome: Outcome) {
        self.tally(peer).replied(tracking, outcome);
    }

    /// Starts counting a batch of replies to `peer`'s requests.
    pub fn tally(&self, peer: SocketAddr) -> ReplyTally<'_> {
        ReplyTally {
            monitor: self,
            peer,
            now: Instant::now(),
            commands: [None; TALLIED_COMMANDS],
            access: None,
        }
    }

    /// A command the proxy answered itself. Logins are not repeated here
    /// (they have their own `auth` event), nor refusals (their `denied`
    /// event was written by [`Monitor::denied`]).
    pub fn answered(
        &self,
        peer: SocketAddr,
        identity: Option<&Identity>,
        command: &'static str,
        outcome: Outcome,
    ) {
        if matches!(command, "auth" | "hello") || outcome == Outcome::Denied {
            return;
        }
        self.metrics.command(command, outcome);
        if self.audit.access_logging() && identity.is_some() {
            self.audit.record(
                Record::new(Event::Access {
                    command,
                    outcome,
                    keys: None,
                })
                .peer(peer)
                .identity(identity),
            );
        }
    }

    /// A command refused because the client may not run it. Always
    /// audited, access logging or not; `reason` is `not_authenticated`,
    /// `permission` or `refused`.
    pub fn denied(
        &self,
        peer: SocketAddr,
        identity: Option<&Identity>,
        command: &'static str,
        reason: &'static str,
    ) {
        self.metrics.command(command, Outcome::Denied);
        self.audit.record(
            Record::new(Event::Denied { command, reason })
                .peer(peer)
                .identity(identity),
        );
    }

    /// A value in the reply to `command` (the tracked request, or one
    /// queued in the tracked `EXEC`) failed to open.
    pub fn integrity_failure(
        &self,
        peer: SocketAddr,
        tracking: &Tracking,
        command: &'static str,
        error: &OpenError,
    ) {
        let reason = match error {
            OpenError::Malformed(_) => "malformed",
            OpenError::UnknownKey(_) => "unknown_key",
            OpenError::Integrity => "integrity",
            OpenError::Decompress => "decompress",
            OpenError::TooLarge { .. } => "too_large",
            OpenError::NotSealed => "not_sealed",
        };
        self.metrics.integrity_failure(reason);
        self.audit.record(
            Record::new(Event::IntegrityFailure { command, reason })
                .peer(peer)
                .identity(tracking.identity()),
        );
    }

    /// One `config_warning` event per warning, at startup.
    pub fn config_warnings(&self, warnings: &[String]) {
        for warning in warnings {
            self.audit.record(Record::new(Event::ConfigWarning {
                warning: warning.clone(),
            }));
        }
    }

    /// The running proxy now seals with `current` instead of `previous`.
    pub fn key_rotated(&self, previous: &str, current: &str) {
        self.audit.record(Record::new(Event::KeyRotated {
            key_id: current.to_owned(),
            previous_key_id: previous.to_owned(),
        }));
    }

    /// Records an alert event (whose `event` is [`Event::Alert`]) and
    /// counts it.
    pub fn raise(&self, record: Record) {
        if let Event::Alert(alert) = record.event() {
            self.metrics.alert(alert.alert_type);
        }
        self.audit.record(record);
    }

    fn window_now(&self) -> u32 {
        let minutes = self.started.elapsed().as_secs() / WINDOW.as_secs();
        u32::try_from(minutes).unwrap_or(u32::MAX)
    }

    fn count_failed_login(&self) {
        let threshold = self.failed_auth_per_minute;
        if threshold == 0 {
            return;
        }
        let count = self.failed_auth.hit(self.window_now());
        if count == threshold.saturating_add(1) {
            self.raise(Record::new(Event::Alert(Alert {
                alert_type: HIGH_FAILED_AUTH_RATE,
                severity: "high",
                count: Some(count),
                threshold: Some(threshold),
                window_secs: Some(WINDOW.as_secs()),
                ..Alert::default()
            })));
        }
    }

    /// Counts `commands` commands toward `identity`'s project's volume.
    fn count_access(&self, peer: SocketAddr, identity: &Identity, commands: u64) {
        let threshold = self.access_per_minute;
        if threshold == 0 {
            return;
        }
        let known = self
            .access
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&*identity.project)
            .cloned();
        let window = known.unwrap_or_else(|| {
            let mut windows = self.access.write().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(windows.entry(Arc::clone(&identity.project)).or_default())
        });
        let count = window.hit_by(self.window_now(), commands);
        // Once per window: when this batch took the count past the threshold.
        if count > threshold && count.saturating_sub(commands) <= threshold {
            self.raise(
                Record::new(Event::Alert(Alert {
                    alert_type: HIGH_ACCESS_VOLUME,
                    severity: "medium",
                    count: Some(count),
                    threshold: Some(threshold),
                    window_secs: Some(WINDOW.as_secs()),
                    ..Alert::default()
                }))
                .peer(peer)
                .identity(Some(identity)),
            );
        }
    }
}

/// Distinct (command, outcome) pairs a tally holds; others are counted at
/// once. A pipeline's batch rarely mixes more.
const TALLIED_COMMANDS: usize = 4;

/// Replies counted together. A session takes replies in batches (all that
/// one read from the upstream brought), and counting each command name and
/// each project's access volume once per batch, instead of once per reply,
/// spares a lock, a hash and a clock read per request. Latency and access
/// events are still recorded per reply; counts reach the metrics and the
/// detection window when the tally is dropped, microseconds later.
pub struct ReplyTally<'a> {
    monitor: &'a Monitor,
    peer: SocketAddr,
    /// When the batch arrived: its replies all came in one read.
    now: Instant,
    commands: [Option<(&'static str, Outcome, u64)>; TALLIED_COMMANDS],
    /// Commands counted for one identity's project, not yet passed on.
    access: Option<(Identity, u64)>,
}

impl ReplyTally<'_> {
    /// As [`Monitor::replied`].
    pub fn replied(&mut self, tracking: &Tracking, outcome: Outcome) {
        let monitor = self.monitor;
        let command = tracking.command;
        self.count_command(command, outcome);
        monitor
            .metrics
            .upstream_latency(self.now.saturating_duration_since(tracking.sent));
        if monitor.audit.access_logging() {
            monitor.audit.record(
                Record::new(Event::Access {
                    command,
                    outcome,
                    keys: tracking.keys.clone(),
                })
                .peer(self.peer)
                .identity(tracking.identity.as_ref()),
            );
        }
        if let Some(identity) = &tracking.identity {
            self.count_access(identity);
        }
    }

    fn count_command(&mut self, command: &'static str, outcome: Outcome) {
        let same = |entry: &Option<(&str, Outcome, u64)>| {
            entry.is_some_and(|(name, seen, _)| name == command && seen == outcome)
        };
        if let Some(Some((_, _, count))) = self.commands.iter_mut().find(|e| same(e)) {
            *count += 1;
            return;
        }
        match self.commands.iter_mut().find(|entry| entry.is_none()) {
            Some(free) => *free = Some((command, outcome, 1)),
            // Full: this one is counted at once.
            None => self.monitor.metrics.command(command, outcome),
        }
    }

    fn count_access(&mut self, identity: &Identity) {
        match &mut self.access {
            Some((counted, count)) if Arc::ptr_eq(&counted.project, &identity.project) => {
                *count += 1;
            }
            _ => {
                self.pass_on_access();
                self.access = Some((identity.clone(), 1));
            }
        }
    }

    fn pass_on_access(&mut self) {
        if let Some((identity, count)) = self.access.take() {
            self.monitor.count_access(self.peer, &identity, count);
        }
    }
}

impl Drop for ReplyTally<'_> {
    fn drop(&mut self) {
        for (command, outcome, count) in self.commands.iter_mut().filter_map(Option::take) {
            self.monitor.metrics.commands_by(command, outcome, count);
        }
        self.pass_on_access();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AuditSettings, Permission, UserSettings};
    use serde_json::Value;

    const PASSWORD: &str = "correct horse";

    fn authenticator() -> Authenticator {
        let user = UserSettings {
            name: "alice".into(),
            password_hash: crate::auth::PasswordHash::create(PASSWORD.as_bytes(), 1000).to_string(),
            project: "billing".into(),
            access: Permission::ReadWrite,
            client_cert: None,
        };
        Authenticator::new(&[user], 1).unwrap()
    }

    struct Fixture {
        monitor: Monitor,
        path: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    async fn fixture(audit: AuditSettings, detection: DetectionSettings) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let settings = AuditSettings {
            path: path.display().to_string(),
            ..audit
        };
        let metrics = Arc::new(Metrics::new());
        let audit = Audit::start(&settings, Arc::clone(&metrics)).unwrap();
        let monitor = Monitor::new(audit, metrics, Lockout::new(&settings), &detection);
        Fixture {
            monitor,
            path,
            _dir: dir,
        }
    }

    impl Fixture {
        async fn events(&self) -> Vec<Value> {
            self.monitor.audit().flush().await;
            std::fs::read_to_string(&self.path)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        }
    }

    fn peer() -> SocketAddr {
        "198.51.100.4:40000".parse().unwrap()
    }

    #[test]
    fn subcommands_are_named_with_their_container() {
        let spec = |args: &[&str]| {
            let args: Vec<Bytes> = args
                .iter()
                .map(|a| Bytes::copy_from_slice(a.as_bytes()))
                .collect();
            command::lookup(&args).unwrap()
        };
        assert_eq!(command_name(spec(&["CONFIG", "GET", "x"])), "config|get");
        assert_eq!(
            command_name(spec(&["object", "encoding", "k"])),
            "object|encoding"
        );
        assert_eq!(command_name(spec(&["GET", "k"])), "get");
    }

    #[test]
    fn a_rate_window_counts_within_a_window_and_restarts_in_the_next() {
        let window = RateWindow::default();
        assert_eq!(window.hit(0), 1);
        assert_eq!(window.hit(0), 2);
        assert_eq!(window.hit(1), 1);
        assert_eq!(window.hit(1), 2);
        assert_eq!(window.hit(7), 1);
    }

    #[tokio::test]
    async fn repeated_failures_lock_out_with_one_alert_and_refuse_the_right_password() {
        let f = fixture(
            AuditSettings {
                failed_access_threshold: 3,
                ..AuditSettings::default()
            },
            DetectionSettings::default(),
        )
        .await;
        let auth = authenticator();
        for _ in 0..4 {
            assert!(
                f.monitor
                    .login(&auth, peer(), b"alice", b"wrong")
                    .await
                    .is_none()
            );
        }
        let locked = f
            .monitor
            .login(&auth, peer(), b"alice", PASSWORD.as_bytes())
            .await;
        assert!(
            locked.is_none(),
            "the right password is refused while locked out"
        );

        let other = "198.51.100.5:40000".parse().unwrap();
        let elsewhere = f
            .monitor
            .login(&auth, other, b"alice", PASSWORD.as_bytes())
            .await;
        assert!(
            elsewhere.is_some(),
            "another client address is not locked out"
        );

        let events = f.events().await;
        let kinds: Vec<String> = events
            .iter()
            .map(|e| match e["event"].as_str().unwrap() {
                "auth" => format!("auth:{}", e["reason"].as_str().unwrap_or("ok")),
                other => other.to_owned(),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "auth:wrong_credentials",
                "auth:wrong_credentials",
                "auth:wrong_credentials",
                "lockout",
                "alert",
                "auth:locked_out",
                "auth:locked_out",
                "auth:ok",
            ]
        );
        let alert = &events[4];
        assert_eq!(alert["alert_type"], SUSPICIOUS_ACTIVITY);
        assert_eq!(alert["user"], "alice");
        assert_eq!(alert["project"], "billing");
        assert_eq!(alert["peer"], "198.51.100.4:40000");
        assert_eq!(events[3]["failures"], 3);
        let text = f.monitor.metrics().encode();
        assert!(text.contains("redcloak_lockouts_total 1"));
        assert!(text.contains("redcloak_authentications_total{outcome=\"locked_out\"} 2"));
    }

    #[tokio::test]
    async fn unknown_user_names_are_never_logged() {
        let f = fixture(AuditSettings::default(), DetectionSettings::default()).await;
        let auth = authenticator();
        // The password sent where the name goes, as a client might.
        let sent = f
            .monitor
            .login(&auth, peer(), PASSWORD.as_bytes(), b"alice")
            .await;
        assert!(sent.is_none());
        let events = f.events().await;
        assert_eq!(events.len(), 1);
        assert!(events[0].get("user").is_none());
        assert!(!events[0].to_string().contains(PASSWORD));
    }

    #[tokio::test]
    async fn a_burst_of_failed_logins_raises_one_rate_alert() {
        let f = fixture(
            AuditSettings {
                lockout_secs: 0,
                ..AuditSettings::default()
            },
            DetectionSettings {
                failed_auth_per_minute: 2,
                access_per_minute: 0,
            },
        )
        .await;
        let auth = authenticator();
        for _ in 0..5 {
            f.monitor.login(&auth, peer(), b"nobody", b"x").await;
        }
        let alerts: Vec<Value> = f
            .events()
            .await
            .into_iter()
            .filter(|e| e["event"] == "alert")
            .collect();
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0]["alert_type"], HIGH_FAILED_AUTH_RATE);
        assert_eq!(alerts[0]["count"], 3);
        assert_eq!(alerts[0]["threshold"], 2);
        assert_eq!(alerts[0]["window_secs"], 60);
    }

    /// A monitor that alerts past `threshold` commands a minute per project.
    async fn access_volume_fixture(threshold: u64) -> Fixture {
        let detection = DetectionSettings {
            failed_auth_per_minute: 0,
            access_per_minute: threshold,
        };
        fixture(AuditSettings::default(), detection).await
    }

    #[tokio::test]
    async fn a_projects_access_volume_over_the_threshold_raises_one_alert() {
        let f = access_volume_fixture(3).await;
        let identity = authenticator().configured(b"alice");
        let spec =
            command::lookup(&[Bytes::from_static(b"GET"), Bytes::from_static(b"k")]).unwrap();
        for _ in 0..6 {
            let tracking = f.monitor.track(identity.as_ref(), spec, &[]);
            f.monitor.replied(peer(), &tracking, Outcome::Ok);
        }
        let events = f.events().await;
        let alerts: Vec<&Value> = events.iter().filter(|e| e["event"] == "alert").collect();
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0]["alert_type"], HIGH_ACCESS_VOLUME);
        assert_eq!(alerts[0]["project"], "billing");
        assert_eq!(alerts[0]["count"], 4);
        let access = events.iter().filter(|e| e["event"] == "access").count();
        assert_eq!(access, 6);
        assert!(events[0].get("keys").is_none());
    }

    #[tokio::test]
    async fn a_tally_counts_every_reply_once_and_alerts_once_per_window() {
        let f = access_volume_fixture(3).await;
        let identity = authenticator().configured(b"alice");
        let spec = |name: &'static [u8]| {
            command::lookup(&[Bytes::from_static(name), Bytes::from_static(b"k")]).unwrap()
        };
        // More distinct commands than the tally holds at once, repeated.
        let names: [&'static [u8]; 6] = [b"GET", b"STRLEN", b"TTL", b"TYPE", b"EXISTS", b"GET"];
        {
            let mut tally = f.monitor.tally(peer());
            for _ in 0..2 {
                for name in names {
                    let tracking = f.monitor.track(identity.as_ref(), spec(name), &[]);
                    tally.replied(&tracking, Outcome::Ok);
                }
            }
            let tracking = f.monitor.track(identity.as_ref(), spec(b"GET"), &[]);
            tally.replied(&tracking, Outcome::Error);
        }
        let scraped = f.monitor.metrics().encode();
        for (command, outcome, count) in [
            ("get", "ok", 4),
            ("get", "error", 1),
            ("strlen", "ok", 2),
            ("ttl", "ok", 2),
            ("type", "ok", 2),
            ("exists", "ok", 2),
        ] {
            let line = format!(
                "redcloak_commands_total{{command=\"{command}\",outcome=\"{outcome}\"}} {count}\n"
            );
            assert!(scraped.contains(&line), "{line} in {scraped}");
        }

        // One later reply in the same window raises nothing more.
        let tracking = f.monitor.track(identity.as_ref(), spec(b"GET"), &[]);
        f.monitor.replied(peer(), &tracking, Outcome::Ok);
        let events = f.events().await;
        let alerts: Vec<&Value> = events.iter().filter(|e| e["event"] == "alert").collect();
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0]["alert_type"], HIGH_ACCESS_VOLUME);
        assert_eq!(alerts[0]["count"], 13);
        let access = events.iter().filter(|e| e["event"] == "access").count();
        assert_eq!(access, 14);
    }

    #[tokio::test]
    async fn key_names_are_logged_only_when_configured() {
        let f = fixture(
            AuditSettings {
                log_key_names: true,
                ..AuditSettings::default()
            },
            DetectionSettings::default(),
        )
        .await;
        let identity = authenticator().configured(b"alice");
        let args: Vec<Bytes> = ["MSET", "a", "1", "b", "2"]
            .iter()
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect();
        let spec = command::lookup(&args).unwrap();
        let tracking = f.monitor.track(identity.as_ref(), spec, &args);
        f.monitor.replied(peer(), &tracking, Outcome::Ok);
        let events = f.events().await;
        assert_eq!(events[0]["keys"], serde_json::json!(["a", "b"]));
    }

    #[tokio::test]
    async fn denials_integrity_failures_and_local_answers_are_recorded() {
        let f = fixture(AuditSettings::default(), DetectionSettings::default()).await;
        let identity = authenticator().configured(b"alice");
        f.monitor.denied(peer(), None, "get", "not_authenticated");
        f.monitor
            .denied(peer(), identity.as_ref(), "config", "refused");
        let tracking = f.monitor.track_named(identity.as_ref(), "get");
        f.monitor
            .integrity_failure(peer(), &tracking, "get", &OpenError::Integrity);
        f.monitor
            .answered(peer(), identity.as_ref(), "ping", Outcome::Ok);
        f.monitor
            .answered(peer(), identity.as_ref(), "auth", Outcome::Ok);
        f.monitor.answered(peer(), None, "quit", Outcome::Ok);

        let events = f.events().await;
        assert_eq!(events.len(), 4);
        assert_eq!(events[0]["event"], "denied");
        assert_eq!(events[0]["reason"], "not_authenticated");
        assert!(events[0].get("user").is_none());
        assert_eq!(events[1]["command"], "config");
        assert_eq!(events[1]["user"], "alice");
        assert_eq!(events[2]["event"], "integrity_failure");
        assert_eq!(events[2]["reason"], "integrity");
        assert_eq!(events[3]["event"], "access");
        assert_eq!(events[3]["command"], "ping");
        let text = f.monitor.metrics().encode();
        assert!(text.contains("redcloak_commands_total{command=\"config\",outcome=\"denied\"} 1"));
        assert!(text.contains("redcloak_integrity_failures_total{reason=\"integrity\"} 1"));
    }
}
