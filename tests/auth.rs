//! Authentication at the upgrade (SPEC §4): JWT from header, query or
//! cookie with HS256/RS256/ES256 keys made at test time, forward auth
//! against a real upstream endpoint, origin checks. A refused upgrade must
//! never become a WebSocket.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

const SECRET: &str = "a test secret that is long enough";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Claims with `sub` and an expiry an hour away, changed by `edit`.
fn claims(edit: impl FnOnce(&mut Value)) -> Value {
    let mut claims = json!({"sub": "alice", "exp": now() + 3600});
    edit(&mut claims);
    claims
}

fn hs256(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

/// A key pair written by openssl into a fresh directory.
struct KeyPair {
    dir: PathBuf,
    private_pem: Vec<u8>,
}

impl KeyPair {
    fn generate(kind: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("roomgate-keys-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("key dir");
        let private = dir.join("private.pem");
        let algorithm_args: &[&str] = match kind {
            "rsa" => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            _ => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        };
        openssl(&[&["genpkey"], algorithm_args, &["-out", path(&private)]].concat());
        openssl(&[
            "pkey",
            "-in",
            path(&private),
            "-pubout",
            "-out",
            path(&dir.join("public.pem")),
        ]);
        Self {
            private_pem: std::fs::read(&private).expect("private key"),
            dir,
        }
    }

    fn public_file(&self) -> String {
        path(&self.dir.join("public.pem")).to_string()
    }

    fn sign(&self, algorithm: Algorithm, claims: &Value) -> String {
        let key = match algorithm {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&self.private_pem),
            _ => EncodingKey::from_ec_pem(&self.private_pem),
        }
        .expect("encoding key");
        encode(&Header::new(algorithm), claims, &key).expect("sign")
    }
}

impl Drop for KeyPair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn openssl(args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed (scripts/test.sh installs it)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A JWT gateway process with HS256 and the secret in its environment.
fn jwt_gateway(extra: &[(&str, &str)]) -> GatewayProcess {
    let mut env = vec![
        ("ROOMGATE_AUTH_MODE", "jwt"),
        ("ROOMGATE_AUTH_JWT_SECRET_ENV", "RG_SECRET"),
        ("RG_SECRET", SECRET),
        ("ROOMGATE_AUTH_JWT_COOKIE", "rg_token"),
    ];
    env.extend_from_slice(extra);
    GatewayProcess::start(&[], &env)
}

/// Attempts an upgrade on `/ws<query>` with extra headers; returns the
/// status and body of the refusal, or 101.
async fn upgrade_status(
    addr: std::net::SocketAddr,
    query: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let (status, _, body) = upgrade_answer(addr, query, headers).await;
    (status, body)
}

/// [`upgrade_status`] with the answer's headers.
async fn upgrade_answer(
    addr: std::net::SocketAddr,
    query: &str,
    headers: &[(&str, &str)],
) -> (u16, hyper::HeaderMap, String) {
    let mut request = Request::get(format!("/ws{query}"))
        .header("host", addr.to_string())
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = send_request(addr, request.body(empty()).expect("request")).await;
    let status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    if status == 101 {
        return (101, parts.headers, String::new());
    }
    let body = within("refusal body", body.collect())
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// Connects with tokio-tungstenite using a request with extra headers.
async fn connect_with(url: &str, headers: &[(&str, &str)]) -> WsClient {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().expect("request");
    for (name, value) in headers {
        request.headers_mut().insert(
            hyper::header::HeaderName::from_bytes(name.as_bytes()).expect("name"),
            value.parse().expect("value"),
        );
    }
    let (ws, _) = within(
        "WebSocket connect",
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("upgrade admitted");
    let mut client = WsClient {
        ws,
        id: String::new(),
    };
    let welcome = client.recv().await;
    client.id = welcome["connection_id"].as_str().expect("id").to_string();
    client
}

#[tokio::test]
async fn hs256_token_is_accepted_from_header_query_and_cookie() {
    let gw = jwt_gateway(&[("ROOMGATE_WEBSOCKET_ROOMS_PRESENCE", "true")]);
    let url = format!("ws://{}/ws", gw.addr);
    let token = hs256(&claims(|_| {}));

    let mut by_header = connect_with(&url, &[("authorization", &format!("Bearer {token}"))]).await;
    let mut by_query = WsClient::connect(&format!("{url}?token={token}")).await;
    let by_cookie = connect_with(&url, &[("cookie", &format!("other=1; rg_token={token}"))]).await;
    assert_ne!(by_header.id, by_query.id);
    drop(by_cookie);

    // The user named by `sub` appears in presence frames.
    by_header.join("lobby").await;
    by_query.join("lobby").await;
    let presence = by_header.recv().await;
    assert_eq!(presence["type"], "presence");
    assert_eq!(presence["user"], "alice");
    assert_eq!(
        presence["connection_id"].as_str(),
        Some(by_query.id.as_str())
    );
}

#[tokio::test]
async fn bad_tokens_get_401_and_no_websocket() {
    let gw = jwt_gateway(&[]);
    let rsa = KeyPair::generate("rsa");
    let unsigned_header = serde_json::to_vec(&json!({"alg": "none", "typ": "JWT"})).expect("json");
    let body = serde_json::to_vec(&claims(|_| {})).expect("json");
    let alg_none = format!("{}.{}.", b64(&unsigned_header), b64(&body));
    let wrong_secret = encode(
        &Header::new(Algorithm::HS256),
        &claims(|_| {}),
        &EncodingKey::from_secret(b"not the secret"),
    )
    .expect("sign");
    let cases = [
        ("missing", String::new()),
        ("malformed", "not.a.token".to_string()),
        ("garbage", "x".repeat(3000)),
        ("wrong signature", wrong_secret),
        (
            "wrong algorithm",
            rsa.sign(Algorithm::RS256, &claims(|_| {})),
        ),
        ("alg none", alg_none),
        (
            "expired",
            hs256(&claims(|c| c["exp"] = json!(now() - 3600))),
        ),
    ];
    for (what, token) in cases {
        let headers: Vec<(&str, String)> = if token.is_empty() {
            Vec::new()
        } else {
            vec![("authorization", format!("Bearer {token}"))]
        };
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, answer, _) = upgrade_answer(gw.addr, "", &headers).await;
        assert_eq!(status, 401, "{what} token must be refused with 401");
        assert_eq!(
            answer.get("www-authenticate").map(|v| v.as_bytes()),
            Some(&b"Bearer"[..]),
            "{what}: the challenge names the scheme the gateway reads"
        );
    }
    let (_, metrics) = http_get(gw.admin, "/metrics").await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"roomgate_upgrades_rejected_total{reason="unauthorized"}"#
        ),
        7.0
    );
    assert_eq!(
        metric_value(&metrics, "roomgate_connections_opened_total"),
        0.0
    );
}

fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_set() {
    let gw = jwt_gateway(&[
        ("ROOMGATE_AUTH_JWT_ISSUER", "https://issuer.test"),
        ("ROOMGATE_AUTH_JWT_AUDIENCE", "roomgate"),
    ]);
    let good = hs256(&claims(|c| {
        c["iss"] = json!("https://issuer.test");
        c["aud"] = json!("roomgate");
    }));
    let wrong_iss = hs256(&claims(|c| {
        c["iss"] = json!("https://other.test");
        c["aud"] = json!("roomgate");
    }));
    let wrong_aud = hs256(&claims(|c| {
        c["iss"] = json!("https://issuer.test");
        c["aud"] = json!("someone-else");
    }));
    let missing = hs256(&claims(|_| {}));
    assert_eq!(
        upgrade_status(gw.addr, &format!("?token={good}"), &[])
            .await
            .0,
        101
    );
    for (what, token) in [
        ("wrong issuer", wrong_iss),
        ("wrong audience", wrong_aud),
        ("no iss/aud", missing),
    ] {
        assert_eq!(
            upgrade_status(gw.addr, &format!("?token={token}"), &[])
                .await
                .0,
            401,
            "{what}"
        );
    }
}

#[tokio::test]
async fn rs256_and_es256_keys_verify_their_own_tokens_only() {
    let rsa = KeyPair::generate("rsa");
    let ec = KeyPair::generate("ec");
    for (algorithm, name, keys, other) in [
        (Algorithm::RS256, "RS256", &rsa, Algorithm::ES256),
        (Algorithm::ES256, "ES256", &ec, Algorithm::RS256),
    ] {
        let key_file = keys.public_file();
        let gw = GatewayProcess::start(
            &[],
            &[
                ("ROOMGATE_AUTH_MODE", "jwt"),
                ("ROOMGATE_AUTH_JWT_ALGORITHM", name),
                ("ROOMGATE_AUTH_JWT_PUBLIC_KEY_FILE", &key_file),
            ],
        );
        let good = keys.sign(algorithm, &claims(|_| {}));
        let client = WsClient::connect(&format!("ws://{}/ws?token={good}", gw.addr)).await;
        assert!(!client.id.is_empty());
        let other_keys = if other == Algorithm::RS256 { &rsa } else { &ec };
        let foreign = other_keys.sign(other, &claims(|_| {}));
        assert_eq!(
            upgrade_status(gw.addr, &format!("?token={foreign}"), &[])
                .await
                .0,
            401,
            "{name}"
        );
        let forged = hs256(&claims(|_| {}));
        assert_eq!(
            upgrade_status(gw.addr, &format!("?token={forged}"), &[])
                .await
                .0,
            401,
            "{name} vs HS256"
        );
    }
}

#[tokio::test]
async fn connection_closes_with_1008_when_the_token_expires() {
    let gw = jwt_gateway(&[]);
    // Seconds enough for the connection and its join to be done first,
    // however busy the machine (`recv_close` waits far longer).
    let token = hs256(&claims(|c| c["exp"] = json!(now() + 5)));
    let mut client = WsClient::connect(&format!("ws://{}/ws?token={token}", gw.addr)).await;
    client.join("room").await;
    assert_eq!(client.recv_close().await, Some(1008));
    let (_, metrics) = http_get(gw.admin, "/metrics").await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"roomgate_connections_closed_total{reason="token_expired"}"#
        ),
        1.0
    );
}

