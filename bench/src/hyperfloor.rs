//! The HTTP proxy floor: the least a reverse proxy built on hyper's HTTP/1
//! server and client can do per request, for reading roomgate's proxy
//! figures against what its HTTP library alone costs.
//!
//! Each client connection gets one upstream connection, driven in the same
//! task, and each request goes to it as it came; the response comes back
//! as it came (hyper's server adds a `date` header when there is none).
//! There are no headers added or removed, no checks, no timeouts, no pool
//! and no logging: only the two hyper connections, which no proxy on hyper
//! can do without.

use std::cell::RefCell;
use std::net::SocketAddr;

use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Serves on `listen`, proxying to `upstream`, with `threads` runtime
/// threads (0: tokio's default, one per core), until killed.
pub fn serve(listen: SocketAddr, upstream: SocketAddr, threads: usize) -> Result<(), String> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        builder.worker_threads(threads);
    }
    let runtime = builder
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    // A connection's end is not reported: wrk stops with requests in
    // flight, and every run ends with a burst of such errors.
    crate::upstream::serve_on(&runtime, listen, |client| proxy(client, upstream))
}

/// Serves one client connection over one upstream connection, polling
/// both in this task (roomgate's pool, too, drives its upstream
/// connections from the client's task).
async fn proxy(client: TcpStream, upstream: SocketAddr) {
    let Ok(up) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = up.set_nodelay(true);
    let Ok((sender, upstream_conn)) = hyper::client::conn::http1::handshake(TokioIo::new(up)).await
    else {
        return;
    };
    // hyper's server hands over one request at a time, and the next only
    // once the last response's body has been read to its end, which leaves
    // the upstream connection idle: the sender is not checked for
    // readiness first (a request sent too early would fail, and show in
    // wrk's error count, zero in every run), and the cell is never
    // borrowed twice.
    let sender = RefCell::new(sender);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        sender.borrow_mut().send_request(req)
    });
    let server_conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(client), service);
    // The server side ends when the client leaves; it drops the sender, and
    // the upstream connection then ends too.
    let _ = tokio::join!(server_conn, upstream_conn);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Reads from `stream` until `end` has been seen, within a bound.
    async fn read_until(stream: &mut TcpStream, end: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(end.len()).any(|w| w == end) {
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
                .await
                .expect("no data within 10 s")
                .expect("read");
            assert!(
                n > 0,
                "closed early after {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    #[tokio::test]
    async fn passes_requests_and_responses_through_unchanged() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let upstream_addr = upstream.local_addr().expect("addr");
        let floor = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let floor_addr = floor.local_addr().expect("addr");
        let proxy = tokio::spawn(crate::upstream::serve_each(floor, move |client| {
            super::proxy(client, upstream_addr)
        }));

        let mut client = TcpStream::connect(floor_addr).await.expect("connect");
        let (mut server, _) = tokio::time::timeout(Duration::from_secs(10), async {
            // The floor connects upstream as soon as a client arrives.
            upstream.accept().await
        })
        .await
        .expect("no upstream connection within 10 s")
        .expect("accept");
        for path in ["/one", "/two?q=1"] {
            let request =
                format!("GET {path} HTTP/1.1\r\nhost: example\r\nx-probe: {path}\r\n\r\n");
            client.write_all(request.as_bytes()).await.expect("write");
            let seen =
                String::from_utf8(read_until(&mut server, b"\r\n\r\n").await).expect("utf-8");
            assert!(
                seen.starts_with(&format!("GET {path} HTTP/1.1\r\n")),
                "{seen}"
            );
            assert!(seen.contains("host: example\r\n"), "{seen}");
            assert!(seen.contains(&format!("x-probe: {path}\r\n")), "{seen}");
            server
                .write_all(b"HTTP/1.1 200 OK\r\nx-from: upstream\r\ncontent-length: 5\r\n\r\nhello")
                .await
                .expect("write");
            let answer = String::from_utf8(read_until(&mut client, b"hello").await).expect("utf-8");
            assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
            assert!(answer.contains("x-from: upstream\r\n"), "{answer}");
        }
        proxy.abort();
    }
}
