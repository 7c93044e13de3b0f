//! RESP framing: finding where one frame ends, decoding requests, and
//! writing the replies the proxy makes itself.
//!
//! Every byte here comes from a client or the upstream and is untrusted, so
//! a frame is first measured by `Scanner`, which walks it without recursion
//! and enforces the size, count and depth limits; only a complete, bounded
//! frame is handed to `redis-protocol` for decoding. Frames the proxy does
//! not change are forwarded as the exact bytes that were read.

use bytes::{BufMut, Bytes, BytesMut};

/// Longest inline command or protocol line, as Redis's `PROTO_INLINE_MAX_SIZE`.
pub const MAX_LINE: usize = 64 * 1024;

/// Before authentication Redis accepts at most this many arguments and
/// bulk strings of at most this size; the proxy does the same, so an
/// unauthenticated peer can't make it buffer large requests.
pub const UNAUTHENTICATED_MAX_ARGS: u64 = 10;
pub const UNAUTHENTICATED_MAX_BULK: u64 = 16 * 1024;

/// Limits on one frame.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest frame in all.
    pub max_bytes: u64,
    /// Largest bulk string.
    pub max_bulk: u64,
    /// Most elements of one aggregate.
    pub max_elements: u64,
    /// Deepest nesting of aggregates (1 = a flat array, as requests are).
    pub max_depth: usize,
}

impl Limits {
    /// Limits for client requests: flat arrays of bulk strings.
    pub fn request(max_request_bytes: usize, authenticated: bool) -> Limits {
        if authenticated {
            Limits {
                max_bytes: max_request_bytes as u64,
                max_bulk: max_request_bytes as u64,
                max_elements: 1024 * 1024 * 1024,
                max_depth: 1,
            }
        } else {
            Limits {
                max_bytes: UNAUTHENTICATED_MAX_BULK * UNAUTHENTICATED_MAX_ARGS,
                max_bulk: UNAUTHENTICATED_MAX_BULK,
                max_elements: UNAUTHENTICATED_MAX_ARGS,
                max_depth: 1,
            }
        }
    }

    /// Limits for upstream replies. Redis nests replies a few levels deep at
    /// most (`EXEC` of `XREAD` is about five); 64 leaves room and still keeps
    /// the recursive decoder's stack use small.
    pub fn reply(max_reply_bytes: usize) -> Limits {
        Limits {
            max_bytes: max_reply_bytes as u64,
            max_bulk: max_reply_bytes as u64,
            max_elements: u32::MAX as u64,
            max_depth: 64,
        }
    }
}

/// Space a read should find free in its buffer: without it, a read into a
/// full `BytesMut` asks for only 64 more bytes, one small read per call.
const READ_ROOM: usize = 16 * 1024;

/// Makes room for the next read into `buf`, reusing its storage when every
/// frame split off it has been dropped.
pub fn make_room(buf: &mut BytesMut) -> &mut BytesMut {
    if buf.capacity() - buf.len() < READ_ROOM / 4 {
        buf.reserve(READ_ROOM);
    }
    buf
}

/// A malformed or oversized frame. The text is the error reply Redis gives
/// for the same fault (without the leading `-`); the connection is closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("ERR Protocol error: invalid multibulk length")]
    InvalidMultibulkLength,
    #[error("ERR Protocol error: invalid bulk length")]
    InvalidBulkLength,
    #[error("ERR Protocol error: expected '$', got '{0}'")]
    ExpectedBulk(char),
    #[error("ERR Protocol error: too big inline request")]
    LineTooLong,
    #[error("ERR Protocol error: unbalanced quotes in request")]
    UnbalancedQuotes,
    #[error("ERR Protocol error: unauthenticated multibulk length")]
    UnauthenticatedMultibulk,
    #[error("ERR Protocol error: unauthenticated bulk length")]
    UnauthenticatedBulk,
    #[error("ERR Protocol error: request larger than the configured limit")]
    TooLarge,
    #[error("ERR Protocol error: nested too deeply")]
    TooDeep,
    #[error("ERR Protocol error: invalid frame type byte {0:#04x}")]
    InvalidType(u8),
    #[error("ERR Protocol error: invalid number in frame header")]
    InvalidNumber,
    #[error("ERR Protocol error: missing CRLF after bulk string")]
    MissingCrlf,
    #[error("ERR Protocol error: a header line must end with CRLF")]
    LineEnding,
    #[error("ERR Protocol error: streamed RESP3 frames are not supported")]
    Streamed,
    #[error("ERR Protocol error: {0}")]
    Decode(String),
}

