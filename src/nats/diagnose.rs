//! Why NATS cannot be reached. async-nats retries its first connection
//! in the background and says why it fails only at debug level (an "IO
//! error" for a refused connection or a failed TLS handshake), so when the
//! gateway says NATS is not reachable it looks for itself: a TCP
//! connection to each configured server, and a look at the first line the
//! server sends (twice, for a server whose greeting explains nothing). A
//! NATS server greets every client with an `INFO` line, which also says
//! whether it requires TLS or a login.

use std::time::Duration;

use async_nats::ServerAddr;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpStream;

use super::client::{CONNECT_TIMEOUT, RECONNECT_DELAY_MAX};

/// How long each step of a look (connecting, the greeting) may take.
const STEP: Duration = Duration::from_secs(2);

/// The most of a greeting that is read: a NATS `INFO` line is a few
/// hundred bytes, longer with a cluster's URLs.
const GREETING_MAX: u64 = 8 * 1024;

/// Where a server is, as the client was told.
#[derive(Clone)]
pub(super) struct Target {
    host: String,
    port: u16,
    /// The URL asks for TLS (`tls://`).
    tls: bool,
}

impl Target {
    /// The target of `addr`; a WebSocket URL is looked at as TCP.
    pub(super) fn of(addr: &ServerAddr) -> Self {
        Self {
            host: addr.host().to_string(),
            port: addr.port(),
            tls: addr.tls_required(),
        }
    }
}

impl std::fmt::Display for Target {
    /// `host:port`, an IPv6 address in brackets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// How long the client may take, at most, to come back to one server of
/// its list: it waits up to [`RECONNECT_DELAY_MAX`] before each attempt,
/// and an attempt takes up to [`CONNECT_TIMEOUT`].
const ROUND_PER_SERVER: Duration = RECONNECT_DELAY_MAX.saturating_add(CONNECT_TIMEOUT);

/// How long a server that answers with nothing to object to is given
/// before it is looked at again: one round of the client's attempts over
/// `servers` configured servers, and a little more.
fn settle(servers: usize) -> Duration {
    let servers = u32::try_from(servers.max(1)).unwrap_or(u32::MAX);
    ROUND_PER_SERVER.saturating_mul(servers) + Duration::from_millis(500)
}

/// One line naming, for each target, what was found there. The targets
/// are looked at together, so a look takes two steps at most. A server
/// that answers as any NATS server does was most likely just restarted,
/// and the client will be connected to it at its next attempt: it is
/// looked at again once the client has had a round of attempts
/// ([`settle`]); the caller, which drops the look as soon as the client
/// is connected, then has nothing to say. Servers the client learns of
/// from the cluster are not counted in that round.
pub(super) async fn why_unreachable(targets: Vec<Target>) -> String {
    let found = look_all(&targets).await;
    if !found.iter().any(|found| matches!(found, Found::Answers)) {
        return describe(&targets, &found);
    }
    tokio::time::sleep(settle(targets.len())).await;
    describe(&targets, &look_all(&targets).await)
}

/// What is at each target, looked at together.
async fn look_all(targets: &[Target]) -> Vec<Found> {
    futures_util::future::join_all(targets.iter().map(look)).await
}

/// `host:port: what was found` for each target.
fn describe(targets: &[Target], found: &[Found]) -> String {
    targets
        .iter()
        .zip(found)
        .map(|(target, found)| format!("{target}: {found}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What a look found at one target.
enum Found {
    /// A NATS server with nothing in its greeting to explain a failure.
    Answers,
    /// Anything else, said for an operator.
    Other(String),
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Answers => f.write_str(
                "a NATS server answers, and the client has not connected to it since it was \
                 looked at last: it may refuse the client (at its connection limit?), see its \
                 log",
            ),
            Self::Other(text) => f.write_str(text),
        }
    }
}

/// What is at `target`.
async fn look(target: &Target) -> Found {
    let connect = TcpStream::connect((target.host.as_str(), target.port));
    let stream = match tokio::time::timeout(STEP, connect).await {
        Err(_) => return Found::Other(format!("no answer to connect within {STEP:?}")),
        Ok(Err(e)) => return Found::Other(format!("cannot connect ({e})")),
        Ok(Ok(stream)) => stream,
    };
    // The first line, or GREETING_MAX bytes, or what came before the end.
    let mut first_line = BufReader::new(stream.take(GREETING_MAX));
    let mut greeting = Vec::with_capacity(1024);
    let read = tokio::time::timeout(STEP, first_line.read_until(b'\n', &mut greeting)).await;
    match read {
        Err(_) if greeting.is_empty() => Found::Other(format!(
            "accepts connections but sends no greeting within {STEP:?}: not a NATS server, \
             or one that expects TLS first"
        )),
        Ok(Err(e)) if greeting.is_empty() => Found::Other(format!("the connection failed ({e})")),
        _ => classify(&greeting, target.tls),
    }
}

/// What a server's first bytes say about why the client is not connected.
fn classify(greeting: &[u8], url_asks_tls: bool) -> Found {
    if greeting.is_empty() {
        return Found::Other("closes the connection without a greeting: not a NATS server?".into());
    }
    let Some(info) = greeting
        .strip_prefix(b"INFO ")
        .and_then(|rest| serde_json::from_slice::<serde_json::Value>(line(rest)).ok())
    else {
        let start = &greeting[..greeting.len().min(40)];
        return Found::Other(format!(
            "answers, but not as a NATS server (it sent \"{}\")",
            start.escape_ascii()
        ));
    };
    let flag = |name: &str| info[name].as_bool().unwrap_or(false);
    let tls = flag("tls_required") || (url_asks_tls && flag("tls_available"));
    let login = flag("auth_required");
    let what = match (tls, login) {
        (true, true) => {
            "a NATS server that requires TLS and a login: the TLS handshake failed \
             (does this system trust the server's certificate?) or the login was \
             refused (check the credentials in nats.url or nats.creds_file)"
        }
        (true, false) => {
            "a NATS server with TLS; the client could not complete the handshake \
             (does this system trust the server's certificate?)"
        }
        _ if url_asks_tls => "a NATS server without TLS, but the URL asks for it (tls://)",
        (false, true) => {
            "a NATS server that requires a login: check the credentials in \
             nats.url or nats.creds_file (the server's log names what it refused)"
        }
        (false, false) => return Found::Answers,
    };
    Found::Other(what.into())
}

/// `bytes` up to the end of its first line.
fn line(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(bytes.len());
    &bytes[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the warning says of a server that sent `greeting`.
    fn says(greeting: &[u8], url_asks_tls: bool) -> String {
        classify(greeting, url_asks_tls).to_string()
    }

    /// A listener that greets every connection with `greeting`, and
    /// counts them.
    async fn greeting_listener(
        greeting: &'static str,
    ) -> (Target, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let looked = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = looked.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = stream.write_all(greeting.as_bytes()).await;
            }
        });
        let target = Target::of(&format!("nats://127.0.0.1:{port}").parse().expect("URL"));
        (target, looked)
    }

