//! One check, start to finish, as a plain async function over one [`Policy`]: CORS (a
//! preflight answered here), routing (one part, or one per JSON-RPC batch element), the
//! unmatched policy, authentication ([`Authenticator`]), authorization of every part
//! ([`Authorizer`]); then the shadow rules and the dry run ([`check_full`]). No protobuf in
//! here: the gRPC adapter converts at the edges, and tests, `check` and `doctor` call
//! [`check`] / [`check_full`] directly. The caller picks the policy (the current one, loaded
//! once per request: [`crate::state::State::policy`]).
//!
//! Invariant: shadow rules and the dry run cannot open a hole. The answer is decided first,
//! by the enforcing rules alone, exactly as if no shadow rule existed; shadow rules are then
//! evaluated only to be logged and counted, and none of their outcomes (an error included)
//! reaches the answer. The dry run relaxes only a 401 or 403 *policy* deny; a 400 (a request
//! read two ways), a refused CORS origin and a 503 stay as they are, so a rollout never opens
//! a path-confusion bypass.

use std::sync::Arc;

use crate::authn::{Authenticator, Principal};
use crate::authz::rules::{EvalContext, Routed, Rule, RuleSet};
use crate::authz::trace::{Event, Trace, record};
use crate::authz::{Authorizer, AuthzError, Granted};
use crate::config::{PathPolicy, Unmatched};
use crate::cors::{Consulted, Cors};
use crate::decision::{self, Allow, Context, Decision, Deny, Failure};
use crate::request::CheckInput;

/// What one check reads: everything a reload may change (built and swapped by
/// [`crate::state`]; the backends it reaches hold `Arc`s shared by every policy).
pub struct Policy {
    pub rules: RuleSet,
    pub cors: Cors,
    pub authn: Authenticator,
    pub authz: Authorizer,
    pub realm: String,
    /// How request paths are read (`request.path_policy`), by the gRPC adapter.
    pub path_policy: PathPolicy,
}

impl Policy {
    /// Ready when every configured backend can answer: signing keys loaded, OpenFGA resolved.
    pub fn readiness(&self) -> Vec<String> {
        let mut missing = Vec::new();
        if let Some(jwt) = &self.authn.jwt
            && !jwt.key_source().ready()
        {
            missing.push(format!(
                "signing keys not loaded from {}",
                jwt.key_source().describe()
            ));
        }
        missing.extend(self.authz.readiness());
        missing
    }
}

/// Decides one request, in the order a reader expects: CORS, routing, the unmatched policy,
/// authentication, authorization. Every refusal is built once, complete, by
/// [`decision::deny`] with the rule and principal known at that point and the CORS headers
/// read at the start.
///
/// A JSON-RPC batch (a body that is a JSON array, read by a rule) is decided element by
/// element: each element is routed as if it were the body, and the batch is allowed only when
/// every element is. The caller is authenticated once; the relationship checks of all
/// elements go to OpenFGA as one BatchCheck. A refusal names the element.
///
/// Shadow rules are then tried and the dry run applied ([`check_full`], whose answer this is).
pub async fn check(policy: &Policy, input: &CheckInput) -> Decision {
    check_full(policy, input, None).await.decision
}

/// What one check answered, and what it only observed.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The answer (after the dry run, when it is on).
    pub decision: Decision,
    /// Each shadow rule that matched the request, with what it would have answered.
    pub shadow: Vec<ShadowOutcome>,
    /// The deny `routes.dry_run` answered with the allow in `decision`.
    pub dry_run: Option<Deny>,
}

/// What a shadow rule would have answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Would {
    Allow,
    Deny,
    /// The rule could not be decided (a backend failed): it would have answered 503.
    Error,
}

impl Would {
    /// The `outcome` label and log value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "would_allow",
            Self::Deny => "would_deny",
            Self::Error => "would_error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowOutcome {
    pub rule: String,
    pub outcome: Would,
    /// The HTTP status the rule would have answered.
    pub status: u16,
    /// Why it would deny (the whole reason, as the decision log has it); for an allow, the
    /// relationships that held or the backend failure it would fail open on.
    pub reason: String,
    /// The subject it was evaluated for, when the caller authenticated.
    pub subject: Option<String>,
}

