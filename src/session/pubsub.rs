//! A session's Pub/Sub: subscribing in the project's channel space, keeping
//! track of its subscriptions (Redis's RESP2 subscribed mode allows only a
//! few commands), and routing pushed frames past the plan FIFO.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};

use super::{NodeNeed, Pending, Session};
use crate::command::{Channels, ReplyShape};
use crate::frame::{self, ProtocolError};
use crate::namespace::Namespace;
use crate::plan::Plan;
use crate::pubsub::{self, PushKind};

/// The channels, patterns and shard channels one session is subscribed to,
/// under the client's names. Mirrors what Redis holds for the session's
/// upstream link, since every (un)subscribe goes through here.
///
/// Messages are unprefixed with the session's current namespace. A client
/// that re-authenticates into another project while subscribed keeps its
/// old subscriptions upstream, and their messages, which no longer match
/// the namespace, are dropped rather than shown; Redis itself has no
/// projects, so there is no behaviour to copy here.
#[derive(Debug, Default)]
pub(super) struct Subscriptions {
    channels: HashSet<Bytes>,
    patterns: HashSet<Bytes>,
    shard: HashSet<Bytes>,
    /// The session has subscribed at some point: from then on, frames no
    /// request waits for may be Pub/Sub traffic.
    pub(super) ever: bool,
}

impl Subscriptions {
    fn of(&mut self, kind: Channels) -> &mut HashSet<Bytes> {
        match kind {
            Channels::Global => &mut self.channels,
            Channels::Pattern => &mut self.patterns,
            Channels::Shard => &mut self.shard,
        }
    }

    /// Whether the session is in Redis's subscribed mode.
    pub(super) fn active(&self) -> bool {
        !(self.channels.is_empty() && self.patterns.is_empty() && self.shard.is_empty())
    }
}

/// Pattern subscriptions of every session of this proxy, per project, so
/// that `PUBSUB NUMPAT` can count the project's patterns only.
#[derive(Debug, Default)]
pub struct PatternRegistry {
    by_project: Mutex<HashMap<Arc<str>, HashMap<Bytes, usize>>>,
}

impl PatternRegistry {
    fn add(&self, project: &Arc<str>, pattern: &Bytes) {
        let mut all = self
            .by_project
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *all.entry(Arc::clone(project))
            .or_default()
            .entry(pattern.clone())
            .or_default() += 1;
    }

    fn remove(&self, project: &Arc<str>, pattern: &Bytes) {
        let mut all = self
            .by_project
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(patterns) = all.get_mut(project)
            && let Some(count) = patterns.get_mut(pattern)
        {
            *count -= 1;
            if *count == 0 {
                patterns.remove(pattern);
            }
        }
    }

    fn count(&self, project: &str) -> usize {
        let all = self
            .by_project
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        all.get(project).map_or(0, HashMap::len)
    }
}

/// The reply Redis gives to other commands in RESP2 subscribed mode.
pub(super) fn subscribed_mode_error(name: &str) -> String {
    format!(
        "ERR Can't execute '{name}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
    )
}

impl Session {
    /// `SUBSCRIBE`, `PSUBSCRIBE`, `SSUBSCRIBE`: one confirmation per name
    /// comes back.
    pub(super) async fn subscribe(&mut self, kind: Channels, args: &[Bytes]) {
        if !self.ensure_link(self.channel_need(kind, &args[1..])).await {
            return;
        }
        let names = &args[1..];
        self.send_channels(&args[0], kind, names);
        for name in names {
            if self.subscriptions.of(kind).insert(name.clone()) && kind == Channels::Pattern {
                self.register_pattern(name);
            }
        }
        self.subscriptions.ever = true;
        let deliver = self.take_delivery();
        self.pending.push_back(Pending::PubSub {
            remaining: names.len(),
            deliver,
        });
    }

    /// `UNSUBSCRIBE`, `PUNSUBSCRIBE`, `SUNSUBSCRIBE`: one confirmation per
    /// name, or per current subscription without names (at least one).
    pub(super) async fn unsubscribe(&mut self, kind: Channels, args: &[Bytes]) {
        if !self.ensure_link(NodeNeed::Any).await {
            return;
        }
        let names = &args[1..];
        self.send_channels(&args[0], kind, names);
        let removed: Vec<Bytes> = if names.is_empty() {
            self.subscriptions.of(kind).drain().collect()
        } else {
            names
                .iter()
                .filter(|name| self.subscriptions.of(kind).remove(*name))
                .cloned()
                .collect()
        };
        let remaining = if names.is_empty() {
            removed.len().max(1)
        } else {
            names.len()
        };
        if kind == Channels::Pattern {
            for name in &removed {
                self.unregister_pattern(name);
            }
        }
        let deliver = self.take_delivery();
        self.pending
            .push_back(Pending::PubSub { remaining, deliver });
    }

    /// `PUBLISH`, `SPUBLISH` on the project's channel.
    pub(super) async fn publish(&mut self, kind: Channels, args: &[Bytes]) {
        if !pubsub::may_publish(&args[1]) {
            return self.refuse("ERR redcloak does not publish on keyspace notification channels");
        }
        let channel = pubsub::upstream_channel(&self.namespace, kind, &args[1]);
        // A shard channel lives on the node of its slot.
        let need = match kind {
            Channels::Shard => NodeNeed::Slot(crate::upstream::slot(&channel)),
            Channels::Global | Channels::Pattern => NodeNeed::Any,
        };
        self.forward_request_to(
            need,
            &[&args[0], &channel, &args[2]],
            "publish",
            ReplyShape::Plain,
        )
        .await;
    }

