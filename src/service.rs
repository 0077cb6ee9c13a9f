//! The gRPC adapter: `envoy.service.auth.v3.Authorization/Check` converts the request
//! ([`crate::request`]), runs [`crate::pipeline::check`], logs one decision line, records
//! metrics and converts the answer ([`crate::response`]). A policy deny is an `Ok` answer;
//! `Err(Status)` only for a request that is not an HTTP check at all.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use crate::decision::{Decision, Failure, deny_for};
use crate::pipeline::{self, State};
use crate::proto::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, authorization_server::Authorization,
};
use crate::request::{self, RequestError};
use crate::response;
use crate::telemetry::Metrics;

pub struct CheckService {
    state: Arc<State>,
    metrics: Arc<Metrics>,
}

impl CheckService {
    pub fn new(state: Arc<State>, metrics: Arc<Metrics>) -> Self {
        Self { state, metrics }
    }
}

fn method_label(d: &Decision) -> &'static str {
    let p = match d {
        Decision::Allow(a) => a.principal.as_ref(),
        Decision::Deny(d) => d.principal.as_ref(),
    };
    p.map_or("none", |p| p.method.as_str())
}

/// The one decision line per check. Never a token or key: ids and hashes only. Path, request
/// id, reason and the rest are the client's text: the text log's field formatter
/// ([`crate::telemetry::LogFields`]) escapes them, so none can start a line of its own.
fn log_decision(input: &request::CheckInput, d: &Decision, micros: u128) {
    match d {
        Decision::Allow(a) => {
            let p = a.principal.as_ref();
            tracing::info!(
                decision = "allow",
                request_id = %input.request_id,
                method = %input.method,
                path = %input.path,
                rule = %a.rule,
                subject = p.map_or("-", |p| p.subject.as_str()),
                auth = p.map_or("-", |p| p.method.as_str()),
                key_id = p.map_or("-", |p| p.key_id.as_str()),
                credential = p.map_or("-", |p| p.credential_hash.as_str()),
                relations = ?a.relations,
                failed_open = a.failed_open.as_deref().unwrap_or(""),
                latency_us = micros as u64,
                "check"
            );
        }
        Decision::Deny(d) => {
            let p = d.principal.as_ref();
            tracing::info!(
                decision = "deny",
                request_id = %input.request_id,
                method = %input.method,
                path = %input.path,
                rule = d.rule.as_deref().unwrap_or("-"),
                status = d.http_status,
                error = d.error,
                reason = %d.detail,
                subject = p.map_or("-", |p| p.subject.as_str()),
                key_id = p.map_or("-", |p| p.key_id.as_str()),
                latency_us = micros as u64,
                "check"
            );
        }
    }
}

#[tonic::async_trait]
impl Authorization for CheckService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let start = Instant::now();
        let input = match request::from_proto(request.into_inner(), self.state.path_policy) {
            Ok(input) => input,
            Err(RequestError::NoHttpAttributes) => {
                return Err(Status::invalid_argument(
                    RequestError::NoHttpAttributes.to_string(),
                ));
            }
            Err(e) => {
                let request_id = request::new_request_id();
                let decision = Decision::Deny(deny_for(&Failure::Request(e), &self.state.realm));
                let input = request::CheckInput {
                    request_id: request_id.clone(),
                    ..Default::default()
                };
                log_decision(&input, &decision, start.elapsed().as_micros());
                self.metrics.record(&decision, start.elapsed(), "none");
                return Ok(Response::new(response::to_proto(
                    &decision,
                    &request_id,
                    &self.state.authn.strip_from_upstream,
                )));
            }
        };
        tracing::debug!(request_id = %input.request_id, method = %input.method, path = %input.path, host = %input.host, peer = ?input.peer, "check received");
        let decision = pipeline::check(&self.state, &input).await;
        let elapsed = start.elapsed();
        log_decision(&input, &decision, elapsed.as_micros());
        self.metrics
            .record(&decision, elapsed, method_label(&decision));
        Ok(Response::new(response::to_proto(
            &decision,
            &input.request_id,
            &self.state.authn.strip_from_upstream,
        )))
    }
}
