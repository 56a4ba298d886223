//! The writer task of a session: the only code that writes to a client's
//! socket.
//!
//! It takes everything queued for the connection in one go and writes it
//! with one vectored write: the frames are the shared, pre-encoded buffers
//! of the broadcast, so nothing is copied or encoded per recipient. It also
//! sends the heartbeat pings and, at the end, the close frame.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io::IoSlice;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::io::AsyncWrite;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
use tracing::debug;

use super::session::{CLOSE_ABNORMAL, CLOSE_NO_STATUS, SessionSettings};
use super::ticker::Ticker;
use crate::metrics::CloseReason;
use crate::protocol;
use crate::rooms::{Batch, Connection};

/// Most buffers handed to one `writev` (Linux accepts 1024).
const MAX_IOV: usize = 128;

/// Buffers of a typical write: a run, perhaps after a ping or control frames.
const FEW_IOV: usize = 4;

/// The first two bytes of a ping frame with an 8-byte payload, unmasked.
const PING_HEAD: [u8; 2] = [0x89, 0x08];

/// Ping bookkeeping: after a ping, the client has `pong_timeout` to answer.
struct Heartbeat {
    deadline: Option<Instant>,
    /// The number of the ping the deadline waits on.
    ping: u32,
}

impl Heartbeat {
    /// Starts the clock for ping `number`, unless an earlier ping is
    /// still unanswered: that one keeps its deadline. Restarting the clock
    /// on every ping would never expire when `pong_timeout` is not shorter
    /// than `ping_interval` (the next tick comes first and resets it), so a
    /// dead client would be kept forever.
    fn ping_sent(&mut self, conn: &Connection, number: u32, timeout: Duration) {
        if self.deadline.is_some() && !conn.answered(self.ping) {
            return;
        }
        self.deadline = Some(Instant::now() + timeout);
        self.ping = number;
    }

    /// Called at the deadline: when the ping went unanswered, closes `conn`
    /// for it and returns `true`.
    fn lapsed(&mut self, conn: &Connection) -> bool {
        self.deadline = None;
        let lapsed = !conn.answered(self.ping);
        if lapsed {
            conn.close(1001, "ping timeout", CloseReason::PingTimeout);
        }
        lapsed
    }
}

/// The only task that writes to a client's socket, so frames from the
/// reader, the hub and the heartbeat never interleave on the wire.
pub struct Writer {
    io: OwnedWriteHalf,
    conn: Arc<Connection>,
    /// The one setting it needs after start: the rest would only make
    /// every connection's writer task larger.
    pong_timeout: Duration,
    batch: Batch,
    /// Bytes of the first buffer of `batch` already written: not zero when
    /// a write was abandoned in the middle of it.
    front_written: usize,
    heartbeat: Heartbeat,
    /// The payload of a ping that fell due (its deadline runs) but has not
    /// been written yet.
    ping_due: Option<[u8; 8]>,
    ticker: Ticker,
    /// Buffers at the front of `batch`, as taken, that are control frames:
    /// the held-back 101 response before the first write, a ping, pongs,
    /// the reply to the client's close frame. Unlike data, they are owed to
    /// the client even when the connection closes before they are written.
    control_parts: u8,
    /// `batch.len()` when it was taken: the buffers since written are the
    /// difference. Both counts are small so the writer task, one per
    /// connection, stays in its allocation size class.
    taken_parts: u32,
}

impl Writer {
    /// A writer for `conn` on the sending half `io`.
    pub fn new(io: OwnedWriteHalf, conn: Arc<Connection>, settings: &SessionSettings) -> Self {
        let ticker = Ticker::new(settings.ping_interval);
        Self {
            io,
            conn,
            pong_timeout: settings.pong_timeout,
            batch: VecDeque::new(),
            front_written: 0,
            heartbeat: Heartbeat {
                deadline: None,
                ping: 0,
            },
            ping_due: None,
            ticker,
            control_parts: 0,
            taken_parts: 0,
        }
    }

