//! Bearer JWT verification: structure, algorithm allowlist, signature against the
//! [`KeySource`], then claims (`exp`/`nbf` with leeway, `iss`, `aud`, required claims), each
//! failure with its own reason. Verified tokens are cached by SHA-256 until they expire, so a
//! repeated token costs a hash and a map lookup, not a signature check ([`TokenCache`]:
//! bounded, one token evicted at a time).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use dashmap::DashMap;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::jwks::{KeyError, KeySource};
use super::{AuthMethod, AuthnError, Principal, PrincipalKind, fingerprint};
use crate::clock::Clock;
use crate::config::JwtConfig;

/// Larger than any real Keycloak token (a few KiB with many roles), small enough that a
/// hostile header costs nothing to refuse.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The latest NumericDate accepted in `exp`, `nbf` and `iat`: 9999-12-31T23:59:59Z. No issuer
/// writes a later one, and the bound keeps every `claim + leeway` far from `u64::MAX`.
pub const MAX_NUMERIC_DATE: u64 = 253_402_300_799;

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
    kid: Option<String>,
    crit: Option<Value>,
}

struct Cached {
    principal: Arc<Principal>,
    exp: u64,
    /// Hit since it last reached the front of the queue: spared once.
    referenced: AtomicBool,
}

/// Verified tokens by SHA-256 (collision-resistant: the digest alone names the token, so no
/// token text is kept), at most `capacity` of them.
///
/// Invariant: `order` lists every key of `map` exactly once, oldest first, because both
/// change only under the `order` lock. So the bound holds exactly, and making room evicts one
/// token at a time from the front (second chance: a token hit since it was last there goes to
/// the back once, unless expired): O(1) amortised, and never a clear of every token.
struct TokenCache {
    map: DashMap<[u8; 32], Cached>,
    order: Mutex<VecDeque<[u8; 32]>>,
    capacity: usize,
}

impl TokenCache {
    fn new(capacity: usize) -> Self {
        Self {
            map: DashMap::new(),
            order: Mutex::new(VecDeque::new()),
            capacity,
        }
    }

    /// The principal of a verified token `live` still accepts, marked as used.
    fn get(&self, digest: &[u8; 32], live: impl Fn(u64) -> bool) -> Option<Arc<Principal>> {
        let hit = self.map.get(digest)?;
        if !live(hit.exp) {
            return None;
        }
        if !hit.referenced.load(Ordering::Relaxed) {
            hit.referenced.store(true, Ordering::Relaxed);
        }
        Some(hit.principal.clone())
    }

    fn insert(
        &self,
        digest: [u8; 32],
        principal: Arc<Principal>,
        exp: u64,
        live: impl Fn(u64) -> bool,
    ) {
        if self.capacity == 0 {
            return;
        }
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        let cached = Cached {
            principal,
            exp,
            referenced: AtomicBool::new(false),
        };
        if self.map.insert(digest, cached).is_some() {
            return; // verified again after it expired: it keeps its place in the queue
        }
        order.push_back(digest);
        while order.len() > self.capacity {
            let Some(oldest) = order.pop_front() else {
                break;
            };
            let spare = self
                .map
                .get(&oldest)
                .is_some_and(|c| live(c.exp) && c.referenced.swap(false, Ordering::Relaxed));
            if spare {
                order.push_back(oldest);
            } else {
                self.map.remove(&oldest);
            }
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    /// Keeps only the tokens whose principal `keep` accepts; returns how many went. The
    /// order's lock first, as `insert` takes it, so `order` still lists exactly the map.
    fn retain(&self, keep: impl Fn(&Arc<Principal>) -> bool) -> usize {
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        let before = self.map.len();
        self.map.retain(|_, c| keep(&c.principal));
        order.retain(|d| self.map.contains_key(d));
        before - self.map.len()
    }

    /// Forgets every token (an operator's flush), the eviction order with them; the order's
    /// lock first, as `insert` takes it.
    fn clear(&self) {
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        order.clear();
        self.map.clear();
    }
}

pub struct JwtVerifier {
    keys: Arc<dyn KeySource>,
    issuer: Option<String>,
    audience: Option<String>,
    client_id: Option<String>,
    algorithms: Vec<Algorithm>,
    leeway: u64,
    required_claims: Vec<String>,
    require_typ: Option<String>,
    cache: TokenCache,
    /// The key source's [`KeySource::removals`] when the cache was last purged of tokens
    /// whose key left the set.
    removals_seen: AtomicU64,
    clock: Clock,
}

/// The one `Validation` this crate uses: signature and algorithm only. Claims are checked by
/// [`JwtVerifier::check_claims`] so each failure has its own precise reason.
fn validation(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    v
}

fn b64_json(part: &str, what: &str) -> Result<Value, AuthnError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| AuthnError::Malformed(format!("{what} is not base64url")))?;
    serde_json::from_slice(&bytes).map_err(|_| AuthnError::Malformed(format!("{what} is not JSON")))
}

