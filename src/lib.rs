//! authz-sidecar: an Envoy `ext_authz` gRPC server that authenticates callers (Keycloak JWTs,
//! API keys) and authorizes them with route rules and OpenFGA relationship checks.
//!
//! The pipeline of one check: [`request`] (edge in) → [`cors`] → [`authz::rules`] →
//! [`authn::Authenticator`] → [`authz::Authorizer`] → [`decision`] → [`response`] (edge out),
//! run by [`pipeline`] over one [`state::Policy`] and served by [`service`] / [`server`].
//!
//! # Layers
//!
//! Imports point down only; no module imports one above it, so there are no circles. From the
//! top:
//!
//! 1. `main` → [`cli`] → [`doctor`] → [`explain`] (`check --explain`: one request through
//!    the real pipeline, traced) → [`inspect`] → [`server`] (listeners, serving, drain) →
//!    [`reload`] (config file and SIGHUP) → [`ops`]
//! 2. [`service`] (gRPC adapter: loads the current policy once per request) → [`telemetry`] →
//!    [`response`] (proto edge out)
//! 3. [`state`] (composition root: `Backends` built once, `Policy` swappable)
//! 4. [`pipeline`] (the flow) → [`cors`] → [`decision`] (the one failure table)
//! 5. [`authz`] (`Authorizer`, rules, checker, cache) → [`authn`] (`Authenticator`)
//! 6. [`request`] (proto edge in) → [`proto`] → [`http_client`] → [`tracing_export`] (trace
//!    context and OTLP export)
//! 7. the ground floor, importing nothing: [`failure`] (failure kinds), [`clock`], [`console`]
//!    (command output), [`config`]
//!    (plain data)
//!
//! The design sketch puts `state` above `service`; here the adapter sits above the state
//! because it reads the current policy from it, while the composition root needs nothing from
//! the adapter (`server` wires the two). `LAYERS` in the test below is this list, and the test
//! fails on an import that points up.

#![forbid(unsafe_code)]

pub mod authn;
pub mod authz;
pub mod cli;
pub mod clock;
pub mod config;
pub mod console;
pub mod cors;
pub mod decision;
pub mod doctor;
pub mod explain;
pub mod failure;
pub mod http_client;
pub mod inspect;
pub mod ops;
pub mod pipeline;
pub mod proto;
pub mod reload;
pub mod request;
pub mod response;
pub mod server;
pub mod service;
pub mod state;
pub mod telemetry;
pub mod tracing_export;

pub use config::Config;
pub use server::{Listeners, run};

#[cfg(test)]
mod layers {
    /// Top to bottom; a module may import only modules after it (and its own submodules).
    const LAYERS: &[&str] = &[
        "main",
        "cli",
        "doctor",
        "explain",
        "inspect",
        "server",
        "reload",
        "ops",
        "service",
        "telemetry",
        "response",
        "state",
        "pipeline",
        "cors",
        "decision",
        "authz",
        "authn",
        "request",
        "proto",
        "http_client",
        "tracing_export",
        "failure",
        "clock",
        "console",
        "config",
    ];

    /// Upward imports tolerated for now: none.
    const KNOWN: &[(&str, &str)] = &[];

    fn rank(module: &str) -> usize {
        LAYERS
            .iter()
            .position(|m| *m == module)
            .unwrap_or_else(|| panic!("module {module} is not in LAYERS (src/lib.rs)"))
    }

    /// Every `crate::x` a module's non-test code names, outside comments.
    fn imports(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        for line in text.lines() {
            if line.trim_start().starts_with("#[cfg(test)]") {
                break;
            }
            let code = line.split("//").next().unwrap_or("");
            for (i, _) in code.match_indices("crate::") {
                let rest = &code[i + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                // `authz_sidecar::` in main.rs is the library, not a module.
                if !name.is_empty() && !code[..i].ends_with("authz_sidecar::") {
                    out.push(name);
                }
            }
        }
        out
    }

    #[test]
    fn imports_point_down_the_layers() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![src.clone()];
        let mut up = Vec::new();
        while let Some(path) = files.pop() {
            // src/bin/*: other binaries (the bench tool), each its own crate with its own
            // `crate::`; they use this library only through `authz_sidecar::`.
            if path == src.join("bin") {
                continue;
            }
            if path.is_dir() {
                files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || path.ends_with("lib.rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let module = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            let text = std::fs::read_to_string(&path).unwrap();
            for import in imports(&text) {
                if import != module
                    && rank(&import) <= rank(&module)
                    && !KNOWN.contains(&(module.as_str(), import.as_str()))
                {
                    up.push(format!("{} imports {import}", rel.display()));
                }
            }
        }
        up.sort();
        assert!(up.is_empty(), "imports pointing up the layers: {up:#?}");
    }
}
