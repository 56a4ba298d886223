//! A connection's send queue: many producers (rooms, backends, the
//! session's own replies), one consumer (the writer task).
//!
//! Built for the broadcast path. Queueing a frame is one uncontended lock,
//! a pointer-sized push and, only when the queue goes from empty to
//! non-empty, one wake-up of the writer's registered waker (atomics, no
//! waiter list). The writer takes everything queued in one lock
//! by swapping buffers, so a burst of frames costs the writer one lock and
//! one vectored write. Nothing is allocated until the first frame arrives,
//! which keeps idle connections small. The queue is bounded both in frames
//! and in bytes (see [`QueueLimits`]).

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;

use bytes::Bytes;
use futures_util::task::AtomicWaker;

use crate::protocol::{Frame, Run};

/// Control bytes (pongs, close replies) held for a client that does not
/// read are capped: past this, the connection is failed rather than grown.
pub const MAX_CONTROL_BYTES: usize = 64 * 1024;

/// Queue buffers above this many slots are released when the queue runs
/// empty.
const IDLE_CAPACITY: usize = 16;

/// The least byte budget of a queue, however small the message size limit:
/// frames from backends may be larger than what clients may send.
pub const MIN_QUEUE_BYTES: usize = 1024 * 1024;

/// What a client's message gains on its way to the other members, beyond
/// its own size: the frame header, `"from"` and the connection id, and
/// room names longer in the frame than in the client's (escaping).
const FRAME_OVERHEAD: usize = 1024;

/// What a task has handed to send queues since the writers last had a
/// turn, counted against [`QueueLimits::turn`].
///
/// Frames that are already at hand (a backend's burst, a client's
/// pipelined frames in the read buffer) are handled without a wait, so
/// the task handling them would otherwise fill every member's queue before
/// any writer ran, and close members that read as fast as they can as slow
/// consumers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Handed {
    /// Frames, or messages that each make one frame per member.
    pub frames: usize,
    /// Their bytes.
    pub bytes: usize,
}

impl Handed {
    /// Counts one frame of `bytes`.
    pub fn add(&mut self, bytes: usize) {
        self.frames += 1;
        self.bytes = self.bytes.saturating_add(bytes);
    }

    /// Counts what `other` counted.
    pub fn absorb(&mut self, other: Handed) {
        self.frames += other.frames;
        self.bytes = self.bytes.saturating_add(other.bytes);
    }

    /// Whether `limit` was reached, in frames or in bytes.
    pub fn reached(&self, limit: Handed) -> bool {
        self.frames >= limit.frames || self.bytes >= limit.bytes
    }
}

/// How much one connection's queue may hold. Counting frames alone would
/// let a backend's large frames (a NATS payload, up to six times larger
/// once escaped into a wrapped message) pile up hundreds deep for a client
/// that does not read; the byte budget bounds what one slow client costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Data frames (`websocket.send_queue_capacity`).
    pub frames: usize,
    /// Wire bytes of those frames.
    pub bytes: usize,
}

impl QueueLimits {
    /// How much a task that hands over a burst gives each queue between two
    /// turns of the writers: half the queue at most, in frames and in bytes,
    /// so a burst on its own does not fill a queue (with a queue of one
    /// frame, one frame a turn), and at most 128 frames, so the last member
    /// of a large room does not wait long behind the first.
    pub fn turn(&self) -> Handed {
        Handed {
            frames: (self.frames / 2).clamp(1, 128),
            bytes: (self.bytes / 2).max(1),
        }
    }

    /// `frames` frames, and the bytes of as many frames carrying messages
    /// of the largest size a client may send, at least [`MIN_QUEUE_BYTES`].
    pub fn new(frames: usize, max_message_size: usize) -> Self {
        let frame = max_message_size.saturating_add(FRAME_OVERHEAD);
        Self {
            frames: frames.max(1),
            bytes: frames.saturating_mul(frame).max(MIN_QUEUE_BYTES),
        }
    }

    /// The limits of `websocket`'s settings.
    pub fn of(websocket: &crate::config::WebSocketConfig) -> Self {
        Self::new(
            websocket.send_queue_capacity,
            websocket.max_message_size_bytes,
        )
    }
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The queue holds as many frames, or as many bytes, as it may.
    Full,
    /// The writer is gone; nothing will be sent any more.
    Closed,
}

