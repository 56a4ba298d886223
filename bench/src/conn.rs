//! One generator connection: TCP from a chosen source address, the
//! WebSocket upgrade, joining a room (roomgate) or subscribing to a subject
//! (NATS over WebSocket), then receiving and measuring every delivery.
//!
//! Per connection the generator keeps a socket, one read buffer, a few
//! integers of sequence state, and nothing else; histograms and counters
//! belong to the shard (one thread) that runs the connection.

use std::cell::{Cell, RefCell};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::natsproto::{self, Op};
use crate::payload;
use crate::sys::now_ns;
use crate::ws::{self, Header, Masker, Parsed};

/// Largest WebSocket frame accepted from a server.
const MAX_FRAME: usize = 1 << 20;

/// `progress` value of a connection that has not yet received a probe.
pub const NOT_READY: u32 = u32::MAX;

/// Which server the connections talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// roomgate's JSON protocol: join a room, receive `message` frames.
    Roomgate,
    /// The NATS client protocol over nats-server's WebSocket listener.
    NatsWs,
}

/// Client-originated traffic: the first member of each room sends.
#[derive(Debug, Clone)]
pub struct SenderPlan {
    /// Messages each sender sends.
    pub per_room: u32,
    /// Most messages a sender may have ahead of its room's slowest member.
    pub window: u32,
    /// Frame size in bytes.
    pub payload: usize,
}

/// What every connection of a run shares (read-only).
#[derive(Debug)]
pub struct Plan {
    /// Protocol of the server under test.
    pub proto: Proto,
    /// Its WebSocket listener.
    pub addr: SocketAddr,
    /// Upgrade path (`/ws` for roomgate).
    pub path: String,
    /// Members per room: connection `i` is in room `i / members`.
    pub members: u32,
    /// Source addresses, used round-robin.
    pub sources: Vec<Ipv4Addr>,
    /// Initial read buffer per connection.
    pub read_buf: usize,
    /// Time for connect + upgrade + join of one connection.
    pub connect_timeout: Duration,
    /// Set for client-originated runs.
    pub sender: Option<SenderPlan>,
    /// Shared progress of every connection.
    pub board: Arc<Board>,
}

impl Plan {
    /// The room of connection `idx`.
    pub fn room_of(&self, idx: u32) -> u32 {
        idx / self.members
    }

    /// Whether connection `idx` sends (client-originated runs only).
    pub fn is_sender(&self, idx: u32) -> bool {
        self.sender.is_some() && idx.is_multiple_of(self.members)
    }
}

/// Room name `r` (the same for both servers; the NATS subject is
/// `bench.<name>`).
pub fn room_name(r: u32) -> String {
    format!("b{r}")
}

/// Per-connection progress shared with the publisher: the highest sequence
/// number received, or [`NOT_READY`] before the first probe arrived. The
/// publisher reads it to keep at most a window of messages in flight and
/// to know when every subscription is in place.
#[derive(Debug)]
pub struct Board {
    /// One slot per connection.
    pub progress: Box<[AtomicU32]>,
}

impl Board {
    /// `n` connections, none ready.
    pub fn new(n: u32) -> Self {
        Self {
            progress: (0..n).map(|_| AtomicU32::new(NOT_READY)).collect(),
        }
    }

    /// The lowest progress among members `range` except `skip` (the sender,
    /// which does not receive its own messages); `NOT_READY` counts as 0.
    pub fn min_progress(&self, range: std::ops::Range<u32>, skip: Option<u32>) -> u32 {
        let mut min = u32::MAX;
        for i in range {
            if Some(i) == skip {
                continue;
            }
            let p = self.progress[i as usize].load(Relaxed);
            min = min.min(if p == NOT_READY { 0 } else { p });
        }
        if min == u32::MAX { 0 } else { min }
    }

    /// Connections that have received a probe.
    pub fn ready_count(&self, range: std::ops::Range<u32>) -> u32 {
        range
            .filter(|&i| self.progress[i as usize].load(Relaxed) != NOT_READY)
            .count() as u32
    }
}

