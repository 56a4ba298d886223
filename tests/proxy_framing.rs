//! How the proxy frames and checks the messages it passes on (RFC 9112):
//! requests it must refuse, headers it must rewrite, and upstream answers
//! it cannot pass on. The upstream here speaks raw bytes, so that it can
//! send what a well-behaved HTTP library never would.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that reads each request head, records it, writes a canned
/// answer, and then reads and discards whatever else comes on that
/// connection until it closes.
struct RawUpstream {
    url: String,
    heads: Arc<Mutex<Vec<String>>>,
}

impl RawUpstream {
    async fn start(answer: &'static [u8]) -> Self {
        Self::start_ending(answer, false).await
    }

    /// Like [`RawUpstream::start`], but with `close` each connection is
    /// closed once the answer is written: the end of a body without a
    /// length.
    async fn start_ending(answer: &'static [u8], close: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let log = heads.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(answer_with(conn, answer, log.clone(), close));
            }
        });
        Self { url, heads }
    }

    /// The request heads received so far.
    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    /// A gateway in front of it.
    async fn gateway(&self) -> TestGateway {
        let url = self.url.clone();
        TestGateway::with(|c| c.upstream.url = url).await
    }
}

async fn answer_with(
    mut conn: TcpStream,
    answer: &[u8],
    log: Arc<Mutex<Vec<String>>>,
    close: bool,
) {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read_u8().await {
            Ok(byte) => head.push(byte),
            Err(_) => return,
        }
    }
    log.lock()
        .unwrap()
        .push(String::from_utf8_lossy(&head).into_owned());
    if conn.write_all(answer).await.is_err() || close {
        return;
    }
    let mut sink = [0u8; 4096];
    while let Ok(1..) = conn.read(&mut sink).await {}
}

/// Writes `request` on a fresh connection and returns the one response
/// the gateway sends back, read as its framing says, with the connection.
async fn exchange_on(gw: &TestGateway, request: &[u8]) -> (String, TcpStream) {
    let mut stream = send_on_new_connection(gw, request).await;
    let reply = within("a whole response", read_reply(&mut stream)).await;
    (reply, stream)
}

/// Writes `request` on a fresh connection and returns the connection.
async fn send_on_new_connection(gw: &TestGateway, request: &[u8]) -> TcpStream {
    let mut stream = within("connect", TcpStream::connect(gw.addr))
        .await
        .expect("connect");
    within("write", stream.write_all(request))
        .await
        .expect("write the request");
    stream
}

/// [`exchange_on`] without the connection.
async fn exchange(gw: &TestGateway, request: &[u8]) -> String {
    exchange_on(gw, request).await.0
}

/// Reads one response, head and body: the body by its `Content-Length`,
/// by the chunked coding, or else up to the end of the connection.
async fn read_reply(stream: &mut TcpStream) -> String {
    let mut reply = Vec::new();
    while !reply.ends_with(b"\r\n\r\n") {
        let byte = stream.read_u8().await.unwrap_or_else(|e| {
            panic!(
                "the response head ended early ({e}): {:?}",
                String::from_utf8_lossy(&reply)
            )
        });
        reply.push(byte);
    }
    let head = String::from_utf8_lossy(&reply).into_owned();
    if let Some(length) = field(&head, "content-length") {
        let mut body = vec![0u8; length.parse().expect("a numeric length")];
        stream.read_exact(&mut body).await.expect("the body");
        reply.extend_from_slice(&body);
    } else if field(&head, "transfer-encoding").is_some_and(|c| c.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut line = Vec::new();
            while !line.ends_with(b"\r\n") {
                line.push(stream.read_u8().await.expect("a chunk size"));
            }
            reply.extend_from_slice(&line);
            let text = String::from_utf8_lossy(&line);
            let size = text.trim().split(';').next().unwrap_or_default();
            let size = usize::from_str_radix(size, 16).expect("a hex chunk size");
            // The data and its CRLF; the last chunk is followed by (no
            // trailers and) the final CRLF.
            let mut rest = vec![0u8; size + 2];
            stream.read_exact(&mut rest).await.expect("a chunk");
            reply.extend_from_slice(&rest);
            if size == 0 {
                break;
            }
        }
    } else {
        stream.read_to_end(&mut reply).await.expect("the body");
    }
    String::from_utf8_lossy(&reply).into_owned()
}

