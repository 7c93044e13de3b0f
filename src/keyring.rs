//! The keyring: the secrets values are sealed under, and the file they live in.
//!
//! The `keys` commands edit the file through [`KeyringFile`] (`generate`,
//! `rotate`, `prune`, and `mark_retired` after a reencrypt), plain or sealed
//! with a passphrase; the proxy and `reencrypt` load the configured keyring
//! with [`load_configured`] and wrap it in a [`Sealer`] (module `sealer`).

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::config::EncryptionSettings;
use crate::crypto::{self, ProjectKeys};

/// The sealer moved to its own module; these names keep working.
pub use crate::sealer::{Opened, Sealer};

/// The environment variable that holds the passphrase of a
/// passphrase-sealed keyring file, for the proxy and the `keys` commands
/// alike. When it is set, `keys generate` seals the new file with it.
pub const PASSPHRASE_VAR: &str = "REDCLOAK_KEYRING_PASSPHRASE";

/// The id of the single key taken from `CACHE_ENCRYPTION_KEY`.
pub const ENV_KEY_ID: &str = "env";

/// The keyring file format version (SPEC §6).
const FORMAT_VERSION: u64 = 1;

/// A keyring holds a few hundred bytes per key; anything larger than this is
/// not a keyring, and is not read into memory.
const MAX_FILE_LEN: u64 = 1024 * 1024;

const SECRET_LEN: usize = 32;

/// PBKDF2 rounds for a newly passphrase-sealed keyring, as for passwords.
pub const DEFAULT_PASSPHRASE_ITERATIONS: u32 = 600_000;

/// The only key derivation the passphrase-sealed form names.
const PASSPHRASE_KDF: &str = "pbkdf2-sha256";

/// The key id and project the passphrase-derived keys seal the keyring
/// under, reusing the value format.
const PASSPHRASE_KEY_ID: &str = "passphrase";
const PASSPHRASE_PROJECT: &str = "keyring";

const SALT_LEN: usize = 16;

/// Why a keyring could not be loaded, built or rewritten. Every variant is
/// an operator's fault or the system's; messages name the file, never a
/// secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyringError {
    /// The file or its directory could not be read or written. The cause is
    /// part of the message, so a one-line log entry is complete.
    #[error("keyring {}: {cause}", path.display())]
    Io { path: PathBuf, cause: io::Error },

    /// The file is readable or writable by group or others.
    #[error(
        "keyring {} has mode {mode:04o}; group and others must have no access (chmod 600)",
        path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },

    /// The file is not a keyring of the SPEC §6 format.
    #[error("keyring {} is invalid: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },

    /// `generate` found a file already there; it never overwrites one.
    #[error("keyring {} already exists", path.display())]
    Exists { path: PathBuf },

    /// The file is passphrase-sealed and no passphrase was given.
    #[error(
        "keyring {} is sealed with a passphrase: set {PASSPHRASE_VAR} to open it",
        path.display()
    )]
    PassphraseRequired { path: PathBuf },

    /// The passphrase does not open the sealed file (or the file was
    /// altered: the two cannot be told apart).
    #[error("keyring {}: wrong passphrase, or the sealed keyring was altered", path.display())]
    WrongPassphrase { path: PathBuf },

    /// `CACHE_ENCRYPTION_KEY` is not standard base64 of 32 bytes.
    #[error("CACHE_ENCRYPTION_KEY must be standard base64 of exactly 32 bytes")]
    EnvKey,

    /// A key id named by the caller is not in the keyring.
    #[error("key {0:?} is not in the keyring")]
    UnknownKey(String),

    /// The current key cannot be retired: new values are sealed under it.
    #[error("key {0:?} is the current key and cannot be retired")]
    CurrentKey(String),

    /// `prune` would drop keys that values may still need.
    #[error(
        "refusing to drop keys not marked retired ({}); run reencrypt first, or prune with --force",
        .0.join(", ")
    )]
    NotRetired(Vec<String>),

    /// The operating system's random generator failed.
    #[error("the system random generator failed")]
    Randomness,

    /// Neither `encryption.keyring` nor `encryption.key`
    /// (`CACHE_ENCRYPTION_KEY`) is configured.
    #[error("no keyring is configured: set encryption.keyring or CACHE_ENCRYPTION_KEY")]
    NotConfigured,
}

/// The keyring the configuration names: the single key of `encryption.key`
/// (`CACHE_ENCRYPTION_KEY`) if set, otherwise the `encryption.keyring`
/// file, opened with the passphrase in [`PASSPHRASE_VAR`] when the file is
/// sealed. A plain file ignores the variable.
pub fn load_configured(settings: &EncryptionSettings) -> Result<Keyring, KeyringError> {
    load_configured_with(settings, passphrase_from_env().as_deref())
}

/// [`load_configured`] with the passphrase given rather than read from the
/// environment (tests cannot set variables safely).
pub fn load_configured_with(
    settings: &EncryptionSettings,
    passphrase: Option<&[u8]>,
) -> Result<Keyring, KeyringError> {
    if settings.key.is_some() {
        // The configuration accepts padded and unpadded base64 here, so
        // its decoding is the one to follow.
        let secret = settings
            .decoded_key()
            .map_err(|_| KeyringError::EnvKey)?
            .ok_or(KeyringError::EnvKey)?;
        return Ok(Keyring::from_env_secret(secret));
    }

    let path = settings
        .keyring
        .as_deref()
        .ok_or(KeyringError::NotConfigured)?;
    let file = KeyringFile::new(path);
    match passphrase {
        Some(passphrase) => file.with_passphrase(passphrase).load(),
        None => file.load(),
    }
}

/// The passphrase in [`PASSPHRASE_VAR`], as raw bytes (it need not be
/// UTF-8). An empty variable counts as unset, as configuration variables
/// do.
pub fn passphrase_from_env() -> Option<Vec<u8>> {
    std::env::var_os(PASSPHRASE_VAR)
        .map(OsString::into_vec)
        .filter(|bytes| !bytes.is_empty())
}

