//! What the NATS server refused. nats-server answers a request its
//! permissions or limits do not allow with `-ERR` and keeps the
//! connection, so nothing else tells the gateway: a refused subscription
//! leaves a room deaf, a refused publication is lost. This module logs
//! those errors without flooding the log, counts refused publications as
//! publish errors, and paces the retries of rooms the server keeps
//! refusing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::rooms::RoomName;

/// How often, at most, a server's error is logged: a refusal repeats with
/// every retry, and a limit hit by every room repeats once per room.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Refused subscriptions kept for the bridge, at most; beyond, the
/// bridge's retries of what it does keep bring the same errors back.
const MAX_REFUSED: usize = 4096;

/// The first wait before a refused room is subscribed again; each refusal
/// in a row doubles it.
const FIRST_RETRY: Duration = Duration::from_millis(500);

/// The longest wait before a refused room is subscribed again: how long a
/// room may stay deaf after its permission came back.
const LAST_RETRY: Duration = Duration::from_secs(8);

/// A refusal this long after the one before starts the waits over: the
/// room was subscribed and heard NATS in between.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// What the server reported about the client's requests: errors are
/// logged at most once per [`REPORT_EVERY`], refused publications are
/// counted, and the subjects whose subscription it refused are kept for
/// the bridge, which subscribes them again later.
pub(super) struct ServerReports {
    state: Mutex<Reported>,
    /// Signalled when a refused subscription was added.
    pub(super) refused_added: Notify,
    publish_errors: IntCounter,
}

#[derive(Default)]
struct Reported {
    last_logged: Option<Instant>,
    unlogged: u64,
    refused: Vec<String>,
}

impl ServerReports {
    /// Reports that count refused publications in `publish_errors`.
    pub(super) fn new(publish_errors: IntCounter) -> Self {
        Self {
            state: Mutex::default(),
            refused_added: Notify::new(),
            publish_errors,
        }
    }

    /// Logs `error` unless one was logged within [`REPORT_EVERY`], counts
    /// a refused publication, and keeps the subject of a refused
    /// subscription.
    pub(super) fn report(&self, error: &async_nats::ServerError) {
        let text = error.to_string();
        match refused_publication(&text) {
            Some(subject) if is_probe(subject) => {
                // The bridge says itself, once, that its round trips go
                // unanswered; it goes on sending one now and then, each
                // refused again.
                debug!(
                    error = text,
                    "NATS server refused the confirmation round trip"
                );
                return;
            }
            Some(_) => self.publish_errors.inc(),
            None => {}
        }
        let mut state = crate::sync::lock(&self.state);
        let now = Instant::now();
        if state
            .last_logged
            .is_none_or(|at| now.duration_since(at) >= REPORT_EVERY)
        {
            warn!(
                error = text,
                more = state.unlogged,
                "NATS server refused a request (more: such errors since the last one logged)"
            );
            state.last_logged = Some(now);
            state.unlogged = 0;
        } else {
            state.unlogged += 1;
        }
        if let Some(subject) = refused_subscription(&text)
            && state.refused.len() < MAX_REFUSED
        {
            state.refused.push(subject.to_string());
            drop(state);
            self.refused_added.notify_one();
        }
    }

    /// The subjects refused since the last call.
    pub(super) fn take_refused(&self) -> Vec<String> {
        std::mem::take(&mut crate::sync::lock(&self.state).refused)
    }
}

/// The subject in nats-server's `Permissions Violation for Subscription to
/// "<subject>"` (optionally followed by `using queue "<queue>"`).
fn refused_subscription(error: &str) -> Option<&str> {
    quoted_after(error, "Permissions Violation for Subscription to ")
}

/// The double-quoted text that follows `prefix` in `error`.
fn quoted_after<'a>(error: &'a str, prefix: &str) -> Option<&'a str> {
    let (_, rest) = error.split_once(prefix)?;
    let (quoted, _) = rest.strip_prefix('"')?.split_once('"')?;
    Some(quoted)
}

/// The last token of the subject of the bridge's confirmation round trip
/// (`Bridge::confirm`): a request nobody answers, not a publication
/// anyone misses, so its refusal counts as no publish error.
pub(super) const PROBE: &str = "roomgate-probe";

/// The subject of nats-server's refusal of a publication of the gateway's
/// (`Permissions Violation for Publish to "<subject>"`): core NATS gives
/// no other receipt. `… Publish with Reply of …` is left out: only the
/// confirmation round trip publishes with a reply subject.
fn refused_publication(error: &str) -> Option<&str> {
    quoted_after(error, "Permissions Violation for Publish to ")
}

/// Whether `subject` is the confirmation round trip's,
/// `_INBOX.<id>.roomgate-probe`.
fn is_probe(subject: &str) -> bool {
    subject
        .strip_prefix("_INBOX.")
        .and_then(|rest| rest.strip_suffix(PROBE))
        .and_then(|id| id.strip_suffix('.'))
        .is_some_and(|id| !id.is_empty() && !id.contains('.'))
}

