//! `reencrypt` against a real `redis-server`: values move to the current
//! key and keep their TTLs, plain and corrupt values are left alone and
//! counted, a concurrent writer always wins, and old keys are retired only
//! after a clean run over every project.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{
    ALICE, BOB, Proxy, Redis, USERS, bulk, config_toml_with, upstream_prefix, write_file,
};
use redcloak::config::{self, Settings};
use redcloak::crypto;
use redcloak::keyring::Keyring;
use redcloak::keys_cli::{self, KeysCommand};
use redcloak::reencrypt::{self, Retirement};
use redcloak::sealer::Sealer;

/// Values longer than this are compressed, so the big test value is.
const COMPRESSION_THRESHOLD: usize = 64;

/// A redis-server, a keyring file with one key, and a configuration with
/// the projects `billing` and `shipping`.
struct Setup {
    redis: Redis,
    dir: tempfile::TempDir,
    keyring: PathBuf,
    /// A sealer over the first key, as a proxy before the rotation had.
    old: Sealer,
    con: redis::Connection,
}

impl Setup {
    fn new() -> Setup {
        let redis = Redis::start();
        let dir = tempfile::tempdir().expect("temporary directory");
        let keyring = dir.path().join("keyring.json");
        let old = sealer(Keyring::generate(&keyring).expect("generating the keyring"));
        let con = redis::Client::open(format!("redis://127.0.0.1:{}/", redis.port))
            .and_then(|client| client.get_connection())
            .expect("connecting to redis-server");
        Setup {
            redis,
            dir,
            keyring,
            old,
            con,
        }
    }

    /// The configuration, with `server` lines added to `[server]`.
    fn settings(&self, server: &str) -> Settings {
        let toml = format!(
            "[server]\n{server}\n\
             [upstream]\naddress = \"127.0.0.1:{}\"\nconnect_timeout_ms = 2000\n\
             [encryption]\nkeyring = \"{}\"\ncompression_threshold = {COMPRESSION_THRESHOLD}\n\
             [audit]\nenabled = false\n\
             [projects.billing]\n[projects.shipping]\n",
            self.redis.port,
            self.keyring.display()
        );
        let path = write_file(self.dir.path(), "redcloak.toml", &toml);
        config::load(&path, &HashMap::new()).expect("a valid test configuration")
    }

    /// Rotates the keyring file; returns a sealer over the rotated keyring.
    fn rotate(&self) -> Sealer {
        sealer(Keyring::rotate(&self.keyring).expect("rotating the keyring"))
    }

    fn cmd<T: redis::FromRedisValue>(&mut self, args: &[&[u8]]) -> T {
        let mut cmd = redis::cmd(std::str::from_utf8(args[0]).expect("ASCII command"));
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query(&mut self.con).expect("a command to redis-server")
    }
}

fn sealer(keyring: Keyring) -> Sealer {
    Sealer::new(keyring, COMPRESSION_THRESHOLD, false)
}

/// The upstream name of `name` in `project`'s namespace.
fn key(project: &str, name: &str) -> Vec<u8> {
    format!("{}{name}", upstream_prefix(project)).into_bytes()
}

fn key_id(value: &[u8]) -> String {
    crypto::parse_header(value)
        .expect("a sealed value")
        .key_id
        .to_owned()
}

/// Asserts that `value` is sealed under `id` and opens to `plaintext`.
fn assert_sealed(sealer: &Sealer, project: &str, value: &[u8], id: &str, plaintext: &str) {
    assert_eq!(key_id(value), id);
    let opened = sealer.open(project, value).expect("the value opens");
    assert_eq!(opened.as_bytes(), plaintext.as_bytes());
}

fn big(project: &str) -> String {
    format!("{project} ").repeat(1000)
}

