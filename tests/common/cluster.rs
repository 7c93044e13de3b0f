//! Test harness for cluster mode: a real local Redis Cluster of
//! `redis-server` processes, built with `redis-cli --cluster create`, with
//! helpers to find slot owners, kill nodes and wait for failover, and move
//! slots in the explicit steps that make Redis answer ASK, then MOVED.
//!
//! Every helper here asks Redis itself (CLUSTER NODES, CLUSTER INFO, INFO
//! replication) rather than trusting what the harness last did: gossip
//! converges asynchronously, and a test that acts on a half-formed cluster
//! fails at random.
//!
//! `TestCluster::start_with` secures the nodes: a password (and optionally
//! an ACL user) on every node, and TLS only (client port, cluster bus and
//! replication). The harness's own connections then log in and speak TLS
//! too, and `proxy_toml` gives the proxy the same credentials.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use redcloak::frame::Scanner;

use super::{Raw, TlsRaw, User, gen_certs, users_toml};

/// Redis Cluster's slot count.
pub const SLOTS: u16 = 16384;

/// How far the cluster bus port is from the client port (Redis's default).
const BUS_OFFSET: u16 = 10000;

/// How long start-up, migration and restart wait for the cluster to agree.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the waits ask the nodes again.
const POLL: Duration = Duration::from_millis(50);

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), the checksum
/// Redis Cluster hashes keys with.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The part of a key Redis hashes: between the first `{` and the first `}`
/// after it, if that is not empty; otherwise the whole key.
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        let rest = &key[open + 1..];
        if let Some(len) = rest.iter().position(|&b| b == b'}')
            && len > 0
        {
            return &rest[..len];
        }
    }
    key
}

/// A candidate port for a cluster node. Candidates come from
/// 20000..=22767 so that the bus port (port + 10000) falls in
/// 30000..=32767: both stay under Linux's default ephemeral range (32768
/// and up), which `free_port` and every outgoing connection draw from, so
/// the usual collisions are with other cluster nodes only. Each process
/// starts at a different point and walks the range, so nodes of one test
/// binary never pick the same candidate twice; the bind checks and the
/// retry in `Node::launch` handle other processes.
fn candidate_port() -> u16 {
    const FIRST: u32 = 20000;
    const SPAN: u32 = 2768;
    static START: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        (std::process::id().wrapping_mul(7919) ^ nanos) % SPAN
    });
    loop {
        let port = (FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        if bindable(port) && bindable(port + BUS_OFFSET) {
            return port;
        }
    }
}

/// Whether a loopback port can be bound right now (bound and released).
fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// How `TestCluster::start_with` secures the nodes. The default is none:
/// plain TCP, no password, as `TestCluster::start` builds.
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// Every node requires this password (`--requirepass`, and
    /// `--masterauth` for its replicas); the harness logs in with it.
    pub password: Option<String>,
    /// With `password`: the nodes get this ACL user (all keys, channels and
    /// commands) with that password instead, and the `default` user is
    /// off, so only `AUTH username password` logs in.
    pub username: Option<String>,
    /// Nodes speak TLS only (`--port 0 --tls-port`), on the cluster bus and
    /// for replication too, with certificates from `certs/gen-certs.sh`
    /// (`redis.crt`, valid for 127.0.0.1, `localhost` and `redis`), and
    /// require client certificates signed by its CA.
    pub tls: bool,
}

/// What every connection to a node needs: the login, and the
/// certificates of a TLS cluster. Shared by the cluster and its nodes.
struct Security {
    options: ClusterOptions,
    /// `gen_certs` output for a TLS cluster.
    certs: Option<tempfile::TempDir>,
}

impl Security {
    fn new(options: ClusterOptions) -> Security {
        assert!(
            options.username.is_none() || options.password.is_some(),
            "an ACL user needs a password"
        );
        let certs = options.tls.then(|| {
            let dir = tempfile::tempdir().expect("temporary directory");
            gen_certs(dir.path(), false);
            dir
        });
        Security { options, certs }
    }

    fn cert(&self, name: &str) -> Option<PathBuf> {
        self.certs.as_ref().map(|d| d.path().join(name))
    }

