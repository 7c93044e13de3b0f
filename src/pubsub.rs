//! Pub/Sub channel names in the namespace: rewriting the channels a client
//! names, and recognising and rewriting the messages Redis pushes back.
//!
//! Channels are shared by every database upstream, so they are namespaced
//! like keys. Keyspace notifications get special care: in
//! `__keyspace@<db>__:<key>` the key part is namespaced, and
//! `__keyevent@<db>__:<event>` channels stay global while their messages
//! (which carry a key name) reach a project only for its own keys.

use bytes::{BufMut, Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame as Resp2Frame;
use redis_protocol::resp3::types::BytesFrame as Resp3Frame;

use crate::command::Channels;
use crate::frame::ProtocolError;
use crate::namespace::Namespace;

const KEYSPACE: &[u8] = b"__keyspace@";
const KEYEVENT: &[u8] = b"__keyevent@";
/// Ends the `__keyspace@<db>` part of a notification channel.
const NOTIFICATION_SEPARATOR: &[u8] = b"__:";

/// The upstream name of a channel or pattern a client names.
pub fn upstream_channel(namespace: &Namespace, kind: Channels, name: &[u8]) -> Bytes {
    if name.starts_with(KEYEVENT) {
        // Global; messages are filtered by the key they carry.
        return Bytes::copy_from_slice(name);
    }
    let confine = |rest: &[u8]| match kind {
        Channels::Pattern => namespace.pattern(rest),
        Channels::Global | Channels::Shard => namespace.key(rest),
    };
    if name.starts_with(KEYSPACE)
        && let Some(at) = find(name, NOTIFICATION_SEPARATOR)
    {
        let head = &name[..at + NOTIFICATION_SEPARATOR.len()];
        let mut out = BytesMut::from(head);
        out.put_slice(&confine(&name[head.len()..]));
        return out.freeze();
    }
    confine(name)
}

/// Whether a client may publish on this channel. Notification channels are
/// Redis's own: a message there could pose as an event of another project.
pub fn may_publish(name: &[u8]) -> bool {
    !name.starts_with(KEYEVENT) && !name.starts_with(KEYSPACE)
}

/// The client's name for an upstream channel or pattern, or `None` when it
/// is not the project's.
fn client_channel(namespace: &Namespace, name: &Bytes) -> Option<Bytes> {
    if name.starts_with(KEYEVENT) {
        return Some(name.clone());
    }
    if name.starts_with(KEYSPACE)
        && let Some(at) = find(name, NOTIFICATION_SEPARATOR)
    {
        let head_len = at + NOTIFICATION_SEPARATOR.len();
        let key = namespace.strip(&name.slice(head_len..))?;
        let mut out = BytesMut::from(&name[..head_len]);
        out.put_slice(&key);
        return Some(out.freeze());
    }
    namespace.strip(name)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// What an upstream Pub/Sub frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushKind {
    /// A published message (`message`, `pmessage`, `smessage`).
    Message,
    /// The confirmation of one channel of a (un)subscribe request.
    Confirmation,
    /// Anything else pushed (client-side caching invalidations, …).
    Other,
}

/// Classifies a frame by its first element, without decoding the rest.
pub fn kind_of(raw: &[u8]) -> PushKind {
    // The kind is the first bulk (or simple) string of the array.
    let mut lines = raw.split(|&b| b == b'\n').skip(1);
    let first = match lines.next() {
        Some(line) if line.starts_with(b"$") => lines.next(),
        Some(line) if line.starts_with(b"+") => Some(&line[1..]),
        _ => None,
    };
    let word = first
        .map(|w| w.strip_suffix(b"\r").unwrap_or(w))
        .unwrap_or_default();
    match word.to_ascii_lowercase().as_slice() {
        b"message" | b"pmessage" | b"smessage" => PushKind::Message,
        b"subscribe" | b"unsubscribe" | b"psubscribe" | b"punsubscribe" | b"ssubscribe"
        | b"sunsubscribe" => PushKind::Confirmation,
        _ => PushKind::Other,
    }
}

/// Rewrites a Pub/Sub frame for the client: channel and pattern names lose
/// the namespace, and a keyevent message about another project's key is
/// dropped (`Ok(false)`, nothing written).
pub fn transform(
    namespace: &Namespace,
    raw: &Bytes,
    resp3: bool,
    out: &mut BytesMut,
) -> Result<bool, ProtocolError> {
    crate::reply::edit_frame::<ProtocolError>(
        raw,
        resp3,
        out,
        |frame| {
            let Resp2Frame::Array(items) = frame else {
                return Ok(false);
            };
            let mut names: Vec<Option<&mut Bytes>> = items
                .iter_mut()
                .map(|item| match item {
                    Resp2Frame::BulkString(data) | Resp2Frame::SimpleString(data) => Some(data),
                    _ => None,
                })
                .collect();
            Ok(rewrite(namespace, &mut names))
        },
        |frame| {
            let (Resp3Frame::Push { data: items, .. } | Resp3Frame::Array { data: items, .. }) =
                frame
            else {
                return Ok(false);
            };
            let mut names: Vec<Option<&mut Bytes>> = items
                .iter_mut()
                .map(|item| match item {
                    Resp3Frame::BlobString { data, .. } | Resp3Frame::SimpleString { data, .. } => {
                        Some(data)
                    }
                    _ => None,
                })
                .collect();
            Ok(rewrite(namespace, &mut names))
        },
    )
}

/// Rewrites the string elements of a Pub/Sub frame in place; false when the
/// frame must not reach the client.
fn rewrite(namespace: &Namespace, items: &mut [Option<&mut Bytes>]) -> bool {
    let kind = match items.first() {
        Some(Some(kind)) => kind.to_ascii_lowercase(),
        _ => return false,
    };
    // Positions of names to unprefix, and of the payload of a message.
    let (names, payload): (&[usize], Option<usize>) = match kind.as_slice() {
        b"message" | b"smessage" => (&[1], Some(2)),
        b"pmessage" => (&[1, 2], Some(3)),
        _ => (&[1], None),
    };

    let mut keyevent = false;
    for &at in names {
        // A null channel (unsubscribing with no subscriptions) stays null.
        let Some(Some(name)) = items.get_mut(at) else {
            continue;
        };
        keyevent |= name.starts_with(KEYEVENT);
        match client_channel(namespace, name) {
            Some(stripped) => **name = stripped,
            None => return false,
        }
    }

    // A keyevent message names the key; only the project's own are shown.
    if keyevent
        && let Some(at) = payload
        && let Some(Some(key)) = items.get_mut(at)
    {
        match namespace.strip(key) {
            Some(stripped) => **key = stripped,
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &[u8]) -> Vec<u8> {
        [
            format!("${}\r\n", s.len()).into_bytes(),
            s.to_vec(),
            b"\r\n".to_vec(),
        ]
        .concat()
    }

    #[test]
    fn channels_patterns_and_keyspace_names_are_namespaced() {
        let ns = Namespace::for_project("billing");
        let p = "project:0c95c7ece1ce1a97:";
        assert_eq!(
            upstream_channel(&ns, Channels::Global, b"news"),
            format!("{p}news")
        );
        assert_eq!(
            upstream_channel(&ns, Channels::Pattern, b"n*"),
            format!("{p}n*")
        );
        assert_eq!(
            upstream_channel(&ns, Channels::Pattern, b"__keyspace@0__:user:*"),
            format!("__keyspace@0__:{p}user:*")
        );
        assert_eq!(
            upstream_channel(&ns, Channels::Global, b"__keyevent@0__:set"),
            "__keyevent@0__:set"
        );
        assert!(!may_publish(b"__keyevent@0__:set"));
        assert!(may_publish(b"news"));
    }

    #[test]
    fn messages_lose_the_prefix_and_foreign_keyevents_are_dropped() {
        let ns = Namespace::for_project("billing");
        let other = Namespace::for_project("shipping");
        let channel = upstream_channel(&ns, Channels::Global, b"news");
        let raw = [
            b"*3\r\n".to_vec(),
            bulk(b"message"),
            bulk(&channel),
            bulk(b"hi"),
        ]
        .concat();
        let mut out = BytesMut::new();
        assert_eq!(kind_of(&raw), PushKind::Message);
        assert!(transform(&ns, &Bytes::from(raw.clone()), false, &mut out).unwrap());
        assert_eq!(
            out.to_vec(),
            [
                b"*3\r\n".to_vec(),
                bulk(b"message"),
                bulk(b"news"),
                bulk(b"hi")
            ]
            .concat()
        );
        assert!(!transform(&other, &Bytes::from(raw), false, &mut BytesMut::new()).unwrap());

        let key = ns.key(b"k");
        let event = [
            b"*3\r\n".to_vec(),
            bulk(b"message"),
            bulk(b"__keyevent@0__:set"),
            bulk(&key),
        ]
        .concat();
        let mut out = BytesMut::new();
        assert!(transform(&ns, &Bytes::from(event.clone()), false, &mut out).unwrap());
        assert!(out.ends_with(&bulk(b"k")));
        assert!(!transform(&other, &Bytes::from(event), false, &mut BytesMut::new()).unwrap());
    }

    #[test]
    fn confirmations_are_recognised_in_both_protocols() {
        let raw2 = [
            b"*3\r\n".to_vec(),
            bulk(b"subscribe"),
            bulk(b"x"),
            b":1\r\n".to_vec(),
        ]
        .concat();
        let raw3 = [
            b">3\r\n".to_vec(),
            bulk(b"psubscribe"),
            bulk(b"x"),
            b":1\r\n".to_vec(),
        ]
        .concat();
        assert_eq!(kind_of(&raw2), PushKind::Confirmation);
        assert_eq!(kind_of(&raw3), PushKind::Confirmation);
        assert_eq!(
            kind_of(b">2\r\n$10\r\ninvalidate\r\n*0\r\n"),
            PushKind::Other
        );
    }
}
