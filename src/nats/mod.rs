//! The NATS bridge (SPEC §2): rooms reach backends, backends reach rooms,
//! and instances on one NATS cluster act as one gateway.
//!
//! - Outbound: sessions and rooms hand [`Event`](crate::events::Event)s to
//!   a bounded queue ([`crate::events`]); one publisher loop turns them into
//!   subjects, payloads and headers. While NATS is down, events are dropped
//!   and counted instead of piling up: publishing never blocks a client.
//! - Inbound: fixed subscriptions for `send.*`, `all` and `control.*`, plus
//!   one subscription per room with local members (`<prefix>.*.<room>`, or
//!   the exact subjects without `client_broadcast`, see `room_subjects`).
//!   An instance therefore takes in only the traffic of its own rooms, and
//!   drops the interest when the last local member leaves. Each subscription's messages are handled in its own
//!   scope, so a room named `join` never turns a `control.join` into a
//!   second membership change. `docs/nats.md` measures and explains this.
//! - Interest is reconciled from the hub's current state, room by room, in
//!   the same loop that publishes: a presence event (or a control reply)
//!   leaves after the subscription it implies, so a backend reacting to it
//!   reaches the member.
//! - NATS is never in the way: the client connects in the background (the
//!   gateway starts without NATS) and reconnects forever; async-nats
//!   re-subscribes on reconnect. A room that gets local members during an
//!   outage is not subscribed then (that would hold up the events behind
//!   it) but as soon as the connection is back.
//!
//! This file holds the bridge itself. `client` makes the NATS client (the
//! URLs, the login, the options); `inbound` and `outbound` carry the two
//! directions; `backlog` bounds what waits for a delivery task; `refused`
//! handles what the server refuses; `diagnose` finds why NATS cannot be
//! reached.

mod backlog;
mod client;
mod diagnose;
mod inbound;
mod outbound;
mod refused;
mod round_trip;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{Client, Subscriber};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, warn};

use crate::events::{EventStream, Work};
use crate::metrics::Metrics;
use crate::rooms::{Handed, Hub, QueueLimits, RoomName};

use backlog::{Backlog, Budget};
pub use client::{Connector, Servers};
pub use inbound::Inbound;
use refused::RefusedRooms;
use round_trip::RoundTrips;

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

/// Longest wait for a subscribe (or unsubscribe) to be accepted by the
/// client library; past it the room is retried later.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_millis(500);

/// How often failed subscriptions are retried while connected.
const RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// How often the connection state is copied into `roomgate_nats_connected`.
const STATE_POLL: Duration = Duration::from_millis(100);

/// How long NATS may stay out of reach (the first connection, or a
/// reconnection) before the gateway says so, and why: the connect
/// timeout, and then some.
const UNREACHABLE_AFTER: Duration = Duration::from_secs(3);

/// How long a join waits for its room's subscription before it is
/// answered anyway (at most about twice this, see `Hub::release_overdue`):
/// normally the wait is one round trip to the server; a stalled server
/// must not hold joins.
const JOIN_WAIT: Duration = Duration::from_secs(1);

/// Messages async-nats buffers per subscription before it drops (its
/// default, 65,536, would let one flooded room hold that many payloads).
/// The delivery task empties the channel before each run it handles
/// (`backlog`), so the channel fills only while a run is handled or the
/// task waits for a thread.
const SUBSCRIPTION_CAPACITY: usize = 4096;

/// Most payload bytes a delivery task handles before it takes what has
/// arrived meanwhile into its backlog: a run of small messages is handled
/// whole, a large message alone, so that the channel fills for the time
/// of one such message at most.
const RUN_BYTES: usize = 256 * 1024;

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
    /// The server URLs carry different logins; a client has one.
    #[error(
        "nats.url: the server URLs carry different credentials, but the client logs in to every server with one set: give the same user info on each URL, or on one only"
    )]
    Logins,
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
    /// The members' send queues, which bound how much of a burst is
    /// handed to them at once.
    pub queue: QueueLimits,
}

/// Whether the client is connected now.
fn is_connected(client: &Client) -> bool {
    client.connection_state() == State::Connected
}

