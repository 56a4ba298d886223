//! The client side of WebSocket (RFC 6455) that the generator needs: the
//! upgrade request, parsing server frames in place, and writing masked
//! client frames.
//!
//! It is written out here rather than taken from tokio-tungstenite's stream
//! because the generator shares two cores with the server it measures:
//! each connection keeps one read buffer, every complete frame in it is
//! handled per wake-up without a copy or an allocation, and there is no
//! per-message UTF-8 check or queue. The handshake keys come from
//! tungstenite.

use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};

/// Continuation frame.
pub const CONTINUATION: u8 = 0x0;
/// Text frame.
pub const TEXT: u8 = 0x1;
/// Binary frame.
pub const BINARY: u8 = 0x2;
/// Close frame.
pub const CLOSE: u8 = 0x8;
/// Ping frame.
pub const PING: u8 = 0x9;
/// Pong frame.
pub const PONG: u8 = 0xA;

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Last fragment of a message.
    pub fin: bool,
    /// Frame type.
    pub opcode: u8,
    /// Bytes before the payload.
    pub header_len: usize,
    /// Payload bytes.
    pub payload_len: usize,
    /// Masking key (servers do not mask; handled anyway).
    pub mask: Option<[u8; 4]>,
}

impl Header {
    /// Header and payload together.
    pub fn total(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// What the start of a buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A complete header (the payload may still be incomplete: compare
    /// `total()` with the bytes at hand).
    Header(Header),
    /// Not even a complete header yet.
    Incomplete,
    /// A frame larger than the limit, or reserved bits set: the stream is
    /// broken or hostile, the connection is dropped.
    Invalid,
}

/// Parses the frame header at the start of `buf`.
#[inline]
pub fn parse_header(buf: &[u8], max_payload: usize) -> Parsed {
    if buf.len() < 2 {
        return Parsed::Incomplete;
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        // RSV bits: no extension was negotiated.
        return Parsed::Invalid;
    }
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Parsed::Incomplete;
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Parsed::Incomplete;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    if len > max_payload as u64 {
        return Parsed::Invalid;
    }
    let mask = if masked {
        if buf.len() < at + 4 {
            return Parsed::Incomplete;
        }
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    Parsed::Header(Header {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0F,
        header_len: at,
        payload_len: len as usize,
        mask,
    })
}

/// XORs `data` with `mask` (both directions of masking are the same).
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Appends one complete, masked client frame to `out`.
pub fn encode(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

/// The upgrade request; returns it with the key to check the answer against.
pub fn upgrade_request(host: &str, path: &str) -> (Vec<u8>, String) {
    let key = generate_key();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    (request.into_bytes(), key)
}

/// Checks the server's answer in `buf`: `Ok(None)` while the header block
/// is incomplete, `Ok(Some(n))` with its length once it is a valid 101.
pub fn check_upgrade(buf: &[u8], key: &str) -> Result<Option<usize>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > 8192 {
            return Err("upgrade response header too long".into());
        }
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 101") {
        return Err(format!("upgrade refused: {status}"));
    }
    let expected = derive_accept_key(key.as_bytes());
    let accepted = lines.any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("sec-websocket-accept") && value.trim() == expected
        })
    });
    if !accepted {
        return Err("upgrade response without the right Sec-WebSocket-Accept".into());
    }
    Ok(Some(end + 4))
}

/// A cheap per-connection source of masking keys (xorshift).
#[derive(Debug, Clone)]
pub struct Masker(u64);

impl Masker {
    /// Seeds from the connection index (never zero).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next key.
    pub fn next_key(&mut self) -> [u8; 4] {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x as u32).to_ne_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};

    /// A frame as tungstenite (the server's library) would send it.
    fn server_frame(opcode: OpCode, payload: &[u8], fin: bool) -> Vec<u8> {
        let frame = Frame::message(payload.to_vec(), opcode, fin);
        let mut out = Vec::new();
        frame.format(&mut out).unwrap();
        out
    }

    #[test]
    fn parses_server_frames_of_every_length_class() {
        for len in [0usize, 5, 125, 126, 300, 65535, 65536, 70000] {
            let payload = vec![b'a'; len];
            let bytes = server_frame(OpCode::Data(Data::Text), &payload, true);
            let Parsed::Header(h) = parse_header(&bytes, 1 << 20) else {
                panic!("no header for {len}");
            };
            assert_eq!(h.payload_len, len);
            assert_eq!(h.total(), bytes.len());
            assert_eq!(h.opcode, TEXT);
            assert!(h.fin && h.mask.is_none());
            // Every strict prefix of the header is incomplete.
            for cut in 0..h.header_len {
                assert_eq!(parse_header(&bytes[..cut], 1 << 20), Parsed::Incomplete);
            }
        }
    }

    #[test]
    fn fragments_and_limits() {
        let bytes = server_frame(OpCode::Data(Data::Text), b"abc", false);
        let Parsed::Header(h) = parse_header(&bytes, 16) else {
            panic!()
        };
        assert!(!h.fin);
        let big = server_frame(OpCode::Data(Data::Binary), &[0; 100], true);
        assert_eq!(parse_header(&big, 99), Parsed::Invalid);
    }

    #[test]
    fn encoded_client_frames_decode_in_tungstenite() {
        for len in [3usize, 200, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut out = Vec::new();
            encode(&mut out, BINARY, &payload, [1, 2, 3, 4]);
            let mut cursor = std::io::Cursor::new(out.as_slice());
            let (header, length) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            assert_eq!(length as usize, len);
            assert_eq!(header.mask, Some([1, 2, 3, 4]));
            let start = cursor.position() as usize;
            let mut body = out[start..].to_vec();
            apply_mask(&mut body, [1, 2, 3, 4]);
            assert_eq!(body, payload);
        }
    }

    #[test]
    fn upgrade_answer_is_checked() {
        let (_, key) = upgrade_request("h", "/ws");
        let accept = derive_accept_key(key.as_bytes());
        let mut ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .into_bytes();
        let head = ok.len();
        ok.extend_from_slice(&[0x81, 0x00]);
        assert_eq!(check_upgrade(&ok, &key), Ok(Some(head)));
        assert_eq!(check_upgrade(&ok[..20], &key), Ok(None));
        assert!(check_upgrade(b"HTTP/1.1 503 Busy\r\n\r\n", &key).is_err());
        let wrong = "HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: nope\r\n\r\n";
        assert!(check_upgrade(wrong.as_bytes(), &key).is_err());
    }
}
