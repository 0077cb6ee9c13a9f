//! What `/proc` says about a process and the machine: CPU time (utime + stime, in clock ticks
//! of `CLK_TCK`, 10 ms on Linux), VmRSS / VmHWM, threads, the machine's busy CPU time and load
//! average. Linux only, like the benchmark.

use std::sync::OnceLock;

/// Seconds per clock tick of `/proc/*/stat`. `getconf CLK_TCK` (no libc here: the crate
/// forbids unsafe code); 100 is what Linux uses everywhere in practice.
fn tick_seconds() -> f64 {
    static TICK: OnceLock<f64> = OnceLock::new();
    *TICK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .map_or(0.01, |t| 1.0 / t)
    })
}

/// CPU seconds (user + system, all threads, dead ones included) of a process; `None` when it
/// is gone. `pid` "self" is this process.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and ')': fields count from the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 * tick_seconds())
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub threads: u64,
}

/// VmRSS, VmHWM and Threads of a process.
pub fn memory(pid: &str) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut m = Memory::default();
    for line in status.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let n = || value.split_whitespace().next().and_then(|v| v.parse().ok());
        match key {
            "VmRSS" => m.rss_kib = n()?,
            "VmHWM" => m.hwm_kib = n()?,
            "Threads" => m.threads = n()?,
            _ => {}
        }
    }
    Some(m)
}

/// Busy CPU seconds of the whole machine so far: every state of the `cpu` line of
/// `/proc/stat` except idle and iowait (guest time is already inside user).
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 8 {
        return None;
    }
    let busy: u64 = v.iter().sum::<u64>() - v[3] - v[4];
    Some(busy as f64 * tick_seconds())
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> Option<[f64; 3]> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = s.split_whitespace().map(|x| x.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        // Burn a little CPU so the tick counter cannot legitimately be zero... it still can be
        // (10 ms ticks), so only presence and sanity are asserted.
        assert!(cpu_seconds("self").is_some_and(|s| s >= 0.0));
        let m = memory("self").expect("/proc/self/status");
        assert!(m.rss_kib > 0 && m.hwm_kib >= m.rss_kib && m.threads >= 1);
        assert!(machine_busy_seconds().is_some_and(|s| s > 0.0));
        assert!(load_average().is_some());
    }

    #[test]
    fn a_gone_process_reads_as_none() {
        assert!(cpu_seconds("999999999").is_none());
        assert!(memory("999999999").is_none());
    }
}
