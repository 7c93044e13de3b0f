//! Upstream links shared by many sessions. Stateless requests from any
//! number of sessions travel over a few connections, written together in
//! one batch, and each reply goes back to the session that sent its
//! request.
//!
//! Redis answers a connection's requests in the order it read them, so a
//! link needs no request ids: it remembers, in write order, who sent how
//! many requests, and hands each session that many complete replies off the
//! front of its input. When the connection fails, every session still owed
//! a reply is told, and the next submission opens a new connection.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use super::{Connector, UpstreamError};
use crate::frame::{self, Limits, ProtocolError, Scanner};

/// Requests queued for the upstream before the link stops taking more
/// submissions (they wait in the channel, sessions keep their own limits).
const OUT_HIGH_WATER: usize = 4 * 1024 * 1024;

/// A wait long enough to never end, for links without a reply timeout.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Where a session receives its replies from a shared link.
pub type ReplySink = mpsc::UnboundedSender<Delivery>;

/// What a shared link sends back to a session.
#[derive(Debug)]
pub enum Delivery {
    /// One or more complete reply frames, in request order.
    Replies(Bytes),
    /// The link failed: none of the session's requests still in flight will
    /// be answered.
    Lost(Arc<UpstreamError>),
}

/// Rewritten requests from one session, ready for the wire.
#[derive(Debug)]
pub struct Submission {
    pub requests: Bytes,
    /// How many complete requests `requests` holds.
    pub count: usize,
    pub replies: ReplySink,
}

/// A handle to one shared link; cheap to clone.
#[derive(Clone, Debug)]
pub struct SharedLink {
    submissions: mpsc::UnboundedSender<Submission>,
}

impl SharedLink {
    pub(super) fn from_sender(submissions: mpsc::UnboundedSender<Submission>) -> SharedLink {
        SharedLink { submissions }
    }

    /// Queues requests for the link. If the link's task is gone (the proxy
    /// is shutting down), the session is told at once.
    pub fn submit(&self, submission: Submission) {
        if let Err(mpsc::error::SendError(submission)) = self.submissions.send(submission) {
            let _ = submission
                .replies
                .send(Delivery::Lost(Arc::new(UpstreamError::Closed)));
        }
    }
}

/// A fixed set of shared links, each run by its own task.
#[derive(Debug)]
pub struct SharedLinks {
    links: Vec<SharedLink>,
}

impl SharedLinks {
    /// Starts `count` link tasks (they connect on first use). `limits`
    /// bound the replies read; `reply_timeout` is how long a link may owe
    /// replies without receiving a byte.
    pub fn start(
        connector: &Connector,
        count: usize,
        limits: Limits,
        reply_timeout: Option<Duration>,
    ) -> SharedLinks {
        let links = (0..count)
            .map(|_| {
                let (submissions, queue) = mpsc::unbounded_channel();
                let link = Link {
                    connector: connector.clone(),
                    queue,
                    limits,
                    reply_timeout,
                    lost: Vec::new(),
                };
                tokio::spawn(link.run());
                SharedLink { submissions }
            })
            .collect();
        SharedLinks { links }
    }

    /// Starts `count` routers to a Redis Cluster: links that send each
    /// request to the node serving its keys (see `router`).
    pub fn start_cluster(
        cluster: &Arc<super::Cluster>,
        count: usize,
        limits: Limits,
        reply_timeout: Option<Duration>,
    ) -> SharedLinks {
        let links = (0..count)
            .map(|_| super::router::start(Arc::clone(cluster), limits, reply_timeout))
            .collect();
        SharedLinks { links }
    }

    /// The link a session uses for all its stateless requests, so that they
    /// stay in order. `None` when sharing is turned off.
    pub fn for_session(&self, session_id: u64) -> Option<SharedLink> {
        if self.links.is_empty() {
            return None;
        }
        let index = (session_id % self.links.len() as u64) as usize;
        self.links.get(index).cloned()
    }
}

/// A session's share of the requests in flight on a connection.
struct Waiter {
    sink: ReplySink,
    remaining: usize,
}

/// One link's task state, across reconnections.
struct Link {
    connector: Connector,
    queue: mpsc::UnboundedReceiver<Submission>,
    limits: Limits,
    reply_timeout: Option<Duration>,
    /// Sessions told their requests were lost. Their later submissions,
    /// made before they heard, are refused too: running them on a new
    /// connection would reorder them after requests that may not have run.
    lost: Vec<ReplySink>,
}

/// Why a connection ended.
enum Ending {
    /// Every session handle is gone: the proxy is shutting down.
    Finished,
    Failed(UpstreamError),
}

impl Link {
    async fn run(mut self) {
        // An idle link holds no connection: it connects when work arrives.
        while let Some(first) = self.queue.recv().await {
            let mut connection = Connection::default();
            self.accept(&mut connection, first);
            if connection.waiting.is_empty() {
                continue;
            }
            let ending = match self.connector.connect().await {
                Ok(stream) => {
                    debug!("shared upstream link opened");
                    self.serve(stream, &mut connection).await
                }
                Err(e) => Ending::Failed(e),
            };
            match ending {
                Ending::Finished => return,
                Ending::Failed(e) => {
                    debug!(error = %e, waiting = connection.waiting.len(), "shared upstream link lost");
                    self.fail(connection, e);
                }
            }
        }
    }