/// One key of the keyring.
#[derive(Clone)]
struct Key {
    id: String,
    created_at: u64,
    secret: [u8; SECRET_LEN],
    /// Set by `mark_retired` once `reencrypt` has moved every value off the
    /// key; only retired keys may be pruned without force.
    retired_at: Option<u64>,
}

/// The secrets values are sealed under: one current key, which seals new
/// values, and older keys kept to open old values until they are pruned.
///
/// Invariants, held by every constructor: at least one key, unique valid
/// ids, and the current id among them. `Debug` and `Display` print ids and
/// dates, never a secret. Secrets are not wiped from memory on drop (no
/// allowed crate offers it).
#[derive(Clone)]
pub struct Keyring {
    current: String,
    keys: Vec<Key>,
}

/// What `keys list` shows of one key: everything but the secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: String,
    /// Unix seconds; 0 for the key taken from `CACHE_ENCRYPTION_KEY`.
    pub created_at: u64,
    pub is_current: bool,
    /// Unix seconds at which `reencrypt` reported the key unused.
    pub retired_at: Option<u64>,
}

impl Keyring {
    /// Reads and validates a keyring file; see [`KeyringFile::load`].
    pub fn load(path: &Path) -> Result<Keyring, KeyringError> {
        KeyringFile::new(path).load()
    }

    /// Creates a keyring file; see [`KeyringFile::generate`].
    pub fn generate(path: &Path) -> Result<Keyring, KeyringError> {
        KeyringFile::new(path).generate()
    }

    /// Adds a fresh current key to a file; see [`KeyringFile::rotate`].
    pub fn rotate(path: &Path) -> Result<Keyring, KeyringError> {
        KeyringFile::new(path).rotate()
    }

    /// Drops old keys from a file; see [`KeyringFile::prune`].
    pub fn prune(path: &Path, keep: usize, force: bool) -> Result<Vec<String>, KeyringError> {
        KeyringFile::new(path).prune(keep, force)
    }

    /// Marks keys of a file retired; see [`KeyringFile::mark_retired`].
    pub fn mark_retired(path: &Path, ids: &[String]) -> Result<Keyring, KeyringError> {
        KeyringFile::new(path).mark_retired(ids)
    }

    /// A keyring of the single key in `CACHE_ENCRYPTION_KEY` (standard
    /// base64 of 32 bytes, surrounding whitespace ignored), with id `env`.
    pub fn from_env_key(b64: &str) -> Result<Keyring, KeyringError> {
        let secret = decode_secret(b64.trim()).ok_or(KeyringError::EnvKey)?;
        Ok(Keyring::from_env_secret(secret))
    }

    fn from_env_secret(secret: [u8; SECRET_LEN]) -> Keyring {
        Keyring {
            current: ENV_KEY_ID.to_owned(),
            keys: vec![Key {
                id: ENV_KEY_ID.to_owned(),
                created_at: 0,
                secret,
                retired_at: None,
            }],
        }
    }

    /// The id new values are sealed under.
    pub fn current_id(&self) -> &str {
        &self.current
    }

    /// The secret of key `id`, if the keyring holds it.
    pub fn secret(&self, id: &str) -> Option<&[u8; 32]> {
        self.keys
            .iter()
            .find(|key| key.id == id)
            .map(|key| &key.secret)
    }

    /// Every key, in file order, without its secret.
    pub fn list(&self) -> Vec<KeyInfo> {
        self.keys
            .iter()
            .map(|key| KeyInfo {
                id: key.id.clone(),
                created_at: key.created_at,
                is_current: key.id == self.current,
                retired_at: key.retired_at,
            })
            .collect()
    }

    fn with_fresh_key() -> Result<Keyring, KeyringError> {
        let key = fresh_key(&[])?;
        Ok(Keyring {
            current: key.id.clone(),
            keys: vec![key],
        })
    }

    fn add_fresh_key(&mut self) -> Result<(), KeyringError> {
        let key = fresh_key(&self.keys)?;
        self.current = key.id.clone();
        self.keys.push(key);
        Ok(())
    }

    fn drop_old_keys(&mut self, keep: usize, force: bool) -> Result<Vec<String>, KeyringError> {
        let mut old: Vec<(usize, &Key)> = self
            .keys
            .iter()
            .enumerate()
            .filter(|(_, key)| key.id != self.current)
            .collect();
        // Newest first; rotate appends, so file order breaks ties.
        old.sort_by_key(|(index, key)| std::cmp::Reverse((key.created_at, *index)));
        let doomed = old.split_off(keep.min(old.len()));

        let unretired: Vec<String> = doomed
            .iter()
            .filter(|(_, key)| key.retired_at.is_none())
            .map(|(_, key)| key.id.clone())
            .collect();
        if !force && !unretired.is_empty() {
            return Err(KeyringError::NotRetired(unretired));
        }

        let dropped: Vec<String> = doomed.iter().rev().map(|(_, key)| key.id.clone()).collect();
        self.keys.retain(|key| !dropped.contains(&key.id));
        Ok(dropped)
    }

    fn retire(&mut self, ids: &[String]) -> Result<(), KeyringError> {
        let now = unix_now();
        for id in ids {
            if *id == self.current {
                return Err(KeyringError::CurrentKey(id.clone()));
            }
            let key = self
                .keys
                .iter_mut()
                .find(|key| key.id == *id)
                .ok_or_else(|| KeyringError::UnknownKey(id.clone()))?;
            key.retired_at.get_or_insert(now);
        }
        Ok(())
    }

