//! Logs and metrics: the tracing subscriber (text or JSON, `LOG_LEVEL`/`RUST_LOG`), the text
//! log's field formatter ([`LogFields`]: no value can forge a line), and the Prometheus
//! registry served on the ops listener at `/metrics` ([`Metrics`]; the backends' figures are
//! read when scraped by `backends`, the two text formats are in [`exposition`]).

mod backends;
pub mod exposition;
mod json_line;

use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::Writer;

use crate::config::{DecisionLogMode, LogConfig};
use crate::decision::Decision;
use crate::pipeline::Policy;
use crate::state::State;

/// Installs the global subscriber: the log, and the trace export when `tracing` is set (see
/// [`crate::tracing_export`]). Safe to call twice (tests): the second call is a no-op. An
/// error says why the exporter could not be built.
///
/// Lines go to stdout through tracing-appender's non-blocking writer: a check formats its
/// decision line and hands it to a writer thread instead of writing to stdout itself (one
/// `write` per batch of lines under load, not one per line). With `lossy(false)` a full
/// buffer makes the caller wait rather than drop a line. The buffer holds 16 384 lines (a
/// second of a busy sidecar's decisions): tracing-appender's default of 128 000 is a channel
/// allocated whole up front, +4.5 MiB of RSS. The returned guard flushes what is buffered
/// when dropped: hold it until the process ends.
pub fn init_logging(
    cfg: &LogConfig,
    tracing: Option<&crate::config::TracingConfig>,
) -> Result<tracing_appender::non_blocking::WorkerGuard, String> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let export = crate::tracing_export::layer(tracing)?;
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(16_384)
        .thread_name("log-writer")
        // Buffered: the writer thread writes every line queued meanwhile in one go, and
        // flushes whenever the queue is empty (so a quiet sidecar's lines are not held back).
        .finish(std::io::BufWriter::new(std::io::stdout()));
    let log = log_layer(cfg, writer);
    // Without export the log is the only layer: the spans' callsites stay disabled.
    let _ = match export {
        Some(export) => tracing_subscriber::registry()
            .with(log)
            .with(export)
            .try_init(),
        None => tracing_subscriber::registry().with(log).try_init(),
    };
    Ok(guard)
}

/// The log: text or JSON lines to `writer`, filtered by `LOG_LEVEL`/`RUST_LOG`, never showing
/// the exported spans ([`crate::tracing_export::LOG_DIRECTIVE`]), so no line changes shape
/// when export is on.
pub(crate) fn log_layer<S, W>(
    cfg: &LogConfig,
    writer: W,
) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        .add_directive(
            crate::tracing_export::LOG_DIRECTIVE
                .parse()
                .expect("a valid directive"),
        );
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    // JSON escapes every string itself; the text format needs LogFields. The JSON line is
    // written by `JsonLine`, the same bytes as the stock format at a third of the instructions.
    if cfg.json {
        fmt.json()
            .flatten_event(true)
            .map_event_format(|stock| {
                json_line::JsonLine::new(tracing_subscriber::fmt::time::SystemTime, stock)
            })
            .with_filter(filter)
            .boxed()
    } else {
        fmt.fmt_fields(LogFields).with_filter(filter).boxed()
    }
}

/// The text log's field formatter, in place of tracing-subscriber's default: the message
/// first, then `name=value`. Request paths, ids, `kid`s, origins and reasons are the client's
/// text, so the invariant is kept here, for every field of every event and span:
/// **a value never ends the line nor poses as another field.** String values are written
/// quoted with escapes (`reason="kid=a\ndecision=\"allow\""`), as the default formatter
/// does; other values (`%` and `?` fields) bare when they are one plain token, else quoted the
/// same way; the message has its control characters escaped.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogFields;

impl<'a> MakeVisitor<Writer<'a>> for LogFields {
    type Visitor = LogVisitor<'a>;

    fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
        LogVisitor {
            writer: target,
            empty: true,
            result: Ok(()),
        }
    }
}

