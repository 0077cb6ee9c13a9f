//! Authentication: who is calling. Owns the [`Principal`], the credential extraction from the
//! request (bearer token or API key) and the error a failed authentication produces.
//!
//! Backends live behind traits in the submodules: [`jwks::KeySource`] for signing keys and
//! [`api_key::ApiKeyStore`] for API keys, so tests and future backends swap in.

pub mod api_key;
pub mod api_key_exchange;
pub mod jwks;
pub mod jwt;
pub mod principals;

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::failure::FailureKind;
use crate::request::{CheckInput, RequestError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrincipalKind {
    User,
    ServicePrincipal,
}

impl PrincipalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::ServicePrincipal => "service_principal",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Jwt,
    ApiKey,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jwt => "jwt",
            Self::ApiKey => "api_key",
        }
    }
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub kind: PrincipalKind,
    /// Username for users, client id for service principals.
    pub id: String,
    /// OpenFGA subject: `user:alice`, `service_principal:svc-reporter`.
    pub subject: String,
    pub username: String,
    pub roles: Vec<String>,
    pub scopes: Vec<String>,
    /// Keycloak group paths (`/acme`).
    pub groups: Vec<String>,
    pub method: AuthMethod,
    /// Signing key id (JWT) or API key record id: safe to log and forward.
    pub key_id: String,
    /// Short SHA-256 of the credential, for correlating logs without the secret.
    pub credential_hash: String,
}

impl Principal {
    pub fn new(kind: PrincipalKind, id: &str, method: AuthMethod) -> Self {
        Self {
            kind,
            id: id.to_string(),
            subject: format!("{}:{id}", kind.as_str()),
            username: id.to_string(),
            roles: Vec::new(),
            scopes: Vec::new(),
            groups: Vec::new(),
            method,
            key_id: String::new(),
            credential_hash: String::new(),
        }
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

/// Everything that makes authentication fail. The text is the reason a user reads, in the deny
/// body, the log and `doctor`; it never contains a token or a key.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthnError {
    #[error("no credentials: send Authorization: Bearer <token> or an API key in {api_key_header}")]
    Missing { api_key_header: String },
    #[error("Authorization header is not a Bearer token")]
    NotBearer,
    #[error("empty bearer token")]
    EmptyBearer,
    #[error("two Authorization headers (or two bearer tokens in one)")]
    DuplicateAuthorization,
    #[error("{0}")]
    BadHeader(String),
    #[error("both a bearer token and an API key were sent: send one")]
    BothCredentials,
    #[error("bearer tokens are not accepted here: no JWT key source is configured")]
    JwtNotConfigured,
    #[error("API keys are not accepted here: no API key file is configured")]
    ApiKeysNotConfigured,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token too large: {size} bytes (limit {limit})")]
    TooLarge { size: usize, limit: usize },
    #[error("algorithm none is never accepted")]
    AlgNone,
    #[error("algorithm {alg} not allowed (allowed: {allowed})")]
    AlgorithmNotAllowed { alg: String, allowed: String },
    #[error("token header has no kid")]
    MissingKid,
    #[error("signing key kid={kid} not found in {origin}")]
    UnknownKid { kid: String, origin: String },
    #[error("signing key kid={kid} not found: cannot refresh keys from {origin}: {cause}")]
    KeySourceUnavailable {
        kid: String,
        origin: String,
        cause: String,
    },
    #[error("no signing keys loaded yet from {origin}: {cause}")]
    NoKeys { origin: String, cause: String },
    #[error("signing key kid={kid} is for {key_alg}, token says {alg}")]
    KeyAlgorithmMismatch {
        kid: String,
        key_alg: String,
        alg: String,
    },
    #[error("signature verification failed (kid={kid}): wrong public key or tampered token")]
    BadSignature { kid: String },
    #[error("token expired {ago}s ago")]
    Expired { ago: u64 },
    #[error("token not valid yet: nbf is {in_secs}s in the future")]
    NotYetValid { in_secs: u64 },
    #[error("token issued in the future: iat is {in_secs}s ahead")]
    IssuedInFuture { in_secs: u64 },
    #[error(
        "token typ {got:?} is not accepted: want {want} (an ID or refresh token is not an access token)"
    )]
    WrongTokenType { got: String, want: String },
    #[error("wrong issuer {got:?}: expected {want:?}")]
    WrongIssuer { got: String, want: String },
    #[error("wrong audience {got}: expected {want:?}")]
    WrongAudience { got: String, want: String },
    #[error("missing claim {0}")]
    MissingClaim(String),
    #[error("invalid claim {claim}: {why}")]
    InvalidClaim { claim: String, why: String },
    #[error("invalid API key")]
    ApiKeyUnknown,
    #[error("API key inactive (id={id})")]
    ApiKeyInactive { id: String },
    #[error("API key expired (id={id}, {ago}s ago)")]
    ApiKeyExpired { id: String, ago: u64 },
    #[error("API key store unavailable: {0}")]
    ApiKeyStoreUnavailable(String),
    /// The app's key service answered 401: the key is invalid, expired or revoked.
    #[error("API key rejected by the key service")]
    ApiKeyRejected,
    /// The key service answered 400: the key did not reach it.
    #[error("the key service received no API key (HTTP 400)")]
    ApiKeyNotReceived,
    /// The key service issued a token that does not pass the bearer-token checks.
    #[error("token from the key service does not verify: {0}")]
    ExchangedTokenInvalid(Box<AuthnError>),
    #[error("service principal {id} disabled")]
    PrincipalDisabled { id: String },
    #[error("service principal {id} is not listed in principals.service_principals")]
    PrincipalNotListed { id: String },
}

