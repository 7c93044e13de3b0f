//! Configuration: one TOML file plus environment overrides, turned into
//! validated [`Settings`] before anything listens or connects.
//!
//! Every other module reads its settings from here and trusts them: addresses
//! parse, users are well formed, a key is configured when encryption is on.
//! This module knows nothing of sockets; it only checks that text is usable.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ::config::{Config, Environment, File, FileFormat, Value};
use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::Deserialize;
use thiserror::Error;

/// Every `password_hash` starts with this; the rest is parsed by `auth`.
pub const PASSWORD_HASH_PREFIX: &str = "$pbkdf2-sha256$";

/// Fewer PBKDF2 iterations than this in a user's hash is reported as a
/// warning (SPEC §3 asks for at least 600 000 by default).
pub const RECOMMENDED_ITERATIONS: u64 = 600_000;

/// Prefix of the generic overrides: `REDCLOAK__SECTION__FIELD`.
const ENV_PREFIX: &str = "REDCLOAK";

/// Separator between the prefix, sections and fields of a generic override.
const ENV_SEPARATOR: &str = "__";

/// Everything the proxy is configured with. Each section may be left out of
/// the file; its fields then take the defaults documented on them.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub upstream: UpstreamSettings,
    pub encryption: EncryptionSettings,
    pub audit: AuditSettings,
    pub detection: DetectionSettings,
    pub metrics: MetricsSettings,
    /// Who may `AUTH`. An empty list is valid but every client is refused,
    /// which [`Settings::warnings`] points out.
    pub users: Vec<UserSettings>,
    /// Per-project options, `[projects.<name>]`; a project without an entry
    /// uses [`ProjectSettings::default`].
    pub projects: BTreeMap<String, ProjectSettings>,
}

/// The client-facing side: listener, limits, sessions.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// `host:port` to accept clients on, an IP address or `localhost`;
    /// port 0 picks a free port. Default `127.0.0.1:6380`.
    pub listen: String,
    /// Concurrent client connections; more wait to be accepted. Default 10000.
    pub max_connections: usize,
    /// A session idle this long is closed; 0 means never. Default 3600.
    pub idle_timeout_secs: u64,
    /// Upper bound on one request, in bytes, like Redis's
    /// `proto-max-bulk-len`. Default 512 MiB; at least 1024.
    pub max_request_bytes: usize,
    /// Rewrite every key into its project's namespace. Turning this off lets
    /// projects see each other's keys. Default true.
    pub project_isolation: bool,
    /// How long in-flight requests may take to finish after `SIGTERM`.
    /// Default 10.
    pub shutdown_timeout_secs: u64,
    /// A request whose first byte has arrived must be complete within this
    /// many seconds, or the client gets an error and is closed: a client
    /// can't hold a session open by trickling a request. It must cover the
    /// slowest honest upload of `max_request_bytes`. 0 means never.
    /// Default 60.
    pub request_timeout_secs: u64,
    /// Threads that run client sessions, each with its own shared upstream
    /// links. 0 means half the CPUs, at least one. Default 0.
    pub workers: usize,
    /// TLS for clients; absent means a plaintext listener.
    pub tls: Option<ServerTls>,
}

/// Certificate and key of the client-facing TLS listener.
///
/// Validation only checks that the files exist. Whether the key matches the
/// certificate, and whether either parses, is checked by the TLS module when
/// it builds its configuration at startup and on reload.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// PEM certificate chain, leaf first. Required.
    pub cert: PathBuf,
    /// PEM private key of the leaf certificate. Required.
    pub key: PathBuf,
    /// PEM CA bundle; when present, clients must present a certificate
    /// signed by it.
    pub client_ca: Option<PathBuf>,
}

/// How the proxy reaches Redis.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamMode {
    /// One server at `upstream.address`.
    #[default]
    Single,
    /// A Redis Cluster discovered from `upstream.nodes`.
    Cluster,
}

/// The upstream side: where Redis is and how the proxy authenticates to it.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSettings {
    /// `single` (default) or `cluster`.
    pub mode: UpstreamMode,
    /// `host:port` of Redis in single mode. Default `127.0.0.1:6379`.
    pub address: String,
    /// Seed nodes, `host:port` each, in cluster mode. Default empty.
    pub nodes: Vec<String>,
    /// Redis ACL user of the proxy itself; absent means `AUTH password`.
    pub username: Option<String>,
    /// Password of the proxy's upstream user, also `REDIS_PASSWORD`.
    /// Never printed by `Debug`.
    pub password: Option<String>,
    /// Bound on establishing one upstream connection. Default 2000.
    pub connect_timeout_ms: u64,
    /// How long the upstream may owe replies without sending anything
    /// before the requests in flight get an error and the client is closed.
    /// Blocking commands (`BLPOP`, `XREAD … BLOCK`, `WAIT`, …) are exempt
    /// while they wait. 0 means never. Default 30000.
    pub request_timeout_ms: u64,
    /// Connections to Redis, per worker thread, shared by the sessions of
    /// that worker for their stateless requests, which are pipelined over
    /// them together. 0 gives every session a connection of its own.
    /// Default 1.
    pub shared_links: usize,
    /// TLS to Redis; absent means plain TCP.
    pub tls: Option<UpstreamTls>,
}

/// TLS towards Redis.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamTls {
    /// Lets `REDIS_SSL_ENABLED=false` turn TLS off without editing the
    /// section away. Default true.
    pub enabled: bool,
    /// PEM CA bundle that signs the Redis certificate; absent means the
    /// platform's trusted roots.
    pub ca: Option<PathBuf>,
    /// Client certificate for mutual TLS; needs `key`.
    pub cert: Option<PathBuf>,
    /// Private key of `cert`; needs `cert`.
    pub key: Option<PathBuf>,
    /// Name to verify the Redis certificate against; absent means the host
    /// part of the address.
    pub server_name: Option<String>,
}

/// Value sealing.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EncryptionSettings {
    /// Seal values written and open values read. Default true.
    pub enabled: bool,
    /// Keyring file (SPEC §6); must not be readable by group or others.
    pub keyring: Option<PathBuf>,
    /// A single key, base64 of 32 bytes, usually from `CACHE_ENCRYPTION_KEY`;
    /// its id is `env`. Never printed by `Debug` or in errors.
    pub key: Option<String>,
    /// Values longer than this many bytes are compressed before sealing.
    /// Default 1024.
    pub compression_threshold: usize,
    /// Rotate the keyring file (add a fresh current key) and reload it this
    /// often, in seconds; 0 means never. The keyring is also reloaded on
    /// `SIGHUP`. Default 0.
    pub rotation_interval_secs: u64,
    /// Refuse values without the sealed-value magic instead of passing them
    /// through. Default false; a project may override it.
    pub strict: bool,
}

/// The audit log and failed-login lockout.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditSettings {
    /// Write the audit log at all. Default true.
    pub enabled: bool,
    /// JSON-lines file; `-` means standard output. Default `logs/audit.log`.
    pub path: String,
    /// One event per command (name and outcome). Default true.
    pub access_logging: bool,
    /// Failed `AUTH`s per (user, client IP) that trigger a lockout. Default 5.
    pub failed_access_threshold: u32,
    /// Window in which those failures are counted, seconds. Default 300.
    pub failed_access_window_secs: u64,
    /// How long a locked-out pair is refused, seconds; 0 means never.
    /// Default 300.
    pub lockout_secs: u64,
    /// Name the keys of each command in `access` events. Key names often
    /// hold personal data (`session:alice@example.com`), so this is off by
    /// default and the audit log holds command names only.
    pub log_key_names: bool,
    /// Keep lockout counters in the upstream Redis, under reserved
    /// `redcloak:` keys no project can name, so that every replica of the
    /// proxy enforces the same lockout. Default false: each replica counts
    /// on its own.
    pub lockout_shared: bool,
}

/// Anomaly detection, as the seed document's incident detector: counts in
/// fixed one-minute windows, one `alert` event per window over a threshold.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectionSettings {
    /// Failed authentications, over every user and client, in one minute
    /// above which a `HIGH_FAILED_AUTH_RATE` alert is raised; 0 turns the
    /// check off. Default 10.
    pub failed_auth_per_minute: u64,
    /// Commands one project sends to Redis in one minute above which a
    /// `HIGH_ACCESS_VOLUME` alert is raised; 0 turns the check off.
    /// Default 1000.
    pub access_per_minute: u64,
}

/// Prometheus metrics and health check.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// `host:port` serving `/metrics` and `/healthz`; absent means off.
    /// Port 0 picks a free port, which is logged.
    pub listen: Option<String>,
}

/// One client identity. `name`, `password_hash`, `project` and `access` are
/// required.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSettings {
    /// The `AUTH` user name; unique. `default` is the user of a
    /// one-argument `AUTH`.
    pub name: String,
    /// Output of `redcloak hash-password`. Not a secret in the way a
    /// password is, but it allows offline guessing, so `Debug` hides it.
    pub password_hash: String,
    /// The project (tenant) whose namespace this user works in.
    pub project: String,
    /// What the user may do inside the project.
    pub access: Permission,
    /// A name in a client certificate (its subject common name or a subject
    /// alternative name) that logs a connection in as this user without
    /// `AUTH`. Only with `server.tls.client_ca`, which makes the proxy
    /// verify client certificates; unique among users.
    #[serde(default)]
    pub client_cert: Option<String>,
}

/// What a user may do inside its project.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// Commands that only read.
    Read,
    /// Reads and writes.
    ReadWrite,
    /// Reads, writes and the project-scoped administrative emulations
    /// (`FLUSHDB`, `DBSIZE`, ...).
    Admin,
}

impl Permission {
    /// Whether commands that write are allowed.
    pub fn can_write(self) -> bool {
        !matches!(self, Permission::Read)
    }

    /// Whether the project-scoped administrative commands are allowed.
    pub fn is_admin(self) -> bool {
        matches!(self, Permission::Admin)
    }
}

/// Options of one project, `[projects.<name>]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProjectSettings {
    /// Allow `EVAL`/`EVALSHA`/`FCALL`. A script can compute key names the
    /// proxy never sees, so this trusts the project not to leave its
    /// namespace. Default false.
    pub allow_scripts: bool,
    /// Overrides `encryption.strict` for this project when set.
    pub strict: Option<bool>,
    /// What to do with written values that look sensitive. Default `off`.
    pub leakage: LeakagePolicy,
    /// What "sensitive" means for this project: substrings matched without
    /// regard to ASCII case, in values (`log`, `reject`) or in JSON field
    /// names (`redact`). Absent means [`DEFAULT_LEAKAGE_PATTERNS`].
    pub leakage_patterns: Option<Vec<String>>,
}

/// The seed document's sensitive-data patterns, used by a project that
/// sets `leakage` without `leakage_patterns`.
pub const DEFAULT_LEAKAGE_PATTERNS: &[&str] = &["password", "secret", "key", "token", "credential"];

/// Most patterns one project may list, and the longest one, in bytes. Every
/// written value is searched for every pattern, so both bound that cost.
pub const MAX_LEAKAGE_PATTERNS: usize = 64;

/// The largest `server.max_request_bytes` accepted.
pub const MAX_REQUEST_BYTES: usize = 16 << 30;
pub const MAX_LEAKAGE_PATTERN_LEN: usize = 256;

