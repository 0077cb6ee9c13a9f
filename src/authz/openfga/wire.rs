//! The OpenFGA HTTP API's JSON, as far as the sidecar reads and writes it (v1.18): stores,
//! models, check and batch-check, the changelog and the error body.
//!
//! Owns: the shapes only, no behaviour. Invariant: every field OpenFGA may omit is
//! `#[serde(default)]`, so a sparser answer from a newer server still parses; what an absent
//! field means (an empty page, a denial) is decided by the caller.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::authz::{CheckQuery, TupleKey};

// === Stores and models ===

#[derive(Debug, Deserialize)]
pub(super) struct StoreJson {
    pub(super) id: String,
    #[serde(default)]
    pub(super) name: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct StoresPage {
    #[serde(default)]
    pub(super) stores: Vec<StoreJson>,
    #[serde(default)]
    pub(super) continuation_token: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct ModelJson {
    pub(super) id: String,
    #[serde(default)]
    pub(super) type_definitions: Vec<TypeDefJson>,
}

#[derive(Debug, Deserialize)]
pub(super) struct TypeDefJson {
    #[serde(rename = "type")]
    pub(super) type_name: String,
    #[serde(default)]
    pub(super) relations: BTreeMap<String, Value>,
    #[serde(default)]
    pub(super) metadata: Option<TypeMetaJson>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct TypeMetaJson {
    #[serde(default)]
    pub(super) relations: BTreeMap<String, RelationMetaJson>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RelationMetaJson {
    #[serde(default)]
    pub(super) directly_related_user_types: Vec<RelatedTypeJson>,
}

#[derive(Debug, Deserialize)]
pub(super) struct RelatedTypeJson {
    #[serde(rename = "type")]
    pub(super) type_name: String,
    #[serde(default)]
    pub(super) relation: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ModelOne {
    pub(super) authorization_model: ModelJson,
}

#[derive(Debug, Deserialize)]
pub(super) struct ModelsPage {
    #[serde(default)]
    pub(super) authorization_models: Vec<ModelJson>,
}

// === Check and batch-check ===

#[derive(Debug, Serialize)]
pub(super) struct TupleKeyJson<'a> {
    user: &'a str,
    relation: &'a str,
    object: &'a str,
}

impl<'a> From<&'a TupleKey> for TupleKeyJson<'a> {
    fn from(t: &'a TupleKey) -> Self {
        Self {
            user: &t.user,
            relation: &t.relation,
            object: &t.object,
        }
    }
}

#[derive(Debug, Serialize)]
pub(super) struct ContextualJson<'a> {
    tuple_keys: Vec<TupleKeyJson<'a>>,
}

impl<'a> ContextualJson<'a> {
    /// `None` when the question has no contextual tuples (the field is then left out).
    pub(super) fn of(q: &'a CheckQuery) -> Option<Self> {
        (!q.contextual.is_empty()).then(|| Self {
            tuple_keys: q.contextual.iter().map(TupleKeyJson::from).collect(),
        })
    }
}

#[derive(Debug, Serialize)]
pub(super) struct CheckBody<'a> {
    pub(super) authorization_model_id: &'a str,
    pub(super) tuple_key: TupleKeyJson<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) contextual_tuples: Option<ContextualJson<'a>>,
    pub(super) consistency: &'static str,
}

#[derive(Debug, Serialize)]
pub(super) struct BatchItem<'a> {
    pub(super) tuple_key: TupleKeyJson<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) contextual_tuples: Option<ContextualJson<'a>>,
    /// The question's position in its chunk: short (OpenFGA allows 36 characters) and
    /// unique within the request.
    pub(super) correlation_id: String,
}

#[derive(Debug, Serialize)]
pub(super) struct BatchBody<'a> {
    pub(super) authorization_model_id: &'a str,
    pub(super) checks: Vec<BatchItem<'a>>,
    pub(super) consistency: &'static str,
}

#[derive(Debug, Deserialize)]
pub(super) struct CheckAnswer {
    #[serde(default)]
    pub(super) allowed: bool,
}

#[derive(Debug, Deserialize)]
pub(super) struct BatchAnswer {
    #[serde(default)]
    pub(super) result: HashMap<String, BatchOne>,
}

#[derive(Debug, Deserialize)]
pub(super) struct BatchOne {
    #[serde(default)]
    pub(super) allowed: bool,
    #[serde(default)]
    pub(super) error: Option<BatchOneError>,
}

#[derive(Debug, Deserialize)]
pub(super) struct BatchOneError {
    #[serde(default)]
    pub(super) input_error: Option<String>,
    #[serde(default)]
    pub(super) message: Option<String>,
}

// === Changelog ===

#[derive(Debug, Deserialize)]
pub(super) struct ChangeJson {
    pub(super) tuple_key: ChangeTupleJson,
}

#[derive(Debug, Deserialize)]
pub(super) struct ChangeTupleJson {
    pub(super) user: String,
    pub(super) relation: String,
    pub(super) object: String,
}

impl From<ChangeTupleJson> for TupleKey {
    fn from(t: ChangeTupleJson) -> Self {
        Self {
            user: t.user,
            relation: t.relation,
            object: t.object,
        }
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct ChangesPage {
    #[serde(default)]
    pub(super) changes: Vec<ChangeJson>,
    #[serde(default)]
    pub(super) continuation_token: String,
}

// === Errors ===

/// OpenFGA's error body: `{"code": "validation_error", "message": "..."}`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ErrorBody {
    #[serde(default)]
    pub(super) code: String,
    #[serde(default)]
    pub(super) message: String,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn t(user: &str, relation: &str, object: &str) -> TupleKey {
        TupleKey {
            user: user.into(),
            relation: relation.into(),
            object: object.into(),
        }
    }

    #[test]
    fn a_check_body_carries_model_tuple_context_and_consistency() {
        let q = CheckQuery {
            tuple: t("user:alice", "executor", "tool:x"),
            contextual: Arc::new(vec![t("user:alice", "member", "organization:acme")]),
            consistency: crate::config::Consistency::HigherConsistency,
        };
        let body = serde_json::to_value(CheckBody {
            authorization_model_id: "01M",
            tuple_key: (&q.tuple).into(),
            contextual_tuples: ContextualJson::of(&q),
            consistency: q.consistency.as_str(),
        })
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "authorization_model_id": "01M",
                "tuple_key": {"user": "user:alice", "relation": "executor", "object": "tool:x"},
                "contextual_tuples": {"tuple_keys": [
                    {"user": "user:alice", "relation": "member", "object": "organization:acme"}]},
                "consistency": "HIGHER_CONSISTENCY"
            })
        );
    }

    #[test]
    fn a_check_without_contextual_tuples_leaves_the_field_out() {
        let q = CheckQuery {
            tuple: t("user:alice", "executor", "tool:x"),
            contextual: Arc::new(Vec::new()),
            consistency: crate::config::Consistency::MinimizeLatency,
        };
        let body = serde_json::to_value(CheckBody {
            authorization_model_id: "01M",
            tuple_key: (&q.tuple).into(),
            contextual_tuples: ContextualJson::of(&q),
            consistency: q.consistency.as_str(),
        })
        .unwrap();
        assert!(body.get("contextual_tuples").is_none(), "{body}");
    }
}
