//! Client authentication: the configured users, their PBKDF2 password hashes,
//! and the check that turns `AUTH user pass` into an [`Identity`].
//!
//! The session calls [`Authenticator::verify`] for every `AUTH` and
//! `HELLO … AUTH`. Lockout and audit are deliberately not decided here: the
//! session asks the lockout table before calling `verify` and reports the
//! outcome to lockout and audit afterwards, so this module never sees peers.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hint::black_box;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::Semaphore;

use crate::config::{Permission, UserSettings};

/// PBKDF2 rounds for new hashes: the floor set by SPEC §3.
pub const DEFAULT_ITERATIONS: u32 = 600_000;

/// Longest password [`Authenticator::verify`] accepts. A longer one fails,
/// after paying the same hash cost as any other attempt, and
/// [`hash_password_line`] refuses to hash one, since it could never log in.
pub const MAX_PASSWORD_LEN: usize = 4096;

/// Longest user name a configuration may define. Client-sent names longer
/// than this are treated as unknown without being hashed into a map lookup.
pub const MAX_USERNAME_LEN: usize = 256;

/// Iteration counts a hash string may carry. One keeps the published test
/// vectors expressible; ten million bounds one `AUTH` to seconds of CPU.
const ITERATION_RANGE: std::ops::RangeInclusive<u32> = 1..=10_000_000;
const SALT_RANGE: std::ops::RangeInclusive<usize> = 8..=64;
const SALT_LEN: usize = 16;
const KEY_LEN: usize = 32;
const SCHEME: &str = "pbkdf2-sha256";

/// How many successful verifications are remembered. When the cache is full
/// it is cleared, not evicted entry by entry: no per-entry bookkeeping, and
/// the worst case is that every reconnecting client pays the hash once more
/// (under the concurrency bound). More than this many distinct credentials
/// in active use makes the cache clear often and lose most of its benefit.
const CACHE_CAPACITY: usize = 10_000;

/// A salted PBKDF2-HMAC-SHA256 password hash, with its parameters.
///
/// Its string form (see [`fmt::Display`] and [`PasswordHash::parse`]) is
/// `$pbkdf2-sha256$i=<iterations>$<salt>$<key>`, salt and key in standard
/// base64 without padding. `Debug` shows neither salt nor derived key.
#[derive(Clone)]
pub struct PasswordHash {
    iterations: u32,
    salt: Vec<u8>,
    key: [u8; KEY_LEN],
}

/// Why a configured `password_hash` string was refused. The fault is the
/// operator's; messages never repeat the string, which is a secret verifier.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HashFormatError {
    /// Not five `$`-separated fields with an empty first one.
    #[error("password hash is not of the form $pbkdf2-sha256$i=<iterations>$<salt>$<key>")]
    Malformed,
    /// A scheme other than `pbkdf2-sha256`.
    #[error("password hash scheme is not pbkdf2-sha256")]
    UnsupportedScheme,
    /// The `i=` field is missing, not plain decimal, or out of range.
    #[error("password hash iteration count is not a plain decimal from 1 to 10000000")]
    Iterations,
    /// The salt is not standard base64 without padding.
    #[error("password hash salt is not standard base64 without padding")]
    SaltEncoding,
    /// The salt decodes to fewer than 8 or more than 64 bytes.
    #[error("password hash salt is not 8 to 64 bytes long")]
    SaltLength,
    /// The derived key is not standard base64 without padding.
    #[error("password hash key is not standard base64 without padding")]
    KeyEncoding,
    /// The derived key does not decode to exactly 32 bytes.
    #[error("password hash key is not 32 bytes long")]
    KeyLength,
}

impl PasswordHash {
    /// Hashes `password` under a fresh random 16-byte salt, on the calling
    /// thread. `iterations` is clamped into 1..=10 000 000, the range
    /// [`PasswordHash::parse`] accepts, so every created hash parses back.
    pub fn create(password: &[u8], iterations: u32) -> PasswordHash {
        let iterations = iterations.clamp(*ITERATION_RANGE.start(), *ITERATION_RANGE.end());
        let salt = random_bytes::<SALT_LEN>()
            .expect("the operating system's random source works once the process runs")
            .to_vec();
        let key = derive(password, &salt, iterations);
        PasswordHash {
            iterations,
            salt,
            key,
        }
    }

