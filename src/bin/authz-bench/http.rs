//! `authz-bench http`: plain HTTP load for what `load` (gRPC Check) cannot reach: requests
//! through Envoy (ext_authz to the sidecar or to the floor), and OpenFGA's Check API called
//! directly (the reference for an OpenFGA miss through the sidecar).
//!
//! Closed loop (`--concurrency` requests in flight, as fast as the answers come) or a fixed
//! rate (`--rate`, open loop, latency from each request's intended send time). Connections
//! are reqwest's pool (HTTP/1.1 keep-alive, one per request in flight). Answers other than
//! `--expect` (an HTTP status) make the exit code 3, as in `load`. The result is one JSON line
//! with the fields `report` and `http-report` read (`tags`, `rps`, `latency_us`, `server`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::procfs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The URL every request goes to.
    #[arg(long)]
    url: String,
    #[arg(long, default_value = "GET")]
    method: String,
    /// Request header, `name: value` (repeatable).
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Request body (sent with content-type application/json when it starts with `{`).
    #[arg(long)]
    body: Option<String>,
    /// The HTTP status every answer must have.
    #[arg(long, default_value_t = 200)]
    expect: u16,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Fixed rate in requests/s (open loop). Without it: closed loop.
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// A server whose CPU per request is reported (Envoy, OpenFGA).
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    tags: Vec<String>,
    /// Append the result as one JSON line to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Tokio worker threads (default: the CPUs it may run on).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Server {
    pub pid: u32,
    pub cpu_us_per_check: Option<f64>,
}

/// One run: the fields shared with `load`'s lines, so `http-report` reads both.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub tags: BTreeMap<String, String>,
    pub target: String,
    pub mode: String,
    pub offered_rate: Option<f64>,
    pub concurrency: usize,
    pub window_s: f64,
    pub answers: u64,
    pub errors: u64,
    pub rps: f64,
    pub latency_us: Latency,
    /// Status code (or `error`) → answers in the window.
    pub outcomes: BTreeMap<String, u64>,
    pub unexpected: u64,
    pub server: Option<Server>,
}

struct Plan {
    start: Instant,
    window_start: Instant,
    end: Instant,
    rate: Option<f64>,
}

struct WorkerStats {
    latency: Histogram<u64>,
    outcomes: BTreeMap<String, u64>,
    unexpected: u64,
}

async fn wait_until(due: Instant) {
    let now = Instant::now();
    if due > now {
        tokio::time::sleep(due - now).await;
    }
}

async fn worker(
    client: reqwest::Client,
    request: Arc<reqwest::Request>,
    plan: Arc<Plan>,
    counter: Arc<AtomicU64>,
    expect: u16,
) -> WorkerStats {
    let mut stats = WorkerStats {
        latency: Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid bounds"),
        outcomes: BTreeMap::new(),
        unexpected: 0,
    };
    wait_until(plan.start).await;
    loop {
        let due = match plan.rate {
            Some(rate) => {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let due = plan.start + Duration::from_secs_f64(n as f64 / rate);
                wait_until(due).await;
                due
            }
            None => Instant::now(),
        };
        if due >= plan.end {
            break;
        }
        let req = request.try_clone().expect("a body that is not a stream");
        let outcome = match client.execute(req).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                // The body is read so the connection can carry the next request.
                let _ = resp.bytes().await;
                status.to_string()
            }
            Err(_) => "error".to_string(),
        };
        let done = Instant::now();
        if outcome != expect.to_string() {
            stats.unexpected += 1;
        }
        if done < plan.window_start || done >= plan.end {
            continue;
        }
        if outcome != "error" {
            stats
                .latency
                .saturating_record((done - due).as_nanos().max(1) as u64);
        }
        *stats.outcomes.entry(outcome).or_default() += 1;
    }
    stats
}

fn build_request(args: &Args, client: &reqwest::Client) -> anyhow::Result<reqwest::Request> {
    let method = reqwest::Method::from_bytes(args.method.as_bytes()).context("--method")?;
    let mut builder = client.request(method, &args.url);
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .with_context(|| format!("--header {h:?}: expected `name: value`"))?;
        builder = builder.header(name.trim(), value.trim());
    }
    if let Some(body) = &args.body {
        if body.starts_with('{') {
            builder = builder.header("content-type", "application/json");
        }
        builder = builder.body(body.clone());
    }
    Ok(builder.build()?)
}

