//! The OpenFGA client: resolves the store and authorization model at startup (each failure
//! one line naming the variable to fix), validates route rules against the model, answers
//! relationship checks (`/check` for one question, `/batch-check` in concurrent chunks for
//! several) behind a [`CircuitBreaker`], follows the latest model when none is pinned, and
//! watches the store's changelog to invalidate the [`DecisionCache`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::breaker::{BreakerState, CircuitBreaker};
use super::cache::DecisionCache;
use super::{BackendError, CheckQuery, RelationshipChecker, TupleKey};
use crate::config::{OpenFgaConfig, StoreRef};
use crate::http_client;

/// Where the model the error messages point to lives in this repository.
const MODEL_FILE: &str = "deploy/openfga/model.json";
/// Pages of `GET /stores` read to list what the server has (100 stores each).
const MAX_STORE_PAGES: usize = 20;
/// Stores and models quoted in an error before "and N more".
const MAX_LISTED: usize = 10;
/// Changes per changelog page (OpenFGA's maximum).
const CHANGES_PAGE: u32 = 100;
/// Changelog polls between two looks at the latest model (when following it).
const MODEL_REFRESH_EVERY: u64 = 10;

/// A startup or model problem, one line that says what to do.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum OpenFgaError {
    #[error("OpenFGA unreachable at {url} (OPENFGA_API_URL): {cause}")]
    Unreachable { url: String, cause: String },
    #[error(
        "OpenFGA at {url} refused the credentials ({status}): set OPENFGA_API_TOKEN to a token it accepts"
    )]
    Unauthorized { url: String, status: String },
    #[error("OpenFGA at {url} (OPENFGA_API_URL): {what}: {message}")]
    Api {
        url: String,
        what: String,
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

impl OpenFgaError {
    /// Worth retrying as is (the server is down or failing), rather than fixing configuration.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Api { message, .. } => message.starts_with("HTTP 5"),
            _ => false,
        }
    }
}

/// One relationship a route rule may ask about, for [`OpenFgaClient::validate`]. Produced by
/// the rules module; `None` types are templated and cannot be checked before a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationRef {
    pub rule: String,
    /// Config key path, like `routes.rules[2].check.all[0]`.
    pub key: String,
    pub relation: String,
    pub object_type: Option<String>,
    pub user_type: Option<String>,
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientStats {
    /// `/check` and `/batch-check` HTTP requests sent.
    pub requests: u64,
    /// Of those, the ones that failed (transport, status, or a per-check error).
    pub errors: u64,
    /// Checks refused without a request because the breaker was open.
    pub short_circuited: u64,
    pub breaker: BreakerState,
}

/// What the client knows of an authorization model.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Model {
    id: String,
    /// Type name -> its relations.
    types: BTreeMap<String, BTreeSet<String>>,
    /// Types whose objects other objects reach through a tupleset (`member from org`): a
    /// change on one of them can change answers about other objects.
    tupleset_targets: BTreeSet<String>,
    /// Types named in a userset restriction (`[group#member]`).
    userset_targets: BTreeSet<String>,
}

