//! Online re-encryption (`redcloak reencrypt`): moving every value sealed
//! under an old key to the current key while clients keep reading and
//! writing.
//!
//! Each project's namespace is walked with `SCAN` over a `direct` link to
//! each server that holds keys: the upstream, or every master of a cluster
//! (a key found on a master is rewritten there).
//! Strings, hash field values and list elements under an old key are opened
//! and sealed again by a `Sealer`, then written back with
//! `WATCH`/`MULTI`/`EXEC`, so a concurrent write is never overwritten. A
//! complete, clean run marks the old keys retired, which lets `keys prune`
//! drop them.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;

use crate::config::{Settings, UpstreamMode};
use crate::crypto::{self, OpenError};
use crate::direct::{DirectClient, Reply};
use crate::keyring::{self, Keyring, KeyringFile};
use crate::namespace::Namespace;
use crate::sealer::Sealer;
use crate::tls::UpstreamTls;
use crate::upstream::{Cluster, Connector};

/// Keys asked of each `SCAN` step: Redis's hint, not a limit.
const SCAN_COUNT: &[u8] = b"500";

/// Tries per key when a concurrent write keeps changing it between the
/// read and the `EXEC`; after that its values count as failures (running
/// again retries them).
///
/// The whole key is watched, so a hash or list that is written more often
/// than it can be read and written back (two round trips, plus sealing the
/// values written since the last try) runs out of tries even when the
/// writes touch other fields than the ones being moved. Moving each value
/// with its own compare-and-set would need a server-side script, which the
/// proxy does not assume its upstream user may run; such keys are left
/// for a quieter moment instead, and the summary counts them.
pub const MAX_ATTEMPTS: u32 = 5;

/// The pause before the second try at a key; it doubles for each later
/// try (1, 2, 4, 8 ms: at most 15 ms per contended key).
const RETRY_PAUSE: Duration = Duration::from_millis(1);

/// The progress line is redrawn at most this often.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// What a run did, in values (a string, one hash field value or one list
/// element each) except for `keys_scanned`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// The projects whose values were visited.
    pub projects: Vec<String>,
    /// Keys returned by `SCAN`, of every type.
    pub keys_scanned: u64,
    /// Values sealed again under the current key and written back.
    pub rewritten: u64,
    /// Values already sealed under the current key, left alone.
    pub already_current: u64,
    /// Values without the sealed-value magic (written before encryption,
    /// counters), left as they are.
    pub plain: u64,
    /// Values left under an old key: they failed to open (altered,
    /// malformed, or sealed under a key the keyring lacks), their key kept
    /// changing, or the upstream refused the write.
    pub failures: u64,
    /// Of `failures`, values whose key changed on every one of the
    /// [`MAX_ATTEMPTS`] tries; running again usually moves them.
    pub contended: u64,
    /// The last error the upstream gave a write, if any.
    pub last_write_error: Option<String>,
    /// Whether old keys were marked retired.
    pub retirement: Retirement,
}

/// Whether a run marked old keys retired, and if not, why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Retirement {
    /// These keys are now marked retired in the keyring file, so
    /// `keys prune` may drop them.
    Retired(Vec<String>),
    /// The keyring holds no key besides the current one.
    #[default]
    NoOldKeys,
    /// `--project` limited the run: other projects may still use old keys.
    PartialRun,
    /// Some values are still under an old key (see `failures`).
    ValuesLeft,
}

/// Re-encrypts every configured project (the users' projects and the
/// `[projects.*]` entries), or only `project`. Runs online: values written
/// meanwhile are never lost, and a key that keeps changing is retried
/// [`MAX_ATTEMPTS`] times. Values that fail to open are counted, never
/// written. When every project was covered and no value is left under an
/// old key, the keyring file marks the old keys retired.
///
/// `progress` redraws one line on standard error (for a terminal). Key
/// names and values are never printed. A lost upstream link ends the run
/// with an error; running again is safe, since moved values are skipped.
pub async fn run(
    settings: &Settings,
    project: Option<&str>,
    progress: bool,
) -> anyhow::Result<Summary> {
    let projects = projects_to_visit(settings, project)?;
    let scopes = scopes(settings, &projects);

    let mut servers = key_holders(settings).await?.into_iter();
    let encryption = settings.encryption.clone();
    let keyring = tokio::task::spawn_blocking(move || keyring::load_configured(&encryption))
        .await
        .context("loading the keyring")??;
    let sealer = Sealer::new(keyring, settings.encryption.compression_threshold, false);
    let Some(first) = servers.next() else {
        bail!("the cluster serves no slot");
    };
    let client = DirectClient::connect(&first).await?;

    let mut walk = Walk {
        client,
        sealer: &sealer,
        summary: Summary {
            projects,
            ..Summary::default()
        },
        progress: Progress::new(progress),
    };
    // Server after server; the progress line ends however the walk does.
    let walked = async {
        walk.scopes(&scopes).await?;
        for server in servers {
            walk.client = DirectClient::connect(&server).await?;
            walk.scopes(&scopes).await?;
        }
        anyhow::Ok(())
    }
    .await;
    walk.progress.finish();
    walked?;

    let mut summary = walk.summary;
    summary.retirement = retire(settings, sealer.keyring(), project.is_some(), &summary).await?;
    Ok(summary)
}

