//! A WebSocket's life on the gateway's own path: the handshake checks, the
//! connection limit, the welcome frame, error frames, the size limit and
//! the heartbeat.

mod common;

use std::net::SocketAddr;

use common::*;
use futures_util::{SinkExt, StreamExt};
use hyper::Request;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

// ----- handshake --------------------------------------------------------

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Sends a would-be upgrade to `/ws` built from `method` and `headers`;
/// returns (status, headers, body text).
async fn try_upgrade(
    addr: SocketAddr,
    method: &str,
    headers: &[(&str, &str)],
) -> (u16, hyper::HeaderMap, String) {
    let mut request = Request::builder()
        .method(method)
        .uri("/ws")
        .header("host", addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (status, headers, body) = http_request(addr, request.body(empty()).unwrap()).await;
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn upgrade_headers<'a>(key: Option<&'a str>, version: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut headers = vec![
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-version", version),
    ];
    if let Some(key) = key {
        headers.push(("sec-websocket-key", key));
    }
    headers
}

#[tokio::test]
async fn bad_handshakes_get_400_with_the_reason_and_never_a_websocket() {
    let gw = TestGateway::start(test_config()).await;
    // (method, what, headers, the reason the body must give)
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "POST",
            "a POST",
            upgrade_headers(Some(KEY), "13"),
            "must be a GET",
        ),
        (
            "GET",
            "no key",
            upgrade_headers(None, "13"),
            "missing Sec-WebSocket-Key",
        ),
        (
            "GET",
            "a short key",
            upgrade_headers(Some("c2hvcnQ="), "13"),
            "Sec-WebSocket-Key must be 16 bytes",
        ),
        (
            "GET",
            "version 8",
            upgrade_headers(Some(KEY), "8"),
            "Sec-WebSocket-Version must be 13",
        ),
        ("GET", "a plain GET", Vec::new(), "Upgrade: websocket"),
        (
            "GET",
            "two keys",
            [
                upgrade_headers(Some(KEY), "13"),
                vec![("Sec-WebSocket-Key", KEY)],
            ]
            .concat(),
            "Sec-WebSocket-Key given more than once",
        ),
    ];
    let count = cases.len();
    for (method, what, headers, reason) in cases {
        let (status, response_headers, body) = try_upgrade(gw.addr, method, &headers).await;
        assert_eq!(status, 400, "{what}: {body}");
        assert!(
            body.contains(reason),
            "{what}: body {body:?} names the reason"
        );
        assert!(
            !response_headers.contains_key("sec-websocket-accept"),
            "{what}: no WebSocket accept"
        );
        // RFC 6455 §4.4: a refused version is answered with the one spoken.
        let version = response_headers.get("sec-websocket-version");
        if what == "version 8" {
            assert_eq!(version.map(|v| v.as_bytes()), Some(&b"13"[..]), "{what}");
        } else {
            assert_eq!(version, None, "{what}");
        }
    }
    assert_eq!(
        gw.metric("roomgate_upgrades_rejected_total{reason=\"bad_handshake\"}")
            .await,
        count as f64
    );
    assert_eq!(gw.metric("roomgate_connections_opened_total").await, 0.0);
    assert_eq!(gw.metric("roomgate_connections").await, 0.0);
}

#[tokio::test]
async fn the_switching_response_and_the_welcome_arrive_together() {
    // Both leave in one write, so a new client wakes once, not twice: the
    // client's socket counts one segment with data for the two.
    let gw = TestGateway::start(test_config()).await;
    let mut stream = silent_client(gw.addr).await;
    let welcome = within("the welcome", read_raw_frame(&mut stream))
        .await
        .expect("a frame");
    assert_eq!(welcome.opcode, 1);
    assert!(
        String::from_utf8_lossy(&welcome.payload).contains("Connected as"),
        "{welcome:?}"
    );
    assert_eq!(data_segments_received(&stream), 1);
}

/// Segments with data the kernel received on `stream`.
fn data_segments_received(stream: &TcpStream) -> u32 {
    tcp_info(stream).tcpi_data_segs_in
}