    /// Parses the string form strictly: exactly five fields, canonical
    /// unpadded base64, no surrounding whitespace, no leading zeros or signs
    /// in the iteration count, iterations 1..=10 000 000, salt 8 to 64 bytes,
    /// key 32 bytes.
    pub fn parse(s: &str) -> Result<PasswordHash, HashFormatError> {
        let fields: Vec<&str> = s.split('$').collect();
        let ["", scheme, iterations, salt, key] = fields[..] else {
            return Err(HashFormatError::Malformed);
        };
        if scheme != SCHEME {
            return Err(HashFormatError::UnsupportedScheme);
        }

        let iterations = parse_iterations(iterations).ok_or(HashFormatError::Iterations)?;

        let salt = STANDARD_NO_PAD
            .decode(salt)
            .map_err(|_| HashFormatError::SaltEncoding)?;
        if !SALT_RANGE.contains(&salt.len()) {
            return Err(HashFormatError::SaltLength);
        }

        let key = STANDARD_NO_PAD
            .decode(key)
            .map_err(|_| HashFormatError::KeyEncoding)?;
        let key = <[u8; KEY_LEN]>::try_from(key).map_err(|_| HashFormatError::KeyLength)?;

        Ok(PasswordHash {
            iterations,
            salt,
            key,
        })
    }

    /// Whether `password` derives this hash's key. Pays the full PBKDF2 cost
    /// on the calling thread; the keys are compared in constant time.
    pub fn verify(&self, password: &[u8]) -> bool {
        let candidate = derive(password, &self.salt, self.iterations);
        keys_equal(&candidate, &self.key)
    }

    /// The PBKDF2 iteration count stored in the hash.
    pub fn iterations(&self) -> u32 {
        self.iterations
    }
}

impl fmt::Display for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "${SCHEME}$i={}${}${}",
            self.iterations,
            STANDARD_NO_PAD.encode(&self.salt),
            STANDARD_NO_PAD.encode(self.key)
        )
    }
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordHash")
            .field("iterations", &self.iterations)
            .field("salt_len", &self.salt.len())
            .finish_non_exhaustive()
    }
}

/// Accepts only what `Display` writes for a count in range: ASCII digits,
/// no sign, no leading zero.
fn parse_iterations(field: &str) -> Option<u32> {
    let digits = field.strip_prefix("i=")?;
    let canonical = !digits.is_empty()
        && !digits.starts_with('0')
        && digits.len() <= 8
        && digits.bytes().all(|b| b.is_ascii_digit());
    if !canonical {
        return None;
    }
    let iterations = digits.parse().ok()?;
    ITERATION_RANGE.contains(&iterations).then_some(iterations)
}

/// PBKDF2-HMAC-SHA256 with a 32-byte output (RFC 8018 §5.2).
fn derive(password: &[u8], salt: &[u8], iterations: u32) -> [u8; KEY_LEN] {
    let mut key = [0; KEY_LEN];
    pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, &mut key);
    key
}

/// Compares two keys without a data-dependent branch or early exit: every
/// byte is folded in, and `black_box` keeps the optimiser from turning the
/// fold back into a short-circuiting comparison. ring's own comparison is
/// deprecated for outside use, hence this small one.
fn keys_equal(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> bool {
    let difference = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| black_box(acc | (x ^ y)));
    black_box(difference) == 0
}

fn random_bytes<const N: usize>() -> Result<[u8; N], ring::error::Unspecified> {
    let mut bytes = [0; N];
    SystemRandom::new().fill(&mut bytes)?;
    Ok(bytes)
}

/// Hashes one line read by `redcloak hash-password`: a single trailing
/// `"\n"` or `"\r\n"` is removed, everything else (spaces included) is part
/// of the password. Refuses an empty password, one longer than
/// [`MAX_PASSWORD_LEN`], and an iteration count outside 1..=10 000 000.
pub fn hash_password_line(input: &str, iterations: u32) -> Result<String, AuthError> {
    let password = match input.strip_suffix('\n') {
        Some(rest) => rest.strip_suffix('\r').unwrap_or(rest),
        None => input,
    };
    if password.is_empty() {
        return Err(AuthError::EmptyPassword);
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(AuthError::PasswordTooLong);
    }
    if !ITERATION_RANGE.contains(&iterations) {
        return Err(AuthError::Iterations);
    }
    Ok(PasswordHash::create(password.as_bytes(), iterations).to_string())
}

