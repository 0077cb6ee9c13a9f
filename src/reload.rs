//! Live reload of the config file: on SIGHUP (a [`ReloadHandle`] request) and when the file's
//! content changes (polled, [`Reloader::watch`]).
//!
//! A reload reads the file once, resolves it the way startup does ([`ConfigSource`]: the same
//! environment and command-line overrides), compiles the rules and checks them against the
//! OpenFGA model ([`State::apply`]), then swaps the new policy in. A config that fails any of
//! these is refused with its one-line error, and the running one keeps serving.
//!
//! Invariant: what [`State`]'s backends own (listeners, key source, API-key store, OpenFGA
//! connection, decision cache and its size, logging) is fixed for the life of the process; the
//! cache's TTLs are the exception (set on the cache by [`State::apply`]). A reload that
//! changes one of those keys applies everything else, keeps the running value of those, and
//! names them in one warning line ("restart needed for: ...").
//!
//! Why polling and not filesystem events: Kubernetes updates a mounted ConfigMap by swapping
//! the `..data` symlink in the directory, never by writing the file the sidecar opened, and
//! inotify watches go stale across such swaps (and do not work on every volume type). Reading
//! the file through its path every `server.reload_interval` and comparing a SHA-256 of the
//! bytes sees every kind of update the same way (in-place write, rename, symlink swap), costs
//! one small read per interval, and needs no new dependency; the API-key file is followed the
//! same way (`api_keys.reload_interval`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, Env, ProcessEnv};
use crate::state::State;
use crate::telemetry::Metrics;

/// A SHA-256 of the config file's bytes; shown as its first 12 hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ContentHash([u8; 32]);

impl ContentHash {
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(&self.0[..6]))
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

type Overrides = dyn Fn(&mut Config) -> Result<(), ConfigError> + Send + Sync;

/// Where the config comes from: the file, the environment it resolves against, and the
/// command-line overrides applied after. Startup and every reload read it the same way, so a
/// reload never sees a flag-overridden key as changed.
#[derive(Clone)]
pub struct ConfigSource {
    path: PathBuf,
    env: Arc<dyn Env + Send + Sync>,
    overrides: Arc<Overrides>,
}

impl ConfigSource {
    /// The file at `path`, resolved against the process environment.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            env: Arc::new(ProcessEnv),
            overrides: Arc::new(|_| Ok(())),
        }
    }

    /// Resolves against `env` instead of the process environment (tests).
    pub fn with_env(mut self, env: impl Env + Send + Sync + 'static) -> Self {
        self.env = Arc::new(env);
        self
    }

    /// Applied to every config read, after the file and the environment (command-line flags).
    pub fn with_overrides(
        mut self,
        f: impl Fn(&mut Config) -> Result<(), ConfigError> + Send + Sync + 'static,
    ) -> Self {
        self.overrides = Arc::new(f);
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file once and resolves the bytes it read. The hash is of those bytes, also
    /// when they do not resolve (it is `None` only when the file cannot be read).
    pub fn load(&self) -> (Option<ContentHash>, Result<Config, ConfigError>) {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(source) => {
                let path = self.path.clone();
                return (None, Err(ConfigError::Read { path, source }));
            }
        };
        let hash = ContentHash::of(&bytes);
        let config = match String::from_utf8(bytes) {
            Ok(text) => Config::from_file_text(&self.path, &text, self.env.as_ref()),
            Err(_) => Err(ConfigError::Parse {
                path: self.path.clone(),
                message: "not UTF-8 text".into(),
            }),
        };
        let config = config.and_then(|mut c| (self.overrides)(&mut c).map(|()| c));
        (Some(hash), config)
    }

    /// The hash of what the file holds now; `None` while it cannot be read.
    fn current_hash(&self) -> Option<ContentHash> {
        std::fs::read(&self.path).ok().map(|b| ContentHash::of(&b))
    }
}

/// What made a reload happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Sighup,
    FileChange,
    /// Asked for through a [`ReloadHandle`] by something other than a signal (tests, tools).
    Request,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sighup => "sighup",
            Self::FileChange => "file_change",
            Self::Request => "request",
        })
    }
}

/// What one reload did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub cause: Cause,
    /// Of the bytes read; `None` when the file could not be read.
    pub hash: Option<ContentHash>,
    /// Applied, naming the changed keys that were not (they need a restart); or refused, with
    /// the one-line reason.
    pub result: Result<Vec<&'static str>, String>,
}

impl Outcome {
    pub fn applied(&self) -> bool {
        self.result.is_ok()
    }

    /// The changed keys that need a restart (empty when refused).
    pub fn restart_needed(&self) -> &[&'static str] {
        self.result.as_deref().unwrap_or_default()
    }
}

type Request = (Cause, oneshot::Sender<Outcome>);

