//! The shared link of cluster mode: it takes the same submissions as a
//! shared link to one Redis, and sends each request to the master serving
//! its slot.
//!
//! Each request becomes an entry with one or more parts. A request whose
//! keys share a slot is one part, sent as it is. `MGET`, `MSET`, `DEL`,
//! `UNLINK`, `EXISTS` and `TOUCH` are split into one part per slot and their
//! replies merged; `KEYS` visits every master; `SCAN` visits one master per
//! call, the cursor saying which. Any other request whose keys span slots
//! gets Redis Cluster's own `CROSSSLOT` error without being sent.
//!
//! Parts travel over one connection per node (a task each). A part answered
//! `MOVED` or `ASK` is sent again where the reply says; one refused with
//! `TRYAGAIN` or `CLUSTERDOWN`, or not sent because its node could not be
//! reached, is tried again for a while (a failover takes the cluster's node
//! timeout); meanwhile every later part waits behind it, so no request
//! overtakes an earlier one. A part already written when its connection
//! fails gets an error reply: whether it ran is unknown, so it is not
//! repeated.
//!
//! Entries leave in the order they came, so every session gets its replies
//! in request order, exactly as from a single Redis.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use super::cluster::{Cluster, slot};
use super::{Connector, Delivery, ReplySink, SharedLink, Submission, UpstreamError};
use crate::command;
use crate::frame::{self, Limits, Scanner};

/// How long a part is tried again while its slot has no reachable master
/// (during a failover), before its error reply is given.
const RETRY_WINDOW: Duration = Duration::from_secs(5);

/// The pause before trying a part again.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Redirections one part may follow; a loop between nodes ends here.
const MAX_REDIRECTS: u8 = 16;

/// A `SCAN` cursor through the proxy carries the master's position in its
/// high bits and that master's own cursor below them. Redis cursors stay
/// below the size of the key table, far below 2^54.
const CURSOR_NODE_SHIFT: u32 = 54;

// Every master's position fits above the shift.
const _: () = assert!(super::cluster::MAX_MASTERS <= 1 << (64 - CURSOR_NODE_SHIFT));

/// Redis Cluster's reply to a multi-key request whose keys span slots.
const CROSSSLOT: &[u8] = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n";

/// The request `ASKING`, sent before a part redirected by `ASK`.
const ASKING: &[u8] = b"*1\r\n$6\r\nASKING\r\n";

/// A longer wait than any link needs.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Starts a router on the current runtime; sessions submit to the handle.
pub(super) fn start(
    cluster: Arc<Cluster>,
    limits: Limits,
    reply_timeout: Option<Duration>,
) -> SharedLink {
    let (submissions, queue) = mpsc::unbounded_channel();
    let (events_tx, events) = mpsc::unbounded_channel();
    let router = Router {
        cluster,
        queue,
        events,
        events_tx,
        nodes: HashMap::new(),
        entries: VecDeque::new(),
        first_seq: 0,
        outbox: HashMap::new(),
        held: VecDeque::new(),
        held_until: None,
        limits,
        reply_timeout,
    };
    tokio::spawn(router.run());
    SharedLink::from_sender(submissions)
}

/// Where a part goes.
#[derive(Clone, Debug)]
enum Target {
    /// The master serving this slot.
    Slot(u16),
    /// The master at this position of the slot map (`SCAN`, `KEYS`).
    Master(usize),
    /// The node an `ASK` named, for this one attempt.
    Asked(Arc<str>),
    /// Any master: the request names no key.
    Any,
}

/// One request (or one slot's share of it) for one node.
struct Part {
    request: Bytes,
    target: Target,
    reply: Option<Bytes>,
    redirects: u8,
    /// When the part was first refused or could not be sent.
    retrying_since: Option<Instant>,
}

/// How the replies of an entry's parts become the client's one reply.
#[derive(Debug)]
enum Merge {
    /// One part: its reply as it is.
    Single,
    /// `MGET`: part `p` holds the values of keys `positions[p]`.
    Values {
        positions: Vec<Vec<usize>>,
        keys: usize,
    },
    /// `DEL`, `UNLINK`, `EXISTS`, `TOUCH`: the sum of the counts.
    Sum,
    /// `MSET`: `OK` once every part said so.
    AllOk,
    /// `KEYS`: every master's keys together.
    Concat,
    /// `SCAN` on the master at `node` of `masters`.
    Scan { node: usize, masters: usize },
}

/// One client request, waiting for all its parts.
struct Entry {
    sink: ReplySink,
    merge: Merge,
    parts: Vec<Part>,
    /// The reply, once known without (further) upstream help.
    ready: Option<Bytes>,
    unanswered: usize,
}

impl Entry {
    /// An entry waiting for every one of `parts`.
    fn new(sink: ReplySink, merge: Merge, parts: Vec<Part>) -> Entry {
        Entry {
            sink,
            merge,
            unanswered: parts.len(),
            parts,
            ready: None,
        }
    }

