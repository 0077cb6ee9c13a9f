//! A real Keycloak 26.7.3 (`<tools>/keycloak`, see scripts/install-tools.sh) with the realms
//! `mcp-server` (deploy/keycloak/realm.json) and `other` (tests/fixtures/keycloak/other-realm.json).
//!
//! ```ignore
//! let kc = Keycloak::shared().await;            // one per test binary, stopped at exit
//! let token = kc.password_token("alice", "alice123").await;
//! let svc = kc.client_credentials_token("svc-reporter", SVC_REPORTER_SECRET).await;
//! let foreign = kc.other_realm_token().await;   // same client id/aud, other issuer
//! ```
//!
//! How it starts fast: the distribution is pre-built by the installer (`kc.sh build
//! --db=dev-file --health-enabled=true`) and run with `kc.sh start --optimized` (production
//! profile, no re-augmentation). Importing the realms into a fresh database takes ~30 s, so
//! the first start after the realm files change imports them once and keeps the resulting
//! H2 database in `<tools>/keycloak-seed/<hash of realm files + version>/`; every instance
//! then starts from a copy of it (~10 s). Every instance has its own home directory (a
//! temp dir: `bin/kc.sh` copied, `lib conf providers themes` symlinked, `data/` its own).
//! The JVM runs with `-XX:TieredStopAtLevel=1` (quicker start; set `AUTHZ_KC_JAVA_OPTS_APPEND`
//! to override).
//!
//! Facts (observed with 26.7.3 and these realm files):
//! - `iss` is `http://127.0.0.1:<port>/realms/<realm>` (`--hostname` is pinned to that URL).
//! - `aud` is the single string `"mcp-server"` (not an array); `azp` is the client.
//! - User tokens: `sub` (UUID), `preferred_username`, `realm_access.roles` (alice:
//!   `["premium","user"]`, bob: `["user"]`; no default-roles/offline_access), `groups`
//!   (alice: `["/acme"]`), `scope` = "profile email" (order varies), name/email claims.
//! - Service-account tokens (client credentials): `preferred_username` =
//!   `service-account-<client>`, `client_id` = `<client>`, `azp` = `<client>`,
//!   `realm_access.roles` = `["user"]`, no `sid`, plus `clientHost`/`clientAddress`.
//! - Signing: RS256, `kid` set; the seed makes the keys identical across instances started
//!   from the same seed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex as AsyncMutex, OnceCell};

use super::process::{Proc, free_port, tail_log};
use super::tools;

pub const REALM: &str = "mcp-server";
pub const OTHER_REALM: &str = "other";
/// Confidential client of realm `mcp-server` (password grant and standard flow enabled).
pub const CLIENT_ID: &str = "mcp-server";
pub const CLIENT_SECRET: &str = "test-only-mcp-server-secret";
/// Service-account clients of realm `mcp-server` (client credentials; role `user`).
pub const SVC_REPORTER: &str = "svc-reporter";
pub const SVC_REPORTER_SECRET: &str = "test-only-svc-reporter-secret";
/// Enabled in the realm file; tests disable it with `set_client_enabled`.
pub const SVC_DISABLED: &str = "svc-disabled";
pub const SVC_DISABLED_SECRET: &str = "test-only-svc-disabled-secret";
/// Realm `other`: client `mcp-server` (same id and audience, different issuer and keys).
pub const OTHER_CLIENT_ID: &str = "mcp-server";
pub const OTHER_CLIENT_SECRET: &str = "test-only-other-secret";
/// Master-realm bootstrap admin.
pub const ADMIN_USER: &str = "admin";
pub const ADMIN_PASSWORD: &str = "admin";

const READY_TIMEOUT: Duration = Duration::from_secs(240);
/// Bump when the seed layout or start options change.
const SEED_FORMAT: &str = "seed-v1";

fn realm_files() -> Vec<PathBuf> {
    vec![
        tools::repo_file("deploy/keycloak/realm.json"),
        tools::repo_file("tests/fixtures/keycloak/other-realm.json"),
    ]
}

