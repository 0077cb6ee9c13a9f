//! Typed configuration: the YAML file, the environment variables that override it, and the
//! validation that turns both into a [`Config`] or one error naming the offending key.
//!
//! Every default is written here once (see the `default_*` functions) and documented in the
//! README's reference table. An empty environment variable counts as unset, so a Helm chart
//! that renders `KEYCLOAK_URL: ""` does not silently switch the key source.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A configuration problem, always naming the key (or variable) and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Where the gRPC server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl ListenAddr {
    pub fn parse(key: &str, raw: &str) -> Result<Self, ConfigError> {
        if let Some(path) = raw.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ConfigError::invalid(key, "unix: needs a socket path"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        raw.parse().map(Self::Tcp).map_err(|_| {
            ConfigError::invalid(
                key,
                format!("{raw:?} is not an address (want HOST:PORT or unix:/path)"),
            )
        })
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The file as written by operators. Everything optional here; `Config::resolve` applies
// defaults and the environment, then validates.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub jwt: RawJwt,
    #[serde(default)]
    pub api_keys: RawApiKeys,
    #[serde(default)]
    pub principals: RawPrincipals,
    #[serde(default)]
    pub cors: RawCors,
    #[serde(default)]
    pub routes: RawRoutes,
    #[serde(default)]
    pub openfga: Option<RawOpenFga>,
    #[serde(default)]
    pub cache: RawCache,
    #[serde(default)]
    pub request: RawRequest,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub grpc_addr: Option<String>,
    pub ops_addr: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub shutdown_delay: Option<Duration>,
    /// gRPC server reflection (grpcurl without proto files); off by default.
    pub reflection: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub reload_interval: Option<Duration>,
    /// The admin endpoints on the ops listener (`/admin/...`).
    #[serde(default)]
    pub admin: RawAdmin,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub enabled: Option<bool>,
    /// Answer peers that are not this host's loopback (`127.0.0.1`, `::1`).
    pub allow_remote: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    pub format: Option<String>,
    /// Which decisions get a log line: `all`, `deny` or `none`.
    pub decisions: Option<String>,
    /// The fraction of allows logged (0..1); denies are always logged unless `none`.
    pub allow_sample: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    pub jwks_url: Option<String>,
    pub keycloak_url: Option<String>,
    pub keycloak_realm: Option<String>,
    pub jwks_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub client_id: Option<String>,
    pub realm: Option<String>,
    pub algorithms: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    pub leeway: Option<Duration>,
    pub required_claims: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    pub refresh_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub refresh_cooldown: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub fetch_timeout: Option<Duration>,
    pub token_cache_size: Option<usize>,
    /// Keycloak's `typ` claim a token must carry when it has one (`Bearer`); `off` to skip.
    pub require_typ: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiKeys {
    pub file: Option<PathBuf>,
    pub header: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub reload_interval: Option<Duration>,
    /// Let the API key through to the app (default: removed on every allow).
    pub forward_to_app: Option<bool>,
    /// bcrypt verifications running at once, across all requests.
    pub bcrypt_concurrency: Option<usize>,
    /// The app's `API_KEY_CACHE_SECRET`: the HMAC key of `lookup: hmac-sha256:` records.
    pub lookup_secret: Option<String>,
    /// The app's key service (`POST .../api-keys/validate`), asked about keys the file
    /// does not hold.
    pub exchange_url: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub exchange_timeout: Option<Duration>,
    /// An exchanged token is remembered until its `exp`, and never longer than this.
    #[serde(default, with = "humantime_serde")]
    pub exchange_cache_ttl: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrincipals {
    #[serde(default)]
    pub require_listed: bool,
    #[serde(default)]
    pub service_principals: Vec<ServicePrincipalConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServicePrincipalConfig {
    pub id: String,
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default)]
    pub scopes: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCors {
    pub allowed_origins: Option<Vec<String>>,
    pub allowed_methods: Option<Vec<String>>,
    pub allowed_headers: Option<Vec<String>>,
    pub max_age: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoutes {
    pub unmatched: Option<Unmatched>,
    /// Rollout: every 401/403 policy deny is answered as an allow and logged as
    /// `would_deny` (see `routes.dry_run` in the README).
    pub dry_run: Option<bool>,
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

/// What happens to a request that no rule matches.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Unmatched {
    /// 403 "no route rule matches" (the default: fail closed).
    #[default]
    Deny,
    /// Any authenticated principal may pass.
    Authenticated,
    /// Pass without credentials (only for migrations; logged at startup).
    Allow,
}

/// One route rule as written in the file; compiled by `authz::rules`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: Option<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    pub path: String,
    #[serde(default)]
    pub methods: Vec<String>,
    /// Extra predicates: `"body:/method == tools/call"`, `"header:x-tenant exists"`.
    #[serde(default)]
    pub when: Vec<String>,
    #[serde(default)]
    pub public: bool,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub roles_match: Match,
    #[serde(default)]
    pub scopes: Vec<String>,
    pub check: Option<CheckConfig>,
    /// `enforce` (the default) or `shadow`: evaluated and logged, never deciding.
    #[serde(default)]
    pub mode: RuleMode,
}

/// Whether a rule decides (`enforce`) or is only tried on live traffic (`shadow`): a shadow
/// rule is evaluated fully on every request it matches and its outcome logged and counted,
/// but routing for the answer ignores it, so it can never change what a request gets.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RuleMode {
    #[default]
    Enforce,
    Shadow,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Match {
    #[default]
    Any,
    All,
}

/// The relationship checks a rule requires (OpenFGA).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    #[serde(default)]
    pub all: Vec<RelationCheckConfig>,
    #[serde(default)]
    pub any: Vec<RelationCheckConfig>,
    pub consistency: Option<Consistency>,
    #[serde(default)]
    pub on_backend_error: OnBackendError,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelationCheckConfig {
    pub relation: String,
    pub object: String,
    /// Subject template; defaults to the principal's subject (`user:{username}`,
    /// `service_principal:{id}`).
    pub user: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Consistency {
    #[default]
    MinimizeLatency,
    HigherConsistency,
}

impl Consistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MinimizeLatency => "MINIMIZE_LATENCY",
            Self::HigherConsistency => "HIGHER_CONSISTENCY",
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnBackendError {
    #[default]
    Deny,
    Allow,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOpenFga {
    pub api_url: Option<String>,
    pub store_id: Option<String>,
    pub store_name: Option<String>,
    pub model_id: Option<String>,
    pub api_token: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    pub consistency: Option<Consistency>,
    pub max_batch_size: Option<usize>,
    /// Single-check requests in flight before new checks wait and go out together as one
    /// batch-check when one returns; 0: never wait.
    pub max_in_flight: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub changelog_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub changelog_lookback: Option<Duration>,
    /// Contextual tuples built from token claims, e.g.
    /// `{from: roles, tuple: "{subject} assignee role:{value}"}`.
    #[serde(default)]
    pub contextual_tuples: Vec<ContextualTupleConfig>,
    pub breaker_failures: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub breaker_open_for: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextualTupleConfig {
    /// `roles` or `groups`.
    pub from: ClaimSet,
    /// `relation` and `object` template, `{value}` standing for each role or group
    /// (groups lose their leading `/`).
    pub relation: String,
    pub object: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClaimSet {
    Roles,
    Groups,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub enabled: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub allowed_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub denied_ttl: Option<Duration>,
    pub max_entries: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRequest {
    pub path_policy: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The resolved configuration the server runs on.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Config {
    pub grpc_addr: ListenAddr,
    pub ops_addr: Option<SocketAddr>,
    pub drain_timeout: Duration,
    /// After SIGTERM: health NOT_SERVING while checks are still answered, so Envoy and the
    /// endpoints controller stop sending before the listener closes.
    pub shutdown_delay: Duration,
    /// gRPC server reflection (`server.reflection`).
    pub reflection: bool,
    /// How often the config file's content hash is compared with the running one (a change
    /// reloads); zero: the file is not watched, SIGHUP still reloads.
    pub reload_interval: Duration,
    /// The admin endpoints on the ops listener (`server.admin`).
    pub admin: AdminConfig,
    pub log: LogConfig,
    /// OpenTelemetry trace export; `None`: no exporter at all.
    pub tracing: Option<TracingConfig>,
    pub jwt: JwtConfig,
    pub api_keys: Option<ApiKeysConfig>,
    /// The app's key service, the second API-key source (after the file).
    pub api_key_exchange: Option<ApiKeyExchangeConfig>,
    pub api_key_header: ApiKeyHeaderConfig,
    pub principals: PrincipalsConfig,
    pub cors: CorsConfig,
    pub routes: RoutesConfig,
    pub openfga: Option<OpenFgaConfig>,
    pub cache: CacheConfig,
    pub request: RequestConfig,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A tracing `EnvFilter` directive (`info`, `debug`, `authz_sidecar=debug`).
    pub filter: String,
    /// JSON lines; when neither `LOG_FORMAT` nor `log.format` says, JSON unless stdout is a
    /// terminal (a collector reads JSON, a person reads text).
    pub json: bool,
    /// Which decisions get a log line (`log.decisions`).
    pub decisions: DecisionLogMode,
    /// The fraction of allows logged, `0.0..=1.0` (`log.allow_sample`).
    pub allow_sample: f64,
}

/// `log.decisions`: which checks get a decision line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecisionLogMode {
    /// Every deny, and the sampled fraction of allows.
    #[default]
    All,
    /// Denies only.
    Deny,
    /// No decision lines (metrics still count every check).
    None,
}

impl DecisionLogMode {
    pub const NAMES: &'static str = "all, deny or none";

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "all" => Some(Self::All),
            "deny" => Some(Self::Deny),
            "none" => Some(Self::None),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Deny => "deny",
            Self::None => "none",
        }
    }
}

/// `server.admin`: the operator endpoints on the ops listener. The listener itself must stay
/// reachable for probes and Prometheus, so the admin routes check the peer themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminConfig {
    pub enabled: bool,
    /// Answer peers other than this host's loopback (`127.0.0.1`, `::1`).
    pub allow_remote: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            allow_remote: false,
        }
    }
}

/// Where signing keys come from, in precedence order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySourceConfig {
    /// `AUTH_PUBLIC_KEY_URL` / `jwt.jwks_url`.
    JwksUrl(String),
    /// `KEYCLOAK_URL` + `KEYCLOAK_REALM`: OIDC discovery of issuer and JWKS.
    Discovery { base_url: String, realm: String },
    /// `jwt.jwks_file`: a local JWKS document.
    File(PathBuf),
    /// No JWT authentication configured (API keys only).
    None,
}

impl KeySourceConfig {
    pub fn describe(&self) -> String {
        match self {
            Self::JwksUrl(u) => format!("JWKS {u}"),
            Self::Discovery { base_url, realm } => {
                format!("OIDC discovery {}", discovery_url(base_url, realm))
            }
            Self::File(p) => format!("JWKS file {}", p.display()),
            Self::None => "none".into(),
        }
    }
}

pub fn discovery_url(base_url: &str, realm: &str) -> String {
    format!(
        "{}/realms/{realm}/.well-known/openid-configuration",
        base_url.trim_end_matches('/')
    )
}

#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub source: KeySourceConfig,
    /// Where the key source came from: a variable (`KEYCLOAK_URL`) or a file key (`jwt.jwks_file`).
    pub source_from: &'static str,
    pub issuer: Option<String>,
    /// Where `issuer` came from (`JWT_ISSUER` or `jwt.issuer`); `None` when unset.
    pub issuer_from: Option<&'static str>,
    pub audience: Option<String>,
    /// Where `audience` came from (`JWT_AUDIENCE` or `jwt.audience`); `None` when unset.
    pub audience_from: Option<&'static str>,
    pub client_id: Option<String>,
    /// `realm` in `WWW-Authenticate: Bearer realm=".."`.
    pub realm: String,
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub leeway: Duration,
    pub required_claims: Vec<String>,
    pub refresh_interval: Duration,
    pub refresh_cooldown: Duration,
    pub fetch_timeout: Duration,
    pub token_cache_size: usize,
    /// Keycloak's `typ` claim, when present, must equal this (`Bearer`: access tokens, not
    /// ID or refresh tokens). None: not checked.
    pub require_typ: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ApiKeysConfig {
    pub file: PathBuf,
    pub reload_interval: Duration,
    /// At most this many bcrypt verifications run at once (they cost ~0.1-0.3 s of CPU each).
    pub bcrypt_concurrency: usize,
    /// HMAC key for `lookup: hmac-sha256:<hex>` records (the app's `API_KEY_CACHE_SECRET`).
    pub lookup_secret: Option<String>,
}

/// The app's key service: `POST <url>` with `X-API-Key` answers `{access_token, expires_in}`
/// (400: no key; 401: invalid or expired key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyExchangeConfig {
    /// The endpoint itself, e.g. `http://app:8000/api/v1/api-keys/validate`.
    pub url: String,
    pub timeout: Duration,
    /// Upper bound on how long an exchanged token is reused (it never outlives its `exp`):
    /// a key the service stops accepting keeps working at most this long.
    pub cache_ttl: Duration,
}

/// The header that carries API keys, and whether the app gets to see it. Resolved whether or
/// not an API keys file is configured: a key the sidecar does not check must still not reach
/// the app unless the operator says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyHeaderConfig {
    /// Lower-case header name (`x-api-key`).
    pub name: String,
    pub forward_to_app: bool,
}

