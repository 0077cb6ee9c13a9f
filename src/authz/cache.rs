//! The decision cache: a [`RelationshipChecker`] that wraps another one (the OpenFGA client)
//! and remembers its answers, so the pipeline asks the same trait either way.
//!
//! Owns: the entries (allowed answers for `allowed_ttl`, denied for `denied_ttl`, at most
//! `max_entries`), single-flight of concurrent identical misses, and invalidation by tuple
//! (driven by the OpenFGA changelog) through secondary indexes by object and by subject.
//!
//! Questions asked with `HIGHER_CONSISTENCY` (read-after-write) bypass the cache.
//! Errors are never cached. An answer whose question was in flight while an invalidation
//! ran is returned but not kept: it may predate the change that caused the invalidation.
//!
//! # Memory and eviction
//!
//! An entry keeps no text: a question is known by a 128-bit [`Fingerprint`] (two SipHashes
//! under per-process random keys, so nobody can aim for a collision; by chance one is
//! 2^-128 per pair, far below any other failure), and the indexes by object and by subject
//! are keyed by a 64-bit hash of the name. An index collision only forgets more answers than
//! needed; it never keeps a stale one. About 150 bytes per entry in all, where the rendered
//! tuples cost ~500.
//!
//! Eviction is CLOCK (second chance): every entry owns one slot of a ring of `max_entries`
//! slots. A new entry takes the slot under the hand: a slot whose entry is gone (invalidated,
//! expired) is free; an expired entry goes; one hit since the hand last passed loses its mark
//! and is passed over; any other is evicted. Each mark is cleared once per turn of the hand,
//! so an insert costs O(1) amortised, never a scan of the whole cache.

use std::collections::HashSet;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;
use tokio::sync::watch;

use super::{BackendError, CheckQuery, RelationshipChecker, TupleKey};
use crate::clock::{MillisClock, millis, monotonic_clock};
use crate::config::{CacheConfig, Consistency};

/// Counters for metrics; `size` is the number of entries now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Misses that waited for an identical question already in flight.
    pub coalesced: u64,
    /// Entries removed to stay within `max_entries`.
    pub evictions: u64,
    /// Entries removed because a tuple changed (or everything was cleared).
    pub invalidations: u64,
    pub size: u64,
}

/// What an answer is about: the tuple, the contextual tuples and the consistency, hashed.
type Fingerprint = u128;

#[derive(Debug)]
struct Entry {
    allowed: bool,
    expires_at: u64,
    /// Hashes of the tuple's object and user: where the indexes list this entry.
    object: u64,
    subject: u64,
    /// The ring slot this entry owns.
    slot: usize,
    /// Hit since the hand last passed: spared once.
    referenced: AtomicBool,
}

/// The fingerprints listed under one object or subject. Most objects have one answer, so one
/// is kept inline; a set only once there are more.
#[derive(Debug)]
enum Listed {
    One(Fingerprint),
    // Boxed on purpose: a `HashSet` inline would make every list 64 bytes instead of 32,
    // for the rare name with more than one answer.
    #[allow(clippy::box_collection)]
    Many(Box<HashSet<Fingerprint>>),
}

impl Listed {
    fn insert(&mut self, fp: Fingerprint) {
        match self {
            Self::One(one) if *one == fp => {}
            Self::One(one) => *self = Self::Many(Box::new(HashSet::from([*one, fp]))),
            Self::Many(set) => {
                set.insert(fp);
            }
        }
    }

    /// Removes `fp`; true when nothing is left.
    fn remove(&mut self, fp: Fingerprint) -> bool {
        match self {
            Self::One(one) => *one == fp,
            Self::Many(set) => {
                set.remove(&fp);
                set.is_empty()
            }
        }
    }

    fn to_vec(&self) -> Vec<Fingerprint> {
        match self {
            Self::One(one) => vec![*one],
            Self::Many(set) => set.iter().copied().collect(),
        }
    }
}

type Index = DashMap<u64, Listed>;

/// The CLOCK ring: `slots[i]` is the fingerprint of the entry that took slot `i` (which may
/// be gone since); `hand` the next slot to consider.
#[derive(Default)]
struct Ring {
    slots: Vec<Fingerprint>,
    hand: usize,
}

/// How a source of relationship changes (the OpenFGA changelog watcher) tells the cache which
/// remembered answers went stale. The cache owns this trait so the source depends on two
/// methods, not on the cache: the OpenFGA client and its watcher never name
/// [`DecisionCache`].
pub trait Invalidate: Send + Sync {
    /// `tuple` was written or deleted: forget answers about its object and for its user.
    fn invalidate(&self, tuple: &TupleKey);
    /// A change whose reach cannot be found by key (or may have been missed): forget all.
    fn clear(&self);
}

/// `None` until the leader of a flight publishes its answer.
type Flight = Option<Result<bool, BackendError>>;

