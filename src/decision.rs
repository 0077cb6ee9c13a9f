//! The outcome of a check and the one mapping from every failure to what the caller sees:
//! HTTP status, gRPC code, `error` code, reason and `WWW-Authenticate` challenge.

use crate::authn::{AuthnError, Principal};
use crate::authz::AuthzError;
use crate::authz::rules::Refusal;
use crate::request::RequestError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow {
    pub principal: Option<Principal>,
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
    pub principal: Option<Principal>,
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

/// The one place failures become answers.
pub fn deny_for(failure: &Failure, realm: &str) -> Deny {
    let reason = failure.public_reason();
    let detail = failure.to_string();
    let (http_status, grpc_code, error, challenge) = match failure {
        Failure::Request(_) | Failure::Ambiguous(_) => {
            (400, tonic::Code::InvalidArgument, "invalid_request", None)
        }
        // Answered as the element, with the element named in the reason.
        Failure::InBatch(_, inner) => {
            return Deny {
                reason,
                ..deny_for(inner, realm)
            };
        }
        Failure::CorsOrigin(_) => (403, tonic::Code::PermissionDenied, "cors_origin", None),
        Failure::Authn(e) if e.is_unavailable() => {
            (503, tonic::Code::Unavailable, "unavailable", None)
        }
        Failure::Authn(e) if e.is_forbidden() => {
            (403, tonic::Code::PermissionDenied, "forbidden", None)
        }
        // RFC 6750 §3.1: a request without credentials gets a bare challenge.
        Failure::Authn(AuthnError::Missing { .. }) => (
            401,
            tonic::Code::Unauthenticated,
            "unauthenticated",
            Some(format!("Bearer realm=\"{}\"", param(realm))),
        ),
        Failure::Authn(_) => (
            401,
            tonic::Code::Unauthenticated,
            "invalid_token",
            Some(format!(
                "Bearer realm=\"{}\", error=\"invalid_token\", error_description=\"{}\"",
                param(realm),
                param(&reason)
            )),
        ),
        Failure::Authz(AuthzError::ScopeRequired(scope)) => (
            403,
            tonic::Code::PermissionDenied,
            "insufficient_scope",
            Some(format!(
                "Bearer realm=\"{}\", error=\"insufficient_scope\", error_description=\"{}\", scope=\"{}\"",
                param(realm),
                param(&reason),
                param(scope)
            )),
        ),
        Failure::Authz(e @ (AuthzError::BackendUnavailable(_) | AuthzError::NoChecker(_))) => {
            (503, tonic::Code::Unavailable, e.code(), None)
        }
        Failure::Authz(e) => (403, tonic::Code::PermissionDenied, e.code(), None),
    };
    Deny {
        http_status,
        grpc_code,
        error,
        reason,
        detail,
        www_authenticate: challenge,
        response_headers: Vec::new(),
        principal: None,
        rule: None,
    }
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
