//! TLS on both sides of the proxy: the listener's server configuration, the
//! client configuration towards Redis, and the handshakes that use them.
//!
//! Both configurations are built from PEM files named in the settings, with
//! the `ring` provider, TLS 1.2 and 1.3 only. Each sits behind an atomically
//! swapped pointer, so `SIGHUP` can load new certificates for the next
//! handshakes while connections already open keep the ones they began with.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};
use x509_parser::extensions::GeneralName;

use crate::config;

/// How long a client may take to complete its TLS handshake before the
/// listener drops it. Long enough for a slow mobile link, short enough that
/// idle sockets that never speak can't hold connection slots for long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS 1.3 preferred, 1.2 for older clients; rustls implements nothing
/// older.
static VERSIONS: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Why TLS could not be set up or a handshake failed.
///
/// Messages are lowercase, name the file involved, and never include key
/// material: a key file that fails to parse is reported by its path alone.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A configured file could not be read (the operator's fault).
    #[error("cannot read {}: {reason}", .path.display())]
    Read { path: PathBuf, reason: String },

    /// A certificate file holds no PEM certificate, or a malformed one (the
    /// operator's fault).
    #[error("{}: no usable PEM certificate: {reason}", .path.display())]
    Certificate { path: PathBuf, reason: String },

    /// A key file holds no PEM private key rustls can load, for example an
    /// encrypted key (the operator's fault). The parser's detail is left
    /// out, since it could quote part of the key.
    #[error(
        "{}: no usable private key (expected an unencrypted PEM key: PKCS#8, PKCS#1 or SEC1)",
        .path.display()
    )]
    Key { path: PathBuf },

    /// The private key is not the one the certificate was issued for (the
    /// operator's fault).
    #[error(
        "the private key in {} does not match the certificate in {}",
        .key.display(),
        .cert.display()
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },

    /// A CA bundle holds no usable trust anchor (the operator's fault).
    #[error("{}: not a usable CA bundle: {reason}", .path.display())]
    CaBundle { path: PathBuf, reason: String },

    /// The name to verify the upstream certificate against is neither a DNS
    /// name nor an IP address (the operator's fault).
    #[error("{name:?} is not a valid tls server name")]
    ServerName { name: String },

    /// rustls refused the assembled configuration (the operator's fault,
    /// for example a CA bundle rustls can't build a verifier from).
    #[error("building the tls configuration failed: {0}")]
    Config(String),

    /// The client broke off the handshake, spoke something other than TLS,
    /// or presented a certificate that failed verification (the client's
    /// fault).
    #[error("tls handshake with the client failed: {0}")]
    ClientHandshake(io::Error),

    /// The client's first byte was not a TLS handshake record: it speaks
    /// plaintext to the TLS port (the client's fault). It has been told so
    /// in a plaintext error reply.
    #[error("the client spoke plaintext to the tls port")]
    ClientNotTls,

    /// The client did not finish its handshake in time (the client's fault).
    #[error("tls handshake with the client timed out after {} s", .0.as_secs())]
    ClientHandshakeTimeout(Duration),

    /// The upstream's certificate failed verification, or it broke off the
    /// handshake (the upstream's fault, or a wrong `ca`/`server_name`).
    #[error("tls handshake with the upstream failed: {0}")]
    UpstreamHandshake(io::Error),
}

/// Who the client proved to be with its certificate: the verified leaf's
/// subject common name and its DNS, email and URI subject alternative names,
/// in that order, each once. Empty when no client certificate was asked for.
///
/// The names are as the trusted CA issued them; nothing here checks them
/// against users or projects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    pub names: Vec<String>,
}

impl PeerIdentity {
    /// The names in a DER certificate. A certificate that does not parse
    /// yields no names; the handshake has already verified it, so that
    /// would take a certificate webpki accepts and x509-parser does not.
    pub fn from_certificate(der: &[u8]) -> PeerIdentity {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            return PeerIdentity::default();
        };
        let mut names: Vec<String> = cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .map(str::to_owned)
            .collect();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) =
                    name
                {
                    names.push((*s).to_owned());
                }
            }
        }

        let mut seen = std::collections::HashSet::new();
        names.retain(|n| seen.insert(n.clone()));
        PeerIdentity { names }
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names.join(","))
    }
}

