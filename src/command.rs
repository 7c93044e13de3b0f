//! The command table: one entry per Redis command, as data.
//!
//! The session looks every request up here and builds its plan from the
//! entry alone: where the keys are (prefix them), which arguments are values
//! (seal them), what the reply holds (open values, unprefix keys), whether
//! the command reads or writes, and whether it is forwarded, answered by the
//! proxy, or refused. A command that is not in the table is refused.
//!
//! Key positions follow Redis 7's own key specifications (`COMMAND INFO`),
//! so the table can be checked against a live server.

use std::sync::LazyLock;

use bytes::Bytes;
use foldhash::HashMap;

mod table;

/// What a command does to the data, for permission checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Touches no project data (`PING`, `ECHO`, `HELLO`): any user.
    Connection,
    /// Reads project data: every user.
    Read,
    /// Writes project data: `readwrite` and `admin` users.
    Write,
    /// A project-scoped administrative emulation: `admin` users only.
    Admin,
}

/// Where a key specification starts looking for keys (Redis `begin_search`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BeginSearch {
    /// Keys start at this argument index (0 is the command name).
    Index(usize),
    /// Keys start after this keyword, searched from `start_from` (negative:
    /// counted from the end, searching backwards).
    Keyword {
        keyword: &'static str,
        start_from: isize,
    },
}

/// How many keys follow the start (Redis `find_keys`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FindKeys {
    /// Keys from the start to `last_key` (relative to the start; negative
    /// counts from the end), every `step` arguments. With `last_key == -1`,
    /// a non-zero `limit` keeps only `1/limit` of the remaining arguments
    /// (`XREAD … STREAMS k1 k2 id1 id2` has limit 2).
    Range {
        last_key: isize,
        step: usize,
        limit: usize,
    },
    /// The argument at `key_num_idx` (relative to the start) holds the number
    /// of keys, which begin at `first_key` (relative to the start) and are
    /// `step` apart.
    KeyNum {
        key_num_idx: usize,
        first_key: usize,
        step: usize,
    },
}

/// One Redis key specification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeySpec {
    pub begin: BeginSearch,
    pub find: FindKeys,
}

/// Arguments that are glob patterns over key or channel names, which the
/// namespace must confine rather than simply prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Patterns {
    None,
    /// The argument at this index is a key pattern (`KEYS pattern`).
    Arg(usize),
    /// The argument after this keyword is a key pattern (`SCAN … MATCH p`),
    /// searched from the given index on.
    AfterKeyword {
        keyword: &'static str,
        start_from: usize,
    },
    /// `SORT`/`SORT_RO`: `BY` and `GET` patterns name keys (`#` and `nosort`
    /// are kept), and `STORE` names a destination key.
    Sort,
}

/// Arguments that are values, sealed on the way in when encryption is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueArgs {
    None,
    /// From `first` to `last` (negative counts from the end), every `step`.
    Range {
        first: usize,
        last: isize,
        step: usize,
    },
}

/// What the reply holds, so the session knows what to open or unprefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyShape {
    /// Nothing to change: forwarded as the bytes the upstream sent.
    Plain,
    /// A value (bulk string or null), or an array of values (`LPOP key n`).
    Value,
    /// An array of values or nulls (`MGET`, `LRANGE`, `HVALS`).
    Values,
    /// Field/value pairs: a flat array or a RESP3 map (`HGETALL`).
    FieldValues,
    /// `[key, value]` or null (`BLPOP`, `BRPOP`).
    KeyValue,
    /// `[key, …]` or null, only the first element is a key (`BZPOPMIN`).
    KeyFirst,
    /// `[key, [values…]]` or null (`LMPOP`, `BLMPOP`).
    KeyValues,
    /// `[cursor, [keys…]]` (`SCAN`).
    ScanKeys,
    /// An array of keys (`KEYS`).
    Keys,
    /// A single key or null (`RANDOMKEY`).
    Key,
    /// Streams by key: `[[key, entries], …]`, or a RESP3 map (`XREAD`).
    StreamKeys,
    /// `[channel, count, channel, count, …]` (`PUBSUB NUMSUB`).
    ChannelCounts,
    /// Command descriptions, an array of entries named by their first
    /// element or name/doc pairs (`COMMAND`, `COMMAND DOCS`): entries of
    /// commands the proxy does not offer are left out.
    Commands,
    /// `COMMAND INFO name…`: one entry per name asked for, null for those
    /// the proxy does not offer.
    CommandsByName,
}