    /// The file form: SPEC §6 field order, pretty-printed, ending in a
    /// newline. Temporary copies of the base64 secrets are not wiped.
    fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct FileForm<'a> {
            version: u64,
            current: &'a str,
            keys: Vec<KeyForm<'a>>,
        }

        #[derive(Serialize)]
        struct KeyForm<'a> {
            id: &'a str,
            created_at: u64,
            secret: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            retired_at: Option<u64>,
        }

        let form = FileForm {
            version: FORMAT_VERSION,
            current: &self.current,
            keys: self
                .keys
                .iter()
                .map(|key| KeyForm {
                    id: &key.id,
                    created_at: key.created_at,
                    secret: BASE64.encode(key.secret),
                    retired_at: key.retired_at,
                })
                .collect(),
        };
        let mut json = serde_json::to_vec_pretty(&form)
            .expect("serializing strings and integers into a Vec cannot fail");
        json.push(b'\n');
        json
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|key| key.id.as_str()).collect();
        f.debug_struct("Keyring")
            .field("current", &self.current)
            .field("keys", &ids)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Keyring {
    /// One line per key, as `keys list` prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for info in self.list() {
            writeln!(f, "{info}")?;
        }
        Ok(())
    }
}

impl fmt::Display for KeyInfo {
    /// `<id>  created <UTC time>[  current][  retired <UTC time>]`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}  created {}", self.id, utc_time(self.created_at))?;
        if self.is_current {
            f.write_str("  current")?;
        }
        if let Some(at) = self.retired_at {
            write!(f, "  retired {}", utc_time(at))?;
        }
        Ok(())
    }
}

/// Formats unix seconds as `YYYY-MM-DDTHH:MM:SSZ`: days since the epoch are
/// turned into a proleptic Gregorian date by counting 400-year eras, then
/// years within the era, with the year starting in March so that the leap
/// day falls at its end.
fn utc_time(unix_secs: u64) -> String {
    let (days, secs_of_day) = (unix_secs / 86_400, unix_secs % 86_400);

    let shifted = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);

    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs_of_day / 3_600,
        secs_of_day % 3_600 / 60,
        secs_of_day % 60
    )
}

/// A keyring file, and the passphrase that unlocks it if it is sealed.
///
/// Every change takes an exclusive lock on `<path>.lock`, so that two
/// commands (a `rotate` and a `mark_retired`, say) cannot lose each other's
/// change, and replaces the file atomically with mode 0600. A change keeps
/// the file's form: plain stays plain, sealed stays sealed under the same
/// passphrase. Only [`generate`](Self::generate) and
/// [`reseal`](Self::reseal) choose the form.
#[derive(Clone, Copy)]
pub struct KeyringFile<'a> {
    path: &'a Path,
    passphrase: Option<&'a [u8]>,
    iterations: u32,
}

impl<'a> KeyringFile<'a> {
    pub fn new(path: &'a Path) -> KeyringFile<'a> {
        KeyringFile {
            path,
            passphrase: None,
            iterations: DEFAULT_PASSPHRASE_ITERATIONS,
        }
    }

    /// The passphrase that opens a sealed file, and that `generate` seals a
    /// new file with. A plain file opens without it.
    pub fn with_passphrase(self, passphrase: &'a [u8]) -> KeyringFile<'a> {
        KeyringFile {
            passphrase: Some(passphrase),
            ..self
        }
    }

    /// PBKDF2 rounds used when this handle seals a file anew (`generate`,
    /// `reseal`); a sealed file records its own count. At least 1.
    pub fn with_iterations(self, iterations: u32) -> KeyringFile<'a> {
        KeyringFile {
            iterations: iterations.max(1),
            ..self
        }
    }

    /// Reads and validates the file. Refuses a file that group or others
    /// may access (the message names the path and the mode), a file that is
    /// not exactly the SPEC §6 format (plus each key's optional
    /// `retired_at`) or the passphrase-sealed form, duplicate or invalid
    /// ids, and a `current` that names no key.
    pub fn load(&self) -> Result<Keyring, KeyringError> {
        self.read().map(|(keyring, _)| keyring)
    }

    /// Creates the file with one fresh key, mode 0600, sealed if a
    /// passphrase was given. Fails if the file exists, even if it appears
    /// while this runs.
    pub fn generate(&self) -> Result<Keyring, KeyringError> {
        if fs::symlink_metadata(self.path).is_ok() {
            return Err(KeyringError::Exists {
                path: self.path.to_owned(),
            });
        }

        let form = match self.passphrase {
            Some(passphrase) => Form::sealed(passphrase, self.iterations)?,
            None => Form::Plain,
        };
        let keyring = Keyring::with_fresh_key()?;
        write_atomically(self.path, &self.encode(&keyring, &form)?, Replace::Never)?;
        Ok(keyring)
    }

    /// Adds a fresh key and makes it current; old keys stay for opening old
    /// values.
    pub fn rotate(&self) -> Result<Keyring, KeyringError> {
        self.update(Keyring::add_fresh_key)
            .map(|(keyring, ())| keyring)
    }

    /// Drops the oldest non-current keys, keeping the `keep` newest of them
    /// (the current key is never dropped and not counted). Refuses, and
    /// drops nothing, if a key to drop is not marked retired, unless
    /// `force`. Returns the ids dropped, oldest first.
    pub fn prune(&self, keep: usize, force: bool) -> Result<Vec<String>, KeyringError> {
        self.update(|keyring| keyring.drop_old_keys(keep, force))
            .map(|(_, dropped)| dropped)
    }

    /// Records that `reencrypt` has moved every value off these keys, which
    /// lets `prune` drop them. A key already marked keeps its first date.
    /// Refuses the current key and unknown ids, changing nothing.
    pub fn mark_retired(&self, ids: &[String]) -> Result<Keyring, KeyringError> {
        self.update(|keyring| keyring.retire(ids))
            .map(|(keyring, ())| keyring)
    }

    /// Rewrites the file sealed under `new_passphrase` (fresh salt, this
    /// handle's iteration count), or plain if `None`.
    pub fn reseal(&self, new_passphrase: Option<&[u8]>) -> Result<Keyring, KeyringError> {
        let _lock = self.lock()?;
        let (keyring, _) = self.read()?;
        let form = match new_passphrase {
            Some(passphrase) => Form::sealed(passphrase, self.iterations)?,
            None => Form::Plain,
        };
        write_atomically(self.path, &self.encode(&keyring, &form)?, Replace::Always)?;
        Ok(keyring)
    }

    fn update<T>(
        &self,
        change: impl FnOnce(&mut Keyring) -> Result<T, KeyringError>,
    ) -> Result<(Keyring, T), KeyringError> {
        let _lock = self.lock()?;
        let (mut keyring, form) = self.read()?;
        let outcome = change(&mut keyring)?;
        write_atomically(self.path, &self.encode(&keyring, &form)?, Replace::Always)?;
        Ok((keyring, outcome))
    }

    fn lock(&self) -> Result<File, KeyringError> {
        fs::metadata(self.path).map_err(io_error(self.path))?;
        lock(self.path)
    }

    fn read(&self) -> Result<(Keyring, Form), KeyringError> {
        let text = read_private(self.path)?;
        let document = parse_json(&text).map_err(|reason| self.invalid(reason))?;
        let Some(sealed) = document.get("sealed") else {
            let keyring = parse_plain(&document).map_err(|reason| self.invalid(reason))?;
            return Ok((keyring, Form::Plain));
        };

        let envelope = parse_envelope(&document, sealed).map_err(|reason| self.invalid(reason))?;
        let passphrase = self
            .passphrase
            .ok_or_else(|| KeyringError::PassphraseRequired {
                path: self.path.to_owned(),
            })?;
        let seal = PassphraseSeal::derive(passphrase, envelope.salt, envelope.iterations);
        let inner =
            crypto::open(&seal.keys, &envelope.payload, MAX_FILE_LEN as usize).map_err(|_| {
                KeyringError::WrongPassphrase {
                    path: self.path.to_owned(),
                }
            })?;

        let inner = std::str::from_utf8(&inner)
            .map_err(|_| self.invalid("the sealed keyring is not UTF-8 text".to_owned()))?;
        let keyring = parse_json(inner)
            .and_then(|document| parse_plain(&document))
            .map_err(|reason| self.invalid(format!("inside the seal, {reason}")))?;
        Ok((keyring, Form::Sealed(Box::new(seal))))
    }

    fn encode(&self, keyring: &Keyring, form: &Form) -> Result<Vec<u8>, KeyringError> {
        let Form::Sealed(seal) = form else {
            return Ok(keyring.to_json());
        };

        // The key id is a valid constant, so only randomness can fail.
        let payload = crypto::seal(
            &seal.keys,
            PASSPHRASE_KEY_ID,
            &keyring.to_json(),
            usize::MAX,
        )
        .map_err(|_| KeyringError::Randomness)?;
        let document = serde_json::json!({
            "version": FORMAT_VERSION,
            "sealed": {
                "kdf": PASSPHRASE_KDF,
                "iterations": seal.iterations,
                "salt": BASE64.encode(seal.salt),
                "payload": BASE64.encode(payload),
            }
        });
        let mut json = serde_json::to_vec_pretty(&document)
            .expect("serializing a JSON value into a Vec cannot fail");
        json.push(b'\n');
        Ok(json)
    }

    fn invalid(&self, reason: String) -> KeyringError {
        KeyringError::Invalid {
            path: self.path.to_owned(),
            reason,
        }
    }
}

impl fmt::Debug for KeyringFile<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyringFile")
            .field("path", &self.path)
            .field("passphrase", &self.passphrase.map(|_| ".."))
            .field("iterations", &self.iterations)
            .finish()
    }
}

