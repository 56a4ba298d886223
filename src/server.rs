//! The gateway: the public listener, the routing between WebSocket
//! upgrades and the proxy, and the order of start-up and shutdown.
//!
//! [`Gateway::bind`] does everything that can fail because of the
//! configuration (binding, keys, NATS settings), so `main` can exit with a
//! clear message before serving anything. [`Gateway::run`] then serves
//! until the shutdown future resolves and returns once every task it
//! started has finished.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::access;
use crate::admin::{Admin, Health};
use crate::auth::{AuthSetupError, Authenticator};
use crate::config::Config;
use crate::deadline::Deadlines;
use crate::events::{EventStream, Events};
use crate::metrics::Metrics;
use crate::nats::{Bridge, BridgeSettings, Connector, NatsSetupError};
use crate::proxy::{Peer, Proxy, Upstream};
use crate::response::Body;
use crate::rooms::{Hub, QueueLimits};
use crate::shutdown::{Background, Shutdown};
use crate::ws::{ClientStream, HoldSwitch, SessionContext, SessionSettings, Upgrader};

/// Events queued for NATS before further ones are dropped and counted.
const EVENT_QUEUE: usize = 16 * 1024;

/// Bytes the queued events may hold (their content, mostly) before further
/// ones are dropped and counted; see [`Events::channel`].
const EVENT_QUEUE_BYTES: usize = 32 * 1024 * 1024;

/// Time the NATS bridge gets at the end of shutdown to publish what is left.
const NATS_FLUSH: Duration = Duration::from_secs(5);

/// Extra time, past [`NATS_FLUSH`], before the bridge task is aborted: it
/// keeps its own budget, this only guards against a bug there.
const NATS_FLUSH_GUARD: Duration = Duration::from_secs(2);

