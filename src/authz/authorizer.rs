//! The [`Authorizer`]: the one object the pipeline asks "may this principal do this?". It owns
//! the relationship checker (bound late: OpenFGA may come up after the sidecar), the
//! contextual tuples derived from the principal, and the readiness of the relationship
//! backend. The rules say what to ask; the checker answers; [`super::authorize_parts`]
//! concludes.

use std::sync::{Arc, OnceLock};

use super::rules::{EvalContext, Rule};
use super::trace::{Event, Trace, record};
use super::{AuthzError, BackendError, CheckQuery, Granted, RelationshipChecker, TupleKey};
use crate::authn::Principal;
use crate::config::{ClaimSet, ContextualTupleConfig};

/// Authorization for one policy: the checker (none when no OpenFGA is configured) and the
/// contextual tuples the policy derives from a principal's roles and groups.
pub struct Authorizer {
    checker: Option<Arc<dyn RelationshipChecker>>,
    contextual: Vec<ContextualTupleConfig>,
}

impl Authorizer {
    pub fn new(
        checker: Option<Arc<dyn RelationshipChecker>>,
        contextual: Vec<ContextualTupleConfig>,
    ) -> Self {
        Self {
            checker,
            contextual,
        }
    }

    /// The relationship checker, if one is configured (for `doctor`).
    pub fn checker(&self) -> Option<&Arc<dyn RelationshipChecker>> {
        self.checker.as_ref()
    }

    /// What the relationship backend still lacks before it can answer (empty when ready).
    pub fn readiness(&self) -> Vec<String> {
        match &self.checker {
            Some(c) if !c.ready() => vec![c.describe()],
            _ => Vec::new(),
        }
    }

    /// Decides every part of one request (see [`super::authorize_parts`]): granted only when
    /// every part is; on a refusal, the index of the first part refused. Contextual tuples
    /// are derived only when some part asks a relationship question.
    pub async fn authorize(
        &self,
        parts: &[(&Rule, &EvalContext<'_>)],
        principal: &Principal,
    ) -> Result<Granted, (usize, AuthzError)> {
        self.authorize_traced(parts, principal, None).await
    }

    /// [`Self::authorize`], recording every relationship question in `trace` with its tuple,
    /// its answer and whether the decision cache held it.
    pub async fn authorize_traced(
        &self,
        parts: &[(&Rule, &EvalContext<'_>)],
        principal: &Principal,
        mut trace: Option<&mut Trace>,
    ) -> Result<Granted, (usize, AuthzError)> {
        let contextual = if parts.iter().any(|(r, _)| r.check.is_some()) {
            contextual_tuples(&self.contextual, principal)
        } else {
            Vec::new()
        };
        if !contextual.is_empty() {
            record(&mut trace, || Event::Contextual {
                tuples: contextual.clone(),
            });
        }
        super::authorize_parts(
            parts,
            principal,
            self.checker.as_deref(),
            &Arc::new(contextual),
            trace,
        )
        .await
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
    fn cached(&self, query: &CheckQuery) -> Option<bool> {
        self.inner.get().and_then(|c| c.cached(query))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::{AuthMethod, PrincipalKind};
    use crate::authz::rules::RuleSet;
    use crate::config::{RawRoutes, RoutesConfig, Unmatched};
    use crate::request::CheckInput;

    /// Says yes to the first question and ignores the rest.
    struct ShortAnswers;

    #[async_trait::async_trait]
    impl RelationshipChecker for ShortAnswers {
        async fn check(&self, _: &[CheckQuery]) -> Result<Vec<bool>, BackendError> {
            Ok(vec![true])
        }
        fn ready(&self) -> bool {
            true
        }
        fn describe(&self) -> String {
            "short-answering checker".into()
        }
    }

    fn rules(on_backend_error: &str) -> RuleSet {
        let raw: RawRoutes = serde_yaml_ng::from_str(&format!(
            r#"
rules:
  - name: both
    path: /docs
    check:
      on_backend_error: {on_backend_error}
      all:
        - {{ relation: viewer, object: "doc:a" }}
        - {{ relation: editor, object: "doc:b" }}
"#
        ))
        .unwrap();
        RuleSet::compile(
            &RoutesConfig {
                unmatched: Unmatched::Deny,
                rules: raw.rules,
                dry_run: false,
            },
            Some(&crate::config::test_openfga_config()),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_checker_answering_fewer_questions_than_asked_never_passes_an_all_clause() {
        let alice = Principal::new(PrincipalKind::User, "alice", AuthMethod::ApiKey);
        let authorizer = Authorizer::new(Some(Arc::new(ShortAnswers)), Vec::new());
        let input = CheckInput::http("GET", "/docs").unwrap();
        for (on_backend_error, want) in [
            (
                "deny",
                Err((
                    0,
                    AuthzError::BackendUnavailable("1 answers to 2 checks".into()),
                )),
            ),
            (
                "allow",
                Ok(Granted {
                    failed_open: Some("1 answers to 2 checks".into()),
                    relations: Vec::new(),
                }),
            ),
        ] {
            let rules = rules(on_backend_error);
            let route = rules.route(&input).unwrap();
            let parts: Vec<_> = route
                .parts
                .iter()
                .map(|p| (p.rule.unwrap(), &p.ctx))
                .collect();
            assert_eq!(
                authorizer.authorize(&parts, &alice).await,
                want,
                "on_backend_error: {on_backend_error}: a short answer is a backend failure"
            );
        }
    }
}
