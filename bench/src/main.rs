//! `roomgate-bench`: the load generator and benchmark matrix of roomgate.
//!
//! `roomgate-bench matrix` starts every server itself (roomgate,
//! nats-server, an upstream, nginx), drives them from loopback, prints one
//! JSON line per run and a table, and writes `BENCHMARKS.md`. `bench/run.sh`
//! builds the release binaries and runs it. `roomgate-bench upstream` is
//! the HTTP server the proxy scenario puts behind roomgate and nginx.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`matrix`] | which runs, in which order, with which sizes |
//! | [`scenario`] | one run: servers, connections, publisher, measurements |
//! | [`floor`] | the delivery floor: frames written to loopback sockets and nothing else |
//! | [`shard`] | generator threads, each with its own runtime and histogram |
//! | [`conn`] | one client connection: handshake, join, receive, send |
//! | [`ws`], [`natsproto`] | WebSocket framing and the NATS subscriber protocol |
//! | [`payload`] | the sequence number and timestamp inside each frame |
//! | [`procs`] | starting and stopping server processes by PID, `wrk` |
//! | [`report`] | JSON lines, the table, `BENCHMARKS.md` |
//! | [`sys`] | the clock, CPU and memory from `/proc` |
//! | [`upstream`] | the `upstream` subcommand |

#![warn(missing_docs)]

mod conn;
mod floor;
mod hyperfloor;
mod matrix;
mod natsproto;
mod payload;
mod procs;
mod report;
mod scenario;
mod shard;
mod sys;
mod upstream;
mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use matrix::{Matrix, SCENARIOS, Sink};
use scenario::{Bins, Knobs, WrkSpec};

/// Load generator and benchmark matrix for roomgate.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the benchmark matrix (or part of it) and write the report.
    Matrix(Box<MatrixArgs>),
    /// Serve the fixed-body HTTP upstream of the proxy scenario.
    Upstream {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Runtime threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Serve the HTTP proxy floor: hyper's server and client with nothing
    /// between them (see `hyperfloor`).
    HyperFloor {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// The upstream to pass every request to.
        #[arg(long)]
        upstream: SocketAddr,
        /// Runtime threads (0: one per core, as roomgate's default).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
}

/// Sizes left unset take the full matrix's values, or the quick ones with
/// `--quick`.
#[derive(Args, Debug)]
struct MatrixArgs {
    /// Small sizes and short runs: a smoke test of the whole pipeline.
    #[arg(long)]
    quick: bool,
    /// Scenarios to run, comma-separated: fanout, rate, rooms, client, idle, http
    /// (rate publishes at a fraction of the fanout maxima: run it with fanout, or give --rate).
    #[arg(long, value_delimiter = ',', default_values_t = SCENARIOS.map(String::from))]
    only: Vec<String>,
    /// Repetitions of every run (at least 2 for the report's comparisons).
    #[arg(long, default_value_t = 2)]
    reps: u32,
    /// Fan-out room sizes [full: 1000,10000; quick: 100,500].
    #[arg(long, value_delimiter = ',')]
    fanout: Option<Vec<u32>>,
    /// Deliveries per fan-out run [full: 4000000; quick: 500000].
    #[arg(long)]
    fanout_deliveries: Option<u64>,
    /// Many-rooms scenario as ROOMSxMEMBERS [full: 1000x10; quick: 100x10].
    #[arg(long)]
    rooms: Option<String>,
    /// Deliveries per many-rooms run [full: 2000000; quick: 200000].
    #[arg(long)]
    rooms_deliveries: Option<u64>,
    /// Client-originated runs as ROOMSxMEMBERS,... [full: 1x1000,1000x10; quick: 1x100,100x10].
    #[arg(long, value_delimiter = ',')]
    client: Option<Vec<String>>,
    /// Deliveries per client-originated run [full: 2000000; quick: 200000].
    #[arg(long)]
    client_deliveries: Option<u64>,
    /// Idle connection counts [full: 10000,19000; quick: 500,1000].
    #[arg(long, value_delimiter = ',')]
    idle: Option<Vec<u32>>,
    /// Fixed-rate runs last this long, seconds [full: 5; quick: 1].
    #[arg(long)]
    rate_secs: Option<f64>,
    /// Fixed publish rate in messages/s instead of a fraction of the measured maximum.
    #[arg(long)]
    rate: Option<f64>,
    /// The fixed rate as a fraction of the lower measured maximum.
    #[arg(long, default_value_t = 0.5)]
    rate_fraction: f64,
    /// wrk duration, seconds [full: 10; quick: 2].
    #[arg(long)]
    http_secs: Option<u32>,
    /// wrk connections.
    #[arg(long, default_value_t = 64)]
    wrk_connections: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 1)]
    wrk_threads: u32,
    /// Generator threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Client source addresses 127.0.0.1 ..= 127.0.0.N, round-robin.
    #[arg(long, default_value_t = 8)]
    source_ips: u8,
    /// Messages a room may have in flight beyond its slowest member
    /// (kept below roomgate's send queue of 256 frames).
    #[arg(long, default_value_t = 128)]
    window: u32,
    /// Size of each delivered frame, bytes.
    #[arg(long, default_value_t = 128)]
    payload: usize,
    /// Initial read buffer per connection, bytes.
    #[arg(long, default_value_t = 4096)]
    read_buf: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Longest measured phase of one run, seconds [full: 120; quick: 30].
    #[arg(long)]
    deadline: Option<u64>,
    /// Publish to roomgate without `Roomgate-Raw` (it wraps each payload).
    #[arg(long)]
    wrapped: bool,
    /// roomgate binary [default: `roomgate` next to this program].
    #[arg(long)]
    roomgate: Option<PathBuf>,
    /// nats-server binary [default: nats-server on PATH or /usr/sbin].
    #[arg(long)]
    nats_server: Option<PathBuf>,
    /// nginx binary [default: nginx on PATH or /usr/sbin].
    #[arg(long)]
    nginx: Option<PathBuf>,
    /// wrk binary [default: wrk on PATH].
    #[arg(long)]
    wrk: Option<PathBuf>,
    /// Where the JSON lines go [default: target/bench/results[-quick].jsonl].
    #[arg(long)]
    jsonl: Option<PathBuf>,
    /// Where the report goes [full: BENCHMARKS.md; quick: target/bench/BENCHMARKS-quick.md].
    #[arg(long)]
    report: Option<PathBuf>,
}

