//! Shards: the generator's connections are spread over a few threads, each
//! running its own single-threaded runtime. A connection never moves
//! between threads, so its histogram and counters need no lock; the few
//! numbers the coordinator watches during a run are atomics.

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use hdrhistogram::Histogram;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::conn::{self, Local, Plan, ShardStats};

enum Cmd {
    Connect(Vec<u32>),
    StartSending,
    Report(oneshot::Sender<ShardReport>),
}

/// What a shard measured.
pub struct ShardReport {
    /// Latency of every delivery, nanoseconds.
    pub hist: Histogram<u64>,
    /// Connect + upgrade + join time of every connection, nanoseconds.
    pub connect_hist: Histogram<u64>,
    /// Deliveries out of order.
    pub out_of_order: u64,
    /// Error frames received.
    pub errors: u64,
    /// When the last delivery was read (generator clock).
    pub last_recv: u64,
    /// The first failure seen.
    pub first_error: Option<String>,
}

/// The running shards of one run. Dropping it stops them: their threads
/// drop every connection and exit.
pub struct Shards {
    cmds: Vec<mpsc::UnboundedSender<Cmd>>,
    stats: Vec<Arc<ShardStats>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Totals over all shards.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    /// Measured deliveries.
    pub received: u64,
    /// Connections joined.
    pub joined: u64,
    /// Connections that failed to join.
    pub failed: u64,
    /// Joined connections that ended.
    pub closed: u64,
    /// Senders done.
    pub senders_done: u64,
}

impl Shards {
    /// Starts `n` shard threads for `plan`; each runs at most
    /// `connect_concurrency` handshakes at a time.
    pub fn start(n: usize, plan: Arc<Plan>, connect_concurrency: usize) -> std::io::Result<Self> {
        let mut shards = Shards {
            cmds: Vec::new(),
            stats: Vec::new(),
            threads: Vec::new(),
        };
        for i in 0..n.max(1) {
            let (tx, rx) = mpsc::unbounded_channel();
            let stats = Arc::new(ShardStats::default());
            let plan = plan.clone();
            let thread_stats = stats.clone();
            let thread = std::thread::Builder::new()
                .name(format!("shard-{i}"))
                .spawn(move || shard_main(rx, plan, thread_stats, connect_concurrency))?;
            shards.cmds.push(tx);
            shards.stats.push(stats);
            shards.threads.push(thread);
        }
        Ok(shards)
    }

    /// Opens connections `0..n`, spread round-robin over the shards (the
    /// shards report progress through [`Shards::totals`]).
    pub fn connect(&self, n: u32) {
        let k = self.cmds.len() as u32;
        for (s, tx) in self.cmds.iter().enumerate() {
            let mine: Vec<u32> = (s as u32..n).step_by(k as usize).collect();
            let _ = tx.send(Cmd::Connect(mine));
        }
    }

    /// Lets every sender start (client-originated runs).
    pub fn start_sending(&self) {
        for tx in &self.cmds {
            let _ = tx.send(Cmd::StartSending);
        }
    }

    /// Current totals.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for s in &self.stats {
            t.received += s.received.load(Relaxed);
            t.joined += s.joined.load(Relaxed);
            t.failed += s.failed.load(Relaxed);
            t.closed += s.closed.load(Relaxed);
            t.senders_done += s.senders_done.load(Relaxed);
        }
        t
    }

    /// Every shard's measurements.
    pub async fn reports(&self) -> Result<Vec<ShardReport>, String> {
        let mut out = Vec::new();
        for tx in &self.cmds {
            let (reply, rx) = oneshot::channel();
            tx.send(Cmd::Report(reply))
                .map_err(|_| "a shard thread ended early".to_string())?;
            let report = tokio::time::timeout(std::time::Duration::from_secs(10), rx)
                .await
                .map_err(|_| "a shard did not report within 10 s".to_string())?
                .map_err(|_| "a shard thread ended early".to_string())?;
            out.push(report);
        }
        Ok(out)
    }

    /// Stops the shards and waits for their threads (which close every
    /// connection on the way out).
    pub fn stop(mut self) {
        self.cmds.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn shard_main(
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    plan: Arc<Plan>,
    stats: Arc<ShardStats>,
    connect_concurrency: usize,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("roomgate-bench: shard runtime: {e}");
            return;
        }
    };
    let set = tokio::task::LocalSet::new();
    set.block_on(&runtime, async move {
        let (start_tx, start_rx) = watch::channel(false);
        let local = Rc::new(Local::new(plan, stats, start_rx));
        let gate = Arc::new(Semaphore::new(connect_concurrency.max(1)));
        while let Some(cmd) = rx.recv().await {
            match cmd {
                Cmd::Connect(ids) => {
                    for idx in ids {
                        tokio::task::spawn_local(conn::run(idx, local.clone(), gate.clone()));
                    }
                }
                Cmd::StartSending => {
                    let _ = start_tx.send(true);
                }
                Cmd::Report(reply) => {
                    let report = ShardReport {
                        hist: local.hist.borrow().clone(),
                        connect_hist: local.connect_hist.borrow().clone(),
                        out_of_order: local.out_of_order.get(),
                        errors: local.errors.get(),
                        last_recv: local.last_recv.get(),
                        first_error: local.first_error.borrow().clone(),
                    };
                    let _ = reply.send(report);
                }
            }
        }
    });
    // Dropping the LocalSet and the runtime drops every connection task,
    // which closes its socket.
    drop(set);
    drop(runtime);
}
