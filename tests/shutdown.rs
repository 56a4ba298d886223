//! Shutdown of the real binary on SIGTERM and SIGINT (SPEC §8): not ready
//! while draining, WebSockets closed with 1001, in-flight proxied requests
//! allowed to finish within the grace period, exit code 0.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use http_body_util::BodyExt;
use hyper::{Request, Response};
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
    let mut gateway = GatewayProcess::start(
        &[],
        &[
            ("ROOMGATE_UPSTREAM_URL", url.as_str()),
            ("ROOMGATE_SERVER_SHUTDOWN_GRACE_SECS", "15"),
        ],
    );
    assert_eq!(http_get(gateway.admin, "/readyz").await.0, 200);

    let mut client = WsClient::connect(&format!("ws://{}/ws", gateway.addr)).await;
    client.join("lobby").await;
    let request = slow_request(&gateway);
    let release = within("the slow request to reach the upstream", arrived.recv())
        .await
        .expect("upstream saw the request");

    gateway.signal("TERM");

    // Draining: not ready, WebSockets told to go away with 1001.
    let admin = gateway.admin;
    eventually_async("/readyz to turn 503", || async move {
        http_get(admin, "/readyz").await.0 == 503
    })
    .await;
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
    let (upstream, mut arrived) = slow_upstream().await;
    let url = upstream.url();
    let mut gateway = GatewayProcess::start(
        &[],
        &[
            ("ROOMGATE_UPSTREAM_URL", url.as_str()),
            ("ROOMGATE_SERVER_SHUTDOWN_GRACE_SECS", "1"),
        ],
    );
    let request = slow_request(&gateway);
    let _never_released = within("the slow request to reach the upstream", arrived.recv())
        .await
        .expect("upstream saw the request");
    gateway.signal("TERM");
    assert_eq!(gateway.wait_exit(), 0);
    let result = within("the cut request to end", request).await;
    assert!(
        !matches!(result, Ok((200, ref body)) if body == "done"),
        "the request was not served: {result:?}"
    );
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
    let logged_stop = gateway
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("roomgate stopped"));
    assert!(logged_stop, "{:?}", gateway.log);
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
        stream
            .write_all(b"GET /a HTTP/1.1\r\nhost: app.example.test\r\n\r\n")
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
