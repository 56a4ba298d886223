//! NATS is never in the way (SPEC §8): the gateway starts and serves
//! in-process rooms without NATS, survives nats-server dying mid-traffic,
//! comes back with its room interest when the server returns, reports
//! readiness as configured, and flushes its last events at shutdown.

mod common;
mod nats_support;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use nats_support::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// Sends `n` messages with ids from `sender`, each acknowledged before the
/// next; returns the sender.
async fn send_acked(mut sender: WsClient, room: &str, from: u64, n: u64) -> WsClient {
    for seq in from..from + n {
        let id = seq.to_string();
        sender
            .send(json!({"type": "message", "room": room, "content": {"seq": seq}, "id": id}))
            .await;
        assert_eq!(sender.recv().await, json!({"type": "ack", "id": id}));
    }
    sender
}

/// Receives messages `from..from + n` of `room` in order.
async fn receive_seq(client: &mut WsClient, room: &str, from: u64, n: u64) {
    for seq in from..from + n {
        let frame = client.recv().await;
        assert_eq!(frame["room"], room);
        assert_eq!(frame["content"]["seq"], seq, "{frame}");
    }
}

#[tokio::test]
async fn gateway_starts_without_nats_and_bridges_once_it_appears() {
    let mut server = NatsServer::start();
    server.stop();
    let gw = TestGateway::start(nats_config(&server.url())).await;

    // In-process rooms work without NATS.
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.join("general").await;
    b.join("general").await;
    a = send_acked(a, "general", 0, 3).await;
    receive_seq(&mut b, "general", 0, 3).await;
    assert_eq!(gw.metric("roomgate_nats_connected").await, 0.0);
    assert_eq!(gw.admin_get("/readyz").await.0, 200);
    // What could not be published is counted, not queued.
    eventually_async("publish errors to be counted", || async {
        gw.metric("roomgate_nats_publish_errors_total").await > 0.0
    })
    .await;

    server.restart();
    wait_nats_connected(&gw, true).await;
    let backend = Backend::connect(&server).await;
    let mut messages = backend.subscribe("roomgate.message.>").await;
    // The rooms joined before NATS was reachable are subscribed now.
    wait_subjects(&server, &gw.id, "general's subscription", |s| {
        covers_room(s, "general")
    })
    .await;
    backend.publish("roomgate.broadcast.general", "hello").await;
    let hello = server_message(Some("general"), "hello", "server");
    assert_eq!(a.recv().await, hello);
    assert_eq!(b.recv().await, hello);
    a = send_acked(a, "general", 3, 1).await;
    let (_, message) = messages.next_json().await;
    assert_eq!(message["content"], json!({"seq": 3}));
    receive_seq(&mut b, "general", 3, 1).await;
    drop(a);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_dying_mid_traffic_does_not_stop_local_rooms() {
    let mut server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let gw = nats_gateway(&server, |_| {}).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    join_synced(&mut a, &mut presence, "general").await;
    join_synced(&mut b, &mut presence, "general").await;
    drop(presence);
    drop(backend);

    // `a` keeps sending (each message acknowledged) while nats-server is
    // killed under it; `b` must get every message, in order.
    const N: u64 = 200;
    let (killed_tx, killed_rx) = tokio::sync::oneshot::channel::<()>();
    let sender = tokio::spawn(async move {
        let a = send_acked(a, "general", 0, N / 2).await;
        within("the kill", killed_rx).await.expect("killed");
        send_acked(a, "general", N / 2, N / 2).await
    });
    receive_seq(&mut b, "general", 0, N / 4).await;
    let errors = gw.metric("roomgate_nats_publish_errors_total").await;
    server.stop();
    let _ = killed_tx.send(());
    receive_seq(&mut b, "general", N / 4, N - N / 4).await;
    let mut a = within("the sender", sender).await.expect("sender task");
    wait_nats_connected(&gw, false).await;
    eventually_async("publish errors to be counted", || async {
        gw.metric("roomgate_nats_publish_errors_total").await > errors
    })
    .await;

    // A room joined during the outage, and a brand-new connection.
    let mut c = gw.client().await;
    c.join("joined.during.outage").await;
    a.join("joined.during.outage").await;
    a = send_acked(a, "joined.during.outage", 0, 1).await;
    receive_seq(&mut c, "joined.during.outage", 0, 1).await;

    server.restart();
    wait_nats_connected(&gw, true).await;
    let backend = Backend::connect(&server).await;
    let mut messages = backend.subscribe("roomgate.message.>").await;
    wait_subjects(&server, &gw.id, "both rooms' subscriptions", |s| {
        covers_room(s, "general") && covers_room(s, "joined.during.outage")
    })
    .await;
    backend.publish("roomgate.broadcast.general", "back").await;
    let back = server_message(Some("general"), "back", "server");
    assert_eq!(a.recv().await, back);
    assert_eq!(b.recv().await, back);
    backend
        .publish("roomgate.broadcast.joined.during.outage", "back too")
        .await;
    let back_too = server_message(Some("joined.during.outage"), "back too", "server");
    assert_eq!(a.recv().await, back_too);
    assert_eq!(c.recv().await, back_too);
    backend
        .publish(&format!("roomgate.send.{}", c.id), "direct")
        .await;
    assert_eq!(c.recv().await, server_message(None, "direct", "server"));
    // Publishing works again.
    a = send_acked(a, "general", N, 1).await;
    let (_, message) = messages.next_json().await;
    assert_eq!(message["content"], json!({"seq": N}));
    assert_eq!(message["from"], a.id.as_str());
    gw.stop().await;
}

/// A nats-server that stops answering (frozen with SIGSTOP: its TCP
/// connections stay open, nothing is read) does not slow clients down:
/// messages are acknowledged and delivered locally, and shutdown finishes.
/// The clients send far more than every buffer on the way to NATS holds
/// (the socket's, the NATS client's and the gateway's event queue), so the
/// gateway must have dropped events rather than wait for room in them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_nats_server_does_not_slow_clients() {
    /// The gateway's event queue (`EVENT_QUEUE` in src/server.rs).
    const EVENT_QUEUE: u64 = 16 * 1024;
    /// Messages sent while NATS is frozen.
    const N: u64 = 40_000;
    /// Messages written before their acks are read.
    const WINDOW: u64 = 200;
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    // Queues long enough that neither client can be closed as a slow
    // consumer while the other one writes ahead.
    let mut gw = nats_gateway(&server, |c| {
        c.websocket.send_queue_capacity = N as usize * 2;
    })
    .await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    join_synced(&mut a, &mut presence, "general").await;
    join_synced(&mut b, &mut presence, "general").await;
    let published = gw.metric("roomgate_nats_published_total").await;
    let errors = gw.metric("roomgate_nats_publish_errors_total").await;

    let pid = server.pid().expect("nats-server runs");
    signal(pid, "STOP");
    let padding = "x".repeat(1024);
    let receiver = tokio::spawn(async move {
        receive_seq(&mut b, "general", 0, N).await;
        b
    });
    within_for(
        Duration::from_secs(300),
        "every message to be acknowledged",
        async {
            for start in (0..N).step_by(WINDOW as usize) {
                let end = (start + WINDOW).min(N);
                within("a window of messages to be written", async {
                    for seq in start..end {
                        let message = json!({"type": "message", "room": "general",
                            "content": {"seq": seq, "padding": padding}, "id": seq.to_string()});
                        a.ws.feed(Message::text(message.to_string()))
                            .await
                            .expect("feed");
                    }
                    a.ws.flush().await.expect("flush");
                })
                .await;
                for seq in start..end {
                    assert_eq!(
                        a.recv().await,
                        json!({"type": "ack", "id": seq.to_string()})
                    );
                }
            }
        },
    )
    .await;
    let mut b = within_for(Duration::from_secs(300), "b to get every message", receiver)
        .await
        .expect("receiver task");

    // Every message made one event. What was neither handed to the NATS
    // client nor can still be in the queue (or in the one publish the
    // bridge may be waiting on) was dropped and counted: the queue did
    // overflow, and clients went on regardless.
    let (_, metrics) = gw.admin_get("/metrics").await;
    let handed = metric_value(&metrics, "roomgate_nats_published_total") - published;
    let failed = metric_value(&metrics, "roomgate_nats_publish_errors_total") - errors;
    let unpublished = N as f64 - handed;
    assert!(
        unpublished > (EVENT_QUEUE + 2) as f64,
        "only {unpublished} of {N} events were left unpublished, which the queue could hold: \
         the test did not overflow it"
    );
    assert!(
        failed >= unpublished - (EVENT_QUEUE + 2) as f64,
        "{failed} publish errors counted, {unpublished} events unpublished"
    );
    gw.begin_stop();
    assert_eq!(a.recv_close().await, Some(1001));
    assert_eq!(b.recv_close().await, Some(1001));
    gw.wait_stopped().await;
    signal(pid, "CONT");
}

