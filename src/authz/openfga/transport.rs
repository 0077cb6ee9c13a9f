//! HTTP to OpenFGA: one call (bearer token, JSON body, one retry on a stale pooled
//! connection), the reading of error answers, and the one classification of a failed call.
//!
//! Owns: [`Transport`], [`CallError`] and [`StatusClass`]. Invariant: whether a failure is an
//! outage, a credential problem or a refusal of the question is decided here, from the
//! transport error or the HTTP status, never from message text; checks
//! ([`CallError::into_backend`]), the breaker behind them and startup
//! ([`CallError::into_startup`], [`OpenFgaError::is_transient`]) all read the same
//! [`StatusClass`].

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

use super::OpenFgaError;
use super::wire::ErrorBody;
use crate::authz::BackendError;
use crate::config::OpenFgaConfig;
use crate::http_client;

/// What a non-2xx status says about a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StatusClass {
    /// 5xx, 429 (overloaded) or 408 (too slow): OpenFGA cannot answer now and may later.
    /// A check fails as unavailable (the breaker counts it); startup retries.
    Unavailable,
    /// 401 or 403: OpenFGA refused the credentials (`OPENFGA_API_TOKEN`).
    Unauthorized,
    /// Any other status: the question itself was refused (an unknown type, relation or
    /// id); asking again gets the same answer.
    Rejected,
}

// === impl StatusClass ===

impl StatusClass {
    pub(super) fn of(status: u16) -> Self {
        match status {
            500..=599 | 429 | 408 => Self::Unavailable,
            401 | 403 => Self::Unauthorized,
            _ => Self::Rejected,
        }
    }
}

/// `401 Unauthorized`: the code and its reason phrase, as operators read it.
pub(super) fn status_text(status: u16) -> String {
    StatusCode::from_u16(status).map_or_else(|_| status.to_string(), |s| s.to_string())
}

/// Why one HTTP call failed.
#[derive(Debug, Clone)]
pub(super) enum CallError {
    /// Connect, timeout, or a body we could not read; already described.
    Transport(String),
    /// A non-2xx status with OpenFGA's code and message.
    Status {
        status: StatusCode,
        code: String,
        message: String,
    },
}

// === impl CallError ===

impl CallError {
    /// For a check: an outage (counts toward the breaker) or a refusal of the question.
    pub(super) fn into_backend(self, url: &str) -> BackendError {
        match self {
            Self::Transport(cause) => {
                BackendError::Unavailable(format!("OpenFGA at {url}: {cause}"))
            }
            Self::Status {
                status, message, ..
            } => match StatusClass::of(status.as_u16()) {
                StatusClass::Unavailable => {
                    BackendError::Unavailable(format!("OpenFGA at {url}: HTTP {status}: {message}"))
                }
                // A refused token is not an outage: the breaker must not hide it behind
                // "circuit open", and retrying cannot fix it.
                StatusClass::Unauthorized | StatusClass::Rejected => {
                    BackendError::Rejected(if message.is_empty() {
                        format!("OpenFGA answered HTTP {status}")
                    } else {
                        message
                    })
                }
            },
        }
    }

    /// For startup: the variable to look at.
    pub(super) fn into_startup(self, url: &str, what: &str) -> OpenFgaError {
        match self {
            Self::Transport(cause) => OpenFgaError::Unreachable {
                url: url.to_string(),
                cause,
            },
            Self::Status {
                status, message, ..
            } => match StatusClass::of(status.as_u16()) {
                StatusClass::Unauthorized => OpenFgaError::Unauthorized {
                    url: url.to_string(),
                    status: status.as_u16(),
                },
                StatusClass::Unavailable | StatusClass::Rejected => OpenFgaError::Http {
                    url: url.to_string(),
                    what: what.to_string(),
                    status: status.as_u16(),
                    message,
                },
            },
        }
    }

    pub(super) fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            Self::Transport(_) => None,
        }
    }

    /// OpenFGA's error code (`store_id_not_found`, `invalid_continuation_token`); `""` for
    /// a transport failure.
    pub(super) fn code(&self) -> &str {
        match self {
            Self::Status { code, .. } => code,
            Self::Transport(_) => "",
        }
    }

    /// For the log: the cause, with the status when there is one.
    pub(super) fn describe(&self) -> String {
        match self {
            Self::Status {
                status, message, ..
            } => format!("HTTP {status}: {message}"),
            Self::Transport(m) => m.clone(),
        }
    }
}

/// The HTTP side of the client, shared with the tasks that send batch chunks concurrently.
#[derive(Debug)]
pub(super) struct Transport {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    timeout: Duration,
}

// === impl Transport ===

