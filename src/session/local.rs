//! The commands a session answers itself: logging in (`AUTH`, `HELLO`),
//! leaving (`QUIT`, `RESET`), and the connection commands whose state lives
//! in the proxy (`SELECT`, `PING`, `ECHO`, `CLIENT …`).

use std::sync::Arc;

use bytes::Bytes;

use super::emulation::Emulation;
use super::{NodeNeed, Pending, ReplyMode, Session, display_name};
use crate::command::{self, Local, ReplyShape};
use crate::frame;
use crate::namespace::Namespace;

/// Redis's reply to a wrong username/password pair.
const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";

impl Session {
    pub(super) async fn handle_local(&mut self, local: Local, args: &[Bytes]) {
        match local {
            Local::Auth => self.auth(args).await,
            Local::Hello => self.hello(args).await,
            Local::Quit => {
                self.reply_local(|w, out| w.simple(out, "OK"));
                self.closing = true;
            }
            Local::Reset => self.reset().await,
            Local::Select => {
                let reply = match args.get(1).map(|a| a.as_ref()) {
                    Some(b"0") => Ok(()),
                    Some(n) if std::str::from_utf8(n).is_ok_and(|t| t.parse::<i64>().is_ok()) => {
                        Err("ERR DB index is out of range")
                    }
                    _ => Err("ERR value is not an integer or out of range"),
                };
                self.reply_local(|w, out| match reply {
                    Ok(()) => w.simple(out, "OK"),
                    Err(text) => w.error(out, text),
                });
            }
            Local::Ping => {
                let message = args.get(1).cloned();
                // In RESP2 subscribed mode Redis answers PING as a push.
                let subscribed = !self.writer.resp3 && self.subscriptions.active();
                self.reply_local(|w, out| match (subscribed, message) {
                    (true, m) => {
                        w.array(out, 2);
                        w.bulk(out, b"pong");
                        w.bulk(out, &m.unwrap_or_default());
                    }
                    (false, Some(m)) => w.bulk(out, &m),
                    (false, None) => w.simple(out, "PONG"),
                });
            }
            Local::Subscribe(kind) => self.subscribe(kind, args).await,
            Local::Unsubscribe(kind) => self.unsubscribe(kind, args).await,
            Local::Publish(kind) => self.publish(kind, args).await,
            Local::PubSubChannels(kind) => self.pubsub_channels(kind, args).await,
            Local::PubSubNumSub(kind) => self.pubsub_numsub(kind, args).await,
            Local::PubSubNumPat => self.pubsub_numpat(),
            Local::Echo => {
                let message = args.get(1).cloned().unwrap_or_default();
                self.reply_local(|w, out| w.bulk(out, &message));
            }
            Local::ClientSetName => {
                let name = args.get(2).cloned().unwrap_or_default();
                if name.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
                    self.reply_local(|w, out| {
                        w.error(out, "ERR Client names cannot contain spaces, newlines or special characters.")
                    });
                } else {
                    self.name = (!name.is_empty()).then_some(name);
                    self.reply_local(|w, out| w.simple(out, "OK"));
                }
            }
            Local::ClientGetName => {
                let name = self.name.clone();
                self.reply_local(|w, out| match name {
                    Some(n) => w.bulk(out, &n),
                    None => w.null(out),
                });
            }
            Local::ClientId => {
                let id = self.id as i64;
                self.reply_local(|w, out| w.integer(out, id));
            }
            Local::ClientSetInfo => {
                let attribute = args.get(2).map(|a| a.to_ascii_lowercase());
                let known = matches!(attribute.as_deref(), Some(b"lib-name" | b"lib-ver"));
                let text = format!(
                    "ERR Unrecognized option '{}'",
                    String::from_utf8_lossy(args.get(2).map(|a| a.as_ref()).unwrap_or_default())
                );
                self.reply_local(|w, out| {
                    if known {
                        w.simple(out, "OK")
                    } else {
                        w.error(out, &text)
                    }
                });
            }
            Local::ClientInfo => {
                let info = self.client_info();
                self.reply_local(|w, out| w.verbatim(out, info.as_bytes()));
            }
            Local::ClientReply => {
                let mode = args.get(2).map(|a| a.to_ascii_uppercase());
                match mode.as_deref() {
                    Some(b"ON") => {
                        self.reply_mode = ReplyMode::On;
                        self.reply_local(|w, out| w.simple(out, "OK"));
                    }
                    Some(b"OFF") => self.reply_mode = ReplyMode::Off,
                    // The SKIP command itself gets no reply either.
                    Some(b"SKIP") => self.reply_mode = ReplyMode::SkipNext,
                    _ => self.reply_local(|w, out| w.error(out, "ERR syntax error")),
                }
            }
            Local::DbSize => self.dbsize().await,
            Local::RandomKey => self.emulate(Emulation::RandomKey).await,
            Local::FlushDb => match args.get(1).map(|a| a.to_ascii_uppercase()).as_deref() {
                None | Some(b"SYNC") => self.emulate(Emulation::Flush { lazy: false }).await,
                Some(b"ASYNC") => self.emulate(Emulation::Flush { lazy: true }).await,
                Some(_) => self.reply_local(|w, out| w.error(out, "ERR syntax error")),
            },
            Local::Command => {
                self.forward_request(&[b"COMMAND"], "command", ReplyShape::Commands)
                    .await
            }
            Local::CommandInfo | Local::CommandDocs => {
                let request: Vec<&[u8]> = args.iter().map(|a| a.as_ref()).collect();
                let shape = if local == Local::CommandInfo && args.len() > 2 {
                    ReplyShape::CommandsByName
                } else {
                    ReplyShape::Commands
                };
                self.forward_request(&request, "command", shape).await
            }
            Local::CommandCount => {
                let count = command::offered_commands().count() as i64;
                self.reply_local(|w, out| w.integer(out, count));
            }
            Local::CommandList if args.len() > 2 => {
                self.reply_local(|w, out| {
                    w.error(out, "ERR redcloak supports COMMAND LIST without FILTERBY")
                });
            }
            Local::CommandList => {
                let names: Vec<&str> = command::offered_commands().map(|c| c.name).collect();
                self.reply_local(|w, out| {
                    w.array(out, names.len());
                    for name in names {
                        w.bulk(out, name.as_bytes());
                    }
                });
            }
            Local::CommandGetKeys => {
                let target = &args[2..];
                let reply = match command::lookup(target) {
                    Err(_) => Err("ERR Invalid command specified"),
                    Ok(spec) => {
                        let mut indexes = Vec::new();
                        command::key_indexes(spec, target, &mut indexes);
                        if indexes.is_empty() {
                            Err("ERR The command has no key arguments")
                        } else {
                            Ok(indexes)
                        }
                    }
                };
                self.reply_local(|w, out| match reply {
                    Ok(indexes) => {
                        w.array(out, indexes.len());
                        for i in indexes {
                            w.bulk(out, &target[i]);
                        }
                    }
                    Err(text) => w.error(out, text),
                });
            }
            Local::Info => self.info(args).await,
            // Both change how Redis treats the proxy's own upstream link
            // (eviction, LRU touches), which the proxy decides, not a client.
            Local::ClientNoEvict | Local::ClientNoTouch => {
                let text = format!(
                    "ERR '{}' is not available through redcloak: the proxy manages its upstream connections",
                    display_name(args)
                );
                self.reply_local(|w, out| w.error(out, &text));
            }
        }
    }

    /// `AUTH [user] password`.
    async fn auth(&mut self, args: &[Bytes]) {
        let (user, password) = match args {
            [_, password] => (Bytes::from_static(b"default"), password.clone()),
            [_, user, password] => (user.clone(), password.clone()),
            _ => {
                self.reply_local(|w, out| w.error(out, "ERR syntax error"));
                return;
            }
        };
        if self.authenticate(&user, &password).await {
            self.reply_local(|w, out| w.simple(out, "OK"));
        } else {
            self.reply_local(|w, out| w.error(out, WRONGPASS));
        }
    }

    /// `HELLO [protover [AUTH user pass] [SETNAME name]]`.
    async fn hello(&mut self, args: &[Bytes]) {
        let mut version = None;
        let mut credentials = None;
        let mut set_name = None;
        if let Some(v) = args.get(1) {
            match v.as_ref() {
                b"2" => version = Some(false),
                b"3" => version = Some(true),
                _ => {
                    self.reply_local(|w, out| w.error(out, "NOPROTO unsupported protocol version"));
                    return;
                }
            }
        }
        let mut i = 2;
        while i < args.len() {
            let option = args[i].to_ascii_uppercase();
            match option.as_slice() {
                b"AUTH" if i + 2 < args.len() => {
                    credentials = Some((args[i + 1].clone(), args[i + 2].clone()));
                    i += 3;
                }
                b"SETNAME" if i + 1 < args.len() => {
                    set_name = Some(args[i + 1].clone());
                    i += 2;
                }
                _ => {
                    let text = format!(
                        "ERR Syntax error in HELLO option '{}'",
                        String::from_utf8_lossy(&args[i])
                    );
                    self.reply_local(|w, out| w.error(out, &text));
                    return;
                }
            }
        }

        if let Some((user, password)) = credentials
            && !self.authenticate(&user, &password).await
        {
            self.reply_local(|w, out| w.error(out, WRONGPASS));
            return;
        }
        if self.identity.is_none() {
            self.reply_local(|w, out| {
                w.error(
                    out,
                    "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time",
                )
            });
            return;
        }
        if let Some(name) = set_name {
            self.name = (!name.is_empty()).then_some(name);
        }

        // The upstream link switches protocol at exactly this point of its
        // reply stream, so HELLO travels upstream and its reply (the
        // server's own description) comes back through the FIFO.
        // A shared link speaks RESP2 for good, so `HELLO 2` may use one.
        let resp3 = version.unwrap_or(self.writer.resp3);
        let shared = self.use_shared_link(resp3);
        if !shared && !self.ensure_link(NodeNeed::Any).await {
            return;
        }
        self.writer.resp3 = resp3;
        let proto: &[u8] = if resp3 { b"3" } else { b"2" };
        let request = [&b"HELLO"[..], proto].into_iter();
        if shared {
            frame::put_request(&mut self.shared_out, request);
            self.shared_batch += 1;
            self.shared_owed += 1;
        } else {
            frame::put_request(&mut self.up_out, request);
        }
        let deliver = self.take_delivery();
        self.pending.push_back(Pending::Hello {
            resp3,
            deliver,
            shared,
        });
    }

    /// `RESET`: back to an unauthenticated RESP2 session. The upstream link
    /// is reset too (leaving any transaction or watch behind) and logged in
    /// again with the proxy's credentials.
    async fn reset(&mut self) {
        if self.link.is_some() {
            frame::put_request(&mut self.up_out, [&b"RESET"[..]].into_iter());
            self.pending.push_back(Pending::Internal);
            if let Some(auth) = self.shared.upstream.auth_request() {
                self.up_out.extend_from_slice(&auth);
                self.pending.push_back(Pending::Internal);
            }
            if let Some(link) = self.link.as_mut() {
                link.resp3 = false;
            }
        }
        self.drop_subscriptions();
        self.log_out();
        self.transaction = None;
        self.multi_unsent = false;
        self.watching = false;
        self.values = None;
        self.namespace = Arc::new(Namespace::shared());
        self.writer.resp3 = false;
        self.name = None;
        self.reply_mode = ReplyMode::On;
        self.reply_local(|w, out| w.simple(out, "RESET"));
    }

    fn client_info(&self) -> String {
        let name = self
            .name
            .as_ref()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .unwrap_or_default();
        let user = self
            .identity
            .as_ref()
            .map(|i| i.user.to_string())
            .unwrap_or_default();
        format!(
            "id={} addr={} name={} db=0 user={} resp={}\n",
            self.id,
            self.peer,
            name,
            user,
            if self.writer.resp3 { 3 } else { 2 }
        )
    }
}