#[derive(Debug, Clone, Default)]
pub struct PrincipalsConfig {
    pub require_listed: bool,
    pub service_principals: Vec<ServicePrincipalConfig>,
}

#[derive(Debug, Clone, Default)]
pub struct CorsConfig {
    pub allowed_origins: Vec<String>,
    pub allowed_methods: Vec<String>,
    pub allowed_headers: Vec<String>,
    pub max_age: u64,
}

#[derive(Debug, Clone, Default)]
pub struct RoutesConfig {
    pub unmatched: Unmatched,
    pub rules: Vec<RuleConfig>,
    /// `routes.dry_run`: 401/403 policy denies answered as allows, logged as `would_deny`.
    pub dry_run: bool,
}

#[derive(Debug, Clone)]
pub enum StoreRef {
    Id(String),
    Name(String),
}

#[derive(Debug, Clone)]
pub struct OpenFgaConfig {
    pub api_url: String,
    pub store: StoreRef,
    pub model_id: Option<String>,
    pub api_token: Option<String>,
    pub timeout: Duration,
    pub consistency: Consistency,
    pub max_batch_size: usize,
    /// Single-check requests in flight before new checks are coalesced; 0: never.
    pub max_in_flight: usize,
    pub changelog_interval: Duration,
    /// How far before startup the changelog watcher starts reading (the clock skew it
    /// tolerates between the sidecar and OpenFGA).
    pub changelog_lookback: Duration,
    pub contextual_tuples: Vec<ContextualTupleConfig>,
    pub breaker_failures: u32,
    pub breaker_open_for: Duration,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub enabled: bool,
    pub allowed_ttl: Duration,
    pub denied_ttl: Duration,
    pub max_entries: usize,
}

/// How the request is read (`request:`).
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestConfig {
    pub path_policy: PathPolicy,
}

/// Which paths are decided on and which are refused (`request.path_policy`). Either way the
/// sidecar decides on the path the app receives (see `crate::request::read_path`); the policies
/// differ only in what an encoded slash is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PathPolicy {
    /// Refuse every path an app could read differently, `%2F` and `%5C` included.
    #[default]
    Strict,
    /// As strict, but `%2F` and `%5C` are data inside one segment: kept encoded in the decided
    /// path, never decoded. Only for apps that route on the raw path and never decode them
    /// (not uvicorn/Starlette, which decode `%2F` into `/`).
    OpaqueEncodedSlashes,
}

impl PathPolicy {
    pub const NAMES: &'static str = "strict or opaque_encoded_slashes";

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "strict" => Some(Self::Strict),
            "opaque_encoded_slashes" => Some(Self::OpaqueEncodedSlashes),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::OpaqueEncodedSlashes => "opaque_encoded_slashes",
        }
    }
}

fn default_true() -> bool {
    true
}
pub const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:9191";
pub const DEFAULT_OPS_ADDR: &str = "0.0.0.0:9092";
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
pub const DEFAULT_SHUTDOWN_DELAY: Duration = Duration::from_secs(5);
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(300);
pub const DEFAULT_REFRESH_COOLDOWN: Duration = Duration::from_secs(10);
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_TOKEN_CACHE_SIZE: usize = 10_000;
pub const DEFAULT_API_KEY_HEADER: &str = "x-api-key";
pub const DEFAULT_API_KEYS_RELOAD: Duration = Duration::from_secs(2);
pub const DEFAULT_BCRYPT_CONCURRENCY: usize = 2;
/// The gateway plugin the exchange replaces waits 5 s for the key service ...
pub const DEFAULT_API_KEY_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// ... and reuses a token 300 s.
pub const DEFAULT_API_KEY_EXCHANGE_CACHE_TTL: Duration = Duration::from_secs(300);
pub const DEFAULT_REQUIRE_TYP: &str = "Bearer";
pub const DEFAULT_REALM: &str = "authz-sidecar";
pub const DEFAULT_OPENFGA_TIMEOUT: Duration = Duration::from_millis(500);
pub const DEFAULT_OPENFGA_BATCH: usize = 50;
/// A /batch-check of 8 costs OpenFGA ~0.4x the CPU per check of 8 /check calls
/// (BENCHMARKS.md, "OpenFGA miss path (session 4)"). With 2, one slow request does not hold
/// every other check back, and checks beyond two requests share one.
pub const DEFAULT_OPENFGA_MAX_IN_FLIGHT: usize = 2;
pub const DEFAULT_CHANGELOG_INTERVAL: Duration = Duration::from_secs(1);
/// Five minutes: far beyond the clock skew of NTP-synced hosts, and a few pages of changes.
pub const DEFAULT_CHANGELOG_LOOKBACK: Duration = Duration::from_secs(300);
pub const DEFAULT_BREAKER_FAILURES: u32 = 5;
pub const DEFAULT_BREAKER_OPEN_FOR: Duration = Duration::from_secs(5);
pub const DEFAULT_ALLOWED_TTL: Duration = Duration::from_secs(60);
pub const DEFAULT_DENIED_TTL: Duration = Duration::from_secs(10);
pub const DEFAULT_CACHE_ENTRIES: usize = 100_000;

