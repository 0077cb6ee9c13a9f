//! The ops HTTP listener: `/healthz` (alive), `/readyz` (every backend ready, with what is
//! missing in the body), `/metrics` (Prometheus text 0.0.4, or
//! OpenMetrics when the scraper's `Accept` asks for it) and the operator's admin endpoints:
//! `POST /admin/cache/flush`, `POST /admin/jwks/refresh`, `GET /admin/config`.
//!
//! Invariant: the listener answers probes and scrapes from anywhere it is reachable, but an
//! admin route answers only a peer on this host's loopback (`127.0.0.1`, `::1`) unless
//! `server.admin.allow_remote` says otherwise; any other peer gets 403 with one line saying
//! why, before anything is done. Mutating routes are POST only (another method: 405).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, State as AxumState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::AdminConfig;
use crate::state::State;
use crate::telemetry::Metrics;
use crate::telemetry::exposition::{OPENMETRICS_TEXT, PROMETHEUS_TEXT, wants_openmetrics};

#[derive(Clone)]
struct Ops {
    state: Arc<State>,
    metrics: Arc<Metrics>,
    draining: CancellationToken,
}

pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    metrics: Arc<Metrics>,
    draining: CancellationToken,
    shutdown: CancellationToken,
) {
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/admin/cache/flush", post(cache_flush))
        .route("/admin/jwks/refresh", post(jwks_refresh))
        .route("/admin/config", get(config))
        .with_state(Ops {
            state,
            metrics,
            draining,
        });
    if let Err(e) = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
    {
        tracing::error!(error = %e, "ops listener failed");
    }
}

async fn readyz(AxumState(ops): AxumState<Ops>) -> impl IntoResponse {
    let mut missing = ops.state.readiness();
    if ops.draining.is_cancelled() {
        missing.push("draining".into());
    }
    let body = serde_json::json!({"ready": missing.is_empty(), "waiting_for": missing}).to_string();
    let status = if missing.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, [(header::CONTENT_TYPE, "application/json")], body)
}

async fn metrics_text(AxumState(ops): AxumState<Ops>, headers: HeaderMap) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    if wants_openmetrics(accept) {
        (
            [(header::CONTENT_TYPE, OPENMETRICS_TEXT)],
            ops.metrics.encode(),
        )
    } else {
        (
            [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
            ops.metrics.encode_text(),
        )
    }
}

/// A peer on this host's loopback: `127.0.0.1` or `::1` (also as `::ffff:127.0.0.1`). Not
/// the rest of `127.0.0.0/8`: Istio's sidecar forwards inbound mesh traffic from
/// `127.0.0.6`, so a remote caller reaching the ops port through the mesh arrives from a
/// loopback address that is not `127.0.0.1`.
pub fn is_local_operator(peer: IpAddr) -> bool {
    match peer.to_canonical() {
        IpAddr::V4(v4) => v4 == Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => v6.is_loopback(),
    }
}

/// Why `peer` may not use the admin routes under `admin`, or `None` when it may.
pub fn admin_refusal(admin: &AdminConfig, peer: IpAddr) -> Option<(StatusCode, String)> {
    if !admin.enabled {
        return Some((
            StatusCode::NOT_FOUND,
            "admin endpoints are off (server.admin.enabled: false)\n".into(),
        ));
    }
    if admin.allow_remote || is_local_operator(peer) {
        return None;
    }
    Some((
        StatusCode::FORBIDDEN,
        format!(
            "admin endpoints answer loopback peers (127.0.0.1, ::1) only, not {peer}; set server.admin.allow_remote: true to allow others\n"
        ),
    ))
}

/// The admin gate, run first by every admin route: the refusal to answer instead, if any.
/// Logs who was refused and who was served.
fn gate(ops: &Ops, peer: SocketAddr, route: &str) -> Option<Response> {
    let admin = ops.state.config().map(|c| c.admin).unwrap_or_default();
    match admin_refusal(&admin, peer.ip()) {
        None => {
            tracing::info!(route, peer = %peer, "admin request");
            None
        }
        Some((status, why)) => {
            tracing::warn!(route, peer = %peer, status = status.as_u16(), "admin request refused");
            Some((status, [(header::CONTENT_TYPE, "text/plain")], why).into_response())
        }
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
        .into_response()
}

/// Drops every remembered OpenFGA answer and verified token; answers how many.
async fn cache_flush(
    AxumState(ops): AxumState<Ops>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if let Some(refused) = gate(&ops, peer, "/admin/cache/flush") {
        return refused;
    }
    let flushed = ops.state.flush_caches();
    tracing::info!(
        decisions = flushed.decisions,
        tokens = flushed.tokens,
        "caches flushed by an operator"
    );
    json(
        StatusCode::OK,
        serde_json::json!({"flushed": {"decisions": flushed.decisions, "tokens": flushed.tokens}}),
    )
}

/// Fetches the signing keys now; answers the key ids loaded, or 502 with the error naming
/// the source (this answer is the operator's, so the URL may be in it).
async fn jwks_refresh(
    AxumState(ops): AxumState<Ops>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if let Some(refused) = gate(&ops, peer, "/admin/jwks/refresh") {
        return refused;
    }
    match ops.state.refresh_keys().await {
        Ok(r) => {
            tracing::info!(source = %r.source, kids = ?r.key_ids, "signing keys refreshed by an operator");
            json(
                StatusCode::OK,
                serde_json::json!({
                    "source": r.source,
                    "key_ids": r.key_ids,
                    "tokens_forgotten": r.tokens_forgotten,
                }),
            )
        }
        Err(error) => {
            tracing::warn!(%error, "operator's signing key refresh failed; the last good keys keep serving");
            json(StatusCode::BAD_GATEWAY, serde_json::json!({"error": error}))
        }
    }
}

/// The effective config with every secret redacted ([`crate::config::Config::redacted`]).
async fn config(
    AxumState(ops): AxumState<Ops>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if let Some(refused) = gate(&ops, peer, "/admin/config") {
        return refused;
    }
    match ops.state.config() {
        Some(config) => json(StatusCode::OK, config.redacted()),
        None => json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "no config recorded"}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL_ONLY: AdminConfig = AdminConfig {
        enabled: true,
        allow_remote: false,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_this_hosts_loopback_may_use_the_admin_routes_by_default() {
        for peer in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
            assert!(admin_refusal(&LOCAL_ONLY, ip(peer)).is_none(), "{peer}");
        }
        for peer in [
            "127.0.0.6",
            "10.0.0.7",
            "192.0.2.2",
            "::ffff:10.0.0.7",
            "fd00::2",
            "0.0.0.0",
        ] {
            let (status, why) = admin_refusal(&LOCAL_ONLY, ip(peer)).expect(peer);
            assert_eq!(status, StatusCode::FORBIDDEN, "{peer}");
            assert!(
                why.contains(peer) && why.contains("server.admin.allow_remote"),
                "{why}"
            );
            assert_eq!(why.lines().count(), 1, "one line: {why}");
        }
    }

    #[test]
    fn allow_remote_opens_the_admin_routes_and_disabled_closes_them_to_everyone() {
        let remote = AdminConfig {
            enabled: true,
            allow_remote: true,
        };
        assert!(admin_refusal(&remote, ip("10.0.0.7")).is_none());
        let off = AdminConfig {
            enabled: false,
            allow_remote: true,
        };
        for peer in ["127.0.0.1", "10.0.0.7"] {
            assert_eq!(
                admin_refusal(&off, ip(peer)).map(|(s, _)| s),
                Some(StatusCode::NOT_FOUND)
            );
        }
    }
}
