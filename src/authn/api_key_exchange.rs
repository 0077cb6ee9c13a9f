//! API keys from the app's key service: the [`KeyExchange`] trait (the HTTP call,
//! [`HttpKeyExchange`], and a scripted one for tests), the [`ExchangeApiKeyStore`] that caches
//! its answers, and [`ApiKeySources`], which asks the keys file first and the key service
//! second.
//!
//! The contract (the app's `POST /api/v1/api-keys/validate`): the key in `X-API-Key`; 200
//! `{access_token, expires_in, user_id, username}`, 400 when no key arrived, 401 when the key
//! is invalid or expired. The token is then verified like any bearer token, by the policy's
//! [`JwtVerifier`], and the principal is what the token says.
//!
//! Invariants:
//! - **A cached token never outlives its `exp`, nor `api_keys.exchange_cache_ttl`** (nor the
//!   service's `expires_in`): a key the service stops accepting (rotated, revoked) stops
//!   working within min(exp, cache TTL). Refusals are remembered [`REFUSED_TTL`] at most
//!   (never longer than the cache TTL).
//! - Both caches are keyed by an HMAC of the key under a per-process random key; the key
//!   itself is never stored, logged or sent anywhere but to the key service.
//! - Concurrent misses for the same key make one call (single-flight); the others wait for
//!   its answer.
//! - A key service that cannot answer (5xx, timeout, refused connection, an unreadable 200)
//!   is a 503, never an allow and never a 401 (which would make a client drop a valid key).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use dashmap::DashMap;
use serde::Deserialize;

use super::api_key::{ApiKeyStats, ApiKeyStore, ExchangeStats, hmac_sha256};
use super::jwt::JwtVerifier;
use super::{AuthMethod, AuthnError, Principal, fingerprint};
use crate::clock::Clock;
use crate::config::ApiKeyExchangeConfig;

/// At most this many exchanged tokens are cached ...
pub const TOKEN_CACHE_MAX: usize = 10_000;
/// ... and at most this many refused keys, each this long (capped by the cache TTL).
pub const REFUSED_CACHE_MAX: usize = 10_000;
pub const REFUSED_TTL: Duration = Duration::from_secs(30);
/// A key longer than this is refused without asking the service (the app's are ~55 bytes).
const MAX_KEY_BYTES: usize = 512;
/// A token response larger than this is not a token response.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// A token the key service issued for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchanged {
    pub access_token: String,
    /// Seconds, as the service says (`expires_in`).
    pub expires_in: Option<u64>,
}

/// Why the key service gave no token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    /// 401: invalid, expired or revoked key.
    #[error("API key rejected by the key service")]
    Rejected,
    /// 400: the key did not reach the service.
    #[error("the key service received no API key (HTTP 400)")]
    NoKey,
    /// Anything else: the service cannot answer now. The text may name its address.
    #[error("{0}")]
    Unavailable(String),
}

/// One call to the key service.
#[async_trait::async_trait]
pub trait KeyExchange: Send + Sync {
    async fn exchange(&self, key: &str) -> Result<Exchanged, ExchangeError>;
    fn describe(&self) -> String;
}

/// The app's key service over HTTP.
pub struct HttpKeyExchange {
    url: String,
    http: reqwest::Client,
    timeout: Duration,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl HttpKeyExchange {
    pub fn new(cfg: &ApiKeyExchangeConfig) -> Self {
        Self {
            url: cfg.url.clone(),
            http: crate::http_client::client(cfg.timeout),
            timeout: cfg.timeout,
        }
    }
}

#[async_trait::async_trait]
impl KeyExchange for HttpKeyExchange {
    async fn exchange(&self, key: &str) -> Result<Exchanged, ExchangeError> {
        let unavailable = |cause: String| {
            ExchangeError::Unavailable(format!("key service {}: {cause}", self.url))
        };
        let resp = self
            .http
            .post(&self.url)
            // The app reads this header, whatever header the client used.
            .header("x-api-key", key)
            .send()
            .await
            .map_err(|e| unavailable(crate::http_client::describe(&e, self.timeout)))?;
        match resp.status().as_u16() {
            200 => {}
            400 => return Err(ExchangeError::NoKey),
            401 => return Err(ExchangeError::Rejected),
            _ => return Err(unavailable(format!("HTTP {}", resp.status()))),
        }
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
        {
            return Err(unavailable("token response too large".into()));
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| unavailable(crate::http_client::describe(&e, self.timeout)))?;
        if body.len() > MAX_RESPONSE_BYTES {
            return Err(unavailable("token response too large".into()));
        }
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            unavailable(format!(
                "HTTP 200 without {{access_token, expires_in}}: {e}"
            ))
        })?;
        if parsed.access_token.is_empty() {
            return Err(unavailable("HTTP 200 with an empty access_token".into()));
        }
        Ok(Exchanged {
            access_token: parsed.access_token,
            expires_in: parsed.expires_in,
        })
    }

    fn describe(&self) -> String {
        format!("key service {}", self.url)
    }
}

