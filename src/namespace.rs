//! A project's namespace: the prefix that confines its keys upstream.
//!
//! Every key a client names is stored as `project:` + the first 16 hex
//! digits of SHA-256(project) + `:` + the key (a contract: outside tools
//! find keys by it). Patterns are confined so they can only match inside the
//! prefix, and keys in replies are unprefixed before the client sees them.

use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

/// Characters that have a meaning in Redis glob patterns.
const GLOB_SPECIAL: &[u8] = b"*?[]\\";

/// The prefix of one project, or none when isolation is switched off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    prefix: Bytes,
}

impl Namespace {
    /// The namespace of `project`.
    pub fn for_project(project: &str) -> Namespace {
        let digest = Sha256::digest(project.as_bytes());
        let mut prefix = String::with_capacity(8 + 16 + 1);
        prefix.push_str("project:");
        for byte in &digest[..8] {
            prefix.push_str(&format!("{byte:02x}"));
        }
        prefix.push(':');
        Namespace {
            prefix: Bytes::from(prefix),
        }
    }

    /// No prefix at all: every project shares the upstream keyspace. Only
    /// for `project_isolation = false`, which the security level reports.
    pub fn shared() -> Namespace {
        Namespace {
            prefix: Bytes::new(),
        }
    }

    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The upstream name of a client's key.
    pub fn key(&self, key: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(self.prefix.len() + key.len());
        out.put_slice(&self.prefix);
        out.put_slice(key);
        out.freeze()
    }

    /// Confines a glob pattern to the namespace. Redis patterns are anchored
    /// at the start, so a literal prefix in front of any client pattern can
    /// only match names that begin with that prefix. Glob characters in the
    /// prefix itself are escaped, although the hex prefix has none.
    pub fn pattern(&self, pattern: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(self.prefix.len() * 2 + pattern.len());
        for &b in self.prefix.iter() {
            if GLOB_SPECIAL.contains(&b) {
                out.put_u8(b'\\');
            }
            out.put_u8(b);
        }
        out.put_slice(pattern);
        out.freeze()
    }

    /// The client's name for an upstream key, or `None` if the key is not in
    /// this namespace (such a key is dropped from replies, never shown).
    pub fn strip(&self, upstream_key: &Bytes) -> Option<Bytes> {
        upstream_key
            .starts_with(&self.prefix)
            .then(|| upstream_key.slice(self.prefix.len()..))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_the_contract_form() {
        let ns = Namespace::for_project("billing");
        let expected = format!("project:{}:", &hex(&Sha256::digest(b"billing"))[..16]);
        assert_eq!(ns.prefix(), expected.as_bytes());
        assert_eq!(
            ns.key(b"invoice:42"),
            Bytes::from(format!("{expected}invoice:42"))
        );
    }

    #[test]
    fn known_prefix_for_a_fixed_project_name() {
        // `printf billing | sha256sum` begins with 0c95c7ece1ce1a97.
        let ns = Namespace::for_project("billing");
        assert_eq!(ns.prefix(), b"project:0c95c7ece1ce1a97:");
    }

    #[test]
    fn strip_inverts_key_and_rejects_foreign_keys() {
        let ns = Namespace::for_project("a");
        let other = Namespace::for_project("b");
        let up = ns.key(b"k");
        assert_eq!(ns.strip(&up), Some(Bytes::from_static(b"k")));
        assert_eq!(other.strip(&up), None);
    }

    #[test]
    fn patterns_cannot_escape_the_prefix() {
        let ns = Namespace::for_project("a");
        let p = ns.pattern(b"*");
        assert!(p.starts_with(ns.prefix()));
        assert_eq!(&p[ns.prefix().len()..], b"*");
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
