//! What the sidecar knows of an authorization model: its types and their relations (to
//! validate route rules before serving) and which types other objects are reached through
//! (to decide whether a tuple change can be invalidated by key or needs a full clear).
//!
//! Owns: [`Model`]. Invariant: a [`Model`] is immutable and read from one model id; following
//! a newer model swaps in a new one (the client holds it in an `ArcSwap`), so a check and the
//! invalidation rules always come from a single model.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::OpenFgaError;
use super::wire::ModelJson;
use crate::authz::{RelationRef, TupleKey};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Model {
    pub(super) id: String,
    /// Type name -> its relations.
    types: BTreeMap<String, BTreeSet<String>>,
    /// Types whose objects other objects reach through a tupleset (`member from org`): a
    /// change on one of them can change answers about other objects.
    tupleset_targets: BTreeSet<String>,
    /// Types named in a userset restriction (`[group#member]`).
    userset_targets: BTreeSet<String>,
}

// === impl Model ===

impl Model {
    pub(super) fn from_json(model: &ModelJson) -> Self {
        let mut types = BTreeMap::new();
        let mut tupleset_targets = BTreeSet::new();
        let mut userset_targets = BTreeSet::new();
        for td in &model.type_definitions {
            let relations = td.relations.keys().cloned().collect();
            types.insert(td.type_name.clone(), relations);
            let meta = td.metadata.as_ref().map(|m| &m.relations);
            // Restrictions first: a userset restriction names a type reached through it.
            for rel in meta.into_iter().flat_map(|r| r.values()) {
                for t in &rel.directly_related_user_types {
                    if t.relation.is_some() {
                        userset_targets.insert(t.type_name.clone());
                    }
                }
            }
            let mut tuplesets = BTreeSet::new();
            for rewrite in td.relations.values() {
                collect_tuplesets(rewrite, &mut tuplesets);
            }
            for ts in tuplesets {
                let Some(rel) = meta.and_then(|m| m.get(&ts)) else {
                    continue;
                };
                for t in &rel.directly_related_user_types {
                    tupleset_targets.insert(t.type_name.clone());
                }
            }
        }
        Self {
            id: model.id.clone(),
            types,
            tupleset_targets,
            userset_targets,
        }
    }

    /// Every type a rule names must be in the model, every relation on its type. Returns
    /// the first problem, naming the config key, the type, the relation and what exists.
    pub(super) fn validate(&self, refs: &[RelationRef]) -> Result<(), OpenFgaError> {
        for r in refs {
            let fail = |message: String| OpenFgaError::Rule {
                rule: r.rule.clone(),
                key: r.key.clone(),
                message,
            };
            match &r.object_type {
                Some(t) => {
                    let Some(relations) = self.types.get(t) else {
                        return Err(fail(format!(
                            "type {t} is not in authorization model {}; its types: {}",
                            self.id,
                            self.type_list()
                        )));
                    };
                    if !relations.contains(&r.relation) {
                        let has = if relations.is_empty() {
                            "none".to_string()
                        } else {
                            relations.iter().cloned().collect::<Vec<_>>().join(", ")
                        };
                        return Err(fail(format!(
                            "type {t} has no relation {}; it has: {has}",
                            r.relation
                        )));
                    }
                }
                // A templated type: at least some type must have the relation.
                None => {
                    if !self.types.values().any(|rels| rels.contains(&r.relation)) {
                        return Err(fail(format!(
                            "no type in authorization model {} has relation {}",
                            self.id, r.relation
                        )));
                    }
                }
            }
            if let Some(u) = &r.user_type
                && !self.types.contains_key(u)
            {
                return Err(fail(format!(
                    "user type {u} is not in authorization model {}; its types: {}",
                    self.id,
                    self.type_list()
                )));
            }
        }
        Ok(())
    }

    /// Whether a change to `tuple` can change answers that neither its object nor its user
    /// identify, so cached answers must all go rather than those found by key: the user is
    /// a userset or wildcard, or the user is an object other objects are reached through
    /// (`organization:acme` in `tool:x#organization`) *and* the object itself is reached
    /// from other objects (through a tupleset or a userset).
    pub(super) fn change_needs_clear(&self, tuple: &TupleKey) -> bool {
        if tuple.user.contains('#') || tuple.user.ends_with(":*") {
            return true;
        }
        let object_type = type_of(&tuple.object);
        self.tupleset_targets.contains(type_of(&tuple.user))
            && (self.tupleset_targets.contains(object_type)
                || self.userset_targets.contains(object_type))
    }

