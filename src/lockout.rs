//! Lockout after repeated failed logins (SPEC §3). Failures are counted per
//! (user, client IP) over a sliding window; reaching
//! `failed_access_threshold` locks that pair out for `lockout_secs`, during
//! which its `AUTH` fails whatever the password.
//!
//! Counters live in this process, or with `audit.lockout_shared` in the
//! upstream Redis, under reserved `redcloak:` keys that no project
//! namespace (`project:…`) can name, so that every replica enforces the same
//! lockout. While the upstream can't be reached the local table stands in.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::AuditSettings;
use crate::direct::{DirectClient, Reply};
use crate::upstream::{Cluster, Connector, slot};

/// Pairs the local table tracks at most. A pair costs some hundred bytes,
/// so this bounds the table to about 10 MiB; when it is full, pairs whose
/// failures and lockout have expired are dropped, then pairs that are not
/// locked out. Filling it takes that many failed logins within the window,
/// each paying a password hash.
const MAX_PAIRS: usize = 100_000;

/// Bound on one exchange with the upstream for shared counters; a slower
/// upstream is treated as unreachable for that attempt.
const SHARED_TIMEOUT: Duration = Duration::from_secs(2);

/// Prefixes of the shared keys. They start with `redcloak:`, which no
/// project's namespace (`project:<hex>:`) can produce. The pair's digest
/// follows in braces, a Redis Cluster hash tag, so both keys of a pair live
/// on one node.
const LOCK_PREFIX: &str = "redcloak:lockout:";
const FAILURES_PREFIX: &str = "redcloak:failures:";

/// The shared key of `pair` under `prefix`.
fn shared_key(prefix: &str, pair: &Pair) -> String {
    format!("{prefix}{{{}}}", pair.hex())
}

/// One (user, client IP) pair, as SHA-256(user, NUL, IP): fixed-size
/// whatever the client sends, never the name itself, and the same digest
/// (in hex) names the pair's shared keys. IPv4-mapped IPv6 addresses count
/// as the IPv4 address.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pair([u8; 32]);

impl Pair {
    pub fn new(user: &[u8], ip: IpAddr) -> Pair {
        let mut hash = Sha256::new();
        hash.update(user);
        hash.update([0u8]);
        hash.update(ip.to_canonical().to_string().as_bytes());
        Pair(hash.finalize().into())
    }

    fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for Pair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pair({:.12}…)", self.hex())
    }
}

/// The thresholds of SPEC §2.
#[derive(Clone, Copy, Debug)]
struct Policy {
    threshold: u32,
    window: Duration,
    /// Zero disables lockout (failures are then not even counted).
    lockout: Duration,
}

/// The lockout table, local or shared.
pub struct Lockout {
    policy: Policy,
    local: Mutex<Table>,
    shared: Option<SharedCounters>,
}

impl fmt::Debug for Lockout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lockout")
            .field("policy", &self.policy)
            .field("shared", &self.shared.is_some())
            .finish_non_exhaustive()
    }
}

impl Lockout {
    /// A local table with the thresholds of `settings`.
    pub fn new(settings: &AuditSettings) -> Lockout {
        Lockout {
            policy: Policy {
                threshold: settings.failed_access_threshold.max(1),
                window: Duration::from_secs(settings.failed_access_window_secs.max(1)),
                lockout: Duration::from_secs(settings.lockout_secs),
            },
            local: Mutex::new(Table::default()),
            shared: None,
        }
    }

    /// Keeps the counters in the upstream reached by `connector` (links are
    /// opened on first use, not here).
    pub fn shared_through(self, connector: Connector) -> Lockout {
        self.shared_in(CounterStore::Server(connector))
    }

    /// Keeps the counters in a Redis Cluster, each pair's on the node
    /// serving its slot.
    pub fn shared_through_cluster(self, cluster: Arc<Cluster>) -> Lockout {
        self.shared_in(CounterStore::Cluster(cluster))
    }

