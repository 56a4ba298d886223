//! WebSocket upgrades on the gateway's own paths, and the sessions they
//! become.
//!
//! The upgrade is checked in full before the 101 (handshake, draining,
//! origin and credentials, connection limit), so a refused client never
//! costs a session. The session then runs as a tracked task: shutdown waits
//! for it, because hyper's own graceful shutdown does not see upgraded
//! connections.

mod handover;
mod io;
mod ratelimit;
mod session;
mod ticker;
mod writer;

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode, Version};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::{Instrument, debug, debug_span};

pub use handover::{ClientStream, HoldSwitch};
pub use ratelimit::TokenBucket;
pub use session::{SessionContext, SessionSettings};

use crate::auth::{Authenticator, Rejection};
use crate::config::Config;
use crate::metrics::RejectReason;
use crate::request::{self, header_has_token};
use crate::response::{self, Body};
use crate::rooms::{Connection, Identity, QueueLimits};
use crate::shutdown::Shutdown;

/// tungstenite's read buffer is allocated up front for every connection; its
/// 128 KiB default would dominate an idle connection's memory (this size is
/// most of it: an idle connection costs about 6 KiB in all, see
/// BENCHMARKS.md). Client frames are small; a larger one still arrives, the
/// buffer grows for it and the codec enforces `max_message_size_bytes`.
const READ_BUFFER: usize = 1024;

/// What tungstenite writes itself (pongs, close replies) is handed to the
/// writer at once, so its own write buffering is off.
const CONTROL_WRITE_BUFFER: usize = 0;

/// Terminates upgrades on `server.ws_paths` and runs their sessions.
pub struct Upgrader {
    ctx: Arc<SessionContext>,
    auth: Authenticator,
    paths: Vec<String>,
    slots: Arc<Semaphore>,
    codec: WebSocketConfig,
    queue: QueueLimits,
    slow_consumer: crate::config::SlowConsumerPolicy,
    shutdown: Shutdown,
}

impl Upgrader {
    /// Builds the upgrader for `config`.
    pub fn new(
        config: &Config,
        ctx: Arc<SessionContext>,
        auth: Authenticator,
        shutdown: Shutdown,
    ) -> Self {
        let ws = &config.websocket;
        let codec = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .write_buffer_size(CONTROL_WRITE_BUFFER)
            .max_write_buffer_size(crate::rooms::MAX_CONTROL_BYTES)
            .max_message_size(Some(ws.max_message_size_bytes))
            .max_frame_size(Some(ws.max_message_size_bytes));
        Self {
            ctx,
            auth,
            paths: config.server.ws_paths.clone(),
            slots: Arc::new(Semaphore::new(
                config.server.max_connections.min(Semaphore::MAX_PERMITS),
            )),
            codec,
            queue: QueueLimits::of(ws),
            slow_consumer: ws.slow_consumer,
            shutdown,
        }
    }

    /// Whether `path` is one of the gateway's WebSocket paths.
    pub fn owns(&self, path: &str) -> bool {
        self.paths.iter().any(|p| p == path)
    }

    /// Answers a request to a gateway path: 101 and a session, or the reason
    /// it was refused.
    pub async fn upgrade(
        &self,
        request: Request<Incoming>,
        client: SocketAddr,
        hold: &HoldSwitch,
    ) -> Response<Body> {
        match self.try_upgrade(request, client).await {
            Ok(response) => {
                // The 101 leaves with the session's welcome frame.
                hold.arm();
                response
            }
            Err(rejection) => {
                debug!(
                    reason = rejection.reason.as_str(),
                    status = rejection.status.as_u16(),
                    "upgrade refused"
                );
                self.ctx.metrics.upgrade_rejected(rejection.reason);
                rejection.into_response()
            }
        }
    }