/// Reads the environment. A trait so tests resolve configs against a map, not the process.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment; an empty value counts as unset.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }
}

impl Env for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        BTreeMap::get(self, name)
            .cloned()
            .filter(|v| !v.trim().is_empty())
    }
}

/// First set variable of `names`, with the name it came from.
fn env_any(env: &dyn Env, names: &[&'static str]) -> Option<(&'static str, String)> {
    names
        .iter()
        .find_map(|n| env.get(n).map(|v| (*n, v.trim().to_string())))
}

fn split_list(raw: &str) -> Vec<String> {
    raw.split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn check_http_url(key: &str, url: &str) -> Result<String, ConfigError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| ConfigError::invalid(key, format!("{url:?} is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ConfigError::invalid(
            key,
            format!("{url:?} must be an http:// or https:// URL"),
        ));
    }
    Ok(url.trim_end_matches('/').to_string())
}

impl Config {
    /// Loads the file at `path` and resolves it against the process environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_env(path, &ProcessEnv)
    }

    pub fn load_with_env(path: &Path, env: &dyn Env) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_file_text(path, &text, env)
    }

    /// The file at `path` whose content is `text` (already read, so a reload decides on and
    /// hashes the same bytes): relative paths resolve against its directory, parse errors
    /// name it.
    pub fn from_file_text(path: &Path, text: &str, env: &dyn Env) -> Result<Self, ConfigError> {
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Self::from_yaml(text, base, env).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parses YAML text; relative paths in it resolve against `base_dir`.
    pub fn from_yaml(text: &str, base_dir: &Path, env: &dyn Env) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<inline>"),
            message: e.to_string(),
        })?;
        Self::resolve(raw, base_dir, env)
    }

    pub fn resolve(raw: RawConfig, base_dir: &Path, env: &dyn Env) -> Result<Self, ConfigError> {
        let rel = |p: PathBuf| if p.is_absolute() { p } else { base_dir.join(p) };

        // server
        let grpc_raw = env_any(env, &["AUTHZ_GRPC_ADDR"])
            .map(|(_, v)| v)
            .or(raw.server.grpc_addr)
            .unwrap_or_else(|| DEFAULT_GRPC_ADDR.into());
        let grpc_addr = ListenAddr::parse("server.grpc_addr (AUTHZ_GRPC_ADDR)", &grpc_raw)?;
        let ops_raw = env_any(env, &["AUTHZ_OPS_ADDR"])
            .map(|(_, v)| v)
            .or(raw.server.ops_addr)
            .unwrap_or_else(|| DEFAULT_OPS_ADDR.into());
        let shutdown_delay = match env_any(env, &["AUTHZ_SHUTDOWN_DELAY"]) {
            Some((name, v)) => humantime::parse_duration(v.trim()).map_err(|e| {
                ConfigError::invalid(
                    format!("server.shutdown_delay ({name})"),
                    format!("{v:?} is not a duration such as 5s: {e}"),
                )
            })?,
            None => raw.server.shutdown_delay.unwrap_or(DEFAULT_SHUTDOWN_DELAY),
        };
        let reload_interval = match env_any(env, &["AUTHZ_RELOAD_INTERVAL"]) {
            Some((name, v)) => humantime::parse_duration(v.trim()).map_err(|e| {
                ConfigError::invalid(
                    format!("server.reload_interval ({name})"),
                    format!("{v:?} is not a duration such as 2s (0s: do not watch the file): {e}"),
                )
            })?,
            None => raw
                .server
                .reload_interval
                .unwrap_or(DEFAULT_RELOAD_INTERVAL),
        };
        let ops_addr = if ops_raw == "off" {
            None
        } else {
            Some(ops_raw.parse().map_err(|_| {
                ConfigError::invalid(
                    "server.ops_addr (AUTHZ_OPS_ADDR)",
                    format!("{ops_raw:?} is not HOST:PORT (or \"off\")"),
                )
            })?)
        };

        // log
        let level = env_any(env, &["LOG_LEVEL"])
            .map(|(_, v)| v.to_ascii_lowercase())
            .or(raw.log.level)
            .unwrap_or_else(|| "info".into());
        // RUST_LOG carries full directives and wins over the plain level.
        let filter = env_any(env, &["RUST_LOG"]).map(|(_, v)| v).unwrap_or(level);
        tracing_subscriber::EnvFilter::try_new(&filter).map_err(|e| {
            ConfigError::invalid(
                "log.level (LOG_LEVEL / RUST_LOG)",
                format!("{filter:?}: {e}"),
            )
        })?;
        let format = env_any(env, &["LOG_FORMAT"])
            .map(|(_, v)| v)
            .or(raw.log.format);
        let json = match format.as_deref() {
            // Unset: JSON for a collector, text for a person at a terminal.
            None => !std::io::IsTerminal::is_terminal(&std::io::stdout()),
            Some("json") => true,
            Some("text") => false,
            Some(other) => {
                return Err(ConfigError::invalid(
                    "log.format (LOG_FORMAT)",
                    format!("{other:?}: want text or json"),
                ));
            }
        };
        let decisions = match env_any(env, &["LOG_DECISIONS"])
            .map(|(_, v)| v)
            .or(raw.log.decisions)
        {
            None => DecisionLogMode::default(),
            Some(name) => DecisionLogMode::parse(name.trim()).ok_or_else(|| {
                ConfigError::invalid(
                    "log.decisions (LOG_DECISIONS)",
                    format!("{name:?}: want {}", DecisionLogMode::NAMES),
                )
            })?,
        };
        let allow_sample = match env_any(env, &["LOG_ALLOW_SAMPLE"]) {
            Some((_, v)) => v.parse::<f64>().map_err(|_| {
                ConfigError::invalid(
                    "log.allow_sample (LOG_ALLOW_SAMPLE)",
                    format!("{v:?} is not a number from 0 to 1"),
                )
            })?,
            None => raw.log.allow_sample.unwrap_or(1.0),
        };
        if !(0.0..=1.0).contains(&allow_sample) {
            return Err(ConfigError::invalid(
                "log.allow_sample (LOG_ALLOW_SAMPLE)",
                format!("{allow_sample} is not a fraction from 0 to 1 (1: every allow, 0: none)"),
            ));
        }

        let jwt = resolve_jwt(raw.jwt, env, &rel)?;

        // api keys
        let header = raw
            .api_keys
            .header
            .unwrap_or_else(|| DEFAULT_API_KEY_HEADER.into())
            .to_ascii_lowercase();
        if header.is_empty()
            || header == "authorization"
            || header.starts_with(':')
            || !header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ConfigError::invalid(
                "api_keys.header",
                format!(
                    "{header:?}: must name a header (letters, digits, -) other than authorization"
                ),
            ));
        }
        let api_key_header = ApiKeyHeaderConfig {
            name: header,
            forward_to_app: raw.api_keys.forward_to_app.unwrap_or(false),
        };
        let api_key_file = env_any(env, &["API_KEYS_FILE"])
            .map(|(_, v)| PathBuf::from(v))
            .or(raw.api_keys.file.map(&rel));
        let bcrypt_concurrency = raw
            .api_keys
            .bcrypt_concurrency
            .unwrap_or(DEFAULT_BCRYPT_CONCURRENCY);
        if bcrypt_concurrency == 0 {
            return Err(ConfigError::invalid(
                "api_keys.bcrypt_concurrency",
                "must be at least 1",
            ));
        }
        let lookup_secret = env_any(env, &["API_KEY_CACHE_SECRET"])
            .map(|(_, v)| v)
            .or(raw.api_keys.lookup_secret);
        const EXCHANGE_URL: &str = "API_KEY_EXCHANGE_URL (api_keys.exchange_url)";
        let api_key_exchange = match env_any(env, &["API_KEY_EXCHANGE_URL"])
            .map(|(_, v)| v)
            .or(raw.api_keys.exchange_url)
        {
            None => {
                for (set, key) in [
                    (
                        raw.api_keys.exchange_timeout.is_some(),
                        "api_keys.exchange_timeout",
                    ),
                    (
                        raw.api_keys.exchange_cache_ttl.is_some(),
                        "api_keys.exchange_cache_ttl",
                    ),
                ] {
                    if set {
                        return Err(ConfigError::invalid(
                            key,
                            "only applies with api_keys.exchange_url (API_KEY_EXCHANGE_URL)",
                        ));
                    }
                }
                None
            }
            Some(url) => {
                let url = check_http_url(EXCHANGE_URL, &url)?;
                // Exchanged tokens are verified like any bearer token.
                if matches!(jwt.source, KeySourceConfig::None) {
                    return Err(ConfigError::invalid(
                        EXCHANGE_URL,
                        "the key service's tokens are verified like any bearer token: configure a JWT key source (jwt.jwks_file, AUTH_PUBLIC_KEY_URL or KEYCLOAK_URL + KEYCLOAK_REALM)",
                    ));
                }
                let timeout = raw
                    .api_keys
                    .exchange_timeout
                    .unwrap_or(DEFAULT_API_KEY_EXCHANGE_TIMEOUT);
                if timeout.is_zero() {
                    return Err(ConfigError::invalid(
                        "api_keys.exchange_timeout",
                        "must be more than 0s",
                    ));
                }
                Some(ApiKeyExchangeConfig {
                    url,
                    timeout,
                    cache_ttl: raw
                        .api_keys
                        .exchange_cache_ttl
                        .unwrap_or(DEFAULT_API_KEY_EXCHANGE_CACHE_TTL),
                })
            }
        };
        let api_keys = api_key_file.map(|file| ApiKeysConfig {
            file,
            reload_interval: raw
                .api_keys
                .reload_interval
                .unwrap_or(DEFAULT_API_KEYS_RELOAD),
            bcrypt_concurrency,
            lookup_secret,
        });

        // principals
        let mut seen = std::collections::HashSet::new();
        for (i, sp) in raw.principals.service_principals.iter().enumerate() {
            if sp.id.trim().is_empty() {
                return Err(ConfigError::invalid(
                    format!("principals.service_principals[{i}].id"),
                    "must not be empty",
                ));
            }
            if !seen.insert(sp.id.clone()) {
                return Err(ConfigError::invalid(
                    format!("principals.service_principals[{i}].id"),
                    format!("{:?} is listed twice", sp.id),
                ));
            }
        }
        let principals = PrincipalsConfig {
            require_listed: raw.principals.require_listed,
            service_principals: raw.principals.service_principals,
        };

        // cors
        let origins = env_any(env, &["CORS_ORIGINS", "CORS_ALLOWED_ORIGINS"])
            .map(|(n, v)| (n.to_string(), split_list(&v)))
            .or_else(|| {
                raw.cors
                    .allowed_origins
                    .map(|o| ("cors.allowed_origins".to_string(), o))
            });
        let (origins_key, allowed_origins) = origins.unwrap_or_default();
        for o in &allowed_origins {
            if o == "*" {
                return Err(ConfigError::invalid(
                    origins_key,
                    "\"*\" is refused: list the exact origins (credentials cannot be shared with any origin)",
                ));
            }
            let url = reqwest::Url::parse(o).map_err(|_| {
                ConfigError::invalid(
                    &origins_key,
                    format!("{o:?} is not an origin like https://app.example.com"),
                )
            })?;
            if url.path() != "/" || o.ends_with('/') {
                return Err(ConfigError::invalid(
                    &origins_key,
                    format!("{o:?}: an origin has no path or trailing slash"),
                ));
            }
        }
        let cors = CorsConfig {
            allowed_origins,
            allowed_methods: raw.cors.allowed_methods.unwrap_or_else(|| {
                ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
                    .map(String::from)
                    .to_vec()
            }),
            allowed_headers: raw.cors.allowed_headers.unwrap_or_else(|| {
                ["authorization", "content-type", "x-api-key", "x-request-id"]
                    .map(String::from)
                    .to_vec()
            }),
            max_age: raw.cors.max_age.unwrap_or(600),
        };

        let routes = RoutesConfig {
            unmatched: raw.routes.unmatched.unwrap_or_default(),
            rules: raw.routes.rules,
            dry_run: raw.routes.dry_run.unwrap_or(false),
        };

        let openfga = resolve_openfga(raw.openfga, env)?;
        let cache = CacheConfig {
            enabled: raw.cache.enabled.unwrap_or(true),
            allowed_ttl: raw.cache.allowed_ttl.unwrap_or(DEFAULT_ALLOWED_TTL),
            denied_ttl: raw.cache.denied_ttl.unwrap_or(DEFAULT_DENIED_TTL),
            max_entries: raw.cache.max_entries.unwrap_or(DEFAULT_CACHE_ENTRIES),
        };
        if cache.max_entries == 0 {
            return Err(ConfigError::invalid(
                "cache.max_entries",
                "must be at least 1 (set cache.enabled: false to turn the cache off)",
            ));
        }

        let path_policy = match raw.request.path_policy.as_deref() {
            None => PathPolicy::default(),
            Some(name) => PathPolicy::parse(name).ok_or_else(|| {
                ConfigError::invalid(
                    "request.path_policy",
                    format!("{name:?}: want {}", PathPolicy::NAMES),
                )
            })?,
        };
        let request = RequestConfig { path_policy };

        if matches!(jwt.source, KeySourceConfig::None)
            && api_keys.is_none()
            && api_key_exchange.is_none()
        {
            let every_rule_public = routes.rules.iter().all(|r| r.public);
            if !every_rule_public || routes.unmatched == Unmatched::Authenticated {
                return Err(ConfigError::invalid(
                    "jwt",
                    "no credential source: set jwt.jwks_file, AUTH_PUBLIC_KEY_URL, KEYCLOAK_URL + KEYCLOAK_REALM, or API_KEYS_FILE",
                ));
            }
        }

        let config = Config {
            grpc_addr,
            ops_addr,
            drain_timeout: raw.server.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT),
            shutdown_delay,
            reflection: raw.server.reflection.unwrap_or(false),
            reload_interval,
            admin: AdminConfig {
                enabled: raw.server.admin.enabled.unwrap_or(true),
                allow_remote: raw.server.admin.allow_remote.unwrap_or(false),
            },
            log: LogConfig {
                filter,
                json,
                decisions,
                allow_sample,
            },
            tracing: resolve_tracing(env)?,
            jwt,
            api_keys,
            api_key_exchange,
            api_key_header,
            principals,
            cors,
            routes,
            openfga,
            cache,
            request,
        };
        // Plain data: the rules are compiled (and a bad rule named) by
        // `RuleSet::from_config`, the one place every command compiles them.
        Ok(config)
    }
}