/// Measures the first frame in a buffer, resumably: data may arrive in any
/// number of pieces, and each call continues where the last one stopped, so
/// a large frame is walked once in all rather than once per read.
#[derive(Debug, Default)]
pub struct Scanner {
    /// Offset of the next element header to read.
    pos: usize,
    /// Elements still expected by each open aggregate, outermost first.
    open: Vec<u64>,
    /// Whether the frame being scanned is a request (arrays of bulk strings
    /// only, with Redis's unauthenticated limits).
    request: bool,
}

impl Scanner {
    /// A scanner for upstream replies (any RESP2 or RESP3 frame).
    pub fn for_replies() -> Scanner {
        Scanner::default()
    }

    /// A scanner for client requests in multibulk form.
    pub fn for_requests() -> Scanner {
        Scanner {
            request: true,
            ..Scanner::default()
        }
    }

    /// Returns the length of the complete frame at the start of `buf`, or
    /// `None` while more bytes are needed. After `Some`, the scanner is
    /// ready for the next frame (the caller removes the measured bytes).
    pub fn measure(&mut self, buf: &[u8], limits: &Limits) -> Result<Option<usize>, ProtocolError> {
        loop {
            let Some((kind, header, line_end)) = read_line(buf, self.pos)? else {
                return Ok(None);
            };
            if self.request && !self.open.is_empty() && kind != b'$' {
                return Err(ProtocolError::ExpectedBulk(kind as char));
            }

            let after = match kind {
                b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => line_end,
                b'$' | b'!' | b'=' => {
                    if header == b"?" {
                        return Err(ProtocolError::Streamed);
                    }
                    let len = parse_len(header, ProtocolError::InvalidBulkLength)?;
                    match len {
                        None => line_end,
                        Some(len) => {
                            if len > limits.max_bulk {
                                return Err(if self.request && limits.max_depth == 1 {
                                    self.bulk_limit_error(limits)
                                } else {
                                    ProtocolError::TooLarge
                                });
                            }
                            // Bounded by max_bulk above, so the sum can't overflow.
                            let end = line_end + len as usize + 2;
                            if buf.len() < end {
                                return Ok(None);
                            }
                            if &buf[end - 2..end] != b"\r\n" {
                                return Err(ProtocolError::MissingCrlf);
                            }
                            end
                        }
                    }
                }
                b'*' | b'~' | b'>' | b'%' | b'|' => {
                    if header == b"?" {
                        return Err(ProtocolError::Streamed);
                    }
                    let count = parse_len(header, ProtocolError::InvalidMultibulkLength)?;
                    if let Some(count) = count {
                        if count > limits.max_elements {
                            return Err(if self.request && limits.max_elements <= 10 {
                                ProtocolError::UnauthenticatedMultibulk
                            } else {
                                ProtocolError::InvalidMultibulkLength
                            });
                        }
                        let elements = match kind {
                            b'%' => count * 2,
                            // An attribute map is followed by the value it annotates.
                            b'|' => count * 2 + 1,
                            _ => count,
                        };
                        if elements > 0 {
                            if self.open.len() >= limits.max_depth {
                                return Err(ProtocolError::TooDeep);
                            }
                            self.pos = line_end;
                            self.open.push(elements);
                            continue;
                        }
                    }
                    line_end
                }
                other => return Err(ProtocolError::InvalidType(other)),
            };

            if after as u64 > limits.max_bytes + MAX_LINE as u64 {
                return Err(ProtocolError::TooLarge);
            }
            self.pos = after;

            // One element done: close every aggregate it completes.
            loop {
                match self.open.last_mut() {
                    None => {
                        let len = self.pos;
                        self.pos = 0;
                        return Ok(Some(len));
                    }
                    Some(remaining) => {
                        *remaining -= 1;
                        if *remaining > 0 {
                            break;
                        }
                        self.open.pop();
                    }
                }
            }
        }
    }

