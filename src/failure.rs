//! The ways a check can fail, as every error type classifies itself ([`FailureKind`]). The
//! kinds are plain data at the bottom of the crate so `request`, `authn` and `authz` can
//! name them; what each kind becomes for the caller (HTTP status, gRPC code, `error`,
//! challenge) is decided once, in [`crate::decision`].

/// How a failure is answered. Each error type says which kind it is (`kind()` on
/// `RequestError`, `Refusal`, `AuthnError`, `AuthzError`); `decision::answer` maps kinds to
/// what the caller sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The request cannot be read, or can be read two ways.
    BadRequest,
    /// No credentials were sent (RFC 6750 §3.1: a bare challenge, no error code).
    NoCredentials,
    /// Credentials were sent and are not valid (bad, expired, unknown, not accepted here).
    InvalidCredentials,
    /// A CORS preflight from an origin that is not allowed.
    OriginRefused,
    /// The caller is known and may not do this.
    Forbidden,
    /// The caller is known and lacks a scope the rule requires (RFC 6750 `insufficient_scope`).
    InsufficientScope,
    /// A backend needed to decide could not answer: retry later.
    Unavailable,
}
