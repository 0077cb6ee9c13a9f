//! The composition root: builds what the server runs from a [`Config`], in two parts.
//!
//! - [`Backends`], built once for the life of the process: the signing-key source, the API-key
//!   store, the OpenFGA connection (a [`LateChecker`] until it connects) with its decision cache,
//!   and the background tasks that keep them fresh (key refresh, key-file reload, OpenFGA
//!   connection and changelog).
//! - [`Policy`], everything a reload may change: compiled rules, CORS, principals, JWT
//!   settings, path policy, contextual tuples. It holds handles to the backends, never owns
//!   them, so a new policy is cheap to build ([`State::build_policy`]) and to swap in
//!   ([`State::swap_policy`]).
//!
//! Invariant: a request loads the policy once, at its start ([`State::policy`]), and decides
//! on that one to the end; a swap changes what the next request sees, never a request in
//! flight. Changing a backend (key source, API-key file, OpenFGA store, cache size) needs a
//! restart.
//!
//! Invariant: every policy that serves has had its rules checked against the OpenFGA model
//! (when OpenFGA is configured). [`State::apply`] checks a new policy's rules against the
//! connected model before the swap; before OpenFGA connects, it leaves them for the connection
//! to check, as it checks the first policy's ([`ModelGate`]).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio_util::sync::CancellationToken;

use crate::authn::api_key::{ApiKeyStore, FileApiKeyStore, StoreOptions};
use crate::authn::api_key_exchange::{self, ExchangeApiKeyStore};
use crate::authn::jwks::{JwksKeySource, KeySource};
use crate::authn::jwt::JwtVerifier;
use crate::authn::{Authenticator, principals::Principals};
use crate::authz::cache::{DecisionCache, Invalidate};
use crate::authz::openfga::{ChangeWatcher, OpenFgaClient, OpenFgaError, RequestMetrics};
use crate::authz::rules::RuleSet;
use crate::authz::{Authorizer, LateChecker, RelationRef, RelationshipChecker};
use crate::clock::Clock;
use crate::config::{CacheConfig, Config, ConfigError, KeySourceConfig, OpenFgaConfig};
use crate::cors::Cors;
pub use crate::pipeline::Policy;

/// A problem that must stop the process (exit 2): the configuration cannot work.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(pub String);

/// The OpenFGA client and the decision cache in front of it, once connected. `/metrics`
/// reads their figures from here when scraped (`ClientStats`, `CacheStats`).
pub struct OpenFga {
    pub client: Arc<OpenFgaClient>,
    /// `None` when the cache is disabled (`cache.enabled: false`).
    pub cache: Option<Arc<DecisionCache>>,
}

/// The parts built once: connections, stores, caches and the tasks that keep them fresh.
pub struct Backends {
    /// Signing keys for bearer tokens; `None` when no JWT key source is configured.
    pub keys: Option<Arc<dyn KeySource>>,
    pub api_keys: Option<Arc<dyn ApiKeyStore>>,
    /// OpenFGA (behind the decision cache) once connected; `None` when not configured.
    pub checker: Option<Arc<LateChecker>>,
    /// The OpenFGA client and its decision cache, once connected.
    pub openfga: Arc<OnceLock<OpenFga>>,
    /// Every OpenFGA call by endpoint and outcome, with its latency, from the first
    /// connection attempt on (empty when OpenFGA is not configured).
    pub openfga_requests: RequestMetrics,
    /// Where the serving policy's rules are checked against the OpenFGA model.
    pub model_gate: Arc<ModelGate>,
    /// The decision cache's TTLs: the serving config's, applied to the cache once it exists.
    pub cache_ttls: Arc<CacheTtls>,
    pub clock: Clock,
}

#[cfg(test)]
impl Backends {
    /// No signing keys, API keys or OpenFGA, the system clock: a test sets what it needs
    /// (`Backends { api_keys: Some(keys), ..Backends::none() }`).
    pub fn none() -> Self {
        Self {
            keys: None,
            api_keys: None,
            checker: None,
            openfga: Default::default(),
            openfga_requests: Default::default(),
            model_gate: Default::default(),
            cache_ttls: Default::default(),
            clock: crate::clock::system_clock(),
        }
    }
}

