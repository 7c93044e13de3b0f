//! Shared upstream links: many sessions' requests travel over one
//! connection to Redis, and every reply still reaches the request it
//! answers, across projects, pipelines and moves to a session's own link.

mod common;

use std::time::Duration;

use common::*;

/// A small deterministic generator, so that a failure can be replayed.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, sides: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % sides
    }
}

/// A request and the exact reply it must get.
struct Step {
    args: Vec<String>,
    expected: Vec<u8>,
}

fn step(args: &[&str], expected: Vec<u8>) -> Step {
    Step {
        args: args.iter().map(|a| a.to_string()).collect(),
        expected,
    }
}

fn integer(n: i64) -> Vec<u8> {
    format!(":{n}\r\n").into_bytes()
}

/// One client's run: pipelines of stateless requests mixed with the
/// requests that move a session to its own link (a transaction, a watch, a
/// blocking pop), each pipeline written at once and every reply checked.
/// Keys are the client's own, but the same names in every project.
fn interleave(port: u16, user: &User, client: u64, rounds: usize) -> usize {
    let mut c = Raw::connect(port);
    assert_eq!(c.cmd(&["AUTH", user.name, user.password]), b"+OK\r\n");
    let mut dice = Dice(0x9E37_79B9_7F4A_7C15 ^ (client + 1));
    let mut values: Vec<Option<String>> = vec![None; 8];
    let mut counter = 0i64;
    let mut checked = 0;
    let counter_key = format!("c{client}:n");
    for round in 0..rounds {
        let mut steps = Vec::new();
        for i in 0..1 + dice.roll(24) {
            let slot = dice.roll(values.len() as u64) as usize;
            let key = format!("c{client}:k{slot}");
            match dice.roll(10) {
                0..=2 => {
                    let value = format!("{}-{client}-{round}-{i}", user.name);
                    steps.push(step(&["SET", &key, &value], b"+OK\r\n".to_vec()));
                    values[slot] = Some(value);
                }
                3..=5 => {
                    let expected = match &values[slot] {
                        Some(value) => bulk(value),
                        None => b"$-1\r\n".to_vec(),
                    };
                    steps.push(step(&["GET", &key], expected));
                }
                6 => {
                    counter += 1;
                    steps.push(step(&["INCR", &counter_key], integer(counter)));
                }
                7 => {
                    // A transaction on the session's own link, between
                    // shared requests on both sides.
                    counter += 1;
                    let value = format!("tx-{client}-{round}-{i}");
                    steps.push(step(&["MULTI"], b"+OK\r\n".to_vec()));
                    steps.push(step(&["SET", &key, &value], b"+QUEUED\r\n".to_vec()));
                    steps.push(step(&["INCR", &counter_key], b"+QUEUED\r\n".to_vec()));
                    let mut exec = b"*2\r\n+OK\r\n".to_vec();
                    exec.extend(integer(counter));
                    steps.push(step(&["EXEC"], exec));
                    values[slot] = Some(value);
                }
                8 => {
                    let list = format!("c{client}:empty");
                    steps.push(step(&["BLPOP", &list, "0.01"], b"*-1\r\n".to_vec()));
                }
                _ => {
                    // A watch that nothing breaks, so its transaction runs.
                    counter += 1;
                    steps.push(step(&["WATCH", &key], b"+OK\r\n".to_vec()));
                    steps.push(step(&["MULTI"], b"+OK\r\n".to_vec()));
                    steps.push(step(&["INCR", &counter_key], b"+QUEUED\r\n".to_vec()));
                    let mut exec = b"*1\r\n".to_vec();
                    exec.extend(integer(counter));
                    steps.push(step(&["EXEC"], exec));
                }
            }
        }
        let mut batch = Vec::new();
        for s in &steps {
            let args: Vec<&str> = s.args.iter().map(String::as_str).collect();
            batch.extend(Raw::encode(&args));
        }
        c.send_bytes(&batch);
        for s in &steps {
            let reply = c.reply();
            assert!(
                reply == s.expected,
                "client {client} ({}), round {round}: {:?} got {:?}, expected {:?}",
                user.name,
                s.args,
                String::from_utf8_lossy(&reply),
                String::from_utf8_lossy(&s.expected)
            );
            checked += 1;
        }
    }
    checked
}

#[test]
fn interleaved_sessions_of_two_projects_each_get_exactly_their_replies() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let port = proxy.port;
    let clients: Vec<_> = (0..24u64)
        .map(|client| {
            let user = if client % 2 == 0 { ALICE } else { BOB };
            std::thread::spawn(move || interleave(port, &user, client / 2, 60))
        })
        .collect();
    let checked: usize = clients
        .into_iter()
        .map(|c| c.join().expect("every reply was the right one"))
        .sum();
    println!("{checked} replies checked across 24 interleaved sessions");
    assert!(!logs_show_a_panic(&proxy.logs()));
}

