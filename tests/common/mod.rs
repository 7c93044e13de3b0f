//! Test harness: a real `redis-server` on a free loopback port, the real
//! `redcloak` binary in front of it, and a small raw RESP client for checks
//! on exact bytes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use redcloak::frame::{Limits, Scanner};

/// A local Redis Cluster for cluster-mode tests.
pub mod cluster;

/// PBKDF2 iterations for test users: the hash string carries the count, so
/// tests stay fast without changing the proxy.
pub const TEST_ITERATIONS: u32 = 1000;

/// A free loopback port (bound and released; the caller binds it soon).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral loopback port")
}

/// A `redis-server` child process, killed on drop.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    args: Vec<String>,
    dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments.
    pub fn start_with(args: &[&str]) -> Redis {
        for _ in 0..20 {
            let mut redis = Redis {
                child: None,
                port: free_port(),
                args: args.iter().map(|a| a.to_string()).collect(),
                dir: tempfile::tempdir().expect("temporary directory"),
            };
            if redis.spawn() {
                return redis;
            }
            redis.kill();
        }
        panic!("could not start redis-server on a free port");
    }

    /// Starts the server process on `self.port`; false if it didn't come up.
    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server must be installed (CI installs it: apt-get install redis-server)",
            );
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            // Any answer (PONG, or NOAUTH with a password) means a server is
            // up on the port. Other tests pick free ports at the same time,
            // so it may be another test's: a redis-server that lost the port
            // exits at once, so ours must still be running a moment later.
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port))
                && s.write_all(b"PING\r\n").is_ok()
            {
                let mut first = [0u8; 1];
                if s.read_exact(&mut first).is_ok() {
                    std::thread::sleep(Duration::from_millis(200));
                    return matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)));
                }
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port after `kill`.
    pub fn restart(&mut self) {
        self.kill();
        assert!(self.spawn(), "redis-server did not restart");
    }

    /// A raw client straight to the upstream, bypassing the proxy.
    pub fn direct(&self) -> Raw {
        Raw::connect(self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One configured test user.
pub struct User {
    pub name: &'static str,
    pub password: &'static str,
    pub project: &'static str,
    pub access: &'static str,
}

pub const ALICE: User = User {
    name: "alice",
    password: "alice-pw",
    project: "billing",
    access: "readwrite",
};
pub const BOB: User = User {
    name: "bob",
    password: "bob-pw",
    project: "shipping",
    access: "readwrite",
};
pub const READER: User = User {
    name: "reader",
    password: "reader-pw",
    project: "billing",
    access: "read",
};
pub const DEFAULT: User = User {
    name: "default",
    password: "default-pw",
    project: "billing",
    access: "readwrite",
};
pub const ADMIN: User = User {
    name: "boss",
    password: "boss-pw",
    project: "billing",
    access: "admin",
};

/// The usual cast: two projects, a reader, an admin and a `default` user.
pub const USERS: &[User] = &[ALICE, BOB, READER, DEFAULT, ADMIN];

/// The `redcloak` binary running `serve`, killed on drop.
pub struct Proxy {
    child: Option<Child>,
    pub port: u16,
    pub config: PathBuf,
    pub stderr: mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

/// The TOML of a test configuration in front of `redis_port`, with
/// encryption off.
pub fn config_toml(redis_port: u16, users: &[User], extra: &str) -> String {
    config_toml_with(redis_port, users, extra, "enabled = false\n")
}

/// The TOML of a test configuration with `extra` in `[server]` and
/// `encryption` as the body of `[encryption]`.
pub fn config_toml_with(redis_port: u16, users: &[User], extra: &str, encryption: &str) -> String {
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{extra}\n\
         [upstream]\naddress = \"127.0.0.1:{redis_port}\"\nconnect_timeout_ms = 1000\n\
         [encryption]\n{encryption}\n\
         [audit]\nenabled = false\n"
    );
    toml.push_str(&users_toml(users));
    toml
}

impl Proxy {
    pub fn start(redis_port: u16) -> Proxy {
        Proxy::start_with(redis_port, USERS, "")
    }

    /// Starts the proxy with `extra` lines added to its `[server]` section.
    pub fn start_with(redis_port: u16, users: &[User], extra: &str) -> Proxy {
        Proxy::start_toml(&config_toml(redis_port, users, extra))
    }

    pub fn start_toml(toml: &str) -> Proxy {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = dir.path().join("redcloak.toml");
        std::fs::write(&config, toml).expect("writing the test config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_redcloak"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting redcloak");

        // The proxy listens on port 0 and logs the address it got.
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Killed on drop even if start-up fails below.
        let mut proxy = Proxy {
            child: Some(child),
            port: 0,
            config,
            stderr: rx,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        proxy.port = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = proxy
                .stderr
                .recv_timeout(left)
                .expect("redcloak did not report its address");
            if line.contains("listening")
                && let Some(port) = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr=127.0.0.1:"))
            {
                break port.trim().parse::<u16>().expect("port number in the log");
            }
        };
        proxy
    }

    pub fn raw(&self) -> Raw {
        Raw::connect(self.port)
    }

    /// A raw client already logged in as `user`.
    pub fn login(&self, user: &User) -> Raw {
        let mut raw = self.raw();
        assert_eq!(raw.cmd(&["AUTH", user.name, user.password]), b"+OK\r\n");
        raw
    }

    /// Runs `redis-cli` against the proxy, logged in as `user`, and returns
    /// its standard output, trimmed. Fails the test if redis-cli fails.
    pub fn redis_cli(&self, user: &User, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "--user",
                user.name,
                "--pass",
                user.password,
                "--no-auth-warning",
            ])
            .args(args)
            .output()
            .expect("redis-cli must be installed (apt-get install redis-tools)");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn url(&self, user: &User) -> String {
        format!(
            "redis://{}:{}@127.0.0.1:{}/",
            user.name, user.password, self.port
        )
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("proxy is running")
    }

    /// Sends a signal to the proxy process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success());
    }

    /// Waits for the proxy to exit and returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Every log line the proxy has written so far.
    pub fn logs(&self) -> Vec<String> {
        self.stderr.try_iter().collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A blocking RESP client that returns each reply as its exact bytes.
pub struct Raw {
    stream: TcpStream,
    buf: BytesMut,
    scanner: Scanner,
}

impl Raw {
    pub fn connect(port: u16) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("setting a read timeout");
        Raw {
            stream,
            buf: BytesMut::new(),
            scanner: Scanner::for_replies(),
        }
    }

    /// Encodes a request in multibulk form.
    pub fn encode(args: &[&str]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
        out
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("writing to the proxy");
    }

    pub fn send(&mut self, args: &[&str]) {
        let bytes = Raw::encode(args);
        self.send_bytes(&bytes);
    }

    /// Reads one reply frame; panics on timeout or close.
    pub fn reply(&mut self) -> Vec<u8> {
        self.try_reply()
            .expect("a reply before the connection closed")
    }

    /// Reads one reply frame, or `None` if the connection closed first.
    pub fn try_reply(&mut self) -> Option<Vec<u8>> {
        let limits = Limits::reply(1 << 30);
        loop {
            if let Some(len) = self
                .scanner
                .measure(&self.buf, &limits)
                .expect("a well-formed reply")
            {
                return Some(self.buf.split_to(len).to_vec());
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("reading a reply: {e}"),
            }
        }
    }

    /// Sends one command and returns its reply.
    pub fn cmd(&mut self, args: &[&str]) -> Vec<u8> {
        self.send(args);
        self.reply()
    }

    /// Closes the sending side only, as `nc -q` does after its input.
    pub fn shutdown_write(&mut self) {
        self.stream
            .shutdown(std::net::Shutdown::Write)
            .expect("half-closing the connection");
    }

    /// True once the peer has closed the connection (within the timeout).
    pub fn is_closed(&mut self) -> bool {
        self.try_reply().is_none()
    }
}

/// `$n\r\ndata\r\n` for a string.
pub fn bulk(s: &str) -> Vec<u8> {
    format!("${}\r\n{s}\r\n", s.len()).into_bytes()
}

/// The upstream prefix of a project, computed independently of the proxy.
pub fn upstream_prefix(project: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(project.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("project:{}:", &hex[..16])
}

/// Runs the built `redcloak` binary with arguments and standard input.
/// The `[[users]]` tables of `users`, their passwords hashed with few
/// iterations.
pub fn users_toml(users: &[User]) -> String {
    let mut toml = String::new();
    for user in users {
        let hash = redcloak::auth::PasswordHash::create(user.password.as_bytes(), TEST_ITERATIONS);
        toml.push_str(&format!(
            "[[users]]\nname = \"{}\"\npassword_hash = \"{hash}\"\nproject = \"{}\"\naccess = \"{}\"\n",
            user.name, user.project, user.access
        ));
    }
    toml
}

/// Runs `redcloak reencrypt --config config`, checks that it succeeded,
/// and returns what it printed.
pub fn reencrypt(config: &Path) -> String {
    let config = config.to_str().expect("a UTF-8 path");
    let out = run_cli(&["reencrypt", "--config", config], "");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

pub fn run_cli(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_redcloak"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting redcloak");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(stdin.as_bytes())
        .expect("writing stdin");
    child.wait_with_output().expect("waiting for redcloak")
}

pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("writing a test file");
    path
}

/// Development certificates from `certs/gen-certs.sh` in `dir`
/// (`--force` makes new ones over old ones).
pub fn gen_certs(dir: &Path, force: bool) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/gen-certs.sh");
    let mut command = Command::new("bash");
    command.arg(script);
    if force {
        command.arg("--force");
    }
    let status = command
        .arg(dir)
        .stdout(Stdio::null())
        .status()
        .expect("running certs/gen-certs.sh (needs openssl)");
    assert!(status.success(), "certs/gen-certs.sh failed");
}

/// `[server.tls]` with the proxy's certificate from `certs`, requiring
/// client certificates signed by its CA when `client_ca` is set.
pub fn server_tls_toml(certs: &Path, client_ca: bool) -> String {
    let mut toml = format!(
        "\n[server.tls]\ncert = {:?}\nkey = {:?}\n",
        certs.join("server.crt"),
        certs.join("server.key")
    );
    if client_ca {
        toml.push_str(&format!("client_ca = {:?}\n", certs.join("ca.crt")));
    }
    toml
}

/// The DER of the first certificate in a PEM file.
pub fn certificate_der(path: &Path) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_file(path)
        .expect("a PEM certificate")
        .to_vec()
}

