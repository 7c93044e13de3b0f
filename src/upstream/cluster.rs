//! A Redis Cluster behind the proxy: which master serves which hash slot.
//!
//! The map is learned with `CLUSTER SLOTS` from the seed nodes (and from
//! every master known since), patched at once when a node answers `MOVED`,
//! and learned again after a redirection, after a node could not be
//! reached, and on a timer. Readers take a snapshot (`Arc`) and never wait
//! for a refresh.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::Connector;
use crate::direct::{DirectClient, Reply};

/// Hash slots in a Redis Cluster.
pub const SLOTS: usize = 16384;

/// How often the map is learned again when nothing asks for it sooner.
const REFRESH_INTERVAL: Duration = Duration::from_secs(5);

/// The least time between two refreshes, so that a burst of redirections
/// costs one `CLUSTER SLOTS`, not one per reply.
const REFRESH_SPACING: Duration = Duration::from_millis(100);

/// How long one node may take to answer `CLUSTER SLOTS`.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(2);

/// No master serves the slot (yet).
const UNASSIGNED: u16 = u16::MAX;

/// The most masters a map may name. Redis Cluster is meant for up to about
/// 1000 nodes; the bound keeps a hostile `CLUSTER SLOTS` or `MOVED` reply
/// from growing the map without end, and leaves a `SCAN` cursor room to
/// name the master (see the router).
pub const MAX_MASTERS: usize = 1024;

/// The slot of a key as Redis Cluster computes it: CRC16 of the key, or of
/// its hash tag (the text between the first `{` and the next `}`, if not
/// empty). The namespace prefix holds no braces, so a client's tag decides
/// the slot of its namespaced key.
pub fn slot(key: &[u8]) -> u16 {
    redis_protocol::redis_keyslot(key)
}

/// Which master serves each slot.
#[derive(Clone, Debug)]
pub struct SlotMap {
    /// Index into `masters` per slot, or `UNASSIGNED`.
    owners: Vec<u16>,
    /// `host:port` of each master, in the order of the first slot it serves.
    masters: Vec<Arc<str>>,
}

impl Default for SlotMap {
    fn default() -> SlotMap {
        SlotMap {
            owners: vec![UNASSIGNED; SLOTS],
            masters: Vec::new(),
        }
    }
}

impl SlotMap {
    /// The master serving `slot`, if the map knows one.
    pub fn owner(&self, slot: u16) -> Option<&Arc<str>> {
        let index = *self.owners.get(usize::from(slot))?;
        self.masters.get(usize::from(index))
    }

    /// Every master, in a stable order (by the first slot each serves), so
    /// that a `SCAN` cursor can name one by its position.
    pub fn masters(&self) -> &[Arc<str>] {
        &self.masters
    }

    pub fn is_empty(&self) -> bool {
        self.masters.is_empty()
    }

    /// Reads a `CLUSTER SLOTS` reply. `asked` is the node that answered,
    /// whose host stands in for an empty or unknown endpoint. `None` for a
    /// reply that is not a slot map at all.
    pub fn from_cluster_slots(reply: Reply, asked: &str) -> Option<SlotMap> {
        let mut map = SlotMap::default();
        let asked_host = asked.rsplit_once(':').map_or(asked, |(host, _)| host);
        for range in reply.into_array()? {
            let mut fields = range.into_array()?.into_iter();
            let (Some(Reply::Integer(first)), Some(Reply::Integer(last))) =
                (fields.next(), fields.next())
            else {
                return None;
            };
            let mut node = fields.next()?.into_array()?.into_iter();
            let host = node.next()?.into_bytes()?;
            let Some(Reply::Integer(port)) = node.next() else {
                return None;
            };
            let host = match std::str::from_utf8(&host).ok()? {
                "" | "?" => asked_host,
                host => host,
            };
            let address: Arc<str> = Arc::from(format!("{host}:{port}"));
            let first = usize::try_from(first).ok()?;
            let last = usize::try_from(last).ok()?;
            if first > last || last >= SLOTS {
                return None;
            }
            let index = map.index_of(address)?;
            map.owners[first..=last].fill(index);
        }
        map.order_masters();
        Some(map)
    }

