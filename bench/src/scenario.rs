//! The runs: broadcast (fan-out, many rooms, client-originated, fixed
//! rate), idle connections and the HTTP proxy, each against roomgate and
//! its peer, each with its own freshly started servers.

use std::cell::Cell;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::conn::{self, Board, Plan, Proto, SenderPlan};
use crate::payload;
use crate::procs::{self, NatsServer, Nginx, OwnServer, Proc, Roomgate, RoomgateSettings};
use crate::shard::Shards;
use crate::sys::{self, now_ns};

/// Client sockets the generator keeps free for itself (runtime, NATS,
/// pipes, the servers' start-up checks).
const RESERVED_FDS: u64 = 100;

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Bins {
    /// roomgate (release build).
    pub roomgate: PathBuf,
    /// nats-server.
    pub nats: PathBuf,
    /// nginx, when installed.
    pub nginx: Option<PathBuf>,
    /// wrk, when installed.
    pub wrk: Option<PathBuf>,
}

impl Bins {
    /// wrk, or why the HTTP runs cannot happen.
    pub fn wrk(&self) -> Result<&Path, String> {
        self.wrk
            .as_deref()
            .ok_or_else(|| "wrk is not installed (apt-get install -y wrk)".into())
    }

    /// nginx, or why its runs cannot happen.
    pub fn nginx(&self) -> Result<&Path, String> {
        self.nginx
            .as_deref()
            .ok_or_else(|| "nginx is not installed (apt-get install -y nginx)".into())
    }
}

/// Knobs shared by every run.
#[derive(Debug, Clone)]
pub struct Knobs {
    /// Generator threads (shards).
    pub threads: usize,
    /// Source addresses 127.0.0.1 ..= 127.0.0.N.
    pub source_ips: u8,
    /// Messages a room may have in flight beyond its slowest member.
    pub window: u32,
    /// Delivered frame size, bytes.
    pub payload: usize,
    /// Initial read buffer per connection.
    pub read_buf: usize,
    /// Concurrent handshakes (all shards together).
    pub connect_concurrency: usize,
    /// Longest measured phase.
    pub deadline: Duration,
    /// Publish wrapped payloads to roomgate instead of `Roomgate-Raw`.
    pub wrapped: bool,
    /// roomgate's `websocket.send_queue_capacity`.
    pub send_queue: u32,
}

/// The system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// roomgate, fed by nats-server.
    Roomgate,
    /// nats-server's own WebSocket listener.
    NatsWs,
}

impl Target {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Target::Roomgate => "roomgate",
            Target::NatsWs => "nats-ws",
        }
    }
}

/// Who sends the measured messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A backend publishing to NATS.
    Backend,
    /// The first member of each room, over its WebSocket.
    Client,
}

/// How fast the backend publishes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// As fast as accepted, within the window.
    Max,
    /// A fixed number of messages per second.
    Rate(f64),
}

/// One broadcast run.
#[derive(Debug, Clone)]
pub struct BroadcastSpec {
    /// Rooms.
    pub rooms: u32,
    /// Members per room.
    pub members: u32,
    /// Messages: in total (backend), or per sender (client).
    pub messages: u64,
    /// Who sends.
    pub origin: Origin,
    /// How fast (backend only).
    pub pace: Pace,
}

impl BroadcastSpec {
    fn connections(&self) -> u32 {
        self.rooms * self.members
    }

    fn expected(&self) -> u64 {
        match self.origin {
            Origin::Backend => self.messages * u64::from(self.members),
            Origin::Client => self.messages * u64::from(self.members - 1) * u64::from(self.rooms),
        }
    }
}

/// The measurements of one run (a JSON object).
pub type Values = Map<String, Value>;

fn fd_budget(n: u32) -> Result<(), String> {
    let limit = sys::open_file_limit();
    if u64::from(n) + RESERVED_FDS > limit {
        return Err(format!(
            "{n} connections do not fit in one generator process: its open-file limit is {limit}, \
             so at most {} client sockets",
            limit.saturating_sub(RESERVED_FDS)
        ));
    }
    Ok(())
}