/// An expiry too far off for the clock is one that never comes: the
/// token is accepted and the session lives.
#[tokio::test]
async fn a_token_expiring_beyond_the_clock_range_is_accepted() {
    let gw = jwt_gateway(&[]);
    let token = hs256(&claims(|c| c["exp"] = json!(u64::MAX)));
    let mut client = WsClient::connect(&format!("ws://{}/ws?token={token}", gw.addr)).await;
    client.join("room").await;
    client.ping_pong().await;
}

/// `exp` and `nbf` are NumericDates, which may have a fraction (RFC 7519
/// §2); `nbf` is honoured, with a minute's leeway for the issuer's clock.
#[tokio::test]
async fn exp_and_nbf_are_read_with_fractions_and_both_are_enforced() {
    let gw = jwt_gateway(&[]);
    let now = now() as f64;
    let cases = [
        ("a fractional exp ahead", json!({"exp": now + 3600.5}), 101),
        ("a fractional exp past", json!({"exp": now - 3600.5}), 401),
        ("an nbf past", json!({"nbf": now - 10.0}), 101),
        ("an nbf within the leeway", json!({"nbf": now + 5.25}), 101),
        ("an nbf an hour ahead", json!({"nbf": now + 3600.0}), 401),
        ("a negative exp", json!({"exp": -1}), 401),
        ("an exp that is text", json!({"exp": "soon"}), 401),
        // `null` is not a NumericDate: no token that never expires by it.
        ("an exp that is null", json!({"exp": null}), 401),
        ("an nbf that is null", json!({"nbf": null}), 401),
        // RFC 7519 §4.1.4: valid only before its `exp`, and the session
        // would close it at once.
        ("an exp of this second", json!({"exp": now}), 401),
        // RFC 7519 §4.1.1: one string, not a list.
        (
            "an iss that is a list",
            json!({"iss": ["a", "b"], "exp": now + 60.0}),
            401,
        ),
    ];
    for (what, times, expected) in cases {
        let mut claims = json!({"sub": "alice"});
        for (name, value) in times.as_object().expect("object") {
            claims[name] = value.clone();
        }
        let token = hs256(&claims);
        let (status, _) = upgrade_status(gw.addr, &format!("?token={token}"), &[]).await;
        assert_eq!(status, expected, "{what}");
    }
}

