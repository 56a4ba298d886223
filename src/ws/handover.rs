//! The client's socket as hyper serves it, able to hold back the response
//! that switches a connection to WebSocket.
//!
//! hyper writes and flushes the 101 response on its own, and the session's
//! welcome frame follows a moment later: two writes, two packets for the
//! client to wake up for. When the upgrade is one of ours, the 101 is held
//! here instead and handed over with the socket, so the writer sends it
//! together with the welcome in a single vectored write. Upgrades that are
//! tunnelled to the upstream never arm the hold: there the client may have
//! to speak first, so their 101 must leave at once.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Shared between a connection's service and its [`ClientStream`]: the
/// service arms it when it answers with its own 101.
#[derive(Clone, Default)]
pub struct HoldSwitch(Arc<AtomicBool>);

impl HoldSwitch {
    /// From now on, writes to the stream are kept for the session.
    pub fn arm(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn is_armed(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A client's TCP stream that keeps what hyper writes once its
/// [`HoldSwitch`] is armed.
pub struct ClientStream {
    tcp: TcpStream,
    hold: HoldSwitch,
    held: Vec<u8>,
}

impl ClientStream {
    /// Serves `tcp`, holding writes once `hold` is armed.
    pub fn new(tcp: TcpStream, hold: HoldSwitch) -> Self {
        Self {
            tcp,
            hold,
            held: Vec::new(),
        }
    }

    /// The socket and the bytes held back, which must go out before
    /// anything else is written to it.
    pub fn into_parts(self) -> (TcpStream, Vec<u8>) {
        (self.tcp, self.held)
    }

    /// Writes out what is held; only needed when the stream is shut down
    /// before it is handed over.
    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = std::task::ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.hold.is_armed() {
            self.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.hold.is_armed() {
            let before = self.held.len();
            for buf in bufs {
                self.held.extend_from_slice(buf);
            }
            return Poll::Ready(Ok(self.held.len() - before));
        }
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Held bytes wait for the session's first write.
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_release(cx))?;
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.expect("connect"), accepted.expect("accept").0)
    }

    #[tokio::test]
    async fn unarmed_writes_go_straight_out() {
        let (mut peer, tcp) = pair().await;
        let mut stream = ClientStream::new(tcp, HoldSwitch::default());
        stream.write_all(b"plain").await.expect("write");
        stream.flush().await.expect("flush");
        let mut got = [0; 5];
        peer.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"plain");
        assert!(stream.into_parts().1.is_empty());
    }

    #[tokio::test]
    async fn armed_writes_are_handed_over_not_sent() {
        let (mut peer, tcp) = pair().await;
        let hold = HoldSwitch::default();
        let mut stream = ClientStream::new(tcp, hold.clone());
        hold.arm();
        stream.write_all(b"HTTP/1.1 101 ").await.expect("write");
        stream.flush().await.expect("flush");
        let (mut tcp, held) = stream.into_parts();
        assert_eq!(held, b"HTTP/1.1 101 ");
        tcp.write_all(b"late").await.expect("write");
        let mut got = [0; 4];
        peer.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"late", "nothing held went out before the hand-over");
    }

    #[tokio::test]
    async fn shutdown_releases_what_is_held() {
        let (mut peer, tcp) = pair().await;
        let hold = HoldSwitch::default();
        let mut stream = ClientStream::new(tcp, hold.clone());
        hold.arm();
        stream.write_all(b"held").await.expect("write");
        stream.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"held");
    }
}
