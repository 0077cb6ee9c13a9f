//! The body and the other values rules read (issue 7, finding 1). With the MCP rules of
//! deploy/local/sidecar-openfga.yaml, a body the sidecar could not parse used to make the
//! `tools/call` rule not match, and the next rule (authentication only) let the call through
//! to an app whose parser runs it. Now: a body a rule needs that is missing, partial, not
//! UTF-8 or not strict JSON is a 400 naming the problem; a JSON-RPC batch is allowed only
//! when every element is; a query parameter or header a rule reads must be there once; a CORS
//! preflight is answered by the sidecar and never reaches the app. Against a real OpenFGA,
//! over gRPC and through real Envoy.

use std::time::Duration;

use authz_sidecar::proto::pb::envoy::service::auth::v3::CheckRequest;
use serde_json::{Value, json};

use crate::common::envoy::{Envoy, EnvoyOptions};
use crate::common::openfga::OpenFga;
use crate::common::sidecar::*;
use crate::common::upstream::EchoUpstream;

/// deploy/local/sidecar-openfga.yaml, plus a rule reading a query parameter and one reading
/// a header, before the catch-all `api`.
fn config() -> String {
    let base = std::fs::read_to_string(local_dir().join("sidecar-openfga.yaml")).unwrap();
    let catch_all = "    - { name: api, path: \"/api/**\" }\n";
    assert!(base.contains(catch_all), "deploy config changed shape");
    base.replace(
        catch_all,
        r#"    - name: by-query
      path: /search
      check: { all: [ { relation: viewer, object: "conversation:{query:thread}" } ] }
    - name: by-header
      path: /org-tools
      check: { all: [ { relation: executor, object: "tool:{header:x-tool}" } ] }
    - { name: api, path: "/api/**" }
"#,
    )
}

/// A sidecar on a fresh store where alice may execute agent_chat and search and view
/// conversation c1, and bob may view c2.
async fn sidecar(store_name: &str) -> Sidecar {
    let fga = OpenFga::shared().await;
    let (store, _) = fga.app_store(store_name).await;
    fga.write_tuples(
        &store,
        &[
            ("user:alice", "executor", "tool:agent_chat"),
            ("user:alice", "executor", "tool:search"),
            ("user:alice", "viewer", "conversation:c1"),
            ("user:bob", "viewer", "conversation:c2"),
        ],
    )
    .await;
    let s = Sidecar::start(
        &config(),
        &local_dir(),
        &[
            ("OPENFGA_API_URL", &fga.http_url()),
            ("OPENFGA_STORE_ID", &store),
        ],
    )
    .await;
    s.wait_ready(Duration::from_secs(10)).await;
    s
}

fn bearer(user: &str) -> String {
    format!("Bearer {}", mint(local_claims(user, &["user"])))
}

fn call(tool: &str, id: u32) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": {}}})
}

/// `POST /message` by `user` with `body` as bytes (`raw_body`, as Envoy sends it with
/// `pack_as_bytes: true`) and extra headers.
fn post_message(user: &str, body: &[u8], extra: &[(&str, &str)]) -> CheckRequest {
    Req::post("/message")
        .header("authorization", &bearer(user))
        .header("content-type", "application/json")
        .headers(extra)
        .body(body)
        .build()
}

