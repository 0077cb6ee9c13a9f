//! The OpenFGA client: answers relationship checks (`/check` for one question,
//! `/batch-check` in concurrent chunks for several) behind a [`CircuitBreaker`], holds the
//! authorization model they are asked against, and counts requests for `/metrics`.
//!
//! Owns: [`OpenFgaClient`], built once per process (it is a backend, not policy). Invariant:
//! answers come back in the caller's order whatever the chunking; the breaker hears every
//! outage and never a refusal of the question (an unknown relation is an answer, not a sign
//! that OpenFGA is down). The client knows nothing of the decision cache, which wraps it
//! through [`RelationshipChecker`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use reqwest::Method;
use tokio::task::JoinSet;

use super::OpenFgaError;
use super::metrics::RequestMetrics;
use super::model::Model;
use super::resolve::{latest_model, resolve, store_label};
use super::transport::Transport;
use super::wire::{BatchAnswer, BatchBody, BatchItem, CheckAnswer, CheckBody, ContextualJson};
use crate::authz::breaker::{BreakerState, CircuitBreaker};
use crate::authz::{BackendError, CheckQuery, RelationRef, RelationshipChecker, TupleKey};
use crate::config::OpenFgaConfig;

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

pub struct OpenFgaClient {
    transport: Arc<Transport>,
    store_id: String,
    store_name: String,
    /// `OPENFGA_MODEL_ID` was set: never follow newer models.
    pinned: bool,
    model: ArcSwap<Model>,
    max_batch: usize,
    /// `/stores/{id}/check` and `/stores/{id}/batch-check`, formatted once.
    check_path: Arc<str>,
    batch_path: Arc<str>,
    breaker: CircuitBreaker,
    requests: AtomicU64,
    errors: AtomicU64,
    short_circuited: AtomicU64,
}

/// One chunk's answers, tagged with the chunk's index.
type ChunkResult = (usize, Result<Vec<bool>, BackendError>);

// === impl OpenFgaClient ===

impl std::fmt::Debug for OpenFgaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl OpenFgaClient {
    /// Finds the store and the model, or says in one line which variable to fix.
    pub async fn connect(cfg: &OpenFgaConfig) -> Result<Self, OpenFgaError> {
        Self::connect_observed(cfg, RequestMetrics::default()).await
    }

