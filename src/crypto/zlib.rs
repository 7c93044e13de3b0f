//! Per-thread zlib streams for the compression step of sealing and opening.
//!
//! Setting up a deflate or inflate stream costs far more than compressing a
//! few kilobytes: its window and hash tables are allocated and zeroed. So
//! every thread that seals or opens keeps one stream of each kind, resets it
//! per value, and keeps a scratch buffer for the bytes it produces. The price
//! is a few hundred KiB held by each thread that has compressed a value.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::OpenError;

/// zlib level 1: values are compressed on the request path, where latency
/// matters more than the last few percent of size.
///
/// With the zlib-rs backend, level 1 codes literals with the fixed Huffman
/// table only. Text with repeats still shrinks, but values drawn from a
/// small alphabet without repeats (hex, base64, redis-benchmark's payloads)
/// no longer shrink and are stored uncompressed, after a probe of their
/// first bytes (see [`PROBE_LEN`]). Level 2 would compress them (base64 to
/// about 76%) at roughly the cost of miniz_oxide's level 1; level 1 was
/// kept because it gave the higher SET throughput.
const LEVEL: Compression = Compression::fast();

/// Scratch buffers that grew past this are released after use, so that one
/// huge value does not pin its size in memory on a thread for good.
const KEEP_SCRATCH: usize = 256 * 1024;

/// The first output buffer for inflating, when the scratch is smaller:
/// enough for most values, so that they inflate in one call.
const FIRST_INFLATE_LEN: usize = 16 * 1024;

/// A reusable stream and the buffer it writes into. The buffer is kept
/// initialized (zeroed when it grows) because the streams write into slices.
struct Stream<S> {
    stream: S,
    out: Vec<u8>,
}

impl<S> Stream<S> {
    /// Makes `out` at least `len` bytes long.
    fn grow_to(&mut self, len: usize) {
        if self.out.len() < len {
            self.out.resize(len, 0);
        }
    }

    fn release_if_large(&mut self) {
        if self.out.len() > KEEP_SCRATCH {
            self.out = Vec::new();
        }
    }
}

thread_local! {
    static DEFLATE: RefCell<Stream<Compress>> = RefCell::new(Stream {
        stream: Compress::new(LEVEL, true),
        out: Vec::new(),
    });
    static INFLATE: RefCell<Stream<Decompress>> = RefCell::new(Stream {
        stream: Decompress::new(true),
        out: Vec::new(),
    });
}

/// Values of at least twice this length are compressed in two steps: this
/// many bytes first, flushed so that their compressed size is known, then
/// the rest. If the first step gained nothing at all, the value is most
/// likely compressed, encrypted or random already (images, archives,
/// tokens), and compressing the rest would be a wasted pass over it.
///
/// The price: a value whose first bytes are incompressible but whose rest
/// would have saved 10% is stored uncompressed. The flush between the steps
/// costs a few bytes of output on values that do compress.
const PROBE_LEN: usize = 512;

/// Compresses `plaintext` into one zlib stream (RFC 1950) and hands it to
/// `f`, or hands `None` if the stream is longer than `budget` bytes or the
/// value's first [`PROBE_LEN`] bytes did not shrink. Compression stops as
/// soon as either is known, so a value that does not compress is compressed
/// only once, and only that far.
pub(super) fn with_compressed<R>(
    plaintext: &[u8],
    budget: usize,
    f: impl FnOnce(Option<&[u8]>) -> R,
) -> R {
    // Resetting the stream alone clears a 128 KiB table; a value that the
    // probe would refuse is refused before that.
    if plaintext.len() >= 2 * PROBE_LEN && !may_shrink(&plaintext[..PROBE_LEN]) {
        return f(None);
    }
    DEFLATE.with(|cell| {
        let mut deflate = cell.borrow_mut();
        let deflate = &mut *deflate;

        // Reset before use rather than after, so a stream abandoned halfway
        // (budget spent, or a panic in `f`) never leaks into the next value.
        deflate.stream.reset();
        deflate.grow_to(budget);
        let out = &mut deflate.out[..budget];
        let len = compress_within(&mut deflate.stream, plaintext, out);
        let result = f(len.map(|len| &deflate.out[..len]));
        deflate.release_if_large();
        result
    })
}

/// Whether level-1 deflate could possibly shrink `probe`. That level codes
/// every byte it cannot match against earlier input with 8 or 9 bits, and
/// it matches only runs of 4 bytes or more seen before. A match of n bytes
/// saves about n - 3 bytes, as many as the repeated 4-byte runs it holds,
/// and the zlib header, block header and flush cost about
/// 8, so a probe with fewer repeated 4-byte runs than that cannot shrink.
/// Counting them with a small table costs far less than a deflate pass;
/// hash collisions only undercount.
fn may_shrink(probe: &[u8]) -> bool {
    const SLOTS_BITS: u32 = 10;
    const NOT_SEEN: u16 = u16::MAX;
    const OVERHEAD: usize = 8;

    // The position where each slot's 4-byte run was last seen.
    let mut last_seen = [NOT_SEEN; 1 << SLOTS_BITS];
    let mut repeats = 0;
    for (pos, run) in probe.windows(4).enumerate() {
        let word = u32::from_le_bytes([run[0], run[1], run[2], run[3]]);
        let slot = (word.wrapping_mul(0x9E37_79B1) >> (32 - SLOTS_BITS)) as usize;
        let earlier = usize::from(last_seen[slot]);
        if probe.get(earlier..earlier + 4) == Some(run) {
            repeats += 1;
            if repeats >= OVERHEAD {
                return true;
            }
        }
        last_seen[slot] = u16::try_from(pos).unwrap_or(NOT_SEEN);
    }
    false
}

