//! Keep-alive connections to the upstream for plain (non-upgrade) requests,
//! each driven by the task that is using it.
//!
//! A general-purpose pooled client runs every upstream connection as a task
//! of its own and hands each request and each response over a channel
//! between that task and the task serving the client: two wake-ups, often
//! on different threads, for every request. Here the connection's state
//! machine is polled by whoever holds it: while waiting for the response
//! headers by the request's future, then by the response body as the client
//! connection writes it out. The whole exchange runs in the task that serves
//! the client, and the connection goes back to the pool when its response
//! body has been read to the end and its request has been written (an
//! upstream may answer before it has read the whole upload; the rare
//! connection still busy with one is driven by a task of its own until it
//! is idle).
//!
//! A connection idle in the pool is polled only by a sweep once a second,
//! which closes those the upstream has closed (instead of leaving them
//! half-closed until the next request) and those past the idle timeout.
//! Between sweeps checkout skips closed connections, and a request that a
//! reused connection turns out unable to carry is sent again on a fresh one:
//! when it never left, or, once, when it may be sent twice (GET, HEAD or
//! OPTIONS without a body) and the connection was closed before the
//! response head arrived.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::{Progress, UpstreamBody};
use crate::deadline::{self, Stall};
use crate::shutdown::Background;

/// Idle connections kept at most; more are closed when they come back.
const MAX_IDLE: usize = 512;

/// How often idle connections are checked for having been closed or
/// expired. Short, so a connection the upstream closed does not sit in
/// CLOSE_WAIT; cheap, as it is one lock and one poll per idle connection.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Why a pooled exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No TCP connection within `upstream.connect_timeout_secs`.
    #[error("connect to upstream timed out")]
    ConnectTimeout,
    /// Refused, unresolvable, or reset while connecting.
    #[error("cannot connect to upstream: {0}")]
    Connect(#[source] std::io::Error),
    /// The connection failed or the upstream broke HTTP/1.1.
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// The upstream answered 101 to a request that did not ask to switch
    /// protocols: what follows on the connection is not HTTP.
    #[error("upstream switched protocols unasked")]
    UnaskedSwitch,
}

/// The pool of idle upstream connections. Shared by every request.
pub struct Pool {
    /// `host:port` of the upstream, resolved at each new connection so a
    /// DNS change (a restarted container) is picked up.
    target: String,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// `upstream.timeout_secs`: how long a response body may stand still,
    /// and an upload once its response is over, before the connection is
    /// given up.
    stall_timeout: Duration,
    /// Oldest at the front; checkout takes the newest, which is the least
    /// likely to have been closed by the upstream's own idle timeout.
    idle: Mutex<VecDeque<Idle>>,
    /// Where a connection still writing its upload after the response is
    /// driven to the end of it.
    background: Background,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One HTTP/1.1 connection to the upstream: the handle to send on and the
/// state machine that does the I/O, polled by whoever holds the `Conn`.
pub struct Conn {
    sender: http1::SendRequest<UpstreamBody>,
    /// `None` once the connection has finished (closed or failed). Boxed:
    /// the state machine with its buffers is large, and a `Conn` moves from
    /// the pool into a request, then into its response body, and back.
    driver: Option<Box<Driver>>,
}

/// A connection's state machine, and the clock on its response bodies.
struct Driver {
    connection: http1::Connection<TokioIo<UpstreamIo>, UpstreamBody>,
    /// The longest the upstream may pause in the middle of a response body
    /// (the pool's stall timeout), as nginx's `proxy_read_timeout`: without
    /// it, an upstream that stops sending holds its client and its
    /// connection for as long as it keeps the socket open. Created at the
    /// first wait in a body and dropped at its end, so bodies whose bytes
    /// are already there cost no timer, and no timer of a finished body
    /// wakes its client's task later. It lives here rather than in the
    /// body so that the body, which every proxied response moves around,
    /// stays as small as it was.
    stall: Stall,
}

impl Conn {
    /// Lets the connection do whatever I/O is pending; `false` once it has
    /// finished and can carry nothing more.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(driver) = self.driver.as_mut()
            && Pin::new(&mut driver.connection).poll(cx).is_ready()
        {
            self.driver = None;
        }
        self.driver.is_some()
    }

