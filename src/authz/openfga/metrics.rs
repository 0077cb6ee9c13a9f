//! OpenFGA HTTP calls as Prometheus metrics: every call the [`Transport`](super::transport)
//! sends, by API endpoint and outcome, with its latency per endpoint.
//!
//! Owns: [`RequestMetrics`], plain shareable prometheus-client data. It is built by whoever
//! builds the backends, handed to the client ([`OpenFgaClient::connect_observed`]) and
//! registered by telemetry, so this module never sees a registry and telemetry never sees a
//! call. Invariant: **every label value is one of the fixed strings below**, never a store
//! id, a path or a message from OpenFGA, so the number of series is bounded whatever
//! OpenFGA answers.
//!
//! [`OpenFgaClient::connect_observed`]: super::OpenFgaClient::connect_observed

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use super::transport::StatusClass;

/// Seconds: a local OpenFGA answers a check in about a millisecond; the top buckets catch a
/// slow datastore and the default 2 s timeout (`openfga.timeout`).
const LATENCY_BUCKETS: [f64; 14] = [
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The OpenFGA HTTP API operation a call is, named as OpenFGA names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Check,
    BatchCheck,
    ReadChanges,
    ReadAuthorizationModel,
    ReadAuthorizationModels,
    GetStore,
    ListStores,
    /// A path none of the above matches (none is sent today).
    Other,
}

impl Endpoint {
    /// The endpoint of a request path (`/stores/01J../check?x=1` is `check`): read from the
    /// path rather than passed by each caller, so no call can go uncounted or miscounted.
    pub fn of(path: &str) -> Self {
        let path = path.split('?').next().unwrap_or_default();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match segments.as_slice() {
            ["stores"] => Self::ListStores,
            ["stores", _] => Self::GetStore,
            ["stores", _, "check"] => Self::Check,
            ["stores", _, "batch-check"] => Self::BatchCheck,
            ["stores", _, "changes"] => Self::ReadChanges,
            ["stores", _, "authorization-models"] => Self::ReadAuthorizationModels,
            ["stores", _, "authorization-models", _] => Self::ReadAuthorizationModel,
            _ => Self::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Check => "check",
            Self::BatchCheck => "batch_check",
            Self::ReadChanges => "read_changes",
            Self::ReadAuthorizationModel => "read_authorization_model",
            Self::ReadAuthorizationModels => "read_authorization_models",
            Self::GetStore => "get_store",
            Self::ListStores => "list_stores",
            Self::Other => "other",
        }
    }
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx with a readable answer.
    Ok,
    /// No answer within `openfga.timeout`.
    Timeout,
    /// No connection (refused, unresolvable, TLS).
    ConnectError,
    /// The connection failed after it was made (reset, body cut short).
    TransportError,
    /// A 2xx whose body is not the JSON the API promises.
    InvalidResponse,
    /// A non-2xx status, as [`StatusClass`] reads it: 5xx, 429 or 408 (`unavailable`),
    /// 401 or 403 (`unauthorized`), any other (`rejected`).
    Status(StatusClass),
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Timeout => "timeout",
            Self::ConnectError => "connect_error",
            Self::TransportError => "transport_error",
            Self::InvalidResponse => "invalid_response",
            Self::Status(StatusClass::Unavailable) => "unavailable",
            Self::Status(StatusClass::Unauthorized) => "unauthorized",
            Self::Status(StatusClass::Rejected) => "rejected",
        }
    }

    /// A failed send, by what reqwest says happened.
    pub(super) fn of_send(e: &reqwest::Error) -> Self {
        if e.is_timeout() {
            Self::Timeout
        } else if e.is_connect() {
            Self::ConnectError
        } else {
            Self::TransportError
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub endpoint: &'static str,
}

type HistogramFamily = Family<EndpointLabel, Histogram, fn() -> Histogram>;

/// OpenFGA calls by endpoint and outcome, and their latency by endpoint. Clones share the
/// same series.
#[derive(Clone, Debug)]
pub struct RequestMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: HistogramFamily,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        fn histogram() -> Histogram {
            Histogram::new(LATENCY_BUCKETS)
        }
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(histogram),
        }
    }
}

impl RequestMetrics {
    /// One call: its endpoint, how it ended and how long it took (retry included).
    pub fn observe(&self, endpoint: Endpoint, outcome: Outcome, elapsed: Duration) {
        let endpoint = endpoint.as_str();
        self.requests
            .get_or_create(&RequestLabels {
                endpoint,
                outcome: outcome.as_str(),
            })
            .inc();
        self.duration
            .get_or_create(&EndpointLabel { endpoint })
            .observe(elapsed.as_secs_f64());
    }

    /// Calls counted for `endpoint` ending in `outcome` (tests).
    pub fn count(&self, endpoint: Endpoint, outcome: Outcome) -> u64 {
        self.requests
            .get(&RequestLabels {
                endpoint: endpoint.as_str(),
                outcome: outcome.as_str(),
            })
            .map_or(0, |c| c.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_api_path_is_its_endpoint_and_ids_never_become_labels() {
        let table = [
            ("/stores?page_size=100", "list_stores"),
            (
                "/stores?page_size=100&continuation_token=abc",
                "list_stores",
            ),
            ("/stores/01J9", "get_store"),
            ("/stores/01J9/check", "check"),
            ("/stores/01J9/batch-check", "batch_check"),
            ("/stores/01J9/changes?page_size=100", "read_changes"),
            (
                "/stores/01J9/authorization-models?page_size=1",
                "read_authorization_models",
            ),
            (
                "/stores/01J9/authorization-models/01HV",
                "read_authorization_model",
            ),
            ("/stores/01J9/expand", "other"),
            ("/healthz", "other"),
        ];
        for (path, endpoint) in table {
            assert_eq!(Endpoint::of(path).as_str(), endpoint, "{path}");
        }
    }

    #[test]
    fn a_call_is_counted_once_under_its_outcome_and_timed_under_its_endpoint() {
        let m = RequestMetrics::default();
        let shared = m.clone();
        m.observe(Endpoint::Check, Outcome::Ok, Duration::from_millis(2));
        m.observe(
            Endpoint::Check,
            Outcome::Status(StatusClass::Unavailable),
            Duration::from_millis(3),
        );
        assert_eq!(shared.count(Endpoint::Check, Outcome::Ok), 1);
        assert_eq!(
            shared.count(Endpoint::Check, Outcome::Status(StatusClass::Unavailable)),
            1
        );
        assert_eq!(shared.count(Endpoint::BatchCheck, Outcome::Ok), 0);
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("took", "Took", shared.duration.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("took_count{endpoint=\"check\"} 2\n"),
            "both calls timed under check:\n{text}"
        );
    }
}