/// [`check`], then the shadow rules and the dry run, recording every step in `trace` when
/// one is given (`authz-sidecar check --explain`; serving passes `None` and records nothing).
///
/// The answer is [`decide`]d first and alone; the shadow rules are evaluated after it and
/// cannot change it (see the module's invariant).
pub async fn check_full(
    policy: &Policy,
    input: &CheckInput,
    mut trace: Option<&mut Trace>,
) -> Checked {
    let decision = decide(policy, input, trace.as_deref_mut()).await;
    // A preflight answered here never reaches a rule: nothing to try the shadow rules on.
    let preflight = matches!(&decision, Decision::Allow(a) if a.local_reply.is_some());
    let shadow = if policy.rules.shadow_rules().is_empty() || preflight {
        Vec::new()
    } else {
        shadow(policy, input, &decision, trace.as_deref_mut()).await
    };
    let (decision, dry_run) = match decision {
        Decision::Deny(d) if policy.rules.dry_run && relaxed_by_dry_run(&d) => {
            record(&mut trace, || Event::DryRun {
                status: d.http_status,
                reason: d.detail.clone(),
            });
            let allow = Allow {
                // An unauthenticated caller gets no identity headers (and spoofed ones are
                // still removed by the edge out, as on every allow).
                principal: d.principal.clone(),
                rule: d.rule.clone().unwrap_or_else(|| "unmatched".into()),
                failed_open: None,
                response_headers: d.response_headers.clone(),
                relations: Vec::new(),
                local_reply: None,
            };
            (Decision::Allow(allow), Some(d))
        }
        d => (d, None),
    };
    Checked {
        decision,
        shadow,
        dry_run,
    }
}

/// Which denies a dry run answers with an allow: policy denies (401 no or bad credentials,
/// 403 forbidden or insufficient scope). Never a 400 (the request can be read two ways: a
/// dry run must not open a path-confusion bypass), a refused CORS origin, or a 503.
fn relaxed_by_dry_run(d: &Deny) -> bool {
    matches!(d.http_status, 401 | 403) && d.error != "cors_origin"
}

/// Every shadow rule that matches the request, evaluated fully: authentication (reusing the
/// principal the answer found), roles and scopes, relationship checks. Nothing here can
/// fail the request: a backend error is a `would_error` outcome.
async fn shadow(
    policy: &Policy,
    input: &CheckInput,
    decided: &Decision,
    mut trace: Option<&mut Trace>,
) -> Vec<ShadowOutcome> {
    let known = match decided {
        Decision::Allow(a) => a.principal.clone(),
        Decision::Deny(d) => d.principal.clone(),
    };
    let mut authn = known.map(Ok);
    let mut out = Vec::new();
    for rule in policy.rules.shadow_rules() {
        let outcome = |outcome, status, reason, subject| ShadowOutcome {
            rule: rule.name.clone(),
            outcome,
            status,
            reason,
            subject,
        };
        let would_deny = |failure: &Failure, subject: Option<String>| {
            let d = decision::deny_for(failure, &policy.realm);
            let would = if d.http_status == 503 {
                Would::Error
            } else {
                Would::Deny
            };
            outcome(would, d.http_status, d.detail, subject)
        };
        let route = match RuleSet::route_shadow(rule, input, trace.as_deref_mut()) {
            Ok(route) => route,
            Err((element, refusal)) => {
                out.push(would_deny(&in_element(element, refusal.into()), None));
                continue;
            }
        };
        let element = |i: usize| route.batch.then_some(i);
        let governed: Vec<(usize, &Rule, &EvalContext<'_>)> = route
            .parts
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.rule.map(|r| (i, r, &p.ctx)))
            .collect();
        if governed.is_empty() {
            continue;
        }
        if rule.public {
            out.push(outcome(Would::Allow, 200, "public".into(), None));
            continue;
        }
        if authn.is_none() {
            authn = Some(policy.authn.authenticate(input).await);
        }
        let Some(authenticated) = authn.as_ref() else {
            continue;
        };
        let principal = match authenticated {
            Ok(p) => p,
            Err(e) => {
                out.push(would_deny(&Failure::Authn(e.clone()), None));
                continue;
            }
        };
        let subject = Some(principal.subject.clone());
        let parts: Vec<_> = governed.iter().map(|(_, r, ctx)| (*r, *ctx)).collect();
        let result = policy
            .authz
            .authorize_traced(&parts, principal, trace.as_deref_mut())
            .await;
        let o = match result {
            Ok(granted) => {
                let reason = match granted.failed_open {
                    Some(cause) => format!("failed open: {cause}"),
                    None => granted.relations.join("; "),
                };
                outcome(Would::Allow, 200, reason, subject)
            }
            Err((k, e)) => would_deny(&in_element(element(governed[k].0), e.into()), subject),
        };
        out.push(o);
    }
    for o in &out {
        record(&mut trace, || Event::Shadow {
            rule: o.rule.clone(),
            outcome: o.outcome.as_str(),
            reason: o.reason.clone(),
        });
    }
    out
}

