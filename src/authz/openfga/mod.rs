//! OpenFGA as the relationship backend: a client built once per process (a backend of the
//! composition root, not policy) and its one background task.
//!
//! - `client`: [`OpenFgaClient`], checks and batching behind the circuit breaker, the
//!   model checks are asked against, route-rule validation.
//! - `coalesce`: single checks asked while OpenFGA is busy go out together as one
//!   `/batch-check` (adaptive, no timer).
//! - `watch`: [`ChangeWatcher`], the changelog (stale cached answers) and the latest model.
//! - `resolve`: which store and model the configuration names; startup errors.
//! - `model`: what a model says (types, relations, which changes reach other objects).
//! - `transport`: HTTP, the stale-connection retry, and the one classification of a failed
//!   call by its status.
//! - `metrics`: every call counted by endpoint and outcome, and timed.
//! - `wire`: the JSON of the OpenFGA HTTP API.
//!
//! Imports point down that list. The client does not know the decision cache: the cache
//! wraps it as one more [`RelationshipChecker`](crate::authz::RelationshipChecker), and the
//! watcher pushes stale answers into the cache through
//! [`Invalidate`](crate::authz::cache::Invalidate), a two-method trait the cache owns. Whoever
//! builds the backends plugs the two together (`ChangeWatcher::new(client, Some(cache), ..)`).
//! The watcher stays here rather than with the cache because deciding what a change makes
//! stale needs OpenFGA knowledge (the model's tuplesets, the changelog's paging and tokens);
//! a cache that imported them would be tied to one backend.

mod client;
mod coalesce;
mod metrics;
mod model;
mod resolve;
mod transport;
mod watch;
mod wire;

pub use client::{ClientStats, OpenFgaClient};
pub use metrics::{Endpoint, Outcome, RequestMetrics};
pub use watch::ChangeWatcher;

use transport::{StatusClass, status_text};

/// Where the model the error messages point to lives in this repository.
const MODEL_FILE: &str = "deploy/openfga/model.json";

/// A startup or model problem, one line that says what to do.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum OpenFgaError {
    #[error("OpenFGA unreachable at {url} (OPENFGA_API_URL): {cause}")]
    Unreachable { url: String, cause: String },
    #[error(
        "OpenFGA at {url} refused the credentials ({}): set OPENFGA_API_TOKEN to a token it accepts",
        status_text(*status)
    )]
    Unauthorized { url: String, status: u16 },
    /// OpenFGA answered `status` to `what` (`GET /stores`) with `message` (may be empty).
    #[error("OpenFGA at {url} (OPENFGA_API_URL): {what}: HTTP {}{}{message}",
        status_text(*status),
        if message.is_empty() { "" } else { ": " }
    )]
    Http {
        url: String,
        what: String,
        status: u16,
        message: String,
    },
    #[error("OPENFGA_STORE_ID {id}: {reason}; {have}")]
    StoreNotFound {
        id: String,
        reason: String,
        have: String,
    },
    #[error("OPENFGA_STORE_NAME {name}: no store has this name; {have}")]
    StoreNameNotFound { name: String, have: String },
    #[error(
        "OPENFGA_STORE_NAME {name}: {count} stores have this name ({ids}): set OPENFGA_STORE_ID to the one to use"
    )]
    StoreNameAmbiguous {
        name: String,
        count: usize,
        ids: String,
    },
    #[error(
        "OPENFGA_MODEL_ID {id}: {reason} in store {store}; available (newest first): {have} (or unset OPENFGA_MODEL_ID to use the latest)"
    )]
    ModelNotFound {
        id: String,
        reason: String,
        store: String,
        have: String,
    },
    #[error(
        "authorization model not set: the store {store} has no model: write one ({MODEL_FILE})"
    )]
    NoModel { store: String },
    #[error("{key} (rule {rule}): {message}")]
    Rule {
        rule: String,
        key: String,
        message: String,
    },
}

// === impl OpenFgaError ===

impl OpenFgaError {
    /// Worth retrying as is (the server is down, overloaded or failing), rather than fixing
    /// configuration. Decided by the status, the same way a failed check is.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Http { status, .. } => StatusClass::of(*status) == StatusClass::Unavailable,
            _ => false,
        }
    }

    /// The HTTP status OpenFGA answered, when the problem is an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Unauthorized { status, .. } | Self::Http { status, .. } => Some(*status),
            _ => None,
        }
    }
}
