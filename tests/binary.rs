//! The `roomgate` binary: configuration errors and exit codes, environment
//! overrides, `check-config`, and structured logs (SPEC §5).

mod common;

use std::path::Path;

use common::*;
use serde_json::{Value, json};

/// Environment that keeps a gateway that wrongly starts harmless: loopback
/// port 0, no NATS. Tests add their own variables after these.
const SAFE: [(&str, &str); 3] = [
    ("ROOMGATE_SERVER_LISTEN", "127.0.0.1:0"),
    ("ROOMGATE_ADMIN_LISTEN", "127.0.0.1:0"),
    ("ROOMGATE_NATS_ENABLED", "false"),
];

/// Starts the gateway (no subcommand) and expects it to refuse its
/// configuration: returns stderr after checking the exit code is 2.
fn refused_start(args: &[&str], env: &[(&str, &str)]) -> String {
    let env: Vec<(&str, &str)> = SAFE.iter().chain(env).copied().collect();
    let (code, stdout, stderr) = run_binary(args, &env);
    assert_eq!(
        code, 2,
        "exit code 2 for a configuration error\nstdout: {stdout}\nstderr: {stderr}"
    );
    stderr
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

#[test]
fn unknown_key_in_the_file_stops_startup_naming_the_key() {
    let dir = TempDir::new();
    let file = dir.write("gw.toml", "[server]\nlisten_addr = \"127.0.0.1:0\"\n");
    let stderr = refused_start(&["--config", path_str(&file)], &[]);
    assert!(stderr.contains("listen_addr"), "{stderr}");
    assert!(stderr.contains("server"), "{stderr}");
    assert!(stderr.contains(path_str(&file)), "names the file: {stderr}");
}

#[test]
fn unknown_section_in_the_file_stops_startup() {
    let dir = TempDir::new();
    let file = dir.write("gw.toml", "[websockets]\nping_interval_secs = 5\n");
    let stderr = refused_start(&["--config", path_str(&file)], &[]);
    assert!(stderr.contains("websockets"), "{stderr}");
}

#[test]
fn bad_value_in_the_file_stops_startup_naming_the_key() {
    let dir = TempDir::new();
    let file = dir.write("gw.toml", "[websocket]\nmax_message_size_bytes = \"big\"\n");
    let stderr = refused_start(&["--config", path_str(&file)], &[]);
    assert!(
        stderr.contains("websocket.max_message_size_bytes"),
        "{stderr}"
    );

    let file = dir.write("enum.toml", "[log]\nformat = \"xml\"\n");
    let stderr = refused_start(&["--config", path_str(&file)], &[]);
    assert!(stderr.contains("log.format"), "{stderr}");
}

#[test]
fn bad_value_in_the_environment_stops_startup_naming_variable_and_key() {
    for (var, value, key) in [
        (
            "ROOMGATE_WEBSOCKET_PING_INTERVAL_SECS",
            "soon",
            "websocket.ping_interval_secs",
        ),
        ("ROOMGATE_NATS_REQUIRED", "perhaps", "nats.required"),
        // Values of the right shape for the environment but not for the key.
        ("ROOMGATE_LOG_FORMAT", "xml", "log.format"),
        (
            "ROOMGATE_SERVER_MAX_CONNECTIONS",
            "-5",
            "server.max_connections",
        ),
        (
            "ROOMGATE_WEBSOCKET_SLOW_CONSUMER",
            "sometimes",
            "websocket.slow_consumer",
        ),
        (
            "ROOMGATE_SERVER_SHUTDOWN_GRACE_SECS",
            "18446744073709551615",
            "server.shutdown_grace_secs",
        ),
        // Values refused only once the whole configuration is read.
        ("ROOMGATE_SERVER_LISTEN", "foo", "server.listen"),
        // Checked although forward auth is off.
        ("ROOMGATE_AUTH_UPSTREAM_PATH", "auth", "auth.upstream.path"),
    ] {
        let stderr = refused_start(&[], &[(var, value)]);
        assert!(stderr.contains(var), "{var}={value}: {stderr}");
        assert!(stderr.contains(key), "{var}={value}: {stderr}");
        assert!(
            !stderr.contains("config file"),
            "{var}={value}: the error is the variable's, not a file's: {stderr}"
        );
    }
}

#[test]
fn inconsistent_settings_stop_startup_naming_the_keys() {
    let dir = TempDir::new();
    let file = dir.write("gw.toml", "[auth]\nmode = \"upstream\"\n");
    let stderr = refused_start(&["--config", path_str(&file)], &[]);
    assert!(stderr.contains("auth.mode"), "{stderr}");
    assert!(stderr.contains("upstream.url"), "{stderr}");

    // The same through the environment alone.
    let stderr = refused_start(&[], &[("ROOMGATE_AUTH_MODE", "upstream")]);
    assert!(stderr.contains("auth.mode"), "{stderr}");
}

#[test]
fn values_that_would_fail_quietly_or_later_stop_startup_and_check_config() {
    // A misspelt level would log nothing, a second bind on the gateway's
    // address would fail after start-up began, and a password in the
    // upstream URL would be sent as part of `Host` and printed.
    let cases = [
        ("log.level", vec![("ROOMGATE_LOG_LEVEL", "warning")]),
        (
            "admin.listen",
            vec![
                ("ROOMGATE_SERVER_LISTEN", "127.0.0.1:18080"),
                ("ROOMGATE_ADMIN_LISTEN", "127.0.0.1:18080"),
            ],
        ),
        (
            "upstream.url",
            vec![("ROOMGATE_UPSTREAM_URL", "http://app:s3cret@127.0.0.1:3000")],
        ),
        // Values that would never match: `*` is no wildcard, a query is
        // not part of the path compared, a fragment never reaches a server,
        // a cookie name with a space is no name.
        (
            "auth.allowed_origins",
            vec![("ROOMGATE_AUTH_ALLOWED_ORIGINS", "*")],
        ),
        (
            "server.ws_paths",
            vec![("ROOMGATE_SERVER_WS_PATHS", "/ws?v=1")],
        ),
        (
            "upstream.url",
            vec![("ROOMGATE_UPSTREAM_URL", "http://127.0.0.1:3000/#top")],
        ),
        (
            "auth.jwt.cookie",
            vec![("ROOMGATE_AUTH_JWT_COOKIE", "a b;")],
        ),
        // Every upgrade would get 503: the path cannot go in a request.
        (
            "auth.upstream.path",
            vec![
                ("ROOMGATE_AUTH_MODE", "upstream"),
                ("ROOMGATE_UPSTREAM_URL", "http://127.0.0.1:3000"),
                ("ROOMGATE_AUTH_UPSTREAM_PATH", "/a b"),
            ],
        ),
    ];
    for (key, env) in cases {
        let stderr = refused_start(&[], &env);
        assert!(stderr.contains(key), "{key}: {stderr}");
        let env: Vec<(&str, &str)> = SAFE.iter().chain(&env).copied().collect();
        let (code, _, stderr) = run_binary(&["check-config"], &env);
        assert_eq!(code, 2, "check-config refuses {key}: {stderr}");
        assert!(!stderr.contains("s3cret"), "{stderr}");
    }
}

#[test]
fn several_problems_are_reported_at_once() {
    let dir = TempDir::new();
    let file = dir.write(
        "gw.toml",
        "[websocket]\nping_interval_secs = 0\nsend_queue_capacity = 0\n",
    );
    let stderr = refused_start(&["--config", path_str(&file)], &[]);
    assert!(stderr.contains("websocket.ping_interval_secs"), "{stderr}");
    assert!(stderr.contains("websocket.send_queue_capacity"), "{stderr}");
}

#[test]
fn missing_explicit_config_file_stops_startup_naming_the_file() {
    let dir = TempDir::new();
    let missing = dir.path().join("nope.toml");
    let stderr = refused_start(&["--config", path_str(&missing)], &[]);
    assert!(stderr.contains(path_str(&missing)), "{stderr}");

    let (code, _, stderr) = run_binary(&["check-config", "--config", path_str(&missing)], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(path_str(&missing)), "{stderr}");
}

#[test]
fn check_config_refuses_what_startup_refuses() {
    let dir = TempDir::new();
    let file = dir.write("gw.toml", "[server]\nmax_conections = 5\n");
    let (code, stdout, stderr) = run_binary(&["check-config", "--config", path_str(&file)], &[]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.contains("max_conections"), "{stderr}");
    assert!(stdout.is_empty(), "no configuration printed: {stdout}");
}

/// Runs `check-config` and loads what it printed back through the library,
/// which proves it is a complete, valid configuration file.
fn effective_config(args: &[&str], env: &[(&str, &str)]) -> (roomgate::Config, String, String) {
    let mut all = vec!["check-config"];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = run_binary(&all, env);
    assert_eq!(code, 0, "check-config succeeds: {stderr}");
    let dir = TempDir::new();
    let printed = dir.write("printed.toml", &stdout);
    let loaded = roomgate::Config::load(Some(&printed), Vec::new())
        .unwrap_or_else(|e| panic!("check-config prints a loadable configuration: {e}\n{stdout}"));
    (loaded.config, stdout, stderr)
}

#[test]
fn a_setting_required_by_a_mode_set_from_the_environment_names_that_variable() {
    let stderr = refused_start(&[], &[("ROOMGATE_AUTH_MODE", "jwt")]);
    assert!(stderr.contains("auth.jwt.secret_env:"), "{stderr}");
    assert!(
        stderr.contains("(auth.mode set by ROOMGATE_AUTH_MODE)"),
        "{stderr}"
    );
}

#[test]
fn environment_overrides_win_over_the_file() {
    let dir = TempDir::new();
    let file = dir.write(
        "gw.toml",
        "[websocket]\nmax_message_size_bytes = 1000\nping_interval_secs = 7\n\n\
         [server]\nws_paths = [\"/ws\"]\n",
    );
    let (config, _, _) = effective_config(
        &["--config", path_str(&file)],
        &[
            ("ROOMGATE_WEBSOCKET_MAX_MESSAGE_SIZE_BYTES", "2000"),
            ("ROOMGATE_SERVER_WS_PATHS", "/live, /socket"),
            ("ROOMGATE_WEBSOCKET_ROOMS_MAX_MEMBERS", "50"),
        ],
    );
    assert_eq!(config.websocket.max_message_size_bytes, 2000, "env wins");
    assert_eq!(
        config.websocket.ping_interval_secs, 7,
        "the file's other keys stay"
    );
    assert_eq!(
        config.server.ws_paths,
        vec!["/live", "/socket"],
        "lists split on commas"
    );
    assert_eq!(config.websocket.rooms.max_members, 50, "nested keys");
    assert_eq!(
        config.upstream.timeout_secs, 30,
        "untouched keys keep defaults"
    );
}

#[test]
fn unknown_roomgate_variable_is_warned_about_and_ignored() {
    let (config, _, stderr) = effective_config(
        &[],
        &[
            ("ROOMGATE_WEBSOCKET_PING_INTERVAL", "5"),
            ("ROOMGATE_WEBSOCKET_PONG_TIMEOUT_SECS", "4"),
        ],
    );
    assert!(
        stderr.contains("ROOMGATE_WEBSOCKET_PING_INTERVAL"),
        "a warning names the variable: {stderr}"
    );
    assert!(
        !stderr.contains("ROOMGATE_WEBSOCKET_PONG_TIMEOUT_SECS"),
        "known variables are not warned about: {stderr}"
    );
    assert_eq!(config.websocket.ping_interval_secs, 30, "ignored");
    assert_eq!(config.websocket.pong_timeout_secs, 4);
}

#[test]
fn unknown_roomgate_variable_is_logged_by_the_running_gateway() {
    let mut gateway = GatewayProcess::start(&[], &[("ROOMGATE_NO_SUCH_KEY", "1")]);
    let warned = gateway
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("ROOMGATE_NO_SUCH_KEY") && l.contains("WARN"));
    assert!(warned, "a WARN line names the variable: {:?}", gateway.log);
    gateway.signal("TERM");
    assert_eq!(gateway.wait_exit(), 0);
}

