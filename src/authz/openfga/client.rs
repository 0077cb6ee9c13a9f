//! The OpenFGA client: answers relationship checks (`/check` for one question,
//! `/batch-check` in concurrent chunks for several) behind a [`CircuitBreaker`], holds the
//! authorization model they are asked against, and counts requests for `/metrics`. Single
//! checks asked while `openfga.max_in_flight` requests are out go together as one
//! `/batch-check` when one returns ([`Coalescer`]).
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
use super::coalesce::{Coalescer, SendChecks};
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
    store_id: String,
    store_name: String,
    /// `OPENFGA_MODEL_ID` was set: never follow newer models.
    pinned: bool,
    max_batch: usize,
    breaker: CircuitBreaker,
    short_circuited: AtomicU64,
    /// Single checks; it owns the [`Link`] every check request goes through.
    coalescer: Coalescer<Link>,
}

/// What sending checks needs, shared with the tasks that send coalesced batches and
/// multi-chunk checks.
struct Link {
    transport: Arc<Transport>,
    model: ArcSwap<Model>,
    /// `/stores/{id}/check` and `/stores/{id}/batch-check`, formatted once.
    check_path: Arc<str>,
    batch_path: Arc<str>,
    requests: AtomicU64,
    errors: AtomicU64,
}

/// One request's worth of questions, encoded.
struct Chunk {
    path: Arc<str>,
    body: Vec<u8>,
    /// How many questions it asks.
    n: usize,
}

