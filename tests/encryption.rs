//! Transparent value encryption end to end: what Redis stores, what clients
//! read back, and what happens to values that fail to open.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use redcloak::keyring::Keyring;

/// A proxy with a fresh keyring, in front of its own Redis.
struct Sealed {
    redis: Redis,
    proxy: Proxy,
    keyring: PathBuf,
    _dir: tempfile::TempDir,
}

fn start_sealed(projects: &str) -> Sealed {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keyring.json");
    Keyring::generate(&keyring).unwrap();
    let encryption = format!(
        "enabled = true\nkeyring = \"{}\"\ncompression_threshold = 64\n",
        keyring.display()
    );
    let toml = config_toml_with(redis.port, USERS, "", &encryption) + projects;
    let proxy = Proxy::start_toml(&toml);
    Sealed {
        redis,
        proxy,
        keyring,
        _dir: dir,
    }
}

fn upstream_key(project: &str, key: &str) -> String {
    format!("{}{key}", upstream_prefix(project))
}

/// The raw upstream value of a string key.
fn raw_value(redis: &Redis, project: &str, key: &str) -> Vec<u8> {
    let reply = redis.direct().cmd(&["GET", &upstream_key(project, key)]);
    let header_end = reply.iter().position(|&b| b == b'\n').unwrap() + 1;
    reply[header_end..reply.len() - 2].to_vec()
}

