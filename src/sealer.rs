//! The sealer: the handle that seals and opens values with one keyring.
//!
//! The session seals every value a client writes and opens every value the
//! upstream returns through a [`Sealer`]; `reencrypt` uses one to move old
//! values to the current key. It derives each project's keys once per key
//! id and caches them; `crypto` does the byte work, `keyring` owns the
//! secrets.

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use foldhash::HashMap;

use crate::crypto::{self, DEFAULT_MAX_PLAINTEXT, OpenError, ProjectKeys, SealError};
use crate::keyring::Keyring;
use crate::metrics::SealCounters;

/// Seals and opens values for every project with one keyring: the handle
/// the session holds.
///
/// Safe to share between threads (`&self` everywhere). Per-project keys are
/// derived on first use and cached for the life of the `Sealer`; the cache
/// grows with (key ids x projects), both fixed by configuration. A reload
/// builds a new `Sealer` and swaps it in, so the cache never holds keys of a
/// removed secret.
pub struct Sealer {
    keyring: Keyring,
    compression_threshold: usize,
    strict: bool,
    max_plaintext: usize,
    /// Key id, then project, to keys. Nested so a lookup borrows `&str`
    /// instead of building an owned pair. The lock is held only for a map
    /// lookup or insert, never while deriving or sealing. Keys come from
    /// configuration only, so the fast foldhash is safe from hash flooding.
    derived: RwLock<HashMap<String, HashMap<String, Arc<ProjectKeys>>>>,
    /// Bytes sealed, opened and saved by compression, when the proxy counts
    /// them (`reencrypt` does not).
    counters: Option<SealCounters>,
}

/// The result of [`Sealer::open`]. `Debug` shows the kind and length only,
/// never the bytes, so that logging one cannot leak a value.
#[derive(PartialEq, Eq)]
pub enum Opened<'a> {
    /// The value was not sealed and is passed through unchanged.
    Plain(&'a [u8]),
    /// The plaintext of a sealed value.
    Sealed(Vec<u8>),
}

impl Opened<'_> {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Opened::Plain(bytes) => bytes,
            Opened::Sealed(bytes) => bytes,
        }
    }

    pub fn into_vec(self) -> Vec<u8> {
        match self {
            Opened::Plain(bytes) => bytes.to_vec(),
            Opened::Sealed(bytes) => bytes,
        }
    }
}

impl fmt::Debug for Opened<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Opened::Plain(bytes) => write!(f, "Plain({} bytes)", bytes.len()),
            Opened::Sealed(bytes) => write!(f, "Sealed({} bytes)", bytes.len()),
        }
    }
}

impl Sealer {
    /// `compression_threshold`: plaintexts longer than this are compressed
    /// when that saves 10% (`usize::MAX` never compresses). `strict`: values
    /// without the magic are refused instead of passed through. Opened values
    /// are limited to [`DEFAULT_MAX_PLAINTEXT`] bytes.
    pub fn new(keyring: Keyring, compression_threshold: usize, strict: bool) -> Sealer {
        Sealer {
            keyring,
            compression_threshold,
            strict,
            max_plaintext: DEFAULT_MAX_PLAINTEXT,
            derived: RwLock::new(HashMap::default()),
            counters: None,
        }
    }

    /// Counts every value sealed and opened in `counters`.
    pub fn with_counters(mut self, counters: SealCounters) -> Sealer {
        self.counters = Some(counters);
        self
    }

    /// Changes the largest plaintext `open` returns.
    pub fn with_max_plaintext(mut self, max_plaintext: usize) -> Sealer {
        self.max_plaintext = max_plaintext;
        self
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Seals `plaintext` for `project` under the current key.
    pub fn seal(&self, project: &str, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut sealed = Vec::new();
        self.seal_into(project, plaintext, crypto::reserve_in(&mut sealed))?;
        Ok(sealed)
    }

    /// [`Sealer::seal`] into the caller's buffer: `reserve` gets the exact
    /// sealed length and returns where to write it (see
    /// [`crypto::seal_into`]).
    pub fn seal_into<'b>(
        &self,
        project: &str,
        plaintext: &[u8],
        reserve: impl FnOnce(usize) -> &'b mut [u8],
    ) -> Result<(), SealError> {
        let key_id = self.keyring.current_id();
        let keys = self
            .project_keys(key_id, project)
            .expect("keyring invariant: the current key is in the keyring");
        let mut sealed_len = 0;
        crypto::seal_into(
            &keys,
            key_id,
            plaintext,
            self.compression_threshold,
            |len| {
                sealed_len = len;
                reserve(len)
            },
        )?;
        if let Some(counters) = &self.counters {
            counters.sealed(
                plaintext.len(),
                sealed_len,
                crypto::sealed_len(key_id, plaintext.len()),
            );
        }
        Ok(())
    }

