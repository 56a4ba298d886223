//! The reverse proxy (SPEC §3) against a real upstream HTTP server: what is
//! forwarded, what is stripped, streaming both ways, error statuses,
//! connection reuse, WebSocket tunnels and the proxy metrics.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// A gateway proxying to `upstream`.
async fn gateway_for(upstream: &Upstream) -> TestGateway {
    let url = upstream.url();
    TestGateway::with(|c| c.upstream.url = url).await
}

/// A request as the upstream saw it, body included.
#[derive(Debug, Clone)]
struct Recorded {
    seen: Seen,
    body: Bytes,
}

/// An upstream that records each request (with its whole body) and answers
/// 201 with a header and a body of its own.
async fn recording_upstream() -> (Upstream, Arc<Mutex<Vec<Recorded>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    let upstream = Upstream::start(move |request: Request<Incoming>| {
        let sink = sink.clone();
        async move {
            let seen = Seen {
                method: request.method().to_string(),
                uri: request.uri().to_string(),
                headers: request.headers().clone(),
            };
            let body = request
                .into_body()
                .collect()
                .await
                .expect("request body")
                .to_bytes();
            sink.lock().unwrap().push(Recorded { seen, body });
            Response::builder()
                .status(201)
                .header("x-upstream", "yes")
                .header("connection", "x-upstream-private")
                .header("x-upstream-private", "hop")
                .header("keep-alive", "timeout=5")
                .body(full("created"))
                .unwrap()
        }
    })
    .await;
    (upstream, log)
}

fn only(log: &Arc<Mutex<Vec<Recorded>>>) -> Recorded {
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 1, "the upstream saw exactly one request");
    log[0].clone()
}

fn header<'a>(headers: &'a hyper::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().expect("ASCII header"))
}

#[tokio::test]
async fn forwards_method_path_query_headers_and_body() {
    let (upstream, log) = recording_upstream().await;
    let gw = gateway_for(&upstream).await;
    let request = Request::put("/api/items/7?sort=desc&tag=a%20b")
        .header("host", "app.example.test")
        .header("x-custom", "kept")
        .header("content-type", "application/json")
        .header("cookie", "session=abc")
        .body(full(r#"{"name":"lamp"}"#))
        .unwrap();
    let (status, headers, body) = http_request(gw.addr, request).await;

    assert_eq!(status, 201);
    assert_eq!(body, "created");
    assert_eq!(header(&headers, "x-upstream"), Some("yes"));

    let seen = only(&log);
    assert_eq!(seen.seen.method, "PUT");
    assert_eq!(seen.seen.uri, "/api/items/7?sort=desc&tag=a%20b");
    assert_eq!(seen.body, r#"{"name":"lamp"}"#);
    let h = &seen.seen.headers;
    assert_eq!(header(h, "x-custom"), Some("kept"));
    assert_eq!(header(h, "content-type"), Some("application/json"));
    assert_eq!(header(h, "cookie"), Some("session=abc"));
    assert_eq!(header(h, "host"), Some("app.example.test"), "Host is kept");
}

#[tokio::test]
async fn a_path_in_the_upstream_url_goes_in_front_of_every_proxied_path() {
    // The forward-auth path too (the recording upstream's 201 admits).
    let (upstream, log) = recording_upstream().await;
    let url = format!("{}/app/", upstream.url());
    let gw = TestGateway::with(|c| {
        c.upstream.url = url;
        c.auth.mode = roomgate::config::AuthMode::Upstream;
    })
    .await;
    let (status, _) = http_get(gw.addr, "/p?q=1").await;
    assert_eq!(status, 201);
    let _client = gw.client().await;
    let uris: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.seen.uri.clone())
        .collect();
    assert_eq!(uris, ["/app/p?q=1", "/app/auth/ws"]);
}

#[tokio::test]
async fn strips_hop_by_hop_headers_both_ways_and_sets_forwarded_headers() {
    let (upstream, log) = recording_upstream().await;
    let gw = gateway_for(&upstream).await;
    let request = Request::post("/submit")
        .header("host", "app.example.test")
        .header("connection", "keep-alive, X-Client-Private")
        .header("x-client-private", "hop")
        .header("keep-alive", "timeout=5")
        // Only `trailers` goes on: the gateway passes trailers on.
        .header("te", "gzip, trailers")
        .header("trailer", "x-checksum")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("upgrade", "h2c")
        .header("x-forwarded-for", "203.0.113.7")
        // Set by the gateway, whatever the client claims.
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "spoofed.example.test")
        .header("x-end-to-end", "kept")
        .body(full("payload"))
        .unwrap();
    let (status, headers, _) = http_request(gw.addr, request).await;
    assert_eq!(status, 201);

    let seen = only(&log);
    let h = &seen.seen.headers;
    for name in [
        "x-client-private",
        "keep-alive",
        "proxy-authorization",
        "upgrade",
    ] {
        assert!(
            !h.contains_key(name),
            "{name} must not reach the upstream: {h:?}"
        );
    }
    // The upstream's own `Connection` is about its link to the gateway.
    if let Some(connection) = header(h, "connection") {
        assert!(
            !connection.to_ascii_lowercase().contains("x-client-private"),
            "the client's Connection header is not forwarded: {connection}"
        );
    }
    assert_eq!(header(h, "x-end-to-end"), Some("kept"));
    assert_eq!(header(h, "te"), Some("trailers"));
    // The client's trailers are not passed on, nor is the header that
    // names them.
    assert!(!h.contains_key("trailer"), "{h:?}");
    assert_eq!(header(h, "host"), Some("app.example.test"));
    assert_eq!(
        header(h, "x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1"),
        "the client address is appended to the existing X-Forwarded-For"
    );
    assert_eq!(header(h, "x-forwarded-proto"), Some("http"));
    assert_eq!(header(h, "x-forwarded-host"), Some("app.example.test"));
    assert_eq!(seen.body, "payload");

    // And on the way back.
    assert_eq!(header(&headers, "x-upstream"), Some("yes"));
    assert!(!headers.contains_key("x-upstream-private"), "{headers:?}");
    assert!(!headers.contains_key("keep-alive"), "{headers:?}");
}

#[tokio::test]
async fn sets_forwarded_for_when_the_client_sent_none() {
    let (upstream, log) = recording_upstream().await;
    let gw = gateway_for(&upstream).await;
    let (status, _) = http_get(gw.addr, "/").await;
    assert_eq!(status, 201);
    let seen = only(&log);
    assert_eq!(
        header(&seen.seen.headers, "x-forwarded-for"),
        Some("127.0.0.1")
    );
    assert_eq!(
        header(&seen.seen.headers, "x-forwarded-host"),
        Some(gw.addr.to_string().as_str())
    );
}

#[tokio::test]
async fn an_http_1_0_request_without_host_reaches_the_upstream_with_its_host() {
    let (upstream, log) = recording_upstream().await;
    let gw = gateway_for(&upstream).await;
    let mut stream = within("connect", tokio::net::TcpStream::connect(gw.addr))
        .await
        .expect("connect");
    stream
        .write_all(b"GET /old HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let mut response = Vec::new();
    within(
        "the response, then the close of an HTTP/1.0 connection",
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut response),
    )
    .await
    .expect("read");
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.0 201"), "{response}");
    let seen = only(&log);
    let upstream_host = upstream.addr.to_string();
    assert_eq!(
        header(&seen.seen.headers, "host"),
        Some(upstream_host.as_str())
    );
    assert_eq!(
        header(&seen.seen.headers, "x-forwarded-host"),
        Some(upstream_host.as_str())
    );
}

#[tokio::test]
async fn upload_is_streamed_to_the_upstream() {
    const CHUNK: usize = 1024 * 1024;
    const CHUNKS: usize = 4;
    // The upstream reports when the first chunk's bytes have arrived, then
    // reads the rest and answers with the total it received.
    let (first_seen_tx, first_seen_rx) = oneshot::channel::<()>();
    let first_seen = Arc::new(Mutex::new(Some(first_seen_tx)));
    let upstream = Upstream::start(move |request: Request<Incoming>| {
        let first_seen = first_seen.clone();
        async move {
            let mut body = request.into_body();
            let mut total = 0usize;
            let mut ok = true;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    ok = false;
                    break;
                };
                if let Ok(data) = frame.into_data() {
                    ok &= data.iter().all(|b| *b == b'u');
                    total += data.len();
                }
                if total >= CHUNK
                    && let Some(tx) = first_seen.lock().unwrap().take()
                {
                    let _ = tx.send(());
                }
            }
            Response::new(full(format!("{total} {ok}")))
        }
    })
    .await;
    let gw = gateway_for(&upstream).await;

    let (tx, body) = body_channel();
    let request = Request::post("/upload")
        .header("host", "app.example.test")
        .header("content-length", (CHUNK * CHUNKS).to_string())
        .body(body)
        .unwrap();
    let response = tokio::spawn(send_request(gw.addr, request));

    let chunk = Bytes::from(vec![b'u'; CHUNK]);
    tx.send(chunk.clone()).await.expect("first chunk");
    // The rest is held back until the upstream has the first chunk: a proxy
    // that buffered the whole upload would never get there.
    within("the upstream to receive the first chunk", first_seen_rx)
        .await
        .expect("upstream saw the first chunk");
    for _ in 1..CHUNKS {
        within("the rest of the upload to be taken", tx.send(chunk.clone()))
            .await
            .expect("chunk");
    }
    drop(tx);

    let response = within("the upload's response", response)
        .await
        .expect("request task");
    assert_eq!(response.status(), 200);
    let body = within("the response body", response.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(body, format!("{} true", CHUNK * CHUNKS));
}

