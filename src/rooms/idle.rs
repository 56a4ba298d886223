//! The queue of empty rooms waiting for `idle_timeout_secs` to pass.
//!
//! Every room waits the same time, so the order in which rooms became empty
//! is also the order in which they expire: a queue in emptying order serves
//! both the sweeper (the first entry is the next one due) and the bound on
//! waiting rooms (the first entry is the one that has waited longest).
//! Entries are keyed by a ticket drawn from a counter, which the room keeps
//! while it waits, so a room that gets a member again leaves the queue at
//! once and never counts against the bound.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Room;

/// Empty rooms kept waiting for `idle_timeout_secs` at most; when one more
/// becomes empty, the one that has waited longest is freed at once. At
/// about 600 bytes each (`docs/nats.md`) that holds them to some 6 MB,
/// whatever clients do: without a bound, one client joining and leaving
/// fresh room names in a loop leaves thousands of empty rooms a second
/// behind it, each kept for the idle timeout (an hour by default). A room
/// freed early loses nothing but its `created` time: it has no members and
/// no NATS interest, and the next join makes it again.
pub const MAX_EMPTY_ROOMS: usize = 10_000;

/// Identifies one stay of one room in the queue. A room emptied again gets
/// a new ticket, so an entry taken out of the queue can tell whether its
/// room is still in the stay it was queued for.
pub(super) type Ticket = u64;

/// A room taken out of the queue, with the ticket of the stay it was
/// queued for.
pub(super) struct Waiting {
    pub(super) ticket: Ticket,
    pub(super) room: Arc<Room>,
}

/// Empty rooms in the order they became empty.
pub(super) struct IdleQueue {
    /// Ordered by ticket, which follows emptying time: tickets are drawn
    /// and the clock is read under the same lock.
    rooms: BTreeMap<Ticket, (Instant, Arc<Room>)>,
    next: Ticket,
    limit: usize,
}

impl IdleQueue {
    /// An empty queue that holds at most `limit` rooms.
    pub(super) fn new(limit: usize) -> Self {
        Self {
            rooms: BTreeMap::new(),
            next: 0,
            limit,
        }
    }

    /// Queues `room`, which just became empty. Returns its ticket and, when
    /// the queue was full, the room that has waited longest, taken out to be
    /// freed now.
    pub(super) fn push(&mut self, room: Arc<Room>) -> (Ticket, Option<Waiting>) {
        let ticket = self.next;
        self.next += 1;
        self.rooms.insert(ticket, (Instant::now(), room));
        let evicted = if self.rooms.len() > self.limit {
            self.pop_first()
        } else {
            None
        };
        (ticket, evicted)
    }

    /// Takes a room out of the queue because it got a member again.
    pub(super) fn cancel(&mut self, ticket: Ticket) {
        self.rooms.remove(&ticket);
    }

    /// Takes out the room that has waited longest if it has waited
    /// `timeout`; otherwise returns when it will have (`None`: no room
    /// waits).
    pub(super) fn pop_due(&mut self, timeout: Duration) -> Result<Waiting, Option<Instant>> {
        let (_, (since, _)) = self.rooms.first_key_value().ok_or(None)?;
        let due = *since + timeout;
        if due > Instant::now() {
            return Err(Some(due));
        }
        self.pop_first().ok_or(None)
    }

    /// Whether no room waits.
    pub(super) fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }

    fn pop_first(&mut self) -> Option<Waiting> {
        let (ticket, (_, room)) = self.rooms.pop_first()?;
        Some(Waiting { ticket, room })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rooms::RoomName;

    fn room(name: &str) -> Arc<Room> {
        Arc::new(Room::new(RoomName::parse(name).expect("valid name")))
    }

    fn name(waiting: &Waiting) -> &str {
        waiting.room.name().as_str()
    }

    #[test]
    fn a_full_queue_gives_up_the_room_that_waited_longest() {
        let mut queue = IdleQueue::new(2);
        assert!(queue.push(room("a")).1.is_none());
        assert!(queue.push(room("b")).1.is_none());
        let (_, evicted) = queue.push(room("c"));
        assert_eq!(evicted.as_ref().map(name), Some("a"));
        let (_, evicted) = queue.push(room("d"));
        assert_eq!(evicted.as_ref().map(name), Some("b"));
        assert_eq!(queue.rooms.len(), 2);
    }

    #[test]
    fn a_cancelled_room_no_longer_counts_or_gets_evicted() {
        let mut queue = IdleQueue::new(2);
        let (a, _) = queue.push(room("a"));
        queue.push(room("b"));
        queue.cancel(a);
        assert!(queue.push(room("c")).1.is_none(), "a left, so b and c fit");
        let (_, evicted) = queue.push(room("d"));
        assert_eq!(evicted.as_ref().map(name), Some("b"));
    }

    #[test]
    fn rooms_come_due_in_the_order_they_emptied() {
        let mut queue = IdleQueue::new(10);
        assert!(matches!(queue.pop_due(Duration::ZERO), Err(None)));
        queue.push(room("a"));
        queue.push(room("b"));
        let later = queue.pop_due(Duration::from_secs(60));
        assert!(matches!(later, Err(Some(_))), "not due for a minute");
        let first = queue.pop_due(Duration::ZERO).ok();
        assert_eq!(first.as_ref().map(name), Some("a"));
        let second = queue.pop_due(Duration::ZERO).ok();
        assert_eq!(second.as_ref().map(name), Some("b"));
        assert!(queue.is_empty());
    }
}
