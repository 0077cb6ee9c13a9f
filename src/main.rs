//! The `authz-sidecar` binary: parses the command line and hands over to the library.
//! Exit codes: 0 ok, 1 runtime failure (or doctor found problems), 2 bad configuration.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = authz_sidecar::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
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
