//! Several gateway instances on one NATS form one system (SPEC §2): room
//! members on different instances hear each other exactly once and in
//! order, backends reach a connection wherever it lives, control acts only
//! where the connection is, and the same holds across a NATS cluster.

mod common;
mod nats_support;

use std::collections::HashMap;

use std::time::Duration;

use async_nats::HeaderMap;
use common::*;
use futures_util::StreamExt;
use nats_support::*;
use serde_json::json;

/// Sends probe messages from `sender` to `room` until `receiver` gets one
/// (each wait bounded), for interest that is still crossing routes.
async fn probe_until_delivered(sender: &mut WsClient, receiver: &mut WsClient, room: &str) {
    within("a message to cross the cluster", async {
        loop {
            sender
                .send(json!({"type": "message", "room": room, "content": "probe"}))
                .await;
            if let Ok(Some(frame)) =
                tokio::time::timeout(Duration::from_millis(200), receiver.next_json()).await
            {
                assert_eq!(frame["content"], "probe");
                return;
            }
        }
    })
    .await;
}

/// Sends a fence from `sender` and reads `receiver` up to it: the probes
/// `sender` sent before travel the same path ahead of it, so all of them
/// have arrived once it has.
async fn drain_probes(sender: &mut WsClient, receiver: &mut WsClient, room: &str) {
    sender
        .send(json!({"type": "message", "room": room, "content": "fence"}))
        .await;
    loop {
        let frame = receiver.recv().await;
        if frame["content"] == "fence" {
            return;
        }
        assert_eq!(frame["content"], "probe", "{frame}");
    }
}