fn main() -> ExitCode {
    sys::start_clock();
    let cli = Cli::parse();
    match cli.command {
        Command::Upstream { listen, threads } => match upstream::serve(listen, threads) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("roomgate-bench upstream: {e}");
                ExitCode::FAILURE
            }
        },
        Command::HyperFloor {
            listen,
            upstream,
            threads,
        } => match hyperfloor::serve(listen, upstream, threads) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("roomgate-bench hyper-floor: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Matrix(args) => match run_matrix(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("roomgate-bench: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The full matrix's value, or the quick one.
fn choose<T>(quick: bool, full: T, small: T) -> T {
    if quick { small } else { full }
}

fn pair(s: &str) -> Result<(u32, u32), String> {
    let (a, b) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("expected ROOMSxMEMBERS, got {s}"))?;
    let parse = |v: &str| v.trim().parse::<u32>().map_err(|e| format!("{s}: {e}"));
    let (a, b) = (parse(a)?, parse(b)?);
    if a == 0 || b == 0 {
        return Err(format!("{s}: sizes must be positive"));
    }
    Ok((a, b))
}

fn run_matrix(a: MatrixArgs) -> Result<(), String> {
    check_scenarios(&a.only)?;
    let q = a.quick;
    let matrix = matrix_of(&a)?;
    let knobs = knobs_of(&a);
    let bins = binaries(&a)?;
    let jsonl = a.jsonl.clone().unwrap_or_else(|| {
        PathBuf::from(choose(
            q,
            "target/bench/results.jsonl",
            "target/bench/results-quick.jsonl",
        ))
    });
    let report_path = a.report.clone().unwrap_or_else(|| {
        PathBuf::from(choose(
            q,
            "BENCHMARKS.md",
            "target/bench/BENCHMARKS-quick.md",
        ))
    });
    let machine = report::Machine::describe(&bins);
    let load_start = report::loadavg();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut sink = Sink::create(jsonl)?;

    run_to_the_end(&matrix, &bins, &knobs, &mut sink)?;

    let invocation = std::iter::once("target/release/roomgate-bench".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let settings = settings(&matrix, &knobs);
    let ctx = report::Context {
        machine: &machine,
        invocation,
        quick: q,
        reps: matrix.reps,
        load: (load_start, report::loadavg()),
        jsonl: &sink.path,
        settings,
        date,
    };
    matrix::finish(&sink, &report_path, &ctx)
}

/// Runs the matrix to its end, or until SIGINT or SIGTERM; every server
/// it started is stopped either way.
fn run_to_the_end(
    matrix: &Matrix,
    bins: &Bins,
    knobs: &Knobs,
    sink: &mut Sink,
) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let interrupted = runtime.block_on(async {
        tokio::select! {
            () = matrix.run(bins, knobs, sink) => false,
            () = interrupt() => true,
        }
    });
    // Whatever was running has been dropped by now, and with it every
    // server it had started.
    drop(runtime);
    if interrupted {
        return Err("interrupted; servers stopped, no report written".into());
    }
    Ok(())
}

/// Refuses a scenario name the matrix does not know.
fn check_scenarios(only: &[String]) -> Result<(), String> {
    for o in only {
        if !SCENARIOS.contains(&o.as_str()) {
            return Err(format!(
                "unknown scenario {o}; choose from {}",
                SCENARIOS.join(", ")
            ));
        }
    }
    Ok(())
}

