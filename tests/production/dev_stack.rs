//! scripts/dev-stack.sh end to end: the whole stack (OpenFGA, Keycloak, the sidecar, Envoy,
//! the echo app) on free ports, one allowed and one denied request through Envoy with real
//! Keycloak tokens and OpenFGA tuples, then Ctrl-C (SIGINT) stops every process it started.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::process::{free_port, signal_group, tail_log};
use crate::common::tools;

/// The first run imports the realm into a Keycloak database kept under the tools dir (about a
/// minute); later runs start from it (about 10 s).
const START_TIMEOUT: Duration = Duration::from_secs(300);

/// The script and what it started; on drop (a failed test), everything is SIGKILLed by
/// process group, so nothing outlives the test.
struct Stack {
    script: Option<Child>,
    dir: tempfile::TempDir,
    log: PathBuf,
    /// Set once the test saw every process gone: no pid is signalled again (it may be reused).
    all_stopped: bool,
}

impl Stack {
    fn pids(&self) -> Vec<(String, u32)> {
        std::fs::read_to_string(self.dir.path().join("pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (name, pid) = l.split_once(' ')?;
                Some((name.to_string(), pid.trim().parse().ok()?))
            })
            .collect()
    }

    /// `export NAME=value` from stack.env (values are `%q`-quoted; tokens and URLs need none).
    fn env(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("stack.env")).unwrap();
        let prefix = format!("{name}=");
        text.lines()
            .flat_map(|l| l.trim_start_matches("export ").split(' '))
            .find_map(|w| w.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("{name} not in stack.env:\n{text}"))
            .to_string()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(mut child) = self.script.take() {
            signal_group(child.id(), "KILL");
            let _ = child.wait();
        }
        if !self.all_stopped {
            for (_, pid) in self.pids() {
                signal_group(pid, "KILL");
            }
        }
    }
}

