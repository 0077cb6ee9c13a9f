//! Markdown tables from `load --json` lines.
//!
//! Throughput rows are grouped by their `shape` and `path` tags and split by `server`
//! (`floor` / `sidecar`); each figure is the median over the runs (scripts/bench alternates
//! floor and sidecar, A B A B), and ratios are sidecar / floor of those medians. A `target`
//! tag (e.g. `1.15`) adds whether the CPU ratio is within it: reported, never asserted.
//!
//! Memory rows carry `memory=<what>`, `phase=before|after` and `entries=<n>`: RSS after
//! filling a cache minus RSS before, per entry.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::load::Summary;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Files of JSON lines written by `load --json`.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let mut rows = Vec::new();
    for f in &args.files {
        let text = std::fs::read_to_string(f).with_context(|| format!("{}", f.display()))?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            rows.push(
                serde_json::from_str::<Summary>(line)
                    .with_context(|| format!("{} line {}", f.display(), i + 1))?,
            );
        }
    }
    print!("{}", render(&rows));
    Ok(ExitCode::SUCCESS)
}

/// The median; the mean of the middle two for an even count.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

fn tag<'a>(s: &'a Summary, key: &str) -> &'a str {
    s.tags.get(key).map_or("", String::as_str)
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// Figures of one server on one path: medians over its runs.
struct Side {
    runs: usize,
    cpu: Option<f64>,
    rps: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    p999: Option<f64>,
    rss_mib: Option<f64>,
    hwm_mib: Option<f64>,
    client_cpu: Option<f64>,
    /// Highest share of the machine's CPU that other processes took during one of the runs.
    other_share: Option<f64>,
}

