//! The access log: a line per request answered on the public port.
//!
//! It is off unless asked for, because a line per request written to
//! the log costs more than proxying a small request does. Its events are
//! at debug level under their own target, so `log.level = "debug"` shows
//! them with everything else, and `log.level = "info,roomgate::access=debug"`
//! shows them alone. While it is off, a request pays one check of the log
//! filter and nothing is noted.
//!
//! A line gives the client's address, the method, the path without its
//! query (queries carry tokens: the WebSocket path's `token=`, and often
//! an application's own), the status and the time until the response head
//! was ready. A streamed body goes on after that, so the time is the
//! upstream's time to answer, not the transfer's. A request given up
//! before that (its client went away) is logged too, as nginx does, with
//! status 499.

use std::net::SocketAddr;
use std::time::Instant;

use hyper::{Method, Request, StatusCode, Uri};
use tracing::Level;

/// The log target of access lines, for filter directives.
pub const TARGET: &str = "roomgate::access";

/// A request being answered, noted only while the access log is on. Its
/// line is written when it is dropped, so that a request whose answer
/// never came (the client went away, or shutdown cut it) gets one too.
pub struct Entry {
    method: Method,
    uri: Uri,
    peer: SocketAddr,
    started: Instant,
    status: Option<StatusCode>,
}

/// The status logged for a request dropped before its answer's head was
/// ready: nginx's "client closed request", which operators know.
const NOT_ANSWERED: u16 = 499;

impl Entry {
    /// Notes `request`, from `peer`, if the access log is on. Boxed, so
    /// that the log adds a pointer, not the entry, to every request's
    /// future while off.
    pub fn begin<B>(request: &Request<B>, peer: SocketAddr) -> Option<Box<Self>> {
        if !tracing::enabled!(target: TARGET, Level::DEBUG) {
            return None;
        }
        Some(Box::new(Self {
            method: request.method().clone(),
            uri: request.uri().clone(),
            peer,
            started: Instant::now(),
            status: None,
        }))
    }

    /// Notes the answer's `status`; the line is written when the entry is
    /// dropped.
    pub fn answered(&mut self, status: StatusCode) {
        self.status = Some(status);
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let micros = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        tracing::debug!(
            target: TARGET,
            peer = %self.peer,
            method = %self.method,
            path = self.uri.path(),
            status = self.status.map_or(NOT_ANSWERED, |s| s.as_u16()),
            duration_us = micros,
            "request"
        );
    }
}