/// The head and body of a raw response.
fn split(reply: &str) -> (&str, &str) {
    reply
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("a whole response head: {reply:?}"))
}

/// Sends `GET <target>` for each target, each on a new connection with
/// `host: <host>`, and checks that each answer has `status`.
async fn get_targets(gw: &TestGateway, host: &str, targets: &[&str], status: u16) {
    for target in targets {
        let request = format!("GET {target} HTTP/1.1\r\nhost: {host}\r\n\r\n");
        let reply = exchange(gw, request.as_bytes()).await;
        assert!(
            reply.starts_with(&format!("HTTP/1.1 {status} ")),
            "{target}: {reply:?}"
        );
    }
}

/// A plain answer. [`RawUpstream`] answers one request per connection, so
/// it tells the gateway not to reuse the connection.
const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";

#[tokio::test]
async fn a_response_with_a_length_and_chunked_coding_reaches_the_client_whole() {
    // RFC 9112 §6.3: the chunked coding wins over the length, and an
    // intermediary removes the length before passing the message on. Left
    // in, the stale length would frame the client's copy: two bytes of
    // four, looking complete.
    let upstream = RawUpstream::start(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n\
          4\r\nDATA\r\n0\r\n\r\n",
    )
    .await;
    let gw = upstream.gateway().await;
    // A plain request, and an upgrade the upstream answers without
    // switching (the tunnel's path).
    for upgrade in [false, true] {
        let mut request = hyper::Request::get("/both").header("host", "app.example.test");
        if upgrade {
            request = request
                .header("connection", "upgrade")
                .header("upgrade", "websocket");
        }
        let (status, headers, body) = http_request(gw.addr, request.body(empty()).unwrap()).await;
        assert_eq!(
            (status, &body[..]),
            (200, &b"DATA"[..]),
            "upgrade: {upgrade}, {headers:?}"
        );
    }
    assert_eq!(upstream.heads.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_response_with_a_transfer_coding_other_than_chunked_gets_502() {
    // Only the chunked coding is taken off on the way; passing the rest on
    // without its header would hand the client gzip bytes as the content.
    for (what, answer) in [
        (
            "gzip, chunked",
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n4\r\nGZIP\r\n0\r\n\r\n"[..],
        ),
        (
            "gzip then chunked, in two field lines",
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n\
               4\r\nGZIP\r\n0\r\n\r\n"[..],
        ),
    ] {
        let upstream = RawUpstream::start(answer).await;
        let gw = upstream.gateway().await;
        let (status, body) = http_get(gw.addr, "/coded").await;
        assert_eq!(status, 502, "{what}: {body}");
    }
}

#[tokio::test]
async fn a_status_code_outside_100_to_599_gets_502() {
    // hyper reads any three digits as a status; RFC 9110 §15 allows
    // 100-599, and a client has no class by which to read the rest.
    for answer in [
        &b"HTTP/1.1 804 No Content\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"[..],
        &b"HTTP/1.1 999 Odd\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"[..],
    ] {
        let upstream = RawUpstream::start(answer).await;
        let gw = upstream.gateway().await;
        let (status, body) = http_get(gw.addr, "/odd").await;
        assert_eq!(status, 502, "{body}");
    }
    // 599 is still a status, of the server-error class.
    let upstream =
        RawUpstream::start(b"HTTP/1.1 599 Odd\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            .await;
    let gw = upstream.gateway().await;
    assert_eq!(http_get(gw.addr, "/odd").await, (599, "ok".to_string()));
}

#[tokio::test]
async fn a_request_with_a_transfer_coding_besides_chunked_gets_501() {
    // The gateway only implements chunked (RFC 9112 §6.1). Re-framed as
    // plain chunked, the upstream would take the gzip bytes for the
    // content; nginx answers 501 too.
    let upstream = RawUpstream::start(OK).await;
    let gw = upstream.gateway().await;
    for (what, codings) in [
        ("one field line", "transfer-encoding: gzip, chunked\r\n"),
        (
            "two field lines",
            "transfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n",
        ),
    ] {
        let request = format!(
            "POST /coded HTTP/1.1\r\nhost: app.example.test\r\n{codings}\r\n\
             4\r\nGZIP\r\n0\r\n\r\n"
        );
        let reply = exchange(&gw, request.as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 501"), "{what}: {reply:?}");
    }
    assert!(upstream.heads().is_empty(), "{:?}", upstream.heads());

    // Plain chunked, in any case, is forwarded.
    let reply = exchange(
        &gw,
        b"POST /plain HTTP/1.1\r\nhost: app.example.test\r\ntransfer-encoding: Chunked\r\n\r\n\
          2\r\nhi\r\n0\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
    assert_eq!(upstream.heads().len(), 1);
}

#[tokio::test]
async fn a_request_without_exactly_one_valid_host_gets_400() {
    // RFC 9112 §3.2, as nginx applies it: the gateway, the upstream and
    // anything between them could each pick a different target otherwise.
    let upstream = RawUpstream::start(OK).await;
    let gw = upstream.gateway().await;
    for (what, head) in [
        ("no Host in HTTP/1.1", "GET /x HTTP/1.1\r\n"),
        (
            "two Hosts",
            "GET /x HTTP/1.1\r\nhost: a.test\r\nhost: b.test\r\n",
        ),
        (
            "two Hosts in HTTP/1.0",
            "GET /x HTTP/1.0\r\nhost: a.test\r\nhost: b.test\r\n",
        ),
        (
            "a Host with a path",
            "GET /x HTTP/1.1\r\nhost: a.test/p\r\n",
        ),
        (
            "a Host with a user",
            "GET /x HTTP/1.1\r\nhost: me@a.test\r\n",
        ),
        (
            "a Host with a bad port",
            "GET /x HTTP/1.1\r\nhost: a.test:x\r\n",
        ),
        ("an empty Host", "GET /x HTTP/1.1\r\nhost: \r\n"),
        (
            "no Host on the gateway's WebSocket path",
            "GET /ws HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
             sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        ),
    ] {
        let reply = exchange(&gw, format!("{head}\r\n").as_bytes()).await;
        assert!(
            reply.starts_with("HTTP/1.1 400") || reply.starts_with("HTTP/1.0 400"),
            "{what}: {reply:?}"
        );
    }
    assert!(upstream.heads().is_empty(), "{:?}", upstream.heads());

    let reply = exchange(&gw, b"GET /x HTTP/1.1\r\nhost: [::1]:8080\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
    let heads = upstream.heads();
    assert!(
        heads[0].contains("host: [::1]:8080\r\n"),
        "the upstream saw {heads:?}"
    );
}

#[tokio::test]
async fn an_absolute_form_target_sets_host_and_forwarded_host() {
    // RFC 9112 §3.2.2: a proxy ignores the received Host and uses the
    // target's authority instead.
    let upstream = RawUpstream::start(OK).await;
    let gw = upstream.gateway().await;
    get_targets(
        &gw,
        "other.test",
        &[
            "http://target.test/p?q=1",
            "http://target.test:8080/p?q=1",
            "https://target.test:8443/p?q=1",
        ],
        200,
    )
    .await;
    let heads = upstream.heads();
    for (head, expected) in
        heads
            .iter()
            .zip(["target.test", "target.test:8080", "target.test:8443"])
    {
        let head = head.to_ascii_lowercase();
        assert!(head.starts_with("get /p?q=1 http/1.1\r\n"), "{head}");
        assert_eq!(field(&head, "host"), Some(expected), "{head}");
        assert_eq!(field(&head, "x-forwarded-host"), Some(expected), "{head}");
        assert!(!head.contains("other.test"), "{head}");
    }
    assert_eq!(heads.len(), 3, "{heads:?}");
}

#[tokio::test]
async fn connect_gets_405_with_allow_and_the_connection_closes() {
    // A reverse proxy opens no tunnels to other hosts (nginx refuses
    // CONNECT too). The bytes after the request were meant for the tunnel:
    // the connection closes instead of reading them as a request.
    let upstream = RawUpstream::start(OK).await;
    let gw = upstream.gateway().await;
    let (reply, mut stream) = exchange_on(
        &gw,
        b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n\
          GET /tunnelled HTTP/1.1\r\nhost: example.com\r\n\r\n",
    )
    .await;
    let (head, _) = split(&reply);
    assert!(head.starts_with("HTTP/1.1 405"), "{reply:?}");
    let allow = field(head, "allow").unwrap_or_else(|| panic!("an Allow header: {head}"));
    assert!(allow.contains("GET"), "{allow}");
    assert!(!allow.contains("CONNECT"), "{allow}");
    // The connection closes after the 405, with nothing more on it: the
    // request behind the CONNECT was not served.
    let mut rest = Vec::new();
    let _ = within("the connection to close", stream.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert!(upstream.heads().is_empty(), "{:?}", upstream.heads());
}

#[tokio::test]
async fn an_upstream_switching_protocols_unasked_gets_502() {
    // A 101 to a request that did not ask to upgrade leaves the upstream
    // connection speaking something that is not HTTP; passed on, it would
    // leave the client's connection in the same state.
    let upstream = RawUpstream::start(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    )
    .await;
    let gw = upstream.gateway().await;
    let (status, body) = http_get(gw.addr, "/plain").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(upstream.heads().len(), 1);
}

#[tokio::test]
async fn a_failed_request_body_is_the_clients_400_not_an_upstream_502() {
    // The upstream connection fails with the client's body, but the fault
    // is the client's: 400 as from nginx, counted as such, and with no
    // internal error text in the answer.
    let upstream = Upstream::start(
        |request: hyper::Request<hyper::body::Incoming>| async move {
            use http_body_util::BodyExt;
            let _ = request.into_body().collect().await;
            hyper::Response::new(full("read"))
        },
    )
    .await;
    let url = upstream.url();
    let gw = TestGateway::with(|c| c.upstream.url = url).await;
    let post = "POST /upload HTTP/1.1\r\nhost: app.example.test\r\n";

    // Broken chunked framing.
    let reply = exchange(
        &gw,
        format!("{post}transfer-encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n").as_bytes(),
    )
    .await;
    let (head, body) = split(&reply);
    assert!(head.starts_with("HTTP/1.1 400"), "{reply:?}");
    assert_eq!(body, "bad request: malformed request body\n");

    // A client that stops sending half way and half-closes still reads
    // the answer.
    let cut_short = format!("{post}content-length: 100\r\n\r\nonly ten..");
    let mut stream = send_on_new_connection(&gw, cut_short.as_bytes()).await;
    within("the half-close", stream.shutdown())
        .await
        .expect("half-close");
    let mut reply = String::new();
    within("the answer", stream.read_to_string(&mut reply))
        .await
        .expect("read");
    let (head, body) = split(&reply);
    assert!(head.starts_with("HTTP/1.1 400"), "{reply:?}");
    assert_eq!(body, "bad request: request body incomplete\n");

    // One that goes away entirely reads nothing, but is still no 502.
    let stream = send_on_new_connection(&gw, cut_short.as_bytes()).await;
    drop(stream);

    eventually_async("three 400s counted", || async {
        gw.metric("roomgate_proxy_requests_total{code=\"400\"}")
            .await
            == 3.0
    })
    .await;
    assert_eq!(
        gw.metric("roomgate_proxy_requests_total{code=\"502\"}")
            .await,
        0.0
    );
}

/// How an upstream that refuses an upload ends its connection.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// Answers as soon as the request head is in and closes with the body
    /// unread, so its kernel resets the connection under the gateway's
    /// writes.
    CloseUnread,
    /// Answers, half-closes, and reads the rest until the gateway stops
    /// sending (a lingering close, as careful servers do).
    Linger,
}

/// An upstream that refuses every upload with 413, ending as `how` says.
async fn refusing_upstream(how: Refusal) -> String {
    const TOO_LARGE: &[u8] = b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 9\r\n\
        connection: close\r\n\r\ntoo large";
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let Ok(byte) = conn.read_u8().await else {
                        return;
                    };
                    head.push(byte);
                }
                if conn.write_all(TOO_LARGE).await.is_err() {
                    return;
                }
                if matches!(how, Refusal::Linger) {
                    let _ = conn.shutdown().await;
                    let mut sink = [0u8; 65536];
                    while let Ok(1..) = conn.read(&mut sink).await {}
                }
            });
        }
    });
    url
}