impl AuthnError {
    /// The reason the client reads. The [`Display`](std::fmt::Display) text goes to the log
    /// and `doctor` and may name where the signing keys come from (a JWKS or discovery URL)
    /// or the expected issuer, both possibly internal to the deployment; this one never does.
    pub fn public_reason(&self) -> String {
        match self {
            Self::UnknownKid { kid, .. } => format!("signing key kid={kid} not found"),
            Self::KeySourceUnavailable { kid, .. } => {
                format!("signing key kid={kid} not found: the signing keys cannot be refreshed")
            }
            Self::NoKeys { .. } => "no signing keys loaded yet".into(),
            // The expected issuer may be an in-cluster Keycloak address.
            Self::WrongIssuer { got, .. } => format!("wrong issuer {got:?}"),
            Self::ApiKeyStoreUnavailable(_) => "API key verification unavailable".into(),
            Self::ExchangedTokenInvalid(inner) => format!(
                "token from the key service does not verify: {}",
                inner.public_reason()
            ),
            other => other.to_string(),
        }
    }

    /// 403 rather than 401: the credentials are genuine, the principal may not act.
    pub fn is_forbidden(&self) -> bool {
        matches!(
            self,
            Self::PrincipalDisabled { .. } | Self::PrincipalNotListed { .. }
        )
    }

    /// A backend problem rather than a bad credential: 503, so clients retry.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::ApiKeyStoreUnavailable(_) | Self::NoKeys { .. } => true,
            Self::ExchangedTokenInvalid(inner) => inner.is_unavailable(),
            _ => false,
        }
    }

    /// How this failure is answered ([`crate::decision`] maps kinds to statuses).
    pub fn kind(&self) -> FailureKind {
        if self.is_forbidden() {
            FailureKind::Forbidden
        } else if self.is_unavailable() {
            FailureKind::Unavailable
        } else if matches!(self, Self::Missing { .. }) {
            FailureKind::NoCredentials
        } else {
            FailureKind::InvalidCredentials
        }
    }
}

impl From<RequestError> for AuthnError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::DuplicateHeader(h) if h == "authorization" => {
                Self::DuplicateAuthorization
            }
            other => Self::BadHeader(other.to_string()),
        }
    }
}

/// Short, non-reversible fingerprint of a secret for logs: 12 hex chars of SHA-256.
pub fn fingerprint(secret: &str) -> String {
    fingerprint_of_digest(&Sha256::digest(secret.as_bytes()).into())
}

/// [`fingerprint`] from the secret's SHA-256, for a caller that has it already.
pub fn fingerprint_of_digest(sha256: &[u8; 32]) -> String {
    hex::encode(&sha256[..6])
}

/// Header names other gateways read API keys from (Kong's key-auth: `apikey`), besides the
/// configured one. The app behind may read any of them, so all are kept from it.
pub const API_KEY_HEADER_ALIASES: [&str; 2] = ["x-api-key", "apikey"];

/// The credential headers to remove from the request the app receives, on every allow: the
/// configured API-key header (unless `api_keys.forward_to_app`) and every alias of it. An
/// alias is removed even when forwarding, so the app only ever sees the key that was checked.
pub fn api_key_headers_to_strip(cfg: &crate::config::ApiKeyHeaderConfig) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    if !cfg.forward_to_app {
        out.push(cfg.name.clone());
    }
    for alias in API_KEY_HEADER_ALIASES {
        if alias != cfg.name && !out.iter().any(|h| h == alias) {
            out.push(alias.to_string());
        }
    }
    out
}

