//! The client protocol of SPEC §1, from outside: `join`, `leave` and
//! `message` with their replies, `id` echo and `ack`, and every error code
//! where its condition occurs. After every error the connection is shown to
//! be still usable with an action that succeeds.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Asserts that `frame` is exactly an error frame with `code`, a readable
/// message and `id` (or no `id` at all).
#[track_caller]
fn assert_error(frame: &Value, code: &str, id: Option<&str>) {
    let object = frame.as_object().expect("frame is an object");
    assert_eq!(frame["type"], "error", "expected an error, got {frame}");
    assert_eq!(frame["code"], code, "wrong code in {frame}");
    assert!(
        frame["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without a message: {frame}"
    );
    match id {
        Some(id) => assert_eq!(frame["id"], id, "id not echoed in {frame}"),
        None => assert!(!object.contains_key("id"), "unexpected id in {frame}"),
    }
    let expected_keys = 3 + usize::from(id.is_some());
    assert_eq!(object.len(), expected_keys, "unexpected fields in {frame}");
}

/// Sends raw text and asserts the reply is the error `code` with `id`.
async fn expect_refusal(client: &mut WsClient, text: &str, code: &str, id: Option<&str>) {
    client.send_text(text).await;
    let reply = client.recv().await;
    assert_error(&reply, code, id);
}

/// Proves the connection still serves frames: joins `room`, sends a message
/// with an id and gets its `ack`.
async fn assert_usable(client: &mut WsClient, room: &str) {
    client.join(room).await;
    client.say(room, json!("still here"), "usable").await;
}

#[tokio::test]
async fn join_leave_and_message_echo_the_id_and_ack() {
    let gw = TestGateway::start(test_config()).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;

    let reply = a
        .request(json!({"type": "join", "room": "general", "id": "j1"}))
        .await;
    assert_eq!(
        reply,
        json!({"type": "joined", "room": "general", "id": "j1"})
    );
    b.join("general").await;

    // With an id: acked, and the other member gets the message.
    a.send(json!({"type": "message", "room": "general", "content": "Hello!", "id": "m1"}))
        .await;
    assert_eq!(a.recv().await, json!({"type": "ack", "id": "m1"}));
    assert_eq!(
        b.recv().await,
        json!({"type": "message", "room": "general", "content": "Hello!", "from": a.id})
    );

    // Without an id: delivered, and no ack comes back.
    a.send(json!({"type": "message", "room": "general", "content": "no id"}))
        .await;
    assert_eq!(
        b.recv().await,
        json!({"type": "message", "room": "general", "content": "no id", "from": a.id})
    );
    assert_eq!(a.barrier().await, Vec::<Value>::new(), "no ack without id");

    // An id of exactly 64 bytes, in multi-byte characters too, is accepted.
    for id in ["x".repeat(64), "é".repeat(32)] {
        a.send(json!({"type": "message", "room": "general", "content": 1, "id": id}))
            .await;
        assert_eq!(a.recv().await, json!({"type": "ack", "id": id}));
        assert_eq!(b.recv().await["content"], 1);
    }

    let reply = a
        .request(json!({"type": "leave", "room": "general", "id": "l1"}))
        .await;
    assert_eq!(
        reply,
        json!({"type": "left", "room": "general", "id": "l1"})
    );

    // Gone from the room: b's next message does not reach a.
    b.say("general", json!("anyone?"), "b1").await;
    assert_eq!(a.barrier().await, Vec::<Value>::new(), "a left the room");

    // Leaving again, or sending to it, is refused.
    expect_refusal(
        &mut a,
        r#"{"type":"leave","room":"general","id":"l2"}"#,
        "not_member",
        Some("l2"),
    )
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn joining_twice_answers_joined_again() {
    let gw = TestGateway::with(|c| c.websocket.rooms.max_rooms_per_connection = 1).await;
    let mut a = gw.client().await;
    a.join("once").await;
    let reply = a
        .request(json!({"type": "join", "room": "once", "id": "again"}))
        .await;
    assert_eq!(
        reply,
        json!({"type": "joined", "room": "once", "id": "again"})
    );
    let (_, detail) = gw.admin_json("/rooms/once").await;
    assert_eq!(detail["members"], 1, "still one membership: {detail}");
    // It did not count twice against max_rooms_per_connection = 1 either:
    // leaving once frees the slot.
    a.leave("once").await;
    a.join("other").await;
    gw.stop().await;
}

#[tokio::test]
async fn unknown_fields_are_ignored() {
    let gw = TestGateway::start(test_config()).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    let reply = a
        .request(json!({
            "type": "join", "room": "r", "id": "j",
            "token": "abc", "meta": {"nested": [1, 2, {"x": null}]}, "n": 1e300
        }))
        .await;
    assert_eq!(reply, json!({"type": "joined", "room": "r", "id": "j"}));
    b.join("r").await;
    a.send(json!({
        "type": "message", "room": "r", "content": {"text": "hi"}, "id": "m",
        "from": "someone-else", "priority": 9, "room_extra": "x"
    }))
    .await;
    assert_eq!(a.recv().await, json!({"type": "ack", "id": "m"}));
    assert_eq!(
        b.recv().await,
        json!({"type": "message", "room": "r", "content": {"text": "hi"}, "from": a.id}),
        "a client cannot set `from`, and extra fields are not forwarded"
    );
    gw.stop().await;
}

#[tokio::test]
async fn invalid_json_is_refused_and_the_connection_stays_usable() {
    let gw = TestGateway::start(test_config()).await;
    let mut a = gw.client().await;
    let long_id = "x".repeat(65);
    let long_multibyte_id = format!("{}a", "é".repeat(32));
    let cases: Vec<(String, Option<&str>)> = vec![
        // Not JSON.
        ("not json".into(), None),
        ("".into(), None),
        ("   ".into(), None),
        (r#"{"type":"join","room":"r""#.into(), None),
        (r#"{"type":"join","room":"r"} trailing"#.into(), None),
        // JSON, but not an object.
        ("[1,2]".into(), None),
        (r#"["join","r"]"#.into(), None),
        (r#""join""#.into(), None),
        ("42".into(), None),
        ("null".into(), None),
        ("true".into(), None),
        // Fields of the wrong type; the id is echoed when it is readable.
        (r#"{"type":5,"room":"r"}"#.into(), None),
        (r#"{"type":"join","room":7,"id":"k1"}"#.into(), Some("k1")),
        (
            r#"{"type":"join","room":["r"],"id":"k2"}"#.into(),
            Some("k2"),
        ),
        (r#"{"type":"join","room":{"name":"r"}}"#.into(), None),
        (r#"{"type":"join","room":"r","id":5}"#.into(), None),
        (r#"{"type":"join","room":"r","id":["a"]}"#.into(), None),
        // Missing type, missing content.
        (r#"{"room":"r","id":"k3"}"#.into(), Some("k3")),
        (
            r#"{"type":"message","room":"r","id":"k4"}"#.into(),
            Some("k4"),
        ),
        // Content that is JSON but not text: half a surrogate pair.
        (
            r#"{"type":"message","room":"r","content":"\ud800x","id":"k5"}"#.into(),
            Some("k5"),
        ),
        (
            r#"{"type":"message","room":"r","content":{"k":["\udc00"]}}"#.into(),
            None,
        ),
        // An id longer than 64 bytes (it cannot be echoed).
        (
            format!(r#"{{"type":"join","room":"r","id":"{long_id}"}}"#),
            None,
        ),
        (
            format!(r#"{{"type":"join","room":"r","id":"{long_multibyte_id}"}}"#),
            None,
        ),
    ];
    for (text, id) in &cases {
        a.send_text(text).await;
        let reply = a.recv().await;
        assert_eq!(reply["code"], "invalid_json", "for {text:?}: {reply}");
        assert_error(&reply, "invalid_json", *id);
    }
    // None of the refused joins took effect, and the connection works.
    let (status, _) = gw.admin_get("/rooms/r").await;
    assert_eq!(status, 404, "no refused frame joined room r");
    assert_usable(&mut a, "r").await;
    gw.stop().await;
}

#[tokio::test]
async fn unknown_types_are_refused() {
    let gw = TestGateway::start(test_config()).await;
    let mut a = gw.client().await;
    for (text, id) in [
        (r#"{"type":"dance","id":"d1"}"#, Some("d1")),
        (r#"{"type":"JOIN","room":"r"}"#, None),
        (r#"{"type":"","room":"r"}"#, None),
        // Types the gateway sends are not requests.
        (r#"{"type":"joined","room":"r","id":"d2"}"#, Some("d2")),
        (r#"{"type":"ack","id":"d3"}"#, Some("d3")),
        (r#"{"type":"presence","room":"r"}"#, None),
    ] {
        expect_refusal(&mut a, text, "unknown_type", id).await;
    }
    assert_usable(&mut a, "r").await;
    gw.stop().await;
}

#[tokio::test]
async fn every_rule_of_the_room_name_syntax_is_enforced() {
    let gw = TestGateway::start(test_config()).await;
    let mut a = gw.client().await;
    let too_long = "x".repeat(129);
    let too_long_dotted = format!("{}.{}", "a".repeat(64), "b".repeat(64));
    let bad: Vec<&str> = vec![
        // Empty.
        "",
        // Longer than 128 bytes.
        &too_long,
        &too_long_dotted,
        // Characters outside A-Z a-z 0-9 _ - : @ = (and the dot).
        "a b",
        "a*",
        "a.>",
        ">",
        "a/b",
        "a#b",
        "a$",
        "é",
        "a\n",
        "a\u{0}",
        "a%2E",
        // Empty tokens.
        ".",
        "a..b",
        ".a",
        "a.",
    ];
    for name in &bad {
        for (kind, extra) in [
            ("join", json!({})),
            ("leave", json!({})),
            ("message", json!({"content": "x"})),
        ] {
            let mut frame = json!({"type": kind, "room": name, "id": "n"});
            if let (Some(f), Some(e)) = (frame.as_object_mut(), extra.as_object()) {
                f.extend(e.clone());
            }
            let reply = a.request(frame).await;
            assert_eq!(reply["code"], "invalid_room", "{kind} {name:?}: {reply}");
            assert_error(&reply, "invalid_room", Some("n"));
        }
    }
    // A missing or null room is refused the same way.
    expect_refusal(
        &mut a,
        r#"{"type":"join","id":"m"}"#,
        "invalid_room",
        Some("m"),
    )
    .await;
    expect_refusal(
        &mut a,
        r#"{"type":"join","room":null}"#,
        "invalid_room",
        None,
    )
    .await;

    let (_, rooms) = gw.admin_json("/rooms").await;
    assert_eq!(
        rooms,
        json!({"rooms": []}),
        "no invalid name created a room"
    );

    // The edges of what is valid are accepted.
    let longest = format!("{}.{}", "a".repeat(63), "b".repeat(64));
    for name in [
        "x".repeat(128).as_str(),
        &longest,
        "user:42@eu=1",
        "A_b-C",
        "game.42.lobby",
        "0",
    ] {
        a.join(name).await;
        a.say(name, json!("ok"), "ok").await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn sending_to_or_leaving_a_room_one_is_not_in_is_refused() {
    let gw = TestGateway::start(test_config()).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    b.join("r").await;
    expect_refusal(
        &mut a,
        r#"{"type":"message","room":"r","content":"x","id":"n1"}"#,
        "not_member",
        Some("n1"),
    )
    .await;
    expect_refusal(&mut a, r#"{"type":"leave","room":"r"}"#, "not_member", None).await;
    assert_eq!(b.barrier().await, Vec::<Value>::new(), "nothing reached b");
    a.join("r").await;
    a.leave("r").await;
    expect_refusal(
        &mut a,
        r#"{"type":"message","room":"r","content":"x","id":"n2"}"#,
        "not_member",
        Some("n2"),
    )
    .await;
    assert_eq!(b.barrier().await, Vec::<Value>::new(), "nothing reached b");
    assert_usable(&mut a, "r").await;
    gw.stop().await;
}

#[tokio::test]
async fn a_full_room_refuses_further_members() {
    let gw = TestGateway::with(|c| c.websocket.rooms.max_members = 2).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    let mut c = gw.client().await;
    a.join("small").await;
    b.join("small").await;
    expect_refusal(
        &mut c,
        r#"{"type":"join","room":"small","id":"f1"}"#,
        "room_full",
        Some("f1"),
    )
    .await;
    // The refused client is not a member and the members are untouched.
    expect_refusal(
        &mut c,
        r#"{"type":"message","room":"small","content":1,"id":"f2"}"#,
        "not_member",
        Some("f2"),
    )
    .await;
    let (_, detail) = gw.admin_json("/rooms/small").await;
    assert_eq!(detail["members"], 2);
    // A member joining again is no new member.
    a.join("small").await;
    // The refused connection works elsewhere, and gets in once there is room.
    assert_usable(&mut c, "elsewhere").await;
    b.leave("small").await;
    c.join("small").await;
    c.say("small", json!("in"), "in").await;
    assert_eq!(a.recv().await["content"], "in");
    gw.stop().await;
}

#[tokio::test]
async fn a_connection_is_limited_in_the_rooms_it_joins() {
    let gw = TestGateway::with(|c| c.websocket.rooms.max_rooms_per_connection = 3).await;
    let mut a = gw.client().await;
    for room in ["r1", "r2", "r3"] {
        a.join(room).await;
    }
    expect_refusal(
        &mut a,
        r#"{"type":"join","room":"r4","id":"t1"}"#,
        "too_many_rooms",
        Some("t1"),
    )
    .await;
    // Re-joining a room it is in is not a fourth room.
    a.join("r2").await;
    let (status, _) = gw.admin_get("/rooms/r4").await;
    assert_eq!(status, 404, "the refused join created no room");
    // The limit is per connection: another client joins r4 freely.
    let mut b = gw.client().await;
    b.join("r4").await;
    // Leaving frees a slot.
    a.leave("r1").await;
    a.join("r4").await;
    a.say("r4", json!("hi"), "t2").await;
    assert_eq!(b.recv().await["content"], "hi");
    gw.stop().await;
}

/// Each frame over the rate gets its `rate_limited`, however many come at
/// once: a burst far longer than the send queue (16 here) is answered in
/// full and in order, not cut short as a slow consumer's.
#[tokio::test]
async fn a_burst_longer_than_the_send_queue_gets_one_reply_per_frame() {
    const BURST: usize = 200;
    let gw = TestGateway::with(|c| {
        c.websocket.max_messages_per_sec = 2;
        c.websocket.send_queue_capacity = 16;
    })
    .await;
    let mut a = gw.client().await;
    a.send_burst((0..BURST).map(|i| json!({"type": "join", "room": "r", "id": format!("b{i}")})))
        .await;
    let mut refused = 0;
    for i in 0..BURST {
        let reply = a.recv().await;
        let id = format!("b{i}");
        if reply["code"] == "rate_limited" {
            assert_error(&reply, "rate_limited", Some(&id));
            refused += 1;
        } else {
            assert_eq!(reply, json!({"type": "joined", "room": "r", "id": id}));
        }
    }
    assert!(refused > 0, "no frame of {BURST} was over the rate");
    assert_eq!(
        gw.metric(r#"roomgate_connections_closed_total{reason="slow_consumer"}"#)
            .await,
        0.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn frames_over_the_rate_are_refused_one_by_one_and_the_connection_recovers() {
    const RATE: u32 = 2;
    let gw = TestGateway::with(|c| c.websocket.max_messages_per_sec = RATE).await;
    let mut a = gw.client().await;
    let dropped = r#"roomgate_messages_dropped_total{reason="rate_limited"}"#;

    // Bursts of frames, text with ids and binary, all written at once. Each
    // frame gets exactly one reply, in order: its own, or `rate_limited`
    // (with its id). However slow the machine, no more frames pass than the
    // bucket allows over the measured time; repeat until the limit shows.
    let mut refused_total = 0u32;
    let mut round = 0;
    let started = Instant::now();
    while refused_total == 0 {
        round += 1;
        assert!(
            started.elapsed() < WAIT,
            "no frame was ever rate limited at {RATE}/s"
        );
        let burst_start = Instant::now();
        const BURST: usize = 24;
        within("a burst to be written", async {
            for i in 0..BURST {
                let message = if i % 4 == 3 {
                    Message::binary(vec![1, 2, 3])
                } else {
                    let id = format!("r{round}-{i}");
                    Message::text(json!({"type": "join", "room": "r", "id": id}).to_string())
                };
                a.ws.feed(message).await.expect("feed");
            }
            a.ws.flush().await.expect("flush");
        })
        .await;
        let mut passed = 0;
        for i in 0..BURST {
            let reply = a.recv().await;
            let id = (i % 4 != 3).then(|| format!("r{round}-{i}"));
            if reply["code"] == "rate_limited" {
                assert_error(&reply, "rate_limited", id.as_deref());
                refused_total += 1;
            } else {
                passed += 1;
                match id {
                    Some(id) => assert_eq!(
                        reply,
                        json!({"type": "joined", "room": "r", "id": id}),
                        "frame {i} of round {round}"
                    ),
                    None => assert_error(&reply, "binary_not_supported", None),
                }
            }
        }
        let allowed = f64::from(RATE) * (1.0 + burst_start.elapsed().as_secs_f64()) + 1.0;
        assert!(
            f64::from(passed) <= allowed,
            "{passed} frames passed in a burst, at most {allowed} allowed"
        );
    }
    assert_eq!(gw.metric(dropped).await, f64::from(refused_total));

    // After a quiet second the bucket is full again: a burst of RATE frames
    // all pass, and a message is delivered and acked.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut b = gw.client().await;
    b.join("r").await;
    a.send(json!({"type": "message", "room": "r", "content": "back", "id": "ok1"}))
        .await;
    a.send(json!({"type": "leave", "room": "r", "id": "ok2"}))
        .await;
    assert_eq!(a.recv().await, json!({"type": "ack", "id": "ok1"}));
    assert_eq!(
        a.recv().await,
        json!({"type": "left", "room": "r", "id": "ok2"})
    );
    assert_eq!(b.recv().await["content"], "back");
    assert_eq!(gw.metric(dropped).await, f64::from(refused_total));
    gw.stop().await;
}

#[tokio::test]
async fn binary_frames_are_refused() {
    let gw = TestGateway::start(test_config()).await;
    let mut a = gw.client().await;
    for data in [
        vec![],
        b"{\"type\":\"join\",\"room\":\"r\"}".to_vec(),
        (0..=255).collect(),
    ] {
        a.send_binary(data).await;
        assert_error(&a.recv().await, "binary_not_supported", None);
    }
    let (status, _) = gw.admin_get("/rooms/r").await;
    assert_eq!(status, 404, "a binary join is not a join");
    assert_usable(&mut a, "r").await;
    gw.stop().await;
}

#[tokio::test]
async fn rooms_can_be_disabled() {
    let gw = TestGateway::with(|c| c.websocket.rooms.enabled = false).await;
    let mut a = gw.client().await;
    expect_refusal(
        &mut a,
        r#"{"type":"join","room":"r","id":"d1"}"#,
        "rooms_disabled",
        Some("d1"),
    )
    .await;
    expect_refusal(
        &mut a,
        r#"{"type":"message","room":"r","content":"x","id":"d2"}"#,
        "rooms_disabled",
        Some("d2"),
    )
    .await;
    expect_refusal(
        &mut a,
        r#"{"type":"leave","room":"r","id":"d3"}"#,
        "rooms_disabled",
        Some("d3"),
    )
    .await;
    let (_, rooms) = gw.admin_json("/rooms").await;
    assert_eq!(rooms, json!({"rooms": []}));
    // No room action can succeed here; the connection still answers pings
    // and frames.
    a.ping_pong().await;
    assert_eq!(a.barrier().await, Vec::<Value>::new());
    gw.stop().await;
}

#[tokio::test]
async fn an_error_in_one_room_leaves_the_others_alone() {
    let gw = TestGateway::with(|c| c.websocket.rooms.max_members = 2).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    let mut c = gw.client().await;
    a.join("full").await;
    c.join("full").await;
    a.join("pair").await;
    b.join("pair").await;
    // b fails in several ways in a row...
    expect_refusal(
        &mut b,
        r#"{"type":"join","room":"full"}"#,
        "room_full",
        None,
    )
    .await;
    expect_refusal(&mut b, "{", "invalid_json", None).await;
    b.send_binary(vec![0]).await;
    assert_error(&b.recv().await, "binary_not_supported", None);
    // ...and its room carries on for both, as does the full room.
    b.say("pair", json!("still"), "s").await;
    assert_eq!(a.recv().await["content"], "still");
    c.say("full", json!("also"), "t").await;
    assert_eq!(a.recv().await["content"], "also");
    gw.stop().await;
}

// ----- connection and transport rules of SPEC §1 --------------------------

#[tokio::test]
async fn the_first_frame_names_a_unique_uuid_connection_id() {
    let gw = TestGateway::start(test_config()).await;
    let mut ids = std::collections::HashSet::new();
    for _ in 0..20 {
        let (ws, _) = tokio_tungstenite::connect_async(gw.ws_url())
            .await
            .expect("handshake");
        let mut client = WsClient {
            ws,
            id: String::new(),
        };
        let welcome = client.recv().await;
        let id = welcome["connection_id"].as_str().expect("connection_id");
        assert_eq!(
            welcome,
            json!({"type": "system", "message": format!("Connected as {id}"), "connection_id": id})
        );
        let uuid = uuid::Uuid::parse_str(id).expect("a UUID");
        assert!(
            matches!(uuid.get_version_num(), 4 | 7),
            "UUID v4 or v7: {id}"
        );
        assert_eq!(id, uuid.hyphenated().to_string(), "canonical form");
        assert!(ids.insert(id.to_string()), "{id} given twice");
    }
    gw.stop().await;
}

#[tokio::test]
async fn pings_are_answered_and_do_not_count_against_the_rate() {
    // The bucket holds one frame. Ten pings and a join, written at once:
    // every ping is answered and the join still finds its token. Had the
    // pings been counted, the join (and all but one ping) would have been
    // refused, unless a second passed meanwhile and refilled the bucket:
    // such a round proves nothing and is repeated on a new connection.
    const PINGS: usize = 10;
    let gw = TestGateway::with(|c| c.websocket.max_messages_per_sec = 1).await;
    let dropped = r#"roomgate_messages_dropped_total{reason="rate_limited"}"#;
    let started = Instant::now();
    let mut round = 0;
    loop {
        round += 1;
        assert!(
            started.elapsed() < WAIT,
            "no round of pings finished within a second"
        );
        let mut a = gw.client().await;
        let room = format!("r{round}");
        let round_start = Instant::now();
        within("the pings and the join to be written", async {
            for i in 0..PINGS {
                let payload = bytes::Bytes::from(format!("ping {i}"));
                a.ws.feed(Message::Ping(payload)).await.expect("feed");
            }
            let join = json!({"type": "join", "room": room, "id": "j"}).to_string();
            a.ws.feed(Message::text(join)).await.expect("feed");
            a.ws.flush().await.expect("flush");
        })
        .await;
        let mut pongs = Vec::new();
        let reply = within("the pongs and the join's reply", async {
            loop {
                match a.ws.next().await {
                    Some(Ok(Message::Pong(p))) => pongs.push(p),
                    Some(Ok(Message::Text(text))) => {
                        break serde_json::from_str::<Value>(text.as_str()).expect("JSON");
                    }
                    Some(Ok(_)) => continue,
                    other => panic!("connection ended: {other:?}"),
                }
            }
        })
        .await;
        let expected: Vec<bytes::Bytes> = (0..PINGS)
            .map(|i| bytes::Bytes::from(format!("ping {i}")))
            .collect();
        assert_eq!(
            pongs, expected,
            "every ping answered, in order, before the join's reply"
        );
        assert_eq!(reply, json!({"type": "joined", "room": room, "id": "j"}));
        assert_eq!(gw.metric(dropped).await, 0.0, "no frame was rate limited");
        if round_start.elapsed() < Duration::from_secs(1) {
            break;
        }
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_fragmented_message_counts_once_against_the_rate() {
    // The bucket holds one message and refills one a second. A join cut
    // into three fragments is one message: it is served. Two more joins
    // right behind it, in the same write, find the bucket empty, so both
    // are refused, unless a second passed between the first and the last
    // (a refill): such a round is repeated on a new connection.
    use tokio::io::AsyncWriteExt;
    let gw = TestGateway::with(|c| c.websocket.max_messages_per_sec = 1).await;
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < WAIT,
            "no round of three joins finished within a second"
        );
        let mut stream = within("connect", tokio::net::TcpStream::connect(gw.addr))
            .await
            .expect("connect");
        upgrade_raw(&mut stream, gw.addr).await;
        let welcome = within("the welcome", read_raw_frame(&mut stream)).await;
        assert_eq!(welcome.map(|f| f.opcode), Some(1));
        let mut burst = Vec::new();
        burst.extend(client_frame(0x01, br#"{"type":"jo"#, true));
        burst.extend(client_frame(0x00, br#"in","room""#, true));
        burst.extend(client_frame(0x80, br#":"r","id":"frag"}"#, true));
        for room in ["s", "t"] {
            let join = format!(r#"{{"type":"join","room":"{room}","id":"{room}"}}"#);
            burst.extend(client_frame(0x81, join.as_bytes(), true));
        }
        // The bucket's clock for the first frame starts no earlier than this.
        let round_start = Instant::now();
        within("the burst to be written", stream.write_all(&burst))
            .await
            .expect("write");
        let mut replies = Vec::new();
        for _ in 0..3 {
            let frame = within("a reply", read_raw_frame(&mut stream))
                .await
                .expect("a frame");
            replies.push(serde_json::from_slice::<Value>(&frame.payload).expect("JSON"));
        }
        assert_eq!(
            replies[0],
            json!({"type": "joined", "room": "r", "id": "frag"})
        );
        if round_start.elapsed() >= Duration::from_secs(1) {
            continue;
        }
        for (reply, id) in replies[1..].iter().zip(["s", "t"]) {
            assert_error(reply, "rate_limited", Some(id));
        }
        break;
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_message_over_the_size_limit_closes_with_1009_and_spares_the_others() {
    const LIMIT: usize = 1024;
    let gw = TestGateway::with(|c| c.websocket.max_message_size_bytes = LIMIT).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.join("r").await;
    b.join("r").await;
    // Exactly at the limit is allowed.
    let head = r#"{"type":"message","room":"r","id":"max","content":""#;
    let pad = "x".repeat(LIMIT - head.len() - 2);
    let at_limit = format!(r#"{head}{pad}"}}"#);
    assert_eq!(at_limit.len(), LIMIT);
    a.send_text(&at_limit).await;
    assert_eq!(a.recv().await, json!({"type": "ack", "id": "max"}));
    assert_eq!(b.recv().await["content"], pad.as_str());
    // One byte more is not.
    let over = format!(r#"{head}{pad}x"}}"#);
    a.send_text(&over).await;
    assert_eq!(a.recv_close().await, Some(1009));
    wait_for_member_count(&gw, "r", 1).await;
    b.say("r", json!("fine"), "b").await;
    gw.stop().await;
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_and_one_that_does_not_is_closed() {
    let gw = TestGateway::with(|c| {
        c.websocket.ping_interval_secs = 1;
        // Generous, so a busy machine does not make a live client miss it.
        c.websocket.pong_timeout_secs = 4;
    })
    .await;
    let mut live = gw.client().await;
    let mut silent = gw.client().await;
    live.join("r").await;
    silent.join("r").await;
    // `live` reads all along (its library answers each ping)...
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let reading = tokio::spawn(async move {
        let mut stopped = stopped;
        let mut pings = 0;
        loop {
            tokio::select! {
                _ = &mut stopped => return (live, pings),
                next = live.ws.next() => match next {
                    Some(Ok(Message::Ping(_))) => pings += 1,
                    other => panic!("unexpected while idle: {other:?}"),
                },
            }
        }
    });
    // ...while `silent` reads nothing (reading would answer the pings)
    // until the gateway has given up on it, which shows as it leaving the
    // room: after a ping interval and a pong timeout at the least.
    wait_for_member_count(&gw, "r", 1).await;
    assert_eq!(silent.recv_close().await, Some(1001));
    eventually_async("the heartbeat close to be counted", || async {
        gw.metric(r#"roomgate_connections_closed_total{reason="ping_timeout"}"#)
            .await
            == 1.0
    })
    .await;
    let _ = stop.send(());
    let (mut live, pings) = within("the live client's reader", reading)
        .await
        .expect("reader");
    assert!(pings >= 2, "the gateway pings every second: {pings}");
    live.say("r", json!("still alive"), "l").await;
    gw.stop().await;
}

/// Waits until `room` has `count` members on the admin port.
async fn wait_for_member_count(gw: &TestGateway, room: &str, count: u64) {
    eventually_async(&format!("{room} to have {count} members"), || async {
        gw.admin_json(&format!("/rooms/{room}")).await.1["members"] == count
    })
    .await;
}

#[tokio::test]
async fn content_nested_deeper_than_32_levels_is_refused_and_32_reach_the_members() {
    let gw = TestGateway::start(test_config()).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.join("deep").await;
    b.join("deep").await;
    let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    let deepest = nested(32);
    a.send_text(&format!(
        r#"{{"type":"message","room":"deep","content":{deepest},"id":"ok"}}"#
    ))
    .await;
    assert_eq!(a.recv().await, json!({"type": "ack", "id": "ok"}));
    let got = b.recv().await;
    assert_eq!(
        got["content"],
        serde_json::from_str::<Value>(&deepest).expect("JSON"),
        "passed on unchanged"
    );
    let deeper = nested(33);
    expect_refusal(
        &mut a,
        &format!(r#"{{"type":"message","room":"deep","content":{deeper},"id":"deep"}}"#),
        "invalid_json",
        Some("deep"),
    )
    .await;
    let barrier = b.barrier().await;
    assert!(
        barrier.is_empty(),
        "nothing reached the others: {barrier:?}"
    );
    assert_usable(&mut a, "deep").await;
}