#[derive(Default)]
struct Queue {
    /// Encoded data frames: the wire bytes of one frame, or of a run of
    /// frames back to back.
    frames: VecDeque<Bytes>,
    /// Data frames in `frames`, which the capacity counts.
    queued: usize,
    /// Wire bytes in `frames`, which the byte budget counts.
    bytes: usize,
    /// Encoded control frames from the WebSocket codec, sent before the
    /// next data frames.
    control: Vec<u8>,
    closed: bool,
    /// Whether a close frame was among the control frames ever queued: the
    /// reply to a client's close, which must then be the only close frame
    /// the connection sends.
    close_queued: bool,
}

impl Queue {
    fn is_empty(&self) -> bool {
        self.frames.is_empty() && self.control.is_empty()
    }
}

/// The bounded queue between a connection's producers and its writer.
pub struct Outbox {
    queue: Mutex<Queue>,
    /// The waiting writer. There is only ever one, so a single waker slot
    /// does what a `Notify` would, without its lock and waiter list.
    writer: AtomicWaker,
    /// The session's reader, waiting for room before it handles more of
    /// its client's frames (see [`Outbox::room_for_turn`]).
    reader: AtomicWaker,
    /// Frames the reader handled since the writers' last turn. Only the
    /// reader touches it; here rather than in the reader's state because
    /// a connection's allocation has room to spare and its session task
    /// does not.
    reader_handled: AtomicUsize,
    limits: QueueLimits,
}

/// What the writer takes in one go: buffers of whole encoded frames in the
/// order they go on the wire, control frames first.
pub type Batch = VecDeque<Bytes>;