    /// [`connect`](Self::connect), counting every call (the ones that find the store and
    /// the model included) in `metrics`.
    pub async fn connect_observed(
        cfg: &OpenFgaConfig,
        metrics: RequestMetrics,
    ) -> Result<Self, OpenFgaError> {
        let transport = Arc::new(Transport::new(cfg, metrics));
        let resolved = resolve(&transport, cfg).await?;
        Ok(Self {
            transport,
            check_path: format!("/stores/{}/check", resolved.store_id).into(),
            batch_path: format!("/stores/{}/batch-check", resolved.store_id).into(),
            store_id: resolved.store_id,
            store_name: resolved.store_name,
            pinned: cfg.model_id.is_some(),
            model: ArcSwap::from_pointee(Model::from_json(&resolved.model)),
            max_batch: cfg.max_batch_size.max(1),
            breaker: CircuitBreaker::new(cfg.breaker_failures, cfg.breaker_open_for),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            short_circuited: AtomicU64::new(0),
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
        self.transport.base()
    }

    pub fn stats(&self) -> ClientStats {
        ClientStats {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            short_circuited: self.short_circuited.load(Ordering::Relaxed),
            breaker: self.breaker.state(),
        }
    }

    /// Every type a rule names must be in the model, every relation on its type. Returns
    /// the first problem, naming the config key, the type, the relation and what exists.
    pub fn validate(&self, refs: &[RelationRef]) -> Result<(), OpenFgaError> {
        self.model.load().validate(refs)
    }

    /// Re-reads the latest model when none is pinned; `true` when it changed (answers
    /// remembered from the old model are stale: the changelog watcher clears them).
    pub async fn refresh_model(&self) -> Result<bool, OpenFgaError> {
        if self.pinned {
            return Ok(false);
        }
        let latest = latest_model(&self.transport, &self.store_id)
            .await?
            .ok_or_else(|| OpenFgaError::NoModel {
                store: store_label(&self.store_name, &self.store_id),
            })?;
        if latest.id == self.model.load().id {
            return Ok(false);
        }
        self.model.store(Arc::new(Model::from_json(&latest)));
        Ok(true)
    }

    /// Whether a change to `tuple` can change answers that neither its object nor its user
    /// identify, so remembered answers must all go rather than those found by key: the user
    /// is a userset or wildcard, or the user is an object other objects are reached through
    /// (`organization:acme` in `tool:x#organization`) *and* the object itself is reached
    /// from other objects (through a tupleset or a userset).
    pub fn change_needs_clear(&self, tuple: &TupleKey) -> bool {
        self.model.load().change_needs_clear(tuple)
    }

    /// For the changelog watcher, which reads the same store over the same connection pool.
    pub(super) fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The request for one chunk: `/check` for one question, `/batch-check` otherwise.
    fn chunk_request(&self, chunk: &[CheckQuery], model_id: &str) -> Result<Chunk, BackendError> {
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
            (&self.check_path, serde_json::to_vec(&body))
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
            (&self.batch_path, serde_json::to_vec(&body))
        };
        let body = body.map_err(|e| BackendError::Rejected(format!("cannot encode check: {e}")))?;
        Ok(Chunk {
            path: Arc::clone(path),
            body,
            n: chunk.len(),
        })
    }

    async fn check_uncounted(&self, queries: &[CheckQuery]) -> Result<Vec<bool>, BackendError> {
        let model = self.model.load();
        // One question (one rule, one relation: the usual miss) is one /check, awaited here:
        // no sorting, no copies, no task (a spawned task per call cost a hand-off through
        // the scheduler on every miss).
        if let [query] = queries {
            let chunk = self.chunk_request(std::slice::from_ref(query), &model.id)?;
            drop(model);
            let result = self.send(chunk).await;
            if result.is_err() {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
            return result;
        }
        // A batch-check request has one consistency: questions are grouped by it (a rule's
        // questions share one, so this is normally a single group).
        let mut order: Vec<usize> = (0..queries.len()).collect();
        order.sort_by_key(|&i| queries[i].consistency.as_str());
        let sorted: Vec<CheckQuery> = order.iter().map(|&i| queries[i].clone()).collect();
        let mut chunks: Vec<&[CheckQuery]> = Vec::new();
        for group in sorted.chunk_by(|a, b| a.consistency == b.consistency) {
            chunks.extend(group.chunks(self.max_batch));
        }
        let mut set: JoinSet<ChunkResult> = JoinSet::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let chunk = self.chunk_request(chunk, &model.id)?;
            let transport = self.transport.clone();
            self.requests.fetch_add(1, Ordering::Relaxed);
            // In the check's span, so the call's span is its child.
            set.spawn(tracing::Instrument::in_current_span(async move {
                (i, send_chunk(&transport, chunk).await)
            }));
        }
        drop(model);
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

    /// Sends one chunk from the caller's task, counted.
    async fn send(&self, chunk: Chunk) -> Result<Vec<bool>, BackendError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        send_chunk(&self.transport, chunk).await
    }
}

/// One request's worth of questions, encoded.
struct Chunk {
    path: Arc<str>,
    body: Vec<u8>,
    /// How many questions it asks.
    n: usize,
}

/// Sends one chunk and returns its answers in order.
async fn send_chunk(transport: &Transport, chunk: Chunk) -> Result<Vec<bool>, BackendError> {
    let Chunk { path, body, n } = chunk;
    if n == 1 {
        transport
            .call::<CheckAnswer>(Method::POST, &path, Some(body))
            .await
            .map(|a| vec![a.allowed])
            .map_err(|e| e.into_backend(transport.base()))
    } else {
        match transport
            .call::<BatchAnswer>(Method::POST, &path, Some(body))
            .await
        {
            Ok(a) => batch_answers(a, n, transport.base()),
            Err(e) => Err(e.into_backend(transport.base())),
        }
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

// === impl RelationshipChecker for OpenFgaClient ===

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

    /// Ready once resolved, which a client is from construction on. An outage later is not
    /// unreadiness: it shows in the breaker metric and in the 503 of the checks that need
    /// OpenFGA, while public, JWT-only and API-key routes (and `on_backend_error: allow`)
    /// keep answering. Following the breaker here would take every pod out of the Service at
    /// once, for a reason most of the app's routes do not have.
    fn ready(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!(
            "OpenFGA {} store {} ({}) model {} ({})",
            self.transport.base(),
            self.store_name,
            self.store_id,
            self.model.load().id,
            if self.pinned { "pinned" } else { "latest" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