/// Links to every server that holds keys, with the upstream credentials
/// and TLS: the upstream itself, or each master of the cluster.
async fn key_holders(settings: &Settings) -> anyhow::Result<Vec<Connector>> {
    let mut connector = Connector::new(&settings.upstream);
    if let Some(tls) = UpstreamTls::from_settings(&settings.upstream).context("upstream.tls")? {
        connector = connector.with_tls(Arc::new(tls));
    }
    if settings.upstream.mode == UpstreamMode::Single {
        return Ok(vec![connector]);
    }
    let cluster = Cluster::new(connector, settings.upstream.nodes.clone());
    if !cluster.refresh().await {
        let why = cluster.unavailable_reason().unwrap_or_default();
        bail!("the cluster's slot map could not be learned: {why}");
    }
    Ok(cluster.master_connectors())
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "re-encrypted {}: {} keys scanned, {} values rewritten, {} already current, \
             {} plain left as they are, {} failed",
            self.projects.join(", "),
            self.keys_scanned,
            self.rewritten,
            self.already_current,
            self.plain,
            self.failures
        )?;
        if let Some(error) = &self.last_write_error {
            writeln!(f, "the upstream refused a write: {error}")?;
        }
        match &self.retirement {
            Retirement::Retired(ids) => write!(
                f,
                "marked retired (keys prune may now drop them): {}",
                ids.join(", ")
            ),
            Retirement::NoOldKeys => write!(f, "no old keys to retire"),
            Retirement::PartialRun => write!(
                f,
                "old keys not retired: --project covered only part of the configuration"
            ),
            Retirement::ValuesLeft => write!(
                f,
                "old keys not retired: {} values are still under an old key \
                 ({} because their key kept changing; run again to retry them)",
                self.failures, self.contended
            ),
        }
    }
}

/// The configured projects, or the one asked for if it is configured.
fn projects_to_visit(settings: &Settings, only: Option<&str>) -> anyhow::Result<Vec<String>> {
    let configured: BTreeSet<&str> = settings
        .users
        .iter()
        .map(|user| user.project.as_str())
        .chain(settings.projects.keys().map(String::as_str))
        .collect();

    match only {
        None if configured.is_empty() => {
            bail!("the configuration names no project (no users and no [projects.*] entry)")
        }
        None => Ok(configured.into_iter().map(str::to_owned).collect()),
        Some(_) if !settings.server.project_isolation => bail!(
            "--project needs server.project_isolation = true: without namespaces the \
             project's keys cannot be told apart; run without --project"
        ),
        Some(project) if configured.contains(project) => Ok(vec![project.to_owned()]),
        Some(project) => bail!(
            "project {project:?} is not in the configuration (no user belongs to it and \
             there is no [projects.{project}] entry)"
        ),
    }
}

/// A part of the keyspace walked with one `SCAN`, and the projects its
/// values may be sealed for.
struct Scope {
    label: String,
    pattern: Bytes,
    projects: Vec<String>,
}

/// One scope per project's namespace; with isolation off, the single
/// shared keyspace, where a value belongs to whichever configured project
/// its tag authenticates for.
fn scopes(settings: &Settings, projects: &[String]) -> Vec<Scope> {
    if !settings.server.project_isolation {
        return vec![Scope {
            label: "the shared keyspace".to_owned(),
            pattern: Bytes::from_static(b"*"),
            projects: projects.to_vec(),
        }];
    }
    projects
        .iter()
        .map(|project| Scope {
            label: project.clone(),
            pattern: Namespace::for_project(project).pattern(b"*"),
            projects: vec![project.clone()],
        })
        .collect()
}