fn client() -> reqwest::Client {
    // One client per call: a shared Keycloak outlives each #[tokio::test] runtime.
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

fn java_home() -> Option<PathBuf> {
    if let Some(v) = std::env::var_os("KEYCLOAK_JAVA_HOME") {
        return Some(PathBuf::from(v));
    }
    let temurin = PathBuf::from("/usr/lib/jvm/temurin-25-jdk-amd64");
    if temurin.join("bin/java").exists() {
        return Some(temurin);
    }
    None // inherit JAVA_HOME / PATH
}

/// The pre-built distribution; panics with an install hint when missing or not built.
fn dist_home() -> PathBuf {
    let home = tools::keycloak_home();
    if !home.join(".authz-build").exists() {
        panic!(
            "keycloak at {} is not pre-built for the tests: run scripts/install-tools.sh keycloak",
            home.display()
        );
    }
    home
}

/// A per-instance home: bin/kc.sh copied (kc.sh derives the home from its own real path),
/// the read-only parts symlinked, data/ private.
fn make_home(dist: &Path, dir: &Path, seed: Option<&Path>) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::copy(dist.join("bin/kc.sh"), dir.join("bin/kc.sh")).expect("copy kc.sh");
    for sub in ["lib", "conf", "providers", "themes"] {
        std::os::unix::fs::symlink(dist.join(sub), dir.join(sub)).expect("symlink dist dir");
    }
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    match seed {
        Some(seed) => copy_dir(seed, &data.join("h2")),
        None => {
            let import = data.join("import");
            std::fs::create_dir_all(&import).unwrap();
            for f in realm_files() {
                std::fs::copy(&f, import.join(f.file_name().unwrap()))
                    .unwrap_or_else(|e| panic!("copy {}: {e}", f.display()));
            }
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()))
    {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(".trace.db") {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(&name));
        } else {
            std::fs::copy(entry.path(), to.join(&name)).unwrap();
        }
    }
}

fn seed_key(dist: &Path) -> String {
    let mut h = Sha256::new();
    h.update(SEED_FORMAT);
    for f in realm_files() {
        h.update(std::fs::read(&f).unwrap_or_else(|e| panic!("read {}: {e}", f.display())));
    }
    h.update(std::fs::read(dist.join("version.txt")).unwrap_or_default());
    h.update(std::fs::read(dist.join(".authz-build")).unwrap_or_default());
    hex::encode(&h.finalize()[..8])
}

