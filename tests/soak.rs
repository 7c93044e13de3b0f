//! Soak: many clients in two projects read and write through the proxy,
//! with values sealed, while the keyring rotates, the proxy is sent
//! `SIGHUP`, and one client process is killed. At the end every
//! acknowledged write must read back with its value, and nothing may have
//! crossed from one project to the other.
//!
//! The short form runs with `cargo test`, for 8 seconds; the long form is
//! `REDCLOAK_SOAK_SECS=180 cargo test --test soak -- --nocapture`.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use redcloak::keyring::Keyring;

/// Seconds of load in the short form.
const SOAK_SECS: u64 = 8;

/// Clients per project, and keys per client.
const CLIENTS: usize = 6;
const KEYS: usize = 40;

/// What a client last had acknowledged for one of its keys.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Value {
    Str(String),
    Hash(BTreeMap<String, String>),
    List(VecDeque<String>),
    Counter(i64),
}

/// A small deterministic generator, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x % n as u64) as usize
    }
}

/// What one client did.
#[derive(Debug, Default)]
struct Tally {
    ops: u64,
    errors: u64,
}

/// One client: its project, its own keys (each written by it alone, so its
/// model is exact), and the same key names in both projects, so that a
/// value crossing projects would be read back as the other's.
struct Client {
    user: &'static User,
    id: usize,
    rng: Rng,
    seq: u64,
    model: HashMap<String, Value>,
    tally: Tally,
}

/// Requests and the replies they must get, given the model before them.
struct Op {
    requests: Vec<Vec<String>>,
    replies: Vec<Expect>,
}

impl Op {
    fn one(args: &[&str], expect: Expect) -> Op {
        Op {
            requests: vec![args.iter().map(|a| a.to_string()).collect()],
            replies: vec![expect],
        }
    }
}

enum Expect {
    Exact(Vec<u8>),
    /// `HGETALL`: field/value pairs in any order.
    Pairs(BTreeMap<String, String>),
}

impl Client {
    fn key(&self, i: usize) -> String {
        format!("c{}-k{i}", self.id)
    }

    fn value(&mut self) -> String {
        self.seq += 1;
        let base = format!("{}/c{}/{}", self.user.project, self.id, self.seq);
        // Some values are long and repetitive, so they are compressed.
        match self.rng.below(4) {
            0 => base.repeat(12),
            _ => base,
        }
    }

    /// A random operation on a random key; the model moves to the state
    /// after it.
    fn next_op(&mut self) -> Op {
        let i = self.rng.below(KEYS);
        let key = self.key(i);
        let current = self.model.get(&key).cloned();
        let choice = self.rng.below(4);
        match i % 4 {
            0 => self.string_op(key, current, choice),
            1 => self.hash_op(key, current, choice),
            2 => self.list_op(key, current, choice),
            _ => self.counter_op(key, current, choice),
        }
    }

    fn string_op(&mut self, key: String, current: Option<Value>, choice: usize) -> Op {
        let held = match current {
            Some(Value::Str(v)) => Some(v),
            _ => None,
        };
        match choice {
            0 | 1 => {
                let v = self.value();
                self.model.insert(key.clone(), Value::Str(v.clone()));
                Op::one(&["SET", &key, &v], Expect::Exact(b"+OK\r\n".to_vec()))
            }
            2 => Op::one(&["GET", &key], Expect::Exact(nullable(held.as_deref()))),
            _ => {
                // A transaction, whose reply inside EXEC is opened.
                let v = self.value();
                self.model.insert(key.clone(), Value::Str(v.clone()));
                let mut exec = b"*2\r\n+OK\r\n".to_vec();
                exec.extend(bulk(&v));
                let text = |words: &[&str]| words.iter().map(|w| w.to_string()).collect();
                Op {
                    requests: vec![
                        text(&["MULTI"]),
                        text(&["SET", &key, &v]),
                        text(&["GET", &key]),
                        text(&["EXEC"]),
                    ],
                    replies: vec![
                        Expect::Exact(b"+OK\r\n".to_vec()),
                        Expect::Exact(b"+QUEUED\r\n".to_vec()),
                        Expect::Exact(b"+QUEUED\r\n".to_vec()),
                        Expect::Exact(exec),
                    ],
                }
            }
        }
    }

