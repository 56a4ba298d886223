//! Delivering what backends and other instances publish to local clients.
//!
//! Each message is turned into one client frame, encoded once, and handed
//! to the hub's broadcaster. Malformed backend input is logged and dropped:
//! it never reaches a client half-formed and never stops the bridge.

use std::sync::Arc;

use async_nats::Message;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use tracing::debug;
use uuid::Uuid;

use super::{BridgeSettings, HEADER_EXCLUDE, HEADER_FROM, HEADER_GATEWAY, HEADER_RAW};
use crate::events::Event;
use crate::metrics::{CloseReason, Metrics};
use crate::protocol::{self, Frame, PresenceKind, Refusal};
use crate::rooms::{Hub, RoomName};

/// Largest run, in bytes of encoded frames, that a burst is gathered into.
/// A run is copied into one buffer: for frames this large together the copy
/// would cost more than the write calls it saves, and would double a large
/// burst's memory for a moment. A single larger frame is a run of its own.
const MAX_RUN_BYTES: usize = 256 * 1024;

/// Close code used by `control.disconnect` when none (or an invalid one) is given.
const DEFAULT_KICK_CODE: u16 = 1008;

/// Handles messages from every subscription of the bridge.
pub struct Inbound {
    hub: Arc<Hub>,
    metrics: Metrics,
    settings: BridgeSettings,
}

/// A client message published by another instance.
#[derive(Deserialize)]
struct PeerMessage<'a> {
    #[serde(borrow)]
    content: &'a RawValue,
    #[serde(borrow)]
    from: std::borrow::Cow<'a, str>,
}

/// A presence event published by another instance.
#[derive(Deserialize)]
struct PeerPresence<'a> {
    event: PresenceKind,
    #[serde(borrow)]
    connection_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    user: Option<std::borrow::Cow<'a, str>>,
}

/// `control.join` / `control.leave` payload.
#[derive(Deserialize)]
struct Membership {
    connection_id: Uuid,
    room: String,
}

/// What a `control.*` payload that does not parse as its action's must
/// still carry for the instance holding the connection to answer it.
#[derive(Deserialize)]
struct Addressed {
    connection_id: Uuid,
}

/// `control.disconnect` payload.
#[derive(Deserialize)]
struct Disconnect {
    connection_id: Uuid,
    /// Any JSON: a code that is not a close code a server may send (out of
    /// range, negative, a string) becomes the default, rather than making
    /// the whole request malformed and ignored.
    code: Option<serde_json::Value>,
    reason: Option<String>,
}

/// The connection a `control.*` payload names, if it names one: read from
/// its first JSON value, whatever follows it or is wrong elsewhere in it.
fn addressed(message: &Message) -> Option<Uuid> {
    let mut values =
        serde_json::Deserializer::from_slice(&message.payload).into_iter::<Addressed>();
    Some(values.next()?.ok()?.connection_id)
}

/// A `control.disconnect` code as a number: an integer, or a float with
/// nothing after the point (`1000.0`, as Python's `json` writes a float).
fn close_code(code: &serde_json::Value) -> Option<u16> {
    let number = code.as_u64().or_else(|| {
        code.as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..=f64::from(u16::MAX)).contains(f))
            .map(|f| f as u64)
    })?;
    u16::try_from(number).ok()
}

impl Inbound {
    /// A handler delivering into `hub`. Control requests are answered
    /// through the hub's event queue.
    pub fn new(hub: Arc<Hub>, metrics: Metrics, settings: BridgeSettings) -> Self {
        Self {
            hub,
            metrics,
            settings,
        }
    }

    /// The subjects every instance listens on, whatever rooms it holds.
    pub fn fixed_subjects(&self) -> [String; 3] {
        let p = &self.settings.prefix;
        [
            format!("{p}.send.*"),
            format!("{p}.all"),
            format!("{p}.control.*"),
        ]
    }

    /// Handles one message of a fixed subscription (`send.*`, `all`,
    /// `control.*`). It never waits: frames are queued for clients,
    /// answers for NATS.
    pub fn handle_fixed(&self, message: Message) {
        self.metrics.nats_received.inc();
        let Some((kind, target)) = self.split(&message) else {
            return;
        };
        match kind {
            "send" => self.send(target, &message),
            "all" if target.is_empty() => self.all(&message),
            "control" => self.control(target, &message),
            _ => {}
        }
    }

    /// Counts messages that arrived for a subscription dropped before they
    /// were handled (the room has no local members left, or the gateway
    /// stops): taken from NATS, as any handled for a room without members,
    /// and delivered to no one.
    pub fn left_undelivered(&self, messages: usize) {
        self.metrics.nats_received.inc_by(messages as u64);
    }

