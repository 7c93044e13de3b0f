//! One client's life in the proxy: authentication, protocol version, and
//! the FIFO of plans that pairs every reply with its request.
//!
//! A session reads whatever requests the client has sent, answers the ones
//! the proxy handles itself, and writes the rest, rewritten, to its upstream
//! link in one batch. Replies are matched to the plan at the head of the
//! FIFO, transformed by it, and written back in request order. Reading from
//! either side pauses while the output towards the other side is full, so a
//! client that never reads can't make the proxy buffer without limit.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::Instant;
use tracing::{Instrument, debug, field, warn};

use crate::auth::{Authenticator, Identity};
use crate::command::{self, Access, Handling, Local};
use crate::detection::{self, Monitor, Tracking};
use crate::frame::{self, Limits, ProtocolError, ReplyWriter, Scanner};
use crate::keyring::Sealer;
use crate::leakage::{Leakage, Screened};
use crate::metrics::Outcome;
use crate::namespace::Namespace;
use crate::plan::{self, Plan, Values};
use crate::reply::{self, ReplyError};
use crate::shutdown::Shutdown;
use crate::upstream::{
    BoxStream, Cluster, Connector, Delivery, ReplySink, SharedLink, Submission, UpstreamError,
};

mod cluster;
mod deadline;
mod emulation;
mod local;
mod pubsub;
mod transaction;

use cluster::NodeNeed;
use deadline::Deadline;
use emulation::{ProjectSessions, UpstreamFacts};
pub use pubsub::PatternRegistry;
use pubsub::Subscriptions;
use transaction::Transaction;

/// Output waiting for a slow reader, per direction, before the session stops
/// reading more requests (backpressure rather than unbounded buffering).
const OUTPUT_HIGH_WATER: usize = 4 * 1024 * 1024;

/// How long a session whose client has closed its side waits for the
/// replies still owed to it.
const LINGER_AFTER_EOF: Duration = Duration::from_secs(2);

/// Requests in flight upstream before the session stops reading more.
const MAX_IN_FLIGHT: usize = 64 * 1024;

/// The reply to each request in flight when the upstream link fails.
const UPSTREAM_LOST: &str = "ERR upstream connection lost";

/// Most requests one session may have in flight on a shared link. Fewer
/// when its replies have been large: see `Session::shared_full`.
const MAX_SHARED_IN_FLIGHT: usize = 256;

/// Bytes of replies a session may have requested on a shared link, as far
/// as it can tell from the largest reply it has seen. A shared link can't
/// stop reading for one slow client, so this is what bounds the replies
/// the proxy holds for a client that does not read them.
const SHARED_REPLY_BUDGET: usize = 4 * 1024 * 1024;

/// What every session shares.
pub struct Shared {
    pub auth: Authenticator,
    /// The upstream in single mode; in cluster mode, the credentials and
    /// TLS that every node's link is made with.
    pub upstream: Connector,
    /// The cluster behind the proxy, in cluster mode.
    pub cluster: Option<Arc<Cluster>>,
    pub limits: SessionLimits,
    /// Metrics, audit log, lockout and alerts: every session reports here.
    pub monitor: Monitor,
    /// Each project's data-leakage policy for written values.
    pub leakage: Leakage,
    /// `None` when encryption is off. Swapped whole on reload; sessions pick
    /// up the new one before their next batch of requests.
    encryption: RwLock<Option<Arc<Encryption>>>,
    /// Projects whose users may run scripts (`allow_scripts`).
    script_projects: RwLock<HashSet<String>>,
    patterns: PatternRegistry,
    sessions: ProjectSessions,
    /// The upstream's version and word size, asked for by the first `INFO`.
    upstream_facts: tokio::sync::OnceCell<Arc<UpstreamFacts>>,
    next_client_id: AtomicU64,
}

/// Sealing settings: the sealer over the current keyring and which
/// projects refuse plain values.
pub struct Encryption {
    pub sealer: Arc<Sealer>,
    pub strict: bool,
    pub strict_projects: HashMap<String, bool>,
}

impl Encryption {
    fn values_for(&self, project: &Arc<str>) -> Values {
        Values {
            sealer: Arc::clone(&self.sealer),
            project: Arc::clone(project),
            strict: self
                .strict_projects
                .get(&**project)
                .copied()
                .unwrap_or(self.strict),
        }
    }
}

/// Per-session limits taken from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    pub max_request_bytes: usize,
    /// `None` disables the idle timeout.
    pub idle_timeout: Option<Duration>,
    /// How long a request that has begun arriving may stay incomplete;
    /// `None` waits for ever.
    pub request_timeout: Option<Duration>,
    /// How long the upstream may owe replies without sending a byte
    /// (blocking commands exempt); `None` waits for ever.
    pub upstream_timeout: Option<Duration>,
    pub project_isolation: bool,
}

impl Shared {
    pub fn new(
        auth: Authenticator,
        upstream: Connector,
        limits: SessionLimits,
        encryption: Option<Encryption>,
        monitor: Monitor,
        leakage: Leakage,
    ) -> Shared {
        Shared {
            auth,
            upstream,
            cluster: None,
            limits,
            monitor,
            leakage,
            encryption: RwLock::new(encryption.map(Arc::new)),
            script_projects: RwLock::default(),
            patterns: PatternRegistry::default(),
            sessions: ProjectSessions::default(),
            upstream_facts: tokio::sync::OnceCell::new(),
            next_client_id: AtomicU64::new(1),
        }
    }