    /// Moves a submission into the connection's output, unless its session
    /// was already told of a failure.
    fn accept(&mut self, connection: &mut Connection, submission: Submission) {
        if !self.lost.is_empty() {
            self.lost.retain(|sink| !sink.is_closed());
            if self
                .lost
                .iter()
                .any(|sink| sink.same_channel(&submission.replies))
            {
                let _ = submission
                    .replies
                    .send(Delivery::Lost(Arc::new(UpstreamError::Closed)));
                return;
            }
        }
        connection.out.extend_from_slice(&submission.requests);
        match connection.waiting.back_mut() {
            // Consecutive submissions of one session share a waiter, so its
            // replies come back in as few deliveries as possible.
            Some(last) if last.sink.same_channel(&submission.replies) => {
                last.remaining += submission.count
            }
            _ => connection.waiting.push_back(Waiter {
                sink: submission.replies,
                remaining: submission.count,
            }),
        }
    }

    /// Moves every submission already queued into the connection's output,
    /// up to its high-water mark.
    fn accept_queued(&mut self, connection: &mut Connection) {
        while connection.out.len() < OUT_HIGH_WATER {
            match self.queue.try_recv() {
                Ok(submission) => self.accept(connection, submission),
                Err(_) => break,
            }
        }
    }

    /// Writes what sessions submit and hands back what Redis answers, until
    /// the connection fails or the proxy stops.
    async fn serve(&mut self, stream: super::BoxStream, connection: &mut Connection) -> Ending {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut progress = Instant::now();
        let limit = self.reply_timeout.unwrap_or(NEVER);
        let stalled = tokio::time::sleep(limit);
        tokio::pin!(stalled);
        let mut queue_open = true;
        loop {
            if !queue_open && connection.waiting.is_empty() && connection.out.is_empty() {
                return Ending::Finished;
            }
            let owed = !connection.waiting.is_empty();
            tokio::select! {
                biased;
                // Read even when nothing is owed, to notice at once that
                // Redis closed an idle link, before a request is lost on it.
                read = reader.read_buf(frame::make_room(&mut connection.input)) => {
                    match read {
                        Ok(0) => return Ending::Failed(UpstreamError::Closed),
                        Ok(_) => {
                            progress = Instant::now();
                            if let Err(e) = connection.deliver(&self.limits) {
                                return Ending::Failed(e.into());
                            }
                        }
                        Err(e) => return Ending::Failed(e.into()),
                    }
                }
                written = writer.write_buf(&mut connection.out), if !connection.out.is_empty() => {
                    let flushed = match written {
                        Ok(_) if connection.out.is_empty() => writer.flush().await,
                        other => other.map(drop),
                    };
                    if let Err(e) = flushed {
                        return Ending::Failed(e.into());
                    }
                }
                submission = self.queue.recv(), if queue_open && connection.out.len() < OUT_HIGH_WATER => {
                    let Some(submission) = submission else {
                        queue_open = false;
                        continue;
                    };
                    if !owed {
                        progress = Instant::now();
                    }
                    self.accept(connection, submission);
                    self.accept_queued(connection);
                    // Let every session that is ready to run submit its
                    // requests first, so that they all go out in one write:
                    // yielding puts this task behind the others that are
                    // ready, and behind those that the I/O driver wakes.
                    tokio::task::yield_now().await;
                    self.accept_queued(connection);
                }
                () = &mut stalled, if owed && self.reply_timeout.is_some() => {
                    if progress.elapsed() >= limit {
                        return Ending::Failed(UpstreamError::ReplyTimeout);
                    }
                    stalled.as_mut().reset(progress + limit);
                }
            }
        }
    }

    /// Tells every session still owed a reply, and every session whose
    /// submission is queued behind them, that its requests are lost.
    fn fail(&mut self, connection: Connection, error: UpstreamError) {
        let error = Arc::new(error);
        for waiter in connection.waiting {
            let _ = waiter.sink.send(Delivery::Lost(Arc::clone(&error)));
            self.lost.push(waiter.sink);
        }
        while let Ok(submission) = self.queue.try_recv() {
            let _ = submission.replies.send(Delivery::Lost(Arc::clone(&error)));
            if !self
                .lost
                .iter()
                .any(|sink| sink.same_channel(&submission.replies))
            {
                self.lost.push(submission.replies);
            }
        }
    }
}

/// One connection's buffers and the sessions waiting on it, in write order.
#[derive(Default)]
struct Connection {
    waiting: VecDeque<Waiter>,
    out: BytesMut,
    input: BytesMut,
    scanner: Scanner,
}

impl Connection {
    /// Hands every complete reply to the session it belongs to, each
    /// session's run of replies as one delivery.
    fn deliver(&mut self, limits: &Limits) -> Result<(), ProtocolError> {
        while !self.input.is_empty() {
            let Some(waiter) = self.waiting.front_mut() else {
                return Err(ProtocolError::Decode(
                    "a reply arrived that no request was waiting for".into(),
                ));
            };
            let mut end = 0;
            let mut replies = 0;
            while replies < waiter.remaining {
                match self.scanner.measure(&self.input[end..], limits)? {
                    Some(len) => {
                        end += len;
                        replies += 1;
                    }
                    None => break,
                }
            }
            if replies == 0 {
                break;
            }
            let chunk = self.input.split_to(end).freeze();
            waiter.remaining -= replies;
            // A session that has gone away no longer wants its replies;
            // they are still taken off the stream to keep it in step.
            let _ = waiter.sink.send(Delivery::Replies(chunk));
            if waiter.remaining == 0 {
                self.waiting.pop_front();
            }
        }
        Ok(())
    }
}