fn error_code(r: &authz_sidecar::proto::pb::envoy::service::auth::v3::CheckResponse) -> String {
    use authz_sidecar::proto::pb::envoy::service::auth::v3::check_response::HttpResponse;
    match &r.http_response {
        Some(HttpResponse::DeniedResponse(d)) => {
            serde_json::from_str::<Value>(&d.body).unwrap()["error"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        }
        _ => String::new(),
    }
}

#[tokio::test]
async fn a_batch_is_allowed_only_when_every_element_is() {
    let s = sidecar("bodies-batch").await;
    let list = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/list"});
    for (what, body, want_status, want_reason) in [
        ("one call alice may make", call("agent_chat", 1), 200, ""),
        (
            "one call she may not make",
            call("shell", 1),
            403,
            "user:alice is not executor of tool:shell",
        ),
        (
            "a batch of calls she may all make",
            json!([call("agent_chat", 1), call("search", 2)]),
            200,
            "",
        ),
        (
            "a batch of a call and another method",
            json!([call("agent_chat", 1), list]),
            200,
            "",
        ),
        (
            "a batch with one allowed and one denied call",
            json!([call("agent_chat", 1), call("shell", 2)]),
            403,
            "JSON-RPC batch element 1: user:alice is not executor of tool:shell",
        ),
        (
            "a batch hiding a denied call behind another method",
            json!([list, call("shell", 2)]),
            403,
            "JSON-RPC batch element 1: user:alice is not executor of tool:shell",
        ),
        (
            "a batch of one denied call",
            json!([call("shell", 1)]),
            403,
            "JSON-RPC batch element 0: user:alice is not executor of tool:shell",
        ),
        (
            "an empty batch",
            json!([]),
            400,
            "JSON-RPC batch is empty (rule mcp-tools-call reads body field /method)",
        ),
    ] {
        let r = s
            .check(post_message("alice", body.to_string().as_bytes(), &[]))
            .await;
        assert_eq!(status(&r), want_status, "{what}: {r:?}");
        if want_status != 200 {
            assert_eq!(reason(&r), want_reason, "{what}");
        }
    }
    s.stop().await.unwrap();
}

#[tokio::test]
async fn a_body_the_tools_call_rule_cannot_read_strictly_is_a_400() {
    let s = sidecar("bodies-strict").await;
    // Each body is a call of `shell`, which alice may not execute: read as the app reads it,
    // it is a 403; falling through to `mcp-other` would be a 200.
    let shell = call("shell", 1).to_string();
    let deep = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"shell"}},"x":{}1{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let len = shell.len().to_string();
    let bom = [b"\xef\xbb\xbf".as_slice(), shell.as_bytes()].concat();
    let not_utf8 = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"shell\"},\"x\":\"\xff\"}";
    for (what, body, extra, want) in [
        (
            "a UTF-8 byte order mark before the object",
            bom,
            vec![],
            "request body starts with a byte order mark",
        ),
        (
            "NaN in a side field",
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"shell"},"x":NaN}"#.to_vec(),
            vec![],
            "request body is not strict JSON: expected value",
        ),
        (
            "1e400 in a side field",
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"shell"},"x":1e400}"#.to_vec(),
            vec![],
            "request body is not strict JSON: number out of range",
        ),
        (
            "nesting deeper than the parser's limit",
            deep.into_bytes(),
            vec![],
            "request body is not strict JSON: recursion limit exceeded",
        ),
        (
            "a duplicate key read first-wins by one parser and last-wins by another",
            br#"{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call","params":{"name":"shell"}}"#.to_vec(),
            vec![],
            "request body is not strict JSON: duplicate key \"method\"",
        ),
        (
            "bytes that are not UTF-8",
            not_utf8.to_vec(),
            vec![],
            "request body is not UTF-8",
        ),
        (
            "no body (Envoy without with_request_body)",
            Vec::new(),
            vec![("content-length", len.as_str())],
            "request body was not sent to the authorizer (content-length",
        ),
        (
            "a body Envoy cut at max_request_bytes",
            shell.clone().into_bytes(),
            vec![("x-envoy-auth-partial-body", "true")],
            "request body was cut at Envoy's max_request_bytes",
        ),
    ] {
        let r = s.check(post_message("alice", &body, &extra)).await;
        assert_eq!(status(&r), 400, "{what}: {r:?}");
        assert_eq!(error_code(&r), "invalid_request", "{what}");
        let reason = reason(&r);
        assert!(reason.starts_with(want), "{what}: {reason}");
        assert!(
            reason.ends_with("(rule mcp-tools-call reads body field /method)"),
            "{what}: {reason}"
        );
    }
    // The same call, readable, is decided on what it says.
    let r = s.check(post_message("alice", shell.as_bytes(), &[])).await;
    assert_eq!(
        (status(&r), reason(&r).as_str()),
        (403, "user:alice is not executor of tool:shell")
    );
    s.stop().await.unwrap();
}