/// The listener's TLS: certificate chain, key, and (when `client_ca` is set)
/// the CA that client certificates must chain to. Clients without a valid
/// certificate are refused during the handshake when one is required.
pub struct ServerTls {
    /// Read once per handshake to clone the pointer; the lock is never held
    /// across an await, so a reload waits at most for a pointer copy.
    current: RwLock<Arc<ServerConfig>>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the files named in `settings` and checks that the key matches
    /// the leaf certificate.
    pub fn new(settings: &config::ServerTls) -> Result<ServerTls, TlsError> {
        Ok(ServerTls {
            current: RwLock::new(server_config(settings)?),
        })
    }

    /// Loads the files again and, if they are usable, makes them the
    /// configuration of every later handshake. On error the running
    /// configuration stays in force; open connections are never touched.
    pub fn reload(&self, settings: &config::ServerTls) -> Result<(), TlsError> {
        let fresh = server_config(settings)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// The configuration the next handshake will use.
    pub fn config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Runs the server side of the handshake on an accepted socket, bounded
    /// by `timeout`, and returns the stream with the client's certificate
    /// names.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        timeout: Duration,
    ) -> Result<(server::TlsStream<TcpStream>, PeerIdentity), TlsError> {
        let acceptor = TlsAcceptor::from(self.config());
        let handshake = async {
            let mut tcp = tcp;
            refuse_plaintext(&mut tcp).await?;
            acceptor
                .accept(tcp)
                .await
                .map_err(TlsError::ClientHandshake)
        };
        let stream = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| TlsError::ClientHandshakeTimeout(timeout))??;

        let identity = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| PeerIdentity::from_certificate(leaf))
            .unwrap_or_default();
        Ok((stream, identity))
    }
}

/// Looks at the client's first byte without consuming it. A TLS client
/// opens with a handshake record (content type 22, RFC 8446 §5.1); anything
/// else is a plaintext client, which gets a Redis error reply it can show
/// its user instead of a TLS alert it can't read.
async fn refuse_plaintext(tcp: &mut TcpStream) -> Result<(), TlsError> {
    const HANDSHAKE_RECORD: u8 = 22;

    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(0) => Err(TlsError::ClientHandshake(
            io::ErrorKind::UnexpectedEof.into(),
        )),
        Ok(_) if first[0] == HANDSHAKE_RECORD => Ok(()),
        Ok(_) => {
            let _ = tcp
                .write_all(b"-ERR this port accepts TLS connections only\r\n")
                .await;
            let _ = tcp.shutdown().await;
            Err(TlsError::ClientNotTls)
        }
        Err(e) => Err(TlsError::ClientHandshake(e)),
    }
}

