//! Paths and hosts (issue 7, findings 2 and 3): the sidecar decides on the path and the host
//! the app receives, or refuses with 400 `invalid_request` naming the problem. It used to
//! resolve `..`, merge `//` and cut `;`-less segments into a normal form of its own, so
//! `/public/%2e%2e;/admin/x` was judged public while a servlet container routes it to
//! `/admin/x`, and `Host: admin.example.com.` stepped around a `hosts:` rule.
//!
//! Every finding is sent straight over gRPC and through a real Envoy twice: with the path
//! settings of deploy/envoy/envoy.yaml and with Envoy's defaults (no `normalize_path`). Attack
//! paths go as raw HTTP/1.1 bytes, since an HTTP client would normalise them first.

use std::time::Duration;

use authz_sidecar::proto::pb::envoy::service::auth::v3::CheckResponse;
use serde_json::Value;

use crate::common::envoy::{Envoy, EnvoyOptions};
use crate::common::raw_http;
use crate::common::sidecar::*;
use crate::common::upstream::EchoUpstream;

/// `/public/**` public, `/admin/**` role admin, every path of admin.example.com role admin,
/// anything else any signed-in user: a path or host read as something else than the app
/// reads it lands on a weaker rule.
const RULES: &str = r#"
jwt:
  jwks_file: dev-jwks.json
  issuer: authz-sidecar-local
  audience: mcp-server
  realm: authz-sidecar-local
routes:
  unmatched: deny
  rules:
    - { name: admin-host, hosts: [admin.example.com], path: "/**", roles: [admin] }
    - { name: public, path: "/public/**", public: true }
    - { name: admin, path: "/admin/**", roles: [admin] }
    - { name: signed-in, path: "/**" }
"#;

async fn sidecar(extra: &str) -> Sidecar {
    let s = Sidecar::start(&format!("{RULES}{extra}"), &local_dir(), &[]).await;
    s.wait_ready(Duration::from_secs(5)).await;
    s
}

fn bob() -> String {
    format!("Bearer {}", mint(local_claims("bob", &["user"])))
}

fn alice() -> String {
    format!("Bearer {}", mint(local_claims("alice", &["user", "admin"])))
}

/// `error` of a deny's JSON body.
fn error(r: &CheckResponse) -> String {
    use authz_sidecar::proto::pb::envoy::service::auth::v3::check_response::HttpResponse;
    match &r.http_response {
        Some(HttpResponse::DeniedResponse(d)) => {
            let v: Value = serde_json::from_str(&d.body).unwrap();
            v["error"].as_str().unwrap_or_default().to_string()
        }
        _ => String::new(),
    }
}

/// The attack paths of finding 2 and the reason each is refused with (as a substring).
const ATTACK_PATHS: &[(&str, &str)] = &[
    ("/public/%2e%2e;/admin/x", "; path parameter"),
    ("/public/..;/admin/x", "; path parameter"),
    ("/public/..%2fadmin/x", "encoded slash (%2F)"),
    ("/public/..%2Fadmin/x", "encoded slash (%2F)"),
    ("/public/..%5cadmin/x", "encoded backslash (%5C)"),
    ("/public/..\\admin/x", "backslash"),
    ("/admin/../public/x", "dot segment"),
    ("/public/../admin/x", "dot segment"),
    ("/public/%2E%2e/admin/x", "dot segment"),
    ("/admin/x/%2e", "dot segment"),
    ("/admin//../public/x", "empty segment (//)"),
    ("//admin/x", "empty segment (//)"),
    ("/admin;x/y", "; path parameter"),
    ("/admin;jsessionid=1/y", "; path parameter"),
    ("/%c0%ae%c0%ae/admin/x", "not UTF-8"),
    ("/public/%u002e%u002e/admin/x", "bad percent-encoding"),
    ("/public/%252e%252e/admin/x", "double percent-encoding"),
    ("/admin%3Fx/y", "encoded ? or #"),
    ("/public/x%00/../../admin", "control character"),
    ("/public/x#/../../admin/x", "fragment"),
    ("*", "not an origin-form path"),
    ("http://app.example.com/admin/x", "not an origin-form path"),
];

