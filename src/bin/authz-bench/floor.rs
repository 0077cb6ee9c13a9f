//! The floor: an allow-all `Check` server, the least any Check server can cost on the sidecar's
//! gRPC stack. Everything but the decision is the sidecar's: the same generated service
//! (`authz_sidecar::proto`), tonic server settings (HTTP/2 keepalive 30 s), accepted sockets
//! with `TCP_NODELAY` and keepalive 60 s (`src/server.rs`), and a default multi-threaded tokio
//! runtime as in `src/main.rs`. The answer is a fixed `ok_response` without headers; the
//! request is decoded (tonic does that before the handler) and dropped.
//!
//! Keep this in step with `src/server.rs`: if the sidecar's transport settings change, a ratio
//! against a floor that did not follow would measure the settings, not the decision.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use authz_sidecar::proto::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, OkHttpResponse,
    authorization_server::{Authorization, AuthorizationServer},
    check_response::HttpResponse,
};
use authz_sidecar::proto::pb::google::rpc::Status as RpcStatus;
use tonic::{Request, Response, Status};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Listen address; port 0 picks a free one (printed on stdout as `listening ADDR`).
    #[arg(long, default_value = "127.0.0.1:9191")]
    addr: SocketAddr,
}

struct AllowAll;

#[tonic::async_trait]
impl Authorization for AllowAll {
    async fn check(
        &self,
        _request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(CheckResponse {
            status: Some(RpcStatus::default()),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
            dynamic_metadata: None,
        }))
    }
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    println!("listening {}", listener.local_addr()?);
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(AuthorizationServer::new(AllowAll))
        .serve_with_incoming_shutdown(incoming, shutdown_signal())
        .await?;
    Ok(())
}

/// SIGTERM (how scripts and tests stop it) or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