#[tokio::test]
async fn rooms_claim_limits_joins() {
    let gw = jwt_gateway(&[]);
    let token = hs256(&claims(|c| c["rooms"] = json!(["chat.*", "game.>"])));
    let mut client = WsClient::connect(&format!("ws://{}/ws?token={token}", gw.addr)).await;
    client.join("chat.general").await;
    client.join("game.1.lobby").await;
    // The admin view names the member's user.
    let (status, detail) = http_get(gw.admin, "/rooms/chat.general").await;
    assert_eq!(status, 200);
    let detail: Value = serde_json::from_str(&detail).expect("JSON");
    assert_eq!(
        detail["connections"],
        json!([{"connection_id": client.id, "user": "alice"}])
    );
    for room in ["admin", "chat.a.b", "chat"] {
        client
            .send(json!({"type": "join", "room": room, "id": room}))
            .await;
        let reply = client.recv().await;
        assert_eq!(reply["code"], "forbidden", "{room}: {reply}");
        assert_eq!(reply["id"], room);
    }
    // Still usable after the refusals.
    client
        .send(json!({"type": "leave", "room": "chat.general"}))
        .await;
    assert_eq!(
        client.recv().await,
        json!({"type": "left", "room": "chat.general"})
    );
}

#[test]
fn a_private_key_given_as_the_public_key_stops_startup() {
    // The RSA parser would take it, and then no token would verify.
    for (kind, algorithm) in [("rsa", "RS256"), ("ec", "ES256")] {
        let keys = KeyPair::generate(kind);
        let private = path(&keys.dir.join("private.pem")).to_string();
        let env = [
            ("ROOMGATE_NATS_ENABLED", "false"),
            ("ROOMGATE_AUTH_MODE", "jwt"),
            ("ROOMGATE_AUTH_JWT_ALGORITHM", algorithm),
            ("ROOMGATE_AUTH_JWT_PUBLIC_KEY_FILE", private.as_str()),
        ];
        let (code, _, stderr) = run_binary(&["check-config"], &env);
        assert_eq!(code, 2, "{algorithm}: {stderr}");
        assert!(
            stderr.contains("auth.jwt.public_key_file"),
            "{algorithm}: {stderr}"
        );
    }
}

