//! The benchmark harness cannot rot: a smoke run of `authz-bench` (the floor server, the load
//! generator, the report) against the real sidecar binary, about a second per run. It asserts
//! only that the harness worked — every answer the expected one, no errors, numbers present and
//! parsed — and never a time or a ratio (scripts/bench measures those; BENCHMARKS.md).

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::process::{Proc, free_port, http_ok, wait_until_logged};
use serde_json::Value;

const BENCH: &str = env!("CARGO_BIN_EXE_authz-bench");
const SIDECAR: &str = env!("CARGO_BIN_EXE_authz-sidecar");

struct Server {
    proc: Proc,
    grpc: String,
    ops: Option<String>,
}

fn floor() -> Server {
    let port = free_port();
    let grpc = format!("127.0.0.1:{port}");
    let mut cmd = Command::new(BENCH);
    cmd.args(["floor", "--addr", &grpc]);
    Server {
        proc: Proc::spawn("bench-floor", port, &cmd),
        grpc,
        ops: None,
    }
}

/// The sidecar binary on the embedded default config, decision log off as in scripts/bench.
async fn sidecar() -> Server {
    let (gport, oport) = (free_port(), free_port());
    let (grpc, ops) = (format!("127.0.0.1:{gport}"), format!("127.0.0.1:{oport}"));
    let config = common::tools::repo_file("deploy/local/sidecar.yaml");
    let mut cmd = Command::new(SIDECAR);
    cmd.arg("serve")
        .arg("--config")
        .arg(&config)
        .args(["--grpc-addr", &grpc, "--ops-addr", &ops])
        .env("LOG_LEVEL", "warn")
        // Stopped at the end of each test: no NOT_SERVING grace needed.
        .env("AUTHZ_SHUTDOWN_DELAY", "0s");
    let proc = Proc::spawn("bench-sidecar", gport, &cmd);
    let url = format!("http://{ops}/readyz");
    wait_until_logged(
        || http_ok(&url),
        Duration::from_secs(30),
        "sidecar",
        proc.log_path(),
    )
    .await;
    Server {
        proc,
        grpc,
        ops: Some(ops),
    }
}

