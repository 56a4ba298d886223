//! The client protocol (SPEC §1): parsing incoming JSON frames and encoding
//! outgoing ones.
//!
//! Outgoing frames are encoded once into a [`Frame`] whose bytes are shared
//! by reference count, so a broadcast to ten thousand members costs one
//! encoding and ten thousand pointer copies. Incoming frames are parsed
//! without copying: `content` stays a borrowed raw JSON slice that reaches
//! other members and NATS unchanged.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data as OpData, OpCode};

/// Longest `id` a client may attach to a frame.
pub const MAX_ID_LEN: usize = 64;

/// How deep a message's `content` may nest arrays and objects. The gateway
/// itself reads `content` without recursion, but it hands it on to members
/// and backends, whose parsers stop at some depth (64 for .NET's
/// `System.Text.Json`, 128 for serde_json): one frame they cannot parse
/// would otherwise reach every member of a room. Real payloads nest a
/// handful of levels.
pub const MAX_CONTENT_DEPTH: usize = 32;

/// An outgoing text frame, encoded once as the bytes that go on the wire
/// (WebSocket header included). Cloning shares the bytes: every recipient's
/// writer hands the same buffer to the kernel, so a broadcast costs one
/// encoding whatever the number of members.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame(Bytes);

impl Frame {
    /// Frames an already encoded JSON text.
    pub fn from_text(text: String) -> Self {
        let payload = text.into_bytes();
        let mut wire = Vec::with_capacity(payload.len() + MAX_SERVER_HEADER);
        let header = FrameHeader {
            opcode: OpCode::Data(OpData::Text),
            ..FrameHeader::default()
        };
        // Writing into a Vec cannot fail.
        let _ = header.format(payload.len() as u64, &mut wire);
        wire.extend_from_slice(&payload);
        Self(Bytes::from(wire))
    }

    /// The encoded frame, header and payload.
    pub fn wire(&self) -> &Bytes {
        &self.0
    }

    /// The encoded frame, for the writer.
    pub fn into_wire(self) -> Bytes {
        self.0
    }

    /// Payload length in bytes, for the bytes-sent counter.
    pub fn len(&self) -> usize {
        self.0.len() - self.header_len()
    }

    /// Whether the payload is empty (never, for frames built here).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The payload as text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0[self.header_len()..]).unwrap_or_default()
    }

    fn header_len(&self) -> usize {
        frame_size(&self.0).map_or(2, |(header, _)| header)
    }
}

/// Header and payload length of the unmasked (server) frame that `wire`
/// starts with: the header is 2, 4 or 10 bytes, by its length byte. `None`
/// if `wire` does not start with a whole header.
pub fn frame_size(wire: &[u8]) -> Option<(usize, usize)> {
    let extended = |n: usize| -> Option<usize> {
        let bytes = wire.get(2..2 + n)?;
        let len = bytes.iter().fold(0u64, |len, b| len << 8 | u64::from(*b));
        usize::try_from(len).ok()
    };
    match wire.get(1)? & 0x7f {
        126 => Some((4, extended(2)?)),
        127 => Some((10, extended(8)?)),
        len => Some((2, usize::from(len))),
    }
}

/// Where the frame covering byte `offset` of `wire` (whole frames back to
/// back) ends: what must still be written after a write stopped at
/// `offset`, before anything else may go out. The end of `wire` when its
/// frames cannot be told apart.
pub fn frame_end(wire: &[u8], offset: usize) -> usize {
    let mut start = 0;
    while start <= offset {
        let Some((header, payload)) = wire.get(start..).and_then(frame_size) else {
            break;
        };
        let end = start + header + payload;
        if end > offset || end >= wire.len() {
            return end.min(wire.len());
        }
        start = end;
    }
    wire.len()
}

/// Whether `wire` (whole frames back to back) holds a close frame.
pub fn has_close_frame(wire: &[u8]) -> bool {
    let mut start = 0;
    while let Some((header, payload)) = wire.get(start..).and_then(frame_size) {
        if wire.get(start).is_some_and(|b| b & 0x0f == 0x8) {
            return true;
        }
        start = start.saturating_add(header).saturating_add(payload);
    }
    false
}

