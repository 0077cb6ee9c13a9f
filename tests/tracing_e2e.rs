//! Tracing end to end, against a real Jaeger: a request with a known `traceparent` goes
//! through real Envoy to the sidecar binary (exporting OTLP/HTTP) and on to a real OpenFGA
//! with its own tracing on, and shows up in Jaeger as ONE trace (that id) holding the
//! sidecar's check, authentication and OpenFGA-call spans and OpenFGA's own spans. A second
//! sidecar, exporting OTLP/gRPC, is called straight over gRPC with one context in the gRPC
//! metadata and another in the HTTP headers, and continues the metadata's. Both sidecars hold
//! their spans until shutdown (batch delay 10 min), so finding them proves the flush on
//! SIGTERM. Through a second Envoy with its own OpenTelemetry tracing on, the check continues
//! Envoy's ext_authz span (the gRPC metadata), not the caller's. One test: Jaeger, OpenFGA
//! and the Envoys start once.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use authz_sidecar::proto::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use common::envoy::Envoy;
use common::jaeger::{Jaeger, Trace};
use common::openfga::OpenFga;
use common::process::{Proc, free_addr, http_ok};
use common::sidecar::*;
use common::upstream::EchoUpstream;

/// The caller's context, as a client (or Envoy with tracing on) sends it.
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
/// A caller's context sent through an Envoy whose own tracing is on.
const TRACED_ENVOY_TRACE: &str = "5d3c0ffee0ddf00d5d3c0ffee0ddf00d";
const TRACED_ENVOY_SPAN: &str = "0d15ea5e0d15ea5e";
/// Envoy's context in the gRPC metadata, and a different one in the request's headers.
const METADATA_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const METADATA_SPAN: &str = "b7ad6b7169203331";
const HEADER_TRACE: &str = "11111111111111111111111111111111";

/// The sidecar binary on the deploy/local OpenFGA config, exporting as `otel` says, holding
/// spans until shutdown.
struct SidecarBin {
    proc: Proc,
    grpc: SocketAddr,
}

async fn start_sidecar(
    name: &str,
    fga: &OpenFga,
    store: &str,
    otel: &[(&str, &str)],
) -> SidecarBin {
    let (grpc, ops) = (free_addr(), free_addr());
    let mut cmd = common::binary::sidecar();
    cmd.args(["serve", "--config"])
        .arg(local_dir().join("sidecar-openfga.yaml"))
        .args([
            "--grpc-addr",
            &grpc.to_string(),
            "--ops-addr",
            &ops.to_string(),
        ])
        .env("OPENFGA_API_URL", fga.http_url())
        .env("OPENFGA_STORE_ID", store)
        // Nothing leaves before shutdown: the spans found later were flushed by it.
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000");
    for (k, v) in otel {
        cmd.env(k, v);
    }
    let mut proc = Proc::spawn(name, grpc.port(), &cmd);
    let ready = format!("http://{ops}/readyz");
    proc.wait_until(
        || {
            let url = ready.clone();
            async move { http_ok(&url).await }
        },
        Duration::from_secs(20),
        "sidecar /readyz",
    )
    .await;
    SidecarBin { proc, grpc }
}

/// SIGTERM, and the exit code once it is gone.
fn stop(s: &mut SidecarBin) -> Option<i32> {
    s.proc.kill();
    s.proc.try_status().and_then(|st| st.code())
}

fn tag<'a>(trace: &'a Trace, service: &str, operation: &str, key: &str) -> Option<&'a str> {
    trace
        .span(service, operation)
        .and_then(|s| s.tags.get(key))
        .map(String::as_str)
}

