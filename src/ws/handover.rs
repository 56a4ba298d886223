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
//!
//! It also gives up on a client that stops reading: once writes to it have
//! made no progress for [`WRITE_STALL`], they fail, and hyper closes the
//! connection. A client that requests a large response and never reads it
//! would otherwise hold its connection, and the upstream connection behind
//! it, for ever.
//!
//! And it closes the way nginx and Apache do ("lingering close"). hyper
//! closes a connection whose request body it did not read to the end (the
//! gateway's 502 to an upload, say). Closing a socket with unread bytes
//! makes the kernel send a reset, and a reset that reaches the client
//! before it has read the answer can destroy the answer (a lost segment is
//! not sent again; some systems drop what was received). So once the
//! answer is out, the stream sends its end of stream, then, if bytes from
//! the client are waiting unread, reads and drops what it sends until it
//! closes, for at most [`LINGER`] and [`LINGER_BYTES`]. A tunnel's stream
//! does not linger ([`ClientStream::without_lingering`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::deadline::Stall;

/// How long writes to a client may make no progress before its connection
/// is closed: nginx's `send_timeout`. The contract has no key for it.
pub const WRITE_STALL: Duration = Duration::from_secs(60);

/// How long a connection being closed keeps reading what the client still
/// sends, so that the client reads the answer before any reset.
pub const LINGER: Duration = Duration::from_secs(2);

/// The most a connection being closed reads and drops: an upload that is
/// still coming after this much is cut.
pub const LINGER_BYTES: usize = 16 * 1024 * 1024;

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

/// How long writes to a client have made no progress, turned into an
/// error once they have for the bound.
struct WriteStall(Stall);

impl WriteStall {
    fn new(bound: Duration) -> Self {
        Self(Stall::new(bound))
    }

    /// What a write to the socket returned, with a stall that lasted the
    /// bound turned into a `TimedOut` error.
    fn watch(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Pending => self.0.poll_expired(cx).map(|()| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client read nothing for the write stall bound",
                ))
            }),
            Poll::Ready(Ok(n)) if n > 0 => {
                self.0.moved();
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }
}

/// A client's TCP stream that keeps what hyper writes once its
/// [`HoldSwitch`] is armed, and fails writes that stall for
/// `WRITE_STALL` (60 s).
pub struct ClientStream {
    tcp: TcpStream,
    hold: HoldSwitch,
    held: Vec<u8>,
    stall: WriteStall,
    close: Close,
}

/// Where the stream is in closing.
enum Close {
    /// Not closing.
    Open,
    /// The end was sent with bytes from the client unread; boxed, since
    /// few connections ever linger.
    Lingering(Box<Linger>),
    /// Closed.
    Done,
    /// A tunnel's, which does not linger: the client's bytes after the
    /// upstream's end are the upstream's to read.
    Tunnel,
}

/// The bounds of a closing connection's lingering.
struct Linger {
    deadline: Pin<Box<tokio::time::Sleep>>,
    left: usize,
}

impl ClientStream {
    /// Serves `tcp`, holding writes once `hold` is armed.
    pub fn new(tcp: TcpStream, hold: HoldSwitch) -> Self {
        Self::with_write_stall(tcp, hold, WRITE_STALL)
    }

    fn with_write_stall(tcp: TcpStream, hold: HoldSwitch, bound: Duration) -> Self {
        Self {
            tcp,
            hold,
            held: Vec::new(),
            stall: WriteStall::new(bound),
            close: Close::Open,
        }
    }

    /// For a tunnel: closing sends the end and no more, since the client
    /// may go on sending to the upstream after the upstream's end.
    pub fn without_lingering(&mut self) {
        self.close = Close::Tunnel;
    }

    /// The stream hyper hands back with an upgraded connection, and what
    /// hyper read past the request's head; `None` if hyper was serving
    /// something else, which the gateway never has it do.
    pub fn from_upgraded(upgraded: hyper::upgrade::Upgraded) -> Option<(Self, bytes::Bytes)> {
        let parts = upgraded.downcast::<hyper_util::rt::TokioIo<Self>>().ok()?;
        Some((parts.io.into_inner(), parts.read_buf))
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
            let polled = Pin::new(&mut self.tcp).poll_write(cx, &self.held);
            let n = ready!(self.stall.watch(cx, polled))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..n);
        }
        Poll::Ready(Ok(()))
    }

    /// Reads and drops what the client sends until it closes, or the
    /// lingering's bounds are reached. Errors end it too: the socket is
    /// closed next either way.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Close::Lingering(linger) = &mut self.close else {
            return Poll::Ready(());
        };
        let mut scratch = [0u8; 8 * 1024];
        while linger.left > 0 && !linger.deadline.is_elapsed() {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.tcp).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    linger.left = linger.left.saturating_sub(buf.filled().len());
                }
                Poll::Pending if linger.deadline.as_mut().poll(cx).is_pending() => {
                    return Poll::Pending;
                }
                _ => break,
            }
        }
        self.close = Close::Done;
        Poll::Ready(())
    }
}

