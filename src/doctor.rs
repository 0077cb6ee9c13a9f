//! `authz-sidecar doctor`: checks each backend the config names, the way the sidecar will
//! use it, and prints one line per finding, so each failure of the app's troubleshooting
//! guide (expired token, wrong key, missing claims, Keycloak unreachable, OpenFGA store or
//! model not set, missing tuples, inactive key, disabled service principal, CORS) is named
//! in one sentence. With `--token`/`--api-key` and `--path` it runs a real check.
//!
//! Invariant: one failure hides only what depends on it. The config is resolved section by
//! section (each against stand-ins for the others), so an unset `OPENFGA_STORE_ID` still lets
//! the signing keys, the API key file, CORS and OpenFGA's reachability be checked; a check
//! that depends on a failed one says `skip` and names what it waited for. `--json` prints the
//! same findings as an array of `{check, status, detail}` for CI.
//!
//! Exit codes: 0 nothing failed, 1 a check failed, 2 the config itself is invalid.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::authn::api_key::{ApiKeyStore, FileApiKeyStore, StoreOptions};
use crate::authn::jwks::{JwksKeySource, KeyError, KeySource};
use crate::authn::jwt::JwtVerifier;
use crate::authn::principals::Principals;
use crate::authz::RelationshipChecker;
use crate::authz::openfga::OpenFgaClient;
use crate::authz::rules::RuleSet;
use crate::clock::system_clock;
use crate::config::{
    Config, ConfigError, Env, KeySourceConfig, ProcessEnv, RawConfig, RawJwt, RawOpenFga,
    discovery_url,
};
use crate::console::say;
use crate::decision::Decision;

/// What to check: plain data, filled in by the command line (`cli::DoctorArgs`) or a test.
#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    /// A bearer token to verify (never printed; its hash is).
    pub token: Option<String>,
    /// An API key to verify (never printed; its hash is).
    pub api_key: Option<String>,
    /// Run a full check of this request path (with `method`).
    pub path: Option<String>,
    pub method: String,
    /// JSON body for `path`.
    pub body: Option<String>,
    /// Origin header for `path`.
    pub origin: Option<String>,
    /// Seconds to wait for OpenFGA and the key source.
    pub wait: u64,
    /// Print the findings as a JSON array of {check, status, detail}.
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Works, but weaker or narrower than it may be meant (no issuer check, a disabled
    /// principal).
    Warn,
    Fail,
    /// Not run: it depends on a check that failed, named in the detail.
    Skip,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Fail => "FAIL",
            Self::Skip => "skip",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: String,
    pub status: Status,
    pub detail: String,
}

struct Report {
    findings: Vec<Finding>,
    json: bool,
}

impl Report {
    /// Text lines are printed as they are found, so a slow backend shows where doctor waits.
    fn add(&mut self, status: Status, check: &str, detail: impl std::fmt::Display) {
        let detail = detail.to_string();
        if !self.json {
            say(format!("{:<6}{check:<14} {detail}", status.label()));
        }
        self.findings.push(Finding {
            check: check.into(),
            status,
            detail,
        });
    }
    fn ok(&mut self, check: &str, detail: impl std::fmt::Display) {
        self.add(Status::Ok, check, detail);
    }
    fn warn(&mut self, check: &str, detail: impl std::fmt::Display) {
        self.add(Status::Warn, check, detail);
    }
    fn fail(&mut self, check: &str, detail: impl std::fmt::Display) {
        self.add(Status::Fail, check, detail);
    }
    fn skip(&mut self, check: &str, detail: impl std::fmt::Display) {
        self.add(Status::Skip, check, detail);
    }
    fn failures(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.status == Status::Fail)
            .count()
    }
}

// ---------------------------------------------------------------------------------------------
// The config, section by section.
// ---------------------------------------------------------------------------------------------