fn process_exists(pid: u32) -> bool {
    // Field 3 of /proc/PID/stat is the state; a zombie (Z) has exited.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// The lines of `path` that are JSON objects.
fn json_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

async fn post(url: &str, token: &str) -> (u16, String) {
    let resp = reqwest::Client::new()
        .post(url)
        .bearer_auth(token)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    (
        resp.status().as_u16(),
        resp.text().await.unwrap_or_default(),
    )
}

#[tokio::test]
async fn the_stack_script_allows_and_denies_through_envoy_and_ctrl_c_stops_all_it_started() {
    let envoy_port = free_port();
    let ports = [
        ("STACK_ENVOY_PORT", envoy_port),
        ("STACK_ENVOY_ADMIN_PORT", free_port()),
        ("STACK_APP_PORT", free_port()),
        ("STACK_GRPC_PORT", free_port()),
        ("STACK_OPS_PORT", free_port()),
        ("STACK_KEYCLOAK_PORT", free_port()),
        ("STACK_KEYCLOAK_MGMT_PORT", free_port()),
        ("STACK_OPENFGA_PORT", free_port()),
        ("STACK_OPENFGA_GRPC_PORT", free_port()),
    ];
    let dir = tempfile::Builder::new()
        .prefix("authz-dev-stack-test-")
        .tempdir()
        .unwrap();
    let log = tools::test_logs_dir().join(format!("dev-stack-{envoy_port}.log"));
    let out = std::fs::File::create(&log).unwrap();
    // As from a terminal: SIGINT at its default, so the script can trap it. A shell that
    // started this test in the background without job control ignores SIGINT, the children
    // inherit that, and bash cannot trap a signal ignored on entry.
    let mut cmd = Command::new("env");
    cmd.args(["--default-signal=INT", "bash"])
        .arg(tools::repo_file("scripts/dev-stack.sh"))
        .env("STACK_DIR", dir.path())
        .env("AUTHZ_SIDECAR_BIN", env!("CARGO_BIN_EXE_authz-sidecar"))
        .env("AUTHZ_TOOLS_DIR", tools::tools_dir())
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    for (k, v) in ports {
        cmd.env(k, v.to_string());
    }
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd.spawn().expect("start scripts/dev-stack.sh");
    let mut stack = Stack {
        script: Some(child),
        dir,
        log,
        all_stopped: false,
    };

    // Up: the script says so by creating $STACK_DIR/ready.
    let started = Instant::now();
    while !stack.dir.path().join("ready").exists() {
        if let Some(status) = stack.script.as_mut().unwrap().try_wait().unwrap() {
            panic!(
                "dev-stack.sh exited ({status}) before it was up:\n{}",
                tail_log(&stack.log, 40)
            );
        }
        assert!(
            started.elapsed() < START_TIMEOUT,
            "dev-stack.sh not up after {START_TIMEOUT:?}:\n{}",
            tail_log(&stack.log, 40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("dev stack up in {:.1}s", started.elapsed().as_secs_f64());
    let printed = std::fs::read_to_string(&stack.log).unwrap();
    let alice = stack.env("ALICE");
    let bob = stack.env("BOB");
    assert!(
        printed.contains(&format!("ALICE={alice}")),
        "the script prints the tokens"
    );
    assert!(printed.contains("x-api-key: $API_KEY") && printed.contains("curl -i"));
    let envoy = stack.env("ENVOY");
    assert_eq!(envoy, format!("http://127.0.0.1:{envoy_port}"));

    // Allowed: Keycloak's alice, tuple user:alice executor tool:agent_chat; the app sees her.
    let url = format!("{envoy}/tools/agent_chat/execute");
    let (code, body) = post(&url, &alice).await;
    assert_eq!(code, 200, "{body}");
    let echo: Value = serde_json::from_str(&body).expect("the echo app's JSON");
    assert_eq!(echo["headers"]["x-auth-subject"], "user:alice");
    assert_eq!(echo["headers"]["x-auth-method"], "jwt");
    // Denied: bob has no tuple.
    let (code, body) = post(&url, &bob).await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("user:bob is not executor of tool:agent_chat"),
        "{body}"
    );

    // MCP tools/call through deploy/envoy/envoy.yaml itself: the body is buffered on the
    // /message route only (per-route with_request_body), and the body rule decides on it.
    let mcp = |tool: &str| {
        serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": tool, "arguments": {}}})
        .to_string()
    };
    let send_mcp = |token: String, body: String| {
        let url = format!("{envoy}/message");
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(body)
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    };
    let (code, body) = send_mcp(alice.clone(), mcp("agent_chat")).await;
    assert_eq!(code, 200, "alice may run agent_chat: {body}");
    let (code, body) = send_mcp(bob.clone(), mcp("agent_chat")).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("tool:agent_chat"), "{body}");
    // Routes without a body rule are not buffered: the body goes straight on.
    let (code, _) = post(&format!("{envoy}/tools/agent_chat/execute"), &alice).await;
    assert_eq!(code, 200);

    // Envoy's JSON access log (deploy/envoy/envoy.yaml; flushed about once a second) says who
    // answered each request: bob's 403s are the sidecar's (ext_authz_denied), the 200s the app's.
    let access_log = stack.dir.path().join("logs/envoy.log");
    let mut details = Vec::new();
    for _ in 0..150 {
        details = std::fs::read_to_string(&access_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["request_id"].as_str().is_some_and(|id| !id.is_empty()))
            .map(|v| (v["status"].as_u64().unwrap_or(0), v["details"].to_string()))
            .collect();
        if details.contains(&(403, "\"ext_authz_denied\"".into()))
            && details.contains(&(200, "\"via_upstream\"".into()))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        details.contains(&(403, "\"ext_authz_denied\"".into()))
            && details.contains(&(200, "\"via_upstream\"".into())),
        "{details:?} in {}",
        std::fs::read_to_string(&access_log).unwrap_or_default()
    );

    // One decision id joins the three records of a check, allow and deny: the sidecar's
    // decision line (JSON: its log is not a terminal), the dynamic metadata Envoy logs in its
    // access log, and, for a deny, the body the client reads.
    let (code, body) = post(&url, &alice).await;
    assert_eq!(code, 200, "{body}");
    let echo: Value = serde_json::from_str(&body).unwrap();
    let allowed_request = echo["headers"]["x-request-id"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, body) = post(&url, &bob).await;
    assert_eq!(code, 403, "{body}");
    let deny_body: Value = serde_json::from_str(&body).unwrap();
    let denied_request = deny_body["request_id"].as_str().unwrap().to_string();
    let denied_id = deny_body["decision_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        denied_id.len(),
        16,
        "16 hex digits in the deny body: {body}"
    );
    let sidecar_log = stack.dir.path().join("logs/sidecar.log");
    let mut joined = None;
    for _ in 0..150 {
        let access = json_lines(&access_log);
        let decisions = json_lines(&sidecar_log);
        let by_request = |lines: &[Value], id: &str| {
            lines
                .iter()
                .find(|v| v["request_id"] == id && v["decision_id"].is_string())
                .cloned()
        };
        if let (Some(aa), Some(ad), Some(sa), Some(sd)) = (
            by_request(&access, &allowed_request),
            by_request(&access, &denied_request),
            by_request(&decisions, &allowed_request),
            by_request(&decisions, &denied_request),
        ) {
            joined = Some((aa, ad, sa, sd));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (access_allow, access_deny, line_allow, line_deny) = joined.unwrap_or_else(|| {
        panic!(
            "no access log and decision lines for request ids {allowed_request} and {denied_request}:\n{}\n{}",
            std::fs::read_to_string(&access_log).unwrap_or_default(),
            tail_log(&sidecar_log, 20)
        )
    });
    assert_eq!(
        access_deny["decision_id"],
        denied_id.as_str(),
        "{access_deny}"
    );
    assert_eq!(line_deny["decision_id"], denied_id.as_str(), "{line_deny}");
    assert_eq!(line_deny["decision"], "deny");
    assert_eq!(access_deny["status"], 403);
    assert_eq!(access_deny["auth_subject"], "user:bob", "{access_deny}");
    let allowed_id = line_allow["decision_id"].as_str().unwrap();
    assert_eq!(allowed_id.len(), 16, "{line_allow}");
    assert_ne!(allowed_id, denied_id);
    assert_eq!(access_allow["decision_id"], allowed_id, "{access_allow}");
    assert_eq!(line_allow["decision"], "allow");
    assert_eq!(access_allow["status"], 200);
    assert_eq!(access_allow["auth_subject"], "user:alice", "{access_allow}");
    assert_eq!(
        access_allow["auth_rule"], line_allow["rule"],
        "{access_allow}"
    );
    assert_eq!(
        line_allow["host"],
        access_allow["authority"]
            .as_str()
            .unwrap()
            .split(':')
            .next()
            .unwrap()
    );
    let whole = std::fs::read_to_string(&sidecar_log).unwrap();
    assert!(
        !whole.contains(&alice) && !whole.contains(&bob),
        "no token in the sidecar's log"
    );

    // Ctrl-C: the script stops everything and exits.
    let pids = stack.pids();
    let names: Vec<&str> = pids.iter().map(|(n, _)| n.as_str()).collect();
    for want in ["openfga", "keycloak", "app", "sidecar", "envoy"] {
        assert!(
            names.contains(&want),
            "{want} not in the pids file: {names:?}"
        );
    }
    let script_pid = stack.script.as_ref().unwrap().id();
    assert!(
        Command::new("kill")
            .args(["-s", "INT", &script_pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let stopping = Instant::now();
    let status = loop {
        if let Some(status) = stack.script.as_mut().unwrap().try_wait().unwrap() {
            break status;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(90),
            "dev-stack.sh still running 90 s after SIGINT:\n{}",
            tail_log(&stack.log, 20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "dev stack stopped in {:.1}s",
        stopping.elapsed().as_secs_f64()
    );
    stack.script = None;
    assert_eq!(status.code(), Some(130), "exit status after Ctrl-C");
    assert!(tail_log(&stack.log, 3).contains("dev-stack: stopped"));
    for (name, pid) in &pids {
        assert!(!process_exists(*pid), "{name} (pid {pid}) is still running");
        assert!(
            !signal_group(*pid, "0"),
            "a process of {name}'s group (pgid {pid}) is still running"
        );
    }
    assert!(
        !signal_group(script_pid, "0"),
        "a process of the script's own group is still running"
    );
    stack.all_stopped = true;
}
