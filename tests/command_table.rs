//! Checks the command table against a live `redis-server`: the same
//! commands and subcommands, the same arities, the same key specifications,
//! and the same keys as `COMMAND GETKEYS` for sample requests.
//!
//! The server is started on a free port for each test and killed when the
//! test ends. Without `redis-server` on `PATH` the tests fail: CI installs it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redcloak::command::{self, BeginSearch, CommandSpec, FindKeys, KeySpec};

/// Subcommands the proxy answers although Redis 7.0 lacks them (they came
/// with Redis 7.2, and client libraries send them during their handshake).
const PROXY_ONLY: &[&str] = &["client|no-touch", "client|setinfo"];

/// A `redis-server` child process, killed on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    /// Starts a server on a free port and connects to it. Other tests pick
    /// free ports at the same moment, so a server that answers on the port
    /// must prove it is this child (by its process id) before it is used.
    fn start_and_connect() -> (Server, Client) {
        for _ in 0..20 {
            let mut server = Server::spawn();
            if let Some(client) = server.connect() {
                return (server, client);
            }
        }
        panic!("could not start redis-server on a free port");
    }

    fn spawn() -> Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("the test can bind a local port")
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): it must be on PATH to run this test")
            });
        Server { child, port }
    }

    /// A client of this server, or `None` if it did not come up on its
    /// port (taken by someone else meanwhile).
    fn connect(&mut self) -> Option<Client> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let own_pid = format!("process_id:{}", self.child.id());
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return None;
            }
            if let Ok(stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                let mut client = Client {
                    reader: BufReader::new(stream),
                };
                let info = client.call(&[b"INFO", b"server"]);
                return matches!(&info, Value::Bulk(text) if String::from_utf8_lossy(text).contains(&own_pid))
                    .then_some(client);
            }
            sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One RESP2 reply.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Vec<u8>),
    Array(Vec<Value>),
    Null,
}

impl Value {
    fn text(&self) -> String {
        match self {
            Value::Simple(s) | Value::Error(s) => s.clone(),
            Value::Bulk(b) => String::from_utf8_lossy(b).into_owned(),
            other => panic!("expected a string, got {other:?}"),
        }
    }

    fn int(&self) -> i64 {
        match self {
            Value::Integer(i) => *i,
            other => panic!("expected an integer, got {other:?}"),
        }
    }

    fn items(&self) -> &[Value] {
        match self {
            Value::Array(items) => items,
            other => panic!("expected an array, got {other:?}"),
        }
    }

    /// A RESP3 map as RESP2 sends it: a flat array of name/value pairs.
    fn field(&self, name: &str) -> &Value {
        self.items()
            .chunks(2)
            .find(|pair| pair[0].text() == name)
            .map(|pair| &pair[1])
            .unwrap_or_else(|| panic!("no field {name} in {self:?}"))
    }
}

/// A blocking RESP2 client, just enough for `COMMAND`.
struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    fn call(&mut self, args: &[&[u8]]) -> Value {
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg);
            request.extend_from_slice(b"\r\n");
        }
        self.reader
            .get_mut()
            .write_all(&request)
            .expect("redis-server accepts the request");
        self.read()
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .expect("redis-server replies");
        let line = line.trim_end_matches("\r\n");
        let (kind, rest) = line.split_at(1);
        let number = || rest.parse::<i64>().expect("a RESP length or integer");
        match kind {
            "+" => Value::Simple(rest.to_owned()),
            "-" => Value::Error(rest.to_owned()),
            ":" => Value::Integer(number()),
            "$" if number() < 0 => Value::Null,
            "$" => {
                let mut body = vec![0; number() as usize + 2];
                self.reader
                    .read_exact(&mut body)
                    .expect("a whole bulk string");
                body.truncate(body.len() - 2);
                Value::Bulk(body)
            }
            "*" if number() < 0 => Value::Null,
            "*" => Value::Array((0..number()).map(|_| self.read()).collect()),
            _ => panic!("unexpected RESP line {line:?}"),
        }
    }
}

/// What the server says about one command or subcommand.
struct ServerCommand {
    arity: i32,
    /// Key specifications, without those flagged `not_key` and those of
    /// type `unknown`, which the table does not carry.
    keys: Vec<KeySpec>,
}

/// Every command and subcommand the server knows, by `name` or
/// `container|sub`.
fn server_commands(client: &mut Client) -> BTreeMap<String, ServerCommand> {
    let mut all = BTreeMap::new();
    for entry in client.call(&[b"COMMAND"]).items() {
        add_command(&mut all, entry);
        for sub in entry.items()[9].items() {
            add_command(&mut all, sub);
        }
    }
    all
}

