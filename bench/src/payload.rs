//! The measured payload: a sequence number and a send timestamp inside an
//! ordinary roomgate `message` frame.
//!
//! The two numbers sit between `~` marks in the `content` string:
//! `"content":"~s=42 t=1234567~xxxx"`. The marker has no quote or
//! backslash, so it reads the same whether the gateway delivers the payload
//! raw, wraps it in a JSON string, or a client sent it as its own `content`;
//! and a subscriber finds it with one byte search and two digit runs
//! instead of a JSON parse.

use std::fmt::Write as _;

/// Sequence number of probes (sent until every subscriber is reachable);
/// measured messages count from 1.
pub const PROBE: u32 = 0;

/// Writes the frame a backend publishes (raw mode: the text frame itself,
/// byte for byte the same as what nats-server's subscribers receive),
/// padded with `x` to at least `size` bytes.
pub fn backend_frame(out: &mut Vec<u8>, room: &str, seq: u32, ts: u64, size: usize) {
    out.clear();
    let mut s = String::with_capacity(size.max(96));
    let _ = write!(
        s,
        r#"{{"type":"message","room":"{room}","content":"~s={seq} t={ts}~"#
    );
    let tail = r#"","from":"server"}"#;
    pad(&mut s, size.saturating_sub(tail.len()));
    s.push_str(tail);
    out.extend_from_slice(s.as_bytes());
}

/// Writes the `content` a backend publishes when roomgate wraps it (the
/// gateway then adds the envelope around it).
pub fn wrapped_content(out: &mut Vec<u8>, seq: u32, ts: u64, size: usize) {
    out.clear();
    let mut s = String::with_capacity(size.max(32));
    let _ = write!(s, "~s={seq} t={ts}~");
    // The envelope adds about 60 bytes; pad the content so the delivered
    // frame is about as long as a raw one.
    pad(&mut s, size.saturating_sub(60));
    out.extend_from_slice(s.as_bytes());
}

/// Writes a client's `message` frame (before WebSocket framing).
pub fn client_frame(out: &mut Vec<u8>, room: &str, seq: u32, ts: u64, size: usize) {
    out.clear();
    let mut s = String::with_capacity(size.max(96));
    let _ = write!(
        s,
        r#"{{"type":"message","room":"{room}","content":"~s={seq} t={ts}~"#
    );
    // The gateway adds "from":"<uuid>" (about 46 bytes) on the way out.
    pad(&mut s, size.saturating_sub(2 + 46));
    s.push_str(r#""}"#);
    out.extend_from_slice(s.as_bytes());
}

fn pad(s: &mut String, to: usize) {
    while s.len() < to {
        s.push('x');
    }
}

/// Finds the sequence number and timestamp in a delivered frame.
#[cfg(test)]
pub fn parse(frame: &[u8]) -> Option<(u32, u64)> {
    parse_with_hint(frame, &mut 0)
}

/// Finds the sequence number and timestamp in a delivered frame, looking
/// first where the marker was in the previous frame of the same connection (frames of one stream share their layout), which
/// spares the byte search on almost every frame.
#[inline]
pub fn parse_with_hint(frame: &[u8], hint: &mut u16) -> Option<(u32, u64)> {
    let at = if frame.get(usize::from(*hint)) == Some(&b'~') {
        usize::from(*hint)
    } else {
        let at = frame.iter().position(|&b| b == b'~')?;
        *hint = u16::try_from(at).unwrap_or(0);
        at
    };
    let rest = frame.get(at + 1..)?;
    let rest = rest.strip_prefix(b"s=")?;
    let (seq, rest) = digits(rest)?;
    let rest = rest.strip_prefix(b" t=")?;
    let (ts, _) = digits(rest)?;
    Some((u32::try_from(seq).ok()?, ts))
}

#[inline]
fn digits(s: &[u8]) -> Option<(u64, &[u8])> {
    let mut value: u64 = 0;
    let mut n = 0;
    for &b in s.iter().take(20) {
        if !b.is_ascii_digit() {
            break;
        }
        value = value.wrapping_mul(10).wrapping_add(u64::from(b - b'0'));
        n += 1;
    }
    (n > 0).then(|| (value, &s[n..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_frame_round_trips_and_is_json() {
        let mut out = Vec::new();
        backend_frame(&mut out, "b.7", 42, 123_456_789, 128);
        assert!(out.len() >= 128);
        assert_eq!(parse(&out), Some((42, 123_456_789)));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["room"], "b.7");
        assert_eq!(v["from"], "server");
    }

    #[test]
    fn wrapped_and_client_frames_parse() {
        let mut out = Vec::new();
        wrapped_content(&mut out, 7, 99, 128);
        // What the gateway delivers: the content as a JSON string.
        let frame = serde_json::json!({
            "type": "message", "room": "r", "from": "server",
            "content": std::str::from_utf8(&out).unwrap(),
        })
        .to_string();
        assert_eq!(parse(frame.as_bytes()), Some((7, 99)));

        client_frame(&mut out, "r", 3, 4, 100);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(parse(&out), Some((3, 4)));
    }

    #[test]
    fn the_hint_follows_the_layout() {
        let mut hint = 0;
        let mut out = Vec::new();
        backend_frame(&mut out, "b1", 1, 10, 128);
        assert_eq!(parse_with_hint(&out, &mut hint), Some((1, 10)));
        assert_eq!(out[usize::from(hint)], b'~');
        backend_frame(&mut out, "b1", 2, 20, 128);
        assert_eq!(parse_with_hint(&out, &mut hint), Some((2, 20)));
        backend_frame(&mut out, "b1234", 3, 30, 128);
        assert_eq!(parse_with_hint(&out, &mut hint), Some((3, 30)));
        assert_eq!(parse_with_hint(b"~s=4 t=40~", &mut hint), Some((4, 40)));
        assert_eq!(hint, 0);
    }

    #[test]
    fn other_frames_do_not_parse() {
        assert_eq!(parse(br#"{"type":"joined","room":"r"}"#), None);
        assert_eq!(parse(b"~s= t=1~"), None);
        assert_eq!(parse(b"~s=1 t=~"), None);
        assert_eq!(parse(b"~s=99999999999 t=1~"), None);
    }
}