/// Shutting down while NATS is unreachable finishes (bounded) and still
/// closes every client with 1001.
#[tokio::test]
async fn shutdown_while_nats_is_down_does_not_hang() {
    let mut server = NatsServer::start();
    server.stop();
    let mut gw = TestGateway::start(nats_config(&server.url())).await;
    let mut a = gw.client().await;
    a.join("general").await;
    gw.begin_stop();
    assert_eq!(a.recv_close().await, Some(1001));
    gw.wait_stopped().await;
}

#[tokio::test]
async fn required_nats_gates_readiness() {
    let mut server = NatsServer::start();
    server.stop();
    let gw = TestGateway::start({
        let mut config = nats_config(&server.url());
        config.nats.required = true;
        config
    })
    .await;
    let (status, body) = gw.admin_get("/readyz").await;
    assert_eq!((status, body.trim()), (503, "NATS disconnected"));
    // Not ready is not unhealthy: the process runs, and restarting it
    // would not bring NATS back.
    assert_eq!(gw.admin_get("/healthz").await, (200, "ok\n".to_string()));
    // Not ready, yet serving: rooms work.
    let mut a = gw.client().await;
    a.join("general").await;

    server.restart();
    eventually_async("/readyz to be 200 once NATS is up", || async {
        gw.admin_get("/readyz").await.0 == 200
    })
    .await;
    server.stop();
    eventually_async("/readyz to be 503 once NATS is gone", || async {
        gw.admin_get("/readyz").await.0 == 503
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_server_list_works_when_the_first_is_down() {
    let server = NatsServer::start();
    // Two dead servers before the live one: whichever order the client
    // tries them in, it most likely meets a dead one first.
    let down = format!(
        "nats://127.0.0.1:{},nats://127.0.0.1:{}",
        free_port(),
        free_port()
    );
    let backend = Backend::connect(&server).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let gw = TestGateway::start(nats_config(&format!("{down}, {}", server.url()))).await;
    wait_nats_connected(&gw, true).await;
    let mut a = gw.client().await;
    join_synced(&mut a, &mut presence, "general").await;
    backend.publish("roomgate.broadcast.general", "hi").await;
    assert_eq!(
        a.recv().await,
        server_message(Some("general"), "hi", "server")
    );
    gw.stop().await;
}

/// The `connection.close` events of the clients that shutdown closes reach
/// backends: the bridge publishes what is queued and flushes before `run`
/// returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_the_last_events_to_nats() {
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut closes = backend.subscribe("roomgate.connection.close").await;
    let mut leaves = backend.subscribe("roomgate.presence.>").await;
    let mut gw = nats_gateway(&server, |_| {}).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut client = gw.client().await;
        client.join("general").await;
        clients.push(client);
    }
    for _ in 0..5 {
        leaves.next().await; // the joins
    }
    gw.begin_stop();
    for client in &mut clients {
        assert_eq!(client.recv_close().await, Some(1001));
    }
    gw.wait_stopped().await;
    let mut closed: Vec<String> = Vec::new();
    for _ in 0..5 {
        let (_, close) = closes.next_json().await;
        assert_eq!(close["code"], 1001);
        assert_eq!(close["gateway"], gw.id.as_str());
        closed.push(close["connection_id"].as_str().expect("id").to_string());
    }
    let mut ids: Vec<String> = clients.iter().map(|c| c.id.clone()).collect();
    closed.sort();
    ids.sort();
    assert_eq!(closed, ids);
    for _ in 0..5 {
        let (_, leave) = leaves.next_json().await;
        assert_eq!(leave["event"], "leave");
    }
    closes.expect_silence().await;
}

/// Joins every room in `rooms`, a hundred frames at a time (well within
/// the send queue, which holds the replies until they are read).
async fn join_all(client: &mut WsClient, rooms: &[String]) {
    for batch in rooms.chunks(100) {
        for room in batch {
            client.send(json!({"type": "join", "room": room})).await;
        }
        for room in batch {
            assert_eq!(client.recv().await, json!({"type": "joined", "room": room}));
        }
    }
}

/// Rooms joined while NATS is unreachable do not hold up the bridge: more
/// of them than async-nats' command queue holds (2,048) used to cost half
/// a second each, and the events queued behind them were published after
/// the reconnect. Now every event of the outage is dropped and counted
/// while NATS is still down, a backend that stayed subscribed receives
/// none of them, and the rooms are subscribed once NATS is back.
///
/// The gateway reaches nats-server through a relay that the test cuts: the
/// backend stays connected, so its subscription is in place before the
/// gateway reconnects, whatever the reconnect's timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_joined_during_an_outage_do_not_hold_up_or_replay_events() {
    // Past the command queue by enough that the old behaviour (500 ms per
    // room beyond it) would take longer than any wait here.
    const ROOMS: usize = 2048 + 64;
    const SENT: u64 = 20;
    let server = NatsServer::start();
    let relay = Relay::start(server.port).await;
    let backend = Backend::connect(&server).await;
    let mut messages = backend.subscribe("roomgate.message.>").await;
    let gw = TestGateway::start({
        let mut config = nats_config(&relay.url());
        config.websocket.rooms.max_rooms_per_connection = ROOMS;
        config
    })
    .await;
    wait_nats_connected(&gw, true).await;
    let mut a = gw.client().await;

    relay.cut();
    wait_nats_connected(&gw, false).await;
    let errors = gw.metric("roomgate_nats_publish_errors_total").await;
    let rooms: Vec<String> = (0..ROOMS).map(|i| format!("outage.{i}")).collect();
    join_all(&mut a, &rooms).await;
    a = send_acked(a, "outage.0", 0, SENT).await;
    // A presence event per join and every message: dropped and counted
    // now, not left waiting for NATS.
    let outage_events = (ROOMS as u64 + SENT) as f64;
    eventually_async("the outage's events to be dropped and counted", || async {
        gw.metric("roomgate_nats_publish_errors_total").await >= errors + outage_events
    })
    .await;
    assert_eq!(gw.metric("roomgate_nats_connected").await, 0.0);

    relay.restore();
    wait_nats_connected(&gw, true).await;
    let last = &rooms[ROOMS - 1];
    wait_subjects(&server, &gw.id, "the rooms joined during the outage", |s| {
        covers_room(s, "outage.0") && covers_room(s, last)
    })
    .await;
    a = send_acked(a, "outage.0", SENT, 1).await;
    let (_, message) = messages.next_json().await;
    assert_eq!(
        message["content"],
        json!({"seq": SENT}),
        "the first message after the outage, none from it: {message}"
    );
    messages.expect_silence().await;
    backend
        .publish(&format!("roomgate.broadcast.{last}"), "back")
        .await;
    assert_eq!(a.recv().await, server_message(Some(last), "back", "server"));
    gw.stop().await;
}

