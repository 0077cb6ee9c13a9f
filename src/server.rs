//! Process wiring: builds the [`State`] from a [`Config`], starts the gRPC server (Check +
//! grpc.health.v1), the ops HTTP listener (`/healthz`, `/readyz`, `/metrics`) and the
//! background tasks (key refresh, API key reload, OpenFGA connection and changelog), and
//! drains on shutdown.
//!
//! [`run`] takes its listeners from the caller, so tests bind `127.0.0.1:0` and pass them in.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::authn::api_key::{ApiKeyStore, FileApiKeyStore, StoreOptions};
use crate::authn::jwks::{JwksKeySource, KeySource};
use crate::authn::jwt::{Clock, JwtVerifier, system_clock};
use crate::authn::{Authenticator, principals::Principals};
use crate::authz::rules::RuleSet;
use crate::config::{Config, KeySourceConfig, ListenAddr};
use crate::cors::Cors;
use crate::authz::{Authorizer, LateChecker, RelationshipChecker};
use crate::pipeline::State;
use crate::proto::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use crate::service::CheckService;
use crate::telemetry::Metrics;

pub const AUTHORIZATION_SERVICE: &str = "envoy.service.auth.v3.Authorization";

/// The gRPC listener: TCP or a Unix socket.
pub enum GrpcListener {
    Tcp(TcpListener),
    Unix(tokio::net::UnixListener),
}

pub struct Listeners {
    pub grpc: GrpcListener,
    pub ops: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses from the config.
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let grpc = match &config.grpc_addr {
            ListenAddr::Tcp(a) => {
                GrpcListener::Tcp(TcpListener::bind(a).await.with_context(|| {
                    format!("cannot listen on {a} (server.grpc_addr / AUTHZ_GRPC_ADDR)")
                })?)
            }
            ListenAddr::Unix(p) => {
                // A socket left by a previous run would make bind fail.
                if p.exists() {
                    std::fs::remove_file(p)
                        .with_context(|| format!("cannot remove stale socket {}", p.display()))?;
                }
                GrpcListener::Unix(tokio::net::UnixListener::bind(p).with_context(|| {
                    format!(
                        "cannot listen on unix:{} (server.grpc_addr / AUTHZ_GRPC_ADDR)",
                        p.display()
                    )
                })?)
            }
        };
        let ops = match config.ops_addr {
            Some(a) => Some(TcpListener::bind(a).await.with_context(|| {
                format!("cannot listen on {a} (server.ops_addr / AUTHZ_OPS_ADDR)")
            })?),
            None => None,
        };
        Ok(Self { grpc, ops })
    }
}

/// A problem that must stop the process (exit 2): the configuration cannot work.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(pub String);

/// Background work started with the state; stops with the shutdown token.
pub struct Built {
    pub state: Arc<State>,
    pub fatal: tokio::sync::mpsc::Receiver<Fatal>,
    pub openfga_stats: Arc<std::sync::OnceLock<Arc<dyn BackendStats>>>,
}

/// Counters a backend exposes for `/metrics`.
pub trait BackendStats: Send + Sync {
    fn stats(&self) -> Vec<(&'static str, u64)>;
}

/// Builds the state and starts its background tasks. Errors here are startup errors.
pub async fn build(
    config: &Config,
    clock: Clock,
    shutdown: &CancellationToken,
) -> anyhow::Result<Built> {
    let (fatal_tx, fatal) = tokio::sync::mpsc::channel(4);
    let rules = RuleSet::from_config(config)?;

    let jwt = match JwksKeySource::new(&config.jwt) {
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
                        return Err(crate::config::ConfigError::invalid(
                            "jwt.jwks_file",
                            e.to_string(),
                        )
                        .into());
                    }
                    tracing::warn!(error = %e, "signing keys not loaded yet; not ready until they are");
                }
            }
            if config.jwt.issuer.is_none()
                && !matches!(config.jwt.source, KeySourceConfig::Discovery { .. })
            {
                tracing::warn!(
                    "JWT_ISSUER (jwt.issuer) not set: token issuers are not checked; any realm signing with a key in this JWKS is accepted"
                );
            }
            spawn_key_refresh(source.clone(), config, shutdown.clone());
            Some(JwtVerifier::new(&config.jwt, source, clock.clone()))
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

    let openfga_stats = Arc::new(std::sync::OnceLock::new());
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
                rules.relation_refs(),
                late.clone(),
                openfga_stats.clone(),
                fatal_tx.clone(),
                shutdown.clone(),
            );
            Some(late)
        }
    };

    let state = Arc::new(State {
        rules,
        cors: Cors::new(&config.cors),
        authn: Authenticator {
            jwt,
            api_keys,
            api_key_header: config.api_key_header.name.clone(),
            principals: Principals::new(&config.principals),
            strip_from_upstream: crate::authn::api_key_headers_to_strip(&config.api_key_header),
        },
        authz: Authorizer::new(
            checker.map(|c| c as Arc<dyn RelationshipChecker>),
            config
                .openfga
                .as_ref()
                .map(|f| f.contextual_tuples.clone())
                .unwrap_or_default(),
        ),
        realm: config.jwt.realm.clone(),
        path_policy: config.request.path_policy,
    });
    Ok(Built {
        state,
        fatal,
        openfga_stats,
    })
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