fn sources(k: &Knobs) -> Vec<Ipv4Addr> {
    (1..=k.source_ips.max(1))
        .map(|i| Ipv4Addr::new(127, 0, 0, i))
        .collect()
}

/// The servers of a WebSocket run: nats-server always, roomgate for
/// [`Target::Roomgate`]. Dropping it stops them.
struct Stack {
    nats: NatsServer,
    gateway: Option<Roomgate>,
}

impl Stack {
    fn start(
        bins: &Bins,
        k: &Knobs,
        target: Target,
        conns: u32,
        members: u32,
    ) -> Result<Self, String> {
        let nats = NatsServer::start(&bins.nats)?;
        let gateway = match target {
            Target::Roomgate => Some(Roomgate::start(
                &bins.roomgate,
                &RoomgateSettings {
                    nats_url: Some(nats.url()),
                    upstream: None,
                    max_members: members.max(1000),
                    max_connections: conns + 1000,
                    send_queue: k.send_queue,
                },
            )?),
            Target::NatsWs => None,
        };
        Ok(Self { nats, gateway })
    }

    /// The server under test.
    fn sut(&self) -> &Proc {
        self.gateway.as_ref().map_or(&self.nats.proc, |g| &g.proc)
    }

    /// The broker, when it is not the server under test.
    fn broker(&self) -> Option<&Proc> {
        self.gateway.as_ref().map(|_| &self.nats.proc)
    }

    fn plan(&self, k: &Knobs, members: u32, sender: Option<SenderPlan>, board: Arc<Board>) -> Plan {
        let (proto, addr, path) = match &self.gateway {
            Some(g) => (Proto::Roomgate, g.addr, "/ws"),
            None => (
                Proto::NatsWs,
                ([127, 0, 0, 1], self.nats.ws_port).into(),
                "/",
            ),
        };
        Plan {
            proto,
            addr,
            path: path.into(),
            members,
            sources: sources(k),
            read_buf: k.read_buf,
            connect_timeout: Duration::from_secs(20),
            sender,
            board,
        }
    }
}

