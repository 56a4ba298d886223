//! The admin listener (SPEC §6): metrics, liveness, readiness and a view of
//! this instance's rooms. It is a separate port so none of this is exposed
//! to WebSocket clients, and it keeps answering while the public listener
//! drains, so orchestrators see `/readyz` turn 503.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::request::{self, percent_decode};
use crate::response::{self, Body};
use crate::rooms::Hub;
use crate::ws::{ClientStream, HoldSwitch};

/// What readiness depends on.
pub struct Health {
    draining: AtomicBool,
    nats_required: bool,
    metrics: Metrics,
}

impl Health {
    /// Ready until draining; with `nats_required`, only while NATS is up.
    pub fn new(nats_required: bool, metrics: Metrics) -> Self {
        Self {
            draining: AtomicBool::new(false),
            nats_required,
            metrics,
        }
    }

    /// Marks the gateway as draining: `/readyz` answers 503 from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// `Ok` when ready, else why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.draining.load(Ordering::SeqCst) {
            return Err("draining");
        }
        if self.nats_required && self.metrics.nats_connected.get() != 1 {
            return Err("NATS disconnected");
        }
        Ok(())
    }
}

/// How long an admin connection may take to finish the answer it is
/// writing once the admin port stops: a scraper that reads is done in
/// milliseconds, and one that does not is not waited for.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// How long a connection closed to make room for a new one may take to
/// finish the answer it is writing: the new one waits that long at most.
/// An idle one closes at once.
const EVICT_GRACE: Duration = Duration::from_millis(500);

/// The largest request head the admin port reads (431 beyond): probes and
/// scrapes send a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// The most admin connections served at once. Probes and scrapers use a
/// handful; the bound keeps clients of the admin port (idle ones, or ones
/// that leave large `/rooms` answers unread) from taking the memory and the
/// file descriptors the public port needs. A connection past the bound
/// closes the oldest one, so clients that hold connections open cannot
/// keep a probe out.
pub const MAX_CONNECTIONS: usize = 64;

/// The admin service's shared state.
pub struct Admin {
    /// Rendered at `/metrics`.
    pub metrics: Metrics,
    /// Listed at `/rooms`.
    pub hub: Arc<Hub>,
    /// Reported at `/readyz`.
    pub health: Arc<Health>,
}

