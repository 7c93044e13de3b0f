//! The data-leakage policy (SPEC §7, after the seed document's leakage
//! prevention): per project, the values a client writes are scanned for
//! sensitive patterns before they are sealed, and then logged, refused or
//! redacted as the project's `leakage` setting says.
//!
//! Patterns are plain substrings matched without regard to ASCII case, like
//! the seed's (`password`, `secret`, `key`, `token`, `credential`); no
//! regular expressions, so the cost of a scan is linear in the value's
//! size times the number of patterns. Alerts name the patterns found and a
//! severity, never the value.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};

use bytes::Bytes;

use crate::audit::{Alert, Event, Record};
use crate::auth::Identity;
use crate::command::{CommandSpec, ValueArgs};
use crate::config::{DEFAULT_LEAKAGE_PATTERNS, LeakagePolicy, Settings};
use crate::detection::Monitor;

/// The alert type of a leakage finding.
pub const SENSITIVE_DATA: &str = "SENSITIVE_DATA";

/// What replaces a redacted field's value.
const REDACTED: &[u8] = b"\"[REDACTED]\"";

/// Nesting deeper than this is not redacted (the value is written as it
/// is, and the finding logged), so a hostile value can't exhaust the stack.
const MAX_JSON_DEPTH: usize = 64;

/// What to do with a request after the scan.
#[derive(Debug, PartialEq, Eq)]
pub enum Screened {
    /// Forward the arguments as they are.
    Pass,
    /// Forward these arguments instead: the same, with redacted values.
    Redacted(Vec<Bytes>),
    /// Refuse the request with this error reply.
    Rejected(String),
}

/// One project's policy, with its patterns lowercased for matching.
#[derive(Debug)]
struct ProjectPolicy {
    policy: LeakagePolicy,
    /// As configured, for alerts.
    names: Vec<Arc<str>>,
    lowered: Vec<Vec<u8>>,
}

/// The policies of every project that has one; swapped whole on reload.
#[derive(Debug, Default)]
pub struct Leakage {
    projects: RwLock<Arc<HashMap<String, ProjectPolicy>>>,
}

impl Leakage {
    pub fn new(settings: &Settings) -> Leakage {
        let leakage = Leakage::default();
        leakage.reload(settings);
        leakage
    }

    /// Takes the policies of `settings`, for requests from now on.
    pub fn reload(&self, settings: &Settings) {
        let projects = settings
            .projects
            .iter()
            .filter(|(_, project)| project.leakage != LeakagePolicy::Off)
            .map(|(name, project)| {
                let names: Vec<Arc<str>> = match &project.leakage_patterns {
                    Some(patterns) => patterns.iter().map(|p| Arc::from(p.as_str())).collect(),
                    None => DEFAULT_LEAKAGE_PATTERNS
                        .iter()
                        .map(|&p| Arc::from(p))
                        .collect(),
                };
                let lowered = names
                    .iter()
                    .map(|p| p.as_bytes().to_ascii_lowercase())
                    .collect();
                let policy = ProjectPolicy {
                    policy: project.leakage,
                    names,
                    lowered,
                };
                (name.clone(), policy)
            })
            .collect();
        *self
            .projects
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(projects);
    }

    /// Scans the value arguments of a request by `identity` and applies its
    /// project's policy, reporting findings to `monitor`. Requests of
    /// projects without a policy, and commands without value arguments,
    /// pass without a scan.
    pub fn screen(
        &self,
        monitor: &Monitor,
        peer: SocketAddr,
        identity: Option<&Identity>,
        spec: &CommandSpec,
        args: &[Bytes],
    ) -> Screened {
        let Some(identity) = identity else {
            return Screened::Pass;
        };
        if matches!(spec.values, ValueArgs::None) {
            return Screened::Pass;
        }
        let projects = Arc::clone(&self.projects.read().unwrap_or_else(PoisonError::into_inner));
        let Some(project) = projects.get(&*identity.project) else {
            return Screened::Pass;
        };

        let mut redacted: Option<Vec<Bytes>> = None;
        let mut found = vec![false; project.lowered.len()];
        for i in value_indexes(spec.values, args.len()) {
            let mut value = args[i].clone();
            if project.policy == LeakagePolicy::Redact
                && let Some(changed) = redact_json(&value, &project.lowered)
            {
                value = Bytes::from(changed);
                redacted.get_or_insert_with(|| args.to_vec())[i] = value.clone();
            }
            for (hit, pattern) in found.iter_mut().zip(&project.lowered) {
                *hit = *hit || contains_ignore_case(&value, pattern);
            }
        }

        let patterns: Vec<Arc<str>> = found
            .iter()
            .zip(&project.names)
            .filter(|(hit, _)| **hit)
            .map(|(_, name)| Arc::clone(name))
            .collect();
        if patterns.is_empty() && redacted.is_none() {
            return Screened::Pass;
        }

        let action = match (project.policy, &redacted) {
            (LeakagePolicy::Reject, _) => "rejected",
            (_, Some(_)) => "redacted",
            _ => "logged",
        };
        let reply = (action == "rejected").then(|| {
            let list: Vec<&str> = patterns.iter().map(|p| &**p).collect();
            format!(
                "ERR redcloak refused to store a value that looks sensitive (patterns: {})",
                list.join(", ")
            )
        });
        monitor.raise(
            Record::new(Event::Alert(Alert {
                alert_type: SENSITIVE_DATA,
                severity: severity(patterns.len()),
                count: Some(patterns.len() as u64),
                command: Some(spec.name),
                patterns,
                action: Some(action),
                ..Alert::default()
            }))
            .peer(peer)
            .identity(Some(identity)),
        );

        match (reply, redacted) {
            (Some(text), _) => Screened::Rejected(text),
            (None, Some(args)) => Screened::Redacted(args),
            (None, None) => Screened::Pass,
        }
    }
}