/// The runs asked for: the sizes given, the others the full matrix's or,
/// with `--quick`, the smoke test's.
fn matrix_of(a: &MatrixArgs) -> Result<Matrix, String> {
    let q = a.quick;
    let client = a
        .client
        .clone()
        .unwrap_or_else(|| {
            let v: [&str; 2] = choose(q, ["1x1000", "1000x10"], ["1x100", "100x10"]);
            v.iter().map(|s| s.to_string()).collect()
        })
        .iter()
        .map(|s| pair(s))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Matrix {
        only: a.only.clone(),
        reps: a.reps.max(1),
        fanout: a
            .fanout
            .clone()
            .unwrap_or_else(|| choose(q, vec![1000, 10_000], vec![100, 500])),
        fanout_deliveries: a.fanout_deliveries.unwrap_or(choose(q, 4_000_000, 500_000)),
        rooms: pair(a.rooms.as_deref().unwrap_or(choose(q, "1000x10", "100x10")))?,
        rooms_deliveries: a.rooms_deliveries.unwrap_or(choose(q, 2_000_000, 200_000)),
        client,
        client_deliveries: a.client_deliveries.unwrap_or(choose(q, 2_000_000, 200_000)),
        idle: a
            .idle
            .clone()
            .unwrap_or_else(|| choose(q, vec![10_000, 19_000], vec![500, 1000])),
        rate_secs: a.rate_secs.unwrap_or(choose(q, 5.0, 1.0)),
        rate: a.rate,
        rate_fraction: a.rate_fraction.clamp(0.01, 1.0),
        wrk: WrkSpec {
            threads: a.wrk_threads.max(1),
            connections: a.wrk_connections.max(1),
            secs: a.http_secs.unwrap_or(choose(q, 10, 2)).max(1),
        },
    })
}

/// How the generator loads the servers.
fn knobs_of(a: &MatrixArgs) -> Knobs {
    let q = a.quick;
    Knobs {
        threads: a.threads.max(1),
        source_ips: a.source_ips.max(1),
        window: a.window.max(1),
        payload: a.payload.max(64),
        read_buf: a.read_buf,
        connect_concurrency: a.connect_concurrency.max(1),
        deadline: Duration::from_secs(a.deadline.unwrap_or(choose(q, 120, 30))),
        wrapped: a.wrapped,
        send_queue: 256,
    }
}

/// The binaries to run: roomgate and nats-server must be there, nginx and
/// wrk are optional (their scenarios are skipped without them).
fn binaries(a: &MatrixArgs) -> Result<Bins, String> {
    let roomgate = match a.roomgate.clone() {
        Some(p) => p,
        None => std::env::current_exe()
            .map_err(|e| format!("own path: {e}"))?
            .with_file_name("roomgate"),
    };
    if !roomgate.is_file() {
        return Err(format!(
            "no roomgate binary at {} (build it: cargo build --release, or give --roomgate)",
            roomgate.display()
        ));
    }
    let nats = match a.nats_server.clone() {
        Some(p) => p,
        None => procs::find_binary(&[
            "nats-server",
            "/usr/sbin/nats-server",
            "/usr/bin/nats-server",
        ])
        .ok_or("nats-server is not installed (Debian: apt-get install -y nats-server)")?,
    };
    // The servers run in their own temporary directories: absolute paths.
    let absolute = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
    Ok(Bins {
        roomgate: absolute(roomgate),
        nats: absolute(nats),
        nginx: a
            .nginx
            .clone()
            .or_else(|| procs::find_binary(&["nginx", "/usr/sbin/nginx"])),
        wrk: a.wrk.clone().or_else(|| procs::find_binary(&["wrk"])),
    })
}

/// The run's settings, stated in the report.
fn settings(matrix: &Matrix, knobs: &Knobs) -> Vec<(String, String)> {
    vec![
        ("generator threads".into(), knobs.threads.to_string()),
        (
            "source addresses".into(),
            format!("127.0.0.1 – 127.0.0.{}", knobs.source_ips),
        ),
        (
            "window (messages in flight per room)".into(),
            knobs.window.to_string(),
        ),
        ("frame size".into(), format!("{} bytes", knobs.payload)),
        (
            "roomgate publish mode".into(),
            if knobs.wrapped {
                "wrapped (roomgate builds the message frame)".into()
            } else {
                "Roomgate-Raw: true (the same bytes as nats-ws)".into()
            },
        ),
        (
            "roomgate send queue".into(),
            format!("{} frames per connection", knobs.send_queue),
        ),
        (
            "handshakes in flight".into(),
            knobs.connect_concurrency.to_string(),
        ),
        (
            "wrk".into(),
            format!(
                "{} thread(s), {} connections, {} s (+1 s warm-up)",
                matrix.wrk.threads, matrix.wrk.connections, matrix.wrk.secs
            ),
        ),
        (
            "fixed rate".into(),
            match matrix.rate {
                Some(r) => format!("{r} messages/s (given)"),
                None => format!(
                    "{} × the lower measured maximum, {} s per run",
                    matrix.rate_fraction, matrix.rate_secs
                ),
            },
        ),
        ("repetitions".into(), matrix.reps.to_string()),
    ]
}

/// Resolves on SIGINT or SIGTERM.
async fn interrupt() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
