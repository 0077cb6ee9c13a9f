//! API keys from the app's key service (`api_keys.exchange_url`), against a small key service
//! in this file that implements the app's contract: `POST /api/v1/api-keys/validate` with
//! `X-API-Key` answers `{access_token, expires_in, user_id, username}`, 400 without a key,
//! 401 for a key it does not accept. It mints tokens with the dev key, counts calls and can
//! be switched to refuse, fail, hang or stop.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::envoy::Envoy;
use common::sidecar::*;
use common::upstream::EchoUpstream;
use serde_json::{Value, json};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Tokens for the keys it knows, 401 for the others.
    Serve,
    Refuse,
    /// 400, as when no key reached it.
    LoseKey,
    Fail,
    Hang,
}

#[derive(Default)]
struct ServiceState {
    mode: Mutex<Option<Mode>>,
    /// key -> (user, token lifetime in seconds, issuer)
    keys: Mutex<HashMap<String, (String, u64, String)>>,
    calls: Mutex<Vec<Option<String>>>,
}

/// The key service. Stops when dropped (or [`KeyService::stop`]).
struct KeyService {
    addr: SocketAddr,
    state: Arc<ServiceState>,
    task: tokio::task::JoinHandle<()>,
}

async fn validate(State(s): State<Arc<ServiceState>>, headers: HeaderMap) -> Response {
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    s.calls.lock().unwrap().push(key.clone());
    let mode = s.mode.lock().unwrap().unwrap_or(Mode::Serve);
    match mode {
        Mode::Fail => return (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        Mode::Refuse | Mode::Serve | Mode::LoseKey => {}
    }
    let key = key.filter(|_| mode != Mode::LoseKey);
    let Some(key) = key else {
        return json_reply(
            StatusCode::BAD_REQUEST,
            json!({"detail": "API key required"}),
        );
    };
    let known = s.keys.lock().unwrap().get(&key).cloned();
    match (mode, known) {
        (Mode::Serve, Some((user, lifetime, iss))) => {
            let mut claims = local_claims(&user, &["user"]);
            claims["exp"] = json!(now() + lifetime);
            claims["iss"] = json!(iss);
            json_reply(
                StatusCode::OK,
                json!({
                    "access_token": mint(claims),
                    "expires_in": 900,
                    "user_id": format!("id-{user}"),
                    "username": user,
                }),
            )
        }
        _ => json_reply(
            StatusCode::UNAUTHORIZED,
            json!({"detail": "Invalid or expired API key"}),
        ),
    }
}

fn json_reply(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

impl KeyService {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ServiceState::default());
        let app = Router::new()
            .route("/api/v1/api-keys/validate", post(validate))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state, task }
    }

    fn url(&self) -> String {
        format!("http://{}/api/v1/api-keys/validate", self.addr)
    }

    /// `key` is exchanged for a token of `user` living `lifetime` seconds.
    fn issue(&self, key: &str, user: &str, lifetime: u64) {
        self.issue_from(key, user, lifetime, "authz-sidecar-local");
    }

    fn issue_from(&self, key: &str, user: &str, lifetime: u64, iss: &str) {
        self.state
            .keys
            .lock()
            .unwrap()
            .insert(key.into(), (user.into(), lifetime, iss.into()));
    }

    fn set(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = Some(mode);
    }

    fn calls(&self) -> usize {
        self.state.calls.lock().unwrap().len()
    }

    fn keys_received(&self) -> Vec<Option<String>> {
        self.state.calls.lock().unwrap().clone()
    }

    fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for KeyService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Everything this test binary logs (the sidecars run in-process), to prove keys never reach
/// the log. Installed before any sidecar, so the sidecar's own subscriber does not apply.
fn captured_log() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_ansi(false)
            .with_writer(move || Tee(writer.clone()))
            .init();
        buf
    })
}

struct Tee(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Tee {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&captured_log().lock().unwrap()).into_owned()
}

