//! One WebSocket session: a reader that serves the client's frames and a
//! writer that owns the socket's sending side.
//!
//! The reader runs in the session's task and the writer in its own; both
//! stop when the connection's `closing` token is cancelled, by either of
//! them, by a backend, by the slow-consumer policy or by shutdown. The
//! writer is the only one that writes: it drains the connection's bounded
//! queue in batches (feed many frames, flush once), sends the heartbeat pings
//! and, at the end, the close frame.

use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tracing::{Instrument, debug};

use super::ratelimit::TokenBucket;
use crate::events::{Event, now_ms};
use crate::metrics::{CloseReason, Metrics};
use crate::protocol::{self, ErrorCode, Refusal, Request};
use crate::rooms::{Connection, Hub, Outbox, RoomName};

/// The WebSocket over an upgraded hyper connection.
pub type WsStream = WebSocketStream<TokioIo<Upgraded>>;

/// Most frames written between two flushes.
const MAX_BATCH: usize = 256;

/// Close codes that must not be sent in a close frame (RFC 6455 §7.4.1).
const CLOSE_NO_STATUS: u16 = 1005;
const CLOSE_ABNORMAL: u16 = 1006;

/// Per-session settings, resolved once from the configuration.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Interval between pings.
    pub ping_interval: Duration,
    /// Time a ping may stay unanswered; also bounds the close handshake.
    pub pong_timeout: Duration,
    /// Incoming frames per second, 0 for unlimited.
    pub max_messages_per_sec: u32,
    /// Whether client messages are delivered to the room locally.
    pub client_broadcast: bool,
}

/// What every session shares.
pub struct SessionContext {
    /// Rooms and connections.
    pub hub: Arc<Hub>,
    /// Counters.
    pub metrics: Metrics,
    /// Settings.
    pub settings: SessionSettings,
}

/// Runs a session to its end: registers the connection, serves it, and
/// cleans up every trace of it (rooms, registry, metrics) when it closes.
pub async fn run(ws: WsStream, conn: Arc<Connection>, outbox: Outbox, ctx: Arc<SessionContext>) {
    let hub = &ctx.hub;
    hub.deliver(&conn, protocol::welcome(conn.id_str()));
    hub.register(&conn);
    ctx.metrics.connections.inc();
    ctx.metrics.connections_opened.inc();
    hub.events().publish(Event::ConnectionOpen {
        conn: conn.clone(),
        ts: now_ms(),
    });
    debug!("connection opened");

    let (sink, mut stream) = ws.split();
    let writer = tokio::spawn(
        write_loop(sink, outbox, conn.clone(), ctx.settings.clone())
            .instrument(tracing::Span::current()),
    );
    Reader::new(&conn, &ctx).run(&mut stream).await;
    conn.closing().cancel();
    // Leave every room as soon as the connection is closing, not when the
    // close handshake is over: the writer may wait up to `pong_timeout` for
    // a stalled client to take its close frame, and meanwhile the member
    // would still fill a `max_members` slot, be listed and miss its
    // presence `leave`, while nothing more can reach it.
    hub.unregister(&conn);
    match writer.await {
        Ok(Some(deadline)) => await_close_reply(&mut stream, deadline).await,
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "writer task failed"),
    }
    let (code, reason) = conn
        .close_request()
        .map(|r| (r.code, r.reason))
        .unwrap_or((CLOSE_ABNORMAL, CloseReason::Error));
    ctx.metrics.connections.dec();
    ctx.metrics.connection_closed(reason);
    hub.events().publish(Event::ConnectionClose {
        conn: conn.clone(),
        code,
        ts: now_ms(),
    });
    debug!(code, reason = reason.as_str(), "connection closed");
}

/// The reading half: parses frames and acts on them.
struct Reader<'a> {
    conn: &'a Arc<Connection>,
    ctx: &'a SessionContext,
    limit: Option<TokenBucket>,
}

impl<'a> Reader<'a> {
    fn new(conn: &'a Arc<Connection>, ctx: &'a SessionContext) -> Self {
        Self {
            conn,
            ctx,
            limit: TokenBucket::new(ctx.settings.max_messages_per_sec, Instant::now()),
        }
    }

