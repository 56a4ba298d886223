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

/// SIGTERM and SIGINT handlers. They are installed when this is created,
/// not when it is first awaited, so a signal that arrives while the gateway
/// is still starting is not lost to the default action (an abrupt exit).
pub struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers; needs a running tokio runtime.
    pub fn install() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    /// Resolves on SIGTERM or SIGINT (Ctrl-C), whichever comes first.
    pub async fn recv(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received, shutting down"),
            _ = self.int.recv() => tracing::info!("SIGINT received, shutting down"),
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