    #[tokio::test]
    async fn a_server_that_answers_plainly_is_given_a_round_of_reconnects_before_it_is_blamed() {
        use std::sync::atomic::Ordering;
        let (answering, looked) = greeting_listener("INFO {\"port\":4222}\r\n").await;
        let said = tokio::time::timeout(
            Duration::from_secs(60),
            why_unreachable(vec![answering.clone()]),
        )
        .await
        .expect("the look ends");
        assert_eq!(looked.load(Ordering::SeqCst), 2, "looked at again");
        assert!(
            said.starts_with(&format!("{answering}: a NATS server answers")),
            "{said}"
        );
        assert!(!said.contains("  "), "one line of text: {said}");
    }

    #[tokio::test]
    async fn a_server_whose_greeting_explains_the_failure_is_looked_at_once() {
        use std::sync::atomic::Ordering;
        let (login, looked) = greeting_listener("INFO {\"auth_required\":true}\r\n").await;
        let refused = Target::of(
            &format!("nats://127.0.0.1:{}", free_port())
                .parse()
                .expect("URL"),
        );
        let said = why_unreachable(vec![refused, login]).await;
        assert!(said.contains("cannot connect"), "{said}");
        assert!(said.contains("requires a login"), "{said}");
        assert_eq!(looked.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_client_is_given_a_round_over_every_configured_server() {
        assert!(settle(1) > RECONNECT_DELAY_MAX + CONNECT_TIMEOUT);
        assert!(settle(3) > (RECONNECT_DELAY_MAX + CONNECT_TIMEOUT) * 3);
        assert_eq!(settle(0), settle(1));
    }

    /// A port nothing listens on (bound, then released).
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    }

    #[test]
    fn a_greeting_says_what_the_server_wants() {
        let info = |json: &str| format!("INFO {json}\r\n").into_bytes();
        assert!(
            says(&info(r#"{"tls_required":true}"#), false).contains("with TLS"),
            "TLS required, plain URL"
        );
        assert!(
            says(&info(r#"{"tls_required":true}"#), true).contains("with TLS"),
            "TLS required, tls:// URL: the handshake failed"
        );
        assert!(
            says(&info(r#"{"tls_available":true}"#), true).contains("with TLS"),
            "TLS optional, tls:// URL: the handshake failed"
        );
        assert!(
            says(&info(r#"{"port":4222}"#), true).contains("without TLS"),
            "tls:// to a server without TLS"
        );
        assert!(says(&info(r#"{"auth_required":true}"#), false).contains("requires a login"));
        let both = says(
            &info(r#"{"tls_required":true,"auth_required":true}"#),
            false,
        );
        assert!(both.contains("TLS handshake failed") && both.contains("login was refused"));
        assert!(matches!(
            classify(&info(r#"{"port":4222}"#), false),
            Found::Answers
        ));
    }

    #[test]
    fn a_target_is_named_as_in_a_url() {
        let named = |url: &str| Target::of(&url.parse().expect("a server URL")).to_string();
        assert_eq!(named("nats://127.0.0.1:4222"), "127.0.0.1:4222");
        assert_eq!(named("nats://[::1]:4223"), "[::1]:4223");
        assert_eq!(named("tls://nats.example"), "nats.example:4222");
    }

    #[test]
    fn anything_else_is_not_a_nats_server() {
        assert!(says(b"HTTP/1.1 400 Bad Request\r\n", false).contains("not as a NATS server"));
        assert!(says(b"HTTP/1.1 400 Bad Request\r\n", false).contains("HTTP/1.1 400"));
        assert!(says(b"INFO {not json\r\n", false).contains("not as a NATS server"));
        assert!(says(b"\x16\x03\x01", false).contains(r"\x16\x03\x01"));
        assert!(says(b"", false).contains("without a greeting"));
    }
}
