//! Shutdown in two phases (SPEC §8): first *stop* (no new connections,
//! WebSockets close with 1001, HTTP connections finish their in-flight
//! request), then, once the grace period is over, *force* (whatever is
//! still running is cut). Every task the gateway spawns is tracked here,
//! by [`Shutdown`] for those serving a client connection and by
//! [`Background`] for the rest, so `Gateway::run` returns only when nothing
//! it started is left behind.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// A one-way signal that long-lived tasks wait on: a token to register
/// with, and a flag set just before the token is cancelled, so that a
/// [`Cancelled`] wait costs an atomic load per wake-up instead of the
/// token's two locks, which every waiter shares.
#[derive(Clone, Default)]
struct Signal {
    token: CancellationToken,
    raised: Arc<AtomicBool>,
}

impl Signal {
    /// The flag first, so every [`Cancelled`] wait the token wakes sees it.
    fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        self.token.cancel();
    }

    fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    fn wait(&self) -> Cancelled<'_, impl Fn() -> bool + '_> {
        Cancelled::new(&self.token, || self.is_raised())
    }
}

/// The gateway's shutdown state, passed explicitly to everything that spawns.
#[derive(Clone, Default)]
pub struct Shutdown {
    stop: Signal,
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
        &self.stop.token
    }

    /// Resolves when shutdown begins, like `stopping().cancelled()`, for
    /// tasks woken many times over their life, such as a keep-alive HTTP
    /// connection: every poll of a token's own future takes two locks on a
    /// token that every connection shares.
    pub fn stopped(&self) -> Cancelled<'_, impl Fn() -> bool + '_> {
        self.stop.wait()
    }

    /// A flag that is set just before [`Shutdown::stopping`] is cancelled,
    /// for the flags of [`Cancelled`] futures on tokens below it.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.raised.clone()
    }

    /// Cancelled when the grace period is over: drop what is left.
    pub fn forced(&self) -> &CancellationToken {
        &self.force
    }

    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_raised()
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
        self.stop.raise();
    }

    /// Waits up to `grace` for every tracked task, or until `hurry`
    /// resolves, then forces the rest and waits for them to notice. Returns
    /// `false` if anything had to be forced.
    pub async fn drain(&self, grace: Duration, hurry: impl Future<Output = ()>) -> bool {
        self.tasks.close();
        let clean = tokio::select! {
            waited = tokio::time::timeout(grace, self.tasks.wait()) => waited.is_ok(),
            () = hurry => false,
        };
        if !clean {
            self.force.cancel();
            // Forced tasks drop their sockets at once; this cannot take long,
            // but bound it anyway so shutdown always finishes.
            let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
        }
        clean
    }
}

/// Tasks that work for the gateway as a whole rather than for one client
/// connection: the admin port, the sweepers, the upstream connections of
/// the HTTP client used for tunnels and forward auth, an upload finishing
/// after its response. Shutdown's drain does not wait for them (an idle
/// upstream connection would hold it for a minute); `Gateway::run` stops
/// them as it returns, so none outlives the gateway.
#[derive(Clone, Default)]
pub struct Background {
    stop: Signal,
    tasks: TaskTracker,
}

impl Background {
    /// Cancelled when the gateway has drained and its last users are gone.
    pub fn stopping(&self) -> &CancellationToken {
        &self.stop.token
    }

    /// Runs `task`, which watches [`Background::stopping`] itself and ends
    /// soon after it is cancelled (the admin port finishes its answers).
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// Runs `task` until it ends or the gateway stops, whichever is first.
    /// The wait for the stop is a [`Cancelled`]: these tasks (an upstream
    /// connection) wake several times per request, and every one of them
    /// shares the token.
    pub fn spawn_until_stopped<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            let stopped = stop.wait();
            tokio::select! {
                biased;
                () = task => {}
                () = stopped => {}
            }
        });
    }

    /// Stops every task and waits until each has ended.
    pub async fn stop(&self) {
        self.tasks.close();
        self.stop.raise();
        self.tasks.wait().await;
    }
}

/// hyper's client spawns each connection it opens through this, so its
/// pooled upstream connections end with the gateway.
impl<F> hyper::rt::Executor<F> for Background
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        self.spawn_until_stopped(async move {
            future.await;
        });
    }
}

pin_project_lite::pin_project! {
    /// Resolves when a token is cancelled, for a task that waits on it
    /// across many wake-ups (see [`Shutdown::stopped`]). It registers with
    /// the token at its first poll, and again only when polled with another
    /// waker; otherwise a poll is a call of `flag`, which must return `true`
    /// from before the token is cancelled on. Cancelling the token wakes the
    /// registered waker, so the poll that follows sees the flag. The token's
    /// future registers the waker on every `Pending` it returns (it spends
    /// no cooperative budget), so the waker kept here is always the one the
    /// token holds. The token's future is kept inline, not boxed: one of
    /// these lives in every WebSocket connection's two tasks.
    pub struct Cancelled<'a, F> {
        flag: F,
        #[pin]
        wait: WaitForCancellationFuture<'a>,
        waker: Option<Waker>,
    }
}