    fn type_list(&self) -> String {
        self.types.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

/// The tupleset relations a rewrite walks (`X from tupleset`), found anywhere in the tree.
fn collect_tuplesets(rewrite: &Value, out: &mut BTreeSet<String>) {
    match rewrite {
        Value::Object(map) => {
            if let Some(rel) = map
                .get("tupleToUserset")
                .and_then(|t| t.get("tupleset"))
                .and_then(|t| t.get("relation"))
                .and_then(Value::as_str)
            {
                out.insert(rel.to_string());
            }
            for v in map.values() {
                collect_tuplesets(v, out);
            }
        }
        Value::Array(items) => {
            for v in items {
                collect_tuplesets(v, out);
            }
        }
        _ => {}
    }
}

fn type_of(subject: &str) -> &str {
    subject.split_once(':').map_or(subject, |(t, _)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app_model() -> Model {
        let text = include_str!("../../../deploy/openfga/model.json");
        let mut json: Value = serde_json::from_str(text).unwrap();
        json["id"] = Value::String("01MODEL".into());
        Model::from_json(&serde_json::from_value(json).unwrap())
    }

    fn r(
        key: &str,
        relation: &str,
        object_type: Option<&str>,
        user_type: Option<&str>,
    ) -> RelationRef {
        RelationRef {
            rule: "tools".into(),
            key: key.into(),
            relation: relation.into(),
            object_type: object_type.map(String::from),
            user_type: user_type.map(String::from),
        }
    }

    fn t(user: &str, relation: &str, object: &str) -> TupleKey {
        TupleKey {
            user: user.into(),
            relation: relation.into(),
            object: object.into(),
        }
    }

    #[test]
    fn model_types_and_reach() {
        let m = app_model();
        assert!(m.types["tool"].contains("executor"));
        assert!(m.types["user"].is_empty());
        // tool#executor includes `member from organization`: organizations are reached.
        assert_eq!(
            m.tupleset_targets,
            BTreeSet::from(["organization".to_string()])
        );
        assert!(m.userset_targets.is_empty());
    }

    #[test]
    fn validate_names_key_type_relation_and_alternatives() {
        let m = app_model();
        assert_eq!(
            m.validate(&[
                r(
                    "routes.rules[0].check.all[0]",
                    "executor",
                    Some("tool"),
                    Some("user")
                ),
                r("routes.rules[0].check.any[0]", "viewer", None, None),
            ]),
            Ok(())
        );
        let e = m
            .validate(&[r(
                "routes.rules[2].check.all[0]",
                "runner",
                Some("tool"),
                None,
            )])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "routes.rules[2].check.all[0] (rule tools): type tool has no relation runner; it has: executor, organization, owner"
        );
        let e = m
            .validate(&[r("k", "viewer", Some("document"), None)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("type document is not in authorization model 01MODEL; its types: conversation, organization"), "{e}");
        let e = m
            .validate(&[r("k", "runner", None, None)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no type in authorization model 01MODEL has relation runner"),
            "{e}"
        );
        let e = m
            .validate(&[r("k", "executor", Some("tool"), Some("team"))])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("k (rule tools): user type team is not in"),
            "{e}"
        );
    }

    #[test]
    fn which_changes_need_a_full_clear() {
        let m = app_model();
        // Direct grants and memberships: the object's or the subject's answers suffice.
        assert!(!m.change_needs_clear(&t("user:alice", "executor", "tool:x")));
        assert!(!m.change_needs_clear(&t("user:alice", "member", "organization:acme")));
        // A tool's organization: every answer about the tool (by object).
        assert!(!m.change_needs_clear(&t("organization:acme", "organization", "tool:x")));
        assert!(m.change_needs_clear(&t("group:eng#member", "viewer", "conversation:1")));
        assert!(m.change_needs_clear(&t("user:*", "viewer", "conversation:1")));

        // Nested folders: a folder's parent changes what users may do on other documents.
        let nested: ModelJson = serde_json::from_value(serde_json::json!({
            "id": "01NESTED",
            "type_definitions": [
                {"type": "user"},
                {"type": "folder", "relations": {
                    "parent": {"this": {}},
                    "viewer": {"union": {"child": [{"this": {}}, {"tupleToUserset": {
                        "tupleset": {"relation": "parent"}, "computedUserset": {"relation": "viewer"}}}]}}},
                 "metadata": {"relations": {
                    "parent": {"directly_related_user_types": [{"type": "folder"}]},
                    "viewer": {"directly_related_user_types": [{"type": "user"}]}}}},
                {"type": "doc", "relations": {
                    "parent": {"this": {}},
                    "viewer": {"tupleToUserset": {
                        "tupleset": {"relation": "parent"}, "computedUserset": {"relation": "viewer"}}}},
                 "metadata": {"relations": {
                    "parent": {"directly_related_user_types": [{"type": "folder"}]}}}}
            ]
        }))
        .unwrap();
        let m = Model::from_json(&nested);
        assert!(m.change_needs_clear(&t("folder:a", "parent", "folder:b")));
        assert!(!m.change_needs_clear(&t("folder:b", "parent", "doc:1")));
        assert!(!m.change_needs_clear(&t("user:alice", "viewer", "folder:a")));
    }
}
