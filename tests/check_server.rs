//! The Check server on the embedded default config (deploy/local), in-process on
//! `127.0.0.1:0`: allow with identity headers, each kind of deny with its own reason,
//! CORS, health, the table of bad inputs, and shutdown.

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::sidecar::*;
use serde_json::json;
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test]
async fn valid_token_is_allowed_with_identity_headers() {
    let s = Sidecar::local().await;
    let token = mint(local_claims("alice", &["user", "admin"]));
    let r = s
        .check(http(
            "GET",
            "/api/agents?x=1",
            &[
                ("authorization", &format!("Bearer {token}")),
                ("x-auth-subject", "user:mallory"),
                ("x-auth-key-id", "spoof"),
            ],
            None,
        ))
        .await;
    assert_eq!(status(&r), 200, "{r:?}");
    assert_eq!(header(&r, "x-auth-subject").as_deref(), Some("user:alice"));
    assert_eq!(header(&r, "x-auth-principal-type").as_deref(), Some("user"));
    assert_eq!(header(&r, "x-auth-username").as_deref(), Some("alice"));
    assert_eq!(header(&r, "x-auth-method").as_deref(), Some("jwt"));
    assert_eq!(header(&r, "x-auth-roles").as_deref(), Some("user,admin"));
    assert_eq!(
        header(&r, "x-auth-scopes").as_deref(),
        Some("openid read:agents")
    );
    assert_eq!(header(&r, "x-auth-key-id").as_deref(), Some("dev-local-1"));
    // Headers we do not set are removed; the ones we set overwrite the client's copies.
    assert!(removed(&r).contains(&"x-auth-failed-open".to_string()));
    assert!(!removed(&r).contains(&"x-auth-subject".to_string()));
    s.stop().await.unwrap();
}

#[tokio::test]
async fn each_deny_says_why() {
    let s = Sidecar::local().await;
    let expired = mint(
        json!({"sub": "a", "preferred_username": "alice", "iss": "authz-sidecar-local", "aud": "mcp-server", "exp": now() - 90}),
    );
    let r = s.check(Req::get("/api/x").bearer(&expired)).await;
    assert_eq!(status(&r), 401);
    assert!(reason(&r).starts_with("token expired 9"), "{}", reason(&r));
    let challenge = header(&r, "www-authenticate").unwrap();
    assert!(challenge.starts_with("Bearer realm=\"authz-sidecar-local\", error=\"invalid_token\", error_description=\"token expired"), "{challenge}");

    let r = s.check(Req::get("/api/x")).await;
    assert_eq!(status(&r), 401);
    assert_eq!(
        header(&r, "www-authenticate").unwrap(),
        "Bearer realm=\"authz-sidecar-local\""
    );

    let user = mint(local_claims("bob", &["user"]));
    let r = s.check(Req::get("/admin/users").bearer(&user)).await;
    assert_eq!(status(&r), 403);
    assert_eq!(reason(&r), "role admin required");

    let mut c = local_claims("bob", &["user"]);
    c["aud"] = json!("other-app");
    let r = s
        .check(http(
            "GET",
            "/api/x",
            &[("authorization", &format!("Bearer {}", mint(c)))],
            None,
        ))
        .await;
    assert_eq!(status(&r), 401);
    assert!(reason(&r).contains("wrong audience"), "{}", reason(&r));

    let mut c = local_claims("bob", &["user"]);
    c["iss"] = json!("https://elsewhere/realms/x");
    let r = s
        .check(http(
            "GET",
            "/api/x",
            &[("authorization", &format!("Bearer {}", mint(c)))],
            None,
        ))
        .await;
    assert!(reason(&r).starts_with("wrong issuer"), "{}", reason(&r));

    let r = s.check(Req::get("/nowhere").bearer(&user)).await;
    assert_eq!(
        (status(&r), reason(&r).as_str()),
        (403, "no route rule matches GET /nowhere")
    );

    // Body is JSON with error, reason and the request id.
    let body = match &r.http_response {
        Some(authz_sidecar::proto::pb::envoy::service::auth::v3::check_response::HttpResponse::DeniedResponse(d)) => d.body.clone(),
        _ => unreachable!(),
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "forbidden");
    assert_eq!(v["request_id"], "test-req");
    s.stop().await.unwrap();
}

