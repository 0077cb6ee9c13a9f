//! The gRPC adapter: `envoy.service.auth.v3.Authorization/Check` converts the request
//! ([`crate::request`]), runs [`crate::pipeline::check`], logs one decision line, records
//! metrics and converts the answer ([`crate::response`]). A policy deny is an `Ok` answer;
//! `Err(Status)` only for a request that is not an HTTP check at all.
//!
//! Each check gets a [`DecisionId`]: in its decision line (when `log.decisions` and
//! `log.allow_sample` keep it), its deny body and the dynamic metadata Envoy logs, so one id
//! joins the three.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use crate::decision::{Decision, Failure, deny_for};
use crate::pipeline;
use crate::proto::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, authorization_server::Authorization,
};
use crate::request::{self, RequestError};
use crate::response;
use crate::state::State;
use crate::telemetry::{DecisionId, DecisionLog, Metrics};

pub struct CheckService {
    state: Arc<State>,
    metrics: Arc<Metrics>,
    log: DecisionLog,
}

impl CheckService {
    /// Logs every decision; see [`CheckService::with_decision_log`].
    pub fn new(state: Arc<State>, metrics: Arc<Metrics>) -> Self {
        Self {
            state,
            metrics,
            log: DecisionLog::default(),
        }
    }

    /// Which decisions get a line (`log.decisions`, `log.allow_sample`).
    pub fn with_decision_log(mut self, log: DecisionLog) -> Self {
        self.log = log;
        self
    }
}

