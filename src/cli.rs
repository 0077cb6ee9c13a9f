//! The command line: `serve`, `doctor`, `check`, `check-config`, `token mint`,
//! `token inspect` and `apikey new`.
//! Every command that reads a config exits 2 with one line naming the key when it is bad.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

#[derive(Parser, Debug)]
#[command(
    name = "authz-sidecar",
    version,
    about = "Envoy ext_authz sidecar: Keycloak JWTs, API keys, route rules, OpenFGA"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct ConfigArg {
    /// YAML config file.
    #[arg(
        long,
        short = 'c',
        env = "AUTHZ_CONFIG",
        default_value = "deploy/local/sidecar.yaml"
    )]
    pub config: PathBuf,
}

#[derive(Args, Debug)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// A bearer token to verify (never printed; its hash is).
    #[arg(long, env = "DOCTOR_TOKEN")]
    pub token: Option<String>,
    /// An API key to verify (never printed; its hash is).
    #[arg(long, env = "DOCTOR_API_KEY")]
    pub api_key: Option<String>,
    /// Run a full check of this request path (with --method), e.g. /tools/chat/execute.
    #[arg(long)]
    pub path: Option<String>,
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// JSON body for --path (MCP tools/call and other body rules).
    #[arg(long)]
    pub body: Option<String>,
    /// Origin header for --path (CORS).
    #[arg(long)]
    pub origin: Option<String>,
    /// Seconds to wait for OpenFGA and the key source.
    #[arg(long, default_value_t = 5)]
    pub wait: u64,
    /// Print the findings as a JSON array of {check, status, detail} (for CI).
    #[arg(long)]
    pub json: bool,
}

impl DoctorArgs {
    fn options(self) -> crate::doctor::Options {
        crate::doctor::Options {
            config: self.config.config,
            token: self.token,
            api_key: self.api_key,
            path: self.path,
            method: self.method,
            body: self.body,
            origin: self.origin,
            wait: self.wait,
            json: self.json,
        }
    }
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// YAML config file (the server's: its keys, API keys, rules and OpenFGA are used).
    #[arg(long, short = 'c', env = "AUTHZ_CONFIG")]
    pub config: PathBuf,
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// Path and query, as the app receives it: /tools/search/execute?x=1
    #[arg(long)]
    pub path: String,
    /// Host (:authority); none by default, as a direct gRPC call.
    #[arg(long, default_value = "")]
    pub host: String,
    /// A request header NAME:VALUE (repeatable).
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// A file holding the request body (JSON for MCP and other body rules).
    #[arg(long)]
    pub body: Option<PathBuf>,
    /// A bearer token, sent as Authorization: Bearer (never printed; its hash is).
    #[arg(long, conflicts_with = "api_key")]
    pub token: Option<String>,
    /// An API key, sent in the configured header (never printed; its hash is).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Show every step: credential, rules tried and why not, principal, OpenFGA tuples.
    #[arg(long)]
    pub explain: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for OpenFGA to connect.
    #[arg(long, default_value_t = 5)]
    pub wait: u64,
}