/// Marks every non-current key of the keyring the run used as retired,
/// when the run allows it. The file is read again first: a key pruned
/// meanwhile is skipped, and a key made current meanwhile is not retired.
async fn retire(
    settings: &Settings,
    keyring: &Keyring,
    partial: bool,
    summary: &Summary,
) -> anyhow::Result<Retirement> {
    let old: Vec<String> = keyring
        .list()
        .into_iter()
        .filter(|info| !info.is_current)
        .map(|info| info.id)
        .collect();
    if old.is_empty() {
        return Ok(Retirement::NoOldKeys);
    }
    if partial {
        return Ok(Retirement::PartialRun);
    }
    if summary.failures > 0 {
        return Ok(Retirement::ValuesLeft);
    }
    let Some(path) = settings.encryption.keyring.clone() else {
        // Only a keyring file can hold more than one key.
        return Ok(Retirement::NoOldKeys);
    };

    let marked = tokio::task::spawn_blocking(move || {
        let passphrase = keyring::passphrase_from_env();
        let file = KeyringFile::new(&path);
        let file = match passphrase.as_deref() {
            Some(passphrase) => file.with_passphrase(passphrase),
            None => file,
        };
        let now = file.load()?;
        let ids: Vec<String> = old
            .into_iter()
            .filter(|id| now.secret(id).is_some() && id != now.current_id())
            .collect();
        if !ids.is_empty() {
            file.mark_retired(&ids)?;
        }
        Ok::<_, keyring::KeyringError>(ids)
    })
    .await
    .context("marking old keys retired")??;

    Ok(if marked.is_empty() {
        Retirement::NoOldKeys
    } else {
        Retirement::Retired(marked)
    })
}

/// The value-holding types re-encryption visits; sets, sorted sets and
/// streams hold no sealed values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    String,
    Hash,
    List,
}

impl Kind {
    /// The kind named by a `TYPE` reply; `None` for other types and for a
    /// key that is gone.
    fn of(reply: &Reply) -> anyhow::Result<Option<Kind>> {
        if let Some(text) = reply.error_text() {
            bail!("TYPE failed: {text}");
        }
        Ok(match reply {
            Reply::Status(name) => match name.as_ref() {
                b"string" => Some(Kind::String),
                b"hash" => Some(Kind::Hash),
                b"list" => Some(Kind::List),
                _ => None,
            },
            _ => bail!("unexpected reply to TYPE: {reply:?}"),
        })
    }

    /// The command that reads the whole key.
    fn read(self, key: &[u8]) -> Vec<&[u8]> {
        match self {
            Kind::String => vec![b"GET", key],
            Kind::Hash => vec![b"HGETALL", key],
            Kind::List => vec![b"LRANGE", key, b"0", b"-1"],
        }
    }
}

/// One value of a key: a string, a hash field's value (with its field) or
/// a list element (at its index).
struct Item {
    field: Option<Bytes>,
    value: Bytes,
}

/// What reading a watched key found.
enum Read {
    /// The key no longer exists.
    Gone,
    /// The key now holds another type.
    WrongType,
    Items(Vec<Item>),
}

fn parse_read(kind: Kind, reply: Reply) -> anyhow::Result<Read> {
    if let Reply::Error(text) = &reply {
        if text.starts_with(b"WRONGTYPE") {
            return Ok(Read::WrongType);
        }
        bail!("reading a key failed: {}", String::from_utf8_lossy(text));
    }
    let unexpected = || anyhow!("unexpected reply to a {kind:?} read");

    if kind == Kind::String {
        return match reply {
            Reply::Bulk(None) => Ok(Read::Gone),
            Reply::Bulk(Some(value)) => Ok(Read::Items(vec![Item { field: None, value }])),
            _ => Err(unexpected()),
        };
    }

    let elements = reply.into_array().ok_or_else(unexpected)?;
    if elements.is_empty() {
        return Ok(Read::Gone);
    }
    let mut bytes = elements.into_iter().map(Reply::into_bytes);
    let mut items = Vec::new();
    while let Some(first) = bytes.next() {
        let first = first.ok_or_else(unexpected)?;
        items.push(match kind {
            Kind::Hash => Item {
                field: Some(first),
                value: bytes.next().flatten().ok_or_else(unexpected)?,
            },
            _ => Item {
                field: None,
                value: first,
            },
        });
    }
    Ok(Read::Items(items))
}