/// A part of the config that resolves on its own, and the environment variables that feed it
/// (as read by `crate::config`). A variable missing from these lists reaches every section's
/// resolution; an error it causes is then reported once (errors are deduplicated) and fails
/// every section, which hides checks but never invents a problem.
struct Section {
    name: &'static str,
    vars: &'static [&'static str],
}

const SECTIONS: &[Section] = &[
    Section {
        name: "server",
        vars: &[
            "AUTHZ_GRPC_ADDR",
            "AUTHZ_OPS_ADDR",
            "AUTHZ_SHUTDOWN_DELAY",
            "AUTHZ_RELOAD_INTERVAL",
        ],
    },
    Section {
        name: "log",
        vars: &[
            "LOG_LEVEL",
            "RUST_LOG",
            "LOG_FORMAT",
            "LOG_DECISIONS",
            "LOG_ALLOW_SAMPLE",
        ],
    },
    Section {
        name: "jwt",
        vars: &[
            "AUTH_PUBLIC_KEY_URL",
            "KEYCLOAK_URL",
            "KEYCLOAK_SERVER_URL",
            "KEYCLOAK_REALM",
            "JWT_ISSUER",
            "JWT_AUDIENCE",
        ],
    },
    Section {
        name: "api_keys",
        vars: &[
            "API_KEYS_FILE",
            "API_KEY_CACHE_SECRET",
            "API_KEY_EXCHANGE_URL",
        ],
    },
    Section {
        name: "principals",
        vars: &[],
    },
    Section {
        name: "cors",
        vars: &["CORS_ORIGINS", "CORS_ALLOWED_ORIGINS"],
    },
    Section {
        name: "openfga",
        vars: &[
            "OPENFGA_API_URL",
            "OPENFGA_STORE_ID",
            "OPENFGA_STORE_NAME",
            "OPENFGA_MODEL_ID",
            "OPENFGA_API_TOKEN",
        ],
    },
    Section {
        name: "cache",
        vars: &[],
    },
    Section {
        name: "request",
        vars: &[],
    },
    // Trace export: the standard OTEL_* variables only (no file keys).
    Section {
        name: "tracing",
        vars: &[
            "OTEL_SDK_DISABLED",
            "OTEL_TRACES_EXPORTER",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "OTEL_RESOURCE_ATTRIBUTES",
            "OTEL_SERVICE_NAME",
        ],
    },
    // Last: the rules need to know whether OpenFGA is configured, so they are resolved with
    // the real openfga section when it is valid and a stand-in when it is not.
    Section {
        name: "routes",
        vars: &[],
    },
];

/// The process environment without the variables of the sections not being resolved.
struct Masked {
    hidden: Vec<&'static str>,
}

impl Env for Masked {
    fn get(&self, name: &str) -> Option<String> {
        if self.hidden.contains(&name) {
            None
        } else {
            ProcessEnv.get(name)
        }
    }
}

/// Resolves the sections in `keep` as written, every other section replaced by its default
/// (the JWT settings by a key file, so "no credential source" is never a stand-in's fault;
/// OpenFGA by a placeholder when `openfga_stand_in`).
fn resolve_alone(
    text: &str,
    base: &Path,
    keep: &[&str],
    openfga_stand_in: bool,
) -> Result<Config, ConfigError> {
    let mut raw: RawConfig = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
        path: PathBuf::from("<config>"),
        message: e.to_string(),
    })?;
    let kept = |name: &str| keep.contains(&name);
    if !kept("server") {
        raw.server = Default::default();
    }
    if !kept("log") {
        raw.log = Default::default();
    }
    if !kept("jwt") {
        raw.jwt = RawJwt {
            jwks_file: Some(PathBuf::from("doctor-stand-in.json")),
            ..Default::default()
        };
    }
    if !kept("api_keys") {
        raw.api_keys = Default::default();
    }
    if !kept("principals") {
        raw.principals = Default::default();
    }
    if !kept("cors") {
        raw.cors = Default::default();
    }
    if !kept("openfga") {
        raw.openfga = openfga_stand_in.then(|| RawOpenFga {
            api_url: Some("http://openfga.invalid".into()),
            store_id: Some("doctor-stand-in".into()),
            ..Default::default()
        });
    }
    if !kept("cache") {
        raw.cache = Default::default();
    }
    if !kept("request") {
        raw.request = Default::default();
    }
    if !kept("routes") {
        raw.routes = Default::default();
    }
    let hidden = SECTIONS
        .iter()
        .filter(|s| !kept(s.name))
        .flat_map(|s| s.vars.iter().copied())
        .collect();
    let config = Config::resolve(raw, base, &Masked { hidden })?;
    if kept("routes") {
        RuleSet::from_config(&config)?;
    }
    Ok(config)
}