/// Keeps `roomgate_nats_connected` and `connected` equal to the client's
/// state until `stop`. Polling the state (a watch channel read) cannot
/// miss a transition the way a dropped event could.
async fn watch_connection(
    client: Client,
    targets: Vec<diagnose::Target>,
    hub: Arc<Hub>,
    metrics: Metrics,
    connected: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(STATE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // async-nats says nothing before its first connection, and nothing of
    // why a reconnection fails: once per outage that lasts, say that NATS
    // cannot be reached, and why.
    let mut unreachable_since = Some(Instant::now());
    let mut diagnosis = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(reason) = async {
                match diagnosis.as_mut() {
                    Some(looking) => Some(looking.await),
                    None => None,
                }
            }, if diagnosis.is_some() => {
                diagnosis = None;
                if !is_connected(&client) {
                    warn!(
                        reason,
                        "NATS not reachable; rooms keep working on this instance, events are \
                         dropped until it is, and connecting goes on in the background"
                    );
                }
            }
            _ = tick.tick() => {
                let now = is_connected(&client);
                if now {
                    unreachable_since = None;
                    // A look still under way would find nothing to say.
                    diagnosis = None;
                } else if *connected.borrow() {
                    unreachable_since = Some(Instant::now());
                } else if unreachable_since.is_some_and(|since| since.elapsed() >= UNREACHABLE_AFTER) {
                    unreachable_since = None;
                    diagnosis = Some(Box::pin(diagnose::why_unreachable(targets.clone())));
                }
                metrics.nats_connected.set(i64::from(now));
                if connected.send_if_modified(|was| std::mem::replace(was, now) != now) {
                    hub.set_joins_wait(now);
                }
                hub.release_overdue(JOIN_WAIT);
            }
        }
    }
    hub.set_joins_wait(false);
    metrics.nats_connected.set(0);
}

