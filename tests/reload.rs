//! Live reload: a file change or a reload request (SIGHUP) swaps the routes in without a
//! restart; a broken config (YAML, rule, a relation the OpenFGA model lacks) is refused and the
//! old policy keeps answering; restart-only keys are named and not applied; a ConfigMap-style
//! `..data` symlink swap is seen; 20 reloads under steady load give only the two policies'
//! answers; and SIGHUP to the real binary reloads it without killing it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::openfga::OpenFga;
use common::sidecar::*;

/// A config directory: the dev JWKS and API keys next to `sidecar.yaml`.
struct Dir {
    _tmp: tempfile::TempDir,
    path: PathBuf,
}

impl Dir {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().to_path_buf();
        for f in ["dev-jwks.json", "api-keys.yaml"] {
            std::fs::copy(local_dir().join(f), path.join(f)).unwrap();
        }
        Self { _tmp: tmp, path }
    }

    fn config(&self) -> PathBuf {
        self.path.join("sidecar.yaml")
    }

    fn write(&self, yaml: &str) -> PathBuf {
        std::fs::write(self.config(), yaml).unwrap();
        self.config()
    }
}

/// `/docs` for admins only: a caller without credentials gets 401.
const DOCS_DENIED: &str = r#"- { name: docs, path: "/docs/**", roles: [admin] }"#;
/// `/docs` public.
const DOCS_PUBLIC: &str = r#"- { name: docs, path: "/docs/**", public: true }"#;

/// A config with `server` settings (inside `server: { }`), the docs rule and an `/api` rule.
fn yaml(server: &str, docs_rule: &str) -> String {
    format!(
        r#"server: {{ {server} }}
jwt: {{ jwks_file: dev-jwks.json, issuer: authz-sidecar-local, audience: mcp-server }}
api_keys: {{ file: api-keys.yaml }}
routes:
  unmatched: deny
  rules:
    {docs_rule}
    - {{ name: api, path: "/api/**" }}
"#
    )
}

async fn docs(s: &Sidecar) -> u16 {
    status(&s.check(Req::get("/docs/guide")).await)
}

/// Checks `/docs/guide` until it answers `want`; the time it took.
async fn until_docs(s: &Sidecar, want: u16, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if docs(s).await == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "/docs/guide did not become {want} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of a metric line `name{labels} value`.
async fn metric(s: &Sidecar, series: &str) -> f64 {
    let (_, text) = s.ops_get("/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(series).map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no {series} in metrics:\n{text}"))
}

#[tokio::test]
async fn a_route_made_public_in_the_file_is_served_within_the_interval() {
    let dir = Dir::new();
    let path = dir.write(&yaml("reload_interval: 100ms", DOCS_DENIED));
    let s = Sidecar::start_file(&path, &[]).await;
    assert_eq!(docs(&s).await, 401);

    dir.write(&yaml("reload_interval: 100ms", DOCS_PUBLIC));
    let took = until_docs(&s, 200, Duration::from_secs(3)).await;
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(
        metric(&s, "authz_sidecar_config_reloads_total{result=\"ok\"}").await,
        1.0
    );
    assert_eq!(
        metric(&s, "authz_sidecar_config_last_reload_successful").await,
        1.0
    );
    assert!(
        metric(
            &s,
            "authz_sidecar_config_last_reload_success_timestamp_seconds"
        )
        .await
            > 0.0
    );
    s.stop().await.unwrap();
}

#[tokio::test]
async fn a_reload_request_applies_the_file_when_watching_is_off() {
    let dir = Dir::new();
    let path = dir.write(&yaml("reload_interval: 0s", DOCS_DENIED));
    let s = Sidecar::start_file(&path, &[]).await;
    dir.write(&yaml("reload_interval: 0s", DOCS_PUBLIC));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        docs(&s).await,
        401,
        "not watched: nothing changes by itself"
    );

    let outcome = s.reload().await;
    assert!(outcome.applied(), "{outcome:?}");
    assert!(outcome.restart_needed().is_empty(), "{outcome:?}");
    assert_eq!(
        docs(&s).await,
        200,
        "the reload request (SIGHUP) applied it"
    );
    s.stop().await.unwrap();
}

