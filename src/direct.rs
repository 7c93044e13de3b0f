//! A direct client: the proxy's own requests to the upstream, for
//! maintenance work such as `reencrypt` (and, later, admin emulations).
//!
//! Clients' traffic never passes through here. This client sends requests
//! on one upstream link, one at a time or pipelined, and decodes each reply
//! into an owned [`Reply`] after `frame::Scanner` has measured it within
//! limits, so a broken or hostile upstream can neither exhaust memory nor
//! crash the caller. The link speaks RESP2.

use std::fmt;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame as Resp2Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::frame::{self, Limits, ProtocolError, Scanner};
use crate::upstream::{BoxStream, Connector, UpstreamError};

/// The largest reply accepted by default: 1 GiB, room for a 512 MiB string
/// (Redis's own limit) and for large hashes and lists read whole.
pub const DEFAULT_MAX_REPLY_BYTES: usize = 1 << 30;

/// How long one exchange (writing the requests and reading every reply)
/// may take by default. Generous, since reading a large key takes time,
/// but finite, so that a stalled upstream cannot hang a maintenance run.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Bytes reserved before each read from the upstream.
const READ_CHUNK: usize = 16 * 1024;

/// One RESP2 reply, owned.
///
/// RESP2 has two nulls, `$-1` and `*-1`. At the top level of a reply they
/// stay apart ([`Reply::Bulk`]`(None)` and [`Reply::Array`]`(None)`); inside
/// an array the decoder does not tell them apart and both read as
/// `Bulk(None)`, so callers test nested nulls with [`Reply::is_nil`].
///
/// `Debug` shows bulk strings by length only: they hold values and key
/// names, which must not reach logs.
#[derive(Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`, `+QUEUED`, `+string` (from `TYPE`), ...
    Status(Bytes),
    /// `-ERR ...`: the text after the `-`.
    Error(Bytes),
    Integer(i64),
    Bulk(Option<Bytes>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// Whether the reply is either RESP2 null.
    pub fn is_nil(&self) -> bool {
        matches!(self, Reply::Bulk(None) | Reply::Array(None))
    }

    /// Whether the reply is the status `text` (`OK`, `QUEUED`, ...).
    pub fn is_status(&self, text: &str) -> bool {
        matches!(self, Reply::Status(status) if status == text.as_bytes())
    }

    /// The text of an error reply, lossily decoded, for messages. Redis's
    /// error texts name commands and types, never values.
    pub fn error_text(&self) -> Option<String> {
        match self {
            Reply::Error(text) => Some(String::from_utf8_lossy(text).into_owned()),
            _ => None,
        }
    }

    /// The bytes of a bulk string or status.
    pub fn into_bytes(self) -> Option<Bytes> {
        match self {
            Reply::Bulk(Some(bytes)) | Reply::Status(bytes) => Some(bytes),
            _ => None,
        }
    }

    /// The elements of a non-null array.
    pub fn into_array(self) -> Option<Vec<Reply>> {
        match self {
            Reply::Array(Some(items)) => Some(items),
            _ => None,
        }
    }

    /// Converts a decoded frame. `top_null_is_array` says how a null at the
    /// top level was written, which the decoded frame no longer shows.
    fn from_frame(frame: Resp2Frame, top_null_is_array: bool) -> Reply {
        match frame {
            Resp2Frame::SimpleString(text) => Reply::Status(text),
            Resp2Frame::Error(text) => Reply::Error(text.into_inner()),
            Resp2Frame::Integer(n) => Reply::Integer(n),
            Resp2Frame::BulkString(bytes) => Reply::Bulk(Some(bytes)),
            Resp2Frame::Array(items) => Reply::Array(Some(
                items
                    .into_iter()
                    .map(|item| Reply::from_frame(item, false))
                    .collect(),
            )),
            Resp2Frame::Null if top_null_is_array => Reply::Array(None),
            Resp2Frame::Null => Reply::Bulk(None),
        }
    }
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Status(text) => write!(f, "Status({:?})", String::from_utf8_lossy(text)),
            Reply::Error(text) => write!(f, "Error({:?})", String::from_utf8_lossy(text)),
            Reply::Integer(n) => write!(f, "Integer({n})"),
            Reply::Bulk(None) => f.write_str("Bulk(nil)"),
            Reply::Bulk(Some(bytes)) => write!(f, "Bulk({} bytes)", bytes.len()),
            Reply::Array(None) => f.write_str("Array(nil)"),
            Reply::Array(Some(items)) => f.debug_tuple("Array").field(items).finish(),
        }
    }
}

