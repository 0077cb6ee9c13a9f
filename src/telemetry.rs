//! Logs and metrics: the tracing subscriber (text or JSON, `LOG_LEVEL`/`RUST_LOG`), the text
//! log's field formatter ([`LogFields`]: no value can forge a line), and the Prometheus
//! registry served on the ops listener at `/metrics`.

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

use crate::config::LogConfig;

/// Installs the global subscriber. Safe to call twice (tests): the second call is a no-op.
///
/// Lines go to stdout through tracing-appender's non-blocking writer: a check formats its
/// decision line and hands it to a writer thread instead of writing to stdout itself (one
/// `write` per batch of lines under load, not one per line). With
/// `lossy(false)` a full buffer makes the caller wait rather than drop a line. The buffer holds
/// 16 384 lines (a second of a busy sidecar's decisions): tracing-appender's default of
/// 128 000 is a channel allocated whole up front, +4.5 MiB of RSS.
/// The returned guard flushes what is buffered when dropped: hold it until the process ends.
#[must_use = "dropping the guard stops the log writer: hold it until exit"]
pub fn init_logging(cfg: &LogConfig) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(16_384)
        .thread_name("log-writer")
        // Buffered: the writer thread writes every line queued meanwhile in one go, and
        // flushes whenever the queue is empty (so a quiet sidecar's lines are not held back).
        .finish(std::io::BufWriter::new(std::io::stdout()));
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    // JSON escapes every string itself; the text format needs LogFields.
    let _ = if cfg.json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.fmt_fields(LogFields).try_init()
    };
    guard
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

fn quoted(value: &str) -> String {
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

fn is_plain_token(value: &str) -> bool {
    !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || breaks_lines(c) || matches!(c, '"' | '\\'))
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
                let mut out = String::with_capacity(value.len());
                value.chars().for_each(|c| push_escaped(&mut out, c));
                self.writer.write_str(&out)
            } else {
                let name = name.strip_prefix("r#").unwrap_or(name);
                if always_quote || !is_plain_token(value) {
                    write!(self.writer, "{name}={}", quoted(value))
                } else {
                    write!(self.writer, "{name}={value}")
                }
            }
        });
    }
}

impl Visit for LogVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.write(field, value, true);
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub decision: &'static str,
    pub code: &'static str,
    /// How the caller authenticated: `jwt`, `api_key` or `none` (not the HTTP method).
    pub credential: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabel {
    pub name: &'static str,
}

/// `result="ok"` or `result="error"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// The sidecar's metrics. Counters from backends (cache, OpenFGA client) are copied in every
/// 200 ms by the readiness loop in `server` ([`Metrics::set_backend`]), so those modules stay
/// free of the registry.
pub struct Metrics {
    pub registry: std::sync::Mutex<Registry>,
    pub decisions: Family<DecisionLabels, Counter>,
    pub check_seconds: Histogram,
    pub failed_open: Counter,
    pub ready: Gauge,
    pub backend: Family<NameLabel, Gauge>,
    /// Config reloads by result (`authz_sidecar_config_reloads_total`).
    pub config_reloads: Family<ResultLabel, Counter>,
    /// Unix time of the last config that was applied, the startup one included.
    pub config_last_success: Gauge,
    /// 1 when the last reload applied, 0 when it was refused (the old config still serves).
    pub config_last_ok: Gauge,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("authz_sidecar");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Check decisions by outcome, error code and credential kind (jwt, api_key, none)",
            decisions.clone(),
        );
        let check_seconds = Histogram::new([
            0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
            0.25, 0.5, 1.0,
        ]);
        registry.register(
            "check_duration_seconds",
            "Time to decide one check",
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
        let backend = Family::<NameLabel, Gauge>::default();
        registry.register(
            "backend",
            "Backend counters: decision cache and OpenFGA client (hits, misses, coalesced, evictions, size, requests, errors), API keys (bcrypt verifications, busy, failed-key cache hits)",
            backend.clone(),
        );
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
        Arc::new(Self {
            registry: std::sync::Mutex::new(registry),
            decisions,
            check_seconds,
            failed_open,
            ready,
            backend,
            config_reloads,
            config_last_success,
            config_last_ok,
        })
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

    pub fn record(
        &self,
        decision: &crate::decision::Decision,
        elapsed: Duration,
        credential: &'static str,
    ) {
        use crate::decision::Decision;
        let (decision, code) = match decision {
            Decision::Allow(a) if a.failed_open.is_some() => {
                self.failed_open.inc();
                ("allow", "failed_open")
            }
            Decision::Allow(_) => ("allow", "ok"),
            Decision::Deny(d) => ("deny", d.error),
        };
        self.decisions
            .get_or_create(&DecisionLabels {
                decision,
                code,
                credential,
            })
            .inc();
        self.check_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn set_backend(&self, name: &'static str, value: u64) {
        self.backend
            .get_or_create(&NameLabel { name })
            .set(i64::try_from(value).unwrap_or(i64::MAX));
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Every event becomes exactly one line, whatever its values hold, and each value reads
    /// back as written.
    #[test]
    fn client_text_cannot_forge_a_log_line() {
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
}