#[tokio::test]
async fn a_query_parameter_or_header_a_rule_reads_must_be_there_once() {
    let s = sidecar("bodies-values").await;
    let bob = bearer("bob");
    let alice = bearer("alice");
    for (what, path, headers, want_status, want_reason) in [
        (
            "bob views his conversation",
            "/search?thread=c2",
            vec![("authorization", bob.as_str())],
            200,
            "",
        ),
        (
            "bob names his conversation first and alice's second",
            "/search?thread=c2&thread=c1",
            vec![("authorization", bob.as_str())],
            400,
            "query parameter thread appears more than once (rule by-query reads query parameter thread)",
        ),
        (
            "an encoded second name is a second name",
            "/search?thread=c2&th%72ead=c1",
            vec![("authorization", bob.as_str())],
            400,
            "query parameter thread appears more than once (rule by-query reads query parameter thread)",
        ),
        (
            "a bad escape is not read as text",
            "/search?thread=c2%zz",
            vec![("authorization", bob.as_str())],
            400,
            "query has bad percent-encoding in \"c2%zz\" (rule by-query reads query parameter thread)",
        ),
        (
            "alice executes a tool named in a header",
            "/org-tools",
            vec![("authorization", alice.as_str()), ("x-tool", "agent_chat")],
            200,
            "",
        ),
        (
            "two x-tool headers (Envoy joins them with ',')",
            "/org-tools",
            vec![
                ("authorization", alice.as_str()),
                ("x-tool", "agent_chat"),
                ("x-tool", "shell"),
            ],
            400,
            "header x-tool holds a ',': Envoy joins a repeated header with ',' (rule by-header reads header x-tool)",
        ),
    ] {
        let r = s.check(http("GET", path, &headers, None)).await;
        assert_eq!(status(&r), want_status, "{what}: {r:?}");
        if want_status != 200 {
            assert_eq!(reason(&r), want_reason, "{what}");
        }
    }
    // Every occurrence, as Envoy sends them with encode_raw_headers.
    let r = s
        .check(http_raw(
            "GET",
            "/org-tools",
            &[
                ("authorization", alice.as_bytes()),
                ("x-tool", b"agent_chat"),
                ("x-tool", b"shell"),
            ],
        ))
        .await;
    assert_eq!(
        (status(&r), reason(&r).as_str()),
        (
            400,
            "header x-tool appears more than once (rule by-header reads header x-tool)"
        )
    );
    s.stop().await.unwrap();
}

/// The sidecar, Envoy with `opts` in front of it, the echo app behind.
struct Stack {
    sidecar: Sidecar,
    envoy: Envoy,
    upstream: EchoUpstream,
    http: reqwest::Client,
}

async fn stack(store_name: &str, opts: &EnvoyOptions) -> Stack {
    let sidecar = sidecar(store_name).await;
    let (up, upstream) = EchoUpstream::start().await;
    let envoy = Envoy::start_with(sidecar.grpc_addr, up, opts).await;
    Stack {
        sidecar,
        envoy,
        upstream,
        http: reqwest::Client::new(),
    }
}

impl Stack {
    /// `POST /message` as alice; (status, body).
    async fn post_message(&self, body: impl Into<reqwest::Body>) -> (u16, String) {
        let r = self
            .http
            .post(format!("{}/message", self.envoy.url()))
            .header("authorization", bearer("alice"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request through Envoy");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    async fn stop(mut self) {
        self.envoy.stop();
        self.sidecar.stop().await.unwrap();
    }
}

#[tokio::test]
async fn through_envoy_a_batch_or_a_body_the_sidecar_cannot_read_never_reaches_the_app() {
    let s = stack("bodies-envoy", &EnvoyOptions::default()).await;
    // The bypass: a one-element batch calling a tool alice may not execute.
    let (code, body) = s.post_message(json!([call("shell", 1)]).to_string()).await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("JSON-RPC batch element 0: user:alice is not executor of tool:shell"),
        "{body}"
    );
    let (code, body) = s
        .post_message(json!([call("agent_chat", 1), call("shell", 2)]).to_string())
        .await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(s.upstream.hits(), 0, "no denied batch reached the app");
    let (code, _) = s
        .post_message(json!([call("agent_chat", 1), call("search", 2)]).to_string())
        .await;
    assert_eq!(code, 200);
    assert_eq!(s.upstream.hits(), 1, "an allowed batch reaches the app");

    let shell = call("shell", 1).to_string();
    for (what, body, want) in [
        (
            "a byte order mark",
            [b"\xef\xbb\xbf".as_slice(), shell.as_bytes()].concat(),
            "byte order mark",
        ),
        (
            "a duplicate key",
            br#"{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call","params":{"name":"shell"}}"#.to_vec(),
            "duplicate key",
        ),
        (
            // pack_as_bytes: true; as a string Envoy would have replaced the byte.
            "a byte that is not UTF-8",
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"agent_chat\"},\"x\":\"\xff\"}".to_vec(),
            "request body is not UTF-8",
        ),
    ] {
        let (code, text) = s.post_message(body).await;
        assert_eq!(code, 400, "{what}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"], "invalid_request", "{what}");
        assert!(v["reason"].as_str().unwrap().contains(want), "{what}: {text}");
    }
    assert_eq!(s.upstream.hits(), 1, "no refused body reached the app");
    s.stop().await;
}

