//! Results: one JSON line per run, a table on the terminal, and
//! `BENCHMARKS.md` with the machine, the commands, every repetition, the
//! same-run ratios and the targets.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Map, Value, json};

use crate::procs;
use crate::scenario::Bins;
use crate::sys;

/// One run's result.
#[derive(Debug, Clone)]
pub struct Record {
    /// `fanout`, `fanout-rate`, `rooms`, `client`, `idle` or `http`.
    pub scenario: &'static str,
    /// `1x1000` (rooms x members), `19000` (connections), `c64` (wrk connections).
    pub size: String,
    /// `roomgate`, `nats-ws`, `nginx`, `hyper-floor` or `direct`.
    pub target: &'static str,
    /// Repetition, from 1.
    pub rep: u32,
    /// The measurements, or `error`.
    pub values: Map<String, Value>,
}

impl Record {
    /// The JSON line.
    pub fn json(&self) -> String {
        let mut m = Map::new();
        m.insert("scenario".into(), json!(self.scenario));
        m.insert("size".into(), json!(self.size));
        m.insert("target".into(), json!(self.target));
        m.insert("rep".into(), json!(self.rep));
        for (k, v) in &self.values {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m).to_string()
    }

    /// A numeric value.
    pub fn num(&self, key: &str) -> Option<f64> {
        self.values.get(key)?.as_f64()
    }

    /// The error, for a run that failed.
    pub fn error(&self) -> Option<&str> {
        self.values.get("error")?.as_str()
    }
}

/// Looks up one record.
pub fn find<'a>(
    records: &'a [Record],
    scenario: &str,
    size: &str,
    target: &str,
    rep: u32,
) -> Option<&'a Record> {
    records
        .iter()
        .find(|r| r.scenario == scenario && r.size == size && r.target == target && r.rep == rep)
}

/// The columns shown for a scenario: (JSON key, heading).
fn columns(scenario: &str) -> &'static [(&'static str, &'static str)] {
    match scenario {
        "fanout" | "rooms" | "client" => &[
            ("deliveries_per_sec", "deliveries/s"),
            ("lost", "lost"),
            ("out_of_order", "out of order"),
            ("server_cpu_us_per_delivery", "server CPU µs/delivery"),
            ("server_deliveries_per_write", "deliveries per write call"),
            ("broker_cpu_s", "broker CPU s"),
            ("server_hwm_kib", "server peak RSS KiB"),
            ("latency_p50_us", "p50 µs"),
            ("latency_p99_us", "p99 µs"),
            ("latency_p999_us", "p99.9 µs"),
            ("generator_cpu_us_per_delivery", "generator CPU µs/delivery"),
            ("server_cpu_s", "server CPU s"),
            ("seconds", "s"),
        ],
        "delivery-floor" => &[
            ("deliveries_per_sec", "deliveries/s"),
            ("lost_bytes", "lost bytes"),
            ("batch", "frames per writev"),
            ("writev_calls", "writev calls"),
            ("writer_cpu_us_per_delivery", "writer CPU µs/delivery"),
            ("writer_user_us_per_delivery", "of which user µs"),
            ("reader_cpu_us_per_delivery", "reader CPU µs/delivery"),
            ("seconds", "s"),
        ],
        "fanout-rate" => &[
            ("rate_msgs_per_sec", "msgs/s"),
            ("deliveries_per_sec", "deliveries/s"),
            ("latency_p50_us", "p50 µs"),
            ("latency_p99_us", "p99 µs"),
            ("latency_p999_us", "p99.9 µs"),
            ("latency_max_us", "max µs"),
            ("lost", "lost"),
            ("behind_schedule_ms", "publisher behind ms"),
            ("server_cpu_us_per_delivery", "server CPU µs/delivery"),
            ("generator_cpu_us_per_delivery", "generator CPU µs/delivery"),
        ],
        "idle" => &[
            ("connections", "connections"),
            ("connections_per_sec", "connections/s"),
            ("connect_p50_ms", "connect p50 ms"),
            ("connect_p99_ms", "connect p99 ms"),
            ("connect_max_ms", "connect max ms"),
            ("listen_overflows", "listen overflows"),
            ("rss_per_connection_kib", "RSS KiB/connection"),
            ("server_rss_after_kib", "server RSS KiB"),
            ("server_cpu_us_per_connection", "server CPU µs/connection"),
            (
                "generator_cpu_us_per_connection",
                "generator CPU µs/connection",
            ),
        ],
        "connect-floor" => &[
            ("connections_per_sec", "connections/s"),
            ("latency_p50_us", "p50 µs"),
            ("latency_p99_us", "p99 µs"),
            ("errors", "errors"),
            ("server_cpu_us_per_connection", "server CPU µs/connection"),
            ("generator_cpu_us_per_connection", "wrk CPU µs/connection"),
        ],
        "http" => &[
            ("requests_per_sec", "requests/s"),
            ("latency_p50_us", "p50 µs"),
            ("latency_p99_us", "p99 µs"),
            ("errors", "errors"),
            ("proxy_cpu_us_per_request", "proxy CPU µs/request"),
            ("upstream_cpu_s", "upstream CPU s"),
            ("wrk_cpu_s", "wrk CPU s"),
            ("proxy_hwm_kib", "proxy peak RSS KiB"),
        ],
        _ => &[],
    }
}