#[tokio::test]
async fn one_trace_from_envoy_through_the_sidecar_to_openfga_in_jaeger() {
    let jaeger = Jaeger::start().await;
    let fga = OpenFga::start_traced(&jaeger.otlp_grpc_addr()).await;
    let (store, _) = fga
        .store("tracing")
        .tuples(&[("user:alice", "executor", "tool:agent_chat")])
        .create()
        .await;

    let http_export = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", jaeger.otlp_http_url()),
        ("OTEL_SERVICE_NAME", "authz-sidecar-http".to_string()),
    ];
    let http_export: Vec<(&str, &str)> =
        http_export.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut via_envoy = start_sidecar("sidecar-otlp-http", &fga, &store, &http_export).await;
    let grpc_export = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", jaeger.otlp_grpc_url()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_string()),
        ("OTEL_SERVICE_NAME", "authz-sidecar-grpc".to_string()),
        // One runtime thread: the gRPC exporter and the flush at shutdown need no second.
        ("TOKIO_WORKER_THREADS", "1".to_string()),
    ];
    let grpc_export: Vec<(&str, &str)> =
        grpc_export.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut direct = start_sidecar("sidecar-otlp-grpc", &fga, &store, &grpc_export).await;

    // 1. Through Envoy (no tracing of its own): the request's traceparent is continued.
    let (upstream_addr, _upstream) = EchoUpstream::start().await;
    let mut envoy = Envoy::start(via_envoy.grpc, upstream_addr).await;
    let alice = format!("Bearer {}", mint(local_claims("alice", &["user"])));
    let resp = reqwest::Client::new()
        .post(format!("{}/tools/agent_chat/execute", envoy.url()))
        .header("authorization", &alice)
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "alice may execute agent_chat");

    // 1b. Through an Envoy with its own tracing on: Envoy continues the caller's trace and
    // hands the ext_authz call its own span's context in the gRPC metadata.
    let traced_opts = common::envoy::EnvoyOptions {
        otlp_tracing: Some(jaeger.otlp_grpc_addr().parse().unwrap()),
        ..Default::default()
    };
    let mut traced_envoy = Envoy::start_with(via_envoy.grpc, upstream_addr, &traced_opts).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/tools/agent_chat/execute", traced_envoy.url()))
        .header("authorization", &alice)
        .header(
            "traceparent",
            format!("00-{TRACED_ENVOY_TRACE}-{TRACED_ENVOY_SPAN}-01"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "alice may execute agent_chat");
    // Envoy's tracer flushes on a timer (5 s); it is stopped once its spans are in.
    jaeger
        .wait_for_trace(
            TRACED_ENVOY_TRACE,
            |t| !t.of("envoy").is_empty(),
            Duration::from_secs(30),
        )
        .await;
    traced_envoy.stop();

    // 2. Straight over gRPC: the metadata's context wins over the header's.
    let mut request = tonic::Request::new(
        Req::new("POST", "/tools/agent_chat/execute")
            .header("authorization", &alice)
            .header(
                "traceparent",
                &format!("00-{HEADER_TRACE}-{METADATA_SPAN}-01"),
            )
            .build(),
    );
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{METADATA_TRACE}-{METADATA_SPAN}-01")
            .parse()
            .unwrap(),
    );
    let answer = AuthorizationClient::connect(format!("http://{}", direct.grpc))
        .await
        .unwrap()
        .check(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.status.unwrap().code, 0, "allowed");

    // OpenFGA's spans arrive on their own (its batch delay is seconds); the sidecars' are
    // still held: the flush at shutdown is what sends them.
    let trace = jaeger
        .wait_for_trace(
            CLIENT_TRACE,
            |t| !t.of("openfga").is_empty(),
            Duration::from_secs(30),
        )
        .await;
    assert!(
        trace.of("authz-sidecar-http").is_empty(),
        "the sidecar exported before shutdown (OTEL_BSP_SCHEDULE_DELAY ignored?):\n{}",
        trace.tree(&[])
    );
    envoy.stop();
    assert_eq!(stop(&mut via_envoy), Some(0), "{}", via_envoy.proc.tail(20));
    assert_eq!(stop(&mut direct), Some(0), "{}", direct.proc.tail(20));

    let trace = jaeger
        .wait_for_trace(
            CLIENT_TRACE,
            |t| t.has("authz-sidecar-http", "check") && !t.of("openfga").is_empty(),
            Duration::from_secs(20),
        )
        .await;
    let show = [
        "decision",
        "status",
        "rule",
        "path",
        "credential",
        "outcome",
        "endpoint",
        "http.status_code",
        "openfga.allowed",
    ];
    println!("trace {CLIENT_TRACE}:\n{}", trace.tree(&show));
    let svc = "authz-sidecar-http";
    let check = trace.span(svc, "check").unwrap();
    assert_eq!(
        check.parent_id.as_deref(),
        Some(CLIENT_SPAN),
        "the check is a child of the caller's span"
    );
    assert_eq!(tag(&trace, svc, "check", "decision"), Some("allow"));
    assert_eq!(tag(&trace, svc, "check", "status"), Some("200"));
    assert_eq!(tag(&trace, svc, "check", "rule"), Some("tool-execute"));
    assert_eq!(
        tag(&trace, svc, "check", "path"),
        Some("/tools/agent_chat/execute")
    );
    let authn = trace
        .span(svc, "authenticate")
        .expect("an authenticate span");
    assert_eq!(authn.parent_id.as_deref(), Some(check.span_id.as_str()));
    assert_eq!(tag(&trace, svc, "authenticate", "credential"), Some("jwt"));
    let call = trace
        .span(svc, "openfga check")
        .expect("an OpenFGA call span");
    assert_eq!(call.parent_id.as_deref(), Some(check.span_id.as_str()));
    assert_eq!(
        tag(&trace, svc, "openfga check", "store"),
        Some(store.as_str())
    );
    assert_eq!(tag(&trace, svc, "openfga check", "outcome"), Some("ok"));
    // OpenFGA continued the traceparent the sidecar sent: its HTTP span is the call's child.
    let openfga_root = trace
        .of("openfga")
        .into_iter()
        .find(|s| s.parent_id.as_deref() == Some(call.span_id.as_str()))
        .unwrap_or_else(|| panic!("no OpenFGA span under the call:\n{}", trace.tree(&[])));
    assert_eq!(openfga_root.service, "openfga");
    let roots: Vec<&str> = trace
        .spans
        .iter()
        .filter(|s| {
            s.parent_id
                .as_ref()
                .is_none_or(|p| trace.by_id(p).is_none())
        })
        .map(|s| s.operation.as_str())
        .collect();
    assert_eq!(
        roots,
        ["check"],
        "one tree, under the check:\n{}",
        trace.tree(&[])
    );

    // The decision line joins the trace.
    let log = std::fs::read_to_string(via_envoy.proc.log_path()).unwrap();
    // The log is JSON (stdout is a file, not a terminal).
    assert!(
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|l| l["decision"] == "allow" && l["trace_id"] == CLIENT_TRACE),
        "no decision line with the trace id:\n{log}"
    );

    // Through the traced Envoy, the sidecar's check hangs under Envoy's ext_authz call span
    // (from the gRPC metadata), itself in the caller's trace.
    let traced = jaeger
        .wait_for_trace(
            TRACED_ENVOY_TRACE,
            |t| t.has(svc, "check") && !t.of("envoy").is_empty(),
            Duration::from_secs(20),
        )
        .await;
    println!(
        "trace {TRACED_ENVOY_TRACE}:\n{}",
        traced.tree(&["decision"])
    );
    let check = traced.span(svc, "check").unwrap();
    let parent = check
        .parent_id
        .as_deref()
        .and_then(|p| traced.by_id(p))
        .unwrap_or_else(|| {
            panic!(
                "the check's parent is not in the trace:\n{}",
                traced.tree(&[])
            )
        });
    assert_eq!(
        parent.service,
        "envoy",
        "the check continues Envoy's span, not the caller's:\n{}",
        traced.tree(&[])
    );
    assert_ne!(check.parent_id.as_deref(), Some(TRACED_ENVOY_SPAN));

    // The gRPC-exporting sidecar continued the metadata's context, not the header's.
    let direct_trace = jaeger
        .wait_for_trace(
            METADATA_TRACE,
            |t| t.has("authz-sidecar-grpc", "check"),
            Duration::from_secs(20),
        )
        .await;
    let check = direct_trace.span("authz-sidecar-grpc", "check").unwrap();
    assert_eq!(check.parent_id.as_deref(), Some(METADATA_SPAN));
    assert!(
        jaeger.trace(HEADER_TRACE).await.spans.is_empty(),
        "the header's trace got spans"
    );

    // Each JWKS fetch is a span too (the startup load of the key file, a trace of its own).
    assert!(
        !jaeger
            .find("authz-sidecar-http", "jwks fetch")
            .await
            .is_empty(),
        "no jwks fetch span"
    );
}