/// The seed's severity: more than two patterns is `high`, any is `medium`.
fn severity(patterns: usize) -> &'static str {
    match patterns {
        0 => "low",
        1 | 2 => "medium",
        _ => "high",
    }
}

/// The indexes of the value arguments, as the command table gives them.
fn value_indexes(values: ValueArgs, len: usize) -> impl Iterator<Item = usize> {
    let (first, last, step) = match values {
        ValueArgs::Range { first, last, step } => {
            let last = if last < 0 { len as isize + last } else { last };
            (first, last, step.max(1))
        }
        ValueArgs::None => (1, 0, 1),
    };
    (first..len)
        .step_by(step)
        .take_while(move |&i| i as isize <= last)
}

/// Whether `haystack` contains `needle` (already lowercase) in any ASCII
/// case.
fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|window| window.eq_ignore_ascii_case(needle))
}

/// When `value` is a JSON object, a copy in which the value of every member
/// (at any depth) whose name matches a pattern is `"[REDACTED]"`; `None`
/// when nothing matched or the value is not a JSON object. Everything else
/// is copied byte for byte, so member order, spacing and number spelling
/// are kept.
fn redact_json(value: &[u8], patterns: &[Vec<u8>]) -> Option<Vec<u8>> {
    let mut redactor = Redactor {
        input: value,
        pos: 0,
        out: Vec::with_capacity(value.len()),
        patterns,
        redacted: 0,
    };
    redactor.skip_space();
    if redactor.peek() != Some(b'{') {
        return None;
    }
    redactor.value(0)?;
    redactor.skip_space();
    let complete = redactor.pos == value.len();
    (complete && redactor.redacted > 0).then_some(redactor.out)
}

/// A JSON reader that copies its input to `out` as it validates it
/// (RFC 8259), replacing the values of matching members.
struct Redactor<'a> {
    input: &'a [u8],
    pos: usize,
    out: Vec<u8>,
    patterns: &'a [Vec<u8>],
    redacted: usize,
}

