//! The load generator: `Check` requests shaped as Envoy sends them, over N HTTP/2 connections
//! with M requests in flight, either closed loop (each of the M sends its next request when the
//! answer to the previous one arrives) or at a fixed rate (open loop).
//!
//! Latency at a fixed rate is measured from the *intended* send time of each request (request
//! k is due at start + k / rate), not from when it was actually sent: when the server stalls,
//! the requests that should have been sent meanwhile count the stall too (no coordinated
//! omission). A request due in less than 2 ms is waited for by yielding, not by tokio's 1 ms
//! timer, so the timer does not add up to a millisecond to every latency.
//!
//! The run has a warm-up (answers checked, nothing else kept) and a measured window. `/proc`
//! is sampled at both ends of the window by a plain thread (not a tokio task, so a busy runtime
//! does not move the sample): the server's CPU time over the window divided by the answers
//! completed in the window is the server CPU per check.
//!
//! Every answer is classified (`allow`, `deny:401`, `rpc:Unavailable`, `timeout`, ...); answers
//! not in `--expect` make the exit code 3, so a benchmark that silently measures 401s fails.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use authz_sidecar::proto::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use authz_sidecar::proto::pb::envoy::config::core::v3::{Address, SocketAddress, address};
use authz_sidecar::proto::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, attribute_context,
    authorization_client::AuthorizationClient, check_response::HttpResponse,
};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

use crate::procfs;

/// `{n}` in a path, header value or body becomes the request's number (0, 1, 2, ...; unique
/// within a run), for requests that must differ (distinct OpenFGA objects).
const SEQ: &str = "{n}";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The Check server, HOST:PORT.
    #[arg(long)]
    target: String,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight at once (streams), spread over the connections.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Measured window.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Load before the window: answers are checked against --expect, nothing else is kept.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Fixed rate in requests/s (open loop, latency from the intended send time). Without it:
    /// closed loop, as fast as the answers come.
    #[arg(long)]
    rate: Option<f64>,
    /// Send exactly this many requests, then stop (no warm-up, no --duration): for filling
    /// caches. The window is the whole run.
    #[arg(long)]
    requests: Option<u64>,
    #[arg(long, default_value = "GET")]
    method: String,
    /// Request path (with the query, as Envoy sends it). `{n}`: the request's number.
    #[arg(long, default_value = "/")]
    path: String,
    #[arg(long, default_value = "app.local")]
    host: String,
    /// Extra request header, `name: value` (repeatable). `{n}` in the value: the request's number.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Shorthand for `--header 'authorization: Bearer TOKEN'`.
    #[arg(long)]
    token: Option<String>,
    /// Shorthand for `--header 'x-api-key: KEY'`.
    #[arg(long)]
    api_key: Option<String>,
    /// Request body (Envoy's with_request_body).
    #[arg(long)]
    body: Option<String>,
    /// A request mix instead of --method/--path/--header/--body: JSON lines
    /// `{"method":"GET","path":"/x","host":"h","headers":{"k":"v"},"body":"","weight":1}`,
    /// sent in turn by weight.
    #[arg(long)]
    mix: Option<PathBuf>,
    /// Sign this many distinct tokens (subject bench-<i>) and send token n % N with request n
    /// as `authorization: Bearer` (distinct tokens fill the sidecar's token cache).
    #[arg(long)]
    mint_tokens: Option<usize>,
    #[arg(long, default_value = "deploy/local/dev-signing-key.pem")]
    mint_key: PathBuf,
    #[arg(long, default_value = "dev-local-1")]
    mint_kid: String,
    /// The signing algorithm of --mint-key (RS256, ES256, ...).
    #[arg(long, default_value = "RS256")]
    mint_alg: String,
    #[arg(long, value_delimiter = ',', default_value = "admin")]
    mint_roles: Vec<String>,
    #[arg(long, default_value = "authz-sidecar-local")]
    mint_iss: String,
    #[arg(long, default_value = "mcp-server")]
    mint_aud: String,
    /// Answers this run is built for, comma-separated: allow, deny:401, deny:403, ... or `any`.
    /// Any other answer, an RPC error or a timeout makes the exit code 3.
    #[arg(long, value_delimiter = ',', default_value = "allow")]
    expect: Vec<String>,
    /// The server's pid: its CPU time and memory over the window are reported from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// The sidecar's /metrics URL: decision counters (delta over the run) and cache gauges.
    #[arg(long)]
    metrics_url: Option<String>,
    /// Per-request deadline; a late answer counts as `timeout`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// How long to retry connecting (the server may still be starting).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Tokio worker threads of the generator (default: the CPUs it may run on).
    #[arg(long)]
    threads: Option<usize>,
    /// `key=value` copied into the JSON line (scripts/bench: path, server, shape, rep).
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    tags: Vec<String>,
    /// Append the result as one JSON line to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One run's result: one JSON line of `--json`, read back by `report`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub tags: BTreeMap<String, String>,
    pub target: String,
    /// `closed` or `rate`.
    pub mode: String,
    pub offered_rate: Option<f64>,
    pub connections: usize,
    pub concurrency: usize,
    pub window_s: f64,
    /// Check answers (a CheckResponse, whatever it says) completed in the window.
    pub answers: u64,
    /// RPC errors and timeouts in the window.
    pub errors: u64,
    /// answers / window_s.
    pub rps: f64,
    pub latency_us: Latency,
    /// Answers in the window, by kind.
    pub outcomes: BTreeMap<String, u64>,
    /// Answers outside the window (warm-up, and answers arriving after its end).
    pub warmup_outcomes: BTreeMap<String, u64>,
    pub expect: Vec<String>,
    /// Answers (warm-up included) not in `expect`, errors included.
    pub unexpected: u64,
    /// Fixed rate only: how late requests were sent after their intended time (client lag).
    pub send_lag_us: Option<Latency>,
    pub server: Option<ServerSample>,
    pub client_cpu_s: Option<f64>,
    pub client_cpu_us_per_check: Option<f64>,
    /// Busy CPU seconds of the machine in the window minus the server's and the generator's:
    /// what everything else (other people's builds) took meanwhile, out of `machine_cpu_s`.
    pub other_cpu_s: Option<f64>,
    pub machine_cpu_s: f64,
    pub load_average: Option<[f64; 3]>,
    pub metrics: Option<MetricsSample>,
    pub command: String,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerSample {
    pub pid: u32,
    pub cpu_s: f64,
    pub cpu_us_per_check: Option<f64>,
    /// At the end of the window.
    pub memory: procfs::Memory,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MetricsSample {
    /// `decision/code/credential` → checks, over warm-up and window.
    pub decisions: BTreeMap<String, u64>,
    /// `authz_sidecar_backend` gauges after the run (cache_size, ...).
    pub backend: BTreeMap<String, f64>,
}

/// What one answer was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Outcome {
    Allow,
    /// denied_response with this HTTP status.
    Deny(i32),
    /// error_response with this HTTP status.
    ErrorResponse(i32),
    /// No http_response; the google.rpc code of `status`.
    Bare(i32),
    Rpc(tonic::Code),
    Timeout,
}

