//! Rooms over their lifetime, from outside: cleanup when a member
//! disconnects, freeing empty rooms after `idle_timeout_secs`, presence
//! frames, the admin view of rooms and the room and message metrics.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{Value, json};

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// The member count of `room` on the admin port, `None` if it is not held.
async fn members(gw: &TestGateway, room: &str) -> Option<u64> {
    let (status, detail) = gw.admin_json(&format!("/rooms/{room}")).await;
    match status {
        200 => Some(detail["members"].as_u64().expect("members")),
        404 => None,
        other => panic!("/rooms/{room} answered {other}: {detail}"),
    }
}

/// The member ids of `room`, as a set.
async fn member_ids(gw: &TestGateway, room: &str) -> HashSet<String> {
    let (status, detail) = gw.admin_json(&format!("/rooms/{room}")).await;
    assert_eq!(status, 200, "{room}: {detail}");
    detail["member_ids"]
        .as_array()
        .expect("member_ids")
        .iter()
        .map(|id| id.as_str().expect("id").to_string())
        .collect()
}

/// Names of the rooms `GET /rooms` lists.
async fn listed_rooms(gw: &TestGateway) -> Vec<String> {
    let (status, list) = gw.admin_json("/rooms").await;
    assert_eq!(status, 200);
    list["rooms"]
        .as_array()
        .expect("rooms")
        .iter()
        .map(|r| r["room"].as_str().expect("room").to_string())
        .collect()
}

async fn wait_for_members(gw: &TestGateway, room: &str, count: u64) {
    eventually_async(&format!("{room} to have {count} members"), || async {
        members(gw, room).await == Some(count)
    })
    .await;
}

// ----- disconnect cleanup -------------------------------------------------

#[tokio::test]
async fn a_disconnected_client_leaves_every_room_it_was_in() {
    let gw = TestGateway::start(test_config()).await;
    let rooms = ["d1", "d2", "game.7"];
    let mut stays = gw.client().await;
    for room in rooms {
        stays.join(room).await;
    }
    let only_stays = HashSet::from([stays.id.clone()]);

    // Closed cleanly (close frame), then abruptly (TCP reset).
    for clean in [true, false] {
        let mut leaving = gw.client().await;
        for room in rooms {
            leaving.join(room).await;
        }
        for room in rooms {
            assert_eq!(
                member_ids(&gw, room).await,
                HashSet::from([stays.id.clone(), leaving.id.clone()])
            );
        }
        if clean {
            leaving.close_normally().await;
        } else {
            leaving.abort();
        }
        for room in rooms {
            wait_for_members(&gw, room, 1).await;
            assert_eq!(member_ids(&gw, room).await, only_stays, "clean: {clean}");
        }
        eventually_async("the connection to be gone", || async {
            gw.metric("roomgate_connections").await == 1.0
        })
        .await;
    }
    // The remaining member is unaffected and its messages reach nobody gone.
    for room in rooms {
        stays.say(room, json!("anyone?"), room).await;
    }
    let (_, list) = gw.admin_json("/rooms").await;
    assert_eq!(list["rooms"].as_array().map(Vec::len), Some(3), "{list}");
    gw.stop().await;
}

// ----- freeing empty rooms ------------------------------------------------

#[tokio::test]
async fn an_empty_room_is_kept_until_its_idle_timeout() {
    const IDLE: Duration = Duration::from_secs(2);
    let gw = TestGateway::with(|c| c.websocket.rooms.idle_timeout_secs = IDLE.as_secs()).await;
    let mut a = gw.client().await;
    // Each round empties a room, lets half the idle timeout pass and looks
    // again. `emptied` is taken before the leave, so the room has been
    // empty for less than `emptied.elapsed()`: while that is under the
    // idle timeout, the room must still be there. A round that took longer
    // proves nothing and is repeated with another room.
    let started = Instant::now();
    let mut round = 0;
    let (room, emptied) = loop {
        round += 1;
        assert!(
            started.elapsed() < WAIT,
            "no round looked at an emptied room within its idle timeout"
        );
        let room = format!("kept{round}");
        a.join(&room).await;
        let emptied = Instant::now();
        a.leave(&room).await;
        tokio::time::sleep(IDLE / 2).await;
        let (status, detail) = gw.admin_json(&format!("/rooms/{room}")).await;
        let rooms = gw.metric("roomgate_rooms").await;
        if emptied.elapsed() >= IDLE {
            continue;
        }
        assert_eq!(status, 200, "{room} was freed before its idle timeout");
        assert_eq!(detail["members"], 0);
        assert_eq!(detail["member_ids"], json!([]));
        assert!(rooms >= 1.0, "empty rooms count: {rooms}");
        break (room, emptied);
    };
    // Then it is freed, and not before its idle timeout.
    eventually_async(&format!("{room} to be freed"), || async {
        members(&gw, &room).await.is_none()
    })
    .await;
    let gone_after = emptied.elapsed();
    assert!(gone_after >= IDLE, "{room} was freed after {gone_after:?}");
    gw.stop().await;
}