    fn bulk_limit_error(&self, limits: &Limits) -> ProtocolError {
        if limits.max_elements <= UNAUTHENTICATED_MAX_ARGS {
            ProtocolError::UnauthenticatedBulk
        } else {
            ProtocolError::InvalidBulkLength
        }
    }

    /// Bytes already known to belong to the frame being scanned.
    pub fn progress(&self) -> usize {
        self.pos
    }
}

/// One frame header line: its type byte, the text after it, and the offset
/// just past its line ending.
type HeaderLine<'a> = (u8, &'a [u8], usize);

/// Reads the header line starting at `pos`.
fn read_line(buf: &[u8], pos: usize) -> Result<Option<HeaderLine<'_>>, ProtocolError> {
    let Some(rest) = buf.get(pos..) else {
        return Ok(None);
    };
    let window = &rest[..rest.len().min(MAX_LINE)];
    match window.iter().position(|&b| b == b'\n') {
        None if rest.len() >= MAX_LINE => Err(ProtocolError::LineTooLong),
        None => Ok(None),
        Some(nl) => {
            // A bare LF would end the line here but not in the decoder,
            // which wants CRLF: the two would disagree on where the frame
            // ends. Redis refuses it in multibulk headers as well.
            let Some(line) = rest[..nl].strip_suffix(b"\r") else {
                return Err(ProtocolError::LineEnding);
            };
            match line.split_first() {
                Some((&kind, header)) => Ok(Some((kind, header, pos + nl + 1))),
                // `\r\n` where a header belongs: nothing to read a type from.
                None => Err(ProtocolError::InvalidType(b'\r')),
            }
        }
    }
}

/// Parses a length header: `None` for `-1` (a RESP2 null), an error for
/// anything else that is not a non-negative decimal number.
fn parse_len(text: &[u8], error: ProtocolError) -> Result<Option<u64>, ProtocolError> {
    if text == b"-1" {
        return Ok(None);
    }
    if text.is_empty() || text.len() > 19 || !text.iter().all(u8::is_ascii_digit) {
        return Err(error);
    }
    Ok(Some(
        text.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
    ))
}

/// Splits a measured multibulk request into its arguments (zero-copy
/// slices of `frame`). Every request takes this path, so it walks the frame
/// directly rather than building a general RESP value first; it trusts
/// nothing the scanner checked, so any other input gets an error, never a
/// panic.
pub fn decode_request(frame: &Bytes) -> Result<Vec<Bytes>, ProtocolError> {
    let incomplete = || ProtocolError::Decode("incomplete request".into());
    let (kind, header, mut pos) = read_line(frame, 0)?.ok_or_else(incomplete)?;
    if kind != b'*' {
        return Err(ProtocolError::InvalidMultibulkLength);
    }
    let Some(count) = parse_len(header, ProtocolError::InvalidMultibulkLength)? else {
        return Ok(Vec::new());
    };
    // The capacity is bounded by the frame: each argument takes at least
    // four bytes (`$0\r\n`).
    let mut args = Vec::with_capacity(count.min(frame.len() as u64 / 4) as usize);
    for _ in 0..count {
        let (kind, header, start) = read_line(frame, pos)?.ok_or_else(incomplete)?;
        if kind != b'$' {
            return Err(ProtocolError::ExpectedBulk(kind as char));
        }
        let Some(len) = parse_len(header, ProtocolError::InvalidBulkLength)? else {
            return Err(ProtocolError::ExpectedBulk('?'));
        };
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| start.checked_add(len))
            .filter(|&end| end <= frame.len())
            .ok_or_else(incomplete)?;
        if frame.get(end..end + 2) != Some(b"\r\n".as_slice()) {
            return Err(ProtocolError::MissingCrlf);
        }
        args.push(frame.slice(start..end));
        pos = end + 2;
    }
    if pos != frame.len() {
        return Err(ProtocolError::Decode("bytes after the request".into()));
    }
    Ok(args)
}