#[tokio::test]
async fn response_is_streamed_to_the_client() {
    streams_events(&[]).await;
}

#[tokio::test]
async fn a_request_offering_h2c_is_proxied_as_http1_and_streamed() {
    // curl --http2 and Java's HttpClient offer h2c on plain requests. The
    // offer is dropped like any hop-by-hop header; the request is not
    // taken for a tunnel, whose refused answer would be read whole.
    streams_events(&[
        ("connection", "Upgrade, HTTP2-Settings"),
        ("upgrade", "h2c"),
        ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
    ])
    .await;
}

/// A long second event: more than the gateway reads whole of an answer it
/// does not stream.
const SECOND_EVENT_LEN: usize = 2 * roomgate::proxy::MAX_REFUSAL_BODY;

/// `GET /events` with `extra` headers through a gateway to an upstream
/// that sends a first event, then waits for the test's go-ahead (given
/// only once the client has that event) before a long second one. The
/// upstream must see none of the `extra` headers.
async fn streams_events(extra: &[(&'static str, &'static str)]) {
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let release = Arc::new(Mutex::new(Some(release_rx)));
    let upstream = Upstream::start(move |request: Request<Incoming>| {
        let release = release.clone();
        async move {
            let release = release.lock().unwrap().take().expect("one request");
            let (tx, body) = body_channel();
            let hops = ["upgrade", "http2-settings"]
                .iter()
                .filter(|name| request.headers().contains_key(**name))
                .count();
            tokio::spawn(async move {
                let first = format!("data: first, {hops} hop-by-hop headers\n\n");
                let _ = tx.send(Bytes::from(first)).await;
                let _ = release.await;
                let second = format!("data: {}\n\n", "2".repeat(SECOND_EVENT_LEN));
                let _ = tx.send(Bytes::from(second)).await;
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .unwrap()
        }
    })
    .await;
    let gw = gateway_for(&upstream).await;

    let mut request = Request::get("/events").header("host", "app.example.test");
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    let response = send_request(gw.addr, request.body(empty()).unwrap()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(response.headers(), "content-type"),
        Some("text/event-stream")
    );
    let first = "data: first, 0 hop-by-hop headers\n\n";
    let mut body = response.into_body();
    let mut received = Vec::new();
    within("the first event before the upstream finishes", async {
        while received.len() < first.len() {
            let frame = body
                .frame()
                .await
                .expect("body still open")
                .expect("body frame");
            if let Ok(data) = frame.into_data() {
                received.extend_from_slice(&data);
            }
        }
    })
    .await;
    assert_eq!(String::from_utf8_lossy(&received), first);
    release_tx.send(()).expect("upstream waiting");
    let rest = within("the rest of the stream", body.collect())
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(rest.len(), SECOND_EVENT_LEN + "data: \n\n".len());
}

/// `GET /events` through the gateway at `addr`, which must answer 200.
async fn get_events(addr: SocketAddr) -> Response<Incoming> {
    let response = send_request(
        addr,
        Request::get("/events")
            .header("host", "app.example.test")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), 200);
    response
}

/// An upstream that streams `chunks` events, `gap` apart, then ends the
/// body; with `stall`, it stops after the first event and holds the
/// connection open until the gateway closes it, which it reports on
/// `closed`.
async fn event_stream_upstream(
    chunks: usize,
    gap: std::time::Duration,
    stall: bool,
) -> (Upstream, mpsc::UnboundedReceiver<()>) {
    let (closed_tx, closed) = mpsc::unbounded_channel();
    let upstream = Upstream::start(move |_request| {
        let closed_tx = closed_tx.clone();
        async move {
            let (tx, body) = body_channel();
            tokio::spawn(async move {
                for _ in 0..chunks {
                    if tx
                        .send(Bytes::from_static(b"data: tick\n\n"))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if stall {
                        // The receiver goes when the connection does.
                        tx.closed().await;
                        let _ = closed_tx.send(());
                        return;
                    }
                    tokio::time::sleep(gap).await;
                }
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .unwrap()
        }
    })
    .await;
    (upstream, closed)
}

/// A gateway whose upstream may pause at most a second.
async fn impatient_gateway(upstream: &Upstream) -> TestGateway {
    let url = upstream.url();
    TestGateway::with(|c| {
        c.upstream.url = url;
        c.upstream.timeout_secs = 1;
    })
    .await
}

#[tokio::test]
async fn a_response_that_stalls_mid_body_is_cut_after_the_upstream_timeout() {
    let (upstream, mut closed) = event_stream_upstream(2, std::time::Duration::ZERO, true).await;
    let gw = impatient_gateway(&upstream).await;
    let response = get_events(gw.addr).await;
    let mut body = response.into_body();
    let first = within("the first event", body.frame())
        .await
        .expect("a frame")
        .expect("the first event");
    assert_eq!(
        first.into_data().ok().as_deref(),
        Some(&b"data: tick\n\n"[..])
    );
    // Nothing more comes: the gateway gives up on the upstream and ends the
    // client's response as broken, not as complete.
    let end = within("the stalled response to be cut", body.frame()).await;
    assert!(
        matches!(end, Some(Err(_))),
        "a cut response, not a clean end: {end:?}"
    );
    within("the upstream connection to be closed", closed.recv())
        .await
        .expect("the upstream saw its connection closed");
}

#[tokio::test]
async fn a_response_that_keeps_flowing_is_not_cut_by_the_upstream_timeout() {
    // Longer than `timeout_secs` in all, with pauses far shorter than it
    // (so a busy machine cannot stretch one past it): an event stream is
    // cut only when it stands still.
    const CHUNKS: usize = 20;
    let (upstream, _closed) =
        event_stream_upstream(CHUNKS, std::time::Duration::from_millis(250), false).await;
    let url = upstream.url();
    let gw = TestGateway::with(|c| {
        c.upstream.url = url;
        c.upstream.timeout_secs = 3;
    })
    .await;
    let response = get_events(gw.addr).await;
    let body = within("the whole stream", response.into_body().collect())
        .await
        .expect("a complete body")
        .to_bytes();
    assert_eq!(body, b"data: tick\n\n".repeat(CHUNKS));
}

#[tokio::test]
async fn closed_upstream_port_gives_502() {
    let port = free_port();
    let gw = TestGateway::with(|c| c.upstream.url = format!("http://127.0.0.1:{port}")).await;
    let (status, body) = http_get(gw.addr, "/anything").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body, "upstream unreachable\n", "the cause is for the log");
    assert_eq!(
        gw.metric("roomgate_proxy_requests_total{code=\"502\"}")
            .await,
        1.0
    );
}

/// Whether a response head says the connection closes after it.
fn says_close(head: &str) -> bool {
    field(head, "connection").is_some_and(|value| value.eq_ignore_ascii_case("close"))
}

#[tokio::test]
async fn a_502_to_a_body_says_close_and_lingers_and_one_without_a_body_keeps_the_connection() {
    use tokio::io::AsyncReadExt;
    let port = free_port();
    let gw = TestGateway::with(|c| c.upstream.url = format!("http://127.0.0.1:{port}")).await;

    let mut plain = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    for _ in 0..2 {
        plain
            .write_all(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .expect("write");
        let (status, head, _) = read_response(&mut plain).await;
        assert_eq!(status, 502, "{head}");
        assert!(!says_close(&head), "no body, nothing unread: {head}");
    }

    // Larger than hyper reads with the head, and than the socket buffers
    // hold: the body stays unread, and is still coming when the answer
    // goes out.
    let body = vec![b'p'; 4_000_000];
    let head = format!(
        "POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut upload = sent_raw(gw.addr, &head).await;
    within("the upload's writes", upload.write_all(&body))
        .await
        .expect("the whole upload is taken");
    let (status, head, _) = read_response(&mut upload).await;
    assert_eq!(status, 502, "{head}");
    assert!(
        says_close(&head),
        "the unread body ends the connection: {head}"
    );
    // The gateway read and dropped the rest of the upload before closing
    // (a lingering close): the end of the connection is an end of stream,
    // not a reset, which could have destroyed the answer.
    let mut rest = Vec::new();
    within("the end of the connection", upload.read_to_end(&mut rest))
        .await
        .expect("an end of stream, not a reset");
    assert!(rest.is_empty(), "nothing follows the answer: {rest:?}");
}

#[tokio::test]
async fn upstream_slower_than_timeout_gives_504() {
    // The upstream answers only after the gateway has given up on it.
    let answered = Arc::new(Notify::new());
    let gate = answered.clone();
    let upstream = Upstream::start(move |_request| {
        let gate = gate.clone();
        async move {
            gate.notified().await;
            Response::new(full("too late"))
        }
    })
    .await;
    let url = upstream.url();
    let gw = TestGateway::with(|c| {
        c.upstream.url = url;
        c.upstream.timeout_secs = 1;
    })
    .await;
    let (status, body) = http_get(gw.addr, "/slow").await;
    answered.notify_waiters();
    assert_eq!(status, 504, "{body}");
    assert_eq!(
        gw.metric("roomgate_proxy_requests_total{code=\"504\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn an_upstream_that_cannot_take_a_connection_gives_504_after_the_connect_timeout() {
    // A listener that never accepts, with the smallest backlog: once its
    // accept queue is full the kernel drops further SYNs, so the gateway's
    // connect hangs until `connect_timeout_secs` (SPEC §3: upstream too
    // slow; 504, as nginx answers a connect timeout).
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(1).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let connected = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let fillers: Vec<_> = (0..16)
        .map(|_| {
            let connected = connected.clone();
            tokio::spawn(async move {
                if let Ok(stream) = tokio::net::TcpStream::connect(addr).await {
                    connected.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    std::future::pending::<()>().await;
                    drop(stream);
                }
            })
        })
        .collect();
    // The queue holds at most two; the other fillers' SYNs are dropped.
    eventually("the accept queue to fill", || {
        connected.load(std::sync::atomic::Ordering::SeqCst) >= 2
    })
    .await;
    let gw = TestGateway::with(|c| {
        c.upstream.url = format!("http://{addr}");
        c.upstream.connect_timeout_secs = 1;
        // Far beyond the test's own bound: only the connect timeout can
        // produce the answer in time.
        c.upstream.timeout_secs = 600;
    })
    .await;
    let (status, body) = http_get(gw.addr, "/anything").await;
    assert_eq!(status, 504, "{body}");
    for filler in fillers {
        filler.abort();
    }
    drop(listener);
}

#[tokio::test]
async fn no_upstream_configured_gives_404() {
    let gw = TestGateway::start(test_config()).await;
    let (status, _) = http_get(gw.addr, "/index.html").await;
    assert_eq!(status, 404);
    assert_eq!(
        gw.metric("roomgate_proxy_requests_total{code=\"404\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let upstream = Upstream::start(|request: Request<Incoming>| async move {
        Response::new(full(format!("you asked for {}", request.uri().path())))
    })
    .await;
    let gw = gateway_for(&upstream).await;
    for i in 0..5 {
        // A fresh client connection each time: reuse is the gateway's doing.
        let path = format!("/item/{i}");
        let (status, body) = http_get(gw.addr, &path).await;
        assert_eq!(
            (status, body.as_str()),
            (200, format!("you asked for {path}").as_str())
        );
    }
    assert_eq!(
        upstream.connections_accepted(),
        1,
        "the gateway keeps its upstream connection alive and reuses it"
    );
}

#[tokio::test]
async fn proxy_metrics_count_requests_by_code_and_time_them() {
    let upstream = Upstream::start(|request: Request<Incoming>| async move {
        let status = if request.uri().path() == "/missing" {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::OK
        };
        Response::builder().status(status).body(full("x")).unwrap()
    })
    .await;
    let gw = gateway_for(&upstream).await;
    for path in ["/a", "/b", "/missing"] {
        http_get(gw.addr, path).await;
    }
    assert_eq!(
        gw.metric("roomgate_proxy_requests_total{code=\"200\"}")
            .await,
        2.0
    );
    assert_eq!(
        gw.metric("roomgate_proxy_requests_total{code=\"404\"}")
            .await,
        1.0
    );
    assert_eq!(
        gw.metric("roomgate_proxy_request_duration_seconds_count")
            .await,
        3.0
    );
    // Gateway WebSocket traffic is not proxy traffic.
    let _client = gw.client().await;
    assert_eq!(
        gw.metric("roomgate_proxy_request_duration_seconds_count")
            .await,
        3.0
    );
}

/// An upstream that accepts WebSocket upgrades on any path, greets the
/// client with the path it was asked for, then echoes every message back
/// with a prefix, over a real tokio-tungstenite server socket.
async fn websocket_echo_upstream() -> Upstream {
    Upstream::start(|mut request: Request<Incoming>| async move {
        let key = request
            .headers()
            .get("sec-websocket-key")
            .cloned()
            .expect("the tunnel forwards Sec-WebSocket-Key");
        let is_upgrade = request
            .headers()
            .get("upgrade")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        if !is_upgrade {
            return Response::builder()
                .status(400)
                .body(full("no upgrade"))
                .unwrap();
        }
        let path = request.uri().to_string();
        let on_upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                hyper_util::rt::TokioIo::new(upgraded),
                Role::Server,
                None,
            )
            .await;
            if ws
                .send(Message::text(format!("upstream here, path {path}")))
                .await
                .is_err()
            {
                return;
            }
            while let Some(Ok(message)) = ws.next().await {
                let reply = match message {
                    Message::Text(text) => Message::text(format!("echo: {}", text.as_str())),
                    Message::Binary(data) => {
                        let mut data = data.to_vec();
                        data.reverse();
                        Message::binary(data)
                    }
                    Message::Close(_) => break,
                    _ => continue,
                };
                if ws.send(reply).await.is_err() {
                    break;
                }
            }
        });
        Response::builder()
            .status(101)
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
            .body(empty())
            .unwrap()
    })
    .await
}

type ClientWs =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_text(ws: &mut ClientWs) -> String {
    match within("a tunneled message", ws.next()).await {
        Some(Ok(Message::Text(text))) => text.as_str().to_string(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

#[tokio::test]
async fn websocket_upgrade_to_another_path_is_tunneled_to_the_upstream() {
    let upstream = websocket_echo_upstream().await;
    let gw = gateway_for(&upstream).await;
    let url = format!("ws://{}/app/socket?room=9", gw.addr);
    let (mut ws, response) = within("tunneled handshake", tokio_tungstenite::connect_async(url))
        .await
        .expect("the upstream's 101 reaches the client");
    assert_eq!(response.status(), 101);

    assert_eq!(
        next_text(&mut ws).await,
        "upstream here, path /app/socket?room=9"
    );
    ws.send(Message::text("hello")).await.expect("send");
    assert_eq!(next_text(&mut ws).await, "echo: hello");
    ws.send(Message::binary(vec![1u8, 2, 3]))
        .await
        .expect("send");
    match within("a tunneled binary message", ws.next()).await {
        Some(Ok(Message::Binary(data))) => assert_eq!(&data[..], &[3u8, 2, 1]),
        other => panic!("expected a binary message, got {other:?}"),
    }
    // The gateway did not treat it as one of its own sessions.
    assert_eq!(gw.metric("roomgate_connections_opened_total").await, 0.0);
    ws.close(None).await.expect("close");
}

#[tokio::test]
async fn what_a_client_sends_after_the_upstream_ends_its_half_of_a_tunnel_reaches_the_upstream() {
    use tokio::io::AsyncReadExt;
    let (got_tx, mut got_rx) = mpsc::channel::<Vec<u8>>(1);
    let upstream = Upstream::start(move |mut request: Request<Incoming>| {
        let got_tx = got_tx.clone();
        async move {
            let on_upgrade = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let mut io = hyper_util::rt::TokioIo::new(upgraded);
                // The upstream says all it has to say at once, and reads on.
                let _ = io.shutdown().await;
                let mut got = Vec::new();
                let _ = within("the client's end", io.read_to_end(&mut got)).await;
                let _ = got_tx.send(got).await;
            });
            Response::builder()
                .status(101)
                .header("upgrade", "foo")
                .header("connection", "upgrade")
                .body(empty())
                .unwrap()
        }
    })
    .await;
    let gw = gateway_for(&upstream).await;
    let mut client = sent_raw(
        gw.addr,
        "GET /t HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: foo\r\n\r\n",
    )
    .await;
    let (status, head) = read_response_head(&mut client).await;
    assert_eq!(status, 101, "{head}");
    let mut rest = Vec::new();
    within("the upstream's end", client.read_to_end(&mut rest))
        .await
        .expect("an end of stream");
    client
        .write_all(&[b'x'; 10_000])
        .await
        .expect("write after the end");
    client.shutdown().await.expect("the client's end");
    let got = within("what the upstream read", got_rx.recv())
        .await
        .expect("the upstream's report");
    assert_eq!(
        got.len(),
        10_000,
        "every byte sent after the upstream's end"
    );
}

#[tokio::test]
async fn tunnel_carries_many_messages_in_both_directions() {
    let upstream = websocket_echo_upstream().await;
    let gw = gateway_for(&upstream).await;
    let (ws, _) = within(
        "tunneled handshake",
        tokio_tungstenite::connect_async(format!("ws://{}/feed", gw.addr)),
    )
    .await
    .expect("handshake");
    let (mut write, mut read) = ws.split();
    let (done_tx, mut done_rx) = mpsc::channel::<Vec<String>>(1);
    tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 201 {
            match read.next().await {
                Some(Ok(Message::Text(text))) => got.push(text.as_str().to_string()),
                Some(Ok(_)) => continue,
                _ => break,
            }
        }
        let _ = done_tx.send(got).await;
    });
    for i in 0..200 {
        write
            .send(Message::text(format!("m{i}")))
            .await
            .expect("send");
    }
    let got = within("all echoes", done_rx.recv())
        .await
        .expect("reader finished");
    assert_eq!(got.len(), 201, "greeting and 200 echoes: {got:?}");
    for (i, text) in got[1..].iter().enumerate() {
        assert_eq!(text, &format!("echo: m{i}"));
    }
}

#[tokio::test]
async fn upgrade_refused_by_the_upstream_reaches_the_client_as_is() {
    let upstream = Upstream::start(|_request| async move {
        Response::builder()
            .status(403)
            .body(full("no sockets for you"))
            .unwrap()
    })
    .await;
    let gw = gateway_for(&upstream).await;
    match within(
        "the refused tunnel",
        tokio_tungstenite::connect_async(format!("ws://{}/app/socket", gw.addr)),
    )
    .await
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
            assert_eq!(response.body().as_deref(), Some(&b"no sockets for you"[..]));
        }
        Err(other) => panic!("expected the upstream's 403, got {other}"),
        Ok(_) => panic!("the upstream refused, yet the upgrade went through"),
    }
}