/// What the config check learned: the whole config when valid, else each section that
/// resolved on its own (inside a config of stand-ins).
struct Configs {
    full: Option<Config>,
    sections: HashMap<&'static str, Config>,
    raw: RawConfig,
}

impl Configs {
    /// A config whose `section` is the operator's, if that section is valid.
    fn get(&self, section: &str) -> Option<&Config> {
        self.full.as_ref().or_else(|| self.sections.get(section))
    }

    fn invalid(section: &str) -> String {
        format!("not checked: the {section} settings are invalid (see config)")
    }
}

/// Reads and resolves the config; `None` when it cannot even be read or parsed.
fn check_config(r: &mut Report, path: &Path) -> Option<Configs> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(source) => {
            r.fail(
                "config",
                ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                },
            );
            return None;
        }
    };
    let raw: RawConfig = match serde_yaml_ng::from_str(&text) {
        Ok(raw) => raw,
        Err(e) => {
            r.fail(
                "config",
                ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                },
            );
            return None;
        }
    };
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    // The rules are compiled as `serve` compiles them, so a bad rule is a config finding.
    let whole = match Config::load(path).and_then(|c| RuleSet::from_config(&c).map(|_| c)) {
        Ok(c) => {
            r.ok("config", format!("{} is valid", path.display()));
            return Some(Configs {
                full: Some(c),
                sections: HashMap::new(),
                raw,
            });
        }
        Err(e) => e,
    };
    let openfga_configured = raw.openfga.is_some() || ProcessEnv.get("OPENFGA_API_URL").is_some();
    let mut sections = HashMap::new();
    let mut seen: Vec<String> = Vec::new();
    for s in SECTIONS {
        let result = if s.name == "routes" {
            let openfga_ok = sections.contains_key("openfga");
            let keep: &[&str] = if openfga_ok {
                &["routes", "openfga"]
            } else {
                &["routes"]
            };
            resolve_alone(&text, base, keep, openfga_configured && !openfga_ok)
        } else {
            resolve_alone(&text, base, &[s.name], false)
        };
        match result {
            Ok(c) => {
                sections.insert(s.name, c);
            }
            Err(e) => {
                let line = e.to_string();
                if !seen.contains(&line) {
                    r.fail("config", &line);
                    seen.push(line);
                }
            }
        }
    }
    // Every section is fine alone: the problem is between them (no credential source at all).
    let line = whole.to_string();
    if !seen.contains(&line) {
        r.fail("config", line);
    }
    Some(Configs {
        full: None,
        sections,
        raw,
    })
}

// ---------------------------------------------------------------------------------------------
// Reachability.
// ---------------------------------------------------------------------------------------------

fn millis(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// One GET: the status, how long it took and the body (small documents only are probed).
async fn probe(
    url: &str,
    timeout: Duration,
) -> Result<(reqwest::StatusCode, Duration, String), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let started = Instant::now();
    let resp = crate::http_client::client(timeout)
        .get(parsed)
        .send()
        .await
        .map_err(|e| crate::http_client::describe(&e, timeout))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    Ok((status, started.elapsed(), body))
}