    /// `PUBSUB CHANNELS|SHARDCHANNELS [pattern]`: the project's channels.
    pub(super) async fn pubsub_channels(&mut self, kind: Channels, args: &[Bytes]) {
        let pattern = args.get(2).map_or(&b"*"[..], |p| p.as_ref());
        let confined = pubsub::upstream_channel(&self.namespace, Channels::Pattern, pattern);
        let sub: &[u8] = match kind {
            Channels::Shard => b"SHARDCHANNELS",
            Channels::Global | Channels::Pattern => b"CHANNELS",
        };
        self.forward_request(&[b"PUBSUB", sub, &confined], "pubsub", ReplyShape::Keys)
            .await;
    }

    /// `PUBSUB NUMSUB|SHARDNUMSUB channel…`.
    pub(super) async fn pubsub_numsub(&mut self, kind: Channels, args: &[Bytes]) {
        let channels: Vec<Bytes> = args[2..]
            .iter()
            .map(|c| pubsub::upstream_channel(&self.namespace, kind, c))
            .collect();
        let mut request: Vec<&[u8]> = vec![&args[0], &args[1]];
        request.extend(channels.iter().map(|c| c.as_ref()));
        self.forward_request(&request, "pubsub", ReplyShape::ChannelCounts)
            .await;
    }

    /// `PUBSUB NUMPAT`: the distinct patterns the project's sessions on this
    /// proxy are subscribed to. Redis's own count covers every project, and
    /// other proxy replicas' sessions are not seen.
    pub(super) fn pubsub_numpat(&mut self) {
        let count = self
            .identity
            .as_ref()
            .map_or(0, |identity| self.shared.patterns.count(&identity.project));
        self.reply_local(|w, out| w.integer(out, count as i64));
    }

    /// Writes `<command> <upstream names…>`.
    fn send_channels(&mut self, command: &[u8], kind: Channels, names: &[Bytes]) {
        let upstream: Vec<Bytes> = names
            .iter()
            .map(|n| pubsub::upstream_channel(&self.namespace, kind, n))
            .collect();
        let mut request: Vec<&[u8]> = vec![command];
        request.extend(upstream.iter().map(|n| n.as_ref()));
        frame::put_request(&mut self.up_out, request.into_iter());
    }

    /// Sends a request the proxy composed, with a plan for its reply.
    pub(super) async fn forward_request(
        &mut self,
        args: &[&[u8]],
        command: &'static str,
        reply: ReplyShape,
    ) {
        self.forward_request_to(NodeNeed::Any, args, command, reply)
            .await
    }

    /// [`Session::forward_request`] for a request that needs a particular
    /// node in cluster mode, should it go over the session's own link.
    async fn forward_request_to(
        &mut self,
        need: NodeNeed,
        args: &[&[u8]],
        command: &'static str,
        reply: ReplyShape,
    ) {
        let shared = self.use_shared_link(false);
        if !shared && !self.ensure_link(need).await {
            return;
        }
        if shared {
            frame::put_request(&mut self.shared_out, args.iter().copied());
            self.shared_batch += 1;
            self.shared_owed += 1;
        } else {
            frame::put_request(&mut self.up_out, args.iter().copied());
        }
        let plan = Plan {
            command,
            reply,
            namespace: Arc::clone(&self.namespace),
            values: None,
        };
        let deliver = self.take_delivery();
        let identity = self.identity.as_ref();
        let tracking = self.shared.monitor.track_named(identity, command);
        self.pending.push_back(Pending::Upstream {
            plan,
            deliver,
            blocking: false,
            tracking,
            shared,
        });
    }

    fn register_pattern(&self, pattern: &Bytes) {
        if let Some(identity) = &self.identity {
            self.shared.patterns.add(&identity.project, pattern);
        }
    }

    fn unregister_pattern(&self, pattern: &Bytes) {
        if let Some(identity) = &self.identity {
            self.shared.patterns.remove(&identity.project, pattern);
        }
    }

    /// Forgets every subscription (session end, `RESET`).
    pub(super) fn drop_subscriptions(&mut self) {
        let patterns: Vec<Bytes> = self.subscriptions.patterns.drain().collect();
        for pattern in &patterns {
            self.unregister_pattern(pattern);
        }
        self.subscriptions = Subscriptions::default();
    }
}

/// Handles a frame that belongs to Pub/Sub rather than to a request: a
/// message goes to the client, a confirmation also settles the head of the
/// FIFO, anything else pushed is dropped.
pub(super) fn route_push(
    pending: &mut VecDeque<Pending>,
    namespace: &Namespace,
    raw: &Bytes,
    resp3: bool,
    out: &mut BytesMut,
) -> Result<(), ProtocolError> {
    match pubsub::kind_of(raw) {
        PushKind::Message => {
            pubsub::transform(namespace, raw, resp3, out)?;
        }
        PushKind::Confirmation => {
            let mut deliver = true;
            if let Some(Pending::PubSub {
                remaining,
                deliver: d,
            }) = pending.front_mut()
            {
                deliver = *d;
                *remaining = remaining.saturating_sub(1);
                if *remaining == 0 {
                    pending.pop_front();
                }
            }
            if deliver {
                pubsub::transform(namespace, raw, resp3, out)?;
            }
        }
        PushKind::Other => tracing::debug!("dropped a push frame"),
    }
    Ok(())
}