/// Reads a request head on a raw upstream socket, byte by byte so nothing
/// after it is consumed; `None` when the connection ends first.
async fn read_request_head(stream: &mut tokio::net::TcpStream) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.ok()?);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

#[tokio::test]
async fn an_upgrade_refusal_whose_body_stalls_gets_504() {
    // The upstream refuses the upgrade, promises a body of 100 bytes and
    // sends 7; it then holds the connection open until the test ends.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream_addr = listener.local_addr().expect("addr");
    let (_hold, held) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let _ = read_request_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 100\r\n\r\npartial")
            .await;
        let _ = held.await;
    });
    let url = format!("http://{upstream_addr}");
    let gw = TestGateway::with(|c| {
        c.upstream.url = url;
        c.upstream.timeout_secs = 1;
    })
    .await;
    let status = refused_upgrade_status(gw.addr).await;
    assert_eq!(
        status, 504,
        "a refusal that never ends is the upstream being too slow"
    );
}

/// Asks the gateway at `addr` for a WebSocket on a path of the upstream's
/// and returns the status of the whole answer, which must not be 101.
async fn refused_upgrade_status(addr: SocketAddr) -> u16 {
    let mut client = within("connect", tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect");
    client
        .write_all(raw_upgrade_request(addr, "/app/socket", "").as_bytes())
        .await
        .expect("write");
    read_response(&mut client).await.0
}

#[tokio::test]
async fn an_upgrade_refusal_over_64_kib_gets_502() {
    // A refusal is passed on whole, up to the bound forward auth's
    // refusals have too; past it the answer is not one a client waiting
    // for a WebSocket can use.
    let upstream = Upstream::start(|_request| async move {
        Response::builder()
            .status(403)
            .body(full(vec![b'x'; 64 * 1024 + 1]))
            .unwrap()
    })
    .await;
    let gw = gateway_for(&upstream).await;
    let status = refused_upgrade_status(gw.addr).await;
    assert_eq!(status, 502);
}

#[tokio::test]
async fn upgrade_to_an_unreachable_upstream_gets_502() {
    let port = free_port();
    let gw = TestGateway::with(|c| c.upstream.url = format!("http://127.0.0.1:{port}")).await;
    match within(
        "the tunnel attempt",
        tokio_tungstenite::connect_async(format!("ws://{}/app/socket", gw.addr)),
    )
    .await
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 502);
        }
        Err(other) => panic!("expected 502, got {other}"),
        Ok(_) => panic!("an upgrade to nowhere went through"),
    }
}