/// Splits an inline command line (without its line ending) into arguments
/// the way Redis does: blanks separate, `"…"` takes escapes (`\n`, `\xHH`),
/// `'…'` is literal except `\'`, and a closing quote must be followed by a
/// blank or the end.
pub fn split_inline(line: &[u8]) -> Result<Vec<Bytes>, ProtocolError> {
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == line.len() {
            return Ok(args);
        }

        let mut arg = Vec::new();
        match line[i] {
            b'"' => {
                i += 1;
                loop {
                    match line.get(i) {
                        None => return Err(ProtocolError::UnbalancedQuotes),
                        Some(b'\\') if i + 1 < line.len() => {
                            let hex = line.get(i + 2..i + 4).and_then(hex_byte);
                            match (line[i + 1], hex) {
                                (b'x', Some(byte)) => {
                                    arg.push(byte);
                                    i += 4;
                                    continue;
                                }
                                (b'n', _) => arg.push(b'\n'),
                                (b'r', _) => arg.push(b'\r'),
                                (b't', _) => arg.push(b'\t'),
                                (b'b', _) => arg.push(8),
                                (b'a', _) => arg.push(7),
                                (other, _) => arg.push(other),
                            }
                            i += 2;
                        }
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(&b) => {
                            arg.push(b);
                            i += 1;
                        }
                    }
                }
                ensure_separated(line, i)?;
            }
            b'\'' => {
                i += 1;
                loop {
                    match line.get(i) {
                        None => return Err(ProtocolError::UnbalancedQuotes),
                        Some(b'\\') if line.get(i + 1) == Some(&b'\'') => {
                            arg.push(b'\'');
                            i += 2;
                        }
                        Some(b'\'') => {
                            i += 1;
                            break;
                        }
                        Some(&b) => {
                            arg.push(b);
                            i += 1;
                        }
                    }
                }
                ensure_separated(line, i)?;
            }
            _ => {
                while i < line.len() && !line[i].is_ascii_whitespace() {
                    arg.push(line[i]);
                    i += 1;
                }
            }
        }
        args.push(Bytes::from(arg));
    }
}

fn ensure_separated(line: &[u8], i: usize) -> Result<(), ProtocolError> {
    match line.get(i) {
        Some(b) if !b.is_ascii_whitespace() => Err(ProtocolError::UnbalancedQuotes),
        _ => Ok(()),
    }
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
    let text = std::str::from_utf8(pair).ok()?;
    u8::from_str_radix(text, 16).ok()
}

/// Takes the next complete request off the front of `buf`, in multibulk or
/// inline form. Returns `None` while more bytes are needed; an empty
/// argument list for an empty inline line (Redis ignores those).
pub fn next_request(
    buf: &mut BytesMut,
    scanner: &mut Scanner,
    limits: &Limits,
) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };

    if first == b'*' {
        let Some(len) = scanner.measure(buf, limits)? else {
            return Ok(None);
        };
        let frame = buf.split_to(len).freeze();
        return decode_request(&frame).map(Some);
    }

    let window = &buf[..buf.len().min(MAX_LINE)];
    let Some(nl) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_LINE {
            Err(ProtocolError::LineTooLong)
        } else {
            Ok(None)
        };
    };
    let line = buf.split_to(nl + 1);
    let line = line.strip_suffix(b"\n").unwrap_or(&line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let args = split_inline(line)?;
    if args.len() as u64 > limits.max_elements {
        return Err(ProtocolError::UnauthenticatedMultibulk);
    }
    Ok(Some(args))
}