/// Sends an upgrade request to /ws over a raw socket, as `http` (the
/// request line's version) with `Sec-WebSocket-Version: version`, and
/// returns the socket for the answer.
async fn raw_upgrade(addr: std::net::SocketAddr, http: &str, version: &str) -> TcpStream {
    let mut stream = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let request = format!(
        "GET /ws {http}\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: {version}\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    );
    within("write", stream.write_all(request.as_bytes()))
        .await
        .expect("write");
    stream
}

#[tokio::test]
async fn a_bad_handshake_on_a_raw_socket_gets_no_websocket_bytes() {
    // The raw form, so nothing in an HTTP client can hide an upgrade: the
    // answer is a plain 400 and the socket speaks HTTP afterwards.
    let gw = TestGateway::start(test_config()).await;
    let mut stream = raw_upgrade(gw.addr, "HTTP/1.1", "12").await;
    // The 400 carries a Content-Length, so the socket still speaks
    // HTTP/1.1: after its body, a second request on it is answered
    // (proxied: 404, as no upstream is set).
    let (status, head, body) = read_response(&mut stream).await;
    assert_eq!(status, 400, "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    assert!(body.contains("Version"));
    stream
        .write_all(format!("GET /x HTTP/1.1\r\nHost: {}\r\n\r\n", gw.addr).as_bytes())
        .await
        .expect("write");
    let (status, head) = read_response_head(&mut stream).await;
    assert_eq!(status, 404, "{head}");
}

#[tokio::test]
async fn an_http_1_0_upgrade_gets_400_not_a_switch_that_leads_nowhere() {
    // HTTP/1.0 has no upgrade: hyper would send the 101 and close.
    let gw = TestGateway::start(test_config()).await;
    let mut stream = raw_upgrade(gw.addr, "HTTP/1.0", "13").await;
    let (status, head, body) = read_response(&mut stream).await;
    assert_eq!(status, 400, "{head}");
    assert!(body.contains("HTTP/1.1"), "{body}");
    assert_eq!(
        gw.metric("roomgate_upgrades_rejected_total{reason=\"bad_handshake\"}")
            .await,
        1.0
    );
    assert_eq!(gw.metric("roomgate_connections_opened_total").await, 0.0);
}

#[tokio::test]
async fn upgrades_beyond_max_connections_get_503_until_a_client_leaves() {
    let gw = TestGateway::with(|c| c.server.max_connections = 2).await;
    let mut a = gw.client().await;
    let _b = gw.client().await;

    let refused = within(
        "the third upgrade",
        tokio_tungstenite::connect_async(gw.ws_url()),
    )
    .await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
        }
        Err(other) => panic!("expected an HTTP 503, got {other}"),
        Ok(_) => panic!("a third connection was admitted above max_connections = 2"),
    }
    assert_eq!(
        gw.metric("roomgate_upgrades_rejected_total{reason=\"max_connections\"}")
            .await,
        1.0
    );
    // The limit is exported, so alerts can compare against the setting.
    assert_eq!(gw.metric("roomgate_connections_max").await, 2.0);

    a.ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .expect("close");
    assert_eq!(a.recv_close().await, Some(1000), "close acknowledged");
    eventually_async("a new client to be admitted", || async {
        match tokio_tungstenite::connect_async(gw.ws_url()).await {
            Ok((ws, _)) => {
                drop(ws);
                true
            }
            Err(_) => false,
        }
    })
    .await;
}

// ----- the session ------------------------------------------------------

/// The welcome is the first frame even when the client does not wait for
/// it: a ping sent in the same write as the handshake gets its pong after
/// the welcome, not before (pongs otherwise go ahead of queued data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_welcome_comes_before_the_pong_to_a_ping_sent_with_the_handshake() {
    let gw = TestGateway::start(test_config()).await;
    for _ in 0..20 {
        let mut stream = within("connect", TcpStream::connect(gw.addr))
            .await
            .expect("connect");
        let mut bytes = raw_upgrade_request(gw.addr, "/ws", "").into_bytes();
        bytes.extend(client_frame(0x89, b"hi", true));
        within("write", stream.write_all(&bytes))
            .await
            .expect("write handshake and ping");
        let (status, head) = read_response_head(&mut stream).await;
        assert_eq!(status, 101, "{head}");
        let first = within("the first frame", read_raw_frame(&mut stream))
            .await
            .expect("a frame");
        assert_eq!(first.opcode, 1, "a text frame first, got {first:?}");
        let welcome: serde_json::Value = serde_json::from_slice(&first.payload).expect("JSON");
        assert_eq!(welcome["type"], "system");
        let second = within("the pong", read_raw_frame(&mut stream))
            .await
            .expect("a frame");
        assert_eq!((second.opcode, &second.payload[..]), (10, &b"hi"[..]));
    }
}

#[tokio::test]
async fn welcome_is_the_first_frame_and_carries_a_uuid() {
    let gw = TestGateway::start(test_config()).await;
    let (mut ws, response) = within(
        "WebSocket connect",
        tokio_tungstenite::connect_async(gw.ws_url()),
    )
    .await
    .expect("handshake");
    assert_eq!(response.status(), 101);
    let first = match within("the welcome frame", ws.next()).await {
        Some(Ok(Message::Text(text))) => {
            serde_json::from_str::<serde_json::Value>(text.as_str()).expect("JSON")
        }
        other => panic!("expected a text frame first, got {other:?}"),
    };
    assert_eq!(first["type"], "system", "{first}");
    let id = first["connection_id"].as_str().expect("connection_id");
    let uuid = uuid::Uuid::parse_str(id).expect("connection id is a UUID");
    assert!(
        matches!(uuid.get_version_num(), 4 | 7),
        "UUID v4 or v7: {id}"
    );
    assert_eq!(first["message"], format!("Connected as {id}"));
    assert_eq!(
        first.as_object().map(|o| o.len()),
        Some(3),
        "exactly type, message, connection_id: {first}"
    );

    let other = gw.client().await;
    assert_ne!(other.id, id, "each connection gets its own id");
}

