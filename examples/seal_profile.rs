//! Times seal/open through the real Sealer: `seal_profile <seal|open> <size> <xxx|random> <count>`.

use std::hint::black_box;
use std::process::ExitCode;

use redcloak::keyring::{Keyring, Sealer};

/// The proxy's default `compression_threshold`.
const THRESHOLD: usize = 1024;

const SECRET_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [op, size, kind, count] = args.as_slice() else {
        eprintln!("usage: seal_profile <seal|open> <size> <xxx|random> <count>");
        return ExitCode::FAILURE;
    };
    let (Ok(size), Ok(count)) = (size.parse::<usize>(), count.parse::<usize>()) else {
        eprintln!("size and count are numbers");
        return ExitCode::FAILURE;
    };
    let plaintext = match kind.as_str() {
        "xxx" => vec![b'x'; size],
        "random" => random(size),
        _ => {
            eprintln!("kind is xxx or random");
            return ExitCode::FAILURE;
        }
    };

    let keyring = Keyring::from_env_key(SECRET_B64).expect("the built-in key is valid");
    let sealer = Sealer::new(keyring, THRESHOLD, false);
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