    /// Opens a value read for `project`. A value without the magic is
    /// returned as it is (borrowed), or refused with
    /// [`OpenError::NotSealed`] when strict.
    pub fn open<'a>(&self, project: &str, value: &'a [u8]) -> Result<Opened<'a>, OpenError> {
        if !crypto::is_sealed(value) {
            if self.strict {
                return Err(OpenError::NotSealed);
            }
            return Ok(Opened::Plain(value));
        }

        let header = crypto::parse_header(value)?;
        let keys = self
            .project_keys(header.key_id, project)
            .ok_or_else(|| OpenError::UnknownKey(header.key_id.to_owned()))?;
        let plaintext = crypto::open(&keys, value, self.max_plaintext)?;
        if let Some(counters) = &self.counters {
            counters.opened(plaintext.len());
        }
        Ok(Opened::Sealed(plaintext))
    }

    /// Whether `value` is sealed under a key other than the current one, so
    /// that `reencrypt` should rewrite it. Plain and malformed values are
    /// not: there is no key to move them from.
    pub fn needs_reencrypt(&self, value: &[u8]) -> bool {
        crypto::is_sealed(value)
            && crypto::parse_header(value)
                .is_ok_and(|header| header.key_id != self.keyring.current_id())
    }

    /// The keys of `project` under key `key_id`, derived on first use.
    /// `None` if the keyring has no such key.
    pub fn project_keys(&self, key_id: &str, project: &str) -> Option<Arc<ProjectKeys>> {
        let secret = self.keyring.secret(key_id)?;

        // A panic elsewhere cannot leave the map half-updated, so a poisoned
        // lock is still safe to use.
        let cached = self
            .derived
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key_id)
            .and_then(|projects| projects.get(project))
            .cloned();
        if cached.is_some() {
            return cached;
        }

        let keys = Arc::new(ProjectKeys::derive(secret, project));
        let mut derived = self.derived.write().unwrap_or_else(PoisonError::into_inner);
        let entry = derived
            .entry(key_id.to_owned())
            .or_default()
            .entry(project.to_owned())
            .or_insert(keys);
        Some(Arc::clone(entry))
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("keyring", &self.keyring)
            .field("compression_threshold", &self.compression_threshold)
            .field("strict", &self.strict)
            .field("max_plaintext", &self.max_plaintext)
            .finish_non_exhaustive()
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    const SECRET_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    #[test]
    fn sealer_round_trips_and_passes_plain_values_through() {
        let sealer = Sealer::new(Keyring::from_env_key(SECRET_B64).unwrap(), 1024, false);
        let sealed = sealer.seal("billing", b"invoice 42").unwrap();
        assert_eq!(crypto::parse_header(&sealed).unwrap().key_id, "env");
        assert_eq!(
            sealer.open("billing", &sealed).unwrap(),
            Opened::Sealed(b"invoice 42".to_vec())
        );

        assert_eq!(
            format!("{:?}", sealer.open("billing", &sealed).unwrap()),
            "Sealed(10 bytes)"
        );

        let counter = b"17";
        assert!(matches!(sealer.open("billing", counter), Ok(Opened::Plain(v)) if v == counter));
        assert!(matches!(
            sealer.open("shipping", &sealed),
            Err(OpenError::Integrity)
        ));
    }

    /// The length of `plaintext_len` bytes sealed without compression, as
    /// SPEC §6 lays it out: magic, version, flags and key id length (6
    /// bytes), the key id, a 16-byte IV, the PKCS#7-padded plaintext and a
    /// 32-byte tag. Written out here so the test does not trust the code
    /// it checks.
    fn spec_len(key_id: &str, plaintext_len: usize) -> usize {
        6 + key_id.len() + 16 + (plaintext_len / 16 + 1) * 16 + 32
    }

    #[test]
    fn counters_see_bytes_sealed_opened_and_saved_by_compression() {
        let metrics = crate::metrics::Metrics::new();
        let sealer = Sealer::new(Keyring::from_env_key(SECRET_B64).unwrap(), 64, false)
            .with_counters(metrics.seal_counters());
        let small = sealer.seal("billing", b"0123456789").unwrap();
        assert_eq!(small.len(), spec_len("env", 10));
        let large = sealer.seal("billing", &[b'a'; 1000]).unwrap();
        sealer.open("billing", &large).unwrap();
        sealer.open("billing", b"plain").unwrap();

        let text = metrics.encode();
        let saved = spec_len("env", 1000) - large.len();
        assert!(saved > 900, "{saved}");
        assert!(
            text.contains("redcloak_sealed_bytes_total 1010\n"),
            "{text}"
        );
        assert!(
            text.contains("redcloak_opened_bytes_total 1000\n"),
            "{text}"
        );
        assert!(text.contains(&format!("redcloak_compression_saved_bytes_total {saved}\n")));
    }

    #[test]
    fn strict_sealer_refuses_plain_values() {
        let sealer = Sealer::new(Keyring::from_env_key(SECRET_B64).unwrap(), 1024, true);
        assert!(matches!(
            sealer.open("billing", b"17"),
            Err(OpenError::NotSealed)
        ));
        let sealed = sealer.seal("billing", b"17").unwrap();
        assert_eq!(sealer.open("billing", &sealed).unwrap().as_bytes(), b"17");
    }

    #[test]
    fn rotation_keeps_old_values_readable_and_flags_them_for_reencrypt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let before = Sealer::new(Keyring::generate(&path).unwrap(), 1024, false);
        let old_value = before.seal("billing", b"old").unwrap();
        assert!(!before.needs_reencrypt(&old_value));

        let after = Sealer::new(Keyring::rotate(&path).unwrap(), 1024, false);
        let new_value = after.seal("billing", b"new").unwrap();
        assert_eq!(
            after.open("billing", &old_value).unwrap().into_vec(),
            b"old"
        );
        assert!(after.needs_reencrypt(&old_value));
        assert!(!after.needs_reencrypt(&new_value));
        assert!(!after.needs_reencrypt(b"plain"));

        let old_id = before.keyring().current_id().to_owned();
        Keyring::mark_retired(&path, std::slice::from_ref(&old_id)).unwrap();
        Keyring::prune(&path, 0, false).unwrap();
        let pruned = Sealer::new(Keyring::load(&path).unwrap(), 1024, false);
        assert!(matches!(
            pruned.open("billing", &old_value),
            Err(OpenError::UnknownKey(id)) if id == old_id
        ));
    }

    #[test]
    fn sealer_derives_each_project_key_once_and_serves_many_threads() {
        let sealer = Sealer::new(Keyring::from_env_key(SECRET_B64).unwrap(), 16, false);
        let first = sealer.project_keys("env", "billing").unwrap();
        assert!(Arc::ptr_eq(
            &first,
            &sealer.project_keys("env", "billing").unwrap()
        ));
        assert!(!Arc::ptr_eq(
            &first,
            &sealer.project_keys("env", "shipping").unwrap()
        ));
        assert!(sealer.project_keys("missing", "billing").is_none());

        std::thread::scope(|scope| {
            for thread in 0..8 {
                let sealer = &sealer;
                scope.spawn(move || {
                    let project = format!("project-{}", thread % 3);
                    for round in 0..200 {
                        let plaintext = format!("value {thread} {round} ").repeat(round % 7);
                        let sealed = sealer.seal(&project, plaintext.as_bytes()).unwrap();
                        let opened = sealer.open(&project, &sealed).unwrap();
                        assert_eq!(opened.as_bytes(), plaintext.as_bytes());
                    }
                });
            }
        });
        let cached = sealer.derived.read().unwrap();
        assert_eq!(cached["env"].len(), 5);
    }
}
