//! Seeded random input against the real binary (SPEC §8): mangled HTTP
//! requests, malformed WebSocket frames, protocol messages of every shape,
//! odd backend publications through a real `nats-server`, mangled responses
//! from an upstream, odd settings, and a stop in the middle of it all.
//! Whatever arrives, the gateway answers within the protocol or closes the
//! connection, never panics, never hands one client another's bytes, and
//! goes on serving everyone else.
//!
//! The seeds are fixed, so a failure repeats. `ROOMGATE_FUZZ_SEED` and
//! `ROOMGATE_FUZZ_CASES` run other or more cases by hand.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// Cases run at the same time: enough to interleave, few enough that no
/// bounded wait depends on the machine keeping up.
const PARALLEL: usize = 16;

/// The gateway's message size bound in these tests, small so that
/// oversize frames are cheap to make.
const MAX_MESSAGE: usize = 4096;

/// A small deterministic generator (SplitMix64): no crate, and a case is
/// reproduced from its seed alone.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }

    /// Fewer than `max` random bytes.
    fn some_bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max);
        self.bytes(n)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The seed of the run and how many cases each test makes.
fn plan(default_seed: u64) -> (u64, usize) {
    let seed = std::env::var("ROOMGATE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_seed);
    let cases = std::env::var("ROOMGATE_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    eprintln!("seed {seed}, {cases} cases");
    (seed, cases)
}

/// Runs `case(index)` for every index, `PARALLEL` at a time, and returns
/// the outcomes in index order.
async fn run_cases<T, F, Fut>(cases: usize, case: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(PARALLEL));
    let mut tasks = Vec::with_capacity(cases);
    for index in 0..cases {
        let permit = slots.clone().acquire_owned().await.expect("semaphore");
        let fut = case(index);
        tasks.push(tokio::spawn(async move {
            let outcome = fut.await;
            drop(permit);
            outcome
        }));
    }
    let mut outcomes = Vec::with_capacity(cases);
    for task in tasks {
        outcomes.push(task.await.expect("case task"));
    }
    outcomes
}

/// Counts the outcomes of a test's cases, prints the count, and checks
/// that each of `expected` occurred: that the cases reached the paths they
/// were made for, so that the test cannot pass by exercising nothing.
fn tally<T: Ord + std::fmt::Debug>(
    what: &str,
    outcomes: impl IntoIterator<Item = T>,
    expected: &[T],
) {
    let mut seen = BTreeMap::new();
    for outcome in outcomes {
        *seen.entry(outcome).or_insert(0usize) += 1;
    }
    eprintln!("{what}: {seen:?}");
    for outcome in expected {
        assert!(seen.contains_key(outcome), "no {outcome:?} in {seen:?}");
    }
}

/// The gateway under attack, with a real upstream behind it.
struct Target {
    gateway: GatewayProcess,
    upstream: Upstream,
}

impl Target {
    async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts the gateway with `env` added to the tests' settings.
    async fn start_with(env: &[(&str, &str)]) -> Self {
        let upstream = Upstream::start(|request| async move {
            // Read the whole body, as a real service would, before answering.
            let _ = request.into_body().collect().await;
            hyper::Response::new(full("from upstream"))
        })
        .await;
        let url = upstream.url();
        let max_message = MAX_MESSAGE.to_string();
        let mut all = vec![
            ("ROOMGATE_UPSTREAM_URL", url.as_str()),
            ("ROOMGATE_WEBSOCKET_MAX_MESSAGE_SIZE_BYTES", &max_message),
        ];
        all.extend_from_slice(env);
        let gateway = GatewayProcess::start(&[], &all);
        Self { gateway, upstream }
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.gateway.addr)
    }

    async fn metric(&self, sample: &str) -> f64 {
        let (status, body) = http_get(self.gateway.admin, "/metrics").await;
        assert_eq!(status, 200, "metrics: {body}");
        metric_value(&body, sample)
    }

    /// What must hold after any attack: no panic, WebSocket connections
    /// counted back down to `connections`, rooms and the proxy still
    /// working, and a clean stop on SIGTERM.
    async fn assert_unharmed(mut self, connections: f64) {
        eventually_async("the connection gauge to count the survivors", || async {
            self.metric("roomgate_connections").await == connections
        })
        .await;
        let mut a = WsClient::connect(&self.ws_url()).await;
        let mut b = WsClient::connect(&self.ws_url()).await;
        a.join("after.attack").await;
        b.join("after.attack").await;
        a.say("after.attack", json!("still here"), "m1").await;
        let got = b.recv().await;
        assert_eq!(got["content"], "still here", "{got}");
        let (status, body) = http_get(self.gateway.addr, "/after-attack").await;
        assert_eq!((status, body.as_str()), (200, "from upstream"));
        a.close_normally().await;
        b.close_normally().await;

        assert_eq!(self.gateway.panics(), Vec::<String>::new(), "no panic");
        self.gateway.signal("TERM");
        assert_eq!(self.gateway.wait_exit(), 0, "a clean stop");
        drop(self.upstream);
    }
}

// ----- HTTP -------------------------------------------------------------

