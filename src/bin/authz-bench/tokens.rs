//! `authz-bench fresh-tokens`: what verifying a token the sidecar has never seen costs, per
//! core, against the raw cost of `jsonwebtoken`'s signature check on the same tokens.
//!
//! For each algorithm (RS256 with a 2048-bit RSA key, ES256 with P-256), `--tokens` distinct
//! tokens are signed first (not measured), then verified one after the other on this thread:
//!
//! - **raw**: `jsonwebtoken::decode` with a prepared `DecodingKey` (signature and JSON only);
//! - **sidecar**: the sidecar's own `JwtVerifier::authenticate` with its token cache off
//!   (`token_cache_size: 0`), keys from a JWKS file: structure, algorithm allowlist, key
//!   lookup, signature, claims, the principal.
//!
//! Checks/s per core = tokens / CPU seconds of this process over the run (`/proc/self/stat`,
//! 10 ms ticks: runs last a second or more). Through gRPC, the same with the whole server is
//! `scripts/bench` mode `fresh-tokens` (`load --mint-tokens N --requests N`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use authz_sidecar::authn::jwks::JwksKeySource;
use authz_sidecar::authn::jwt::{JwtVerifier, mint};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Serialize;
use serde_json::{Value, json};

use crate::procfs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Distinct tokens per algorithm.
    #[arg(long, default_value_t = 2000)]
    tokens: usize,
    /// rsa-a.pem / .pub.pem, ec256.pem / .pub.pem and jwks.json (kids rsa-a, ec256).
    #[arg(long, default_value = "tests/fixtures/keys")]
    keys: PathBuf,
    /// Append one JSON line per algorithm here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Row {
    alg: String,
    tokens: usize,
    raw_per_core: f64,
    sidecar_per_core: f64,
    raw_us: f64,
    sidecar_us: f64,
}

const ISS: &str = "https://bench/realms/r";
const AUD: &str = "mcp-server";

fn cpu() -> f64 {
    procfs::cpu_seconds("self").unwrap_or(0.0)
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    if args.tokens == 0 {
        bail!("--tokens must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Absolute: the config below is read as if it lived in `/`.
    let keys = std::fs::canonicalize(&args.keys)
        .with_context(|| format!("--keys {}", args.keys.display()))?;
    let jwks = keys.join("jwks.json");
    let yaml = format!(
        "jwt: {{ jwks_file: {}, issuer: {ISS}, audience: {AUD}, algorithms: [RS256, ES256], token_cache_size: 0 }}\n",
        serde_json::to_string(&jwks.display().to_string())?
    );
    let config = authz_sidecar::Config::from_yaml(
        &yaml,
        std::path::Path::new("/"),
        &std::collections::BTreeMap::new(),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let source = JwksKeySource::new(&config.jwt).context("a JWKS file key source")?;
    let verifier = JwtVerifier::new(
        &config.jwt,
        Arc::new(source),
        authz_sidecar::clock::system_clock(),
    );
    let now = authz_sidecar::clock::now_secs();

    let mut rows = Vec::new();
    for (alg, kid) in [(Algorithm::RS256, "rsa-a"), (Algorithm::ES256, "ec256")] {
        let read = |name: String| {
            std::fs::read(keys.join(&name)).with_context(|| format!("{name} in --keys"))
        };
        let private = read(format!("{kid}.pem"))?;
        let public = read(format!("{kid}.pub.pem"))?;
        let tokens = (0..args.tokens)
            .map(|i| {
                let claims = json!({
                    "sub": format!("bench-{i}"), "preferred_username": format!("bench-{i}"),
                    "iss": ISS, "aud": AUD, "iat": now, "exp": now + 3600,
                    "realm_access": {"roles": ["admin"]}, "scope": "openid",
                });
                mint(&private, alg, kid, &claims).context("signing a token")
            })
            .collect::<anyhow::Result<Vec<_>>>()?;

        let key = match alg {
            Algorithm::ES256 => DecodingKey::from_ec_pem(&public)?,
            _ => DecodingKey::from_rsa_pem(&public)?,
        };
        let mut validation = Validation::new(alg);
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        // One untimed verification each: the JWKS file is read on the sidecar's first use.
        jsonwebtoken::decode::<Value>(&tokens[0], &key, &validation)?;
        runtime
            .block_on(verifier.authenticate(&tokens[0]))
            .map_err(|e| anyhow::anyhow!("the sidecar refused a bench token: {e}"))?;

        let (cpu0, wall0) = (cpu(), Instant::now());
        for t in &tokens {
            jsonwebtoken::decode::<Value>(t, &key, &validation)?;
        }
        let raw = (cpu() - cpu0, wall0.elapsed().as_secs_f64());
        let (cpu0, wall0) = (cpu(), Instant::now());
        runtime.block_on(async {
            for t in &tokens {
                verifier
                    .authenticate(t)
                    .await
                    .map_err(|e| anyhow::anyhow!("the sidecar refused a bench token: {e}"))?;
            }
            anyhow::Ok(())
        })?;
        let sidecar = (cpu() - cpu0, wall0.elapsed().as_secs_f64());
        // CPU time, unless the run was too short for its 10 ms ticks: then wall time (this
        // thread alone was busy).
        let per_core =
            |(cpu, wall): (f64, f64)| tokens.len() as f64 / if cpu >= 0.1 { cpu } else { wall };
        let (raw_per_core, sidecar_per_core) = (per_core(raw), per_core(sidecar));
        rows.push(Row {
            alg: format!("{alg:?}"),
            tokens: tokens.len(),
            raw_per_core,
            sidecar_per_core,
            raw_us: 1e6 / raw_per_core,
            sidecar_us: 1e6 / sidecar_per_core,
        });
    }

    println!(
        "| fresh tokens | tokens | raw jsonwebtoken verifies/s per core | sidecar checks/s per core (JwtVerifier, cache off) | raw µs | sidecar µs | sidecar / raw cost |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.2}x |",
            r.alg,
            r.tokens,
            r.raw_per_core,
            r.sidecar_per_core,
            r.raw_us,
            r.sidecar_us,
            r.sidecar_us / r.raw_us
        );
    }
    if let Some(path) = &args.json {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        for r in &rows {
            writeln!(f, "{}", serde_json::to_string(r)?)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