/// Bytes the kernel has received on `tcp` that nobody has read yet. The
/// kernel is asked, not tokio: tokio learns of new bytes only at its next
/// look at the socket, and a close decided before then would reset them.
fn unread(tcp: &TcpStream) -> usize {
    queue_size(tcp, libc::FIONREAD).unwrap_or(0)
}

/// What a socket queue's `ioctl` (`FIONREAD`, `TIOCOUTQ`) counts on `tcp`.
fn queue_size(tcp: &TcpStream, request: libc::Ioctl) -> Option<usize> {
    use std::os::fd::AsRawFd;
    let mut bytes: libc::c_int = 0;
    // SAFETY: these requests write one `c_int` through the pointer, which
    // points at a live local of that type; the descriptor is open for as
    // long as `tcp` is borrowed.
    let done = unsafe { libc::ioctl(tcp.as_raw_fd(), request, &mut bytes) };
    if done == 0 {
        usize::try_from(bytes).ok()
    } else {
        None
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
        let polled = Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.stall.watch(cx, polled)
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
        let polled = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.stall.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Held bytes wait for the session's first write.
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    /// Sends the end, after what is held; then, if the client still has
    /// bytes on their way in, lingers (see the module's doc). A client
    /// with nothing unread is not waited for: like nginx's default, the
    /// stream lingers only when the client may still be sending, so closing
    /// an idle keep-alive connection (at shutdown, say) costs nothing.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.close {
            Close::Open => {
                ready!(self.poll_release(cx))?;
                ready!(Pin::new(&mut self.tcp).poll_shutdown(cx))?;
                if unread(&self.tcp) == 0 {
                    self.close = Close::Done;
                    return Poll::Ready(Ok(()));
                }
                self.close = Close::Lingering(Box::new(Linger {
                    deadline: Box::pin(tokio::time::sleep(LINGER)),
                    left: LINGER_BYTES,
                }));
            }
            Close::Tunnel => {
                ready!(self.poll_release(cx))?;
                return Pin::new(&mut self.tcp).poll_shutdown(cx);
            }
            Close::Lingering(_) | Close::Done => {}
        }
        ready!(self.poll_linger(cx));
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::time::Instant;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.expect("connect"), accepted.expect("accept").0)
    }

    /// Waits (a bounded number of turns) until the kernel holds `bytes`
    /// unread on `stream`'s socket.
    async fn until_unread(stream: &ClientStream, bytes: usize) {
        until_unread_is(stream, |n| n == bytes).await;
    }

    /// Waits (a bounded number of turns) until what the kernel holds
    /// unread on `stream`'s socket passes `check`.
    async fn until_unread_is(stream: &ClientStream, check: impl Fn(usize) -> bool) {
        for _ in 0..100_000 {
            if check(unread(&stream.tcp)) {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("never as expected: {} bytes unread", unread(&stream.tcp));
    }

    #[tokio::test(start_paused = true)]
    async fn closing_sends_the_end_then_drops_what_the_client_sends_for_a_bounded_time() {
        let (mut peer, tcp) = pair().await;
        let mut stream = ClientStream::new(tcp, HoldSwitch::default());
        stream.write_all(b"answer").await.expect("write");
        // Unread when the stream closes: a reset, without the lingering.
        peer.write_all(&[b'x'; 10_000]).await.expect("peer writes");
        until_unread(&stream, 10_000).await;
        // The peer never closes; the paused clock runs out the bound.
        let started = Instant::now();
        stream.shutdown().await.expect("shutdown");
        assert!(started.elapsed() >= LINGER, "lingered for the bound");
        assert_eq!(unread(&stream.tcp), 0, "what the client sent was read");
        drop(stream);
        let mut got = Vec::new();
        peer.read_to_end(&mut got)
            .await
            .expect("an end of stream, not a reset");
        assert_eq!(got, b"answer");
    }

    /// Bytes `tcp` has sent that its peer has not acknowledged yet.
    fn unacknowledged(tcp: &TcpStream) -> usize {
        queue_size(tcp, libc::TIOCOUTQ).expect("TIOCOUTQ")
    }

    /// On the real clock: a client that keeps sending is read for
    /// [`LINGER_BYTES`] and then left. What the lingering read is what the
    /// client wrote, less what is still in its send queue and in the
    /// gateway's receive queue: counted by the kernel, not timed.
    #[tokio::test]
    async fn closing_stops_reading_a_client_that_keeps_sending_after_the_byte_bound() {
        const CHUNK: usize = 64 * 1024;
        let (peer, tcp) = pair().await;
        let peer = Arc::new(peer);
        let mut stream = ClientStream::new(tcp, HoldSwitch::default());
        let written = Arc::new(AtomicUsize::new(0));
        let sender = tokio::spawn({
            let (peer, written) = (peer.clone(), written.clone());
            async move {
                let chunk = vec![b'x'; CHUNK];
                // Never closes: only the gateway's bounds end the lingering.
                // Bounded at 1 GiB, more than any lingering without its byte
                // bound reads in its 2 s.
                while written.load(Ordering::Relaxed) < 1 << 30 {
                    peer.writable().await.expect("writable");
                    match peer.try_write(&chunk) {
                        Ok(n) => written.fetch_add(n, Ordering::Relaxed),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(_) => break,
                    };
                }
            }
        });
        until_unread_is(&stream, |n| n > 0).await;
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(30), stream.shutdown())
            .await
            .expect("closing ended within 30 s")
            .expect("shutdown");
        // This runtime has one thread: the sender is between two writes.
        let read = written.load(Ordering::Relaxed) - unacknowledged(&peer) - unread(&stream.tcp);
        let scratch = 8 * 1024;
        assert!(read <= LINGER_BYTES + scratch, "read {read} bytes");
        // Acknowledged bytes still counted as unacknowledged make `read`
        // smaller by what is in flight; at the bound, or out of time.
        assert!(
            read >= LINGER_BYTES - CHUNK * 16 || started.elapsed() >= LINGER,
            "stopped after {read} bytes, {:?}",
            started.elapsed()
        );
        sender.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn closing_ends_when_a_client_that_was_sending_closes() {
        let (mut peer, tcp) = pair().await;
        let mut stream = ClientStream::new(tcp, HoldSwitch::default());
        peer.write_all(&[b'x'; 10_000]).await.expect("peer writes");
        peer.shutdown().await.expect("peer's end");
        until_unread(&stream, 10_000).await;
        let started = Instant::now();
        stream.shutdown().await.expect("shutdown");
        assert!(started.elapsed() < LINGER, "done at the client's end");
        assert_eq!(unread(&stream.tcp), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn closing_does_not_wait_for_a_client_that_sends_nothing() {
        let (mut peer, tcp) = pair().await;
        let mut stream = ClientStream::new(tcp, HoldSwitch::default());
        let started = Instant::now();
        // The paused clock would run out the bound if the stream waited.
        stream.shutdown().await.expect("shutdown");
        assert!(started.elapsed() < LINGER, "not waited for");
        drop(stream);
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.expect("an end of stream");
        assert!(got.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnels_stream_sends_its_end_and_leaves_the_rest_to_be_read() {
        let (mut peer, tcp) = pair().await;
        let mut stream = ClientStream::new(tcp, HoldSwitch::default());
        stream.without_lingering();
        peer.write_all(&[b'x'; 10_000]).await.expect("peer writes");
        until_unread(&stream, 10_000).await;
        let started = Instant::now();
        stream.shutdown().await.expect("shutdown");
        assert!(started.elapsed() < LINGER, "not waited for");
        assert_eq!(unread(&stream.tcp), 10_000, "nothing dropped");
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.expect("an end of stream");
        let mut rest = vec![0; 10_000];
        stream.read_exact(&mut rest).await.expect("still readable");
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

    /// On a paused clock, which moves on whenever every task waits.
    #[tokio::test(start_paused = true)]
    async fn writes_that_stall_for_the_bound_fail() {
        let (_peer, tcp) = pair().await;
        let mut stream = ClientStream::new(tcp, HoldSwitch::default());
        let start = Instant::now();
        let chunk = vec![0u8; 1 << 20];
        let error = loop {
            if let Err(e) = stream.write_all(&chunk).await {
                break e;
            }
        };
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= WRITE_STALL, "{:?}", start.elapsed());
    }

    /// On the real clock with a short bound: on a paused one, the clock can
    /// jump while the reader's read and the writer's wake-up are still
    /// making their way through the kernel.
    #[tokio::test]
    async fn a_slow_reader_is_not_a_stalled_one() {
        const TOTAL: usize = 32 << 20;
        const BOUND: Duration = Duration::from_secs(1);
        let (mut peer, tcp) = pair().await;
        let mut stream = ClientStream::with_write_stall(tcp, HoldSwitch::default(), BOUND);
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0;
            while total < TOTAL {
                tokio::time::sleep(BOUND / 10).await;
                total += peer.read(&mut buf).await.expect("read");
            }
        });
        let start = Instant::now();
        stream.write_all(&vec![0u8; TOTAL]).await.expect("written");
        reader.await.expect("reader");
        assert!(start.elapsed() > BOUND, "{:?}", start.elapsed());
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
