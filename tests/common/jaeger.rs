//! A real Jaeger (v1.76 `bin/jaeger`: the v2 all-in-one, an OpenTelemetry collector with
//! memory storage) on free loopback ports: OTLP gRPC and HTTP receivers in, the query API
//! (`/api/traces`) out.
//!
//! ```ignore
//! let jaeger = Jaeger::start().await;
//! // export to jaeger.otlp_http_url() (or otlp_grpc_url(); OpenFGA wants otlp_grpc_addr())
//! let trace = jaeger.wait_for_trace(TRACE_ID, |t| t.has("authz-sidecar", "check"), secs(20)).await;
//! println!("{}", trace.tree());
//! ```
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::process::{Proc, free_port, http_ok};
use super::tools;

const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Jaeger {
    proc: Proc,
    otlp_grpc: u16,
    otlp_http: u16,
    query: u16,
    _dir: tempfile::TempDir,
}

/// One span as the query API returns it.
#[derive(Debug, Clone)]
pub struct Span {
    pub span_id: String,
    /// The `CHILD_OF` reference, if any.
    pub parent_id: Option<String>,
    pub service: String,
    pub operation: String,
    pub tags: BTreeMap<String, String>,
    pub start_us: u64,
    pub duration_us: u64,
}

/// One trace: every span Jaeger holds for its id.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub trace_id: String,
    pub spans: Vec<Span>,
}

impl Trace {
    /// Whether `service` sent a span named `operation`.
    pub fn has(&self, service: &str, operation: &str) -> bool {
        self.spans
            .iter()
            .any(|s| s.service == service && s.operation == operation)
    }

    /// The spans `service` sent.
    pub fn of(&self, service: &str) -> Vec<&Span> {
        self.spans.iter().filter(|s| s.service == service).collect()
    }

    /// The first span of `service` named `operation`.
    pub fn span(&self, service: &str, operation: &str) -> Option<&Span> {
        self.spans
            .iter()
            .find(|s| s.service == service && s.operation == operation)
    }

    pub fn by_id(&self, id: &str) -> Option<&Span> {
        self.spans.iter().find(|s| s.span_id == id)
    }

    /// The span tree as text, children indented under their parent in start order: `service:
    /// operation (duration) key=value ...` with the tags named in `show`. A span whose parent is
    /// not in the trace (the caller's, outside Jaeger) is a root.
    pub fn tree(&self, show: &[&str]) -> String {
        let mut out = String::new();
        let mut roots: Vec<&Span> = self
            .spans
            .iter()
            .filter(|s| s.parent_id.as_ref().is_none_or(|p| self.by_id(p).is_none()))
            .collect();
        roots.sort_by_key(|s| s.start_us);
        for root in roots {
            self.write_tree(root, 0, show, &mut out);
        }
        out
    }

    fn write_tree(&self, span: &Span, depth: usize, show: &[&str], out: &mut String) {
        let tags: Vec<String> = show
            .iter()
            .filter_map(|k| span.tags.get(*k).map(|v| format!("{k}={v}")))
            .collect();
        out.push_str(&format!(
            "{}{}: {} ({} us){}{}\n",
            "  ".repeat(depth),
            span.service,
            span.operation,
            span.duration_us,
            if tags.is_empty() { "" } else { " " },
            tags.join(" ")
        ));
        let mut children: Vec<&Span> = self
            .spans
            .iter()
            .filter(|s| s.parent_id.as_deref() == Some(span.span_id.as_str()))
            .collect();
        children.sort_by_key(|s| s.start_us);
        for child in children {
            self.write_tree(child, depth + 1, show, out);
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("reqwest client")
}

impl Jaeger {
    /// Jaeger with OTLP receivers and the query API on free ports, memory storage; returns
    /// once the query API answers.
    pub async fn start() -> Jaeger {
        let (otlp_grpc, otlp_http, query, query_grpc) =
            (free_port(), free_port(), free_port(), free_port());
        let dir = tempfile::Builder::new()
            .prefix("authz-jaeger-")
            .tempdir()
            .unwrap();
        let config = dir.path().join("jaeger.yaml");
        std::fs::write(
            &config,
            format!(
                r#"service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 10000
  jaeger_query:
    # Its own spans would go to localhost:4317 (whatever listens there), and its shutdown
    # would wait for that export to time out.
    enable_tracing: false
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{otlp_grpc}
      http:
        endpoint: 127.0.0.1:{otlp_http}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"#
            ),
        )
        .unwrap();
        let mut cmd = Command::new(tools::tool("jaeger"));
        cmd.arg("--config")
            .arg(format!("file:{}", config.display()));
        let proc = Proc::spawn("jaeger", query, &cmd);
        let mut jaeger = Jaeger {
            proc,
            otlp_grpc,
            otlp_http,
            query,
            _dir: dir,
        };
        let services = format!("{}/api/services", jaeger.query_url());
        let receiver = format!("127.0.0.1:{otlp_grpc}").parse().unwrap();
        jaeger
            .proc
            .wait_until(
                || {
                    let url = services.clone();
                    async move { http_ok(&url).await && super::process::tcp_open(receiver).await }
                },
                READY_TIMEOUT,
                "jaeger query API and OTLP receiver",
            )
            .await;
        jaeger
    }

    /// `http://127.0.0.1:<port>` of the OTLP/HTTP receiver (the SDKs add `/v1/traces`).
    pub fn otlp_http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.otlp_http)
    }