/// An environment variable's bytes, for the HS256 secret: any bytes make
/// a secret, UTF-8 or not.
fn secret_from_env(var: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStringExt;
    std::env::var_os(var).map(OsStringExt::into_vec)
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The authentication settings cannot be used.
    #[error(transparent)]
    Auth(#[from] AuthSetupError),
    /// The NATS settings cannot be used.
    #[error(transparent)]
    Nats(#[from] NatsSetupError),
}

impl StartError {
    /// Whether the cause is the configuration (exit code 2) rather than the
    /// environment (exit code 1).
    pub fn is_config(&self) -> bool {
        !matches!(self, Self::Bind { .. })
    }
}

/// Checks what the configuration refers to outside itself (the JWT secret
/// variable, the key file, the NATS URLs and credentials file), for
/// `check-config`; start-up goes through the same checks as it builds the
/// gateway.
pub fn preflight(config: &Config) -> Result<(), StartError> {
    let upstream = Upstream::new(&config.upstream, &Background::default());
    Authenticator::new(&config.auth, &upstream, secret_from_env)?;
    if config.nats.enabled {
        crate::nats::Servers::new(&config.nats)?;
    }
    Ok(())
}

/// The NATS client made at start-up, what makes another should it stop,
/// and the events the bridge is to publish.
type NatsParts = (async_nats::Client, Connector, EventStream);

/// A bound, not yet running gateway.
pub struct Gateway {
    config: Config,
    id: Arc<str>,
    listener: TcpListener,
    admin_listener: TcpListener,
    metrics: Metrics,
    hub: Arc<Hub>,
    health: Arc<Health>,
    shutdown: Shutdown,
    background: Background,
    router: Arc<Router>,
    nats: Option<NatsParts>,
}

/// Sends each request to the upgrader or the proxy.
struct Router {
    upgrader: Upgrader,
    proxy: Proxy,
}

impl Router {
    async fn route(&self, request: Request<Incoming>, client: &Client) -> Response<Body> {
        if self.upgrader.owns(request.uri().path()) {
            // Once per connection, and large: boxed so that it does not size
            // the future of every proxied request.
            Box::pin(
                self.upgrader
                    .upgrade(request, client.peer.addr(), &client.hold),
            )
            .await
        } else {
            self.proxy
                .forward(request, &client.peer, &client.deadlines)
                .await
        }
    }
}

/// What every request on one client connection shares, behind a single
/// reference count per request.
struct Client {
    router: Arc<Router>,
    peer: Peer,
    hold: HoldSwitch,
    /// The timer of hyper's header-read timeout and the proxy's upstream
    /// timeout.
    deadlines: Deadlines,
}

impl Gateway {
    /// Binds both listeners and builds every component.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let id: Arc<str> = uuid::Uuid::new_v4().to_string().into();
        let metrics = Metrics::new();
        metrics
            .connections_max
            .set(i64::try_from(config.server.max_connections).unwrap_or(i64::MAX));
        let shutdown = Shutdown::new();
        let background = Background::default();
        let upstream = Upstream::new(&config.upstream, &background);
        let auth = Authenticator::new(&config.auth, &upstream, secret_from_env)?;
        let (events, nats) = if config.nats.enabled {
            let connector = Connector::new(&config.nats, id.clone(), &metrics);
            let client = connector.connect().await?;
            let (events, stream) = Events::channel(
                EVENT_QUEUE,
                EVENT_QUEUE_BYTES,
                metrics.nats_publish_errors.clone(),
            );
            (events, Some((client, connector, stream)))
        } else {
            (Events::disabled(), None)
        };
        let hub = Hub::new(config.websocket.rooms.clone(), metrics.clone(), events);
        let ctx = Arc::new(SessionContext {
            hub: hub.clone(),
            metrics: metrics.clone(),
            settings: SessionSettings {
                ping_interval: config.websocket.ping_interval(),
                pong_timeout: config.websocket.pong_timeout(),
                max_messages_per_sec: config.websocket.max_messages_per_sec,
                client_broadcast: config.websocket.rooms.client_broadcast,
            },
            forced: shutdown.forced().clone(),
        });
        let router = Arc::new(Router {
            upgrader: Upgrader::new(&config, ctx, auth, shutdown.clone()),
            proxy: Proxy::new(
                upstream,
                &config.upstream,
                metrics.clone(),
                shutdown.clone(),
            ),
        });
        let listener = bind(config.listen_addr()).await?;
        let admin_listener = bind(config.admin_addr()).await?;
        Ok(Self {
            health: Arc::new(Health::new(
                config.nats.enabled && config.nats.required,
                metrics.clone(),
            )),
            config,
            id,
            listener,
            admin_listener,
            metrics,
            hub,
            shutdown,
            background,
            router,
            nats,
        })
    }

    /// The public listener's address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.config.listen_addr())
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener
            .local_addr()
            .unwrap_or_else(|_| self.config.admin_addr())
    }

    /// This instance's id (`gateway` in NATS payloads).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Serves until `signal` resolves, then shuts down as SPEC §8 says:
    /// stop accepting, report not ready, close WebSockets with 1001, let
    /// proxied requests finish within `shutdown_grace_secs` (or until
    /// `hurry` resolves, for an operator who will not wait), flush NATS.
    pub async fn run(mut self, signal: impl Future<Output = ()>, hurry: impl Future<Output = ()>) {
        info!(
            addr = %self.local_addr(),
            admin = %self.admin_addr(),
            gateway = %self.id,
            "roomgate listening"
        );
        let bridge_stop = CancellationToken::new();
        let bridge = self
            .nats
            .take()
            .map(|nats| self.spawn_bridge(nats, &bridge_stop));
        let background = self.background.clone();
        let admin = Arc::new(Admin {
            metrics: self.metrics.clone(),
            hub: self.hub.clone(),
            health: self.health.clone(),
        });
        let stop = background.stopping().clone();
        background.spawn(admin.serve(self.admin_listener, stop.clone()));
        background.spawn(self.hub.clone().run_sweeper(stop.clone()));
        background.spawn(self.router.proxy.upstream().clone().run_sweeper(stop));

        tokio::select! {
            _ = accept_loop(&self.listener, &self.router, &self.shutdown) => {}
            _ = signal => {}
        }
        drop(self.listener);
        self.health.set_draining();
        self.shutdown.begin();
        let grace = crate::config::secs(self.config.server.shutdown_grace_secs);
        if !self.shutdown.drain(grace, hurry).await {
            warn!("shutdown grace period over; remaining connections were cut");
        }
        bridge_stop.cancel();
        if let Some(bridge) = bridge {
            flush_bridge(bridge).await;
        }
        background.stop().await;
        info!("roomgate stopped");
    }

    /// Starts the NATS bridge, which runs until `stop` and then publishes
    /// what is left.
    fn spawn_bridge(
        &self,
        (client, connector, stream): NatsParts,
        stop: &CancellationToken,
    ) -> JoinHandle<()> {
        let settings = BridgeSettings {
            prefix: self.config.nats.subject_prefix.clone(),
            gateway_id: self.id.clone(),
            client_broadcast: self.config.websocket.rooms.client_broadcast,
            presence: self.config.websocket.rooms.presence,
            queue: QueueLimits::of(&self.config.websocket),
        };
        let bridge = Bridge::new(
            client,
            connector,
            self.hub.clone(),
            self.metrics.clone(),
            settings,
            stop.clone(),
        );
        tokio::spawn(bridge.run(stream, NATS_FLUSH))
    }
}

