//! Serving: the listeners, the gRPC server (Check + grpc.health.v1 + reflection), the ops HTTP
//! listener (`/healthz`, `/readyz`, `/metrics`), health that follows readiness, and the drain
//! on shutdown. What it serves is built by [`crate::state`] (the composition root).
//!
//! [`run`] takes its listeners from the caller, so tests bind `127.0.0.1:0` and pass them in;
//! [`run_with`] also reloads the config from its file ([`crate::reload`]).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::clock::system_clock;
use crate::config::{Config, ListenAddr};
use crate::proto::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use crate::reload::{ConfigSource, ContentHash, Reloader, Requests};
use crate::service::CheckService;
use crate::state::{Built, build};
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

/// Runs the sidecar until `shutdown` fires, then drains. Returns an error for a fatal
/// configuration problem found after start (for example an OpenFGA store that does not exist).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with(config, None, listeners, shutdown).await
}

/// Where a running server reloads its config from.
pub struct Reload {
    /// The file the config was read from, read again the same way on a reload.
    pub source: ConfigSource,
    /// The hash of the bytes the starting config was read from.
    pub hash: Option<ContentHash>,
    /// Reload requests (SIGHUP).
    pub requests: Requests,
}

/// [`run`], reloading the config on [`Reload::requests`] and when its file changes.
pub async fn run_with(
    config: Config,
    reload: Option<Reload>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let built = build(&config, system_clock(), &shutdown).await?;
    metrics
        .config_last_success
        .set(i64::try_from(crate::clock::now_secs()).unwrap_or(i64::MAX));
    if let Some(reload) = reload {
        let reloader = Arc::new(Reloader::new(
            reload.source,
            config.clone(),
            reload.hash,
            built.state.clone(),
            metrics.clone(),
        ));
        tokio::spawn(
            reloader
                .clone()
                .serve_requests(reload.requests, shutdown.clone()),
        );
        tokio::spawn(reloader.watch(shutdown.clone()));
    }
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
    let Built { state, mut fatal } = built;
    metrics.watch_backends(&state);
    let (reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::NotServing).await;

    // Readiness: follow the backends, flip health, and log each transition once. (The
    // backends' figures are read by `/metrics` when scraped, not copied here.)
    let draining = CancellationToken::new();
    {
        let state = state.clone();
        let reporter = reporter.clone();
        let metrics = metrics.clone();
        let draining = draining.clone();

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
                if draining.is_cancelled() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }

    // Cancelled after the shutdown delay: the ops listener keeps answering /readyz (503,
    // draining) until then.
    let stop_serving = CancellationToken::new();
    let ops_task = listeners.ops.map(|l| {
        let addr = l.local_addr().ok();
        tracing::info!(addr = ?addr, "ops listener: /healthz /readyz /metrics");
        tokio::spawn(crate::ops::serve(
            l,
            state.clone(),
            metrics.clone(),
            draining.clone(),
            stop_serving.clone(),
        ))
    });

    // Reflection lets grpcurl and other tools call Check and Health without proto files; off
    // unless the config asks (`server.reflection`), as it tells any caller the API.
    let reflection = if config.reflection {
        Some(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .build_v1()
                .context("gRPC reflection: descriptor sets do not load")?,
        )
    } else {
        None
    };
    let grpc_shutdown = CancellationToken::new();
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health_service)
        .add_optional_service(reflection)
        .add_service(AuthorizationServer::new(
            CheckService::new(state.clone(), metrics.clone())
                .with_decision_log(crate::telemetry::DecisionLog::new(&config.log)),
        ));
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
    // Health goes NOT_SERVING first so Envoy and Kubernetes stop sending. On a requested
    // shutdown the listeners stay open for the shutdown delay, answering the checks Envoy still
    // sends while the endpoints controller and Envoy catch up (a closed listener then would
    // fail them closed); then in-flight checks finish, bounded by the drain timeout.
    draining.cancel();
    set_health(&reporter, ServingStatus::NotServing).await;
    if result.is_ok() && !config.shutdown_delay.is_zero() {
        tracing::info!(
            delay = ?config.shutdown_delay,
            "shutdown delay: health NOT_SERVING, still answering checks"
        );
        tokio::time::sleep(config.shutdown_delay).await;
    }
    stop_serving.cancel();
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