/// The relation references of the serving policy's rules and the OpenFGA model they must
/// exist in. One lock orders the two ways rules meet the model: the connection checks the
/// references left here, and [`State::apply`] checks (or leaves) a new policy's and swaps it
/// under the same lock, so no policy's rules go unchecked whichever comes first.
#[derive(Default)]
pub struct ModelGate(Mutex<Gate>);

#[derive(Default)]
enum Gate {
    /// No OpenFGA configured: nothing to check.
    #[default]
    Off,
    /// Not connected yet: the references the connection will check.
    Pending(Vec<RelationRef>),
    /// Connected: check against this client's current model.
    Connected(Arc<OpenFgaClient>),
}

impl ModelGate {
    fn pending(refs: Vec<RelationRef>) -> Self {
        Self(Mutex::new(Gate::Pending(refs)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The decision cache's TTLs, which a reload may change although the cache itself is built
/// once, at the OpenFGA connection. One lock orders the two: a reload before the connection
/// leaves its TTLs here for the cache, one after sets them on it.
#[derive(Default)]
pub struct CacheTtls(Mutex<TtlSlot>);

#[derive(Default)]
struct TtlSlot {
    /// (allowed, denied) of the latest config applied.
    latest: Option<(Duration, Duration)>,
    cache: Option<Arc<DecisionCache>>,
}

impl CacheTtls {
    fn lock(&self) -> std::sync::MutexGuard<'_, TtlSlot> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A config's TTLs: the cache's from now on (or from when it exists).
    pub fn set(&self, allowed: Duration, denied: Duration) {
        let mut slot = self.lock();
        slot.latest = Some((allowed, denied));
        if let Some(cache) = &slot.cache {
            cache.set_ttls(allowed, denied);
        }
    }

    /// The decision cache, once OpenFGA is connected (and the cache enabled).
    fn cache(&self) -> Option<Arc<DecisionCache>> {
        self.lock().cache.clone()
    }

    /// The cache, now built: it takes the TTLs of the latest config set here.
    fn attach(&self, cache: Arc<DecisionCache>) {
        let mut slot = self.lock();
        if let Some((allowed, denied)) = slot.latest {
            cache.set_ttls(allowed, denied);
        }
        slot.cache = Some(cache);
    }
}

/// Why a new policy was refused; the running one keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Model(#[from] OpenFgaError),
}

/// What the server runs: the current policy (swappable) over the backends (built once).
pub struct State {
    policy: ArcSwap<Policy>,
    pub backends: Backends,
    /// The config the serving policy was built from, with the restart-only values as
    /// started (for `GET /admin/config`); `None` for a state built without one (tests).
    config: ArcSwapOption<Config>,
}

/// What an operator's cache flush dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flushed {
    /// Remembered OpenFGA answers.
    pub decisions: u64,
    /// Verified bearer tokens.
    pub tokens: u64,
}

/// What an operator's key refresh loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysRefreshed {
    /// Where the keys came from (`JWKS file ...`, `JWKS https://...`).
    pub source: String,
    pub key_ids: Vec<String>,
    /// Verified tokens dropped, to be verified against the new keys.
    pub tokens_forgotten: u64,
}

impl State {
    pub fn new(policy: Policy, backends: Backends) -> Self {
        Self {
            policy: ArcSwap::from_pointee(policy),
            backends,
            config: ArcSwapOption::empty(),
        }
    }

    /// The effective config (see [`State::apply`]).
    pub fn config(&self) -> Option<Arc<Config>> {
        self.config.load_full()
    }

    /// Records `config` as the effective one: what the serving policy was built from.
    pub fn set_config(&self, config: Config) {
        self.config.store(Some(Arc::new(config)));
    }

    /// The operator's flush: every remembered OpenFGA answer and every verified token is
    /// dropped, so the next check asks OpenFGA and verifies its token again. A check in
    /// flight may store its answer just after; that answer is fresh.
    pub fn flush_caches(&self) -> Flushed {
        let decisions = match self.backends.cache_ttls.cache() {
            Some(cache) => {
                let n = cache.stats().size;
                cache.clear();
                n
            }
            None => 0,
        };
        let tokens = self
            .policy()
            .authn
            .jwt
            .as_ref()
            .map_or(0, |jwt| jwt.forget_tokens() as u64);
        Flushed { decisions, tokens }
    }

