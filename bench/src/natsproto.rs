//! The subscriber's side of the NATS client protocol, as spoken over
//! nats-server's WebSocket listener: the server's byte stream is cut into
//! WebSocket frames at arbitrary points, so operations are parsed
//! incrementally and a `MSG` may span several frames.

/// What the server said.
#[derive(Debug, PartialEq, Eq)]
pub enum Op<'a> {
    /// `MSG`/`HMSG`: the payload (headers skipped).
    Msg(&'a [u8]),
    /// `PING`: must be answered with `PONG`.
    Ping,
    /// `PONG`: the answer to our `PING`.
    Pong,
    /// `INFO {...}`.
    Info,
    /// `+OK`.
    Ok,
    /// `-ERR '...'`.
    Err(&'a [u8]),
}

/// Longest control line or message accepted (nats-server's default
/// `max_payload` is 1 MiB).
const MAX_PENDING: usize = 2 << 20;

/// Incremental parser. Holds bytes only while an operation is incomplete,
/// so an idle or caught-up subscriber keeps no buffer.
#[derive(Debug, Default)]
pub struct Reader {
    pending: Vec<u8>,
}

impl Reader {
    /// Feeds the next chunk of the stream; `f` sees every complete operation.
    pub fn feed(&mut self, data: &[u8], mut f: impl FnMut(Op<'_>)) -> Result<(), String> {
        if self.pending.is_empty() {
            let used = parse(data, &mut f)?;
            if used < data.len() {
                self.pending.extend_from_slice(&data[used..]);
            }
        } else {
            self.pending.extend_from_slice(data);
            let buf = std::mem::take(&mut self.pending);
            let used = parse(&buf, &mut f)?;
            self.pending = buf;
            self.pending.drain(..used);
            if self.pending.is_empty() {
                // Give the memory back: most subscribers are caught up most
                // of the time.
                self.pending = Vec::new();
            }
        }
        if self.pending.len() > MAX_PENDING {
            return Err("NATS operation larger than 2 MiB".into());
        }
        Ok(())
    }
}

/// Parses every complete operation in `buf`; returns the bytes consumed.
fn parse(buf: &[u8], f: &mut impl FnMut(Op<'_>)) -> Result<usize, String> {
    let mut at = 0;
    while at < buf.len() {
        let rest = &buf[at..];
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            break;
        };
        let line = rest[..nl].strip_suffix(b"\r").unwrap_or(&rest[..nl]);
        let after = nl + 1;
        if let Some(args) = line.strip_prefix(b"MSG ") {
            let total = last_number(args, 0)?;
            let need = after + total + 2;
            if rest.len() < need {
                break;
            }
            f(Op::Msg(&rest[after..after + total]));
            at += need;
        } else if let Some(args) = line.strip_prefix(b"HMSG ") {
            let total = last_number(args, 0)?;
            let headers = last_number(args, 1)?;
            let need = after + total + 2;
            if rest.len() < need {
                break;
            }
            if headers > total {
                return Err("HMSG header size beyond the total".into());
            }
            f(Op::Msg(&rest[after + headers..after + total]));
            at += need;
        } else {
            f(match line {
                b"PING" => Op::Ping,
                b"PONG" => Op::Pong,
                b"+OK" => Op::Ok,
                l if l.starts_with(b"INFO") => Op::Info,
                l if l.starts_with(b"-ERR") => Op::Err(l),
                other => {
                    return Err(format!(
                        "unexpected NATS operation: {}",
                        String::from_utf8_lossy(&other[..other.len().min(80)])
                    ));
                }
            });
            at += after;
        }
    }
    Ok(at)
}

/// The `back`-th number from the end of a space-separated argument list
/// (read from the bytes directly: this runs once per delivered message).
fn last_number(args: &[u8], back: usize) -> Result<usize, String> {
    let bad = || format!("bad MSG line: {}", String::from_utf8_lossy(args));
    let mut end = args.len();
    for _ in 0..back {
        end = args[..end]
            .iter()
            .rposition(|&b| b != b' ')
            .ok_or_else(bad)?;
        end = args[..end]
            .iter()
            .rposition(|&b| b == b' ')
            .ok_or_else(bad)?;
    }
    let token = args[..end].trim_ascii_end();
    let start = token.iter().rposition(|&b| b == b' ').map_or(0, |i| i + 1);
    let digits = &token[start..];
    if digits.is_empty() || digits.len() > 12 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    Ok(digits
        .iter()
        .fold(0usize, |n, &d| n * 10 + usize::from(d - b'0')))
}

/// `CONNECT` (no echo of verbose +OK) followed by `PING`.
pub fn connect() -> &'static [u8] {
    b"CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1}\r\nPING\r\n"
}

/// `SUB subject sid` followed by `PING`, whose `PONG` tells that the
/// subscription is in place.
pub fn subscribe(subject: &str, sid: u32) -> Vec<u8> {
    format!("SUB {subject} {sid}\r\nPING\r\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(chunks: &[&[u8]]) -> Vec<String> {
        let mut r = Reader::default();
        let mut seen = Vec::new();
        for c in chunks {
            r.feed(c, |op| seen.push(format!("{op:?}"))).unwrap();
        }
        assert!(r.pending.is_empty(), "left over: {:?}", r.pending);
        seen
    }

    #[test]
    fn whole_stream() {
        let s: &[u8] =
            b"INFO {\"x\":1}\r\nPONG\r\nMSG a.b 1 5\r\nhello\r\nPING\r\nMSG a 1 r.1 0\r\n\r\n";
        assert_eq!(
            ops(&[s]),
            [
                "Info",
                "Pong",
                "Msg([104, 101, 108, 108, 111])",
                "Ping",
                "Msg([])"
            ]
        );
    }

    #[test]
    fn split_at_every_byte() {
        let s: &[u8] = b"MSG room.1 7 12\r\nhello\r\nworld\r\nHMSG s 1 12 15\r\nNATS/1.0\r\n\r\nabc\r\nPING\r\n";
        let whole = ops(&[s]);
        assert_eq!(whole.len(), 3);
        for cut in 1..s.len() {
            assert_eq!(ops(&[&s[..cut], &s[cut..]]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = s.chunks(1).collect();
        assert_eq!(ops(&bytes), whole);
    }

    #[test]
    fn sizes_are_read_from_the_end() {
        assert_eq!(last_number(b"a.b 1 12", 0), Ok(12));
        assert_eq!(last_number(b"a.b 1 reply 7", 0), Ok(7));
        assert_eq!(last_number(b"s 1 12 15", 1), Ok(12));
        assert_eq!(last_number(b"s 1 r 12 15", 1), Ok(12));
        assert!(last_number(b"", 0).is_err());
        assert!(last_number(b"a 1 x", 0).is_err());
        assert!(last_number(b"15", 1).is_err());
    }

    #[test]
    fn garbage_is_an_error() {
        let mut r = Reader::default();
        assert!(r.feed(b"WHAT\r\n", |_| {}).is_err());
        assert!(r.feed(b"MSG a 1 x\r\n", |_| {}).is_err());
    }
}