/// Writes the replies the proxy produces itself, in the client's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyWriter {
    pub resp3: bool,
}

impl ReplyWriter {
    pub fn simple(&self, out: &mut BytesMut, text: &str) {
        out.put_u8(b'+');
        put_line_text(out, text.as_bytes());
    }

    /// An error reply; `text` starts with the error code (`ERR`, `NOAUTH`).
    pub fn error(&self, out: &mut BytesMut, text: &str) {
        out.put_u8(b'-');
        put_line_text(out, text.as_bytes());
    }

    pub fn integer(&self, out: &mut BytesMut, n: i64) {
        out.put_u8(b':');
        out.put_slice(n.to_string().as_bytes());
        out.put_slice(b"\r\n");
    }

    pub fn bulk(&self, out: &mut BytesMut, data: &[u8]) {
        put_bulk(out, data);
    }

    pub fn null(&self, out: &mut BytesMut) {
        out.put_slice(if self.resp3 { b"_\r\n" } else { b"$-1\r\n" });
    }

    pub fn array(&self, out: &mut BytesMut, len: usize) {
        put_length_line(out, b'*', len);
    }

    /// A map of `pairs` entries: `%` in RESP3, a flat array in RESP2.
    pub fn map(&self, out: &mut BytesMut, pairs: usize) {
        if self.resp3 {
            put_length_line(out, b'%', pairs);
        } else {
            self.array(out, pairs * 2);
        }
    }

    /// A verbatim text reply (`=` in RESP3, a bulk string in RESP2).
    pub fn verbatim(&self, out: &mut BytesMut, text: &[u8]) {
        if self.resp3 {
            out.put_u8(b'=');
            put_decimal(out, (text.len() + 4) as u64);
            out.put_slice(b"\r\ntxt:");
            out.put_slice(text);
            out.put_slice(b"\r\n");
        } else {
            self.bulk(out, text);
        }
    }
}

/// Writes text on a status or error line, replacing line breaks so that a
/// message can never end the line early.
fn put_line_text(out: &mut BytesMut, text: &[u8]) {
    out.extend(
        text.iter()
            .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.put_slice(b"\r\n");
}

/// Appends a multibulk request with the given arguments.
pub fn put_request<'a>(out: &mut BytesMut, args: impl ExactSizeIterator<Item = &'a [u8]>) {
    put_length_line(out, b'*', args.len());
    for arg in args {
        put_bulk(out, arg);
    }
}

/// Writes `n` in decimal, as RESP lengths and integers are written, without
/// the allocation `to_string` would make on every frame.
pub fn put_decimal(out: &mut BytesMut, n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut rest = n;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.put_slice(&digits[start..]);
}

/// Writes a type marker and a length on a line of their own: the head of a
/// bulk string (`$`), an array (`*`) or a map (`%`).
pub fn put_length_line(out: &mut BytesMut, marker: u8, len: usize) {
    out.put_u8(marker);
    put_decimal(out, len as u64);
    out.put_slice(b"\r\n");
}

/// Appends one bulk string.
pub fn put_bulk(out: &mut BytesMut, data: &[u8]) {
    put_length_line(out, b'$', data.len());
    out.put_slice(data);
    out.put_slice(b"\r\n");
}

