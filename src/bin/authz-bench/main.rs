//! `authz-bench`: the benchmark harness of authz-sidecar (driven by `scripts/bench`, results in
//! BENCHMARKS.md). One binary, so the floor and the load generator are built from the same
//! tonic, prost and proto as the sidecar:
//!
//! - `floor`: an allow-all `Check` server on the sidecar's gRPC stack (same tonic server
//!   settings, `TCP_NODELAY`, runtime): the least any Check server can cost, the denominator of
//!   every ratio in BENCHMARKS.md;
//! - `load`: a load generator (N connections, M concurrent streams, closed loop or fixed rate)
//!   that reports requests/s, latency percentiles, errors, the mix of answers and, given a
//!   pid, that server's CPU per check and RSS;
//! - `report`: medians of the `load` JSON lines as a markdown table with floor ratios;
//! - `cache`: the decision cache in process: memory per entry at the bound, hit ratio at a
//!   working set of 10x the bound;
//! - `fresh-tokens`: RS256 / ES256 checks/s per core for tokens never seen, against the raw
//!   `jsonwebtoken` verify;
//! - `http` / `http-report`: plain HTTP load (through Envoy; OpenFGA's Check called directly)
//!   and the tables of those runs;
//! - `fga-setup` and `free-port`: the two small things `scripts/bench` needs besides.
//!
//! It measures and reports; it never compares a time against a threshold. The only failures
//! are setup failures and answers other than the expected ones (a benchmark that silently
//! gets 401s measures something else).

#![forbid(unsafe_code)]

mod cache;
mod fga;
mod floor;
mod http;
mod load;
mod procfs;
mod report;
mod tokens;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "authz-bench",
    version,
    about = "Benchmark harness of authz-sidecar: floor server, load generator, report"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve an allow-all envoy.service.auth.v3.Authorization/Check (the floor).
    Floor(floor::Args),
    /// Drive Check at a server and report rps, latency, answers and the server's CPU per check.
    Load(Box<load::Args>),
    /// Turn `load --json` lines into markdown tables (medians, floor ratios, memory).
    Report(report::Args),
    /// The decision cache in process: memory at the bound, hit ratio at 10x the bound.
    Cache(cache::Args),
    /// Fresh tokens: RS256 and ES256 checks/s per core against the raw jsonwebtoken verify.
    FreshTokens(tokens::Args),
    /// Plain HTTP load (through Envoy, or OpenFGA's Check API directly).
    Http(Box<http::Args>),
    /// The tables of the Envoy and OpenFGA-miss runs (`http` and `load` lines, by tags).
    HttpReport(http::ReportArgs),
    /// Create an OpenFGA store with a model and tuples; print the store id.
    FgaSetup(fga::Args),
    /// Print a loopback TCP port that is free now.
    FreePort,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        // The floor builds its runtime exactly as the sidecar's main does.
        Cmd::Floor(args) => floor::main(args),
        Cmd::Load(args) => load::main(*args),
        Cmd::Report(args) => report::main(args),
        Cmd::Cache(args) => cache::main(args),
        Cmd::FreshTokens(args) => tokens::main(args),
        Cmd::Http(args) => http::main(*args),
        Cmd::HttpReport(args) => http::report(args),
        Cmd::FgaSetup(args) => fga::main(args),
        Cmd::FreePort => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| {
                println!("{}", a.port());
                ExitCode::SUCCESS
            })
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("authz-bench: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
