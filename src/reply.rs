//! Replies on their way back: keys lose the namespace prefix and sealed
//! values are opened, as the request's plan says.
//!
//! Most replies need neither and are forwarded as the exact bytes the
//! upstream sent. The others are decoded with `redis-protocol` (RESP2 or
//! RESP3, whichever the upstream link speaks), changed in place, and encoded
//! again.

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame as Resp2Frame;
use redis_protocol::resp3::types::BytesFrame as Resp3Frame;

use crate::command::ReplyShape;
use crate::crypto::OpenError;
use crate::frame::ProtocolError;
use crate::keyring::Opened;
use crate::plan::{Plan, Values};

/// Why a reply could not be passed on.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    /// The upstream broke the protocol: the link can't be trusted any more.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A value in the reply failed to open: this request gets an error
    /// reply, the session goes on.
    #[error("a value could not be opened: {0}")]
    Open(#[from] OpenError),
}

/// Writes the reply of `plan` to `out`, transformed as the plan requires.
/// `raw` is one complete frame as measured by the scanner; `resp3` says
/// which protocol the upstream link speaks. On error nothing is written.
pub fn transform(
    plan: &Plan,
    raw: Bytes,
    resp3: bool,
    out: &mut BytesMut,
) -> Result<(), ReplyError> {
    // Errors and nulls carry neither keys nor values.
    let untouched = !plan.transforms_reply()
        || matches!(raw.first(), Some(b'-' | b'_' | b'!' | b':' | b'+'))
        || raw.starts_with(b"*-1")
        || raw.starts_with(b"$-1");
    if untouched {
        out.extend_from_slice(&raw);
        return Ok(());
    }

    // The most common case, one value (`GET`), skips building a frame tree.
    if plan.reply == ReplyShape::Value
        && let Some(values) = &plan.values
        && let Some(payload) = bulk_payload(&raw)
    {
        return match values.sealer.open(&values.project, payload)? {
            Opened::Plain(_) if values.strict => Err(OpenError::NotSealed.into()),
            Opened::Plain(_) => {
                out.extend_from_slice(&raw);
                Ok(())
            }
            Opened::Sealed(plaintext) => {
                crate::frame::put_bulk(out, &plaintext);
                Ok(())
            }
        };
    }

    edit_frame::<ReplyError>(
        &raw,
        resp3,
        out,
        |f| Ok(apply(f, plan).map(|()| true)?),
        |f| Ok(apply(f, plan).map(|()| true)?),
    )?;
    Ok(())
}

/// Decodes `raw` in the link's protocol, lets the edit for that protocol
/// change it, and encodes the result to `out` when the edit returns true.
/// Nothing is written when it returns false or fails.
pub(crate) fn edit_frame<E: From<ProtocolError>>(
    raw: &Bytes,
    resp3: bool,
    out: &mut BytesMut,
    edit2: impl FnOnce(&mut Resp2Frame) -> Result<bool, E>,
    edit3: impl FnOnce(&mut Resp3Frame) -> Result<bool, E>,
) -> Result<bool, E> {
    if resp3 {
        let (mut frame, _) = redis_protocol::resp3::decode::complete::decode_bytes(raw)
            .map_err(decode_error)?
            .ok_or_else(incomplete)?;
        if !edit3(&mut frame)? {
            return Ok(false);
        }
        keep_written(out, |out| {
            redis_protocol::resp3::encode::complete::extend_encode(out, &frame, false)
        })?;
    } else {
        let (mut frame, _) = redis_protocol::resp2::decode::decode_bytes(raw)
            .map_err(decode_error)?
            .ok_or_else(incomplete)?;
        if !edit2(&mut frame)? {
            return Ok(false);
        }
        keep_written(out, |out| {
            redis_protocol::resp2::encode::extend_encode(out, &frame, false)
        })?;
    }
    Ok(true)
}

