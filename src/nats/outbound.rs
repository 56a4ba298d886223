//! Turning events into NATS publications: subjects, JSON payloads and the
//! `Roomgate-*` headers of SPEC §2.

use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::{Client, HeaderMap, HeaderName, HeaderValue, PublishErrorKind};
use bytes::Bytes;
use tracing::{debug, warn};

use super::{BridgeSettings, HEADER_CONNECTION, HEADER_GATEWAY, HEADER_USER, PUBLISH_TIMEOUT};
use crate::events::Event;
use crate::metrics::Metrics;
use crate::protocol::{PresenceKind, push_json_str};
use crate::rooms::Connection;

// Built once: a name given as a string is validated, matched against the
// standard names and copied on every insert.
const CONNECTION: HeaderName = HeaderName::from_static(HEADER_CONNECTION);
const USER: HeaderName = HeaderName::from_static(HEADER_USER);
const GATEWAY: HeaderName = HeaderName::from_static(HEADER_GATEWAY);

/// Publishes events, dropping (and counting) what NATS cannot take now.
pub struct Publisher {
    client: Client,
    metrics: Metrics,
    settings: BridgeSettings,
    /// `Roomgate-Gateway`'s value, checked once; each event gets a copy.
    gateway: HeaderValue,
    /// Whether a payload over the server's `max_payload` was reported: a
    /// setting to fix, said once rather than for every such message.
    oversize_reported: AtomicBool,
}

impl Publisher {
    /// A publisher on `client`.
    pub fn new(client: Client, metrics: Metrics, settings: BridgeSettings) -> Self {
        Self {
            client,
            metrics,
            gateway: HeaderValue::from(&*settings.gateway_id),
            settings,
            oversize_reported: AtomicBool::new(false),
        }
    }

    /// Publishes one event. While disconnected it is dropped at once:
    /// buffering would only deliver stale presence and messages later.
    pub async fn publish(&self, event: Event) {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            self.metrics.nats_publish_errors.inc();
            return;
        }
        let (subject, conn, payload) = self.encode(&event);
        let size = payload.len();
        let sent = match conn {
            Some(conn) => {
                let headers = self.headers(conn);
                tokio::time::timeout(
                    PUBLISH_TIMEOUT,
                    self.client.publish_with_headers(subject, headers, payload),
                )
                .await
            }
            None => {
                tokio::time::timeout(PUBLISH_TIMEOUT, self.client.publish(subject, payload)).await
            }
        };
        match sent {
            Ok(Ok(())) => self.metrics.nats_published.inc(),
            Ok(Err(e)) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                self.metrics.nats_publish_errors.inc();
                self.report_oversize(size);
            }
            _ => self.metrics.nats_publish_errors.inc(),
        }
    }

    /// A client's message larger than the server takes reached this
    /// instance's members only: the settings disagree, which an operator
    /// must hear about (once; `roomgate_nats_publish_errors_total` counts
    /// every such message).
    fn report_oversize(&self, size: usize) {
        if self.oversize_reported.swap(true, Ordering::Relaxed) {
            return;
        }
        warn!(
            size,
            max_payload = self.client.server_info().max_payload,
            "an event is larger than the NATS server's max_payload and was not published \
             (client messages this large reach this instance's members only); raise the \
             server's max_payload above websocket.max_message_size_bytes, or lower that"
        );
    }

    /// Waits (briefly) until what was published has reached the server.
    pub async fn flush(&self) {
        if self.client.connection_state() == async_nats::connection::State::Connected {
            let _ = tokio::time::timeout(PUBLISH_TIMEOUT * 4, self.client.flush()).await;
        }
    }

    fn headers(&self, conn: &Connection) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, conn.id_str());
        // A user comes from a token's `sub` and may hold a line break, which
        // a header cannot carry (async-nats panics on it). The payload's
        // `user` has it exactly; the header is left out.
        if let Some(user) = conn.user() {
            match user.parse::<HeaderValue>() {
                Ok(value) => headers.insert(USER, value),
                Err(_) => debug!("user cannot be a NATS header value; only in the payload"),
            }
        }
        headers.insert(GATEWAY, self.gateway.clone());
        headers
    }

    /// The subject, the connection it concerns (whose headers it gets), and
    /// the payload.
    fn encode<'e>(&self, event: &'e Event) -> (String, Option<&'e Connection>, Bytes) {
        let prefix = &self.settings.prefix;
        let gateway = &*self.settings.gateway_id;
        match event {
            Event::Message {
                room,
                content,
                from,
                ts,
            } => {
                let mut out = Json::object();
                out.str("room", Some(room.as_str()));
                out.raw("content", content);
                out.str("from", Some(from.id_str()));
                out.str("user", from.user());
                out.str("gateway", Some(gateway));
                out.num("ts", *ts);
                (
                    subject(prefix, "message.", room.as_str()),
                    Some(from),
                    out.finish(),
                )
            }
            Event::Presence {
                room,
                kind,
                conn,
                ts,
            } => {
                let mut out = Json::object();
                out.str("event", Some(presence_word(*kind)));
                out.str("room", Some(room.as_str()));
                out.str("connection_id", Some(conn.id_str()));
                out.str("user", conn.user());
                out.str("gateway", Some(gateway));
                out.num("ts", *ts);
                (
                    subject(prefix, "presence.", room.as_str()),
                    Some(conn),
                    out.finish(),
                )
            }
            Event::ConnectionOpen { conn, ts } => {
                let out = lifecycle(conn, gateway, *ts);
                (
                    subject(prefix, "connection.open", ""),
                    Some(conn),
                    out.finish(),
                )
            }
            Event::ConnectionClose { conn, code, ts } => {
                let mut out = lifecycle(conn, gateway, *ts);
                out.num("code", u64::from(*code));
                (
                    subject(prefix, "connection.close", ""),
                    Some(conn),
                    out.finish(),
                )
            }
            Event::Reply { subject, body } => (subject.clone(), None, body.clone()),
        }
    }
}