impl Outbox {
    /// A queue within `limits`.
    pub fn new(limits: QueueLimits) -> Self {
        Self {
            queue: Mutex::new(Queue::default()),
            writer: AtomicWaker::new(),
            reader: AtomicWaker::new(),
            reader_handled: AtomicUsize::new(0),
            limits,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        crate::sync::lock(&self.queue)
    }

    /// Queues a data frame without waiting.
    pub fn push(&self, frame: Frame) -> Result<(), PushError> {
        match self.push_run(&Run::from(frame)) {
            (_, Some(refused)) => Err(refused),
            (_, None) => Ok(()),
        }
    }

    /// Queues the frames of `run` in order, as many as there is room for,
    /// as one buffer and with at most one wake-up: a burst of a room's
    /// messages costs each member one queue operation, and its writer
    /// finds them together and sends them in one write. Returns how many
    /// frames were queued and, when not all, why the rest were not.
    pub fn push_run(&self, run: &Run) -> (usize, Option<PushError>) {
        let mut queue = self.lock();
        if queue.closed {
            return (0, Some(PushError::Closed));
        }
        let mut taken = run
            .len()
            .min(self.limits.frames.saturating_sub(queue.queued));
        let mut wire = run.wire(taken);
        if queue.bytes + wire.len() > self.limits.bytes {
            taken = self.fitting(run, taken, &queue);
            wire = run.wire(taken);
        }
        let was_empty = queue.is_empty();
        if taken > 0 {
            queue.bytes += wire.len();
            queue.frames.push_back(wire);
            queue.queued += taken;
        }
        drop(queue);
        // A non-empty queue has already woken the writer (or stored the
        // permit); it takes everything when it runs.
        if was_empty && taken > 0 {
            self.writer.wake();
        }
        let rest = (taken < run.len()).then_some(PushError::Full);
        (taken, rest)
    }

    /// How many of the first `n` frames of `run` fit in what is left of
    /// the byte budget: at least one into a queue holding less than half
    /// the budget, so a frame larger than what is left (or than the whole
    /// budget) still reaches a client that keeps up, even when a small
    /// frame queued just before it has not been written yet.
    fn fitting(&self, run: &Run, n: usize, queue: &Queue) -> usize {
        let room = self.limits.bytes.saturating_sub(queue.bytes);
        match run.fitting(n, room) {
            0 if queue.bytes < self.limits.bytes / 2 => n.min(1),
            fit => fit,
        }
    }

    /// Queues bytes to go out ahead of data: the held 101 response, and
    /// the welcome frame after it.
    pub fn push_control(&self, bytes: &[u8]) -> Result<(), PushError> {
        self.push_ahead(bytes, false)
    }

    /// Queues what the WebSocket codec writes (pongs, the reply to a
    /// client's close) ahead of data, noting a close frame among it. Past
    /// [`MAX_CONTROL_BYTES`] only a close frame still goes in (one per
    /// connection, at most 125 bytes of payload); pongs are refused, and
    /// the reader then closes the connection as a slow consumer.
    pub fn push_codec(&self, frames: &[u8]) -> Result<(), PushError> {
        self.push_ahead(frames, crate::protocol::has_close_frame(frames))
    }

    fn push_ahead(&self, bytes: &[u8], closes: bool) -> Result<(), PushError> {
        let mut queue = self.lock();
        if queue.closed {
            return Err(PushError::Closed);
        }
        if queue.control.len() + bytes.len() > MAX_CONTROL_BYTES && !closes {
            return Err(PushError::Full);
        }
        let was_empty = queue.is_empty();
        queue.control.extend_from_slice(bytes);
        queue.close_queued |= closes;
        drop(queue);
        if was_empty {
            self.writer.wake();
        }
        Ok(())
    }

    /// Moves everything queued into `batch` (which must be empty), reusing
    /// its buffer so steady traffic allocates nothing. Returns whether the
    /// batch starts with a buffer of control frames, which, unlike data,
    /// must still go out when the connection closes before they are written.
    pub fn take(&self, batch: &mut Batch) -> bool {
        let mut queue = self.lock();
        if queue.is_empty() {
            return false;
        }
        std::mem::swap(&mut queue.frames, batch);
        queue.queued = 0;
        queue.bytes = 0;
        let control = std::mem::take(&mut queue.control);
        drop(queue);
        self.reader.wake();
        if control.is_empty() {
            return false;
        }
        batch.push_front(Bytes::from(control));
        true
    }

    /// Counts a frame the session's reader handled; true when the writers
    /// are due a turn: half a queue of frames since the last one
    /// ([`QueueLimits::turn`]). Each frame a client sends queues at most
    /// one frame for it and one for each other member of a room, and is no
    /// larger than a queue's byte budget allows per frame, so counting
    /// frames bounds the bytes too.
    pub fn reader_handled(&self) -> bool {
        let handled = self.reader_handled.fetch_add(1, Ordering::Relaxed) + 1;
        if handled < self.limits.turn().frames {
            return false;
        }
        self.reader_handled.store(0, Ordering::Relaxed);
        true
    }

    /// Resolves once another turn of frames fits in the queue, at once if
    /// it does, or if the queue is closed. For the one reader, which waits
    /// for it before it handles more of its client's frames: the replies
    /// those frames make then wait in the client's socket, not in a queue
    /// that would overflow, and a client that sends faster than it reads
    /// is slowed down by TCP instead of being closed or losing replies.
    pub fn room_for_turn(&self) -> impl Future<Output = ()> + '_ {
        let turn = self.limits.turn();
        poll_fn(move |cx| {
            self.reader.register(cx.waker());
            let queue = self.lock();
            let fits = queue.queued + turn.frames <= self.limits.frames
                && queue.bytes.saturating_add(turn.bytes) <= self.limits.bytes;
            if fits || queue.closed {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// Releases buffers grown by a past burst if nothing is queued, so an
    /// idle connection goes back to costing almost nothing. Called now and
    /// then (on the writer's ping tick), not on every empty queue, which
    /// would free and regrow them under steady traffic.
    pub fn trim(&self, batch: &mut Batch) {
        let mut queue = self.lock();
        if queue.is_empty() && queue.frames.capacity() > IDLE_CAPACITY {
            queue.frames = VecDeque::new();
        }
        if batch.is_empty() && batch.capacity() > IDLE_CAPACITY {
            *batch = VecDeque::new();
        }
    }

    /// Resolves when something is queued, at once if something already
    /// is. For the one writer: the waker is registered before the queue is
    /// looked at, so a push in between wakes it.
    pub fn ready(&self) -> impl Future<Output = ()> + '_ {
        poll_fn(|cx| {
            self.writer.register(cx.waker());
            if self.is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
    }

    /// Stops accepting frames and frees the queued data frames: the
    /// connection is closing and no data may follow the close handshake.
    /// Returns the control frames still queued (a reply to the client's
    /// close frame must still go out).
    pub fn close(&self) -> Option<Bytes> {
        let (control, _) = self.close_keeping(false);
        control
    }

    /// Like [`Outbox::close`]; with `data`, the queued data frames are
    /// returned too, to go out before a close the gateway chose for a
    /// client that is reading (a backend's disconnect after its last
    /// words, shutdown).
    pub fn close_keeping(&self, data: bool) -> (Option<Bytes>, Batch) {
        let mut queue = self.lock();
        queue.closed = true;
        let frames = std::mem::take(&mut queue.frames);
        queue.queued = 0;
        queue.bytes = 0;
        let control = std::mem::take(&mut queue.control);
        let control = (!control.is_empty()).then(|| Bytes::from(control));
        (control, if data { frames } else { Batch::new() })
    }

    /// Whether a close frame went into the control frames (the reply to the
    /// client's close) before the queue closed. Final once it is closed:
    /// the writer then knows whether it may still send a close of its own.
    pub fn close_frame_queued(&self) -> bool {
        self.lock().close_queued
    }

    /// Frames queued now (for tests and introspection).
    pub fn len(&self) -> usize {
        self.lock().queued
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(text: &str) -> Frame {
        Frame::from_text(text.to_string())
    }

    /// Limits that only the frame count reaches in these tests.
    fn frames(n: usize) -> QueueLimits {
        QueueLimits::new(n, 64 * 1024)
    }

    #[test]
    fn bounded_and_ordered() {
        let outbox = Outbox::new(frames(2));
        assert_eq!(outbox.push(frame("a")), Ok(()));
        assert_eq!(outbox.push(frame("b")), Ok(()));
        assert_eq!(outbox.push(frame("c")), Err(PushError::Full));
        let mut batch = Batch::default();
        assert!(!outbox.take(&mut batch), "no control frames lead");
        let expected: Vec<Bytes> = ["a", "b"].iter().map(|t| frame(t).into_wire()).collect();
        assert_eq!(Vec::from(batch), expected);
        assert!(outbox.is_empty());
        assert_eq!(outbox.push(frame("d")), Ok(()));
    }

    #[test]
    fn a_run_is_queued_as_far_as_it_fits_in_order() {
        let outbox = Outbox::new(frames(3));
        outbox.push(frame("a")).expect("room");
        let run = Run::new(&[frame("b"), frame("c"), frame("d")]);
        assert_eq!(outbox.push_run(&run), (2, Some(PushError::Full)));
        assert_eq!(outbox.len(), 3, "capacity counts frames, not buffers");
        assert_eq!(outbox.push_run(&run), (0, Some(PushError::Full)));
        let mut batch = Batch::default();
        outbox.take(&mut batch);
        let wire = |texts: &[&str]| -> Vec<u8> {
            texts.iter().flat_map(|t| frame(t).into_wire()).collect()
        };
        assert_eq!(batch.len(), 2, "a single frame and a run of two");
        assert_eq!(batch[0].as_ref(), wire(&["a"]));
        assert_eq!(batch[1].as_ref(), wire(&["b", "c"]));
        assert!(outbox.is_empty());
        assert_eq!(outbox.push_run(&run), (3, None));
        assert_eq!(outbox.push_run(&Run::new(&[])), (0, None));
        outbox.close();
        assert_eq!(outbox.len(), 0);
        assert_eq!(outbox.push_run(&run), (0, Some(PushError::Closed)));
    }

    #[test]
    fn the_byte_budget_bounds_a_queue_of_large_frames() {
        let big = |c: char| frame(&c.to_string().repeat(MIN_QUEUE_BYTES / 3));
        let outbox = Outbox::new(QueueLimits::new(100, 1));
        assert_eq!(outbox.limits.bytes, MIN_QUEUE_BYTES, "the least budget");
        let defaults = QueueLimits::new(256, 64 * 1024);
        assert!(
            defaults.bytes >= 256 * (64 * 1024 + 10 + 45 + 128),
            "256 client messages of the largest size, with header, id and room"
        );
        let run = Run::new(&[big('a'), big('b'), big('c')]);
        assert_eq!(
            outbox.push_run(&run),
            (2, Some(PushError::Full)),
            "a third frame and its headers do not fit"
        );
        assert_eq!(outbox.push(big('d')), Err(PushError::Full));
        assert_eq!(outbox.push(frame("small")), Ok(()), "what fits still goes");
        let mut batch = Batch::default();
        outbox.take(&mut batch);
        assert_eq!(
            outbox.push_run(&run),
            (2, Some(PushError::Full)),
            "taken frames free their bytes"
        );
    }

    #[test]
    fn a_frame_larger_than_the_budget_goes_into_a_queue_under_half_full() {
        let huge = frame(&"h".repeat(MIN_QUEUE_BYTES * 2));
        let outbox = Outbox::new(QueueLimits::new(8, 1));
        outbox.push_control(&[0x8a, 0x00]).expect("open");
        outbox.push(frame("small")).expect("room");
        assert_eq!(
            outbox.push_run(&Run::new(&[huge.clone(), frame("x")])),
            (1, Some(PushError::Full)),
            "the huge frame, after a small one not yet written"
        );
        assert_eq!(outbox.push(frame("y")), Err(PushError::Full));
        let mut batch = Batch::default();
        assert!(outbox.take(&mut batch));
        assert_eq!(batch[2], huge.into_wire());
        assert_eq!(outbox.push(frame("z")), Ok(()));
        let half = frame(&"h".repeat(MIN_QUEUE_BYTES / 2));
        outbox.push(half).expect("half the budget fits");
        assert_eq!(
            outbox.push(frame(&"h".repeat(MIN_QUEUE_BYTES))),
            Err(PushError::Full),
            "not into a queue at least half full"
        );
    }

    #[test]
    fn a_close_reply_goes_in_past_the_control_cap_and_pongs_do_not() {
        let outbox = Outbox::new(frames(1));
        outbox
            .push_control(&vec![0; MAX_CONTROL_BYTES])
            .expect("up to the cap");
        assert_eq!(outbox.push_codec(&[0x8a, 0x00]), Err(PushError::Full));
        assert!(!outbox.close_frame_queued());
        outbox
            .push_codec(&[0x88, 0x02, 0x03, 0xe8])
            .expect("the close reply still goes in");
        assert!(outbox.close_frame_queued());
    }

    #[test]
    fn control_goes_in_its_own_capped_buffer() {
        let outbox = Outbox::new(frames(1));
        outbox.push(frame("a")).expect("room for one");
        outbox
            .push_control(&[0x8a, 0x00])
            .expect("control is not counted as a frame");
        assert_eq!(
            outbox.push_control(&vec![0; MAX_CONTROL_BYTES]),
            Err(PushError::Full)
        );
        let mut batch = Batch::default();
        assert!(outbox.take(&mut batch), "control frames lead");
        assert_eq!(batch.len(), 2);
        assert_eq!(
            batch[0].as_ref(),
            &[0x8a, 0x00][..],
            "control frames go first"
        );
    }

    #[test]
    fn closed_refuses_and_frees() {
        let outbox = Outbox::new(frames(4));
        outbox.push(frame("a")).expect("open");
        outbox.push_control(&[0x88, 0x00]).expect("open");
        assert_eq!(outbox.close().as_deref(), Some(&[0x88, 0x00][..]));
        assert!(outbox.is_empty());
        assert_eq!(outbox.push(frame("b")), Err(PushError::Closed));
        assert_eq!(outbox.push_control(&[1]), Err(PushError::Closed));
    }

    #[test]
    fn trim_releases_burst_buffers_only_when_idle() {
        let outbox = Outbox::new(frames(1000));
        let mut batch = Batch::default();
        for _ in 0..2 {
            for _ in 0..500 {
                outbox.push(frame("x")).expect("room");
            }
            outbox.take(&mut batch);
            batch.clear();
        }
        assert!(batch.capacity() >= 500, "both buffers grew");
        outbox.push(frame("y")).expect("room");
        outbox.trim(&mut batch);
        assert!(
            batch.capacity() < 500,
            "the writer's empty buffer is released"
        );
        assert_eq!(outbox.len(), 1, "a queued frame is kept");
        outbox.take(&mut batch);
        batch.clear();
        outbox.trim(&mut batch);
        let mut probe = Batch::default();
        outbox.push(frame("z")).expect("room");
        outbox.take(&mut probe);
        assert!(
            probe.capacity() < 500,
            "the queue's buffer was released too"
        );
    }

    #[test]
    fn ready_only_when_something_is_queued() {
        use futures_util::FutureExt;
        let outbox = Outbox::new(frames(4));
        assert_eq!(outbox.ready().now_or_never(), None, "empty");
        outbox.push_control(&[0x8a, 0x00]).expect("open");
        assert_eq!(outbox.ready().now_or_never(), Some(()), "control queued");
        outbox.take(&mut Batch::default());
        assert_eq!(outbox.ready().now_or_never(), None, "taken");
        outbox.push(frame("a")).expect("open");
        assert_eq!(outbox.ready().now_or_never(), Some(()), "frame queued");
    }

    #[tokio::test]
    async fn a_push_wakes_a_waiting_writer() {
        let outbox = std::sync::Arc::new(Outbox::new(frames(4)));
        let waiter = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.ready().await })
        };
        tokio::task::yield_now().await;
        outbox.push(frame("a")).expect("open");
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("task");
    }
}