/// Publishes, over a raw connection to `server`, a message whose subject
/// is not UTF-8, on `roomgate.send.*`, which every gateway subscribes to.
/// nats-server relays it as it is; the NATS client library cannot read it
/// and takes its connection for broken.
async fn publish_unreadable(server: &NatsServer) {
    let mut command = b"PUB roomgate.send.".to_vec();
    command.extend_from_slice(b"\xff\xfe 2\r\nhi\r\n");
    publish_raw(server, &command).await;
}

/// Publishes, over a raw connection to `server`, a message on
/// `roomgate.all` with a header value holding a bare CR. nats-server
/// relays it as it is; the NATS client library's connection task panics
/// on it, and the client never connects again.
async fn publish_poison(server: &NatsServer) {
    let headers = "NATS/1.0\r\nX-A: a\rb\r\n\r\n";
    let total = headers.len() + 2;
    let command = format!(
        "HPUB roomgate.all {} {total}\r\n{headers}hi\r\n",
        headers.len()
    );
    publish_raw(server, command.as_bytes()).await;
}

/// Sends `publication` to `server` over a raw connection, and waits until
/// the server has taken it.
async fn publish_raw(server: &NatsServer, publication: &[u8]) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let stream = within(
        "a raw NATS connection",
        tokio::net::TcpStream::connect(("127.0.0.1", server.port)),
    )
    .await
    .expect("connect");
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    within("INFO", stream.read_line(&mut line))
        .await
        .expect("INFO");
    assert!(line.starts_with("INFO"), "{line}");
    let mut command = b"CONNECT {\"verbose\":false,\"headers\":true}\r\n".to_vec();
    command.extend_from_slice(publication);
    command.extend_from_slice(b"PING\r\n");
    within("the publication", stream.get_mut().write_all(&command))
        .await
        .expect("write");
    line.clear();
    within("PONG", stream.read_line(&mut line))
        .await
        .expect("PONG");
    assert_eq!(line, "PONG\r\n", "nats-server took the publication");
}