    /// Handles messages of `room`'s subscription, in order. Consecutive
    /// frames for the room's members that skip the same connection go out
    /// as one run (up to 256 KiB), so each member's queue is locked once
    /// for all of them.
    pub fn handle_room(&self, room: &RoomName, messages: impl IntoIterator<Item = Message>) {
        let frames = messages.into_iter().filter_map(|message| {
            self.metrics.nats_received.inc();
            self.room_frame(room, &message)
        });
        in_runs(frames, |run, exclude| {
            self.hub.broadcast_room(room.as_str(), run, exclude);
        });
    }

    /// The frame a message of `room`'s subscription becomes for its members,
    /// and the connection it skips. Only the room's own subjects are acted
    /// on: with `<prefix>.*.<room>`, a room named `join` also hears
    /// `control.join`, one named `open` hears `connection.open`; those are
    /// the fixed subscriptions' business (or nobody's) and are dropped
    /// here, so nothing is handled twice.
    fn room_frame(&self, room: &RoomName, message: &Message) -> Option<(Frame, Option<Uuid>)> {
        let (kind, target) = self.split(message)?;
        if target != room.as_str() {
            return None;
        }
        match kind {
            "broadcast" => Some((backend_frame(Some(target), message)?, exclude(message))),
            "message" => Some((self.peer_message(target, message)?, None)),
            "presence" => Some((self.peer_presence(target, message)?, None)),
            _ => None,
        }
    }

    /// The kind token after the prefix, and the rest of the subject.
    fn split<'m>(&self, message: &'m Message) -> Option<(&'m str, &'m str)> {
        let rest = message
            .subject
            .as_str()
            .strip_prefix(self.settings.prefix.as_str())?
            .strip_prefix('.')?;
        Some(rest.split_once('.').unwrap_or((rest, "")))
    }

    fn send(&self, id: &str, message: &Message) {
        let Ok(id) = Uuid::parse_str(id) else { return };
        // Every instance hears `send.*`; only the owner acts, others stop
        // after one map lookup.
        let Some(conn) = self.hub.connection(id) else {
            return;
        };
        // `Roomgate-Exclude` applies to every delivery: naming the one
        // target skips it, as it would in a room.
        if exclude(message) == Some(id) {
            return;
        }
        if let Some(frame) = backend_frame(None, message) {
            self.hub.deliver(&conn, frame);
        }
    }

    fn all(&self, message: &Message) {
        if !self.hub.has_connections() {
            return;
        }
        if let Some(frame) = backend_frame(None, message) {
            self.hub.broadcast_all(&frame, exclude(message));
        }
    }

    fn is_own(&self, message: &Message) -> bool {
        header(message, HEADER_GATEWAY) == Some(&*self.settings.gateway_id)
    }

    /// A client message from another instance, as a frame for this
    /// instance's members.
    fn peer_message(&self, room: &str, message: &Message) -> Option<Frame> {
        if self.is_own(message) || !self.settings.client_broadcast {
            return None;
        }
        match serde_json::from_slice::<PeerMessage<'_>>(&message.payload) {
            Ok(peer) => Some(protocol::message(
                Some(room),
                peer.content.get(),
                &peer.from,
            )),
            Err(e) => {
                debug!(error = %e, "ignoring malformed peer message");
                None
            }
        }
    }

    /// Presence from another instance, as a frame for this instance's
    /// members.
    fn peer_presence(&self, room: &str, message: &Message) -> Option<Frame> {
        if self.is_own(message) || !self.settings.presence {
            return None;
        }
        match serde_json::from_slice::<PeerPresence<'_>>(&message.payload) {
            Ok(p) => Some(protocol::presence(
                room,
                p.event,
                &p.connection_id,
                p.user.as_deref(),
            )),
            Err(e) => {
                debug!(error = %e, "ignoring malformed peer presence");
                None
            }
        }
    }

    /// `control.join|leave|disconnect`: acts only where the connection lives.
    /// A request (message with a reply subject) is answered by that instance
    /// with `{"ok":true}` or `{"ok":false,"error":CODE}`.
    fn control(&self, action: &str, message: &Message) {
        let outcome = match action {
            "join" | "leave" => {
                let Ok(m) = serde_json::from_slice::<Membership>(&message.payload) else {
                    return self.malformed(action, message);
                };
                let Some(conn) = self.hub.connection(m.connection_id) else {
                    return;
                };
                let Some(room) = RoomName::parse(&m.room) else {
                    self.reply(
                        message,
                        Err(Refusal::new(
                            protocol::ErrorCode::InvalidRoom,
                            "invalid room",
                        )),
                    );
                    return;
                };
                if action == "join" {
                    self.hub
                        .join_by_backend(&conn, &room, protocol::joined(room.as_str(), None))
                } else {
                    self.hub.leave(
                        &conn,
                        room.as_str(),
                        protocol::left(room.as_str(), None, true),
                    )
                }
            }
            "disconnect" => {
                let Ok(d) = serde_json::from_slice::<Disconnect>(&message.payload) else {
                    return self.malformed(action, message);
                };
                let Some(conn) = self.hub.connection(d.connection_id) else {
                    return;
                };
                let code = d
                    .code
                    .as_ref()
                    .and_then(close_code)
                    .filter(|c| sendable_close_code(*c))
                    .unwrap_or(DEFAULT_KICK_CODE);
                let reason = d.reason.unwrap_or_default();
                conn.close(code, truncate(&reason, 120), CloseReason::Kicked);
                Ok(())
            }
            _ => return self.unknown(action, message),
        };
        self.reply(message, outcome);
    }

    /// A `control.<action>` the gateway has no such action for changes
    /// nothing; the instance holding the connection it names tells a
    /// request so, rather than leave it to time out as if no instance held
    /// the connection.
    fn unknown(&self, action: &str, message: &Message) {
        debug!(action, "ignoring an unknown control action");
        let refusal = Refusal::new(protocol::ErrorCode::UnknownType, "unknown control action");
        self.refuse_where_held(message, refusal);
    }

    /// A `control.*` payload that is not its action's JSON changes nothing,
    /// and is refused as [`Inbound::unknown`] says.
    fn malformed(&self, action: &str, message: &Message) {
        debug!(action, "ignoring malformed control payload");
        let refusal = Refusal::new(protocol::ErrorCode::InvalidJson, "malformed payload");
        self.refuse_where_held(message, refusal);
    }

    /// Answers a request that changes nothing with `refusal`, from the
    /// instance holding the connection it names. One that names none can be
    /// answered by no instance in particular, and every instance hears it,
    /// so it gets no answer.
    fn refuse_where_held(&self, message: &Message, refusal: Refusal) {
        if addressed(message).is_some_and(|id| self.hub.connection(id).is_some()) {
            self.reply(message, Err(refusal));
        }
    }

    /// Queues the answer to a control request, if it was one. It leaves
    /// after the interest change the request caused (see [`Event::Reply`]).
    fn reply(&self, message: &Message, outcome: Result<(), Refusal>) {
        let Some(reply) = &message.reply else {
            return;
        };
        let body = match outcome {
            Ok(()) => r#"{"ok":true}"#.to_string(),
            Err(refusal) => {
                let code = serde_json::to_string(&refusal.code).unwrap_or_default();
                format!(r#"{{"ok":false,"error":{code}}}"#)
            }
        };
        self.hub.events().publish(Event::Reply {
            subject: reply.to_string(),
            body: Bytes::from(body),
        });
    }
}