/// What to do with one value.
#[derive(Clone)]
enum Verdict {
    Plain,
    Current,
    /// It cannot be opened: counted as a failure, never written.
    Unreadable,
    /// Sealed again under the current key.
    Reseal(Bytes),
}

/// Verdicts already reached for a key's values, by value bytes. A retry
/// reuses them, so that only values written since the last attempt are
/// opened and sealed again, and the window between `WATCH` and `EXEC`
/// shrinks to two round trips: that is what lets a key that is written
/// often still be moved.
type Verdicts = HashMap<Bytes, Verdict>;

/// Tallies of one attempt at one key, added to the summary only for the
/// attempt that counts (the last).
#[derive(Default)]
struct Counts {
    rewritten: u64,
    current: u64,
    plain: u64,
    failures: u64,
    contended: u64,
}

/// One write of a transaction and the number of values it moves.
struct Write {
    args: Vec<Bytes>,
    values: u64,
}

/// How a `MULTI`/`EXEC` ended.
enum Exec {
    /// Each write's outcome: `None` done, `Some(error)` refused.
    Ran(Vec<Option<String>>),
    /// The key changed after `WATCH`; nothing was written.
    Aborted,
    /// Redis discarded the whole transaction (`EXECABORT`).
    Discarded(String),
}

/// The state of one run: the link, the sealer, and the tallies so far.
struct Walk<'a> {
    client: DirectClient,
    sealer: &'a Sealer,
    summary: Summary,
    progress: Progress,
}