impl Transport {
    pub(super) fn new(cfg: &OpenFgaConfig) -> Self {
        Self {
            http: http_client::client(cfg.timeout),
            base: cfg.api_url.trim_end_matches('/').to_string(),
            token: cfg.api_token.clone(),
            timeout: cfg.timeout,
        }
    }

    /// The API URL without a trailing slash, as errors and logs quote it.
    pub(super) fn base(&self) -> &str {
        &self.base
    }

    /// One call to OpenFGA. Inside a traced operation (a check) it gets an `openfga` client
    /// span (endpoint, store, status, outcome) and carries its `traceparent`, so OpenFGA's own
    /// spans join the trace; a call outside one (startup, the changelog poll) gets none, so
    /// a background poll is not a trace every second.
    pub(super) async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, CallError> {
        use tracing::Instrument as _;
        let span = if tracing::Span::current().is_none() {
            tracing::Span::none()
        } else {
            let (endpoint, store) = endpoint_of(path);
            tracing::info_span!(
                target: crate::tracing_export::TARGET,
                "openfga",
                otel.name = %format!("openfga {endpoint}"),
                otel.kind = "client",
                endpoint,
                store,
                http.request.method = %method,
                url.full = %format!("{}{}", self.base, path.split('?').next().unwrap_or(path)),
                status = tracing::field::Empty,
                outcome = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        };
        let result = self
            .call_untraced(method, path, body, &span)
            .instrument(span.clone())
            .await;
        if !span.is_disabled() {
            let outcome = match &result {
                Ok(_) => "ok",
                Err(CallError::Transport(_)) => "unavailable",
                Err(CallError::Status { status, .. }) => match StatusClass::of(status.as_u16()) {
                    StatusClass::Unavailable => "unavailable",
                    StatusClass::Unauthorized => "unauthorized",
                    StatusClass::Rejected => "rejected",
                },
            };
            span.record("outcome", outcome);
            if let Some(status) = result.as_ref().err().and_then(CallError::status) {
                span.record("status", status.as_u16());
            }
            if outcome != "ok" {
                span.record("otel.status_code", "error");
            }
        }
        result
    }

    async fn call_untraced<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        span: &tracing::Span,
    ) -> Result<T, CallError> {
        let body = body.map(bytes::Bytes::from);
        let trace_headers = crate::tracing_export::outgoing(span);
        let send = || {
            let mut req = self
                .http
                .request(method.clone(), format!("{}{path}", self.base));
            if let Some(token) = &self.token {
                req = req.bearer_auth(token);
            }
            for (name, value) in &trace_headers {
                req = req.header(name, value);
            }
            if let Some(body) = &body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone());
            }
            req.send()
        };
        let resp = match send().await {
            Ok(resp) => resp,
            // A pooled connection the server closed (it restarted, or an idle timeout raced
            // us) fails without a new connection being tried. Every call here only reads, so
            // one immediate retry on a fresh connection is safe; without it each pooled
            // connection costs a failed check (a denial) after every OpenFGA restart.
            Err(e) if e.is_request() && !e.is_connect() && !e.is_timeout() => send()
                .await
                .map_err(|e| CallError::Transport(http_client::describe(&e, self.timeout)))?,
            Err(e) => {
                return Err(CallError::Transport(http_client::describe(
                    &e,
                    self.timeout,
                )));
            }
        };
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| CallError::Transport(http_client::describe(&e, self.timeout)))?;
        if !status.is_success() {
            let body: ErrorBody = serde_json::from_slice(&bytes).unwrap_or_else(|_| ErrorBody {
                code: String::new(),
                message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            });
            return Err(CallError::Status {
                status,
                code: body.code,
                message: body.message,
            });
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| CallError::Transport(format!("unreadable answer to {path}: {e}")))
    }

    pub(super) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CallError> {
        self.call(Method::GET, path, None).await
    }
}

/// The API endpoint and store a call's path names, for its span: `/stores/S/check` is
/// (`check`, `S`), `/stores/S/authorization-models/M` (`authorization-models`, `S`),
/// `/stores/S` (`store`, `S`), `/stores` (`stores`, ``).
fn endpoint_of(path: &str) -> (&str, &str) {
    let path = path.split('?').next().unwrap_or(path);
    let mut parts = path.trim_start_matches('/').split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("stores"), Some(store), Some(endpoint)) => (endpoint, store),
        (Some("stores"), Some(store), None) => ("store", store),
        (Some(first), _, _) => (first, ""),
        (None, _, _) => ("", ""),
    }
}

