//! A plan per request: how a client's command is rewritten for the upstream,
//! and what must be done to its reply on the way back.
//!
//! The session asks the command table for the entry, this module writes the
//! rewritten request (keys into the namespace, patterns confined) straight
//! into the upstream buffer, and the returned `Plan` waits in the session's
//! FIFO until the matching reply arrives and is transformed by it.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::command::{self, CommandSpec, Patterns, ReplyShape, ValueArgs};
use crate::keyring::Sealer;
use crate::namespace::Namespace;

/// How a session's values are sealed and opened, when encryption is on.
#[derive(Clone)]
pub struct Values {
    pub sealer: Arc<Sealer>,
    pub project: Arc<str>,
    /// Refuse values read without the sealed-value magic.
    pub strict: bool,
}

impl std::fmt::Debug for Values {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Values")
            .field("project", &self.project)
            .field("strict", &self.strict)
            .finish_non_exhaustive()
    }
}

/// What to do with the reply of one forwarded request.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The command's table name, for logs and metrics (never its arguments).
    pub command: &'static str,
    pub reply: ReplyShape,
    /// The namespace the request was rewritten into. Kept per plan because a
    /// pipelined `AUTH` may switch the session to another project while
    /// earlier replies are still on their way.
    pub namespace: Arc<Namespace>,
    /// Present when encryption is on: how to open the reply's values.
    pub values: Option<Values>,
}

impl Plan {
    /// Whether the reply must be decoded and rewritten, or can be forwarded
    /// as the bytes the upstream sent.
    pub fn transforms_reply(&self) -> bool {
        let has_keys = matches!(
            self.reply,
            ReplyShape::KeyValue
                | ReplyShape::KeyFirst
                | ReplyShape::KeyValues
                | ReplyShape::ScanKeys
                | ReplyShape::Keys
                | ReplyShape::Key
                | ReplyShape::StreamKeys
                | ReplyShape::ChannelCounts
        );
        if matches!(
            self.reply,
            ReplyShape::Commands | ReplyShape::CommandsByName
        ) {
            return true;
        }
        let has_values = matches!(
            self.reply,
            ReplyShape::Value
                | ReplyShape::Values
                | ReplyShape::FieldValues
                | ReplyShape::KeyValue
                | ReplyShape::KeyValues
        );
        (has_keys && !self.namespace.prefix().is_empty()) || (has_values && self.values.is_some())
    }
}

/// Why a request can't be forwarded; the text is the error reply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RewriteError {
    #[error(
        "ERR '{0}' compares values inside Redis, and redcloak encrypts values: not available while encryption is on"
    )]
    ComparesValues(&'static str),
    #[error("ERR sealing a value failed; the request was not sent")]
    Seal,
}

/// Commands that compare stored values inside Redis. Sealed values never
/// compare equal (each seal is random), so these could only give wrong
/// answers and are refused while encryption is on.
const COMPARES_VALUES: &[&str] = &["lrem", "lpos", "linsert", "hstrlen"];

/// Commands that read or edit a string's bytes inside Redis. On a sealed
/// value they would return or write garbage, so while encryption is on they
/// run inside a small script that first checks that none of their keys holds
/// a sealed string, and answers a clear error if one does. Plain strings,
/// counters and bitmaps written by these commands keep working.
const NEEDS_PLAINTEXT: &[&str] = &[
    "append",
    "setrange",
    "getrange",
    "substr",
    "strlen",
    "lcs",
    "setbit",
    "getbit",
    "bitcount",
    "bitpos",
    "bitop",
    "bitfield",
    "bitfield_ro",
];

/// The guard script: refuses when any key holds a sealed string (magic
/// `00 52 43`, version `01`), else runs the command given in ARGV. `pcall`
/// passes the command's own errors through unchanged.
const PLAINTEXT_GUARD: &str = "for _, k in ipairs(KEYS) do \
if redis.call('TYPE', k)['ok'] == 'string' and redis.call('GETRANGE', k, 0, 3) == '\\0RC\\1' then \
return redis.error_reply('ERR this command needs the plaintext inside Redis, but the value is encrypted by redcloak') \
end end \
return redis.pcall(unpack(ARGV))";