/// Well-formed requests of each kind the gateway handles, to be mangled.
fn http_templates(addr: SocketAddr) -> Vec<String> {
    vec![
        format!("GET /page?x=1 HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"),
        format!("POST /form HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 5\r\n\r\nhello"),
        format!(
            "POST /up HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\n0\r\n\r\n"
        ),
        format!("GET /a HTTP/1.1\r\nHost: {addr}\r\n\r\nGET /b HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
        "GET /old HTTP/1.0\r\n\r\n".to_string(),
        raw_upgrade_request(addr, "/ws", ""),
        raw_upgrade_request(addr, "/elsewhere", ""),
    ]
}

/// Well-formed requests for the admin listener, to be mangled.
fn admin_templates(addr: SocketAddr) -> Vec<String> {
    ["/metrics", "/healthz", "/readyz", "/rooms", "/rooms/lobby"]
        .iter()
        .map(|path| format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n"))
        .chain([format!(
            "POST /rooms HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 2\r\n\r\n{{}}"
        )])
        .collect()
}

/// Bytes that mean something to an HTTP parser.
const HTTP_SPECIALS: &[u8] = b"\r\n\0 \t:;,\"\\\x7f\x80\xff/?#%";

/// Numbers a length, a chunk size or a version might be replaced with.
const NUMBERS: &[&str] = &[
    "18446744073709551616",
    "-1",
    "0x10",
    "+5",
    "00000000005",
    "",
];

fn mangle_http(rng: &mut Rng, request: &mut Vec<u8>) {
    for _ in 0..rng.below(5) {
        if request.is_empty() {
            return;
        }
        let at = rng.below(request.len());
        match rng.below(8) {
            0 => request[at] = rng.byte(),
            1 => request.insert(at, *rng.pick(HTTP_SPECIALS)),
            2 => {
                let end = (at + 1 + rng.below(8)).min(request.len());
                request.drain(at..end);
            }
            3 => {
                let line_start = request[..at]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |i| i + 1);
                let line: Vec<u8> = request[line_start..at].to_vec();
                request.splice(line_start..line_start, line);
            }
            4 => {
                let mut junk = b"\r\nX-Junk: ".to_vec();
                junk.extend(rng.some_bytes(40));
                request.splice(at..at, junk);
            }
            5 => {
                if let Some(start) = request.iter().position(u8::is_ascii_digit) {
                    let end = request[start..]
                        .iter()
                        .position(|b| !b.is_ascii_digit())
                        .map_or(request.len(), |n| start + n);
                    let number = rng.pick(NUMBERS).as_bytes().to_vec();
                    request.splice(start..end, number);
                }
            }
            6 => request.truncate(at),
            _ => {
                // Rarely, a head beyond any bound the gateway keeps.
                if rng.chance(20) {
                    let byte = *rng.pick(b"a:\t ");
                    request.splice(at..at, std::iter::repeat_n(byte, 70_000));
                }
            }
        }
    }
}

/// Sends `request` in pieces of `chunk` bytes, ends the sending side when
/// `half_close` (so the gateway cannot wait for more of a request), and
/// reads whatever comes back. A reset connection is an answer too: whatever
/// arrived before it counts. The client's end of the stream makes the
/// gateway give up a request still in progress, as nginx does; a request
/// that must be answered is sent with `Connection: close` instead.
async fn exchange_raw(
    addr: SocketAddr,
    request: Vec<u8>,
    chunk: usize,
    half_close: bool,
) -> Vec<u8> {
    let mut stream = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    for piece in request.chunks(chunk.max(1)) {
        if within("a piece to be written", stream.write_all(piece))
            .await
            .is_err()
        {
            break;
        }
    }
    if half_close {
        let _ = stream.shutdown().await;
    }
    let mut answer = Vec::new();
    within("the gateway to answer and close", async {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stream.read(&mut buf).await {
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    answer
}

/// The status of an answer: `None` for no answer (a close), and a failed
/// assertion for bytes that are not an HTTP/1 status line.
fn status_of(answer: &[u8], request: &[u8]) -> Option<u16> {
    if answer.is_empty() {
        return None;
    }
    let line = answer.split(|&b| b == b'\n').next().unwrap_or_default();
    let text = String::from_utf8_lossy(line);
    let status = ["HTTP/1.1 ", "HTTP/1.0 "]
        .iter()
        .find_map(|version| text.strip_prefix(version))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok());
    match status {
        Some(code @ 100..=599) => Some(code),
        _ => panic!(
            "not a status line: {text:?}\nfor request {:?}",
            String::from_utf8_lossy(request)
        ),
    }
}

#[tokio::test]
async fn mangled_http_requests_get_a_status_or_a_close() {
    let (seed, cases) = plan(0x5eed_0001);
    let target = Target::start().await;
    let (public, admin) = (target.gateway.addr, target.gateway.admin);
    let outcomes = run_cases(cases, |index| {
        let mut rng = Rng(seed ^ (index as u64).wrapping_mul(0x100_0000_01b3));
        // One case in five goes to the admin listener, which a scraper or
        // a probe on the same network can reach.
        let (addr, templates) = if rng.chance(20) {
            (admin, admin_templates(admin))
        } else {
            (public, http_templates(public))
        };
        let mut request = rng.pick(&templates).clone().into_bytes();
        mangle_http(&mut rng, &mut request);
        let chunk = if rng.chance(70) {
            request.len()
        } else {
            1 + rng.below(64)
        };
        async move {
            let answer = exchange_raw(addr, request.clone(), chunk, true).await;
            let status = status_of(&answer, &request);
            assert_ne!(
                status,
                Some(500),
                "an internal error for {:?}",
                String::from_utf8_lossy(&request)
            );
            status
        }
    })
    .await;

    // Unmangled and harmlessly mangled requests went through, and refused
    // ones were refused.
    tally(
        "answers",
        outcomes,
        &[Some(101), Some(200), Some(400), Some(405)],
    );
    target.assert_unharmed(0.0).await;
}

// ----- WebSocket frames -------------------------------------------------

/// Close codes the gateway may send a client that broke the protocol, or
/// that closed itself.
const CLOSE_CODES: [u16; 4] = [1000, 1002, 1007, 1009];

/// Codes a client may close with for its own reasons (RFC 6455 §7.4.2),
/// which the gateway echoes.
const APPLICATION_CODES: std::ops::RangeInclusive<u16> = 3000..=4999;

/// One frame a client might send, well-formed or not.
fn hostile_frame(rng: &mut Rng) -> Vec<u8> {
    let masked = rng.chance(90);
    match rng.below(13) {
        0 => client_frame(0x81, protocol_message(rng).as_bytes(), masked),
        1 => {
            let first = rng.byte();
            client_frame(first, &rng.some_bytes(200), masked)
        }
        2 => client_frame(0x81, b"{\"type\":\"join\",\"room\":\"\xc3\x28\"}", masked),
        3 => {
            let len = 126 + rng.below(100);
            client_frame(0x89, &rng.bytes(len), masked)
        }
        4 => client_frame(0x09, b"unfinished ping", masked),
        5 => client_frame(0x80, b"a continuation of nothing", masked),
        6 => {
            let mut frames = client_frame(0x01, b"{\"type\":", masked);
            if rng.chance(50) {
                frames.extend(client_frame(0x89, b"between fragments", masked));
            }
            let next = if rng.chance(50) { 0x80 } else { 0x81 };
            frames.extend(client_frame(next, b"\"join\",\"room\":\"r\"}", masked));
            frames
        }
        7 => {
            let mut frame = vec![0x81, 0xff];
            frame.extend_from_slice(&(u64::MAX >> rng.below(40)).to_be_bytes());
            frame.extend_from_slice(&rng.some_bytes(24));
            frame
        }
        8 => {
            let len = MAX_MESSAGE + 1 + rng.below(MAX_MESSAGE);
            client_frame(0x81, &vec![b'a'; len], masked)
        }
        9 => {
            let code: u16 = *rng.pick(&[1000, 999, 1005, 1006, 1015, 3000, 4999, 5000, 65535]);
            let mut payload = code.to_be_bytes().to_vec();
            if rng.chance(30) {
                payload.extend_from_slice(b"\xff\xfe reason");
            }
            if rng.chance(10) {
                payload.truncate(1);
            }
            client_frame(0x88, &payload, masked)
        }
        10 => client_frame(0x8a, &rng.some_bytes(126), masked),
        11 => client_frame(0x82, &rng.some_bytes(300), masked),
        _ => client_frame(0x81 | (0x10 << rng.below(3)), b"{}", masked),
    }
}

/// How a connection sent hostile frames ended: the close code the gateway
/// sent, if any.
async fn frames_case(addr: SocketAddr, mut rng: Rng) -> Option<u16> {
    let mut stream = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    upgrade_raw(&mut stream, addr).await;
    let welcome = within("the welcome", read_raw_frame(&mut stream))
        .await
        .expect("the welcome frame");
    assert_eq!(welcome.opcode, 1);
    let mut bytes = Vec::new();
    for _ in 0..1 + rng.below(6) {
        bytes.extend(hostile_frame(&mut rng));
    }
    let chunk = if rng.chance(70) {
        bytes.len()
    } else {
        1 + rng.below(64)
    };
    for piece in bytes.chunks(chunk) {
        if within("a piece to be written", stream.write_all(piece))
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = stream.shutdown().await;
    let mut close = None;
    within("the gateway to end the connection", async {
        while let Some(frame) = read_raw_frame(&mut stream).await {
            match frame.opcode {
                1 => {
                    assert_protocol_frame(&frame.payload);
                }
                8 => close = close.or(Some(frame.close_code())),
                9 | 10 => {}
                other => panic!("unexpected opcode {other}"),
            }
        }
    })
    .await;
    close.map(|code| {
        let code = code.expect("a close frame with a code");
        assert!(
            CLOSE_CODES.contains(&code) || APPLICATION_CODES.contains(&code),
            "close code {code}"
        );
        code
    })
}

#[tokio::test]
async fn malformed_websocket_frames_get_errors_or_a_protocol_close() {
    let (seed, cases) = plan(0x5eed_0002);
    let target = Target::start().await;
    let addr = target.gateway.addr;
    let outcomes = run_cases(cases, |index| {
        let rng = Rng(seed ^ (index as u64).wrapping_mul(0x100_0000_01b3));
        frames_case(addr, rng)
    })
    .await;

    tally("endings", outcomes, &[Some(1002), Some(1007), Some(1009)]);
    target.assert_unharmed(0.0).await;
}

// ----- protocol messages ------------------------------------------------

/// Frame types the gateway sends (SPEC §1).
const OUTGOING: [&str; 7] = [
    "system", "joined", "left", "message", "presence", "error", "ack",
];

/// Error codes of SPEC §1.
const ERROR_CODES: [&str; 10] = [
    "invalid_json",
    "unknown_type",
    "invalid_room",
    "not_member",
    "room_full",
    "too_many_rooms",
    "rate_limited",
    "forbidden",
    "binary_not_supported",
    "rooms_disabled",
];

/// Checks that a text frame from the gateway is one SPEC §1 describes;
/// returns it.
fn assert_protocol_frame(payload: &[u8]) -> Value {
    let frame: Value = serde_json::from_slice(payload)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(payload)));
    let kind = frame["type"].as_str().unwrap_or_default();
    assert!(OUTGOING.contains(&kind), "unknown frame type: {frame}");
    if kind == "error" {
        let code = frame["code"].as_str().unwrap_or_default();
        assert!(ERROR_CODES.contains(&code), "unknown error code: {frame}");
    }
    frame
}

const GOOD_ROOMS: [&str; 4] = ["lobby", "game.42.lobby", "a:b@c=d", "Z_9-"];

fn text(rng: &mut Rng) -> String {
    const PIECES: [&str; 12] = [
        "a", "Z", "0", ".", " ", "\"", "\\", "é", "😀", "\u{0}", "\u{202e}", "\n",
    ];
    let len = match rng.below(10) {
        0 => 65,
        1 => 129,
        _ => rng.below(12),
    };
    (0..len).map(|_| *rng.pick(&PIECES)).collect()
}

fn room(rng: &mut Rng) -> Value {
    match rng.below(10) {
        0..=6 => json!(rng.pick(&GOOD_ROOMS)),
        7 => json!(rng.pick(&["", ".", "a..b", "a.", ".a", "a b", "*", ">", "a.*", "é"])),
        8 => json!(text(rng)),
        _ => any_value(rng, 2),
    }
}

fn any_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth >= 3 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(rng.chance(50)),
        2 => match rng.below(3) {
            0 => json!(rng.next() as i64),
            1 => json!(1e308 * if rng.chance(50) { 1.0 } else { -1.0 }),
            _ => json!(rng.below(1000)),
        },
        3 | 4 => json!(text(rng)),
        5 => Value::Array(
            (0..rng.below(4))
                .map(|_| any_value(rng, depth + 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.below(4))
                .map(|_| (text(rng), any_value(rng, depth + 1)))
                .collect(),
        ),
    }
}

/// A frame as a confused or hostile client might write it: mostly
/// protocol-shaped objects with wrong parts, sometimes anything at all.
/// Always valid UTF-8 and within the size bound, so none of it is a reason
/// to close the connection.
fn protocol_message(rng: &mut Rng) -> String {
    let message = match rng.below(10) {
        0..=5 => {
            let mut fields = serde_json::Map::new();
            if rng.chance(90) {
                let kind = match rng.below(10) {
                    0..=7 => json!(rng.pick(&["join", "leave", "message"])),
                    8 => json!(rng.pick(&["JOIN", "", "joined", "ack", "error"])),
                    _ => any_value(rng, 2),
                };
                fields.insert("type".into(), kind);
            }
            if rng.chance(85) {
                fields.insert("room".into(), room(rng));
            }
            if rng.chance(50) {
                let id = match rng.below(10) {
                    0..=7 => json!(format!("i{}", rng.below(1000))),
                    8 => json!(text(rng)),
                    _ => any_value(rng, 2),
                };
                fields.insert("id".into(), id);
            }
            if rng.chance(80) {
                fields.insert("content".into(), any_value(rng, 0));
            }
            if rng.chance(20) {
                fields.insert(text(rng), any_value(rng, 1));
            }
            Value::Object(fields).to_string()
        }
        6 => any_value(rng, 0).to_string(),
        7 => {
            let whole = json!({"type": "join", "room": rng.pick(&GOOD_ROOMS)}).to_string();
            whole[..rng.below(whole.len())].to_string()
        }
        8 => {
            // Around the gateway's bound on nesting, and far past any
            // recursive parser's.
            let depth = if rng.chance(70) {
                1 + rng.below(64)
            } else {
                100 + rng.below(1500)
            };
            let (open, close) = if rng.chance(50) {
                ("[", "]")
            } else {
                ("{\"a\":", "}")
            };
            format!(
                "{{\"type\":\"message\",\"room\":\"lobby\",\"content\":{}1{}}}",
                open.repeat(depth),
                close.repeat(depth)
            )
        }
        _ => String::from_utf8_lossy(&rng.some_bytes(100)).into_owned(),
    };
    if message.len() < MAX_MESSAGE {
        message
    } else {
        r#"{"type":"too long, replaced"}"#.to_string()
    }
}

/// Sends a run of odd messages on one connection, then one it must answer,
/// and returns every frame the gateway sent back. The connection must stay
/// open throughout: none of these is a reason to close it.
async fn messages_case(url: String, mut rng: Rng) -> Vec<Value> {
    let mut client = WsClient::connect(&url).await;
    for _ in 0..1 + rng.below(30) {
        client.send_text(&protocol_message(&mut rng)).await;
    }
    client
        .send(json!({"type": "leave", "room": "probe.never-joined", "id": "final"}))
        .await;
    let mut frames = Vec::new();
    loop {
        let frame = client.recv().await;
        assert_protocol_frame(frame.to_string().as_bytes());
        if frame["id"] == "final" {
            assert_eq!(frame["code"], "not_member", "{frame}");
            break;
        }
        frames.push(frame);
    }
    client.close_normally().await;
    frames
}

#[tokio::test]
async fn protocol_messages_of_every_shape_are_answered_without_closing() {
    let (seed, cases) = plan(0x5eed_0003);
    let target = Target::start().await;
    let url = target.ws_url();

    // A bystander in the busiest room reads along the whole time, so the
    // messages that get through are checked on the receiving side too.
    let mut bystander = WsClient::connect(&url).await;
    bystander.join("lobby").await;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        let mut received = 0usize;
        loop {
            tokio::select! {
                frame = bystander.next_json() => {
                    let frame = frame.expect("the bystander stays connected");
                    assert_eq!(frame["type"], "message", "{frame}");
                    assert_eq!(frame["room"], "lobby", "{frame}");
                    received += 1;
                }
                _ = &mut stopped => return (bystander, received),
            }
        }
    });

    let outcomes = run_cases(cases, |index| {
        let rng = Rng(seed ^ (index as u64).wrapping_mul(0x100_0000_01b3));
        messages_case(url.clone(), rng)
    })
    .await;
    let _ = stop.send(());
    let (mut bystander, received) = reader.await.expect("bystander task");
    let received = received + bystander.barrier().await.len();

    let replies = outcomes.iter().flatten().map(|frame| {
        frame["code"]
            .as_str()
            .or(frame["type"].as_str())
            .unwrap_or_default()
            .to_string()
    });
    let expected = [
        "joined",
        "left",
        "ack",
        "invalid_json",
        "unknown_type",
        "invalid_room",
        "not_member",
    ];
    tally("replies", replies, &expected.map(String::from));
    eprintln!("the bystander received {received}");
    assert!(received > 0, "some messages reached the bystander");
    bystander.close_normally().await;
    target.assert_unharmed(0.0).await;
}

