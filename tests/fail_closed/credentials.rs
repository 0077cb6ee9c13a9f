//! Credentials: what the app receives, what the client reads, what the log says.
//!
//! - The API key is checked by the sidecar and removed before the app, through real Envoy
//!   (forwarded only with `api_keys.forward_to_app`).
//! - Over gRPC: a Keycloak ID token is refused; time claims near `u64::MAX` are refused, not
//!   a panic; a 401 reason does not name the JWKS URL (doctor does); an unknown API key is
//!   answered in microseconds without running bcrypt.
//! - The real binary's text log cannot be forged through a path, a `kid`, a request id or an
//!   origin; its JSON log stays JSON.

use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::common::envoy::Envoy;
use crate::common::process::{Proc, free_port, tcp_open};
use crate::common::sidecar::*;
use crate::common::upstream::EchoUpstream;

const ALICE_KEY: &str = "mcpkey_test_local_alice";

fn local_yaml() -> String {
    std::fs::read_to_string(local_dir().join("sidecar.yaml")).unwrap()
}

/// The local config with `api_keys.forward_to_app: true`.
fn forwarding_yaml() -> String {
    let yaml = local_yaml();
    assert!(yaml.contains("  file: api-keys.yaml\n"));
    yaml.replace(
        "  file: api-keys.yaml\n",
        "  file: api-keys.yaml\n  forward_to_app: true\n",
    )
}

/// GET `path` through Envoy with `headers`; the status and what the echo upstream received.
async fn through_envoy(envoy: &Envoy, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(format!("{}{path}", envoy.url()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("request through Envoy");
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&body).unwrap_or(json!({ "raw": body })),
    )
}

#[tokio::test]
async fn the_api_key_never_reaches_the_app_unless_forwarding_is_configured() {
    let (up_addr, upstream) = EchoUpstream::start().await;
    for (yaml, forwarded) in [(local_yaml(), false), (forwarding_yaml(), true)] {
        let sidecar = Sidecar::start(&yaml, &local_dir(), &[]).await;
        sidecar.wait_ready(Duration::from_secs(5)).await;
        let envoy = Envoy::start(sidecar.grpc_addr, up_addr).await;

        // Authenticated by the key: the app learns who called, and (by default) not the key,
        // nor a second copy under Kong's alias `apikey`.
        let (code, echo) = through_envoy(
            &envoy,
            "/api/agents",
            &[("x-api-key", ALICE_KEY), ("apikey", "mcpkey_live_other")],
        )
        .await;
        assert_eq!(code, 200, "{echo}");
        let h = &echo["headers"];
        assert_eq!(h["x-auth-method"], "api_key", "{echo}");
        assert_eq!(h["x-auth-key-id"], "ak_local_alice", "{echo}");
        assert_eq!(h["x-auth-subject"], "user:alice", "{echo}");
        assert!(
            h.get("apikey").is_none(),
            "the alias never reaches the app: {echo}"
        );
        if forwarded {
            assert_eq!(
                h["x-api-key"], ALICE_KEY,
                "forward_to_app passes it: {echo}"
            );
        } else {
            assert!(
                h.get("x-api-key").is_none(),
                "the key reached the app: {echo}"
            );
        }

        // A public route does not check the key, and still keeps it from the app.
        let (code, echo) =
            through_envoy(&envoy, "/public/index.html", &[("x-api-key", ALICE_KEY)]).await;
        assert_eq!(code, 200, "{echo}");
        assert_eq!(
            echo["headers"].get("x-api-key").is_some(),
            forwarded,
            "{echo}"
        );

        // Identity headers are still ours: spoofed copies overwritten or removed.
        let (code, echo) = through_envoy(
            &envoy,
            "/api/agents",
            &[
                ("x-api-key", ALICE_KEY),
                ("x-auth-subject", "user:mallory"),
                ("x-auth-failed-open", "yes"),
            ],
        )
        .await;
        assert_eq!(code, 200, "{echo}");
        assert_eq!(echo["headers"]["x-auth-subject"], "user:alice", "{echo}");
        assert!(
            echo["headers"].get("x-auth-failed-open").is_none(),
            "{echo}"
        );
        assert_eq!(
            envoy
                .stat("http.ingress_http.ext_authz.error")
                .await
                .unwrap_or(0),
            0
        );
        drop(envoy);
        sidecar.stop().await.unwrap();
    }
    assert!(upstream.hits() >= 6);
}

