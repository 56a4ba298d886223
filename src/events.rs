//! What the gateway tells backends: client messages, presence and connection
//! lifecycle events, answers to control requests, plus changes in which
//! rooms have local members.
//!
//! Sessions and rooms hand events over without waiting: a queue bounded in
//! events and in bytes feeds the NATS bridge, and a full queue (NATS slow
//! or down) drops the event and counts it in
//! `roomgate_nats_publish_errors_total`. The byte bound matters because a
//! client message's event holds its content: at the default 64 KiB per
//! message, a queue full of them would otherwise hold a gigabyte. Room interest
//! changes are not queued but collected in a set, so a client that joins and
//! leaves in a loop cannot grow memory: the bridge reconciles each room
//! against its current state, however many times it changed. The set is
//! bounded too, for a bridge held up by a slow NATS while clients churn
//! through fresh room names: past [`MAX_INTEREST`] rooms it is replaced by
//! one flag, and the bridge then reconciles every room that may need it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prometheus::IntCounter;
use tokio::sync::{Notify, mpsc};

use crate::protocol::PresenceKind;
use crate::rooms::{Connection, RoomName};
use crate::sync::lock;

/// One thing to publish.
#[derive(Debug)]
pub enum Event {
    /// A client's message to a room (`<prefix>.message.<room>`).
    Message {
        /// The room.
        room: RoomName,
        /// The `content` value as raw JSON.
        content: Bytes,
        /// The sender.
        from: Arc<Connection>,
        /// Unix milliseconds.
        ts: u64,
    },
    /// A member joined or left (`<prefix>.presence.<room>`).
    Presence {
        /// The room.
        room: RoomName,
        /// Join or leave.
        kind: PresenceKind,
        /// The member.
        conn: Arc<Connection>,
        /// Unix milliseconds.
        ts: u64,
    },
    /// A connection was accepted (`<prefix>.connection.open`).
    ConnectionOpen {
        /// The connection.
        conn: Arc<Connection>,
        /// Unix milliseconds.
        ts: u64,
    },
    /// A connection ended (`<prefix>.connection.close`).
    ConnectionClose {
        /// The connection.
        conn: Arc<Connection>,
        /// The close code.
        code: u16,
        /// Unix milliseconds.
        ts: u64,
    },
    /// The answer to a backend's control request. It goes through this
    /// queue, not straight to NATS, so that it leaves after the room
    /// interest the request changed: a backend told `{"ok":true}` for a
    /// `control.join` can broadcast to the room at once.
    Reply {
        /// The request's reply subject.
        subject: String,
        /// The JSON answer.
        body: Bytes,
    },
}

/// Rooms whose interest changes are collected one by one; beyond this
/// many the bridge is told to reconcile everything instead.
pub const MAX_INTEREST: usize = 64 * 1024;

/// What an event counts against the queue's byte budget besides the
/// bytes it carries: its own size, the room name, the connection it holds.
const EVENT_OVERHEAD: usize = 256;

impl Event {
    /// The bytes this event holds while queued, as counted against the
    /// queue's byte budget.
    fn weight(&self) -> usize {
        let carried = match self {
            Event::Message { content, .. } => content.len(),
            Event::Reply { subject, body } => subject.len() + body.len(),
            _ => 0,
        };
        carried.saturating_add(EVENT_OVERHEAD)
    }
}

/// Unix time in milliseconds, for the `ts` fields.
pub fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// `t` in Unix milliseconds, the unit of every time the gateway reports
/// (0 for a clock set before 1970).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Rooms whose interest changed since the bridge last looked.
#[derive(Default)]
struct Interest {
    rooms: HashSet<RoomName>,
    /// More than [`MAX_INTEREST`] rooms changed: `rooms` was let go, and
    /// any room may have changed.
    overflowed: bool,
}

impl Interest {
    fn note(&mut self, room: &RoomName) {
        if self.overflowed || self.rooms.contains(room) {
            return;
        }
        if self.rooms.len() >= MAX_INTEREST {
            self.rooms = HashSet::new();
            self.overflowed = true;
            return;
        }
        self.rooms.insert(room.clone());
    }
}