// ----- backend publications ---------------------------------------------

/// Header values as a careless backend might set them. NATS headers cannot
/// carry line breaks, so none of these do.
fn header_text(rng: &mut Rng) -> String {
    const PIECES: [&str; 9] = ["a", "Z", "\"", "\\", "é", "😀", "{", " ", "<"];
    (0..rng.below(20)).map(|_| *rng.pick(&PIECES)).collect()
}

/// A room as a subject token list: mostly the members' rooms.
fn subject_room(rng: &mut Rng) -> String {
    if rng.chance(80) {
        return rng.pick(&GOOD_ROOMS).to_string();
    }
    const CHARS: &[u8] = b"abcXYZ019_-:@=";
    let tokens: Vec<String> = (0..1 + rng.below(3))
        .map(|_| {
            (0..1 + rng.below(8))
                .map(|_| char::from(*rng.pick(CHARS)))
                .collect()
        })
        .collect();
    tokens.join(".")
}

/// What a backend might publish for clients: JSON, text, bytes that are
/// not UTF-8, nothing, a lot.
fn backend_payload(rng: &mut Rng) -> Vec<u8> {
    match rng.below(5) {
        0 => rng.some_bytes(100),
        1 => any_value(rng, 0).to_string().into_bytes(),
        2 => text(rng).into_bytes(),
        3 => Vec::new(),
        _ => vec![b'x'; 10_000 + rng.below(50_000)],
    }
}

