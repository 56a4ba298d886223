//! The upstream of the HTTP proxy scenario: a small, fast hyper server
//! that answers every request with the same short body, so the proxy in
//! front of it is what the measurement sees.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// The body every request gets (64 bytes).
const BODY: &[u8] = b"roomgate-bench upstream: a short fixed body of sixty-four bytes\n";

/// Serves on `listen` with `threads` runtime threads until killed.
pub fn serve(listen: SocketAddr, threads: usize) -> Result<(), String> {
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .map_err(|e| format!("runtime: {e}"))?;
    serve_on(&runtime, listen, answer)
}

/// Listens on `listen` and serves each connection as [`serve_each`] does,
/// until killed: the upstream and the hyper floor start the same way.
pub fn serve_on<F, Fut>(
    runtime: &tokio::runtime::Runtime,
    listen: SocketAddr,
    serve: F,
) -> Result<(), String>
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        serve_each(listener, serve).await;
        Ok(())
    })
}

/// Runs `serve` in a task of its own for every connection `listener`
/// accepts, until killed. `TCP_NODELAY` is set, as roomgate and nginx set
/// it: a small answer held back by Nagle's algorithm would measure the
/// kernel's delayed acknowledgement, not the server.
pub async fn serve_each<F, Fut>(listener: TcpListener, serve: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Typically out of file descriptors: back off, don't spin.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(stream));
    }
}

/// Answers every request on `stream` with [`BODY`].
async fn answer(stream: TcpStream) {
    let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .header("content-type", "text/plain")
                .body(Full::new(Bytes::from_static(BODY)))
                .expect("static response"),
        )
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn body_is_64_bytes() {
        assert_eq!(super::BODY.len(), 64);
    }
}