/// Errors building the user set or hashing a password. All are the
/// operator's fault; none carries a password or a hash string.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// A configured `password_hash` does not parse.
    #[error("user {user:?} has an invalid password_hash")]
    InvalidHash {
        user: String,
        #[source]
        source: HashFormatError,
    },
    /// Two users share a name.
    #[error("user {user:?} is defined more than once")]
    DuplicateUser { user: String },
    /// A user name is empty or longer than [`MAX_USERNAME_LEN`]; `position`
    /// counts `[[users]]` entries from 1.
    #[error("user number {position} has an empty name or one longer than 256 bytes")]
    InvalidUserName { position: usize },
    /// `hash-password` was given an empty line.
    #[error("password is empty")]
    EmptyPassword,
    /// `hash-password` was given more than [`MAX_PASSWORD_LEN`] bytes.
    #[error("password is longer than 4096 bytes")]
    PasswordTooLong,
    /// `hash-password` was asked for an iteration count out of range.
    #[error("iteration count must be from 1 to 10000000")]
    Iterations,
    /// The operating system's random source failed.
    #[error("the operating system's random number generator failed")]
    Random,
}

/// Who a session is, once authenticated.
#[derive(Clone, Debug)]
pub struct Identity {
    pub user: Arc<str>,
    pub project: Arc<str>,
    pub permission: Permission,
}

/// The number of concurrent password verifications callers should pass to
/// [`Authenticator::new`]: half the available cores, at least one, so an
/// `AUTH` flood leaves the other half to sessions already authenticated.
pub fn default_verification_concurrency() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    (cores / 2).max(1)
}

/// Users by name, built from config; swapped whole on SIGHUP reload.
pub struct Authenticator {
    /// The current user set. The lock is held only to clone or replace the
    /// `Arc`, never across a hash or an await, so a reload never waits for
    /// verifications and each verification finishes against the set it began
    /// with.
    users: RwLock<Arc<UserSet>>,
    /// Bounds PBKDF2 jobs running at once. Permits move into the blocking
    /// task, so a client that disconnects mid-`AUTH` does not free its permit
    /// while its hash is still burning CPU.
    hashing: Arc<Semaphore>,
    /// Random per-process key for the reconnect cache tags; it never leaves
    /// memory, so a tag reveals nothing about the credentials it covers.
    cache_key: hmac::Key,
    #[cfg(test)]
    probe: Arc<Probe>,
}

/// One generation of users; a reload builds a new one, and the reconnect
/// cache lives and dies with it.
struct UserSet {
    by_name: HashMap<Vec<u8>, User>,
    /// Users a verified client certificate logs in, by certificate name.
    by_certificate: HashMap<String, Identity>,
    /// Checked when the name is unknown, so that an unknown user costs as
    /// much as a wrong password. It has a random key no password derives,
    /// and the highest configured iteration count. Users configured with
    /// fewer iterations remain distinguishable by timing from unknown names;
    /// giving every user the same count closes that gap.
    decoy: Arc<PasswordHash>,
    /// HMAC tags of recently verified (name, password, hash string) triples.
    /// Looking a tag up in a hash set is not constant-time, and need not be:
    /// tags are MACs under a key only this process holds, so an attacker
    /// cannot choose a guess whose tag lands near a stored one, and only a
    /// fully correct pair is ever stored.
    remembered: Mutex<HashSet<[u8; 32]>>,
}

struct User {
    identity: Identity,
    hash: Arc<PasswordHash>,
    /// The configured hash string, bound into cache tags so that a changed
    /// password can never match a tag made for the old one.
    hash_text: String,
}

impl UserSet {
    fn build(users: &[UserSettings]) -> Result<UserSet, AuthError> {
        let mut by_name = HashMap::with_capacity(users.len());
        let mut by_certificate = HashMap::new();
        let mut max_iterations = None;

        for (index, settings) in users.iter().enumerate() {
            let name = settings.name.as_str();
            if name.is_empty() || name.len() > MAX_USERNAME_LEN {
                return Err(AuthError::InvalidUserName {
                    position: index + 1,
                });
            }
            let hash = PasswordHash::parse(&settings.password_hash).map_err(|source| {
                AuthError::InvalidHash {
                    user: name.to_owned(),
                    source,
                }
            })?;
            max_iterations = max_iterations.max(Some(hash.iterations()));

            let Entry::Vacant(slot) = by_name.entry(name.as_bytes().to_vec()) else {
                return Err(AuthError::DuplicateUser {
                    user: name.to_owned(),
                });
            };
            let identity = Identity {
                user: Arc::from(name),
                project: Arc::from(settings.project.as_str()),
                permission: settings.access,
            };
            if let Some(cert) = &settings.client_cert {
                by_certificate.insert(cert.clone(), identity.clone());
            }
            slot.insert(User {
                identity,
                hash: Arc::new(hash),
                hash_text: settings.password_hash.clone(),
            });
        }

        let decoy = PasswordHash {
            iterations: max_iterations.unwrap_or(DEFAULT_ITERATIONS),
            salt: random_bytes::<SALT_LEN>()
                .map_err(|_| AuthError::Random)?
                .to_vec(),
            key: random_bytes::<KEY_LEN>().map_err(|_| AuthError::Random)?,
        };
        Ok(UserSet {
            by_name,
            by_certificate,
            decoy: Arc::new(decoy),
            remembered: Mutex::new(HashSet::new()),
        })
    }