/// Why an exchange failed. An error *reply* is not one of these: it comes
/// back as [`Reply::Error`]. After any of these the link is unusable, since
/// replies may still be on their way, and every later call fails with
/// [`DirectError::Broken`]; the caller connects again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirectError {
    /// The link failed: I/O, a close, or a malformed or oversized reply.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),

    /// The upstream did not answer within the call timeout.
    #[error("the upstream did not reply within {} seconds", .0.as_secs())]
    Timeout(Duration),

    /// An earlier exchange on this link failed.
    #[error("the upstream link is unusable after an earlier failure")]
    Broken,
}

/// A request/response client over one authenticated upstream link.
///
/// Not shared: one owner sends, waits for every reply, and sends again, so
/// a reply can only belong to the request it answers. `WATCH`/`MULTI`
/// state lives on the link, which is what compare-and-set callers want.
pub struct DirectClient {
    stream: BoxStream,
    buf: BytesMut,
    scanner: Scanner,
    limits: Limits,
    timeout: Duration,
    /// Set while an exchange is under way and left set if it fails.
    broken: bool,
}

impl fmt::Debug for DirectClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectClient")
            .field("max_reply_bytes", &self.limits.max_bytes)
            .field("timeout", &self.timeout)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl DirectClient {
    /// Opens and authenticates a link with the proxy's own credentials.
    pub async fn connect(connector: &Connector) -> Result<DirectClient, UpstreamError> {
        Ok(DirectClient::over(connector.connect().await?))
    }

    /// A client over a stream that is already connected and authenticated,
    /// with the default limits.
    pub fn over(stream: BoxStream) -> DirectClient {
        DirectClient {
            stream,
            buf: BytesMut::new(),
            scanner: Scanner::for_replies(),
            limits: Limits::reply(DEFAULT_MAX_REPLY_BYTES),
            timeout: DEFAULT_CALL_TIMEOUT,
            broken: false,
        }
    }

    /// Changes the largest reply accepted; a larger one fails the exchange.
    pub fn with_max_reply_bytes(mut self, max_reply_bytes: usize) -> DirectClient {
        self.limits = Limits::reply(max_reply_bytes);
        self
    }

    /// Changes how long one exchange may take.
    pub fn with_timeout(mut self, timeout: Duration) -> DirectClient {
        self.timeout = timeout;
        self
    }

    /// Sends one request and returns its reply.
    pub async fn call(&mut self, args: &[&[u8]]) -> Result<Reply, DirectError> {
        let mut replies = self.call_many(&[args]).await?;
        Ok(replies
            .pop()
            .expect("call_many returns exactly one reply per request"))
    }

    /// Sends the requests in one write (a pipeline) and returns their
    /// replies in order, one per request. The timeout covers the whole
    /// exchange.
    pub async fn call_many(&mut self, requests: &[&[&[u8]]]) -> Result<Vec<Reply>, DirectError> {
        if self.broken {
            return Err(DirectError::Broken);
        }

        let mut out = BytesMut::new();
        for args in requests {
            frame::put_request(&mut out, args.iter().copied());
        }

        self.broken = true;
        let timeout = self.timeout;
        let exchange = async {
            self.stream.write_all(&out).await?;
            let mut replies = Vec::with_capacity(requests.len());
            while replies.len() < requests.len() {
                replies.push(self.read_reply().await?);
            }
            Ok::<_, UpstreamError>(replies)
        };
        let replies = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| DirectError::Timeout(timeout))??;
        self.broken = false;
        Ok(replies)
    }

    async fn read_reply(&mut self) -> Result<Reply, UpstreamError> {
        loop {
            if let Some(len) = self.scanner.measure(&self.buf, &self.limits)? {
                let frame = self.buf.split_to(len).freeze();
                return Ok(decode(&frame)?);
            }
            self.buf.reserve(READ_CHUNK);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(UpstreamError::Closed);
            }
        }
    }
}