/// Waits for the stopped bridge to publish what is left, within its flush
/// budget; aborts it past that (a bug there, not slow NATS, which the
/// budget already covers).
async fn flush_bridge(mut bridge: JoinHandle<()>) {
    if tokio::time::timeout(NATS_FLUSH + NATS_FLUSH_GUARD, &mut bridge)
        .await
        .is_err()
    {
        warn!("NATS flush did not finish in time");
        bridge.abort();
    }
}

/// Pending connections the kernel may hold before `accept`. std and tokio
/// use 128, which overflows under a reconnect storm (every client of a
/// restarted instance at once) and costs the overflowing clients a 1 s SYN
/// retry; the kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let listen = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        // Small writes (a frame, a response) must leave at once. Linux
        // copies the option to every accepted socket, which saves a system
        // call per connection.
        socket.set_nodelay(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| StartError::Bind { addr, source })
}

/// The largest request head (request line and header fields) a client may
/// send; larger ones get 431. Without it hyper's only bound is its read
/// buffer, about 400 KiB, and only when the head arrives in pieces: every
/// connection could make the gateway hold that much, and pass it upstream.
/// 64 KiB leaves room for large cookies and tokens (Envoy's default is 60
/// KiB, nginx's 32 KiB).
const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// Accepts until shutdown begins. Each connection is served in its own
/// tracked task, handshake included, so a slow client never holds up the
/// accept loop.
async fn accept_loop(listener: &TcpListener, router: &Arc<Router>, shutdown: &Shutdown) {
    let mut stopped = pin!(shutdown.stopped());
    loop {
        let (stream, client) = tokio::select! {
            _ = stopped.as_mut() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        #[cfg(not(target_os = "linux"))]
        let _ = stream.set_nodelay(true);
        shutdown.spawn(serve_connection(
            stream,
            client,
            router.clone(),
            shutdown.clone(),
        ));
    }
}

/// Serves one HTTP/1.1 connection. On shutdown it finishes the request in
/// flight and closes; once the grace period is over it is cut.
async fn serve_connection(
    stream: TcpStream,
    client: SocketAddr,
    router: Arc<Router>,
    shutdown: Shutdown,
) {
    let hold = HoldSwitch::default();
    let io = TokioIo::new(ClientStream::new(stream, hold.clone()));
    let deadlines = Deadlines::new();
    let client = Arc::new(Client {
        router,
        peer: Peer::new(client),
        hold,
        deadlines: deadlines.clone(),
    });
    let service = service_fn(move |request| {
        let client = client.clone();
        async move {
            // Here rather than in a function of its own around `route`,
            // which would hold a second copy of the request in every
            // request's future.
            let mut entry = access::Entry::begin(&request, client.peer.addr());
            let response = client.router.route(request, &client).await;
            if let Some(entry) = entry.as_mut() {
                entry.answered(response.status());
            }
            Ok::<_, Infallible>(response)
        }
    });
    let conn = http1::Builder::new()
        .timer(deadlines.clone())
        .header_read_timeout(Duration::from_secs(30))
        .max_header_size(MAX_REQUEST_HEAD)
        .serve_connection(io, service)
        .with_upgrades();
    let mut conn = pin!(conn);
    // Biased: the connection first, then the flag, in that order at every
    // poll (several per request), without a random draw for the order; the
    // flag is still read whenever the connection waits.
    let result = tokio::select! {
        biased;
        result = conn.as_mut() => result,
        _ = shutdown.stopped() => {
            conn.as_mut().graceful_shutdown();
            deadlines.end_head_reads();
            tokio::select! {
                result = conn.as_mut() => result,
                _ = shutdown.forced().cancelled() => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "connection error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accept loop relies on this instead of a system call per socket.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay() {
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local address");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        assert!(accepted.nodelay().expect("TCP_NODELAY readable"));
    }
}