    fn find(&self, name: &[u8]) -> Option<&User> {
        if name.len() > MAX_USERNAME_LEN {
            return None;
        }
        self.by_name.get(name)
    }

    fn remembers(&self, tag: &[u8; 32]) -> bool {
        let remembered = self
            .remembered
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        remembered.contains(tag)
    }

    fn remember(&self, tag: [u8; 32]) {
        let mut remembered = self
            .remembered
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if remembered.len() >= CACHE_CAPACITY {
            remembered.clear();
        }
        remembered.insert(tag);
    }
}

impl Authenticator {
    /// Builds the user set. Errors (naming the user, never the hash) when a
    /// hash does not parse, a name repeats, or a name is empty or too long.
    /// `max_concurrent_verifications` below one is raised to one; see
    /// [`default_verification_concurrency`] for the value to pass.
    pub fn new(
        users: &[UserSettings],
        max_concurrent_verifications: usize,
    ) -> Result<Authenticator, AuthError> {
        let users = UserSet::build(users)?;
        let cache_key = hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())
            .map_err(|_| AuthError::Random)?;
        let permits = max_concurrent_verifications.clamp(1, Semaphore::MAX_PERMITS);

        Ok(Authenticator {
            users: RwLock::new(Arc::new(users)),
            hashing: Arc::new(Semaphore::new(permits)),
            cache_key,
            #[cfg(test)]
            probe: Arc::default(),
        })
    }

    /// Replaces the user set atomically and with it the reconnect cache.
    /// Verifications already running finish against the old set. On error
    /// the old set stays in force.
    pub fn reload(&self, users: &[UserSettings]) -> Result<(), AuthError> {
        let fresh = Arc::new(UserSet::build(users)?);
        *self.users.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// The user a verified client certificate logs in, if one of its names
    /// (subject common name first, then alternative names) is bound to a
    /// user with `client_cert`. The caller must pass only names of a
    /// certificate the TLS layer verified against the configured client CA.
    pub fn identity_for_certificate(&self, names: &[String]) -> Option<Identity> {
        let users = self.users.read().unwrap_or_else(PoisonError::into_inner);
        names
            .iter()
            .find_map(|name| users.by_certificate.get(name))
            .cloned()
    }

    /// The identity configured for `name`, without checking any password,
    /// so that a failed login can be logged against a real user; `None` for
    /// names no user has, which may be a password sent in the wrong place
    /// and so are never logged.
    pub fn configured(&self, name: &[u8]) -> Option<Identity> {
        let users = self.users.read().unwrap_or_else(PoisonError::into_inner);
        users.find(name).map(|user| user.identity.clone())
    }

    /// Verifies a name/password pair, both arbitrary client bytes. Returns
    /// `None` on any failure, and unknown names, wrong passwords and
    /// passwords over [`MAX_PASSWORD_LEN`] all pay one PBKDF2 run. Only a
    /// pair that verified before, against the same hash, skips the hash.
    ///
    /// The hash runs on tokio's blocking pool, at most
    /// `max_concurrent_verifications` at once; further callers wait
    /// asynchronously for a permit. Nothing about the pair is logged.
    pub async fn verify(&self, username: &[u8], password: &[u8]) -> Option<Identity> {
        let users = Arc::clone(&self.users.read().unwrap_or_else(PoisonError::into_inner));
        let user = users.find(username);
        let within_limit = password.len() <= MAX_PASSWORD_LEN;

        let tag = match user {
            Some(user) if within_limit => Some(self.tag(username, password, &user.hash_text)),
            _ => None,
        };
        if let (Some(user), Some(tag)) = (user, &tag)
            && users.remembers(tag)
        {
            return Some(user.identity.clone());
        }

        // The copy is capped at the limit, so a huge password costs no more
        // than a long one. It is not wiped when dropped (the crate has no
        // zeroize dependency), like the session's frame buffer that held it
        // first.
        let hash = user.map_or_else(|| Arc::clone(&users.decoy), |user| Arc::clone(&user.hash));
        let candidate = password[..password.len().min(MAX_PASSWORD_LEN)].to_vec();
        let permit = Arc::clone(&self.hashing).acquire_owned().await.ok()?;
        #[cfg(test)]
        let probe = Arc::clone(&self.probe);
        let hashed = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            #[cfg(test)]
            let _running = probe.enter();
            hash.verify(&candidate)
        })
        .await;

        let Ok(matched) = hashed else {
            tracing::warn!("password verification task did not complete");
            return None;
        };
        // Unknown names and over-long passwords have no tag, so they fail
        // here whatever the hash said.
        match (user, tag) {
            (Some(user), Some(tag)) if matched => {
                users.remember(tag);
                Some(user.identity.clone())
            }
            _ => None,
        }
    }

    /// HMAC-SHA256 over the length-prefixed name, password and hash string;
    /// the prefixes keep distinct triples from sharing one encoding.
    fn tag(&self, username: &[u8], password: &[u8], hash_text: &str) -> [u8; 32] {
        let mut context = hmac::Context::with_key(&self.cache_key);
        for field in [username, password, hash_text.as_bytes()] {
            context.update(&(field.len() as u64).to_be_bytes());
            context.update(field);
        }
        context
            .sign()
            .as_ref()
            .try_into()
            .expect("an HMAC-SHA256 tag is 32 bytes")
    }
}