fn cell(r: &Record, key: &str) -> String {
    match r.values.get(key) {
        Some(Value::Number(n)) => fmt_num(n.as_f64().unwrap_or(0.0)),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => "–".into(),
    }
}

/// 1234567 → 1,234,567.
fn group(n: i64) -> String {
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// Markdown rows for `records` of one scenario.
fn table(records: &[&Record]) -> String {
    let Some(first) = records.first() else {
        return String::new();
    };
    let cols = columns(first.scenario);
    let mut s = String::from("| size | target | rep |");
    for (_, h) in cols {
        let _ = write!(s, " {h} |");
    }
    s.push_str("\n|---|---|---|");
    for _ in cols {
        s.push_str("---:|");
    }
    s.push('\n');
    for r in records {
        let _ = write!(s, "| {} | {} | {} |", r.size, r.target, r.rep);
        if let Some(e) = r.error() {
            let _ = write!(s, " failed: {} |", e.replace('\n', " ").replace('|', "/"));
            for _ in 1..cols.len() {
                s.push_str(" |");
            }
        } else {
            for (k, _) in cols {
                let _ = write!(s, " {} |", cell(r, k));
            }
        }
        s.push('\n');
    }
    s
}

/// The table printed at the end of a run, in plain text.
pub fn print_table(records: &[Record]) {
    for scenario in [
        "fanout",
        "delivery-floor",
        "fanout-rate",
        "rooms",
        "client",
        "idle",
        "connect-floor",
        "http",
    ] {
        let rows: Vec<&Record> = records.iter().filter(|r| r.scenario == scenario).collect();
        if rows.is_empty() {
            continue;
        }
        println!("\n== {scenario} ==");
        print!("{}", table(&rows));
    }
}

/// The machine the numbers come from.
pub struct Machine {
    lines: Vec<(String, String)>,
}

impl Machine {
    /// Reads /proc and asks every binary for its version.
    pub fn describe(bins: &Bins) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_else(|| "unknown".into());
        let mem = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0))
            .unwrap_or_default();
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let nproc = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let git = std::process::Command::new("git")
            .args(["describe", "--always", "--dirty"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let opt = |b: &Option<std::path::PathBuf>, arg: &str| {
            b.as_ref()
                .map(|b| procs::version_of(b, arg))
                .unwrap_or_else(|| "not installed".into())
        };
        let lines = vec![
            ("nproc".into(), nproc.to_string()),
            ("CPU".into(), model),
            ("memory".into(), mem),
            ("kernel".into(), read("/proc/sys/kernel/osrelease")),
            ("open-file limit".into(), sys::open_file_limit().to_string()),
            (
                "local port range".into(),
                read("/proc/sys/net/ipv4/ip_local_port_range").replace('\t', "-"),
            ),
            (
                "roomgate".into(),
                format!(
                    "{} (git {git})",
                    procs::version_of(&bins.roomgate, "--version")
                ),
            ),
            (
                "nats-server".into(),
                procs::version_of(&bins.nats, "--version"),
            ),
            ("nginx".into(), opt(&bins.nginx, "-v")),
            ("wrk".into(), opt(&bins.wrk, "-v")),
            (
                "rustc".into(),
                procs::find_binary(&["rustc"])
                    .map(|b| procs::version_of(&b, "--version"))
                    .unwrap_or_else(|| "not found".into()),
            ),
        ];
        Self { lines }
    }
}