/// The H2 database directory with both realms imported, made once per realm-file change.
async fn seed_dir(dist: &Path) -> PathBuf {
    static LOCK: AsyncMutex<()> = AsyncMutex::const_new(());
    let _guard = LOCK.lock().await;
    let root = tools::tools_dir().join("keycloak-seed");
    let dir = root.join(seed_key(dist));
    let db = dir.join("h2").join("keycloakdb.mv.db");
    if db.exists() {
        return dir.join("h2");
    }
    std::fs::create_dir_all(&root).unwrap();
    let started = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix("kc-seed-")
        .tempdir_in(&root)
        .unwrap();
    make_home(dist, tmp.path(), None);
    let mut kc = Keycloak::launch(tmp.path(), true, false).await;
    // The realms are imported before the HTTP endpoints answer; check both.
    for realm in [REALM, OTHER_REALM] {
        let url = format!(
            "{}/realms/{realm}/.well-known/openid-configuration",
            kc.base_url()
        );
        let ok = client()
            .get(&url)
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        assert!(
            ok,
            "seed keycloak: realm {realm} missing after import; log: {}",
            kc.proc.log_path().display()
        );
    }
    kc.proc.kill();
    let log = kc.proc.log_path().to_path_buf();
    assert!(
        tail_log(&log, 20).contains("stopped in"),
        "seed keycloak did not shut down cleanly; last lines of {}:\n{}",
        log.display(),
        tail_log(&log, 40)
    );
    let staged = tmp.path().join("seed");
    copy_dir(&tmp.path().join("data/h2"), &staged.join("h2"));
    // Atomic publish; another test process may have won the race, which is fine.
    if std::fs::rename(&staged, &dir).is_err() && !db.exists() {
        panic!("could not publish keycloak seed to {}", dir.display());
    }
    eprintln!(
        "keycloak: built realm seed {} in {:.1}s",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    dir.join("h2")
}

pub struct Keycloak {
    proc: Proc,
    home: PathBuf,
    /// Removes the home when dropped (None for the shared instance: its watchdog removes it).
    _home_guard: Option<tempfile::TempDir>,
    port: u16,
    management_port: u16,
}

static SHARED: OnceCell<Keycloak> = OnceCell::const_new();

impl Keycloak {
    /// One Keycloak per test binary, started on first use and stopped (by its watchdog) when
    /// the test process exits. Admin changes made through it are seen by every test.
    pub async fn shared() -> &'static Keycloak {
        SHARED.get_or_init(|| Keycloak::start_inner(true)).await
    }

    /// A private instance (for outage tests: `stop()` / `start_again()`); stopped on drop.
    pub async fn start_owned() -> Keycloak {
        Keycloak::start_inner(false).await
    }

    async fn start_inner(shared: bool) -> Keycloak {
        let dist = dist_home();
        let seed = seed_dir(&dist).await;
        let tmp = tempfile::Builder::new()
            .prefix("authz-kc-")
            .tempdir()
            .unwrap();
        make_home(&dist, tmp.path(), Some(&seed));
        if shared {
            let home = tmp.keep();
            let mut kc = Keycloak::launch(&home, false, true).await;
            kc.home = home;
            kc
        } else {
            let home = tmp.path().to_path_buf();
            let mut kc = Keycloak::launch(&home, false, false).await;
            kc._home_guard = Some(tmp);
            kc
        }
    }

    async fn launch(home: &Path, import: bool, watched: bool) -> Keycloak {
        let port = free_port();
        let management_port = free_port();
        let cmd = Self::command(home, port, management_port, import, watched);
        let proc = Proc::spawn_opts("keycloak", port, &cmd, watched);
        let mut kc = Keycloak {
            proc,
            home: home.to_path_buf(),
            _home_guard: None,
            port,
            management_port,
        };
        kc.wait_ready().await;
        kc
    }

    fn command(
        home: &Path,
        port: u16,
        management_port: u16,
        import: bool,
        watched: bool,
    ) -> Command {
        let mut cmd = Command::new(home.join("bin/kc.sh"));
        cmd.arg("start")
            .arg("--optimized")
            .arg("--http-enabled=true")
            .arg("--http-host=127.0.0.1")
            .arg(format!("--http-port={port}"))
            .arg(format!("--hostname=http://127.0.0.1:{port}"))
            .arg(format!("--http-management-port={management_port}"))
            .arg("--cache=local")
            .arg("--log-console-color=false");
        if import {
            cmd.arg("--import-realm");
        }
        if let Some(jh) = java_home() {
            cmd.env("JAVA_HOME", jh);
        }
        let opts = std::env::var("AUTHZ_KC_JAVA_OPTS_APPEND")
            .unwrap_or_else(|_| "-XX:TieredStopAtLevel=1".to_string());
        cmd.env("JAVA_OPTS_APPEND", opts)
            .env("KC_BOOTSTRAP_ADMIN_USERNAME", ADMIN_USER)
            .env("KC_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env_remove("KC_DB")
            .env_remove("KC_HOSTNAME");
        if watched {
            // The watchdog removes the (kept) home once the test process is gone.
            cmd.env("AUTHZ_WATCHDOG_CLEANUP", home);
        }
        cmd
    }

    async fn wait_ready(&mut self) {
        let url = format!(
            "{}/realms/{REALM}/.well-known/openid-configuration",
            self.base_url()
        );
        self.proc
            .wait_until(
                || {
                    let url = url.clone();
                    async move {
                        matches!(client().get(&url).send().await, Ok(r) if r.status().is_success())
                    }
                },
                READY_TIMEOUT,
                "keycloak realm mcp-server openid-configuration",
            )
            .await;
    }

    // ---- addresses ---------------------------------------------------------------------

    /// `http://127.0.0.1:<port>`
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>/realms/<realm>` (the `iss` claim).
    pub fn issuer(&self, realm: &str) -> String {
        format!("{}/realms/{realm}", self.base_url())
    }

    /// `<issuer>/protocol/openid-connect/certs`
    pub fn jwks_url(&self, realm: &str) -> String {
        format!("{}/protocol/openid-connect/certs", self.issuer(realm))
    }

    /// `<issuer>/protocol/openid-connect/token`
    pub fn token_url(&self, realm: &str) -> String {
        format!("{}/protocol/openid-connect/token", self.issuer(realm))
    }

    /// Management interface (health: `/health/ready`, `/health/live`).
    pub fn management_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.management_port)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    pub fn log_path(&self) -> &Path {
        self.proc.log_path()
    }

    // ---- lifecycle (owned instances) ----------------------------------------------------

    /// Stop the server (SIGTERM to its process group, SIGKILL after 10 s). Its data and
    /// port are kept for `start_again`.
    pub fn stop(&mut self) {
        self.proc.kill();
    }

    /// Start again on the same port with the same data (realms, keys, admin changes).
    pub async fn start_again(&mut self) {
        self.proc.respawn();
        self.wait_ready().await;
    }

    // ---- tokens -------------------------------------------------------------------------

    /// POST the token endpoint of `realm`; Ok(full JSON answer) or Err("<status>: <body>").
    pub async fn token_request(&self, realm: &str, form: &[(&str, &str)]) -> Result<Value, String> {
        let resp = client()
            .post(self.token_url(realm))
            .form(form)
            .send()
            .await
            .map_err(|e| format!("token request: {e}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(format!("{status}: {text}"));
        }
        serde_json::from_str(&text).map_err(|e| format!("token answer {text}: {e}"))
    }

    fn access_token(v: Result<Value, String>, what: &str) -> String {
        match v {
            Ok(v) => v["access_token"]
                .as_str()
                .expect("access_token")
                .to_string(),
            Err(e) => panic!("{what}: {e}"),
        }
    }

    /// Password grant on realm `mcp-server`, client `mcp-server`: the access token.
    pub async fn password_token(&self, user: &str, password: &str) -> String {
        Self::access_token(
            self.try_password_token(user, password).await,
            &format!("password grant for {user}"),
        )
    }

    /// Password grant, full answer (access_token, refresh_token, expires_in, ...) or error.
    pub async fn try_password_token(&self, user: &str, password: &str) -> Result<Value, String> {
        self.token_request(
            REALM,
            &[
                ("grant_type", "password"),
                ("client_id", CLIENT_ID),
                ("client_secret", CLIENT_SECRET),
                ("username", user),
                ("password", password),
                ("scope", "openid"),
            ],
        )
        .await
    }

    /// Client-credentials grant on realm `mcp-server` (e.g. `svc-reporter`): the access token.
    pub async fn client_credentials_token(&self, client_id: &str, secret: &str) -> String {
        Self::access_token(
            self.try_client_credentials_token(client_id, secret).await,
            &format!("client credentials for {client_id}"),
        )
    }

    pub async fn try_client_credentials_token(
        &self,
        client_id: &str,
        secret: &str,
    ) -> Result<Value, String> {
        self.token_request(
            REALM,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", client_id),
                ("client_secret", secret),
            ],
        )
        .await
    }

    /// Password grant on any realm.
    pub async fn token_for_realm(
        &self,
        realm: &str,
        client_id: &str,
        secret: &str,
        user: &str,
        password: &str,
    ) -> String {
        Self::access_token(
            self.token_request(
                realm,
                &[
                    ("grant_type", "password"),
                    ("client_id", client_id),
                    ("client_secret", secret),
                    ("username", user),
                    ("password", password),
                ],
            )
            .await,
            &format!("password grant for {user} in realm {realm}"),
        )
    }

    /// alice/alice123 in realm `other`: same `aud` ("mcp-server") and username as the real
    /// alice, but another issuer and signing key (and role `admin`).
    pub async fn other_realm_token(&self) -> String {
        self.token_for_realm(
            OTHER_REALM,
            OTHER_CLIENT_ID,
            OTHER_CLIENT_SECRET,
            "alice",
            "alice123",
        )
        .await
    }

    /// The realm's JWKS document.
    pub async fn jwks(&self, realm: &str) -> Value {
        client()
            .get(self.jwks_url(realm))
            .send()
            .await
            .expect("jwks request")
            .json()
            .await
            .expect("jwks json")
    }

    // ---- admin API (realm mcp-server unless said otherwise) ------------------------------

    /// Access token of the master-realm admin (admin-cli, password grant).
    pub async fn admin_token(&self) -> String {
        Self::access_token(
            self.token_request(
                "master",
                &[
                    ("grant_type", "password"),
                    ("client_id", "admin-cli"),
                    ("username", ADMIN_USER),
                    ("password", ADMIN_PASSWORD),
                ],
            )
            .await,
            "admin token",
        )
    }

    /// Admin REST call (`path` below `/admin/realms`); panics on non-2xx. Returns the JSON
    /// body (Null when empty) and the Location header, if any.
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (Value, Option<String>) {
        let url = format!("{}/admin/realms{path}", self.base_url());
        let mut req = client()
            .request(method.clone(), &url)
            .bearer_auth(self.admin_token().await);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = resp.status();
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let text = resp.text().await.unwrap_or_default();
        assert!(status.is_success(), "{method} {url} -> {status}: {text}");
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::Null)
        };
        (v, location)
    }

    /// Id (UUID, the `sub` claim) of a user of realm `mcp-server`.
    pub async fn user_id(&self, username: &str) -> String {
        let (v, _) = self
            .admin(
                reqwest::Method::GET,
                &format!("/{REALM}/users?username={username}&exact=true"),
                None,
            )
            .await;
        v[0]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no user {username} in realm {REALM}: {v}"))
            .to_string()
    }

    async fn realm_role(&self, role: &str) -> Value {
        self.admin(
            reqwest::Method::GET,
            &format!("/{REALM}/roles/{role}"),
            None,
        )
        .await
        .0
    }

    /// Give `user` the realm role `role` (tokens issued afterwards carry it).
    pub async fn grant_realm_role(&self, user: &str, role: &str) {
        let id = self.user_id(user).await;
        let rep = self.realm_role(role).await;
        self.admin(
            reqwest::Method::POST,
            &format!("/{REALM}/users/{id}/role-mappings/realm"),
            Some(&json!([rep])),
        )
        .await;
    }

    /// Take the realm role `role` away from `user`.
    pub async fn revoke_realm_role(&self, user: &str, role: &str) {
        let id = self.user_id(user).await;
        let rep = self.realm_role(role).await;
        self.admin(
            reqwest::Method::DELETE,
            &format!("/{REALM}/users/{id}/role-mappings/realm"),
            Some(&json!([rep])),
        )
        .await;
    }

    /// Add an `rsa-generated` key provider (RS256, 2048 bit) to realm `mcp-server`. With a
    /// priority above the existing provider's (100), new tokens are signed with the new key
    /// (a new `kid`); the old key stays in the JWKS. Returns the component id.
    pub async fn add_rsa_key_provider(&self, name: &str, priority: u32) -> String {
        let (realm, _) = self
            .admin(reqwest::Method::GET, &format!("/{REALM}"), None)
            .await;
        let body = json!({
            "name": name,
            "providerId": "rsa-generated",
            "providerType": "org.keycloak.keys.KeyProvider",
            "parentId": realm["id"],
            "config": {
                "priority": [priority.to_string()],
                "enabled": ["true"],
                "active": ["true"],
                "keySize": ["2048"],
                "algorithm": ["RS256"]
            }
        });
        self.create_component(REALM, &body).await
    }

    /// Create a realm component (key provider, ...) and return its id.
    pub async fn create_component(&self, realm: &str, body: &Value) -> String {
        let (_, location) = self
            .admin(
                reqwest::Method::POST,
                &format!("/{realm}/components"),
                Some(body),
            )
            .await;
        location
            .and_then(|l| l.rsplit('/').next().map(String::from))
            .expect("Location of the new component")
    }

    /// Remove a component (e.g. a key provider added by `add_rsa_key_provider`).
    pub async fn remove_component(&self, id: &str) {
        self.admin(
            reqwest::Method::DELETE,
            &format!("/{REALM}/components/{id}"),
            None,
        )
        .await;
    }

    /// Enable or disable a client of realm `mcp-server` (a disabled client gets no tokens).
    pub async fn set_client_enabled(&self, client_id: &str, enabled: bool) {
        let (v, _) = self
            .admin(
                reqwest::Method::GET,
                &format!("/{REALM}/clients?clientId={client_id}"),
                None,
            )
            .await;
        let mut rep = v[0].clone();
        let id = rep["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no client {client_id} in realm {REALM}: {v}"))
            .to_string();
        rep["enabled"] = Value::Bool(enabled);
        self.admin(
            reqwest::Method::PUT,
            &format!("/{REALM}/clients/{id}"),
            Some(&rep),
        )
        .await;
    }

    /// Enable or disable a user of realm `mcp-server`.
    pub async fn set_user_enabled(&self, user: &str, enabled: bool) {
        let id = self.user_id(user).await;
        self.admin(
            reqwest::Method::PUT,
            &format!("/{REALM}/users/{id}"),
            Some(&json!({ "enabled": enabled })),
        )
        .await;
    }
}

/// Decode a JWT's payload (no signature check) — for assertions in tests.
pub fn jwt_claims(token: &str) -> Value {
    decode_part(token, 1)
}

/// Decode a JWT's header (no signature check).
pub fn jwt_header(token: &str) -> Value {
    decode_part(token, 0)
}

fn decode_part(token: &str, i: usize) -> Value {
    use base64::Engine as _;
    let part = token
        .split('.')
        .nth(i)
        .unwrap_or_else(|| panic!("not a JWT: {token}"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .unwrap_or_else(|e| panic!("JWT part {i} is not base64url: {e}"));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("JWT part {i} is not JSON: {e}"))
}
