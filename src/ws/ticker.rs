//! The heartbeat's clock in a connection's writer.
//!
//! The writer asks whether a ping is due at every wake-up: each time frames
//! arrive, and again before each write. A `tokio::time::Interval` answers by
//! polling its timer, which re-registers the task's waker and spends the
//! task's budget, about 150 instructions each time; with chat-like traffic,
//! where every message wakes every member's writer for a write of its own,
//! that was a fifth of the gateway's work per delivery. Once the timer holds
//! the task's waker, the timer's own state says whether it went off, and
//! reading it is one atomic load.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Goes off every `period`, the next period counted from when it was seen
/// going off (a late tick is not made up for: a ping is due, not owed).
pub struct Ticker {
    sleep: Pin<Box<Sleep>>,
    period: Duration,
    /// The waker the timer holds: set by a poll that left it waiting.
    /// While the same task asks, the timer's state is enough.
    armed: Option<Waker>,
}

impl Ticker {
    /// First goes off one `period` from now.
    pub fn new(period: Duration) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep_until(Instant::now() + period)),
            period,
            armed: None,
        }
    }

    /// Ready once per period; the task of `cx` is woken when it is due.
    pub fn poll_tick(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(waker) = &self.armed
            && waker.will_wake(cx.waker())
            && !self.sleep.is_elapsed()
        {
            return Poll::Pending;
        }
        // Outside the task's budget: a timer polled on an exhausted budget
        // answers `Pending` without taking the waker, and then the timer's
        // state would never change for it.
        let mut poll = tokio::task::coop::unconstrained(self.sleep.as_mut());
        match Pin::new(&mut poll).poll(cx) {
            Poll::Ready(()) => {
                self.sleep.as_mut().reset(Instant::now() + self.period);
                self.armed = None;
                Poll::Ready(())
            }
            Poll::Pending => {
                self.armed = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// Waits for the next tick.
    pub async fn tick(&mut self) {
        std::future::poll_fn(|cx| self.poll_tick(cx)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    const PERIOD: Duration = Duration::from_secs(30);

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting() -> (Arc<Counter>, Waker) {
        let counter = Arc::new(Counter::default());
        (counter.clone(), Waker::from(counter))
    }

    /// Lets the paused clock's timer run whatever fell due.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ticks_once_per_period_and_wakes_the_waiting_task() {
        let mut ticker = Ticker::new(PERIOD);
        let (woken, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        for period in 1..=3 {
            assert!(ticker.poll_tick(&mut cx).is_pending(), "period {period}");
            tokio::time::advance(PERIOD - Duration::from_secs(1)).await;
            settle().await;
            assert!(ticker.poll_tick(&mut cx).is_pending(), "early in {period}");
            assert_eq!(woken.0.load(Ordering::SeqCst), period - 1);
            tokio::time::advance(Duration::from_secs(1)).await;
            settle().await;
            assert_eq!(woken.0.load(Ordering::SeqCst), period, "woken at {period}");
            assert!(ticker.poll_tick(&mut cx).is_ready(), "due at {period}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_tick_is_not_made_up_for() {
        let mut ticker = Ticker::new(PERIOD);
        tokio::time::advance(PERIOD * 5 / 2).await;
        ticker.tick().await;
        let (_, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        assert!(ticker.poll_tick(&mut cx).is_pending(), "one tick only");
        tokio::time::advance(PERIOD - Duration::from_secs(1)).await;
        settle().await;
        assert!(ticker.poll_tick(&mut cx).is_pending(), "a period after it");
    }

    #[tokio::test(start_paused = true)]
    async fn another_waker_is_registered_and_woken() {
        let mut ticker = Ticker::new(PERIOD);
        let (first, first_waker) = counting();
        let (second, second_waker) = counting();
        assert!(
            ticker
                .poll_tick(&mut Context::from_waker(&first_waker))
                .is_pending()
        );
        assert!(
            ticker
                .poll_tick(&mut Context::from_waker(&second_waker))
                .is_pending()
        );
        tokio::time::advance(PERIOD).await;
        settle().await;
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_poll_on_an_exhausted_budget_still_arms_the_timer() {
        let mut ticker = Ticker::new(PERIOD);
        let (woken, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        // Spends the task's budget, as a busy writer would, then asks.
        while tokio::task::coop::has_budget_remaining() {
            tokio::task::coop::consume_budget().await;
        }
        assert!(ticker.poll_tick(&mut cx).is_pending());
        tokio::task::yield_now().await;
        tokio::time::advance(PERIOD).await;
        settle().await;
        assert_eq!(
            woken.0.load(Ordering::SeqCst),
            1,
            "the timer took the waker"
        );
        assert!(ticker.poll_tick(&mut cx).is_ready());
    }
}