struct Shared {
    interest: Mutex<Interest>,
    wake: Notify,
    dropped: IntCounter,
    /// The weight of the events queued now.
    queued_bytes: AtomicUsize,
    /// The most [`Shared::queued_bytes`] may reach, except that an empty
    /// queue takes any one event.
    max_bytes: usize,
}

impl Shared {
    /// Reserves room for `weight` bytes; false when the budget is spent.
    fn reserve(&self, weight: usize) -> bool {
        let before = self.queued_bytes.fetch_add(weight, Ordering::Relaxed);
        if before > 0 && before.saturating_add(weight) > self.max_bytes {
            self.release(weight);
            return false;
        }
        true
    }

    fn release(&self, weight: usize) {
        self.queued_bytes.fetch_sub(weight, Ordering::Relaxed);
    }
}

/// The producer side, held by sessions and rooms. A disabled sink (NATS
/// off) ignores everything at the cost of one branch.
#[derive(Clone, Default)]
pub struct Events {
    inner: Option<(mpsc::Sender<Event>, Arc<Shared>)>,
}

/// The consumer side, owned by the NATS bridge.
pub struct EventStream {
    rx: mpsc::Receiver<Event>,
    shared: Arc<Shared>,
}

/// What the bridge should do next: reconcile `interest` (or every room,
/// with `resync`) first, then publish `event`. The order matters: a
/// presence event must leave after the room's subscription exists, so a
/// backend reacting to it can reach the member.
#[derive(Debug, Default)]
pub struct Work {
    /// Rooms that gained their first or lost their last local member.
    pub interest: Vec<RoomName>,
    /// Too many rooms changed to list them: every room with local members
    /// or a subscription may need reconciling.
    pub resync: bool,
    /// An event to publish.
    pub event: Option<Event>,
}

impl Events {
    /// A sink that drops everything, for a gateway without NATS.
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// A sink with a queue of at most `capacity` events holding at most
    /// `max_bytes` (any one event fits an empty queue); `dropped` counts
    /// what did not fit.
    pub fn channel(capacity: usize, max_bytes: usize, dropped: IntCounter) -> (Self, EventStream) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let shared = Arc::new(Shared {
            interest: Mutex::new(Interest::default()),
            wake: Notify::new(),
            dropped,
            queued_bytes: AtomicUsize::new(0),
            max_bytes,
        });
        (
            Self {
                inner: Some((tx, shared.clone())),
            },
            EventStream { rx, shared },
        )
    }

    /// Whether events go anywhere; lets callers skip building them.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Hands an event to the bridge without waiting; counts it as a publish
    /// error when the queue is full, in events or in bytes.
    pub fn publish(&self, event: Event) {
        let Some((tx, shared)) = &self.inner else {
            return;
        };
        let weight = event.weight();
        if !shared.reserve(weight) {
            shared.dropped.inc();
            return;
        }
        if tx.try_send(event).is_err() {
            shared.release(weight);
            shared.dropped.inc();
        }
    }

    /// Notes that `room` gained its first or lost its last local member.
    pub fn interest_changed(&self, room: &RoomName) {
        if let Some((_, shared)) = &self.inner {
            lock(&shared.interest).note(room);
            shared.wake.notify_one();
        }
    }
}

impl EventStream {
    /// Waits for the next piece of work; `None` once every producer is gone.
    pub async fn next(&mut self) -> Option<Work> {
        loop {
            let work = self.take_interest();
            if !work.interest.is_empty() || work.resync {
                return Some(work);
            }
            tokio::select! {
                biased;
                _ = self.shared.wake.notified() => continue,
                event = self.rx.recv() => {
                    let event = self.taken(event?);
                    return Some(Work { event: Some(event), ..self.take_interest() });
                }
            }
        }
    }

    /// Takes an event without waiting, for draining at shutdown.
    pub fn try_next_event(&mut self) -> Option<Event> {
        let event = self.rx.try_recv().ok()?;
        Some(self.taken(event))
    }