pub struct LogVisitor<'a> {
    writer: Writer<'a>,
    empty: bool,
    result: fmt::Result,
}

/// Characters that could end a log line or fool a reader: C0/C1 controls, DEL, and the
/// Unicode line and paragraph separators.
fn breaks_lines(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if breaks_lines(c) => {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
        c => out.push(c),
    }
}

/// The escaping below goes char by char; most values (ids, paths, rule names) have nothing
/// to escape, and this says so from the bytes alone. `false` only when every byte is
/// printable ASCII other than `"` and `\`: a non-ASCII byte (C1 controls, U+2028 and U+2029
/// are multi-byte) always takes the careful path, so the fast path keeps the invariant.
fn needs_escaping(value: &str) -> bool {
    value
        .bytes()
        .any(|b| !(0x20..0x7f).contains(&b) || b == b'"' || b == b'\\')
}

/// The message's counterpart of [`needs_escaping`]: only line-breaking characters are escaped
/// there, so quotes and backslashes pass.
fn message_needs_escaping(value: &str) -> bool {
    value.bytes().any(|b| !(0x20..0x7f).contains(&b))
}

/// `value` quoted, every character that could end the line or the quotes escaped.
fn quoted_by_chars(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => push_escaped(&mut out, c),
        }
    }
    out.push('"');
    out
}

/// [`quoted_by_chars`], written straight through when there is nothing to escape.
fn write_quoted(w: &mut impl fmt::Write, value: &str) -> fmt::Result {
    if needs_escaping(value) {
        return w.write_str(&quoted_by_chars(value));
    }
    w.write_char('"')?;
    w.write_str(value)?;
    w.write_char('"')
}

fn is_plain_token_by_chars(value: &str) -> bool {
    !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || breaks_lines(c) || matches!(c, '"' | '\\'))
}

/// [`is_plain_token_by_chars`], from the bytes when the value is printable ASCII.
fn is_plain_token(value: &str) -> bool {
    if needs_escaping(value) {
        return is_plain_token_by_chars(value);
    }
    // Printable ASCII without quotes or backslashes: the one whitespace left is the space.
    !value.is_empty() && !value.contains(' ')
}

impl LogVisitor<'_> {
    fn write(&mut self, field: &Field, value: &str, always_quote: bool) {
        if self.result.is_err() {
            return;
        }
        if !self.empty {
            self.result = self.writer.write_char(' ');
        }
        self.empty = false;
        let name = field.name();
        self.result = self.result.and_then(|()| {
            if name == "message" {
                if !message_needs_escaping(value) {
                    return self.writer.write_str(value);
                }
                let mut out = String::with_capacity(value.len());
                value.chars().for_each(|c| push_escaped(&mut out, c));
                self.writer.write_str(&out)
            } else {
                let name = name.strip_prefix("r#").unwrap_or(name);
                self.writer.write_str(name)?;
                self.writer.write_char('=')?;
                if always_quote || !is_plain_token(value) {
                    write_quoted(&mut self.writer, value)
                } else {
                    self.writer.write_str(value)
                }
            }
        });
    }

    /// A number is always one plain token: written as is, without a `String` in between.
    fn write_number(&mut self, field: &Field, value: impl fmt::Display) {
        if self.result.is_err() {
            return;
        }
        let separator = if self.empty { "" } else { " " };
        self.empty = false;
        let name = field.name();
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.result = write!(self.writer, "{separator}{name}={value}");
    }
}

impl Visit for LogVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.write(field, value, true);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.write_number(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.write_number(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, &format!("{value:?}"), false);
    }
}

impl VisitOutput<fmt::Result> for LogVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for LogVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// One check's id: 16 hex digits, in its decision line, its deny body and Envoy's dynamic
/// metadata, so the three can be joined. 64 random bits from the thread's RNG (a few ns, no
/// lock): unique in practice across checks, restarts and replicas, and plain `[0-9a-f]`, so
/// it is safe in any log or header. It says nothing about the request (no time, no count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecisionId(u64);

