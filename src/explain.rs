//! `authz-sidecar check`: one request through the real pipeline ([`crate::pipeline`] over the
//! [`crate::state`] a server would build from the config: the real signing keys, API-key
//! store and OpenFGA), and its answer as Envoy would apply it ([`crate::response::applied`]):
//! status, decision, reason, the headers set on and removed from the request. With
//! `--explain`, the [`Trace`] of the check: the credential found (kind, key id, token `kid`
//! and `iss`; never the secret), each rule tried and why it did not match, the rule that
//! governs, the principal, each OpenFGA question with its tuple and whether the decision cache
//! answered it, each shadow rule's outcome, the dry run.
//!
//! Invariant: what is shown is what the server would answer, because it is the server's own
//! code path ([`crate::pipeline::check_full`], the function `service` calls) recording into a
//! trace; nothing here decides anything. `doctor --path` runs its check through
//! [`load`] and [`run_request`] too.
//!
//! Exit codes: 0 allowed, 1 denied, 2 bad usage or configuration.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::authz::trace::{Event, Trace};
use crate::clock::system_clock;
use crate::config::Config;
use crate::console::say;
use crate::decision::Decision;
use crate::pipeline::{Checked, Policy};
use crate::request::{CheckInput, Headers, RequestError};
use crate::response::Applied;
use crate::state::State;

/// What to check: plain data, filled in by the command line (`cli`) or a test.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub config: PathBuf,
    pub request: RequestSpec,
    /// Print the trace of the check.
    pub explain: bool,
    /// Print one JSON object instead of text.
    pub json: bool,
    /// Longest wait for OpenFGA to connect.
    pub wait: Duration,
}

/// A request as the command line gives it.
#[derive(Debug, Clone, Default)]
pub struct RequestSpec {
    pub method: String,
    /// Path and query, as Envoy's `:path`.
    pub path: String,
    /// The host (`:authority`); empty for none, as a direct gRPC call.
    pub host: String,
    /// `name: value` pairs, in order (a name given twice is sent twice).
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    /// Sent as `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Sent in the configured API-key header.
    pub api_key: Option<String>,
}

impl RequestSpec {
    /// The request as the sidecar reads it (path policy, canonical host), or why it cannot
    /// be read: the answer the sidecar gives such a request.
    pub fn input(&self, policy: &Policy) -> Result<CheckInput, RequestError> {
        let mut headers = Headers::default();
        for (name, value) in &self.headers {
            headers.insert(name, Bytes::copy_from_slice(value.as_bytes()));
        }
        if let Some(token) = &self.token {
            headers.insert(
                "authorization",
                Bytes::from(format!("Bearer {}", token.trim())),
            );
        }
        if let Some(key) = &self.api_key {
            headers.insert(
                &policy.authn.api_key_header,
                Bytes::copy_from_slice(key.trim().as_bytes()),
            );
        }
        crate::request::from_parts(
            &self.method,
            &self.path,
            &self.host,
            headers,
            self.body.clone().map(Bytes::from),
            policy.path_policy,
        )
    }
}

/// `--header NAME:VALUE` (the value may hold `:`), or why not, naming the argument.
pub fn parse_header(raw: &str) -> Result<(String, String), String> {
    let Some((name, value)) = raw.split_once(':') else {
        return Err(format!("--header {raw:?}: want NAME:VALUE"));
    };
    let name = name.trim();
    // RFC 9110 5.1: a field name is a token.
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(format!(
            "--header {raw:?}: {name:?} is not a header name (letters, digits and !#$%&'*+-.^_`|~)"
        ));
    }
    if value.chars().any(|c| c == '\r' || c == '\n' || c == '\0') {
        return Err(format!(
            "--header {raw:?}: a value cannot hold CR, LF or NUL"
        ));
    }
    Ok((name.to_ascii_lowercase(), value.trim().to_string()))
}

