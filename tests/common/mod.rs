//! Shared test harness: real gateways on port 0, real WebSocket clients, a
//! real upstream HTTP server, real `nats-server` processes and the real
//! binary. Every wait is bounded by [`WAIT`] (or an explicit timeout) and
//! fails with a message saying what did not happen.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::ffi::OsStr;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use roomgate::Config;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The longest any single expected event may take. Generous, because the
/// machine running the tests may be busy; tests never rely on speed.
pub const WAIT: Duration = Duration::from_secs(20);

/// How long to wait when asserting that something does *not* happen.
pub const QUIET: Duration = Duration::from_millis(300);

/// Awaits `fut` for at most `WAIT`, panicking with `what` if it does not finish.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// Like [`within`] with an explicit bound, for waits known to cover a lot of
/// work (thousands of frames); still fails with `what` when exceeded.
pub async fn within_for<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Polls `check` every 20 ms until it returns true, for at most `WAIT`.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    within(what, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// Like [`eventually`] with an async check.
pub async fn eventually_async<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    within(what, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

// ----- gateway in-process ----------------------------------------------

/// Whether this machine has an IPv4 TCP socket from local port `local` to
/// remote port `remote` that is not closed (a reset one leaves the table
/// at once). Both ports: the kernel gives a local port to connections to
/// other peers too, and those of other tests may outlive this one's.
pub fn tcp_socket_open(local: u16, remote: u16) -> bool {
    tcp_socket_fields(local, remote).is_some()
}

/// The kernel's `TCP_INFO` for `stream` (Linux): its state, its segment
/// counts.
pub fn tcp_info(stream: &TcpStream) -> libc::tcp_info {
    use std::os::fd::AsRawFd;
    // SAFETY: `info` is plain data of the size `len` tells the kernel, and
    // the descriptor stays open for the call.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        );
        assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
        info
    }
}

/// The bytes queued to send on the IPv4 TCP socket from local port `local`
/// to remote port `remote` (written by its owner, not yet acknowledged by
/// the peer), if there is such a socket.
pub fn tcp_send_queue(local: u16, remote: u16) -> Option<u64> {
    let fields = tcp_socket_fields(local, remote)?;
    let (sending, _) = fields.get(4)?.split_once(':')?;
    u64::from_str_radix(sending, 16).ok()
}

/// The fields of the `/proc/net/tcp` line of that socket.
fn tcp_socket_fields(local: u16, remote: u16) -> Option<Vec<String>> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let (local, remote) = (format!(":{local:04X}"), format!(":{remote:04X}"));
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<String> = line.split_whitespace().map(String::from).collect();
        let ours = matches!(
            (fields.get(1), fields.get(2)),
            (Some(l), Some(r)) if l.ends_with(&local) && r.ends_with(&remote)
        );
        ours.then_some(fields)
    })
}

/// A configuration for tests: loopback, port 0, NATS off, upstream none.
pub fn test_config() -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".into();
    config.admin.listen = "127.0.0.1:0".into();
    config.nats.enabled = false;
    config.server.shutdown_grace_secs = 5;
    config
}

