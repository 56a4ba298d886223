//! The reverse proxy to the upstream (SPEC §3).
//!
//! Bodies stream both ways: the incoming request body is handed to the
//! upstream request as it arrives, and the upstream's response body reaches
//! the client chunk by chunk, so uploads and server-sent events are never
//! held in memory. Connections to the upstream are pooled and kept alive:
//! plain requests use [`pool`], whose connections are driven by the task
//! serving the client; upgrades and forward-auth checks use hyper-util's
//! pooled client. WebSocket upgrades to paths that are not the gateway's
//! are tunneled: after the upstream's 101 both upgraded sockets are spliced
//! together.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::config::{self, UpstreamConfig};
use crate::deadline::{self, Deadlines};
use crate::metrics::Metrics;
use crate::request::{self, HostError, header_has_token};
use crate::response::{self, Body};
use crate::shutdown::{Background, Shutdown};
use crate::ws::ClientStream;

pub mod pool;

use pool::{Pool, PoolError, PooledBody};

/// Why a request could not be proxied; each maps to the status of SPEC §3.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// `upstream.url` is empty.
    #[error("no upstream configured")]
    NoUpstream,
    /// The request's `Host` is missing, repeated or malformed.
    #[error("bad request: {0}")]
    BadHost(#[from] HostError),
    /// The request target cannot be passed on: a target in absolute form
    /// that names no HTTP host, one in authority form on a method other
    /// than `CONNECT`, or a path that would leave the base path of
    /// `upstream.url`.
    #[error("bad request: {0}")]
    BadTarget(&'static str),
    /// Connection refused, reset, or the upstream broke the protocol.
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    /// The upstream's response cannot be passed on as it was meant.
    #[error("bad response from upstream: {0}")]
    BadResponse(&'static str),
    /// No response headers (or no connection) within the time allowed.
    #[error("upstream timed out")]
    Timeout,
    /// The client's own request body failed: it broke the chunked framing,
    /// or the client stopped sending before its end. Nothing is wrong with
    /// the upstream, so this is no 502.
    #[error("bad request: {0}")]
    ClientBody(BodyFault),
    /// A `CONNECT`: a reverse proxy has no tunnels to open to other hosts.
    #[error("CONNECT is not supported")]
    Connect,
    /// The request body has a transfer coding besides chunked, which the
    /// gateway does not implement (RFC 9112 §6.1).
    #[error("transfer coding not implemented")]
    UnsupportedCoding,
}

impl ProxyError {
    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoUpstream => StatusCode::NOT_FOUND,
            Self::BadHost(_) | Self::BadTarget(_) | Self::ClientBody(_) => StatusCode::BAD_REQUEST,
            Self::Unreachable(_) | Self::BadResponse(_) => StatusCode::BAD_GATEWAY,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::UnsupportedCoding => StatusCode::NOT_IMPLEMENTED,
            Self::Connect => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The gateway's response. A refused `CONNECT` lists what is allowed
    /// (RFC 9110 §15.5.6) and closes the connection: the client may
    /// already be sending what it meant for the tunnel, which must not be
    /// read as the next request.
    pub fn response(&self) -> Response<Body> {
        let message = match self {
            // The cause is for the log, not for the client.
            Self::Unreachable(_) => "upstream unreachable".to_string(),
            other => other.to_string(),
        };
        let mut response = response::text(self.status(), message);
        if let Self::Connect = self {
            let headers = response.headers_mut();
            headers.insert(header::ALLOW, HeaderValue::from_static(ALLOWED));
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// What was wrong with a client's request body, as the proxy saw it while
/// passing the body on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyFault {
    /// The chunked framing was broken.
    #[error("malformed request body")]
    Malformed,
    /// The client closed or reset its connection before the body's end.
    /// Nobody may read the answer; one that half-closed will.
    #[error("request body incomplete")]
    Incomplete,
}

impl BodyFault {
    const NONE: u8 = 0;

    /// Sorts the error a client's body returned: an end of stream or a
    /// reset before the body's end is the client going away, anything else
    /// is bad framing (hyper reports both as I/O errors under its own).
    fn of(e: &hyper::Error) -> Self {
        match causes::<std::io::Error>(e).next().map(std::io::Error::kind) {
            Some(kind)
                if kind == std::io::ErrorKind::UnexpectedEof || crate::net::peer_gone(kind) =>
            {
                Self::Incomplete
            }
            _ => Self::Malformed,
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::Malformed => 1,
            Self::Incomplete => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Malformed),
            2 => Some(Self::Incomplete),
            _ => None,
        }
    }
}

/// The methods the proxy forwards, for the `Allow` of its 405 to
/// `CONNECT`: the standard ones but `CONNECT` (any other method is
/// forwarded too, but cannot be listed).
const ALLOWED: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH";

/// How long an idle upstream connection is kept for reuse.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A pooled HTTP client bound to the upstream's base URL. Shared by the
/// proxy and by forward auth.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, UpstreamBody>,
    base: Option<Base>,
    /// Connections for plain proxied requests; `None` without an upstream.
    pool: Option<Arc<Pool>>,
}

/// The upstream's base URL, split once so that building each request's URI
/// is a few reference-count increments, not a format and a parse.
#[derive(Clone)]
struct Base {
    authority: Authority,
    /// The `Host` header for requests that arrived without one.
    host: HeaderValue,
    /// The base path without its trailing `/`; usually empty.
    prefix: String,
}

impl Base {
    /// `path_and_query` below the base path.
    fn join(&self, path_and_query: &str) -> Result<PathAndQuery, ProxyError> {
        if self.prefix.is_empty() {
            PathAndQuery::try_from(path_and_query)
        } else {
            PathAndQuery::try_from(format!("{}{path_and_query}", self.prefix))
        }
        .map_err(bad_uri)
    }

    /// A client's path and query below the base path: the client's parsed
    /// path itself when the base URL has none (the common case: no copy).
    /// Below a base path, a path with dot segments is refused rather than
    /// passed on: an upstream that resolves `/api/../admin` would serve
    /// what lies outside the base path. `OPTIONS *` asks about the server
    /// as a whole, so it goes on as it came. An absolute-form target is
    /// rebuilt from its path and query, so that one with no path
    /// (`http://h?q`, `http://h#f`) goes on as `/` (RFC 9112 §3.2.1): the
    /// parsed URI keeps such a path empty, and an empty target is one
    /// upstreams read in different ways.
    fn below(&self, original: &Uri) -> Result<PathAndQuery, ProxyError> {
        let Some(path) = original.path_and_query() else {
            return self.join("/");
        };
        if path.as_str() == "*" {
            return Ok(path.clone());
        }
        if !self.prefix.is_empty() && has_dot_segment(original.path()) {
            return Err(ProxyError::BadTarget(
                "a path with dot segments below the upstream's base path",
            ));
        }
        if original.authority().is_some() {
            return match original.query() {
                Some(query) => self.join(&format!("{}?{query}", original.path())),
                None => self.join(original.path()),
            };
        }
        if self.prefix.is_empty() {
            Ok(path.clone())
        } else {
            self.join(path.as_str())
        }
    }

    fn absolute(&self, path: PathAndQuery) -> Result<Uri, ProxyError> {
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(bad_uri)
    }
}

/// Whether `path` has a `.` or `..` segment as some server behind the
/// gateway may read it: with its dots, slashes or semicolons
/// percent-encoded (`%2e`, `%2f`, `%3b`), encoded twice (`%252e`), as
/// overlong UTF-8 (`%c0%ae`, `%e0%80%ae`), in IIS's `%u` form (`%u002e`),
/// as fullwidth characters (`%ef%bc%8e`, which Unicode normalisation turns
/// into a dot), with backslashes for slashes, with path parameters after
/// a `;` (`..;`, which Java servers read as `..`) or with trailing spaces
/// (`..%20`, which Windows drops).
fn has_dot_segment(path: &str) -> bool {
    if !path.contains('%') && !path.contains('\\') {
        // Nothing to decode: the path is read as it is, without copies.
        return path.contains('.') && has_dot_name(path);
    }
    // `%25` first, so that what was encoded twice is decoded twice.
    let decoded = ENCODED_PATH_CHARACTERS.iter().fold(
        path.to_ascii_lowercase().replace("%25", "%"),
        |path, (encoded, plain)| {
            if path.contains(encoded) {
                path.replace(encoded, plain)
            } else {
                path
            }
        },
    );
    has_dot_name(&decoded)
}

/// Whether a segment of `path` names `.` or `..`, once its parameters
/// (after `;`) and trailing spaces are left out.
fn has_dot_name(path: &str) -> bool {
    path.split('/').any(|segment| {
        let name = segment.split(';').next().unwrap_or(segment);
        let name = name.trim_end_matches(' ');
        name == "." || name == ".."
    })
}

/// The ways of writing a dot, a slash, a semicolon or a space that some
/// server reads as one, lowercase. The longer forms come first: `%2e`
/// would otherwise turn the end of `%u002e` into a dot and leave `%u00.`.
const ENCODED_PATH_CHARACTERS: &[(&str, &str)] = &[
    ("%e0%80%ae", "."),
    ("%ef%bc%8e", "."),
    ("%e0%80%af", "/"),
    ("%ef%bc%8f", "/"),
    ("%ef%bc%bc", "/"),
    ("%c0%ae", "."),
    ("%c0%af", "/"),
    ("%u002e", "."),
    ("%uff0e", "."),
    ("%u002f", "/"),
    ("%u005c", "/"),
    ("%uff0f", "/"),
    ("%2e", "."),
    ("%2f", "/"),
    ("%5c", "/"),
    ("%3b", ";"),
    ("%20", " "),
    ("\\", "/"),
];

fn bad_uri(e: impl std::fmt::Display) -> ProxyError {
    ProxyError::Unreachable(format!("cannot build upstream URI: {e}"))
}

impl Upstream {
    /// Builds the client; with an empty `upstream.url` every call answers
    /// [`ProxyError::NoUpstream`]. The client's connections, and uploads
    /// still being written after their response, run in `background`.
    pub fn new(config: &UpstreamConfig, background: &Background) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config::secs(config.connect_timeout_secs)));
        connector.set_nodelay(true);
        let client = Client::builder(background.clone())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .build(connector);
        let base = config.url.parse::<Uri>().ok().and_then(|uri| {
            let authority = uri.authority()?.clone();
            Some(Base {
                host: HeaderValue::from_str(authority.as_str()).ok()?,
                authority,
                prefix: uri.path().trim_end_matches('/').to_string(),
            })
        });
        let pool = base.as_ref().map(|base| {
            let target = format!(
                "{}:{}",
                base.authority.host(),
                base.authority.port_u16().unwrap_or(80)
            );
            Arc::new(Pool::new(
                target,
                config::secs(config.connect_timeout_secs),
                IDLE_TIMEOUT,
                config::secs(config.timeout_secs),
                background.clone(),
            ))
        });
        Self { client, base, pool }
    }

    /// Closes idle pooled connections the upstream has closed or that have
    /// expired, until `stop`; returns at once without an upstream.
    pub async fn run_sweeper(self, stop: CancellationToken) {
        if let Some(pool) = self.pool {
            pool.run_sweeper(stop).await;
        }
    }

    /// The upstream URI for a path and query, below the base path.
    pub fn uri_for(&self, path_and_query: &str) -> Result<Uri, ProxyError> {
        let base = self.base()?;
        base.absolute(base.join(path_and_query)?)
    }

    /// The absolute upstream URI for a client's request (hyper-util's client
    /// wants one).
    fn uri_from(&self, original: &Uri) -> Result<Uri, ProxyError> {
        let base = self.base()?;
        base.absolute(base.below(original)?)
    }

    /// The origin-form URI (path and query only) for a client's request sent
    /// on a connection of [`pool`].
    fn origin_form(&self, original: &Uri) -> Result<Uri, ProxyError> {
        Ok(Uri::from(self.base()?.below(original)?))
    }

    /// The `Host` header for a request that arrived without one.
    fn host(&self) -> Result<HeaderValue, ProxyError> {
        Ok(self.base()?.host.clone())
    }

    fn base(&self) -> Result<&Base, ProxyError> {
        self.base.as_ref().ok_or(ProxyError::NoUpstream)
    }

    /// Sends a request and waits for the response headers, giving up when
    /// the upstream takes longer than `timeout` between two chunks of the
    /// request body, or to answer once it has the whole request.
    pub async fn send(
        &self,
        request: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, ProxyError> {
        self.send_once(request, timeout).await.map_err(|(e, _)| e)
    }

    /// Like [`Upstream::send`] for a request that may go twice (a GET with
    /// no body: an upgrade, a forward-auth check): sent again, once, on
    /// another connection when a kept-alive connection it went out on was
    /// closed before the answer, the race with an upstream's keep-alive
    /// timeout that plain proxied requests are also covered against. Both
    /// attempts share one `timeout`: an upstream that holds each connection
    /// and then drops it must not make the client wait twice as long.
    pub async fn send_idempotent(
        &self,
        request: Request<Body>,
        again: impl FnOnce() -> Result<Request<Body>, ProxyError>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, ProxyError> {
        let started = Instant::now();
        match self.send_once(request, timeout).await {
            Err((e, true)) => {
                debug!(error = %e, "upstream closed the connection before answering; sending again");
                let left = timeout.saturating_sub(started.elapsed());
                if left.is_zero() {
                    return Err(ProxyError::Timeout);
                }
                self.send(again()?, left).await
            }
            result => result.map_err(|(e, _)| e),
        }
    }

    /// One attempt; a failure says whether the connection was closed
    /// before the answer came.
    async fn send_once(
        &self,
        request: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, (ProxyError, bool)> {
        // Rare (upgrades, forward auth): a timer of its own.
        let deadlines = Deadlines::new();
        let result = timed(request, timeout, &deadlines, |request| {
            self.client.request(request)
        })
        .await
        .map_err(|e| (e, false))?;
        match result {
            Ok(response) => Ok(response),
            Err(e) if is_timeout(&e) => Err((ProxyError::Timeout, false)),
            Err(e) => {
                let closed = causes::<hyper::Error>(&e)
                    .next()
                    .is_some_and(pool::closed_before_answer);
                Err((ProxyError::Unreachable(error_chain(&e)), closed))
            }
        }
    }

    /// Like [`Upstream::send`] for a plain request with an origin-form URI,
    /// on a connection of [`pool`] that the response body then drives, and
    /// with the timer of the client's connection.
    async fn send_pooled(
        &self,
        request: Request<Body>,
        timeout: Duration,
        deadlines: &Deadlines,
    ) -> Result<Response<PooledBody>, ProxyError> {
        let pool = self.pool.as_ref().ok_or(ProxyError::NoUpstream)?;
        match timed(request, timeout, deadlines, |request| pool.send(request)).await? {
            Ok(response) => Ok(response),
            Err(PoolError::ConnectTimeout) => Err(ProxyError::Timeout),
            Err(PoolError::Http(e)) if is_timeout(&e) => Err(ProxyError::Timeout),
            Err(PoolError::UnaskedSwitch) => Err(ProxyError::BadResponse(
                "101 to a request that did not ask to switch protocols",
            )),
            Err(e) => Err(ProxyError::Unreachable(error_chain(&e))),
        }
    }
}

/// Runs `send` on `request`, giving up when the exchange stands still for
/// `timeout`: the upstream may take that long between two chunks of the
/// request body, and that long to answer once it has the whole request. A
/// clock on the whole exchange would cut off every upload that takes longer
/// than `timeout` to transfer, however well it flows. A request without a
/// body needs only one deadline.
///
/// When the exchange fails because the client's own body did, that is
/// what is reported: the upstream connection fails with it, and would
/// otherwise be blamed.
async fn timed<T, E, F: Future<Output = Result<T, E>>>(
    request: Request<Body>,
    timeout: Duration,
    deadlines: &Deadlines,
    send: impl FnOnce(Request<UpstreamBody>) -> F,
) -> Result<Result<T, E>, ProxyError> {
    if hyper::body::Body::is_end_stream(request.body()) {
        let request = request.map(|inner| UpstreamBody {
            inner,
            progress: None,
        });
        return tokio::select! {
            biased;
            result = send(request) => Ok(result),
            _ = deadlines.after(timeout) => Err(ProxyError::Timeout),
        };
    }
    let progress = Arc::new(Progress::new());
    let request = request.map(|inner| UpstreamBody {
        inner,
        progress: Some(progress.clone()),
    });
    tokio::select! {
        result = send(request) => match progress.fault() {
            Some(fault) if result.is_err() => Err(ProxyError::ClientBody(fault)),
            _ => Ok(result),
        },
        () = deadline::stalled(|| progress.last(), timeout, |at| deadlines.at(at)) => {
            Err(ProxyError::Timeout)
        }
    }
}

/// When a request to the upstream last moved: created, or a chunk of its
/// body (or its end) taken by the upstream connection. Nanoseconds since
/// `start`, so the body can record it with one atomic store. And whether
/// the client's body failed, which only its wrapper can see: the upstream
/// connection reports the failure as its own.
struct Progress {
    start: tokio::time::Instant,
    last: AtomicU64,
    /// A [`BodyFault`] code, or [`BodyFault::NONE`].
    fault: AtomicU8,
}

impl Progress {
    fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            last: AtomicU64::new(0),
            fault: AtomicU8::new(BodyFault::NONE),
        }
    }

    fn failed(&self, fault: BodyFault) {
        self.fault.store(fault.code(), Ordering::Relaxed);
    }

    fn fault(&self) -> Option<BodyFault> {
        BodyFault::from_code(self.fault.load(Ordering::Relaxed))
    }

    fn touch(&self) {
        let nanos = self.start.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        self.last.store(nanos, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.start + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

/// A request body on its way to the upstream. With `progress`, it reports
/// each time the upstream connection takes a frame from it; otherwise it is
/// the body unchanged (size hint included, so a `Content-Length` upload
/// stays one).
pub struct UpstreamBody {
    inner: Body,
    progress: Option<Arc<Progress>>,
}

impl hyper::body::Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Poll::Ready(frame), Some(progress)) = (&polled, &self.progress) {
            progress.touch();
            if let Some(Err(e)) = frame {
                progress.failed(BodyFault::of(e));
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The client end of a connection, as the proxy reports it upstream.
/// Its `X-Forwarded-For` entry is formatted at most once per client
/// connection, at its first proxied request: formatting the address is a
/// large share of what the gateway itself adds to a small proxied request,
/// and a WebSocket connection never needs it.
pub struct Peer {
    addr: SocketAddr,
    forwarded_for: OnceLock<Option<HeaderValue>>,
}

impl Peer {
    /// The peer at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            forwarded_for: OnceLock::new(),
        }
    }

    /// The client's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The entry this client adds to `X-Forwarded-For`.
    fn forwarded_for(&self) -> Option<&HeaderValue> {
        self.forwarded_for
            .get_or_init(|| HeaderValue::from_str(&self.addr.ip().to_string()).ok())
            .as_ref()
    }
}

/// The proxy service for everything that is not a gateway WebSocket.
pub struct Proxy {
    upstream: Upstream,
    timeout: Duration,
    metrics: Metrics,
    shutdown: Shutdown,
}

impl Proxy {
    /// A proxy to `upstream`; tunnels are tracked by `shutdown`.
    pub fn new(
        upstream: Upstream,
        config: &UpstreamConfig,
        metrics: Metrics,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            upstream,
            timeout: config::secs(config.timeout_secs),
            metrics,
            shutdown,
        }
    }

    /// The upstream it forwards to (the gateway runs its pool's sweeper).
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Forwards one request and returns the upstream's response, or the
    /// gateway's error response.
    pub async fn forward(
        &self,
        request: Request<Incoming>,
        client: &Peer,
        deadlines: &Deadlines,
    ) -> Response<Body> {
        let started = Instant::now();
        let has_body = !hyper::body::Body::is_end_stream(request.body());
        let response = match self.try_forward(request, client, deadlines).await {
            Ok(response) => response,
            Err(e) => {
                debug!(error = %e, "proxy error");
                let mut response = e.response();
                if has_body {
                    // The body may be unread, and hyper closes a connection
                    // whose request body it did not reach the end of: say so,
                    // so that the client does not send its next request there.
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                response
            }
        };
        self.metrics
            .proxy_request(response.status(), started.elapsed().as_secs_f64());
        response
    }

    async fn try_forward(
        &self,
        request: Request<Incoming>,
        client: &Peer,
        deadlines: &Deadlines,
    ) -> Result<Response<Body>, ProxyError> {
        if request.method() == Method::CONNECT {
            return Err(ProxyError::Connect);
        }
        // An HTTP/1.0 request's `Upgrade` is ignored (RFC 9110 §7.8): it
        // goes as a plain request, without it, as a hop-by-hop header. So
        // does one with a body (a server may ignore any `Upgrade`): the
        // tunnel's client would hold that body, and with it both
        // connections, for as long as it stalls, where a plain request's
        // upload has the upstream timeout for a bound.
        if request.version() == hyper::Version::HTTP_11
            && is_upgrade(request.headers())
            && hyper::body::Body::is_end_stream(request.body())
        {
            // Rare and large: boxed, so it does not size every request's
            // future.
            return Box::pin(self.tunnel(request, client)).await;
        }
        let outgoing = self.outgoing(request, client, false)?;
        let mut response =
            Box::pin(self.upstream.send_pooled(outgoing, self.timeout, deadlines)).await?;
        prepare_response(&mut response)?;
        Ok(response.map(Body::pooled))
    }

    /// Forwards an upgrade request; after the upstream's 101 both upgraded
    /// connections are spliced together.
    async fn tunnel(
        &self,
        mut request: Request<Incoming>,
        client: &Peer,
    ) -> Result<Response<Body>, ProxyError> {
        let client_upgrade = hyper::upgrade::on(&mut request);
        let outgoing = self.outgoing(request, client, true)?;
        let mut response = if may_resend(&outgoing) {
            let copy = head_copy(&outgoing, response::empty());
            self.upstream
                .send_idempotent(outgoing, || Ok(copy), self.timeout)
                .await?
        } else {
            self.upstream.send(outgoing, self.timeout).await?
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            self.shutdown.spawn(splice(
                client_upgrade,
                upstream_upgrade,
                self.shutdown.clone(),
            ));
            let (parts, _) = response.into_parts();
            return Ok(Response::from_parts(parts, response::empty()));
        }
        prepare_response(&mut response)?;
        refusal(response, self.timeout).await
    }

    /// The upstream request: same method, path, query, headers (minus
    /// hop-by-hop) and streaming body, plus the `X-Forwarded-*` headers.
    /// Upgrades go through hyper-util's client, which wants an absolute URI;
    /// plain requests go on a pooled connection as origin-form.
    fn outgoing(
        &self,
        request: Request<Incoming>,
        client: &Peer,
        upgrade: bool,
    ) -> Result<Request<Body>, ProxyError> {
        let (mut parts, body) = request.into_parts();
        let host = self.host(&mut parts)?;
        // The asterisk form is for OPTIONS alone (RFC 9112 §3.2.4).
        if parts.uri.path() == "*" && parts.method != Method::OPTIONS {
            return Err(ProxyError::BadTarget(
                "an asterisk target on a method other than OPTIONS",
            ));
        }
        parts.uri = if upgrade {
            self.upstream.uri_from(&parts.uri)?
        } else {
            self.upstream.origin_form(&parts.uri)?
        };
        parts.version = hyper::Version::HTTP_11;
        request_headers(&mut parts.headers, upgrade)?;
        // hyper read `010` as ten bytes; an upstream that reads it as octal
        // would take the last two for the start of another request.
        canonical_length(&mut parts.headers);
        append_forwarded_for(&mut parts.headers, client);
        parts
            .headers
            .insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        parts.headers.insert(X_FORWARDED_HOST, host);
        if has_unsized_body(&body) {
            // hyper's client sends a GET or HEAD whose body it cannot size
            // without that body, taking it for one that has none; the
            // chunked coding it received goes on with it, whatever the
            // method (for the others hyper would set it itself).
            parts.headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        Ok(Request::from_parts(parts, Body::stream(body)))
    }

    /// Checks the request's `Host` and settles the one the upstream gets
    /// (also its `X-Forwarded-Host`): the received one; the target's, for
    /// a target in absolute form; the upstream's own for an HTTP/1.0
    /// request without any. Called before the target is rewritten.
    fn host(&self, parts: &mut hyper::http::request::Parts) -> Result<HeaderValue, ProxyError> {
        let received = request::host(parts.version, &parts.headers)?.cloned();
        let host = match (parts.uri.authority(), received) {
            (None, Some(received)) => return Ok(received),
            (Some(target), _) => target_host(&parts.uri, target)?,
            (None, None) => self.upstream.host()?,
        };
        parts.headers.insert(header::HOST, host.clone());
        Ok(host)
    }
}

/// Whether a request body came chunked: there is more to read and no
/// length to give for it.
fn has_unsized_body(body: &Incoming) -> bool {
    use hyper::body::Body as _;
    !body.is_end_stream() && body.size_hint().exact().is_none()
}

/// The `Host` for a request whose target is in absolute form
/// (`GET http://example.com/p`): the target's host and port, which a proxy
/// must put in place of any `Host` it received (RFC 9112 §3.2.2), checked
/// as a received `Host` is. The target must name an HTTP host: a scheme
/// other than `http` or `https`, user information (which RFC 9110 §4.2.4
/// asks a recipient to treat as an error) or a target in authority form
/// (`GET example.com:80`, for `CONNECT` only) gets 400.
pub(crate) fn target_host(uri: &Uri, target: &Authority) -> Result<HeaderValue, ProxyError> {
    let scheme = uri
        .scheme()
        .ok_or(ProxyError::BadTarget("a target in authority form"))?;
    if *scheme != Scheme::HTTP && *scheme != Scheme::HTTPS {
        return Err(ProxyError::BadTarget("a target that is not an http URI"));
    }
    let target = target.as_str();
    if target.contains('@') {
        return Err(ProxyError::BadTarget("user information in the target"));
    }
    if !request::is_host_and_port(target.as_bytes()) {
        return Err(ProxyError::BadHost(HostError::Invalid));
    }
    HeaderValue::from_str(target).map_err(|_| ProxyError::BadHost(HostError::Invalid))
}

/// Replaces a `Content-Length` whose value is not a number written plainly
/// (`5, 5`, `005`, two field lines) with that number, so that a peer that
/// reads only plain numbers, or reads a leading zero as octal, frames the
/// body as the gateway did.
fn canonical_length(headers: &mut HeaderMap) {
    let plain = |v: &HeaderValue| {
        let b = v.as_bytes();
        !b.is_empty() && b.iter().all(u8::is_ascii_digit) && (b.len() == 1 || b[0] != b'0')
    };
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = lengths.next() else {
        return;
    };
    if plain(first) && lengths.next().is_none() {
        return;
    }
    // hyper checks that the values agree only when it frames a body by
    // them, which it does not for HEAD, 204 and 304: values that do not
    // agree there are dropped rather than one of them picked.
    let mut values = headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("x").split(','))
        .map(|v| v.trim().parse::<u64>().ok());
    let first = values.next().flatten();
    let length = first.filter(|&length| values.all(|v| v == Some(length)));
    match length {
        Some(length) => headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length)),
        None => headers.remove(header::CONTENT_LENGTH),
    };
}