/// The data-leakage policy of a project (SPEC §7). It applies to the value
/// arguments of commands that write, as the command table names them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeakagePolicy {
    /// Values are not scanned.
    #[default]
    Off,
    /// A value that matches is written, and an alert names the patterns
    /// found and a severity, never the value.
    Log,
    /// A value that matches is refused with an error reply (and alerted).
    Reject,
    /// In a value that is a JSON object, the values of fields whose names
    /// match become `"[REDACTED]"` before the value is sealed (and alerted).
    /// Other values that match are written as they are, and alerted.
    Redact,
}

/// How much of the protection is switched on (the seed document's levels,
/// with a TLS listener also required for `high`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SecurityLevel {
    /// Neither encryption nor project isolation.
    Minimal,
    /// Encryption or project isolation, not both.
    Low,
    /// Encryption and project isolation.
    Medium,
    /// Encryption, isolation, audit, access logging and a TLS listener.
    High,
}

impl fmt::Display for SecurityLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SecurityLevel::Minimal => "minimal",
            SecurityLevel::Low => "low",
            SecurityLevel::Medium => "medium",
            SecurityLevel::High => "high",
        })
    }
}

/// Why a configuration was refused. Messages name the file, variable or
/// field at fault and never contain a secret's value.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("cannot read {}: {reason}", .path.display())]
    Read { path: PathBuf, reason: String },

    /// The file is not valid TOML. The reason has the line and column but
    /// not the offending text, which may hold a secret.
    #[error("{}: {reason}", .path.display())]
    Syntax { path: PathBuf, reason: String },

    /// A field in the file is unknown, missing or of the wrong type.
    #[error("{}: {field}: {reason}", .path.display())]
    Field {
        path: PathBuf,
        field: String,
        reason: String,
    },

    /// An environment variable holds a value its field cannot take, or
    /// names a field that does not exist.
    #[error("environment variable {var}: {reason}")]
    Environment { var: String, reason: String },

    /// The settings parsed but are unusable or inconsistent; `path` is set
    /// when they came from [`load`].
    #[error("{}{field}: {reason}", file_prefix(.path.as_deref()))]
    Invalid {
        path: Option<PathBuf>,
        field: String,
        reason: String,
    },
}

fn file_prefix(path: Option<&Path>) -> String {
    path.map(|p| format!("{}: ", p.display()))
        .unwrap_or_default()
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: None,
        field: field.into(),
        reason: reason.into(),
    }
}

/// Reads `path`, applies overrides from `env`, deserializes and validates.
///
/// Precedence, lowest first: built-in defaults, the file, generic
/// `REDCLOAK__SECTION__FIELD` variables, then the seed document's names
/// (`CACHE_ENCRYPTION_KEY`, `REDIS_PASSWORD`, ...), so a seed name wins when
/// both forms set the same field. Seed names are matched exactly, generic
/// names without regard to case (as the `config` crate does), and an empty
/// variable counts as unset. Generic variables reach table fields only
/// (`users` is set in the file); a map key in a generic variable, such as a
/// project name, arrives lowercased.
///
/// `env` is passed in so that tests need not touch the process environment;
/// `main` passes [`process_env`].
pub fn load(path: &Path, env: &HashMap<String, String>) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;

    // Values stay text until deserialization converts them to the type the
    // field wants, so a password such as "007" keeps its leading zeros
    // (`try_parsing` would have made it the integer 7). List fields, which
    // that conversion cannot produce from text, are split here instead.
    let (lists, scalars): (HashMap<_, _>, HashMap<_, _>) = env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .partition(|(k, v)| !v.is_empty() && generic_key(k).is_some_and(|key| is_list_field(&key)));
    let generic = Environment::with_prefix(ENV_PREFIX)
        .prefix_separator(ENV_SEPARATOR)
        .separator(ENV_SEPARATOR)
        .ignore_empty(true)
        .try_parsing(false)
        .source(Some(scalars));
    let mut builder = Config::builder()
        .add_source(File::from_str(&text, FileFormat::Toml))
        .add_source(generic);
    let mut list_overrides: Vec<_> = lists.into_iter().collect();
    list_overrides.sort();
    for (var, raw) in list_overrides {
        let key = generic_key(&var).unwrap_or_default();
        let items: Vec<String> = raw
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::to_owned)
            .collect();
        builder = builder
            .set_override(key, items)
            .map_err(|e| ConfigError::Environment {
                var: var.clone(),
                reason: e.to_string(),
            })?;
    }
    for (var, key, value) in seed_overrides(env)? {
        builder = builder
            .set_override(key, value)
            .map_err(|e| ConfigError::Environment {
                var: var.to_owned(),
                reason: e.to_string(),
            })?;
    }

    let settings = builder
        .build()
        .and_then(Config::try_deserialize::<Settings>)
        .map_err(|e| deserialize_error(path, env, e))?;

    settings.validate().map_err(|e| match e {
        ConfigError::Invalid { field, reason, .. } => ConfigError::Invalid {
            path: Some(path.to_path_buf()),
            field,
            reason,
        },
        other => other,
    })?;
    Ok(settings)
}

/// The process environment as [`load`] wants it. Unlike
/// `std::env::vars()`, a variable whose name or value is not UTF-8 is
/// skipped instead of panicking; none of ours can be such a variable.
pub fn process_env() -> HashMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// Fields that hold a list; a generic variable sets them as
/// comma-separated text, e.g. `REDCLOAK__UPSTREAM__NODES=a:7000,b:7000`.
const LIST_FIELDS: &[&str] = &["upstream.nodes"];

/// Whether the dotted `key` is a list field: one of [`LIST_FIELDS`], or a
/// project's `leakage_patterns`.
fn is_list_field(key: &str) -> bool {
    LIST_FIELDS.contains(&key)
        || key
            .strip_prefix("projects.")
            .and_then(|rest| rest.strip_suffix(".leakage_patterns"))
            .is_some_and(|name| !name.is_empty() && !name.contains('.'))
}

/// The dotted field a generic variable sets (`REDCLOAK__SERVER__TLS__CERT`
/// sets `server.tls.cert`), or `None` for any other variable.
fn generic_key(var: &str) -> Option<String> {
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
    let head = var.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(&prefix) {
        return None;
    }
    let rest = var.get(prefix.len()..)?.to_ascii_lowercase();
    Some(rest.replace(ENV_SEPARATOR, "."))
}

/// The type a seed variable's value must have.
#[derive(Clone, Copy)]
enum SeedKind {
    Bool,
    U32,
    U64,
    Text,
}

/// The seed document's variables and the fields they set. Kept as an
/// aligned table because it is data; rustfmt would scatter it.
#[rustfmt::skip]
const SEED_VARIABLES: &[(&str, &str, SeedKind)] = &[
    ("CACHE_ENCRYPTION_ENABLED",         "encryption.enabled",                SeedKind::Bool),
    ("CACHE_ENCRYPTION_KEY",             "encryption.key",                    SeedKind::Text),
    ("ENCRYPTION_KEY_STORE_PATH",        "encryption.keyring",                SeedKind::Text),
    ("ENCRYPTION_KEY_ROTATION_INTERVAL", "encryption.rotation_interval_secs", SeedKind::U64),
    ("REDIS_PASSWORD",                   "upstream.password",                 SeedKind::Text),
    ("REDIS_SSL_ENABLED",                "upstream.tls.enabled",              SeedKind::Bool),
    ("REDIS_SSL_CERT_PATH",              "upstream.tls.cert",                 SeedKind::Text),
    ("REDIS_SSL_KEY_PATH",               "upstream.tls.key",                  SeedKind::Text),
    ("REDIS_SSL_CA_CERT_PATH",           "upstream.tls.ca",                   SeedKind::Text),
    ("CACHE_PROJECT_ISOLATION",          "server.project_isolation",          SeedKind::Bool),
    ("CACHE_SESSION_TIMEOUT",            "server.idle_timeout_secs",          SeedKind::U64),
    ("CACHE_ACCESS_LOGGING",             "audit.access_logging",              SeedKind::Bool),
    ("SECURITY_AUDIT_ENABLED",           "audit.enabled",                     SeedKind::Bool),
    ("SECURITY_AUDIT_LOG_PATH",          "audit.path",                        SeedKind::Text),
    ("FAILED_ACCESS_THRESHOLD",          "audit.failed_access_threshold",     SeedKind::U32),
    ("FAILED_ACCESS_WINDOW",             "audit.failed_access_window_secs",   SeedKind::U64),
];

/// Parses the seed variables present in `env` into typed values, so that a
/// bad value is reported under the variable's own name. Setting any
/// `REDIS_SSL_*` creates `[upstream.tls]` with its defaults.
fn seed_overrides(
    env: &HashMap<String, String>,
) -> Result<Vec<(&'static str, &'static str, Value)>, ConfigError> {
    let mut overrides = Vec::new();
    for &(var, key, kind) in SEED_VARIABLES {
        let Some(raw) = lookup(env, var) else {
            continue;
        };
        let bad = |expected: &str| ConfigError::Environment {
            var: var.to_owned(),
            reason: format!("expected {expected}"),
        };

        let value = match kind {
            SeedKind::Bool => Value::from(parse_bool(raw).ok_or_else(|| bad("true or false"))?),
            SeedKind::U32 => Value::from(
                raw.trim()
                    .parse::<u32>()
                    .map_err(|_| bad("a whole number from 0 to 4294967295"))?,
            ),
            SeedKind::U64 => Value::from(
                raw.trim()
                    .parse::<u64>()
                    .map_err(|_| bad("a whole number of seconds"))?,
            ),
            SeedKind::Text => Value::from(raw.to_owned()),
        };
        overrides.push((var, key, value));
    }
    Ok(overrides)
}

/// The value of `name` in `env`, treating an empty value as unset.
fn lookup<'a>(env: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    env.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

fn parse_bool(raw: &str) -> Option<bool> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Turns a `config` crate error into ours: TOML syntax errors lose their
/// source excerpt, type errors lose the offending value, and an error in a
/// field set by a generic variable names that variable.
fn deserialize_error(
    path: &Path,
    env: &HashMap<String, String>,
    error: ::config::ConfigError,
) -> ConfigError {
    if let ::config::ConfigError::FileParse { cause, .. } = &error {
        return ConfigError::Syntax {
            path: path.to_path_buf(),
            reason: toml_reason(&cause.to_string()),
        };
    }

    let (key, mut reason) = flatten(error);
    let mut field = normalize_key(&key.unwrap_or_default());
    reason = enum_reason(&field, reason);
    if let Some(rest) = reason.strip_prefix("unknown field `") {
        if let Some((name, expected)) = rest.split_once('`') {
            field = join_key(&field, name);
            let expected = expected.trim_start_matches(',').trim();
            reason = format!("unknown field ({expected})");
        }
    } else if let Some(rest) = reason.strip_prefix("missing field `") {
        let name = rest.trim_end_matches('`');
        field = join_key(&field, name);
        reason = "is required".to_owned();
    }

    match generic_variable(env, &field) {
        Some(var) => ConfigError::Environment {
            var,
            reason: format!("{field}: {reason}"),
        },
        None if field.is_empty() => ConfigError::Syntax {
            path: path.to_path_buf(),
            reason,
        },
        None => ConfigError::Field {
            path: path.to_path_buf(),
            field,
            reason,
        },
    }
}