impl Model {
    fn from_json(model: &ModelJson) -> Self {
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

    fn validate(&self, refs: &[RelationRef]) -> Result<(), OpenFgaError> {
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

    fn change_needs_clear(&self, tuple: &TupleKey) -> bool {
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

// ---------------------------------------------------------------------------------------------
// Wire types (OpenFGA HTTP API, v1.18).
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct StoreJson {
    id: String,
    #[serde(default)]
    name: String,
}

#[derive(Debug, Deserialize)]
struct StoresPage {
    #[serde(default)]
    stores: Vec<StoreJson>,
    #[serde(default)]
    continuation_token: String,
}

#[derive(Debug, Deserialize)]
struct ModelJson {
    id: String,
    #[serde(default)]
    type_definitions: Vec<TypeDefJson>,
}

#[derive(Debug, Deserialize)]
struct TypeDefJson {
    #[serde(rename = "type")]
    type_name: String,
    #[serde(default)]
    relations: BTreeMap<String, Value>,
    #[serde(default)]
    metadata: Option<TypeMetaJson>,
}

#[derive(Debug, Default, Deserialize)]
struct TypeMetaJson {
    #[serde(default)]
    relations: BTreeMap<String, RelationMetaJson>,
}

#[derive(Debug, Default, Deserialize)]
struct RelationMetaJson {
    #[serde(default)]
    directly_related_user_types: Vec<RelatedTypeJson>,
}

#[derive(Debug, Deserialize)]
struct RelatedTypeJson {
    #[serde(rename = "type")]
    type_name: String,
    #[serde(default)]
    relation: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ModelOne {
    authorization_model: ModelJson,
}

#[derive(Debug, Deserialize)]
struct ModelsPage {
    #[serde(default)]
    authorization_models: Vec<ModelJson>,
}

#[derive(Debug, Serialize)]
struct TupleKeyJson<'a> {
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
struct ContextualJson<'a> {
    tuple_keys: Vec<TupleKeyJson<'a>>,
}

impl<'a> ContextualJson<'a> {
    fn of(q: &'a CheckQuery) -> Option<Self> {
        (!q.contextual.is_empty()).then(|| Self {
            tuple_keys: q.contextual.iter().map(TupleKeyJson::from).collect(),
        })
    }
}

#[derive(Debug, Serialize)]
struct CheckBody<'a> {
    authorization_model_id: &'a str,
    tuple_key: TupleKeyJson<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    contextual_tuples: Option<ContextualJson<'a>>,
    consistency: &'static str,
}

#[derive(Debug, Serialize)]
struct BatchItem<'a> {
    tuple_key: TupleKeyJson<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    contextual_tuples: Option<ContextualJson<'a>>,
    /// The question's position in its chunk: short (OpenFGA allows 36 characters) and
    /// unique within the request.
    correlation_id: String,
}

#[derive(Debug, Serialize)]
struct BatchBody<'a> {
    authorization_model_id: &'a str,
    checks: Vec<BatchItem<'a>>,
    consistency: &'static str,
}

#[derive(Debug, Deserialize)]
struct CheckAnswer {
    #[serde(default)]
    allowed: bool,
}

#[derive(Debug, Deserialize)]
struct BatchAnswer {
    #[serde(default)]
    result: HashMap<String, BatchOne>,
}

#[derive(Debug, Deserialize)]
struct BatchOne {
    #[serde(default)]
    allowed: bool,
    #[serde(default)]
    error: Option<BatchOneError>,
}

#[derive(Debug, Deserialize)]
struct BatchOneError {
    #[serde(default)]
    input_error: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChangeJson {
    tuple_key: ChangeTupleJson,
}

#[derive(Debug, Deserialize)]
struct ChangeTupleJson {
    user: String,
    relation: String,
    object: String,
}

#[derive(Debug, Deserialize)]
struct ChangesPage {
    #[serde(default)]
    changes: Vec<ChangeJson>,
    #[serde(default)]
    continuation_token: String,
}

/// OpenFGA's error body: `{"code": "validation_error", "message": "..."}`.
#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

// ---------------------------------------------------------------------------------------------
// Transport
// ---------------------------------------------------------------------------------------------

/// Why one HTTP call failed.
#[derive(Debug, Clone)]
enum CallError {
    /// Connect, timeout, or a body we could not read; already described.
    Transport(String),
    /// A non-2xx status with OpenFGA's code and message.
    Status {
        status: StatusCode,
        code: String,
        message: String,
    },
}

impl CallError {
    /// Outage (counts toward the breaker) or a refusal of the question itself.
    fn into_backend(self, url: &str) -> BackendError {
        match self {
            Self::Transport(cause) => {
                BackendError::Unavailable(format!("OpenFGA at {url}: {cause}"))
            }
            Self::Status {
                status, message, ..
            } if status.is_server_error()
                || status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::REQUEST_TIMEOUT =>
            {
                BackendError::Unavailable(format!("OpenFGA at {url}: HTTP {status}: {message}"))
            }
            Self::Status {
                status, message, ..
            } => BackendError::Rejected(if message.is_empty() {
                format!("OpenFGA answered HTTP {status}")
            } else {
                message
            }),
        }
    }

