//! Distributed tracing: the W3C trace context a check continues and passes on, and the
//! OpenTelemetry export of the sidecar's spans (the check, authentication, each OpenFGA call,
//! each JWKS fetch).
//!
//! Owns: [`TARGET`] (the one target every such span is opened at), [`Carrier`] and
//! [`remote_parent`] (which incoming context a check continues), [`layer`] / [`shutdown`]
//! (the exporter's life), and [`outgoing`] (what an outgoing call carries).
//!
//! Invariant: **with no OTLP endpoint, tracing costs nothing that shows and changes no log
//! line.** No exporter, no thread, no task is made; the log's layer turns [`TARGET`] off
//! ([`LOG_DIRECTIVE`]), so with no other layer every `info_span!(target: TARGET, ..)` is a
//! callsite cached as disabled, its fields never evaluated, and no log line gets a span
//! prefix. With an endpoint the export layer enables exactly that target, whatever
//! `LOG_LEVEL` says, and still no log line changes.
//!
//! A check continues the caller's trace: Envoy's gRPC metadata first (Envoy sends it when its
//! own tracing is on), else the HTTP request's `traceparent` header. A malformed or ambiguous
//! one is ignored (the check starts a new trace), never an error: the caller's tracing is not
//! the sidecar's business to refuse.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::{OtlpProtocol, TracingConfig};

/// The target of every span the sidecar exports. Not a module path, so no `RUST_LOG`
/// directive for the crate's modules names it by accident.
pub const TARGET: &str = "authz_sidecar::span";

/// Added to the log's filter: the log never prints (nor prefixes lines with) these spans.
pub const LOG_DIRECTIVE: &str = "authz_sidecar::span=off";

/// The provider while exporting, for [`shutdown`].
static PROVIDER: Mutex<Option<SdkTracerProvider>> = Mutex::new(None);

/// Whether [`layer`] built an exporter (one relaxed load on the check path).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports spans.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The export layer for `cfg` (spans at [`TARGET`] only), or `None` when export is off: then
/// nothing at all is built. Call inside the tokio runtime (the gRPC exporter's channel is
/// driven by it).
pub fn layer<S>(
    cfg: Option<&TracingConfig>,
) -> Result<Option<impl tracing_subscriber::Layer<S> + use<S>>, String>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use opentelemetry_otlp::WithExportConfig;

    let Some(cfg) = cfg else {
        return Ok(None);
    };
    let exporter = match cfg.protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(&cfg.endpoint)
            .build(),
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(&cfg.endpoint)
            .build(),
    }
    .map_err(|e| format!("OTLP trace exporter for {}: {e}", cfg.endpoint))?;
    // Sampler (`OTEL_TRACES_SAMPLER`, default parent-based always-on), batch sizes and delays
    // (`OTEL_BSP_*`) and resource attributes (`OTEL_RESOURCE_ATTRIBUTES`) are the SDK's own
    // reading of the environment.
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(cfg.service_name.clone())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let layer = export_layer(&provider);
    *PROVIDER.lock().unwrap_or_else(|p| p.into_inner()) = Some(provider);
    EXPORTING.store(true, Ordering::Relaxed);
    Ok(Some(layer))
}

/// The layer that hands the spans at [`TARGET`], and nothing else, to `provider`.
pub fn export_layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S> + use<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    let only_ours =
        tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::TRACE);
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("authz-sidecar"))
        .with_filter(only_ours)
}

/// Sends the spans still buffered and stops the exporter; nothing when export is off. Called
/// once the server has drained, so the last checks' spans are not lost on shutdown. It
/// blocks until the export is done (at most the export timeout): call it off the async
/// runtime's worker threads (`spawn_blocking`).
pub fn shutdown() {
    let provider = PROVIDER.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(provider) = provider
        && let Err(e) = provider.shutdown()
    {
        tracing::warn!(error = %e, "trace export: spans not flushed at shutdown");
    }
}

/// One W3C trace-context carrier: a `traceparent` and the `tracestate` that goes with it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Carrier<'a> {
    pub traceparent: Option<&'a str>,
    pub tracestate: Option<&'a str>,
}

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent,
            "tracestate" => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

impl Carrier<'_> {
    /// The remote span this carrier names, if its `traceparent` is valid.
    fn span_context(&self) -> Option<SpanContext> {
        if !well_formed(self.traceparent?) {
            return None;
        }
        let cx = TraceContextPropagator::new().extract(self);
        let sc = cx.span().span_context().clone();
        (sc.is_valid() && sc.is_remote()).then_some(sc)
    }
}