    /// The response body is over: its stall timer goes.
    fn body_done(&mut self) {
        if let Some(driver) = self.driver.as_mut() {
            driver.stall.clear();
        }
    }

    /// A frame of the response body arrived.
    fn moved(&mut self) {
        if let Some(driver) = self.driver.as_mut() {
            driver.stall.moved();
        }
    }

    /// The response body is waiting: ready once it has waited for the
    /// stall timeout since its last frame (or since its first wait).
    fn poll_stalled(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.driver.as_mut() {
            Some(driver) => driver.stall.poll_expired(cx),
            // Finished: the body ends with what the connection read.
            None => Poll::Pending,
        }
    }

    /// Whether a request can be sent right now, without waiting.
    fn ready_now(&mut self, cx: &mut Context<'_>) -> bool {
        self.drive(cx) && matches!(self.sender.poll_ready(cx), Poll::Ready(Ok(())))
    }

    /// Whether the connection may serve another request.
    fn reusable(&self) -> bool {
        self.driver.is_some() && !self.sender.is_closed()
    }

    /// Whether the connection has finished its exchange and waits for the
    /// next request, as far as its last poll found: a connection still
    /// writing the request is not. One atomic load.
    fn idle(&self) -> bool {
        self.reusable() && self.sender.is_ready()
    }

    /// Drives the connection until it is idle (`true`) or finished
    /// (`false`).
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        if !self.drive(cx) {
            return Poll::Ready(false);
        }
        self.sender.poll_ready(cx).map(|ready| ready.is_ok())
    }

    /// Sends `request` and drives the connection until the response
    /// headers arrive. On failure the request comes back when it never
    /// left, so it can be sent elsewhere.
    async fn send(
        &mut self,
        request: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, (hyper::Error, Option<Request<UpstreamBody>>)> {
        let mut response = pin!(self.sender.try_send_request(request));
        let result = poll_fn(|cx| {
            // A finished connection fails the response; nothing to do here.
            self.drive(cx);
            response.as_mut().poll(cx)
        })
        .await;
        result.map_err(|mut e| {
            let request = e.take_message();
            (e.into_error(), request)
        })
    }
}

impl Pool {
    /// A pool for the upstream at `target` (`host:port`).
    pub fn new(
        target: String,
        connect_timeout: Duration,
        idle_timeout: Duration,
        stall_timeout: Duration,
        background: Background,
    ) -> Self {
        Self {
            target,
            connect_timeout,
            idle_timeout,
            stall_timeout,
            idle: Mutex::new(VecDeque::new()),
            background,
        }
    }