/// A gateway running in this process.
pub struct TestGateway {
    /// Public address.
    pub addr: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// Instance id.
    pub id: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestGateway {
    /// Binds and runs a gateway with `config`.
    pub async fn start(config: Config) -> Self {
        let gateway = roomgate::Gateway::bind(config)
            .await
            .expect("gateway binds");
        let (addr, admin, id) = (
            gateway.local_addr(),
            gateway.admin_addr(),
            gateway.id().to_string(),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let stopped = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(gateway.run(stopped, std::future::pending()));
        Self {
            addr,
            admin,
            id,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Starts a gateway with the test defaults changed by `edit`.
    pub async fn with(edit: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config();
        edit(&mut config);
        Self::start(config).await
    }

    /// `ws://addr/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Connects a client to `/ws` and reads its welcome frame.
    pub async fn client(&self) -> WsClient {
        WsClient::connect(&self.ws_url()).await
    }

    /// Begins shutdown and waits for `run` to return.
    pub async fn stop(mut self) {
        self.begin_stop();
        self.wait_stopped().await;
    }

    /// Triggers shutdown without waiting.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits until `run` has returned.
    pub async fn wait_stopped(&mut self) {
        if let Some(task) = self.task.take() {
            within("gateway to stop", task).await.expect("gateway task");
        }
    }

    /// Fetches an admin endpoint: (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }

    /// Fetches an admin endpoint that answers JSON: (status, parsed body).
    pub async fn admin_json(&self, path: &str) -> (u16, Value) {
        let (status, body) = self.admin_get(path).await;
        let value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("admin {path} answered non-JSON ({e}): {body}"));
        (status, value)
    }

    /// The value of a metric sample line (name with labels), 0 if absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let (_, body) = self.admin_get("/metrics").await;
        metric_value(&body, sample)
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.begin_stop();
    }
}

/// Reads `sample` (e.g. `roomgate_rooms` or `x_total{reason="a"}`) from a
/// Prometheus text body.
pub fn metric_value(body: &str, sample: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

// ----- WebSocket client -------------------------------------------------

/// A WebSocket test client that parses JSON frames.
pub struct WsClient {
    /// The stream.
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The connection id from the welcome frame.
    pub id: String,
}

impl WsClient {
    /// Connects and reads the welcome frame.
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = within("WebSocket connect", tokio_tungstenite::connect_async(url))
            .await
            .expect("WebSocket handshake");
        Self::welcomed(ws).await
    }

    /// Connects with a codec configuration (e.g. small buffers, for tests
    /// that open thousands of clients) and, when `recv_buffer` is set, a
    /// fixed kernel receive buffer of about that many bytes, so a client
    /// that stops reading backs up into the gateway quickly.
    pub async fn connect_with(
        url: &str,
        config: Option<WebSocketConfig>,
        recv_buffer: Option<u32>,
    ) -> Self {
        let addr: SocketAddr = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .and_then(|host| host.parse().ok())
            .unwrap_or_else(|| panic!("expected ws://<ip:port>/..., got {url}"));
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .expect("socket");
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
        }
        let stream = within("TCP connect", socket.connect(addr))
            .await
            .expect("connect");
        let (ws, _) = within(
            "WebSocket handshake",
            tokio_tungstenite::client_async_with_config(url, MaybeTlsStream::Plain(stream), config),
        )
        .await
        .expect("WebSocket handshake");
        Self::welcomed(ws).await
    }

    /// Reads the welcome frame of a fresh connection.
    async fn welcomed(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Self {
        let mut client = Self {
            ws,
            id: String::new(),
        };
        let welcome = client.recv().await;
        assert_eq!(
            welcome["type"], "system",
            "first frame is the welcome: {welcome}"
        );
        client.id = welcome["connection_id"]
            .as_str()
            .expect("connection_id")
            .to_string();
        client
    }

    /// Sends a JSON value as a text frame.
    pub async fn send(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    /// Writes `frames` in one burst: fed, then flushed once, so they
    /// reach the gateway together.
    pub async fn send_burst(&mut self, frames: impl IntoIterator<Item = Value>) {
        within("a burst of frames to be written", async {
            for frame in frames {
                self.ws
                    .feed(Message::text(frame.to_string()))
                    .await
                    .expect("feed");
            }
            self.ws.flush().await.expect("flush");
        })
        .await
    }

    /// Sends raw text.
    pub async fn send_text(&mut self, text: &str) {
        within("a text frame to be sent", self.ws.send(Message::text(text)))
            .await
            .expect("send");
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, data: Vec<u8>) {
        within(
            "a binary frame to be sent",
            self.ws.send(Message::binary(data)),
        )
        .await
        .expect("send");
    }

    /// Sends a frame and returns the next frame received (the reply, when
    /// nothing else can arrive in between).
    pub async fn request(&mut self, value: Value) -> Value {
        self.send(value).await;
        self.recv().await
    }

    /// Leaves `room` and waits for `left`.
    pub async fn leave(&mut self, room: &str) {
        let reply = self.request(json!({"type": "leave", "room": room})).await;
        assert_eq!(reply, json!({"type": "left", "room": room}), "leave {room}");
    }

    /// Sends a message to `room` with `id` and waits for its `ack`.
    pub async fn say(&mut self, room: &str, content: Value, id: &str) {
        let reply = self
            .request(json!({"type": "message", "room": room, "content": content, "id": id}))
            .await;
        assert_eq!(reply, json!({"type": "ack", "id": id}), "message to {room}");
    }

    /// Sends a frame the gateway refuses with `unknown_type`, and returns
    /// every frame received before that refusal. The gateway answers a
    /// client's frames in order through the same queue as everything else,
    /// so the result is exactly what was queued for this client before the
    /// barrier was read: a way to assert that something did *not* arrive
    /// without waiting on the clock.
    pub async fn barrier(&mut self) -> Vec<Value> {
        let id = format!("barrier-{}", uuid::Uuid::new_v4().simple());
        self.send(json!({"type": "barrier", "id": id})).await;
        let mut before = Vec::new();
        loop {
            let frame = self.recv().await;
            if frame["type"] == "error" && frame["id"] == id.as_str() {
                assert_eq!(frame["code"], "unknown_type", "barrier reply: {frame}");
                return before;
            }
            before.push(frame);
        }
    }

    /// Sends a WebSocket ping and waits for the matching pong.
    pub async fn ping_pong(&mut self) {
        let payload = bytes::Bytes::from_static(b"are you there");
        within(
            "a ping to be sent",
            self.ws.send(Message::Ping(payload.clone())),
        )
        .await
        .expect("send ping");
        within("a pong", async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Pong(p))) if p == payload => return,
                    Some(Ok(_)) => continue,
                    other => panic!("connection ended while waiting for a pong: {other:?}"),
                }
            }
        })
        .await
    }

    /// Receives the next text frame as sent, without parsing it.
    pub async fn recv_text(&mut self) -> String {
        within("a text frame", async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(text))) => return text.as_str().to_string(),
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                        panic!("connection ended while waiting for a text frame")
                    }
                    Some(Ok(_)) => continue,
                }
            }
        })
        .await
    }

    /// Closes the connection cleanly: sends a 1000 close frame and waits
    /// for the gateway's close frame in reply.
    pub async fn close_normally(mut self) {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        };
        within("the close frame to be sent", self.ws.close(Some(frame)))
            .await
            .expect("send close");
        assert_eq!(self.recv_close().await, Some(1000), "close reply");
    }

    /// The TCP ports of this client's connection: (its own, the gateway's),
    /// to find the connection in `/proc/net/tcp`.
    pub fn ports(&self) -> (u16, u16) {
        match self.ws.get_ref() {
            MaybeTlsStream::Plain(tcp) => (
                tcp.local_addr().expect("address").port(),
                tcp.peer_addr().expect("address").port(),
            ),
            _ => unreachable!("plain TCP"),
        }
    }

    /// Drops the connection without a close frame, resetting the TCP
    /// connection (a client that crashed or lost its network).
    pub fn abort(self) {
        if let MaybeTlsStream::Plain(tcp) = self.ws.get_ref() {
            let _ = tcp.set_zero_linger();
        }
        drop(self);
    }

    /// Receives the next JSON text frame (skipping pings/pongs).
    pub async fn recv(&mut self) -> Value {
        within("a frame", self.next_json())
            .await
            .expect("connection open while waiting for a frame")
    }

    /// Receives the next JSON frame, or `None` when the connection ends.
    /// A close frame is answered (by reading on until the end) so the
    /// gateway is not left waiting for the reply.
    pub async fn next_json(&mut self) -> Option<Value> {
        loop {
            match self.ws.next().await? {
                Ok(Message::Text(text)) => {
                    return Some(serde_json::from_str(text.as_str()).expect("server sent JSON"));
                }
                Ok(Message::Close(_)) => {
                    while let Some(Ok(_)) = self.ws.next().await {}
                    return None;
                }
                Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Receives frames until one of type `kind`, returning it; the skipped
    /// frames are returned too, for assertions.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.recv().await;
            if frame["type"] == kind {
                return frame;
            }
        }
    }

    /// Joins `room` and waits for `joined`.
    pub async fn join(&mut self, room: &str) {
        self.send(json!({"type": "join", "room": room})).await;
        let reply = self.recv().await;
        assert_eq!(
            reply,
            json!({"type": "joined", "room": room}),
            "join {room}"
        );
    }

    /// Asserts that no frame arrives within `QUIET`.
    pub async fn expect_silence(&mut self) {
        if let Ok(frame) = tokio::time::timeout(QUIET, self.next_json()).await {
            panic!("expected no frame, got {frame:?}");
        }
    }

    /// Waits for the server to close; returns the close code (None when the
    /// TCP connection ended without a close frame). After the close frame
    /// it keeps reading until the connection ends, as a client should: that
    /// sends the close reply the server waits for.
    pub async fn recv_close(&mut self) -> Option<u16> {
        within("the server to close the connection", async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Close(frame))) => {
                        while let Some(Ok(_)) = self.ws.next().await {}
                        return frame.map(|f: CloseFrame| u16::from(f.code));
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return None,
                }
            }
        })
        .await
    }
}