fn alg_name(a: Algorithm) -> String {
    format!("{a:?}")
}

impl JwtVerifier {
    pub fn new(cfg: &JwtConfig, keys: Arc<dyn KeySource>, clock: Clock) -> Self {
        Self {
            keys,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            client_id: cfg.client_id.clone(),
            algorithms: cfg.algorithms.clone(),
            leeway: cfg.leeway.as_secs(),
            required_claims: cfg.required_claims.clone(),
            require_typ: cfg.require_typ.clone(),
            cache: TokenCache::new(cfg.token_cache_size),
            removals_seen: AtomicU64::new(0),
            clock,
        }
    }

    pub fn key_source(&self) -> &Arc<dyn KeySource> {
        &self.keys
    }

    /// The configured issuer, else the one OIDC discovery found.
    pub fn expected_issuer(&self) -> Option<String> {
        self.issuer
            .clone()
            .or_else(|| self.keys.discovered_issuer())
    }

    pub fn cached_tokens(&self) -> usize {
        self.cache.len()
    }

    /// Forgets every verified token (the operator's cache flush); returns how many. The next
    /// request with each token verifies its signature and claims again.
    pub fn forget_tokens(&self) -> usize {
        let n = self.cache.len();
        self.cache.clear();
        n
    }

    /// A key left the set (rotated out, revoked): a token it signed is refused from now on,
    /// cached or not. Checks racing here may purge twice; the second finds nothing.
    fn forget_tokens_of_dropped_keys(&self, removals: u64) {
        let gone = self.cache.retain(|p| self.keys.has_key(&p.key_id));
        self.removals_seen.store(removals, Ordering::Release);
        if gone > 0 {
            tracing::info!(
                tokens = gone,
                "verified tokens forgotten: their signing key left the key set"
            );
        }
    }