/// Decodes one measured frame, which must be exactly one RESP2 value.
fn decode(frame: &Bytes) -> Result<Reply, ProtocolError> {
    let decoded = redis_protocol::resp2::decode::decode_bytes(frame)
        .map_err(|e| ProtocolError::Decode(e.details().to_string()))?;
    match decoded {
        Some((value, used)) if used == frame.len() => {
            Ok(Reply::from_frame(value, frame.first() == Some(&b'*')))
        }
        _ => Err(ProtocolError::Decode(
            "a reply frame did not decode as one RESP2 value".to_owned(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn pair() -> (DirectClient, DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        (DirectClient::over(Box::new(ours)), theirs)
    }

    fn bulk(text: &str) -> Reply {
        Reply::Bulk(Some(Bytes::copy_from_slice(text.as_bytes())))
    }

    /// Reads what the client sent, up to `len` bytes.
    async fn received(upstream: &mut DuplexStream, len: usize) -> Vec<u8> {
        let mut got = vec![0u8; len];
        upstream.read_exact(&mut got).await.unwrap();
        got
    }

    #[tokio::test]
    async fn call_sends_a_multibulk_request_and_decodes_every_reply_kind() {
        let (mut client, mut upstream) = pair();
        upstream
            .write_all(b"*6\r\n+OK\r\n-ERR no\r\n:-7\r\n$3\r\nabc\r\n$-1\r\n*1\r\n*-1\r\n")
            .await
            .unwrap();

        let reply = client.call(&[b"GET", b"k"]).await.unwrap();
        let expected = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
        assert_eq!(received(&mut upstream, expected.len()).await, expected);
        let Reply::Array(Some(items)) = reply else {
            panic!("not an array: {reply:?}");
        };
        assert_eq!(items[0], Reply::Status(Bytes::from_static(b"OK")));
        assert_eq!(items[1].error_text().as_deref(), Some("ERR no"));
        assert_eq!(items[2], Reply::Integer(-7));
        assert_eq!(items[3], bulk("abc"));
        assert!(items[4].is_nil());
        assert!(items[5].clone().into_array().unwrap()[0].is_nil());
    }

    #[tokio::test]
    async fn top_level_nulls_keep_their_kind() {
        let (mut client, mut upstream) = pair();
        upstream.write_all(b"$-1\r\n*-1\r\n").await.unwrap();
        let replies = client.call_many(&[&[b"GET"], &[b"EXEC"]]).await.unwrap();
        assert_eq!(replies, [Reply::Bulk(None), Reply::Array(None)]);
    }

    #[tokio::test]
    async fn pipelined_replies_split_across_reads_come_back_in_order() {
        let (mut client, mut upstream) = pair();
        let writer = tokio::spawn(async move {
            for piece in [&b"+QUE"[..], b"UED\r\n$5\r\nhel", b"lo\r\n:4", b"2\r\n"] {
                upstream.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            upstream
        });

        let replies = client
            .call_many(&[&[b"A"], &[b"B"], &[b"C"]])
            .await
            .unwrap();
        assert!(replies[0].is_status("QUEUED"));
        assert_eq!(replies[1], bulk("hello"));
        assert_eq!(replies[2], Reply::Integer(42));
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn an_oversized_reply_fails_and_leaves_the_link_broken() {
        let (client, mut upstream) = pair();
        let mut client = client.with_max_reply_bytes(8);
        upstream.write_all(b"$100\r\n").await.unwrap();

        let error = client.call(&[b"GET", b"k"]).await.unwrap_err();
        assert!(matches!(
            error,
            DirectError::Upstream(UpstreamError::Protocol(ProtocolError::TooLarge))
        ));
        assert!(matches!(
            client.call(&[b"PING"]).await,
            Err(DirectError::Broken)
        ));
    }

    #[tokio::test]
    async fn a_silent_upstream_times_out_and_a_closed_one_is_reported() {
        let (client, _upstream) = pair();
        let mut client = client.with_timeout(Duration::from_millis(50));
        assert!(matches!(
            client.call(&[b"PING"]).await,
            Err(DirectError::Timeout(_))
        ));
        assert!(matches!(
            client.call(&[b"PING"]).await,
            Err(DirectError::Broken)
        ));

        let (mut client, upstream) = pair();
        drop(upstream);
        assert!(matches!(
            client.call(&[b"PING"]).await,
            Err(DirectError::Upstream(_))
        ));
    }

    #[tokio::test]
    async fn malformed_replies_are_errors_not_panics() {
        for garbage in [
            &b"?what\r\n"[..],
            b"$3\r\nabcd\r\n",
            b":12x\r\n",
            b"*1\r\n!3\r\nabc\r\n",
        ] {
            let (mut client, mut upstream) = pair();
            upstream.write_all(garbage).await.unwrap();
            let outcome = client.call(&[b"PING"]).await;
            assert!(
                matches!(outcome, Err(DirectError::Upstream(_))),
                "{garbage:?} gave {outcome:?}"
            );
        }
    }

    #[test]
    fn debug_shows_bulk_lengths_not_bytes() {
        let reply = Reply::Array(Some(vec![bulk("secret"), Reply::Bulk(None)]));
        let printed = format!("{reply:?}");
        assert_eq!(printed, "Array([Bulk(6 bytes), Bulk(nil)])");
    }
}
