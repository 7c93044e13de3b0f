//! Server-wide commands answered for the project only: `DBSIZE`,
//! `FLUSHDB`/`FLUSHALL`, `RANDOMKEY` and `INFO` walk the project's namespace
//! with `SCAN` instead of touching the whole database.
//!
//! Each first waits for the replies of every request sent before it, so it
//! sees their effects, exactly as Redis would run it after them. It then
//! works over a separate link of the proxy's own, and requests after it are
//! not sent until it is done.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Pending, Session, Shared};
use crate::direct::{DirectClient, DirectError, Reply};
use crate::frame::{self, ProtocolError};
use crate::upstream::{Connector, UpstreamError, slot};

/// Deletes keys found by `SCAN`, at most `BATCH` per request. A cluster
/// node refuses a multi-key request whose keys span slots, so with
/// `by_slot` each request holds keys of one slot; a single server takes
/// them in any mix.
async fn delete(
    client: &mut DirectClient,
    keys: Vec<Bytes>,
    lazy: bool,
    by_slot: bool,
) -> Result<(), DirectError> {
    let command: &[u8] = if lazy { b"UNLINK" } else { b"DEL" };
    let mut keyed: Vec<(u16, Bytes)> = keys
        .into_iter()
        .map(|key| (if by_slot { slot(&key) } else { 0 }, key))
        .collect();
    keyed.sort_unstable_by_key(|&(key_slot, _)| key_slot);
    let mut requests: Vec<Vec<&[u8]>> = Vec::new();
    let mut current_slot = None;
    for (key_slot, key) in &keyed {
        match requests.last_mut() {
            Some(request) if current_slot == Some(*key_slot) && request.len() <= BATCH => {
                request.push(key)
            }
            _ => requests.push(vec![command, key]),
        }
        current_slot = Some(*key_slot);
    }
    let requests: Vec<&[&[u8]]> = requests.iter().map(Vec::as_slice).collect();
    for reply in client.call_many(&requests).await? {
        if let Some(text) = reply.error_text() {
            tracing::debug!(error = %text, "deleting a project key failed");
        }
    }
    Ok(())
}

/// Keys asked for per `SCAN` call, and deleted per `DEL`/`UNLINK`.
const BATCH: usize = 1000;

/// Which emulation to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Emulation {
    /// `FLUSHDB`/`FLUSHALL`; `lazy` with `ASYNC`, deleting with `UNLINK`.
    Flush {
        lazy: bool,
    },
    RandomKey,
}

impl Session {
    /// `DBSIZE`: the project's keys.
    pub(super) async fn dbsize(&mut self) {
        match self.count_keys().await {
            Ok(count) => self.reply_local(|w, out| w.integer(out, count)),
            Err(DirectError::Broken) => {}
            Err(e) => {
                let text = format!("ERR upstream unavailable: {e}");
                self.reply_local(|w, out| w.error(out, &text));
            }
        }
    }

    pub(super) async fn emulate(&mut self, emulation: Emulation) {
        if !self.drain().await {
            return;
        }
        match self.run_emulation(emulation).await {
            Ok(()) => {}
            Err(e) => {
                tracing::debug!(error = %e, "emulation failed");
                let text = format!("ERR upstream unavailable: {e}");
                self.reply_local(|w, out| w.error(out, &text));
            }
        }
    }

    /// Walks the project's keys on every server that holds keys (each
    /// master in cluster mode).
    async fn run_emulation(&mut self, emulation: Emulation) -> Result<(), DirectError> {
        let mut walk = KeyWalk::new(self.shared.key_holders()?, self.namespace.pattern(b"*"));
        let by_slot = self.shared.cluster.is_some();
        while let Some((client, keys)) = walk.next_batch().await? {
            match emulation {
                Emulation::Flush { lazy } => delete(client, keys, lazy, by_slot).await?,
                Emulation::RandomKey => {
                    if let Some(key) = pick(&keys) {
                        let key = self.namespace.strip(key).unwrap_or_default();
                        self.reply_local(|w, out| w.bulk(out, &key));
                        return Ok(());
                    }
                }
            }
        }
        match emulation {
            Emulation::Flush { .. } => self.reply_local(|w, out| w.simple(out, "OK")),
            Emulation::RandomKey => self.reply_local(|w, out| w.null(out)),
        }
        Ok(())
    }