    /// The map with `slot` moved to `address`, as a `MOVED` reply says;
    /// `None` if that would name more than [`MAX_MASTERS`] masters.
    fn with_moved(&self, slot: u16, address: &str) -> Option<SlotMap> {
        let mut map = self.clone();
        let index = map.index_of(Arc::from(address))?;
        *map.owners.get_mut(usize::from(slot))? = index;
        // A master that no longer serves any slot leaves the map.
        map.order_masters();
        Some(map)
    }

    /// The position of `address` among the masters, added if new; `None`
    /// past [`MAX_MASTERS`].
    fn index_of(&mut self, address: Arc<str>) -> Option<u16> {
        let index = match self.masters.iter().position(|m| *m == address) {
            Some(index) => index,
            None if self.masters.len() < MAX_MASTERS => {
                self.masters.push(address);
                self.masters.len() - 1
            }
            None => return None,
        };
        u16::try_from(index).ok()
    }

    /// Puts the masters in the order of the first slot each serves and
    /// drops those that serve none.
    fn order_masters(&mut self) {
        let mut order = Vec::with_capacity(self.masters.len());
        for &owner in &self.owners {
            if owner != UNASSIGNED && !order.contains(&owner) {
                order.push(owner);
            }
        }
        let mut renumber = vec![UNASSIGNED; self.masters.len()];
        for (new, &old) in order.iter().enumerate() {
            renumber[usize::from(old)] = new as u16;
        }
        for owner in &mut self.owners {
            if *owner != UNASSIGNED {
                *owner = renumber[usize::from(*owner)];
            }
        }
        self.masters = order
            .iter()
            .map(|&old| Arc::clone(&self.masters[usize::from(old)]))
            .collect();
    }
}

/// The cluster the proxy fronts: seed nodes, the current slot map, and
/// links to any node with the proxy's credentials and TLS.
pub struct Cluster {
    connector: Connector,
    seeds: Vec<String>,
    map: RwLock<Arc<SlotMap>>,
    refresh_wanted: Notify,
    /// Counts completed refreshes, so waiters can tell a new map came.
    refreshes: AtomicU64,
    /// Why the last refresh failed, if it did; no secret, no address.
    last_failure: std::sync::Mutex<Option<String>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("seeds", &self.seeds)
            .field("masters", &self.map().masters().len())
            .finish()
    }
}

impl Cluster {
    /// A cluster reached through `seeds`, with links made like `connector`
    /// (credentials, TLS). The map is empty until the first refresh.
    pub fn new(connector: Connector, seeds: Vec<String>) -> Arc<Cluster> {
        Arc::new(Cluster {
            connector,
            seeds,
            map: RwLock::new(Arc::new(SlotMap::default())),
            refresh_wanted: Notify::new(),
            refreshes: AtomicU64::new(0),
            last_failure: std::sync::Mutex::new(None),
        })
    }