#[test]
fn check_config_prints_the_effective_config_with_nats_secrets_masked() {
    let dir = TempDir::new();
    let file = dir.write(
        "gw.toml",
        "[nats]\nurl = \"nats://app:hunter2@10.0.0.1:4222,nats://10.0.0.2:4222\"\n",
    );
    let (config, stdout, _) = effective_config(&["--config", path_str(&file)], &[]);
    assert!(!stdout.contains("hunter2"), "{stdout}");
    assert!(
        stdout.contains("[websocket.rooms]"),
        "every section: {stdout}"
    );
    assert_eq!(
        config.nats.url,
        "nats://app:***@10.0.0.1:4222,nats://10.0.0.2:4222"
    );

    // A password from the environment, and a token (user info without a
    // password, which NATS treats as the secret itself), each with and
    // without a scheme: the NATS client logs in with either.
    for (url, secret) in [
        ("nats://svc:s3cr3t@127.0.0.1:4222", "s3cr3t"),
        ("nats://t0ken-abc@127.0.0.1:4222", "t0ken-abc"),
        ("svc:s3cr3t@127.0.0.1:4222", "s3cr3t"),
        ("t0ken-abc@127.0.0.1:4222", "t0ken-abc"),
    ] {
        let (config, stdout, stderr) = effective_config(&[], &[("ROOMGATE_NATS_URL", url)]);
        assert!(!stdout.contains(secret), "{url}: {stdout}");
        assert!(!stderr.contains(secret), "{url}: {stderr}");
        assert!(
            config.nats.url.ends_with("@127.0.0.1:4222"),
            "{}",
            config.nats.url
        );
    }
}