/// Writes, for `project`: a string with a TTL, a large compressible string,
/// a hash of two sealed fields and one plain counter, a list of three
/// sealed elements, and a set (which holds no sealed values).
fn write_project(setup: &mut Setup, project: &str) {
    let seal = |text: &str| setup.old.seal(project, text.as_bytes()).expect("sealing");
    let greeting = seal(&format!("hello {project}"));
    let big_value = seal(&big(project));
    let name = seal("Ada");
    let email = seal("ada@example.com");
    let jobs: Vec<Vec<u8>> = (1..=3).map(|i| seal(&format!("job-{i}"))).collect();
    assert!(crypto::parse_header(&big_value).unwrap().compressed);

    let () = setup.cmd(&[b"SET", &key(project, "greeting"), &greeting, b"EX", b"1000"]);
    let () = setup.cmd(&[b"SET", &key(project, "big"), &big_value]);
    let _: i64 = setup.cmd(&[
        b"HSET",
        &key(project, "profile"),
        b"name",
        &name,
        b"email",
        &email,
        b"visits",
        b"7",
    ]);
    let _: i64 = setup.cmd(&[
        b"RPUSH",
        &key(project, "queue"),
        &jobs[0],
        &jobs[1],
        &jobs[2],
    ]);
    let _: i64 = setup.cmd(&[b"SADD", &key(project, "tags"), b"red", b"blue"]);
}

/// Checks what `write_project` wrote, now sealed under `id`.
fn assert_project(setup: &mut Setup, sealer: &Sealer, project: &str, id: &str) {
    let greeting: Vec<u8> = setup.cmd(&[b"GET", &key(project, "greeting")]);
    assert_sealed(sealer, project, &greeting, id, &format!("hello {project}"));
    let big_value: Vec<u8> = setup.cmd(&[b"GET", &key(project, "big")]);
    assert_sealed(sealer, project, &big_value, id, &big(project));

    let profile: HashMap<Vec<u8>, Vec<u8>> = setup.cmd(&[b"HGETALL", &key(project, "profile")]);
    assert_sealed(sealer, project, &profile[&b"name"[..]], id, "Ada");
    assert_sealed(
        sealer,
        project,
        &profile[&b"email"[..]],
        id,
        "ada@example.com",
    );
    assert_eq!(profile[&b"visits"[..]], b"7");

    let queue: Vec<Vec<u8>> = setup.cmd(&[b"LRANGE", &key(project, "queue"), b"0", b"-1"]);
    assert_eq!(queue.len(), 3);
    for (i, job) in queue.iter().enumerate() {
        assert_sealed(sealer, project, job, id, &format!("job-{}", i + 1));
    }

    let ttl: i64 = setup.cmd(&[b"PTTL", &key(project, "greeting")]);
    assert!(ttl > 900_000 && ttl <= 1_000_000, "TTL kept: {ttl}");
}