    async fn try_upgrade(
        &self,
        mut request: Request<Incoming>,
        client: SocketAddr,
    ) -> Result<Response<Body>, Rejection> {
        let bad =
            |why: &str| Rejection::new(StatusCode::BAD_REQUEST, RejectReason::BadHandshake, why);
        request::host(request.version(), request.headers())
            .map_err(|e| bad(&format!("bad request: {e}")))?;
        let accept = handshake_accept(request.method(), request.version(), request.headers())
            .map_err(|e| {
                let mut rejection = bad(e.why());
                if e == BadHandshake::Version {
                    // RFC 6455 §4.4: the refusal names the version spoken
                    // here, for a client that can fall back to it.
                    rejection.headers.insert(
                        header::SEC_WEBSOCKET_VERSION,
                        HeaderValue::from_static("13"),
                    );
                }
                rejection
            })?;
        if self.shutdown.is_stopping() {
            return Err(unavailable(RejectReason::ShuttingDown, "shutting down"));
        }
        // Taken before authentication, so a full gateway sends no more
        // checks to the auth service, and the checks in flight count
        // against the limit with the connections they may become.
        let permit =
            self.slots.clone().try_acquire_owned().map_err(|_| {
                unavailable(RejectReason::TooManyConnections, "too many connections")
            })?;
        let on_upgrade = hyper::upgrade::on(&mut request);
        let (parts, _) = request.into_parts();
        let identity = self.auth.admit(&parts, client).await?;
        // Forward auth may have taken a while: a session started now would
        // only be closed again at once.
        if self.shutdown.is_stopping() {
            return Err(unavailable(RejectReason::ShuttingDown, "shutting down"));
        }
        self.spawn_session(on_upgrade, identity, permit, &parts, client);
        Ok(switching_protocols(&accept))
    }

    fn spawn_session(
        &self,
        on_upgrade: hyper::upgrade::OnUpgrade,
        identity: Identity,
        permit: OwnedSemaphorePermit,
        parts: &Parts,
        client: SocketAddr,
    ) {
        let conn = Connection::new(identity, self.queue, self.slow_consumer, &self.shutdown);
        // At debug: the only events inside a connection at info and above
        // are two internal errors, which name the connection themselves,
        // and an enabled span costs every connection a registry entry and
        // its formatted fields, and every poll an enter and exit.
        let span =
            debug_span!("conn", id = %conn.id_str(), peer = %client, path = %parts.uri.path());
        let ctx = self.ctx.clone();
        let codec = self.codec;
        self.shutdown.spawn(
            async move {
                // The upgrade's state ends before the session starts, so
                // the task keeps only the session's for its whole life.
                if let Some((ws, write)) = take_over(on_upgrade, &conn, codec).await {
                    session::run(ws, write, conn, ctx).await;
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Waits for hyper to hand over the upgraded connection and sets up the
/// WebSocket on it: the reading half for tungstenite, the writing half for
/// the session's writer.
async fn take_over(
    on_upgrade: hyper::upgrade::OnUpgrade,
    conn: &Arc<Connection>,
    codec: WebSocketConfig,
) -> Option<(session::WsStream, tokio::net::tcp::OwnedWriteHalf)> {
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            debug!(error = %e, "upgrade did not complete");
            return None;
        }
    };
    let Some((stream, read_buf)) = ClientStream::from_upgraded(upgraded) else {
        tracing::error!(conn = %conn.id_str(), "upgraded connection is not a client stream");
        return None;
    };
    let (tcp, response) = stream.into_parts();
    // The held 101 goes first, in the writer's first write.
    if conn.outbox().push_control(&response).is_err() {
        return None;
    }
    let (read, write) = tcp.into_split();
    let read = io::ReadSide::new(read, conn.clone());
    // hyper's leftover bytes share its whole read buffer (8 KiB or more):
    // copy what was read ahead and let the buffer go, instead of holding it
    // for the life of the connection.
    let ahead = read_buf.to_vec();
    drop(read_buf);
    let ws = WebSocketStream::from_partially_read(read, ahead, Role::Server, Some(codec)).await;
    Some((ws, write))
}

/// Why a handshake is refused.
#[derive(Debug, PartialEq, Eq)]
enum BadHandshake {
    /// Malformed, for the reason given.
    Invalid(&'static str),
    /// A version other than 13, which the answer names.
    Version,
}

impl BadHandshake {
    /// The reason, for the answer's body.
    fn why(&self) -> &'static str {
        match self {
            Self::Invalid(why) => why,
            Self::Version => "bad handshake: Sec-WebSocket-Version must be 13",
        }
    }
}

impl From<&'static str> for BadHandshake {
    fn from(why: &'static str) -> Self {
        Self::Invalid(why)
    }
}

/// Checks an upgrade request against RFC 6455 §4.2.1 and returns the
/// `Sec-WebSocket-Accept` value, or why the handshake is bad.
fn handshake_accept(
    method: &Method,
    version: Version,
    headers: &hyper::HeaderMap,
) -> Result<String, BadHandshake> {
    if method != Method::GET {
        return Err("bad handshake: a WebSocket upgrade must be a GET".into());
    }
    // An HTTP/1.0 connection cannot be upgraded: hyper would send the 101
    // and then close it.
    if version != Version::HTTP_11 {
        return Err("bad handshake: a WebSocket upgrade must be HTTP/1.1".into());
    }
    if !header_has_token(headers, header::UPGRADE, "websocket") {
        return Err("bad handshake: expected Upgrade: websocket".into());
    }
    if !header_has_token(headers, header::CONNECTION, "upgrade") {
        return Err("bad handshake: expected Connection: Upgrade".into());
    }
    let version = at_most_once(headers, header::SEC_WEBSOCKET_VERSION)
        .ok_or("bad handshake: Sec-WebSocket-Version given more than once")?;
    if version.map(|v| v.as_bytes()) != Some(b"13") {
        return Err(BadHandshake::Version);
    }
    let key = at_most_once(headers, header::SEC_WEBSOCKET_KEY)
        .ok_or("bad handshake: Sec-WebSocket-Key given more than once")?
        .ok_or("bad handshake: missing Sec-WebSocket-Key")?;
    if !is_valid_key(key.as_bytes()) {
        return Err("bad handshake: Sec-WebSocket-Key must be 16 bytes in base64".into());
    }
    Ok(derive_accept_key(key.as_bytes()))
}

/// The value of a header that may appear at most once (RFC 6455 §11.3:
/// the key and the version): `None` when it appears more often.
fn at_most_once(
    headers: &hyper::HeaderMap,
    name: header::HeaderName,
) -> Option<Option<&HeaderValue>> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (_, Some(_)) => None,
        (value, None) => Some(value),
    }
}

