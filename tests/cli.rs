//! The binary as operators run it: startup errors (one line, exit 2), `token mint`,
//! `token inspect`, `apikey new`, `doctor` (text and `--json`), and SIGTERM draining to exit 0.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::openfga::OpenFga;
use common::sidecar::{local_claims, local_dir, mint, now};
use serde_json::{Value, json};

fn bin() -> Command {
    common::binary::sidecar()
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn bad_configs_exit_2_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(local_dir().join("dev-jwks.json"), dir.path().join("k.json")).unwrap();
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "jwt: { jwks_file: k.json, algorithms: [HS256] }",
            vec![],
            "jwt.algorithms",
        ),
        (
            "jwt: { jwks_file: k.json }\nroutes: { rules: [ { path: nope } ] }",
            vec![],
            "routes.rules[0].path",
        ),
        (
            "jwt: { jwks_file: k.json }",
            vec![("CORS_ORIGINS", "*")],
            "CORS_ORIGINS",
        ),
        (
            "jwt: { jwks_file: k.json }",
            vec![("AUTHZ_SHUTDOWN_DELAY", "soon")],
            "server.shutdown_delay (AUTHZ_SHUTDOWN_DELAY)",
        ),
        (
            "server: { shutdown_delay: soon }\njwt: { jwks_file: k.json }",
            vec![("AUTHZ_SHUTDOWN_DELAY", "")],
            "server.shutdown_delay",
        ),
        (
            "jwt: { jwks_file: k.json }",
            vec![("KEYCLOAK_URL", "http://127.0.0.1:1")],
            "KEYCLOAK_REALM",
        ),
        (
            "jwt: { jwks_file: k.json }",
            vec![("OPENFGA_API_URL", "http://127.0.0.1:1")],
            "OPENFGA_STORE_ID",
        ),
        ("jwt: { jwks_file: missing.json }", vec![], "jwt.jwks_file"),
        (
            "jwt: { jwks_file: k.json }\napi_keys: { file: nope.yaml }",
            vec![],
            "API_KEYS_FILE",
        ),
        ("jwt: [oops", vec![], "config file"),
    ];
    for (yaml, env, want) in cases {
        let cfg = write(dir.path(), "c.yaml", yaml);
        let mut cmd = bin();
        cmd.args(["serve", "--config"])
            .arg(&cfg)
            .env("AUTHZ_GRPC_ADDR", "127.0.0.1:0")
            .env("AUTHZ_OPS_ADDR", "off");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{yaml}: {stderr}");
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("authz-sidecar:"))
            .collect();
        assert_eq!(lines.len(), 1, "{yaml}: {stderr}");
        assert!(
            lines[0].contains(want),
            "{yaml}: {stderr} should name {want}"
        );
    }
}

#[test]
fn worker_threads_from_the_environment_are_checked_not_panicked_on() {
    for (value, ok) in [
        ("2", true),
        ("", true),
        (" 1 ", true),
        ("0", false),
        ("abc", false),
    ] {
        let out = bin()
            .args(["check-config", "--config", "deploy/local/sidecar.yaml"])
            .env("TOKIO_WORKER_THREADS", value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if ok {
            assert!(out.status.success(), "{value:?}: {stderr}");
        } else {
            assert_eq!(out.status.code(), Some(2), "{value:?}: {stderr}");
            assert!(
                stderr.contains("TOKIO_WORKER_THREADS") && !stderr.contains("panicked"),
                "{value:?}: {stderr}"
            );
        }
    }
}

/// `check-config` says which issuer, audience and key source are in force and where each came
/// from, so the issuer trap (a variable replacing the file's key source) is visible before
/// a single token is refused.
#[test]
fn check_config_prints_the_effective_issuer_and_where_it_came_from() {
    let out = bin()
        .args(["check-config", "--config", "deploy/local/sidecar.yaml"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("(from jwt.jwks_file)"), "{text}");
    assert!(
        text.contains("issuer: authz-sidecar-local (from jwt.issuer)"),
        "{text}"
    );
    assert!(
        text.contains("audience: mcp-server (from jwt.audience)"),
        "{text}"
    );
    let out = bin()
        .args(["check-config", "--config", "deploy/local/sidecar.yaml"])
        .env("KEYCLOAK_URL", "http://keycloak:8080")
        .env("KEYCLOAK_REALM", "mcp-server")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("(from KEYCLOAK_URL)"), "{text}");
    assert!(
        text.contains("issuer: the realm's, from OIDC discovery"),
        "{text}"
    );
    assert!(text.contains("realm: mcp-server"), "{text}");
}

/// `serve` has no default config: the embedded default trusts a public dev key, so serving it
/// must be asked for by name.
#[test]
fn serve_needs_a_config_named() {
    let out = bin()
        .arg("serve")
        .env_remove("AUTHZ_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--config"), "{stderr}");
}

