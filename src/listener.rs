//! The client-facing listener: accepts connections within the configured
//! limit and starts a session for each, until shutdown.
//!
//! A connection beyond `max_connections` gets Redis's own error reply and is
//! closed at once. On shutdown the listener stops accepting, tells every
//! session, and waits (bounded) for them to write the replies they owe.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tracing::{Instrument, debug, info, warn};

use crate::metrics::Metrics;
use crate::session::{self, Shared};
use crate::shutdown::Shutdown;
use crate::tls::{self, ServerTls};
use crate::upstream::BoxStream;
use crate::workers::Workers;

/// How long a failed `accept` (for example, out of file descriptors) backs
/// off before trying again, at most.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts clients on `listener` until `shutdown` is announced, then waits
/// up to `grace` for open sessions to finish. Each session runs on one of
/// `workers`. With `tls`, each client first completes a TLS handshake
/// (bounded by [`tls::HANDSHAKE_TIMEOUT`]) inside its own task, so a slow
/// handshake never delays the accept loop.
pub async fn serve(
    listener: TcpListener,
    workers: Workers,
    shared: Arc<Shared>,
    tls: Option<Arc<ServerTls>>,
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

        // The socket moves to the worker's runtime, which must register it
        // with its own I/O driver.
        let socket = match socket.into_std() {
            Ok(socket) => socket,
            Err(e) => {
                debug!(client.addr = %peer, error = %e, "connection lost before its session began");
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        let session_shutdown = shutdown.clone();
        let done = done_tx.clone();
        let tls = tls.clone();
        workers.spawn(move |link| async move {
            let socket = match TcpStream::from_std(socket) {
                Ok(socket) => socket,
                Err(e) => {
                    warn!(client.addr = %peer, error = %e, "could not register the connection");
                    return;
                }
            };
            match tls {
                None => {
                    session::run(Box::new(socket), peer, shared, link, None, session_shutdown).await
                }
                Some(tls) => {
                    if let Some((stream, identity)) =
                        handshake(&tls, socket, peer, shared.monitor.metrics()).await
                    {
                        // The session's span nests in this one, so its log
                        // lines carry the certificate's names.
                        let span = tracing::debug_span!("tls", client.cert = %identity);
                        // A verified certificate bound to a user logs in
                        // without AUTH.
                        let logged_in = shared.auth.identity_for_certificate(&identity.names);
                        session::run(stream, peer, shared, link, logged_in, session_shutdown)
                            .instrument(span)
                            .await;
                    }
                }
            }
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

/// The server side of the TLS handshake; `None` (logged) when the client
/// fails it, times out, or speaks plaintext to the TLS port.
async fn handshake(
    tls: &ServerTls,
    socket: TcpStream,
    peer: std::net::SocketAddr,
    metrics: &Metrics,
) -> Option<(BoxStream, tls::PeerIdentity)> {
    match tls.accept(socket, tls::HANDSHAKE_TIMEOUT).await {
        Ok((stream, identity)) => {
            let (_, conn) = stream.get_ref();
            debug!(
                client.addr = %peer,
                version = ?conn.protocol_version(),
                cipher = ?conn.negotiated_cipher_suite().map(|s| s.suite()),
                "tls handshake done"
            );
            Some((Box::new(stream), identity))
        }
        // A refused certificate is worth a warning; plaintext, silent or
        // broken peers are routine on an exposed port.
        Err(e @ tls::TlsError::ClientHandshake(_)) => {
            warn!(client.addr = %peer, error = %e, "tls handshake failed");
            metrics.tls_handshake_failure("refused");
            None
        }
        Err(e) => {
            debug!(client.addr = %peer, error = %e, "tls handshake failed");
            let reason = match e {
                tls::TlsError::ClientNotTls => "plaintext",
                tls::TlsError::ClientHandshakeTimeout(_) => "timeout",
                _ => "refused",
            };
            metrics.tls_handshake_failure(reason);
            None
        }
    }
}