/// Hands `frames` to `emit` in order, as runs: consecutive frames that skip
/// the same connection, up to [`MAX_RUN_BYTES`] of them (a larger frame is
/// a run of its own).
fn in_runs(
    frames: impl IntoIterator<Item = (Frame, Option<Uuid>)>,
    mut emit: impl FnMut(&[Frame], Option<Uuid>),
) {
    let mut run = Vec::new();
    let mut run_exclude = None;
    let mut run_bytes = 0;
    for (frame, exclude) in frames {
        let size = frame.wire().len();
        if !run.is_empty() && (exclude != run_exclude || run_bytes + size > MAX_RUN_BYTES) {
            emit(&run, run_exclude);
            run.clear();
            run_bytes = 0;
        }
        run_exclude = exclude;
        run_bytes += size;
        run.push(frame);
    }
    if !run.is_empty() {
        emit(&run, run_exclude);
    }
}

/// The frame a backend's payload becomes: wrapped as a `message` (content
/// = payload text, from = `Roomgate-From` if not empty, else `"server"`), or sent as is with
/// `Roomgate-Raw: true`. `None` for a raw payload that is not UTF-8.
fn backend_frame(room: Option<&str>, message: &Message) -> Option<Frame> {
    let raw = header(message, HEADER_RAW).is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if raw {
        return match String::from_utf8(message.payload.to_vec()) {
            Ok(text) => Some(Frame::from_text(text)),
            Err(_) => {
                debug!("dropping raw backend payload that is not UTF-8");
                None
            }
        };
    }
    let text = String::from_utf8_lossy(&message.payload);
    let mut content = String::with_capacity(text.len() + 2);
    protocol::push_json_str(&mut content, Some(&text));
    // An empty header is taken as none: `"from":""` would name nobody.
    let from = header(message, HEADER_FROM)
        .filter(|f| !f.is_empty())
        .unwrap_or("server");
    Some(protocol::message(room, &content, from))
}