    /// Writes until the connection closes, then closes the WebSocket.
    /// Returns the sending half, for the session to drop (FIN) when it is
    /// done, and the deadline for the client's close reply when our close
    /// frame went out (see [`Writer::finish`]).
    pub async fn run(mut self) -> (OwnedWriteHalf, Option<Instant>) {
        let conn = self.conn.clone();
        // One for the writer's life: it registers with the closing token
        // once, and then costs an atomic load per wake-up.
        let mut closed = pin!(conn.closed());
        loop {
            self.take_batch();
            if self.batch.is_empty() {
                if self.wait(closed.as_mut()).await {
                    continue;
                }
                break;
            }
            match self.guarded_write(closed.as_mut()).await {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    debug!(error = %e, "write failed");
                    self.conn.close(CLOSE_ABNORMAL, "", write_failure(&e));
                    break;
                }
                None => break,
            }
        }
        // Boxed: the close handshake runs once per connection, and its
        // state inline would make every connection's writer task larger
        // for its whole life (about 200 bytes).
        Box::pin(self.finish()).await
    }

    /// Takes everything queued, with a ping that fell due in front (the
    /// batch is whole frames here, so the ping may go first), and notes
    /// which of its buffers are control frames.
    fn take_batch(&mut self) {
        self.control_parts = u8::from(self.conn.outbox().take(&mut self.batch));
        if let Some(payload) = self.ping_due.take() {
            self.batch.push_front(ping_frame(payload));
            self.control_parts += 1;
        }
        // A batch is bounded by the send queue's capacity, far below this.
        self.taken_parts = u32::try_from(self.batch.len()).unwrap_or(u32::MAX);
    }

    /// A ping falls due: its deadline starts now, and it is sent with the
    /// next write.
    fn ping_due(
        heartbeat: &mut Heartbeat,
        ping_due: &mut Option<[u8; 8]>,
        conn: &Connection,
        timeout: Duration,
    ) {
        let (number, payload) = conn.next_ping();
        heartbeat.ping_sent(conn, number, timeout);
        *ping_due = Some(payload);
    }

    /// Waits for frames, the next ping, the heartbeat deadline or closing;
    /// `false` when the connection is closing.
    async fn wait(&mut self, mut closed: Pin<&mut impl Future<Output = ()>>) -> bool {
        loop {
            tokio::select! {
                biased;
                _ = closed.as_mut() => return false,
                _ = until(self.heartbeat.deadline), if self.heartbeat.deadline.is_some() => {
                    if self.heartbeat.lapsed(&self.conn) {
                        return false;
                    }
                }
                _ = self.ticker.tick() => {
                    self.conn.outbox().trim(&mut self.batch);
                    Self::ping_due(&mut self.heartbeat, &mut self.ping_due, &self.conn, self.pong_timeout);
                    return true;
                }
                _ = self.conn.outbox().ready() => return true,
            }
        }
    }

    /// Writes the batch, but gives up when the connection starts closing or
    /// an unanswered ping expires meanwhile (a client that stops reading
    /// also stops answering). `None` means the write was abandoned.
    ///
    /// A ping that falls due during a write starts its deadline at once
    /// and is sent right after the write. So a client that stopped reading,
    /// whose write never completes, is closed for not answering after
    /// `pong_timeout` like any other, instead of being kept open for as long
    /// as it does not read; a busy but healthy client gets its ping a moment
    /// later and answers in time.
    async fn guarded_write(
        &mut self,
        mut closed: Pin<&mut impl Future<Output = ()>>,
    ) -> Option<std::io::Result<()>> {
        let Self {
            io,
            conn,
            pong_timeout,
            batch,
            front_written,
            heartbeat,
            ping_due,
            ticker,
            ..
        } = self;
        // Most writes complete at once, as the socket has room. For them the
        // guards below are checked directly: setting up the `select!` (a
        // timer for the heartbeat deadline, the write's own future) would
        // cost more than the write itself.
        if conn.is_closing() {
            return None;
        }
        if heartbeat.deadline.is_some_and(|at| at <= Instant::now()) && heartbeat.lapsed(conn) {
            return None;
        }
        if poll_fn(|cx| Poll::Ready(ticker.poll_tick(cx).is_ready())).await {
            Self::ping_due(heartbeat, ping_due, conn, *pong_timeout);
        }
        let mut write = pin!(write_all(io, batch, front_written));
        // A write that cannot finish has registered for the socket's
        // readiness, and is polled again below with the task's waker.
        if let Some(result) = (&mut write).now_or_never() {
            return Some(result);
        }
        loop {
            tokio::select! {
                biased;
                _ = closed.as_mut() => return None,
                _ = until(heartbeat.deadline), if heartbeat.deadline.is_some() => {
                    if heartbeat.lapsed(conn) {
                        return None;
                    }
                }
                _ = ticker.tick() => Self::ping_due(heartbeat, ping_due, conn, *pong_timeout),
                result = &mut write => return Some(result),
            }
        }
    }

    /// Ends the WebSocket: sends our close frame (or the reply to the
    /// client's), bounded by `pong_timeout` so a client that stopped reading
    /// cannot hold the task. Queued data frames go first when the gateway
    /// closes a client that did nothing wrong ([`delivers_queued`]), and
    /// are dropped otherwise: nothing may follow a close frame. Returns the
    /// same deadline when our close frame was sent (other than at
    /// shutdown), for the session to wait for the client's reply until then.
    async fn finish(mut self) -> (OwnedWriteHalf, Option<Instant>) {
        // Stopped without a close request: only shutdown does that.
        self.conn.close_for_shutdown();
        let request = self.conn.close_request().cloned();
        let wanted = request.as_ref().is_some_and(|r| delivers_queued(r.reason));
        let (control, data) = self.conn.outbox().close_keeping(wanted);
        let Some(request) = request else {
            return (self.io, None);
        };
        // Nothing after the reply to a client's close, which a kick may
        // have raced (the reply is then queued or in the batch).
        let keep = wanted && !self.conn.outbox().close_frame_queued();
        let deadline = Instant::now() + self.pong_timeout;
        let mut out = if keep { self.rest() } else { self.owed() };
        out.extend(control);
        if keep {
            out.extend(data);
        }
        // One close frame per connection (RFC 6455 §5.5.1): none of ours
        // once the reply to the client's own close was queued, even when a
        // kick or a slow-consumer close got its reason in first.
        let ours = request.reason != CloseReason::Client
            && request.code != CLOSE_ABNORMAL
            && request.code != CLOSE_NO_STATUS
            && !self.conn.outbox().close_frame_queued();
        if ours {
            out.push_back(close_frame(request.code, &request.text));
        }
        let mut written = 0;
        let sent =
            tokio::time::timeout_at(deadline, write_all(&mut self.io, &mut out, &mut written))
                .await;
        if !matches!(sent, Ok(Ok(()))) {
            super::io::reset_on_close(self.io.as_ref());
        }
        // At shutdown the whole gateway is going away, bounded by
        // `shutdown_grace_secs`: it does not also wait on every idle
        // client's reply.
        let awaits_reply = ours && request.reason != CloseReason::Shutdown;
        let awaits = (matches!(sent, Ok(Ok(()))) && awaits_reply).then_some(deadline);
        (self.io, awaits)
    }
}