    /// The current slot map.
    pub fn map(&self) -> Arc<SlotMap> {
        Arc::clone(&self.map.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// A connector for the node at `address`.
    pub fn connector_for(&self, address: &str) -> Connector {
        self.connector.to(address)
    }

    /// Links to every master, for commands that must visit them all.
    pub fn master_connectors(&self) -> Vec<Connector> {
        self.map()
            .masters()
            .iter()
            .map(|address| self.connector_for(address))
            .collect()
    }

    /// A node answered `MOVED slot address`: use it now, and learn the
    /// whole map again soon, since a moved slot rarely moves alone.
    pub fn moved(&self, slot: u16, address: &str) {
        {
            let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
            if map.owner(slot).map(|a| &**a) != Some(address)
                && let Some(moved) = map.with_moved(slot, address)
            {
                *map = Arc::new(moved);
            }
        }
        self.request_refresh();
    }

    /// Asks the refresher to learn the map again (soon, coalesced).
    pub fn request_refresh(&self) {
        self.refresh_wanted.notify_one();
    }

    /// How many refreshes have completed.
    pub fn refresh_count(&self) -> u64 {
        self.refreshes.load(Ordering::Acquire)
    }

    /// Learns the map now; true if some node answered with one.
    pub async fn refresh(&self) -> bool {
        let mut candidates: Vec<String> =
            self.map().masters().iter().map(|m| m.to_string()).collect();
        for seed in &self.seeds {
            if !candidates.contains(seed) {
                candidates.push(seed.clone());
            }
        }
        let mut failure = String::from("no cluster node is configured");
        for address in candidates {
            match self.ask_slots(&address).await {
                Ok(map) if !map.is_empty() => {
                    let masters = map.masters().len();
                    *self.map.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(map);
                    self.refreshes.fetch_add(1, Ordering::AcqRel);
                    *self.failure() = None;
                    debug!(masters, "cluster slot map learned");
                    return true;
                }
                Ok(_) => failure = "the cluster serves no slot".to_owned(),
                Err(why) => failure = why,
            }
        }
        debug!(error = %failure, "no cluster node answered CLUSTER SLOTS");
        *self.failure() = Some(failure);
        false
    }

    /// The error text (without the leading `-`) for a request whose slot
    /// has no master in `map`: why no map could be learned at all, or
    /// Redis Cluster's own `CLUSTERDOWN`.
    pub fn no_owner_error(&self, map: &SlotMap) -> String {
        match self.unavailable_reason() {
            Some(why) if map.is_empty() => {
                format!(
                    "ERR upstream unavailable: {}",
                    why.replace(['\r', '\n'], " ")
                )
            }
            _ => "CLUSTERDOWN Hash slot not served".to_owned(),
        }
    }

    /// Why the slot map could not be learned, while it can't.
    pub fn unavailable_reason(&self) -> Option<String> {
        self.failure().clone()
    }

    fn failure(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.last_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    async fn ask_slots(&self, address: &str) -> Result<SlotMap, String> {
        let attempt = async {
            let mut client = DirectClient::connect(&self.connector_for(address))
                .await
                .map_err(|e| e.to_string())?
                .with_timeout(REFRESH_TIMEOUT);
            let reply = client
                .call(&[b"CLUSTER", b"SLOTS"])
                .await
                .map_err(|e| e.to_string())?;
            if let Some(text) = reply.error_text() {
                return Err(format!("a node refused CLUSTER SLOTS: {text}"));
            }
            SlotMap::from_cluster_slots(reply, address)
                .ok_or_else(|| "a node answered CLUSTER SLOTS with something else".to_owned())
        };
        tokio::time::timeout(REFRESH_TIMEOUT * 2, attempt)
            .await
            .unwrap_or_else(|_| Err("CLUSTER SLOTS timed out".to_owned()))
    }

    /// Keeps the map fresh for as long as the proxy runs: on request, at
    /// most every `REFRESH_SPACING`, and every `REFRESH_INTERVAL` anyway.
    pub async fn keep_fresh(self: Arc<Cluster>) {
        let mut known = !self.map().is_empty();
        loop {
            let _ = tokio::time::timeout(REFRESH_INTERVAL, self.refresh_wanted.notified()).await;
            let learned = self.refresh().await;
            if learned && !known {
                info!(
                    masters = self.map().masters().len(),
                    "cluster slot map learned"
                );
            } else if !learned && known {
                let why = self.unavailable_reason().unwrap_or_default();
                warn!(error = %why, "no cluster node answered CLUSTER SLOTS; keeping the last slot map");
            }
            known = learned || known;
            tokio::time::sleep(REFRESH_SPACING).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn int(n: i64) -> Reply {
        Reply::Integer(n)
    }

    fn node(host: &str, port: i64) -> Reply {
        Reply::Array(Some(vec![
            Reply::Bulk(Some(Bytes::copy_from_slice(host.as_bytes()))),
            int(port),
            Reply::Bulk(Some(Bytes::from_static(b"0123abcd"))),
        ]))
    }

    fn range(first: i64, last: i64, master: Reply, replica: Reply) -> Reply {
        Reply::Array(Some(vec![int(first), int(last), master, replica]))
    }

    /// The map of one range of slots served by 127.0.0.1:7000.
    fn one_range(first: i64, last: i64) -> SlotMap {
        let reply = Reply::Array(Some(vec![range(
            first,
            last,
            node("127.0.0.1", 7000),
            node("127.0.0.1", 7001),
        )]));
        SlotMap::from_cluster_slots(reply, "127.0.0.1:7000").expect("a map")
    }

    #[test]
    fn slots_follow_redis_cluster_and_hash_tags() {
        // Values from Redis Cluster's specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot(b"foo"), 12182);
        // CRC16/XMODEM of "123456789" is 0x31C3, which is below 16384.
        assert_eq!(slot(b"123456789"), 0x31C3);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        // A namespace prefix has no braces: the client's tag still decides.
        assert_eq!(slot(b"project:0123456789abcdef:{user1}:a"), slot(b"user1"));
    }

    #[test]
    fn a_cluster_slots_reply_becomes_a_map_in_slot_order() {
        let reply = Reply::Array(Some(vec![
            range(
                10923,
                16383,
                node("127.0.0.1", 7002),
                node("127.0.0.1", 7005),
            ),
            range(0, 5460, node("127.0.0.1", 7000), node("127.0.0.1", 7003)),
            range(5461, 10922, node("", 7001), node("127.0.0.1", 7004)),
        ]));
        let map = SlotMap::from_cluster_slots(reply, "10.0.0.9:7001").expect("a map");
        let masters: Vec<&str> = map.masters().iter().map(|m| &**m).collect();
        assert_eq!(
            masters,
            ["127.0.0.1:7000", "10.0.0.9:7001", "127.0.0.1:7002"]
        );
        assert_eq!(map.owner(0).map(|a| &**a), Some("127.0.0.1:7000"));
        assert_eq!(map.owner(5461).map(|a| &**a), Some("10.0.0.9:7001"));
        assert_eq!(map.owner(16383).map(|a| &**a), Some("127.0.0.1:7002"));
    }

    #[test]
    fn gaps_stay_unassigned_and_nonsense_is_refused() {
        let map = one_range(0, 99);
        assert!(map.owner(100).is_none());
        let beyond = Reply::Array(Some(vec![range(0, 16384, node("h", 1), node("h", 2))]));
        assert!(SlotMap::from_cluster_slots(beyond, "h:1").is_none());
        assert!(SlotMap::from_cluster_slots(Reply::Integer(3), "h:1").is_none());
    }

    #[test]
    fn moved_patches_one_slot() {
        let map = one_range(0, 16383);
        let moved = map
            .with_moved(42, "127.0.0.1:7009")
            .expect("room for a master");
        assert_eq!(moved.owner(42).map(|a| &**a), Some("127.0.0.1:7009"));
        assert_eq!(moved.owner(43).map(|a| &**a), Some("127.0.0.1:7000"));
    }

    #[test]
    fn maps_name_a_bounded_number_of_masters() {
        // One range per master, each a slot of its own, one past the bound.
        let ranges = (0..=MAX_MASTERS as i64)
            .map(|i| range(i, i, node("10.0.0.1", 1000 + i), node("10.0.0.2", 1)))
            .collect();
        assert!(SlotMap::from_cluster_slots(Reply::Array(Some(ranges)), "h:1").is_none());

        // Moving every slot away from a master drops it from the map, so
        // MOVED replies cannot grow it either.
        let map = one_range(0, 0);
        let moved = map
            .with_moved(0, "127.0.0.1:7009")
            .expect("room for a master");
        let masters: Vec<&str> = moved.masters().iter().map(|m| &**m).collect();
        assert_eq!(masters, ["127.0.0.1:7009"]);
    }
}
