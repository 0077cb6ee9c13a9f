//! The outcome of a check and the one mapping from every failure to what the caller sees:
//! HTTP status, gRPC code, `error` code, reason and `WWW-Authenticate` challenge.
//!
//! # Error policy
//!
//! - Every error type classifies itself ([`FailureKind`]); [`answer`] is the one table from
//!   kind to HTTP status, gRPC code, `error` and challenge. Nothing else picks a status.
//! - A request that cannot be read, or can be read two ways, is a 400 `invalid_request` with a
//!   reason naming the problem: never a fall-through to a weaker rule, never a guess.
//! - No credentials: 401 with a bare `Bearer realm=..` challenge (RFC 6750 §3.1). Bad
//!   credentials: 401 `invalid_token` with the reason in the challenge. Genuine credentials of
//!   a principal that may not act: 403 `forbidden`; a missing scope: 403 `insufficient_scope`
//!   naming the scope.
//! - A backend that cannot answer (signing keys, API-key store, OpenFGA): 503 `unavailable`,
//!   so clients retry; a rule may fail open instead (`on_backend_error: allow`), which is an
//!   allow carrying the failure to the app, not a deny.
//! - The reason the client reads never names an internal address ([`Failure::public_reason`]);
//!   the log and `doctor` read the whole one ([`Deny::detail`]).
//! - A deny is built once, complete: the rule and principal it concerns and the CORS headers
//!   the check read ([`Context`]).

use std::sync::Arc;

use crate::authn::{AuthnError, Principal};
use crate::authz::AuthzError;
use crate::authz::rules::Refusal;
use crate::failure::FailureKind;
use crate::request::RequestError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow {
    pub principal: Option<Arc<Principal>>,
    pub rule: String,
    /// The backend failed and the rule allows failing open: carried to the app as a header.
    pub failed_open: Option<String>,
    /// Response headers for the browser (CORS).
    pub response_headers: Vec<(String, String)>,
    pub relations: Vec<String>,
    /// Answer the client here, with this HTTP status and `response_headers`, instead of
    /// forwarding the request: a CORS preflight never reaches the app (Envoy sends it as a
    /// local reply).
    pub local_reply: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deny {
    pub http_status: u16,
    pub grpc_code: tonic::Code,
    /// Machine-readable code: `invalid_token`, `insufficient_scope`, `forbidden`, ...
    pub error: &'static str,
    /// What the client reads (body, gRPC message, `WWW-Authenticate`): never an internal URL.
    pub reason: String,
    /// The whole reason, for the decision log and `doctor`: may name the JWKS, discovery or
    /// OpenFGA address.
    pub detail: String,
    pub www_authenticate: Option<String>,
    pub response_headers: Vec<(String, String)>,
    pub principal: Option<Arc<Principal>>,
    pub rule: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(Allow),
    Deny(Deny),
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self, Self::Allow(_))
    }
}

/// Everything that can stop a request.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Failure {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Authn(#[from] AuthnError),
    #[error(transparent)]
    Authz(#[from] AuthzError),
    #[error("CORS preflight from origin {0} is not allowed (CORS_ORIGINS)")]
    CorsOrigin(String),
    /// A value a rule reads could be read two ways (body, query, header).
    #[error(transparent)]
    Ambiguous(#[from] Refusal),
    /// One element of a JSON-RPC batch failed: the batch is answered as that element.
    #[error("JSON-RPC batch element {0}: {1}")]
    InBatch(usize, Box<Failure>),
}

impl Failure {
    /// How this failure is answered; a batch element's failure is answered as the element.
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::Request(e) => e.kind(),
            Self::Authn(e) => e.kind(),
            Self::Authz(e) => e.kind(),
            Self::CorsOrigin(_) => FailureKind::OriginRefused,
            Self::Ambiguous(e) => e.kind(),
            Self::InBatch(_, inner) => inner.kind(),
        }
    }

    /// The scope a rule required and the principal lacks (for the challenge).
    fn missing_scope(&self) -> Option<&str> {
        match self {
            Self::Authz(AuthzError::ScopeRequired(scope)) => Some(scope),
            _ => None,
        }
    }

    /// The reason the client reads. Authentication errors say it without their key source
    /// or expected issuer ([`AuthnError::public_reason`]); a backend error's cause is built
    /// from the backend's address (`OpenFGA at http://..: connection refused`), so its
    /// `http(s)://` addresses are replaced. The client's own text (a path, an origin) stays.
    pub fn public_reason(&self) -> String {
        match self {
            Self::Authn(e) => e.public_reason(),
            Self::Authz(
                e @ (AuthzError::BackendUnavailable(_) | AuthzError::BackendRejected(_)),
            ) => scrub_urls(&e.to_string()),
            Self::InBatch(i, inner) => {
                format!("JSON-RPC batch element {i}: {}", inner.public_reason())
            }
            other => other.to_string(),
        }
    }
}