#[tokio::test]
async fn upload_with_expect_100_continue_is_answered_and_forwarded() {
    // curl sends `Expect: 100-continue` for large uploads and waits for the
    // interim response before sending the body.
    let (upstream, log) = recording_upstream().await;
    let gw = gateway_for(&upstream).await;
    let mut stream = within("connect", tokio::net::TcpStream::connect(gw.addr))
        .await
        .expect("connect");
    let body = "z".repeat(10_000);
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: app.example.test\r\nContent-Length: {}\r\n\
         Expect: 100-continue\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write head");
    let (status, interim) = read_response_head(&mut stream).await;
    assert_eq!(status, 100, "{interim}");
    stream.write_all(body.as_bytes()).await.expect("write body");
    let (status, head) = read_response_head(&mut stream).await;
    assert_eq!(status, 201, "{head}");
    let seen = only(&log);
    assert_eq!(seen.body.len(), body.len());
}

/// An upstream that reads the whole body and answers with its size.
async fn counting_upstream() -> Upstream {
    Upstream::start(|request: Request<Incoming>| async move {
        let mut body = request.into_body();
        let mut total = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                total += data.len();
            }
        }
        Response::new(full(total.to_string()))
    })
    .await
}

#[tokio::test]
async fn an_upload_that_keeps_flowing_is_not_cut_by_the_upstream_timeout() {
    // The upload takes longer than `timeout_secs` in all, but the upstream
    // never waits long for anything (pauses far shorter than the timeout):
    // it is not too slow, and a large upload must not get 504 for merely
    // being large.
    let upstream = counting_upstream().await;
    let url = upstream.url();
    let gw = TestGateway::with(|c| {
        c.upstream.url = url;
        c.upstream.timeout_secs = 3;
    })
    .await;
    let (tx, response) = start_upload(gw.addr, None);
    const CHUNKS: usize = 20;
    for _ in 0..CHUNKS {
        within(
            "a chunk to be taken",
            tx.send(Bytes::from(vec![b'p'; 1000])),
        )
        .await
        .expect("chunk");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    drop(tx);
    let response = within("the response", response).await.expect("task");
    assert_eq!(response.status(), 200);
    let body = within("the body", response.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(body, (CHUNKS * 1000).to_string());
}

#[tokio::test]
async fn an_upstream_that_stops_taking_the_upload_gets_504() {
    // The upstream reads a little, then neither reads nor answers.
    let stalled = Arc::new(Notify::new());
    let gate = stalled.clone();
    let upstream = Upstream::start(move |request: Request<Incoming>| {
        let gate = gate.clone();
        async move {
            let mut body = request.into_body();
            let _ = body.frame().await;
            gate.notified().await;
            Response::new(full("too late"))
        }
    })
    .await;
    let url = upstream.url();
    let gw = TestGateway::with(|c| {
        c.upstream.url = url;
        c.upstream.timeout_secs = 1;
    })
    .await;
    let (tx, response) = start_upload(gw.addr, None);
    // Keep offering data until the gateway gives up on the upstream.
    let feeder = tokio::spawn(async move {
        let chunk = Bytes::from(vec![b's'; 256 * 1024]);
        while tx.send(chunk.clone()).await.is_ok() {}
    });
    let response = within("the 504", response).await.expect("task");
    stalled.notify_waiters();
    assert_eq!(response.status(), 504);
    feeder.abort();
}

#[tokio::test]
async fn an_upload_the_upstream_answers_early_still_reaches_it_whole() {
    // HTTP/1.1 lets a server answer before it has read the request body
    // and read it afterwards. The exchange ends when both messages are
    // complete: until then the upstream connection is busy, and parking it
    // in the pool would let the pool close it, cutting the upload.
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 16;
    let (total_tx, mut total_rx) = mpsc::unbounded_channel::<usize>();
    let upstream = Upstream::start(move |request: Request<Incoming>| {
        let total_tx = total_tx.clone();
        async move {
            tokio::spawn(async move {
                // A body known to be complete is taken as such: once the
                // response is out, hyper ends it no other way until the
                // connection's next request.
                let mut body = request.into_body();
                let mut total = 0;
                while !hyper::body::Body::is_end_stream(&body) {
                    match body.frame().await {
                        Some(Ok(frame)) => total += frame.data_ref().map_or(0, Bytes::len),
                        _ => break,
                    }
                }
                let _ = total_tx.send(total);
            });
            Response::new(full("ok"))
        }
    })
    .await;
    let gw = gateway_for(&upstream).await;
    let (tx, response) = start_upload(gw.addr, Some(CHUNK * CHUNKS));
    // Long enough for the pool's once-a-second sweep to come by.
    let mut sent = 0;
    for _ in 0..CHUNKS {
        let chunk = Bytes::from(vec![b'e'; CHUNK]);
        if within("a chunk to be taken", tx.send(chunk)).await.is_err() {
            break;
        }
        sent += CHUNK;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    drop(tx);
    let total = within("the upstream to read the upload", total_rx.recv())
        .await
        .expect("a total");
    assert_eq!(
        (sent, total),
        (CHUNK * CHUNKS, CHUNK * CHUNKS),
        "(sent, received)"
    );
    let response = within("the response", response).await.expect("task");
    assert_eq!(response.status(), 200);
    // Once the upload is written, the connection is idle and reused.
    let (status, _) = http_get(gw.addr, "/next").await;
    assert_eq!(status, 200);
    assert_eq!(upstream.connections_accepted(), 1);
}

/// Starts a `POST /upload` whose body the test then feeds through the
/// returned sender, chunked unless `length` is given; the task yields
/// the response.
fn start_upload(
    addr: SocketAddr,
    length: Option<usize>,
) -> (
    mpsc::Sender<Bytes>,
    tokio::task::JoinHandle<hyper::Response<Incoming>>,
) {
    start_upload_with(addr, length, &[])
}

/// [`start_upload`] with more headers.
fn start_upload_with(
    addr: SocketAddr,
    length: Option<usize>,
    headers: &[(&str, &str)],
) -> (
    mpsc::Sender<Bytes>,
    tokio::task::JoinHandle<hyper::Response<Incoming>>,
) {
    let (tx, body) = body_channel();
    let mut request = Request::post("/upload").header("host", "app.example.test");
    if let Some(length) = length {
        request = request.header("content-length", length);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(body).expect("request");
    (tx, tokio::spawn(send_request(addr, request)))
}

/// An upstream that answers `ok` at once and reads the request body
/// afterwards; for each request it reports the bytes it read and whether
/// the body broke off (`true`) rather than ended.
async fn early_answering_upstream() -> (Upstream, mpsc::UnboundedReceiver<(usize, bool)>) {
    let (end_tx, end_rx) = mpsc::unbounded_channel::<(usize, bool)>();
    let upstream = Upstream::start(move |request: Request<Incoming>| {
        let end_tx = end_tx.clone();
        async move {
            tokio::spawn(async move {
                let mut body = request.into_body();
                let mut total = 0;
                let broken = loop {
                    match body.frame().await {
                        Some(Ok(frame)) => total += frame.data_ref().map_or(0, Bytes::len),
                        Some(Err(_)) => break true,
                        None => break false,
                    }
                };
                let _ = end_tx.send((total, broken));
            });
            Response::new(full("ok"))
        }
    })
    .await;
    (upstream, end_rx)
}

#[tokio::test]
async fn an_upload_cut_by_a_forced_shutdown_does_not_reach_the_upstream_as_complete() {
    // The upstream has answered and still reads a chunked upload when the
    // gateway stops and its grace runs out. The upload is cut: the
    // upstream must see it broken off, never ended as if it were whole.
    let (upstream, mut end_rx) = early_answering_upstream().await;
    let url = upstream.url();
    let mut gw = TestGateway::with(|c| {
        c.upstream.url = url;
        c.server.shutdown_grace_secs = 1;
    })
    .await;
    let (tx, response) = start_upload(gw.addr, None);
    within(
        "the first chunk to be taken",
        tx.send(Bytes::from_static(b"part one")),
    )
    .await
    .expect("sent");
    let response = within("the early answer", response).await.expect("task");
    assert_eq!(response.status(), 200);
    // Read to the end: the exchange's response is over, its upload is not.
    let answer = within("the answer's body", response.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(answer, "ok");
    within(
        "the second chunk to be taken",
        tx.send(Bytes::from_static(b"part two")),
    )
    .await
    .expect("sent");
    gw.begin_stop();
    gw.wait_stopped().await;
    let (total, broken) = within("the upstream to see the upload end", end_rx.recv())
        .await
        .expect("an end");
    assert!(broken, "the upload ended cleanly after {total} bytes");
    drop(tx);
}

#[tokio::test]
async fn an_upload_that_stalls_after_an_early_answer_is_given_up_after_the_timeout() {
    // Once the response is over, the upload still holds an upstream
    // connection; standing still for `timeout_secs`, it lets it go.
    stalled_upload_after_an_early_answer(&[]).await;
}

#[tokio::test]
async fn an_upgrade_request_with_a_body_goes_as_a_plain_request_with_its_bounds() {
    // Not a tunnel: its upload gets the bound of any other, rather than
    // hold a client and an upstream connection for as long as it stalls.
    stalled_upload_after_an_early_answer(&[("connection", "upgrade"), ("upgrade", "foo")]).await;
}

/// Sends an upload with `headers` that stalls after the upstream's early
/// answer, and checks that the upstream connection is given up after the
/// timeout.
async fn stalled_upload_after_an_early_answer(headers: &[(&str, &str)]) {
    let (upstream, mut end_rx) = early_answering_upstream().await;
    let url = upstream.url();
    let gw = TestGateway::with(|c| {
        c.upstream.url = url;
        c.upstream.timeout_secs = 1;
    })
    .await;
    // Before anything is sent: the upload's last move, which the timeout
    // runs from, comes after this.
    let started = std::time::Instant::now();
    let (tx, response) = start_upload_with(gw.addr, Some(1000), headers);
    within("a chunk to be taken", tx.send(Bytes::from(vec![b's'; 100])))
        .await
        .expect("chunk");
    let response = within("the response", response).await.expect("task");
    assert_eq!(response.status(), 200);
    let (total, broken) = within("the upstream connection to end", end_rx.recv())
        .await
        .expect("an end");
    assert_eq!((total, broken), (100, true));
    let given_up = started.elapsed();
    assert!(
        given_up >= std::time::Duration::from_secs(1),
        "given up after {given_up:?}, before the timeout"
    );
    drop(tx);
}

/// Reads one request head from `stream` and answers it with the body
/// `connection <n>`, so a test can tell its upstream connections apart.
async fn answer_as_connection(stream: &mut tokio::net::TcpStream, n: usize) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::io::AsyncReadExt::read(stream, &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(read) => head.extend_from_slice(&buf[..read]),
        }
    }
    let body = format!("connection {n}");
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
}

/// An upstream that answers one request per connection and, when told to,
/// closes that connection without having said so (no `Connection: close`),
/// as an upstream whose keep-alive timeout ran out would. Reports each
/// close once the gateway has closed its end too.
async fn closing_upstream() -> (
    SocketAddr,
    mpsc::UnboundedSender<()>,
    mpsc::UnboundedReceiver<usize>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (close_tx, mut close_rx) = mpsc::unbounded_channel::<()>();
    let (closed_tx, closed_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for n in 0.. {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            answer_as_connection(&mut stream, n).await;
            let mut buf = [0u8; 1024];
            if close_rx.recv().await.is_none() {
                return;
            }
            let _ = stream.shutdown().await;
            while let Ok(1..) = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await {}
            drop(stream);
            let _ = closed_tx.send(n);
        }
    });
    (addr, close_tx, closed_rx)
}

/// `TCP_FIN_WAIT1`: a FIN sent and not yet acknowledged.
const TCP_FIN_WAIT1: u8 = 4;

/// An upstream that answers one request per connection and, when told to,
/// half-closes that connection (without having said so in the response)
/// and keeps reading it. It reports each half-close once the gateway's
/// side has acknowledged the FIN, and, when the gateway has closed its end
/// too, how many bytes arrived on the connection after the half-close.
async fn half_closing_upstream() -> (
    SocketAddr,
    mpsc::UnboundedSender<()>,
    mpsc::UnboundedReceiver<usize>,
    mpsc::UnboundedReceiver<(usize, Vec<u8>)>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (close_tx, mut close_rx) = mpsc::unbounded_channel::<()>();
    let (half_closed_tx, half_closed_rx) = mpsc::unbounded_channel();
    let (closed_tx, closed_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for n in 0.. {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            answer_as_connection(&mut stream, n).await;
            if close_rx.recv().await.is_none() {
                return;
            }
            let _ = stream.shutdown().await;
            // Once the FIN is acknowledged, the gateway's kernel has it: the
            // connection reads as ended there before any later event.
            while tcp_info(&stream).tcpi_state == TCP_FIN_WAIT1 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let _ = half_closed_tx.send(n);
            let closed = closed_tx.clone();
            tokio::spawn(async move {
                let mut after = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut after).await;
                let _ = closed.send((n, after));
            });
        }
    });
    (addr, close_tx, half_closed_rx, closed_rx)
}