impl DecisionId {
    pub fn new() -> Self {
        Self(rand::random())
    }
}

impl Default for DecisionId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for DecisionId {
    /// `{:016x}`, without the formatting machinery (written on every check, twice when
    /// logged).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut digits = [0u8; 16];
        hex::encode_to_slice(self.0.to_be_bytes(), &mut digits).map_err(|_| fmt::Error)?;
        f.write_str(std::str::from_utf8(&digits).map_err(|_| fmt::Error)?)
    }
}

/// Which checks get a decision line (`log.decisions`, `log.allow_sample`). Invariant: a
/// deny is logged unless the mode is `none`; an allow is logged under `all` when its id
/// falls in the sampled fraction (the id is uniformly random, so no second RNG call is
/// needed, and which allows are kept does not depend on the traffic's order).
#[derive(Debug, Clone, Copy)]
pub struct DecisionLog {
    mode: DecisionLogMode,
    /// Allows with an id below this are logged; `None`: every allow.
    allow_below: Option<u64>,
}

impl Default for DecisionLog {
    /// Every decision: the default config's choice.
    fn default() -> Self {
        Self {
            mode: DecisionLogMode::All,
            allow_below: None,
        }
    }
}

impl DecisionLog {
    pub fn new(cfg: &LogConfig) -> Self {
        let allow_below = (cfg.allow_sample < 1.0)
            // `as` saturates: 0.0 gives 0 (no allow), 0.5 gives 2^63.
            .then(|| (cfg.allow_sample.max(0.0) * 18_446_744_073_709_551_616.0) as u64);
        Self {
            mode: cfg.decisions,
            allow_below,
        }
    }