/// How a file was, and will be, written.
enum Form {
    Plain,
    Sealed(Box<PassphraseSeal>),
}

impl Form {
    fn sealed(passphrase: &[u8], iterations: u32) -> Result<Form, KeyringError> {
        let mut salt = [0u8; SALT_LEN];
        SystemRandom::new()
            .fill(&mut salt)
            .map_err(|_| KeyringError::Randomness)?;
        Ok(Form::Sealed(Box::new(PassphraseSeal::derive(
            passphrase, salt, iterations,
        ))))
    }
}

/// The keys a passphrase-sealed file is sealed under, kept from reading to
/// writing so that a change costs one PBKDF2 run, not two.
struct PassphraseSeal {
    salt: [u8; SALT_LEN],
    iterations: u32,
    keys: ProjectKeys,
}

impl PassphraseSeal {
    /// PBKDF2-HMAC-SHA256 stretches the passphrase into a 32-byte secret,
    /// from which the value format's own derivation makes the keys.
    fn derive(passphrase: &[u8], salt: [u8; SALT_LEN], iterations: u32) -> PassphraseSeal {
        let mut secret = [0u8; SECRET_LEN];
        pbkdf2::pbkdf2_hmac::<sha2::Sha256>(passphrase, &salt, iterations, &mut secret);
        PassphraseSeal {
            salt,
            iterations,
            keys: ProjectKeys::derive(&secret, PASSPHRASE_PROJECT),
        }
    }
}

/// The outer object of the passphrase-sealed form.
struct Envelope {
    iterations: u32,
    salt: [u8; SALT_LEN],
    payload: Vec<u8>,
}

fn parse_envelope(document: &Value, sealed: &Value) -> Result<Envelope, String> {
    let top = document
        .as_object()
        .ok_or("the top level is not a JSON object")?;
    only_fields(top, "the top level", &["version", "sealed"])?;
    if top.get("version").and_then(Value::as_u64) != Some(FORMAT_VERSION) {
        return Err("\"version\" must be 1".to_owned());
    }

    let sealed = sealed.as_object().ok_or("\"sealed\" is not an object")?;
    only_fields(
        sealed,
        "\"sealed\"",
        &["kdf", "iterations", "salt", "payload"],
    )?;
    if sealed.get("kdf").and_then(Value::as_str) != Some(PASSPHRASE_KDF) {
        return Err(format!("sealed.kdf must be {PASSPHRASE_KDF:?}"));
    }
    let iterations = sealed
        .get("iterations")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n >= 1)
        .ok_or("sealed.iterations must be a positive 32-bit integer")?;
    let salt = sealed
        .get("salt")
        .and_then(Value::as_str)
        .and_then(|text| BASE64.decode(text).ok())
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or("sealed.salt must be standard base64 of 16 bytes")?;
    let payload = sealed
        .get("payload")
        .and_then(Value::as_str)
        .and_then(|text| BASE64.decode(text).ok())
        .filter(|bytes| crypto::is_sealed(bytes))
        .ok_or("sealed.payload must be standard base64 of a sealed value")?;

    Ok(Envelope {
        iterations,
        salt,
        payload,
    })
}