/// The key source URL as written, when the jwt settings are invalid: whether Keycloak answers
/// does not depend on, say, a missing realm.
fn raw_key_source_url(raw: &RawConfig) -> Option<String> {
    let var = |n: &str| ProcessEnv.get(n).map(|v| v.trim().to_string());
    var("AUTH_PUBLIC_KEY_URL")
        .or_else(|| raw.jwt.jwks_url.clone())
        .or_else(|| {
            let base = var("KEYCLOAK_URL")
                .or_else(|| var("KEYCLOAK_SERVER_URL"))
                .or_else(|| raw.jwt.keycloak_url.clone())?;
            Some(
                match var("KEYCLOAK_REALM").or_else(|| raw.jwt.keycloak_realm.clone()) {
                    Some(realm) => discovery_url(&base, &realm),
                    None => base,
                },
            )
        })
}

fn raw_openfga_url(raw: &RawConfig) -> Option<String> {
    ProcessEnv
        .get("OPENFGA_API_URL")
        .map(|v| v.trim().to_string())
        .or_else(|| raw.openfga.as_ref().and_then(|o| o.api_url.clone()))
}

/// `GET /healthz` on OpenFGA's HTTP API. `true` when it is worth asking for the store.
async fn probe_openfga(r: &mut Report, api_url: &str, timeout: Duration) -> bool {
    let url = format!("{}/healthz", api_url.trim_end_matches('/'));
    match probe(&url, timeout).await {
        Ok((status, took, body)) if status.is_success() => {
            let serving = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("status").and_then(|s| s.as_str()).map(String::from))
                .unwrap_or_else(|| "up".into());
            r.ok(
                "openfga api",
                format!("{url}: {serving} in {}", millis(took)),
            );
            true
        }
        Ok((status, _, _)) if status.is_server_error() || status.as_u16() == 429 => {
            r.fail("openfga api", format!("{url}: HTTP {status}: not serving"));
            false
        }
        // A proxy in front may not pass /healthz on; the store lookup will tell.
        Ok((status, took, _)) => {
            r.warn(
                "openfga api",
                format!(
                    "{url}: HTTP {status} in {} (a proxy in front?)",
                    millis(took)
                ),
            );
            true
        }
        Err(e) => {
            r.fail("openfga api", format!("{api_url} not reachable: {e}"));
            false
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The checks.
// ---------------------------------------------------------------------------------------------

/// What the signing key check left for the token check.
enum Keys {
    /// The jwt settings are invalid.
    Unchecked,
    /// No key source configured: bearer tokens are refused.
    Off,
    /// Configured, but no key could be loaded.
    Failed,
    Ready(Box<JwtVerifier>),
}

async fn check_signing_keys(r: &mut Report, c: &Configs) -> Keys {
    let Some(config) = c.get("jwt") else {
        r.skip("signing keys", Configs::invalid("jwt"));
        if let Some(url) = raw_key_source_url(&c.raw) {
            let timeout = crate::config::DEFAULT_FETCH_TIMEOUT;
            match probe(&url, timeout).await {
                Ok((status, took, _)) if status.is_success() => r.ok(
                    "key source",
                    format!("{url}: HTTP {status} in {}", millis(took)),
                ),
                Ok((status, took, _)) => r.warn(
                    "key source",
                    format!("{url}: answers HTTP {status} in {}", millis(took)),
                ),
                Err(e) => r.fail(
                    "key source",
                    format!("Keycloak/JWKS not reachable: {url}: {e}"),
                ),
            }
        }
        return Keys::Unchecked;
    };
    let Some(source) = JwksKeySource::new(&config.jwt) else {
        r.ok(
            "signing keys",
            "no JWT key source configured: bearer tokens are refused",
        );
        return Keys::Off;
    };
    let source: Arc<dyn KeySource> = Arc::new(source);
    // The fetch is the reachability check: through discovery for KEYCLOAK_URL, as the server
    // does it.
    let started = Instant::now();
    let loaded = match source.refresh().await {
        Ok(n) => {
            r.ok(
                "signing keys",
                format!(
                    "{n} key{} from {} (kids: {}) in {}",
                    if n == 1 { "" } else { "s" },
                    source.describe(),
                    source.key_ids().join(", "),
                    millis(started.elapsed())
                ),
            );
            true
        }
        Err(e) => {
            match (&config.jwt.source, &e) {
                (KeySourceConfig::File(_), _) => {
                    r.fail("signing keys", format!("jwt.jwks_file: {e}"))
                }
                (_, KeyError::Empty { .. }) => r.fail("signing keys", e),
                _ => r.fail("signing keys", format!("Keycloak/JWKS not reachable: {e}")),
            }
            false
        }
    };
    let verifier = JwtVerifier::new(&config.jwt, source, system_clock());
    match verifier.expected_issuer() {
        Some(i) => r.ok("issuer", format!("tokens must have iss = {i}")),
        None if loaded || !matches!(config.jwt.source, KeySourceConfig::Discovery { .. }) => r.warn(
            "issuer",
            "not checked (set JWT_ISSUER or use KEYCLOAK_URL discovery): any issuer signing with these keys is accepted",
        ),
        None => r.skip("issuer", "learned from OIDC discovery, which failed (see signing keys)"),
    }
    match &config.jwt.audience {
        Some(a) => r.ok("audience", format!("tokens must have {a} in aud")),
        None => r.warn("audience", "not checked (set JWT_AUDIENCE)"),
    }
    if loaded {
        Keys::Ready(Box::new(verifier))
    } else {
        Keys::Failed
    }
}

/// `None` when API keys are off, the settings are invalid or the file cannot be loaded.
fn check_api_keys(r: &mut Report, c: &Configs) -> Result<Option<Arc<dyn ApiKeyStore>>, String> {
    let Some(config) = c.get("api_keys") else {
        r.skip("api keys", Configs::invalid("api_keys"));
        return Err("the api_keys settings are invalid (see config)".into());
    };
    if let Some(x) = &config.api_key_exchange {
        // Not called here: doctor has no key to exchange, and the service's answer to none is 400.
        r.ok(
            "api key service",
            format!(
                "keys the file does not hold go to {} (timeout {}, tokens reused at most {}); not probed",
                x.url,
                humantime::format_duration(x.timeout),
                humantime::format_duration(x.cache_ttl)
            ),
        );
    }
    let Some(cfg) = &config.api_keys else {
        if config.api_key_exchange.is_none() {
            r.ok("api keys", "no API_KEYS_FILE: API keys are refused");
        }
        return Ok(None);
    };
    let options = StoreOptions {
        bcrypt_concurrency: cfg.bcrypt_concurrency,
        lookup_secret: cfg.lookup_secret.clone(),
    };
    match FileApiKeyStore::open_with(&cfg.file, system_clock(), &options) {
        Ok(store) => {
            r.ok(
                "api keys",
                format!(
                    "{} keys in {} (header {}, {} the app)",
                    store.len(),
                    cfg.file.display(),
                    config.api_key_header.name,
                    if config.api_key_header.forward_to_app {
                        "forwarded to"
                    } else {
                        "removed before"
                    }
                ),
            );
            Ok(Some(Arc::new(store)))
        }
        Err(e) => {
            r.fail("api keys", &e);
            Err("the API key file could not be loaded (see api keys)".into())
        }
    }
}

fn check_principals(r: &mut Report, c: &Configs) -> Option<Principals> {
    let Some(config) = c.get("principals") else {
        r.skip("principals", Configs::invalid("principals"));
        return None;
    };
    let listed = &config.principals.service_principals;
    if !listed.is_empty() || config.principals.require_listed {
        r.ok(
            "principals",
            format!(
                "{} service principals listed{}",
                listed.len(),
                if config.principals.require_listed {
                    "; unlisted ones get 403"
                } else {
                    ""
                }
            ),
        );
    }
    for sp in listed.iter().filter(|sp| !sp.enabled) {
        r.warn(
            "principals",
            format!(
                "service principal {} is disabled: its tokens and keys get 403",
                sp.id
            ),
        );
    }
    Some(Principals::new(&config.principals))
}

fn check_cors(r: &mut Report, c: &Configs) {
    let Some(config) = c.get("cors") else {
        r.skip("cors", Configs::invalid("cors"));
        return;
    };
    if config.cors.allowed_origins.is_empty() {
        r.ok("cors", "no CORS_ORIGINS: browser preflights are refused");
    } else {
        r.ok(
            "cors",
            format!("origins {}", config.cors.allowed_origins.join(", ")),
        );
    }
}

/// Reachability, then the store and model the way the server resolves them, then every
/// relation the rules name against the model. `true` when OpenFGA is off or ready.
async fn check_openfga(r: &mut Report, c: &Configs, wait: Duration) -> bool {
    let timeout = wait.max(Duration::from_secs(1));
    let Some(config) = c.get("openfga") else {
        if let Some(url) = raw_openfga_url(&c.raw) {
            probe_openfga(r, &url, timeout).await;
        }
        r.skip("openfga", Configs::invalid("openfga"));
        return false;
    };
    let Some(fga) = &config.openfga else {
        r.ok(
            "openfga",
            "not configured (no OPENFGA_API_URL): rules cannot ask for relationships",
        );
        return true;
    };
    if !probe_openfga(r, &fga.api_url, timeout).await {
        r.skip(
            "openfga",
            "store and model not checked: OpenFGA does not answer (see openfga api)",
        );
        return false;
    }
    // Retried like the server does while OpenFGA is starting, up to --wait.
    let deadline = Instant::now() + wait;
    let client = loop {
        match OpenFgaClient::connect(fga).await {
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => break other,
        }
    };
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            r.fail("openfga", e);
            return false;
        }
    };
    let rules = c
        .get("routes")
        .map(|rc| RuleSet::compile(&rc.routes, Some(fga)));
    match rules {
        Some(Ok(rules)) => {
            if let Err(e) = client.validate(&rules.relation_refs()) {
                r.fail("openfga", e);
                return false;
            }
            r.ok("openfga", client.describe());
            true
        }
        _ => {
            r.ok(
                "openfga",
                format!(
                    "{}; the rules' relations not checked against the model: the routes settings are invalid (see config)",
                    client.describe()
                ),
            );
            true
        }
    }
}