    /// Whether the check `id` that was decided `allowed` gets a line.
    pub fn logs(&self, allowed: bool, id: DecisionId) -> bool {
        match (self.mode, allowed) {
            (DecisionLogMode::None, _) => false,
            (_, false) => true,
            (DecisionLogMode::Deny, true) => false,
            (DecisionLogMode::All, true) => self.allow_below.is_none_or(|below| id.0 < below),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub decision: &'static str,
    /// The HTTP status the caller gets: 200 for an allow (a preflight's own status), the
    /// deny's status otherwise.
    pub status: u16,
    /// The deny's machine-readable code (`invalid_token`, `forbidden`, ...); `none` for an
    /// allow, `failed_open` for an allow after a backend error.
    pub error: &'static str,
    /// How the caller authenticated: `jwt`, `api_key` or `none` (not the HTTP method).
    pub credential: &'static str,
    /// The rule that decided ([`rule_label`]): bounded by the config.
    pub rule: String,
}

/// `result="ok"` or `result="error"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// A shadow rule's (or the dry run's) outcome: the rule's name (bounded: the config's rule
/// names) and `would_allow`, `would_deny` or `would_error`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShadowLabels {
    pub rule: String,
    pub outcome: &'static str,
}

/// `version` and, when the build knew it, `commit`.
type BuildLabels = Vec<(&'static str, &'static str)>;

/// The sidecar's metrics: what the check path records ([`Metrics::record`]) and, once
/// [`Metrics::watch_backends`] ran, the backends' own figures, read when scraped. Metric
/// names are conventional: `_total` counters, `_seconds` in seconds, HELP saying what is
/// counted.
pub struct Metrics {
    pub registry: std::sync::Mutex<Registry>,
    pub decisions: Family<DecisionLabels, Counter>,
    pub check_seconds: Histogram,
    pub failed_open: Counter,
    pub ready: Gauge,
    /// Config reloads by result (`authz_sidecar_config_reloads_total`).
    pub config_reloads: Family<ResultLabel, Counter>,
    /// Unix time of the last config that was applied, the startup one included.
    pub config_last_success: Gauge,
    /// 1 when the last reload applied, 0 when it was refused (the old config still serves).
    pub config_last_ok: Gauge,
    /// What shadow rules would have answered (`authz_sidecar_shadow_decisions_total`).
    pub shadow_decisions: Family<ShadowLabels, Counter>,
    /// Denies the dry run answered with an allow (`authz_sidecar_dry_run_decisions_total`).
    pub dry_run_decisions: Family<ShadowLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("authz_sidecar");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Check decisions by decision, HTTP status, error code, credential kind (jwt, api_key, none) and the rule that decided",
            decisions.clone(),
        );
        let check_seconds = Histogram::new([
            0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
            0.25, 0.5, 1.0,
        ]);
        registry.register(
            "check_duration_seconds",
            "Time to decide one check, from the request's arrival to the answer",
            check_seconds.clone(),
        );
        let failed_open = Counter::default();
        registry.register(
            "failed_open",
            "Requests allowed because the rule fails open on a backend error",
            failed_open.clone(),
        );
        let ready = Gauge::default();
        registry.register("ready", "1 when every backend is ready", ready.clone());
        let config_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads (file change or SIGHUP) by result: ok (applied) or error (refused, the running config kept)",
            config_reloads.clone(),
        );
        let config_last_success = Gauge::default();
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "Unix time the running config was applied (at startup or by the last successful reload)",
            config_last_success.clone(),
        );
        let config_last_ok = Gauge::default();
        registry.register(
            "config_last_reload_successful",
            "1 when the last reload applied (or none was tried), 0 when it was refused",
            config_last_ok.clone(),
        );
        config_last_ok.set(1);
        // Both results exported from the start, so a rate or an alert has a series to read.
        for result in ["ok", "error"] {
            let _ = config_reloads.get_or_create(&ResultLabel { result });
        }
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info.get_or_create(&build_labels()).set(1);
        registry.register(
            "build_info",
            "Always 1, labelled with the running build: version, and git commit when the build knew it (AUTHZ_GIT_COMMIT)",
            build_info,
        );
        let shadow_decisions = Family::<ShadowLabels, Counter>::default();
        registry.register(
            "shadow_decisions",
            "What shadow rules (mode: shadow) would have answered, by rule and outcome (would_allow, would_deny, would_error); never the answer given",
            shadow_decisions.clone(),
        );
        let dry_run_decisions = Family::<ShadowLabels, Counter>::default();
        registry.register(
            "dry_run_decisions",
            "Policy denies (401/403) that routes.dry_run answered with an allow, by governing rule (outcome would_deny)",
            dry_run_decisions.clone(),
        );
        Arc::new(Self {
            registry: std::sync::Mutex::new(registry),
            decisions,
            check_seconds,
            failed_open,
            ready,
            config_reloads,
            config_last_success,
            config_last_ok,
            shadow_decisions,
            dry_run_decisions,
        })
    }

    /// Exports the backends' figures: OpenFGA calls (counted and timed by the client as
    /// they happen) and everything read when scraped (`backends::BackendCollector`: the
    /// decision cache, the breaker, signing keys, API keys). Nothing is copied on a timer.
    pub fn watch_backends(&self, state: &Arc<State>) {
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if state.backends.checker.is_some() {
            let requests = &state.backends.openfga_requests;
            registry.register(
                "openfga_requests",
                "OpenFGA HTTP API calls by endpoint (check, batch_check, read_changes, ...) and outcome (ok, timeout, connect_error, transport_error, invalid_response, unavailable, unauthorized, rejected)",
                requests.requests.clone(),
            );
            registry.register(
                "openfga_request_duration_seconds",
                "Time of one OpenFGA HTTP API call by endpoint, the stale-connection retry included",
                requests.duration.clone(),
            );
        }
        registry.register_collector(Box::new(backends::BackendCollector::new(state.clone())));
    }

    /// A check's shadow outcomes and dry-run relaxation, if any.
    pub fn record_shadow(
        &self,
        shadow: &[crate::pipeline::ShadowOutcome],
        dry_run: Option<&crate::decision::Deny>,
    ) {
        for o in shadow {
            self.shadow_decisions
                .get_or_create(&ShadowLabels {
                    rule: o.rule.clone(),
                    outcome: o.outcome.as_str(),
                })
                .inc();
        }
        if let Some(d) = dry_run {
            self.dry_run_decisions
                .get_or_create(&ShadowLabels {
                    rule: d.rule.clone().unwrap_or_else(|| "unmatched".into()),
                    outcome: "would_deny",
                })
                .inc();
        }
    }

    /// One reload's result; `now` is the Unix time it was applied (for an `ok`).
    pub fn record_reload(&self, ok: bool, now: u64) {
        let result = if ok { "ok" } else { "error" };
        self.config_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
        self.config_last_ok.set(i64::from(ok));
        if ok {
            self.config_last_success
                .set(i64::try_from(now).unwrap_or(i64::MAX));
        }
    }

    /// One check: its decision (under `policy`, which names the rules) and how long it took.
    pub fn record(&self, policy: &Policy, decision: &Decision, elapsed: Duration) {
        let (decision_label, status, error, principal, rule) = match decision {
            Decision::Allow(a) => {
                let error = if a.failed_open.is_some() {
                    self.failed_open.inc();
                    "failed_open"
                } else {
                    "none"
                };
                let status = a.local_reply.unwrap_or(200);
                let rule = Some(a.rule.as_str());
                ("allow", status, error, a.principal.as_ref(), rule)
            }
            Decision::Deny(d) => (
                "deny",
                d.http_status,
                d.error,
                d.principal.as_ref(),
                d.rule.as_deref(),
            ),
        };
        self.decisions
            .get_or_create(&DecisionLabels {
                decision: decision_label,
                status,
                error,
                credential: principal.map_or("none", |p| p.method.as_str()),
                rule: rule_label(policy, rule).to_string(),
            })
            .inc();
        self.check_seconds.observe(elapsed.as_secs_f64());
    }

    /// OpenMetrics text (`application/openmetrics-text`), as prometheus-client writes it.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    /// The Prometheus text format (`text/plain; version=0.0.4`), for a scraper or a person
    /// that does not ask for OpenMetrics ([`exposition::to_prometheus_text`]).
    pub fn encode_text(&self) -> String {
        exposition::to_prometheus_text(&self.encode())
    }
}