#[tokio::test]
async fn an_upstream_refusing_an_upload_early_gets_its_answer_to_the_client() {
    // The upstream answers 413 while the client is still sending 8 MiB,
    // and goes away. Its answer, not a 502 for the failed upload, is what
    // the client reads, however the upstream ends the connection.
    const UPLOAD: usize = 8 << 20;
    const TRIES: usize = 5;
    for how in [Refusal::CloseUnread, Refusal::Linger] {
        let url = refusing_upstream(how).await;
        let gw = TestGateway::with(|c| c.upstream.url = url).await;
        for _ in 0..TRIES {
            let stream = TcpStream::connect(gw.addr).await.expect("connect");
            let (mut from_gateway, mut to_gateway) = stream.into_split();
            let upload = tokio::spawn(async move {
                let head = format!(
                    "POST /upload HTTP/1.1\r\nhost: app.test\r\ncontent-length: {UPLOAD}\r\n\r\n"
                );
                to_gateway.write_all(head.as_bytes()).await?;
                let chunk = vec![b'x'; 64 << 10];
                for _ in 0..UPLOAD / chunk.len() {
                    to_gateway.write_all(&chunk).await?;
                }
                Ok::<_, std::io::Error>(())
            });
            let mut reply = Vec::new();
            // The gateway closes once it has answered; reading stops there
            // (or at the reset that follows an unread upload).
            let _ = within(
                "the answer and the close",
                from_gateway.read_to_end(&mut reply),
            )
            .await;
            upload.abort();
            let reply = String::from_utf8_lossy(&reply);
            let (head, body) = split(&reply);
            assert!(head.starts_with("HTTP/1.1 413"), "{how:?}: {reply:?}");
            assert_eq!(body, "too large", "{how:?}");
        }
        assert_eq!(
            gw.metric("roomgate_proxy_requests_total{code=\"413\"}")
                .await,
            TRIES as f64,
            "{how:?}"
        );
        assert_eq!(
            gw.metric("roomgate_proxy_requests_total{code=\"502\"}")
                .await,
            0.0,
            "{how:?}"
        );
    }
}

