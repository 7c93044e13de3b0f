//! The audit log, lockout, detection and leakage policy through the real
//! proxy and Redis: each event type appears with its fields when its cause
//! happens, no password, value or key name ever reaches the audit log or
//! the tracing output, lockout counts per user and client IP and expires,
//! and `check-config` prints the four security levels.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use redcloak::keyring::Keyring;
use serde_json::Value;

use common::*;

const WRONGPASS: &[u8] = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";

/// A proxy writing its audit log into a temporary directory.
struct Audited {
    redis: Redis,
    proxy: Proxy,
    log: PathBuf,
    dir: tempfile::TempDir,
}

/// `sections` go after `[audit]` (e.g. `[detection]`, `[projects.x]`);
/// `audit` adds fields to `[audit]`.
fn audited(audit: &str, encryption: &str, sections: &str) -> Audited {
    let redis = Redis::start();
    let dir = tempfile::tempdir().expect("temporary directory");
    let log = dir.path().join("logs/audit.log");
    let proxy = Proxy::start_toml(&audited_toml(redis.port, &log, audit, encryption, sections));
    Audited {
        redis,
        proxy,
        log,
        dir,
    }
}

fn audited_toml(port: u16, log: &Path, audit: &str, encryption: &str, sections: &str) -> String {
    let section = format!("[audit]\nenabled = true\npath = {log:?}\n{audit}\n{sections}\n");
    config_toml_with(port, USERS, "", encryption).replace("[audit]\nenabled = false\n", &section)
}

fn sealed_with_env_key() -> String {
    let key = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
    format!("enabled = true\nkey = \"{key}\"\n")
}

/// Every line of the audit log, parsed.
fn events(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every audit line is JSON"))
        .collect()
}

/// Waits (the writer flushes every 100 ms) until the log has an event for
/// which `wanted` holds, and returns every event so far.
fn wait_for_event(log: &Path, wanted: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = events(log);
        if all.iter().any(&wanted) {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "no such event in the audit log:\n{all:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn find(all: &[Value], wanted: impl Fn(&Value) -> bool) -> &Value {
    all.iter()
        .find(|e| wanted(e))
        .unwrap_or_else(|| panic!("no such event in:\n{all:#?}"))
}

fn is(event: &str) -> impl Fn(&Value) -> bool + '_ {
    move |e| e["event"] == event
}

/// The fields every event caused by a client has.
fn assert_from(event: &Value, user: &User) {
    let ts = event["ts"].as_str().expect("ts is a string");
    assert!(ts.len() == 24 && ts.ends_with('Z'), "{event}");
    assert_eq!(event["user"], user.name, "{event}");
    assert_eq!(event["project"], user.project, "{event}");
    let peer = event["peer"].as_str().expect("peer is a string");
    assert!(peer.starts_with("127.0.0.1:"), "{event}");
}

#[test]
fn auth_lockout_and_alert_events_name_the_user_project_and_peer() {
    let a = audited(
        "failed_access_threshold = 2\nlockout_secs = 60",
        "enabled = false",
        "[detection]\nfailed_auth_per_minute = 2",
    );
    let mut c = a.proxy.raw();
    assert_eq!(c.cmd(&["AUTH", ALICE.name, ALICE.password]), b"+OK\r\n");
    for _ in 0..3 {
        assert_eq!(c.cmd(&["AUTH", BOB.name, "wrong"]), WRONGPASS);
    }
    assert_eq!(c.cmd(&["AUTH", BOB.name, BOB.password]), WRONGPASS);

    let all = wait_for_event(&a.log, |e| e["reason"] == "locked_out");
    let success = find(&all, |e| e["event"] == "auth" && e["success"] == true);
    assert_from(success, &ALICE);
    assert_eq!(success["method"], "password");

    let failure = find(&all, |e| e["reason"] == "wrong_credentials");
    assert_from(failure, &BOB);
    assert_eq!(failure["success"], false);

    let lockout = find(&all, is("lockout"));
    assert_from(lockout, &BOB);
    assert_eq!(lockout["failures"], 2);
    assert_eq!(lockout["lockout_secs"], 60);

    let alerts: Vec<&Value> = all.iter().filter(|e| e["event"] == "alert").collect();
    let suspicious: Vec<&&Value> = alerts
        .iter()
        .filter(|e| e["alert_type"] == "SUSPICIOUS_ACTIVITY")
        .collect();
    assert_eq!(suspicious.len(), 1, "one alert per lockout: {alerts:#?}");
    assert_from(suspicious[0], &BOB);
    let rate = find(&all, |e| e["alert_type"] == "HIGH_FAILED_AUTH_RATE");
    assert_eq!(rate["threshold"], 2);
    assert_eq!(rate["count"], 3);
}