#[tokio::test]
async fn bad_frames_get_error_frames_and_the_connection_stays_usable() {
    let gw = TestGateway::start(test_config()).await;
    let mut client = gw.client().await;

    client.send_text("this is not json").await;
    let error = client.recv().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], "invalid_json", "{error}");
    assert!(error["message"].is_string(), "{error}");

    client.send(json!({"type": "dance", "id": "d1"})).await;
    let error = client.recv().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], "unknown_type", "{error}");
    assert_eq!(error["id"], "d1", "the frame's id is echoed: {error}");

    // Still usable: join and talk to a second member.
    client.join("lobby").await;
    let mut other = gw.client().await;
    other.join("lobby").await;
    client
        .send(json!({"type": "message", "room": "lobby", "content": {"n": 1}}))
        .await;
    assert_eq!(
        other.recv().await,
        json!({"type": "message", "room": "lobby", "content": {"n": 1}, "from": client.id})
    );
    assert_eq!(gw.metric("roomgate_connections").await, 2.0);
}

#[tokio::test]
async fn frames_that_break_the_websocket_protocol_close_with_1002_or_1007() {
    // What a client library would never send, written on a raw socket.
    // Each case gets a connection of its own, which must end with the
    // close code of RFC 6455 §7.4.1 and then be gone, leaving the gateway
    // serving everyone else.
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "an unmasked frame",
            client_frame(0x81, b"hello", false),
            1002,
        ),
        (
            "a reserved bit set",
            client_frame(0xc1, b"hello", true),
            1002,
        ),
        (
            "an unknown opcode",
            client_frame(0x83, b"hello", true),
            1002,
        ),
        (
            "a ping over 125 bytes",
            client_frame(0x89, &[7; 126], true),
            1002,
        ),
        ("a fragmented ping", client_frame(0x09, b"ping", true), 1002),
        (
            "a continuation with nothing to continue",
            client_frame(0x80, b"x", true),
            1002,
        ),
        (
            "a close frame with a one-byte body",
            client_frame(0x88, &[3], true),
            1002,
        ),
        (
            "a text frame that is not UTF-8",
            client_frame(0x81, &[0x68, 0xff, 0xfe], true),
            1007,
        ),
        (
            "a fragmented text whose UTF-8 breaks across the fragments",
            [
                client_frame(0x01, &[0x68, 0xe2, 0x82], true),
                client_frame(0x80, b"A", true),
            ]
            .concat(),
            1007,
        ),
    ];
    let gw = TestGateway::start(test_config()).await;
    let mut bystander = gw.client().await;
    bystander.join("lobby").await;

    let broken = cases.len() as f64;
    for (what, bytes, code) in cases {
        assert_eq!(
            close_code_after(gw.addr, what, &bytes).await,
            Some(code),
            "{what}"
        );
    }

    eventually_async("only the bystander to be left", || async {
        gw.metric("roomgate_connections").await == 1.0
    })
    .await;
    assert_eq!(
        gw.metric(r#"roomgate_connections_closed_total{reason="error"}"#)
            .await,
        broken,
        "each counted as a client error"
    );
    let mut other = gw.client().await;
    other.join("lobby").await;
    other
        .send(json!({"type": "message", "room": "lobby", "content": "still here"}))
        .await;
    assert_eq!(
        bystander.recv().await,
        json!({"type": "message", "room": "lobby", "content": "still here", "from": other.id})
    );
}

