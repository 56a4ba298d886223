//! One WebSocket session: a reader that serves the client's frames and a
//! writer that owns the socket's sending side.
//!
//! The reader runs in the session's task and the writer ([`super::writer`])
//! in its own; both stop when the connection's `closing` token is
//! cancelled, by either of them, by a backend, by the slow-consumer policy
//! or by shutdown.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::{SinkExt, StreamExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{Instrument, debug};

use super::io::{self, ReadSide};
use super::ratelimit::TokenBucket;
use super::writer::Writer;
use crate::events::{Event, now_ms};
use crate::metrics::{CloseReason, Metrics};
use crate::protocol::{self, ErrorCode, Refusal, Request};
use crate::rooms::{Connection, Hub, RoomName};

/// The reading side of a client's WebSocket.
pub type WsStream = WebSocketStream<ReadSide>;

/// Close codes that must not be sent in a close frame (RFC 6455 §7.4.1):
/// no status given, and the connection dropped without a close frame.
pub const CLOSE_NO_STATUS: u16 = 1005;
/// See [`CLOSE_NO_STATUS`].
pub const CLOSE_ABNORMAL: u16 = 1006;

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
    /// Where the session registers its connection and joins rooms.
    pub hub: Arc<Hub>,
    /// Where its traffic and its end are counted.
    pub metrics: Metrics,
    /// The configuration's WebSocket settings, resolved once for all.
    pub settings: SessionSettings,
    /// Shutdown's forced phase: a session still waiting on a stalled
    /// client when the grace period is over is cut then, instead of
    /// holding shutdown for up to `pong_timeout` more.
    pub forced: CancellationToken,
}

/// Runs a session to its end: registers the connection, serves it, and
/// cleans up every trace of it (rooms, registry, metrics) when it closes.
pub async fn run(
    mut stream: WsStream,
    write: OwnedWriteHalf,
    conn: Arc<Connection>,
    ctx: Arc<SessionContext>,
) {
    let hub = &ctx.hub;
    hub.deliver_first(&conn, &protocol::welcome(conn.id_str()));
    hub.register(&conn);
    ctx.metrics.connections.inc();
    ctx.metrics.connections_opened.inc();
    hub.events().publish(Event::ConnectionOpen {
        conn: conn.clone(),
        ts: now_ms(),
    });
    debug!("connection opened");

    // Aborted if this task ends first (a panic), so the writer never
    // outlives its session.
    let mut writer = AbortOnDropHandle::new(tokio::spawn(
        Writer::new(write, conn.clone(), &ctx.settings)
            .run()
            .instrument(tracing::Span::current()),
    ));
    Reader::new(&conn, &ctx).run(&mut stream).await;
    // The reader returns after a close was asked for, or when shutdown
    // stopped the connection without one. Said here, the reason does not
    // depend on whether the writer got to run before shutdown's grace
    // period (which may be 0) cut it.
    conn.close_for_shutdown();
    // Leave every room as soon as the connection is closing, not when the
    // close handshake is over: the writer may wait up to `pong_timeout` for
    // a stalled client to take its close frame, and meanwhile the member
    // would still fill a `max_members` slot, be listed and miss its
    // presence `leave`, while nothing more can reach it.
    hub.unregister(&conn);
    let ended = tokio::select! {
        biased;
        ended = &mut writer => Some(ended),
        _ = ctx.forced.cancelled() => None,
    };
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
    // The sending half goes only now, after the books are closed, so a
    // client that sees the end of the stream sees consistent metrics.
    release(&mut stream, ended, writer, &ctx.forced, &conn).await;
    debug!(code, reason = reason.as_str(), "connection closed");
}

/// What the writer returns: its half of the socket, and until when to
/// wait for the client's close reply, if at all.
type WriterEnd = (OwnedWriteHalf, Option<tokio::time::Instant>);