/// Counters a shard shares with the coordinator while a run goes on.
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Measured deliveries (sequence number ≥ 1).
    pub received: AtomicU64,
    /// Connections that completed connect + upgrade + join.
    pub joined: AtomicU64,
    /// Connections that failed to get there.
    pub failed: AtomicU64,
    /// Joined connections that ended (closed by the server or broken).
    pub closed: AtomicU64,
    /// Senders that sent everything.
    pub senders_done: AtomicU64,
}

/// A shard's state for its connections (single thread, no locks).
pub struct Local {
    /// The run.
    pub plan: Arc<Plan>,
    /// Shared counters.
    pub stats: Arc<ShardStats>,
    /// End-to-end latency of every delivery, nanoseconds.
    pub hist: RefCell<Histogram<u64>>,
    /// Time from the start of connect to joined, per connection, nanoseconds.
    pub connect_hist: RefCell<Histogram<u64>>,
    /// Deliveries whose sequence number was below one already seen.
    pub out_of_order: Cell<u64>,
    /// Error frames (`"type":"error"`, `-ERR`).
    pub errors: Cell<u64>,
    /// When the last delivery was read.
    pub last_recv: Cell<u64>,
    /// The first failure, for the report.
    pub first_error: RefCell<Option<String>>,
    /// Becomes true when client-originated sending starts.
    pub start: tokio::sync::watch::Receiver<bool>,
}

impl Local {
    /// Fresh state for a shard.
    pub fn new(
        plan: Arc<Plan>,
        stats: Arc<ShardStats>,
        start: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            plan,
            stats,
            hist: RefCell::new(new_histogram()),
            connect_hist: RefCell::new(new_histogram()),
            out_of_order: Cell::new(0),
            errors: Cell::new(0),
            last_recv: Cell::new(0),
            first_error: RefCell::new(None),
            start,
        }
    }

    fn note_error(&self, e: impl Into<String>) {
        let mut first = self.first_error.borrow_mut();
        if first.is_none() {
            *first = Some(e.into());
        }
    }
}

/// A latency histogram: 1 µs to 100 s in nanoseconds, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 100_000_000_000, 3).expect("valid histogram bounds")
}

/// Runs connection `idx` until the shard stops: connect with the
/// semaphore held (it bounds concurrent handshakes), then receive.
pub async fn run(idx: u32, local: std::rc::Rc<Local>, gate: Arc<tokio::sync::Semaphore>) {
    let permit = gate.acquire_owned().await;
    let plan = local.plan.clone();
    let t0 = now_ns();
    let established = tokio::time::timeout(plan.connect_timeout, Conn::establish(idx, &plan)).await;
    drop(permit);
    local
        .connect_hist
        .borrow_mut()
        .saturating_record(now_ns().saturating_sub(t0));
    let mut conn = match established {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            local.stats.failed.fetch_add(1, Relaxed);
            local.note_error(format!("connection {idx}: {e}"));
            return;
        }
        Err(_) => {
            local.stats.failed.fetch_add(1, Relaxed);
            local.note_error(format!(
                "connection {idx}: no join within {:?}",
                plan.connect_timeout
            ));
            return;
        }
    };
    local.stats.joined.fetch_add(1, Relaxed);
    let result = if plan.is_sender(idx) {
        conn.run_sender(&local).await
    } else {
        conn.receive(&local).await
    };
    local.stats.closed.fetch_add(1, Relaxed);
    if let Err(e) = result {
        local.note_error(format!("connection {idx}: {e}"));
    }
}

/// Sequence tracking of one connection.
struct Track {
    idx: u32,
    /// Next expected sequence number.
    next: u32,
    ready: bool,
    /// Where the marker was in the last frame (see [`payload::parse_with_hint`]).
    hint: u16,
}

/// Per-protocol receive state.
enum Flavour {
    /// Fragments of a roomgate text message (tungstenite servers do not
    /// fragment; handled for correctness only).
    Roomgate { fragments: Vec<u8> },
    /// The NATS byte stream carried in WebSocket frames.
    Nats { reader: natsproto::Reader },
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    track: Track,
    masker: Masker,
    /// Frames to write after the current batch (pongs, close replies).
    out: Vec<u8>,
    flavour: Flavour,
    closing: bool,
}