    /// Sends everything queued upstream and waits until every request sent
    /// so far has its reply. False if the upstream failed meanwhile (the
    /// session then closes, as on any upstream loss).
    pub(super) async fn drain(&mut self) -> bool {
        self.submit_shared();
        let waiting = |p: &Pending| !matches!(p, Pending::Ready(_));
        while self.pending.iter().any(waiting) {
            // Shared replies come first; the own link waits for them.
            if self.shared_owed > 0 {
                let delivery = super::receive_shared(&mut self.shared_route).await;
                self.take_delivery_from_shared(delivery);
                // A lost link takes the session's end of it along.
                if self.shared_route.is_none() {
                    return false;
                }
                continue;
            }
            let (Some(writer), Some(link)) = (self.link_writer.as_mut(), self.link.as_mut()) else {
                return false;
            };
            if !self.up_out.is_empty() {
                let sent = writer.write_all(&self.up_out).await;
                if let Err(e) = sent.and(writer.flush().await) {
                    self.upstream_lost(&super::Fault::Upstream(e.into()));
                    return false;
                }
                self.up_out.clear();
            }
            frame::make_room(&mut link.input);
            match link.reader.read_buf(&mut link.input).await {
                Ok(0) => {
                    let closed = UpstreamError::Closed;
                    self.upstream_lost(&super::Fault::Upstream(closed));
                    return false;
                }
                Ok(_) => {
                    if let Err(fault) = self.take_replies() {
                        self.upstream_lost(&fault);
                        return false;
                    }
                }
                Err(e) => {
                    self.upstream_lost(&super::Fault::Upstream(e.into()));
                    return false;
                }
            }
        }
        true
    }
}

/// One `SCAN` step over `pattern`: the next cursor and the keys found.
async fn scan(
    client: &mut DirectClient,
    cursor: &[u8],
    pattern: &[u8],
) -> Result<(Bytes, Vec<Bytes>), DirectError> {
    let batch = BATCH.to_string();
    let reply = client
        .call(&[
            b"SCAN",
            cursor,
            b"MATCH",
            pattern,
            b"COUNT",
            batch.as_bytes(),
        ])
        .await?;
    let mut parts = reply.into_array().unwrap_or_default().into_iter();
    let next = parts.next().and_then(Reply::into_bytes);
    let keys = parts.next().and_then(Reply::into_array);
    match (next, keys) {
        (Some(next), Some(keys)) => Ok((
            next,
            keys.into_iter().filter_map(Reply::into_bytes).collect(),
        )),
        _ => Err(DirectError::Upstream(UpstreamError::Protocol(
            ProtocolError::Decode("a SCAN reply of the wrong shape".into()),
        ))),
    }
}

/// A key chosen at random among `keys`.
///
/// `RANDOMKEY` over a namespace picks among the keys of the first `SCAN`
/// step that finds any, not uniformly over all of the project's keys: a
/// uniform choice would need a full scan per call.
fn pick(keys: &[Bytes]) -> Option<&Bytes> {
    if keys.is_empty() {
        return None;
    }
    let mut byte = [0u8; 8];
    let index = match ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte) {
        Ok(()) => u64::from_le_bytes(byte) as usize % keys.len(),
        Err(_) => 0,
    };
    keys.get(index)
}

/// What `INFO` reports of the upstream server: only the fields clients
/// read to detect features.
#[derive(Debug)]
pub struct UpstreamFacts {
    redis_version: String,
    arch_bits: String,
}

/// Sessions of this proxy logged in to each project, for `INFO clients`.
#[derive(Debug, Default)]
pub struct ProjectSessions {
    by_project: Mutex<HashMap<Arc<str>, usize>>,
}

impl ProjectSessions {
    pub(super) fn enter(&self, project: &Arc<str>) {
        let mut all = self
            .by_project
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *all.entry(Arc::clone(project)).or_default() += 1;
    }

    pub(super) fn leave(&self, project: &Arc<str>) {
        let mut all = self
            .by_project
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = all.get_mut(project) {
            *count = count.saturating_sub(1);
        }
    }

    fn count(&self, project: &str) -> usize {
        let all = self
            .by_project
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        all.get(project).copied().unwrap_or(0)
    }
}

/// `INFO`'s sections, in Redis's order, that the proxy reports.
const SECTIONS: &[&str] = &["server", "clients", "keyspace"];