/// Load average (1, 5, 15 minutes).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A target the design is held to.
struct Goal {
    what: String,
    /// Per repetition: the measured value, or why there is none.
    values: Vec<Result<f64, String>>,
    /// `≥` (true) or `≤` (false).
    at_least: bool,
    bound: f64,
    unit: &'static str,
    stretch: Option<f64>,
}

impl Goal {
    fn verdict(&self) -> String {
        let mut out = Vec::new();
        let mut all_met = true;
        for (i, v) in self.values.iter().enumerate() {
            match v {
                Ok(x) => {
                    let met = if self.at_least {
                        *x >= self.bound
                    } else {
                        *x <= self.bound
                    };
                    if !met {
                        all_met = false;
                        let gap = if self.at_least {
                            if *x > 0.0 {
                                format!("needs {:.2}× more", self.bound / x)
                            } else {
                                "nothing measured".into()
                            }
                        } else {
                            format!("{:.0}% over", (x / self.bound - 1.0) * 100.0)
                        };
                        out.push(format!("rep {}: {gap}", i + 1));
                    }
                }
                Err(_) => all_met = false,
            }
        }
        if self.values.is_empty() || self.values.iter().all(Result::is_err) {
            return "not measured".into();
        }
        if all_met {
            let stretch = self.stretch.map(|s| {
                let met = self.values.iter().all(|v| {
                    v.as_ref()
                        .is_ok_and(|x| if self.at_least { *x >= s } else { *x <= s })
                });
                if met {
                    format!("; stretch {s}{} met too", self.unit)
                } else {
                    format!("; stretch {s}{} not met", self.unit)
                }
            });
            format!("met{}", stretch.unwrap_or_default())
        } else {
            format!("missed ({})", out.join("; "))
        }
    }
}

fn ratio(
    records: &[Record],
    scen: &str,
    size: &str,
    a: &str,
    b: &str,
    key: &str,
    rep: u32,
) -> Result<f64, String> {
    let get = |t: &str| {
        let r = find(records, scen, size, t, rep).ok_or(format!("no {t} run"))?;
        if let Some(e) = r.error() {
            return Err(format!("{t} failed: {e}"));
        }
        r.num(key).ok_or(format!("{t}: no {key}"))
    };
    let (x, y) = (get(a)?, get(b)?);
    if y == 0.0 {
        return Err("zero".into());
    }
    Ok(x / y)
}

fn value(
    records: &[Record],
    scen: &str,
    size: &str,
    t: &str,
    key: &str,
    rep: u32,
) -> Result<f64, String> {
    let r = find(records, scen, size, t, rep).ok_or(format!("no {t} run"))?;
    if let Some(e) = r.error() {
        return Err(format!("failed: {e}"));
    }
    r.num(key).ok_or(format!("no {key}"))
}

/// Sizes of a scenario in the order they were run.
fn sizes(records: &[Record], scenario: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in records.iter().filter(|r| r.scenario == scenario) {
        if !out.contains(&r.size) {
            out.push(r.size.clone());
        }
    }
    out
}

impl Goal {
    /// A goal met when every repetition's value is at least `bound`.
    fn at_least(
        what: String,
        values: Vec<Result<f64, String>>,
        bound: f64,
        unit: &'static str,
    ) -> Self {
        Self {
            what,
            values,
            at_least: true,
            bound,
            unit,
            stretch: None,
        }
    }

    /// A goal met when every repetition's value is at most `bound`.
    fn at_most(
        what: String,
        values: Vec<Result<f64, String>>,
        bound: f64,
        unit: &'static str,
    ) -> Self {
        Self {
            at_least: false,
            ..Self::at_least(what, values, bound, unit)
        }
    }
}

