//! OpenFGA relationship checks through the sidecar against a real OpenFGA (memory engine, or
//! SQLite where a restart must keep data): templates from path, query, header and JSON body,
//! all/any, contextual tuples from token roles and groups, the decision cache (calls saved,
//! single-flight), revocation through the changelog, startup errors, an OpenFGA outage and
//! recovery, and MCP `tools/call` through real Envoy.

mod common;

use std::time::{Duration, Instant};

use common::envoy::Envoy;
use common::openfga::OpenFga;
use common::sidecar::*;
use common::upstream::EchoUpstream;
use serde_json::json;

/// The test rules: the deploy/local OpenFGA rules plus one per template source.
fn config() -> String {
    let base = std::fs::read_to_string(local_dir().join("sidecar-openfga.yaml")).unwrap();
    base.replace(
        "    - { name: api, path: \"/api/**\" }\n",
        r#"    - name: by-query
      path: /search
      check: { all: [ { relation: viewer, object: "conversation:{query:thread}" } ] }
    - name: by-header
      path: /org-tools
      check: { all: [ { relation: executor, object: "tool:{header:x-tool}" } ] }
    - name: all-of
      path: "/pair/{a}/{b}"
      check: { all: [ { relation: executor, object: "tool:{a}" }, { relation: executor, object: "tool:{b}" } ] }
    - name: any-of
      path: "/either/{a}/{b}"
      check: { any: [ { relation: executor, object: "tool:{a}" }, { relation: executor, object: "tool:{b}" } ] }
    - name: premium
      path: /premium
      check: { all: [ { relation: assignee, object: "role:premium" } ] }
    - name: fail-open
      path: "/lenient/{tool}"
      check: { all: [ { relation: executor, object: "tool:{tool}" } ], on_backend_error: allow }
    - { name: api, path: "/api/**" }
"#,
    )
}

async fn sidecar_for(fga: &OpenFga, store: &str) -> Sidecar {
    let s = Sidecar::start(
        &config(),
        &local_dir(),
        &[
            ("OPENFGA_API_URL", &fga.http_url()),
            ("OPENFGA_STORE_ID", store),
        ],
    )
    .await;
    s.wait_ready(Duration::from_secs(10)).await;
    s
}

fn bearer(user: &str, roles: &[&str], groups: &[&str]) -> String {
    let mut c = local_claims(user, roles);
    c["groups"] = json!(groups);
    format!("Bearer {}", mint(c))
}

/// OpenFGA `/check` calls so far, whatever their outcome.
async fn checks_sent(s: &Sidecar) -> u64 {
    s.scrape().await.sum(
        "authz_sidecar_openfga_requests_total",
        &[("endpoint", "check")],
    ) as u64
}

/// The decision-cache counter `authz_sidecar_decision_cache_<name>_total`.
async fn cache_counter(s: &Sidecar, name: &str) -> u64 {
    s.scrape()
        .await
        .get(&format!("authz_sidecar_decision_cache_{name}_total"), &[]) as u64
}

