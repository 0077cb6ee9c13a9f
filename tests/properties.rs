//! Property-based tests of "two parsers, one decision" (SECURITY.md): arbitrary paths, hosts
//! and bodies sent straight over gRPC to the sidecar, each allow checked against every way an
//! app behind Envoy could read the same request.
//!
//! The property: **an allow is never wider than what any reading grants.** For each request the
//! sidecar allows, every reading model below (a servlet container, a decode-everything router, a
//! raw prefix router, a case-insensitive router; hosts read with or without port, trailing dot
//! and userinfo; bodies read by first-wins or last-wins JSON parsers, batches element by element)
//! must land on a route that the credential sent is allowed on. A refusal (400), 401 or 403 always
//! satisfies it.
//!
//! The routes are those of `deploy/local/sidecar.yaml` plus an admin-only host and an admin-only
//! MCP `tools/call`, so no OpenFGA is needed. Cases: `PROPTEST_CASES` (CI runs the default, a few
//! seconds); SECURITY.md records a long run.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use authz_sidecar::proto::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, attribute_context,
};
use common::sidecar::*;
use proptest::prelude::*;

// === The sidecar under test ===

const RULES: &str = r#"
routes:
  unmatched: deny
  rules:
    - { name: admin-host, hosts: [admin.example.com], path: "/**", roles: [admin] }
    - { name: mcp-tools, path: "/message", methods: [POST], when: ["body:/method == tools/call"], roles: [admin] }
    - { name: mcp, path: "/message", methods: [POST] }
    - { name: public, path: "/public/**", public: true }
    - { name: health, path: "/health/**", methods: [GET], public: true }
    - { name: admin, path: "/admin/**", roles: [admin] }
    - { name: api, path: "/api/**" }
"#;

struct Harness {
    rt: tokio::runtime::Runtime,
    sidecar: Sidecar,
    user_token: String,
    admin_token: String,
}

/// One sidecar for every case of every property (started once, on its own runtime).
fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let local = std::fs::read_to_string(local_dir().join("sidecar.yaml")).unwrap();
        let base = local
            .split("\nroutes:")
            .next()
            .expect("sidecar.yaml has a routes section");
        let yaml = format!("{base}{RULES}");
        let sidecar = rt.block_on(async {
            let s = Sidecar::start(&yaml, &local_dir(), &[("LOG_LEVEL", "error")]).await;
            s.wait_ready(Duration::from_secs(10)).await;
            s
        });
        Harness {
            rt,
            sidecar,
            user_token: mint(local_claims("carol", &["user"])),
            admin_token: mint(local_claims("root", &["user", "admin"])),
        }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cred {
    None,
    User,
    Admin,
}

/// What a route demands, as `deploy/local/sidecar.yaml` and [`RULES`] say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    /// No route of any app: the path names nothing an app could serve (a 404 there).
    Unrouted,
    Public,
    Authenticated,
    Admin,
    Nobody,
}

impl Cred {
    fn satisfies(self, level: Level) -> bool {
        match self {
            Cred::None => level <= Level::Public,
            Cred::User => level <= Level::Authenticated,
            Cred::Admin => level <= Level::Admin,
        }
    }
}

struct Sent<'a> {
    method: &'a str,
    path: &'a str,
    host: &'a str,
    body: Option<&'a [u8]>,
    cred: Cred,
}

