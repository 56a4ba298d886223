//! The NATS bridge (SPEC §2): rooms reach backends, backends reach rooms,
//! and instances on one NATS cluster act as one gateway.
//!
//! - Outbound: sessions and rooms hand [`Event`]s to a bounded queue
//!   ([`crate::events`]); one publisher loop turns them into subjects,
//!   payloads and headers. While NATS is down, events are dropped and
//!   counted instead of piling up: `publish` never blocks a client.
//! - Inbound: fixed subscriptions for `send.*`, `all` and `control.*`, plus
//!   one subscription `<prefix>.*.<room>` per room with local members, which
//!   carries the room's backend broadcasts and the other instances' client
//!   messages and presence. An instance therefore takes in only the traffic
//!   of its own rooms, and drops the interest when the last local member
//!   leaves. `docs/nats.md` explains and measures this choice.
//! - NATS is never in the way: the client connects in the background (the
//!   gateway starts without NATS), reconnects forever, and re-subscribes
//!   everything on reconnect.

mod inbound;
mod outbound;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, ServerAddr};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::NatsConfig;
use crate::events::{EventStream, Work};
use crate::metrics::Metrics;
use crate::rooms::{Hub, RoomName};

pub use inbound::Inbound;

/// Header naming the sender connection of a published event.
pub const HEADER_CONNECTION: &str = "Roomgate-Connection";
/// Header naming the authenticated user of a published event.
pub const HEADER_USER: &str = "Roomgate-User";
/// Header naming the publishing gateway instance.
pub const HEADER_GATEWAY: &str = "Roomgate-Gateway";
/// Header a backend sets to choose the `from` of its message.
pub const HEADER_FROM: &str = "Roomgate-From";
/// Header a backend sets (`true`) to send its payload as the frame itself.
pub const HEADER_RAW: &str = "Roomgate-Raw";
/// Header a backend sets to skip one connection.
pub const HEADER_EXCLUDE: &str = "Roomgate-Exclude";

/// Longest wait for one publish to be accepted by the client library; past
/// it the event is dropped and counted. async-nats' `publish` waits when its
/// internal queue is full, which happens during an outage.
const PUBLISH_TIMEOUT: Duration = Duration::from_millis(500);

/// Why the bridge could not be set up; reported at start-up.
#[derive(Debug, thiserror::Error)]
pub enum NatsSetupError {
    /// The credentials file could not be read or parsed.
    #[error("nats.creds_file: cannot use {path}: {source}")]
    Credentials {
        /// The file.
        path: String,
        /// The reason.
        source: std::io::Error,
    },
    /// A server URL is malformed.
    #[error("nats.url: {0}")]
    Url(String),
    /// The client could not be created.
    #[error("nats: {0}")]
    Connect(String),
}

/// Settings the bridge acts on, besides the connection.
#[derive(Debug, Clone)]
pub struct BridgeSettings {
    /// `nats.subject_prefix`.
    pub prefix: String,
    /// This instance's id, in `Roomgate-Gateway` and `gateway`.
    pub gateway_id: Arc<str>,
    /// `websocket.rooms.client_broadcast`: deliver other instances' client messages.
    pub client_broadcast: bool,
    /// `websocket.rooms.presence`: deliver other instances' presence to members.
    pub presence: bool,
}

/// Parses `nats.url` into server addresses.
pub fn server_addrs(config: &NatsConfig) -> Result<Vec<ServerAddr>, NatsSetupError> {
    config
        .urls()
        .iter()
        .map(|url| {
            url.parse::<ServerAddr>()
                .map_err(|e| NatsSetupError::Url(format!("{}: {e}", mask(url))))
        })
        .collect()
}

fn mask(url: &str) -> String {
    match url.split_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => url.to_string(),
    }
}

/// Creates the NATS client. It returns at once: the connection is made in
/// the background and retried forever, and `roomgate_nats_connected`
/// follows its state.
pub async fn connect(
    config: &NatsConfig,
    gateway_id: &str,
    metrics: &Metrics,
) -> Result<Client, NatsSetupError> {
    let addrs = server_addrs(config)?;
    let mut options = if config.creds_file.is_empty() {
        ConnectOptions::new()
    } else {
        ConnectOptions::with_credentials_file(&config.creds_file)
            .await
            .map_err(|source| NatsSetupError::Credentials {
                path: config.creds_file.clone(),
                source,
            })?
    };
    let gauge = metrics.nats_connected.clone();
    options = options
        .name(format!("roomgate {gateway_id}"))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .no_echo()
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |event| {
            let gauge = gauge.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        gauge.set(1);
                        info!("NATS connected");
                    }
                    async_nats::Event::Disconnected => {
                        gauge.set(0);
                        warn!("NATS disconnected; local rooms keep working, publications are dropped until it is back");
                    }
                    async_nats::Event::Closed => gauge.set(0),
                    other => debug!(event = %other, "NATS event"),
                }
            }
        });
    options
        .connect(addrs)
        .await
        .map_err(|e| NatsSetupError::Connect(e.to_string()))
}

