//! Where the session's own link leads in cluster mode.
//!
//! Stateless requests go through the worker's router, which finds each
//! key's node. A session in a stateful mode (a transaction, a watch,
//! subscriptions, a blocking command, RESP3) talks over a link of its own,
//! and that link can lead to one node only: the node serving the keys of
//! the request that needs it. `MULTI` names no key, so the proxy answers it
//! and sends it upstream only once the first queued command with a key has
//! chosen the node.
//!
//! While the session is pinned to a node (in a transaction, watching keys,
//! or subscribed), a request for another node gets Redis Cluster's
//! `CROSSSLOT` error. Otherwise the link moves: the session waits for the
//! replies still owed on it, then connects to the new node.

use bytes::Bytes;
use tracing::debug;

use super::{Pending, Session};
use crate::command::{self, Channels, CommandSpec};
use crate::frame;
use crate::pubsub;
use crate::upstream::{Cluster, slot};

/// The error Redis Cluster gives a request whose keys span slots.
pub(super) const CROSSSLOT: &str = "CROSSSLOT Keys in request don't hash to the same slot";

/// What a request needs of the own link's node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NodeNeed {
    /// No key: the node the link leads to already, or any master.
    Any,
    /// The master serving this slot.
    Slot(u16),
    /// Keys in more than one slot: refused.
    CrossSlot,
}

impl Session {
    /// The node need of a forwarded request, from its keys' slots once
    /// namespaced.
    pub(super) fn node_need(&self, spec: &CommandSpec, args: &[Bytes]) -> NodeNeed {
        if self.shared.cluster.is_none() {
            return NodeNeed::Any;
        }
        let mut keys = Vec::new();
        command::key_indexes(spec, args, &mut keys);
        same_slot(keys.iter().map(|&k| self.namespace.key(&args[k])))
    }

    /// The node need of (un)subscribing: shard channels live on the node of
    /// their slot; other channels reach every node.
    pub(super) fn channel_need(&self, kind: Channels, names: &[Bytes]) -> NodeNeed {
        if self.shared.cluster.is_none() {
            return NodeNeed::Any;
        }
        match kind {
            Channels::Shard => same_slot(
                names
                    .iter()
                    .map(|name| pubsub::upstream_channel(&self.namespace, kind, name)),
            ),
            Channels::Global | Channels::Pattern => NodeNeed::Any,
        }
    }

    /// Opens or moves the own link so it leads where `need` says.
    pub(super) async fn ensure_cluster_link(&mut self, cluster: &Cluster, need: NodeNeed) -> bool {
        let map = cluster.map();
        let wanted = match need {
            NodeNeed::CrossSlot => {
                self.refuse(CROSSSLOT);
                return false;
            }
            NodeNeed::Any if self.link.is_some() => return true,
            NodeNeed::Any => map.masters().first().cloned(),
            NodeNeed::Slot(slot) => map.owner(slot).cloned(),
        };
        let Some(wanted) = wanted else {
            cluster.request_refresh();
            self.refuse(&cluster.no_owner_error(&map));
            return false;
        };
        if self.link.is_some() {
            if self.link_node.as_ref() == Some(&wanted) {
                return true;
            }
            let pinned = self.transaction.is_some() || self.watching || self.subscriptions.active();
            if pinned {
                self.refuse(CROSSSLOT);
                return false;
            }
            if !self.release_link().await {
                return false;
            }
        }
        if !self.open_link(&cluster.connector_for(&wanted)).await {
            cluster.request_refresh();
            return false;
        }
        debug!(node = %wanted, "own link bound to a cluster node");
        self.link_node = Some(wanted);
        // The new connection must speak what the session speaks, and be in
        // the transaction the client opened.
        if self.writer.resp3 {
            frame::put_request(&mut self.up_out, [&b"HELLO"[..], b"3"].into_iter());
            self.pending.push_back(Pending::Internal);
            if let Some(link) = self.link.as_mut() {
                link.resp3 = true;
            }
        }
        if std::mem::take(&mut self.multi_unsent) {
            frame::put_request(&mut self.up_out, [&b"MULTI"[..]].into_iter());
            self.pending.push_back(Pending::Internal);
        }
        true
    }

    /// `MULTI` in cluster mode, unless a watch has chosen the node already:
    /// answered here, and sent once a queued command chooses the node.
    pub(super) async fn defer_multi(&mut self) -> bool {
        if self.shared.cluster.is_none() || self.watching {
            return false;
        }
        if self.link.is_some() && !self.release_link().await {
            return true;
        }
        self.multi_unsent = true;
        self.reply_local(|w, out| w.simple(out, "OK"));
        true
    }

    /// Waits for every reply still owed on the own link, then closes it.
    ///
    /// Known shortcoming: while it waits (for a blocked `BLPOP … 0`, say)
    /// the session does not read from its client, so a client that goes
    /// away meanwhile is noticed only once the wait ends.
    async fn release_link(&mut self) -> bool {
        let owed = self.own_link_busy() || !self.up_out.is_empty();
        if owed && !self.drain().await {
            return false;
        }
        self.link = None;
        self.link_writer = None;
        self.link_node = None;
        true
    }
}

/// `Slot` if every name hashes to one slot, `Any` without names.
fn same_slot(names: impl Iterator<Item = Bytes>) -> NodeNeed {
    let mut need = NodeNeed::Any;
    for name in names {
        let this = slot(&name);
        match need {
            NodeNeed::Any => need = NodeNeed::Slot(this),
            NodeNeed::Slot(first) if first != this => return NodeNeed::CrossSlot,
            _ => {}
        }
    }
    need
}

/// A node's `HELLO` reply as a standalone server would give it: clients
/// must not take the proxy for a cluster and ask it for slots.
pub(super) fn standalone_hello(reply: &[u8]) -> Vec<u8> {
    const CLUSTER: &[u8] = b"$4\r\nmode\r\n$7\r\ncluster\r\n";
    const STANDALONE: &[u8] = b"$4\r\nmode\r\n$10\r\nstandalone\r\n";
    match reply.windows(CLUSTER.len()).position(|w| w == CLUSTER) {
        Some(at) => [&reply[..at], STANDALONE, &reply[at + CLUSTER.len()..]].concat(),
        None => reply.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_replies_say_standalone() {
        let resp2 = b"*14\r\n$6\r\nserver\r\n$5\r\nredis\r\n$4\r\nmode\r\n$7\r\ncluster\r\n$4\r\nrole\r\n$6\r\nmaster\r\n";
        let out = standalone_hello(resp2);
        assert_eq!(
            out,
            b"*14\r\n$6\r\nserver\r\n$5\r\nredis\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n"
        );
        assert_eq!(standalone_hello(b"-ERR no\r\n"), b"-ERR no\r\n");
    }

    #[test]
    fn keys_of_one_slot_share_a_node_and_others_are_cross_slot() {
        let names = |list: &[&str]| {
            list.iter()
                .map(|n| Bytes::copy_from_slice(n.as_bytes()))
                .collect::<Vec<_>>()
                .into_iter()
        };
        assert_eq!(same_slot(names(&[])), NodeNeed::Any);
        assert_eq!(
            same_slot(names(&["p:{u}a", "p:{u}b"])),
            NodeNeed::Slot(slot(b"u"))
        );
        assert_eq!(same_slot(names(&["p:a", "p:b"])), NodeNeed::CrossSlot);
    }
}
