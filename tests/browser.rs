//! The chat demo end to end in a real browser: headless Chromium opens the
//! page twice through the gateway (which proxies it from the example
//! upstream app), both tabs join a room over the gateway's `/ws`, see each
//! other's presence and exchange messages.
//!
//! Chromium is driven through ChromeDriver's WebDriver HTTP API on a
//! loopback port by the small client below. Both come from Debian's
//! `chromium` and `chromium-driver` packages (`./scripts/test.sh` installs
//! them when missing). Every wait is bounded.

mod common;

// The example upstream app, compiled into this test so it runs in-process
// (its `main` is unused here).
#[allow(dead_code)]
#[path = "../examples/chat_upstream.rs"]
mod chat_upstream;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use hyper::{Method, Request};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Starting a browser is the slowest step, and the machine may be busy.
const BROWSER_START: Duration = Duration::from_secs(60);

/// The element key of the W3C WebDriver protocol.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tabs_chat_through_the_gateway() {
    let driver = ChromeDriver::start();

    // The example upstream app serving examples/chat/, and a gateway in
    // front of it with presence on (as in the Compose demo).
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream_addr = listener.local_addr().expect("addr");
    let (stop_upstream, upstream_stopped) = tokio::sync::oneshot::channel::<()>();
    let upstream = tokio::spawn(chat_upstream::serve(
        listener,
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/chat"),
        async move {
            let _ = upstream_stopped.await;
        },
    ));
    let gw = TestGateway::with(|c| {
        c.upstream.url = format!("http://{upstream_addr}");
        c.websocket.rooms.presence = true;
    })
    .await;
    let page = format!("http://{}/?room=lobby", gw.addr);

    let alice = driver.browser().await;
    let bob = driver.browser().await;
    let alice_id = alice.join(&page, "alice").await;
    let bob_id = bob.join(&page, "bob").await;
    assert_ne!(alice_id, bob_id);

    // Presence: alice, already in the room, sees bob arrive.
    alice
        .wait_for(
            "bob in alice's member list (presence join)",
            "return document.querySelector(`#members li[data-id=\"${arguments[0]}\"]`) !== null",
            json!([bob_id]),
        )
        .await;

    // alice speaks; bob sees it, and alice's line is acknowledged.
    alice.say("Hello from alice").await;
    bob.wait_for_line("alice", "Hello from alice").await;
    alice
        .wait_for(
            "alice's message to be acknowledged",
            "const mine = document.querySelectorAll('#log li.mine'); \
             return mine.length === 1 && !mine[0].classList.contains('pending') \
                 && !mine[0].classList.contains('failed')",
            json!([]),
        )
        .await;
    // bob learned alice's name from her message.
    bob.wait_for(
        "alice by name in bob's member list",
        "const li = document.querySelector(`#members li[data-id=\"${arguments[0]}\"]`); \
         return li !== null && li.textContent === 'alice'",
        json!([alice_id]),
    )
    .await;

    // And the other way round, with text that must not become markup.
    bob.say("<b>hi</b> alice").await;
    alice.wait_for_line("bob", "<b>hi</b> alice").await;
    let bold = alice
        .eval(
            "return document.querySelectorAll('#log b').length",
            json!([]),
        )
        .await;
    assert_eq!(bold, json!(0), "message text is shown as text");

    // Neither page saw an error frame.
    for (who, browser) in [("alice", &alice), ("bob", &bob)] {
        let errors = browser
            .eval(
                "return [...document.querySelectorAll('#log li.error')].map(li => li.textContent)",
                json!([]),
            )
            .await;
        assert_eq!(errors, json!([]), "{who}'s page logged errors");
    }

    // bob closes his tab: alice sees him leave.
    bob.quit().await;
    alice
        .wait_for(
            "bob gone from alice's member list (presence leave)",
            "return document.querySelector(`#members li[data-id=\"${arguments[0]}\"]`) === null",
            json!([bob_id]),
        )
        .await;
    alice.quit().await;

    // The page and its script and style came through the gateway's proxy.
    let proxied = gw
        .metric("roomgate_proxy_requests_total{code=\"200\"}")
        .await;
    assert!(proxied >= 6.0, "2 pages x 3 files proxied, got {proxied}");

    gw.stop().await;
    let _ = stop_upstream.send(());
    within("upstream to stop", upstream)
        .await
        .expect("upstream task");
}

// ----- a minimal WebDriver client ---------------------------------------

/// A `chromedriver` process on a free loopback port, in its own process
/// group so that dropping it also ends any browser it started.
struct ChromeDriver {
    child: Child,
    port: u16,
    /// Holds the browser profiles.
    dir: PathBuf,
}