impl Session {
    /// `INFO [section…]`: a view of the proxy and the project, in Redis's
    /// layout. It reports the upstream's version and word size (clients
    /// detect features by them), this proxy's sessions of the project as
    /// `connected_clients`, and the project's key count; nothing about
    /// other projects or the server's memory, replication or commands.
    pub(super) async fn info(&mut self, args: &[Bytes]) {
        let asked: Vec<String> = args[1..]
            .iter()
            .map(|a| String::from_utf8_lossy(a).to_ascii_lowercase())
            .collect();
        let everything = asked.is_empty()
            || asked
                .iter()
                .any(|s| matches!(s.as_str(), "all" | "everything" | "default"));
        let wanted: Vec<&str> = SECTIONS
            .iter()
            .copied()
            .filter(|section| everything || asked.iter().any(|s| s == section))
            .collect();

        let facts = match upstream_facts(Arc::clone(&self.shared)).await {
            Ok(facts) => facts,
            Err(e) => {
                let text = format!("ERR upstream unavailable: {e}");
                return self.reply_local(|w, out| w.error(out, &text));
            }
        };
        let mut text = String::new();
        for section in wanted {
            if !text.is_empty() {
                text.push_str("\r\n");
            }
            match section {
                "server" => {
                    text.push_str("# Server\r\n");
                    text.push_str(&format!("redis_version:{}\r\n", facts.redis_version));
                    text.push_str("redis_mode:standalone\r\n");
                    text.push_str(&format!("arch_bits:{}\r\n", facts.arch_bits));
                    text.push_str(&format!(
                        "redcloak_version:{}\r\n",
                        env!("CARGO_PKG_VERSION")
                    ));
                }
                "clients" => {
                    let project = self.identity.as_ref().map(|i| i.project.clone());
                    let count = project.map_or(0, |p| self.shared.sessions.count(&p));
                    text.push_str("# Clients\r\n");
                    text.push_str(&format!("connected_clients:{count}\r\n"));
                }
                _ => {
                    let keys = match self.count_keys().await {
                        Ok(keys) => keys,
                        Err(e) => {
                            let text = format!("ERR upstream unavailable: {e}");
                            return self.reply_local(|w, out| w.error(out, &text));
                        }
                    };
                    text.push_str("# Keyspace\r\n");
                    // Redis leaves empty databases out. Expiry counts are not
                    // reported: they would need a TTL lookup per key.
                    if keys > 0 {
                        text.push_str(&format!("db0:keys={keys}\r\n"));
                    }
                }
            }
        }
        self.reply_local(|w, out| w.verbatim(out, text.as_bytes()));
    }

    /// The project's key count, after the requests sent before. `Broken`
    /// when the upstream failed while draining (already answered).
    async fn count_keys(&mut self) -> Result<i64, DirectError> {
        if !self.drain().await {
            return Err(DirectError::Broken);
        }
        let mut walk = KeyWalk::new(self.shared.key_holders()?, self.namespace.pattern(b"*"));
        let mut count = 0;
        while let Some((_, keys)) = walk.next_batch().await? {
            count += keys.len() as i64;
        }
        Ok(count)
    }
}

/// `SCAN … MATCH pattern` over several servers in turn, a batch at a time.
struct KeyWalk {
    servers: std::vec::IntoIter<Connector>,
    /// The link to the server being walked.
    client: Option<DirectClient>,
    /// Where its walk stands; `None` before its first `SCAN`.
    cursor: Option<Bytes>,
    pattern: Bytes,
}

impl KeyWalk {
    fn new(servers: Vec<Connector>, pattern: Bytes) -> KeyWalk {
        KeyWalk {
            servers: servers.into_iter(),
            client: None,
            cursor: None,
            pattern,
        }
    }

    /// The next batch of keys (possibly empty), with the link to the server
    /// that holds them; `None` once every server has been walked.
    async fn next_batch(&mut self) -> Result<Option<(&mut DirectClient, Vec<Bytes>)>, DirectError> {
        // A server is done when its cursor comes back to 0.
        if self.cursor.as_deref() == Some(b"0") {
            self.client = None;
            self.cursor = None;
        }
        if self.client.is_none() {
            let Some(server) = self.servers.next() else {
                return Ok(None);
            };
            let client = DirectClient::connect(&server)
                .await
                .map_err(DirectError::Upstream)?;
            self.client = Some(client);
        }
        let Some(client) = self.client.as_mut() else {
            return Ok(None);
        };
        let cursor = self
            .cursor
            .take()
            .unwrap_or_else(|| Bytes::from_static(b"0"));
        let (next, keys) = scan(client, &cursor, &self.pattern).await?;
        self.cursor = Some(next);
        Ok(Some((client, keys)))
    }
}

/// The upstream's version and word size, asked once per proxy.
async fn upstream_facts(shared: Arc<Shared>) -> Result<Arc<UpstreamFacts>, DirectError> {
    shared
        .upstream_facts
        .get_or_try_init(|| async {
            let mut client = DirectClient::connect(&shared.any_server()?)
                .await
                .map_err(DirectError::Upstream)?;
            let reply = client.call(&[b"INFO", b"server"]).await?;
            let text = reply.into_bytes().unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            let field = |name: &str| {
                text.lines()
                    .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_default()
            };
            Ok(Arc::new(UpstreamFacts {
                redis_version: field("redis_version"),
                arch_bits: field("arch_bits"),
            }))
        })
        .await
        .cloned()
}
