//! `fga-setup`: a store for the OpenFGA scenarios of scripts/bench, through OpenFGA's HTTP API:
//! create the store, write the authorization model, write the tuples (at most 100 a request,
//! OpenFGA's default limit). Prints the store id.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde_json::{Value, json};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// OpenFGA's HTTP API, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    api: String,
    #[arg(long, default_value = "authz-bench")]
    name: String,
    /// The model in JSON (deploy/openfga/model.json).
    #[arg(long)]
    model: PathBuf,
    /// A tuple `user relation object` (repeatable).
    #[arg(long = "tuple", value_name = "USER RELATION OBJECT")]
    tuples: Vec<String>,
}

async fn call(client: &reqwest::Client, url: String, body: Value) -> anyhow::Result<Value> {
    let r = client
        .post(&url)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = r.status();
    let text = r.text().await?;
    if !status.is_success() {
        bail!("POST {url}: HTTP {status}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("POST {url}: not JSON: {text}"))
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let model: Value = serde_json::from_str(
        &std::fs::read_to_string(&args.model)
            .with_context(|| format!("--model {}", args.model.display()))?,
    )
    .with_context(|| format!("--model {}: not JSON", args.model.display()))?;
    let mut keys = Vec::new();
    for t in &args.tuples {
        let parts: Vec<&str> = t.split_whitespace().collect();
        let [user, relation, object] = parts[..] else {
            bail!("--tuple {t:?}: expected `user relation object`");
        };
        keys.push(json!({"user": user, "relation": relation, "object": object}));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let api = args.api.trim_end_matches('/').to_string();
    let store = runtime.block_on(async {
        let client = reqwest::Client::new();
        let store = call(&client, format!("{api}/stores"), json!({"name": args.name})).await?;
        let store = store["id"]
            .as_str()
            .context("store creation answered without an id")?
            .to_string();
        let m = call(
            &client,
            format!("{api}/stores/{store}/authorization-models"),
            model,
        )
        .await?;
        let model_id = m["authorization_model_id"]
            .as_str()
            .context("model write answered without authorization_model_id")?
            .to_string();
        for chunk in keys.chunks(100) {
            call(
                &client,
                format!("{api}/stores/{store}/write"),
                json!({"writes": {"tuple_keys": chunk}, "authorization_model_id": model_id}),
            )
            .await?;
        }
        anyhow::Ok(store)
    })?;
    println!("{store}");
    Ok(ExitCode::SUCCESS)
}
