//! The floor: an allow-all `Check` server, the least any Check server can cost on the sidecar's
//! gRPC stack. Everything but the decision is the sidecar's: the same generated service
//! (`authz_sidecar::proto`), tonic server settings (HTTP/2 keepalive 30 s), accepted sockets
//! with `TCP_NODELAY` and keepalive 60 s (`src/server.rs`), and a default multi-threaded tokio
//! runtime as in `src/main.rs`. The answer is a fixed `ok_response` without headers; the
//! request is decoded (tonic does that before the handler) and dropped.
//!
//! `--answer FILE` makes the floor answer as the sidecar would, without deciding anything:
//! FILE is `authz-sidecar check --json` output for the path under test, and every answer
//! sets and removes those headers and carries dynamic metadata of the sidecar's four fields.
//! Through Envoy, that separates Envoy's cost of applying the sidecar's answer (identity
//! headers, metadata) from the sidecar's cost of deciding it.
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
    /// Answer with the headers and metadata of this `authz-sidecar check --json` output
    /// (an allow) instead of an empty allow.
    #[arg(long, value_name = "FILE")]
    answer: Option<std::path::PathBuf>,
}

/// The fixed answer, cloned for every check (the sidecar builds its own per check, so a
/// clone is the closest the floor gets without deciding).
struct AllowAll {
    answer: CheckResponse,
}

#[tonic::async_trait]
impl Authorization for AllowAll {
    async fn check(
        &self,
        _request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(self.answer.clone()))
    }
}

fn empty_allow() -> CheckResponse {
    CheckResponse {
        status: Some(RpcStatus::default()),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
        dynamic_metadata: None,
    }
}

/// The sidecar's answer as `check --json` shows it: `set` [{name, value}], `remove` [name],
/// `rule`; the metadata gets `decision_id` (a fixed 16-hex id), `decision`, `rule` and the
/// `x-auth-subject` value as `subject`, as the sidecar sends them.
fn answer_from(path: &std::path::Path) -> anyhow::Result<CheckResponse> {
    use anyhow::Context;
    use authz_sidecar::proto::pb::envoy::config::core::v3::{
        HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
    };
    use prost_types::value::Kind;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("--answer {}", path.display()))?;
    let shown: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("--answer {}: not JSON", path.display()))?;
    if shown["decision"] != "allow" || shown["forwarded"] != true {
        anyhow::bail!("--answer {}: not a forwarded allow", path.display());
    }
    let text_of = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    let mut subject = String::new();
    for h in shown["set"].as_array().into_iter().flatten() {
        let (name, value) = (text_of(&h["name"]), text_of(&h["value"]));
        if name == "x-auth-subject" {
            subject = value.clone();
        }
        headers.push(HeaderValueOption {
            header: Some(HeaderValue {
                key: name,
                value,
                ..Default::default()
            }),
            append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
            ..Default::default()
        });
    }
    let headers_to_remove = shown["remove"]
        .as_array()
        .into_iter()
        .flatten()
        .map(text_of)
        .collect();
    let mut fields = std::collections::BTreeMap::new();
    let fixed = [
        ("decision_id", "0123456789abcdef".to_string()),
        ("decision", "allow".to_string()),
    ];
    // As the sidecar: `rule` and `subject` only when there is one.
    let known = [("rule", text_of(&shown["rule"])), ("subject", subject)]
        .into_iter()
        .filter(|(_, v)| !v.is_empty());
    for (k, v) in fixed.into_iter().chain(known) {
        fields.insert(
            k.to_string(),
            prost_types::Value {
                kind: Some(Kind::StringValue(v)),
            },
        );
    }
    Ok(CheckResponse {
        status: Some(RpcStatus::default()),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers,
            headers_to_remove,
            ..Default::default()
        })),
        dynamic_metadata: Some(prost_types::Struct { fields }),
    })
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let answer = match &args.answer {
        Some(path) => answer_from(path)?,
        None => empty_allow(),
    };
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    println!("listening {}", listener.local_addr()?);
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(AuthorizationServer::new(AllowAll { answer }))
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
