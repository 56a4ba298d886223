//! Rooms and the connections in them, owned in-process, and the broadcaster
//! API that sessions and the NATS bridge use to reach clients.
//!
//! Concurrency design (the broadcast path is the hot path):
//! - Rooms live in sharded maps (`SHARDS` locks picked by hash), connections
//!   in maps sharded by their random UUID. No lock covers the whole gateway.
//! - A broadcast looks the room up (shard read lock, an `Arc` clone), then
//!   walks the members under the room's read lock and queues the one encoded
//!   frame into each member's bounded queue with `try_send`. Nothing awaits
//!   under a lock, and a full queue is handled by the slow-consumer policy on
//!   the spot, so no recipient can make a broadcast wait.
//! - Membership changes take the room's write lock; `joined` and `left`
//!   replies are queued under that lock so a member never sees a room's
//!   message before `joined` or after `left`.
//!
//! - Empty rooms wait for `idle_timeout_secs` in one queue, oldest first,
//!   at most [`MAX_EMPTY_ROOMS`] of them. Emptying a room, refilling an
//!   empty one and the sweeper take its lock; broadcasts never do.
//!
//! - While NATS is connected, a join to a room not yet subscribed is
//!   answered once the bridge has the subscription confirmed
//!   (`withheld`); broadcasts skip the member until then.
//!
//! Lock order: a connection's room list, then a room shard, then a room,
//! then the queue of empty rooms or that of rooms with joins held back. A
//! join or a leave holds the connection's list from its check to its
//! presence event, and a client's message holds it while it is broadcast
//! and published: what one member does reaches the room and backends in
//! the order it happened. A disconnect empties the list first and leaves
//! the rooms after; a join cannot come in between, as it checks under the
//! list's lock that the connection is not closing, which the disconnect
//! marks before.

mod connection;
mod idle;
mod name;
mod outbox;
mod withheld;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use connection::{CLOSE_SLOW_CONSUMER, CloseRequest, Connection, Delivery, Identity};
pub use idle::MAX_EMPTY_ROOMS;
pub use name::{MAX_ROOM_LEN, RoomName, RoomPatterns, is_valid};
pub use outbox::{
    Batch, Handed, MAX_CONTROL_BYTES, MIN_QUEUE_BYTES, Outbox, PushError, QueueLimits,
};

use idle::{IdleQueue, Ticket};
use withheld::{Overdue, Withheld};

use crate::config::RoomsConfig;
use crate::events::{Event, Events, now_ms, unix_ms};
use crate::metrics::Metrics;
use crate::protocol::{self, ErrorCode, Frame, PresenceKind, Refusal, Run};
use crate::sync::{lock, read, write};

/// Number of lock shards for rooms and for connections. A power of two well
/// above the core count keeps contention negligible.
const SHARDS: usize = 64;

/// A room and its local members.
pub struct Room {
    name: RoomName,
    created: SystemTime,
    state: RwLock<RoomState>,
}

#[derive(Default)]
struct RoomState {
    /// Contiguous for a cache-friendly broadcast walk.
    members: Vec<Arc<Connection>>,
    /// Position of each member in `members`, for O(1) removal.
    index: HashMap<Uuid, usize>,
    /// Set when the room is removed from its shard; a join that raced with
    /// the removal sees it and retries on a fresh room.
    closed: bool,
    /// The room's place in the queue of empty rooms while it waits there,
    /// so a join can take it out and a sweep can tell a stale entry.
    waiting: Option<Ticket>,
    /// Whether the NATS bridge has subscribed this room: until then, a
    /// join waits for it (see [`Hub::release`]).
    subscribed: bool,
    /// Members whose `joined` is held back until the room's subscription
    /// is made, with that frame. Broadcasts skip them meanwhile: a member
    /// hears the room from its `joined` on, and from then on also what
    /// other instances and backends send it.
    withheld: Withheld,
}

impl Room {
    fn new(name: RoomName) -> Self {
        Self {
            name,
            created: SystemTime::now(),
            state: RwLock::new(RoomState::default()),
        }
    }

    /// The room's name.
    pub fn name(&self) -> &RoomName {
        &self.name
    }

    fn read(&self) -> RwLockReadGuard<'_, RoomState> {
        read(&self.state)
    }

    fn write(&self) -> RwLockWriteGuard<'_, RoomState> {
        write(&self.state)
    }
}

impl RoomState {
    fn insert(&mut self, conn: &Arc<Connection>) {
        self.index.insert(conn.id(), self.members.len());
        self.members.push(conn.clone());
    }

    /// Removes member `id`; `None` if it was none, and otherwise the
    /// answers to its joins still held back, in order.
    fn remove(&mut self, id: Uuid) -> Option<Vec<Frame>> {
        let pos = self.index.remove(&id)?;
        self.members.swap_remove(pos);
        if let Some(moved) = self.members.get(pos) {
            self.index.insert(moved.id(), pos);
        }
        Some(self.withheld.take_member(id))
    }
}

/// The limits the hub enforces, from `[websocket.rooms]`.
pub type HubConfig = RoomsConfig;

/// Counts of one broadcast, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fanout {
    /// Frames queued.
    pub queued: u64,
    /// Frames dropped by the `drop` policy.
    pub dropped: u64,
    /// Payload bytes queued.
    pub bytes: u64,
}

/// One lock's worth of the room map.
type RoomShard = RwLock<HashMap<RoomName, Arc<Room>>>;
/// One lock's worth of the connection map.
type ConnShard = RwLock<HashMap<Uuid, Arc<Connection>>>;