#[tokio::test]
async fn templates_batches_and_contextual_tuples() {
    let fga = OpenFga::shared().await;
    let (store, _) = fga
        .store("templates")
        .tuples(&[
            ("user:alice", "executor", "tool:agent_chat"),
            ("user:alice", "owner", "conversation:c1"),
            ("user:bob", "viewer", "conversation:c2"),
            ("organization:acme", "organization", "tool:search"),
        ])
        .create()
        .await;
    let s = sidecar_for(fga, &store).await;
    let alice = bearer("alice", &["user"], &[]);
    let bob = bearer("bob", &["user"], &[]);
    let check = |m: &'static str,
                 p: &'static str,
                 who: String,
                 extra: Vec<(&'static str, &'static str)>,
                 body: Option<&'static str>| {
        let s = &s;
        async move {
            let mut h = vec![("authorization", who.as_str())];
            h.extend(extra);
            s.check(http(m, p, &h, body)).await
        }
    };
    // Path template.
    let r = check(
        "POST",
        "/tools/agent_chat/execute",
        alice.clone(),
        vec![],
        None,
    )
    .await;
    assert_eq!(status(&r), 200, "{r:?}");
    let r = check(
        "POST",
        "/tools/agent_chat/execute",
        bob.clone(),
        vec![],
        None,
    )
    .await;
    assert_eq!(
        (status(&r), reason(&r).as_str()),
        (403, "user:bob is not executor of tool:agent_chat")
    );
    // Owner implies viewer and editor; query templates.
    for (method, path, who, want) in [
        ("GET", "/conversations/c1", &alice, 200),
        ("PUT", "/conversations/c1", &alice, 200),
        ("PUT", "/conversations/c2", &bob, 403),
        ("GET", "/search?thread=c2", &bob, 200),
        ("GET", "/search?thread=c1", &bob, 403),
    ] {
        let r = check(method, path, who.clone(), vec![], None).await;
        assert_eq!(status(&r), want, "{method} {path}: {r:?}");
    }
    let r = check("GET", "/search", bob.clone(), vec![], None).await;
    assert_eq!(
        (status(&r), reason(&r).as_str()),
        (
            403,
            "cannot build conversation:{query:thread}: query parameter thread missing"
        )
    );
    assert_eq!(
        status(
            &check(
                "GET",
                "/org-tools",
                alice.clone(),
                vec![("x-tool", "agent_chat")],
                None
            )
            .await
        ),
        200
    );
    // JSON body (MCP tools/call).
    let r = check(
        "POST",
        "/message",
        alice.clone(),
        vec![],
        Some(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"agent_chat"}}"#),
    )
    .await;
    assert_eq!(status(&r), 200, "{r:?}");
    let r = check(
        "POST",
        "/message",
        alice.clone(),
        vec![],
        Some(r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"shell"}}"#),
    )
    .await;
    assert_eq!(
        (status(&r), reason(&r).as_str()),
        (403, "user:alice is not executor of tool:shell")
    );
    let r = check(
        "POST",
        "/message",
        alice.clone(),
        vec![],
        Some(r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{}}"#),
    )
    .await;
    assert_eq!(
        reason(&r),
        "cannot build tool:{body:/params/name}: body field /params/name missing"
    );
    assert_eq!(
        status(
            &check(
                "POST",
                "/message",
                bob.clone(),
                vec![],
                Some(r#"{"method":"tools/list"}"#)
            )
            .await
        ),
        200
    );
    // Batch: all / any.
    assert_eq!(
        status(&check("GET", "/pair/agent_chat/shell", alice.clone(), vec![], None).await),
        403
    );
    assert_eq!(
        status(
            &check(
                "GET",
                "/either/agent_chat/shell",
                alice.clone(),
                vec![],
                None
            )
            .await
        ),
        200
    );
    assert_eq!(
        status(&check("GET", "/either/shell/other", alice.clone(), vec![], None).await),
        403
    );
    // Contextual tuples: the group /acme makes carol a member of organization:acme for this
    // request only, so she may execute tool:search; the realm role premium counts as
    // `assignee role:premium`.
    let carol_acme = bearer("carol", &["premium"], &["/acme"]);
    assert_eq!(
        status(
            &check(
                "POST",
                "/tools/search/execute",
                carol_acme.clone(),
                vec![],
                None
            )
            .await
        ),
        200
    );
    assert_eq!(
        status(
            &check(
                "POST",
                "/tools/search/execute",
                bearer("carol", &[], &[]),
                vec![],
                None
            )
            .await
        ),
        403
    );
    assert_eq!(
        status(&check("GET", "/premium", carol_acme, vec![], None).await),
        200
    );
    assert_eq!(
        status(&check("GET", "/premium", bob.clone(), vec![], None).await),
        403
    );
    s.stop().await.unwrap();
}

