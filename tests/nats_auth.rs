//! Logging in to NATS with the credentials in `nats.url` (SPEC §5): a
//! `user:pass@` or a `token@` in the URL reaches a server that requires
//! it, and the bridge works both ways behind the login.

mod common;
mod nats_support;

use std::time::Duration;

use async_nats::ConnectOptions;
use common::*;
use nats_support::*;
use serde_json::json;

/// Starts a gateway on `url` and shows the bridge working both ways: a
/// backend's broadcast reaches a member, and the member's message reaches
/// the backend.
async fn bridges_both_ways(url: &str, backend: Backend) {
    let gw = TestGateway::start(nats_config(url)).await;
    wait_nats_connected(&gw, true).await;
    let mut presence = backend.subscribe("roomgate.presence.>").await;
    let mut messages = backend.subscribe("roomgate.message.>").await;
    let mut a = gw.client().await;
    join_synced(&mut a, &mut presence, "general").await;

    backend.publish("roomgate.broadcast.general", "hi").await;
    assert_eq!(
        a.recv().await,
        server_message(Some("general"), "hi", "server")
    );
    a.say("general", json!("hello"), "1").await;
    let (message, payload) = messages.next_json().await;
    assert_eq!(message.subject.as_str(), "roomgate.message.general");
    assert_eq!(payload["content"], "hello");
    assert_eq!(payload["from"], a.id.as_str());
    // Nothing was lost: a refused confirmation round trip (a gateway that
    // may not publish to `_INBOX.>`) is no publish error.
    assert_eq!(gw.metric("roomgate_nats_publish_errors_total").await, 0.0);
    gw.stop().await;
}

/// A backend logged in with `options`.
async fn backend(server: &NatsServer, options: ConnectOptions) -> Backend {
    Backend {
        client: server.client_with(options).await,
    }
}

#[tokio::test]
async fn a_password_in_the_url_logs_in() {
    let server = NatsServer::start_with_args(&["--user", "alice", "--pass", "hunter2"]);
    let backend = backend(
        &server,
        ConnectOptions::with_user_and_password("alice".into(), "hunter2".into()),
    )
    .await;
    let url = format!("nats://alice:hunter2@127.0.0.1:{}", server.port);
    bridges_both_ways(&url, backend).await;
}

/// The user info of a URL is percent-encoded: `%40` in the URL is an `@`
/// in the password the server gets.
#[tokio::test]
async fn a_percent_encoded_password_is_decoded() {
    let password = "p@ss:w/rd %";
    let server = NatsServer::start_with_args(&["--user", "alice", "--pass", password]);
    let backend = backend(
        &server,
        ConnectOptions::with_user_and_password("alice".into(), password.into()),
    )
    .await;
    let url = format!(
        "nats://alice:p%40ss%3Aw%2Frd%20%25@127.0.0.1:{}",
        server.port
    );
    bridges_both_ways(&url, backend).await;
}

#[tokio::test]
async fn a_token_in_the_url_logs_in() {
    let server = NatsServer::start_with_args(&["--auth", "s3cr3t-token"]);
    let backend = backend(&server, ConnectOptions::with_token("s3cr3t-token".into())).await;
    let url = format!("nats://s3cr3t-token@127.0.0.1:{}", server.port);
    bridges_both_ways(&url, backend).await;
}

/// In a server list, the URLs without user info use the login of those
/// that have one: the client holds one login for every server.
#[tokio::test]
async fn one_login_serves_the_whole_server_list() {
    let server = NatsServer::start_with_args(&["--user", "alice", "--pass", "hunter2"]);
    let backend = backend(
        &server,
        ConnectOptions::with_user_and_password("alice".into(), "hunter2".into()),
    )
    .await;
    // A dead server first, with the login; the live one without it.
    let url = format!(
        "nats://alice:hunter2@127.0.0.1:{}, nats://127.0.0.1:{}",
        free_port(),
        server.port
    );
    bridges_both_ways(&url, backend).await;
}

#[tokio::test]
async fn a_gateway_allowed_only_its_own_subjects_still_answers_joins() {
    // It may not use `_INBOX.>`, so the round trip that confirms a room's
    // subscription goes unanswered: joins are answered all the same (after
    // the subscription was sent), and the bridge works both ways.
    let server = NatsServer::start_with_config(ONLY_ITS_OWN_SUBJECTS);
    let backend = backend_user(&server).await;
    let url = gateway_url(&server);
    bridges_both_ways(&url, backend).await;
}

