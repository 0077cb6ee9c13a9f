//! Shared helpers for the integration tests: the in-process sidecar, and the real peers
//! (Envoy, OpenFGA, Keycloak) started as processes on free loopback ports.
#![allow(dead_code, unused_imports)]

pub mod binary;
pub mod envoy;
pub mod jaeger;
pub mod keycloak;
pub mod metrics;
pub mod openfga;
pub mod process;
pub mod raw_http;
pub mod sidecar;
pub mod tools;
pub mod upstream;