#[tokio::test]
async fn an_emptied_room_joined_again_is_the_same_room() {
    // The default idle timeout is an hour: an emptied room stays listed.
    let gw = TestGateway::start(test_config()).await;
    let mut a = gw.client().await;
    a.join("kept").await;
    let (_, before) = gw.admin_json("/rooms/kept").await;
    a.leave("kept").await;
    let (status, after) = gw.admin_json("/rooms/kept").await;
    assert_eq!(status, 200);
    assert_eq!(after["members"], 0);
    assert_eq!(after["member_ids"], json!([]));
    assert_eq!(gw.metric("roomgate_rooms").await, 1.0, "empty rooms count");
    // Joining again finds the same room.
    a.join("kept").await;
    let (_, again) = gw.admin_json("/rooms/kept").await;
    assert_eq!(again["created"], before["created"]);
    gw.stop().await;
}

#[tokio::test]
async fn empty_rooms_are_freed_after_the_idle_timeout() {
    let gw = TestGateway::with(|c| c.websocket.rooms.idle_timeout_secs = 1).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    for room in ["i1", "i2", "i3"] {
        a.join(room).await;
    }
    b.join("i3").await;
    assert_eq!(gw.metric("roomgate_rooms").await, 3.0);
    // Emptied by a leave, by a clean close and by a reset.
    a.leave("i1").await;
    a.close_normally().await;
    wait_for_members(&gw, "i2", 0).await;
    b.abort();
    eventually_async("every room to be freed", || async {
        gw.metric("roomgate_rooms").await == 0.0 && listed_rooms(&gw).await.is_empty()
    })
    .await;
    for room in ["i1", "i2", "i3"] {
        assert_eq!(members(&gw, room).await, None, "{room} is gone");
    }
    gw.stop().await;
}

#[tokio::test]
async fn with_no_idle_timeout_an_emptied_room_is_freed_at_once() {
    let gw = TestGateway::with(|c| c.websocket.rooms.idle_timeout_secs = 0).await;
    let mut a = gw.client().await;
    a.join("now").await;
    a.join("stays").await;
    assert_eq!(listed_rooms(&gw).await, ["now", "stays"]);
    a.leave("now").await;
    // The leave was fully handled before the next frame was read: the room
    // is gone without any waiting.
    assert_eq!(a.barrier().await, Vec::<Value>::new());
    assert_eq!(listed_rooms(&gw).await, ["stays"]);
    assert_eq!(gw.metric("roomgate_rooms").await, 1.0);
    // A disconnect frees the rest.
    a.abort();
    eventually_async("the last room to be freed", || async {
        gw.metric("roomgate_rooms").await == 0.0
    })
    .await;
    assert!(listed_rooms(&gw).await.is_empty());
    // A room can be created again under the same name.
    let mut b = gw.client().await;
    let mut c = gw.client().await;
    b.join("now").await;
    c.join("now").await;
    b.say("now", json!("again"), "x").await;
    assert_eq!(c.recv().await["content"], "again");
    gw.stop().await;
}