impl Admin {
    /// Serves the admin endpoints on `listener` until `stop`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        let tasks = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let open = Arc::new(Open::default());
        loop {
            let stream = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let slot = tokio::select! {
                _ = stop.cancelled() => break,
                slot = take_slot(&slots, &open) => match slot {
                    Some(slot) => slot,
                    None => break,
                },
            };
            let close = stop.child_token();
            let entry = open.add(close.clone());
            let admin = self.clone();
            let stop = stop.clone();
            tasks.spawn(async move {
                // The entry goes before the slot: a slot freed while its
                // connection were still listed could have the next
                // eviction close nothing.
                let _held = (entry, slot);
                admin.serve_connection(stream, close, &stop).await;
            });
        }
        tasks.close();
        tasks.wait().await;
    }

    /// Serves one connection until it ends or `close` (the port stops, or a
    /// newer connection needs its slot).
    async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        close: CancellationToken,
        stop: &CancellationToken,
    ) {
        let service = service_fn(move |request| {
            let admin = self.clone();
            async move { Ok::<_, Infallible>(admin.route(request)) }
        });
        // The public port's client stream, for its bound on stalled
        // writes: a scraper that stops reading does not hold its
        // connection and megabytes of `/rooms` for ever.
        let stream = ClientStream::new(stream, HoldSwitch::default());
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .max_header_size(MAX_REQUEST_HEAD)
            .serve_connection(TokioIo::new(stream), service);
        let mut conn = pin!(conn);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            _ = close.cancelled() => {
                // An answer in progress is finished (an idle connection
                // closes at once), within a bound.
                conn.as_mut().graceful_shutdown();
                let grace = if stop.is_cancelled() { STOP_GRACE } else { EVICT_GRACE };
                tokio::time::timeout(grace, conn.as_mut())
                    .await
                    .unwrap_or(Ok(()))
            }
        };
        if let Err(e) = result {
            debug!(error = %e, "admin connection error");
        }
    }

    fn route(&self, request: Request<Incoming>) -> Response<Body> {
        if let Err(e) = request::host(request.version(), request.headers()) {
            return response::text(StatusCode::BAD_REQUEST, e.to_string());
        }
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let mut refused = response::text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD");
            refused.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static("GET, HEAD"),
            );
            return refused;
        }
        let path = request.uri().path();
        match path {
            "/healthz" => response::text(StatusCode::OK, "ok"),
            "/readyz" => match self.health.readiness() {
                Ok(()) => response::text(StatusCode::OK, "ready"),
                Err(why) => response::text(StatusCode::SERVICE_UNAVAILABLE, why),
            },
            "/metrics" => {
                let mut response = Response::new(response::full(self.metrics.render()));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            "/rooms" | "/rooms/" => response::json(
                StatusCode::OK,
                &RoomList {
                    rooms: self.hub.room_summaries(),
                },
            ),
            _ => match path.strip_prefix("/rooms/") {
                // A trailing slash is no part of a name, as with `/rooms/`.
                Some(name) => self.room(&percent_decode(name.strip_suffix('/').unwrap_or(name))),
                None => response::text(StatusCode::NOT_FOUND, "not found"),
            },
        }
    }

    fn room(&self, name: &str) -> Response<Body> {
        match self.hub.room_detail(name) {
            Some(detail) => response::json(StatusCode::OK, &detail),
            None => response::json(
                StatusCode::NOT_FOUND,
                &NotFound {
                    error: "no such room on this instance",
                },
            ),
        }
    }
}

/// A slot for a new connection; when all are held, the oldest connection
/// is closed for it. `None` once the slots are gone.
async fn take_slot(slots: &Arc<Semaphore>, open: &Arc<Open>) -> Option<OwnedSemaphorePermit> {
    match slots.clone().try_acquire_owned() {
        Ok(slot) => return Some(slot),
        Err(TryAcquireError::Closed) => return None,
        Err(TryAcquireError::NoPermits) => {}
    }
    debug!("admin port full; closing its oldest connection");
    open.close_oldest();
    slots.clone().acquire_owned().await.ok()
}

/// The admin connections open now, oldest first, each with the token
/// that closes it.
#[derive(Default)]
struct Open {
    state: Mutex<OpenState>,
}

#[derive(Default)]
struct OpenState {
    next_id: u64,
    connections: VecDeque<(u64, CancellationToken)>,
}

impl Open {
    /// Registers a new connection until the returned entry is dropped.
    fn add(self: &Arc<Self>, close: CancellationToken) -> OpenEntry {
        let mut state = crate::sync::lock(&self.state);
        let id = state.next_id;
        state.next_id += 1;
        state.connections.push_back((id, close));
        OpenEntry {
            open: self.clone(),
            id,
        }
    }

    /// Closes the oldest connection not already being closed.
    fn close_oldest(&self) {
        if let Some((_, close)) = crate::sync::lock(&self.state).connections.pop_front() {
            close.cancel();
        }
    }
}

/// A connection's place in [`Open`], given up when it ends.
struct OpenEntry {
    open: Arc<Open>,
    id: u64,
}

impl Drop for OpenEntry {
    fn drop(&mut self) {
        let mut state = crate::sync::lock(&self.open.state);
        // One closed for a newer connection is no longer listed.
        if let Some(at) = state.connections.iter().position(|(id, _)| *id == self.id) {
            state.connections.remove(at);
        }
    }
}

#[derive(Serialize)]
struct RoomList {
    rooms: Vec<crate::rooms::RoomSummary>,
}

#[derive(Serialize)]
struct NotFound {
    error: &'static str,
}