/// One chunk's answers, tagged with the chunk's index.
type ChunkResult = (usize, Vec<Result<bool, BackendError>>);

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
        let max_batch = cfg.max_batch_size.max(1);
        let link = Link {
            transport,
            model: ArcSwap::from_pointee(Model::from_json(&resolved.model)),
            check_path: format!("/stores/{}/check", resolved.store_id).into(),
            batch_path: format!("/stores/{}/batch-check", resolved.store_id).into(),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        };
        Ok(Self {
            store_id: resolved.store_id,
            store_name: resolved.store_name,
            pinned: cfg.model_id.is_some(),
            max_batch,
            breaker: CircuitBreaker::new(cfg.breaker_failures, cfg.breaker_open_for),
            short_circuited: AtomicU64::new(0),
            coalescer: Coalescer::new(link, cfg.max_in_flight, max_batch),
        })
    }

    fn link(&self) -> &Link {
        self.coalescer.sender()
    }

    pub fn store_id(&self) -> &str {
        &self.store_id
    }

    pub fn store_name(&self) -> &str {
        &self.store_name
    }

    /// The model checks are asked against now (it changes when following the latest).
    pub fn model_id(&self) -> String {
        self.link().model.load().id.clone()
    }

    /// Whether the model id was pinned (`OPENFGA_MODEL_ID`) rather than followed.
    pub fn model_pinned(&self) -> bool {
        self.pinned
    }

    pub fn api_url(&self) -> &str {
        self.link().transport.base()
    }

    pub fn stats(&self) -> ClientStats {
        ClientStats {
            requests: self.link().requests.load(Ordering::Relaxed),
            errors: self.link().errors.load(Ordering::Relaxed),
            short_circuited: self.short_circuited.load(Ordering::Relaxed),
            breaker: self.breaker.state(),
        }
    }

    /// Every type a rule names must be in the model, every relation on its type. Returns
    /// the first problem, naming the config key, the type, the relation and what exists.
    pub fn validate(&self, refs: &[RelationRef]) -> Result<(), OpenFgaError> {
        self.link().model.load().validate(refs)
    }

    /// Re-reads the latest model when none is pinned; `true` when it changed (answers
    /// remembered from the old model are stale: the changelog watcher clears them).
    pub async fn refresh_model(&self) -> Result<bool, OpenFgaError> {
        if self.pinned {
            return Ok(false);
        }
        let link = self.link();
        let latest = latest_model(&link.transport, &self.store_id)
            .await?
            .ok_or_else(|| OpenFgaError::NoModel {
                store: store_label(&self.store_name, &self.store_id),
            })?;
        if latest.id == link.model.load().id {
            return Ok(false);
        }
        link.model.store(Arc::new(Model::from_json(&latest)));
        Ok(true)
    }

    /// Whether a change to `tuple` can change answers that neither its object nor its user
    /// identify, so remembered answers must all go rather than those found by key: the user
    /// is a userset or wildcard, or the user is an object other objects are reached through
    /// (`organization:acme` in `tool:x#organization`) *and* the object itself is reached
    /// from other objects (through a tupleset or a userset).
    pub fn change_needs_clear(&self, tuple: &TupleKey) -> bool {
        self.link().model.load().change_needs_clear(tuple)
    }

    /// For the changelog watcher, which reads the same store over the same connection pool.
    pub(super) fn transport(&self) -> &Transport {
        &self.link().transport
    }

    async fn check_uncounted(&self, queries: &[CheckQuery]) -> Result<Vec<bool>, BackendError> {
        // One question (one rule, one relation: the usual miss) is awaited in this task, or
        // coalesced with others when OpenFGA is busy: no sorting, no copies, no task.
        if let [query] = queries {
            return self
                .coalescer
                .check(query)
                .await
                .map(|allowed| vec![allowed]);
        }
        let link = self.link();
        // A batch-check request has one consistency: questions are grouped by it (a rule's
        // questions share one, so this is normally a single group).
        let mut order: Vec<usize> = (0..queries.len()).collect();
        order.sort_by_key(|&i| queries[i].consistency.as_str());
        let sorted: Vec<CheckQuery> = order.iter().map(|&i| queries[i].clone()).collect();
        let mut chunks: Vec<&[CheckQuery]> = Vec::new();
        for group in sorted.chunk_by(|a, b| a.consistency == b.consistency) {
            chunks.extend(group.chunks(self.max_batch));
        }
        let encoded = {
            let model = link.model.load();
            chunks
                .iter()
                .map(|chunk| link.request(chunk, &model.id))
                .collect::<Result<Vec<Chunk>, BackendError>>()?
        };
        let mut set: JoinSet<ChunkResult> = JoinSet::new();
        for (i, chunk) in encoded.into_iter().enumerate() {
            let transport = Arc::clone(&link.transport);
            link.requests.fetch_add(1, Ordering::Relaxed);
            // In the check's span, so the call's span is its child.
            set.spawn(tracing::Instrument::in_current_span(async move {
                (i, send_chunk(&transport, chunk).await)
            }));
        }
        let mut per_chunk: Vec<Option<Vec<bool>>> = vec![None; chunks.len()];
        let mut first_error: Option<BackendError> = None;
        while let Some(joined) = set.join_next().await {
            // A per-check error fails the whole call (the rule needs every answer).
            match joined.map(|(i, answers)| (i, answers.into_iter().collect::<Result<Vec<_>, _>>()))
            {
                Ok((i, Ok(answers))) => {
                    if let Some(slot) = per_chunk.get_mut(i) {
                        *slot = Some(answers);
                    }
                }
                Ok((_, Err(e))) => {
                    link.errors.fetch_add(1, Ordering::Relaxed);
                    // An outage outranks a refusal: it is what the breaker must hear about.
                    if first_error
                        .as_ref()
                        .is_none_or(|f| matches!(f, BackendError::Rejected(_)))
                    {
                        first_error = Some(e);
                    }
                }
                Err(join) => {
                    link.errors.fetch_add(1, Ordering::Relaxed);
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

// === impl Link ===

impl Link {
    /// The request for one chunk (one consistency): `/check` for one question,
    /// `/batch-check` otherwise.
    fn request(&self, chunk: &[CheckQuery], model_id: &str) -> Result<Chunk, BackendError> {
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
}

impl SendChecks for Link {
    async fn send(&self, queries: &[CheckQuery]) -> Vec<Result<bool, BackendError>> {
        let chunk = {
            let model = self.model.load();
            self.request(queries, &model.id)
        };
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => return vec![Err(e); queries.len()],
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        let answers = send_chunk(&self.transport, chunk).await;
        if answers.iter().any(Result::is_err) {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        answers
    }
}

/// Sends one chunk; one answer per question in order, a failed request being that error
/// for each.
async fn send_chunk(transport: &Transport, chunk: Chunk) -> Vec<Result<bool, BackendError>> {
    let Chunk { path, body, n } = chunk;
    let url = transport.base();
    if n == 1 {
        let answer = transport
            .call::<CheckAnswer>(Method::POST, &path, Some(body))
            .await;
        return vec![answer.map(|a| a.allowed).map_err(|e| e.into_backend(url))];
    }
    match transport
        .call::<BatchAnswer>(Method::POST, &path, Some(body))
        .await
    {
        Ok(answer) => batch_answers(&answer, n, url),
        Err(e) => vec![Err(e.into_backend(url)); n],
    }
}

/// Answers of a batch in chunk order, each check on its own: one check's error (a
/// refused question, or OpenFGA failing that one) is that check's answer only.
fn batch_answers(answer: &BatchAnswer, n: usize, url: &str) -> Vec<Result<bool, BackendError>> {
    (0..n)
        .map(|i| {
            let Some(one) = answer.result.get(&i.to_string()) else {
                return Err(BackendError::Unavailable(format!(
                    "OpenFGA at {url}: batch-check answer lacks check {i}"
                )));
            };
            match &one.error {
                None => Ok(one.allowed),
                Some(err) => {
                    let message = err
                        .message
                        .clone()
                        .unwrap_or_else(|| "batch-check failed for one check".into());
                    Err(if err.input_error.is_some() {
                        BackendError::Rejected(message)
                    } else {
                        BackendError::Unavailable(format!("OpenFGA at {url}: {message}"))
                    })
                }
            }
        })
        .collect()
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
            self.link().transport.base(),
            self.store_name,
            self.store_id,
            self.link().model.load().id,
            if self.pinned { "pinned" } else { "latest" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_answers_in_order_each_check_on_its_own() {
        let ok: BatchAnswer = serde_json::from_value(serde_json::json!({
            "result": {"1": {"allowed": false}, "0": {"allowed": true}, "2": {"allowed": true}}
        }))
        .unwrap();
        assert_eq!(
            batch_answers(&ok, 3, "u"),
            vec![Ok(true), Ok(false), Ok(true)]
        );
        let bad: BatchAnswer = serde_json::from_value(serde_json::json!({"result": {
            "0": {"allowed": true},
            "1": {"error": {"input_error": "validation_error", "message": "invalid relation: relation 'tool#nope' not found"}}
        }}))
        .unwrap();
        // The refused check fails alone; its neighbour keeps its answer.
        assert_eq!(
            batch_answers(&bad, 2, "u"),
            vec![
                Ok(true),
                Err(BackendError::Rejected(
                    "invalid relation: relation 'tool#nope' not found".into()
                ))
            ]
        );
        let internal: BatchAnswer = serde_json::from_value(serde_json::json!({"result": {
            "0": {"error": {"internal_error": "deadline_exceeded", "message": "timeout"}}
        }}))
        .unwrap();
        assert!(matches!(
            batch_answers(&internal, 1, "u")[..],
            [Err(BackendError::Unavailable(_))]
        ));
        let short: BatchAnswer = serde_json::from_value(serde_json::json!({"result": {}})).unwrap();
        assert!(matches!(
            batch_answers(&short, 1, "u")[..],
            [Err(BackendError::Unavailable(_))]
        ));
    }
}
