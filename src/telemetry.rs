//! Logs and metrics: the tracing subscriber (text or JSON, `LOG_LEVEL`/`RUST_LOG`) and the
//! Prometheus registry served on the ops listener at `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::config::LogConfig;

/// Installs the global subscriber. Safe to call twice (tests): the second call is a no-op.
pub fn init_logging(cfg: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let _ = if cfg.json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub decision: &'static str,
    pub code: &'static str,
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabel {
    pub name: &'static str,
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
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("authz_sidecar");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Check decisions by outcome, error code and credential method",
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
            "Backend counters: decision cache and OpenFGA client (hits, misses, coalesced, evictions, size, requests, errors)",
            backend.clone(),
        );
        Arc::new(Self {
            registry: std::sync::Mutex::new(registry),
            decisions,
            check_seconds,
            failed_open,
            ready,
            backend,
        })
    }

    pub fn record(
        &self,
        decision: &crate::decision::Decision,
        elapsed: Duration,
        method: &'static str,
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
                method,
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