#[test]
fn interleaving_holds_over_several_workers_and_shared_links() {
    let redis = Redis::start();
    let toml = with_upstream(
        &config_toml(redis.port, USERS, "workers = 2"),
        "shared_links = 3",
    );
    let proxy = Proxy::start_toml(&toml);
    let port = proxy.port;
    let clients: Vec<_> = (0..12u64)
        .map(|client| {
            let user = if client % 2 == 0 { ALICE } else { BOB };
            std::thread::spawn(move || interleave(port, &user, client / 2, 40))
        })
        .collect();
    for c in clients {
        c.join().expect("every reply was the right one");
    }
}

/// Clients connected to Redis, as it counts them.
fn upstream_clients(redis: &Redis) -> usize {
    let info = redis.direct().cmd(&["INFO", "clients"]);
    String::from_utf8_lossy(&info)
        .lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("INFO clients counts connected clients")
}

#[test]
fn stateless_sessions_share_a_connection_and_stateful_ones_get_their_own() {
    let redis = Redis::start();
    let proxy = Proxy::start_with(redis.port, USERS, "workers = 2");
    let before = upstream_clients(&redis);

    let mut sessions: Vec<Raw> = (0..40).map(|_| proxy.login(&ALICE)).collect();
    for (i, c) in sessions.iter_mut().enumerate() {
        let key = format!("k{i}");
        assert_eq!(c.cmd(&["SET", &key, "v"]), b"+OK\r\n");
        assert_eq!(c.cmd(&["GET", &key]), bulk("v"));
    }
    let shared = upstream_clients(&redis) - before;
    println!("40 sessions after SET/GET: {shared} upstream connection(s)");
    assert_eq!(
        shared, 2,
        "each worker's one shared link carries its sessions' stateless requests"
    );

    // A transaction needs a connection of its own, kept by the session.
    assert_eq!(sessions[0].cmd(&["MULTI"]), b"+OK\r\n");
    assert_eq!(sessions[0].cmd(&["INCR", "n"]), b"+QUEUED\r\n");
    assert_eq!(sessions[0].cmd(&["EXEC"]), b"*1\r\n:1\r\n");
    assert_eq!(upstream_clients(&redis) - before, 3);

    // A blocking command must not hold up the shared link: others go on
    // while it waits.
    let mut blocked = proxy.login(&BOB);
    blocked.send(&["BLPOP", "queue", "5"]);
    std::thread::sleep(Duration::from_millis(100));
    for c in sessions.iter_mut().skip(1).take(5) {
        assert_eq!(c.cmd(&["GET", "k1"]), bulk("v"));
    }
    let mut pusher = proxy.login(&BOB);
    assert_eq!(pusher.cmd(&["RPUSH", "queue", "job"]), b":1\r\n");
    assert_eq!(blocked.reply(), b"*2\r\n$5\r\nqueue\r\n$3\r\njob\r\n");
}

#[test]
fn a_session_moving_to_its_own_link_keeps_its_requests_in_order() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.login(&ALICE);
    // Each pipeline writes over the shared link, then reads inside a
    // transaction on the session's own link, then again over the shared
    // link: Redis must see them in the order they were sent.
    for round in 0..200 {
        let before = round.to_string();
        let after = format!("{round}-after");
        let mut batch = Raw::encode(&["SET", "order", &before]);
        batch.extend(Raw::encode(&["MULTI"]));
        batch.extend(Raw::encode(&["GET", "order"]));
        batch.extend(Raw::encode(&["SET", "order", &after]));
        batch.extend(Raw::encode(&["EXEC"]));
        batch.extend(Raw::encode(&["GET", "order"]));
        c.send_bytes(&batch);
        assert_eq!(c.reply(), b"+OK\r\n");
        assert_eq!(c.reply(), b"+OK\r\n");
        assert_eq!(c.reply(), b"+QUEUED\r\n");
        assert_eq!(c.reply(), b"+QUEUED\r\n");
        let mut exec = b"*2\r\n".to_vec();
        exec.extend(bulk(&before));
        exec.extend(b"+OK\r\n");
        assert_eq!(c.reply(), exec, "round {round}");
        assert_eq!(c.reply(), bulk(&after), "round {round}");
    }
}

#[test]
fn with_sharing_off_every_session_has_its_own_connection() {
    let redis = Redis::start();
    let toml = with_upstream(&config_toml(redis.port, USERS, ""), "shared_links = 0");
    let proxy = Proxy::start_toml(&toml);
    let before = upstream_clients(&redis);
    let mut sessions: Vec<Raw> = (0..5).map(|_| proxy.login(&ALICE)).collect();
    for c in &mut sessions {
        assert_eq!(c.cmd(&["SET", "k", "v"]), b"+OK\r\n");
    }
    assert_eq!(upstream_clients(&redis) - before, 5);
}