    /// The encryption settings in force now.
    pub fn encryption(&self) -> Option<Arc<Encryption>> {
        self.encryption
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Puts a Redis Cluster behind the proxy (`upstream.mode = "cluster"`).
    pub fn with_cluster(mut self, cluster: Arc<Cluster>) -> Shared {
        self.cluster = Some(cluster);
        self
    }

    /// Links to every server that holds keys: the upstream, or each master
    /// of the cluster.
    fn key_holders(&self) -> Result<Vec<Connector>, UpstreamError> {
        match &self.cluster {
            Some(cluster) => {
                let masters = cluster.master_connectors();
                if masters.is_empty() {
                    cluster.request_refresh();
                    return Err(UpstreamError::NoSlotMap);
                }
                Ok(masters)
            }
            None => Ok(vec![self.upstream.clone()]),
        }
    }

    /// A link to any one server, for questions about the server itself.
    fn any_server(&self) -> Result<Connector, UpstreamError> {
        let holders = self.key_holders()?;
        holders.into_iter().next().ok_or(UpstreamError::NoSlotMap)
    }

    /// Sets which projects may run scripts (`EVAL`, `FCALL` and their
    /// forms). A script can name keys the proxy never sees, including other
    /// projects' keys, so this is a trust decision per project.
    pub fn set_script_projects(&self, projects: HashSet<String>) {
        *self
            .script_projects
            .write()
            .unwrap_or_else(PoisonError::into_inner) = projects;
    }

    fn scripts_allowed(&self, project: &str) -> bool {
        self.script_projects
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(project)
    }

    /// Replaces the encryption settings (a reloaded or rotated keyring).
    /// New writes use the new current key as soon as each session starts its
    /// next batch; values under older keys keep opening.
    pub fn replace_encryption(&self, encryption: Option<Encryption>) {
        *self
            .encryption
            .write()
            .unwrap_or_else(PoisonError::into_inner) = encryption.map(Arc::new);
    }
}

/// A reply the client is owed, in request order.
enum Pending {
    /// Sent upstream, over a shared link or the session's own; the reply
    /// will be transformed by the plan. A `blocking` request may be answered
    /// late on purpose.
    Upstream {
        plan: Plan,
        deliver: bool,
        blocking: bool,
        tracking: Tracking,
        shared: bool,
    },
    /// A forwarded `EXEC`: each element of its reply belongs to the plan of
    /// the command queued in its place.
    Exec {
        plans: Vec<Plan>,
        deliver: bool,
        tracking: Tracking,
    },
    /// A forwarded (un)subscribe: `remaining` confirmations are still to
    /// come, pushed like messages.
    PubSub { remaining: usize, deliver: bool },
    /// A forwarded `HELLO`: from its reply on, the link speaks `resp3`.
    /// `HELLO 2` may travel over a shared link, which never changes.
    Hello {
        resp3: bool,
        deliver: bool,
        shared: bool,
    },
    /// Sent upstream by the proxy for its own sake; the reply is checked
    /// for errors and dropped.
    Internal,
    /// Made by the proxy; waiting only for earlier replies to go first.
    Ready(Bytes),
}

impl Pending {
    /// Whether the reply comes from a shared link.
    fn is_shared(&self) -> bool {
        matches!(
            self,
            Pending::Upstream { shared: true, .. } | Pending::Hello { shared: true, .. }
        )
    }

    /// Whether a reply from the session's own link is awaited.
    fn awaits_own(&self) -> bool {
        !self.is_shared() && !matches!(self, Pending::Ready(_))
    }
}

/// The session's end of a shared link: where its stateless requests go
/// and their replies come back.
struct SharedRoute {
    link: SharedLink,
    sink: ReplySink,
    deliveries: tokio::sync::mpsc::UnboundedReceiver<Delivery>,
    /// Replies delivered and not yet matched with their plans.
    input: BytesMut,
    scanner: Scanner,
}

/// The reading side of the session's dedicated upstream link. The writing
/// side is a separate field so both can be awaited at once.
struct Link {
    reader: ReadHalf<BoxStream>,
    input: BytesMut,
    scanner: Scanner,
    /// Whether the link speaks RESP3 (after a forwarded `HELLO 3`).
    resp3: bool,
}

/// Why a session ends early.
#[derive(Debug, thiserror::Error)]
enum Fault {
    #[error("client I/O: {0}")]
    ClientIo(std::io::Error),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The shared link failed; every session it owed replies is told.
    #[error(transparent)]
    SharedLink(Arc<UpstreamError>),
}

/// `CLIENT REPLY` modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReplyMode {
    On,
    Off,
    SkipNext,
}

struct Session {
    id: u64,
    peer: SocketAddr,
    shared: Arc<Shared>,
    /// The shared link of this session's worker, for stateless requests;
    /// `None` when sharing is off.
    worker_link: Option<SharedLink>,
    identity: Option<Identity>,
    namespace: Arc<Namespace>,
    /// How this session's values are sealed; refreshed before each batch.
    values: Option<Values>,
    writer: ReplyWriter,
    name: Option<Bytes>,
    reply_mode: ReplyMode,
    transaction: Option<Transaction>,
    subscriptions: Subscriptions,
    pending: VecDeque<Pending>,
    client_out: BytesMut,
    /// Requests for the session's own link. They are written only once
    /// every request sent over the shared link has its reply, so Redis runs
    /// the session's requests in the order the client sent them.
    up_out: BytesMut,
    link: Option<Link>,
    link_writer: Option<WriteHalf<BoxStream>>,
    /// In cluster mode, the node the own link leads to.
    link_node: Option<Arc<str>>,
    /// In cluster mode, a `MULTI` the client was answered for that waits
    /// for a queued command to choose the node (see `cluster`).
    multi_unsent: bool,
    /// Opened on the first stateless request; `None` with sharing off.
    shared_route: Option<SharedRoute>,
    /// Requests for the shared link from the batch being handled, and how
    /// many; submitted together when the batch ends.
    shared_out: BytesMut,
    shared_batch: usize,
    /// Requests routed to the shared link whose reply hasn't been matched.
    shared_owed: usize,
    /// The largest reply the shared link brought, to size `shared_full`.
    largest_shared_reply: usize,
    /// A `WATCH` is in force on the own link.
    watching: bool,
    /// Stop reading requests; close once every owed reply is written.
    closing: bool,
    key_scratch: Vec<usize>,
    /// Blocking requests in flight; the upstream deadline waits for none.
    blocking_in_flight: usize,
    upstream_deadline: Deadline,
    /// The table name of the request being handled, for the audit log.
    command: &'static str,
    /// How the proxy answered the request being handled, when it answered
    /// it itself; forwarded requests are reported when their reply comes.
    answered: Option<Outcome>,
}

