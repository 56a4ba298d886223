//! The example upstream application of the chat demo: a small HTTP server
//! that serves the static files in `examples/chat/` (a page, its script and
//! its style sheet).
//!
//! It knows nothing about WebSockets. roomgate stands in front of it: the
//! browser loads the page through the gateway's reverse proxy, and the page
//! opens its WebSocket to the gateway's own `/ws` on the same host, so the
//! whole demo lives on one port.
//!
//! ```sh
//! cargo run --example chat_upstream                         # 127.0.0.1:3000
//! ROOMGATE_UPSTREAM_URL=http://127.0.0.1:3000 \
//!   ROOMGATE_WEBSOCKET_ROOMS_PRESENCE=true cargo run         # gateway on :8080
//! # open http://127.0.0.1:8080/ in two tabs
//! ```
//!
//! Settings, from the environment:
//! - `CHAT_LISTEN`: address to listen on (default `127.0.0.1:3000`; in a
//!   container `0.0.0.0:3000`);
//! - `CHAT_DIR`: directory of the files to serve (default: `examples/chat`
//!   of the source tree it was built from).
//!
//! Besides the files it answers `GET /healthz` with 200, for probes.
//! The tests include this file as a module and run [`serve`] in-process.

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HeaderValue,
    X_CONTENT_TYPE_OPTIONS,
};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

/// Where the files are when nothing else is said: this source tree's copy.
const DEFAULT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/chat");

/// The page loads its script and style from this origin only, and talks
/// only to this origin (`'self'` covers `ws:`/`wss:` to the same host);
/// no inline script runs, so nothing a chat member sends can execute.
const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listen = std::env::var("CHAT_LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let dir = std::env::var_os("CHAT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
    if !dir.join("index.html").is_file() {
        eprintln!(
            "chat_upstream: no index.html in {} (set CHAT_DIR)",
            dir.display()
        );
        std::process::exit(2);
    }
    let listener = TcpListener::bind(&listen).await?;
    println!(
        "chat_upstream listening on {} serving {}",
        listener.local_addr()?,
        dir.display()
    );
    serve(listener, dir, shutdown_signal()).await;
    Ok(())
}

/// Resolves on SIGTERM (what a container runtime sends) or Ctrl-C.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Serves the files of `dir` on `listener` until `shutdown` resolves.
///
/// Connections still open at shutdown are dropped: every response is small
/// and the gateway in front retries nothing, so there is nothing to drain.
pub async fn serve(listener: TcpListener, dir: PathBuf, shutdown: impl Future<Output = ()>) {
    let dir: Arc<Path> = dir.into();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors and the like: try again shortly
                // rather than spinning or giving up.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let dir = dir.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let dir = dir.clone();
                async move { Ok::<_, Infallible>(respond(&dir, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Answers one request: a file of `dir`, `/healthz`, or an error status.
async fn respond(dir: &Path, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let head = match *request.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            let mut response = status(StatusCode::METHOD_NOT_ALLOWED);
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
    };
    let path = request.uri().path();
    if path == "/healthz" {
        return answer(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into());
    }
    let Some(relative) = file_name(path) else {
        return status(StatusCode::NOT_FOUND);
    };
    let file = dir.join(relative);
    let body = match tokio::fs::read(&file).await {
        Ok(body) => Bytes::from(body),
        Err(_) => return status(StatusCode::NOT_FOUND),
    };
    let length = body.len();
    let mut response = answer(StatusCode::OK, content_type(relative), body);
    if head {
        // Same headers, no body; hyper would otherwise send a zero length.
        *response.body_mut() = Full::new(Bytes::new());
        response
            .headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(length));
    }
    response
}

/// Maps a request path to a file name inside the served directory, or
/// `None` for anything that could leave it or is not a plain file name.
///
/// Only `/` (the page) and single-segment names of safe characters are
/// served: the demo has no subdirectories, and refusing everything else
/// (`..`, `%2e`, backslashes, hidden files) is simpler than normalising.
fn file_name(path: &str) -> Option<&str> {
    if path == "/" {
        return Some("index.html");
    }
    let name = path.strip_prefix('/')?;
    let safe = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    safe.then_some(name)
}

/// The media type of a served file, by extension.
fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("json") => "application/json",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        _ => "application/octet-stream",
    }
}

/// A response with `body`, its type and the headers every answer carries.
fn answer(code: StatusCode, kind: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = code;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    // The demo is edited live; never let a browser keep a stale script.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    response
}

/// A short plain-text answer: `code` and its reason.
fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let reason = code.canonical_reason().unwrap_or("error");
    answer(
        code,
        "text/plain; charset=utf-8",
        format!("{reason}\n").into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_map_to_files() {
        assert_eq!(file_name("/"), Some("index.html"));
        assert_eq!(file_name("/chat.js"), Some("chat.js"));
        for bad in [
            "/..", "/../x", "/a/b", "/.env", "/%2e%2e", "/a\\b", "//", "", "x",
        ] {
            assert_eq!(file_name(bad), None, "{bad:?}");
        }
    }
}
