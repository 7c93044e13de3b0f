//! Properties of the namespace for any input: a key, channel or pattern
//! rewritten for one project stays inside that project's prefix, and
//! unprefixing gives back exactly what the client named. Patterns are
//! checked against a real Redis, whose glob matcher is the one that counts.

mod common;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::sync::{Arc, LazyLock};

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use redcloak::command::{self, Channels, CommandSpec, Handling};
use redcloak::frame::{self, Limits, Scanner};
use redcloak::namespace::Namespace;
use redcloak::plan;
use redcloak::pubsub;

use common::*;

fn project() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("billing".to_owned()),
        Just("shipping".to_owned()),
        any::<String>(),
    ]
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        // Names that look like another namespace, or like glob syntax.
        "(project:[0-9a-f]{16}:)?[a-z*?\\[\\]\\\\:^-]{0,12}".prop_map(String::into_bytes),
    ]
}

proptest! {
    #[test]
    fn a_key_stays_in_its_namespace_and_unprefixes_back(
        project in project(),
        other in project(),
        key in name(),
        foreign in name(),
    ) {
        let ns = Namespace::for_project(&project);
        let prefix = String::from_utf8(ns.prefix().to_vec()).expect("the prefix is ASCII");
        prop_assert_eq!(prefix.len(), "project:".len() + 16 + 1);
        prop_assert!(prefix.starts_with("project:") && prefix.ends_with(':'));
        prop_assert!(prefix[8..24].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));

        let upstream = ns.key(&key);
        prop_assert!(upstream.starts_with(ns.prefix()));
        prop_assert_eq!(ns.strip(&upstream), Some(Bytes::from(key.clone())));

        // Whatever a client of another project names, it lands elsewhere.
        if other != project {
            let theirs = Namespace::for_project(&other);
            prop_assert_ne!(theirs.key(&foreign), upstream.clone());
            prop_assert_eq!(theirs.strip(&upstream), None);
        }
    }

    #[test]
    fn a_channel_stays_in_its_namespace_and_comes_back_unprefixed_in_messages(
        project in project(),
        other in project(),
        channel in name(),
        keyspace in any::<bool>(),
        shard in any::<bool>(),
    ) {
        let ns = Namespace::for_project(&project);
        let named = if keyspace {
            [&b"__keyspace@0__:"[..], &channel].concat()
        } else {
            channel.clone()
        };
        prop_assume!(pubsub::may_publish(&named) || keyspace);
        let kind = if shard { Channels::Shard } else { Channels::Global };
        let upstream = pubsub::upstream_channel(&ns, kind, &named);
        let (head, rest) = upstream.split_at(if keyspace { 15 } else { 0 });
        prop_assert_eq!(head, &named[..head.len()]);
        prop_assert!(rest.starts_with(ns.prefix()), "the channel left the namespace");

        // A message on it reaches the client under the name it subscribed
        // to; in another project's session it is not delivered.
        let message = |channel: &[u8]| {
            [
                b"*3\r\n$7\r\nmessage\r\n".to_vec(),
                format!("${}\r\n", channel.len()).into_bytes(),
                channel.to_vec(),
                b"\r\n$1\r\nx\r\n".to_vec(),
            ]
            .concat()
        };
        for resp3 in [false, true] {
            let mut out = BytesMut::new();
            let delivered = pubsub::transform(&ns, &Bytes::from(message(&upstream)), resp3, &mut out);
            prop_assert_eq!(delivered, Ok(true));
            prop_assert_eq!(&out[..], &message(&named)[..]);
            if other != project {
                let theirs = Namespace::for_project(&other);
                let mut out = BytesMut::new();
                let delivered =
                    pubsub::transform(&theirs, &Bytes::from(message(&upstream)), resp3, &mut out);
                prop_assert_eq!(delivered, Ok(false));
                prop_assert!(out.is_empty());
            }
        }
    }

    #[test]
    fn a_confined_pattern_begins_with_the_literal_prefix(
        project in project(),
        pattern in name(),
    ) {
        let ns = Namespace::for_project(&project);
        let confined = ns.pattern(&pattern);
        prop_assert!(confined.starts_with(ns.prefix()));
        prop_assert_eq!(&confined[ns.prefix().len()..], &pattern[..]);
    }

    #[test]
    fn every_key_of_a_rewritten_request_is_in_the_namespace(
        project in project(),
        pick in any::<prop::sample::Index>(),
        words in proptest::collection::vec(word(), 0..10),
    ) {
        let (spec, sub) = pick.get(&FORWARDED);
        let mut args = vec![Bytes::from_static(spec.name.as_bytes())];
        args.extend(sub.map(|s| Bytes::from_static(s.as_bytes())));
        args.extend(words.into_iter().map(Bytes::from));
        let Ok(spec) = command::lookup(&args) else {
            return Ok(());
        };
        if plan::ambiguous_keys(spec, &args).is_some() {
            return Ok(());
        }

        let ns = Arc::new(Namespace::for_project(&project));
        let mut out = BytesMut::new();
        plan::rewrite(spec, &args, &ns, None, &mut out, &mut Vec::new())
            .expect("without encryption every forwarded command rewrites");
        let limits = Limits::request(usize::MAX / 4, true);
        prop_assert_eq!(Scanner::for_requests().measure(&out, &limits), Ok(Some(out.len())));
        let upstream = frame::decode_request(&out.freeze()).expect("one request");
        prop_assert_eq!(upstream.len(), args.len());

        let mut keys = Vec::new();
        command::key_indexes(spec, &args, &mut keys);
        for (i, (before, after)) in args.iter().zip(&upstream).enumerate() {
            if keys.contains(&i) {
                prop_assert!(after.starts_with(ns.prefix()), "key {} of {}", i, spec.name);
                let stripped = ns.strip(after);
                prop_assert_eq!(stripped.as_ref(), Some(before));
            } else if before != after {
                prop_assert!(
                    *after == ns.pattern(before) || *after == ns.key(before),
                    "argument {} of {} changed", i, spec.name
                );
            }
        }
    }
}