/// A key service answering from a script, for tests: `answers` by key, unknown keys
/// rejected; counts calls and can be slowed down.
#[cfg(any(test, feature = "test-util"))]
pub struct ScriptedExchange {
    pub answers:
        std::sync::Mutex<std::collections::HashMap<String, Result<Exchanged, ExchangeError>>>,
    pub calls: AtomicU64,
    pub delay: std::sync::Mutex<Duration>,
}

#[cfg(any(test, feature = "test-util"))]
impl Default for ScriptedExchange {
    fn default() -> Self {
        Self {
            answers: Default::default(),
            calls: AtomicU64::new(0),
            delay: std::sync::Mutex::new(Duration::ZERO),
        }
    }
}

#[cfg(any(test, feature = "test-util"))]
impl ScriptedExchange {
    pub fn answer(&self, key: &str, answer: Result<Exchanged, ExchangeError>) {
        self.answers.lock().unwrap().insert(key.into(), answer);
    }
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

#[cfg(any(test, feature = "test-util"))]
#[async_trait::async_trait]
impl KeyExchange for ScriptedExchange {
    async fn exchange(&self, key: &str) -> Result<Exchanged, ExchangeError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let delay = *self.delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.answers
            .lock()
            .unwrap()
            .get(key)
            .cloned()
            .unwrap_or(Err(ExchangeError::Rejected))
    }
    fn describe(&self) -> String {
        "scripted key service".into()
    }
}

struct CachedToken {
    token: Arc<str>,
    /// Epoch seconds; served while now < until.
    until: u64,
}

type Flight = Arc<tokio::sync::OnceCell<Result<Exchanged, ExchangeError>>>;

/// [`ApiKeyStore`] over a [`KeyExchange`], with the token and refusal caches.
pub struct ExchangeApiKeyStore {
    exchange: Arc<dyn KeyExchange>,
    /// Per-process random key of the cache keys.
    hmac_key: [u8; 32],
    cache_ttl: u64,
    clock: Clock,
    tokens: DashMap<[u8; 32], CachedToken>,
    /// HMAC(key) -> (until, the answer to repeat).
    refused: DashMap<[u8; 32], (u64, AuthnError)>,
    /// HMAC(key) -> the call in flight for it.
    inflight: DashMap<[u8; 32], Flight>,
    requests: AtomicU64,
    errors: AtomicU64,
    cache_hits: AtomicU64,
}

impl ExchangeApiKeyStore {
    pub fn new(exchange: Arc<dyn KeyExchange>, cache_ttl: Duration, clock: Clock) -> Self {
        Self {
            exchange,
            hmac_key: rand::random(),
            cache_ttl: cache_ttl.as_secs(),
            clock,
            tokens: DashMap::new(),
            refused: DashMap::new(),
            inflight: DashMap::new(),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
        }
    }

    /// The store over the app's key service at `cfg.url`.
    pub fn http(cfg: &ApiKeyExchangeConfig, clock: Clock) -> Self {
        Self::new(Arc::new(HttpKeyExchange::new(cfg)), cfg.cache_ttl, clock)
    }

    /// Forgets every cached token and refusal: the next use of each key asks the service.
    pub fn forget_all(&self) {
        self.tokens.clear();
        self.refused.clear();
    }

    /// Cached tokens (tests).
    pub fn cached_tokens(&self) -> usize {
        self.tokens.len()
    }

    fn remember_token(&self, mac: [u8; 32], token: &str, expires_in: Option<u64>, now: u64) {
        let mut until = now.saturating_add(self.cache_ttl);
        if let Some(exp) = token_exp(token) {
            until = until.min(exp);
        }
        if let Some(secs) = expires_in {
            until = until.min(now.saturating_add(secs));
        }
        if until <= now {
            return;
        }
        if self.tokens.len() >= TOKEN_CACHE_MAX {
            self.tokens.retain(|_, t| now < t.until);
            if self.tokens.len() >= TOKEN_CACHE_MAX {
                // Still full of live tokens: start over rather than grow without bound.
                self.tokens.clear();
            }
        }
        self.tokens.insert(
            mac,
            CachedToken {
                token: token.into(),
                until,
            },
        );
    }