/// Percent-encodes a query value (continuation tokens are base64 and may hold `+/=`).
pub(super) fn encode_query(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "http://fga:8080";

    fn status(s: u16, message: &str) -> CallError {
        CallError::Status {
            status: StatusCode::from_u16(s).unwrap(),
            code: "x".into(),
            message: message.into(),
        }
    }

    #[test]
    fn statuses_are_classified_by_code_not_by_message() {
        let table = [
            (500, StatusClass::Unavailable),
            (502, StatusClass::Unavailable),
            (503, StatusClass::Unavailable),
            (504, StatusClass::Unavailable),
            (599, StatusClass::Unavailable),
            (429, StatusClass::Unavailable),
            (408, StatusClass::Unavailable),
            (401, StatusClass::Unauthorized),
            (403, StatusClass::Unauthorized),
            (400, StatusClass::Rejected),
            (404, StatusClass::Rejected),
            (409, StatusClass::Rejected),
            (422, StatusClass::Rejected),
            (301, StatusClass::Rejected),
        ];
        for (code, class) in table {
            assert_eq!(StatusClass::of(code), class, "HTTP {code}");
        }
    }

    #[test]
    fn an_outage_is_unavailable_and_a_refusal_is_rejected() {
        let refused = CallError::Transport("connection refused".into()).into_backend(URL);
        assert_eq!(
            refused,
            BackendError::Unavailable("OpenFGA at http://fga:8080: connection refused".into())
        );
        assert_eq!(
            status(503, "down").into_backend(URL),
            BackendError::Unavailable(
                "OpenFGA at http://fga:8080: HTTP 503 Service Unavailable: down".into()
            )
        );
        assert!(matches!(
            status(429, "slow down").into_backend(URL),
            BackendError::Unavailable(_)
        ));
        assert_eq!(
            status(400, "invalid relation: relation 'tool#nope' not found").into_backend(URL),
            BackendError::Rejected("invalid relation: relation 'tool#nope' not found".into())
        );
        assert_eq!(
            status(403, "").into_backend(URL),
            BackendError::Rejected("OpenFGA answered HTTP 403 Forbidden".into())
        );
        // A message that reads like a server error does not make a refusal an outage.
        assert!(matches!(
            status(400, "HTTP 500 inside").into_backend(URL),
            BackendError::Rejected(_)
        ));
    }

    #[test]
    fn startup_errors_keep_the_status_and_only_outages_are_retried() {
        let e = status(401, "").into_startup(URL, "GET /stores");
        assert_eq!(
            e,
            OpenFgaError::Unauthorized {
                url: URL.into(),
                status: 401
            }
        );
        assert_eq!(
            e.to_string(),
            "OpenFGA at http://fga:8080 refused the credentials (401 Unauthorized): set OPENFGA_API_TOKEN to a token it accepts"
        );
        assert!(!e.is_transient());

        let e = status(503, "datastore down").into_startup(URL, "GET /stores");
        assert_eq!(
            e.to_string(),
            "OpenFGA at http://fga:8080 (OPENFGA_API_URL): GET /stores: HTTP 503 Service Unavailable: datastore down"
        );
        assert!(e.is_transient());
        assert!(
            status(429, "")
                .into_startup(URL, "GET /stores")
                .is_transient()
        );

        let e = status(400, "").into_startup(URL, "GET /stores/x");
        assert_eq!(
            e.to_string(),
            "OpenFGA at http://fga:8080 (OPENFGA_API_URL): GET /stores/x: HTTP 400 Bad Request"
        );
        assert!(!e.is_transient());
        // Whatever the message says.
        let e = status(400, "HTTP 500 from upstream").into_startup(URL, "GET /stores");
        assert!(!e.is_transient(), "{e}");
        assert_eq!(e.status(), Some(400));

        let e = CallError::Transport("connection refused".into()).into_startup(URL, "GET /stores");
        assert!(e.is_transient());
        assert_eq!(
            e.to_string(),
            "OpenFGA unreachable at http://fga:8080 (OPENFGA_API_URL): connection refused"
        );
    }

    #[test]
    fn spans_name_the_endpoint_and_the_store() {
        assert_eq!(endpoint_of("/stores/01S/check"), ("check", "01S"));
        assert_eq!(
            endpoint_of("/stores/01S/batch-check"),
            ("batch-check", "01S")
        );
        assert_eq!(
            endpoint_of("/stores/01S/changes?page_size=100&continuation_token=x"),
            ("changes", "01S")
        );
        assert_eq!(
            endpoint_of("/stores/01S/authorization-models/01M"),
            ("authorization-models", "01S")
        );
        assert_eq!(endpoint_of("/stores/01S"), ("store", "01S"));
        assert_eq!(endpoint_of("/stores?page_size=50"), ("stores", ""));
    }

    #[test]
    fn continuation_tokens_are_percent_encoded() {
        assert_eq!(encode_query("MDFN+/=="), "MDFN%2B%2F%3D%3D");
        assert_eq!(encode_query("a-b_c.d~e"), "a-b_c.d~e");
    }
}