impl Walk<'_> {
    async fn scopes(&mut self, scopes: &[Scope]) -> anyhow::Result<()> {
        for scope in scopes {
            self.scope(scope).await?;
        }
        Ok(())
    }

    async fn scope(&mut self, scope: &Scope) -> anyhow::Result<()> {
        self.progress.show(&scope.label, &self.summary, true);
        let mut cursor = Bytes::from_static(b"0");
        loop {
            let reply = self
                .client
                .call(&[
                    b"SCAN",
                    &cursor,
                    b"MATCH",
                    &scope.pattern,
                    b"COUNT",
                    SCAN_COUNT,
                ])
                .await?;
            let (next, keys) = parse_scan(reply)?;
            self.summary.keys_scanned += keys.len() as u64;

            let kinds = self.kinds(&keys).await?;
            for (key, kind) in keys.iter().zip(kinds) {
                if let Some(kind) = kind {
                    self.key(scope, key, kind).await?;
                }
                self.progress.show(&scope.label, &self.summary, false);
            }

            if next.as_ref() == b"0" {
                break;
            }
            cursor = next;
        }
        self.progress.show(&scope.label, &self.summary, true);
        Ok(())
    }

    /// The kind of each key, asked in one pipeline.
    async fn kinds(&mut self, keys: &[Bytes]) -> anyhow::Result<Vec<Option<Kind>>> {
        let requests: Vec<[&[u8]; 2]> = keys.iter().map(|key| [b"TYPE", key.as_ref()]).collect();
        let requests: Vec<&[&[u8]]> = requests.iter().map(|request| &request[..]).collect();
        let replies = self.client.call_many(&requests).await?;
        replies.iter().map(Kind::of).collect()
    }

    /// Moves one key's values, retrying while concurrent writes change it.
    async fn key(&mut self, scope: &Scope, key: &Bytes, mut kind: Kind) -> anyhow::Result<()> {
        let mut last = Counts::default();
        let mut verdicts = Verdicts::new();
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                // Let a burst of writes to the key pass before trying again.
                tokio::time::sleep(RETRY_PAUSE * (1 << (attempt - 1))).await;
            }
            let read = kind.read(key);
            let mut replies = self
                .client
                .call_many(&[&[b"UNWATCH"], &[b"WATCH", key], &read])
                .await?
                .into_iter()
                .skip(1);
            let watched = replies
                .next()
                .expect("call_many returns one reply per request");
            let value = replies
                .next()
                .expect("call_many returns one reply per request");
            if !watched.is_status("OK") {
                bail!("WATCH failed: {watched:?}");
            }

            let items = match parse_read(kind, value)? {
                Read::Gone => return Ok(()),
                Read::WrongType => {
                    let reply = self.client.call(&[b"TYPE", key]).await?;
                    match Kind::of(&reply)? {
                        Some(now) => {
                            kind = now;
                            continue;
                        }
                        None => return Ok(()),
                    }
                }
                Read::Items(items) => items,
            };

            let (mut counts, writes) = self.plan(scope, kind, key, &items, &mut verdicts)?;
            if writes.is_empty() {
                self.add(&counts);
                return Ok(());
            }

            match self.transact(&writes).await? {
                Exec::Aborted => {
                    let pending: u64 = writes.iter().map(|write| write.values).sum();
                    counts.failures += pending;
                    counts.contended += pending;
                    last = counts;
                }
                Exec::Discarded(error) => {
                    counts.failures += writes.iter().map(|write| write.values).sum::<u64>();
                    self.summary.last_write_error = Some(error);
                    self.add(&counts);
                    return Ok(());
                }
                Exec::Ran(outcomes) => {
                    for (write, outcome) in writes.iter().zip(outcomes) {
                        match outcome {
                            None => counts.rewritten += write.values,
                            Some(error) => {
                                counts.failures += write.values;
                                self.summary.last_write_error = Some(error);
                            }
                        }
                    }
                    self.add(&counts);
                    return Ok(());
                }
            }
        }
        self.add(&last);
        Ok(())
    }

    /// Judges every value of a key and builds the writes that move the old
    /// ones: one `SET … KEEPTTL`, one `HSET` of every changed field, or one
    /// `LSET` per changed element.
    fn plan(
        &self,
        scope: &Scope,
        kind: Kind,
        key: &Bytes,
        items: &[Item],
        verdicts: &mut Verdicts,
    ) -> anyhow::Result<(Counts, Vec<Write>)> {
        let mut counts = Counts::default();
        let mut changes: Vec<(usize, Bytes)> = Vec::new();
        for (index, item) in items.iter().enumerate() {
            let verdict = match verdicts.get(&item.value) {
                Some(verdict) => verdict.clone(),
                None => {
                    let verdict = self.verdict(scope, &item.value)?;
                    verdicts.insert(item.value.clone(), verdict.clone());
                    verdict
                }
            };
            match verdict {
                Verdict::Plain => counts.plain += 1,
                Verdict::Current => counts.current += 1,
                Verdict::Unreadable => counts.failures += 1,
                Verdict::Reseal(sealed) => changes.push((index, sealed)),
            }
        }
        if changes.is_empty() {
            return Ok((counts, Vec::new()));
        }

        let verb = |name: &'static [u8]| Bytes::from_static(name);
        let writes = match kind {
            Kind::String => changes
                .into_iter()
                .map(|(_, sealed)| Write {
                    args: vec![verb(b"SET"), key.clone(), sealed, verb(b"KEEPTTL")],
                    values: 1,
                })
                .collect(),
            Kind::Hash => {
                let mut args = vec![verb(b"HSET"), key.clone()];
                let values = changes.len() as u64;
                for (index, sealed) in changes {
                    let field = items[index]
                        .field
                        .clone()
                        .expect("hash items are parsed with their field");
                    args.extend([field, sealed]);
                }
                vec![Write { args, values }]
            }
            Kind::List => changes
                .into_iter()
                .map(|(index, sealed)| Write {
                    args: vec![
                        verb(b"LSET"),
                        key.clone(),
                        Bytes::from(index.to_string()),
                        sealed,
                    ],
                    values: 1,
                })
                .collect(),
        };
        Ok((counts, writes))
    }

    /// Whether a value needs moving, and its new form if so. A value under
    /// an old key is opened with each of the scope's projects in turn (one
    /// in a namespace; several in a shared keyspace) and sealed again for
    /// the project it opened for.
    fn verdict(&self, scope: &Scope, value: &[u8]) -> anyhow::Result<Verdict> {
        if !crypto::is_sealed(value) {
            return Ok(Verdict::Plain);
        }
        let Ok(header) = crypto::parse_header(value) else {
            return Ok(Verdict::Unreadable);
        };
        if header.key_id == self.sealer.keyring().current_id() {
            return Ok(Verdict::Current);
        }

        for project in &scope.projects {
            match self.sealer.open(project, value) {
                Ok(opened) => {
                    let sealed = self
                        .sealer
                        .seal(project, opened.as_bytes())
                        .context("sealing a value again")?;
                    return Ok(Verdict::Reseal(sealed.into()));
                }
                Err(OpenError::Integrity) => continue,
                Err(_) => return Ok(Verdict::Unreadable),
            }
        }
        Ok(Verdict::Unreadable)
    }

    /// Runs the writes in `MULTI`/`EXEC` on the watched link.
    async fn transact(&mut self, writes: &[Write]) -> anyhow::Result<Exec> {
        let args: Vec<Vec<&[u8]>> = writes
            .iter()
            .map(|write| write.args.iter().map(Bytes::as_ref).collect())
            .collect();
        let mut requests: Vec<&[&[u8]]> = Vec::with_capacity(writes.len() + 2);
        requests.push(&[b"MULTI"]);
        requests.extend(args.iter().map(Vec::as_slice));
        requests.push(&[b"EXEC"]);

        let exec = self
            .client
            .call_many(&requests)
            .await?
            .pop()
            .expect("call_many returns one reply per request");
        match exec {
            Reply::Array(None) | Reply::Bulk(None) => Ok(Exec::Aborted),
            Reply::Error(_) => Ok(Exec::Discarded(exec.error_text().unwrap_or_default())),
            Reply::Array(Some(outcomes)) if outcomes.len() == writes.len() => {
                Ok(Exec::Ran(outcomes.iter().map(Reply::error_text).collect()))
            }
            other => bail!("unexpected reply to EXEC: {other:?}"),
        }
    }

    fn add(&mut self, counts: &Counts) {
        let summary = &mut self.summary;
        summary.rewritten += counts.rewritten;
        summary.already_current += counts.current;
        summary.plain += counts.plain;
        summary.failures += counts.failures;
        summary.contended += counts.contended;
    }
}

