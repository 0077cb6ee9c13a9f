//! Signing keys: the [`KeySource`] trait and its JWKS implementation (a JWKS URL, OIDC
//! discovery of a Keycloak realm, or a local JWKS file).
//!
//! An unknown `kid` triggers at most one refetch per cooldown (single-flight, so a burst of
//! tokens from a rotated key costs one fetch). A failed fetch keeps the last good keys, so a
//! Keycloak outage does not break tokens signed with keys we already know.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jsonwebtoken::{Algorithm, DecodingKey, jwk::Jwk};
use serde::Deserialize;
use tracing::Instrument as _;

use crate::config::{JwtConfig, KeySourceConfig, discovery_url};

/// A verification key from the JWKS.
pub struct SigningKey {
    pub kid: String,
    /// The `alg` the JWKS pins for this key, if any.
    pub alg: Option<Algorithm>,
    pub key: DecodingKey,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("signing key kid={kid} not found in {origin}")]
    NotFound { kid: String, origin: String },
    #[error("cannot fetch keys from {origin}: {cause}")]
    Unavailable {
        kid: String,
        origin: String,
        cause: String,
    },
    #[error("no signing keys loaded yet from {origin}: {cause}")]
    Empty { origin: String, cause: String },
}

/// What a key source reports for `/metrics`, read when scraped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeySourceStats {
    /// Fetches that loaded keys.
    pub refreshes_ok: u64,
    /// Fetches that failed or found no usable key (the last good keys were kept).
    pub refreshes_error: u64,
    /// Signing keys loaded now.
    pub keys: u64,
    /// Unix seconds of the last fetch that loaded keys; `None` before the first.
    pub last_success: Option<u64>,
}

/// Where verification keys come from.
#[async_trait::async_trait]
pub trait KeySource: Send + Sync {
    /// The key for `kid`, refreshing the set (within the cooldown) when it is unknown.
    async fn key(&self, kid: &str) -> Result<Arc<SigningKey>, KeyError>;
    /// Fetches the keys now; returns how many were loaded.
    async fn refresh(&self) -> Result<usize, KeyError>;
    /// Whether any key has been loaded (readiness).
    fn ready(&self) -> bool;
    /// The issuer learned from OIDC discovery, if this source does discovery.
    fn discovered_issuer(&self) -> Option<String>;
    /// Human-readable origin, e.g. `JWKS http://kc/realms/r/protocol/openid-connect/certs`.
    fn describe(&self) -> String;
    /// Loaded key ids, for `doctor` and the startup log.
    fn key_ids(&self) -> Vec<String>;
    /// Whether `kid` is among the loaded keys now (no fetch).
    fn has_key(&self, kid: &str) -> bool {
        self.key_ids().iter().any(|k| k == kid)
    }
    /// How many refreshes have dropped a key id the set had before (a key rotated out or
    /// revoked). The verifier compares it on every check (one atomic load) and forgets the
    /// tokens verified with a dropped key when it moves. A fixed set never drops one.
    fn removals(&self) -> u64 {
        0
    }
    /// Refreshes and keys for `/metrics`; a source that never fetches has only keys.
    fn stats(&self) -> KeySourceStats {
        KeySourceStats {
            keys: self.key_ids().len() as u64,
            ..KeySourceStats::default()
        }
    }
}

#[derive(Default)]
struct KeySet {
    keys: HashMap<String, Arc<SigningKey>>,
    issuer: Option<String>,
    jwks_url: Option<String>,
}

enum Origin {
    Url(String),
    Discovery(String),
    File(PathBuf),
}

/// JWKS-backed [`KeySource`].
pub struct JwksKeySource {
    origin: Origin,
    http: reqwest::Client,
    timeout: Duration,
    cooldown: Duration,
    set: ArcSwap<KeySet>,
    last_fetch: Mutex<Option<Instant>>,
    last_error: Mutex<Option<String>>,
    fetch_lock: tokio::sync::Mutex<()>,
    refreshes_ok: AtomicU64,
    refreshes_error: AtomicU64,
    /// Unix seconds of the last fetch that loaded keys; 0 = none yet.
    last_success: AtomicU64,
    /// See [`KeySource::removals`].
    removals: AtomicU64,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

impl JwksKeySource {
    pub fn new(cfg: &JwtConfig) -> Option<Self> {
        let origin = match &cfg.source {
            KeySourceConfig::JwksUrl(u) => Origin::Url(u.clone()),
            KeySourceConfig::Discovery { base_url, realm } => {
                Origin::Discovery(discovery_url(base_url, realm))
            }
            KeySourceConfig::File(p) => Origin::File(p.clone()),
            KeySourceConfig::None => return None,
        };
        Some(Self {
            origin,
            http: crate::http_client::client(cfg.fetch_timeout),
            timeout: cfg.fetch_timeout,
            cooldown: cfg.refresh_cooldown,
            set: ArcSwap::from_pointee(KeySet::default()),
            last_fetch: Mutex::new(None),
            last_error: Mutex::new(None),
            fetch_lock: tokio::sync::Mutex::new(()),
            refreshes_ok: AtomicU64::new(0),
            refreshes_error: AtomicU64::new(0),
            last_success: AtomicU64::new(0),
            removals: AtomicU64::new(0),
        })
    }