#[tokio::test]
async fn a_target_that_names_no_http_host_gets_400_and_is_not_passed_on() {
    // The target's authority becomes the upstream's Host, so it is checked
    // as a received Host is; user information is an error (RFC 9110
    // §4.2.4); only http and https name HTTP hosts; and the authority form
    // is for CONNECT alone (RFC 9112 §3.2.3).
    let upstream = RawUpstream::start(OK).await;
    let gw = upstream.gateway().await;
    get_targets(
        &gw,
        "other.test",
        &[
            "http://target.test:99999/p",
            "http://me@target.test/p",
            "http://me:secret@target.test/p",
            "ftp://target.test/p",
            "target.test:80",
        ],
        400,
    )
    .await;
    assert!(upstream.heads().is_empty(), "{:?}", upstream.heads());
}

#[tokio::test]
async fn connection_cannot_name_host_away() {
    // `Host` names the target; HTTP/1.1 requires it (RFC 9112 §3.2), so a
    // client listing it in `Connection` does not take it from the
    // upstream, on a plain request or on a tunnelled upgrade.
    let upstream = RawUpstream::start(OK).await;
    let gw = upstream.gateway().await;
    for request in [
        &b"GET /vhost HTTP/1.1\r\nhost: tenant-a.example\r\nconnection: host\r\n\r\n"[..],
        b"GET /chat HTTP/1.1\r\nhost: tenant-a.example\r\nconnection: upgrade, host\r\n\
          upgrade: websocket\r\n\r\n",
    ] {
        let reply = exchange(&gw, request).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
    }
    let heads = upstream.heads();
    assert_eq!(heads.len(), 2, "{heads:?}");
    for head in &heads {
        assert_eq!(field(head, "host"), Some("tenant-a.example"), "{head}");
    }
}

