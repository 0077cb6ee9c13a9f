//! `authz-sidecar doctor`: checks each backend the config names, the way the sidecar will
//! use it, and prints one line per finding, so each failure of the app's troubleshooting
//! guide (expired token, wrong key, missing claims, Keycloak unreachable, OpenFGA store or
//! model not set, missing tuples, inactive key, disabled service principal, CORS) is named
//! in one sentence. With `--token`/`--api-key` and `--path` it runs a real check.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::clock::system_clock;
use crate::config::Config;
use crate::decision::Decision;
use crate::request::CheckInput;

#[derive(Args, Debug)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub config: crate::cli::ConfigArg,
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
}

struct Report {
    problems: usize,
}

impl Report {
    fn ok(&mut self, what: &str, line: impl std::fmt::Display) {
        println!("ok    {what:<14} {line}");
    }
    fn bad(&mut self, what: &str, line: impl std::fmt::Display) {
        self.problems += 1;
        println!("FAIL  {what:<14} {line}");
    }
    fn info(&mut self, what: &str, line: impl std::fmt::Display) {
        println!("      {what:<14} {line}");
    }
}

pub async fn run(args: DoctorArgs) -> ExitCode {
    let mut r = Report { problems: 0 };
    let config = match Config::load(&args.config.config) {
        Ok(c) => {
            r.ok(
                "config",
                format!("{} is valid", args.config.config.display()),
            );
            c
        }
        Err(e) => {
            r.bad("config", &e);
            return ExitCode::from(2);
        }
    };
    let shutdown = CancellationToken::new();
    let built = match crate::state::build(&config, system_clock(), &shutdown).await {
        Ok(b) => b,
        Err(e) => {
            r.bad("startup", format!("{e:#}"));
            return ExitCode::from(2);
        }
    };
    let state = built.state.policy();
    let mut fatal = built.fatal;

    // Keys
    match &state.authn.jwt {
        None => r.info(
            "signing keys",
            "no JWT key source configured: bearer tokens are refused",
        ),
        Some(jwt) => {
            let src = jwt.key_source();
            if src.ready() {
                r.ok(
                    "signing keys",
                    format!(
                        "{} keys from {} (kids: {})",
                        src.key_ids().len(),
                        src.describe(),
                        src.key_ids().join(", ")
                    ),
                );
            } else {
                match src.refresh().await {
                    Ok(n) => r.ok("signing keys", format!("{n} keys from {}", src.describe())),
                    Err(e) => r.bad("signing keys", format!("Keycloak/JWKS not reachable: {e}")),
                }
            }
            match jwt.expected_issuer() {
                Some(i) => r.info("issuer", format!("tokens must have iss = {i}")),
                None => r.info(
                    "issuer",
                    "not checked (set JWT_ISSUER or use KEYCLOAK_URL discovery)",
                ),
            }
            match &config.jwt.audience {
                Some(a) => r.info("audience", format!("tokens must have {a} in aud")),
                None => r.info("audience", "not checked (set JWT_AUDIENCE)"),
            }
        }
    }
    // API keys
    match (&config.api_keys, &state.authn.api_keys) {
        (Some(cfg), Some(store)) => r.ok(
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
        ),
        _ => r.info("api keys", "no API_KEYS_FILE: API keys are refused"),
    }
    for sp in &config.principals.service_principals {
        if !sp.enabled {
            r.info(
                "principals",
                format!(
                    "service principal {} is disabled: its tokens and keys get 403",
                    sp.id
                ),
            );
        }
    }
    if config.cors.allowed_origins.is_empty() {
        r.info("cors", "no CORS_ORIGINS: browser preflights are refused");
    } else {
        r.ok(
            "cors",
            format!("origins {}", config.cors.allowed_origins.join(", ")),
        );
    }

    // OpenFGA: wait for the background connection like the server does.
    if let Some(checker) = state.authz.checker() {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(args.wait);
        loop {
            if checker.ready() {
                r.ok("openfga", checker.describe());
                break;
            }
            if let Ok(f) = fatal.try_recv() {
                r.bad("openfga", f);
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                r.bad("openfga", checker.describe());
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    // A credential on its own.
    let mut input = match &args.path {
        Some(p) => match CheckInput::http_with(&args.method, p, state.path_policy) {
            Ok(i) => Some(i),
            Err(e) => {
                r.bad("request", e);
                None
            }
        },
        None => None,
    };
    if let Some(token) = &args.token {
        let fp = crate::authn::fingerprint(token);
        match &state.authn.jwt {
            None => r.bad("token", "no JWT key source configured"),
            Some(jwt) => match jwt.authenticate(token.trim()).await {
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
                Err(e) => r.bad("token", format!("sha256:{fp}… {e}")),
            },
        }
        input = input.map(|i| i.with_header("authorization", &format!("Bearer {}", token.trim())));
    }
    if let Some(key) = &args.api_key {
        let fp = crate::authn::fingerprint(key);
        match &state.authn.api_keys {
            None => r.bad("api key", "no API_KEYS_FILE configured"),
            Some(store) => match store
                .authenticate(key.trim())
                .await
                .and_then(|p| state.authn.principals.admit(p))
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
                Err(e) => r.bad("api key", format!("sha256:{fp}… {e}")),
            },
        }
        let header = state.authn.api_key_header.clone();
        input = input.map(|i| i.with_header(&header, key.trim()));
    }
    if let Some(mut input) = input {
        if let Some(b) = &args.body {
            input = input.with_body(b.as_bytes());
        }
        if let Some(o) = &args.origin {
            input = input.with_header("origin", o);
        }
        input.request_id = "doctor".into();
        match crate::pipeline::check(&state, &input).await {
            Decision::Allow(a) => r.ok(
                "check",
                format!(
                    "{} {} allowed by rule {}{}",
                    input.method,
                    input.path,
                    a.rule,
                    if a.relations.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", a.relations.join("; "))
                    }
                ),
            ),
            Decision::Deny(d) => r.bad(
                "check",
                format!(
                    "{} {} denied {}: {}",
                    input.method, input.path, d.http_status, d.detail
                ),
            ),
        }
    }
    shutdown.cancel();
    let _ = Arc::strong_count(&state);
    if r.problems == 0 {
        println!("no problems found");
        ExitCode::SUCCESS
    } else {
        println!("{} problem(s) found", r.problems);
        ExitCode::from(1)
    }
}

/// Where `doctor` looks by default (for the README).
pub fn default_config() -> PathBuf {
    PathBuf::from("deploy/local/sidecar.yaml")
}