/// A `SCAN` reply: the next cursor and the keys.
fn parse_scan(reply: Reply) -> anyhow::Result<(Bytes, Vec<Bytes>)> {
    if let Some(text) = reply.error_text() {
        bail!("SCAN failed: {text}");
    }
    let unexpected = || anyhow!("unexpected reply to SCAN");
    let mut parts = reply
        .into_array()
        .filter(|parts| parts.len() == 2)
        .ok_or_else(unexpected)?
        .into_iter();
    let cursor = parts
        .next()
        .and_then(Reply::into_bytes)
        .ok_or_else(unexpected)?;
    let keys = parts
        .next()
        .and_then(Reply::into_array)
        .ok_or_else(unexpected)?
        .into_iter()
        .map(|key| key.into_bytes().ok_or_else(unexpected))
        .collect::<anyhow::Result<Vec<Bytes>>>()?;
    Ok((cursor, keys))
}

/// The progress line on standard error, redrawn in place with `\r`.
struct Progress {
    enabled: bool,
    last: Option<Instant>,
    /// Length of the line last drawn, so a shorter one can blank it out.
    width: usize,
}

impl Progress {
    fn new(enabled: bool) -> Progress {
        Progress {
            enabled,
            last: None,
            width: 0,
        }
    }

    /// Redraws the line, unless it was drawn less than
    /// [`PROGRESS_INTERVAL`] ago and `now` is false. Write errors are
    /// ignored: progress is a courtesy.
    fn show(&mut self, label: &str, summary: &Summary, now: bool) {
        if !self.enabled {
            return;
        }
        let at = Instant::now();
        if !now && self.last.is_some_and(|last| at - last < PROGRESS_INTERVAL) {
            return;
        }
        self.last = Some(at);

        let line = format!(
            "re-encrypting {label}: {} keys scanned, {} rewritten",
            summary.keys_scanned, summary.rewritten
        );
        let blank = self.width.saturating_sub(line.len());
        self.width = line.len();
        let mut stderr = std::io::stderr().lock();
        let _ = write!(stderr, "\r{line}{:blank$}", "");
        let _ = stderr.flush();
    }