    /// Verifies `token` and maps its claims to a [`Principal`], shared with the token cache:
    /// a cache hit is a reference count, not a copy of the principal's strings.
    pub async fn authenticate(&self, token: &str) -> Result<Arc<Principal>, AuthnError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthnError::TooLarge {
                size: token.len(),
                limit: MAX_TOKEN_BYTES,
            });
        }
        let removals = self.keys.removals();
        if removals != self.removals_seen.load(Ordering::Acquire) {
            self.forget_tokens_of_dropped_keys(removals);
        }
        let now = (self.clock)();
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let live = |exp: u64| now <= exp.saturating_add(self.leeway);
        if let Some(principal) = self.cache.get(&digest, live) {
            return Ok(principal);
        }
        let (principal, exp) = self.verify(token, now).await?;
        let principal = Arc::new(principal);
        self.cache.insert(digest, principal.clone(), exp, live);
        // Verified just before its key left the set: a purge may already have run, so this
        // token goes now (the check after the insert closes the race with the purge).
        if !self.keys.has_key(&principal.key_id) {
            self.cache.retain(|p| !Arc::ptr_eq(p, &principal));
        }
        Ok(principal)
    }

    async fn verify(&self, token: &str, now: u64) -> Result<(Principal, u64), AuthnError> {
        let parts: Vec<&str> = token.split('.').collect();
        if parts.len() != 3 {
            return Err(AuthnError::Malformed(format!(
                "expected 3 dot-separated segments, got {}",
                parts.len()
            )));
        }
        let header: RawHeader = serde_json::from_value(b64_json(parts[0], "header")?)
            .map_err(|_| AuthnError::Malformed("header is not a JWT header".into()))?;
        let alg_raw = header
            .alg
            .ok_or_else(|| AuthnError::Malformed("header has no alg".into()))?;
        if alg_raw.eq_ignore_ascii_case("none") {
            return Err(AuthnError::AlgNone);
        }
        let allowed = || {
            self.algorithms
                .iter()
                .map(|a| alg_name(*a))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let alg = alg_raw
            .parse::<Algorithm>()
            .ok()
            .filter(|a| self.algorithms.contains(a))
            .ok_or_else(|| AuthnError::AlgorithmNotAllowed {
                alg: alg_raw.clone(),
                allowed: allowed(),
            })?;
        if header.crit.is_some() {
            return Err(AuthnError::Malformed(
                "header has crit extensions, none are supported".into(),
            ));
        }
        let claims = b64_json(parts[1], "payload")?;
        if !claims.is_object() {
            return Err(AuthnError::Malformed("payload is not a JSON object".into()));
        }
        if parts[2].is_empty() {
            return Err(AuthnError::Malformed("signature is empty".into()));
        }
        let kid = header
            .kid
            .filter(|k| !k.is_empty())
            .ok_or(AuthnError::MissingKid)?;
        let key = self.keys.key(&kid).await.map_err(|e| match e {
            KeyError::NotFound { kid, origin } => AuthnError::UnknownKid { kid, origin },
            KeyError::Unavailable { origin, cause, .. } => AuthnError::KeySourceUnavailable {
                kid: kid.clone(),
                origin,
                cause,
            },
            KeyError::Empty { origin, cause } => AuthnError::NoKeys { origin, cause },
        })?;
        if let Some(key_alg) = key.alg
            && key_alg != alg
        {
            return Err(AuthnError::KeyAlgorithmMismatch {
                kid,
                key_alg: alg_name(key_alg),
                alg: alg_name(alg),
            });
        }
        jsonwebtoken::decode::<Value>(token, &key.key, &validation(alg)).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidSignature => AuthnError::BadSignature { kid: kid.clone() },
                ErrorKind::InvalidAlgorithm
                | ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidEddsaKey => AuthnError::KeyAlgorithmMismatch {
                    kid: kid.clone(),
                    key_alg: "another key type".into(),
                    alg: alg_name(alg),
                },
                ErrorKind::Base64(_) => AuthnError::Malformed("signature is not base64url".into()),
                _ => AuthnError::Malformed(e.to_string()),
            }
        })?;
        let exp = self.check_claims(&claims, now)?;
        let mut principal = self.principal(&claims)?;
        principal.key_id = kid;
        principal.credential_hash = fingerprint(token);
        Ok((principal, exp))
    }

    fn check_claims(&self, claims: &Value, now: u64) -> Result<u64, AuthnError> {
        // Every time claim is bounded by MAX_NUMERIC_DATE and every sum saturates: a token
        // saying exp = 2^64 - 1 is refused with a reason, never an overflow.
        let num = |name: &str| -> Result<Option<u64>, AuthnError> {
            match claims.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .or_else(|| {
                        v.as_f64()
                            .filter(|f| f.is_finite() && *f >= 0.0)
                            .map(|f| f as u64)
                    })
                    .filter(|secs| *secs <= MAX_NUMERIC_DATE)
                    .map(Some)
                    .ok_or_else(|| AuthnError::InvalidClaim {
                        claim: name.into(),
                        why: "not a NumericDate (seconds since 1970, at most year 9999)".into(),
                    }),
            }
        };
        let exp = num("exp")?.ok_or_else(|| AuthnError::MissingClaim("exp".into()))?;
        if now > exp.saturating_add(self.leeway) {
            return Err(AuthnError::Expired {
                ago: now.saturating_sub(exp),
            });
        }
        if let Some(nbf) = num("nbf")?
            && nbf > now.saturating_add(self.leeway)
        {
            return Err(AuthnError::NotYetValid {
                in_secs: nbf.saturating_sub(now),
            });
        }
        if let Some(iat) = num("iat")?
            && iat > now.saturating_add(self.leeway)
        {
            return Err(AuthnError::IssuedInFuture {
                in_secs: iat.saturating_sub(now),
            });
        }
        // Keycloak marks what a token is for in `typ`: Bearer (access), ID, Refresh, Logout.
        // Only an access token may authenticate a request; tokens without `typ` (other
        // issuers, `token mint`) are not Keycloak's and pass.
        if let Some(want) = &self.require_typ {
            match claims.get("typ") {
                None | Some(Value::Null) => {}
                Some(Value::String(got)) if got.eq_ignore_ascii_case(want) => {}
                Some(Value::String(got)) => {
                    return Err(AuthnError::WrongTokenType {
                        got: got.clone(),
                        want: want.clone(),
                    });
                }
                Some(_) => {
                    return Err(AuthnError::InvalidClaim {
                        claim: "typ".into(),
                        why: "not a string".into(),
                    });
                }
            }
        }
        if let Some(want) = self.expected_issuer() {
            match claims.get("iss").and_then(Value::as_str) {
                None => return Err(AuthnError::MissingClaim("iss".into())),
                Some(got) if got != want => {
                    return Err(AuthnError::WrongIssuer {
                        got: got.into(),
                        want,
                    });
                }
                _ => {}
            }
        }
        if let Some(want) = &self.audience {
            let ok = match claims.get("aud") {
                Some(Value::String(s)) => s == want,
                Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(want)),
                _ => return Err(AuthnError::MissingClaim("aud".into())),
            };
            if !ok {
                return Err(AuthnError::WrongAudience {
                    got: claims["aud"].to_string(),
                    want: want.clone(),
                });
            }
        }
        for name in &self.required_claims {
            match claims.get(name) {
                None | Some(Value::Null) => return Err(AuthnError::MissingClaim(name.clone())),
                Some(Value::String(s)) if s.is_empty() => {
                    return Err(AuthnError::MissingClaim(name.clone()));
                }
                _ => {}
            }
        }
        Ok(exp)
    }

    /// Keycloak's claim layout: roles in `realm_access.roles`, `resource_access.<client>.roles`
    /// and a top-level `roles`; scopes in `scope`; a client-credentials token has a
    /// `service-account-<client>` username and names its client in `client_id`/`azp`.
    fn principal(&self, claims: &Value) -> Result<Principal, AuthnError> {
        let s = |name: &str| {
            claims
                .get(name)
                .and_then(Value::as_str)
                .filter(|v| !v.is_empty())
        };
        let username = s("preferred_username");
        let client = s("client_id").or_else(|| s("azp"));
        let service_account = username
            .and_then(|u| u.strip_prefix("service-account-"))
            .map(|rest| client.unwrap_or(rest));
        let (kind, id) = match service_account {
            Some(client) => (PrincipalKind::ServicePrincipal, client.to_string()),
            None => {
                let id = username
                    .or_else(|| s("sub"))
                    .ok_or_else(|| AuthnError::MissingClaim("sub".into()))?;
                (PrincipalKind::User, id.to_string())
            }
        };
        let mut p = Principal::new(kind, &id, AuthMethod::Jwt);
        p.username = username.unwrap_or(&id).to_string();
        let mut roles = Vec::new();
        let mut push_all = |v: Option<&Value>| {
            if let Some(Value::Array(items)) = v {
                for r in items.iter().filter_map(Value::as_str) {
                    if !roles.iter().any(|x: &String| x == r) {
                        roles.push(r.to_string());
                    }
                }
            }
        };
        push_all(claims.pointer("/realm_access/roles"));
        if let Some(c) = &self.client_id {
            push_all(
                claims
                    .get("resource_access")
                    .and_then(|ra| ra.get(c))
                    .and_then(|c| c.get("roles")),
            );
        }
        push_all(claims.get("roles"));
        p.roles = roles;
        p.scopes = match claims.get("scope") {
            Some(Value::String(s)) => s.split_whitespace().map(String::from).collect(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect(),
            _ => match claims.get("scp") {
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect(),
                _ => Vec::new(),
            },
        };
        if let Some(Value::Array(g)) = claims.get("groups") {
            p.groups = g
                .iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect();
        }
        Ok(p)
    }
}