    /// A request of one part, sent as it is.
    fn single(sink: ReplySink, request: Bytes, target: Target) -> Entry {
        Entry::new(sink, Merge::Single, vec![part(request, target)])
    }

    /// A request the router answers itself, without sending it.
    fn answered(sink: ReplySink, reply: &'static [u8]) -> Entry {
        Entry {
            sink,
            merge: Merge::Single,
            parts: Vec::new(),
            ready: Some(Bytes::from_static(reply)),
            unanswered: 0,
        }
    }
}

/// Which part a reply from a node belongs to.
#[derive(Clone, Copy, Debug)]
struct Ticket {
    seq: u64,
    part: u32,
    /// The reply to the `ASKING` in front of the part: dropped.
    asking: bool,
}

/// Requests for one node, in the order they must be written.
#[derive(Default)]
struct Batch {
    bytes: BytesMut,
    tickets: Vec<Ticket>,
}

/// What a node's task tells the router.
enum NodeEvent {
    Replies(Vec<(Ticket, Bytes)>),
    /// The connection failed or never came up. `written` parts may have
    /// run; `unsent` ones did not.
    Failed {
        address: Arc<str>,
        written: Vec<Ticket>,
        unsent: Vec<Ticket>,
        error: UpstreamError,
    },
}

struct Router {
    cluster: Arc<Cluster>,
    queue: mpsc::UnboundedReceiver<Submission>,
    events: mpsc::UnboundedReceiver<NodeEvent>,
    events_tx: mpsc::UnboundedSender<NodeEvent>,
    nodes: HashMap<Arc<str>, mpsc::UnboundedSender<FinishedBatch>>,
    entries: VecDeque<Entry>,
    /// The sequence number of the entry at the front.
    first_seq: u64,
    /// Parts routed while handling one event, sent together per node.
    outbox: HashMap<Arc<str>, Batch>,
    /// Parts waiting to be routed again, in the order they must go. While
    /// any wait, every part routed queues behind them, so that no request
    /// overtakes an earlier one (during a failover, for instance).
    held: VecDeque<Ticket>,
    /// When the held parts are tried again.
    held_until: Option<Instant>,
    limits: Limits,
    reply_timeout: Option<Duration>,
}

/// A batch handed to a node's task.
struct FinishedBatch {
    /// Kept mutable so that the node's task can adopt the buffer as its
    /// output instead of copying it.
    bytes: BytesMut,
    tickets: Vec<Ticket>,
}

impl Router {
    async fn run(mut self) {
        let retry_timer = tokio::time::sleep(NEVER);
        tokio::pin!(retry_timer);
        loop {
            let next_retry = self.held_until;
            if let Some(due) = next_retry {
                retry_timer.as_mut().reset(due);
            }
            tokio::select! {
                submission = self.queue.recv() => {
                    let Some(submission) = submission else {
                        // Every session handle is gone: the proxy is stopping.
                        return;
                    };
                    self.accept(submission);
                    while let Ok(submission) = self.queue.try_recv() {
                        self.accept(submission);
                    }
                }
                Some(event) = self.events.recv() => self.take_event(event),
                () = &mut retry_timer, if next_retry.is_some() => self.retry_due(),
            }
            self.send_outbox();
            self.release();
        }
    }

    fn entry_mut(&mut self, seq: u64) -> Option<&mut Entry> {
        let index = seq.checked_sub(self.first_seq)?;
        self.entries.get_mut(usize::try_from(index).ok()?)
    }

    /// Splits a session's submission into entries and routes their parts.
    fn accept(&mut self, submission: Submission) {
        let mut scanner = Scanner::for_requests();
        let limits = Limits::request(usize::MAX / 2, true);
        let mut rest = submission.requests;
        for _ in 0..submission.count {
            let measured = scanner.measure(&rest, &limits);
            let request = match measured {
                Ok(Some(len)) => rest.split_to(len),
                // The session wrote these requests itself; this can't
                // happen, and if it did the session still gets one (error)
                // reply per request, none of them sent.
                _ => {
                    scanner = Scanner::for_requests();
                    rest.clear();
                    Bytes::new()
                }
            };
            let entry = plan_entry(&request, &self.cluster, submission.replies.clone());
            let seq = self.first_seq + self.entries.len() as u64;
            let parts = entry.parts.len();
            self.entries.push_back(entry);
            for part in 0..parts {
                self.route(Ticket {
                    seq,
                    part: part as u32,
                    asking: false,
                });
            }
        }
    }

    /// Sends a part on its way, behind any held ones.
    fn route(&mut self, ticket: Ticket) {
        if self.held.is_empty() {
            self.dispatch(ticket);
        } else {
            self.held.push_back(ticket);
        }
    }