    fn hash_op(&mut self, key: String, current: Option<Value>, choice: usize) -> Op {
        let mut fields = match current {
            Some(Value::Hash(h)) => h,
            _ => BTreeMap::new(),
        };
        let field = format!("f{}", self.rng.below(5));
        match choice {
            0 | 1 => {
                let v = self.value();
                let new = fields.insert(field.clone(), v.clone()).is_none();
                self.model.insert(key.clone(), Value::Hash(fields));
                let added = format!(":{}\r\n", u8::from(new)).into_bytes();
                Op::one(&["HSET", &key, &field, &v], Expect::Exact(added))
            }
            2 => {
                let held = nullable(fields.get(&field).map(String::as_str));
                Op::one(&["HGET", &key, &field], Expect::Exact(held))
            }
            _ => Op::one(&["HGETALL", &key], Expect::Pairs(fields)),
        }
    }

    fn list_op(&mut self, key: String, current: Option<Value>, choice: usize) -> Op {
        let mut list = match current {
            Some(Value::List(l)) => l,
            _ => VecDeque::new(),
        };
        match choice {
            0 | 1 if list.len() < 20 => {
                let v = self.value();
                list.push_back(v.clone());
                let len = list.len();
                self.model.insert(key.clone(), Value::List(list));
                let len = format!(":{len}\r\n").into_bytes();
                Op::one(&["RPUSH", &key, &v], Expect::Exact(len))
            }
            2 => {
                let mut reply = format!("*{}\r\n", list.len()).into_bytes();
                for v in &list {
                    reply.extend(bulk(v));
                }
                Op::one(&["LRANGE", &key, "0", "-1"], Expect::Exact(reply))
            }
            _ => {
                let popped = list.pop_front();
                if list.is_empty() {
                    self.model.remove(&key);
                } else {
                    self.model.insert(key.clone(), Value::List(list));
                }
                Op::one(&["LPOP", &key], Expect::Exact(nullable(popped.as_deref())))
            }
        }
    }

    fn counter_op(&mut self, key: String, current: Option<Value>, choice: usize) -> Op {
        let n = match current {
            Some(Value::Counter(n)) => Some(n),
            _ => None,
        };
        match choice {
            0 | 1 => {
                let by = self.rng.below(100) as i64 + 1;
                let now = n.unwrap_or(0) + by;
                self.model.insert(key.clone(), Value::Counter(now));
                let now = format!(":{now}\r\n").into_bytes();
                Op::one(&["INCRBY", &key, &by.to_string()], Expect::Exact(now))
            }
            2 => {
                let held = nullable(n.map(|n| n.to_string()).as_deref());
                Op::one(&["GET", &key], Expect::Exact(held))
            }
            _ => {
                self.model.remove(&key);
                let deleted = format!(":{}\r\n", u8::from(n.is_some())).into_bytes();
                Op::one(&["DEL", &key], Expect::Exact(deleted))
            }
        }
    }

    /// Sends a pipeline of operations and checks every reply.
    fn round(&mut self, c: &mut Raw) {
        let ops: Vec<Op> = (0..1 + self.rng.below(20))
            .map(|_| self.next_op())
            .collect();
        let mut batch = Vec::new();
        for request in ops.iter().flat_map(|op| &op.requests) {
            let args: Vec<&str> = request.iter().map(String::as_str).collect();
            batch.extend(Raw::encode(&args));
        }
        c.send_bytes(&batch);

        for op in ops {
            for (request, expect) in op.requests.iter().zip(&op.replies) {
                let reply = c.reply();
                match expect {
                    Expect::Exact(expected) => self.check(reply, expected, request),
                    Expect::Pairs(_) if reply.first() == Some(&b'-') => {
                        self.check(reply, b"", request)
                    }
                    Expect::Pairs(expected) => {
                        assert_eq!(&pairs(&reply), expected, "{}: {request:?}", self.user.name)
                    }
                }
                self.tally.ops += 1;
            }
        }
    }