#[tokio::test]
async fn a_rooms_claim_of_null_allows_no_room() {
    // Some encoders write an empty list as `null`: no rooms, not all of
    // them (an empty `Roomgate-Rooms` from forward auth allows none too).
    let gw = jwt_gateway(&[]);
    let token = hs256(&claims(|c| c["rooms"] = Value::Null));
    let mut client = WsClient::connect(&format!("ws://{}/ws?token={token}", gw.addr)).await;
    for room in ["lobby", "chat.general"] {
        client
            .send(json!({"type": "join", "room": room, "id": room}))
            .await;
        let reply = client.recv().await;
        assert_eq!(reply["code"], "forbidden", "{room}: {reply}");
    }
}

#[tokio::test]
async fn a_blank_subject_is_no_user() {
    // As a blank `Roomgate-User` is in forward auth: backends and members
    // see one shape of anonymous, whichever way the gateway authenticates.
    let gw = jwt_gateway(&[("ROOMGATE_WEBSOCKET_ROOMS_PRESENCE", "true")]);
    let url = |sub: &str| {
        let token = hs256(&claims(|c| c["sub"] = json!(sub)));
        format!("ws://{}/ws?token={token}", gw.addr)
    };
    let mut watcher = WsClient::connect(&url("watcher")).await;
    watcher.join("lobby").await;
    let mut members = Vec::new();
    for sub in ["", " \t", "alice"] {
        let mut member = WsClient::connect(&url(sub)).await;
        member.join("lobby").await;
        // Kept connected: a leave would come before the next join.
        members.push(member);
        let presence = watcher.recv().await;
        assert_eq!(presence["event"], "join", "{presence}");
        let expected = if sub == "alice" {
            json!("alice")
        } else {
            Value::Null
        };
        assert_eq!(presence["user"], expected, "sub {sub:?}: {presence}");
    }
}

