//! The client's background task: follows the store's changelog and tells the decision cache
//! which remembered answers a change makes stale, and, when no model is pinned, follows the
//! store's latest authorization model.
//!
//! Owns: [`ChangeWatcher`], its changelog [`Position`] and its last successful poll.
//! Invariant: an answer the cache keeps never outlives a change the watcher could not see:
//! every change from `lookback` before the watcher started is applied, and the cache is
//! cleared on the first successful poll, on every failed poll, when the position is lost and
//! when the model changes. Changes are pushed through [`Invalidate`], the cache's own small
//! trait, so neither the client nor the watcher knows the cache's type.
//!
//! Where it starts: not at the beginning of the store's history (a store with a million
//! changes would cost ten thousand requests before the first useful one) but at a moment,
//! `lookback` before now, read with ReadChanges' `start_time`. Changes carry OpenFGA's
//! clock, not ours; the lookback (default 5 minutes) is the clock skew tolerated between
//! the sidecar and OpenFGA. The changes inside it are applied, a few harmless evictions.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::client::OpenFgaClient;
use super::transport::{CallError, encode_query};
use super::wire::ChangesPage;
use crate::authz::TupleKey;
use crate::authz::cache::Invalidate;

/// Changes per changelog page (OpenFGA's maximum).
const CHANGES_PAGE: u32 = 100;
/// Ticks between two looks at the latest model (when following it).
const MODEL_REFRESH_EVERY: u64 = 10;

/// Where the next poll reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Position {
    /// Every change at or after this moment (no change seen since, so OpenFGA has given no
    /// token yet: a `start_time` read with nothing to return answers an empty token).
    Since(SystemTime),
    /// The changes after this continuation token.
    After(String),
}

pub struct ChangeWatcher {
    client: Arc<OpenFgaClient>,
    /// Where stale answers are reported; `None` without a decision cache (then only the
    /// model is followed: the changelog would be read for nobody).
    cache: Option<Arc<dyn Invalidate>>,
    interval: Duration,
    /// How long before startup (or a lost position) the changelog is read from.
    lookback: Duration,
    /// Unix milliseconds of the last successful changelog poll; 0 = none yet.
    last_poll_ms: AtomicU64,
}

// === impl ChangeWatcher ===