impl ChromeDriver {
    fn start() -> Self {
        for path in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: the browser test needs Debian's chromium and chromium-driver. \
                 Install them (`apt-get install -y chromium chromium-driver`) or run \
                 ./scripts/test.sh, which does."
            );
        }
        let dir = std::env::temp_dir().join(format!("roomgate-browser-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn chromedriver");
        // Owned first, so that a panic in the wait kills it on the way out.
        let driver = Self { child, port, dir };
        wait_for_port(port);
        driver
    }

    /// Starts a headless browser with a fresh profile.
    async fn browser(&self) -> Browser {
        let profile = self.dir.join(uuid::Uuid::new_v4().to_string());
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--no-proxy-server",
            "--window-size=1000,800",
            &format!("--user-data-dir={}", profile.display()),
        ];
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": {
                    "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
                    "timeouts": { "pageLoad": 20_000, "script": 10_000 },
                }
            }
        });
        let value = webdriver(
            self.port,
            Method::POST,
            "/session",
            Some(capabilities),
            BROWSER_START,
        )
        .await;
        let session = value["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("new session without an id: {value}"))
            .to_string();
        Browser {
            port: self.port,
            session,
        }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // The whole group: chromedriver and the browsers it started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One browser window, driven through its WebDriver session.
struct Browser {
    port: u16,
    session: String,
}

impl Browser {
    /// Calls a session command and returns its `value`.
    async fn call(&self, method: Method, command: &str, body: Value) -> Value {
        let path = format!("/session/{}{command}", self.session);
        let body = (method != Method::GET).then_some(body);
        webdriver(self.port, method, &path, body, WAIT).await
    }

    /// Runs `script` (a function body; arguments in `arguments`) in the page.
    async fn eval(&self, script: &str, args: Value) -> Value {
        self.call(
            Method::POST,
            "/execute/sync",
            json!({ "script": script, "args": args }),
        )
        .await
    }

    /// Polls `script` until it returns something truthy, for at most `WAIT`.
    async fn wait_for(&self, what: &str, script: &str, args: Value) -> Value {
        within(what, async {
            loop {
                let value = self.eval(script, args.clone()).await;
                if !matches!(value, Value::Null | Value::Bool(false))
                    && value != json!("")
                    && value != json!(0)
                {
                    return value;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
    }

    async fn element(&self, css: &str) -> String {
        let value = self
            .call(
                Method::POST,
                "/element",
                json!({ "using": "css selector", "value": css }),
            )
            .await;
        value[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {value}"))
            .to_string()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let element = self.element(css).await;
        self.call(
            Method::POST,
            &format!("/element/{element}/clear"),
            json!({}),
        )
        .await;
        self.call(
            Method::POST,
            &format!("/element/{element}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let element = self.element(css).await;
        self.call(
            Method::POST,
            &format!("/element/{element}/click"),
            json!({}),
        )
        .await;
    }

    /// Opens the page, joins its room as `name` and returns the connection id.
    async fn join(&self, page: &str, name: &str) -> String {
        self.call(Method::POST, "/url", json!({ "url": page }))
            .await;
        let title = self.call(Method::GET, "/title", Value::Null).await;
        assert_eq!(title, json!("roomgate chat"), "the page came through");
        self.wait_for(
            &format!("{name}'s page to connect"),
            "return document.body.dataset.state === 'connected'",
            json!([]),
        )
        .await;
        self.type_into("#name", name).await;
        self.click("#join").await;
        self.wait_for(
            &format!("{name} to join the room"),
            "return document.body.dataset.state === 'joined'",
            json!([]),
        )
        .await;
        let id = self
            .eval("return document.body.dataset.connectionId", json!([]))
            .await;
        id.as_str().expect("connection id").to_string()
    }

    async fn say(&self, text: &str) {
        self.type_into("#text", text).await;
        self.click("#send").await;
    }

    /// Waits for a message line from `who` saying `text`.
    async fn wait_for_line(&self, who: &str, text: &str) {
        self.wait_for(
            &format!("the message {text:?} from {who}"),
            "return [...document.querySelectorAll('#log li.message')].some(li => \
                 li.querySelector('.who')?.textContent === arguments[0] \
                 && li.querySelector('.text')?.textContent === arguments[1])",
            json!([who, text]),
        )
        .await;
    }

    /// Ends the session, closing the browser.
    async fn quit(self) {
        let path = format!("/session/{}", self.session);
        webdriver(self.port, Method::DELETE, &path, None, WAIT).await;
    }
}

/// One WebDriver request on a fresh connection; returns the reply's `value`
/// and panics with the driver's error message on failure.
async fn webdriver(
    port: u16,
    method: Method,
    path: &str,
    body: Option<Value>,
    limit: Duration,
) -> Value {
    let exchange = async {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to chromedriver");
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("HTTP handshake with chromedriver");
        tokio::spawn(conn);
        let mut request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header("host", format!("127.0.0.1:{port}"));
        let body = match &body {
            Some(value) => {
                request = request.header("content-type", "application/json; charset=utf-8");
                full(value.to_string())
            }
            None => empty(),
        };
        let response = sender
            .send_request(request.body(body).expect("request"))
            .await
            .expect("chromedriver response");
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("chromedriver body")
            .to_bytes();
        (status, bytes)
    };
    let (status, bytes) = match tokio::time::timeout(limit, exchange).await {
        Ok(reply) => reply,
        Err(_) => panic!("WebDriver {method} {path}: no answer within {limit:?}"),
    };
    let reply: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "WebDriver {method} {path}: {status} with a body that is not JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    assert!(
        status.is_success(),
        "WebDriver {method} {path}: {status}: {}",
        reply["value"]
    );
    reply["value"].clone()
}