/// The answer, by the enforcing rules alone ([`check`]'s steps), recording into `trace`.
async fn decide(policy: &Policy, input: &CheckInput, mut trace: Option<&mut Trace>) -> Decision {
    // 1. CORS, read once. A preflight is answered here: it never reaches the app, so it
    // cannot reach a route the app would refuse (or run a handler that does not expect
    // OPTIONS).
    let cors = match policy.cors.consult(input) {
        Consulted::Preflight(headers) => return preflight(headers),
        Consulted::Refused(origin) => {
            let context = Context::default();
            return refuse(policy, Failure::CorsOrigin(origin), context);
        }
        Consulted::Headers(headers) => headers,
    };
    let context = |rule: Option<String>, principal: Option<Arc<Principal>>| Context {
        rule,
        principal,
        response_headers: cors.clone(),
    };

    // 2. Routing: the rule governing each part (one, or one per batch element).
    let route = match policy.rules.route_traced(input, trace.as_deref_mut()) {
        Ok(route) => route,
        Err((element, refusal)) => {
            let rule = Some(refusal.rule.clone());
            let failure = in_element(element, refusal.into());
            return refuse(policy, failure, context(rule, None));
        }
    };
    let element = |i: usize| route.batch.then_some(i);

    // 3. Parts no rule matches: the unmatched policy decides them.
    for (i, part) in route.parts.iter().enumerate() {
        if part.rule.is_none() {
            record(&mut trace, || Event::Unmatched {
                policy: match policy.rules.unmatched {
                    Unmatched::Deny => "deny",
                    Unmatched::Authenticated => "authenticated",
                    Unmatched::Allow => "allow",
                },
            });
        }
        if part.rule.is_none() && policy.rules.unmatched == Unmatched::Deny {
            let no_rule = AuthzError::NoRule {
                method: input.method.clone(),
                path: input.path.clone(),
            };
            let failure = in_element(element(i), no_rule.into());
            return refuse(policy, failure, context(None, None));
        }
    }
    let needs_principal = route.parts.iter().any(|p| match p.rule {
        Some(rule) => !rule.public,
        None => policy.rules.unmatched == Unmatched::Authenticated,
    });
    let names = rule_names(&route.parts);
    let allow = |principal: Option<Arc<Principal>>, granted: Granted| {
        Decision::Allow(Allow {
            principal,
            rule: names.clone(),
            failed_open: granted.failed_open,
            response_headers: cors.clone(),
            relations: granted.relations,
            local_reply: None,
        })
    };
    if !needs_principal {
        for p in &route.parts {
            if let Some(rule) = p.rule {
                record(&mut trace, || Event::Public {
                    rule: rule.name.clone(),
                });
            }
        }
        return allow(None, Granted::default());
    }

    // 4. Authentication, once for the whole request.
    let authenticated = policy.authn.authenticate(input).await;
    record(&mut trace, || {
        Event::Authenticated(authenticated.clone().map_err(|e| e.to_string()))
    });
    let principal = match authenticated {
        Ok(p) => p,
        Err(e) => {
            let rule = route
                .parts
                .iter()
                .find_map(|p| p.rule.filter(|r| !r.public))
                .map(|r| r.name.clone());
            return refuse(policy, e.into(), context(rule, None));
        }
    };

    // 5. Authorization of every part a non-public rule governs.
    let governed: Vec<(usize, &Rule, &EvalContext<'_>)> = route
        .parts
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.rule.filter(|r| !r.public).map(|r| (i, r, &p.ctx)))
        .collect();
    let parts: Vec<_> = governed.iter().map(|(_, r, ctx)| (*r, *ctx)).collect();
    match policy
        .authz
        .authorize_traced(&parts, &principal, trace)
        .await
    {
        Ok(granted) => allow(Some(principal), granted),
        Err((k, e)) => {
            let (i, rule, _) = governed[k];
            let failure = in_element(element(i), e.into());
            refuse(
                policy,
                failure,
                context(Some(rule.name.clone()), Some(principal)),
            )
        }
    }
}