pub async fn run(args: Options) -> ExitCode {
    let mut r = Report {
        findings: Vec::new(),
        json: args.json,
    };
    let wait = Duration::from_secs(args.wait);
    let path = args.config.clone();
    let Some(configs) = check_config(&mut r, &path) else {
        return finish(&r, true);
    };
    let config_failed = configs.full.is_none();

    let keys = check_signing_keys(&mut r, &configs).await;
    let api_keys = check_api_keys(&mut r, &configs);
    let principals = check_principals(&mut r, &configs);
    check_cors(&mut r, &configs);
    check_rollout(&mut r, &configs);
    let openfga_ready = check_openfga(&mut r, &configs, wait).await;

    // A credential on its own.
    if let Some(token) = &args.token {
        let fp = crate::authn::fingerprint(token);
        match &keys {
            Keys::Unchecked => r.skip("token", format!("sha256:{fp}… {}", Configs::invalid("jwt"))),
            Keys::Off => r.fail("token", "no JWT key source configured"),
            Keys::Failed => r.skip(
                "token",
                format!("sha256:{fp}… not verified: no signing keys loaded (see signing keys)"),
            ),
            Keys::Ready(jwt) => match jwt.authenticate(token.trim()).await {
                Ok(p) => r.ok(
                    "token",
                    format!(
                        "sha256:{fp}… valid: {} ({}), roles [{}], scopes [{}], kid {}",
                        p.subject,
                        p.kind.as_str(),
                        p.roles.join(", "),
                        p.scopes.join(" "),
                        p.key_id
                    ),
                ),
                Err(e) => r.fail("token", format!("sha256:{fp}… {e}")),
            },
        }
    }
    if let Some(key) = &args.api_key {
        let fp = crate::authn::fingerprint(key);
        match (&api_keys, &principals) {
            (Err(why), _) => r.skip("api key", format!("sha256:{fp}… not verified: {why}")),
            (_, None) => r.skip(
                "api key",
                format!("sha256:{fp}… {}", Configs::invalid("principals")),
            ),
            (Ok(None), _) => r.fail("api key", "no API_KEYS_FILE configured"),
            (Ok(Some(store)), Some(principals)) => match store
                .authenticate(key.trim())
                .await
                .and_then(|p| principals.admit(p))
            {
                Ok(p) => r.ok(
                    "api key",
                    format!(
                        "sha256:{fp}… valid: {} (id {}), scopes [{}]",
                        p.subject,
                        p.key_id,
                        p.scopes.join(" ")
                    ),
                ),
                Err(e) => r.fail("api key", format!("sha256:{fp}… {e}")),
            },
        }
    }

    // A whole request: it goes through everything above, so it runs only when all of it did.
    if let Some(path) = &args.path {
        run_check(&mut r, &args, path, &configs, openfga_ready, wait).await;
    }
    finish(&r, config_failed)
}

