//! Prometheus metrics (SPEC §7): every family registered in one place, with
//! label values from small fixed sets. No label ever carries a room name, a
//! connection id or a user, so the series count stays bounded whatever
//! clients do.
//!
//! Hot paths hold pre-resolved counters (`IntCounter` clones are atomics
//! behind an `Arc`), so counting a delivery never hashes a label.

use std::sync::{Arc, OnceLock};

use prometheus::core::{Collector, Desc};
use prometheus::process_collector::ProcessCollector;
use prometheus::proto::{Counter, MetricFamily};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Why a WebSocket connection ended: the `reason` label of
/// `roomgate_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent a close frame or closed the socket.
    Client,
    /// A read or write failed, or the client broke the protocol.
    Error,
    /// An incoming message exceeded `max_message_size_bytes` (1009).
    TooBig,
    /// No pong within `pong_timeout_secs`.
    PingTimeout,
    /// The send queue overflowed with `slow_consumer = "close"` (1013).
    SlowConsumer,
    /// A backend asked for it through `control.disconnect`.
    Kicked,
    /// The token's `exp` passed (1008).
    TokenExpired,
    /// The gateway is shutting down (1001).
    Shutdown,
}

impl CloseReason {
    /// Every reason, for pre-registering the label values.
    pub const ALL: [CloseReason; 8] = [
        Self::Client,
        Self::Error,
        Self::TooBig,
        Self::PingTimeout,
        Self::SlowConsumer,
        Self::Kicked,
        Self::TokenExpired,
        Self::Shutdown,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Error => "error",
            Self::TooBig => "too_big",
            Self::PingTimeout => "ping_timeout",
            Self::SlowConsumer => "slow_consumer",
            Self::Kicked => "kicked",
            Self::TokenExpired => "token_expired",
            Self::Shutdown => "shutdown",
        }
    }
}

/// Why an upgrade was refused: the `reason` label of
/// `roomgate_upgrades_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Not a valid WebSocket handshake (400).
    BadHandshake,
    /// `server.max_connections` reached (503).
    TooManyConnections,
    /// The gateway is draining (503).
    ShuttingDown,
    /// `Origin` not in `auth.allowed_origins` (403).
    Origin,
    /// No token, or a token that failed verification (401).
    Unauthorized,
    /// The auth upstream refused (its 401/403).
    Forbidden,
    /// The auth upstream could not be asked (503).
    AuthUnavailable,
}

impl RejectReason {
    /// Every reason, for pre-registering the label values.
    pub const ALL: [RejectReason; 7] = [
        Self::BadHandshake,
        Self::TooManyConnections,
        Self::ShuttingDown,
        Self::Origin,
        Self::Unauthorized,
        Self::Forbidden,
        Self::AuthUnavailable,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadHandshake => "bad_handshake",
            Self::TooManyConnections => "max_connections",
            Self::ShuttingDown => "shutting_down",
            Self::Origin => "origin",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::AuthUnavailable => "auth_unavailable",
        }
    }
}

/// The gateway's metric families. Cloning is cheap (every field is an `Arc`).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections: IntGauge,
    /// `server.max_connections`, so alerts can compare against the setting.
    pub connections_max: IntGauge,
    /// WebSocket connections accepted since start.
    pub connections_opened: IntCounter,
    connections_closed: IntCounterVec,
    upgrades_rejected: IntCounterVec,
    /// Rooms held, empty ones awaiting their idle timeout included.
    pub rooms: IntGauge,
    /// Frames received from clients.
    pub messages_received: IntCounter,
    /// Frames handed to client connections.
    pub messages_delivered: IntCounter,
    /// Frames dropped because the recipient's queue was full.
    pub dropped_slow_consumer: IntCounter,
    /// Frames refused because the sender exceeded `max_messages_per_sec`.
    pub dropped_rate_limited: IntCounter,
    /// NATS messages dropped by the client library because a subscription's
    /// buffer was full (the bridge could not keep up).
    pub dropped_nats_slow_consumer: IntCounter,
    /// Payload bytes received from clients.
    pub bytes_received: IntCounter,
    /// Payload bytes handed to client connections.
    pub bytes_sent: IntCounter,
    /// 1 while the NATS connection is up.
    pub nats_connected: IntGauge,
    /// Messages published to NATS.
    pub nats_published: IntCounter,
    /// Publications lost: dropped because NATS was down or too slow, or
    /// refused by the server after they were sent (and counted as published).
    pub nats_publish_errors: IntCounter,
    /// Messages taken in from NATS subscriptions.
    pub nats_received: IntCounter,
    proxy_requests: IntCounterVec,
    /// One resolved counter per status code, filled on first use, so the
    /// proxy's per-request count is an index instead of a label lookup.
    proxy_by_code: Arc<[OnceLock<IntCounter>]>,
    /// Time from receiving a proxied request to the upstream's response headers.
    pub proxy_duration: Histogram,
}

