//! The benchmark matrix: which runs, in which order, with which sizes.
//!
//! Targets alternate within each repetition (roomgate, then its peer, then
//! the next repetition), so a change in the machine's background load
//! affects both sides of a ratio alike.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::floor::{self, FloorSpec};
use crate::report::{self, Record};
use crate::scenario::{self, Bins, BroadcastSpec, Knobs, Origin, Pace, Proxy, Target, WrkSpec};

/// The scenarios, by name.
pub const SCENARIOS: [&str; 6] = ["fanout", "rate", "rooms", "client", "idle", "http"];

/// What to run.
#[derive(Debug, Clone)]
pub struct Matrix {
    /// Scenario names to run (see [`SCENARIOS`]).
    pub only: Vec<String>,
    /// Repetitions of every run.
    pub reps: u32,
    /// Fan-out room sizes.
    pub fanout: Vec<u32>,
    /// Deliveries per fan-out run (messages = deliveries / size).
    pub fanout_deliveries: u64,
    /// Many rooms: (rooms, members).
    pub rooms: (u32, u32),
    /// Deliveries per many-rooms run.
    pub rooms_deliveries: u64,
    /// Client-originated: (rooms, members) each.
    pub client: Vec<(u32, u32)>,
    /// Deliveries per client-originated run.
    pub client_deliveries: u64,
    /// Idle connection counts.
    pub idle: Vec<u32>,
    /// Fixed-rate run length, seconds.
    pub rate_secs: f64,
    /// Fixed rate (messages/s), instead of a fraction of the measured maximum.
    pub rate: Option<f64>,
    /// That fraction (0.5: half the maximum).
    pub rate_fraction: f64,
    /// wrk settings.
    pub wrk: WrkSpec,
}

/// Collects records: prints each as a JSON line and appends it to the
/// JSON-lines file.
pub struct Sink {
    /// Everything so far.
    pub records: Vec<Record>,
    file: Option<std::fs::File>,
    /// The JSON-lines file.
    pub path: PathBuf,
}

impl Sink {
    /// Appends to `path` (truncated first).
    pub fn create(path: PathBuf) -> Result<Self, String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let file = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self {
            records: Vec::new(),
            file: Some(file),
            path,
        })
    }

    fn push(
        &mut self,
        scenario: &'static str,
        size: String,
        target: &'static str,
        rep: u32,
        result: Result<scenario::Values, String>,
    ) {
        let values = result.unwrap_or_else(|e| {
            let mut m = scenario::Values::new();
            m.insert("error".into(), json!(e));
            m
        });
        let record = Record {
            scenario,
            size,
            target,
            rep,
            values,
        };
        let line = record.json();
        println!("{line}");
        if let Some(f) = &mut self.file {
            let _ = writeln!(f, "{line}");
        }
        self.records.push(record);
    }

    fn mean(&self, scenario: &str, size: &str, target: &str, key: &str) -> Option<f64> {
        let xs: Vec<f64> = self
            .records
            .iter()
            .filter(|r| r.scenario == scenario && r.size == size && r.target == target)
            .filter(|r| r.error().is_none() && r.num("lost") == Some(0.0))
            .filter_map(|r| r.num(key))
            .collect();
        (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
    }
}

const TARGETS: [Target; 2] = [Target::Roomgate, Target::NatsWs];

/// The delivery floor with a window of frames per `writev`.
pub const FLOOR_AT_WINDOW: &str = "writev-window";
/// The delivery floor with roomgate's mean frames per write.
pub const FLOOR_AT_ROOMGATE: &str = "writev-as-roomgate";

impl Matrix {
    fn wants(&self, name: &str) -> bool {
        self.only.iter().any(|o| o == name)
    }