#[tokio::test]
async fn attack_paths_are_refused_over_grpc() {
    let s = sidecar("").await;
    let token = bob();
    for (path, why) in ATTACK_PATHS {
        let r = s
            .check(http("GET", path, &[("authorization", &token)], None))
            .await;
        assert_eq!(status(&r), 400, "{path}: {r:?}");
        assert_eq!(error(&r), "invalid_request", "{path}");
        assert!(reason(&r).contains(why), "{path}: {}", reason(&r));
    }
    s.stop().await.unwrap();
}

#[tokio::test]
async fn ordinary_paths_still_work_over_grpc() {
    let s = sidecar("").await;
    for (path, token, want) in [
        ("/public/index.html", None, 200),
        ("/public/a%20b", None, 200),
        ("/public/dir/", None, 200),
        ("/public/x?next=/a/../b//c", None, 200),
        ("/public/%61bout", None, 200),
        ("/api/agents", Some(bob()), 200),
        ("/api/agents/", Some(bob()), 200),
        ("/admin/users", Some(bob()), 403),
        ("/admin/users", Some(alice()), 200),
        ("/%61dmin/users", Some(bob()), 403),
        ("/admin/users", None, 401),
    ] {
        let headers: Vec<(&str, &str)> = token
            .as_deref()
            .map(|t| vec![("authorization", t)])
            .unwrap_or_default();
        let r = s.check(http("GET", path, &headers, None)).await;
        assert_eq!(status(&r), want, "{path}: {r:?}");
    }
    s.stop().await.unwrap();
}

#[tokio::test]
async fn hosts_are_read_in_their_canonical_form_over_grpc() {
    let s = sidecar("").await;
    // The admin host's rule holds for every spelling of the admin host.
    for host in [
        "admin.example.com",
        "admin.example.com.",
        "ADMIN.Example.com",
        "admin.example.com:443",
        "admin.example.com.:8443",
    ] {
        let r = s.check(Req::get("/public/x").host(host)).await;
        assert_eq!(status(&r), 401, "{host}: {r:?}");
    }
    let r = s
        .check(Req::get("/public/x").host("app.example.com:8080"))
        .await;
    assert_eq!(status(&r), 200);
    // Hosts without one canonical form are refused, not matched against nothing.
    for (host, why) in [
        ("x@admin.example.com", "userinfo"),
        ("admin.example.com:abc", "malformed port"),
        ("admin.example.com:", "malformed port"),
        ("admin.example.com:99999", "malformed port"),
        ("admin.example.com:80:80", "more than one :"),
        ("admin.example.com..", "empty label"),
        ("admin.example.com/x", "character outside"),
    ] {
        let r = s.check(Req::get("/public/x").host(host)).await;
        assert_eq!(status(&r), 400, "{host}: {r:?}");
        assert_eq!(error(&r), "invalid_request", "{host}");
        assert!(reason(&r).contains(why), "{host}: {}", reason(&r));
    }
    // A `host` header naming another host than :authority: the app may read either.
    let r = s
        .check(
            Req::get("/public/x")
                .header("host", "admin.example.com")
                .host("app.example.com"),
        )
        .await;
    assert_eq!(status(&r), 400, "{r:?}");
    assert!(
        reason(&r).contains("name different hosts"),
        "{}",
        reason(&r)
    );
    s.stop().await.unwrap();
}

