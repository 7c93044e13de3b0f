//! Deadlines on the two waits a peer can stretch without end: a client
//! that starts a request and never finishes it (slow-loris), and an
//! upstream that owes replies and sends nothing.
//!
//! Each is a clock that starts when the wait begins and is checked only
//! when its timer fires, so progress (bytes from the upstream) costs an
//! `Instant::now()` rather than a timer reset per read.

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{Instant, Sleep};

use crate::command::CommandSpec;

/// The reply to a client whose request stayed incomplete too long; the
/// connection is closed after it, as after any protocol error.
pub(super) const REQUEST_TIMED_OUT: &str =
    "ERR Protocol error: request not completed within the request timeout";

/// A timer far enough away to never fire; the clock is not running.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A bound on one wait. Without a limit (configured as 0) it never runs.
pub(super) struct Deadline {
    limit: Option<Duration>,
    /// When the wait began, or when it last made progress; `None` while
    /// nothing is awaited.
    since: Option<Instant>,
    /// Fires at or before `since + limit`; moved forward lazily.
    timer: Pin<Box<Sleep>>,
}

impl Deadline {
    pub(super) fn new(limit: Option<Duration>) -> Deadline {
        Deadline {
            limit,
            since: None,
            timer: Box::pin(tokio::time::sleep(NEVER)),
        }
    }

    /// Starts the clock now, unless it is already running.
    pub(super) fn start(&mut self) {
        if let (Some(limit), None) = (self.limit, self.since) {
            let now = Instant::now();
            self.since = Some(now);
            self.timer.as_mut().reset(now + limit);
        }
    }

    /// Starts the clock again from now: the wait made progress.
    pub(super) fn restart(&mut self) {
        if self.since.is_some() {
            self.since = Some(Instant::now());
        } else {
            self.start();
        }
    }

    pub(super) fn stop(&mut self) {
        self.since = None;
    }

    pub(super) fn is_running(&self) -> bool {
        self.since.is_some()
    }

    /// Completes when the timer fires: `true` if the wait has really lasted
    /// the whole limit, `false` (and the timer moved to the new end) if it
    /// made progress meanwhile. Await it only while the clock runs.
    pub(super) async fn expired(&mut self) -> bool {
        self.timer.as_mut().await;
        let (Some(limit), Some(since)) = (self.limit, self.since) else {
            self.timer.as_mut().reset(Instant::now() + NEVER);
            return false;
        };
        let due = since + limit;
        if Instant::now() >= due {
            return true;
        }
        self.timer.as_mut().reset(due);
        false
    }
}

/// Whether Redis may hold the reply to this request back on purpose: the
/// blocking commands, and `XREAD`/`XREADGROUP` with `BLOCK`. While one is
/// in flight the upstream deadline does not run, since a silent upstream
/// is then the expected state; these commands carry their own timeouts.
pub(super) fn blocks(spec: &CommandSpec, args: &[Bytes]) -> bool {
    match spec.name {
        "blpop" | "brpop" | "brpoplpush" | "blmove" | "blmpop" | "bzpopmin" | "bzpopmax"
        | "bzmpop" | "wait" | "waitaof" => true,
        "xread" | "xreadgroup" => args.iter().any(|a| a.eq_ignore_ascii_case(b"BLOCK")),
        _ => false,
    }
}