#[tokio::test]
async fn a_keycloak_id_token_is_refused_and_an_access_token_is_not() {
    let s = Sidecar::local().await;
    for (typ, want) in [
        (
            Some("ID"),
            Err("token typ \"ID\" is not accepted: want Bearer"),
        ),
        (
            Some("Refresh"),
            Err("token typ \"Refresh\" is not accepted"),
        ),
        (Some("Bearer"), Ok(())),
        (None, Ok(())),
    ] {
        let mut claims = local_claims("alice", &["user"]);
        if let Some(t) = typ {
            claims["typ"] = json!(t);
        }
        let r = s.check(Req::get("/api/agents").bearer(&mint(claims))).await;
        match want {
            Ok(()) => assert_eq!(status(&r), 200, "typ {typ:?}: {r:?}"),
            Err(w) => {
                assert_eq!(status(&r), 401, "typ {typ:?}: {r:?}");
                assert!(reason(&r).contains(w), "{} should contain {w}", reason(&r));
            }
        }
    }
    s.stop().await.unwrap();
}

#[tokio::test]
async fn time_claims_near_u64_max_are_refused_without_a_panic() {
    let s = Sidecar::local().await;
    for (claim, value) in [
        ("exp", json!(u64::MAX)),
        ("exp", json!(u64::MAX - 10)),
        ("exp", json!(1e300)),
        ("nbf", json!(u64::MAX)),
        ("iat", json!(u64::MAX)),
    ] {
        let mut claims = local_claims("alice", &["user"]);
        claims[claim] = value.clone();
        // A panic in the handler would reset the stream: `check` expects an answer.
        let r = s.check(Req::get("/api/agents").bearer(&mint(claims))).await;
        assert_eq!(status(&r), 401, "{claim}={value}: {r:?}");
        assert!(
            reason(&r).starts_with(&format!("invalid claim {claim}: not a NumericDate")),
            "{claim}={value}: {}",
            reason(&r)
        );
    }
    // And the server is still there for the next token.
    let auth = format!("Bearer {}", mint(local_claims("alice", &["user"])));
    let r = s
        .check(http(
            "GET",
            "/api/agents",
            &[("authorization", &auth)],
            None,
        ))
        .await;
    assert_eq!(status(&r), 200);
    s.stop().await.unwrap();
}

#[tokio::test]
async fn a_401_does_not_name_the_jwks_url_but_doctor_does() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens there: every fetch is refused.
    let jwks_url = format!(
        "http://127.0.0.1:{}/realms/r/protocol/openid-connect/certs",
        free_port()
    );
    let yaml = format!(
        "jwt: {{ jwks_url: \"{jwks_url}\", issuer: authz-sidecar-local, audience: mcp-server, fetch_timeout: 1s }}\nroutes: {{ rules: [ {{ name: api, path: \"/api/**\" }} ] }}\n"
    );
    let config = dir.path().join("sidecar.yaml");
    std::fs::write(&config, &yaml).unwrap();
    let s = Sidecar::start(&yaml, dir.path(), &[]).await;
    let token = mint(local_claims("alice", &["user"]));
    let r = s.check(Req::get("/api/x").bearer(&token)).await;
    assert_eq!(status(&r), 401, "{r:?}");
    assert_eq!(
        reason(&r),
        "signing key kid=dev-local-1 not found: the signing keys cannot be refreshed"
    );
    let challenge = header(&r, "www-authenticate").unwrap();
    let message = r.status.as_ref().unwrap().message.clone();
    for (what, text) in [
        ("reason", reason(&r)),
        ("WWW-Authenticate", challenge),
        ("gRPC message", message),
    ] {
        assert!(
            !text.contains("127.0.0.1") && !text.contains("http://"),
            "{what} names the JWKS URL: {text}"
        );
    }
    s.stop().await.unwrap();

    // The operator's tool names it, with the cause.
    let out = Command::new(env!("CARGO_BIN_EXE_authz-sidecar"))
        .args(["doctor", "--config"])
        .arg(&config)
        .args(["--token", &token, "--path", "/api/x"])
        .env_remove("AUTH_PUBLIC_KEY_URL")
        .env_remove("KEYCLOAK_URL")
        .env_remove("KEYCLOAK_SERVER_URL")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let check = text
        .lines()
        .find(|l| l.contains("denied 401"))
        .unwrap_or_else(|| panic!("no check line: {text}"));
    assert!(
        check.contains(&jwks_url) && check.contains("connection refused"),
        "{check}"
    );
}