/// Sends one request over gRPC; true when the sidecar allows it.
fn allowed(s: &Sent<'_>) -> bool {
    let h = harness();
    let mut headers = std::collections::HashMap::new();
    match s.cred {
        Cred::None => {}
        Cred::User => {
            headers.insert("authorization".into(), format!("Bearer {}", h.user_token));
        }
        Cred::Admin => {
            headers.insert("authorization".into(), format!("Bearer {}", h.admin_token));
        }
    }
    if s.body.is_some() {
        headers.insert("content-type".into(), "application/json".into());
    }
    let req = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    id: "prop".into(),
                    method: s.method.into(),
                    path: s.path.into(),
                    host: s.host.into(),
                    scheme: "http".into(),
                    headers,
                    raw_body: s.body.map(<[u8]>::to_vec).unwrap_or_default(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    status(&h.rt.block_on(h.sidecar.check(req))) == 200
}

// === Reading models: how an app behind Envoy may read a path ===

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// RFC 3986 dot-segment removal over segments, merging empty ones as most routers do.
fn resolve(segments: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in segments {
        match s.as_str() {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            _ => out.push(s),
        }
    }
    out
}

fn path_only(raw: &str) -> &str {
    let raw = raw.split('#').next().unwrap_or_default();
    raw.split('?').next().unwrap_or_default()
}

/// The segments each model routes on; `None` where that app refuses the path itself.
fn readings(raw: &str) -> Vec<(&'static str, Vec<String>)> {
    let p = path_only(raw);
    let mut out = Vec::new();
    // A servlet container: `;params` cut per segment, then decoded, then dots resolved.
    let servlet = p.split('/').map(|seg| {
        let seg = seg.split(';').next().unwrap_or_default();
        percent_decode(seg)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|| seg.to_string())
    });
    out.push(("servlet", resolve(servlet)));
    // A router that decodes everything (encoded slashes and backslashes become separators).
    if let Some(b) = percent_decode(p) {
        let d = String::from_utf8_lossy(&b).replace('\\', "/");
        out.push(("decode-all", resolve(d.split('/').map(String::from))));
        // Decoded twice (a proxy and an app both decoding).
        if let Some(b2) = percent_decode(&d) {
            let d2 = String::from_utf8_lossy(&b2).replace('\\', "/");
            out.push(("decode-twice", resolve(d2.split('/').map(String::from))));
        }
        out.push((
            "decode-case-insensitive",
            resolve(d.to_lowercase().split('/').map(String::from)),
        ));
    }
    // A raw prefix router: no decoding, no dot resolution, empty segments kept.
    out.push((
        "raw-prefix",
        p.split('/').skip(1).map(String::from).collect(),
    ));
    out
}

/// The route a path lands on, by its segments.
fn path_level(method: &str, segs: &[String]) -> Level {
    match segs.first().map(String::as_str) {
        Some("public") => Level::Public,
        Some("health") if method == "GET" => Level::Public,
        Some("admin") => Level::Admin,
        Some("api") => Level::Authenticated,
        Some("message") if segs.len() == 1 && method == "POST" => Level::Authenticated,
        // An app's own routes are plain words: one the sidecar does not list is denied to all.
        Some(s)
            if !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            Level::Nobody
        }
        _ => Level::Unrouted,
    }
}

// === Reading models: hosts ===

/// Every host an app (or a virtual-host router) might take from the Host header.
fn host_readings(raw: &str) -> Vec<String> {
    let lower = raw.to_ascii_lowercase();
    let mut out = vec![lower.clone()];
    for candidate in [
        lower.rsplit('@').next().unwrap_or_default().to_string(),
        lower.split('@').next().unwrap_or_default().to_string(),
    ] {
        let no_port = match candidate.rsplit_once(':') {
            Some((h, _)) if !h.ends_with(']') || h.starts_with('[') => h.to_string(),
            _ => candidate.clone(),
        };
        for h in [candidate.clone(), no_port] {
            out.push(h.trim_end_matches('.').to_string());
            out.push(h.strip_suffix('.').unwrap_or(&h).to_string());
            out.push(h);
        }
    }
    out
}

fn host_level(raw_host: &str) -> Option<Level> {
    host_readings(raw_host)
        .iter()
        .any(|h| h == "admin.example.com")
        .then_some(Level::Admin)
}

// === Generators ===

fn segment() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "public",
        "admin",
        "api",
        "health",
        "message",
        "x",
        "..",
        ".",
        "",
        "%2e%2e",
        "%2E%2e",
        ".%2e",
        "%2e",
        "..;",
        "..;x",
        "%2e%2e;",
        ";",
        "admin;x",
        "public;a=b",
        "%2f",
        "..%2f",
        "..%2F",
        "..%5c",
        "%5c",
        "\\",
        "..\\",
        "%00",
        "%0d%0a",
        "%61dmin",
        "ADMIN",
        "Admin",
        "%252e%252e",
        "%c0%ae%c0%ae",
        "a%2fb",
        "?x=/admin",
        "#/admin",
        "%3f",
        "%23",
        "%20",
        "..%00",
        "%2e%2e%2f",
        "public%2f..%2fadmin",
    ])
}

