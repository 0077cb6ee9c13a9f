//! The sidecar under test, in-process on `127.0.0.1:0`, plus builders for Envoy-shaped check
//! requests and readers for the answers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use authz_sidecar::proto::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use authz_sidecar::proto::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, attribute_context,
    authorization_client::AuthorizationClient, check_response::HttpResponse,
};
use authz_sidecar::{Config, Listeners};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn local_dir() -> PathBuf {
    repo().join("deploy/local")
}

pub struct Sidecar {
    pub grpc_addr: SocketAddr,
    pub ops_addr: SocketAddr,
    shutdown: CancellationToken,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// Set by [`Sidecar::start_file`]: what SIGHUP does in `serve`.
    reload: Option<authz_sidecar::reload::ReloadHandle>,
}

impl Sidecar {
    /// Starts the sidecar on a config given as YAML (relative paths resolve against
    /// `base_dir`), with `env` standing in for the process environment.
    pub async fn start(yaml: &str, base_dir: &Path, env: &[(&str, &str)]) -> Self {
        let env = test_env(env);
        let config = Config::from_yaml(yaml, base_dir, &env).expect("test config is valid");
        Self::start_config(config).await
    }

    /// Starts the sidecar on the config file at `path` as `serve --config` does: read through
    /// a `ConfigSource` (with `env` standing in for the process environment), watched every
    /// `server.reload_interval`, and reloaded by [`Sidecar::reload`] as by SIGHUP.
    pub async fn start_file(path: &Path, env: &[(&str, &str)]) -> Self {
        use authz_sidecar::reload::{ConfigSource, channel};
        let source = ConfigSource::new(path).with_env(test_env(env));
        let (hash, config) = source.load();
        let config = config.expect("test config is valid");
        let (handle, requests) = channel();
        let reload = authz_sidecar::server::Reload {
            source,
            hash,
            requests,
        };
        let mut s = Self::start_inner(config, Some(reload)).await;
        s.reload = Some(handle);
        s
    }

    /// Reloads the config file now (what SIGHUP does) and returns what happened.
    pub async fn reload(&self) -> authz_sidecar::reload::Outcome {
        self.reload
            .as_ref()
            .expect("started with Sidecar::start_file")
            .reload(authz_sidecar::reload::Cause::Request)
            .await
            .expect("the sidecar is running")
    }

    /// The embedded default config from deploy/local.
    pub async fn local() -> Self {
        let yaml = std::fs::read_to_string(local_dir().join("sidecar.yaml")).unwrap();
        Self::start(&yaml, &local_dir(), &[]).await
    }

    pub async fn start_config(config: Config) -> Self {
        Self::start_inner(config, None).await
    }

    async fn start_inner(config: Config, reload: Option<authz_sidecar::server::Reload>) -> Self {
        // Captured per test (shown for failing tests only).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(&config.log.filter))
            .with_test_writer()
            .try_init();
        let listeners = Listeners::bind(&config).await.expect("bind");
        let grpc_addr = match &listeners.grpc {
            authz_sidecar::server::GrpcListener::Tcp(l) => l.local_addr().unwrap(),
            _ => panic!("tests use TCP"),
        };
        let ops_addr = listeners.ops.as_ref().unwrap().local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(authz_sidecar::server::run_with(
            config,
            reload,
            listeners,
            shutdown.clone(),
        ));
        Self {
            grpc_addr,
            ops_addr,
            shutdown,
            handle: Some(handle),
            reload: None,
        }
    }