/// Asks the running server for a reload (SIGHUP in `cli`, tests) and gets its outcome.
#[derive(Clone)]
pub struct ReloadHandle(mpsc::Sender<Request>);

/// The server's end of a [`ReloadHandle`].
pub struct Requests(mpsc::Receiver<Request>);

/// A handle and the requests it sends, for [`crate::server::run_with`].
pub fn channel() -> (ReloadHandle, Requests) {
    let (tx, rx) = mpsc::channel(8);
    (ReloadHandle(tx), Requests(rx))
}

impl ReloadHandle {
    /// Reloads and returns what happened; `None` when the server is not running (any more).
    pub async fn reload(&self, cause: Cause) -> Option<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.0.send((cause, tx)).await.ok()?;
        rx.await.ok()
    }
}

/// The config the server runs and the file it reloads from.
pub struct Reloader {
    source: ConfigSource,
    state: Arc<State>,
    metrics: Arc<Metrics>,
    /// Held for the whole of a reload, so two never interleave.
    running: Mutex<Running>,
}

struct Running {
    /// What serves: the last applied config, with the restart-only keys as started.
    config: Config,
    /// The bytes last read by a reload (or at startup), applied or not: the watcher reloads
    /// when the file holds anything else, and does not retry refused bytes.
    seen: Option<ContentHash>,
}

impl Reloader {
    /// `config` is what the server started with, read from `source` with hash `hash`.
    pub fn new(
        source: ConfigSource,
        config: Config,
        hash: Option<ContentHash>,
        state: Arc<State>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            source,
            state,
            metrics,
            running: Mutex::new(Running { config, seen: hash }),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads, validates and applies the config file; logs one line with the result and the
    /// content hash, plus one warning naming the changed keys that need a restart.
    pub fn reload(&self, cause: Cause) -> Outcome {
        let mut running = self.running();
        let (hash, loaded) = self.source.load();
        if hash.is_some() {
            running.seen = hash;
        }
        let hash_label = hash.map_or_else(|| "unreadable".to_string(), |h| h.to_string());
        let result = loaded.map_err(|e| e.to_string()).and_then(|new| {
            let restart = restart_only_changes(&running.config, &new);
            let effective = keep_restart_only(&running.config, new);
            self.state.apply(&effective).map_err(|e| e.to_string())?;
            running.config = effective;
            Ok(restart)
        });
        self.metrics
            .record_reload(result.is_ok(), crate::clock::now_secs());
        match &result {
            Ok(restart) => {
                let rules = running.config.routes.rules.len();
                tracing::info!(result = "ok", cause = %cause, config_hash = %hash_label, rules, "config reloaded");
                if !restart.is_empty() {
                    tracing::warn!(
                        config_hash = %hash_label,
                        "restart needed for: {} (changed in the file; the running values stay until a restart)",
                        restart.join(", ")
                    );
                }
            }
            Err(e) => {
                tracing::error!(result = "error", cause = %cause, config_hash = %hash_label, error = %e, "config reload refused; the running config keeps serving");
            }
        }
        Outcome {
            cause,
            hash,
            result,
        }
    }

    /// Answers [`ReloadHandle`] requests until `shutdown`.
    pub async fn serve_requests(
        self: Arc<Self>,
        mut requests: Requests,
        shutdown: CancellationToken,
    ) {
        loop {
            let (cause, reply) = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = requests.0.recv() => match r {
                    Some(r) => r,
                    None => return,
                },
            };
            let this = self.clone();
            // File reads and rule compilation are blocking work.
            let outcome = tokio::task::spawn_blocking(move || this.reload(cause)).await;
            if let Ok(outcome) = outcome {
                let _ = reply.send(outcome);
            }
        }
    }

    /// Polls the file's content hash every `server.reload_interval` (read again at each
    /// round, so a reload can change it; zero: not watched) and reloads when it differs from
    /// the bytes last read. A change is acted on once two reads a moment apart agree, so a
    /// file caught half-written is not refused for nothing.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let interval = self.running().config.reload_interval;
            let wait = if interval.is_zero() {
                Duration::from_secs(1)
            } else {
                interval
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            if interval.is_zero() {
                continue;
            }
            let this = self.clone();
            let changed = tokio::task::spawn_blocking(move || {
                let now = this.source.current_hash()?;
                (Some(now) != this.running().seen).then_some(now)
            })
            .await
            .ok()
            .flatten();
            let Some(first) = changed else { continue };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep((interval / 4).min(Duration::from_millis(250))) => {}
            }
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if this.source.current_hash() == Some(first) {
                    this.reload(Cause::FileChange);
                }
            })
            .await;
        }
    }
}

/// Equal by every field, for config types without `PartialEq`. Only compared, never shown:
/// some hold secrets (API tokens, the lookup secret).
fn same<T: fmt::Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

