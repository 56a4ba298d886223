//! The round trip that tells the bridge the server has taken the
//! subscriptions it sent, so that joins are answered only then.
//!
//! The round trip is a request to an inbox nobody should listen on, which
//! the server answers ("no responders") once it has taken everything sent
//! before it. It can go unanswered for good: the user may not publish to
//! `_INBOX.>`, or another client subscribes to `>` or `_INBOX.>` (a
//! debugging tap) and takes the request without answering it. After a few
//! such rounds in a row joins stop waiting for it, and are answered once
//! their subscriptions are sent; a request still goes out in the
//! background now and then with a confirmation, ever less often while they
//! go unanswered, and the first one answered brings the round trips back,
//! as does a reconnection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use async_nats::{Client, RequestErrorKind};
use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::refused;

/// How long a confirmation waits for its answer; a stalled server
/// delays joins by this much at most.
pub(super) const ANSWER_WAIT: Duration = Duration::from_millis(500);

/// How long a request sent in the background waits for its answer, and
/// the first wait before the next one; each unanswered one doubles it.
const BACKGROUND_WAIT: Duration = Duration::from_secs(5);

/// The longest wait between requests sent in the background: a user that
/// may not publish to `_INBOX.>` draws a refusal from the server with
/// each.
const LAST_BACKGROUND_WAIT: Duration = Duration::from_secs(300);

/// Confirmations that may go unanswered in a row before joins stop waiting
/// for them: one lost to a slow moment is no sign that none will be
/// answered.
const UNANSWERED_LIMIT: u32 = 3;

/// What a request sent in the background has found so far.
const IDLE: u8 = 0;
const PENDING: u8 = 1;
const ANSWERED: u8 = 2;

/// Whether confirmations are waited for, and since when not.
#[derive(Default)]
pub(super) struct RoundTrips {
    /// Confirmations unanswered in a row.
    unanswered: u32,
    /// Set while joins do not wait.
    off: Option<Off>,
}

/// Joins do not wait for round trips.
struct Off {
    /// The client's connection count when they stopped.
    connects: u64,
    /// What the request sent in the background found.
    background: Arc<AtomicU8>,
    /// When the next may be sent, and the wait after it.
    next: Instant,
    wait: Duration,
}

impl RoundTrips {
    /// Confirms what `client` has sent so far: by a round trip while they
    /// are answered, else by a flush of the client's buffer and now and
    /// then a request in the background, whose answer brings the round
    /// trips back (see [`Off::flush_and_ask`]).
    pub(super) async fn confirm(
        &mut self,
        client: &Client,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) {
        let connects = client.statistics().connects.load(Ordering::Relaxed);
        if let Some(off) = self.still_off(connects) {
            off.flush_and_ask(client, tasks, stop).await;
            return;
        }
        let answered = tokio::time::timeout(ANSWER_WAIT, probe(client))
            .await
            .unwrap_or(false);
        if answered {
            self.unanswered = 0;
        } else {
            self.note_unanswered(connects);
        }
    }

    /// Counts a confirmation that went unanswered; at the limit, joins stop
    /// waiting for them.
    fn note_unanswered(&mut self, connects: u64) {
        self.unanswered += 1;
        debug!(unanswered = self.unanswered, "subscriptions not confirmed");
        if self.unanswered < UNANSWERED_LIMIT {
            return;
        }
        warn!(
            "NATS did not confirm new room subscriptions {UNANSWERED_LIMIT} times in a row \
             (may this user publish to _INBOX.>? does another client subscribe to > or \
             _INBOX.> without answering?); joins are answered once their subscriptions \
             are sent, until a confirmation is answered again"
        );
        self.off = Some(Off {
            connects,
            background: Arc::new(AtomicU8::new(IDLE)),
            next: Instant::now(),
            wait: BACKGROUND_WAIT,
        });
        self.unanswered = 0;
    }

    /// Starts over, for a new client.
    pub(super) fn reset(&mut self) {
        *self = Self::default();
    }