    async fn run(mut self, stream: &mut SplitStream<WsStream>) {
        let expiry = pin!(expiry_sleep(self.conn.identity().expires_at));
        let mut expiry = expiry;
        loop {
            let next = tokio::select! {
                biased;
                _ = self.conn.closing().cancelled() => return,
                _ = &mut expiry => {
                    self.conn.close(1008, "token expired", CloseReason::TokenExpired);
                    return;
                }
                next = stream.next() => next,
            };
            match next {
                Some(Ok(message)) => {
                    if !self.on_message(message) {
                        return;
                    }
                }
                Some(Err(e)) => {
                    self.on_error(e);
                    return;
                }
                None => {
                    self.conn.close(CLOSE_ABNORMAL, "", CloseReason::Client);
                    return;
                }
            }
        }
    }

    /// Handles one message; `false` ends the session.
    fn on_message(&mut self, message: Message) -> bool {
        match message {
            Message::Text(text) => {
                self.count_in(text.len());
                if self.admit(Some(text.as_str())) {
                    self.on_text(text);
                }
            }
            Message::Binary(data) => {
                self.count_in(data.len());
                if self.admit(None) {
                    self.refuse(
                        Refusal::new(
                            ErrorCode::BinaryNotSupported,
                            "binary frames are not supported",
                        ),
                        None,
                    );
                }
            }
            Message::Pong(_) => self.conn.pong_received(),
            // tungstenite queues the pong itself; the writer's next flush sends it.
            Message::Ping(_) | Message::Frame(_) => {}
            Message::Close(frame) => {
                let code = frame.map(|f| u16::from(f.code)).unwrap_or(CLOSE_NO_STATUS);
                self.conn.close(code, "", CloseReason::Client);
                return false;
            }
        }
        true
    }

    fn on_error(&self, error: WsError) {
        use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
        match error {
            WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
                self.conn
                    .close(1009, "message too big", CloseReason::TooBig)
            }
            WsError::Capacity(_) => self
                .conn
                .close(1009, "message too big", CloseReason::TooBig),
            WsError::Utf8(_) => self.conn.close(1007, "invalid UTF-8", CloseReason::Error),
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) | WsError::Io(_) => {
                self.conn.close(CLOSE_ABNORMAL, "", CloseReason::Client)
            }
            WsError::Protocol(e) => {
                debug!(error = %e, "protocol error");
                self.conn.close(1002, "protocol error", CloseReason::Error)
            }
            other => {
                debug!(error = %other, "read failed");
                self.conn.close(CLOSE_ABNORMAL, "", CloseReason::Error)
            }
        }
    }

    fn count_in(&self, len: usize) {
        self.ctx.metrics.messages_received.inc();
        self.ctx.metrics.bytes_received.inc_by(len as u64);
    }

    /// Applies the rate limit; a refused frame gets `rate_limited`, with the
    /// `id` of `text` when it has one.
    fn admit(&mut self, text: Option<&str>) -> bool {
        let Some(bucket) = &mut self.limit else {
            return true;
        };
        if bucket.try_take(Instant::now()) {
            return true;
        }
        self.ctx.metrics.dropped_rate_limited.inc();
        let id = text.and_then(protocol::request_id);
        self.refuse(
            Refusal::new(ErrorCode::RateLimited, "too many frames per second"),
            id.as_deref(),
        );
        false
    }

    fn on_text(&self, text: Utf8Bytes) {
        let (id, request) = protocol::parse(text.as_str());
        let id = id.as_deref();
        let result = request.and_then(|request| match request {
            Request::Join { room } => self.join(&room, id),
            Request::Leave { room } => self.leave(&room, id),
            Request::Message { room, content } => self.message(&room, &text, content.get(), id),
        });
        if let Err(refusal) = result {
            self.refuse(refusal, id);
        }
    }

    fn join(&self, room: &str, id: Option<&str>) -> Result<(), Refusal> {
        let name = room_name(room)?;
        self.ctx
            .hub
            .join(self.conn, &name, protocol::joined(name.as_str(), id))
    }

    fn leave(&self, room: &str, id: Option<&str>) -> Result<(), Refusal> {
        let name = room_name(room)?;
        self.ctx.hub.leave(
            self.conn,
            name.as_str(),
            protocol::left(name.as_str(), id, false),
        )
    }

    fn message(
        &self,
        room: &str,
        text: &Utf8Bytes,
        content: &str,
        id: Option<&str>,
    ) -> Result<(), Refusal> {
        let name = room_name(room)?;
        let hub = &self.ctx.hub;
        if !hub.config().enabled {
            return Err(Refusal::new(ErrorCode::RoomsDisabled, "rooms are disabled"));
        }
        let Some(room) = hub.membership(self.conn, name.as_str()) else {
            return Err(Refusal::new(
                ErrorCode::NotMember,
                "not a member of this room",
            ));
        };
        if self.ctx.settings.client_broadcast {
            let frame = protocol::message(Some(name.as_str()), content, self.conn.id_str());
            hub.broadcast(&room, &frame, Some(self.conn.id()));
        }
        if hub.events().enabled() {
            hub.events().publish(Event::Message {
                room: name,
                content: slice_of(text, content),
                from: self.conn.clone(),
                ts: now_ms(),
            });
        }
        if let Some(id) = id {
            hub.deliver(self.conn, protocol::ack(id));
        }
        Ok(())
    }

    fn refuse(&self, refusal: Refusal, id: Option<&str>) {
        self.ctx
            .hub
            .deliver(self.conn, protocol::error(&refusal, id));
    }
}