    fn remember_refusal(&self, mac: [u8; 32], error: AuthnError, now: u64) {
        let ttl = REFUSED_TTL.as_secs().min(self.cache_ttl);
        if ttl == 0 {
            return;
        }
        self.tokens.remove(&mac);
        if self.refused.len() >= REFUSED_CACHE_MAX {
            self.refused.retain(|_, (until, _)| now < *until);
            if self.refused.len() >= REFUSED_CACHE_MAX {
                self.refused.clear();
            }
        }
        self.refused.insert(mac, (now.saturating_add(ttl), error));
    }

    /// The single call for `mac` in flight: every concurrent miss awaits the same one.
    async fn exchange_once(&self, mac: [u8; 32], key: &str) -> Result<Exchanged, ExchangeError> {
        let flight: Flight = self.inflight.entry(mac).or_default().clone();
        let answer = flight
            .get_or_init(|| async {
                self.requests.fetch_add(1, Ordering::Relaxed);
                let answer = self.exchange.exchange(key).await;
                if let Err(ExchangeError::Unavailable(cause)) = &answer {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %cause, key = %fingerprint(key), "API key exchange failed");
                }
                answer
            })
            .await
            .clone();
        self.inflight
            .remove_if(&mac, |_, f| Arc::ptr_eq(f, &flight));
        answer
    }
}

/// The `exp` claim, read without verification: it only bounds how long the token is reused,
/// and every use verifies the token, `exp` included.
fn token_exp(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()?
        .get("exp")?
        .as_u64()
}

/// The token's principal, as having come with an API key: a copy, since the token cache
/// keeps the token's own.
fn as_api_key(p: Arc<Principal>, key: &str) -> Arc<Principal> {
    let mut p = Arc::unwrap_or_clone(p);
    p.method = AuthMethod::ApiKey;
    // The token's signing key id would read as an API key id; this key has none here.
    p.key_id = String::new();
    p.credential_hash = fingerprint(key);
    Arc::new(p)
}

#[async_trait::async_trait]
impl ApiKeyStore for ExchangeApiKeyStore {
    async fn authenticate(&self, key: &str) -> Result<Arc<Principal>, AuthnError> {
        self.authenticate_with(key, None).await
    }

    async fn authenticate_with(
        &self,
        key: &str,
        jwt: Option<&JwtVerifier>,
    ) -> Result<Arc<Principal>, AuthnError> {
        // The configuration requires a JWT key source with an exchange URL.
        let jwt = jwt.ok_or_else(|| {
            AuthnError::ApiKeyStoreUnavailable(
                "the key service's tokens need a JWT key source to be verified".into(),
            )
        })?;
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(AuthnError::ApiKeyUnknown);
        }
        let mac = hmac_sha256(&self.hmac_key, key);
        let now = (self.clock)();
        let cached = self
            .tokens
            .get(&mac)
            .filter(|t| now < t.until)
            .map(|t| t.token.clone());
        if let Some(token) = cached {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            // Verified on every use: the JWT settings in force now apply to it.
            return jwt
                .authenticate(&token)
                .await
                .map(|p| as_api_key(p, key))
                .map_err(|e| AuthnError::ExchangedTokenInvalid(Box::new(e)));
        }
        let refused = self
            .refused
            .get(&mac)
            .filter(|r| now < r.0)
            .map(|r| r.1.clone());
        if let Some(error) = refused {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Err(error);
        }
        match self.exchange_once(mac, key).await {
            Ok(fresh) => match jwt.authenticate(&fresh.access_token).await {
                Ok(p) => {
                    self.remember_token(mac, &fresh.access_token, fresh.expires_in, now);
                    Ok(as_api_key(p, key))
                }
                Err(e) => {
                    let error = AuthnError::ExchangedTokenInvalid(Box::new(e));
                    tracing::warn!(error = %error, key = %fingerprint(key), "the key service issued a token that does not verify");
                    if !error.is_unavailable() {
                        self.remember_refusal(mac, error.clone(), now);
                    }
                    Err(error)
                }
            },
            Err(ExchangeError::Rejected) => {
                self.remember_refusal(mac, AuthnError::ApiKeyRejected, now);
                Err(AuthnError::ApiKeyRejected)
            }
            Err(ExchangeError::NoKey) => Err(AuthnError::ApiKeyNotReceived),
            Err(ExchangeError::Unavailable(cause)) => {
                Err(AuthnError::ApiKeyStoreUnavailable(cause))
            }
        }
    }

    fn len(&self) -> usize {
        self.tokens.len()
    }

    fn describe(&self) -> String {
        self.exchange.describe()
    }

    fn stats(&self) -> ApiKeyStats {
        ApiKeyStats {
            file: None,
            exchange: Some(ExchangeStats {
                requests: self.requests.load(Ordering::Relaxed),
                errors: self.errors.load(Ordering::Relaxed),
                cache_hits: self.cache_hits.load(Ordering::Relaxed),
                cached_tokens: self.tokens.len() as u64,
            }),
        }
    }
}