/// Whether a request may be sent twice: a safe method (RFC 9110 §9.2.1)
/// and no body. Such a request, when the connection it went out on was
/// closed before the answer, goes again on another.
fn may_resend<B: hyper::body::Body>(request: &Request<B>) -> bool {
    matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    ) && request.body().is_end_stream()
}

/// `request`'s method, target, version and headers, with `body`.
fn head_copy<B, C>(request: &Request<B>, body: C) -> Request<C> {
    let mut copy = Request::new(body);
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// Copies bytes both ways between the client's and the upstream's upgraded
/// connections until either side closes or shutdown is forced.
async fn splice(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    shutdown: Shutdown,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            debug!(error = %e, "tunnel upgrade failed");
            return;
        }
    };
    // The client's stream as the gateway serves it, so that it does not
    // linger when the upstream ends its half: what the client sends after
    // that is the upstream's.
    let Some((mut client, ahead)) = ClientStream::from_upgraded(client) else {
        tracing::error!("upgraded tunnel connection is not a client stream");
        return;
    };
    client.without_lingering();
    let mut upstream = TokioIo::new(upstream);
    let tunnel = async {
        // What the client sent after its request head, read with it; then
        // hyper's read buffer, which it shares, is let go.
        upstream.write_all(&ahead).await?;
        drop(ahead);
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await
    };
    tokio::select! {
        result = tunnel => {
            if let Err(e) = result {
                debug!(error = %e, "tunnel ended");
            }
        }
        _ = shutdown.forced().cancelled() => {}
    }
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1,
/// plus the proxy headers of RFC 2616 that intermediaries still strip).
/// Constants, so removing them hashes no parsed strings. `Trailer` is not
/// among them: it names the fields that follow a response's body, which
/// pass on with it (hyper writes them only where the chunked coding can
/// carry them, and to a client that said `TE: trailers`). A request's is
/// removed with them (see [`request_headers`]).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes hop-by-hop headers, including those named in `Connection`. For a
/// tunneled upgrade, `Upgrade` and `Connection: upgrade` are kept: they are
/// the point of the request.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if has_hop_by_hop(headers) {
        remove_hop_by_hop(headers, keep_upgrade);
    }
}