    /// Runs everything selected, in order.
    pub async fn run(&self, bins: &Bins, k: &Knobs, sink: &mut Sink) {
        if self.wants("fanout") || self.wants("rate") {
            for &n in &self.fanout {
                self.fanout(bins, k, n, sink).await;
            }
        }
        if self.wants("rooms") {
            let (rooms, members) = self.rooms;
            let spec = BroadcastSpec {
                rooms,
                members,
                messages: (self.rooms_deliveries / u64::from(members)).max(10),
                origin: Origin::Backend,
                pace: Pace::Max,
            };
            for rep in 1..=self.reps {
                for t in TARGETS {
                    let r = scenario::broadcast(bins, k, &spec, t).await;
                    sink.push("rooms", format!("{rooms}x{members}"), t.name(), rep, r);
                }
            }
        }
        if self.wants("client") {
            for &(rooms, members) in &self.client {
                let per_sender = self.client_deliveries
                    / (u64::from(rooms) * u64::from(members.saturating_sub(1)).max(1));
                let spec = BroadcastSpec {
                    rooms,
                    members: members.max(2),
                    messages: per_sender.max(10),
                    origin: Origin::Client,
                    pace: Pace::Max,
                };
                for rep in 1..=self.reps {
                    let r = scenario::broadcast(bins, k, &spec, Target::Roomgate).await;
                    sink.push("client", format!("{rooms}x{members}"), "roomgate", rep, r);
                }
            }
        }
        if self.wants("idle") {
            for &n in &self.idle {
                for rep in 1..=self.reps {
                    for t in TARGETS {
                        let r = scenario::idle(bins, k, n, t).await;
                        sink.push("idle", n.to_string(), t.name(), rep, r);
                        // Let the closed sockets' TIME_WAIT and the
                        // server's exit settle before the next run.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            // The floor the connection rates are read against.
            let size = format!("c{}", scenario::FLOOR_WRK_CONNECTIONS);
            for rep in 1..=self.reps {
                let r = scenario::connect_floor(bins, self.wrk.secs);
                sink.push("connect-floor", size.clone(), "nginx-static", rep, r);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        if self.wants("http") {
            let size = format!("c{}", self.wrk.connections);
            for rep in 1..=self.reps {
                for p in [
                    Proxy::Direct,
                    Proxy::Roomgate,
                    Proxy::Nginx,
                    Proxy::HyperFloor,
                ] {
                    let r = scenario::http(bins, &self.wrk, p);
                    sink.push("http", size.clone(), p.name(), rep, r);
                }
            }
        }
    }

    async fn fanout(&self, bins: &Bins, k: &Knobs, n: u32, sink: &mut Sink) {
        let size = format!("1x{n}");
        if self.wants("fanout") {
            let spec = BroadcastSpec {
                rooms: 1,
                members: n,
                messages: (self.fanout_deliveries / u64::from(n)).max(10),
                origin: Origin::Backend,
                pace: Pace::Max,
            };
            for rep in 1..=self.reps {
                for t in TARGETS {
                    let r = scenario::broadcast(bins, k, &spec, t).await;
                    sink.push("fanout", size.clone(), t.name(), rep, r);
                }
            }
            // The floor the smallest room's CPU per delivery is read
            // against (it holds both ends of every socket: twice the
            // descriptors of a run, so not for the largest rooms).
            if self.fanout.iter().min() == Some(&n) {
                self.delivery_floor(k, &spec, sink);
            }
        }
        if !self.wants("rate") {
            return;
        }
        // A fraction (by default half) of the lower maximum, so both
        // servers can keep up.
        let rate = self.rate.or_else(|| {
            let a = sink.mean("fanout", &size, "roomgate", "deliveries_per_sec");
            let b = sink.mean("fanout", &size, "nats-ws", "deliveries_per_sec");
            let lower = match (a, b) {
                (Some(a), Some(b)) => a.min(b),
                (Some(x), None) | (None, Some(x)) => x,
                (None, None) => return None,
            };
            Some(lower / f64::from(n) * self.rate_fraction)
        });
        let Some(rate) = rate.filter(|r| *r > 0.0) else {
            for t in TARGETS {
                sink.push(
                    "fanout-rate",
                    size.clone(),
                    t.name(),
                    1,
                    Err(
                        "no rate: the maximum runs failed or lost messages (or give --rate)".into(),
                    ),
                );
            }
            return;
        };
        let spec = BroadcastSpec {
            rooms: 1,
            members: n,
            messages: ((rate * self.rate_secs) as u64).max(20),
            origin: Origin::Backend,
            pace: Pace::Rate(rate),
        };
        for rep in 1..=self.reps {
            for t in TARGETS {
                let r = scenario::broadcast(bins, k, &spec, t).await;
                sink.push("fanout-rate", size.clone(), t.name(), rep, r);
            }
        }
    }

    /// The delivery floor of a fan-out room, at two batch sizes: a window
    /// of frames per `writev` (the most any server can batch in these
    /// runs) and roomgate's own mean in the runs just made.
    fn delivery_floor(&self, k: &Knobs, spec: &BroadcastSpec, sink: &mut Sink) {
        let size = format!("1x{}", spec.members);
        let window = k.window.max(1) as usize;
        let roomgate = sink
            .mean("fanout", &size, "roomgate", "server_deliveries_per_write")
            .map(|b| (b.round() as usize).clamp(1, window));
        let batches = [
            (FLOOR_AT_WINDOW, Some(window)),
            (FLOOR_AT_ROOMGATE, roomgate),
        ];
        for rep in 1..=self.reps {
            for (target, batch) in batches {
                let Some(batch) = batch else { continue };
                let floor = FloorSpec {
                    members: spec.members,
                    messages: spec.messages,
                    batch,
                    frame: k.payload,
                };
                sink.push(
                    "delivery-floor",
                    size.clone(),
                    target,
                    rep,
                    floor::delivery_floor(floor),
                );
            }
        }
    }
}

/// Prints the table and writes the report.
pub fn finish(
    sink: &Sink,
    report_path: &std::path::Path,
    ctx: &report::Context<'_>,
) -> Result<(), String> {
    report::print_table(&sink.records);
    let text = report::markdown(&sink.records, ctx);
    if let Some(dir) = report_path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(report_path, text).map_err(|e| format!("{}: {e}", report_path.display()))?;
    println!(
        "\nreport: {}\nJSON lines: {}",
        report_path.display(),
        sink.path.display()
    );
    Ok(())
}
