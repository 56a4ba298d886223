//! Helpers for the NATS tests: gateways wired to a real `nats-server`,
//! backends that are real async-nats clients, and the server's own view of
//! who subscribes to what (its monitoring endpoint).
//!
//! A test file uses it with `mod common; mod nats_support;`.

#![allow(dead_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::{HeaderMap, Message, Subscriber};
use futures_util::StreamExt;
use roomgate::Config;
use serde_json::{Value, json};

use crate::common::*;

/// Unix milliseconds now, to check the `ts` fields.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The test defaults with NATS on `url`.
pub fn nats_config(url: &str) -> Config {
    let mut config = test_config();
    config.nats.enabled = true;
    config.nats.url = url.to_string();
    config
}

/// Starts a gateway on `server` (changed by `edit`) and waits until its
/// bridge is connected.
pub async fn nats_gateway(server: &NatsServer, edit: impl FnOnce(&mut Config)) -> TestGateway {
    let mut config = nats_config(&server.url());
    edit(&mut config);
    let gateway = TestGateway::start(config).await;
    wait_nats_connected(&gateway, true).await;
    gateway
}

/// Waits until `roomgate_nats_connected` is 1 (`true`) or 0 (`false`).
pub async fn wait_nats_connected(gateway: &TestGateway, up: bool) {
    let want = if up { 1.0 } else { 0.0 };
    eventually_async(&format!("roomgate_nats_connected to be {want}"), || async {
        gateway.metric("roomgate_nats_connected").await == want
    })
    .await;
}

/// A backend: a plain async-nats client, as an application would use.
pub struct Backend {
    /// The client.
    pub client: async_nats::Client,
}

impl Backend {
    /// Connects to `server`.
    pub async fn connect(server: &NatsServer) -> Self {
        Self {
            client: server.client().await,
        }
    }

    /// Subscribes to `subject` and makes sure the server has registered the
    /// subscription before returning.
    pub async fn subscribe(&self, subject: &str) -> Sub {
        let subscriber = within(
            "backend subscribe",
            self.client.subscribe(subject.to_string()),
        )
        .await
        .expect("subscribe");
        self.sync().await;
        Sub(subscriber)
    }

    /// A round trip through the server: everything this client sent before
    /// (subscriptions included) has been processed when it returns.
    pub async fn sync(&self) {
        let inbox = self.client.new_inbox();
        let mut probe = self
            .client
            .subscribe(inbox.clone())
            .await
            .expect("subscribe probe");
        self.client
            .publish(inbox, "probe".into())
            .await
            .expect("publish probe");
        within("a round trip through nats-server", probe.next())
            .await
            .expect("probe delivered");
    }

    /// Publishes a payload without headers.
    pub async fn publish(&self, subject: &str, payload: &str) {
        self.publish_with(subject, &[], payload).await;
    }

    /// Publishes a payload with headers.
    pub async fn publish_with(&self, subject: &str, headers: &[(&str, &str)], payload: &str) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, *value);
        }
        self.publish_burst(subject, [(map, payload.to_string())])
            .await;
    }

    /// Publishes messages back to back and flushes once, so that the
    /// gateway receives them together: a burst.
    pub async fn publish_burst(
        &self,
        subject: &str,
        messages: impl IntoIterator<Item = (HeaderMap, String)>,
    ) {
        for (headers, payload) in messages {
            within(
                "backend publish",
                self.client
                    .publish_with_headers(subject.to_string(), headers, payload.into()),
            )
            .await
            .expect("publish");
        }
        within("backend flush", self.client.flush())
            .await
            .expect("flush");
    }

    /// Sends a request and parses the JSON reply.
    pub async fn request(&self, subject: &str, payload: Value) -> Value {
        let reply = within(
            &format!("a reply on {subject}"),
            self.client
                .request(subject.to_string(), payload.to_string().into()),
        )
        .await
        .expect("request answered");
        serde_json::from_slice(&reply.payload).expect("JSON reply")
    }
}

/// A backend's subscription with bounded waits.
pub struct Sub(pub Subscriber);

impl Sub {
    /// The next message.
    pub async fn next(&mut self) -> Message {
        within("a NATS message", self.0.next())
            .await
            .expect("subscription open")
    }

    /// The next message and its payload as JSON.
    pub async fn next_json(&mut self) -> (Message, Value) {
        let message = self.next().await;
        let value = serde_json::from_slice(&message.payload).unwrap_or_else(|e| {
            panic!(
                "payload on {} is not JSON ({e}): {:?}",
                message.subject,
                String::from_utf8_lossy(&message.payload)
            )
        });
        (message, value)
    }

    /// The next message whose JSON payload matches `keep`, skipping others.
    pub async fn next_matching(
        &mut self,
        keep: impl Fn(&Message, &Value) -> bool,
    ) -> (Message, Value) {
        loop {
            let (message, value) = self.next_json().await;
            if keep(&message, &value) {
                return (message, value);
            }
        }
    }

    /// Asserts that nothing arrives within `QUIET`.
    pub async fn expect_silence(&mut self) {
        if let Ok(Some(message)) = tokio::time::timeout(QUIET, self.0.next()).await {
            panic!(
                "expected no NATS message, got one on {}: {:?}",
                message.subject,
                String::from_utf8_lossy(&message.payload)
            );
        }
    }
}

/// A header's value, if present.
pub fn header(message: &Message, name: &str) -> Option<String> {
    message
        .headers
        .as_ref()?
        .get(name)
        .map(|v| v.as_str().to_string())
}

/// The subjects the gateway `gateway_id` is subscribed to, as `server` sees
/// them (sorted).
pub async fn gateway_subjects(server: &NatsServer, gateway_id: &str) -> Vec<String> {
    let name = format!("roomgate {gateway_id}");
    subjects_of(server, |n| n == name).await
}