/// Receives frames until every sender in `senders` has delivered `count`
/// messages to `client`; asserts each arrives once and in the order sent.
async fn receive_all(client: &mut WsClient, room: &str, senders: &[&str], count: u64) {
    let mut next: HashMap<String, u64> = senders.iter().map(|s| (s.to_string(), 0)).collect();
    let total = count * senders.len() as u64;
    for _ in 0..total {
        let frame = client.recv().await;
        assert_eq!(frame["type"], "message", "{}: {frame}", client.id);
        assert_eq!(frame["room"], room);
        let from = frame["from"].as_str().expect("from").to_string();
        let expected = next
            .get_mut(&from)
            .unwrap_or_else(|| panic!("{} got a message from {from}: {frame}", client.id));
        assert_eq!(
            frame["content"]["seq"].as_u64(),
            Some(*expected),
            "{} got {from}'s messages out of order or twice",
            client.id
        );
        *expected += 1;
    }
    client.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_on_two_instances_get_every_message_once_in_order() {
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let gw1 = nats_gateway(&server, |_| {}).await;
    let gw2 = nats_gateway(&server, |_| {}).await;
    let mut a1 = gw1.client().await;
    let mut b1 = gw1.client().await;
    let mut a2 = gw2.client().await;
    let mut b2 = gw2.client().await;
    for client in [&mut a1, &mut b1, &mut a2, &mut b2] {
        join_synced(client, &mut presence, "game.42.lobby").await;
    }

    // Two senders, one per instance, interleaved.
    const N: u64 = 100;
    for seq in 0..N {
        for sender in [&mut a1, &mut a2] {
            sender
                .send(json!({"type": "message", "room": "game.42.lobby",
                             "content": {"seq": seq}}))
                .await;
        }
    }
    let (a1_id, a2_id) = (a1.id.clone(), a2.id.clone());
    receive_all(&mut b1, "game.42.lobby", &[&a1_id, &a2_id], N).await;
    receive_all(&mut b2, "game.42.lobby", &[&a1_id, &a2_id], N).await;
    receive_all(&mut a1, "game.42.lobby", &[&a2_id], N).await;
    receive_all(&mut a2, "game.42.lobby", &[&a1_id], N).await;

    // Each instance took in the other's publications only, never its own:
    // the other's 100 messages, and for gw1 the presence events of a2 and b2
    // (its room subscription covers the room's presence; a1 and b1 joined
    // before gw2 had any interest in the room).
    assert_eq!(
        gw1.metric("roomgate_nats_received_total").await,
        (N + 2) as f64
    );
    assert_eq!(gw2.metric("roomgate_nats_received_total").await, N as f64);

    // A backend broadcast reaches the members of both, once.
    backend
        .publish("roomgate.broadcast.game.42.lobby", "to all")
        .await;
    let frame = server_message(Some("game.42.lobby"), "to all", "server");
    for client in [&mut a1, &mut b1, &mut a2, &mut b2] {
        assert_eq!(client.recv().await, frame);
        client.expect_silence().await;
    }
    gw1.stop().await;
    gw2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_and_control_act_only_where_the_connection_lives() {
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let gw1 = nats_gateway(&server, |_| {}).await;
    let gw2 = nats_gateway(&server, |_| {}).await;
    let mut on1 = gw1.client().await;
    let mut on2 = gw2.client().await;
    let delivered_on1 = gw1.metric("roomgate_messages_delivered_total").await;

    backend
        .publish(&format!("roomgate.send.{}", on2.id), "for on2")
        .await;
    assert_eq!(on2.recv().await, server_message(None, "for on2", "server"));
    on1.expect_silence().await;
    // Both instances heard it on `send.*`; only the owner delivered.
    eventually_async("gw1 to take in the send", || async {
        gw1.metric("roomgate_nats_received_total").await == 1.0
    })
    .await;
    assert_eq!(
        gw1.metric("roomgate_messages_delivered_total").await,
        delivered_on1
    );

    // A control request is answered once, by the owning instance.
    let inbox = backend.client.new_inbox();
    let mut replies = backend.subscribe(&inbox).await;
    backend
        .client
        .publish_with_reply_and_headers(
            "roomgate.control.join",
            inbox.clone(),
            HeaderMap::new(),
            json!({"connection_id": on2.id, "room": "general"})
                .to_string()
                .into(),
        )
        .await
        .expect("publish");
    let (_, reply) = replies.next_json().await;
    assert_eq!(reply, json!({"ok": true}));
    assert_eq!(
        on2.recv().await,
        json!({"type": "joined", "room": "general"})
    );
    // gw1 handles control requests in order and answers them in order: its
    // answer to a request about its own connection, which it must refuse,
    // is the next reply; an answer from it to the first request would have
    // come before.
    backend
        .client
        .publish_with_reply_and_headers(
            "roomgate.control.leave",
            inbox.clone(),
            HeaderMap::new(),
            json!({"connection_id": on1.id, "room": "general"})
                .to_string()
                .into(),
        )
        .await
        .expect("publish");
    let (_, reply) = replies.next_json().await;
    assert_eq!(reply, json!({"ok": false, "error": "not_member"}));
    assert_eq!(gw1.metric("roomgate_rooms").await, 0.0);
    assert_eq!(gw2.metric("roomgate_rooms").await, 1.0);

    backend
        .publish(
            "roomgate.control.disconnect",
            &json!({"connection_id": on2.id, "reason": "bye"}).to_string(),
        )
        .await;
    assert_eq!(on2.recv_close().await, Some(1008));
    on1.expect_silence().await;
    gw1.stop().await;
    gw2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_reaches_members_on_other_instances() {
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let gw1 = nats_gateway(&server, |c| c.websocket.rooms.presence = true).await;
    let gw2 = nats_gateway(&server, |c| c.websocket.rooms.presence = true).await;
    let mut here = gw1.client().await;
    join_synced(&mut here, &mut presence, "general").await;

    let mut there = gw2.client().await;
    there.join("general").await;
    assert_eq!(
        here.recv().await,
        json!({"type": "presence", "room": "general", "event": "join",
               "connection_id": there.id, "user": null})
    );
    there
        .send(json!({"type": "leave", "room": "general"}))
        .await;
    assert_eq!(
        there.recv().await,
        json!({"type": "left", "room": "general"})
    );
    assert_eq!(
        here.recv().await,
        json!({"type": "presence", "room": "general", "event": "leave",
               "connection_id": there.id, "user": null})
    );
    here.expect_silence().await;
    gw1.stop().await;
    gw2.stop().await;
}

/// With `client_broadcast = false`, client messages go to NATS only: the
/// backend decides what reaches the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_client_broadcast_messages_go_to_backends_only() {
    let server = NatsServer::start();
    let backend = Backend::connect(&server).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let mut messages = backend.subscribe("roomgate.message.>").await;
    let gw1 = nats_gateway(&server, |c| c.websocket.rooms.client_broadcast = false).await;
    let gw2 = nats_gateway(&server, |c| c.websocket.rooms.client_broadcast = false).await;
    let mut a1 = gw1.client().await;
    let mut b1 = gw1.client().await;
    let mut a2 = gw2.client().await;
    for client in [&mut a1, &mut b1, &mut a2] {
        join_synced(client, &mut presence, "general").await;
    }
    a1.send(json!({"type": "message", "room": "general", "content": "moderate me", "id": "1"}))
        .await;
    assert_eq!(a1.recv().await, json!({"type": "ack", "id": "1"}));
    let (_, message) = messages.next_json().await;
    assert_eq!(message["content"], "moderate me");
    assert_eq!(message["from"], a1.id.as_str());

    backend
        .publish_with(
            "roomgate.broadcast.general",
            &[("Roomgate-From", &a1.id)],
            "approved",
        )
        .await;
    let approved = server_message(Some("general"), "approved", &a1.id);
    for client in [&mut a1, &mut b1, &mut a2] {
        assert_eq!(client.recv().await, approved);
        client.expect_silence().await;
    }
    gw1.stop().await;
    gw2.stop().await;
}

/// Waits until every node of a three-node `cluster` has its two routes.
async fn routes_up(cluster: &[NatsServer]) {
    eventually_async("the cluster routes to be up", || async {
        let mut up = true;
        for node in cluster {
            up &= node.monitor("/routez").await["num_routes"].as_u64() == Some(2);
        }
        up
    })
    .await;
}

/// Two gateways on different nodes of a three-node cluster. Interest
/// crosses the routes asynchronously, so the first messages are retried
/// (boundedly) until the route knows the remote subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_crosses_a_three_node_cluster() {
    let cluster = NatsServer::cluster(3);
    let (first, last) = (&cluster[0], &cluster[2]);
    routes_up(&cluster).await;
    let gw1 = nats_gateway(first, |_| {}).await;
    let gw2 = nats_gateway(last, |_| {}).await;
    let mut on1 = gw1.client().await;
    let mut on2 = gw2.client().await;
    on1.join("general").await;
    on2.join("general").await;

    // Probe until a message from each side crosses, then drain probes.
    probe_until_delivered(&mut on1, &mut on2, "general").await;
    probe_until_delivered(&mut on2, &mut on1, "general").await;
    // Probes still on their way are drained by a fence from each side: it
    // follows them on the same path, so once it is in, they all are.
    drain_probes(&mut on1, &mut on2, "general").await;
    drain_probes(&mut on2, &mut on1, "general").await;
    for seq in 0..20 {
        on1.send(json!({"type": "message", "room": "general", "content": {"seq": seq}}))
            .await;
    }
    let on1_id = on1.id.clone();
    receive_all(&mut on2, "general", &[&on1_id], 20).await;

    // A backend on the middle node reaches a connection on the last one.
    let backend = Backend::connect(&cluster[1]).await;
    within("send.<id> to cross the cluster", async {
        loop {
            backend
                .publish(&format!("roomgate.send.{}", on2.id), "hello")
                .await;
            if let Ok(Some(frame)) =
                tokio::time::timeout(Duration::from_millis(200), on2.next_json()).await
            {
                assert_eq!(frame, server_message(None, "hello", "server"));
                return;
            }
        }
    })
    .await;
    gw1.stop().await;
    gw2.stop().await;
}

/// A backend that answers a member's `presence` join by broadcasting to the
/// room reaches that member, from another node of the cluster too: the
/// gateway subscribes the room before it publishes the event, and the
/// route between the nodes carries the subscription ahead of the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_answering_a_join_event_from_another_node_reaches_the_new_member() {
    let cluster = NatsServer::cluster(3);
    routes_up(&cluster).await;
    let gw = nats_gateway(&cluster[0], |_| {}).await;
    let backend = Backend::connect(&cluster[2]).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let mut client = gw.client().await;
    // The backend's own subscription crosses the routes as well: joins
    // until one's event arrives.
    within(
        "the backend's interest to reach the gateway's node",
        async {
            for attempt in 0.. {
                let room = format!("warm{attempt}");
                client.join(&room).await;
                client.leave(&room).await;
                let event =
                    tokio::time::timeout(Duration::from_millis(200), presence.0.next()).await;
                if event.is_ok() {
                    return;
                }
            }
        },
    )
    .await;
    for round in 0..30 {
        let room = format!("welcome{round}");
        client.send(json!({"type": "join", "room": room})).await;
        presence
            .next_matching(|_, v| v["event"] == "join" && v["room"] == room.as_str())
            .await;
        backend
            .publish(&format!("roomgate.broadcast.{room}"), "welcome")
            .await;
        assert_eq!(client.recv().await, json!({"type": "joined", "room": room}));
        assert_eq!(
            client.recv().await,
            server_message(Some(&room), "welcome", "server"),
            "round {round}"
        );
        client.leave(&room).await;
    }
    gw.stop().await;
}