/// Which Pub/Sub channel space a command works on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channels {
    /// `SUBSCRIBE`, `PUBLISH`: channel names.
    Global,
    /// `PSUBSCRIBE`: glob patterns over channel names.
    Pattern,
    /// `SSUBSCRIBE`, `SPUBLISH`: shard channels.
    Shard,
}

/// Commands the proxy answers itself instead of forwarding as they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Local {
    Auth,
    Hello,
    Quit,
    Reset,
    Select,
    Ping,
    Echo,
    ClientSetName,
    ClientGetName,
    ClientId,
    ClientSetInfo,
    ClientInfo,
    ClientNoEvict,
    ClientNoTouch,
    ClientReply,
    Command,
    CommandCount,
    CommandDocs,
    CommandInfo,
    CommandList,
    CommandGetKeys,
    Info,
    FlushDb,
    DbSize,
    RandomKey,
    Subscribe(Channels),
    Unsubscribe(Channels),
    Publish(Channels),
    PubSubChannels(Channels),
    PubSubNumSub(Channels),
    PubSubNumPat,
}

/// What the proxy does with a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handling {
    /// Rewritten (keys, patterns, values) and sent upstream.
    Forward,
    /// Answered or emulated by the proxy.
    Local(Local),
    /// Refused with an error reply; the text says why, in Redis's style.
    Refuse(&'static str),
}

/// One row of the table.
#[derive(Clone, Copy, Debug)]
pub struct CommandSpec {
    /// Lowercase name; for a subcommand, only the subcommand (`"encoding"`).
    pub name: &'static str,
    /// Redis arity: positive means exactly, negative means at least (the
    /// command name counts; for subcommands, both words count).
    pub arity: i32,
    pub access: Access,
    pub keys: &'static [KeySpec],
    pub patterns: Patterns,
    pub values: ValueArgs,
    pub reply: ReplyShape,
    pub handling: Handling,
    /// Blocks the connection or changes per-connection state upstream, so
    /// the session needs an upstream connection of its own for it.
    pub stateful: bool,
    /// For container commands (`OBJECT`, `CLIENT`), the subcommand table.
    pub subcommands: &'static [CommandSpec],
}

/// Looks a command up by its name, then by its subcommand where it has them.
///
/// Returns `Err` with a Redis-style error text when the command or the
/// subcommand is unknown (both are refused without dropping the connection).
///
/// Names match in any case. The arity is checked as Redis checks it (a
/// subcommand's counts both words), with Redis 7.0's error texts, client
/// bytes cut at 128 and CR/LF replaced. Nothing is allocated unless the
/// lookup fails.
pub fn lookup(args: &[Bytes]) -> Result<&'static CommandSpec, LookupError> {
    let Some((name, rest)) = args.split_first() else {
        return Err(LookupError::UnknownCommand {
            name: String::new(),
            args: String::new(),
        });
    };
    let Some(command) = find_command(name) else {
        return Err(unknown_command(name, rest));
    };

    // As in Redis, a container called alone is checked against its own
    // arity: only `COMMAND` accepts that.
    let Some(sub) = rest.first().filter(|_| !command.subcommands.is_empty()) else {
        return check_arity(command, args.len(), || command.name.to_owned());
    };
    let Some(subcommand) = command
        .subcommands
        .iter()
        .find(|s| s.name.as_bytes().eq_ignore_ascii_case(sub))
    else {
        return Err(LookupError::UnknownSubcommand {
            container: command.name.to_ascii_uppercase(),
            sub: quoted_text(sub),
        });
    };
    check_arity(subcommand, args.len(), || {
        format!("{}|{}", command.name, subcommand.name)
    })
}

/// Every top-level command, family by family; subcommands hang off their
/// container. This is what `COMMAND`, `COMMAND COUNT` and `COMMAND LIST`
/// describe.
pub fn commands() -> impl Iterator<Item = &'static CommandSpec> {
    table::GROUPS.iter().flat_map(|group| group.iter())
}

