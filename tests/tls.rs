//! TLS end to end: real clients (`redis-cli --tls`, the `redis` crate, a
//! rustls client) against the proxy's TLS listener, mutual TLS, certificate
//! reload on `SIGHUP`, and the proxy reaching a TLS-only `redis-server` with
//! its own client certificate. Certificates come from `certs/gen-certs.sh`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// A fresh set of development certificates in a temporary directory.
fn fresh_certs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temporary directory");
    gen_certs(dir.path(), false);
    dir
}

/// A proxy in front of a plain `redis-server`, with a TLS listener.
fn tls_proxy(redis: &Redis, certs: &Path, client_ca: bool) -> Proxy {
    let mut toml = config_toml(redis.port, USERS, "");
    toml.push_str(&server_tls_toml(certs, client_ca));
    Proxy::start_toml(&toml)
}

fn client_pair(certs: &Path) -> (PathBuf, PathBuf) {
    (certs.join("client.crt"), certs.join("client.key"))
}

#[test]
fn redis_cli_sets_and_gets_through_the_tls_listener() {
    let certs = fresh_certs();
    let redis = Redis::start();
    let proxy = tls_proxy(&redis, certs.path(), false);

    let cli = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["--tls", "--cacert"])
            .arg(certs.path().join("ca.crt"))
            .args(["-h", "127.0.0.1", "-p", &proxy.port.to_string()])
            .args([
                "--user",
                ALICE.name,
                "--pass",
                ALICE.password,
                "--no-auth-warning",
            ])
            .args(args)
            .output()
            .expect("redis-cli must be installed");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(cli(&["PING"]), "PONG");
    assert_eq!(cli(&["SET", "greeting", "over tls"]), "OK");
    assert_eq!(cli(&["GET", "greeting"]), "over tls");

    // The key landed in alice's namespace upstream, like over plaintext.
    let key = format!("{}greeting", upstream_prefix(ALICE.project));
    assert_eq!(redis.direct().cmd(&["GET", &key]), bulk("over tls"));
}

#[tokio::test]
async fn the_redis_crate_connects_over_tls_with_the_development_ca() {
    let certs = fresh_certs();
    let redis = Redis::start();
    let proxy = tls_proxy(&redis, certs.path(), false);

    let url = format!(
        "rediss://{}:{}@127.0.0.1:{}/",
        ALICE.name, ALICE.password, proxy.port
    );
    let ca = std::fs::read(certs.path().join("ca.crt")).expect("reading the CA");
    let tls = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(ca),
    };
    let client = redis::Client::build_with_tls(url, tls).expect("a TLS client");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("a TLS connection through the proxy");
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut con)
        .await
        .expect("SET");
    let got: String = redis::cmd("GET")
        .arg("k")
        .query_async(&mut con)
        .await
        .expect("GET");
    assert_eq!(got, "v");
}

#[test]
fn mutual_tls_refuses_a_client_without_a_certificate_and_serves_one_with_it() {
    let certs = fresh_certs();
    let ca = certs.path().join("ca.crt");
    let redis = Redis::start();
    let proxy = tls_proxy(&redis, certs.path(), true);

    // TLS 1.3 lets the client finish first; the refusal then ends the
    // connection before any reply.
    let refused = TlsRaw::connect(proxy.port, &ca, None).and_then(|mut c| c.try_cmd(&["PING"]));
    assert!(refused.is_err(), "{refused:?}");
    let line = wait_for_log(&proxy, "tls handshake failed", Duration::from_secs(5))
        .expect("a log line for the refused handshake");
    assert!(line.contains("no certificates"), "{line}");

    let (cert, key) = client_pair(certs.path());
    let mut c = TlsRaw::connect(proxy.port, &ca, Some((&cert, &key))).expect("handshake");
    assert_eq!(c.cmd(&["AUTH", ALICE.name, ALICE.password]), b"+OK\r\n");
    assert_eq!(c.cmd(&["PING"]), b"+PONG\r\n");
}

