//! The threads that run client sessions.
//!
//! Each worker is a single-threaded runtime with its own shared upstream
//! links. A session stays on the worker it was handed to, from its first
//! byte to its close, so the path of a request (client socket, session,
//! shared link, Redis, back) never crosses a thread: no cross-thread wake-ups
//! on the hot path, and a link's task runs right after the sessions that fed
//! it, which lets it send all their requests in one write.
//!
//! Connections are handed out in turn. Load is not rebalanced later: a
//! worker with a few very busy clients stays busier than the others.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use tokio::runtime::{self, Handle};
use tokio::sync::oneshot;

use crate::frame::Limits;
use crate::upstream::{Cluster, Connector, SharedLink, SharedLinks};

/// How long a stopping worker waits for its blocking tasks (password
/// hashing) before leaving them.
const STOP_TIMEOUT: Duration = Duration::from_secs(1);

/// What every worker's shared links are made from.
pub struct LinkSettings<'a> {
    pub connector: &'a Connector,
    /// In cluster mode, the cluster the shared links route to.
    pub cluster: Option<&'a Arc<Cluster>>,
    /// Shared links per worker; 0 gives each session its own connection.
    pub count: usize,
    pub reply_limits: Limits,
    pub reply_timeout: Option<Duration>,
}

/// The running workers. Dropping this stops them.
pub struct Workers {
    workers: Vec<Worker>,
    next_worker: AtomicUsize,
}

struct Worker {
    handle: Handle,
    links: SharedLinks,
    next_link: AtomicUsize,
    /// Dropped to stop the worker's thread.
    _stop: oneshot::Sender<()>,
}

impl Workers {
    /// Starts `count` workers; 0 means [`default_count`].
    pub fn start(count: usize, links: &LinkSettings<'_>) -> io::Result<Workers> {
        let count = match count {
            0 => default_count(),
            n => n,
        };
        let workers = (0..count)
            .map(|index| Worker::start(index, links))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Workers {
            workers,
            next_worker: AtomicUsize::new(0),
        })
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Runs the future that `start` makes on the next worker in turn;
    /// `start` gets the shared link its session should use, if any.
    pub fn spawn<F, Fut>(&self, start: F)
    where
        F: FnOnce(Option<SharedLink>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let turn = self.next_worker.fetch_add(1, Ordering::Relaxed);
        let worker = &self.workers[turn % self.workers.len()];
        let link_turn = worker.next_link.fetch_add(1, Ordering::Relaxed);
        let link = worker.links.for_session(link_turn as u64);
        worker.handle.spawn(start(link));
    }
}

/// Half the CPUs, at least one. The proxy usually shares its machine with
/// the clients it serves, and often with Redis: a worker per CPU would have
/// them all fight over the same cores, and one worker already carries tens
/// of thousands of requests a second per core.
pub fn default_count() -> usize {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    (cpus / 2).max(1)
}

impl Worker {
    fn start(index: usize, settings: &LinkSettings<'_>) -> io::Result<Worker> {
        let runtime = runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        // The links' tasks belong to this worker's runtime; they start
        // running once its thread does.
        let links = {
            let _entered = handle.enter();
            match settings.cluster {
                Some(cluster) => SharedLinks::start_cluster(
                    cluster,
                    settings.count,
                    settings.reply_limits,
                    settings.reply_timeout,
                ),
                None => SharedLinks::start(
                    settings.connector,
                    settings.count,
                    settings.reply_limits,
                    settings.reply_timeout,
                ),
            }
        };
        let (stop, stopped) = oneshot::channel::<()>();
        thread::Builder::new()
            .name(format!("redcloak-worker-{index}"))
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                runtime.shutdown_timeout(STOP_TIMEOUT);
            })?;
        Ok(Worker {
            handle,
            links,
            next_link: AtomicUsize::new(0),
            _stop: stop,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamSettings;

    fn settings(connector: &Connector) -> LinkSettings<'_> {
        LinkSettings {
            connector,
            cluster: None,
            count: 1,
            reply_limits: Limits::reply(1024 * 1024),
            reply_timeout: None,
        }
    }

    #[test]
    fn sessions_are_handed_to_the_workers_in_turn() {
        let connector = Connector::new(&UpstreamSettings::default());
        let workers = Workers::start(3, &settings(&connector)).expect("workers start");
        assert_eq!(workers.len(), 3);
        let (names, seen) = std::sync::mpsc::channel();
        for _ in 0..6 {
            let names = names.clone();
            workers.spawn(move |link| async move {
                let name = thread::current().name().map(str::to_owned);
                let _ = names.send((name, link.is_some()));
            });
        }
        let mut threads: Vec<_> = (0..6)
            .map(|_| seen.recv_timeout(Duration::from_secs(5)).expect("task ran"))
            .collect();
        assert!(threads.iter().all(|(_, has_link)| *has_link));
        threads.sort();
        let names: Vec<_> = threads.into_iter().filter_map(|(name, _)| name).collect();
        assert_eq!(
            names,
            [
                "redcloak-worker-0",
                "redcloak-worker-0",
                "redcloak-worker-1",
                "redcloak-worker-1",
                "redcloak-worker-2",
                "redcloak-worker-2"
            ]
        );
    }

    #[test]
    fn zero_means_the_default_count_and_no_links_means_none() {
        let connector = Connector::new(&UpstreamSettings::default());
        let mut links = settings(&connector);
        links.count = 0;
        let workers = Workers::start(0, &links).expect("workers start");
        assert_eq!(workers.len(), default_count());
        assert!(default_count() >= 1);
        let (sender, received) = std::sync::mpsc::channel();
        workers.spawn(move |link| async move {
            let _ = sender.send(link.is_none());
        });
        assert!(
            received
                .recv_timeout(Duration::from_secs(5))
                .expect("task ran")
        );
    }
}