/// Every forwarded command, and every forwarded subcommand with its
/// container.
static FORWARDED: LazyLock<Vec<(&'static CommandSpec, Option<&'static str>)>> =
    LazyLock::new(|| {
        let mut all = Vec::new();
        for spec in command::commands() {
            if spec.subcommands.is_empty() {
                all.push((spec, None));
            }
            for sub in spec.subcommands {
                all.push((spec, Some(sub.name)));
            }
        }
        all.retain(|(spec, sub)| {
            let handling = match sub {
                Some(name) => spec.subcommands.iter().find(|s| s.name == *name),
                None => Some(*spec),
            };
            handling.is_some_and(|s| s.handling == Handling::Forward)
        });
        all
    });

/// Arguments that steer key finding: counts, option keywords, and names.
fn word() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (0u8..4).prop_map(|n| n.to_string().into_bytes()),
        prop::sample::select(vec![
            "STORE",
            "STOREDIST",
            "BY",
            "GET",
            "LIMIT",
            "MATCH",
            "COUNT",
            "STREAMS",
            "BLOCK",
            "KEYS",
            "GROUP",
            ">",
            "#",
            "nosort",
            "WEIGHTS",
            "LEFT",
            "$",
            "AUTH",
        ])
        .prop_map(|w| w.as_bytes().to_vec()),
        name(),
    ]
}

/// Names in the test keyspace: glob syntax, separators, and plain letters.
const ALPHABET: &[u8] = b"ab:*?[]\\^-";

fn names() -> Vec<String> {
    let mut names = vec![String::new()];
    for &a in ALPHABET {
        names.push((a as char).to_string());
        for &b in b"ab:*]" {
            names.push(format!("{}{}", a as char, b as char));
        }
    }
    names.push("abba".to_owned());
    names.push("a:b:a".to_owned());
    names
}

/// The keys of a `KEYS` reply, as a set.
fn key_set(reply: &[u8]) -> BTreeSet<Vec<u8>> {
    use redis_protocol::resp2::decode::decode_bytes;
    use redis_protocol::resp2::types::BytesFrame;
    match decode_bytes(&Bytes::copy_from_slice(reply)) {
        Ok(Some((BytesFrame::Array(items), _))) => items
            .into_iter()
            .map(|item| match item {
                BytesFrame::BulkString(key) => key.to_vec(),
                other => panic!("a key, not {other:?}"),
            })
            .collect(),
        other => panic!("an array of keys, not {other:?}"),
    }
}

#[test]
fn a_confined_pattern_selects_in_redis_exactly_what_it_selects_unconfined() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let billing = Namespace::for_project(ALICE.project);
    let shipping = Namespace::for_project(BOB.project);

    // Database 0, behind the proxy: every name in both namespaces and
    // outside any. Database 1: the bare names, for reference.
    let mut direct = redis.direct();
    for name in names() {
        for key in [
            billing.key(name.as_bytes()),
            shipping.key(name.as_bytes()),
            Bytes::from(name.clone()),
        ] {
            let key = String::from_utf8(key.to_vec()).expect("ASCII names");
            assert_eq!(direct.cmd(&["SET", &key, "x"]), b"+OK\r\n");
        }
    }
    assert_eq!(direct.cmd(&["SELECT", "1"]), b"+OK\r\n");
    for name in names() {
        assert_eq!(direct.cmd(&["SET", &name, "x"]), b"+OK\r\n");
    }
    // The runner takes a shared closure; each client is used by one case
    // at a time.
    let direct = RefCell::new(direct);
    let zero = RefCell::new(redis.direct());
    let alice = RefCell::new(proxy.login(&ALICE));

    let patterns = proptest::collection::vec(prop::sample::select(ALPHABET.to_vec()), 0..7)
        .prop_map(|p| String::from_utf8(p).expect("ASCII patterns"));
    let mut runner = TestRunner::new(Config::with_cases(300));
    runner
        .run(&patterns, |pattern| {
            let mut expected = key_set(&direct.borrow_mut().cmd(&["KEYS", &pattern]));
            // Redis never matches an empty name against a pattern of several
            // stars (a lone `*` is its match-all shortcut), but inside the
            // namespace the empty name is the prefix itself, which
            // `prefix**` does match. The one harmless difference: the proxy
            // lists the empty-named key for such patterns.
            if pattern.len() > 1 && pattern.bytes().all(|b| b == b'*') {
                expected.insert(Vec::new());
            }

            let confined = String::from_utf8(billing.pattern(pattern.as_bytes()).to_vec())
                .expect("ASCII patterns");
            let upstream = key_set(&zero.borrow_mut().cmd(&["KEYS", &confined]));
            for key in &upstream {
                prop_assert!(key.starts_with(billing.prefix()), "{:?} escaped", pattern);
            }
            let stripped: BTreeSet<Vec<u8>> = upstream
                .iter()
                .map(|k| k[billing.prefix().len()..].to_vec())
                .collect();
            prop_assert_eq!(&stripped, &expected, "pattern {:?}", pattern);

            // And through the proxy, which confines and unprefixes itself.
            let through = key_set(&alice.borrow_mut().cmd(&["KEYS", &pattern]));
            prop_assert_eq!(
                &through,
                &expected,
                "pattern {:?} through the proxy",
                pattern
            );
            Ok(())
        })
        .expect("confinement keeps every pattern's meaning inside the namespace");
}