/// The local dev config, with the key service as second API-key source.
async fn sidecar(service: &KeyService, extra: &str) -> Sidecar {
    captured_log();
    let yaml = format!(
        r#"
log: {{ level: debug }}
jwt: {{ jwks_file: dev-jwks.json, issuer: authz-sidecar-local, audience: mcp-server, algorithms: [RS256] }}
api_keys:
  file: api-keys.yaml
  exchange_url: {url}
  exchange_timeout: 500ms
{extra}
routes:
  unmatched: deny
  rules:
    - {{ name: api, path: "/api/**" }}
"#,
        url = service.url()
    );
    let s = Sidecar::start(&yaml, &local_dir(), &[]).await;
    s.wait_ready(Duration::from_secs(5)).await;
    s
}

/// The counter `authz_sidecar_<name>_total`, read from `/metrics` now (scrape time).
async fn metric(s: &Sidecar, name: &str) -> u64 {
    s.scrape()
        .await
        .get(&format!("authz_sidecar_{name}_total"), &[]) as u64
}

#[tokio::test]
async fn a_valid_key_is_exchanged_once_and_answers_as_the_tokens_principal() {
    let service = KeyService::start().await;
    let key = "mcpkey_live_exchange_valid_0001";
    service.issue(key, "carol", 600);
    let s = sidecar(&service, "").await;

    let r = s.check(Req::get("/api/agents").api_key(key)).await;
    assert_eq!(status(&r), 200, "{r:?}");
    assert_eq!(header(&r, "x-auth-subject").as_deref(), Some("user:carol"));
    assert_eq!(header(&r, "x-auth-method").as_deref(), Some("api_key"));
    assert!(removed(&r).contains(&"x-api-key".to_string()));
    assert_eq!(service.keys_received(), vec![Some(key.to_string())]);

    // From the cache: the service is not asked again.
    let r = s.check(Req::get("/api/agents").api_key(key)).await;
    assert_eq!(status(&r), 200);
    assert_eq!(service.calls(), 1);

    // A key the file holds never reaches the service.
    let r = s
        .check(Req::get("/api/agents").api_key("mcpkey_test_local_alice"))
        .await;
    assert_eq!(header(&r, "x-auth-subject").as_deref(), Some("user:alice"));
    assert_eq!(service.calls(), 1);

    assert_eq!(metric(&s, "api_key_exchange_requests").await, 1);
    assert_eq!(metric(&s, "api_key_exchange_cache_hits").await, 1);
    assert_eq!(metric(&s, "api_key_exchange_errors").await, 0);
    s.stop().await.unwrap();
    let log = log_text();
    assert!(log.contains("user:carol"), "the log was captured: {log}");
    assert!(!log.contains(key), "the key reached the log");
}

#[tokio::test]
async fn the_cache_lets_go_at_the_tokens_exp() {
    let service = KeyService::start().await;
    let key = "mcpkey_live_exchange_short_0002";
    service.issue(key, "erin", 2);
    let s = sidecar(&service, "").await;
    let started = Instant::now();
    assert_eq!(status(&s.check(Req::get("/api/x").api_key(key)).await), 200);
    assert_eq!(status(&s.check(Req::get("/api/x").api_key(key)).await), 200);
    assert_eq!(service.calls(), 1, "served from the cache before exp");
    // Past exp (2 s, whole seconds): the token is not reused, even though the verifier's
    // leeway would still accept it.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(started.elapsed())).await;
    assert_eq!(status(&s.check(Req::get("/api/x").api_key(key)).await), 200);
    assert_eq!(service.calls(), 2, "asked again after exp");
    s.stop().await.unwrap();
}

#[tokio::test]
async fn a_key_the_service_stops_accepting_stops_working_within_the_cache_ttl() {
    let service = KeyService::start().await;
    let key = "mcpkey_live_exchange_rotate_0003";
    service.issue(key, "frank", 600);
    let s = sidecar(&service, "  exchange_cache_ttl: 2s").await;
    let started = Instant::now();
    assert_eq!(status(&s.check(Req::get("/api/x").api_key(key)).await), 200);
    service.set(Mode::Refuse);
    // Within the bound, the cached token still answers ...
    assert_eq!(status(&s.check(Req::get("/api/x").api_key(key)).await), 200);
    // ... and after it, the refusal.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(started.elapsed())).await;
    let r = s.check(Req::get("/api/x").api_key(key)).await;
    assert_eq!(status(&r), 401);
    assert_eq!(reason(&r), "API key rejected by the key service");
    assert_eq!(service.calls(), 2);
    s.stop().await.unwrap();
}