    /// Ends the line, so that what follows starts on a fresh one.
    fn finish(&mut self) {
        if self.enabled && self.last.is_some() {
            let _ = writeln!(std::io::stderr().lock());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Reply {
        Reply::Bulk(Some(Bytes::copy_from_slice(text.as_bytes())))
    }

    #[test]
    fn scan_replies_give_the_cursor_and_the_keys() {
        let reply = Reply::Array(Some(vec![
            bulk("17"),
            Reply::Array(Some(vec![bulk("a"), bulk("b")])),
        ]));
        let (cursor, keys) = parse_scan(reply).unwrap();
        assert_eq!(cursor.as_ref(), b"17");
        assert_eq!(keys, [Bytes::from("a"), Bytes::from("b")]);

        assert!(parse_scan(Reply::Error(Bytes::from("NOPERM no"))).is_err());
        assert!(parse_scan(Reply::Array(Some(vec![bulk("0")]))).is_err());
    }

    #[test]
    fn hash_reads_pair_fields_with_values_and_empty_reads_mean_gone() {
        let reply = Reply::Array(Some(vec![bulk("f1"), bulk("v1"), bulk("f2"), bulk("v2")]));
        let Read::Items(items) = parse_read(Kind::Hash, reply).unwrap() else {
            panic!("not items");
        };
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].field.as_deref(), Some(&b"f2"[..]));
        assert_eq!(items[1].value.as_ref(), b"v2");

        let odd = Reply::Array(Some(vec![bulk("f1")]));
        assert!(parse_read(Kind::Hash, odd).is_err());
        assert!(matches!(
            parse_read(Kind::List, Reply::Array(Some(Vec::new()))),
            Ok(Read::Gone)
        ));
        assert!(matches!(
            parse_read(Kind::String, Reply::Bulk(None)),
            Ok(Read::Gone)
        ));
        let wrong = Reply::Error(Bytes::from("WRONGTYPE Operation against a key"));
        assert!(matches!(
            parse_read(Kind::String, wrong),
            Ok(Read::WrongType)
        ));
    }

    #[test]
    fn type_replies_select_strings_hashes_and_lists() {
        let status = |name: &'static str| Reply::Status(Bytes::from(name));
        assert_eq!(Kind::of(&status("string")).unwrap(), Some(Kind::String));
        assert_eq!(Kind::of(&status("hash")).unwrap(), Some(Kind::Hash));
        assert_eq!(Kind::of(&status("list")).unwrap(), Some(Kind::List));
        for other in ["set", "zset", "stream", "none"] {
            assert_eq!(Kind::of(&status(other)).unwrap(), None);
        }
        assert!(Kind::of(&Reply::Error(Bytes::from("ERR"))).is_err());
    }

    #[test]
    fn summary_display_names_counts_and_why_keys_were_not_retired() {
        let summary = Summary {
            projects: vec!["billing".to_owned(), "shipping".to_owned()],
            keys_scanned: 9,
            rewritten: 14,
            already_current: 2,
            plain: 1,
            failures: 1,
            contended: 0,
            last_write_error: None,
            retirement: Retirement::ValuesLeft,
        };
        assert_eq!(
            summary.to_string(),
            "re-encrypted billing, shipping: 9 keys scanned, 14 values rewritten, \
             2 already current, 1 plain left as they are, 1 failed\n\
             old keys not retired: 1 values are still under an old key \
             (0 because their key kept changing; run again to retry them)"
        );

        let retired = Summary {
            retirement: Retirement::Retired(vec!["k1".to_owned()]),
            ..summary
        };
        assert!(
            retired
                .to_string()
                .ends_with("marked retired (keys prune may now drop them): k1")
        );
    }

    #[tokio::test]
    async fn a_cluster_without_a_slot_map_is_refused_before_anything_is_touched() {
        let mut settings = Settings::default();
        settings.upstream.mode = UpstreamMode::Cluster;
        // Nothing listens on port 1.
        settings.upstream.nodes = vec!["127.0.0.1:1".to_owned()];
        settings
            .projects
            .insert("billing".to_owned(), Default::default());
        let refused = run(&settings, None, false).await.unwrap_err();
        assert!(refused.to_string().contains("slot map"), "{refused}");
    }

    #[test]
    fn projects_come_from_users_and_project_entries_once_each() {
        let mut settings = Settings::default();
        settings
            .projects
            .insert("shipping".to_owned(), Default::default());
        settings
            .projects
            .insert("billing".to_owned(), Default::default());
        assert_eq!(
            projects_to_visit(&settings, None).unwrap(),
            ["billing", "shipping"]
        );
        assert_eq!(
            projects_to_visit(&settings, Some("billing")).unwrap(),
            ["billing"]
        );
        assert!(projects_to_visit(&settings, Some("nope")).is_err());
        assert!(projects_to_visit(&Settings::default(), None).is_err());
    }
}