#[tokio::test]
async fn old_values_move_to_the_new_key_and_old_keys_retire_after_a_clean_run() {
    let mut setup = Setup::new();
    let old_id = setup.old.keyring().current_id().to_owned();
    write_project(&mut setup, "billing");
    write_project(&mut setup, "shipping");

    let counter = key("billing", "counter");
    let () = setup.cmd(&[b"SET", &counter, b"42"]);
    let mut broken = setup.old.seal("billing", b"precious").unwrap();
    let middle = broken.len() - 40;
    broken[middle] ^= 0x01;
    let () = setup.cmd(&[b"SET", &key("billing", "broken"), &broken]);
    let stray = setup.old.seal("other", b"not configured").unwrap();
    let () = setup.cmd(&[b"SET", &key("other", "stray"), &stray]);

    let new = setup.rotate();
    let new_id = new.keyring().current_id().to_owned();
    let settings = setup.settings("");

    let first = reencrypt::run(&settings, None, false).await.unwrap();
    assert_eq!(first.projects, ["billing", "shipping"]);
    assert_eq!(first.keys_scanned, 12);
    assert_eq!(first.rewritten, 14);
    assert_eq!(first.already_current, 0);
    assert_eq!(first.plain, 3);
    assert_eq!(first.failures, 1);
    assert_eq!(first.contended, 0);
    assert_eq!(first.retirement, Retirement::ValuesLeft);

    assert_project(&mut setup, &new, "billing", &new_id);
    assert_project(&mut setup, &new, "shipping", &new_id);
    let counter_now: Vec<u8> = setup.cmd(&[b"GET", &counter]);
    assert_eq!(counter_now, b"42");
    let broken_now: Vec<u8> = setup.cmd(&[b"GET", &key("billing", "broken")]);
    assert_eq!(
        broken_now, broken,
        "a value that fails to open is never written"
    );
    let stray_now: Vec<u8> = setup.cmd(&[b"GET", &key("other", "stray")]);
    assert_eq!(stray_now, stray, "unconfigured projects are not visited");
    let marks = Keyring::load(&setup.keyring).unwrap().list();
    assert!(marks.iter().all(|info| info.retired_at.is_none()));

    let _: i64 = setup.cmd(&[b"DEL", &key("billing", "broken")]);
    let second = reencrypt::run(&settings, None, false).await.unwrap();
    assert_eq!(second.keys_scanned, 11);
    assert_eq!(second.rewritten, 0);
    assert_eq!(second.already_current, 14);
    assert_eq!(second.plain, 3);
    assert_eq!(second.failures, 0);
    assert_eq!(second.retirement, Retirement::Retired(vec![old_id.clone()]));
    let marks = Keyring::load(&setup.keyring).unwrap().list();
    assert!(marks[0].id == old_id && marks[0].retired_at.is_some());
    assert!(marks[1].retired_at.is_none());

    keys_cli::run(KeysCommand::Prune {
        keyring: setup.keyring.clone(),
        keep: 0,
        force: false,
    })
    .unwrap();
    let pruned = sealer(Keyring::load(&setup.keyring).unwrap());
    assert_eq!(pruned.keyring().list().len(), 1);
    assert!(pruned.keyring().secret(&old_id).is_none());
    assert_project(&mut setup, &pruned, "billing", &new_id);
    assert_project(&mut setup, &pruned, "shipping", &new_id);
}

#[tokio::test]
async fn a_single_project_run_moves_only_that_project_and_never_retires() {
    let mut setup = Setup::new();
    let old_id = setup.old.keyring().current_id().to_owned();
    write_project(&mut setup, "billing");
    write_project(&mut setup, "shipping");
    let new = setup.rotate();
    let new_id = new.keyring().current_id().to_owned();
    let settings = setup.settings("");

    let summary = reencrypt::run(&settings, Some("billing"), false)
        .await
        .unwrap();
    assert_eq!(summary.projects, ["billing"]);
    assert_eq!((summary.rewritten, summary.failures), (7, 0));
    assert_eq!(summary.retirement, Retirement::PartialRun);
    assert_project(&mut setup, &new, "billing", &new_id);
    assert_project(&mut setup, &new, "shipping", &old_id);
    assert!(
        Keyring::load(&setup.keyring)
            .unwrap()
            .list()
            .iter()
            .all(|info| info.retired_at.is_none())
    );

    let unknown = reencrypt::run(&settings, Some("nope"), false)
        .await
        .unwrap_err();
    assert!(unknown.to_string().contains("\"nope\""), "{unknown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_overwritten_during_the_run_keeps_the_writers_last_value() {
    let mut setup = Setup::new();
    let hot = key("billing", "hot");
    for batch in 0..10 {
        let mut args: Vec<Vec<u8>> = vec![b"HSET".to_vec(), hot.clone()];
        for i in 0..50 {
            let field = format!("f{batch}-{i}");
            let value = setup.old.seal("billing", field.as_bytes()).unwrap();
            args.extend([field.into_bytes(), value]);
        }
        let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        let _: i64 = setup.cmd(&refs);
    }
    let live = setup.old.seal("billing", b"live-old").unwrap();
    let _: i64 = setup.cmd(&[b"HSET", &hot, b"live", &live]);

    // A client of an already reloaded proxy keeps writing the field, sealed
    // under the new key, for the whole run.
    let new = Arc::new(setup.rotate());
    let stop = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let writer = {
        let (new, stop, hot) = (Arc::clone(&new), Arc::clone(&stop), hot.clone());
        let url = format!("redis://127.0.0.1:{}/", setup.redis.port);
        std::thread::spawn(move || {
            let mut con = redis::Client::open(url)
                .and_then(|client| client.get_connection())
                .expect("the writer's connection");
            let mut written = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let value = new
                    .seal("billing", format!("live-{written}").as_bytes())
                    .unwrap();
                let _: i64 = redis::cmd("HSET")
                    .arg(&hot[..])
                    .arg("live")
                    .arg(value)
                    .query(&mut con)
                    .expect("the writer's HSET");
                written += 1;
                if written == 1 {
                    let _ = started_tx.send(());
                }
                std::thread::sleep(Duration::from_micros(300));
            }
            written
        })
    };
    started_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the writer started");

    let settings = setup.settings("");
    let summary = reencrypt::run(&settings, None, false).await.unwrap();
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().expect("the writer finished");

    assert!(written > 1, "the writer ran during the re-encryption");
    assert_eq!(
        summary.failures, summary.contended,
        "only contention may leave values behind"
    );
    let last: Vec<u8> = setup.cmd(&[b"HGET", &hot, b"live"]);
    let new_id = new.keyring().current_id().to_owned();
    assert_sealed(
        &new,
        "billing",
        &last,
        &new_id,
        &format!("live-{}", written - 1),
    );

    // With the writer gone, a second run moves whatever contention left.
    let again = reencrypt::run(&settings, None, false).await.unwrap();
    assert_eq!(again.failures, 0);
    let fields: HashMap<Vec<u8>, Vec<u8>> = setup.cmd(&[b"HGETALL", &hot]);
    assert_eq!(fields.len(), 501);
    assert!(fields.values().all(|value| key_id(value) == new_id));
}