    /// `redis-server` arguments for the port and the security options.
    fn server_args(&self, port: u16) -> Vec<String> {
        let mut args: Vec<String> = Vec::new();
        let port = port.to_string();
        if self.certs.is_some() {
            args.extend(["--port", "0", "--tls-port", &port].map(String::from));
            args.extend(["--tls-cluster", "yes", "--tls-replication", "yes"].map(String::from));
            for (flag, file) in [
                ("--tls-cert-file", "redis.crt"),
                ("--tls-key-file", "redis.key"),
                ("--tls-ca-cert-file", "ca.crt"),
            ] {
                args.push(flag.into());
                args.push(self.cert(file).expect("certs").display().to_string());
            }
        } else {
            args.extend(["--port", &port].map(String::from));
        }
        match (&self.options.username, &self.options.password) {
            (Some(user), Some(password)) => {
                args.extend(["--user".into(), user.clone(), "on".into()]);
                args.extend([
                    format!(">{password}"),
                    "~*".into(),
                    "&*".into(),
                    "+@all".into(),
                ]);
                args.extend(["--user", "default", "off"].map(String::from));
                args.extend(["--masteruser".into(), user.clone()]);
                args.extend(["--masterauth".into(), password.clone()]);
            }
            (None, Some(password)) => {
                args.extend(["--requirepass".into(), password.clone()]);
                args.extend(["--masterauth".into(), password.clone()]);
            }
            _ => {}
        }
        args
    }

    /// `redis-cli` arguments to reach and log in to the nodes.
    fn cli_args(&self) -> Vec<String> {
        let mut args: Vec<String> = Vec::new();
        if self.certs.is_some() {
            args.push("--tls".into());
            for (flag, file) in [
                ("--cacert", "ca.crt"),
                ("--cert", "redis.crt"),
                ("--key", "redis.key"),
            ] {
                args.push(flag.into());
                args.push(self.cert(file).expect("certs").display().to_string());
            }
        }
        if let Some(user) = &self.options.username {
            args.extend(["--user".into(), user.clone()]);
        }
        if let Some(password) = &self.options.password {
            args.extend([
                "--pass".into(),
                password.clone(),
                "--no-auth-warning".into(),
            ]);
        }
        args
    }

    /// A connection to a node, not logged in, or `None` if nothing
    /// listens there (a killed node) or, for TLS, the handshake failed.
    fn open(&self, port: u16) -> Option<NodeClient> {
        if self.certs.is_some() {
            let ca = self.cert("ca.crt")?;
            let (cert, key) = (self.cert("redis.crt")?, self.cert("redis.key")?);
            let tls = TlsRaw::connect(port, &ca, Some((&cert, &key))).ok()?;
            tls.stream
                .sock
                .set_read_timeout(Some(Duration::from_secs(5)))
                .ok()?;
            return Some(NodeClient::Tls(Box::new(tls)));
        }
        let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        Some(NodeClient::Plain(Raw {
            stream,
            buf: BytesMut::new(),
            scanner: Scanner::for_replies(),
        }))
    }

    /// The AUTH arguments of the options, if any.
    fn auth_args(&self) -> Option<Vec<&str>> {
        let password = self.options.password.as_deref()?;
        Some(match self.options.username.as_deref() {
            Some(user) => vec!["AUTH", user, password],
            None => vec!["AUTH", password],
        })
    }

    /// Logs `client` in when the nodes need a password. `Err(Some(reply))`
    /// when the node refused, `Err(None)` when it did not answer.
    fn login(&self, client: &mut NodeClient) -> Result<(), Option<Vec<u8>>> {
        let Some(args) = self.auth_args() else {
            return Ok(());
        };
        client.send(&args);
        match client.try_reply() {
            Some(reply) if reply == b"+OK\r\n" => Ok(()),
            Some(reply) => Err(Some(reply)),
            None => Err(None),
        }
    }

    /// A logged-in connection to a node, or `None` if it is unreachable.
    /// Polls must not panic on a node that is down.
    fn try_connect(&self, port: u16) -> Option<NodeClient> {
        let mut client = self.open(port)?;
        self.login(&mut client).ok()?;
        Some(client)
    }

    /// A logged-in connection to a node that must be up.
    fn connect(&self, port: u16) -> NodeClient {
        self.try_connect(port)
            .unwrap_or_else(|| panic!("cannot connect and log in to the node on {port}"))
    }
}

/// A connection straight to a cluster node: plain TCP or TLS, as the
/// cluster speaks, logged in when it has a password. Replies are exact
/// bytes, as with [`Raw`].
pub enum NodeClient {
    Plain(Raw),
    Tls(Box<TlsRaw>),
}

impl NodeClient {
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        match self {
            NodeClient::Plain(raw) => raw.send_bytes(bytes),
            NodeClient::Tls(tls) => {
                let sent = tls
                    .stream
                    .write_all(bytes)
                    .and_then(|()| tls.stream.flush());
                sent.expect("writing to the node over TLS");
            }
        }
    }

    pub fn send(&mut self, args: &[&str]) {
        self.send_bytes(&Raw::encode(args));
    }

    /// Reads one reply frame, or `None` if the connection closed (or, over
    /// TLS, failed) first.
    pub fn try_reply(&mut self) -> Option<Vec<u8>> {
        match self {
            NodeClient::Plain(raw) => raw.try_reply(),
            NodeClient::Tls(tls) => tls.try_reply().ok(),
        }
    }

    /// Reads one reply frame; panics without one.
    pub fn reply(&mut self) -> Vec<u8> {
        self.try_reply()
            .expect("a reply before the connection closed")
    }

    /// Sends one command and returns its reply.
    pub fn cmd(&mut self, args: &[&str]) -> Vec<u8> {
        self.send(args);
        self.reply()
    }
}