fn path() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["/", "", "//", "http://app.local/", "*"]),
        prop::collection::vec(segment(), 0..7),
        any::<bool>(),
    )
        .prop_map(|(start, segs, trailing)| {
            let mut p = format!("{start}{}", segs.join("/"));
            if trailing {
                p.push('/');
            }
            p
        })
}

fn host() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["", "x@", "user:pw@", "admin.example.com@", "a@b@"]),
        prop::sample::select(vec![
            "admin.example.com",
            "ADMIN.example.com",
            "Admin.Example.Com",
            "app.local",
            "example.com",
            "admin-example.com",
            "xadmin.example.com",
            "[::1]",
        ]),
        prop::sample::select(vec!["", ".", "..", ". ", "%2e"]),
        prop::sample::select(vec![
            "", ":443", ":8080", ":", ":x", ":99999", ":443:443", " ",
        ]),
    )
        .prop_map(|(user, name, dot, port)| format!("{user}{name}{dot}{port}"))
}

/// One JSON-RPC element: its `method` key(s) as a first-wins and a last-wins parser see them.
#[derive(Debug, Clone)]
struct Element {
    methods: Vec<&'static str>,
    side: &'static str,
    nest: usize,
}

impl Element {
    fn render(&self) -> String {
        let mut fields: Vec<String> = vec!["\"jsonrpc\":\"2.0\"".into(), "\"id\":1".into()];
        for m in &self.methods {
            fields.push(format!("\"method\":\"{m}\""));
        }
        fields.push("\"params\":{\"name\":\"agent_chat\"}".into());
        if !self.side.is_empty() {
            fields.push(format!("\"x\":{}", self.side));
        }
        if self.nest > 0 {
            fields.push(format!(
                "\"deep\":{}{}",
                "[".repeat(self.nest),
                "]".repeat(self.nest)
            ));
        }
        format!("{{{}}}", fields.join(","))
    }

    /// Whether any JSON parser could read this element as a tool call.
    fn may_call_tool(&self) -> bool {
        self.methods.first() == Some(&"tools/call") || self.methods.last() == Some(&"tools/call")
    }
}

fn element() -> impl Strategy<Value = Element> {
    (
        prop::collection::vec(
            prop::sample::select(vec!["tools/call", "tools/list", "ping"]),
            1..3,
        ),
        prop::sample::select(vec![
            "",
            "1",
            "NaN",
            "Infinity",
            "1e400",
            "-0",
            "\"\\ud800\"",
        ]),
        prop::sample::select(vec![0usize, 0, 3, 200]),
    )
        .prop_map(|(methods, side, nest)| Element {
            methods,
            side,
            nest,
        })
}

#[derive(Debug, Clone)]
struct Body {
    bom: bool,
    batch: bool,
    elements: Vec<Element>,
    trailer: &'static str,
}

impl Body {
    fn render(&self) -> Vec<u8> {
        let inner: Vec<String> = self.elements.iter().map(Element::render).collect();
        let json = if self.batch {
            format!("[{}]", inner.join(","))
        } else {
            inner.first().cloned().unwrap_or_default()
        };
        let mut out = Vec::new();
        if self.bom {
            out.extend_from_slice("\u{feff}".as_bytes());
        }
        out.extend_from_slice(json.as_bytes());
        out.extend_from_slice(self.trailer.as_bytes());
        out
    }

    fn may_call_tool(&self) -> bool {
        let n = if self.batch { self.elements.len() } else { 1 };
        self.elements.iter().take(n).any(Element::may_call_tool)
    }
}

fn body() -> impl Strategy<Value = Body> {
    (
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(element(), 1..4),
        prop::sample::select(vec!["", "", " ", "\n", " {}", "x"]),
    )
        .prop_map(|(bom, batch, elements, trailer)| Body {
            bom,
            batch,
            elements,
            trailer,
        })
}

fn cred() -> impl Strategy<Value = Cred> {
    prop::sample::select(vec![Cred::None, Cred::User, Cred::Admin])
}

fn method() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["GET", "POST", "DELETE"])
}