#[test]
fn a_client_certificate_from_another_ca_is_refused_with_a_clear_log_line() {
    let certs = fresh_certs();
    let other = fresh_certs();
    let redis = Redis::start();
    let proxy = tls_proxy(&redis, certs.path(), true);

    let (cert, key) = client_pair(other.path());
    assert_certificate_refused(&proxy, certs.path(), &cert, &key, "UnknownIssuer");
}

/// Connects with `cert`/`key`, expects the connection to fail, and the
/// proxy's log line for it to contain `reason`.
fn assert_certificate_refused(proxy: &Proxy, certs: &Path, cert: &Path, key: &Path, reason: &str) {
    let ca = certs.join("ca.crt");
    let refused =
        TlsRaw::connect(proxy.port, &ca, Some((cert, key))).and_then(|mut c| c.try_cmd(&["PING"]));
    assert!(refused.is_err(), "{refused:?}");
    let line = wait_for_log(proxy, "tls handshake failed", Duration::from_secs(5))
        .expect("a log line for the refused handshake");
    assert!(line.contains(reason), "{line}");
}

/// A client certificate for `alice` signed by the CA in `certs` whose
/// validity ended in 2001. `openssl x509` can't set past dates, but
/// `openssl ca` takes explicit start and end dates.
fn expired_client_certificate(certs: &Path) -> (PathBuf, PathBuf) {
    let dir = certs.join("expired");
    std::fs::create_dir_all(dir.join("new")).expect("a directory for openssl ca");
    std::fs::write(dir.join("index.txt"), "").expect("the openssl ca database");
    let conf = write_file(
        &dir,
        "ca.cnf",
        "[ca]\ndefault_ca = dev\n\
         [dev]\ndatabase = index.txt\nnew_certs_dir = new\nserial = serial\n\
         default_md = sha256\npolicy = any\nunique_subject = no\n\
         [any]\ncommonName = supplied\n\
         [client]\nbasicConstraints = critical, CA:false\n\
         keyUsage = critical, digitalSignature, keyEncipherment\n\
         extendedKeyUsage = clientAuth\n",
    );
    std::fs::write(dir.join("serial"), "01\n").expect("the openssl ca serial");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("openssl must be installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["genpkey", "-algorithm", "RSA", "-out", "expired.key"]);
    run(&[
        "req",
        "-new",
        "-key",
        "expired.key",
        "-subj",
        "/CN=alice",
        "-out",
        "expired.csr",
    ]);
    let (ca_crt, ca_key) = (certs.join("ca.crt"), certs.join("ca.key"));
    run(&[
        "ca",
        "-batch",
        "-notext",
        "-config",
        &conf.display().to_string(),
        "-cert",
        &ca_crt.display().to_string(),
        "-keyfile",
        &ca_key.display().to_string(),
        "-startdate",
        "20000101000000Z",
        "-enddate",
        "20010101000000Z",
        "-extensions",
        "client",
        "-in",
        "expired.csr",
        "-out",
        "expired.crt",
    ]);
    (dir.join("expired.crt"), dir.join("expired.key"))
}

#[test]
fn an_expired_client_certificate_is_refused_with_a_clear_log_line() {
    let certs = fresh_certs();
    let redis = Redis::start();
    let proxy = tls_proxy(&redis, certs.path(), true);

    let (cert, key) = expired_client_certificate(certs.path());
    assert_certificate_refused(&proxy, certs.path(), &cert, &key, "expired");
}

#[test]
fn a_plaintext_client_on_the_tls_port_is_refused_while_tls_clients_are_served() {
    let certs = fresh_certs();
    let ca = certs.path().join("ca.crt");
    let redis = Redis::start();
    let proxy = tls_proxy(&redis, certs.path(), false);

    let mut tls = TlsRaw::connect(proxy.port, &ca, None).expect("handshake");
    assert_eq!(tls.cmd(&["AUTH", ALICE.name, ALICE.password]), b"+OK\r\n");

    let mut plain = TcpStream::connect(("127.0.0.1", proxy.port)).expect("connecting");
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("setting a read timeout");
    plain.write_all(b"PING\r\n").expect("writing");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert_eq!(
        String::from_utf8_lossy(&answer),
        "-ERR this port accepts TLS connections only\r\n"
    );
    let line = wait_for_log(&proxy, "tls handshake failed", Duration::from_secs(5))
        .expect("a log line for the plaintext client");
    assert!(line.contains("plaintext"), "{line}");

    assert_eq!(tls.cmd(&["SET", "k", "v"]), b"+OK\r\n");
    assert_eq!(tls.cmd(&["GET", "k"]), bulk("v"));
}

#[test]
fn sighup_reloads_the_server_certificate_without_dropping_connections() {
    let certs = fresh_certs();
    let redis = Redis::start();
    let proxy = tls_proxy(&redis, certs.path(), false);

    let mut old =
        TlsRaw::connect(proxy.port, &certs.path().join("ca.crt"), None).expect("handshake");
    assert_eq!(old.cmd(&["AUTH", ALICE.name, ALICE.password]), b"+OK\r\n");
    assert_eq!(old.cmd(&["SET", "k", "before"]), b"+OK\r\n");
    let first = old.peer_certificate();
    assert_eq!(first, certificate_der(&certs.path().join("server.crt")));

    // New CA, new server certificate, same paths.
    gen_certs(certs.path(), true);
    proxy.signal("HUP");
    wait_for_log(
        &proxy,
        "server certificates reloaded",
        Duration::from_secs(10),
    )
    .expect("the reload is logged");

    let new = TlsRaw::connect(proxy.port, &certs.path().join("ca.crt"), None).expect("handshake");
    let second = new.peer_certificate();
    assert_eq!(second, certificate_der(&certs.path().join("server.crt")));
    assert_ne!(first, second);

    assert_eq!(old.cmd(&["GET", "k"]), bulk("before"));
}

#[test]
fn a_broken_certificate_on_reload_keeps_the_running_one() {
    let certs = fresh_certs();
    let ca = certs.path().join("ca.crt");
    let redis = Redis::start();
    let proxy = tls_proxy(&redis, certs.path(), false);
    let running = certificate_der(&certs.path().join("server.crt"));

    // The client's key does not match the server's certificate.
    std::fs::copy(
        certs.path().join("client.key"),
        certs.path().join("server.key"),
    )
    .expect("replacing the key");
    proxy.signal("HUP");
    let line = wait_for_log(&proxy, "certificate reload failed", Duration::from_secs(10))
        .expect("the failed reload is logged");
    assert!(line.contains("does not match"), "{line}");

    let mut c = TlsRaw::connect(proxy.port, &ca, None).expect("handshake");
    assert_eq!(c.peer_certificate(), running);
    assert_eq!(c.cmd(&["AUTH", ALICE.name, ALICE.password]), b"+OK\r\n");
}

/// The configuration of a proxy (plaintext listener) in front of a
/// TLS-only `redis-server` whose password is `upstream-secret`, reaching it
/// with the client certificate from `certs`; `encryption` is the body of
/// `[encryption]`, `tls_extra` more lines of `[upstream.tls]`.
fn tls_redis_toml(redis: &Redis, certs: &Path, encryption: &str, tls_extra: &str) -> String {
    let mut toml = common::config_toml_with(redis.port, USERS, "", encryption);
    toml.push_str(&format!(
        "\n[upstream.tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n{tls_extra}\n",
        certs.join("ca.crt"),
        certs.join("client.crt"),
        certs.join("client.key"),
    ));
    common::with_upstream(&toml, "password = \"upstream-secret\"")
}

/// A proxy in front of a TLS-only Redis (see [`tls_redis_toml`]).
fn proxy_to_tls_redis(redis: &Redis, certs: &Path, tls_extra: &str) -> Proxy {
    Proxy::start_toml(&tls_redis_toml(
        redis,
        certs,
        "enabled = false\n",
        tls_extra,
    ))
}

#[test]
fn the_proxy_reaches_a_tls_only_redis_with_its_client_certificate() {
    let certs = fresh_certs();
    let redis = Redis::start_tls(certs.path(), &["--requirepass", "upstream-secret"]);
    let proxy = proxy_to_tls_redis(&redis, certs.path(), "");

    let mut c = proxy.login(&ALICE);
    assert_eq!(c.cmd(&["SET", "k", "v"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", "k"]), bulk("v"));

    let mut direct = redis.direct_tls(certs.path());
    assert_eq!(direct.cmd(&["AUTH", "upstream-secret"]), b"+OK\r\n");
    let key = format!("{}k", upstream_prefix(ALICE.project));
    assert_eq!(direct.cmd(&["GET", &key]), bulk("v"));
}

#[test]
fn a_wrong_upstream_server_name_fails_the_request_and_is_logged() {
    let certs = fresh_certs();
    let redis = Redis::start_tls(certs.path(), &["--requirepass", "upstream-secret"]);
    let proxy = proxy_to_tls_redis(&redis, certs.path(), "server_name = \"cache.example\"");

    let mut c = proxy.login(&ALICE);
    let reply = String::from_utf8(c.cmd(&["GET", "k"])).expect("utf-8");
    assert_eq!(
        reply,
        "-ERR upstream unavailable: the tls handshake with the upstream failed\r\n"
    );
    let line = wait_for_log(
        &proxy,
        "upstream tls handshake failed",
        Duration::from_secs(5),
    )
    .expect("the reason is logged");
    assert!(line.contains("cache.example"), "{line}");
}

#[test]
fn a_verified_client_certificate_bound_to_a_user_logs_in_without_auth() {
    let certs = fresh_certs();
    let ca = certs.path().join("ca.crt");
    let redis = Redis::start();
    // The development client certificate's subject CN is "alice".
    let mut toml = config_toml(redis.port, USERS, "").replacen(
        "name = \"alice\"\n",
        "name = \"alice\"\nclient_cert = \"alice\"\n",
        1,
    );
    toml.push_str(&server_tls_toml(certs.path(), true));
    let proxy = Proxy::start_toml(&toml);

    let (cert, key) = client_pair(certs.path());
    let mut c = TlsRaw::connect(proxy.port, &ca, Some((&cert, &key))).expect("handshake");
    assert_eq!(c.cmd(&["SET", "from-cert", "yes"]), b"+OK\r\n");
    let key_name = format!("{}from-cert", upstream_prefix(ALICE.project));
    assert_eq!(redis.direct().cmd(&["GET", &key_name]), bulk("yes"));
    // AUTH still switches users, as in Redis.
    assert_eq!(c.cmd(&["AUTH", BOB.name, BOB.password]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", "from-cert"]), b"$-1\r\n");

    // Without a binding, a verified certificate still needs AUTH.
    let unbound = Proxy::start_toml(
        &(config_toml(redis.port, USERS, "") + &server_tls_toml(certs.path(), true)),
    );
    let mut d = TlsRaw::connect(unbound.port, &ca, Some((&cert, &key))).expect("handshake");
    assert_eq!(
        d.cmd(&["GET", "from-cert"]),
        b"-NOAUTH Authentication required.\r\n"
    );
}

#[test]
fn reencrypt_reaches_a_tls_only_redis() {
    let certs = fresh_certs();
    let redis = Redis::start_tls(certs.path(), &["--requirepass", "upstream-secret"]);
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keyring.json");
    redcloak::keyring::Keyring::generate(&keyring).unwrap();
    let encryption = format!("enabled = true\nkeyring = \"{}\"\n", keyring.display());
    let toml = tls_redis_toml(&redis, certs.path(), &encryption, "");
    let proxy = Proxy::start_toml(&toml);
    let mut c = proxy.login(&ALICE);
    assert_eq!(c.cmd(&["SET", "k", "v"]), b"+OK\r\n");
    redcloak::keyring::Keyring::rotate(&keyring).unwrap();

    let config = common::write_file(dir.path(), "redcloak.toml", &toml);
    let stdout = common::reencrypt(&config);
    assert!(stdout.contains("1 values rewritten"), "{stdout}");
}