#[test]
fn denied_access_and_integrity_failure_events_name_the_command() {
    let a = audited("", &sealed_with_env_key(), "");
    let mut anonymous = a.proxy.raw();
    assert_eq!(
        anonymous.cmd(&["GET", "k"]),
        b"-NOAUTH Authentication required.\r\n"
    );
    let mut reader = a.proxy.login(&READER);
    assert!(reader.cmd(&["SET", "k", "v"]).starts_with(b"-NOPERM"));
    let mut alice = a.proxy.login(&ALICE);
    assert!(alice.cmd(&["CONFIG", "GET", "x"]).starts_with(b"-ERR"));
    assert_eq!(alice.cmd(&["SET", "k", "v"]), b"+OK\r\n");
    assert_eq!(alice.cmd(&["GET", "k"]), bulk("v"));
    assert!(alice.cmd(&["INCR", "k"]).starts_with(b"-ERR"));
    assert_eq!(alice.cmd(&["PING"]), b"+PONG\r\n");

    // Flip one byte of the stored value: its tag no longer matches.
    let key = format!("{}k", upstream_prefix("billing"));
    let mut upstream = a.redis.direct();
    let len: usize = String::from_utf8(upstream.cmd(&["STRLEN", &key]))
        .unwrap()
        .trim()
        .trim_start_matches(':')
        .parse()
        .unwrap();
    let last = (len - 1).to_string();
    let byte = upstream.cmd(&["GETRANGE", &key, &last, &last]);
    let other = if byte == bulk("A") { "B" } else { "A" };
    assert_eq!(
        upstream.cmd(&["SETRANGE", &key, &last, other]),
        format!(":{len}\r\n").into_bytes()
    );
    assert!(
        alice
            .cmd(&["GET", "k"])
            .starts_with(b"-ERR redcloak could not open")
    );

    let all = wait_for_event(&a.log, is("integrity_failure"));
    let integrity = find(&all, is("integrity_failure"));
    assert_from(integrity, &ALICE);
    assert_eq!(integrity["command"], "get");
    assert_eq!(integrity["reason"], "integrity");

    let noauth = find(&all, |e| e["reason"] == "not_authenticated");
    assert_eq!(noauth["command"], "get");
    assert!(noauth.get("user").is_none() && noauth["peer"].is_string());
    let noperm = find(&all, |e| e["reason"] == "permission");
    assert_from(noperm, &READER);
    assert_eq!(noperm["command"], "set");
    let refused = find(&all, |e| e["reason"] == "refused");
    assert_from(refused, &ALICE);
    assert_eq!(refused["command"], "config|get");

    let access: Vec<(String, String)> = all
        .iter()
        .filter(|e| e["event"] == "access" && e["user"] == ALICE.name)
        .map(|e| {
            assert_from(e, &ALICE);
            assert!(e.get("keys").is_none());
            (
                e["command"].as_str().unwrap().to_owned(),
                e["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let pairs: Vec<(&str, &str)> = access.iter().map(|(c, o)| (&**c, &**o)).collect();
    assert_eq!(
        pairs,
        [
            ("set", "ok"),
            ("get", "ok"),
            ("incr", "error"),
            ("ping", "ok"),
            ("get", "error")
        ]
    );
}

#[test]
fn config_warnings_and_key_rotations_are_audited_and_sighup_reopens_the_log() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keyring.json");
    let first = Keyring::generate(&keyring).unwrap().current_id().to_owned();
    let log = dir.path().join("audit.log");
    let encryption = format!("enabled = true\nkeyring = {keyring:?}\n");
    let proxy = Proxy::start_toml(&audited_toml(redis.port, &log, "", &encryption, ""));

    let all = wait_for_event(&log, is("config_warning"));
    let warnings: Vec<&str> = all
        .iter()
        .filter(|e| e["event"] == "config_warning")
        .map(|e| e["warning"].as_str().unwrap())
        .collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("server.tls is not set")),
        "{warnings:?}"
    );
    assert!(all[0]["ts"].is_string() && all[0].get("user").is_none());

    std::fs::rename(&log, dir.path().join("audit.log.1")).unwrap();
    let second = Keyring::rotate(&keyring).unwrap().current_id().to_owned();
    proxy.signal("HUP");
    let fresh = wait_for_event(&log, is("key_rotated"));
    let rotated = find(&fresh, is("key_rotated"));
    assert_eq!(rotated["key_id"], second.as_str());
    assert_eq!(rotated["previous_key_id"], first.as_str());
    assert!(!rotated.to_string().contains("secret"));
}

#[test]
fn no_password_value_or_key_name_reaches_the_audit_log_or_the_tracing_output() {
    let a = audited(
        "failed_access_threshold = 2",
        &sealed_with_env_key(),
        "[projects.billing]\nleakage = \"log\"",
    );
    let value = "value-9f2c-token-payload";
    let json = r#"{"password":"json-7d1e-inner","n":1}"#;
    let key = "keyname-5b7a";

    let mut c = a.proxy.raw();
    // The password where the user name goes, as a careless client sends it.
    assert_eq!(c.cmd(&["AUTH", ALICE.password, ALICE.name]), WRONGPASS);
    assert_eq!(c.cmd(&["AUTH", ALICE.name, "wrong-guess-3c9d"]), WRONGPASS);
    assert_eq!(c.cmd(&["AUTH", "wrong-default-1e8f"]), WRONGPASS);
    assert!(
        c.cmd(&["HELLO", "3", "AUTH", ALICE.name, ALICE.password])
            .starts_with(b"%")
    );
    assert_eq!(c.cmd(&["SET", key, value]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", key]), bulk(value));
    assert_eq!(c.cmd(&["HSET", "h", "field", json]), b":1\r\n");
    assert_eq!(c.cmd(&["LPUSH", "l", value]), b":1\r\n");
    let mut bob = a.proxy.login(&BOB);
    assert_eq!(bob.cmd(&["SET", key, value]), b"+OK\r\n");

    let audit = wait_for_event(&a.log, |e| e["user"] == BOB.name && e["event"] == "access");
    let found_alert = audit.iter().any(|e| e["alert_type"] == "SENSITIVE_DATA");
    assert!(found_alert, "the leakage scan ran: {audit:#?}");
    let text = std::fs::read_to_string(&a.log).unwrap();
    let tracing = a.proxy.logs().join("\n");
    assert!(
        tracing.contains("authenticated"),
        "debug logs were captured"
    );

    let secrets = [
        ALICE.password,
        BOB.password,
        "wrong-default-1e8f",
        "wrong-guess-3c9d",
        value,
        "json-7d1e-inner",
        key,
    ];
    for secret in secrets {
        assert!(!text.contains(secret), "the audit log holds {secret:?}");
        assert!(
            !tracing.contains(secret),
            "the tracing output holds {secret:?}"
        );
    }
}

#[test]
fn key_names_are_logged_only_when_configured() {
    let a = audited("log_key_names = true", "enabled = false", "");
    let mut c = a.proxy.login(&ALICE);
    assert_eq!(c.cmd(&["MSET", "a", "1", "b", "2"]), b"+OK\r\n");
    let all = wait_for_event(&a.log, |e| e["command"] == "mset");
    let mset = find(&all, |e| e["command"] == "mset");
    assert_eq!(mset["keys"], serde_json::json!(["a", "b"]));
}

/// One request on a connection made from `source`, another loopback
/// address, returning the first line of the reply.
fn auth_from(source: &str, port: u16, user: &str, password: &str) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let target = format!("127.0.0.1:{port}").parse().unwrap();
        socket.connect(target).await.unwrap().into_std().unwrap()
    });
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut stream: TcpStream = stream;
    stream
        .write_all(&Raw::encode(&["AUTH", user, password]))
        .unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\r\n") {
        stream.read_exact(&mut byte).unwrap();
        reply.push(byte[0]);
    }
    String::from_utf8(reply).unwrap()
}

