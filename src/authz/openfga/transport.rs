//! HTTP to OpenFGA: one call (bearer token, JSON body, one retry on a stale pooled
//! connection), the reading of error answers, and the one classification of a failed call.
//!
//! Owns: [`Transport`], [`CallError`] and [`StatusClass`]. Invariant: whether a failure is an
//! outage, a credential problem or a refusal of the question is decided here, from the
//! transport error or the HTTP status, never from message text; checks
//! ([`CallError::into_backend`]), the breaker behind them and startup
//! ([`CallError::into_startup`], [`OpenFgaError::is_transient`]) all read the same
//! [`StatusClass`]. Every call is counted and timed here ([`RequestMetrics`]), the one
//! place all of them pass.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

use super::OpenFgaError;
use super::metrics::{Endpoint, Outcome, RequestMetrics};
use super::wire::ErrorBody;
use crate::authz::BackendError;
use crate::config::OpenFgaConfig;
use crate::http_client;

/// What a non-2xx status says about a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
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
    metrics: RequestMetrics,
}

// === impl Transport ===

impl Transport {
    pub(super) fn new(cfg: &OpenFgaConfig, metrics: RequestMetrics) -> Self {
        Self {
            http: http_client::client(cfg.timeout),
            base: cfg.api_url.trim_end_matches('/').to_string(),
            token: cfg.api_token.clone(),
            timeout: cfg.timeout,
            metrics,
        }
    }

    /// The API URL without a trailing slash, as errors and logs quote it.
    pub(super) fn base(&self) -> &str {
        &self.base
    }

    /// One call to OpenFGA, counted by endpoint and outcome and timed (the stale-connection
    /// retry included: it is part of what the caller waited for). Inside a traced operation
    /// (a check) it also gets an `openfga` client span (endpoint, store, status, outcome) and
    /// carries its `traceparent`, so OpenFGA's own spans join the trace; a call outside one
    /// (startup, the changelog poll) gets none, so a background poll is not a trace every
    /// second.
    pub(super) async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, CallError> {
        use tracing::Instrument as _;
        let endpoint = Endpoint::of(path);
        let span = if tracing::Span::current().is_none() {
            tracing::Span::none()
        } else {
            tracing::info_span!(
                target: crate::tracing_export::TARGET,
                "openfga",
                otel.name = %format!("openfga {}", endpoint.as_str()),
                otel.kind = "client",
                endpoint = endpoint.as_str(),
                store = store_of(path),
                http.request.method = %method,
                url.full = %format!("{}{}", self.base, path.split('?').next().unwrap_or(path)),
                status = tracing::field::Empty,
                outcome = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        };
        let started = Instant::now();
        let (result, outcome) = self
            .exchange(method, path, body, &span)
            .instrument(span.clone())
            .await;
        self.metrics.observe(endpoint, outcome, started.elapsed());
        if !span.is_disabled() {
            span.record("outcome", outcome.as_str());
            if let Some(status) = result.as_ref().err().and_then(CallError::status) {
                span.record("status", status.as_u16());
            }
            if outcome != Outcome::Ok {
                span.record("otel.status_code", "error");
            }
        }
        result
    }

    /// The call itself, and how it ended for the metrics and the span (a transport
    /// failure's kind is not kept in its [`CallError`], which only describes it).
    async fn exchange<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        span: &tracing::Span,
    ) -> (Result<T, CallError>, Outcome) {
        let failed = |e: &reqwest::Error| {
            (
                Err(CallError::Transport(http_client::describe(e, self.timeout))),
                Outcome::of_send(e),
            )
        };
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
            Err(e) if e.is_request() && !e.is_connect() && !e.is_timeout() => match send().await {
                Ok(resp) => resp,
                Err(e) => return failed(&e),
            },
            Err(e) => return failed(&e),
        };
        let status = resp.status();
        let bytes = match resp.bytes().await {
            Ok(bytes) => bytes,
            Err(e) => return failed(&e),
        };
        if !status.is_success() {
            let body: ErrorBody = serde_json::from_slice(&bytes).unwrap_or_else(|_| ErrorBody {
                code: String::new(),
                message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            });
            let outcome = Outcome::Status(StatusClass::of(status.as_u16()));
            let error = CallError::Status {
                status,
                code: body.code,
                message: body.message,
            };
            return (Err(error), outcome);
        }
        match serde_json::from_slice(&bytes) {
            Ok(answer) => (Ok(answer), Outcome::Ok),
            Err(e) => (
                Err(CallError::Transport(format!(
                    "unreadable answer to {path}: {e}"
                ))),
                Outcome::InvalidResponse,
            ),
        }
    }

    pub(super) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CallError> {
        self.call(Method::GET, path, None).await
    }
}