/// The one decision line per check. Never a token or key: ids and hashes only. Path, host,
/// request id, reason and the rest are the client's text: the text log's field formatter
/// ([`crate::telemetry::LogFields`]) escapes them, so none can start a line of its own.
fn log_decision(input: &request::CheckInput, d: &Decision, id: DecisionId, micros: u128) {
    match d {
        Decision::Allow(a) => {
            let p = a.principal.as_ref();
            tracing::info!(
                decision = "allow",
                decision_id = %id,
                request_id = %input.request_id,
                host = %input.host,
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
                decision_id = %id,
                request_id = %input.request_id,
                host = %input.host,
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

/// One line per shadow rule that matched and one for a deny the dry run relaxed, after the
/// decision line (same request id): what the request *would* have got. Never the answer.
fn log_shadow(
    input: &request::CheckInput,
    shadow: &[pipeline::ShadowOutcome],
    dry_run: Option<&crate::decision::Deny>,
) {
    for o in shadow {
        tracing::info!(
            decision = "shadow",
            request_id = %input.request_id,
            method = %input.method,
            path = %input.path,
            rule = %o.rule,
            outcome = o.outcome.as_str(),
            status = o.status,
            reason = %o.reason,
            subject = o.subject.as_deref().unwrap_or("-"),
            "shadow rule"
        );
    }
    if let Some(d) = dry_run {
        tracing::info!(
            decision = "dry_run",
            request_id = %input.request_id,
            method = %input.method,
            path = %input.path,
            rule = d.rule.as_deref().unwrap_or("unmatched"),
            outcome = "would_deny",
            status = d.http_status,
            error = d.error,
            reason = %d.detail,
            subject = d.principal.as_ref().map_or("-", |p| p.subject.as_str()),
            "dry run: allowed a request the rules deny"
        );
    }
}

#[tonic::async_trait]
impl Authorization for CheckService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let start = Instant::now();
        let id = DecisionId::new();
        // The policy this check decides on, to the end, whatever a reload swaps in meanwhile.
        let policy = self.state.policy();
        let input = match request::from_proto(request.into_inner(), policy.path_policy) {
            Ok(input) => input,
            Err(RequestError::NoHttpAttributes) => {
                return Err(Status::invalid_argument(
                    RequestError::NoHttpAttributes.to_string(),
                ));
            }
            Err(e) => {
                let request_id = request::new_request_id();
                let decision = Decision::Deny(deny_for(&Failure::Request(e), &policy.realm));
                let input = request::CheckInput {
                    request_id: request_id.clone(),
                    ..Default::default()
                };
                if self.log.logs(false, id) {
                    log_decision(&input, &decision, id, start.elapsed().as_micros());
                }
                self.metrics.record(&policy, &decision, start.elapsed());
                return Ok(Response::new(response::to_proto_with_id(
                    &decision,
                    &request_id,
                    &id.to_string(),
                    &policy.authn.strip_from_upstream,
                )));
            }
        };
        tracing::debug!(request_id = %input.request_id, method = %input.method, path = %input.path, host = %input.host, peer = ?input.peer, "check received");
        let checked = pipeline::check_full(&policy, &input, None).await;
        let decision = checked.decision;
        let elapsed = start.elapsed();
        if self.log.logs(decision.is_allow(), id) {
            log_decision(&input, &decision, id, elapsed.as_micros());
        }
        if !checked.shadow.is_empty() || checked.dry_run.is_some() {
            log_shadow(&input, &checked.shadow, checked.dry_run.as_ref());
            self.metrics
                .record_shadow(&checked.shadow, checked.dry_run.as_ref());
        }
        self.metrics.record(&policy, &decision, elapsed);
        Ok(Response::new(response::to_proto_with_id(
            &decision,
            &input.request_id,
            &id.to_string(),
            &policy.authn.strip_from_upstream,
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use tokio::sync::{Notify, Semaphore};

    use super::*;
    use crate::authn::api_key::ApiKeyStore;
    use crate::authn::{AuthMethod, AuthnError, Principal, PrincipalKind};
    use crate::config::Config;
    use crate::proto::pb::envoy::service::auth::v3::{AttributeContext, attribute_context};
    use crate::state::Backends;

    /// Every key is alice's, once the gate opens; says when a check has reached it.
    struct GatedKeys {
        entered: Notify,
        gate: Semaphore,
    }

    #[async_trait::async_trait]
    impl ApiKeyStore for GatedKeys {
        async fn authenticate(&self, _: &str) -> Result<Principal, AuthnError> {
            self.entered.notify_one();
            let _pass = self.gate.acquire().await.expect("gate open");
            Ok(Principal::new(
                PrincipalKind::User,
                "alice",
                AuthMethod::ApiKey,
            ))
        }
        fn len(&self) -> usize {
            1
        }
        fn describe(&self) -> String {
            "gated keys".into()
        }
    }

    fn config(rules: &str) -> Config {
        Config::from_yaml(
            &format!("jwt: {{ jwks_file: k }}\nroutes: {{ rules: {rules} }}\n"),
            std::path::Path::new("/"),
            &std::collections::BTreeMap::new(),
        )
        .unwrap()
    }

    fn get_docs() -> Request<CheckRequest> {
        Request::new(CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request {
                    http: Some(attribute_context::HttpRequest {
                        method: "GET".into(),
                        path: "/docs".into(),
                        host: "app".into(),
                        headers: [("x-api-key".to_string(), "k".to_string())].into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
    }

    /// The gRPC status code of a check's answer: 0 allows, 7 is a 403.
    async fn code(service: &CheckService, request: Request<CheckRequest>) -> i32 {
        let answer = Authorization::check(service, request).await.unwrap();
        answer.into_inner().status.unwrap().code
    }

    #[tokio::test]
    async fn a_check_in_flight_keeps_the_policy_it_started_with() {
        let keys = Arc::new(GatedKeys {
            entered: Notify::new(),
            gate: Semaphore::new(0),
        });
        let backends = Backends {
            keys: None,
            api_keys: Some(keys.clone()),
            checker: None,
            openfga: Arc::new(OnceLock::new()),
            openfga_requests: Default::default(),
            model_gate: Default::default(),
            cache_ttls: Default::default(),
            clock: crate::clock::system_clock(),
        };
        let open = config("[ { name: any-caller, path: /docs } ]");
        let admins_only = config("[ { name: admins-only, path: /docs, roles: [admin] } ]");
        let policy = crate::state::policy(&open, &backends).unwrap();
        let state = Arc::new(State::new(policy, backends));
        let service = Arc::new(CheckService::new(state.clone(), Metrics::new()));

        let in_flight = tokio::spawn({
            let service = service.clone();
            async move { code(&service, get_docs()).await }
        });
        keys.entered.notified().await;
        let old = state.swap_policy(state.build_policy(&admins_only).unwrap());
        assert_eq!(old.rules.rules()[0].name, "any-caller");
        keys.gate.add_permits(2);

        assert_eq!(
            in_flight.await.unwrap(),
            tonic::Code::Ok as i32,
            "the check that started under any-caller is decided by it"
        );
        assert_eq!(
            code(&service, get_docs()).await,
            tonic::Code::PermissionDenied as i32,
            "the next check is decided by admins-only"
        );
    }

    /// Everything written to it, shared with the test.
    #[derive(Clone, Default)]
    struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn get(path: &str) -> Request<CheckRequest> {
        let mut r = get_docs();
        let http = r.get_mut().attributes.as_mut().unwrap();
        let http = http.request.as_mut().unwrap().http.as_mut().unwrap();
        http.path = path.into();
        http.headers.clear();
        r
    }

    /// The decision id of an answer's dynamic metadata.
    fn decision_id(r: &CheckResponse) -> String {
        match &r.dynamic_metadata.as_ref().unwrap().fields["decision_id"].kind {
            Some(prost_types::value::Kind::StringValue(s)) => s.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn under_log_decisions_deny_only_denies_get_a_line_and_it_names_the_answers_id() {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .finish();
        // This thread runs the whole test (current_thread runtime).
        let _guard = tracing::subscriber::set_default(subscriber);
        let cfg = Config::from_yaml(
            "jwt: { jwks_file: k }\nlog: { decisions: deny }\nroutes: { rules: [ { name: docs, path: /docs, public: true } ] }\n",
            std::path::Path::new("/"),
            &std::collections::BTreeMap::new(),
        )
        .unwrap();
        let backends = Backends {
            keys: None,
            api_keys: None,
            checker: None,
            openfga: Arc::new(OnceLock::new()),
            openfga_requests: Default::default(),
            model_gate: Default::default(),
            cache_ttls: Default::default(),
            clock: crate::clock::system_clock(),
        };
        let policy = crate::state::policy(&cfg, &backends).unwrap();
        let service = CheckService::new(Arc::new(State::new(policy, backends)), Metrics::new())
            .with_decision_log(DecisionLog::new(&cfg.log));

        let allowed = Authorization::check(&service, get("/docs"))
            .await
            .unwrap()
            .into_inner();
        let denied = Authorization::check(&service, get("/elsewhere"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            allowed.status.as_ref().unwrap().code,
            tonic::Code::Ok as i32
        );
        assert_ne!(decision_id(&allowed), decision_id(&denied));

        let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|v: &serde_json::Value| v["message"] == "check")
            .collect();
        assert_eq!(lines.len(), 1, "one line, the deny's:\n{text}");
        assert_eq!(lines[0]["decision"], "deny");
        assert_eq!(lines[0]["decision_id"], decision_id(&denied).as_str());
        assert_eq!(lines[0]["host"], "app");
    }
}