fn parse_json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text)
        .map_err(|e| format!("not valid JSON (line {}, column {})", e.line(), e.column()))
}

/// Validates the SPEC §6 document by hand rather than through serde, so
/// that no error message can echo a field's value (a misplaced secret).
fn parse_plain(document: &Value) -> Result<Keyring, String> {
    let top = document
        .as_object()
        .ok_or("the top level is not a JSON object")?;
    only_fields(top, "the top level", &["version", "current", "keys"])?;
    if top.get("version").and_then(Value::as_u64) != Some(FORMAT_VERSION) {
        return Err("\"version\" must be 1".to_owned());
    }
    let current = top
        .get("current")
        .and_then(Value::as_str)
        .ok_or("\"current\" must be a string")?;
    let entries = top
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("\"keys\" must be an array")?;

    let mut keys: Vec<Key> = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let key = parse_key(index, entry)?;
        if keys.iter().any(|seen| seen.id == key.id) {
            return Err(format!("key id {:?} appears more than once", key.id));
        }
        keys.push(key);
    }
    if !keys.iter().any(|key| key.id == current) {
        return Err("\"current\" names no key of \"keys\"".to_owned());
    }

    Ok(Keyring {
        current: current.to_owned(),
        keys,
    })
}

fn parse_key(index: usize, entry: &Value) -> Result<Key, String> {
    let field = |name: &str| format!("keys[{index}].{name}");
    let object = entry
        .as_object()
        .ok_or_else(|| format!("keys[{index}] is not an object"))?;
    only_fields(
        object,
        &format!("keys[{index}]"),
        &["id", "created_at", "secret", "retired_at"],
    )?;

    let id = object
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| crypto::is_valid_key_id(id))
        .ok_or_else(|| {
            format!(
                "{} must be 1 to 64 characters of [A-Za-z0-9_.-]",
                field("id")
            )
        })?;
    let created_at = object
        .get("created_at")
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("{} must be unix seconds", field("created_at")))?;
    let secret = object
        .get("secret")
        .and_then(Value::as_str)
        .and_then(decode_secret)
        .ok_or_else(|| format!("{} must be standard base64 of 32 bytes", field("secret")))?;
    let retired_at = match object.get("retired_at") {
        None => None,
        Some(value) => Some(
            value
                .as_u64()
                .ok_or_else(|| format!("{} must be unix seconds", field("retired_at")))?,
        ),
    };

    Ok(Key {
        id: id.to_owned(),
        created_at,
        secret,
        retired_at,
    })
}

fn only_fields(object: &Map<String, Value>, place: &str, allowed: &[&str]) -> Result<(), String> {
    match object.keys().find(|name| !allowed.contains(&name.as_str())) {
        Some(name) => Err(format!("{place} has an unknown field {name:?}")),
        None => Ok(()),
    }
}

fn decode_secret(text: &str) -> Option<[u8; SECRET_LEN]> {
    BASE64.decode(text).ok()?.try_into().ok()
}

fn fresh_key(existing: &[Key]) -> Result<Key, KeyringError> {
    let rng = SystemRandom::new();
    let created_at = unix_now();

    let mut secret = [0u8; SECRET_LEN];
    rng.fill(&mut secret)
        .map_err(|_| KeyringError::Randomness)?;

    // Ids are short because every sealed value carries one; the random
    // suffix separates keys made in the same second.
    for _ in 0..16 {
        let mut suffix = [0u8; 3];
        rng.fill(&mut suffix)
            .map_err(|_| KeyringError::Randomness)?;
        let id = format!("k{created_at}-{}", hex(&suffix));
        if !existing.iter().any(|key| key.id == id) {
            return Ok(Key {
                id,
                created_at,
                secret,
                retired_at: None,
            });
        }
    }
    Err(KeyringError::Randomness)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> KeyringError + '_ {
    move |cause| KeyringError::Io {
        path: path.to_owned(),
        cause,
    }
}

/// Reads the file, after checking through the open handle (not the path,
/// which could be swapped in between) that it is a regular file with no
/// group or other access.
fn read_private(path: &Path) -> Result<String, KeyringError> {
    let file = File::open(path).map_err(io_error(path))?;
    let metadata = file.metadata().map_err(io_error(path))?;
    let invalid = |reason: &str| KeyringError::Invalid {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };

    if !metadata.is_file() {
        return Err(invalid("not a regular file"));
    }
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyringError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }

    let mut bytes = Vec::new();
    file.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error(path))?;
    if bytes.len() as u64 > MAX_FILE_LEN {
        return Err(invalid("larger than 1 MiB"));
    }
    String::from_utf8(bytes).map_err(|_| invalid("not UTF-8 text"))
}

/// Loads the file, applies `change`, and writes the result back, holding an
/// exclusive lock on `<path>.lock` throughout so that two commands (a
/// `rotate` and a `mark_retired`, say) cannot lose each other's change.
fn lock(path: &Path) -> Result<File, KeyringError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);

    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io_error(&lock_path))?;
    file.lock().map_err(io_error(&lock_path))?;
    Ok(file)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Replace {
    Never,
    Always,
}