/// Refuses argument orders where Redis would treat an argument as a key that
/// the key specifications (and so the rewrite) don't report. Such a key
/// would reach Redis without the namespace prefix, so these forms are
/// refused rather than forwarded.
pub fn ambiguous_keys(spec: &CommandSpec, args: &[Bytes]) -> Option<&'static str> {
    match spec.name {
        // Redis stores into the last STORE/STOREDIST; the key spec names the
        // first.
        "georadius" | "georadiusbymember" => {
            let options_from = if spec.name == "georadius" { 6 } else { 5 };
            let stores = args
                .iter()
                .skip(options_from)
                .filter(|a| {
                    a.eq_ignore_ascii_case(b"STORE") || a.eq_ignore_ascii_case(b"STOREDIST")
                })
                .count();
            (stores > 1).then_some("ERR redcloak accepts at most one STORE or STOREDIST option")
        }
        // With options before GROUP, a group or consumer named STREAMS can
        // hide where the stream keys begin.
        "xreadgroup" => (!args
            .get(1)
            .is_some_and(|a| a.eq_ignore_ascii_case(b"GROUP")))
        .then_some("ERR redcloak requires XREADGROUP GROUP <group> <consumer> to come first"),
        _ => None,
    }
}

/// Writes the rewritten form of `args` to `out` and returns its plan. On
/// error nothing is written.
///
/// `key_scratch` is reused between calls to avoid an allocation per request.
pub fn rewrite(
    spec: &'static CommandSpec,
    args: &[Bytes],
    namespace: &Arc<Namespace>,
    values: Option<&Values>,
    out: &mut BytesMut,
    key_scratch: &mut Vec<usize>,
) -> Result<Plan, RewriteError> {
    if values.is_some() && COMPARES_VALUES.contains(&spec.name) {
        return Err(RewriteError::ComparesValues(spec.name));
    }

    key_scratch.clear();
    command::key_indexes(spec, args, key_scratch);
    key_scratch.sort_unstable();
    key_scratch.dedup();
    let patterns = pattern_indexes(spec.patterns, args);
    // Values are sealed straight into `out`; if one fails, `out` is cut
    // back to here so that nothing of the request is sent.
    let start = out.len();

    let guarded = values.is_some() && NEEDS_PLAINTEXT.contains(&spec.name);
    if guarded {
        // EVAL <guard> <numkeys> <keys…> <the command itself…>
        crate::frame::put_length_line(out, b'*', 3 + key_scratch.len() + args.len());
        crate::frame::put_bulk(out, b"EVAL");
        crate::frame::put_bulk(out, PLAINTEXT_GUARD.as_bytes());
        crate::frame::put_bulk(out, key_scratch.len().to_string().as_bytes());
        for &i in key_scratch.iter() {
            put_prefixed(out, namespace.prefix(), &args[i]);
        }
    } else {
        crate::frame::put_length_line(out, b'*', args.len());
    }

    let prefix = namespace.prefix();
    let mut keys = key_scratch.iter().copied().peekable();
    for (i, arg) in args.iter().enumerate() {
        let is_key = keys.next_if_eq(&i).is_some();
        if let Some(values) = values.filter(|_| is_value_arg(spec.values, i, args.len())) {
            if let Err(e) = seal_bulk(values, arg, out) {
                out.truncate(start);
                return Err(e);
            }
        } else if prefix.is_empty() {
            crate::frame::put_bulk(out, arg);
        } else if is_key {
            put_prefixed(out, prefix, arg);
        } else if let Some(kind) = patterns.iter().find(|(at, _)| *at == i).map(|(_, k)| *k) {
            match kind {
                PatternKind::Glob => crate::frame::put_bulk(out, &namespace.pattern(arg)),
                PatternKind::Sort => put_prefixed(out, prefix, arg),
            }
        } else {
            crate::frame::put_bulk(out, arg);
        }
    }

    Ok(Plan {
        command: spec.name,
        reply: reply_shape(spec, args),
        namespace: Arc::clone(namespace),
        values: values.cloned(),
    })
}