    /// For startup: the variable to look at.
    fn into_startup(self, url: &str, what: &str) -> OpenFgaError {
        match self {
            Self::Transport(cause) => OpenFgaError::Unreachable {
                url: url.to_string(),
                cause,
            },
            Self::Status { status, .. }
                if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN =>
            {
                OpenFgaError::Unauthorized {
                    url: url.to_string(),
                    status: status.to_string(),
                }
            }
            Self::Status {
                status, message, ..
            } => OpenFgaError::Api {
                url: url.to_string(),
                what: what.to_string(),
                message: if message.is_empty() {
                    format!("HTTP {status}")
                } else {
                    format!("HTTP {status}: {message}")
                },
            },
        }
    }

    fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            Self::Transport(_) => None,
        }
    }

    fn code(&self) -> &str {
        match self {
            Self::Status { code, .. } => code,
            Self::Transport(_) => "",
        }
    }

    /// For the log: the cause, with the status when there is one.
    fn describe(&self) -> String {
        match self {
            Self::Status {
                status, message, ..
            } => format!("HTTP {status}: {message}"),
            Self::Transport(m) => m.clone(),
        }
    }
}

/// The HTTP side, shared with the tasks that send batch chunks concurrently.
#[derive(Debug)]
struct Transport {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    timeout: Duration,
}

impl Transport {
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, CallError> {
        let body = body.map(bytes::Bytes::from);
        let send = || {
            let mut req = self
                .http
                .request(method.clone(), format!("{}{path}", self.base));
            if let Some(token) = &self.token {
                req = req.bearer_auth(token);
            }
            if let Some(body) = &body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone());
            }
            req.send()
        };
        let resp = match send().await {
            Ok(resp) => resp,
            // A pooled connection the server closed (it restarted, or an idle timeout raced
            // us) fails without a new connection being tried. Every call here only reads, so
            // one immediate retry on a fresh connection is safe; without it each pooled
            // connection costs a failed check (a denial) after every OpenFGA restart.
            Err(e) if e.is_request() && !e.is_connect() && !e.is_timeout() => send()
                .await
                .map_err(|e| CallError::Transport(http_client::describe(&e, self.timeout)))?,
            Err(e) => {
                return Err(CallError::Transport(http_client::describe(
                    &e,
                    self.timeout,
                )));
            }
        };
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| CallError::Transport(http_client::describe(&e, self.timeout)))?;
        if !status.is_success() {
            let body: ErrorBody = serde_json::from_slice(&bytes).unwrap_or_else(|_| ErrorBody {
                code: String::new(),
                message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            });
            return Err(CallError::Status {
                status,
                code: body.code,
                message: body.message,
            });
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| CallError::Transport(format!("unreadable answer to {path}: {e}")))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CallError> {
        self.call(Method::GET, path, None).await
    }
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

pub struct OpenFgaClient {
    transport: Arc<Transport>,
    store_id: String,
    store_name: String,
    /// `OPENFGA_MODEL_ID` was set: never follow newer models.
    pinned: bool,
    model: ArcSwap<Model>,
    max_batch: usize,
    breaker: CircuitBreaker,
    requests: AtomicU64,
    errors: AtomicU64,
    short_circuited: AtomicU64,
    /// Unix milliseconds of the last successful changelog poll; 0 = none yet.
    last_poll_ms: AtomicU64,
}

impl std::fmt::Debug for OpenFgaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl OpenFgaClient {
    /// Finds the store and the model, or says in one line which variable to fix.
    pub async fn connect(cfg: &OpenFgaConfig) -> Result<Self, OpenFgaError> {
        let transport = Arc::new(Transport {
            http: http_client::client(cfg.timeout),
            base: cfg.api_url.trim_end_matches('/').to_string(),
            token: cfg.api_token.clone(),
            timeout: cfg.timeout,
        });
        let (store_id, store_name) = resolve_store(&transport, &cfg.store).await?;
        let store_label = format!("{store_name} ({store_id})");
        let model = match &cfg.model_id {
            Some(id) => pinned_model(&transport, &store_id, &store_label, id).await?,
            None => latest_model(&transport, &store_id)
                .await?
                .ok_or(OpenFgaError::NoModel { store: store_label })?,
        };
        Ok(Self {
            transport,
            store_id,
            store_name,
            pinned: cfg.model_id.is_some(),
            model: ArcSwap::from_pointee(Model::from_json(&model)),
            max_batch: cfg.max_batch_size.max(1),
            breaker: CircuitBreaker::new(cfg.breaker_failures, cfg.breaker_open_for),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            short_circuited: AtomicU64::new(0),
            last_poll_ms: AtomicU64::new(0),
        })
    }

