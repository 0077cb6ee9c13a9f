//! Authorization: what an authenticated principal may do. Owns the route rules
//! ([`rules`]), the role/scope requirements and the relationship checks a rule asks of a
//! [`RelationshipChecker`] (OpenFGA, behind the decision cache). [`Authorizer`] is the object
//! the pipeline asks, beside [`crate::authn::Authenticator`]: it holds the checker (bound late,
//! [`LateChecker`]), the contextual tuples and the readiness of the relationship backend.

mod authorizer;
pub mod breaker;
pub mod cache;
pub mod openfga;
pub mod rules;
pub mod strict_json;
pub mod trace;

use std::sync::Arc;

use crate::authn::Principal;
use crate::config::{Consistency, Match, OnBackendError};
use crate::failure::FailureKind;
use rules::{CompiledCheck, EvalContext, Rule};
use trace::{Event, Trace, record};

pub use authorizer::{Authorizer, LateChecker, contextual_tuples};

/// A relationship tuple: `user:alice` `executor` `tool:agent_chat`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TupleKey {
    pub user: String,
    pub relation: String,
    pub object: String,
}

impl std::fmt::Display for TupleKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.user, self.relation, self.object)
    }
}

/// One question for the relationship backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CheckQuery {
    pub tuple: TupleKey,
    /// Tuples that hold for this request only (from token roles and groups).
    pub contextual: Arc<Vec<TupleKey>>,
    pub consistency: Consistency,
}

/// Why the relationship backend could not answer.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BackendError {
    /// Unreachable, timed out, or answered 5xx.
    #[error("{0}")]
    Unavailable(String),
    /// The circuit breaker is open after repeated failures.
    #[error("circuit open after repeated failures (last: {last}); retrying in {retry_in_ms}ms")]
    CircuitOpen { last: String, retry_in_ms: u64 },
    /// The backend refused the question itself (unknown type or relation, bad store).
    #[error("{0}")]
    Rejected(String),
}

/// One relationship a route rule may ask about, for validating the rules against the
/// authorization model before serving. Produced by the rules; `None` types are templated
/// and cannot be checked before a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationRef {
    pub rule: String,
    /// Config key path, like `routes.rules[2].check.all[0]`.
    pub key: String,
    pub relation: String,
    pub object_type: Option<String>,
    pub user_type: Option<String>,
}

/// Answers relationship checks. The decision cache implements it too, wrapping the OpenFGA
/// client, so the pipeline does not know where an answer came from.
#[async_trait::async_trait]
pub trait RelationshipChecker: Send + Sync {
    /// One answer per query, in order.
    async fn check(&self, queries: &[CheckQuery]) -> Result<Vec<bool>, BackendError>;
    /// Whether the backend is configured and reachable (readiness).
    fn ready(&self) -> bool;
    fn describe(&self) -> String;
    /// The answer a cache in this checker holds for `query` now, if any, without counting
    /// it or changing the cache: for explanations ([`trace::Source`]). No cache: `None`.
    fn cached(&self, _query: &CheckQuery) -> Option<bool> {
        None
    }
}

/// Why a principal may not do what it asked.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthzError {
    #[error("no route rule matches {method} {path}")]
    NoRule { method: String, path: String },
    #[error("role {0} required")]
    RoleRequired(String),
    #[error("one of roles {0} required")]
    AnyRoleRequired(String),
    #[error("scope {0} required")]
    ScopeRequired(String),
    #[error("{0}")]
    Template(String),
    #[error("{user} is not {relation} of {object}")]
    RelationMissing {
        user: String,
        relation: String,
        object: String,
    },
    #[error("none of the required relationships hold: {0}")]
    NoneOf(String),
    #[error("authorization backend unavailable: {0}")]
    BackendUnavailable(String),
    #[error("authorization backend rejected the check: {0}")]
    BackendRejected(String),
    #[error("rule {0} needs relationship checks but no OpenFGA is configured")]
    NoChecker(String),
}

impl AuthzError {
    /// How this failure is answered ([`crate::decision`] maps kinds to statuses).
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::ScopeRequired(_) => FailureKind::InsufficientScope,
            Self::BackendUnavailable(_) | Self::NoChecker(_) => FailureKind::Unavailable,
            _ => FailureKind::Forbidden,
        }
    }
}

/// What passing authorization produced, beyond "yes".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Granted {
    /// The rule let the request through although the backend failed (`on_backend_error: allow`).
    pub failed_open: Option<String>,
    /// Relationship checks that held, for the log.
    pub relations: Vec<String>,
}