    /// Puts a part in the outbox of the node serving it, or holds it to be
    /// tried again when no node does (yet).
    fn dispatch(&mut self, ticket: Ticket) {
        let map = self.cluster.map();
        let Some(part) = self
            .entry_mut(ticket.seq)
            .and_then(|e| e.parts.get_mut(ticket.part as usize))
        else {
            return;
        };
        let address = match &part.target {
            Target::Slot(slot) => map.owner(*slot).cloned(),
            Target::Master(index) => map.masters().get(*index).cloned(),
            Target::Asked(address) => Some(Arc::clone(address)),
            Target::Any => map.masters().first().cloned(),
        };
        let Some(address) = address else {
            self.cluster.request_refresh();
            let error = format!("-{}\r\n", self.cluster.no_owner_error(&map));
            return self.retry_later(ticket, error.as_bytes());
        };
        let asking = matches!(part.target, Target::Asked(_));
        let request = part.request.clone();
        let batch = self.outbox.entry(address).or_default();
        if asking {
            batch.bytes.extend_from_slice(ASKING);
            batch.tickets.push(Ticket {
                asking: true,
                ..ticket
            });
        }
        batch.bytes.extend_from_slice(&request);
        batch.tickets.push(ticket);
    }

    /// Tries a part again after a pause, or, once it has been retried for
    /// `RETRY_WINDOW`, answers it with `error`.
    fn retry_later(&mut self, ticket: Ticket, error: &[u8]) {
        let now = Instant::now();
        let Some(part) = self
            .entry_mut(ticket.seq)
            .and_then(|e| e.parts.get_mut(ticket.part as usize))
        else {
            return;
        };
        let since = *part.retrying_since.get_or_insert(now);
        if now.duration_since(since) < RETRY_WINDOW {
            self.held.push_back(ticket);
            self.held_until.get_or_insert(now + RETRY_PAUSE);
        } else {
            self.answer(ticket, Bytes::copy_from_slice(error));
        }
    }

    /// Routes the held parts again, in order; the first that must wait
    /// again holds back the rest.
    fn retry_due(&mut self) {
        self.held_until = None;
        for ticket in std::mem::take(&mut self.held) {
            self.route(ticket);
        }
    }

    /// Hands each node its batch, starting the node's task if need be.
    fn send_outbox(&mut self) {
        for (address, batch) in std::mem::take(&mut self.outbox) {
            let finished = FinishedBatch {
                bytes: batch.bytes,
                tickets: batch.tickets,
            };
            // A node's task ends when its connection closes (Redis closes
            // idle clients after its `timeout`): start another.
            if self.nodes.get(&address).is_some_and(|tx| tx.is_closed()) {
                self.nodes.remove(&address);
            }
            let sender = self.nodes.entry(Arc::clone(&address)).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                let node = NodeTask {
                    connector: self.cluster.connector_for(&address),
                    address: Arc::clone(&address),
                    batches: rx,
                    events: self.events_tx.clone(),
                    limits: self.limits,
                    reply_timeout: self.reply_timeout,
                };
                tokio::spawn(node.run());
                tx
            });
            if let Err(mpsc::error::SendError(finished)) = sender.send(finished) {
                // The node's task ended since: its failure event is on the
                // way; these parts were never sent.
                self.nodes.remove(&address);
                let _ = self.events_tx.send(NodeEvent::Failed {
                    address,
                    written: Vec::new(),
                    unsent: finished.tickets,
                    error: UpstreamError::Closed,
                });
            }
        }
    }

    fn take_event(&mut self, event: NodeEvent) {
        match event {
            NodeEvent::Replies(replies) => {
                for (ticket, reply) in replies {
                    if !ticket.asking {
                        self.take_reply(ticket, reply);
                    }
                }
            }
            NodeEvent::Failed {
                address,
                written,
                unsent,
                error,
            } => {
                debug!(node = %address, error = %error, written = written.len(), unsent = unsent.len(), "cluster node link lost");
                if self.nodes.get(&address).is_some_and(|tx| tx.is_closed()) {
                    self.nodes.remove(&address);
                }
                self.cluster.request_refresh();
                let lost = Bytes::from(format!("-{}\r\n", lost_reply_text(&error)));
                for ticket in written.into_iter().filter(|t| !t.asking) {
                    self.answer(ticket, lost.clone());
                }
                let unreachable = format!("-ERR upstream unavailable: {error}\r\n");
                for ticket in unsent.into_iter().filter(|t| !t.asking) {
                    self.retry_later(ticket, unreachable.as_bytes());
                }
            }
        }
    }

    /// A node's reply to a part: a redirection to follow, a refusal to try
    /// again, or the answer.
    fn take_reply(&mut self, ticket: Ticket, reply: Bytes) {
        let redirects = match self
            .entry_mut(ticket.seq)
            .and_then(|e| e.parts.get(ticket.part as usize))
        {
            Some(part) => part.redirects,
            None => return,
        };
        if reply.first() == Some(&b'-') && redirects < MAX_REDIRECTS {
            if let Some((kind, slot, address)) = redirection(&reply) {
                debug!(?kind, slot, "cluster redirection followed");
                let target = match kind {
                    Redirect::Moved => {
                        self.cluster.moved(slot, &address);
                        Target::Slot(slot)
                    }
                    Redirect::Ask => Target::Asked(Arc::from(address.as_str())),
                };
                if let Some(part) = self
                    .entry_mut(ticket.seq)
                    .and_then(|e| e.parts.get_mut(ticket.part as usize))
                {
                    part.redirects += 1;
                    // A part bound to a master by position (`SCAN`, `KEYS`)
                    // keeps it; keyed parts follow their slot.
                    if !matches!(part.target, Target::Master(_)) || kind == Redirect::Ask {
                        part.target = target;
                    }
                }
                return self.route(ticket);
            }
            if reply.starts_with(b"-TRYAGAIN") || reply.starts_with(b"-CLUSTERDOWN") {
                self.cluster.request_refresh();
                return self.retry_later(ticket, &reply);
            }
        }
        self.answer(ticket, reply);
    }

    /// Records a part's final reply.
    fn answer(&mut self, ticket: Ticket, reply: Bytes) {
        let Some(entry) = self.entry_mut(ticket.seq) else {
            return;
        };
        let Some(part) = entry.parts.get_mut(ticket.part as usize) else {
            return;
        };
        if part.reply.is_none() {
            part.reply = Some(reply);
            entry.unanswered -= 1;
        }
    }

    /// Sends the replies of the finished entries at the front, each
    /// session's run of them as one delivery.
    fn release(&mut self) {
        let mut run: Option<(ReplySink, Vec<Bytes>)> = None;
        while self.entries.front().is_some_and(|e| e.unanswered == 0) {
            let Some(entry) = self.entries.pop_front() else {
                break;
            };
            self.first_seq += 1;
            let reply = merge(entry.merge, entry.parts, entry.ready, &self.limits);
            match &mut run {
                Some((sink, replies)) if sink.same_channel(&entry.sink) => replies.push(reply),
                _ => {
                    if let Some((sink, replies)) = run.replace((entry.sink, vec![reply])) {
                        deliver(&sink, replies);
                    }
                }
            }
        }
        if let Some((sink, replies)) = run {
            deliver(&sink, replies);
        }
    }
}