/// Counts the PBKDF2 jobs an [`Authenticator`] runs and how many overlap, so
/// tests can prove the cache and the concurrency bound without timing.
#[cfg(test)]
#[derive(Default)]
struct Probe {
    derivations: std::sync::atomic::AtomicUsize,
    running: std::sync::atomic::AtomicUsize,
    max_running: std::sync::atomic::AtomicUsize,
}

#[cfg(test)]
impl Probe {
    fn enter(&self) -> ProbeGuard<'_> {
        use std::sync::atomic::Ordering::SeqCst;
        self.derivations.fetch_add(1, SeqCst);
        let now = self.running.fetch_add(1, SeqCst) + 1;
        self.max_running.fetch_max(now, SeqCst);
        ProbeGuard(self)
    }
}

#[cfg(test)]
struct ProbeGuard<'a>(&'a Probe);

#[cfg(test)]
impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0
            .running
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::SeqCst;

    use super::*;

    /// Low enough that a debug build verifies in milliseconds.
    const TEST_ITERATIONS: u32 = 1000;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn user(name: &str, password: &[u8], access: Permission) -> UserSettings {
        UserSettings {
            name: name.to_owned(),
            password_hash: PasswordHash::create(password, TEST_ITERATIONS).to_string(),
            project: format!("{name}-project"),
            access,
            client_cert: None,
        }
    }

    fn derivations(auth: &Authenticator) -> usize {
        auth.probe.derivations.load(SeqCst)
    }

    #[test]
    fn derive_matches_the_published_one_iteration_vector() {
        let key = derive(b"password", b"salt", 1);
        assert_eq!(
            hex(&key),
            "120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b"
        );
    }

    #[test]
    fn pbkdf2_matches_the_rfc_7914_vector_with_64_byte_output() {
        let mut out = [0; 64];
        pbkdf2::pbkdf2_hmac::<sha2::Sha256>(b"passwd", b"salt", 1, &mut out);
        assert_eq!(
            hex(&out),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc\
             49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783"
        );
    }

    #[test]
    fn created_hash_survives_display_and_parse() {
        let created = PasswordHash::create(b"correct horse", TEST_ITERATIONS);
        let text = created.to_string();
        let parsed = PasswordHash::parse(&text).expect("a created hash parses");

        assert!(text.starts_with("$pbkdf2-sha256$i=1000$"));
        assert_eq!(parsed.to_string(), text);
        assert_eq!(parsed.iterations(), TEST_ITERATIONS);
        assert_eq!(parsed.salt.len(), SALT_LEN);
        assert!(parsed.verify(b"correct horse"));
    }

    #[test]
    fn hash_verifies_the_right_password_and_rejects_others() {
        let hash = PasswordHash::create(b"s3cret", TEST_ITERATIONS);
        assert!(hash.verify(b"s3cret"));
        assert!(!hash.verify(b"s3cret "));
        assert!(!hash.verify(b""));

        let binary = PasswordHash::create(&[0xff, 0x00, 0xfe], TEST_ITERATIONS);
        assert!(binary.verify(&[0xff, 0x00, 0xfe]));
        assert!(!binary.verify(&[0xff, 0x00]));
    }

    #[test]
    fn create_clamps_iterations_into_the_parseable_range() {
        let hash = PasswordHash::create(b"pw", 0);
        assert_eq!(hash.iterations(), 1);
        assert!(PasswordHash::parse(&hash.to_string()).is_ok());
    }

    #[test]
    fn debug_output_shows_neither_salt_nor_key() {
        let hash = PasswordHash::create(b"pw", TEST_ITERATIONS);
        let debug = format!("{hash:?}");
        let text = hash.to_string();
        let mut fields = text.rsplit('$');
        let (key, salt) = (fields.next().unwrap(), fields.next().unwrap());

        assert!(debug.contains("iterations: 1000"));
        assert!(!debug.contains(key));
        assert!(!debug.contains(salt));
    }

    #[test]
    fn parse_accepts_boundary_parameters() {
        let salt8 = STANDARD_NO_PAD.encode([1u8; 8]);
        let salt64 = STANDARD_NO_PAD.encode([2u8; 64]);
        let key = STANDARD_NO_PAD.encode([3u8; 32]);
        for text in [
            format!("$pbkdf2-sha256$i=1${salt8}${key}"),
            format!("$pbkdf2-sha256$i=10000000${salt64}${key}"),
        ] {
            let parsed = PasswordHash::parse(&text).expect("boundary values parse");
            assert_eq!(parsed.to_string(), text);
        }
    }

    #[test]
    fn parse_rejects_malformed_strings_without_echoing_them() {
        let salt = STANDARD_NO_PAD.encode(b"saltsalt");
        let key = STANDARD_NO_PAD.encode([7u8; 32]);
        let cases = [
            (String::new(), "Malformed"),
            ("$".to_owned(), "Malformed"),
            (format!("pbkdf2-sha256$i=1000${salt}${key}"), "Malformed"),
            (format!("$pbkdf2-sha256$i=1000${salt}${key}$"), "Malformed"),
            (format!("$pbkdf2-sha256$i=1000${salt}"), "Malformed"),
            (
                format!("$pbkdf2-sha1$i=1000${salt}${key}"),
                "UnsupportedScheme",
            ),
            (format!("$pbkdf2-sha256$i=0${salt}${key}"), "Iterations"),
            (
                format!("$pbkdf2-sha256$i=10000001${salt}${key}"),
                "Iterations",
            ),
            (
                format!("$pbkdf2-sha256$i=99999999999${salt}${key}"),
                "Iterations",
            ),
            (format!("$pbkdf2-sha256$i=+1000${salt}${key}"), "Iterations"),
            (format!("$pbkdf2-sha256$i=01000${salt}${key}"), "Iterations"),
            (format!("$pbkdf2-sha256$i=${salt}${key}"), "Iterations"),
            (format!("$pbkdf2-sha256$n=1000${salt}${key}"), "Iterations"),
            (
                format!("$pbkdf2-sha256$i=1000$!!notb64!!${key}"),
                "SaltEncoding",
            ),
            (
                format!("$pbkdf2-sha256$i=1000$c2FsdHNhbHQ=${key}"),
                "SaltEncoding",
            ),
            (format!("$pbkdf2-sha256$i=1000$c2FsdA${key}"), "SaltLength"),
            (
                format!(
                    "$pbkdf2-sha256$i=1000${}${key}",
                    STANDARD_NO_PAD.encode([0u8; 65])
                ),
                "SaltLength",
            ),
            (format!("$pbkdf2-sha256$i=1000${salt}$***"), "KeyEncoding"),
            (
                format!("$pbkdf2-sha256$i=1000${salt}${key}\n"),
                "KeyEncoding",
            ),
            (
                format!(
                    "$pbkdf2-sha256$i=1000${salt}${}",
                    STANDARD_NO_PAD.encode([0u8; 31])
                ),
                "KeyLength",
            ),
            (
                format!(
                    "$pbkdf2-sha256$i=1000${salt}${}",
                    STANDARD_NO_PAD.encode([0u8; 33])
                ),
                "KeyLength",
            ),
        ];

        for (text, expected) in cases {
            let error = PasswordHash::parse(&text).expect_err(&text);
            assert_eq!(format!("{error:?}"), expected, "for {text:?}");
            let message = error.to_string();
            assert!(!message.contains(&key) && !message.contains(&salt));
        }
    }

    #[test]
    fn hash_password_line_strips_one_line_ending_and_refuses_bad_input() {
        for (line, password) in [
            ("pw\n", "pw"),
            ("pw\r\n", "pw"),
            ("pw", "pw"),
            ("pw\n\n", "pw\n"),
            (" pw \r", " pw \r"),
        ] {
            let text = hash_password_line(line, TEST_ITERATIONS).expect("a password hashes");
            let hash = PasswordHash::parse(&text).expect("the output parses");
            assert!(hash.verify(password.as_bytes()), "for {line:?}");
        }

        let too_long = "x".repeat(MAX_PASSWORD_LEN + 1);
        assert!(matches!(
            hash_password_line("\n", 1000),
            Err(AuthError::EmptyPassword)
        ));
        assert!(matches!(
            hash_password_line("\r\n", 1000),
            Err(AuthError::EmptyPassword)
        ));
        assert!(matches!(
            hash_password_line("", 1000),
            Err(AuthError::EmptyPassword)
        ));
        assert!(matches!(
            hash_password_line(&too_long, 1000),
            Err(AuthError::PasswordTooLong)
        ));
        assert!(matches!(
            hash_password_line("pw", 0),
            Err(AuthError::Iterations)
        ));
    }

    #[test]
    fn new_refuses_bad_users_naming_the_user_but_not_the_hash() {
        let mut broken = user("alice", b"pw", Permission::Read);
        broken.password_hash.push('!');
        let hash_text = broken.password_hash.clone();
        let error = Authenticator::new(&[broken], 1).err().expect("bad hash");
        let message = error.to_string();
        assert!(message.contains("\"alice\""));
        assert!(!message.contains(&hash_text));
        assert!(matches!(error, AuthError::InvalidHash { .. }));

        let twice = [
            user("bob", b"a", Permission::Read),
            user("bob", b"b", Permission::Admin),
        ];
        let error = Authenticator::new(&twice, 1).err().expect("duplicate");
        assert!(matches!(error, AuthError::DuplicateUser { ref user } if user == "bob"));

        let nameless = [
            user("ok", b"a", Permission::Read),
            user("", b"b", Permission::Read),
        ];
        let error = Authenticator::new(&nameless, 1).err().expect("empty name");
        assert!(matches!(error, AuthError::InvalidUserName { position: 2 }));
    }

    #[tokio::test]
    async fn verify_accepts_the_right_pair_with_its_identity() {
        let auth = Authenticator::new(&[user("alice", b"pw", Permission::ReadWrite)], 1)
            .expect("valid users");

        let identity = auth.verify(b"alice", b"pw").await.expect("right pair");
        assert_eq!(&*identity.user, "alice");
        assert_eq!(&*identity.project, "alice-project");
        assert_eq!(identity.permission, Permission::ReadWrite);
    }

    #[tokio::test]
    async fn verify_rejects_wrong_password_unknown_user_and_odd_bytes_after_hashing() {
        let auth =
            Authenticator::new(&[user("alice", b"pw", Permission::Read)], 2).expect("valid users");

        let attempts: [(&[u8], &[u8]); 6] = [
            (b"alice", b"wrong"),
            (b"mallory", b"pw"),
            (b"\xff\xfe", b"pw"),
            (b"alice", b"\xc3\x28"),
            (b"", b""),
            (b"alice", b""),
        ];
        for (name, password) in attempts {
            assert!(auth.verify(name, password).await.is_none());
        }
        assert_eq!(derivations(&auth), attempts.len());

        let huge_name = vec![b'a'; 1 << 20];
        assert!(auth.verify(&huge_name, b"pw").await.is_none());
        assert_eq!(derivations(&auth), attempts.len() + 1);
    }

    #[tokio::test]
    async fn over_long_password_fails_after_paying_the_hash_cost() {
        let long = vec![b'p'; MAX_PASSWORD_LEN + 1];
        let auth =
            Authenticator::new(&[user("alice", &long, Permission::Read)], 1).expect("valid users");

        assert!(auth.verify(b"alice", &long).await.is_none());
        assert!(auth.verify(b"alice", &vec![b'p'; 1 << 20]).await.is_none());
        assert_eq!(derivations(&auth), 2);
    }

    #[test]
    fn unknown_users_are_checked_against_the_highest_iteration_count() {
        let mut slow = user("slow", b"pw", Permission::Read);
        slow.password_hash = PasswordHash::create(b"pw", 1500).to_string();
        let auth = Authenticator::new(&[user("fast", b"pw", Permission::Read), slow], 1)
            .expect("valid users");
        assert_eq!(auth.users.read().unwrap().decoy.iterations(), 1500);

        let empty = Authenticator::new(&[], 1).expect("no users is valid");
        assert_eq!(
            empty.users.read().unwrap().decoy.iterations(),
            DEFAULT_ITERATIONS
        );
    }

    #[tokio::test]
    async fn second_successful_verification_skips_pbkdf2() {
        let auth =
            Authenticator::new(&[user("alice", b"pw", Permission::Read)], 1).expect("valid users");

        assert!(auth.verify(b"alice", b"pw").await.is_some());
        assert_eq!(derivations(&auth), 1);
        assert!(auth.verify(b"alice", b"pw").await.is_some());
        assert!(auth.verify(b"alice", b"pw").await.is_some());
        assert_eq!(derivations(&auth), 1);
    }

    #[tokio::test]
    async fn wrong_password_always_pays_the_hash_even_after_a_success() {
        let auth =
            Authenticator::new(&[user("alice", b"pw", Permission::Read)], 1).expect("valid users");

        assert!(auth.verify(b"alice", b"pw").await.is_some());
        assert!(auth.verify(b"alice", b"pw2").await.is_none());
        assert!(auth.verify(b"alice", b"pw2").await.is_none());
        assert_eq!(derivations(&auth), 3);
    }

    #[tokio::test]
    async fn reload_replaces_users_and_forgets_remembered_pairs() {
        let alice = user("alice", b"pw", Permission::Read);
        let auth = Authenticator::new(std::slice::from_ref(&alice), 1).expect("valid users");
        assert!(auth.verify(b"alice", b"pw").await.is_some());

        // Same hash string: still valid, but the cache went with the old set.
        auth.reload(std::slice::from_ref(&alice))
            .expect("valid users");
        assert!(auth.verify(b"alice", b"pw").await.is_some());
        assert_eq!(derivations(&auth), 2);

        auth.reload(&[user("bob", b"pw", Permission::Admin)])
            .expect("valid users");
        assert!(auth.verify(b"alice", b"pw").await.is_none());
        let bob = auth.verify(b"bob", b"pw").await.expect("bob after reload");
        assert!(bob.permission.is_admin());
    }

    #[tokio::test]
    async fn failed_reload_keeps_the_previous_users() {
        let auth =
            Authenticator::new(&[user("alice", b"pw", Permission::Read)], 1).expect("valid users");
        let twice = [
            user("bob", b"a", Permission::Read),
            user("bob", b"b", Permission::Read),
        ];

        assert!(auth.reload(&twice).is_err());
        assert!(auth.verify(b"alice", b"pw").await.is_some());
    }

    #[tokio::test]
    async fn cache_is_cleared_when_full_and_keeps_working() {
        let auth =
            Authenticator::new(&[user("alice", b"pw", Permission::Read)], 1).expect("valid users");
        {
            let users = auth.users.read().unwrap();
            for filler in 0..CACHE_CAPACITY {
                users.remember(auth.tag(b"x", &filler.to_be_bytes(), "h"));
            }
        }

        assert!(auth.verify(b"alice", b"pw").await.is_some());
        let users = Arc::clone(&auth.users.read().unwrap());
        assert_eq!(users.remembered.lock().unwrap().len(), 1);
        assert!(auth.verify(b"alice", b"pw").await.is_some());
        assert_eq!(derivations(&auth), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verifications_never_exceed_the_concurrency_limit() {
        let mut settings = user("alice", b"pw", Permission::Read);
        settings.password_hash = PasswordHash::create(b"pw", 20_000).to_string();
        let auth = Arc::new(Authenticator::new(&[settings], 1).expect("valid users"));

        let attempts: Vec<_> = (0..4)
            .map(|_| {
                let auth = Arc::clone(&auth);
                tokio::spawn(async move { auth.verify(b"alice", b"wrong").await })
            })
            .collect();
        for attempt in attempts {
            assert!(attempt.await.expect("task completes").is_none());
        }

        assert_eq!(derivations(&auth), 4);
        assert_eq!(auth.probe.max_running.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn zero_concurrency_is_raised_to_one_instead_of_blocking_forever() {
        let auth =
            Authenticator::new(&[user("alice", b"pw", Permission::Read)], 0).expect("valid users");
        assert!(auth.verify(b"alice", b"pw").await.is_some());
    }

    #[test]
    fn default_verification_concurrency_is_at_least_one() {
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        let default = default_verification_concurrency();
        assert!(default >= 1);
        assert!(default <= cores.max(1));
    }
}