/// The request check: [`crate::explain`]'s, on the state a server would build from this
/// config (failures above included: what Envoy would get now, a 401 while Keycloak is down,
/// is the point), summed up in one finding.
async fn run_check(
    r: &mut Report,
    args: &Options,
    path: &str,
    configs: &Configs,
    openfga_ready: bool,
    wait: Duration,
) {
    if configs.get("request").is_none() {
        r.skip("request", Configs::invalid("request"));
        return;
    }
    let Some(config) = &configs.full else {
        r.skip(
            "check",
            format!("{} {path} not run: the config is invalid", args.method),
        );
        return;
    };
    // The state connects to OpenFGA in the background, as the server does; wait for it only
    // when it answered doctor, else check now and show the answer a request gets meanwhile.
    let wait = if openfga_ready { wait } else { Duration::ZERO };
    let loaded = match crate::explain::load(config, wait).await {
        Ok(l) => l,
        // Its cause is a failure above (a key file, the API key file): not a second problem.
        Err(e) if r.failures() > 0 => {
            r.skip(
                "check",
                format!(
                    "{} {path} not run: the sidecar would not start: {e}",
                    args.method
                ),
            );
            return;
        }
        Err(e) => {
            r.fail("startup", e);
            return;
        }
    };
    let spec = crate::explain::RequestSpec {
        method: args.method.clone(),
        path: path.to_string(),
        host: String::new(),
        headers: args
            .origin
            .iter()
            .map(|o| ("origin".to_string(), o.clone()))
            .collect(),
        body: args.body.as_ref().map(|b| b.as_bytes().to_vec()),
        token: args.token.clone(),
        api_key: args.api_key.clone(),
    };
    let e = crate::explain::run_request(&loaded.state.policy(), &spec).await;
    let request = format!("{} {path}", args.method.to_ascii_uppercase());
    match (&e.checked.decision, &e.checked.dry_run) {
        (Decision::Allow(_), Some(d)) => r.warn(
            "check",
            format!(
                "{request} allowed by routes.dry_run; the rules deny {}: {}",
                d.http_status, d.detail
            ),
        ),
        (Decision::Allow(a), None) => r.ok(
            "check",
            format!(
                "{request} allowed by rule {}{}",
                a.rule,
                if a.relations.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", a.relations.join("; "))
                }
            ),
        ),
        (Decision::Deny(d), _) => r.fail(
            "check",
            format!("{request} denied {}: {}", d.http_status, d.detail),
        ),
    }
    for o in &e.checked.shadow {
        r.ok(
            "shadow",
            format!("{}: {}: {}", o.rule, o.outcome.as_str(), o.reason),
        );
    }
}