#[tokio::test]
async fn an_idle_upstream_connection_the_upstream_closed_is_not_reused() {
    // The upstream half-closes each idle connection and keeps reading it.
    // A request the gateway wrote on one would arrive there (and the
    // gateway, finding no response, would send it again on a new
    // connection, so the responses alone cannot tell).
    const ROUNDS: usize = 4;
    let (addr, close, mut half_closed, mut closed) = half_closing_upstream().await;
    let gw = TestGateway::with(|c| c.upstream.url = format!("http://{addr}")).await;
    for n in 0..ROUNDS {
        let (status, body) = http_get(gw.addr, "/").await;
        assert_eq!(
            (status, body.as_str()),
            (200, format!("connection {n}").as_str())
        );
        // The gateway now holds the connection as idle; the upstream ends it.
        close.send(()).expect("upstream running");
        let seen = within(
            "the upstream to half-close its connection",
            half_closed.recv(),
        )
        .await;
        assert_eq!(seen, Some(n));
    }
    // Each connection ends when the gateway closes it (found closed at a
    // checkout or by its sweep): nothing may have been written on it.
    let mut ends = Vec::new();
    for _ in 0..ROUNDS {
        let end = within(
            "the gateway to close a half-closed connection",
            closed.recv(),
        )
        .await
        .expect("upstream running");
        ends.push(end);
    }
    ends.sort();
    let expected: Vec<(usize, Vec<u8>)> = (0..ROUNDS).map(|n| (n, Vec::new())).collect();
    assert_eq!(
        ends,
        expected,
        "bytes written on connections after the upstream closed them: {:?}",
        ends.iter()
            .map(|(n, after)| (n, String::from_utf8_lossy(after)))
            .collect::<Vec<_>>()
    );
}