    fn check(&mut self, reply: Vec<u8>, expected: &[u8], args: &[String]) {
        if reply.first() == Some(&b'-') {
            eprintln!(
                "soak: {} got {}",
                self.user.name,
                String::from_utf8_lossy(&reply)
            );
            self.tally.errors += 1;
            return;
        }
        assert_eq!(
            String::from_utf8_lossy(&reply),
            String::from_utf8_lossy(expected),
            "{}: {args:?}",
            self.user.name
        );
    }
}

fn nullable(value: Option<&str>) -> Vec<u8> {
    value.map_or_else(|| b"$-1\r\n".to_vec(), bulk)
}

/// The field/value pairs of a RESP2 `HGETALL` reply.
fn pairs(reply: &[u8]) -> BTreeMap<String, String> {
    use redis_protocol::resp2::decode::decode_bytes;
    use redis_protocol::resp2::types::BytesFrame;
    let Ok(Some((BytesFrame::Array(items), _))) = decode_bytes(&Bytes::copy_from_slice(reply))
    else {
        panic!("an HGETALL reply: {}", String::from_utf8_lossy(reply));
    };
    let text = |f: &BytesFrame| match f {
        BytesFrame::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        other => panic!("a bulk string, not {other:?}"),
    };
    items
        .chunks(2)
        .map(|pair| (text(&pair[0]), text(&pair[1])))
        .collect()
}

/// Reads back one key through the proxy as its model says it must be.
fn verify(c: &mut Raw, user: &User, key: &str, value: &Value) {
    let context = format!("{} {key}", user.name);
    match value {
        Value::Str(v) => assert_eq!(c.cmd(&["GET", key]), bulk(v), "{context}"),
        Value::Counter(n) => assert_eq!(c.cmd(&["GET", key]), bulk(&n.to_string()), "{context}"),
        Value::Hash(h) => assert_eq!(&pairs(&c.cmd(&["HGETALL", key])), h, "{context}"),
        Value::List(l) => {
            let mut expected = format!("*{}\r\n", l.len()).into_bytes();
            for v in l {
                expected.extend(bulk(v));
            }
            assert_eq!(c.cmd(&["LRANGE", key, "0", "-1"]), expected, "{context}");
        }
    }
}

