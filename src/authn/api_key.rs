//! API keys: the [`ApiKeyStore`] trait and its file backend.
//!
//! The file holds hashes only (`sha256:<hex>` or a bcrypt hash). SHA-256 records are found in
//! O(1) by the key's digest. A bcrypt record carries a `lookup` digest of its key (SHA-256, or
//! the app's `apiKey_<id>_cacheHash`, an HMAC-SHA256 under `API_KEY_CACHE_SECRET`), indexed at
//! load time, so the invariant holds: **a request runs at most one bcrypt verification**, and
//! a key that matches no record runs none (microseconds, whatever the number of records).
//! bcrypt runs off the async threads, at most `api_keys.bcrypt_concurrency` at once across all
//! requests. Verified keys are remembered by an HMAC of the key (under a per-process random
//! key), and so are keys that failed bcrypt, for a while and in bounded number; both caches
//! live in the index, which a reload of the file replaces, so a rotated or removed key stops
//! working, and a new one starts, with the reload.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine;
use dashmap::DashMap;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{AuthMethod, AuthnError, Principal, PrincipalKind, fingerprint_of_digest};

pub const KEY_PREFIX_LIVE: &str = "mcpkey_live_";

#[async_trait::async_trait]
pub trait ApiKeyStore: Send + Sync {
    /// Verifies the presented key and returns its principal.
    async fn authenticate(&self, key: &str) -> Result<Arc<Principal>, AuthnError>;
    /// [`authenticate`](Self::authenticate) with the current policy's bearer-token verifier:
    /// a store whose keys stand for tokens (the app's key service,
    /// [`super::api_key_exchange`]) verifies them with it, so they pass exactly the checks a
    /// bearer token passes, under the JWT settings in force now.
    async fn authenticate_with(
        &self,
        key: &str,
        _jwt: Option<&super::jwt::JwtVerifier>,
    ) -> Result<Arc<Principal>, AuthnError> {
        self.authenticate(key).await
    }
    /// Number of records (for the startup log and doctor).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn describe(&self) -> String;
    /// Figures for `/metrics`, read when scraped.
    fn stats(&self) -> ApiKeyStats {
        ApiKeyStats::default()
    }
}

/// What an API-key store reports for `/metrics`: the keys file's part and the key service's
/// part, each present when that source is configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApiKeyStats {
    pub file: Option<KeyFileStats>,
    pub exchange: Option<ExchangeStats>,
}

/// The keys file ([`FileApiKeyStore`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyFileStats {
    /// Records in the file in use.
    pub keys: u64,
    /// Reloads that applied a changed file.
    pub reloads_ok: u64,
    /// Reloads refused (unreadable or invalid file): the previous keys stay in use.
    pub reloads_error: u64,
    /// Unix seconds the keys in use were loaded (at startup or by the last good reload).
    pub loaded_at: u64,
    /// bcrypt verifications run.
    pub bcrypt_verifications: u64,
    /// Requests answered 503 because every bcrypt slot stayed busy.
    pub bcrypt_busy: u64,
    /// Keys refused from the failed-key cache, without running bcrypt again.
    pub failed_cache_hits: u64,
}

/// The app's key service ([`super::api_key_exchange::ExchangeApiKeyStore`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExchangeStats {
    /// Calls made to the key service.
    pub requests: u64,
    /// Of those, the ones it could not answer (5xx, timeout, refused, unreadable).
    pub errors: u64,
    /// Keys answered from the token or refusal cache, without a call.
    pub cache_hits: u64,
    /// Exchanged tokens cached now.
    pub cached_tokens: u64,
}

/// How long a request waits for a bcrypt slot before it is answered 503: a flood of keys that
/// each need bcrypt must not queue without bound behind the pool.
pub const BCRYPT_QUEUE_WAIT: Duration = Duration::from_millis(500);
/// Keys that failed bcrypt are remembered this long ...
pub const MISS_TTL_SECS: u64 = 60;
/// ... and at most this many of them.
pub const MISS_CACHE_MAX: usize = 10_000;

/// One record of the keys file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyRecord {
    pub id: String,
    pub hash: String,
    pub principal: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default = "yes")]
    pub active: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// bcrypt records only: `sha256:<hex of SHA-256(key)>` or `hmac-sha256:<hex>` (the app's
    /// `apiKey_<id>_cacheHash`), the index that finds the one record to verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookup: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<ApiKeyRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiKeyFileError {
    #[error("API_KEYS_FILE {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

enum Hash {
    Sha256([u8; 32]),
    Bcrypt(String),
}