impl Metrics {
    /// Creates and registers every family in a fresh registry (one per
    /// gateway, so tests can run several gateways in one process).
    ///
    /// Names and help texts are constants, so construction cannot fail at
    /// run time; the unit test below proves every family is exported.
    pub fn new() -> Self {
        let dropped = counter_vec(
            "roomgate_messages_dropped_total",
            "Frames dropped, by reason.",
            "reason",
        );
        let m = Self {
            registry: Registry::new(),
            connections: gauge("roomgate_connections", "Open WebSocket connections."),
            connections_max: gauge(
                "roomgate_connections_max",
                "WebSocket connections allowed (server.max_connections).",
            ),
            connections_opened: counter(
                "roomgate_connections_opened_total",
                "WebSocket connections accepted.",
            ),
            connections_closed: counter_vec(
                "roomgate_connections_closed_total",
                "WebSocket connections ended, by reason.",
                "reason",
            ),
            upgrades_rejected: counter_vec(
                "roomgate_upgrades_rejected_total",
                "WebSocket upgrades refused, by reason.",
                "reason",
            ),
            rooms: gauge(
                "roomgate_rooms",
                "Rooms held, empty ones awaiting idle_timeout_secs included.",
            ),
            messages_received: counter(
                "roomgate_messages_received_total",
                "Frames received from clients.",
            ),
            messages_delivered: counter(
                "roomgate_messages_delivered_total",
                "Frames handed to client connections.",
            ),
            dropped_slow_consumer: dropped.with_label_values(&["slow_consumer"]),
            dropped_rate_limited: dropped.with_label_values(&["rate_limited"]),
            dropped_nats_slow_consumer: dropped.with_label_values(&["nats_slow_consumer"]),
            bytes_received: counter(
                "roomgate_bytes_received_total",
                "Payload bytes received from clients.",
            ),
            bytes_sent: counter(
                "roomgate_bytes_sent_total",
                "Payload bytes handed to client connections.",
            ),
            nats_connected: gauge("roomgate_nats_connected", "1 while connected to NATS."),
            nats_published: counter(
                "roomgate_nats_published_total",
                "Messages published to NATS.",
            ),
            nats_publish_errors: counter(
                "roomgate_nats_publish_errors_total",
                "Publications lost: dropped while NATS was down or too slow, or refused by the server (those also count as published).",
            ),
            nats_received: counter(
                "roomgate_nats_received_total",
                "Messages received from NATS and handled (delivered, or for no one here); those dropped count in roomgate_messages_dropped_total{reason=\"nats_slow_consumer\"} instead.",
            ),
            proxy_by_code: (100..600).map(|_| OnceLock::new()).collect(),
            proxy_requests: counter_vec(
                "roomgate_proxy_requests_total",
                "Proxied HTTP requests, by response status code.",
                "code",
            ),
            proxy_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "roomgate_proxy_request_duration_seconds",
                    "Time from a proxied request to the upstream's response headers.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0,
                ]),
            )
            .expect("valid histogram"),
        };
        for reason in CloseReason::ALL {
            m.connections_closed.with_label_values(&[reason.as_str()]);
        }
        for reason in RejectReason::ALL {
            m.upgrades_rejected.with_label_values(&[reason.as_str()]);
        }
        // The answers the gateway gives for an upstream that fails it,
        // present at 0 from the start: a rate over the first ones after
        // start-up, which alerts compute, would otherwise miss them.
        for code in ["502", "504"] {
            m.proxy_requests.with_label_values(&[code]);
        }
        m.register_all(dropped);
        m
    }

    fn register_all(&self, dropped: IntCounterVec) {
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(self.connections.clone()),
            Box::new(self.connections_max.clone()),
            Box::new(self.connections_opened.clone()),
            Box::new(self.connections_closed.clone()),
            Box::new(self.upgrades_rejected.clone()),
            Box::new(self.rooms.clone()),
            Box::new(self.messages_received.clone()),
            Box::new(self.messages_delivered.clone()),
            Box::new(dropped),
            Box::new(self.bytes_received.clone()),
            Box::new(self.bytes_sent.clone()),
            Box::new(self.nats_connected.clone()),
            Box::new(self.nats_published.clone()),
            Box::new(self.nats_publish_errors.clone()),
            Box::new(self.nats_received.clone()),
            Box::new(self.proxy_requests.clone()),
            Box::new(self.proxy_duration.clone()),
            Box::new(ProcessMetrics(ProcessCollector::for_self())),
        ];
        for c in collectors {
            self.registry.register(c).expect("metric names are unique");
        }
    }

    /// Counts a closed connection.
    pub fn connection_closed(&self, reason: CloseReason) {
        self.connections_closed
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// Counts a refused upgrade.
    pub fn upgrade_rejected(&self, reason: RejectReason) {
        self.upgrades_rejected
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// Counts a proxied request and its time to response headers.
    pub fn proxy_request(&self, status: hyper::StatusCode, seconds: f64) {
        let code = usize::from(status.as_u16());
        match self.proxy_by_code.get(code.wrapping_sub(100)) {
            Some(slot) => slot
                .get_or_init(|| self.proxy_requests.with_label_values(&[status.as_str()]))
                .inc(),
            None => self
                .proxy_requests
                .with_label_values(&[status.as_str()])
                .inc(),
        }
        self.proxy_duration.observe(seconds);
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid counter")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid gauge")
}

fn counter_vec(name: &str, help: &str, label: &str) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid counter family")
}