impl Outcome {
    fn of(resp: &CheckResponse) -> Self {
        let http = |s: &Option<authz_sidecar::proto::pb::envoy::r#type::v3::HttpStatus>| {
            s.as_ref().map_or(0, |s| s.code)
        };
        match &resp.http_response {
            Some(HttpResponse::OkResponse(_)) => Outcome::Allow,
            Some(HttpResponse::DeniedResponse(d)) => Outcome::Deny(http(&d.status)),
            Some(HttpResponse::ErrorResponse(d)) => Outcome::ErrorResponse(http(&d.status)),
            None => Outcome::Bare(resp.status.as_ref().map_or(0, |s| s.code)),
        }
    }

    fn is_error(self) -> bool {
        matches!(self, Outcome::Rpc(_) | Outcome::Timeout)
    }

    fn label(self) -> String {
        match self {
            Outcome::Allow => "allow".into(),
            Outcome::Deny(s) => format!("deny:{s}"),
            Outcome::ErrorResponse(s) => format!("error_response:{s}"),
            Outcome::Bare(c) => format!("bare:{c}"),
            Outcome::Rpc(c) => format!("rpc:{c:?}"),
            Outcome::Timeout => "timeout".into(),
        }
    }
}

/// One kind of request of the mix.
#[derive(Debug, Clone, Deserialize)]
struct Spec {
    #[serde(default = "default_method")]
    method: String,
    path: String,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: String,
    #[serde(default = "one")]
    weight: u32,
}

fn default_method() -> String {
    "GET".into()
}
fn one() -> u32 {
    1
}

/// A prepared request: the CheckRequest as Envoy would send it, and where `{n}` must go.
struct Prepared {
    base: CheckRequest,
    path_has_seq: bool,
    body_has_seq: bool,
    headers_with_seq: Vec<String>,
}