struct Entry {
    record: ApiKeyRecord,
    hash: Hash,
    expires_at: Option<u64>,
    /// Who the key stands for, built once at load and shared by every request with the key.
    /// For a `sha256` record its fingerprint is the stored digest's (the one key that matches
    /// it); a `bcrypt` record's is the key's, set when it is admitted.
    principal: Arc<Principal>,
}

#[derive(Default)]
struct Index {
    by_sha: HashMap<[u8; 32], Arc<Entry>>,
    /// bcrypt records by `lookup: sha256:`, and by `lookup: hmac-sha256:`. Lookups are unique
    /// across both maps, so a key has at most one candidate.
    bcrypt_by_sha: HashMap<[u8; 32], Arc<Entry>>,
    bcrypt_by_hmac: HashMap<[u8; 32], Arc<Entry>>,
    /// HMAC(key) -> verified bcrypt entry. Lives in the index so a reload forgets it.
    bcrypt_hits: DashMap<[u8; 32], Arc<Entry>>,
    /// HMAC(key) -> until (epoch seconds): keys that failed bcrypt. Bounded by MISS_CACHE_MAX.
    bcrypt_misses: DashMap<[u8; 32], u64>,
    /// File identity for change detection: (modified, length, sha256 of content).
    stamp: Option<(SystemTime, u64, [u8; 32])>,
}

impl Index {
    fn len(&self) -> usize {
        self.by_sha.len() + self.bcrypt_by_sha.len() + self.bcrypt_by_hmac.len()
    }

    fn has_bcrypt(&self) -> bool {
        !(self.bcrypt_by_sha.is_empty() && self.bcrypt_by_hmac.is_empty())
    }

    fn known_miss(&self, mac: &[u8; 32], now: u64) -> bool {
        self.bcrypt_misses
            .get(mac)
            .is_some_and(|until| now < *until)
    }

    fn remember_miss(&self, mac: [u8; 32], now: u64) {
        if self.bcrypt_misses.len() >= MISS_CACHE_MAX {
            self.bcrypt_misses.retain(|_, until| now < *until);
            if self.bcrypt_misses.len() >= MISS_CACHE_MAX {
                // Still full of live entries: start over rather than grow without bound.
                self.bcrypt_misses.clear();
            }
        }
        self.bcrypt_misses
            .insert(mac, now.saturating_add(MISS_TTL_SECS));
    }
}

/// `sha256:<64 hex>` or `hmac-sha256:<64 hex>`.
enum Lookup {
    Sha256([u8; 32]),
    HmacSha256([u8; 32]),
}

fn parse_lookup(raw: &str) -> Result<Lookup, String> {
    let hex32 = |h: &str| {
        hex::decode(h)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| format!("{raw:?}: the digest must be 64 hex digits"))
    };
    if let Some(h) = raw.strip_prefix("sha256:") {
        Ok(Lookup::Sha256(hex32(h)?))
    } else if let Some(h) = raw.strip_prefix("hmac-sha256:") {
        Ok(Lookup::HmacSha256(hex32(h)?))
    } else {
        Err(format!(
            "{raw:?}: want sha256:<64 hex> (SHA-256 of the key) or hmac-sha256:<64 hex> (the app's apiKey_<id>_cacheHash)"
        ))
    }
}

fn parse_time(s: &str) -> Result<u64, String> {
    humantime::parse_rfc3339_weak(s)
        .or_else(|_| humantime::parse_rfc3339(s))
        .map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))?
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| format!("{s:?} is before 1970"))
}