/// Runs the sidecar until `shutdown` fires, then drains. Returns an error for a fatal
/// configuration problem found after start (for example an OpenFGA store that does not exist).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let built = build(&config, system_clock(), &shutdown).await?;
    serve(config, built, metrics, listeners, shutdown).await
}

/// Both names Envoy and Kubernetes probe: the server ("") and the Check service.
async fn set_health(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(AUTHORIZATION_SERVICE, status)
        .await;
}

pub async fn serve(
    config: Config,
    built: Built,
    metrics: Arc<Metrics>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Built {
        state,
        mut fatal,
        openfga_stats,
    } = built;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::NotServing).await;

    // Readiness: follow the backends, flip health, and log each transition once.
    let draining = CancellationToken::new();
    {
        let state = state.clone();
        let reporter = reporter.clone();
        let metrics = metrics.clone();
        let draining = draining.clone();
        let stats = openfga_stats.clone();
        tokio::spawn(async move {
            let mut last: Option<bool> = None;
            loop {
                let missing = state.readiness();
                let ready = missing.is_empty() && !draining.is_cancelled();
                if last != Some(ready) {
                    let status = if ready {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    set_health(&reporter, status).await;
                    if ready {
                        tracing::info!("ready: serving checks");
                    } else if draining.is_cancelled() {
                        tracing::info!("draining: health is NOT_SERVING");
                    } else {
                        tracing::warn!(waiting_for = ?missing, "not ready");
                    }
                    last = Some(ready);
                }
                metrics.ready.set(i64::from(ready));
                if let Some(s) = stats.get() {
                    for (name, v) in s.stats() {
                        metrics.set_backend(name, v);
                    }
                }
                if let Some(keys) = &state.authn.api_keys {
                    for (name, v) in keys.stats() {
                        metrics.set_backend(name, v);
                    }
                }
                if draining.is_cancelled() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }

    let ops_task = listeners.ops.map(|l| {
        let addr = l.local_addr().ok();
        tracing::info!(addr = ?addr, "ops listener: /healthz /readyz /metrics");
        tokio::spawn(crate::ops::serve(
            l,
            state.clone(),
            metrics.clone(),
            draining.clone(),
            shutdown.clone(),
        ))
    });

    // Reflection lets grpcurl and other tools call Check and Health without proto files.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("gRPC reflection: descriptor sets do not load")?;
    let grpc_shutdown = CancellationToken::new();
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(AuthorizationServer::new(CheckService::new(
            state.clone(),
            metrics.clone(),
        )));
    let signal = {
        let t = grpc_shutdown.clone();
        async move { t.cancelled().await }
    };
    let grpc_task = match listeners.grpc {
        GrpcListener::Tcp(l) => {
            tracing::info!(addr = ?l.local_addr().ok(), "gRPC listening (envoy.service.auth.v3.Authorization, grpc.health.v1)");
            // Nagle off: without it a response written after a PING ACK waits ~40 ms for the
            // client's delayed ACK (measured, BENCHMARKS.md).
            let incoming = tonic::transport::server::TcpIncoming::from(l)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(60)));
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, signal))
        }
        GrpcListener::Unix(l) => {
            tracing::info!(addr = ?l.local_addr().ok(), "gRPC listening on unix socket");
            tokio::spawn(router.serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(l),
                signal,
            ))
        }
    };

    let mut result = Ok(());
    tokio::select! {
        _ = shutdown.cancelled() => tracing::info!("shutdown requested"),
        Some(f) = fatal.recv() => {
            tracing::error!(error = %f, "fatal");
            result = Err(anyhow::Error::new(f));
        }
    }
    // Health goes NOT_SERVING first so Envoy and Kubernetes stop sending, then in-flight
    // checks finish (bounded by the drain timeout).
    draining.cancel();
    set_health(&reporter, ServingStatus::NotServing).await;
    shutdown.cancel();
    grpc_shutdown.cancel();
    match tokio::time::timeout(config.drain_timeout, grpc_task).await {
        Ok(Ok(Ok(()))) => tracing::info!("gRPC server drained"),
        Ok(Ok(Err(e))) => tracing::error!(error = %e, "gRPC server error"),
        Ok(Err(e)) => tracing::error!(error = %e, "gRPC server task failed"),
        Err(_) => {
            tracing::warn!(timeout = ?config.drain_timeout, "drain timeout: abandoning in-flight checks")
        }
    }
    if let Some(t) = ops_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    if let ListenAddr::Unix(p) = &config.grpc_addr {
        let _ = std::fs::remove_file(p);
    }
    result
}