fn room_name(room: &str) -> Result<RoomName, Refusal> {
    RoomName::parse(room).ok_or_else(|| Refusal::new(ErrorCode::InvalidRoom, "invalid room name"))
}

/// The `content` bytes as a zero-copy slice of the received frame.
fn slice_of(text: &Utf8Bytes, content: &str) -> bytes::Bytes {
    let whole: &bytes::Bytes = text.as_ref();
    let start = content.as_ptr() as usize - text.as_str().as_ptr() as usize;
    whole.slice(start..start + content.len())
}

async fn expiry_sleep(at: Option<SystemTime>) {
    match at {
        Some(at) => {
            let left = at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::time::sleep(left).await
        }
        None => std::future::pending().await,
    }
}

/// Ping bookkeeping for the writer: after each ping, the client has
/// `pong_timeout` to answer.
struct Heartbeat {
    deadline: Option<tokio::time::Instant>,
    pongs_at_ping: u64,
}

impl Heartbeat {
    fn far_future() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(86_400 * 365)
    }

    fn deadline(&self) -> tokio::time::Instant {
        self.deadline.unwrap_or_else(Self::far_future)
    }

    /// Starts the clock for a ping just sent, unless an earlier ping is
    /// still unanswered: that one keeps its deadline. Restarting the clock
    /// on every ping would never expire when `pong_timeout` is not shorter
    /// than `ping_interval` (the next tick comes first and resets it), so a
    /// dead client would be kept forever.
    fn ping_sent(&mut self, conn: &Connection, timeout: Duration) {
        if self.deadline.is_some() && conn.pongs() == self.pongs_at_ping {
            return;
        }
        self.deadline = Some(tokio::time::Instant::now() + timeout);
        self.pongs_at_ping = conn.pongs();
    }

    /// Called at the deadline: `true` if the ping went unanswered.
    fn expired(&mut self, conn: &Connection) -> bool {
        self.deadline = None;
        conn.pongs() == self.pongs_at_ping
    }
}

type Sink = SplitSink<WsStream, Message>;

/// What the writer does next.
enum Step {
    Frame(crate::protocol::Frame),
    Ping,
    Stop,
}

/// Writes until the connection closes; returns the deadline for the
/// client's close reply when our close frame went out (see [`finish`]).
async fn write_loop(
    mut sink: Sink,
    mut outbox: Outbox,
    conn: Arc<Connection>,
    settings: SessionSettings,
) -> Option<tokio::time::Instant> {
    let period = settings.ping_interval;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeat = Heartbeat {
        deadline: None,
        pongs_at_ping: 0,
    };
    loop {
        let step = tokio::select! {
            biased;
            _ = conn.closing().cancelled() => Step::Stop,
            _ = tokio::time::sleep_until(heartbeat.deadline()), if heartbeat.deadline.is_some() => {
                if heartbeat.expired(&conn) {
                    conn.close(1001, "ping timeout", CloseReason::PingTimeout);
                    Step::Stop
                } else {
                    continue;
                }
            }
            _ = ticker.tick() => Step::Ping,
            frame = outbox.recv() => frame.map_or(Step::Stop, Step::Frame),
        };
        let write = match step {
            Step::Stop => break,
            Step::Ping => {
                heartbeat.ping_sent(&conn, settings.pong_timeout);
                let ping = write_ping(&mut sink);
                match guard(
                    ping,
                    &conn,
                    &mut heartbeat,
                    &mut ticker,
                    settings.pong_timeout,
                )
                .await
                {
                    Some(result) => result,
                    None => break,
                }
            }
            Step::Frame(first) => {
                let batch = write_batch(&mut sink, first, &mut outbox);
                match guard(
                    batch,
                    &conn,
                    &mut heartbeat,
                    &mut ticker,
                    settings.pong_timeout,
                )
                .await
                {
                    Some(result) => result,
                    None => break,
                }
            }
        };
        if let Err(e) = write {
            debug!(error = %e, "write failed");
            conn.close(CLOSE_ABNORMAL, "", CloseReason::Error);
            break;
        }
    }
    finish(&mut sink, &conn, settings.pong_timeout).await
}