impl Writer {
    /// All of the batch in progress, less what was written of it.
    fn rest(&mut self) -> Batch {
        let mut rest = std::mem::take(&mut self.batch);
        if let Some(front) = rest.front_mut() {
            *front = front.slice(self.front_written.min(front.len())..);
        }
        rest
    }

    /// What of an abandoned batch must still go out before a close frame:
    /// its control frames not yet written (before the first write, the 101
    /// among them: without it the client would read WebSocket bytes where
    /// it waits for an HTTP answer), or else the rest of a data frame the
    /// write stopped in the middle of. The data frames after that are
    /// dropped: the connection is closing, and only what keeps the stream
    /// well-formed and answers the client is owed.
    fn owed(&mut self) -> Batch {
        let left = u32::try_from(self.batch.len()).unwrap_or(u32::MAX);
        let written_parts = self.taken_parts.saturating_sub(left);
        let control_left = u32::from(self.control_parts).saturating_sub(written_parts) as usize;
        let Some(front) = self.batch.front() else {
            return Batch::new();
        };
        let start = self.front_written.min(front.len());
        if control_left > 0 {
            let mut owed: Batch = self.batch.drain(..control_left).collect();
            owed[0] = owed[0].slice(start..);
            return owed;
        }
        if start == 0 {
            return Batch::new();
        }
        let end = protocol::frame_end(front, start);
        Batch::from([front.slice(start..end)])
    }
}