impl CheckArgs {
    /// The options, or a usage error naming the argument.
    fn options(self) -> Result<crate::explain::Options, String> {
        let headers = self
            .headers
            .iter()
            .map(|h| crate::explain::parse_header(h))
            .collect::<Result<Vec<_>, _>>()?;
        let body = match &self.body {
            None => None,
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| format!("--body {}: cannot read: {e}", path.display()))?,
            ),
        };
        Ok(crate::explain::Options {
            config: self.config,
            request: crate::explain::RequestSpec {
                method: self.method,
                path: self.path,
                host: self.host,
                headers,
                body,
                token: self.token,
                api_key: self.api_key,
            },
            explain: self.explain,
            json: self.json,
            wait: Duration::from_secs(self.wait),
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the sidecar.
    Serve {
        /// YAML config file. Required: there is no default to serve with (the embedded
        /// default trusts a public dev key; pass deploy/local/sidecar.yaml to use it).
        #[arg(long, short = 'c', env = "AUTHZ_CONFIG")]
        config: PathBuf,
        /// gRPC listen address (HOST:PORT or unix:/path); overrides server.grpc_addr.
        #[arg(long, env = "AUTHZ_GRPC_ADDR")]
        grpc_addr: Option<String>,
        /// Ops HTTP listen address (HOST:PORT or "off"); overrides server.ops_addr.
        #[arg(long, env = "AUTHZ_OPS_ADDR")]
        ops_addr: Option<String>,
    },
    /// Validate the config and print what it resolves to.
    CheckConfig {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Check every backend the config names and explain, one line each, what is wrong.
    Doctor(DoctorArgs),
    /// Decide one request as the server would, and say why (--explain); exit 0 allowed,
    /// 1 denied, 2 bad usage or config.
    Check(CheckArgs),
    /// Tokens for local trials.
    #[command(subcommand)]
    Token(TokenCmd),
    /// API keys.
    #[command(subcommand)]
    Apikey(ApiKeyCmd),
}

// Parsed once per process: the size of the biggest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Sign a token with a local private key (deploy/local/dev-signing-key.pem is dev-only).
    Mint {
        #[arg(long, default_value = "deploy/local/dev-signing-key.pem")]
        key: PathBuf,
        #[arg(long, default_value = "dev-local-1")]
        kid: String,
        #[arg(long, default_value = "RS256")]
        alg: String,
        #[arg(long)]
        sub: String,
        /// preferred_username (defaults to --sub).
        #[arg(long)]
        username: Option<String>,
        /// Realm roles, comma-separated (realm_access.roles).
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        /// Scopes, comma-separated (the scope claim, space-joined).
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
        #[arg(long, default_value = "authz-sidecar-local")]
        iss: String,
        #[arg(long, default_value = "mcp-server")]
        aud: String,
        /// Lifetime, e.g. 15m, 1h.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Mint a client-credentials (service account) token for this client id.
        #[arg(long)]
        client_id: Option<String>,
    },
    /// Show a token's header, claims and times (decoded, not trusted); with --config, verify it
    /// the way the server does and print the principal or the exact failure.
    Inspect {
        /// The token, or - to read it from stdin (a leading "Bearer " is accepted). Prefer -:
        /// a token on the command line lands in shell history and the process list.
        token: Option<String>,
        /// Verify against this config's keys, issuer, audience and service principals.
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ApiKeyCmd {
    /// Append a new key's hashed record to the keys file and print the key (only once).
    New {
        /// user:<name> or service_principal:<id>
        #[arg(long)]
        principal: String,
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
        #[arg(long, env = "API_KEYS_FILE")]
        file: PathBuf,
        /// e.g. 365d; none by default.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<Duration>,
        #[arg(long)]
        description: Option<String>,
    },
}

pub use crate::console::say;

fn config_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("authz-sidecar: config error: {e}");
    ExitCode::from(2)
}

pub async fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve {
            config,
            grpc_addr,
            ops_addr,
        } => serve(config, grpc_addr, ops_addr).await,
        Command::CheckConfig { config } => match Config::load(&config.config).and_then(|c| {
            crate::authz::rules::RuleSet::from_config(&c)?;
            Ok(c)
        }) {
            Ok(c) => {
                say(format!("config ok: {}", config.config.display()));
                say(format!(
                    "  grpc: {}  ops: {}",
                    c.grpc_addr,
                    c.ops_addr.map_or("off".into(), |a| a.to_string())
                ));
                say(format!(
                    "  keys: {} (from {})",
                    c.jwt.source.describe(),
                    c.jwt.source_from
                ));
                let origin =
                    |from: Option<&str>| from.map_or(String::new(), |f| format!(" (from {f})"));
                say(format!(
                    "  issuer: {}{}",
                    c.jwt.issuer.as_deref().unwrap_or(match c.jwt.source {
                        crate::config::KeySourceConfig::Discovery { .. } =>
                            "the realm's, from OIDC discovery",
                        _ => "not checked",
                    }),
                    origin(c.jwt.issuer_from)
                ));
                say(format!(
                    "  audience: {}{}  realm: {}",
                    c.jwt.audience.as_deref().unwrap_or("not checked"),
                    origin(c.jwt.audience_from),
                    c.jwt.realm
                ));
                say(format!(
                    "  api keys: {}",
                    c.api_keys
                        .as_ref()
                        .map_or("off".into(), |a| a.file.display().to_string())
                ));
                if let Some(x) = &c.api_key_exchange {
                    say(format!("  api key service: {} (after the file)", x.url));
                }
                say(format!(
                    "  rules: {}  unmatched: {:?}  path policy: {}",
                    c.routes.rules.len(),
                    c.routes.unmatched,
                    c.request.path_policy.as_str()
                ));
                let shadow = c
                    .routes
                    .rules
                    .iter()
                    .filter(|r| r.mode == crate::config::RuleMode::Shadow)
                    .count();
                if c.routes.dry_run || shadow > 0 {
                    say(format!(
                        "  dry run: {}  shadow rules: {shadow} (logged, never enforced)",
                        if c.routes.dry_run {
                            "ON: 401/403 denies are answered with allows"
                        } else {
                            "off"
                        }
                    ));
                }
                say(format!(
                    "  openfga: {}",
                    c.openfga
                        .as_ref()
                        .map_or("off".into(), |f| f.api_url.clone())
                ));
                ExitCode::SUCCESS
            }
            Err(e) => config_error(e),
        },
        Command::Doctor(args) => crate::doctor::run(args.options()).await,
        Command::Check(args) => match args.options() {
            Ok(options) => crate::explain::run(options).await,
            Err(e) => {
                eprintln!("authz-sidecar: {e}");
                ExitCode::from(2)
            }
        },
        Command::Token(TokenCmd::Mint {
            key,
            kid,
            alg,
            sub,
            username,
            roles,
            scopes,
            iss,
            aud,
            ttl,
            client_id,
        }) => {
            let alg = match crate::config::parse_algorithm(&alg) {
                Ok(a) => a,
                Err(e) => return config_error(e),
            };
            let pem = match std::fs::read(&key) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("authz-sidecar: cannot read --key {}: {e}", key.display());
                    return ExitCode::from(2);
                }
            };
            let now = crate::clock::now_secs();
            let mut claims = serde_json::json!({
                "sub": sub, "iss": iss, "aud": aud, "iat": now, "exp": now + ttl.as_secs(),
                "preferred_username": username.unwrap_or_else(|| sub.clone()),
                "realm_access": {"roles": roles},
                "scope": scopes.join(" "),
            });
            if let Some(c) = client_id {
                claims["preferred_username"] = serde_json::json!(format!("service-account-{c}"));
                claims["client_id"] = serde_json::json!(c.clone());
                claims["azp"] = serde_json::json!(c);
            }
            match crate::authn::jwt::mint(&pem, alg, &kid, &claims) {
                Ok(t) => {
                    say(t);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("authz-sidecar: cannot sign with {}: {e}", key.display());
                    ExitCode::from(2)
                }
            }
        }
        Command::Token(TokenCmd::Inspect { token, config }) => {
            crate::inspect::run(token, config.as_deref()).await
        }
        Command::Apikey(ApiKeyCmd::New {
            principal,
            scopes,
            file,
            expires_in,
            description,
        }) => match crate::authn::api_key::append_new_key(
            &file,
            &principal,
            &scopes,
            expires_in,
            description.as_deref(),
        ) {
            Ok((key, record)) => {
                eprintln!(
                    "added {} for {} to {}",
                    record.id,
                    record.principal,
                    file.display()
                );
                say(key);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("authz-sidecar: {e}");
                ExitCode::from(2)
            }
        },
    }
}