pub struct DecisionCache {
    inner: Arc<dyn RelationshipChecker>,
    /// Milliseconds; reloadable ([`DecisionCache::set_ttls`]): answers stored from then on
    /// use the new values, answers already stored keep the expiry they were stored with.
    allowed_ttl: AtomicU64,
    denied_ttl: AtomicU64,
    max_entries: usize,
    clock: MillisClock,
    /// Two independent keys: the two halves of a [`Fingerprint`].
    keys: [RandomState; 2],
    entries: DashMap<Fingerprint, Entry>,
    by_object: Index,
    by_subject: Index,
    /// Taken by every store, before any entry or index shard (lock order: ring, entry shard,
    /// index shard). Lookups and invalidations never take it: a slot whose entry they removed
    /// is found free by the hand later.
    ring: Mutex<Ring>,
    inflight: DashMap<Fingerprint, watch::Receiver<Flight>>,
    /// Bumped by every invalidation; a flight that saw it change does not store its answer.
    epoch: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    evictions: AtomicU64,
    invalidations: AtomicU64,
}

impl DecisionCache {
    pub fn new(inner: Arc<dyn RelationshipChecker>, cfg: &CacheConfig) -> Self {
        Self::with_clock(inner, cfg, monotonic_clock())
    }

    pub fn with_clock(
        inner: Arc<dyn RelationshipChecker>,
        cfg: &CacheConfig,
        clock: MillisClock,
    ) -> Self {
        Self {
            inner,
            allowed_ttl: AtomicU64::new(millis(cfg.allowed_ttl)),
            denied_ttl: AtomicU64::new(millis(cfg.denied_ttl)),
            max_entries: cfg.max_entries.max(1),
            clock,
            keys: [RandomState::new(), RandomState::new()],
            entries: DashMap::new(),
            by_object: DashMap::new(),
            by_subject: DashMap::new(),
            ring: Mutex::new(Ring::default()),
            inflight: DashMap::new(),
            epoch: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
        }
    }

