//! The binary as operators run it: startup errors (one line, exit 2), `token mint`,
//! `apikey new`, `doctor`, and SIGTERM draining to exit 0.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::sidecar::local_dir;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_authz-sidecar"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    for v in [
        "AUTH_PUBLIC_KEY_URL",
        "KEYCLOAK_URL",
        "KEYCLOAK_SERVER_URL",
        "KEYCLOAK_REALM",
        "OPENFGA_API_URL",
        "OPENFGA_STORE_ID",
        "API_KEYS_FILE",
        "CORS_ORIGINS",
        "RUST_LOG",
        "LOG_LEVEL",
    ] {
        c.env_remove(v);
    }
    c
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