fn goals(records: &[Record], reps: u32) -> Vec<Goal> {
    let reps: Vec<u32> = (1..=reps).collect();
    // One figure of `target` per repetition.
    let of = |scen: &str, size: &str, target: &str, key: &str| -> Vec<Result<f64, String>> {
        reps.iter()
            .map(|&r| value(records, scen, size, target, key, r))
            .collect()
    };
    // `subject` ÷ `peer`, within each repetition.
    let pair = |scen: &str,
                size: &str,
                subject: &str,
                peer: &str,
                key: &str|
     -> Vec<Result<f64, String>> {
        reps.iter()
            .map(|&r| ratio(records, scen, size, subject, peer, key, r))
            .collect()
    };
    // roomgate ÷ `peer`, within each repetition.
    let vs =
        |scen: &str, size: &str, peer: &str, key: &str| pair(scen, size, "roomgate", peer, key);
    let mut goals = Vec::new();
    let fan = sizes(records, "fanout");
    if let Some(small) = fan.first() {
        goals.push(Goal::at_least(
            format!("fan-out {small}: roomgate deliveries/s ÷ nats-ws"),
            vs("fanout", small, "nats-ws", "deliveries_per_sec"),
            1.5,
            "×",
        ));
        goals.push(Goal::at_most(
            format!("fan-out {small}: roomgate server CPU per delivery"),
            of("fanout", small, "roomgate", "server_cpu_us_per_delivery"),
            0.15,
            " µs",
        ));
    }
    if let Some(size) = sizes(records, "delivery-floor").first() {
        goals.push(Goal::at_most(
            format!(
                "for comparison, delivery floor {size}: one thread only writing the frames, \
                 a window per writev, CPU per delivery (not roomgate; see \"Delivery floor\")"
            ),
            of(
                "delivery-floor",
                size,
                crate::matrix::FLOOR_AT_WINDOW,
                "writer_cpu_us_per_delivery",
            ),
            0.15,
            " µs",
        ));
    }
    if let Some(large) = fan.get(1) {
        goals.push(Goal::at_least(
            format!("fan-out {large}: roomgate deliveries/s ÷ nats-ws"),
            vs("fanout", large, "nats-ws", "deliveries_per_sec"),
            4.0,
            "×",
        ));
    }
    for size in sizes(records, "rooms") {
        goals.push(Goal::at_least(
            format!("many rooms {size}: roomgate deliveries/s ÷ nats-ws"),
            vs("rooms", &size, "nats-ws", "deliveries_per_sec"),
            10.0,
            "×",
        ));
    }
    for size in sizes(records, "fanout-rate") {
        goals.push(Goal::at_most(
            format!("fixed rate {size}: roomgate p99 ÷ nats-ws p99"),
            vs("fanout-rate", &size, "nats-ws", "latency_p99_us"),
            1.0,
            "×",
        ));
    }
    if let Some(largest) = sizes(records, "idle").last() {
        goals.push(Goal {
            stretch: Some(4.0),
            ..Goal::at_most(
                format!("idle {largest} connections: roomgate RSS per connection"),
                of("idle", largest, "roomgate", "rss_per_connection_kib"),
                8.0,
                " KiB",
            )
        });
        goals.push(Goal::at_least(
            format!(
                "idle {largest} connections: roomgate connections/s (connect + upgrade + join)"
            ),
            of("idle", largest, "roomgate", "connections_per_sec"),
            20_000.0,
            "/s",
        ));
    }
    if let Some(size) = sizes(records, "connect-floor").last() {
        goals.push(Goal::at_least(
            format!(
                "for comparison, connect floor {size}: nginx answering one request per new \
                 connection, connections/s (not roomgate; see \"Connection set-up floor\")"
            ),
            of("connect-floor", size, "nginx-static", "connections_per_sec"),
            20_000.0,
            "/s",
        ));
    }
    for size in sizes(records, "http") {
        goals.push(Goal::at_least(
            format!("HTTP proxy {size}: roomgate requests/s ÷ nginx"),
            vs("http", &size, "nginx", "requests_per_sec"),
            1.0,
            "×",
        ));
        goals.push(Goal::at_most(
            format!("HTTP proxy {size}: roomgate p99 ÷ nginx p99"),
            vs("http", &size, "nginx", "latency_p99_us"),
            1.0,
            "×",
        ));
        goals.push(Goal::at_least(
            format!(
                "for comparison, HTTP proxy {size}: hyper-floor requests/s ÷ nginx (not \
                 roomgate: hyper's server and client with nothing between them)"
            ),
            pair("http", &size, "hyper-floor", "nginx", "requests_per_sec"),
            1.0,
            "×",
        ));
        goals.push(Goal::at_most(
            format!("for comparison, HTTP proxy {size}: hyper-floor p99 ÷ nginx p99"),
            pair("http", &size, "hyper-floor", "nginx", "latency_p99_us"),
            1.0,
            "×",
        ));
    }
    goals
}

