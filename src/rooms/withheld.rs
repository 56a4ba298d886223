//! The members of one room whose `joined` waits for the room's NATS
//! subscription, and the hub's queue that bounds how long they wait.
//!
//! While NATS is connected, a join to a room this instance has not
//! subscribed yet is answered once the server has the subscription (see
//! docs/nats.md): until then the member is in the room but broadcasts skip
//! it, so that it hears the room from its `joined` on. A stalled server
//! must not hold joins: each room with members waiting has one entry in
//! the hub's [`Overdue`] queue, and when that entry comes due the answers
//! that waited long enough go out anyway.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::Room;
use crate::protocol::Frame;

/// One room's held-back answers.
#[derive(Default)]
pub(super) struct Withheld {
    /// The answers (`joined` frames), in the order the joins came, with
    /// when each came.
    answers: Vec<(Uuid, Frame, Instant)>,
    /// The members among them, for the broadcast walk to skip.
    ids: HashSet<Uuid>,
    /// The number of the room's entry in the [`Overdue`] queue, while it
    /// has one: at most one per room, whatever the number of joins.
    entry: Option<u64>,
    /// The number the next entry gets.
    next_entry: u64,
}

impl Withheld {
    /// Whether no answer waits.
    pub(super) fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }

    /// Whether broadcasts skip member `id`.
    pub(super) fn contains(&self, id: Uuid) -> bool {
        !self.ids.is_empty() && self.ids.contains(&id)
    }

    /// Holds back `answer` for member `id`. Returns the number of a new
    /// entry for the [`Overdue`] queue when the room has none.
    pub(super) fn push(&mut self, id: Uuid, answer: Frame) -> Option<u64> {
        self.answers.push((id, answer, Instant::now()));
        self.ids.insert(id);
        self.new_entry()
    }

    fn new_entry(&mut self) -> Option<u64> {
        if self.entry.is_some() {
            return None;
        }
        let number = self.next_entry;
        self.next_entry += 1;
        self.entry = Some(number);
        Some(number)
    }

    /// Takes every answer held back for member `id`, in order.
    pub(super) fn take_member(&mut self, id: Uuid) -> Vec<Frame> {
        if !self.ids.remove(&id) {
            return Vec::new();
        }
        let (theirs, others) = std::mem::take(&mut self.answers)
            .into_iter()
            .partition(|(member, _, _)| *member == id);
        self.answers = others;
        theirs.into_iter().map(|(_, answer, _)| answer).collect()
    }

    /// Takes every answer held back.
    pub(super) fn take_all(&mut self) -> Vec<(Uuid, Frame)> {
        self.ids.clear();
        std::mem::take(&mut self.answers)
            .into_iter()
            .map(|(id, answer, _)| (id, answer))
            .collect()
    }

    /// For the room's queue entry `number`, now due: takes the answers
    /// that have waited `limit` or longer, and says whether the room needs
    /// a new entry for those still waiting (the number to give it). An
    /// entry that is no longer the room's takes nothing.
    pub(super) fn take_overdue(
        &mut self,
        number: u64,
        limit: Duration,
    ) -> (Vec<(Uuid, Frame)>, Option<u64>) {
        if self.entry != Some(number) {
            return (Vec::new(), None);
        }
        self.entry = None;
        // The answers are in the order they came: the overdue ones first.
        let due = self
            .answers
            .iter()
            .take_while(|(_, _, since)| since.elapsed() >= limit)
            .count();
        let taken: Vec<(Uuid, Frame)> = self
            .answers
            .drain(..due)
            .map(|(id, answer, _)| (id, answer))
            .collect();
        self.ids = self.answers.iter().map(|(id, _, _)| *id).collect();
        let again = if self.answers.is_empty() {
            None
        } else {
            self.new_entry()
        };
        (taken, again)
    }
}

/// The hub's queue of rooms with answers held back, in the order their
/// entries were made: each comes due `limit` after it was made.
#[derive(Default)]
pub(super) struct Overdue {
    entries: VecDeque<(Instant, Arc<Room>, u64)>,
}

impl Overdue {
    /// Adds `room`'s entry `number`, made now.
    pub(super) fn push(&mut self, room: Arc<Room>, number: u64) {
        self.entries.push_back((Instant::now(), room, number));
    }

    /// Takes the oldest entry if it has been due for `limit`.
    pub(super) fn pop_due(&mut self, limit: Duration) -> Option<(Arc<Room>, u64)> {
        match self.entries.front() {
            Some((made, _, _)) if made.elapsed() >= limit => self
                .entries
                .pop_front()
                .map(|(_, room, number)| (room, number)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(text: &str) -> Frame {
        Frame::from_text(text.to_string())
    }

    #[test]
    fn one_entry_per_room_whatever_the_number_of_joins() {
        let mut held = Withheld::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(held.push(a, frame("a")), Some(0));
        assert_eq!(held.push(b, frame("b")), None);
        assert!(held.contains(a) && held.contains(b));
        // All answered (the subscription came): the entry stays until due.
        assert_eq!(held.take_all().len(), 2);
        assert_eq!(
            held.push(a, frame("again")),
            None,
            "the entry is still queued"
        );
        // Due, but the join came after it was made: not overdue yet, and
        // a new entry follows it.
        let (taken, again) = held.take_overdue(0, Duration::from_secs(3600));
        assert!(taken.is_empty());
        assert_eq!(again, Some(1));
        // A stale entry takes nothing.
        let (taken, again) = held.take_overdue(0, Duration::ZERO);
        assert!(taken.is_empty() && again.is_none());
        let (taken, again) = held.take_overdue(1, Duration::ZERO);
        assert_eq!(taken.len(), 1);
        assert_eq!(again, None);
        assert!(held.is_empty() && !held.contains(a));
    }

    #[test]
    fn a_members_answers_leave_together_and_in_order() {
        let mut held = Withheld::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        held.push(a, frame("a1"));
        held.push(b, frame("b1"));
        held.push(a, frame("a2"));
        let texts: Vec<String> = held
            .take_member(a)
            .iter()
            .map(|f| String::from_utf8_lossy(f.wire()).into_owned())
            .collect();
        assert!(
            texts[0].ends_with("a1") && texts[1].ends_with("a2"),
            "{texts:?}"
        );
        assert!(!held.contains(a) && held.contains(b));
        assert!(held.take_member(a).is_empty());
    }
}
