//! The deadlines of one client connection's requests, on one timer; and
//! [`Stall`], the bound on how long a stream may stand still.
//!
//! A proxied request has two deadlines: hyper's for reading its head and
//! the proxy's for the upstream's answer. A tokio timer per deadline is
//! put into the runtime's timer wheel and taken out again on every request,
//! which was about a tenth of the instructions of a small proxied request.
//! A connection's deadlines are awaited one after another by the task that
//! serves it, and each is later than the one before, so one timer serves
//! them all: it stays armed at the earliest deadline it was given, and when
//! it goes off before the deadline now awaited it is moved, once, to that
//! one. Under steady traffic it is re-armed about once per timeout period
//! instead of twice per request, and while it waits a poll checks only
//! whether it went off.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// The timer of one client connection. Clones share it.
///
/// Every [`Deadline`] of one `Deadlines` must be awaited by the same task
/// (the connection's): the timer wakes whichever waker polled it last.
#[derive(Clone, Default)]
pub struct Deadlines {
    timer: Arc<Mutex<Shared>>,
}

/// What the deadlines of one connection share.
#[derive(Default)]
struct Shared {
    timer: Option<Timer>,
    /// Set at shutdown: hyper's deadline for reading a request head has
    /// passed, whatever its time (see [`Deadlines::end_head_reads`]).
    heads_ended: bool,
}

impl Deadlines {
    /// A connection's timer; nothing is armed until a deadline is awaited.
    pub fn new() -> Self {
        Self::default()
    }

    /// Resolves at `at`.
    pub fn at(&self, at: Instant) -> Deadline {
        Deadline {
            at,
            head: false,
            timer: self.timer.clone(),
        }
    }

    /// Ends hyper's wait for a request head now, at shutdown: a client
    /// that has sent part of a head has no request in flight, and would
    /// otherwise hold the shutdown for the whole grace period (hyper's
    /// graceful shutdown closes only connections that sent nothing). The
    /// connection's next poll sees the deadline passed and closes it.
    pub fn end_head_reads(&self) {
        crate::sync::lock(&self.timer).heads_ended = true;
    }

    /// Resolves `after` from now.
    pub fn after(&self, after: Duration) -> Deadline {
        self.at(later(Instant::now(), after))
    }
}

/// `at` plus `by`, or a time too far off to matter when that sum cannot be
/// represented. Configured timeouts are already capped (`config::secs`);
/// this keeps the timer itself as forgiving as tokio's own sleep for any
/// duration a caller hands it.
pub fn later(at: Instant, by: Duration) -> Instant {
    at.checked_add(by).unwrap_or_else(|| at + FAR_OFF)
}

/// Resolves once `last()`, the time something last moved, lies `bound` in
/// the past: the bound on an upload to the upstream, which moves it on
/// with every chunk taken. `sleep` makes the timer: the connection's
/// [`Deadlines`] where one serves the task, tokio's otherwise.
pub async fn stalled<S>(last: impl Fn() -> Instant, bound: Duration, sleep: impl Fn(Instant) -> S)
where
    S: Future<Output = ()>,
{
    loop {
        sleep(later(last(), bound)).await;
        if later(last(), bound) <= Instant::now() {
            return;
        }
    }
}

/// About thirty years.
const FAR_OFF: Duration = Duration::from_secs(86_400 * 365 * 30);

/// The shared timer, and the waker it will wake.
struct Timer {
    sleep: Pin<Box<Sleep>>,
    /// The waker `sleep` was last polled with, as long as it has not been
    /// moved since: polling it again with the same waker changes nothing,
    /// so a poll then only checks whether it went off.
    registered: Option<Waker>,
}

