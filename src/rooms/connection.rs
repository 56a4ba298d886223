//! The shared half of a WebSocket connection: what the rest of the gateway
//! may do to a connection it does not own (queue a frame, ask it to close).
//!
//! The session task owns the socket; everybody else holds an
//! `Arc<Connection>` and talks to it through a bounded queue. Queueing never
//! waits: a full queue is the slow-consumer case and its policy applies on
//! the spot, so one client that stops reading cannot stall a broadcast.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Room;
use super::name::RoomPatterns;
use super::outbox::{Outbox, PushError};
use crate::config::SlowConsumerPolicy;
use crate::metrics::CloseReason;
use crate::protocol::{Frame, Run};
use crate::shutdown::{Cancelled, Shutdown};

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
    pongs: AtomicU64,
    /// Rooms this connection is in. Locked before any room (lock order:
    /// connection, room shard, room) so membership changes from the client
    /// and from backends cannot interleave.
    rooms: Mutex<Vec<Arc<Room>>>,
}

impl Connection {
    /// Creates a connection with a fresh UUID and a queue of `capacity`
    /// frames, which closes when anyone closes it or `shutdown` begins.
    pub fn new(
        identity: Identity,
        capacity: usize,
        policy: SlowConsumerPolicy,
        shutdown: &Shutdown,
    ) -> Arc<Self> {
        let id = Uuid::new_v4();
        Arc::new(Self {
            id,
            id_text: id.hyphenated().to_string().into_boxed_str(),
            identity,
            outbox: Outbox::new(capacity),
            policy,
            closing: shutdown.stopping().child_token(),
            closed: AtomicBool::new(false),
            stopping: shutdown.stop_flag(),
            close: OnceLock::new(),
            pongs: AtomicU64::new(0),
            rooms: Mutex::new(Vec::new()),
        })
    }

    /// The connection id.
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

    /// Stops the connection's tasks without a close request of its own:
    /// the writer then closes as for shutdown, unless a request comes first.
    pub fn cancel(&self) {
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

    /// Records a pong from the client (heartbeat).
    pub fn pong_received(&self) {
        self.pongs.fetch_add(1, Ordering::Relaxed);
    }

    /// Pongs received so far; the writer compares it across a ping.
    pub fn pongs(&self) -> u64 {
        self.pongs.load(Ordering::Relaxed)
    }

    /// The membership list, locked.
    pub(super) fn rooms(&self) -> MutexGuard<'_, Vec<Arc<Room>>> {
        // A panic while holding this lock would be a bug in this module; the
        // list itself stays consistent, so keep serving.
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
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
        let conn = Connection::new(Identity::default(), 4, SlowConsumerPolicy::Close, &shutdown);
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
}
