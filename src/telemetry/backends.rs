//! The backends' figures, read when `/metrics` is scraped: the decision cache, the OpenFGA
//! circuit breaker, the signing keys (JWKS) and the API-key stores.
//!
//! Invariant: **each figure is read from the backend that owns it at scrape time**, from its
//! own counters (`CacheStats`, `ClientStats`, `KeySourceStats`, `ApiKeyStats`), and exported
//! with the type its meaning has: what only grows is a counter (`_total`), what goes up and
//! down is a gauge. Nothing is copied on a timer, so a scrape never reads a stale copy and the
//! backends never import telemetry. A backend not configured exports nothing; one not
//! connected yet (OpenFGA) exports its figures once it is.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::authn::api_key::{ApiKeyStats, ExchangeStats, KeyFileStats};
use crate::authn::jwks::KeySourceStats;
use crate::authz::breaker::BreakerState;
use crate::authz::cache::CacheStats;
use crate::authz::openfga::ClientStats;
use crate::state::State;

/// Registered once; reads `state`'s backends on every scrape.
pub struct BackendCollector {
    state: Arc<State>,
}

impl BackendCollector {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

impl fmt::Debug for BackendCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BackendCollector")
    }
}

impl Collector for BackendCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let backends = &self.state.backends;
        let out = &mut encoder;
        if let Some(keys) = &backends.keys {
            signing_keys(out, &keys.stats())?;
        }
        if let Some(store) = &backends.api_keys {
            api_keys(out, &store.stats())?;
        }
        if let Some(fga) = backends.openfga.get() {
            openfga(out, &fga.client.stats())?;
            if let Some(cache) = &fga.cache {
                decision_cache(out, &cache.stats())?;
            }
        }
        Ok(())
    }
}

fn signing_keys(out: &mut DescriptorEncoder, s: &KeySourceStats) -> fmt::Result {
    counter_by(
        out,
        "jwks_refreshes",
        "Signing-key (JWKS) fetches by result: ok (keys loaded) or error (fetch failed or no usable key; the last good keys kept)",
        &[
            ([("result", "ok")], s.refreshes_ok),
            ([("result", "error")], s.refreshes_error),
        ],
    )?;
    gauge(out, "jwks_keys", "Signing keys loaded now", s.keys)?;
    gauge(
        out,
        "jwks_last_refresh_success_timestamp_seconds",
        "Unix time of the last JWKS fetch that loaded keys (0 before the first)",
        s.last_success.unwrap_or(0),
    )
}

fn api_keys(out: &mut DescriptorEncoder, s: &ApiKeyStats) -> fmt::Result {
    if let Some(f) = &s.file {
        key_file(out, f)?;
    }
    if let Some(x) = &s.exchange {
        key_exchange(out, x)?;
    }
    Ok(())
}

fn key_file(out: &mut DescriptorEncoder, s: &KeyFileStats) -> fmt::Result {
    gauge(
        out,
        "api_key_file_keys",
        "API keys in the keys file in use (api_keys.file)",
        s.keys,
    )?;
    counter_by(
        out,
        "api_key_file_reloads",
        "Keys-file reloads by result: ok (a changed file applied) or error (refused, the previous keys kept)",
        &[
            ([("result", "ok")], s.reloads_ok),
            ([("result", "error")], s.reloads_error),
        ],
    )?;
    gauge(
        out,
        "api_key_file_last_reload_success_timestamp_seconds",
        "Unix time the API keys in use were loaded (at startup or by the last successful reload)",
        s.loaded_at,
    )?;
    counter(
        out,
        "api_key_bcrypt_verifications",
        "bcrypt verifications run for API keys (each costs tens of milliseconds of CPU)",
        s.bcrypt_verifications,
    )?;
    counter(
        out,
        "api_key_bcrypt_busy",
        "API-key checks answered 503 because every bcrypt slot stayed busy (api_keys.bcrypt_concurrency)",
        s.bcrypt_busy,
    )?;
    counter(
        out,
        "api_key_failed_cache_hits",
        "API keys refused from the failed-key cache, without running bcrypt again",
        s.failed_cache_hits,
    )
}

fn key_exchange(out: &mut DescriptorEncoder, s: &ExchangeStats) -> fmt::Result {
    counter(
        out,
        "api_key_exchange_requests",
        "Calls to the app's key service (api_key_exchange)",
        s.requests,
    )?;
    counter(
        out,
        "api_key_exchange_errors",
        "Key-service calls that got no answer (5xx, timeout, refused connection, unreadable body)",
        s.errors,
    )?;
    counter(
        out,
        "api_key_exchange_cache_hits",
        "API keys answered from the exchanged-token or refusal cache, without a call",
        s.cache_hits,
    )?;
    gauge(
        out,
        "api_key_exchange_cached_tokens",
        "Exchanged tokens cached now",
        s.cached_tokens,
    )
}

fn openfga(out: &mut DescriptorEncoder, s: &ClientStats) -> fmt::Result {
    let states = [
        BreakerState::Closed,
        BreakerState::Open,
        BreakerState::HalfOpen,
    ];
    let series = states.map(|state| ([("state", state.as_str())], u64::from(state == s.breaker)));
    let mut family = out.encode_descriptor(
        "openfga_breaker_state",
        &help(
            "OpenFGA circuit breaker: 1 for the state it is in (closed, open, half_open), 0 for the others",
        ),
        None,
        MetricType::Gauge,
    )?;
    for (labels, value) in &series {
        ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
    }
    counter(
        out,
        "openfga_short_circuited",
        "OpenFGA checks refused without a request because the circuit breaker was open",
        s.short_circuited,
    )
}