/// A connection id a backend might name: a member, a stranger, nonsense.
fn connection_id(rng: &mut Rng, members: &[String]) -> Value {
    match rng.below(4) {
        0 | 1 => json!(rng.pick(members)),
        2 => json!(uuid::Uuid::new_v4().to_string()),
        _ => any_value(rng, 2),
    }
}

/// A `control.join` or `control.leave` payload, mostly well-formed.
fn membership_change(rng: &mut Rng, members: &[String]) -> Vec<u8> {
    if rng.chance(20) {
        return backend_payload(rng);
    }
    let mut fields = serde_json::Map::new();
    if rng.chance(90) {
        fields.insert("connection_id".into(), connection_id(rng, members));
    }
    if rng.chance(90) {
        fields.insert("room".into(), room(rng));
    }
    Value::Object(fields).to_string().into_bytes()
}

/// A `control.disconnect` payload that names the victim, a stranger or
/// nonsense, never another member, with any code and reason.
fn disconnect(rng: &mut Rng, victim: &str) -> Vec<u8> {
    let id = if rng.chance(50) {
        json!(victim)
    } else {
        connection_id(rng, &[uuid::Uuid::new_v4().to_string()])
    };
    let code = match rng.below(3) {
        0 => json!(rng.pick(&[1000, 1008, 4000, 999, 70_000, -1])),
        1 => any_value(rng, 2),
        _ => Value::Null,
    };
    json!({"connection_id": id, "code": code, "reason": text(rng)})
        .to_string()
        .into_bytes()
}