#[test]
fn mixed_load_through_rotation_reload_and_a_killed_client_loses_nothing() {
    let secs = std::env::var("REDCLOAK_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SOAK_SECS);
    let redis = Redis::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let keyring = dir.path().join("keyring.json");
    Keyring::generate(&keyring).expect("a fresh keyring");
    let encryption = format!(
        "enabled = true\nkeyring = \"{}\"\ncompression_threshold = 64\n",
        keyring.display()
    );
    let proxy = Proxy::start_toml(&config_toml_with(redis.port, USERS, "", &encryption));
    let port = proxy.port;
    let stop = Arc::new(AtomicBool::new(false));

    let workers: Vec<_> = [&ALICE, &BOB]
        .into_iter()
        .flat_map(|user| (0..CLIENTS).map(move |id| (user, id)))
        .map(|(user, id)| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut c = Raw::connect(port);
                assert_eq!(c.cmd(&["AUTH", user.name, user.password]), b"+OK\r\n");
                let seed =
                    0x9e37_79b9_7f4a_7c15 ^ ((id as u64 + 1) * 7919) ^ user.name.len() as u64;
                let mut client = Client {
                    user,
                    id,
                    rng: Rng(seed),
                    seq: 0,
                    model: HashMap::new(),
                    tally: Tally::default(),
                };
                while !stop.load(Ordering::Relaxed) {
                    client.round(&mut c);
                }
                (user, client.model, client.tally)
            })
        })
        .collect();

    // The faults, spread over the run.
    let started = Instant::now();
    let at = |fraction: f64| Duration::from_secs_f64(secs as f64 * fraction);
    let sleep_until = |t: Duration| std::thread::sleep(t.saturating_sub(started.elapsed()));
    let mut rotations = 0;
    let mut reloads = 0;
    let mut rotate_then_reload = |from: f64| {
        sleep_until(at(from));
        Keyring::rotate(&keyring).expect("rotating the keyring");
        rotations += 1;
        proxy.signal("HUP");
        // A reload with nothing changed, a little later.
        sleep_until(at(from + 0.1));
        proxy.signal("HUP");
        reloads += 2;
    };

    sleep_until(at(0.15));
    let mut doomed = Command::new("redis-cli")
        .args([
            "-p",
            &port.to_string(),
            "--user",
            "alice",
            "--pass",
            "alice-pw",
        ])
        .args(["--no-auth-warning", "-r", "-1", "INCR", "killed:counter"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-cli must be installed (apt-get install redis-tools)");
    rotate_then_reload(0.25);
    sleep_until(at(0.45));
    doomed.kill().expect("killing the client process");
    doomed.wait().expect("reaping the killed client");
    rotate_then_reload(0.5);
    rotate_then_reload(0.75);
    sleep_until(at(1.0));
    stop.store(true, Ordering::Relaxed);

    let mut total = Tally::default();
    let mut models = Vec::new();
    for worker in workers {
        let (user, model, tally) = worker.join().expect("every reply was right or an error");
        total.ops += tally.ops;
        total.errors += tally.errors;
        models.push((user, model));
    }
    let elapsed = started.elapsed();

    // Every acknowledged write reads back, through fresh connections.
    let mut keys_per_project: BTreeMap<&str, usize> = BTreeMap::new();
    for (user, model) in &models {
        let mut c = proxy.login(user);
        for (key, value) in model {
            verify(&mut c, user, key, value);
        }
        *keys_per_project.entry(user.project).or_default() += model.len();
    }
    let killed = proxy.login(&ALICE).cmd(&["GET", "killed:counter"]);
    assert!(killed.starts_with(b"$"), "the killed client had written");

    // Upstream, every key is in one of the two namespaces, values are
    // sealed, and each namespace holds exactly its project's keys.
    let mut direct = redis.direct();
    let mut upstream: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let prefixes = [
        (ALICE.project, upstream_prefix(ALICE.project)),
        (BOB.project, upstream_prefix(BOB.project)),
    ];
    for key in key_list(&mut direct) {
        let (project, prefix) = prefixes
            .iter()
            .find(|(_, prefix)| key.starts_with(prefix.as_str()))
            .unwrap_or_else(|| panic!("{key} is outside both namespaces"));
        upstream
            .entry(project.to_string())
            .or_default()
            .insert(key[prefix.len()..].to_owned());
        if direct.cmd(&["TYPE", &key]) == b"+string\r\n" {
            let raw = direct.cmd(&["GET", &key]);
            let body = &raw[raw.iter().position(|&b| b == b'\n').map_or(0, |p| p + 1)..];
            let sealed = body.starts_with(&[0x00, 0x52, 0x43, 0x01]);
            let counter = body.iter().take_while(|b| b.is_ascii_digit()).count() + 2 == body.len();
            assert!(sealed || counter, "{key} holds a plain value");
        }
    }
    for (project, count) in &keys_per_project {
        let stored = upstream.get(*project).map_or(0, |keys| {
            keys.iter()
                .filter(|k| k.as_str() != "killed:counter")
                .count()
        });
        assert_eq!(stored, *count, "keys of {project} upstream");
    }

    println!(
        "soak: {:.1}s, {} clients in 2 projects, {} ops ({:.0}/s), {} errors, \
         {rotations} key rotations, {reloads} SIGHUPs, 1 client process killed; \
         {keys_per_project:?} keys verified",
        elapsed.as_secs_f64(),
        CLIENTS * 2,
        total.ops,
        total.ops as f64 / elapsed.as_secs_f64(),
        total.errors
    );
    assert_eq!(total.errors, 0, "error replies during the soak");
    assert!(!logs_show_a_panic(&proxy.logs()));
}

/// Every key in the upstream's database 0.
fn key_list(direct: &mut Raw) -> Vec<String> {
    use redis_protocol::resp2::decode::decode_bytes;
    use redis_protocol::resp2::types::BytesFrame;
    let reply = direct.cmd(&["KEYS", "*"]);
    let Ok(Some((BytesFrame::Array(items), _))) = decode_bytes(&Bytes::from(reply)) else {
        panic!("a KEYS reply");
    };
    items
        .into_iter()
        .map(|item| match item {
            BytesFrame::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            other => panic!("a key, not {other:?}"),
        })
        .collect()
}
