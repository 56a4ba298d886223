//! Starting and stopping the servers a run needs: roomgate, nats-server,
//! the upstream, nginx, and the `wrk` load generator. Every process is
//! owned by a [`Proc`] guard that stops it by PID when dropped, so an error
//! anywhere in a run still leaves nothing behind.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sys;

/// How long a server gets to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a server gets to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The command lines and configuration files used, by kind of process,
/// for the report's "exact commands" section (the latest of each kind).
static COMMANDS: Mutex<BTreeMap<String, (String, String)>> = Mutex::new(BTreeMap::new());

fn record_command(kind: &str, command: &Command, config: String) {
    let mut line = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        let arg = arg.to_string_lossy();
        line.push(' ');
        if arg.contains(' ') {
            line.push_str(&format!("'{arg}'"));
        } else {
            line.push_str(&arg);
        }
    }
    if let Ok(mut map) = COMMANDS.lock() {
        map.insert(kind.to_string(), (line, config));
    }
}

/// The recorded commands: (kind, command line, configuration text).
pub fn commands() -> Vec<(String, String, String)> {
    COMMANDS
        .lock()
        .map(|m| {
            m.iter()
                .map(|(k, (c, t))| (k.to_string(), c.clone(), t.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// A directory for one server's files, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(kind: &str) -> Result<Self, String> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("roomgate-bench-{}-{kind}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A started server process, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Proc {
    name: &'static str,
    child: Child,
    /// Further processes belonging to it (nginx's workers).
    extra: Vec<u32>,
    /// Its last output lines, for error messages.
    log: Arc<Mutex<VecDeque<String>>>,
    log_file: Option<PathBuf>,
    _dir: Option<TempDir>,
}

impl Proc {
    /// The main process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds of all its processes.
    pub fn cpu(&self) -> f64 {
        std::iter::once(self.pid())
            .chain(self.extra.iter().copied())
            .filter_map(sys::cpu_of)
            .map(|t| t.own)
            .sum()
    }

    /// Write system calls of all its processes.
    pub fn write_calls(&self) -> u64 {
        std::iter::once(self.pid())
            .chain(self.extra.iter().copied())
            .filter_map(sys::write_calls_of)
            .sum()
    }

    /// (VmRSS, VmHWM) in KiB, summed over its processes.
    pub fn memory(&self) -> (u64, u64) {
        std::iter::once(self.pid())
            .chain(self.extra.iter().copied())
            .filter_map(sys::memory_of)
            .fold((0, 0), |(r, h), (r2, h2)| (r + r2, h + h2))
    }

    /// Its last output lines.
    pub fn tail(&self) -> String {
        let mut lines: Vec<String> = self
            .log
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default();
        if let Some(file) = &self.log_file
            && let Ok(text) = std::fs::read_to_string(file)
        {
            let file_lines: Vec<&str> = text.lines().collect();
            let from = file_lines.len().saturating_sub(20);
            lines.extend(file_lines[from..].iter().map(|l| l.to_string()));
        }
        lines.join("\n")
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    fn fail(&mut self, what: String) -> String {
        let tail = self.tail();
        self.stop();
        if tail.is_empty() {
            format!("{}: {what}", self.name)
        } else {
            format!("{}: {what}; its last output:\n{tail}", self.name)
        }
    }

    /// Stops it: SIGTERM, up to five seconds to exit, then SIGKILL (also
    /// for any process of its own still there).
    pub fn stop(&mut self) {
        if !self.exited() {
            sys::signal(self.pid(), libc::SIGTERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while !self.exited() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !self.exited() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        for pid in self.extra.drain(..) {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while sys::alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if sys::alive(pid) {
                sys::signal(pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(
    name: &'static str,
    role: &str,
    mut command: Command,
    config: String,
    dir: Option<TempDir>,
    log_file: Option<PathBuf>,
) -> Result<Proc, String> {
    record_command(role, &command, config);
    command.stdin(Stdio::null());
    if log_file.is_none() {
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {name} ({:?}): {e}", command.get_program()))?;
    let log = Arc::new(Mutex::new(VecDeque::new()));
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Ok(mut l) = log.lock() {
                    if l.len() == 50 {
                        l.pop_front();
                    }
                    l.push_back(line);
                }
            }
        });
    }
    Ok(Proc {
        name,
        child,
        extra: Vec::new(),
        log,
        log_file,
        _dir: dir,
    })
}

/// A free loopback port (bound, then released for the child to take).
pub fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

fn wait_port(proc: &mut Proc, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if proc.exited() {
            return Err(proc.fail("exited during start-up".into()));
        }
        if Instant::now() > deadline {
            return Err(proc.fail(format!(
                "not listening on port {port} after {START_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// nats-server with a client port and a WebSocket listener.
pub struct NatsServer {
    /// The process.
    pub proc: Proc,
    /// Client (TCP) port.
    pub port: u16,
    /// WebSocket port.
    pub ws_port: u16,
}

impl NatsServer {
    /// Starts `bin` with a configuration written for this run.
    pub fn start(bin: &Path) -> Result<Self, String> {
        let dir = TempDir::new("nats")?;
        let port = free_port()?;
        let ws_port = free_port()?;
        let config = format!(
            "# written by roomgate-bench for one run\n\
             listen: \"127.0.0.1:{port}\"\n\
             websocket {{\n  listen: \"127.0.0.1:{ws_port}\"\n  no_tls: true\n}}\n"
        );
        let path = dir.0.join("nats.conf");
        std::fs::write(&path, &config).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut command = Command::new(bin);
        command.arg("-c").arg(&path).current_dir(&dir.0);
        let mut proc = spawn(
            "nats-server",
            "nats-server",
            command,
            config,
            Some(dir),
            None,
        )?;
        wait_port(&mut proc, port)?;
        wait_port(&mut proc, ws_port)?;
        Ok(Self {
            proc,
            port,
            ws_port,
        })
    }

    /// `nats://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// What a roomgate run is configured with.
#[derive(Debug, Clone, Default)]
pub struct RoomgateSettings {
    /// NATS to use; `None` disables the bridge.
    pub nats_url: Option<String>,
    /// Upstream to proxy to.
    pub upstream: Option<String>,
    /// `websocket.rooms.max_members`.
    pub max_members: u32,
    /// `server.max_connections`.
    pub max_connections: u32,
    /// `websocket.send_queue_capacity`.
    pub send_queue: u32,
}

/// A running roomgate.
pub struct Roomgate {
    /// The process.
    pub proc: Proc,
    /// Public listener.
    pub addr: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
}

impl Roomgate {
    /// Starts `bin` with a configuration file written for this run, waits
    /// for its listening line and, with NATS, for its NATS connection.
    pub fn start(bin: &Path, s: &RoomgateSettings) -> Result<Self, String> {
        let dir = TempDir::new("roomgate")?;
        let config = format!(
            "# written by roomgate-bench for one run\n\
             [server]\nlisten = \"127.0.0.1:0\"\nmax_connections = {max_conn}\nshutdown_grace_secs = 2\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [upstream]\nurl = \"{upstream}\"\n\n\
             [websocket]\nsend_queue_capacity = {queue}\n\n\
             [websocket.rooms]\nmax_members = {members}\n\n\
             [nats]\nenabled = {nats_on}\nurl = \"{nats_url}\"\n\n\
             [log]\n# the listening line is logged at info by roomgate::server\n\
             level = \"warn,roomgate::server=info\"\nformat = \"json\"\n",
            max_conn = s.max_connections,
            upstream = s.upstream.as_deref().unwrap_or(""),
            queue = s.send_queue,
            members = s.max_members,
            nats_on = s.nats_url.is_some(),
            nats_url = s.nats_url.as_deref().unwrap_or("nats://127.0.0.1:4222"),
        );
        let path = dir.0.join("roomgate.toml");
        std::fs::write(&path, &config).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut command = Command::new(bin);
        command
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .current_dir(&dir.0);
        // No ROOMGATE_* variable of the caller may change the run.
        for (key, _) in std::env::vars() {
            if key.starts_with("ROOMGATE_") {
                command.env_remove(key);
            }
        }
        let role = if s.nats_url.is_some() {
            "roomgate (WebSocket runs)"
        } else {
            "roomgate (HTTP proxy runs)"
        };
        let mut proc = spawn("roomgate", role, command, config, Some(dir), None)?;
        let deadline = Instant::now() + START_TIMEOUT;
        let (addr, admin) = loop {
            let line = proc
                .log
                .lock()
                .ok()
                .and_then(|l| l.iter().find(|l| l.contains("roomgate listening")).cloned());
            if let Some(line) = line {
                let v: serde_json::Value = serde_json::from_str(&line)
                    .map_err(|e| format!("roomgate: listening line is not JSON ({e}): {line}"))?;
                let parse = |k: &str| v[k].as_str().and_then(|a| a.parse::<SocketAddr>().ok());
                match (parse("addr"), parse("admin")) {
                    (Some(a), Some(b)) => break (a, b),
                    _ => return Err(proc.fail(format!("listening line without addresses: {line}"))),
                }
            }
            if proc.exited() {
                return Err(proc.fail("exited during start-up".into()));
            }
            if Instant::now() > deadline {
                return Err(proc.fail("no listening line".into()));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if s.nats_url.is_some() {
            loop {
                let metrics = http_get(admin, "/metrics").unwrap_or_default();
                if metrics
                    .lines()
                    .any(|l| l.trim() == "roomgate_nats_connected 1")
                {
                    break;
                }
                if proc.exited() || Instant::now() > deadline {
                    return Err(proc.fail("NATS never connected".into()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(Self { proc, addr, admin })
    }
}

/// A plain HTTP/1.0 GET, for the admin endpoint.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// A server this program runs as one of its own subcommands: the
/// upstream of the HTTP scenario, and the hyper floor in front of it.
pub struct OwnServer {
    /// The process.
    pub proc: Proc,
    /// Its listener.
    pub addr: SocketAddr,
}

impl OwnServer {
    /// `roomgate-bench upstream`, the HTTP server the proxies forward to.
    pub fn upstream() -> Result<Self, String> {
        Self::start("upstream", &[])
    }

    /// `roomgate-bench hyper-floor` in front of `upstream`: hyper's server
    /// and client with nothing between them.
    pub fn hyper_floor(upstream: SocketAddr) -> Result<Self, String> {
        Self::start("hyper-floor", &["--upstream".into(), upstream.to_string()])
    }

    /// Starts subcommand `name` with `args` on a free port.
    fn start(name: &'static str, args: &[String]) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut command = Command::new(exe);
        command
            .arg(name)
            .arg("--listen")
            .arg(addr.to_string())
            .args(args);
        let mut proc = spawn(name, name, command, String::new(), None, None)?;
        wait_port(&mut proc, port)?;
        Ok(Self { proc, addr })
    }
}

/// nginx as a reverse proxy in front of the upstream, with its own
/// configuration and files in a temporary directory (not the system
/// service).
pub struct Nginx {
    /// The master process (its worker is tracked too).
    pub proc: Proc,
    /// Its listener.
    pub addr: SocketAddr,
}

impl Nginx {
    /// Starts `bin` with one worker proxying to `upstream`.
    pub fn start(bin: &Path, upstream: SocketAddr, keepalive: u32) -> Result<Self, String> {
        let location = "proxy_pass http://app;\n      proxy_http_version 1.1;\n\
             \x20     proxy_set_header Connection \"\";\n      proxy_set_header Host $http_host;\n\
             \x20     proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
             \x20     proxy_set_header X-Forwarded-Proto $scheme;\n\
             \x20     proxy_set_header X-Forwarded-Host $http_host;\n\
             \x20     # roomgate streams both ways; so does nginx here\n\
             \x20     proxy_buffering off;\n      proxy_request_buffering off;";
        let upstream_block =
            format!("upstream app {{\n    server {upstream};\n    keepalive {keepalive};\n  }}");
        Self::launch_with(
            bin,
            "nginx",
            "one worker, the same job as roomgate's proxy",
            &upstream_block,
            location,
        )
    }

    /// Starts `bin` with one worker that answers every request itself with
    /// a 3-byte body: the cheapest HTTP server at hand, for the floor of
    /// what a new connection costs on this machine.
    pub fn start_static(bin: &Path) -> Result<Self, String> {
        Self::launch_with(
            bin,
            "nginx (connect floor)",
            "one worker answering every request itself",
            "",
            "return 200 \"ok\\n\";",
        )
    }

    fn launch_with(
        bin: &Path,
        role: &str,
        what: &str,
        upstream_block: &str,
        location: &str,
    ) -> Result<Self, String> {
        let dir = TempDir::new("nginx")?;
        let port = free_port()?;
        let d = dir.0.display();
        let config = format!(
            "# written by roomgate-bench for one run: {what}\n\
             daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{\n  worker_connections 4096;\n}}\n\
             http {{\n  access_log off;\n\
             \x20 client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             \x20 fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             \x20 {upstream_block}\n\
             \x20 server {{\n    listen 127.0.0.1:{port} backlog=4096;\n\
             \x20   location / {{\n      {location}\n    }}\n  }}\n}}\n"
        );
        let path = dir.0.join("nginx.conf");
        std::fs::write(&path, &config).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut command = Command::new(bin);
        command
            .arg("-p")
            .arg(&dir.0)
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.0.join("error.log"))
            .current_dir(&dir.0);
        let log_file = dir.0.join("error.log");
        let mut proc = spawn("nginx", role, command, config, Some(dir), None)?;
        proc.log_file = Some(log_file);
        wait_port(&mut proc, port)?;
        let deadline = Instant::now() + START_TIMEOUT;
        while proc.extra.is_empty() && Instant::now() < deadline {
            proc.extra = sys::children_of(proc.pid());
            if proc.extra.is_empty() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if proc.extra.is_empty() {
            return Err(proc.fail("no worker process".into()));
        }
        Ok(Self {
            proc,
            addr: ([127, 0, 0, 1], port).into(),
        })
    }
}

/// What `wrk --latency` reported.
#[derive(Debug, Clone, Default)]
pub struct WrkResult {
    /// Requests per second.
    pub rps: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Requests completed.
    pub requests: u64,
    /// Non-2xx/3xx answers plus socket errors.
    pub errors: u64,
    /// wrk's own CPU seconds.
    pub cpu: f64,
}

/// Runs `wrk` (bounded: its duration plus 30 s) and parses its report.
pub fn wrk(
    bin: &Path,
    url: &str,
    threads: u32,
    connections: u32,
    secs: u32,
) -> Result<WrkResult, String> {
    wrk_with(bin, url, threads, connections, secs, false)
}

/// [`wrk`], and with `close` every request on a new connection
/// (`Connection: close`), which measures connection set-up.
pub fn wrk_with(
    bin: &Path,
    url: &str,
    threads: u32,
    connections: u32,
    secs: u32,
    close: bool,
) -> Result<WrkResult, String> {
    let mut command = Command::new(bin);
    command
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{secs}s"))
        .arg("--latency");
    if close {
        command.arg("-H").arg("Connection: close");
    }
    command.arg(url);
    let role = if close { "wrk (connect floor)" } else { "wrk" };
    record_command(role, &command, String::new());
    let before = sys::cpu_self();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start wrk ({}): {e}", bin.display()))?;
    let mut stdout = child.stdout.take().ok_or("wrk: no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(u64::from(secs) + 30);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("wrk did not finish in time".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let cpu = (sys::cpu_self() - before).children;
    let text = reader.join().unwrap_or_default();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        return Err(format!("wrk failed ({status}): {err}{text}"));
    }
    let mut r = parse_wrk(&text).ok_or_else(|| format!("cannot read wrk's report:\n{text}"))?;
    r.cpu = cpu;
    Ok(r)
}

fn parse_wrk(text: &str) -> Option<WrkResult> {
    let mut r = WrkResult::default();
    let mut have_rps = false;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => {
                r.rps = v.parse().ok()?;
                have_rps = true;
            }
            ["50%", v] => r.p50_us = duration_us(v)?,
            ["99%", v] => r.p99_us = duration_us(v)?,
            [n, "requests", "in", ..] => r.requests = n.parse().ok()?,
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                r.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    have_rps.then_some(r)
}

/// wrk's durations: `812.00us`, `1.23ms`, `2.00s`, `1.00m`.
fn duration_us(v: &str) -> Option<f64> {
    for (unit, scale) in [("us", 1.0), ("ms", 1e3), ("s", 1e6), ("m", 60e6)] {
        if let Some(n) = v.strip_suffix(unit)
            && let Ok(x) = n.parse::<f64>()
        {
            return Some(x * scale);
        }
    }
    None
}

/// First line a program prints about its version (`--version`, `-v` or `-V`,
/// on stdout or stderr), or "not found".
pub fn version_of(bin: &Path, arg: &str) -> String {
    match Command::new(bin).arg(arg).stdin(Stdio::null()).output() {
        Ok(o) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        }
        Err(_) => "not found".into(),
    }
}

/// The first of `candidates` that exists as a file, or the first one.
pub fn find_binary(candidates: &[&str]) -> Option<PathBuf> {
    for c in candidates {
        let p = Path::new(c);
        if p.is_absolute() {
            if p.is_file() {
                return Some(p.to_path_buf());
            }
        } else if let Some(paths) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&paths) {
                let full = dir.join(p);
                if full.is_file() {
                    return Some(full);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_report_is_read() {
        let text = "Running 2s test @ http://127.0.0.1:1/\n  1 threads and 64 connections\n  \
            Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   500.00us  100.00us   3.00ms   90.00%\n    \
            Req/Sec    50.00k     1.00k   52.00k    80.00%\n  Latency Distribution\n     50%  480.00us\n     \
            75%  550.00us\n     90%  650.00us\n     99%    1.20ms\n  100000 requests in 2.00s, 10.00MB read\n  \
            Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 4\n\
            Requests/sec:  49999.50\nTransfer/sec:      5.00MB\n";
        let r = parse_wrk(text).unwrap();
        assert_eq!(r.rps, 49999.5);
        assert_eq!(r.p50_us, 480.0);
        assert_eq!(r.p99_us, 1200.0);
        assert_eq!(r.requests, 100_000);
        assert_eq!(r.errors, 7);
        assert!(parse_wrk("garbage").is_none());
    }
}