fn side(runs: &[&Summary]) -> Side {
    let m =
        |f: &dyn Fn(&Summary) -> Option<f64>| median(runs.iter().filter_map(|s| f(s)).collect());
    Side {
        runs: runs.len(),
        cpu: m(&|s| s.server.as_ref()?.cpu_us_per_check),
        rps: m(&|s| Some(s.rps)),
        p50: m(&|s| Some(s.latency_us.p50)),
        p99: m(&|s| Some(s.latency_us.p99)),
        p999: m(&|s| Some(s.latency_us.p999)),
        rss_mib: m(&|s| Some(s.server.as_ref()?.memory.rss_kib as f64 / 1024.0)),
        hwm_mib: m(&|s| Some(s.server.as_ref()?.memory.hwm_kib as f64 / 1024.0)),
        client_cpu: m(&|s| s.client_cpu_us_per_check),
        other_share: runs
            .iter()
            .filter_map(|s| Some(s.other_cpu_s? / s.machine_cpu_s))
            .reduce(f64::max),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

pub fn render(rows: &[Summary]) -> String {
    let mut out = String::new();
    // Groups in order of first appearance.
    let mut shapes: Vec<String> = Vec::new();
    let mut paths: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for s in rows.iter().filter(|s| !s.tags.contains_key("memory")) {
        let shape = tag(s, "shape").to_string();
        if !shapes.contains(&shape) {
            shapes.push(shape.clone());
        }
        let p = paths.entry(shape).or_default();
        if !p.iter().any(|x| x == tag(s, "path")) {
            p.push(tag(s, "path").to_string());
        }
    }
    for shape in &shapes {
        let first = rows.iter().find(|s| tag(s, "shape") == shape);
        let how = first.map_or(String::new(), |s| match s.offered_rate {
            Some(r) => format!(
                "fixed rate {r:.0}/s (open loop, latency from the intended send time), {} connections, up to {} in flight",
                s.connections, s.concurrency
            ),
            None => format!(
                "closed loop, {} connections, {} in flight",
                s.connections, s.concurrency
            ),
        });
        let _ = writeln!(out, "### Shape `{shape}`: {how}\n");
        out.push_str("| path | floor CPU µs/check | sidecar CPU µs/check | CPU ratio | target | answer floor CPU µs/check | sidecar / answer floor | floor rps | sidecar rps | rps ratio | floor p50 / p99 / p99.9 µs | sidecar p50 / p99 / p99.9 µs | sidecar RSS / peak MiB | client CPU µs/check (floor / sidecar) | runs | max other CPU |\n");
        out.push_str(
            "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---|---|---|---|---:|\n",
        );
        for path in paths.get(shape).into_iter().flatten() {
            let of = |server: &str| -> Vec<&Summary> {
                rows.iter()
                    .filter(|s| {
                        tag(s, "shape") == shape
                            && tag(s, "path") == path
                            && tag(s, "server") == server
                    })
                    .collect()
            };
            let (floor, sidecar) = (of("floor"), of("sidecar"));
            let (f, sc) = (side(&floor), side(&sidecar));
            // The floor answering with the sidecar's answer: what is left over it is deciding.
            let answer = side(&of("answer-floor"));
            let cpu_ratio = ratio(sc.cpu, f.cpu);
            let target = sidecar
                .iter()
                .chain(floor.iter())
                .find_map(|s| s.tags.get("target"))
                .and_then(|t| t.parse::<f64>().ok());
            let verdict = match (target, cpu_ratio) {
                (Some(t), Some(r)) => {
                    format!("≤ {t:.2}x: {}", if r <= t { "met" } else { "not met" })
                }
                (Some(t), None) => format!("≤ {t:.2}x"),
                _ => "-".into(),
            };
            let lat =
                |x: &Side| format!("{} / {} / {}", fmt(x.p50, 0), fmt(x.p99, 0), fmt(x.p999, 0));
            let other = [f.other_share, sc.other_share]
                .into_iter()
                .flatten()
                .reduce(f64::max);
            let _ = writeln!(
                out,
                "| {path} | {} | {} | {} | {verdict} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} / {} | {} + {} | {} |",
                fmt(f.cpu, 1),
                fmt(sc.cpu, 1),
                ratio(sc.cpu, f.cpu).map_or("-".into(), |r| format!("{r:.2}x")),
                fmt(answer.cpu, 1),
                ratio(sc.cpu, answer.cpu).map_or("-".into(), |r| format!("{r:.2}x")),
                fmt(f.rps, 0),
                fmt(sc.rps, 0),
                ratio(sc.rps, f.rps).map_or("-".into(), |r| format!("{r:.2}x")),
                lat(&f),
                lat(&sc),
                fmt(sc.rss_mib, 1),
                fmt(sc.hwm_mib, 1),
                fmt(f.client_cpu, 1),
                fmt(sc.client_cpu, 1),
                f.runs,
                sc.runs,
                other.map_or("-".into(), |o| format!("{:.0}%", o * 100.0)),
            );
        }
        out.push('\n');
    }

    let mut memories: Vec<String> = Vec::new();
    for s in rows.iter().filter_map(|s| s.tags.get("memory")) {
        if !memories.contains(s) {
            memories.push(s.clone());
        }
    }
    if !memories.is_empty() {
        out.push_str("### Memory\n\n");
        out.push_str("| what | entries | RSS before MiB | RSS after MiB | peak after MiB | growth MiB | KiB per entry | cache gauges after |\n");
        out.push_str("|---|---:|---:|---:|---:|---:|---:|---|\n");
        for m in &memories {
            let find = |phase: &str| {
                rows.iter()
                    .rev()
                    .find(|s| tag(s, "memory") == m && tag(s, "phase") == phase)
            };
            let (before, after) = (find("before"), find("after"));
            let rss = |s: Option<&Summary>| s.and_then(|s| s.server.as_ref()).map(|v| v.memory);
            let (b, a) = (rss(before), rss(after));
            let entries = after
                .and_then(|s| s.tags.get("entries"))
                .and_then(|e| e.parse::<f64>().ok());
            let growth_kib = match (b, a) {
                (Some(b), Some(a)) => Some(a.rss_kib as f64 - b.rss_kib as f64),
                _ => None,
            };
            let gauges = after
                .and_then(|s| s.metrics.as_ref())
                .map(|m| {
                    m.backend
                        .iter()
                        .filter(|(k, _)| k.starts_with("cache"))
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .filter(|g| !g.is_empty())
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "| {m} | {} | {} | {} | {} | {} | {} | {gauges} |",
                fmt(entries, 0),
                fmt(b.map(|b| b.rss_kib as f64 / 1024.0), 1),
                fmt(a.map(|a| a.rss_kib as f64 / 1024.0), 1),
                fmt(a.map(|a| a.hwm_kib as f64 / 1024.0), 1),
                fmt(growth_kib.map(|g| g / 1024.0), 1),
                fmt(
                    match (growth_kib, entries) {
                        (Some(g), Some(e)) if e > 0.0 => Some(g / e),
                        _ => None,
                    },
                    2
                ),
            );
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(server: &str, cpu: f64, rps: f64, tags: &[(&str, &str)]) -> Summary {
        let mut all: BTreeMap<String, String> = tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        all.insert("server".into(), server.into());
        serde_json::from_value(serde_json::json!({
            "tags": all, "target": "t", "mode": "closed", "offered_rate": null,
            "connections": 4, "concurrency": 32, "window_s": 1.0, "answers": 1000, "errors": 0,
            "rps": rps, "latency_us": {"p50": 100.0, "p90": 150.0, "p99": 200.0, "p999": 300.0,
            "max": 400.0, "mean": 110.0}, "outcomes": {"allow": 1000}, "warmup_outcomes": {},
            "expect": ["allow"], "unexpected": 0, "send_lag_us": null,
            "server": {"pid": 1, "cpu_s": cpu * 1e-3, "cpu_us_per_check": cpu,
                       "memory": {"rss_kib": 10240, "hwm_kib": 20480, "threads": 3}},
            "client_cpu_s": 0.01, "client_cpu_us_per_check": 10.0, "other_cpu_s": 0.5,
            "machine_cpu_s": 2.0, "load_average": [1.0, 1.0, 1.0], "metrics": null, "command": "x"
        }))
        .unwrap()
    }

    #[test]
    fn ratios_are_of_the_medians_and_the_target_is_reported_not_asserted() {
        let t = [("path", "jwt-role"), ("shape", "max"), ("target", "1.15")];
        let rows = vec![
            run("floor", 16.0, 1000.0, &t),
            run("sidecar", 20.0, 900.0, &t),
            run("floor", 18.0, 1000.0, &t),
            run("sidecar", 22.0, 800.0, &t),
            run("answer-floor", 19.0, 950.0, &t),
            run("answer-floor", 20.0, 950.0, &t),
        ];
        let table = render(&rows);
        let row = table
            .lines()
            .find(|l| l.starts_with("| jwt-role |"))
            .expect("a row for the path");
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        // Medians 17 and 21: 21 / 17 = 1.24, above 1.15; the answer floor's 19.5: 21 / 19.5.
        assert_eq!(&cells[2..6], ["17.0", "21.0", "1.24x", "≤ 1.15x: not met"]);
        assert_eq!(&cells[6..8], ["19.5", "1.08x"]);
        assert_eq!(cells[10], "0.85x");
        assert!(row.ends_with("| 2 + 2 | 25% |"), "{row}");
    }

    #[test]
    fn memory_growth_is_per_entry() {
        let mut before = run(
            "sidecar",
            1.0,
            1.0,
            &[("memory", "token-cache"), ("phase", "before")],
        );
        let mut after = run(
            "sidecar",
            1.0,
            1.0,
            &[
                ("memory", "token-cache"),
                ("phase", "after"),
                ("entries", "1024"),
            ],
        );
        before.server.as_mut().unwrap().memory.rss_kib = 10 * 1024;
        after.server.as_mut().unwrap().memory.rss_kib = 12 * 1024;
        let table = render(&[before, after]);
        let row = table
            .lines()
            .find(|l| l.starts_with("| token-cache |"))
            .unwrap();
        assert_eq!(
            row,
            "| token-cache | 1024 | 10.0 | 12.0 | 20.0 | 2.0 | 2.00 | - |"
        );
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