/// Opens `n` connections and waits (bounded) until each joined or failed.
/// Returns the seconds it took.
async fn connect_all(shards: &Shards, n: u32) -> Result<f64, String> {
    let t0 = Instant::now();
    shards.connect(n);
    let deadline = t0 + Duration::from_secs(30) + Duration::from_millis(u64::from(n) * 2);
    loop {
        let t = shards.totals();
        if t.joined + t.failed >= u64::from(n) {
            let secs = t0.elapsed().as_secs_f64();
            if t.failed > 0 {
                let first = first_error(shards).await;
                return Err(format!(
                    "{} of {n} connections failed; first: {first}",
                    t.failed
                ));
            }
            return Ok(secs);
        }
        if Instant::now() > deadline {
            let first = first_error(shards).await;
            return Err(format!(
                "only {} of {n} connections joined within {:?} ({} failed; first: {first})",
                t.joined,
                deadline - t0,
                t.failed
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn first_error(shards: &Shards) -> String {
    match shards.reports().await {
        Ok(r) => r
            .into_iter()
            .find_map(|r| r.first_error)
            .unwrap_or_else(|| "none recorded".into()),
        Err(e) => e,
    }
}

/// A backend publishing through NATS.
struct Publisher {
    client: async_nats::Client,
    subjects: Vec<async_nats::Subject>,
    names: Vec<String>,
    headers: Option<async_nats::HeaderMap>,
    wrapped: bool,
    size: usize,
    buf: Vec<u8>,
}

impl Publisher {
    async fn connect(url: &str, target: Target, rooms: u32, k: &Knobs) -> Result<Self, String> {
        let client = tokio::time::timeout(Duration::from_secs(10), async_nats::connect(url))
            .await
            .map_err(|_| "publisher: NATS connect timed out".to_string())?
            .map_err(|e| format!("publisher: NATS connect: {e}"))?;
        let names: Vec<String> = (0..rooms).map(conn::room_name).collect();
        let subjects = names
            .iter()
            .map(|n| match target {
                Target::Roomgate => format!("roomgate.broadcast.{n}").into(),
                Target::NatsWs => format!("bench.{n}").into(),
            })
            .collect();
        let wrapped = target == Target::Roomgate && k.wrapped;
        let headers = (target == Target::Roomgate && !wrapped).then(|| {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Roomgate-Raw", "true");
            h
        });
        Ok(Self {
            client,
            subjects,
            names,
            headers,
            wrapped,
            size: k.payload,
            buf: Vec::with_capacity(k.payload + 64),
        })
    }

    async fn send(&mut self, room: u32, seq: u32) -> Result<(), String> {
        let r = room as usize;
        let ts = now_ns();
        if self.wrapped {
            payload::wrapped_content(&mut self.buf, seq, ts, self.size);
        } else {
            payload::backend_frame(&mut self.buf, &self.names[r], seq, ts, self.size);
        }
        let body = Bytes::copy_from_slice(&self.buf);
        let subject = self.subjects[r].clone();
        match &self.headers {
            Some(h) => {
                self.client
                    .publish_with_headers(subject, h.clone(), body)
                    .await
            }
            None => self.client.publish(subject, body).await,
        }
        .map_err(|e| format!("publish: {e}"))
    }

    async fn flush(&self) -> Result<(), String> {
        tokio::time::timeout(Duration::from_secs(10), self.client.flush())
            .await
            .map_err(|_| "NATS flush timed out".to_string())?
            .map_err(|e| format!("NATS flush: {e}"))
    }

    /// Publishes probes to every room until each member has received one,
    /// which proves every subscription on the way is in place.
    async fn probe(&mut self, board: &Board, rooms: u32, members: u32) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut pending = 0;
            for r in 0..rooms {
                if board.ready_count(r * members..(r + 1) * members) < members {
                    pending += 1;
                    self.send(r, payload::PROBE).await?;
                }
            }
            if pending == 0 {
                return Ok(());
            }
            self.flush().await?;
            if Instant::now() > deadline {
                let ready = board.ready_count(0..rooms * members);
                return Err(format!(
                    "only {ready} of {} connections received a probe within 20 s \
                     ({pending} rooms incomplete)",
                    rooms * members
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Publishes `messages` to random rooms (`Max`: within the window;
    /// `Rate`: on a fixed schedule). Returns how far behind schedule the
    /// publisher fell at worst, in seconds.
    async fn publish(
        &mut self,
        board: &Board,
        spec: &BroadcastSpec,
        window: u32,
        stop: &Cell<bool>,
    ) -> Result<f64, String> {
        let rooms = spec.rooms;
        let k = spec.members;
        let mut published = vec![0u32; rooms as usize];
        let mut allowed = vec![0u32; rooms as usize];
        let mut rng = XorShift(0x5EED_1234_ABCD_0001);
        let start = Instant::now();
        let mut behind = Duration::ZERO;
        for i in 0..spec.messages {
            if stop.get() {
                break;
            }
            let r = if rooms == 1 { 0 } else { rng.below(rooms) };
            let ri = r as usize;
            match spec.pace {
                Pace::Max => {
                    while published[ri] >= allowed[ri] {
                        allowed[ri] = board
                            .min_progress(r * k..(r + 1) * k, None)
                            .saturating_add(window);
                        if published[ri] < allowed[ri] || stop.get() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    if i % 64 == 63 {
                        // Let the NATS connection task and the watcher run.
                        tokio::task::yield_now().await;
                    }
                }
                Pace::Rate(rate) => {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    let now = Instant::now();
                    if due > now {
                        tokio::time::sleep_until(due.into()).await;
                    }
                    behind = behind.max(Instant::now().saturating_duration_since(due));
                }
            }
            published[ri] += 1;
            self.send(r, published[ri]).await?;
        }
        self.flush().await?;
        Ok(behind.as_secs_f64())
    }
}

/// A small deterministic random source (the same rooms in every run).
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u32) -> u32 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (((x >> 32) * u64::from(n)) >> 32) as u32
    }
}

/// How a measured phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Complete,
    Stalled,
    Deadline,
}

/// One broadcast run against `target` with fresh servers.
pub async fn broadcast(
    bins: &Bins,
    k: &Knobs,
    spec: &BroadcastSpec,
    target: Target,
) -> Result<Values, String> {
    let n = spec.connections();
    fd_budget(n)?;
    let stack = Stack::start(bins, k, target, n, spec.members)?;
    let board = Arc::new(Board::new(n));
    let sender = (spec.origin == Origin::Client).then_some(SenderPlan {
        per_room: spec.messages as u32,
        window: k.window,
        payload: k.payload,
    });
    let plan = Arc::new(stack.plan(k, spec.members, sender, board.clone()));
    let threads = k.threads.max(1);
    let shards = Shards::start(threads, plan, k.connect_concurrency.div_ceil(threads))
        .map_err(|e| format!("shard threads: {e}"))?;
    let connect_secs = connect_all(&shards, n).await?;
    let mut publisher = Publisher::connect(&stack.nats.url(), target, spec.rooms, k).await?;
    publisher.probe(&board, spec.rooms, spec.members).await?;

    let before = Usage::read(&stack);
    let t0 = now_ns();
    let (behind, end) = measured_phase(&shards, &mut publisher, &board, spec, k).await;
    let used = Usage::read(&stack).since(&before);
    let memory = stack.sut().memory();
    let gateway_counts = stack.gateway.as_ref().map(|g| gateway_counters(g.admin));
    let merged = Merged::of(shards.reports().await?, t0);
    let totals = shards.totals();
    shards.stop();
    drop(publisher);
    drop(stack);
    let outcome = Outcome {
        connections: n,
        expected: spec.expected(),
        received: totals.received,
        closed: totals.closed,
        end,
        behind: behind?,
        used,
        memory,
        connect_secs,
        gateway_counts,
    };
    Ok(outcome.values(spec, merged))
}

/// Publishes (or has the members send) while watching the deliveries,
/// until every one arrived, they stopped coming, or the deadline passed.
/// Returns how far the publisher fell behind its schedule, and why the
/// phase ended.
async fn measured_phase(
    shards: &Shards,
    publisher: &mut Publisher,
    board: &Board,
    spec: &BroadcastSpec,
    k: &Knobs,
) -> (Result<f64, String>, End) {
    let expected = spec.expected();
    let stop = Cell::new(false);
    let published = Cell::new(false);
    let publishing = async {
        let result = match spec.origin {
            Origin::Backend => publisher.publish(board, spec, k.window, &stop).await,
            Origin::Client => {
                shards.start_sending();
                while shards.totals().senders_done < u64::from(spec.rooms) && !stop.get() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok(0.0)
            }
        };
        published.set(true);
        result
    };
    let watching = async {
        let deadline = Instant::now() + k.deadline;
        let mut last = (0, Instant::now());
        let end = loop {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let received = shards.totals().received;
            if received >= expected {
                break End::Complete;
            }
            if received != last.0 {
                last = (received, Instant::now());
            }
            // Nothing arrives any more: 3 s after the last publication, or
            // 10 s while the publisher still waits for its window to open.
            let quiet = if published.get() { 3 } else { 10 };
            if last.1.elapsed() > Duration::from_secs(quiet) {
                break End::Stalled;
            }
            if Instant::now() > deadline {
                break End::Deadline;
            }
        };
        stop.set(true);
        end
    };
    tokio::join!(publishing, watching)
}

/// CPU seconds and write calls of the processes of a run: the server
/// under test, the NATS server behind roomgate, and this generator.
struct Usage {
    sut_cpu: f64,
    sut_writes: u64,
    broker_cpu: Option<f64>,
    gen_cpu: f64,
}

impl Usage {
    fn read(stack: &Stack) -> Self {
        Self {
            sut_cpu: stack.sut().cpu(),
            sut_writes: stack.sut().write_calls(),
            broker_cpu: stack.broker().map(Proc::cpu),
            gen_cpu: sys::cpu_self().own,
        }
    }

    /// What was used between `before` and this reading.
    fn since(&self, before: &Self) -> Self {
        Self {
            sut_cpu: self.sut_cpu - before.sut_cpu,
            sut_writes: self.sut_writes.saturating_sub(before.sut_writes),
            broker_cpu: self.broker_cpu.zip(before.broker_cpu).map(|(a, b)| a - b),
            gen_cpu: self.gen_cpu - before.gen_cpu,
        }
    }
}

/// The shards' reports taken together.
struct Merged {
    hist: hdrhistogram::Histogram<u64>,
    out_of_order: u64,
    errors: u64,
    /// Seconds from the start of the measured phase to the last delivery.
    secs: f64,
    first_error: Option<String>,
}

impl Merged {
    fn of(reports: Vec<crate::shard::ShardReport>, t0: u64) -> Self {
        let mut hist = conn::new_histogram();
        let mut out_of_order = 0;
        let mut errors = 0;
        let mut last_recv = t0;
        let mut first_error = None;
        for r in reports {
            let _ = hist.add(&r.hist);
            out_of_order += r.out_of_order;
            errors += r.errors;
            last_recv = last_recv.max(r.last_recv);
            if first_error.is_none() {
                first_error = r.first_error;
            }
        }
        Self {
            hist,
            out_of_order,
            errors,
            secs: (last_recv.saturating_sub(t0)) as f64 / 1e9,
            first_error,
        }
    }
}

/// What a broadcast run measured, besides the shards' reports.
struct Outcome {
    connections: u32,
    expected: u64,
    received: u64,
    closed: u64,
    end: End,
    behind: f64,
    used: Usage,
    memory: (u64, u64),
    connect_secs: f64,
    gateway_counts: Option<(u64, u64)>,
}

impl Outcome {
    /// The run's JSON values.
    fn values(&self, spec: &BroadcastSpec, merged: Merged) -> Values {
        let received = self.received;
        let mut v = Values::new();
        v.insert("connections".into(), json!(self.connections));
        v.insert("messages".into(), json!(spec.messages));
        v.insert("expected".into(), json!(self.expected));
        v.insert("delivered".into(), json!(received));
        v.insert("lost".into(), json!(self.expected.saturating_sub(received)));
        v.insert("out_of_order".into(), json!(merged.out_of_order));
        v.insert("closed_connections".into(), json!(self.closed));
        v.insert("error_frames".into(), json!(merged.errors));
        v.insert(
            "end".into(),
            json!(match self.end {
                End::Complete => "complete",
                End::Stalled => "stalled",
                End::Deadline => "deadline",
            }),
        );
        let per_sec = if merged.secs > 0.0 {
            received as f64 / merged.secs
        } else {
            0.0
        };
        v.insert("seconds".into(), json!(round(merged.secs, 3)));
        v.insert("deliveries_per_sec".into(), json!(per_sec.round()));
        if let Pace::Rate(rate) = spec.pace {
            v.insert("rate_msgs_per_sec".into(), json!(round(rate, 1)));
            v.insert(
                "behind_schedule_ms".into(),
                json!(round(self.behind * 1e3, 2)),
            );
        }
        latencies(&mut v, &merged.hist);
        self.cpu_values(&mut v);
        let (rss, hwm) = self.memory;
        v.insert("server_rss_kib".into(), json!(rss));
        v.insert("server_hwm_kib".into(), json!(hwm));
        v.insert("connect_seconds".into(), json!(round(self.connect_secs, 3)));
        if let Some((dropped, slow_closed)) = self.gateway_counts {
            v.insert("roomgate_dropped_frames".into(), json!(dropped));
            v.insert("roomgate_slow_consumer_closes".into(), json!(slow_closed));
        }
        if let Some(e) = merged.first_error
            && received < self.expected
        {
            v.insert("first_error".into(), json!(e));
        }
        v
    }

    /// CPU in seconds and per delivery, and the server's batching.
    fn cpu_values(&self, v: &mut Values) {
        let received = self.received;
        let Usage {
            sut_cpu,
            sut_writes,
            broker_cpu,
            gen_cpu,
        } = self.used;
        v.insert("server_cpu_s".into(), json!(round(sut_cpu, 3)));
        if sut_writes > 0 {
            // How many deliveries each write call carried: the batching.
            v.insert(
                "server_deliveries_per_write".into(),
                json!(round(received as f64 / sut_writes as f64, 1)),
            );
        }
        if received > 0 {
            v.insert(
                "server_cpu_us_per_delivery".into(),
                json!(round(sut_cpu * 1e6 / received as f64, 4)),
            );
        }
        if let Some(b) = broker_cpu {
            v.insert("broker_cpu_s".into(), json!(round(b, 3)));
            if received > 0 {
                v.insert(
                    "server_and_broker_cpu_us_per_delivery".into(),
                    json!(round((sut_cpu + b) * 1e6 / received as f64, 4)),
                );
            }
        }
        v.insert("generator_cpu_s".into(), json!(round(gen_cpu, 3)));
        if received > 0 {
            v.insert(
                "generator_cpu_us_per_delivery".into(),
                json!(round(gen_cpu * 1e6 / received as f64, 4)),
            );
        }
    }
}

/// Latency quantiles of `hist` (nanoseconds), in microseconds.
fn latencies(v: &mut Values, hist: &hdrhistogram::Histogram<u64>) {
    v.insert(
        "latency_p50_us".into(),
        json!(us(hist.value_at_quantile(0.50))),
    );
    v.insert(
        "latency_p99_us".into(),
        json!(us(hist.value_at_quantile(0.99))),
    );
    v.insert(
        "latency_p999_us".into(),
        json!(us(hist.value_at_quantile(0.999))),
    );
    v.insert("latency_max_us".into(), json!(us(hist.max())));
}

/// roomgate's own count of frames it dropped and of connections it closed
/// as slow consumers, from its `/metrics`, to explain any loss.
fn gateway_counters(admin: std::net::SocketAddr) -> (u64, u64) {
    let text = procs::http_get(admin, "/metrics").unwrap_or_default();
    let sum = |prefix: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|x| x as u64)
            .sum()
    };
    (
        sum("roomgate_messages_dropped_total"),
        sum("roomgate_connections_closed_total{reason=\"slow_consumer\"}"),
    )
}

/// Idle connections: memory per connection and connection rate.
pub async fn idle(bins: &Bins, k: &Knobs, n: u32, target: Target) -> Result<Values, String> {
    fd_budget(n)?;
    let members = 10;
    let stack = Stack::start(bins, k, target, n, members)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss0, _) = stack.sut().memory();
    let board = Arc::new(Board::new(n));
    let plan = Arc::new(stack.plan(k, members, None, board));
    let threads = k.threads.max(1);
    let shards = Shards::start(threads, plan, k.connect_concurrency.div_ceil(threads))
        .map_err(|e| format!("shard threads: {e}"))?;
    let cpu0 = stack.sut().cpu();
    let gen0 = sys::cpu_self();
    let overflows0 = sys::listen_overflows();
    let connect = connect_all(&shards, n).await;
    let overflows = sys::listen_overflows()
        .zip(overflows0)
        .map(|(a, b)| a.saturating_sub(b));
    let cpu = stack.sut().cpu() - cpu0;
    let gen_cpu = (sys::cpu_self() - gen0).own;
    let secs = connect?;
    // Let the server finish what the joins started (room subscriptions).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss1, hwm) = stack.sut().memory();
    let closed = shards.totals().closed;
    let mut connect_hist = conn::new_histogram();
    for r in shards.reports().await? {
        let _ = connect_hist.add(&r.connect_hist);
    }
    shards.stop();
    drop(stack);
    let mut v = Values::new();
    v.insert("connections".into(), json!(n));
    v.insert("rooms".into(), json!(n.div_ceil(members)));
    v.insert("connect_seconds".into(), json!(round(secs, 3)));
    v.insert(
        "connections_per_sec".into(),
        json!((f64::from(n) / secs).round()),
    );
    v.insert(
        "connect_p50_ms".into(),
        json!(round(connect_hist.value_at_quantile(0.5) as f64 / 1e6, 2)),
    );
    v.insert(
        "connect_p99_ms".into(),
        json!(round(connect_hist.value_at_quantile(0.99) as f64 / 1e6, 2)),
    );
    v.insert(
        "connect_max_ms".into(),
        json!(round(connect_hist.max() as f64 / 1e6, 2)),
    );
    if let Some(o) = overflows {
        v.insert("listen_overflows".into(), json!(o));
    }
    v.insert("server_rss_before_kib".into(), json!(rss0));
    v.insert("server_rss_after_kib".into(), json!(rss1));
    v.insert("server_hwm_kib".into(), json!(hwm));
    v.insert(
        "rss_per_connection_kib".into(),
        json!(round(rss1.saturating_sub(rss0) as f64 / f64::from(n), 2)),
    );
    v.insert("server_cpu_s".into(), json!(round(cpu, 3)));
    v.insert(
        "server_cpu_us_per_connection".into(),
        json!(round(cpu * 1e6 / f64::from(n), 2)),
    );
    v.insert("generator_cpu_s".into(), json!(round(gen_cpu, 3)));
    v.insert(
        "generator_cpu_us_per_connection".into(),
        json!(round(gen_cpu * 1e6 / f64::from(n), 2)),
    );
    v.insert("closed_connections".into(), json!(closed));
    Ok(v)
}

/// What the HTTP scenario puts in front of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxy {
    /// Nothing: wrk against the upstream.
    Direct,
    /// roomgate's reverse proxy.
    Roomgate,
    /// nginx.
    Nginx,
    /// hyper's server and client with nothing between them: the least any
    /// proxy built on hyper costs (`hyperfloor`).
    HyperFloor,
}

impl Proxy {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Proxy::Direct => "direct",
            Proxy::Roomgate => "roomgate",
            Proxy::Nginx => "nginx",
            Proxy::HyperFloor => "hyper-floor",
        }
    }
}