/// Signs `claims` with a PEM private key (local trials and tests; never used by the server).
pub fn mint(
    key_pem: &[u8],
    alg: Algorithm,
    kid: &str,
    claims: &Value,
) -> Result<String, jsonwebtoken::errors::Error> {
    use jsonwebtoken::EncodingKey;
    let key = match alg {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(key_pem)?,
        Algorithm::EdDSA => EncodingKey::from_ed_pem(key_pem)?,
        _ => EncodingKey::from_rsa_pem(key_pem)?,
    };
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, &key)
}

/// For unit tests here and above: a verifier for `jwt_yaml` (a `jwt:` section) over the test
/// JWKS in tests/fixtures/keys, on `clock`.
#[cfg(test)]
pub(crate) fn test_verifier(jwt_yaml: &str, clock: Clock) -> JwtVerifier {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys/jwks.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("test JWKS")).expect("JSON");
    let cfg = crate::config::Config::from_yaml(
        jwt_yaml,
        std::path::Path::new("/"),
        &std::collections::BTreeMap::new(),
    )
    .expect("a valid test config");
    JwtVerifier::new(
        &cfg.jwt,
        Arc::new(crate::authn::jwks::StaticKeys::from_jwks(&doc).expect("test JWKS")),
        clock,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::jwks::StaticKeys;
    use serde_json::json;
    use std::sync::atomic::{AtomicU64, Ordering};

    const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys");

    fn pem(name: &str) -> Vec<u8> {
        std::fs::read(format!("{KEYS}/{name}.pem")).unwrap()
    }

    fn verifier(now: Arc<AtomicU64>) -> JwtVerifier {
        test_verifier(
            "jwt: { jwks_file: x, issuer: https://kc/realms/r, audience: mcp-server, algorithms: [RS256, ES256, EdDSA, PS256] }",
            Arc::new(move || now.load(Ordering::Relaxed)),
        )
    }

    fn claims(now: u64) -> Value {
        json!({
            "sub": "0b7a", "preferred_username": "alice", "iss": "https://kc/realms/r",
            "aud": ["mcp-server", "account"], "exp": now + 300, "iat": now,
            "realm_access": {"roles": ["user", "premium"]},
            "resource_access": {"mcp-server": {"roles": ["tool-runner"]}},
            "scope": "openid read:agents", "groups": ["/acme"]
        })
    }

    fn at(now: u64) -> (JwtVerifier, Arc<AtomicU64>) {
        let clock = Arc::new(AtomicU64::new(now));
        (verifier(clock.clone()), clock)
    }

    #[tokio::test]
    async fn valid_token_maps_keycloak_claims() {
        let (v, _) = at(1_000_000);
        let t = mint(&pem("rsa-a"), Algorithm::RS256, "rsa-a", &claims(1_000_000)).unwrap();
        let p = v.authenticate(&t).await.unwrap();
        assert_eq!(p.subject, "user:alice");
        assert_eq!(p.roles, vec!["user", "premium", "tool-runner"]);
        assert_eq!(p.scopes, vec!["openid", "read:agents"]);
        assert_eq!(p.groups, vec!["/acme"]);
        assert_eq!(p.key_id, "rsa-a");
        assert_eq!(v.cached_tokens(), 1);
    }

    #[tokio::test]
    async fn other_algorithms_verify() {
        let (v, _) = at(1_000_000);
        for (k, alg) in [("ec256", Algorithm::ES256), ("ed25519", Algorithm::EdDSA)] {
            let t = mint(&pem(k), alg, k, &claims(1_000_000)).unwrap();
            v.authenticate(&t)
                .await
                .unwrap_or_else(|e| panic!("{k}: {e}"));
        }
    }

    #[tokio::test]
    async fn service_account_token() {
        let (v, _) = at(1_000_000);
        let mut c = claims(1_000_000);
        c["preferred_username"] = json!("service-account-svc-reporter");
        c["client_id"] = json!("svc-reporter");
        let t = mint(&pem("rsa-a"), Algorithm::RS256, "rsa-a", &c).unwrap();
        let p = v.authenticate(&t).await.unwrap();
        assert_eq!(p.kind, PrincipalKind::ServicePrincipal);
        assert_eq!(p.subject, "service_principal:svc-reporter");
    }

    #[tokio::test]
    async fn claim_failures_have_reasons() {
        let now = 1_000_000;
        let (v, _) = at(now);
        let key = pem("rsa-a");
        let cases: Vec<(Value, &str)> = vec![
            (json!({"exp": now - 42}), "token expired 72s ago"),
            (json!({"nbf": now + 100}), "not valid yet"),
            (json!({"iss": "https://evil"}), "wrong issuer"),
            (json!({"aud": "other"}), "wrong audience"),
            (json!({"sub": null}), "missing claim sub"),
            (json!({"exp": "soon"}), "invalid claim exp"),
        ];
        for (patch, want) in cases {
            let mut c = claims(now);
            for (k, val) in patch.as_object().unwrap() {
                if k == "exp" && val.is_u64() {
                    c["exp"] = json!(val.as_u64().unwrap() - 30);
                } else {
                    c[k] = val.clone();
                }
            }
            let t = mint(&key, Algorithm::RS256, "rsa-a", &c).unwrap();
            let e = v.authenticate(&t).await.unwrap_err().to_string();
            assert!(e.contains(want), "{e} should contain {want}");
        }
    }

    /// Time claims at the edge of u64 and of sense: refused with a reason, never a panic.
    #[tokio::test]
    async fn absurd_time_claims_are_refused_without_overflow() {
        let now = 1_000_000;
        let (v, _) = at(now);
        let key = pem("rsa-a");
        let cases: Vec<(&str, Value, &str)> = vec![
            ("exp", json!(u64::MAX), "invalid claim exp"),
            ("exp", json!(u64::MAX - 10), "invalid claim exp"),
            ("exp", json!(1e300), "invalid claim exp"),
            ("exp", json!(-5), "invalid claim exp"),
            ("exp", json!(MAX_NUMERIC_DATE + 1), "invalid claim exp"),
            ("nbf", json!(u64::MAX), "invalid claim nbf"),
            ("nbf", json!(MAX_NUMERIC_DATE), "not valid yet"),
            ("iat", json!(u64::MAX), "invalid claim iat"),
            (
                "iat",
                json!(now + 3600),
                "token issued in the future: iat is 3600s ahead",
            ),
        ];
        for (claim, value, want) in cases {
            let mut c = claims(now);
            c[claim] = value.clone();
            let t = mint(&key, Algorithm::RS256, "rsa-a", &c).unwrap();
            let e = v.authenticate(&t).await.unwrap_err().to_string();
            assert!(
                e.contains(want),
                "{claim}={value}: {e} should contain {want}"
            );
        }
        // The largest date accepted works, and the cache check on it does not overflow.
        let mut c = claims(now);
        c["exp"] = json!(MAX_NUMERIC_DATE);
        let t = mint(&key, Algorithm::RS256, "rsa-a", &c).unwrap();
        v.authenticate(&t).await.unwrap();
        v.authenticate(&t).await.unwrap();
    }

    /// Keycloak's `typ`: an access token (Bearer) authenticates, an ID or refresh token does
    /// not, a token without `typ` (another issuer, `token mint`) does.
    #[tokio::test]
    async fn only_access_tokens_authenticate() {
        let now = 1_000_000;
        let (v, _) = at(now);
        let key = pem("rsa-a");
        for (typ, want) in [
            (Some(json!("Bearer")), Ok(())),
            (Some(json!("bearer")), Ok(())),
            (None, Ok(())),
            (
                Some(json!("ID")),
                Err("token typ \"ID\" is not accepted: want Bearer"),
            ),
            (Some(json!("Refresh")), Err("token typ \"Refresh\"")),
            (Some(json!(1)), Err("invalid claim typ")),
        ] {
            let mut c = claims(now);
            if let Some(t) = &typ {
                c["typ"] = t.clone();
            }
            let t = mint(&key, Algorithm::RS256, "rsa-a", &c).unwrap();
            match (v.authenticate(&t).await, want) {
                (Ok(_), Ok(())) => {}
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{typ:?}: {e}"),
                (got, want) => panic!("{typ:?}: got {got:?}, want {want:?}"),
            }
        }
        // jwt.require_typ: off lets an ID token through (for issuers that mean otherwise).
        let mut cfg = crate::config::Config::from_yaml(
            "jwt: { jwks_file: x, require_typ: off }",
            std::path::Path::new("/"),
            &std::collections::BTreeMap::new(),
        )
        .unwrap()
        .jwt;
        cfg.algorithms = vec![Algorithm::RS256];
        let doc: Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{KEYS}/jwks.json")).unwrap())
                .unwrap();
        let lax = JwtVerifier::new(
            &cfg,
            Arc::new(StaticKeys::from_jwks(&doc).unwrap()),
            Arc::new(move || now),
        );
        let mut c = claims(now);
        c["typ"] = json!("ID");
        let t = mint(&key, Algorithm::RS256, "rsa-a", &c).unwrap();
        lax.authenticate(&t).await.unwrap();
    }

    #[tokio::test]
    async fn cache_respects_expiry() {
        let now = 1_000_000;
        let (v, clock) = at(now);
        let t = mint(&pem("rsa-a"), Algorithm::RS256, "rsa-a", &claims(now)).unwrap();
        v.authenticate(&t).await.unwrap();
        clock.store(now + 300 + 31, Ordering::Relaxed);
        let e = v.authenticate(&t).await.unwrap_err();
        assert_eq!(e, AuthnError::Expired { ago: 31 });
    }

    #[tokio::test]
    async fn a_cached_token_is_refused_once_its_key_leaves_the_jwks() {
        // A real JWKS source (a file, refreshed as a URL would be) with rsa-a and rsa-b.
        let fixture: Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{KEYS}/jwks.json")).unwrap())
                .unwrap();
        let only = |kids: &[&str]| {
            let keys: Vec<&Value> = fixture["keys"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|k| kids.contains(&k["kid"].as_str().unwrap()))
                .collect();
            serde_json::to_string(&json!({ "keys": keys })).unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("jwks.json");
        std::fs::write(&file, only(&["rsa-a", "rsa-b"])).unwrap();
        let yaml = format!(
            "jwt: {{ jwks_file: {}, issuer: https://kc/realms/r, audience: mcp-server }}",
            file.display()
        );
        let cfg = crate::config::Config::from_yaml(
            &yaml,
            std::path::Path::new("/"),
            &std::collections::BTreeMap::new(),
        )
        .unwrap();
        let source = Arc::new(crate::authn::jwks::JwksKeySource::new(&cfg.jwt).unwrap());
        source.refresh().await.unwrap();
        let now = 1_000_000;
        let v = JwtVerifier::new(&cfg.jwt, source.clone(), Arc::new(move || now));
        let by_a = mint(&pem("rsa-a"), Algorithm::RS256, "rsa-a", &claims(now)).unwrap();
        let by_b = mint(&pem("rsa-b"), Algorithm::RS256, "rsa-b", &claims(now)).unwrap();
        assert!(v.authenticate(&by_a).await.is_ok());
        assert!(v.authenticate(&by_b).await.is_ok());
        assert_eq!(v.cached_tokens(), 2);

        // rsa-a is rotated out (or revoked): the next refresh drops it.
        std::fs::write(&file, only(&["rsa-b"])).unwrap();
        source.refresh().await.unwrap();
        assert_eq!(source.removals(), 1);
        assert!(
            matches!(
                v.authenticate(&by_a).await,
                Err(AuthnError::UnknownKid { ref kid, .. }) if kid == "rsa-a"
            ),
            "a token of a dropped key is refused at once, not at its exp"
        );
        // rsa-b's token is still the cached one.
        assert_eq!(v.cached_tokens(), 1);
        assert!(v.authenticate(&by_b).await.is_ok());
        // A refresh that only adds keys forgets nothing.
        std::fs::write(&file, only(&["rsa-b", "ec256"])).unwrap();
        source.refresh().await.unwrap();
        assert_eq!(source.removals(), 1);
        assert_eq!(v.cached_tokens(), 1);
    }

    #[tokio::test]
    async fn a_full_token_cache_evicts_one_token_at_a_time_sparing_those_in_use() {
        let now = 1_000_000;
        let v = test_verifier(
            "jwt: { jwks_file: x, issuer: https://kc/realms/r, audience: mcp-server, token_cache_size: 3 }",
            Arc::new(move || now),
        );
        let token = |user: &str| {
            let mut c = claims(now);
            c["preferred_username"] = json!(user);
            mint(&pem("rsa-a"), Algorithm::RS256, "rsa-a", &c).unwrap()
        };
        let cached = |t: &str| {
            let digest: [u8; 32] = Sha256::digest(t.as_bytes()).into();
            v.cache.map.contains_key(&digest)
        };
        let [a, b, c, d] = ["a", "b", "c", "d"].map(token);
        for t in [&a, &b, &c] {
            v.authenticate(t).await.unwrap();
        }
        v.authenticate(&a).await.unwrap(); // a hit: a is in use
        v.authenticate(&d).await.unwrap();
        assert_eq!(v.cached_tokens(), 3, "full, not cleared");
        assert!(cached(&a) && !cached(&b) && cached(&c) && cached(&d));
        for i in 0..20 {
            v.authenticate(&token(&format!("u{i}"))).await.unwrap();
            assert_eq!(v.cached_tokens(), 3);
            assert_eq!(v.cache.order.lock().unwrap().len(), 3);
        }
    }

    #[tokio::test]
    async fn structural_attacks_are_refused() {
        let now = 1_000_000;
        let (v, _) = at(now);
        let good = mint(&pem("rsa-a"), Algorithm::RS256, "rsa-a", &claims(now)).unwrap();
        let parts: Vec<&str> = good.split('.').collect();
        let enc = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
        // alg none
        let none = format!(
            "{}.{}.",
            enc(&json!({"alg": "none", "kid": "rsa-a"})),
            parts[1]
        );
        assert_eq!(
            v.authenticate(&none).await.unwrap_err(),
            AuthnError::AlgNone
        );
        // signature from another key under a known kid
        let forged = mint(&pem("rsa-b"), Algorithm::RS256, "rsa-a", &claims(now)).unwrap();
        assert!(matches!(
            v.authenticate(&forged).await.unwrap_err(),
            AuthnError::BadSignature { .. }
        ));
        // tampered payload
        let mut c = claims(now);
        c["preferred_username"] = json!("admin");
        let tampered = format!("{}.{}.{}", parts[0], enc(&c), parts[2]);
        assert!(matches!(
            v.authenticate(&tampered).await.unwrap_err(),
            AuthnError::BadSignature { .. }
        ));
        // key/alg confusion: EC key id with an RSA signature
        let confused = mint(&pem("rsa-a"), Algorithm::RS256, "ec256", &claims(now)).unwrap();
        assert!(matches!(
            v.authenticate(&confused).await.unwrap_err(),
            AuthnError::KeyAlgorithmMismatch { .. }
        ));
    }
}