/// An upstream whose connections each answer one request and then close
/// as the next one arrives, without answering it: an upstream that closed
/// an idle connection just as the gateway sent a request on it. Reports
/// each request head it reads.
async fn closing_on_second_request_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (heads_tx, heads_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let heads = heads_tx.clone();
            tokio::spawn(async move {
                let Some(head) = read_request_head(&mut stream).await else {
                    return;
                };
                let answer: &[u8] = if head.starts_with("HEAD ") {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                };
                let _ = heads.send(head);
                if stream.write_all(answer).await.is_err() {
                    return;
                }
                if let Some(head) = read_request_head(&mut stream).await {
                    let _ = heads.send(head);
                }
            });
        }
    });
    (addr, heads_rx)
}

#[tokio::test]
async fn a_safe_request_on_a_connection_closed_as_it_went_out_is_sent_again() {
    // nginx (`proxy_next_upstream error`) and Go's Transport do the same
    // for requests that may be sent twice; a POST is never sent again.
    let (addr, mut heads) = closing_on_second_request_upstream().await;
    let gw = TestGateway::with(|c| c.upstream.url = format!("http://{addr}")).await;
    let mut seen = Vec::new();
    let request = |method: &'static str| {
        http_request(
            gw.addr,
            Request::builder()
                .method(method)
                .uri("/r")
                .header("host", "app.example.test")
                .body(empty())
                .unwrap(),
        )
    };
    let (status, _, _) = request("GET").await;
    assert_eq!(status, 200, "the first request");
    seen.push(within("a request head", heads.recv()).await.expect("head"));
    // Each request finds the connection the one before it left idle.
    for method in ["GET", "HEAD", "OPTIONS"] {
        // Idle long enough for an upstream's keep-alive timeout to matter.
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        let (status, _, body) = request(method).await;
        assert_eq!(status, 200, "{method} sent again: {body:?}");
        for _ in 0..2 {
            seen.push(within("a request head", heads.recv()).await.expect("head"));
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let (status, _, _) = request("POST").await;
    assert_eq!(status, 502, "a POST that went out is not sent again");
    seen.push(within("a request head", heads.recv()).await.expect("head"));
    tokio::time::sleep(QUIET).await;
    assert!(heads.try_recv().is_err(), "the POST went out once");
    let methods: Vec<&str> = seen
        .iter()
        .map(|head| head.split(' ').next().unwrap_or_default())
        .collect();
    assert_eq!(
        methods,
        [
            "GET", "GET", "GET", "HEAD", "HEAD", "OPTIONS", "OPTIONS", "POST"
        ]
    );
}

#[tokio::test]
async fn an_idle_upstream_connection_the_upstream_closed_is_closed_without_traffic() {
    // No request follows, so only the pool's sweep can notice the close:
    // without it the gateway's end would sit half-closed (CLOSE_WAIT).
    let (addr, close, mut closed) = closing_upstream().await;
    let gw = TestGateway::with(|c| c.upstream.url = format!("http://{addr}")).await;
    let (status, body) = http_get(gw.addr, "/").await;
    assert_eq!((status, body.as_str()), (200, "connection 0"));
    close.send(()).expect("upstream running");
    let seen = within("the gateway to close the connection", closed.recv()).await;
    assert_eq!(seen, Some(0));
}

#[tokio::test]
async fn a_response_the_client_abandons_does_not_leak_into_the_next_one() {
    // `/stream` sends one chunk and then holds the rest back until the
    // gateway gives up the connection; `/` answers at once.
    let (gone_tx, gone_rx) = oneshot::channel::<()>();
    let gone = Arc::new(Mutex::new(Some(gone_tx)));
    let upstream = Upstream::start(move |request: Request<Incoming>| {
        let gone = gone.clone();
        async move {
            if request.uri().path() != "/stream" {
                return Response::new(full("short and complete"));
            }
            let (tx, body) = body_channel();
            tokio::spawn(async move {
                let _ = tx
                    .send(Bytes::from_static(b"the start of a long body"))
                    .await;
                tx.closed().await;
                if let Some(gone) = gone.lock().unwrap().take() {
                    let _ = gone.send(());
                }
            });
            Response::new(body)
        }
    })
    .await;
    let gw = gateway_for(&upstream).await;

    let response = send_request(
        gw.addr,
        Request::get("/stream")
            .header("host", "app.example.test")
            .body(empty())
            .unwrap(),
    )
    .await;
    let mut body = response.into_body();
    let first = within("the first chunk", body.frame())
        .await
        .expect("body open")
        .expect("frame");
    assert_eq!(
        first.into_data().ok(),
        Some(Bytes::from_static(b"the start of a long body"))
    );
    drop(body);
    within(
        "the gateway closes the upstream connection of the abandoned response",
        gone_rx,
    )
    .await
    .expect("signal");

    let (status, text) = http_get(gw.addr, "/").await;
    assert_eq!((status, text.as_str()), (200, "short and complete"));
    assert_eq!(
        upstream.connections_accepted(),
        2,
        "the half-read connection is closed, not pooled"
    );
}

#[tokio::test]
async fn connections_that_carried_bodiless_responses_are_reused() {
    let upstream = Upstream::start(|request: Request<Incoming>| async move {
        match request.uri().path() {
            "/none" => Response::builder().status(204).body(empty()).unwrap(),
            _ => Response::new(full("x")),
        }
    })
    .await;
    let gw = gateway_for(&upstream).await;
    let head = |path: &str| {
        Request::head(path)
            .header("host", "app.example.test")
            .body(empty())
            .unwrap()
    };
    for _ in 0..3 {
        assert_eq!(http_request(gw.addr, head("/")).await.0, 200);
        assert_eq!(http_get(gw.addr, "/none").await.0, 204);
        assert_eq!(http_get(gw.addr, "/").await, (200, "x".to_string()));
    }
    assert_eq!(
        upstream.connections_accepted(),
        1,
        "HEAD and 204 responses leave the connection reusable"
    );
}

/// A client connection that stops sending, whether between requests or in
/// the middle of a request head, is closed after the 30 s header-read
/// timeout, and not before it. On a paused clock: the runtime moves time
/// on whenever every task is waiting, so the test does not take 30 s.
#[tokio::test(start_paused = true)]
async fn a_client_that_stops_sending_is_closed_after_the_header_timeout() {
    use tokio::io::AsyncReadExt;
    use tokio::time::{Duration, Instant, timeout};

    const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
    // Virtual time, far beyond the timeout: only reached if it never fires.
    const BOUND: Duration = Duration::from_secs(600);

    // No upstream: the gateway answers 404 itself, so nothing is in flight
    // on the network while the clock is moved on.
    let gw = TestGateway::with(|_| {}).await;

    // Between requests: one complete request and its answer, then silence.
    let mut idle = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    idle.write_all(b"GET /a HTTP/1.1\r\nhost: app.example.test\r\n\r\n")
        .await
        .expect("request written");
    // Mid-head: a request line and no end to the headers.
    let mut partial = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    partial
        .write_all(b"GET /b HTTP/1.1\r\nhost: app.exa")
        .await
        .expect("partial head written");
    let start = Instant::now();

    let mut answer = Vec::new();
    timeout(BOUND, async {
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 512];
            let n = idle.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed before answering");
            answer.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("the first request is answered");
    assert!(answer.starts_with(b"HTTP/1.1 404"), "{answer:?}");

    for (name, stream) in [("idle", &mut idle), ("mid-head", &mut partial)] {
        let mut rest = Vec::new();
        timeout(BOUND, stream.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("the {name} connection is never closed"))
            .ok();
        let after = start.elapsed();
        assert!(
            after >= HEADER_TIMEOUT,
            "the {name} connection was closed after {after:?}"
        );
        assert!(
            !rest.starts_with(b"HTTP/1.1 404"),
            "the {name} connection got a second answer"
        );
    }
}

/// A client that asks for a large response and stops reading it is closed
/// once writes to it have made no progress for 60 s (nginx's
/// `send_timeout`), and so is the upstream connection behind it. On a
/// paused clock, as above.
#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_is_closed_after_the_write_stall_bound() {
    use tokio::io::AsyncReadExt;
    use tokio::time::{Duration, Instant, timeout};

    const WRITE_STALL: Duration = Duration::from_secs(60);
    const BOUND: Duration = Duration::from_secs(600);
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 64;

    /// Reports when the upstream drops the response body: its connection
    /// to the gateway has gone.
    struct Dropped(Option<oneshot::Sender<()>>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(());
            }
        }
    }

    let (gone_tx, gone_rx) = oneshot::channel();
    let gone = Arc::new(Mutex::new(Some(gone_tx)));
    let upstream = Upstream::start(move |_: Request<Incoming>| {
        let guard = Dropped(gone.lock().unwrap().take());
        async move {
            let chunks = futures_util::stream::iter(0..CHUNKS).map(move |_| {
                let _held = &guard;
                Ok(hyper::body::Frame::data(Bytes::from(vec![b'x'; CHUNK])))
            });
            Response::new(BodyExt::boxed(http_body_util::StreamBody::new(chunks)))
        }
    })
    .await;
    let gw = gateway_for(&upstream).await;
    let mut client = sent_raw(
        gw.addr,
        "GET /large HTTP/1.1\r\nhost: app.example.test\r\n\r\n",
    )
    .await;
    let start = Instant::now();

    timeout(BOUND, gone_rx)
        .await
        .expect("the upstream connection is closed")
        .expect("reported");
    let after = start.elapsed();
    assert!(after >= WRITE_STALL, "closed after {after:?}");
    let mut received = Vec::new();
    timeout(BOUND, client.read_to_end(&mut received))
        .await
        .expect("the client's connection is closed")
        .ok();
    assert!(
        received.len() < CHUNK * CHUNKS,
        "the whole response was delivered: {} bytes",
        received.len()
    );
}

