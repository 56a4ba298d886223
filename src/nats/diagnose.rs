//! Why NATS cannot be reached. async-nats retries its first connection
//! in the background and says why it fails only at debug level (an "IO
//! error" for a refused connection or a failed TLS handshake), so when the
//! gateway says NATS is not reachable it looks for itself: one TCP
//! connection to each configured server, and a look at the first line the
//! server sends. A NATS server greets every client with an `INFO` line,
//! which also says whether it requires TLS or a login.

use std::time::Duration;

use async_nats::ServerAddr;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpStream;

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

/// One line naming, for each target, what was found there. The targets
/// are looked at together, so the answer takes two steps at most.
pub(super) async fn why_unreachable(targets: Vec<Target>) -> String {
    let looks = targets.iter().map(|target| async move {
        let found = look(target).await;
        format!("{target}: {found}")
    });
    futures_util::future::join_all(looks).await.join("; ")
}

/// What is at `target`, said for an operator.
async fn look(target: &Target) -> String {
    let connect = TcpStream::connect((target.host.as_str(), target.port));
    let stream = match tokio::time::timeout(STEP, connect).await {
        Err(_) => return format!("no answer to connect within {STEP:?}"),
        Ok(Err(e)) => return format!("cannot connect ({e})"),
        Ok(Ok(stream)) => stream,
    };
    // The first line, or GREETING_MAX bytes, or what came before the end.
    let mut first_line = BufReader::new(stream.take(GREETING_MAX));
    let mut greeting = Vec::with_capacity(1024);
    let read = tokio::time::timeout(STEP, first_line.read_until(b'\n', &mut greeting)).await;
    match read {
        Err(_) if greeting.is_empty() => format!(
            "accepts connections but sends no greeting within {STEP:?}: not a NATS server, \
             or one that expects TLS first"
        ),
        Ok(Err(e)) if greeting.is_empty() => format!("the connection failed ({e})"),
        _ => classify(&greeting, target.tls),
    }
}

/// What a server's first bytes say about why the client is not connected.
fn classify(greeting: &[u8], url_asks_tls: bool) -> String {
    if greeting.is_empty() {
        return "closes the connection without a greeting: not a NATS server?".into();
    }
    let Some(info) = greeting
        .strip_prefix(b"INFO ")
        .and_then(|rest| serde_json::from_slice::<serde_json::Value>(line(rest)).ok())
    else {
        let start = &greeting[..greeting.len().min(40)];
        return format!(
            "answers, but not as a NATS server (it sent \"{}\")",
            start.escape_ascii()
        );
    };
    let flag = |name: &str| info[name].as_bool().unwrap_or(false);
    let tls = flag("tls_required") || (url_asks_tls && flag("tls_available"));
    let login = flag("auth_required");
    match (tls, login) {
        (true, true) => "a NATS server that requires TLS and a login: the TLS handshake failed \
                         (does this system trust the server's certificate?) or the login was \
                         refused (check the credentials in nats.url or nats.creds_file)"
            .into(),
        (true, false) => "a NATS server with TLS; the client could not complete the handshake \
                          (does this system trust the server's certificate?)"
            .into(),
        _ if url_asks_tls => "a NATS server without TLS, but the URL asks for it (tls://)".into(),
        (false, true) => "a NATS server that requires a login: check the credentials in \
                          nats.url or nats.creds_file (the server's log names what it refused)"
            .into(),
        (false, false) => "a NATS server answers; it may have refused the client (at its \
                           connection limit?), see its log"
            .into(),
    }
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

    #[test]
    fn a_greeting_says_what_the_server_wants() {
        let info = |json: &str| format!("INFO {json}\r\n").into_bytes();
        assert!(
            classify(&info(r#"{"tls_required":true}"#), false).contains("with TLS"),
            "TLS required, plain URL"
        );
        assert!(
            classify(&info(r#"{"tls_required":true}"#), true).contains("with TLS"),
            "TLS required, tls:// URL: the handshake failed"
        );
        assert!(
            classify(&info(r#"{"tls_available":true}"#), true).contains("with TLS"),
            "TLS optional, tls:// URL: the handshake failed"
        );
        assert!(
            classify(&info(r#"{"port":4222}"#), true).contains("without TLS"),
            "tls:// to a server without TLS"
        );
        assert!(classify(&info(r#"{"auth_required":true}"#), false).contains("requires a login"));
        let both = classify(
            &info(r#"{"tls_required":true,"auth_required":true}"#),
            false,
        );
        assert!(both.contains("TLS handshake failed") && both.contains("login was refused"));
        assert!(classify(&info(r#"{"port":4222}"#), false).contains("a NATS server answers"));
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
        assert!(classify(b"HTTP/1.1 400 Bad Request\r\n", false).contains("not as a NATS server"));
        assert!(classify(b"HTTP/1.1 400 Bad Request\r\n", false).contains("HTTP/1.1 400"));
        assert!(classify(b"INFO {not json\r\n", false).contains("not as a NATS server"));
        assert!(classify(b"\x16\x03\x01", false).contains(r"\x16\x03\x01"));
        assert!(classify(b"", false).contains("without a greeting"));
    }
}