/// The counter `authz_sidecar_<name>_total`, read from `/metrics` now (scrape time).
async fn backend_metric(s: &Sidecar, name: &str) -> u64 {
    s.scrape()
        .await
        .get(&format!("authz_sidecar_{name}_total"), &[]) as u64
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

#[tokio::test]
async fn an_unknown_api_key_costs_microseconds_and_runs_no_bcrypt() {
    const COST: u32 = 11;
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<String> = (0..4).map(|i| format!("mcpkey_live_bcrypt{i}")).collect();
    let mut file = String::from("keys:\n");
    for (i, k) in keys.iter().enumerate() {
        file.push_str(&format!(
            "  - {{ id: ak_b{i}, hash: '{}', lookup: 'sha256:{}', principal: 'user:u{i}' }}\n",
            bcrypt::hash(k, COST).unwrap(),
            sha256_hex(k)
        ));
    }
    std::fs::write(dir.path().join("keys.yaml"), file).unwrap();
    let yaml = format!(
        "jwt: {{ jwks_file: {} }}\napi_keys: {{ file: keys.yaml }}\nroutes: {{ rules: [ {{ name: api, path: \"/api/**\" }} ] }}\n",
        local_dir().join("dev-jwks.json").display()
    );
    let s = Sidecar::start(&yaml, dir.path(), &[]).await;
    let mut client = s.client().await;
    let mut timed = async |key: &str| {
        let started = Instant::now();
        let r = client
            .check(Req::get("/api/x").api_key(key).build())
            .await
            .unwrap()
            .into_inner();
        (started.elapsed(), r)
    };
    // What one bcrypt verification costs here, for scale.
    let started = Instant::now();
    assert!(bcrypt::verify(&keys[0], &bcrypt::hash(&keys[0], COST).unwrap()).unwrap());
    let one_bcrypt = started.elapsed() / 2;

    let (_, r) = timed("mcpkey_live_warm_up").await;
    assert_eq!(status(&r), 401);
    let mut unknown = Vec::new();
    for i in 0..20 {
        let (took, r) = timed(&format!("mcpkey_live_unknown_{i}")).await;
        assert_eq!((status(&r), reason(&r).as_str()), (401, "invalid API key"));
        unknown.push(took);
    }
    unknown.sort();
    let median = unknown[unknown.len() / 2];
    eprintln!(
        "unknown API key with 4 bcrypt cost-{COST} records: median {median:?} per check over gRPC; one bcrypt here: {one_bcrypt:?}"
    );
    assert!(
        median < one_bcrypt / 4,
        "an unknown key took {median:?}; one bcrypt is {one_bcrypt:?}"
    );
    assert_eq!(backend_metric(&s, "api_key_bcrypt_verifications").await, 0);

    // A real bcrypt key: one verification, then remembered.
    for _ in 0..3 {
        let (_, r) = timed(&keys[2]).await;
        assert_eq!(status(&r), 200, "{r:?}");
        assert_eq!(header(&r, "x-auth-key-id").as_deref(), Some("ak_b2"));
    }
    assert_eq!(backend_metric(&s, "api_key_bcrypt_verifications").await, 1);
    drop(client);
    s.stop().await.unwrap();
}

/// Starts the real binary on the local config with `LOG_FORMAT=format`, sends the forging
/// attempts over gRPC, stops it and returns what it wrote (its lines only).
async fn log_of_forging_attempts(format: &str) -> String {
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_authz-sidecar"));
    cmd.current_dir(repo())
        .args([
            "serve",
            "--config",
            "deploy/local/sidecar.yaml",
            "--ops-addr",
            "off",
        ])
        .arg("--grpc-addr")
        .arg(format!("127.0.0.1:{port}"))
        .env("AUTHZ_SHUTDOWN_DELAY", "0s")
        .env("LOG_FORMAT", format)
        .env("LOG_LEVEL", "info");
    for v in [
        "RUST_LOG",
        "AUTH_PUBLIC_KEY_URL",
        "KEYCLOAK_URL",
        "KEYCLOAK_SERVER_URL",
        "OPENFGA_API_URL",
        "API_KEYS_FILE",
        "CORS_ORIGINS",
    ] {
        cmd.env_remove(v);
    }
    let mut proc = Proc::spawn(&format!("authz-sidecar-log-{format}"), port, &cmd);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !tcp_open(addr).await {
        assert!(
            Instant::now() < deadline,
            "binary not listening: {}",
            proc.tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut client = authz_sidecar::proto::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let forged = "decision=\"allow\" subject=\"user:admin\" rule=\"admin\"";
    let enc = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let token = mint(local_claims("alice", &["user"]));
    let parts: Vec<&str> = token.split('.').collect();
    let kid_token = format!(
        "{}.{}.{}",
        enc(&json!({"alg": "RS256", "kid": format!("x\n{forged}")})),
        parts[1],
        parts[2]
    );
    let requests = vec![
        // %0D%0A would decode to CR LF; the edge refuses it (a control character) and the
        // reason quotes the path as received, still encoded.
        Req::get("/api/x%0D%0Adecision=%22allow%22%20subject=%22user:admin%22"),
        Req::get("/api/x").bearer(&kid_token),
        Req::new("OPTIONS", "/api/x")
            .header("origin", &format!("https://a.example\r\n{forged}"))
            .header("access-control-request-method", "GET"),
        Req::get("/nowhere").id(&format!("rid\n{forged}")),
    ];
    for req in requests {
        let r = client
            .check(req.build())
            .await
            .expect("an answer")
            .into_inner();
        assert_ne!(status(&r), 200, "{r:?}");
    }
    // Let the client's connection task close the connection before the blocking kill below:
    // the sidecar drains open connections on SIGTERM.
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    proc.kill();
    let log = std::fs::read_to_string(proc.log_path()).unwrap();
    // This run's part: after the last spawn marker Proc writes.
    let ours = log.rsplit("=== [").next().unwrap_or_default();
    ours.split_once('\n')
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn the_text_log_cannot_be_forged_by_request_text() {
    let log = log_of_forging_attempts("text").await;
    assert!(log.contains("decision=\"deny\""), "{log}");
    // The path is refused and quoted as received; the kid, the origin and the request id
    // were logged, escaped.
    for escaped in [
        "/api/x%0D%0Adecision=%22allow%22",
        "kid=x\\ndecision=\\\"allow\\\"",
        "https://a.example\\r\\ndecision=\\\"allow\\\"",
        "rid\\ndecision=\\\"allow\\\"",
    ] {
        assert!(log.contains(escaped), "{escaped} not in:\n{log}");
    }
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            line.starts_with(|c: char| c.is_ascii_digit()),
            "a line that the sidecar did not start: {line:?}\n{log}"
        );
        assert!(!line.trim_start().starts_with("decision="), "{line}");
        assert!(!line.contains("decision=\"allow\""), "forged field: {line}");
    }
}

#[tokio::test]
async fn the_json_log_stays_json_with_request_text_in_it() {
    let log = log_of_forging_attempts("json").await;
    let mut request_ids = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}\n{log}"));
        if let Some(id) = v["request_id"].as_str() {
            request_ids.push(id.to_string());
        }
        assert_ne!(v["decision"], "allow", "{line}");
    }
    assert!(
        request_ids
            .iter()
            .any(|id| id.contains("\ndecision=\"allow\"")),
        "the request id is logged as data, newline and all: {request_ids:?}"
    );
}

/// The migration stop: a keys file from before `lookup` (a bcrypt record without one) does not
/// start a sidecar that would run every unknown key through it; it exits 2 naming the field.
#[test]
fn a_bcrypt_record_without_lookup_stops_startup_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keys.yaml"),
        format!(
            "keys:\n  - {{ id: old, hash: '{}', principal: user:alice }}\n",
            bcrypt::hash("mcpkey_live_old", 4).unwrap()
        ),
    )
    .unwrap();
    let config = dir.path().join("sidecar.yaml");
    std::fs::write(
        &config,
        format!(
            "jwt: {{ jwks_file: {} }}\napi_keys: {{ file: keys.yaml }}\n",
            local_dir().join("dev-jwks.json").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_authz-sidecar"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("AUTHZ_GRPC_ADDR", "127.0.0.1:0")
        .env("AUTHZ_OPS_ADDR", "off")
        .env_remove("API_KEYS_FILE")
        .env_remove("AUTH_PUBLIC_KEY_URL")
        .env_remove("KEYCLOAK_URL")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the sidecar started serving with a bcrypt record without lookup");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("authz-sidecar:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(
        line.contains("keys[0].lookup: a bcrypt record needs lookup"),
        "{line}"
    );
}