// ----- plain HTTP -------------------------------------------------------

/// Writes raw `request` (which asks for `Connection: close`) on a new
/// connection to `addr` and reads what comes back until the connection
/// ends, as text.
pub async fn exchange_until_close(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    within("the whole answer", stream.read_to_end(&mut answer))
        .await
        .expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

/// A GET with a fresh connection: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http_request(
        addr,
        Request::get(path)
            .header("host", addr.to_string())
            .body(empty())
            .unwrap(),
    )
    .await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A new connection to `addr` on which `request` was written.
pub async fn sent_raw(addr: SocketAddr, request: &str) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    stream
}

/// Sends a request on a fresh connection: (status, headers, whole body).
pub async fn http_request(
    addr: SocketAddr,
    request: Request<TestBody>,
) -> (u16, hyper::HeaderMap, Bytes) {
    let response = send_request(addr, request).await;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = within("response body", response.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    (status, headers, body)
}

/// Sends a request on a fresh connection and returns the streaming response.
pub async fn send_request(addr: SocketAddr, request: Request<TestBody>) -> Response<Incoming> {
    let stream = within("TCP connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("HTTP handshake");
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    within("HTTP response", sender.send_request(request))
        .await
        .expect("response")
}

/// The body type of test requests and upstream responses.
pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// An empty body.
pub fn empty() -> TestBody {
    full(Bytes::new())
}

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A request body fed chunk by chunk through the returned sender; it ends
/// when the sender is dropped. Lets a test hold back part of an upload.
pub fn body_channel() -> (tokio::sync::mpsc::Sender<Bytes>, TestBody) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        let frame: Result<_, Box<dyn std::error::Error + Send + Sync>> =
            Ok(hyper::body::Frame::data(chunk));
        Some((frame, rx))
    });
    (tx, BodyExt::boxed(http_body_util::StreamBody::new(stream)))
}