impl Timer {
    fn new(at: Instant) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep_until(at)),
            registered: None,
        }
    }

    fn reset(&mut self, at: Instant) {
        self.sleep.as_mut().reset(at);
        self.registered = None;
    }

    /// Whether polling the timer with `waker` would change nothing: it
    /// already holds that waker and has not gone off.
    fn waiting_with(&self, waker: &Waker) -> bool {
        self.registered.as_ref().is_some_and(|w| w.will_wake(waker)) && !self.sleep.is_elapsed()
    }

    fn poll_sleep(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // Unconstrained: out of cooperative budget, a tokio timer returns
        // `Pending` without taking the waker, and `waiting_with` would then
        // wait on a timer that wakes nobody.
        let polled = std::pin::pin!(tokio::task::unconstrained(self.sleep.as_mut())).poll(cx);
        if polled.is_pending() {
            self.registered = Some(cx.waker().clone());
        }
        polled
    }
}

/// One deadline on a connection's timer; see [`Deadlines`].
pub struct Deadline {
    at: Instant,
    /// hyper's deadline for a request head, which shutdown ends early.
    head: bool,
    timer: Arc<Mutex<Shared>>,
}

impl Future for Deadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let at = self.at;
        // Only ever taken by the connection's own task: never contended.
        let mut shared = crate::sync::lock(&self.timer);
        if self.head && shared.heads_ended {
            return Poll::Ready(());
        }
        let timer = shared.timer.get_or_insert_with(|| Timer::new(at));
        if timer.sleep.deadline() > at {
            timer.reset(at);
        }
        if timer.waiting_with(cx.waker()) {
            return Poll::Pending;
        }
        loop {
            ready!(timer.poll_sleep(cx));
            // It went off at or after `at`: this deadline has passed.
            if timer.sleep.deadline() >= at {
                return Poll::Ready(());
            }
            // An earlier deadline went off: move on to this one.
            timer.reset(at);
        }
    }
}

/// hyper's timer for a connection it serves: its header-read timeout.
impl hyper::rt::Timer for Deadlines {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Deadline {
            head: true,
            ..self.after(duration)
        })
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Deadline {
            head: true,
            ..self.at(Instant::from_std(deadline))
        })
    }
}

impl hyper::rt::Sleep for Deadline {}

