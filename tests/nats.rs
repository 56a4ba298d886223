//! The NATS bridge of one gateway against a real `nats-server` (SPEC §2):
//! what it publishes for backends (subjects, payloads, headers), what
//! backends reach through it (rooms, one connection, everyone, control),
//! and the room interest it keeps on the server.

mod common;
mod nats_support;

#[allow(dead_code)]
#[path = "../examples/echo_backend.rs"]
mod echo_backend;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use nats_support::*;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Checks `ts` is Unix milliseconds taken during the test.
fn assert_ts(value: &Value, since: u64) {
    let ts = value["ts"].as_u64().expect("ts is an integer");
    assert!(
        ts >= since && ts <= now_ms(),
        "ts {ts} is not a Unix time in ms taken during the test (since {since})"
    );
}

/// Checks the `Roomgate-*` headers of a published event.
fn assert_headers(
    message: &async_nats::Message,
    connection: &str,
    gateway: &str,
    user: Option<&str>,
) {
    assert_eq!(
        header(message, "Roomgate-Connection").as_deref(),
        Some(connection)
    );
    assert_eq!(
        header(message, "Roomgate-Gateway").as_deref(),
        Some(gateway)
    );
    assert_eq!(header(message, "Roomgate-User").as_deref(), user);
}

#[tokio::test]
async fn client_events_are_published_with_every_field_and_header() {
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut events = backend.subscribe("roomgate.>").await;
    let since = now_ms();
    let gw = nats_gateway(&server, |_| {}).await;

    let mut a = gw.client().await;
    let (msg, open) = events.next_json().await;
    assert_eq!(msg.subject.as_str(), "roomgate.connection.open");
    assert_eq!(
        open,
        json!({"connection_id": a.id, "user": null, "gateway": gw.id, "ts": open["ts"]})
    );
    assert_ts(&open, since);
    assert_headers(&msg, &a.id, &gw.id, None);

    // A hierarchical room maps to subject tokens.
    a.join("game.42.lobby").await;
    let (msg, join) = events.next_json().await;
    assert_eq!(msg.subject.as_str(), "roomgate.presence.game.42.lobby");
    assert_eq!(
        join,
        json!({"event": "join", "room": "game.42.lobby", "connection_id": a.id,
               "user": null, "gateway": gw.id, "ts": join["ts"]})
    );
    assert_ts(&join, since);
    assert_headers(&msg, &a.id, &gw.id, None);

    // `content` reaches NATS byte for byte: spacing, number spelling and
    // escapes are not normalised by a re-encoding.
    let content = r#"{"n": 1.50, "s":"\u00e9\"q", "list":[1,{"x":null}]}"#;
    a.send_text(&format!(
        r#"{{"type":"message","room":"game.42.lobby","content":{content},"id":"m1"}}"#
    ))
    .await;
    assert_eq!(a.recv().await, json!({"type": "ack", "id": "m1"}));
    let (msg, message) = events.next_json().await;
    assert_eq!(msg.subject.as_str(), "roomgate.message.game.42.lobby");
    let raw = String::from_utf8_lossy(&msg.payload);
    assert!(
        raw.contains(&format!(r#""content":{content}"#)),
        "content changed on its way to NATS: {raw}"
    );
    let parsed_content: Value = serde_json::from_str(content).expect("content is JSON");
    assert_eq!(
        message,
        json!({"room": "game.42.lobby", "content": parsed_content, "from": a.id,
               "user": null, "gateway": gw.id, "ts": message["ts"]})
    );
    assert_ts(&message, since);
    assert_headers(&msg, &a.id, &gw.id, None);

    a.send(json!({"type": "leave", "room": "game.42.lobby"}))
        .await;
    assert_eq!(
        a.recv().await,
        json!({"type": "left", "room": "game.42.lobby"})
    );
    let (msg, leave) = events.next_json().await;
    assert_eq!(msg.subject.as_str(), "roomgate.presence.game.42.lobby");
    assert_eq!(leave["event"], "leave");
    assert_eq!(leave["connection_id"], a.id.as_str());

    a.ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
    .await
    .expect("close");
    let (msg, close) = events.next_json().await;
    assert_eq!(msg.subject.as_str(), "roomgate.connection.close");
    assert_eq!(
        close,
        json!({"connection_id": a.id, "user": null, "gateway": gw.id, "ts": close["ts"], "code": 1000})
    );
    assert_ts(&close, since);
    assert_headers(&msg, &a.id, &gw.id, None);

    // A client that vanishes without a close frame: 1006, and it leaves
    // its rooms (a presence event) before the close event.
    let mut b = gw.client().await;
    events.next_json().await; // its connection.open
    b.join("general").await;
    events.next_json().await; // its presence join
    drop(b);
    let (msg, leave) = events.next_json().await;
    assert_eq!(msg.subject.as_str(), "roomgate.presence.general");
    assert_eq!(leave["event"], "leave");
    let (msg, close) = events.next_json().await;
    assert_eq!(msg.subject.as_str(), "roomgate.connection.close");
    assert_eq!(close["code"], 1006);

    // A close frame without a status code: 1005, as RFC 6455 §7.1.5 has
    // the receiving end report it.
    let mut c = gw.client().await;
    events.next_json().await; // its connection.open
    c.ws.close(None).await.expect("close");
    let (msg, close) = events.next_json().await;
    assert_eq!(msg.subject.as_str(), "roomgate.connection.close");
    assert_eq!(
        (close["connection_id"].as_str(), close["code"].as_u64()),
        (Some(c.id.as_str()), Some(1005))
    );
    events.expect_silence().await;
    gw.stop().await;
}

#[tokio::test]
async fn presence_is_published_whatever_the_presence_setting() {
    for presence in [false, true] {
        let server = NatsServer::start();
        let backend = Backend::connect(&server).await;
        let mut events = backend.subscribe("roomgate.presence.>").await;
        let gw = nats_gateway(&server, |c| c.websocket.rooms.presence = presence).await;
        let mut a = gw.client().await;
        a.join("general").await;
        let (_, join) = events.next_json().await;
        assert_eq!(join["event"], "join", "presence = {presence}");
        gw.stop().await;
    }
}

/// The user of an authenticated connection is in every payload and in the
/// `Roomgate-User` header; a user that cannot be a header value (a line
/// break) stays in the payload and cannot break the bridge.
#[tokio::test]
async fn authenticated_user_is_in_payloads_and_headers() {
    // The HS256 secret is read from the environment variable the config
    // names; PATH is always set, so its value serves as the secret.
    let secret = std::env::var("PATH").expect("PATH is set");
    let token = |sub: &str| {
        encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": sub, "exp": now_ms() / 1000 + 3600}),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("sign")
    };
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut events = backend.subscribe("roomgate.>").await;
    let gw = nats_gateway(&server, |c| {
        c.auth.mode = roomgate::config::AuthMode::Jwt;
        c.auth.jwt.secret_env = "PATH".into();
    })
    .await;

    let mut alice = WsClient::connect(&format!("{}?token={}", gw.ws_url(), token("alice"))).await;
    let (msg, open) = events.next_json().await;
    assert_eq!(open["user"], "alice");
    assert_headers(&msg, &alice.id, &gw.id, Some("alice"));
    alice.join("general").await;
    let (msg, join) = events.next_json().await;
    assert_eq!(join["user"], "alice");
    assert_headers(&msg, &alice.id, &gw.id, Some("alice"));
    alice
        .send(json!({"type": "message", "room": "general", "content": "hi"}))
        .await;
    let (msg, message) = events.next_json().await;
    assert_eq!(message["user"], "alice");
    assert_headers(&msg, &alice.id, &gw.id, Some("alice"));

    let odd = "mallory\r\nRoomgate-Gateway: forged";
    let mut mallory = WsClient::connect(&format!("{}?token={}", gw.ws_url(), token(odd))).await;
    let (msg, open) = events.next_json().await;
    assert_eq!(open["user"], odd);
    assert_headers(&msg, &mallory.id, &gw.id, None);
    // The bridge is still alive.
    mallory.join("general").await;
    let (_, join) = events.next_json().await;
    assert_eq!(join["connection_id"], mallory.id.as_str());
    gw.stop().await;
}

#[tokio::test]
async fn a_custom_subject_prefix_is_honoured_both_ways() {
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut default_prefix = backend.subscribe("roomgate.>").await;
    let mut events = backend.subscribe("acme.rooms.>").await;
    let gw = nats_gateway(&server, |c| c.nats.subject_prefix = "acme.rooms".into()).await;
    let mut a = gw.client().await;
    let (msg, _) = events.next_json().await;
    assert_eq!(msg.subject.as_str(), "acme.rooms.connection.open");
    a.join("general").await;
    let (msg, _) = events.next_json().await;
    assert_eq!(msg.subject.as_str(), "acme.rooms.presence.general");
    a.send(json!({"type": "message", "room": "general", "content": "hi"}))
        .await;
    let (msg, _) = events.next_json().await;
    assert_eq!(msg.subject.as_str(), "acme.rooms.message.general");

    backend
        .publish("roomgate.broadcast.general", "wrong prefix")
        .await;
    // The test's own publication is the only thing on the default prefix.
    assert_eq!(&default_prefix.next().await.payload[..], b"wrong prefix");
    backend
        .publish("acme.rooms.broadcast.general", "hello")
        .await;
    assert_eq!(
        a.recv().await,
        server_message(Some("general"), "hello", "server")
    );
    backend
        .publish(&format!("acme.rooms.send.{}", a.id), "direct")
        .await;
    assert_eq!(a.recv().await, server_message(None, "direct", "server"));
    default_prefix.expect_silence().await;
    a.expect_silence().await;
    gw.stop().await;
}

#[tokio::test]
async fn backend_broadcast_reaches_members_wrapped_raw_or_excluding_one() {
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let gw = nats_gateway(&server, |_| {}).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    let mut outsider = gw.client().await;
    join_synced(&mut a, &mut presence, "game.42.lobby").await;
    join_synced(&mut b, &mut presence, "game.42.lobby").await;
    outsider.join("game.42").await;

    // The payload is the content, as text, even when it is JSON.
    let subject = "roomgate.broadcast.game.42.lobby";
    backend.publish(subject, r#"{"score":3}"#).await;
    let wrapped = server_message(Some("game.42.lobby"), r#"{"score":3}"#, "server");
    assert_eq!(a.recv().await, wrapped);
    assert_eq!(b.recv().await, wrapped);

    // An empty `Roomgate-From` names nobody: the sender is the server.
    for (header, payload, from) in [("bot", "beep", "bot"), ("", "boop", "server")] {
        backend
            .publish_with(subject, &[("Roomgate-From", header)], payload)
            .await;
        let expected = server_message(Some("game.42.lobby"), payload, from);
        assert_eq!(a.recv().await, expected);
        assert_eq!(b.recv().await, expected);
    }

    let raw = r#"{"type":"scoreboard","scores":[1,2]}"#;
    backend
        .publish_with(subject, &[("Roomgate-Raw", "true")], raw)
        .await;
    let raw_value: Value = serde_json::from_str(raw).expect("JSON");
    assert_eq!(a.recv().await, raw_value);
    assert_eq!(b.recv().await, raw_value);

    backend
        .publish_with(subject, &[("Roomgate-Exclude", &a.id)], "not for a")
        .await;
    assert_eq!(
        b.recv().await,
        server_message(Some("game.42.lobby"), "not for a", "server")
    );
    // Header names are matched without regard to case, as in HTTP.
    backend
        .publish_with(subject, &[("roomgate-from", "lower")], "case")
        .await;
    assert_eq!(
        a.recv().await,
        server_message(Some("game.42.lobby"), "case", "lower")
    );
    assert_eq!(
        b.recv().await,
        server_message(Some("game.42.lobby"), "case", "lower")
    );

    a.expect_silence().await;
    b.expect_silence().await;
    outsider.expect_silence().await;
    gw.stop().await;
}

#[tokio::test]
async fn send_reaches_one_connection_and_all_reaches_everyone() {
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let gw = nats_gateway(&server, |_| {}).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    let mut c = gw.client().await;
    a.join("general").await;

    backend
        .publish(&format!("roomgate.send.{}", b.id), "just you")
        .await;
    assert_eq!(b.recv().await, server_message(None, "just you", "server"));
    backend
        .publish_with(
            &format!("roomgate.send.{}", b.id),
            &[("Roomgate-Raw", "true")],
            r#"{"type":"notice","n":1}"#,
        )
        .await;
    assert_eq!(b.recv().await, json!({"type": "notice", "n": 1}));
    // `Roomgate-Exclude` holds here too: naming the target skips it, and
    // naming another connection changes nothing. NATS keeps the order, so
    // the next frame b gets shows what was skipped.
    let direct = format!("roomgate.send.{}", b.id);
    backend
        .publish_with(&direct, &[("Roomgate-Exclude", &b.id)], "not for b")
        .await;
    backend
        .publish_with(&direct, &[("Roomgate-Exclude", &a.id)], "for b")
        .await;
    assert_eq!(b.recv().await, server_message(None, "for b", "server"));
    // Nobody has these ids; nothing happens, nothing breaks.
    backend
        .publish(&format!("roomgate.send.{}", uuid::Uuid::new_v4()), "lost")
        .await;
    backend.publish("roomgate.send.not-a-uuid", "lost").await;

    backend.publish("roomgate.all", "everyone").await;
    let everyone = server_message(None, "everyone", "server");
    assert_eq!(a.recv().await, everyone);
    assert_eq!(b.recv().await, everyone);
    assert_eq!(c.recv().await, everyone);
    backend
        .publish_with(
            "roomgate.all",
            &[("Roomgate-Exclude", &c.id), ("Roomgate-From", "ops")],
            "not c",
        )
        .await;
    assert_eq!(a.recv().await, server_message(None, "not c", "ops"));
    assert_eq!(b.recv().await, server_message(None, "not c", "ops"));
    // A fence on the same subject: NATS and the gateway keep the order, so
    // it is the next frame for everyone, and c never got "not c".
    backend.publish("roomgate.all", "fence").await;
    let fence = server_message(None, "fence", "server");
    assert_eq!(a.recv().await, fence);
    assert_eq!(b.recv().await, fence);
    assert_eq!(c.recv().await, fence);
    gw.stop().await;
}

#[tokio::test]
async fn control_requests_it_cannot_serve_are_answered_rather_than_left_to_time_out() {
    // An unknown action, or a payload with more after its JSON, that names
    // a connection: the instance holding it says what is wrong. A close
    // code written as a float with nothing after the point is a code.
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let gw = nats_gateway(&server, |_| {}).await;
    let mut a = gw.client().await;
    let reply = backend
        .request("roomgate.control.kick", json!({"connection_id": a.id}))
        .await;
    assert_eq!(reply, json!({"ok": false, "error": "unknown_type"}));
    let payload = format!(r#"{{"connection_id":"{}","room":"r"}}xx"#, a.id);
    let reply = within(
        "an answer to a payload with junk after it",
        backend
            .client
            .request("roomgate.control.join", payload.into()),
    )
    .await
    .expect("answered");
    let reply: Value = serde_json::from_slice(&reply.payload).expect("JSON reply");
    assert_eq!(reply, json!({"ok": false, "error": "invalid_json"}));
    // Python's `json.dumps(1000.0)`.
    let payload = format!(r#"{{"connection_id":"{}","code":4001.0}}"#, a.id);
    backend
        .publish("roomgate.control.disconnect", &payload)
        .await;
    assert_eq!(a.recv_close().await, Some(4001));
}

#[tokio::test]
async fn control_subjects_change_membership_and_close_connections() {
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let gw = nats_gateway(&server, |_| {}).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;

    // Fire and forget.
    backend
        .publish(
            "roomgate.control.join",
            &json!({"connection_id": a.id, "room": "vip.lounge"}).to_string(),
        )
        .await;
    assert_eq!(
        a.recv().await,
        json!({"type": "joined", "room": "vip.lounge"})
    );

    // As a request: the owning instance answers once its work is done, so
    // a broadcast sent after the answer reaches the new member.
    let reply = backend
        .request(
            "roomgate.control.join",
            json!({"connection_id": b.id, "room": "vip.lounge"}),
        )
        .await;
    assert_eq!(reply, json!({"ok": true}));
    assert_eq!(
        b.recv().await,
        json!({"type": "joined", "room": "vip.lounge"})
    );
    backend
        .publish("roomgate.broadcast.vip.lounge", "welcome")
        .await;
    let welcome = server_message(Some("vip.lounge"), "welcome", "server");
    assert_eq!(a.recv().await, welcome);
    assert_eq!(b.recv().await, welcome);
    // Members added by a backend talk like any other.
    b.send(json!({"type": "message", "room": "vip.lounge", "content": "hi"}))
        .await;
    assert_eq!(
        a.recv().await,
        json!({"type": "message", "room": "vip.lounge", "content": "hi", "from": b.id})
    );

    let reply = backend
        .request(
            "roomgate.control.leave",
            json!({"connection_id": a.id, "room": "vip.lounge"}),
        )
        .await;
    assert_eq!(reply, json!({"ok": true}));
    assert_eq!(
        a.recv().await,
        json!({"type": "left", "room": "vip.lounge", "reason": "kicked"})
    );
    let reply = backend
        .request(
            "roomgate.control.leave",
            json!({"connection_id": a.id, "room": "vip.lounge"}),
        )
        .await;
    assert_eq!(reply, json!({"ok": false, "error": "not_member"}));
    let reply = backend
        .request(
            "roomgate.control.join",
            json!({"connection_id": a.id, "room": "no spaces"}),
        )
        .await;
    assert_eq!(reply, json!({"ok": false, "error": "invalid_room"}));
    // A malformed request for a connection changes nothing, and the
    // instance holding the connection says so.
    for (subject, payload) in [
        ("join", json!({"connection_id": a.id, "room": 5})),
        ("leave", json!({"connection_id": a.id})),
        ("disconnect", json!({"connection_id": a.id, "reason": 7})),
    ] {
        let reply = backend
            .request(&format!("roomgate.control.{subject}"), payload)
            .await;
        assert_eq!(reply, json!({"ok": false, "error": "invalid_json"}));
    }
    // One that names no connection gets no answer: every instance hears
    // it. The answer to a valid request behind them, on the same
    // subscription (`control.*`) and the same inbox, is the first on it,
    // and it is the next thing a gets.
    let inbox = backend.client.new_inbox();
    let mut answers = backend.subscribe(&inbox).await;
    for (subject, payload) in [
        ("join", "not json"),
        ("leave", r#"{"connection_id":"nope","room":"x"}"#),
        ("join", r#"{"room":"x"}"#),
        (
            "join",
            &json!({"connection_id": a.id, "room": "fence"}).to_string(),
        ),
    ] {
        let subject = format!("roomgate.control.{subject}");
        let payload = payload.to_string().into();
        within(
            "publish",
            backend
                .client
                .publish_with_reply(subject, inbox.clone(), payload),
        )
        .await
        .expect("publish");
    }
    assert_eq!(answers.next_json().await.1, json!({"ok": true}));
    assert_eq!(a.recv().await, json!({"type": "joined", "room": "fence"}));

    let reply = backend
        .request(
            "roomgate.control.disconnect",
            json!({"connection_id": a.id, "code": 4001, "reason": "banned"}),
        )
        .await;
    assert_eq!(reply, json!({"ok": true}));
    assert_eq!(a.recv_close().await, Some(4001));
    // Without a code (or with one a server may not send): 1008.
    backend
        .publish(
            "roomgate.control.disconnect",
            &json!({"connection_id": b.id, "code": 1006}).to_string(),
        )
        .await;
    assert_eq!(b.recv_close().await, Some(1008));
    // A code that is no close code at all still disconnects, with 1008.
    for code in [json!(70000), json!(-1), json!("4001")] {
        let mut c = gw.client().await;
        let reply = backend
            .request(
                "roomgate.control.disconnect",
                json!({"connection_id": c.id, "code": code}),
            )
            .await;
        assert_eq!(reply, json!({"ok": true}), "{code}");
        assert_eq!(c.recv_close().await, Some(1008), "{code}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn what_a_backend_sends_before_a_disconnect_arrives_before_the_close() {
    // Last words, then the disconnect, back to back with no flush between:
    // the close must follow what was queued, not throw it away. Each round
    // was a coin toss when the close dropped the queue.
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let gw = nats_gateway(&server, |_| {}).await;
    for round in 0..20 {
        let mut client = gw.client().await;
        let words = format!("bye {round}");
        let disconnect = json!({"connection_id": client.id, "code": 4000}).to_string();
        within("backend publishes", async {
            let nats = &backend.client;
            let to = format!("roomgate.send.{}", client.id);
            nats.publish(to, words.clone().into())
                .await
                .expect("publish");
            let control = "roomgate.control.disconnect".to_string();
            nats.publish(control, disconnect.into())
                .await
                .expect("publish");
            nats.flush().await.expect("flush");
        })
        .await;
        let frame = client.recv().await;
        assert_eq!(frame["content"], words.as_str(), "round {round}: {frame}");
        assert_eq!(client.recv_close().await, Some(4000), "round {round}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn once_a_member_has_its_joined_the_room_reaches_it_from_everywhere() {
    // b is the first member of each room on its instance, so the instance
    // has to subscribe the room. As soon as b reads `joined`, a member on
    // the other instance and a backend send to the room: b gets both. The
    // `joined` used to go out before the subscription, and a few rounds
    // in a hundred lost one or the other.
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let (one, two) = (
        nats_gateway(&server, |_| {}).await,
        nats_gateway(&server, |_| {}).await,
    );
    let mut a = one.client().await;
    let mut b = two.client().await;
    for round in 0..40 {
        let room = format!("race{round}");
        join_synced(&mut a, &mut presence, &room).await;
        b.join(&room).await;
        a.say(&room, json!("from a"), "m").await;
        backend
            .publish(&format!("roomgate.broadcast.{room}"), "from the backend")
            .await;
        assert_eq!(a.recv().await["content"], "from the backend");
        let mut heard = vec![b.recv().await, b.recv().await];
        heard.sort_by_key(|frame| frame["content"].to_string());
        assert_eq!(heard[0]["content"], "from a", "round {round}: {heard:?}");
        assert_eq!(
            heard[1]["content"], "from the backend",
            "round {round}: {heard:?}"
        );
        for member in [&mut a, &mut b] {
            member.send(json!({"type": "leave", "room": room})).await;
            assert_eq!(member.recv().await["type"], "left");
        }
    }
    one.stop().await;
    two.stop().await;
}

/// Client messages of other instances arrive on `message.<room>`; an
/// instance recognises its own publications by `Roomgate-Gateway` and
/// does not deliver them twice.
#[tokio::test]
async fn peer_messages_are_delivered_unless_they_carry_this_gateway() {
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let gw = nats_gateway(&server, |_| {}).await;
    let mut a = gw.client().await;
    join_synced(&mut a, &mut presence, "general").await;
    let peer = uuid::Uuid::new_v4().to_string();
    let payload = |content: &str| {
        json!({"room": "general", "content": content, "from": peer, "user": null,
               "gateway": "elsewhere", "ts": now_ms()})
        .to_string()
    };
    backend
        .publish_with(
            "roomgate.message.general",
            &[("Roomgate-Gateway", &gw.id)],
            &payload("own"),
        )
        .await;
    backend
        .publish_with(
            "roomgate.message.general",
            &[("Roomgate-Gateway", "another-instance")],
            &payload("theirs"),
        )
        .await;
    assert_eq!(
        a.recv().await,
        json!({"type": "message", "room": "general", "content": "theirs", "from": peer})
    );
    a.expect_silence().await;
    gw.stop().await;
}

/// Whatever a backend sends, the gateway neither stops nor delivers a
/// broken frame.
#[tokio::test]
async fn malformed_backend_input_is_dropped_and_the_bridge_carries_on() {
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let gw = nats_gateway(&server, |_| {}).await;
    let mut a = gw.client().await;
    join_synced(&mut a, &mut presence, "general").await;

    let raw = [("Roomgate-Raw", "true")];
    let non_utf8 = async_nats::HeaderMap::from_iter([(
        "Roomgate-Raw".parse().expect("name"),
        "true".parse().expect("value"),
    )]);
    backend
        .client
        .publish_with_headers(
            "roomgate.broadcast.general",
            non_utf8,
            bytes::Bytes::from_static(&[0xff, 0xfe, b'{']),
        )
        .await
        .expect("publish");
    backend
        .publish("roomgate.message.general", "not a peer message")
        .await;
    backend
        .publish("roomgate.presence.general", r#"{"event":"dance"}"#)
        .await;
    backend.publish("roomgate.control.disconnect", "{").await;
    backend
        .publish_with("roomgate.send.xyz", &raw, "no such connection")
        .await;
    backend
        .publish("roomgate.all.extra", "not a subject of ours")
        .await;
    // A wrapped payload that is not UTF-8 is delivered with replacement
    // characters rather than dropped.
    backend
        .client
        .publish(
            "roomgate.broadcast.general",
            bytes::Bytes::from_static(&[b'h', 0xff, b'i']),
        )
        .await
        .expect("publish");
    assert_eq!(
        a.recv().await,
        server_message(Some("general"), "h\u{fffd}i", "server")
    );
    backend
        .publish("roomgate.broadcast.general", "still here")
        .await;
    assert_eq!(
        a.recv().await,
        server_message(Some("general"), "still here", "server")
    );
    a.expect_silence().await;
    gw.stop().await;
}

/// An instance subscribes to a room's subjects only while the room has
/// local members, as the server itself reports.
#[tokio::test]
async fn room_interest_follows_local_membership() {
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let gw = nats_gateway(&server, |_| {}).await;
    let fixed = ["roomgate.all", "roomgate.control.*", "roomgate.send.*"];
    wait_subjects(&server, &gw.id, "the fixed subscriptions", |s| s == fixed).await;

    let mut a = gw.client().await;
    let mut b = gw.client().await;
    join_synced(&mut a, &mut presence, "game.42.lobby").await;
    let with_room = [
        "roomgate.*.game.42.lobby",
        "roomgate.all",
        "roomgate.control.*",
        "roomgate.send.*",
    ];
    assert_eq!(gateway_subjects(&server, &gw.id).await, with_room);
    join_synced(&mut b, &mut presence, "game.42.lobby").await;
    assert_eq!(gateway_subjects(&server, &gw.id).await, with_room);

    // Messages for the room are taken in while it has members...
    let received = gw.metric("roomgate_nats_received_total").await;
    backend
        .publish("roomgate.broadcast.game.42.lobby", "one")
        .await;
    a.recv().await;
    b.recv().await;
    assert_eq!(
        gw.metric("roomgate_nats_received_total").await,
        received + 1.0
    );

    // ... still with one member left ...
    a.send(json!({"type": "leave", "room": "game.42.lobby"}))
        .await;
    a.recv().await;
    presence.next_matching(|_, v| v["event"] == "leave").await;
    assert_eq!(gateway_subjects(&server, &gw.id).await, with_room);

    // ... and not once the last one is gone (here by disconnecting).
    drop(b);
    presence.next_matching(|_, v| v["event"] == "leave").await;
    wait_subjects(&server, &gw.id, "the room's subscriptions to go", |s| {
        s == fixed
    })
    .await;
    backend
        .publish("roomgate.broadcast.game.42.lobby", "two")
        .await;
    backend.publish("roomgate.all", "three").await;
    assert_eq!(a.recv().await, server_message(None, "three", "server"));
    assert_eq!(
        gw.metric("roomgate_nats_received_total").await,
        received + 2.0
    );

    // A client that joins and leaves in a loop leaves no interest behind,
    // and the room it ends up in is subscribed.
    for i in 0..50 {
        let room = format!("loop.{}", i % 5);
        a.send(json!({"type": "join", "room": room})).await;
        a.send(json!({"type": "leave", "room": room})).await;
    }
    a.send(json!({"type": "join", "room": "loop.final"})).await;
    for _ in 0..100 {
        a.recv().await;
    }
    assert_eq!(
        a.recv().await,
        json!({"type": "joined", "room": "loop.final"})
    );
    wait_subjects(&server, &gw.id, "only loop.final's subscriptions", |s| {
        s == [
            "roomgate.*.loop.final",
            "roomgate.all",
            "roomgate.control.*",
            "roomgate.send.*",
        ]
    })
    .await;
    gw.stop().await;
}

/// Without `client_broadcast` an instance does not take in the room's
/// client messages (only backends act on them): it subscribes to the
/// room's broadcasts, and its presence when members are told of it.
#[tokio::test]
async fn room_subscriptions_without_client_broadcast_are_exact() {
    for (presence, room_subjects) in [
        (false, &["roomgate.broadcast.general"][..]),
        (
            true,
            &["roomgate.broadcast.general", "roomgate.presence.general"][..],
        ),
    ] {
        let server = NatsServer::start();
        let backend = Backend::connect(&server).await;
        let mut presence_events = backend.subscribe("roomgate.presence.>").await;
        let gw = nats_gateway(&server, |c| {
            c.websocket.rooms.presence = presence;
            c.websocket.rooms.client_broadcast = false;
        })
        .await;
        let mut a = gw.client().await;
        join_synced(&mut a, &mut presence_events, "general").await;
        let mut expected: Vec<&str> = ["roomgate.all", "roomgate.control.*", "roomgate.send.*"]
            .into_iter()
            .chain(room_subjects.iter().copied())
            .collect();
        expected.sort();
        assert_eq!(gateway_subjects(&server, &gw.id).await, expected);
        gw.stop().await;
    }
}

/// A room's subscription (`roomgate.*.<room>`) also matches fixed
/// subjects when the room is named like their last token: `join`,
/// `open`, a connection id. Each message is still acted on once, by the
/// subscription it is meant for.
#[tokio::test]
async fn rooms_named_like_fixed_subjects_do_not_double_deliver() {
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let mut lobby = backend.subscribe("roomgate.message.lobby").await;
    let gw = nats_gateway(&server, |_| {}).await;
    let mut a = gw.client().await;
    let a_id = a.id.clone();
    let rooms = [
        "join",
        "leave",
        "disconnect",
        "open",
        "close",
        a_id.as_str(),
    ];
    for room in rooms {
        join_synced(&mut a, &mut presence, room).await;
    }

    // One `joined`, one answer.
    let inbox = backend.client.new_inbox();
    let mut replies = backend.subscribe(&inbox).await;
    backend
        .client
        .publish_with_reply(
            "roomgate.control.join",
            inbox.clone(),
            json!({"connection_id": a.id, "room": "lobby"})
                .to_string()
                .into(),
        )
        .await
        .expect("publish");
    assert_eq!(replies.next_json().await.1, json!({"ok": true}));
    assert_eq!(a.recv().await, json!({"type": "joined", "room": "lobby"}));
    // One direct message.
    backend
        .publish(&format!("roomgate.send.{}", a.id), "once")
        .await;
    assert_eq!(a.recv().await, server_message(None, "once", "server"));
    // Connections opening and closing on another instance are not
    // messages in the rooms `open` and `close` (the gateway does not hear
    // its own events; a backend publishes them as another instance would).
    for event in ["open", "close"] {
        let payload = json!({"connection_id": uuid::Uuid::new_v4(), "ts": 1});
        backend
            .publish(
                &format!("roomgate.connection.{event}"),
                &payload.to_string(),
            )
            .await;
    }
    // A broadcast to each room comes through the subscription any second
    // delivery above would have come through, behind it: the next frames
    // are these broadcasts and nothing else.
    for room in rooms {
        backend
            .publish(&format!("roomgate.broadcast.{room}"), &format!("in {room}"))
            .await;
    }
    let mut got = Vec::new();
    for _ in rooms {
        got.push(a.recv().await.to_string());
    }
    let mut expected: Vec<String> = rooms
        .iter()
        .map(|room| server_message(Some(room), &format!("in {room}"), "server").to_string())
        .collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    // A second answer to the control request would have been queued for
    // publishing before the broadcast to `join` reached a. A message from a
    // is published after it, through the same queue and connection, so by
    // the time the backend has the message it would have the answer too.
    a.send(json!({"type": "message", "room": "lobby", "content": "fence"}))
        .await;
    let (_, fence) = lobby.next_json().await;
    assert_eq!(fence["content"], "fence");
    if let Some(extra) =
        futures_util::FutureExt::now_or_never(futures_util::StreamExt::next(&mut replies.0))
    {
        panic!("a second answer: {extra:?}");
    }
    gw.stop().await;
}

/// The example backend (`examples/echo_backend.rs`) against a real gateway.
#[tokio::test]
async fn echo_backend_answers_into_the_room() {
    let server = NatsServer::start();
    let bot = echo_backend::EchoBot::start(server.client().await, "roomgate")
        .await
        .expect("the bot subscribes");
    let bot = tokio::spawn(bot.run());
    wait_for_subscriber(&server, "roomgate.message.>").await;
    let backend = Backend::connect(&server).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let gw = nats_gateway(&server, |_| {}).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    join_synced(&mut a, &mut presence, "general").await;
    join_synced(&mut b, &mut presence, "general").await;

    a.send(json!({"type": "message", "room": "general", "content": "ping"}))
        .await;
    assert_eq!(
        b.recv().await,
        json!({"type": "message", "room": "general", "content": "ping", "from": a.id})
    );
    let echo = server_message(Some("general"), "echo: ping", "bot");
    assert_eq!(a.recv().await, echo);
    assert_eq!(b.recv().await, echo);

    // The moderation rule: a blocked word is not echoed, and only its
    // author is told why.
    a.send(json!({"type": "message", "room": "general", "content": "you badword"}))
        .await;
    b.recv_type("message").await;
    assert_eq!(
        a.recv().await,
        server_message(None, echo_backend::WARNING, "bot")
    );
    // The bot handles messages in order and publishes its echoes on one
    // subject: the echo of a later message is the next thing in the room.
    a.send(json!({"type": "message", "room": "general", "content": "fence"}))
        .await;
    assert_eq!(
        b.recv().await,
        json!({"type": "message", "room": "general", "content": "fence", "from": a.id})
    );
    let echo = server_message(Some("general"), "echo: fence", "bot");
    assert_eq!(a.recv().await, echo);
    assert_eq!(b.recv().await, echo);
    gw.stop().await;
    bot.abort();
}

/// Measures what a subscription costs in this process: RSS with 10,000
/// async-nats subscriptions against none, then with a delivery task each
/// (as the bridge keeps them), and the server's memory for them. Run
/// alone, it prints the numbers `docs/nats.md` quotes:
/// `cargo test --test nats -- --ignored --nocapture subscription_cost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run alone with --ignored --nocapture"]
async fn subscription_cost() {
    use futures_util::StreamExt;
    const N: u64 = 10_000;
    let server = NatsServer::start();
    let client = server.client().await;
    let server_mem = |v: &Value| v["mem"].as_u64().unwrap_or(0);
    let varz_before = server.monitor("/varz").await;
    let rss_start = rss_bytes();
    let mut subscribers = Vec::new();
    for i in 0..N {
        let subscriber = client
            .subscribe(format!("roomgate.broadcast.room{i}"))
            .await
            .expect("subscribe");
        subscribers.push(subscriber);
    }
    client.flush().await.expect("flush");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let rss_subscribed = rss_bytes();
    let varz_after = server.monitor("/varz").await;
    let tasks: Vec<_> = subscribers
        .into_iter()
        .map(|mut subscriber| {
            tokio::spawn(async move { while subscriber.next().await.is_some() {} })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let rss_tasks = rss_bytes();

    let per_subscription = rss_subscribed.saturating_sub(rss_start) / N;
    let per_task = rss_tasks.saturating_sub(rss_subscribed) / N;
    let server_per_subscription =
        server_mem(&varz_after).saturating_sub(server_mem(&varz_before)) / N;
    println!(
        "{N} subscriptions: client RSS {} -> {} KiB ({per_subscription} B each), \
         + a task each -> {} KiB ({per_task} B each); size_of::<Message>() = {} B; \
         nats-server mem {} -> {} KiB ({server_per_subscription} B each, {} subscriptions)",
        rss_start / 1024,
        rss_subscribed / 1024,
        rss_tasks / 1024,
        std::mem::size_of::<async_nats::Message>(),
        server_mem(&varz_before) / 1024,
        server_mem(&varz_after) / 1024,
        varz_after["subscriptions"],
    );
    assert!(
        per_subscription + per_task < 64 * 1024,
        "a subscription costs {per_subscription} + {per_task} bytes"
    );
    for task in tasks {
        task.abort();
    }
}

/// Resident set size of this process, from /proc.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmRSS")
}

/// Resident set size of process `pid`, from /proc.
fn rss_of(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:")
}

/// A size in /proc/`pid`/status (`VmRSS:`, `VmHWM:`), in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// A backend that publishes large payloads faster than they become frames
/// (control characters, escaped sixfold) must not make the gateway hold
/// them all: what waits for delivery is bounded in bytes (64 MiB), not only
/// in messages (4,096 per subscription, 4 GB of 1 MB payloads). A small
/// payload follows each large one, as one does when a backend interleaves
/// them (that such a payload, kept, does not keep the large one beside it
/// in memory is pinned by `nats::backlog`'s unit tests; here it would move
/// the peak too little to tell). Every message is either delivered or
/// dropped and counted, and the gateway's peak memory stays far below
/// what was published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_large_backend_payloads_is_held_within_a_byte_budget() {
    const LARGE: usize = 800;
    const MESSAGES: usize = 2 * LARGE;
    const PAYLOAD: usize = 1_000_000;
    let server = NatsServer::start();
    let gateway = nats_gateway_process(&server, &[("ROOMGATE_WEBSOCKET_SLOW_CONSUMER", "drop")]);
    let metric = |name: &'static str| async { process_metric(&gateway, name).await as usize };
    eventually_async("the gateway is connected to NATS", || async {
        metric("roomgate_nats_connected").await == 1
    })
    .await;
    // One connection that reads nothing, so `all` has someone to build
    // frames for; its queue overflows and drops (counted elsewhere).
    let _member = WsClient::connect(&format!("ws://{}/ws", gateway.addr)).await;
    eventually_async("the member is counted", || async {
        metric("roomgate_connections").await == 1
    })
    .await;
    let backend = Backend::connect(&server).await;
    let large = "\u{1}".repeat(PAYLOAD);
    backend
        .publish_burst(
            "roomgate.all",
            (0..MESSAGES).map(|i| {
                let payload = if i % 2 == 0 {
                    large.clone()
                } else {
                    "hi".into()
                };
                (async_nats::HeaderMap::new(), payload)
            }),
        )
        .await;
    backend.sync().await;
    let taken = || async {
        metric("roomgate_nats_received_total").await
            + metric("roomgate_messages_dropped_total{reason=\"nats_slow_consumer\"}").await
    };
    within_for(
        std::time::Duration::from_secs(120),
        "every message delivered or dropped",
        async {
            while taken().await < MESSAGES {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        },
    )
    .await;
    assert_eq!(taken().await, MESSAGES, "each counted once");
    let peak = status_bytes(gateway.child.id(), "VmHWM:");
    eprintln!("peak RSS {} MiB", peak >> 20);
    assert!(
        peak < 512 * 1024 * 1024,
        "peak RSS {} MiB for {} MiB published",
        peak >> 20,
        (LARGE * PAYLOAD) >> 20
    );
}

/// Memory of the room interest in the real binary: 100 clients join 100
/// rooms each (10,000 rooms), with NATS off and with NATS on under each
/// room setting; the RSS growth is compared. Run alone:
/// `cargo test --test nats -- --ignored --nocapture room_interest_memory`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run alone with --ignored --nocapture"]
async fn room_interest_memory() {
    const CLIENTS: usize = 100;
    const ROOMS_EACH: usize = 100;
    let server = NatsServer::start();
    let url = server.url();
    let variants: [(&str, &[(&str, &str)]); 4] = [
        ("NATS off", &[("ROOMGATE_NATS_ENABLED", "false")]),
        ("NATS on, defaults", &[("ROOMGATE_NATS_ENABLED", "true")]),
        (
            "NATS on, presence",
            &[
                ("ROOMGATE_NATS_ENABLED", "true"),
                ("ROOMGATE_WEBSOCKET_ROOMS_PRESENCE", "true"),
            ],
        ),
        (
            "NATS on, no client_broadcast",
            &[
                ("ROOMGATE_NATS_ENABLED", "true"),
                ("ROOMGATE_WEBSOCKET_ROOMS_CLIENT_BROADCAST", "false"),
            ],
        ),
    ];
    for (name, env) in variants {
        let mut env = env.to_vec();
        env.push(("ROOMGATE_NATS_URL", &url));
        env.push(("ROOMGATE_WEBSOCKET_ROOMS_MAX_ROOMS_PER_CONNECTION", "100"));
        let gateway = GatewayProcess::start(&[], &env);
        let url = format!("ws://{}/ws", gateway.addr);
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            clients.push(WsClient::connect(&url).await);
        }
        let subs_before = server.monitor("/varz").await["subscriptions"]
            .as_u64()
            .unwrap_or(0);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let before = rss_of(gateway.child.id());
        for (c, client) in clients.iter_mut().enumerate() {
            for r in 0..ROOMS_EACH {
                client
                    .send(json!({"type": "join", "room": format!("room.{c}.{r}")}))
                    .await;
            }
            for _ in 0..ROOMS_EACH {
                assert_eq!(client.recv().await["type"], "joined");
            }
        }
        // Wait for the subscriptions to settle on the server.
        let mut subs = subs_before;
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let now = server.monitor("/varz").await["subscriptions"]
                .as_u64()
                .unwrap_or(0);
            if now == subs && now != subs_before {
                break;
            }
            subs = now;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let after = rss_of(gateway.child.id());
        let rooms = (CLIENTS * ROOMS_EACH) as u64;
        println!(
            "{name}: RSS {} -> {} KiB for {rooms} rooms: {} B per room; server subscriptions +{}",
            before / 1024,
            after / 1024,
            after.saturating_sub(before) / rooms,
            subs.saturating_sub(subs_before),
        );
        drop(clients);
        drop(gateway);
    }
}

#[tokio::test]
async fn a_burst_of_broadcasts_reaches_each_member_complete_and_in_order() {
    const MESSAGES: usize = 150;
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let gw = nats_gateway(&server, |_| {}).await;
    let mut members = Vec::new();
    for _ in 0..3 {
        let mut client = gw.client().await;
        join_synced(&mut client, &mut presence, "burst").await;
        members.push(client);
    }
    let ids: Vec<String> = members.iter().map(|m| m.id.clone()).collect();
    let delivered_before = gw.metric("roomgate_messages_delivered_total").await;

    // Published back to back and flushed once, so the gateway receives them
    // together; each message skips the first member, the second, or nobody,
    // in turn, which splits every burst into short runs.
    let skipped = |i: usize| (i % 3 < 2).then_some(i % 3);
    let burst = (0..MESSAGES).map(|i| {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(m) = skipped(i) {
            headers.insert("Roomgate-Exclude", ids[m].as_str());
        }
        (headers, i.to_string())
    });
    backend
        .publish_burst("roomgate.broadcast.burst", burst)
        .await;

    for (m, member) in members.iter_mut().enumerate() {
        for i in (0..MESSAGES).filter(|i| skipped(*i) != Some(m)) {
            assert_eq!(
                member.recv().await,
                server_message(Some("burst"), &i.to_string(), "server"),
                "member {m}, message {i}"
            );
        }
    }
    let delivered = gw.metric("roomgate_messages_delivered_total").await - delivered_before;
    let skips = (0..MESSAGES).filter(|i| skipped(*i).is_some()).count();
    assert_eq!(delivered, (3 * MESSAGES - skips) as f64);
    for member in &mut members {
        member.expect_silence().await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_kick_during_a_write_delivers_the_queued_frames_whole_then_closes() {
    // The member reads nothing, so the write stops somewhere inside the
    // burst; the member is then kicked. The frame in progress is finished,
    // the frames queued after it go out too (the client did nothing
    // wrong), and the close frame follows.
    let (data, close) = torn_burst(|c| c.websocket.ping_interval_secs = 3600, Ending::Kick).await;
    assert_eq!(close, Some(4000), "then the kick's close frame");
    assert_eq!(
        data, TORN_MESSAGES,
        "every queued frame, whole and in order"
    );
}

#[tokio::test]
async fn a_slow_consumer_close_during_a_write_ends_on_a_whole_frame() {
    // The same burst overflows a queue of 8 frames: the member is closed
    // as a slow consumer while its write is cut short. The frame in
    // progress is finished, the queued ones are dropped, and the 1013
    // close frame follows: the client sees whole frames only.
    let (data, close) = torn_burst(
        |c| {
            c.websocket.ping_interval_secs = 3600;
            c.websocket.send_queue_capacity = 8;
        },
        Ending::SlowConsumer,
    )
    .await;
    assert_eq!(close, Some(1013), "then the slow consumer's close frame");
    assert!(
        (1..TORN_MESSAGES).contains(&data),
        "the write was cut short: {data} of {TORN_MESSAGES} frames"
    );
}

#[tokio::test]
async fn shutdown_during_a_write_delivers_the_queued_frames_whole_then_1001() {
    // As for a kick: the client did nothing wrong, and what was queued for
    // it goes out before the 1001, within the pong timeout.
    let (data, close) =
        torn_burst(|c| c.websocket.ping_interval_secs = 3600, Ending::Shutdown).await;
    assert_eq!(close, Some(1001), "then the shutdown's close frame");
    assert_eq!(
        data, TORN_MESSAGES,
        "every queued frame, whole and in order"
    );
}

/// Frames of [`torn_burst`].
const TORN_MESSAGES: usize = 100;

/// How [`torn_burst`] ends the member's connection.
enum Ending {
    /// A backend's `control.disconnect`, code 4000.
    Kick,
    /// The member's queue overflows.
    SlowConsumer,
    /// The gateway stops.
    Shutdown,
}

/// Sends a member that reads nothing a 7 MB burst (more than the socket
/// buffers between them hold), as one buffer of frames back to back, so
/// that the gateway's write stops inside it; then the connection is ended
/// as `ending` says. Only then does the member read: it returns how many
/// data frames came, each checked whole and in order, and the close code
/// that followed them.
async fn torn_burst(
    edit: impl FnOnce(&mut roomgate::Config),
    ending: Ending,
) -> (usize, Option<u16>) {
    const SIZE: usize = 70_000;
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let mut gw = nats_gateway(&server, edit).await;
    let (mut stream, id) = stuck_member(&gw, &mut presence, "torn").await;
    let mut watcher = gw.client().await;
    join_synced(&mut watcher, &mut presence, "torn").await;

    let payload = |i: usize| format!("{i:05}{}", "x".repeat(SIZE - 5));
    backend
        .publish_burst(
            "roomgate.broadcast.torn",
            (0..TORN_MESSAGES).map(|i| (raw(), payload(i))),
        )
        .await;
    // Once the first bytes arrive the writer is inside the burst, and it
    // cannot finish it.
    within("the burst to start arriving", async {
        let mut probe = [0u8; 1];
        stream.peek(&mut probe).await.expect("peek")
    })
    .await;
    if let Ending::Kick = ending {
        backend
            .publish(
                "roomgate.control.disconnect",
                &json!({"connection_id": id, "code": 4000}).to_string(),
            )
            .await;
    } else {
        // The room's messages are handed out in order: once a member that
        // reads has the one after the burst, every frame of the burst was
        // offered to the stuck member (a small queue overflowed on the way).
        backend
            .publish_with(
                "roomgate.broadcast.torn",
                &[("Roomgate-Raw", "true")],
                "end",
            )
            .await;
        within("the watcher to read the burst", async {
            while let Some(frame) = futures_util::StreamExt::next(&mut watcher.ws).await {
                if frame.expect("frame").into_text().expect("text").as_str() == "end" {
                    return;
                }
            }
            panic!("the watcher's connection ended");
        })
        .await;
        if let Ending::Shutdown = ending {
            gw.begin_stop();
        }
    }

    let mut data = 0;
    let close = within("every frame up to the close", async {
        loop {
            let frame = read_raw_frame(&mut stream).await.expect("a whole frame");
            if frame.opcode != 1 {
                return frame;
            }
            if frame.payload == b"end" {
                // The marker after the burst, when it was queued too.
                continue;
            }
            assert_eq!(frame.payload.len(), SIZE, "data frame {data} is whole");
            assert_eq!(
                &frame.payload[..5],
                format!("{data:05}").as_bytes(),
                "in order"
            );
            data += 1;
        }
    })
    .await;
    drop(stream);
    gw.stop().await;
    (data, close.close_code())
}

/// Checks that no member was closed or lost frames as a slow consumer.
async fn assert_no_slow_consumer(gw: &TestGateway) {
    let slow = r#"roomgate_connections_closed_total{reason="slow_consumer"}"#;
    assert_eq!(gw.metric(slow).await, 0.0, "closed as slow");
    let dropped = r#"roomgate_messages_dropped_total{reason="slow_consumer"}"#;
    assert_eq!(gw.metric(dropped).await, 0.0, "frames dropped");
}

/// A burst far longer than a member's queue reaches, whole, a member whose
/// socket takes what it is sent: the bridge lets the members' writers take
/// each run before it queues the next. On this test's single-threaded
/// runtime the writers run only when the bridge lets them.
#[tokio::test]
async fn a_burst_longer_than_the_send_queue_reaches_a_member_that_keeps_up() {
    const MESSAGES: usize = 400;
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let gw = nats_gateway(&server, |c| c.websocket.send_queue_capacity = 16).await;
    let mut member = gw.client().await;
    join_synced(&mut member, &mut presence, "burst").await;

    backend
        .publish_burst(
            "roomgate.broadcast.burst",
            (0..MESSAGES).map(|i| (raw(), format!("[{i}]"))),
        )
        .await;
    for i in 0..MESSAGES {
        assert_eq!(member.recv_text().await, format!("[{i}]"));
    }
    assert_no_slow_consumer(&gw).await;
    gw.stop().await;
}

/// A gateway with the `drop` policy, no pings, and `edit` applied, and in
/// its room `room` a member that reads nothing, with its id.
async fn gateway_with_a_stuck_member(
    server: &NatsServer,
    backend: &Backend,
    room: &str,
    edit: impl FnOnce(&mut roomgate::Config),
) -> (TestGateway, tokio::net::TcpStream, String) {
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let gw = nats_gateway(server, |c| {
        c.websocket.ping_interval_secs = 3600;
        c.websocket.slow_consumer = roomgate::config::SlowConsumerPolicy::Drop;
        edit(c);
    })
    .await;
    let (stuck, id) = stuck_member(&gw, &mut presence, room).await;
    (gw, stuck, id)
}

/// Waits until each of `messages` frames sent after the delivered count
/// stood at `delivered_before` was queued or dropped; returns how many
/// were queued and how many dropped, and checks each was counted once.
async fn queued_and_dropped(
    gw: &TestGateway,
    delivered_before: f64,
    messages: usize,
) -> (f64, f64) {
    let delivered = "roomgate_messages_delivered_total";
    let dropped = r#"roomgate_messages_dropped_total{reason="slow_consumer"}"#;
    eventually_async("every frame to be queued or dropped", || async {
        gw.metric(delivered).await - delivered_before + gw.metric(dropped).await >= messages as f64
    })
    .await;
    let queued = gw.metric(delivered).await - delivered_before;
    let lost = gw.metric(dropped).await;
    assert_eq!(queued + lost, messages as f64, "each frame counted once");
    (queued, lost)
}

/// Publishes `payloads` to `subject` from a thread of its own while this
/// test's only runtime thread (the gateway's) is blocked, so that they wait
/// in the gateway's NATS socket and arrive all at once: a burst.
fn publish_as_one_burst(
    server: &NatsServer,
    subject: &'static str,
    headers: async_nats::HeaderMap,
    payloads: Vec<String>,
) {
    let url = server.url();
    let publisher = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let client = within("connect", async_nats::connect(url))
                .await
                .expect("connect");
            for payload in payloads {
                within(
                    "publish",
                    client.publish_with_headers(subject, headers.clone(), payload.into()),
                )
                .await
                .expect("publish");
            }
            within("flush", client.flush()).await.expect("flush");
        });
    });
    // Blocks the gateway until the burst has reached nats-server, and a
    // moment more for nats-server to pass it on. (The tests pass however
    // the burst arrives; arriving at once is what makes it a burst.)
    publisher.join().expect("publisher");
    std::thread::sleep(std::time::Duration::from_millis(200));
}

/// A gateway whose send queues hold 16 frames and 1 MiB (the least byte
/// budget), and a member of `room` on it.
async fn member_with_a_1_mib_budget(room: &str) -> (NatsServer, TestGateway, WsClient) {
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let gw = nats_gateway(&server, |c| {
        c.websocket.send_queue_capacity = 16;
        c.websocket.max_message_size_bytes = 4096;
    })
    .await;
    let mut member = gw.client().await;
    join_synced(&mut member, &mut presence, room).await;
    (server, gw, member)
}

/// A burst of large messages that arrive together is handed to members
/// half a send queue's byte budget at a time, so it reaches a member that
/// keeps up whole. The burst is published from a thread of its own while
/// this test's only runtime thread (the gateway's) is blocked, so that it
/// waits in the gateway's NATS socket and arrives all at once.
#[tokio::test]
async fn a_burst_of_large_messages_reaches_a_member_that_keeps_up() {
    const MESSAGES: usize = 8;
    const SIZE: usize = 200_000;
    // A byte budget of 1 MiB: five of these messages.
    let (server, gw, mut member) = member_with_a_1_mib_budget("large").await;
    let reader = tokio::spawn(async move {
        for i in 0..MESSAGES {
            let text = member.recv_text().await;
            assert!(text.starts_with(&format!("{i}:")), "{:.20}", text);
            assert_eq!(text.len(), SIZE);
        }
        member
    });

    let payloads = (0..MESSAGES).map(|i| format!("{i}:{}", "x".repeat(SIZE - 2)));
    publish_as_one_burst(
        &server,
        "roomgate.broadcast.large",
        raw(),
        payloads.collect(),
    );

    within("the whole burst", reader).await.expect("reader");
    assert_no_slow_consumer(&gw).await;
    gw.stop().await;
}

/// The same for wrapped messages of control characters, each of which
/// grows six times as it is escaped into the frame's JSON, so that the
/// burst's frames come to more than the member's byte budget: the member
/// still gets all of it.
#[tokio::test]
async fn a_burst_of_messages_that_grow_when_escaped_reaches_a_member_that_keeps_up() {
    const MESSAGES: usize = 8;
    const SIZE: usize = 30_000;
    // A byte budget of 1 MiB: five of these frames.
    let (server, gw, mut member) = member_with_a_1_mib_budget("escaped").await;
    let reader = tokio::spawn(async move {
        for i in 0..MESSAGES {
            let frame = member.recv().await;
            let content = frame["content"].as_str().expect("text content");
            assert!(content.starts_with(&format!("{i}:")), "{:.20}", content);
            assert_eq!(content.len(), SIZE);
        }
        member
    });

    let payloads = (0..MESSAGES).map(|i| format!("{i}:{}", "\u{1}".repeat(SIZE - 2)));
    publish_as_one_burst(
        &server,
        "roomgate.broadcast.escaped",
        async_nats::HeaderMap::new(),
        payloads.collect(),
    );

    within("the whole burst", reader).await.expect("reader");
    assert_no_slow_consumer(&gw).await;
    gw.stop().await;
}

#[tokio::test]
async fn a_burst_to_a_member_with_a_full_queue_is_queued_as_far_as_it_fits_and_counted() {
    // A member that reads nothing, with a queue of 7 frames and the `drop`
    // policy, gets a 6 MB burst of small frames, which the gateway takes in
    // runs of 3 (half the queue): once the socket buffers are full, a third
    // run meets a queue with room for only one of its frames. Every frame is either
    // queued or dropped, each counted once, and the bytes sent are those
    // of the queued frames.
    const MESSAGES: usize = 3000;
    const SIZE: usize = 2000;
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let (gw, stuck, _) = gateway_with_a_stuck_member(&server, &backend, "full", |c| {
        c.websocket.send_queue_capacity = 7
    })
    .await;
    let (delivered_before, bytes_before) = (
        gw.metric("roomgate_messages_delivered_total").await,
        gw.metric("roomgate_bytes_sent_total").await,
    );

    let payload = |i: usize| format!("{i:05}{}", "y".repeat(SIZE - 5));
    backend
        .publish_burst(
            "roomgate.broadcast.full",
            (0..MESSAGES).map(|i| (raw(), payload(i))),
        )
        .await;
    let (queued, lost) = queued_and_dropped(&gw, delivered_before, MESSAGES).await;
    assert!(lost > 0.0, "the queue never filled");
    assert_eq!(
        gw.metric("roomgate_bytes_sent_total").await - bytes_before,
        queued * SIZE as f64,
        "bytes of the queued frames"
    );
    assert_eq!(
        gw.metric("roomgate_connections").await,
        1.0,
        "still connected"
    );
    drop(stuck);
    gw.stop().await;
}

#[tokio::test]
async fn frames_for_a_member_that_reads_nothing_are_bounded_in_bytes_not_only_in_number() {
    // Sixty wrapped messages of control characters, each escaped to six
    // times its size (about 900 KB a frame, 54 MB in all), are far fewer
    // than the queue's 256 frames but far more than its byte budget (1 MiB
    // with a message size limit of 4 KiB) and the socket buffers: what does
    // not fit must be dropped, not held for a client that never reads.
    const MESSAGES: usize = 60;
    const SIZE: usize = 150_000;
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let (gw, stuck, id) = gateway_with_a_stuck_member(&server, &backend, "bytes", |c| {
        c.websocket.max_message_size_bytes = 4096
    })
    .await;
    let delivered_before = gw.metric("roomgate_messages_delivered_total").await;

    let payload = "\u{1}".repeat(SIZE);
    backend
        .publish_burst(
            &format!("roomgate.send.{id}"),
            (0..MESSAGES).map(|_| (async_nats::HeaderMap::new(), payload.clone())),
        )
        .await;
    let (_, lost) = queued_and_dropped(&gw, delivered_before, MESSAGES).await;
    // Counted in frames alone, all sixty would have been queued. How many
    // are dropped depends on what the kernel's socket buffers took.
    assert!(
        lost > 0.0,
        "none of {MESSAGES} frames of 900 KB was dropped"
    );
    assert_eq!(
        gw.metric("roomgate_connections").await,
        1.0,
        "still connected"
    );
    drop(stuck);
    gw.stop().await;
}

/// With no grace period, shutdown cuts every session at once. Each still
/// reports a shutdown close (1001) on NATS, not an error, whether its
/// writer got to send the 1001 or the cut came first.
#[tokio::test]
async fn sessions_cut_with_no_grace_period_report_a_shutdown_close() {
    const CLIENTS: usize = 20;
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut opens = backend.subscribe("roomgate.connection.open").await;
    let mut closes = backend.subscribe("roomgate.connection.close").await;
    let gw = nats_gateway(&server, |c| c.server.shutdown_grace_secs = 0).await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(gw.client().await);
        opens.next_json().await;
    }

    gw.stop().await;
    for _ in 0..CLIENTS {
        let (_, close) = closes.next_json().await;
        assert_eq!(close["code"], 1001, "{close}");
    }
    closes.expect_silence().await;
    drop(clients);
}

#[tokio::test]
async fn a_client_tapping_every_subject_holds_off_join_confirmations_only_while_it_listens() {
    // A client subscribed to `>` (a debugging tap) is handed the request
    // that confirms room subscriptions, and does not answer it. After three
    // unanswered rounds joins stop waiting for it, and the log names the
    // tap among the causes; once the tap has gone, a request sent in the
    // background is answered, and joins wait for round trips again.
    let server = NatsServer::start();
    let tap = Backend::connect(&server).await;
    let mut everything = tap.subscribe(">").await;
    let gateway = nats_gateway_process(&server, &[]);
    let mut member = member_after_unconfirmed_joins(&gateway).await;
    assert!(
        gateway.logged("subscribe to > or _INBOX.>") == 1,
        "the warning names the tap"
    );
    // The tap was handed the confirmations.
    within("a confirmation at the tap", async {
        while !everything.next().await.subject.ends_with(".roomgate-probe") {}
    })
    .await;
    within("the tap to leave", everything.0.unsubscribe())
        .await
        .expect("unsubscribe");
    tap.sync().await;
    // Each join's confirmation sends a request in the background; the
    // first answered one brings the round trips back at the next.
    for n in 3..23 {
        if gateway.logged("confirms new room subscriptions again") == 1 {
            break;
        }
        let room = format!("r{n}");
        member.join(&room).await;
        member.leave(&room).await;
    }
    eventually("the round trips to come back", || {
        gateway.logged("confirms new room subscriptions again") == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_still_waiting_when_a_room_empties_count_as_received() {
    // A backend floods a room whose only member reads nothing, then
    // disconnects that member. Whatever of the flood the room's delivery
    // task had not handled when the room emptied is delivered to no one,
    // and still counts as taken from NATS: every message does.
    const MESSAGES: usize = 3000;
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let gw = nats_gateway(&server, |c| {
        c.websocket.slow_consumer = roomgate::config::SlowConsumerPolicy::Drop;
    })
    .await;
    wait_nats_connected(&gw, true).await;
    let (_stream, id) = stuck_member(&gw, &mut presence, "flood").await;
    let before = gw.metric("roomgate_nats_received_total").await as usize;
    let payload = "x".repeat(3000);
    backend
        .publish_burst(
            "roomgate.broadcast.flood",
            (0..MESSAGES).map(|_| (async_nats::HeaderMap::new(), payload.clone())),
        )
        .await;
    // After the flood on the same connection: the gateway has all of it
    // when this arrives.
    backend
        .publish(
            "roomgate.control.disconnect",
            &json!({"connection_id": id}).to_string(),
        )
        .await;
    eventually_async("the room to be dropped", || async {
        !covers_room(&gateway_subjects(&server, &gw.id).await, "flood")
    })
    .await;
    eventually_async("every message counted", || async {
        gw.metric("roomgate_nats_received_total").await as usize - before == MESSAGES + 1
    })
    .await;
    let dropped = gw
        .metric("roomgate_messages_dropped_total{reason=\"nats_slow_consumer\"}")
        .await;
    assert_eq!(dropped, 0.0, "none of it was dropped for the budget");
}
