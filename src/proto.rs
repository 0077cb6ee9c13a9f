//! Owns the generated protobuf types.
//!
//! `build.rs` compiles the hand-written subset of Envoy's ext_authz API under
//! `proto/` (wire-compatible with upstream data-plane-api: same packages,
//! message names, field names and field numbers). The [`pb`] tree mirrors the
//! protobuf packages, so `envoy.service.auth.v3.CheckRequest` is
//! [`pb::envoy::service::auth::v3::CheckRequest`]. Well-known types
//! (`Timestamp`, `Struct`, `Any`) are [`prost_types`]; `BoolValue` is
//! `Option<bool>`.
//!
//! The gRPC service is `pb::envoy::service::auth::v3::authorization_server`
//! (`Authorization` trait, `AuthorizationServer`), with the matching client in
//! `authorization_client`.

/// Encoded `FileDescriptorSet` of `proto/` plus its imports, for a gRPC
/// reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/authz_sidecar_descriptor.bin"));

/// Generated code, one module per protobuf package.
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    clippy::nursery
)]
pub mod pb {
    pub mod envoy {
        pub mod config {
            pub mod core {
                pub mod v3 {
                    tonic::include_proto!("envoy.config.core.v3");
                }
            }
        }

        pub mod r#type {
            pub mod v3 {
                // prost-build names the file after the escaped module path.
                tonic::include_proto!("envoy.r#type.v3");
            }
        }

        pub mod service {
            pub mod auth {
                pub mod v3 {
                    tonic::include_proto!("envoy.service.auth.v3");
                }
            }
        }
    }

    pub mod google {
        pub mod rpc {
            tonic::include_proto!("google.rpc");
        }
    }
}