    fn shared_in(mut self, store: CounterStore) -> Lockout {
        self.shared = Some(SharedCounters {
            store,
            clients: tokio::sync::Mutex::new(HashMap::new()),
            degraded: AtomicBool::new(false),
        });
        self
    }

    pub fn lockout_secs(&self) -> u64 {
        self.policy.lockout.as_secs()
    }

    /// Whether `pair` is locked out now.
    pub async fn is_locked(&self, pair: &Pair) -> bool {
        if self.policy.lockout.is_zero() {
            return false;
        }
        if let Some(shared) = &self.shared {
            let lock = shared_key(LOCK_PREFIX, pair);
            let exists: [&[u8]; 2] = [b"EXISTS", lock.as_bytes()];
            match shared.call(pair, &[&exists[..]]).await {
                Some(replies) => return replies.first() == Some(&Reply::Integer(1)),
                None => shared.degrade(),
            }
        }
        self.table().is_locked(pair, Instant::now())
    }

    /// Counts a failed login. Returns the number of failures when this one
    /// locks the pair out, so that exactly one alert is raised per lockout
    /// (across replicas, when shared); failures while already locked out
    /// are not counted.
    pub async fn failed(&self, pair: &Pair) -> Option<u32> {
        if self.policy.lockout.is_zero() {
            return None;
        }
        if let Some(shared) = &self.shared {
            match self.shared_failed(shared, pair).await {
                Ok(locked) => return locked,
                Err(()) => shared.degrade(),
            }
        }
        self.table().fail(pair, Instant::now(), &self.policy)
    }

    /// Forgets a pair's failures after a successful login.
    pub async fn succeeded(&self, pair: &Pair) {
        if self.policy.lockout.is_zero() {
            return;
        }
        if let Some(shared) = &self.shared {
            let failures = shared_key(FAILURES_PREFIX, pair);
            let del: [&[u8]; 2] = [b"DEL", failures.as_bytes()];
            if shared.call(pair, &[&del[..]]).await.is_some() {
                return;
            }
            shared.degrade();
        }
        self.table().succeed(pair);
    }

