//! The `roomgate` command: parse arguments, load the configuration, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use roomgate::config::Config;

/// A sidecar gateway: WebSocket rooms in front of an HTTP service, bridged to NATS.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (default: config/roomgate.toml if it exists).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the configuration and print it, secrets masked.
    CheckConfig,
}

/// mimalloc instead of glibc's allocator: with ten thousand connections the
/// fan-out benchmark spends markedly less CPU per delivery (see
/// BENCHMARKS.md), and connection set-up allocates and frees many small
/// buffers, which glibc handles with more overhead.
#[global_allocator]
static GLOBAL: roomgate::alloc::Allocator = roomgate::alloc::Allocator;

/// Exit code for configuration errors.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = roomgate::config::process_env();
    let loaded = match env.and_then(|env| Config::load(cli.config.as_deref(), env)) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("roomgate: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => check_config(&loaded),
        Command::Run => run(loaded),
    }
}

fn check_config(loaded: &roomgate::config::Loaded) -> ExitCode {
    for warning in &loaded.warnings {
        eprintln!("roomgate: warning: {warning}");
    }
    if let Err(e) = roomgate::preflight(&loaded.config) {
        eprintln!("roomgate: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    print!("{}", loaded.config.to_masked_toml());
    ExitCode::SUCCESS
}

fn run(loaded: roomgate::config::Loaded) -> ExitCode {
    roomgate::logging::init(&loaded.config.log);
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("roomgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let signals = match roomgate::shutdown::Signals::install() {
            Ok(signals) => signals,
            Err(e) => {
                eprintln!("roomgate: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        match roomgate::Gateway::bind(loaded.config).await {
            Ok(gateway) => {
                // On a worker thread, not this one: `block_on` runs its
                // future outside the runtime's workers, so the accept loop
                // would be woken across threads for every connection and
                // would hand each new connection task over through the
                // runtime's shared queue instead of the worker's own.
                let (stop, hurry) = signals.split();
                match tokio::spawn(gateway.run(stop, hurry)).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!("gateway task failed: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("roomgate: {e}");
                ExitCode::from(if e.is_config() { EXIT_CONFIG } else { 1 })
            }
        }
    })
}