/// One publication: subject, headers and payload. A payload sent with a
/// `Roomgate-Raw` header (whatever its value) starts with `raw:`, so a
/// member can tell the unwrapped frames, which are the backend's own text,
/// from those the gateway builds.
fn publication(rng: &mut Rng, members: &[String]) -> (String, async_nats::HeaderMap, Vec<u8>) {
    let (subject, mut payload) = match rng.below(9) {
        0..=2 => (
            format!("roomgate.broadcast.{}", subject_room(rng)),
            backend_payload(rng),
        ),
        3 => {
            let id = match connection_id(rng, members) {
                Value::String(id)
                    if !id.is_empty()
                        && id
                            .bytes()
                            .all(|b| b.is_ascii_graphic() && !b".*>".contains(&b)) =>
                {
                    id
                }
                _ => "nobody".to_string(),
            };
            (format!("roomgate.send.{id}"), backend_payload(rng))
        }
        4 => ("roomgate.all".to_string(), backend_payload(rng)),
        5 => (
            "roomgate.control.join".to_string(),
            membership_change(rng, members),
        ),
        6 => (
            "roomgate.control.leave".to_string(),
            membership_change(rng, members),
        ),
        7 => (
            "roomgate.control.disconnect".to_string(),
            disconnect(rng, &members[0]),
        ),
        _ => (
            format!("roomgate.{}", subject_room(rng)),
            backend_payload(rng),
        ),
    };
    let mut headers = async_nats::HeaderMap::new();
    if rng.chance(30) {
        headers.insert("Roomgate-From", header_text(rng).as_str());
    }
    if rng.chance(20) {
        headers.insert("Roomgate-Exclude", rng.pick(members).as_str());
    }
    if rng.chance(30) {
        let raw = *rng.pick(&["true", "false", "TRUE", "", "yes"]);
        headers.insert("Roomgate-Raw", raw);
        payload.splice(0..0, *b"raw:");
    }
    (subject, headers, payload)
}

/// The last publication: members read until they see it.
const SENTINEL: &str = "the end of the publications";

/// Reads a member's frames up to the sentinel, checking each one the
/// gateway built. Returns the frames read, and the client unless the
/// gateway disconnected it, which only the victim may be.
async fn read_member(mut client: WsClient, victim: bool) -> (Option<WsClient>, Vec<Value>) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut frames = Vec::new();
    loop {
        let next = within("a frame or the sentinel", client.ws.next()).await;
        let text = match next {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                assert!(victim, "only the victim is disconnected");
                return (None, frames);
            }
            Some(Ok(_)) => continue,
        };
        if text.as_str().starts_with("raw:") {
            continue;
        }
        let frame = assert_protocol_frame(text.as_bytes());
        if frame["type"] == "left" {
            assert_eq!(frame["reason"], "kicked", "members leave only when kicked");
        }
        if frame["type"] == "message" {
            assert!(frame["from"].is_string(), "{frame}");
            assert!(frame["content"].is_string(), "{frame}");
            if frame["content"] == SENTINEL {
                return (Some(client), frames);
            }
        }
        frames.push(frame);
    }
}