impl ChangeWatcher {
    /// A watcher reading the changelog every `interval` (and the latest model every
    /// [`MODEL_REFRESH_EVERY`] intervals), from `lookback` before it starts; it does nothing
    /// until [`spawn`](Self::spawn)ed.
    pub fn new(
        client: Arc<OpenFgaClient>,
        cache: Option<Arc<dyn Invalidate>>,
        interval: Duration,
        lookback: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            cache,
            interval: interval.max(Duration::from_millis(10)),
            lookback,
            last_poll_ms: AtomicU64::new(0),
        })
    }

    /// The position of a watcher that has seen nothing yet: `lookback` before now.
    fn anchor(&self) -> Position {
        Position::Since(SystemTime::now() - self.lookback)
    }

    /// Runs until `shutdown`. With a pinned model and no cache there is nothing to follow
    /// and the task ends at once.
    pub fn spawn(self: &Arc<Self>, shutdown: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(self.clone().run(shutdown))
    }

    /// When the changelog was last read successfully.
    pub fn last_poll(&self) -> Option<SystemTime> {
        match self.last_poll_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    /// Starts `lookback` before now (older changes are not news), then every tick reads
    /// what came after. Any error clears the cache (a revocation may have gone unseen) and is
    /// logged once per streak; the next tick retries from the same position.
    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let client = &self.client;
        if self.cache.is_none() && client.model_pinned() {
            return;
        }
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut position = self.anchor();
        let mut first = true;
        let mut failing = false;
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if let Some(cache) = &self.cache {
                failing = !self.poll(cache.as_ref(), &mut position, failing).await;
                if first && !failing {
                    // Anything cached before the watcher first read the changelog is
                    // dropped: the invariant is simpler than proving it current.
                    cache.clear();
                    first = false;
                }
            }
            ticks = ticks.wrapping_add(1);
            if !client.model_pinned() && ticks.is_multiple_of(MODEL_REFRESH_EVERY) && !failing {
                self.follow_model().await;
            }
        }
    }

    /// One changelog poll; `true` when it succeeded. `was_failing`: the previous one did
    /// not (a streak is logged once, at its start, and its end once).
    async fn poll(
        &self,
        cache: &dyn Invalidate,
        position: &mut Position,
        was_failing: bool,
    ) -> bool {
        let client = &self.client;
        let outcome = self.apply_changes(position, cache).await;
        match outcome {
            Ok((next, applied)) => {
                if was_failing {
                    tracing::info!(store = %client.store_id(), "OpenFGA changelog readable again");
                }
                if applied > 0 {
                    tracing::debug!(
                        changes = applied,
                        "OpenFGA changes applied to the decision cache"
                    );
                }
                *position = next;
                self.last_poll_ms.store(unix_ms(), Ordering::Relaxed);
                true
            }
            Err(err) => {
                if !was_failing {
                    tracing::warn!(
                        store = %client.store_id(),
                        error = %err.describe(),
                        url = %client.api_url(),
                        "cannot read the OpenFGA changelog; clearing the decision cache on every failed poll until it recovers"
                    );
                }
                // A token OpenFGA no longer accepts (store recreated): start again from
                // `lookback` before now (the cache is cleared just below).
                if err.code() == "invalid_continuation_token" {
                    *position = self.anchor();
                }
                cache.clear();
                false
            }
        }
    }

    /// Looks for a newer model (none is pinned); answers from the old one are stale.
    async fn follow_model(&self) {
        match self.client.refresh_model().await {
            Ok(true) => {
                if let Some(cache) = &self.cache {
                    cache.clear();
                    tracing::info!(model = %self.client.model_id(), "OpenFGA authorization model changed; decision cache cleared");
                } else {
                    tracing::info!(model = %self.client.model_id(), "OpenFGA authorization model changed");
                }
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the latest OpenFGA authorization model")
            }
        }
    }

    /// One page of changes from `from`.
    async fn read_changes(&self, from: &Position) -> Result<ChangesPage, CallError> {
        let mut path = format!(
            "/stores/{}/changes?page_size={CHANGES_PAGE}",
            self.client.store_id()
        );
        match from {
            Position::After(token) => {
                path.push_str("&continuation_token=");
                path.push_str(&encode_query(token));
            }
            Position::Since(at) => {
                path.push_str("&start_time=");
                path.push_str(&encode_query(
                    &humantime::format_rfc3339_millis(*at).to_string(),
                ));
            }
        }
        self.client.transport().get(&path).await
    }

    /// Reads and applies the changes from `from`; the next position and how many applied.
    async fn apply_changes(
        &self,
        from: &Position,
        cache: &dyn Invalidate,
    ) -> Result<(Position, usize), CallError> {
        let mut at = from.clone();
        let mut applied = 0;
        loop {
            let page = self.read_changes(&at).await?;
            let empty = page.changes.is_empty();
            for change in page.changes {
                let tuple = TupleKey::from(change.tuple_key);
                if self.client.change_needs_clear(&tuple) {
                    cache.clear();
                } else {
                    cache.invalidate(&tuple);
                }
                applied += 1;
            }
            // OpenFGA hands back the same token when nothing is new, and an empty one when
            // a `start_time` read found nothing; an empty token would restart from the
            // beginning, so keep our position.
            let same = matches!(&at, Position::After(t) if *t == page.continuation_token);
            let done = empty || page.continuation_token.is_empty() || same;
            if !page.continuation_token.is_empty() {
                at = Position::After(page.continuation_token);
            }
            if done {
                return Ok((at, applied));
            }
        }
    }
}

/// Now, for `last_poll`; never 0, which means "not yet".
fn unix_ms() -> u64 {
    crate::clock::now_millis().max(1)
}