/// The store a call's path names, for its span: `/stores/S/check` and `/stores/S` name `S`;
/// `/stores` names none.
fn store_of(path: &str) -> &str {
    let path = path.split('?').next().unwrap_or(path);
    let mut parts = path.trim_start_matches('/').split('/');
    match (parts.next(), parts.next()) {
        (Some("stores"), Some(store)) => store,
        _ => "",
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

    fn transport_to(url: &str, metrics: RequestMetrics) -> Transport {
        let env = [
            ("OPENFGA_API_URL".to_string(), url.to_string()),
            ("OPENFGA_STORE_ID".to_string(), "s".to_string()),
        ];
        let config = crate::Config::from_yaml(
            "jwt: { jwks_file: k }\nopenfga: { timeout: 300ms }\n",
            std::path::Path::new("/"),
            &env.into_iter()
                .collect::<std::collections::BTreeMap<_, _>>(),
        )
        .unwrap();
        Transport::new(&config.openfga.unwrap(), metrics)
    }

    /// Each way a call can end is counted once, under its endpoint and its own outcome.
    #[tokio::test]
    async fn every_call_is_counted_under_its_endpoint_and_outcome() {
        use axum::http::StatusCode as Code;
        use axum::routing::post;
        let app = axum::Router::new()
            .route("/stores/ok/check", post(|| async { r#"{"allowed":true}"# }))
            .route("/stores/garbled/check", post(|| async { "<html>" }))
            .route(
                "/stores/down/check",
                post(|| async { (Code::SERVICE_UNAVAILABLE, "{}") }),
            )
            .route(
                "/stores/refused/check",
                post(|| async { (Code::FORBIDDEN, "{}") }),
            )
            .route(
                "/stores/bad/batch-check",
                post(|| async { (Code::BAD_REQUEST, r#"{"code":"validation_error"}"#) }),
            )
            .route(
                "/stores/slow/check",
                post(|| async {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    "{}"
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let metrics = RequestMetrics::default();
        let t = transport_to(&url, metrics.clone());
        let call = |path: &'static str| {
            let t = &t;
            async move {
                t.call::<serde_json::Value>(Method::POST, path, Some(b"{}".to_vec()))
                    .await
            }
        };
        assert!(call("/stores/ok/check").await.is_ok());
        for path in [
            "/stores/garbled/check",
            "/stores/down/check",
            "/stores/refused/check",
            "/stores/bad/batch-check",
            "/stores/slow/check",
        ] {
            assert!(call(path).await.is_err(), "{path}");
        }
        server.abort();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let nobody = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let unreachable = transport_to(&nobody, metrics.clone());
        let _ = unreachable.get::<serde_json::Value>("/stores/s").await;

        use Endpoint::{BatchCheck, Check, GetStore};
        for (endpoint, outcome) in [
            (Check, Outcome::Ok),
            (Check, Outcome::InvalidResponse),
            (Check, Outcome::Status(StatusClass::Unavailable)),
            (Check, Outcome::Status(StatusClass::Unauthorized)),
            (BatchCheck, Outcome::Status(StatusClass::Rejected)),
            (Check, Outcome::Timeout),
            (GetStore, Outcome::ConnectError),
        ] {
            assert_eq!(
                metrics.count(endpoint, outcome),
                1,
                "{} {}",
                endpoint.as_str(),
                outcome.as_str()
            );
        }
        assert_eq!(metrics.count(Check, Outcome::TransportError), 0);
    }

    #[test]
    fn spans_name_the_store() {
        assert_eq!(store_of("/stores/01S/check"), "01S");
        assert_eq!(
            store_of("/stores/01S/changes?page_size=100&continuation_token=x"),
            "01S"
        );
        assert_eq!(store_of("/stores/01S/authorization-models/01M"), "01S");
        assert_eq!(store_of("/stores/01S"), "01S");
        assert_eq!(store_of("/stores?page_size=50"), "");
    }

    #[test]
    fn continuation_tokens_are_percent_encoded() {
        assert_eq!(encode_query("MDFN+/=="), "MDFN%2B%2F%3D%3D");
        assert_eq!(encode_query("a-b_c.d~e"), "a-b_c.d~e");
    }
}