#[tokio::test]
async fn backend_publications_of_every_shape_reach_clients_as_valid_frames() {
    let (seed, cases) = plan(0x5eed_0004);
    let server = NatsServer::start();
    let nats_url = server.url();
    let target = Target::start_with(&[
        ("ROOMGATE_NATS_ENABLED", "true"),
        ("ROOMGATE_NATS_URL", &nats_url),
        // Room for every publication, so that no member is closed as a
        // slow consumer while the backend publishes as fast as it can.
        ("ROOMGATE_WEBSOCKET_SEND_QUEUE_CAPACITY", "4096"),
    ])
    .await;
    eventually_async("the bridge to connect", || async {
        target.metric("roomgate_nats_connected").await == 1.0
    })
    .await;

    // Four members of every room; the first is the one a backend may
    // disconnect.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut client = WsClient::connect(&target.ws_url()).await;
        for room in GOOD_ROOMS {
            client.join(room).await;
        }
        clients.push(client);
    }
    let members: Vec<String> = clients.iter().map(|c| c.id.clone()).collect();
    let readers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| tokio::spawn(read_member(client, i == 0)))
        .collect();

    let backend = server.client().await;
    let mut rng = Rng(seed);
    for _ in 0..cases {
        let (subject, headers, payload) = publication(&mut rng, &members);
        within(
            "publish",
            backend.publish_with_headers(subject, headers, payload.into()),
        )
        .await
        .expect("publish");
    }
    within("publish", backend.publish("roomgate.all", SENTINEL.into()))
        .await
        .expect("publish");
    within("flush", backend.flush()).await.expect("flush");

    let mut kinds = Vec::new();
    let mut survivors = Vec::new();
    for reader in readers {
        let (client, frames) = reader.await.expect("member task");
        kinds.extend(
            frames
                .iter()
                .map(|frame| frame["type"].as_str().unwrap_or_default().to_string()),
        );
        survivors.extend(client);
    }
    tally(
        "members received",
        kinds,
        &["message", "joined", "left"].map(String::from),
    );
    assert_eq!(survivors.len(), 3, "the backend disconnected the victim");
    for client in survivors {
        client.close_normally().await;
    }
    target.assert_unharmed(0.0).await;
}

// ----- upstream responses -----------------------------------------------

/// Responses of each framing an upstream might use, for the request named
/// `case`, to be mangled. Each body carries the case's name, so a client
/// that gets another request's bytes (a proxy that lost track of where a
/// response ends) is caught. The last one smuggles a second response, also
/// named, after the first.
fn response_templates(case: &str) -> Vec<String> {
    let body = format!("[{case}]");
    let len = body.len();
    let smuggled = format!("[smuggled {case}]");
    vec![
        format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n{body}"),
        format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{len:x}\r\n{body}\r\n0\r\n\r\n"
        ),
        format!("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{body}"),
        "HTTP/1.1 204 No Content\r\n\r\n".to_string(),
        "HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n".to_string(),
        format!(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n{body}"
        ),
        format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Length: {len}\r\n\r\n{body}"),
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n{body}\
             HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        ),
    ]
}

/// The name of case `index`: 16 hex digits, so that no mangling of one
/// name makes another.
fn case_name(seed: u64, index: usize) -> String {
    format!("{:016x}", Rng(seed ^ index as u64).next())
}

/// Every run of exactly 16 hex digits in `bytes`.
fn case_names_in(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|b| !b.is_ascii_hexdigit())
        .filter(|run| run.len() == 16)
        .map(|run| String::from_utf8_lossy(run).into_owned())
        .collect()
}

/// Serves one upstream connection: reads request heads and answers each
/// with a mangled response, keeping the connection open for the next one
/// unless the dice or the framing say to close.
async fn serve_mangled(mut stream: TcpStream, mut rng: Rng) {
    let mut buf = Vec::new();
    loop {
        let head = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break buf.drain(..end + 4).collect::<Vec<u8>>();
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        // The case is the request's path: `GET /<case> HTTP/1.1`.
        let case = case_names_in(&head).pop().unwrap_or_default();
        let templates = response_templates(&case);
        let pick = rng.below(templates.len());
        let mut response = templates[pick].clone().into_bytes();
        mangle_http(&mut rng, &mut response);
        if stream.write_all(&response).await.is_err() {
            return;
        }
        // A close-delimited body ends only when the connection does.
        if pick == 2 || rng.chance(30) {
            return;
        }
    }
}

/// An upstream on a raw socket whose every answer is mangled.
async fn mangling_upstream(seed: u64) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        for index in 0u64.. {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let rng = Rng(seed ^ index.wrapping_mul(0x100_0000_01b3));
            connections.spawn(serve_mangled(stream, rng));
        }
    });
    (addr, task)
}

/// The binary in front of a mangling upstream seeded with `seed`, with
/// `env` added to its settings; the upstream runs until the returned task
/// is aborted.
async fn gateway_before_mangler(
    seed: u64,
    env: &[(&str, &str)],
) -> (GatewayProcess, tokio::task::JoinHandle<()>) {
    let (upstream, task) = mangling_upstream(seed).await;
    let url = format!("http://{upstream}");
    let mut all = vec![("ROOMGATE_UPSTREAM_URL", url.as_str())];
    all.extend_from_slice(env);
    (GatewayProcess::start(&[], &all), task)
}