fn server_config(settings: &config::ServerTls) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let certified = certified_key(&settings.cert, &settings.key, &provider)?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Config(e.to_string()))?;

    let builder = match &settings.client_ca {
        Some(ca) => {
            let roots = Arc::new(ca_bundle(ca)?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| TlsError::CaBundle {
                    path: ca.clone(),
                    reason: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(builder.with_cert_resolver(Arc::new(
        SingleCertAndKey::from(certified),
    ))))
}

/// TLS towards Redis: the trusted roots (the `ca` bundle, else the Mozilla
/// roots compiled into the binary), an optional client certificate, and the
/// name the upstream certificate must carry.
pub struct UpstreamTls {
    current: RwLock<Arc<Upstream>>,
}

/// One loaded upstream configuration and the name it verifies.
struct Upstream {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name())
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// TLS for the upstream at `address` (`host:port`), or `None` when
    /// `[upstream.tls]` is absent or disabled. In cluster mode the first seed
    /// node's host is the default server name.
    pub fn from_settings(upstream: &config::UpstreamSettings) -> Result<Option<Self>, TlsError> {
        match upstream.tls.as_ref().filter(|t| t.enabled) {
            Some(tls) => UpstreamTls::new(tls, upstream_address(upstream)).map(Some),
            None => Ok(None),
        }
    }

    /// Loads the files named in `settings`. Without `server_name`, the host
    /// part of `address` is verified: a DNS name, or an IP address that the
    /// certificate must list as an IP subject alternative name.
    pub fn new(settings: &config::UpstreamTls, address: &str) -> Result<UpstreamTls, TlsError> {
        Ok(UpstreamTls {
            current: RwLock::new(upstream_config(settings, address)?),
        })
    }

    /// Like [`ServerTls::reload`]: later connections use the new files, a
    /// failure keeps the old ones, open links are untouched.
    pub fn reload(&self, settings: &config::UpstreamTls, address: &str) -> Result<(), TlsError> {
        let fresh = upstream_config(settings, address)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// [`UpstreamTls::reload`] from the whole upstream section; a section
    /// that no longer enables TLS is left for a restart and changes nothing.
    pub fn reload_from(&self, upstream: &config::UpstreamSettings) -> Result<(), TlsError> {
        match upstream.tls.as_ref().filter(|t| t.enabled) {
            Some(tls) => self.reload(tls, upstream_address(upstream)),
            None => Ok(()),
        }
    }

    /// The name the upstream certificate is verified against.
    pub fn server_name(&self) -> String {
        self.loaded().server_name.to_str().into_owned()
    }

    /// Runs the client side of the handshake on a connected socket. The
    /// caller bounds it in time (the upstream connect timeout covers it).
    pub async fn connect(&self, tcp: TcpStream) -> Result<client::TlsStream<TcpStream>, TlsError> {
        let loaded = self.loaded();
        TlsConnector::from(Arc::clone(&loaded.config))
            .connect(loaded.server_name.clone(), tcp)
            .await
            .map_err(TlsError::UpstreamHandshake)
    }

    fn loaded(&self) -> Arc<Upstream> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }
}

fn upstream_address(upstream: &config::UpstreamSettings) -> &str {
    match upstream.mode {
        config::UpstreamMode::Single => &upstream.address,
        config::UpstreamMode::Cluster => upstream.nodes.first().map_or("", String::as_str),
    }
}

fn upstream_config(
    settings: &config::UpstreamTls,
    address: &str,
) -> Result<Arc<Upstream>, TlsError> {
    let name = settings
        .server_name
        .clone()
        .unwrap_or_else(|| host_of(address));
    let server_name =
        ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName { name })?;

    let roots = match &settings.ca {
        Some(ca) => ca_bundle(ca)?,
        None => RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    };
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);

    let config = match (&settings.cert, &settings.key) {
        (Some(cert), Some(key)) => {
            let certified = certified_key(cert, key, &provider)?;
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)))
        }
        // Config validation refuses one without the other.
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(Upstream {
        config: Arc::new(config),
        server_name,
    }))
}

/// The host part of `host:port` or `[v6]:port`; a bare host as it is.
fn host_of(address: &str) -> String {
    if let Ok(socket) = address.parse::<SocketAddr>() {
        return socket.ip().to_string();
    }
    match address.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host.to_owned(),
        _ => address.to_owned(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its private key, checked to belong together.
fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = certificates(cert)?;

    let pem = read(key)?;
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::Key {
        path: key.to_path_buf(),
    })?;
    let signing_key = provider
        .key_provider
        .load_private_key(der)
        .map_err(|_| TlsError::Key {
            path: key.to_path_buf(),
        })?;

    // rustls's own loader lets a key whose public half it can't compute
    // pass; ring computes it for every key type it loads, so here "unknown"
    // is refused as firmly as a mismatch.
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        }),
        Err(e) => Err(TlsError::Certificate {
            path: cert.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// Every PEM certificate in `path`, leaf first; at least one.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Certificate {
            path: path.to_path_buf(),
            reason: "the file holds no CERTIFICATE block".to_owned(),
        });
    }
    Ok(chain)
}