/// Runs one client session to its end. `logged_in` is the user a verified
/// client certificate logged in, if any; other sessions start
/// unauthenticated.
pub async fn run(
    stream: BoxStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    link: Option<SharedLink>,
    logged_in: Option<Identity>,
    shutdown: Shutdown,
) {
    let id = shared.next_client_id.fetch_add(1, Ordering::Relaxed);
    let span = tracing::debug_span!(
        "session",
        conn_id = id,
        client.addr = %peer,
        project = field::Empty,
        user = field::Empty,
    );
    async move {
        debug!("connection opened");
        let _open = shared.monitor.metrics().connection();
        if let Some(identity) = &logged_in {
            shared.monitor.logged_in(peer, identity, "certificate");
        }
        let mut session = Session::new(id, peer, shared, link);
        if let Some(identity) = logged_in {
            session.log_in(identity);
        }
        match session.serve(stream, shutdown).await {
            Ok(()) => debug!("connection closed"),
            Err(e) => debug!(error = %e, "connection closed"),
        }
    }
    .instrument(span)
    .await
}

impl Session {
    fn new(
        id: u64,
        peer: SocketAddr,
        shared: Arc<Shared>,
        worker_link: Option<SharedLink>,
    ) -> Session {
        Session {
            id,
            worker_link,
            peer,
            identity: None,
            namespace: Arc::new(Namespace::shared()),
            values: None,
            writer: ReplyWriter { resp3: false },
            name: None,
            reply_mode: ReplyMode::On,
            transaction: None,
            subscriptions: Subscriptions::default(),
            pending: VecDeque::new(),
            client_out: BytesMut::with_capacity(16 * 1024),
            up_out: BytesMut::new(),
            link: None,
            link_writer: None,
            link_node: None,
            multi_unsent: false,
            shared_route: None,
            shared_out: BytesMut::new(),
            shared_batch: 0,
            shared_owed: 0,
            largest_shared_reply: 0,
            watching: false,
            closing: false,
            key_scratch: Vec::new(),
            blocking_in_flight: 0,
            upstream_deadline: Deadline::new(shared.limits.upstream_timeout),
            command: "unknown",
            answered: None,
            shared,
        }
    }

    async fn serve(&mut self, stream: BoxStream, mut shutdown: Shutdown) -> Result<(), Fault> {
        let (mut client_rd, mut client_wr) = tokio::io::split(stream);
        let mut client_in = BytesMut::with_capacity(16 * 1024);
        let mut scanner = Scanner::for_requests();
        let idle = self.shared.limits.idle_timeout;
        let idle_timer = tokio::time::sleep(idle.unwrap_or(Duration::MAX / 4));
        tokio::pin!(idle_timer);
        let mut request_deadline = Deadline::new(self.shared.limits.request_timeout);

        let mut client_gone = false;
        // Made once: a new wait on every turn of the loop costs more than
        // the rest of a small request's handling.
        let announced = shutdown.announced();
        tokio::pin!(announced);

        let result = loop {
            if self.closing && self.pending.is_empty() && self.client_out.is_empty() {
                break Ok(());
            }
            let read_client = !self.closing
                && self.client_out.len() < OUTPUT_HIGH_WATER
                && self.up_out.len() < OUTPUT_HIGH_WATER
                && self.pending.len() < MAX_IN_FLIGHT
                && !self.shared_full();
            let read_upstream = self.link.is_some() && self.client_out.len() < OUTPUT_HIGH_WATER;
            let read_shared =
                self.shared_route.is_some() && self.client_out.len() < OUTPUT_HIGH_WATER;
            // The own link waits for the shared link's replies (see `up_out`).
            let write_upstream = !self.up_out.is_empty() && self.shared_owed == 0;
            let idle_armed =
                client_gone || (idle.is_some() && self.pending.is_empty() && !self.closing);
            // Replies are owed on the own link, and nothing but the upstream
            // holds them up. Shared links keep their own deadline.
            if read_upstream
                && self.shared_owed == 0
                && !self.pending.is_empty()
                && self.blocking_in_flight == 0
            {
                self.upstream_deadline.start();
            } else {
                self.upstream_deadline.stop();
            }

            // Biased: output first, so that everything owed upstream is
            // sent before a failing client write can end the session.
            tokio::select! {
                biased;
                written = write_link(&mut self.link_writer, &mut self.up_out), if write_upstream => {
                    if let Err(e) = written {
                        self.upstream_lost(&Fault::Upstream(UpstreamError::Io(e)));
                    }
                }
                written = client_wr.write_buf(&mut self.client_out), if !self.client_out.is_empty() => {
                    if let Err(e) = written {
                        break Err(Fault::ClientIo(e));
                    }
                    if self.client_out.is_empty()
                        && let Err(e) = client_wr.flush().await
                    {
                        break Err(Fault::ClientIo(e));
                    }
                }
                read = read_link(&mut self.link), if read_upstream => {
                    match read {
                        Ok(0) => self.upstream_lost(&Fault::Upstream(UpstreamError::Closed)),
                        Ok(_) => {
                            self.upstream_deadline.restart();
                            if let Err(fault) = self.take_replies() {
                                self.upstream_lost(&fault);
                            }
                        }
                        Err(e) => self.upstream_lost(&Fault::Upstream(UpstreamError::Io(e))),
                    }
                }
                delivery = receive_shared(&mut self.shared_route), if read_shared => {
                    self.take_delivery_from_shared(delivery);
                    // Requests held back while the shared link owed too many
                    // replies can go on now.
                    if !client_in.is_empty() && !self.closing && !self.shared_full() {
                        self.process_requests(&mut client_in, &mut scanner, &mut request_deadline).await;
                    }
                }
                read = client_rd.read_buf(frame::make_room(&mut client_in)), if read_client => {
                    match read {
                        // Requests already read still reach Redis, as they
                        // would in Redis itself, and a half-closed client
                        // gets their replies; but a blocked command is not
                        // waited for longer than the linger time.
                        Ok(0) => {
                            client_gone = true;
                            self.closing = true;
                            idle_timer.as_mut().reset(Instant::now() + LINGER_AFTER_EOF);
                            continue;
                        }
                        Ok(_) => {}
                        Err(e) => break Err(Fault::ClientIo(e)),
                    }
                    if let Some(timeout) = idle {
                        idle_timer.as_mut().reset(Instant::now() + timeout);
                    }
                    self.process_requests(&mut client_in, &mut scanner, &mut request_deadline).await;
                }
                _ = &mut idle_timer, if idle_armed => {
                    debug!("idle timeout");
                    break Ok(());
                }
                expired = request_deadline.expired(), if read_client && request_deadline.is_running() => {
                    if expired {
                        debug!(buffered = client_in.len(), "request timeout");
                        self.reply_local(|w, out| w.error(out, deadline::REQUEST_TIMED_OUT));
                        self.closing = true;
                    }
                }
                expired = self.upstream_deadline.expired(), if self.upstream_deadline.is_running() => {
                    if expired {
                        self.upstream_lost(&Fault::Upstream(UpstreamError::ReplyTimeout));
                    }
                }
                // `closing` is never cleared, so the finished wait is not
                // polled again.
                () = &mut announced, if !self.closing => {
                    self.closing = true;
                }
            }
        };

        let _ = client_wr.shutdown().await;
        self.drop_subscriptions();
        self.log_out();
        result
    }