    /// Fetches the signing keys now (the operator's refresh): the key ids loaded and the
    /// source, or the error naming the source. On success the verified tokens are forgotten
    /// too, so a token signed by a key the JWKS no longer holds is refused from now on
    /// rather than when it expires. After a failure the last good keys keep serving.
    pub async fn refresh_keys(&self) -> Result<KeysRefreshed, String> {
        let keys = self.backends.keys.as_ref().ok_or(
            "no JWT key source is configured (jwt.jwks_url, KEYCLOAK_URL or jwt.jwks_file)",
        )?;
        keys.refresh().await.map_err(|e| e.to_string())?;
        let tokens_forgotten = self
            .policy()
            .authn
            .jwt
            .as_ref()
            .map_or(0, |jwt| jwt.forget_tokens() as u64);
        Ok(KeysRefreshed {
            source: keys.describe(),
            key_ids: keys.key_ids(),
            tokens_forgotten,
        })
    }

    /// The policy a request decides on: load it once at the request's start and keep it.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Builds a policy from `config` over these backends; the seam a reload goes through
    /// (rules compiled and validated here, the backends reused).
    pub fn build_policy(&self, config: &Config) -> Result<Policy, ConfigError> {
        policy(config, &self.backends)
    }

    /// Makes `new` the policy of every request that starts from now on; requests in flight
    /// keep the one they loaded. Returns the policy it replaced.
    pub fn swap_policy(&self, new: Policy) -> Arc<Policy> {
        self.policy.swap(Arc::new(new))
    }

    /// A reload: builds the policy of `config` (rules compiled), checks its rules against the
    /// OpenFGA model when connected, and swaps it in; on any error the running policy stays.
    /// Before OpenFGA connects the rules are left for the connection to check, as the first
    /// policy's are (a mismatch then stops the process, as at startup).
    pub fn apply(&self, config: &Config) -> Result<Arc<Policy>, PolicyError> {
        let new = self.build_policy(config)?;
        let mut gate = self.backends.model_gate.lock();
        match &mut *gate {
            Gate::Off => {}
            Gate::Pending(refs) => *refs = new.rules.relation_refs(),
            Gate::Connected(client) => client.validate(&new.rules.relation_refs())?,
        }
        self.backends
            .cache_ttls
            .set(config.cache.allowed_ttl, config.cache.denied_ttl);
        announce_rollout(&new);
        let old = self.swap_policy(new);
        self.set_config(config.clone());
        Ok(old)
    }