#[test]
fn lockout_counts_per_user_and_client_ip_and_expires() {
    let a = audited(
        "failed_access_threshold = 3\nlockout_secs = 2",
        "enabled = false",
        "",
    );
    let port = a.proxy.port;
    let mut c = a.proxy.raw();
    for _ in 0..3 {
        assert_eq!(c.cmd(&["AUTH", ALICE.name, "wrong"]), WRONGPASS);
    }
    // Locked out: even the right password gets the same reply.
    assert_eq!(c.cmd(&["AUTH", ALICE.name, ALICE.password]), WRONGPASS);
    assert_eq!(
        c.cmd(&["GET", "k"]),
        b"-NOAUTH Authentication required.\r\n"
    );

    // Another user from the same address, and the same user from another
    // address, are not locked out.
    assert_eq!(c.cmd(&["AUTH", BOB.name, BOB.password]), b"+OK\r\n");
    assert_eq!(
        auth_from("127.0.0.2", port, ALICE.name, ALICE.password),
        "+OK\r\n"
    );

    std::thread::sleep(Duration::from_millis(2200));
    assert_eq!(c.cmd(&["AUTH", ALICE.name, ALICE.password]), b"+OK\r\n");

    let all = wait_for_event(&a.log, |e| e["success"] == true && e["user"] == ALICE.name);
    assert_eq!(all.iter().filter(|e| e["event"] == "lockout").count(), 1);
    let peers: Vec<&str> = all
        .iter()
        .filter(|e| e["success"] == true && e["user"] == ALICE.name)
        .map(|e| e["peer"].as_str().unwrap())
        .collect();
    assert!(peers[0].starts_with("127.0.0.2:"), "{peers:?}");
}