#[tokio::test]
async fn mangled_upstream_responses_reach_only_their_own_client() {
    let (seed, cases) = plan(0x5eed_0005);
    // Responses that never end hold a request until the upstream timeout.
    let (gateway, upstream_task) =
        gateway_before_mangler(seed, &[("ROOMGATE_UPSTREAM_TIMEOUT_SECS", "2")]).await;
    let addr = gateway.addr;
    let names: Arc<std::collections::HashSet<String>> =
        Arc::new((0..cases).map(|index| case_name(seed, index)).collect());
    let outcomes = run_cases(cases, |index| {
        let names = names.clone();
        async move {
            let case = case_name(seed, index);
            let request =
                format!("GET /{case} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            let answer =
                exchange_raw(addr, request.clone().into_bytes(), request.len(), false).await;
            let status = status_of(&answer, request.as_bytes());
            for name in case_names_in(&answer) {
                assert!(
                    name == case || !names.contains(&name),
                    "request {case} got the bytes of request {name}:\n{}",
                    String::from_utf8_lossy(&answer)
                );
            }
            assert_ne!(
                status,
                Some(500),
                "an internal error:\n{}",
                String::from_utf8_lossy(&answer)
            );
            status
        }
    })
    .await;

    tally("answers", outcomes, &[Some(200), Some(502)]);
    assert_eq!(gateway.panics(), Vec::<String>::new(), "no panic");
    upstream_task.abort();
}

#[tokio::test]
async fn forward_auth_against_mangled_answers_admits_or_refuses_never_worse() {
    let (seed, cases) = plan(0x5eed_0007);
    let (gateway, upstream_task) = gateway_before_mangler(
        seed,
        &[
            ("ROOMGATE_AUTH_MODE", "upstream"),
            ("ROOMGATE_AUTH_UPSTREAM_TIMEOUT_SECS", "1"),
        ],
    )
    .await;
    let addr = gateway.addr;
    let outcomes = run_cases(cases.min(300), |_| async move {
        let mut stream = within("connect", TcpStream::connect(addr))
            .await
            .expect("connect");
        let status = upgrade(&mut stream, addr).await;
        if status == Some(101) {
            let welcome = within("the welcome", read_raw_frame(&mut stream))
                .await
                .expect("an admitted client gets its welcome");
            assert_protocol_frame(&welcome.payload);
        }
        status
    })
    .await;
    // Admitted (a 2xx, however mangled the rest), or refused with 503 as
    // an auth endpoint that does not answer properly must be: never an
    // error of the gateway's own, never silence.
    for status in &outcomes {
        assert!(
            matches!(status, Some(101 | 401 | 403 | 503)),
            "upgrade answered {status:?}"
        );
    }
    tally("answers", outcomes, &[Some(101), Some(503)]);
    assert_eq!(gateway.panics(), Vec::<String>::new(), "no panic");
    upstream_task.abort();
}

// ----- a stop in the middle of it all -----------------------------------

/// How one connection of the stop test ended.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ending {
    /// Refused at connect: the listener had closed.
    Refused,
    /// An HTTP answer (its status), or none before the close.
    Http(Option<u16>),
    /// A WebSocket closed with this code, or without a close frame.
    WebSocket(Option<u16>),
}

/// Asks for a WebSocket on `/ws` and reads the response head, and nothing
/// after it: its status, or `None` when the connection ended first.
async fn upgrade(stream: &mut TcpStream, addr: SocketAddr) -> Option<u16> {
    let request = raw_upgrade_request(addr, "/ws", "");
    within(
        "the handshake to be written",
        stream.write_all(request.as_bytes()),
    )
    .await
    .ok()?;
    let mut head = Vec::new();
    within("a response head", async {
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && matches!(stream.read(&mut byte).await, Ok(1)) {
            head.push(byte[0]);
        }
    })
    .await;
    status_of(&head, request.as_bytes())
}