/// Whether a close for `reason` first delivers the frames queued before
/// it: a backend's disconnect (a "goodbye" published just before it must
/// not be lost), token expiry and shutdown close a client that is reading
/// and did nothing wrong. A close for a fault (a slow consumer, a protocol
/// error, a lost pong) drops them, as does the client's own close.
fn delivers_queued(reason: CloseReason) -> bool {
    matches!(
        reason,
        CloseReason::Kicked | CloseReason::TokenExpired | CloseReason::Shutdown
    )
}

/// Why a write failed, for the metrics: a client that reset or closed its
/// connection went away, as when the reader meets the same end first;
/// anything else is an error.
fn write_failure(e: &std::io::Error) -> CloseReason {
    if crate::net::peer_gone(e.kind()) {
        CloseReason::Client
    } else {
        CloseReason::Error
    }
}

/// An encoded ping frame carrying `payload`.
fn ping_frame(payload: [u8; 8]) -> Bytes {
    let mut frame = [0; 10];
    frame[..2].copy_from_slice(&PING_HEAD);
    frame[2..].copy_from_slice(&payload);
    Bytes::copy_from_slice(&frame)
}

/// An encoded close frame.
fn close_frame(code: u16, text: &str) -> Bytes {
    let frame = WsFrame::close(Some(CloseFrame {
        code: code.into(),
        reason: text.into(),
    }));
    let mut out = Vec::with_capacity(4 + text.len());
    // Writing into a Vec cannot fail.
    let _ = frame.format(&mut out);
    Bytes::from(out)
}

/// Sleeps until `at`, or for ever without it. Nothing is done before the
/// first poll, so a `select!` branch disabled for want of a deadline costs
/// neither a timer nor a clock read.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One `writev` of the first `N` buffers of `parts`, skipping the first
/// `skip` bytes of the first. The slice array lives on the stack for the
/// call only, not in every connection's task.
fn poll_write_parts<const N: usize>(
    io: &mut OwnedWriteHalf,
    cx: &mut std::task::Context<'_>,
    parts: &Batch,
    skip: usize,
) -> Poll<std::io::Result<usize>> {
    let mut slices = [IoSlice::new(&[]); N];
    let mut count = 0;
    for (slot, part) in slices.iter_mut().zip(parts.iter()) {
        *slot = IoSlice::new(part);
        count += 1;
    }
    if let Some(first) = parts.front() {
        slices[0] = IoSlice::new(&first[skip..]);
    }
    Pin::new(io).poll_write_vectored(cx, &slices[..count])
}