/// `lookup_secret_set`: whether `hmac-sha256:` lookups can be computed (serving needs it;
/// `apikey new`, which only appends, does not).
fn parse_index(text: &str, lookup_secret_set: bool) -> Result<Index, String> {
    let file: KeysFile = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    let mut index = Index::default();
    let mut ids = std::collections::HashSet::new();
    let mut lookups: HashMap<[u8; 32], usize> = HashMap::new();
    for (i, r) in file.keys.into_iter().enumerate() {
        let at = |field: &str, m: String| format!("keys[{i}].{field}: {m}");
        if r.id.is_empty() {
            return Err(at("id", "must not be empty".into()));
        }
        if !ids.insert(r.id.clone()) {
            return Err(at("id", format!("{:?} is listed twice", r.id)));
        }
        let hash = if let Some(hex_part) = r.hash.strip_prefix("sha256:").or_else(|| {
            (r.hash.len() == 64 && r.hash.bytes().all(|b| b.is_ascii_hexdigit()))
                .then_some(r.hash.as_str())
        }) {
            let bytes = hex::decode(hex_part)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| at("hash", "sha256 hash must be 64 hex digits".into()))?;
            Hash::Sha256(bytes)
        } else if r.hash.starts_with("$2") {
            <bcrypt::HashParts as std::str::FromStr>::from_str(&r.hash)
                .map_err(|e| at("hash", format!("not a bcrypt hash: {e}")))?;
            Hash::Bcrypt(r.hash.clone())
        } else {
            return Err(at(
                "hash",
                "want sha256:<64 hex> or a bcrypt hash ($2b$...)".into(),
            ));
        };
        let (kind, principal_id) = match r.principal.split_once(':') {
            Some(("user", id)) if !id.is_empty() => (PrincipalKind::User, id.to_string()),
            Some(("service_principal", id)) if !id.is_empty() => {
                (PrincipalKind::ServicePrincipal, id.to_string())
            }
            _ => {
                return Err(at(
                    "principal",
                    format!(
                        "{:?}: want user:<name> or service_principal:<id>",
                        r.principal
                    ),
                ));
            }
        };
        let expires_at = match &r.expires_at {
            Some(s) => Some(parse_time(s).map_err(|m| at("expires_at", m))?),
            None => None,
        };
        let lookup = match (&hash, &r.lookup) {
            (Hash::Sha256(_), None) => None,
            (Hash::Sha256(_), Some(_)) => {
                return Err(at(
                    "lookup",
                    "only bcrypt records take a lookup (a sha256 hash is its own index)".into(),
                ));
            }
            (Hash::Bcrypt(_), None) => {
                return Err(at(
                    "lookup",
                    "a bcrypt record needs lookup: sha256:<hex of SHA-256(key)> or hmac-sha256:<the app's apiKey_<id>_cacheHash>, so a request runs at most one bcrypt (see README, API keys)".into(),
                ));
            }
            (Hash::Bcrypt(_), Some(raw)) => {
                let l = parse_lookup(raw).map_err(|m| at("lookup", m))?;
                if matches!(l, Lookup::HmacSha256(_)) && !lookup_secret_set {
                    return Err(at(
                        "lookup",
                        "hmac-sha256 lookups need the app's secret: set API_KEY_CACHE_SECRET (api_keys.lookup_secret)".into(),
                    ));
                }
                let digest = match &l {
                    Lookup::Sha256(d) | Lookup::HmacSha256(d) => *d,
                };
                if let Some(j) = lookups.insert(digest, i) {
                    return Err(at("lookup", format!("same lookup as keys[{j}]")));
                }
                Some(l)
            }
        };
        let mut principal = Principal::new(kind, &principal_id, AuthMethod::ApiKey);
        principal.scopes = r.scopes.clone();
        principal.key_id = r.id.clone();
        if let Hash::Sha256(digest) = &hash {
            principal.credential_hash = fingerprint_of_digest(digest);
        }
        let entry = Arc::new(Entry {
            hash,
            expires_at,
            record: r,
            principal: Arc::new(principal),
        });
        // A lookup exists exactly for bcrypt records (checked above).
        match lookup {
            Some(Lookup::Sha256(d)) => {
                index.bcrypt_by_sha.insert(d, entry);
            }
            Some(Lookup::HmacSha256(d)) => {
                index.bcrypt_by_hmac.insert(d, entry);
            }
            None => {
                if let Hash::Sha256(h) = &entry.hash {
                    index.by_sha.insert(*h, entry.clone());
                }
            }
        }
    }
    Ok(index)
}

/// [`ApiKeyStore`] over a YAML file, reloaded when it changes.
pub struct FileApiKeyStore {
    path: PathBuf,
    index: ArcSwap<Index>,
    /// Per-process random key of the verified and failed key caches.
    hmac_key: [u8; 32],
    /// The app's `API_KEY_CACHE_SECRET`, for `lookup: hmac-sha256:` records.
    lookup_secret: Option<Vec<u8>>,
    /// The bcrypt pool: one permit per verification running, across all requests.
    bcrypt_slots: Arc<tokio::sync::Semaphore>,
    bcrypt_concurrency: usize,
    clock: crate::clock::Clock,
    bcrypt_runs: AtomicU64,
    bcrypt_busy: AtomicU64,
    miss_hits: AtomicU64,
    reloads_ok: AtomicU64,
    reloads_error: AtomicU64,
    /// Unix seconds (the store's clock) the index in use was loaded.
    loaded_at: AtomicU64,
}

/// What the store needs from `api_keys.*` besides the file.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub bcrypt_concurrency: usize,
    pub lookup_secret: Option<String>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            bcrypt_concurrency: crate::config::DEFAULT_BCRYPT_CONCURRENCY,
            lookup_secret: None,
        }
    }
}