/// Exponential backoff from 100 ms, capped at 2 s: a restarted NATS is
/// found quickly without hammering one that stays down.
fn reconnect_delay(attempts: usize) -> Duration {
    let exp = attempts.min(5) as u32;
    Duration::from_millis(100 * 2u64.pow(exp)).min(Duration::from_secs(2))
}

/// The running bridge.
pub struct Bridge {
    client: Client,
    hub: Arc<Hub>,
    metrics: Metrics,
    settings: BridgeSettings,
    room_subs: HashMap<RoomName, CancellationToken>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Bridge {
    /// A bridge over an existing client. It stops when `stop` is cancelled,
    /// after publishing what is still queued.
    pub fn new(
        client: Client,
        hub: Arc<Hub>,
        metrics: Metrics,
        settings: BridgeSettings,
        stop: CancellationToken,
    ) -> Self {
        Self {
            client,
            hub,
            metrics,
            settings,
            room_subs: HashMap::new(),
            stop,
            tasks: TaskTracker::new(),
        }
    }

    /// Runs until `stop`: subscribes to the fixed subjects, then publishes
    /// events and keeps one subscription per room with local members.
    pub async fn run(mut self, mut events: EventStream) {
        let inbound = Arc::new(Inbound::new(
            self.client.clone(),
            self.hub.clone(),
            self.metrics.clone(),
            self.settings.clone(),
        ));
        for subject in inbound.fixed_subjects() {
            self.subscribe(subject, inbound.clone(), CancellationToken::new())
                .await;
        }
        let outbound = outbound::Publisher::new(
            self.client.clone(),
            self.metrics.clone(),
            self.settings.clone(),
        );
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                work = events.next() => match work {
                    Some(Work { interest, event }) => {
                        self.reconcile(interest, &inbound).await;
                        if let Some(event) = event {
                            outbound.publish(event).await;
                        }
                    }
                    None => break,
                },
            }
        }
        while let Some(event) = events.try_next_event() {
            outbound.publish(event).await;
        }
        outbound.flush().await;
        self.tasks.close();
        for token in self.room_subs.values() {
            token.cancel();
        }
        self.stop.cancel();
        self.tasks.wait().await;
    }

    /// Brings room subscriptions in line with which rooms have local members.
    async fn reconcile(&mut self, rooms: Vec<RoomName>, inbound: &Arc<Inbound>) {
        for room in rooms {
            let wanted = self.hub.has_members(room.as_str());
            match (wanted, self.room_subs.contains_key(&room)) {
                (true, false) => {
                    let token = CancellationToken::new();
                    let subject = format!("{}.*.{}", self.settings.prefix, room);
                    if self
                        .subscribe(subject, inbound.clone(), token.clone())
                        .await
                    {
                        self.room_subs.insert(room, token);
                    }
                }
                (false, true) => {
                    if let Some(token) = self.room_subs.remove(&room) {
                        token.cancel();
                    }
                }
                _ => {}
            }
        }
    }

    /// Subscribes and spawns the task that delivers what arrives, until
    /// `token` (one room) or the bridge stops. Dropping the subscriber
    /// unsubscribes.
    async fn subscribe(
        &self,
        subject: String,
        inbound: Arc<Inbound>,
        token: CancellationToken,
    ) -> bool {
        let mut subscriber = match self.client.subscribe(subject.clone()).await {
            Ok(subscriber) => subscriber,
            Err(e) => {
                warn!(subject, error = %e, "NATS subscribe failed");
                return false;
            }
        };
        debug!(subject, "subscribed");
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    _ = token.cancelled() => break,
                    message = subscriber.next() => match message {
                        Some(message) => inbound.handle(message).await,
                        None => break,
                    },
                }
            }
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_backoff_is_capped() {
        assert_eq!(reconnect_delay(0), Duration::from_millis(100));
        assert_eq!(reconnect_delay(1), Duration::from_millis(200));
        assert_eq!(reconnect_delay(100), Duration::from_secs(2));
    }

    #[test]
    fn urls_are_parsed_and_masked() {
        let config = NatsConfig {
            url: "nats://a:secret@127.0.0.1:4222, nats://127.0.0.1:4223".into(),
            ..NatsConfig::default()
        };
        assert_eq!(server_addrs(&config).expect("valid").len(), 2);
        assert_eq!(mask("nats://a:secret@h:1"), "***@h:1");
    }
}