    /// A sorted set of failure times per pair, trimmed to the window and
    /// expiring with it, updated in one transaction; the lock is a key that
    /// expires by itself, created with `NX` so that only one replica
    /// reports it.
    async fn shared_failed(&self, shared: &SharedCounters, pair: &Pair) -> Result<Option<u32>, ()> {
        let failures = shared_key(FAILURES_PREFIX, pair);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let window = self.policy.window.as_millis();
        let oldest = format!("({}", now.saturating_sub(window));
        let now_text = now.to_string();
        let member = format!("{now}-{}", random_tag());
        let window_text = window.to_string();
        let f = failures.as_bytes();

        let multi: [&[u8]; 1] = [b"MULTI"];
        let trim: [&[u8]; 4] = [b"ZREMRANGEBYSCORE", f, b"-inf", oldest.as_bytes()];
        let add: [&[u8]; 4] = [b"ZADD", f, now_text.as_bytes(), member.as_bytes()];
        let card: [&[u8]; 2] = [b"ZCARD", f];
        let expire: [&[u8]; 3] = [b"PEXPIRE", f, window_text.as_bytes()];
        let exec: [&[u8]; 1] = [b"EXEC"];
        let replies = shared
            .call(pair, &[&multi[..], &trim, &add, &card, &expire, &exec])
            .await
            .ok_or(())?;
        let count = replies
            .last()
            .and_then(|exec| match exec {
                Reply::Array(Some(results)) => results.get(2).cloned(),
                _ => None,
            })
            .and_then(|card| match card {
                Reply::Integer(n) => u32::try_from(n).ok(),
                _ => None,
            })
            .ok_or(())?;
        if count < self.policy.threshold {
            return Ok(None);
        }

        let lock = shared_key(LOCK_PREFIX, pair);
        let lockout = self.policy.lockout.as_millis().to_string();
        let count_text = count.to_string();
        let set: [&[u8]; 6] = [
            b"SET",
            lock.as_bytes(),
            count_text.as_bytes(),
            b"PX",
            lockout.as_bytes(),
            b"NX",
        ];
        let del: [&[u8]; 2] = [b"DEL", f];
        let replies = shared.call(pair, &[&set[..], &del]).await.ok_or(())?;
        Ok(replies
            .first()
            .is_some_and(|r| r.is_status("OK"))
            .then_some(count))
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // Each operation leaves the table consistent before it can panic,
        // so a poisoned lock is still safe to use.
        self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A random tag that keeps failure entries of the same millisecond apart.
fn random_tag() -> String {
    let mut bytes = [0u8; 8];
    // A failed random source only makes two same-millisecond failures
    // count once; the lockout still works.
    let _ = SystemRandom::new().fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where shared counters live.
enum CounterStore {
    Server(Connector),
    Cluster(Arc<Cluster>),
}

impl CounterStore {
    /// A connector to the server holding `pair`'s keys.
    fn connector_for(&self, pair: &Pair) -> Option<Connector> {
        match self {
            CounterStore::Server(connector) => Some(connector.clone()),
            CounterStore::Cluster(cluster) => {
                let owner = cluster.map().owner(slot(pair.hex().as_bytes())).cloned();
                if owner.is_none() {
                    cluster.request_refresh();
                }
                Some(cluster.connector_for(&owner?))
            }
        }
    }

    /// Whether the server at `address` may still hold counters.
    fn holds_keys(&self, address: &str) -> bool {
        match self {
            CounterStore::Server(_) => true,
            CounterStore::Cluster(cluster) => {
                cluster.map().masters().iter().any(|m| &**m == address)
            }
        }
    }

    /// A node's refusal may mean the slot map is stale.
    fn refused(&self) {
        if let CounterStore::Cluster(cluster) = self {
            cluster.request_refresh();
        }
    }
}

/// Upstream links for shared counters (one per node in cluster mode), used
/// by one login at a time.
struct SharedCounters {
    store: CounterStore,
    /// The open links, by the address they lead to.
    clients: tokio::sync::Mutex<HashMap<String, DirectClient>>,
    /// Set while the upstream is unreachable, so the fallback is logged
    /// once when it starts and once when it ends.
    degraded: AtomicBool,
}

impl SharedCounters {
    /// Sends the requests as one pipeline; `None` when the upstream can't be
    /// reached or answers an error, after which the link is opened afresh.
    async fn call(&self, pair: &Pair, requests: &[&[&[u8]]]) -> Option<Vec<Reply>> {
        let connector = self.store.connector_for(pair)?;
        let address = connector.address();
        let mut clients = self.clients.lock().await;
        if !clients.contains_key(address) {
            // Links to nodes that left the cluster go before a new one opens.
            clients.retain(|open, _| self.store.holds_keys(open));
            match DirectClient::connect(&connector).await {
                Ok(client) => {
                    clients.insert(address.to_owned(), client.with_timeout(SHARED_TIMEOUT));
                }
                Err(e) => {
                    self.note_failure(&e);
                    return None;
                }
            }
        }
        let client = clients.get_mut(address)?;
        match client.call_many(requests).await {
            Ok(replies) if !replies.iter().any(|r| r.error_text().is_some()) => {
                if self.degraded.swap(false, Ordering::Relaxed) {
                    info!("shared lockout counters are reachable again");
                }
                Some(replies)
            }
            Ok(replies) => {
                let text = replies
                    .iter()
                    .find_map(Reply::error_text)
                    .unwrap_or_default();
                self.store.refused();
                self.note_failure(&text);
                clients.remove(address);
                None
            }
            Err(e) => {
                self.note_failure(&e);
                clients.remove(address);
                None
            }
        }
    }

    fn note_failure(&self, error: &dyn fmt::Display) {
        if !self.degraded.load(Ordering::Relaxed) {
            warn!(error = %error, "shared lockout counters unavailable; counting in this process");
        }
    }

    fn degrade(&self) {
        self.degraded.store(true, Ordering::Relaxed);
    }
}

/// The local counters.
#[derive(Default)]
struct Table {
    pairs: HashMap<Pair, Entry>,
}

#[derive(Default)]
struct Entry {
    /// Times of the failures within the window, oldest first; never more
    /// than the threshold, since reaching it locks and clears.
    failures: VecDeque<Instant>,
    locked_until: Option<Instant>,
}

impl Entry {
    fn locked_at(&self, now: Instant) -> bool {
        self.locked_until.is_some_and(|until| now < until)
    }

    fn expired_at(&self, now: Instant, window: Duration) -> bool {
        !self.locked_at(now)
            && self
                .failures
                .back()
                .is_none_or(|&last| now.saturating_duration_since(last) >= window)
    }
}

impl Table {
    fn is_locked(&mut self, pair: &Pair, now: Instant) -> bool {
        self.pairs.get(pair).is_some_and(|e| e.locked_at(now))
    }

    fn fail(&mut self, pair: &Pair, now: Instant, policy: &Policy) -> Option<u32> {
        if !self.pairs.contains_key(pair) && self.pairs.len() >= MAX_PAIRS {
            self.make_room(now, policy.window);
        }
        let entry = self.pairs.entry(*pair).or_default();
        if entry.locked_at(now) {
            return None;
        }
        entry.locked_until = None;
        while entry
            .failures
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= policy.window)
        {
            entry.failures.pop_front();
        }
        entry.failures.push_back(now);

        let count = u32::try_from(entry.failures.len()).unwrap_or(u32::MAX);
        if count < policy.threshold {
            return None;
        }
        entry.failures.clear();
        entry.locked_until = Some(now + policy.lockout);
        Some(count)
    }

    fn succeed(&mut self, pair: &Pair) {
        if let Some(entry) = self.pairs.get_mut(pair) {
            entry.failures.clear();
        }
    }

    fn make_room(&mut self, now: Instant, window: Duration) {
        self.pairs.retain(|_, e| !e.expired_at(now, window));
        if self.pairs.len() >= MAX_PAIRS {
            self.pairs.retain(|_, e| e.locked_at(now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(threshold: u32, window_secs: u64, lockout_secs: u64) -> Policy {
        Policy {
            threshold,
            window: Duration::from_secs(window_secs),
            lockout: Duration::from_secs(lockout_secs),
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn failures_lock_a_pair_at_the_threshold_and_the_lock_expires() {
        let p = policy(3, 60, 30);
        let mut table = Table::default();
        let pair = Pair::new(b"alice", ip("10.1.1.1"));
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);

        assert_eq!(table.fail(&pair, at(0), &p), None);
        assert_eq!(table.fail(&pair, at(1), &p), None);
        assert!(!table.is_locked(&pair, at(1)));
        assert_eq!(table.fail(&pair, at(2), &p), Some(3));
        assert!(table.is_locked(&pair, at(2)));
        assert!(table.is_locked(&pair, at(31)));

        // Failures while locked out are not counted and raise nothing.
        assert_eq!(table.fail(&pair, at(10), &p), None);
        assert!(!table.is_locked(&pair, at(32)));

        // After expiry counting starts again from zero.
        assert_eq!(table.fail(&pair, at(33), &p), None);
        assert_eq!(table.fail(&pair, at(34), &p), None);
        assert_eq!(table.fail(&pair, at(35), &p), Some(3));
    }

    #[test]
    fn failures_are_counted_per_user_and_per_client_ip() {
        let p = policy(2, 60, 30);
        let mut table = Table::default();
        let now = Instant::now();
        let alice_here = Pair::new(b"alice", ip("10.1.1.1"));
        let alice_there = Pair::new(b"alice", ip("10.1.1.2"));
        let bob_here = Pair::new(b"bob", ip("10.1.1.1"));

        assert_eq!(table.fail(&alice_here, now, &p), None);
        assert_eq!(table.fail(&alice_there, now, &p), None);
        assert_eq!(table.fail(&bob_here, now, &p), None);
        assert_eq!(table.fail(&alice_here, now, &p), Some(2));
        assert!(table.is_locked(&alice_here, now));
        assert!(!table.is_locked(&alice_there, now));
        assert!(!table.is_locked(&bob_here, now));
    }

    #[test]
    fn failures_older_than_the_window_no_longer_count() {
        let p = policy(3, 10, 30);
        let mut table = Table::default();
        let pair = Pair::new(b"alice", ip("10.1.1.1"));
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);

        assert_eq!(table.fail(&pair, at(0), &p), None);
        assert_eq!(table.fail(&pair, at(5), &p), None);
        assert_eq!(table.fail(&pair, at(11), &p), None);
        assert_eq!(table.fail(&pair, at(14), &p), Some(3));
    }

    #[test]
    fn a_successful_login_forgets_the_failures() {
        let p = policy(2, 60, 30);
        let mut table = Table::default();
        let pair = Pair::new(b"alice", ip("10.1.1.1"));
        let now = Instant::now();
        assert_eq!(table.fail(&pair, now, &p), None);
        table.succeed(&pair);
        assert_eq!(table.fail(&pair, now, &p), None);
        assert_eq!(table.fail(&pair, now, &p), Some(2));
    }

    #[test]
    fn pairs_are_digests_of_name_and_canonical_address() {
        let v4 = Pair::new(b"alice", ip("192.0.2.1"));
        assert_eq!(v4, Pair::new(b"alice", ip("::ffff:192.0.2.1")));
        assert_ne!(v4, Pair::new(b"alice", ip("192.0.2.2")));
        // The separator keeps ("ab", c) and ("a", bc) apart.
        assert_ne!(
            Pair::new(b"alice1", ip("0.0.0.1")),
            Pair::new(b"alice", ip("10.0.0.1"))
        );
        assert_eq!(v4.hex().len(), 64);
        assert!(!format!("{v4:?}").contains("alice"));
    }

    #[test]
    fn a_full_table_drops_expired_pairs_first_and_keeps_locked_ones() {
        let p = policy(1, 10, 600);
        let mut table = Table::default();
        let t0 = Instant::now();
        let locked = Pair::new(b"victim", ip("10.0.0.1"));
        assert_eq!(table.fail(&locked, t0, &p), Some(1));

        let p2 = policy(5, 10, 600);
        for i in 0..MAX_PAIRS - 1 {
            let pair = Pair::new(format!("user{i}").as_bytes(), ip("10.0.0.2"));
            table.fail(&pair, t0, &p2);
        }
        assert_eq!(table.pairs.len(), MAX_PAIRS);

        let later = t0 + Duration::from_secs(5);
        let newcomer = Pair::new(b"newcomer", ip("10.0.0.3"));
        table.fail(&newcomer, later, &p2);
        assert_eq!(table.pairs.len(), 2, "unlocked pairs made room");
        assert!(table.is_locked(&locked, later));
    }

    #[tokio::test]
    async fn zero_lockout_seconds_never_lock() {
        let settings = AuditSettings {
            failed_access_threshold: 1,
            lockout_secs: 0,
            ..AuditSettings::default()
        };
        let lockout = Lockout::new(&settings);
        let pair = Pair::new(b"alice", ip("10.1.1.1"));
        assert_eq!(lockout.failed(&pair).await, None);
        assert!(!lockout.is_locked(&pair).await);
    }

    #[tokio::test]
    async fn the_local_table_serves_the_async_interface() {
        let settings = AuditSettings {
            failed_access_threshold: 2,
            ..AuditSettings::default()
        };
        let lockout = Lockout::new(&settings);
        let pair = Pair::new(b"alice", ip("10.1.1.1"));
        assert_eq!(lockout.failed(&pair).await, None);
        assert_eq!(lockout.failed(&pair).await, Some(2));
        assert!(lockout.is_locked(&pair).await);
        assert_eq!(lockout.lockout_secs(), 300);
    }
}