    /// Handles the complete requests the client has sent, and keeps the
    /// request deadline running while a request is incomplete.
    async fn process_requests(
        &mut self,
        input: &mut BytesMut,
        scanner: &mut Scanner,
        request_deadline: &mut Deadline,
    ) {
        let buffered = input.len();
        let taken = self.take_requests(input, scanner).await;
        // The clock runs from the first byte of a request until it is
        // complete, however slowly the bytes trickle in.
        if input.is_empty() {
            request_deadline.stop();
        } else if input.len() < buffered {
            request_deadline.restart();
        } else {
            request_deadline.start();
        }
        if let Err(e) = taken {
            // Redis answers a protocol error, then closes once the replies
            // owed before it are written.
            debug!(error = %e, "client protocol error");
            self.reply_local(|w, out| w.error(out, &e.to_string()));
            self.closing = true;
        }
    }

    /// Handles the complete requests in `input`, in order, until the shared
    /// link owes the session as many replies as it may.
    async fn take_requests(
        &mut self,
        input: &mut BytesMut,
        scanner: &mut Scanner,
    ) -> Result<(), ProtocolError> {
        self.refresh_values();
        let taken = self.take_each_request(input, scanner).await;
        self.submit_shared();
        taken
    }

    async fn take_each_request(
        &mut self,
        input: &mut BytesMut,
        scanner: &mut Scanner,
    ) -> Result<(), ProtocolError> {
        while !self.closing && !self.shared_full() {
            let limits = Limits::request(
                self.shared.limits.max_request_bytes,
                self.identity.is_some(),
            );
            let Some(args) = frame::next_request(input, scanner, &limits)? else {
                break;
            };
            if args.is_empty() {
                continue;
            }
            self.command = "unknown";
            self.answered = None;
            self.handle(args).await;
            if let Some(outcome) = self.answered.take() {
                let identity = self.identity.as_ref();
                let monitor = &self.shared.monitor;
                monitor.answered(self.peer, identity, self.command, outcome);
            }
        }
        Ok(())
    }

    /// Handles one request: authentication gate, table lookup, permission,
    /// then local handling or forwarding.
    async fn handle(&mut self, args: Vec<Bytes>) {
        let spec = if self.identity.is_none() {
            match command::lookup(&args) {
                Ok(spec) if is_pre_auth(spec.handling) => spec,
                found => {
                    let name = found.map_or("unknown", detection::command_name);
                    self.deny(name, "not_authenticated");
                    self.reply_local(|w, out| w.error(out, "NOAUTH Authentication required."));
                    return;
                }
            }
        } else {
            match command::lookup(&args) {
                Ok(spec) => spec,
                Err(e) => return self.refuse(&e.to_string()),
            }
        };
        self.command = detection::command_name(spec);

        if let Some(denied) = self.permission_error(spec) {
            self.deny(self.command, "permission");
            return self.refuse(&denied);
        }
        if !self.writer.resp3 && self.subscriptions.active() && !allowed_while_subscribed(spec) {
            return self.refuse(&pubsub::subscribed_mode_error(&display_name(&args)));
        }
        if SCRIPT_COMMANDS.contains(&spec.name)
            && !self
                .identity
                .as_ref()
                .is_some_and(|identity| self.shared.scripts_allowed(&identity.project))
        {
            let text = format!(
                "ERR '{}' is not available through redcloak: scripts are not allowed for this project",
                display_name(&args)
            );
            self.deny(self.command, "refused");
            return self.refuse(&text);
        }

        match spec.handling {
            Handling::Refuse(reason) => {
                self.deny(self.command, "refused");
                let text = format!(
                    "ERR '{}' is not available through redcloak: {reason}",
                    display_name(&args)
                );
                self.refuse(&text);
            }
            Handling::Local(Local::Ping | Local::Echo) if self.transaction.is_some() => {
                // Queued like any command; Redis answers it inside EXEC.
                self.forward(spec, &args).await;
            }
            Handling::Local(_) if self.transaction.is_some() => {
                let text = format!(
                    "ERR '{}' can't be queued in a transaction through redcloak",
                    display_name(&args)
                );
                self.refuse(&text);
            }
            Handling::Local(local) => self.handle_local(local, &args).await,
            Handling::Forward => match spec.name {
                "multi" | "exec" | "discard" => self.transaction_command(spec, &args).await,
                _ => match refused_form(spec, &args) {
                    Some(text) => {
                        self.deny(self.command, "refused");
                        self.refuse(text)
                    }
                    None => self.forward(spec, &args).await,
                },
            },
        }
    }