/// Same-run ratios roomgate ÷ peer for a scenario, as a markdown table.
fn ratios(
    records: &[Record],
    scenario: &str,
    peer: &str,
    keys: &[(&str, &str)],
    reps: u32,
) -> String {
    let sizes = sizes(records, scenario);
    if sizes.is_empty() {
        return String::new();
    }
    let mut s =
        format!("Same-run ratios, roomgate ÷ {peer} (repetition by repetition):\n\n| size | rep |");
    for (_, h) in keys {
        let _ = write!(s, " {h} |");
    }
    s.push_str("\n|---|---|");
    for _ in keys {
        s.push_str("---:|");
    }
    s.push('\n');
    for size in &sizes {
        for rep in 1..=reps {
            let _ = write!(s, "| {size} | {rep} |");
            for (k, _) in keys {
                match ratio(records, scenario, size, "roomgate", peer, k, rep) {
                    Ok(x) => {
                        let _ = write!(s, " {x:.2}× |");
                    }
                    Err(_) => s.push_str(" – |"),
                }
            }
            s.push('\n');
        }
    }
    s
}

/// What the report needs besides the records.
pub struct Context<'a> {
    /// The machine.
    pub machine: &'a Machine,
    /// How the generator was invoked.
    pub invocation: String,
    /// Quick (smoke) run.
    pub quick: bool,
    /// Repetitions.
    pub reps: u32,
    /// Load average before and after.
    pub load: (String, String),
    /// Where the JSON lines are.
    pub jsonl: &'a Path,
    /// Settings worth stating (window, payload, threads...).
    pub settings: Vec<(String, String)>,
    /// Date of the run.
    pub date: String,
}

/// Hand-written analysis included in every report (relative to the
/// repository root, where `bench/run.sh` runs the tool).
const ANALYSIS: &str = "bench/ANALYSIS.md";

/// The columns compared with nats-server's WebSocket in the fan-out and
/// many-rooms sections.
const DELIVERY_RATIOS: &[(&str, &str)] = &[
    ("deliveries_per_sec", "deliveries/s"),
    ("server_cpu_us_per_delivery", "server CPU per delivery"),
    ("server_hwm_kib", "peak RSS"),
];

/// One scenario's section of the report: what it measures, and which of
/// its columns are compared with which peer (none for the floors and the
/// roomgate-only runs).
struct Section {
    scenario: &'static str,
    title: &'static str,
    text: &'static str,
    peer: &'static str,
    ratios: &'static [(&'static str, &'static str)],
}