/// Roles, then scopes, then relationship checks, for several parts of one request (one part,
/// or the elements of a JSON-RPC batch), each with the rule that governs it: granted only when
/// every part is. The relationship checks of all parts go to the checker as one call (one
/// BatchCheck); on a refusal, the index of the first part refused.
///
/// Invariant: a relationship check passes only on the checker's own answer to it. A checker
/// that returns more or fewer answers than it was asked is a backend failure (the rule's
/// `on_backend_error` decides), never a short list an `all:` clause could pass over.
async fn authorize_parts(
    parts: &[(&Rule, &EvalContext<'_>)],
    principal: &Principal,
    checker: Option<&dyn RelationshipChecker>,
    contextual: &Arc<Vec<TupleKey>>,
    mut trace: Option<&mut Trace>,
) -> Result<Granted, (usize, AuthzError)> {
    let mut queries = Vec::new();
    // (part, its check, its queries in `queries`)
    let mut asked = Vec::new();
    for (i, (rule, ctx)) in parts.iter().enumerate() {
        roles_and_scopes(rule, principal).map_err(|e| (i, e))?;
        let Some(check) = &rule.check else {
            continue;
        };
        let start = queries.len();
        for c in &check.checks {
            let tuple = c
                .render(principal, ctx)
                .map_err(|e| (i, AuthzError::Template(e)))?;
            queries.push(CheckQuery {
                tuple,
                contextual: contextual.clone(),
                consistency: check.consistency,
            });
        }
        asked.push((i, check, start..queries.len()));
    }
    let Some(&(first, _, _)) = asked.first() else {
        return Ok(Granted::default());
    };
    let checker =
        checker.ok_or_else(|| (first, AuthzError::NoChecker(parts[first].0.name.clone())))?;
    // Where each answer will come from, read before asking (only when explaining).
    let sources: Vec<trace::Source> = if trace.is_some() {
        queries
            .iter()
            .map(|q| match checker.cached(q) {
                Some(_) => trace::Source::Cache,
                None => trace::Source::OpenFga,
            })
            .collect()
    } else {
        Vec::new()
    };
    let answers = checker.check(&queries).await.and_then(|a| {
        if a.len() == queries.len() {
            Ok(a)
        } else {
            Err(BackendError::Unavailable(format!(
                "{} answers to {} checks",
                a.len(),
                queries.len()
            )))
        }
    });
    if trace.is_some() {
        for (i, _, range) in &asked {
            for k in range.clone() {
                record(&mut trace, || Event::Relation {
                    rule: parts[*i].0.name.clone(),
                    tuple: queries[k].tuple.clone(),
                    answer: match &answers {
                        Ok(a) => Ok(a[k]),
                        Err(e) => Err(e.to_string()),
                    },
                    source: sources[k],
                });
            }
        }
    }
    let mut granted = Granted::default();
    for (i, check, range) in asked {
        let answers = answers.as_ref().map(|a| &a[range.clone()]);
        let g = conclude(check, &queries[range], answers).map_err(|e| (i, e))?;
        granted.failed_open = granted.failed_open.or(g.failed_open);
        granted.relations.extend(g.relations);
    }
    Ok(granted)
}

fn roles_and_scopes(rule: &Rule, principal: &Principal) -> Result<(), AuthzError> {
    if !rule.roles.is_empty() {
        match rule.roles_match {
            Match::All => {
                if let Some(missing) = rule.roles.iter().find(|r| !principal.has_role(r)) {
                    return Err(AuthzError::RoleRequired(missing.clone()));
                }
            }
            Match::Any => {
                if !rule.roles.iter().any(|r| principal.has_role(r)) {
                    return Err(if rule.roles.len() == 1 {
                        AuthzError::RoleRequired(rule.roles[0].clone())
                    } else {
                        AuthzError::AnyRoleRequired(rule.roles.join(", "))
                    });
                }
            }
        }
    }
    if let Some(missing) = rule.scopes.iter().find(|s| !principal.has_scope(s)) {
        return Err(AuthzError::ScopeRequired(missing.clone()));
    }
    Ok(())
}

/// One rule's relationship checks, given the backend's answers to them (or its failure).
fn conclude(
    check: &CompiledCheck,
    queries: &[CheckQuery],
    answers: Result<&[bool], &BackendError>,
) -> Result<Granted, AuthzError> {
    let answers = match answers {
        Ok(a) => a,
        Err(e) => {
            return match (check.on_backend_error, e) {
                (_, BackendError::Rejected(m)) => Err(AuthzError::BackendRejected(m.clone())),
                (OnBackendError::Allow, e) => Ok(Granted {
                    failed_open: Some(e.to_string()),
                    relations: Vec::new(),
                }),
                (OnBackendError::Deny, e) => Err(AuthzError::BackendUnavailable(e.to_string())),
            };
        }
    };
    let held: Vec<String> = queries
        .iter()
        .zip(answers)
        .filter(|(_, ok)| **ok)
        .map(|(q, _)| q.tuple.to_string())
        .collect();
    let pass = if check.all {
        answers.iter().all(|a| *a)
    } else {
        answers.iter().any(|a| *a)
    };
    if pass {
        return Ok(Granted {
            failed_open: None,
            relations: held,
        });
    }
    if check.all {
        let (q, _) = queries
            .iter()
            .zip(answers)
            .find(|(_, ok)| !**ok)
            .expect("a check failed");
        Err(AuthzError::RelationMissing {
            user: q.tuple.user.clone(),
            relation: q.tuple.relation.clone(),
            object: q.tuple.object.clone(),
        })
    } else {
        Err(AuthzError::NoneOf(
            queries
                .iter()
                .map(|q| q.tuple.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        ))
    }
}