/// The config keys whose values live in what is built once (listeners, logging, key source,
/// API-key store, OpenFGA connection, decision cache) and differ between `running` and `new`.
pub fn restart_only_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let changed = |keys: &mut Vec<&'static str>, key: &'static str, differs: bool| {
        if differs {
            keys.push(key);
        }
    };
    changed(
        &mut keys,
        "server.grpc_addr",
        running.grpc_addr != new.grpc_addr,
    );
    changed(
        &mut keys,
        "server.ops_addr",
        running.ops_addr != new.ops_addr,
    );
    changed(
        &mut keys,
        "server.drain_timeout",
        running.drain_timeout != new.drain_timeout,
    );
    changed(
        &mut keys,
        "server.shutdown_delay",
        running.shutdown_delay != new.shutdown_delay,
    );
    changed(
        &mut keys,
        "server.reflection",
        running.reflection != new.reflection,
    );
    changed(
        &mut keys,
        "api_keys.exchange_url",
        !same(&running.api_key_exchange, &new.api_key_exchange),
    );
    changed(&mut keys, "log.level", running.log.filter != new.log.filter);
    changed(&mut keys, "log.format", running.log.json != new.log.json);
    changed(
        &mut keys,
        "log.decisions",
        running.log.decisions != new.log.decisions,
    );
    changed(
        &mut keys,
        "log.allow_sample",
        running.log.allow_sample != new.log.allow_sample,
    );

    let (a, b) = (&running.jwt, &new.jwt);
    changed(&mut keys, key_source_key(&b.source), a.source != b.source);
    changed(
        &mut keys,
        "jwt.refresh_interval",
        a.refresh_interval != b.refresh_interval,
    );
    changed(
        &mut keys,
        "jwt.refresh_cooldown",
        a.refresh_cooldown != b.refresh_cooldown,
    );
    changed(
        &mut keys,
        "jwt.fetch_timeout",
        a.fetch_timeout != b.fetch_timeout,
    );

    match (&running.api_keys, &new.api_keys) {
        (Some(a), Some(b)) => {
            let before = keys.len();
            changed(&mut keys, "api_keys.file", a.file != b.file);
            changed(
                &mut keys,
                "api_keys.reload_interval",
                a.reload_interval != b.reload_interval,
            );
            changed(
                &mut keys,
                "api_keys.bcrypt_concurrency",
                a.bcrypt_concurrency != b.bcrypt_concurrency,
            );
            changed(
                &mut keys,
                "api_keys.lookup_secret",
                a.lookup_secret != b.lookup_secret,
            );
            // Any other API-key store setting: named by its section.
            let other = keys.len() == before && !same(a, b);
            changed(&mut keys, "api_keys", other);
        }
        (a, b) => changed(&mut keys, "api_keys.file", a.is_some() != b.is_some()),
    }

    match (&running.openfga, &new.openfga) {
        (Some(a), Some(b)) => {
            let before = keys.len();
            changed(&mut keys, "openfga.api_url", a.api_url != b.api_url);
            changed(&mut keys, "openfga.store_id", !same(&a.store, &b.store));
            changed(&mut keys, "openfga.model_id", a.model_id != b.model_id);
            changed(&mut keys, "openfga.api_token", a.api_token != b.api_token);
            changed(&mut keys, "openfga.timeout", a.timeout != b.timeout);
            changed(
                &mut keys,
                "openfga.consistency",
                !same(&a.consistency, &b.consistency),
            );
            changed(
                &mut keys,
                "openfga.max_batch_size",
                a.max_batch_size != b.max_batch_size,
            );
            changed(
                &mut keys,
                "openfga.max_in_flight",
                a.max_in_flight != b.max_in_flight,
            );
            changed(
                &mut keys,
                "openfga.changelog_interval",
                a.changelog_interval != b.changelog_interval,
            );
            changed(
                &mut keys,
                "openfga.changelog_lookback",
                a.changelog_lookback != b.changelog_lookback,
            );
            changed(
                &mut keys,
                "openfga.breaker_failures",
                a.breaker_failures != b.breaker_failures,
            );
            changed(
                &mut keys,
                "openfga.breaker_open_for",
                a.breaker_open_for != b.breaker_open_for,
            );
            // Any other connection setting; contextual tuples reload.
            let conn = |f: &crate::config::OpenFgaConfig| {
                let mut f = f.clone();
                f.contextual_tuples.clear();
                f
            };
            let other = keys.len() == before && !same(&conn(a), &conn(b));
            changed(&mut keys, "openfga", other);
        }
        (a, b) => changed(&mut keys, "openfga", a.is_some() != b.is_some()),
    }

    let (a, b) = (&running.cache, &new.cache);
    // The TTLs reload (`State::apply` sets them on the cache); the cache itself does not.
    changed(&mut keys, "cache.enabled", a.enabled != b.enabled);
    changed(
        &mut keys,
        "cache.max_entries",
        a.max_entries != b.max_entries,
    );
    keys
}