/// Has `client` say something in `room` and checks that `backend` hears it.
async fn client_messages_reach_nats(backend: &Backend, client: &mut WsClient, room: &str) {
    let mut messages = backend.subscribe(&format!("roomgate.message.{room}")).await;
    client
        .send(json!({"type": "message", "room": room, "content": "back"}))
        .await;
    let (_, message) = messages.next_json().await;
    assert_eq!(message["content"], "back");
}

/// Broadcasts to `room` until `client`, a member, gets one: for a gateway
/// that is subscribing again. Bounded: 100 tries, 200 ms each.
async fn broadcast_until_received(backend: &Backend, client: &mut WsClient, room: &str) {
    for attempt in 0..100 {
        backend
            .publish(
                &format!("roomgate.broadcast.{room}"),
                &format!("after {attempt}"),
            )
            .await;
        if let Ok(frame) = tokio::time::timeout(Duration::from_millis(200), client.recv()).await {
            assert_eq!(frame["room"], room, "{frame}");
            return;
        }
    }
    panic!("no broadcast to {room} arrived");
}

#[tokio::test]
async fn a_message_the_nats_client_cannot_read_costs_a_reconnect_not_the_bridge() {
    let server = NatsServer::start();
    let (gw, backend, mut client) =
        gateway_with_a_member(&server.url(), Backend::connect(&server).await, "r").await;

    publish_unreadable(&server).await;

    // Messages published while the gateway reconnects are lost (core NATS
    // keeps nothing for it); once it is back and subscribed again, they
    // arrive.
    broadcast_until_received(&backend, &mut client, "r").await;
    wait_nats_connected(&gw, true).await;
    // And the other way: the client's messages reach NATS again.
    client_messages_reach_nats(&backend, &mut client, "r").await;
    drop(client);
    gw.stop().await;
}