#[tokio::test]
async fn through_envoy_a_partial_body_is_refused() {
    // allow_partial_message: Envoy sends the first 1 KiB and says so.
    let opts = EnvoyOptions {
        max_request_bytes: 1024,
        allow_partial_message: true,
        ..EnvoyOptions::default()
    };
    let s = stack("bodies-partial", &opts).await;
    let mut big = call("shell", 1);
    big["params"]["arguments"]["padding"] = json!("x".repeat(4096));
    let (code, body) = s.post_message(big.to_string()).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains(
            "request body was cut at Envoy's max_request_bytes (x-envoy-auth-partial-body: true)"
        ),
        "{body}"
    );
    // A body under the limit is whole and decided on what it says.
    let (code, _) = s.post_message(call("agent_chat", 1).to_string()).await;
    assert_eq!(code, 200);
    assert_eq!(s.upstream.hits(), 1);
    s.stop().await;
}

#[tokio::test]
async fn through_envoy_without_body_buffering_a_body_rule_is_refused() {
    let opts = EnvoyOptions {
        with_request_body: false,
        ..EnvoyOptions::default()
    };
    let s = stack("bodies-nobody", &opts).await;
    let (code, body) = s.post_message(call("shell", 1).to_string()).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("request body was not sent to the authorizer (content-length"),
        "{body}"
    );
    // Chunked, without a content-length: Envoy drops transfer-encoding (it is framing), so
    // nothing says there was a body; refused all the same.
    let chunk = call("shell", 1).to_string();
    let request = format!(
        "POST /message HTTP/1.1\r\nhost: app.local\r\nauthorization: {}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        bearer("alice"),
        chunk.len()
    );
    let reply = crate::common::raw_http::send(s.envoy.addr(), request.as_bytes()).await;
    let (code, body) = (reply.status, reply.body);
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("no request body reached the authorizer (none was sent, or Envoy's ext_authz lacks with_request_body)"),
        "{body}"
    );
    assert_eq!(s.upstream.hits(), 0);
    s.stop().await;
}

#[tokio::test]
async fn through_envoy_a_cors_preflight_is_answered_by_the_sidecar() {
    let s = stack("bodies-cors", &EnvoyOptions::default()).await;
    let preflight = |origin: &'static str, path: &'static str| {
        s.http
            .request(reqwest::Method::OPTIONS, format!("{}{path}", s.envoy.url()))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization")
            .send()
    };
    for path in ["/message", "/admin/users", "/not-a-route"] {
        let r = preflight("http://localhost:3000", path).await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
        let h = r.headers();
        assert_eq!(h["access-control-allow-origin"], "http://localhost:3000");
        assert!(
            h["access-control-allow-methods"]
                .to_str()
                .unwrap()
                .contains("POST")
        );
        assert!(h.contains_key("access-control-max-age"));
    }
    let r = preflight("https://evil.example", "/message").await.unwrap();
    assert_eq!(r.status().as_u16(), 403, "a refused origin stays refused");
    assert_eq!(s.upstream.hits(), 0, "no preflight reached the app");
    s.stop().await;
}