/// Whether the proxy offers a command: it is in the table and not refused,
/// or it is a container with at least one subcommand that is not refused.
/// `COMMAND`, `COMMAND COUNT/LIST/INFO/DOCS` describe these only.
pub fn is_offered(name: &[u8]) -> bool {
    find_command(name).is_some_and(offered)
}

fn offered(spec: &CommandSpec) -> bool {
    if spec.subcommands.is_empty() {
        !matches!(spec.handling, Handling::Refuse(_))
    } else {
        spec.subcommands.iter().any(offered)
    }
}

/// The commands the proxy offers, by name.
pub fn offered_commands() -> impl Iterator<Item = &'static CommandSpec> {
    commands().filter(|spec| offered(spec))
}

/// The longest command name looked up without allocating; no Redis command
/// comes near it, so a longer name is simply unknown.
const MAX_NAME: usize = 32;

/// The top-level commands by lowercase name, built on first use. Looked up
/// once per request, so with foldhash rather than SipHash: clients only
/// look names up, never insert, so hash flooding has nothing to fill.
static BY_NAME: LazyLock<HashMap<&'static [u8], &'static CommandSpec>> = LazyLock::new(|| {
    commands()
        .map(|spec| (spec.name.as_bytes(), spec))
        .collect()
});

fn find_command(name: &[u8]) -> Option<&'static CommandSpec> {
    let mut lower = [0u8; MAX_NAME];
    let lower = lower.get_mut(..name.len())?;
    lower.copy_from_slice(name);
    lower.make_ascii_lowercase();
    BY_NAME.get(&*lower).copied()
}

fn check_arity(
    spec: &'static CommandSpec,
    argc: usize,
    full_name: impl FnOnce() -> String,
) -> Result<&'static CommandSpec, LookupError> {
    let arity = spec.arity.unsigned_abs() as usize;
    let fits = if spec.arity >= 0 {
        argc == arity
    } else {
        argc >= arity
    };
    if fits {
        Ok(spec)
    } else {
        Err(LookupError::WrongArity { name: full_name() })
    }
}

/// How much of a client's argument Redis quotes back in an error reply.
const QUOTE_LIMIT: usize = 128;

/// The unknown-command error, with the arguments quoted as Redis 7 does:
/// each in single quotes followed by a space, until 128 bytes are written,
/// the last one cut to fit.
fn unknown_command(name: &[u8], args: &[Bytes]) -> LookupError {
    let mut quoted = Vec::new();
    for arg in args {
        if quoted.len() >= QUOTE_LIMIT {
            break;
        }
        let room = QUOTE_LIMIT - quoted.len();
        quoted.push(b'\'');
        quoted.extend_from_slice(c_string(arg, room));
        quoted.extend_from_slice(b"' ");
    }
    LookupError::UnknownCommand {
        name: quoted_text(name),
        args: reply_text(&quoted),
    }
}

/// An argument as Redis prints it in an error: at most 128 bytes.
fn quoted_text(arg: &[u8]) -> String {
    reply_text(c_string(arg, QUOTE_LIMIT))
}

/// Redis formats arguments with C's `%.*s`, which also stops at a NUL byte.
fn c_string(arg: &[u8], limit: usize) -> &[u8] {
    let end = arg.iter().position(|&b| b == 0).unwrap_or(arg.len());
    &arg[..end.min(limit)]
}

/// Client bytes made safe for an error line: CR and LF become spaces, as in
/// Redis, and bytes that are not UTF-8 become U+FFFD.
fn reply_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace(['\r', '\n'], " ")
}

/// Why a lookup failed; rendered as the error reply Redis itself would give.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LookupError {
    #[error("ERR unknown command '{name}', with args beginning with: {args}")]
    UnknownCommand { name: String, args: String },
    #[error("ERR unknown subcommand '{sub}'. Try {container} HELP.")]
    UnknownSubcommand { container: String, sub: String },
    #[error("ERR wrong number of arguments for '{name}' command")]
    WrongArity { name: String },
}