    /// Sends `request` (origin-form URI, not an upgrade) on a pooled or new
    /// connection and returns the response with the connection that
    /// carries its body. A request a reused connection could not carry is
    /// sent again on a fresh one when it never left, and, once, when it
    /// may be sent twice (see `resend_copy`) and the connection was
    /// closed or reset before the response head arrived.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<UpstreamBody>,
    ) -> Result<Response<PooledBody>, PoolError> {
        // Shared with the request body, which records when it last moved.
        let upload = request.body().progress.clone();
        let mut resent = false;
        loop {
            // A request sent again goes on a fresh connection: the other
            // idle ones may have been closed along with the first.
            let checked_out = if resent { None } else { self.checkout().await };
            let (mut conn, reused, copy) = match checked_out {
                Some((conn, idle_for)) => {
                    let copy = resend_copy(&request, idle_for);
                    (conn, true, copy)
                }
                None => (self.connect().await?, false, None),
            };
            match conn.send(request).await {
                // The connection has left HTTP and goes with `conn`.
                Ok(response) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                    return Err(PoolError::UnaskedSwitch);
                }
                Ok(response) => {
                    let pool = self.clone();
                    return Ok(response.map(|inner| PooledBody {
                        inner,
                        conn: Some(conn),
                        pool,
                        upload,
                    }));
                }
                Err((e, unsent)) => match (unsent, copy) {
                    // The upstream closed the idle connection before taking
                    // the request: nothing was sent.
                    (Some(unsent), _) if reused => request = unsent,
                    // It closed it as the request went out.
                    (None, Some(copy)) if closed_before_answer(&e) => {
                        resent = true;
                        request = copy;
                    }
                    _ => return Err(e.into()),
                },
            }
        }
    }

    /// The newest idle connection that can take a request right now, and
    /// how long it was idle.
    async fn checkout(&self) -> Option<(Conn, Duration)> {
        loop {
            let Idle { mut conn, since } = self.lock().pop_back()?;
            let idle_for = since.elapsed();
            if idle_for >= self.idle_timeout {
                // Everything older is expired too.
                self.lock().clear();
                return None;
            }
            if poll_fn(|cx| Poll::Ready(conn.ready_now(cx))).await {
                return Some((conn, idle_for));
            }
        }
    }

    async fn connect(&self) -> Result<Conn, PoolError> {
        let stream = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(self.target.as_str()),
        )
        .await
        .map_err(|_| PoolError::ConnectTimeout)?
        .map_err(PoolError::Connect)?;
        // Requests are small writes that must leave at once.
        let _ = stream.set_nodelay(true);
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(UpstreamIo::new(stream)))
            .await?;
        Ok(Conn {
            sender,
            driver: Some(Box::new(Driver {
                connection: driver,
                stall: Stall::new(self.stall_timeout),
            })),
        })
    }

    /// Takes back a connection whose response has been read to the end.
    /// The upstream may have answered before it read the whole request
    /// body, as HTTP/1.1 allows: then the connection is still writing the
    /// upload, and parked here it would be found not ready and closed,
    /// cutting the upload short. Such a connection is driven by a task of
    /// its own until the request is written, and parked only then. That
    /// task lives no longer than the upload: the client's connection feeds
    /// it (and is tracked by shutdown), and an upload that stands still
    /// for the upstream timeout closes the connection. It runs in the
    /// background, so it also ends when the gateway stops.
    fn release(self: &Arc<Self>, conn: Conn, upload: Option<Arc<Progress>>) {
        if conn.idle() {
            self.checkin(conn);
        } else if conn.reusable() && tokio::runtime::Handle::try_current().is_ok() {
            self.background
                .spawn_until_stopped(self.clone().finish(conn, upload));
        }
    }

    /// Drives a connection still writing its request until it is idle,
    /// then parks it; gives up on it when the upload stands still for the
    /// stall timeout.
    async fn finish(self: Arc<Self>, mut conn: Conn, upload: Option<Arc<Progress>>) {
        let since = tokio::time::Instant::now();
        let last_moved = || upload.as_ref().map_or(since, |upload| upload.last());
        let idle = tokio::select! {
            idle = poll_fn(|cx| conn.poll_idle(cx)) => idle,
            () = deadline::stalled(last_moved, self.stall_timeout, tokio::time::sleep_until) => false,
        };
        if idle {
            self.checkin(conn);
        }
    }

    fn checkin(&self, conn: Conn) {
        if !conn.reusable() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.lock();
        while idle
            .front()
            .is_some_and(|i| idle.len() >= MAX_IDLE || now - i.since >= self.idle_timeout)
        {
            idle.pop_front();
        }
        idle.push_back(Idle { conn, since: now });
    }

    /// Sweeps the idle connections once a second until `stop`, so that
    /// connections the upstream closed do not wait for the next request.
    pub async fn run_sweeper(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                // Outside tokio's cooperative budget: each connection that
                // has news spends a unit of it, and past 128 the rest would
                // look quiet, closed ones staying half-closed until later
                // sweeps when an upstream restart closes hundreds at once.
                _ = tick.tick() => tokio::task::unconstrained(async { self.sweep() }).await,
            }
        }
    }

    /// Closes the idle connections that have expired or that the upstream
    /// has closed. Polling one reads its end of stream; the no-op waker is
    /// enough because whoever takes the connection next polls it again.
    fn sweep(&self) {
        let mut cx = Context::from_waker(Waker::noop());
        let now = Instant::now();
        self.lock()
            .retain_mut(|i| now - i.since < self.idle_timeout && i.conn.ready_now(&mut cx));
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Idle>> {
        crate::sync::lock(&self.idle)
    }
}