#[tokio::test]
async fn a_message_that_stops_the_nats_client_costs_a_new_client_not_the_bridge() {
    let server = NatsServer::start();
    let (gw, backend, mut client) =
        gateway_with_a_member(&server.url(), Backend::connect(&server).await, "r").await;
    let connects = server.monitor("/varz").await["total_connections"].clone();

    publish_poison(&server).await;

    // The old client is gone for good, so only a new one brings
    // broadcasts back.
    broadcast_until_received(&backend, &mut client, "r").await;
    assert_ne!(
        server.monitor("/varz").await["total_connections"],
        connects,
        "a new connection"
    );
    // Rooms joined from now on are subscribed on the new client, and a
    // join waits for its room's subscription again: a broadcast sent the
    // moment `joined` is read reaches the new member.
    let mut other = gw.client().await;
    for round in 0..20 {
        let room = format!("later{round}");
        other.join(&room).await;
        backend
            .publish(&format!("roomgate.broadcast.{room}"), "hello")
            .await;
        assert_eq!(
            other.recv().await,
            server_message(Some(&room), "hello", "server"),
            "round {round}"
        );
        other.leave(&room).await;
    }
    other.join("later").await;
    // And the other way: client messages reach NATS again.
    client_messages_reach_nats(&backend, &mut other, "later").await;
    drop((client, other));
    gw.stop().await;
}