/// When each room the server refused may be subscribed again. A room it
/// keeps refusing costs a subscribe and a refusal per try, so the tries
/// grow apart, up to [`LAST_RETRY`].
#[derive(Default)]
pub(super) struct RefusedRooms {
    rooms: HashMap<RoomName, Refusals>,
}

struct Refusals {
    /// Refusals in a row.
    count: u32,
    /// The last of them.
    last: Instant,
}

impl RefusedRooms {
    /// Notes that the server refused `room` at `now`.
    pub(super) fn refused(&mut self, room: &RoomName, now: Instant) {
        let entry = self.rooms.entry(room.clone()).or_insert(Refusals {
            count: 0,
            last: now,
        });
        if now.duration_since(entry.last) >= FORGET_AFTER {
            entry.count = 0;
        }
        entry.count = entry.count.saturating_add(1);
        entry.last = now;
    }

    /// Whether `room` may be subscribed again at `now`.
    pub(super) fn may_retry(&self, room: &RoomName, now: Instant) -> bool {
        self.rooms
            .get(room)
            .is_none_or(|r| r.last + retry_wait(r.count) <= now)
    }

    /// Forgets `room`: it has no local members any more.
    pub(super) fn forget(&mut self, room: &RoomName) {
        self.rooms.remove(room);
    }

    /// Forgets every room: a new client starts over with every room.
    pub(super) fn clear(&mut self) {
        self.rooms.clear();
    }
}

/// The wait after the `count`th refusal in a row.
fn retry_wait(count: u32) -> Duration {
    let doublings = count.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1 << doublings).min(LAST_RETRY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_subscription_names_its_subject() {
        assert_eq!(
            refused_subscription(
                r#"nats: Permissions Violation for Subscription to "roomgate.*.r1""#
            ),
            Some("roomgate.*.r1")
        );
        assert_eq!(
            refused_subscription(
                r#"Permissions Violation for Subscription to "a.b" using queue "q""#
            ),
            Some("a.b")
        );
        assert_eq!(
            refused_subscription(r#"Permissions Violation for Publish to "a.b""#),
            None
        );
        assert_eq!(
            refused_subscription("nats: maximum subscriptions exceeded"),
            None
        );
    }

    /// Whether `error` counts as a publish error: a refused publication
    /// other than the confirmation round trip's.
    fn counted(error: &str) -> bool {
        refused_publication(error).is_some_and(|subject| !is_probe(subject))
    }

    #[test]
    fn a_refused_publication_is_recognised() {
        assert!(counted(
            r#"nats: Permissions Violation for Publish to "roomgate.message.r1""#
        ));
        assert!(counted(
            r#"Permissions Violation for Publish to "_INBOX.abc""#
        ));
        // The confirmation round trip's are not publications anyone misses.
        assert!(!counted(
            r#"Permissions Violation for Publish to "_INBOX.abc.roomgate-probe""#
        ));
        // A room whose name ends the same is a room.
        assert!(counted(
            r#"Permissions Violation for Publish to "roomgate.message.x.roomgate-probe""#
        ));
        assert!(counted(
            r#"Permissions Violation for Publish to "_INBOX.a.b.roomgate-probe""#
        ));
        assert!(!counted(
            r#"Permissions Violation for Publish with Reply of "_INBOX.x.y""#
        ));
        assert!(!counted(
            r#"Permissions Violation for Subscription to "a.b""#
        ));
    }

    #[test]
    fn a_room_refused_again_and_again_is_tried_less_and_less_often() {
        let waits: Vec<Duration> = (1..=7).map(retry_wait).collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(
            waits,
            [
                ms(500),
                ms(1000),
                ms(2000),
                ms(4000),
                ms(8000),
                ms(8000),
                ms(8000)
            ]
        );
        assert_eq!(retry_wait(u32::MAX), LAST_RETRY);
    }

    #[test]
    fn a_refused_room_waits_its_turn_and_a_late_refusal_starts_over() {
        let room = RoomName::parse("r1").expect("a valid name");
        let other = RoomName::parse("r2").expect("a valid name");
        let mut refused = RefusedRooms::default();
        let t0 = Instant::now();
        refused.refused(&room, t0);
        assert!(!refused.may_retry(&room, t0 + Duration::from_millis(499)));
        assert!(refused.may_retry(&room, t0 + FIRST_RETRY));
        assert!(refused.may_retry(&other, t0));

        let t1 = t0 + FIRST_RETRY;
        refused.refused(&room, t1);
        assert!(!refused.may_retry(&room, t1 + Duration::from_millis(999)));
        assert!(refused.may_retry(&room, t1 + Duration::from_secs(1)));

        // Long after, the room was subscribed in between: 500 ms again.
        let t2 = t1 + FORGET_AFTER;
        refused.refused(&room, t2);
        assert!(refused.may_retry(&room, t2 + FIRST_RETRY));

        refused.forget(&room);
        assert!(refused.may_retry(&room, t2));
        refused.refused(&room, t2);
        refused.clear();
        assert!(refused.may_retry(&room, t2));
    }
}