/// Frames for the same recipients, encoded back to back in one buffer.
/// A burst of a room's messages becomes one run: queued as one entry and
/// written as one buffer, it costs each member one reference count and one
/// queue slot, whatever its length, and the kernel one contiguous copy.
#[derive(Clone)]
pub struct Run {
    wire: Bytes,
    frames: usize,
    payload: u64,
}

impl Run {
    /// The run of `frames`, in order. A single frame keeps its own buffer;
    /// more are copied once into a new one.
    pub fn new(frames: &[Frame]) -> Self {
        let wire = match frames {
            [one] => return Self::from(one.clone()),
            _ => {
                let mut wire = Vec::with_capacity(frames.iter().map(|f| f.0.len()).sum());
                for frame in frames {
                    wire.extend_from_slice(&frame.0);
                }
                Bytes::from(wire)
            }
        };
        Self {
            wire,
            frames: frames.len(),
            payload: frames.iter().map(|f| f.len() as u64).sum(),
        }
    }

    /// Number of frames.
    pub fn len(&self) -> usize {
        self.frames
    }

    /// Whether the run has no frames.
    pub fn is_empty(&self) -> bool {
        self.frames == 0
    }

    /// The wire bytes of the first `n` frames (all of them when `n` is at
    /// least the length): what a queue with room for only `n` takes.
    pub fn wire(&self, n: usize) -> Bytes {
        if n >= self.frames {
            return self.wire.clone();
        }
        self.wire.slice(..self.walk(n).0)
    }

    /// How many of the first `n` frames fit, whole, in `bytes` of wire.
    pub fn fitting(&self, n: usize, bytes: usize) -> usize {
        let (mut end, mut count) = (0, 0);
        while count < n.min(self.frames) {
            let Some((header, len)) = self.wire.get(end..).and_then(frame_size) else {
                break;
            };
            if end + header + len > bytes {
                break;
            }
            end += header + len;
            count += 1;
        }
        count
    }

    /// Payload bytes of the first `n` frames, for the bytes-sent counter.
    pub fn payload(&self, n: usize) -> u64 {
        if n >= self.frames {
            return self.payload;
        }
        self.walk(n).1
    }

    /// Wire end and payload bytes of the first `n` frames.
    fn walk(&self, n: usize) -> (usize, u64) {
        let (mut end, mut payload) = (0, 0);
        for _ in 0..n {
            let Some((header, len)) = self.wire.get(end..).and_then(frame_size) else {
                break;
            };
            end += header + len;
            payload += len as u64;
        }
        (end.min(self.wire.len()), payload)
    }
}

/// A run of one frame, keeping the frame's own buffer.
impl From<Frame> for Run {
    fn from(frame: Frame) -> Self {
        let payload = frame.len() as u64;
        Self {
            wire: frame.0,
            frames: 1,
            payload,
        }
    }
}

/// Longest header of an unmasked (server) frame.
const MAX_SERVER_HEADER: usize = 10;

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Frame({})", self.as_str())
    }
}

/// The error codes of SPEC §1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not an object, a field of the wrong type, or an `id` too long.
    InvalidJson,
    /// A JSON object whose `type` is not one the gateway knows.
    UnknownType,
    /// A room name outside the allowed syntax.
    InvalidRoom,
    /// A message to a room the sender has not joined.
    NotMember,
    /// The room has `max_members` members already.
    RoomFull,
    /// The connection is in `max_rooms_per_connection` rooms already.
    TooManyRooms,
    /// The connection sent more than `max_messages_per_sec`.
    RateLimited,
    /// The room is not allowed for this user.
    Forbidden,
    /// A binary frame; the protocol is JSON text.
    BinaryNotSupported,
    /// `websocket.rooms.enabled = false`.
    RoomsDisabled,
}

/// A frame that could not be served: the code, a human-readable message and
/// the frame's `id` when one could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The error code sent to the client.
    pub code: ErrorCode,
    /// Explanation for humans.
    pub message: Cow<'static, str>,
}