#[tokio::test]
async fn without_isolation_each_value_moves_under_the_project_it_was_sealed_for() {
    let mut setup = Setup::new();
    for (name, project) in [("b", "billing"), ("s", "shipping"), ("x", "other")] {
        let value = setup.old.seal(project, name.as_bytes()).unwrap();
        let () = setup.cmd(&[b"SET", name.as_bytes(), &value]);
    }
    let new = setup.rotate();
    let new_id = new.keyring().current_id().to_owned();
    let settings = setup.settings("project_isolation = false");

    let summary = reencrypt::run(&settings, None, false).await.unwrap();
    assert_eq!((summary.keys_scanned, summary.rewritten), (3, 2));
    assert_eq!(summary.failures, 1, "no configured project opens x");
    assert_eq!(summary.retirement, Retirement::ValuesLeft);
    let b: Vec<u8> = setup.cmd(&[b"GET", b"b"]);
    assert_sealed(&new, "billing", &b, &new_id, "b");
    let s: Vec<u8> = setup.cmd(&[b"GET", b"s"]);
    assert_sealed(&new, "shipping", &s, &new_id, "s");

    let refused = reencrypt::run(&settings, Some("billing"), false)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("project_isolation"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_single_environment_key_leaves_nothing_to_retire() {
    let mut setup = Setup::new();
    let secret = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let env = sealer(Keyring::from_env_key(secret).unwrap());
    let value = env.seal("billing", b"v").unwrap();
    let () = setup.cmd(&[b"SET", &key("billing", "k"), &value]);

    let toml = format!(
        "[upstream]\naddress = \"127.0.0.1:{}\"\n[audit]\nenabled = false\n[projects.billing]\n",
        setup.redis.port
    );
    let path = write_file(setup.dir.path(), "env.toml", &toml);
    let vars = HashMap::from([("CACHE_ENCRYPTION_KEY".to_owned(), secret.to_owned())]);
    let settings = config::load(&path, &vars).unwrap();

    let summary = reencrypt::run(&settings, None, false).await.unwrap();
    assert_eq!((summary.already_current, summary.failures), (1, 0));
    assert_eq!(summary.retirement, Retirement::NoOldKeys);
}

#[test]
fn the_command_prints_its_summary_and_fails_while_values_are_left() {
    let mut setup = Setup::new();
    let mut broken = setup.old.seal("billing", b"v").unwrap();
    let last = broken.len() - 1;
    broken[last] ^= 0x01;
    let () = setup.cmd(&[b"SET", &key("billing", "broken"), &broken]);
    let good = setup.old.seal("shipping", b"v").unwrap();
    let () = setup.cmd(&[b"SET", &key("shipping", "good"), &good]);
    setup.rotate();
    setup.settings("");
    let config = setup.dir.path().join("redcloak.toml");

    let run = |project: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_redcloak"));
        command.arg("reencrypt").arg("--config").arg(&config);
        if let Some(project) = project {
            command.args(["--project", project]);
        }
        command.output().expect("running redcloak reencrypt")
    };

    let failed = run(None);
    assert!(!failed.status.success());
    let stdout = String::from_utf8_lossy(&failed.stdout);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stdout.contains("1 values rewritten"), "{stdout}");
    assert!(stdout.contains("old keys not retired"), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "one line of reason: {stderr}");
    assert!(stderr.contains("could not be re-encrypted"), "{stderr}");
    assert_no_key_names(&[&stdout, &stderr]);

    let shipping = run(Some("shipping"));
    assert!(shipping.status.success());
    let stdout = String::from_utf8_lossy(&shipping.stdout);
    assert!(stdout.contains("re-encrypted shipping:"), "{stdout}");
    assert!(
        shipping.stderr.is_empty(),
        "no progress line off a terminal"
    );
}