impl<'a, F: Fn() -> bool> Cancelled<'a, F> {
    /// Waits for `token`; `flag` tells whether it has been cancelled.
    pub fn new(token: &'a CancellationToken, flag: F) -> Self {
        Self {
            flag,
            wait: token.cancelled(),
            waker: None,
        }
    }
}

impl<F: Fn() -> bool> Future for Cancelled<'_, F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return if (this.flag)() {
                Poll::Ready(())
            } else {
                Poll::Pending
            };
        }
        *this.waker = Some(cx.waker().clone());
        this.wait.poll(cx)
    }
}

/// SIGTERM and SIGINT handlers. They are installed when this is created,
/// not when it is first awaited, so a signal that arrives while the gateway
/// is still starting is not lost to the default action (an abrupt exit).
pub struct Signals {
    /// Waits for the first signal.
    first: Pair,
    /// Registered at the same time, so it sees the first signal too and
    /// waits for one more.
    again: Pair,
}

/// One registration for each of the two signals.
struct Pair {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Pair {
    fn install() -> std::io::Result<Self> {
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

    /// The name of the next signal of either kind.
    async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}

impl Signals {
    /// Installs the handlers; needs a running tokio runtime.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            first: Pair::install()?,
            again: Pair::install()?,
        })
    }

    /// Two futures for [`crate::Gateway::run`]: the first SIGTERM or SIGINT
    /// begins the drain, and a second one, of either kind, cuts it short,
    /// as an operator pressing Ctrl-C twice expects. Two signals that
    /// arrive before the second future is first polled count as one.
    pub fn split(self) -> (impl Future<Output = ()>, impl Future<Output = ()>) {
        let Self {
            mut first,
            mut again,
        } = self;
        let stop = async move {
            let name = first.recv().await;
            tracing::info!("{name} received, shutting down");
        };
        let hurry = async move {
            // Registered with `first`, it saw the first signal too. (Where
            // Ctrl-C is only watched from the first poll on, it did not.)
            #[cfg(unix)]
            again.recv().await;
            let name = again.recv().await;
            tracing::warn!("{name} received again: cutting the remaining connections now");
        };
        (stop, hurry)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Runs `wait` in a task that is woken five times for other reasons
    /// before `trigger` runs; `wait` must still see the trigger, although
    /// it was polled with the same waker again and again (see
    /// [`Cancelled`]).
    pub(crate) async fn seen_across_wake_ups(
        wait: impl Future<Output = ()> + Send + 'static,
        trigger: impl FnOnce(),
    ) {
        let (wake, mut woken) = tokio::sync::mpsc::unbounded_channel::<()>();
        let watcher = tokio::spawn(async move {
            let mut wait = std::pin::pin!(wait);
            let mut wakes = 0;
            loop {
                tokio::select! {
                    _ = wait.as_mut() => return wakes,
                    Some(()) = woken.recv() => wakes += 1,
                }
            }
        });
        for _ in 0..5 {
            wake.send(()).expect("watcher running");
            tokio::task::yield_now().await;
        }
        trigger();
        let wakes = tokio::time::timeout(Duration::from_secs(20), watcher)
            .await
            .expect("the watcher saw the trigger")
            .expect("watcher task");
        assert!(wakes >= 1, "the watcher was polled before the trigger");
    }

    #[tokio::test]
    async fn stopped_resolves_after_many_polls_with_the_same_waker() {
        let shutdown = Shutdown::new();
        let waiting = shutdown.clone();
        seen_across_wake_ups(async move { waiting.stopped().await }, || {
            assert!(!shutdown.is_stopping());
            shutdown.begin();
            assert!(shutdown.is_stopping());
        })
        .await;
    }

    #[tokio::test]
    async fn stopped_resolves_at_once_when_shutdown_has_begun() {
        let shutdown = Shutdown::new();
        shutdown.begin();
        tokio::time::timeout(Duration::from_secs(20), shutdown.stopped())
            .await
            .expect("already stopped");
    }

    /// `stop` ends what runs until stopped, waits for what watches the
    /// token itself, and returns only when both are over.
    #[tokio::test]
    async fn background_stop_ends_its_tasks_and_waits_for_them() {
        let background = Background::default();
        background.spawn_until_stopped(std::future::pending());
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let stop = background.stopping().clone();
        background.spawn(async move {
            stop.cancelled().await;
            let _ = done.send(());
        });
        tokio::time::timeout(Duration::from_secs(10), background.stop())
            .await
            .expect("stop returns");
        finished.await.expect("the watching task ran to its end");
    }
}
