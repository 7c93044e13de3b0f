//! A plan per request: how a client's command is rewritten for the upstream,
//! and what must be done to its reply on the way back.
//!
//! The session asks the command table for the entry, this module writes the
//! rewritten request (keys into the namespace, patterns confined) straight
//! into the upstream buffer, and the returned `Plan` waits in the session's
//! FIFO until the matching reply arrives and is transformed by it.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame as Resp2Frame;
use redis_protocol::resp3::types::BytesFrame as Resp3Frame;

use crate::command::{self, CommandSpec, Patterns, ReplyShape};
use crate::frame::ProtocolError;
use crate::namespace::Namespace;

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
}

impl Plan {
    /// Whether the reply must be decoded and rewritten, or can be forwarded
    /// as the bytes the upstream sent.
    pub fn transforms_reply(&self) -> bool {
        !self.namespace.prefix().is_empty()
            && matches!(
                self.reply,
                ReplyShape::KeyValue
                    | ReplyShape::KeyFirst
                    | ReplyShape::KeyValues
                    | ReplyShape::ScanKeys
                    | ReplyShape::Keys
                    | ReplyShape::Key
            )
    }
}

/// Writes the rewritten form of `args` to `out` and returns its plan.
///
/// `key_scratch` is reused between calls to avoid an allocation per request.
pub fn rewrite(
    spec: &'static CommandSpec,
    args: &[Bytes],
    namespace: &Arc<Namespace>,
    out: &mut BytesMut,
    key_scratch: &mut Vec<usize>,
) -> Plan {
    key_scratch.clear();
    command::key_indexes(spec, args, key_scratch);
    key_scratch.sort_unstable();
    key_scratch.dedup();
    let mut keys = key_scratch.iter().copied().peekable();
    let patterns = pattern_indexes(spec.patterns, args);
    let prefix = namespace.prefix();

    out.put_u8(b'*');
    out.put_slice(args.len().to_string().as_bytes());
    out.put_slice(b"\r\n");
    for (i, arg) in args.iter().enumerate() {
        let is_key = keys.next_if_eq(&i).is_some();
        if prefix.is_empty() {
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

    Plan {
        command: spec.name,
        reply: spec.reply,
        namespace: Arc::clone(namespace),
    }
}

fn put_prefixed(out: &mut BytesMut, prefix: &[u8], arg: &[u8]) {
    out.put_u8(b'$');
    out.put_slice((prefix.len() + arg.len()).to_string().as_bytes());
    out.put_slice(b"\r\n");
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

/// Writes the reply of `plan` to `out`, transformed as the plan requires.
/// `raw` is one complete frame as measured by the scanner; `resp3` says
/// which protocol the upstream connection speaks.
pub fn transform_reply(
    plan: &Plan,
    raw: Bytes,
    resp3: bool,
    out: &mut BytesMut,
) -> Result<(), ProtocolError> {
    // Errors and nulls carry no keys; most replies need no change at all.
    if !plan.transforms_reply()
        || matches!(raw.first(), Some(b'-' | b'_' | b'!'))
        || raw.starts_with(b"*-1")
        || raw.starts_with(b"$-1")
    {
        out.extend_from_slice(&raw);
        return Ok(());
    }

    if resp3 {
        let (mut frame, _) = redis_protocol::resp3::decode::complete::decode_bytes(&raw)
            .map_err(|e| ProtocolError::Decode(e.details().to_string()))?
            .ok_or_else(|| ProtocolError::Decode("incomplete reply".into()))?;
        unprefix(&mut frame, plan);
        redis_protocol::resp3::encode::complete::extend_encode(out, &frame, false)
            .map_err(|e| ProtocolError::Decode(e.details().to_string()))?;
    } else {
        let (mut frame, _) = redis_protocol::resp2::decode::decode_bytes(&raw)
            .map_err(|e| ProtocolError::Decode(e.details().to_string()))?
            .ok_or_else(|| ProtocolError::Decode("incomplete reply".into()))?;
        unprefix(&mut frame, plan);
        redis_protocol::resp2::encode::extend_encode(out, &frame, false)
            .map_err(|e| ProtocolError::Decode(e.details().to_string()))?;
    }
    Ok(())
}

/// The two parts of a reply tree the transforms touch, over both protocols'
/// frame types.
trait ReplyTree: Sized {
    fn items_mut(&mut self) -> Option<&mut Vec<Self>>;
    fn blob_mut(&mut self) -> Option<&mut Bytes>;
}

impl ReplyTree for Resp2Frame {
    fn items_mut(&mut self) -> Option<&mut Vec<Self>> {
        match self {
            Resp2Frame::Array(items) => Some(items),
            _ => None,
        }
    }

    fn blob_mut(&mut self) -> Option<&mut Bytes> {
        match self {
            Resp2Frame::BulkString(data) => Some(data),
            _ => None,
        }
    }
}

impl ReplyTree for Resp3Frame {
    fn items_mut(&mut self) -> Option<&mut Vec<Self>> {
        match self {
            Resp3Frame::Array { data, .. } | Resp3Frame::Push { data, .. } => Some(data),
            _ => None,
        }
    }

    fn blob_mut(&mut self) -> Option<&mut Bytes> {
        match self {
            Resp3Frame::BlobString { data, .. } | Resp3Frame::SimpleString { data, .. } => {
                Some(data)
            }
            _ => None,
        }
    }
}

/// Strips the namespace from every key the reply shape says is there. A key
/// outside the namespace can't be produced by a rewritten request; should
/// one appear anyway it is dropped from lists and emptied in place, never
/// shown with its prefix.
fn unprefix<F: ReplyTree>(frame: &mut F, plan: &Plan) {
    let ns = &plan.namespace;
    let strip_in_place = |f: &mut F| {
        if let Some(key) = f.blob_mut() {
            *key = ns.strip(key).unwrap_or_default();
        }
    };
    let strip_list = |items: &mut Vec<F>| {
        items.retain_mut(|f| match f.blob_mut() {
            Some(key) => match ns.strip(key) {
                Some(stripped) => {
                    *key = stripped;
                    true
                }
                None => false,
            },
            None => true,
        });
    };

    match plan.reply {
        ReplyShape::Key => strip_in_place(frame),
        ReplyShape::Keys => {
            if let Some(items) = frame.items_mut() {
                strip_list(items);
            }
        }
        ReplyShape::ScanKeys => {
            if let Some(keys) = frame
                .items_mut()
                .and_then(|items| items.get_mut(1))
                .and_then(ReplyTree::items_mut)
            {
                strip_list(keys);
            }
        }
        ReplyShape::KeyValue | ReplyShape::KeyFirst | ReplyShape::KeyValues => {
            if let Some(first) = frame.items_mut().and_then(|items| items.first_mut()) {
                strip_in_place(first);
            }
        }
        ReplyShape::Plain | ReplyShape::Value | ReplyShape::Values | ReplyShape::FieldValues => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(reply: ReplyShape, ns: &Arc<Namespace>) -> Plan {
        Plan {
            command: "test",
            reply,
            namespace: Arc::clone(ns),
        }
    }

    #[test]
    fn scan_reply_loses_its_prefix_in_both_protocols() {
        let ns = Arc::new(Namespace::for_project("p"));
        let a = ns.key(b"a");
        let raw = format!(
            "*2\r\n$1\r\n0\r\n*2\r\n${}\r\n{}\r\n$5\r\nother\r\n",
            a.len(),
            String::from_utf8_lossy(&a)
        );
        for resp3 in [false, true] {
            let mut out = BytesMut::new();
            transform_reply(
                &plan(ReplyShape::ScanKeys, &ns),
                Bytes::from(raw.clone()),
                resp3,
                &mut out,
            )
            .unwrap();
            assert_eq!(&out[..], b"*2\r\n$1\r\n0\r\n*1\r\n$1\r\na\r\n");
        }
    }

    #[test]
    fn plain_replies_are_forwarded_byte_for_byte() {
        let ns = Arc::new(Namespace::for_project("p"));
        let mut out = BytesMut::new();
        let raw = Bytes::from_static(b"%1\r\n+a\r\n:1\r\n");
        transform_reply(&plan(ReplyShape::Plain, &ns), raw.clone(), true, &mut out).unwrap();
        assert_eq!(&out[..], &raw[..]);
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