/// Picks the credential from the request and verifies it.
pub struct Authenticator {
    pub jwt: Option<jwt::JwtVerifier>,
    pub api_keys: Option<Arc<dyn api_key::ApiKeyStore>>,
    pub api_key_header: String,
    pub principals: principals::Principals,
    /// Removed from the upstream request on allow ([`api_key_headers_to_strip`]).
    pub strip_from_upstream: Vec<String>,
}

impl Authenticator {
    /// The caller, verified; inside an `authenticate` span (credential kind, subject, outcome)
    /// when spans are exported ([`crate::tracing_export`]).
    ///
    /// The principal is shared: a bearer token's is the token cache's own (a cache hit copies
    /// no string), so nothing downstream may change it.
    pub async fn authenticate(&self, input: &CheckInput) -> Result<Arc<Principal>, AuthnError> {
        use tracing::Instrument as _;
        let span = tracing::info_span!(
            target: crate::tracing_export::TARGET,
            "authenticate",
            credential = tracing::field::Empty,
            subject = tracing::field::Empty,
            outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let result = self.verify(input).instrument(span.clone()).await;
        if !span.is_disabled() {
            match &result {
                Ok(p) => {
                    span.record("credential", p.method.as_str());
                    span.record("subject", p.subject.as_str());
                    span.record("outcome", "ok");
                }
                Err(e) => {
                    span.record("outcome", tracing::field::display(e));
                    // A refused credential is an answer; a key source that cannot answer
                    // is the failure.
                    if e.kind() == FailureKind::Unavailable {
                        span.record("otel.status_code", "error");
                    }
                }
            }
        }
        result
    }

    async fn verify(&self, input: &CheckInput) -> Result<Arc<Principal>, AuthnError> {
        let authorization = input.headers.single("authorization")?;
        let api_key = input.headers.single(&self.api_key_header)?;
        let principal = match (authorization, api_key) {
            (Some(_), Some(_)) => return Err(AuthnError::BothCredentials),
            (Some(value), None) => {
                let token = bearer_token(value)?;
                let verifier = self.jwt.as_ref().ok_or(AuthnError::JwtNotConfigured)?;
                verifier.authenticate(token).await?
            }
            (None, Some(key)) => {
                let store = self
                    .api_keys
                    .as_ref()
                    .ok_or(AuthnError::ApiKeysNotConfigured)?;
                store
                    .authenticate_with(key.trim(), self.jwt.as_ref())
                    .await?
            }
            (None, None) => {
                return Err(AuthnError::Missing {
                    api_key_header: self.api_key_header.clone(),
                });
            }
        };
        self.principals.admit(principal)
    }
}

/// `Bearer <token>` per RFC 6750 (scheme case-insensitive). Envoy joins repeated headers with
/// a comma, so a comma means two Authorization headers.
pub fn bearer_token(value: &str) -> Result<&str, AuthnError> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthnError::NotBearer);
    }
    let token = rest.trim();
    if token.is_empty() {
        return Err(AuthnError::EmptyBearer);
    }
    if is_plain_token(token) {
        return Ok(token);
    }
    if token.contains(',') {
        return Err(AuthnError::DuplicateAuthorization);
    }
    if contains_whitespace(token) {
        return Err(AuthnError::Malformed("token contains whitespace".into()));
    }
    Ok(token)
}

/// No comma and no whitespace, from the bytes alone: every byte is printable ASCII other than
/// the space (`!` to `~`) and none is a comma. That is every well-formed token (base64url and
/// dots), so the checks below, which say which rule a token breaks, only run for the rest.
/// One pass over a ~1 KiB token without an early exit, which the compiler turns into vector
/// compares: a fraction of the two scans it stands in for.
fn is_plain_token(token: &str) -> bool {
    let odd = token.bytes().fold(false, |odd, b| {
        odd | !(b'!'..=b'~').contains(&b) | (b == b',')
    });
    !odd
}

