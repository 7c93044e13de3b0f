//! Fuzzes the request path: client bytes, arriving in pieces, are framed,
//! looked up in the command table and rewritten for the upstream, as a
//! session does before anything reaches Redis.
//!
//! Beyond "no panic", it checks what the session relies on: an error reply
//! is one frame, a failed rewrite writes nothing, and a rewritten
//! request is one well-formed frame in which every key carries the
//! namespace prefix and every other changed argument is a confined pattern
//! or a sealed value that opens to the original.
//!
//! Input: one byte of switches (bit 0 authenticated, bit 1 encryption on,
//! bit 2 isolation off, bits 3-7 the size of the pieces the bytes arrive
//! in, 0 meaning all at once), then the client's bytes.

#![no_main]

use std::sync::{Arc, LazyLock};

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use redcloak::command::{self, Handling};
use redcloak::frame::{self, Limits, Scanner};
use redcloak::keyring::{Keyring, Opened, Sealer};
use redcloak::namespace::Namespace;
use redcloak::plan::{self, Values};

const PROJECT: &str = "fuzz";

/// Small enough that the fuzzer reaches the size limits.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

static SEALER: LazyLock<Arc<Sealer>> = LazyLock::new(|| {
    let keyring = Keyring::from_env_key("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
        .expect("the fixed fuzz key is valid base64 of 32 bytes");
    Arc::new(Sealer::new(keyring, 64, false))
});

struct Rewriter {
    namespace: Arc<Namespace>,
    values: Option<Values>,
    out: BytesMut,
    scratch: Vec<usize>,
}

fuzz_target!(|data: &[u8]| {
    let Some((&switches, input)) = data.split_first() else {
        return;
    };
    let authenticated = switches & 1 != 0;
    let mut rewriter = Rewriter {
        namespace: Arc::new(if switches & 4 != 0 {
            Namespace::shared()
        } else {
            Namespace::for_project(PROJECT)
        }),
        values: (switches & 2 != 0).then(|| Values {
            sealer: Arc::clone(&SEALER),
            project: Arc::from(PROJECT),
            strict: false,
        }),
        out: BytesMut::new(),
        scratch: Vec::new(),
    };
    let piece = match usize::from(switches >> 3) {
        0 => input.len().max(1),
        n => n,
    };

    let limits = Limits::request(MAX_REQUEST_BYTES, authenticated);
    let mut buf = BytesMut::new();
    let mut scanner = Scanner::for_requests();
    for chunk in input.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            match frame::next_request(&mut buf, &mut scanner, &limits) {
                Ok(Some(args)) => rewriter.handle(&args),
                Ok(None) => break,
                Err(e) => {
                    check_error_line(&e.to_string());
                    return;
                }
            }
        }
    }
});

impl Rewriter {
    fn handle(&mut self, args: &[Bytes]) {
        if args.is_empty() {
            return;
        }
        let spec = match command::lookup(args) {
            Ok(spec) => spec,
            Err(e) => return check_error_line(&e.to_string()),
        };
        if spec.handling != Handling::Forward {
            return;
        }
        if let Some(text) = plan::ambiguous_keys(spec, args) {
            return check_error_line(text);
        }

        self.out.clear();
        let rewritten = plan::rewrite(
            spec,
            args,
            &self.namespace,
            self.values.as_ref(),
            &mut self.out,
            &mut self.scratch,
        );
        if let Err(e) = rewritten {
            check_error_line(&e.to_string());
            assert!(self.out.is_empty(), "a failed rewrite wrote bytes");
            return;
        }
        self.check_rewritten(spec, args);
    }

    fn check_rewritten(&self, spec: &command::CommandSpec, args: &[Bytes]) {
        let limits = Limits::request(usize::MAX / 4, true);
        let measured = Scanner::for_requests().measure(&self.out, &limits);
        assert_eq!(measured, Ok(Some(self.out.len())), "not one frame");
        let upstream =
            frame::decode_request(&self.out.clone().freeze()).expect("a rewritten request decodes");

        // A guarded command travels inside EVAL: script, key count and the
        // keys come first, then the command itself.
        let offset = upstream.len() - args.len();
        if offset > 0 {
            assert!(upstream[0].eq_ignore_ascii_case(b"EVAL"), "extra arguments");
        }
        let rewritten = &upstream[offset..];

        let mut keys = Vec::new();
        command::key_indexes(spec, args, &mut keys);
        let prefix = self.namespace.prefix();
        for &i in &keys {
            assert!(
                rewritten[i].starts_with(prefix),
                "key {i} left the namespace"
            );
            assert_eq!(
                self.namespace.strip(&rewritten[i]).as_ref(),
                Some(&args[i]),
                "unprefixing key {i} does not give it back"
            );
        }
        for (i, (before, after)) in args.iter().zip(rewritten).enumerate() {
            if before == after || keys.contains(&i) {
                continue;
            }
            let confined =
                *after == self.namespace.pattern(before) || *after == self.namespace.key(before);
            let sealed = self.values.as_ref().is_some_and(|v| {
                matches!(v.sealer.open(PROJECT, after), Ok(Opened::Sealed(p)) if p == before[..])
            });
            assert!(confined || sealed, "argument {i} changed unexplained");
        }
    }
}

/// Error texts reach the client on a status line, and some quote client
/// bytes: the reply must stay one frame, or the client's bytes could forge
/// a second reply.
fn check_error_line(text: &str) {
    let mut out = BytesMut::new();
    frame::ReplyWriter { resp3: false }.error(&mut out, text);
    let measured = Scanner::for_replies().measure(&out, &Limits::reply(1 << 20));
    assert_eq!(
        measured,
        Ok(Some(out.len())),
        "error reply is not one frame"
    );
}
