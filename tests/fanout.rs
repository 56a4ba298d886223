//! Delivery of room messages, from outside: every other member gets each
//! message once and in the sender's order, content of any JSON type is
//! passed on unchanged, a room of 1000 clients, slow consumers under both
//! policies, and garbage from one client next to real traffic.
//!
//! Nothing here depends on the machine's speed: every wait is bounded, and
//! the slow-consumer tests advance in lockstep with the members that read,
//! so those can never fall behind by more than a batch.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Writes `count` messages `{"s":tag,"n":0..count}` to `room` in one burst
/// (fed, then flushed once), without ids.
async fn send_sequence(client: &mut WsClient, room: &str, tag: &str, count: usize) {
    client
        .send_burst(
            (0..count)
                .map(|n| json!({"type": "message", "room": room, "content": {"s": tag, "n": n}})),
        )
        .await
}

/// Reads until `expected` (sender connection id → count) messages of `room`
/// have arrived, checking that each comes from an expected sender and that
/// each sender's `n` runs 0, 1, 2... with no gap, repeat or reordering. Then
/// asserts that nothing else was queued for the client.
async fn collect_sequences(client: &mut WsClient, room: &str, expected: &HashMap<String, usize>) {
    let mut next: HashMap<&str, usize> = expected.keys().map(|k| (k.as_str(), 0)).collect();
    let total: usize = expected.values().sum();
    for _ in 0..total {
        let frame = client.recv().await;
        assert_eq!(frame["type"], "message", "{}: {frame}", client.id);
        assert_eq!(frame["room"], room, "{}: {frame}", client.id);
        let from = frame["from"].as_str().expect("from");
        assert_ne!(from, client.id, "a sender got its own message back");
        let Some(n) = next.get_mut(from) else {
            panic!("{}: message from an unexpected sender: {frame}", client.id);
        };
        assert_eq!(
            frame["content"]["n"], *n,
            "{}: out of order or duplicated from {from}",
            client.id
        );
        *n += 1;
        assert!(*n <= expected[from], "{}: too many from {from}", client.id);
    }
    let extra = client.barrier().await;
    assert!(
        extra.is_empty(),
        "{}: frames beyond the expected ones: {extra:?}",
        client.id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_other_member_gets_each_message_once_in_the_senders_order() {
    const N: usize = 300;
    // Queues deep enough for the whole test: this one is about delivery,
    // not about slow consumers.
    let gw = TestGateway::with(|c| c.websocket.send_queue_capacity = 4096).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    let mut c = gw.client().await;
    let mut d = gw.client().await;
    let mut outsider = gw.client().await;
    for client in [&mut a, &mut b, &mut c, &mut d] {
        client.join("r").await;
    }
    outsider.join("elsewhere").await;

    // Two members send at the same time.
    tokio::join!(
        send_sequence(&mut a, "r", "a", N),
        send_sequence(&mut b, "r", "b", N)
    );

    let from_a = HashMap::from([(a.id.clone(), N)]);
    let from_b = HashMap::from([(b.id.clone(), N)]);
    let from_both = HashMap::from([(a.id.clone(), N), (b.id.clone(), N)]);
    tokio::join!(
        collect_sequences(&mut a, "r", &from_b),
        collect_sequences(&mut b, "r", &from_a),
        collect_sequences(&mut c, "r", &from_both),
        collect_sequences(&mut d, "r", &from_both),
    );
    assert_eq!(outsider.barrier().await, Vec::<Value>::new());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_gets_joined_before_the_rooms_messages_and_left_after_them() {
    const N: usize = 400;
    let gw = TestGateway::with(|c| c.websocket.send_queue_capacity = 4096).await;
    let mut sender = gw.client().await;
    let mut member = gw.client().await;
    sender.join("r").await;

    // The member joins while the sender's messages are flowing.
    let join = async {
        tokio::task::yield_now().await;
        member
            .send(json!({"type": "join", "room": "r", "id": "in"}))
            .await;
    };
    tokio::join!(send_sequence(&mut sender, "r", "s", N), join);
    // First `joined`, then an unbroken run of the sequence up to its end
    // (marked by a last message, sent once the member is surely in).
    assert_eq!(
        member.recv().await,
        json!({"type": "joined", "room": "r", "id": "in"})
    );
    sender.say("r", json!("last"), "last").await;
    let mut expected: Option<u64> = None;
    loop {
        let frame = member.recv().await;
        assert_eq!(frame["type"], "message", "{frame}");
        if frame["content"] == "last" {
            break;
        }
        let n = frame["content"]["n"].as_u64().expect("n");
        assert!(expected.is_none_or(|e| e == n), "gap before {n}");
        expected = Some(n + 1);
    }
    assert!(
        expected.is_none_or(|e| e == N as u64),
        "the run ends with the last one"
    );

    // Leaving while messages flow: nothing of the room after `left`.
    let leave = async {
        tokio::task::yield_now().await;
        member
            .send(json!({"type": "leave", "room": "r", "id": "out"}))
            .await;
    };
    tokio::join!(send_sequence(&mut sender, "r", "t", N), leave);
    sender.say("r", json!("after"), "after").await;
    // Up to `left`: a run of the sequence from its start, and possibly the
    // "after" message too when the leave was read after it.
    let mut expected = 0;
    let mut got_after = false;
    loop {
        let frame = member.recv().await;
        if frame["type"] == "left" {
            assert_eq!(frame, json!({"type": "left", "room": "r", "id": "out"}));
            break;
        }
        assert!(!got_after, "nothing follows the last message: {frame}");
        if frame["content"] == "after" {
            assert_eq!(expected, N, "the whole run came before it");
            got_after = true;
            continue;
        }
        assert_eq!(frame["content"]["n"], expected, "{frame}");
        expected += 1;
    }
    assert_eq!(
        member.barrier().await,
        Vec::<Value>::new(),
        "nothing after left"
    );
    gw.stop().await;
}

/// A client may pipeline far more frames than a send queue holds (16
/// here). The gateway handles them half a queue at a time and gives the
/// writers a turn in between, so members that read as fast as they can get
/// every message, the sender gets every ack, and nobody is taken for a slow
/// consumer. On one runtime thread, as here, the turn is certain to be
/// taken: the writers run before the reader goes on.
#[tokio::test]
async fn a_pipelined_burst_longer_than_a_send_queue_reaches_members_that_keep_up() {
    pipelined_burst_reaches_members_that_keep_up(600).await;
}

/// The same on two runtime threads, where the sender's own writer, making
/// room for the acks, wakes the reader ahead of the members' writers
/// unless the reader steps behind them again. Failed in every run before
/// that step, on an idle machine. With two threads the turn is given, not
/// waited for (a member's writer held off its core by other work falls
/// behind), so on a loaded machine, such as under the whole suite, it can
/// still fail now and then: run it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "timing: run alone with --ignored, on a machine that is otherwise idle"]
async fn a_pipelined_burst_reaches_members_that_keep_up_on_two_runtime_threads() {
    pipelined_burst_reaches_members_that_keep_up(2000).await;
}

/// A burst of `BURST` messages with ids, pipelined by one client to three
/// members of a room, with send queues of 16.
async fn pipelined_burst_reaches_members_that_keep_up(burst: usize) {
    let gw = TestGateway::with(|c| c.websocket.send_queue_capacity = 16).await;
    let mut sender = gw.client().await;
    sender.join("burst").await;
    let mut members = Vec::new();
    for _ in 0..3 {
        let mut member = gw.client().await;
        member.join("burst").await;
        members.push(member);
    }
    sender
        .send_burst((0..burst).map(|n| {
            json!({"type": "message", "room": "burst", "content": {"s": "x", "n": n},
                "id": n.to_string()})
        }))
        .await;
    for n in 0..burst {
        assert_eq!(
            sender.recv().await,
            json!({"type": "ack", "id": n.to_string()})
        );
    }
    let expected = HashMap::from([(sender.id.clone(), burst)]);
    for member in &mut members {
        collect_sequences(member, "burst", &expected).await;
    }
    assert_eq!(
        gw.metric(r#"roomgate_connections_closed_total{reason="slow_consumer"}"#)
            .await,
        0.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn content_of_any_json_type_arrives_unchanged() {
    let gw = TestGateway::start(test_config()).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.join("r").await;
    b.join("r").await;
    let samples = [
        r#""Hello!""#,
        r#""""#,
        r#""escapes: \" \\ \/ \b \f \n \r \t \u0000 \u00e9 \ud83d\ude00""#,
        r#""unicode: é ß 漢字 😀 \u2028""#,
        "0",
        "-12.50e+3",
        "123456789012345678901234567890",
        "1e308",
        "-0.000000000000000000000000001",
        "true",
        "false",
        "null",
        "[]",
        "{}",
        r#"[1,"two",{"three":[3]},null,true]"#,
        r#"{"nested":{"deep":[{"x":1}]},"k":"v","k2":"dup?"}"#,
        r#"{ "spaced" : [ 1 , 2 ] ,
  "newline" : "kept"
}"#,
        r#"{"type":"message","room":"other","content":"not a frame","from":"x"}"#,
    ];
    for (i, raw) in samples.iter().enumerate() {
        let id = format!("c{i}");
        a.send_text(&format!(
            r#"{{"type":"message","room":"r","content":{raw},"id":"{id}"}}"#
        ))
        .await;
        assert_eq!(a.recv().await, json!({"type": "ack", "id": id}), "{raw}");
        let text = b.recv_text().await;
        // Byte for byte: the value is copied, not re-encoded.
        assert!(
            text.contains(&format!(r#""content":{raw},"#)),
            "content changed: sent {raw}, got {text}"
        );
        // And as a value.
        let frame: Value = serde_json::from_str(&text).expect("the frame parses");
        let sent: Value = serde_json::from_str(raw).expect("the content parses");
        assert_eq!(
            frame,
            json!({"type": "message", "room": "r", "content": sent, "from": a.id})
        );
    }
    // A number beyond a double is valid JSON syntax that serde_json (as
    // here), Go and others cannot read back: refused like half a surrogate
    // pair, so that no reader of the room fails on it.
    a.send_text(r#"{"type":"message","room":"r","content":[1e400],"id":"big"}"#)
        .await;
    let refusal = a.recv().await;
    assert_eq!(
        (&refusal["code"], &refusal["id"]),
        (&json!("invalid_json"), &json!("big"))
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_of_1000_clients_gets_every_message_exactly_once_in_order() {
    const CLIENTS: usize = 1000;
    const SENDERS: usize = 5;
    const PER_SENDER: usize = 20;
    const ROOM: &str = "crowd";
    let gw = TestGateway::with(|c| {
        assert_eq!(c.websocket.rooms.max_members, CLIENTS, "default limit");
        // Clients wait their turn unread; no heartbeat should interfere.
        c.websocket.ping_interval_secs = 3600;
    })
    .await;
    let url = gw.ws_url();
    // A small read buffer per client keeps 1000 clients light.
    let codec = WebSocketConfig::default().read_buffer_size(4096);

    // Connect concurrently, but at most 32 handshakes at a time.
    let mut clients: Vec<WsClient> = within_for(
        Duration::from_secs(180),
        "1000 clients to connect and join",
        futures_util::stream::iter(0..CLIENTS)
            .map(|_| {
                let url = url.clone();
                async move {
                    let mut client = WsClient::connect_with(&url, Some(codec), None).await;
                    client.join(ROOM).await;
                    client
                }
            })
            .buffer_unordered(32)
            .collect(),
    )
    .await;

    let (_, detail) = gw.admin_json(&format!("/rooms/{ROOM}")).await;
    assert_eq!(detail["members"], CLIENTS);
    let listed: HashSet<&str> = detail["member_ids"]
        .as_array()
        .expect("member_ids")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let ids: HashSet<&str> = clients.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids.len(), CLIENTS, "connection ids are unique");
    assert_eq!(listed, ids, "the room lists exactly its members");

    // The 1001st member is refused.
    let mut late = gw.client().await;
    let reply = late.request(json!({"type": "join", "room": ROOM})).await;
    assert_eq!(reply["code"], "room_full", "{reply}");

    let delivered_before = gw.metric("roomgate_messages_delivered_total").await;
    let sender_ids: Vec<String> = clients[..SENDERS].iter().map(|c| c.id.clone()).collect();
    // All senders at once; 100 messages stay well within each member's
    // queue (256), so nobody needs to read while they are sent.
    futures_util::future::join_all(
        clients[..SENDERS]
            .iter_mut()
            .enumerate()
            .map(|(s, client)| {
                send_sequence(client, ROOM, ["a", "b", "c", "d", "e"][s], PER_SENDER)
            }),
    )
    .await;

    let readers: Vec<JoinHandle<()>> = clients
        .drain(..)
        .map(|mut client| {
            let expected: HashMap<String, usize> = sender_ids
                .iter()
                .filter(|s| **s != client.id)
                .map(|s| (s.clone(), PER_SENDER))
                .collect();
            tokio::spawn(async move { collect_sequences(&mut client, ROOM, &expected).await })
        })
        .collect();
    within_for(
        Duration::from_secs(180),
        "every member to get every message",
        async {
            for reader in readers {
                reader
                    .await
                    .expect("a member missed, repeated or reordered a message");
            }
        },
    )
    .await;
    let delivered = gw.metric("roomgate_messages_delivered_total").await - delivered_before;
    let expected = (SENDERS * PER_SENDER * (CLIENTS - 1)) as f64;
    assert!(
        delivered >= expected,
        "roomgate_messages_delivered_total moved by {delivered}, expected at least {expected}"
    );
    gw.stop().await;
}

// ----- slow consumers -----------------------------------------------------

/// Frames each member may hold; small, so a client that stops reading
/// fills its queue soon after its socket buffers.
const QUEUE: usize = 16;
/// Messages sent between two waits for the reading members: half the queue,
/// so they can never overflow however slowly they are scheduled.
const BATCH: usize = QUEUE / 2;
/// Bound on the flood, far above what the kernel buffers of one small
/// connection hold (the test fails if it is reached).
const MAX_FLOOD: usize = 4000;

fn flood_config(policy: &str) -> roomgate::Config {
    let mut c = test_config();
    c.websocket.send_queue_capacity = QUEUE;
    c.websocket.slow_consumer = match policy {
        "close" => roomgate::config::SlowConsumerPolicy::Close,
        _ => roomgate::config::SlowConsumerPolicy::Drop,
    };
    // The slow client reads again only after the flood: the close frame
    // must wait for it, and no heartbeat may interfere meanwhile.
    c.websocket.pong_timeout_secs = 300;
    c.websocket.ping_interval_secs = 3600;
    c
}

/// A member that reads everything, counting the flooder's messages `n` in
/// order, until the `{"end":true}` message.
struct Reader {
    received: Arc<AtomicUsize>,
    task: JoinHandle<WsClient>,
}

fn spawn_reader(mut client: WsClient, flooder: String) -> Reader {
    let received = Arc::new(AtomicUsize::new(0));
    let count = received.clone();
    let task = tokio::spawn(async move {
        loop {
            let frame = client.recv().await;
            assert_eq!(frame["type"], "message", "{frame}");
            assert_eq!(frame["from"], flooder.as_str());
            if frame["content"]["end"] == true {
                return client;
            }
            let n = count.load(Ordering::SeqCst);
            assert_eq!(frame["content"]["n"], n, "a reader missed a message");
            count.store(n + 1, Ordering::SeqCst);
        }
    });
    Reader { received, task }
}

fn flood_message(n: usize) -> Message {
    // 16 KiB each: a stalled socket fills in a few hundred messages.
    let pad = "x".repeat(16 * 1024);
    Message::text(
        json!({"type": "message", "room": "flood", "content": {"n": n, "pad": pad}}).to_string(),
    )
}

/// Floods the room in batches, waiting after each batch until every reader
/// has it, until `done` says the slow client's queue overflowed. Returns
/// how many messages were sent.
async fn flood_until<F, Fut>(
    flooder: &mut WsClient,
    readers: &[Reader],
    what: &str,
    mut done: F,
) -> usize
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut sent = 0;
    loop {
        within("a batch to be written", async {
            for n in sent..sent + BATCH {
                flooder.ws.feed(flood_message(n)).await.expect("feed");
            }
            flooder.ws.flush().await.expect("flush");
        })
        .await;
        sent += BATCH;
        eventually("the reading members to get every message so far", || {
            readers
                .iter()
                .all(|r| r.received.load(Ordering::SeqCst) >= sent)
        })
        .await;
        if done().await {
            eprintln!("{what}: after {sent} messages");
            return sent;
        }
        assert!(
            sent < MAX_FLOOD,
            "no sign of {what} after {sent} messages to a client that does not read"
        );
    }
}

/// Sends a few more messages, then the end marker, and checks that every
/// reader got all `sent + BATCH` messages, in order.
async fn finish_flood(flooder: &mut WsClient, readers: Vec<Reader>, sent: usize) -> Vec<WsClient> {
    within("the last batch to be written", async {
        for n in sent..sent + BATCH {
            flooder.ws.feed(flood_message(n)).await.expect("feed");
        }
    })
    .await;
    flooder
        .send(json!({"type": "message", "room": "flood", "content": {"end": true}}))
        .await;
    let mut clients = Vec::new();
    for reader in readers {
        let client = within("a reader to get the end of the flood", reader.task)
            .await
            .expect("reader");
        assert_eq!(reader.received.load(Ordering::SeqCst), sent + BATCH);
        clients.push(client);
    }
    clients
}

/// `flood_config("close")` for a room that four clients fill.
fn slow_close_config() -> roomgate::Config {
    let mut config = flood_config("close");
    config.websocket.rooms.max_members = 4;
    config
}

/// Fills the room "flood" with a flooder, a client that never reads (with
/// a small kernel receive buffer, so that the stall reaches the gateway
/// sooner) and two readers, and floods it until the slow client's queue
/// overflows. It is then closing, and leaves the room at once, even though
/// its close frame waits for it to read. Returns the flooder, the slow
/// client and the two readers, which got the whole flood.
async fn flood_out_a_slow_client(gw: &TestGateway) -> (WsClient, WsClient, Vec<WsClient>) {
    let mut flooder = gw.client().await;
    let mut slow = WsClient::connect_with(&gw.ws_url(), None, Some(4096)).await;
    let mut r1 = gw.client().await;
    let mut r2 = gw.client().await;
    for client in [&mut flooder, &mut slow, &mut r1, &mut r2] {
        client.join("flood").await;
    }
    let readers = vec![
        spawn_reader(r1, flooder.id.clone()),
        spawn_reader(r2, flooder.id.clone()),
    ];
    let sent = flood_until(
        &mut flooder,
        &readers,
        "the slow client leaving the room",
        || async { gw.admin_json("/rooms/flood").await.1["members"] == 3 },
    )
    .await;
    let others = finish_flood(&mut flooder, readers, sent).await;
    (flooder, slow, others)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_with_1013_and_the_others_get_everything() {
    let gw = TestGateway::start(slow_close_config()).await;
    let (mut flooder, mut slow, mut others) = flood_out_a_slow_client(&gw).await;
    let (_, detail) = gw.admin_json("/rooms/flood").await;
    assert!(
        !detail["member_ids"].to_string().contains(&slow.id),
        "{detail}"
    );
    // Its place is free for someone else already.
    let mut newcomer = gw.client().await;
    newcomer.join("flood").await;
    newcomer.leave("flood").await;

    // The slow client reads again: what was already on its way, then 1013.
    assert_eq!(slow.recv_close().await, Some(1013));
    let closed = r#"roomgate_connections_closed_total{reason="slow_consumer"}"#;
    eventually_async("the slow client's close to be counted", || async {
        gw.metric(closed).await == 1.0
    })
    .await;
    // The flooder, the two readers and the newcomer.
    assert_eq!(gw.metric("roomgate_connections").await, 4.0);
    // Everyone else is still connected and served.
    others[0].say("flood", json!("after"), "a1").await;
    assert_eq!(others[1].recv().await["content"], "after");
    assert_eq!(flooder.recv().await["content"], "after");
    flooder.say("flood", json!("me too"), "a2").await;
    for other in &mut others {
        assert_eq!(other.recv().await["content"], "me too");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_that_never_reads_again_is_reset_after_the_pong_timeout() {
    // The 1013 close frame waits `pong_timeout_secs` for the client to read.
    // A client that does not is reset: the kernel drops what it still held
    // for it (megabytes, on loopback), instead of delivering stale frames
    // and a frame cut short for as long as the client cares to read.
    let mut config = slow_close_config();
    config.websocket.pong_timeout_secs = 1;
    let gw = TestGateway::start(config).await;
    let (_flooder, mut slow, _others) = flood_out_a_slow_client(&gw).await;
    let closed = r#"roomgate_connections_closed_total{reason="slow_consumer"}"#;
    eventually_async("the gateway to give up on the slow client", || async {
        gw.metric(closed).await == 1.0
    })
    .await;

    // Only now does it read: what its own kernel had already taken, then
    // the reset, never a clean end after a cut frame.
    let ending = within("the slow client's connection to end", async {
        loop {
            match slow.ws.next().await {
                Some(Ok(Message::Text(_))) => continue,
                other => return other,
            }
        }
    })
    .await;
    match ending {
        Some(Err(tokio_tungstenite::tungstenite::Error::Io(e))) => {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}")
        }
        other => panic!("expected a reset, got {other:?}"),
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_loses_frames_with_drop_and_stays_connected() {
    let gw = TestGateway::start(flood_config("drop")).await;
    let mut flooder = gw.client().await;
    let mut slow = WsClient::connect_with(&gw.ws_url(), None, Some(4096)).await;
    let mut r1 = gw.client().await;
    let mut r2 = gw.client().await;
    for client in [&mut flooder, &mut slow, &mut r1, &mut r2] {
        client.join("flood").await;
    }
    // A second room only the flooder and the slow client share, for ticks
    // that tell the slow client its backlog is over.
    flooder.join("tick").await;
    slow.join("tick").await;
    let readers = vec![
        spawn_reader(r1, flooder.id.clone()),
        spawn_reader(r2, flooder.id.clone()),
    ];
    let dropped = r#"roomgate_messages_dropped_total{reason="slow_consumer"}"#;
    let sent = flood_until(&mut flooder, &readers, "dropped frames", || async {
        gw.metric(dropped).await > 0.0
    })
    .await;
    let mut others = finish_flood(&mut flooder, readers, sent).await;
    let total = sent + BATCH;

    // The slow client reads again. The frames it gets are the flood in
    // order with gaps (the newest were dropped while its queue was full);
    // a tick, sent until one gets through, ends the backlog.
    let slow_id = slow.id.clone();
    let drained = tokio::spawn(async move {
        let mut seen: Vec<usize> = Vec::new();
        loop {
            let frame = slow.recv().await;
            assert_eq!(frame["type"], "message", "{frame}");
            if frame["room"] == "tick" {
                return (slow, seen);
            }
            if frame["content"]["end"] == true {
                continue;
            }
            let n = frame["content"]["n"].as_u64().expect("n") as usize;
            assert!(
                seen.last().is_none_or(|last| *last < n),
                "reordered: {n} after {seen:?}"
            );
            seen.push(n);
        }
    });
    within("a tick to reach the slow client", async {
        while !drained.is_finished() {
            flooder
                .send(json!({"type": "message", "room": "tick", "content": "tick"}))
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let (mut slow, seen) = drained.await.expect("slow client task");
    assert!(
        seen.len() < total,
        "the slow client got all {total} messages: nothing was dropped"
    );
    let dropped_count = gw.metric(dropped).await;
    assert!(
        dropped_count >= (total - seen.len()) as f64,
        "{dropped_count} counted as dropped, {} missing",
        total - seen.len()
    );
    let closed = r#"roomgate_connections_closed_total{reason="slow_consumer"}"#;
    assert_eq!(gw.metric(closed).await, 0.0, "nobody was closed");

    // Still a member, and it can act.
    let (_, detail) = gw.admin_json("/rooms/flood").await;
    assert_eq!(detail["members"], 4);
    assert!(
        detail["member_ids"]
            .as_array()
            .is_some_and(|ids| ids.iter().any(|id| *id == slow_id.as_str()))
    );
    slow.send(json!({"type": "message", "room": "flood", "content": "still here", "id": "s1"}))
        .await;
    assert_eq!(
        slow.recv_type("ack").await,
        json!({"type": "ack", "id": "s1"})
    );
    for other in &mut others {
        assert_eq!(
            other.recv().await,
            json!({"type": "message", "room": "flood", "content": "still here", "from": slow_id})
        );
    }
    gw.stop().await;
}

// ----- garbage ------------------------------------------------------------

/// A small deterministic generator (xorshift64*), so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    fn pick<'a>(&mut self, options: &[&'a str]) -> &'a str {
        options[self.below(options.len())]
    }
}

/// One frame of garbage for a client that is a member of `room`. Every
/// frame stays below the default `max_message_size_bytes`, so none of them
/// is a reason to close the connection.
fn garbage(rng: &mut Rng, room: &str) -> Message {
    match rng.below(8) {
        // Random bytes, as text.
        0 => {
            let len = rng.below(600);
            Message::text(String::from_utf8_lossy(&rng.bytes(len)).into_owned())
        }
        // A valid frame, truncated.
        1 => {
            let full = format!(
                r#"{{"type":"message","room":"{room}","content":{{"a":[1,2,3],"b":"text é"}},"id":"t"}}"#
            );
            let mut cut = rng.below(full.len());
            while !full.is_char_boundary(cut) {
                cut -= 1;
            }
            Message::text(full[..cut].to_string())
        }
        // Huge numbers, where values and where other types are expected.
        2 => {
            let digits = "9".repeat(1 + rng.below(20_000));
            let huge = match rng.below(4) {
                0 => digits,
                1 => format!("-{digits}.{digits}"),
                2 => "1e999999999".to_string(),
                _ => format!("0.{digits}e-999999"),
            };
            Message::text(match rng.below(5) {
                0 => format!(r#"{{"type":"message","room":"{room}","content":{huge}}}"#),
                1 => format!(r#"{{"type":{huge},"room":"{room}"}}"#),
                2 => format!(r#"{{"type":"join","room":{huge}}}"#),
                3 => format!(r#"{{"type":"message","room":"{room}","content":"x","id":{huge}}}"#),
                _ => huge,
            })
        }
        // Deep nesting, balanced or not.
        3 => {
            let (open, close) = if rng.below(2) == 0 {
                let depth = 1 + rng.below(25_000);
                ("[".repeat(depth), "]".repeat(depth))
            } else {
                let depth = 1 + rng.below(9_000);
                (r#"{"a":"#.repeat(depth), "}".repeat(depth))
            };
            let close = if rng.below(3) == 0 {
                close[..close.len() / 2].to_string()
            } else {
                close
            };
            Message::text(match rng.below(3) {
                0 => format!(r#"{{"type":"message","room":"{room}","content":{open}1{close}}}"#),
                1 => format!(r#"{{"type":"join","room":"{room}","extra":{open}1{close}}}"#),
                _ => format!("{open}{close}"),
            })
        }
        // Binary frames.
        4 => {
            let len = rng.below(600);
            Message::binary(rng.bytes(len))
        }
        // Fields of the wrong type, odd values.
        5 => Message::text(
            rng.pick(&[
                r#"{"type":["join"],"room":{"r":1}}"#,
                r#"{"type":"message","room":"ROOM","content":"x","id":{"a":1}}"#,
                r#"{"type":"message","room":"ROOM","content":"\ud800 lone surrogate"}"#,
                r#"{"type":"message","room":"ROOM","content":"bad escape \x"}"#,
                "{\"type\":\"message\",\"room\":\"ROOM\",\"content\":\"raw\ncontrol\"}",
                r#"{"type":"message","room":"ROOM\u0000","content":1}"#,
                r#"{"type":"join","room":"ROOM","id":"\u0000\u0001"}"#,
                r#"{"type":null,"room":null,"content":null,"id":null}"#,
                r#"{"":"","type":"message"}"#,
                "\u{feff}{\"type\":\"join\",\"room\":\"ROOM\"}",
                "{}",
                "{\"type\":\"message\",\"room\":\"ROOM\",\"content\":}",
            ])
            .replace("ROOM", room),
        ),
        // Token soup.
        6 => {
            let tokens = [
                "{",
                "}",
                "[",
                "]",
                ",",
                ":",
                "\"type\"",
                "\"join\"",
                "\"message\"",
                "\"room\"",
                "\"content\"",
                "\"id\"",
                "null",
                "1",
                "-",
                "e",
                "\"\\u0000\"",
                "\"\\ud800\"",
                " ",
                "\"ROOM\"",
            ];
            let soup: String = (0..rng.below(80))
                .map(|_| rng.pick(&tokens).replace("ROOM", room))
                .collect();
            Message::text(soup)
        }
        // Long strings and odd room names.
        _ => {
            let name: String = (0..rng.below(200))
                .map(|_| char::from_u32(rng.below(0x3000) as u32).unwrap_or('?'))
                .collect();
            Message::text(
                json!({"type": rng.pick(&["join", "message", "dance"]), "room": name,
                       "content": "y".repeat(rng.below(30_000))})
                .to_string(),
            )
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_one_client_does_not_disturb_another_clients_traffic() {
    const GARBAGE: usize = 1000;
    const REAL: usize = 300;
    // Deep queues: this test is about bad input, not slow consumers.
    let gw = TestGateway::with(|c| c.websocket.send_queue_capacity = 8192).await;
    let mut observer = gw.client().await;
    let mut sender = gw.client().await;
    let mut noisy = gw.client().await;
    for client in [&mut observer, &mut sender, &mut noisy] {
        client.join("r").await;
    }
    let (sender_id, noisy_id) = (sender.id.clone(), noisy.id.clone());

    // The observer reads raw frames: the noisy client's valid messages are
    // delivered too, and their content (say 1e999999999 or 20,000 nested
    // arrays) need not be readable by this test's JSON parser.
    let observer_task = {
        let (sender_id, noisy_id) = (sender_id.clone(), noisy_id.clone());
        tokio::spawn(async move {
            let mut next = 0;
            let mut from_noisy = 0usize;
            while next < REAL {
                let text = observer.recv_text().await;
                match serde_json::from_str::<Value>(&text) {
                    Ok(frame) if frame["from"] == sender_id.as_str() => {
                        assert_eq!(frame["content"], json!({"real": next}), "{text}");
                        next += 1;
                    }
                    _ => {
                        assert!(
                            text.ends_with(&format!(r#","from":"{noisy_id}"}}"#)),
                            "neither a real message nor the noisy client's: {text:.200}"
                        );
                        from_noisy += 1;
                    }
                }
            }
            (observer, from_noisy)
        })
    };

    // The noisy client's replies are read as they come.
    let WsClient { ws, id } = noisy;
    let (mut noisy_sink, mut noisy_stream) = ws.split();
    let noisy_reader = {
        let sender_id = sender_id.clone();
        tokio::spawn(async move {
            let mut codes: HashMap<String, usize> = HashMap::new();
            let mut real = 0;
            let mut ended = false;
            while !(ended && real == REAL) {
                let text = match within("a reply to the noisy client", noisy_stream.next()).await {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(_)) => continue,
                    other => panic!("the noisy client's connection ended: {other:?}"),
                };
                let frame: Value = serde_json::from_str(text.as_str()).expect("server JSON");
                if frame["id"] == "garbage-end" {
                    ended = true;
                } else if frame["type"] == "error" {
                    let code = frame["code"].as_str().expect("code").to_string();
                    *codes.entry(code).or_default() += 1;
                } else if frame["type"] == "message" {
                    assert_eq!(frame["from"], sender_id.as_str(), "{frame}");
                    assert_eq!(frame["content"], json!({"real": real}));
                    real += 1;
                }
            }
            (noisy_stream, codes)
        })
    };

    let mut rng = Rng(0x5EED_5EED_5EED_5EED);
    let mut binary_sent = 0;
    let noisy_sends = async {
        for i in 0..GARBAGE {
            let frame = garbage(&mut rng, "r");
            assert!(frame.len() < 64 * 1024, "garbage frame {i} is too big");
            binary_sent += usize::from(matches!(frame, Message::Binary(_)));
            noisy_sink.send(frame).await.expect("send garbage");
            if i % 50 == 0 {
                tokio::task::yield_now().await;
            }
        }
        noisy_sink
            .send(Message::text(r#"{"type":"barrier","id":"garbage-end"}"#))
            .await
            .expect("send");
    };
    let real_sends = async {
        for n in 0..REAL {
            sender
                .send(json!({"type": "message", "room": "r", "content": {"real": n}}))
                .await;
            if n % 10 == 0 {
                tokio::task::yield_now().await;
            }
        }
    };
    within_for(
        Duration::from_secs(120),
        "the garbage and the real messages to be written",
        async { tokio::join!(noisy_sends, real_sends) },
    )
    .await;

    let (mut observer, from_noisy) = within_for(
        Duration::from_secs(120),
        "the observer to get every real message",
        observer_task,
    )
    .await
    .expect("observer");
    let (noisy_stream, codes) = within_for(
        Duration::from_secs(120),
        "the noisy client's replies",
        noisy_reader,
    )
    .await
    .expect("noisy reader");
    assert_eq!(
        codes.get("binary_not_supported").copied().unwrap_or(0),
        binary_sent,
        "every binary frame was refused: {codes:?}"
    );
    assert!(
        codes.get("invalid_json").copied().unwrap_or(0) > GARBAGE / 4,
        "garbage was mostly refused as invalid JSON: {codes:?}"
    );
    eprintln!("garbage: refusals {codes:?}, {from_noisy} valid messages reached the observer");

    // The noisy connection is still usable, and still in the room.
    let mut noisy = WsClient {
        ws: noisy_sink
            .reunite(noisy_stream)
            .expect("halves of one stream"),
        id,
    };
    noisy.say("r", json!("alive"), "alive").await;
    within("the noisy client's last message", async {
        loop {
            let text = observer.recv_text().await;
            if let Ok(frame) = serde_json::from_str::<Value>(&text)
                && frame["content"] == "alive"
            {
                assert_eq!(frame["from"], noisy_id.as_str());
                return;
            }
        }
    })
    .await;
    let (_, detail) = gw.admin_json("/rooms/r").await;
    assert_eq!(detail["members"], 3);
    assert_eq!(gw.metric("roomgate_connections").await, 3.0);
    gw.stop().await;
}