/// The `rule` label of a decision: one of `policy`'s rule names, or a fixed value: `none`
/// (no rule decided), `batch` (a JSON-RPC batch whose elements different rules governed),
/// `unmatched` (the unmatched policy decided), `cors-preflight`, `other` (anything else).
/// Never text from the request, so the number of series is bounded by the config.
pub fn rule_label<'a>(policy: &'a Policy, rule: Option<&'a str>) -> &'a str {
    match rule {
        None | Some("") => "none",
        Some(r) if r.contains(',') => "batch",
        Some(r @ ("unmatched" | "cors-preflight")) => r,
        Some(r) if policy.rules.rules().iter().any(|known| known.name == r) => r,
        Some(_) => "other",
    }
}

fn build_labels() -> BuildLabels {
    let mut labels = vec![("version", env!("CARGO_PKG_VERSION"))];
    // Set by build.rs from AUTHZ_GIT_COMMIT (or CI's GITHUB_SHA) when the build had one.
    if let Some(commit) = option_env!("AUTHZ_BUILD_COMMIT") {
        labels.push(("commit", commit));
    }
    labels
}

/// A log writer for tests: everything written to it, shared with the test.
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct Capture(pub(crate) Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte checks only ever skip work the careful path would not have done: for every
    /// character (alone and between letters), a value said to need no escaping comes out of
    /// the careful path unchanged, and the fast plain-token answer is the careful one.
    #[test]
    fn the_fast_path_writes_only_what_the_careful_path_would() {
        for c in (0..=0x10_ffff_u32).filter_map(char::from_u32) {
            for value in [c.to_string(), format!("a{c}b")] {
                if !needs_escaping(&value) {
                    assert_eq!(quoted_by_chars(&value), format!("\"{value}\""), "{c:?}");
                }
                if !message_needs_escaping(&value) {
                    assert!(!value.chars().any(breaks_lines), "{c:?}");
                }
                assert_eq!(
                    is_plain_token(&value),
                    is_plain_token_by_chars(&value),
                    "{c:?}"
                );
            }
        }
        assert!(!is_plain_token(""));
        let mut fast = String::new();
        write_quoted(&mut fast, "a\"b\\c\nd").unwrap();
        assert_eq!(fast, "\"a\\\"b\\\\c\\nd\"");
    }

    /// Every event becomes exactly one line, whatever its values hold, and each value reads
    /// back as written.
    #[test]
    fn client_text_cannot_forge_a_log_line() {
        crate::tracing_export::per_thread_subscribers();
        let forged = "decision=\"allow\" subject=\"user:admin\"";
        let cases: Vec<(String, &str)> = vec![
            (format!("/api/x\r\n{forged}"), "path=\"/api/x\\r\\n"),
            (format!("kid\n{forged}"), "\\n"),
            (format!("a\u{2028}{forged}"), "\\u{2028}"),
            (format!("a\u{85}{forged}"), "\\u{85}"),
            ("esc\u{1b}[31m".to_string(), "\\u{1b}[31m"),
            ("/plain/path".into(), "path=/plain/path "),
            ("with space".into(), "path=\"with space\""),
        ];
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(LogFields)
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .without_time()
            .with_target(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for (value, _) in &cases {
                tracing::info!(
                    decision = "deny",
                    path = %value,
                    reason = %format!("signing key kid={value} not found"),
                    subject = value.as_str(),
                    origin = ?value,
                    "check"
                );
            }
            for (value, _) in &cases {
                tracing::warn!("message {value}");
            }
        });
        let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2 * cases.len(), "one line per event:\n{text}");
        for (line, (value, want)) in lines.iter().zip(&cases) {
            assert!(
                line.trim_start().starts_with("INFO check "),
                "{value:?} forged a line: {line}"
            );
            assert!(
                line.contains(want),
                "{value:?}: {line} should contain {want}"
            );
            assert_eq!(
                outside_quotes(line).matches("decision=").count(),
                1,
                "{value:?} posed as a field: {line}"
            );
        }
        for (line, (value, _)) in lines[cases.len()..].iter().zip(&cases) {
            assert!(
                line.trim_start().starts_with("WARN message "),
                "{value:?} forged a line: {line}"
            );
        }
    }

    fn decisions_policy() -> Policy {
        let config = crate::Config::from_yaml(
            "jwt: { jwks_file: k }\nroutes: { rules: [ { name: api, path: \"/api/**\" }, { name: docs, path: /docs } ] }\n",
            std::path::Path::new("/"),
            &std::collections::BTreeMap::new(),
        )
        .unwrap();
        let backends = crate::state::Backends::none();
        crate::state::policy(&config, &backends).unwrap()
    }

    fn allow(rule: &str, failed_open: bool) -> Decision {
        use crate::authn::{AuthMethod, Principal, PrincipalKind};
        Decision::Allow(crate::decision::Allow {
            principal: Some(Principal::new(PrincipalKind::User, "a", AuthMethod::Jwt).into()),
            rule: rule.into(),
            failed_open: failed_open.then(|| "OpenFGA down".into()),
            response_headers: Vec::new(),
            relations: Vec::new(),
            local_reply: None,
        })
    }

    /// The rule label is one of the config's rule names or a fixed value, whatever string a
    /// decision carries; a deny keeps its status and code.
    #[test]
    fn decisions_are_counted_by_bounded_labels() {
        let policy = decisions_policy();
        let metrics = Metrics::new();
        let second = Duration::from_millis(1);
        metrics.record(&policy, &allow("api", false), second);
        metrics.record(&policy, &allow("api", false), second);
        metrics.record(&policy, &allow("api,docs", false), second);
        metrics.record(&policy, &allow("/api/secret?token=x", false), second);
        metrics.record(&policy, &allow("docs", true), second);
        let deny = crate::decision::deny(
            &crate::decision::Failure::Authn(crate::authn::AuthnError::Missing {
                api_key_header: "x-api-key".into(),
            }),
            "realm",
            crate::decision::Context::default(),
        );
        metrics.record(&policy, &Decision::Deny(deny), second);
        let text = metrics.encode_text();
        for (series, want) in [
            (
                r#"decision="allow",status="200",error="none",credential="jwt",rule="api""#,
                2,
            ),
            (
                r#"decision="allow",status="200",error="none",credential="jwt",rule="batch""#,
                1,
            ),
            (
                r#"decision="allow",status="200",error="none",credential="jwt",rule="other""#,
                1,
            ),
            (
                r#"decision="allow",status="200",error="failed_open",credential="jwt",rule="docs""#,
                1,
            ),
            (
                r#"decision="deny",status="401",error="unauthenticated",credential="none",rule="none""#,
                1,
            ),
        ] {
            let line = format!("authz_sidecar_decisions_total{{{series}}} {want}");
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(
            !text.contains("secret"),
            "request text never becomes a label"
        );
        assert!(text.contains("authz_sidecar_failed_open_total 1"));
        assert!(text.contains("authz_sidecar_check_duration_seconds_count 6"));
        let build = text
            .lines()
            .find(|l| l.starts_with("authz_sidecar_build_info{"))
            .unwrap();
        let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
        match option_env!("AUTHZ_BUILD_COMMIT") {
            Some(commit) => assert_eq!(
                build,
                format!("authz_sidecar_build_info{{{version},commit=\"{commit}\"}} 1")
            ),
            None => assert_eq!(build, format!("authz_sidecar_build_info{{{version}}} 1")),
        }
    }

    fn log_settings(filter: &str, json: bool) -> LogConfig {
        LogConfig {
            filter: filter.into(),
            json,
            decisions: DecisionLogMode::All,
            allow_sample: 1.0,
        }
    }

    /// Opens a check span at the export target with an event inside, as a check does.
    fn a_check_span() -> tracing::Span {
        let span = tracing::info_span!(
            target: crate::tracing_export::TARGET,
            "check",
            request_id = "r-1"
        );
        span.in_scope(|| tracing::info!(decision = "allow", "check"));
        span
    }

    /// Without export, even at LOG_LEVEL=trace, the log's subscriber is not interested in the
    /// spans' callsites (so a process with only this subscriber caches them as disabled: their
    /// fields are never evaluated), and no line names them.
    #[test]
    fn without_export_the_spans_are_disabled_and_absent_from_the_log() {
        use tracing::Subscriber as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        crate::tracing_export::per_thread_subscribers();
        // The check span's callsite, as an exporting subscriber sees it.
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let exporting =
            tracing_subscriber::registry().with(crate::tracing_export::export_layer(&provider));
        let meta = tracing::subscriber::with_default(exporting, a_check_span)
            .metadata()
            .expect("exported");
        for json in [false, true] {
            let capture = Capture::default();
            let writer = capture.clone();
            let log_only = tracing_subscriber::registry()
                .with(log_layer(&log_settings("trace", json), move || {
                    writer.clone()
                }));
            assert!(log_only.register_callsite(meta).is_never(), "json={json}");
            tracing::subscriber::with_default(log_only, a_check_span);
            let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
            assert_eq!(text.lines().count(), 1, "{text}");
            assert!(!text.contains("r-1"), "the span shows in the log: {text}");
        }
    }

    /// With export on, the span is live (exported) and the log lines are the same as without:
    /// no `check{..}:` prefix in text, no `span`/`spans` keys in JSON.
    #[test]
    fn with_export_the_log_lines_keep_their_shape() {
        use tracing_subscriber::layer::SubscriberExt as _;
        crate::tracing_export::per_thread_subscribers();
        for json in [false, true] {
            let spans = opentelemetry_sdk::trace::InMemorySpanExporter::default();
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_simple_exporter(spans.clone())
                .build();
            let capture = Capture::default();
            let writer = capture.clone();
            let subscriber = tracing_subscriber::registry()
                .with(log_layer(&log_settings("info", json), move || {
                    writer.clone()
                }))
                .with(crate::tracing_export::export_layer(&provider));
            let span = tracing::subscriber::with_default(subscriber, a_check_span);
            assert!(!span.is_disabled(), "json={json}");
            drop(span);
            let exported = spans.get_finished_spans().unwrap();
            assert_eq!(exported.len(), 1, "json={json}: the check span is exported");
            let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
            assert_eq!(text.lines().count(), 1, "{text}");
            assert!(!text.contains("r-1"), "the span shows in the log: {text}");
            if json {
                let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
                assert!(
                    line.get("span").is_none() && line.get("spans").is_none(),
                    "{line}"
                );
                assert_eq!(line["decision"], "allow");
            } else {
                assert!(text.contains(" INFO check decision=\"allow\""), "{text}");
            }
        }
    }

    /// The line without its quoted values (escapes honoured): what a logfmt reader takes for
    /// field names.
    fn outside_quotes(line: &str) -> String {
        let (mut out, mut inside, mut escaped) = (String::new(), false, false);
        for c in line.chars() {
            match (inside, escaped, c) {
                (true, true, _) => escaped = false,
                (true, false, '\\') => escaped = true,
                (_, _, '"') => inside = !inside,
                (false, _, c) => out.push(c),
                _ => {}
            }
        }
        out
    }

    fn log_config(decisions: DecisionLogMode, allow_sample: f64) -> LogConfig {
        LogConfig {
            filter: "info".into(),
            json: true,
            decisions,
            allow_sample,
        }
    }

    /// How many of `n` allows and of `n` denies `log` keeps.
    fn kept(log: DecisionLog, n: usize) -> (usize, usize) {
        let ids: Vec<DecisionId> = (0..n).map(|_| DecisionId::new()).collect();
        (
            ids.iter().filter(|id| log.logs(true, **id)).count(),
            ids.iter().filter(|id| log.logs(false, **id)).count(),
        )
    }

    #[test]
    fn denies_are_always_logged_and_allows_as_sampled_unless_the_mode_is_none() {
        use DecisionLogMode::*;
        let n = 100_000;
        assert_eq!(kept(DecisionLog::new(&log_config(All, 1.0)), n), (n, n));
        assert_eq!(kept(DecisionLog::new(&log_config(All, 0.0)), n), (0, n));
        assert_eq!(kept(DecisionLog::new(&log_config(Deny, 1.0)), n), (0, n));
        assert_eq!(kept(DecisionLog::new(&log_config(None, 1.0)), n), (0, 0));
        let (allows, denies) = kept(DecisionLog::new(&log_config(All, 0.25)), n);
        assert_eq!(denies, n);
        let share = allows as f64 / n as f64;
        assert!(
            (0.23..0.27).contains(&share),
            "{share} of allows kept at 0.25"
        );
    }

    #[test]
    fn decision_ids_are_sixteen_hex_digits_and_do_not_repeat() {
        let ids: std::collections::HashSet<String> =
            (0..10_000).map(|_| DecisionId::new().to_string()).collect();
        assert_eq!(ids.len(), 10_000);
        for n in [0, 0xab, 0x0123_4567_89ab_cdef, u64::MAX] {
            assert_eq!(DecisionId(n).to_string(), format!("{n:016x}"));
        }
        for id in &ids {
            assert_eq!(id.len(), 16, "{id}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
        }
    }
}