#[tokio::test]
async fn api_keys_and_service_principals() {
    let s = Sidecar::local().await;
    let r = s
        .check(Req::get("/api/x").api_key("mcpkey_test_local_alice"))
        .await;
    assert_eq!(status(&r), 200, "{r:?}");
    assert_eq!(header(&r, "x-auth-method").as_deref(), Some("api_key"));
    assert_eq!(
        header(&r, "x-auth-key-id").as_deref(),
        Some("ak_local_alice")
    );
    assert_eq!(header(&r, "x-auth-subject").as_deref(), Some("user:alice"));

    let r = s
        .check(Req::get("/api/x").api_key("mcpkey_test_local_inactive"))
        .await;
    assert_eq!(
        (status(&r), reason(&r).as_str()),
        (401, "API key inactive (id=ak_local_inactive)")
    );
    let r = s
        .check(Req::get("/api/x").api_key("mcpkey_live_unknown"))
        .await;
    assert_eq!((status(&r), reason(&r).as_str()), (401, "invalid API key"));

    let r = s
        .check(Req::get("/api/x").api_key("mcpkey_test_local_reporter"))
        .await;
    assert_eq!(
        header(&r, "x-auth-principal-type").as_deref(),
        Some("service_principal")
    );

    let sp = mint(
        json!({"sub": "x", "preferred_username": "service-account-svc-disabled", "client_id": "svc-disabled", "azp": "svc-disabled",
        "iss": "authz-sidecar-local", "aud": "mcp-server", "exp": now() + 60}),
    );
    let r = s.check(Req::get("/api/x").bearer(&sp)).await;
    assert_eq!(
        (status(&r), reason(&r).as_str()),
        (403, "service principal svc-disabled disabled")
    );
    s.stop().await.unwrap();
}

#[tokio::test]
async fn cors_preflight_and_public_routes() {
    let s = Sidecar::local().await;
    let pre = |origin: &str| {
        http(
            "OPTIONS",
            "/api/agents",
            &[
                ("origin", origin),
                ("access-control-request-method", "POST"),
            ],
            None,
        )
    };
    let r = s.check(pre("http://localhost:3000")).await;
    assert_eq!(status(&r), 200);
    assert_eq!(
        response_header(&r, "access-control-allow-origin").as_deref(),
        Some("http://localhost:3000")
    );
    let r = s.check(pre("https://evil.example")).await;
    assert_eq!(status(&r), 403);
    assert!(reason(&r).contains("https://evil.example"));
    // A 401 to an allowed origin is readable by the page.
    let r = s
        .check(http(
            "GET",
            "/api/x",
            &[("origin", "http://localhost:3000")],
            None,
        ))
        .await;
    assert_eq!(status(&r), 401);
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some("http://localhost:3000")
    );
    assert_eq!(header(&r, "vary").as_deref(), Some("Origin"));

    let r = s
        .check(http(
            "GET",
            "/public/index.html",
            &[("x-auth-subject", "user:mallory")],
            None,
        ))
        .await;
    assert_eq!(status(&r), 200);
    assert!(
        removed(&r).contains(&"x-auth-subject".to_string()),
        "spoofed identity removed on public routes"
    );
    // Dot segments cannot escape a public prefix. This used to be resolved to /admin/x (401);
    // it is refused now, because the app behind may resolve it differently or not at all
    // (issue 7, finding 2; tests/fail_closed/paths.rs).
    let r = s.check(Req::get("/public/../admin/x")).await;
    assert_eq!(status(&r), 400);
    assert!(reason(&r).contains("dot segment"), "{}", reason(&r));
    s.stop().await.unwrap();
}