#[tokio::test]
async fn opaque_encoded_slashes_keeps_them_as_data_and_refuses_the_rest() {
    let s = sidecar("request: { path_policy: opaque_encoded_slashes }\n").await;
    let r = s.check(Req::get("/public/a%2Fb")).await;
    assert_eq!(status(&r), 200, "{r:?}");
    // `a%2Fb` is one segment under /public; `/admin%2Fx` is not /admin/x to such an app.
    let r = s
        .check(http(
            "GET",
            "/admin%2fx",
            &[("authorization", &bob())],
            None,
        ))
        .await;
    assert_eq!(status(&r), 200, "{r:?}");
    for (path, why) in [
        ("/public/..%2fadmin/x", "dot segment"),
        ("/public/..%5Cadmin/x", "dot segment"),
        ("/public/%2e%2e;/admin/x", "; path parameter"),
        ("/admin/../public/x", "dot segment"),
        ("/public/a%252Fb", "double percent-encoding"),
    ] {
        let r = s.check(Req::get(path)).await;
        assert_eq!(status(&r), 400, "{path}: {r:?}");
        assert!(reason(&r).contains(why), "{path}: {}", reason(&r));
    }
    s.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Through a real Envoy.
// ---------------------------------------------------------------------------------------------

/// What happens to a request through one Envoy.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// The sidecar refuses: 400 `invalid_request`, the reason containing this.
    Refused(&'static str),
    /// Envoy refuses it (400) before asking the sidecar.
    EnvoyRefuses,
    /// Envoy rewrote it into a canonical path; the sidecar decided on exactly that path:
    /// this status, and on 200 the app received this path.
    Decided(u16, &'static str),
}

struct Through {
    name: &'static str,
    envoy: Envoy,
}

/// What one request through Envoy came to.
#[derive(Debug, PartialEq)]
enum Got {
    Refused(String),
    EnvoyRefused(u16),
    Decided(u16, String),
}

impl Got {
    fn matches(&self, want: Want) -> bool {
        match (self, want) {
            (Got::Refused(reason), Want::Refused(why)) => reason.contains(why),
            (Got::EnvoyRefused(400), Want::EnvoyRefuses) => true,
            (Got::Decided(200, got), Want::Decided(200, path)) => got == path,
            (Got::Decided(got, _), Want::Decided(status, _)) => *got == status && status != 200,
            _ => false,
        }
    }
}

/// Sends every case through each Envoy and checks the outcome, that a refused request never
/// reached the app, and that whatever reached it is a path the sidecar decides on as is.
/// Every mismatch is listed before the test fails.
async fn expect(
    upstream: &EchoUpstream,
    envoys: &[Through],
    host: &str,
    headers: &[(&str, &str)],
    cases: &[(&str, [Want; 2])],
) {
    let mut wrong = Vec::new();
    for (target, wants) in cases {
        for (through, want) in envoys.iter().zip(wants) {
            let hits = upstream.hits();
            let r = raw_http::request(through.envoy.addr(), "GET", target, host, headers).await;
            let what = format!("{target:?} (Host {host}) through {}", through.name);
            let v = r.json();
            let got = match (r.status, v["error"].as_str(), v["path"].as_str()) {
                (400, Some("invalid_request"), _) => {
                    Got::Refused(v["reason"].as_str().unwrap_or_default().to_string())
                }
                (200, _, Some(path)) => Got::Decided(200, path.to_string()),
                (400, None, _) => Got::EnvoyRefused(400),
                (status, _, _) => Got::Decided(status, String::new()),
            };
            if !got.matches(*want) {
                wrong.push(format!("{what}: want {want:?}, got {got:?}"));
            }
            match &got {
                Got::Decided(200, received) if !canonical(received) => {
                    wrong.push(format!("{what}: the app received {received:?}"))
                }
                Got::Decided(200, _) => {}
                _ if upstream.hits() != hits => {
                    wrong.push(format!("{what}: refused, yet it reached the app"))
                }
                _ => {}
            }
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

/// A path without anything an app could read in two ways (a test-side restatement of the
/// sidecar's rule, so these tests also run against an older sidecar).
fn canonical(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    path.starts_with('/')
        && !path[1..].split('/').rev().skip(1).any(str::is_empty)
        && !lower
            .split('/')
            .any(|s| matches!(s, "." | ".." | "%2e" | "%2e%2e" | ".%2e" | "%2e."))
        && !["%2f", "%5c", "\\", ";", "%3b", "%25", "%00", "#", "%3f"]
            .iter()
            .any(|bad| lower.contains(bad))
}

#[tokio::test]
async fn findings_through_real_envoy_deploy_settings_and_defaults() {
    use Want::*;
    let s = sidecar("").await;
    let (up_addr, upstream) = EchoUpstream::start().await;
    let plain = EnvoyOptions::envoy_defaults();
    let (deploy, defaults) = tokio::join!(
        Envoy::start(s.grpc_addr, up_addr),
        Envoy::start_with(s.grpc_addr, up_addr, &plain),
    );
    let envoys = [
        Through {
            name: "deploy/envoy settings",
            envoy: deploy,
        },
        Through {
            name: "Envoy defaults",
            envoy: defaults,
        },
    ];
    let bob = bob();
    let as_bob: &[(&str, &str)] = &[("authorization", &bob)];

    // Finding 2: paths. [deploy settings, Envoy defaults]
    expect(
        &upstream,
        &envoys,
        "app.example.com",
        as_bob,
        &[
            // normalize_path turns %2e%2e into .. but leaves `..;` alone: a servlet
            // container routes it to /admin/x.
            (
                "/public/%2e%2e;/admin/x",
                [Refused("; path parameter"), Refused("; path parameter")],
            ),
            (
                "/admin;x/y",
                [Refused("; path parameter"), Refused("; path parameter")],
            ),
            // Escaped slashes: rejected by the deploy config, refused by the sidecar otherwise.
            (
                "/public/..%2fadmin/x",
                [EnvoyRefuses, Refused("encoded slash")],
            ),
            (
                "/public/..%5Cadmin/x",
                [EnvoyRefuses, Refused("encoded backslash")],
            ),
            // Dot segments: resolved by normalize_path (and the app then receives the
            // resolved path), refused by the sidecar when nothing resolved them.
            (
                "/admin/../public/x",
                [Decided(200, "/public/x"), Refused("dot segment")],
            ),
            (
                "/public/../admin/x",
                [Decided(403, ""), Refused("dot segment")],
            ),
            (
                "/public/%2E%2E/admin/x",
                [Decided(403, ""), Refused("dot segment")],
            ),
            ("/admin/x/%2e", [Decided(403, ""), Refused("dot segment")]),
            (
                "/public/..\\admin/x",
                [Decided(403, ""), Refused("backslash")],
            ),
            ("/public/x#/../../admin/x", [EnvoyRefuses, EnvoyRefuses]),
            // RFC 3986 resolves this to /admin/public/x (the old normaliser said /public/x).
            (
                "/admin//../public/x",
                [Decided(403, ""), Refused("empty segment")],
            ),
            ("//admin/x", [Decided(403, ""), Refused("empty segment")]),
            (
                "/%c0%ae%c0%ae/admin/x",
                [Refused("not UTF-8"), Refused("not UTF-8")],
            ),
            (
                "/public/%252e%252e/admin/x",
                [
                    Refused("double percent-encoding"),
                    Refused("double percent-encoding"),
                ],
            ),
            (
                "/admin%3Fx/y",
                [Refused("encoded ? or #"), Refused("encoded ? or #")],
            ),
            // normalize_path refuses an encoded NUL itself.
            ("/public/x%00y", [EnvoyRefuses, Refused("control")]),
            // Ordinary paths pass through both, exactly as sent.
            (
                "/public/index.html",
                [Decided(200, "/public/index.html"); 2],
            ),
            ("/public/a%20b", [Decided(200, "/public/a%20b"); 2]),
            ("/public/dir/", [Decided(200, "/public/dir/"); 2]),
            ("/public/x?next=/a/../b", [Decided(200, "/public/x"); 2]),
            ("/api/agents", [Decided(200, "/api/agents"); 2]),
            ("/admin/users", [Decided(403, ""); 2]),
        ],
    )
    .await;

    // Finding 3: hosts. A public path on the admin host needs the admin role, however the
    // host is spelled.
    for (host, wants) in [
        ("admin.example.com", [Decided(401, ""); 2]),
        ("admin.example.com.", [Decided(401, ""); 2]),
        ("ADMIN.EXAMPLE.COM:8080", [Decided(401, ""); 2]),
        ("x@admin.example.com", [Refused("userinfo"); 2]),
        ("admin.example.com:abc", [Refused("malformed port"); 2]),
        ("admin.example.com:99999", [Refused("malformed port"); 2]),
        ("app.example.com", [Decided(200, "/public/x"); 2]),
    ] {
        expect(&upstream, &envoys, host, &[], &[("/public/x", wants)]).await;
    }
    // Absolute-form: Envoy takes the host from the URL, and so does the sidecar.
    expect(
        &upstream,
        &envoys,
        "app.example.com",
        &[],
        &[("http://admin.example.com/public/x", [Decided(401, ""); 2])],
    )
    .await;

    drop(envoys);
    s.stop().await.unwrap();
}