    /// Reports a request the client may not make (the caller then answers
    /// it with an error).
    fn deny(&mut self, command: &'static str, reason: &'static str) {
        let identity = self.identity.as_ref();
        let monitor = &self.shared.monitor;
        monitor.denied(self.peer, identity, command, reason);
        self.answered = Some(Outcome::Denied);
    }

    /// Answers an error for a request the proxy won't forward. Inside
    /// `MULTI` this also dooms the transaction, as a rejected command does
    /// in Redis.
    fn refuse(&mut self, text: &str) {
        if let Some(transaction) = self.transaction.as_mut() {
            transaction.aborted = true;
        }
        self.reply_local(|w, out| w.error(out, text));
    }

    /// Rewrites a request and sends it upstream, its plan queued for the
    /// reply. Inside `MULTI` the immediate reply is `QUEUED` and the plan
    /// waits for `EXEC`.
    async fn forward(&mut self, spec: &'static command::CommandSpec, args: &[Bytes]) {
        let blocking = self.transaction.is_none() && deadline::blocks(spec, args);
        let shared = self.use_shared_link(spec.stateful || blocking);
        if !shared && !self.ensure_link(self.node_need(spec, args)).await {
            return;
        }
        let (leakage, monitor) = (&self.shared.leakage, &self.shared.monitor);
        let redacted;
        let args = match leakage.screen(monitor, self.peer, self.identity.as_ref(), spec, args) {
            Screened::Pass => args,
            Screened::Redacted(screened) => {
                redacted = screened;
                &redacted[..]
            }
            Screened::Rejected(text) => return self.refuse(&text),
        };
        let rewritten = plan::rewrite(
            spec,
            args,
            &self.namespace,
            self.values.as_ref(),
            if shared {
                &mut self.shared_out
            } else {
                &mut self.up_out
            },
            &mut self.key_scratch,
        );
        let plan = match rewritten {
            Ok(plan) => plan,
            Err(e) => return self.refuse(&e.to_string()),
        };
        if shared {
            self.shared_batch += 1;
            self.shared_owed += 1;
        }
        match spec.name {
            "watch" => self.watching = true,
            "unwatch" => self.watching = false,
            _ => {}
        }
        let plan = match self.transaction.as_mut() {
            Some(transaction) => {
                let queued = Plan {
                    reply: command::ReplyShape::Plain,
                    values: None,
                    ..plan.clone()
                };
                transaction.plans.push(plan);
                queued
            }
            None => plan,
        };
        let deliver = self.take_delivery();
        self.blocking_in_flight += usize::from(blocking);
        let monitor = &self.shared.monitor;
        let tracking = monitor.track(self.identity.as_ref(), spec, args);
        self.pending.push_back(Pending::Upstream {
            plan,
            deliver,
            blocking,
            tracking,
            shared,
        });
    }

    /// Whether the next request goes over the shared link (opening the
    /// session's end of it if need be) rather than the session's own.
    /// `stateful`: the request itself needs a connection of its own.
    ///
    /// A session uses its own link while it is in a mode that lives in the
    /// upstream connection (a transaction, a watch, subscriptions, RESP3)
    /// and while that link still owes it replies: a shared request sent
    /// meanwhile could overtake them.
    fn use_shared_link(&mut self, stateful: bool) -> bool {
        if stateful
            || self.transaction.is_some()
            || self.watching
            || self.writer.resp3
            || self.subscriptions.active()
            || self.own_link_busy()
        {
            return false;
        }
        if self.shared_route.is_none() {
            let Some(link) = self.worker_link.clone() else {
                return false;
            };
            let (sink, deliveries) = tokio::sync::mpsc::unbounded_channel();
            self.shared_route = Some(SharedRoute {
                link,
                sink,
                deliveries,
                input: BytesMut::new(),
                scanner: Scanner::for_replies(),
            });
        }
        true
    }

    /// Whether the own link has requests queued or in flight. Shared
    /// requests are only ever queued behind shared ones, so any own request
    /// is the last request in the FIFO.
    fn own_link_busy(&self) -> bool {
        self.link.is_some()
            && self
                .pending
                .iter()
                .rev()
                .find(|p| !matches!(p, Pending::Ready(_)))
                .is_some_and(Pending::awaits_own)
    }

    /// Whether the shared link owes the session as many replies as it may
    /// ask for: fewer the larger its replies have been, so that a client
    /// that doesn't read can't make the proxy hold much for it.
    fn shared_full(&self) -> bool {
        let per_reply = self.largest_shared_reply.max(1);
        let allowed = (SHARED_REPLY_BUDGET / per_reply).clamp(1, MAX_SHARED_IN_FLIGHT);
        self.shared_owed >= allowed
    }

