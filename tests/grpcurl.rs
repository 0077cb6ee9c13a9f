//! The README walk-through, as a newcomer types it: the binary on the embedded default, asked
//! by grpcurl (a different gRPC stack than ours, using server reflection) over a Unix socket
//! and over TCP.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::sidecar::{local_claims, mint, repo};
use common::tools::tool;

fn grpcurl(target: &[&str], body: Option<&str>, method: &str) -> (bool, String) {
    let mut cmd = Command::new(tool("grpcurl"));
    cmd.current_dir(repo()).arg("-plaintext");
    if let Some(b) = body {
        cmd.args(["-d", b]);
    }
    cmd.args(target).arg(method);
    let out = cmd.output().expect("run grpcurl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn check_body(path: &str, headers: &str) -> String {
    format!(
        r#"{{"attributes":{{"request":{{"http":{{"method":"GET","path":"{path}","headers":{{{headers}}}}}}}}}}}"#
    )
}

#[test]
fn readme_walkthrough_over_unix_socket_and_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("authz.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut children = Vec::new();
    for addr in [
        format!("unix:{}", sock.display()),
        format!("127.0.0.1:{port}"),
    ] {
        children.push(
            Command::new(env!("CARGO_BIN_EXE_authz-sidecar"))
                .current_dir(repo())
                .env("AUTHZ_SHUTDOWN_DELAY", "0s")
                .args([
                    "serve",
                    "--config",
                    "deploy/local/sidecar.yaml",
                    "--ops-addr",
                    "off",
                    "--grpc-addr",
                    &addr,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let unix_addr = format!("unix://{}", sock.display());
    let unix = [unix_addr.as_str()];
    let tcp_addr = format!("127.0.0.1:{port}");
    let tcp = [tcp_addr.as_str()];
    let result = std::panic::catch_unwind(|| {
        for target in [&unix[..], &tcp[..]] {
            let mut up = false;
            for _ in 0..100 {
                let (ok, out) = grpcurl(target, None, "grpc.health.v1.Health/Check");
                if ok && out.contains("SERVING") && !out.contains("NOT_SERVING") {
                    up = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(up, "sidecar at {target:?} never served");
            let token = mint(local_claims("alice", &["admin"]));
            let (ok, out) = grpcurl(
                target,
                Some(&check_body(
                    "/admin/users",
                    &format!(r#""authorization":"Bearer {token}""#),
                )),
                "envoy.service.auth.v3.Authorization/Check",
            );
            assert!(ok, "{out}");
            assert!(
                out.contains("okResponse") && out.contains("user:alice"),
                "{out}"
            );
            let (ok, out) = grpcurl(
                target,
                Some(&check_body("/admin/users", "")),
                "envoy.service.auth.v3.Authorization/Check",
            );
            assert!(ok, "{out}");
            assert!(
                out.contains("deniedResponse")
                    && out.contains("Unauthorized")
                    && out.contains("WWW-Authenticate".to_ascii_lowercase().as_str()),
                "{out}"
            );
        }
    });
    for mut c in children {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let _ = c.wait();
    }
    assert!(!sock.exists(), "the socket is removed on shutdown");
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// Server reflection answers only where the config turns it on (the embedded default does, for
/// the walk-through above); a production config does not describe its API to any caller.
#[tokio::test]
async fn reflection_is_off_unless_configured() {
    use common::sidecar::{Sidecar, local_dir};
    let yaml = std::fs::read_to_string(local_dir().join("sidecar.yaml")).unwrap();
    let without = yaml.replace("  reflection: true", "");
    assert_ne!(
        yaml, without,
        "deploy/local/sidecar.yaml turns reflection on"
    );
    for (config, on) in [(&yaml, true), (&without, false)] {
        let s = Sidecar::start(config, &local_dir(), &[]).await;
        s.wait_ready(Duration::from_secs(5)).await;
        let target = s.grpc_addr.to_string();
        let (ok, out) = tokio::task::spawn_blocking(move || grpcurl(&[&target], None, "list"))
            .await
            .unwrap();
        if on {
            assert!(
                ok && out.contains("envoy.service.auth.v3.Authorization"),
                "{out}"
            );
        } else {
            assert!(!ok, "reflection answered without server.reflection: {out}");
        }
        s.stop().await.unwrap();
    }
}