#[tokio::test]
async fn the_servers_refusals_of_the_confirmation_round_trip_are_logged_at_debug_only() {
    // Every confirmation of a gateway that may not publish to `_INBOX.>` is
    // refused by the server, in the foreground and then in the background.
    // The bridge says so once, in its own warning; each refusal is a debug
    // line, never a warning of its own, and no publish error. (The refusal
    // of the client's reply subscription, `_INBOX.<id>.*`, is a warning of
    // its own, once: it is no round trip.)
    let server = NatsServer::start_with_config(ONLY_ITS_OWN_SUBJECTS);
    let gateway = gateway_process_on(
        &gateway_url(&server),
        &[("ROOMGATE_LOG_LEVEL", "info,roomgate::nats=debug")],
    );
    let mut member = member_after_unconfirmed_joins(&gateway).await;
    // The next join's confirmation sends the first request in the
    // background, refused like the three before it.
    member.join("r3").await;
    let refusals = || {
        gateway
            .json_lines()
            .into_iter()
            .filter(|l| l.to_string().contains("Permissions Violation for Publish"))
            .collect::<Vec<_>>()
    };
    eventually("four refusals", || refusals().len() >= 4).await;
    for line in refusals() {
        assert_eq!(line["level"], "DEBUG", "{line}");
        assert_eq!(
            line["message"], "NATS server refused the confirmation round trip",
            "{line}"
        );
    }
    assert_eq!(
        process_metric(&gateway, "roomgate_nats_publish_errors_total").await,
        0.0
    );
}

/// A gateway user allowed its own subjects alone (not `_INBOX.>`), and a
/// backend.
const ONLY_ITS_OWN_SUBJECTS: &str = r#"authorization {
  users = [
    { user: gateway, password: gw, permissions: {
        publish: { allow: ["roomgate.>"] },
        subscribe: { allow: ["roomgate.>"] },
        allow_responses: true } }
    { user: backend, password: be }
  ]
}
"#;

/// The backend user of the configurations below (`backend`), logged in.
async fn backend_user(server: &NatsServer) -> Backend {
    backend(
        server,
        ConnectOptions::with_user_and_password("backend".into(), "be".into()),
    )
    .await
}

/// The URL of `server` with the login of the configurations' gateway user.
fn gateway_url(server: &NatsServer) -> String {
    format!("nats://gateway:gw@127.0.0.1:{}", server.port)
}

/// The server's configuration: a gateway user allowed to subscribe to
/// `subscribe` (a TOML-ish list, empty for anything), and a backend.
fn permissions(subscribe: &str) -> String {
    let limit = if subscribe.is_empty() {
        String::new()
    } else {
        format!(", permissions: {{ subscribe: {{ allow: [{subscribe}] }} }}")
    };
    format!(
        "authorization {{\n  users = [\n    {{ user: gateway, password: gw{limit} }}\n    \
         {{ user: backend, password: be }}\n  ]\n}}\n"
    )
}

/// Whether the gateway's connection holds a subscription to `subject`.
async fn gateway_subscribes(server: &NatsServer, subject: &str) -> bool {
    let connz = server.monitor("/connz?subs=1&auth=1").await;
    let connections = connz["connections"].as_array().cloned().unwrap_or_default();
    connections
        .iter()
        .filter(|c| c["authorized_user"] == "gateway")
        .any(|c| {
            c["subscriptions_list"]
                .as_array()
                .is_some_and(|subs| subs.iter().any(|s| s == subject))
        })
}