#[tokio::test]
async fn a_clients_own_close_code_is_echoed_and_one_no_endpoint_may_send_gets_1002() {
    let gw = TestGateway::start(test_config()).await;
    let cases = [
        (1000, 1000),
        (3000, 3000),
        (4999, 4999),
        (1005, 1002),
        (1016, 1002),
        (999, 1002),
        (5000, 1002),
    ];
    for (code, reply) in cases {
        let close = client_frame(0x88, &u16::to_be_bytes(code), true);
        assert_eq!(
            close_code_after(gw.addr, "a close frame", &close).await,
            Some(reply),
            "a client closing with {code}"
        );
    }
    // A code no endpoint may send is a protocol error, counted as one.
    let refused = cases.iter().filter(|(_, reply)| *reply == 1002).count() as f64;
    eventually_async("every close to be counted", || async {
        gw.metric("roomgate_connections").await == 0.0
    })
    .await;
    assert_eq!(
        gw.metric(r#"roomgate_connections_closed_total{reason="error"}"#)
            .await,
        refused
    );
    assert_eq!(
        gw.metric(r#"roomgate_connections_closed_total{reason="client"}"#)
            .await,
        cases.len() as f64 - refused
    );
}

#[tokio::test]
async fn a_message_over_the_size_limit_closes_with_1009() {
    let gw = TestGateway::with(|c| c.websocket.max_message_size_bytes = 1024).await;
    let mut client = gw.client().await;
    let mut bystander = gw.client().await;
    bystander.join("lobby").await;

    // Just under the limit is served.
    let content = "x".repeat(900);
    let fits = json!({"type": "join", "room": "lobby", "pad": content}).to_string();
    assert!(fits.len() <= 1024);
    client.send_text(&fits).await;
    assert_eq!(client.recv().await["type"], "joined");
    // A message under the limit reaches the bystander.
    let small = json!({"type": "message", "room": "lobby", "content": "small"});
    client.send(small).await;
    assert_eq!(bystander.recv().await["content"], "small");

    let big = json!({"type": "message", "room": "lobby", "content": "y".repeat(4096)});
    client.send(big).await;
    assert_eq!(client.recv_close().await, Some(1009));
    // The oversized message was not delivered: it would have been queued
    // for the bystander before the close, so before the barrier's reply.
    assert_eq!(bystander.barrier().await, Vec::<Value>::new());
    eventually_async("the close to be counted", || async {
        gw.metric("roomgate_connections_closed_total{reason=\"too_big\"}")
            .await
            == 1.0
    })
    .await;
    // The other connection carries on.
    bystander
        .send(json!({"type": "leave", "room": "lobby"}))
        .await;
    assert_eq!(bystander.recv().await["type"], "left");
}

#[tokio::test]
async fn a_large_message_over_the_limit_still_gets_its_1009() {
    // Much larger than the limit (and than the socket buffers): the gateway
    // stops reading at the frame header, and the close code must still
    // reach the client.
    let gw = TestGateway::with(|c| c.websocket.max_message_size_bytes = 1024).await;
    let mut client = gw.client().await;
    let big = "z".repeat(256 * 1024);
    // The send may fail once the gateway has closed; the close frame is what counts.
    let _ = client.ws.send(Message::text(big)).await;
    assert_eq!(client.recv_close().await, Some(1009));
}

#[tokio::test]
async fn messages_over_the_limit_close_with_1009_however_they_arrive() {
    // The limit holds for a message assembled from small fragments, and for
    // a frame header that only claims a size, before any of it arrives.
    let mut fragments = client_frame(0x01, &[b'f'; 600], true);
    fragments.extend(client_frame(0x00, &[b'f'; 600], true));
    fragments.extend(client_frame(0x80, &[b'f'; 600], true));
    let mut exabyte = vec![0x81, 0x80 | 127];
    exabyte.extend_from_slice(&(1u64 << 60).to_be_bytes());
    exabyte.extend_from_slice(&[1, 2, 3, 4]);
    let cases = [
        ("three fragments of 600 bytes", fragments),
        ("a header claiming an exabyte", exabyte),
    ];
    let gw = TestGateway::with(|c| c.websocket.max_message_size_bytes = 1024).await;
    for (what, bytes) in cases {
        assert_eq!(
            close_code_after(gw.addr, what, &bytes).await,
            Some(1009),
            "{what}"
        );
    }
    assert_eq!(
        gw.metric(r#"roomgate_connections_closed_total{reason="too_big"}"#)
            .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_decided_before_the_first_write_still_sends_the_101() {
    // The frame arrives with the handshake itself, so the session closes
    // the connection before its writer has written anything: the client
    // must still get the 101 its handshake waits for, then the close frame,
    // never WebSocket bytes in place of an HTTP response.
    let gw = TestGateway::with(|c| {
        c.websocket.max_message_size_bytes = 1024;
        // The gateway waits this long for the close reply the test never sends.
        c.websocket.pong_timeout_secs = 1;
    })
    .await;
    let mut request = raw_upgrade_request(gw.addr, "/ws", "").into_bytes();
    request.extend(client_frame(0x81, &[b'x'; 2000], true));
    for round in 0..5 {
        let mut stream = within("connect", TcpStream::connect(gw.addr))
            .await
            .expect("connect");
        within("write the handshake", stream.write_all(&request))
            .await
            .expect("write");
        let (status, head) = read_response_head(&mut stream).await;
        assert_eq!(status, 101, "round {round}: {head}");
        let frames = frames_until_closed(&mut stream).await;
        assert_eq!(
            frames.last().and_then(RawFrame::close_code),
            Some(1009),
            "round {round}"
        );
    }
}

// ----- heartbeat --------------------------------------------------------

/// Completes a handshake on a raw socket that will never answer a ping.
async fn silent_client(addr: SocketAddr) -> TcpStream {
    let mut stream = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    upgrade_raw(&mut stream, addr).await;
    stream
}

/// The code of the close frame that ends a new connection on which a client
/// sends `bytes` (`what` names them in a timeout).
async fn close_code_after(addr: SocketAddr, what: &str, bytes: &[u8]) -> Option<u16> {
    let mut stream = silent_client(addr).await;
    within(what, stream.write_all(bytes))
        .await
        .expect("write the frames");
    let frames = frames_until_closed(&mut stream).await;
    frames.last().and_then(RawFrame::close_code)
}

/// Reads frames until the server ends the connection; returns them all.
async fn frames_until_closed(stream: &mut TcpStream) -> Vec<RawFrame> {
    within("the server to close the silent connection", async {
        let mut frames = Vec::new();
        while let Some(frame) = read_raw_frame(stream).await {
            frames.push(frame);
        }
        frames
    })
    .await
}

async fn assert_silent_client_is_closed(gw: &TestGateway) {
    let mut stream = silent_client(gw.addr).await;
    let frames = frames_until_closed(&mut stream).await;
    assert_eq!(frames.first().map(|f| f.opcode), Some(1), "welcome first");
    assert!(
        frames.iter().any(|f| f.opcode == 9),
        "the server pinged: {frames:?}"
    );
    let close = frames
        .iter()
        .find(|f| f.opcode == 8)
        .expect("a close frame");
    assert_eq!(close.close_code(), Some(1001), "{close:?}");
    assert_eq!(
        gw.metric("roomgate_connections_closed_total{reason=\"ping_timeout\"}")
            .await,
        1.0
    );
    assert_eq!(gw.metric("roomgate_connections").await, 0.0);
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_closed() {
    let gw = TestGateway::with(|c| {
        c.websocket.ping_interval_secs = 1;
        c.websocket.pong_timeout_secs = 1;
    })
    .await;
    assert_silent_client_is_closed(&gw).await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_reset_when_its_close_goes_unanswered() {
    // A client that neither reads nor answers pings, with a few KiB waiting
    // for it: more than its small receive buffer takes, so some stays in
    // the gateway's kernel buffer behind the close frame. When the close
    // deadline passes the gateway resets the connection, which drops that
    // data. Closed the ordinary way, the socket would linger with it, and
    // the client's side would stay open for as long as it did not read.
    let gw = TestGateway::with(|c| {
        c.websocket.ping_interval_secs = 1;
        c.websocket.pong_timeout_secs = 1;
    })
    .await;
    let mut stalled = WsClient::connect_with(&gw.ws_url(), None, Some(4096)).await;
    let mut talker = gw.client().await;
    stalled.join("backlog").await;
    talker.join("backlog").await;
    for n in 0..8 {
        talker
            .say("backlog", json!("x".repeat(1000)), &format!("m{n}"))
            .await;
    }
    let (local, remote) = stalled.ports();
    eventually("the stalled client's connection to be reset", || {
        !tcp_socket_open(local, remote)
    })
    .await;
}

#[tokio::test]
async fn a_pong_timeout_longer_than_the_ping_interval_still_closes() {
    // A ping sent while an earlier one is unanswered must not restart the
    // clock, or the deadline would never come.
    let gw = TestGateway::with(|c| {
        c.websocket.ping_interval_secs = 1;
        c.websocket.pong_timeout_secs = 3;
    })
    .await;
    assert_silent_client_is_closed(&gw).await;
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_connected() {
    let gw = TestGateway::with(|c| {
        c.websocket.ping_interval_secs = 1;
        // Generous, so a busy machine does not make the live client miss it.
        c.websocket.pong_timeout_secs = 4;
    })
    .await;
    let mut client = gw.client().await;
    // Count the pings the client sees (tungstenite answers each one while
    // we keep reading): several intervals pass, without a close.
    let pings = within("four pings", async {
        let mut pings = 0;
        while pings < 4 {
            match client.ws.next().await {
                Some(Ok(Message::Ping(_))) => pings += 1,
                Some(Ok(Message::Pong(_))) => {}
                other => panic!("expected only pings, got {other:?}"),
            }
        }
        pings
    })
    .await;
    assert_eq!(pings, 4);
    client.join("still.here").await;
    assert_eq!(
        gw.metric("roomgate_connections_closed_total{reason=\"ping_timeout\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_busy_client_that_answers_pings_stays_connected_under_continuous_traffic() {
    // Pings that fall due while the writer is busy must still be sent:
    // counting them as sent without sending them would close every busy,
    // healthy client for "not answering".
    let gw = TestGateway::with(|c| {
        c.websocket.ping_interval_secs = 1;
        // Well past the reader's pauses of half a second, so a busy
        // machine does not make it miss a deadline.
        c.websocket.pong_timeout_secs = 4;
        // The flood outpaces the reader; what it cannot take is dropped,
        // so only the heartbeat can close it.
        c.websocket.slow_consumer = roomgate::config::SlowConsumerPolicy::Drop;
    })
    .await;
    // A reader that pauses whenever it has caught up keeps the gateway's
    // writes to it in progress most of the time, so pings fall due in the
    // middle of writes. Between pauses it drains without stopping, and the
    // messages are large: what is queued ahead of a ping (the socket
    // buffers and two bounded batches) is a few hundred frames, read in a
    // moment whatever the build's speed, so a ping sent after the write is
    // answered well within the timeout. (A receive buffer below loopback's
    // 64 KiB segment size would stall the connection itself on zero-window
    // probes.)
    let mut reader = WsClient::connect_with(&gw.ws_url(), None, Some(256 * 1024)).await;
    let mut sender = gw.client().await;
    reader.join("busy").await;
    sender.join("busy").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        let filler = "x".repeat(8 * 1024);
        tokio::spawn(async move {
            // Bounded: stops when told, or after this many messages.
            for i in 0..2_000_000u64 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                sender
                    .send(json!({"type": "message", "room": "busy", "content": [i, &filler]}))
                    .await;
                if i % 64 == 0 {
                    // Read what came in: that is also how the client
                    // library answers the gateway's pings to the sender.
                    while let Some(Some(_)) =
                        futures_util::FutureExt::now_or_never(sender.ws.next())
                    {
                    }
                    tokio::task::yield_now().await;
                }
            }
            sender
        })
    };
    let (pings, messages) = within("four pings amid the flood", async {
        let (mut pings, mut messages) = (0, 0u64);
        while pings < 4 {
            let next = match futures_util::FutureExt::now_or_never(reader.ws.next()) {
                Some(next) => next,
                None => {
                    // Caught up: pause, so the gateway's writes block.
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    reader.ws.next().await
                }
            };
            match next {
                Some(Ok(Message::Ping(_))) => pings += 1,
                Some(Ok(Message::Text(_))) => messages += 1,
                Some(Ok(_)) => {}
                other => panic!("the busy client lost its connection: {other:?}"),
            }
        }
        (pings, messages)
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _sender = within("the flood to stop", flood)
        .await
        .expect("flood task");
    assert_eq!(pings, 4);
    assert!(messages > 0, "the room was busy");
    assert_eq!(
        gw.metric("roomgate_connections_closed_total{reason=\"ping_timeout\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_client_that_pings_but_never_reads_the_pongs_is_disconnected() {
    // Pongs queue up behind a full socket; past a bounded backlog the
    // gateway ends the connection instead of holding them all.
    let gw = TestGateway::with(|c| c.websocket.ping_interval_secs = 600).await;
    let mut stream = client_that_stops_reading(gw.addr, "pings").await;
    const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];
    let mut ping = vec![0x89, 0x80 | 125];
    ping.extend_from_slice(&MASK);
    ping.extend((0..125).map(|i| b'p' ^ MASK[i % 4]));
    let burst: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 1000)
        .collect();
    // Bounded: 200,000 pings would queue about 25 MB of pongs.
    let refused = within("the gateway to drop the connection", async {
        for _ in 0..200 {
            if stream.write_all(&burst).await.is_err() {
                return true;
            }
        }
        false
    })
    .await;
    assert!(refused, "the connection survived 200,000 unread pongs");
    eventually_async("the connection to be counted as closed", || async {
        gw.metric("roomgate_connections").await == 0.0
    })
    .await;
    // It did not take what it asked for: a slow consumer, not a client
    // that went away.
    assert_eq!(
        gw.metric(r#"roomgate_connections_closed_total{reason="slow_consumer"}"#)
            .await,
        1.0
    );
}

/// A client that keeps reading (and so answering pings) in the background
/// while the test floods a room through it.
struct Flooder {
    write: futures_util::stream::SplitSink<
        tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
        Message,
    >,
    frames: tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
}

impl Flooder {
    async fn join(gw: &TestGateway, room: &str) -> Self {
        let client = gw.client().await;
        let (write, mut read) = client.ws.split();
        let (tx, frames) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(message)) = read.next().await {
                if let Message::Text(text) = message {
                    let _ = tx.send(serde_json::from_str(text.as_str()).expect("JSON"));
                }
            }
        });
        let mut flooder = Self { write, frames };
        flooder.send(json!({"type": "join", "room": room})).await;
        assert_eq!(flooder.recv().await["type"], "joined");
        flooder
    }

    async fn send(&mut self, frame: serde_json::Value) {
        within(
            "sending a frame",
            self.write.send(Message::text(frame.to_string())),
        )
        .await
        .expect("the flooding client stays connected");
    }

    async fn recv(&mut self) -> serde_json::Value {
        within("a frame", self.frames.recv())
            .await
            .expect("the flooding client stays connected")
    }
}

/// A gateway whose send queue holds more than every buffer between it and
/// a client, with a heartbeat of a second.
async fn stuck_writer_gateway() -> TestGateway {
    TestGateway::with(|c| {
        c.websocket.ping_interval_secs = 1;
        c.websocket.pong_timeout_secs = 1;
        c.websocket.send_queue_capacity = 1024;
    })
    .await
}

/// Floods `firehose` from a client that keeps reading, until the gateway
/// closes a member that stopped reading for its missed pings; returns the
/// flooding client.
async fn flood_until_the_stuck_client_is_closed(gw: &TestGateway) -> Flooder {
    let mut sender = Flooder::join(gw, "firehose").await;
    let content = "f".repeat(60_000);
    for _ in 0..300 {
        sender
            .send(json!({"type": "message", "room": "firehose", "content": content}))
            .await;
    }
    eventually_async("the stuck client to be closed", || async {
        gw.metric("roomgate_connections_closed_total{reason=\"ping_timeout\"}")
            .await
            == 1.0
    })
    .await;
    sender
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_even_while_a_write_to_it_is_stuck() {
    // The backlog is larger than every buffer between the gateway and the
    // client, but fits in the send queue: nothing overflows, the writer is
    // simply stuck. The client cannot answer pings it never gets, so the
    // heartbeat must still end the connection.
    let gw = stuck_writer_gateway().await;
    let _stuck = client_that_stops_reading(gw.addr, "firehose").await;
    let mut sender = flood_until_the_stuck_client_is_closed(&gw).await;
    // The sender is the one left, and still served.
    sender.send(json!({"type": "join", "room": "other"})).await;
    assert_eq!(sender.recv().await["type"], "joined");
    assert_eq!(gw.metric("roomgate_connections").await, 1.0);
}

#[tokio::test]
async fn pongs_a_client_makes_up_do_not_keep_a_client_that_stopped_reading() {
    // The client never reads, so the pings stuck behind the backlog never
    // reach it; it sends pongs of its own (RFC 6455 allows unsolicited
    // ones). They answer no ping, and the heartbeat must still end it.
    let gw = stuck_writer_gateway().await;
    let mut stuck = client_that_stops_reading(gw.addr, "firehose").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let ponger = tokio::spawn(async move {
        // Bounded: at most 30 s of pongs, five a second.
        for _ in 0..150 {
            if stopped.load(std::sync::atomic::Ordering::Relaxed)
                || stuck
                    .write_all(&client_frame(0x8a, b"", true))
                    .await
                    .is_err()
                || stuck
                    .write_all(&client_frame(0x8a, &[0; 8], true))
                    .await
                    .is_err()
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
    flood_until_the_stuck_client_is_closed(&gw).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    within("the pong task to stop", ponger)
        .await
        .expect("pong task");
    assert_eq!(gw.metric("roomgate_connections").await, 1.0);
}

#[tokio::test]
async fn a_client_that_stops_reading_during_a_flood_is_closed() {
    // With a small queue the flood overflows it (slow consumer, 1013) at
    // some moment the writer may be blocked on any write, a ping included;
    // the session must end either way.
    let gw = TestGateway::with(|c| {
        c.websocket.ping_interval_secs = 1;
        c.websocket.pong_timeout_secs = 1;
        c.websocket.send_queue_capacity = 8;
    })
    .await;
    let _stuck = client_that_stops_reading(gw.addr, "firehose").await;
    let mut sender = Flooder::join(&gw, "firehose").await;
    let content = "f".repeat(60_000);
    within("the stuck client to be closed", async {
        loop {
            for _ in 0..10 {
                sender
                    .send(json!({"type": "message", "room": "firehose", "content": content}))
                    .await;
            }
            if gw.metric("roomgate_connections").await == 1.0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    sender.send(json!({"type": "join", "room": "other"})).await;
    assert_eq!(
        sender.recv().await["type"],
        "joined",
        "the sender is the one left"
    );
    let closed = gw
        .metric("roomgate_connections_closed_total{reason=\"slow_consumer\"}")
        .await
        + gw.metric("roomgate_connections_closed_total{reason=\"ping_timeout\"}")
            .await;
    assert_eq!(closed, 1.0);
}

/// Durations too long for the clock (ping interval, pong timeout, room idle
/// timeout, shutdown grace) mean "practically never": a session still
/// pings, joins, leaves (scheduling its empty room's expiry), closes, and
/// the gateway still stops.
#[tokio::test]
async fn durations_beyond_the_clock_range_do_not_break_sessions() {
    let gw = TestGateway::with(|c| {
        c.websocket.ping_interval_secs = 1;
        c.websocket.pong_timeout_secs = u64::MAX;
        c.websocket.rooms.idle_timeout_secs = u64::MAX;
        c.server.shutdown_grace_secs = u64::MAX;
    })
    .await;
    let mut client = gw.client().await;
    within("a ping from the gateway", async {
        loop {
            match client.ws.next().await {
                Some(Ok(Message::Ping(_))) => return,
                Some(Ok(_)) => continue,
                other => panic!("connection ended before a ping: {other:?}"),
            }
        }
    })
    .await;
    client.join("room").await;
    client.leave("room").await;
    client.join("room").await;
    client.ping_pong().await;
    client.close_normally().await;
    gw.stop().await;
}

/// Clients that vanish (a TCP reset, no close frame) while the room they
/// are in is busy are counted as gone by the client, not as errors,
/// whether the gateway notices while reading from them or while writing
/// to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_vanish_mid_traffic_count_as_client_closes_not_errors() {
    const VANISHING: usize = 20;
    let gw = TestGateway::start(test_config()).await;
    let mut sender = gw.client().await;
    sender.join("busy").await;
    let mut vanishing = Vec::new();
    for _ in 0..VANISHING {
        let mut client = gw.client().await;
        client.join("busy").await;
        vanishing.push(client);
    }
    let padding = "x".repeat(2048);
    for (i, client) in vanishing.into_iter().enumerate() {
        for seq in 0..20 {
            sender
                .send(json!({"type": "message", "room": "busy",
                    "content": {"client": i, "seq": seq, "padding": padding}}))
                .await;
        }
        client.abort();
    }
    eventually_async("only the sender to be left", || async {
        gw.metric("roomgate_connections").await == 1.0
    })
    .await;
    assert_eq!(
        gw.metric(r#"roomgate_connections_closed_total{reason="error"}"#)
            .await,
        0.0
    );
    assert_eq!(
        gw.metric(r#"roomgate_connections_closed_total{reason="client"}"#)
            .await,
        VANISHING as f64
    );
}

/// A client that sends far faster than it reads its replies is held back
/// by TCP, not closed and not robbed of replies: the gateway stops reading
/// its frames while their replies wait. Here 60,000 messages to a room the
/// client is not in make 60,000 `not_member` errors, about 7 MB: more than
/// the socket buffers between the gateway and a client with a small
/// receive buffer hold, and far more than a send queue of 16 frames. The
/// client reads only once the gateway has stopped reading (or closed it),
/// and gets every reply, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_faster_than_it_reads_is_held_back_not_closed() {
    const N: usize = 60_000;
    let gw = TestGateway::with(|c| c.websocket.send_queue_capacity = 16).await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(8192).expect("SO_RCVBUF");
    let mut stream = within("TCP connect", socket.connect(gw.addr))
        .await
        .expect("connect");
    upgrade_raw(&mut stream, gw.addr).await;
    let client_port = stream.local_addr().expect("local address").port();
    let (read, mut write) = stream.into_split();
    let id = |i: usize| format!("{i:0>60}");
    let frames: Vec<u8> = (0..N)
        .flat_map(|i| {
            let text = json!({"type": "message", "room": "elsewhere", "content": 0, "id": id(i)});
            client_frame(0x81, text.to_string().as_bytes(), true)
        })
        .collect();
    let writer = tokio::spawn(async move {
        write.write_all(&frames).await.expect("write the frames");
        write
    });

    // The gateway's side backs up, then its reading of the client stops
    // short of the last frame: the count of frames read holds still.
    let slow = r#"roomgate_connections_closed_total{reason="slow_consumer"}"#;
    let read_before_reading = within("the gateway to stop reading the client", async {
        let (mut last, mut still) = (-1.0, 0);
        loop {
            let read = gw.metric("roomgate_messages_received_total").await;
            let backed_up = tcp_send_queue(gw.addr.port(), client_port)
                .is_some_and(|queued| queued > 1_000_000);
            still = if read == last && backed_up {
                still + 1
            } else {
                0
            };
            last = read;
            if still >= 10 || gw.metric(slow).await > 0.0 {
                return read;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        read_before_reading < N as f64,
        "all {N} frames were read at once"
    );

    let mut read = tokio::io::BufReader::new(read);
    let welcome = within("the welcome frame", next_frame(&mut read)).await;
    assert!(String::from_utf8_lossy(&welcome.payload).contains("Connected as"));
    for i in 0..N {
        let frame = within("a reply", next_frame(&mut read)).await;
        assert_eq!(frame.opcode, 1, "reply {i} of {N}: {frame:?}");
        let reply: Value = serde_json::from_slice(&frame.payload).expect("JSON");
        assert_eq!(reply["code"], "not_member", "{reply}");
        assert_eq!(reply["id"], id(i), "{reply}");
    }
    within("the frames to be written", writer)
        .await
        .expect("writer task");
    assert_eq!(gw.metric(slow).await, 0.0);
}

/// Reads one unmasked frame from a buffered raw socket.
async fn next_frame(read: &mut (impl tokio::io::AsyncRead + Unpin)) -> RawFrame {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 2];
    read.read_exact(&mut head).await.expect("frame head");
    let len = match head[1] & 0x7f {
        126 => usize::from(read.read_u16().await.expect("length")),
        127 => usize::try_from(read.read_u64().await.expect("length")).expect("length"),
        n => usize::from(n),
    };
    let mut payload = vec![0u8; len];
    read.read_exact(&mut payload).await.expect("frame payload");
    RawFrame {
        opcode: head[0] & 0x0f,
        payload,
    }
}