impl Refusal {
    /// A refusal with a fixed message.
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// A parsed client request. Strings borrow from the incoming frame.
#[derive(Debug)]
pub enum Request<'a> {
    /// Join a room.
    Join {
        /// The room, not yet validated.
        room: Cow<'a, str>,
    },
    /// Leave a room.
    Leave {
        /// The room, not yet validated.
        room: Cow<'a, str>,
    },
    /// Send to a room's other members.
    Message {
        /// The room, not yet validated.
        room: Cow<'a, str>,
        /// Any JSON value, passed on byte for byte.
        content: &'a RawValue,
    },
}

/// The fields the gateway reads from an incoming frame; anything else is
/// ignored so that clients can carry their own metadata.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    room: Option<Cow<'a, str>>,
    /// `None` only when the field is absent: `"content": null` is a value
    /// like any other and must reach the members as `null`.
    #[serde(borrow, default, deserialize_with = "present")]
    content: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
}

/// Reads a field that is there as `Some`, even when it is `null`; a plain
/// `Option` would turn `null` into `None`, indistinguishable from absent.
fn present<'de, D>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// Used only when a frame failed to parse, to still echo its `id`.
#[derive(Deserialize)]
struct IdOnly<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
}

/// Parses one incoming text frame into its `id` and the request or refusal.
pub fn parse(text: &str) -> (Option<Cow<'_, str>>, Result<Request<'_>, Refusal>) {
    // serde would also read a struct from an array; the protocol is objects.
    if !text.trim_start().starts_with('{') {
        let what = if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
            "frame is not a JSON object"
        } else {
            "frame is not valid JSON"
        };
        return (None, Err(Refusal::new(ErrorCode::InvalidJson, what)));
    }
    let incoming: Incoming<'_> = match serde_json::from_str(text) {
        Ok(incoming) => incoming,
        Err(e) => {
            return (
                id_of(text),
                Err(Refusal::new(
                    ErrorCode::InvalidJson,
                    describe_json_error(&e),
                )),
            );
        }
    };
    let id = incoming.id;
    if id.as_ref().is_some_and(|id| id.len() > MAX_ID_LEN) {
        return (
            None,
            Err(Refusal::new(
                ErrorCode::InvalidJson,
                "id is longer than 64 bytes",
            )),
        );
    }
    (id, request(incoming.kind, incoming.room, incoming.content))
}

fn request<'a>(
    kind: Option<Cow<'a, str>>,
    room: Option<Cow<'a, str>>,
    content: Option<&'a RawValue>,
) -> Result<Request<'a>, Refusal> {
    let Some(kind) = kind else {
        return Err(Refusal::new(ErrorCode::InvalidJson, "missing \"type\""));
    };
    let room = || room.ok_or_else(|| Refusal::new(ErrorCode::InvalidRoom, "missing \"room\""));
    match kind.as_ref() {
        "join" => Ok(Request::Join { room: room()? }),
        "leave" => Ok(Request::Leave { room: room()? }),
        "message" => {
            let room = room()?;
            let content = content
                .ok_or_else(|| Refusal::new(ErrorCode::InvalidJson, "missing \"content\""))?;
            if nests_deeper_than(content.get(), MAX_CONTENT_DEPTH) {
                return Err(Refusal::new(
                    ErrorCode::InvalidJson,
                    "content nests more than 32 levels deep",
                ));
            }
            if has_lone_surrogate(content.get()) {
                return Err(Refusal::new(
                    ErrorCode::InvalidJson,
                    "content holds half a surrogate pair",
                ));
            }
            if has_number_beyond_double(content.get()) {
                return Err(Refusal::new(
                    ErrorCode::InvalidJson,
                    "content holds a number too large for a double",
                ));
            }
            Ok(Request::Message { room, content })
        }
        _ => Err(Refusal::new(ErrorCode::UnknownType, "unknown frame type")),
    }
}