/// Builds request number `n`.
struct Requests {
    prepared: Vec<Prepared>,
    /// Index into `prepared` by n % len: the weights, spread out.
    schedule: Vec<usize>,
    tokens: Vec<String>,
}

impl Requests {
    fn new(specs: Vec<Spec>, default_host: &str, tokens: Vec<String>) -> anyhow::Result<Self> {
        if specs.is_empty() {
            bail!("the request mix is empty");
        }
        let mut prepared = Vec::new();
        let mut schedule = Vec::new();
        for (i, spec) in specs.into_iter().enumerate() {
            if spec.weight == 0 {
                continue;
            }
            schedule.extend(std::iter::repeat_n(i, spec.weight as usize));
            prepared.push(prepare(spec, default_host));
        }
        if prepared.is_empty() {
            bail!("every request of the mix has weight 0");
        }
        // Spread the weights: a,a,b -> a,b,a would need more care than this benchmark needs;
        // in turn by index is enough for a mix read over thousands of requests.
        schedule.sort_unstable();
        let schedule = interleave(&schedule);
        Ok(Self {
            prepared,
            schedule,
            tokens,
        })
    }

    fn build(&self, n: u64) -> CheckRequest {
        let p = &self.prepared[self.schedule[(n % self.schedule.len() as u64) as usize]];
        let mut req = p.base.clone();
        let seq = n.to_string();
        let http = req
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
            .expect("prepared requests have http attributes");
        http.id = seq.clone();
        http.headers
            .insert("x-request-id".into(), format!("bench-{seq}"));
        if p.path_has_seq {
            http.path = http.path.replace(SEQ, &seq);
            http.headers.insert(":path".into(), http.path.clone());
        }
        if p.body_has_seq {
            http.body = http.body.replace(SEQ, &seq);
        }
        for name in &p.headers_with_seq {
            if let Some(v) = http.headers.get_mut(name) {
                *v = v.replace(SEQ, &seq);
            }
        }
        if !self.tokens.is_empty() {
            let t = &self.tokens[(n % self.tokens.len() as u64) as usize];
            http.headers
                .insert("authorization".into(), format!("Bearer {t}"));
        }
        req
    }
}

/// Turns sorted indices (0,0,0,1) into a round-robin order (0,1,0,0).
fn interleave(sorted: &[usize]) -> Vec<usize> {
    let mut buckets: BTreeMap<usize, usize> = BTreeMap::new();
    for &i in sorted {
        *buckets.entry(i).or_default() += 1;
    }
    let mut out = Vec::with_capacity(sorted.len());
    while out.len() < sorted.len() {
        for (&i, left) in buckets.iter_mut() {
            if *left > 0 {
                out.push(i);
                *left -= 1;
            }
        }
    }
    out
}

