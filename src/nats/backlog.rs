//! Messages taken from NATS that wait to be delivered, bounded in bytes.
//!
//! async-nats keeps each subscription's messages in a channel bounded in
//! count only (`SUBSCRIPTION_CAPACITY` messages), and a message may be as
//! large as the server's `max_payload` (1 MB by default, up to 64 MB). A
//! backend that publishes large payloads faster than they become frames
//! (a wrapped payload of control characters grows sixfold when escaped)
//! would fill that channel with gigabytes. So each delivery task takes
//! whatever has arrived on its channel before each run it handles, and
//! what the run does not take waits in its [`Backlog`]. The backlogs of
//! all tasks share one [`Budget`] ([`budget_bytes`]): once it is spent, a
//! message is dropped and counted as `nats_slow_consumer`, as async-nats
//! counts the messages it drops from a full channel.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_nats::Message;
use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use prometheus::IntCounter;

use crate::rooms::{Handed, QueueLimits};

/// The least the backlogs may hold together.
const MIN_BUDGET: usize = 64 * 1024 * 1024;

/// The bytes the backlogs of all delivery tasks may hold together: four
/// send queues, at least 64 MiB (the default). A burst longer than a send
/// queue still reaches the members that keep up, since they get turns to
/// take it (see `QueueLimits::turn`), and no flood of 1 MB payloads goes
/// past it.
pub fn budget_bytes(queue: QueueLimits) -> usize {
    queue.bytes.saturating_mul(4).max(MIN_BUDGET)
}

/// What a waiting message costs besides its subject, headers and payload
/// (async-nats' `length`): its queue slot, an `async_nats::Message` (184
/// bytes in async-nats 0.51) and its cost.
const MESSAGE_OVERHEAD: usize = 256;

/// What a parsed header value costs beside its bytes on the wire: its
/// share of the map's entry and the allocations of its name and value.
const HEADER_VALUE_OVERHEAD: usize = 128;

/// Most messages taken from the channels at one look: more than the three
/// full channels of the fixed subscriptions, so one look empties them,
/// but a bound while they refill.
const MAX_TAKEN: usize = 4 * super::SUBSCRIPTION_CAPACITY;

/// Slots an empty backlog keeps rather than give back: what a few runs
/// need, so that a busy room does not allocate anew for each burst.
const KEPT_SLOTS: usize = 1024;

/// The byte budget the backlogs of all delivery tasks share.
pub struct Budget {
    held: AtomicUsize,
    max: usize,
    dropped: IntCounter,
}

impl Budget {
    /// A budget of `max` bytes; `dropped` counts the messages refused.
    pub fn new(max: usize, dropped: IntCounter) -> Arc<Self> {
        Arc::new(Self {
            held: AtomicUsize::new(0),
            max,
            dropped,
        })
    }