/// Whether any hop-by-hop header is present. Most messages carry none of
/// them: one pass over the names is much cheaper than nine lookups, each of
/// which hashes its name.
fn has_hop_by_hop(headers: &HeaderMap) -> bool {
    headers.keys().any(|name| HOP_BY_HOP.contains(name))
}

/// The work of [`strip_hop_by_hop`] once a hop-by-hop header was found.
fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let upgrade = if keep_upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            // `Host` names the target, not the connection: HTTP/1.1 needs it
            // (RFC 9112 §3.2) whatever `Connection` says.
            .filter(|name| *name != header::HOST)
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::UPGRADE, upgrade);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Readies a client request's headers for the upstream: hop-by-hop headers
/// go, and a transfer coding other than plain chunked is refused. hyper
/// has already answered 400 to codings that do not end in chunked, and it
/// reads the others as chunked and nothing more, so `gzip, chunked` would
/// reach the upstream as plain chunked with the gzip bytes as the content.
/// nginx answers 501 too. A client's `TE: trailers` is passed on (and the
/// rest of its `TE` is not): the gateway passes the upstream's trailers on
/// to it, so the upstream may send them. The client's own trailers are not
/// passed on, as nginx does not: an upstream that merges them into the
/// headers would take in fields the gateway sets or removes
/// (`X-Forwarded-For`, hop-by-hop ones). Without its `Trailer`, hyper
/// leaves them out. Only a chunked body has trailers, and its
/// `Transfer-Encoding` brings a request here.
fn request_headers(headers: &mut HeaderMap, keep_upgrade: bool) -> Result<(), ProxyError> {
    if !has_hop_by_hop(headers) {
        return Ok(());
    }
    if headers.contains_key(header::TRANSFER_ENCODING) && !is_plain_chunked(headers) {
        return Err(ProxyError::UnsupportedCoding);
    }
    let trailers = accepts_trailers(headers);
    remove_hop_by_hop(headers, keep_upgrade);
    headers.remove(header::TRAILER);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    Ok(())
}

