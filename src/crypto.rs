//! Sealing and opening values: the byte format of SPEC §6.
//!
//! The session seals every value a client writes and opens every value the
//! upstream returns. Bytes in, bytes out: no Redis and no keyring. The only
//! state is per thread and never shapes a result: a batch of OS randomness
//! for IVs (`iv`) and reusable zlib streams (`zlib`). `keyring` decides which
//! key a value needs and caches the derived per-project keys;
//! `docs/encryption.md` describes the format for operators.

mod iv;
mod zlib;

use aes::Aes256;
use cbc::cipher::block_padding::Pkcs7;
use cbc::cipher::{Array, BlockModeDecrypt, BlockModeEncrypt, InnerIvInit, KeyInit};
use ring::{hkdf, hmac};

/// The first three bytes of every sealed value.
pub const MAGIC: [u8; 3] = [0x00, 0x52, 0x43];

/// The only format version this build writes and reads.
pub const VERSION: u8 = 0x01;

/// Flag bit 0: the plaintext was zlib-compressed (RFC 1950) before encryption.
pub const FLAG_COMPRESSED: u8 = 0x01;

/// The longest key id the format can carry.
pub const MAX_KEY_ID_LEN: usize = 64;

/// The largest plaintext `open` returns unless told otherwise: 512 MiB, the
/// largest string Redis itself accepts.
pub const DEFAULT_MAX_PLAINTEXT: usize = 512 * 1024 * 1024;

/// The HKDF salt shared by every derivation of format version 1.
const HKDF_SALT: &[u8] = b"redcloak/v1";

const BLOCK_LEN: usize = 16;
const IV_LEN: usize = 16;
const TAG_LEN: usize = 32;
const KEY_LEN: usize = 32;

/// Magic, version, flags and the key id length byte.
const FIXED_HEADER_LEN: usize = MAGIC.len() + 3;

/// The shortest possible sealed value: one-byte key id, one cipher block.
const MIN_SEALED_LEN: usize = FIXED_HEADER_LEN + 1 + IV_LEN + BLOCK_LEN + TAG_LEN;

/// CBC over a borrowed key schedule: nothing is copied per value.
type Encryptor<'a> = cbc::Encryptor<&'a Aes256>;
type Decryptor<'a> = cbc::Decryptor<&'a Aes256>;

/// Why a value could not be sealed. Neither variant is the client's fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The key id does not fit the format: 1 to 64 bytes of `[A-Za-z0-9_.-]`.
    /// A configuration fault; the keyring refuses such ids when it loads.
    #[error("key id {0:?} is not 1 to 64 characters of [A-Za-z0-9_.-]")]
    InvalidKeyId(String),

    /// The operating system's random generator failed to produce an IV.
    #[error("the system random generator failed")]
    Randomness,
}

/// Why a value could not be opened. Messages never contain value bytes, so
/// they can go to logs and to the client as they are.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The value carries the magic but not a well-formed layout (truncated,
    /// unknown version or flags, bad key id, ragged ciphertext). Whoever
    /// wrote the upstream value is at fault.
    #[error("malformed sealed value: {0}")]
    Malformed(&'static str),

    /// The value names a key id that the keyring does not hold (dropped by
    /// `keys prune`, or written by another deployment).
    #[error("sealed value needs key id {0:?}, which is not in the keyring")]
    UnknownKey(String),

    /// The tag does not match: the value was altered, truncated, sealed for
    /// another project, or sealed under another secret with the same id.
    #[error("sealed value failed authentication")]
    Integrity,

    /// The value authenticated but its compressed body is not valid zlib.
    #[error("sealed value failed to decompress")]
    Decompress,

    /// The plaintext would exceed the caller's limit; decompression stops at
    /// the limit, so a hostile value cannot exhaust memory.
    #[error("opened value would exceed the limit of {limit} bytes")]
    TooLarge { limit: usize },

    /// The value is not sealed and the project accepts only sealed values.
    #[error("value is not sealed and the project requires sealed values")]
    NotSealed,
}

/// The two keys one project uses under one keyring secret: AES-256 for the
/// ciphertext and HMAC-SHA256 for the tag (encrypt-then-MAC).
///
/// Derived, never stored. `Debug` prints no key material. The bytes are not
/// wiped from memory on drop: none of the allowed crates offers it (the
/// `aes` crate's optional `zeroize` feature is off), so a core dump of the
/// proxy can contain derived keys, as it can contain the keyring itself.
#[derive(Clone)]
pub struct ProjectKeys {
    /// The expanded AES key schedule, borrowed by every seal and open
    /// rather than expanded again from the key bytes.
    cipher: Aes256,
    /// ring's HMAC key holds the hash states after the inner and outer pads,
    /// so a tag costs only the blocks of the value itself.
    mac: hmac::Key,
}