/// The subjects of every client of `server` whose connection name passes
/// `named` (sorted), less the reply inbox (`_INBOX.<id>.*`) a gateway
/// makes for the round trip that confirms its room subscriptions.
pub async fn subjects_of(server: &NatsServer, named: impl Fn(&str) -> bool) -> Vec<String> {
    let connz = server.monitor("/connz?subs=1&limit=1000").await;
    let mut subjects: Vec<String> = connz["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"].as_str().is_some_and(&named))
        .flat_map(|c| {
            c["subscriptions_list"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|s| s.as_str().map(str::to_string))
        .filter(|s| !s.starts_with("_INBOX."))
        .collect();
    subjects.sort();
    subjects
}

/// The real binary bridged to `server`, with `env` on top.
pub fn nats_gateway_process(server: &NatsServer, env: &[(&str, &str)]) -> GatewayProcess {
    gateway_process_on(&server.url(), env)
}

/// The real binary with NATS on at `url` (which may be anything: a server
/// list, a port that is not NATS), with `env` on top.
pub fn gateway_process_on(url: &str, env: &[(&str, &str)]) -> GatewayProcess {
    let mut all = vec![
        ("ROOMGATE_NATS_ENABLED", "true"),
        ("ROOMGATE_NATS_URL", url),
    ];
    all.extend_from_slice(env);
    GatewayProcess::start(&[], &all)
}

/// A sample of `gateway`'s metrics, read from its admin port.
pub async fn process_metric(gateway: &GatewayProcess, sample: &str) -> f64 {
    let (status, body) = http_get(gateway.admin, "/metrics").await;
    assert_eq!(status, 200);
    metric_value(&body, sample)
}

/// A member of `gateway` (a process) that has joined three rooms whose
/// subscriptions NATS did not confirm, once the gateway has said so and
/// stopped waiting for confirmations.
pub async fn member_after_unconfirmed_joins(gateway: &GatewayProcess) -> WsClient {
    eventually_async("the gateway is connected to NATS", || async {
        process_metric(gateway, "roomgate_nats_connected").await == 1.0
    })
    .await;
    let mut member = WsClient::connect(&format!("ws://{}/ws", gateway.addr)).await;
    for room in ["r0", "r1", "r2"] {
        member.join(room).await;
    }
    eventually("the warning", || {
        gateway.logged("did not confirm new room subscriptions") == 1
    })
    .await;
    member
}

/// Whether `subjects` include a subscription carrying `room`'s broadcasts
/// (`roomgate.*.<room>` or `roomgate.broadcast.<room>`).
pub fn covers_room(subjects: &[String], room: &str) -> bool {
    subjects
        .iter()
        .any(|s| *s == format!("roomgate.*.{room}") || *s == format!("roomgate.broadcast.{room}"))
}

/// Waits until some client of `server` subscribes to exactly `subject`.
pub async fn wait_for_subscriber(server: &NatsServer, subject: &str) {
    eventually_async(&format!("a subscriber to {subject}"), || async {
        let connz = server.monitor("/connz?subs=1&limit=1000").await;
        connz["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| {
                c["subscriptions_list"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|s| s == subject))
            })
    })
    .await;
}

/// Waits until `gateway_id`'s subscriptions on `server` satisfy `check`.
pub async fn wait_subjects(
    server: &NatsServer,
    gateway_id: &str,
    what: &str,
    check: impl Fn(&[String]) -> bool,
) {
    let mut last = Vec::new();
    let outcome = tokio::time::timeout(WAIT, async {
        loop {
            last = gateway_subjects(server, gateway_id).await;
            if check(&last) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if outcome.is_err() {
        panic!("timed out waiting for {what}; the gateway's subscriptions are {last:?}");
    }
}

/// The headers of a payload the gateway sends as it is (`Roomgate-Raw`).
pub fn raw() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Roomgate-Raw", "true");
    headers
}

/// A member of `room` that stops reading after its join, once the join has
/// been announced on `presence`; with its connection id.
pub async fn stuck_member(
    gateway: &TestGateway,
    presence: &mut Sub,
    room: &str,
) -> (tokio::net::TcpStream, String) {
    let stream = client_that_stops_reading(gateway.addr, room).await;
    let (_, joined) = presence
        .next_matching(|_, v| v["event"] == "join" && v["room"] == room)
        .await;
    let id = joined["connection_id"]
        .as_str()
        .expect("the connection id")
        .to_string();
    (stream, id)
}

/// A gateway on the NATS at `url`, and a client that has joined `room`
/// once `backend` has seen it join (so its room is subscribed).
pub async fn gateway_with_a_member(
    url: &str,
    backend: Backend,
    room: &str,
) -> (TestGateway, Backend, WsClient) {
    let gw = TestGateway::start(nats_config(url)).await;
    wait_nats_connected(&gw, true).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let mut client = gw.client().await;
    join_synced(&mut client, &mut presence, room).await;
    (gw, backend, client)
}

/// Joins `room` and waits for the gateway's presence event for it on
/// `presence` (a backend subscription to `<prefix>.presence.>`). The
/// gateway publishes it after subscribing to the room, so from then on a
/// backend publication to the room reaches this member.
pub async fn join_synced(client: &mut WsClient, presence: &mut Sub, room: &str) {
    client.join(room).await;
    let id = client.id.clone();
    presence
        .next_matching(|_, v| {
            v["event"] == "join" && v["connection_id"] == id.as_str() && v["room"] == room
        })
        .await;
}

/// A `message` frame as a backend's wrapped payload becomes.
pub fn server_message(room: Option<&str>, content: &str, from: &str) -> Value {
    json!({"type": "message", "room": room, "content": content, "from": from})
}