/// `s.contains(char::is_whitespace)`, by bytes when `s` is ASCII (any JWT is: base64url and
/// dots), which costs a fifth of decoding a ~1 KiB token `char` by `char`. The ASCII
/// whitespace `char::is_whitespace` knows is `u8::is_ascii_whitespace` plus vertical tab.
fn contains_whitespace(s: &str) -> bool {
    if s.is_ascii() {
        s.bytes().any(|b| b.is_ascii_whitespace() || b == 0x0b)
    } else {
        s.contains(char::is_whitespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_token("Bearer abc").unwrap(), "abc");
        assert_eq!(bearer_token("bearer   abc ").unwrap(), "abc");
        assert_eq!(bearer_token("Basic abc"), Err(AuthnError::NotBearer));
        assert_eq!(bearer_token("Bearer"), Err(AuthnError::EmptyBearer));
        assert_eq!(bearer_token("Bearer  "), Err(AuthnError::EmptyBearer));
        assert_eq!(
            bearer_token("Bearer a,Bearer b"),
            Err(AuthnError::DuplicateAuthorization)
        );
    }

    #[test]
    fn whitespace_anywhere_in_a_token_is_refused_ascii_or_not() {
        for ws in [
            '\t', '\n', '\u{b}', '\u{c}', '\r', '\u{85}', '\u{a0}', '\u{2028}', '\u{3000}',
        ] {
            let value = format!("Bearer ab{ws}cd");
            assert_eq!(
                bearer_token(&value),
                Err(AuthnError::Malformed("token contains whitespace".into())),
                "{ws:?}"
            );
        }
        assert_eq!(bearer_token("Bearer ab\u{e9}cd"), Ok("ab\u{e9}cd"));
        // Every char the standard library calls whitespace, and no other, in the first 0x3100.
        for c in (0..0x3100u32).filter_map(char::from_u32) {
            assert_eq!(
                contains_whitespace(&format!("a{c}b")),
                c.is_whitespace(),
                "{c:?}"
            );
        }
    }

    /// The byte check only ever skips checks that would have passed: for every character, a
    /// token it calls plain has no comma and no whitespace; and a JWT is plain.
    #[test]
    fn the_plain_token_shortcut_skips_only_checks_that_pass() {
        for c in (0..=0x10_ffff_u32).filter_map(char::from_u32) {
            let token = format!("a{c}b");
            if is_plain_token(&token) {
                assert!(
                    !token.contains(',') && !contains_whitespace(&token),
                    "{c:?}"
                );
            }
        }
        assert!(is_plain_token(
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln-_~+/="
        ));
        assert!(!is_plain_token("a,b") && !is_plain_token("a\u{7f}") && !is_plain_token("\u{e9}"));
    }

    #[test]
    fn api_key_headers_never_reach_the_app_unless_forwarded() {
        use crate::config::ApiKeyHeaderConfig;
        let cfg = |name: &str, forward_to_app| ApiKeyHeaderConfig {
            name: name.into(),
            forward_to_app,
        };
        for (config, want) in [
            (cfg("x-api-key", false), vec!["x-api-key", "apikey"]),
            (cfg("x-api-key", true), vec!["apikey"]),
            (cfg("apikey", false), vec!["apikey", "x-api-key"]),
            (cfg("apikey", true), vec!["x-api-key"]),
            (cfg("x-key", false), vec!["x-key", "x-api-key", "apikey"]),
            (cfg("x-key", true), vec!["x-api-key", "apikey"]),
        ] {
            assert_eq!(api_key_headers_to_strip(&config), want, "{config:?}");
        }
    }

    #[test]
    fn public_reasons_never_name_the_key_source() {
        let origin = "JWKS http://keycloak.internal:8080/realms/r/protocol/openid-connect/certs";
        for (e, public) in [
            (
                AuthnError::UnknownKid {
                    kid: "k1".into(),
                    origin: origin.into(),
                },
                "signing key kid=k1 not found",
            ),
            (
                AuthnError::KeySourceUnavailable {
                    kid: "k1".into(),
                    origin: origin.into(),
                    cause: "connection refused".into(),
                },
                "signing key kid=k1 not found: the signing keys cannot be refreshed",
            ),
            (
                AuthnError::NoKeys {
                    origin: origin.into(),
                    cause: "HTTP 404".into(),
                },
                "no signing keys loaded yet",
            ),
            (AuthnError::Expired { ago: 3 }, "token expired 3s ago"),
        ] {
            assert_eq!(e.public_reason(), public);
            if e.to_string() != public {
                assert!(e.to_string().contains(origin), "the detail keeps it: {e}");
            }
        }
    }

    #[test]
    fn fingerprint_is_short_and_stable() {
        assert_eq!(fingerprint("secret"), fingerprint("secret"));
        assert_eq!(fingerprint("secret").len(), 12);
        assert_ne!(fingerprint("secret"), fingerprint("secret2"));
    }
}