/// Digs the key and a value-free reason out of nested `config` errors.
fn flatten(error: ::config::ConfigError) -> (Option<String>, String) {
    match error {
        ::config::ConfigError::Type {
            unexpected,
            expected,
            key,
            ..
        } => (
            key,
            format!(
                "expected {expected}, found {}",
                kind_of(&unexpected.to_string())
            ),
        ),
        ::config::ConfigError::At { error, key, .. } => {
            let (inner_key, reason) = flatten(*error);
            (key.or(inner_key), reason)
        }
        ::config::ConfigError::NotFound(key) => (Some(key), "is required".to_owned()),
        ::config::ConfigError::Message(message) => (None, without_value(message)),
        other => (None, other.to_string()),
    }
}

/// Serde's "invalid type: string \"...\", expected ..." quotes the value,
/// which may be a secret in the wrong place; this keeps only its kind.
fn without_value(message: String) -> String {
    let rest = ["invalid type: ", "invalid value: "]
        .iter()
        .find_map(|start| message.strip_prefix(start));
    let Some((found, expected)) = rest.and_then(|r| r.rsplit_once(", expected ")) else {
        return message;
    };
    let expected = if expected.starts_with("struct ") || expected.starts_with("map") {
        "a table"
    } else {
        expected
    };
    format!("expected {expected}, found {}", kind_of(found))
}

/// Describes a value by its kind only, since it may be a secret that
/// landed in the wrong place. `config` does not export its `Unexpected`
/// type, so the kind is read from the start of its description.
fn kind_of(unexpected: &str) -> &'static str {
    let kinds = [
        ("string", "a string"),
        ("boolean", "a boolean"),
        ("floating", "a floating-point number"),
        ("unit", "an empty value"),
        ("sequence", "an array"),
        ("map", "a table"),
    ];
    if let Some((_, kind)) = kinds
        .iter()
        .find(|(start, _)| unexpected.starts_with(start))
    {
        kind
    } else if unexpected.contains('-') {
        "a negative integer"
    } else {
        "an integer"
    }
}

fn join_key(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}.{name}")
    }
}

/// The generic variable that set `field` or a field inside it; without
/// one, the error is blamed on the file.
fn generic_variable(env: &HashMap<String, String>, field: &str) -> Option<String> {
    let inside = format!("{field}.");
    let mut candidates: Vec<(&String, String)> = env
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .filter_map(|(k, _)| Some((k, generic_key(k)?)))
        .filter(|(_, key)| key == field || key.starts_with(&inside))
        .collect();
    candidates.sort_by_key(|(_, key)| (key != field, key.clone()));
    candidates.first().map(|(var, _)| (*var).clone())
}

/// `config` writes a field inside an array element as `users[0]name`; this
/// puts the dot back: `users[0].name`.
fn normalize_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    let mut chars = key.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == ']' && chars.peek().is_some_and(|&n| n != '[' && n != '.') {
            out.push('.');
        }
    }
    out
}

/// Rewrites `config`'s message for an unknown enum value and lists the
/// values the field takes.
fn enum_reason(field: &str, reason: String) -> String {
    let Some((_, value)) = reason.split_once("does not have variant constructor ") else {
        return reason;
    };
    let allowed = if field.ends_with(".access") {
        "\"read\", \"readwrite\" or \"admin\""
    } else if field == "upstream.mode" {
        "\"single\" or \"cluster\""
    } else if field.ends_with(".leakage") {
        "\"off\", \"log\", \"reject\" or \"redact\""
    } else {
        return format!("{value:?} is not an allowed value");
    };
    format!("{value:?} is not an allowed value; expected {allowed}")
}

/// Keeps the location and message of a TOML error and drops the excerpt
/// of the file that the parser quotes, which may contain a secret.
fn toml_reason(message: &str) -> String {
    let mut lines = message.lines();
    let location = lines
        .next()
        .unwrap_or_default()
        .trim()
        .trim_start_matches("TOML parse error at ")
        .to_owned();
    let what: Vec<&str> = lines
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains('|'))
        .collect();
    format!("invalid TOML at {location}: {}", what.join("; "))
}

