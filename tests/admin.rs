//! The operator's admin endpoints on the ops listener, against the in-process sidecar with a
//! real OpenFGA and a JWKS file: `POST /admin/cache/flush` empties the decision cache (the
//! next identical check is OpenFGA's answer again), `POST /admin/jwks/refresh` picks up a
//! rotated key file, `GET /admin/config` shows the effective config without any configured
//! secret, and a peer other than this host's loopback is refused while probes still answer.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use authz_sidecar::Config;
use authz_sidecar::proto::pb::envoy::service::auth::v3::{
    CheckResponse, check_response::HttpResponse,
};
use common::openfga::OpenFga;
use common::sidecar::*;
use serde_json::{Value, json};

/// (status, body) of an ops request, from `from` when given (the client's source address).
async fn ops(method: &str, addr: SocketAddr, path: &str, from: Option<IpAddr>) -> (u16, String) {
    let mut client = reqwest::Client::builder().timeout(Duration::from_secs(10));
    if let Some(ip) = from {
        client = client.local_address(ip);
    }
    let r = client
        .build()
        .unwrap()
        .request(method.parse().unwrap(), format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The string fields of an answer's dynamic metadata.
fn metadata(r: &CheckResponse) -> BTreeMap<String, String> {
    use prost_types::value::Kind;
    r.dynamic_metadata
        .iter()
        .flat_map(|m| m.fields.iter())
        .filter_map(|(k, v)| match &v.kind {
            Some(Kind::StringValue(s)) => Some((k.clone(), s.clone())),
            _ => None,
        })
        .collect()
}

fn deny_body(r: &CheckResponse) -> Value {
    match &r.http_response {
        Some(HttpResponse::DeniedResponse(d)) => json_of(&d.body),
        _ => panic!("not a deny: {r:?}"),
    }
}

/// A config from `yaml` with the tests' listeners: gRPC on a free loopback port, ops on
/// `ops_addr`, no shutdown delay.
fn config_with_ops(yaml: &str, base: &Path, ops_addr: &str) -> Config {
    let env: BTreeMap<String, String> = [
        ("AUTHZ_GRPC_ADDR", "127.0.0.1:0"),
        ("AUTHZ_OPS_ADDR", ops_addr),
        ("AUTHZ_SHUTDOWN_DELAY", "0s"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Config::from_yaml(yaml, base, &env).expect("test config is valid")
}

fn local_yaml() -> String {
    std::fs::read_to_string(local_dir().join("sidecar.yaml")).unwrap()
}

#[tokio::test]
async fn a_cache_flush_sends_the_next_identical_check_to_openfga_again() {
    let fga = OpenFga::shared().await;
    let (store, _) = fga
        .store("admin-flush")
        .tuples(&[("user:alice", "executor", "tool:agent_chat")])
        .create()
        .await;
    // The changelog is followed once an hour here, so only the flush can forget the answer.
    let yaml = std::fs::read_to_string(local_dir().join("sidecar-openfga.yaml"))
        .unwrap()
        .replace("changelog_interval: 1s", "changelog_interval: 1h");
    let s = Sidecar::start(
        &yaml,
        &local_dir(),
        &[
            ("OPENFGA_API_URL", &fga.http_url()),
            ("OPENFGA_STORE_ID", &store),
        ],
    )
    .await;
    s.wait_ready(Duration::from_secs(10)).await;
    let token = mint(local_claims("alice", &["user"]));
    let run = || Req::post("/tools/agent_chat/execute").bearer(&token);

    let first = s.check(run()).await;
    assert_eq!(status(&first), 200, "OpenFGA holds the tuple");
    fga.delete_tuples(&store, &[("user:alice", "executor", "tool:agent_chat")])
        .await;
    assert!(
        !fga.check(&store, "user:alice", "executor", "tool:agent_chat")
            .await
    );
    assert_eq!(
        status(&s.check(run()).await),
        200,
        "the remembered answer is served, the deletion not seen yet"
    );

    let (code, body) = ops("POST", s.ops_addr, "/admin/cache/flush", None).await;
    assert_eq!(code, 200, "{body}");
    let flushed = json_of(&body)["flushed"].clone();
    assert_eq!(flushed["decisions"], 1, "{body}");
    assert_eq!(flushed["tokens"], 1, "alice's verified token: {body}");

    let after = s.check(run()).await;
    assert_eq!(
        status(&after),
        403,
        "the next identical check is OpenFGA's answer"
    );
    // The deny names its decision id in the body and in the metadata Envoy logs.
    let (m, body) = (metadata(&after), deny_body(&after));
    assert_eq!(m["decision_id"].len(), 16, "{m:?}");
    assert_eq!(body["decision_id"], m["decision_id"].as_str(), "{body}");
    assert_eq!(
        (
            m["decision"].as_str(),
            m["rule"].as_str(),
            m["subject"].as_str()
        ),
        ("deny", "tool-execute", "user:alice")
    );
    assert_ne!(metadata(&first)["decision_id"], m["decision_id"]);
    assert_eq!(metadata(&first)["decision"], "allow");

    // Mutating endpoints are POST only.
    let (code, _) = ops("GET", s.ops_addr, "/admin/cache/flush", None).await;
    assert_eq!(code, 405);
}

/// A JWKS document holding the fixture keys named by `kids`.
fn jwks_with(kids: &[&str]) -> String {
    let all =
        json_of(&std::fs::read_to_string(repo().join("tests/fixtures/keys/jwks.json")).unwrap());
    let keys: Vec<Value> = all["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| kids.contains(&k["kid"].as_str().unwrap()))
        .cloned()
        .collect();
    json!({ "keys": keys }).to_string()
}

#[tokio::test]
async fn a_jwks_refresh_picks_up_a_rotated_key_file_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks_with(&["rsa-a"])).unwrap();
    // Neither the periodic refresh nor an unknown kid refetches within the test.
    let yaml = "jwt: { jwks_file: jwks.json, refresh_interval: 1h, refresh_cooldown: 1h }\n\
                routes: { rules: [ { name: api, path: \"/api/**\" } ] }\n";
    let s = Sidecar::start(yaml, dir.path(), &[]).await;
    s.wait_ready(Duration::from_secs(5)).await;
    let pem = std::fs::read(repo().join("tests/fixtures/keys/rsa-b.pem")).unwrap();
    let claims = json!({"sub": "alice", "exp": now() + 600});
    let token =
        authz_sidecar::authn::jwt::mint(&pem, jsonwebtoken::Algorithm::RS256, "rsa-b", &claims)
            .unwrap();
    let check = || s.check(Req::get("/api/x").bearer(&token));
    assert_eq!(status(&check().await), 401, "rsa-b is not trusted yet");

    std::fs::write(&file, jwks_with(&["rsa-a", "rsa-b"])).unwrap();
    assert_eq!(
        status(&check().await),
        401,
        "the cooldown holds back a refetch"
    );
    let (code, body) = ops("POST", s.ops_addr, "/admin/jwks/refresh", None).await;
    assert_eq!(code, 200, "{body}");
    let answer = json_of(&body);
    assert_eq!(answer["key_ids"], json!(["rsa-a", "rsa-b"]), "{body}");
    assert!(
        answer["source"].as_str().unwrap().contains("jwks.json"),
        "{body}"
    );
    assert_eq!(
        status(&check().await),
        200,
        "rsa-b trusted from the refresh on"
    );

    // Rotated out: the refresh also forgets the verified token, so it is refused at once.
    std::fs::write(&file, jwks_with(&["rsa-a"])).unwrap();
    let (code, body) = ops("POST", s.ops_addr, "/admin/jwks/refresh", None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(json_of(&body)["tokens_forgotten"], 1, "{body}");
    assert_eq!(
        status(&check().await),
        401,
        "rsa-b's token refused after rotation"
    );

    // A broken file: the operator reads why (naming the file), the last good keys serve.
    std::fs::write(&file, "{ not json").unwrap();
    let (code, body) = ops("POST", s.ops_addr, "/admin/jwks/refresh", None).await;
    assert_eq!(code, 502, "{body}");
    assert!(
        json_of(&body)["error"]
            .as_str()
            .unwrap()
            .contains("jwks.json"),
        "{body}"
    );
    let pem_a = std::fs::read(repo().join("tests/fixtures/keys/rsa-a.pem")).unwrap();
    let token_a =
        authz_sidecar::authn::jwt::mint(&pem_a, jsonwebtoken::Algorithm::RS256, "rsa-a", &claims)
            .unwrap();
    assert_eq!(
        status(&s.check(Req::get("/api/x").bearer(&token_a)).await),
        200
    );
}

#[tokio::test]
async fn the_effective_config_shows_no_configured_secret() {
    let secrets = [
        "fga-api-token-s3cr3t",
        "lookup-s3cr3t-value",
        "jwks-url-pass-s3cr3t",
        "header-compare-s3cr3t",
    ];
    let yaml = format!(
        r#"{local}
openfga:
  api_url: http://127.0.0.1:1
  store_id: 01ADMINTESTSTORE
  api_token: {token}
"#,
        local = local_yaml()
            .replace(
                "api_keys:\n",
                &format!("api_keys:\n  lookup_secret: {}\n", secrets[1])
            )
            .replace(
                "    - { name: api, path: \"/api/**\" }",
                &format!(
                    "    - {{ name: internal, path: /internal, when: [\"header:x-internal == {}\"] }}\n    - {{ name: api, path: \"/api/**\" }}",
                    secrets[3]
                )
            ),
        token = secrets[0],
    );
    assert!(
        yaml.contains(secrets[1]) && yaml.contains(secrets[3]),
        "{yaml}"
    );
    let s = Sidecar::start(
        &yaml,
        &local_dir(),
        &[(
            "AUTH_PUBLIC_KEY_URL",
            &format!("http://kc:{}@127.0.0.1:1/certs?x=1", secrets[2]),
        )],
    )
    .await;
    let (code, body) = ops("GET", s.ops_addr, "/admin/config", None).await;
    assert_eq!(code, 200, "{body}");
    for secret in secrets {
        assert!(!body.contains(secret), "{secret} shown: {body}");
    }
    // Nor the API-key records' hashes: they stay in their own file.
    let keys = std::fs::read_to_string(local_dir().join("api-keys.yaml")).unwrap();
    for hash in keys.lines().filter_map(|l| l.trim().strip_prefix("hash: ")) {
        assert!(
            !body.contains(hash.trim_start_matches("sha256:")),
            "{hash} shown"
        );
    }
    let shown = json_of(&body);
    assert_eq!(shown["openfga"]["api_token"], "<redacted>");
    assert_eq!(shown["api_keys"]["lookup_secret"], "<redacted>");
    assert_eq!(shown["openfga"]["store_id"], "01ADMINTESTSTORE");
    assert_eq!(
        shown["jwt"]["source"]["jwks_url"],
        "http://redacted@127.0.0.1:1/certs?redacted"
    );
    assert_eq!(shown["routes"]["rules"][0]["name"], "public");
    s.stop().await.unwrap();
}

/// A non-loopback address of this host (the one a route to the outside would leave from);
/// no packet is sent.
fn non_loopback_local_ip() -> Option<IpAddr> {
    [
        "192.0.2.1:9",
        "10.255.255.1:9",
        "8.8.8.8:53",
        "[2001:db8::1]:9",
    ]
    .iter()
    .find_map(|probe| {
        let bind = if probe.starts_with('[') {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        };
        let socket = std::net::UdpSocket::bind(bind).ok()?;
        socket.connect(probe).ok()?;
        let ip = socket.local_addr().ok()?.ip();
        (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
    })
}

#[tokio::test]
async fn admin_routes_answer_loopback_only_while_probes_answer_anyone() {
    // Istio's inbound traffic arrives from 127.0.0.6: loopback, but not this host's operator.
    let s = Sidecar::local().await;
    let (code, body) = ops(
        "GET",
        s.ops_addr,
        "/admin/config",
        Some("127.0.0.6".parse().unwrap()),
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("127.0.0.6") && body.contains("server.admin.allow_remote"),
        "{body}"
    );
    assert_eq!(body.trim_end().lines().count(), 1, "one line: {body}");
    let (code, _) = ops(
        "POST",
        s.ops_addr,
        "/admin/cache/flush",
        Some("127.0.0.6".parse().unwrap()),
    )
    .await;
    assert_eq!(code, 403);
    let (code, _) = ops(
        "GET",
        s.ops_addr,
        "/healthz",
        Some("127.0.0.6".parse().unwrap()),
    )
    .await;
    assert_eq!(code, 200, "probes answer any peer");
    let (code, _) = ops(
        "GET",
        s.ops_addr,
        "/admin/config",
        Some("127.0.0.1".parse().unwrap()),
    )
    .await;
    assert_eq!(code, 200);
    s.stop().await.unwrap();

    // A real non-loopback peer, when this host has an address other than loopback.
    let Some(ip) = non_loopback_local_ip() else {
        eprintln!(
            "no non-loopback address here: only 127.0.0.6 and the unit tests of ops::admin_refusal cover remote peers"
        );
        return;
    };
    eprintln!("a non-loopback peer: {ip}");
    let ops_addr = SocketAddr::new(ip, 0).to_string();
    let s = Sidecar::start_config(config_with_ops(&local_yaml(), &local_dir(), &ops_addr)).await;
    for path in ["/healthz", "/metrics"] {
        let (code, _) = ops("GET", s.ops_addr, path, Some(ip)).await;
        assert_eq!(code, 200, "{path} from {ip}");
    }
    let (code, body) = ops("POST", s.ops_addr, "/admin/jwks/refresh", Some(ip)).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains(&ip.to_string()), "{body}");
    s.stop().await.unwrap();

    let open = local_yaml().replace("server:\n", "server:\n  admin: { allow_remote: true }\n");
    let s = Sidecar::start_config(config_with_ops(&open, &local_dir(), &ops_addr)).await;
    let (code, body) = ops("POST", s.ops_addr, "/admin/jwks/refresh", Some(ip)).await;
    assert_eq!(code, 200, "allow_remote: {body}");
    s.stop().await.unwrap();

    let off = local_yaml().replace("server:\n", "server:\n  admin: { enabled: false }\n");
    let s = Sidecar::start(&off, &local_dir(), &[]).await;
    let (code, body) = ops("GET", s.ops_addr, "/admin/config", None).await;
    assert_eq!(code, 404, "{body}");
    s.stop().await.unwrap();
}

#[tokio::test]
async fn the_config_shown_is_the_one_serving_after_a_reload_restart_only_keys_as_started() {
    let dir = tempfile::tempdir().unwrap();
    let local = local_dir();
    let base = local_yaml()
        .replace(
            "jwks_file: dev-jwks.json",
            &format!("jwks_file: {}", local.join("dev-jwks.json").display()),
        )
        .replace(
            "file: api-keys.yaml",
            &format!("file: {}", local.join("api-keys.yaml").display()),
        )
        .replace("server:\n", "server:\n  reload_interval: 0s\n");
    let path = dir.path().join("sidecar.yaml");
    std::fs::write(&path, &base).unwrap();
    let s = Sidecar::start_file(&path, &[]).await;
    let shown = json_of(&ops("GET", s.ops_addr, "/admin/config", None).await.1);
    assert_eq!(shown["server"]["drain_timeout"], "20s");
    assert_eq!(shown["routes"]["rules"].as_array().unwrap().len(), 4);

    let changed = base
        .replace("server:\n", "server:\n  drain_timeout: 3s\n")
        .replace(
            "    - { name: api, path: \"/api/**\" }",
            "    - { name: api, path: \"/api/**\" }\n    - { name: docs, path: /docs, public: true }",
        );
    std::fs::write(&path, changed).unwrap();
    let outcome = s.reload().await;
    assert!(outcome.applied(), "{outcome:?}");
    let shown = json_of(&ops("GET", s.ops_addr, "/admin/config", None).await.1);
    assert_eq!(
        shown["routes"]["rules"][4]["name"], "docs",
        "the reloaded rules"
    );
    assert_eq!(
        shown["server"]["drain_timeout"], "20s",
        "a restart-only key shows the value that runs"
    );
    s.stop().await.unwrap();
}
