//! One check, start to finish, as a plain async function over [`State`]: CORS preflight,
//! rule match, authentication, authorization. No protobuf in here: the gRPC adapter converts
//! at the edges, and tests, `doctor` and benchmarks call [`check`] directly.

use std::sync::{Arc, OnceLock};

use crate::authn::{Authenticator, Principal};
use crate::authz::rules::{EvalContext, RuleSet};
use crate::authz::{self, BackendError, CheckQuery, RelationshipChecker, TupleKey};
use crate::config::{ClaimSet, ContextualTupleConfig, PathPolicy, Unmatched};
use crate::cors::{Cors, Preflight};
use crate::decision::{Allow, Decision, Deny, Failure, deny_for};
use crate::request::CheckInput;

/// Everything a check needs, built once at startup.
pub struct State {
    pub rules: RuleSet,
    pub cors: Cors,
    pub authn: Authenticator,
    pub checker: Option<Arc<LateChecker>>,
    pub contextual: Vec<ContextualTupleConfig>,
    pub realm: String,
    /// How request paths are read (`request.path_policy`), by the gRPC adapter.
    pub path_policy: PathPolicy,
}

impl State {
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
        if let Some(c) = &self.checker
            && !c.ready()
        {
            missing.push(c.describe());
        }
        missing
    }
}

/// A relationship checker that arrives after startup: OpenFGA may come up after the sidecar,
/// so until it is connected every check is a 503 naming the last connection error.
pub struct LateChecker {
    inner: OnceLock<Arc<dyn RelationshipChecker>>,
    pending: std::sync::Mutex<String>,
}

impl LateChecker {
    pub fn new(pending: impl Into<String>) -> Self {
        Self {
            inner: OnceLock::new(),
            pending: std::sync::Mutex::new(pending.into()),
        }
    }

    pub fn set(&self, checker: Arc<dyn RelationshipChecker>) {
        let _ = self.inner.set(checker);
    }

    pub fn set_pending(&self, why: impl Into<String>) {
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = why.into();
    }

    fn pending(&self) -> String {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[async_trait::async_trait]
impl RelationshipChecker for LateChecker {
    async fn check(&self, queries: &[CheckQuery]) -> Result<Vec<bool>, BackendError> {
        match self.inner.get() {
            Some(c) => c.check(queries).await,
            None => Err(BackendError::Unavailable(self.pending())),
        }
    }
    fn ready(&self) -> bool {
        self.inner.get().is_some_and(|c| c.ready())
    }
    fn describe(&self) -> String {
        match self.inner.get() {
            Some(c) if c.ready() => c.describe(),
            Some(c) => format!("{} not ready", c.describe()),
            None => self.pending(),
        }
    }
}

/// Tuples that hold for this request only: Keycloak roles and groups, so they count in
/// OpenFGA without a sync job.
pub fn contextual_tuples(cfg: &[ContextualTupleConfig], p: &Principal) -> Vec<TupleKey> {
    let mut out = Vec::new();
    for c in cfg {
        let values: Vec<&str> = match c.from {
            ClaimSet::Roles => p.roles.iter().map(String::as_str).collect(),
            ClaimSet::Groups => p.groups.iter().map(|g| g.trim_start_matches('/')).collect(),
        };
        for v in values {
            if v.is_empty() || v.contains(char::is_whitespace) || v.contains('#') {
                continue;
            }
            out.push(TupleKey {
                user: p.subject.clone(),
                relation: c.relation.clone(),
                object: c.object.replace("{value}", v),
            });
        }
    }
    out
}

fn deny(state: &State, input: &CheckInput, failure: Failure) -> Deny {
    let mut d = deny_for(&failure, &state.realm);
    d.response_headers = state.cors.response_headers(input);
    d
}

/// Decides one request.
pub async fn check(state: &State, input: &CheckInput) -> Decision {
    match state.cors.preflight(input) {
        Preflight::Allowed(headers) => {
            return Decision::Allow(Allow {
                principal: None,
                rule: "cors-preflight".into(),
                failed_open: None,
                response_headers: headers,
                relations: Vec::new(),
            });
        }
        Preflight::Refused(origin) => {
            return Decision::Deny(deny(state, input, Failure::CorsOrigin(origin)));
        }
        Preflight::No => {}
    }

    let mut ctx = EvalContext::new(input);
    let rule = state.rules.find(&mut ctx);
    let allow = |principal: Option<Principal>, rule: String, granted: authz::Granted| {
        Decision::Allow(Allow {
            principal,
            rule,
            failed_open: granted.failed_open,
            response_headers: state.cors.response_headers(input),
            relations: granted.relations,
        })
    };
    let Some(rule) = rule else {
        return match state.rules.unmatched {
            Unmatched::Allow => allow(None, "unmatched".into(), Default::default()),
            Unmatched::Authenticated => match state.authn.authenticate(input).await {
                Ok(p) => allow(Some(p), "unmatched".into(), Default::default()),
                Err(e) => Decision::Deny(deny(state, input, e.into())),
            },
            Unmatched::Deny => Decision::Deny(deny(
                state,
                input,
                authz::AuthzError::NoRule {
                    method: input.method.clone(),
                    path: input.path.clone(),
                }
                .into(),
            )),
        };
    };
    if rule.public {
        return allow(None, rule.name.clone(), Default::default());
    }
    let principal = match state.authn.authenticate(input).await {
        Ok(p) => p,
        Err(e) => {
            let mut d = deny(state, input, e.into());
            d.rule = Some(rule.name.clone());
            return Decision::Deny(d);
        }
    };
    let contextual = if rule.check.is_some() {
        Arc::new(contextual_tuples(&state.contextual, &principal))
    } else {
        Arc::new(Vec::new())
    };
    let checker = state
        .checker
        .as_ref()
        .map(|c| c.as_ref() as &dyn RelationshipChecker);
    match authz::authorize(rule, &principal, &ctx, checker, &contextual).await {
        Ok(granted) => allow(Some(principal), rule.name.clone(), granted),
        Err(e) => {
            let mut d = deny(state, input, e.into());
            d.principal = Some(principal);
            d.rule = Some(rule.name.clone());
            Decision::Deny(d)
        }
    }
}