// ----- raw WebSocket ----------------------------------------------------

/// A WebSocket handshake request for `path` with a valid key, as raw bytes,
/// with `extra` header lines (each ending in `\r\n`) added.
pub fn raw_upgrade_request(addr: SocketAddr, path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

/// Sends a WebSocket handshake for `/ws` on a raw socket and checks that it
/// is switched (101); nothing after the response head is read.
pub async fn upgrade_raw(stream: &mut TcpStream, addr: SocketAddr) {
    use tokio::io::AsyncWriteExt;
    within(
        "the handshake to be written",
        stream.write_all(raw_upgrade_request(addr, "/ws", "").as_bytes()),
    )
    .await
    .expect("write handshake");
    let (status, head) = read_response_head(stream).await;
    assert_eq!(status, 101, "{head}");
}

/// Reads an HTTP response head (up to the blank line) from a raw socket,
/// byte by byte so nothing after it is consumed: (status, head text).
pub async fn read_response_head(stream: &mut TcpStream) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    within("an HTTP response head", async {
        while !head.ends_with(b"\r\n\r\n") {
            let byte = stream.read_u8().await.expect("response head");
            head.push(byte);
        }
    })
    .await;
    let text = String::from_utf8_lossy(&head).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code in response head");
    (status, text)
}

/// A header's value in a raw head, by case-insensitive name.
pub fn field<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads a whole response from a raw socket: (status, head, body). The
/// response must carry a `Content-Length`; nothing after its body is read,
/// so the socket can carry the next exchange.
pub async fn read_response(stream: &mut TcpStream) -> (u16, String, String) {
    use tokio::io::AsyncReadExt;
    let (status, head) = read_response_head(stream).await;
    let length: usize = field(&head, "content-length")
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("the response has a Content-Length: {head}"));
    let mut body = vec![0u8; length];
    within("a response body", stream.read_exact(&mut body))
        .await
        .expect("response body");
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

