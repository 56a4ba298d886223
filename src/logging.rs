//! The process's log: `log.level` and `log.format`, and a quieter NATS
//! client.
//!
//! async-nats logs each failed connection attempt (a refused login, a
//! server at its connection limit, a port that is not NATS) as an error,
//! every 2 s for as long as it lasts. The gateway says once, itself, that
//! NATS is not reachable and why, so the client's warnings and errors are
//! let through at most once every 30 s for each place in its
//! code that logs them.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::callsite::Identifier;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogConfig, LogFormat};

/// How often, at most, one of the NATS client's warnings is repeated.
const REPEAT_EVERY: Duration = Duration::from_secs(30);

/// The target prefix of the NATS client's log events.
const NATS_CLIENT: &str = "async_nats";

/// Installs the global log subscriber for `config`.
pub fn init(config: &LogConfig) {
    // async-nats logs every reconnect attempt at info; the bridge reports
    // the connection state itself, so quiet it unless asked for.
    let level = if config.level.contains(NATS_CLIENT) {
        config.level.clone()
    } else {
        format!("{},{NATS_CLIENT}=warn", config.level)
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let throttle = Throttle::default();
    match config.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .finish()
            .with(throttle)
            .init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .finish()
            .with(throttle)
            .init(),
    }
}

/// Drops the NATS client's warnings and errors that repeat within
/// [`REPEAT_EVERY`] of the last one let through from the same place.
#[derive(Default)]
struct Throttle {
    last: Mutex<HashMap<Identifier, Instant>>,
}

/// Whether an event from `site` at `now` is let through, given when each
/// site was last let through (`last`, updated if it is).
fn allow<K: Eq + Hash>(last: &mut HashMap<K, Instant>, site: K, now: Instant) -> bool {
    if last
        .get(&site)
        .is_some_and(|at| now.duration_since(*at) < REPEAT_EVERY)
    {
        return false;
    }
    last.insert(site, now);
    true
}

impl<S: Subscriber> Layer<S> for Throttle {
    fn event_enabled(&self, event: &Event<'_>, _: Context<'_, S>) -> bool {
        let meta = event.metadata();
        // Only the client's warnings and errors: they are few, so the lock
        // is taken rarely.
        if *meta.level() > Level::WARN || !meta.target().starts_with(NATS_CLIENT) {
            return true;
        }
        allow(
            &mut crate::sync::lock(&self.last),
            meta.callsite(),
            Instant::now(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_message_waits_its_turn_and_others_do_not() {
        let mut last = HashMap::new();
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        assert!(allow(&mut last, "first", t0));
        assert!(!allow(&mut last, "first", t0 + secs(2)));
        assert!(allow(&mut last, "second", t0 + secs(2)));
        let almost = t0 + REPEAT_EVERY - Duration::from_millis(1);
        assert!(!allow(&mut last, "first", almost));
        assert!(allow(&mut last, "first", t0 + REPEAT_EVERY));
        assert!(!allow(&mut last, "first", t0 + REPEAT_EVERY + secs(1)));
    }
}
