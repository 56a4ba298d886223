//! Shutdown of the real binary on SIGTERM and SIGINT (SPEC §8): not ready
//! while draining, WebSockets closed with 1001, in-flight proxied requests
//! allowed to finish within the grace period, exit code 0.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;
use hyper::{Request, Response};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// An upstream whose `/slow` requests report their arrival on the returned
/// receiver and answer "done" only when the test releases them.
async fn slow_upstream() -> (Upstream, mpsc::Receiver<oneshot::Sender<()>>) {
    let (arrived_tx, arrived_rx) = mpsc::channel::<oneshot::Sender<()>>(4);
    let arrived_tx = Arc::new(Mutex::new(arrived_tx));
    let upstream = Upstream::start(move |_request| {
        let arrived = arrived_tx.lock().unwrap().clone();
        async move {
            let (release_tx, release_rx) = oneshot::channel();
            let _ = arrived.send(release_tx).await;
            let _ = release_rx.await;
            Response::new(full("done"))
        }
    })
    .await;
    (upstream, arrived_rx)
}

/// The real binary in front of `url`, with a grace period of `grace`
/// seconds.
fn in_front_of(url: &str, grace: &str) -> GatewayProcess {
    GatewayProcess::start(
        &[],
        &[
            ("ROOMGATE_UPSTREAM_URL", url),
            ("ROOMGATE_SERVER_SHUTDOWN_GRACE_SECS", grace),
        ],
    )
}

/// Sends SIGTERM and waits until `/readyz` says the drain has begun.
async fn begin_drain(gateway: &GatewayProcess) {
    gateway.signal("TERM");
    let admin = gateway.admin;
    eventually_async("/readyz to turn 503", || async move {
        http_get(admin, "/readyz").await.0 == 503
    })
    .await;
}

/// Starts a slow proxied request; returns its (status, body) task.
fn slow_request(gateway: &GatewayProcess) -> tokio::task::JoinHandle<(u16, String)> {
    let addr = gateway.addr;
    tokio::spawn(async move {
        let response = send_request(
            addr,
            Request::get("/slow")
                .header("host", "app.example.test")
                .body(empty())
                .unwrap(),
        )
        .await;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_else(|e| format!("body cut: {e}"));
        (status, body)
    })
}

#[tokio::test]
async fn sigterm_drains_then_exits_zero() {
    let (upstream, mut arrived) = slow_upstream().await;
    let url = upstream.url();
    let mut gateway = in_front_of(&url, "15");
    assert_eq!(http_get(gateway.admin, "/readyz").await.0, 200);

    let mut client = WsClient::connect(&format!("ws://{}/ws", gateway.addr)).await;
    client.join("lobby").await;
    let request = slow_request(&gateway);
    let release = within("the slow request to reach the upstream", arrived.recv())
        .await
        .expect("upstream saw the request");

    // Draining: not ready, WebSockets told to go away with 1001.
    begin_drain(&gateway).await;
    assert_eq!(client.recv_close().await, Some(1001));
    // The public port no longer takes connections.
    let addr = gateway.addr;
    eventually_async("the public listener to close", || async move {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert!(
        gateway.child.try_wait().expect("try_wait").is_none(),
        "the gateway waits for the in-flight request"
    );

    // The in-flight request still completes.
    release.send(()).expect("upstream still waiting");
    let (status, body) = within("the slow request to finish", request)
        .await
        .expect("request task");
    assert_eq!((status, body.as_str()), (200, "done"));

    assert_eq!(gateway.wait_exit(), 0);
}

#[tokio::test]
async fn a_request_that_outlives_the_grace_period_is_cut_and_the_exit_is_still_zero() {
    const GRACE: Duration = Duration::from_secs(2);
    let (upstream, mut arrived) = slow_upstream().await;
    let url = upstream.url();
    let grace = GRACE.as_secs().to_string();
    let mut gateway = in_front_of(&url, &grace);
    // The request's outcome and the moment it ended, without panicking on
    // a cut connection: a cut is what this test expects.
    let addr = gateway.addr;
    let request = tokio::spawn(async move {
        let outcome: Result<(u16, String), String> = async {
            let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let response = sender
                .send_request(
                    Request::get("/slow")
                        .header("host", "app.example.test")
                        .body(empty())
                        .unwrap(),
                )
                .await
                .map_err(|e| format!("no response: {e}"))?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("status {status}, body cut: {e}"))?;
            Ok((
                status,
                String::from_utf8_lossy(&body.to_bytes()).into_owned(),
            ))
        }
        .await;
        (outcome, Instant::now())
    });
    // Never released: the upstream holds the request past the grace period.
    let _never_released = within("the slow request to reach the upstream", arrived.recv())
        .await
        .expect("upstream saw the request");

    // Taken before the signal is sent, so the time measured from it to the
    // cut is at least the time the gateway itself waited.
    let signalled = Instant::now();
    gateway.signal("TERM");
    let (outcome, ended) = within("the cut request to end", request)
        .await
        .expect("request task");
    assert_eq!(gateway.wait_exit(), 0);

    let waited = ended - signalled;
    assert!(
        waited >= GRACE,
        "the request was cut {waited:?} after SIGTERM, before the {GRACE:?} grace period: {outcome:?}"
    );
    match outcome {
        Err(_) => {}
        Ok((status, _)) if status >= 500 => {}
        Ok(served) => panic!("the request was answered instead of cut: {served:?}"),
    }
}

#[tokio::test]
async fn a_second_signal_cuts_the_drain_short() {
    // A grace period far longer than any wait of this test: the gateway
    // exits within it only because it was asked twice.
    let (upstream, mut arrived) = slow_upstream().await;
    let url = upstream.url();
    let mut gateway = in_front_of(&url, "600");
    // Read raw, to the end: a cut is what this test expects.
    let addr = gateway.addr;
    let request = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let head = "GET /slow HTTP/1.1\r\nhost: app.example.test\r\n\r\n";
        stream.write_all(head.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    });
    let _never_released = within("the slow request to reach the upstream", arrived.recv())
        .await
        .expect("upstream saw the request");

    begin_drain(&gateway).await;
    assert!(
        gateway.child.try_wait().expect("try_wait").is_none(),
        "the first signal waits for the in-flight request"
    );
    // Either kind counts as the second.
    gateway.signal("INT");
    assert_eq!(gateway.wait_exit(), 0);
    let answer = within("the cut request to end", request)
        .await
        .expect("request task");
    assert!(!answer.contains("done"), "cut, not answered: {answer}");
}