    pub fn store_id(&self) -> &str {
        &self.store_id
    }

    pub fn store_name(&self) -> &str {
        &self.store_name
    }

    /// The model checks are asked against now (it changes when following the latest).
    pub fn model_id(&self) -> String {
        self.model.load().id.clone()
    }

    /// Whether the model id was pinned (`OPENFGA_MODEL_ID`) rather than followed.
    pub fn model_pinned(&self) -> bool {
        self.pinned
    }

    pub fn api_url(&self) -> &str {
        &self.transport.base
    }

    pub fn stats(&self) -> ClientStats {
        ClientStats {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            short_circuited: self.short_circuited.load(Ordering::Relaxed),
            breaker: self.breaker.state(),
        }
    }

    /// When the changelog watcher last read the changelog successfully.
    pub fn last_change_poll(&self) -> Option<SystemTime> {
        match self.last_poll_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    /// Every type a rule names must be in the model, every relation on its type. Returns
    /// the first problem, naming the config key, the type, the relation and what exists.
    pub fn validate(&self, refs: &[RelationRef]) -> Result<(), OpenFgaError> {
        self.model.load().validate(refs)
    }

    /// Re-reads the latest model when none is pinned; `true` when it changed (the caller
    /// clears the decision cache: old answers came from the old model).
    pub async fn refresh_model(&self) -> Result<bool, OpenFgaError> {
        if self.pinned {
            return Ok(false);
        }
        let latest = latest_model(&self.transport, &self.store_id)
            .await?
            .ok_or_else(|| OpenFgaError::NoModel {
                store: format!("{} ({})", self.store_name, self.store_id),
            })?;
        if latest.id == self.model.load().id {
            return Ok(false);
        }
        self.model.store(Arc::new(Model::from_json(&latest)));
        Ok(true)
    }

    /// Whether a change to `tuple` can change answers that neither its object nor its user
    /// identify, so the cache must be cleared rather than invalidated by key: the user is a
    /// userset or wildcard, or the user is an object other objects are reached through
    /// (`organization:acme` in `tool:x#organization`) *and* the object itself is reached
    /// from other objects (through a tupleset or a userset).
    pub fn change_needs_clear(&self, tuple: &TupleKey) -> bool {
        self.model.load().change_needs_clear(tuple)
    }

    /// One page of changes after `token` (`""` = from the beginning).
    async fn read_changes(&self, token: &str) -> Result<ChangesPage, CallError> {
        let mut path = format!("/stores/{}/changes?page_size={CHANGES_PAGE}", self.store_id);
        if !token.is_empty() {
            path.push_str("&continuation_token=");
            path.push_str(&encode_query(token));
        }
        self.transport.get(&path).await
    }

    /// Sends one chunk (`/check` for one question, `/batch-check` otherwise) and returns
    /// its answers in order.
    fn spawn_chunk(
        &self,
        set: &mut JoinSet<(usize, Result<Vec<bool>, BackendError>)>,
        index: usize,
        chunk: &[CheckQuery],
        model_id: &str,
    ) -> Result<(), BackendError> {
        let consistency = chunk
            .first()
            .map(|q| q.consistency.as_str())
            .unwrap_or_default();
        let (path, body) = if let [q] = chunk {
            let body = CheckBody {
                authorization_model_id: model_id,
                tuple_key: (&q.tuple).into(),
                contextual_tuples: ContextualJson::of(q),
                consistency,
            };
            (
                format!("/stores/{}/check", self.store_id),
                serde_json::to_vec(&body),
            )
        } else {
            let body = BatchBody {
                authorization_model_id: model_id,
                checks: chunk
                    .iter()
                    .enumerate()
                    .map(|(i, q)| BatchItem {
                        tuple_key: (&q.tuple).into(),
                        contextual_tuples: ContextualJson::of(q),
                        correlation_id: i.to_string(),
                    })
                    .collect(),
                consistency,
            };
            (
                format!("/stores/{}/batch-check", self.store_id),
                serde_json::to_vec(&body),
            )
        };
        let body = body.map_err(|e| BackendError::Rejected(format!("cannot encode check: {e}")))?;
        let n = chunk.len();
        let transport = self.transport.clone();
        self.requests.fetch_add(1, Ordering::Relaxed);
        set.spawn(async move {
            let url = transport.base.clone();
            let result = if n == 1 {
                transport
                    .call::<CheckAnswer>(Method::POST, &path, Some(body))
                    .await
                    .map(|a| vec![a.allowed])
                    .map_err(|e| e.into_backend(&url))
            } else {
                match transport
                    .call::<BatchAnswer>(Method::POST, &path, Some(body))
                    .await
                {
                    Ok(a) => batch_answers(a, n, &url),
                    Err(e) => Err(e.into_backend(&url)),
                }
            };
            (index, result)
        });
        Ok(())
    }

    async fn check_uncounted(&self, queries: &[CheckQuery]) -> Result<Vec<bool>, BackendError> {
        let model = self.model.load_full();
        // A batch-check request has one consistency: questions are grouped by it (a rule's
        // questions share one, so this is normally a single group).
        let mut order: Vec<usize> = (0..queries.len()).collect();
        order.sort_by_key(|&i| queries[i].consistency.as_str());
        let sorted: Vec<CheckQuery> = order.iter().map(|&i| queries[i].clone()).collect();
        let mut chunks: Vec<&[CheckQuery]> = Vec::new();
        for group in sorted.chunk_by(|a, b| a.consistency == b.consistency) {
            chunks.extend(group.chunks(self.max_batch));
        }
        let mut set = JoinSet::new();
        for (i, chunk) in chunks.iter().enumerate() {
            self.spawn_chunk(&mut set, i, chunk, &model.id)?;
        }
        let mut per_chunk: Vec<Option<Vec<bool>>> = vec![None; chunks.len()];
        let mut first_error: Option<BackendError> = None;
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok((i, Ok(answers))) => {
                    if let Some(slot) = per_chunk.get_mut(i) {
                        *slot = Some(answers);
                    }
                }
                Ok((_, Err(e))) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    // An outage outranks a refusal: it is what the breaker must hear about.
                    if first_error
                        .as_ref()
                        .is_none_or(|f| matches!(f, BackendError::Rejected(_)))
                    {
                        first_error = Some(e);
                    }
                }
                Err(join) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    first_error = Some(BackendError::Unavailable(format!(
                        "OpenFGA check task failed: {join}"
                    )));
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let mut sorted_answers = Vec::with_capacity(queries.len());
        for answers in per_chunk {
            sorted_answers.extend(answers.unwrap_or_default());
        }
        if sorted_answers.len() != queries.len() {
            return Err(BackendError::Unavailable(
                "OpenFGA answered fewer checks than asked".into(),
            ));
        }
        let mut out = vec![false; queries.len()];
        for (pos, allowed) in order.into_iter().zip(sorted_answers) {
            out[pos] = allowed;
        }
        Ok(out)
    }
}

