//! The shared half of a WebSocket connection: what the rest of the gateway
//! may do to a connection it does not own (queue a frame, ask it to close).
//!
//! The session task owns the socket; everybody else holds an
//! `Arc<Connection>` and talks to it through a bounded queue. Queueing never
//! waits: a full queue is the slow-consumer case and its policy applies on
//! the spot, so one client that stops reading cannot stall a broadcast.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Room;
use super::name::RoomPatterns;
use super::outbox::{Outbox, PushError, QueueLimits};
use crate::config::SlowConsumerPolicy;
use crate::metrics::CloseReason;
use crate::protocol::{Frame, Run};
use crate::shutdown::{Cancelled, Shutdown};

/// The key of the pings' payloads: random per process, so a client can echo
/// a ping it has read but cannot make up one it has not.
static PING_KEY: LazyLock<std::collections::hash_map::RandomState> =
    LazyLock::new(std::collections::hash_map::RandomState::new);

/// Close code for a client that cannot keep up (SPEC §1).
pub const CLOSE_SLOW_CONSUMER: u16 = 1013;

/// Why and how a connection is being closed; the first request wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    /// WebSocket close code sent to the client.
    pub code: u16,
    /// Text sent in the close frame.
    pub text: String,
    /// Metrics label.
    pub reason: CloseReason,
}

/// Who the client is, as established at the upgrade.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// The authenticated user, if any.
    pub user: Option<Arc<str>>,
    /// Rooms the user may join; `None` allows every room.
    pub rooms: Option<RoomPatterns>,
    /// When the credentials expire; the connection closes with 1008 then.
    pub expires_at: Option<SystemTime>,
}

/// What became of a frame handed to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for the writer.
    Queued,
    /// Queue full and the policy is `drop`: the frame is gone.
    Dropped,
    /// The connection is closing (or just got closed for being slow).
    Closing,
}

/// A connection as seen by rooms, backends and admin.
pub struct Connection {
    id: Uuid,
    id_text: Box<str>,
    identity: Identity,
    outbox: Outbox,
    policy: SlowConsumerPolicy,
    /// A child of the shutdown token: cancelled when either this connection
    /// or the gateway closes. It wakes the session's tasks; the two flags
    /// below answer "is it closing?" without the token's lock.
    closing: CancellationToken,
    /// Set before this connection cancels `closing`.
    closed: AtomicBool,
    /// Shutdown's flag, set before the parent of `closing` is cancelled.
    stopping: Arc<AtomicBool>,
    close: OnceLock<CloseRequest>,
    /// The heartbeat in one word: the number of the last ping sent (high
    /// half) and of the last ping the client answered (low half).
    heartbeat: AtomicU64,
    /// Rooms this connection is in. Locked before any room (lock order:
    /// connection, room shard, room) so membership changes from the client
    /// and from backends cannot interleave.
    rooms: Mutex<Vec<Arc<Room>>>,
}

impl Connection {
    /// Creates a connection with a fresh UUID and a queue within `limits`,
    /// which closes when anyone closes it or `shutdown` begins.
    pub fn new(
        identity: Identity,
        limits: QueueLimits,
        policy: SlowConsumerPolicy,
        shutdown: &Shutdown,
    ) -> Arc<Self> {
        let id = Uuid::new_v4();
        Arc::new(Self {
            id,
            id_text: id.hyphenated().to_string().into_boxed_str(),
            identity,
            outbox: Outbox::new(limits),
            policy,
            closing: shutdown.stopping().child_token(),
            closed: AtomicBool::new(false),
            stopping: shutdown.stop_flag(),
            close: OnceLock::new(),
            heartbeat: AtomicU64::new(0),
            rooms: Mutex::new(Vec::new()),
        })
    }

    /// The connection id, as the registry keys it.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The connection id as it appears on the wire.
    pub fn id_str(&self) -> &str {
        &self.id_text
    }

    /// Who the client is.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The user, for presence frames and NATS payloads.
    pub fn user(&self) -> Option<&str> {
        self.identity.user.as_deref()
    }

    /// Queues a frame without waiting; applies the slow-consumer policy when
    /// the queue is full.
    pub fn deliver(&self, frame: Frame) -> Delivery {
        match self.outbox.push(frame) {
            Ok(()) => Delivery::Queued,
            Err(e) => self.refused(e),
        }
    }

    /// Queues a run of frames without waiting, as many as fit; applies the
    /// slow-consumer policy to the rest. Returns how many were queued and
    /// what became of the others (`Queued` when there were none).
    pub fn deliver_run(&self, run: &Run) -> (usize, Delivery) {
        match self.outbox.push_run(run) {
            (queued, None) => (queued, Delivery::Queued),
            (queued, Some(e)) => (queued, self.refused(e)),
        }
    }

    /// What becomes of a frame the queue refused.
    fn refused(&self, error: PushError) -> Delivery {
        match error {
            PushError::Full => match self.policy {
                SlowConsumerPolicy::Drop => Delivery::Dropped,
                SlowConsumerPolicy::Close => {
                    self.close(
                        CLOSE_SLOW_CONSUMER,
                        "slow consumer",
                        CloseReason::SlowConsumer,
                    );
                    Delivery::Closing
                }
            },
            PushError::Closed => Delivery::Closing,
        }
    }

    /// The send queue, for the session's writer and reader.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Asks the session to close with `code`. The first request decides the
    /// code; later ones are ignored.
    pub fn close(&self, code: u16, text: &str, reason: CloseReason) {
        let _ = self.close.set(CloseRequest {
            code,
            text: text.to_string(),
            reason,
        });
        self.cancel();
    }