fn resolve_jwt(
    raw: RawJwt,
    env: &dyn Env,
    rel: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<JwtConfig, ConfigError> {
    // The file's own key source, if it names one: a variable that replaces it replaces the
    // file's issuer and realm too (they belong to that source), unless JWT_ISSUER says.
    let file_source =
        raw.jwks_url.is_some() || raw.keycloak_url.is_some() || raw.jwks_file.is_some();
    let jwks_url =
        env_any(env, &["AUTH_PUBLIC_KEY_URL"]).or(raw.jwks_url.map(|v| ("jwt.jwks_url", v)));
    let kc_url = env_any(env, &["KEYCLOAK_URL", "KEYCLOAK_SERVER_URL"])
        .or(raw.keycloak_url.map(|v| ("jwt.keycloak_url", v)));
    let kc_realm = env_any(env, &["KEYCLOAK_REALM"])
        .map(|(_, v)| v)
        .or(raw.keycloak_realm);

    let (source, source_from) = if let Some((key, url)) = jwks_url {
        (KeySourceConfig::JwksUrl(check_http_url(key, &url)?), key)
    } else if let Some((key, url)) = kc_url {
        let base_url = check_http_url(key, &url)?;
        let realm = kc_realm.ok_or_else(|| {
            ConfigError::invalid(
                "KEYCLOAK_REALM (jwt.keycloak_realm)",
                format!("{key} is set, so the realm is needed for OIDC discovery"),
            )
        })?;
        (KeySourceConfig::Discovery { base_url, realm }, key)
    } else if let Some(file) = raw.jwks_file {
        (KeySourceConfig::File(rel(file)), "jwt.jwks_file")
    } else {
        (KeySourceConfig::None, "none")
    };
    let source_replaced = file_source && !source_from.starts_with("jwt.");

    let (issuer, issuer_from) = match env_any(env, &["JWT_ISSUER"]) {
        Some((name, v)) => (Some(v), Some(name)),
        // The file's issuer named the file's key source, which a variable replaced: with
        // discovery the realm's own issuer applies, else none (warned at startup).
        None if source_replaced => (None, None),
        None => match raw.issuer {
            Some(v) => (Some(v), Some("jwt.issuer")),
            None => (None, None),
        },
    };
    let (audience, audience_from) = match env_any(env, &["JWT_AUDIENCE"]) {
        Some((name, v)) => (Some(v), Some(name)),
        None => match raw.audience {
            Some(v) => (Some(v), Some("jwt.audience")),
            None => (None, None),
        },
    };

    let names = raw.algorithms.unwrap_or_else(|| vec!["RS256".into()]);
    if names.is_empty() {
        return Err(ConfigError::invalid(
            "jwt.algorithms",
            "must list at least one algorithm",
        ));
    }
    let mut algorithms = Vec::new();
    for name in &names {
        algorithms.push(parse_algorithm(name)?);
    }

    let required_claims = raw.required_claims.unwrap_or_else(|| vec!["sub".into()]);
    // The challenge's realm names the key source's realm: the file's, unless a variable
    // replaced the file's key source with a Keycloak realm.
    let discovered_realm = match &source {
        KeySourceConfig::Discovery { realm, .. } => Some(realm.clone()),
        _ => None,
    };
    let realm = if source_replaced && discovered_realm.is_some() {
        discovered_realm
    } else {
        raw.realm.or(discovered_realm)
    }
    .unwrap_or_else(|| DEFAULT_REALM.into());
    if realm.contains('"') || realm.contains('\\') {
        return Err(ConfigError::invalid(
            "jwt.realm",
            "must not contain quotes or backslashes",
        ));
    }
    let require_typ = match raw.require_typ.as_deref().map(str::trim) {
        None => Some(DEFAULT_REQUIRE_TYP.to_string()),
        Some("off") => None,
        Some("") => {
            return Err(ConfigError::invalid(
                "jwt.require_typ",
                "empty: name the typ tokens must carry (Bearer) or write off",
            ));
        }
        Some(t) => Some(t.to_string()),
    };
    let refresh_cooldown = raw.refresh_cooldown.unwrap_or(DEFAULT_REFRESH_COOLDOWN);
    let refresh_interval = raw.refresh_interval.unwrap_or(DEFAULT_REFRESH_INTERVAL);
    if refresh_interval.is_zero() {
        return Err(ConfigError::invalid(
            "jwt.refresh_interval",
            "must be greater than zero",
        ));
    }
    Ok(JwtConfig {
        client_id: raw.client_id.or_else(|| audience.clone()),
        source,
        source_from,
        issuer,
        issuer_from,
        audience,
        audience_from,
        realm,
        algorithms,
        leeway: raw.leeway.unwrap_or(DEFAULT_LEEWAY),
        required_claims,
        refresh_interval,
        refresh_cooldown,
        fetch_timeout: raw.fetch_timeout.unwrap_or(DEFAULT_FETCH_TIMEOUT),
        token_cache_size: raw.token_cache_size.unwrap_or(DEFAULT_TOKEN_CACHE_SIZE),
        require_typ,
    })
}

/// Asymmetric algorithms only: a JWKS never holds a shared secret, and accepting HMAC next to
/// public keys is the classic algorithm-confusion hole.
pub fn parse_algorithm(name: &str) -> Result<jsonwebtoken::Algorithm, ConfigError> {
    use jsonwebtoken::Algorithm::*;
    Ok(match name {
        "RS256" => RS256,
        "RS384" => RS384,
        "RS512" => RS512,
        "PS256" => PS256,
        "PS384" => PS384,
        "PS512" => PS512,
        "ES256" => ES256,
        "ES384" => ES384,
        "EdDSA" => EdDSA,
        "HS256" | "HS384" | "HS512" | "none" => {
            return Err(ConfigError::invalid(
                "jwt.algorithms",
                format!("{name} is never accepted (asymmetric algorithms only)"),
            ));
        }
        other => {
            return Err(ConfigError::invalid(
                "jwt.algorithms",
                format!(
                    "unknown algorithm {other:?} (RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 EdDSA)"
                ),
            ));
        }
    })
}

/// OpenTelemetry trace export, from the standard `OTEL_*` variables (no file keys: collectors
/// and operators set these the same way for every service). Read at startup only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracingConfig {
    /// Where spans go, as the exporter calls it (for HTTP with `/v1/traces`).
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    /// `service.name` of the spans.
    pub service_name: String,
}

