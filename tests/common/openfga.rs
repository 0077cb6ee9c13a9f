//! A real OpenFGA server (v1.18.1, `bin/openfga`) on free loopback ports, plus small HTTP API
//! helpers.
//!
//! ```ignore
//! let fga = OpenFga::shared().await;                 // one memory-engine server per binary
//! let (store, model) = fga                           // a store of this test's own
//!     .store("revoke")                               // names: 3..64 chars
//!     .tuples(&[("user:alice", "executor", "tool:search")])
//!     .create()                                      // the app model unless `.model(json)`
//!     .await;
//! fga.delete_tuples(&store, &[("user:alice", "executor", "tool:search")]).await;
//! assert!(!fga.check(&store, "user:alice", "executor", "tool:search").await);
//! ```
//!
//! Tuples are `(user, relation, object)` triples or the sidecar's own `TupleKey`s.
//!
//! `OpenFga::start_sqlite(dir)` keeps its data in `dir/openfga.db`, so `stop()` + `start_again()`
//! (or `restart()`) brings the same stores, models and tuples back; the memory engine loses them.
//! `OpenFga::start_with_key(key)` requires `key` as a bearer token; the helpers send it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use authz_sidecar::authz::TupleKey;
use serde_json::{Value, json};

use super::process::{Proc, free_port};
use super::tools;

const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
enum Engine {
    Memory,
    Sqlite(PathBuf),
}

pub struct OpenFga {
    proc: Proc,
    http_port: u16,
    grpc_port: u16,
    engine: Engine,
    /// The preshared key the server requires (`--authn-method=preshared`), if any.
    key: Option<String>,
}

/// A relationship tuple as the helpers write it.
pub trait AsTuple {
    /// `(user, relation, object)`.
    fn triple(&self) -> (&str, &str, &str);
}

impl AsTuple for (&str, &str, &str) {
    fn triple(&self) -> (&str, &str, &str) {
        (self.0, self.1, self.2)
    }
}

impl AsTuple for TupleKey {
    fn triple(&self) -> (&str, &str, &str) {
        (&self.user, &self.relation, &self.object)
    }
}

/// A test's own store, built by [`OpenFga::store`]: a model (the app's unless
/// [`model`](Self::model)) and tuples, written in that order by [`create`](Self::create).
pub struct StoreBuilder<'a> {
    fga: &'a OpenFga,
    name: String,
    model: Value,
    tuples: Vec<Value>,
}

impl StoreBuilder<'_> {
    /// Another model than the app's (`deploy/openfga/model.json`).
    pub fn model(mut self, model: Value) -> Self {
        self.model = model;
        self
    }

    /// Tuples to write once the model is there (may be called more than once).
    pub fn tuples<T: AsTuple>(mut self, tuples: &[T]) -> Self {
        self.tuples.extend(tuples.iter().map(tuple_key));
        self
    }

    /// Creates the store, writes the model, then the tuples; returns (store id, model id).
    pub async fn create(self) -> (String, String) {
        let store = self.fga.create_store(&self.name).await;
        let model = self.fga.write_model(&store, &self.model).await;
        self.fga.write_keys(&store, "writes", self.tuples).await;
        (store, model)
    }
}

fn tuple_key<T: AsTuple>(t: &T) -> Value {
    let (user, relation, object) = t.triple();
    json!({ "user": user, "relation": relation, "object": object })
}

