//! The `redcloak keys` commands: create, rotate, list and prune a keyring
//! file (SPEC §1).
//!
//! A thin layer over `keyring::KeyringFile`: it reads the passphrase of a
//! sealed file from `REDCLOAK_KEYRING_PASSPHRASE`, and prints one line per
//! outcome. Nothing printed here ever contains a secret.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;

use crate::keyring::{self, DEFAULT_PASSPHRASE_ITERATIONS, KeyringFile, PASSPHRASE_VAR};

/// The `keys` subcommands. Each takes the keyring file with `--keyring`;
/// a passphrase-sealed file is opened with the passphrase in
/// `REDCLOAK_KEYRING_PASSPHRASE`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a keyring with one fresh key (fails if the file exists).
    /// When REDCLOAK_KEYRING_PASSPHRASE is set, the file is sealed with it.
    Generate {
        /// The keyring file to create (mode 0600).
        #[arg(long)]
        keyring: PathBuf,
        /// PBKDF2 rounds that stretch the passphrase of a sealed file;
        /// lower only for tests.
        #[arg(long, default_value_t = DEFAULT_PASSPHRASE_ITERATIONS)]
        passphrase_iterations: u32,
    },
    /// Add a fresh key and make it current; old keys stay for reading.
    Rotate {
        /// The keyring file.
        #[arg(long)]
        keyring: PathBuf,
    },
    /// Print each key's id, creation time and marks; never a secret.
    List {
        /// The keyring file.
        #[arg(long)]
        keyring: PathBuf,
    },
    /// Drop old keys, keeping the N newest besides the current key.
    /// Refuses keys that `reencrypt` has not marked retired, unless forced.
    Prune {
        /// The keyring file.
        #[arg(long)]
        keyring: PathBuf,
        /// How many old (non-current) keys to keep, newest first.
        #[arg(long)]
        keep: usize,
        /// Drop keys not marked retired too: values still sealed under them
        /// can no longer be opened.
        #[arg(long)]
        force: bool,
    },
}

/// Runs one `keys` command, printing its outcome on standard output.
pub fn run(command: KeysCommand) -> anyhow::Result<()> {
    let passphrase = keyring::passphrase_from_env();
    execute(command, passphrase.as_deref(), &mut io::stdout().lock())
}

fn execute(
    command: KeysCommand,
    passphrase: Option<&[u8]>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match command {
        KeysCommand::Generate {
            keyring,
            passphrase_iterations,
        } => {
            let created = keyring_file(&keyring, passphrase)
                .with_iterations(passphrase_iterations)
                .generate()?;
            let form = match passphrase {
                Some(_) => format!(", sealed with the passphrase in {PASSPHRASE_VAR}"),
                None => String::new(),
            };
            writeln!(
                out,
                "created {} with key {}{form}",
                keyring.display(),
                created.current_id()
            )?;
        }
        KeysCommand::Rotate { keyring } => {
            let rotated = keyring_file(&keyring, passphrase).rotate()?;
            writeln!(
                out,
                "added key {}, now current ({} keys); old keys stay for reading",
                rotated.current_id(),
                rotated.list().len()
            )?;
        }
        KeysCommand::List { keyring } => {
            write!(out, "{}", keyring_file(&keyring, passphrase).load()?)?;
        }
        KeysCommand::Prune {
            keyring,
            keep,
            force,
        } => {
            let file = keyring_file(&keyring, passphrase);
            // Read first only to say which forced drops were unretired.
            let before = file.load()?.list();
            let dropped = file.prune(keep, force)?;
            let unretired: Vec<&str> = before
                .iter()
                .filter(|info| dropped.contains(&info.id) && info.retired_at.is_none())
                .map(|info| info.id.as_str())
                .collect();

            if dropped.is_empty() {
                writeln!(out, "nothing to drop")?;
            } else if unretired.is_empty() {
                writeln!(out, "dropped {}", dropped.join(", "))?;
            } else {
                writeln!(
                    out,
                    "dropped {}; forced: values still sealed under {} can no longer be opened",
                    dropped.join(", "),
                    unretired.join(", ")
                )?;
            }
        }
    }
    out.flush().context("writing to standard output")
}

fn keyring_file<'a>(path: &'a Path, passphrase: Option<&'a [u8]>) -> KeyringFile<'a> {
    let file = KeyringFile::new(path);
    match passphrase {
        Some(passphrase) => file.with_passphrase(passphrase),
        None => file,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::{Keyring, KeyringError};

    fn run_captured(command: KeysCommand, passphrase: Option<&[u8]>) -> anyhow::Result<String> {
        let mut out = Vec::new();
        execute(command, passphrase, &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    fn generate(keyring: PathBuf) -> KeysCommand {
        KeysCommand::Generate {
            keyring,
            passphrase_iterations: 1_000,
        }
    }

    #[test]
    fn each_command_prints_one_line_per_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");

        let created = run_captured(generate(path.clone()), None).unwrap();
        let first = Keyring::load(&path).unwrap().current_id().to_owned();
        assert_eq!(
            created,
            format!("created {} with key {first}\n", path.display())
        );

        let rotated = run_captured(
            KeysCommand::Rotate {
                keyring: path.clone(),
            },
            None,
        )
        .unwrap();
        let second = Keyring::load(&path).unwrap().current_id().to_owned();
        assert_eq!(
            rotated,
            format!("added key {second}, now current (2 keys); old keys stay for reading\n")
        );

        let listed = run_captured(
            KeysCommand::List {
                keyring: path.clone(),
            },
            None,
        )
        .unwrap();
        let lines: Vec<&str> = listed.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with(&format!("{first}  created ")));
        assert!(lines[1].ends_with("  current"));

        let prune = |force| KeysCommand::Prune {
            keyring: path.clone(),
            keep: 0,
            force,
        };
        let refused = run_captured(prune(false), None).unwrap_err();
        assert!(matches!(
            refused.downcast_ref::<KeyringError>(),
            Some(KeyringError::NotRetired(ids)) if *ids == [first.clone()]
        ));
        assert_eq!(
            run_captured(prune(true), None).unwrap(),
            format!(
                "dropped {first}; forced: values still sealed under {first} can no longer be opened\n"
            )
        );
        assert_eq!(
            run_captured(prune(false), None).unwrap(),
            "nothing to drop\n"
        );
    }

    #[test]
    fn a_passphrase_seals_the_generated_file_and_opens_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");

        let created = run_captured(generate(path.clone()), Some(b"pass")).unwrap();
        assert!(created.contains(PASSPHRASE_VAR), "{created}");
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("\"sealed\"")
        );

        let list = || KeysCommand::List {
            keyring: path.clone(),
        };
        let refused = run_captured(list(), None).unwrap_err().to_string();
        assert!(refused.contains(PASSPHRASE_VAR), "{refused}");
        assert_eq!(
            run_captured(list(), Some(b"pass")).unwrap().lines().count(),
            1
        );
    }
}
