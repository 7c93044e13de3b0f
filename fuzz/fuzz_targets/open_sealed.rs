//! Fuzzes opening sealed values, the one place where bytes read from Redis
//! meet the keys.
//!
//! Two modes, chosen by the first byte. Even: the rest is opened as a value
//! read upstream, which must never panic or allocate without bound. Odd:
//! the rest is split into a plaintext and a list of (position, xor) edits;
//! the plaintext is sealed, the edits applied, and the result must open to
//! the plaintext when no byte changed and fail otherwise: a changed value
//! is never opened into something else. The same value must also fail for
//! another project, and a plaintext over the opening limit must be refused.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use redcloak::crypto::{self, OpenError};
use redcloak::keyring::{Keyring, Opened, Sealer};

const PROJECT: &str = "fuzz";

/// Small, so that compressed values can exceed it.
const MAX_PLAINTEXT: usize = 4096;

static SEALER: LazyLock<Sealer> = LazyLock::new(|| {
    let keyring = Keyring::from_env_key("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
        .expect("the fixed fuzz key is valid base64 of 32 bytes");
    Sealer::new(keyring, 64, false).with_max_plaintext(MAX_PLAINTEXT)
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        if let Ok(Opened::Sealed(plaintext)) = SEALER.open(PROJECT, rest) {
            assert!(plaintext.len() <= MAX_PLAINTEXT, "opened past the limit");
        }
        let _ = crypto::parse_header(rest);
        return;
    }

    let split = rest.len() / 2;
    let (plaintext, edits) = rest.split_at(split);
    let keys = SEALER
        .project_keys("env", PROJECT)
        .expect("the fuzz keyring holds key env");
    let iv = [mode; 16];
    let mut sealed = crypto::seal_with_iv(&keys, "env", plaintext, 64, iv)
        .expect("sealing with a valid key id succeeds");
    let original = sealed.clone();
    for edit in edits.chunks_exact(3) {
        let at = usize::from(u16::from_le_bytes([edit[0], edit[1]])) % sealed.len();
        sealed[at] ^= edit[2];
    }

    match SEALER.open(PROJECT, &sealed) {
        Ok(Opened::Sealed(opened)) => {
            assert_eq!(sealed, original, "an altered value opened");
            assert_eq!(opened, plaintext, "opened into another plaintext");
        }
        Ok(Opened::Plain(_)) => assert_ne!(sealed[..4], original[..4]),
        Err(OpenError::TooLarge { .. }) => assert!(plaintext.len() > MAX_PLAINTEXT),
        Err(_) => assert_ne!(sealed, original, "an intact value failed to open"),
    }
    assert!(
        SEALER.open("another", &original).is_err(),
        "a value opened in another project"
    );
});
