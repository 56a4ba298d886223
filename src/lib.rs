//! roomgate: a sidecar gateway that puts WebSocket rooms in front of an
//! existing HTTP service, on one port.
//!
//! WebSocket upgrades to the gateway's own paths become sessions whose
//! rooms and broadcasting live in this process; every other request is
//! reverse-proxied to the upstream; room events flow to backends over NATS
//! and backends reach rooms, single connections or everyone through NATS.
//! Several instances on one NATS cluster behave as one gateway.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | the TOML file, `ROOMGATE_*` overrides, validation |
//! | [`server`] | the public listener, routing, start-up and shutdown order |
//! | [`deadline`] | the timeouts of a client connection's requests, on one timer |
//! | [`ws`] | upgrade checks and WebSocket sessions (reader, writer, heartbeat) |
//! | [`protocol`] | the client's JSON frames, parsed and encoded |
//! | [`rooms`] | rooms, connections and the broadcaster API |
//! | [`events`] | the queue of what the gateway tells backends |
//! | [`nats`] | the bridge: publishing events, delivering backend messages |
//! | [`access`] | the access log of the public port, off unless asked for |
//! | [`proxy`] | the reverse proxy and tunnel to the upstream, and its connection pool |
//! | [`auth`] | origin checks, JWT and forward auth at the upgrade |
//! | [`admin`] | `/metrics`, `/healthz`, `/readyz`, `/rooms` |
//! | [`alloc`] | the memory allocator the binary installs |
//! | [`metrics`] | every Prometheus family, in one place |
//! | [`shutdown`] | signals, cancellation and task tracking |
//! | [`logging`] | the process's log, with the NATS client's repeats held back |
//! | [`request`], [`response`] | small HTTP helpers shared by the above |
//! | [`sync`] | lock helpers that survive a poisoned lock |
//! | [`net`] | what a socket error says about the other end |
//!
//! # Data path of a room message
//!
//! A session's reader parses the frame (borrowing, no copy of `content`),
//! encodes the outgoing `message` frame once, WebSocket header included,
//! and the hub queues that one shared buffer into each member's bounded
//! queue without waiting. Each member's writer takes its whole queue at once
//! and hands it to the kernel in one vectored write. The same message goes
//! to NATS through the event queue, never blocking the reader. The longer
//! tour is `docs/architecture.md`.

#![warn(missing_docs)]

pub mod access;
pub mod admin;
pub mod alloc;
pub mod auth;
pub mod config;
pub mod deadline;
pub mod events;
pub mod logging;
pub mod metrics;
pub mod nats;
pub mod net;
pub mod protocol;
pub mod proxy;
pub mod request;
pub mod response;
pub mod rooms;
pub mod server;
pub mod shutdown;
pub mod sync;
pub mod ws;

pub use config::Config;
pub use server::{Gateway, StartError, preflight};