// === Properties ===

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// No path is allowed that some app reads as a route the credential may not use.
    #[test]
    fn a_path_is_allowed_only_if_every_reading_allows_it(p in path(), m in method(), c in cred()) {
        if allowed(&Sent { method: m, path: &p, host: "app.local", body: None, cred: c }) {
            for (model, segs) in readings(&p) {
                let level = path_level(m, &segs);
                prop_assert!(
                    c.satisfies(level),
                    "{m} {p:?} allowed for {c:?}, but a {model} app routes it to /{} ({level:?})",
                    segs.join("/")
                );
            }
        }
    }

    /// No Host is allowed on a public route that some app reads as the admin-only host.
    #[test]
    fn a_host_is_allowed_only_if_every_reading_allows_it(h in host(), c in cred()) {
        if allowed(&Sent { method: "GET", path: "/public/x", host: &h, body: None, cred: c }) {
            if let Some(level) = host_level(&h) {
                prop_assert!(c.satisfies(level), "host {h:?} allowed for {c:?} but reads as admin.example.com");
            }
        }
    }

    /// No body is allowed for a non-admin that some JSON parser reads as a tool call.
    #[test]
    fn a_body_is_allowed_only_if_every_element_is(b in body(), present in prop::bool::weighted(0.9), c in cred()) {
        let bytes = b.render();
        let sent = Sent {
            method: "POST",
            path: "/message",
            host: "app.local",
            body: present.then_some(bytes.as_slice()),
            cred: c,
        };
        if allowed(&sent) {
            prop_assert!(c != Cred::None, "anonymous body allowed: {}", String::from_utf8_lossy(&bytes));
            prop_assert!(present, "a missing body was allowed on a body rule's route");
            if b.may_call_tool() {
                prop_assert!(
                    c.satisfies(Level::Admin),
                    "{c:?} allowed a body some parser reads as tools/call: {}",
                    String::from_utf8_lossy(&bytes)
                );
            }
        }
    }
}

// === The request edge ===

fn raw_path() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec![
            "/", "/", "a", "admin", ".", "..", "%", "%2", "%2e", "%2E", "%2f", "%5c", "%25", "%3b",
            "%3f", "%00", "%0a", "%c0", "%ae", "%41", "\\", ";", "?", "#", " ", "\t", "é",
            "%c3%a9",
        ]),
        0..10,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// The rules see exactly the received path, segment for segment (each percent-decoded), or
    /// nothing at all: no segment is created, removed or resolved on the way in.
    #[test]
    fn the_rules_see_the_received_path_or_a_refusal(raw in raw_path()) {
        use authz_sidecar::request::{PathPolicy, read_path};
        if let Ok(seen) = read_path(&raw, PathPolicy::Strict) {
            let received: Vec<&str> = raw.split('/').collect();
            let decided: Vec<&str> = seen.split('/').collect();
            prop_assert_eq!(received.len(), decided.len(), "{:?} read as {:?}", raw, seen);
            for (r, d) in received.iter().zip(&decided) {
                let decoded = percent_decode(r).map(|b| String::from_utf8_lossy(&b).into_owned());
                prop_assert_eq!(decoded.as_deref(), Some(*d), "{:?} read as {:?}", raw, seen);
                prop_assert!(*d != "." && *d != "..", "{:?} kept a dot segment", raw);
            }
        }
    }
}

// === The oracle itself ===

#[test]
fn the_reading_models_disagree_where_the_findings_say() {
    let routes = |p: &str| -> Vec<Level> {
        readings(p)
            .iter()
            .map(|(_, s)| path_level("GET", s))
            .collect()
    };
    assert!(routes("/public/%2e%2e;/admin/x").contains(&Level::Admin));
    assert!(routes("/public/..%2fadmin/x").contains(&Level::Admin));
    assert!(routes("/admin/../public/x").contains(&Level::Admin));
    assert!(routes("/admin/../public/x").contains(&Level::Public));
    assert_eq!(routes("/public/x"), vec![Level::Public; 5]);
    assert_eq!(host_level("x@admin.example.com"), Some(Level::Admin));
    assert_eq!(host_level("ADMIN.example.com.:443"), Some(Level::Admin));
    assert_eq!(host_level("app.local"), None);
    let batch = Body {
        bom: false,
        batch: true,
        elements: vec![
            Element {
                methods: vec!["ping"],
                side: "",
                nest: 0,
            },
            Element {
                methods: vec!["ping", "tools/call"],
                side: "",
                nest: 0,
            },
        ],
        trailer: "",
    };
    assert!(batch.may_call_tool());
}