#[tokio::test]
async fn refusals_are_401_and_outages_503_never_naming_the_service() {
    let service = KeyService::start().await;
    let s = sidecar(&service, "").await;
    let check = |key: &'static str| {
        let s = &s;
        async move { s.check(Req::get("/api/x").api_key(key)).await }
    };
    let internal = service.addr.to_string();
    let expect = |r: &authz_sidecar::proto::pb::envoy::service::auth::v3::CheckResponse,
                  code: u16,
                  why: &str| {
        assert_eq!((status(r), reason(r).as_str()), (code, why), "{r:?}");
        assert!(
            !format!("{r:?}").contains(&internal),
            "{r:?} names the service"
        );
    };

    // 401 from the service: 401, remembered for a while (no second call).
    let r = check("mcpkey_live_unknown_0004").await;
    expect(&r, 401, "API key rejected by the key service");
    check("mcpkey_live_unknown_0004").await;
    assert_eq!(service.calls(), 1);

    // A token that does not verify: 401 naming the check it failed.
    service.issue_from(
        "mcpkey_live_evil_0005",
        "mallory",
        600,
        "https://evil.example",
    );
    let r = check("mcpkey_live_evil_0005").await;
    expect(
        &r,
        401,
        "token from the key service does not verify: wrong issuer \"https://evil.example\"",
    );

    // 400 (the key did not reach the service): a 401 saying so; not remembered.
    service.set(Mode::LoseKey);
    let r = check("mcpkey_live_lost_0007").await;
    expect(&r, 401, "the key service received no API key (HTTP 400)");
    service.set(Mode::Serve);
    service.issue("mcpkey_live_lost_0007", "hal", 600);
    assert_eq!(status(&check("mcpkey_live_lost_0007").await), 200);

    // 500, a hang beyond the timeout, a stopped service: 503, so clients keep the key.
    service.issue("mcpkey_live_good_0006", "gina", 600);
    service.set(Mode::Fail);
    expect(
        &check("mcpkey_live_good_0006").await,
        503,
        "API key verification unavailable",
    );
    service.set(Mode::Hang);
    let started = Instant::now();
    expect(
        &check("mcpkey_live_good_0006").await,
        503,
        "API key verification unavailable",
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the timeout (500ms) applied"
    );
    service.stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    expect(
        &check("mcpkey_live_good_0006").await,
        503,
        "API key verification unavailable",
    );
    assert_eq!(metric(&s, "api_key_exchange_errors").await, 3);
    s.stop().await.unwrap();

    let log = log_text();
    assert!(
        log.contains("API key exchange failed"),
        "the log was captured"
    );
    assert!(
        log.contains(&internal),
        "the detail (with the address) is in the log"
    );
    for key in [
        "mcpkey_live_unknown_0004",
        "mcpkey_live_evil_0005",
        "mcpkey_live_good_0006",
        "mcpkey_live_lost_0007",
    ] {
        assert!(!log.contains(key), "{key} reached the log");
    }
}

#[tokio::test]
async fn through_real_envoy_an_exchanged_key_is_allowed_and_never_reaches_the_app() {
    let service = KeyService::start().await;
    let key = "mcpkey_live_exchange_envoy_0008";
    service.issue(key, "dave", 600);
    let s = sidecar(&service, "").await;
    let (up_addr, upstream) = EchoUpstream::start().await;
    let envoy = Envoy::start(s.grpc_addr, up_addr).await;

    let resp = reqwest::Client::new()
        .get(format!("{}/api/agents", envoy.url()))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body = resp.text().await.unwrap();
    let echo: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["headers"]["x-auth-subject"], "user:dave", "{echo}");
    assert_eq!(echo["headers"]["x-auth-method"], "api_key");
    assert!(echo["headers"].get("x-api-key").is_none(), "{echo}");
    assert!(!body.contains(key), "the key reached the app: {body}");
    assert_eq!(upstream.hits(), 1);
    assert_eq!(service.calls(), 1);
    drop(envoy);
    s.stop().await.unwrap();
}