/// NATS is enabled for these: what is checked is what `[nats]` refers to.
const WITH_NATS: (&str, &str) = ("ROOMGATE_NATS_ENABLED", "true");

#[test]
fn a_missing_creds_file_is_refused_by_check_config_as_by_startup() {
    let dir = TempDir::new();
    let missing = dir.path().join("nope.creds");
    let creds = ("ROOMGATE_NATS_CREDS_FILE", path_str(&missing));
    let (code, stdout, stderr) = run_binary(&["check-config"], &[WITH_NATS, creds]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.contains("nats.creds_file"), "{stderr}");
    assert!(stderr.contains(path_str(&missing)), "{stderr}");
    assert!(stdout.is_empty(), "no configuration printed: {stdout}");

    let stderr = refused_start(&[], &[WITH_NATS, creds]);
    assert!(stderr.contains("nats.creds_file"), "{stderr}");

    // A file that is not a credentials file, likewise.
    let garbage = dir.write("garbage.creds", "not a credentials file\n");
    let creds = ("ROOMGATE_NATS_CREDS_FILE", path_str(&garbage));
    let (code, _, stderr) = run_binary(&["check-config"], &[WITH_NATS, creds]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("nats.creds_file"), "{stderr}");
}

#[test]
fn different_credentials_in_the_server_list_are_refused_unshown() {
    let url = (
        "ROOMGATE_NATS_URL",
        "nats://alice:s3cr3t-one@127.0.0.1:4222,nats://bob:s3cr3t-two@127.0.0.1:4223",
    );
    let (code, stdout, stderr) = run_binary(&["check-config"], &[WITH_NATS, url]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.contains("nats.url"), "{stderr}");
    assert!(!stderr.contains("s3cr3t"), "{stderr}");
    assert!(stdout.is_empty(), "no configuration printed: {stdout}");

    let stderr = refused_start(&[], &[WITH_NATS, url]);
    assert!(stderr.contains("nats.url"), "{stderr}");
    assert!(!stderr.contains("s3cr3t"), "{stderr}");

    // The same login twice, or once with URLs that have none: one login.
    let url = (
        "ROOMGATE_NATS_URL",
        "nats://alice:s3cr3t@127.0.0.1:4222,nats://alice:s3cr3t@127.0.0.1:4223,nats://127.0.0.1:4224",
    );
    let (config, stdout, _) = effective_config(&[], &[WITH_NATS, url]);
    assert!(!stdout.contains("s3cr3t"), "{stdout}");
    assert_eq!(
        config.nats.url,
        "nats://alice:***@127.0.0.1:4222,nats://alice:***@127.0.0.1:4223,nats://127.0.0.1:4224"
    );
}