/// Both API-key sources, in order: the keys file first (an O(1) lookup that never leaves the
/// process), then the key service for a key the file does not hold. A key the file holds but
/// refuses (inactive, expired) is refused there: the service is not asked to overrule it.
pub struct ApiKeySources {
    pub file: Arc<dyn ApiKeyStore>,
    pub exchange: Arc<ExchangeApiKeyStore>,
}

/// The API-key store the server runs: the file, the key service, or both ([`ApiKeySources`]).
pub fn compose(
    file: Option<Arc<dyn ApiKeyStore>>,
    exchange: Option<Arc<ExchangeApiKeyStore>>,
) -> Option<Arc<dyn ApiKeyStore>> {
    match (file, exchange) {
        (Some(file), Some(exchange)) => Some(Arc::new(ApiKeySources { file, exchange })),
        (Some(file), None) => Some(file),
        (None, Some(exchange)) => Some(exchange),
        (None, None) => None,
    }
}

#[async_trait::async_trait]
impl ApiKeyStore for ApiKeySources {
    async fn authenticate(&self, key: &str) -> Result<Arc<Principal>, AuthnError> {
        self.authenticate_with(key, None).await
    }

    async fn authenticate_with(
        &self,
        key: &str,
        jwt: Option<&JwtVerifier>,
    ) -> Result<Arc<Principal>, AuthnError> {
        match self.file.authenticate_with(key, jwt).await {
            Err(AuthnError::ApiKeyUnknown) => self.exchange.authenticate_with(key, jwt).await,
            answered => answered,
        }
    }

    fn len(&self) -> usize {
        self.file.len()
    }

    fn describe(&self) -> String {
        format!(
            "{}, then {}",
            self.file.describe(),
            self.exchange.describe()
        )
    }

