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
/// no longer reach the 10% saving and are stored uncompressed, after a
/// compression attempt that cost a full pass. Level 2 would compress them
/// (base64 to about 76%) at roughly the cost of the old backend's level 1;
/// level 1 was kept because it gave the higher SET throughput.
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

/// Compresses `plaintext` into one zlib stream (RFC 1950) and hands it to
/// `f`, or hands `None` if the stream is longer than `budget` bytes.
/// Compression stops as soon as the budget is spent, so a value that does
/// not compress is compressed only once, and only that far.
pub(super) fn with_compressed<R>(
    plaintext: &[u8],
    budget: usize,
    f: impl FnOnce(Option<&[u8]>) -> R,
) -> R {
    DEFLATE.with(|cell| {
        let mut deflate = cell.borrow_mut();
        let deflate = &mut *deflate;

        // Reset before use rather than after, so a stream abandoned halfway
        // (budget spent, or a panic in `f`) never leaks into the next value.
        deflate.stream.reset();
        deflate.grow_to(budget);
        let out = &mut deflate.out[..budget];
        let status = deflate
            .stream
            .compress(plaintext, out, FlushCompress::Finish);

        let len = usize::try_from(deflate.stream.total_out())
            .expect("the stream wrote into a slice, so its total fits in usize");
        let compressed = matches!(status, Ok(Status::StreamEnd)).then(|| &deflate.out[..len]);
        let result = f(compressed);
        deflate.release_if_large();
        result
    })
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
    let total = |count: u64| {
        usize::try_from(count)
            .expect("the stream read and wrote slices, so its totals fit in usize")
    };
    (total(stream.total_in()), total(stream.total_out()))
}