#[test]
fn a_nats_secret_the_url_parser_would_cut_short_is_refused_unshown() {
    // A `#` or `?` would end the user info for the URL parser, which would
    // take the rest of the secret for the host; a `,` cuts the list.
    for url in [
        "nats://TOPSECRET#tok@127.0.0.1:4222",
        "nats://app:TOP?SECRET@127.0.0.1:4222",
        "nats://app:TOPSECRET1,TOPSECRET2@127.0.0.1:4222",
    ] {
        let (code, stdout, stderr) =
            run_binary(&["check-config"], &[WITH_NATS, ("ROOMGATE_NATS_URL", url)]);
        assert_eq!(code, 2, "{url}: {stdout}{stderr}");
        assert!(stderr.contains("nats.url"), "{url}: {stderr}");
        assert!(!stderr.contains("TOPSECRET"), "{url}: {stderr}");
        assert!(
            stdout.is_empty(),
            "{url}: no configuration printed: {stdout}"
        );
    }
    // A syntax error on the line of a login names the line, not its text.
    let dir = TempDir::new();
    let file = dir.write(
        "gw.toml",
        "[nats]\nurl = \"nats://app:TOPSECRET@10.0.0.1:4222\n",
    );
    let (code, _, stderr) = run_binary(&["check-config", "--config", path_str(&file)], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(!stderr.contains("TOPSECRET"), "{stderr}");
}

#[test]
fn check_config_with_no_file_prints_the_defaults() {
    let (config, _, _) = effective_config(&[], &[]);
    assert_eq!(config, roomgate::Config::default());
}

#[tokio::test]
async fn the_running_gateway_applies_environment_overrides() {
    // The file allows big messages; the environment lowers the limit, and
    // the running gateway enforces the environment's value.
    let dir = TempDir::new();
    let file = dir.write("gw.toml", "[websocket]\nmax_message_size_bytes = 1000000\n");
    let mut gateway = GatewayProcess::start(
        &["--config", path_str(&file)],
        &[("ROOMGATE_WEBSOCKET_MAX_MESSAGE_SIZE_BYTES", "1024")],
    );
    let mut client = WsClient::connect(&format!("ws://{}/ws", gateway.addr)).await;
    client
        .send(json!({"type": "join", "room": "r", "pad": "x".repeat(4000)}))
        .await;
    assert_eq!(client.recv_close().await, Some(1009));
    gateway.signal("TERM");
    assert_eq!(gateway.wait_exit(), 0);
}

// ----- logs -------------------------------------------------------------

/// Whether any field of `line`, at any depth, is the string `id`.
fn carries(line: &Value, id: &str) -> bool {
    match line {
        Value::String(s) => s == id,
        Value::Array(items) => items.iter().any(|v| carries(v, id)),
        Value::Object(map) => map.values().any(|v| carries(v, id)),
        _ => false,
    }
}

#[tokio::test]
async fn json_logs_carry_the_connection_id() {
    let mut gateway = GatewayProcess::start(
        &[],
        &[
            ("ROOMGATE_LOG_FORMAT", "json"),
            ("ROOMGATE_LOG_LEVEL", "debug"),
        ],
    );
    let url = format!("ws://{}/ws", gateway.addr);
    let mut a = WsClient::connect(&url).await;
    let mut b = WsClient::connect(&url).await;
    a.ws.close(None).await.expect("close a");
    b.ws.close(None).await.expect("close b");
    let _ = a.recv_close().await;
    let _ = b.recv_close().await;

    for (client, other) in [(&a, &b), (&b, &a)] {
        let what = format!("the open and close lines of {}", client.id);
        within(&what, async {
            loop {
                let lines = gateway.json_lines();
                let mine: Vec<&Value> = lines.iter().filter(|l| carries(l, &client.id)).collect();
                let has = |message: &str| mine.iter().any(|l| l["message"] == message);
                if has("connection opened") && has("connection closed") {
                    assert!(
                        mine.iter().all(|l| !carries(l, &other.id)),
                        "a line never carries another connection's id: {mine:?}"
                    );
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    for line in gateway.json_lines() {
        if line["message"] == "connection opened" {
            assert!(
                carries(&line, &a.id) || carries(&line, &b.id),
                "every connection line names its connection: {line}"
            );
        }
    }
    gateway.signal("TERM");
    assert_eq!(gateway.wait_exit(), 0);
}

/// The access lines a gateway logged so far.
fn access_lines(gateway: &GatewayProcess) -> Vec<Value> {
    gateway
        .json_lines()
        .into_iter()
        .filter(|l| l["target"] == "roomgate::access")
        .collect()
}

/// Sends a proxied request with a secret in its query, a request the
/// gateway answers itself, and a WebSocket upgrade; returns once the
/// WebSocket is open.
async fn three_requests(gateway: &GatewayProcess) -> WsClient {
    let (status, body) = http_get(gateway.addr, "/hello?token=s3cret").await;
    assert_eq!((status, body.as_str()), (200, "hi"));
    let mut raw = sent_raw(gateway.addr, "GET /ws HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let (status, _) = within("the plain GET of /ws", read_response_head(&mut raw)).await;
    assert_eq!(status, 400, "a plain GET of the WebSocket path");
    WsClient::connect(&format!("ws://{}/ws", gateway.addr)).await
}

#[tokio::test]
async fn the_access_log_is_off_by_default_and_names_each_request_without_its_query() {
    let slow_arrived = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let arrived = slow_arrived.clone();
    let upstream = Upstream::start(move |request: hyper::Request<hyper::body::Incoming>| {
        let arrived = arrived.clone();
        async move {
            if request.uri().path() == "/slow" {
                arrived.store(true, std::sync::atomic::Ordering::SeqCst);
                // Longer than the test waits for the client to give up.
                tokio::time::sleep(std::time::Duration::from_secs(20)).await;
            }
            hyper::Response::new(full("hi"))
        }
    })
    .await;
    let url = upstream.url();
    let mut on = GatewayProcess::start(
        &[],
        &[
            ("ROOMGATE_UPSTREAM_URL", &url),
            ("ROOMGATE_LOG_LEVEL", "info,roomgate::access=debug"),
        ],
    );
    let mut off = GatewayProcess::start(&[], &[("ROOMGATE_UPSTREAM_URL", &url)]);
    let client_on = three_requests(&on).await;
    let client_off = three_requests(&off).await;
    // A client that goes away before its answer: nginx's 499.
    let gone = sent_raw(on.addr, "GET /slow HTTP/1.1\r\nHost: a\r\n\r\n").await;
    eventually("the upstream to get the slow request", || {
        slow_arrived.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    drop(gone);

    eventually("four access lines", || access_lines(&on).len() >= 4).await;
    let lines = access_lines(&on);
    let seen: Vec<(&str, &str, u64)> = lines
        .iter()
        .map(|l| {
            (
                l["method"].as_str().unwrap_or_default(),
                l["path"].as_str().unwrap_or_default(),
                l["status"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("GET", "/hello", 200),
            ("GET", "/ws", 400),
            ("GET", "/ws", 101),
            ("GET", "/slow", 499)
        ],
        "{lines:?}"
    );
    for line in &lines {
        assert_eq!(line["level"], "DEBUG", "{line}");
        assert!(
            line["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with("127.0.0.1:")),
            "{line}"
        );
        assert!(line["duration_us"].is_u64(), "{line}");
    }
    let everything = on.log.lock().unwrap().join("\n");
    assert!(
        !everything.contains("s3cret"),
        "no query is logged: {everything}"
    );
    assert!(
        on.json_lines()
            .iter()
            .all(|l| l["level"] != "DEBUG" || l["target"] == "roomgate::access"),
        "the directive turns on the access lines alone"
    );

    // The other gateway answered the same requests. Lines are read in the
    // order they were written, so once its last line (written at exit)
    // is in, any access line would be too.
    drop((client_on, client_off));
    for gateway in [&mut on, &mut off] {
        gateway.signal("TERM");
        assert_eq!(gateway.wait_exit(), 0);
    }
    eventually("the last line of the gateway without access log", || {
        off.json_lines()
            .iter()
            .any(|l| l["message"] == "roomgate stopped")
    })
    .await;
    assert!(access_lines(&off).is_empty(), "{:?}", off.json_lines());
}

#[tokio::test]
async fn running_out_of_file_descriptors_does_not_stop_the_gateway() {
    // With 64 descriptors, 100 idle TCP connections leave the gateway
    // unable to accept: it must wait, not exit or spin, and serve again as
    // soon as descriptors are free.
    let gateway = GatewayProcess::start_with_file_limit(&[], &[], 64);
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(
            within("connect", tokio::net::TcpStream::connect(gateway.addr))
                .await
                .expect("the kernel completes the connection"),
        );
    }
    eventually("the gateway to run out of descriptors", || {
        gateway
            .json_lines()
            .iter()
            .any(|line| line["message"] == "accept failed")
    })
    .await;

    drop(held);
    let mut client = WsClient::connect(&format!("ws://{}/ws", gateway.addr)).await;
    client.join("after").await;
    let (status, _) = http_get(gateway.admin, "/readyz").await;
    assert_eq!(status, 200);
}

/// Every key of SPEC §5, by the environment variable the SPEC names for it,
/// each set to a value other than its default, and the value
/// `check-config` must then print (TOML).
const EVERY_OVERRIDE: [(&str, &str, &str); 37] = [
    (
        "ROOMGATE_SERVER_LISTEN",
        "127.0.0.1:18001",
        r#""127.0.0.1:18001""#,
    ),
    (
        "ROOMGATE_SERVER_WS_PATHS",
        "/live, /ws2",
        r#"["/live", "/ws2"]"#,
    ),
    ("ROOMGATE_SERVER_MAX_CONNECTIONS", "77", "77"),
    ("ROOMGATE_SERVER_SHUTDOWN_GRACE_SECS", "3", "3"),
    (
        "ROOMGATE_ADMIN_LISTEN",
        "127.0.0.1:18002",
        r#""127.0.0.1:18002""#,
    ),
    (
        "ROOMGATE_UPSTREAM_URL",
        "http://127.0.0.1:18003",
        r#""http://127.0.0.1:18003""#,
    ),
    ("ROOMGATE_UPSTREAM_CONNECT_TIMEOUT_SECS", "2", "2"),
    ("ROOMGATE_UPSTREAM_TIMEOUT_SECS", "9", "9"),
    ("ROOMGATE_WEBSOCKET_MAX_MESSAGE_SIZE_BYTES", "1234", "1234"),
    ("ROOMGATE_WEBSOCKET_PING_INTERVAL_SECS", "11", "11"),
    ("ROOMGATE_WEBSOCKET_PONG_TIMEOUT_SECS", "4", "4"),
    ("ROOMGATE_WEBSOCKET_SEND_QUEUE_CAPACITY", "33", "33"),
    ("ROOMGATE_WEBSOCKET_SLOW_CONSUMER", "drop", r#""drop""#),
    ("ROOMGATE_WEBSOCKET_MAX_MESSAGES_PER_SEC", "5", "5"),
    ("ROOMGATE_WEBSOCKET_ROOMS_ENABLED", "false", "false"),
    ("ROOMGATE_WEBSOCKET_ROOMS_MAX_MEMBERS", "12", "12"),
    (
        "ROOMGATE_WEBSOCKET_ROOMS_MAX_ROOMS_PER_CONNECTION",
        "3",
        "3",
    ),
    ("ROOMGATE_WEBSOCKET_ROOMS_IDLE_TIMEOUT_SECS", "0", "0"),
    ("ROOMGATE_WEBSOCKET_ROOMS_CLIENT_BROADCAST", "yes", "true"),
    ("ROOMGATE_WEBSOCKET_ROOMS_PRESENCE", "true", "true"),
    // Off, so that the creds file below is not read; the two settings that
    // need NATS keep their defaults here, and their variables are checked
    // by the test after this one.
    ("ROOMGATE_NATS_ENABLED", "false", "false"),
    (
        "ROOMGATE_NATS_URL",
        "nats://127.0.0.1:18004",
        r#""nats://127.0.0.1:18004""#,
    ),
    (
        "ROOMGATE_NATS_CREDS_FILE",
        "/etc/app.creds",
        r#""/etc/app.creds""#,
    ),
    ("ROOMGATE_NATS_SUBJECT_PREFIX", "rg2", r#""rg2""#),
    ("ROOMGATE_NATS_REQUIRED", "off", "false"),
    ("ROOMGATE_AUTH_MODE", "jwt", r#""jwt""#),
    (
        "ROOMGATE_AUTH_ALLOWED_ORIGINS",
        "https://a.test, https://b.test",
        r#"["https://a.test", "https://b.test"]"#,
    ),
    ("ROOMGATE_AUTH_JWT_ALGORITHM", "HS256", r#""HS256""#),
    (
        "ROOMGATE_AUTH_JWT_SECRET_ENV",
        "RG_ENV_TEST_SECRET",
        r#""RG_ENV_TEST_SECRET""#,
    ),
    (
        "ROOMGATE_AUTH_JWT_PUBLIC_KEY_FILE",
        "/etc/unused.pem",
        r#""/etc/unused.pem""#,
    ),
    ("ROOMGATE_AUTH_JWT_COOKIE", "tok", r#""tok""#),
    ("ROOMGATE_AUTH_JWT_ISSUER", "iss1", r#""iss1""#),
    ("ROOMGATE_AUTH_JWT_AUDIENCE", "aud1", r#""aud1""#),
    ("ROOMGATE_AUTH_UPSTREAM_PATH", "/check", r#""/check""#),
    ("ROOMGATE_AUTH_UPSTREAM_TIMEOUT_SECS", "6", "6"),
    ("ROOMGATE_LOG_LEVEL", "debug", r#""debug""#),
    ("ROOMGATE_LOG_FORMAT", "json", r#""json""#),
];

#[test]
fn every_key_of_the_spec_is_set_by_the_variable_the_spec_names() {
    let mut env: Vec<(&str, &str)> = EVERY_OVERRIDE
        .iter()
        .map(|(var, raw, _)| (*var, *raw))
        .collect();
    env.push(("RG_ENV_TEST_SECRET", "s3cret"));
    let (code, stdout, stderr) = run_binary(&["check-config"], &env);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !stderr.contains("ignoring"),
        "every variable matches a key: {stderr}"
    );
    let printed: toml::Table = stdout.parse().expect("TOML");

    let leaves = toml_leaves(&printed);
    assert_eq!(
        leaves.len(),
        EVERY_OVERRIDE.len(),
        "the SPEC's keys, no more: {leaves:?}"
    );
    for (path, value) in leaves {
        let var = format!("ROOMGATE_{}", path.replace('.', "_").to_uppercase());
        let (_, _, expected) = EVERY_OVERRIDE
            .iter()
            .find(|(v, _, _)| *v == var)
            .unwrap_or_else(|| panic!("{path} has no override in the SPEC's list"));
        let expected: toml::Table = format!("v = {expected}").parse().expect("expected TOML");
        assert_eq!(Some(&value), expected.get("v"), "{var} sets {path}");
    }
}

#[test]
fn nats_is_turned_off_from_the_environment_but_not_under_settings_that_need_it() {
    let (code, stdout, stderr) = run_binary(&["check-config"], &[("ROOMGATE_NATS_ENABLED", "off")]);
    assert_eq!(code, 0, "{stderr}");
    let printed: toml::Table = stdout.parse().expect("TOML");
    assert_eq!(printed["nats"]["enabled"], toml::Value::Boolean(false));
    for (var, key) in [
        ("ROOMGATE_NATS_REQUIRED", "nats.required"),
        (
            "ROOMGATE_WEBSOCKET_ROOMS_CLIENT_BROADCAST",
            "websocket.rooms.client_broadcast",
        ),
    ] {
        let value = if key == "nats.required" {
            "true"
        } else {
            "false"
        };
        let env = [("ROOMGATE_NATS_ENABLED", "false"), (var, value)];
        let (code, _, stderr) = run_binary(&["check-config"], &env);
        assert_eq!(code, 2, "{var}={value}: {stderr}");
        assert!(stderr.contains(key), "{stderr}");
    }
}

#[test]
fn environment_values_that_are_not_utf8_are_skipped_or_refused_never_shown() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let safe = SAFE.map(|(k, v)| (OsStr::new(k), OsStr::new(v)));
    // No key reads an unrelated variable: the gateway starts.
    let mut env = safe.to_vec();
    env.push((
        OsStr::new("UNRELATED"),
        OsStr::from_bytes(b"caf\xe9-password"),
    ));
    let (code, _, stderr) = run_binary_os(&["check-config"], &env);
    assert_eq!(code, 0, "{stderr}");
    // A `ROOMGATE_` name that is not UTF-8 matches no key: warned about,
    // like any other, and ignored.
    let mut env = safe.to_vec();
    env.push((OsStr::from_bytes(b"ROOMGATE_CAF\xc9"), OsStr::new("1")));
    let (code, _, stderr) = run_binary_os(&["check-config"], &env);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("ignoring ROOMGATE_CAF\u{fffd}: it matches no configuration key"),
        "{stderr}"
    );
    // So does a misspelt name whose value is not UTF-8, unshown.
    let mut env = safe.to_vec();
    env.push((
        OsStr::new("ROOMGATE_UPSTREAM_ULR"),
        OsStr::from_bytes(b"caf\xe9"),
    ));
    let (code, _, stderr) = run_binary_os(&["check-config"], &env);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("ignoring ROOMGATE_UPSTREAM_ULR: it matches no configuration key"),
        "{stderr}"
    );
    assert!(!stderr.contains("caf"), "the value is not shown: {stderr}");
    // A roomgate variable is refused by name, its value unshown.
    let mut env = safe.to_vec();
    env.push((
        OsStr::new("ROOMGATE_UPSTREAM_URL"),
        OsStr::from_bytes(b"http://user:caf\xe9@127.0.0.1:3000"),
    ));
    let (code, _, stderr) = run_binary_os(&[], &env);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("ROOMGATE_UPSTREAM_URL"), "{stderr}");
    assert!(!stderr.contains("caf"), "the value is not shown: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The HS256 secret is read as bytes, and its variable may be named
    // like an override without being one.
    let mut env = safe.to_vec();
    env.extend([
        (OsStr::new("ROOMGATE_AUTH_MODE"), OsStr::new("jwt")),
        (
            OsStr::new("ROOMGATE_AUTH_JWT_SECRET_ENV"),
            OsStr::new("ROOMGATE_JWT_SECRET"),
        ),
        (
            OsStr::new("ROOMGATE_JWT_SECRET"),
            OsStr::from_bytes(b"\xff\x01 a binary secret"),
        ),
    ]);
    let (code, _, stderr) = run_binary_os(&["check-config"], &env);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn an_empty_environment_override_is_refused_not_taken_as_off() {
    // An unset template variable must not turn off what the file sets.
    for (var, value, key) in [
        ("ROOMGATE_AUTH_ALLOWED_ORIGINS", "", "auth.allowed_origins"),
        (
            "ROOMGATE_AUTH_ALLOWED_ORIGINS",
            " , ",
            "auth.allowed_origins",
        ),
        ("ROOMGATE_AUTH_JWT_ISSUER", " ", "auth.jwt.issuer"),
        ("ROOMGATE_UPSTREAM_URL", "", "upstream.url"),
    ] {
        let stderr = refused_start(&[], &[(var, value)]);
        assert!(stderr.contains(var), "{var}={value:?}: {stderr}");
        assert!(stderr.contains(key), "{var}={value:?}: {stderr}");
        assert!(stderr.contains("empty"), "{var}={value:?}: {stderr}");
    }
}