/// `<prefix>.<kind><room>`, in one allocation of the exact size.
fn subject(prefix: &str, kind: &str, room: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1 + kind.len() + room.len());
    out.push_str(prefix);
    out.push('.');
    out.push_str(kind);
    out.push_str(room);
    out
}

fn lifecycle(conn: &Connection, gateway: &str, ts: u64) -> Json {
    let mut out = Json::object();
    out.str("connection_id", Some(conn.id_str()));
    out.str("user", conn.user());
    out.str("gateway", Some(gateway));
    out.num("ts", ts);
    out
}

fn presence_word(kind: PresenceKind) -> &'static str {
    match kind {
        PresenceKind::Join => "join",
        PresenceKind::Leave => "leave",
    }
}

/// A minimal JSON object writer: the payloads are flat, and the client's
/// `content` must be copied in as raw JSON, not re-encoded.
struct Json(String);

impl Json {
    fn object() -> Self {
        // Room for a typical event, so that building it rarely reallocates.
        let mut out = String::with_capacity(256);
        out.push('{');
        Self(out)
    }

    fn key(&mut self, key: &str) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        self.0.push('"');
        self.0.push_str(key);
        self.0.push_str("\":");
    }

    fn str(&mut self, key: &str, value: Option<&str>) {
        self.key(key);
        push_json_str(&mut self.0, value);
    }

    fn raw(&mut self, key: &str, json: &Bytes) {
        self.key(key);
        // `content` was parsed as JSON from a UTF-8 text frame.
        self.0.push_str(std::str::from_utf8(json).unwrap_or("null"));
    }

    fn num(&mut self, key: &str, value: u64) {
        self.key(key);
        self.0.push_str(itoa::Buffer::new().format(value));
    }

    fn finish(mut self) -> Bytes {
        self.0.push('}');
        Bytes::from(self.0)
    }
}
