//! The two halves of a client's socket after the upgrade.
//!
//! The socket is split without a lock: the writer task owns the sending
//! half and writes pre-encoded frames straight from the connection's queue
//! (one vectored write per batch, no copy per recipient). tungstenite reads
//! from the receiving half through [`ReadSide`]; what tungstenite itself
//! wants to send (pongs, the reply to a close frame) is queued as control
//! bytes for the writer, which stays the only one writing to the socket.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;

use crate::metrics::CloseReason;
use crate::rooms::{CLOSE_SLOW_CONSUMER, Connection, PushError};

/// The receiving half as a `Read + Write` stream for tungstenite.
pub struct ReadSide {
    read: OwnedReadHalf,
    conn: Arc<Connection>,
}

impl ReadSide {
    /// Reads from `read`; writes go to `conn`'s queue as control frames.
    pub fn new(read: OwnedReadHalf, conn: Arc<Connection>) -> Self {
        Self { read, conn }
    }

    /// The socket both halves share.
    pub fn tcp(&self) -> &TcpStream {
        self.read.as_ref()
    }
}

/// Makes the connection end with a reset when its socket is closed, for a
/// client that stopped reading: what the kernel still holds for it, up to
/// its whole send buffer (megabytes on a fast link), would otherwise go
/// out for as long as the client cares to read, ending in a frame cut
/// short or a close frame long stale, while the socket lingers outside
/// every limit of the gateway's. A reset drops it at once and tells the
/// client.
pub fn reset_on_close(tcp: &TcpStream) {
    if let Err(e) = tcp.set_zero_linger() {
        tracing::debug!(error = %e, "cannot set the connection to reset on close");
    }
}

impl AsyncRead for ReadSide {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for ReadSide {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // tungstenite hands over whole frames, so queueing all of it (or
        // nothing) keeps frame boundaries intact.
        Poll::Ready(match self.conn.outbox().push_codec(buf) {
            Ok(()) => Ok(buf.len()),
            // A client that pings faster than it reads the pongs: it does
            // not take what it asked for, as a slow consumer does not.
            Err(PushError::Full) => {
                self.conn.close(
                    CLOSE_SLOW_CONSUMER,
                    "slow consumer",
                    CloseReason::SlowConsumer,
                );
                Err(io::Error::other("control frames backlog exceeded"))
            }
            Err(PushError::Closed) => Err(io::ErrorKind::BrokenPipe.into()),
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