/// A frame as a server sends it (never masked): opcode and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// 1 text, 2 binary, 8 close, 9 ping, 10 pong.
    pub opcode: u8,
    /// The unmasked payload.
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The close code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// Writes one text frame as a client must (masked) to a raw socket.
pub async fn write_masked_text(stream: &mut TcpStream, text: &str) {
    use tokio::io::AsyncWriteExt;
    let frame = client_frame(0x81, text.as_bytes(), true);
    within("writing a frame", stream.write_all(&frame))
        .await
        .expect("write frame");
}

/// The bytes of one client frame: `first` is the first byte (FIN, reserved
/// bits and opcode), and the payload is masked when `masked`. Tests build
/// frames a well-behaved client library would refuse to send with it.
pub fn client_frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut frame = vec![first];
    match payload.len() {
        n @ 0..=125 => frame.push(mask_bit | n as u8),
        n @ 126..=0xffff => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        frame.extend_from_slice(&MASK);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        frame.extend_from_slice(payload);
    }
    frame
}

/// Reads one unmasked frame from a raw socket; `None` at end of stream.
/// Not bounded by itself: wrap it in [`within`].
pub async fn read_raw_frame(stream: &mut TcpStream) -> Option<RawFrame> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.ok()?;
    let opcode = head[0] & 0x0f;
    assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
    let len = match head[1] & 0x7f {
        126 => u64::from(stream.read_u16().await.ok()?),
        127 => stream.read_u64().await.ok()?,
        n => u64::from(n),
    };
    let mut payload = vec![0u8; usize::try_from(len).expect("frame length")];
    stream.read_exact(&mut payload).await.ok()?;
    Some(RawFrame { opcode, payload })
}

// ----- upstream ---------------------------------------------------------

/// A request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Headers.
    pub headers: hyper::HeaderMap,
}

type Handler = Arc<
    dyn Fn(Request<Incoming>) -> std::pin::Pin<Box<dyn Future<Output = Response<TestBody>> + Send>>
        + Send
        + Sync,
>;

