//! The delivery floor: what handing fan-out frames to loopback sockets
//! costs on this machine when nothing else is done, for reading the
//! fan-out runs' "server CPU per delivery".
//!
//! One thread writes the same frames to every socket of a "room", a batch
//! of them per `writev` call, and does nothing else: no queueing, no
//! reference counts, no scheduler, no NATS. A batch is one buffer with its
//! frames back to back, shared by every socket, which is how roomgate
//! queues a burst of a room's messages. Another thread reads every
//! socket, as the generator does in the real runs. The writer's CPU (user
//! and kernel, from `getrusage(RUSAGE_THREAD)`: the same accounting as the
//! `/proc` figures of the servers) per delivery is what the kernel charges
//! a sender for a delivery at that batch size; a server cannot spend less.

use std::io::{IoSlice, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use serde_json::json;

use crate::scenario::{Values, round};

/// One floor run.
#[derive(Debug, Clone, Copy)]
pub struct FloorSpec {
    /// Sockets written to (the room's members).
    pub members: u32,
    /// Frames written to each socket.
    pub messages: u64,
    /// Frames per `writev` call: the most a fan-out server could batch
    /// under the runs' window.
    pub batch: usize,
    /// Bytes per frame, as in the fan-out runs.
    pub frame: usize,
}

impl FloorSpec {
    fn expected_bytes(&self) -> u64 {
        u64::from(self.members) * self.messages * self.frame as u64
    }
}

/// Runs the floor once.
pub fn delivery_floor(spec: FloorSpec) -> Result<Values, String> {
    let (writers, readers) = connect_pairs(spec.members)?;
    let reader = std::thread::Builder::new()
        .name("floor-reader".into())
        .spawn(move || read_all(readers))
        .map_err(|e| format!("reader thread: {e}"))?;
    let written = std::thread::Builder::new()
        .name("floor-writer".into())
        .spawn(move || write_all(writers, spec))
        .map_err(|e| format!("writer thread: {e}"))?
        .join()
        .map_err(|_| "the writer thread panicked".to_string())?;
    // The writer's sockets are closed now, so the reader sees every EOF.
    let read = reader
        .join()
        .map_err(|_| "the reader thread panicked".to_string())?;
    let w = written?;
    let r = read?;
    let deliveries = u64::from(spec.members) * spec.messages;
    let lost_bytes = spec.expected_bytes().saturating_sub(r.bytes);
    let mut v = Values::new();
    v.insert("deliveries".into(), json!(deliveries));
    v.insert("batch".into(), json!(spec.batch));
    v.insert("writev_calls".into(), json!(w.calls));
    v.insert("seconds".into(), json!(round(w.seconds, 3)));
    v.insert(
        "deliveries_per_sec".into(),
        json!((deliveries as f64 / w.seconds.max(1e-9)).round()),
    );
    v.insert("lost_bytes".into(), json!(lost_bytes));
    let per = |cpu_s: f64| json!(round(cpu_s * 1e6 / deliveries.max(1) as f64, 4));
    v.insert("writer_cpu_us_per_delivery".into(), per(w.cpu_s));
    v.insert("writer_user_us_per_delivery".into(), per(w.user_s));
    v.insert("reader_cpu_us_per_delivery".into(), per(r.cpu_s));
    Ok(v)
}

/// `n` connected loopback pairs: (the writer's ends, the reader's ends).
fn connect_pairs(n: u32) -> Result<(Vec<TcpStream>, Vec<TcpStream>), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("listen: {e}"))?;
    let addr = listener.local_addr().map_err(|e| format!("listen: {e}"))?;
    let (mut writers, mut readers) = (Vec::new(), Vec::new());
    for _ in 0..n {
        // One at a time: the accept queue never holds more than one.
        let client = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        let (server, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        // Frames leave at once, as from the servers under test.
        server
            .set_nodelay(true)
            .map_err(|e| format!("nodelay: {e}"))?;
        writers.push(server);
        readers.push(client);
    }
    Ok((writers, readers))
}