/// Lets the socket go once the writer has ended (`ended`), or once the
/// grace period is over with the writer still stuck (`None`). Dropping the
/// sending half sends FIN; the client's close reply is still read, until
/// the writer's deadline. A client that has not taken everything by then
/// is reset, so nothing lingers in the kernel for it.
async fn release(
    stream: &mut WsStream,
    ended: Option<Result<WriterEnd, tokio::task::JoinError>>,
    writer: AbortOnDropHandle<WriterEnd>,
    forced: &CancellationToken,
    conn: &Connection,
) {
    match ended {
        Some(Ok((write, Some(deadline)))) => {
            drop(write);
            let replied = tokio::select! {
                replied = await_close_reply(stream, deadline) => replied,
                _ = forced.cancelled() => false,
            };
            if !replied {
                // Our close frame may still sit unread in the kernel.
                io::reset_on_close(stream.get_ref().tcp());
            }
        }
        // Nothing more to say or to wait for: the FIN goes with the close
        // of the socket a moment later, without a `shutdown` call of its
        // own (which fails anyway when the client has gone first).
        Some(Ok((write, None))) => write.forget(),
        Some(Err(e)) => tracing::error!(conn = %conn.id_str(), error = %e, "writer task failed"),
        None => {
            // What the writer could not write is dropped with a reset.
            io::reset_on_close(stream.get_ref().tcp());
            writer.abort();
            let _ = writer.await;
        }
    }
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

    async fn run(mut self, stream: &mut WsStream) {
        let expiry = pin!(expiry_sleep(self.conn.identity().expires_at));
        let mut expiry = expiry;
        // One for the whole loop: it costs an atomic load per frame, where
        // a fresh one would take the token's locks.
        let mut closed = pin!(self.conn.closed());
        loop {
            let next = tokio::select! {
                biased;
                _ = closed.as_mut() => return,
                _ = &mut expiry => {
                    self.conn.close(1008, "token expired", CloseReason::TokenExpired);
                    return;
                }
                next = stream.next() => next,
            };
            match next {
                Some(Ok(Message::Close(frame))) => {
                    // tungstenite has queued the close reply; flushing hands
                    // it to the writer before the writer is told to finish.
                    let _ = stream.flush().await;
                    let code = frame
                        .as_ref()
                        .map_or(CLOSE_NO_STATUS, |f| u16::from(f.code));
                    let reason = if frame.as_ref().is_some_and(is_refused_close) {
                        CloseReason::Error
                    } else {
                        CloseReason::Client
                    };
                    self.conn.close(code, "", reason);
                    return;
                }
                Some(Ok(message)) => {
                    self.on_message(message);
                    // Frames already in the read buffer are handled without
                    // a wait on the socket: see `Outbox::reader_handled`.
                    if self.conn.outbox().reader_handled() && !self.take_turn(closed.as_mut()).await
                    {
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

    /// The writers' turn, after half a send queue of frames. Each frame
    /// read may queue one frame for this client (a reply, an error) and
    /// one for each other member of a room (a message, a presence event);
    /// without turns a client's pipelined burst would fill those queues
    /// before any writer ran, and close members that keep up, and the
    /// client itself, as slow consumers. The reader yields, so the writers
    /// take what was queued, waits until its own client's queue has room
    /// for another turn of replies, and yields again. False if the
    /// connection closed meanwhile. Boxed: it comes once per half a queue
    /// of frames, and inline its state would make every connection's
    /// session task larger.
    fn take_turn<'b>(
        &'b self,
        closed: impl Future<Output = ()> + Unpin + Send + 'b,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'b>> {
        Box::pin(async move {
            tokio::task::yield_now().await;
            let go = tokio::select! {
                biased;
                _ = closed => false,
                _ = self.conn.outbox().room_for_turn() => true,
            };
            // Behind the writers once more: the client's own writer, which
            // made the room, wakes this reader into its thread's next slot,
            // ahead of the other members' writers queued on that thread.
            tokio::task::yield_now().await;
            go
        })
    }

    /// Handles one message other than a close frame.
    fn on_message(&mut self, message: Message) {
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
            Message::Pong(payload) => self.conn.pong_received(&payload),
            // tungstenite queues the pong itself and hands it over on the
            // next read.
            Message::Ping(_) | Message::Frame(_) | Message::Close(_) => {}
        }
    }

    fn on_error(&self, error: WsError) {
        use tokio_tungstenite::tungstenite::error::ProtocolError;
        match error {
            // A message or a frame over the limit, or a message that would
            // outgrow the read buffer: all of them too big.
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
            Request::Message { room, content } => self.message(&room, content.get(), id),
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

    fn message(&self, room: &str, content: &str, id: Option<&str>) -> Result<(), Refusal> {
        let name = room_name(room)?;
        let hub = &self.ctx.hub;
        if !hub.config().enabled {
            return Err(Refusal::new(ErrorCode::RoomsDisabled, "rooms are disabled"));
        }
        let sent = hub.as_member(self.conn, name.as_str(), |room| {
            if self.ctx.settings.client_broadcast {
                let frame = protocol::message(Some(name.as_str()), content, self.conn.id_str());
                hub.broadcast(room, &frame, Some(self.conn.id()));
            }
            if hub.events().enabled() {
                hub.events().publish(Event::Message {
                    room: name.clone(),
                    content: content_bytes(content),
                    from: self.conn.clone(),
                    ts: now_ms(),
                });
            }
        });
        if sent.is_none() {
            return Err(Refusal::new(
                ErrorCode::NotMember,
                "not a member of this room",
            ));
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

/// Whether tungstenite put its own 1002 in place of the client's close
/// frame, whose code no endpoint may send (it answers with the same): a
/// protocol error, like the others that close with 1002. The reason text
/// is tungstenite's; `a_clients_own_close_code_is_echoed...` in
/// tests/ws_lifecycle.rs fails should it change.
fn is_refused_close(frame: &tokio_tungstenite::tungstenite::protocol::CloseFrame) -> bool {
    frame.code == tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Protocol
        && frame.reason.as_str() == "Protocol violation"
}

fn room_name(room: &str) -> Result<RoomName, Refusal> {
    RoomName::parse(room).ok_or_else(|| Refusal::new(ErrorCode::InvalidRoom, "invalid room name"))
}

/// The `content` bytes for the NATS event, copied: a slice would keep the
/// frame alive while the event is queued, and with it the whole block of
/// tungstenite's read buffer the frame was cut from, which a large frame
/// read just before may have made far larger than the content. The event
/// is encoded into a payload of its own anyway.
fn content_bytes(content: &str) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(content.as_bytes())
}

async fn expiry_sleep(at: Option<SystemTime>) {
    match at {
        Some(at) => {
            let left = at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            // Boxed: inline, the timer would make every session task
            // larger for its whole life, and most never expire.
            Box::pin(tokio::time::sleep(left)).await
        }
        None => std::future::pending().await,
    }
}

/// After our close frame, reads and discards what the client still sends
/// until its close frame or the end of the stream, at most until
/// `deadline`. Dropping the TCP connection before that (RFC 6455 §7.1.1
/// has the server close it last) would answer frames the client sends
/// meanwhile, such as pongs to pings it had not read yet, with a reset;
/// client libraries then report 1006 instead of our close code (1013 for
/// a slow consumer, 1001 for a missed heartbeat). Whether the reply (or
/// the end of the stream) came in time.
async fn await_close_reply(stream: &mut WsStream, deadline: tokio::time::Instant) -> bool {
    let drain = async {
        while let Some(Ok(message)) = stream.next().await {
            if message.is_close() {
                break;
            }
        }
    };
    tokio::time::timeout_at(deadline, drain).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_content_is_a_copy_not_a_view_of_the_frame() {
        let frame = format!(
            r#"{{"type":"message","room":"r","content":"{}"}}"#,
            "x".repeat(1000)
        );
        let content = &frame[38..frame.len() - 1];
        let copied = content_bytes(content);
        assert_eq!(copied, content.as_bytes());
        assert!(
            !frame.as_bytes().as_ptr_range().contains(&copied.as_ptr()),
            "the event must not keep the frame's buffer"
        );
    }
}