/// Rooms and connections of this instance.
pub struct Hub {
    config: HubConfig,
    metrics: Metrics,
    events: Events,
    hasher: std::collections::hash_map::RandomState,
    rooms: Box<[RoomShard]>,
    conns: Box<[ConnShard]>,
    /// Empty rooms awaiting `idle_timeout_secs`, oldest first.
    idle: std::sync::Mutex<IdleQueue>,
    /// Wakes the sweeper when the queue gets its first room.
    idle_added: Notify,
    /// Whether a join to a room not yet subscribed waits for its
    /// subscription: while the NATS bridge is connected. Without NATS, or
    /// while it is down, nothing could come from other instances anyway.
    joins_wait: AtomicBool,
    /// Rooms in which a member waits for its `joined`, for
    /// [`Hub::release_overdue`]: a NATS server that stalls without
    /// dropping the connection must not hold joins for long.
    overdue: std::sync::Mutex<Overdue>,
}

impl Hub {
    /// A hub with no rooms, keeping up to the built-in number of empty
    /// rooms for their idle timeout.
    pub fn new(config: HubConfig, metrics: Metrics, events: Events) -> Arc<Self> {
        Self::with_empty_room_limit(config, metrics, events, MAX_EMPTY_ROOMS)
    }

    /// Creates an empty hub that keeps at most `limit` empty rooms waiting
    /// for their idle timeout (tests use a small one).
    fn with_empty_room_limit(
        config: HubConfig,
        metrics: Metrics,
        events: Events,
        limit: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            metrics,
            events,
            hasher: Default::default(),
            rooms: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            conns: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            idle: std::sync::Mutex::new(IdleQueue::new(limit)),
            idle_added: Notify::new(),
            joins_wait: AtomicBool::new(false),
            overdue: std::sync::Mutex::new(Overdue::default()),
        })
    }

    /// The room limits in force.
    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// The event sink rooms and sessions publish to.
    pub fn events(&self) -> &Events {
        &self.events
    }

    fn room_shard(&self, name: &str) -> &RoomShard {
        &self.rooms[self.hasher.hash_one(name) as usize % SHARDS]
    }

    fn conn_shard(&self, id: Uuid) -> &ConnShard {
        // v4 ids are random, so their low bits spread evenly.
        &self.conns[id.as_u128() as usize % SHARDS]
    }

    // ----- connections -------------------------------------------------

    /// Makes a connection reachable by id (backends' `send.<id>`, `control.*`).
    pub fn register(&self, conn: &Arc<Connection>) {
        write(self.conn_shard(conn.id())).insert(conn.id(), conn.clone());
    }

    /// Removes a connection: it leaves every room (with presence events) and
    /// is no longer reachable by id.
    pub fn unregister(&self, conn: &Arc<Connection>) {
        write(self.conn_shard(conn.id())).remove(&conn.id());
        let rooms: Vec<Arc<Room>> = std::mem::take(&mut *conn.rooms());
        for room in rooms {
            self.remove_member(conn, &room, None);
        }
    }

    /// The connection with this id, if it lives on this instance.
    pub fn connection(&self, id: Uuid) -> Option<Arc<Connection>> {
        read(self.conn_shard(id)).get(&id).cloned()
    }

    // ----- delivery ----------------------------------------------------

    /// Queues a frame for one connection and counts the outcome.
    pub fn deliver(&self, conn: &Connection, frame: Frame) -> Delivery {
        let len = frame.len() as u64;
        let outcome = conn.deliver(frame);
        let mut fanout = Fanout::default();
        fanout.count(outcome, len);
        self.count(fanout);
        outcome
    }

    /// Queues `frame` for `conn` ahead of any data: the welcome, which
    /// SPEC §1 makes the first frame after the upgrade, would otherwise
    /// follow the pong to a ping the client sent with its handshake.
    pub fn deliver_first(&self, conn: &Connection, frame: &Frame) {
        if conn.outbox().push_control(frame.wire()).is_ok() {
            let mut fanout = Fanout::default();
            fanout.count(Delivery::Queued, frame.len() as u64);
            self.count(fanout);
        }
    }

    /// Queues `frame` for every member of `room` except `exclude`.
    pub fn broadcast(&self, room: &Room, frame: &Frame, exclude: Option<Uuid>) -> Fanout {
        self.fan_out(
            &room.read(),
            &Run::new(std::slice::from_ref(frame)),
            exclude,
        )
    }

    /// Queues `run` for every member in `state` except `exclude`: the one
    /// walk behind broadcasts and presence frames.
    fn fan_out(&self, state: &RoomState, run: &Run, exclude: Option<Uuid>) -> Fanout {
        let mut fanout = Fanout::default();
        // Members wait for their `joined` only while a room's first
        // subscription is made: the common walk does not look for them.
        let waiting = !state.withheld.is_empty();
        for member in &state.members {
            if Some(member.id()) != exclude && !(waiting && state.withheld.contains(member.id())) {
                let (queued, rest) = member.deliver_run(run);
                fanout.count_run(run, queued, rest);
            }
        }
        self.count(fanout);
        fanout
    }

    /// Queues `frames`, in order and as one run, for every member of the
    /// room `room` except `exclude`; a room without local members is a
    /// no-op.
    pub fn broadcast_room(&self, room: &str, frames: &[Frame], exclude: Option<Uuid>) -> Fanout {
        match self.room(room) {
            Some(room) => self.fan_out(&room.read(), &Run::new(frames), exclude),
            None => Fanout::default(),
        }
    }

    /// Whether any connection is registered: a message for all of them
    /// need not be made into a frame when there is none.
    pub fn has_connections(&self) -> bool {
        self.conns.iter().any(|shard| !read(shard).is_empty())
    }

    /// Queues `frame` for every local connection except `exclude`.
    pub fn broadcast_all(&self, frame: &Frame, exclude: Option<Uuid>) -> Fanout {
        let run = Run::from(frame.clone());
        let mut fanout = Fanout::default();
        for shard in self.conns.iter() {
            for (id, conn) in read(shard).iter() {
                if Some(*id) != exclude {
                    let (queued, rest) = conn.deliver_run(&run);
                    fanout.count_run(&run, queued, rest);
                }
            }
        }
        self.count(fanout);
        fanout
    }

    fn count(&self, fanout: Fanout) {
        if fanout.queued > 0 {
            self.metrics.messages_delivered.inc_by(fanout.queued);
            self.metrics.bytes_sent.inc_by(fanout.bytes);
        }
        if fanout.dropped > 0 {
            self.metrics.dropped_slow_consumer.inc_by(fanout.dropped);
        }
    }

    // ----- membership --------------------------------------------------

    /// Runs `act` on the room `name` if `conn` is a member of it, with the
    /// membership held for the while: a client's message is broadcast and
    /// published as a member's, never after a backend's `control.leave`
    /// (and the presence `leave` the others got) came in between.
    pub fn as_member<R>(
        &self,
        conn: &Connection,
        name: &str,
        act: impl FnOnce(&Arc<Room>) -> R,
    ) -> Option<R> {
        let mine = conn.rooms();
        let room = mine.iter().find(|r| r.name.as_str() == name)?;
        Some(act(room))
    }

    /// Adds `conn` to `name` and queues `reply` (the `joined` frame) under
    /// the room lock. Joining a room twice is not an error: the reply is sent
    /// again and nothing else changes.
    pub fn join(
        &self,
        conn: &Arc<Connection>,
        name: &RoomName,
        reply: Frame,
    ) -> Result<(), Refusal> {
        self.join_checked(conn, name, reply, true)
    }

    /// Like [`Hub::join`] on a backend's order (`control.join`): the user's
    /// room grants do not apply, the room limits do.
    pub fn join_by_backend(
        &self,
        conn: &Arc<Connection>,
        name: &RoomName,
        reply: Frame,
    ) -> Result<(), Refusal> {
        self.join_checked(conn, name, reply, false)
    }

    fn join_checked(
        &self,
        conn: &Arc<Connection>,
        name: &RoomName,
        reply: Frame,
        check_grants: bool,
    ) -> Result<(), Refusal> {
        if !self.config.enabled {
            return Err(Refusal::new(ErrorCode::RoomsDisabled, "rooms are disabled"));
        }
        let mut mine = conn.rooms();
        // A session cancels `closing` before it empties this list (under
        // this lock), so a backend's join racing with the disconnect either
        // lands before the cleanup, which then removes it, or sees this.
        if conn.is_closing() {
            return Err(Refusal::new(ErrorCode::NotMember, "connection is closing"));
        }
        // A member is answered `joined` again, also in a room a backend put
        // it in that its own grants would not open; after its first
        // `joined` if that still waits for the room's subscription.
        if let Some(room) = mine.iter().find(|r| r.name == *name) {
            let mut state = room.write();
            if state.withheld.contains(conn.id()) {
                self.withhold(&mut state, room, conn, reply);
            } else {
                self.deliver(conn, reply);
            }
            return Ok(());
        }
        if check_grants
            && let Some(grants) = &conn.identity().rooms
            && !grants.allows(name.as_str())
        {
            return Err(Refusal::new(
                ErrorCode::Forbidden,
                "room not allowed for this user",
            ));
        }
        if mine.len() >= self.config.max_rooms_per_connection {
            return Err(Refusal::new(
                ErrorCode::TooManyRooms,
                "too many rooms for this connection",
            ));
        }
        let (room, first) = self.insert_member(conn, name, reply)?;
        mine.push(room);
        if first {
            self.events.interest_changed(name);
        }
        // Published before the list is let go, as a leave publishes its
        // `leave`: a leave or a disconnect racing this join waits for the
        // list, so backends see the member's presence events in order.
        self.publish_presence(name, PresenceKind::Join, conn);
        drop(mine);
        Ok(())
    }

    /// Inserts into the live room of that name, creating it when needed.
    /// Returns the room and whether `conn` is its first member.
    fn insert_member(
        &self,
        conn: &Arc<Connection>,
        name: &RoomName,
        reply: Frame,
    ) -> Result<(Arc<Room>, bool), Refusal> {
        loop {
            let room = self.get_or_create(name);
            let mut state = room.write();
            if state.closed {
                continue;
            }
            if state.members.len() >= self.config.max_members {
                return Err(Refusal::new(ErrorCode::RoomFull, "room is full"));
            }
            if let Some(ticket) = state.waiting.take() {
                lock(&self.idle).cancel(ticket);
            }
            state.insert(conn);
            if state.subscribed || !self.joins_wait.load(Ordering::Relaxed) {
                self.deliver(conn, reply);
            } else {
                self.withhold(&mut state, &room, conn, reply);
            }
            if self.config.presence {
                let frame = protocol::presence(
                    name.as_str(),
                    PresenceKind::Join,
                    conn.id_str(),
                    conn.user(),
                );
                self.fan_out(
                    &state,
                    &Run::new(std::slice::from_ref(&frame)),
                    Some(conn.id()),
                );
            }
            let first = state.members.len() == 1;
            drop(state);
            return Ok((room, first));
        }
    }

    fn get_or_create(&self, name: &RoomName) -> Arc<Room> {
        let shard = self.room_shard(name.as_str());
        if let Some(room) = read(shard).get(name.as_str()) {
            return room.clone();
        }
        let mut map = write(shard);
        map.entry(name.clone())
            .or_insert_with(|| {
                self.metrics.rooms.inc();
                Arc::new(Room::new(name.clone()))
            })
            .clone()
    }

    /// Removes `conn` from `name` and queues `reply` (the `left` frame) under
    /// the room lock. `not_member` if it was not in the room, and
    /// `rooms_disabled`, like a join, when rooms are off (nobody can be a
    /// member then, and `not_member` would suggest joining first).
    pub fn leave(&self, conn: &Arc<Connection>, name: &str, reply: Frame) -> Result<(), Refusal> {
        if !self.config.enabled {
            return Err(Refusal::new(ErrorCode::RoomsDisabled, "rooms are disabled"));
        }
        let mut mine = conn.rooms();
        let Some(pos) = mine.iter().position(|r| r.name.as_str() == name) else {
            return Err(Refusal::new(
                ErrorCode::NotMember,
                "not a member of this room",
            ));
        };
        let room = mine.swap_remove(pos);
        // The list stays locked until the room no longer holds the member,
        // as a join holds it until the room does: otherwise a join racing
        // this leave (one from the client, the other from a backend) would
        // find the room gone from the list while the room still held the
        // member, and add it a second time.
        self.remove_member(conn, &room, Some(reply));
        drop(mine);
        Ok(())
    }

    fn remove_member(&self, conn: &Arc<Connection>, room: &Arc<Room>, reply: Option<Frame>) {
        let (emptied, to_free) = {
            let mut state = room.write();
            let Some(withheld) = state.remove(conn.id()) else {
                return;
            };
            if let Some(reply) = reply {
                // A client that left before its join was answered gets
                // both answers, in order.
                for joined in withheld {
                    self.deliver(conn, joined);
                }
                self.deliver(conn, reply);
            }
            if self.config.presence {
                let frame = protocol::presence(
                    room.name.as_str(),
                    PresenceKind::Leave,
                    conn.id_str(),
                    conn.user(),
                );
                self.fan_out(
                    &state,
                    &Run::new(std::slice::from_ref(&frame)),
                    Some(conn.id()),
                );
            }
            let emptied = state.members.is_empty();
            let to_free = if emptied {
                self.start_waiting(&mut state, room)
            } else {
                None
            };
            (emptied, to_free)
        };
        if emptied {
            self.events.interest_changed(&room.name);
        }
        self.publish_presence(&room.name, PresenceKind::Leave, conn);
        if let Some((room, ticket)) = to_free {
            self.free_if_idle(&room, ticket);
        }
    }

    /// Puts a room that just became empty in the queue of empty rooms.
    /// Returns a room to free now, with the ticket it must still hold:
    /// this one when there is no idle timeout, or the one that has waited
    /// longest when the queue is full.
    fn start_waiting(
        &self,
        state: &mut RoomState,
        room: &Arc<Room>,
    ) -> Option<(Arc<Room>, Option<Ticket>)> {
        if self.config.idle_timeout_secs == 0 {
            return Some((room.clone(), None));
        }
        let mut idle = lock(&self.idle);
        let first = idle.is_empty();
        let (ticket, evicted) = idle.push(room.clone());
        drop(idle);
        state.waiting = Some(ticket);
        if first {
            // Later rooms come due after the first, so the sweeper, asleep
            // until the first is due, needs waking only for the first.
            self.idle_added.notify_one();
        }
        evicted.map(|w| (w.room, Some(w.ticket)))
    }

    fn idle_timeout(&self) -> Duration {
        crate::config::secs(self.config.idle_timeout_secs)
    }

    fn publish_presence(&self, room: &RoomName, kind: PresenceKind, conn: &Arc<Connection>) {
        if self.events.enabled() {
            self.events.publish(Event::Presence {
                room: room.clone(),
                kind,
                conn: conn.clone(),
                ts: now_ms(),
            });
        }
    }

    /// Frees `room` if it is still empty and in the stay in the queue that
    /// `ticket` names (`None`: not queued, for a room emptied with no idle
    /// timeout). A room that got a member since, or was emptied again and
    /// queued anew, is left alone. This is the one way a room is freed:
    /// when its idle time is up, at once without an idle timeout, and early
    /// when the queue of empty rooms is full. Its NATS interest went when
    /// its last member left.
    fn free_if_idle(&self, room: &Arc<Room>, ticket: Option<Ticket>) {
        let shard = self.room_shard(room.name.as_str());
        let mut map = write(shard);
        let mut state = room.write();
        if state.closed || !state.members.is_empty() || state.waiting != ticket {
            return;
        }
        state.closed = true;
        state.waiting = None;
        if map
            .get(room.name.as_str())
            .is_some_and(|r| Arc::ptr_eq(r, room))
        {
            map.remove(room.name.as_str());
            self.metrics.rooms.dec();
        }
    }

    /// Frees empty rooms when their idle timeout passes, until `cancel`.
    /// Sleeps until the earliest expiry, so it costs nothing while no room
    /// is empty.
    pub async fn run_sweeper(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let next = self.sweep_due();
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.idle_added.notified() => {}
                _ = sleep => {}
            }
        }
    }

    /// Frees every room whose idle time is up; returns when the next one
    /// is due.
    fn sweep_due(&self) -> Option<Instant> {
        let timeout = self.idle_timeout();
        loop {
            // The queue's lock is released before the room is freed: the
            // room's locks come first in the lock order.
            let due = lock(&self.idle).pop_due(timeout);
            match due {
                Ok(waiting) => self.free_if_idle(&waiting.room, Some(waiting.ticket)),
                Err(next) => return next,
            }
        }
    }

    // ----- the NATS bridge's subscriptions -----------------------------

    /// Whether joins wait for their room's subscription from now on; when
    /// NATS goes down, the members waiting get their `joined` at once.
    pub fn set_joins_wait(&self, wait: bool) {
        self.joins_wait.store(wait, Ordering::Relaxed);
        if !wait {
            for room in self.all_rooms() {
                self.answer_withheld(&room, false);
            }
        }
    }

    /// The bridge subscribed `room`: its members waiting for that get
    /// their `joined`, and later joins are answered at once.
    pub fn release(&self, room: &str) {
        if let Some(room) = self.room(room) {
            self.answer_withheld(&room, true);
        }
    }

    /// The bridge could not subscribe `room` for now: its members waiting
    /// get their `joined` all the same rather than waiting on NATS.
    pub fn release_unsubscribed(&self, room: &str) {
        if let Some(room) = self.room(room) {
            self.answer_withheld(&room, false);
        }
    }

    /// The bridge lost `room`'s subscription with the client that held it:
    /// joins wait for the next one again.
    pub fn lost_subscription(&self, room: &str) {
        if let Some(room) = self.room(room) {
            room.write().subscribed = false;
        }
    }

    /// Answers the joins that have waited `limit` or longer for their
    /// room's subscription, subscribed or not: the bridge, held up by a
    /// stalled server, may not get to them for a while. A join waits at
    /// most about twice `limit` between two calls.
    pub fn release_overdue(&self, limit: Duration) {
        loop {
            // The queue's lock is let go before the room's is taken: the
            // room's come first in the lock order.
            let Some((room, number)) = lock(&self.overdue).pop_due(limit) else {
                return;
            };
            let mut state = room.write();
            let (answers, again) = state.withheld.take_overdue(number, limit);
            self.answer(&state, answers);
            if let Some(again) = again {
                lock(&self.overdue).push(room.clone(), again);
            }
        }
    }

    /// Holds back `reply` for `conn`, a member of `room` (`state`).
    fn withhold(
        &self,
        state: &mut RoomState,
        room: &Arc<Room>,
        conn: &Arc<Connection>,
        reply: Frame,
    ) {
        if let Some(number) = state.withheld.push(conn.id(), reply) {
            lock(&self.overdue).push(room.clone(), number);
        }
    }

    /// Delivers held-back answers to those still members.
    fn answer(&self, state: &RoomState, answers: Vec<(Uuid, Frame)>) {
        for (id, joined) in answers {
            if let Some(&at) = state.index.get(&id) {
                self.deliver(&state.members[at], joined);
            }
        }
    }

    /// Marks `room` unsubscribed if it has no local members, and then runs
    /// `drop` (which ends the subscription) under the room's lock: a join
    /// either comes first and keeps the subscription, or comes after and
    /// waits for a new one. Returns whether the room was empty.
    pub fn unsubscribe_if_empty(&self, room: &str, drop: impl FnOnce()) -> bool {
        let Some(room) = self.room(room) else {
            drop();
            return true;
        };
        let mut state = room.write();
        if !state.members.is_empty() {
            return false;
        }
        state.subscribed = false;
        drop();
        true
    }

    /// Answers the members of `room` waiting for their `joined`, and marks
    /// it subscribed when it now is.
    fn answer_withheld(&self, room: &Room, subscribed: bool) {
        let mut state = room.write();
        state.subscribed |= subscribed;
        let answers = state.withheld.take_all();
        self.answer(&state, answers);
    }

    /// The live room of that name.
    fn room(&self, name: &str) -> Option<Arc<Room>> {
        read(self.room_shard(name)).get(name).cloned()
    }

    fn all_rooms(&self) -> Vec<Arc<Room>> {
        self.rooms
            .iter()
            .flat_map(|s| read(s).values().cloned().collect::<Vec<_>>())
            .collect()
    }

    // ----- introspection -----------------------------------------------

    /// Whether `room` has members on this instance, for the tests (the
    /// bridge asks [`Hub::unsubscribe_if_empty`], which decides under the
    /// room's lock).
    #[cfg(test)]
    fn has_members(&self, room: &str) -> bool {
        self.room(room)
            .is_some_and(|r| !r.read().members.is_empty())
    }

    /// The rooms with local members, for the NATS bridge to check its
    /// subscriptions against when it lost track of single changes.
    pub fn occupied_rooms(&self) -> Vec<RoomName> {
        self.rooms
            .iter()
            .flat_map(|s| {
                read(s)
                    .values()
                    .filter(|r| !r.read().members.is_empty())
                    .map(|r| r.name.clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Rooms held, empty ones awaiting expiry included.
    pub fn room_count(&self) -> usize {
        self.rooms.iter().map(|s| read(s).len()).sum()
    }

    /// Every room with its member count, for `GET /rooms`.
    pub fn room_summaries(&self) -> Vec<RoomSummary> {
        let mut out: Vec<RoomSummary> = self
            .rooms
            .iter()
            .flat_map(|s| {
                read(s)
                    .values()
                    .map(|r| RoomSummary::of(r))
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort_by(|a, b| a.room.cmp(&b.room));
        out
    }

    /// One room with its members, for `GET /rooms/<room>`.
    pub fn room_detail(&self, name: &str) -> Option<RoomDetail> {
        let room = self.room(name)?;
        let state = room.read();
        Some(RoomDetail {
            room: room.name.to_string(),
            members: state.members.len(),
            member_ids: state
                .members
                .iter()
                .map(|m| m.id_str().to_string())
                .collect(),
            connections: state
                .members
                .iter()
                .map(|m| MemberInfo {
                    connection_id: m.id_str().to_string(),
                    user: m.user().map(str::to_string),
                })
                .collect(),
            created: unix_ms(room.created),
        })
    }
}

impl Fanout {
    fn count(&mut self, outcome: Delivery, len: u64) {
        match outcome {
            Delivery::Queued => {
                self.queued += 1;
                self.bytes += len;
            }
            Delivery::Dropped => self.dropped += 1,
            Delivery::Closing => {}
        }
    }

    /// Counts a run handed to one member: the first `queued` frames went
    /// in, and `rest` says what became of the others.
    fn count_run(&mut self, run: &Run, queued: usize, rest: Delivery) {
        self.queued += queued as u64;
        self.bytes += run.payload(queued);
        if rest == Delivery::Dropped {
            self.dropped += (run.len() - queued) as u64;
        }
    }
}

/// `GET /rooms` entry.
#[derive(Debug, Serialize)]
pub struct RoomSummary {
    /// Room name.
    pub room: String,
    /// Local members.
    pub members: usize,
    /// Creation time, Unix milliseconds.
    pub created: u64,
}

impl RoomSummary {
    fn of(room: &Room) -> Self {
        Self {
            room: room.name.to_string(),
            members: room.read().members.len(),
            created: unix_ms(room.created),
        }
    }
}

/// `GET /rooms/<room>` body.
#[derive(Debug, Serialize)]
pub struct RoomDetail {
    /// Room name.
    pub room: String,
    /// Local members.
    pub members: usize,
    /// Their connection ids.
    pub member_ids: Vec<String>,
    /// The same members with their users, so that a backend rebuilding
    /// its view after an outage knows who is where.
    pub connections: Vec<MemberInfo>,
    /// Creation time, Unix milliseconds.
    pub created: u64,
}

/// One member in [`RoomDetail`].
#[derive(Debug, Serialize)]
pub struct MemberInfo {
    /// The connection's id, as in its `welcome` and NATS events.
    pub connection_id: String,
    /// Its user, when authentication named one (`null` otherwise).
    pub user: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SlowConsumerPolicy;
    use crate::shutdown::Shutdown;

    /// A hub that keeps at most three empty rooms, with the default hour of
    /// idle timeout, so only the bound frees rooms during a test.
    fn hub() -> Arc<Hub> {
        Hub::with_empty_room_limit(HubConfig::default(), Metrics::new(), Events::disabled(), 3)
    }

    fn client(shutdown: &Shutdown) -> Arc<Connection> {
        // Replies pile up unread: `drop` keeps the connection open.
        Connection::new(
            Identity::default(),
            QueueLimits::new(4, 64),
            SlowConsumerPolicy::Drop,
            shutdown,
        )
    }

    fn join(hub: &Hub, conn: &Arc<Connection>, room: &str) {
        let name = RoomName::parse(room).expect("valid name");
        let reply = protocol::joined(room, None);
        hub.join(conn, &name, reply).expect("join");
    }

    fn leave(hub: &Hub, conn: &Arc<Connection>, room: &str) {
        let reply = protocol::left(room, None, false);
        hub.leave(conn, room, reply).expect("leave");
    }

    /// The rooms the hub holds, by name, in order.
    fn held(hub: &Hub) -> Vec<String> {
        hub.room_summaries().into_iter().map(|r| r.room).collect()
    }

    #[test]
    fn a_member_a_backend_put_in_a_room_its_grants_do_not_open_may_join_it_again() {
        let hub = hub();
        let shutdown = Shutdown::new();
        let identity = Identity {
            rooms: Some(RoomPatterns::new(["lobby"])),
            ..Identity::default()
        };
        let conn = Connection::new(
            identity,
            QueueLimits::new(8, 64),
            SlowConsumerPolicy::Drop,
            &shutdown,
        );
        let staff = RoomName::parse("staff").expect("valid name");
        let refused = hub.join(&conn, &staff, protocol::joined("staff", None));
        assert!(refused.is_err(), "not in the grants");
        hub.join_by_backend(&conn, &staff, protocol::joined("staff", None))
            .expect("a backend's join");
        hub.join(&conn, &staff, protocol::joined("staff", None))
            .expect("joined again, as a member");
        assert!(hub.has_members("staff"));
    }

    #[test]
    fn beyond_the_bound_the_room_empty_longest_is_freed() {
        let hub = hub();
        let shutdown = Shutdown::new();
        let conn = client(&shutdown);
        for (i, room) in ["r0", "r1", "r2", "r3", "r4"].into_iter().enumerate() {
            join(&hub, &conn, room);
            leave(&hub, &conn, room);
            let expected = (i + 1).min(3);
            assert_eq!(hub.room_count(), expected, "after {room}");
            assert_eq!(hub.metrics.rooms.get(), expected as i64, "after {room}");
        }
        assert_eq!(held(&hub), ["r2", "r3", "r4"]);
    }

    #[test]
    fn a_room_with_a_member_again_stops_waiting_and_is_not_freed() {
        let hub = hub();
        let shutdown = Shutdown::new();
        let conn = client(&shutdown);
        for room in ["r0", "r1", "r2"] {
            join(&hub, &conn, room);
            leave(&hub, &conn, room);
        }
        // r0 has waited longest, but it gets a member back: two rooms wait.
        join(&hub, &conn, "r0");
        join(&hub, &conn, "r3");
        leave(&hub, &conn, "r3");
        assert_eq!(
            held(&hub),
            ["r0", "r1", "r2", "r3"],
            "three wait, one is in use"
        );
        // Two more empty rooms push out r1 and r2, never the occupied r0.
        for room in ["r4", "r5"] {
            join(&hub, &conn, room);
            leave(&hub, &conn, room);
        }
        assert_eq!(held(&hub), ["r0", "r3", "r4", "r5"]);
        assert_eq!(hub.metrics.rooms.get(), 4);
        // Emptied again, r0 waits as the newest: r3 goes instead.
        leave(&hub, &conn, "r0");
        assert_eq!(held(&hub), ["r0", "r4", "r5"]);
        // A freed room is made again by the next join.
        join(&hub, &conn, "r1");
        assert!(hub.has_members("r1"));
        assert_eq!(hub.room_count(), 4);
    }

    #[test]
    fn leaving_and_rejoining_one_room_takes_one_place() {
        let hub = hub();
        let shutdown = Shutdown::new();
        let conn = client(&shutdown);
        for room in ["a", "b"] {
            join(&hub, &conn, room);
            leave(&hub, &conn, room);
        }
        for _ in 0..10 {
            join(&hub, &conn, "loop");
            leave(&hub, &conn, "loop");
        }
        assert_eq!(held(&hub), ["a", "b", "loop"]);
    }

    /// The frames queued for `conn` since the last look, as text.
    fn queued(conn: &Connection) -> String {
        let mut batch = Batch::new();
        conn.outbox().take(&mut batch);
        batch
            .iter()
            .map(|frame| String::from_utf8_lossy(frame).into_owned())
            .collect()
    }

    fn broadcast(hub: &Hub, room: &str, text: &str) {
        let frame = Frame::from_text(format!("{{\"type\":\"{text}\"}}"));
        hub.broadcast_room(room, &[frame], None);
    }

    #[test]
    fn while_nats_is_up_a_join_is_answered_once_its_room_is_subscribed() {
        let hub = hub();
        let shutdown = Shutdown::new();
        let (first, second, later) = (client(&shutdown), client(&shutdown), client(&shutdown));
        hub.set_joins_wait(true);
        join(&hub, &first, "lobby");
        join(&hub, &second, "lobby");
        assert!(hub.has_members("lobby"), "members all the same");
        assert_eq!(queued(&first), "", "no joined before the subscription");
        // What comes before the `joined` is not for them.
        broadcast(&hub, "lobby", "early");
        assert_eq!(queued(&second), "");

        hub.release("lobby");
        for member in [&first, &second] {
            let frames = queued(member);
            assert!(frames.contains("joined"), "{frames}");
            assert!(!frames.contains("early"), "{frames}");
        }
        // Subscribed: a later join is answered at once, and all hear the room.
        join(&hub, &later, "lobby");
        assert!(queued(&later).contains("joined"));
        broadcast(&hub, "lobby", "after");
        for member in [&first, &second, &later] {
            assert!(queued(member).contains("after"));
        }
    }

    #[test]
    fn a_member_leaving_before_its_join_was_answered_gets_both_answers() {
        let hub = hub();
        let shutdown = Shutdown::new();
        let conn = client(&shutdown);
        hub.set_joins_wait(true);
        join(&hub, &conn, "lobby");
        leave(&hub, &conn, "lobby");
        let frames = queued(&conn);
        let (joined, left) = (frames.find("joined"), frames.find("left"));
        assert!(joined.is_some() && joined < left, "{frames}");
        // Nothing is left to answer when the subscription comes.
        hub.release("lobby");
        assert_eq!(queued(&conn), "");
    }

    #[test]
    fn joins_waiting_when_nats_goes_down_are_answered_and_later_ones_do_not_wait() {
        let hub = hub();
        let shutdown = Shutdown::new();
        let (first, second) = (client(&shutdown), client(&shutdown));
        hub.set_joins_wait(true);
        join(&hub, &first, "lobby");
        hub.set_joins_wait(false);
        assert!(queued(&first).contains("joined"));
        join(&hub, &second, "other");
        assert!(queued(&second).contains("joined"));
    }

    #[test]
    fn a_join_repeated_while_the_first_waits_is_answered_after_it() {
        let hub = hub();
        let shutdown = Shutdown::new();
        let conn = client(&shutdown);
        let name = RoomName::parse("lobby").expect("valid name");
        hub.set_joins_wait(true);
        for id in ["first", "second"] {
            let reply = protocol::joined("lobby", Some(id));
            hub.join(&conn, &name, reply).expect("join");
        }
        assert_eq!(queued(&conn), "", "neither before the subscription");
        hub.release("lobby");
        let frames = queued(&conn);
        let (first, second) = (frames.find("first"), frames.find("second"));
        assert!(first.is_some() && first < second, "in order: {frames}");
    }

    #[test]
    fn a_join_waits_for_its_subscription_no_longer_than_the_limit() {
        let hub = hub();
        let shutdown = Shutdown::new();
        let conn = client(&shutdown);
        hub.set_joins_wait(true);
        join(&hub, &conn, "lobby");
        hub.release_overdue(Duration::from_secs(3600));
        assert_eq!(queued(&conn), "", "not overdue yet");
        hub.release_overdue(Duration::ZERO);
        assert!(queued(&conn).contains("joined"));
        // The room is not taken for subscribed: the next join waits too.
        let other = client(&shutdown);
        join(&hub, &other, "lobby");
        assert_eq!(queued(&other), "");
    }

    #[test]
    fn a_room_whose_subscription_was_dropped_waits_for_a_new_one() {
        let hub = hub();
        let shutdown = Shutdown::new();
        let conn = client(&shutdown);
        hub.set_joins_wait(true);
        join(&hub, &conn, "lobby");
        hub.release("lobby");
        // Not while it has a member: the subscription stays.
        let mut dropped = false;
        assert!(!hub.unsubscribe_if_empty("lobby", || dropped = true));
        assert!(!dropped);
        leave(&hub, &conn, "lobby");
        assert!(hub.unsubscribe_if_empty("lobby", || dropped = true));
        assert!(dropped);
        queued(&conn);
        join(&hub, &conn, "lobby");
        assert_eq!(queued(&conn), "", "waits for the new subscription");
        hub.release_unsubscribed("lobby");
        assert!(queued(&conn).contains("joined"), "or for the attempt");
    }

    /// A hub whose events go to a queue the test reads.
    fn hub_with_events() -> (Arc<Hub>, crate::events::EventStream) {
        let dropped = prometheus::IntCounter::new("dropped", "events dropped").expect("counter");
        let (events, stream) = Events::channel(1 << 22, usize::MAX, dropped);
        let config = HubConfig {
            presence: true,
            ..HubConfig::default()
        };
        (
            Hub::with_empty_room_limit(config, Metrics::new(), events, 3),
            stream,
        )
    }

    /// The presence events published for `conn`, in the order the bridge
    /// takes them.
    fn presence_of(
        stream: &mut crate::events::EventStream,
        conn: &Connection,
    ) -> Vec<PresenceKind> {
        let mut kinds = Vec::new();
        while let Some(event) = stream.try_next_event() {
            if let Event::Presence { kind, conn: c, .. } = event
                && c.id() == conn.id()
            {
                kinds.push(kind);
            }
        }
        kinds
    }

    /// A client's joins and leaves racing a backend's on one connection and
    /// room (two threads, a bounded number of rounds) leave the room's
    /// members and the connection's list in agreement: the member is in
    /// both or in neither, once, and a disconnect then frees the room. The
    /// presence events backends get alternate, join and leave, as the
    /// changes did.
    #[test]
    fn client_and_backend_membership_changes_racing_stay_consistent() {
        const ROUNDS: usize = 100_000;
        let (hub, mut stream) = hub_with_events();
        let shutdown = Shutdown::new();
        let conn = client(&shutdown);
        hub.register(&conn);
        let name = RoomName::parse("race").expect("valid name");
        std::thread::scope(|s| {
            for by_backend in [false, true] {
                let (hub, conn, name) = (&hub, &conn, &name);
                s.spawn(move || {
                    for _ in 0..ROUNDS {
                        let joined = protocol::joined("race", None);
                        let _ = if by_backend {
                            hub.join_by_backend(conn, name, joined)
                        } else {
                            hub.join(conn, name, joined)
                        };
                        let left = protocol::left("race", None, by_backend);
                        let _ = hub.leave(conn, "race", left);
                    }
                });
            }
        });
        let listed = conn.rooms().iter().filter(|r| r.name == name).count();
        let members = hub.room_detail("race").map_or(0, |d| d.members);
        assert!(listed <= 1, "listed {listed} times");
        assert_eq!(
            members, listed,
            "room members against the connection's list"
        );
        hub.unregister(&conn);
        assert!(!hub.has_members("race"), "a member outlived its connection");
        let kinds = presence_of(&mut stream, &conn);
        let repeated = kinds.windows(2).position(|w| w[0] == w[1]);
        assert_eq!(repeated, None, "{} presence events", kinds.len());
        assert_eq!(kinds.last(), Some(&PresenceKind::Leave));
    }

    /// A backend's join racing a disconnect either lands before the
    /// disconnect's cleanup, which then removes the member, or is refused:
    /// its presence `join` never follows the disconnect's `leave`.
    #[test]
    fn no_presence_join_follows_the_leave_of_a_disconnect() {
        const ROUNDS: usize = 10_000;
        let (hub, mut stream) = hub_with_events();
        let shutdown = Shutdown::new();
        let name = RoomName::parse("race").expect("valid name");
        let mut late = 0;
        for _ in 0..ROUNDS {
            let conn = client(&shutdown);
            hub.register(&conn);
            let barrier = std::sync::Barrier::new(2);
            std::thread::scope(|s| {
                s.spawn(|| {
                    barrier.wait();
                    let _ = hub.join_by_backend(&conn, &name, protocol::joined("race", None));
                });
                barrier.wait();
                conn.close_for_shutdown();
                hub.unregister(&conn);
            });
            if presence_of(&mut stream, &conn) == [PresenceKind::Leave, PresenceKind::Join] {
                late += 1;
            }
        }
        assert_eq!(late, 0, "rounds with a join after the disconnect's leave");
        assert!(!hub.has_members("race"));
    }

    /// A client's messages racing a backend's `control.leave` and
    /// `control.join` of their sender: the other member never gets a
    /// message from the sender between the presence `leave` and the next
    /// `join` it was sent, as the sender was no member then.
    #[test]
    fn no_message_from_a_sender_reaches_the_room_between_its_leave_and_its_next_join() {
        const ROUNDS: usize = 20_000;
        let (hub, _stream) = hub_with_events();
        let shutdown = Shutdown::new();
        let sender = client(&shutdown);
        let other = Connection::new(
            Identity::default(),
            QueueLimits::new(8 * ROUNDS, 64),
            SlowConsumerPolicy::Drop,
            &shutdown,
        );
        join(&hub, &other, "r");
        join(&hub, &sender, "r");
        let name = RoomName::parse("r").expect("valid name");
        let frame = protocol::message(Some("r"), "\"hi\"", sender.id_str());
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..ROUNDS {
                    hub.as_member(&sender, "r", |room| {
                        hub.broadcast(room, &frame, Some(sender.id()));
                    });
                }
            });
            for _ in 0..ROUNDS {
                let _ = hub.leave(&sender, "r", protocol::left("r", None, true));
                let _ = hub.join_by_backend(&sender, &name, protocol::joined("r", None));
            }
        });
        let mut batch = Batch::default();
        other.outbox().take(&mut batch);
        let mut member = true;
        let mut leaves = 0;
        for part in batch.iter() {
            let text = String::from_utf8_lossy(part);
            if text.contains("\"event\":\"leave\"") {
                member = false;
                leaves += 1;
            } else if text.contains("\"event\":\"join\"") {
                member = true;
            } else if text.contains("\"type\":\"message\"") {
                assert!(member, "a message after its sender's leave: {text}");
            }
        }
        assert_eq!(leaves, ROUNDS, "every leave was seen");
        assert_eq!(other.outbox().len(), 0, "one batch took every frame");
    }

    #[test]
    fn occupied_rooms_are_those_with_members_not_those_waiting_empty() {
        let hub = hub();
        let shutdown = Shutdown::new();
        let conn = client(&shutdown);
        for room in ["a", "b", "c"] {
            join(&hub, &conn, room);
        }
        leave(&hub, &conn, "b");
        let mut occupied: Vec<String> = hub
            .occupied_rooms()
            .iter()
            .map(|r| r.as_str().to_owned())
            .collect();
        occupied.sort();
        assert_eq!(occupied, ["a", "c"]);
        assert_eq!(held(&hub), ["a", "b", "c"], "b waits, empty");
    }

    #[test]
    fn a_disconnect_that_empties_rooms_keeps_the_bound() {
        let hub = hub();
        let shutdown = Shutdown::new();
        let conn = client(&shutdown);
        hub.register(&conn);
        for room in ["d0", "d1", "d2", "d3", "d4"] {
            join(&hub, &conn, room);
        }
        hub.unregister(&conn);
        assert_eq!(held(&hub), ["d2", "d3", "d4"]);
        assert_eq!(hub.metrics.rooms.get(), 3);
        assert!(
            held(&hub)
                .iter()
                .all(|r| hub.room_detail(r).is_some_and(|d| d.members == 0))
        );
    }
}