struct Written {
    calls: u64,
    seconds: f64,
    cpu_s: f64,
    user_s: f64,
}

/// Writes `spec.messages` frames to every socket, `spec.batch` per call,
/// socket after socket, then closes them.
fn write_all(mut sockets: Vec<TcpStream>, spec: FloorSpec) -> Result<Written, String> {
    // The batch's frames back to back in one buffer.
    let frames: Vec<u8> = (0..spec.batch)
        .flat_map(|i| std::iter::repeat_n(b'a' + (i % 26) as u8, spec.frame))
        .collect();
    let started = Instant::now();
    let (user0, sys0) = thread_cpu();
    let mut calls = 0u64;
    let mut left = spec.messages;
    while left > 0 {
        let now = left.min(spec.batch as u64) as usize;
        for socket in &mut sockets {
            let mut slices = [IoSlice::new(&frames[..now * spec.frame])];
            calls += write_batch(socket, &mut slices)?;
        }
        left -= now as u64;
    }
    let (user1, sys1) = thread_cpu();
    let seconds = started.elapsed().as_secs_f64();
    drop(sockets);
    Ok(Written {
        calls,
        seconds,
        cpu_s: (user1 - user0) + (sys1 - sys0),
        user_s: user1 - user0,
    })
}

/// Writes every slice with as few `writev` calls as the socket takes;
/// returns the number of calls.
fn write_batch(socket: &mut TcpStream, slices: &mut [IoSlice<'_>]) -> Result<u64, String> {
    let mut rest = slices;
    let mut calls = 0;
    while !rest.is_empty() {
        let n = socket
            .write_vectored(rest)
            .map_err(|e| format!("writev: {e}"))?;
        calls += 1;
        if n == 0 {
            return Err("writev wrote nothing".into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(calls)
}

struct ReadTotals {
    bytes: u64,
    cpu_s: f64,
}

/// Reads every socket to its end on one thread, with a runtime as the
/// generator does: one task per socket, a small buffer each.
fn read_all(sockets: Vec<TcpStream>) -> Result<ReadTotals, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| format!("reader runtime: {e}"))?;
    let (user0, sys0) = thread_cpu();
    let bytes = rt.block_on(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for socket in sockets {
            socket
                .set_nonblocking(true)
                .map_err(|e| format!("nonblocking: {e}"))?;
            let socket =
                tokio::net::TcpStream::from_std(socket).map_err(|e| format!("register: {e}"))?;
            tasks.spawn(read_to_end(socket));
        }
        let mut total = 0u64;
        while let Some(r) = tasks.join_next().await {
            total += r.map_err(|e| format!("reader task: {e}"))??;
        }
        Ok::<u64, String>(total)
    })?;
    let (user1, sys1) = thread_cpu();
    Ok(ReadTotals {
        bytes,
        cpu_s: (user1 - user0) + (sys1 - sys0),
    })
}

async fn read_to_end(mut socket: tokio::net::TcpStream) -> Result<u64, String> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 4096];
    let mut total = 0u64;
    loop {
        match socket.read(&mut buf).await {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// This thread's (user, system) CPU seconds.
fn thread_cpu() -> (f64, f64) {
    // SAFETY: getrusage writes a plain struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_THREAD with a valid out-pointer.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    if rc != 0 {
        return (0.0, 0.0);
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(ru.ru_utime), secs(ru.ru_stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_arrives() {
        let spec = FloorSpec {
            members: 20,
            messages: 300,
            batch: 64,
            frame: 128,
        };
        let v = delivery_floor(spec).expect("floor run");
        assert_eq!(v["lost_bytes"], json!(0));
        assert_eq!(v["deliveries"], json!(6000));
        // 300 frames in batches of 64 is 5 calls per socket at least.
        assert!(v["writev_calls"].as_u64().unwrap_or(0) >= 100);
    }
}