/// The trust anchors in a CA bundle; every certificate in it must be usable.
fn ca_bundle(path: &Path) -> Result<RootCertStore, TlsError> {
    let bundle = certificates(path).map_err(|e| match e {
        TlsError::Certificate { path, reason } => TlsError::CaBundle { path, reason },
        other => other,
    })?;
    let mut roots = RootCertStore::empty();
    for cert in bundle {
        roots.add(cert).map_err(|e| TlsError::CaBundle {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::OnceLock;

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// Development certificates from `certs/gen-certs.sh`, made once for
    /// every test in this module.
    fn certs() -> &'static Path {
        static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
        DIR.get_or_init(|| {
            let dir = tempfile::tempdir().expect("temporary directory");
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/gen-certs.sh");
            let status = Command::new("bash")
                .arg(script)
                .arg(dir.path())
                .stdout(std::process::Stdio::null())
                .status()
                .expect("running certs/gen-certs.sh (needs openssl)");
            assert!(status.success(), "gen-certs.sh failed");
            dir
        })
        .path()
    }

    fn server_settings(client_ca: bool) -> config::ServerTls {
        config::ServerTls {
            cert: certs().join("server.crt"),
            key: certs().join("server.key"),
            client_ca: client_ca.then(|| certs().join("ca.crt")),
        }
    }

    fn upstream_settings(client_cert: bool) -> config::UpstreamTls {
        config::UpstreamTls {
            ca: Some(certs().join("ca.crt")),
            cert: client_cert.then(|| certs().join("client.crt")),
            key: client_cert.then(|| certs().join("client.key")),
            ..config::UpstreamTls::default()
        }
    }

    fn error_text<T>(result: Result<T, TlsError>) -> String {
        match result {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_matching_certificate_and_key_make_a_server_config() {
        ServerTls::new(&server_settings(false)).expect("the generated pair matches");
        ServerTls::new(&server_settings(true)).expect("the generated CA is usable");
    }

    #[test]
    fn a_key_that_does_not_match_its_certificate_is_refused() {
        let mut settings = server_settings(false);
        settings.key = certs().join("client.key");
        let e = error_text(ServerTls::new(&settings));
        assert!(e.contains("does not match"), "{e}");
        assert!(e.contains("client.key") && e.contains("server.crt"), "{e}");
    }

    #[test]
    fn a_missing_file_is_named_in_the_error() {
        let mut settings = server_settings(false);
        settings.cert = certs().join("absent.crt");
        let e = error_text(ServerTls::new(&settings));
        assert!(
            e.starts_with("cannot read ") && e.contains("absent.crt"),
            "{e}"
        );
    }

    #[test]
    fn a_key_file_without_a_key_is_refused_without_quoting_it() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, "-----BEGIN PRIVATE KEY-----\nnot!base64\n").expect("writing");
        let mut settings = server_settings(false);
        settings.key = bad;
        let e = error_text(ServerTls::new(&settings));
        assert!(
            e.contains("bad.key") && e.contains("no usable private key"),
            "{e}"
        );
        assert!(!e.contains("base64"), "{e}");
    }

    #[test]
    fn a_certificate_file_without_certificates_is_refused() {
        let mut settings = server_settings(false);
        settings.cert = certs().join("server.key");
        let e = error_text(ServerTls::new(&settings));
        assert!(e.contains("server.key: no usable PEM certificate"), "{e}");
        assert!(!e.contains("PRIVATE"), "{e}");
    }

    #[test]
    fn a_failed_reload_keeps_the_running_configuration() {
        let tls = ServerTls::new(&server_settings(false)).expect("server tls");
        let before = tls.config();
        let mut broken = server_settings(false);
        broken.key = certs().join("redis.key");
        assert!(tls.reload(&broken).is_err());
        assert!(Arc::ptr_eq(&before, &tls.config()));

        tls.reload(&server_settings(true)).expect("a good reload");
        assert!(!Arc::ptr_eq(&before, &tls.config()));
    }

    #[test]
    fn the_upstream_server_name_defaults_to_the_host_of_the_address() {
        let settings = upstream_settings(false);
        let name = |address| UpstreamTls::new(&settings, address).map(|t| t.server_name());
        assert_eq!(name("redis:6379").expect("dns name"), "redis");
        assert_eq!(name("127.0.0.1:6379").expect("ipv4"), "127.0.0.1");
        assert_eq!(name("[::1]:6379").expect("ipv6"), "::1");

        let named = config::UpstreamTls {
            server_name: Some("cache.internal".to_owned()),
            ..upstream_settings(false)
        };
        let tls = UpstreamTls::new(&named, "10.0.0.1:6379").expect("explicit name");
        assert_eq!(tls.server_name(), "cache.internal");
    }

    #[test]
    fn an_invalid_server_name_is_refused() {
        let named = config::UpstreamTls {
            server_name: Some("not a name".to_owned()),
            ..upstream_settings(false)
        };
        let e = error_text(UpstreamTls::new(&named, "redis:6379"));
        assert_eq!(e, "\"not a name\" is not a valid tls server name");
    }

    #[test]
    fn upstream_tls_without_a_ca_trusts_the_built_in_roots() {
        let settings = config::UpstreamTls::default();
        UpstreamTls::new(&settings, "redis.example.com:6380").expect("webpki roots");
    }

    #[test]
    fn peer_identity_lists_the_common_name_then_the_alternative_names() {
        let leaf = certificates(&certs().join("redis.crt")).expect("redis.crt");
        let identity = PeerIdentity::from_certificate(&leaf[0]);
        assert_eq!(identity.names, ["redis", "localhost"]);
        assert_eq!(identity.to_string(), "redis,localhost");
        assert!(PeerIdentity::from_certificate(b"garbage").is_empty());
    }

    /// A listener on a loopback port running `ServerTls::accept` once and
    /// reporting its outcome.
    async fn serve_once(
        tls: ServerTls,
        timeout: Duration,
    ) -> (
        SocketAddr,
        tokio::task::JoinHandle<Result<PeerIdentity, TlsError>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let (mut stream, identity) = tls.accept(tcp, timeout).await?;
            let mut ping = [0u8; 4];
            stream.read_exact(&mut ping).await.expect("read");
            stream.write_all(b"pong").await.expect("write");
            stream.flush().await.expect("flush");
            Ok(identity)
        });
        (addr, task)
    }

    #[tokio::test]
    async fn mutual_tls_handshake_reports_the_client_certificate_names() {
        let server = ServerTls::new(&server_settings(true)).expect("server tls");
        let (addr, task) = serve_once(server, Duration::from_secs(5)).await;

        let client = UpstreamTls::new(&upstream_settings(true), &addr.to_string()).expect("client");
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let mut stream = client.connect(tcp).await.expect("handshake");
        stream.write_all(b"ping").await.expect("write");
        let mut pong = [0u8; 4];
        stream.read_exact(&mut pong).await.expect("read");
        assert_eq!(&pong, b"pong");

        let identity = task.await.expect("server task").expect("accepted");
        assert_eq!(identity.names, ["alice"]);
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused_when_one_is_required() {
        let server = ServerTls::new(&server_settings(true)).expect("server tls");
        let (addr, task) = serve_once(server, Duration::from_secs(5)).await;

        let client =
            UpstreamTls::new(&upstream_settings(false), &addr.to_string()).expect("client");
        let tcp = TcpStream::connect(addr).await.expect("connect");
        // TLS 1.3 finishes the client's side before the server has judged
        // it, so the refusal may surface on the first read instead.
        if let Ok(mut stream) = client.connect(tcp).await {
            let _ = stream.write_all(b"ping").await;
            let mut pong = [0u8; 4];
            assert!(stream.read_exact(&mut pong).await.is_err());
        }

        let e = error_text(task.await.expect("server task"));
        assert!(
            e.contains("client failed") && e.contains("no certificates"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_plaintext_client_gets_an_error_reply_instead_of_a_handshake() {
        let server = ServerTls::new(&server_settings(false)).expect("server tls");
        let (addr, task) = serve_once(server, Duration::from_secs(5)).await;
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"PING\r\n").await.expect("write");
        let mut reply = Vec::new();
        tcp.read_to_end(&mut reply).await.expect("read");
        assert_eq!(reply, b"-ERR this port accepts TLS connections only\r\n");
        let e = error_text(task.await.expect("server task"));
        assert_eq!(e, "the client spoke plaintext to the tls port");
    }

    #[tokio::test]
    async fn a_silent_client_times_out_in_the_handshake() {
        let server = ServerTls::new(&server_settings(false)).expect("server tls");
        let (addr, task) = serve_once(server, Duration::from_millis(100)).await;
        let _tcp = TcpStream::connect(addr).await.expect("connect");
        let e = error_text(task.await.expect("server task"));
        assert!(e.contains("timed out"), "{e}");
    }

    #[tokio::test]
    async fn the_upstream_certificate_must_carry_the_server_name() {
        let server = ServerTls::new(&server_settings(false)).expect("server tls");
        let (addr, _task) = serve_once(server, Duration::from_secs(5)).await;
        let named = config::UpstreamTls {
            server_name: Some("redis".to_owned()),
            ..upstream_settings(false)
        };
        let client = UpstreamTls::new(&named, &addr.to_string()).expect("client");
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let e = error_text(client.connect(tcp).await);
        assert!(
            e.contains("upstream failed") && e.contains("not valid for name"),
            "{e}"
        );
    }
}