/// prometheus's process metrics, with `process_cpu_seconds_total` to the
/// microsecond. The collector counts whole seconds (it is an integer
/// counter), which `rate()` over a lightly loaded gateway reads as 0 or as
/// steps of a whole second.
struct ProcessMetrics(ProcessCollector);

/// The family whose value [`ProcessMetrics`] replaces.
const CPU_SECONDS: &str = "process_cpu_seconds_total";

impl Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = self.0.collect();
        let Some(seconds) = cpu_seconds() else {
            // The whole seconds would read as a counter reset after a
            // precise value: better no sample than a wrong one.
            families.retain(|f| f.name() != CPU_SECONDS);
            return families;
        };
        for family in families.iter_mut().filter(|f| f.name() == CPU_SECONDS) {
            for metric in family.mut_metric() {
                let mut counter = Counter::default();
                counter.set_value(seconds);
                metric.set_counter(counter);
            }
        }
        families
    }
}

/// The CPU time (user and system) of every thread of the process so far.
fn cpu_seconds() -> Option<f64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `getrusage` writes the struct it is given, nothing else.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: zeroed, then filled in by the successful call.
    let usage = unsafe { usage.assume_init() };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(seconds(usage.ru_utime) + seconds(usage.ru_stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_failure_codes_are_exported_at_zero_from_the_start() {
        let text = String::from_utf8(Metrics::new().render()).expect("utf-8");
        for sample in [
            "roomgate_proxy_requests_total{code=\"502\"} 0",
            "roomgate_proxy_requests_total{code=\"504\"} 0",
        ] {
            assert!(text.contains(sample), "missing {sample}");
        }
    }

    #[test]
    fn exports_every_spec_family() {
        let m = Metrics::new();
        m.proxy_request(hyper::StatusCode::OK, 0.01);
        let text = String::from_utf8(m.render()).expect("utf-8");
        for name in [
            "roomgate_connections ",
            "roomgate_connections_max ",
            "roomgate_connections_opened_total",
            "roomgate_connections_closed_total{reason=\"slow_consumer\"}",
            "roomgate_upgrades_rejected_total{reason=\"max_connections\"}",
            "roomgate_rooms ",
            "roomgate_messages_received_total",
            "roomgate_messages_delivered_total",
            "roomgate_messages_dropped_total{reason=\"slow_consumer\"}",
            "roomgate_bytes_received_total",
            "roomgate_bytes_sent_total",
            "roomgate_nats_connected",
            "roomgate_nats_published_total",
            "roomgate_nats_publish_errors_total",
            "roomgate_nats_received_total",
            "roomgate_proxy_requests_total{code=\"200\"}",
            "roomgate_proxy_request_duration_seconds_bucket",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }

    #[test]
    fn process_cpu_time_is_exported_to_the_microsecond() {
        let metrics = Metrics::new();
        let before = cpu_seconds().expect("getrusage");
        let text = String::from_utf8(metrics.render()).expect("utf-8");
        let after = cpu_seconds().expect("getrusage");
        let exported: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_cpu_seconds_total "))
            .expect("the process metrics are exported")
            .parse()
            .expect("a number");
        // Whole seconds would fall below `before` (by up to a second).
        assert!(
            (before..=after).contains(&exported),
            "{before} <= {exported} <= {after}"
        );
    }
}