    /// New TTLs (a config reload): answers stored from now on live this long; answers already
    /// stored expire as they were stored.
    pub fn set_ttls(&self, allowed: Duration, denied: Duration) {
        self.allowed_ttl.store(millis(allowed), Ordering::Relaxed);
        self.denied_ttl.store(millis(denied), Ordering::Relaxed);
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            coalesced: self.coalesced.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            size: self.entries.len() as u64,
        }
    }

    /// A tuple was written or deleted: forget every answer about its object and every answer
    /// for its user. A userset (`group:x#member`) or wildcard (`user:*`) user changes answers
    /// for subjects that cannot be found by key, so those clear everything.
    ///
    /// Answers on *other* objects that reach this one through a tupleset (`member from
    /// parent`) are not traced here; the OpenFGA changelog watcher decides from the model
    /// when a change needs [`clear`](Self::clear) instead.
    pub fn invalidate(&self, tuple: &TupleKey) {
        if tuple.user.contains('#') || tuple.user.ends_with(":*") {
            self.clear();
            return;
        }
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let mut removed = 0u64;
        // Taking the whole list out first: a store racing with this either put its entry in
        // before (and is removed here) or sees the new epoch and removes its entry itself.
        let by_object = self.by_object.remove(&self.name_hash(&tuple.object));
        let by_subject = self.by_subject.remove(&self.name_hash(&tuple.user));
        for (_, listed) in by_object.into_iter().chain(by_subject) {
            for fp in listed.to_vec() {
                if self.remove_entry(fp, |_| true) {
                    removed += 1;
                }
            }
        }
        self.invalidations.fetch_add(removed, Ordering::Relaxed);
    }

    /// Forget every answer (a missed changelog poll, a new authorization model).
    pub fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let n = self.entries.len() as u64;
        self.entries.clear();
        self.by_object.clear();
        self.by_subject.clear();
        self.invalidations.fetch_add(n, Ordering::Relaxed);
    }

    /// The contextual tuples and consistency of a question, hashed under both keys.
    fn context_hash(&self, q: &CheckQuery) -> [u64; 2] {
        self.keys.each_ref().map(|key| {
            let mut h = key.build_hasher();
            q.contextual.hash(&mut h);
            q.consistency.hash(&mut h);
            h.finish()
        })
    }

    fn fingerprint(&self, q: &CheckQuery, context: [u64; 2]) -> Fingerprint {
        let [a, b] = [0, 1].map(|i| {
            let mut h = self.keys[i].build_hasher();
            q.tuple.hash(&mut h);
            context[i].hash(&mut h);
            h.finish()
        });
        u128::from(a) << 64 | u128::from(b)
    }

    /// Where the indexes list an object or a user.
    fn name_hash(&self, name: &str) -> u64 {
        self.keys[0].hash_one(name)
    }

    /// A fresh cached answer, marked as used; an expired one is removed on the way.
    fn lookup(&self, fp: Fingerprint, now: u64) -> Option<bool> {
        {
            let entry = self.entries.get(&fp)?;
            if entry.expires_at > now {
                // A load first: most hits find the mark set and write nothing.
                if !entry.referenced.load(Ordering::Relaxed) {
                    entry.referenced.store(true, Ordering::Relaxed);
                }
                return Some(entry.allowed);
            }
        }
        self.remove_entry(fp, |e| e.expires_at <= now);
        None
    }

    /// Removes the entry for `fp` when `pred` holds, and its index entries (its ring slot is
    /// found free by the hand later).
    ///
    /// Entries and their index entries change together under the entry's shard lock (here
    /// and in [`store`](Self::store)), so a removal cannot unindex a newer entry stored under
    /// the same fingerprint: an entry the indexes do not know could never be invalidated.
    /// Lock order is always entry shard, then index shard; nothing holds an index shard while
    /// taking an entry shard.
    fn remove_entry(&self, fp: Fingerprint, pred: impl FnOnce(&Entry) -> bool) -> bool {
        match self.entries.entry(fp) {
            MapEntry::Occupied(o) if pred(o.get()) => {
                let (object, subject) = (o.get().object, o.get().subject);
                unindex(&self.by_object, object, fp);
                unindex(&self.by_subject, subject, fp);
                o.remove();
                true
            }
            _ => false,
        }
    }

    /// Stores an answer unless an invalidation ran since its flight began (`epoch`).
    ///
    /// The epoch is read again after the entry is in: an invalidation that bumped it after
    /// that finds the entry in the index and removes it; one that bumped it before is seen
    /// here and the entry is removed again.
    fn store(&self, q: &CheckQuery, fp: Fingerprint, allowed: bool, epoch: u64) {
        if self.epoch.load(Ordering::SeqCst) != epoch {
            return;
        }
        let ttl = if allowed {
            self.allowed_ttl.load(Ordering::Relaxed)
        } else {
            self.denied_ttl.load(Ordering::Relaxed)
        };
        if ttl == 0 {
            return;
        }
        let now = (self.clock)();
        let expires_at = now.saturating_add(ttl);
        {
            // Every insert happens under the ring lock, so nothing else can insert `fp`
            // between the look here and the insert below.
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            let updated = match self.entries.get_mut(&fp) {
                Some(mut entry) => {
                    entry.allowed = allowed;
                    entry.expires_at = expires_at;
                    true
                }
                None => false,
            };
            if !updated {
                // The slot first: taking it may evict, which takes entry shards.
                let slot = self.claim_slot(&mut ring, now);
                ring.slots[slot] = fp;
                let object = self.name_hash(&q.tuple.object);
                let subject = self.name_hash(&q.tuple.user);
                if let MapEntry::Vacant(v) = self.entries.entry(fp) {
                    index(&self.by_object, object, fp);
                    index(&self.by_subject, subject, fp);
                    v.insert(Entry {
                        allowed,
                        expires_at,
                        object,
                        subject,
                        slot,
                        referenced: AtomicBool::new(false),
                    });
                }
            }
        }
        if self.epoch.load(Ordering::SeqCst) != epoch {
            self.remove_entry(fp, |_| true);
        }
    }

    /// A ring slot for a new entry: a new one while the ring is shorter than `max_entries`,
    /// else the first the hand finds free, expired or unmarked (evicting its entry). Marks
    /// passed over are cleared, so the hand stops within two turns; O(1) amortised.
    fn claim_slot(&self, ring: &mut Ring, now: u64) -> usize {
        if ring.slots.len() < self.max_entries {
            ring.slots.push(0);
            return ring.slots.len() - 1;
        }
        loop {
            let slot = ring.hand;
            ring.hand = (slot + 1) % ring.slots.len();
            match self.entries.entry(ring.slots[slot]) {
                // The entry that took this slot is still here: spare it once if it was hit.
                MapEntry::Occupied(o) if o.get().slot == slot => {
                    let e = o.get();
                    if e.expires_at > now && e.referenced.swap(false, Ordering::Relaxed) {
                        continue;
                    }
                    let (object, subject, fp) = (e.object, e.subject, *o.key());
                    unindex(&self.by_object, object, fp);
                    unindex(&self.by_subject, subject, fp);
                    o.remove();
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                    return slot;
                }
                // Gone (invalidated, expired, cleared) or stored again elsewhere: free.
                _ => return slot,
            }
        }
    }
}

impl Invalidate for DecisionCache {
    fn invalidate(&self, tuple: &TupleKey) {
        DecisionCache::invalidate(self, tuple);
    }

    fn clear(&self) {
        DecisionCache::clear(self);
    }
}

fn index(index: &Index, name: u64, fp: Fingerprint) {
    match index.entry(name) {
        MapEntry::Occupied(mut o) => o.get_mut().insert(fp),
        MapEntry::Vacant(v) => {
            v.insert(Listed::One(fp));
        }
    }
}