impl FileApiKeyStore {
    /// Loads the file; a missing or invalid file is a startup error naming the problem.
    pub fn open(path: &Path, clock: crate::clock::Clock) -> Result<Self, ApiKeyFileError> {
        Self::open_with(path, clock, &StoreOptions::default())
    }

    pub fn open_with(
        path: &Path,
        clock: crate::clock::Clock,
        options: &StoreOptions,
    ) -> Result<Self, ApiKeyFileError> {
        let concurrency = options.bcrypt_concurrency.max(1);
        let store = Self {
            path: path.to_path_buf(),
            index: ArcSwap::from_pointee(Index::default()),
            hmac_key: rand::random(),
            lookup_secret: options
                .lookup_secret
                .as_ref()
                .map(|s| s.as_bytes().to_vec()),
            bcrypt_slots: Arc::new(tokio::sync::Semaphore::new(concurrency)),
            bcrypt_concurrency: concurrency,
            clock,
            bcrypt_runs: AtomicU64::new(0),
            bcrypt_busy: AtomicU64::new(0),
            miss_hits: AtomicU64::new(0),
            reloads_ok: AtomicU64::new(0),
            reloads_error: AtomicU64::new(0),
            loaded_at: AtomicU64::new(0),
        };
        store.load().map_err(|message| ApiKeyFileError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(store)
    }

    /// bcrypt verifications run so far (tests and `/metrics`).
    pub fn bcrypt_runs(&self) -> u64 {
        self.bcrypt_runs.load(Ordering::Relaxed)
    }

    fn read_stamp(&self) -> Result<(SystemTime, u64, String), String> {
        let meta = std::fs::metadata(&self.path).map_err(|e| e.to_string())?;
        let text = std::fs::read_to_string(&self.path).map_err(|e| e.to_string())?;
        Ok((meta.modified().unwrap_or(UNIX_EPOCH), meta.len(), text))
    }

    /// Re-reads the file if it changed. Returns whether a new index was swapped in. On error
    /// the old index stays. Counted for `/metrics`: a swap as `ok`, an error as `error`, an
    /// unchanged file not at all.
    pub fn reload(&self) -> Result<bool, String> {
        let result = self.load();
        match &result {
            Ok(true) => self.reloads_ok.fetch_add(1, Ordering::Relaxed),
            Ok(false) => 0,
            Err(_) => self.reloads_error.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    /// [`reload`](Self::reload) without the count (the first load is not a reload).
    fn load(&self) -> Result<bool, String> {
        let (modified, len, text) = self.read_stamp()?;
        let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        if let Some((_, _, d)) = self.index.load().stamp
            && d == digest
        {
            return Ok(false);
        }
        let mut index = parse_index(&text, self.lookup_secret.is_some())?;
        index.stamp = Some((modified, len, digest));
        let count = index.len();
        self.index.store(Arc::new(index));
        self.loaded_at.store((self.clock)(), Ordering::Relaxed);
        tracing::info!(path = %self.path.display(), keys = count, "API keys loaded");
        Ok(true)
    }

    /// Polls the file every `interval` until `shutdown` fires.
    pub async fn watch(
        self: Arc<Self>,
        interval: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.reload()).await {
                Ok(Err(e)) => {
                    tracing::error!(path = %self.path.display(), error = %e, "API keys file not reloaded; keeping the previous keys")
                }
                Err(e) => tracing::error!(error = %e, "API keys reload task failed"),
                Ok(Ok(_)) => {}
            }
        }
    }

    fn hmac(&self, key: &str) -> [u8; 32] {
        hmac_sha256(&self.hmac_key, key)
    }

    /// `sha256`: the key's digest (its fingerprint is the digest's first bytes: not hashed
    /// again).
    fn admit(&self, e: &Entry, sha256: &[u8; 32]) -> Result<Arc<Principal>, AuthnError> {
        if !e.record.active {
            return Err(AuthnError::ApiKeyInactive {
                id: e.record.id.clone(),
            });
        }
        if let Some(exp) = e.expires_at {
            let now = (self.clock)();
            if now >= exp {
                return Err(AuthnError::ApiKeyExpired {
                    id: e.record.id.clone(),
                    ago: now - exp,
                });
            }
        }
        match &e.hash {
            // Admitted because the key's digest is the stored one: the prepared principal,
            // fingerprint included, is the key's.
            Hash::Sha256(_) => Ok(e.principal.clone()),
            Hash::Bcrypt(_) => {
                let mut p = Principal::clone(&e.principal);
                p.credential_hash = fingerprint_of_digest(sha256);
                Ok(Arc::new(p))
            }
        }
    }
}

pub(crate) fn hmac_sha256(key: &[u8], message: &str) -> [u8; 32] {
    // HMAC takes keys of any length; the error branch cannot happen.
    match <Hmac<Sha256> as Mac>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(message.as_bytes());
            mac.finalize().into_bytes().into()
        }
        Err(_) => [0; 32],
    }
}