/// Whether the client's `TE` lists `trailers` (RFC 9110 §10.1.4).
fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|member| {
            let coding = member.split(';').next().unwrap_or_default();
            coding.trim().eq_ignore_ascii_case("trailers")
        })
}

/// Readies an upstream response for the client: its status checked, its
/// headers rid of hop-by-hop ones, one `Content-Length`, and the gateway's
/// HTTP version, not the upstream's (RFC 9110 §6.2; hyper answers an
/// HTTP/1.0 client in its own).
fn prepare_response<B>(response: &mut Response<B>) -> Result<(), ProxyError> {
    let status = response.status();
    response_status(status)?;
    response_headers(response.headers_mut(), status)?;
    canonical_length(response.headers_mut());
    *response.version_mut() = hyper::Version::HTTP_11;
    Ok(())
}

/// Refuses a status outside 100–599, which hyper reads (any three digits
/// parse) but which is no HTTP status (RFC 9110 §15): the client could
/// not make sense of it, and no class says how to treat it. The upstream
/// is at fault, so the client gets 502.
fn response_status(status: StatusCode) -> Result<(), ProxyError> {
    if status.as_u16() < 600 {
        Ok(())
    } else {
        Err(ProxyError::BadResponse("a status code outside 100-599"))
    }
}

/// Readies an upstream response's headers for the client: hop-by-hop
/// headers go, and so does a `Content-Length` that came with
/// `Transfer-Encoding` (RFC 9112 §6.3). hyper read such a body as chunked;
/// the stale length left in would frame the client's copy and cut it short
/// where the client cannot tell. The gateway takes off only the chunked
/// coding: a response with any other transfer coding cannot be passed on
/// without handing the client coded bytes as if they were the content, so
/// it is refused.
fn response_headers(headers: &mut HeaderMap, status: StatusCode) -> Result<(), ProxyError> {
    if !has_hop_by_hop(headers) {
        return Ok(());
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        if !is_plain_chunked(headers) {
            return Err(ProxyError::BadResponse(
                "a transfer coding other than chunked",
            ));
        }
        headers.remove(header::CONTENT_LENGTH);
    }
    // A 426 names in `Upgrade` what the client must switch to (RFC 9110
    // §15.5.22): that is the message, not the connection.
    remove_hop_by_hop(headers, status == StatusCode::UPGRADE_REQUIRED);
    Ok(())
}