/// What a batch of frames amounted to.
#[derive(Default)]
struct Batch {
    delivered: u64,
    pongs: u32,
    infos: u32,
    joined: bool,
    error: Option<String>,
}

impl Conn {
    async fn establish(idx: u32, plan: &Plan) -> Result<Conn, String> {
        let source = plan.sources[idx as usize % plan.sources.len()];
        let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        socket
            .bind(SocketAddr::new(IpAddr::V4(source), 0))
            .map_err(|e| format!("bind {source}: {e}"))?;
        let stream = socket
            .connect(plan.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", plan.addr))?;
        let _ = stream.set_nodelay(true);
        let flavour = match plan.proto {
            Proto::Roomgate => Flavour::Roomgate {
                fragments: Vec::new(),
            },
            Proto::NatsWs => Flavour::Nats {
                reader: natsproto::Reader::default(),
            },
        };
        let mut conn = Conn {
            stream,
            buf: vec![0; plan.read_buf.max(256)],
            start: 0,
            end: 0,
            track: Track {
                idx,
                next: 1,
                ready: false,
                hint: 0,
            },
            masker: Masker::new(u64::from(idx) + 1),
            out: Vec::new(),
            flavour,
            closing: false,
        };
        conn.upgrade(plan).await?;
        let room = room_name(plan.room_of(idx));
        match plan.proto {
            Proto::Roomgate => {
                let join = format!(r#"{{"type":"join","room":"{room}"}}"#);
                conn.send(ws::TEXT, join.as_bytes()).await?;
                conn.setup_until(|b| b.joined).await?;
            }
            Proto::NatsWs => {
                conn.setup_until(|b| b.infos > 0).await?;
                conn.send(ws::BINARY, natsproto::connect()).await?;
                conn.setup_until(|b| b.pongs > 0).await?;
                let sub = natsproto::subscribe(&format!("bench.{room}"), 1);
                conn.send(ws::BINARY, &sub).await?;
                conn.setup_until(|b| b.pongs > 0).await?;
            }
        }
        Ok(conn)
    }

    async fn upgrade(&mut self, plan: &Plan) -> Result<(), String> {
        let (request, key) = ws::upgrade_request(&plan.addr.to_string(), &plan.path);
        self.stream
            .write_all(&request)
            .await
            .map_err(|e| format!("upgrade request: {e}"))?;
        loop {
            self.fill().await?;
            if let Some(n) = ws::check_upgrade(&self.buf[..self.end], &key)? {
                self.start = n;
                return Ok(());
            }
        }
    }

    /// Writes one masked frame.
    async fn send(&mut self, opcode: u8, payload: &[u8]) -> Result<(), String> {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        ws::encode(&mut frame, opcode, payload, self.masker.next_key());
        self.stream
            .write_all(&frame)
            .await
            .map_err(|e| format!("write: {e}"))
    }

    /// Reads until a batch satisfies `done` (set-up only: nothing is
    /// measured yet, but probes and pings are handled as usual).
    async fn setup_until(&mut self, done: impl Fn(&Batch) -> bool) -> Result<(), String> {
        let mut seen = Batch::default();
        loop {
            let b = self.process(None)?;
            if let Some(e) = b.error {
                return Err(e);
            }
            seen.pongs += b.pongs;
            seen.infos += b.infos;
            seen.joined |= b.joined;
            self.flush().await?;
            if done(&seen) {
                return Ok(());
            }
            if self.closing {
                return Err("closed by the server during set-up".into());
            }
            self.fill().await?;
        }
    }

    /// Reads more bytes into the buffer, making room first.
    async fn fill(&mut self) -> Result<(), String> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < self.buf.len() / 4 {
            // Little room left: move the partial frame to the front (it is
            // short) rather than read a few bytes at a time.
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let grown = (self.buf.len() * 2).min(MAX_FRAME + 16);
                if grown <= self.buf.len() {
                    return Err("frame larger than the read limit".into());
                }
                self.buf.resize(grown, 0);
            }
        }
        match self.stream.read(&mut self.buf[self.end..]).await {
            Ok(0) => Err("connection closed by the server".into()),
            Ok(n) => {
                self.end += n;
                Ok(())
            }
            Err(e) => Err(format!("read: {e}")),
        }
    }

