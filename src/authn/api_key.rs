//! API keys: the [`ApiKeyStore`] trait and its file backend.
//!
//! The file holds hashes only (`sha256:<hex>` or a bcrypt hash). SHA-256 records are found in
//! O(1) by the key's digest; bcrypt records are verified once (off the async threads) and then
//! remembered by an HMAC of the key, a cache that a reload of the file starts afresh so a
//! rotated or removed key stops working with the reload.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine;
use dashmap::DashMap;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{AuthMethod, AuthnError, Principal, PrincipalKind, fingerprint};

pub const KEY_PREFIX_LIVE: &str = "mcpkey_live_";

#[async_trait::async_trait]
pub trait ApiKeyStore: Send + Sync {
    /// Verifies the presented key and returns its principal.
    async fn authenticate(&self, key: &str) -> Result<Principal, AuthnError>;
    /// Number of records (for the startup log and doctor).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn describe(&self) -> String;
}

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
    kind: PrincipalKind,
    principal_id: String,
    expires_at: Option<u64>,
}

#[derive(Default)]
struct Index {
    by_sha: HashMap<[u8; 32], Arc<Entry>>,
    bcrypt: Vec<Arc<Entry>>,
    /// HMAC(key) -> verified bcrypt entry. Lives in the index so a reload forgets it.
    bcrypt_hits: DashMap<[u8; 32], Arc<Entry>>,
    /// File identity for change detection: (modified, length, sha256 of content).
    stamp: Option<(SystemTime, u64, [u8; 32])>,
}

fn parse_time(s: &str) -> Result<u64, String> {
    humantime::parse_rfc3339_weak(s)
        .or_else(|_| humantime::parse_rfc3339(s))
        .map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))?
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| format!("{s:?} is before 1970"))
}

fn parse_index(text: &str) -> Result<Index, String> {
    let file: KeysFile = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    let mut index = Index::default();
    let mut ids = std::collections::HashSet::new();
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
        let entry = Arc::new(Entry {
            hash,
            kind,
            principal_id,
            expires_at,
            record: r,
        });
        match &entry.hash {
            Hash::Sha256(h) => {
                index.by_sha.insert(*h, entry.clone());
            }
            Hash::Bcrypt(_) => index.bcrypt.push(entry.clone()),
        }
    }
    Ok(index)
}

/// [`ApiKeyStore`] over a YAML file, reloaded when it changes.
pub struct FileApiKeyStore {
    path: PathBuf,
    index: ArcSwap<Index>,
    hmac_key: [u8; 32],
    clock: super::jwt::Clock,
}

impl FileApiKeyStore {
    /// Loads the file; a missing or invalid file is a startup error naming the problem.
    pub fn open(path: &Path, clock: super::jwt::Clock) -> Result<Self, ApiKeyFileError> {
        let store = Self {
            path: path.to_path_buf(),
            index: ArcSwap::from_pointee(Index::default()),
            hmac_key: rand::random(),
            clock,
        };
        store.reload().map_err(|message| ApiKeyFileError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(store)
    }

    fn read_stamp(&self) -> Result<(SystemTime, u64, String), String> {
        let meta = std::fs::metadata(&self.path).map_err(|e| e.to_string())?;
        let text = std::fs::read_to_string(&self.path).map_err(|e| e.to_string())?;
        Ok((meta.modified().unwrap_or(UNIX_EPOCH), meta.len(), text))
    }

    /// Re-reads the file if it changed. Returns whether a new index was swapped in. On error
    /// the old index stays.
    pub fn reload(&self) -> Result<bool, String> {
        let (modified, len, text) = self.read_stamp()?;
        let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        if let Some((_, _, d)) = self.index.load().stamp
            && d == digest
        {
            return Ok(false);
        }
        let mut index = parse_index(&text)?;
        index.stamp = Some((modified, len, digest));
        let count = index.by_sha.len() + index.bcrypt.len();
        self.index.store(Arc::new(index));
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
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.hmac_key)
            .expect("HMAC accepts any key length");
        mac.update(key.as_bytes());
        mac.finalize().into_bytes().into()
    }