/// Largest refusal the gateway reads whole from the upstream to pass on:
/// the answer to an upgrade it did not switch, and forward auth's 401 or
/// 403. A refusal is a short explanation; more is not one.
pub const MAX_REFUSAL_BODY: usize = 64 * 1024;

/// The upstream's answer to an upgrade request that it did not switch,
/// read whole and passed on with its length: a client waiting for a
/// WebSocket gets an error it can read, and an upstream that stops sending
/// in the middle of it cannot hold the client (504), which a streamed body
/// from this path's client could.
async fn refusal(
    response: Response<Incoming>,
    timeout: Duration,
) -> Result<Response<Body>, ProxyError> {
    let (mut parts, body) = response.into_parts();
    let body = read_refusal(body, timeout).await?;
    // hyper writes the length of the body it now has.
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::TRANSFER_ENCODING);
    Ok(Response::from_parts(parts, response::full(body)))
}

/// A refusal's body from the upstream, read whole within `timeout`: at
/// most [`MAX_REFUSAL_BODY`] (502 beyond that, or when it breaks), 504
/// when it stalls.
pub async fn read_refusal(body: Incoming, timeout: Duration) -> Result<bytes::Bytes, ProxyError> {
    match tokio::time::timeout(timeout, Limited::new(body, MAX_REFUSAL_BODY).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(_)) => Err(ProxyError::BadResponse(
            "a refusal that is too large or broken",
        )),
        Err(_) => Err(ProxyError::Timeout),
    }
}