/// Waits up to `within` for a proxy log line containing `needle` and
/// returns it; earlier lines are consumed.
pub fn wait_for_log(proxy: &Proxy, needle: &str, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match proxy.stderr.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return Some(line),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// A blocking TLS client that returns each reply as its exact bytes, like
/// [`Raw`] but over rustls.
pub struct TlsRaw {
    stream: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    buf: BytesMut,
    scanner: Scanner,
}

impl TlsRaw {
    /// Connects to 127.0.0.1:`port`, trusting `ca`, with a client
    /// certificate and key when given, and completes the handshake. With
    /// TLS 1.3 a refused client certificate may only show on the first read.
    pub fn connect(port: u16, ca: &Path, client: Option<(&Path, &Path)>) -> Result<TlsRaw, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).expect("reading the CA") {
            roots
                .add(cert.expect("a CA certificate"))
                .expect("a usable CA");
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots);
        let config = match client {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    CertificateDer::pem_file_iter(cert)
                        .expect("reading the client certificate")
                        .map(|c| c.expect("a client certificate"))
                        .collect(),
                    PrivateKeyDer::from_pem_file(key).expect("reading the client key"),
                )
                .expect("a usable client certificate"),
            None => builder.with_no_client_auth(),
        };
        let name = ServerName::try_from("127.0.0.1").expect("an IP server name");
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
            .map_err(|e| e.to_string())?;
        let mut sock = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("setting a read timeout");
        while conn.is_handshaking() {
            conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
        }
        Ok(TlsRaw {
            stream: rustls::StreamOwned::new(conn, sock),
            buf: BytesMut::new(),
            scanner: Scanner::for_replies(),
        })
    }

    /// The DER of the certificate the server presented.
    pub fn peer_certificate(&self) -> Vec<u8> {
        self.stream
            .conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .expect("the server presented a certificate")
            .to_vec()
    }

    pub fn send(&mut self, args: &[&str]) -> std::io::Result<()> {
        self.stream.write_all(&Raw::encode(args))?;
        self.stream.flush()
    }

    /// Reads one reply frame; `Err` when the connection failed or closed.
    pub fn try_reply(&mut self) -> Result<Vec<u8>, String> {
        let limits = Limits::reply(1 << 30);
        loop {
            if let Some(len) = self
                .scanner
                .measure(&self.buf, &limits)
                .map_err(|e| e.to_string())?
            {
                return Ok(self.buf.split_to(len).to_vec());
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("connection closed".to_owned()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Sends one command and returns its reply, or why there was none.
    pub fn try_cmd(&mut self, args: &[&str]) -> Result<Vec<u8>, String> {
        self.send(args).map_err(|e| e.to_string())?;
        self.try_reply()
    }

    /// Sends one command and returns its reply; panics without one.
    pub fn cmd(&mut self, args: &[&str]) -> Vec<u8> {
        self.try_cmd(args).expect("a reply over TLS")
    }
}

impl Redis {
    /// Starts a TLS-only server (no plaintext port) with `redis.crt` from
    /// `certs`, requiring client certificates signed by `ca.crt`, plus
    /// `args`.
    pub fn start_tls(certs: &Path, args: &[&str]) -> Redis {
        for _ in 0..20 {
            let port = free_port();
            let mut all: Vec<String> = vec![
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                port.to_string(),
                "--tls-auth-clients".into(),
                "yes".into(),
            ];
            for (flag, file) in [
                ("--tls-cert-file", "redis.crt"),
                ("--tls-key-file", "redis.key"),
                ("--tls-ca-cert-file", "ca.crt"),
            ] {
                all.push(flag.into());
                all.push(certs.join(file).display().to_string());
            }
            all.extend(args.iter().map(|a| a.to_string()));
            let child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(&all)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed");
            let mut redis = Redis {
                child: Some(child),
                port,
                args: all,
                dir: tempfile::tempdir().expect("temporary directory"),
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                let client = Some((&*certs.join("redis.crt"), &*certs.join("redis.key")));
                if let Ok(mut c) = TlsRaw::connect(port, &certs.join("ca.crt"), client)
                    && c.try_cmd(&["PING"]).is_ok()
                {
                    return redis;
                }
                if let Some(Ok(Some(_))) = redis.child.as_mut().map(|c| c.try_wait()) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            redis.kill();
        }
        panic!("could not start a TLS redis-server on a free port");
    }

    /// A TLS client straight to a [`Redis::start_tls`] server, with the
    /// Redis certificate as its client certificate.
    pub fn direct_tls(&self, certs: &Path) -> TlsRaw {
        let client = Some((&*certs.join("redis.crt"), &*certs.join("redis.key")));
        TlsRaw::connect(self.port, &certs.join("ca.crt"), client).expect("a TLS connection")
    }
}

/// A stand-in for Redis that accepts connections and answers every read
/// with the bytes last given to [`FakeUpstream::answer`], or with nothing
/// at all: for upstreams that hang or break the protocol.
pub struct FakeUpstream {
    pub port: u16,
    answer: std::sync::Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FakeUpstream {
    /// Starts one that never answers (until told otherwise).
    pub fn silent() -> FakeUpstream {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};

        let listener = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
        let port = listener.local_addr().expect("a bound address").port();
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let answer: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (answers, stopped) = (Arc::clone(&answer), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let Ok((mut socket, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let answers = Arc::clone(&answers);
                let stopped = Arc::clone(&stopped);
                std::thread::spawn(move || {
                    let _ = socket.set_nonblocking(false);
                    let _ = socket.set_read_timeout(Some(Duration::from_millis(100)));
                    let mut chunk = [0u8; 64 * 1024];
                    while !stopped.load(Ordering::Relaxed) {
                        match socket.read(&mut chunk) {
                            Ok(0) => return,
                            Ok(_) => {
                                let answer = answers.lock().map(|a| a.clone()).unwrap_or(None);
                                if let Some(bytes) = answer
                                    && socket.write_all(&bytes).is_err()
                                {
                                    return;
                                }
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => return,
                        }
                    }
                });
            }
        });
        FakeUpstream { port, answer, stop }
    }

    /// From now on, every read on every connection is answered with `bytes`.
    pub fn answer(&self, bytes: &[u8]) {
        *self.answer.lock().expect("the answer lock") = Some(bytes.to_vec());
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `toml` with `lines` added to its `[upstream]` section.
pub fn with_upstream(toml: &str, lines: &str) -> String {
    toml.replacen("[upstream]\n", &format!("[upstream]\n{lines}\n"), 1)
}

/// The resident memory of a process, in KiB, from `/proc`.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("a VmRSS line")
}

/// How many file descriptors a process has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("reading /proc")
        .count()
}

/// The `p`-th percentile (0 to 100) of some durations, in milliseconds.
pub fn percentile_ms(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort_unstable();
    if samples.is_empty() {
        return 0.0;
    }
    let at = ((samples.len() - 1) as f64 * p / 100.0).round() as usize;
    samples[at].as_secs_f64() * 1000.0
}

/// Whether the proxy's log so far shows a panic.
pub fn logs_show_a_panic(logs: &[String]) -> bool {
    logs.iter().any(|l| l.contains("panicked"))
}

impl Raw {
    /// A second handle on the same connection, for reading on one thread
    /// while another writes.
    pub fn try_clone(&self) -> Raw {
        Raw {
            stream: self.stream.try_clone().expect("cloning the socket"),
            buf: BytesMut::new(),
            scanner: Scanner::for_replies(),
        }
    }

    /// Writes bytes; false once the proxy has closed the connection.
    pub fn try_send_bytes(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }

    /// Sets how long a read may wait before it fails.
    pub fn set_read_timeout(&mut self, timeout: Duration) {
        self.stream
            .set_read_timeout(Some(timeout))
            .expect("setting a read timeout");
    }
}