impl ProjectKeys {
    /// Derives the keys of `project` from a 32-byte keyring secret with
    /// HKDF-SHA256 (RFC 5869): salt `redcloak/v1`, info `enc:` + project and
    /// `mac:` + project, 32 bytes each. A value copied into another
    /// project's namespace therefore fails authentication there.
    pub fn derive(secret: &[u8; 32], project: &str) -> ProjectKeys {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(secret);
        let enc_key = expand(&prk, b"enc:", project);
        let mac_key = expand(&prk, b"mac:", project);

        ProjectKeys {
            cipher: Aes256::new(&enc_key.into()),
            mac: hmac::Key::new(hmac::HMAC_SHA256, &mac_key),
        }
    }
}

impl std::fmt::Debug for ProjectKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProjectKeys { .. }")
    }
}

/// The output length handed to ring's HKDF, which wants a `KeyType`.
struct KeyLen;

impl hkdf::KeyType for KeyLen {
    fn len(&self) -> usize {
        KEY_LEN
    }
}

fn expand(prk: &hkdf::Prk, purpose: &[u8], project: &str) -> [u8; KEY_LEN] {
    let info = [purpose, project.as_bytes()];
    let mut out = [0u8; KEY_LEN];
    prk.expand(&info, KeyLen)
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF-SHA256 can always expand 32 bytes (the limit is 255 * 32)");
    out
}

/// Whether `id` can name a key in a sealed value: 1 to 64 bytes of
/// `[A-Za-z0-9_.-]`.
pub fn is_valid_key_id(id: &str) -> bool {
    (1..=MAX_KEY_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Whether `value` claims to be sealed: it starts with the magic and then
/// version `01`. It says nothing about validity; a plain value that happens
/// to start with these four bytes is treated as sealed and fails to open.
pub fn is_sealed(value: &[u8]) -> bool {
    value.len() > MAGIC.len() && value[..MAGIC.len()] == MAGIC && value[MAGIC.len()] == VERSION
}

/// Seals `plaintext` under `keys` with a fresh random IV.
///
/// A plaintext longer than `compression_threshold` is zlib-compressed first,
/// and the compressed form is kept only if it is at most 90% of the original;
/// `usize::MAX` disables compression. The result is written into one buffer
/// of exactly the sealed length.
///
/// The tag binds the value to its project and key id but not to the Redis
/// key it is stored under: the SPEC §6 format has no room for it, so a value
/// moved to another key of the same project still opens. Compression makes
/// the stored length depend on the content (see docs/encryption.md).
pub fn seal(
    keys: &ProjectKeys,
    key_id: &str,
    plaintext: &[u8],
    compression_threshold: usize,
) -> Result<Vec<u8>, SealError> {
    let mut sealed = Vec::new();
    seal_into(
        keys,
        key_id,
        plaintext,
        compression_threshold,
        reserve_in(&mut sealed),
    )?;
    Ok(sealed)
}

/// [`seal`] into a buffer of the caller's: `reserve` is called once, with
/// the exact sealed length, and returns the slice of that length to write
/// the sealed value into; it is not called if sealing fails. Lets a value
/// be sealed straight into an outgoing request.
pub fn seal_into<'b>(
    keys: &ProjectKeys,
    key_id: &str,
    plaintext: &[u8],
    compression_threshold: usize,
    reserve: impl FnOnce(usize) -> &'b mut [u8],
) -> Result<(), SealError> {
    check_key_id(key_id)?;
    let iv = iv::fresh()?;
    seal_valid(keys, key_id, plaintext, compression_threshold, &iv, reserve);
    Ok(())
}

/// [`seal`] with a caller-chosen IV, for test vectors only: reusing an IV
/// under the same keys reveals whether two plaintexts share a prefix.
#[doc(hidden)]
pub fn seal_with_iv(
    keys: &ProjectKeys,
    key_id: &str,
    plaintext: &[u8],
    compression_threshold: usize,
    iv: [u8; IV_LEN],
) -> Result<Vec<u8>, SealError> {
    check_key_id(key_id)?;
    let mut sealed = Vec::new();
    let reserve = reserve_in(&mut sealed);
    seal_valid(keys, key_id, plaintext, compression_threshold, &iv, reserve);
    Ok(sealed)
}

/// The `reserve` argument of [`seal_into`] for sealing into a `Vec`: makes
/// `buf` exactly the sealed length.
pub fn reserve_in<'b>(buf: &'b mut Vec<u8>) -> impl FnOnce(usize) -> &'b mut [u8] {
    move |len| {
        buf.resize(len, 0);
        &mut buf[..]
    }
}

fn check_key_id(key_id: &str) -> Result<(), SealError> {
    if is_valid_key_id(key_id) {
        Ok(())
    } else {
        Err(SealError::InvalidKeyId(key_id.to_owned()))
    }
}

