//! The generator's clock and what it reads from `/proc`: CPU time and
//! memory of its own process and of the servers it started.

use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();

/// Starts the clock; called first thing in `main` so every timestamp is
/// measured from the same origin.
pub fn start_clock() {
    START.get_or_init(Instant::now);
}

/// Monotonic nanoseconds since the generator started. Publishers stamp
/// payloads with it and subscribers in the same process subtract it, so no
/// clock synchronisation is involved.
pub fn now_ns() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// CPU time of a process in seconds (user + system), read from
/// `/proc/<pid>/stat`. Resolution is one clock tick (usually 10 ms), which
/// is why every measured phase lasts at least a second or so.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTimes {
    /// utime + stime of the process itself.
    pub own: f64,
    /// cutime + cstime: children that have been waited for (how `wrk`'s
    /// CPU is measured).
    pub children: f64,
}

impl std::ops::Sub for CpuTimes {
    type Output = CpuTimes;
    fn sub(self, rhs: CpuTimes) -> CpuTimes {
        CpuTimes {
            own: self.own - rhs.own,
            children: self.children - rhs.children,
        }
    }
}

fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        // SAFETY: sysconf only reads a system constant.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 { t as f64 } else { 100.0 }
    })
}

/// CPU times of `pid` (`None` once the process is gone).
pub fn cpu_of(pid: u32) -> Option<CpuTimes> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Write system calls (`write`, `writev`, `send`...) `pid` has made, from
/// `/proc/<pid>/io` (`None` once the process is gone).
pub fn write_calls_of(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("syscw:"))
        .and_then(|v| v.trim().parse().ok())
}

/// CPU times of this process (every thread included).
pub fn cpu_self() -> CpuTimes {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|t| parse_stat(&t))
        .unwrap_or_default()
}

fn parse_stat(text: &str) -> Option<CpuTimes> {
    // The command name (field 2) may hold spaces and parentheses: count
    // fields from the last ')'. Field 3 (state) is index 0 after it.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let ticks = clock_ticks();
    Some(CpuTimes {
        own: (num(11)? + num(12)?) as f64 / ticks,
        children: (num(13)? + num(14)?) as f64 / ticks,
    })
}

/// Resident memory of `pid` in KiB: (VmRSS, VmHWM).
pub fn memory_of(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The direct children of `pid` (nginx's workers), from
/// `/proc/<pid>/task/<pid>/children`, falling back to a scan of `/proc`.
pub fn children_of(pid: u32) -> Vec<u32> {
    if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        return text
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|t| {
                    let rest = &t[t.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// The machine-wide count of connections dropped because a listener's
/// accept queue was full (`TcpExt: ListenOverflows` in `/proc/net/netstat`).
/// A dropped SYN is retried by the client after a second, so even a few of
/// these dominate a connection-rate measurement. Other processes on the
/// machine count here too.
pub fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = lines.next()?;
    let values = lines.next()?;
    let at = names
        .split_whitespace()
        .position(|n| n == "ListenOverflows")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// The soft limit on open files of this process.
pub fn open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    }
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill has no memory effects; a stale pid only gives ESRCH.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Whether `pid` still exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(t) => t
            .rfind(')')
            .and_then(|i| t[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_awkward_name() {
        let line = "1234 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 150 50 30 20 0";
        let t = parse_stat(line).unwrap();
        let ticks = clock_ticks();
        assert_eq!(t.own, 200.0 / ticks);
        assert_eq!(t.children, 50.0 / ticks);
    }

    #[test]
    fn own_process_is_readable() {
        assert!(memory_of(std::process::id()).is_some());
        assert!(alive(std::process::id()));
    }
}