    async fn flush(&mut self) -> Result<(), String> {
        if self.out.is_empty() {
            return Ok(());
        }
        let result = self.stream.write_all(&self.out).await;
        self.out.clear();
        result.map_err(|e| format!("write: {e}"))
    }

    /// Handles every complete frame in the buffer. With `local` the
    /// deliveries are measured; without, this is set-up.
    fn process(&mut self, local: Option<&Local>) -> Result<Batch, String> {
        let now = now_ns();
        let mut batch = Batch::default();
        let mut hist = local.map(|l| l.hist.borrow_mut());
        let mut out_of_order = 0;
        loop {
            let header: Header = match ws::parse_header(&self.buf[self.start..self.end], MAX_FRAME)
            {
                Parsed::Header(h) if h.total() <= self.end - self.start => h,
                Parsed::Header(h) => {
                    // Make sure the buffer can hold the whole frame.
                    if h.total() > self.buf.len() {
                        self.buf.copy_within(self.start..self.end, 0);
                        self.end -= self.start;
                        self.start = 0;
                        self.buf.resize(h.total(), 0);
                    }
                    break;
                }
                Parsed::Incomplete => break,
                Parsed::Invalid => return Err("invalid frame from the server".into()),
            };
            let p0 = self.start + header.header_len;
            let p1 = p0 + header.payload_len;
            self.start = p1;
            if let Some(mask) = header.mask {
                ws::apply_mask(&mut self.buf[p0..p1], mask);
            }
            let mut on_payload = |data: &[u8], batch: &mut Batch| {
                self.track.on_payload(
                    data,
                    now,
                    local,
                    hist.as_deref_mut(),
                    batch,
                    &mut out_of_order,
                );
            };
            match header.opcode {
                ws::TEXT | ws::BINARY | ws::CONTINUATION => match &mut self.flavour {
                    Flavour::Roomgate { fragments } => {
                        let data = &self.buf[p0..p1];
                        if header.fin && fragments.is_empty() {
                            on_payload(data, &mut batch);
                        } else {
                            fragments.extend_from_slice(data);
                            if fragments.len() > MAX_FRAME {
                                return Err("fragmented message too large".into());
                            }
                            if header.fin {
                                let whole = std::mem::take(fragments);
                                on_payload(&whole, &mut batch);
                            }
                        }
                    }
                    Flavour::Nats { reader } => {
                        let out = &mut self.out;
                        let masker = &mut self.masker;
                        let mut failure = None;
                        reader.feed(&self.buf[p0..p1], |op| match op {
                            Op::Msg(data) => on_payload(data, &mut batch),
                            Op::Ping => ws::encode(out, ws::BINARY, b"PONG\r\n", masker.next_key()),
                            Op::Pong => batch.pongs += 1,
                            Op::Info => batch.infos += 1,
                            Op::Ok => {}
                            Op::Err(text) => {
                                failure = Some(String::from_utf8_lossy(text).into_owned());
                            }
                        })?;
                        if let Some(text) = failure {
                            if let Some(l) = local {
                                l.errors.set(l.errors.get() + 1);
                            }
                            batch.error.get_or_insert(text);
                        }
                    }
                },
                ws::PING => {
                    let key = self.masker.next_key();
                    ws::encode(&mut self.out, ws::PONG, &self.buf[p0..p1], key);
                }
                ws::PONG => {}
                ws::CLOSE => {
                    let code = self.buf[p0..p1]
                        .get(..2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]));
                    let key = self.masker.next_key();
                    ws::encode(&mut self.out, ws::CLOSE, &self.buf[p0..p1.min(p0 + 2)], key);
                    self.closing = true;
                    batch
                        .error
                        .get_or_insert(format!("closed by the server with code {code:?}"));
                    break;
                }
                other => return Err(format!("unknown opcode {other}")),
            }
        }
        if let Some(l) = local {
            if out_of_order > 0 {
                l.out_of_order.set(l.out_of_order.get() + out_of_order);
            }
            if batch.delivered > 0 {
                l.stats.received.fetch_add(batch.delivered, Relaxed);
                l.last_recv.set(now);
                l.plan.board.progress[self.track.idx as usize].store(self.track.next - 1, Relaxed);
            }
        }
        Ok(batch)
    }

    /// Receives until the connection ends or the shard stops.
    async fn receive(&mut self, local: &Local) -> Result<(), String> {
        loop {
            let batch = self.process(Some(local))?;
            self.flush().await?;
            if self.closing {
                return Err(batch.error.unwrap_or_else(|| "closed".into()));
            }
            self.fill().await?;
        }
    }

    /// A sender: waits for the start, sends its messages while no member of
    /// its room is more than a window behind, then keeps receiving.
    async fn run_sender(&mut self, local: &Local) -> Result<(), String> {
        let plan = local.plan.clone();
        let Some(sp) = plan.sender.clone() else {
            return self.receive(local).await;
        };
        let room = plan.room_of(self.track.idx);
        let room_name = room_name(room);
        let members = room * plan.members..(room + 1) * plan.members;
        let mut start = local.start.clone();
        while !*start.borrow_and_update() {
            tokio::select! {
                changed = start.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
                r = self.fill() => {
                    r?;
                    self.process(Some(local))?;
                    self.flush().await?;
                }
            }
        }
        let mut frame = Vec::with_capacity(sp.payload + 16);
        let mut batch = Vec::with_capacity(32 * (sp.payload + 16));
        let mut sent = 0u32;
        let mut allowed = 0u32;
        while sent < sp.per_room {
            if sent >= allowed {
                allowed = plan
                    .board
                    .min_progress(members.clone(), Some(self.track.idx))
                    .saturating_add(sp.window);
                if sent >= allowed {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(1)) => {}
                        r = self.fill() => {
                            r?;
                            self.process(Some(local))?;
                            self.flush().await?;
                        }
                    }
                    continue;
                }
            }
            let n = (allowed - sent).min(sp.per_room - sent).min(32);
            batch.clear();
            for _ in 0..n {
                sent += 1;
                payload::client_frame(&mut frame, &room_name, sent, now_ns(), sp.payload);
                ws::encode(&mut batch, ws::TEXT, &frame, self.masker.next_key());
            }
            self.stream
                .write_all(&batch)
                .await
                .map_err(|e| format!("write: {e}"))?;
        }
        local.stats.senders_done.fetch_add(1, Relaxed);
        self.receive(local).await
    }
}

impl Track {
    /// Handles one message's payload.
    #[inline]
    fn on_payload(
        &mut self,
        data: &[u8],
        now: u64,
        local: Option<&Local>,
        hist: Option<&mut Histogram<u64>>,
        batch: &mut Batch,
        out_of_order: &mut u64,
    ) {
        let Some((seq, ts)) = payload::parse_with_hint(data, &mut self.hint) else {
            if contains(data, br#""type":"joined""#) {
                batch.joined = true;
            } else if contains(data, br#""type":"error""#) {
                if let Some(l) = local {
                    l.errors.set(l.errors.get() + 1);
                }
                batch
                    .error
                    .get_or_insert_with(|| String::from_utf8_lossy(data).into_owned());
            }
            return;
        };
        if seq == payload::PROBE {
            if let Some(l) = local
                && !self.ready
            {
                self.ready = true;
                let _ = l.plan.board.progress[self.idx as usize]
                    .compare_exchange(NOT_READY, 0, Relaxed, Relaxed);
            }
            return;
        }
        let Some(hist) = hist else {
            return;
        };
        batch.delivered += 1;
        hist.saturating_record(now.saturating_sub(ts));
        if seq >= self.next {
            self.next = seq + 1;
        } else {
            *out_of_order += 1;
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
