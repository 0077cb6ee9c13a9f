//! The client's background task: follows the store's changelog and tells the decision cache
//! which remembered answers a change makes stale, and, when no model is pinned, follows the
//! store's latest authorization model.
//!
//! Owns: [`ChangeWatcher`], its changelog position and its last successful poll. Invariant:
//! an answer the cache keeps never outlives a change the watcher could not see: the cache is
//! cleared when the watcher first finds the end of the changelog, on every failed poll, when
//! its position is lost and when the model changes. Changes are pushed through
//! [`Invalidate`], the cache's own small trait, so neither the client nor the watcher knows
//! the cache's type.

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

pub struct ChangeWatcher {
    client: Arc<OpenFgaClient>,
    /// Where stale answers are reported; `None` without a decision cache (then only the
    /// model is followed: the changelog would be read for nobody).
    cache: Option<Arc<dyn Invalidate>>,
    interval: Duration,
    /// Unix milliseconds of the last successful changelog poll; 0 = none yet.
    last_poll_ms: AtomicU64,
}

// === impl ChangeWatcher ===

impl ChangeWatcher {
    /// A watcher reading the changelog every `interval` (and the latest model every
    /// [`MODEL_REFRESH_EVERY`] intervals); it does nothing until [`spawn`](Self::spawn)ed.
    pub fn new(
        client: Arc<OpenFgaClient>,
        cache: Option<Arc<dyn Invalidate>>,
        interval: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            cache,
            interval: interval.max(Duration::from_millis(10)),
            last_poll_ms: AtomicU64::new(0),
        })
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

    /// Starts by reading the changelog to its end (older changes are not news), then every
    /// tick reads what came after. Any error clears the cache (a revocation may have gone
    /// unseen) and is logged once per streak; the next tick retries from the same position.
    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let client = &self.client;
        if self.cache.is_none() && client.model_pinned() {
            return;
        }
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // `None` until the end of the changelog has been found.
        let mut position: Option<String> = None;
        let mut failing = false;
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if let Some(cache) = &self.cache {
                failing = !self.poll(cache.as_ref(), &mut position, failing).await;
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
        position: &mut Option<String>,
        was_failing: bool,
    ) -> bool {
        let client = &self.client;
        let outcome = match position.as_deref() {
            None => self.changelog_end().await.map(|end| {
                // Anything cached before the end was found may predate a change it skipped.
                cache.clear();
                (end, 0)
            }),
            Some(from) => self.apply_changes(from, cache).await,
        };
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
                *position = Some(next);
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
                // A token OpenFGA no longer accepts (store recreated): find the end again.
                if err.code() == "invalid_continuation_token" {
                    *position = None;
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

    /// One page of changes after `token` (`""` = from the beginning).
    async fn read_changes(&self, token: &str) -> Result<ChangesPage, CallError> {
        let mut path = format!(
            "/stores/{}/changes?page_size={CHANGES_PAGE}",
            self.client.store_id()
        );
        if !token.is_empty() {
            path.push_str("&continuation_token=");
            path.push_str(&encode_query(token));
        }
        self.client.transport().get(&path).await
    }

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
        cache: &dyn Invalidate,
    ) -> Result<(String, usize), CallError> {
        let mut token = from.to_string();
        let mut applied = 0;
        loop {
            let page = self.read_changes(&token).await?;
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
            // OpenFGA hands back the same token when nothing is new; an empty one would
            // restart from the beginning, so keep ours.
            let done =
                empty || page.continuation_token.is_empty() || page.continuation_token == token;
            if !page.continuation_token.is_empty() {
                token = page.continuation_token;
            }
            if done {
                return Ok((token, applied));
            }
        }
    }
}

/// Now, for `last_poll`; never 0, which means "not yet".
fn unix_ms() -> u64 {
    crate::clock::now_millis().max(1)
}