fn key_source_key(source: &crate::config::KeySourceConfig) -> &'static str {
    use crate::config::KeySourceConfig::*;
    match source {
        JwksUrl(_) => "jwt.jwks_url",
        Discovery { .. } => "jwt.keycloak_url",
        File(_) => "jwt.jwks_file",
        None => "jwt key source",
    }
}

/// `new` with the restart-only values of `running` ([`restart_only_changes`]): what a reload
/// applies.
pub fn keep_restart_only(running: &Config, mut new: Config) -> Config {
    new.grpc_addr = running.grpc_addr.clone();
    new.ops_addr = running.ops_addr;
    new.drain_timeout = running.drain_timeout;
    new.shutdown_delay = running.shutdown_delay;
    new.reflection = running.reflection;
    new.api_key_exchange = running.api_key_exchange.clone();
    new.log = running.log.clone();
    new.jwt.source = running.jwt.source.clone();
    new.jwt.refresh_interval = running.jwt.refresh_interval;
    new.jwt.refresh_cooldown = running.jwt.refresh_cooldown;
    new.jwt.fetch_timeout = running.jwt.fetch_timeout;
    new.api_keys = running.api_keys.clone();
    let tuples = new.openfga.take().map(|f| f.contextual_tuples);
    new.openfga = running.openfga.clone().map(|mut f| {
        if let Some(t) = tuples {
            f.contextual_tuples = t;
        }
        f
    });
    new.cache.enabled = running.cache.enabled;
    new.cache.max_entries = running.cache.max_entries;
    new
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn config(yaml: &str) -> Config {
        Config::from_yaml(yaml, Path::new("/"), &BTreeMap::new()).unwrap()
    }

    const BASE: &str =
        "jwt: { jwks_file: k.json, issuer: a }\nroutes: { rules: [ { path: /x } ] }\n";

    #[test]
    fn routes_and_jwt_settings_reload_without_a_restart() {
        let new = config(
            "jwt: { jwks_file: k.json, issuer: b, leeway: 5s }\nroutes: { dry_run: true, rules: [ { path: /y, public: true }, { path: /z, mode: shadow } ] }\ncors: { allowed_origins: [\"https://a.example\"] }\n",
        );
        assert!(restart_only_changes(&config(BASE), &new).is_empty());
        // The dry run and shadow rules are route settings: a reload turns them on and off.
        assert!(keep_restart_only(&config(BASE), new).routes.dry_run);
    }

    #[test]
    fn listeners_key_source_store_and_cache_size_are_named_as_restart_only() {
        let running = config(&format!(
            "{BASE}openfga: {{ api_url: \"http://a:8080\", store_id: s1 }}\n"
        ));
        let new = config(
            "server: { grpc_addr: \"127.0.0.1:1\" }\njwt: { jwks_url: \"http://k/jwks\", issuer: a }\nroutes: { rules: [ { path: /x } ] }\nopenfga: { api_url: \"http://a:8080\", store_id: s2 }\ncache: { allowed_ttl: 5s, max_entries: 7 }\n",
        );
        assert_eq!(
            restart_only_changes(&running, &new),
            [
                "server.grpc_addr",
                "jwt.jwks_url",
                "openfga.store_id",
                "cache.max_entries"
            ]
        );
        let applied = keep_restart_only(&running, new);
        assert!(restart_only_changes(&running, &applied).is_empty());
        assert_eq!(applied.jwt.issuer.as_deref(), Some("a"));
        // The cache's TTLs reload (State::apply sets them on the cache).
        assert_eq!(applied.cache.allowed_ttl, Duration::from_secs(5));
    }

    #[test]
    fn contextual_tuples_reload_with_the_connection_kept() {
        let fga = "openfga: { api_url: \"http://a:8080\", store_id: s1";
        let running = config(&format!("{BASE}{fga} }}\n"));
        let new = config(&format!(
            "{BASE}{fga}, contextual_tuples: [ {{ from: roles, relation: member, object: \"role:{{value}}\" }} ] }}\n"
        ));
        assert!(restart_only_changes(&running, &new).is_empty());
        let applied = keep_restart_only(&running, new);
        assert_eq!(applied.openfga.unwrap().contextual_tuples.len(), 1);
    }

    #[test]
    fn the_hash_is_of_the_bytes_and_short() {
        let h = ContentHash::of(b"routes: {}\n");
        assert_eq!(h, ContentHash::of(b"routes: {}\n"));
        assert_ne!(h, ContentHash::of(b"routes: {} \n"));
        assert_eq!(h.to_string().len(), "sha256:".len() + 12);
    }
}