impl Redactor<'_> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn skip_space(&mut self) {
        let start = self.pos;
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
        self.out.extend_from_slice(&self.input[start..self.pos]);
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.peek() == Some(byte)).then(|| {
            self.out.push(byte);
            self.pos += 1;
        })
    }

    fn value(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_JSON_DEPTH {
            return None;
        }
        match self.peek()? {
            b'{' => self.object(depth),
            b'[' => self.array(depth),
            b'"' => self.string().map(|_| ()),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn object(&mut self, depth: usize) -> Option<()> {
        self.expect(b'{')?;
        self.skip_space();
        if self.expect(b'}').is_some() {
            return Some(());
        }
        loop {
            let name = self.string()?;
            self.skip_space();
            self.expect(b':')?;
            self.skip_space();
            let sensitive = self.patterns.iter().any(|p| contains_ignore_case(&name, p));
            if sensitive {
                let mark = self.out.len();
                self.value(depth + 1)?;
                self.out.truncate(mark);
                self.out.extend_from_slice(REDACTED);
                self.redacted += 1;
            } else {
                self.value(depth + 1)?;
            }
            self.skip_space();
            if self.expect(b'}').is_some() {
                return Some(());
            }
            self.expect(b',')?;
            self.skip_space();
        }
    }

    fn array(&mut self, depth: usize) -> Option<()> {
        self.expect(b'[')?;
        self.skip_space();
        if self.expect(b']').is_some() {
            return Some(());
        }
        loop {
            self.value(depth + 1)?;
            self.skip_space();
            if self.expect(b']').is_some() {
                return Some(());
            }
            self.expect(b',')?;
            self.skip_space();
        }
    }

    /// Copies a string and returns its decoded bytes, so that a member
    /// name spelt with escapes (`"pass\u0077ord"`) still matches.
    fn string(&mut self) -> Option<Vec<u8>> {
        let start = self.pos;
        if self.peek() != Some(b'"') {
            return None;
        }
        self.pos += 1;
        let mut decoded = Vec::new();
        loop {
            match self.peek()? {
                b'"' => {
                    self.pos += 1;
                    break;
                }
                b'\\' => {
                    self.pos += 1;
                    let escaped = self.peek()?;
                    self.pos += 1;
                    match escaped {
                        b'"' | b'\\' | b'/' => decoded.push(escaped),
                        b'b' | b'f' | b'n' | b'r' | b't' => decoded.push(b' '),
                        b'u' => {
                            let hex = self.input.get(self.pos..self.pos + 4)?;
                            let code =
                                u32::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
                            self.pos += 4;
                            let c = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
                            decoded.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                        }
                        _ => return None,
                    }
                }
                byte if byte < 0x20 => return None,
                byte => {
                    decoded.push(byte);
                    self.pos += 1;
                }
            }
        }
        self.out.extend_from_slice(&self.input[start..self.pos]);
        Some(decoded)
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.pos + word.len();
        (self.input.get(self.pos..end)? == word).then(|| {
            self.out.extend_from_slice(word);
            self.pos = end;
        })
    }

    fn number(&mut self) -> Option<()> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        let digits = |r: &mut Self| {
            let from = r.pos;
            while r.peek().is_some_and(|b| b.is_ascii_digit()) {
                r.pos += 1;
            }
            r.pos > from
        };
        if !digits(self) {
            return None;
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if !digits(self) {
                return None;
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if !digits(self) {
                return None;
            }
        }
        self.out.extend_from_slice(&self.input[start..self.pos]);
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Audit;
    use crate::command;
    use crate::config::{AuditSettings, DetectionSettings, Permission, ProjectSettings};
    use crate::lockout::Lockout;
    use crate::metrics::Metrics;

    fn lowered(patterns: &[&str]) -> Vec<Vec<u8>> {
        patterns.iter().map(|p| p.as_bytes().to_vec()).collect()
    }

    fn redact(text: &str) -> Option<String> {
        redact_json(text.as_bytes(), &lowered(DEFAULT_LEAKAGE_PATTERNS))
            .map(|out| String::from_utf8(out).unwrap())
    }

    #[test]
    fn matching_members_are_redacted_at_any_depth_and_the_rest_is_kept_byte_for_byte() {
        assert_eq!(
            redact(r#" {"user": "ann", "Password" : "hunter2", "n": 1.50e+3} "#).as_deref(),
            Some(r#" {"user": "ann", "Password" : "[REDACTED]", "n": 1.50e+3} "#)
        );
        assert_eq!(
            redact(r#"{"a":[{"api_key":{"x":[1,2]}},null],"b":true}"#).as_deref(),
            Some(r#"{"a":[{"api_key":"[REDACTED]"},null],"b":true}"#)
        );
        assert_eq!(
            redact(r#"{"pass\u0077ord":"x"}"#).as_deref(),
            Some(r#"{"pass\u0077ord":"[REDACTED]"}"#)
        );
    }

    #[test]
    fn values_that_are_not_json_objects_or_match_nothing_are_not_redacted() {
        for text in [
            r#"{"user":"ann"}"#,
            r#"["password"]"#,
            r#""password""#,
            "password=hunter2",
            r#"{"password":"x""#,
            r#"{"password":"x"} trailing"#,
            r#"{"password":01x}"#,
            "{\"password\":\"a\nb\"}",
            "",
        ] {
            assert_eq!(redact(text), None, "{text:?}");
        }
        let nested = |depth: usize| {
            format!(
                "{}{{\"password\":1}}{}",
                "{\"a\":".repeat(depth),
                "}".repeat(depth)
            )
        };
        assert!(redact(&nested(10)).is_some());
        assert_eq!(redact(&nested(100)), None);
    }

    #[test]
    fn value_indexes_follow_the_command_table() {
        let indexes = |args: &[&str]| {
            let args: Vec<Bytes> = args
                .iter()
                .map(|a| Bytes::copy_from_slice(a.as_bytes()))
                .collect();
            let spec = command::lookup(&args).unwrap();
            value_indexes(spec.values, args.len()).collect::<Vec<_>>()
        };
        assert_eq!(indexes(&["SET", "k", "v", "EX", "10"]), [2]);
        assert_eq!(indexes(&["MSET", "a", "1", "b", "2"]), [2, 4]);
        assert_eq!(indexes(&["HSET", "h", "f1", "v1", "f2", "v2"]), [3, 5]);
        assert_eq!(indexes(&["GET", "k"]), Vec::<usize>::new());
    }

    #[test]
    fn patterns_match_in_any_ascii_case() {
        assert!(contains_ignore_case(b"my PassWord is", b"password"));
        assert!(!contains_ignore_case(b"passwor", b"password"));
        assert!(!contains_ignore_case(b"anything", b""));
        assert_eq!(severity(1), "medium");
        assert_eq!(severity(3), "high");
    }

    struct Fixture {
        leakage: Leakage,
        monitor: Monitor,
        path: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    async fn fixture(policy: LeakagePolicy, patterns: Option<&[&str]>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit_settings = AuditSettings {
            path: path.display().to_string(),
            ..AuditSettings::default()
        };
        let metrics = Arc::new(Metrics::new());
        let audit = Audit::start(&audit_settings, Arc::clone(&metrics)).unwrap();
        let monitor = Monitor::new(
            audit,
            metrics,
            Lockout::new(&audit_settings),
            &DetectionSettings::default(),
        );
        let mut settings = Settings::default();
        settings.projects.insert(
            "billing".into(),
            ProjectSettings {
                leakage: policy,
                leakage_patterns: patterns.map(|p| p.iter().map(|s| s.to_string()).collect()),
                ..ProjectSettings::default()
            },
        );
        Fixture {
            leakage: Leakage::new(&settings),
            monitor,
            path,
            _dir: dir,
        }
    }

    impl Fixture {
        fn screen(&self, project: &str, args: &[&str]) -> Screened {
            let identity = Identity {
                user: Arc::from("alice"),
                project: Arc::from(project),
                permission: Permission::ReadWrite,
            };
            let args: Vec<Bytes> = args
                .iter()
                .map(|a| Bytes::copy_from_slice(a.as_bytes()))
                .collect();
            let spec = command::lookup(&args).unwrap();
            let peer = "127.0.0.1:5000".parse().unwrap();
            self.leakage
                .screen(&self.monitor, peer, Some(&identity), spec, &args)
        }

        async fn alerts(&self) -> Vec<serde_json::Value> {
            self.monitor.audit().flush().await;
            std::fs::read_to_string(&self.path)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        }
    }

    #[tokio::test]
    async fn log_names_patterns_and_severity_but_never_the_value() {
        let f = fixture(LeakagePolicy::Log, None).await;
        let value = "token=abc123 secret=s3cr3t password=pw";
        assert_eq!(f.screen("billing", &["SET", "k", value]), Screened::Pass);
        assert_eq!(
            f.screen("billing", &["SET", "k", "harmless"]),
            Screened::Pass
        );
        assert_eq!(f.screen("shipping", &["SET", "k", value]), Screened::Pass);
        // Keys are not values: a key named "password" is not a finding.
        assert_eq!(f.screen("billing", &["GET", "password"]), Screened::Pass);

        let alerts = f.alerts().await;
        assert_eq!(alerts.len(), 1);
        let alert = &alerts[0];
        assert_eq!(alert["alert_type"], SENSITIVE_DATA);
        assert_eq!(alert["severity"], "high");
        assert_eq!(
            alert["patterns"],
            serde_json::json!(["password", "secret", "token"])
        );
        assert_eq!(alert["action"], "logged");
        assert_eq!(alert["command"], "set");
        assert_eq!(alert["project"], "billing");
        assert!(!alert.to_string().contains("abc123"));
    }

    #[tokio::test]
    async fn reject_refuses_the_request_with_the_patterns_found() {
        let f = fixture(LeakagePolicy::Reject, Some(&["IBAN"])).await;
        let Screened::Rejected(text) = f.screen("billing", &["HSET", "h", "f", "my iban: DE00"])
        else {
            panic!("expected a rejection");
        };
        assert_eq!(
            text,
            "ERR redcloak refused to store a value that looks sensitive (patterns: IBAN)"
        );
        assert_eq!(
            f.screen("billing", &["SET", "k", "password"]),
            Screened::Pass
        );
        assert_eq!(f.alerts().await[0]["action"], "rejected");
    }

    #[tokio::test]
    async fn redact_rewrites_json_values_and_logs_other_findings() {
        let f = fixture(LeakagePolicy::Redact, None).await;
        let Screened::Redacted(args) = f.screen(
            "billing",
            &["MSET", "a", r#"{"token":"t0k","id":7}"#, "b", "plain"],
        ) else {
            panic!("expected a redaction");
        };
        assert_eq!(
            args[2],
            Bytes::from_static(br#"{"token":"[REDACTED]","id":7}"#)
        );
        assert_eq!(args[4], Bytes::from_static(b"plain"));
        assert_eq!(
            f.screen("billing", &["SET", "k", "secret, but not JSON"]),
            Screened::Pass
        );

        let alerts = f.alerts().await;
        assert_eq!(alerts[0]["action"], "redacted");
        assert_eq!(alerts[0]["patterns"], serde_json::json!(["token"]));
        assert_eq!(alerts[1]["action"], "logged");
    }
}