#[tokio::test]
async fn an_http_1_0_upgrade_to_the_upstream_goes_as_a_plain_request() {
    // RFC 9110 §7.8: a server ignores `Upgrade` in an HTTP/1.0 request,
    // and no 101 may go to an HTTP/1.0 client (§15.2).
    let upstream = RawUpstream::start(OK).await;
    let gw = upstream.gateway().await;
    let reply = exchange(
        &gw,
        b"GET /chat HTTP/1.0\r\nhost: app.test\r\nconnection: upgrade\r\n\
          upgrade: websocket\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.0 200"), "{reply:?}");
    assert_eq!(split(&reply).1, "ok");
    let heads = upstream.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert_eq!(field(&heads[0], "upgrade"), None, "{}", heads[0]);
}

#[tokio::test]
async fn the_client_hears_the_gateways_http_version_not_the_upstreams() {
    // RFC 9110 §6.2: an intermediary sends its own version. An HTTP/1.0
    // answer without a length is framed anew for an HTTP/1.1 client.
    let upstream = RawUpstream::start_ending(
        b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nold",
        true,
    )
    .await;
    let gw = upstream.gateway().await;
    let (reply, mut stream) =
        exchange_on(&gw, b"GET /old HTTP/1.1\r\nhost: app.test\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
    let (head, body) = split(&reply);
    assert_eq!(
        field(head, "transfer-encoding"),
        Some("chunked"),
        "{reply:?}"
    );
    assert_eq!(body, "3\r\nold\r\n0\r\n\r\n", "{reply:?}");
    // The client's connection stays open for its next request.
    stream
        .write_all(b"GET /again HTTP/1.1\r\nhost: app.test\r\n\r\n")
        .await
        .expect("write");
    let again = within("a second answer", read_reply(&mut stream)).await;
    assert!(again.starts_with("HTTP/1.1 200"), "{again:?}");
}

#[tokio::test]
async fn a_content_length_list_reaches_the_client_as_one_number() {
    // hyper reads `5, 5` (and `005`) as 5 after checking that the values
    // agree; clients that read only plain numbers get that number.
    for answer in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\nconnection: close\r\n\r\nhello"[..],
        b"HTTP/1.1 200 OK\r\ncontent-length: 005\r\nconnection: close\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\
          connection: close\r\n\r\nhello",
    ] {
        let upstream = RawUpstream::start(answer).await;
        let gw = upstream.gateway().await;
        let reply = exchange(&gw, b"GET /len HTTP/1.1\r\nhost: app.test\r\n\r\n").await;
        let (head, body) = split(&reply);
        assert_eq!(field(head, "content-length"), Some("5"), "{reply:?}");
        assert_eq!(
            head.to_ascii_lowercase().matches("content-length").count(),
            1,
            "{reply:?}"
        );
        assert_eq!(body, "hello");
    }
}

