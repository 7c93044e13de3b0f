//! Links to the upstream Redis: connecting with a timeout and logging the
//! proxy itself in with its own credentials.
//!
//! Sessions send stateless requests over links shared with other sessions
//! (`shared`), and open a link of their own for stateful modes.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::warn;

use crate::config::UpstreamSettings;
use crate::frame::{self, Limits, ProtocolError, Scanner};
use crate::tls::UpstreamTls;

mod cluster;
mod router;
mod shared;

pub use cluster::{Cluster, SlotMap, slot};
pub use shared::{Delivery, ReplySink, SharedLink, SharedLinks, Submission};

/// A byte stream in either direction: plain TCP or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// A boxed stream, so sessions need not be generic over the transport.
pub type BoxStream = Box<dyn Stream>;

/// Why the upstream could not be reached or used. The texts go into error
/// replies, so they name no secret and no address.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to the upstream failed: {0}")]
    Connect(#[source] std::io::Error),
    #[error("connecting to the upstream timed out")]
    ConnectTimeout,
    #[error("the upstream refused the proxy's credentials")]
    AuthRefused,
    #[error("the upstream closed the connection")]
    Closed,
    /// Replies were owed and the upstream sent nothing for
    /// `upstream.request_timeout_ms`.
    #[error("the upstream sent no reply within the request timeout")]
    ReplyTimeout,
    #[error("upstream I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the upstream sent a malformed reply: {0}")]
    Protocol(#[from] ProtocolError),
    /// The detail (which certificate, which name) is logged by the
    /// connector, not sent to clients.
    #[error("the tls handshake with the upstream failed")]
    Tls,
    /// Cluster mode, before any node has told the proxy its slot map.
    #[error("no cluster node has answered CLUSTER SLOTS yet")]
    NoSlotMap,
}

/// Opens authenticated links to one upstream Redis.
#[derive(Clone)]
pub struct Connector {
    address: String,
    username: Option<String>,
    password: Option<String>,
    connect_timeout: Duration,
    /// `None` means plain TCP.
    tls: Option<Arc<UpstreamTls>>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("address", &self.address)
            .field("authenticated", &self.password.is_some())
            .field("tls", &self.tls)
            .finish()
    }
}

impl Connector {
    pub fn new(settings: &UpstreamSettings) -> Connector {
        Connector {
            address: settings.address.clone(),
            username: settings.username.clone(),
            password: settings.password.clone(),
            connect_timeout: Duration::from_millis(settings.connect_timeout_ms),
            tls: None,
        }
    }

    /// The `host:port` links are opened to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The same credentials and TLS towards another node (cluster mode).
    pub fn to(&self, address: &str) -> Connector {
        Connector {
            address: address.to_owned(),
            ..self.clone()
        }
    }

    /// Makes every link a TLS connection, verified and (with a client
    /// certificate) authenticated as `tls` says.
    pub fn with_tls(mut self, tls: Arc<UpstreamTls>) -> Connector {
        self.tls = Some(tls);
        self
    }

    /// The upstream TLS settings, so `SIGHUP` can reload their files.
    pub fn tls(&self) -> Option<&Arc<UpstreamTls>> {
        self.tls.as_ref()
    }

    /// Connects and, when credentials are configured, authenticates. The
    /// whole exchange is bounded by the connect timeout.
    pub async fn connect(&self) -> Result<BoxStream, UpstreamError> {
        let attempt = async {
            let tcp = TcpStream::connect(&self.address)
                .await
                .map_err(UpstreamError::Connect)?;
            tcp.set_nodelay(true)?;
            let mut stream: BoxStream = match &self.tls {
                Some(tls) => Box::new(tls.connect(tcp).await.map_err(|e| {
                    warn!(error = %e, "upstream tls handshake failed");
                    UpstreamError::Tls
                })?),
                None => Box::new(tcp),
            };
            if let Some(mut auth) = self.auth_request() {
                stream.write_all(&auth).await?;
                auth.clear();
                expect_ok(&mut stream).await?;
            }
            Ok(stream)
        };
        tokio::time::timeout(self.connect_timeout, attempt)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout)?
    }

    /// The `AUTH` request that logs the proxy in upstream, if it has
    /// credentials. Also used to log in again after a client's `RESET`.
    pub fn auth_request(&self) -> Option<BytesMut> {
        let password = self.password.as_deref()?;
        let mut out = BytesMut::new();
        match self.username.as_deref() {
            Some(user) => frame::put_request(
                &mut out,
                [&b"AUTH"[..], user.as_bytes(), password.as_bytes()].into_iter(),
            ),
            None => frame::put_request(&mut out, [&b"AUTH"[..], password.as_bytes()].into_iter()),
        }
        Some(out)
    }
}

/// Reads one reply and requires it to be `+OK`.
async fn expect_ok(stream: &mut BoxStream) -> Result<(), UpstreamError> {
    let mut buf = BytesMut::with_capacity(256);
    let mut scanner = Scanner::for_replies();
    let limits = Limits::reply(64 * 1024);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(UpstreamError::Closed);
        }
        if let Some(len) = scanner.measure(&buf, &limits)? {
            return if &buf[..len] == b"+OK\r\n" {
                Ok(())
            } else {
                Err(UpstreamError::AuthRefused)
            };
        }
    }
}