/// A WebSocket client that joins the busiest room, sends a run of odd
/// messages and then stays, reading, until the gateway closes it.
async fn staying_member(addr: SocketAddr, mut rng: Rng) -> Ending {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return Ending::Refused;
    };
    match upgrade(&mut stream, addr).await {
        Some(101) => {}
        status => return Ending::Http(status),
    }
    let mut bytes = client_frame(0x81, br#"{"type":"join","room":"lobby"}"#, true);
    for _ in 0..rng.below(20) {
        bytes.extend(client_frame(
            0x81,
            protocol_message(&mut rng).as_bytes(),
            true,
        ));
    }
    let _ = within("the frames to be written", stream.write_all(&bytes)).await;
    let mut close = None;
    within("the gateway to close a member", async {
        while let Some(frame) = read_raw_frame(&mut stream).await {
            if frame.opcode == 8 {
                close = close.or(frame.close_code());
            }
        }
    })
    .await;
    Ending::WebSocket(close)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_in_the_middle_of_hostile_traffic_is_clean() {
    let (seed, cases) = plan(0x5eed_0006);
    let cases = cases.min(600);
    let mut target = Target::start_with(&[("ROOMGATE_SERVER_SHUTDOWN_GRACE_SECS", "5")]).await;
    let addr = target.gateway.addr;

    // A third of the connections are members that stay; the others are
    // mangled requests and malformed frames, all going at once.
    let traffic: Vec<_> = (0..cases)
        .map(|index| {
            let mut rng = Rng(seed ^ (index as u64).wrapping_mul(0x100_0000_01b3));
            tokio::spawn(async move {
                match index % 3 {
                    0 => staying_member(addr, rng).await,
                    1 => {
                        let mut request = rng.pick(&http_templates(addr)).clone().into_bytes();
                        mangle_http(&mut rng, &mut request);
                        let answer = exchange_raw(addr, request.clone(), request.len(), true).await;
                        Ending::Http(status_of(&answer, &request))
                    }
                    _ => {
                        let mut bytes = raw_upgrade_request(addr, "/ws", "").into_bytes();
                        for _ in 0..1 + rng.below(4) {
                            bytes.extend(hostile_frame(&mut rng));
                        }
                        let answer = exchange_raw(addr, bytes, usize::MAX, true).await;
                        Ending::Http(status_of(&answer, b"an upgrade and frames"))
                    }
                }
            })
        })
        .collect();
    eventually_async("members to be connected", || async {
        target.metric("roomgate_connections").await >= (cases / 6) as f64
    })
    .await;

    target.gateway.signal("TERM");
    let mut endings = Vec::new();
    for case in traffic {
        endings.push(case.await.expect("case task"));
    }
    // The members were closed for the shutdown.
    tally("endings", endings, &[Ending::WebSocket(Some(1001))]);
    let code = tokio::task::spawn_blocking(move || {
        let code = target.gateway.wait_exit();
        (code, target.gateway.panics())
    })
    .await
    .expect("waiting task");
    assert_eq!(code, (0, Vec::new()), "a clean exit and no panic");
}

// ----- configuration ----------------------------------------------------

/// Every setting's environment variable (SPEC §5).
const VARIABLES: [&str; 37] = [
    "ROOMGATE_SERVER_LISTEN",
    "ROOMGATE_SERVER_WS_PATHS",
    "ROOMGATE_SERVER_MAX_CONNECTIONS",
    "ROOMGATE_SERVER_SHUTDOWN_GRACE_SECS",
    "ROOMGATE_ADMIN_LISTEN",
    "ROOMGATE_UPSTREAM_URL",
    "ROOMGATE_UPSTREAM_CONNECT_TIMEOUT_SECS",
    "ROOMGATE_UPSTREAM_TIMEOUT_SECS",
    "ROOMGATE_WEBSOCKET_MAX_MESSAGE_SIZE_BYTES",
    "ROOMGATE_WEBSOCKET_PING_INTERVAL_SECS",
    "ROOMGATE_WEBSOCKET_PONG_TIMEOUT_SECS",
    "ROOMGATE_WEBSOCKET_SEND_QUEUE_CAPACITY",
    "ROOMGATE_WEBSOCKET_SLOW_CONSUMER",
    "ROOMGATE_WEBSOCKET_MAX_MESSAGES_PER_SEC",
    "ROOMGATE_WEBSOCKET_ROOMS_ENABLED",
    "ROOMGATE_WEBSOCKET_ROOMS_MAX_MEMBERS",
    "ROOMGATE_WEBSOCKET_ROOMS_MAX_ROOMS_PER_CONNECTION",
    "ROOMGATE_WEBSOCKET_ROOMS_IDLE_TIMEOUT_SECS",
    "ROOMGATE_WEBSOCKET_ROOMS_CLIENT_BROADCAST",
    "ROOMGATE_WEBSOCKET_ROOMS_PRESENCE",
    "ROOMGATE_NATS_ENABLED",
    "ROOMGATE_NATS_URL",
    "ROOMGATE_NATS_CREDS_FILE",
    "ROOMGATE_NATS_SUBJECT_PREFIX",
    "ROOMGATE_NATS_REQUIRED",
    "ROOMGATE_AUTH_MODE",
    "ROOMGATE_AUTH_ALLOWED_ORIGINS",
    "ROOMGATE_AUTH_JWT_ALGORITHM",
    "ROOMGATE_AUTH_JWT_SECRET_ENV",
    "ROOMGATE_AUTH_JWT_PUBLIC_KEY_FILE",
    "ROOMGATE_AUTH_JWT_COOKIE",
    "ROOMGATE_AUTH_JWT_ISSUER",
    "ROOMGATE_AUTH_JWT_AUDIENCE",
    "ROOMGATE_AUTH_UPSTREAM_PATH",
    "ROOMGATE_AUTH_UPSTREAM_TIMEOUT_SECS",
    "ROOMGATE_LOG_LEVEL",
    "ROOMGATE_LOG_FORMAT",
];

/// Values an operator might put in any of them, fitting or not.
const ODD_VALUES: [&str; 40] = [
    "",
    " ",
    "0",
    "-1",
    "1",
    "18446744073709551616",
    "4294967296",
    "1e9",
    "true",
    "TRUE",
    "yes",
    "🦀",
    "a,b,,c",
    "/ws,/x",
    "[\"/ws\"]",
    "ws",
    "127.0.0.1:0",
    "0.0.0.0:99999",
    "[::1]:0",
    "localhost",
    "nats://u:p@127.0.0.1:1",
    "nats://:@",
    "nats://a:1,nats://b:2",
    "http://x",
    "http://user@x:1",
    "http://[::1",
    "none",
    "jwt",
    "upstream",
    "HS256",
    "RS512",
    "close",
    "drop",
    "json",
    "debug",
    "warning",
    "info,hyper=trace",
    "roomgate.>",
    "/nonexistent/file",
    "RG_NO_SUCH_VARIABLE",
];

#[test]
fn random_settings_are_accepted_or_refused_never_a_panic() {
    let (seed, cases) = plan(0x5eed_0008);
    let mut rng = Rng(seed);
    let mut codes = Vec::new();
    // A process per case: a fifth of the other tests' count.
    for _ in 0..(cases / 5).max(1) {
        let env: Vec<(&str, String)> = (0..1 + rng.below(5))
            .map(|_| {
                let value = match rng.below(10) {
                    // An environment value cannot hold a NUL.
                    0 => text(&mut rng).replace('\0', ""),
                    1 => "9".repeat(1 + rng.below(40)),
                    _ => rng.pick(&ODD_VALUES).to_string(),
                };
                (*rng.pick(&VARIABLES), value)
            })
            .collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (code, stdout, stderr) = run_binary(&["check-config"], &env);
        assert!(!stderr.contains("panicked"), "{env:?}:\n{stderr}");
        match code {
            0 => {
                // What it accepted, it prints as a configuration that loads.
                let dir = TempDir::new();
                let printed = dir.write("printed.toml", &stdout);
                if let Err(e) = roomgate::Config::load(Some(&printed), Vec::new()) {
                    panic!("{env:?}: the printed configuration does not load: {e}\n{stdout}");
                }
            }
            2 => assert!(
                stderr.starts_with("roomgate: ") && stdout.is_empty(),
                "{env:?}: a refusal says why and prints nothing\n{stdout}{stderr}"
            ),
            other => panic!("{env:?}: exit code {other}\n{stderr}"),
        }
        codes.push(code);
    }
    tally("exit codes", codes, &[0, 2]);
}