    fn stats(&self) -> ApiKeyStats {
        ApiKeyStats {
            file: self.file.stats().file,
            exchange: self.exchange.stats().exchange,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys");
    const T0: u64 = 1_700_000_000;

    fn clock() -> (Clock, Arc<AtomicU64>) {
        let c = Arc::new(AtomicU64::new(T0));
        let c2 = c.clone();
        (Arc::new(move || c2.load(Ordering::Relaxed)), c)
    }

    fn verifier(clock: Clock) -> JwtVerifier {
        crate::authn::jwt::test_verifier(
            "jwt: { jwks_file: x, issuer: https://kc/realms/r, audience: mcp-server, leeway: 0s }",
            clock,
        )
    }

    fn token(user: &str, exp: u64, iss: &str) -> Exchanged {
        let pem = std::fs::read(format!("{KEYS}/rsa-a.pem")).unwrap();
        let claims = json!({
            "sub": format!("id-{user}"), "preferred_username": user, "iss": iss,
            "aud": "mcp-server", "exp": exp, "iat": T0, "scope": "read:agents"
        });
        Exchanged {
            access_token: crate::authn::jwt::mint(
                &pem,
                jsonwebtoken::Algorithm::RS256,
                "rsa-a",
                &claims,
            )
            .unwrap(),
            expires_in: Some(900),
        }
    }

    fn setup(
        cache_ttl: u64,
    ) -> (
        Arc<ScriptedExchange>,
        ExchangeApiKeyStore,
        JwtVerifier,
        Arc<AtomicU64>,
    ) {
        let (c, now) = clock();
        let service = Arc::new(ScriptedExchange::default());
        let store =
            ExchangeApiKeyStore::new(service.clone(), Duration::from_secs(cache_ttl), c.clone());
        (service, store, verifier(c), now)
    }

    #[tokio::test]
    async fn a_valid_key_is_the_tokens_principal_and_is_cached_until_exp_never_past_it() {
        let (service, store, jwt, now) = setup(300);
        service.answer("k", Ok(token("alice", T0 + 10, "https://kc/realms/r")));
        let p = store.authenticate_with("k", Some(&jwt)).await.unwrap();
        assert_eq!(
            (p.subject.as_str(), p.method, p.key_id.as_str()),
            ("user:alice", AuthMethod::ApiKey, "")
        );
        assert_eq!(p.credential_hash, fingerprint("k"));
        now.store(T0 + 9, Ordering::Relaxed);
        store.authenticate_with("k", Some(&jwt)).await.unwrap();
        assert_eq!(service.calls(), 1, "served from the cache before exp");
        // At exp the cache lets go; the service mints a fresh token.
        now.store(T0 + 10, Ordering::Relaxed);
        service.answer("k", Ok(token("alice", T0 + 100, "https://kc/realms/r")));
        store.authenticate_with("k", Some(&jwt)).await.unwrap();
        assert_eq!(service.calls(), 2);
        assert_eq!(
            store.stats().exchange,
            Some(ExchangeStats {
                requests: 2,
                errors: 0,
                cache_hits: 1,
                cached_tokens: 1
            })
        );
    }

    #[tokio::test]
    async fn the_cache_ttl_bounds_a_long_lived_token_so_a_rotated_key_stops_working() {
        let (service, store, jwt, now) = setup(5);
        service.answer("k", Ok(token("alice", T0 + 3600, "https://kc/realms/r")));
        store.authenticate_with("k", Some(&jwt)).await.unwrap();
        service.answer("k", Err(ExchangeError::Rejected));
        now.store(T0 + 4, Ordering::Relaxed);
        assert!(store.authenticate_with("k", Some(&jwt)).await.is_ok());
        now.store(T0 + 5, Ordering::Relaxed);
        assert_eq!(
            store.authenticate_with("k", Some(&jwt)).await.unwrap_err(),
            AuthnError::ApiKeyRejected
        );
        // The refusal is remembered (briefly): no second call.
        assert_eq!(
            store.authenticate_with("k", Some(&jwt)).await.unwrap_err(),
            AuthnError::ApiKeyRejected
        );
        assert_eq!(service.calls(), 2);
        // forget_all drops it at once.
        service.answer("k", Ok(token("alice", T0 + 3600, "https://kc/realms/r")));
        store.forget_all();
        assert!(store.authenticate_with("k", Some(&jwt)).await.is_ok());
        assert_eq!(service.calls(), 3);
    }

    #[tokio::test]
    async fn each_service_answer_maps_to_its_status() {
        let (service, store, jwt, _) = setup(300);
        service.answer("nokey", Err(ExchangeError::NoKey));
        service.answer(
            "down",
            Err(ExchangeError::Unavailable(
                "key service http://app.internal/v: HTTP 500".into(),
            )),
        );
        service.answer("evil", Ok(token("mallory", T0 + 60, "https://evil")));
        service.answer("stale", Ok(token("bob", T0 - 1, "https://kc/realms/r")));
        let fail = |e: AuthnError| {
            let d = crate::decision::deny_for(&e.clone().into(), "r");
            (d.http_status, d.reason)
        };
        let unknown = store
            .authenticate_with("rejected", Some(&jwt))
            .await
            .unwrap_err();
        assert_eq!(
            fail(unknown),
            (401, "API key rejected by the key service".into())
        );
        let nokey = store
            .authenticate_with("nokey", Some(&jwt))
            .await
            .unwrap_err();
        assert_eq!(
            fail(nokey),
            (401, "the key service received no API key (HTTP 400)".into())
        );
        let down = store
            .authenticate_with("down", Some(&jwt))
            .await
            .unwrap_err();
        assert!(
            down.to_string().contains("http://app.internal/v"),
            "detail: {down}"
        );
        assert_eq!(fail(down), (503, "API key verification unavailable".into()));
        let evil = store
            .authenticate_with("evil", Some(&jwt))
            .await
            .unwrap_err();
        assert_eq!(
            fail(evil.clone()),
            (
                401,
                "token from the key service does not verify: wrong issuer \"https://evil\"".into()
            )
        );
        assert!(
            evil.to_string()
                .contains("expected \"https://kc/realms/r\"")
        );
        let stale = store
            .authenticate_with("stale", Some(&jwt))
            .await
            .unwrap_err();
        assert_eq!(
            fail(stale),
            (
                401,
                "token from the key service does not verify: token expired 1s ago".into()
            )
        );
        // An outage is not remembered: the next request asks again.
        let calls = service.calls();
        let _ = store.authenticate_with("down", Some(&jwt)).await;
        assert_eq!(service.calls(), calls + 1);
        assert_eq!(store.stats().exchange.unwrap().errors, 2);
    }

    #[tokio::test]
    async fn concurrent_misses_for_one_key_make_one_call() {
        let (service, store, jwt, _) = setup(300);
        service.answer("k", Ok(token("alice", T0 + 60, "https://kc/realms/r")));
        *service.delay.lock().unwrap() = Duration::from_millis(100);
        let store = Arc::new(store);
        let jwt = Arc::new(jwt);
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (store, jwt) = (store.clone(), jwt.clone());
                tokio::spawn(async move { store.authenticate_with("k", Some(&jwt)).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().subject, "user:alice");
        }
        assert_eq!(service.calls(), 1);
        assert!(store.inflight.is_empty());
    }

    #[tokio::test]
    async fn the_file_comes_first_and_the_service_only_hears_of_keys_it_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        std::fs::write(
            &path,
            format!(
                "keys:\n  - {{id: f1, hash: '{}', principal: user:filed}}\n  - {{id: f2, hash: '{}', principal: user:off, active: false}}\n",
                super::super::api_key::sha256_record_hash("in-file"),
                super::super::api_key::sha256_record_hash("inactive"),
            ),
        )
        .unwrap();
        let (service, store, jwt, _) = setup(300);
        let (c, _) = clock();
        let file = Arc::new(super::super::api_key::FileApiKeyStore::open(&path, c).unwrap());
        service.answer("remote", Ok(token("alice", T0 + 60, "https://kc/realms/r")));
        service.answer(
            "in-file",
            Ok(token("wrong", T0 + 60, "https://kc/realms/r")),
        );
        let both = compose(Some(file), Some(Arc::new(store))).unwrap();
        let who = |key: &'static str| {
            let (both, jwt) = (both.clone(), &jwt);
            async move {
                both.authenticate_with(key, Some(jwt))
                    .await
                    .map(|p| p.subject.clone())
            }
        };
        assert_eq!(who("in-file").await, Ok("user:filed".into()));
        assert_eq!(who("remote").await, Ok("user:alice".into()));
        assert_eq!(
            who("inactive").await,
            Err(AuthnError::ApiKeyInactive { id: "f2".into() })
        );
        assert_eq!(who("neither").await, Err(AuthnError::ApiKeyRejected));
        assert_eq!(
            service.calls(),
            2,
            "only remote and neither reached the service"
        );
        let stats = both.stats();
        assert!(stats.file.is_some(), "the file's figures");
        assert_eq!(stats.exchange.unwrap().requests, 2, "the service's figures");
    }