/// Writes a bulk string of `len` bytes whose payload the caller fills in:
/// returns the payload's place (zeroed), between length and line end. Lets
/// a value be produced straight into the output.
pub fn reserve_bulk(out: &mut BytesMut, len: usize) -> &mut [u8] {
    put_length_line(out, b'$', len);
    let at = out.len();
    out.resize(at + len, 0);
    out.put_slice(b"\r\n");
    &mut out[at..at + len]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What redis-protocol's general decoder makes of a request frame: the
    /// reference `decode_request` must agree with.
    fn reference_decode(frame: &Bytes) -> Option<Vec<Bytes>> {
        use redis_protocol::resp2::types::BytesFrame;
        match redis_protocol::resp2::decode::decode_bytes(frame) {
            Ok(Some((BytesFrame::Array(items), used))) if used == frame.len() => items
                .into_iter()
                .map(|item| match item {
                    BytesFrame::BulkString(b) => Some(b),
                    _ => None,
                })
                .collect(),
            Ok(Some((BytesFrame::Null, used))) if used == frame.len() => Some(Vec::new()),
            _ => None,
        }
    }

    fn encode(args: &[Vec<u8>]) -> Bytes {
        let mut out = BytesMut::new();
        out.put_slice(format!("*{}\r\n", args.len()).as_bytes());
        for arg in args {
            out.put_slice(format!("${}\r\n", arg.len()).as_bytes());
            out.put_slice(arg);
            out.put_slice(b"\r\n");
        }
        out.freeze()
    }

    proptest::proptest! {
        #[test]
        fn request_decoding_agrees_with_redis_protocol(
            args in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..40), 0..8),
            cut in 0usize..400,
            flip in proptest::option::of((0usize..400, proptest::num::u8::ANY)),
        ) {
            let frame = encode(&args);
            let decoded = decode_request(&frame).expect("a well-formed request decodes");
            proptest::prop_assert_eq!(Some(decoded.clone()), reference_decode(&frame));
            proptest::prop_assert_eq!(decoded, args.into_iter().map(Bytes::from).collect::<Vec<_>>());

            // A damaged frame that the scanner still takes as one whole
            // request decodes as redis-protocol decodes it; anything else
            // is refused without a panic.
            let mut damaged = frame.to_vec();
            damaged.truncate(cut.min(damaged.len()));
            if let Some((at, byte)) = flip
                && let Some(b) = damaged.get_mut(at)
            {
                *b = byte;
            }
            let damaged = Bytes::from(damaged);
            let limits = Limits::request(1 << 20, true);
            let measured = Scanner::for_requests().measure(&damaged, &limits);
            if matches!(measured, Ok(Some(len)) if len == damaged.len()) {
                proptest::prop_assert_eq!(decode_request(&damaged).ok(), reference_decode(&damaged));
            } else {
                let _ = decode_request(&damaged);
            }
        }
    }

    #[test]
    fn decimals_are_written_as_to_string_writes_them() {
        for n in [0, 1, 9, 10, 99, 100, 4096, 1 << 32, u64::MAX] {
            let mut out = BytesMut::new();
            put_decimal(&mut out, n);
            assert_eq!(&out[..], n.to_string().as_bytes());
        }
    }

    #[test]
    fn request_decoding_refuses_what_is_not_a_multibulk_of_bulk_strings() {
        for frame in [
            &b""[..],
            b"*1\r\n",
            b"*1\r\n:1\r\n",
            b"*1\r\n$-1\r\n",
            b"*1\r\n$3\r\nab\r\n",
            b"*1\r\n$2\r\nab\r\nextra",
            b"+OK\r\n",
            b"*x\r\n",
            b"*1\r\n$99999999999999999999\r\n",
        ] {
            assert!(
                decode_request(&Bytes::from_static(frame)).is_err(),
                "{:?}",
                String::from_utf8_lossy(frame)
            );
        }
        assert_eq!(
            decode_request(&Bytes::from_static(b"*-1\r\n")).unwrap(),
            Vec::<Bytes>::new()
        );
        assert_eq!(
            decode_request(&Bytes::from_static(b"*0\r\n")).unwrap(),
            Vec::<Bytes>::new()
        );
    }

    fn measure_all(input: &[u8], limits: &Limits) -> Result<Option<usize>, ProtocolError> {
        Scanner::for_replies().measure(input, limits)
    }

    const REPLY: Limits = Limits {
        max_bytes: 1 << 20,
        max_bulk: 1 << 20,
        max_elements: 1 << 20,
        max_depth: 8,
    };

    #[test]
    fn measures_simple_frames_of_every_resp3_type() {
        for frame in [
            &b"+OK\r\n"[..],
            b"-ERR x\r\n",
            b":42\r\n",
            b"$3\r\nfoo\r\n",
            b"$-1\r\n",
            b"*-1\r\n",
            b"_\r\n",
            b",1.5\r\n",
            b"#t\r\n",
            b"(12345678901234567890\r\n",
            b"!3\r\nerr\r\n",
            b"=7\r\ntxt:abc\r\n",
            b"*2\r\n$1\r\na\r\n:1\r\n",
            b"%1\r\n+k\r\n+v\r\n",
            b"~0\r\n",
            b">2\r\n+message\r\n+x\r\n",
            b"|1\r\n+key\r\n+val\r\n:5\r\n",
        ] {
            let mut with_tail = frame.to_vec();
            with_tail.extend_from_slice(b"+NEXT\r\n");
            assert_eq!(
                measure_all(&with_tail, &REPLY),
                Ok(Some(frame.len())),
                "{frame:?}"
            );
        }
    }

    #[test]
    fn every_prefix_of_a_frame_is_incomplete_and_resuming_finds_the_end() {
        let frame = b"*3\r\n$3\r\nSET\r\n*2\r\n:1\r\n$-1\r\n%1\r\n+a\r\n$2\r\nbc\r\n";
        for cut in 0..frame.len() {
            let mut scanner = Scanner::for_replies();
            assert_eq!(
                scanner.measure(&frame[..cut], &REPLY),
                Ok(None),
                "cut at {cut}"
            );
            assert_eq!(scanner.measure(frame, &REPLY), Ok(Some(frame.len())));
        }
    }

    #[test]
    fn nesting_beyond_the_limit_is_refused_without_recursion() {
        let deep = b"*1\r\n".repeat(100_000);
        assert_eq!(measure_all(&deep, &REPLY), Err(ProtocolError::TooDeep));
    }

    #[test]
    fn oversized_bulk_is_refused_before_it_arrives() {
        assert_eq!(
            measure_all(b"$2000000\r\n", &REPLY),
            Err(ProtocolError::TooLarge)
        );
    }

    #[test]
    fn garbage_type_bytes_and_numbers_are_errors() {
        assert!(measure_all(b"?x\r\n", &REPLY).is_err());
        assert!(measure_all(b"$abc\r\n", &REPLY).is_err());
        assert!(measure_all(b"*-5\r\n", &REPLY).is_err());
        assert!(measure_all(b"$3\r\nfooXY", &REPLY).is_err());
        assert!(measure_all(b"$?\r\n", &REPLY).is_err());
    }

    #[test]
    fn an_empty_line_where_a_header_belongs_is_an_error_not_a_panic() {
        // Found by the request_path fuzz target: an empty line used to be
        // indexed for its type byte.
        let limits = Limits::request(1 << 20, true);
        for input in [&b"*1\r\n\r\n"[..], b"*2\r\n$1\r\na\r\n\r\n"] {
            assert_eq!(
                Scanner::for_requests().measure(input, &limits),
                Err(ProtocolError::InvalidType(b'\r'))
            );
        }
        assert_eq!(
            measure_all(b"\r\n", &REPLY),
            Err(ProtocolError::InvalidType(b'\r'))
        );
    }

    #[test]
    fn header_lines_must_end_with_crlf() {
        // Found by the reply_path fuzz target: the scanner ended a line at a
        // bare LF, the decoder at the next CRLF, so `+a\n|1\r\n` was one
        // frame to one and the start of another to the other.
        for input in [&b"*1\r\n\n"[..], b"+a\n|1\r\n+b\r\n", b"$1\na\r\n"] {
            assert_eq!(
                measure_all(input, &REPLY),
                Err(ProtocolError::LineEnding),
                "{input:?}"
            );
        }
        let limits = Limits::request(1 << 20, true);
        assert_eq!(
            Scanner::for_requests().measure(b"*1\n$4\r\nPING\r\n", &limits),
            Err(ProtocolError::LineEnding)
        );
    }

    #[test]
    fn requests_must_be_flat_arrays_of_bulk_strings() {
        let limits = Limits::request(1 << 20, true);
        let mut scanner = Scanner::for_requests();
        assert_eq!(
            scanner.measure(b"*2\r\n$3\r\nGET\r\n*1\r\n", &limits),
            Err(ProtocolError::ExpectedBulk('*'))
        );
    }

    #[test]
    fn unauthenticated_requests_get_redis_limits() {
        let limits = Limits::request(1 << 20, false);
        assert_eq!(
            Scanner::for_requests().measure(b"*11\r\n", &limits),
            Err(ProtocolError::UnauthenticatedMultibulk)
        );
        assert_eq!(
            Scanner::for_requests().measure(b"*2\r\n$200000\r\n", &limits),
            Err(ProtocolError::UnauthenticatedBulk)
        );
    }

    #[test]
    fn next_request_reads_multibulk_and_inline_forms() {
        let limits = Limits::request(1 << 20, true);
        let mut scanner = Scanner::for_requests();
        let mut buf =
            BytesMut::from(&b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING hello\r\n\r\n*1\r\n$4\r\nPI"[..]);
        let first = next_request(&mut buf, &mut scanner, &limits)
            .unwrap()
            .unwrap();
        assert_eq!(first, vec![Bytes::from("GET"), Bytes::from("k")]);
        let second = next_request(&mut buf, &mut scanner, &limits)
            .unwrap()
            .unwrap();
        assert_eq!(second, vec![Bytes::from("PING"), Bytes::from("hello")]);
        let empty = next_request(&mut buf, &mut scanner, &limits)
            .unwrap()
            .unwrap();
        assert!(empty.is_empty());
        assert_eq!(next_request(&mut buf, &mut scanner, &limits), Ok(None));
        buf.extend_from_slice(b"NG\r\n");
        let third = next_request(&mut buf, &mut scanner, &limits)
            .unwrap()
            .unwrap();
        assert_eq!(third, vec![Bytes::from("PING")]);
    }

    #[test]
    fn inline_quotes_follow_redis_rules() {
        let args = split_inline(br#"SET "a b" 'c\'d' "\x41\n""#).unwrap();
        assert_eq!(
            args,
            vec![
                Bytes::from("SET"),
                Bytes::from("a b"),
                Bytes::from("c'd"),
                Bytes::from("A\n")
            ]
        );
        assert_eq!(
            split_inline(b"SET \"abc"),
            Err(ProtocolError::UnbalancedQuotes)
        );
        assert_eq!(
            split_inline(b"SET \"a\"b"),
            Err(ProtocolError::UnbalancedQuotes)
        );
    }

    #[test]
    fn an_endless_inline_line_is_refused() {
        let limits = Limits::request(1 << 20, true);
        let mut buf = BytesMut::from(&vec![b'a'; MAX_LINE + 1][..]);
        assert_eq!(
            next_request(&mut buf, &mut Scanner::for_requests(), &limits),
            Err(ProtocolError::LineTooLong)
        );
    }

    #[test]
    fn error_text_cannot_break_the_line() {
        let mut out = BytesMut::new();
        ReplyWriter { resp3: false }.error(&mut out, "ERR bad\r\n+OK");
        assert_eq!(&out[..], b"-ERR bad  +OK\r\n");
    }
}