#[tokio::test]
async fn cache_saves_calls_and_coalesces() {
    let fga = OpenFga::shared().await;
    let (store, _) = fga
        .store("cache")
        .tuples(&[
            ("user:alice", "executor", "tool:t1"),
            ("user:alice", "executor", "tool:t2"),
        ])
        .create()
        .await;
    let s = sidecar_for(fga, &store).await;
    let alice = bearer("alice", &[], &[]);
    let req = |tool: &str| {
        http(
            "POST",
            &format!("/tools/{tool}/execute"),
            &[("authorization", &alice)],
            None,
        )
    };
    let before = checks_sent(&s).await;
    assert_eq!(status(&s.check(req("t1")).await), 200);
    let after_first = checks_sent(&s).await;
    assert_eq!(after_first, before + 1);
    assert_eq!(status(&s.check(req("t1")).await), 200);
    assert_eq!(
        checks_sent(&s).await,
        after_first,
        "second identical check answered from the cache"
    );
    assert!(cache_counter(&s, "hits").await >= 1);

    // 100 concurrent identical misses: one OpenFGA call.
    let client = s.client().await;
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let mut c = client.clone();
        let r = req("t2");
        tasks.push(tokio::spawn(async move {
            c.check(r).await.unwrap().into_inner()
        }));
    }
    for t in tasks {
        assert_eq!(status(&t.await.unwrap()), 200);
    }
    assert_eq!(
        checks_sent(&s).await,
        after_first + 1,
        "100 identical misses made one call"
    );
    assert!(cache_counter(&s, "coalesced").await >= 1);
    s.stop().await.unwrap();
}

#[tokio::test]
async fn revocation_is_seen_within_two_seconds() {
    let fga = OpenFga::shared().await;
    let (store, _) = fga
        .store("revoke")
        .tuples(&[("user:alice", "executor", "tool:revoked")])
        .create()
        .await;
    let s = sidecar_for(fga, &store).await;
    let alice = bearer("alice", &[], &[]);
    let req = || {
        http(
            "POST",
            "/tools/revoked/execute",
            &[("authorization", &alice)],
            None,
        )
    };
    assert_eq!(status(&s.check(req()).await), 200);
    assert_eq!(status(&s.check(req()).await), 200, "cached allow");
    fga.delete_tuples(&store, &[("user:alice", "executor", "tool:revoked")])
        .await;
    let start = Instant::now();
    loop {
        let r = s.check(req()).await;
        if status(&r) == 403 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "still allowed {:?} after the tuple was deleted",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("revocation seen after {:?}", start.elapsed());
    s.stop().await.unwrap();
}

#[tokio::test]
async fn startup_errors_are_one_line_and_exit_2() {
    let fga = OpenFga::shared().await;
    let (store, _) = fga.app_store("startup").await;
    let empty = fga.create_store("no-model").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        config()
            .replace(
                "jwks_file: dev-jwks.json",
                &format!("jwks_file: {}", local_dir().join("dev-jwks.json").display()),
            )
            .replace(
                "file: api-keys.yaml",
                &format!("file: {}", local_dir().join("api-keys.yaml").display()),
            ),
    )
    .unwrap();
    let bad_rule = dir.path().join("bad.yaml");
    std::fs::write(
        &bad_rule,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("relation: editor", "relation: publisher"),
    )
    .unwrap();
    let url = fga.http_url();
    type Case<'a> = (&'a std::path::Path, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (&cfg, vec![("OPENFGA_API_URL", &url)], "OPENFGA_STORE_ID"),
        (
            &cfg,
            vec![
                ("OPENFGA_API_URL", &url),
                ("OPENFGA_STORE_ID", "01HZZZZZZZZZZZZZZZZZZZZZZZ"),
            ],
            "store not found",
        ),
        (
            &cfg,
            vec![
                ("OPENFGA_API_URL", &url),
                ("OPENFGA_STORE_ID", &store),
                ("OPENFGA_MODEL_ID", "01HZZZZZZZZZZZZZZZZZZZZZZZ"),
            ],
            "OPENFGA_MODEL_ID",
        ),
        (
            &cfg,
            vec![("OPENFGA_API_URL", &url), ("OPENFGA_STORE_ID", &empty)],
            "authorization model not set",
        ),
        (
            &bad_rule,
            vec![("OPENFGA_API_URL", &url), ("OPENFGA_STORE_ID", &store)],
            "publisher",
        ),
    ];
    for (path, env, want) in cases {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_authz-sidecar"));
        cmd.args(["serve", "--config"]).arg(path).args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--ops-addr",
            "off",
        ]);
        for v in [
            "OPENFGA_API_URL",
            "OPENFGA_STORE_ID",
            "OPENFGA_STORE_NAME",
            "OPENFGA_MODEL_ID",
            "AUTH_PUBLIC_KEY_URL",
            "KEYCLOAK_URL",
        ] {
            cmd.env_remove(v);
        }
        cmd.envs(env.iter().copied());
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{want}: {stderr}");
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("authz-sidecar:"))
            .collect();
        assert_eq!(lines.len(), 1, "{want}: {stderr}");
        assert!(lines[0].contains(want), "{stderr} should say {want}");
    }
    // The unknown store's error lists the stores the server has.
}