/// `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

pub const DEFAULT_SERVICE_NAME: &str = "authz-sidecar";

/// Export is on when an OTLP endpoint is set, the SDK is not disabled (`OTEL_SDK_DISABLED`)
/// and the traces exporter is OTLP (`OTEL_TRACES_EXPORTER`, default `otlp`). Endpoint
/// semantics are the specification's: the traces endpoint is used as given; the generic one
/// is a base to which HTTP adds `/v1/traces`. The protocol defaults to `http/protobuf`.
fn resolve_tracing(env: &dyn Env) -> Result<Option<TracingConfig>, ConfigError> {
    if env_any(env, &["OTEL_SDK_DISABLED"]).is_some_and(|(_, v)| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    match env_any(env, &["OTEL_TRACES_EXPORTER"]).map(|(_, v)| v.to_ascii_lowercase()) {
        None => {}
        Some(v) if v == "otlp" => {}
        Some(v) if v == "none" => return Ok(None),
        Some(v) => {
            return Err(ConfigError::invalid(
                "OTEL_TRACES_EXPORTER",
                format!("{v:?}: want otlp or none"),
            ));
        }
    }
    let Some((key, raw)) = env_any(
        env,
        &[
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ],
    ) else {
        return Ok(None);
    };
    let protocol = match env_any(
        env,
        &[
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ],
    ) {
        None => OtlpProtocol::HttpProtobuf,
        Some((_, v)) if v == "grpc" => OtlpProtocol::Grpc,
        Some((_, v)) if v == "http/protobuf" => OtlpProtocol::HttpProtobuf,
        Some((name, v)) => {
            return Err(ConfigError::invalid(
                name,
                format!("{v:?}: want grpc or http/protobuf"),
            ));
        }
    };
    let url = check_http_url(key, &raw)?;
    let endpoint = if key == "OTEL_EXPORTER_OTLP_ENDPOINT" && protocol == OtlpProtocol::HttpProtobuf
    {
        format!("{url}/v1/traces")
    } else {
        url
    };
    let from_attributes = env_any(env, &["OTEL_RESOURCE_ATTRIBUTES"]).and_then(|(_, v)| {
        v.split(',').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k.trim() == "service.name" && !v.trim().is_empty()).then(|| v.trim().to_string())
        })
    });
    let service_name = env_any(env, &["OTEL_SERVICE_NAME"])
        .map(|(_, v)| v)
        .or(from_attributes)
        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.into());
    Ok(Some(TracingConfig {
        endpoint,
        protocol,
        service_name,
    }))
}

fn resolve_openfga(
    raw: Option<RawOpenFga>,
    env: &dyn Env,
) -> Result<Option<OpenFgaConfig>, ConfigError> {
    let env_url = env_any(env, &["OPENFGA_API_URL"]).map(|(_, v)| v);
    let raw = match (raw, env_url.is_some()) {
        (None, false) => return Ok(None),
        (raw, _) => raw.unwrap_or_default(),
    };
    let api_url = env_url.or(raw.api_url).ok_or_else(|| {
        ConfigError::invalid(
            "OPENFGA_API_URL (openfga.api_url)",
            "not set: the OpenFGA HTTP API address, e.g. http://openfga:8080",
        )
    })?;
    let api_url = check_http_url("OPENFGA_API_URL (openfga.api_url)", &api_url)?;
    let store_id = env_any(env, &["OPENFGA_STORE_ID"])
        .map(|(_, v)| v)
        .or(raw.store_id);
    let store_name = env_any(env, &["OPENFGA_STORE_NAME"])
        .map(|(_, v)| v)
        .or(raw.store_name);
    let store = match (store_id, store_name) {
        (Some(id), _) => StoreRef::Id(id),
        (None, Some(name)) => StoreRef::Name(name),
        (None, None) => {
            return Err(ConfigError::invalid(
                "OPENFGA_STORE_ID (openfga.store_id)",
                "store id not set: set OPENFGA_STORE_ID or OPENFGA_STORE_NAME (create one with POST /stores)",
            ));
        }
    };
    let max_batch_size = raw.max_batch_size.unwrap_or(DEFAULT_OPENFGA_BATCH);
    if max_batch_size == 0 {
        return Err(ConfigError::invalid(
            "openfga.max_batch_size",
            "must be at least 1",
        ));
    }
    let timeout = raw.timeout.unwrap_or(DEFAULT_OPENFGA_TIMEOUT);
    if timeout.is_zero() {
        return Err(ConfigError::invalid(
            "openfga.timeout",
            "must be greater than zero",
        ));
    }
    Ok(Some(OpenFgaConfig {
        api_url,
        store,
        model_id: env_any(env, &["OPENFGA_MODEL_ID"])
            .map(|(_, v)| v)
            .or(raw.model_id),
        api_token: env_any(env, &["OPENFGA_API_TOKEN"])
            .map(|(_, v)| v)
            .or(raw.api_token),
        timeout,
        consistency: raw.consistency.unwrap_or_default(),
        max_batch_size,
        max_in_flight: raw.max_in_flight.unwrap_or(DEFAULT_OPENFGA_MAX_IN_FLIGHT),
        changelog_interval: raw.changelog_interval.unwrap_or(DEFAULT_CHANGELOG_INTERVAL),
        changelog_lookback: raw.changelog_lookback.unwrap_or(DEFAULT_CHANGELOG_LOOKBACK),
        contextual_tuples: raw.contextual_tuples,
        breaker_failures: raw.breaker_failures.unwrap_or(DEFAULT_BREAKER_FAILURES),
        breaker_open_for: raw.breaker_open_for.unwrap_or(DEFAULT_BREAKER_OPEN_FOR),
    }))
}

