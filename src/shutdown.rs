//! Shutdown in two phases (SPEC §8): first *stop* (no new connections,
//! WebSockets close with 1001, HTTP connections finish their in-flight
//! request), then, once the grace period is over, *force* (whatever is
//! still running is cut). Every task the gateway spawns is tracked here, so
//! `Gateway::run` returns only when nothing it started is left behind.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The gateway's shutdown state, passed explicitly to everything that spawns.
#[derive(Clone, Default)]
pub struct Shutdown {
    stop: CancellationToken,
    force: CancellationToken,
    tasks: TaskTracker,
}

impl Shutdown {
    /// A fresh, running state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancelled when shutdown begins: stop accepting, close WebSockets,
    /// finish in-flight requests.
    pub fn stopping(&self) -> &CancellationToken {
        &self.stop
    }

    /// Cancelled when the grace period is over: drop what is left.
    pub fn forced(&self) -> &CancellationToken {
        &self.force
    }

    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Spawns a task that shutdown waits for.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(task)
    }

    /// Begins shutdown.
    pub fn begin(&self) {
        self.stop.cancel();
    }

    /// Waits up to `grace` for every tracked task, then forces the rest and
    /// waits for them to notice. Returns `false` if anything had to be forced.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.tasks.close();
        let clean = tokio::time::timeout(grace, self.tasks.wait()).await.is_ok();
        if !clean {
            self.force.cancel();
            // Forced tasks drop their sockets at once; this cannot take long,
            // but bound it anyway so shutdown always finishes.
            let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
        }
        clean
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C), whichever comes first.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the gateway");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