#[async_trait::async_trait]
impl ApiKeyStore for FileApiKeyStore {
    async fn authenticate(&self, key: &str) -> Result<Arc<Principal>, AuthnError> {
        if key.is_empty() || key.len() > 512 {
            return Err(AuthnError::ApiKeyUnknown);
        }
        let index = self.index.load_full();
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        if let Some(e) = index.by_sha.get(&digest)
            && let Hash::Sha256(stored) = &e.hash
            && bool::from(stored.ct_eq(&digest))
        {
            return self.admit(e, &digest);
        }
        if !index.has_bcrypt() {
            return Err(AuthnError::ApiKeyUnknown);
        }
        // The one candidate, by the lookup index; none: unknown, and no bcrypt ran.
        let candidate = index.bcrypt_by_sha.get(&digest).or_else(|| {
            let secret = self.lookup_secret.as_ref()?;
            index.bcrypt_by_hmac.get(&hmac_sha256(secret, key))
        });
        let Some(entry) = candidate.cloned() else {
            return Err(AuthnError::ApiKeyUnknown);
        };
        let Hash::Bcrypt(hash) = &entry.hash else {
            return Err(AuthnError::ApiKeyUnknown);
        };
        let mac = self.hmac(key);
        if let Some(e) = index.bcrypt_hits.get(&mac) {
            return self.admit(&e, &digest);
        }
        let now = (self.clock)();
        if index.known_miss(&mac, now) {
            self.miss_hits.fetch_add(1, Ordering::Relaxed);
            return Err(AuthnError::ApiKeyUnknown);
        }
        // The permit moves into the blocking task: a caller that goes away does not free its
        // slot while its bcrypt still runs.
        let permit = match tokio::time::timeout(
            BCRYPT_QUEUE_WAIT,
            self.bcrypt_slots.clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(p)) => p,
            _ => {
                self.bcrypt_busy.fetch_add(1, Ordering::Relaxed);
                return Err(AuthnError::ApiKeyStoreUnavailable(format!(
                    "{} bcrypt verifications already running (api_keys.bcrypt_concurrency); try again",
                    self.bcrypt_concurrency
                )));
            }
        };
        self.bcrypt_runs.fetch_add(1, Ordering::Relaxed);
        let (owned, hash) = (key.to_string(), hash.clone());
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            bcrypt::verify(&owned, &hash).unwrap_or(false)
        })
        .await
        .map_err(|e| AuthnError::ApiKeyStoreUnavailable(e.to_string()))?;
        if ok {
            index.bcrypt_hits.insert(mac, entry.clone());
            self.admit(&entry, &digest)
        } else {
            index.remember_miss(mac, now);
            Err(AuthnError::ApiKeyUnknown)
        }
    }

    fn len(&self) -> usize {
        self.index.load().len()
    }

    fn describe(&self) -> String {
        format!("API keys file {}", self.path.display())
    }

    fn stats(&self) -> ApiKeyStats {
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        ApiKeyStats {
            file: Some(KeyFileStats {
                keys: self.len() as u64,
                reloads_ok: load(&self.reloads_ok),
                reloads_error: load(&self.reloads_error),
                loaded_at: load(&self.loaded_at),
                bcrypt_verifications: self.bcrypt_runs(),
                bcrypt_busy: load(&self.bcrypt_busy),
                failed_cache_hits: load(&self.miss_hits),
            }),
            exchange: None,
        }
    }
}

/// A new key: `mcpkey_live_` and 32 random bytes in base64url.
pub fn generate_key() -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "{KEY_PREFIX_LIVE}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