/// A header's first value. Names are matched without regard to case, as in
/// HTTP: NATS keeps the case a client sends, and clients differ in how they
/// spell `Roomgate-Raw`; a name spelled exactly as asked wins over other
/// spellings. One pass over the few headers a message has, without the
/// header map's hashed lookup, which cost more than the pass and missed
/// for most names asked (every broadcast asks for `Roomgate-Exclude`).
fn header<'m>(message: &'m Message, name: &str) -> Option<&'m str> {
    let mut found = None;
    for (key, values) in message.headers.as_ref()?.iter() {
        let key: &str = key.as_ref();
        if key == name {
            found = values.first();
            break;
        }
        if found.is_none() && key.eq_ignore_ascii_case(name) {
            found = values.first();
        }
    }
    found.map(|v| v.as_str())
}

fn exclude(message: &Message) -> Option<Uuid> {
    header(message, HEADER_EXCLUDE).and_then(|v| Uuid::parse_str(v.trim()).ok())
}

/// Close codes a server may send: 1000-1003, 1007-1014, and 3000-4999.
fn sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// At most `max` bytes, cut at a character boundary (close reasons are
/// limited to 123 bytes).
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runs `in_runs` makes of `frames`, as (payload lengths, exclusion).
    fn runs_of(frames: Vec<(Frame, Option<Uuid>)>) -> Vec<(Vec<usize>, Option<Uuid>)> {
        let mut runs = Vec::new();
        in_runs(frames, |run, exclude| {
            runs.push((run.iter().map(Frame::len).collect(), exclude));
        });
        runs
    }

    #[test]
    fn header_names_match_without_case_and_the_exact_spelling_wins() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("roomgate-from", "lower");
        headers.insert("Roomgate-Raw", "exact");
        headers.insert("ROOMGATE-RAW", "upper");
        let message = Message {
            subject: "roomgate.broadcast.lobby".into(),
            reply: None,
            payload: Bytes::new(),
            headers: Some(headers),
            status: None,
            description: None,
            length: 0,
        };
        assert_eq!(header(&message, "Roomgate-From"), Some("lower"));
        assert_eq!(header(&message, "Roomgate-Raw"), Some("exact"));
        assert_eq!(header(&message, "ROOMGATE-RAW"), Some("upper"));
        assert_eq!(header(&message, "Roomgate-Exclude"), None);
        let bare = Message {
            headers: None,
            ..message
        };
        assert_eq!(header(&bare, "Roomgate-Raw"), None);
    }

    #[test]
    fn an_empty_from_header_is_no_sender() {
        let with_from = |from: &str| {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(HEADER_FROM, from);
            Message {
                subject: "roomgate.broadcast.lobby".into(),
                reply: None,
                payload: Bytes::from_static(b"hi"),
                headers: Some(headers),
                status: None,
                description: None,
                length: 0,
            }
        };
        let from_of = |from: &str| {
            let frame = backend_frame(Some("lobby"), &with_from(from)).expect("a frame");
            let value: serde_json::Value = serde_json::from_str(frame.as_str()).expect("JSON");
            value["from"].clone()
        };
        assert_eq!(from_of("alerts"), "alerts");
        assert_eq!(from_of(""), "server");
    }

    #[test]
    fn runs_break_at_each_change_of_exclusion_and_keep_order() {
        let a = Some(Uuid::from_u128(1));
        let frame = |len: usize| Frame::from_text("x".repeat(len));
        let frames = vec![
            (frame(1), None),
            (frame(2), None),
            (frame(3), a),
            (frame(4), a),
            (frame(5), None),
        ];
        assert_eq!(
            runs_of(frames),
            vec![(vec![1, 2], None), (vec![3, 4], a), (vec![5], None)]
        );
        assert!(runs_of(Vec::new()).is_empty());
    }

    #[test]
    fn runs_are_bounded_in_bytes_and_a_larger_frame_goes_alone() {
        let frame = |len: usize| (Frame::from_text("x".repeat(len)), None);
        let third = MAX_RUN_BYTES / 3;
        let frames = vec![
            frame(third),
            frame(third),
            frame(third),
            frame(MAX_RUN_BYTES * 2),
            frame(10),
        ];
        assert_eq!(
            runs_of(frames),
            vec![
                (vec![third, third], None),
                (vec![third], None),
                (vec![MAX_RUN_BYTES * 2], None),
                (vec![10], None),
            ]
        );
    }

    #[test]
    fn close_codes_and_reasons_are_bounded() {
        assert!(sendable_close_code(1000));
        assert!(sendable_close_code(4000));
        assert!(!sendable_close_code(1005));
        assert!(!sendable_close_code(1006));
        assert!(!sendable_close_code(999));
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