    #[test]
    fn the_caches_are_bounded() {
        let (_, store, _, _) = setup(300);
        for i in 0..(REFUSED_CACHE_MAX + 5) {
            let mut mac = [0u8; 32];
            mac[..8].copy_from_slice(&(i as u64).to_le_bytes());
            store.remember_refusal(mac, AuthnError::ApiKeyRejected, T0);
            assert!(store.refused.len() <= REFUSED_CACHE_MAX);
        }
        let t = token("alice", T0 + 60, "x").access_token;
        for i in 0..(TOKEN_CACHE_MAX + 5) {
            let mut mac = [0u8; 32];
            mac[..8].copy_from_slice(&(i as u64).to_le_bytes());
            store.remember_token(mac, &t, None, T0);
            assert!(store.tokens.len() <= TOKEN_CACHE_MAX);
        }
    }

    #[tokio::test]
    async fn the_caches_hold_hmacs_never_the_key() {
        let (service, store, jwt, _) = setup(300);
        let key = "mcpkey_live_secretsecretsecret";
        service.answer(key, Ok(token("alice", T0 + 60, "https://kc/realms/r")));
        store.authenticate_with(key, Some(&jwt)).await.unwrap();
        store
            .authenticate_with("mcpkey_live_other", Some(&jwt))
            .await
            .unwrap_err();
        let want = hmac_sha256(&store.hmac_key, key);
        assert!(store.tokens.contains_key(&want));
        assert!(!store.tokens.contains_key(&<[u8; 32]>::from(
            <sha2::Sha256 as sha2::Digest>::digest(key.as_bytes())
        )));
        assert_eq!(store.refused.len(), 1);
        assert!(!store.refused.contains_key(&want));
    }
}