impl Settings {
    /// Checks what deserialization cannot: addresses, users, limits, keys
    /// and file permissions. Returns the first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_durations()?;
        self.validate_server()?;
        self.validate_upstream()?;
        self.validate_encryption()?;
        self.validate_audit()?;
        if let Some(listen) = &self.metrics.listen {
            check_address(listen, true, true).map_err(|r| invalid("metrics.listen", r))?;
        }
        self.validate_projects()?;
        self.validate_users()
    }

    fn validate_projects(&self) -> Result<(), ConfigError> {
        for (name, project) in &self.projects {
            let Some(patterns) = &project.leakage_patterns else {
                continue;
            };
            let field = format!("projects.{name}.leakage_patterns");
            if patterns.len() > MAX_LEAKAGE_PATTERNS {
                return Err(invalid(
                    field,
                    format!(
                        "has {} patterns; at most {MAX_LEAKAGE_PATTERNS} are allowed",
                        patterns.len()
                    ),
                ));
            }
            for (i, pattern) in patterns.iter().enumerate() {
                if pattern.is_empty() {
                    return Err(invalid(format!("{field}[{i}]"), "must not be empty"));
                }
                if pattern.len() > MAX_LEAKAGE_PATTERN_LEN {
                    return Err(invalid(
                        format!("{field}[{i}]"),
                        format!("must be at most {MAX_LEAKAGE_PATTERN_LEN} bytes"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every duration at most ten years: a deadline that far away means
    /// never, and a larger one would not fit the clock's arithmetic.
    fn validate_durations(&self) -> Result<(), ConfigError> {
        const MAX_SECS: u64 = 10 * 365 * 24 * 3600;
        let seconds = [
            ("server.idle_timeout_secs", self.server.idle_timeout_secs),
            (
                "server.shutdown_timeout_secs",
                self.server.shutdown_timeout_secs,
            ),
            (
                "server.request_timeout_secs",
                self.server.request_timeout_secs,
            ),
            (
                "encryption.rotation_interval_secs",
                self.encryption.rotation_interval_secs,
            ),
            (
                "audit.failed_access_window_secs",
                self.audit.failed_access_window_secs,
            ),
            ("audit.lockout_secs", self.audit.lockout_secs),
        ];
        let milliseconds = [
            (
                "upstream.connect_timeout_ms",
                self.upstream.connect_timeout_ms,
            ),
            (
                "upstream.request_timeout_ms",
                self.upstream.request_timeout_ms,
            ),
        ];
        for (field, secs) in seconds {
            if secs > MAX_SECS {
                return Err(invalid(
                    field,
                    format!("must be at most {MAX_SECS} (ten years)"),
                ));
            }
        }
        for (field, millis) in milliseconds {
            if millis > MAX_SECS * 1000 {
                return Err(invalid(
                    field,
                    format!("must be at most {} (ten years)", MAX_SECS * 1000),
                ));
            }
        }
        Ok(())
    }

    fn validate_server(&self) -> Result<(), ConfigError> {
        let server = &self.server;
        check_address(&server.listen, false, true).map_err(|r| invalid("server.listen", r))?;
        if server.max_connections < 1 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        if server.workers > 256 {
            return Err(invalid("server.workers", "must be at most 256"));
        }
        if server.max_request_bytes < 1024 {
            return Err(invalid("server.max_request_bytes", "must be at least 1024"));
        }
        // Far above anything Redis accepts (its own bulk limit is 512 MiB
        // by default), and small enough for the size arithmetic of frames.
        if server.max_request_bytes > MAX_REQUEST_BYTES {
            return Err(invalid(
                "server.max_request_bytes",
                format!("must be at most {MAX_REQUEST_BYTES} (16 GiB)"),
            ));
        }

        if let Some(tls) = &server.tls {
            check_file("server.tls.cert", &tls.cert)?;
            check_file("server.tls.key", &tls.key)?;
            if let Some(ca) = &tls.client_ca {
                check_file("server.tls.client_ca", ca)?;
            }
        }
        Ok(())
    }

    fn validate_upstream(&self) -> Result<(), ConfigError> {
        let upstream = &self.upstream;
        match upstream.mode {
            UpstreamMode::Single => {
                if upstream.address.trim().is_empty() {
                    return Err(invalid("upstream.address", "must be set in single mode"));
                }
                check_address(&upstream.address, true, false)
                    .map_err(|r| invalid("upstream.address", r))?;
                if !upstream.nodes.is_empty() {
                    return Err(invalid(
                        "upstream.nodes",
                        "is only used in cluster mode: set upstream.mode = \"cluster\" \
                         or remove the nodes",
                    ));
                }
            }
            UpstreamMode::Cluster => {
                if upstream.nodes.is_empty() {
                    return Err(invalid(
                        "upstream.nodes",
                        "cluster mode needs at least one seed node",
                    ));
                }
                for (i, node) in upstream.nodes.iter().enumerate() {
                    check_address(node, true, false)
                        .map_err(|r| invalid(format!("upstream.nodes[{i}]"), r))?;
                }
                // The shared links are what route each request to its node.
                if upstream.shared_links == 0 {
                    return Err(invalid(
                        "upstream.shared_links",
                        "must be at least 1 in cluster mode: the shared links route \
                         requests to the cluster's nodes",
                    ));
                }
            }
        }

        if upstream.username.is_some() && upstream.password.is_none() {
            return Err(invalid(
                "upstream.username",
                "needs upstream.password (or REDIS_PASSWORD): Redis ACL users authenticate \
                 with both",
            ));
        }
        if upstream.connect_timeout_ms < 1 {
            return Err(invalid("upstream.connect_timeout_ms", "must be at least 1"));
        }
        if upstream.shared_links > 64 {
            return Err(invalid("upstream.shared_links", "must be at most 64"));
        }

        let Some(tls) = upstream.tls.as_ref().filter(|t| t.enabled) else {
            return Ok(());
        };
        match (&tls.cert, &tls.key) {
            (Some(_), None) => {
                return Err(invalid(
                    "upstream.tls.key",
                    "must be set together with upstream.tls.cert",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "upstream.tls.cert",
                    "must be set together with upstream.tls.key",
                ));
            }
            _ => {}
        }
        for (field, file) in [
            ("upstream.tls.ca", &tls.ca),
            ("upstream.tls.cert", &tls.cert),
            ("upstream.tls.key", &tls.key),
        ] {
            if let Some(file) = file {
                check_file(field, file)?;
            }
        }
        Ok(())
    }

    fn validate_encryption(&self) -> Result<(), ConfigError> {
        let encryption = &self.encryption;
        if encryption.key.is_some() && encryption.keyring.is_some() {
            return Err(invalid(
                "encryption.key",
                "set either encryption.keyring or encryption.key (CACHE_ENCRYPTION_KEY), \
                 not both",
            ));
        }
        encryption.decoded_key()?;
        if let Some(keyring) = &encryption.keyring {
            check_keyring_mode(keyring)?;
        }

        if encryption.enabled && encryption.keyring.is_none() && encryption.key.is_none() {
            return Err(invalid(
                "encryption.enabled",
                "encryption is enabled but no key is configured: set encryption.keyring \
                 or CACHE_ENCRYPTION_KEY",
            ));
        }
        Ok(())
    }

    fn validate_audit(&self) -> Result<(), ConfigError> {
        let audit = &self.audit;
        if audit.enabled && audit.path.trim().is_empty() {
            return Err(invalid(
                "audit.path",
                "must not be empty while audit is enabled (\"-\" means standard output)",
            ));
        }
        if audit.failed_access_threshold < 1 {
            return Err(invalid(
                "audit.failed_access_threshold",
                "must be at least 1",
            ));
        }
        if audit.failed_access_window_secs < 1 {
            return Err(invalid(
                "audit.failed_access_window_secs",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    fn validate_users(&self) -> Result<(), ConfigError> {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut certificates: HashMap<&str, usize> = HashMap::new();
        let verifies_clients = self
            .server
            .tls
            .as_ref()
            .is_some_and(|tls| tls.client_ca.is_some());
        for (i, user) in self.users.iter().enumerate() {
            if let Some(cert) = user.client_cert.as_deref() {
                let field = format!("users[{i}].client_cert");
                if cert.is_empty() {
                    return Err(invalid(field, "must not be empty"));
                }
                if !verifies_clients {
                    return Err(invalid(
                        field,
                        "needs server.tls.client_ca, so that client certificates are verified",
                    ));
                }
                if let Some(first) = certificates.insert(cert, i) {
                    return Err(invalid(
                        field,
                        format!("{cert:?} already logs in users[{first}]"),
                    ));
                }
            }
            if user.name.is_empty() {
                return Err(invalid(format!("users[{i}].name"), "must not be empty"));
            }
            if let Some(first) = seen.insert(&user.name, i) {
                return Err(invalid(
                    format!("users[{i}].name"),
                    format!("{:?} is already the name of users[{first}]", user.name),
                ));
            }
            if user.project.is_empty() {
                return Err(invalid(format!("users[{i}].project"), "must not be empty"));
            }
            if !user.password_hash.starts_with(PASSWORD_HASH_PREFIX) {
                return Err(invalid(
                    format!("users[{i}].password_hash"),
                    format!(
                        "must start with {PASSWORD_HASH_PREFIX} \
                         (make one with `redcloak hash-password`)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The seed document's levels: encryption and isolation decide `medium`
    /// and `low`; `high` also needs audit, access logging and a TLS
    /// listener.
    pub fn security_level(&self) -> SecurityLevel {
        let encryption = self.encryption.enabled;
        let isolation = self.server.project_isolation;
        let observed = self.audit.enabled && self.audit.access_logging;
        let tls = self.server.tls.is_some();
        match (encryption, isolation) {
            (true, true) if observed && tls => SecurityLevel::High,
            (true, true) => SecurityLevel::Medium,
            (true, false) | (false, true) => SecurityLevel::Low,
            (false, false) => SecurityLevel::Minimal,
        }
    }

    /// One plain sentence per weakened setting, for the startup log and
    /// `check-config`. Empty when nothing is weakened.
    pub fn warnings(&self) -> Vec<String> {
        let (server, audit) = (&self.server, &self.audit);
        let switches = [
            (
                server.tls.is_none(),
                "server.tls is not set: clients connect in plaintext, so their passwords \
                 and values cross the network unencrypted",
            ),
            (
                !self.encryption.enabled,
                "encryption.enabled is false: values are stored in Redis in plaintext",
            ),
            (
                !server.project_isolation,
                "server.project_isolation is false: keys are not namespaced, so projects \
                 can read and overwrite each other's keys",
            ),
            (
                !audit.access_logging,
                "audit.access_logging is false: commands are not recorded in the audit log",
            ),
            (
                !audit.enabled,
                "audit.enabled is false: authentication failures, lockouts and alerts are \
                 not recorded",
            ),
            (
                server.idle_timeout_secs == 0,
                "server.idle_timeout_secs is 0: idle sessions are never closed",
            ),
            (
                audit.lockout_secs == 0,
                "audit.lockout_secs is 0: repeated failed logins never lock a user out",
            ),
            (
                self.upstream.password.is_none(),
                "upstream.password is not set: the proxy does not authenticate to Redis, \
                 so anyone who can reach Redis can bypass the proxy",
            ),
            (
                self.users.is_empty(),
                "no users are configured: every client will be refused at AUTH",
            ),
            (
                audit.enabled && audit.log_key_names,
                "audit.log_key_names is true: key names, which may hold personal data, \
                 are written to the audit log",
            ),
            (
                self.detection.failed_auth_per_minute == 0,
                "detection.failed_auth_per_minute is 0: bursts of failed logins raise no alert",
            ),
            (
                self.detection.access_per_minute == 0,
                "detection.access_per_minute is 0: unusual access volume raises no alert",
            ),
            (
                audit.lockout_shared && !server.project_isolation,
                "audit.lockout_shared is true while server.project_isolation is false: \
                 clients can name, and so delete, the shared lockout counters",
            ),
        ];
        let mut out: Vec<String> = switches
            .iter()
            .filter(|(weakened, _)| *weakened)
            .map(|(_, sentence)| (*sentence).to_owned())
            .collect();

        if !self.upstream.tls.as_ref().is_some_and(|t| t.enabled) {
            for address in self.upstream_addresses().filter(|a| !is_loopback(a)) {
                out.push(format!(
                    "upstream {address} is reached without TLS: commands, key names and \
                     the proxy's credentials cross the network in plaintext"
                ));
            }
        }

        for (i, user) in self.users.iter().enumerate() {
            let iterations = hash_iterations(&user.password_hash);
            if let Some(n) = iterations.filter(|&n| n < RECOMMENDED_ITERATIONS) {
                out.push(format!(
                    "users[{i}] ({}): the password hash uses {n} PBKDF2 iterations, fewer \
                     than the recommended {RECOMMENDED_ITERATIONS}",
                    user.name
                ));
            }
        }

        for (name, project) in &self.projects {
            if !self.users.iter().any(|u| &u.project == name) {
                out.push(format!(
                    "projects.{name}: no user belongs to this project, so the entry has \
                     no effect"
                ));
            }
            if project.allow_scripts {
                out.push(format!(
                    "projects.{name}.allow_scripts is true: its scripts can reach keys \
                     outside the project's namespace, so the project is trusted"
                ));
            }
        }
        out
    }

    /// The options of `project`, or the defaults when it has no entry.
    pub fn project(&self, project: &str) -> ProjectSettings {
        self.projects.get(project).cloned().unwrap_or_default()
    }

    /// Whether unsealed values are refused in `project`: its own `strict`
    /// when set, otherwise `encryption.strict`.
    pub fn strict_for(&self, project: &str) -> bool {
        self.project(project)
            .strict
            .unwrap_or(self.encryption.strict)
    }

    fn upstream_addresses(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match self.upstream.mode {
            UpstreamMode::Single => Box::new(std::iter::once(self.upstream.address.as_str())),
            UpstreamMode::Cluster => Box::new(self.upstream.nodes.iter().map(String::as_str)),
        }
    }
}

impl EncryptionSettings {
    /// The configured single key, decoded. Standard base64, padded or not,
    /// surrounding whitespace ignored. Errors never include the value.
    pub fn decoded_key(&self) -> Result<Option<[u8; 32]>, ConfigError> {
        let Some(text) = &self.key else {
            return Ok(None);
        };
        let engine = GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
        );
        let bytes = engine.decode(text.trim()).map_err(|_| {
            invalid(
                "encryption.key",
                "is not valid base64 (the value is not shown)",
            )
        })?;
        let key: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            invalid(
                "encryption.key",
                format!("must decode to exactly 32 bytes, not {}", b.len()),
            )
        })?;
        Ok(Some(key))
    }
}

/// Parses the `i=` parameter of a `$pbkdf2-sha256$i=N$salt$hash` string;
/// `None` when it is absent or malformed, which `auth` reports.
fn hash_iterations(hash: &str) -> Option<u64> {
    hash.strip_prefix(PASSWORD_HASH_PREFIX)?
        .split('$')
        .next()?
        .strip_prefix("i=")?
        .parse()
        .ok()
}

/// Checks `host:port`. The host is an IP address (IPv6 in brackets),
/// `localhost`, or, with `hostname`, a DNS name; port 0 only with `port_zero`.
fn check_address(value: &str, hostname: bool, port_zero: bool) -> Result<(), String> {
    let example = "e.g. 127.0.0.1:6379";
    let (host, port) = match value.parse::<SocketAddr>() {
        Ok(addr) => (None, addr.port()),
        Err(_) => {
            let (host, port) = value
                .rsplit_once(':')
                .ok_or_else(|| format!("{value:?} must be host:port, {example}"))?;
            let port = port
                .parse::<u16>()
                .map_err(|_| format!("{value:?} has no valid port, {example}"))?;
            (Some(host), port)
        }
    };
    if port == 0 && !port_zero {
        return Err(format!("{value:?}: port 0 is not allowed here"));
    }

    let Some(host) = host else {
        return Ok(());
    };
    if host.contains(':') || host.starts_with('[') {
        return Err(format!(
            "{value:?}: an IPv6 address must be written in brackets, e.g. [::1]:6379"
        ));
    }
    if host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if !hostname {
        return Err(format!(
            "{value:?}: the host must be an IP address or localhost, e.g. 127.0.0.1:6380"
        ));
    }
    if is_dns_name(host) {
        Ok(())
    } else {
        Err(format!("{value:?}: {host:?} is not a valid host name"))
    }
}

fn is_dns_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Whether an already validated `host:port` names this machine.
fn is_loopback(address: &str) -> bool {
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return addr.ip().is_loopback();
    }
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Relative paths are resolved against the working directory, as the
/// proxy resolves them when it opens the file.
fn check_file(field: &str, path: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(invalid(field, format!("{} is not a file", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(invalid(field, format!("{} does not exist", path.display())))
        }
        Err(e) => Err(invalid(
            field,
            format!("cannot use {}: {e}", path.display()),
        )),
    }
}

/// A keyring readable or writable by group or others is refused, as SSH
/// refuses a private key with loose permissions. A missing file passes:
/// `redcloak keys generate` creates it, and loading it reports its absence.
#[cfg(unix)]
fn check_keyring_mode(path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt as _;

    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(invalid(
                "encryption.keyring",
                format!("cannot check the permissions of {}: {e}", path.display()),
            ));
        }
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(invalid(
            "encryption.keyring",
            format!(
                "{} has mode {mode:04o}; it must not be readable or writable by group or \
                 others (chmod 600 it)",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Permission bits do not exist outside Unix; the keyring's access control
/// is then left to the platform.
#[cfg(not(unix))]
fn check_keyring_mode(_path: &Path) -> Result<(), ConfigError> {
    Ok(())
}

/// Shown in place of a secret by the `Debug` impls below.
struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

fn redact<T>(secret: &Option<T>) -> Option<Redacted> {
    secret.as_ref().map(|_| Redacted)
}

impl fmt::Debug for UpstreamSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamSettings")
            .field("mode", &self.mode)
            .field("address", &self.address)
            .field("nodes", &self.nodes)
            .field("username", &self.username)
            .field("password", &redact(&self.password))
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("shared_links", &self.shared_links)
            .field("tls", &self.tls)
            .finish()
    }
}

impl fmt::Debug for EncryptionSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptionSettings")
            .field("enabled", &self.enabled)
            .field("keyring", &self.keyring)
            .field("key", &redact(&self.key))
            .field("compression_threshold", &self.compression_threshold)
            .field("rotation_interval_secs", &self.rotation_interval_secs)
            .field("strict", &self.strict)
            .finish()
    }
}

impl fmt::Debug for UserSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserSettings")
            .field("name", &self.name)
            .field("password_hash", &Redacted)
            .field("project", &self.project)
            .field("access", &self.access)
            .field("client_cert", &self.client_cert)
            .finish()
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: "127.0.0.1:6380".to_owned(),
            max_connections: 10_000,
            idle_timeout_secs: 3600,
            max_request_bytes: 512 * 1024 * 1024,
            project_isolation: true,
            shutdown_timeout_secs: 10,
            request_timeout_secs: 60,
            workers: 0,
            tls: None,
        }
    }
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        UpstreamSettings {
            mode: UpstreamMode::Single,
            address: "127.0.0.1:6379".to_owned(),
            nodes: Vec::new(),
            username: None,
            password: None,
            connect_timeout_ms: 2000,
            request_timeout_ms: 30_000,
            shared_links: 1,
            tls: None,
        }
    }
}

impl Default for UpstreamTls {
    fn default() -> Self {
        UpstreamTls {
            enabled: true,
            ca: None,
            cert: None,
            key: None,
            server_name: None,
        }
    }
}

impl Default for EncryptionSettings {
    fn default() -> Self {
        EncryptionSettings {
            enabled: true,
            keyring: None,
            key: None,
            compression_threshold: 1024,
            rotation_interval_secs: 0,
            strict: false,
        }
    }
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            enabled: true,
            path: "logs/audit.log".to_owned(),
            access_logging: true,
            failed_access_threshold: 5,
            failed_access_window_secs: 300,
            lockout_secs: 300,
            log_key_names: false,
            lockout_shared: false,
        }
    }
}

impl Default for DetectionSettings {
    fn default() -> Self {
        DetectionSettings {
            failed_auth_per_minute: 10,
            access_per_minute: 1000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use std::io::Write as _;

    const HASH: &str = concat!(
        "$pbkdf2-sha256$i=600000$c2FsdHNhbHRzYWx0c2FsdA",
        "$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    );

    /// One valid user, in TOML, using [`HASH`].
    const ONE_USER: &str = concat!(
        "[[users]]\n",
        "name = \"alice\"\n",
        "password_hash = \"$pbkdf2-sha256$i=600000$c2FsdHNhbHRzYWx0c2FsdA",
        "$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"\n",
        "project = \"billing\"\n",
        "access = \"readwrite\"\n",
    );

    fn key_b64() -> String {
        STANDARD.encode([7u8; 32])
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Writes `toml` to a temporary file and loads it with `pairs` as the
    /// environment.
    fn load_str(toml: &str, pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut file = tempfile::NamedTempFile::new().expect("the temp dir is writable");
        file.write_all(toml.as_bytes())
            .expect("the temp file is writable");
        load(file.path(), &env(pairs))
    }

    /// A file that validates: one user, encryption keyed from the
    /// environment.
    fn load_ok(toml: &str, pairs: &[(&str, &str)]) -> Settings {
        let key = key_b64();
        let mut all = vec![("CACHE_ENCRYPTION_KEY", key.as_str())];
        all.extend_from_slice(pairs);
        match load_str(&format!("{toml}\n{ONE_USER}"), &all) {
            Ok(settings) => settings,
            Err(e) => panic!("expected the config to load, got: {e}"),
        }
    }

    fn load_err(toml: &str, pairs: &[(&str, &str)]) -> String {
        let key = key_b64();
        let mut all = vec![("CACHE_ENCRYPTION_KEY", key.as_str())];
        all.extend_from_slice(pairs);
        match load_str(&format!("{toml}\n{ONE_USER}"), &all) {
            Ok(_) => panic!("expected the config to be refused"),
            Err(e) => e.to_string(),
        }
    }

    /// Settings that validate, for tests that break one thing.
    fn valid() -> Settings {
        let mut settings = Settings::default();
        settings.encryption.key = Some(key_b64());
        settings.users.push(UserSettings {
            name: "alice".into(),
            password_hash: HASH.into(),
            project: "billing".into(),
            access: Permission::ReadWrite,
            client_cert: None,
        });
        settings
    }

    fn validate_err(settings: &Settings) -> String {
        match settings.validate() {
            Ok(()) => panic!("expected validation to fail"),
            Err(e) => e.to_string(),
        }
    }

    fn temp_file() -> tempfile::NamedTempFile {
        tempfile::NamedTempFile::new().expect("the temp dir is writable")
    }

    #[test]
    fn an_empty_file_takes_every_default() {
        let s = load_ok("", &[]);
        assert_eq!(s.server.listen, "127.0.0.1:6380");
        assert_eq!(s.server.max_connections, 10_000);
        assert_eq!(s.server.idle_timeout_secs, 3600);
        assert_eq!(s.server.max_request_bytes, 536_870_912);
        assert!(s.server.project_isolation);
        assert_eq!(s.server.shutdown_timeout_secs, 10);
        assert!(s.server.tls.is_none());
        assert_eq!(s.upstream.mode, UpstreamMode::Single);
        assert_eq!(s.upstream.address, "127.0.0.1:6379");
        assert!(s.upstream.nodes.is_empty());
        assert!(s.upstream.username.is_none() && s.upstream.password.is_none());
        assert_eq!(s.upstream.connect_timeout_ms, 2000);
        assert_eq!(s.upstream.request_timeout_ms, 30_000);
        assert_eq!(s.server.request_timeout_secs, 60);
        assert!(s.upstream.tls.is_none());
        assert!(s.encryption.enabled);
        assert!(s.encryption.keyring.is_none());
        assert_eq!(s.encryption.compression_threshold, 1024);
        assert_eq!(s.encryption.rotation_interval_secs, 0);
        assert!(!s.encryption.strict);
        assert!(s.audit.enabled && s.audit.access_logging);
        assert_eq!(s.audit.path, "logs/audit.log");
        assert_eq!(s.audit.failed_access_threshold, 5);
        assert_eq!(s.audit.failed_access_window_secs, 300);
        assert_eq!(s.audit.lockout_secs, 300);
        assert!(s.metrics.listen.is_none());
        assert!(s.projects.is_empty());
        assert!(UpstreamTls::default().enabled);
        assert_eq!(ProjectSettings::default().strict, None);
        assert!(!ProjectSettings::default().allow_scripts);
    }

    #[test]
    fn the_dev_config_loads_and_validates() {
        // The certificates are made by the quick start, not committed.
        let cert = temp_file();
        let key = temp_file();
        let vars = env(&[
            (
                "REDCLOAK__SERVER__TLS__CERT",
                &cert.path().to_string_lossy(),
            ),
            ("REDCLOAK__SERVER__TLS__KEY", &key.path().to_string_lossy()),
        ]);
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/dev.toml"));
        let s = load(path, &vars).expect("config/dev.toml is valid");
        assert_eq!(s.server.listen, "127.0.0.1:6380");
        assert!(s.server.tls.is_some());
        assert_eq!(s.upstream.address, "127.0.0.1:6379");
        assert!(s.encryption.enabled);
        assert_eq!(
            s.encryption.keyring.as_deref(),
            Some(Path::new("run/keyring.json"))
        );
        assert_eq!(s.audit.path, "run/audit.log");
        let users: Vec<_> = s
            .users
            .iter()
            .map(|u| (u.name.as_str(), u.project.as_str(), u.access))
            .collect();
        assert_eq!(
            users,
            [
                ("alice", "billing", Permission::ReadWrite),
                ("admin", "billing", Permission::Admin),
                ("bob", "shipping", Permission::ReadWrite),
            ]
        );
        assert!(
            s.users
                .iter()
                .all(|u| hash_iterations(&u.password_hash) == Some(1000))
        );
        assert_eq!(s.security_level(), SecurityLevel::High);
        let warnings = s.warnings();
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("1000 PBKDF2 iterations"))
        );
    }

    #[test]
    fn the_dev_config_hashes_match_the_dev_passwords() {
        let cert = temp_file();
        let key = temp_file();
        let vars = env(&[
            (
                "REDCLOAK__SERVER__TLS__CERT",
                &cert.path().to_string_lossy(),
            ),
            ("REDCLOAK__SERVER__TLS__KEY", &key.path().to_string_lossy()),
        ]);
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/dev.toml"));
        let s = load(path, &vars).expect("config/dev.toml is valid");
        for user in &s.users {
            let password = format!("{}-dev-password", user.name);
            let parts: Vec<&str> = user.password_hash.split('$').collect();
            let engine = GeneralPurpose::new(
                &base64::alphabet::STANDARD,
                GeneralPurposeConfig::new()
                    .with_decode_padding_mode(DecodePaddingMode::Indifferent),
            );
            let salt = engine.decode(parts[3]).expect("the dev salt is base64");
            let expected = engine.decode(parts[4]).expect("the dev hash is base64");
            let mut out = [0u8; 32];
            pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password.as_bytes(), &salt, 1000, &mut out);
            assert_eq!(out.as_slice(), expected.as_slice(), "user {}", user.name);
        }
    }

    #[test]
    fn the_example_config_loads_and_validates() {
        let cert = temp_file();
        let key = temp_file();
        let dir = tempfile::tempdir().expect("the temp dir is writable");
        let keyring = dir.path().join("keyring.json");
        let vars = env(&[
            (
                "REDCLOAK__SERVER__TLS__CERT",
                &cert.path().to_string_lossy(),
            ),
            ("REDCLOAK__SERVER__TLS__KEY", &key.path().to_string_lossy()),
            ("ENCRYPTION_KEY_STORE_PATH", &keyring.to_string_lossy()),
        ]);
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/redcloak.example.toml"
        ));
        let s = load(path, &vars).expect("config/redcloak.example.toml is valid");

        // The example shows the defaults, so everything not overridden above
        // equals them.
        let defaults = Settings::default();
        assert_eq!(s.server.listen, defaults.server.listen);
        assert_eq!(
            s.server.max_request_bytes,
            defaults.server.max_request_bytes
        );
        assert_eq!(s.audit.path, defaults.audit.path);
        assert_eq!(
            s.upstream.connect_timeout_ms,
            defaults.upstream.connect_timeout_ms
        );
        assert_eq!(
            s.upstream.request_timeout_ms,
            defaults.upstream.request_timeout_ms
        );
        assert_eq!(
            s.server.request_timeout_secs,
            defaults.server.request_timeout_secs
        );
        assert_eq!(s.encryption.compression_threshold, 1024);
        assert_eq!(s.users.len(), 1);
        assert!(!s.project("billing").allow_scripts);
        assert_eq!(s.security_level(), SecurityLevel::High);
    }

    #[test]
    fn each_seed_variable_overrides_its_field() {
        let dir = tempfile::tempdir().expect("the temp dir is writable");
        let keyring = dir.path().join("keyring.json");
        let keyring = keyring.to_string_lossy();
        let client = temp_file();
        let client_key = temp_file();
        let ca = temp_file();
        let s = {
            let vars = [
                ("CACHE_ENCRYPTION_ENABLED", "false"),
                ("ENCRYPTION_KEY_STORE_PATH", keyring.as_ref()),
                ("ENCRYPTION_KEY_ROTATION_INTERVAL", "604800"),
                ("REDIS_PASSWORD", "upstream-secret"),
                ("REDIS_SSL_ENABLED", "true"),
                ("REDIS_SSL_CERT_PATH", &client.path().to_string_lossy()),
                ("REDIS_SSL_KEY_PATH", &client_key.path().to_string_lossy()),
                ("REDIS_SSL_CA_CERT_PATH", &ca.path().to_string_lossy()),
                ("CACHE_PROJECT_ISOLATION", "false"),
                ("CACHE_SESSION_TIMEOUT", "60"),
                ("CACHE_ACCESS_LOGGING", "false"),
                ("SECURITY_AUDIT_ENABLED", "false"),
                ("SECURITY_AUDIT_LOG_PATH", "/var/log/redcloak.log"),
                ("FAILED_ACCESS_THRESHOLD", "9"),
                ("FAILED_ACCESS_WINDOW", "120"),
            ];
            load_str(ONE_USER, &vars).expect("the overridden config is valid")
        };
        assert!(!s.encryption.enabled);
        assert_eq!(
            s.encryption.keyring.as_deref(),
            Some(Path::new(keyring.as_ref()))
        );
        assert_eq!(s.encryption.rotation_interval_secs, 604_800);
        assert_eq!(s.upstream.password.as_deref(), Some("upstream-secret"));
        let tls = s
            .upstream
            .tls
            .as_ref()
            .expect("REDIS_SSL_* create the section");
        assert!(tls.enabled);
        assert_eq!(tls.cert.as_deref(), Some(client.path()));
        assert_eq!(tls.key.as_deref(), Some(client_key.path()));
        assert_eq!(tls.ca.as_deref(), Some(ca.path()));
        assert!(!s.server.project_isolation);
        assert_eq!(s.server.idle_timeout_secs, 60);
        assert!(!s.audit.access_logging);
        assert!(!s.audit.enabled);
        assert_eq!(s.audit.path, "/var/log/redcloak.log");
        assert_eq!(s.audit.failed_access_threshold, 9);
        assert_eq!(s.audit.failed_access_window_secs, 120);

        let s = load_str(ONE_USER, &[("CACHE_ENCRYPTION_KEY", &key_b64())])
            .expect("a key from the environment is enough");
        assert_eq!(s.encryption.decoded_key().ok().flatten(), Some([7u8; 32]));
    }

    #[test]
    fn the_seed_table_names_every_variable_of_the_spec_once() {
        let names: Vec<&str> = SEED_VARIABLES.iter().map(|(var, _, _)| *var).collect();
        assert_eq!(names.len(), 16);
        let unique: std::collections::BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(unique.len(), names.len());
    }

    #[test]
    fn redis_ssl_enabled_false_creates_a_disabled_tls_section() {
        let s = load_ok("", &[("REDIS_SSL_ENABLED", "no")]);
        assert!(s.upstream.tls.as_ref().is_some_and(|t| !t.enabled));
    }

    #[test]
    fn generic_variables_override_the_file() {
        let cert = temp_file();
        let cert = cert.path().to_string_lossy().into_owned();
        let s = load_ok(
            concat!(
                "[server]\nlisten = \"127.0.0.1:7000\"\n",
                "[server.tls]\ncert = \"missing\"\nkey = \"missing\"",
            ),
            &[
                ("REDCLOAK__SERVER__LISTEN", "0.0.0.0:6390"),
                ("REDCLOAK__UPSTREAM__CONNECT_TIMEOUT_MS", "500"),
                ("REDCLOAK__SERVER__PROJECT_ISOLATION", "false"),
                ("REDCLOAK__SERVER__TLS__CERT", &cert),
                ("redcloak__server__tls__key", &cert),
                ("REDCLOAK__PROJECTS__BILLING__ALLOW_SCRIPTS", "true"),
            ],
        );
        assert_eq!(s.server.listen, "0.0.0.0:6390");
        assert_eq!(s.upstream.connect_timeout_ms, 500);
        assert!(!s.server.project_isolation);
        let tls = s.server.tls.as_ref().expect("the file sets server.tls");
        assert_eq!(tls.cert, Path::new(&cert));
        assert_eq!(tls.key, Path::new(&cert));
        assert!(s.project("billing").allow_scripts);
    }

    #[test]
    fn a_generic_variable_sets_the_cluster_nodes_as_a_list() {
        let s = load_ok(
            "[upstream]\nmode = \"cluster\"",
            &[("REDCLOAK__UPSTREAM__NODES", "10.0.0.1:7000,redis-2:7000")],
        );
        assert_eq!(s.upstream.nodes, ["10.0.0.1:7000", "redis-2:7000"]);
    }

    #[test]
    fn a_seed_variable_wins_over_the_generic_form() {
        let s = load_ok(
            "[server]\nidle_timeout_secs = 10",
            &[
                ("REDCLOAK__SERVER__IDLE_TIMEOUT_SECS", "20"),
                ("CACHE_SESSION_TIMEOUT", "30"),
                ("REDCLOAK__UPSTREAM__PASSWORD", "generic"),
                ("REDIS_PASSWORD", "seed"),
            ],
        );
        assert_eq!(s.server.idle_timeout_secs, 30);
        assert_eq!(s.upstream.password.as_deref(), Some("seed"));
    }

    #[test]
    fn numeric_looking_secrets_keep_their_exact_text() {
        let s = load_ok("", &[("REDIS_PASSWORD", "12345")]);
        assert_eq!(s.upstream.password.as_deref(), Some("12345"));

        let s = load_ok("", &[("REDCLOAK__UPSTREAM__PASSWORD", "007")]);
        assert_eq!(s.upstream.password.as_deref(), Some("007"));

        let s = load_ok("[upstream]\npassword = 12345", &[]);
        assert_eq!(s.upstream.password.as_deref(), Some("12345"));
    }

    #[test]
    fn an_empty_variable_counts_as_unset() {
        let s = load_ok(
            "[upstream]\npassword = \"from-file\"",
            &[("REDIS_PASSWORD", ""), ("REDCLOAK__SERVER__LISTEN", "")],
        );
        assert_eq!(s.upstream.password.as_deref(), Some("from-file"));
        assert_eq!(s.server.listen, "127.0.0.1:6380");
    }

    #[test]
    fn an_invalid_seed_value_names_the_variable() {
        let e = load_err("", &[("CACHE_SESSION_TIMEOUT", "abc")]);
        assert!(e.contains("CACHE_SESSION_TIMEOUT"), "{e}");
        assert!(e.contains("whole number"), "{e}");

        let e = load_err("", &[("CACHE_ENCRYPTION_ENABLED", "maybe")]);
        assert!(e.contains("CACHE_ENCRYPTION_ENABLED"), "{e}");

        let e = load_err("", &[("FAILED_ACCESS_THRESHOLD", "-1")]);
        assert!(e.contains("FAILED_ACCESS_THRESHOLD"), "{e}");
    }

    #[test]
    fn worker_and_shared_link_counts_are_bounded() {
        let e = load_err("[server]\nworkers = 257\n", &[]);
        assert!(e.contains("server.workers: must be at most 256"), "{e}");
        let e = load_err("[upstream]\nshared_links = 65\n", &[]);
        assert!(
            e.contains("upstream.shared_links: must be at most 64"),
            "{e}"
        );
    }

    #[test]
    fn an_invalid_generic_value_names_the_variable_and_field() {
        let e = load_err("", &[("REDCLOAK__SERVER__MAX_CONNECTIONS", "lots")]);
        assert!(e.contains("REDCLOAK__SERVER__MAX_CONNECTIONS"), "{e}");
        assert!(e.contains("server.max_connections"), "{e}");
        assert!(!e.contains("lots"), "{e}");
    }

    #[test]
    fn a_section_replaced_by_a_variable_is_reported_without_its_value() {
        let e = load_err("", &[("REDCLOAK__UPSTREAM", "hunter2")]);
        assert_eq!(
            e,
            "environment variable REDCLOAK__UPSTREAM: upstream: expected a table, found a string"
        );

        let e = load_err("", &[("REDCLOAK__USERS__0__NAME", "mallory")]);
        assert!(
            e.starts_with("environment variable REDCLOAK__USERS__0__NAME: users: "),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_field_in_the_file_is_refused_by_its_full_name() {
        let e = load_err("[server]\nlistn = \"127.0.0.1:1\"", &[]);
        assert!(e.contains("server.listn: unknown field"), "{e}");

        let e = load_err("[upstream.tls]\nenable = true", &[]);
        assert!(e.contains("upstream.tls.enable: unknown field"), "{e}");

        let e = load_err("[serverr]\nlisten = \"127.0.0.1:1\"", &[]);
        assert!(e.contains("serverr: unknown field"), "{e}");

        let e = load_err("[projects.billing]\nallow_script = true", &[]);
        assert!(
            e.contains("projects.billing.allow_script: unknown field"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_field_in_a_user_is_refused() {
        let toml = ONE_USER.replace("access = \"readwrite\"", "access = \"readwrite\"\nrole = 1");
        let e = load_str(&toml, &[("CACHE_ENCRYPTION_KEY", &key_b64())])
            .expect_err("role is not a field");
        assert!(
            e.to_string().contains("users[0].role: unknown field"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_field_in_a_generic_variable_names_the_variable() {
        let e = load_err("", &[("REDCLOAK__SERVER__LISTN", "127.0.0.1:1")]);
        assert!(e.contains("REDCLOAK__SERVER__LISTN"), "{e}");
        assert!(e.contains("server.listn: unknown field"), "{e}");
    }

    #[test]
    fn a_missing_required_field_is_named() {
        let toml = ONE_USER.replace("project = \"billing\"\n", "");
        let e = load_str(&toml, &[("CACHE_ENCRYPTION_KEY", &key_b64())])
            .expect_err("project is required");
        assert!(
            e.to_string().contains("users[0].project: is required"),
            "{e}"
        );

        let e = load_err("[server.tls]\ncert = \"c.pem\"", &[]);
        assert!(e.contains("server.tls.key: is required"), "{e}");
    }

    #[test]
    fn a_bad_permission_or_mode_is_refused_by_field() {
        let toml = ONE_USER.replace("\"readwrite\"", "\"write\"");
        let e = load_str(&toml, &[("CACHE_ENCRYPTION_KEY", &key_b64())])
            .expect_err("write is not a permission");
        assert!(e.to_string().contains("users[0].access"), "{e}");

        let e = load_err("[upstream]\nmode = \"sentinel\"", &[]);
        assert!(e.contains("upstream.mode"), "{e}");
    }

    #[test]
    fn a_type_error_names_the_file_and_field_but_not_the_value() {
        let e = load_err("[encryption]\nenabled = \"hunter2\"", &[]);
        assert!(e.contains("encryption.enabled"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");

        let e = load_err("[upstream]\npassword = [\"hunter2\"]", &[]);
        assert!(e.contains("upstream.password"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn a_toml_syntax_error_gives_the_line_but_not_the_text() {
        let file = "[upstream]\npassword = \"hunter2\n";
        let e = load_str(file, &[]).expect_err("an unterminated string");
        let text = e.to_string();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{text}");
        assert!(text.contains("line 2"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = load(Path::new("/nonexistent/redcloak.toml"), &HashMap::new())
            .expect_err("the file does not exist");
        assert!(e.to_string().contains("/nonexistent/redcloak.toml"), "{e}");
    }

    #[test]
    fn validation_errors_from_load_name_the_file() {
        let mut file = temp_file();
        file.write_all(b"[server]\nmax_connections = 0\n")
            .expect("the temp file is writable");
        let e = load(file.path(), &env(&[("CACHE_ENCRYPTION_KEY", &key_b64())]))
            .expect_err("max_connections 0 is invalid");
        let text = e.to_string();
        assert!(
            text.starts_with(&file.path().display().to_string()),
            "{text}"
        );
        assert!(
            text.contains("server.max_connections: must be at least 1"),
            "{text}"
        );
    }

    #[test]
    fn the_test_baseline_is_valid() {
        valid().validate().expect("the baseline validates");
    }

    #[test]
    fn listen_must_be_an_ip_or_localhost_with_a_port() {
        for ok in [
            "127.0.0.1:6380",
            "0.0.0.0:0",
            "[::1]:6380",
            "localhost:6380",
        ] {
            let mut s = valid();
            s.server.listen = ok.into();
            s.validate().unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "127.0.0.1",
            "redis:6380",
            "::1:6380",
            "127.0.0.1:99999",
            ":6380",
            "",
        ] {
            let mut s = valid();
            s.server.listen = bad.into();
            let e = validate_err(&s);
            assert!(e.starts_with("server.listen: "), "{bad}: {e}");
        }
    }

    #[test]
    fn upstream_address_may_be_a_host_name_but_not_port_zero() {
        for ok in [
            "redis:6379",
            "redis.internal.example:6380",
            "10.1.2.3:6379",
            "[::1]:6379",
        ] {
            let mut s = valid();
            s.upstream.address = ok.into();
            s.validate().unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "redis",
            "redis:0",
            "bad_host:6379",
            "-redis:6379",
            "",
            "redis:port",
        ] {
            let mut s = valid();
            s.upstream.address = bad.into();
            let e = validate_err(&s);
            assert!(e.starts_with("upstream.address: "), "{bad}: {e}");
        }
    }

    #[test]
    fn cluster_mode_needs_valid_seed_nodes() {
        let mut s = valid();
        s.upstream.mode = UpstreamMode::Cluster;
        assert!(validate_err(&s).contains("upstream.nodes: cluster mode needs at least one"));

        s.upstream.nodes = vec!["10.0.0.1:7000".into(), "nohost".into()];
        assert!(validate_err(&s).starts_with("upstream.nodes[1]: "));

        s.upstream.nodes.pop();
        s.validate().expect("one good node is enough");

        s.upstream.shared_links = 0;
        assert!(validate_err(&s).contains("upstream.shared_links: must be at least 1 in cluster"));
    }

    #[test]
    fn single_mode_refuses_cluster_nodes() {
        let mut s = valid();
        s.upstream.nodes = vec!["10.0.0.1:7000".into()];
        assert!(validate_err(&s).contains("upstream.nodes: is only used in cluster mode"));
    }

    #[test]
    fn limits_must_be_usable() {
        let mut s = valid();
        s.server.max_connections = 0;
        assert_eq!(
            validate_err(&s),
            "server.max_connections: must be at least 1"
        );

        let mut s = valid();
        s.server.max_request_bytes = 1023;
        assert_eq!(
            validate_err(&s),
            "server.max_request_bytes: must be at least 1024"
        );

        let mut s = valid();
        s.upstream.connect_timeout_ms = 0;
        assert!(validate_err(&s).starts_with("upstream.connect_timeout_ms: "));

        let mut s = valid();
        s.audit.failed_access_threshold = 0;
        assert!(validate_err(&s).starts_with("audit.failed_access_threshold: "));

        let mut s = valid();
        s.audit.failed_access_window_secs = 0;
        assert!(validate_err(&s).starts_with("audit.failed_access_window_secs: "));

        // Durations that would overflow a deadline, and request sizes that
        // would overflow frame arithmetic, are refused.
        let mut s = valid();
        s.server.idle_timeout_secs = u64::MAX / 2;
        assert!(validate_err(&s).starts_with("server.idle_timeout_secs: must be at most"));
        let mut s = valid();
        s.audit.lockout_secs = i64::MAX as u64;
        assert!(validate_err(&s).starts_with("audit.lockout_secs: must be at most"));
        let mut s = valid();
        s.upstream.request_timeout_ms = u64::MAX;
        assert!(validate_err(&s).starts_with("upstream.request_timeout_ms: must be at most"));
        let mut s = valid();
        s.server.max_request_bytes = usize::MAX;
        assert!(validate_err(&s).starts_with("server.max_request_bytes: must be at most"));
        let mut s = valid();
        s.server.idle_timeout_secs = 10 * 365 * 24 * 3600;
        s.server.max_request_bytes = MAX_REQUEST_BYTES;
        s.validate().expect("ten years and 16 GiB are allowed");

        let mut s = valid();
        s.audit.path = String::new();
        assert!(validate_err(&s).starts_with("audit.path: "));

        let mut s = valid();
        s.metrics.listen = Some("nowhere".into());
        assert!(validate_err(&s).starts_with("metrics.listen: "));
    }

    #[test]
    fn certificate_bound_users_need_verified_client_certificates() {
        let mut s = valid();
        s.users[0].client_cert = Some("alice".into());
        assert_eq!(
            validate_err(&s),
            "users[0].client_cert: needs server.tls.client_ca, so that client certificates are verified"
        );
    }

    #[test]
    fn users_need_a_unique_name_a_project_and_a_pbkdf2_hash() {
        let user = |name: &str, project: &str, hash: &str| UserSettings {
            name: name.into(),
            password_hash: hash.into(),
            project: project.into(),
            access: Permission::Read,
            client_cert: None,
        };

        let mut s = valid();
        s.users.push(user("", "billing", HASH));
        assert_eq!(validate_err(&s), "users[1].name: must not be empty");

        let mut s = valid();
        s.users.push(user("bob", "shipping", HASH));
        s.users.push(user("carol", "", HASH));
        assert_eq!(validate_err(&s), "users[2].project: must not be empty");

        let mut s = valid();
        s.users.push(user("alice", "shipping", HASH));
        assert_eq!(
            validate_err(&s),
            "users[1].name: \"alice\" is already the name of users[0]"
        );

        let mut s = valid();
        s.users.push(user("bob", "shipping", "$argon2id$v=19$..."));
        assert!(
            validate_err(&s).starts_with("users[1].password_hash: must start with $pbkdf2-sha256$")
        );
    }

    #[test]
    fn encryption_without_a_key_is_refused_with_a_hint() {
        let mut s = valid();
        s.encryption.key = None;
        assert_eq!(
            validate_err(&s),
            "encryption.enabled: encryption is enabled but no key is configured: \
             set encryption.keyring or CACHE_ENCRYPTION_KEY"
        );

        s.encryption.enabled = false;
        s.validate().expect("no key is needed with encryption off");
    }

    #[test]
    fn a_malformed_key_is_refused_without_showing_it() {
        let mut s = valid();
        s.encryption.key = Some("not*base64*secret".into());
        let e = validate_err(&s);
        assert!(e.starts_with("encryption.key: is not valid base64"), "{e}");
        assert!(!e.contains("secret"), "{e}");

        let short = STANDARD.encode([1u8; 16]);
        s.encryption.key = Some(short.clone());
        let e = validate_err(&s);
        assert_eq!(e, "encryption.key: must decode to exactly 32 bytes, not 16");
        assert!(!e.contains(&short));

        s.encryption.key = Some(format!(" {} \n", key_b64().trim_end_matches('=')));
        s.validate()
            .expect("unpadded base64 with whitespace is accepted");
    }

    #[test]
    fn a_key_and_a_keyring_together_are_refused() {
        let mut s = valid();
        s.encryption.keyring = Some("keys/keyring.json".into());
        assert!(validate_err(&s).contains("not both"));
    }

    #[cfg(unix)]
    #[test]
    fn a_keyring_readable_by_others_is_refused_by_path_and_mode() {
        use std::os::unix::fs::PermissionsExt as _;

        let keyring = temp_file();
        let mut s = valid();
        s.encryption.key = None;
        s.encryption.keyring = Some(keyring.path().to_path_buf());

        std::fs::set_permissions(keyring.path(), std::fs::Permissions::from_mode(0o644))
            .expect("the temp file is ours");
        let e = validate_err(&s);
        assert!(e.starts_with("encryption.keyring: "), "{e}");
        assert!(e.contains(&keyring.path().display().to_string()), "{e}");
        assert!(e.contains("0644"), "{e}");

        std::fs::set_permissions(keyring.path(), std::fs::Permissions::from_mode(0o620))
            .expect("the temp file is ours");
        assert!(validate_err(&s).contains("0620"));

        std::fs::set_permissions(keyring.path(), std::fs::Permissions::from_mode(0o600))
            .expect("the temp file is ours");
        s.validate().expect("mode 0600 is accepted");

        s.encryption.keyring = Some(keyring.path().with_extension("absent"));
        s.validate()
            .expect("a keyring yet to be generated is accepted");
    }

    #[test]
    fn server_tls_files_must_exist() {
        let cert = temp_file();
        let mut s = valid();
        s.server.tls = Some(ServerTls {
            cert: cert.path().to_path_buf(),
            key: "/nonexistent/server.key".into(),
            client_ca: None,
        });
        let e = validate_err(&s);
        assert_eq!(e, "server.tls.key: /nonexistent/server.key does not exist");

        let key = temp_file();
        if let Some(tls) = s.server.tls.as_mut() {
            tls.key = key.path().to_path_buf();
            tls.client_ca = Some(std::env::temp_dir());
        }
        assert!(validate_err(&s).starts_with("server.tls.client_ca: "));
    }

    #[test]
    fn upstream_client_certificate_and_key_go_together() {
        let cert = temp_file();
        let mut s = valid();
        s.upstream.tls = Some(UpstreamTls {
            cert: Some(cert.path().to_path_buf()),
            ..UpstreamTls::default()
        });
        assert!(validate_err(&s).starts_with("upstream.tls.key: must be set together"));

        s.upstream.tls = Some(UpstreamTls {
            key: Some(cert.path().to_path_buf()),
            ..UpstreamTls::default()
        });
        assert!(validate_err(&s).starts_with("upstream.tls.cert: must be set together"));

        s.upstream.tls = Some(UpstreamTls {
            ca: Some("/nonexistent/ca.pem".into()),
            ..UpstreamTls::default()
        });
        assert!(validate_err(&s).starts_with("upstream.tls.ca: "));

        s.upstream.tls = Some(UpstreamTls {
            enabled: false,
            cert: Some(cert.path().to_path_buf()),
            ..UpstreamTls::default()
        });
        s.validate().expect("a disabled section is not checked");
    }

    #[test]
    fn an_upstream_username_needs_a_password() {
        let mut s = valid();
        s.upstream.username = Some("redcloak".into());
        assert!(validate_err(&s).starts_with("upstream.username: "));
        s.upstream.password = Some("pw".into());
        s.validate().expect("username and password together");
    }

    #[test]
    fn the_four_security_levels_follow_the_seed_plus_tls() {
        let cert = temp_file();
        let mut s = valid();
        s.server.tls = Some(ServerTls {
            cert: cert.path().to_path_buf(),
            key: cert.path().to_path_buf(),
            client_ca: None,
        });
        assert_eq!(s.security_level(), SecurityLevel::High);

        s.audit.access_logging = false;
        assert_eq!(s.security_level(), SecurityLevel::Medium);
        s.audit.access_logging = true;
        s.audit.enabled = false;
        assert_eq!(s.security_level(), SecurityLevel::Medium);
        s.audit.enabled = true;
        s.server.tls = None;
        assert_eq!(s.security_level(), SecurityLevel::Medium);

        s.server.project_isolation = false;
        assert_eq!(s.security_level(), SecurityLevel::Low);
        s.server.project_isolation = true;
        s.encryption.enabled = false;
        assert_eq!(s.security_level(), SecurityLevel::Low);

        s.server.project_isolation = false;
        assert_eq!(s.security_level(), SecurityLevel::Minimal);

        let shown: Vec<String> = [
            SecurityLevel::High,
            SecurityLevel::Medium,
            SecurityLevel::Low,
            SecurityLevel::Minimal,
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(shown, ["high", "medium", "low", "minimal"]);
        assert!(SecurityLevel::High > SecurityLevel::Minimal);
    }

    #[test]
    fn a_fully_protected_config_has_no_warnings() {
        let cert = temp_file();
        let mut s = valid();
        s.server.tls = Some(ServerTls {
            cert: cert.path().to_path_buf(),
            key: cert.path().to_path_buf(),
            client_ca: None,
        });
        s.upstream.password = Some("pw".into());
        assert_eq!(s.warnings(), Vec::<String>::new());
    }

    #[test]
    fn each_weakened_setting_gives_one_warning() {
        let mut s = valid();
        s.upstream.password = Some("pw".into());
        let plaintext = s.warnings();
        assert_eq!(plaintext.len(), 1);
        assert!(plaintext[0].starts_with("server.tls is not set"));

        type Weaken = Box<dyn Fn(&mut Settings)>;
        let cases: Vec<(&str, Weaken)> = vec![
            (
                "encryption.enabled is false",
                Box::new(|s| s.encryption.enabled = false),
            ),
            (
                "server.project_isolation is false",
                Box::new(|s| s.server.project_isolation = false),
            ),
            (
                "audit.access_logging is false",
                Box::new(|s| s.audit.access_logging = false),
            ),
            (
                "audit.enabled is false",
                Box::new(|s| s.audit.enabled = false),
            ),
            (
                "server.idle_timeout_secs is 0",
                Box::new(|s| s.server.idle_timeout_secs = 0),
            ),
            (
                "audit.lockout_secs is 0",
                Box::new(|s| s.audit.lockout_secs = 0),
            ),
            (
                "upstream.password is not set",
                Box::new(|s| s.upstream.password = None),
            ),
            ("no users are configured", Box::new(|s| s.users.clear())),
            (
                "upstream 10.0.0.5:6379 is reached without TLS",
                Box::new(|s| s.upstream.address = "10.0.0.5:6379".into()),
            ),
            (
                "users[0] (alice): the password hash uses 1000 PBKDF2 iterations",
                Box::new(|s| {
                    s.users[0].password_hash = "$pbkdf2-sha256$i=1000$c2FsdA$aGFzaA".into()
                }),
            ),
            (
                "projects.shipping: no user belongs to this project",
                Box::new(|s| {
                    s.projects
                        .insert("shipping".into(), ProjectSettings::default());
                }),
            ),
            (
                "projects.billing.allow_scripts is true",
                Box::new(|s| {
                    let scripts = ProjectSettings {
                        allow_scripts: true,
                        ..ProjectSettings::default()
                    };
                    s.projects.insert("billing".into(), scripts);
                }),
            ),
        ];
        for (expected, weaken) in cases {
            let mut weakened = s.clone();
            weaken(&mut weakened);
            let warnings = weakened.warnings();
            assert_eq!(warnings.len(), 2, "{expected}: {warnings:?}");
            assert!(
                warnings[1..].iter().any(|w| w.starts_with(expected)),
                "{expected}: {warnings:?}"
            );
        }
    }

    #[test]
    fn upstream_on_loopback_or_with_tls_is_not_warned_about() {
        let mut s = valid();
        for address in ["127.0.0.1:6379", "localhost:6379", "[::1]:6379"] {
            s.upstream.address = address.into();
            assert!(
                !s.warnings().iter().any(|w| w.contains("without TLS")),
                "{address}"
            );
        }
        s.upstream.address = "redis:6379".into();
        s.upstream.tls = Some(UpstreamTls::default());
        assert!(!s.warnings().iter().any(|w| w.contains("without TLS")));

        s.upstream.mode = UpstreamMode::Cluster;
        s.upstream.nodes = vec!["127.0.0.1:7000".into(), "10.0.0.2:7000".into()];
        s.upstream.tls = None;
        let warnings = s.warnings();
        let tls: Vec<_> = warnings
            .iter()
            .filter(|w| w.contains("without TLS"))
            .collect();
        assert_eq!(tls.len(), 1);
        assert!(tls[0].contains("10.0.0.2:7000"));
    }

    #[test]
    fn a_project_may_override_strictness() {
        let mut s = valid();
        s.encryption.strict = true;
        s.projects.insert(
            "billing".into(),
            ProjectSettings {
                strict: Some(false),
                ..ProjectSettings::default()
            },
        );
        assert!(!s.strict_for("billing"));
        assert!(s.strict_for("shipping"));
    }

    #[test]
    fn debug_output_never_shows_a_password_key_or_hash() {
        let s = load_ok(
            "[upstream]\nusername = \"proxy\"",
            &[("REDIS_PASSWORD", "upstream-hunter2")],
        );
        let shown = format!("{s:?} {:#?}", s);
        assert!(!shown.contains("upstream-hunter2"), "{shown}");
        assert!(!shown.contains(&key_b64()), "{shown}");
        assert!(!shown.contains("c2FsdHNhbHRzYWx0c2FsdA"), "{shown}");
        assert!(shown.contains("\"<redacted>\""), "{shown}");
        assert!(shown.contains("proxy"), "{shown}");
    }

    #[test]
    fn permissions_grant_writes_and_administration_in_order() {
        assert!(!Permission::Read.can_write() && !Permission::Read.is_admin());
        assert!(Permission::ReadWrite.can_write() && !Permission::ReadWrite.is_admin());
        assert!(Permission::Admin.can_write() && Permission::Admin.is_admin());
    }

    #[test]
    fn hash_iterations_are_read_from_the_hash_string() {
        assert_eq!(hash_iterations(HASH), Some(600_000));
        assert_eq!(hash_iterations("$pbkdf2-sha256$i=1000$a$b"), Some(1000));
        assert_eq!(hash_iterations("$pbkdf2-sha256$rounds=1000$a$b"), None);
        assert_eq!(hash_iterations("$argon2id$i=1000"), None);
    }

    #[test]
    fn audit_detection_and_leakage_settings_have_safe_defaults() {
        let s = load_ok("", &[]);
        assert!(!s.audit.log_key_names);
        assert!(!s.audit.lockout_shared);
        assert_eq!(s.detection.failed_auth_per_minute, 10);
        assert_eq!(s.detection.access_per_minute, 1000);
        let project = s.project("billing");
        assert_eq!(project.leakage, LeakagePolicy::Off);
        assert!(project.leakage_patterns.is_none());
        assert_eq!(
            DEFAULT_LEAKAGE_PATTERNS,
            ["password", "secret", "key", "token", "credential"]
        );
    }

    #[test]
    fn audit_detection_and_leakage_settings_load_from_the_file() {
        let s = load_ok(
            "[audit]\nlog_key_names = true\nlockout_shared = true\n\
             [detection]\nfailed_auth_per_minute = 3\naccess_per_minute = 0\n\
             [projects.billing]\nleakage = \"redact\"\nleakage_patterns = [\"SSN\", \"iban\"]\n\
             [metrics]\nlisten = \"127.0.0.1:0\"",
            &[],
        );
        assert!(s.audit.log_key_names && s.audit.lockout_shared);
        assert_eq!(s.detection.failed_auth_per_minute, 3);
        assert_eq!(s.detection.access_per_minute, 0);
        let project = s.project("billing");
        assert_eq!(project.leakage, LeakagePolicy::Redact);
        assert_eq!(
            project.leakage_patterns.as_deref(),
            Some(&["SSN".to_owned(), "iban".to_owned()][..])
        );
        assert_eq!(s.metrics.listen.as_deref(), Some("127.0.0.1:0"));
    }

    #[test]
    fn an_unknown_leakage_policy_lists_the_allowed_ones() {
        let e = load_err("[projects.billing]\nleakage = \"shred\"", &[]);
        assert!(
            e.contains("projects.billing.leakage")
                && e.contains("\"off\", \"log\", \"reject\" or \"redact\""),
            "{e}"
        );
    }

    #[test]
    fn leakage_patterns_must_be_non_empty_and_bounded() {
        let mut s = valid();
        let with_patterns = |patterns: Vec<String>| ProjectSettings {
            leakage: LeakagePolicy::Log,
            leakage_patterns: Some(patterns),
            ..ProjectSettings::default()
        };

        s.projects.insert(
            "billing".into(),
            with_patterns(vec!["ssn".into(), String::new()]),
        );
        assert_eq!(
            validate_err(&s),
            "projects.billing.leakage_patterns[1]: must not be empty"
        );

        s.projects
            .insert("billing".into(), with_patterns(vec!["x".repeat(257)]));
        assert!(validate_err(&s).starts_with("projects.billing.leakage_patterns[0]: "));

        s.projects
            .insert("billing".into(), with_patterns(vec!["p".into(); 65]));
        assert!(validate_err(&s).starts_with("projects.billing.leakage_patterns: has 65"));

        s.projects
            .insert("billing".into(), with_patterns(Vec::new()));
        s.validate().expect("an empty list scans for nothing");
    }

    #[test]
    fn a_generic_variable_sets_leakage_patterns_as_a_list() {
        let s = load_ok(
            "[projects.billing]\nleakage = \"log\"",
            &[("REDCLOAK__PROJECTS__BILLING__LEAKAGE_PATTERNS", "ssn, iban")],
        );
        assert_eq!(
            s.project("billing").leakage_patterns.as_deref(),
            Some(&["ssn".to_owned(), "iban".to_owned()][..])
        );
        assert!(is_list_field("upstream.nodes"));
        assert!(!is_list_field("projects..leakage_patterns"));
        assert!(!is_list_field("projects.a.b.leakage_patterns"));
    }

    #[test]
    fn weakened_audit_and_detection_settings_are_warned_about() {
        let mut s = valid();
        s.upstream.password = Some("pw".into());
        let before = s.warnings().len();

        let mut keys = s.clone();
        keys.audit.log_key_names = true;
        assert!(
            keys.warnings()
                .iter()
                .any(|w| w.starts_with("audit.log_key_names is true"))
        );
        keys.audit.enabled = false;
        assert!(
            !keys
                .warnings()
                .iter()
                .any(|w| w.starts_with("audit.log_key_names"))
        );

        let mut quiet = s.clone();
        quiet.detection.failed_auth_per_minute = 0;
        quiet.detection.access_per_minute = 0;
        assert_eq!(quiet.warnings().len(), before + 2);

        let mut open = s.clone();
        open.audit.lockout_shared = true;
        assert_eq!(open.warnings().len(), before);
        open.server.project_isolation = false;
        assert!(
            open.warnings()
                .iter()
                .any(|w| w.starts_with("audit.lockout_shared is true"))
        );
    }

    #[test]
    fn the_metrics_listener_may_pick_a_free_port() {
        let mut s = valid();
        s.metrics.listen = Some("127.0.0.1:0".into());
        s.validate().expect("port 0 picks a free port");
        s.metrics.listen = Some("localhost:9121".into());
        s.validate().expect("localhost is allowed");
    }
}