/// Writes a whole new file, never a partial one: a temporary file created
/// with mode 0600 in the same directory is written and synced, then renamed
/// over `path` (or, for `Replace::Never`, hard-linked to `path`, which fails
/// if `path` exists), and the directory is synced so the change survives a
/// crash.
fn write_atomically(path: &Path, contents: &[u8], replace: Replace) -> Result<(), KeyringError> {
    let file_name = path.file_name().ok_or_else(|| KeyringError::Invalid {
        path: path.to_owned(),
        reason: "the path names no file".to_owned(),
    })?;
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut suffix = [0u8; 6];
    SystemRandom::new()
        .fill(&mut suffix)
        .map_err(|_| KeyringError::Randomness)?;
    let temp = dir.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        hex(&suffix)
    ));

    let written = write_temp(&temp, contents).and_then(|()| match replace {
        Replace::Always => fs::rename(&temp, path),
        Replace::Never => fs::hard_link(&temp, path),
    });
    if replace == Replace::Never || written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    match written {
        Err(cause) if cause.kind() == io::ErrorKind::AlreadyExists => {
            return Err(KeyringError::Exists {
                path: path.to_owned(),
            });
        }
        other => other.map_err(io_error(path))?,
    }

    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io_error(dir))
}

fn write_temp(temp: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(temp)?;
    file.set_permissions(Permissions::from_mode(0o600))?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn spec_document() -> String {
        format!(
            r#"{{"version":1,"current":"k2","keys":[
                {{"id":"k1","created_at":1700000000,"secret":"{SECRET_B64}"}},
                {{"id":"k2","created_at":1710000000,"secret":"{SECRET_B64}"}}]}}"#
        )
    }

    fn write_with_mode(path: &Path, text: &str, mode: u32) {
        fs::write(path, text).unwrap();
        fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn ids(keyring: &Keyring) -> Vec<String> {
        keyring.list().into_iter().map(|info| info.id).collect()
    }

    #[test]
    fn load_accepts_the_spec_format_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        write_with_mode(&path, &spec_document(), 0o600);

        let keyring = Keyring::load(&path).unwrap();
        assert_eq!(keyring.current_id(), "k2");
        assert_eq!(ids(&keyring), ["k1", "k2"]);
        assert_eq!(keyring.secret("k1").unwrap()[31], 0x1f);
        assert!(keyring.secret("k3").is_none());
    }

    #[test]
    fn load_refuses_mode_0644_naming_the_path_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        write_with_mode(&path, &spec_document(), 0o644);

        let error = Keyring::load(&path).unwrap_err();
        assert!(matches!(
            error,
            KeyringError::Permissions { mode: 0o644, .. }
        ));
        let message = error.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("0644"), "{message}");

        for mode in [0o640, 0o604, 0o660, 0o601] {
            fs::set_permissions(&path, Permissions::from_mode(mode)).unwrap();
            assert!(matches!(
                Keyring::load(&path),
                Err(KeyringError::Permissions { .. })
            ));
        }
        fs::set_permissions(&path, Permissions::from_mode(0o400)).unwrap();
        assert!(Keyring::load(&path).is_ok());
    }

    #[test]
    fn load_refuses_documents_outside_the_format() {
        let key = |extra: &str| {
            format!(
                r#"{{"version":1,"current":"k1","keys":[{{"id":"k1","created_at":1,{extra}}}]}}"#
            )
        };
        let good_secret = format!(r#""secret":"{SECRET_B64}""#);
        let cases = [
            "not json".to_owned(),
            "[]".to_owned(),
            key(&good_secret).replace(r#""version":1"#, r#""version":2"#),
            key(&good_secret).replace(r#""version":1,"#, ""),
            key(&good_secret).replace(r#""current":"k1""#, r#""current":"k9""#),
            key(&good_secret).replace(r#""current":"k1""#, r#""current":1"#),
            key(&good_secret).replace(r#""id":"k1""#, r#""id":"bad id""#),
            key(&good_secret).replace(r#""created_at":1"#, r#""created_at":-1"#),
            key(&good_secret).replace(r#""keys":["#, r#""extra":true,"keys":["#),
            key(&format!(r#"{good_secret},"comment":"x""#)),
            key(&format!(r#"{good_secret},"retired_at":"soon""#)),
            key(r#""secret":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHg==""#),
            key(r#""secret":"not base64!""#),
            key(r#""secret":null"#),
            r#"{"version":1,"current":"k1","keys":[]}"#.to_owned(),
            format!(
                r#"{{"version":1,"current":"k1","keys":[{{"id":"k1","created_at":1,{good_secret}}},{{"id":"k1","created_at":2,{good_secret}}}]}}"#
            ),
        ];

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        write_with_mode(&path, &key(&good_secret), 0o600);
        assert!(Keyring::load(&path).is_ok());
        for case in cases {
            write_with_mode(&path, &case, 0o600);
            assert!(
                matches!(Keyring::load(&path), Err(KeyringError::Invalid { .. })),
                "accepted {case}"
            );
        }
    }

    #[test]
    fn load_errors_never_echo_a_misplaced_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let document = format!(
            r#"{{"version":1,"current":"k1","keys":[{{"id":"k1","created_at":"{SECRET_B64}","secret":1}}]}}"#
        );
        write_with_mode(&path, &document, 0o600);

        let message = Keyring::load(&path).unwrap_err().to_string();
        assert!(message.contains("keys[0].created_at"), "{message}");
        assert!(!message.contains(SECRET_B64), "{message}");
    }

    #[test]
    fn generate_writes_one_key_with_mode_0600_in_the_spec_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let keyring = Keyring::generate(&path).unwrap();

        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(ids(&Keyring::load(&path).unwrap()), ids(&keyring));
        let document: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(document["version"], 1);
        assert_eq!(document["current"], keyring.current_id());
        let key = document["keys"][0].as_object().unwrap();
        let mut fields: Vec<&str> = key.keys().map(String::as_str).collect();
        fields.sort_unstable();
        assert_eq!(fields, ["created_at", "id", "secret"]);
        assert!(crypto::is_valid_key_id(keyring.current_id()));
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }

    #[test]
    fn generate_refuses_an_existing_file_and_leaves_it_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        write_with_mode(&path, "precious", 0o600);

        assert!(matches!(
            Keyring::generate(&path),
            Err(KeyringError::Exists { .. })
        ));
        assert_eq!(fs::read_to_string(&path).unwrap(), "precious");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn rotate_adds_a_fresh_current_key_and_keeps_the_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let first = Keyring::generate(&path).unwrap();
        let rotated = Keyring::rotate(&path).unwrap();

        assert_ne!(rotated.current_id(), first.current_id());
        assert_eq!(ids(&rotated)[0], first.current_id());
        assert_eq!(
            rotated.secret(first.current_id()),
            first.secret(first.current_id())
        );
        assert_ne!(
            rotated.secret(rotated.current_id()),
            first.secret(first.current_id())
        );
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(
            Keyring::load(&path).unwrap().current_id(),
            rotated.current_id()
        );
    }

    #[test]
    fn prune_refuses_unretired_keys_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        Keyring::generate(&path).unwrap();
        for _ in 0..3 {
            Keyring::rotate(&path).unwrap();
        }
        let all = ids(&Keyring::load(&path).unwrap());
        let before = fs::read(&path).unwrap();

        let refused = Keyring::prune(&path, 1, false).unwrap_err();
        assert!(matches!(&refused, KeyringError::NotRetired(ids) if ids.len() == 2));
        assert_eq!(
            fs::read(&path).unwrap(),
            before,
            "a refused prune changes nothing"
        );

        Keyring::mark_retired(&path, &all[..2]).unwrap();
        assert_eq!(Keyring::prune(&path, 1, false).unwrap(), all[..2]);
        assert_eq!(ids(&Keyring::load(&path).unwrap()), all[2..]);

        assert_eq!(Keyring::prune(&path, 0, true).unwrap(), all[2..3]);
        let left = Keyring::load(&path).unwrap();
        assert_eq!(ids(&left), [left.current_id()]);
        assert_eq!(left.current_id(), all[3]);
        assert!(Keyring::prune(&path, 0, true).unwrap().is_empty());
        assert_eq!(mode_of(&path), 0o600);
    }

    #[test]
    fn prune_keeps_the_newest_old_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        write_with_mode(
            &path,
            &format!(
                r#"{{"version":1,"current":"b","keys":[
                {{"id":"c","created_at":30,"secret":"{SECRET_B64}","retired_at":40}},
                {{"id":"b","created_at":20,"secret":"{SECRET_B64}"}},
                {{"id":"a","created_at":10,"secret":"{SECRET_B64}","retired_at":40}},
                {{"id":"d","created_at":5,"secret":"{SECRET_B64}","retired_at":40}}]}}"#
            ),
            0o600,
        );

        assert_eq!(
            Keyring::prune(&path, 5, false).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(Keyring::prune(&path, 1, false).unwrap(), ["d", "a"]);
        assert_eq!(ids(&Keyring::load(&path).unwrap()), ["c", "b"]);
    }

    #[test]
    fn mark_retired_refuses_the_current_key_and_unknown_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        write_with_mode(&path, &spec_document(), 0o600);

        let current = vec!["k2".to_owned()];
        let unknown = vec!["k9".to_owned()];
        assert!(matches!(
            Keyring::mark_retired(&path, &current),
            Err(KeyringError::CurrentKey(_))
        ));
        assert!(matches!(
            Keyring::mark_retired(&path, &unknown),
            Err(KeyringError::UnknownKey(_))
        ));

        let marked = Keyring::mark_retired(&path, &["k1".to_owned()]).unwrap();
        let first_date = marked.list()[0].retired_at.unwrap();
        let again = Keyring::mark_retired(&path, &["k1".to_owned()]).unwrap();
        assert_eq!(again.list()[0].retired_at, Some(first_date));
        assert_eq!(again.list()[1].retired_at, None);
    }

    #[test]
    fn list_debug_and_display_never_show_a_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        Keyring::generate(&path).unwrap();
        let keyring = Keyring::rotate(&path).unwrap();
        let sealer = Sealer::new(keyring.clone(), 1024, false);

        let printed = [
            format!("{keyring:?}"),
            format!("{keyring:#?}"),
            format!("{keyring}"),
            format!("{:?}", keyring.list()),
            keyring
                .list()
                .iter()
                .map(|info| format!("{info}\n"))
                .collect(),
            format!("{sealer:?}"),
        ];
        for info in keyring.list() {
            let secret = keyring.secret(&info.id).unwrap();
            let forms = [
                BASE64.encode(secret),
                hex(secret),
                format!("{secret:?}"),
                format!("{:?}", &secret[..4]),
            ];
            for text in &printed {
                assert!(text.contains(&info.id));
                for form in &forms {
                    assert!(!text.contains(form.as_str()), "{text} shows a secret");
                }
            }
        }
    }

    #[test]
    fn key_info_displays_dates_in_utc() {
        let info = KeyInfo {
            id: "k1".to_owned(),
            created_at: 951_782_400,
            is_current: true,
            retired_at: Some(1_733_246_400),
        };
        assert_eq!(
            info.to_string(),
            "k1  created 2000-02-29T00:00:00Z  current  retired 2024-12-03T17:20:00Z"
        );
        assert_eq!(utc_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_time(4_102_444_799), "2099-12-31T23:59:59Z");
        assert_eq!(utc_time(253_402_300_799), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn env_key_becomes_a_single_key_named_env() {
        let keyring = Keyring::from_env_key(&format!("  {SECRET_B64}\n")).unwrap();
        assert_eq!(keyring.current_id(), ENV_KEY_ID);
        assert_eq!(keyring.secret("env").unwrap()[0], 0);
        assert_eq!(keyring.list().len(), 1);

        for bad in ["", "AAAA", "not base64 at all", &SECRET_B64[4..]] {
            let error = Keyring::from_env_key(bad).unwrap_err();
            assert!(matches!(error, KeyringError::EnvKey));
        }
    }

    #[test]
    fn passphrase_sealed_keyring_needs_the_right_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let file = KeyringFile::new(&path)
            .with_passphrase(b"correct horse")
            .with_iterations(1_000);
        let generated = file.generate().unwrap();

        let text = fs::read_to_string(&path).unwrap();
        let secret = BASE64.encode(generated.secret(generated.current_id()).unwrap());
        assert!(!text.contains(&secret));
        assert!(
            !text.contains(generated.current_id()),
            "ids stay inside the seal"
        );
        assert_eq!(mode_of(&path), 0o600);

        assert!(matches!(
            Keyring::load(&path),
            Err(KeyringError::PassphraseRequired { .. })
        ));
        assert!(matches!(
            KeyringFile::new(&path).with_passphrase(b"wrong").load(),
            Err(KeyringError::WrongPassphrase { .. })
        ));
        let loaded = file.load().unwrap();
        assert_eq!(loaded.list(), generated.list());
        assert_eq!(
            loaded.secret(loaded.current_id()),
            generated.secret(generated.current_id())
        );
    }

    #[test]
    fn changes_to_a_sealed_keyring_keep_it_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let file = KeyringFile::new(&path)
            .with_passphrase(b"pass")
            .with_iterations(1_000);
        file.generate().unwrap();

        assert!(matches!(
            Keyring::rotate(&path),
            Err(KeyringError::PassphraseRequired { .. })
        ));
        let rotated = file.rotate().unwrap();
        assert_eq!(rotated.list().len(), 2);
        assert!(fs::read_to_string(&path).unwrap().contains("\"sealed\""));
        assert_eq!(file.load().unwrap().list(), rotated.list());

        let old = vec![rotated.list()[0].id.clone()];
        file.mark_retired(&old).unwrap();
        assert_eq!(file.prune(0, false).unwrap(), old);
        assert_eq!(file.load().unwrap().list().len(), 1);
    }

    #[test]
    fn reseal_converts_between_plain_and_sealed_forms() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let plain = Keyring::generate(&path).unwrap();
        let file = KeyringFile::new(&path).with_iterations(1_000);

        file.reseal(Some(b"first")).unwrap();
        assert!(matches!(
            Keyring::load(&path),
            Err(KeyringError::PassphraseRequired { .. })
        ));
        file.with_passphrase(b"first")
            .reseal(Some(b"second"))
            .unwrap();
        assert!(file.with_passphrase(b"first").load().is_err());
        file.with_passphrase(b"second").reseal(None).unwrap();

        let back = Keyring::load(&path).unwrap();
        assert_eq!(back.list(), plain.list());
        assert_eq!(
            back.secret(back.current_id()),
            plain.secret(plain.current_id())
        );
    }

    #[test]
    fn altered_passphrase_envelope_fails_like_a_wrong_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let file = KeyringFile::new(&path)
            .with_passphrase(b"pass")
            .with_iterations(1_000);
        file.generate().unwrap();

        let text = fs::read_to_string(&path).unwrap();
        write_with_mode(&path, &text.replace("1000", "1001"), 0o600);
        assert!(matches!(
            file.load(),
            Err(KeyringError::WrongPassphrase { .. })
        ));

        write_with_mode(&path, &text.replace("pbkdf2-sha256", "scrypt"), 0o600);
        assert!(matches!(file.load(), Err(KeyringError::Invalid { .. })));
        write_with_mode(&path, &text, 0o644);
        assert!(matches!(file.load(), Err(KeyringError::Permissions { .. })));
    }

    #[test]
    fn keyring_file_debug_hides_the_passphrase() {
        let path = Path::new("keys/keyring.json");
        let printed = format!("{:?}", KeyringFile::new(path).with_passphrase(b"hunter2"));
        assert!(!printed.contains("hunter2"));
        assert!(!printed.contains("104, 117"), "nor its bytes");
    }

    #[test]
    fn configured_keyring_comes_from_the_env_key_or_the_file() {
        let env_key = |key: &str| EncryptionSettings {
            key: Some(key.to_owned()),
            ..EncryptionSettings::default()
        };
        for key in [SECRET_B64, SECRET_B64.trim_end_matches('=')] {
            let keyring = load_configured_with(&env_key(key), None).unwrap();
            assert_eq!(keyring.current_id(), ENV_KEY_ID);
            assert_eq!(keyring.secret(ENV_KEY_ID).unwrap()[31], 0x1f);
        }
        assert!(matches!(
            load_configured_with(&env_key("AAAA"), None),
            Err(KeyringError::EnvKey)
        ));
        assert!(matches!(
            load_configured_with(&EncryptionSettings::default(), None),
            Err(KeyringError::NotConfigured)
        ));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        write_with_mode(&path, &spec_document(), 0o600);
        let file = EncryptionSettings {
            keyring: Some(path),
            ..EncryptionSettings::default()
        };
        let plain = load_configured_with(&file, Some(b"ignored for a plain file")).unwrap();
        assert_eq!(plain.current_id(), "k2");
    }

    #[test]
    fn configured_sealed_keyring_needs_the_passphrase_variable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let generated = KeyringFile::new(&path)
            .with_passphrase(b"pass")
            .with_iterations(1_000)
            .generate()
            .unwrap();
        let settings = EncryptionSettings {
            keyring: Some(path),
            ..EncryptionSettings::default()
        };

        let refused = load_configured_with(&settings, None).unwrap_err();
        assert!(matches!(refused, KeyringError::PassphraseRequired { .. }));
        assert!(refused.to_string().contains(PASSPHRASE_VAR), "{refused}");
        assert!(matches!(
            load_configured_with(&settings, Some(b"wrong")),
            Err(KeyringError::WrongPassphrase { .. })
        ));
        let loaded = load_configured_with(&settings, Some(b"pass")).unwrap();
        assert_eq!(loaded.list(), generated.list());
    }

    #[test]
    fn pbkdf2_hmac_sha256_matches_the_published_vector() {
        let mut out = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<sha2::Sha256>(b"password", b"salt", 1, &mut out);
        assert_eq!(
            hex(&out),
            "120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b"
        );
    }
}