#[test]
fn redis_stores_only_sealed_values_and_clients_read_plaintext() {
    let s = start_sealed("");
    let mut c = s.proxy.login(&ALICE);
    assert_eq!(c.cmd(&["SET", "card", "4111-1111-1111-1111"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["SET", "card2", "4111-1111-1111-1111"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", "card"]), bulk("4111-1111-1111-1111"));

    let raw = raw_value(&s.redis, "billing", "card");
    assert_eq!(&raw[..4], &[0x00, 0x52, 0x43, 0x01], "magic and version");
    // Only what follows the key id can leak: the id itself carries the Unix
    // time of its creation, whose digits may well contain "4111".
    let id_len = usize::from(raw[5]);
    let after_id = &raw[6 + id_len..];
    assert!(
        !after_id.windows(4).any(|w| w == b"4111"),
        "plaintext leaked upstream"
    );
    assert!(
        !raw.windows(9).any(|w| w == b"4111-1111"),
        "plaintext leaked upstream"
    );
    // The same plaintext seals differently every time.
    assert_ne!(raw, raw_value(&s.redis, "billing", "card2"));
}

#[test]
fn a_decoder_written_from_the_spec_opens_what_the_proxy_writes() {
    let s = start_sealed("");
    let mut c = s.proxy.login(&ALICE);
    let long = "compressible ".repeat(100);
    assert_eq!(c.cmd(&["SET", "short", "hello"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["SET", "long", &long]), b"+OK\r\n");

    let text = std::fs::read_to_string(&s.keyring).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let current = json["current"].as_str().unwrap();
    let secret_b64 = json["keys"][0]["secret"].as_str().unwrap();
    use base64::Engine;
    let secret = base64::engine::general_purpose::STANDARD
        .decode(secret_b64)
        .unwrap();

    let short = spec_decoder::open(&secret, "billing", &raw_value(&s.redis, "billing", "short"));
    assert_eq!(short.key_id, current);
    assert!(!short.compressed);
    assert_eq!(short.plaintext, b"hello");
    let long_opened =
        spec_decoder::open(&secret, "billing", &raw_value(&s.redis, "billing", "long"));
    assert!(
        long_opened.compressed,
        "a compressible value over the threshold is compressed"
    );
    assert_eq!(long_opened.plaintext, long.as_bytes());
}

#[test]
fn every_value_bearing_reply_is_opened() {
    let s = start_sealed("");
    let mut c = s.proxy.login(&ALICE);
    assert_eq!(c.cmd(&["MSET", "a", "va", "b", "vb"]), b"+OK\r\n");
    assert_eq!(
        c.cmd(&["MGET", "a", "b", "none"]),
        [
            b"*3\r\n".to_vec(),
            bulk("va"),
            bulk("vb"),
            b"$-1\r\n".to_vec()
        ]
        .concat()
    );
    assert_eq!(c.cmd(&["GETSET", "a", "va2"]), bulk("va"));
    assert_eq!(c.cmd(&["SET", "a", "va3", "GET"]), bulk("va2"));
    assert_eq!(c.cmd(&["GETEX", "a", "EX", "100"]), bulk("va3"));
    assert_eq!(c.cmd(&["GETDEL", "a"]), bulk("va3"));
    assert_eq!(c.cmd(&["SETEX", "t", "100", "vt"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", "t"]), bulk("vt"));

    assert_eq!(c.cmd(&["HSET", "h", "f1", "v1", "f2", "v2"]), b":2\r\n");
    assert_eq!(c.cmd(&["HGET", "h", "f1"]), bulk("v1"));
    assert_eq!(
        c.cmd(&["HMGET", "h", "f2", "f1"]),
        [b"*2\r\n".to_vec(), bulk("v2"), bulk("v1")].concat()
    );
    let all = c.cmd(&["HGETALL", "h"]);
    assert!(
        all == [
            b"*4\r\n".to_vec(),
            bulk("f1"),
            bulk("v1"),
            bulk("f2"),
            bulk("v2")
        ]
        .concat()
            || all
                == [
                    b"*4\r\n".to_vec(),
                    bulk("f2"),
                    bulk("v2"),
                    bulk("f1"),
                    bulk("v1")
                ]
                .concat()
    );
    assert_eq!(
        c.cmd(&["HRANDFIELD", "h", "-1"]).len(),
        b"*1\r\n$2\r\nf1\r\n".len()
    );

    assert_eq!(c.cmd(&["RPUSH", "l", "e1", "e2", "e3"]), b":3\r\n");
    assert_eq!(
        c.cmd(&["LRANGE", "l", "0", "-1"]),
        [b"*3\r\n".to_vec(), bulk("e1"), bulk("e2"), bulk("e3")].concat()
    );
    assert_eq!(c.cmd(&["LINDEX", "l", "1"]), bulk("e2"));
    assert_eq!(c.cmd(&["LPOP", "l"]), bulk("e1"));
    assert_eq!(c.cmd(&["LMOVE", "l", "l2", "LEFT", "LEFT"]), bulk("e2"));
    assert_eq!(
        c.cmd(&["BLPOP", "l2", "1"]),
        [b"*2\r\n".to_vec(), bulk("l2"), bulk("e2")].concat()
    );
    assert_eq!(c.cmd(&["RPUSH", "l3", "x", "y"]), b":2\r\n");
    assert_eq!(
        c.cmd(&["RPOP", "l3", "2"]),
        [b"*2\r\n".to_vec(), bulk("y"), bulk("x")].concat()
    );
    assert_eq!(c.cmd(&["LSET", "l", "0", "e3b"]), b"+OK\r\n");
    assert_eq!(
        c.cmd(&["LMPOP", "1", "l", "LEFT"]),
        [
            b"*2\r\n".to_vec(),
            bulk("l"),
            b"*1\r\n".to_vec(),
            bulk("e3b")
        ]
        .concat()
    );

    // RESP3 maps too.
    assert_eq!(c.cmd(&["HELLO", "3"]).first(), Some(&b'%'));
    assert_eq!(c.cmd(&["HDEL", "h", "f2"]), b":1\r\n");
    assert_eq!(
        c.cmd(&["HGETALL", "h"]),
        [b"%1\r\n".to_vec(), bulk("f1"), bulk("v1")].concat()
    );
}

#[test]
fn counters_keep_working_and_plaintext_commands_refuse_sealed_values() {
    let s = start_sealed("");
    let mut c = s.proxy.login(&ALICE);
    assert_eq!(c.cmd(&["INCRBY", "hits", "5"]), b":5\r\n");
    assert_eq!(c.cmd(&["INCR", "hits"]), b":6\r\n");
    assert_eq!(c.cmd(&["GET", "hits"]), bulk("6"));
    // Bitmaps and plain strings made inside Redis still work.
    assert_eq!(c.cmd(&["SETBIT", "bits", "7", "1"]), b":0\r\n");
    assert_eq!(c.cmd(&["BITCOUNT", "bits"]), b":1\r\n");
    assert_eq!(c.cmd(&["STRLEN", "hits"]), b":1\r\n");

    assert_eq!(c.cmd(&["SET", "sealed", "hello"]), b"+OK\r\n");
    for cmd in [
        &["STRLEN", "sealed"][..],
        &["APPEND", "sealed", "x"],
        &["GETRANGE", "sealed", "0", "1"],
        &["SETRANGE", "sealed", "0", "x"],
        &["BITCOUNT", "sealed"],
    ] {
        let reply = c.cmd(cmd);
        assert!(
            reply.starts_with(b"-ERR this command needs the plaintext"),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&reply)
        );
    }
    assert_eq!(
        c.cmd(&["GET", "sealed"]),
        bulk("hello"),
        "refused commands changed nothing"
    );
    assert_eq!(c.cmd(&["RPUSH", "l", "a"]), b":1\r\n");
    assert!(
        c.cmd(&["LREM", "l", "0", "a"])
            .starts_with(b"-ERR 'lrem' compares values")
    );
    // Redis's own errors pass through the guard unchanged.
    assert!(c.cmd(&["STRLEN", "l"]).starts_with(b"-WRONGTYPE"));
}

#[test]
fn a_value_that_fails_to_open_gets_an_error_and_the_session_goes_on() {
    let s = start_sealed("");
    let mut alice = s.proxy.login(&ALICE);
    let mut bob = s.proxy.login(&BOB);
    assert_eq!(alice.cmd(&["SET", "secret", "alice-only"]), b"+OK\r\n");

    // Copy alice's sealed value into bob's namespace, upstream.
    let mut direct = s.redis.direct();
    let copied = direct.cmd(&[
        "COPY",
        &upstream_key("billing", "secret"),
        &upstream_key("shipping", "stolen"),
    ]);
    assert_eq!(copied, b":1\r\n");
    let reply = bob.cmd(&["GET", "stolen"]);
    assert!(
        reply.starts_with(b"-ERR redcloak could not open a stored value"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    assert_eq!(bob.cmd(&["PING"]), b"+PONG\r\n");

    // Flip one byte of alice's value upstream.
    let mut raw = raw_value(&s.redis, "billing", "secret");
    let middle = raw.len() / 2;
    raw[middle] ^= 0x01;
    let mut set = format!(
        "*3\r\n$3\r\nSET\r\n${}\r\n{}\r\n${}\r\n",
        upstream_key("billing", "secret").len(),
        upstream_key("billing", "secret"),
        raw.len()
    )
    .into_bytes();
    set.extend_from_slice(&raw);
    set.extend_from_slice(b"\r\n");
    direct.send_bytes(&set);
    assert_eq!(direct.reply(), b"+OK\r\n");
    assert!(
        alice
            .cmd(&["GET", "secret"])
            .starts_with(b"-ERR redcloak could not open")
    );
    assert_eq!(alice.cmd(&["SET", "other", "fine"]), b"+OK\r\n");
    assert_eq!(alice.cmd(&["GET", "other"]), bulk("fine"));

    std::thread::sleep(Duration::from_millis(100));
    let logs = s.proxy.logs().join("\n");
    assert!(
        logs.contains("could not be opened"),
        "the failure is logged"
    );
    assert!(
        !logs.contains("alice-only") && !logs.contains("secret\"") && !logs.contains("stolen"),
        "no key or value in logs"
    );
}

#[test]
fn strict_projects_refuse_plain_values() {
    let s = start_sealed("[projects.billing]\nstrict = true\n");
    let mut alice = s.proxy.login(&ALICE);
    s.redis
        .direct()
        .cmd(&["SET", &upstream_key("billing", "legacy"), "plain"]);
    s.redis
        .direct()
        .cmd(&["SET", &upstream_key("shipping", "legacy"), "plain"]);
    assert!(
        alice
            .cmd(&["GET", "legacy"])
            .starts_with(b"-ERR redcloak could not open")
    );
    let mut bob = s.proxy.login(&BOB);
    assert_eq!(
        bob.cmd(&["GET", "legacy"]),
        bulk("plain"),
        "other projects pass plain values"
    );
}

#[test]
fn a_rotated_keyring_applies_on_sighup_without_dropping_connections() {
    let s = start_sealed("");
    let mut c = s.proxy.login(&ALICE);
    assert_eq!(c.cmd(&["SET", "old", "v-old"]), b"+OK\r\n");
    let first = Keyring::load(&s.keyring).unwrap().current_id().to_string();

    let rotated = Keyring::rotate(&s.keyring).unwrap();
    let second = rotated.current_id().to_string();
    assert_ne!(first, second);
    s.proxy.signal("HUP");
    wait_for_log(&s.proxy, "configuration reloaded");

    assert_eq!(c.cmd(&["SET", "new", "v-new"]), b"+OK\r\n");
    assert_eq!(key_id_of(&raw_value(&s.redis, "billing", "new")), second);
    assert_eq!(key_id_of(&raw_value(&s.redis, "billing", "old")), first);
    assert_eq!(c.cmd(&["GET", "old"]), bulk("v-old"));
    assert_eq!(c.cmd(&["GET", "new"]), bulk("v-new"));
}

fn wait_for_log(proxy: &Proxy, needle: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if let Ok(line) = proxy.stderr.recv_timeout(Duration::from_millis(100))
            && line.contains(needle)
        {
            return;
        }
    }
    panic!("no log line containing {needle:?}");
}

fn key_id_of(sealed: &[u8]) -> String {
    let len = sealed[5] as usize;
    String::from_utf8(sealed[6..6 + len].to_vec()).unwrap()
}

/// An independent decoder of SPEC §6, using the primitives directly.
mod spec_decoder {
    use aes::cipher::{BlockModeDecrypt, KeyIvInit, block_padding::Pkcs7};
    use ring::{hkdf, hmac};
    use std::io::Read;

    pub struct Opened {
        pub key_id: String,
        pub compressed: bool,
        pub plaintext: Vec<u8>,
    }

    struct Len32;
    impl hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }

    fn derive(secret: &[u8], info: &str) -> [u8; 32] {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"redcloak/v1").extract(secret);
        let info = [info.as_bytes()];
        let okm = prk.expand(&info, Len32).unwrap();
        let mut out = [0u8; 32];
        okm.fill(&mut out).unwrap();
        out
    }

    pub fn open(secret: &[u8], project: &str, value: &[u8]) -> Opened {
        assert_eq!(&value[..3], &[0x00, 0x52, 0x43]);
        assert_eq!(value[3], 1);
        let flags = value[4];
        let id_len = value[5] as usize;
        let key_id = String::from_utf8(value[6..6 + id_len].to_vec()).unwrap();
        let iv = &value[6 + id_len..22 + id_len];
        let (body, tag) = value.split_at(value.len() - 32);
        let ciphertext = &body[22 + id_len..];
        assert_eq!(ciphertext.len() % 16, 0);

        let mac_key = hmac::Key::new(
            hmac::HMAC_SHA256,
            &derive(secret, &format!("mac:{project}")),
        );
        hmac::verify(&mac_key, body, tag).expect("tag verifies");
        let enc_key = derive(secret, &format!("enc:{project}"));
        let decryptor = cbc::Decryptor::<aes::Aes256>::new_from_slices(&enc_key, iv).unwrap();
        let padded = decryptor.decrypt_padded_vec::<Pkcs7>(ciphertext).unwrap();
        let compressed = flags & 1 == 1;
        let plaintext = if compressed {
            let mut out = Vec::new();
            flate2::read::ZlibDecoder::new(&padded[..])
                .read_to_end(&mut out)
                .unwrap();
            out
        } else {
            padded
        };
        Opened {
            key_id,
            compressed,
            plaintext,
        }
    }
}

#[test]
fn replies_inside_exec_are_opened_per_queued_command() {
    let s = start_sealed("");
    let mut c = s.proxy.login(&ALICE);
    assert_eq!(c.cmd(&["MULTI"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["SET", "a", "va"]), b"+QUEUED\r\n");
    assert_eq!(c.cmd(&["GET", "a"]), b"+QUEUED\r\n");
    assert_eq!(c.cmd(&["PING"]), b"+QUEUED\r\n");
    assert_eq!(c.cmd(&["KEYS", "*"]), b"+QUEUED\r\n");
    assert_eq!(c.cmd(&["INCR", "a"]), b"+QUEUED\r\n");
    let exec = c.cmd(&["EXEC"]);
    let expected = [
        b"*5\r\n+OK\r\n".to_vec(),
        bulk("va"),
        b"+PONG\r\n".to_vec(),
        b"*1\r\n".to_vec(),
        bulk("a"),
        b"-ERR value is not an integer or out of range\r\n".to_vec(),
    ]
    .concat();
    assert_eq!(
        String::from_utf8_lossy(&exec),
        String::from_utf8_lossy(&expected)
    );
}

#[test]
fn a_refused_command_inside_multi_makes_exec_fail() {
    let s = start_sealed("");
    let mut c = s.proxy.login(&ALICE);
    assert_eq!(c.cmd(&["MULTI"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["SET", "a", "1"]), b"+QUEUED\r\n");
    assert!(c.cmd(&["CONFIG", "GET", "*"]).starts_with(b"-ERR"));
    assert_eq!(
        c.cmd(&["EXEC"]),
        b"-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    assert_eq!(
        c.cmd(&["GET", "a"]),
        b"$-1\r\n",
        "nothing of the transaction ran"
    );
    assert_eq!(c.cmd(&["EXEC"]), b"-ERR EXEC without MULTI\r\n");

    // A WATCHed key changed by another client: EXEC returns null.
    let mut other = s.proxy.login(&ALICE);
    assert_eq!(c.cmd(&["WATCH", "w"]), b"+OK\r\n");
    assert_eq!(other.cmd(&["SET", "w", "changed"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["MULTI"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", "w"]), b"+QUEUED\r\n");
    assert_eq!(c.cmd(&["EXEC"]), b"*-1\r\n");
    assert_eq!(c.cmd(&["MULTI"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["DISCARD"]), b"+OK\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_reencrypt_and_prune_under_a_concurrent_writer_lose_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let s = start_sealed("");
    let old_id = Keyring::load(&s.keyring).unwrap().current_id().to_string();
    let stop = Arc::new(AtomicBool::new(false));

    // The writer keeps overwriting 50 keys and remembers what was acknowledged.
    let port = s.proxy.port;
    let writer_stop = Arc::clone(&stop);
    let writer = std::thread::spawn(move || {
        let mut c = Raw::connect(port);
        assert_eq!(c.cmd(&["AUTH", "alice", "alice-pw"]), b"+OK\r\n");
        let mut acknowledged = vec![String::new(); 50];
        let mut round = 0u64;
        while !writer_stop.load(Ordering::Relaxed) || round < 3 {
            for (i, slot) in acknowledged.iter_mut().enumerate() {
                let value = format!("value-{i}-round-{round}");
                assert_eq!(c.cmd(&["SET", &format!("k{i}"), &value]), b"+OK\r\n");
                *slot = value;
            }
            round += 1;
        }
        acknowledged
    });

    std::thread::sleep(Duration::from_millis(200));
    let new_id = Keyring::rotate(&s.keyring)
        .unwrap()
        .current_id()
        .to_string();
    s.proxy.signal("HUP");
    wait_for_log(&s.proxy, "configuration reloaded");

    // Old values move to the new key while the writer keeps writing.
    let settings = redcloak::config::load(&s.proxy.config, &Default::default()).unwrap();
    let mut retired = false;
    for _ in 0..5 {
        let summary = redcloak::reencrypt::run(&settings, None, false)
            .await
            .unwrap();
        if matches!(
            summary.retirement,
            redcloak::reencrypt::Retirement::Retired(_)
        ) {
            retired = true;
            break;
        }
    }
    assert!(retired, "a clean re-encryption run retires the old key");
    let dropped = Keyring::prune(&s.keyring, 0, false).unwrap();
    assert_eq!(dropped, vec![old_id]);
    s.proxy.signal("HUP");
    wait_for_log(&s.proxy, "configuration reloaded");

    stop.store(true, Ordering::Relaxed);
    let acknowledged = writer.join().expect("the writer saw only successes");
    let mut c = s.proxy.login(&ALICE);
    for (i, value) in acknowledged.iter().enumerate() {
        assert_eq!(c.cmd(&["GET", &format!("k{i}")]), bulk(value), "k{i}");
        assert_eq!(
            key_id_of(&raw_value(&s.redis, "billing", &format!("k{i}"))),
            new_id
        );
    }
}

#[test]
fn rotation_interval_rotates_the_keyring_and_new_writes_use_the_new_key() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keyring.json");
    Keyring::generate(&keyring).unwrap();
    let first = Keyring::load(&keyring).unwrap().current_id().to_string();
    let encryption = format!(
        "enabled = true\nkeyring = \"{}\"\nrotation_interval_secs = 1\n",
        keyring.display()
    );
    let proxy = Proxy::start_toml(&config_toml_with(redis.port, USERS, "", &encryption));
    let mut c = proxy.login(&ALICE);
    assert_eq!(c.cmd(&["SET", "before", "1"]), b"+OK\r\n");

    wait_for_log(&proxy, "keyring rotated");
    wait_for_log(&proxy, "configuration reloaded");
    let rotated = Keyring::load(&keyring).unwrap();
    assert_ne!(rotated.current_id(), first);
    assert_eq!(c.cmd(&["SET", "after", "2"]), b"+OK\r\n");
    let after_id = key_id_of(&raw_value(&redis, "billing", "after"));
    assert!(
        rotated
            .list()
            .iter()
            .any(|k| k.id == after_id && k.id != first)
    );
    assert_eq!(
        c.cmd(&["GET", "before"]),
        bulk("1"),
        "old values still open"
    );
}