#[tokio::test]
async fn a_room_whose_subscription_the_server_refused_comes_back_when_it_is_allowed() {
    // A reload takes the right to subscribe to rooms away: nats-server
    // drops the room's subscription and says so. The gateway retries it,
    // so that when the right comes back, so does the room.
    let dir = std::env::temp_dir().join(format!("roomgate-perms-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let conf = dir.join("nats.conf");
    std::fs::write(&conf, permissions("")).expect("write the configuration");
    let server = NatsServer::start_with_args(&["-c", conf.to_str().expect("UTF-8 path")]);
    let reload = |config: String| {
        std::fs::write(&conf, config).expect("write the configuration");
        signal(server.pid().expect("nats-server runs"), "HUP");
    };
    let (gw, backend, mut member) =
        gateway_with_a_member(&gateway_url(&server), backend_user(&server).await, "r1").await;

    assert!(gateway_subscribes(&server, "roomgate.*.r1").await);

    reload(permissions(
        r#""roomgate.send.*", "roomgate.all", "roomgate.control.*", "_INBOX.>""#,
    ));
    eventually_async("the server to drop the room's subscription", || async {
        !gateway_subscribes(&server, "roomgate.*.r1").await
    })
    .await;
    reload(permissions(""));
    // Broadcasts reach the member again once the room is subscribed again.
    within("a broadcast after the right came back", async {
        loop {
            backend.publish("roomgate.broadcast.r1", "back").await;
            let next = member.next_json();
            if let Ok(Some(frame)) = tokio::time::timeout(Duration::from_millis(200), next).await {
                assert_eq!(frame, server_message(Some("r1"), "back", "server"));
                return;
            }
        }
    })
    .await;
    assert!(gateway_subscribes(&server, "roomgate.*.r1").await);
    drop(member);
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_room_the_server_keeps_refusing_is_tried_less_and_less_often() {
    // Every try costs a subscribe and a refusal: while the refusals go
    // on, the tries grow apart (500 ms, then 1 s, then 2 s …).
    let dir = std::env::temp_dir().join(format!("roomgate-refused-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let conf = dir.join("nats.conf");
    let log = dir.join("nats.log");
    std::fs::write(
        &conf,
        permissions(r#""roomgate.send.*", "roomgate.all", "roomgate.control.*", "_INBOX.>""#),
    )
    .expect("write the configuration");
    let server = NatsServer::start_with_args(&[
        "-c",
        conf.to_str().expect("UTF-8 path"),
        "-l",
        log.to_str().expect("UTF-8 path"),
    ]);
    let url = gateway_url(&server);
    let mut config = nats_config(&url);
    config.websocket.rooms.presence = true;
    let gw = TestGateway::start(config).await;
    wait_nats_connected(&gw, true).await;
    let mut member = gw.client().await;
    member.join("r1").await;

    let refusals = within("four refusals of the room", async {
        loop {
            let times = refusal_times(&log, "roomgate.*.r1");
            if times.len() >= 4 {
                return times;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // Each gap is at least the wait the refusal before it earned (a slow
    // machine only makes them longer).
    let gaps: Vec<f64> = refusals.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, wait) in gaps.iter().zip([0.5, 1.0, 2.0]) {
        assert!(
            *gap >= wait - 0.01,
            "gaps between refusals {gaps:?}: one is shorter than {wait} s"
        );
    }

    // Joins to the room do not wait for its next try (seconds away now):
    // a second member is in the room, for its messages too, from the
    // moment the first sees it arrive.
    let mut second = gw.client().await;
    second.send(json!({"type": "join", "room": "r1"})).await;
    let arrived = member.recv().await;
    assert_eq!(
        (arrived["type"].as_str(), arrived["event"].as_str()),
        (Some("presence"), Some("join")),
        "{arrived}"
    );
    member.say("r1", json!("hello"), "1").await;
    assert_eq!(second.recv().await, json!({"type": "joined", "room": "r1"}));
    let message = second.recv().await;
    assert_eq!(message["content"], "hello", "{message}");
    drop(second);
    drop(member);
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// When nats-server logged a refused subscription to `subject`, in seconds
/// since midnight.
fn refusal_times(log: &std::path::Path, subject: &str) -> Vec<f64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let wanted = format!("Subscription Violation - User \"gateway\", Subject \"{subject}\"");
    let mut times: Vec<f64> = text
        .lines()
        .filter(|line| line.contains(&wanted))
        .filter_map(|line| {
            // `[pid] 2026/11/27 19:30:24.843810 [ERR] …`
            let clock = line.split_whitespace().nth(2)?;
            let mut parts = clock.split(':');
            let hours: f64 = parts.next()?.parse().ok()?;
            let minutes: f64 = parts.next()?.parse().ok()?;
            let seconds: f64 = parts.next()?.parse().ok()?;
            Some(hours * 3600.0 + minutes * 60.0 + seconds)
        })
        .collect();
    // Across midnight the clock starts over.
    for i in 1..times.len() {
        if times[i] < times[i - 1] {
            times[i] += 86_400.0;
        }
    }
    times
}

#[tokio::test]
async fn a_publication_the_server_refuses_counts_as_a_publish_error() {
    // Core NATS has no receipt: the server's `-ERR` is the only sign that
    // a client's message never reached a backend.
    let server = NatsServer::start_with_config(
        r#"authorization {
  users = [
    { user: gateway, password: gw, permissions: { publish: { deny: ["roomgate.message.>"] } } }
    { user: backend, password: be }
  ]
}
"#,
    );
    let (gw, backend, mut member) = gateway_with_a_member(
        &gateway_url(&server),
        backend_user(&server).await,
        "general",
    )
    .await;
    // What the server allowed (the open and join events) counts nothing.
    assert_eq!(gw.metric("roomgate_nats_publish_errors_total").await, 0.0);

    for (sent, id) in [(1.0, "1"), (2.0, "2")] {
        member.say("general", json!("hello"), id).await;
        eventually_async("the refused publication to be counted", || async {
            gw.metric("roomgate_nats_publish_errors_total").await == sent
        })
        .await;
    }
    // The bridge goes on: a broadcast still reaches the member.
    backend.publish("roomgate.broadcast.general", "hi").await;
    assert_eq!(
        member.recv().await,
        server_message(Some("general"), "hi", "server")
    );
    gw.stop().await;
}
