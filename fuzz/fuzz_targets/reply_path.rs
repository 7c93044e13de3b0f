//! Fuzzes the reply path: upstream bytes are measured into frames and each
//! is transformed by a plan (keys unprefixed, values opened), alone or as
//! the reply of an `EXEC`, or as a Pub/Sub frame (channels unprefixed), as a
//! session does before anything reaches the client.
//!
//! Beyond "no panic", it checks that a transformed reply is exactly one
//! well-formed frame, so that a hostile or broken upstream can never make
//! the client's reply stream lose step with its requests.
//!
//! Input: one byte choosing the reply shape (and, for `EXEC`, the shapes of
//! the queued commands), one byte of switches (bit 0 RESP3, bit 1
//! encryption on, bit 2 strict, bit 3 `EXEC`, bit 4 isolation off, bit 5
//! Pub/Sub), then the upstream's bytes.

#![no_main]

use std::sync::{Arc, LazyLock};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use redcloak::command::ReplyShape;
use redcloak::frame::{Limits, Scanner};
use redcloak::keyring::{Keyring, Sealer};
use redcloak::namespace::Namespace;
use redcloak::plan::{Plan, Values};
use redcloak::{pubsub, reply};

const PROJECT: &str = "fuzz";

const SHAPES: [ReplyShape; 10] = [
    ReplyShape::Plain,
    ReplyShape::Value,
    ReplyShape::Values,
    ReplyShape::FieldValues,
    ReplyShape::KeyValue,
    ReplyShape::KeyFirst,
    ReplyShape::KeyValues,
    ReplyShape::ScanKeys,
    ReplyShape::Keys,
    ReplyShape::Key,
];

static SEALER: LazyLock<Arc<Sealer>> = LazyLock::new(|| {
    let keyring = Keyring::from_env_key("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
        .expect("the fixed fuzz key is valid base64 of 32 bytes");
    Arc::new(Sealer::new(keyring, 64, false))
});

fuzz_target!(|data: &[u8]| {
    let [shape, switches, upstream @ ..] = data else {
        return;
    };
    let resp3 = switches & 1 != 0;
    let namespace = Arc::new(if switches & 16 != 0 {
        Namespace::shared()
    } else {
        Namespace::for_project(PROJECT)
    });
    let values = (switches & 2 != 0).then(|| Values {
        sealer: Arc::clone(&SEALER),
        project: Arc::from(PROJECT),
        strict: switches & 4 != 0,
    });
    let plan_for = |at: usize| Plan {
        command: "fuzz",
        reply: SHAPES[at % SHAPES.len()],
        namespace: Arc::clone(&namespace),
        values: values.clone(),
    };
    let exec = switches & 8 != 0;
    let plans: Vec<Plan> = (0..usize::from(shape >> 4))
        .map(|i| plan_for(usize::from(*shape) + i))
        .collect();
    let plan = plan_for(usize::from(*shape));

    let limits = Limits::reply(1 << 20);
    let mut scanner = Scanner::for_replies();
    let mut input = BytesMut::from(upstream);
    while let Ok(Some(len)) = scanner.measure(&input, &limits) {
        let raw = input.split_to(len).freeze();
        let mut out = BytesMut::new();
        // Whether a reply was written; a Pub/Sub frame of another project
        // writes none.
        let written = if switches & 32 != 0 {
            pubsub::transform(&namespace, &raw, resp3, &mut out).map_err(|_| ())
        } else if exec {
            reply::transform_exec(&plans, raw, resp3, &mut out)
                .map(|_failed_to_open| true)
                .map_err(|_| ())
        } else {
            reply::transform(&plan, raw, resp3, &mut out)
                .map(|()| true)
                .map_err(|_| ())
        };
        if written == Ok(true) {
            let measured = Scanner::for_replies().measure(&out, &Limits::reply(usize::MAX / 4));
            assert_eq!(measured, Ok(Some(out.len())), "a reply is not one frame");
        } else {
            assert!(out.is_empty(), "bytes written for no reply");
        }
    }
});