/// Runs a write, but gives up when the connection starts closing or an
/// unanswered ping expires meanwhile (a client that stops reading also stops
/// answering). `None` means the write was abandoned.
///
/// Every write goes through here, pings included: a client that stopped
/// reading fills the socket, and an unguarded write would then wait forever,
/// deaf to closing. While a write is stuck, the pings that fall due cannot be
/// sent; each is counted as sent (it would wait behind the stuck bytes), so
/// such a client is closed for not answering after `pong_timeout`, like any
/// other, instead of being kept open for as long as it does not read.
async fn guard(
    write: impl Future<Output = Result<(), WsError>>,
    conn: &Connection,
    heartbeat: &mut Heartbeat,
    ticker: &mut tokio::time::Interval,
    pong_timeout: Duration,
) -> Option<Result<(), WsError>> {
    let mut write = pin!(write);
    loop {
        tokio::select! {
            biased;
            _ = conn.closing().cancelled() => return None,
            _ = tokio::time::sleep_until(heartbeat.deadline()), if heartbeat.deadline.is_some() => {
                if heartbeat.expired(conn) {
                    conn.close(1001, "ping timeout", CloseReason::PingTimeout);
                    return None;
                }
            }
            result = &mut write => return Some(result),
            _ = ticker.tick() => heartbeat.ping_sent(conn, pong_timeout),
        }
    }
}

async fn write_ping(sink: &mut Sink) -> Result<(), WsError> {
    sink.send(Message::Ping(bytes::Bytes::new())).await
}

/// Feeds `first` and whatever else is already queued (up to `MAX_BATCH`),
/// then flushes once: one syscall for a burst instead of one per frame.
async fn write_batch(
    sink: &mut Sink,
    first: crate::protocol::Frame,
    outbox: &mut Outbox,
) -> Result<(), WsError> {
    sink.feed(Message::Text(first.into_utf8_bytes())).await?;
    for _ in 1..MAX_BATCH {
        match outbox.try_recv() {
            Ok(frame) => sink.feed(Message::Text(frame.into_utf8_bytes())).await?,
            Err(_) => break,
        }
    }
    sink.flush().await
}

/// Ends the WebSocket: sends our close frame (or flushes tungstenite's reply
/// to the client's), bounded by `grace` so a client that stopped reading
/// cannot hold the task. Returns the same deadline when our close frame was
/// sent (other than at shutdown), for the session to wait for the client's
/// reply until then.
async fn finish(
    sink: &mut Sink,
    conn: &Connection,
    grace: Duration,
) -> Option<tokio::time::Instant> {
    if conn.close_request().is_none() {
        // Only the shutdown token cancels without saying why.
        conn.close(1001, "server shutting down", CloseReason::Shutdown);
    }
    let request = conn.close_request()?;
    let deadline = tokio::time::Instant::now() + grace;
    match request.reason {
        CloseReason::Client => {
            let _ = tokio::time::timeout_at(deadline, sink.flush()).await;
            None
        }
        _ if request.code == CLOSE_ABNORMAL || request.code == CLOSE_NO_STATUS => None,
        _ => {
            let frame = CloseFrame {
                code: request.code.into(),
                reason: request.text.clone().into(),
            };
            let sent = tokio::time::timeout_at(deadline, sink.send(Message::Close(Some(frame))));
            // At shutdown the whole gateway is going away, bounded by
            // `shutdown_grace_secs`: it does not also wait on every idle
            // client's reply.
            let awaits_reply = request.reason != CloseReason::Shutdown;
            (matches!(sent.await, Ok(Ok(()))) && awaits_reply).then_some(deadline)
        }
    }
}

/// After our close frame, reads and discards what the client still sends
/// until its close frame or the end of the stream, at most until
/// `deadline`. Dropping the TCP connection before that (RFC 6455 §7.1.1
/// has the server close it last) would answer frames the client sends
/// meanwhile, such as pongs to pings it had not read yet, with a reset;
/// client libraries then report 1006 instead of our close code (1013 for
/// a slow consumer, 1001 for a missed heartbeat).
async fn await_close_reply(stream: &mut SplitStream<WsStream>, deadline: tokio::time::Instant) {
    let drain = async {
        while let Some(Ok(message)) = stream.next().await {
            if message.is_close() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout_at(deadline, drain).await;
}