fn add_command(all: &mut BTreeMap<String, ServerCommand>, entry: &Value) {
    let fields = entry.items();
    let keys = fields[8].items().iter().filter_map(key_spec).collect();
    let arity = i32::try_from(fields[1].int()).expect("arity fits i32");
    all.insert(fields[0].text(), ServerCommand { arity, keys });
}

fn key_spec(spec: &Value) -> Option<KeySpec> {
    let flags = spec.field("flags").items();
    if flags.iter().any(|f| f.text() == "not_key") {
        return None;
    }
    let begin = spec.field("begin_search");
    let find = spec.field("find_keys");
    let int = |v: &Value, name: &str| v.field("spec").field(name).int();

    let begin = match begin.field("type").text().as_str() {
        "index" => BeginSearch::Index(int(begin, "index") as usize),
        "keyword" => BeginSearch::Keyword {
            keyword: static_keyword(&begin.field("spec").field("keyword").text()),
            start_from: int(begin, "startfrom") as isize,
        },
        "unknown" => return None,
        other => panic!("unexpected begin_search type {other}"),
    };
    let find = match find.field("type").text().as_str() {
        "range" => FindKeys::Range {
            last_key: int(find, "lastkey") as isize,
            step: int(find, "keystep") as usize,
            limit: int(find, "limit") as usize,
        },
        "keynum" => FindKeys::KeyNum {
            key_num_idx: int(find, "keynumidx") as usize,
            first_key: int(find, "firstkey") as usize,
            step: int(find, "keystep") as usize,
        },
        "unknown" => return None,
        other => panic!("unexpected find_keys type {other}"),
    };
    Some(KeySpec { begin, find })
}

/// `BeginSearch::Keyword` holds a `&'static str`; the test leaks the few
/// keywords the server names.
fn static_keyword(keyword: &str) -> &'static str {
    Box::leak(keyword.to_owned().into_boxed_str())
}

/// Every row of the table, by `name` or `container|sub`.
fn table_commands() -> BTreeMap<String, &'static CommandSpec> {
    let mut all = BTreeMap::new();
    for spec in command::commands() {
        all.insert(spec.name.to_owned(), spec);
        for sub in spec.subcommands {
            all.insert(format!("{}|{}", spec.name, sub.name), sub);
        }
    }
    all
}

fn server_version(client: &mut Client) -> String {
    let info = client.call(&[b"INFO", b"server"]).text();
    info.lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("unknown")
        .to_owned()
}

#[test]
fn the_table_has_exactly_the_servers_commands() {
    let (_server, mut client) = Server::start_and_connect();
    let version = server_version(&mut client);
    let on_server = server_commands(&mut client);
    let in_table = table_commands();

    let missing: Vec<_> = on_server
        .keys()
        .filter(|name| !in_table.contains_key(*name))
        .collect();
    let extra: Vec<_> = in_table
        .keys()
        .filter(|name| !on_server.contains_key(*name) && !PROXY_ONLY.contains(&name.as_str()))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "redis {version}: missing from the table {missing:?}, unknown to the server {extra:?}"
    );
}

#[test]
fn arities_agree_with_the_server() {
    let (_server, mut client) = Server::start_and_connect();
    let on_server = server_commands(&mut client);

    let wrong: Vec<_> = table_commands()
        .into_iter()
        .filter_map(|(name, spec)| {
            let theirs = on_server.get(&name)?.arity;
            (theirs != spec.arity).then(|| format!("{name}: table {} server {theirs}", spec.arity))
        })
        .collect();
    assert!(wrong.is_empty(), "arity differs: {wrong:#?}");
}

#[test]
fn key_specifications_agree_with_the_server() {
    let (_server, mut client) = Server::start_and_connect();
    let on_server = server_commands(&mut client);

    let wrong: Vec<_> = table_commands()
        .into_iter()
        .filter_map(|(name, spec)| {
            let theirs = &on_server.get(&name)?.keys;
            (theirs.as_slice() != spec.keys)
                .then(|| format!("{name}: table {:?} server {theirs:?}", spec.keys))
        })
        .collect();
    assert!(wrong.is_empty(), "key specifications differ: {wrong:#?}");
}