fn admin_token() -> String {
    let out = Command::new(SIDECAR)
        .current_dir(common::tools::repo_root())
        .args(["token", "mint", "--sub", "alice", "--roles", "admin"])
        .output()
        .expect("run token mint");
    assert!(out.status.success(), "token mint: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `authz-bench load` for about a second against `server`, the result appended to `json`.
fn load(server: &Server, json: &Path, tags: &[&str], request: &[&str]) -> Output {
    let mut cmd = Command::new(BENCH);
    cmd.args(["load", "--target", &server.grpc])
        .args(["--server-pid", &server.proc.pid().to_string()])
        .args(["--connections", "2", "--concurrency", "8"])
        .args(["--duration", "1s", "--warmup", "200ms"])
        .arg("--json")
        .arg(json)
        .args(request);
    if let Some(ops) = &server.ops {
        cmd.args(["--metrics-url", &format!("http://{ops}/metrics")]);
    }
    for t in tags {
        cmd.args(["--tag", t]);
    }
    cmd.output().expect("run authz-bench load")
}

fn lines(json: &Path) -> Vec<Value> {
    std::fs::read_to_string(json)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn num(v: &Value, pointer: &str) -> f64 {
    v.pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{pointer} missing or not a number in {v}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn floor_and_sidecar_are_measured_on_two_paths_and_reported_with_ratios() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("results.jsonl");
    let (floor, sidecar) = (floor(), sidecar().await);
    let token = admin_token();
    let paths: [(&str, Vec<&str>, &str); 2] = [
        ("public", vec!["--path", "/public/info"], "allow/ok/none"),
        (
            "jwt-role",
            vec!["--path", "/admin/users", "--token", &token],
            "allow/ok/jwt",
        ),
    ];
    for (path, request, _) in &paths {
        for (name, server) in [("floor", &floor), ("sidecar", &sidecar)] {
            let out = load(
                server,
                &json,
                &[
                    &format!("path={path}"),
                    &format!("server={name}"),
                    "shape=max",
                ],
                request,
            );
            assert!(
                out.status.success(),
                "{path} on the {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    let rows = lines(&json);
    assert_eq!(rows.len(), 4);
    for row in &rows {
        let answers = num(row, "/answers");
        assert!(answers > 0.0, "no answers: {row}");
        assert_eq!(num(row, "/errors"), 0.0, "{row}");
        assert_eq!(num(row, "/unexpected"), 0.0, "{row}");
        // Every answer an allow: the status mix is exactly that.
        assert_eq!(
            row["outcomes"],
            serde_json::json!({"allow": answers as u64})
        );
        assert!(num(row, "/rps") > 0.0);
        let (p50, p99, p999) = (
            num(row, "/latency_us/p50"),
            num(row, "/latency_us/p99"),
            num(row, "/latency_us/p999"),
        );
        assert!(p50 > 0.0 && p50 <= p99 && p99 <= p999, "{row}");
        assert!(num(row, "/server/cpu_s") >= 0.0);
        assert!(num(row, "/server/cpu_us_per_check") >= 0.0);
        assert!(num(row, "/server/memory/rss_kib") > 0.0);
    }
    // The sidecar's own counters agree: it decided what the generator saw, on the path asked.
    for (i, (_, _, decision)) in paths.iter().enumerate() {
        let row = &rows[2 * i + 1];
        assert!(
            num(
                row,
                &format!("/metrics/decisions/{}", decision.replace('/', "~1"))
            ) >= num(row, "/answers"),
            "{row}"
        );
    }

    let out = Command::new(BENCH)
        .arg("report")
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    for path in ["public", "jwt-role"] {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("| {path} |")))
            .unwrap_or_else(|| panic!("no row for {path} in\n{table}"));
        // path, floor CPU, sidecar CPU, CPU ratio: all filled in.
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert!(cells[2].parse::<f64>().is_ok(), "{row}");
        assert!(cells[3].parse::<f64>().is_ok(), "{row}");
        assert!(cells[4].ends_with('x'), "{row}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_answered_with_401s_instead_of_allows_fails_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("results.jsonl");
    let sidecar = sidecar().await;
    // /admin/users without a token: the sidecar answers 401, the run expected allows.
    let out = load(&sidecar, &json, &[], &["--path", "/admin/users"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("were not [\"allow\"]"));
    let row = &lines(&json)[0];
    let answers = num(row, "/answers");
    assert!(answers > 0.0);
    assert_eq!(
        row["outcomes"],
        serde_json::json!({"deny:401": answers as u64})
    );
    assert!(num(row, "/unexpected") >= answers);
}

#[test]
fn the_floor_reports_a_port_it_picked() {
    // Port 0: the floor says where it listens (scripts can start it without a port helper).
    let mut cmd = Command::new(BENCH);
    cmd.args(["floor", "--addr", "127.0.0.1:0"]);
    let mut floor = Proc::spawn("bench-floor-port0", free_port(), &cmd);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = floor.tail(5);
        if let Some(addr) = log.lines().find_map(|l| l.strip_prefix("listening ")) {
            assert!(
                addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
                "{log}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "floor said nothing: {log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    floor.kill();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_floor_given_an_answer_sends_the_sidecars_headers_and_metadata() {
    use authz_sidecar::proto::pb::envoy::service::auth::v3::{
        CheckRequest, authorization_client::AuthorizationClient, check_response::HttpResponse,
    };
    // What the sidecar answers for an admin's GET /admin/users, as `check --json` shows it.
    let dir = tempfile::tempdir().unwrap();
    let answer = dir.path().join("answer.json");
    let out = Command::new(SIDECAR)
        .current_dir(common::tools::repo_root())
        .args([
            "check",
            "--config",
            "deploy/local/sidecar.yaml",
            "--path",
            "/admin/users",
        ])
        .args(["--token", &admin_token(), "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "check: {out:?}");
    std::fs::write(&answer, &out.stdout).unwrap();
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();

    let port = free_port();
    let grpc = format!("127.0.0.1:{port}");
    let mut cmd = Command::new(BENCH);
    cmd.args(["floor", "--addr", &grpc, "--answer"])
        .arg(&answer);
    let mut floor = Proc::spawn("bench-floor-answer", port, &cmd);
    let url = format!("http://{grpc}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut client = loop {
        match AuthorizationClient::connect(url.clone()).await {
            Ok(c) => break c,
            Err(e) if std::time::Instant::now() > deadline => {
                panic!("floor --answer did not listen: {e}: {}", floor.tail(5))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    // The floor decides nothing: an empty request gets the same answer.
    let response = client
        .check(CheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    let Some(HttpResponse::OkResponse(ok)) = response.http_response else {
        panic!("not an allow: {response:?}");
    };
    let set: Vec<(String, String)> = ok
        .headers
        .iter()
        .map(|h| h.header.as_ref().unwrap())
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    let want_set: Vec<(String, String)> = shown["set"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap().into(),
                h["value"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(set, want_set);
    assert!(set.contains(&("x-auth-subject".into(), "user:alice".into())));
    let want_remove: Vec<String> = serde_json::from_value(shown["remove"].clone()).unwrap();
    assert_eq!(ok.headers_to_remove, want_remove);
    let metadata = response.dynamic_metadata.expect("metadata");
    let mut keys: Vec<&str> = metadata.fields.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["decision", "decision_id", "rule", "subject"]);
    floor.kill();
}

#[test]
fn a_fixed_number_of_requests_is_answered_inside_the_window() {
    // --requests fills caches: every answer must count (10 000 tokens means 10 000 answers).
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("results.jsonl");
    let floor = floor();
    let out = Command::new(BENCH)
        .args(["load", "--target", &floor.grpc, "--requests", "5000"])
        .args(["--server-pid", &floor.proc.pid().to_string(), "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let row = &lines(&json)[0];
    assert_eq!(row["outcomes"], serde_json::json!({"allow": 5000}), "{row}");
    assert_eq!(row["warmup_outcomes"], serde_json::json!({}), "{row}");
}

#[test]
fn the_decision_cache_mode_reports_memory_and_hit_ratios_at_ten_times_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("cache.jsonl");
    let out = Command::new(BENCH)
        .args(["cache", "--max-entries", "1000", "--requests", "20000"])
        .args(["--skew", "0,1.0", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let rows = lines(&json);
    assert_eq!(rows.len(), 3, "memory, then one row per skew");
    assert_eq!(rows[0]["measure"], "memory");
    assert_eq!(num(&rows[0], "/entries"), 1000.0, "filled to the bound");
    for row in &rows[1..] {
        assert_eq!(row["measure"], "hit-ratio");
        assert_eq!(num(row, "/working_set"), 10_000.0);
        let (hit, best) = (num(row, "/hit_ratio"), num(row, "/best_possible"));
        assert!(
            (0.0..=1.0).contains(&hit) && (0.0..=1.0).contains(&best),
            "{row}"
        );
        assert!(
            num(row, "/evictions") > 0.0,
            "a working set of 10x evicts: {row}"
        );
    }
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("| uniform | 1000 | 10000 |"), "{table}");
    assert!(table.contains("| Zipf s=1 | 1000 | 10000 |"), "{table}");
}

#[test]
fn the_fresh_token_mode_verifies_every_token_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("fresh.jsonl");
    let out = Command::new(BENCH)
        .current_dir(common::tools::repo_root())
        .args(["fresh-tokens", "--tokens", "20", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let rows = lines(&json);
    let algs: Vec<&str> = rows.iter().map(|r| r["alg"].as_str().unwrap()).collect();
    assert_eq!(algs, ["RS256", "ES256"]);
    for row in &rows {
        assert!(num(row, "/raw_per_core") > 0.0 && num(row, "/sidecar_per_core") > 0.0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn http_load_and_its_report_cover_the_envoy_and_openfga_miss_tables() {
    // The sidecar's ops listener stands in for Envoy and OpenFGA here: plain HTTP, 200s.
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("extra.jsonl");
    let sidecar = sidecar().await;
    let url = format!("http://{}/readyz", sidecar.ops.as_ref().unwrap());
    for (measure, server, shape, rate) in [
        ("envoy", "floor", "peak", None),
        ("envoy", "floor-answer", "peak", None),
        ("envoy", "sidecar", "peak", None),
        ("envoy", "floor", "half", Some("200")),
        ("envoy", "floor-answer", "half", Some("200")),
        ("envoy", "sidecar", "half", Some("200")),
        ("fga-miss", "openfga", "c1", None),
    ] {
        let mut cmd = Command::new(BENCH);
        cmd.args(["http", "--url", &url, "--concurrency", "2"])
            .args(["--duration", "500ms", "--warmup", "100ms", "--json"])
            .arg(&json)
            .args(["--server-pid", &sidecar.proc.pid().to_string()])
            .args(["--tag", &format!("measure={measure}")])
            .args(["--tag", &format!("server={server}")])
            .args(["--tag", &format!("shape={shape}")]);
        if let Some(rate) = rate {
            cmd.args(["--rate", rate]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    // The sidecar side of an OpenFGA-miss row is a gRPC `load` line, read by the same report.
    let out = load(
        &sidecar,
        &json,
        &["measure=fga-miss", "server=sidecar", "shape=c1"],
        &["--path", "/public/info"],
    );
    assert!(out.status.success(), "{out:?}");
    for row in lines(&json) {
        assert!(
            num(&row, "/rps") > 0.0 && num(&row, "/unexpected") == 0.0,
            "{row}"
        );
    }

    // Another status than the one expected is a failed run, as in `load`.
    let out = Command::new(BENCH)
        .args([
            "http",
            "--url",
            &url,
            "--expect",
            "204",
            "--duration",
            "300ms",
        ])
        .args(["--warmup", "0s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    let out = Command::new(BENCH)
        .arg("http-report")
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    let row = |start: &str| {
        table
            .lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no row {start:?} in\n{table}"))
            .to_string()
    };
    // Three servers, three ratios: sidecar / floor, answer / floor, sidecar / answer.
    let peak = row("| peak rps (closed loop) |");
    let ratios = peak
        .split('|')
        .filter_map(|cell| cell.trim().strip_suffix('x'))
        .filter(|r| r.parse::<f64>().is_ok())
        .count();
    assert_eq!(ratios, 3, "{peak}");
    assert!(row("| p99 at half of peak, µs |").contains('x'));
    assert!(row("| 2 |").contains('%'), "the OpenFGA-miss row: {table}");
}
