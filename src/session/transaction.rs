//! Transactions: `MULTI` starts collecting the plans of queued commands,
//! and `EXEC`'s reply is transformed element by element with them. A command
//! the proxy refuses while queueing dooms the transaction, as in Redis.

use bytes::Bytes;

use super::{NodeNeed, Pending, Session};
use crate::command::CommandSpec;
use crate::frame;
use crate::plan::Plan;

/// An open `MULTI`: the plans of the queued commands, in order.
#[derive(Debug, Default)]
pub(super) struct Transaction {
    pub(super) plans: Vec<Plan>,
    /// A command was refused while queueing: `EXEC` must fail, as in Redis.
    pub(super) aborted: bool,
}

impl Session {
    /// `MULTI`, `EXEC` and `DISCARD`, which open and close the list of plans
    /// that `EXEC`'s reply is transformed by.
    pub(super) async fn transaction_command(&mut self, spec: &'static CommandSpec, args: &[Bytes]) {
        if matches!(spec.name, "exec" | "discard") {
            self.watching = false;
        }
        // A transaction of keyless commands has no node yet (cluster mode):
        // any will do.
        if spec.name == "exec"
            && self.transaction.is_some()
            && !self.ensure_link(NodeNeed::Any).await
        {
            return;
        }
        match (spec.name, self.transaction.take()) {
            ("multi", Some(open)) => {
                self.transaction = Some(open);
                self.refuse("ERR MULTI calls can not be nested");
            }
            ("multi", None) => {
                if !self.defer_multi().await {
                    self.forward(spec, args).await;
                }
                self.transaction = Some(Transaction::default());
            }
            ("exec", None) => self.reply_local(|w, out| w.error(out, "ERR EXEC without MULTI")),
            ("discard", None) => {
                self.reply_local(|w, out| w.error(out, "ERR DISCARD without MULTI"))
            }
            ("exec", Some(transaction)) if transaction.aborted => {
                frame::put_request(&mut self.up_out, [&b"DISCARD"[..]].into_iter());
                self.pending.push_back(Pending::Internal);
                self.reply_local(|w, out| {
                    w.error(
                        out,
                        "EXECABORT Transaction discarded because of previous errors.",
                    )
                });
            }
            ("exec", Some(transaction)) => {
                frame::put_request(&mut self.up_out, [&b"EXEC"[..]].into_iter());
                let deliver = self.take_delivery();
                let tracking = self
                    .shared
                    .monitor
                    .track(self.identity.as_ref(), spec, args);
                self.pending.push_back(Pending::Exec {
                    plans: transaction.plans,
                    deliver,
                    tracking,
                });
            }
            _ => self.forward(spec, args).await,
        }
    }
}