#[tokio::test]
async fn below_a_base_path_dot_segments_get_400_and_options_star_goes_as_it_came() {
    // An upstream that resolves `/api/../admin` would serve what lies
    // outside the base path the gateway was given.
    let upstream = RawUpstream::start(OK).await;
    let url = format!("{}/api", upstream.url);
    let gw = TestGateway::with(|c| c.upstream.url = url).await;
    get_targets(
        &gw,
        "app.test",
        &[
            "/../admin",
            "/./../admin/x",
            "/a/..",
            "/%2e%2e/admin",
            "/%2E./admin",
            "/..%2fadmin",
            "/..\\admin",
            "/..;/admin",
            "/x/..;jsessionid=1/admin",
            "/%252e%252e/admin",
            "/%c0%ae%c0%ae/admin",
            "/%e0%80%ae%e0%80%ae/admin",
            "/%u002e%u002e/admin",
            "/%ef%bc%8e%ef%bc%8e/admin",
            "/..%3b/admin",
            "/..%20/admin",
            "/..%ef%bc%8fadmin",
            "http://app.test/../../admin",
        ],
        400,
    )
    .await;
    assert!(upstream.heads().is_empty(), "{:?}", upstream.heads());
    // Dots that are not whole segments are ordinary characters.
    get_targets(
        &gw,
        "app.test",
        &["/file.txt", "/a..b/.hidden", "/v1.2/...", "/.%20x/%20.."],
        200,
    )
    .await;
    let reply = exchange(&gw, b"OPTIONS * HTTP/1.1\r\nhost: app.test\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
    // The asterisk form is for OPTIONS alone (RFC 9112 §3.2.4).
    let reply = exchange(&gw, b"GET * HTTP/1.1\r\nhost: app.test\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
    let heads = upstream.heads();
    let lines: Vec<&str> = heads.iter().filter_map(|h| h.lines().next()).collect();
    assert_eq!(
        lines,
        [
            "GET /api/file.txt HTTP/1.1",
            "GET /api/a..b/.hidden HTTP/1.1",
            "GET /api/v1.2/... HTTP/1.1",
            "GET /api/.%20x/%20.. HTTP/1.1",
            "OPTIONS * HTTP/1.1",
        ]
    );
}

#[tokio::test]
async fn content_length_values_that_disagree_on_a_head_answer_are_dropped() {
    // hyper frames no body by them for HEAD, so it does not check that
    // they agree: the gateway passes on no length rather than pick one.
    let upstream =
        RawUpstream::start(b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\nconnection: close\r\n\r\n")
            .await;
    let gw = upstream.gateway().await;
    let reply = exchange(
        &gw,
        b"HEAD /len HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
    assert_eq!(field(split(&reply).0, "content-length"), None, "{reply:?}");
}

#[tokio::test]
async fn an_absolute_form_target_without_a_path_goes_below_the_base_path_as_slash() {
    let upstream = RawUpstream::start(OK).await;
    let url = format!("{}/api", upstream.url);
    let gw = TestGateway::with(|c| c.upstream.url = url).await;
    get_targets(&gw, "app.test", &["http://app.test?x=1", "/?x=1"], 200).await;
    let heads = upstream.heads();
    let lines: Vec<&str> = heads.iter().filter_map(|h| h.lines().next()).collect();
    assert_eq!(lines, ["GET /api/?x=1 HTTP/1.1", "GET /api/?x=1 HTTP/1.1"]);
}

#[tokio::test]
async fn a_426_keeps_the_upgrade_it_names() {
    // RFC 9110 §15.5.22: a 426 must say in `Upgrade` what to switch to.
    let upstream = RawUpstream::start(
        b"HTTP/1.1 426 Upgrade Required\r\nupgrade: TLS/1.3\r\nconnection: upgrade, close\r\n\
          content-length: 0\r\n\r\n",
    )
    .await;
    let gw = upstream.gateway().await;
    let reply = exchange(&gw, b"GET /old HTTP/1.1\r\nhost: app.test\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 426"), "{reply:?}");
    assert_eq!(
        field(split(&reply).0, "upgrade"),
        Some("TLS/1.3"),
        "{reply:?}"
    );
}

#[tokio::test]
async fn an_early_answer_reaches_the_client_when_the_reset_comes_before_it_is_read() {
    // The upstream reads the request head in one 8 KiB read (a buffered
    // reader takes some of the body with it), answers in two writes and
    // closes with the upload unread: its kernel resets the connection, and
    // the gateway's next write of the upload fails, often before the
    // answer has been read from the socket. The answer still reaches the
    // client.
    const UPLOAD: usize = 5 << 20;
    const TRIES: usize = 20;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => seen.extend_from_slice(&buf[..read]),
                    }
                }
                let _ = conn
                    .write_all(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\n")
                    .await;
                let _ = conn.write_all(b"too large").await;
            });
        }
    });
    let gw = TestGateway::with(|c| c.upstream.url = url).await;
    let mut statuses = Vec::new();
    for _ in 0..TRIES {
        let reply = upload_in_one_write(&gw, UPLOAD).await;
        statuses.push(reply.get(9..12).unwrap_or_default().to_string());
    }
    assert!(statuses.iter().all(|s| s == "413"), "{statuses:?}");
}