/// The CheckRequest Envoy's ext_authz filter sends for this request: the pseudo-headers and
/// the usual ones in `headers`, the source address of a local client.
fn prepare(spec: Spec, default_host: &str) -> Prepared {
    let host = spec.host.unwrap_or_else(|| default_host.to_string());
    let mut headers: HashMap<String, String> = HashMap::new();
    headers.insert(":authority".into(), host.clone());
    headers.insert(":method".into(), spec.method.clone());
    headers.insert(":path".into(), spec.path.clone());
    headers.insert(":scheme".into(), "http".into());
    headers.insert("user-agent".into(), "authz-bench".into());
    headers.insert("accept".into(), "*/*".into());
    headers.insert("x-forwarded-proto".into(), "http".into());
    let mut headers_with_seq = Vec::new();
    for (k, v) in spec.headers {
        let k = k.to_ascii_lowercase();
        if v.contains(SEQ) {
            headers_with_seq.push(k.clone());
        }
        headers.insert(k, v);
    }
    if !spec.body.is_empty() {
        headers.insert("content-length".into(), spec.body.len().to_string());
    }
    let path_has_seq = spec.path.contains(SEQ);
    let body_has_seq = spec.body.contains(SEQ);
    let base = CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(attribute_context::Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: "127.0.0.1".into(),
                        port_specifier: Some(PortSpecifier::PortValue(40000)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: spec.method,
                    headers,
                    path: spec.path,
                    host,
                    scheme: "http".into(),
                    protocol: "HTTP/1.1".into(),
                    size: spec.body.len() as i64,
                    body: spec.body,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    Prepared {
        base,
        path_has_seq,
        body_has_seq,
        headers_with_seq,
    }
}

/// When each phase starts and ends; shared by the workers and the sampler.
struct Plan {
    /// Start of the warm-up; request k of a fixed rate is due at start + k / rate.
    start: Instant,
    /// Start of the measured window (= start without warm-up).
    window_start: Instant,
    /// End of the window; `None` with --requests (the run ends when they are all answered).
    end: Option<Instant>,
    rate: Option<f64>,
    requests: Option<u64>,
    timeout: Duration,
}

/// What one worker saw.
struct WorkerStats {
    /// Latency in nanoseconds, window only.
    latency: Histogram<u64>,
    /// Fixed rate: actual send time minus intended send time, nanoseconds, window only.
    lag: Histogram<u64>,
    outcomes: HashMap<Outcome, u64>,
    /// Warm-up and answers arriving after the window: checked against --expect, not reported.
    outside: HashMap<Outcome, u64>,
}

fn histogram() -> Histogram<u64> {
    // 1 ns to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

/// Waits until `due`: tokio's timer (1 ms granularity) while more than 2 ms are left, then by
/// yielding, so a request is not sent up to a millisecond late because of the timer.
async fn wait_until(due: Instant) {
    loop {
        let now = Instant::now();
        if now >= due {
            return;
        }
        let left = due - now;
        if left > Duration::from_millis(2) {
            tokio::time::sleep(left - Duration::from_millis(1)).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
}

async fn worker(
    mut client: AuthorizationClient<Channel>,
    plan: Arc<Plan>,
    requests: Arc<Requests>,
    counter: Arc<AtomicU64>,
) -> WorkerStats {
    let mut stats = WorkerStats {
        latency: histogram(),
        lag: histogram(),
        outcomes: HashMap::new(),
        outside: HashMap::new(),
    };
    // Nothing before the start: with --requests the window begins there, and every answer
    // must fall inside it.
    wait_until(plan.start).await;
    loop {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        if plan.requests.is_some_and(|limit| n >= limit) {
            break;
        }
        let due = match plan.rate {
            Some(rate) => {
                let due = plan.start + Duration::from_secs_f64(n as f64 / rate);
                if plan.end.is_some_and(|end| due >= end) {
                    break;
                }
                wait_until(due).await;
                due
            }
            None => Instant::now(),
        };
        if plan.end.is_some_and(|end| due >= end) {
            break;
        }
        let request = requests.build(n);
        let sent = Instant::now();
        let outcome = match tokio::time::timeout(plan.timeout, client.check(request)).await {
            Ok(Ok(response)) => Outcome::of(response.get_ref()),
            Ok(Err(status)) => Outcome::Rpc(status.code()),
            Err(_) => Outcome::Timeout,
        };
        let done = Instant::now();
        let in_window = done >= plan.window_start && plan.end.is_none_or(|end| done < end);
        if !in_window {
            *stats.outside.entry(outcome).or_default() += 1;
            continue;
        }
        *stats.outcomes.entry(outcome).or_default() += 1;
        if !outcome.is_error() {
            // From the intended send time: a stall delays the requests due meanwhile too.
            stats
                .latency
                .saturating_record((done - due).as_nanos().max(1) as u64);
            if plan.rate.is_some() {
                stats
                    .lag
                    .saturating_record((sent.saturating_duration_since(due)).as_nanos() as u64);
            }
        }
    }
    stats
}

/// `/proc` at one instant.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    server_cpu: Option<f64>,
    client_cpu: Option<f64>,
    machine_busy: Option<f64>,
}

fn sample(server_pid: Option<u32>) -> Sample {
    Sample {
        at: Instant::now(),
        server_cpu: server_pid.and_then(|p| procfs::cpu_seconds(&p.to_string())),
        client_cpu: procfs::cpu_seconds("self"),
        machine_busy: procfs::machine_busy_seconds(),
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

async fn connect(args: &Args) -> anyhow::Result<Vec<AuthorizationClient<Channel>>> {
    let endpoint = Endpoint::from_shared(format!("http://{}", args.target))
        .with_context(|| format!("--target {}", args.target))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2));
    let deadline = Instant::now() + args.connect_timeout;
    let mut clients = Vec::with_capacity(args.connections);
    // Each connect() is its own HTTP/2 connection.
    while clients.len() < args.connections {
        match endpoint.connect().await {
            Ok(channel) => clients.push(AuthorizationClient::new(channel)),
            Err(e) if Instant::now() >= deadline => {
                bail!(
                    "cannot connect to {} within {:?}: {e}",
                    args.target,
                    args.connect_timeout
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Ok(clients)
}

fn specs(args: &Args) -> anyhow::Result<Vec<Spec>> {
    if let Some(mix) = &args.mix {
        let text =
            std::fs::read_to_string(mix).with_context(|| format!("--mix {}", mix.display()))?;
        return text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .map(|(i, l)| {
                serde_json::from_str::<Spec>(l)
                    .with_context(|| format!("--mix {} line {}", mix.display(), i + 1))
            })
            .collect();
    }
    let mut headers = BTreeMap::new();
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .with_context(|| format!("--header {h:?}: expected `name: value`"))?;
        let k = k.trim();
        if k.is_empty() {
            bail!("--header {h:?}: empty name");
        }
        headers.insert(k.to_ascii_lowercase(), v.trim().to_string());
    }
    if let Some(t) = &args.token {
        headers.insert("authorization".into(), format!("Bearer {t}"));
    }
    if let Some(k) = &args.api_key {
        headers.insert("x-api-key".into(), k.clone());
    }
    Ok(vec![Spec {
        method: args.method.clone(),
        path: args.path.clone(),
        host: None,
        headers,
        body: args.body.clone().unwrap_or_default(),
        weight: 1,
    }])
}

/// Distinct tokens signed with --mint-alg, subject `bench-<i>`, valid for 2 hours.
fn mint_tokens(args: &Args, count: usize) -> anyhow::Result<Vec<String>> {
    let pem = std::fs::read(&args.mint_key)
        .with_context(|| format!("--mint-key {}", args.mint_key.display()))?;
    let alg: jsonwebtoken::Algorithm = args
        .mint_alg
        .parse()
        .with_context(|| format!("--mint-alg {}", args.mint_alg))?;
    let now = authz_sidecar::clock::now_secs();
    let started = Instant::now();
    let tokens = (0..count)
        .map(|i| {
            let sub = format!("bench-{i}");
            let claims = serde_json::json!({
                "sub": sub, "preferred_username": sub, "iss": args.mint_iss, "aud": args.mint_aud,
                "iat": now, "exp": now + 7200, "realm_access": {"roles": args.mint_roles},
                "scope": "",
            });
            authz_sidecar::authn::jwt::mint(&pem, alg, &args.mint_kid, &claims)
                .context("signing a token with --mint-key")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    eprintln!(
        "[authz-bench] minted {count} tokens in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(tokens)
}

/// The sidecar's decision counters and backend gauges from /metrics.
async fn scrape(url: &str) -> anyhow::Result<(BTreeMap<String, f64>, BTreeMap<String, f64>)> {
    let text = reqwest::get(url)
        .await
        .with_context(|| format!("GET {url}"))?
        .text()
        .await?;
    Ok(parse_metrics(&text))
}

/// `authz_sidecar_decisions_total` as `decision/code/credential` (summed over status and rule;
/// the code is the `error` label, `ok` for an allow's `none`; older builds: `code`), and the
/// decision cache and OpenFGA counters by their short names (`cache_hits`, `cache_size`,
/// `openfga_requests`: check and batch-check calls; older builds: `authz_sidecar_backend{name}`).
fn parse_metrics(text: &str) -> (BTreeMap<String, f64>, BTreeMap<String, f64>) {
    let mut decisions = BTreeMap::new();
    let mut backend = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (base, labels) = match name.split_once('{') {
            Some((b, rest)) => (b, rest.trim_end_matches('}')),
            None => (name, ""),
        };
        let label = |key: &str| {
            labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == key).then(|| v.trim_matches('"').to_string())
            })
        };
        match base {
            "authz_sidecar_decisions_total" => {
                let key = format!(
                    "{}/{}/{}",
                    label("decision").unwrap_or_default(),
                    label("code")
                        .or_else(|| label("error").map(|e| if e == "none" {
                            "ok".into()
                        } else {
                            e
                        }))
                        .unwrap_or_default(),
                    // `credential` since the label was renamed from `method`.
                    label("credential")
                        .or_else(|| label("method"))
                        .unwrap_or_default()
                );
                *decisions.entry(key).or_default() += value;
            }
            "authz_sidecar_backend" => {
                if let Some(n) = label("name") {
                    backend.insert(n, value);
                }
            }
            "authz_sidecar_decision_cache_entries" => {
                backend.insert("cache_size".into(), value);
            }
            "authz_sidecar_openfga_requests_total"
                if matches!(label("endpoint").as_deref(), Some("check" | "batch_check")) =>
            {
                *backend.entry("openfga_requests".into()).or_default() += value;
            }
            _ => {
                if let Some(name) = base
                    .strip_prefix("authz_sidecar_decision_cache_")
                    .and_then(|n| n.strip_suffix("_total"))
                {
                    backend.insert(format!("cache_{name}"), value);
                }
            }
        }
    }
    (decisions, backend)
}

fn latency_of(h: &Histogram<u64>) -> Latency {
    let us = |ns: u64| ns as f64 / 1000.0;
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        p50: us(h.value_at_quantile(0.50)),
        p90: us(h.value_at_quantile(0.90)),
        p99: us(h.value_at_quantile(0.99)),
        p999: us(h.value_at_quantile(0.999)),
        max: us(h.max()),
        mean: h.mean() / 1000.0,
    }
}

fn labelled(map: &HashMap<Outcome, u64>) -> BTreeMap<String, u64> {
    map.iter().map(|(o, n)| (o.label(), *n)).collect()
}

async fn run(args: &Args) -> anyhow::Result<Summary> {
    if args.concurrency == 0 || args.connections == 0 {
        bail!("--concurrency and --connections must be at least 1");
    }
    if let Some(r) = args.rate
        && !(r.is_finite() && r > 0.0)
    {
        bail!("--rate must be a positive number of requests per second");
    }
    if args.requests == Some(0) {
        bail!("--requests must be at least 1");
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
    let tokens = match args.mint_tokens {
        Some(0) => bail!("--mint-tokens must be at least 1"),
        Some(n) => mint_tokens(args, n)?,
        None => Vec::new(),
    };
    let requests = Arc::new(Requests::new(specs(args)?, &args.host, tokens)?);
    let clients = connect(args).await?;
    let before = match &args.metrics_url {
        Some(url) => Some(scrape(url).await?),
        None => None,
    };

    // A little ahead, so every worker is spawned before the first request is due.
    let start = Instant::now() + Duration::from_millis(20);
    let (window_start, end) = match args.requests {
        Some(_) => (start, None),
        None => (
            start + args.warmup,
            Some(start + args.warmup + args.duration),
        ),
    };
    let plan = Arc::new(Plan {
        start,
        window_start,
        end,
        rate: args.rate,
        requests: args.requests,
        timeout: args.timeout,
    });
    let server_pid = args.server_pid;
    // With a fixed end the window is sampled by a thread at its planned bounds; with
    // --requests, before the first request and after the last answer.
    let sampler = end.map(|end| {
        std::thread::spawn(move || {
            sleep_until(window_start);
            let first = sample(server_pid);
            sleep_until(end);
            let last = sample(server_pid);
            (first, last)
        })
    });
    let first_of_requests = args.requests.map(|_| sample(server_pid));

    let counter = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::with_capacity(args.concurrency);
    for w in 0..args.concurrency {
        handles.push(tokio::spawn(worker(
            clients[w % clients.len()].clone(),
            plan.clone(),
            requests.clone(),
            counter.clone(),
        )));
    }
    let mut latency = histogram();
    let mut lag = histogram();
    let mut outcomes: HashMap<Outcome, u64> = HashMap::new();
    let mut outside: HashMap<Outcome, u64> = HashMap::new();
    for h in handles {
        let s = h.await.context("a load worker panicked")?;
        latency.add(&s.latency).expect("same histogram bounds");
        lag.add(&s.lag).expect("same histogram bounds");
        for (o, n) in s.outcomes {
            *outcomes.entry(o).or_default() += n;
        }
        for (o, n) in s.outside {
            *outside.entry(o).or_default() += n;
        }
    }
    let (first, last) = match (sampler, first_of_requests) {
        (Some(t), _) => t
            .join()
            .map_err(|_| anyhow::anyhow!("the sampler thread panicked"))?,
        (None, Some(first)) => (first, sample(server_pid)),
        (None, None) => unreachable!("either a window end or --requests"),
    };
    let memory = server_pid.and_then(|p| procfs::memory(&p.to_string()));
    let metrics = match (&args.metrics_url, before) {
        (Some(url), Some((d0, _))) => {
            // The sidecar copies its cache counters into /metrics every 200 ms.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (d1, backend) = scrape(url).await?;
            let decisions = d1
                .iter()
                .map(|(k, v)| (k.clone(), (v - d0.get(k).copied().unwrap_or(0.0)) as u64))
                .filter(|(_, v)| *v > 0)
                .collect();
            Some(MetricsSample { decisions, backend })
        }
        _ => None,
    };

    let window_s = (last.at - first.at).as_secs_f64().max(1e-9);
    let errors: u64 = outcomes
        .iter()
        .filter(|(o, _)| o.is_error())
        .map(|(_, n)| n)
        .sum();
    let answers: u64 = outcomes.values().sum::<u64>() - errors;
    let any = args.expect.iter().any(|e| e == "any");
    let unexpected: u64 = outcomes
        .iter()
        .chain(outside.iter())
        .filter(|(o, _)| o.is_error() || !(any || args.expect.contains(&o.label())))
        .map(|(_, n)| n)
        .sum();
    let per_check = |cpu: f64| (answers > 0).then(|| cpu * 1e6 / answers as f64);
    let delta = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
    let server_cpu = delta(first.server_cpu, last.server_cpu);
    let client_cpu = delta(first.client_cpu, last.client_cpu);
    let busy = delta(first.machine_busy, last.machine_busy);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let machine_cpus = procfs_cpus().unwrap_or(cpus);
    Ok(Summary {
        tags,
        target: args.target.clone(),
        mode: if args.rate.is_some() {
            "rate"
        } else {
            "closed"
        }
        .into(),
        offered_rate: args.rate,
        connections: args.connections,
        concurrency: args.concurrency,
        window_s,
        answers,
        errors,
        rps: answers as f64 / window_s,
        latency_us: latency_of(&latency),
        outcomes: labelled(&outcomes),
        warmup_outcomes: labelled(&outside),
        expect: args.expect.clone(),
        unexpected,
        send_lag_us: args.rate.map(|_| latency_of(&lag)),
        server: match (server_pid, server_cpu, memory) {
            (Some(pid), Some(cpu_s), Some(memory)) => Some(ServerSample {
                pid,
                cpu_s,
                cpu_us_per_check: per_check(cpu_s),
                memory,
            }),
            (Some(pid), _, _) => bail!("server pid {pid} is gone (or /proc unreadable)"),
            _ => None,
        },
        client_cpu_s: client_cpu,
        client_cpu_us_per_check: client_cpu.and_then(per_check),
        other_cpu_s: busy
            .map(|b| (b - server_cpu.unwrap_or(0.0) - client_cpu.unwrap_or(0.0)).max(0.0)),
        machine_cpu_s: window_s * machine_cpus,
        load_average: procfs::load_average(),
        metrics,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    })
}

/// CPUs of the machine (not of this process's affinity mask): the denominator of other_cpu_s.
fn procfs_cpus() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let n = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    (n > 0).then_some(n as f64)
}

fn describe(s: &Summary) -> String {
    let tags: Vec<String> = s.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let shape = match s.offered_rate {
        Some(r) => format!("rate {r:.0}/s"),
        None => "closed".into(),
    };
    let l = &s.latency_us;
    let mut line = format!(
        "[authz-bench] {} {shape} {}x{}: {:.0} rps, latency µs p50 {:.0} p99 {:.0} p99.9 {:.0} max {:.0}; answers {:?}",
        tags.join(" "),
        s.connections,
        s.concurrency,
        s.rps,
        l.p50,
        l.p99,
        l.p999,
        l.max,
        s.outcomes
    );
    if s.errors > 0 || s.unexpected > 0 {
        line += &format!("; ERRORS {} UNEXPECTED {}", s.errors, s.unexpected);
    }
    if let Some(sv) = &s.server {
        line += &format!(
            "; server {} µs CPU/check, RSS {} KiB (peak {})",
            sv.cpu_us_per_check
                .map_or("-".into(), |c| format!("{c:.1}")),
            sv.memory.rss_kib,
            sv.memory.hwm_kib
        );
    }
    if let Some(c) = s.client_cpu_us_per_check {
        line += &format!("; client {c:.1} µs/check");
    }
    if let Some(o) = s.other_cpu_s {
        line += &format!("; other CPU {o:.1} of {:.0} s", s.machine_cpu_s);
    }
    line
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    let summary = runtime.block_on(run(&args))?;
    let line = serde_json::to_string(&summary)?;
    eprintln!("{}", describe(&summary));
    if let Some(path) = &args.json {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("--json {}", path.display()))?;
        writeln!(f, "{line}")?;
    }
    println!("{line}");
    if summary.unexpected > 0 {
        eprintln!(
            "[authz-bench] {} answers were not {:?} (errors included): the run did not measure what it was built for",
            summary.unexpected, summary.expect
        );
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(path: &str, weight: u32) -> Spec {
        Spec {
            method: "GET".into(),
            path: path.into(),
            host: None,
            headers: BTreeMap::from([("x-n".to_string(), "v{n}".to_string())]),
            body: String::new(),
            weight,
        }
    }

    fn http(r: &CheckRequest) -> &attribute_context::HttpRequest {
        r.attributes
            .as_ref()
            .unwrap()
            .request
            .as_ref()
            .unwrap()
            .http
            .as_ref()
            .unwrap()
    }

    #[test]
    fn request_numbers_fill_the_templates_and_the_pseudo_path_follows() {
        let r = Requests::new(vec![spec("/tools/t{n}/execute", 1)], "app.local", vec![]).unwrap();
        let req = r.build(42);
        let h = http(&req);
        assert_eq!(h.path, "/tools/t42/execute");
        assert_eq!(h.headers[":path"], "/tools/t42/execute");
        assert_eq!(h.headers["x-n"], "v42");
        assert_eq!(h.headers["x-request-id"], "bench-42");
        assert_eq!(h.headers[":authority"], "app.local");
        assert_eq!(h.id, "42");
    }

    #[test]
    fn weights_are_sent_in_turn() {
        let r = Requests::new(vec![spec("/a", 2), spec("/b", 1)], "h", vec![]).unwrap();
        let paths: Vec<String> = (0..6).map(|n| http(&r.build(n)).path.clone()).collect();
        assert_eq!(paths, ["/a", "/b", "/a", "/a", "/b", "/a"]);
    }

    #[test]
    fn minted_tokens_are_used_in_turn() {
        let r = Requests::new(vec![spec("/a", 1)], "h", vec!["t0".into(), "t1".into()]).unwrap();
        assert_eq!(http(&r.build(0)).headers["authorization"], "Bearer t0");
        assert_eq!(http(&r.build(3)).headers["authorization"], "Bearer t1");
    }

    #[test]
    fn answers_are_classified_by_what_envoy_would_do() {
        use authz_sidecar::proto::pb::envoy::service::auth::v3::{
            DeniedHttpResponse, OkHttpResponse,
        };
        use authz_sidecar::proto::pb::envoy::r#type::v3::HttpStatus;
        let ok = CheckResponse {
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
            ..Default::default()
        };
        let denied = CheckResponse {
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus { code: 401 }),
                ..Default::default()
            })),
            ..Default::default()
        };
        assert_eq!(Outcome::of(&ok).label(), "allow");
        assert_eq!(Outcome::of(&denied).label(), "deny:401");
        assert_eq!(
            Outcome::Rpc(tonic::Code::Unavailable).label(),
            "rpc:Unavailable"
        );
        assert!(Outcome::Timeout.is_error() && !Outcome::of(&denied).is_error());
    }

    #[test]
    fn metrics_are_read_by_label() {
        let text = "# HELP x\n\
            authz_sidecar_decisions_total{decision=\"allow\",code=\"ok\",credential=\"jwt\"} 12\n\
            authz_sidecar_backend{name=\"cache_size\"} 100000\n\
            other_metric 3\n";
        let (d, b) = parse_metrics(text);
        assert_eq!(d["allow/ok/jwt"], 12.0);
        assert_eq!(b["cache_size"], 100000.0);
        assert_eq!(d.len() + b.len(), 2);

        let text = "authz_sidecar_decisions_total{decision=\"allow\",status=\"200\",error=\"none\",credential=\"jwt\",rule=\"a\"} 12\n\
            authz_sidecar_decisions_total{decision=\"allow\",status=\"200\",error=\"none\",credential=\"jwt\",rule=\"b\"} 3\n\
            authz_sidecar_decision_cache_hits_total 7\n\
            authz_sidecar_decision_cache_entries 100000\n\
            authz_sidecar_openfga_requests_total{endpoint=\"check\",outcome=\"ok\"} 4\n\
            authz_sidecar_openfga_requests_total{endpoint=\"check\",outcome=\"timeout\"} 1\n\
            authz_sidecar_openfga_requests_total{endpoint=\"read_changes\",outcome=\"ok\"} 9\n";
        let (d, b) = parse_metrics(text);
        assert_eq!(d["allow/ok/jwt"], 15.0, "summed over rules");
        assert_eq!(b["cache_hits"], 7.0);
        assert_eq!(b["cache_size"], 100000.0);
        assert_eq!(
            b["openfga_requests"], 5.0,
            "check calls, whatever the outcome"
        );
    }
}