#[tokio::test]
async fn a_client_halfway_through_a_request_head_does_not_hold_the_shutdown() {
    // It has no request in flight: nothing for a grace period of ten
    // minutes to wait for. The same holds for half an upgrade request.
    let gateway_env = [("ROOMGATE_SERVER_SHUTDOWN_GRACE_SECS", "600")];
    let mut gateway = GatewayProcess::start(&[], &gateway_env);
    let mut halves = Vec::new();
    for head in [
        "GET / HTTP/1.1\r\nhost: x\r\n",
        "GET /ws HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n",
    ] {
        use tokio::io::AsyncWriteExt;
        let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
        stream.write_all(head.as_bytes()).await.expect("write");
        halves.push(stream);
    }
    // Time for the gateway to read both halves: a whole request on a
    // third connection is answered first.
    assert_eq!(http_get(gateway.addr, "/").await.0, 404);
    gateway.signal("TERM");
    assert_eq!(gateway.wait_exit(), 0);
}

#[tokio::test]
async fn sigint_exits_zero() {
    let mut gateway = GatewayProcess::start(&[], &[]);
    let mut client = WsClient::connect(&format!("ws://{}/ws", gateway.addr)).await;
    gateway.signal("INT");
    assert_eq!(client.recv_close().await, Some(1001));
    assert_eq!(gateway.wait_exit(), 0);
}

#[tokio::test]
async fn sigterm_with_nothing_in_flight_exits_zero() {
    let mut gateway = GatewayProcess::start(&[], &[]);
    gateway.signal("TERM");
    assert_eq!(gateway.wait_exit(), 0);
    // The process is gone, but the thread reading its output may not have
    // taken the last line yet.
    let log = gateway.log.clone();
    eventually("the stop to be logged", || {
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("roomgate stopped"))
    })
    .await;
}

/// A keep-alive connection waiting for its next request does not hold up
/// shutdown: it is closed as soon as shutdown begins, not at the end of the
/// grace period (an hour here, far beyond the test's bounded waits).
#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_when_shutdown_begins() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let upstream = Upstream::start(|_request| async { Response::new(full("ok")) }).await;
    let url = upstream.url();
    let mut gateway = TestGateway::with(|config| {
        config.upstream.url = url;
        config.server.shutdown_grace_secs = 3600;
    })
    .await;
    let mut stream = within("connect", tokio::net::TcpStream::connect(gateway.addr))
        .await
        .expect("connect");
    // Several exchanges, so the connection's task has been woken many times.
    for _ in 0..3 {
        within(
            "the request to be written",
            stream.write_all(b"GET /a HTTP/1.1\r\nhost: app.example.test\r\n\r\n"),
        )
        .await
        .expect("request written");
        let mut response = Vec::new();
        within("a response", async {
            while !response.ends_with(b"\r\n\r\nok") {
                let mut chunk = [0u8; 1024];
                let n = stream.read(&mut chunk).await.expect("read");
                assert!(
                    n > 0,
                    "closed early: {:?}",
                    String::from_utf8_lossy(&response)
                );
                response.extend_from_slice(&chunk[..n]);
            }
        })
        .await;
        assert!(response.starts_with(b"HTTP/1.1 200"), "{response:?}");
    }

    gateway.begin_stop();
    let mut rest = Vec::new();
    within(
        "the idle connection to be closed",
        stream.read_to_end(&mut rest),
    )
    .await
    .expect("clean close");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    gateway.wait_stopped().await;
}