fn refuse(policy: &Policy, failure: Failure, context: Context) -> Decision {
    Decision::Deny(decision::deny(&failure, &policy.realm, context))
}

fn preflight(headers: Vec<(String, String)>) -> Decision {
    Decision::Allow(Allow {
        principal: None,
        rule: "cors-preflight".into(),
        failed_open: None,
        response_headers: headers,
        relations: Vec::new(),
        local_reply: Some(PREFLIGHT_STATUS),
    })
}

/// A preflight answered here: 200 with the CORS headers (any 2xx passes the browser's check;
/// 200 is what the app answered before).
const PREFLIGHT_STATUS: u16 = 200;

fn in_element(element: Option<usize>, failure: Failure) -> Failure {
    match element {
        Some(i) => Failure::InBatch(i, Box::new(failure)),
        None => failure,
    }
}

/// The rules that decided, for the log: `mcp-tools-call`, or for a batch each distinct rule
/// in element order (`mcp-tools-call,mcp-other`); `unmatched` for parts no rule matched.
fn rule_names(parts: &[Routed<'_, '_>]) -> String {
    // Nearly every request is one part: its name, without the list and the join.
    if let [one] = parts {
        return one
            .rule
            .map_or("unmatched", |r| r.name.as_str())
            .to_string();
    }
    let mut names: Vec<&str> = Vec::new();
    for p in parts {
        let n = p.rule.map_or("unmatched", |r| r.name.as_str());
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names.join(",")
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::authn::api_key::ApiKeyStore;
    use crate::authn::principals::Principals;
    use crate::authn::{AuthMethod, AuthnError, PrincipalKind};
    use crate::authz::{BackendError, CheckQuery, LateChecker, RelationshipChecker, TupleKey};
    use crate::config::{CorsConfig, PrincipalsConfig, RoutesConfig};

    /// `key-alice` is user:alice.
    struct Keys;

    #[async_trait::async_trait]
    impl ApiKeyStore for Keys {
        async fn authenticate(&self, key: &str) -> Result<Arc<Principal>, AuthnError> {
            match key {
                "key-alice" => Ok(Arc::new(Principal::new(
                    PrincipalKind::User,
                    "alice",
                    AuthMethod::ApiKey,
                ))),
                _ => Err(AuthnError::ApiKeyUnknown),
            }
        }
        fn len(&self) -> usize {
            1
        }
        fn describe(&self) -> String {
            "test keys".into()
        }
    }

    /// Holds the tuples it was given; records how many questions each call asked.
    struct Fga {
        tuples: Vec<TupleKey>,
        calls: Mutex<Vec<usize>>,
    }

    #[async_trait::async_trait]
    impl RelationshipChecker for Fga {
        async fn check(&self, queries: &[CheckQuery]) -> Result<Vec<bool>, BackendError> {
            self.calls.lock().unwrap().push(queries.len());
            // tool:broken stands for an OpenFGA that cannot answer.
            if queries.iter().any(|q| q.tuple.object == "tool:broken") {
                return Err(BackendError::Unavailable("OpenFGA timed out".into()));
            }
            Ok(queries
                .iter()
                .map(|q| self.tuples.contains(&q.tuple))
                .collect())
        }
        fn ready(&self) -> bool {
            true
        }
        fn describe(&self) -> String {
            "fake OpenFGA".into()
        }
    }

    /// The MCP rules of deploy/local/sidecar-openfga.yaml; alice may execute agent_chat and
    /// search, nothing else.
    fn state() -> (Policy, Arc<Fga>) {
        state_with(MCP_RULES, false, |fga| fga)
    }

    const MCP_RULES: &str = r#"
rules:
  - { name: public, path: "/public/**", public: true }
  - name: mcp-tools-call
    path: /message
    methods: [POST]
    when: ["body:/method == tools/call"]
    check: { all: [ { relation: executor, object: "tool:{body:/params/name}" } ] }
  - { name: mcp-other, path: /message, methods: [POST] }
  - { name: api, path: "/api/**" }
"#;

    /// A policy of `rules` (YAML), the dry run on or off, over the fake OpenFGA as `wrap`
    /// returns it (a decision cache in front, say).
    fn state_with(
        rules: &str,
        dry_run: bool,
        wrap: impl FnOnce(Arc<Fga>) -> Arc<dyn RelationshipChecker>,
    ) -> (Policy, Arc<Fga>) {
        let raw: crate::config::RawRoutes = serde_yaml_ng::from_str(rules).unwrap();
        let rules = RuleSet::compile(
            &RoutesConfig {
                unmatched: Unmatched::Deny,
                rules: raw.rules,
                dry_run,
            },
            Some(&crate::config::test_openfga_config()),
        )
        .unwrap();
        let tuple = |tool: &str| TupleKey {
            user: "user:alice".into(),
            relation: "executor".into(),
            object: format!("tool:{tool}"),
        };
        let fga = Arc::new(Fga {
            tuples: vec![tuple("agent_chat"), tuple("search")],
            calls: Mutex::new(Vec::new()),
        });
        let late = Arc::new(LateChecker::new("not yet"));
        late.set(wrap(fga.clone()));
        let state = Policy {
            rules,
            path_policy: Default::default(),
            cors: Cors::new(&CorsConfig {
                allowed_origins: vec!["http://localhost:3000".into()],
                allowed_methods: vec!["GET".into(), "POST".into()],
                allowed_headers: vec!["authorization".into()],
                max_age: 600,
            }),
            authn: Authenticator {
                jwt: None,
                api_keys: Some(Arc::new(Keys)),
                api_key_header: "x-api-key".into(),
                strip_from_upstream: vec!["x-api-key".into()],
                principals: Principals::new(&PrincipalsConfig::default()),
            },
            authz: Authorizer::new(Some(late), Vec::new()),
            realm: "test".into(),
        };
        (state, fga)
    }

    fn call(tool: &str, id: u32) -> String {
        format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{tool}"}}}}"#
        )
    }

    fn post(body: &str) -> CheckInput {
        CheckInput::http("POST", "/message")
            .unwrap()
            .with_header("x-api-key", "key-alice")
            .with_body(body.as_bytes())
    }

    /// (HTTP status, error, reason, rule) of a decision; 200 for an allow.
    fn answer(d: &Decision) -> (u16, &str, String, String) {
        match d {
            Decision::Allow(a) => (200, "", String::new(), a.rule.clone()),
            Decision::Deny(d) => (
                d.http_status,
                d.error,
                d.reason.clone(),
                d.rule.clone().unwrap_or_default(),
            ),
        }
    }

    #[tokio::test]
    async fn a_batch_is_allowed_only_when_every_element_is() {
        let (state, fga) = state();
        for (what, body, want_status, want_reason, want_rule, want_calls) in [
            (
                "a call alice may make is allowed",
                call("agent_chat", 1),
                200,
                "",
                "mcp-tools-call",
                vec![1],
            ),
            (
                "a batch of calls she may all make is allowed, with one BatchCheck",
                format!("[{},{}]", call("agent_chat", 1), call("search", 2)),
                200,
                "",
                "mcp-tools-call",
                vec![2],
            ),
            (
                "a batch mixing a call and another method is allowed",
                format!(
                    r#"[{},{{"jsonrpc":"2.0","id":2,"method":"tools/list"}}]"#,
                    call("agent_chat", 1)
                ),
                200,
                "",
                "mcp-tools-call,mcp-other",
                vec![1],
            ),
            (
                "one call she may not make denies the whole batch, naming the element",
                format!("[{},{}]", call("agent_chat", 1), call("shell", 2)),
                403,
                "JSON-RPC batch element 1: user:alice is not executor of tool:shell",
                "mcp-tools-call",
                vec![2],
            ),
            (
                "an element without a tool name denies the batch",
                format!(
                    r#"[{},{{"method":"tools/call","params":{{}}}}]"#,
                    call("agent_chat", 1)
                ),
                403,
                "JSON-RPC batch element 1: cannot build tool:{body:/params/name}: body field /params/name missing",
                "mcp-tools-call",
                vec![],
            ),
            (
                "an empty batch is refused",
                "[]".to_string(),
                400,
                "JSON-RPC batch is empty (rule mcp-tools-call reads body field /method)",
                "mcp-tools-call",
                vec![],
            ),
            (
                "an element that is not an object is refused",
                format!("[{},42]", call("agent_chat", 1)),
                400,
                "JSON-RPC batch element 1 is not an object (rule mcp-tools-call reads body field /method)",
                "mcp-tools-call",
                vec![],
            ),
            (
                "an element whose tool name is a fraction is refused, naming it",
                format!(
                    r#"[{},{{"method":"tools/call","params":{{"name":1.5}}}}]"#,
                    call("agent_chat", 1)
                ),
                400,
                "JSON-RPC batch element 1: body field /params/name is a fractional or out-of-range number, which parsers render differently (rule mcp-tools-call reads body field /params/name)",
                "mcp-tools-call",
                vec![],
            ),
        ] {
            fga.calls.lock().unwrap().clear();
            let d = check(&state, &post(&body)).await;
            let (status, _, reason, rule) = answer(&d);
            assert_eq!(
                (status, reason.as_str()),
                (want_status, want_reason),
                "{what}"
            );
            assert_eq!(rule, want_rule, "{what}");
            assert_eq!(
                *fga.calls.lock().unwrap(),
                want_calls,
                "{what}: OpenFGA calls"
            );
        }
        // Authenticated once: a batch without credentials is a 401, not a 400 per element.
        let input = CheckInput::http("POST", "/message")
            .unwrap()
            .with_body(format!("[{}]", call("agent_chat", 1)).as_bytes());
        assert_eq!(answer(&check(&state, &input).await).0, 401);
    }

    #[tokio::test]
    async fn a_body_the_rules_cannot_read_is_a_400_never_the_weaker_rule() {
        let (state, _) = state();
        let call = call("shell", 1);
        for (what, input, want) in [
            (
                "a BOM",
                post(&format!("\u{feff}{call}")),
                "request body starts with a byte order mark",
            ),
            (
                "NaN",
                post(r#"{"method":"tools/call","params":{"name":"shell"},"x":NaN}"#),
                "request body is not strict JSON: expected value",
            ),
            (
                "1e400",
                post(r#"{"method":"tools/call","params":{"name":"shell"},"x":1e400}"#),
                "request body is not strict JSON: number out of range",
            ),
            (
                "duplicate keys",
                post(r#"{"method":"ping","method":"tools/call","params":{"name":"shell"}}"#),
                "request body is not strict JSON: duplicate key \"method\"",
            ),
            (
                "no body",
                CheckInput::http("POST", "/message")
                    .unwrap()
                    .with_header("x-api-key", "key-alice"),
                "no request body reached the authorizer",
            ),
            (
                "a partial body",
                post(&call).with_header("x-envoy-auth-partial-body", "true"),
                "request body was cut at Envoy's max_request_bytes",
            ),
        ] {
            let d = check(&state, &input).await;
            let (status, error, reason, rule) = answer(&d);
            assert_eq!(
                (status, error),
                (400, "invalid_request"),
                "{what}: {reason}"
            );
            assert!(reason.starts_with(want), "{what}: {reason}");
            assert_eq!(rule, "mcp-tools-call", "{what}");
        }
    }

    #[tokio::test]
    async fn a_preflight_is_answered_here_and_never_forwarded() {
        let (state, _) = state();
        let preflight = |origin: &str, path: &str| {
            CheckInput::http("OPTIONS", path)
                .unwrap()
                .with_header("origin", origin)
                .with_header("access-control-request-method", "POST")
        };
        for path in ["/message", "/api/agents", "/nowhere"] {
            match check(&state, &preflight("http://localhost:3000", path)).await {
                Decision::Allow(a) => {
                    assert_eq!(a.local_reply, Some(200), "{path}");
                    assert!(a.response_headers.contains(&(
                        "access-control-allow-origin".into(),
                        "http://localhost:3000".into()
                    )));
                }
                d => panic!("{path}: {d:?}"),
            }
        }
        let d = check(&state, &preflight("https://evil.example", "/api/agents")).await;
        assert_eq!(answer(&d).0, 403, "a refused origin stays refused");
        // An ordinary request is forwarded as before.
        let d = check(&state, &post(&call("agent_chat", 1))).await;
        assert!(matches!(
            d,
            Decision::Allow(Allow {
                local_reply: None,
                ..
            })
        ));
    }

    /// Shadow rules in front of the enforcing ones they shadow: one that would refuse what
    /// the enforcing rule allows, one that would allow what the enforcing rule refuses.
    const SHADOWED: &str = r#"
rules:
  - { name: public, path: "/public/**", public: true }
  - name: tools-by-relation
    mode: shadow
    path: "/tools/{tool}"
    check: { all: [ { relation: executor, object: "tool:{tool}" } ] }
  - { name: admin-for-anyone, mode: shadow, path: "/admin/**" }
  - { name: admin, path: "/admin/**", roles: [admin] }
  - { name: tools, path: "/tools/{tool}" }
"#;

    fn get(path: &str, key: Option<&str>) -> CheckInput {
        let input = CheckInput::http("GET", path).unwrap();
        match key {
            Some(k) => input.with_header("x-api-key", k),
            None => input,
        }
    }

    /// (rule, outcome, status, reason) of each shadow outcome.
    fn shadows(c: &Checked) -> Vec<(String, &'static str, u16, String)> {
        c.shadow
            .iter()
            .map(|o| {
                (
                    o.rule.clone(),
                    o.outcome.as_str(),
                    o.status,
                    o.reason.clone(),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn a_shadow_rule_in_front_of_an_enforcing_rule_never_changes_the_answer() {
        let (shadowed, _) = state_with(SHADOWED, false, |f| f);
        let without = r#"
rules:
  - { name: public, path: "/public/**", public: true }
  - { name: admin, path: "/admin/**", roles: [admin] }
  - { name: tools, path: "/tools/{tool}" }
"#;
        let (plain, _) = state_with(without, false, |f| f);
        let alice = Some("key-alice");
        for (what, input, want_status, want_shadow) in [
            (
                "a tool alice may not execute is still allowed by the enforcing rule",
                get("/tools/shell", alice),
                200,
                vec![(
                    "tools-by-relation",
                    "would_deny",
                    403,
                    "user:alice is not executor of tool:shell",
                )],
            ),
            (
                "a tool alice may execute: would allow",
                get("/tools/search", alice),
                200,
                vec![(
                    "tools-by-relation",
                    "would_allow",
                    200,
                    "user:alice executor tool:search",
                )],
            ),
            (
                "a shadow rule that would allow does not open what the enforcing rule denies",
                get("/admin/users", alice),
                403,
                vec![("admin-for-anyone", "would_allow", 200, "")],
            ),
            (
                "no credentials: the enforcing 401 stands, the shadow rule would deny the same",
                get("/tools/shell", None),
                401,
                vec![(
                    "tools-by-relation",
                    "would_deny",
                    401,
                    "no credentials: send Authorization: Bearer <token> or an API key in x-api-key",
                )],
            ),
            (
                "an OpenFGA failure in a shadow rule is would_error, never a 503",
                get("/tools/broken", alice),
                200,
                vec![(
                    "tools-by-relation",
                    "would_error",
                    503,
                    "authorization backend unavailable: OpenFGA timed out",
                )],
            ),
            (
                "no shadow rule matches a public path",
                get("/public/x", None),
                200,
                vec![],
            ),
        ] {
            let got = check_full(&shadowed, &input, None).await;
            assert_eq!(
                got.decision,
                check(&plain, &input).await,
                "{what}: decided exactly as without the shadow rules"
            );
            assert_eq!(answer(&got.decision).0, want_status, "{what}");
            let want: Vec<_> = want_shadow
                .into_iter()
                .map(|(r, o, s, why)| (r.to_string(), o, s, why.to_string()))
                .collect();
            assert_eq!(shadows(&got), want, "{what}");
        }
    }

    #[tokio::test]
    async fn a_dry_run_allows_a_policy_deny_but_still_refuses_a_400_and_a_bad_origin() {
        let (policy, _) = state_with(MCP_RULES, true, |f| f);
        // 403: alice may not call shell. Allowed, as alice, with the deny kept for the log.
        let got = check_full(&policy, &post(&call("shell", 1)), None).await;
        let Decision::Allow(a) = &got.decision else {
            panic!("a dry run allows a 403: {got:?}");
        };
        assert_eq!(a.principal.as_ref().unwrap().subject, "user:alice");
        assert_eq!(a.rule, "mcp-tools-call");
        let d = got.dry_run.as_ref().expect("the deny is kept");
        assert_eq!(
            (d.http_status, d.detail.as_str()),
            (403, "user:alice is not executor of tool:shell")
        );

        // 401: allowed without identity headers; spoofed ones are still removed.
        let input = get("/api/x", None).with_header("x-auth-subject", "user:admin");
        let got = check_full(&policy, &input, None).await;
        assert!(got.decision.is_allow(), "{got:?}");
        assert_eq!(got.dry_run.as_ref().unwrap().http_status, 401);
        let applied = crate::response::applied(&got.decision, "id", &["x-api-key".into()]);
        assert!(applied.set.is_empty(), "{applied:?}");
        assert!(applied.remove.contains(&"x-auth-subject".to_string()));

        // No rule: the unmatched policy's 403 is a policy deny too.
        let got = check_full(&policy, &get("/nowhere", Some("key-alice")), None).await;
        assert!(got.decision.is_allow(), "{got:?}");

        // Never relaxed: a body read two ways, a refused CORS origin.
        let got = check_full(
            &policy,
            &post(&format!("\u{feff}{}", call("shell", 1))),
            None,
        )
        .await;
        assert_eq!(answer(&got.decision).0, 400, "{got:?}");
        assert!(got.dry_run.is_none());
        let preflight = CheckInput::http("OPTIONS", "/api/x")
            .unwrap()
            .with_header("origin", "https://evil.example")
            .with_header("access-control-request-method", "POST");
        let got = check_full(&policy, &preflight, None).await;
        assert_eq!(answer(&got.decision).1, "cors_origin", "{got:?}");
        assert!(got.dry_run.is_none());

        // Without the dry run, the same 403 is a 403.
        let (enforcing, _) = state();
        assert_eq!(
            answer(&check(&enforcing, &post(&call("shell", 1))).await).0,
            403
        );
    }

    #[tokio::test]
    async fn a_trace_tells_each_rule_tried_and_where_each_answer_came_from() {
        use crate::authz::cache::DecisionCache;
        use crate::authz::trace::Source;
        let cache_config = crate::config::CacheConfig {
            enabled: true,
            allowed_ttl: std::time::Duration::from_secs(60),
            denied_ttl: std::time::Duration::from_secs(60),
            max_entries: 100,
        };
        let (policy, _) = state_with(MCP_RULES, false, |fga| {
            Arc::new(DecisionCache::new(fga, &cache_config))
        });
        let mut trace = Trace::default();
        let got = check_full(&policy, &post(&call("search", 1)), Some(&mut trace)).await;
        assert!(got.decision.is_allow());
        let relation = |t: &Trace| {
            t.events
                .iter()
                .find_map(|e| match e {
                    Event::Relation {
                        tuple,
                        answer,
                        source,
                        ..
                    } => Some((tuple.to_string(), answer.clone(), *source)),
                    _ => None,
                })
                .expect("a relation event")
        };
        assert_eq!(
            trace.events[..2],
            [
                Event::RuleSkipped {
                    rule: "public".into(),
                    shadow: false,
                    why: "path /message does not match /public/**".into(),
                },
                Event::RuleMatched {
                    rule: "mcp-tools-call".into(),
                    shadow: false,
                    params: vec![],
                },
            ]
        );
        assert_eq!(
            relation(&trace),
            (
                "user:alice executor tool:search".into(),
                Ok(true),
                Source::OpenFga
            )
        );
        // The same question again: the cache answers, and the trace says so.
        let mut again = Trace::default();
        check_full(&policy, &post(&call("search", 1)), Some(&mut again)).await;
        assert_eq!(relation(&again).2, Source::Cache);

        // A predicate that does not hold is named with the value read.
        let mut trace = Trace::default();
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
        check_full(&policy, &post(body), Some(&mut trace)).await;
        assert!(
            trace.events.contains(&Event::RuleSkipped {
                rule: "mcp-tools-call".into(),
                shadow: false,
                why: "when \"body:/method == tools/call\" does not hold: body field /method is \"tools/list\"".into(),
            }),
            "{trace:#?}"
        );
        // And a method that does not fit.
        let mut trace = Trace::default();
        check_full(
            &policy,
            &get("/message", Some("key-alice")),
            Some(&mut trace),
        )
        .await;
        assert!(
            trace.events.contains(&Event::RuleSkipped {
                rule: "mcp-other".into(),
                shadow: false,
                why: "method GET is not one of [POST]".into(),
            }),
            "{trace:#?}"
        );
    }
}