/// The scenario sections, in the report's order.
const SECTIONS: [Section; 8] = [
    Section {
        scenario: "fanout",
        title: "Fan-out: one room",
        text: "One room of N members; a backend publishes M messages to it through NATS as fast as \
             accepted, keeping at most the window (see Settings) of messages in flight beyond \
             the slowest member, so neither server is pushed into its slow-consumer policy. \
             roomgate: `roomgate.broadcast.<room>` with `Roomgate-Raw: true`, so both servers \
             deliver byte-identical frames. nats-ws: every member is a NATS subscriber on \
             nats-server's WebSocket listener. Server CPU is the CPU of the server under test \
             during the measured phase divided by deliveries; for roomgate, nats-server's own CPU \
             (relaying M messages to one subscriber) is the broker column. Latency and peak \
             RSS in these runs include what the window lets queue up (up to window × N frames); \
             the fixed-rate runs below measure latency.",
        peer: "nats-ws",
        ratios: DELIVERY_RATIOS,
    },
    Section {
        scenario: "delivery-floor",
        title: "Delivery floor",
        text: "What a delivery costs this machine at the least, for reading the fan-out runs' \
             server CPU per delivery: one thread of the generator writes the same number of \
             frames of the same size to each of N loopback sockets, a batch of frames per \
             `writev` (one buffer with the frames back to back, as roomgate queues a burst), \
             and does nothing else: `writev-window` writes a window's worth per call \
             (the most a server can batch when at most a window of messages is in flight), \
             `writev-as-roomgate` as many as roomgate's writes carried on average in the runs \
             above (its deliveries per write call); another thread reads every socket with a task per \
             socket, as the generator does. Writer CPU is user plus kernel time of that one \
             thread (`getrusage(RUSAGE_THREAD)`, the same accounting as the servers' `/proc` \
             figures), divided by deliveries. On loopback the kernel runs the receiving \
             side's TCP processing and wakes the reader inside the writer's `writev`, so this \
             is what the kernel charges any sender per delivery at that batch size: a server \
             that also queues, schedules and talks to NATS cannot spend less. Deliveries per \
             write call in the fan-out tables are the server's deliveries divided by its write \
             system calls in the measured phase (`syscw` in `/proc/<pid>/io`).",
        peer: "",
        ratios: &[],
    },
    Section {
        scenario: "fanout-rate",
        title: "Fan-out at a fixed rate",
        text: "The same rooms at a fixed publish rate (see Settings: by default half of the lower \
             of the two measured maxima, mean of the repetitions), without a window. Latency is \
             from the publisher's timestamp to the subscriber's read, on one monotonic clock. \
             \"Publisher behind\" is how late the publisher got against its schedule at worst: \
             when it is more than a few milliseconds, the machine was short of CPU. At a fixed \
             rate each message reaches each member alone, without the batching of the maximum \
             runs, so a delivery costs the server and the generator more than it does there.",
        peer: "nats-ws",
        ratios: &[
            ("latency_p50_us", "p50"),
            ("latency_p99_us", "p99"),
            ("latency_p999_us", "p99.9"),
        ],
    },
    Section {
        scenario: "rooms",
        title: "Many rooms",
        text: "Many rooms of a few members; each message goes to a random room (the same sequence \
             of rooms in every run), within the per-room window.",
        peer: "nats-ws",
        ratios: DELIVERY_RATIOS,
    },
    Section {
        scenario: "client",
        title: "Client-originated (roomgate only)",
        text: "The first member of each room sends `message` frames over its WebSocket as fast as \
             TCP accepts them, within the per-room window; the other members receive them. \
             nats-server has no equivalent (its clients publish NATS, not room frames).",
        peer: "",
        ratios: &[],
    },
    Section {
        scenario: "idle",
        title: "Idle connections",
        text: "N connections, each joined to a room of 10 (nats-ws: subscribed to the room's \
             subject). Connections per second covers TCP connect, the WebSocket upgrade and the \
             join (nats-ws: INFO, CONNECT/PING/PONG, SUB/PING/PONG), with a bounded number of \
             handshakes in flight (see Settings). Connect p50/p99/max are per connection: a \
             connection whose SYN was dropped because the server's accept queue was full is \
             retried by the kernel after a second, which shows as a maximum near 1,000 ms and \
             in the listen overflows column (read machine-wide from /proc/net/netstat, so other \
             processes count there too). RSS per connection is the server's RSS after minus \
             before, divided by N.",
        peer: "nats-ws",
        ratios: &[
            ("connections_per_sec", "connections/s"),
            ("rss_per_connection_kib", "RSS per connection"),
        ],
    },
    Section {
        scenario: "connect-floor",
        title: "Connection set-up floor",
        text: "What a new connection costs this machine at the least, for reading the \
             connections/s above: nginx (one worker) answers every request itself, and `wrk` \
             (2 threads, 256 connections) sends each request on a new TCP connection \
             (`Connection: close`). One connection here is connect, one small request and \
             answer, and close, which is less work on both sides than the idle runs' connect, \
             upgrade and join, and wrk is a leaner client than the generator. The rate is \
             therefore an upper bound for any server in the idle runs on these cores.",
        peer: "",
        ratios: &[],
    },
    Section {
        scenario: "http",
        title: "HTTP proxy",
        text: "`wrk --latency` against the upstream directly, through roomgate's reverse proxy, \
             and through nginx configured as the same reverse proxy (one worker, keep-alive \
             upstream pool, X-Forwarded-* headers, no buffering). roomgate runs as configured \
             by default (a runtime thread per core); nginx with one worker process. One warm-up \
             second precedes each measurement. The upstream is this tool's `upstream` \
             subcommand (hyper, one thread, a 64-byte body). `hyper-floor` is this tool's \
             `hyper-floor` subcommand: hyper's HTTP/1 server and client with nothing between \
             them (each client connection gets one upstream connection, polled in the same \
             task; requests and responses pass unchanged, with no timeouts, checks or added \
             headers), on a runtime thread per core: the least work per request a proxy on \
             hyper can do. Its timings move with the number of runtime threads and hyper's \
             settings; see \"What hyper alone reaches\" below.",
        peer: "nginx",
        ratios: &[
            ("requests_per_sec", "requests/s"),
            ("latency_p99_us", "p99"),
        ],
    },
];