/// While NATS is frozen, client messages queued for it are bounded in
/// bytes, not only in number: a few thousand 16 KiB messages, far fewer
/// than the queue's 16,384 events but far more than its 32 MiB, are
/// mostly dropped and counted rather than held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_queued_for_a_frozen_nats_are_bounded_in_bytes() {
    /// Messages sent while NATS is frozen: 96 MiB of content.
    const N: u64 = 6000;
    /// The queue's byte budget (`EVENT_QUEUE_BYTES` in src/server.rs).
    const QUEUE_BYTES: f64 = 32.0 * 1024.0 * 1024.0;
    const SIZE: usize = 16 * 1024;
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let gw = nats_gateway(&server, |_| {}).await;
    let mut a = gw.client().await;
    join_synced(&mut a, &mut presence, "big").await;
    let errors = gw.metric("roomgate_nats_publish_errors_total").await;

    let pid = server.pid().expect("nats-server runs");
    signal(pid, "STOP");
    let padding = "x".repeat(SIZE);
    within_for(
        Duration::from_secs(300),
        "every message to be acknowledged",
        async {
            for seq in 0..N {
                let id = seq.to_string();
                a.send(json!({"type": "message", "room": "big",
                "content": {"seq": seq, "padding": padding}, "id": id}))
                    .await;
                assert_eq!(a.recv().await, json!({"type": "ack", "id": id}));
            }
        },
    )
    .await;
    let failed = gw.metric("roomgate_nats_publish_errors_total").await - errors;
    signal(pid, "CONT");
    // What the NATS client and its socket took (2,048 commands and a few
    // MB) and what the queue holds (32 MiB) leave the rest dropped; a
    // queue bounded by count alone would have held all of them.
    let held = N as f64 - failed;
    assert!(
        held * SIZE as f64 <= QUEUE_BYTES + 2048.0 * SIZE as f64 + 8.0 * 1024.0 * 1024.0,
        "{held} of {N} messages held ({failed} dropped)"
    );
    gw.stop().await;
}

/// More rooms change interest than the bridge lists one by one (65,536)
/// while a frozen nats-server holds it up: once NATS is back it reconciles
/// every room. A room joined during the stall gets its subscription, a room
/// left loses its own, and none of the rooms that came and went has one.
/// The bridge is held up for as long as the stall lasts, whatever the
/// machine's speed: a room whose subscribe timed out is retried every
/// 500 ms, and against a full NATS client queue each retry waits 500 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_interest_bound_a_stalled_bridge_reconciles_every_room() {
    /// More than twice the rooms the bridge collects one by one
    /// (`MAX_INTEREST`, 65,536), so the list overflows even should the
    /// bridge take it once in the middle.
    const CHURN: usize = 140_000;
    /// Rooms joined and left per burst.
    const BURST: usize = 500;
    let server = NatsServer::start();
    let gateway = nats_gateway_process(
        &server,
        &[
            ("ROOMGATE_WEBSOCKET_SEND_QUEUE_CAPACITY", "4096"),
            // Clients that wait without reading miss no ping, however
            // long the churn takes.
            ("ROOMGATE_WEBSOCKET_PING_INTERVAL_SECS", "3600"),
        ],
    );
    let metric = |name: &'static str| process_metric(&gateway, name);
    wait_connected(&gateway).await;
    let ws = format!("ws://{}/ws", gateway.addr);
    let mut leaver = WsClient::connect(&ws).await;
    leaver.join("before").await;
    wait_for_subscriber(&server, "roomgate.*.before").await;

    let pid = server.pid().expect("nats-server runs");
    signal(pid, "STOP");
    // Fill every buffer on the way to NATS (the socket's, the NATS client's
    // queue of 2,048 commands, the gateway's event queue) until publishing
    // fails: from then on a subscribe waits out its timeout.
    let padding = "x".repeat(4096);
    within_for(Duration::from_secs(120), "a publish to time out", async {
        for round in 0..400 {
            if metric("roomgate_nats_publish_errors_total").await > 0.0 {
                return;
            }
            let frames = (0..100).map(|i| {
                json!({"type": "message", "room": "before", "content": padding,
                    "id": format!("{round}.{i}")})
            });
            leaver.send_burst(frames).await;
            for _ in 0..100 {
                assert_eq!(leaver.recv().await["type"], "ack");
            }
        }
        panic!("40,000 messages and no publish timed out");
    })
    .await;
    // A room whose subscribe times out now, and is retried from then on.
    let mut late = WsClient::connect(&ws).await;
    late.join("late").await;
    eventually("the late room's subscribe to time out", || {
        gateway.logged("cannot subscribe to a room yet") > 0
    })
    .await;
    // Changes the bridge cannot follow one by one: noted first, then lost
    // when the list overflows, so only reconciling every room finds them.
    // Its `joined` waits for the room's subscription, which the stalled
    // bridge cannot make, but not for long: the stall must not hold joins.
    let mut early = WsClient::connect(&ws).await;
    early.join("early").await;
    leaver.leave("before").await;
    // The churn: each room gains its first member and loses it.
    let mut churner = WsClient::connect(&ws).await;
    within_for(Duration::from_secs(300), "the churn", async {
        for start in (0..CHURN).step_by(BURST) {
            let frames = (start..start + BURST).flat_map(|r| {
                let room = format!("churn.{r}");
                [
                    json!({"type": "join", "room": room}),
                    json!({"type": "leave", "room": room}),
                ]
            });
            churner.send_burst(frames).await;
            for _ in 0..2 * BURST {
                let reply = churner.recv().await;
                assert!(
                    reply["type"] == "joined" || reply["type"] == "left",
                    "{reply}"
                );
            }
        }
    })
    .await;
    signal(pid, "CONT");

    // Back: the rooms joined are subscribed, the one left is not, and no
    // churned room is.
    let mut last = Vec::new();
    let settled = async {
        loop {
            last = subjects_of(&server, |name| name.starts_with("roomgate ")).await;
            let has = |room: &str| last.iter().any(|s| s.ends_with(&format!(".{room}")));
            if has("late") && has("early") && !has("before") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), settled)
        .await
        .is_err()
    {
        panic!("the subscriptions did not settle: {last:?}");
    }
    assert!(
        !last.iter().any(|s| s.contains(".churn.")),
        "no churned room is subscribed: {last:?}"
    );
    // The interest set overflowed and every room was reconciled (the log
    // is read in the background).
    eventually("the overflow to be logged", || {
        gateway.logged("too many room interest changes") > 0
    })
    .await;
    let backend = Backend::connect(&server).await;
    for (room, client) in [("late", &mut late), ("early", &mut early)] {
        backend
            .publish(&format!("roomgate.broadcast.{room}"), "after")
            .await;
        assert_eq!(
            client.recv_type("message").await,
            server_message(Some(room), "after", "server")
        );
    }
}