/// Encodes a request whose arguments may be binary (keys read back from
/// Redis need not be UTF-8).
fn encode_bytes(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads the header line of a RESP2 frame of type `marker` (`$n\r\n`,
/// `*n\r\n`) off the front of `reply`: `n` and what follows the line.
/// `Err` with the reply for anything else (errors such as `-LOADING`
/// included); `what` names the frame expected.
fn resp_header<'a>(reply: &'a [u8], marker: u8, what: &str) -> Result<(usize, &'a [u8]), String> {
    let bad = || format!("expected {what}, got {:?}", String::from_utf8_lossy(reply));
    let body = reply.strip_prefix(&[marker]).ok_or_else(bad)?;
    let eol = body.windows(2).position(|w| w == b"\r\n").ok_or_else(bad)?;
    let n = std::str::from_utf8(&body[..eol])
        .ok()
        .and_then(|n| n.parse().ok())
        .ok_or_else(bad)?;
    Ok((n, &body[eol + 2..]))
}

/// Splits a RESP2 bulk string (`$n\r\n...\r\n`) off the front of `reply`
/// and returns its body and the rest.
fn split_bulk(reply: &[u8]) -> Result<(&[u8], &[u8]), String> {
    let (len, body) = resp_header(reply, b'$', "a bulk string")?;
    if body.len() < len + 2 {
        return Err(format!(
            "a short bulk string: {:?}",
            String::from_utf8_lossy(reply)
        ));
    }
    Ok((&body[..len], &body[len + 2..]))
}

/// The body of a bulk string reply, as text.
fn bulk_text(reply: &[u8]) -> Result<String, String> {
    split_bulk(reply).map(|(body, _)| String::from_utf8_lossy(body).into_owned())
}

/// The elements of a RESP2 array of bulk strings.
fn bulk_array(reply: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let (n, mut rest) = resp_header(reply, b'*', "an array")?;
    let mut items = Vec::with_capacity(n);
    for _ in 0..n {
        let (item, tail) = split_bulk(rest)?;
        items.push(item.to_vec());
        rest = tail;
    }
    Ok(items)
}

/// The value of `name:` in INFO-style `field:value` lines.
fn info_field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// Panics unless `reply` is `+OK`.
fn expect_ok(reply: Vec<u8>, what: &str) {
    assert_eq!(
        reply,
        b"+OK\r\n",
        "{what}: {:?}",
        String::from_utf8_lossy(&reply)
    );
}

/// One line of CLUSTER NODES: one node as another node sees it.
#[derive(Clone, Debug)]
struct NodeLine {
    id: String,
    port: u16,
    flags: Vec<String>,
    /// The master's id, for a replica.
    master: Option<String>,
    /// Whether the bus link to it is up (`connected`).
    connected: bool,
    /// Slot ranges it serves, inclusive; `[slot->-id]` migration entries
    /// are left out.
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    fn is_master(&self) -> bool {
        self.has_flag("master")
    }

    /// Flagged as failing (`fail`) or suspected so (`fail?`).
    fn failing(&self) -> bool {
        self.has_flag("fail") || self.has_flag("fail?")
    }

    fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    }
}

/// `<id> <ip:port@cport[,hostname]> <flags> <master> <ping-sent>
/// <pong-recv> <config-epoch> <link-state> <slot>...` per line.
fn parse_nodes(text: &str) -> Result<Vec<NodeLine>, String> {
    let mut lines = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let bad = || format!("unexpected CLUSTER NODES line {line:?}");
        if f.len() < 8 {
            return Err(bad());
        }
        let addr = f[1].split(['@', ',']).next().ok_or_else(bad)?;
        let port = addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .ok_or_else(bad)?;
        let mut slots = Vec::new();
        for s in &f[8..] {
            if s.starts_with('[') {
                continue;
            }
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            slots.push((a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?));
        }
        lines.push(NodeLine {
            id: f[0].to_string(),
            port,
            flags: f[2].split(',').map(str::to_string).collect(),
            master: (f[3] != "-").then(|| f[3].to_string()),
            connected: f[7] == "connected",
            slots,
        });
    }
    Ok(lines)
}

/// What every live node must agree on: the slot ranges with their owners'
/// ids, and each live node's master id (`None` for a master).
type Agreement = (Vec<(u16, u16, String)>, BTreeMap<String, Option<String>>);