/// Sends a POST of `size` bytes in one write, as fast as the gateway takes
/// it, and returns what the gateway answers before it closes.
async fn upload_in_one_write(gw: &TestGateway, size: usize) -> String {
    let stream = TcpStream::connect(gw.addr).await.expect("connect");
    let (mut from_gateway, mut to_gateway) = stream.into_split();
    let upload = tokio::spawn(async move {
        let mut request =
            format!("POST /upload HTTP/1.1\r\nhost: app.test\r\ncontent-length: {size}\r\n\r\n")
                .into_bytes();
        request.resize(request.len() + size, b'x');
        to_gateway.write_all(&request).await
    });
    let mut reply = Vec::new();
    let _ = within(
        "the answer and the close",
        from_gateway.read_to_end(&mut reply),
    )
    .await;
    upload.abort();
    String::from_utf8_lossy(&reply).into_owned()
}

#[tokio::test]
async fn an_upload_the_upstream_resets_without_answering_gets_502() {
    // Writes after the reset are taken as written only until the end of
    // the connection is read: without an answer, the client gets 502.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = conn.read(&mut buf).await;
                let _ = conn.set_zero_linger();
            });
        }
    });
    let gw = TestGateway::with(|c| c.upstream.url = url).await;
    let reply = upload_in_one_write(&gw, 5 << 20).await;
    assert!(reply.starts_with("HTTP/1.1 502"), "{reply:?}");
}