/// The W3C `traceparent` shape, which the SDK's parser checks only loosely (it takes a
/// short trace id): `VV-<32 hex>-<16 hex>-FF`, lowercase, version `ff` invalid, and version
/// `00` exactly that long (a later version may append `-` fields). All-zero ids are the
/// parser's to refuse.
fn well_formed(traceparent: &str) -> bool {
    let b = traceparent.as_bytes();
    let hex = |s: &[u8]| {
        s.iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    b.len() >= 55
        && hex(&b[0..2])
        && &b[0..2] != b"ff"
        && b[2] == b'-'
        && hex(&b[3..35])
        && b[35] == b'-'
        && hex(&b[36..52])
        && b[52] == b'-'
        && hex(&b[53..55])
        && (b.len() == 55 || (&b[0..2] != b"00" && b[55] == b'-'))
}

/// The caller's span a check continues: the gRPC metadata's context when valid, else the
/// HTTP request's, else none (a new trace). Each `tracestate` stays with its `traceparent`.
pub fn remote_parent(grpc: Carrier<'_>, http: Carrier<'_>) -> Option<SpanContext> {
    grpc.span_context().or_else(|| http.span_context())
}

/// Makes `span` a child of `parent` (no-op for a disabled span or no parent). Call right
/// after creating the span, before it is entered.
pub fn set_parent(span: &tracing::Span, parent: Option<&SpanContext>) {
    if let Some(parent) = parent
        && !span.is_disabled()
    {
        let cx = Context::new().with_remote_span_context(parent.clone());
        // Fails only when no export layer is installed (then nothing is exported anyway).
        let _ = span.set_parent(cx);
    }
}

/// The trace a check belongs to, for its decision line: its span's trace when exporting,
/// else the caller's (so the line still joins Envoy's trace), else none.
pub fn trace_id(span: &tracing::Span, parent: Option<&SpanContext>) -> LogTraceId {
    if !span.is_disabled() {
        let id = span.context().span().span_context().trace_id();
        if id != TraceId::INVALID {
            return LogTraceId(Some(id));
        }
    }
    LogTraceId(parent.map(SpanContext::trace_id))
}

/// A trace id as the decision log writes it: 32 lowercase hex digits, or `-`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogTraceId(pub Option<TraceId>);

impl fmt::Display for LogTraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(id) => write!(f, "{id:032x}"),
            None => f.write_str("-"),
        }
    }
}

/// The headers an outgoing call made inside `span` carries (`traceparent`, and `tracestate`
/// when there is one), so the callee's spans join the trace. Empty for a disabled span: with
/// export off nothing is propagated.
pub fn outgoing(span: &tracing::Span) -> Vec<(String, String)> {
    if span.is_disabled() {
        return Vec::new();
    }
    let mut headers: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut headers);
    // The propagator writes what it validated; a value that could not be a header is still
    // dropped here rather than fail the call it rides on.
    headers
        .into_iter()
        .filter(|(_, v)| v.bytes().all(|b| (0x20..0x7f).contains(&b)))
        .collect()
}

/// For unit tests that install their own subscriber per thread (`set_default`): tracing
/// caches each callsite's interest across every live dispatcher, so with tests running in
/// parallel a span's callsite may be cached as "always" (another test exports it) and skip
/// this thread's filter, or as "never" and skip its exporter. A global subscriber that is
/// interested "sometimes" in everything keeps the cache undecided: every span asks the
/// dispatcher of its own thread. (A process has one subscriber: this is a test matter only.)
#[cfg(test)]
pub(crate) fn per_thread_subscribers() {
    use tracing::span::{Attributes, Id, Record};
    use tracing::subscriber::Interest;
    use tracing::{Event, Metadata};

    struct Undecided;
    impl tracing::Subscriber for Undecided {
        fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
            Interest::sometimes()
        }
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            false
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, _: &Event<'_>) {}
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing::subscriber::set_global_default(Undecided);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENVOY: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    const CLIENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn carrier(traceparent: &str) -> Carrier<'_> {
        Carrier {
            traceparent: Some(traceparent),
            tracestate: None,
        }
    }

    fn trace_of(sc: Option<SpanContext>) -> Option<String> {
        sc.map(|sc| format!("{:032x}", sc.trace_id()))
    }

    #[test]
    fn the_grpc_metadata_wins_over_the_request_header() {
        let parent = remote_parent(carrier(ENVOY), carrier(CLIENT)).unwrap();
        assert_eq!(
            format!("{:032x}", parent.trace_id()),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(format!("{:016x}", parent.span_id()), "b7ad6b7169203331");
        assert!(parent.is_sampled());
    }

    #[test]
    fn the_request_header_is_the_fallback() {
        assert_eq!(
            trace_of(remote_parent(Carrier::default(), carrier(CLIENT))).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }

    #[test]
    fn a_malformed_traceparent_is_ignored_never_an_error() {
        let malformed = [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nx: y",
            "00-xyz92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01é",
        ];
        for bad in malformed {
            assert_eq!(
                trace_of(remote_parent(carrier(bad), Carrier::default())),
                None,
                "{bad:?} is a new root"
            );
            assert_eq!(
                trace_of(remote_parent(carrier(bad), carrier(CLIENT))).as_deref(),
                Some("4bf92f3577b34da6a3ce929d0e0e4736"),
                "a malformed {bad:?} in the metadata leaves the header's"
            );
        }
    }

    #[test]
    fn a_later_version_may_carry_more_fields() {
        let v1 = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future";
        assert_eq!(
            trace_of(remote_parent(carrier(v1), Carrier::default())).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }

    #[test]
    fn the_tracestate_travels_with_its_own_traceparent() {
        let grpc = Carrier {
            traceparent: Some(ENVOY),
            tracestate: Some("envoy=1"),
        };
        let http = Carrier {
            traceparent: Some(CLIENT),
            tracestate: Some("client=2"),
        };
        let parent = remote_parent(grpc, http).unwrap();
        assert_eq!(parent.trace_state().header(), "envoy=1");
        let parent = remote_parent(Carrier::default(), http).unwrap();
        assert_eq!(parent.trace_state().header(), "client=2");
    }

    #[test]
    fn the_log_writes_a_trace_id_or_a_dash() {
        let parent = remote_parent(carrier(CLIENT), Carrier::default());
        let disabled = tracing::Span::none();
        assert_eq!(
            trace_id(&disabled, parent.as_ref()).to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "without export the caller's trace id still joins the line to its trace"
        );
        assert_eq!(trace_id(&disabled, None).to_string(), "-");
        assert!(
            outgoing(&disabled).is_empty(),
            "nothing propagated when off"
        );
    }
}