/// A rollout in progress: the dry run (a warning: denies are allowed while it is on) and the
/// shadow rules (evaluated and logged, never enforced).
fn check_rollout(r: &mut Report, c: &Configs) {
    let Some(config) = c.get("routes") else {
        return;
    };
    if config.routes.dry_run {
        r.warn(
            "routes",
            "dry run is on (routes.dry_run): requests the rules deny with 401/403 are allowed and logged as would_deny",
        );
    }
    let shadow: Vec<String> = config
        .routes
        .rules
        .iter()
        .filter(|rule| rule.mode == crate::config::RuleMode::Shadow)
        .map(|rule| rule.name.clone().unwrap_or_else(|| rule.path.clone()))
        .collect();
    if !shadow.is_empty() {
        r.ok(
            "routes",
            format!(
                "shadow rules, evaluated and logged, never enforced: {}",
                shadow.join(", ")
            ),
        );
    }
}

fn finish(r: &Report, config_failed: bool) -> ExitCode {
    let failures = r.failures();
    if r.json {
        match serde_json::to_string_pretty(&r.findings) {
            Ok(text) => say(text),
            Err(e) => {
                eprintln!("authz-sidecar: cannot write the findings as JSON: {e}");
                return ExitCode::from(1);
            }
        }
    } else if failures == 0 {
        say("no problems found");
    } else {
        say(format!("{failures} problem(s) found"));
    }
    if config_failed {
        ExitCode::from(2)
    } else if failures > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Where `doctor` looks by default (for the README).
pub fn default_config() -> PathBuf {
    PathBuf::from("deploy/local/sidecar.yaml")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A variable `crate::config` reads but no section lists would reach every section's
    /// resolution: this keeps the list in step with the config.
    #[test]
    fn every_variable_the_config_reads_belongs_to_a_section() {
        let source = include_str!("config.rs");
        let listed: Vec<&str> = SECTIONS
            .iter()
            .flat_map(|s| s.vars.iter().copied())
            .collect();
        let mut read = Vec::new();
        for call in source.split("env_any(env, &[").skip(1) {
            let names = call.split(']').next().unwrap_or_default();
            read.extend(names.split(',').map(|n| n.trim().trim_matches('"')));
        }
        assert!(read.len() > 10, "the scan found the variables: {read:?}");
        for name in read {
            assert!(listed.contains(&name), "{name} is in no doctor section");
        }
    }

    #[test]
    fn a_section_resolves_against_stand_ins_for_the_others() {
        let dir = tempfile::tempdir().unwrap();
        // The rules need OpenFGA; the openfga section is broken (no api_url) but present.
        let text = "openfga: { store_id: s }\nroutes: { rules: [ { path: \"/t/{id}\", check: { all: [ { relation: r, object: \"doc:{id}\" } ] } } ] }\n";
        resolve_alone(text, dir.path(), &["routes"], true).unwrap();
        let e = resolve_alone(text, dir.path(), &["routes"], false).unwrap_err();
        assert!(
            e.to_string().contains("relationship checks need OpenFGA"),
            "{e}"
        );
        let e = resolve_alone(text, dir.path(), &["openfga"], false).unwrap_err();
        assert!(e.to_string().starts_with("OPENFGA_API_URL"), "{e}");
        // Sections left out are defaults: a broken cors section does not reach jwt.
        let text = "cors: { allowed_origins: [\"*\"] }\njwt: { jwks_file: k.json }\n";
        assert!(resolve_alone(text, dir.path(), &["jwt"], false).is_ok());
        assert!(resolve_alone(text, dir.path(), &["cors"], false).is_err());
    }
}