/// Seals under a key id already checked, into the slice `reserve` gives.
/// Compression, when tried, writes into the thread's scratch buffer, so the
/// body is copied once, into the sealed value.
fn seal_valid<'b>(
    keys: &ProjectKeys,
    key_id: &str,
    plaintext: &[u8],
    compression_threshold: usize,
    iv: &[u8; IV_LEN],
    reserve: impl FnOnce(usize) -> &'b mut [u8],
) {
    let write = |flags, message: &[u8]| {
        let out = reserve(sealed_len(key_id, message.len()));
        write_sealed(keys, flags, key_id, iv, message, out);
    };
    if plaintext.len() <= compression_threshold {
        return write(0, plaintext);
    }

    let budget = plaintext.len() / 10 * 9 + plaintext.len() % 10 * 9 / 10;
    zlib::with_compressed(plaintext, budget, |compressed| match compressed {
        Some(body) => write(FLAG_COMPRESSED, body),
        None => write(0, plaintext),
    })
}

/// The length of a sealed value whose (possibly compressed) message is
/// `message_len` bytes: header, key id, IV, padded ciphertext and tag.
pub fn sealed_len(key_id: &str, message_len: usize) -> usize {
    FIXED_HEADER_LEN + key_id.len() + IV_LEN + padded_len(message_len) + TAG_LEN
}

/// Lays out header, `message` and padding in `out` (exactly the sealed
/// length), then encrypts the message in place and writes the tag after it.
fn write_sealed(
    keys: &ProjectKeys,
    flags: u8,
    key_id: &str,
    iv: &[u8; IV_LEN],
    message: &[u8],
    out: &mut [u8],
) {
    let header_len = FIXED_HEADER_LEN + key_id.len() + IV_LEN;
    let padded = padded_len(message.len());
    debug_assert_eq!(out.len(), header_len + padded + TAG_LEN);

    let id_len = u8::try_from(key_id.len()).expect("callers checked the key id is 1..=64 bytes");
    let (header, rest) = out.split_at_mut(header_len);
    let (fixed, variable) = header.split_at_mut(FIXED_HEADER_LEN);
    fixed[..MAGIC.len()].copy_from_slice(&MAGIC);
    fixed[MAGIC.len()..].copy_from_slice(&[VERSION, flags, id_len]);
    let (id, iv_field) = variable.split_at_mut(key_id.len());
    id.copy_from_slice(key_id.as_bytes());
    iv_field.copy_from_slice(iv);

    let (body, tag) = rest.split_at_mut(padded);
    body[..message.len()].copy_from_slice(message);
    // PKCS#7: every padding byte holds the padding length, 1 to 16.
    let pad = padded - message.len();
    body[message.len()..].fill(u8::try_from(pad).expect("padding is 1 to 16 bytes"));

    let mut mac = hmac::Context::with_key(&keys.mac);
    mac.update(header);
    encrypt_and_mac(
        Encryptor::inner_iv_init(&keys.cipher, &(*iv).into()),
        &mut mac,
        body,
    );
    tag.copy_from_slice(mac.sign().as_ref());
}

/// Blocks encrypted between two MAC updates. CBC encryption is one long
/// dependency chain, so the cipher unit mostly waits; handing the MAC the
/// chunk before the one being encrypted lets the processor hash while it
/// waits, instead of hashing everything afterwards.
const STITCH_BLOCKS: usize = 4;

/// Encrypts the padded `body` in place and feeds the ciphertext to `mac`.
fn encrypt_and_mac(mut encryptor: Encryptor<'_>, mac: &mut hmac::Context, body: &mut [u8]) {
    let (blocks, ragged) = Array::slice_as_chunks_mut(body);
    debug_assert!(ragged.is_empty(), "the body is padded to whole blocks");
    // Blocks before this are encrypted but not yet hashed.
    let mut unhashed = 0;
    for start in (0..blocks.len()).step_by(STITCH_BLOCKS) {
        let end = (start + STITCH_BLOCKS).min(blocks.len());
        encryptor.encrypt_blocks(&mut blocks[start..end]);
        mac.update(Array::slice_as_flattened(&blocks[unhashed..start]));
        unhashed = start;
    }
    mac.update(Array::slice_as_flattened(&blocks[unhashed..]));
}

/// PKCS#7 always adds 1 to 16 bytes.
fn padded_len(len: usize) -> usize {
    (len / BLOCK_LEN + 1) * BLOCK_LEN
}

/// The parsed header of a sealed value. Nothing in it is authenticated yet:
/// use it to pick the key, never to trust the value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealedHeader<'a> {
    /// The keyring key the value was sealed under.
    pub key_id: &'a str,
    /// Whether the plaintext was compressed before encryption.
    pub compressed: bool,
    /// Where the IV starts; the ciphertext follows it.
    iv_start: usize,
}