async fn serve(path: PathBuf, grpc_addr: Option<String>, ops_addr: Option<String>) -> ExitCode {
    // SIGHUP reloads from here on, instead of ending the process (its default action).
    let hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("authz-sidecar: cannot handle SIGHUP: {e}");
            return ExitCode::from(1);
        }
    };
    // Flags are the same overrides as the environment variables, applied last, at startup
    // and on every reload alike.
    let source = crate::reload::ConfigSource::new(path.clone()).with_overrides(move |config| {
        apply_flags(config, grpc_addr.as_deref(), ops_addr.as_deref())
    });
    let (hash, config) = source.load();
    let config = match config {
        Ok(c) => c,
        Err(e) => return config_error(e),
    };
    // Held until serve returns: dropping it flushes the log lines still buffered.
    let _log_writer = match crate::telemetry::init_logging(&config.log, config.tracing.as_ref()) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("authz-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    let hash_label = hash.map(|h| h.to_string()).unwrap_or_default();
    tracing::info!(config = %path.display(), config_hash = %hash_label, version = env!("CARGO_PKG_VERSION"), keys = %config.jwt.source.describe(), "starting");
    let listeners = match crate::server::Listeners::bind(&config).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("authz-sidecar: {e:#}");
            return ExitCode::from(1);
        }
    };
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            shutdown.cancel();
        });
    }
    let (handle, requests) = crate::reload::channel();
    tokio::spawn(reload_on_sighup(hangups, handle));
    let reload = crate::server::Reload {
        source,
        hash,
        requests,
    };
    let served = crate::server::run_with(config, Some(reload), listeners, shutdown).await;
    // Drained: the last checks' spans go out before the process ends. The flush blocks (up to
    // the export timeout), so it runs off the runtime's worker threads.
    let _ = tokio::task::spawn_blocking(crate::tracing_export::shutdown).await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "stopped");
            eprintln!("authz-sidecar: {e:#}");
            let fatal_config = e.downcast_ref::<crate::state::Fatal>().is_some()
                || e.downcast_ref::<crate::config::ConfigError>().is_some()
                || e.downcast_ref::<crate::authn::api_key::ApiKeyFileError>()
                    .is_some();
            ExitCode::from(if fatal_config { 2 } else { 1 })
        }
    }
}

/// `--grpc-addr` and `--ops-addr` over the file and the environment.
fn apply_flags(
    config: &mut Config,
    grpc_addr: Option<&str>,
    ops_addr: Option<&str>,
) -> Result<(), crate::config::ConfigError> {
    if let Some(a) = grpc_addr.filter(|a| !a.is_empty()) {
        config.grpc_addr = crate::config::ListenAddr::parse("--grpc-addr", a)?;
    }
    if let Some(a) = ops_addr.filter(|a| !a.is_empty()) {
        config.ops_addr = if a == "off" {
            None
        } else {
            Some(a.parse().map_err(|_| {
                crate::config::ConfigError::invalid("--ops-addr", format!("{a:?} is not HOST:PORT"))
            })?)
        };
    }
    Ok(())
}

/// Each SIGHUP asks for a reload; the reload logs its own result line.
async fn reload_on_sighup(
    mut hangups: tokio::signal::unix::Signal,
    handle: crate::reload::ReloadHandle,
) {
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the config");
        if handle.reload(crate::reload::Cause::Sighup).await.is_none() {
            return;
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