/// An upstream timeout too long for the clock to represent means "wait":
/// requests with and without a body are proxied, nothing panics.
#[tokio::test]
async fn an_upstream_timeout_beyond_the_clock_range_is_accepted() {
    let (upstream, log) = recording_upstream().await;
    let url = upstream.url();
    let gw = TestGateway::with(|c| {
        c.upstream.url = url;
        c.upstream.timeout_secs = u64::MAX;
    })
    .await;
    let (status, _) = http_get(gw.addr, "/plain").await;
    assert_eq!(status, 201);
    let response = send_request(
        gw.addr,
        Request::post("/upload")
            .header("host", "app.example.test")
            .body(full("a body"))
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), 201);
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].body, Bytes::from_static(b"a body"));
}

#[tokio::test]
async fn request_heads_beyond_the_limits_get_431_and_never_reach_the_upstream() {
    // The limits on a request head: 100 header fields, and 64 KiB. Past
    // either, the client gets 431 from the gateway itself, on a proxied
    // path and on a WebSocket path alike; a head just under the size limit
    // goes through.
    let (upstream, log) = recording_upstream().await;
    let gw = gateway_for(&upstream).await;
    let many: String = (0..150).map(|i| format!("x-field-{i}: v\r\n")).collect();
    let huge = format!("x-big: {}\r\n", "a".repeat(65 * 1024));
    let cases = [
        ("150 header fields", &many, "/api/items"),
        ("150 header fields on the WebSocket path", &many, "/ws"),
        ("a 65 KiB header field", &huge, "/api/items"),
        ("a 65 KiB header field on the WebSocket path", &huge, "/ws"),
    ];
    for (what, fields, path) in cases {
        let mut stream = within("connect", tokio::net::TcpStream::connect(gw.addr))
            .await
            .expect("connect");
        let head = format!("GET {path} HTTP/1.1\r\nhost: app.example.test\r\n{fields}\r\n");
        within(what, stream.write_all(head.as_bytes()))
            .await
            .expect("write the head");
        let (status, response) = within(what, read_response_head(&mut stream)).await;
        assert_eq!(status, 431, "{what}: {response}");
    }
    assert!(
        log.lock().unwrap().is_empty(),
        "nothing reached the upstream"
    );

    let (status, _, body) = http_request(
        gw.addr,
        Request::get("/after")
            .header("host", "app.example.test")
            .header("x-big", "b".repeat(60 * 1024))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, &body[..]),
        (201, &b"created"[..]),
        "still proxying"
    );
    let seen = only(&log);
    assert_eq!(seen.seen.uri, "/after");
    assert_eq!(
        header(&seen.seen.headers, "x-big").map(str::len),
        Some(60 * 1024)
    );
}

#[tokio::test]
async fn ambiguous_request_framing_cannot_smuggle_a_request_to_the_upstream() {
    // The gateway frames every request it forwards itself, so the upstream
    // sees exactly the requests the gateway parsed: bytes that one reading
    // of an ambiguous request would take for a second request never reach
    // the upstream as one.
    use tokio::io::AsyncReadExt;
    let (upstream, log) = recording_upstream().await;
    let gw = gateway_for(&upstream).await;
    let connect = || async {
        within("connect", tokio::net::TcpStream::connect(gw.addr))
            .await
            .expect("connect")
    };

    // Content-Length and chunked together: chunked wins, so the body is
    // empty, and the connection closes after the response (RFC 9112 §6.3),
    // so the bytes after the body are never read as a request.
    let mut stream = connect().await;
    let request = "POST /first HTTP/1.1\r\nhost: app.example.test\r\n\
                   content-length: 30\r\ntransfer-encoding: chunked\r\n\r\n\
                   0\r\n\r\nSMUGGLED /second HTTP/1.1\r\n\r\n";
    within("write", stream.write_all(request.as_bytes()))
        .await
        .expect("write");
    let (status, head, body) = within("the first response", read_response(&mut stream)).await;
    assert_eq!((status, body.as_str()), (201, "created"), "{head}");
    let mut rest = Vec::new();
    within("the connection to close", stream.read_to_end(&mut rest))
        .await
        .expect("closed cleanly");
    assert!(
        rest.is_empty(),
        "nothing more: {:?}",
        String::from_utf8_lossy(&rest)
    );

    // Framing the gateway cannot trust is refused outright.
    for (what, framing) in [
        (
            "two different lengths",
            "content-length: 3\r\ncontent-length: 30\r\n",
        ),
        (
            "a transfer coding that does not end in chunked",
            "transfer-encoding: chunked, identity\r\n",
        ),
        ("a length that is no number", "content-length: 3x\r\n"),
    ] {
        let mut stream = connect().await;
        let request =
            format!("POST /refused HTTP/1.1\r\nhost: app.example.test\r\n{framing}\r\nabc");
        within(what, stream.write_all(request.as_bytes()))
            .await
            .expect("write");
        let (status, head) = within(what, read_response_head(&mut stream)).await;
        assert_eq!(status, 400, "{what}: {head}");
    }

    let seen = only(&log);
    assert_eq!(seen.seen.uri, "/first");
    assert!(seen.body.is_empty(), "body {:?}", seen.body);
    assert!(
        header(&seen.seen.headers, "content-length").is_none_or(|v| v == "0"),
        "no stale length: {:?}",
        seen.seen.headers
    );
}