/// Appends to `out` the indexes of `args` that are keys, per the spec's key
/// specifications (and `SORT`'s `STORE`). Never panics on any `args`.
///
/// The key specifications are applied as Redis 7 applies them, except that
/// a specification the arguments contradict (a count that is not a number,
/// or that reaches past the end) yields nothing while the others still
/// count, where Redis would give up on the whole command: the upstream
/// rejects such a command anyway, and every key found is still prefixed.
/// Indexes come in argument order; none are removed as duplicates.
pub fn key_indexes(spec: &CommandSpec, args: &[Bytes], out: &mut Vec<usize>) {
    let start = out.len();
    for key_spec in spec.keys {
        push_keys(key_spec, args, out);
    }
    if spec.patterns == Patterns::Sort
        && spec.access == Access::Write
        && let Some(store) = sort_store_index(args)
    {
        out.push(store);
    }

    // The specifications are in argument order except GEORADIUS's STORE and
    // STOREDIST, which may come either way round.
    if !out[start..].is_sorted() {
        out[start..].sort_unstable();
    }
}

/// One key specification, as Redis's `getKeysUsingKeySpecs` reads it.
fn push_keys(spec: &KeySpec, args: &[Bytes], out: &mut Vec<usize>) {
    let Ok(argc) = isize::try_from(args.len()) else {
        return;
    };

    let first = match spec.begin {
        BeginSearch::Index(index) => index as isize,
        BeginSearch::Keyword {
            keyword,
            start_from,
        } => match find_keyword(args, keyword, start_from) {
            Some(at) => at as isize + 1,
            None => return,
        },
    };

    let (first, last, step) = match spec.find {
        FindKeys::Range {
            last_key,
            step,
            limit,
        } => {
            let last = if last_key >= 0 {
                first + last_key
            } else if limit == 0 {
                argc + last_key
            } else {
                first + (argc - first) / limit as isize + last_key
            };
            (first, last, step)
        }
        FindKeys::KeyNum {
            key_num_idx,
            first_key,
            step,
        } => {
            let Some(count) = usize::try_from(first + key_num_idx as isize)
                .ok()
                .and_then(|at| args.get(at))
                .and_then(|arg| parse_count(arg))
            else {
                return;
            };
            let first = first + first_key as isize;
            let Some(last) = first.checked_add(count - 1) else {
                return;
            };
            (first, last, step)
        }
    };

    if first < 0 || last < first || last >= argc {
        return;
    }
    out.extend((first as usize..=last as usize).step_by(step.max(1)));
}

/// The index of `keyword` (any case), searched forwards from `start_from`
/// up to the last argument but one, or, when `start_from` is negative,
/// backwards from that many arguments before the end down to index 1.
fn find_keyword(args: &[Bytes], keyword: &str, start_from: isize) -> Option<usize> {
    let matches = |at: &usize| args[*at].eq_ignore_ascii_case(keyword.as_bytes());
    if start_from > 0 {
        (start_from as usize..args.len().saturating_sub(1)).find(matches)
    } else {
        let start = usize::try_from(args.len() as isize + start_from).ok()?;
        if start >= args.len() {
            return None;
        }
        (1..=start).rev().find(matches)
    }
}