/// Why a subscription could not be made now; the bridge retries it.
#[derive(Debug, thiserror::Error)]
enum SubscribeFailed {
    /// The client refused it (e.g. an invalid subject).
    #[error("{0}")]
    Client(#[from] async_nats::SubscribeError),
    /// The client's command queue stayed full (a long outage).
    #[error("timed out")]
    Timeout,
}

/// A room's subscriptions: one delivery task reading all of them. Cancelling
/// the token ends the task, and dropping its subscribers unsubscribes.
struct RoomSubscription {
    token: CancellationToken,
    task: JoinHandle<()>,
}

/// Moves traffic both ways between the hub and NATS: room events out to
/// backends, and backends' publications in to rooms and connections.
pub struct Bridge {
    client: Client,
    /// Makes a new client should this one stop for good.
    connector: Connector,
    /// Cancelled by a delivery task whose subscription ended though
    /// nothing dropped it: the sign that the client has stopped.
    lost: CancellationToken,
    /// The task keeping `roomgate_nats_connected` in line with the client,
    /// and the token that stops it.
    watching: Option<(CancellationToken, JoinHandle<()>)>,
    hub: Arc<Hub>,
    metrics: Metrics,
    settings: BridgeSettings,
    inbound: Arc<Inbound>,
    /// Subscriptions of rooms with local members.
    rooms: HashMap<RoomName, RoomSubscription>,
    /// Rooms with local members and no subscription yet: they got their
    /// first member while NATS was down, or their subscribe failed.
    retry: HashSet<RoomName>,
    /// When the rooms the server refused may be tried again.
    refused: RefusedRooms,
    /// Whether the fixed subscriptions (`send.*`, `all`, `control.*`) exist.
    fixed: bool,
    /// Rooms subscribed since the last [`Bridge::confirm`], whose members
    /// waiting for their `joined` get it once the server has the
    /// subscriptions.
    unconfirmed: Vec<RoomName>,
    /// Whether joins wait for the round trip that confirms their room's
    /// subscription.
    round_trips: RoundTrips,
    /// The bytes that messages waiting in the delivery tasks may hold.
    budget: Arc<Budget>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Bridge {
    /// A bridge over an existing client. It stops when `stop` is cancelled,
    /// after publishing what is still queued.
    pub fn new(
        client: Client,
        connector: Connector,
        hub: Arc<Hub>,
        metrics: Metrics,
        settings: BridgeSettings,
        stop: CancellationToken,
    ) -> Self {
        let inbound = Arc::new(Inbound::new(hub.clone(), metrics.clone(), settings.clone()));
        let budget = Budget::new(
            backlog::budget_bytes(settings.queue),
            metrics.dropped_nats_slow_consumer.clone(),
        );
        Self {
            client,
            connector,
            lost: CancellationToken::new(),
            watching: None,
            hub,
            metrics,
            settings,
            inbound,
            rooms: HashMap::new(),
            retry: HashSet::new(),
            refused: RefusedRooms::default(),
            fixed: false,
            unconfirmed: Vec::new(),
            round_trips: RoundTrips::default(),
            budget,
            stop,
            tasks: TaskTracker::new(),
        }
    }

    /// Runs until `stop`: subscribes to the fixed subjects, then publishes
    /// events and keeps the subscriptions of the rooms with local members.
    /// After `stop` it publishes what is still queued and flushes, within
    /// `flush_budget`: what does not fit (NATS stalled) is counted as a
    /// publish error rather than holding up the shutdown.
    pub async fn run(mut self, mut events: EventStream, flush_budget: Duration) {
        let (connected_tx, mut connected) = watch::channel(false);
        self.watch(connected_tx.clone());
        self.subscribe_fixed().await;
        let mut outbound = self.publisher();
        let reports = self.connector.reports.clone();
        let mut retry = tokio::time::interval(RETRY_INTERVAL);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                _ = reports.refused_added.notified() => {
                    self.drop_refused(reports.take_refused()).await;
                }
                _ = self.lost.cancelled() => {
                    self.renew_client(&connected_tx).await;
                    outbound = self.publisher();
                }
                // Back from an outage: subscribe the rooms joined during it
                // now rather than at the next tick. Watched only while
                // something waits for it: polling the watch costs every
                // event a registration with its notifier.
                Ok(()) = connected.changed(), if !self.fixed || !self.retry.is_empty() => {
                    if *connected.borrow_and_update() {
                        self.retry_failed().await;
                    }
                }
                _ = retry.tick() => self.retry_failed().await,
                work = events.next() => match work {
                    Some(Work { interest, resync, event }) => {
                        let rooms = if resync { self.every_room() } else { interest };
                        for room in rooms {
                            self.reconcile(room).await;
                        }
                        self.confirm().await;
                        if let Some(event) = event {
                            outbound.publish(event).await;
                        }
                    }
                    None => break,
                },
            }
        }
        self.finish(events, &outbound, flush_budget).await;
    }

    /// Starts keeping `roomgate_nats_connected` and `connected` in line
    /// with the current client.
    fn watch(&mut self, connected: watch::Sender<bool>) {
        let token = self.stop.child_token();
        let task = self.tasks.spawn(watch_connection(
            self.client.clone(),
            self.connector.targets(),
            self.hub.clone(),
            self.metrics.clone(),
            connected,
            token.clone(),
        ));
        self.watching = Some((token, task));
    }

    fn publisher(&self) -> outbound::Publisher {
        outbound::Publisher::new(
            self.client.clone(),
            self.metrics.clone(),
            self.settings.clone(),
        )
    }

    /// Takes the rooms whose subscription the server refused (a permission
    /// it does not grant, or no longer does after a reload) for
    /// unsubscribed: they are retried, ever less often while the refusals
    /// go on, and come back once the server grants it. The server has
    /// dropped the subscription, so keeping it would leave the room deaf to
    /// NATS for good. Joins to such a room do not wait for the retry: it
    /// may be seconds away, and it may be refused again. A refused fixed
    /// subject is only logged.
    async fn drop_refused(&mut self, subjects: Vec<String>) {
        let now = Instant::now();
        for subject in subjects {
            let Some(room) = self.room_of(&subject) else {
                continue;
            };
            if let Some(subscription) = self.rooms.remove(&room) {
                self.refused.refused(&room, now);
                self.subscribe_again(room, subscription).await;
            }
        }
    }