/// Whether the valid JSON `json` nests arrays and objects more than `limit`
/// deep. Strings are skipped whole, so brackets inside them do not count.
/// The common contents, strings and numbers, are answered by the first byte.
fn nests_deeper_than(json: &str, limit: usize) -> bool {
    let bytes = json.as_bytes();
    if !matches!(bytes.first(), Some(b'[' | b'{')) {
        return false;
    }
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => i = string_end(bytes, i + 1),
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

/// Whether a string in the valid JSON `json` escapes half of a UTF-16
/// surrogate pair without the other half (`"\ud800"`). That is valid JSON
/// syntax but not text: strict parsers (serde_json's among them) refuse
/// it, so one such message would fail every reader of the room. Escapes
/// appear only inside strings, so no string tracking is needed, and
/// content without `\u` is answered by one search.
fn has_lone_surrogate(json: &str) -> bool {
    if !json.contains("\\u") {
        return false;
    }
    let bytes = json.as_bytes();
    // The code unit of the `\uXXXX` escape starting at `i`, if there is one.
    let unit = |i: usize| -> Option<u16> {
        if bytes.get(i..i + 2)? != b"\\u" {
            return None;
        }
        u16::from_str_radix(json.get(i + 2..i + 6)?, 16).ok()
    };
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            i += 1;
            continue;
        }
        match unit(i) {
            Some(0xD800..=0xDBFF) => {
                if !matches!(unit(i + 6), Some(0xDC00..=0xDFFF)) {
                    return true;
                }
                i += 12;
            }
            Some(0xDC00..=0xDFFF) => return true,
            Some(_) => i += 6,
            // Any other escape is two bytes (`\\` among them).
            None => i += 2,
        }
    }
    false
}

/// Whether the valid JSON `json` holds a number beyond what a double
/// holds (`1e400`, an integer of 400 digits). That is valid JSON syntax,
/// but serde_json, Go's `encoding/json` and JavaScript's `JSON.parse`
/// (which makes it `Infinity`) do not read it back as written, so like
/// half a surrogate pair it would fail or mislead every reader of the
/// room. Only numbers with an exponent or more than 15 characters can be
/// that large, so the others are not parsed.
fn has_number_beyond_double(json: &str) -> bool {
    let bytes = json.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => i = string_end(bytes, i + 1) + 1,
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len()
                    && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                let number = &json[start..i];
                if (number.len() > 15 || number.contains(['e', 'E']))
                    && !number.parse::<f64>().is_ok_and(f64::is_finite)
                {
                    return true;
                }
            }
            _ => i += 1,
        }
    }
    false
}

/// The index of the quote that closes the JSON string whose contents begin
/// at `start` (or the end of `bytes`, for a string that does not close).
fn string_end(bytes: &[u8], start: usize) -> usize {
    let mut i = start;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return i,
            _ => i += 1,
        }
    }
    bytes.len()
}

/// The `id` of a frame that is refused before it is parsed (over the rate
/// limit), so the client can still match the refusal to its frame: SPEC §1
/// says the reply to a frame carries its `id`. `None` when the frame has no
/// valid one. This reads the whole frame, but the frame was already received
/// and checked as UTF-8, so it costs no more than the parse it replaces.
pub fn request_id(text: &str) -> Option<Cow<'_, str>> {
    if !text.trim_start().starts_with('{') {
        return None;
    }
    id_of(text)
}

/// The `id` of a frame that failed to parse as a whole, when it has a valid one.
fn id_of(text: &str) -> Option<Cow<'_, str>> {
    serde_json::from_str::<IdOnly<'_>>(text)
        .ok()
        .and_then(|f| f.id)
        .filter(|id| id.len() <= MAX_ID_LEN)
}

fn describe_json_error(e: &serde_json::Error) -> Cow<'static, str> {
    match e.classify() {
        // Not an object was refused before; `Data` is a field's fault.
        serde_json::error::Category::Data if e.to_string().starts_with("duplicate field") => {
            "a field is given more than once".into()
        }
        serde_json::error::Category::Data => "a field has the wrong type".into(),
        _ => "frame is not valid JSON".into(),
    }
}

#[derive(Serialize)]
struct Reply<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<ErrorCode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connection_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
}

impl<'a> Reply<'a> {
    fn new(kind: &'a str) -> Self {
        Self {
            kind,
            room: None,
            reason: None,
            code: None,
            message: None,
            connection_id: None,
            id: None,
        }
    }