    fn source_name(&self) -> String {
        match &self.origin {
            Origin::Url(u) => format!("JWKS {u}"),
            Origin::Discovery(d) => match &self.set.load().jwks_url {
                Some(j) => format!("JWKS {j}"),
                None => format!("OIDC discovery {d}"),
            },
            Origin::File(p) => format!("JWKS file {}", p.display()),
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let mut req = self.http.get(url);
        // The fetch's trace context, so a traced Keycloak's spans join the trace.
        for (name, value) in crate::tracing_export::outgoing(&tracing::Span::current()) {
            req = req.header(name, value);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| crate::http_client::describe(&e, self.timeout))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        resp.json::<T>()
            .await
            .map_err(|e| format!("{url} is not a valid document: {e}"))
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let (doc, issuer, jwks_url): (serde_json::Value, _, _) = match &self.origin {
            Origin::Url(u) => (self.get_json(u).await?, None, Some(u.clone())),
            Origin::Discovery(d) => {
                let disc: Discovery = self
                    .get_json(d)
                    .await
                    .map_err(|e| format!("OIDC discovery {d}: {e}"))?;
                (
                    self.get_json(&disc.jwks_uri)
                        .await
                        .map_err(|e| format!("JWKS {}: {e}", disc.jwks_uri))?,
                    Some(disc.issuer),
                    Some(disc.jwks_uri),
                )
            }
            Origin::File(p) => {
                let text = tokio::fs::read_to_string(p)
                    .await
                    .map_err(|e| e.to_string())?;
                let doc = serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))?;
                (doc, None, None)
            }
        };
        let keys = parse_jwks(&doc)?;
        Ok(KeySet {
            keys,
            issuer,
            jwks_url,
        })
    }

    fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    fn last_fetch_failed(&self) -> bool {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "not fetched yet".into())
    }
}

/// Parses a JWKS document. Keys for encryption and key types we cannot verify with are skipped
/// (Keycloak publishes an RSA-OAEP encryption key next to its signing key).
pub fn parse_jwks(doc: &serde_json::Value) -> Result<HashMap<String, Arc<SigningKey>>, String> {
    let list = doc
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("not a JWKS: no \"keys\" array")?;
    let mut keys = HashMap::new();
    for (i, raw) in list.iter().enumerate() {
        if raw.get("use").and_then(|u| u.as_str()) == Some("enc") {
            continue;
        }
        let Some(kid) = raw.get("kid").and_then(|k| k.as_str()) else {
            tracing::warn!(index = i, "JWKS key without kid skipped");
            continue;
        };
        let jwk: Jwk = match serde_json::from_value(raw.clone()) {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(kid, error = %e, "JWKS key skipped: unreadable");
                continue;
            }
        };
        if !jwk.is_supported() {
            continue;
        }
        let key = match DecodingKey::from_jwk(&jwk) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(kid, error = %e, "JWKS key skipped: unusable");
                continue;
            }
        };
        let alg = raw
            .get("alg")
            .and_then(|a| a.as_str())
            .and_then(|a| a.parse::<Algorithm>().ok());
        keys.insert(
            kid.to_string(),
            Arc::new(SigningKey {
                kid: kid.to_string(),
                alg,
                key,
            }),
        );
    }
    Ok(keys)
}