    /// What is still missing before every configured backend can answer (empty when ready).
    pub fn readiness(&self) -> Vec<String> {
        self.policy().readiness()
    }
}

/// The state and what its background tasks report.
pub struct Built {
    pub state: Arc<State>,
    /// A background task found the configuration cannot work (OpenFGA store or model
    /// missing, a rule naming a relation the model lacks).
    pub fatal: tokio::sync::mpsc::Receiver<Fatal>,
}

/// Builds the backends, starts their background tasks (stopped by `shutdown`) and builds the
/// first policy. Errors here are startup errors.
pub async fn build(
    config: &Config,
    clock: Clock,
    shutdown: &CancellationToken,
) -> anyhow::Result<Built> {
    let (fatal_tx, fatal) = tokio::sync::mpsc::channel(4);
    // Compiled before any backend starts, so a bad rule stops startup without side effects.
    let rules = RuleSet::from_config(config)?;

    let keys = match JwksKeySource::new(&config.jwt) {
        None => None,
        Some(source) => {
            let source: Arc<dyn KeySource> = Arc::new(source);
            match source.refresh().await {
                Ok(n) => {
                    tracing::info!(source = %source.describe(), keys = n, kids = ?source.key_ids(), "signing keys loaded")
                }
                Err(e) => {
                    if let KeySourceConfig::File(_) = config.jwt.source {
                        // A local file that cannot be read will not fix itself.
                        return Err(ConfigError::invalid("jwt.jwks_file", e.to_string()).into());
                    }
                    tracing::warn!(error = %e, "signing keys not loaded yet; not ready until they are");
                }
            }
            if let (Some(configured), Some(discovered)) =
                (&config.jwt.issuer, source.discovered_issuer())
                && *configured != discovered
            {
                // Every token of the realm would be refused as "wrong issuer": say why now.
                tracing::warn!(
                    configured = %configured,
                    configured_from = config.jwt.issuer_from.unwrap_or("-"),
                    discovered = %discovered,
                    discovered_from = %source.describe(),
                    "the configured issuer differs from the one OIDC discovery found: tokens of this realm will be refused as wrong issuer"
                );
            }
            if config.jwt.issuer.is_none()
                && !matches!(config.jwt.source, KeySourceConfig::Discovery { .. })
            {
                tracing::warn!(
                    "JWT_ISSUER (jwt.issuer) not set: token issuers are not checked; any realm signing with a key in this JWKS is accepted"
                );
            }
            spawn_key_refresh(source.clone(), config, shutdown.clone());
            Some(source)
        }
    };

    let api_keys = match &config.api_keys {
        None => None,
        Some(cfg) => {
            let options = StoreOptions {
                bcrypt_concurrency: cfg.bcrypt_concurrency,
                lookup_secret: cfg.lookup_secret.clone(),
            };
            let store = Arc::new(FileApiKeyStore::open_with(
                &cfg.file,
                clock.clone(),
                &options,
            )?);
            tokio::spawn(store.clone().watch(cfg.reload_interval, shutdown.clone()));
            Some(store as Arc<dyn ApiKeyStore>)
        }
    };
    // The app's key service, asked about keys the file does not hold.
    let exchange = config
        .api_key_exchange
        .as_ref()
        .map(|cfg| Arc::new(ExchangeApiKeyStore::http(cfg, clock.clone())));
    let api_keys = api_key_exchange::compose(api_keys, exchange);

    let openfga = Arc::new(OnceLock::new());
    let openfga_requests = RequestMetrics::default();
    let cache_ttls = Arc::new(CacheTtls::default());
    let model_gate = Arc::new(match &config.openfga {
        None => ModelGate::default(),
        Some(_) => ModelGate::pending(rules.relation_refs()),
    });
    let checker = match &config.openfga {
        None => None,
        Some(fga) => {
            let late = Arc::new(LateChecker::new(format!(
                "OpenFGA at {} not connected yet",
                fga.api_url
            )));
            spawn_openfga(
                fga.clone(),
                config.cache.clone(),
                cache_ttls.clone(),
                model_gate.clone(),
                late.clone(),
                openfga.clone(),
                openfga_requests.clone(),
                fatal_tx.clone(),
                shutdown.clone(),
            );
            Some(late)
        }
    };

    let backends = Backends {
        keys,
        api_keys,
        checker,
        openfga,
        openfga_requests,
        model_gate,
        cache_ttls,
        clock,
    };
    let policy = assemble(config, rules, &backends);
    announce_rollout(&policy);
    let state = State::new(policy, backends);
    state.set_config(config.clone());
    Ok(Built {
        state: Arc::new(state),
        fatal,
    })
}

/// A policy from `config` over `backends`: the rules compiled by [`RuleSet::from_config`],
/// everything else read from the config.
pub fn policy(config: &Config, backends: &Backends) -> Result<Policy, ConfigError> {
    Ok(assemble(config, RuleSet::from_config(config)?, backends))
}

fn assemble(config: &Config, rules: RuleSet, backends: &Backends) -> Policy {
    Policy {
        rules,
        cors: Cors::new(&config.cors),
        authn: Authenticator {
            jwt: backends
                .keys
                .as_ref()
                .map(|keys| JwtVerifier::new(&config.jwt, keys.clone(), backends.clock.clone())),
            api_keys: backends.api_keys.clone(),
            api_key_header: config.api_key_header.name.clone(),
            principals: Principals::new(&config.principals),
            strip_from_upstream: crate::authn::api_key_headers_to_strip(&config.api_key_header),
        },
        authz: Authorizer::new(
            backends
                .checker
                .clone()
                .map(|c| c as Arc<dyn RelationshipChecker>),
            config
                .openfga
                .as_ref()
                .map(|f| f.contextual_tuples.clone())
                .unwrap_or_default(),
        ),
        realm: config.jwt.realm.clone(),
        path_policy: config.request.path_policy,
    }
}

/// Says at startup and on every reload that applies when the rules are not all enforced: a
/// dry run answers denies with allows (a WARN: it is a hole while it lasts), and shadow rules
/// are only logged.
fn announce_rollout(policy: &Policy) {
    if policy.rules.dry_run {
        tracing::warn!(
            "routes.dry_run is on: requests the rules deny with 401/403 are ALLOWED and logged as would_deny (400 refusals, CORS refusals and 503s still apply)"
        );
    }
    let shadow: Vec<&str> = policy
        .rules
        .shadow_rules()
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    if !shadow.is_empty() {
        tracing::info!(rules = ?shadow, "shadow rules are evaluated and logged, never enforced");
    }
}

/// Periodic refresh; while no key is loaded, retry at the cooldown pace instead.
fn spawn_key_refresh(source: Arc<dyn KeySource>, config: &Config, shutdown: CancellationToken) {
    let every = config.jwt.refresh_interval;
    let retry = config.jwt.refresh_cooldown.max(Duration::from_secs(1));
    tokio::spawn(async move {
        loop {
            let wait = if source.ready() { every } else { retry };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            if let Ok(n) = source.refresh().await {
                tracing::debug!(keys = n, "signing keys refreshed");
            }
        }
    });
}

/// Connects to OpenFGA in the background: retries while it is unreachable (readiness stays
/// NOT_SERVING and checks answer 503 naming the cause), stops the process when the
/// configuration cannot work (store or model missing, a rule naming a relation the model
/// lacks), and once connected wraps the client in the decision cache and follows the
/// changelog.
#[allow(clippy::too_many_arguments)]
fn spawn_openfga(
    cfg: OpenFgaConfig,
    cache_cfg: CacheConfig,
    cache_ttls: Arc<CacheTtls>,
    gate: Arc<ModelGate>,
    late: Arc<LateChecker>,
    connected: Arc<OnceLock<OpenFga>>,
    requests: RequestMetrics,
    fatal: tokio::sync::mpsc::Sender<Fatal>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(200);
        let mut last = String::new();
        let client = loop {
            match OpenFgaClient::connect_observed(&cfg, requests.clone()).await {
                Ok(c) => break c,
                Err(e) if e.is_transient() => {
                    let msg = e.to_string();
                    if msg != last {
                        tracing::warn!(error = %msg, "OpenFGA not available yet; retrying");
                    }
                    late.set_pending(msg.clone());
                    last = msg;
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    let _ = fatal.send(Fatal(e.to_string())).await;
                    return;
                }
            }
        };
        let client = Arc::new(client);
        // The serving policy's rules (the first, or a reload's that came before the
        // connection), checked and the gate switched under one lock (see ModelGate).
        let checked = {
            let mut gate = gate.lock();
            let refs = match &*gate {
                Gate::Pending(refs) => refs.clone(),
                _ => Vec::new(),
            };
            let checked = client.validate(&refs).map(|()| refs.len());
            if checked.is_ok() {
                *gate = Gate::Connected(client.clone());
            }
            checked
        };
        let rules_checked = match checked {
            Ok(n) => n,
            Err(e) => {
                let _ = fatal.send(Fatal(e.to_string())).await;
                return;
            }
        };
        tracing::info!(
            url = %client.api_url(),
            store = %client.store_id(),
            model = %client.model_id(),
            pinned = client.model_pinned(),
            rules_checked,
            "OpenFGA connected"
        );
        let cache = cache_cfg
            .enabled
            .then(|| Arc::new(DecisionCache::new(client.clone(), &cache_cfg)));
        if let Some(cache) = &cache {
            cache_ttls.attach(cache.clone());
        }
        // One task follows the changelog (for the cache) and the latest model (unless pinned).
        ChangeWatcher::new(
            client.clone(),
            cache.clone().map(|c| c as Arc<dyn Invalidate>),
            cfg.changelog_interval,
            cfg.changelog_lookback,
        )
        .spawn(shutdown.clone());
        let _ = connected.set(OpenFga {
            client: client.clone(),
            cache: cache.clone(),
        });
        let checker: Arc<dyn RelationshipChecker> = match cache {
            Some(cache) => cache,
            None => client,
        };
        late.set(checker);
    });
}
