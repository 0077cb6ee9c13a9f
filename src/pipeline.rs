//! One check, start to finish, as a plain async function over one [`Policy`]: CORS (a
//! preflight answered here), routing (one part, or one per JSON-RPC batch element), the
//! unmatched policy, authentication ([`Authenticator`]), authorization of every part
//! ([`Authorizer`]). No protobuf in here: the gRPC adapter converts at the edges, and tests and
//! `doctor` call [`check`] directly. The caller picks the policy (the current one, loaded once
//! per request: [`crate::state::State::policy`]).

use crate::authn::{Authenticator, Principal};
use crate::authz::rules::{EvalContext, Routed, Rule, RuleSet};
use crate::authz::{Authorizer, AuthzError, Granted};
use crate::config::{PathPolicy, Unmatched};
use crate::cors::{Consulted, Cors};
use crate::decision::{self, Allow, Context, Decision, Failure};
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
pub async fn check(policy: &Policy, input: &CheckInput) -> Decision {
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
    let context = |rule: Option<String>, principal: Option<Principal>| Context {
        rule,
        principal,
        response_headers: cors.clone(),
    };

    // 2. Routing: the rule governing each part (one, or one per batch element).
    let route = match policy.rules.route(input) {
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
    let allow = |principal: Option<Principal>, granted: Granted| {
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
        return allow(None, Granted::default());
    }

    // 4. Authentication, once for the whole request.
    let principal = match policy.authn.authenticate(input).await {
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
    match policy.authz.authorize(&parts, &principal).await {
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
        async fn authenticate(&self, key: &str) -> Result<Principal, AuthnError> {
            match key {
                "key-alice" => Ok(Principal::new(
                    PrincipalKind::User,
                    "alice",
                    AuthMethod::ApiKey,
                )),
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
        let raw: crate::config::RawRoutes = serde_yaml_ng::from_str(
            r#"
rules:
  - { name: public, path: "/public/**", public: true }
  - name: mcp-tools-call
    path: /message
    methods: [POST]
    when: ["body:/method == tools/call"]
    check: { all: [ { relation: executor, object: "tool:{body:/params/name}" } ] }
  - { name: mcp-other, path: /message, methods: [POST] }
  - { name: api, path: "/api/**" }
"#,
        )
        .unwrap();
        let rules = RuleSet::compile(
            &RoutesConfig {
                unmatched: Unmatched::Deny,
                rules: raw.rules,
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
        late.set(fga.clone());
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
}