#[test]
fn token_mint_and_apikey_new() {
    let out = bin()
        .args(["token", "mint", "--sub", "alice", "--roles", "admin,user"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(token.split('.').count(), 3);

    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    let out = bin()
        .args([
            "apikey",
            "new",
            "--principal",
            "user:alice",
            "--scopes",
            "read:agents,execute:tools",
            "--file",
        ])
        .arg(&keys)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(key.starts_with("mcpkey_live_") && key.len() == 55, "{key}");
    let file = std::fs::read_to_string(&keys).unwrap();
    assert!(!file.contains(&key), "the key itself is never stored");
    assert!(file.contains("user:alice") && file.contains("sha256:"));

    // doctor verifies both credentials against the config.
    let cfg = write(
        dir.path(),
        "c.yaml",
        &format!(
            "jwt: {{ jwks_file: {}, issuer: authz-sidecar-local, audience: mcp-server }}\napi_keys: {{ file: {} }}\nroutes: {{ rules: [ {{ path: /admin/**, roles: [admin] }} ] }}\n",
            local_dir().join("dev-jwks.json").display(),
            keys.display()
        ),
    );
    let out = bin()
        .args(["doctor", "--config"])
        .arg(&cfg)
        .args(["--token", &token, "--path", "/admin/x"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("valid: user:alice") && text.contains("allowed by rule"),
        "{text}"
    );
    assert!(!text.contains(&token), "doctor never prints the token");
    let out = bin()
        .args(["doctor", "--config"])
        .arg(&cfg)
        .args(["--api-key", &key, "--path", "/admin/x"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("denied 403: role admin required"), "{text}");
}

#[test]
fn sigterm_drains_and_exits_0() {
    let ops_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = bin()
        .args([
            "serve",
            "--config",
            "deploy/local/sidecar.yaml",
            "--grpc-addr",
            "127.0.0.1:0",
        ])
        .arg("--ops-addr")
        .arg(format!("127.0.0.1:{ops_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{ops_port}/readyz");
    let mut ready = false;
    for _ in 0..100 {
        if let Ok(200) = reqwest::blocking_get(&url) {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ready, "sidecar never became ready");
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    for _ in 0..100 {
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0));
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("sidecar did not exit after SIGTERM");
}

/// A rollout: after SIGTERM the sidecar says NOT_SERVING but keeps answering the checks Envoy
/// still sends for `server.shutdown_delay`, on open connections and new ones, then exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_answering_checks_through_the_shutdown_delay() {
    use common::sidecar::{Req, serving_status, status};
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (grpc, ops) = (free(), free());
    let mut child = bin()
        .env("AUTHZ_SHUTDOWN_DELAY", "2s")
        .args(["serve", "--config", "deploy/local/sidecar.yaml"])
        .arg("--grpc-addr")
        .arg(grpc.to_string())
        .arg("--ops-addr")
        .arg(ops.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let readyz = format!("http://{ops}/readyz");
    let ready_status = || {
        let url = readyz.clone();
        tokio::task::spawn_blocking(move || reqwest::blocking_get(&url).ok())
    };
    let mut ready = false;
    for _ in 0..100 {
        if ready_status().await.unwrap() == Some(200) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "sidecar never became ready");
    let connect = || async {
        authz_sidecar::proto::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::connect(format!("http://{grpc}"))
            .await
            .expect("the listener is open")
    };
    let mut open = connect().await;
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Inside the delay: told to go away, still answering.
    assert_eq!(
        serving_status(grpc, "envoy.service.auth.v3.Authorization").await,
        2,
        "NOT_SERVING during the delay"
    );
    assert_eq!(
        ready_status().await.unwrap(),
        Some(503),
        "/readyz says draining"
    );
    for _ in 0..5 {
        let r = open
            .check(Req::get("/public/x").build())
            .await
            .expect("a check on an open connection is answered")
            .into_inner();
        assert_eq!(status(&r), 200);
        let r = connect()
            .await
            .check(Req::get("/api/x").build())
            .await
            .expect("a check on a new connection is answered")
            .into_inner();
        assert_eq!(status(&r), 401);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "still running inside the 2 s delay"
    );
    drop(open);
    let code = common::binary::exit_code(
        &mut child,
        Duration::from_secs(10),
        "after the shutdown delay",
    )
    .await;
    assert_eq!(code, Some(0));
}

/// Runs the binary with `stdin` piped in; (exit code, stdout, stderr).
fn run(cmd: &mut Command, stdin: Option<&str>) -> (Option<i32>, String, String) {
    use std::io::Write;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut pipe = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        pipe.write_all(text.as_bytes()).unwrap();
    }
    drop(pipe);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn inspect(args: &[&str]) -> (Option<i32>, String, String) {
    run(bin().args(["token", "inspect"]).args(args), None)
}

fn signature(token: &str) -> &str {
    token.rsplit('.').next().unwrap()
}

fn mint_with_kid(kid: &str, claims: &Value) -> String {
    let pem = std::fs::read(local_dir().join("dev-signing-key.pem")).unwrap();
    authz_sidecar::authn::jwt::mint(&pem, jsonwebtoken::Algorithm::RS256, kid, claims).unwrap()
}

#[test]
fn token_inspect_shows_header_claims_and_times_but_not_the_signature() {
    let mut claims = local_claims("alice", &["admin"]);
    claims["exp"] = json!(now() + 250);
    let token = mint(claims);
    let (code, out, err) = inspect(&[&token]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"kid\": \"dev-local-1\""), "{out}");
    assert!(out.contains("\"alg\": \"RS256\""), "{out}");
    assert!(out.contains("\"preferred_username\": \"alice\""), "{out}");
    assert!(
        out.contains("signature  342 base64url characters (256 bytes), not shown"),
        "{out}"
    );
    assert!(
        !out.contains(signature(&token)),
        "the signature is never printed"
    );
    // exp is 250s (4m 10s) away; a second may pass before the binary reads the clock.
    assert!(
        out.contains("expires in 4m 10s") || out.contains("expires in 4m 9s"),
        "{out}"
    );
    assert!(
        out.contains("issued 0s ago") || out.contains("issued 1s ago"),
        "{out}"
    );
    let exp =
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(now() + 250))
            .to_string();
    assert!(
        out.contains(&format!("exp        {}", &exp[..16])),
        "exp shown as UTC: {out}"
    );

    let mut claims = local_claims("alice", &[]);
    claims["exp"] = json!(now() - (3 * 3600 + 2 * 60));
    let (code, out, err) = inspect(&[&mint(claims)]);
    assert_eq!(
        code,
        Some(0),
        "decoding an expired token is not an error: {err}"
    );
    assert!(out.contains("expired 3h 2m ago"), "{out}");
}

#[test]
fn token_inspect_with_config_verifies_like_the_server() {
    let cfg = "deploy/local/sidecar.yaml";
    let valid = mint(local_claims("alice", &["admin"]));
    let (code, out, err) = inspect(&["--config", cfg, &valid]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.lines().any(|l| l
            == "valid      user:alice (user), roles [admin], scopes [openid read:agents], kid dev-local-1"),
        "{out}"
    );

    let mut claims = local_claims("alice", &[]);
    claims["iss"] = json!("https://elsewhere/realms/other");
    let (code, out, _) = inspect(&["--config", cfg, &mint(claims)]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(
            "invalid    wrong issuer \"https://elsewhere/realms/other\": expected \"authz-sidecar-local\""
        ),
        "{out}"
    );
    // The claims are still shown: that is how the operator sees what the issuer was.
    assert!(
        out.contains("\"iss\": \"https://elsewhere/realms/other\""),
        "{out}"
    );

    let rotated = mint_with_kid("rotated-away", &local_claims("alice", &[]));
    let (code, out, _) = inspect(&["--config", cfg, &rotated]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("invalid    signing key kid=rotated-away not found in JWKS file"),
        "{out}"
    );

    let mut claims = local_claims("alice", &[]);
    claims["exp"] = json!(now() - 3600);
    let (code, out, _) = inspect(&["--config", cfg, &mint(claims)]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("invalid    token expired 36"), "{out}");

    // A disabled service principal is refused by the same admission as in the server.
    let mut claims = local_claims("service-account-svc-disabled", &[]);
    claims["client_id"] = json!("svc-disabled");
    let (code, out, _) = inspect(&["--config", cfg, &mint(claims)]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("invalid    service principal svc-disabled disabled"),
        "{out}"
    );

    let (code, _, err) = inspect(&["--config", "deploy/local/missing.yaml", &valid]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("config error: cannot read config file"),
        "{err}"
    );
}

#[test]
fn malformed_tokens_get_one_line_naming_what_is_wrong() {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let header = b64(r#"{"alg":"RS256","kid":"k"}"#);
    let cases = [
        ("abc.def".to_string(), "expected 3 dot-separated parts"),
        ("a.b.c.d.e".to_string(), "encrypted token (JWE)"),
        (format!("{header}.@@@.sig"), "payload is not base64url"),
        (
            format!("{}.{header}.sig", b64("not json")),
            "header is not JSON",
        ),
        (
            format!("{header}.{}.sig", b64("[1,2]")),
            "payload is JSON but not an object",
        ),
    ];
    for (token, want) in cases {
        let (code, out, err) = inspect(&[&token]);
        assert_eq!(code, Some(1), "{token}: {err}");
        assert!(out.is_empty(), "{token}: nothing decoded is printed: {out}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{token}: {err}");
        assert!(
            lines[0].starts_with("authz-sidecar: malformed token: ") && lines[0].contains(want),
            "{token}: {err} should say {want}"
        );
    }
}

#[test]
fn token_inspect_reads_stdin_with_or_without_bearer() {
    let token = mint(local_claims("alice", &[]));
    for (args, input) in [
        (vec!["-"], format!("Bearer {token}\n")),
        (vec!["-"], format!("  {token}  \n")),
        (vec![], format!("bearer {token}")),
    ] {
        let (code, out, err) = run(
            bin()
                .args(["token", "inspect", "--config", "deploy/local/sidecar.yaml"])
                .args(&args),
            Some(&input),
        );
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert!(out.contains("valid      user:alice"), "{args:?}: {out}");
        assert!(!out.contains(signature(&token)));
    }
    let (code, _, err) = run(bin().args(["token", "inspect", "-"]), Some("\n"));
    assert_eq!(code, Some(1));
    assert!(err.contains("malformed token: no token given"), "{err}");
}

/// A port nothing listens on.
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn doctor(cfg: &str, env: &[(&str, String)], args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = bin();
    cmd.args(["doctor", "--config", cfg]).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd, None)
}

fn findings(json: &str) -> Vec<(String, String, String)> {
    let v: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {json}"))
        .iter()
        .map(|f| {
            let field = |k: &str| {
                f[k].as_str()
                    .unwrap_or_else(|| panic!("{k} in {f}"))
                    .to_string()
            };
            (field("check"), field("status"), field("detail"))
        })
        .collect()
}

#[test]
fn doctor_reports_every_independent_problem_not_just_the_first() {
    let dead = dead_port();
    let (code, out, _) = doctor(
        "deploy/local/sidecar.yaml",
        &[
            ("CORS_ORIGINS", "*".into()),
            ("OPENFGA_API_URL", format!("http://127.0.0.1:{dead}")),
            ("API_KEYS_FILE", "deploy/local/missing-keys.yaml".into()),
            (
                "AUTH_PUBLIC_KEY_URL",
                format!("http://127.0.0.1:{dead}/certs"),
            ),
        ],
        &[],
    );
    assert_eq!(code, Some(2), "a config error is exit 2: {out}");
    for want in [
        "FAIL  config         CORS_ORIGINS: \"*\" is refused",
        "FAIL  config         OPENFGA_STORE_ID (openfga.store_id): store id not set",
        "FAIL  signing keys   Keycloak/JWKS not reachable: cannot fetch keys from JWKS http://127.0.0.1:",
        "FAIL  api keys       API_KEYS_FILE deploy/local/missing-keys.yaml",
        "FAIL  openfga api    http://127.0.0.1:",
        "skip  openfga        not checked: the openfga settings are invalid",
        "skip  cors           not checked: the cors settings are invalid",
        "ok    principals     2 service principals listed",
        "warn  principals     service principal svc-disabled is disabled",
        "5 problem(s) found",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    assert_eq!(out.matches("connection refused").count(), 2, "{out}");

    // KEYCLOAK_URL without a realm: the config names the realm, and Keycloak's reachability is
    // still told (it does not depend on the realm).
    let (code, out, _) = doctor(
        "deploy/local/sidecar.yaml",
        &[("KEYCLOAK_URL", format!("http://127.0.0.1:{dead}"))],
        &[],
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("FAIL  config         KEYCLOAK_REALM"), "{out}");
    assert!(out.contains("skip  signing keys"), "{out}");
    assert!(
        out.contains("FAIL  key source     Keycloak/JWKS not reachable")
            && out.contains("connection refused"),
        "{out}"
    );
    assert!(out.contains("ok    api keys       3 keys"), "{out}");
}

#[test]
fn doctor_json_is_an_array_of_findings_for_ci() {
    let (code, out, err) = doctor("deploy/local/sidecar.yaml", &[], &["--json"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let all = findings(&out);
    assert!(
        all.iter().all(|(_, s, _)| s == "ok" || s == "warn"),
        "{all:?}"
    );
    assert!(
        all.contains(&(
            "config".into(),
            "ok".into(),
            "deploy/local/sidecar.yaml is valid".into()
        )),
        "{all:?}"
    );
    assert!(
        all.iter().any(|(c, s, _)| c == "signing keys" && s == "ok"),
        "{all:?}"
    );

    // A failing check: exit 1, the failure in the array, stdout still nothing but JSON.
    let token = mint(local_claims("alice", &[]));
    let (code, out, _) = doctor(
        "deploy/local/sidecar.yaml",
        &[("API_KEYS_FILE", "deploy/local/missing-keys.yaml".into())],
        &["--json", "--token", &token, "--path", "/admin/x"],
    );
    assert_eq!(code, Some(1), "{out}");
    let all = findings(&out);
    let status = |check: &str| {
        all.iter()
            .find(|(c, _, _)| c == check)
            .map(|(_, s, _)| s.as_str())
            .unwrap_or_else(|| panic!("no {check} in {all:?}"))
    };
    assert_eq!(status("api keys"), "fail");
    assert_eq!(
        status("token"),
        "ok",
        "the token does not depend on API keys"
    );
    assert_eq!(
        status("check"),
        "skip",
        "the request check depends on everything"
    );
    assert!(!out.contains(&token));
}

#[test]
fn a_reader_that_goes_away_is_not_a_panic() {
    let token = mint(local_claims("alice", &[]));
    for args in [
        vec!["doctor", "--config", "deploy/local/sidecar.yaml", "--json"],
        vec!["token", "inspect", &token],
    ] {
        // `| head -1` that has already exited: every write fails with a broken pipe.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = bin()
            .args(&args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn doctor_tells_whether_openfga_answers() {
    let fga = OpenFga::shared().await;
    let (store, _) = fga.store("cli-doctor").create().await;
    let (wrong_model, _) = fga
        .store("cli-doctor-other-model")
        .model(json!({"schema_version": "1.1", "type_definitions": [{"type": "user"}]}))
        .create()
        .await;
    let cfg = "deploy/local/sidecar-openfga.yaml";
    let url = fga.http_url();
    let call = |env: Vec<(&'static str, String)>| {
        tokio::task::spawn_blocking(move || doctor(cfg, &env, &["--wait", "2"]))
    };

    let (code, out, _) = call(vec![
        ("OPENFGA_API_URL", url.clone()),
        ("OPENFGA_STORE_ID", store.clone()),
    ])
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("ok    openfga api    {url}/healthz: SERVING in ")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "ok    openfga        OpenFGA {url} store cli-doctor ({store})"
        )),
        "{out}"
    );

    let dead = format!("http://127.0.0.1:{}", dead_port());
    let (code, out, _) = call(vec![
        ("OPENFGA_API_URL", dead.clone()),
        ("OPENFGA_STORE_ID", store.clone()),
    ])
    .await
    .unwrap();
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "FAIL  openfga api    {dead} not reachable: connection refused"
        )),
        "{out}"
    );
    assert!(
        out.contains("skip  openfga        store and model not checked"),
        "{out}"
    );
    assert!(
        out.contains("ok    signing keys"),
        "the rest is still checked: {out}"
    );

    // The issue's case: the store id is not set. OpenFGA's reachability is still told.
    let (code, out, _) = call(vec![("OPENFGA_API_URL", url.clone())]).await.unwrap();
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("FAIL  config         OPENFGA_STORE_ID"),
        "{out}"
    );
    assert!(out.contains("ok    openfga api"), "{out}");
    assert!(out.contains("ok    signing keys"), "{out}");

    // A store whose model lacks what the rules ask for: named with the rule.
    let (code, out, _) = call(vec![
        ("OPENFGA_API_URL", url.clone()),
        ("OPENFGA_STORE_ID", wrong_model),
    ])
    .await
    .unwrap();
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("FAIL  openfga        ") && out.contains("rule tool-execute"),
        "{out}"
    );
}

mod reqwest {
    /// Minimal blocking GET returning the status, without pulling in reqwest's blocking client.
    pub fn blocking_get(url: &str) -> std::io::Result<u16> {
        use std::io::{Read, Write};
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_once('/').unwrap();
        let mut s = std::net::TcpStream::connect(host)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
        write!(
            s,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        buf.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other("bad response"))
    }
}

/// `check` against deploy/local/sidecar-openfga.yaml and a real OpenFGA store where alice may
/// execute `search` and nothing else, plus a shadow rule in front of `api` that would want
/// the admin role. Runs the binary; (exit code, stdout, stderr).
struct CheckRun {
    dir: tempfile::TempDir,
    env: Vec<(&'static str, String)>,
}

impl CheckRun {
    async fn new(store_name: &str) -> Self {
        let fga = OpenFga::shared().await;
        let (store, _) = fga
            .store(store_name)
            .tuples(&[("user:alice", "executor", "tool:search")])
            .create()
            .await;
        let dir = tempfile::tempdir().unwrap();
        for f in ["dev-jwks.json", "api-keys.yaml"] {
            std::fs::copy(local_dir().join(f), dir.path().join(f)).unwrap();
        }
        let base = std::fs::read_to_string(local_dir().join("sidecar-openfga.yaml")).unwrap();
        let with_shadow = base.replace(
            "    - { name: api, path: \"/api/**\" }\n",
            "    - { name: api-admins-only, mode: shadow, path: \"/api/**\", roles: [admin] }\n    - { name: api, path: \"/api/**\" }\n",
        );
        assert_ne!(base, with_shadow, "the shadow rule went in");
        write(dir.path(), "sidecar.yaml", &with_shadow);
        Self {
            dir,
            env: vec![
                ("OPENFGA_API_URL", fga.http_url()),
                ("OPENFGA_STORE_ID", store),
            ],
        }
    }

    fn config(&self) -> String {
        self.dir.path().join("sidecar.yaml").display().to_string()
    }

    async fn run(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let mut cmd = bin();
        cmd.args(["check", "--config", &self.config()]).args(args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        tokio::task::spawn_blocking(move || run(&mut cmd, None))
            .await
            .unwrap()
    }
}

fn has_line(out: &str, want: &str) -> bool {
    out.lines().any(|l| l == want)
}

#[tokio::test]
async fn check_explain_shows_the_rules_tried_the_principal_and_the_openfga_tuple() {
    let c = CheckRun::new("cli-check-explain").await;
    let token = mint(local_claims("alice", &["user"]));

    // Allowed: alice may execute search.
    let (code, out, err) = c
        .run(&[
            "--method",
            "POST",
            "--path",
            "/tools/search/execute",
            "--token",
            &token,
            "--explain",
        ])
        .await;
    assert_eq!(code, Some(0), "{out}{err}");
    for want in [
        "request    POST /tools/search/execute (host none)",
        "rule       public: no match: path /tools/search/execute does not match /public/**",
        "rule       health: no match: method POST is not one of [GET]",
        "rule       admin: no match: path /tools/search/execute does not match /admin/**",
        "rule       tool-execute: matches (tool=search): governs",
        "principal  user:alice (user via jwt, key dev-local-1), roles [user], scopes [openid read:agents]",
        "contextual user:alice assignee role:user",
        "openfga    user:alice executor tool:search: allowed (rule tool-execute, from OpenFGA)",
        "answer     200 allow, rule tool-execute",
        "set        x-auth-subject: user:alice",
    ] {
        assert!(has_line(&out, want), "missing {want:?} in\n{out}");
    }
    assert!(
        out.lines()
            .any(|l| l.starts_with("credential bearer token sha256:")
                && l.ends_with(", kid dev-local-1, iss authz-sidecar-local")),
        "{out}"
    );
    assert!(!out.contains(&token), "the token is never printed");

    // Denied: alice may not execute shell; the tuple asked is named.
    let (code, out, err) = c
        .run(&[
            "--method",
            "POST",
            "--path",
            "/tools/shell/execute",
            "--token",
            &token,
            "--explain",
        ])
        .await;
    assert_eq!(code, Some(1), "{out}{err}");
    for want in [
        "rule       tool-execute: matches (tool=shell): governs",
        "openfga    user:alice executor tool:shell: denied (rule tool-execute, from OpenFGA)",
        "answer     403 deny forbidden, rule tool-execute",
        "reason     user:alice is not executor of tool:shell",
    ] {
        assert!(has_line(&out, want), "missing {want:?} in\n{out}");
    }

    // A rule that does not match says why: the method, and a body predicate with the value.
    let body = c.dir.path().join("list.json");
    std::fs::write(&body, r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#).unwrap();
    let (code, out, err) = c
        .run(&[
            "--method",
            "POST",
            "--path",
            "/message",
            "--api-key",
            "mcpkey_test_local_alice",
            "--body",
            body.to_str().unwrap(),
            "--explain",
        ])
        .await;
    assert_eq!(code, Some(0), "{out}{err}");
    for want in [
        "rule       tool-execute: no match: path /message does not match /tools/{tool}/execute",
        "rule       mcp-tools-call: no match: when \"body:/method == tools/call\" does not hold: body field /method is \"tools/list\"",
        "rule       mcp-other: matches: governs",
    ] {
        assert!(has_line(&out, want), "missing {want:?} in\n{out}");
    }
    assert!(
        !out.contains("mcpkey_test_local_alice"),
        "the key is never printed"
    );
    let (code, out, _) = c
        .run(&["--method", "GET", "--path", "/message", "--explain"])
        .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        has_line(
            &out,
            "rule       mcp-other: no match: method GET is not one of [POST]"
        ),
        "{out}"
    );
    assert!(
        has_line(&out, "rule       no rule matches: routes.unmatched is deny"),
        "{out}"
    );
}

#[tokio::test]
async fn check_json_is_one_object_with_the_answer_the_headers_and_the_shadow_outcome() {
    let c = CheckRun::new("cli-check-json").await;
    let token = mint(local_claims("alice", &["user"]));
    let (code, out, err) = c
        .run(&[
            "--path",
            "/api/agents",
            "--token",
            &token,
            "-H",
            "x-auth-subject: user:mallory",
            "--json",
            "--explain",
        ])
        .await;
    assert_eq!(code, Some(0), "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["status"], 200);
    assert_eq!(v["decision"], "allow");
    assert_eq!(v["rule"], "api");
    assert!(
        v["set"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "x-auth-subject", "value": "user:alice"})),
        "{v}"
    );
    // The shadow rule wants admin: it would deny, and the answer is still the api rule's.
    assert_eq!(
        v["shadow"],
        json!([{"rule": "api-admins-only", "outcome": "would_deny", "status": 403, "reason": "role admin required"}])
    );
    let steps: Vec<&str> = v["explain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    assert!(
        steps.contains(&"api-admins-only: shadow rule, not used for the answer"),
        "{steps:?}"
    );
    assert!(!out.contains(&token));

    // A deny is JSON too, and exits 1.
    let (code, out, _) = c.run(&["--path", "/admin/x", "--json"]).await;
    assert_eq!(code, Some(1), "{out}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(
        (v["status"].as_u64(), v["error"].as_str()),
        (Some(401), Some("unauthenticated"))
    );
}

#[test]
fn check_refuses_bad_usage_with_exit_2_naming_the_argument() {
    for (args, want) in [
        (
            vec!["--path", "/api/x", "--header", "x-tenant acme"],
            "--header \"x-tenant acme\": want NAME:VALUE",
        ),
        (
            vec!["--path", "/api/x", "-H", "bad name:v"],
            "--header \"bad name:v\": \"bad name\" is not a header name",
        ),
        (
            vec!["--path", "/api/x", "--body", "deploy/local/missing.json"],
            "--body deploy/local/missing.json: cannot read",
        ),
    ] {
        let (code, out, err) = run(
            bin()
                .args(["check", "--config", "deploy/local/sidecar.yaml"])
                .args(&args),
            None,
        );
        assert_eq!(code, Some(2), "{args:?}: {out}{err}");
        assert!(out.is_empty(), "{args:?}: no answer is printed: {out}");
        assert!(err.contains(want), "{args:?}: {err} should say {want}");
    }
    let (code, _, err) = run(
        bin().args([
            "check",
            "--config",
            "deploy/local/missing.yaml",
            "--path",
            "/api/x",
        ]),
        None,
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("config error: cannot read config file"),
        "{err}"
    );
}

/// A config whose rules run in dry run: deploy/local/sidecar.yaml with `routes.dry_run: true`.
fn dry_run_config(dir: &std::path::Path) -> String {
    for f in ["dev-jwks.json", "api-keys.yaml"] {
        std::fs::copy(local_dir().join(f), dir.join(f)).unwrap();
    }
    let base = std::fs::read_to_string(local_dir().join("sidecar.yaml")).unwrap();
    let yaml = base.replace(
        "  unmatched: deny\n",
        "  unmatched: deny\n  dry_run: true\n",
    );
    assert_ne!(base, yaml, "dry_run went in");
    write(dir, "sidecar.yaml", &yaml).display().to_string()
}

#[test]
fn check_doctor_check_config_and_serve_say_when_the_dry_run_is_on() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dry_run_config(dir.path());
    let token = mint(local_claims("alice", &["user"]));
    let check = |args: &[&str]| run(bin().args(["check", "--config", &cfg]).args(args), None);

    // A 403 is answered with an allow, as alice; the deny is shown.
    let (code, out, err) = check(&["--path", "/admin/users", "--token", &token]);
    assert_eq!(code, Some(0), "{out}{err}");
    for want in [
        "dry run    on (routes.dry_run): 401/403 denies are answered with allows",
        "answer     200 allow by routes.dry_run, rule admin",
        "would deny 403 forbidden: role admin required",
        "set        x-auth-subject: user:alice",
    ] {
        assert!(has_line(&out, want), "missing {want:?} in\n{out}");
    }
    // A 401: allowed with no identity headers, every identity header removed.
    let (code, out, _) = check(&["--path", "/api/agents", "-H", "x-auth-subject: user:admin"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("set        "), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("remove     x-auth-subject, ")),
        "{out}"
    );
    // A 400 stays a 400.
    let (code, out, _) = check(&["--path", "/public/../admin/users", "--token", &token]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("answer     400 deny invalid_request"), "{out}");

    // doctor warns, and its request check says who allowed it.
    let (code, out, _) = doctor(&cfg, &[], &["--token", &token, "--path", "/admin/users"]);
    assert_eq!(code, Some(0), "warnings are not failures: {out}");
    assert!(
        out.contains("warn  routes         dry run is on (routes.dry_run)"),
        "{out}"
    );
    assert!(
        out.contains("warn  check          GET /admin/users allowed by routes.dry_run; the rules deny 403: role admin required"),
        "{out}"
    );

    let (code, out, _) = run(bin().args(["check-config", "--config", &cfg]), None);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("  dry run: ON: 401/403 denies are answered with allows"),
        "{out}"
    );

    // serve logs a WARN at startup.
    let mut child = bin()
        .args([
            "serve",
            "--config",
            &cfg,
            "--grpc-addr",
            "127.0.0.1:0",
            "--ops-addr",
            "off",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let warned = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.contains("WARN") && line.contains("routes.dry_run is on") => {
                break true;
            }
            Ok(line) => seen.push(line),
            Err(_) if std::time::Instant::now() > deadline => break false,
            Err(_) => {}
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(warned, "no dry-run WARN at startup: {seen:#?}");
}