struct OpenFgaStats {
    client: Arc<crate::authz::openfga::OpenFgaClient>,
    cache: Option<Arc<crate::authz::cache::DecisionCache>>,
}

impl BackendStats for OpenFgaStats {
    fn stats(&self) -> Vec<(&'static str, u64)> {
        let c = self.client.stats();
        let mut out = vec![
            ("openfga_requests", c.requests),
            ("openfga_errors", c.errors),
            ("openfga_short_circuited", c.short_circuited),
            (
                "openfga_breaker_open",
                u64::from(c.breaker != crate::authz::breaker::BreakerState::Closed),
            ),
        ];
        if let Some(cache) = &self.cache {
            let s = cache.stats();
            out.extend([
                ("cache_hits", s.hits),
                ("cache_misses", s.misses),
                ("cache_coalesced", s.coalesced),
                ("cache_evictions", s.evictions),
                ("cache_invalidations", s.invalidations),
                ("cache_size", s.size),
            ]);
        }
        out
    }
}

/// Connects to OpenFGA in the background: retries while it is unreachable (readiness stays
/// NOT_SERVING and checks answer 503 naming the cause), stops the process when the
/// configuration cannot work (store or model missing, a rule naming a relation the model
/// lacks), and once connected wraps the client in the decision cache and follows the
/// changelog.
#[allow(clippy::too_many_arguments)]
fn spawn_openfga(
    cfg: crate::config::OpenFgaConfig,
    cache_cfg: crate::config::CacheConfig,
    refs: Vec<crate::authz::RelationRef>,
    late: Arc<LateChecker>,
    stats: Arc<std::sync::OnceLock<Arc<dyn BackendStats>>>,
    fatal: tokio::sync::mpsc::Sender<Fatal>,
    shutdown: CancellationToken,
) {
    use crate::authz::cache::{DecisionCache, Invalidate};
    use crate::authz::openfga::{ChangeWatcher, OpenFgaClient};
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(200);
        let mut last = String::new();
        let client = loop {
            match OpenFgaClient::connect(&cfg).await {
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
        if let Err(e) = client.validate(&refs) {
            let _ = fatal.send(Fatal(e.to_string())).await;
            return;
        }
        tracing::info!(
            url = %client.api_url(),
            store = %client.store_id(),
            model = %client.model_id(),
            pinned = client.model_pinned(),
            rules_checked = refs.len(),
            "OpenFGA connected"
        );
        let client = Arc::new(client);
        let cache = cache_cfg
            .enabled
            .then(|| Arc::new(DecisionCache::new(client.clone(), &cache_cfg)));
        // One task follows the changelog (for the cache) and the latest model (unless pinned).
        ChangeWatcher::new(
            client.clone(),
            cache.clone().map(|c| c as Arc<dyn Invalidate>),
            cfg.changelog_interval,
        )
        .spawn(shutdown.clone());
        let _ = stats.set(Arc::new(OpenFgaStats {
            client: client.clone(),
            cache: cache.clone(),
        }));
        let checker: Arc<dyn RelationshipChecker> = match cache {
            Some(cache) => cache,
            None => client,
        };
        late.set(checker);
    });
}