    /// Takes `bytes` from the budget while any of it is left; false once
    /// it is spent. A message larger than what is left still goes in, so
    /// one larger than the whole budget is delivered rather than always
    /// dropped, and the budget is overdrawn by that one message at most.
    fn reserve(&self, bytes: usize) -> bool {
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (held < self.max).then(|| held.saturating_add(bytes))
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// One delivery task's waiting messages, oldest first.
pub struct Backlog {
    queue: VecDeque<(Message, usize)>,
    budget: Arc<Budget>,
}

impl Backlog {
    /// An empty backlog drawing on `budget`.
    pub fn new(budget: Arc<Budget>) -> Self {
        Self {
            queue: VecDeque::new(),
            budget,
        }
    }

    /// Queues `message`, or drops and counts it when the budget is spent.
    pub fn admit(&mut self, mut message: Message) {
        let cost = cost_of(&message);
        if !self.budget.reserve(cost) {
            self.budget.dropped.inc();
            return;
        }
        // A payload is a slice of async-nats' read buffer, which holds the
        // messages read with it: kept as it is, even a small one would keep
        // a large one dropped beside it in memory. Copying costs nothing
        // the common case pays: a run takes what it can without the backlog.
        message.payload = Bytes::copy_from_slice(&message.payload);
        self.queue.push_back((message, cost));
    }

    /// Takes what has arrived on `messages`, without waiting: into `run`
    /// while it is under `limit` (counted in `taken`) and nothing waits
    /// here, so that the order stays the channel's; the rest is admitted
    /// to the backlog. Returns whether the stream has ended. A run that
    /// takes all that arrived, as most do, never touches the budget.
    ///
    /// Outside tokio's cooperative budget: within one poll of its task the
    /// channel would otherwise seem empty after 128 messages, and a task
    /// busy with large messages polls seldom, so the channel would fill.
    /// The look is bounded by [`MAX_TAKEN`] instead.
    pub fn take_arrived(
        &mut self,
        messages: &mut (impl Stream<Item = Message> + Unpin),
        run: &mut Vec<Message>,
        taken: &mut Handed,
        limit: Handed,
    ) -> bool {
        for _ in 0..MAX_TAKEN {
            match tokio::task::unconstrained(messages.next()).now_or_never() {
                Some(Some(message)) if self.queue.is_empty() && !taken.reached(limit) => {
                    taken.add(message.payload.len());
                    run.push(message);
                }
                Some(Some(message)) => self.admit(message),
                Some(None) => return true,
                None => break,
            }
        }
        false
    }

    /// Starts `run` with the oldest waiting messages, until they reach
    /// `limit` (at least one if any waits), and returns what they count.
    pub fn take_run(&mut self, run: &mut Vec<Message>, limit: Handed) -> Handed {
        let mut taken = Handed::default();
        while !taken.reached(limit) {
            let Some((message, cost)) = self.queue.pop_front() else {
                break;
            };
            self.budget.release(cost);
            taken.add(message.payload.len());
            run.push(message);
        }
        if self.queue.is_empty() && self.queue.capacity() > KEPT_SLOTS {
            // A burst's slots would otherwise stay for the life of the
            // room's subscription, uncounted: 48 MiB after 250,000
            // messages of one byte.
            self.queue = VecDeque::new();
        }
        taken
    }

    /// Drops every message waiting for a subscription being dropped, here
    /// and in its channel (taken without waiting, as [`Backlog::take_arrived`]
    /// takes them, and as boundedly: more keep coming until it is dropped),
    /// and says how many there were.
    pub fn discard(&mut self, messages: &mut (impl Stream<Item = Message> + Unpin)) -> usize {
        let mut left = self.queue.len();
        let held = self.queue.drain(..).map(|(_, cost)| cost).sum();
        self.budget.release(held);
        while left < MAX_TAKEN
            && let Some(Some(_)) = tokio::task::unconstrained(messages.next()).now_or_never()
        {
            left += 1;
        }
        left
    }
}

/// What `message` holds while it waits: its length on the wire (subject,
/// reply subject, headers, payload), the message itself, and for each
/// header value the map entry and strings it was parsed into, which come
/// to far more than the few bytes a short field takes on the wire.
fn cost_of(message: &Message) -> usize {
    let values: usize = message.headers.as_ref().map_or(0, |headers| {
        headers.iter().map(|(_, values)| values.len()).sum()
    });
    message
        .length
        .saturating_add(MESSAGE_OVERHEAD)
        .saturating_add(values.saturating_mul(HEADER_VALUE_OVERHEAD))
}

impl Drop for Backlog {
    fn drop(&mut self) {
        let held = self.queue.iter().map(|(_, cost)| cost).sum();
        self.budget.release(held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload_len: usize) -> Message {
        Message {
            subject: "roomgate.all".into(),
            reply: None,
            payload: vec![b'x'; payload_len].into(),
            headers: None,
            status: None,
            description: None,
            length: "roomgate.all".len() + payload_len,
        }
    }

    fn budget(max: usize) -> (Arc<Budget>, IntCounter) {
        let dropped = IntCounter::new("dropped", "messages dropped").expect("counter");
        (Budget::new(max, dropped.clone()), dropped)
    }

    #[test]
    fn backlogs_share_one_budget_and_drop_what_does_not_fit() {
        let (budget, dropped) = budget(3 * (1000 + 12 + MESSAGE_OVERHEAD));
        let mut a = Backlog::new(budget.clone());
        let mut b = Backlog::new(budget.clone());
        a.admit(message(1000));
        a.admit(message(1000));
        b.admit(message(1000));
        a.admit(message(1000));
        assert_eq!(dropped.get(), 1, "the fourth went past the shared budget");
        let mut run = Vec::new();
        let taken = a.take_run(
            &mut run,
            Handed {
                frames: 1,
                bytes: usize::MAX,
            },
        );
        assert_eq!((taken.frames, run.len()), (1, 1));
        a.admit(message(1000));
        assert_eq!(dropped.get(), 1, "taking one made room for one");
        drop(a);
        assert_eq!(
            budget.held.load(Ordering::Relaxed),
            1000 + 12 + MESSAGE_OVERHEAD,
            "a backlog dropped gives back what it held"
        );
    }

    #[test]
    fn the_budget_is_overdrawn_by_one_message_at_most_however_many_backlogs_share_it() {
        let (budget, dropped) = budget(1024 * 1024);
        let mut backlogs: Vec<Backlog> = (0..100).map(|_| Backlog::new(budget.clone())).collect();
        for backlog in &mut backlogs {
            backlog.admit(message(1024 * 1024));
        }
        assert_eq!(dropped.get(), 99, "one let in, the others dropped");
        assert!(budget.held.load(Ordering::Relaxed) < 2 * 1024 * 1024 + 1024);
    }

    #[test]
    fn what_the_budget_refuses_leaves_a_gap_not_a_reordering() {
        let cost = "roomgate.all".len() + 1 + MESSAGE_OVERHEAD;
        let (budget, dropped) = budget(2 * cost);
        let mut backlog = Backlog::new(budget);
        let two = Handed {
            frames: 2,
            bytes: usize::MAX,
        };
        let mut arrived =
            futures_util::stream::iter((1..=6).map(message)).chain(futures_util::stream::pending());
        let (mut run, mut taken) = (Vec::new(), Handed::default());
        backlog.take_arrived(&mut arrived, &mut run, &mut taken, two);
        let mut order: Vec<usize> = run.drain(..).map(|m| m.payload.len()).collect();
        backlog.take_run(&mut run, two);
        order.extend(run.drain(..).map(|m| m.payload.len()));
        assert_eq!(order, [1, 2, 3, 4], "the run's two, then the two let in");
        assert_eq!(dropped.get(), 2, "5 and 6 found the budget spent");
    }

    #[test]
    fn each_header_value_counts_what_its_parsed_form_holds() {
        let plain = message(10);
        let mut headed = message(10);
        let mut headers = async_nats::HeaderMap::new();
        for i in 0..100 {
            headers.insert(format!("h{i}").as_str(), "v");
        }
        headed.headers = Some(headers);
        assert_eq!(
            cost_of(&headed) - cost_of(&plain),
            100 * HEADER_VALUE_OVERHEAD
        );
    }

    #[test]
    fn an_emptied_backlog_gives_back_the_slots_of_a_burst() {
        let (budget, _) = budget(usize::MAX);
        let mut backlog = Backlog::new(budget);
        for _ in 0..10 * KEPT_SLOTS {
            backlog.admit(message(1));
        }
        let mut run = Vec::new();
        let all = Handed {
            frames: usize::MAX,
            bytes: usize::MAX,
        };
        backlog.take_run(&mut run, all);
        assert_eq!(run.len(), 10 * KEPT_SLOTS);
        assert!(
            backlog.queue.capacity() <= KEPT_SLOTS,
            "the slots went back"
        );
    }

    #[test]
    fn a_payload_let_in_does_not_keep_the_read_buffer_it_came_from() {
        let (budget, _) = budget(usize::MAX);
        let mut backlog = Backlog::new(budget);
        let buffer = Bytes::from(vec![b'x'; 1024 * 1024]);
        let mut small = message(0);
        small.payload = buffer.slice(10..13);
        backlog.admit(small);
        let mut run = Vec::new();
        let mut limit = Handed::default();
        limit.add(usize::MAX);
        backlog.take_run(&mut run, limit);
        let kept = &run[0].payload;
        assert_eq!(&kept[..], b"xxx");
        assert!(
            !buffer.as_ptr_range().contains(&kept.as_ptr()),
            "a copy, not a slice of the large buffer"
        );
    }

    #[test]
    fn a_message_larger_than_the_budget_is_let_in_when_nothing_is_held() {
        let (budget, dropped) = budget(1024);
        let mut backlog = Backlog::new(budget);
        backlog.admit(message(64 * 1024));
        backlog.admit(message(10));
        assert_eq!(dropped.get(), 1, "the second waits for the first");
        let mut run = Vec::new();
        backlog.take_run(
            &mut run,
            Handed {
                frames: 8,
                bytes: 1,
            },
        );
        assert_eq!(run.len(), 1, "a run takes at least one, up to the bytes");
        backlog.admit(message(10));
        assert_eq!(dropped.get(), 1, "the budget came back when it was taken");
    }

    #[test]
    fn what_has_arrived_fills_the_run_then_waits_in_order() {
        let (budget, dropped) = budget(usize::MAX);
        let mut backlog = Backlog::new(budget);
        let two = Handed {
            frames: 2,
            bytes: usize::MAX,
        };
        let sizes = |run: &mut Vec<Message>| -> Vec<usize> {
            run.drain(..).map(|m| m.payload.len()).collect()
        };
        let mut open =
            futures_util::stream::iter((1..=5).map(message)).chain(futures_util::stream::pending());
        let mut run = Vec::new();
        let mut taken = Handed::default();
        assert!(!backlog.take_arrived(&mut open, &mut run, &mut taken, two));
        assert_eq!(sizes(&mut run), [1, 2], "the run takes up to its limit");
        assert_eq!(backlog.queue.len(), 3, "the rest waits");

        // Older messages wait in the backlog: a new arrival goes behind
        // them, even when the run has room.
        let mut ended = futures_util::stream::iter(vec![message(6)]);
        let mut taken = backlog.take_run(&mut run, two);
        assert_eq!(taken.frames, 2);
        assert!(
            backlog.take_arrived(&mut ended, &mut run, &mut taken, two),
            "ended"
        );
        assert_eq!(sizes(&mut run), [3, 4]);
        let taken = backlog.take_run(&mut run, two);
        assert_eq!(sizes(&mut run), [5, 6], "in the channel's order");
        assert_eq!(taken.frames, 2);
        let nothing = backlog.take_run(&mut run, two);
        assert_eq!(nothing, Handed::default(), "nothing left");
        assert_eq!(dropped.get(), 0);
    }
}