    /// The state of the fallback while joins do not wait; `None` once they
    /// do again: the client has reconnected since, or a request was
    /// answered.
    fn still_off(&mut self, connects: u64) -> Option<&mut Off> {
        let off = self.off.as_ref()?;
        if off.connects != connects {
            self.off = None;
            return None;
        }
        if off.background.load(Ordering::Relaxed) == ANSWERED {
            info!("NATS confirms new room subscriptions again; joins wait for them again");
            self.off = None;
            return None;
        }
        self.off.as_mut()
    }
}

impl Off {
    /// Flushes the client's buffer, and sends a request in the background
    /// (on `tasks`, until answered, given up, or `stop`) unless one is
    /// under way or the next is not due yet.
    async fn flush_and_ask(
        &mut self,
        client: &Client,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) {
        let _ = tokio::time::timeout(ANSWER_WAIT, client.flush()).await;
        if !self.take_turn(Instant::now()) {
            return;
        }
        tasks.spawn(request_in_background(
            client.clone(),
            self.background.clone(),
            stop.clone(),
        ));
    }

    /// Whether a request may be sent in the background at `now`: none is
    /// under way and the wait since the last has passed. If so, marks it
    /// under way and doubles the wait before the next, up to
    /// [`LAST_BACKGROUND_WAIT`].
    fn take_turn(&mut self, now: Instant) -> bool {
        if self.background.load(Ordering::Relaxed) != IDLE || self.next > now {
            return false;
        }
        self.background.store(PENDING, Ordering::Relaxed);
        self.next = now + self.wait;
        self.wait = (self.wait * 2).min(LAST_BACKGROUND_WAIT);
        true
    }
}

/// One round trip: whether the server (or anyone) answered it. A refusal
/// of the request's subject is reported by the server's error, which
/// `refused` recognises by the subject's last token.
async fn probe(client: &Client) -> bool {
    let subject = format!("{}.{}", client.new_inbox(), refused::PROBE);
    match client.request(subject, Bytes::new()).await {
        Ok(_) => true,
        Err(e) => e.kind() == RequestErrorKind::NoResponders,
    }
}

/// A round trip that marks `background` answered, or idle again when it
/// goes unanswered or `stop` comes first.
async fn request_in_background(client: Client, background: Arc<AtomicU8>, stop: CancellationToken) {
    let answered = tokio::select! {
        _ = stop.cancelled() => false,
        answer = tokio::time::timeout(BACKGROUND_WAIT, probe(&client)) => answer.unwrap_or(false),
    };
    background.store(if answered { ANSWERED } else { IDLE }, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Joins stop waiting after the limit; the fallback's first request may
    /// go at once.
    fn turned_off() -> RoundTrips {
        let mut trips = RoundTrips::default();
        for _ in 0..UNANSWERED_LIMIT {
            assert!(trips.off.is_none(), "off before the limit");
            trips.note_unanswered(1);
        }
        assert!(trips.off.is_some(), "off at the limit");
        trips
    }

    #[test]
    fn background_requests_wait_ever_longer_up_to_the_last_wait() {
        let mut trips = turned_off();
        let off = trips.still_off(1).expect("off");
        let mut now = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..9 {
            assert!(off.take_turn(now), "due at {now:?}");
            // Under way: no second request, however late.
            assert!(!off.take_turn(now + LAST_BACKGROUND_WAIT * 2));
            // Unanswered: the next waits until its time, not a moment less.
            off.background.store(IDLE, Ordering::Relaxed);
            let wait = off.next - now;
            assert!(!off.take_turn(now + wait - Duration::from_millis(1)));
            waits.push(wait.as_secs());
            now += wait;
        }
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn an_answer_or_a_reconnection_brings_the_round_trips_back() {
        let mut trips = turned_off();
        assert!(trips.still_off(1).is_some(), "same connection, no answer");
        assert!(trips.still_off(2).is_none(), "a reconnection ends it");
        assert!(trips.still_off(2).is_none(), "and it stays ended");

        let mut trips = turned_off();
        let off = trips.still_off(1).expect("off");
        assert!(off.take_turn(Instant::now()));
        off.background.store(ANSWERED, Ordering::Relaxed);
        assert!(trips.still_off(1).is_none(), "an answer ends it");
    }
}