/// Checks the layout of a sealed value and returns its header. Fails with
/// [`OpenError::Malformed`] on anything the format does not allow; the tag
/// is not checked here.
pub fn parse_header(value: &[u8]) -> Result<SealedHeader<'_>, OpenError> {
    if !is_sealed(value) {
        return Err(OpenError::Malformed("missing magic or unsupported version"));
    }
    if value.len() < MIN_SEALED_LEN {
        return Err(OpenError::Malformed("value is too short"));
    }

    let flags = value[4];
    if flags & !FLAG_COMPRESSED != 0 {
        return Err(OpenError::Malformed("reserved flag bits are set"));
    }

    let id_len = usize::from(value[5]);
    if !(1..=MAX_KEY_ID_LEN).contains(&id_len) {
        return Err(OpenError::Malformed("key id length is out of range"));
    }
    let iv_start = FIXED_HEADER_LEN + id_len;
    let key_id = std::str::from_utf8(&value[FIXED_HEADER_LEN..iv_start])
        .ok()
        .filter(|id| is_valid_key_id(id))
        .ok_or(OpenError::Malformed(
            "key id has characters outside [A-Za-z0-9_.-]",
        ))?;

    let ciphertext_len = value.len().saturating_sub(iv_start + IV_LEN + TAG_LEN);
    if ciphertext_len == 0 || !ciphertext_len.is_multiple_of(BLOCK_LEN) {
        return Err(OpenError::Malformed(
            "ciphertext is not a whole number of blocks",
        ));
    }

    Ok(SealedHeader {
        key_id,
        compressed: flags & FLAG_COMPRESSED != 0,
        iv_start,
    })
}

/// Verifies and decrypts a sealed value, returning at most `max_plaintext`
/// bytes ([`DEFAULT_MAX_PLAINTEXT`] is the usual limit).
///
/// The tag is checked in constant time before any byte is decrypted or
/// decompressed. `keys` must be the ones derived for the header's key id
/// and the caller's project; any other keys fail with
/// [`OpenError::Integrity`].
pub fn open(keys: &ProjectKeys, value: &[u8], max_plaintext: usize) -> Result<Vec<u8>, OpenError> {
    let body = authenticate(keys, value, max_plaintext)?;
    let mut message = body.ciphertext.to_vec();
    let message_len = Decryptor::inner_iv_init(&keys.cipher, &body.iv.into())
        .decrypt_padded::<Pkcs7>(&mut message)
        .map_err(|_| OpenError::Malformed("padding is invalid"))?
        .len();
    message.truncate(message_len);

    if body.compressed {
        return zlib::with_inflated(&message, max_plaintext, <[u8]>::to_vec);
    }
    if message.len() > max_plaintext {
        return Err(OpenError::TooLarge {
            limit: max_plaintext,
        });
    }
    Ok(message)
}

/// The encrypted part of a sealed value whose tag checked out.
struct Authentic<'a> {
    compressed: bool,
    iv: [u8; IV_LEN],
    ciphertext: &'a [u8],
}