/// Writes every buffer of `parts` with as few `writev` calls as the kernel
/// allows, removing what has been written. `front_written` counts the bytes
/// of the first buffer already written, so an abandoned call leaves an exact
/// record of what is still owed to the client.
async fn write_all(
    io: &mut OwnedWriteHalf,
    parts: &mut Batch,
    front_written: &mut usize,
) -> std::io::Result<()> {
    while let Some(front) = parts.front() {
        let skip = (*front_written).min(front.len());
        let written = poll_fn(|cx| {
            // A run of a room's frames is one buffer, so most writes have
            // one or two: filling a full `MAX_IOV` array for them would
            // cost more instructions than the rest of the write path.
            if parts.len() <= FEW_IOV {
                poll_write_parts::<FEW_IOV>(io, cx, parts, skip)
            } else {
                poll_write_parts::<MAX_IOV>(io, cx, parts, skip)
            }
        })
        .await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut done = skip + written;
        while let Some(front) = parts.front() {
            if front.len() > done {
                break;
            }
            done -= front.len();
            parts.pop_front();
        }
        *front_written = done;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SlowConsumerPolicy;
    use crate::protocol::Frame;
    use crate::rooms::{Identity, QueueLimits};
    use crate::shutdown::Shutdown;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A writer on one end of a loopback connection, and the other end.
    async fn writer_and_client() -> (Writer, Arc<Connection>, TcpStream, Shutdown) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let (_, write) = server.into_split();
        let shutdown = Shutdown::new();
        let conn = Connection::new(
            Identity::default(),
            QueueLimits::new(8, 64),
            SlowConsumerPolicy::Close,
            &shutdown,
        );
        let settings = SessionSettings {
            ping_interval: Duration::from_secs(3600),
            pong_timeout: Duration::from_secs(5),
            max_messages_per_sec: 0,
            client_broadcast: true,
        };
        let writer = Writer::new(write, conn.clone(), &settings);
        (writer, conn, client, shutdown)
    }

    /// The connection closes between the writer taking a batch and its
    /// first byte going out, as when the reader queues the reply to the
    /// client's close frame and closes the connection while the writer, on
    /// the other thread, takes that reply with the data queued behind it.
    /// The data is dropped; the reply still goes out.
    #[tokio::test]
    async fn control_frames_taken_just_before_the_close_still_go_out() {
        let (mut writer, conn, mut client, _shutdown) = writer_and_client().await;
        let first = Frame::from_text("{\"type\":\"first\"}".into()).into_wire();
        conn.deliver(Frame::from_text("{\"type\":\"first\"}".into()));
        writer.take_batch();
        let mut closed = pin!(conn.closed());
        assert!(matches!(
            writer.guarded_write(closed.as_mut()).await,
            Some(Ok(()))
        ));

        let close_reply = [0x88, 0x02, 0x03, 0xe8];
        conn.outbox().push_codec(&close_reply).expect("open");
        conn.deliver(Frame::from_text("{\"type\":\"second\"}".into()));
        writer.take_batch();
        conn.close(1000, "", CloseReason::Client);
        assert!(writer.guarded_write(closed.as_mut()).await.is_none());
        let (io, awaits_reply) = writer.finish().await;
        assert_eq!(awaits_reply, None, "the client closed first");
        drop(io);

        let mut received = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut received))
            .await
            .expect("the writer's side ends")
            .expect("read");
        let expected: Vec<u8> = first.iter().chain(&close_reply).copied().collect();
        assert_eq!(received, expected, "the first frame, then the close reply");
    }

    /// Reads what the writer sent until its side ends.
    async fn received(mut client: TcpStream) -> Vec<u8> {
        let mut received = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut received))
            .await
            .expect("the writer's side ends")
            .expect("read");
        received
    }

    /// A backend's kick lands after the reader read the client's close
    /// frame but before it closed the connection as the client's: the kick
    /// names the reason, and the reply to the client's close is queued
    /// after. Only the reply goes out, whether it is still queued or was
    /// already written: one close frame per connection (RFC 6455 §5.5.1),
    /// and no data after it, though a kick otherwise delivers what was
    /// queued.
    #[tokio::test]
    async fn a_kick_racing_the_clients_close_sends_one_close_frame() {
        let close_reply = [0x88, 0x02, 0x03, 0xe8];
        for written_first in [false, true] {
            let (mut writer, conn, client, _shutdown) = writer_and_client().await;
            if written_first {
                conn.outbox().push_codec(&close_reply).expect("open");
                writer.take_batch();
                let mut closed = pin!(conn.closed());
                assert!(matches!(
                    writer.guarded_write(closed.as_mut()).await,
                    Some(Ok(()))
                ));
                conn.close(1008, "kicked", CloseReason::Kicked);
            } else {
                conn.close(1008, "kicked", CloseReason::Kicked);
                conn.outbox().push_codec(&close_reply).expect("open");
            }
            conn.deliver(Frame::from_text("{\"type\":\"late\"}".into()));
            conn.close(1000, "", CloseReason::Client);
            let (io, awaits_reply) = writer.finish().await;
            assert_eq!(awaits_reply, None, "the client closed first");
            drop(io);
            assert_eq!(
                received(client).await,
                close_reply,
                "written first: {written_first}"
            );
        }
    }
}