/// Stops `gateway` with SIGTERM, checks that it exits 0, and waits until
/// its log, read in the background, has been read to the end: once the
/// line of its stop has been read, every line before it has been too.
async fn stop_and_read_log(mut gateway: GatewayProcess) -> GatewayProcess {
    gateway.signal("TERM");
    assert_eq!(gateway.wait_exit(), 0);
    eventually("the stop to be logged", || {
        gateway.logged("roomgate stopped") > 0
    })
    .await;
    gateway
}

#[tokio::test]
async fn a_message_larger_than_the_servers_max_payload_is_reported_once() {
    // The server takes 2 KB, clients may send 64 KB: a 4 KB message is
    // delivered on its instance, fails to publish, and the operator is
    // told once which settings disagree.
    let server = NatsServer::start_with_config("max_payload: 2048\n");
    let backend = Backend::connect(&server).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let mut messages = backend.subscribe("roomgate.message.>").await;
    let gateway = nats_gateway_process(&server, &[]);
    let metric = |name: &'static str| process_metric(&gateway, name);
    wait_connected(&gateway).await;
    let ws = format!("ws://{}/ws", gateway.addr);
    let (mut a, mut b) = (WsClient::connect(&ws).await, WsClient::connect(&ws).await);
    join_synced(&mut a, &mut presence, "big").await;
    join_synced(&mut b, &mut presence, "big").await;

    let big = "x".repeat(4000);
    for id in ["1", "2"] {
        a.say("big", json!(big), id).await;
        assert_eq!(b.recv().await["content"], big.as_str(), "delivered here");
    }
    a.say("big", json!("small"), "3").await;
    let (_, payload) = messages.next_json().await;
    assert_eq!(
        payload["content"], "small",
        "only the small one was published"
    );
    assert_eq!(metric("roomgate_nats_publish_errors_total").await, 2.0);
    let gateway = stop_and_read_log(gateway).await;
    assert_eq!(gateway.logged("max_payload"), 1, "said once");
}

#[tokio::test]
async fn subscriptions_past_the_servers_limit_are_logged_once_for_a_burst() {
    // nats-server refuses subscriptions past its `max_subscriptions` with
    // an error that keeps the connection open: the gateway says so, once
    // for a burst of them rather than once each.
    let server = NatsServer::start_with_config("max_subscriptions: 4\n");
    let gateway = nats_gateway_process(&server, &[]);
    wait_connected(&gateway).await;
    let mut client = WsClient::connect(&format!("ws://{}/ws", gateway.addr)).await;
    // Three fixed subjects and the first room reach the limit; the round
    // trip's inbox and the other rooms are refused.
    for room in ["r0", "r1", "r2", "r3"] {
        client.join(room).await;
    }
    let gateway = stop_and_read_log(gateway).await;
    assert_eq!(
        gateway.logged("maximum subscriptions exceeded"),
        1,
        "said once"
    );
}