#[async_trait::async_trait]
impl KeySource for JwksKeySource {
    async fn key(&self, kid: &str) -> Result<Arc<SigningKey>, KeyError> {
        if let Some(k) = self.set.load().keys.get(kid) {
            return Ok(k.clone());
        }
        let _guard = self.fetch_lock.lock().await;
        // Another task may have fetched while we waited.
        if let Some(k) = self.set.load().keys.get(kid) {
            return Ok(k.clone());
        }
        let recent = self
            .last_fetch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < self.cooldown);
        if !recent {
            if let Err(e) = self.refresh_locked().await {
                return Err(match e {
                    KeyError::Unavailable { origin, cause, .. }
                    | KeyError::Empty { origin, cause } => KeyError::Unavailable {
                        kid: kid.into(),
                        origin,
                        cause,
                    },
                    other => other,
                });
            }
            if let Some(k) = self.set.load().keys.get(kid) {
                return Ok(k.clone());
            }
        } else if self.set.load().keys.is_empty() || self.last_fetch_failed() {
            // Inside the cooldown after a failed fetch we do not know whether the kid exists:
            // report the fetch failure, not "not found".
            return Err(KeyError::Unavailable {
                kid: kid.into(),
                origin: self.source_name(),
                cause: self.last_error(),
            });
        }
        Err(KeyError::NotFound {
            kid: kid.into(),
            origin: self.source_name(),
        })
    }

    async fn refresh(&self) -> Result<usize, KeyError> {
        let _guard = self.fetch_lock.lock().await;
        self.refresh_locked().await
    }

    fn ready(&self) -> bool {
        !self.set.load().keys.is_empty()
    }

    fn discovered_issuer(&self) -> Option<String> {
        self.set.load().issuer.clone()
    }

    fn describe(&self) -> String {
        self.source_name()
    }

    fn key_ids(&self) -> Vec<String> {
        let mut ids: Vec<_> = self.set.load().keys.keys().cloned().collect();
        ids.sort();
        ids
    }

    fn has_key(&self, kid: &str) -> bool {
        self.set.load().keys.contains_key(kid)
    }

    fn removals(&self) -> u64 {
        self.removals.load(Ordering::Acquire)
    }

    fn stats(&self) -> KeySourceStats {
        KeySourceStats {
            refreshes_ok: self.refreshes_ok.load(Ordering::Relaxed),
            refreshes_error: self.refreshes_error.load(Ordering::Relaxed),
            keys: self.set.load().keys.len() as u64,
            last_success: match self.last_success.load(Ordering::Relaxed) {
                0 => None,
                t => Some(t),
            },
        }
    }
}

impl JwksKeySource {
    async fn refresh_locked(&self) -> Result<usize, KeyError> {
        *self.last_fetch.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let span = tracing::info_span!(
            target: crate::tracing_export::TARGET,
            "jwks fetch",
            otel.kind = "client",
            source = %self.source_name(),
            keys = tracing::field::Empty,
            outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let fetched = self.fetch().instrument(span.clone()).await;
        if !span.is_disabled() {
            match &fetched {
                Ok(set) => {
                    span.record("keys", set.keys.len());
                    span.record(
                        "outcome",
                        if set.keys.is_empty() {
                            "no usable keys"
                        } else {
                            "ok"
                        },
                    );
                }
                Err(cause) => {
                    span.record("outcome", cause.as_str());
                    span.record("otel.status_code", "error");
                }
            }
        }
        match fetched {
            Ok(set) if set.keys.is_empty() => {
                self.refreshes_error.fetch_add(1, Ordering::Relaxed);
                let cause = "the JWKS has no usable signing keys".to_string();
                self.set_error(Some(cause.clone()));
                Err(KeyError::Empty {
                    origin: self.source_name(),
                    cause,
                })
            }
            Ok(set) => {
                let n = set.keys.len();
                let mut ids: Vec<_> = set.keys.keys().cloned().collect();
                ids.sort();
                tracing::debug!(source = %self.source_name(), kids = ?ids, "signing keys loaded");
                let mut dropped: Vec<String> = self
                    .set
                    .load()
                    .keys
                    .keys()
                    .filter(|kid| !set.keys.contains_key(*kid))
                    .cloned()
                    .collect();
                self.set.store(Arc::new(set));
                if !dropped.is_empty() {
                    // After the store: a verifier that sees the new count finds the new set.
                    dropped.sort();
                    self.removals.fetch_add(1, Ordering::Release);
                    tracing::info!(source = %self.source_name(), kids = ?dropped, "signing keys left the JWKS; tokens verified with them are refused from now on");
                }
                self.set_error(None);
                self.refreshes_ok.fetch_add(1, Ordering::Relaxed);
                self.last_success
                    .store(crate::clock::now_secs().max(1), Ordering::Relaxed);
                Ok(n)
            }
            Err(cause) => {
                self.refreshes_error.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(source = %self.source_name(), %cause, "signing key refresh failed; keeping the last good keys");
                self.set_error(Some(cause.clone()));
                Err(KeyError::Unavailable {
                    kid: String::new(),
                    origin: self.source_name(),
                    cause,
                })
            }
        }
    }
}

/// A fixed set of keys, for tests only: unit tests, and other crates' tests through the
/// `test-util` feature.
#[cfg(any(test, feature = "test-util"))]
pub struct StaticKeys {
    keys: HashMap<String, Arc<SigningKey>>,
}

#[cfg(any(test, feature = "test-util"))]
impl StaticKeys {
    pub fn from_jwks(doc: &serde_json::Value) -> Result<Self, String> {
        Ok(Self {
            keys: parse_jwks(doc)?,
        })
    }
}

#[cfg(any(test, feature = "test-util"))]
#[async_trait::async_trait]
impl KeySource for StaticKeys {
    async fn key(&self, kid: &str) -> Result<Arc<SigningKey>, KeyError> {
        self.keys
            .get(kid)
            .cloned()
            .ok_or_else(|| KeyError::NotFound {
                kid: kid.into(),
                origin: self.describe(),
            })
    }
    async fn refresh(&self) -> Result<usize, KeyError> {
        Ok(self.keys.len())
    }
    fn ready(&self) -> bool {
        true
    }
    fn discovered_issuer(&self) -> Option<String> {
        None
    }
    fn describe(&self) -> String {
        "static keys".into()
    }
    fn key_ids(&self) -> Vec<String> {
        self.keys.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_source(path: &std::path::Path) -> JwksKeySource {
        let yaml = format!(
            "jwt: {{ jwks_file: {}, refresh_cooldown: 60s }}",
            path.display()
        );
        let cfg = crate::config::Config::from_yaml(
            &yaml,
            std::path::Path::new("/"),
            &std::collections::BTreeMap::new(),
        )
        .unwrap();
        JwksKeySource::new(&cfg.jwt).unwrap()
    }

    /// After a failed refetch, an unknown kid inside the cooldown reports the fetch failure
    /// (a Keycloak outage), not "not found in JWKS".
    #[tokio::test]
    async fn unknown_kid_inside_cooldown_after_failed_fetch_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::copy(
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys/jwks.json"),
            &path,
        )
        .unwrap();
        let source = file_source(&path);
        assert!(source.refresh().await.unwrap() > 0);
        std::fs::remove_file(&path).unwrap();
        // Cooldown elapsed (as if): the first unknown kid refetches, which fails.
        *source.last_fetch.lock().unwrap() = None;
        for kid in ["first", "second"] {
            let err = source.key(kid).await.err().expect("unknown kid");
            assert!(
                matches!(&err, KeyError::Unavailable { kid: k, .. } if k == kid),
                "{kid}: {err}"
            );
        }
        // Known kids still come from the last good set.
        assert!(source.key("rsa-a").await.is_ok());
    }