/// wrk settings.
#[derive(Debug, Clone, Copy)]
pub struct WrkSpec {
    /// wrk threads.
    pub threads: u32,
    /// Connections.
    pub connections: u32,
    /// Measured seconds.
    pub secs: u32,
}

/// One HTTP run: a warm-up second, then `wrk --latency`.
pub fn http(bins: &Bins, w: &WrkSpec, proxy: Proxy) -> Result<Values, String> {
    let wrk = bins.wrk()?;
    let upstream = OwnServer::upstream()?;
    let mut gateway = None;
    let mut nginx = None;
    let mut floor = None;
    let addr = match proxy {
        Proxy::Direct => upstream.addr,
        Proxy::Roomgate => {
            let g = Roomgate::start(
                &bins.roomgate,
                &RoomgateSettings {
                    nats_url: None,
                    upstream: Some(format!("http://{}", upstream.addr)),
                    max_members: 1000,
                    max_connections: 100_000,
                    send_queue: 256,
                },
            )?;
            let a = g.addr;
            gateway = Some(g);
            a
        }
        Proxy::Nginx => {
            let n = Nginx::start(bins.nginx()?, upstream.addr, w.connections)?;
            let a = n.addr;
            nginx = Some(n);
            a
        }
        Proxy::HyperFloor => {
            let f = OwnServer::hyper_floor(upstream.addr)?;
            let a = f.addr;
            floor = Some(f);
            a
        }
    };
    let proxy_proc: Option<&Proc> = gateway
        .as_ref()
        .map(|g| &g.proc)
        .or(nginx.as_ref().map(|n| &n.proc))
        .or(floor.as_ref().map(|f| &f.proc));
    let url = format!("http://{addr}/");
    procs::wrk(wrk, &url, w.threads, w.connections, 1)?;
    let p0 = proxy_proc.map(Proc::cpu);
    let u0 = upstream.proc.cpu();
    let r = procs::wrk(wrk, &url, w.threads, w.connections, w.secs)?;
    let proxy_cpu = proxy_proc.map(Proc::cpu).zip(p0).map(|(a, b)| a - b);
    let upstream_cpu = upstream.proc.cpu() - u0;
    let memory = proxy_proc.map(Proc::memory);
    drop(gateway);
    drop(nginx);
    drop(floor);
    drop(upstream);
    let mut v = Values::new();
    v.insert("wrk_connections".into(), json!(w.connections));
    v.insert("seconds".into(), json!(w.secs));
    v.insert("requests".into(), json!(r.requests));
    v.insert("requests_per_sec".into(), json!(r.rps.round()));
    v.insert("latency_p50_us".into(), json!(round(r.p50_us, 1)));
    v.insert("latency_p99_us".into(), json!(round(r.p99_us, 1)));
    v.insert("errors".into(), json!(r.errors));
    if let Some(c) = proxy_cpu {
        v.insert("proxy_cpu_s".into(), json!(round(c, 3)));
        if r.requests > 0 {
            v.insert(
                "proxy_cpu_us_per_request".into(),
                json!(round(c * 1e6 / r.requests as f64, 2)),
            );
        }
    }
    v.insert("upstream_cpu_s".into(), json!(round(upstream_cpu, 3)));
    v.insert("wrk_cpu_s".into(), json!(round(r.cpu, 3)));
    if let Some((rss, hwm)) = memory {
        v.insert("proxy_rss_kib".into(), json!(rss));
        v.insert("proxy_hwm_kib".into(), json!(hwm));
    }
    Ok(v)
}