// ---------------------------------------------------------------------------------------------
// The effective config as an operator may see it (`GET /admin/config`).
// ---------------------------------------------------------------------------------------------

/// What a secret shows as: whether it is set, never its value.
pub const REDACTED: &str = "<redacted>";

/// A URL without what may carry a credential: userinfo (`http://user:pass@host`), query and
/// fragment (`?token=...`) become `redacted` (plain, so it needs no percent-encoding).
fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        // Validated at resolve time; never echo something that did not parse.
        return REDACTED.into();
    };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        let _ = parsed.set_username("redacted");
        let _ = parsed.set_password(None);
    }
    if parsed.query().is_some() {
        parsed.set_query(Some("redacted"));
    }
    if parsed.fragment().is_some() {
        parsed.set_fragment(Some("redacted"));
    }
    parsed.to_string().trim_end_matches('/').to_string()
}

fn secret(value: &Option<String>) -> serde_json::Value {
    match value {
        Some(_) => REDACTED.into(),
        None => serde_json::Value::Null,
    }
}

/// A rule predicate with the value a header is compared with hidden (`header:authorization
/// == Bearer ...` would hold a credential); body and query predicates are shown as written.
fn redact_predicate(p: &str) -> String {
    for op in [" == ", " != "] {
        if let Some((left, _)) = p.split_once(op)
            && left.trim_start().starts_with("header:")
        {
            return format!("{left}{op}{REDACTED}");
        }
    }
    p.to_string()
}