#[tokio::test]
async fn a_room_rejoined_before_its_idle_timeout_is_not_freed_under_its_members() {
    const IDLE: u64 = 2;
    let gw = TestGateway::with(|c| c.websocket.rooms.idle_timeout_secs = IDLE).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.join("busy").await;
    let (_, first) = gw.admin_json("/rooms/busy").await;
    a.leave("busy").await;
    let emptied = Instant::now();
    // A second room emptied later: once it is freed, the sweeper has been
    // past the moment "busy" would have expired too.
    a.join("marker").await;
    a.leave("marker").await;
    a.join("busy").await;
    b.join("busy").await;
    let rejoined_in_time = emptied.elapsed() < Duration::from_secs(IDLE);

    eventually_async("the marker room to be freed", || async {
        members(&gw, "marker").await.is_none()
    })
    .await;
    assert_eq!(
        member_ids(&gw, "busy").await,
        HashSet::from([a.id.clone(), b.id.clone()])
    );
    if rejoined_in_time {
        let (_, now) = gw.admin_json("/rooms/busy").await;
        assert_eq!(now["created"], first["created"], "the same room, kept");
    }
    assert_eq!(gw.metric("roomgate_rooms").await, 1.0);
    // Its members still talk, and a newcomer joins the same room.
    a.say("busy", json!("still here"), "1").await;
    assert_eq!(b.recv().await["content"], "still here");
    let mut c = gw.client().await;
    c.join("busy").await;
    b.say("busy", json!("welcome"), "2").await;
    assert_eq!(a.recv().await["content"], "welcome");
    assert_eq!(c.recv().await["content"], "welcome");

    // Emptied, re-joined and emptied again within one idle period, it is
    // still freed in the end.
    for client in [&mut a, &mut b, &mut c] {
        client.leave("busy").await;
    }
    a.join("busy").await;
    a.leave("busy").await;
    eventually_async("the room to be freed once idle", || async {
        members(&gw, "busy").await.is_none()
    })
    .await;
    assert_eq!(gw.metric("roomgate_rooms").await, 0.0);
    gw.stop().await;
}

/// Joins and leaves each of `rooms`, pipelined a hundred rooms at a time
/// (two hundred replies fit in the default send queue), and checks every
/// reply.
async fn churn(client: &mut WsClient, rooms: &[String]) {
    for batch in rooms.chunks(100) {
        for room in batch {
            client.send(json!({"type": "join", "room": room})).await;
            client.send(json!({"type": "leave", "room": room})).await;
        }
        for room in batch {
            assert_eq!(client.recv().await, json!({"type": "joined", "room": room}));
            assert_eq!(client.recv().await, json!({"type": "left", "room": room}));
        }
    }
}

#[tokio::test]
async fn empty_rooms_beyond_the_bound_are_freed_oldest_first() {
    // The default idle timeout (an hour): only the bound frees rooms here.
    let gw = TestGateway::start(test_config()).await;
    let max = roomgate::rooms::MAX_EMPTY_ROOMS;
    let mut a = gw.client().await;
    // Emptied first, then occupied again: it no longer waits, so it is not
    // the first to go, nor ever while it has a member.
    a.join("back").await;
    a.leave("back").await;
    a.join("back").await;

    let fresh: Vec<String> = (0..max + 100).map(|i| format!("churn.{i}")).collect();
    churn(&mut a, &fresh).await;

    assert_eq!(
        gw.metric("roomgate_rooms").await,
        (max + 1) as f64,
        "the bound's worth of empty rooms, and the occupied one"
    );
    for gone in ["churn.0", "churn.99"] {
        assert_eq!(members(&gw, gone).await, None, "{gone} waited longest");
    }
    for kept in ["churn.100".to_string(), format!("churn.{}", max + 99)] {
        assert_eq!(members(&gw, &kept).await, Some(0), "{kept} still waits");
    }
    assert_eq!(member_ids(&gw, "back").await, HashSet::from([a.id.clone()]));

    // Emptied now, "back" waits as the newest room and pushes out the
    // oldest one; a room freed early is made again by the next join.
    a.leave("back").await;
    assert_eq!(members(&gw, "back").await, Some(0));
    assert_eq!(members(&gw, "churn.100").await, None);
    assert_eq!(gw.metric("roomgate_rooms").await, max as f64);
    a.join("churn.0").await;
    assert_eq!(members(&gw, "churn.0").await, Some(1));
    gw.stop().await;
}

// ----- presence -----------------------------------------------------------