/// A base64 encoding of 16 bytes: 22 base64 characters and `==`.
fn is_valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
}

fn switching_protocols(accept: &str) -> Response<Body> {
    let mut response = Response::new(response::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

fn unavailable(reason: RejectReason, message: &str) -> Rejection {
    Rejection::new(StatusCode::SERVICE_UNAVAILABLE, reason, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> hyper::HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    hyper::header::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    const GOOD: [(&str, &str); 4] = [
        ("upgrade", "websocket"),
        ("connection", "keep-alive, Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn accepts_the_rfc_example() {
        let accept =
            handshake_accept(&Method::GET, Version::HTTP_11, &headers(&GOOD)).expect("valid");
        assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn names_what_is_wrong() {
        assert!(
            handshake_accept(&Method::POST, Version::HTTP_11, &headers(&GOOD))
                .unwrap_err()
                .why()
                .contains("GET")
        );
        let mut h = headers(&GOOD);
        h.insert("sec-websocket-version", HeaderValue::from_static("8"));
        assert_eq!(
            handshake_accept(&Method::GET, Version::HTTP_11, &h),
            Err(BadHandshake::Version)
        );
        let mut h = headers(&GOOD);
        h.remove("sec-websocket-key");
        assert!(
            handshake_accept(&Method::GET, Version::HTTP_11, &h)
                .unwrap_err()
                .why()
                .contains("Key")
        );
        assert!(
            handshake_accept(&Method::GET, Version::HTTP_10, &headers(&GOOD))
                .unwrap_err()
                .why()
                .contains("HTTP/1.1")
        );
        for name in ["sec-websocket-key", "sec-websocket-version"] {
            let mut h = headers(&GOOD);
            let value = h.get(name).expect("set").clone();
            h.append(name, value);
            assert!(
                handshake_accept(&Method::GET, Version::HTTP_11, &h)
                    .unwrap_err()
                    .why()
                    .contains("more than once"),
                "{name} twice"
            );
        }
        let mut h = headers(&GOOD);
        h.insert("sec-websocket-key", HeaderValue::from_static("short"));
        assert!(
            handshake_accept(&Method::GET, Version::HTTP_11, &h)
                .unwrap_err()
                .why()
                .contains("16 bytes")
        );
    }
}