/// A bound on how long something may stand still: writes to a client, a
/// response body from the upstream. Nothing is done while it moves: the
/// clock is read and the timer armed only when it first waits, which
/// already costs a system call or a task switch. The timer is armed once
/// and moved only when it goes off before the current wait's end, as
/// [`Deadlines`] does.
pub struct Stall {
    bound: Duration,
    /// When the current wait began; `None` while it moves.
    since: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Stall {
    /// Nothing armed yet.
    pub fn new(bound: Duration) -> Self {
        Self {
            bound,
            since: None,
            timer: None,
        }
    }

    /// It moved: its next wait starts a new period.
    pub fn moved(&mut self) {
        self.since = None;
    }

    /// It is done, for now: the timer goes too, so that it wakes nobody
    /// later (the next user may be another task).
    pub fn clear(&mut self) {
        self.since = None;
        self.timer = None;
    }

    /// It waits: ready once it has waited the bound since it last moved;
    /// otherwise the timer wakes the task then.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let since = *self.since.get_or_insert_with(Instant::now);
        let end = later(since, self.bound);
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(end)));
        loop {
            // Unconstrained: out of cooperative budget, a tokio timer
            // returns `Pending` without taking the waker.
            ready!(std::pin::pin!(tokio::task::unconstrained(timer.as_mut())).poll(cx));
            if timer.deadline() >= end {
                return Poll::Ready(());
            }
            // It went off for an earlier wait.
            timer.as_mut().reset(end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// Awaits `deadline`, failing the test if it has not resolved within an
    /// hour of the paused clock (which jumps there at once when nothing
    /// else can happen first).
    async fn reach(deadline: impl Future<Output = ()>) {
        tokio::time::timeout(3600 * SECOND, deadline)
            .await
            .expect("the deadline resolves");
    }

    /// A stall is measured from the last move: a move during the wait
    /// pushes its end on, and it ends once nothing moved for the bound.
    #[tokio::test(start_paused = true)]
    async fn a_stall_ends_a_bound_after_the_last_move() {
        let start = Instant::now();
        let last = std::cell::Cell::new(start);
        let mover = async {
            tokio::time::sleep(2 * SECOND).await;
            last.set(Instant::now());
        };
        let stall = stalled(|| last.get(), 3 * SECOND, tokio::time::sleep_until);
        tokio::join!(reach(stall), mover);
        assert_eq!(Instant::now(), start + 5 * SECOND);
    }

    /// Deadlines in a row, each later than the last, on a paused clock.
    #[tokio::test(start_paused = true)]
    async fn each_deadline_resolves_at_its_own_time() {
        let deadlines = Deadlines::new();
        let start = Instant::now();
        reach(deadlines.at(start + SECOND)).await;
        assert_eq!(Instant::now(), start + SECOND);
        reach(deadlines.at(start + 3 * SECOND)).await;
        assert_eq!(Instant::now(), start + 3 * SECOND);
    }

    /// A deadline abandoned before it passed leaves the timer armed early;
    /// the next, later deadline must not resolve at that earlier time.
    #[tokio::test(start_paused = true)]
    async fn an_abandoned_earlier_deadline_does_not_cut_a_later_one() {
        let deadlines = Deadlines::new();
        let start = Instant::now();
        let first = tokio::time::timeout(SECOND / 2, deadlines.at(start + SECOND)).await;
        assert!(first.is_err(), "abandoned before its time");
        reach(deadlines.at(start + 10 * SECOND)).await;
        assert_eq!(Instant::now(), start + 10 * SECOND);
    }

    /// A deadline earlier than the armed one moves the timer back.
    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_is_not_held_up_by_a_later_one() {
        let deadlines = Deadlines::new();
        let start = Instant::now();
        let late = tokio::time::timeout(SECOND, deadlines.at(start + 60 * SECOND)).await;
        assert!(late.is_err());
        reach(deadlines.at(start + 2 * SECOND)).await;
        assert_eq!(Instant::now(), start + 2 * SECOND);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_in_the_past_resolves_at_once() {
        let deadlines = Deadlines::new();
        tokio::time::sleep(SECOND).await;
        let before = Instant::now();
        reach(deadlines.at(before - SECOND / 2)).await;
        assert_eq!(Instant::now(), before);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_beyond_the_clock_range_waits_instead_of_panicking() {
        let deadlines = Deadlines::new();
        let never = tokio::time::timeout(SECOND, deadlines.after(Duration::MAX)).await;
        assert!(never.is_err());
        assert!(later(Instant::now(), Duration::MAX) > Instant::now() + FAR_OFF / 2);
    }

    /// A task out of cooperative budget gets `Pending` from tokio's timers
    /// without them taking its waker; the deadline must still fire.
    #[tokio::test(start_paused = true)]
    async fn a_deadline_first_polled_out_of_budget_still_fires() {
        let deadlines = Deadlines::new();
        let start = Instant::now();
        let mut deadline = std::pin::pin!(deadlines.at(start + SECOND));
        std::future::poll_fn(|cx| {
            // Spend the budget of this poll of the task, then poll the
            // deadline for the first time.
            while std::pin::pin!(tokio::task::consume_budget())
                .poll(cx)
                .is_ready()
            {}
            assert!(deadline.as_mut().poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        reach(deadline).await;
        assert_eq!(Instant::now(), start + SECOND);
    }

    #[tokio::test(start_paused = true)]
    async fn hyper_sleeps_use_the_same_timer() {
        use hyper::rt::Timer;
        let deadlines = Deadlines::new();
        let start = Instant::now();
        reach(deadlines.sleep(2 * SECOND)).await;
        assert_eq!(Instant::now(), start + 2 * SECOND);
        reach(deadlines.sleep_until((start + 5 * SECOND).into_std())).await;
        assert_eq!(Instant::now(), start + 5 * SECOND);
    }
}