/// Writes the reply of `EXEC`: each element of the array is transformed by
/// the plan of the command queued in its place. A null (a `WATCH`ed key
/// changed) or an error (`EXECABORT`) passes as it is. An element whose
/// value fails to open becomes an error element; the others are kept.
/// Returns the command and error of each element that failed to open.
pub fn transform_exec(
    plans: &[Plan],
    raw: Bytes,
    resp3: bool,
    out: &mut BytesMut,
) -> Result<Vec<(&'static str, OpenError)>, ProtocolError> {
    let untouched = !raw.starts_with(b"*")
        || raw.starts_with(b"*-1")
        || !plans.iter().any(Plan::transforms_reply);
    if untouched {
        out.extend_from_slice(&raw);
        return Ok(Vec::new());
    }

    // One of the two edits runs, depending on the protocol.
    let (mut failed, mut failed3) = (Vec::new(), Vec::new());
    edit_frame::<ProtocolError>(
        &raw,
        resp3,
        out,
        |f| {
            failed = apply_each(f, plans);
            Ok(true)
        },
        |f| {
            failed3 = apply_each(f, plans);
            Ok(true)
        },
    )?;
    failed.append(&mut failed3);
    Ok(failed)
}

fn apply_each<F: ReplyTree>(frame: &mut F, plans: &[Plan]) -> Vec<(&'static str, OpenError)> {
    let mut failed = Vec::new();
    let Some(items) = frame.items_mut() else {
        return failed;
    };
    for (item, plan) in items.iter_mut().zip(plans) {
        if plan.transforms_reply()
            && let Err(e) = apply(item, plan)
        {
            tracing::warn!(command = plan.command, error = %e, "a value could not be opened");
            *item = F::error(&format!("ERR redcloak could not open a stored value: {e}"));
            failed.push((plan.command, e));
        }
    }
    failed
}

/// The payload of a frame that is one bulk string, already measured by the
/// scanner (so its length and line ending are known to be consistent).
fn bulk_payload(raw: &[u8]) -> Option<&[u8]> {
    let rest = raw.strip_prefix(b"$")?;
    let header_end = rest.iter().position(|&b| b == b'\r')?;
    let len: usize = std::str::from_utf8(&rest[..header_end])
        .ok()?
        .parse()
        .ok()?;
    rest.get(header_end + 2..header_end + 2 + len)
}

/// Runs a redis-protocol encoder and keeps only the bytes it wrote.
///
/// The encoders grow the buffer by an estimate first and zero-fill it; the
/// estimate counts a number's digits through a float logarithm, which is
/// one too many for numbers just under a power of ten from 10^16 up (found
/// by the reply_path fuzz target). Left in place, that zero byte would
/// follow the reply and put the client's stream out of step. On error
/// nothing is kept.
fn keep_written(
    out: &mut BytesMut,
    encode: impl FnOnce(&mut BytesMut) -> Result<usize, redis_protocol::error::RedisProtocolError>,
) -> Result<(), ProtocolError> {
    let start = out.len();
    match encode(out) {
        // The encoders return the offset where their output ends.
        Ok(end) => {
            out.truncate(end);
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(decode_error(e))
        }
    }
}

fn decode_error(e: redis_protocol::error::RedisProtocolError) -> ProtocolError {
    ProtocolError::Decode(e.details().to_string())
}

fn incomplete() -> ProtocolError {
    ProtocolError::Decode("incomplete reply".into())
}

/// The parts of a reply tree the transforms touch, over both protocols'
/// frame types.
trait ReplyTree: Sized {
    fn items_mut(&mut self) -> Option<&mut Vec<Self>>;
    fn blob_mut(&mut self) -> Option<&mut Bytes>;
    /// The values of a RESP3 map; `None` for anything else.
    fn map_values_mut(&mut self) -> Option<Vec<&mut Self>>;
    /// An error frame with this text.
    fn error(text: &str) -> Self;
    /// A null.
    fn null() -> Self;
    /// Applies `f` to every key of a RESP3 map; false for anything else.
    fn rekey_map(&mut self, f: &mut dyn FnMut(&mut Self)) -> bool;
    /// Keeps the entries of a RESP3 map whose key `keep` accepts; false for
    /// anything else.
    fn retain_map(&mut self, keep: &mut dyn FnMut(&mut Self) -> bool) -> bool;
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

    fn map_values_mut(&mut self) -> Option<Vec<&mut Self>> {
        None
    }

    fn error(text: &str) -> Self {
        Resp2Frame::Error(text.into())
    }

    fn null() -> Self {
        Resp2Frame::Null
    }

    fn rekey_map(&mut self, _: &mut dyn FnMut(&mut Self)) -> bool {
        false
    }