/// Replaces every `http://` or `https://` address in `text` with `[internal]`.
pub fn scrub_urls(text: &str) -> String {
    // ASCII lower-casing keeps byte offsets, so positions found in `lower` index `text`.
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut pos = 0;
    while let Some(start) = ["http://", "https://"]
        .iter()
        .filter_map(|scheme| lower[pos..].find(scheme))
        .min()
        .map(|i| pos + i)
    {
        out.push_str(&text[pos..start]);
        let len = text[start..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`'))
            .unwrap_or(text.len() - start);
        // Punctuation that ends a sentence or a clause is not part of the address.
        let url = text[start..start + len].trim_end_matches([':', ',', '.', ';', ')']);
        out.push_str("[internal]");
        pos = start + url.len();
    }
    out.push_str(&text[pos..]);
    out
}

/// Quotes are not allowed inside an RFC 6750 auth-param; replace rather than escape, since
/// clients differ in how they unescape.
fn param(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c == '"' || c == '\\' || c.is_control() {
                '\''
            } else {
                c
            }
        })
        .collect()
}

/// Which `WWW-Authenticate` challenge a kind of failure carries (RFC 6750 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    None,
    /// `Bearer realm=".."`: no credentials were sent.
    Bare,
    /// `error="invalid_token"` with the reason.
    InvalidToken,
    /// `error="insufficient_scope"` with the reason and the scope.
    InsufficientScope,
}

/// The one table: what the caller sees for each kind of failure.
pub fn answer(kind: FailureKind) -> (u16, tonic::Code, &'static str, Challenge) {
    use tonic::Code;
    match kind {
        FailureKind::BadRequest => (
            400,
            Code::InvalidArgument,
            "invalid_request",
            Challenge::None,
        ),
        FailureKind::NoCredentials => (
            401,
            Code::Unauthenticated,
            "unauthenticated",
            Challenge::Bare,
        ),
        FailureKind::InvalidCredentials => (
            401,
            Code::Unauthenticated,
            "invalid_token",
            Challenge::InvalidToken,
        ),
        FailureKind::OriginRefused => (403, Code::PermissionDenied, "cors_origin", Challenge::None),
        FailureKind::Forbidden => (403, Code::PermissionDenied, "forbidden", Challenge::None),
        FailureKind::InsufficientScope => (
            403,
            Code::PermissionDenied,
            "insufficient_scope",
            Challenge::InsufficientScope,
        ),
        FailureKind::Unavailable => (503, Code::Unavailable, "unavailable", Challenge::None),
    }
}

/// What a deny concerns, known where the check stopped: the rule that governed, the principal
/// if one was authenticated, and the CORS headers for the browser.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub rule: Option<String>,
    pub principal: Option<Arc<Principal>>,
    pub response_headers: Vec<(String, String)>,
}

/// The one place failures become answers: a complete deny.
pub fn deny(failure: &Failure, realm: &str, context: Context) -> Deny {
    // A batch element's failure is answered as the element, with the element named in the
    // reason.
    if let Failure::InBatch(_, inner) = failure {
        return Deny {
            reason: failure.public_reason(),
            ..deny(inner, realm, context)
        };
    }
    let reason = failure.public_reason();
    let detail = failure.to_string();
    let (http_status, grpc_code, error, challenge) = answer(failure.kind());
    let www_authenticate = match challenge {
        Challenge::None => None,
        Challenge::Bare => Some(format!("Bearer realm=\"{}\"", param(realm))),
        Challenge::InvalidToken => Some(format!(
            "Bearer realm=\"{}\", error=\"invalid_token\", error_description=\"{}\"",
            param(realm),
            param(&reason)
        )),
        Challenge::InsufficientScope => Some(format!(
            "Bearer realm=\"{}\", error=\"insufficient_scope\", error_description=\"{}\", scope=\"{}\"",
            param(realm),
            param(&reason),
            param(failure.missing_scope().unwrap_or_default())
        )),
    };
    Deny {
        http_status,
        grpc_code,
        error,
        reason,
        detail,
        www_authenticate,
        response_headers: context.response_headers,
        principal: context.principal,
        rule: context.rule,
    }
}

/// [`deny`] for a failure met before anything else is known (no rule, principal or CORS).
pub fn deny_for(failure: &Failure, realm: &str) -> Deny {
    deny(failure, realm, Context::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let d = deny_for(&AuthnError::Expired { ago: 42 }.into(), "mcp");
        assert_eq!(
            (d.http_status, d.grpc_code),
            (401, tonic::Code::Unauthenticated)
        );
        assert_eq!(
            d.www_authenticate.unwrap(),
            "Bearer realm=\"mcp\", error=\"invalid_token\", error_description=\"token expired 42s ago\""
        );
        let d = deny_for(
            &AuthnError::Missing {
                api_key_header: "x-api-key".into(),
            }
            .into(),
            "mcp",
        );
        assert_eq!(d.www_authenticate.unwrap(), "Bearer realm=\"mcp\"");
        let d = deny_for(
            &AuthzError::ScopeRequired("execute:tools".into()).into(),
            "mcp",
        );
        assert_eq!((d.http_status, d.error), (403, "insufficient_scope"));
        assert!(
            d.www_authenticate
                .unwrap()
                .contains("scope=\"execute:tools\"")
        );
        let d = deny_for(
            &AuthzError::BackendUnavailable("connection refused".into()).into(),
            "r",
        );
        assert_eq!(
            (d.http_status, d.grpc_code),
            (503, tonic::Code::Unavailable)
        );
        let d = deny_for(
            &AuthnError::PrincipalDisabled { id: "svc".into() }.into(),
            "r",
        );
        assert_eq!(
            (d.http_status, d.reason.as_str()),
            (403, "service principal svc disabled")
        );
        let d = deny_for(
            &AuthnError::Malformed("a \"quoted\" thing".into()).into(),
            "r",
        );
        assert!(!d.www_authenticate.unwrap().contains("\"quoted\""));
    }

    /// The client reads a reason without internal addresses; the log and doctor read the
    /// whole one.
    #[test]
    fn client_facing_reasons_name_no_internal_url() {
        let jwks = "JWKS http://keycloak:8080/realms/r/protocol/openid-connect/certs";
        let cases: Vec<(Failure, &str)> = vec![
            (
                AuthnError::KeySourceUnavailable {
                    kid: "k".into(),
                    origin: jwks.into(),
                    cause: "connection refused".into(),
                }
                .into(),
                "signing key kid=k not found: the signing keys cannot be refreshed",
            ),
            (
                AuthnError::UnknownKid {
                    kid: "k".into(),
                    origin: jwks.into(),
                }
                .into(),
                "signing key kid=k not found",
            ),
            (
                AuthzError::BackendUnavailable(
                    "OpenFGA at http://openfga:8080: connection refused".into(),
                )
                .into(),
                "authorization backend unavailable: OpenFGA at [internal]: connection refused",
            ),
            (
                AuthzError::BackendRejected("HTTPS://fga.internal/stores/x, said no.".into())
                    .into(),
                "authorization backend rejected the check: [internal], said no.",
            ),
            (
                AuthnError::WrongIssuer {
                    got: "https://evil".into(),
                    want: "http://keycloak:8080/realms/r".into(),
                }
                .into(),
                "wrong issuer \"https://evil\"",
            ),
            (
                AuthnError::Expired { ago: 1 }.into(),
                "token expired 1s ago",
            ),
            (
                Failure::CorsOrigin("https://app.example".into()),
                "CORS preflight from origin https://app.example is not allowed (CORS_ORIGINS)",
            ),
        ];
        for (failure, public) in cases {
            let d = deny_for(&failure, "r");
            assert_eq!(d.reason, public);
            assert_eq!(d.detail, failure.to_string());
            if let Some(c) = &d.www_authenticate {
                assert!(!c.contains("http://"), "{c}");
            }
            assert!(!d.reason.contains("http://"), "{}", d.reason);
        }
    }

    /// A batch element's failure is answered as the element: with the element's public
    /// reason, not its whole one.
    #[test]
    fn a_batch_element_reason_names_no_internal_url() {
        let failure = Failure::InBatch(
            1,
            Box::new(
                AuthzError::BackendUnavailable(
                    "OpenFGA at http://openfga:8080: connection refused".into(),
                )
                .into(),
            ),
        );
        let d = deny_for(&failure, "r");
        assert_eq!(
            d.reason,
            "JSON-RPC batch element 1: authorization backend unavailable: OpenFGA at [internal]: connection refused"
        );
        assert_eq!((d.http_status, d.error), (503, "unavailable"));
    }

    #[test]
    fn scrub_urls_keeps_the_text_around() {
        for (text, want) in [
            ("no url here", "no url here"),
            ("at http://a:1/b: refused", "at [internal]: refused"),
            (
                "\"https://x/y\" and http://z.",
                "\"[internal]\" and [internal].",
            ),
            ("ends http://", "ends [internal]"),
            ("é http://ü/ä é", "é [internal] é"),
        ] {
            assert_eq!(scrub_urls(text), want, "{text}");
        }
    }
}