/// How long a connection must have been idle for a request on it to be
/// copied, so that it can be sent again should the connection fail before
/// the response. The failure this guards against is an upstream closing a
/// connection for idleness just as a request goes out on it, and no common
/// server closes a connection idle for less: a connection busy within the
/// last 100 ms is not at risk of it, and the busy path, where the copy (an
/// allocation for the header map) would cost most, never pays for it.
const RESEND_AFTER_IDLE: Duration = Duration::from_millis(100);

/// A copy of `request` to send again if the reused connection carrying it,
/// idle for `idle_for` before, turns out to have been closed as the request
/// went out (nginx's `proxy_next_upstream error`, Go's `Transport` do the
/// same). Only for a request that may be sent twice: GET, HEAD or OPTIONS
/// (safe methods, RFC 9110 §9.2.1) without a body.
fn resend_copy(
    request: &Request<UpstreamBody>,
    idle_for: Duration,
) -> Option<Request<UpstreamBody>> {
    if idle_for < RESEND_AFTER_IDLE || !super::may_resend(request) {
        return None;
    }
    let body = UpstreamBody {
        inner: crate::response::empty(),
        progress: None,
    };
    Some(super::head_copy(request, body))
}

/// Whether a request that went out failed because the connection was
/// closed or reset before the response head arrived: the sign of an
/// upstream that closed it as the request was on its way.
pub(super) fn closed_before_answer(e: &hyper::Error) -> bool {
    e.is_incomplete_message()
        || super::causes::<std::io::Error>(e)
            .next()
            .is_some_and(|io| crate::net::peer_gone(io.kind()))
}

/// Bytes of a request body taken as written after the upstream reset the
/// connection, before the failure is reported to hyper: a bound on what
/// is read from the client for nothing, far above what passes before the
/// upstream's answer (or the end of the connection) can be read.
const WRITTEN_AFTER_RESET: usize = 64 << 20;

/// An upstream connection's socket as hyper sees it. An upstream may answer
/// an upload early (413, 401) and close with the rest unread, so that its
/// kernel resets the connection; the answer can then still be read from
/// this side's socket, but the upload's next write fails first, and hyper,
/// told of the failure, gives up on the exchange without reading the
/// answer: the client would get 502 for the upstream's 413 whenever the
/// reset won the race. So once a write fails that way, later writes are
/// taken as written (up to [`WRITTEN_AFTER_RESET`] bytes), and hyper goes
/// on to read either the answer or the end of the connection, which fails
/// the exchange as before.
struct UpstreamIo {
    stream: TcpStream,
    /// Bytes taken as written since the reset, once there was one.
    after_reset: Option<usize>,
}

impl UpstreamIo {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            after_reset: None,
        }
    }

    /// What a write of `len` bytes that got `result` from the socket
    /// returns to hyper.
    fn written(
        &mut self,
        result: Poll<std::io::Result<usize>>,
        len: usize,
    ) -> Poll<std::io::Result<usize>> {
        match result {
            Poll::Ready(Err(e)) if crate::net::peer_gone(e.kind()) => {
                self.after_reset = Some(0);
                self.swallow(len)
            }
            other => other,
        }
    }

    fn swallow(&mut self, len: usize) -> Poll<std::io::Result<usize>> {
        let taken = self.after_reset.unwrap_or(0).saturating_add(len);
        if taken > WRITTEN_AFTER_RESET {
            return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        self.after_reset = Some(taken);
        Poll::Ready(Ok(len))
    }
}