/// Hands a session its run of replies as one delivery; a run of one is
/// passed on as it is, without a copy.
fn deliver(sink: &ReplySink, replies: Vec<Bytes>) {
    let joined = match <[Bytes; 1]>::try_from(replies) {
        Ok([reply]) => reply,
        Err(replies) => {
            let mut out = BytesMut::with_capacity(replies.iter().map(Bytes::len).sum());
            for reply in &replies {
                out.extend_from_slice(reply);
            }
            out.freeze()
        }
    };
    // A session that has gone away no longer wants its replies.
    let _ = sink.send(Delivery::Replies(joined));
}

/// The error reply for a part whose connection failed after it was sent.
fn lost_reply_text(error: &UpstreamError) -> &'static str {
    match error {
        UpstreamError::ReplyTimeout => "ERR upstream request timed out",
        _ => "ERR upstream connection lost",
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Redirect {
    Moved,
    Ask,
}

/// Reads `-MOVED slot host:port` or `-ASK slot host:port`.
fn redirection(reply: &[u8]) -> Option<(Redirect, u16, String)> {
    let line = reply.strip_prefix(b"-")?.strip_suffix(b"\r\n")?;
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split(' ');
    let kind = match words.next()? {
        "MOVED" => Redirect::Moved,
        "ASK" => Redirect::Ask,
        _ => return None,
    };
    let slot: u16 = words.next()?.parse().ok()?;
    let address = words.next()?;
    if words.next().is_some() || usize::from(slot) >= super::cluster::SLOTS {
        return None;
    }
    // Redis writes `:port` alone when it does not know its own address.
    let address = match address.strip_prefix(':') {
        Some(port) => format!("127.0.0.1:{port}"),
        None => address.to_owned(),
    };
    Some((kind, slot, address))
}

/// Commands split per slot, and how their replies merge.
fn split_kind(name: &[u8]) -> Option<Merge> {
    let name = name.to_ascii_lowercase();
    match &name[..] {
        b"mget" => Some(Merge::Values {
            positions: Vec::new(),
            keys: 0,
        }),
        b"del" | b"unlink" | b"exists" | b"touch" => Some(Merge::Sum),
        b"mset" => Some(Merge::AllOk),
        _ => None,
    }
}

/// Turns one rewritten request into an entry: its parts, their targets,
/// and how to merge them.
fn plan_entry(request: &Bytes, cluster: &Cluster, sink: ReplySink) -> Entry {
    const UNROUTABLE: &[u8] = b"-ERR redcloak could not route the request\r\n";
    let Ok(args) = frame::decode_request(request) else {
        return Entry::answered(sink, UNROUTABLE);
    };
    let Some(name) = args.first() else {
        return Entry::answered(sink, UNROUTABLE);
    };
    let single = |target: Target| Entry::single(sink.clone(), request.clone(), target);

    if name.eq_ignore_ascii_case(b"scan") {
        return scan_entry(&args, cluster, sink.clone());
    }
    if name.eq_ignore_ascii_case(b"keys") {
        let masters = cluster.map().masters().len().max(1);
        let parts = (0..masters)
            .map(|i| part(request.clone(), Target::Master(i)))
            .collect();
        return Entry::new(sink.clone(), Merge::Concat, parts);
    }
    if name.eq_ignore_ascii_case(b"spublish") {
        return match args.get(1) {
            Some(channel) => single(Target::Slot(slot(channel))),
            None => single(Target::Any),
        };
    }

    let Ok(spec) = command::lookup(&args) else {
        return single(Target::Any);
    };
    let mut keys = Vec::new();
    command::key_indexes(spec, &args, &mut keys);
    let Some(&first) = keys.first() else {
        return single(Target::Any);
    };
    let first_slot = slot(&args[first]);
    if keys.iter().all(|&k| slot(&args[k]) == first_slot) {
        return single(Target::Slot(first_slot));
    }
    match split_kind(name) {
        // An `MSET` without a value for its last key is sent whole, for
        // the node to refuse, rather than split and partly run.
        Some(Merge::AllOk) if args.len() % 2 == 0 => single(Target::Slot(first_slot)),
        Some(merge) => split_entry(&args, &keys, merge, sink.clone()),
        None => Entry::answered(sink.clone(), CROSSSLOT),
    }
}

fn part(request: Bytes, target: Target) -> Part {
    Part {
        request,
        target,
        reply: None,
        redirects: 0,
        retrying_since: None,
    }
}

/// One part per slot, keys (and `MSET`'s values) in their original order.
fn split_entry(args: &[Bytes], keys: &[usize], merge: Merge, sink: ReplySink) -> Entry {
    let with_value = matches!(merge, Merge::AllOk);
    // Slots in the order their first key appears.
    let mut slots: Vec<(u16, Vec<usize>)> = Vec::new();
    for (position, &index) in keys.iter().enumerate() {
        let key_slot = slot(&args[index]);
        match slots.iter_mut().find(|(s, _)| *s == key_slot) {
            Some((_, positions)) => positions.push(position),
            None => slots.push((key_slot, vec![position])),
        }
    }
    let parts: Vec<Part> = slots
        .iter()
        .map(|(key_slot, positions)| {
            let mut request = BytesMut::new();
            let per_key = 1 + usize::from(with_value);
            let mut items: Vec<&[u8]> = Vec::with_capacity(1 + positions.len() * per_key);
            items.push(&args[0]);
            for &position in positions {
                let index = keys[position];
                items.push(&args[index]);
                if with_value && let Some(value) = args.get(index + 1) {
                    items.push(value);
                }
            }
            frame::put_request(&mut request, items.into_iter());
            part(request.freeze(), Target::Slot(*key_slot))
        })
        .collect();
    let merge = match merge {
        Merge::Values { .. } => Merge::Values {
            positions: slots.into_iter().map(|(_, p)| p).collect(),
            keys: keys.len(),
        },
        other => other,
    };
    Entry::new(sink, merge, parts)
}

/// `SCAN cursor …`: the master named by the cursor's high bits, with its
/// own cursor in place of the client's.
fn scan_entry(args: &[Bytes], cluster: &Cluster, sink: ReplySink) -> Entry {
    let masters = cluster.map().masters().len().max(1);
    let [name, cursor, options @ ..] = args else {
        return Entry::answered(
            sink,
            b"-ERR wrong number of arguments for 'scan' command\r\n",
        );
    };
    let Some((cursor, node)) = std::str::from_utf8(cursor)
        .ok()
        .and_then(|c| c.parse::<u64>().ok())
        .map(|c| (c, (c >> CURSOR_NODE_SHIFT) as usize))
        .filter(|&(_, node)| node < masters)
    else {
        return Entry::answered(sink, b"-ERR invalid cursor\r\n");
    };
    let own_cursor = (cursor & ((1 << CURSOR_NODE_SHIFT) - 1)).to_string();
    let mut items: Vec<&[u8]> = Vec::with_capacity(args.len());
    items.push(name);
    items.push(own_cursor.as_bytes());
    items.extend(options.iter().map(|a| &a[..]));
    let mut request = BytesMut::new();
    frame::put_request(&mut request, items.into_iter());
    let parts = vec![part(request.freeze(), Target::Master(node))];
    Entry::new(sink, Merge::Scan { node, masters }, parts)
}

/// The client's one reply from the replies of an entry's parts.
fn merge(merge: Merge, parts: Vec<Part>, ready: Option<Bytes>, limits: &Limits) -> Bytes {
    if let Some(ready) = ready {
        return ready;
    }
    let mut replies: Vec<Bytes> = parts.into_iter().filter_map(|p| p.reply).collect();
    if let Merge::Single = merge {
        return replies.pop().unwrap_or_else(|| Bytes::from_static(LOST));
    }
    // Any part's error is the reply, as if the request had met it whole.
    if let Some(error) = replies.iter().find(|r| r.first() == Some(&b'-')) {
        return error.clone();
    }
    let merged = match merge {
        Merge::Single => None,
        // Counts come from the nodes: a sum that overflows is no count.
        Merge::Sum => replies
            .iter()
            .try_fold(0i64, |sum, r| sum.checked_add(integer(r)?))
            .map(|n| Bytes::from(format!(":{n}\r\n"))),
        Merge::AllOk => Some(Bytes::from_static(b"+OK\r\n")),
        Merge::Concat => concat(&replies, limits),
        Merge::Values { positions, keys } => values_in_order(&replies, &positions, keys, limits),
        Merge::Scan { node, masters } => replies
            .first()
            .and_then(|r| scan_reply(r, node, masters, limits)),
    };
    merged.unwrap_or_else(|| {
        Bytes::from_static(b"-ERR redcloak could not merge the replies of the cluster nodes\r\n")
    })
}

const LOST: &[u8] = b"-ERR upstream connection lost\r\n";

fn integer(reply: &[u8]) -> Option<i64> {
    let text = reply.strip_prefix(b":")?.strip_suffix(b"\r\n")?;
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// The elements of an array reply, each as its whole frame.
fn elements(reply: &Bytes, limits: &Limits) -> Option<Vec<Bytes>> {
    let header_end = reply.windows(2).position(|w| w == b"\r\n")?;
    if reply.first() != Some(&b'*') {
        return None;
    }
    let count: usize = std::str::from_utf8(&reply[1..header_end])
        .ok()?
        .parse()
        .ok()?;
    let mut at = header_end + 2;
    let mut out = Vec::with_capacity(count.min(reply.len() / 3));
    let mut scanner = Scanner::for_replies();
    for _ in 0..count {
        let len = scanner.measure(&reply[at..], limits).ok()??;
        out.push(reply.slice(at..at + len));
        at += len;
    }
    (at == reply.len()).then_some(out)
}

fn array(items: impl ExactSizeIterator<Item = Bytes>) -> Bytes {
    let mut out = BytesMut::new();
    frame::put_length_line(&mut out, b'*', items.len());
    for item in items {
        out.extend_from_slice(&item);
    }
    out.freeze()
}

fn concat(replies: &[Bytes], limits: &Limits) -> Option<Bytes> {
    let mut all = Vec::new();
    for reply in replies {
        all.extend(elements(reply, limits)?);
    }
    Some(array(all.into_iter()))
}

fn values_in_order(
    replies: &[Bytes],
    positions: &[Vec<usize>],
    keys: usize,
    limits: &Limits,
) -> Option<Bytes> {
    let mut values: Vec<Option<Bytes>> = vec![None; keys];
    for (reply, positions) in replies.iter().zip(positions) {
        let items = elements(reply, limits)?;
        if items.len() != positions.len() {
            return None;
        }
        for (item, &position) in items.into_iter().zip(positions) {
            *values.get_mut(position)? = Some(item);
        }
    }
    let values: Option<Vec<Bytes>> = values.into_iter().collect();
    Some(array(values?.into_iter()))
}

/// A master's `[cursor, keys]` with the cursor made the proxy's: the next
/// master's start once this one is done, 0 after the last.
fn scan_reply(reply: &Bytes, node: usize, masters: usize, limits: &Limits) -> Option<Bytes> {
    let items = elements(reply, limits)?;
    let [cursor, keys] = <[Bytes; 2]>::try_from(items).ok()?;
    let text = cursor.strip_prefix(b"$")?;
    let start = text.windows(2).position(|w| w == b"\r\n")? + 2;
    let own: u64 = std::str::from_utf8(text.get(start..text.len().checked_sub(2)?)?)
        .ok()?
        .parse()
        .ok()?;
    if own >= 1 << CURSOR_NODE_SHIFT {
        return None;
    }
    let next = match own {
        0 if node + 1 < masters => ((node as u64 + 1) << CURSOR_NODE_SHIFT).to_string(),
        0 => "0".to_owned(),
        own => (((node as u64) << CURSOR_NODE_SHIFT) | own).to_string(),
    };
    let mut out = BytesMut::new();
    out.extend_from_slice(b"*2\r\n");
    frame::put_bulk(&mut out, next.as_bytes());
    out.extend_from_slice(&keys);
    Some(out.freeze())
}

/// One node's connection: writes the batches it is given, and hands each
/// reply back with its ticket.
struct NodeTask {
    connector: Connector,
    address: Arc<str>,
    batches: mpsc::UnboundedReceiver<FinishedBatch>,
    events: mpsc::UnboundedSender<NodeEvent>,
    limits: Limits,
    reply_timeout: Option<Duration>,
}

impl NodeTask {
    async fn run(mut self) {
        let mut written = VecDeque::new();
        let error = match self.connector.connect().await {
            Ok(stream) => self.serve(stream, &mut written).await,
            Err(e) => e,
        };
        // No batch may be left in the channel unanswered: close it, then
        // take what is in it.
        self.batches.close();
        let mut unsent = Vec::new();
        while let Ok(batch) = self.batches.try_recv() {
            unsent.extend(batch.tickets);
        }
        if matches!(error, UpstreamError::Closed) && written.is_empty() && unsent.is_empty() {
            return;
        }
        let _ = self.events.send(NodeEvent::Failed {
            address: self.address,
            written: written.into_iter().collect(),
            unsent,
            error,
        });
    }

    /// Returns why the connection ended; `written` keeps the tickets of
    /// requests written and not answered.
    async fn serve(
        &mut self,
        stream: super::BoxStream,
        written: &mut VecDeque<Ticket>,
    ) -> UpstreamError {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut out = BytesMut::new();
        let mut input = BytesMut::new();
        let mut scanner = Scanner::for_replies();
        let limit = self.reply_timeout.unwrap_or(NEVER);
        let mut progress = Instant::now();
        let stalled = tokio::time::sleep(limit);
        tokio::pin!(stalled);
        loop {
            let owed = !written.is_empty();
            tokio::select! {
                biased;
                read = reader.read_buf(frame::make_room(&mut input)) => {
                    match read {
                        Ok(0) => return UpstreamError::Closed,
                        Ok(_) => progress = Instant::now(),
                        Err(e) => return e.into(),
                    }
                    let mut replies = Vec::new();
                    loop {
                        match scanner.measure(&input, &self.limits) {
                            Ok(Some(len)) => {
                                let Some(ticket) = written.pop_front() else {
                                    return UpstreamError::Protocol(frame::ProtocolError::Decode(
                                        "a reply arrived that no request was waiting for".into(),
                                    ));
                                };
                                replies.push((ticket, input.split_to(len).freeze()));
                            }
                            Ok(None) => break,
                            Err(e) => return e.into(),
                        }
                    }
                    if !replies.is_empty() {
                        let _ = self.events.send(NodeEvent::Replies(replies));
                    }
                }
                sent = writer.write_buf(&mut out), if !out.is_empty() => {
                    let flushed = match sent {
                        Ok(_) if out.is_empty() => writer.flush().await,
                        other => other.map(drop),
                    };
                    if let Err(e) = flushed {
                        return e.into();
                    }
                }
                batch = self.batches.recv() => {
                    let Some(batch) = batch else {
                        return UpstreamError::Closed;
                    };
                    if !owed {
                        progress = Instant::now();
                    }
                    // Takes the batch's buffer over when nothing waits to be
                    // written, so the requests are not copied again.
                    out.unsplit(batch.bytes);
                    written.extend(batch.tickets);
                }
                () = &mut stalled, if owed && self.reply_timeout.is_some() => {
                    if progress.elapsed() >= limit {
                        return UpstreamError::ReplyTimeout;
                    }
                    stalled.as_mut().reset(progress + limit);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::reply(1 << 20)
    }

    #[test]
    fn redirections_are_read_and_anything_else_is_not() {
        assert_eq!(
            redirection(b"-MOVED 3999 127.0.0.1:6381\r\n"),
            Some((Redirect::Moved, 3999, "127.0.0.1:6381".to_owned()))
        );
        assert_eq!(
            redirection(b"-ASK 12 10.0.0.2:7000\r\n"),
            Some((Redirect::Ask, 12, "10.0.0.2:7000".to_owned()))
        );
        assert_eq!(
            redirection(b"-MOVED 5 :7001\r\n"),
            Some((Redirect::Moved, 5, "127.0.0.1:7001".to_owned()))
        );
        assert_eq!(redirection(b"-MOVED 16384 h:1\r\n"), None);
        assert_eq!(redirection(b"-ERR MOVED 1 h:1\r\n"), None);
        assert_eq!(redirection(b"-MOVED x h:1\r\n"), None);
        assert_eq!(redirection(b"-MOVED 1 h:1 extra\r\n"), None);
    }

    fn answered(replies: &[&[u8]]) -> Vec<Part> {
        replies
            .iter()
            .map(|r| Part {
                reply: Some(Bytes::copy_from_slice(r)),
                ..part(Bytes::new(), Target::Any)
            })
            .collect()
    }

    #[test]
    fn split_replies_merge_as_one_redis_would_answer() {
        let values = Merge::Values {
            positions: vec![vec![0, 2], vec![1]],
            keys: 3,
        };
        let merged = merge(
            values,
            answered(&[b"*2\r\n$1\r\na\r\n$-1\r\n", b"*1\r\n$2\r\nbb\r\n"]),
            None,
            &limits(),
        );
        assert_eq!(&merged[..], b"*3\r\n$1\r\na\r\n$2\r\nbb\r\n$-1\r\n");

        let sum = merge(
            Merge::Sum,
            answered(&[b":2\r\n", b":0\r\n", b":5\r\n"]),
            None,
            &limits(),
        );
        assert_eq!(&sum[..], b":7\r\n");

        let ok = merge(
            Merge::AllOk,
            answered(&[b"+OK\r\n", b"+OK\r\n"]),
            None,
            &limits(),
        );
        assert_eq!(&ok[..], b"+OK\r\n");

        let keys = merge(
            Merge::Concat,
            answered(&[
                b"*1\r\n$1\r\nx\r\n",
                b"*0\r\n",
                b"*2\r\n$1\r\ny\r\n$1\r\nz\r\n",
            ]),
            None,
            &limits(),
        );
        assert_eq!(&keys[..], b"*3\r\n$1\r\nx\r\n$1\r\ny\r\n$1\r\nz\r\n");
    }

    #[test]
    fn an_error_in_any_part_is_the_reply() {
        let merged = merge(
            Merge::Sum,
            answered(&[b":1\r\n", b"-OOM no memory\r\n"]),
            None,
            &limits(),
        );
        assert_eq!(&merged[..], b"-OOM no memory\r\n");
    }

    #[test]
    fn counts_that_overflow_are_not_summed() {
        let max = format!(":{}\r\n", i64::MAX);
        let merged = merge(
            Merge::Sum,
            answered(&[max.as_bytes(), b":1\r\n"]),
            None,
            &limits(),
        );
        assert!(
            merged.starts_with(b"-ERR redcloak could not merge"),
            "{merged:?}"
        );
    }

    #[test]
    fn scan_cursors_walk_the_masters_in_turn() {
        let reply = Bytes::from_static(b"*2\r\n$2\r\n17\r\n*1\r\n$1\r\nk\r\n");
        let mid = scan_reply(&reply, 1, 3, &limits()).expect("a reply");
        let expected = format!("{}", (1u64 << CURSOR_NODE_SHIFT) | 17);
        assert!(mid.starts_with(format!("*2\r\n${}\r\n{expected}\r\n", expected.len()).as_bytes()));
        assert!(mid.ends_with(b"*1\r\n$1\r\nk\r\n"));

        let done = Bytes::from_static(b"*2\r\n$1\r\n0\r\n*0\r\n");
        let next = scan_reply(&done, 0, 3, &limits()).expect("a reply");
        let start = (1u64 << CURSOR_NODE_SHIFT).to_string();
        assert_eq!(
            &next[..],
            format!("*2\r\n${}\r\n{start}\r\n*0\r\n", start.len()).as_bytes()
        );
        let last = scan_reply(&done, 2, 3, &limits()).expect("a reply");
        assert_eq!(&last[..], b"*2\r\n$1\r\n0\r\n*0\r\n");
    }

    proptest::proptest! {
        /// Replies come from the network: whatever the nodes send, merging
        /// gives some reply and never panics.
        #[test]
        fn merging_any_bytes_never_panics(
            replies in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..40), 1..4),
            node in 0usize..4,
        ) {
            let parts = || {
                replies
                    .iter()
                    .map(|r| Part {
                        reply: Some(Bytes::copy_from_slice(r)),
                        ..part(Bytes::new(), Target::Any)
                    })
                    .collect::<Vec<_>>()
            };
            let positions = (0..replies.len()).map(|i| vec![i]).collect();
            for kind in [
                Merge::Single,
                Merge::Sum,
                Merge::AllOk,
                Merge::Concat,
                Merge::Values { positions, keys: replies.len() },
                Merge::Scan { node, masters: 4 },
            ] {
                let merged = merge(kind, parts(), None, &limits());
                proptest::prop_assert!(!merged.is_empty() || replies.iter().any(Vec::is_empty));
            }
            for reply in &replies {
                let _ = redirection(reply);
            }
        }
    }

    #[test]
    fn split_requests_keep_keys_and_values_together_per_slot() {
        let (sink, _rx) = mpsc::unbounded_channel();
        let args: Vec<Bytes> = ["MSET", "{a}1", "v1", "{b}1", "v2", "{a}2", "v3"]
            .iter()
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect();
        let entry = split_entry(&args, &[1, 3, 5], Merge::AllOk, sink);
        assert_eq!(entry.parts.len(), 2);
        assert_eq!(
            &entry.parts[0].request[..],
            b"*5\r\n$4\r\nMSET\r\n$4\r\n{a}1\r\n$2\r\nv1\r\n$4\r\n{a}2\r\n$2\r\nv3\r\n"
        );
        assert_eq!(
            &entry.parts[1].request[..],
            b"*3\r\n$4\r\nMSET\r\n$4\r\n{b}1\r\n$2\r\nv2\r\n"
        );
    }
}