/// wrk threads and connections of the connect floor: as much parallelism
/// as helps on two cores, so the floor is not held back by the client.
pub const FLOOR_WRK_THREADS: u32 = 2;
/// See [`FLOOR_WRK_THREADS`].
pub const FLOOR_WRK_CONNECTIONS: u32 = 256;

/// The machine's floor for new connections, measured with the same cores
/// as the idle runs: nginx answering every request itself, wrk opening a
/// new TCP connection for every request. A connection there is connect,
/// one small request and answer, and close: less than the idle scenario's
/// connect, upgrade and join, so its rate bounds what any server could
/// reach there.
pub fn connect_floor(bins: &Bins, secs: u32) -> Result<Values, String> {
    let wrk = bins.wrk()?;
    let nginx = Nginx::start_static(bins.nginx()?)?;
    let url = format!("http://{}/", nginx.addr);
    let (threads, connections) = (FLOOR_WRK_THREADS, FLOOR_WRK_CONNECTIONS);
    procs::wrk_with(wrk, &url, threads, connections, 1, true)?;
    let cpu0 = nginx.proc.cpu();
    let r = procs::wrk_with(wrk, &url, threads, connections, secs, true)?;
    let cpu = nginx.proc.cpu() - cpu0;
    drop(nginx);
    let mut v = Values::new();
    v.insert("seconds".into(), json!(secs));
    v.insert("connections".into(), json!(r.requests));
    v.insert("connections_per_sec".into(), json!(r.rps.round()));
    v.insert("latency_p50_us".into(), json!(round(r.p50_us, 1)));
    v.insert("latency_p99_us".into(), json!(round(r.p99_us, 1)));
    v.insert("errors".into(), json!(r.errors));
    if r.requests > 0 {
        let per = |s: f64| json!(round(s * 1e6 / r.requests as f64, 2));
        v.insert("server_cpu_us_per_connection".into(), per(cpu));
        v.insert("generator_cpu_us_per_connection".into(), per(r.cpu));
    }
    Ok(v)
}

fn us(ns: u64) -> f64 {
    round(ns as f64 / 1e3, 1)
}

/// `x` rounded to `digits` decimals, for the report.
pub fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_rooms_cover_the_range() {
        let mut rng = XorShift(0x5EED_1234_ABCD_0001);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[rng.below(10) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| (800..1200).contains(&c)), "{seen:?}");
    }

    #[test]
    fn expected_deliveries() {
        let b = BroadcastSpec {
            rooms: 3,
            members: 10,
            messages: 7,
            origin: Origin::Backend,
            pace: Pace::Max,
        };
        assert_eq!(b.expected(), 70);
        let c = BroadcastSpec {
            origin: Origin::Client,
            ..b
        };
        assert_eq!(c.expected(), 7 * 9 * 3);
    }
}