/// Answers of a batch in chunk order; a per-check error fails the whole chunk.
fn batch_answers(answer: BatchAnswer, n: usize, url: &str) -> Result<Vec<bool>, BackendError> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let Some(one) = answer.result.get(&i.to_string()) else {
            return Err(BackendError::Unavailable(format!(
                "OpenFGA at {url}: batch-check answer lacks check {i}"
            )));
        };
        if let Some(err) = &one.error {
            let message = err
                .message
                .clone()
                .unwrap_or_else(|| "batch-check failed for one check".into());
            return Err(if err.input_error.is_some() {
                BackendError::Rejected(message)
            } else {
                BackendError::Unavailable(format!("OpenFGA at {url}: {message}"))
            });
        }
        out.push(one.allowed);
    }
    Ok(out)
}

/// Percent-encodes a query value (continuation tokens are base64 and may hold `+/=`).
fn encode_query(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[async_trait::async_trait]
impl RelationshipChecker for OpenFgaClient {
    async fn check(&self, queries: &[CheckQuery]) -> Result<Vec<bool>, BackendError> {
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        if let Err(e) = self.breaker.admit() {
            self.short_circuited.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        let result = self.check_uncounted(queries).await;
        match &result {
            // A refusal is an answer: the server is up.
            Ok(_) | Err(BackendError::Rejected(_)) => self.breaker.success(),
            Err(e) => self.breaker.failure(&e.to_string()),
        }
        result
    }

    fn ready(&self) -> bool {
        self.breaker.state() != BreakerState::Open
    }

    fn describe(&self) -> String {
        format!(
            "OpenFGA {} store {} ({}) model {} ({})",
            self.transport.base,
            self.store_name,
            self.store_id,
            self.model.load().id,
            if self.pinned { "pinned" } else { "latest" }
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Startup resolution
// ---------------------------------------------------------------------------------------------

async fn list_stores(t: &Transport) -> Result<Vec<StoreJson>, OpenFgaError> {
    let mut stores = Vec::new();
    let mut token = String::new();
    for _ in 0..MAX_STORE_PAGES {
        let mut path = "/stores?page_size=100".to_string();
        if !token.is_empty() {
            path.push_str("&continuation_token=");
            path.push_str(&encode_query(&token));
        }
        let page: StoresPage = t
            .get(&path)
            .await
            .map_err(|e| e.into_startup(&t.base, "GET /stores"))?;
        stores.extend(page.stores);
        if page.continuation_token.is_empty() || page.continuation_token == token {
            break;
        }
        token = page.continuation_token;
    }
    Ok(stores)
}

/// "the server has: mcp (01J...), other (01K...)".
fn describe_stores(stores: &[StoreJson]) -> String {
    if stores.is_empty() {
        return "the server has no stores: create one (POST /stores, or `fga store create`)".into();
    }
    let mut listed: Vec<String> = stores
        .iter()
        .take(MAX_LISTED)
        .map(|s| format!("{} ({})", s.name, s.id))
        .collect();
    if stores.len() > MAX_LISTED {
        listed.push(format!("and {} more", stores.len() - MAX_LISTED));
    }
    format!("the server has: {}", listed.join(", "))
}

async fn resolve_store(t: &Transport, store: &StoreRef) -> Result<(String, String), OpenFgaError> {
    match store {
        StoreRef::Id(id) => {
            let err = match t
                .get::<StoreJson>(&format!("/stores/{}", encode_query(id)))
                .await
            {
                Ok(s) => return Ok((s.id, s.name)),
                Err(e) => e,
            };
            let reason = match (err.status(), err.code()) {
                (Some(StatusCode::NOT_FOUND), _) | (_, "store_id_not_found") => {
                    "store not found".to_string()
                }
                (Some(StatusCode::BAD_REQUEST), "validation_error") => {
                    "not a store id (26 characters, like 01HVMMBCMGZNT3SED4Z17ECXCA)".to_string()
                }
                _ => return Err(err.into_startup(&t.base, &format!("GET /stores/{id}"))),
            };
            let stores = list_stores(t).await?;
            Err(OpenFgaError::StoreNotFound {
                id: id.clone(),
                reason,
                have: describe_stores(&stores),
            })
        }
        StoreRef::Name(name) => {
            let stores = list_stores(t).await?;
            let matching: Vec<&StoreJson> = stores.iter().filter(|s| &s.name == name).collect();
            match matching.as_slice() {
                [one] => Ok((one.id.clone(), one.name.clone())),
                [] => Err(OpenFgaError::StoreNameNotFound {
                    name: name.clone(),
                    have: describe_stores(&stores),
                }),
                many => Err(OpenFgaError::StoreNameAmbiguous {
                    name: name.clone(),
                    count: many.len(),
                    ids: many
                        .iter()
                        .map(|s| s.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
            }
        }
    }
}

async fn latest_model(t: &Transport, store_id: &str) -> Result<Option<ModelJson>, OpenFgaError> {
    let path = format!("/stores/{store_id}/authorization-models?page_size=1");
    let page: ModelsPage = t
        .get(&path)
        .await
        .map_err(|e| e.into_startup(&t.base, &format!("GET {path}")))?;
    Ok(page.authorization_models.into_iter().next())
}

async fn pinned_model(
    t: &Transport,
    store_id: &str,
    store_label: &str,
    model_id: &str,
) -> Result<ModelJson, OpenFgaError> {
    let path = format!(
        "/stores/{store_id}/authorization-models/{}",
        encode_query(model_id)
    );
    let err = match t.get::<ModelOne>(&path).await {
        Ok(m) => return Ok(m.authorization_model),
        Err(e) => e,
    };
    let reason = match (err.status(), err.code()) {
        (_, "authorization_model_not_found") | (Some(StatusCode::NOT_FOUND), _) => {
            "authorization model not found".to_string()
        }
        (Some(StatusCode::BAD_REQUEST), "validation_error") => {
            "not a model id (26 characters, like 01HVMMBCMGZNT3SED4Z17ECXCA)".to_string()
        }
        _ => return Err(err.into_startup(&t.base, &format!("GET {path}"))),
    };
    let list = format!("/stores/{store_id}/authorization-models?page_size={MAX_LISTED}");
    let page: ModelsPage = t
        .get(&list)
        .await
        .map_err(|e| e.into_startup(&t.base, &format!("GET {list}")))?;
    let have = if page.authorization_models.is_empty() {
        format!("none: write one ({MODEL_FILE})")
    } else {
        page.authorization_models
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(OpenFgaError::ModelNotFound {
        id: model_id.to_string(),
        reason,
        store: store_label.to_string(),
        have,
    })
}

// ---------------------------------------------------------------------------------------------
// Changelog watcher
// ---------------------------------------------------------------------------------------------

/// Follows the store's changelog and invalidates cached answers the changes touch.
///
/// Starts by reading the changelog to its end (older changes are not news), then every
/// `interval` reads what came after. Any error clears the cache (a revocation may have gone
/// unseen) and is logged once per streak; the next tick retries from the same position.
/// When the model is not pinned, every [`MODEL_REFRESH_EVERY`] polls it looks for a newer
/// model and clears the cache when there is one.
pub async fn watch_changes(
    client: Arc<OpenFgaClient>,
    cache: Arc<DecisionCache>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // `None` until the end of the changelog has been found.
    let mut position: Option<String> = None;
    let mut failing = false;
    let mut polls: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let outcome = match &position {
            None => client.changelog_end().await.map(|end| {
                // Anything cached before the end was found may predate a change it skipped.
                cache.clear();
                (end, 0)
            }),
            Some(from) => client.apply_changes(from, &cache).await,
        };
        match outcome {
            Ok((next, applied)) => {
                if failing {
                    tracing::info!(store = %client.store_id, "OpenFGA changelog readable again");
                    failing = false;
                }
                if applied > 0 {
                    tracing::debug!(
                        changes = applied,
                        "OpenFGA changes applied to the decision cache"
                    );
                }
                position = Some(next);
                client.last_poll_ms.store(unix_ms(), Ordering::Relaxed);
            }
            Err(err) => {
                if !failing {
                    tracing::warn!(
                        store = %client.store_id,
                        error = %err.describe(),
                        url = %client.transport.base,
                        "cannot read the OpenFGA changelog; clearing the decision cache on every failed poll until it recovers"
                    );
                    failing = true;
                }
                // A token OpenFGA no longer accepts (store recreated): find the end again.
                if err.code() == "invalid_continuation_token" {
                    position = None;
                }
                cache.clear();
            }
        }
        polls = polls.wrapping_add(1);
        if !client.pinned && polls.is_multiple_of(MODEL_REFRESH_EVERY) && !failing {
            match client.refresh_model().await {
                Ok(true) => {
                    tracing::info!(model = %client.model_id(), "OpenFGA authorization model changed; decision cache cleared");
                    cache.clear();
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the latest OpenFGA authorization model")
                }
            }
        }
    }
}

impl OpenFgaClient {
    /// Reads the changelog to its end; the token to continue from.
    async fn changelog_end(&self) -> Result<String, CallError> {
        let mut token = String::new();
        loop {
            let page = self.read_changes(&token).await?;
            let done = page.changes.is_empty() || page.continuation_token == token;
            token = page.continuation_token;
            if done {
                return Ok(token);
            }
        }
    }

    /// Reads and applies the changes after `from`; the next position and how many applied.
    async fn apply_changes(
        &self,
        from: &str,
        cache: &DecisionCache,
    ) -> Result<(String, usize), CallError> {
        let mut token = from.to_string();
        let mut applied = 0;
        loop {
            let page = self.read_changes(&token).await?;
            for change in &page.changes {
                let tuple = TupleKey {
                    user: change.tuple_key.user.clone(),
                    relation: change.tuple_key.relation.clone(),
                    object: change.tuple_key.object.clone(),
                };
                if self.change_needs_clear(&tuple) {
                    cache.clear();
                } else {
                    cache.invalidate(&tuple);
                }
                applied += 1;
            }
            // OpenFGA hands back the same token when nothing is new; an empty one would
            // restart from the beginning, so keep ours.
            let done = page.changes.is_empty()
                || page.continuation_token.is_empty()
                || page.continuation_token == token;
            if !page.continuation_token.is_empty() {
                token = page.continuation_token;
            }
            if done {
                return Ok((token, applied));
            }
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(1)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app_model() -> Model {
        let text = include_str!("../../deploy/openfga/model.json");
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

    #[test]
    fn backend_error_mapping() {
        let url = "http://fga:8080";
        let refused = CallError::Transport("connection refused".into()).into_backend(url);
        assert_eq!(
            refused,
            BackendError::Unavailable("OpenFGA at http://fga:8080: connection refused".into())
        );
        let status = |s: u16, message: &str| CallError::Status {
            status: StatusCode::from_u16(s).unwrap(),
            code: "x".into(),
            message: message.into(),
        };
        assert!(
            matches!(status(503, "down").into_backend(url), BackendError::Unavailable(m) if m.contains("503"))
        );
        assert!(matches!(
            status(429, "slow down").into_backend(url),
            BackendError::Unavailable(_)
        ));
        assert_eq!(
            status(400, "invalid relation: relation 'tool#nope' not found").into_backend(url),
            BackendError::Rejected("invalid relation: relation 'tool#nope' not found".into())
        );
        assert_eq!(
            status(401, "").into_startup(url, "GET /stores").to_string(),
            "OpenFGA at http://fga:8080 refused the credentials (401 Unauthorized): set OPENFGA_API_TOKEN to a token it accepts"
        );
    }

    #[test]
    fn batch_answers_in_order_and_per_check_errors() {
        let ok: BatchAnswer = serde_json::from_value(serde_json::json!({
            "result": {"1": {"allowed": false}, "0": {"allowed": true}, "2": {"allowed": true}}
        }))
        .unwrap();
        assert_eq!(batch_answers(ok, 3, "u"), Ok(vec![true, false, true]));
        let bad: BatchAnswer = serde_json::from_value(serde_json::json!({"result": {
            "0": {"allowed": true},
            "1": {"error": {"input_error": "validation_error", "message": "invalid relation: relation 'tool#nope' not found"}}
        }}))
        .unwrap();
        assert_eq!(
            batch_answers(bad, 2, "u"),
            Err(BackendError::Rejected(
                "invalid relation: relation 'tool#nope' not found".into()
            ))
        );
        let internal: BatchAnswer = serde_json::from_value(serde_json::json!({"result": {
            "0": {"error": {"internal_error": "deadline_exceeded", "message": "timeout"}}
        }}))
        .unwrap();
        assert!(matches!(
            batch_answers(internal, 1, "u"),
            Err(BackendError::Unavailable(_))
        ));
        let short: BatchAnswer = serde_json::from_value(serde_json::json!({"result": {}})).unwrap();
        assert!(matches!(
            batch_answers(short, 1, "u"),
            Err(BackendError::Unavailable(_))
        ));
    }

    #[test]
    fn request_bodies() {
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
        assert_eq!(encode_query("MDFN+/=="), "MDFN%2B%2F%3D%3D");
    }

    #[test]
    fn store_listing() {
        assert!(describe_stores(&[]).starts_with("the server has no stores"));
        let stores: Vec<StoreJson> = (0..12)
            .map(|i| StoreJson {
                id: format!("01S{i}"),
                name: format!("s{i}"),
            })
            .collect();
        let text = describe_stores(&stores);
        assert!(
            text.starts_with("the server has: s0 (01S0), s1 (01S1)"),
            "{text}"
        );
        assert!(text.ends_with("and 2 more"), "{text}");
    }
}