/// A scrape the admin port is answering when the gateway stops gets its
/// whole answer before the connection closes. The scraper here has asked
/// for more than the socket buffers hold (pipelined `/metrics` requests,
/// 1 MB of answers, against about 100 KB of buffers) and reads only once
/// shutdown has begun, so the admin port is in the middle of writing an
/// answer when it stops.
#[tokio::test]
async fn an_admin_answer_in_progress_at_shutdown_is_finished() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // All of them fit in the gateway's first read of the connection (8
    // KiB), so none is left unread in its socket when the connection
    // closes: the kernel would answer that with a reset, losing the
    // answers it still holds.
    const REQUESTS: usize = 200;
    let mut gateway = TestGateway::with(|_| {}).await;
    let (_, body) = gateway.admin_get("/metrics").await;
    assert!(
        body.len() > 4000,
        "a /metrics answer of {} bytes",
        body.len()
    );

    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("receive buffer");
    small_segments(&socket);
    let mut stream = within("connect", socket.connect(gateway.admin))
        .await
        .expect("connect");
    let requests = "GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n".repeat(REQUESTS);
    within(
        "the requests to be written",
        stream.write_all(requests.as_bytes()),
    )
    .await
    .expect("requests written");
    within("the first answer to start", async {
        let mut probe = [0u8; 1];
        stream.peek(&mut probe).await.expect("peek")
    })
    .await;

    gateway.begin_stop();
    let mut received = Vec::new();
    within(
        "the admin connection to close",
        stream.read_to_end(&mut received),
    )
    .await
    .expect("read to the end");
    let answers = whole_responses(&received);
    assert!(
        (1..REQUESTS).contains(&answers),
        "some answers, not all: {answers}"
    );
    gateway.wait_stopped().await;
}

/// How many complete HTTP/1.1 responses with a `content-length` `bytes`
/// holds back to back; panics if anything follows the last whole one.
fn whole_responses(mut bytes: &[u8]) -> usize {
    let mut count = 0;
    while !bytes.is_empty() {
        let head_end = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("response {count} has a head cut short"));
        let head = String::from_utf8_lossy(&bytes[..head_end]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "response {count}: {head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("response {count} has no length: {head}"));
        let end = head_end + 4 + length;
        assert!(
            end <= bytes.len(),
            "response {count} is cut short: {} of {length} body bytes",
            bytes.len() - head_end - 4
        );
        bytes = &bytes[end..];
        count += 1;
    }
    count
}

/// Makes the connection `socket` will open use 536-byte segments. The
/// kernel sizes a sender's buffer from the segment size, and on loopback
/// (64 KiB segments) a peer that reads nothing can be sent about 3 MB;
/// with small segments it is about 100 KB.
fn small_segments(socket: &tokio::net::TcpSocket) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 536;
    // SAFETY: a valid socket descriptor, and an option value of the size
    // passed with it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "TCP_MAXSEG: {}", std::io::Error::last_os_error());
}

/// A client that reads nothing, with megabytes waiting for it, cannot take
/// its 1001 at shutdown. It is cut when the grace period is over (1 s
/// here), not when `pong_timeout` (an hour here) would end the close, and
/// the gateway stops with nothing of it left behind.
#[tokio::test]
async fn a_client_stalled_at_shutdown_is_cut_when_the_grace_period_ends() {
    const MESSAGES: usize = 80;
    let gw = TestGateway::with(|c| {
        c.websocket.ping_interval_secs = 3600;
        c.websocket.pong_timeout_secs = 3600;
        c.server.shutdown_grace_secs = 1;
    })
    .await;
    let mut stalled = WsClient::connect_with(&gw.ws_url(), None, Some(4096)).await;
    let mut talker = gw.client().await;
    stalled.join("stalled").await;
    talker.join("stalled").await;
    // 4.8 MB: more than the kernel holds for a client that reads nothing
    // (about 3 MB on loopback).
    let big = "x".repeat(60_000);
    for n in 0..MESSAGES {
        talker
            .say("stalled", serde_json::json!(big), &format!("m{n}"))
            .await;
    }
    let (client_port, gateway_port) = stalled.ports();
    eventually("the gateway's writes to the client to back up", || {
        tcp_send_queue(gateway_port, client_port).is_some_and(|queued| queued > 1_000_000)
    })
    .await;

    gw.stop().await;
    eventually("the stalled client's connection to be gone", || {
        !tcp_socket_open(gateway_port, client_port)
    })
    .await;
    drop(talker);
}