/// `BENCHMARKS.md`.
pub fn markdown(records: &[Record], ctx: &Context<'_>) -> String {
    let mut s = String::new();
    intro(&mut s, ctx);
    machine_and_settings(&mut s, ctx);
    targets(&mut s, records, ctx);
    for section in &SECTIONS {
        scenario_section(&mut s, records, section, ctx.reps);
    }
    // The reading of the numbers (profiles, why a target is missed) is
    // written by hand next to the tool and carried into every report.
    if let Ok(analysis) = std::fs::read_to_string(ANALYSIS) {
        s.push_str(analysis.trim_end());
        s.push_str("\n\n");
    }
    exact_commands(&mut s, ctx);
    s
}

/// The title and how the report was made.
fn intro(s: &mut String, ctx: &Context<'_>) {
    s.push_str("# roomgate benchmarks\n\n");
    let _ = writeln!(
        s,
        "Produced by `bench/run.sh` on {}{}. Regenerate with `bench/run.sh` (full matrix) or \
         `bench/run.sh --quick` (small sizes, a smoke test whose numbers say little). Every run \
         starts its own servers and is repeated {} times; both repetitions are shown, and ratios \
         are taken within the same repetition so that slow drifts of the machine hit both sides.\n",
        ctx.date,
        if ctx.quick {
            " as a **quick** run (small sizes)"
        } else {
            ""
        },
        ctx.reps
    );
}

