//! Times seal/open through the real Sealer:
//! `seal_profile <seal|open> <size> <xxx|random|benchmark> <count>`.

use std::hint::black_box;
use std::process::ExitCode;

use redcloak::config::EncryptionSettings;
use redcloak::keyring::{Keyring, Sealer};

const SECRET_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [op, size, kind, count] = args.as_slice() else {
        eprintln!("usage: seal_profile <seal|open> <size> <xxx|random|benchmark> <count>");
        return ExitCode::FAILURE;
    };
    let (Ok(size), Ok(count)) = (size.parse::<usize>(), count.parse::<usize>()) else {
        eprintln!("size and count are numbers");
        return ExitCode::FAILURE;
    };
    let plaintext = match kind.as_str() {
        "xxx" => vec![b'x'; size],
        "random" => random(size),
        "benchmark" => like_redis_benchmark(size),
        _ => {
            eprintln!("kind is xxx, random or benchmark");
            return ExitCode::FAILURE;
        }
    };

    let keyring = Keyring::from_env_key(SECRET_B64).expect("the built-in key is valid");
    // The proxy's default compression threshold.
    let threshold = EncryptionSettings::default().compression_threshold;
    let sealer = Sealer::new(keyring, threshold, false);
    let sealed = sealer.seal("bench", &plaintext).expect("sealing works");

    match op.as_str() {
        "seal" => {
            for _ in 0..count {
                let sealed = sealer.seal("bench", black_box(&plaintext));
                black_box(sealed.expect("sealing works"));
            }
        }
        "open" => {
            for _ in 0..count {
                let opened = sealer.open("bench", black_box(&sealed));
                black_box(opened.expect("opening works"));
            }
        }
        _ => {
            eprintln!("op is seal or open");
            return ExitCode::FAILURE;
        }
    }
    println!("{op} {size} {kind}: sealed length {}", sealed.len());
    ExitCode::SUCCESS
}

/// Bytes from a fixed xorshift sequence: incompressible, and the same on
/// every run so that counts repeat.
fn random(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Bytes as redis-benchmark 7 fills its values: a linear congruential
/// sequence mapped onto the 64 characters from '0'. Six bits of entropy per
/// byte and no repeats, so only Huffman coding can shrink them.
fn like_redis_benchmark(len: usize) -> Vec<u8> {
    let mut state = 1234_u32;
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            b'0' + ((state >> 16) & 63) as u8
        })
        .collect()
}