#[tokio::test]
async fn a_token_with_a_critical_extension_is_refused() {
    // RFC 7515 §4.1.11: an extension marked critical that the recipient
    // does not understand makes the token invalid.
    let gw = jwt_gateway(&[]);
    let mut header = Header::new(Algorithm::HS256);
    header.crit = Some(vec!["exp".to_string()]);
    let token = encode(
        &header,
        &claims(|_| {}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign");
    let (status, _) = upgrade_status(gw.addr, &format!("?token={token}"), &[]).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn tokens_and_cookies_never_reach_the_logs() {
    let gw = jwt_gateway(&[("ROOMGATE_LOG_LEVEL", "trace")]);
    let token = hs256(&claims(|_| {}));
    let bad = hs256(&claims(|c| c["exp"] = json!(now() - 10)));
    let client = connect_with(
        &format!("ws://{}/ws", gw.addr),
        &[("cookie", &format!("rg_token={token}"))],
    )
    .await;
    drop(client);
    assert_eq!(
        upgrade_status(gw.addr, &format!("?token={bad}"), &[])
            .await
            .0,
        401
    );
    assert_eq!(
        upgrade_status(gw.addr, "", &[("authorization", &format!("Bearer {bad}"))])
            .await
            .0,
        401
    );
    // Everything the checks below scan has been logged once the close of
    // the first connection and both refusals are in.
    eventually("the close and both refusals to be logged", || {
        let log = gw.log.lock().expect("log");
        log.iter().any(|l| l.contains("connection closed"))
            && log.iter().filter(|l| l.contains("upgrade refused")).count() >= 2
    })
    .await;
    let log = gw.log.lock().expect("log").join("\n");
    for secret in [&token, &bad, &SECRET.to_string()] {
        let signature = secret.rsplit('.').next().unwrap_or(secret);
        assert!(
            !log.contains(signature),
            "a credential leaked into the logs"
        );
    }
}

/// An upstream whose `/auth/ws` admits the cookie `session=good` as alice
/// (rooms `chat.*`), `session=norooms` with an empty room list,
/// `session=utf8` as José, `session=notutf8` as a user that is not
/// text and `session=twousers` as both alice and bob, refuses
/// `session=banned` with 403 and a body, and serves everything else
/// with 200.
async fn auth_upstream() -> Upstream {
    Upstream::start(|request: Request<hyper::body::Incoming>| async move {
        if request.uri().path() != "/auth/ws" {
            return Response::new(full("app"));
        }
        let cookie = request
            .headers()
            .get("cookie")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let forwarded = request.headers().contains_key("x-forwarded-for");
        if cookie.contains("session=good") && forwarded {
            // The room list in two field lines: one list.
            Response::builder()
                .header("roomgate-user", "alice")
                .header("roomgate-rooms", "chat.*")
                .header("roomgate-rooms", "lobby")
                .body(full(""))
                .expect("response")
        } else if cookie.contains("session=norooms") {
            // A service that lists a user's rooms, for a user with none.
            Response::builder()
                .header("roomgate-user", "nobody")
                .header("roomgate-rooms", "")
                .body(full(""))
                .expect("response")
        } else if cookie.contains("session=utf8") {
            Response::builder()
                .header(
                    "roomgate-user",
                    hyper::header::HeaderValue::from_bytes("José".as_bytes()).expect("bytes"),
                )
                .body(full(""))
                .expect("response")
        } else if cookie.contains("session=notutf8") {
            Response::builder()
                .header(
                    "roomgate-user",
                    hyper::header::HeaderValue::from_bytes(b"a\xffb").expect("bytes"),
                )
                .body(full(""))
                .expect("response")
        } else if cookie.contains("session=twousers") {
            Response::builder()
                .header("roomgate-user", "alice")
                .header("roomgate-user", "bob")
                .body(full(""))
                .expect("response")
        } else if cookie.contains("session=banned") {
            Response::builder()
                .status(StatusCode::FORBIDDEN)
                .header("content-type", "application/json")
                .header("x-auth-reason", "banned")
                .header("connection", "close")
                .body(full(r#"{"error":"banned"}"#))
                .expect("response")
        } else if cookie.contains("session=slow") {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Response::new(full(""))
        } else {
            Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .header("www-authenticate", "Cookie realm=\"app\"")
                .header("set-cookie", "session=; Max-Age=0")
                .body(full("log in first"))
                .expect("response")
        }
    })
    .await
}

/// A gateway that asks `upstream` about every upgrade, with presence on.
async fn forward_auth_gateway(upstream: &Upstream) -> TestGateway {
    TestGateway::with(|c| {
        c.auth.mode = roomgate::config::AuthMode::Upstream;
        c.upstream.url = upstream.url();
        c.auth.upstream.timeout_secs = 1;
        c.websocket.rooms.presence = true;
    })
    .await
}

/// The user that a client admitted with `cookie` shows to another member
/// of a room, in the presence frame of its join.
async fn user_shown(url: &str, cookie: &str) -> Value {
    let mut first = connect_with(url, &[("cookie", cookie)]).await;
    let mut second = connect_with(url, &[("cookie", cookie)]).await;
    first.join("lobby").await;
    second.join("lobby").await;
    first.recv().await["user"].clone()
}

#[tokio::test]
async fn forward_auth_takes_a_utf8_user_and_refuses_a_user_that_is_not_text_or_not_one() {
    let upstream = auth_upstream().await;
    let gw = forward_auth_gateway(&upstream).await;
    let url = gw.ws_url();
    assert_eq!(user_shown(&url, "session=utf8").await, "José");
    // Not anonymous instead, nor the first user named: refused, as for any
    // answer the gateway cannot use.
    for cookie in ["session=notutf8", "session=twousers"] {
        let (status, _) = upgrade_status(gw.addr, "", &[("cookie", cookie)]).await;
        assert_eq!(status, 503, "{cookie}");
    }
    assert_eq!(
        gw.metric("roomgate_connections_opened_total").await,
        2.0,
        "only José's two connections opened"
    );
    gw.stop().await;
}

#[tokio::test]
async fn forward_auth_admits_refuses_and_passes_the_body_back() {
    let upstream = auth_upstream().await;
    let gw = forward_auth_gateway(&upstream).await;
    let url = gw.ws_url();
    assert_eq!(user_shown(&url, "session=good").await, "alice");
    let mut alice = connect_with(&url, &[("cookie", "session=good")]).await;
    alice.send(json!({"type": "join", "room": "admin"})).await;
    assert_eq!(alice.recv().await["code"], "forbidden");
    let mut nobody = connect_with(&url, &[("cookie", "session=norooms")]).await;
    nobody.send(json!({"type": "join", "room": "lobby"})).await;
    assert_eq!(
        nobody.recv().await["code"],
        "forbidden",
        "an empty room list allows no room"
    );

    // The refusals come back with the auth service's headers, less the
    // hop-by-hop ones, and with no challenge of the gateway's own.
    let header = |h: &hyper::HeaderMap, name: &str| {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().expect("text").to_string())
            .collect::<Vec<_>>()
    };
    let (status, h, body) = upgrade_answer(gw.addr, "", &[("cookie", "session=banned")]).await;
    assert_eq!((status, body.as_str()), (403, r#"{"error":"banned"}"#));
    assert_eq!(header(&h, "content-type"), ["application/json"]);
    assert_eq!(header(&h, "x-auth-reason"), ["banned"]);
    assert!(header(&h, "connection").is_empty(), "{h:?}");
    let (status, h, body) = upgrade_answer(gw.addr, "", &[]).await;
    assert_eq!((status, body.as_str()), (401, "log in first"));
    assert_eq!(header(&h, "www-authenticate"), [r#"Cookie realm="app""#]);
    assert_eq!(header(&h, "set-cookie"), ["session=; Max-Age=0"]);
    assert_eq!(header(&h, "content-length"), ["12"]);
    assert_eq!(
        upgrade_status(gw.addr, "", &[("cookie", "session=slow")])
            .await
            .0,
        503
    );
    assert_eq!(
        gw.metric(r#"roomgate_upgrades_rejected_total{reason="forbidden"}"#)
            .await,
        1.0
    );
    assert_eq!(
        gw.metric(r#"roomgate_upgrades_rejected_total{reason="auth_unavailable"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn an_upgrade_admitted_while_the_gateway_stops_gets_503() {
    // The auth service answers only once the gateway has begun to stop:
    // the upgrade must be refused with an HTTP answer, not switched and
    // closed, nor closed with WebSocket bytes where the client waits for
    // the HTTP response.
    type Go = tokio::sync::oneshot::Sender<()>;
    let (asked, mut asks) = tokio::sync::mpsc::unbounded_channel::<Go>();
    let upstream = Upstream::start(move |_request: Request<hyper::body::Incoming>| {
        let asked = asked.clone();
        async move {
            let (go, wait) = tokio::sync::oneshot::channel();
            let _ = asked.send(go);
            let _ = wait.await;
            Response::builder()
                .header("roomgate-user", "alice")
                .body(full(""))
                .expect("response")
        }
    })
    .await;
    let mut gw = TestGateway::with(|c| {
        c.auth.mode = roomgate::config::AuthMode::Upstream;
        c.upstream.url = upstream.url();
        c.auth.upstream.timeout_secs = 10;
    })
    .await;
    let mut stream = within("connect", tokio::net::TcpStream::connect(gw.addr))
        .await
        .expect("connect");
    let request = raw_upgrade_request(gw.addr, "/ws", "");
    within("write", stream.write_all(request.as_bytes()))
        .await
        .expect("write the handshake");
    let go = within("the auth request", asks.recv())
        .await
        .expect("asked");
    gw.begin_stop();
    eventually_async("the gateway to drain", || async {
        gw.admin_get("/readyz").await.0 == 503
    })
    .await;
    let _ = go.send(());
    let (status, head) = read_response_head(&mut stream).await;
    assert_eq!(status, 503, "{head}");
    gw.wait_stopped().await;
}

#[tokio::test]
async fn forward_auth_down_gives_503() {
    let closed_port = free_port();
    let gw = TestGateway::with(|c| {
        c.auth.mode = roomgate::config::AuthMode::Upstream;
        c.upstream.url = format!("http://127.0.0.1:{closed_port}");
    })
    .await;
    let (status, _) = upgrade_status(gw.addr, "", &[("cookie", "session=good")]).await;
    assert_eq!(status, 503);
}

#[tokio::test]
async fn disallowed_origin_gets_403_before_any_auth() {
    // JWT is on, with the secret taken from an environment variable this
    // process has too. Without a token the answer would be 401, with one
    // 101: 403 for both means the origin was checked first.
    let secret = std::env::var("PATH").expect("PATH is set");
    let gw = TestGateway::with(|c| {
        c.auth.mode = roomgate::config::AuthMode::Jwt;
        c.auth.jwt.secret_env = "PATH".into();
        c.auth.allowed_origins = vec!["https://app.example".into()];
    })
    .await;
    let token = encode(
        &Header::new(Algorithm::HS256),
        &claims(|_| {}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign");
    let with_token = format!("?token={token}");
    let evil = [("origin", "https://evil.example")];
    let app = [("origin", "https://app.example")];
    assert_eq!(upgrade_status(gw.addr, "", &evil).await.0, 403);
    assert_eq!(upgrade_status(gw.addr, &with_token, &evil).await.0, 403);
    // The allowed origin still has to authenticate, and can.
    assert_eq!(upgrade_status(gw.addr, "", &app).await.0, 401);
    assert_eq!(upgrade_status(gw.addr, &with_token, &app).await.0, 101);
    // Non-browser clients send no Origin and cannot be hijacked cross-site.
    assert_eq!(upgrade_status(gw.addr, &with_token, &[]).await.0, 101);
    // A request has one origin: with two, in either order, neither counts.
    let both = [app[0], evil[0]];
    assert_eq!(upgrade_status(gw.addr, &with_token, &both).await.0, 403);
    let both = [evil[0], app[0]];
    assert_eq!(upgrade_status(gw.addr, &with_token, &both).await.0, 403);
    let twice = [app[0], app[0]];
    assert_eq!(upgrade_status(gw.addr, &with_token, &twice).await.0, 403);
    assert_eq!(
        gw.metric(r#"roomgate_upgrades_rejected_total{reason="origin"}"#)
            .await,
        5.0
    );
}

#[tokio::test]
async fn disallowed_origin_gets_403_without_asking_forward_auth() {
    let upstream = auth_upstream().await;
    let gw = TestGateway::with(|c| {
        c.auth.mode = roomgate::config::AuthMode::Upstream;
        c.upstream.url = upstream.url();
        c.auth.allowed_origins = vec!["https://app.example".into()];
    })
    .await;
    let cookie = ("cookie", "session=good");
    let (status, _) =
        upgrade_status(gw.addr, "", &[("origin", "https://evil.example"), cookie]).await;
    assert_eq!(status, 403);
    // The refusal is complete: the auth service was never asked.
    assert_eq!(upstream.connections_accepted(), 0);
    // The same request from the allowed origin is asked about, and admitted.
    let (status, _) =
        upgrade_status(gw.addr, "", &[("origin", "https://app.example"), cookie]).await;
    assert_eq!(status, 101);
    assert_eq!(upstream.connections_accepted(), 1);
}

#[tokio::test]
async fn user_flows_into_nats_payloads_and_headers() {
    use futures_util::StreamExt;
    let nats = NatsServer::start();
    let backend = nats.client().await;
    let mut events = backend
        .subscribe("roomgate.message.>")
        .await
        .expect("subscribe");
    backend.flush().await.expect("flush");
    let upstream = auth_upstream().await;
    let gw = TestGateway::with(|c| {
        c.auth.mode = roomgate::config::AuthMode::Upstream;
        c.upstream.url = upstream.url();
        c.nats.enabled = true;
        c.nats.url = nats.url();
    })
    .await;
    eventually_async("the gateway to connect to NATS", || async {
        gw.metric("roomgate_nats_connected").await == 1.0
    })
    .await;
    let mut alice = connect_with(&gw.ws_url(), &[("cookie", "session=good")]).await;
    alice.join("lobby").await;
    alice
        .send(json!({"type": "message", "room": "lobby", "content": "hi"}))
        .await;
    let message = within("the message on NATS", events.next())
        .await
        .expect("message");
    let payload: Value = serde_json::from_slice(&message.payload).expect("json");
    assert_eq!(payload["user"], "alice");
    let headers = message.headers.expect("headers");
    assert_eq!(
        headers.get("Roomgate-User").map(|v| v.as_str()),
        Some("alice")
    );
}

/// The HTTP client behind forward auth keeps its connection to the auth
/// service for the next check. It is closed when the gateway stops, not
/// when its idle time (a minute) runs out: nothing the gateway started
/// outlives it.
#[tokio::test]
async fn the_forward_auth_connection_is_closed_when_the_gateway_stops() {
    let upstream = auth_upstream().await;
    let gw = TestGateway::with(|c| {
        c.auth.mode = roomgate::config::AuthMode::Upstream;
        c.upstream.url = upstream.url();
    })
    .await;
    let mut alice = connect_with(&gw.ws_url(), &[("cookie", "session=good")]).await;
    alice.join("lobby").await;
    assert_eq!(upstream.connections_open(), 1, "kept for the next check");
    alice.close_normally().await;

    gw.stop().await;
    eventually("the auth service's connection to be closed", || {
        upstream.connections_open() == 0
    })
    .await;
}

/// A gateway at `max_connections` refuses further upgrades before asking
/// the auth service, so a crowd of clients at a full gateway does not turn
/// into a crowd of auth checks.
#[tokio::test]
async fn a_full_gateway_refuses_upgrades_without_asking_the_auth_service() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let checks = Arc::new(AtomicUsize::new(0));
    let counted = checks.clone();
    let upstream = Upstream::start(move |_request: Request<hyper::body::Incoming>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async {
            Response::builder()
                .header("roomgate-user", "alice")
                .body(full(""))
                .expect("response")
        }
    })
    .await;
    let gw = TestGateway::with(|c| {
        c.auth.mode = roomgate::config::AuthMode::Upstream;
        c.upstream.url = upstream.url();
        c.server.max_connections = 1;
    })
    .await;
    let _admitted = gw.client().await;
    assert_eq!(checks.load(Ordering::SeqCst), 1);

    let (status, _) = upgrade_status(gw.addr, "", &[]).await;
    assert_eq!(status, 503);
    assert_eq!(
        checks.load(Ordering::SeqCst),
        1,
        "no check for a refused upgrade"
    );
    assert_eq!(
        gw.metric("roomgate_upgrades_rejected_total{reason=\"max_connections\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn forward_auth_gets_the_upgrade_uri_from_the_gateway_not_the_client() {
    // An auth service written for nginx's `auth_request` may trust
    // `X-Original-URI`; the gateway sets it, with `X-Forwarded-Uri`, and
    // does not pass on the client's `Roomgate-*` headers, which are the
    // service's own answer.
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let upstream = Upstream::start(move |request: Request<hyper::body::Incoming>| {
        let _ = seen_tx.send(request.headers().clone());
        async move {
            Response::builder()
                .header("roomgate-user", "alice")
                .body(full(""))
                .expect("response")
        }
    })
    .await;
    let gw = forward_auth_gateway(&upstream).await;
    let client = connect_with(
        &format!("ws://{}/ws?room=1", gw.addr),
        &[
            ("x-original-uri", "/admin"),
            ("x-forwarded-uri", "/admin"),
            ("roomgate-user", "mallory"),
            ("roomgate-rooms", ">"),
        ],
    )
    .await;
    let headers = within("the auth request", seen.recv())
        .await
        .expect("asked");
    for name in ["x-original-uri", "x-forwarded-uri"] {
        let values: Vec<_> = headers.get_all(name).iter().collect();
        assert_eq!(values, ["/ws?room=1"], "{name}");
    }
    assert!(!headers.contains_key("roomgate-user"), "{headers:?}");
    assert!(!headers.contains_key("roomgate-rooms"), "{headers:?}");
    drop(client);
}

#[tokio::test]
async fn forward_auth_of_an_absolute_form_upgrade_names_the_targets_host() {
    // RFC 9112 §3.2.2: the target's host stands for the request's, over
    // its `Host`, as for proxied requests.
    use tokio::io::AsyncWriteExt;
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let upstream = Upstream::start(move |request: Request<hyper::body::Incoming>| {
        let _ = seen_tx.send(request.headers().clone());
        async move { Response::new(full("")) }
    })
    .await;
    let gw = forward_auth_gateway(&upstream).await;
    let mut stream = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let request = raw_upgrade_request(gw.addr, "http://other.example:99/ws?x=1", "");
    stream.write_all(request.as_bytes()).await.expect("write");
    let (status, head) = read_response_head(&mut stream).await;
    assert_eq!(status, 101, "{head}");
    let headers = within("the auth request", seen.recv())
        .await
        .expect("asked");
    for name in ["host", "x-forwarded-host"] {
        let values: Vec<_> = headers.get_all(name).iter().collect();
        assert_eq!(values, ["other.example:99"], "{name}");
    }
    assert_eq!(headers["x-forwarded-uri"], "/ws?x=1");
}

#[tokio::test]
async fn a_forward_auth_check_on_a_connection_the_service_just_closed_is_sent_again() {
    // The service's keep-alive timeout ran out as the second check went
    // out on the kept-alive connection: the check is a GET without a body,
    // so it goes again on a new connection rather than failing with 503.
    let (addr, accepted) = upstream_closing_on_second_request(
        b"HTTP/1.1 200 OK\r\nroomgate-user: alice\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    let gw = TestGateway::with(|c| {
        c.auth.mode = roomgate::config::AuthMode::Upstream;
        c.upstream.url = format!("http://{addr}");
        c.auth.upstream.timeout_secs = 5;
    })
    .await;
    for _ in 0..2 {
        let (status, _) = upgrade_status(gw.addr, "", &[]).await;
        assert_eq!(status, 101);
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_check_sent_again_gets_only_what_is_left_of_the_timeout() {
    // The service reads each check, holds it for most of the timeout and
    // then closes the connection without answering. The check goes again
    // on a new connection, but within the one timeout the client was
    // promised: 503 at about 3 s, not after two holds (5.6 s). The bound
    // leaves the gateway almost two seconds of slack.
    const HOLD: Duration = Duration::from_millis(2800);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
                tokio::time::sleep(HOLD).await;
            });
        }
    });
    let gw = TestGateway::with(|c| {
        c.auth.mode = roomgate::config::AuthMode::Upstream;
        c.upstream.url = format!("http://{addr}");
        c.auth.upstream.timeout_secs = 3;
    })
    .await;
    let started = std::time::Instant::now();
    let (status, _) = upgrade_status(gw.addr, "", &[]).await;
    let took = started.elapsed();
    assert_eq!(status, 503);
    assert!(
        took < Duration::from_millis(4900),
        "503 after {took:?}: the second attempt had a timeout of its own"
    );
}