fn presence(room: &str, event: &str, connection_id: &str) -> Value {
    json!({"type": "presence", "room": room, "event": event,
           "connection_id": connection_id, "user": null})
}

#[tokio::test]
async fn presence_frames_announce_joins_and_leaves_to_the_other_members() {
    let gw = TestGateway::with(|c| c.websocket.rooms.presence = true).await;
    let mut a = gw.client().await;
    a.join("p").await;

    // A join and a leave.
    let mut b = gw.client().await;
    b.join("p").await;
    assert_eq!(a.recv().await, presence("p", "join", &b.id));
    b.leave("p").await;
    assert_eq!(a.recv().await, presence("p", "leave", &b.id));
    // b was told `joined` and `left`, nothing about itself or about a.
    assert_eq!(b.barrier().await, Vec::<Value>::new());

    // Leaving by disconnecting, cleanly or not.
    for clean in [true, false] {
        let mut c = gw.client().await;
        c.join("p").await;
        assert_eq!(a.recv().await, presence("p", "join", &c.id));
        let c_id = c.id.clone();
        if clean {
            c.close_normally().await;
        } else {
            c.abort();
        }
        assert_eq!(
            a.recv().await,
            presence("p", "leave", &c_id),
            "clean: {clean}"
        );
    }

    // Presence is per room: joins elsewhere are not announced here.
    let mut d = gw.client().await;
    d.join("elsewhere").await;
    // Joining again is no new presence.
    b.join("p").await;
    assert_eq!(a.recv().await, presence("p", "join", &b.id));
    b.join("p").await;
    assert_eq!(a.barrier().await, Vec::<Value>::new());
    gw.stop().await;
}

#[tokio::test]
async fn there_are_no_presence_frames_by_default() {
    let gw = TestGateway::start(test_config()).await;
    let mut a = gw.client().await;
    a.join("p").await;
    let mut b = gw.client().await;
    b.join("p").await;
    b.leave("p").await;
    b.join("p").await;
    b.abort();
    let mut c = gw.client().await;
    c.join("p").await;
    c.close_normally().await;
    wait_for_members(&gw, "p", 1).await;
    // Every presence frame would have been queued before a's barrier reply.
    assert_eq!(a.barrier().await, Vec::<Value>::new());
    gw.stop().await;
}

// ----- admin --------------------------------------------------------------