/// A real HTTP server on port 0 that answers with `handler`.
pub struct Upstream {
    /// Its address.
    pub addr: SocketAddr,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    open: Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Starts a server running `handler` for every request.
    pub async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |r| Box::pin(handler(r)));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (counter, still_open) = (accepted.clone(), open.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                still_open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let handler = handler.clone();
                let still_open = still_open.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |r| {
                        let handler = handler.clone();
                        async move { Ok::<_, Infallible>(handler(r).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                    still_open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            accepted,
            open,
            task,
        }
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// TCP connections accepted so far (to check connection reuse).
    pub fn connections_accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections whose HTTP exchange has not ended (the peer has not
    /// closed them, nor has an upgrade ended).
    pub fn connections_open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A free loopback port (bound then released; good enough for child
/// processes that must be told their port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

// ----- nats-server ------------------------------------------------------

/// A `nats-server` process on a free loopback port, killed on drop.
pub struct NatsServer {
    /// Client port.
    pub port: u16,
    /// Cluster (route) port, when clustered.
    pub cluster_port: Option<u16>,
    /// HTTP monitoring port (`-m`): `/connz`, `/subsz`, `/varz`.
    pub monitor_port: u16,
    args: Vec<String>,
    child: Option<Child>,
    dir: PathBuf,
}

/// Sends a signal (e.g. "STOP", "CONT", "HUP") to a process this test
/// started.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {pid}");
}

/// The `nats-server` binary, or a panic explaining how to get it.
pub fn nats_server_binary() -> PathBuf {
    for candidate in [
        "nats-server",
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
    ] {
        if let Ok(output) = Command::new(candidate).arg("--version").output()
            && output.status.success()
        {
            return PathBuf::from(candidate);
        }
    }
    panic!(
        "nats-server is not installed: the NATS tests need a real server. \
         Install it (Debian: `apt-get install -y nats-server`) or run ./scripts/test.sh, which does."
    );
}

impl NatsServer {
    /// Starts a standalone server.
    pub fn start() -> Self {
        Self::start_with(Vec::new(), None)
    }

    /// Starts a server with `config` as its configuration file's text.
    pub fn start_with_config(config: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("roomgate-conf-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let conf = dir.join("nats.conf");
        std::fs::write(&conf, config).expect("write the server's configuration");
        let server = Self::start_with_args(&["-c", conf.to_str().expect("UTF-8 path")]);
        // Read at start; no test here reloads it.
        let _ = std::fs::remove_dir_all(&dir);
        server
    }

    /// Starts a standalone server with extra arguments, such as
    /// `--user alice --pass hunter2` or `--auth TOKEN` for a server that
    /// requires a login.
    pub fn start_with_args(args: &[&str]) -> Self {
        Self::start_with(args.iter().map(|a| a.to_string()).collect(), None)
    }

    /// Starts a cluster of `n` servers with routes on loopback.
    pub fn cluster(n: usize) -> Vec<Self> {
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        cluster_ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let args = vec![
                    "--cluster_name".into(),
                    "roomgate-test".into(),
                    "--name".into(),
                    format!("n{i}"),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{port}"),
                    "--routes".into(),
                    routes.clone(),
                ];
                Self::start_with(args, Some(*port))
            })
            .collect()
    }

    fn start_with(args: Vec<String>, cluster_port: Option<u16>) -> Self {
        let dir = std::env::temp_dir().join(format!("roomgate-nats-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut server = Self {
            port: free_port(),
            cluster_port,
            monitor_port: free_port(),
            args,
            child: None,
            dir,
        };
        // A port found free can be taken by another test's socket before
        // the server binds it; the server then exits, and new ports fix it.
        for _ in 0..SPAWN_ATTEMPTS {
            if server.try_spawn() {
                return server;
            }
            server.port = free_port();
            server.monitor_port = free_port();
        }
        panic!("nats-server did not start in {SPAWN_ATTEMPTS} attempts");
    }

    /// Starts the process on the current ports; `false` if it exited
    /// instead of listening (a port was taken meanwhile).
    fn try_spawn(&mut self) -> bool {
        // Killed if the wait below panics, or if it does not listen.
        let mut child = KillOnDrop::new(
            Command::new(nats_server_binary())
                .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-m", &self.monitor_port.to_string()])
                .args(&self.args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .current_dir(&self.dir)
                .spawn()
                .expect("spawn nats-server"),
        );
        let listening = wait_while_running(child.get(), self.port)
            && wait_while_running(child.get(), self.monitor_port)
            && matches!(child.get().try_wait(), Ok(None));
        if listening {
            self.child = Some(child.into_inner());
        }
        listening
    }

    fn spawn(&mut self) {
        // A restart keeps its port (clients reconnect to it): only retry.
        for _ in 0..SPAWN_ATTEMPTS {
            if self.try_spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("nats-server did not restart on port {}", self.port);
    }

    /// Whether the process is running (not stopped by [`NatsServer::stop`]).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A monitoring endpoint (e.g. `/connz?subs=1`) parsed as JSON.
    pub async fn monitor(&self, path: &str) -> Value {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.monitor_port));
        let (status, body) = http_get(addr, path).await;
        assert_eq!(status, 200, "nats-server monitoring {path}: {body}");
        serde_json::from_str(&body).expect("monitoring endpoint returns JSON")
    }

    /// `nats://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (it can be restarted on the same port).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// A client connected to this server.
    pub async fn client(&self) -> async_nats::Client {
        self.client_with(async_nats::ConnectOptions::new()).await
    }

    /// A client connected to this server with `options` (a login, say).
    pub async fn client_with(&self, options: async_nats::ConnectOptions) -> async_nats::Client {
        within("NATS client connect", options.connect(self.url()))
            .await
            .expect("connect to nats-server")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A child process that is killed (and reaped) when this is dropped, a
/// panic's unwinding included, unless taken out with [`KillOnDrop::into_inner`].
pub struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    /// Guards `child`.
    pub fn new(child: Child) -> Self {
        Self(Some(child))
    }

    /// The child.
    pub fn get(&mut self) -> &mut Child {
        self.0.as_mut().expect("a guarded child")
    }

    /// Takes the child out: it is no longer killed on drop.
    pub fn into_inner(mut self) -> Child {
        self.0.take().expect("a guarded child")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Tries to start a `nats-server` this many times.
const SPAWN_ATTEMPTS: usize = 5;

/// Blocks until something listens on `port` (bounded by `WAIT`); `false`
/// as soon as `child` exits instead.
fn wait_while_running(child: &mut Child, port: u16) -> bool {
    wait_listening(port, || matches!(child.try_wait(), Ok(None)))
}

/// Blocks until something listens on `port` (bounded by `WAIT`).
pub fn wait_for_port(port: u16) {
    wait_listening(port, || true);
}

/// Polls `port` until it accepts a connection (`true`) or `alive` says the
/// process meant to listen there is gone (`false`).
fn wait_listening(port: u16, mut alive: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if !alive() {
            return false;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing listening on port {port} after {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

// ----- a link to cut ---------------------------------------------------

/// A TCP relay from a loopback port to another, which a test can cut and
/// restore. Cut, it drops the connections it carries and closes new ones
/// at once: to a client connected through it, NATS is gone, while clients
/// connected to the server directly (a backend) stay connected and keep
/// their subscriptions.
pub struct Relay {
    /// The port clients connect to.
    pub port: u16,
    up: Arc<tokio::sync::watch::Sender<bool>>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Relays a new port to `127.0.0.1:target`, carrying connections.
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the relay");
        let port = listener.local_addr().expect("relay address").port();
        let up = Arc::new(tokio::sync::watch::channel(true).0);
        let task = tokio::spawn(relay(listener, target, up.clone()));
        Self { port, up, task }
    }

    /// `nats://127.0.0.1:port`, for a client to connect through the relay.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Drops the relayed connections and closes new ones until [`Relay::restore`].
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    /// Carries connections again.
    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.up.send_replace(false);
    }
}

/// Accepts connections on `listener` and, while `up`, joins each to a new
/// connection to `target` until one side closes or the relay is cut.
async fn relay(listener: TcpListener, target: u16, up: Arc<tokio::sync::watch::Sender<bool>>) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            // Out of descriptors, say: let the test fail on its own waits
            // rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if !*up.borrow() {
            continue; // dropped: closed at once
        }
        let mut cut = up.subscribe();
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = cut.wait_for(|up| !*up) => {}
            }
        });
    }
}

// ----- files ------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates the directory.
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(format!("roomgate-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path).expect("temp dir");
        Self { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` inside the directory; returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let file = self.path.join(name);
        std::fs::write(&file, contents).expect("write temp file");
        file
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ----- the binary -------------------------------------------------------

/// Path of the built `roomgate` binary.
pub fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_roomgate"))
}

/// Runs `roomgate` with `args` and `env` (nothing inherited from ours but
/// PATH) and returns (exit code, stdout, stderr). Bounded by `WAIT`: a
/// process that does not exit (say, one that started serving when it should
/// have refused its configuration) is killed and the test fails.
pub fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let env: Vec<(&OsStr, &OsStr)> = env
        .iter()
        .map(|(k, v)| (OsStr::new(k), OsStr::new(v)))
        .collect();
    run_binary_os(args, &env)
}

/// [`run_binary`] with variables that need not be UTF-8.
pub fn run_binary_os(args: &[&str], env: &[(&OsStr, &OsStr)]) -> (i32, String, String) {
    let mut child = Command::new(binary())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run roomgate");
    let read_all = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().expect("stdout")));
    let stderr = read_all(Box::new(child.stderr.take().expect("stderr")));
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("roomgate {args:?} did not exit within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.code().unwrap_or(-1),
        stdout.join().expect("stdout reader"),
        stderr.join().expect("stderr reader"),
    )
}

/// A running `roomgate` process; killed on drop if still running.
pub struct GatewayProcess {
    /// The child.
    pub child: Child,
    /// Public address from its "listening" log line.
    pub addr: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// Lines logged after the listening line, collected in the background.
    pub log: Arc<std::sync::Mutex<Vec<String>>>,
    /// Everything it wrote to stderr (a panic's message among it), also
    /// passed on to the test's own stderr.
    pub stderr: Arc<std::sync::Mutex<Vec<String>>>,
}

impl GatewayProcess {
    /// Starts the binary with `env` (listen addresses default to port 0)
    /// and waits for its listening line.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn(Command::new(binary()), args, env)
    }

    /// Like [`GatewayProcess::start`], with the process allowed at most
    /// `files` open file descriptors, so a test can run it out of them.
    pub fn start_with_file_limit(args: &[&str], env: &[(&str, &str)], files: u64) -> Self {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(binary());
        let limit = libc::rlimit {
            rlim_cur: files,
            rlim_max: files,
        };
        // SAFETY: runs in the forked child before exec and only makes one
        // async-signal-safe system call on a value it owns.
        unsafe {
            command.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        Self::spawn(command, args, env)
    }

    fn spawn(mut command: Command, args: &[&str], env: &[(&str, &str)]) -> Self {
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("ROOMGATE_SERVER_LISTEN", "127.0.0.1:0")
            .env("ROOMGATE_ADMIN_LISTEN", "127.0.0.1:0")
            .env("ROOMGATE_NATS_ENABLED", "false")
            .env("ROOMGATE_LOG_FORMAT", "json")
            .envs(env.iter().copied())
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Not yet owned by a `GatewayProcess`, whose drop would kill it:
        // killed on a panic until it is.
        let mut child = KillOnDrop::new(command.spawn().expect("spawn roomgate"));
        let stdout = child.get().stdout.take().expect("stdout");
        let stderr = Arc::new(std::sync::Mutex::new(Vec::new()));
        let errors = stderr.clone();
        let pipe = child.get().stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                eprintln!("{line}");
                errors.lock().unwrap().push(line);
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent && line.contains("roomgate listening") {
                    let _ = tx.send(line.clone());
                    sent = true;
                }
                sink.lock().unwrap().push(line);
            }
        });
        let line = rx
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("roomgate did not log its listening line within {WAIT:?}"));
        let fields: HashMap<String, Value> = serde_json::from_str(&line).expect("JSON log line");
        let addr = fields["addr"]
            .as_str()
            .expect("addr")
            .parse()
            .expect("addr parses");
        let admin = fields["admin"]
            .as_str()
            .expect("admin")
            .parse()
            .expect("admin parses");
        Self {
            child: child.into_inner(),
            addr,
            admin,
            log,
            stderr,
        }
    }

    /// The lines of stderr that report a panic in any of its threads.
    pub fn panics(&self) -> Vec<String> {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains("panicked"))
            .cloned()
            .collect()
    }

    /// Sends a signal (e.g. "TERM") to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// The lines logged so far, parsed (the binary logs JSON when its
    /// output is not a terminal).
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        let log = self.log.lock().expect("log");
        log.iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// How many lines logged so far contain `text`.
    pub fn logged(&self, text: &str) -> usize {
        let log = self.log.lock().expect("log");
        log.iter().filter(|line| line.contains(text)).count()
    }

    /// Waits (bounded) for the process to exit and returns its code.
    pub fn wait_exit(&mut self) -> i32 {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code().unwrap_or(-1);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "roomgate did not exit within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A raw client with a tiny receive buffer that joins `room`, reads up to
/// its `joined` reply, and then never reads again.
pub async fn client_that_stops_reading(addr: SocketAddr, room: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let mut stream = within("connect", socket.connect(addr))
        .await
        .expect("connect");
    upgrade_raw(&mut stream, addr).await;
    write_masked_text(
        &mut stream,
        &json!({"type": "join", "room": room}).to_string(),
    )
    .await;
    within("the joined reply", async {
        loop {
            let frame = read_raw_frame(&mut stream).await.expect("open");
            if frame.opcode == 1 && String::from_utf8_lossy(&frame.payload).contains("joined") {
                break;
            }
        }
    })
    .await;
    stream
}

/// Every leaf of a TOML table with its dotted key path (`server.listen`),
/// in the table's order: what a configuration sets, key by key.
pub fn toml_leaves(table: &toml::Table) -> Vec<(String, toml::Value)> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            match value {
                toml::Value::Table(inner) => walk(&path, inner, out),
                leaf => out.push((path, leaf.clone())),
            }
        }
    }
    let mut out = Vec::new();
    walk("", table, &mut out);
    out
}

// ----- an upstream racing its keep-alive timeout ---------------------------

/// An upstream that answers every request with `answer` on kept-alive
/// connections, except that its first connection, after its first answer,
/// closes as soon as the next request arrives on it, without answering:
/// an upstream whose keep-alive timeout ran out just as the request went
/// out. Returns its address and a count of the connections it accepted.
pub async fn upstream_closing_on_second_request(
    answer: &'static [u8],
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let first = count.fetch_add(1, Ordering::SeqCst) == 0;
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut answered = 0;
                let mut buf = [0u8; 4096];
                loop {
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        if first && answered == 1 {
                            return;
                        }
                        if tokio::io::AsyncWriteExt::write_all(&mut stream, answer)
                            .await
                            .is_err()
                        {
                            return;
                        }
                        answered += 1;
                    }
                    match tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => pending.extend_from_slice(&buf[..read]),
                    }
                }
            });
        }
    });
    (addr, accepted)
}