/// Drops `fp` from the list under `name`, and the list once it is empty.
fn unindex(index: &Index, name: u64, fp: Fingerprint) {
    if let MapEntry::Occupied(mut o) = index.entry(name)
        && o.get_mut().remove(fp)
    {
        o.remove();
    }
}

/// Removes a flight from the in-flight table when its leader finishes or is cancelled;
/// dropping the sender wakes waiters of a cancelled leader, who then ask again.
struct FlightGuard<'a> {
    inflight: &'a DashMap<Fingerprint, watch::Receiver<Flight>>,
    key: Fingerprint,
    tx: watch::Sender<Flight>,
    /// Ours, to tell our flight from a later one under the same key.
    own: watch::Receiver<Flight>,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        let own = &self.own;
        self.inflight
            .remove_if(&self.key, |_, rx| own.same_channel(rx));
    }
}

/// One distinct question of a batch and the positions that asked it.
struct Slot<'q> {
    key: Fingerprint,
    query: &'q CheckQuery,
    positions: Vec<usize>,
}

#[async_trait::async_trait]
impl RelationshipChecker for DecisionCache {
    /// A fresh answer held for `query`, as [`Self::check`] would find it (a
    /// `HIGHER_CONSISTENCY` question bypasses the cache); no counter moves, nothing is removed.
    fn cached(&self, query: &CheckQuery) -> Option<bool> {
        if query.consistency == Consistency::HigherConsistency {
            return None;
        }
        let fp = self.fingerprint(query, self.context_hash(query));
        let entry = self.entries.get(&fp)?;
        (entry.expires_at > (self.clock)()).then_some(entry.allowed)
    }

    async fn check(&self, queries: &[CheckQuery]) -> Result<Vec<bool>, BackendError> {
        // The usual call, one question with a fresh answer here, takes none of the bookkeeping
        // below (repeats, shared contextual lists, flights): the same lookup, counted the same.
        if let [q] = queries
            && q.consistency != Consistency::HigherConsistency
        {
            let key = self.fingerprint(q, self.context_hash(q));
            if let Some(allowed) = self.lookup(key, (self.clock)()) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(vec![allowed]);
            }
        }
        let mut answers: Vec<Option<bool>> = vec![None; queries.len()];
        let mut pending: Vec<Slot<'_>> = Vec::with_capacity(queries.len());
        {
            // A rule asks a handful of questions, so a linear search finds repeats (and
            // contextual lists already hashed) for less than hashing them would cost.
            // Questions sharing one contextual list (the usual case) hash it once.
            let mut contexts: Vec<((usize, Consistency), [u64; 2])> = Vec::new();
            for (i, q) in queries.iter().enumerate() {
                let list = (Arc::as_ptr(&q.contextual) as usize, q.consistency);
                let context = match contexts.iter().find(|(l, _)| *l == list) {
                    Some((_, hashed)) => *hashed,
                    None => {
                        let hashed = self.context_hash(q);
                        contexts.push((list, hashed));
                        hashed
                    }
                };
                let key = self.fingerprint(q, context);
                if let Some(slot) = pending.iter_mut().find(|s| s.key == key) {
                    slot.positions.push(i);
                    continue;
                }
                pending.push(Slot {
                    key,
                    query: q,
                    positions: vec![i],
                });
            }
        }

        // A waited-for flight whose leader was cancelled sends its question round again.
        while !pending.is_empty() {
            let now = (self.clock)();
            let epoch = self.epoch.load(Ordering::SeqCst);
            // Misses this call asks about; `None`: a question that bypasses the cache.
            let mut leading: Vec<(Slot<'_>, Option<FlightGuard<'_>>)> = Vec::new();
            let mut waiting: Vec<(Slot<'_>, watch::Receiver<Flight>)> = Vec::new();
            for slot in pending.drain(..) {
                // HIGHER_CONSISTENCY asks for read-after-write: an answer cached (or in
                // flight) from before the caller's write would defeat it.
                if slot.query.consistency == Consistency::HigherConsistency {
                    self.misses.fetch_add(1, Ordering::Relaxed);
                    leading.push((slot, None));
                    continue;
                }
                if let Some(allowed) = self.lookup(slot.key, now) {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    for &p in &slot.positions {
                        answers[p] = Some(allowed);
                    }
                    continue;
                }
                match self.inflight.entry(slot.key) {
                    MapEntry::Occupied(o) => {
                        let rx = o.get().clone();
                        drop(o);
                        self.coalesced.fetch_add(1, Ordering::Relaxed);
                        waiting.push((slot, rx));
                    }
                    MapEntry::Vacant(v) => {
                        let (tx, rx) = watch::channel(None);
                        v.insert(rx.clone());
                        self.misses.fetch_add(1, Ordering::Relaxed);
                        let guard = FlightGuard {
                            inflight: &self.inflight,
                            key: slot.key,
                            tx,
                            own: rx,
                        };
                        leading.push((slot, Some(guard)));
                    }
                }
            }

            if !leading.is_empty() {
                let asked: Vec<CheckQuery> = leading.iter().map(|(s, _)| s.query.clone()).collect();
                let result = self.inner.check(&asked).await;
                let result = match result {
                    Ok(a) if a.len() == asked.len() => Ok(a),
                    Ok(a) => Err(BackendError::Unavailable(format!(
                        "relationship backend gave {} answers to {} questions",
                        a.len(),
                        asked.len()
                    ))),
                    Err(e) => Err(e),
                };
                match result {
                    Ok(allowed) => {
                        for ((slot, guard), ok) in leading.into_iter().zip(allowed) {
                            if let Some(guard) = guard {
                                self.store(slot.query, slot.key, ok, epoch);
                                guard.tx.send_replace(Some(Ok(ok)));
                            }
                            for &p in &slot.positions {
                                answers[p] = Some(ok);
                            }
                        }
                    }
                    Err(e) => {
                        for guard in leading.iter().filter_map(|(_, g)| g.as_ref()) {
                            guard.tx.send_replace(Some(Err(e.clone())));
                        }
                        return Err(e);
                    }
                }
            }

            for (slot, mut rx) in waiting {
                let outcome = match rx.wait_for(Option::is_some).await {
                    Ok(v) => v.clone(),
                    Err(_) => None, // the leader was cancelled
                };
                match outcome {
                    Some(Ok(ok)) => {
                        for &p in &slot.positions {
                            answers[p] = Some(ok);
                        }
                    }
                    Some(Err(e)) => return Err(e),
                    None => pending.push(slot),
                }
            }
        }

        answers
            .into_iter()
            .map(|a| {
                a.ok_or_else(|| BackendError::Unavailable("decision cache lost an answer".into()))
            })
            .collect()
    }