/// Sample requests, each well formed, so that Redis's key search and the
/// table's agree (they differ only on requests the upstream rejects).
const SAMPLES: &[&[&str]] = &[
    &["GET", "a"],
    &["set", "a", "v", "GET", "EX", "10"],
    &["mset", "a", "1", "b", "2", "c", "3"],
    &["mget", "a", "b", "a"],
    &["del", "a", "b"],
    &["exists", "a"],
    &["lcs", "a", "b", "IDX", "MINMATCHLEN", "2"],
    &["bitop", "AND", "d", "a", "b"],
    &["bitfield", "a", "GET", "u8", "0"],
    &["hset", "h", "f", "v", "g", "w"],
    &["blpop", "a", "b", "0"],
    &["brpoplpush", "a", "b", "0"],
    &["blmove", "a", "b", "LEFT", "RIGHT", "0"],
    &["lmpop", "2", "a", "b", "LEFT", "COUNT", "2"],
    &["blmpop", "0", "2", "a", "b", "RIGHT"],
    &["bzmpop", "1", "1", "z", "MIN"],
    &["bzpopmin", "a", "b", "1"],
    &["sdiffstore", "d", "a", "b"],
    &["sintercard", "2", "a", "b", "LIMIT", "1"],
    &["smove", "a", "b", "m"],
    &["zunionstore", "d", "2", "a", "b", "WEIGHTS", "1", "2"],
    &["zinterstore", "d", "1", "a"],
    &["zdiff", "2", "a", "b", "WITHSCORES"],
    &["zrangestore", "d", "a", "0", "-1"],
    &["zmpop", "1", "z", "MAX"],
    &[
        "xread", "COUNT", "1", "BLOCK", "0", "STREAMS", "a", "b", "0", "0",
    ],
    &["xread", "STREAMS", "streams", "0"],
    &[
        "xreadgroup",
        "GROUP",
        "g",
        "c",
        "COUNT",
        "1",
        "STREAMS",
        "a",
        ">",
    ],
    &["xreadgroup", "GROUP", "g", "STREAMS", "STREAMS", "s", ">"],
    &["xgroup", "CREATE", "s", "g", "$", "MKSTREAM"],
    &["xinfo", "STREAM", "s", "FULL"],
    &["object", "ENCODING", "a"],
    &["memory", "usage", "a"],
    &["georadius", "k", "0", "0", "1", "km"],
    &[
        "georadius",
        "k",
        "0",
        "0",
        "1",
        "km",
        "COUNT",
        "3",
        "STORE",
        "d",
    ],
    &["georadius", "k", "0", "0", "1", "km", "STOREDIST", "d"],
    &["georadiusbymember", "k", "m", "1", "km", "STORE", "d"],
    &[
        "geosearchstore",
        "d",
        "k",
        "FROMMEMBER",
        "m",
        "BYRADIUS",
        "1",
        "km",
    ],
    &["pfmerge", "d", "a", "b"],
    &["pfcount", "a", "b"],
    &["copy", "a", "b", "REPLACE"],
    &["rename", "a", "b"],
    &["sort", "k"],
    &[
        "sort", "k", "BY", "w_*", "LIMIT", "0", "5", "GET", "#", "ALPHA", "STORE", "d",
    ],
    &["sort", "k", "GET", "store", "STORE", "d"],
    &["sort_ro", "k", "BY", "w_*", "GET", "o_*"],
    &["eval", "return 1", "2", "a", "b", "arg"],
    &["fcall_ro", "f", "1", "a"],
    &["watch", "a", "b"],
    &["touch", "a"],
    &["restore", "a", "0", "payload", "REPLACE"],
    &["migrate", "h", "6379", "k", "0", "5000"],
];

#[test]
fn key_indexes_agree_with_command_getkeys() {
    let (_server, mut client) = Server::start_and_connect();

    for sample in SAMPLES {
        let args: Vec<Bytes> = sample
            .iter()
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect();
        let spec = command::lookup(&args).unwrap_or_else(|e| panic!("{sample:?}: {e}"));
        let mut indexes = Vec::new();
        command::key_indexes(spec, &args, &mut indexes);
        let ours: Vec<String> = indexes.iter().map(|&i| sample[i].to_owned()).collect();

        let mut request: Vec<&[u8]> = vec![b"COMMAND", b"GETKEYS"];
        request.extend(sample.iter().map(|a| a.as_bytes()));
        let theirs: Vec<String> = match client.call(&request) {
            Value::Array(keys) => keys.iter().map(Value::text).collect(),
            other => panic!("{sample:?}: COMMAND GETKEYS answered {other:?}"),
        };
        assert_eq!(ours, theirs, "keys of {sample:?}");
    }
}

#[test]
fn commands_without_keys_have_none_for_the_server_either() {
    let (_server, mut client) = Server::start_and_connect();

    for sample in [
        &["echo", "a"][..],
        &["scan", "0", "MATCH", "a*"],
        &["keys", "*"],
    ] {
        let args: Vec<Bytes> = sample.iter().map(|a| Bytes::from(a.to_string())).collect();
        let spec = command::lookup(&args).expect("known command");
        let mut indexes = Vec::new();
        command::key_indexes(spec, &args, &mut indexes);
        assert!(indexes.is_empty(), "{sample:?}");

        let mut request: Vec<&[u8]> = vec![b"COMMAND", b"GETKEYS"];
        request.extend(sample.iter().map(|a| a.as_bytes()));
        assert_eq!(
            client.call(&request),
            Value::Error("ERR The command has no key arguments".into()),
            "{sample:?}"
        );
    }
}