async fn run(args: &Args) -> anyhow::Result<Summary> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let tags = args
        .tags
        .iter()
        .map(|t| {
            t.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--tag {t:?}: expected key=value"))
        })
        .collect::<anyhow::Result<BTreeMap<_, _>>>()?;
    let client = reqwest::Client::builder()
        .timeout(args.timeout)
        .tcp_nodelay(true)
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let request = Arc::new(build_request(args, &client)?);
    let start = Instant::now() + Duration::from_millis(20);
    let plan = Arc::new(Plan {
        start,
        window_start: start + args.warmup,
        end: start + args.warmup + args.duration,
        rate: args.rate,
    });
    let server_pid = args.server_pid.map(|p| p.to_string());
    let sampler = {
        let (window_start, end, pid) = (plan.window_start, plan.end, server_pid.clone());
        std::thread::spawn(move || {
            let cpu = |pid: &Option<String>| pid.as_deref().and_then(procfs::cpu_seconds);
            std::thread::sleep(window_start.saturating_duration_since(Instant::now()));
            let first = cpu(&pid);
            std::thread::sleep(end.saturating_duration_since(Instant::now()));
            (first, cpu(&pid))
        })
    };
    let counter = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..args.concurrency)
        .map(|_| {
            tokio::spawn(worker(
                client.clone(),
                request.clone(),
                plan.clone(),
                counter.clone(),
                args.expect,
            ))
        })
        .collect();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3)?;
    let mut outcomes = BTreeMap::new();
    let mut unexpected = 0;
    for h in handles {
        let s = h.await?;
        latency.add(&s.latency)?;
        for (k, v) in s.outcomes {
            *outcomes.entry(k).or_default() += v;
        }
        unexpected += s.unexpected;
    }
    let (cpu_first, cpu_last) = sampler.join().expect("sampler thread");
    let window_s = args.duration.as_secs_f64();
    let errors = outcomes.get("error").copied().unwrap_or(0);
    let answers: u64 = outcomes.values().sum::<u64>() - errors;
    let us = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    Ok(Summary {
        tags,
        target: args.url.clone(),
        mode: if args.rate.is_some() {
            "rate"
        } else {
            "closed"
        }
        .into(),
        offered_rate: args.rate,
        concurrency: args.concurrency,
        window_s,
        answers,
        errors,
        rps: answers as f64 / window_s,
        latency_us: Latency {
            p50: us(0.5),
            p99: us(0.99),
            p999: us(0.999),
            max: latency.max() as f64 / 1000.0,
        },
        outcomes,
        unexpected,
        server: args.server_pid.map(|pid| Server {
            pid,
            cpu_us_per_check: match (cpu_first, cpu_last) {
                (Some(a), Some(b)) if answers > 0 => Some((b - a) * 1e6 / answers as f64),
                _ => None,
            },
        }),
    })
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        runtime.worker_threads(n);
    }
    let summary = runtime.enable_all().build()?.block_on(run(&args))?;
    let line = serde_json::to_string(&summary)?;
    if let Some(path) = &args.json {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(f, "{line}")?;
    }
    println!("{line}");
    eprintln!(
        "[authz-bench] http {} {}: {:.0} rps, p50 {:.0} µs, p99 {:.0} µs, answers {:?}",
        summary.mode,
        args.url,
        summary.rps,
        summary.latency_us.p50,
        summary.latency_us.p99,
        summary.outcomes
    );
    if summary.unexpected > 0 || summary.answers == 0 {
        eprintln!(
            "[authz-bench] {} answers other than HTTP {}: this run measured something else",
            summary.unexpected, args.expect
        );
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

/// `authz-bench http-report`: medians of `http` and `load` lines by tags, as the tables of
/// the Envoy and OpenFGA-miss modes of scripts/bench.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// JSON lines of `http` and `load` runs (tags: measure=envoy|fga-miss, server, shape, ...).
    file: PathBuf,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

pub fn report(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(&args.file).with_context(|| format!("{}", args.file.display()))?;
    let rows: Vec<Summary> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let tag = |s: &Summary, k: &str| s.tags.get(k).cloned().unwrap_or_default();
    let pick = |measure: &str, server: &str, shape: &str| -> Vec<&Summary> {
        rows.iter()
            .filter(|s| {
                tag(s, "measure") == measure
                    && tag(s, "server") == server
                    && tag(s, "shape") == shape
            })
            .collect()
    };
    let med = |runs: &[&Summary], f: &dyn Fn(&Summary) -> Option<f64>| {
        median(runs.iter().filter_map(|s| f(s)).collect())
    };
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    let rps = |s: &Summary| Some(s.rps);
    let p99 = |s: &Summary| Some(s.latency_us.p99);
    let p50 = |s: &Summary| Some(s.latency_us.p50);
    let cpu = |s: &Summary| s.server.as_ref().and_then(|x| x.cpu_us_per_check);

    let mut out = String::new();
    if rows.iter().any(|s| tag(s, "measure") == "envoy") {
        // Three servers behind the same Envoy config: the floor (an empty allow), the floor
        // answering with the sidecar's headers and metadata (`floor --answer`: Envoy's cost
        // of applying the answer, no deciding), and the sidecar.
        let servers = ["floor", "floor-answer", "sidecar"];
        let runs = |shape: &str| servers.map(|server| pick("envoy", server, shape));
        let (peak, half) = (runs("peak"), runs("half"));
        out.push_str(
            "#### Through Envoy (1 worker), JWT + role: ext_authz to the floor vs to the sidecar

",
        );
        out.push_str(
            "`floor, sidecar's answer`: the floor answering with the sidecar's identity headers, \
             removals and metadata for this request, without deciding anything.\n\n",
        );
        out.push_str(
            "| | floor | floor, sidecar's answer | sidecar | sidecar / floor | answer / floor | sidecar / answer | target |\n\
             |---|---:|---:|---:|---:|---:|---:|---|\n",
        );
        let mut row = |what: &str,
                       runs: &[Vec<&Summary>; 3],
                       f: &dyn Fn(&Summary) -> Option<f64>,
                       target: &str,
                       ratios: bool| {
            let [a, b, c] = [med(&runs[0], f), med(&runs[1], f), med(&runs[2], f)];
            let (r1, r2, r3) = if ratios {
                (ratio(c, a), ratio(b, a), ratio(c, b))
            } else {
                ("–".into(), "–".into(), "–".into())
            };
            out.push_str(&format!(
                "| {what} | {} | {} | {} | {r1} | {r2} | {r3} | {target} |\n",
                fmt(a),
                fmt(b),
                fmt(c)
            ));
        };
        row("peak rps (closed loop)", &peak, &rps, "≥ 0.95x", true);
        row("Envoy CPU µs per request at peak", &peak, &cpu, "–", true);
        row(
            "rate at half of the floor's peak, rps",
            &half,
            &rps,
            "–",
            false,
        );
        row("p50 at half of peak, µs", &half, &p50, "–", true);
        row("p99 at half of peak, µs", &half, &p99, "≤ 1.2x", true);
        out.push('\n');
    }
    if rows.iter().any(|s| tag(s, "measure") == "fga-miss") {
        // Any ext_authz server adds its own gRPC hop (client -> authorizer), which the floor
        // measures; what the sidecar adds by calling OpenFGA is (sidecar - floor) against
        // OpenFGA called directly. The end-to-end column is kept beside it.
        out.push_str("#### OpenFGA miss: the sidecar (decision cache off) against OpenFGA's Check called directly, and the floor (the gRPC hop alone)\n\n");
        out.push_str("| in flight | direct p50 / p99 µs | floor p50 / p99 µs | sidecar p50 / p99 µs | direct / floor / sidecar rps | end to end: sidecar vs direct p50 | the hop: floor p50 / direct p50 | the OpenFGA call: (sidecar − floor) vs direct p50 | target (on the call) |\n|---:|---|---|---|---|---:|---:|---:|---|\n");
        let mut shapes: Vec<String> = rows
            .iter()
            .filter(|s| tag(s, "measure") == "fga-miss")
            .map(|s| tag(s, "shape"))
            .collect();
        shapes.sort();
        shapes.dedup();
        let pct = |num: Option<f64>, den: Option<f64>| match (num, den) {
            (Some(n), Some(d)) if d > 0.0 => format!("{:+.1}%", (n / d - 1.0) * 100.0),
            _ => "-".into(),
        };
        let share = |num: Option<f64>, den: Option<f64>| match (num, den) {
            (Some(n), Some(d)) if d > 0.0 => format!("{:.0}%", n / d * 100.0),
            _ => "-".into(),
        };
        // The sidecar's OpenFGA call at `shape`: its p50 less the floor's (the gRPC hop).
        let call_p50 = |shape: &str| match (
            med(&pick("fga-miss", "sidecar", shape), &p50),
            med(&pick("fga-miss", "floor", shape), &p50),
        ) {
            (Some(s), Some(f)) => Some(s - f),
            _ => None,
        };
        let mut cpu_rows = String::new();
        for shape in &shapes {
            let (d, f, s) = (
                pick("fga-miss", "openfga", shape),
                pick("fga-miss", "floor", shape),
                pick("fga-miss", "sidecar", shape),
            );
            let (dp50, fp50, sp50) = (med(&d, &p50), med(&f, &p50), med(&s, &p50));
            let call = call_p50(shape);
            let in_flight = d.first().or(s.first()).map_or(0, |s| s.concurrency);
            out.push_str(&format!(
                "| {in_flight} | {} / {} | {} / {} | {} / {} | {} / {} / {} | {} | {} | {} | ≤ +5% |\n",
                fmt(dp50),
                fmt(med(&d, &p99)),
                fmt(fp50),
                fmt(med(&f, &p99)),
                fmt(sp50),
                fmt(med(&s, &p99)),
                fmt(med(&d, &rps)),
                fmt(med(&f, &rps)),
                fmt(med(&s, &rps)),
                pct(sp50, dp50),
                share(fp50, dp50),
                pct(call, dp50),
            ));
            cpu_rows.push_str(&format!(
                "| {in_flight} | {} | {} | {} |\n",
                fmt(med(&d, &cpu)),
                fmt(med(&f, &cpu)),
                fmt(med(&s, &cpu)),
            ));
        }
        // The direct call made from the sidecar's CPU (scripts/bench), when there is one: the
        // sidecar's own call crosses CPUs, so does this one.
        if rows
            .iter()
            .any(|s| tag(s, "server") == "openfga-from-server-cpu")
        {
            out.push_str("\nThe direct call made from the sidecar's CPU (OpenFGA's answer wakes a process on the other CPU, as it does for the sidecar):\n\n");
            out.push_str("| in flight | direct from the sidecar's CPU p50 / p99 µs | rps | the OpenFGA call: (sidecar − floor) vs this direct p50 | target |\n|---:|---|---:|---:|---|\n");
            for shape in &shapes {
                let d = pick("fga-miss", "openfga-from-server-cpu", shape);
                let (dp50, call) = (med(&d, &p50), call_p50(shape));
                out.push_str(&format!(
                    "| {} | {} / {} | {} | {} | ≤ +5% |\n",
                    d.first().map_or(0, |s| s.concurrency),
                    fmt(dp50),
                    fmt(med(&d, &p99)),
                    fmt(med(&d, &rps)),
                    pct(call, dp50),
                ));
            }
        }
        out.push_str("\nServer CPU µs per check (from /proc; less noisy than latency):\n\n");
        out.push_str("| in flight | OpenFGA (direct) | floor | sidecar |\n|---:|---:|---:|---:|\n");
        out.push_str(&cpu_rows);
        out.push('\n');
    }
    if rows.iter().any(|s| tag(s, "measure") == "fresh-tokens") {
        out.push_str(
            "#### Fresh tokens through gRPC: a new token per request, signature verified each time

",
        );
        out.push_str(
            "| algorithm | checks | rps | server CPU µs per check | checks/s per core |
|---|---:|---:|---:|---:|
",
        );
        for s in rows.iter().filter(|s| tag(s, "measure") == "fresh-tokens") {
            let cpu = cpu(s);
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                tag(s, "alg"),
                s.answers,
                fmt(Some(s.rps)),
                cpu.map_or("-".into(), |c| format!("{c:.1}")),
                fmt(cpu.map(|c| 1e6 / c)),
            ));
        }
        out.push('\n');
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}