#[tokio::test]
async fn a_request_length_with_leading_zeros_reaches_the_upstream_as_a_plain_number() {
    // `010` is ten bytes to the gateway; an upstream that read it as octal
    // would take the last two for the start of another request.
    let upstream = RawUpstream::start(OK).await;
    let gw = upstream.gateway().await;
    let reply = exchange(
        &gw,
        b"POST /upload HTTP/1.1\r\nhost: app.test\r\ncontent-length: 010\r\n\r\n0123456789",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
    let heads = upstream.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert_eq!(
        field(&heads[0], "content-length"),
        Some("10"),
        "{}",
        heads[0]
    );
}

#[tokio::test]
async fn a_request_with_a_length_and_chunked_coding_goes_on_chunked_without_the_length() {
    // RFC 9112 §6.3: the chunked coding wins. Passing the length on with it
    // would let an upstream that reads the length frame the body otherwise.
    let upstream = RawUpstream::start(OK).await;
    let gw = upstream.gateway().await;
    for method in ["POST", "GET"] {
        let request = format!(
            "{method} /both HTTP/1.1\r\nhost: app.test\r\ncontent-length: 5\r\n\
             transfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
        );
        let reply = exchange(&gw, request.as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{method}: {reply:?}");
    }
    let heads = upstream.heads();
    assert_eq!(heads.len(), 2, "{heads:?}");
    for head in &heads {
        assert_eq!(field(head, "transfer-encoding"), Some("chunked"), "{head}");
        assert_eq!(field(head, "content-length"), None, "{head}");
    }
}

#[tokio::test]
async fn an_absolute_form_target_without_a_path_reaches_the_upstream_as_slash() {
    // RFC 9112 §3.2.1: an empty path goes on as `/`, never as an empty
    // target. (§3.2.4 would have OPTIONS with no path and no query go on
    // as `*`, but the parsed URI no longer tells `http://h` from
    // `http://h/`; nginx sends `/` too.)
    let upstream = RawUpstream::start(OK).await;
    let gw = upstream.gateway().await;
    for (method, target) in [
        ("GET", "http://app.test?x=1"),
        ("GET", "http://app.test#f"),
        ("GET", "http://app.test:80?x#f"),
        ("GET", "http://app.test"),
        ("OPTIONS", "http://app.test"),
        ("OPTIONS", "http://app.test#f"),
        ("OPTIONS", "http://app.test?x"),
    ] {
        let request = format!("{method} {target} HTTP/1.1\r\nhost: app.test\r\n\r\n");
        let reply = exchange(&gw, request.as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 200 "), "{target}: {reply:?}");
    }
    let heads = upstream.heads();
    let lines: Vec<&str> = heads.iter().filter_map(|h| h.lines().next()).collect();
    assert_eq!(
        lines,
        [
            "GET /?x=1 HTTP/1.1",
            "GET / HTTP/1.1",
            "GET /?x HTTP/1.1",
            "GET / HTTP/1.1",
            "OPTIONS / HTTP/1.1",
            "OPTIONS / HTTP/1.1",
            "OPTIONS /?x HTTP/1.1",
        ]
    );
}