    fn ready(&self) -> bool {
        self.inner.ready()
    }

    fn describe(&self) -> String {
        format!(
            "{} (cached: allowed {}, denied {}, at most {} entries)",
            self.inner.describe(),
            humantime::format_duration(Duration::from_millis(
                self.allowed_ttl.load(Ordering::Relaxed)
            )),
            humantime::format_duration(Duration::from_millis(
                self.denied_ttl.load(Ordering::Relaxed)
            )),
            self.max_entries
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    /// Answers from a set of tuples; counts calls and questions; optionally slow or failing.
    #[derive(Default)]
    struct Fake {
        allowed: Mutex<HashSet<TupleKey>>,
        calls: AtomicUsize,
        asked: Mutex<Vec<Vec<TupleKey>>>,
        delay: Duration,
        fail: AtomicBool,
    }

    impl Fake {
        fn allow(&self, t: &TupleKey) {
            self.allowed.lock().unwrap().insert(t.clone());
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    #[async_trait::async_trait]
    impl RelationshipChecker for Fake {
        async fn check(&self, queries: &[CheckQuery]) -> Result<Vec<bool>, BackendError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.asked
                .lock()
                .unwrap()
                .push(queries.iter().map(|q| q.tuple.clone()).collect());
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            if self.fail.load(Ordering::SeqCst) {
                return Err(BackendError::Unavailable("connection refused".into()));
            }
            let allowed = self.allowed.lock().unwrap();
            Ok(queries.iter().map(|q| allowed.contains(&q.tuple)).collect())
        }
        fn ready(&self) -> bool {
            true
        }
        fn describe(&self) -> String {
            "fake".into()
        }
    }

    fn t(user: &str, relation: &str, object: &str) -> TupleKey {
        TupleKey {
            user: user.into(),
            relation: relation.into(),
            object: object.into(),
        }
    }

    fn q(tuple: &TupleKey) -> CheckQuery {
        CheckQuery {
            tuple: tuple.clone(),
            contextual: Arc::new(Vec::new()),
            consistency: Consistency::MinimizeLatency,
        }
    }

    fn cfg(max_entries: usize) -> CacheConfig {
        CacheConfig {
            enabled: true,
            allowed_ttl: Duration::from_millis(1000),
            denied_ttl: Duration::from_millis(100),
            max_entries,
        }
    }

    /// A cache over `fake` with a clock the test moves.
    fn cache(fake: Fake, max_entries: usize) -> (Arc<DecisionCache>, Arc<Fake>, Arc<AtomicU64>) {
        let fake = Arc::new(fake);
        let now = Arc::new(AtomicU64::new(0));
        let clock_now = now.clone();
        let c = DecisionCache::with_clock(
            fake.clone(),
            &cfg(max_entries),
            Arc::new(move || clock_now.load(Ordering::SeqCst)),
        );
        (Arc::new(c), fake, now)
    }

    fn slow(ms: u64) -> Fake {
        Fake {
            delay: Duration::from_millis(ms),
            ..Fake::default()
        }
    }

    #[tokio::test]
    async fn hit_miss_and_ttl_by_answer() {
        let (c, fake, now) = cache(Fake::default(), 100);
        let yes = t("user:alice", "executor", "tool:a");
        let no = t("user:bob", "executor", "tool:a");
        fake.allow(&yes);
        assert_eq!(c.check(&[q(&yes), q(&no)]).await, Ok(vec![true, false]));
        assert_eq!(c.check(&[q(&yes), q(&no)]).await, Ok(vec![true, false]));
        assert_eq!(fake.calls(), 1);
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.size), (2, 2, 2));

        now.store(101, Ordering::SeqCst); // denied expired, allowed not
        c.check(&[q(&yes), q(&no)]).await.unwrap();
        assert_eq!(fake.calls(), 2);
        assert_eq!(fake.asked.lock().unwrap()[1], vec![no.clone()]);

        now.store(1001, Ordering::SeqCst);
        c.check(&[q(&yes)]).await.unwrap();
        assert_eq!(fake.calls(), 3);
    }

    #[tokio::test]
    async fn contextual_tuples_are_part_of_the_key() {
        let (c, fake, _) = cache(Fake::default(), 100);
        let tuple = t("user:alice", "executor", "tool:a");
        let plain = q(&tuple);
        let mut with_ctx = q(&tuple);
        with_ctx.contextual = Arc::new(vec![t("user:alice", "member", "organization:acme")]);
        c.check(std::slice::from_ref(&plain)).await.unwrap();
        c.check(std::slice::from_ref(&with_ctx)).await.unwrap();
        c.check(std::slice::from_ref(&plain)).await.unwrap();
        assert_eq!(fake.calls(), 2);
        // Equal contents in another Arc is the same question.
        let mut same_ctx = q(&tuple);
        same_ctx.contextual = Arc::new((*with_ctx.contextual).clone());
        c.check(&[same_ctx]).await.unwrap();
        assert_eq!(fake.calls(), 2);
    }

    #[tokio::test]
    async fn higher_consistency_bypasses_the_cache() {
        let (c, fake, _) = cache(Fake::default(), 100);
        let tuple = t("user:alice", "executor", "tool:a");
        let plain = q(&tuple);
        let mut strong = q(&tuple);
        strong.consistency = Consistency::HigherConsistency;
        c.check(std::slice::from_ref(&plain)).await.unwrap();
        fake.allow(&tuple); // written since: the cached denial is stale
        assert_eq!(c.check(std::slice::from_ref(&plain)).await, Ok(vec![false]));
        // Asked along with a hit, a strong question still goes out, alone.
        let other = q(&t("user:bob", "executor", "tool:a"));
        c.check(std::slice::from_ref(&other)).await.unwrap();
        assert_eq!(
            c.check(&[other, strong.clone()]).await,
            Ok(vec![false, true])
        );
        assert_eq!(c.check(std::slice::from_ref(&strong)).await, Ok(vec![true]));
        assert_eq!(fake.calls(), 4);
        assert_eq!(fake.asked.lock().unwrap()[2], vec![tuple.clone()]);
        assert_eq!(c.stats().size, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_identical_misses_make_one_call() {
        let (c, fake, _) = cache(slow(100), 100);
        let tuple = t("user:alice", "executor", "tool:a");
        fake.allow(&tuple);
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let c = c.clone();
            let query = q(&tuple);
            tasks.push(tokio::spawn(async move { c.check(&[query]).await }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap(), Ok(vec![true]));
        }
        assert_eq!(fake.calls(), 1);
        let s = c.stats();
        assert_eq!((s.misses, s.coalesced), (1, 99));
    }

    #[tokio::test]
    async fn batch_sends_only_its_misses_in_one_call() {
        let (c, fake, _) = cache(Fake::default(), 100);
        let tuples: Vec<TupleKey> = (0..5)
            .map(|i| t("user:alice", "viewer", &format!("conversation:{i}")))
            .collect();
        fake.allow(&tuples[1]);
        fake.allow(&tuples[3]);
        c.check(&[q(&tuples[0]), q(&tuples[1])]).await.unwrap();
        // Five questions, one asked twice: two hits, three distinct misses.
        let mut batch: Vec<CheckQuery> = tuples.iter().map(q).collect();
        batch.push(q(&tuples[4]));
        let answers = c.check(&batch).await.unwrap();
        assert_eq!(answers, vec![false, true, false, true, false, false]);
        assert_eq!(fake.calls(), 2);
        assert_eq!(
            fake.asked.lock().unwrap()[1],
            vec![tuples[2].clone(), tuples[3].clone(), tuples[4].clone()]
        );
    }

    #[tokio::test]
    async fn invalidate_by_object_and_by_subject() {
        let (c, fake, _) = cache(Fake::default(), 100);
        let a_x = t("user:alice", "executor", "tool:x");
        let b_x = t("user:bob", "executor", "tool:x");
        let a_y = t("user:alice", "viewer", "conversation:y");
        let c_z = t("user:carol", "viewer", "conversation:z");
        let all = [q(&a_x), q(&b_x), q(&a_y), q(&c_z)];
        c.check(&all).await.unwrap();
        assert_eq!(c.stats().size, 4);

        // tool:x's organization changed: every answer about tool:x goes.
        c.invalidate(&t("organization:acme", "organization", "tool:x"));
        assert_eq!(c.stats().size, 2);
        c.check(&all).await.unwrap();
        assert_eq!(
            fake.asked.lock().unwrap()[1],
            vec![a_x.clone(), b_x.clone()]
        );

        // alice joined an organization: every answer for alice goes.
        c.invalidate(&t("user:alice", "member", "organization:acme"));
        assert_eq!(c.stats().size, 2);
        c.check(&all).await.unwrap();
        assert_eq!(
            fake.asked.lock().unwrap()[2],
            vec![a_x.clone(), a_y.clone()]
        );
        assert_eq!(c.stats().invalidations, 4);
        // The indexes follow: nothing stale is left under either name.
        assert_eq!(listed(&c, &c.by_subject, "user:alice"), 2);
        assert_eq!(listed(&c, &c.by_object, "tool:x"), 2);
    }

    #[tokio::test]
    async fn usersets_and_wildcards_clear_everything() {
        let (c, _, _) = cache(Fake::default(), 100);
        let all = [
            q(&t("user:alice", "executor", "tool:x")),
            q(&t("user:bob", "viewer", "conversation:y")),
        ];
        c.check(&all).await.unwrap();
        c.invalidate(&t("group:eng#member", "viewer", "conversation:other"));
        assert_eq!(c.stats().size, 0);
        c.check(&all).await.unwrap();
        c.invalidate(&t("user:*", "viewer", "conversation:other"));
        assert_eq!(c.stats().size, 0);
        assert!(c.by_object.is_empty() && c.by_subject.is_empty());
    }

    #[tokio::test]
    async fn a_full_cache_evicts_answers_not_hit_since_the_hand_passed() {
        let (c, fake, now) = cache(Fake::default(), 10);
        let hot: Vec<TupleKey> = (0..5)
            .map(|i| t("user:a", "viewer", &format!("doc:{i}")))
            .collect();
        let cold: Vec<TupleKey> = (0..5)
            .map(|i| t("user:d", "viewer", &format!("doc:{i}")))
            .collect();
        for tuple in &hot {
            fake.allow(tuple);
        }
        c.check(&hot.iter().chain(&cold).map(q).collect::<Vec<_>>())
            .await
            .unwrap();
        assert_eq!(c.stats().size, 10);
        c.check(&hot.iter().map(q).collect::<Vec<_>>())
            .await
            .unwrap(); // hits: marked
        let newcomers: Vec<TupleKey> = (0..5)
            .map(|i| t("user:new", "viewer", &format!("doc:{i}")))
            .collect();
        c.check(&newcomers.iter().map(q).collect::<Vec<_>>())
            .await
            .unwrap();
        let s = c.stats();
        assert_eq!((s.size, s.evictions), (10, 5));
        let calls = fake.calls();
        c.check(&hot.iter().map(q).collect::<Vec<_>>())
            .await
            .unwrap();
        assert_eq!(fake.calls(), calls, "the answers hit survived");
        c.check(&cold.iter().map(q).collect::<Vec<_>>())
            .await
            .unwrap();
        assert_eq!(fake.calls(), calls + 1, "the answers never hit went");

        // Expired answers go before marked ones.
        c.check(&hot.iter().map(q).collect::<Vec<_>>())
            .await
            .unwrap(); // marked again
        now.store(500, Ordering::SeqCst); // every denied answer has expired
        c.check(&[q(&t("user:late", "viewer", "doc:0"))])
            .await
            .unwrap();
        c.check(&hot.iter().map(q).collect::<Vec<_>>())
            .await
            .unwrap();
        assert_eq!(
            fake.calls(),
            calls + 2,
            "the allowed answers are still fresh"
        );
    }

    #[tokio::test]
    async fn the_size_stays_bounded_and_evicted_answers_leave_the_indexes() {
        let (c, _, _) = cache(Fake::default(), 10);
        for i in 0..100 {
            c.check(&[q(&t(
                &format!("user:u{}", i % 7),
                "viewer",
                &format!("doc:{i}"),
            ))])
            .await
            .unwrap();
            assert!(c.stats().size <= 10);
        }
        assert_eq!(c.stats().evictions, 90);
        let indexed: usize = c.by_object.iter().map(|e| e.value().to_vec().len()).sum();
        assert_eq!(indexed as u64, c.stats().size);
        let indexed: usize = c.by_subject.iter().map(|e| e.value().to_vec().len()).sum();
        assert_eq!(indexed as u64, c.stats().size);
        assert_eq!(c.ring.lock().unwrap().slots.len(), 10);
    }

    #[tokio::test]
    async fn slots_of_invalidated_answers_are_reused_without_evicting() {
        let (c, _, _) = cache(Fake::default(), 4);
        let all: Vec<CheckQuery> = (0..4)
            .map(|i| q(&t("user:a", "viewer", &format!("doc:{i}"))))
            .collect();
        c.check(&all).await.unwrap();
        c.invalidate(&t("user:a", "member", "organization:acme"));
        assert_eq!(c.stats().size, 0);
        c.check(&all).await.unwrap();
        let s = c.stats();
        assert_eq!((s.size, s.evictions), (4, 0));
    }

    /// How many answers an index lists under `name`.
    fn listed(c: &DecisionCache, index: &Index, name: &str) -> usize {
        index
            .get(&c.name_hash(name))
            .map_or(0, |l| l.to_vec().len())
    }

    #[tokio::test]
    async fn errors_are_not_cached() {
        let (c, fake, _) = cache(Fake::default(), 100);
        let tuple = t("user:alice", "executor", "tool:a");
        fake.fail.store(true, Ordering::SeqCst);
        assert!(matches!(
            c.check(&[q(&tuple)]).await,
            Err(BackendError::Unavailable(_))
        ));
        fake.fail.store(false, Ordering::SeqCst);
        assert_eq!(c.check(&[q(&tuple)]).await, Ok(vec![false]));
        assert_eq!(fake.calls(), 2);
        assert!(c.inflight.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn every_waiter_of_a_failed_flight_gets_the_error() {
        let (c, fake, _) = cache(slow(100), 100);
        fake.fail.store(true, Ordering::SeqCst);
        let tuple = t("user:alice", "executor", "tool:a");
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let c = c.clone();
                let query = q(&tuple);
                tokio::spawn(async move { c.check(&[query]).await })
            })
            .collect();
        for task in tasks {
            assert_eq!(
                task.await.unwrap(),
                Err(BackendError::Unavailable("connection refused".into()))
            );
        }
        assert_eq!(fake.calls(), 1);
        assert_eq!(c.stats().size, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_in_flight_during_an_invalidation_is_not_kept() {
        let (c, fake, _) = cache(slow(100), 100);
        let tuple = t("user:alice", "executor", "tool:a");
        fake.allow(&tuple);
        let task = {
            let c = c.clone();
            let query = q(&tuple);
            tokio::spawn(async move { c.check(&[query]).await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        c.invalidate(&tuple); // e.g. the tuple was deleted while OpenFGA answered
        assert_eq!(task.await.unwrap(), Ok(vec![true]));
        assert_eq!(c.stats().size, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_of_a_cancelled_leader_ask_again() {
        let (c, fake, _) = cache(slow(100), 100);
        let tuple = t("user:alice", "executor", "tool:a");
        fake.allow(&tuple);
        let leader = {
            let c = c.clone();
            let query = q(&tuple);
            tokio::spawn(async move { c.check(&[query]).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let waiter = {
            let c = c.clone();
            let query = q(&tuple);
            tokio::spawn(async move { c.check(&[query]).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        assert_eq!(waiter.await.unwrap(), Ok(vec![true]));
        assert_eq!(fake.calls(), 2);
        assert!(c.inflight.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn indexes_stay_consistent_under_concurrent_churn() {
        let fake = Arc::new(Fake::default());
        let c = Arc::new(DecisionCache::new(
            fake.clone(),
            &CacheConfig {
                enabled: true,
                allowed_ttl: Duration::from_millis(5),
                denied_ttl: Duration::from_millis(2),
                max_entries: 50,
            },
        ));
        let mut tasks = Vec::new();
        for worker in 0..8u64 {
            let c = c.clone();
            let fake = fake.clone();
            tasks.push(tokio::spawn(async move {
                let mut x = worker.wrapping_mul(6364136223846793005).wrapping_add(1);
                for _ in 0..2000 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let (u, o) = ((x >> 33) % 12, (x >> 45) % 12);
                    let tuple = t(&format!("user:u{u}"), "viewer", &format!("doc:{o}"));
                    match (x >> 20) % 10 {
                        0 => c.invalidate(&tuple),
                        1 => fake.allow(&tuple),
                        _ => {
                            c.check(&[q(&tuple)]).await.unwrap();
                        }
                    }
                    if (x >> 10) % 7 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        // Every entry is reachable from both indexes (or invalidation could miss it), and
        // the indexes hold nothing else.
        for e in c.entries.iter() {
            let (fp, entry) = (*e.key(), e.value());
            assert!(
                c.by_object
                    .get(&entry.object)
                    .is_some_and(|l| l.to_vec().contains(&fp)),
                "{entry:?}"
            );
            assert!(
                c.by_subject
                    .get(&entry.subject)
                    .is_some_and(|l| l.to_vec().contains(&fp)),
                "{entry:?}"
            );
        }
        let indexed: usize = c.by_object.iter().map(|e| e.value().to_vec().len()).sum();
        assert_eq!(indexed, c.entries.len());
        let indexed: usize = c.by_subject.iter().map(|e| e.value().to_vec().len()).sum();
        assert_eq!(indexed, c.entries.len());
        assert!(c.inflight.is_empty());
    }
}