#[test]
fn shared_lockout_holds_on_every_replica_and_uses_reserved_keys() {
    let a = audited(
        "failed_access_threshold = 2\nlockout_shared = true",
        "enabled = false",
        "",
    );
    let log = a.dir.path().join("replica.log");
    let replica = Proxy::start_toml(&audited_toml(
        a.redis.port,
        &log,
        "failed_access_threshold = 2\nlockout_shared = true",
        "enabled = false",
        "",
    ));

    let mut first = a.proxy.raw();
    let mut second = replica.raw();
    assert_eq!(first.cmd(&["AUTH", ALICE.name, "wrong"]), WRONGPASS);
    assert_eq!(second.cmd(&["AUTH", ALICE.name, "wrong"]), WRONGPASS);
    assert_eq!(first.cmd(&["AUTH", ALICE.name, ALICE.password]), WRONGPASS);
    assert_eq!(second.cmd(&["AUTH", ALICE.name, ALICE.password]), WRONGPASS);
    assert_eq!(second.cmd(&["AUTH", BOB.name, BOB.password]), b"+OK\r\n");

    let keys = a.redis.direct().cmd(&["KEYS", "*"]);
    let listed = String::from_utf8_lossy(&keys);
    assert!(listed.contains("redcloak:lockout:"), "{listed}");
    assert!(!listed.contains("alice"), "{listed}");
    // A project can never name the reserved keys: its keys are prefixed.
    let mut bob = second;
    assert_eq!(bob.cmd(&["KEYS", "*"]), b"*0\r\n");

    let on_replica = wait_for_event(&log, is("lockout"));
    let on_first = events(&a.log);
    let lockouts = on_replica
        .iter()
        .chain(&on_first)
        .filter(|e| e["event"] == "lockout")
        .count();
    assert_eq!(lockouts, 1, "one lockout event across replicas");
}