/// Waits (bounded) until `gateway` reports itself connected to NATS.
async fn wait_connected(gateway: &GatewayProcess) {
    eventually_async("the gateway is connected to NATS", || async {
        process_metric(gateway, "roomgate_nats_connected").await == 1.0
    })
    .await;
}

#[tokio::test]
async fn nats_lost_for_a_while_is_explained_once_per_outage() {
    // async-nats says nothing of why it cannot reconnect: after 3 s the
    // gateway says that NATS is not reachable, and what it found there,
    // once for each outage.
    let mut server = NatsServer::start();
    let gateway = nats_gateway_process(&server, &[]);
    wait_connected(&gateway).await;
    for outage in 1..=2 {
        server.stop();
        eventually("the outage to be explained", || {
            gateway.logged("cannot connect (Connection refused") == outage
        })
        .await;
        server.restart();
        wait_connected(&gateway).await;
    }
    let gateway = stop_and_read_log(gateway).await;
    assert_eq!(gateway.logged("NATS not reachable"), 2, "once per outage");
}

#[tokio::test]
async fn a_refused_login_is_explained_once_and_the_clients_errors_are_not_repeated() {
    // async-nats logs the refused login as an error on every attempt,
    // several times a second at first; the gateway lets the first through,
    // and says itself what is wrong.
    let server = NatsServer::start_with_args(&["--user", "alice", "--pass", "hunter2"]);
    let url = format!("nats://alice:wrong@127.0.0.1:{}", server.port);
    let gateway = gateway_process_on(&url, &[]);
    eventually("the unreachable server to be logged", || {
        gateway.logged("NATS not reachable") > 0
    })
    .await;
    // By now (3 s) the client has tried at least three times.
    let gateway = stop_and_read_log(gateway).await;
    assert_eq!(gateway.logged("a NATS server that requires a login"), 1);
    assert_eq!(gateway.logged("authorization violation"), 1);
}

#[tokio::test]
async fn nats_unreachable_from_the_start_is_logged_with_what_is_there() {
    // async-nats says nothing until a first connection, so the gateway
    // says it itself, once, with what it found at each server: nothing
    // listening at the first, and at the second a listener that never
    // greets (a port that is not NATS). Rooms are served all the same.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a listener");
    let silent = silent.local_addr().expect("its address");
    let url = format!("nats://127.0.0.1:{}, nats://{silent}", free_port());
    let gateway = gateway_process_on(&url, &[]);
    eventually("the unreachable servers to be logged", || {
        gateway.logged("NATS not reachable") > 0
    })
    .await;
    assert_eq!(gateway.logged("cannot connect (Connection refused"), 1);
    assert_eq!(
        gateway.logged(&format!(
            "{silent}: accepts connections but sends no greeting"
        )),
        1
    );
    let mut client = WsClient::connect(&format!("ws://{}/ws", gateway.addr)).await;
    client.join("lobby").await;
    let gateway = stop_and_read_log(gateway).await;
    assert_eq!(gateway.logged("NATS not reachable"), 1, "said once");
}

#[tokio::test]
async fn a_server_at_its_connection_limit_is_named_as_answering_and_joined_once_it_has_room() {
    // nats-server at `max_connections` greets a new client as usual and
    // then refuses it, so the greeting explains nothing: the gateway says
    // that a NATS server answers but does not take the client (after a
    // second look, which `nats::diagnose`'s unit tests count). Once there
    // is room, the client connects.
    let server = NatsServer::start_with_config("max_connections: 1\n");
    let occupant = server.client().await;
    let gateway = nats_gateway_process(&server, &[]);
    eventually("the server at its limit to be named", || {
        gateway.logged("a NATS server answers, and the client has not connected to it") == 1
    })
    .await;
    assert_eq!(gateway.logged("NATS not reachable"), 1);
    drop(occupant);
    wait_connected(&gateway).await;
    let gateway = stop_and_read_log(gateway).await;
    assert_eq!(gateway.logged("NATS not reachable"), 1, "said once");
}