/// The app's authorization model (`deploy/openfga/model.json`), as the JSON body of
/// `POST /stores/{id}/authorization-models`.
pub fn app_model() -> Value {
    let path = tools::repo_file("deploy/openfga/model.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

fn client() -> reqwest::Client {
    // A client per call: helpers may be shared across tests, and each #[tokio::test] has its
    // own runtime (a pooled connection from a dead runtime fails).
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("reqwest client")
}

static SHARED: tokio::sync::OnceCell<OpenFga> = tokio::sync::OnceCell::const_new();

impl OpenFga {
    /// One memory-engine OpenFGA per test binary, started on first use and stopped by its
    /// watchdog when the test process exits. Give each test its own store.
    pub async fn shared() -> &'static OpenFga {
        SHARED.get_or_init(OpenFga::start_watched).await
    }

    /// Memory engine, free HTTP and gRPC ports; returns once `/healthz` says SERVING.
    pub async fn start() -> OpenFga {
        Self::start_engine(Engine::Memory, false, None, &[]).await
    }

    /// Memory engine, requiring `key` as a bearer token on every API call (`/healthz` is
    /// open). The helpers below send it.
    pub async fn start_with_key(key: &str) -> OpenFga {
        Self::start_engine(Engine::Memory, false, Some(key.to_string()), &[]).await
    }

    /// Memory engine with its own tracing on: every request sampled and its spans sent over
    /// OTLP/gRPC to `otlp_grpc` (`host:port`), continuing a caller's `traceparent`.
    pub async fn start_traced(otlp_grpc: &str) -> OpenFga {
        let args = [
            "--trace-enabled=true".to_string(),
            format!("--trace-otlp-endpoint={otlp_grpc}"),
            "--trace-sample-ratio=1".to_string(),
            "--trace-service-name=openfga".to_string(),
        ];
        Self::start_engine(Engine::Memory, false, None, &args).await
    }

    /// Like [`OpenFga::start`], for a server kept in a static: the process is watched and stops
    /// when the test process exits.
    pub async fn start_watched() -> OpenFga {
        Self::start_engine(Engine::Memory, true, None, &[]).await
    }

    /// SQLite engine with its database in `dir/openfga.db` (created and migrated first):
    /// data survives `stop()` / `start_again()` / `restart()`.
    pub async fn start_sqlite(dir: &Path) -> OpenFga {
        std::fs::create_dir_all(dir).expect("create sqlite dir");
        let engine = Engine::Sqlite(dir.join("openfga.db"));
        let out = Command::new(tools::tool("openfga"))
            .args(["migrate", "--datastore-engine", "sqlite", "--datastore-uri"])
            .arg(Self::datastore_uri(&engine).unwrap())
            .output()
            .expect("run openfga migrate");
        assert!(
            out.status.success(),
            "openfga migrate failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Self::start_engine(engine, false, None, &[]).await
    }

    fn datastore_uri(engine: &Engine) -> Option<String> {
        match engine {
            Engine::Memory => None,
            Engine::Sqlite(path) => Some(format!(
                "file:{}?_pragma=journal_mode(WAL)&_pragma=busy_timeout(5000)",
                path.display()
            )),
        }
    }

    async fn start_engine(
        engine: Engine,
        watched: bool,
        key: Option<String>,
        extra: &[String],
    ) -> OpenFga {
        let http_port = free_port();
        let grpc_port = free_port();
        let mut cmd = Command::new(tools::tool("openfga"));
        cmd.arg("run");
        match &engine {
            Engine::Memory => {
                cmd.args(["--datastore-engine", "memory"]);
            }
            Engine::Sqlite(_) => {
                cmd.args(["--datastore-engine", "sqlite", "--datastore-uri"])
                    .arg(Self::datastore_uri(&engine).unwrap());
            }
        }
        if let Some(key) = &key {
            cmd.arg("--authn-method=preshared")
                .arg(format!("--authn-preshared-keys={key}"));
        }
        cmd.arg(format!("--http-addr=127.0.0.1:{http_port}"))
            .arg(format!("--grpc-addr=127.0.0.1:{grpc_port}"))
            .args([
                "--metrics-enabled=false",
                "--playground-enabled=false",
                "--profiler-enabled=false",
                "--log-format=text",
                "--log-level=warn",
            ])
            .args(extra);
        let proc = Proc::spawn_opts("openfga", http_port, &cmd, watched);
        let mut fga = OpenFga {
            proc,
            http_port,
            grpc_port,
            engine,
            key,
        };
        fga.wait_ready().await;
        fga
    }

    async fn wait_ready(&mut self) {
        let url = format!("{}/healthz", self.http_url());
        self.proc
            .wait_until(
                || {
                    let url = url.clone();
                    async move {
                        match client().get(&url).send().await {
                            Ok(r) if r.status().is_success() => r
                                .json::<Value>()
                                .await
                                .map(|v| v["status"] == "SERVING")
                                .unwrap_or(false),
                            _ => false,
                        }
                    }
                },
                READY_TIMEOUT,
                "openfga /healthz SERVING",
            )
            .await;
    }

    /// `http://127.0.0.1:<port>`
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.http_port))
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.grpc_port))
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Stop the server (SIGTERM, then SIGKILL after 10 s). The ports stay reserved for
    /// `start_again`.
    pub fn stop(&mut self) {
        self.proc.kill();
    }

    /// Start again on the same ports (after `stop`); waits for SERVING.
    pub async fn start_again(&mut self) {
        self.proc.respawn();
        self.wait_ready().await;
    }

    /// `stop` + `start_again`. With the memory engine all data is lost; with SQLite it is kept.
    pub async fn restart(&mut self) {
        self.stop();
        self.start_again().await;
    }

    // ---- API helpers (panic on any non-2xx answer) -------------------------------------

    async fn post(&self, path: &str, body: &Value) -> Value {
        let url = format!("{}{path}", self.http_url());
        let mut req = client().post(&url).json(body);
        if let Some(key) = &self.key {
            req = req.bearer_auth(key);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}"));
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert!(
            status.is_success(),
            "POST {url} -> {status}: {text}\nbody: {body}"
        );
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::Null)
        }
    }

    /// Create a store (name: 3..64 chars of `[a-zA-Z0-9 .-/^_&@]`); returns its id.
    pub async fn create_store(&self, name: &str) -> String {
        let v = self.post("/stores", &json!({ "name": name })).await;
        v["id"].as_str().expect("store id").to_string()
    }

    /// Write an authorization model (JSON as in `deploy/openfga/model.json`); returns its id.
    pub async fn write_model(&self, store: &str, model: &Value) -> String {
        let v = self
            .post(&format!("/stores/{store}/authorization-models"), model)
            .await;
        v["authorization_model_id"]
            .as_str()
            .expect("authorization_model_id")
            .to_string()
    }

    /// A store of the test's own, with the app model unless told otherwise; see
    /// [`StoreBuilder`].
    pub fn store(&self, name: &str) -> StoreBuilder<'_> {
        StoreBuilder {
            fga: self,
            name: name.to_string(),
            model: app_model(),
            tuples: Vec::new(),
        }
    }

    /// A new store with the app model and no tuples; returns (store id, model id).
    pub async fn app_store(&self, name: &str) -> (String, String) {
        self.store(name).create().await
    }

    /// `writes` or `deletes` of tuple keys, in one request.
    async fn write_keys(&self, store: &str, what: &str, keys: Vec<Value>) {
        if keys.is_empty() {
            return;
        }
        self.post(
            &format!("/stores/{store}/write"),
            &json!({ what: { "tuple_keys": keys } }),
        )
        .await;
    }

    /// Write tuples against the store's latest model.
    pub async fn write_tuples<T: AsTuple>(&self, store: &str, tuples: &[T]) {
        self.write_keys(store, "writes", tuples.iter().map(tuple_key).collect())
            .await;
    }

    /// Delete tuples.
    pub async fn delete_tuples<T: AsTuple>(&self, store: &str, tuples: &[T]) {
        self.write_keys(store, "deletes", tuples.iter().map(tuple_key).collect())
            .await;
    }

    /// Check against the store's latest model, with HIGHER_CONSISTENCY (no cache).
    pub async fn check(&self, store: &str, user: &str, relation: &str, object: &str) -> bool {
        let v = self
            .post(
                &format!("/stores/{store}/check"),
                &json!({
                    "tuple_key": { "user": user, "relation": relation, "object": object },
                    "consistency": "HIGHER_CONSISTENCY"
                }),
            )
            .await;
        v["allowed"]
            .as_bool()
            .unwrap_or_else(|| panic!("check answer without allowed: {v}"))
    }

    /// ListObjects of `type_` on which `user` has `relation`.
    pub async fn list_objects(
        &self,
        store: &str,
        user: &str,
        relation: &str,
        type_: &str,
    ) -> Vec<String> {
        let v = self
            .post(
                &format!("/stores/{store}/list-objects"),
                &json!({ "user": user, "relation": relation, "type": type_ }),
            )
            .await;
        let mut out: Vec<String> = v["objects"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|o| o.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }
}