    /// Closes with 1001 for shutdown, unless a close was asked for already
    /// (the first request decides). Shutdown stops every connection at once
    /// through its token, without a request per connection; whichever of a
    /// session's tasks notices first says why with this.
    pub fn close_for_shutdown(&self) {
        self.close(1001, "server shutting down", CloseReason::Shutdown);
    }

    /// Stops the connection's tasks; [`Connection::close`] says why first.
    fn cancel(&self) {
        self.closed.store(true, Ordering::Release);
        self.closing.cancel();
    }

    /// The close request, once someone made one.
    pub fn close_request(&self) -> Option<&CloseRequest> {
        self.close.get()
    }

    /// Whether the connection is closing for any reason. Two atomic loads:
    /// the writer asks before every write.
    pub fn is_closing(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.stopping.load(Ordering::Acquire)
    }

    /// Resolves when the connection is closing for any reason. Keep one
    /// across a task's wake-ups: after its first poll, a poll with the same
    /// waker is [`Connection::is_closing`] and nothing more.
    pub fn closed(&self) -> Cancelled<'_, impl Fn() -> bool + '_> {
        Cancelled::new(&self.closing, || self.is_closing())
    }

    /// Numbers the next ping and returns its number and payload. The
    /// payload is a keyed hash of the connection and the number, which the
    /// client's pong must echo (RFC 6455 §5.5.3): so only a pong to a ping
    /// that reached the client counts, and a client that stopped reading
    /// cannot stay by sending pongs of its own.
    pub fn next_ping(&self) -> (u32, [u8; 8]) {
        let before = self.heartbeat.fetch_add(1 << 32, Ordering::Relaxed);
        let number = ((before >> 32) as u32).wrapping_add(1);
        (number, self.ping_payload(number))
    }

    /// Records a pong from the client. It answers a ping when it echoes the
    /// payload of the last ping sent or of the one before (a slow client
    /// may answer a ping just as the next goes out); any other pong is
    /// allowed by RFC 6455 and ignored.
    pub fn pong_received(&self, payload: &[u8]) {
        let last = (self.heartbeat.load(Ordering::Relaxed) >> 32) as u32;
        let Some(number) = [last, last.wrapping_sub(1)]
            .into_iter()
            .find(|&n| n != 0 && payload == self.ping_payload(n))
        else {
            return;
        };
        let _ = self
            .heartbeat
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |state| {
                let answered = state as u32;
                (number > answered).then_some(state & !u64::from(u32::MAX) | u64::from(number))
            });
    }

    /// Whether the client has answered ping `number` or a later one.
    pub fn answered(&self, number: u32) -> bool {
        let answered = self.heartbeat.load(Ordering::Relaxed) as u32;
        // Ping numbers only grow (they would wrap after 2^32 pings).
        answered >= number
    }

    fn ping_payload(&self, number: u32) -> [u8; 8] {
        PING_KEY.hash_one((self.id.as_u128(), number)).to_be_bytes()
    }

    /// The membership list, locked.
    pub(super) fn rooms(&self) -> MutexGuard<'_, Vec<Arc<Room>>> {
        crate::sync::lock(&self.rooms)
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.id_text)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shutdown::tests::seen_across_wake_ups;

    /// Closes a fresh connection with `how` while a task waits on one
    /// `closed()` future across several wake-ups; that task must see it.
    async fn closing_is_seen(how: impl FnOnce(&Connection, &Shutdown)) {
        let shutdown = Shutdown::new();
        let conn = Connection::new(
            Identity::default(),
            QueueLimits::new(4, 64),
            SlowConsumerPolicy::Close,
            &shutdown,
        );
        let waiting = conn.clone();
        seen_across_wake_ups(async move { waiting.closed().await }, || {
            assert!(!conn.is_closing());
            how(&conn, &shutdown);
            assert!(conn.is_closing());
        })
        .await;
    }

    #[tokio::test]
    async fn a_close_request_is_seen_by_a_long_lived_wait() {
        closing_is_seen(|conn, _| conn.close(1008, "bye", CloseReason::TokenExpired)).await;
    }

    #[tokio::test]
    async fn a_cancel_is_seen_by_a_long_lived_wait() {
        closing_is_seen(|conn, _| conn.cancel()).await;
    }

    #[tokio::test]
    async fn shutdown_is_seen_by_a_long_lived_wait() {
        closing_is_seen(|_, shutdown| shutdown.begin()).await;
    }

    #[test]
    fn only_a_pong_echoing_a_recent_ping_answers_it() {
        let shutdown = Shutdown::new();
        let conn = Connection::new(
            Identity::default(),
            QueueLimits::new(4, 64),
            SlowConsumerPolicy::Close,
            &shutdown,
        );
        let (first, first_payload) = conn.next_ping();
        conn.pong_received(b"");
        conn.pong_received(&[0; 8]);
        assert!(!conn.answered(first), "a pong of its own making");
        let other = Connection::new(
            Identity::default(),
            QueueLimits::new(4, 64),
            SlowConsumerPolicy::Close,
            &shutdown,
        );
        let (_, others) = other.next_ping();
        assert_ne!(others, first_payload, "payloads differ per connection");
        conn.pong_received(&others);
        assert!(!conn.answered(first), "another connection's ping");

        let (second, second_payload) = conn.next_ping();
        assert_ne!(second_payload, first_payload);
        conn.pong_received(&first_payload);
        assert!(
            conn.answered(first),
            "the ping before the last still counts"
        );
        assert!(!conn.answered(second));
        conn.pong_received(&second_payload);
        assert!(conn.answered(second));
        conn.pong_received(&first_payload);
        assert!(conn.answered(second), "a late echo does not undo an answer");

        let (third, _) = conn.next_ping();
        let (fourth, _) = conn.next_ping();
        conn.pong_received(&first_payload);
        assert!(!conn.answered(third) && !conn.answered(fourth), "too old");
    }
}