#[tokio::test]
async fn an_upstream_that_breaks_http_costs_only_its_own_requests() {
    // A raw upstream that answers each connection's request in its own
    // wrong way, then once properly.
    let listener = within("bind", tokio::net::TcpListener::bind("127.0.0.1:0"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let answers: [&'static [u8]; 4] = [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"",
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten..",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ];
    let upstream = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        for answer in answers {
            let (mut conn, _) = listener.accept().await.expect("accept");
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(conn.read_u8().await.expect("request head"));
            }
            conn.write_all(answer).await.expect("answer");
            // Dropped: the connection ends with the answer.
        }
    });
    let gw = TestGateway::with(|c| c.upstream.url = format!("http://{addr}")).await;

    let (status, body) = http_get(gw.addr, "/garbage").await;
    assert_eq!(status, 502, "a response that is not HTTP: {body}");
    let (status, body) = http_get(gw.addr, "/silent").await;
    assert_eq!(status, 502, "no response at all: {body}");

    // When the body breaks off, the client's connection ends. The head may
    // have gone out by then, with what there was of the body: the client
    // is short of the length it was promised either way, so it cannot take
    // the response for whole.
    let mut stream = within("connect", tokio::net::TcpStream::connect(gw.addr))
        .await
        .expect("connect");
    within(
        "write",
        stream.write_all(b"GET /cut HTTP/1.1\r\nhost: app.example.test\r\n\r\n"),
    )
    .await
    .expect("write");
    let mut received = Vec::new();
    let _ = within("the connection to end", async {
        use tokio::io::AsyncReadExt;
        stream.read_to_end(&mut received).await
    })
    .await;
    let text = String::from_utf8_lossy(&received);
    if let Some((head, body)) = text.split_once("\r\n\r\n") {
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(body.len() < 100, "{} bytes of 100", body.len());
    } else {
        assert!(received.is_empty(), "no response head: {text}");
    }

    let (status, body) = http_get(gw.addr, "/fine").await;
    assert_eq!((status, body.as_str()), (200, "ok"), "still proxying");
    within("the upstream's four connections", upstream)
        .await
        .expect("upstream task");
    assert_eq!(
        gw.metric("roomgate_proxy_requests_total{code=\"502\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn an_upstream_connection_whose_chunked_answer_ends_in_trailers_is_reused() {
    // Trailers end a chunked body: the connection is then free for the
    // next request, as after any complete answer.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (accepted_tx, mut accepted) = mpsc::unbounded_channel::<()>();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = accepted_tx.send(());
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\
                            trailer: x-check\r\n\r\n2\r\nok\r\n0\r\nx-check: 1\r\n\r\n";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    match tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => pending.extend_from_slice(&buf[..read]),
                    }
                }
            });
        }
    });
    let gw = TestGateway::with(|c| c.upstream.url = format!("http://{addr}")).await;
    for _ in 0..3 {
        let (status, body) = http_get(gw.addr, "/").await;
        assert_eq!((status, body.as_str()), (200, "ok"));
    }
    within("the first connection", accepted.recv()).await;
    assert!(
        accepted.try_recv().is_err(),
        "one upstream connection served all three"
    );
}

/// A gateway in front of an upstream that refuses every upgrade with 403
/// on kept-alive connections, and closes its first connection as the
/// second request arrives on it; and the count of connections it took.
async fn gateway_before_an_upstream_closing_on_second_request()
-> (TestGateway, Arc<std::sync::atomic::AtomicUsize>) {
    let (addr, accepted) = upstream_closing_on_second_request(
        b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\nno",
    )
    .await;
    let gw = TestGateway::with(|c| c.upstream.url = format!("http://{addr}")).await;
    (gw, accepted)
}

/// A WebSocket upgrade to `/chat`, a path of the upstream's.
fn upgrade_to_chat(method: &str) -> hyper::Request<TestBody> {
    hyper::Request::builder()
        .method(method)
        .uri("/chat")
        .header("host", "app.test")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(empty())
        .expect("request")
}

#[tokio::test]
async fn an_upgrade_on_a_connection_the_upstream_just_closed_is_sent_again() {
    // The first upgrade is refused on a kept-alive connection; the second
    // goes out on it just as the upstream closes it. An upgrade request
    // without a body may go twice: it is sent again on a new connection
    // and gets the upstream's answer, not a 502.
    let (gw, accepted) = gateway_before_an_upstream_closing_on_second_request().await;
    for _ in 0..2 {
        let (status, _, body) = http_request(gw.addr, upgrade_to_chat("GET")).await;
        assert_eq!((status, &body[..]), (403, &b"no"[..]));
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_upgrade_with_an_unsafe_method_is_not_sent_again() {
    // A POST may have done its work before the connection closed: it is
    // not sent a second time, and the client gets 502.
    let (gw, accepted) = gateway_before_an_upstream_closing_on_second_request().await;
    let mut statuses = Vec::new();
    for method in ["GET", "POST"] {
        statuses.push(http_request(gw.addr, upgrade_to_chat(method)).await.0);
    }
    assert_eq!(statuses, [403, 502]);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// A chunked request body reaches the upstream whatever the method: hyper's
/// client, given a GET or HEAD body it cannot size, would send the request
/// without it (the upstream would act on another request than the
/// client's), so the gateway passes the chunked coding on.
#[tokio::test]
async fn a_chunked_body_on_any_method_reaches_the_upstream() {
    let (upstream, log) = recording_upstream().await;
    let gw = gateway_for(&upstream).await;
    let methods = ["GET", "HEAD", "POST", "DELETE", "OPTIONS"];
    for method in methods {
        let mut stream = within("connect", tokio::net::TcpStream::connect(gw.addr))
            .await
            .expect("connect");
        let head = format!(
            "{method} /search HTTP/1.1\r\nhost: app.example.test\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        // The body in pieces: the request must not leave without it.
        stream.write_all(head.as_bytes()).await.expect("write head");
        stream
            .write_all(b"5\r\nhello\r\n")
            .await
            .expect("write chunk");
        tokio::task::yield_now().await;
        stream
            .write_all(b"6\r\n world\r\n0\r\n\r\n")
            .await
            .expect("write the rest");
        let (status, head) = within("the response head", read_response_head(&mut stream)).await;
        assert_eq!(status, 201, "{method}: {head}");
    }
    // Without a body nothing is added.
    let (status, _) = http_get(gw.addr, "/plain").await;
    assert_eq!(status, 201);
    let log = log.lock().unwrap();
    let seen: Vec<(&str, Option<&str>, &[u8])> = log
        .iter()
        .map(|r| {
            let coding = header(&r.seen.headers, "transfer-encoding");
            (r.seen.method.as_str(), coding, &r.body[..])
        })
        .collect();
    let mut expected: Vec<(&str, Option<&str>, &[u8])> = methods
        .iter()
        .map(|m| (*m, Some("chunked"), &b"hello world"[..]))
        .collect();
    expected.push(("GET", None, b""));
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn the_upstreams_trailers_reach_a_client_that_takes_them_and_the_clients_go_nowhere() {
    // Fields after a chunked body (a checksum, a status known only at its
    // end): a client that says `TE: trailers` gets the upstream's. The
    // client's own are not passed on: an upstream that merged them into
    // its headers would take in an `X-Forwarded-For` of the client's
    // making.
    use hyper::body::Frame;
    let upstream = Upstream::start(|request: Request<Incoming>| async move {
        let te = request
            .headers()
            .get("te")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        // What came after the request's body: `none`, or how many fields.
        let seen = match request.into_body().collect().await {
            Ok(body) => body
                .trailers()
                .map_or("none".to_string(), |t| t.len().to_string()),
            Err(_) => "broken".into(),
        };
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert(
            "x-reply",
            hyper::header::HeaderValue::from_str(&seen).expect("a value"),
        );
        let frames: Vec<Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> = vec![
            Ok(Frame::data(Bytes::from(format!("te={te:?}")))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        Response::builder()
            .header("trailer", "x-reply")
            .body(BodyExt::boxed(body))
            .expect("a response")
    })
    .await;
    let gw = gateway_for(&upstream).await;
    for (te, takes_trailers) in [("TE: trailers\r\nConnection: TE\r\n", true), ("", false)] {
        let request = format!(
            "POST /sum HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\
             Trailer: x-sum, x-forwarded-for\r\n{te}Connection: close\r\n\r\n\
             2\r\nhi\r\n0\r\nx-sum: 7\r\nx-forwarded-for: 6.6.6.6\r\n\r\n"
        );
        let reply = exchange_until_close(gw.addr, &request).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains("\r\ntrailer: x-reply\r\n"), "{reply}");
        if takes_trailers {
            assert!(reply.contains("te=Some(\"trailers\")"), "{reply}");
            assert!(reply.ends_with("\r\n0\r\nx-reply: none\r\n\r\n"), "{reply}");
        } else {
            // The upstream was not told the client takes trailers, and the
            // body still arrives whole.
            assert!(reply.contains("te=None"), "{reply}");
            assert!(reply.ends_with("\r\n0\r\n\r\n"), "{reply}");
        }
    }
}