    fn admit(&self, e: &Entry, key: &str) -> Result<Principal, AuthnError> {
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
        let mut p = Principal::new(e.kind, &e.principal_id, AuthMethod::ApiKey);
        p.scopes = e.record.scopes.clone();
        p.key_id = e.record.id.clone();
        p.credential_hash = fingerprint(key);
        Ok(p)
    }
}

#[async_trait::async_trait]
impl ApiKeyStore for FileApiKeyStore {
    async fn authenticate(&self, key: &str) -> Result<Principal, AuthnError> {
        if key.is_empty() || key.len() > 512 {
            return Err(AuthnError::ApiKeyUnknown);
        }
        let index = self.index.load_full();
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        if let Some(e) = index.by_sha.get(&digest)
            && let Hash::Sha256(stored) = &e.hash
            && bool::from(stored.ct_eq(&digest))
        {
            return self.admit(e, key);
        }
        if index.bcrypt.is_empty() {
            return Err(AuthnError::ApiKeyUnknown);
        }
        let mac = self.hmac(key);
        if let Some(e) = index.bcrypt_hits.get(&mac) {
            return self.admit(&e, key);
        }
        let owned = key.to_string();
        let idx = index.clone();
        let found = tokio::task::spawn_blocking(move || {
            idx.bcrypt.iter().find_map(|e| match &e.hash {
                Hash::Bcrypt(h) => bcrypt::verify(&owned, h)
                    .ok()
                    .filter(|ok| *ok)
                    .map(|_| e.clone()),
                Hash::Sha256(_) => None,
            })
        })
        .await
        .map_err(|e| AuthnError::ApiKeyStoreUnavailable(e.to_string()))?;
        match found {
            Some(e) => {
                index.bcrypt_hits.insert(mac, e.clone());
                self.admit(&e, key)
            }
            None => Err(AuthnError::ApiKeyUnknown),
        }
    }

    fn len(&self) -> usize {
        let i = self.index.load();
        i.by_sha.len() + i.bcrypt.len()
    }

    fn describe(&self) -> String {
        format!("API keys file {}", self.path.display())
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
        parse_index(&existing).map_err(|e| format!("{}: {e}", path.display()))?;
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
    let index = parse_index(&text)
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

    fn clock(at: u64) -> (super::super::jwt::Clock, Arc<AtomicU64>) {
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
                "keys:\n  - id: a\n    hash: {}\n    principal: user:alice\n    scopes: [read:agents]\n  - id: b\n    hash: {}\n    principal: service_principal:svc\n  - id: c\n    hash: {}\n    principal: user:bob\n    active: false\n  - id: d\n    hash: {}\n    principal: user:carol\n    expires_at: 2001-01-01T00:00:00Z\n",
                sha256_record_hash("key-a"),
                bhash,
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
        let p = store.authenticate(bkey).await.unwrap();
        assert_eq!(p.subject, "service_principal:svc");
        // second time from the HMAC cache
        assert_eq!(store.authenticate(bkey).await.unwrap().key_id, "b");
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
        let (c, _) = clock(1_700_000_000);
        let store = FileApiKeyStore::open(&path, c).unwrap();
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
        assert_eq!(store.authenticate(&key).await.unwrap().key_id, rec.id);
        std::fs::write(&path, "keys: [ {id: x, hash: nope, principal: user:a} ]").unwrap();
        assert!(store.reload().unwrap_err().contains("keys[0].hash"));
        assert!(
            store.authenticate(&key).await.is_ok(),
            "old keys stay after a bad reload"
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
            let e = parse_index(text).err().unwrap();
            assert!(e.contains(want), "{e} should name {want}");
        }
    }
}