#[tokio::test]
async fn bad_inputs_are_denied_with_their_own_reason() {
    let s = Sidecar::local().await;
    let enc = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let good = mint(local_claims("alice", &["user"]));
    let parts: Vec<&str> = good.split('.').collect();
    // HS256 "signed" with the RSA public key as the secret: the classic confusion attack.
    let public_pem = std::fs::read(local_dir().join("dev-jwks.json")).unwrap();
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header {
            alg: jsonwebtoken::Algorithm::HS256,
            kid: Some("dev-local-1".into()),
            ..Default::default()
        },
        &local_claims("alice", &["admin"]),
        &jsonwebtoken::EncodingKey::from_secret(&public_pem),
    )
    .unwrap();
    let huge = "a".repeat(64 * 1024);
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, &'a str);
    let table: Vec<Case> = vec![
        (
            "not three segments",
            vec![("authorization", "Bearer abc.def".into())],
            "expected 3 dot-separated segments, got 2",
        ),
        (
            "bad base64url",
            vec![("authorization", "Bearer @@@.e30.sig".into())],
            "header is not base64url",
        ),
        (
            "JSON garbage",
            vec![(
                "authorization",
                format!(
                    "Bearer {}.{}.sig",
                    URL_SAFE_NO_PAD.encode("{nope"),
                    parts[1]
                ),
            )],
            "header is not JSON",
        ),
        (
            "alg none",
            vec![(
                "authorization",
                format!("Bearer {}.{}.", enc(json!({"alg": "none"})), parts[1]),
            )],
            "algorithm none is never accepted",
        ),
        (
            "HS256 with the public key",
            vec![("authorization", format!("Bearer {hs}"))],
            "algorithm HS256 not allowed",
        ),
        (
            "unknown kid",
            vec![(
                "authorization",
                format!(
                    "Bearer {}.{}.{}",
                    enc(json!({"alg": "RS256", "kid": "nope"})),
                    parts[1],
                    parts[2]
                ),
            )],
            // The client is not told where the keys come from (the log and doctor are).
            "signing key kid=nope not found",
        ),
        (
            "64 KiB token",
            vec![("authorization", format!("Bearer {huge}"))],
            "token too large",
        ),
        (
            "empty bearer",
            vec![("authorization", "Bearer ".into())],
            "empty bearer token",
        ),
        (
            "two Authorization headers",
            vec![
                ("authorization", format!("Bearer {good}")),
                ("authorization", format!("Bearer {good}")),
            ],
            "two Authorization headers",
        ),
        (
            "basic auth",
            vec![("authorization", "Basic YTpi".into())],
            "not a Bearer token",
        ),
        (
            "both credentials",
            vec![
                ("authorization", format!("Bearer {good}")),
                ("x-api-key", "k".into()),
            ],
            "both a bearer token and an API key",
        ),
    ];
    for (name, headers, want) in table {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = s.check(http("GET", "/api/x", &h, None)).await;
        assert_eq!(status(&r), 401, "{name}: {r:?}");
        assert!(
            reason(&r).contains(want),
            "{name}: {:?} should contain {want:?}",
            reason(&r)
        );
    }
    // Non-UTF-8 bytes in a header (Envoy's raw header_map).
    let r = s
        .check(http_raw(
            "GET",
            "/api/x",
            &[("authorization", &[0x42, 0x65, 0xff, 0xfe])],
        ))
        .await;
    assert_eq!(status(&r), 401);
    assert_eq!(reason(&r), "header authorization is not valid UTF-8");
    let r = s
        .check(http_raw(
            "GET",
            "/api/x",
            &[
                ("authorization", b"Bearer a"),
                ("authorization", b"Bearer b"),
            ],
        ))
        .await;
    assert!(
        reason(&r).contains("two Authorization headers"),
        "{}",
        reason(&r)
    );
    // A malformed path is a 400, not a guess.
    let r = s.check(Req::get("/api/%zz")).await;
    assert_eq!(status(&r), 400);
    assert!(reason(&r).contains("bad percent-encoding"));
    // Not an HTTP check at all: a broken request, answered with a gRPC error.
    let err = s
        .client()
        .await
        .check(authz_sidecar::proto::pb::envoy::service::auth::v3::CheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    s.stop().await.unwrap();
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let s = Sidecar::local().await;
    s.wait_ready(Duration::from_secs(5)).await;
    for service in ["", "envoy.service.auth.v3.Authorization"] {
        let st = serving_status(s.grpc_addr, service).await;
        assert_eq!(st, ServingStatus::Serving as i32, "{service:?}");
    }
    assert_eq!(s.ops_get("/healthz").await.0, 200);
    s.check(Req::get("/api/x")).await;
    let (code, text) = s.ops_get("/metrics").await;
    assert_eq!(code, 200);
    assert!(
        text.contains("authz_sidecar_decisions_total{decision=\"deny\",status=\"401\",error=\"unauthenticated\",credential=\"none\",rule=\"api\"} 1"),
        "{text}"
    );
    s.stop().await.unwrap();
}

#[tokio::test]
async fn not_ready_until_keys_load() {
    // A JWKS URL nobody answers: up, but NOT_SERVING naming the URL, and tokens fail.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/certs");
    let s = Sidecar::start(
        "routes: { rules: [ { path: /api/** } ] }\n",
        &local_dir(),
        &[("AUTH_PUBLIC_KEY_URL", &url)],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (code, body) = s.ops_get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(&url), "{body}");
    let token = mint(local_claims("alice", &[]));
    let r = s.check(Req::get("/api/x").bearer(&token)).await;
    // The client reads that the keys cannot be refreshed; the URL and the cause are for the
    // operator (/readyz above, the decision log, doctor).
    assert_eq!(status(&r), 401);
    assert_eq!(
        reason(&r),
        "signing key kid=dev-local-1 not found: the signing keys cannot be refreshed"
    );
    assert!(!reason(&r).contains(&url));
    s.stop().await.unwrap();
}
