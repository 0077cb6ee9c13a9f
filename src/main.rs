//! The `authz-sidecar` binary: parses the command line and hands over to the library.
//! Exit codes: 0 ok, 1 runtime failure (or doctor found problems), 2 bad configuration.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = authz_sidecar::cli::Cli::parse();
    let workers = match worker_threads(std::env::var_os("TOKIO_WORKER_THREADS")) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("authz-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("authz-sidecar: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(authz_sidecar::cli::main(cli))
}

/// The runtime's worker threads: `TOKIO_WORKER_THREADS` (sized to the pod's CPU in
/// deploy/kubernetes), else one per available core. Always passed explicitly, because tokio
/// would otherwise read the variable itself and panic on a bad value; here a bad value is a
/// startup error naming the variable, and an empty one means unset.
fn worker_threads(var: Option<std::ffi::OsString>) -> Result<usize, String> {
    let raw = var.map(|v| v.to_string_lossy().trim().to_string());
    match raw.as_deref() {
        None | Some("") => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "TOKIO_WORKER_THREADS: {v:?} is not a positive whole number of threads"
            )),
        },
    }
}