    pub async fn client(&self) -> AuthorizationClient<Channel> {
        let url = format!("http://{}", self.grpc_addr);
        for _ in 0..50 {
            if let Ok(c) = AuthorizationClient::connect(url.clone()).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("sidecar at {url} did not accept connections");
    }

    pub async fn check(&self, req: impl Into<CheckRequest>) -> CheckResponse {
        self.client()
            .await
            .check(req.into())
            .await
            .expect("Check RPC")
            .into_inner()
    }

    pub async fn ops_get(&self, path: &str) -> (u16, String) {
        let r = reqwest::get(format!("http://{}{path}", self.ops_addr))
            .await
            .expect("ops GET");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    /// `/metrics` as a scraper without an `Accept` header reads it (Prometheus text 0.0.4).
    pub async fn scrape(&self) -> super::metrics::Scrape {
        let (status, text) = self.ops_get("/metrics").await;
        assert_eq!(status, 200, "/metrics: {text}");
        super::metrics::Scrape(text)
    }

    /// Waits until `/readyz` says ready.
    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (status, body) = self.ops_get("/readyz").await;
            if status == 200 {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("sidecar not ready after {timeout:?}: {body}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What SIGTERM does, without waiting: the shutdown delay and the drain run on.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Stops and returns what `run` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.handle.take().unwrap().await.expect("server task")
    }

    /// Waits for `run` to return on its own (fatal errors).
    pub async fn join(mut self, timeout: Duration) -> anyhow::Result<()> {
        tokio::time::timeout(timeout, self.handle.take().unwrap())
            .await
            .expect("server did not stop")
            .expect("server task")
    }
}

/// `env` as the tests' process environment: loopback listeners on free ports and no shutdown
/// delay unless the test sets one.
fn test_env(env: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.insert("AUTHZ_GRPC_ADDR".into(), "127.0.0.1:0".into());
    env.insert("AUTHZ_OPS_ADDR".into(), "127.0.0.1:0".into());
    // Tests stop sidecars all the time; the shutdown delay has its own test (tests/cli.rs).
    env.entry("AUTHZ_SHUTDOWN_DELAY".into())
        .or_insert_with(|| "0s".into());
    env
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An Envoy-shaped HTTP check request, built as the request reads:
/// `Req::post("/message").bearer(&t).json(&body)`. Headers go in `headers` (a repeated one joined
/// with `,`, as Envoy does) unless [`Req::raw_header`] asks for `header_map` (every occurrence,
/// raw bytes, as with `encode_raw_headers`).
#[derive(Debug, Clone)]
pub struct Req {
    http: attribute_context::HttpRequest,
    raw: Option<Vec<HeaderValue>>,
}

impl Req {
    pub fn new(method: &str, path: &str) -> Self {
        Self {
            http: attribute_context::HttpRequest {
                id: "test-req".into(),
                method: method.into(),
                path: path.into(),
                host: "app.local".into(),
                scheme: "http".into(),
                ..Default::default()
            },
            raw: None,
        }
    }

    pub fn get(path: &str) -> Self {
        Self::new("GET", path)
    }

    pub fn post(path: &str) -> Self {
        Self::new("POST", path)
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.http
            .headers
            .entry(name.to_ascii_lowercase())
            .and_modify(|e| {
                e.push(',');
                e.push_str(value)
            })
            .or_insert_with(|| value.to_string());
        self
    }

    pub fn headers(self, headers: &[(&str, &str)]) -> Self {
        headers.iter().fold(self, |r, (k, v)| r.header(k, v))
    }

    /// One occurrence in `header_map`, bytes as given.
    pub fn raw_header(mut self, name: &str, value: &[u8]) -> Self {
        self.raw.get_or_insert_with(Vec::new).push(HeaderValue {
            key: name.to_string(),
            raw_value: value.to_vec(),
            ..Default::default()
        });
        self
    }

    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    pub fn api_key(self, key: &str) -> Self {
        self.header("x-api-key", key)
    }

    pub fn host(mut self, host: &str) -> Self {
        self.http.host = host.into();
        self
    }

    pub fn id(mut self, id: &str) -> Self {
        self.http.id = id.into();
        self
    }

    /// The body as bytes (`raw_body`, as Envoy sends it with `pack_as_bytes: true`).
    pub fn body(mut self, body: &[u8]) -> Self {
        self.http.raw_body = body.to_vec();
        self
    }

    /// The body as text (`body`, as Envoy sends it with `pack_as_bytes: false`).
    pub fn text_body(mut self, body: &str) -> Self {
        self.http.body = body.into();
        self
    }

    /// A JSON body with its content type.
    pub fn json(self, body: &serde_json::Value) -> Self {
        self.header("content-type", "application/json")
            .body(body.to_string().as_bytes())
    }

    pub fn build(self) -> CheckRequest {
        let mut http = self.http;
        http.header_map = self.raw.map(|headers| HeaderMap { headers });
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request {
                    http: Some(http),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }
}

impl From<Req> for CheckRequest {
    fn from(r: Req) -> Self {
        r.build()
    }
}

/// `Req::new(method, path).headers(headers)` with an optional text body, built.
pub fn http(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> CheckRequest {
    Req::new(method, path)
        .headers(headers)
        .text_body(body.unwrap_or_default())
        .build()
}

/// A check request carrying headers as raw bytes in `header_map` (every occurrence kept).
pub fn http_raw(method: &str, path: &str, headers: &[(&str, &[u8])]) -> CheckRequest {
    headers
        .iter()
        .fold(Req::new(method, path), |r, (k, v)| r.raw_header(k, v))
        .build()
}

/// HTTP status of the answer: 200 for an allow.
pub fn status(r: &CheckResponse) -> u16 {
    match &r.http_response {
        Some(HttpResponse::DeniedResponse(d)) => d.status.as_ref().map_or(403, |s| s.code as u16),
        Some(HttpResponse::OkResponse(_)) | None => {
            assert_eq!(
                r.status.as_ref().map_or(0, |s| s.code),
                0,
                "OK answer with a non-OK status: {r:?}"
            );
            200
        }
        #[allow(unreachable_patterns)]
        _ => panic!("unexpected answer {r:?}"),
    }
}

/// The `reason` of a deny's JSON body.
pub fn reason(r: &CheckResponse) -> String {
    match &r.http_response {
        Some(HttpResponse::DeniedResponse(d)) => {
            let v: serde_json::Value = serde_json::from_str(&d.body).expect("deny body is JSON");
            v["reason"].as_str().unwrap_or_default().to_string()
        }
        _ => panic!("not a deny: {r:?}"),
    }
}

/// A header of the answer: set on the upstream request (allow) or on the reply (deny).
pub fn header(r: &CheckResponse, name: &str) -> Option<String> {
    let list = match &r.http_response {
        Some(HttpResponse::DeniedResponse(d)) => &d.headers,
        Some(HttpResponse::OkResponse(o)) => &o.headers,
        _ => return None,
    };
    list.iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key.eq_ignore_ascii_case(name))
        .map(|h| h.value.clone())
}

pub fn response_header(r: &CheckResponse, name: &str) -> Option<String> {
    match &r.http_response {
        Some(HttpResponse::OkResponse(o)) => o
            .response_headers_to_add
            .iter()
            .filter_map(|h| h.header.as_ref())
            .find(|h| h.key.eq_ignore_ascii_case(name))
            .map(|h| h.value.clone()),
        Some(HttpResponse::DeniedResponse(_)) => header(r, name),
        _ => None,
    }
}

pub fn removed(r: &CheckResponse) -> Vec<String> {
    match &r.http_response {
        Some(HttpResponse::OkResponse(o)) => o.headers_to_remove.clone(),
        _ => Vec::new(),
    }
}

/// Mints a token with the dev key (deploy/local) or a fixture key.
pub fn mint(claims: serde_json::Value) -> String {
    let pem = std::fs::read(local_dir().join("dev-signing-key.pem")).unwrap();
    authz_sidecar::authn::jwt::mint(&pem, jsonwebtoken::Algorithm::RS256, "dev-local-1", &claims)
        .unwrap()
}

pub fn now() -> u64 {
    authz_sidecar::clock::now_secs()
}

/// Claims the local config accepts, for `user`, with `roles`.
pub fn local_claims(user: &str, roles: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "sub": format!("id-{user}"), "preferred_username": user, "iss": "authz-sidecar-local",
        "aud": "mcp-server", "exp": now() + 600, "iat": now(),
        "realm_access": {"roles": roles}, "scope": "openid read:agents"
    })
}

/// `grpc.health.v1.Health/Check` for `service`, as Envoy and Kubernetes probes ask it.
pub async fn serving_status(addr: SocketAddr, service: &str) -> i32 {
    let channel = tonic::transport::Endpoint::new(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}