fn assert_no_key_names(outputs: &[&str]) {
    for output in outputs {
        for name in ["broken", "good", &upstream_prefix("billing")] {
            assert!(!output.contains(name), "{output} names a key");
        }
    }
}

/// Waits for the proxy to log a line containing `needle`.
fn wait_for_log(proxy: &Proxy, needle: &str) {
    loop {
        let line = proxy
            .stderr
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("the proxy did not log {needle:?}"));
        if line.contains(needle) {
            return;
        }
    }
}

#[tokio::test]
async fn values_written_through_the_proxy_stay_readable_through_a_full_rotation() {
    let mut setup = Setup::new();
    let old_id = setup.old.keyring().current_id().to_owned();
    let encryption = format!(
        "enabled = true\nkeyring = \"{}\"\ncompression_threshold = {COMPRESSION_THRESHOLD}\n",
        setup.keyring.display()
    );
    let proxy = Proxy::start_toml(&config_toml_with(setup.redis.port, USERS, "", &encryption));
    let mut alice = proxy.login(&ALICE);
    let mut bob = proxy.login(&BOB);
    let long = "a long invoice line ".repeat(50);
    assert_eq!(alice.cmd(&["SET", "invoice", &long]), b"+OK\r\n");
    assert_eq!(alice.cmd(&["HSET", "card", "number", "4111"]), b":1\r\n");
    assert_eq!(alice.cmd(&["RPUSH", "queue", "a", "b"]), b":2\r\n");
    assert_eq!(bob.cmd(&["SET", "parcel", "p-1"]), b"+OK\r\n");

    let new_id = setup.rotate().keyring().current_id().to_owned();
    proxy.signal("HUP");
    wait_for_log(&proxy, "configuration reloaded");

    let settings = config::load(&proxy.config, &HashMap::new()).unwrap();
    let summary = reencrypt::run(&settings, None, false).await.unwrap();
    assert_eq!((summary.rewritten, summary.failures), (5, 0));
    assert_eq!(
        summary.retirement,
        Retirement::Retired(vec![old_id.clone()])
    );

    keys_cli::run(KeysCommand::Prune {
        keyring: setup.keyring.clone(),
        keep: 0,
        force: false,
    })
    .unwrap();
    proxy.signal("HUP");
    wait_for_log(&proxy, "configuration reloaded");

    let mut alice = proxy.login(&ALICE);
    let mut bob = proxy.login(&BOB);
    assert_eq!(alice.cmd(&["GET", "invoice"]), bulk(&long));
    assert_eq!(alice.cmd(&["HGET", "card", "number"]), bulk("4111"));
    assert_eq!(
        alice.cmd(&["LRANGE", "queue", "0", "-1"]),
        [b"*2\r\n".to_vec(), bulk("a"), bulk("b")].concat()
    );
    assert_eq!(bob.cmd(&["GET", "parcel"]), bulk("p-1"));
    let stored: Vec<u8> = setup.cmd(&[b"GET", &key("billing", "invoice")]);
    assert_eq!(key_id(&stored), new_id);
}