/// Whether the message's `Transfer-Encoding` is exactly `chunked`: one
/// field line, one coding.
fn is_plain_chunked(headers: &HeaderMap) -> bool {
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
    matches!(
        (codings.next(), codings.next()),
        (Some(coding), None) if coding.as_bytes().eq_ignore_ascii_case(b"chunked")
    )
}

/// Whether the request asks to switch to a protocol the gateway tunnels
/// (`Connection: upgrade`, and an `Upgrade` that offers more than `h2c`).
/// An offer of `h2c` alone, which HTTP clients such as `curl --http2` and
/// Java's `HttpClient` add to plain requests, is dropped with the other
/// hop-by-hop headers and the request is proxied as HTTP/1.1, as nginx
/// does: RFC 9113 §3.1 deprecates that upgrade, and taking it as a tunnel
/// would hold back the response of every such request.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    // `Upgrade` first: most requests have none, and then one lookup decides.
    headers
        .get_all(header::UPGRADE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .any(|offer| !offer.is_empty() && !offer.eq_ignore_ascii_case(b"h2c"))
        && header_has_token(headers, header::CONNECTION, "upgrade")
}

fn append_forwarded_for(headers: &mut HeaderMap, client: &Peer) {
    let Some(ip) = client.forwarded_for() else {
        return;
    };
    if !headers.contains_key(&X_FORWARDED_FOR) {
        headers.insert(X_FORWARDED_FOR, ip.clone());
        return;
    }
    let mut prior: Vec<&[u8]> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    prior.push(ip.as_bytes());
    if let Ok(value) = HeaderValue::from_bytes(&prior.join(&b", "[..])) {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    causes::<std::io::Error>(e).any(|io| io.kind() == std::io::ErrorKind::TimedOut)
}

/// The errors of type `T` in `e`'s chain of causes, outermost first:
/// hyper and its client report a broken or timed-out connection as an
/// error of their own with the I/O error beneath, and hyper-util's client
/// wraps hyper's.
fn causes<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a T> {
    std::iter::successors(Some(e), |err| err.source()).filter_map(|err| err.downcast_ref::<T>())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_standard_and_named_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-kept"]);
    }

    #[test]
    fn passes_on_a_clients_te_trailers_and_nothing_else_of_te_nor_its_trailer() {
        let readied = |te: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("connection", HeaderValue::from_static("TE"));
            h.insert("te", HeaderValue::from_static(te));
            h.insert("trailer", HeaderValue::from_static("x-sum"));
            request_headers(&mut h, false).expect("readied");
            (h.get("te").cloned(), h.get("trailer").cloned())
        };
        let trailers = Some(HeaderValue::from_static("trailers"));
        assert_eq!(readied("trailers"), (trailers.clone(), None));
        assert_eq!(readied("gzip;q=0.5, Trailers"), (trailers, None));
        assert_eq!(readied("gzip, deflate"), (None, None));
    }

    #[test]
    fn leaves_messages_without_hop_by_hop_headers_alone() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("example.com"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let before = h.clone();
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h, before);
    }

    #[test]
    fn an_offer_of_h2c_alone_is_no_tunnel() {
        let offers = |upgrade: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(
                "connection",
                HeaderValue::from_static("Upgrade, HTTP2-Settings"),
            );
            h.insert("upgrade", HeaderValue::from_static(upgrade));
            is_upgrade(&h)
        };
        assert!(!offers("h2c"));
        assert!(!offers(" H2C ,"));
        assert!(offers("websocket"));
        assert!(offers("h2c, websocket"));
        assert!(offers("SPDY/3.1"));
        let mut no_connection = HeaderMap::new();
        no_connection.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(!is_upgrade(&no_connection));
    }

    #[test]
    fn keeps_upgrade_for_tunnels() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(
            h.get("upgrade").map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert_eq!(
            h.get("connection").map(|v| v.as_bytes()),
            Some(&b"upgrade"[..])
        );
    }

    #[test]
    fn a_length_that_comes_with_chunked_coding_is_dropped() {
        let mut h = HeaderMap::new();
        h.insert("content-length", HeaderValue::from_static("2"));
        h.insert("transfer-encoding", HeaderValue::from_static("Chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        response_headers(&mut h, StatusCode::OK).expect("plain chunked passes");
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-kept"]);
    }

    #[test]
    fn a_response_with_another_transfer_coding_is_refused() {
        for codings in [
            &["gzip, chunked"][..],
            &["gzip", "chunked"],
            &["chunked", "chunked"],
        ] {
            let mut h = HeaderMap::new();
            for coding in codings {
                h.append("transfer-encoding", HeaderValue::from_static(coding));
            }
            assert!(
                matches!(
                    response_headers(&mut h, StatusCode::OK),
                    Err(ProxyError::BadResponse(_))
                ),
                "{codings:?}"
            );
        }
    }

    #[test]
    fn a_request_coded_besides_chunked_is_not_implemented() {
        let mut h = HeaderMap::new();
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        request_headers(&mut h, false).expect("plain chunked passes");
        assert!(h.is_empty());
        h.insert(
            "transfer-encoding",
            HeaderValue::from_static("gzip, chunked"),
        );
        assert!(matches!(
            request_headers(&mut h, false),
            Err(ProxyError::UnsupportedCoding)
        ));
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("2.2.2.2"));
        append_forwarded_for(&mut h, &Peer::new("10.0.0.1:5000".parse().expect("addr")));
        assert_eq!(
            h.get("x-forwarded-for").map(|v| v.as_bytes()),
            Some(&b"1.1.1.1, 2.2.2.2, 10.0.0.1"[..])
        );
    }

    #[test]
    fn joins_base_path() {
        let config = UpstreamConfig {
            url: "http://127.0.0.1:3000/api/".into(),
            ..UpstreamConfig::default()
        };
        let up = Upstream::new(&config, &Background::default());
        assert_eq!(
            up.uri_for("/x?y=1").expect("uri").to_string(),
            "http://127.0.0.1:3000/api/x?y=1"
        );
        assert!(matches!(
            Upstream::new(&UpstreamConfig::default(), &Background::default()).uri_for("/"),
            Err(ProxyError::NoUpstream)
        ));
    }
}