/// Runs a freshly reset `stream` over `plaintext` into `out`; the length
/// of the stream if it fit and the probe (see [`PROBE_LEN`]) found it worth
/// it.
fn compress_within(stream: &mut Compress, plaintext: &[u8], out: &mut [u8]) -> Option<usize> {
    let mut rest = plaintext;
    if plaintext.len() >= 2 * PROBE_LEN {
        let (head, tail) = plaintext.split_at(PROBE_LEN);
        stream.compress(head, out, FlushCompress::Sync).ok()?;
        let shrank =
            counted(stream.total_in()) == PROBE_LEN && counted(stream.total_out()) < PROBE_LEN;
        if !shrank {
            return None;
        }
        rest = tail;
    }
    let room = out.get_mut(counted(stream.total_out())..)?;
    let status = stream.compress(rest, room, FlushCompress::Finish).ok()?;
    (status == Status::StreamEnd).then(|| counted(stream.total_out()))
}

/// Inflates the zlib stream `compressed` and hands the bytes to `f`. Stops
/// with [`OpenError::TooLarge`] as soon as the output passes `limit` bytes,
/// whatever the real size, so a hostile stream cannot exhaust memory.
pub(super) fn with_inflated<R>(
    compressed: &[u8],
    limit: usize,
    f: impl FnOnce(&[u8]) -> R,
) -> Result<R, OpenError> {
    INFLATE.with(|cell| {
        let mut inflate = cell.borrow_mut();
        let inflate = &mut *inflate;
        inflate.stream.reset(true);

        // One byte more than the limit is enough to know it was passed.
        let cap = limit.saturating_add(1);
        let mut want = inflate
            .out
            .len()
            .max(FIRST_INFLATE_LEN)
            .max(compressed.len().saturating_mul(4))
            .min(cap);
        let len = loop {
            inflate.grow_to(want);
            let (read, written) = totals(&inflate.stream);
            let status = inflate
                .stream
                .decompress(
                    &compressed[read..],
                    &mut inflate.out[written..want],
                    FlushDecompress::None,
                )
                .map_err(|_| OpenError::Decompress)?;
            let (now_read, now_written) = totals(&inflate.stream);

            if now_written > limit {
                return Err(OpenError::TooLarge { limit });
            }
            match status {
                Status::StreamEnd => break now_written,
                // Output full: double it, up to one byte past the limit.
                _ if now_written == want => want = want.saturating_mul(2).min(cap),
                // Input left and room left: zlib stopped early; call again.
                _ if now_read < compressed.len() && (now_read, now_written) != (read, written) => {}
                // All input read, no end of stream: truncated.
                _ => return Err(OpenError::Decompress),
            }
        };

        let result = f(&inflate.out[..len]);
        inflate.release_if_large();
        Ok(result)
    })
}

/// Bytes read and written by the stream since its reset.
fn totals(stream: &Decompress) -> (usize, usize) {
    (counted(stream.total_in()), counted(stream.total_out()))
}

/// A stream's count of bytes read or written since its reset. The bytes
/// went through slices, so the count fits in `usize`.
fn counted(count: u64) -> usize {
    usize::try_from(count).expect("a stream counts only bytes of slices it was given")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the probe costs in deflate: the compressed size of `probe`
    /// alone, flushed as the two-step compression flushes it.
    fn deflated_len(probe: &[u8]) -> usize {
        let mut stream = Compress::new(LEVEL, true);
        let mut out = vec![0; probe.len() * 2 + 64];
        stream
            .compress(probe, &mut out, FlushCompress::Sync)
            .unwrap();
        usize::try_from(stream.total_out()).unwrap()
    }

    /// `count` bytes from a fixed sequence, each from the first `alphabet`
    /// byte values counted from `base`.
    fn sequence(count: usize, base: u8, alphabet: u32, seed: u32) -> Vec<u8> {
        let mut state = seed;
        (0..count)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                base.wrapping_add(((state >> 16) % alphabet) as u8)
            })
            .collect()
    }

    #[test]
    fn a_probe_judged_unshrinkable_does_not_shrink_under_deflate() {
        let mut probes = vec![
            sequence(PROBE_LEN, 0, 256, 1),
            sequence(PROBE_LEN, b'0', 64, 1234),
            sequence(PROBE_LEN, b'a', 16, 99),
        ];
        // A few short repeats: still below what deflate needs to gain.
        let mut few_repeats = sequence(PROBE_LEN, 0, 256, 5);
        few_repeats.copy_within(0..8, 300);
        probes.push(few_repeats);

        let mut judged = 0;
        for probe in &probes {
            if !may_shrink(probe) {
                judged += 1;
                assert!(deflated_len(probe) >= probe.len());
            }
        }
        assert!(judged >= 3, "random-looking probes are judged unshrinkable");
    }

    #[test]
    fn a_probe_with_repeats_goes_to_deflate() {
        let text = b"{\"user\":\"ada\",\"role\":\"admin\",\"active\":true},".repeat(12);
        assert!(may_shrink(&text[..PROBE_LEN]));
        assert!(deflated_len(&text[..PROBE_LEN]) < PROBE_LEN);

        let mut one_long_run = sequence(PROBE_LEN, 0, 256, 3);
        one_long_run.copy_within(0..64, 400);
        assert!(may_shrink(&one_long_run));
    }

    #[test]
    fn with_compressed_gives_a_stream_that_inflates_to_the_input() {
        let value = b"abcdefgh".repeat(600);
        let compressed = with_compressed(&value, value.len(), |c| c.map(<[u8]>::to_vec));
        let compressed = compressed.expect("repetitive text compresses");
        let inflated = with_inflated(&compressed, value.len(), <[u8]>::to_vec).unwrap();
        assert_eq!(inflated, value);
    }
}