pub fn sha256_record_hash(key: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

/// Appends a record for a new key to `path` (created if missing), keeping what the file
/// already says, comments included; the result is re-read before it replaces the file.
/// Returns the new key, which is stored nowhere.
pub fn append_new_key(
    path: &Path,
    principal: &str,
    scopes: &[String],
    expires_in: Option<Duration>,
    description: Option<&str>,
) -> Result<(String, ApiKeyRecord), String> {
    let existing = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    if !existing.trim().is_empty() {
        parse_index(&existing, true).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let key = generate_key();
    let id_bytes: [u8; 6] = rand::random();
    let record = ApiKeyRecord {
        id: format!("ak_{}", hex::encode(id_bytes)),
        hash: sha256_record_hash(&key),
        principal: principal.to_string(),
        scopes: scopes.to_vec(),
        active: true,
        expires_at: expires_in
            .map(|d| humantime::format_rfc3339_seconds(SystemTime::now() + d).to_string()),
        description: description.map(String::from),
        lookup: None,
    };
    let item = serde_yaml_ng::to_string(&vec![&record]).map_err(|e| e.to_string())?;
    let indented: String = item.lines().map(|l| format!("  {l}\n")).collect();
    let has_keys_line = existing.lines().any(|l| l.trim_end() == "keys:");
    let mut text = existing.clone();
    if !has_keys_line {
        if existing.lines().any(|l| l.starts_with("keys:")) {
            // `keys: []` or an inline list: rewrite through the parser rather than guess.
            return Err(format!(
                "{}: write the keys list in block style (keys: on its own line) to append to it",
                path.display()
            ));
        }
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str("keys:\n");
    } else if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&indented);
    let index = parse_index(&text, true)
        .map_err(|e| format!("{}: appending broke the file: {e}", path.display()))?;
    if !index
        .by_sha
        .contains_key(&<[u8; 32]>::from(Sha256::digest(key.as_bytes())))
    {
        return Err(format!(
            "{}: the new record did not land in the keys list (is keys: the last section?)",
            path.display()
        ));
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((key, record))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn clock(at: u64) -> (crate::clock::Clock, Arc<AtomicU64>) {
        let c = Arc::new(AtomicU64::new(at));
        let c2 = c.clone();
        (Arc::new(move || c2.load(Ordering::Relaxed)), c)
    }

    #[tokio::test]
    async fn sha256_and_bcrypt_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        let bkey = "mcpkey_live_bcryptbcryptbcrypt";
        let bhash = bcrypt::hash(bkey, 4).unwrap();
        std::fs::write(
            &path,
            format!(
                "keys:\n  - id: a\n    hash: {}\n    principal: user:alice\n    scopes: [read:agents]\n  - id: b\n    hash: {}\n    lookup: {}\n    principal: service_principal:svc\n  - id: c\n    hash: {}\n    principal: user:bob\n    active: false\n  - id: d\n    hash: {}\n    principal: user:carol\n    expires_at: 2001-01-01T00:00:00Z\n",
                sha256_record_hash("key-a"),
                bhash,
                sha256_record_hash(bkey),
                sha256_record_hash("key-c"),
                sha256_record_hash("key-d"),
            ),
        )
        .unwrap();
        let (c, _) = clock(1_700_000_000);
        let store = FileApiKeyStore::open(&path, c).unwrap();
        let p = store.authenticate("key-a").await.unwrap();
        assert_eq!((p.subject.as_str(), p.key_id.as_str()), ("user:alice", "a"));
        assert_eq!(p.scopes, vec!["read:agents"]);
        assert_eq!(p.method, AuthMethod::ApiKey);
        assert_eq!(p.credential_hash, crate::authn::fingerprint("key-a"));
        assert!(
            Arc::ptr_eq(&p, &store.authenticate("key-a").await.unwrap()),
            "a sha256 key's principal is built once, at load"
        );
        let p = store.authenticate(bkey).await.unwrap();
        assert_eq!(p.subject, "service_principal:svc");
        assert_eq!(p.credential_hash, crate::authn::fingerprint(bkey));
        // second time from the HMAC cache
        let again = store.authenticate(bkey).await.unwrap();
        assert_eq!(
            (again.key_id.as_str(), again.credential_hash.as_str()),
            ("b", p.credential_hash.as_str())
        );
        assert_eq!(
            store.authenticate("nope").await.unwrap_err(),
            AuthnError::ApiKeyUnknown
        );
        assert_eq!(
            store.authenticate("key-c").await.unwrap_err().to_string(),
            "API key inactive (id=c)"
        );
        assert!(
            store
                .authenticate("key-d")
                .await
                .unwrap_err()
                .to_string()
                .starts_with("API key expired")
        );
    }

    #[tokio::test]
    async fn reload_swaps_and_bad_file_keeps_old() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        std::fs::write(&path, "# comment kept\nkeys:\n").unwrap();
        let (c, now) = clock(1_700_000_000);
        let store = FileApiKeyStore::open(&path, c).unwrap();
        let stats = || store.stats().file.unwrap();
        assert_eq!(
            (stats().reloads_ok, stats().reloads_error, stats().loaded_at),
            (0, 0, 1_700_000_000),
            "the first load is not a reload"
        );
        now.store(1_700_000_100, Ordering::Relaxed);
        let (key, rec) =
            append_new_key(&path, "user:alice", &["execute:tools".into()], None, None).unwrap();
        assert!(key.starts_with(KEY_PREFIX_LIVE) && key.len() == 12 + 43);
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .starts_with("# comment kept")
        );
        assert!(store.authenticate(&key).await.is_err());
        assert!(store.reload().unwrap());
        assert!(!store.reload().unwrap(), "unchanged: nothing to apply");
        assert_eq!(store.authenticate(&key).await.unwrap().key_id, rec.id);
        assert_eq!(
            (stats().keys, stats().reloads_ok, stats().loaded_at),
            (1, 1, 1_700_000_100)
        );
        now.store(1_700_000_200, Ordering::Relaxed);
        std::fs::write(&path, "keys: [ {id: x, hash: nope, principal: user:a} ]").unwrap();
        assert!(store.reload().unwrap_err().contains("keys[0].hash"));
        assert!(
            store.authenticate(&key).await.is_ok(),
            "old keys stay after a bad reload"
        );
        assert_eq!(
            (stats().keys, stats().reloads_error, stats().loaded_at),
            (1, 1, 1_700_000_100),
            "a refused reload is counted and the keys in use keep their time"
        );
    }

    #[test]
    fn bad_files_name_the_field() {
        for (text, want) in [
            (
                "keys: [ {id: x, hash: 'sha256:00', principal: user:a} ]",
                "keys[0].hash",
            ),
            (
                "keys: [ {id: x, hash: '$2b$nope', principal: user:a} ]",
                "keys[0].hash",
            ),
            (
                &format!(
                    "keys: [ {{id: x, hash: '{}', principal: alice}} ]",
                    sha256_record_hash("k")
                ),
                "keys[0].principal",
            ),
            (
                &format!(
                    "keys: [ {{id: x, hash: '{}', principal: user:a, expires_at: tomorrow}} ]",
                    sha256_record_hash("k")
                ),
                "keys[0].expires_at",
            ),
            (
                "keys: [ {id: x, hash: a, principal: user:a, colour: red} ]",
                "colour",
            ),
        ] {
            let e = parse_index(text, false).err().unwrap();
            assert!(e.contains(want), "{e} should name {want}");
        }
    }

    #[test]
    fn bcrypt_records_need_one_unique_lookup() {
        let bcrypt_hash = bcrypt::hash("k", 4).unwrap();
        let bh = bcrypt_hash.as_str();
        let sha = sha256_record_hash("k");
        let hmac = format!("hmac-sha256:{}", "ab".repeat(32));
        let rec = |hash: &str, lookup: Option<&str>| match lookup {
            Some(l) => format!(
                "  - {{id: x{}, hash: '{hash}', lookup: '{l}', principal: user:a}}\n",
                l.len() + hash.len()
            ),
            None => format!(
                "  - {{id: x{}, hash: '{hash}', principal: user:a}}\n",
                hash.len()
            ),
        };
        for (records, secret, want) in [
            (
                rec(bh, None),
                false,
                Err("keys[0].lookup: a bcrypt record needs lookup"),
            ),
            (
                rec(&sha, Some(&sha)),
                false,
                Err("keys[0].lookup: only bcrypt records"),
            ),
            (
                rec(bh, Some("md5:00")),
                false,
                Err("keys[0].lookup: \"md5:00\": want sha256"),
            ),
            (rec(bh, Some("sha256:00")), false, Err("64 hex digits")),
            (rec(bh, Some(&hmac)), false, Err("set API_KEY_CACHE_SECRET")),
            (rec(bh, Some(&hmac)), true, Ok(())),
            (rec(bh, Some(&sha)), false, Ok(())),
            (
                format!(
                    "{}  - {{id: y, hash: '{bh}', lookup: '{sha}', principal: user:b}}\n",
                    rec(bh, Some(&sha))
                ),
                false,
                Err("keys[1].lookup: same lookup as keys[0]"),
            ),
        ] {
            let text = format!("keys:\n{records}");
            match (parse_index(&text, secret), want) {
                (Ok(_), Ok(())) => {}
                (Err(e), Err(w)) => assert!(e.contains(w), "{text}: {e} should contain {w}"),
                (Ok(_), Err(w)) => panic!("{text}: accepted, want {w}"),
                (Err(e), Ok(())) => panic!("{text}: {e}"),
            }
        }
    }

    /// A keys file the way the app's records migrate: bcrypt hash, `lookup` from
    /// `apiKey_<id>_cacheHash` (HMAC-SHA256 under API_KEY_CACHE_SECRET) or SHA-256.
    fn bcrypt_store(dir: &Path, records: &[(&str, &str, &str)]) -> FileApiKeyStore {
        let path = dir.join("keys.yaml");
        let mut text = String::from("keys:\n");
        for (id, hash, lookup) in records {
            text.push_str(&format!(
                "  - {{id: {id}, hash: '{hash}', lookup: '{lookup}', principal: 'user:{id}'}}\n"
            ));
        }
        std::fs::write(&path, text).unwrap();
        let (c, _) = clock(1_700_000_000);
        FileApiKeyStore::open_with(
            &path,
            c,
            &StoreOptions {
                bcrypt_concurrency: 2,
                lookup_secret: Some("app-cache-secret".into()),
            },
        )
        .unwrap()
    }

    fn app_cache_hash(key: &str) -> String {
        format!(
            "hmac-sha256:{}",
            hex::encode(hmac_sha256(b"app-cache-secret", key))
        )
    }

    #[tokio::test]
    async fn a_request_runs_at_most_one_bcrypt_and_an_unknown_key_none() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<String> = (0..4).map(|i| format!("mcpkey_live_key{i}")).collect();
        let rotated = "mcpkey_live_rotated_away";
        let mut records: Vec<(String, String, String)> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let lookup = if i % 2 == 0 {
                    app_cache_hash(k)
                } else {
                    sha256_record_hash(k)
                };
                (format!("k{i}"), bcrypt::hash(k, 4).unwrap(), lookup)
            })
            .collect();
        // The app's rotation bug: the cacheHash still names the old key, the hash is the new one.
        records.push((
            "stale".into(),
            bcrypt::hash("mcpkey_live_new", 4).unwrap(),
            app_cache_hash(rotated),
        ));
        let refs: Vec<(&str, &str, &str)> = records
            .iter()
            .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
            .collect();
        let store = bcrypt_store(dir.path(), &refs);
        // (key, answer, bcrypt runs after it)
        let cases: Vec<(&str, Result<&str, AuthnError>, u64)> = vec![
            ("mcpkey_live_unknown", Err(AuthnError::ApiKeyUnknown), 0),
            ("x", Err(AuthnError::ApiKeyUnknown), 0),
            (&keys[0], Ok("user:k0"), 1),
            (&keys[0], Ok("user:k0"), 1),
            (&keys[1], Ok("user:k1"), 2),
            (&keys[3], Ok("user:k3"), 3),
            (rotated, Err(AuthnError::ApiKeyUnknown), 4),
            (rotated, Err(AuthnError::ApiKeyUnknown), 4),
            ("mcpkey_live_new", Err(AuthnError::ApiKeyUnknown), 4),
        ];
        for (key, want, runs) in cases {
            let got = store.authenticate(key).await.map(|p| p.subject.clone());
            assert_eq!(got, want.map(String::from), "{key}");
            assert_eq!(store.bcrypt_runs(), runs, "bcrypt runs after {key}");
        }
        let stats = store.stats().file.unwrap();
        assert_eq!(
            (
                stats.bcrypt_verifications,
                stats.bcrypt_busy,
                stats.failed_cache_hits
            ),
            (4, 0, 1)
        );
    }

    #[tokio::test]
    async fn a_full_bcrypt_pool_answers_busy_instead_of_queueing() {
        let dir = tempfile::tempdir().unwrap();
        let key = "mcpkey_live_busy";
        let store = bcrypt_store(
            dir.path(),
            &[(
                "b",
                &bcrypt::hash(key, 4).unwrap(),
                &sha256_record_hash(key),
            )],
        );
        let held = store
            .bcrypt_slots
            .clone()
            .acquire_many_owned(2)
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let e = store.authenticate(key).await.unwrap_err();
        assert!(e.is_unavailable(), "{e}");
        assert!(e.to_string().contains("api_keys.bcrypt_concurrency"), "{e}");
        assert!(started.elapsed() >= BCRYPT_QUEUE_WAIT);
        assert_eq!(store.bcrypt_runs(), 0);
        drop(held);
        assert_eq!(store.authenticate(key).await.unwrap().key_id, "b");
    }

    #[test]
    fn the_failed_key_cache_is_bounded_and_expires() {
        let index = Index::default();
        for i in 0..(MISS_CACHE_MAX + 10) {
            let mut mac = [0u8; 32];
            mac[..8].copy_from_slice(&(i as u64).to_le_bytes());
            index.remember_miss(mac, 1000);
            assert!(index.bcrypt_misses.len() <= MISS_CACHE_MAX);
        }
        let mac = [7u8; 32];
        index.remember_miss(mac, 1000);
        assert!(index.known_miss(&mac, 1000 + MISS_TTL_SECS - 1));
        assert!(!index.known_miss(&mac, 1000 + MISS_TTL_SECS));
    }
}