    /// `http://127.0.0.1:<port>` of the OTLP/gRPC receiver.
    pub fn otlp_grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.otlp_grpc)
    }

    /// `127.0.0.1:<port>` of the OTLP/gRPC receiver (OpenFGA's `--trace-otlp-endpoint`).
    pub fn otlp_grpc_addr(&self) -> String {
        format!("127.0.0.1:{}", self.otlp_grpc)
    }

    pub fn query_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.query)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.tail(lines)
    }

    /// The trace as Jaeger holds it now (empty when it has none of its spans).
    pub async fn trace(&self, trace_id: &str) -> Trace {
        let url = format!("{}/api/traces/{trace_id}", self.query_url());
        let Ok(resp) = client().get(&url).send().await else {
            return Trace::default();
        };
        if !resp.status().is_success() {
            return Trace::default();
        }
        let body: Value = resp.json().await.unwrap_or_default();
        parse_traces(&body).into_iter().next().unwrap_or_default()
    }

    /// Traces of `service` with a span named `operation` (`/api/traces?service=..`).
    pub async fn find(&self, service: &str, operation: &str) -> Vec<Trace> {
        let resp = client()
            .get(format!("{}/api/traces", self.query_url()))
            .query(&[
                ("service", service),
                ("operation", operation),
                ("limit", "20"),
                ("lookback", "1h"),
            ])
            .send()
            .await;
        match resp {
            Ok(r) if r.status().is_success() => parse_traces(&r.json().await.unwrap_or_default()),
            _ => Vec::new(),
        }
    }

    /// Polls the trace until `done` holds; panics after `timeout` showing what Jaeger had.
    pub async fn wait_for_trace(
        &self,
        trace_id: &str,
        done: impl Fn(&Trace) -> bool,
        timeout: Duration,
    ) -> Trace {
        let deadline = Instant::now() + timeout;
        loop {
            let trace = self.trace(trace_id).await;
            if done(&trace) {
                return trace;
            }
            if Instant::now() >= deadline {
                panic!(
                    "trace {trace_id} incomplete after {timeout:?}; Jaeger has:\n{}\njaeger log:\n{}",
                    trace.tree(&[]),
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The `data` of a query API answer.
fn parse_traces(body: &Value) -> Vec<Trace> {
    let Some(data) = body["data"].as_array() else {
        return Vec::new();
    };
    data.iter()
        .map(|t| {
            let processes = &t["processes"];
            let spans = t["spans"]
                .as_array()
                .map(|spans| {
                    spans
                        .iter()
                        .map(|s| Span {
                            span_id: s["spanID"].as_str().unwrap_or("").to_string(),
                            parent_id: s["references"].as_array().and_then(|refs| {
                                refs.iter()
                                    .find(|r| r["refType"] == "CHILD_OF")
                                    .and_then(|r| r["spanID"].as_str())
                                    .map(String::from)
                            }),
                            service:
                                processes[s["processID"].as_str().unwrap_or("")]["serviceName"]
                                    .as_str()
                                    .unwrap_or("")
                                    .to_string(),
                            operation: s["operationName"].as_str().unwrap_or("").to_string(),
                            tags: s["tags"]
                                .as_array()
                                .map(|tags| {
                                    tags.iter()
                                        .map(|kv| {
                                            let v = match &kv["value"] {
                                                Value::String(s) => s.clone(),
                                                other => other.to_string(),
                                            };
                                            (kv["key"].as_str().unwrap_or("").to_string(), v)
                                        })
                                        .collect()
                                })
                                .unwrap_or_default(),
                            start_us: s["startTime"].as_u64().unwrap_or(0),
                            duration_us: s["duration"].as_u64().unwrap_or(0),
                        })
                        .collect()
                })
                .unwrap_or_default();
            Trace {
                trace_id: t["traceID"].as_str().unwrap_or("").to_string(),
                spans,
            }
        })
        .collect()
}