    #[tokio::test]
    async fn refreshes_are_counted_by_result_and_a_failure_keeps_the_keys_and_their_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let source = file_source(&path);
        assert_eq!(
            source.stats(),
            KeySourceStats::default(),
            "nothing fetched yet"
        );
        assert!(source.refresh().await.is_err(), "no file yet");
        std::fs::copy(
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys/jwks.json"),
            &path,
        )
        .unwrap();
        let loaded = source.refresh().await.unwrap() as u64;
        let after_load = source.stats();
        assert_eq!(
            (
                after_load.refreshes_ok,
                after_load.refreshes_error,
                after_load.keys
            ),
            (1, 1, loaded)
        );
        let loaded_at = after_load.last_success.expect("a success time");
        assert!(loaded_at.abs_diff(crate::clock::now_secs()) < 5);
        std::fs::write(&path, r#"{"keys": []}"#).unwrap();
        assert!(source.refresh().await.is_err(), "no usable key");
        let after_empty = source.stats();
        assert_eq!(after_empty.refreshes_error, 2);
        assert_eq!(after_empty.keys, loaded, "the last good keys stay");
        assert_eq!(after_empty.last_success, Some(loaded_at));
    }

    /// An unknown kid inside a check refetches the keys in a `jwks fetch` span under the
    /// check's (here: the test's) span, with the source, the keys loaded and the outcome.
    #[tokio::test]
    async fn a_fetch_is_a_span_under_the_operation_that_needed_it() {
        use tracing_subscriber::layer::SubscriberExt as _;
        crate::tracing_export::per_thread_subscribers();
        let spans = opentelemetry_sdk::trace::InMemorySpanExporter::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_simple_exporter(spans.clone())
            .build();
        let subscriber =
            tracing_subscriber::registry().with(crate::tracing_export::export_layer(&provider));
        let _guard = tracing::subscriber::set_default(subscriber);
        let source = file_source(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/keys/jwks.json"
        )));
        let check = tracing::info_span!(target: crate::tracing_export::TARGET, "check");
        assert!(source.key("rsa-a").instrument(check.clone()).await.is_ok());
        drop(check);
        let spans = spans.get_finished_spans().unwrap();
        let check = spans.iter().find(|s| s.name == "check").unwrap();
        let fetch = spans.iter().find(|s| s.name == "jwks fetch").unwrap();
        assert_eq!(fetch.parent_span_id, check.span_context.span_id());
        let attribute = |name: &str| {
            fetch
                .attributes
                .iter()
                .find(|kv| kv.key.as_str() == name)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(attribute("outcome").as_deref(), Some("ok"));
        assert!(attribute("source").unwrap().starts_with("JWKS file "));
        assert!(attribute("keys").unwrap().parse::<usize>().unwrap() > 0);
    }
}