/// Parses `value` and checks its tag, and the size limits that can be
/// checked before decrypting.
fn authenticate<'a>(
    keys: &ProjectKeys,
    value: &'a [u8],
    max_plaintext: usize,
) -> Result<Authentic<'a>, OpenError> {
    let header = parse_header(value)?;
    let tag_start = value.len() - TAG_LEN;
    hmac::verify(&keys.mac, &value[..tag_start], &value[tag_start..])
        .map_err(|_| OpenError::Integrity)?;

    let (&iv, rest) = value[header.iv_start..tag_start]
        .split_first_chunk::<IV_LEN>()
        .ok_or(OpenError::Malformed("value is too short"))?;
    if !header.compressed && rest.len() - BLOCK_LEN > max_plaintext {
        return Err(OpenError::TooLarge {
            limit: max_plaintext,
        });
    }

    Ok(Authentic {
        compressed: header.compressed,
        iv,
        ciphertext: rest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cbc::cipher::block_padding::NoPadding;
    use flate2::Compression;
    use flate2::write::ZlibEncoder;
    use ring::rand::{SecureRandom, SystemRandom};
    use std::io::Write;

    fn unhex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        digits
            .chunks(2)
            .map(|pair| {
                let pair = std::str::from_utf8(pair).expect("test hex is ASCII");
                u8::from_str_radix(pair, 16).expect("test hex is valid")
            })
            .collect()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A small deterministic generator, so that failures reproduce.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    fn random_bytes(len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        SystemRandom::new()
            .fill(&mut out)
            .expect("system randomness");
        out
    }

    fn test_keys(project: &str) -> ProjectKeys {
        ProjectKeys::derive(&[7u8; 32], project)
    }

    /// A value with a valid tag whose flags claim `body` is zlib.
    fn authentic_compressed_body(keys: &ProjectKeys, body: &[u8]) -> Vec<u8> {
        let mut sealed = vec![0; sealed_len("k1", body.len())];
        write_sealed(keys, FLAG_COMPRESSED, "k1", &[0u8; 16], body, &mut sealed);
        sealed
    }

    const VECTOR_SECRET: [u8; 32] = [
        0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e,
        0x0f, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d,
        0x1e, 0x1f,
    ];
    const VECTOR_IV: [u8; 16] = [
        0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x2b, 0x2c, 0x2d, 0x2e,
        0x2f,
    ];
    const VECTOR_SEALED: &str = "0052430100026b31202122232425262728292a2b2c2d2e2f\
                                 b795132b182e1640868f1c33a2180cc9\
                                 6b5f3883c28de65439c91767f9479588\
                                 cf75a8bd7bbe18cafd892ad9c13c73bc";

    #[test]
    fn aes256_cbc_matches_nist_sp800_38a_f25() {
        let key = unhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4");
        let iv: [u8; 16] = unhex("000102030405060708090a0b0c0d0e0f")
            .try_into()
            .unwrap();
        let plaintext = unhex(
            "6bc1bee22e409f96e93d7e117393172a ae2d8a571e03ac9c9eb76fac45af8e51
             30c81c46a35ce411e5fbc1191a0a52ef f69f2445df4f9b17ad2b417be66c3710",
        );
        let expected = unhex(
            "f58c4c04d6e5f1ba779eabfb5f7bfbd6 9cfc4e967edb808d679f777bc6702c7d
             39f23369a9d9bacfa530e26304231461 b2eb05e2c39be9fcda6c19078c6a9d1b",
        );
        let cipher = Aes256::new_from_slice(&key).unwrap();

        let mut buf = plaintext.clone();
        let ciphertext = Encryptor::inner_iv_init(&cipher, &iv.into())
            .encrypt_padded::<NoPadding>(&mut buf, plaintext.len())
            .unwrap();
        assert_eq!(hex(ciphertext), hex(&expected));

        let decrypted = Decryptor::inner_iv_init(&cipher, &iv.into())
            .decrypt_padded::<NoPadding>(&mut buf)
            .unwrap();
        assert_eq!(decrypted, &plaintext[..]);
    }

    #[test]
    fn hmac_sha256_matches_rfc4231_case_2() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"Jefe");
        let tag = hmac::sign(&key, b"what do ya want for nothing?");
        assert_eq!(
            hex(tag.as_ref()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn hkdf_sha256_matches_rfc5869_case_1() {
        struct Len42;
        impl hkdf::KeyType for Len42 {
            fn len(&self) -> usize {
                42
            }
        }

        let ikm = [0x0bu8; 22];
        let salt = unhex("000102030405060708090a0b0c");
        let info = unhex("f0f1f2f3f4f5f6f7f8f9");
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(&ikm);
        let mut okm = [0u8; 42];
        prk.expand(&[&info], Len42).unwrap().fill(&mut okm).unwrap();
        assert_eq!(
            hex(&okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }

    #[test]
    fn fixed_inputs_seal_to_the_documented_vector() {
        let keys = ProjectKeys::derive(&VECTOR_SECRET, "billing");
        let sealed = seal_with_iv(&keys, "k1", b"hello, redcloak", 1024, VECTOR_IV).unwrap();
        assert_eq!(hex(&sealed), VECTOR_SEALED);
        assert_eq!(open(&keys, &sealed, 1024).unwrap(), b"hello, redcloak");

        assert!(
            documented().contains(VECTOR_SEALED),
            "docs/encryption.md lacks the vector"
        );
    }

    #[test]
    fn stitched_encryption_and_tag_equal_encrypting_then_signing_whole() {
        let keys = test_keys("billing");
        let iv = [7u8; IV_LEN];
        let mut rng = XorShift(11);
        for len in (0..300).chain([1023, 4096, 70_000]) {
            let plaintext = rng.bytes(len);
            let sealed = seal_with_iv(&keys, "k1", &plaintext, usize::MAX, iv).unwrap();

            let header_len = FIXED_HEADER_LEN + 2 + IV_LEN;
            let mut expected = sealed[..header_len].to_vec();
            let ciphertext = Encryptor::inner_iv_init(&keys.cipher, &iv.into())
                .encrypt_padded_vec::<Pkcs7>(&plaintext);
            expected.extend_from_slice(&ciphertext);
            let tag = hmac::sign(&keys.mac, &expected);
            expected.extend_from_slice(tag.as_ref());
            assert_eq!(sealed, expected, "plaintext of {len} bytes");
        }
    }

    #[test]
    fn an_authentic_value_with_bad_padding_is_malformed() {
        let keys = test_keys("billing");
        let iv = [3u8; IV_LEN];
        let mut last_blocks: Vec<[u8; BLOCK_LEN]> = Vec::new();
        for pad in [0u8, 17, 255] {
            let mut block = [b'x'; BLOCK_LEN];
            block[BLOCK_LEN - 1] = pad;
            last_blocks.push(block);
        }
        // Claims 4 bytes of padding, but one of them differs.
        let mut uneven = [4u8; BLOCK_LEN];
        uneven[BLOCK_LEN - 3] = 5;
        last_blocks.push(uneven);

        for last in last_blocks {
            for leading in [0, 2] {
                let mut message = vec![b'y'; leading * BLOCK_LEN];
                message.extend_from_slice(&last);
                let len = message.len();
                Encryptor::inner_iv_init(&keys.cipher, &iv.into())
                    .encrypt_padded::<NoPadding>(&mut message, len)
                    .unwrap();
                let mut value = MAGIC.to_vec();
                value.extend_from_slice(&[VERSION, 0, 2]);
                value.extend_from_slice(b"k1");
                value.extend_from_slice(&iv);
                value.extend_from_slice(&message);
                let tag = hmac::sign(&keys.mac, &value);
                value.extend_from_slice(tag.as_ref());

                let opened = open(&keys, &value, DEFAULT_MAX_PLAINTEXT);
                assert!(
                    matches!(opened, Err(OpenError::Malformed("padding is invalid"))),
                    "{opened:?}"
                );
            }
        }
    }

    #[test]
    fn fixed_secret_derives_the_documented_project_keys() {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(&VECTOR_SECRET);
        let enc_key = hex(&expand(&prk, b"enc:", "billing"));
        let mac_key = hex(&expand(&prk, b"mac:", "billing"));
        assert_eq!(
            enc_key,
            "09fcdcae156241ce03fbe6000c118fbb9a147da2a7fb337cb5aa47d82fdc55cf"
        );
        assert_eq!(
            mac_key,
            "4cba53fb693a087d52761eb614c9cf4b7d98e6bd62117eb6d7c4257be7d09d11"
        );
        assert!(documented().contains(&enc_key) && documented().contains(&mac_key));
    }

    /// docs/encryption.md without whitespace, so hex split across lines
    /// still matches.
    fn documented() -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/encryption.md");
        let docs = std::fs::read_to_string(path).expect("docs/encryption.md is readable");
        docs.split_whitespace().collect()
    }

    fn round_trip(plaintext: &[u8], threshold: usize) -> Vec<u8> {
        let keys = test_keys("billing");
        let sealed = seal(&keys, "k1", plaintext, threshold).unwrap();
        assert!(is_sealed(&sealed));
        assert_eq!(parse_header(&sealed).unwrap().key_id, "k1");
        let opened = open(&keys, &sealed, DEFAULT_MAX_PLAINTEXT).unwrap();
        assert!(
            opened == plaintext,
            "round trip changed a {}-byte value",
            plaintext.len()
        );
        sealed
    }

    #[test]
    fn empty_value_round_trips_as_one_padding_block() {
        let sealed = round_trip(b"", 0);
        assert_eq!(sealed.len(), MIN_SEALED_LEN + 1);
        assert!(!parse_header(&sealed).unwrap().compressed);
    }

    #[test]
    fn nul_bytes_round_trip() {
        round_trip(&[0u8; 1], 1024);
        round_trip(&[0u8; 16], 1024);
        round_trip(b"\0RC\x01\0\0", 1024);
        round_trip(&[0u8; 5000], 1024);
    }

    #[test]
    fn ten_megabytes_of_random_bytes_round_trip_uncompressed() {
        let plaintext = random_bytes(10 * 1024 * 1024);
        let sealed = round_trip(&plaintext, 1024);
        assert!(!parse_header(&sealed).unwrap().compressed);
        assert_eq!(sealed.len(), 6 + 2 + 16 + padded_len(plaintext.len()) + 32);
    }

    #[test]
    fn compressible_values_round_trip_compressed() {
        let plaintext = b"invoice 42 paid in full; ".repeat(4000);
        let sealed = round_trip(&plaintext, 1024);
        assert!(parse_header(&sealed).unwrap().compressed);
        assert!(sealed.len() < plaintext.len() / 10);
    }

    #[test]
    fn values_of_seeded_random_sizes_and_contents_round_trip() {
        let mut rng = XorShift(0x5eed_1234_abcd_0001);
        for len in 0..=80 {
            round_trip(&rng.bytes(len), 1024);
        }
        for _ in 0..40 {
            let len = (rng.next() % 200_000) as usize;
            let threshold = (rng.next() % 4096) as usize;
            let mut plaintext = rng.bytes(len);
            let zeros = (rng.next() as usize) % (len + 1);
            plaintext[..zeros].fill(0);
            round_trip(&plaintext, threshold);
        }
    }

    #[test]
    fn every_flipped_byte_of_a_sealed_value_is_rejected() {
        let keys = test_keys("billing");
        let sealed = seal(&keys, "k1", b"short value", 1024).unwrap();
        for position in 0..sealed.len() {
            for bit in [0x01u8, 0x80] {
                let mut altered = sealed.clone();
                altered[position] ^= bit;
                assert!(
                    open(&keys, &altered, DEFAULT_MAX_PLAINTEXT).is_err(),
                    "flipping bit {bit:#04x} of byte {position} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn truncated_and_extended_values_are_rejected() {
        let keys = test_keys("billing");
        let sealed = seal(&keys, "k1", b"short value", 1024).unwrap();
        for len in 0..sealed.len() {
            assert!(open(&keys, &sealed[..len], DEFAULT_MAX_PLAINTEXT).is_err());
        }
        let mut extended = sealed.clone();
        extended.extend_from_slice(&[0u8; 16]);
        assert!(open(&keys, &extended, DEFAULT_MAX_PLAINTEXT).is_err());
    }

    #[test]
    fn value_sealed_for_one_project_fails_to_open_for_another() {
        let sealed = seal(&test_keys("billing"), "k1", b"secret invoice", 1024).unwrap();
        let result = open(&test_keys("shipping"), &sealed, DEFAULT_MAX_PLAINTEXT);
        assert!(matches!(result, Err(OpenError::Integrity)));
    }

    #[test]
    fn value_sealed_under_another_secret_fails_to_open() {
        let sealed = seal(&test_keys("billing"), "k1", b"secret invoice", 1024).unwrap();
        let other = ProjectKeys::derive(&[8u8; 32], "billing");
        let result = open(&other, &sealed, DEFAULT_MAX_PLAINTEXT);
        assert!(matches!(result, Err(OpenError::Integrity)));
    }

    #[test]
    fn same_plaintext_seals_differently_twice() {
        let keys = test_keys("billing");
        let first = seal(&keys, "k1", b"same", 1024).unwrap();
        let second = seal(&keys, "k1", b"same", 1024).unwrap();
        assert_ne!(first, second);
        assert_ne!(first[8..24], second[8..24], "the IVs must differ");
    }

    #[test]
    fn compression_is_kept_only_when_it_saves_at_least_ten_percent() {
        let keys = test_keys("billing");
        let mut rng = XorShift(42);
        let compressed = |plaintext: &[u8], threshold: usize| {
            let sealed = seal(&keys, "k1", plaintext, threshold).unwrap();
            assert_eq!(
                open(&keys, &sealed, DEFAULT_MAX_PLAINTEXT).unwrap(),
                plaintext
            );
            parse_header(&sealed).unwrap().compressed
        };

        // Random bytes with a run of zeros: the run decides the saving.
        let mut saves_about_15_percent = rng.bytes(100_000);
        saves_about_15_percent[..15_000].fill(0);
        let mut saves_about_5_percent = rng.bytes(100_000);
        saves_about_5_percent[..5_000].fill(0);

        assert!(compressed(&saves_about_15_percent, 1024));
        assert!(!compressed(&saves_about_5_percent, 1024));
        assert!(!compressed(&rng.bytes(100_000), 1024));
    }

    #[test]
    fn values_whose_first_bytes_do_not_shrink_are_stored_uncompressed() {
        let keys = test_keys("billing");
        let mut rng = XorShift(7);
        let compressed = |plaintext: &[u8]| {
            let sealed = seal(&keys, "k1", plaintext, 0).unwrap();
            assert_eq!(
                open(&keys, &sealed, DEFAULT_MAX_PLAINTEXT).unwrap(),
                plaintext
            );
            parse_header(&sealed).unwrap().compressed
        };

        // The first 512 bytes decide for longer values: random bytes there
        // leave even a long run of zeros after them uncompressed.
        let mut random_head = rng.bytes(8192);
        random_head[512..].fill(0);
        assert!(!compressed(&random_head));

        // A head that shrinks lets the whole value be judged by the 10% rule.
        let mut zero_head = rng.bytes(8192);
        zero_head[..2048].fill(0);
        assert!(compressed(&zero_head));

        // Values shorter than two probes are compressed in one go.
        let mut short = rng.bytes(1000);
        short[600..].fill(0);
        assert!(compressed(&short));
    }

    #[test]
    fn only_values_longer_than_the_threshold_are_compressed() {
        let keys = test_keys("billing");
        let plaintext = vec![b'a'; 1024];
        let at = seal(&keys, "k1", &plaintext, 1024).unwrap();
        let above = seal(&keys, "k1", &plaintext, 1023).unwrap();
        let disabled = seal(&keys, "k1", &plaintext, usize::MAX).unwrap();
        assert!(!parse_header(&at).unwrap().compressed);
        assert!(parse_header(&above).unwrap().compressed);
        assert!(!parse_header(&disabled).unwrap().compressed);
    }

    #[test]
    fn decompression_bomb_stops_at_the_limit() {
        let keys = test_keys("billing");
        let bomb = seal(&keys, "k1", &vec![0u8; 20 * 1024 * 1024], 0).unwrap();
        assert!(
            bomb.len() < 200 * 1024,
            "a 20 MiB run of zeros should shrink 100-fold"
        );

        let limit = 1024 * 1024;
        let result = open(&keys, &bomb, limit);
        assert!(matches!(result, Err(OpenError::TooLarge { limit: l }) if l == limit));

        let exact = seal(&keys, "k1", &vec![0u8; limit], 0).unwrap();
        assert_eq!(open(&keys, &exact, limit).unwrap().len(), limit);
        let one_more = seal(&keys, "k1", &vec![0u8; limit + 1], 0).unwrap();
        assert!(matches!(
            open(&keys, &one_more, limit),
            Err(OpenError::TooLarge { .. })
        ));
    }

    #[test]
    fn uncompressed_value_above_the_limit_is_refused() {
        let keys = test_keys("billing");
        let sealed = seal(&keys, "k1", &[1u8; 100], usize::MAX).unwrap();
        assert_eq!(open(&keys, &sealed, 100).unwrap().len(), 100);
        assert!(matches!(
            open(&keys, &sealed, 99),
            Err(OpenError::TooLarge { .. })
        ));
        assert!(matches!(
            open(&keys, &sealed, 50),
            Err(OpenError::TooLarge { .. })
        ));
    }

    #[test]
    fn zlib_body_from_another_implementation_opens() {
        // C zlib at level 9 (dynamic Huffman blocks), so that values sealed
        // by any conforming compressor keep opening whatever backend
        // inflates them.
        let c_zlib_level_9 = unhex(
            "78dacbcc2bcbcf4c4e553031522848cc4c51c8cc53482bcdc9b1063246254625
             462586890400c8944d80",
        );
        let keys = test_keys("billing");
        let sealed = authentic_compressed_body(&keys, &c_zlib_level_9);
        assert_eq!(
            open(&keys, &sealed, DEFAULT_MAX_PLAINTEXT).unwrap(),
            b"invoice 42 paid in full; ".repeat(40)
        );
    }

    #[test]
    fn authentic_but_corrupt_zlib_body_fails_to_decompress() {
        let keys = test_keys("billing");
        let forged = authentic_compressed_body(&keys, b"this is not zlib");
        assert!(matches!(
            open(&keys, &forged, DEFAULT_MAX_PLAINTEXT),
            Err(OpenError::Decompress)
        ));
    }

    #[test]
    fn authentic_but_truncated_zlib_body_fails_to_decompress() {
        let keys = test_keys("billing");
        let mut compressed = Vec::new();
        let mut encoder = ZlibEncoder::new(&mut compressed, Compression::fast());
        encoder.write_all(&b"abc".repeat(1000)).unwrap();
        encoder.finish().unwrap();

        let forged = authentic_compressed_body(&keys, &compressed[..compressed.len() - 6]);
        assert!(matches!(
            open(&keys, &forged, DEFAULT_MAX_PLAINTEXT),
            Err(OpenError::Decompress)
        ));
    }

    #[test]
    fn header_parsing_rejects_layouts_the_format_forbids() {
        let keys = test_keys("billing");
        let good = seal(&keys, "k1", b"x", 1024).unwrap();
        let altered = |position: usize, byte: u8| {
            let mut value = good.clone();
            value[position] = byte;
            parse_header(&value).map(|_| ())
        };

        assert!(parse_header(&good).is_ok());
        assert!(matches!(altered(3, 0x02), Err(OpenError::Malformed(_))));
        assert!(matches!(altered(4, 0x02), Err(OpenError::Malformed(_))));
        assert!(matches!(altered(5, 0), Err(OpenError::Malformed(_))));
        assert!(matches!(altered(5, 65), Err(OpenError::Malformed(_))));
        assert!(matches!(altered(6, b'/'), Err(OpenError::Malformed(_))));
        assert!(matches!(altered(6, 0xff), Err(OpenError::Malformed(_))));
        assert!(parse_header(&good[..good.len() - 1]).is_err());
        assert!(parse_header(b"plain value").is_err());
    }

    #[test]
    fn key_ids_outside_the_format_are_refused_when_sealing() {
        let keys = test_keys("billing");
        for id in ["", "has space", "slash/", "é", &"a".repeat(65)] {
            assert!(matches!(
                seal(&keys, id, b"x", 1024),
                Err(SealError::InvalidKeyId(_))
            ));
        }
        let longest = "A-z_0.9".repeat(10)[..64].to_owned();
        let sealed = seal(&keys, &longest, b"x", 1024).unwrap();
        assert_eq!(parse_header(&sealed).unwrap().key_id, longest);
    }

    #[test]
    fn is_sealed_needs_magic_and_version_one() {
        assert!(is_sealed(b"\x00RC\x01"));
        assert!(!is_sealed(b"\x00RC"));
        assert!(!is_sealed(b"\x00RC\x02rest"));
        assert!(!is_sealed(b"42"));
        assert!(!is_sealed(b""));
    }

    #[test]
    fn debug_output_of_project_keys_shows_no_key_material() {
        assert_eq!(format!("{:?}", test_keys("billing")), "ProjectKeys { .. }");
    }

    #[test]
    fn error_messages_are_lowercase_and_carry_no_value_bytes() {
        let keys = test_keys("billing");
        let mut sealed = seal(&keys, "k1", b"top secret plaintext", 1024).unwrap();
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        let message = open(&keys, &sealed, DEFAULT_MAX_PLAINTEXT)
            .unwrap_err()
            .to_string();
        assert_eq!(message, "sealed value failed authentication");
        assert!(!message.contains("secret"));
    }
}