/// One `redis-server --cluster-enabled yes` process with its own directory
/// (and so its own `nodes.conf`), killed on drop.
struct Node {
    child: Option<Child>,
    port: u16,
    /// How to start it and reach it.
    security: Arc<Security>,
    /// The node id, from CLUSTER MYID once it is up; kept in `nodes.conf`,
    /// so a restart keeps it.
    id: String,
    dir: tempfile::TempDir,
    /// What it served when `TestCluster::kill` killed it, for
    /// `wait_for_failover`.
    killed: Option<Killed>,
}

/// A killed master's slots and replicas, recorded just before the kill.
struct Killed {
    slots: Vec<(u16, u16)>,
    replicas: Vec<String>,
}

impl Node {
    /// Starts a node on a free port pair, retrying elsewhere when another
    /// process wins the port.
    fn launch(security: &Arc<Security>) -> Node {
        for _ in 0..20 {
            let mut node = Node {
                child: None,
                port: candidate_port(),
                security: Arc::clone(security),
                id: String::new(),
                dir: tempfile::tempdir().expect("temporary directory"),
                killed: None,
            };
            node.spawn();
            if node.wait_up() {
                return node;
            }
            node.kill();
        }
        panic!("could not start a cluster redis-server on a free port pair");
    }

    fn spawn(&mut self) {
        let dir = self.dir.path();
        let child = Command::new("redis-server")
            .args(self.security.server_args(self.port))
            .args(["--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
            .arg("--cluster-config-file")
            .arg(dir.join("nodes.conf"))
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            // Redis 7 syncs new replicas diskless after a 5 s delay that
            // waits for more replicas to join; nothing else joins here.
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--logfile")
            .arg(self.log())
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server must be installed (CI installs it: apt-get install redis-server)",
            );
        self.child = Some(child);
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Waits for the node to answer on its port and learns its id; false
    /// if it exited or never answered. Other tests start servers on ports
    /// they found free at the same moment, so the answer must come from
    /// our process: INFO's `process_id` says whose it is (and a node of
    /// another cluster refuses our password). A node that lost its client
    /// or bus port exits at once.
    fn wait_up(&mut self) -> bool {
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            return false;
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(mut raw) = self.security.open(self.port) {
                match self.security.login(&mut raw) {
                    Ok(()) => {}
                    Err(Some(_)) => return false,
                    Err(None) => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                }
                raw.send(&["INFO", "server"]);
                if let Some(reply) = raw.try_reply()
                    && let Ok(info) = bulk_text(&reply)
                {
                    if info_field(&info, "process_id") != Some(pid.to_string().as_str()) {
                        return false;
                    }
                    let id = bulk_text(&raw.cmd(&["CLUSTER", "MYID"]));
                    self.id = id.expect("CLUSTER MYID answers the node id");
                    return true;
                }
            }
            if !self.alive() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A local Redis Cluster: `masters` masters with `replicas_per_master`
/// replicas each, every node its own `redis-server` process, all killed on
/// drop.
pub struct TestCluster {
    nodes: Vec<Node>,
    security: Arc<Security>,
}

impl TestCluster {
    /// Starts the nodes, creates the cluster and waits until every node
    /// agrees on it: `cluster_state:ok` everywhere, all 16384 slots
    /// assigned, the same slot owners and replica links in every node's
    /// CLUSTER NODES, and every replica's `master_link_status:up`.
    pub fn start(masters: usize, replicas_per_master: usize) -> TestCluster {
        TestCluster::start_with(masters, replicas_per_master, ClusterOptions::default())
    }

    /// `start` with the nodes secured as `options` say.
    pub fn start_with(
        masters: usize,
        replicas_per_master: usize,
        options: ClusterOptions,
    ) -> TestCluster {
        assert!(masters >= 1, "a cluster needs at least one master");
        let total = masters * (1 + replicas_per_master);
        let security = Arc::new(Security::new(options));
        let cluster = TestCluster {
            nodes: (0..total).map(|_| Node::launch(&security)).collect(),
            security,
        };
        if masters >= 3 {
            cluster.create_with_redis_cli(replicas_per_master);
        } else {
            cluster.create_by_hand(masters, replicas_per_master);
        }
        cluster.wait_settled(Some((masters, replicas_per_master)), SETTLE_TIMEOUT);
        cluster
    }

    /// `redis-cli --cluster create`: the first `masters` nodes become
    /// masters with the slots split evenly, the rest replicas. It waits
    /// for the nodes to meet; the slot and replica views settle later.
    fn create_with_redis_cli(&self, replicas: usize) {
        let out = Command::new("redis-cli")
            .args(self.security.cli_args())
            .args(["--cluster", "create"])
            .args(self.seeds())
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli must be installed (apt-get install redis-tools)");
        assert!(
            out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("[ERR]"),
            "redis-cli --cluster create failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// What `redis-cli --cluster create` does, for the one or two masters
    /// it refuses to build: distinct config epochs, slots split evenly,
    /// MEET, then REPLICATE once every node knows every other.
    fn create_by_hand(&self, masters: usize, replicas: usize) {
        for (i, node) in self.nodes.iter().enumerate() {
            let epoch = (i + 1).to_string();
            let reply = self
                .client(node.port)
                .cmd(&["CLUSTER", "SET-CONFIG-EPOCH", &epoch]);
            expect_ok(reply, "CLUSTER SET-CONFIG-EPOCH");
        }
        for i in 0..masters {
            let first = usize::from(SLOTS) * i / masters;
            let last = usize::from(SLOTS) * (i + 1) / masters - 1;
            let (first, last) = (first.to_string(), last.to_string());
            let reply =
                self.client(self.nodes[i].port)
                    .cmd(&["CLUSTER", "ADDSLOTSRANGE", &first, &last]);
            expect_ok(reply, "CLUSTER ADDSLOTSRANGE");
        }
        let mut first = self.client(self.nodes[0].port);
        for node in &self.nodes[1..] {
            let reply = first.cmd(&["CLUSTER", "MEET", "127.0.0.1", &node.port.to_string()]);
            expect_ok(reply, "CLUSTER MEET");
        }
        // A replica must know its master before CLUSTER REPLICATE.
        let total = self.nodes.len().to_string();
        self.wait_until("every node to know every other", SETTLE_TIMEOUT, || {
            for node in &self.nodes {
                let mut raw = self
                    .security
                    .try_connect(node.port)
                    .ok_or("a node is unreachable")?;
                let info = bulk_text(&raw.cmd(&["CLUSTER", "INFO"]))?;
                if info_field(&info, "cluster_known_nodes") != Some(total.as_str()) {
                    return Err(format!("{}: {info}", node.port));
                }
            }
            Ok(())
        });
        for (i, node) in self.nodes[masters..].iter().enumerate() {
            let master = &self.nodes[i / replicas].id;
            let reply = self
                .client(node.port)
                .cmd(&["CLUSTER", "REPLICATE", master]);
            expect_ok(reply, "CLUSTER REPLICATE");
        }
    }

    /// Polls `check` every 50 ms until it passes; panics after `within`
    /// with its last complaint.
    fn wait_until<T>(
        &self,
        what: &str,
        within: Duration,
        mut check: impl FnMut() -> Result<T, String>,
    ) -> T {
        let started = Instant::now();
        loop {
            match check() {
                Ok(value) => return value,
                Err(why) if started.elapsed() >= within => {
                    panic!(
                        "waited {:?} for {what}; last: {why}\n{}",
                        started.elapsed(),
                        self.describe()
                    )
                }
                Err(_) => std::thread::sleep(POLL),
            }
        }
    }

    /// Every live node's CLUSTER NODES, for failure messages.
    fn describe(&self) -> String {
        let mut out = String::new();
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let view = self
                .security
                .try_connect(node.port)
                .map(|mut raw| bulk_text(&raw.cmd(&["CLUSTER", "NODES"])))
                .unwrap_or_else(|| Err("unreachable".into()));
            out.push_str(&format!(
                "--- {} ({}) sees:\n{}\n",
                node.port,
                node.log().display(),
                view.unwrap_or_else(|e| e)
            ));
        }
        out
    }

    /// Waits until the live nodes agree on a healthy cluster (see
    /// `check_settled`), and, with `shape`, that it has that many masters
    /// with that many replicas each.
    fn wait_settled(&self, shape: Option<(usize, usize)>, within: Duration) {
        self.wait_until("the cluster to settle", within, || {
            self.check_settled(shape)
        });
    }

    /// Ok once, on every live node: `cluster_state:ok` with all slots
    /// served; every live node known, linked and not suspected; every slot
    /// owned by a live master, and the same owner and the same
    /// master/replica roles in every node's view; and every live replica's
    /// link to its master up.
    fn check_settled(&self, shape: Option<(usize, usize)>) -> Result<(), String> {
        let live: Vec<&Node> = self.nodes.iter().filter(|n| n.child.is_some()).collect();
        let live_ids: Vec<&str> = live.iter().map(|n| n.id.as_str()).collect();
        let mut agreed: Option<Agreement> = None;
        for node in &live {
            let port = node.port;
            let mut raw = self
                .security
                .try_connect(port)
                .ok_or(format!("{port} is unreachable"))?;
            let info = bulk_text(&raw.cmd(&["CLUSTER", "INFO"]))?;
            if info_field(&info, "cluster_state") != Some("ok")
                || info_field(&info, "cluster_slots_ok") != Some("16384")
            {
                return Err(format!("{port} CLUSTER INFO:\n{info}"));
            }
            let view = parse_nodes(&bulk_text(&raw.cmd(&["CLUSTER", "NODES"]))?)?;
            for id in &live_ids {
                let line = view
                    .iter()
                    .find(|l| l.id == *id)
                    .ok_or(format!("{port} does not know {id}"))?;
                if !line.connected
                    || line.failing()
                    || line.has_flag("handshake")
                    || line.has_flag("noaddr")
                {
                    return Err(format!("{port} sees {line:?}"));
                }
            }
            // Slot ranges with their owners, and each live node's master
            // (None for a master).
            let mut owners: Vec<(u16, u16, String)> = Vec::new();
            let mut roles = BTreeMap::new();
            for line in &view {
                for &(a, b) in &line.slots {
                    if !line.is_master() || !live_ids.contains(&line.id.as_str()) {
                        return Err(format!("{port} sees slots {a}-{b} at {line:?}"));
                    }
                    owners.push((a, b, line.id.clone()));
                }
                if live_ids.contains(&line.id.as_str()) {
                    roles.insert(line.id.clone(), line.master.clone());
                }
            }
            owners.sort();
            let covered: u32 = owners.iter().map(|(a, b, _)| u32::from(b - a) + 1).sum();
            if covered != u32::from(SLOTS) {
                return Err(format!("{port} sees {covered} slots assigned"));
            }
            if let Some(first) = &agreed {
                if *first != (owners, roles) {
                    return Err(format!("{port} disagrees with {}", live[0].port));
                }
            } else {
                agreed = Some((owners, roles));
            }
            let me = view
                .iter()
                .find(|l| l.has_flag("myself"))
                .ok_or(format!("{port} has no myself line"))?;
            if me.has_flag("slave") {
                let info = bulk_text(&raw.cmd(&["INFO", "replication"]))?;
                if info_field(&info, "master_link_status") != Some("up") {
                    return Err(format!("{port} INFO replication:\n{info}"));
                }
            }
        }
        if let (Some((masters, replicas)), Some((owners, roles))) = (shape, &agreed) {
            let mut owning: Vec<&String> = owners.iter().map(|(_, _, id)| id).collect();
            owning.sort();
            owning.dedup();
            if owning.len() != masters {
                return Err(format!("{} masters own slots", owning.len()));
            }
            for master in owning {
                let n = roles
                    .values()
                    .filter(|m| m.as_ref() == Some(master))
                    .count();
                if n != replicas {
                    return Err(format!("master {master} has {n} replicas"));
                }
            }
        }
        Ok(())
    }

    fn node(&self, port: u16) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    fn node_mut(&mut self, port: u16) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    /// CLUSTER NODES as a live node sees it.
    fn view(&self) -> Vec<NodeLine> {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            if let Some(mut raw) = self.security.try_connect(node.port)
                && let Ok(text) = bulk_text(&raw.cmd(&["CLUSTER", "NODES"]))
            {
                return parse_nodes(&text).expect("a well-formed CLUSTER NODES");
            }
        }
        panic!("no live cluster node answers");
    }

    /// Whether the harness has the node on `port` running.
    fn is_live(&self, port: u16) -> bool {
        self.nodes
            .iter()
            .any(|n| n.port == port && n.child.is_some())
    }

    /// `127.0.0.1:port` of every node, live or killed, in start order.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    /// The port of every node, live or killed.
    /// The ports of the current masters, sorted, per a live node's CLUSTER
    /// NODES: killed or failed masters are left out.
    pub fn masters(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .view()
            .iter()
            .filter(|l| l.is_master() && !l.has_flag("fail") && self.is_live(l.port))
            .map(|l| l.port)
            .collect();
        ports.sort_unstable();
        ports
    }

    /// The ports of the live replicas of the master on `master_port`,
    /// sorted, per a live node's CLUSTER NODES.
    pub fn replicas_of(&self, master_port: u16) -> Vec<u16> {
        let id = self.node_id(master_port);
        let mut ports: Vec<u16> = self
            .view()
            .iter()
            .filter(|l| l.master.as_deref() == Some(id) && self.is_live(l.port))
            .map(|l| l.port)
            .collect();
        ports.sort_unstable();
        ports
    }

    /// The node id (40 hex digits) of the node on `port`.
    pub fn node_id(&self, port: u16) -> &str {
        &self.node(port).id
    }

    /// The slot Redis Cluster hashes `key` to: CRC16 of its hash tag (or of
    /// the whole key) mod 16384.
    pub fn slot_of(key: &[u8]) -> u16 {
        crc16(hash_tag(key)) % SLOTS
    }

    /// A master other than `port`, to move a slot to.
    pub fn another_master(&self, port: u16) -> u16 {
        self.masters()
            .into_iter()
            .find(|&m| m != port)
            .expect("the cluster has another master")
    }

    /// The port of the master that owns `slot`, per a live node's CLUSTER
    /// NODES (a killed master still owns its slots until failover).
    pub fn owner_of_slot(&self, slot: u16) -> u16 {
        self.view()
            .iter()
            .find(|l| l.is_master() && l.owns(slot))
            .map(|l| l.port)
            .unwrap_or_else(|| panic!("no master owns slot {slot}"))
    }

    /// A raw client straight to the node on `port`, logged in when the
    /// cluster has a password. Plain TCP only: a TLS cluster's nodes need
    /// `client`.
    pub fn direct(&self, port: u16) -> Raw {
        assert!(
            self.security.certs.is_none(),
            "the nodes of a TLS cluster speak TLS only: use TestCluster::client"
        );
        let mut raw = Raw::connect(port);
        if let Some(args) = self.security.auth_args() {
            expect_ok(raw.cmd(&args), "AUTH");
        }
        raw
    }

    /// A client straight to the node on `port`, over TLS for a TLS
    /// cluster, logged in when the cluster has a password.
    pub fn client(&self, port: u16) -> NodeClient {
        self.security.connect(port)
    }

    /// The directory of a TLS cluster's certificates (`ca.crt`,
    /// `redis.crt`, `client.crt`, ... from `certs/gen-certs.sh`).
    pub fn certs(&self) -> &Path {
        self.security
            .certs
            .as_ref()
            .expect("a TLS cluster (ClusterOptions::tls)")
            .path()
    }

    /// SIGKILLs the node on `port`, first noting the slots and replicas it
    /// had as a master, for `wait_for_failover`.
    pub fn kill(&mut self, port: u16) {
        let id = self.node_id(port).to_string();
        let view = self.view();
        let killed = Killed {
            slots: view
                .iter()
                .find(|l| l.id == id && l.is_master())
                .map(|l| l.slots.clone())
                .unwrap_or_default(),
            replicas: view
                .iter()
                .filter(|l| l.master.as_deref() == Some(id.as_str()))
                .map(|l| l.id.clone())
                .collect(),
        };
        let node = self.node_mut(port);
        node.kill();
        node.killed = Some(killed);
    }

    /// Waits until one of the killed master's former replicas owns every
    /// slot it had, as all live nodes agree, and the cluster is settled
    /// again (`cluster_state:ok` everywhere); returns the new master's
    /// port. Needs a majority of masters alive to vote.
    pub fn wait_for_failover(&self, dead_master_port: u16, within: Duration) -> u16 {
        let dead = self.node(dead_master_port);
        let killed = dead
            .killed
            .as_ref()
            .expect("wait_for_failover needs a node stopped with kill");
        assert!(
            !killed.slots.is_empty(),
            "{dead_master_port} owned no slots when it was killed"
        );
        self.wait_until("the failover", within, || {
            self.check_settled(None)?;
            let view = self.view();
            let owners: Vec<&NodeLine> = killed
                .slots
                .iter()
                .flat_map(|&(a, b)| [a, b])
                .map(|slot| {
                    view.iter()
                        .find(|l| l.is_master() && l.owns(slot))
                        .ok_or(format!("no master owns slot {slot}"))
                })
                .collect::<Result<_, _>>()?;
            let new = owners[0];
            if owners.iter().any(|o| o.id != new.id) || !killed.replicas.contains(&new.id) {
                return Err(format!("the slots are at {owners:?}"));
            }
            Ok(new.port)
        })
    }

    /// Starts a killed node again on its port with its `nodes.conf`, so it
    /// rejoins (a replaced master comes back as a replica of its
    /// replacement), and waits for the cluster to settle.
    pub fn restart(&mut self, port: u16) {
        let node = self.node_mut(port);
        assert!(node.child.is_none(), "{port} is running");
        node.spawn();
        assert!(node.wait_up(), "the node on {port} did not restart");
        node.killed = None;
        self.wait_settled(None, SETTLE_TIMEOUT);
    }

    /// Step 1 of moving `slot`: the target imports it, the source
    /// migrates it. From here the source answers `-ASK` for keys of the
    /// slot it no longer has.
    pub fn begin_migration(&self, slot: u16, from_port: u16, to_port: u16) {
        let slot = slot.to_string();
        let reply = self.client(to_port).cmd(&[
            "CLUSTER",
            "SETSLOT",
            &slot,
            "IMPORTING",
            self.node_id(from_port),
        ]);
        expect_ok(reply, "CLUSTER SETSLOT IMPORTING");
        let reply = self.client(from_port).cmd(&[
            "CLUSTER",
            "SETSLOT",
            &slot,
            "MIGRATING",
            self.node_id(to_port),
        ]);
        expect_ok(reply, "CLUSTER SETSLOT MIGRATING");
    }

    /// Step 2: MIGRATEs the slot's keys from the source to the target in
    /// batches until the source has none left.
    pub fn migrate_keys(&self, slot: u16, from_port: u16, to_port: u16) {
        let mut source = self.client(from_port);
        let (slot, to) = (slot.to_string(), to_port.to_string());
        loop {
            let reply = source.cmd(&["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
            let keys = bulk_array(&reply).expect("CLUSTER GETKEYSINSLOT answers keys");
            if keys.is_empty() {
                return;
            }
            let mut args: Vec<&[u8]> = vec![b"MIGRATE", b"127.0.0.1", to.as_bytes()];
            args.extend([&b""[..], b"0", b"5000"]);
            // The target wants the same login (MIGRATE speaks TLS by
            // itself when the cluster bus does).
            if let Some(auth) = self.security.auth_args() {
                args.push(if auth.len() == 3 { b"AUTH2" } else { b"AUTH" });
                args.extend(auth[1..].iter().map(|a| a.as_bytes()));
            }
            args.push(b"KEYS");
            args.extend(keys.iter().map(Vec::as_slice));
            source.send_bytes(&encode_bytes(&args));
            expect_ok(source.reply(), "MIGRATE");
        }
    }

    /// Step 3: assigns `slot` to the target on every live master (the
    /// target first, which bumps its config epoch; replicas refuse SETSLOT
    /// and learn it by gossip) and waits until every live node sees it
    /// there. From here the source answers `-MOVED`.
    pub fn finish_migration(&self, slot: u16, to_port: u16) {
        let to_id = self.node_id(to_port).to_string();
        let slot_arg = slot.to_string();
        let set = |port: u16| {
            let reply = self
                .client(port)
                .cmd(&["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to_id]);
            expect_ok(reply, "CLUSTER SETSLOT NODE");
        };
        set(to_port);
        for port in self.masters() {
            if port != to_port {
                set(port);
            }
        }
        self.wait_until("every node to see the slot moved", SETTLE_TIMEOUT, || {
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                let mut raw = self
                    .security
                    .try_connect(node.port)
                    .ok_or("a node is unreachable")?;
                let view = parse_nodes(&bulk_text(&raw.cmd(&["CLUSTER", "NODES"]))?)?;
                if !view.iter().any(|l| l.id == to_id && l.owns(slot)) {
                    return Err(format!("{} does not see {slot} moved", node.port));
                }
            }
            Ok(())
        });
    }

    /// All three steps: moves `slot` and its keys from one master to
    /// another.
    pub fn migrate_slot(&self, slot: u16, from_port: u16, to_port: u16) {
        self.begin_migration(slot, from_port, to_port);
        self.migrate_keys(slot, from_port, to_port);
        self.finish_migration(slot, to_port);
    }

    /// The TOML of a proxy configuration in front of this cluster, like
    /// `config_toml_with`: `server_extra` in `[server]`, `encryption` as
    /// the body of `[encryption]`, and every node as a seed.
    pub fn proxy_toml(&self, users: &[User], server_extra: &str, encryption: &str) -> String {
        self.proxy_toml_with_seeds(&self.seeds(), users, server_extra, encryption)
    }

    /// `proxy_toml` with only `seeds` (`host:port` each) as seed nodes.
    /// For a secured cluster `[upstream]` has the cluster's `password`
    /// (and `username`), and a TLS cluster adds `[upstream.tls]` with its
    /// CA and the development client certificate (`client.crt`, which
    /// the nodes accept as signed by that CA).
    pub fn proxy_toml_with_seeds(
        &self,
        seeds: &[String],
        users: &[User],
        server_extra: &str,
        encryption: &str,
    ) -> String {
        let nodes: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
        let mut upstream = String::new();
        let options = &self.security.options;
        if let Some(user) = &options.username {
            upstream.push_str(&format!("username = {user:?}\n"));
        }
        if let Some(password) = &options.password {
            upstream.push_str(&format!("password = {password:?}\n"));
        }
        if self.security.certs.is_some() {
            let certs = self.certs();
            upstream.push_str(&format!(
                "[upstream.tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
                certs.join("ca.crt"),
                certs.join("client.crt"),
                certs.join("client.key"),
            ));
        }
        let mut toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n\
             [upstream]\nmode = \"cluster\"\nnodes = [{}]\nconnect_timeout_ms = 1000\n\
             {upstream}\
             [encryption]\n{encryption}\n\
             [audit]\nenabled = false\n",
            nodes.join(", ")
        );
        toml.push_str(&users_toml(users));
        toml
    }
}