#[tokio::test]
async fn the_admin_port_lists_rooms_with_members_and_creation_time() {
    let gw = TestGateway::start(test_config()).await;
    let (status, list) = gw.admin_json("/rooms").await;
    assert_eq!((status, list), (200, json!({"rooms": []})));

    let mut a = gw.client().await;
    let mut b = gw.client().await;
    let before = unix_ms();
    a.join("alpha").await;
    a.join("game.42.lobby").await;
    a.join("user:42@eu=1").await;
    b.join("alpha").await;
    let after = unix_ms();

    let (status, list) = gw.admin_json("/rooms").await;
    assert_eq!(status, 200);
    let rooms = list["rooms"].as_array().expect("rooms");
    let summary: Vec<(&str, u64)> = rooms
        .iter()
        .map(|r| {
            (
                r["room"].as_str().unwrap_or(""),
                r["members"].as_u64().unwrap_or(99),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [("alpha", 2), ("game.42.lobby", 1), ("user:42@eu=1", 1)],
        "{list}"
    );
    for room in rooms {
        let created = room["created"].as_u64().expect("created in Unix ms");
        assert!(
            (before..=after).contains(&created),
            "{room}: not created now"
        );
    }

    let (status, alpha) = gw.admin_json("/rooms/alpha").await;
    assert_eq!(status, 200);
    assert_eq!(alpha["room"], "alpha");
    assert_eq!(alpha["members"], 2);
    assert_eq!(alpha["created"], rooms[0]["created"]);
    assert_eq!(
        member_ids(&gw, "alpha").await,
        HashSet::from([a.id.clone(), b.id.clone()])
    );
    let mut connections = alpha["connections"]
        .as_array()
        .expect("connections")
        .clone();
    connections.sort_by_key(|c| c["connection_id"].as_str().map(str::to_string));
    let mut expected = vec![
        json!({"connection_id": a.id, "user": null}),
        json!({"connection_id": b.id, "user": null}),
    ];
    expected.sort_by_key(|c| c["connection_id"].as_str().map(str::to_string));
    assert_eq!(connections, expected, "no authentication, no users");
    // A trailing slash names the same room, as `/rooms/` is `/rooms`.
    let (status, slashed) = gw.admin_json("/rooms/alpha/").await;
    assert_eq!(
        (status, &slashed["room"], &slashed["members"]),
        (200, &alpha["room"], &alpha["members"])
    );
    // Names with reserved URL characters, as typed or percent-encoded.
    for path in ["/rooms/user:42@eu=1", "/rooms/user%3A42%40eu%3D1"] {
        let (status, detail) = gw.admin_json(path).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(detail["member_ids"], json!([a.id]));
    }

    for path in [
        "/rooms/nope",
        "/rooms/alph",
        "/rooms/alpha.x",
        "/rooms/a%20b",
    ] {
        let (status, body) = gw.admin_get(path).await;
        assert_eq!(status, 404, "{path}: {body}");
    }

    b.leave("alpha").await;
    assert_eq!(
        member_ids(&gw, "alpha").await,
        HashSet::from([a.id.clone()])
    );
    gw.stop().await;
}

// ----- metrics ------------------------------------------------------------

#[tokio::test]
async fn room_and_message_metrics_move_and_carry_no_names_or_ids() {
    let gw = TestGateway::with(|c| c.websocket.rooms.idle_timeout_secs = 0).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    let rooms = ["secret-room", "tenant:acme.private"];
    for room in rooms {
        a.join(room).await;
        b.join(room).await;
    }
    assert_eq!(gw.metric("roomgate_rooms").await, 2.0);
    let (_, body) = gw.admin_get("/metrics").await;
    let received = metric_value(&body, "roomgate_messages_received_total");
    let delivered = metric_value(&body, "roomgate_messages_delivered_total");
    let bytes_in = metric_value(&body, "roomgate_bytes_received_total");
    let bytes_out = metric_value(&body, "roomgate_bytes_sent_total");
    assert_eq!(received, 4.0, "four joins received");

    let text =
        json!({"type": "message", "room": rooms[0], "content": "x".repeat(1000)}).to_string();
    for _ in 0..3 {
        a.send_text(&text).await;
        assert_eq!(b.recv().await["content"].as_str().map(str::len), Some(1000));
    }
    let (_, body) = gw.admin_get("/metrics").await;
    assert_eq!(
        metric_value(&body, "roomgate_messages_received_total") - received,
        3.0
    );
    assert!(metric_value(&body, "roomgate_messages_delivered_total") - delivered >= 3.0);
    assert!(
        metric_value(&body, "roomgate_bytes_received_total") - bytes_in >= 3.0 * text.len() as f64
    );
    assert!(metric_value(&body, "roomgate_bytes_sent_total") - bytes_out >= 3000.0);

    // Nothing that clients choose or are given appears in any series.
    for secret in rooms.iter().copied().chain([a.id.as_str(), b.id.as_str()]) {
        assert!(!body.contains(secret), "/metrics mentions {secret}");
    }
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some(labels) = line
            .split_once('{')
            .and_then(|(_, rest)| rest.split_once('}'))
        else {
            continue;
        };
        for pair in labels.0.split(',').filter(|p| !p.is_empty()) {
            let (_, value) = pair.split_once('=').expect("label=value");
            let value = value.trim_matches('"');
            assert!(
                uuid::Uuid::parse_str(value).is_err() && value.len() <= 32,
                "unbounded-looking label value in {line}"
            );
        }
    }

    // Rooms leave the gauge as they are freed.
    a.leave(rooms[0]).await;
    b.leave(rooms[0]).await;
    // Freed while b's leave was handled, before b's next frame is read.
    b.barrier().await;
    assert_eq!(gw.metric("roomgate_rooms").await, 1.0);
    a.abort();
    b.abort();
    eventually_async("the rooms gauge to reach zero", || async {
        gw.metric("roomgate_rooms").await == 0.0
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn the_admin_port_refuses_other_methods_and_says_which_it_allows() {
    let gw = TestGateway::with(|_| {}).await;
    let request = hyper::Request::builder()
        .method("POST")
        .uri("/rooms")
        .header("host", gw.admin.to_string())
        .body(empty())
        .expect("request");
    let (status, headers, body) = http_request(gw.admin, request).await;
    assert_eq!(status, 405);
    assert_eq!(
        headers.get("allow").and_then(|v| v.to_str().ok()),
        Some("GET, HEAD")
    );
    assert_eq!(String::from_utf8_lossy(&body).trim(), "only GET and HEAD");
}

#[tokio::test]
async fn the_admin_port_refuses_a_request_head_beyond_16_kib() {
    // Probes and scrapes send a few hundred bytes; a client gets no more
    // room on the admin port than on the public one.
    let gw = TestGateway::with(|_| {}).await;
    let request = |size: usize| {
        hyper::Request::builder()
            .uri("/healthz")
            .header("host", gw.admin.to_string())
            .header("x-padding", "x".repeat(size))
            .body(empty())
            .expect("request")
    };
    let (status, _, _) = http_request(gw.admin, request(8 * 1024)).await;
    assert_eq!(status, 200);
    let (status, _, _) = http_request(gw.admin, request(20 * 1024)).await;
    assert_eq!(status, 431);
}

/// Sends `head` (without its final blank line) on a new connection to
/// `addr` and returns the status line of the answer.
async fn admin_status_line(addr: std::net::SocketAddr, head: &str) -> String {
    let answer = exchange_until_close(addr, &format!("{head}Connection: close\r\n\r\n")).await;
    answer.lines().next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn the_admin_port_checks_host_as_the_public_one_does() {
    let gw = TestGateway::with(|_| {}).await;
    for (head, status) in [
        ("GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n", "400"),
        ("GET /healthz HTTP/1.1\r\n", "400"),
        ("GET /healthz HTTP/1.1\r\nHost: a b\r\n", "400"),
        ("GET /healthz HTTP/1.1\r\nHost: localhost:9090\r\n", "200"),
        // HTTP/1.0 may go without.
        ("GET /healthz HTTP/1.0\r\n", "200"),
    ] {
        let line = admin_status_line(gw.admin, head).await;
        assert!(line.contains(&format!(" {status} ")), "{head:?}: {line}");
    }
}

#[tokio::test]
async fn a_full_admin_port_closes_its_oldest_connection_for_a_new_one() {
    // The admin port holds a bounded number of connections, and clients
    // that hold them open cannot keep a probe out: a connection past the
    // bound closes the oldest, idle or halfway through a request head.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = TestGateway::with(|_| {}).await;
    let mut held = Vec::new();
    for _ in 0..roomgate::admin::MAX_CONNECTIONS {
        held.push(
            tokio::net::TcpStream::connect(gw.admin)
                .await
                .expect("connect"),
        );
    }
    held[0]
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .expect("write");
    let probe = format!(
        "GET /healthz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        gw.admin
    );
    // Accepted after every held one (the accept queue is first in, first
    // out): each probe takes the place of the oldest.
    for oldest in 0..2 {
        let answer = exchange_until_close(gw.admin, &probe).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let mut rest = Vec::new();
        within(
            &format!("the oldest connection ({oldest}) closed"),
            held[oldest].read_to_end(&mut rest),
        )
        .await
        .expect("read");
        // The probe has closed: fill its slot, so the port is full again.
        held.push(
            tokio::net::TcpStream::connect(gw.admin)
                .await
                .expect("connect"),
        );
    }
    // The next oldest is left alone.
    let mut byte = [0u8; 1];
    let next = tokio::time::timeout(QUIET, held[2].read(&mut byte)).await;
    assert!(next.is_err(), "closed too: {next:?}");
}

#[tokio::test]
async fn a_fresh_gateway_exports_the_upstream_failure_codes_at_zero() {
    // A rate() in an alert sees the first 502 only if the series was there
    // before it.
    let gw = TestGateway::with(|_| {}).await;
    let (status, metrics) = gw.admin_get("/metrics").await;
    assert_eq!(status, 200);
    for sample in [
        "roomgate_proxy_requests_total{code=\"502\"} 0",
        "roomgate_proxy_requests_total{code=\"504\"} 0",
    ] {
        assert!(metrics.contains(sample), "missing {sample}");
    }
}
