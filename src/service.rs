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
use tracing::Instrument as _;

use crate::decision::{Decision, Failure, deny_for};
use crate::pipeline;
use crate::proto::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, authorization_server::Authorization,
};
use crate::request::{self, RequestError};
use crate::response;
use crate::state::State;
use crate::telemetry::{DecisionId, DecisionLog, Metrics};
use crate::tracing_export::{self, Carrier, LogTraceId};

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
fn log_decision(
    input: &request::CheckInput,
    d: &Decision,
    id: DecisionId,
    micros: u128,
    trace_id: LogTraceId,
) {
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
                trace_id = %trace_id,
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
                trace_id = %trace_id,
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

/// A metadata entry as text (`None` when absent or not text).
fn metadata_str<'a>(metadata: &'a tonic::metadata::MetadataMap, key: &str) -> Option<&'a str> {
    metadata.get(key).and_then(|v| v.to_str().ok())
}

/// A W3C trace-context carrier from `traceparent` and `tracestate` as `get` reads them; the
/// `tracestate` is only looked up when there is a `traceparent` to go with it.
fn carrier<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Carrier<'a> {
    let traceparent = get("traceparent");
    Carrier {
        traceparent,
        tracestate: traceparent.and_then(|_| get("tracestate")),
    }
}

/// The check's span (see [`crate::tracing_export`]): disabled, and nothing below evaluated,
/// unless spans are exported. A child of the caller's span when there is one.
fn check_span(
    input: &request::CheckInput,
    parent: Option<&opentelemetry::trace::SpanContext>,
) -> tracing::Span {
    let span = tracing::info_span!(
        target: tracing_export::TARGET,
        "check",
        otel.kind = "server",
        request_id = %input.request_id,
        method = %input.method,
        host = %input.host,
        path = %input.path,
        decision = tracing::field::Empty,
        status = tracing::field::Empty,
        rule = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    tracing_export::set_parent(&span, parent);
    span
}

/// The decision on the check's span: decision, HTTP status and rule; an error status when
/// the answer is a 5xx (a backend failed), not for a policy deny.
fn record_decision(span: &tracing::Span, d: &Decision) {
    if span.is_disabled() {
        return;
    }
    let (decision, status, rule) = match d {
        Decision::Allow(a) => ("allow", a.local_reply.unwrap_or(200), a.rule.as_str()),
        Decision::Deny(d) => ("deny", d.http_status, d.rule.as_deref().unwrap_or("-")),
    };
    span.record("decision", decision);
    span.record("status", status);
    span.record("rule", rule);
    if status >= 500 {
        span.record("otel.status_code", "error");
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
        // Envoy's trace context rides in the gRPC metadata, beside the request.
        let (metadata, _, message) = request.into_parts();
        let input = match request::from_proto(message, policy.path_policy) {
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
                let grpc_trace = carrier(|k| metadata_str(&metadata, k));
                let parent = tracing_export::remote_parent(grpc_trace, Carrier::default());
                let span = check_span(&input, parent.as_ref());
                record_decision(&span, &decision);
                let trace_id = tracing_export::trace_id(&span, parent.as_ref());
                if self.log.logs(false, id) {
                    log_decision(&input, &decision, id, start.elapsed().as_micros(), trace_id);
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
        // The caller's context is only looked up when someone reads it: the exported span or
        // the decision line (at LOG_LEVEL=warn with export off, a check pays nothing for it).
        let parent = if tracing_export::exporting() || tracing::enabled!(tracing::Level::INFO) {
            // Two `traceparent` headers are ambiguous: neither is continued.
            let http_trace = carrier(|k| input.headers.single(k).ok().flatten());
            tracing_export::remote_parent(carrier(|k| metadata_str(&metadata, k)), http_trace)
        } else {
            None
        };
        let span = check_span(&input, parent.as_ref());
        let checked = pipeline::check_full(&policy, &input, None)
            .instrument(span.clone())
            .await;
        let decision = checked.decision;
        let elapsed = start.elapsed();
        record_decision(&span, &decision);
        let trace_id = tracing_export::trace_id(&span, parent.as_ref());
        if self.log.logs(decision.is_allow(), id) {
            log_decision(&input, &decision, id, elapsed.as_micros(), trace_id);
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
        async fn authenticate(&self, _: &str) -> Result<Arc<Principal>, AuthnError> {
            self.entered.notify_one();
            let _pass = self.gate.acquire().await.expect("gate open");
            Ok(Arc::new(Principal::new(
                PrincipalKind::User,
                "alice",
                AuthMethod::ApiKey,
            )))
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
            api_keys: Some(keys.clone()),
            ..Backends::none()
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

    use crate::telemetry::Capture;

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
        let backends = Backends::none();
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

    /// Spans exported to memory and the text log captured, for one test thread.
    struct Traced {
        service: CheckService,
        spans: opentelemetry_sdk::trace::InMemorySpanExporter,
        log: Capture,
        _provider: opentelemetry_sdk::trace::SdkTracerProvider,
        _guard: tracing::subscriber::DefaultGuard,
    }

    const ENVOY: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    const CLIENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// A sidecar where every API key is alice's and `/docs` needs one, exporting its spans
    /// the way `serve` does (the log layer beside the export layer).
    fn traced() -> Traced {
        use tracing_subscriber::layer::SubscriberExt as _;
        tracing_export::per_thread_subscribers();
        let keys = Arc::new(GatedKeys {
            entered: Notify::new(),
            gate: Semaphore::new(1000),
        });
        let backends = Backends {
            api_keys: Some(keys),
            ..Backends::none()
        };
        let policy =
            crate::state::policy(&config("[ { name: docs, path: /docs } ]"), &backends).unwrap();
        let service = CheckService::new(Arc::new(State::new(policy, backends)), Metrics::new());
        let spans = opentelemetry_sdk::trace::InMemorySpanExporter::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_simple_exporter(spans.clone())
            .build();
        let log = Capture::default();
        let writer = log.clone();
        let log_config = crate::config::LogConfig {
            filter: "info".into(),
            json: false,
            decisions: crate::config::DecisionLogMode::All,
            allow_sample: 1.0,
        };
        let subscriber = tracing_subscriber::registry()
            .with(crate::telemetry::log_layer(&log_config, move || {
                writer.clone()
            }))
            .with(tracing_export::export_layer(&provider));
        Traced {
            service,
            spans,
            log,
            _provider: provider,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    /// `GET /docs` with an API key; `traceparent` in the gRPC metadata and/or the HTTP headers.
    fn docs_request(metadata: Option<&str>, header: Option<&str>) -> Request<CheckRequest> {
        let mut request = get_docs();
        if let Some(traceparent) = header {
            let http = request
                .get_mut()
                .attributes
                .as_mut()
                .and_then(|a| a.request.as_mut())
                .and_then(|r| r.http.as_mut())
                .unwrap();
            http.headers
                .insert("traceparent".into(), traceparent.into());
        }
        if let Some(traceparent) = metadata {
            request
                .metadata_mut()
                .insert("traceparent", traceparent.parse().unwrap());
        }
        request
    }

    /// Runs one check; its spans by name, and its decision line.
    async fn check_traced(
        t: &Traced,
        request: Request<CheckRequest>,
    ) -> (
        std::collections::HashMap<String, opentelemetry_sdk::trace::SpanData>,
        String,
    ) {
        assert_eq!(code(&t.service, request).await, tonic::Code::Ok as i32);
        let spans = t.spans.get_finished_spans().unwrap();
        t.spans.reset();
        let log = String::from_utf8(std::mem::take(&mut *t.log.0.lock().unwrap())).unwrap();
        let spans = spans.into_iter().map(|s| (s.name.to_string(), s)).collect();
        (spans, log)
    }

    fn hex_trace(s: &opentelemetry_sdk::trace::SpanData) -> String {
        format!("{:032x}", s.span_context.trace_id())
    }

    #[tokio::test]
    async fn the_check_continues_envoys_trace_from_the_grpc_metadata() {
        let t = traced();
        let (spans, log) = check_traced(&t, docs_request(Some(ENVOY), Some(CLIENT))).await;
        let check = &spans["check"];
        assert_eq!(hex_trace(check), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(format!("{:016x}", check.parent_span_id), "b7ad6b7169203331");
        assert!(check.parent_span_is_remote);
        let authenticate = &spans["authenticate"];
        assert_eq!(
            authenticate.parent_span_id,
            check.span_context.span_id(),
            "authentication is a child of the check"
        );
        let attribute = |name: &str| {
            check
                .attributes
                .iter()
                .find(|kv| kv.key.as_str() == name)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(attribute("decision").as_deref(), Some("allow"));
        assert_eq!(attribute("status").as_deref(), Some("200"));
        assert_eq!(attribute("rule").as_deref(), Some("docs"));
        assert_eq!(attribute("path").as_deref(), Some("/docs"));
        assert!(
            log.contains("trace_id=0af7651916cd43dd8448eb211c80319c"),
            "the decision line names the trace: {log}"
        );
    }

    #[tokio::test]
    async fn without_metadata_the_request_header_is_continued() {
        let t = traced();
        let (spans, log) = check_traced(&t, docs_request(None, Some(CLIENT))).await;
        assert_eq!(
            hex_trace(&spans["check"]),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(
            log.contains("trace_id=4bf92f3577b34da6a3ce929d0e0e4736"),
            "{log}"
        );
    }

    #[tokio::test]
    async fn a_malformed_traceparent_starts_a_new_root() {
        let t = traced();
        for bad in [
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            let (spans, log) = check_traced(&t, docs_request(Some(bad), Some(bad))).await;
            let check = &spans["check"];
            assert_eq!(
                check.parent_span_id,
                opentelemetry::trace::SpanId::INVALID,
                "{bad:?}: the check is a root"
            );
            let trace = hex_trace(check);
            assert!(check.span_context.is_valid());
            assert_ne!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
            assert!(
                log.contains(&format!("trace_id={trace}")),
                "the line names the new trace: {log}"
            );
        }
    }

    #[tokio::test]
    async fn exported_spans_leave_the_decision_line_as_it_was() {
        let t = traced();
        let (_, log) = check_traced(&t, docs_request(Some(ENVOY), None)).await;
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 1, "one line per check: {log}");
        assert!(
            lines[0].contains(" INFO check decision=\"allow\" decision_id="),
            "no span prefix before the message: {}",
            lines[0]
        );
    }
}