#[tokio::test]
async fn a_broken_config_is_refused_and_the_old_policy_keeps_answering() {
    let dir = Dir::new();
    let good = yaml("reload_interval: 0s", DOCS_PUBLIC);
    let path = dir.write(&good);
    let s = Sidecar::start_file(&path, &[]).await;
    let cases = [
        ("routes: [oops", "config file"),
        (
            &*good.replace(r#"path: "/docs/**""#, "path: nope"),
            "routes.rules[0].path",
        ),
        (
            &*good.replace("issuer: authz-sidecar-local", "algorithms: [HS256]"),
            "jwt.algorithms",
        ),
    ];
    let mut refused = 0.0;
    for (bad, names) in cases {
        dir.write(bad);
        let outcome = s.reload().await;
        refused += 1.0;
        let error = outcome.result.clone().unwrap_err();
        assert!(error.contains(names), "{bad}: {error} should name {names}");
        assert!(!error.contains('\n'), "one line: {error}");
        assert!(
            outcome.hash.is_some(),
            "the refused bytes are named by hash"
        );
        assert_eq!(docs(&s).await, 200, "{bad}: the old policy keeps answering");
    }
    assert_eq!(
        metric(&s, "authz_sidecar_config_reloads_total{result=\"error\"}").await,
        refused
    );
    assert_eq!(
        metric(&s, "authz_sidecar_config_last_reload_successful").await,
        0.0
    );
    s.stop().await.unwrap();
}

#[tokio::test]
async fn a_rule_naming_a_relation_the_openfga_model_lacks_is_refused() {
    let fga = OpenFga::shared().await;
    let (store, _) = fga
        .store("reload-model")
        .tuples(&[("user:alice", "executor", "tool:search")])
        .create()
        .await;
    let dir = Dir::new();
    let tools = |relation: &str| {
        yaml(
            "reload_interval: 0s",
            &format!(
                r#"- {{ name: tools, path: "/tools/{{tool}}", check: {{ all: [ {{ relation: {relation}, object: "tool:{{tool}}" }} ] }} }}"#
            ),
        )
        .replace("routes:", "openfga: {}\nroutes:")
    };
    let path = dir.write(&tools("executor"));
    let s = Sidecar::start_file(
        &path,
        &[
            ("OPENFGA_API_URL", &fga.http_url()),
            ("OPENFGA_STORE_ID", &store),
        ],
    )
    .await;
    s.wait_ready(Duration::from_secs(10)).await;
    let alice = mint(local_claims("alice", &[]));
    let search = || Req::get("/tools/search").bearer(&alice);
    assert_eq!(status(&s.check(search()).await), 200);

    dir.write(&tools("runner"));
    let outcome = s.reload().await;
    let error = outcome.result.clone().unwrap_err();
    assert!(
        error.contains("runner") && error.contains("routes.rules[0]"),
        "names the relation and the rule: {error}"
    );
    assert_eq!(
        status(&s.check(search()).await),
        200,
        "the old rules keep answering"
    );

    // The same file with a relation the model has applies.
    dir.write(&tools("owner"));
    assert!(s.reload().await.applied());
    assert_eq!(status(&s.check(search()).await), 403, "alice is no owner");
    s.stop().await.unwrap();
}

/// The decision cache is built once, but its TTLs reload: with `allowed_ttl: 0s` answers are
/// no longer kept, so each check asks OpenFGA again.
#[tokio::test]
async fn the_decision_caches_ttls_reload() {
    let fga = OpenFga::shared().await;
    let (store, _) = fga
        .store("reload-ttl")
        .tuples(&[
            ("user:alice", "executor", "tool:a"),
            ("user:alice", "executor", "tool:b"),
        ])
        .create()
        .await;
    let dir = Dir::new();
    let config = |ttl: &str| {
        yaml(
            "reload_interval: 0s",
            r#"- { name: tools, path: "/tools/{tool}", check: { all: [ { relation: executor, object: "tool:{tool}" } ] } }"#,
        )
        .replace("routes:", &format!("openfga: {{}}\ncache: {{ allowed_ttl: {ttl} }}\nroutes:"))
    };
    let path = dir.write(&config("1h"));
    let s = Sidecar::start_file(
        &path,
        &[
            ("OPENFGA_API_URL", &fga.http_url()),
            ("OPENFGA_STORE_ID", &store),
        ],
    )
    .await;
    s.wait_ready(Duration::from_secs(10)).await;
    let alice = mint(local_claims("alice", &[]));
    let tool = |t: &str| Req::get(&format!("/tools/{t}")).bearer(&alice);
    // Every OpenFGA /check call, whatever its outcome (read when scraped).
    let checks_sent = || async {
        s.scrape().await.sum(
            "authz_sidecar_openfga_requests_total",
            &[("endpoint", "check")],
        )
    };
    assert_eq!(status(&s.check(tool("a")).await), 200);
    assert_eq!(status(&s.check(tool("a")).await), 200);
    let before = checks_sent().await;
    assert_eq!(status(&s.check(tool("a")).await), 200);
    assert_eq!(checks_sent().await, before, "cached for an hour");

    dir.write(&config("0s"));
    assert!(s.reload().await.applied());
    for _ in 0..3 {
        assert_eq!(status(&s.check(tool("b")).await), 200);
    }
    assert_eq!(
        checks_sent().await,
        before + 3.0,
        "with allowed_ttl 0s every check asks OpenFGA"
    );
    s.stop().await.unwrap();
}

#[tokio::test]
async fn restart_only_changes_are_named_and_not_applied_while_the_rest_is() {
    let dir = Dir::new();
    let path = dir.write(&yaml("reload_interval: 0s", DOCS_DENIED));
    let s = Sidecar::start_file(&path, &[]).await;
    let alice_key = || Req::get("/api/x").api_key("mcpkey_test_local_alice");
    assert_eq!(status(&s.check(alice_key()).await), 200);

    // Another key file, without alice's key, a new drain timeout, and the docs made public.
    std::fs::write(dir.path.join("other-keys.yaml"), "keys: []\n").unwrap();
    dir.write(
        &yaml("reload_interval: 0s, drain_timeout: 7s", DOCS_PUBLIC)
            .replace("file: api-keys.yaml", "file: other-keys.yaml"),
    );
    let outcome = s.reload().await;
    assert!(outcome.applied(), "{outcome:?}");
    assert_eq!(
        outcome.restart_needed(),
        ["server.drain_timeout", "api_keys.file"]
    );
    assert_eq!(docs(&s).await, 200, "the route change applied");
    assert_eq!(
        status(&s.check(alice_key()).await),
        200,
        "the key store started with keeps serving until a restart"
    );
    s.stop().await.unwrap();
}

#[cfg(unix)]
#[tokio::test]
async fn a_configmap_symlink_swap_is_picked_up() {
    use std::os::unix::fs::symlink;
    let dir = Dir::new();
    // As the kubelet lays out a mounted ConfigMap: sidecar.yaml -> ..data/sidecar.yaml,
    // ..data -> ..<timestamp>; an update writes a new timestamped dir and swaps ..data.
    let jwks = dir.path.join("dev-jwks.json");
    let keys = dir.path.join("api-keys.yaml");
    let version = |name: &str, docs_rule: &str| {
        let v = dir.path.join(name);
        std::fs::create_dir(&v).unwrap();
        let text = yaml("reload_interval: 100ms", docs_rule)
            .replace("dev-jwks.json", &jwks.display().to_string())
            .replace("api-keys.yaml", &keys.display().to_string());
        std::fs::write(v.join("sidecar.yaml"), text).unwrap();
    };
    let mount = dir.path.join("mount");
    std::fs::create_dir(&mount).unwrap();
    let in_mount = |p: &str| mount.join(p);
    version("mount/..2025_01_01_a", DOCS_DENIED);
    symlink("..2025_01_01_a", in_mount("..data")).unwrap();
    symlink("..data/sidecar.yaml", in_mount("sidecar.yaml")).unwrap();

    let s = Sidecar::start_file(&in_mount("sidecar.yaml"), &[]).await;
    assert_eq!(docs(&s).await, 401);

    version("mount/..2025_01_01_b", DOCS_PUBLIC);
    symlink("..2025_01_01_b", in_mount("..data_tmp")).unwrap();
    std::fs::rename(in_mount("..data_tmp"), in_mount("..data")).unwrap();
    std::fs::remove_dir_all(in_mount("..2025_01_01_a")).unwrap();
    until_docs(&s, 200, Duration::from_secs(3)).await;
    s.stop().await.unwrap();
}

/// Two policies that answer each of these requests differently.
const POLICY_A: &str = r#"- { name: docs, path: "/docs/**", roles: [admin] }
    - { name: beta, path: "/beta/**", public: true }"#;
const POLICY_B: &str = r#"- { name: docs, path: "/docs/**", public: true }
    - { name: beta, path: "/beta/**", roles: [admin] }"#;

/// (status, reason): the answer, as far as a caller can tell two apart.
fn answer(r: &authz_sidecar::proto::pb::envoy::service::auth::v3::CheckResponse) -> (u16, String) {
    let code = status(r);
    (
        code,
        if code == 200 {
            String::new()
        } else {
            reason(r)
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_steady_load_twenty_reloads_give_only_the_two_policies_answers() {
    let dir = Dir::new();
    let path = dir.write(&yaml("reload_interval: 0s", POLICY_A));
    let s = Arc::new(Sidecar::start_file(&path, &[]).await);
    let user = mint(local_claims("carol", &["viewer"]));
    let requests: Arc<Vec<CheckRequestFn>> = Arc::new(vec![
        Box::new(|_| Req::get("/docs/guide").build()),
        Box::new(|t| Req::get("/docs/guide").bearer(t).build()),
        Box::new(|t| Req::get("/beta/x").bearer(t).build()),
        Box::new(|_| Req::get("/beta/x").build()),
        Box::new(|t| Req::get("/api/x").bearer(t).build()),
        Box::new(|_| Req::get("/elsewhere").build()),
    ]);
    // Each policy's answer to each request, asked while it alone serves.
    let mut client = s.client().await;
    let ask_all = async |client: &mut AuthClient| {
        let mut out = Vec::new();
        for r in requests.iter() {
            out.push(answer(&client.check(r(&user)).await.unwrap().into_inner()));
        }
        out
    };
    let under_a = ask_all(&mut client).await;
    dir.write(&yaml("reload_interval: 0s", POLICY_B));
    assert!(s.reload().await.applied());
    let under_b = ask_all(&mut client).await;
    for i in 0..4 {
        assert_ne!(
            under_a[i], under_b[i],
            "request {i} tells the policies apart"
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (sent, answered) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for n in 0..8 {
        let (requests, user, stop) = (requests.clone(), user.clone(), stop.clone());
        let (sent, answered) = (sent.clone(), answered.clone());
        let (under_a, under_b) = (under_a.clone(), under_b.clone());
        // Two connections, four clients on each, as Envoy multiplexes checks.
        let mut client = if n % 2 == 0 {
            s.client().await
        } else {
            client.clone()
        };
        clients.push(tokio::spawn(async move {
            let mut seen = [[false; 2]; 6];
            let mut i = n;
            while !stop.load(Ordering::Relaxed) {
                let k = i % requests.len();
                i += 1;
                sent.fetch_add(1, Ordering::Relaxed);
                let got = match client.check(requests[k](&user)).await {
                    Ok(r) => answer(&r.into_inner()),
                    Err(e) => panic!("a check RPC failed during reloads: {e}"),
                };
                answered.fetch_add(1, Ordering::Relaxed);
                if got == under_a[k] {
                    seen[k][0] = true;
                } else if got == under_b[k] {
                    seen[k][1] = true;
                } else {
                    panic!(
                        "request {k} got {got:?}, neither policy's answer ({:?} / {:?})",
                        under_a[k], under_b[k]
                    );
                }
            }
            seen
        }));
    }

    let start = Instant::now();
    for round in 0..20 {
        let next = if round % 2 == 0 { POLICY_A } else { POLICY_B };
        dir.write(&yaml("reload_interval: 0s", next));
        let outcome = s.reload().await;
        assert!(outcome.applied(), "reload {round}: {outcome:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut both = [[false; 2]; 6];
    for c in clients {
        let seen = c.await.expect("no client failed");
        for (k, s) in seen.iter().enumerate() {
            both[k][0] |= s[0];
            both[k][1] |= s[1];
        }
    }
    assert!(start.elapsed() < Duration::from_secs(15));
    let (sent, answered) = (
        sent.load(Ordering::Relaxed),
        answered.load(Ordering::Relaxed),
    );
    assert_eq!(sent, answered, "no check dropped");
    assert!(answered > 200, "steady load: only {answered} checks");
    assert!(
        both[0][0] && both[0][1],
        "the load saw both policies serve: {both:?}"
    );
    assert_eq!(
        metric(&s, "authz_sidecar_config_reloads_total{result=\"ok\"}").await,
        21.0
    );
}

type AuthClient =
    authz_sidecar::proto::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient<
        tonic::transport::Channel,
    >;
type CheckRequestFn = Box<
    dyn Fn(&str) -> authz_sidecar::proto::pb::envoy::service::auth::v3::CheckRequest + Send + Sync,
>;

/// The binary, with the variables that would change its key source or stores removed.
fn bin() -> Command {
    common::binary::sidecar()
}

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn log_has(log: &Path, text: &str) -> bool {
    std::fs::read_to_string(log).is_ok_and(|l| l.contains(text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_binary_and_does_not_kill_it() {
    let dir = Dir::new();
    let path = dir.write(&yaml("reload_interval: 0s", DOCS_DENIED));
    let (grpc, ops) = (free_addr(), free_addr());
    let log = dir.path.join("sidecar.log");
    let mut child = bin()
        .args(["serve", "--config"])
        .arg(&path)
        .arg("--grpc-addr")
        .arg(grpc.to_string())
        .arg("--ops-addr")
        .arg(ops.to_string())
        // The lines below are read as text (a file is not a terminal: JSON by default).
        .env("LOG_FORMAT", "text")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let readyz = format!("http://{ops}/readyz");
    let mut ready = false;
    for _ in 0..100 {
        if reqwest::get(&readyz).await.is_ok_and(|r| r.status() == 200) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "sidecar never became ready");
    let mut client = AuthClient::connect(format!("http://{grpc}")).await.unwrap();
    let docs = async |c: &mut AuthClient| {
        status(
            &c.check(Req::get("/docs/guide").build())
                .await
                .unwrap()
                .into_inner(),
        )
    };
    assert_eq!(docs(&mut client).await, 401);

    // The route made public, and a drain timeout that needs a restart.
    dir.write(&yaml("reload_interval: 0s, drain_timeout: 7s", DOCS_PUBLIC));
    let pid = child.id().to_string();
    let hup = |signal: &str| {
        Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success()
    };
    assert!(hup("-HUP"));
    let start = Instant::now();
    while !log_has(&log, "config reloaded") {
        assert!(
            child.try_wait().unwrap().is_none(),
            "SIGHUP ended the process: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(start.elapsed() < Duration::from_secs(5), "no reload logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("config reloaded"))
        .unwrap();
    assert!(
        line.contains("result=\"ok\"")
            && line.contains("cause=sighup")
            && line.contains("config_hash=sha256:"),
        "{line}"
    );
    assert!(
        text.contains("restart needed for: server.drain_timeout"),
        "the restart-only key is named:\n{text}"
    );
    assert_eq!(docs(&mut client).await, 200, "the reload applied");

    assert!(hup("-TERM"));
    let code =
        common::binary::exit_code(&mut child, Duration::from_secs(10), "after SIGTERM").await;
    assert_eq!(code, Some(0));
}