    fn retain_map(&mut self, _: &mut dyn FnMut(&mut Self) -> bool) -> bool {
        false
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

    fn map_values_mut(&mut self) -> Option<Vec<&mut Self>> {
        match self {
            Resp3Frame::Map { data, .. } => Some(data.values_mut().collect()),
            _ => None,
        }
    }

    fn error(text: &str) -> Self {
        Resp3Frame::SimpleError {
            data: text.into(),
            attributes: None,
        }
    }

    fn null() -> Self {
        Resp3Frame::Null
    }

    fn rekey_map(&mut self, f: &mut dyn FnMut(&mut Self)) -> bool {
        let Resp3Frame::Map { data, .. } = self else {
            return false;
        };
        *data = std::mem::take(data)
            .into_iter()
            .map(|(mut key, value)| {
                f(&mut key);
                (key, value)
            })
            .collect();
        true
    }

    fn retain_map(&mut self, keep: &mut dyn FnMut(&mut Self) -> bool) -> bool {
        let Resp3Frame::Map { data, .. } = self else {
            return false;
        };
        *data = std::mem::take(data)
            .into_iter()
            .filter_map(|(mut key, value)| keep(&mut key).then_some((key, value)))
            .collect();
        true
    }
}

/// Applies the plan's reply shape to a decoded reply.
fn apply<F: ReplyTree>(frame: &mut F, plan: &Plan) -> Result<(), OpenError> {
    let values = plan.values.as_ref();
    match plan.reply {
        ReplyShape::Plain => Ok(()),
        ReplyShape::Key => {
            strip_in_place(frame, plan);
            Ok(())
        }
        ReplyShape::Keys => {
            if let Some(items) = frame.items_mut() {
                strip_list(items, plan);
            }
            Ok(())
        }
        ReplyShape::ScanKeys => {
            if let Some(keys) = frame
                .items_mut()
                .and_then(|items| items.get_mut(1))
                .and_then(ReplyTree::items_mut)
            {
                strip_list(keys, plan);
            }
            Ok(())
        }
        ReplyShape::StreamKeys => {
            if !frame.rekey_map(&mut |key| strip_in_place(key, plan))
                && let Some(streams) = frame.items_mut()
            {
                for stream in streams {
                    if let Some(key) = stream.items_mut().and_then(|pair| pair.first_mut()) {
                        strip_in_place(key, plan);
                    }
                }
            }
            Ok(())
        }
        ReplyShape::ChannelCounts => {
            if let Some(items) = frame.items_mut() {
                for name in items.iter_mut().step_by(2) {
                    strip_in_place(name, plan);
                }
            }
            Ok(())
        }
        ReplyShape::Commands => {
            let offered = |f: &mut F| {
                f.blob_mut()
                    .is_some_and(|name| crate::command::is_offered(name))
            };
            if !frame.retain_map(&mut |name| offered(name))
                && let Some(items) = frame.items_mut()
            {
                let docs = items.len() % 2 == 0
                    && items.first_mut().is_some_and(|f| f.blob_mut().is_some());
                if docs {
                    // Flat name/doc pairs (RESP2 `COMMAND DOCS`).
                    let mut keep = Vec::with_capacity(items.len());
                    let mut pairs = std::mem::take(items).into_iter();
                    while let (Some(mut name), Some(doc)) = (pairs.next(), pairs.next()) {
                        if offered(&mut name) {
                            keep.push(name);
                            keep.push(doc);
                        }
                    }
                    *items = keep;
                } else {
                    items.retain_mut(|entry| {
                        entry
                            .items_mut()
                            .and_then(|fields| fields.first_mut())
                            .is_some_and(offered)
                    });
                }
            }
            Ok(())
        }
        ReplyShape::CommandsByName => {
            if let Some(items) = frame.items_mut() {
                for entry in items.iter_mut() {
                    let keep = entry
                        .items_mut()
                        .and_then(|fields| fields.first_mut())
                        .is_some_and(|name| {
                            name.blob_mut()
                                .is_some_and(|name| crate::command::is_offered(name))
                        });
                    if !keep {
                        *entry = F::null();
                    }
                }
            }
            Ok(())
        }
        ReplyShape::KeyFirst => {
            if let Some(first) = frame.items_mut().and_then(|items| items.first_mut()) {
                strip_in_place(first, plan);
            }
            Ok(())
        }
        ReplyShape::KeyValue | ReplyShape::KeyValues => {
            let Some(items) = frame.items_mut() else {
                return Ok(());
            };
            if let Some(first) = items.first_mut() {
                strip_in_place(first, plan);
            }
            match (values, items.get_mut(1)) {
                (Some(values), Some(rest)) => open_one_or_many(rest, values),
                _ => Ok(()),
            }
        }
        ReplyShape::Value | ReplyShape::Values => match values {
            Some(values) => open_one_or_many(frame, values),
            None => Ok(()),
        },
        ReplyShape::FieldValues => match values {
            Some(values) => open_field_values(frame, values),
            None => Ok(()),
        },
    }
}

/// Opens a single value, or every value of an array (`LPOP key count`).
fn open_one_or_many<F: ReplyTree>(frame: &mut F, values: &Values) -> Result<(), OpenError> {
    match frame.items_mut() {
        Some(items) => items
            .iter_mut()
            .try_for_each(|item| open_in_place(item, values)),
        None => open_in_place(frame, values),
    }
}

/// Opens the values of field/value pairs: a flat RESP2 array, a RESP3 map,
/// or a RESP3 array of pairs (`HRANDFIELD … WITHVALUES`).
fn open_field_values<F: ReplyTree>(frame: &mut F, values: &Values) -> Result<(), OpenError> {
    if let Some(map_values) = frame.map_values_mut() {
        return map_values
            .into_iter()
            .try_for_each(|v| open_in_place(v, values));
    }
    let Some(items) = frame.items_mut() else {
        return Ok(());
    };
    for (i, item) in items.iter_mut().enumerate() {
        match item.items_mut() {
            Some(pair) => {
                if let Some(value) = pair.get_mut(1) {
                    open_in_place(value, values)?;
                }
            }
            None if i % 2 == 1 => open_in_place(item, values)?,
            None => {}
        }
    }
    Ok(())
}

/// Replaces a sealed value by its plaintext. Plain values pass unless the
/// project is strict; nulls and non-string frames are left alone.
fn open_in_place<F: ReplyTree>(frame: &mut F, values: &Values) -> Result<(), OpenError> {
    let Some(blob) = frame.blob_mut() else {
        return Ok(());
    };
    match values.sealer.open(&values.project, blob)? {
        Opened::Plain(_) if values.strict => Err(OpenError::NotSealed),
        Opened::Plain(_) => Ok(()),
        Opened::Sealed(plaintext) => {
            *blob = Bytes::from(plaintext);
            Ok(())
        }
    }
}

/// Unprefixes one key. A key outside the namespace can't come from a
/// rewritten request; should one appear anyway it is emptied, never shown
/// with its prefix.
fn strip_in_place<F: ReplyTree>(frame: &mut F, plan: &Plan) {
    if let Some(key) = frame.blob_mut() {
        *key = plan.namespace.strip(key).unwrap_or_default();
    }
}

/// Unprefixes a list of keys, dropping any outside the namespace.
fn strip_list<F: ReplyTree>(items: &mut Vec<F>, plan: &Plan) {
    items.retain_mut(|f| match f.blob_mut() {
        Some(key) => match plan.namespace.strip(key) {
            Some(stripped) => {
                *key = stripped;
                true
            }
            None => false,
        },
        None => true,
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::keyring::{Keyring, Sealer};
    use crate::namespace::Namespace;

    fn plan(reply: ReplyShape, values: Option<Values>) -> Plan {
        Plan {
            command: "test",
            reply,
            namespace: Arc::new(Namespace::for_project("p")),
            values,
        }
    }

    fn values(strict: bool) -> Values {
        let keyring = Keyring::from_env_key("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
            .expect("a valid 32-byte key");
        Values {
            sealer: Arc::new(Sealer::new(keyring, 1024, false)),
            project: Arc::from("p"),
            strict,
        }
    }

    fn bulk(data: &[u8]) -> Vec<u8> {
        let mut out = format!("${}\r\n", data.len()).into_bytes();
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
        out
    }

    #[test]
    fn large_numbers_in_a_rewritten_reply_leave_no_stray_byte() {
        // Found by the reply_path fuzz target: 9999999999999999 was encoded
        // with a zero byte after it.
        let plans = [plan(ReplyShape::Keys, None), plan(ReplyShape::Plain, None)];
        for number in [
            "9999999999999999",
            "-99999999999999999",
            "999999999999999999",
        ] {
            let raw = format!("*2\r\n*0\r\n:{number}\r\n");
            for resp3 in [false, true] {
                let mut out = BytesMut::new();
                transform_exec(&plans, Bytes::from(raw.clone()), resp3, &mut out).unwrap();
                assert_eq!(&out[..], raw.as_bytes(), "{number}, resp3: {resp3}");
            }
        }
    }

    #[test]
    fn scan_reply_loses_its_prefix_in_both_protocols() {
        let p = plan(ReplyShape::ScanKeys, None);
        let a = p.namespace.key(b"a");
        let raw = [
            b"*2\r\n$1\r\n0\r\n*2\r\n".to_vec(),
            bulk(&a),
            bulk(b"other"),
        ]
        .concat();
        for resp3 in [false, true] {
            let mut out = BytesMut::new();
            transform(&p, Bytes::from(raw.clone()), resp3, &mut out).unwrap();
            assert_eq!(&out[..], b"*2\r\n$1\r\n0\r\n*1\r\n$1\r\na\r\n");
        }
    }

    #[test]
    fn plain_replies_are_forwarded_byte_for_byte() {
        let mut out = BytesMut::new();
        let raw = Bytes::from_static(b"%1\r\n+a\r\n:1\r\n");
        transform(&plan(ReplyShape::Plain, None), raw.clone(), true, &mut out).unwrap();
        assert_eq!(&out[..], &raw[..]);
    }

    #[test]
    fn sealed_values_are_opened_in_every_value_shape() {
        let v = values(false);
        let sealed = v.sealer.seal("p", b"secret").unwrap();
        let cases: Vec<(ReplyShape, Vec<u8>, Vec<u8>)> = vec![
            (ReplyShape::Value, bulk(&sealed), bulk(b"secret")),
            (
                ReplyShape::Values,
                [
                    b"*3\r\n".to_vec(),
                    bulk(&sealed),
                    b"$-1\r\n".to_vec(),
                    bulk(b"plain"),
                ]
                .concat(),
                [
                    b"*3\r\n".to_vec(),
                    bulk(b"secret"),
                    b"$-1\r\n".to_vec(),
                    bulk(b"plain"),
                ]
                .concat(),
            ),
            (
                ReplyShape::FieldValues,
                [b"*2\r\n".to_vec(), bulk(b"f"), bulk(&sealed)].concat(),
                [b"*2\r\n".to_vec(), bulk(b"f"), bulk(b"secret")].concat(),
            ),
        ];
        for (shape, raw, expected) in cases {
            let mut out = BytesMut::new();
            transform(
                &plan(shape, Some(v.clone())),
                Bytes::from(raw),
                false,
                &mut out,
            )
            .unwrap();
            assert_eq!(out.to_vec(), expected, "{shape:?}");
        }
    }

    #[test]
    fn resp3_maps_have_their_values_opened() {
        let v = values(false);
        let sealed = v.sealer.seal("p", b"secret").unwrap();
        let raw = [b"%1\r\n".to_vec(), bulk(b"f"), bulk(&sealed)].concat();
        let mut out = BytesMut::new();
        transform(
            &plan(ReplyShape::FieldValues, Some(v)),
            Bytes::from(raw),
            true,
            &mut out,
        )
        .unwrap();
        assert_eq!(
            out.to_vec(),
            [b"%1\r\n".to_vec(), bulk(b"f"), bulk(b"secret")].concat()
        );
    }

    #[test]
    fn a_tampered_value_is_an_error_and_writes_nothing() {
        let v = values(false);
        let mut sealed = v.sealer.seal("p", b"secret").unwrap();
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        let mut out = BytesMut::new();
        let result = transform(
            &plan(ReplyShape::Value, Some(v)),
            Bytes::from(bulk(&sealed)),
            false,
            &mut out,
        );
        assert!(matches!(
            result,
            Err(ReplyError::Open(OpenError::Integrity))
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn strict_projects_refuse_plain_values() {
        let mut out = BytesMut::new();
        let result = transform(
            &plan(ReplyShape::Value, Some(values(true))),
            Bytes::from(bulk(b"plain")),
            false,
            &mut out,
        );
        assert!(matches!(
            result,
            Err(ReplyError::Open(OpenError::NotSealed))
        ));
    }
}