    /// Ends `room`'s subscription, which the server no longer holds, and
    /// has the room subscribed again by the retries. The wait for the task
    /// lets its UNSUB go out before the new SUB.
    async fn subscribe_again(&mut self, room: RoomName, subscription: RoomSubscription) {
        subscription.token.cancel();
        let _ = tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscription.task).await;
        self.retry.insert(room);
    }

    /// The room a subject of [`Bridge::room_subjects`] is for.
    fn room_of(&self, subject: &str) -> Option<RoomName> {
        let rest = subject
            .strip_prefix(self.settings.prefix.as_str())?
            .strip_prefix('.')?;
        let (kind, room) = rest.split_once('.')?;
        if !matches!(kind, "*" | "broadcast" | "presence") {
            return None;
        }
        RoomName::parse(room)
    }

    /// Starts over on a new client. async-nats runs a client's connection
    /// in a task of its own, and should that task die (async-nats panics
    /// there on a message whose header value holds a bare CR, which
    /// nats-server passes on), the client never connects again and still
    /// reports itself connected. Its subscriptions end with it, which is
    /// how the bridge notices: every room is subscribed again on the new
    /// client, as after an outage.
    async fn renew_client(&mut self, connected: &watch::Sender<bool>) {
        error!("the NATS client stopped (on a message it could not read?); starting a new one");
        if let Some((token, task)) = self.watching.take() {
            token.cancel();
            let _ = task.await;
        }
        // So that the new client's first connection counts as a change:
        // joins wait again, and the rooms are subscribed at once.
        connected.send_replace(false);
        // The old watcher, ending, answered every join still waiting; the
        // next ones wait for the new client's subscription.
        for (room, subscription) in std::mem::take(&mut self.rooms) {
            self.hub.lost_subscription(room.as_str());
            self.subscribe_again(room, subscription).await;
        }
        // What the old client's server refused says nothing about the new
        // client's subscriptions.
        self.refused.clear();
        drop(self.connector.reports.take_refused());
        self.fixed = false;
        self.round_trips.reset();
        self.lost = CancellationToken::new();
        match self.connector.connect().await {
            Ok(client) => self.client = client,
            Err(e) => error!(error = %e, "cannot make a new NATS client"),
        }
        self.watch(connected.clone());
    }

    /// After `stop`: publishes what is still queued and flushes, within
    /// `flush_budget`, counting what did not fit as publish errors; then
    /// ends every subscription and waits for the delivery tasks.
    async fn finish(
        mut self,
        mut events: EventStream,
        outbound: &outbound::Publisher,
        flush_budget: Duration,
    ) {
        let deadline = Instant::now() + flush_budget;
        let drained = tokio::time::timeout_at(deadline, async {
            while let Some(event) = events.try_next_event() {
                outbound.publish(event).await;
            }
        })
        .await;
        if drained.is_err() {
            let mut left = 0;
            while events.try_next_event().is_some() {
                left += 1;
            }
            self.metrics.nats_publish_errors.inc_by(left);
            warn!(
                left,
                "NATS too slow at shutdown; the last events were dropped"
            );
        }
        let _ = tokio::time::timeout_at(deadline, outbound.flush()).await;
        self.tasks.close();
        for (_, room) in self.rooms.drain() {
            room.token.cancel();
        }
        self.stop.cancel();
        self.tasks.wait().await;
    }

    /// Every room whose subscriptions may not match its members: those
    /// with a subscription or waiting for one, and those with local
    /// members. For when too many changed to be listed one by one.
    fn every_room(&self) -> Vec<RoomName> {
        let mut rooms: HashSet<RoomName> = self.hub.occupied_rooms().into_iter().collect();
        rooms.extend(self.rooms.keys().cloned());
        rooms.extend(self.retry.iter().cloned());
        warn!(
            rooms = rooms.len(),
            "too many room interest changes to follow one by one; reconciling every room"
        );
        rooms.into_iter().collect()
    }

    /// Brings one room's subscriptions in line with whether it has local
    /// members now, however often that changed since the last call. A
    /// member whose join waits for the room's subscription gets its
    /// `joined` from [`Bridge::confirm`], or here when the subscription
    /// cannot be made now.
    async fn reconcile(&mut self, room: RoomName) {
        let mut dropped = None;
        let rooms = &mut self.rooms;
        let emptied = self.hub.unsubscribe_if_empty(room.as_str(), || {
            dropped = rooms.remove(&room);
            if let Some(subscription) = &dropped {
                subscription.token.cancel();
            }
        });
        if emptied {
            self.retry.remove(&room);
            self.refused.forget(&room);
            if let Some(subscription) = dropped {
                // Wait for the task to drop its subscribers, so the UNSUB is
                // queued before whatever this instance publishes next.
                let _ = tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscription.task).await;
                debug!(room = room.as_str(), "room interest dropped");
            }
            return;
        }
        if self.rooms.contains_key(&room) {
            // Still subscribed: a room freed and made again since waits
            // for nothing.
            self.hub.release(room.as_str());
            return;
        }
        // Not now, and its joins do not wait: while disconnected, a
        // subscribe would only queue a command for the reconnect, and once
        // async-nats' command queue (2,048) is full each one waits
        // SUBSCRIBE_TIMEOUT, holding up this loop and the events behind it
        // until NATS is back, when they would be published late; a room the
        // server refused a moment ago waits its turn, which a join does not
        // hurry. The retries subscribe it.
        if !is_connected(&self.client) || !self.refused.may_retry(&room, Instant::now()) {
            self.hub.release_unsubscribed(room.as_str());
            self.retry.insert(room);
            return;
        }
        match self.subscribe_room(&room).await {
            Ok(subscription) => {
                self.retry.remove(&room);
                self.unconfirmed.push(room.clone());
                self.rooms.insert(room, subscription);
            }
            Err(e) => {
                self.hub.release_unsubscribed(room.as_str());
                // Warn once per room, not on every retry.
                let room_name = room.as_str().to_string();
                if self.retry.insert(room) {
                    warn!(room = room_name, error = %e, "cannot subscribe to a room yet; will retry");
                } else {
                    debug!(room = room_name, error = %e, "room subscription retry failed");
                }
            }
        }
    }

    /// Retries what could not be subscribed, once NATS is connected; a
    /// room the server refused waits its turn (see [`Bridge::reconcile`]).
    async fn retry_failed(&mut self) {
        if !is_connected(&self.client) {
            return;
        }
        if !self.fixed {
            self.subscribe_fixed().await;
        }
        let rooms: Vec<RoomName> = self.retry.iter().cloned().collect();
        for room in rooms {
            self.reconcile(room).await;
        }
        self.confirm().await;
    }

    /// Waits until the server has the subscriptions made since the last
    /// call, then lets the members who waited for them have their
    /// `joined`: what a client publishes, or has a backend publish, once it
    /// read `joined` reaches it. Sending the subscriptions is not enough:
    /// the server may take another connection's publication first. One
    /// round trip confirms them all (see [`round_trip`]); a stalled server
    /// delays the answers by `round_trip::ANSWER_WAIT` at most.
    async fn confirm(&mut self) {
        if self.unconfirmed.is_empty() {
            return;
        }
        self.round_trips
            .confirm(&self.client, &self.tasks, &self.stop)
            .await;
        for room in self.unconfirmed.drain(..) {
            self.hub.release(room.as_str());
        }
    }

    /// The subjects to subscribe to for a room. With `client_broadcast`
    /// (the default) one wildcard, `<prefix>.*.<room>`, covers the room's
    /// broadcasts, other instances' client messages and presence: one
    /// subscription per room instead of two or three, which is what a room
    /// costs in memory here (`docs/nats.md`). It also takes in presence
    /// events when `presence` is off, a small stream next to the messages.
    /// Without `client_broadcast` a wildcard would take in every client
    /// message only to drop it, so the exact subjects are used.
    fn room_subjects(&self, room: &RoomName) -> Vec<String> {
        let prefix = &self.settings.prefix;
        if self.settings.client_broadcast {
            return vec![format!("{prefix}.*.{room}")];
        }
        let mut subjects = vec![format!("{prefix}.broadcast.{room}")];
        if self.settings.presence {
            subjects.push(format!("{prefix}.presence.{room}"));
        }
        subjects
    }

    async fn subscribe_room(&self, room: &RoomName) -> Result<RoomSubscription, SubscribeFailed> {
        let subscribers = self.subscribe_all(self.room_subjects(room)).await?;
        let token = CancellationToken::new();
        let task = self.deliver(subscribers, Some(room.clone()), token.clone());
        debug!(room = room.as_str(), "room interest taken");
        Ok(RoomSubscription { token, task })
    }

    async fn subscribe_fixed(&mut self) {
        match self
            .subscribe_all(self.inbound.fixed_subjects().to_vec())
            .await
        {
            Ok(subscribers) => {
                // Lives as long as the bridge.
                self.deliver(subscribers, None, CancellationToken::new());
                self.fixed = true;
            }
            Err(e) => warn!(error = %e, "cannot subscribe to the fixed subjects yet; will retry"),
        }
    }

    /// Subscribes to every subject or to none: on a failure, the
    /// subscriptions already made are dropped (and so unsubscribed).
    async fn subscribe_all(
        &self,
        subjects: Vec<String>,
    ) -> Result<Vec<Subscriber>, SubscribeFailed> {
        let mut subscribers = Vec::with_capacity(subjects.len());
        for subject in subjects {
            // While disconnected, `subscribe` only queues the command (sent
            // on reconnect); it waits only when that queue is full.
            let subscriber =
                tokio::time::timeout(SUBSCRIBE_TIMEOUT, self.client.subscribe(subject))
                    .await
                    .map_err(|_| SubscribeFailed::Timeout)??;
            subscribers.push(subscriber);
        }
        Ok(subscribers)
    }

    /// Spawns the task that delivers what the subscribers receive (for
    /// `room`, or the fixed subjects), until `token` or the bridge stops.
    fn deliver(
        &self,
        subscribers: Vec<Subscriber>,
        room: Option<RoomName>,
        token: CancellationToken,
    ) -> JoinHandle<()> {
        let mut messages = futures_util::stream::select_all(subscribers);
        let inbound = self.inbound.clone();
        let stop = self.stop.clone();
        let limit = self.settings.queue.turn();
        let run_limit = Handed {
            frames: limit.frames,
            bytes: limit.bytes.min(RUN_BYTES),
        };
        let mut backlog = Backlog::new(self.budget.clone());
        let lost = self.lost.clone();
        self.tasks.spawn(async move {
            // Grown only by bursts: most rooms never see one.
            let mut run = Vec::new();
            let mut handed = Handed::default();
            let mut open = true;
            loop {
                if stop.is_cancelled() || token.is_cancelled() {
                    break;
                }
                // A run is cut at the limit on its own, and at `RUN_BYTES`
                // so that the channel is looked at again soon; what runs
                // add up to decides when the writers get their turn, so
                // that between two turns less than two runs' worth, a send
                // queue, is handed over.
                let mut taken = backlog.take_run(&mut run, run_limit);
                if run.is_empty() {
                    if !open {
                        break;
                    }
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => break,
                        _ = token.cancelled() => break,
                        message = messages.next() => match message {
                            Some(message) => {
                                taken.add(message.payload.len());
                                run.push(message);
                            }
                            None => break,
                        },
                    }
                }
                // Everything that has arrived leaves the channel now: what
                // does not fit the run waits in the backlog, whose byte
                // budget, not the channel's count, bounds it.
                if open {
                    open = !backlog.take_arrived(&mut messages, &mut run, &mut taken, run_limit);
                }
                match &room {
                    Some(room) => inbound.handle_room(room, run.drain(..)),
                    None => run.drain(..).for_each(|m| inbound.handle_fixed(m)),
                }
                handed.absorb(taken);
                if handed.reached(limit) {
                    // A burst: let the members' writers, woken by what was
                    // handed to them, take it before more is queued.
                    // Otherwise a burst longer than a send queue would
                    // overflow the queue of every member, however fast it
                    // reads.
                    handed = Handed::default();
                    tokio::task::yield_now().await;
                }
            }
            if stop.is_cancelled() || token.is_cancelled() {
                inbound.left_undelivered(backlog.discard(&mut messages));
            } else {
                // Nothing dropped the subscriptions, yet they ended: the
                // client has stopped.
                lost.cancel();
            }
        })
    }
}