    /// Gives back the budget of an event taken off the queue.
    fn taken(&self, event: Event) -> Event {
        self.shared.release(event.weight());
        event
    }

    /// The interest changes collected so far, as work without an event.
    fn take_interest(&self) -> Work {
        let mut interest = lock(&self.shared.interest);
        let resync = std::mem::take(&mut interest.overflowed);
        let rooms = if interest.rooms.is_empty() {
            Vec::new()
        } else {
            interest.rooms.drain().collect()
        };
        Work {
            interest: rooms,
            resync,
            event: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SlowConsumerPolicy;
    use crate::rooms::{Identity, QueueLimits};
    use crate::shutdown::Shutdown;

    fn message(from: &Arc<Connection>, content_len: usize) -> Event {
        Event::Message {
            room: RoomName::parse("lobby").expect("valid name"),
            content: Bytes::from(vec![b'1'; content_len]),
            from: from.clone(),
            ts: 0,
        }
    }

    fn sender(shutdown: &Shutdown) -> Arc<Connection> {
        Connection::new(
            Identity::default(),
            QueueLimits::new(4, 64),
            SlowConsumerPolicy::Drop,
            shutdown,
        )
    }

    #[tokio::test]
    async fn events_beyond_the_byte_budget_are_dropped_and_counted_until_the_bridge_takes_some() {
        let shutdown = Shutdown::new();
        let from = sender(&shutdown);
        let dropped = IntCounter::new("dropped", "events dropped").expect("counter");
        // Room for the count, but only two 4 KiB messages' worth of bytes.
        let (events, mut stream) =
            Events::channel(100, 2 * (4096 + EVENT_OVERHEAD), dropped.clone());
        for _ in 0..5 {
            events.publish(message(&from, 4096));
        }
        assert_eq!(dropped.get(), 3, "three did not fit the bytes");
        let work = stream.next().await.expect("work");
        assert!(work.event.is_some());
        events.publish(message(&from, 4096));
        assert_eq!(dropped.get(), 3, "taking one made room for one");
        events.publish(message(&from, 4096));
        assert_eq!(dropped.get(), 4);
        assert!(stream.try_next_event().is_some());
        assert!(stream.try_next_event().is_some());
        assert!(stream.try_next_event().is_none());
    }

    #[tokio::test]
    async fn past_the_bound_interest_changes_become_one_resync_then_are_collected_again() {
        let dropped = IntCounter::new("dropped", "events dropped").expect("counter");
        let (events, mut stream) = Events::channel(100, 1024, dropped);
        let room = |i: usize| RoomName::parse(&format!("r{i}")).expect("valid name");
        for i in 0..MAX_INTEREST {
            events.interest_changed(&room(i));
        }
        events.interest_changed(&room(0));
        let work = stream.next().await.expect("work");
        assert!(!work.resync, "a room noted twice counts once");
        assert_eq!(work.interest.len(), MAX_INTEREST);
        for i in 0..=MAX_INTEREST {
            events.interest_changed(&room(i));
        }
        let work = stream.next().await.expect("work");
        assert!(work.resync, "one room too many");
        assert!(work.interest.is_empty(), "the list was let go");
        events.interest_changed(&room(7));
        let work = stream.next().await.expect("work");
        assert!(!work.resync, "the flag is taken once");
        assert_eq!(work.interest, [room(7)]);
    }

    #[test]
    fn an_empty_queue_takes_an_event_larger_than_the_byte_budget() {
        let shutdown = Shutdown::new();
        let from = sender(&shutdown);
        let dropped = IntCounter::new("dropped", "events dropped").expect("counter");
        let (events, mut stream) = Events::channel(100, 1024, dropped.clone());
        events.publish(message(&from, 64 * 1024));
        events.publish(message(&from, 10));
        assert_eq!(dropped.get(), 1, "the second waits for the first");
        let Some(Event::Message { content, .. }) = stream.try_next_event() else {
            panic!("the large message was queued");
        };
        assert_eq!(content.len(), 64 * 1024);
        events.publish(message(&from, 10));
        assert_eq!(dropped.get(), 1, "the budget came back when it was taken");
    }
}