/// The server's state built from a config, as `serve` builds it, and its background tasks.
pub struct Loaded {
    pub state: Arc<State>,
    shutdown: CancellationToken,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Builds the state of `config` and waits up to `wait` for OpenFGA to connect (as a server
/// coming up would), so the check gets the answer a running server gives. An error is one
/// the server would stop on (exit 2): a key file, the API key file, the OpenFGA store or model.
pub async fn load(config: &Config, wait: Duration) -> Result<Loaded, String> {
    let shutdown = CancellationToken::new();
    let mut built = crate::state::build(config, system_clock(), &shutdown)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let loaded = Loaded {
        state: built.state,
        shutdown,
    };
    let policy = loaded.state.policy();
    if let Some(checker) = policy.authz.checker() {
        let deadline = Instant::now() + wait;
        while !checker.ready() && Instant::now() < deadline {
            if let Ok(fatal) = built.fatal.try_recv() {
                return Err(fatal.to_string());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Ok(fatal) = built.fatal.try_recv() {
            return Err(fatal.to_string());
        }
    }
    Ok(loaded)
}

/// Everything one check found.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// `METHOD path` and the host, as read.
    pub request: String,
    /// The credential the request carries, described without the secret.
    pub credential: String,
    pub checked: Checked,
    /// What Envoy does with the answer.
    pub applied: Applied,
    pub trace: Trace,
    /// `routes.dry_run` is on.
    pub dry_run: bool,
}

/// Runs `spec` through the pipeline of `policy`, recording the trace.
pub async fn run_request(policy: &Policy, spec: &RequestSpec) -> Explanation {
    let mut trace = Trace::default();
    let (request, credential, checked) = match spec.input(policy) {
        Ok(input) => {
            let checked = crate::pipeline::check_full(policy, &input, Some(&mut trace)).await;
            (
                format!(
                    "{} {} (host {})",
                    input.method,
                    input.path,
                    if input.host.is_empty() {
                        "none"
                    } else {
                        input.host.as_str()
                    }
                ),
                credential(&input, &policy.authn.api_key_header),
                checked,
            )
        }
        // Answered as the gRPC adapter answers a request it cannot read.
        Err(e) => {
            let deny = crate::decision::deny_for(&e.into(), &policy.realm);
            (
                format!("{} {}", spec.method.to_ascii_uppercase(), spec.path),
                "not read: the request was refused first".into(),
                Checked {
                    decision: Decision::Deny(deny),
                    shadow: Vec::new(),
                    dry_run: None,
                },
            )
        }
    };
    let applied = crate::response::applied(
        &checked.decision,
        "check",
        &policy.authn.strip_from_upstream,
    );
    Explanation {
        request,
        credential,
        checked,
        applied,
        trace,
        dry_run: policy.rules.dry_run,
    }
}

/// The credential a request carries: kind and what identifies it (a token's `kid` and `iss`
/// as written in it, unverified; a short hash), never the secret.
fn credential(input: &CheckInput, api_key_header: &str) -> String {
    let mut found = Vec::new();
    if let Some(value) = input.headers.first("authorization") {
        let token = crate::inspect::normalize(value);
        let fp = crate::authn::fingerprint(token);
        let text = match crate::inspect::decode(token) {
            Ok(d) => {
                let field = |m: &serde_json::Map<String, Value>, k: &str| {
                    m.get(k)
                        .and_then(Value::as_str)
                        .map_or_else(|| "none".to_string(), str::to_string)
                };
                format!(
                    "bearer token sha256:{fp}…, kid {}, iss {}",
                    field(&d.header, "kid"),
                    field(&d.claims, "iss")
                )
            }
            Err(e) => format!("bearer token sha256:{fp}…, not decodable: {e}"),
        };
        found.push(text);
    }
    if let Some(key) = input.headers.first(api_key_header) {
        found.push(format!(
            "API key sha256:{}… in {api_key_header}",
            crate::authn::fingerprint(key.trim())
        ));
    }
    if found.is_empty() {
        "none".into()
    } else {
        found.join("; ")
    }
}

/// One line of the trace: (step, text).
fn step(event: &Event) -> (&'static str, String) {
    match event {
        Event::ShadowIgnored { rule } => (
            "rule",
            format!("{rule}: shadow rule, not used for the answer"),
        ),
        Event::RuleSkipped {
            rule,
            shadow: false,
            why,
        } => ("rule", format!("{rule}: no match: {why}")),
        Event::RuleSkipped {
            rule,
            shadow: true,
            why,
        } => ("shadow", format!("{rule}: no match: {why}")),
        Event::RuleMatched {
            rule,
            shadow,
            params,
        } => {
            let params = if params.is_empty() {
                String::new()
            } else {
                let p: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!(" ({})", p.join(", "))
            };
            if *shadow {
                ("shadow", format!("{rule}: matches{params}: evaluated"))
            } else {
                ("rule", format!("{rule}: matches{params}: governs"))
            }
        }
        Event::Batch { elements } => (
            "batch",
            format!("JSON-RPC batch of {elements}: each element routed on its own"),
        ),
        Event::Element { index } => ("element", format!("{index}")),
        Event::Unmatched { policy } => (
            "rule",
            format!("no rule matches: routes.unmatched is {policy}"),
        ),
        Event::Public { rule } => ("principal", format!("not asked: rule {rule} is public")),
        Event::Authenticated(Ok(p)) => (
            "principal",
            format!(
                "{} ({} via {}, key {}), roles [{}], scopes [{}]",
                p.subject,
                p.kind.as_str(),
                p.method.as_str(),
                if p.key_id.is_empty() { "-" } else { &p.key_id },
                p.roles.join(", "),
                p.scopes.join(" ")
            ),
        ),
        Event::Authenticated(Err(why)) => ("principal", format!("none: {why}")),
        Event::Contextual { tuples } => {
            let t: Vec<String> = tuples.iter().map(ToString::to_string).collect();
            ("contextual", t.join("; "))
        }
        Event::Relation {
            rule,
            tuple,
            answer,
            source,
        } => {
            let answer = match answer {
                Ok(true) => "allowed".to_string(),
                Ok(false) => "denied".to_string(),
                Err(e) => format!("error: {e}"),
            };
            (
                "openfga",
                format!("{tuple}: {answer} (rule {rule}, from {})", source.as_str()),
            )
        }
        Event::Shadow {
            rule,
            outcome,
            reason,
        } => (
            "shadow",
            if reason.is_empty() {
                format!("{rule}: {outcome}")
            } else {
                format!("{rule}: {outcome}: {reason}")
            },
        ),
        Event::DryRun { status, reason } => (
            "dry run",
            format!("the rules deny {status} ({reason}): answered with an allow"),
        ),
    }
}

/// The answer line: `200 allow, rule api` or `403 deny forbidden, rule admin`.
fn answer(e: &Explanation) -> String {
    match &e.checked.decision {
        Decision::Allow(a) => {
            let how = match (&e.checked.dry_run, a.local_reply) {
                (Some(_), _) => " by routes.dry_run".to_string(),
                (None, Some(_)) => " here (not forwarded)".to_string(),
                (None, None) => String::new(),
            };
            format!("{} allow{how}, rule {}", e.applied.status, a.rule)
        }
        Decision::Deny(d) => format!(
            "{} deny {}, rule {}",
            d.http_status,
            d.error,
            d.rule.as_deref().unwrap_or("none")
        ),
    }
}

/// The report as text lines (`label     text`).
pub fn render_text(e: &Explanation, explain: bool) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = |label: &str, text: &str| lines.push(format!("{label:<10} {text}"));
    if e.dry_run {
        line(
            "dry run",
            "on (routes.dry_run): 401/403 denies are answered with allows",
        );
    }
    if explain {
        line("request", &e.request);
        line("credential", &e.credential);
        for event in &e.trace.events {
            let (label, text) = step(event);
            line(label, &text);
        }
    }
    line("answer", &answer(e));
    match &e.checked.decision {
        Decision::Allow(a) => {
            if !a.relations.is_empty() {
                line("relations", &a.relations.join("; "));
            }
            if let Some(cause) = &a.failed_open {
                line("failed open", cause);
            }
        }
        Decision::Deny(d) => line("reason", &d.detail),
    }
    if let Some(d) = &e.checked.dry_run {
        line(
            "would deny",
            &format!("{} {}: {}", d.http_status, d.error, d.detail),
        );
    }
    for (k, v) in &e.applied.set {
        line("set", &format!("{k}: {v}"));
    }
    if !e.applied.remove.is_empty() {
        line("remove", &e.applied.remove.join(", "));
    }
    for (k, v) in &e.applied.response_headers {
        line("respond", &format!("{k}: {v}"));
    }
    if !explain {
        for o in &e.checked.shadow {
            line(
                "shadow",
                &format!("{}: {}: {}", o.rule, o.outcome.as_str(), o.reason),
            );
        }
    }
    lines
}

/// The report as one JSON object.
pub fn render_json(e: &Explanation, explain: bool) -> Value {
    let headers = |h: &[(String, String)]| -> Vec<Value> {
        h.iter()
            .map(|(k, v)| json!({ "name": k, "value": v }))
            .collect()
    };
    let (decision, rule, reason, error) = match &e.checked.decision {
        Decision::Allow(a) => ("allow", Some(a.rule.clone()), None, None),
        Decision::Deny(d) => (
            "deny",
            d.rule.clone(),
            Some(d.detail.clone()),
            Some(d.error),
        ),
    };
    let mut out = json!({
        "status": e.applied.status,
        "decision": decision,
        "error": error,
        "rule": rule,
        "reason": reason,
        "forwarded": e.applied.forwarded,
        "set": headers(&e.applied.set),
        "remove": e.applied.remove,
        "response_headers": headers(&e.applied.response_headers),
        "body": e.applied.body,
        "dry_run": e.dry_run,
        "would_deny": e.checked.dry_run.as_ref().map(|d| json!({
            "status": d.http_status, "error": d.error, "reason": d.detail,
        })),
        "shadow": e.checked.shadow.iter().map(|o| json!({
            "rule": o.rule, "outcome": o.outcome.as_str(), "status": o.status, "reason": o.reason,
        })).collect::<Vec<_>>(),
    });
    if explain {
        out["request"] = json!(e.request);
        out["credential"] = json!(e.credential);
        out["explain"] = e
            .trace
            .events
            .iter()
            .map(|ev| {
                let (step, text) = step(ev);
                json!({ "step": step, "text": text })
            })
            .collect();
    }
    out
}

fn usage(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("authz-sidecar: {e}");
    ExitCode::from(2)
}

pub async fn run(options: Options) -> ExitCode {
    let config = match Config::load(&options.config)
        .and_then(|c| crate::authz::rules::RuleSet::from_config(&c).map(|_| c))
    {
        Ok(c) => c,
        Err(e) => return usage(format!("config error: {e}")),
    };
    let loaded = match load(&config, options.wait).await {
        Ok(l) => l,
        Err(e) => return usage(format!("the sidecar would not start: {e}")),
    };
    let policy = loaded.state.policy();
    let explanation = run_request(&policy, &options.request).await;
    if options.json {
        say(render_json(&explanation, options.explain).to_string());
    } else {
        for line in render_text(&explanation, options.explain) {
            say(line);
        }
    }
    if explanation.checked.decision.is_allow() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_argument_is_name_colon_value() {
        assert_eq!(
            parse_header("X-Tenant: acme"),
            Ok(("x-tenant".into(), "acme".into()))
        );
        assert_eq!(
            parse_header("origin:http://localhost:3000"),
            Ok(("origin".into(), "http://localhost:3000".into()))
        );
        assert_eq!(
            parse_header("x-empty:"),
            Ok(("x-empty".into(), String::new()))
        );
        for (raw, want) in [
            ("no-colon", "want NAME:VALUE"),
            (":value", "is not a header name"),
            ("bad name: v", "is not a header name"),
            ("x-a: one\r\nx-b: two", "cannot hold CR, LF or NUL"),
        ] {
            let e = parse_header(raw).unwrap_err();
            assert!(e.starts_with(&format!("--header {raw:?}")), "{e}");
            assert!(e.contains(want), "{raw}: {e}");
        }
    }
}