impl tokio::io::AsyncRead for UpstreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for UpstreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.after_reset.is_some() {
            return self.swallow(buf.len());
        }
        let result = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.written(result, buf.len())
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        if self.after_reset.is_some() {
            return self.swallow(len);
        }
        let result = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.written(result, len)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.after_reset.is_some() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.after_reset.is_some() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A response body from the upstream that also drives its connection, and
/// returns the connection to the pool once the body has been read to the
/// end. Dropped before that (the client went away), it closes the
/// connection: what is left of the response would otherwise arrive as the
/// start of the next one.
pub struct PooledBody {
    inner: Incoming,
    conn: Option<Conn>,
    pool: Arc<Pool>,
    /// The request body's progress, when it had a body: the connection may
    /// still be writing it when the response is over.
    upload: Option<Arc<Progress>>,
}

impl hyper::body::Body for PooledBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Some(conn) = self.conn.as_mut()
            && !conn.drive(cx)
        {
            // Finished, but what it read is still in the body's channel.
            self.conn = None;
        }
        let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) else {
            return self.poll_stall(cx);
        };
        if let Some(conn) = self.conn.as_mut() {
            conn.moved();
        }
        match &frame {
            // A broken body leaves the connection in an unknown state.
            Some(Err(_)) => self.conn = None,
            None => self.release(),
            // Trailers end a chunked body, and hyper's server drops the
            // body once it has them, without asking for its end.
            Some(Ok(frame)) if frame.is_trailers() || self.inner.is_end_stream() => self.release(),
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl PooledBody {
    /// The body is waiting for the upstream: pending until it has waited
    /// for the stall timeout since the last frame. Then the upstream
    /// connection, in the middle of a response, is closed rather than
    /// reused, and closing it fails the body with hyper's "incomplete"
    /// error, which makes the client's connection end without the response
    /// looking complete.
    #[cold]
    #[inline(never)]
    fn poll_stall(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, hyper::Error>>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Pending;
        };
        ready!(conn.poll_stalled(cx));
        self.conn = None;
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn release(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            conn.body_done();
            self.pool.release(conn, self.upload.take());
        }
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body with nothing to read (204, HEAD, `Content-Length: 0`) may
        // never be polled at all.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::Method;

    fn request(method: Method, body: crate::response::Body) -> Request<UpstreamBody> {
        let mut request = Request::new(UpstreamBody {
            inner: body,
            progress: None,
        });
        *request.method_mut() = method;
        *request.uri_mut() = hyper::Uri::from_static("/r?q=1");
        request
            .headers_mut()
            .insert("host", hyper::header::HeaderValue::from_static("a.test"));
        request
    }

    #[test]
    fn only_safe_bodiless_requests_on_long_idle_connections_are_copied() {
        let idle = RESEND_AFTER_IDLE;
        for method in [Method::GET, Method::HEAD, Method::OPTIONS] {
            let original = request(method.clone(), crate::response::empty());
            let copy = resend_copy(&original, idle).expect("copied");
            assert_eq!(copy.method(), method);
            assert_eq!(copy.uri(), original.uri());
            assert_eq!(copy.headers(), original.headers());
            assert!(copy.body().is_end_stream());
        }
        let get = request(Method::GET, crate::response::empty());
        assert!(resend_copy(&get, idle / 2).is_none(), "recently busy");
        let post = request(Method::POST, crate::response::empty());
        assert!(resend_copy(&post, idle).is_none(), "not safe");
        let with_body = request(Method::GET, crate::response::full("x"));
        assert!(resend_copy(&with_body, idle).is_none(), "has a body");
    }
}
