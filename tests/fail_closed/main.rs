//! Fail closed on every ambiguity: each way found to make the sidecar read a request
//! differently from the app behind it, reproduced through real Envoy (the configs in
//! `deploy/` and Envoy's defaults) and straight over gRPC. One module per part of the request.

#[path = "../common/mod.rs"]
mod common;

mod bodies;
mod credentials;
mod paths;
