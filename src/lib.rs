//! authz-sidecar: an Envoy `ext_authz` gRPC server that authenticates callers (Keycloak JWTs,
//! API keys) and authorizes them with route rules and OpenFGA relationship checks.
//!
//! The pipeline of one check: [`request`] (edge in) → [`cors`] → [`authz::rules`] →
//! [`authn`] → [`authz`] → [`decision`] → [`response`] (edge out), wired by [`pipeline`] and
//! served by [`service`] / [`server`].

#![forbid(unsafe_code)]

pub mod authn;
pub mod authz;
pub mod cli;
pub mod clock;
pub mod config;
pub mod cors;
pub mod decision;
pub mod doctor;
pub mod failure;
pub mod http_client;
pub mod ops;
pub mod pipeline;
pub mod proto;
pub mod request;
pub mod response;
pub mod server;
pub mod service;
pub mod state;
pub mod telemetry;

pub use config::Config;
pub use server::{Listeners, run};