/// The machine, what shares it, and the run's settings.
fn machine_and_settings(s: &mut String, ctx: &Context<'_>) {
    s.push_str("## Machine\n\n| | |\n|---|---|\n");
    for (k, v) in &ctx.machine.lines {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    let _ = writeln!(
        s,
        "| load average (1/5/15 min) | {} at the start, {} at the end |\n",
        ctx.load.0, ctx.load.1
    );
    s.push_str(
        "The generator, the server under test, nats-server and the upstream share these cores: \
         every run reports the generator's CPU next to the server's so a reader can tell when the \
         generator, not the server, was the limit. On loopback the kernel's work to deliver a \
         packet is mostly done in the context of the process that sends it, so part of each \
         side's network-stack cost is counted to the other: the generator pays for much of a \
         TCP handshake, the server for much of receiving what it sends. Other load on the \
         machine (see the load average) makes numbers noisier; compare ratios from the same \
         repetition.\n\n\
         One generator process holds at most about (open-file limit − 100) client sockets: \
         with the limit above, that caps a single generator at about that many connections. \
         Client sockets bind to several source addresses (127.0.0.1, .2, …) round-robin, so the \
         ephemeral port range is not the limit; the open-file limit is.\n\n",
    );
    s.push_str("## Settings\n\n| | |\n|---|---|\n");
    for (k, v) in &ctx.settings {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    s.push('\n');
}

/// Every target with each repetition's value and the verdict.
fn targets(s: &mut String, records: &[Record], ctx: &Context<'_>) {
    s.push_str(
        "## Targets\n\nTargets the design is held to. They are not tests: a miss is a \
                finding, with its gap.",
    );
    if ctx.quick {
        s.push_str(
            " In a quick run the sizes are smaller than the targets name, so the verdicts \
                    only show that the pipeline works.",
        );
    }
    s.push_str("\n\n| target | bound | ");
    for rep in 1..=ctx.reps {
        let _ = write!(s, "rep {rep} | ");
    }
    s.push_str("verdict |\n|---|---|");
    for _ in 1..=ctx.reps {
        s.push_str("---:|");
    }
    s.push_str("---|\n");
    for g in goals(records, ctx.reps) {
        let _ = write!(
            s,
            "| {} | {} {}{} | ",
            g.what,
            if g.at_least { "≥" } else { "≤" },
            g.bound,
            g.unit
        );
        for v in &g.values {
            match v {
                Ok(x) => {
                    let _ = write!(s, "{} | ", fmt_num(*x));
                }
                Err(e) => {
                    let _ = write!(s, "– ({}) | ", e.replace('|', "/").replace('\n', " "));
                }
            }
        }
        let _ = writeln!(s, "{} |", g.verdict());
    }
    s.push('\n');
}

/// A scenario's prose, its table, and its ratios to the peer; nothing when
/// the scenario did not run.
fn scenario_section(s: &mut String, records: &[Record], section: &Section, reps: u32) {
    let rows: Vec<&Record> = records
        .iter()
        .filter(|r| r.scenario == section.scenario)
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(s, "## {}\n\n{}\n", section.title, section.text);
    s.push_str(&table(&rows));
    s.push('\n');
    if section.ratios.is_empty() {
        return;
    }
    let r = ratios(
        records,
        section.scenario,
        section.peer,
        section.ratios,
        reps,
    );
    if !r.is_empty() {
        s.push_str(&r);
        s.push('\n');
    }
}

/// How the report can be made again: the generator's arguments and each
/// server's command and configuration.
fn exact_commands(s: &mut String, ctx: &Context<'_>) {
    s.push_str("## Exact commands\n\n");
    let _ = writeln!(
        s,
        "`bench/run.sh` builds the release binaries, then runs the generator with the same \
         arguments:\n\n```sh\n{}\n```\n",
        ctx.invocation
    );
    s.push_str(
        "It started each server as below, once per run, with the configuration file shown \
         (ports and temporary paths change from run to run; these are the last run's).\n\n",
    );
    for (kind, command, config) in procs::commands() {
        let _ = writeln!(s, "{kind}:\n\n```sh\n{command}\n```\n");
        if !config.is_empty() {
            let lang = if kind.starts_with("roomgate") {
                "toml"
            } else if kind == "nginx" {
                "nginx"
            } else {
                "text"
            };
            let _ = writeln!(s, "```{lang}\n{}```\n", config);
        }
    }
    let _ = writeln!(s, "Every run's JSON line is in `{}`.", ctx.jsonl.display());
}

/// Numbers for tables: thousands grouped, small values with up to three
/// decimals.
fn fmt_num(x: f64) -> String {
    if x.abs() >= 1000.0 {
        group(x.round() as i64)
    } else if x.abs() >= 100.0 || x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        let s = if x.abs() >= 10.0 {
            format!("{x:.1}")
        } else {
            format!("{x:.3}")
        };
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(scenario: &'static str, size: &str, target: &'static str, rep: u32, v: Value) -> Record {
        Record {
            scenario,
            size: size.into(),
            target,
            rep,
            values: v.as_object().unwrap().clone(),
        }
    }

    #[test]
    fn goals_compare_within_a_repetition() {
        let records = vec![
            rec(
                "fanout",
                "1x1000",
                "roomgate",
                1,
                json!({"deliveries_per_sec": 300.0, "server_cpu_us_per_delivery": 0.1}),
            ),
            rec(
                "fanout",
                "1x1000",
                "nats-ws",
                1,
                json!({"deliveries_per_sec": 100.0}),
            ),
            rec(
                "fanout",
                "1x1000",
                "roomgate",
                2,
                json!({"deliveries_per_sec": 120.0, "server_cpu_us_per_delivery": 0.3}),
            ),
            rec(
                "fanout",
                "1x1000",
                "nats-ws",
                2,
                json!({"deliveries_per_sec": 100.0}),
            ),
        ];
        let g = goals(&records, 2);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].values, vec![Ok(3.0), Ok(1.2)]);
        assert_eq!(g[0].verdict(), "missed (rep 2: needs 1.25× more)");
        assert_eq!(g[1].verdict(), "missed (rep 2: 100% over)");
        assert_eq!(fmt_num(4784.2), "4,784");
        assert_eq!(fmt_num(0.5), "0.5");
        assert_eq!(fmt_num(12.34), "12.3");
        assert_eq!(fmt_num(250.0), "250");
    }

    #[test]
    fn tables_and_lines() {
        let r = rec(
            "idle",
            "100",
            "roomgate",
            1,
            json!({"connections": 100, "rss_per_connection_kib": 3.25}),
        );
        assert!(
            r.json().starts_with(r#"{"connections":100,"#)
                || r.json().contains(r#""scenario":"idle""#)
        );
        let t = table(&[&r]);
        assert!(t.contains("| 100 | roomgate | 1 | 100 |"), "{t}");
        assert!(t.contains("3.25"), "{t}");
        assert_eq!(group(1234567), "1,234,567");
    }
}