/// A key count as Redis's `string2ll` accepts it: decimal digits without
/// sign or leading zeros. Negative counts are refused too, as Redis does.
/// Counts beyond any argument list are treated as unreadable.
fn parse_count(arg: &[u8]) -> Option<isize> {
    let canonical = match arg {
        [b'0'] => true,
        [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    if !canonical || arg.len() > 18 {
        return None;
    }
    std::str::from_utf8(arg).ok()?.parse().ok()
}

/// `SORT key … STORE dest`: the index of `dest`, found by walking the options
/// the way `SORT` parses them (`LIMIT` takes two arguments, `BY`, `GET` and
/// `STORE` one), so that an option's argument is never taken for a keyword.
/// The last `STORE` wins, as in Redis; the walk stops at anything `SORT`
/// would reject as a syntax error.
fn sort_store_index(args: &[Bytes]) -> Option<usize> {
    let mut store = None;
    let mut at = 2;
    while at < args.len() {
        let option = &args[at];
        let left = args.len() - at - 1;
        let is = |name: &str| option.eq_ignore_ascii_case(name.as_bytes());
        if is("asc") || is("desc") || is("alpha") {
            at += 1;
        } else if is("limit") && left >= 2 {
            at += 3;
        } else if is("store") && left >= 1 {
            store = Some(at + 1);
            at += 2;
        } else if (is("by") || is("get")) && left >= 1 {
            at += 2;
        } else {
            break;
        }
    }
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<Bytes> {
        words
            .iter()
            .map(|w| Bytes::copy_from_slice(w.as_bytes()))
            .collect()
    }

    /// The key names `key_indexes` finds in `words`, looked up by name.
    fn keys_of(words: &[&str]) -> Vec<String> {
        let args = args(words);
        let spec = lookup(&args).expect("the test names a known command");
        let mut out = Vec::new();
        key_indexes(spec, &args, &mut out);
        out.iter().map(|&i| words[i].to_owned()).collect()
    }

    fn error_text(words: &[&[u8]]) -> String {
        let args: Vec<Bytes> = words.iter().map(|w| Bytes::copy_from_slice(w)).collect();
        lookup(&args)
            .expect_err("the test expects a refusal")
            .to_string()
    }

    #[test]
    fn lookup_ignores_the_case_of_names_and_subcommands() {
        assert_eq!(lookup(&args(&["gEt", "k"])).map(|s| s.name), Ok("get"));
        let spec = lookup(&args(&["Object", "ENCODING", "k"])).expect("object encoding");
        assert_eq!(spec.name, "encoding");
        assert_eq!(
            spec.keys,
            &[KeySpec {
                begin: BeginSearch::Index(2),
                find: FindKeys::Range {
                    last_key: 0,
                    step: 1,
                    limit: 0
                }
            }]
        );
    }

    #[test]
    fn unknown_commands_quote_their_arguments_like_redis() {
        assert_eq!(
            error_text(&[b"foo", b"a", b"b"]),
            "ERR unknown command 'foo', with args beginning with: 'a' 'b' "
        );
        assert_eq!(
            error_text(&[b"DPING"]),
            "ERR unknown command 'DPING', with args beginning with: "
        );
        assert_eq!(
            error_text(&[b"foo", b"a\r\nb"]),
            "ERR unknown command 'foo', with args beginning with: 'a  b' "
        );
    }

    #[test]
    fn unknown_command_text_is_cut_at_128_bytes_like_redis() {
        let long = [b'x'; 140];
        let text = error_text(&[&long, &[b'y'; 100], &[b'z'; 100], b"c"]);
        let expected = format!(
            "ERR unknown command '{}', with args beginning with: '{}' '{}' ",
            "x".repeat(128),
            "y".repeat(100),
            "z".repeat(25)
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn unknown_command_text_survives_bytes_that_are_not_utf8() {
        let text = error_text(&[b"\xff\xfe", b"a\x00b", b"\xc3"]);
        assert_eq!(
            text,
            "ERR unknown command '\u{fffd}\u{fffd}', with args beginning with: 'a' '\u{fffd}' "
        );
    }

    #[test]
    fn empty_requests_are_unknown_commands_with_an_empty_name() {
        assert_eq!(
            lookup(&[]).map(|s| s.name),
            Err(LookupError::UnknownCommand {
                name: String::new(),
                args: String::new()
            })
        );
    }

    #[test]
    fn unknown_subcommands_name_the_container_in_capitals() {
        assert_eq!(
            error_text(&[b"object", b"Foo"]),
            "ERR unknown subcommand 'Foo'. Try OBJECT HELP."
        );
        assert_eq!(
            error_text(&[b"client", b"MAINT_NOTIFICATIONS", b"on"]),
            "ERR unknown subcommand 'MAINT_NOTIFICATIONS'. Try CLIENT HELP."
        );
    }

    #[test]
    fn wrong_arity_names_the_command_as_redis_does() {
        assert_eq!(
            error_text(&[b"GET"]),
            "ERR wrong number of arguments for 'get' command"
        );
        assert_eq!(
            error_text(&[b"get", b"a", b"b"]),
            "ERR wrong number of arguments for 'get' command"
        );
        assert_eq!(
            error_text(&[b"OBJECT"]),
            "ERR wrong number of arguments for 'object' command"
        );
        assert_eq!(
            error_text(&[b"object", b"encoding"]),
            "ERR wrong number of arguments for 'object|encoding' command"
        );
        assert_eq!(
            error_text(&[b"mset", b"k"]),
            "ERR wrong number of arguments for 'mset' command"
        );
    }

    #[test]
    fn command_alone_is_a_complete_request() {
        let spec = lookup(&args(&["COMMAND"])).expect("command");
        assert_eq!(spec.handling, Handling::Local(Local::Command));
        let spec = lookup(&args(&["command", "docs"])).expect("command docs");
        assert_eq!(spec.handling, Handling::Local(Local::CommandDocs));
    }

    #[test]
    fn long_names_are_unknown_without_panicking() {
        let name = "g".repeat(MAX_NAME + 1);
        assert!(matches!(
            lookup(&args(&[&name])),
            Err(LookupError::UnknownCommand { .. })
        ));
    }

    #[test]
    fn single_and_multi_key_commands_find_their_keys() {
        assert_eq!(keys_of(&["GET", "a"]), ["a"]);
        assert_eq!(keys_of(&["mset", "a", "1", "b", "2"]), ["a", "b"]);
        assert_eq!(keys_of(&["del", "a", "b", "a"]), ["a", "b", "a"]);
        assert_eq!(keys_of(&["blpop", "a", "b", "0"]), ["a", "b"]);
        assert_eq!(keys_of(&["lcs", "a", "b", "LEN"]), ["a", "b"]);
        assert_eq!(keys_of(&["bitop", "and", "d", "a", "b"]), ["d", "a", "b"]);
        assert_eq!(keys_of(&["object", "encoding", "a"]), ["a"]);
        assert!(keys_of(&["ping"]).is_empty());
    }

    #[test]
    fn numkeys_commands_read_their_count() {
        assert_eq!(
            keys_of(&["zunionstore", "d", "2", "a", "b", "WEIGHTS", "1", "2"]),
            ["d", "a", "b"]
        );
        assert_eq!(keys_of(&["lmpop", "2", "a", "b", "LEFT"]), ["a", "b"]);
        assert_eq!(keys_of(&["blmpop", "0", "1", "a", "LEFT"]), ["a"]);
        assert_eq!(
            keys_of(&["eval", "return 1", "2", "a", "b", "x"]),
            ["a", "b"]
        );
        assert!(keys_of(&["eval", "return 1", "0"]).is_empty());
    }

    #[test]
    fn bad_key_counts_yield_no_keys_and_never_panic() {
        for count in [
            "-1",
            "x",
            "",
            "+1",
            "01",
            "3",
            "99999999999999999999",
            "1e3",
        ] {
            assert_eq!(
                keys_of(&["zunionstore", "d", count, "a", "b"]),
                ["d"],
                "count {count:?}"
            );
            assert!(keys_of(&["lmpop", count, "a", "LEFT"]).is_empty());
        }
        assert!(keys_of(&["zunionstore", "d", "0", "a"]) == ["d"]);
    }

    #[test]
    fn stream_reads_take_the_first_half_after_streams() {
        assert_eq!(
            keys_of(&["XREAD", "COUNT", "2", "streams", "a", "b", "0", "0"]),
            ["a", "b"]
        );
        assert_eq!(
            keys_of(&["xread", "STREAMS", "streams", "other", "0", "0"]),
            ["streams", "other"]
        );
        assert_eq!(
            keys_of(&["xreadgroup", "GROUP", "g", "STREAMS", "STREAMS", "a", ">"]),
            ["a"]
        );
        assert!(keys_of(&["xread", "COUNT", "1", "BLOCK", "STREAMS"]).is_empty());
    }

    #[test]
    fn georadius_store_keys_are_found_after_the_fixed_arguments() {
        let base = ["georadius", "k", "0", "0", "1", "km"];
        assert_eq!(keys_of(&base), ["k"]);
        let store = [&base[..], &["COUNT", "3", "store", "dest"]].concat();
        assert_eq!(keys_of(&store), ["k", "dest"]);
        let both = [&base[..], &["STOREDIST", "d1", "STORE", "d2"]].concat();
        assert_eq!(keys_of(&both), ["k", "d1", "d2"]);
        let member = ["georadiusbymember", "k", "m", "1", "km", "STORE", "d"];
        assert_eq!(keys_of(&member), ["k", "d"]);
    }

    #[test]
    fn sort_store_skips_option_arguments() {
        assert_eq!(keys_of(&["sort", "k"]), ["k"]);
        assert_eq!(
            keys_of(&[
                "SORT", "k", "BY", "store", "LIMIT", "0", "10", "GET", "#", "STORE", "d"
            ]),
            ["k", "d"]
        );
        assert_eq!(
            keys_of(&["sort", "k", "get", "store", "store", "d1", "store", "d2"]),
            ["k", "d2"]
        );
        assert_eq!(keys_of(&["sort", "k", "STORE"]), ["k"]);
        assert_eq!(keys_of(&["sort", "k", "nonsense", "STORE", "d"]), ["k"]);
        assert_eq!(keys_of(&["sort_ro", "k", "STORE", "d"]), ["k"]);
    }

    #[test]
    fn migrate_keys_are_searched_backwards_from_the_end() {
        let single = ["migrate", "h", "6379", "k", "0", "5000"];
        assert_eq!(keys_of(&single), ["k"]);
        let many = [
            "migrate", "h", "6379", "", "0", "5000", "COPY", "KEYS", "a", "b",
        ];
        assert_eq!(keys_of(&many), ["", "a", "b"]);
    }

    #[test]
    fn key_indexes_appends_without_touching_what_is_already_there() {
        let args = args(&["rename", "a", "b"]);
        let spec = lookup(&args).expect("rename");
        let mut out = vec![7];
        key_indexes(spec, &args, &mut out);
        assert_eq!(out, [7, 1, 2]);
    }

    #[test]
    fn key_indexes_never_panics_on_short_argument_lists() {
        for spec in commands().chain(commands().flat_map(|c| c.subcommands)) {
            for len in 0..4 {
                let args: Vec<Bytes> = (0..len).map(|_| Bytes::from_static(b"1")).collect();
                let mut out = Vec::new();
                key_indexes(spec, &args, &mut out);
                assert!(out.iter().all(|&i| i < len), "{}", spec.name);
            }
        }
    }

    #[test]
    fn the_table_classifies_commands_as_the_spec_requires() {
        let spec = |words: &[&str]| lookup(&args(words)).expect("known command");
        assert_eq!(spec(&["get", "k"]).access, Access::Read);
        assert_eq!(spec(&["set", "k", "v"]).access, Access::Write);
        assert_eq!(spec(&["ping"]).access, Access::Connection);
        assert_eq!(spec(&["flushall"]).access, Access::Admin);
        assert_eq!(
            spec(&["flushall"]).handling,
            Handling::Local(Local::FlushDb)
        );
        assert!(matches!(
            spec(&["config", "get", "x"]).handling,
            Handling::Refuse(_)
        ));
        assert!(matches!(
            spec(&["client", "list"]).handling,
            Handling::Refuse(_)
        ));
        assert_eq!(spec(&["client", "setinfo", "lib-name", "x"]).arity, 4);
        assert_eq!(spec(&["memory", "usage", "k"]).handling, Handling::Forward);
        assert_eq!(
            spec(&["mset", "a", "1"]).values,
            ValueArgs::Range {
                first: 2,
                last: -1,
                step: 2
            }
        );
        assert!(spec(&["blpop", "k", "0"]).stateful);
        assert!(!spec(&["lpop", "k"]).stateful);
        assert_eq!(spec(&["scan", "0"]).reply, ReplyShape::ScanKeys);
    }

    #[test]
    fn every_name_in_the_table_is_lowercase_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for spec in commands() {
            assert_eq!(spec.name, spec.name.to_ascii_lowercase());
            assert!(seen.insert(spec.name), "{} twice", spec.name);
            let mut subs = std::collections::HashSet::new();
            for sub in spec.subcommands {
                assert_eq!(sub.name, sub.name.to_ascii_lowercase());
                assert!(subs.insert(sub.name), "{}|{} twice", spec.name, sub.name);
            }
        }
    }
}