fn decision_cache(out: &mut DescriptorEncoder, s: &CacheStats) -> fmt::Result {
    counter(
        out,
        "decision_cache_hits",
        "Relationship checks answered from the decision cache",
        s.hits,
    )?;
    counter(
        out,
        "decision_cache_misses",
        "Relationship checks the decision cache sent to OpenFGA",
        s.misses,
    )?;
    counter(
        out,
        "decision_cache_coalesced",
        "Decision-cache misses that waited for an identical check already in flight instead of asking OpenFGA again",
        s.coalesced,
    )?;
    counter(
        out,
        "decision_cache_evictions",
        "Decision-cache entries removed to stay within cache.max_entries",
        s.evictions,
    )?;
    counter(
        out,
        "decision_cache_invalidations",
        "Decision-cache entries removed because a tuple changed (OpenFGA changelog) or the cache was cleared",
        s.invalidations,
    )?;
    gauge(
        out,
        "decision_cache_entries",
        "Answers in the decision cache now",
        s.size,
    )
}

/// HELP texts end with a period, as the registry's own do.
fn help(text: &str) -> String {
    format!("{text}.")
}

fn counter(out: &mut DescriptorEncoder, name: &str, text: &str, value: u64) -> fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(out.encode_descriptor(name, &help(text), None, MetricType::Counter)?)
}

fn gauge(out: &mut DescriptorEncoder, name: &str, text: &str, value: u64) -> fmt::Result {
    let metric = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
    metric.encode(out.encode_descriptor(name, &help(text), None, MetricType::Gauge)?)
}

/// One counter family, a series per label set.
fn counter_by<L: EncodeLabelSet>(
    out: &mut DescriptorEncoder,
    name: &str,
    text: &str,
    series: &[(L, u64)],
) -> fmt::Result {
    let mut family = out.encode_descriptor(name, &help(text), None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::authn::api_key::{ApiKeyStore, FileApiKeyStore};
    use crate::authn::jwks::{JwksKeySource, KeySource};
    use crate::config::Config;
    use crate::state::Backends;
    use crate::telemetry::Metrics;

    const LOCAL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/local");

    /// The deploy/local signing keys and API keys, read from their files; no OpenFGA.
    async fn local_state() -> (Arc<State>, Arc<dyn KeySource>) {
        let config = Config::from_yaml(
            "jwt: { jwks_file: dev-jwks.json }\napi_keys: { file: api-keys.yaml }\nroutes: { rules: [ { name: api, path: \"/api/**\" } ] }\n",
            std::path::Path::new(LOCAL),
            &std::collections::BTreeMap::new(),
        )
        .unwrap();
        let keys: Arc<dyn KeySource> = Arc::new(JwksKeySource::new(&config.jwt).unwrap());
        keys.refresh().await.unwrap();
        let api_keys = FileApiKeyStore::open(
            &std::path::Path::new(LOCAL).join("api-keys.yaml"),
            crate::clock::system_clock(),
        )
        .unwrap();
        let backends = Backends {
            keys: Some(keys.clone()),
            api_keys: Some(Arc::new(api_keys) as Arc<dyn ApiKeyStore>),
            ..Backends::none()
        };
        let policy = crate::state::policy(&config, &backends).unwrap();
        (Arc::new(State::new(policy, backends)), keys)
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[tokio::test]
    async fn backend_figures_are_read_when_scraped_with_the_type_their_meaning_has() {
        let (state, keys) = local_state().await;
        let metrics = Metrics::new();
        metrics.watch_backends(&state);
        let text = metrics.encode_text();
        let series = [
            ("authz_sidecar_jwks_refreshes_total{result=\"ok\"}", 1.0),
            ("authz_sidecar_jwks_refreshes_total{result=\"error\"}", 0.0),
            ("authz_sidecar_jwks_keys", 1.0),
            ("authz_sidecar_api_key_file_keys", 3.0),
            (
                "authz_sidecar_api_key_file_reloads_total{result=\"ok\"}",
                0.0,
            ),
            ("authz_sidecar_api_key_bcrypt_verifications_total", 0.0),
        ];
        for (name, want) in series {
            assert_eq!(value(&text, name), Some(want), "{name} in:\n{text}");
        }
        let loaded = value(
            &text,
            "authz_sidecar_jwks_last_refresh_success_timestamp_seconds",
        )
        .unwrap();
        assert!((loaded - crate::clock::now_secs() as f64).abs() < 60.0);
        for family in ["openfga_requests", "decision_cache", "openfga_breaker"] {
            assert!(
                !text.contains(&format!("authz_sidecar_{family}")),
                "OpenFGA is not configured: no {family} in\n{text}"
            );
        }

        // Nothing is copied: the next scrape reads the source again.
        keys.refresh().await.unwrap();
        let text = metrics.encode_text();
        assert_eq!(
            value(&text, "authz_sidecar_jwks_refreshes_total{result=\"ok\"}"),
            Some(2.0)
        );
    }

    /// What promtool's lint checks first, on the families this collector and the registry
    /// write: counters end in `_total`, nothing else does, every family says what it counts.
    #[tokio::test]
    async fn every_family_has_help_and_only_counters_end_in_total() {
        let (state, _) = local_state().await;
        let metrics = Metrics::new();
        metrics.watch_backends(&state);
        let text = metrics.encode_text();
        let mut families = 0;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                families += 1;
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(
                    name.ends_with("_total"),
                    kind == "counter",
                    "{name} is a {kind}"
                );
                assert!(
                    text.lines().any(|l| l
                        .strip_prefix(&format!("# HELP {name} "))
                        .is_some_and(|h| h.len() > 10 && h.ends_with('.'))),
                    "{name} has no HELP"
                );
            }
        }
        assert!(families >= 15, "{text}");
    }
}