/// The signing keys of deploy/local served as a JWKS URL, as Keycloak serves its own; stops
/// when dropped.
struct JwksServer {
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start() -> Self {
        let jwks = std::fs::read_to_string(local_dir().join("dev-jwks.json")).unwrap();
        let app = axum::Router::new().route(
            "/certs",
            axum::routing::get(move || {
                let jwks = jwks.clone();
                async move { ([("content-type", "application/json")], jwks) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/certs", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, task }
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `promtool check metrics` on a text; its complaints (empty when it passes).
fn promtool_check(text: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(common::tools::tool("promtool"))
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// A real scrape after known traffic (JWT allows through OpenFGA, a cache hit, an OpenFGA
/// deny, an API key, no credentials, a public route, an unmatched path) passes promtool's
/// lint, and each series says what the traffic implies.
#[tokio::test]
async fn metrics_pass_promtool_and_count_the_traffic() {
    let fga = OpenFga::shared().await;
    let (store, _) = fga
        .store("metrics")
        .tuples(&[("user:alice", "executor", "tool:t1")])
        .create()
        .await;
    let jwks = JwksServer::start().await;
    let s = Sidecar::start(
        &config(),
        &local_dir(),
        &[
            ("OPENFGA_API_URL", &fga.http_url()),
            ("OPENFGA_STORE_ID", &store),
            ("AUTH_PUBLIC_KEY_URL", &jwks.url),
        ],
    )
    .await;
    s.wait_ready(Duration::from_secs(10)).await;
    let execute = |who: &str| Req::post("/tools/t1/execute").bearer(&mint(local_claims(who, &[])));
    let traffic = [
        (execute("alice"), 200, "OpenFGA allows: one check"),
        (execute("alice"), 200, "the same question: a cache hit"),
        (execute("bob"), 403, "OpenFGA denies: one more check"),
        (
            Req::get("/api/agents").api_key("mcpkey_test_local_alice"),
            200,
            "an API key",
        ),
        (Req::get("/api/agents"), 401, "no credentials"),
        (Req::get("/public/page"), 200, "a public route"),
    ];
    for (req, want, what) in traffic {
        let r = s.check(req).await;
        assert_eq!(status(&r), want, "{what}: {r:?}");
    }
    let unmatched = status(&s.check(Req::get("/nowhere")).await).to_string();

    let scrape = s.scrape().await;
    let (passed, complaints) = promtool_check(&scrape.0);
    assert!(
        passed && complaints.trim().is_empty(),
        "promtool check metrics: {complaints}\n{}",
        scrape.0
    );

    // The alerting rules shipped in deploy/ are valid and name only series this scrape has.
    let rules = common::tools::repo_file("deploy/prometheus/alerts.yaml");
    let checked = std::process::Command::new(common::tools::tool("promtool"))
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "promtool check rules: {checked:?}"
    );
    let text = std::fs::read_to_string(&rules).unwrap();
    let samples = scrape.samples();
    for (i, _) in text.match_indices("authz_sidecar_") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(
            scrape.has_family(&name) || samples.iter().any(|s| s.name == name),
            "deploy/prometheus/alerts.yaml names {name}, which /metrics does not export"
        );
    }

    let decisions =
        |labels: [(&str, &str); 5]| scrape.get("authz_sidecar_decisions_total", &labels);
    let by = |decision, status, error, credential, rule| {
        [
            ("decision", decision),
            ("status", status),
            ("error", error),
            ("credential", credential),
            ("rule", rule),
        ]
    };
    assert_eq!(
        decisions(by("allow", "200", "none", "jwt", "tool-execute")),
        2.0
    );
    assert_eq!(
        scrape.sum(
            "authz_sidecar_decisions_total",
            &[
                ("decision", "deny"),
                ("status", "403"),
                ("credential", "jwt"),
                ("rule", "tool-execute")
            ]
        ),
        1.0
    );
    assert_eq!(decisions(by("allow", "200", "none", "api_key", "api")), 1.0);
    assert_eq!(
        decisions(by("deny", "401", "unauthenticated", "none", "api")),
        1.0
    );
    assert_eq!(decisions(by("allow", "200", "none", "none", "public")), 1.0);
    assert_eq!(
        scrape.sum(
            "authz_sidecar_decisions_total",
            &[("status", &unmatched), ("rule", "none")]
        ),
        1.0,
        "no rule matched: the fixed rule label"
    );
    assert_eq!(
        scrape.get("authz_sidecar_check_duration_seconds_count", &[]),
        7.0
    );
    assert_eq!(scrape.get("authz_sidecar_failed_open_total", &[]), 0.0);

    // OpenFGA: two checks (alice's miss and bob's), none for the cache hit; startup read the
    // store and its model through the same client.
    let fga_calls = |endpoint, outcome| {
        scrape.get(
            "authz_sidecar_openfga_requests_total",
            &[("endpoint", endpoint), ("outcome", outcome)],
        )
    };
    assert_eq!(fga_calls("check", "ok"), 2.0);
    assert_eq!(
        scrape.sum(
            "authz_sidecar_openfga_requests_total",
            &[("endpoint", "check")]
        ),
        2.0
    );
    assert!(fga_calls("get_store", "ok") >= 1.0);
    assert_eq!(
        scrape.get(
            "authz_sidecar_openfga_request_duration_seconds_count",
            &[("endpoint", "check")]
        ),
        2.0
    );
    let breaker = |state| scrape.get("authz_sidecar_openfga_breaker_state", &[("state", state)]);
    assert_eq!(
        (breaker("closed"), breaker("open"), breaker("half_open")),
        (1.0, 0.0, 0.0)
    );

    // The decision cache: two misses, one hit, both answers kept.
    let cache = |name: &str| scrape.get(&format!("authz_sidecar_decision_cache_{name}"), &[]);
    assert_eq!(cache("hits_total"), 1.0);
    assert_eq!(cache("misses_total"), 2.0);
    assert_eq!(cache("coalesced_total"), 0.0);
    assert_eq!(cache("entries"), 2.0);

    // Signing keys from the JWKS URL; API keys from the file.
    assert!(scrape.get("authz_sidecar_jwks_refreshes_total", &[("result", "ok")]) >= 1.0);
    assert_eq!(scrape.get("authz_sidecar_jwks_keys", &[]), 1.0);
    let refreshed = scrape.get(
        "authz_sidecar_jwks_last_refresh_success_timestamp_seconds",
        &[],
    );
    assert!((refreshed - now() as f64).abs() < 60.0, "{refreshed}");
    assert_eq!(scrape.get("authz_sidecar_api_key_file_keys", &[]), 3.0);
    assert_eq!(
        scrape.get(
            "authz_sidecar_api_key_file_reloads_total",
            &[("result", "error")]
        ),
        0.0
    );
    assert_eq!(
        scrape.get("authz_sidecar_config_reloads_total", &[("result", "ok")]),
        0.0
    );
    assert_eq!(
        scrape.get(
            "authz_sidecar_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert!(
        !scrape.0.contains("authz_sidecar_backend"),
        "the old gauge family is gone"
    );

    // A scraper that asks for OpenMetrics gets it: the same counters, framed as OpenMetrics.
    let open = reqwest::Client::new()
        .get(format!("http://{}/metrics", s.ops_addr))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert!(
        open.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let open = open.text().await.unwrap();
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert!(open.contains("# TYPE authz_sidecar_decision_cache_hits counter\n"));
    assert!(open.contains("authz_sidecar_decision_cache_hits_total 1\n"));
    s.stop().await.unwrap();
}

#[tokio::test]
async fn outage_fails_closed_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut fga = OpenFga::start_sqlite(dir.path()).await;
    let (store, _) = fga
        .store("outage")
        .tuples(&[
            ("user:alice", "executor", "tool:a"),
            ("user:alice", "executor", "tool:b"),
        ])
        .create()
        .await;
    let s = sidecar_for(&fga, &store).await;
    let alice = bearer("alice", &[], &[]);
    assert_eq!(
        status(
            &s.check(http(
                "POST",
                "/tools/a/execute",
                &[("authorization", &alice)],
                None
            ))
            .await
        ),
        200
    );
    fga.stop();
    // Not cached: 503 naming the cause. Cached answers keep working (and the changelog
    // failure clears the cache, so give it a moment and expect 503 for tool:a too).
    let r = s
        .check(http(
            "POST",
            "/tools/b/execute",
            &[("authorization", &alice)],
            None,
        ))
        .await;
    assert_eq!(status(&r), 503, "{r:?}");
    assert!(
        reason(&r).starts_with("authorization backend unavailable: "),
        "{}",
        reason(&r)
    );
    assert!(
        reason(&r).contains("connection refused") || reason(&r).contains("circuit open"),
        "{}",
        reason(&r)
    );
    // Failing open is a per-rule choice, marked for the app.
    let r = s
        .check(http(
            "GET",
            "/lenient/b",
            &[("authorization", &alice)],
            None,
        ))
        .await;
    assert_eq!(status(&r), 200);
    assert!(header(&r, "x-auth-failed-open").is_some());
    // Repeated failures open the breaker: fast answers.
    for _ in 0..10 {
        s.check(http(
            "POST",
            "/tools/b/execute",
            &[("authorization", &alice)],
            None,
        ))
        .await;
    }
    let t = Instant::now();
    let r = s
        .check(http(
            "POST",
            "/tools/b/execute",
            &[("authorization", &alice)],
            None,
        ))
        .await;
    assert_eq!(status(&r), 503);
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "breaker answers fast: {:?}",
        t.elapsed()
    );
    // Still ready: an OpenFGA outage is a 503 on the routes that need it, not a pod taken out
    // of the Service (which would fail the public and JWT-only routes too).
    assert_eq!(
        s.ops_get("/readyz").await.0,
        200,
        "ready (initialised once) while OpenFGA is down"
    );
    // gRPC health follows readiness on a 200 ms loop.
    let deadline = Instant::now() + Duration::from_secs(3);
    while serving_status(s.grpc_addr, "envoy.service.auth.v3.Authorization").await != 1 {
        assert!(
            Instant::now() < deadline,
            "gRPC health SERVING while OpenFGA is down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let scrape = s.scrape().await;
    assert_eq!(
        scrape.get("authz_sidecar_openfga_breaker_state", &[("state", "open")]),
        1.0,
        "the outage shows in the metrics: {}",
        scrape.0
    );
    assert!(
        scrape.get(
            "authz_sidecar_openfga_requests_total",
            &[("endpoint", "check"), ("outcome", "connect_error")]
        ) >= 1.0,
        "the refused connections are counted as such: {}",
        scrape.0
    );
    assert!(scrape.get("authz_sidecar_openfga_short_circuited_total", &[]) >= 1.0);

    fga.start_again().await;
    let start = Instant::now();
    loop {
        let r = s
            .check(http(
                "POST",
                "/tools/b/execute",
                &[("authorization", &alice)],
                None,
            ))
            .await;
        if status(&r) == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no recovery: {}",
            reason(&r)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s.wait_ready(Duration::from_secs(10)).await;
    s.stop().await.unwrap();
    fga.stop();
}

#[tokio::test]
async fn mcp_tools_call_through_envoy() {
    let fga = OpenFga::shared().await;
    let (store, _) = fga
        .store("envoy-mcp")
        .tuples(&[("user:alice", "executor", "tool:agent_chat")])
        .create()
        .await;
    let s = sidecar_for(fga, &store).await;
    let (up, upstream) = EchoUpstream::start().await;
    let envoy = Envoy::start(s.grpc_addr, up).await;
    let http_client = reqwest::Client::new();
    let call = |tool: &str| {
        http_client
            .post(format!("{}/message", envoy.url()))
            .header("authorization", bearer("alice", &[], &[]))
            .header("content-type", "application/json")
            .body(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": {}}}).to_string())
            .send()
    };
    let r = call("agent_chat").await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let echo: serde_json::Value = r.json().await.unwrap();
    assert_eq!(echo["headers"]["x-auth-subject"], "user:alice");
    assert!(
        echo["body"]
            .as_str()
            .unwrap_or_default()
            .contains("agent_chat"),
        "the body still reaches the app: {echo}"
    );
    let r = call("shell").await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("user:alice is not executor of tool:shell")
    );
    assert_eq!(upstream.hits(), 1);
    s.stop().await.unwrap();
}

#[tokio::test]
async fn doctor_names_the_problem() {
    let fga = OpenFga::shared().await;
    let (store, _) = fga
        .store("doctor")
        .tuples(&[("user:alice", "executor", "tool:agent_chat")])
        .create()
        .await;
    let cfg = local_dir().join("sidecar-openfga.yaml");
    let token = mint(local_claims("bob", &[]));
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let run = |env: Vec<(&'static str, String)>, args: Vec<String>| {
        let cfg = cfg.clone();
        async move {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_authz-sidecar"));
            cmd.arg("doctor").arg("--config").arg(&cfg).args(&args);
            for v in [
                "OPENFGA_API_URL",
                "OPENFGA_STORE_ID",
                "AUTH_PUBLIC_KEY_URL",
                "KEYCLOAK_URL",
            ] {
                cmd.env_remove(v);
            }
            cmd.envs(env);
            let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
                .await
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).to_string()
                    + &String::from_utf8_lossy(&out.stderr),
            )
        }
    };
    // A missing tuple, named as the relationship that does not hold.
    let (code, out) = run(
        vec![
            ("OPENFGA_API_URL", fga.http_url()),
            ("OPENFGA_STORE_ID", store.clone()),
        ],
        vec![
            "--token".into(),
            token.clone(),
            "--method".into(),
            "POST".into(),
            "--path".into(),
            "/tools/agent_chat/execute".into(),
        ],
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("ok    openfga"), "{out}");
    assert!(
        out.contains("denied 403: user:bob is not executor of tool:agent_chat"),
        "{out}"
    );
    assert!(!out.contains(&token), "doctor never prints the token");
    // Keycloak (the JWKS URL) not reachable.
    let (code, out) = run(
        vec![
            ("OPENFGA_API_URL", fga.http_url()),
            ("OPENFGA_STORE_ID", store.clone()),
            (
                "AUTH_PUBLIC_KEY_URL",
                format!(
                    "http://127.0.0.1:{dead_port}/realms/mcp-server/protocol/openid-connect/certs"
                ),
            ),
        ],
        vec![],
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("FAIL  signing keys") && out.contains("connection refused"),
        "{out}"
    );
    // OpenFGA store that does not exist: named, with the stores the server has.
    let (code, out) = run(
        vec![
            ("OPENFGA_API_URL", fga.http_url()),
            ("OPENFGA_STORE_ID", "01HZZZZZZZZZZZZZZZZZZZZZZZ".into()),
        ],
        vec![],
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("FAIL  openfga") && out.contains("store not found; the server has"),
        "{out}"
    );
}
