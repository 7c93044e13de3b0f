//! The client-facing listener: accepts connections within the configured
//! limit and starts a session for each, until shutdown.
//!
//! A connection beyond `max_connections` gets Redis's own error reply and is
//! closed at once. On shutdown the listener stops accepting, tells every
//! session, and waits (bounded) for them to write the replies they owe.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tracing::{info, warn};

use crate::session::{self, Shared};
use crate::shutdown::Shutdown;

/// How long a failed `accept` (for example, out of file descriptors) backs
/// off before trying again, at most.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts clients on `listener` until `shutdown` is announced, then waits
/// up to `grace` for open sessions to finish.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    max_connections: usize,
    mut shutdown: Shutdown,
    grace: Duration,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    // Every session holds a clone; when all are dropped, `recv` returns None.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let mut backoff = Duration::from_millis(5);

    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.announced() => break,
        };
        let (mut socket, peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(5);
                pair
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                continue;
            }
        };

        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            warn!(client.addr = %peer, max_connections, "connection limit reached");
            tokio::spawn(async move {
                let _ = socket
                    .write_all(b"-ERR max number of clients reached\r\n")
                    .await;
                let _ = socket.shutdown().await;
            });
            continue;
        };
        let _ = socket.set_nodelay(true);

        let shared = Arc::clone(&shared);
        let session_shutdown = shutdown.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            session::run(Box::new(socket), peer, shared, session_shutdown).await;
            drop(permit);
            drop(done);
        });
    }

    info!("shutdown begun: no longer accepting connections");
    drop(done_tx);
    if tokio::time::timeout(grace, done_rx.recv()).await.is_err() {
        warn!(
            grace_secs = grace.as_secs(),
            "sessions still open after the grace period"
        );
    }
}