/// The reply shape, where it depends on the arguments: `HRANDFIELD` returns
/// field names only, unless asked `WITHVALUES`.
fn reply_shape(spec: &CommandSpec, args: &[Bytes]) -> ReplyShape {
    if spec.name == "hrandfield"
        && !args
            .iter()
            .skip(3)
            .any(|a| a.eq_ignore_ascii_case(b"WITHVALUES"))
    {
        return ReplyShape::Plain;
    }
    spec.reply
}

/// Whether argument `i` of `len` is a value to seal.
fn is_value_arg(positions: ValueArgs, i: usize, len: usize) -> bool {
    let ValueArgs::Range { first, last, step } = positions else {
        return false;
    };
    let last = if last < 0 { len as isize + last } else { last };
    i >= first && (i as isize) <= last && (i - first).is_multiple_of(step.max(1))
}

/// Writes `value`, sealed, as a bulk string, the sealed bytes laid out in
/// place.
fn seal_bulk(values: &Values, value: &[u8], out: &mut BytesMut) -> Result<(), RewriteError> {
    values
        .sealer
        .seal_into(&values.project, value, |len| {
            crate::frame::reserve_bulk(out, len)
        })
        .map_err(|_| RewriteError::Seal)
}

fn put_prefixed(out: &mut BytesMut, prefix: &[u8], arg: &[u8]) {
    crate::frame::put_length_line(out, b'$', prefix.len() + arg.len());
    out.put_slice(prefix);
    out.put_slice(arg);
    out.put_slice(b"\r\n");
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PatternKind {
    /// A glob over names: confined by escaping the prefix.
    Glob,
    /// A `SORT` substitution pattern (`weight_*`, `obj_*->field`): prefixed.
    Sort,
}

/// The arguments that are patterns. Options are walked in pairs where they
/// come in pairs, so an option's value is never mistaken for a keyword.
fn pattern_indexes(patterns: Patterns, args: &[Bytes]) -> Vec<(usize, PatternKind)> {
    match patterns {
        Patterns::None => Vec::new(),
        Patterns::Arg(i) if i < args.len() => vec![(i, PatternKind::Glob)],
        Patterns::Arg(_) => Vec::new(),
        Patterns::AfterKeyword {
            keyword,
            start_from,
        } => {
            let mut found = Vec::new();
            let mut i = start_from;
            while i + 1 < args.len() {
                if args[i].eq_ignore_ascii_case(keyword.as_bytes()) {
                    found.push((i + 1, PatternKind::Glob));
                }
                i += 2;
            }
            found
        }
        Patterns::Sort => {
            let mut found = Vec::new();
            let mut i = 2;
            while i < args.len() {
                let word = &args[i];
                if word.eq_ignore_ascii_case(b"BY") && i + 1 < args.len() {
                    if !args[i + 1].eq_ignore_ascii_case(b"nosort") {
                        found.push((i + 1, PatternKind::Sort));
                    }
                    i += 2;
                } else if word.eq_ignore_ascii_case(b"GET") && i + 1 < args.len() {
                    if args[i + 1].as_ref() != b"#" {
                        found.push((i + 1, PatternKind::Sort));
                    }
                    i += 2;
                } else if word.eq_ignore_ascii_case(b"LIMIT") {
                    i += 3;
                } else if word.eq_ignore_ascii_case(b"STORE") {
                    i += 2;
                } else {
                    i += 1;
                }
            }
            found
        }
    }
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

    #[test]
    fn values_are_sealed_in_place_and_everything_else_is_kept() {
        let keyring =
            crate::keyring::Keyring::from_env_key("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
                .unwrap();
        let values = Values {
            sealer: Arc::new(Sealer::new(keyring, 1024, false)),
            project: "billing".into(),
            strict: false,
        };
        let namespace = Arc::new(Namespace::for_project("billing"));
        let prefixed = |key: &str| [namespace.prefix(), key.as_bytes()].concat();

        for (request, keys_at, sealed_at) in [
            (
                args(&["MSET", "k1", "v1", "k2", "v2"]),
                vec![1, 3],
                vec![2, 4],
            ),
            (
                args(&["HSET", "h", "f1", "v1", "f2", "v2"]),
                vec![1],
                vec![3, 5],
            ),
            (args(&["SET", "k", "v", "EX", "10"]), vec![1], vec![2]),
        ] {
            let spec = command::lookup(&request).unwrap();
            let mut out = BytesMut::from(&b"already queued"[..]);
            rewrite(
                spec,
                &request,
                &namespace,
                Some(&values),
                &mut out,
                &mut Vec::new(),
            )
            .unwrap();
            assert_eq!(&out[..14], b"already queued");
            let sent = crate::frame::decode_request(&out.split_off(14).freeze()).unwrap();
            assert_eq!(sent.len(), request.len());
            for (i, (sent, original)) in sent.iter().zip(&request).enumerate() {
                if sealed_at.contains(&i) {
                    let opened = values.sealer.open("billing", sent).unwrap();
                    assert_eq!(opened.as_bytes(), &original[..], "argument {i}");
                    assert!(crate::crypto::is_sealed(sent));
                } else if keys_at.contains(&i) {
                    assert_eq!(&sent[..], prefixed(std::str::from_utf8(original).unwrap()));
                } else {
                    assert_eq!(sent, original, "argument {i}");
                }
            }
        }
    }

    #[test]
    fn argument_orders_that_hide_keys_are_refused() {
        let table = |args: &[&str]| -> Vec<Bytes> {
            args.iter()
                .map(|a| Bytes::copy_from_slice(a.as_bytes()))
                .collect()
        };
        let geo = table(&[
            "GEORADIUS",
            "k",
            "0",
            "0",
            "1",
            "km",
            "STORE",
            "a",
            "STORE",
            "b",
        ]);
        let spec = command::lookup(&geo).unwrap();
        assert!(ambiguous_keys(spec, &geo).is_some());
        let geo_once = table(&["GEORADIUS", "k", "0", "0", "1", "km", "STORE", "a"]);
        assert!(ambiguous_keys(spec, &geo_once).is_none());

        let xrg = table(&[
            "XREADGROUP",
            "COUNT",
            "1",
            "GROUP",
            "g",
            "c",
            "STREAMS",
            "s",
            ">",
        ]);
        let spec = command::lookup(&xrg).unwrap();
        assert!(ambiguous_keys(spec, &xrg).is_some());
        let xrg_ok = table(&["XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", ">"]);
        assert!(ambiguous_keys(spec, &xrg_ok).is_none());
    }

    #[test]
    fn sort_patterns_are_found_in_pairs() {
        let args: Vec<Bytes> = [
            "SORT", "k", "LIMIT", "0", "5", "BY", "w_*", "GET", "#", "GET", "o_*->f", "STORE", "d",
        ]
        .into_iter()
        .map(|a: &str| Bytes::copy_from_slice(a.as_bytes()))
        .collect();
        assert_eq!(
            pattern_indexes(Patterns::Sort, &args),
            vec![(6, PatternKind::Sort), (10, PatternKind::Sort)]
        );
    }

    #[test]
    fn scan_match_is_found_only_in_option_position() {
        let args: Vec<Bytes> = ["SCAN", "0", "COUNT", "match", "MATCH", "a*"]
            .into_iter()
            .map(|a: &str| Bytes::copy_from_slice(a.as_bytes()))
            .collect();
        let patterns = Patterns::AfterKeyword {
            keyword: "MATCH",
            start_from: 2,
        };
        assert_eq!(
            pattern_indexes(patterns, &args),
            vec![(5, PatternKind::Glob)]
        );
    }
}
