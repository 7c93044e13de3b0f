//! Shutdown: one announcement that every task can wait for.
//!
//! The listener owns the `Trigger`; each session holds a `Shutdown` and
//! races it against its I/O, so a signal stops new work everywhere at once
//! while requests already in flight are allowed to finish.

use tokio::sync::watch;

/// Announces shutdown to every `Shutdown` made from it.
#[derive(Debug)]
pub struct Trigger {
    sender: watch::Sender<bool>,
}

/// A handle that resolves once shutdown has been announced.
#[derive(Clone, Debug)]
pub struct Shutdown {
    receiver: watch::Receiver<bool>,
}

/// A new trigger and the first handle on it.
pub fn channel() -> (Trigger, Shutdown) {
    let (sender, receiver) = watch::channel(false);
    (Trigger { sender }, Shutdown { receiver })
}

impl Trigger {
    pub fn fire(&self) {
        self.sender.send_replace(true);
    }

    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            receiver: self.sender.subscribe(),
        }
    }
}

impl Shutdown {
    /// Whether shutdown has been announced already.
    pub fn is_announced(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Waits until shutdown is announced (or the trigger is gone, which
    /// means the same thing).
    pub async fn announced(&mut self) {
        let _ = self.receiver.wait_for(|&fired| fired).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_handle_sees_the_announcement() {
        let (trigger, mut first) = channel();
        let mut second = trigger.subscribe();
        assert!(!first.is_announced());
        trigger.fire();
        first.announced().await;
        second.announced().await;
        assert!(second.is_announced());
    }
}