fn secs(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl Config {
    /// The effective config as JSON for operators, built field by field from an allowlist:
    /// a field appears only because it is written out here, so a secret added to the config
    /// later stays out until someone decides it is safe. Secrets (the OpenFGA API token, the
    /// API-key lookup secret) show as [`REDACTED`] when set; URLs lose userinfo and query;
    /// values compared with headers in rule predicates are hidden. API-key records (hashes)
    /// live in their own file and are never read here.
    pub fn redacted(&self) -> serde_json::Value {
        use serde_json::json;
        let jwt = &self.jwt;
        let source = match &jwt.source {
            KeySourceConfig::JwksUrl(u) => json!({"jwks_url": redact_url(u)}),
            KeySourceConfig::Discovery { base_url, realm } => {
                json!({"keycloak_url": redact_url(base_url), "keycloak_realm": realm})
            }
            KeySourceConfig::File(p) => json!({"jwks_file": p.display().to_string()}),
            KeySourceConfig::None => serde_json::Value::Null,
        };
        let rules: Vec<_> = self
            .routes
            .rules
            .iter()
            .map(|r| {
                let check = r.check.as_ref().map(|c| {
                    let relations = |list: &[RelationCheckConfig]| -> Vec<serde_json::Value> {
                        list.iter()
                            .map(|rc| json!({"relation": rc.relation, "object": rc.object, "user": rc.user}))
                            .collect()
                    };
                    json!({
                        "all": relations(&c.all),
                        "any": relations(&c.any),
                        "consistency": c.consistency.map(Consistency::as_str),
                        "on_backend_error": match c.on_backend_error {
                            OnBackendError::Deny => "deny",
                            OnBackendError::Allow => "allow",
                        },
                    })
                });
                json!({
                    "name": r.name,
                    "hosts": r.hosts,
                    "path": r.path,
                    "methods": r.methods,
                    "when": r.when.iter().map(|p| redact_predicate(p)).collect::<Vec<_>>(),
                    "public": r.public,
                    "roles": r.roles,
                    "roles_match": match r.roles_match { Match::Any => "any", Match::All => "all" },
                    "scopes": r.scopes,
                    "check": check,
                })
            })
            .collect();
        let openfga = self.openfga.as_ref().map(|f| {
            let (store_id, store_name) = match &f.store {
                StoreRef::Id(id) => (Some(id.as_str()), None),
                StoreRef::Name(n) => (None, Some(n.as_str())),
            };
            json!({
                "api_url": redact_url(&f.api_url),
                "store_id": store_id,
                "store_name": store_name,
                "model_id": f.model_id,
                "api_token": secret(&f.api_token),
                "timeout": secs(f.timeout),
                "consistency": f.consistency.as_str(),
                "max_batch_size": f.max_batch_size,
                "max_in_flight": f.max_in_flight,
                "changelog_interval": secs(f.changelog_interval),
                "changelog_lookback": secs(f.changelog_lookback),
                "contextual_tuples": f.contextual_tuples.iter().map(|t| json!({
                    "from": match t.from { ClaimSet::Roles => "roles", ClaimSet::Groups => "groups" },
                    "relation": t.relation,
                    "object": t.object,
                })).collect::<Vec<_>>(),
                "breaker_failures": f.breaker_failures,
                "breaker_open_for": secs(f.breaker_open_for),
            })
        });
        json!({
            "server": {
                "grpc_addr": self.grpc_addr.to_string(),
                "ops_addr": self.ops_addr.map(|a| a.to_string()),
                "drain_timeout": secs(self.drain_timeout),
                "shutdown_delay": secs(self.shutdown_delay),
                "reflection": self.reflection,
                "reload_interval": secs(self.reload_interval),
                "admin": {"enabled": self.admin.enabled, "allow_remote": self.admin.allow_remote},
            },
            "log": {
                "level": self.log.filter,
                "format": if self.log.json { "json" } else { "text" },
                "decisions": self.log.decisions.as_str(),
                "allow_sample": self.log.allow_sample,
            },
            "jwt": {
                "source": source,
                "source_from": jwt.source_from,
                "issuer": jwt.issuer,
                "audience": jwt.audience,
                "client_id": jwt.client_id,
                "realm": jwt.realm,
                "algorithms": jwt.algorithms.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>(),
                "leeway": secs(jwt.leeway),
                "required_claims": jwt.required_claims,
                "require_typ": jwt.require_typ,
                "refresh_interval": secs(jwt.refresh_interval),
                "refresh_cooldown": secs(jwt.refresh_cooldown),
                "fetch_timeout": secs(jwt.fetch_timeout),
                "token_cache_size": jwt.token_cache_size,
            },
            "api_keys": {
                "file": self.api_keys.as_ref().map(|k| k.file.display().to_string()),
                "header": self.api_key_header.name,
                "forward_to_app": self.api_key_header.forward_to_app,
                "reload_interval": self.api_keys.as_ref().map(|k| secs(k.reload_interval)),
                "bcrypt_concurrency": self.api_keys.as_ref().map(|k| k.bcrypt_concurrency),
                "lookup_secret": secret(&self.api_keys.as_ref().and_then(|k| k.lookup_secret.clone())),
                "exchange_url": self.api_key_exchange.as_ref().map(|x| redact_url(&x.url)),
                "exchange_timeout": self.api_key_exchange.as_ref().map(|x| secs(x.timeout)),
                "exchange_cache_ttl": self.api_key_exchange.as_ref().map(|x| secs(x.cache_ttl)),
            },
            "principals": {
                "require_listed": self.principals.require_listed,
                "service_principals": self.principals.service_principals.iter().map(|p| json!({
                    "id": p.id, "enabled": p.enabled, "scopes": p.scopes,
                })).collect::<Vec<_>>(),
            },
            "cors": {
                "allowed_origins": self.cors.allowed_origins,
                "allowed_methods": self.cors.allowed_methods,
                "allowed_headers": self.cors.allowed_headers,
                "max_age": self.cors.max_age,
            },
            "routes": {
                "unmatched": match self.routes.unmatched {
                    Unmatched::Deny => "deny",
                    Unmatched::Authenticated => "authenticated",
                    Unmatched::Allow => "allow",
                },
                "rules": rules,
            },
            "openfga": openfga,
            "cache": {
                "enabled": self.cache.enabled,
                "allowed_ttl": secs(self.cache.allowed_ttl),
                "denied_ttl": secs(self.cache.denied_ttl),
                "max_entries": self.cache.max_entries,
            },
            "request": {"path_policy": self.request.path_policy.as_str()},
        })
    }
}

/// For unit tests above this layer: the OpenFGA settings of a config whose OpenFGA is at a
/// closed port (store `s`), as rules that ask relationship questions need.
#[cfg(test)]
pub(crate) fn test_openfga_config() -> OpenFgaConfig {
    let env: BTreeMap<String, String> = [
        ("OPENFGA_API_URL", "http://127.0.0.1:1"),
        ("OPENFGA_STORE_ID", "s"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Config::from_yaml("jwt: { jwks_file: k }", Path::new("/"), &env)
        .expect("the test config is valid")
        .openfga
        .expect("OpenFGA is configured")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const MIN: &str = "jwt: { jwks_file: keys.json }\n";

    fn load(yaml: &str, e: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_yaml(yaml, Path::new("/etc/authz"), &env(e))
    }

    #[test]
    fn defaults_apply() {
        let c = load(MIN, &[]).unwrap();
        assert_eq!(
            c.grpc_addr,
            ListenAddr::Tcp("0.0.0.0:9191".parse().unwrap())
        );
        assert_eq!(c.ops_addr, Some("0.0.0.0:9092".parse().unwrap()));
        assert_eq!(
            c.jwt.source,
            KeySourceConfig::File(PathBuf::from("/etc/authz/keys.json"))
        );
        assert_eq!(c.jwt.leeway, Duration::from_secs(30));
        assert_eq!(c.jwt.required_claims, vec!["sub".to_string()]);
        assert_eq!(c.routes.unmatched, Unmatched::Deny);
        assert!(c.openfga.is_none());
    }

    #[test]
    fn key_source_precedence() {
        let c = load(
            MIN,
            &[
                ("AUTH_PUBLIC_KEY_URL", "http://kc/certs"),
                ("KEYCLOAK_URL", "http://kc"),
                ("KEYCLOAK_REALM", "r"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.jwt.source,
            KeySourceConfig::JwksUrl("http://kc/certs".into())
        );
        let c = load(
            MIN,
            &[
                ("KEYCLOAK_SERVER_URL", "http://kc/"),
                ("KEYCLOAK_REALM", "r"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.jwt.source,
            KeySourceConfig::Discovery {
                base_url: "http://kc".into(),
                realm: "r".into()
            }
        );
        assert_eq!(c.jwt.realm, "r");
        // An empty variable is unset: the file wins.
        let c = load(MIN, &[("AUTH_PUBLIC_KEY_URL", "  ")]).unwrap();
        assert!(matches!(c.jwt.source, KeySourceConfig::File(_)));
    }

    #[test]
    fn errors_name_the_key() {
        let e = load(MIN, &[("KEYCLOAK_URL", "http://kc")]).unwrap_err();
        assert!(e.to_string().starts_with("KEYCLOAK_REALM"), "{e}");
        let e = load(MIN, &[("CORS_ORIGINS", "*")]).unwrap_err();
        assert!(e.to_string().starts_with("CORS_ORIGINS"), "{e}");
        let e = load("jwt: { jwks_file: k, algorithms: [HS256] }", &[]).unwrap_err();
        assert!(e.to_string().contains("jwt.algorithms"), "{e}");
        let e = load(MIN, &[("AUTHZ_GRPC_ADDR", "nope")]).unwrap_err();
        assert!(e.to_string().contains("AUTHZ_GRPC_ADDR"), "{e}");
        let e = load("jwt: { jwks_file: k, bogus: 1 }", &[]).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = load(MIN, &[("OPENFGA_API_URL", "http://fga:8080")]).unwrap_err();
        assert!(e.to_string().contains("OPENFGA_STORE_ID"), "{e}");
        let e = load(MIN, &[("LOG_LEVEL", "lots=of=noise")]).unwrap_err();
        assert!(e.to_string().contains("LOG_LEVEL"), "{e}");
    }

    #[test]
    fn trace_export_follows_the_otel_variables() {
        assert_eq!(
            load(MIN, &[]).unwrap().tracing,
            None,
            "no endpoint, no export"
        );
        let t = load(
            MIN,
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")],
        )
        .unwrap()
        .tracing
        .unwrap();
        assert_eq!(t.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(t.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(t.service_name, "authz-sidecar");
        let t = load(
            MIN,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_SERVICE_NAME", "edge-authz"),
            ],
        )
        .unwrap()
        .tracing
        .unwrap();
        assert_eq!(
            (t.endpoint.as_str(), t.protocol, t.service_name.as_str()),
            ("http://collector:4317", OtlpProtocol::Grpc, "edge-authz")
        );
        let t = load(
            MIN,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4318/custom"),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "team=auth, service.name=from-attrs",
                ),
            ],
        )
        .unwrap()
        .tracing
        .unwrap();
        assert_eq!(
            t.endpoint, "http://c:4318/custom",
            "the traces endpoint is used as given"
        );
        assert_eq!(t.service_name, "from-attrs");
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            let c = load(
                MIN,
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"), off],
            )
            .unwrap();
            assert_eq!(c.tracing, None, "{off:?}");
        }
        let e = load(
            MIN,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
            ],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
            "{e}"
        );
        let e = load(MIN, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")]).unwrap_err();
        assert!(
            e.to_string().starts_with("OTEL_EXPORTER_OTLP_ENDPOINT"),
            "{e}"
        );
    }

    #[test]
    fn cors_lists_from_either_variable() {
        let c = load(
            MIN,
            &[(
                "CORS_ALLOWED_ORIGINS",
                "http://localhost:3000, https://a.example",
            )],
        )
        .unwrap();
        assert_eq!(
            c.cors.allowed_origins,
            vec!["http://localhost:3000", "https://a.example"]
        );
        let e = load(MIN, &[("CORS_ORIGINS", "https://a.example/")]).unwrap_err();
        assert!(e.to_string().contains("trailing slash"), "{e}");
    }

    #[test]
    fn path_policy_defaults_to_strict_and_names_its_key() {
        assert_eq!(
            load(MIN, &[]).unwrap().request.path_policy,
            PathPolicy::Strict
        );
        let c = load(
            &format!("{MIN}request: {{ path_policy: opaque_encoded_slashes }}\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.request.path_policy, PathPolicy::OpaqueEncodedSlashes);
        let e = load(
            &format!("{MIN}request: {{ path_policy: normalize }}\n"),
            &[],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("request.path_policy: \"normalize\""),
            "{e}"
        );
        let e = load(&format!("{MIN}request: {{ paths: strict }}\n"), &[]).unwrap_err();
        assert!(e.to_string().contains("paths"), "{e}");
    }

    #[test]
    fn credential_settings_resolve_with_safe_defaults() {
        let c = load(MIN, &[]).unwrap();
        assert_eq!(
            c.api_key_header,
            ApiKeyHeaderConfig {
                name: "x-api-key".into(),
                forward_to_app: false
            },
            "the key is removed before the app by default, with or without a keys file"
        );
        assert_eq!(c.jwt.require_typ.as_deref(), Some("Bearer"));
        let c = load(
            "jwt: { jwks_file: k, require_typ: off }\napi_keys: { file: keys.yaml, header: ApiKey, forward_to_app: true, bcrypt_concurrency: 4 }\n",
            &[("API_KEY_CACHE_SECRET", "s3cret")],
        )
        .unwrap();
        assert_eq!(c.jwt.require_typ, None);
        assert_eq!(
            (
                c.api_key_header.name.as_str(),
                c.api_key_header.forward_to_app
            ),
            ("apikey", true)
        );
        let keys = c.api_keys.unwrap();
        assert_eq!(keys.bcrypt_concurrency, 4);
        assert_eq!(keys.lookup_secret.as_deref(), Some("s3cret"));
    }

    #[test]
    fn the_key_service_is_a_second_api_key_source_with_plugin_defaults() {
        assert_eq!(load(MIN, &[]).unwrap().api_key_exchange, None);
        let c = load(
            "jwt: { jwks_file: k }\napi_keys: { exchange_url: 'http://app:8000/api/v1/api-keys/validate/' }",
            &[],
        )
        .unwrap();
        assert_eq!(
            c.api_key_exchange,
            Some(ApiKeyExchangeConfig {
                url: "http://app:8000/api/v1/api-keys/validate".into(),
                timeout: Duration::from_secs(5),
                cache_ttl: Duration::from_secs(300),
            })
        );
        assert!(c.api_keys.is_none(), "the service alone is enough");
        let c = load(
            "jwt: { jwks_file: k }\napi_keys: { file: k.yaml, exchange_url: 'http://a/v', exchange_timeout: 2s, exchange_cache_ttl: 0s }",
            &[("API_KEY_EXCHANGE_URL", "https://b/v")],
        )
        .unwrap();
        let x = c.api_key_exchange.unwrap();
        assert_eq!(
            (x.url.as_str(), x.timeout, x.cache_ttl),
            ("https://b/v", Duration::from_secs(2), Duration::ZERO)
        );
        for (yaml, want) in [
            (
                "api_keys: { exchange_url: 'http://a/v' }\nroutes: { unmatched: deny }",
                "API_KEY_EXCHANGE_URL (api_keys.exchange_url): the key service's tokens are verified like any bearer token",
            ),
            (
                "jwt: { jwks_file: k }\napi_keys: { exchange_url: 'ftp://a/v' }",
                "API_KEY_EXCHANGE_URL (api_keys.exchange_url)",
            ),
            (
                "jwt: { jwks_file: k }\napi_keys: { exchange_url: 'http://a/v', exchange_timeout: 0s }",
                "api_keys.exchange_timeout",
            ),
            (
                "jwt: { jwks_file: k }\napi_keys: { exchange_cache_ttl: 60s }",
                "api_keys.exchange_cache_ttl: only applies with api_keys.exchange_url",
            ),
        ] {
            let e = load(yaml, &[]).unwrap_err().to_string();
            assert!(e.contains(want), "{yaml}: {e} should contain {want}");
        }
    }

    #[test]
    fn credential_setting_errors_name_the_key() {
        for (yaml, want) in [
            ("jwt: { jwks_file: k, require_typ: '' }", "jwt.require_typ"),
            (
                "jwt: { jwks_file: k }\napi_keys: { header: authorization }",
                "api_keys.header",
            ),
            (
                "jwt: { jwks_file: k }\napi_keys: { header: 'x key' }",
                "api_keys.header",
            ),
            (
                "jwt: { jwks_file: k }\napi_keys: { header: ':path' }",
                "api_keys.header",
            ),
            (
                "jwt: { jwks_file: k }\napi_keys: { file: k.yaml, bcrypt_concurrency: 0 }",
                "api_keys.bcrypt_concurrency",
            ),
            (
                "jwt: { jwks_file: k }\napi_keys: { forward: true }",
                "forward",
            ),
        ] {
            let e = load(yaml, &[]).unwrap_err().to_string();
            assert!(e.contains(want), "{yaml}: {e} should name {want}");
        }
    }

    #[test]
    fn a_variable_that_replaces_the_files_key_source_takes_its_issuer_and_realm_along() {
        let file = "jwt: { jwks_file: k.json, issuer: local-iss, realm: local }\n";
        let kc = [
            ("KEYCLOAK_URL", "http://kc:8080"),
            ("KEYCLOAK_REALM", "mcp-server"),
        ];
        let c = load(file, &kc).unwrap().jwt;
        assert_eq!(
            (c.issuer, c.issuer_from),
            (None, None),
            "discovery's issuer applies"
        );
        assert_eq!(c.realm, "mcp-server");
        assert_eq!(c.source_from, "KEYCLOAK_URL");
        let mut pinned = kc.to_vec();
        pinned.push(("JWT_ISSUER", "http://kc:8080/realms/mcp-server"));
        let c = load(file, &pinned).unwrap().jwt;
        assert_eq!(c.issuer_from, Some("JWT_ISSUER"));
        // The file's own source keeps the file's issuer.
        let c = load(file, &[]).unwrap().jwt;
        assert_eq!(
            (c.issuer.as_deref(), c.issuer_from, c.realm.as_str()),
            (Some("local-iss"), Some("jwt.issuer"), "local")
        );
        // A file that names no source: its issuer is meant for the variable's source.
        let c = load("jwt: { issuer: kc-iss }\n", &kc).unwrap().jwt;
        assert_eq!(c.issuer.as_deref(), Some("kc-iss"));
    }

    #[test]
    fn unix_socket_address() {
        let c = load(MIN, &[("AUTHZ_GRPC_ADDR", "unix:/run/authz.sock")]).unwrap();
        assert_eq!(c.grpc_addr, ListenAddr::Unix("/run/authz.sock".into()));
    }

    #[test]
    fn decision_log_settings_default_to_every_decision_and_name_their_key_when_wrong() {
        let c = load(MIN, &[]).unwrap();
        assert_eq!(
            (c.log.decisions, c.log.allow_sample),
            (DecisionLogMode::All, 1.0)
        );
        let c = load(
            "jwt: { jwks_file: k }\nlog: { decisions: deny, allow_sample: 0.25 }\n",
            &[],
        )
        .unwrap();
        assert_eq!(
            (c.log.decisions, c.log.allow_sample),
            (DecisionLogMode::Deny, 0.25)
        );
        let c = load(
            "jwt: { jwks_file: k }\nlog: { decisions: deny, allow_sample: 0.25 }\n",
            &[("LOG_DECISIONS", "none"), ("LOG_ALLOW_SAMPLE", "0.5")],
        )
        .unwrap();
        assert_eq!(
            (c.log.decisions, c.log.allow_sample),
            (DecisionLogMode::None, 0.5),
            "the variables win over the file, as LOG_LEVEL and LOG_FORMAT do"
        );
        for (yaml, vars, names) in [
            (
                "log: { decisions: some }",
                &[][..],
                "log.decisions (LOG_DECISIONS)",
            ),
            (
                "",
                &[("LOG_DECISIONS", "allows")][..],
                "log.decisions (LOG_DECISIONS)",
            ),
            (
                "log: { allow_sample: 1.5 }",
                &[][..],
                "log.allow_sample (LOG_ALLOW_SAMPLE)",
            ),
            (
                "log: { allow_sample: -0.1 }",
                &[][..],
                "log.allow_sample (LOG_ALLOW_SAMPLE)",
            ),
            (
                "",
                &[("LOG_ALLOW_SAMPLE", "half")][..],
                "log.allow_sample (LOG_ALLOW_SAMPLE)",
            ),
            (
                "",
                &[("LOG_ALLOW_SAMPLE", "NaN")][..],
                "log.allow_sample (LOG_ALLOW_SAMPLE)",
            ),
        ] {
            let err = load(&format!("{MIN}{yaml}\n"), vars)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(names), "{yaml} {vars:?}: {err}");
        }
    }

    #[test]
    fn the_log_format_the_operator_names_wins_over_the_terminal_guess() {
        let json = load("jwt: { jwks_file: k }\nlog: { format: json }\n", &[]).unwrap();
        assert!(json.log.json);
        let text = load(
            "jwt: { jwks_file: k }\nlog: { format: json }\n",
            &[("LOG_FORMAT", "text")],
        )
        .unwrap();
        assert!(!text.log.json);
        // Unset: JSON unless stdout is a terminal (under the test runner it is not).
        let guessed = load(MIN, &[]).unwrap();
        assert_eq!(
            guessed.log.json,
            !std::io::IsTerminal::is_terminal(&std::io::stdout())
        );
    }

    #[test]
    fn admin_endpoints_are_on_for_loopback_peers_unless_the_config_says_otherwise() {
        assert_eq!(
            load(MIN, &[]).unwrap().admin,
            AdminConfig {
                enabled: true,
                allow_remote: false
            }
        );
        let c = load(
            "jwt: { jwks_file: k }\nserver: { admin: { enabled: false, allow_remote: true } }\n",
            &[],
        )
        .unwrap();
        assert_eq!(
            c.admin,
            AdminConfig {
                enabled: false,
                allow_remote: true
            }
        );
        let err = load(
            "jwt: { jwks_file: k }\nserver: { admin: { remote: true } }\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("remote"), "{err}");
    }

    #[test]
    fn the_redacted_config_shows_no_secret_and_every_setting() {
        let yaml = r#"
jwt: { jwks_url: "https://kc-user:kc-pass-SECRET@kc.example/certs?access_token=url-token-SECRET" }
api_keys:
  file: keys.yaml
  lookup_secret: lookup-SECRET-value
  exchange_url: "http://svc:exchange-pass-SECRET@app:8000/validate?key=exchange-query-SECRET"
openfga:
  api_url: "http://fga-user:fga-pass-SECRET@openfga:8080"
  store_id: 01STORE
  api_token: fga-api-token-SECRET
routes:
  rules:
    - name: internal
      path: /internal
      when: ["header:x-internal-auth == header-value-SECRET", "body:/method == tools/call"]
      roles: [admin]
"#;
        let c = load(yaml, &[]).unwrap();
        let shown = c.redacted();
        let text = shown.to_string();
        assert!(!text.contains("SECRET"), "a secret is shown: {text}");
        assert_eq!(shown["openfga"]["api_token"], REDACTED);
        assert_eq!(shown["api_keys"]["lookup_secret"], REDACTED);
        assert_eq!(shown["openfga"]["api_url"], "http://redacted@openfga:8080");
        assert_eq!(shown["openfga"]["store_id"], "01STORE");
        assert_eq!(
            shown["jwt"]["source"]["jwks_url"],
            "https://redacted@kc.example/certs?redacted"
        );
        assert_eq!(
            shown["routes"]["rules"][0]["when"],
            serde_json::json!([
                "header:x-internal-auth == <redacted>",
                "body:/method == tools/call"
            ])
        );
        assert_eq!(
            shown["routes"]["rules"][0]["roles"],
            serde_json::json!(["admin"])
        );
        assert_eq!(shown["api_keys"]["file"], "/etc/authz/keys.yaml");
        assert_eq!(shown["cache"]["allowed_ttl"], "1m");
        // Unset secrets read as unset, not as redacted.
        let plain = load(MIN, &[]).unwrap().redacted();
        assert!(plain["openfga"].is_null());
        assert!(plain["api_keys"]["lookup_secret"].is_null());
    }
}
