//! What one check did, step by step, for `authz-sidecar check --explain` and `doctor`: the
//! rules tried and why each did not match, the rule that governs, the authentication outcome,
//! every relationship question with its tuple and where its answer came from, and each shadow
//! rule's outcome.
//!
//! Invariant: recording never changes a decision, and a check that records nothing pays
//! nothing. The pipeline, the rules and the authorizer take an `Option<&mut Trace>`; serving
//! passes `None`, so no event (and no string in it) is ever built on the serving path. The
//! events are plain data: [`crate::explain`] renders them (this module sits low enough for
//! the rules and the authorizer to record into it).

use std::sync::Arc;

use super::TupleKey;
use crate::authn::Principal;

/// Where the answer to a relationship question came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The decision cache held it (as the cache stood just before the question was asked).
    Cache,
    /// Asked of OpenFGA (a cache miss, a `HIGHER_CONSISTENCY` question, or no cache).
    OpenFga,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cache => "decision cache",
            Self::OpenFga => "OpenFGA",
        }
    }
}

/// One step of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A rule was tried and does not match; `why` names the part (host, method, path pattern,
    /// a predicate and the value it read).
    RuleSkipped {
        rule: String,
        shadow: bool,
        why: String,
    },
    /// The rule that governs the request (or one batch element), with its path parameters.
    RuleMatched {
        rule: String,
        shadow: bool,
        params: Vec<(String, String)>,
    },
    /// A shadow rule was passed over when routing for the answer.
    ShadowIgnored { rule: String },
    /// The body is a JSON-RPC batch of this many elements: each is routed on its own.
    Batch { elements: usize },
    /// The events that follow concern this batch element.
    Element { index: usize },
    /// No enforcing rule matches: `routes.unmatched` decides.
    Unmatched { policy: &'static str },
    /// The rule is public: no credential is read.
    Public { rule: String },
    /// Who the caller is, or why that could not be told (the whole reason).
    Authenticated(Result<Arc<Principal>, String>),
    /// Tuples that hold for this request only (from the principal's roles and groups), sent
    /// with every relationship question below.
    Contextual { tuples: Vec<TupleKey> },
    /// One relationship question and its answer (`Err`: the backend failed).
    Relation {
        rule: String,
        tuple: TupleKey,
        answer: Result<bool, String>,
        source: Source,
    },
    /// A shadow rule's outcome: `would_allow`, `would_deny` or `would_error`, with why.
    Shadow {
        rule: String,
        outcome: &'static str,
        reason: String,
    },
    /// `routes.dry_run` answered this deny (status, reason) with an allow.
    DryRun { status: u16, reason: String },
}

/// The events of one check, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    pub events: Vec<Event>,
}

impl Trace {
    pub fn push(&mut self, event: Event) {
        self.events.push(event);
    }
}

/// Records `event` when a trace is kept; `event` is only built then.
pub fn record(trace: &mut Option<&mut Trace>, event: impl FnOnce() -> Event) {
    if let Some(t) = trace.as_deref_mut() {
        t.push(event());
    }
}