#[test]
fn leakage_policies_reject_and_redact_written_values() {
    let a = audited(
        "",
        &sealed_with_env_key(),
        "[projects.billing]\nleakage = \"reject\"\n\
         [projects.shipping]\nleakage = \"redact\"\nleakage_patterns = [\"card\"]",
    );
    let mut alice = a.proxy.login(&ALICE);
    assert_eq!(
        alice.cmd(&["SET", "k", "my password is 1234"]),
        b"-ERR redcloak refused to store a value that looks sensitive (patterns: password)\r\n"
    );
    assert_eq!(alice.cmd(&["GET", "k"]), b"$-1\r\n");
    assert_eq!(alice.cmd(&["SET", "k", "harmless"]), b"+OK\r\n");

    let mut bob = a.proxy.login(&BOB);
    let order = r#"{"item":"lamp","Card_Number":"4111 1111","qty":2}"#;
    assert_eq!(bob.cmd(&["SET", "order", order]), b"+OK\r\n");
    assert_eq!(
        bob.cmd(&["GET", "order"]),
        bulk(r#"{"item":"lamp","Card_Number":"[REDACTED]","qty":2}"#)
    );

    let all = wait_for_event(&a.log, |e| e["action"] == "redacted");
    let rejected = find(&all, |e| e["action"] == "rejected");
    assert_from(rejected, &ALICE);
    assert_eq!(rejected["alert_type"], "SENSITIVE_DATA");
    assert_eq!(rejected["severity"], "medium");
    assert_eq!(rejected["patterns"], serde_json::json!(["password"]));
    let redacted = find(&all, |e| e["action"] == "redacted");
    assert_from(redacted, &BOB);
    assert!(
        !std::fs::read_to_string(&a.log)
            .unwrap()
            .contains("4111 1111")
    );
}

#[test]
fn shutdown_flushes_the_audit_log() {
    let mut a = audited("", "enabled = false", "");
    let mut c = a.proxy.login(&ALICE);
    assert_eq!(c.cmd(&["SET", "last", "1"]), b"+OK\r\n");
    a.proxy.signal("TERM");
    drop(c);
    assert_eq!(a.proxy.wait_exit(Duration::from_secs(15)), Some(0));
    let all = events(&a.log);
    assert!(all.iter().any(|e| e["command"] == "set"), "{all:#?}");
}

#[test]
fn the_audit_log_can_go_to_standard_output() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(
        dir.path(),
        "redcloak.toml",
        &audited_toml(redis.port, Path::new("-"), "", "enabled = false", ""),
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_redcloak"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting redcloak");
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let listening = lines.any(|l| l.is_ok_and(|l| l.contains("listening")));
    assert!(listening, "the proxy did not start");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child;
    let out = output.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let first: Value = serde_json::from_str(stdout.lines().next().expect("a line on stdout"))
        .expect("JSON on standard output");
    assert_eq!(first["event"], "config_warning");
}

#[test]
fn check_config_prints_the_four_security_levels() {
    let dir = tempfile::tempdir().unwrap();
    gen_certs(dir.path(), false);
    let key = base64::engine::general_purpose::STANDARD.encode([3u8; 32]);
    let sealed = format!("[encryption]\nkey = \"{key}\"\n");
    let tls = server_tls_toml(dir.path(), false);
    let configs = [
        ("high", format!("{sealed}{tls}")),
        ("medium", sealed.clone()),
        ("low", "[encryption]\nenabled = false\n".to_owned()),
        (
            "minimal",
            "[server]\nproject_isolation = false\n[encryption]\nenabled = false\n".to_owned(),
        ),
    ];
    for (level, body) in configs {
        let path = write_file(dir.path(), &format!("{level}.toml"), &body);
        let out = run_cli(&["check-config", "--config", path.to_str().unwrap()], "");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{level}: {stdout}");
        assert!(
            stdout.contains(&format!("security level: {level}\n")),
            "{level}: {stdout}"
        );
        let warned = stdout
            .lines()
            .filter(|l| l.starts_with("warning: "))
            .count();
        match level {
            "high" => assert!(!stdout.contains("warning: server.tls"), "{stdout}"),
            _ => assert!(warned >= 2, "{level}: {stdout}"),
        }
    }
}