    /// Hands the batch of shared requests to the link.
    fn submit_shared(&mut self) {
        if self.shared_batch == 0 {
            return;
        }
        let Some(route) = &self.shared_route else {
            return;
        };
        route.link.submit(Submission {
            requests: self.shared_out.split().freeze(),
            count: self.shared_batch,
            replies: route.sink.clone(),
        });
        self.shared_batch = 0;
    }

    /// Takes what the shared link sent: replies to match, or the news that
    /// they won't come.
    fn take_delivery_from_shared(&mut self, delivery: Option<Delivery>) {
        match delivery {
            Some(Delivery::Replies(replies)) => {
                if let Some(route) = self.shared_route.as_mut() {
                    route.input.extend_from_slice(&replies);
                }
                if let Err(fault) = self.take_replies() {
                    self.upstream_lost(&fault);
                }
            }
            Some(Delivery::Lost(e)) => self.upstream_lost(&Fault::SharedLink(e)),
            // The session holds a sender itself, so the channel can't close.
            None => self.upstream_lost(&Fault::Upstream(UpstreamError::Closed)),
        }
    }

    /// The NOPERM reply for a user whose permission doesn't cover `spec`.
    fn permission_error(&self, spec: &command::CommandSpec) -> Option<String> {
        let identity = self.identity.as_ref()?;
        let allowed = match spec.access {
            Access::Connection | Access::Read => true,
            Access::Write => identity.permission.can_write(),
            Access::Admin => identity.permission.is_admin(),
        };
        (!allowed).then(|| {
            format!(
                "NOPERM User {} has no permissions to run the '{}' command",
                identity.user, spec.name
            )
        })
    }

    /// Verifies credentials and, on success, moves the session into the
    /// user's project.
    async fn authenticate(&mut self, user: &[u8], password: &[u8]) -> bool {
        let (auth, monitor) = (&self.shared.auth, &self.shared.monitor);
        let Some(identity) = monitor.login(auth, self.peer, user, password).await else {
            debug!("authentication failed");
            return false;
        };
        self.log_in(identity);
        true
    }

    /// Moves the session into the user's project.
    fn log_in(&mut self, identity: Identity) {
        self.log_out();
        self.shared.sessions.enter(&identity.project);
        let span = tracing::Span::current();
        span.record("project", &*identity.project);
        span.record("user", &*identity.user);
        debug!("authenticated");
        self.namespace = Arc::new(if self.shared.limits.project_isolation {
            Namespace::for_project(&identity.project)
        } else {
            Namespace::shared()
        });
        self.identity = Some(identity);
        self.values = None;
        self.refresh_values();
    }

    /// Leaves the project the session was logged in to, if any.
    fn log_out(&mut self) {
        if let Some(identity) = self.identity.take() {
            self.shared.sessions.leave(&identity.project);
        }
        self.values = None;
    }

    /// Takes the current encryption settings for the session's project, so
    /// a reloaded keyring applies from the next batch of requests on.
    fn refresh_values(&mut self) {
        let Some(identity) = &self.identity else {
            return;
        };
        let encryption = self.shared.encryption();
        let unchanged = match (&encryption, &self.values) {
            (Some(e), Some(v)) => Arc::ptr_eq(&e.sealer, &v.sealer),
            (None, None) => true,
            _ => false,
        };
        if !unchanged {
            self.values = encryption.map(|e| e.values_for(&identity.project));
        }
    }

    /// Makes sure the session's own link is open and leads where `need`
    /// says (in cluster mode, see `cluster`). On failure the request has
    /// its error reply already.
    async fn ensure_link(&mut self, need: NodeNeed) -> bool {
        match self.shared.cluster.clone() {
            Some(cluster) => self.ensure_cluster_link(&cluster, need).await,
            None if self.link.is_some() => true,
            None => {
                let connector = self.shared.upstream.clone();
                self.open_link(&connector).await
            }
        }
    }

    /// Connects the own link through `connector`. On failure the request
    /// gets an error reply, and the session closes (SPEC: a client whose
    /// upstream is unreachable is closed; a new connection tries again).
    async fn open_link(&mut self, connector: &Connector) -> bool {
        let stream = match connector.connect().await {
            Ok(stream) => stream,
            Err(e) => {
                debug!(error = %e, "upstream unavailable");
                let text = format!("ERR upstream unavailable: {e}");
                self.reply_local(|w, out| w.error(out, &text));
                self.closing = true;
                return false;
            }
        };
        let (reader, writer) = tokio::io::split(stream);
        self.link_writer = Some(writer);
        self.link = Some(Link {
            reader,
            input: BytesMut::with_capacity(16 * 1024),
            scanner: Scanner::for_replies(),
            resp3: false,
        });
        debug!("upstream link opened");
        true
    }

    /// Whether the next reply should reach the client, per `CLIENT REPLY`.
    fn take_delivery(&mut self) -> bool {
        match self.reply_mode {
            ReplyMode::On => true,
            ReplyMode::Off => false,
            ReplyMode::SkipNext => {
                self.reply_mode = ReplyMode::On;
                false
            }
        }
    }

    /// Queues a reply the proxy makes itself, behind any owed upstream
    /// replies so that order is kept.
    fn reply_local(&mut self, write: impl FnOnce(&ReplyWriter, &mut BytesMut)) {
        if !self.take_delivery() {
            self.answered.get_or_insert(Outcome::Ok);
            return;
        }
        let error = if self.pending.is_empty() {
            let start = self.client_out.len();
            write(&self.writer, &mut self.client_out);
            self.client_out.get(start) == Some(&b'-')
        } else {
            let mut reply = BytesMut::new();
            write(&self.writer, &mut reply);
            let error = reply.first() == Some(&b'-');
            self.pending.push_back(Pending::Ready(reply.freeze()));
            error
        };
        self.answered
            .get_or_insert(if error { Outcome::Error } else { Outcome::Ok });
    }