    fn encode(&self) -> Frame {
        // Serialising plain strings and enums into a String cannot fail.
        Frame::from_text(serde_json::to_string(self).unwrap_or_default())
    }
}

/// `{"type":"system","message":"Connected as <id>","connection_id":"<id>"}`.
pub fn welcome(connection_id: &str) -> Frame {
    // Written out by hand: one per connection, and serialising the `Reply`
    // costs several times more.
    let mut out = String::with_capacity(80 + 2 * connection_id.len());
    out.push_str(r#"{"type":"system","message":"Connected as "#);
    push_escaped(&mut out, connection_id);
    out.push_str(r#"","connection_id":""#);
    push_escaped(&mut out, connection_id);
    out.push_str(r#""}"#);
    Frame::from_text(out)
}

/// `{"type":"joined","room":R}`, with the request's `id` if any.
pub fn joined(room: &str, id: Option<&str>) -> Frame {
    Reply {
        room: Some(room),
        id,
        ..Reply::new("joined")
    }
    .encode()
}

/// `{"type":"left","room":R}`; `kicked` adds `"reason":"kicked"`.
pub fn left(room: &str, id: Option<&str>, kicked: bool) -> Frame {
    Reply {
        room: Some(room),
        reason: kicked.then_some("kicked"),
        id,
        ..Reply::new("left")
    }
    .encode()
}

/// `{"type":"ack","id":...}` for an accepted message.
pub fn ack(id: &str) -> Frame {
    Reply {
        id: Some(id),
        ..Reply::new("ack")
    }
    .encode()
}

/// `{"type":"error","code":...,"message":...}`.
pub fn error(refusal: &Refusal, id: Option<&str>) -> Frame {
    Reply {
        code: Some(refusal.code),
        message: Some(&refusal.message),
        id,
        ..Reply::new("error")
    }
    .encode()
}

/// Presence event kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceKind {
    /// A member joined.
    Join,
    /// A member left.
    Leave,
}

/// `{"type":"presence","room":R,"event":...,"connection_id":C,"user":U}`.
pub fn presence(room: &str, event: PresenceKind, connection_id: &str, user: Option<&str>) -> Frame {
    #[derive(Serialize)]
    struct Presence<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        room: &'a str,
        event: PresenceKind,
        connection_id: &'a str,
        user: Option<&'a str>,
    }
    let frame = Presence {
        kind: "presence",
        room,
        event,
        connection_id,
        user,
    };
    Frame::from_text(serde_json::to_string(&frame).unwrap_or_default())
}

/// `{"type":"message","room":R,"content":C,"from":F}` where `content` is
/// raw JSON, already validated, copied in without re-encoding. `room: None`
/// encodes `"room":null` (direct and global backend messages).
pub fn message(room: Option<&str>, content: &str, from: &str) -> Frame {
    let mut out = String::with_capacity(48 + room.map_or(4, str::len) + content.len() + from.len());
    out.push_str(r#"{"type":"message","room":"#);
    push_json_str(&mut out, room);
    out.push_str(r#","content":"#);
    out.push_str(content);
    out.push_str(r#","from":"#);
    push_json_str(&mut out, Some(from));
    out.push('}');
    Frame::from_text(out)
}

/// Appends a JSON string (escaped) or `null`.
pub fn push_json_str(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => {
            out.push('"');
            push_escaped(out, s);
            out.push('"');
        }
        None => out.push_str("null"),
    }
}

/// Appends the inside of a JSON string: `s`, escaped.
fn push_escaped(out: &mut String, s: &str) {
    // Room names and connection ids never need escaping, and are the
    // common case: skip serde for them. No early exit, so the check
    // compiles to a vectorised loop.
    let plain = s.bytes().fold(true, |plain, b| {
        plain & b.is_ascii_graphic() & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.push_str(s);
    } else if let Ok(quoted) = serde_json::to_string(s) {
        out.push_str(&quoted[1..quoted.len() - 1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(text: &str) -> ErrorCode {
        parse(text).1.expect_err("refused").code
    }

    #[test]
    fn parses_requests_and_ignores_unknown_fields() {
        let (id, req) =
            parse(r#"{"type":"message","room":"a.b","content":{"x":[1,2]},"id":"7","extra":true}"#);
        assert_eq!(id.as_deref(), Some("7"));
        match req.expect("parses") {
            Request::Message { room, content } => {
                assert_eq!(room, "a.b");
                assert_eq!(content.get(), r#"{"x":[1,2]}"#);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn refusals_of_bad_json_say_what_is_wrong() {
        let message_of = |text: &str| parse(text).1.expect_err("refused").message;
        for not_json in ["", "   ", "nope", "{"] {
            assert_eq!(
                message_of(not_json),
                "frame is not valid JSON",
                "{not_json:?}"
            );
        }
        assert_eq!(message_of("[1]"), "frame is not a JSON object");
        assert_eq!(message_of(r#""join""#), "frame is not a JSON object");
        assert_eq!(
            message_of(r#"{"type":"join","room":"a","room":"b"}"#),
            "a field is given more than once"
        );
        assert_eq!(message_of(r#"{"type":5}"#), "a field has the wrong type");
    }

    /// Frames with 2-, 4- and 10-byte headers.
    fn sized_frames() -> [Frame; 3] {
        [
            Frame::from_text("a".repeat(5)),
            Frame::from_text("b".repeat(300)),
            Frame::from_text("c".repeat(70_000)),
        ]
    }

    #[test]
    fn a_close_frame_is_found_among_control_frames_and_not_inside_a_payload() {
        let pong = [0x8a, 0x02, 0x88, 0x88];
        let close = [0x88, 0x02, 0x03, 0xe8];
        assert!(!has_close_frame(&pong), "0x88 inside a payload is no close");
        let both: Vec<u8> = pong.iter().chain(&close).copied().collect();
        assert!(has_close_frame(&both));
        assert!(has_close_frame(&close));
        assert!(!has_close_frame(&[]));
        assert!(!has_close_frame(&[0x88]), "a cut header is no frame");
    }

    #[test]
    fn frame_sizes_are_read_from_every_header_form() {
        let [small, medium, large] = sized_frames();
        assert_eq!(frame_size(small.wire()), Some((2, 5)));
        assert_eq!(frame_size(medium.wire()), Some((4, 300)));
        assert_eq!(frame_size(large.wire()), Some((10, 70_000)));
        assert_eq!(frame_size(&medium.wire()[..3]), None, "a cut header");
        assert_eq!(frame_size(&[]), None);
        assert_eq!((small.len(), medium.len(), large.len()), (5, 300, 70_000));
    }

    #[test]
    fn a_run_is_its_frames_back_to_back_and_can_be_cut_between_them() {
        let frames = sized_frames();
        let run = Run::new(&frames);
        let wire: Vec<u8> = frames.iter().flat_map(|f| f.wire().to_vec()).collect();
        assert_eq!(run.len(), 3);
        assert_eq!(run.wire(3).as_ref(), wire.as_slice());
        assert_eq!(run.wire(9).as_ref(), wire.as_slice());
        let two = frames[0].wire().len() + frames[1].wire().len();
        assert_eq!(run.wire(2).as_ref(), &wire[..two]);
        assert_eq!(run.wire(1).as_ref(), frames[0].wire().as_ref());
        assert!(run.wire(0).is_empty());
        assert_eq!(
            (
                run.payload(0),
                run.payload(1),
                run.payload(2),
                run.payload(3)
            ),
            (0, 5, 305, 70_305)
        );
        let one = Run::new(&frames[1..2]);
        assert_eq!(one.wire(1).as_ptr(), frames[1].wire().as_ptr(), "shared");
        let from = Run::from(frames[2].clone());
        assert_eq!(from.wire(1).as_ptr(), frames[2].wire().as_ptr(), "moved");
        assert_eq!((from.len(), from.payload(1)), (1, 70_000));
        assert!(Run::new(&[]).is_empty());
    }

    #[test]
    fn the_rest_of_a_cut_frame_ends_where_that_frame_ends() {
        let frames = sized_frames();
        let wire: Vec<u8> = frames.iter().flat_map(|f| f.wire().to_vec()).collect();
        let first = frames[0].wire().len();
        let second = first + frames[1].wire().len();
        assert_eq!(frame_end(&wire, 1), first);
        assert_eq!(frame_end(&wire, first - 1), first);
        assert_eq!(frame_end(&wire, first), second, "the next frame");
        assert_eq!(frame_end(&wire, second + 5), wire.len());
        assert_eq!(
            frame_end(&[0x81, 0x7e, 0x01], 1),
            3,
            "unreadable: all of it"
        );
    }

    #[test]
    fn null_content_is_a_value_not_a_missing_field() {
        match parse(r#"{"type":"message","room":"r","content":null}"#).1 {
            Ok(Request::Message { content, .. }) => assert_eq!(content.get(), "null"),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn message_with(content: &str) -> String {
        format!(r#"{{"type":"message","room":"r","content":{content}}}"#)
    }

    #[test]
    fn content_may_nest_32_levels_and_no_deeper() {
        let nested = |depth: usize, open: &str, close: &str| {
            format!("{}1{}", open.repeat(depth), close.repeat(depth))
        };
        for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
            let deepest = message_with(&nested(MAX_CONTENT_DEPTH, open, close));
            assert!(parse(&deepest).1.is_ok(), "{deepest}");
            let deeper = message_with(&nested(MAX_CONTENT_DEPTH + 1, open, close));
            assert_eq!(code_of(&deeper), ErrorCode::InvalidJson, "{deeper}");
        }
        // Far deeper than any recursive parser's stack allows: refused, not
        // a crash.
        assert_eq!(
            code_of(&message_with(&nested(100_000, "[", "]"))),
            ErrorCode::InvalidJson
        );
    }

    #[test]
    fn content_with_a_number_beyond_a_double_is_refused() {
        let long = "9".repeat(400);
        for beyond in ["1e400", "-1e309", r#"[1,{"a":2e999}]"#, long.as_str()] {
            assert_eq!(
                code_of(&message_with(beyond)),
                ErrorCode::InvalidJson,
                "{beyond}"
            );
        }
        for fine in [
            "1e308",
            "-1.5e-400",
            "123456789012345678901234567890",
            r#""1e400 in a string""#,
            r#"{"1e999":0.000000000000000000001}"#,
        ] {
            assert!(parse(&message_with(fine)).1.is_ok(), "{fine}");
        }
    }

    #[test]
    fn content_with_half_a_surrogate_pair_is_refused() {
        for lone in [
            r#""\ud800""#,
            r#""\ud800x""#,
            r#"["\udbff\u0041"]"#,
            r#"{"k":"\udc00"}"#,
            r#""\ud83d\ud83d""#,
            r#""\\\ud800""#,
        ] {
            assert_eq!(
                code_of(&message_with(lone)),
                ErrorCode::InvalidJson,
                "{lone}"
            );
        }
        for fine in [
            r#""\ud83d\ude00""#,
            r#""\\ud800""#,
            r#""\u00e9 \n \"\\""#,
            r#"{"\ud83d\ude00":["\uffff"]}"#,
        ] {
            assert!(parse(&message_with(fine)).1.is_ok(), "{fine}");
        }
    }

    #[test]
    fn brackets_in_strings_and_siblings_do_not_count_as_depth() {
        let in_strings = format!(r#"["{}", "\"[[[", {{"k]": "{{{{"}}]"#, "[".repeat(100));
        assert!(parse(&message_with(&in_strings)).1.is_ok());
        let wide = format!("[{}]", vec!["[[1]]"; 1000].join(","));
        assert!(parse(&message_with(&wide)).1.is_ok());
        let text = format!("\"{}\"", "[".repeat(1000));
        assert!(parse(&message_with(&text)).1.is_ok());
    }

    #[test]
    fn refusals_carry_the_right_codes() {
        assert_eq!(code_of("not json"), ErrorCode::InvalidJson);
        assert_eq!(code_of("[1,2]"), ErrorCode::InvalidJson);
        assert_eq!(code_of(r#"["join","general"]"#), ErrorCode::InvalidJson);
        assert_eq!(code_of(r#"{"type":5}"#), ErrorCode::InvalidJson);
        assert_eq!(
            code_of(r#"{"type":"join","room":7}"#),
            ErrorCode::InvalidJson
        );
        assert_eq!(code_of(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code_of(r#"{"type":"join"}"#), ErrorCode::InvalidRoom);
        assert_eq!(
            code_of(r#"{"type":"message","room":"a"}"#),
            ErrorCode::InvalidJson
        );
        let long = "x".repeat(65);
        assert_eq!(
            code_of(&format!(r#"{{"type":"join","room":"a","id":"{long}"}}"#)),
            ErrorCode::InvalidJson
        );
    }

    #[test]
    fn id_is_echoed_even_when_the_frame_is_refused() {
        let (id, req) = parse(r#"{"type":"join","room":7,"id":"abc"}"#);
        assert!(req.is_err());
        assert_eq!(id.as_deref(), Some("abc"));
        // A frame refused before parsing (rate limited) still has its id read.
        assert_eq!(
            request_id(r#" {"type":"message","id":"r1","content":[1]}"#).as_deref(),
            Some("r1")
        );
        assert_eq!(request_id(r#"["id","r1"]"#), None);
        assert_eq!(
            request_id(&format!(r#"{{"id":"{}"}}"#, "x".repeat(65))),
            None
        );
    }

    #[test]
    fn frames_carry_the_websocket_header_for_every_length() {
        use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
        for len in [0usize, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            let text = "x".repeat(len);
            let frame = Frame::from_text(text.clone());
            let mut expected = Vec::new();
            WsFrame::message(text.clone(), OpCode::Data(OpData::Text), true)
                .format(&mut expected)
                .expect("format");
            assert_eq!(frame.wire().as_ref(), &expected[..], "length {len}");
            assert_eq!(frame.len(), len);
            assert_eq!(frame.as_str(), text);
        }
    }

    #[test]
    fn json_strings_are_escaped_only_when_needed() {
        for (input, expected) in [
            ("plain-id_1.x", r#""plain-id_1.x""#),
            ("a b", r#""a b""#),
            ("quote\"back\\", r#""quote\"back\\""#),
            ("line\nbreak\u{1}", r#""line\nbreak\u0001""#),
            ("é", r#""é""#),
        ] {
            let mut out = String::new();
            push_json_str(&mut out, Some(input));
            assert_eq!(out, expected);
            let back: String = serde_json::from_str(&out).expect("valid JSON");
            assert_eq!(back, input);
        }
        let mut out = String::new();
        push_json_str(&mut out, None);
        assert_eq!(out, "null");
    }

    #[test]
    fn encodes_frames_as_the_spec_shows() {
        assert_eq!(
            joined("general", None).as_str(),
            r#"{"type":"joined","room":"general"}"#
        );
        assert_eq!(
            left("general", Some("1"), true).as_str(),
            r#"{"type":"left","room":"general","reason":"kicked","id":"1"}"#
        );
        assert_eq!(
            message(Some("r"), r#""hi""#, "abc").as_str(),
            r#"{"type":"message","room":"r","content":"hi","from":"abc"}"#
        );
        assert_eq!(
            message(None, r#""hi""#, "a \"b\"").as_str(),
            r#"{"type":"message","room":null,"content":"hi","from":"a \"b\""}"#
        );
        let err = error(&Refusal::new(ErrorCode::RoomFull, "full"), Some("x"));
        assert_eq!(
            err.as_str(),
            r#"{"type":"error","code":"room_full","message":"full","id":"x"}"#
        );
        assert_eq!(
            welcome("id-1").as_str(),
            r#"{"type":"system","message":"Connected as id-1","connection_id":"id-1"}"#
        );
        let odd = "a \"b\"\n";
        let v: serde_json::Value = serde_json::from_str(welcome(odd).as_str()).expect("json");
        assert_eq!(v["connection_id"], odd);
        assert_eq!(v["message"], format!("Connected as {odd}"));
    }
}
