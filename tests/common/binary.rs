//! The `authz-sidecar` binary as the tests run it: from the crate root, with none of the
//! variables that would change its key source, stores, logging or reload from under a test
//! (the developer's shell may set any of them), and no shutdown delay (the delay has its own
//! test in tests/cli.rs, which sets it).
#![allow(dead_code)]

use std::process::Command;

/// Every variable the config reads that a test must set itself if it wants it.
const CLEARED: &[&str] = &[
    "AUTHZ_CONFIG",
    "AUTH_PUBLIC_KEY_URL",
    "KEYCLOAK_URL",
    "KEYCLOAK_SERVER_URL",
    "KEYCLOAK_REALM",
    "OPENFGA_API_URL",
    "OPENFGA_STORE_ID",
    "OPENFGA_STORE_NAME",
    "OPENFGA_MODEL_ID",
    "OPENFGA_API_TOKEN",
    "API_KEYS_FILE",
    "API_KEY_EXCHANGE_URL",
    "CORS_ORIGINS",
    "CORS_ALLOWED_ORIGINS",
    "RUST_LOG",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "LOG_DECISIONS",
    "LOG_ALLOW_SAMPLE",
    "JWT_ISSUER",
    "JWT_AUDIENCE",
    "AUTHZ_RELOAD_INTERVAL",
    "DOCTOR_TOKEN",
    "DOCTOR_API_KEY",
    "TOKIO_WORKER_THREADS",
    // A developer's collector must not receive (or slow down) the tests' spans.
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
];

pub fn sidecar() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_authz-sidecar"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    for v in CLEARED {
        c.env_remove(v);
    }
    c.env("AUTHZ_SHUTDOWN_DELAY", "0s");
    c
}

/// Waits (async) up to `within` for `child` to exit and returns its exit code; kills it and
/// panics naming `after` if it is still running then.
pub async fn exit_code(
    child: &mut std::process::Child,
    within: std::time::Duration,
    after: &str,
) -> Option<i32> {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    panic!("sidecar did not exit {after}");
}