    /// Matches every complete upstream reply with the plan at the head of
    /// the FIFO, and moves ready replies out behind it.
    ///
    /// The head of the FIFO says which link the next reply comes from: the
    /// shared link's replies are all owed before any of the own link's (see
    /// `use_shared_link`), and the own link's wait in its buffer meanwhile.
    fn take_replies(&mut self) -> Result<(), Fault> {
        let limits = reply_limits(&self.shared.limits);
        let mut tally = self.shared.monitor.tally(self.peer);
        loop {
            let from_shared = self.pending.front().is_some_and(Pending::is_shared);
            let (input, scanner, resp3) =
                match (from_shared, &mut self.shared_route, &mut self.link) {
                    (true, Some(route), _) => (&mut route.input, &mut route.scanner, false),
                    (false, _, Some(link)) => (&mut link.input, &mut link.scanner, link.resp3),
                    _ => return Ok(()),
                };
            let Some(len) = scanner
                .measure(input, &limits)
                .map_err(UpstreamError::Protocol)?
            else {
                return Ok(());
            };
            let raw = input.split_to(len).freeze();
            if from_shared {
                self.shared_owed -= 1;
                self.largest_shared_reply = self.largest_shared_reply.max(len);
            }

            // Pushes (RESP3), and in RESP2 any frame while no request waits
            // at the head of the FIFO, are Pub/Sub traffic.
            let request_waits = matches!(
                self.pending.front(),
                Some(
                    Pending::Upstream { .. }
                        | Pending::Exec { .. }
                        | Pending::Hello { .. }
                        | Pending::Internal
                )
            );
            if !from_shared
                && (raw.first() == Some(&b'>') || (self.subscriptions.ever && !request_waits))
            {
                pubsub::route_push(
                    &mut self.pending,
                    &self.namespace,
                    &raw,
                    resp3,
                    &mut self.client_out,
                )
                .map_err(UpstreamError::Protocol)?;
                release_ready(&mut self.pending, &mut self.client_out);
                continue;
            }

            let monitor = &self.shared.monitor;
            match self.pending.pop_front() {
                Some(Pending::Upstream {
                    plan,
                    deliver,
                    blocking,
                    tracking,
                    shared: _,
                }) => {
                    self.blocking_in_flight -= usize::from(blocking);
                    let mut outcome = reply_outcome(&raw);
                    if deliver {
                        match reply::transform(&plan, raw, resp3, &mut self.client_out) {
                            Ok(()) => {}
                            Err(ReplyError::Protocol(e)) => {
                                // This request's plan is taken already: its
                                // error goes here, the others' in `upstream_lost`.
                                tally.replied(&tracking, Outcome::Error);
                                self.writer.error(&mut self.client_out, UPSTREAM_LOST);
                                return Err(Fault::Upstream(e.into()));
                            }
                            Err(ReplyError::Open(e)) => {
                                // Logged without key or value; the session goes on.
                                warn!(command = plan.command, error = %e, "a value could not be opened");
                                let command = tracking.command();
                                monitor.integrity_failure(self.peer, &tracking, command, &e);
                                outcome = Outcome::Error;
                                self.writer.error(
                                    &mut self.client_out,
                                    &format!("ERR redcloak could not open a stored value: {e}"),
                                );
                            }
                        }
                    }
                    tally.replied(&tracking, outcome);
                }
                Some(Pending::Exec {
                    plans,
                    deliver,
                    tracking,
                }) => {
                    let outcome = reply_outcome(&raw);
                    if deliver {
                        let transformed =
                            reply::transform_exec(&plans, raw, resp3, &mut self.client_out);
                        let failed = match transformed {
                            Ok(failed) => failed,
                            Err(e) => {
                                tally.replied(&tracking, Outcome::Error);
                                self.writer.error(&mut self.client_out, UPSTREAM_LOST);
                                return Err(Fault::Upstream(e.into()));
                            }
                        };
                        for (command, e) in &failed {
                            monitor.integrity_failure(self.peer, &tracking, command, e);
                        }
                    }
                    tally.replied(&tracking, outcome);
                }
                Some(Pending::Hello {
                    resp3,
                    deliver,
                    shared,
                }) => {
                    if let (false, Some(link)) = (shared, self.link.as_mut())
                        && raw.first() != Some(&b'-')
                    {
                        link.resp3 = resp3;
                    }
                    if deliver && self.shared.cluster.is_some() {
                        self.client_out
                            .extend_from_slice(&cluster::standalone_hello(&raw));
                    } else if deliver {
                        self.client_out.extend_from_slice(&raw);
                    }
                }
                Some(Pending::Internal) => {
                    if raw.first() == Some(&b'-') {
                        return Err(Fault::Upstream(UpstreamError::AuthRefused));
                    }
                }
                Some(Pending::Ready(_) | Pending::PubSub { .. }) | None => {
                    return Err(Fault::Upstream(UpstreamError::Protocol(
                        ProtocolError::Decode(
                            "a reply arrived that no request was waiting for".into(),
                        ),
                    )));
                }
            }
            release_ready(&mut self.pending, &mut self.client_out);
        }
    }

    /// The upstream is gone, or stopped answering (its link then can't be
    /// trusted to pair replies with requests any more): every request in
    /// flight gets an error reply, in order, and the client is closed once
    /// they are written.
    fn upstream_lost(&mut self, fault: &Fault) {
        debug!(error = %fault, in_flight = self.pending.len(), "upstream link lost");
        let text = match fault {
            Fault::Upstream(e) => lost_reply_text(e),
            Fault::SharedLink(e) => lost_reply_text(e),
            Fault::ClientIo(_) => UPSTREAM_LOST.to_owned(),
        };
        let text = text.as_str();
        self.link = None;
        self.link_writer = None;
        self.up_out.clear();
        self.shared_route = None;
        self.shared_out.clear();
        self.shared_batch = 0;
        self.shared_owed = 0;
        self.blocking_in_flight = 0;
        self.upstream_deadline.stop();
        for entry in &self.pending {
            let monitor = &self.shared.monitor;
            match entry {
                Pending::Upstream { tracking, .. } | Pending::Exec { tracking, .. } => {
                    monitor.replied(self.peer, tracking, Outcome::Error)
                }
                _ => {}
            }
        }
        for entry in std::mem::take(&mut self.pending) {
            match entry {
                Pending::Upstream { deliver: true, .. }
                | Pending::Exec { deliver: true, .. }
                | Pending::PubSub { deliver: true, .. }
                | Pending::Hello { deliver: true, .. } => {
                    self.writer.error(&mut self.client_out, text)
                }
                Pending::Ready(reply) => self.client_out.extend_from_slice(&reply),
                Pending::Upstream { .. }
                | Pending::Exec { .. }
                | Pending::PubSub { .. }
                | Pending::Hello { .. }
                | Pending::Internal => {}
            }
        }
        self.closing = true;
    }
}

/// The error reply to requests in flight when their link fails.
fn lost_reply_text(error: &UpstreamError) -> String {
    match error {
        UpstreamError::ReplyTimeout => "ERR upstream request timed out".to_owned(),
        // The link never came up: say why, as a new connection would.
        UpstreamError::Connect(_)
        | UpstreamError::ConnectTimeout
        | UpstreamError::AuthRefused
        | UpstreamError::Tls => format!("ERR upstream unavailable: {error}"),
        _ => UPSTREAM_LOST.to_owned(),
    }
}

/// Bounds on one upstream reply: twice the largest request, since a reply
/// may carry values the proxy has opened (and so grown).
pub fn reply_limits(limits: &SessionLimits) -> Limits {
    Limits::reply(limits.max_request_bytes.saturating_mul(2))
}

/// Forms of a forwarded command the proxy refuses although the command
/// itself is allowed.
fn refused_form(spec: &command::CommandSpec, args: &[Bytes]) -> Option<&'static str> {
    // COPY's DB option reaches another database; the table can't say so.
    if spec.name == "copy" && args.iter().skip(3).any(|a| a.eq_ignore_ascii_case(b"DB")) {
        return Some(
            "ERR 'copy' with DB is not available through redcloak: reaches outside the project",
        );
    }
    plan::ambiguous_keys(spec, args)
}

/// Moves replies the proxy made, now at the head of the FIFO, out.
fn release_ready(pending: &mut VecDeque<Pending>, out: &mut BytesMut) {
    while let Some(Pending::Ready(_)) = pending.front() {
        if let Some(Pending::Ready(reply)) = pending.pop_front() {
            out.extend_from_slice(&reply);
        }
    }
}

/// Scripts run with the proxy's upstream rights and may name keys the proxy
/// never sees; only projects with `allow_scripts` may run them.
const SCRIPT_COMMANDS: &[&str] = &[
    "eval",
    "eval_ro",
    "evalsha",
    "evalsha_ro",
    "fcall",
    "fcall_ro",
];

/// What Redis allows in RESP2 subscribed mode.
fn allowed_while_subscribed(spec: &command::CommandSpec) -> bool {
    matches!(
        spec.handling,
        Handling::Local(
            Local::Subscribe(_) | Local::Unsubscribe(_) | Local::Ping | Local::Quit | Local::Reset
        )
    )
}

/// How an upstream reply ended, from its first byte: an error frame (RESP2
/// or RESP3, simple or blob) or anything else.
fn reply_outcome(raw: &[u8]) -> Outcome {
    match raw.first() {
        Some(b'-' | b'!') => Outcome::Error,
        _ => Outcome::Ok,
    }
}

/// Commands answered before authentication (SPEC: AUTH, HELLO, QUIT, RESET).
fn is_pre_auth(handling: Handling) -> bool {
    matches!(
        handling,
        Handling::Local(Local::Auth | Local::Hello | Local::Quit | Local::Reset)
    )
}

/// The command's name as the client wrote it, lowercased, for error texts.
fn display_name(args: &[Bytes]) -> String {
    let name = args.first().map(|a| a.as_ref()).unwrap_or_default();
    let mut text = String::from_utf8_lossy(name).to_lowercase();
    if let Some(sub) = args.get(1).filter(|_| {
        matches!(
            text.as_str(),
            "client"
                | "command"
                | "object"
                | "config"
                | "cluster"
                | "script"
                | "function"
                | "acl"
                | "memory"
                | "pubsub"
                | "xinfo"
                | "xgroup"
                | "module"
                | "slowlog"
                | "latency"
        )
    }) {
        text.push('|');
        text.push_str(&String::from_utf8_lossy(sub).to_lowercase());
    }
    text.truncate(128);
    text
}

async fn receive_shared(route: &mut Option<SharedRoute>) -> Option<Delivery> {
    match route {
        Some(route) => route.deliveries.recv().await,
        None => std::future::pending().await,
    }
}

async fn read_link(link: &mut Option<Link>) -> std::io::Result<usize> {
    match link {
        Some(link) => {
            frame::make_room(&mut link.input);
            link.reader.read_buf(&mut link.input).await
        }
        None => std::future::pending().await,
    }
}

async fn write_link(
    writer: &mut Option<WriteHalf<BoxStream>>,
    out: &mut BytesMut,
) -> std::io::Result<usize> {
    match writer {
        Some(writer) => {
            let n = writer.write_buf(out).await?;
            if out.is_empty() {
                writer.flush().await?;
            }
            Ok(n)
        }
        None => std::future::pending().await,
    }
}
