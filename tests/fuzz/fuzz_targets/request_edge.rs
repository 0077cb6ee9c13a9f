//! The request edge on arbitrary bytes: `request::from_proto` never panics, and whatever it
//! accepts keeps the received path segment for segment (SECURITY.md, G1) and a canonical host.
#![no_main]

use authz_sidecar::proto::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use authz_sidecar::proto::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, attribute_context,
};
use authz_sidecar::request::{PathPolicy, from_proto};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Fields separated by 0xFF: path, host, then header name/value pairs; the last is the body.
    let mut parts = data.split(|b| *b == 0xff);
    let path = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let host = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let rest: Vec<&[u8]> = parts.collect();
    let mut headers = Vec::new();
    for pair in rest.chunks(2) {
        if let [k, v] = pair {
            headers.push(HeaderValue {
                key: String::from_utf8_lossy(k).into_owned(),
                raw_value: v.to_vec(),
                ..Default::default()
            });
        }
    }
    let body = if rest.len() % 2 == 1 { rest[rest.len() - 1].to_vec() } else { Vec::new() };
    for policy in [PathPolicy::Strict, PathPolicy::OpaqueEncodedSlashes] {
        let req = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request {
                    http: Some(attribute_context::HttpRequest {
                        method: "POST".into(),
                        path: path.clone(),
                        host: host.clone(),
                        header_map: Some(HeaderMap { headers: headers.clone() }),
                        raw_body: body.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let Ok(input) = from_proto(req, policy) else { continue };
        // Envoy fills the path attribute from `:path`; with the attribute empty the edge reads
        // the header (and with both present it refuses a disagreement).
        let pseudo = headers
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(":path"))
            .map(|h| String::from_utf8_lossy(&h.raw_value).into_owned());
        let received = if path.is_empty() { pseudo.unwrap_or_default() } else { path.clone() };
        let received = received.split('?').next().unwrap_or_default();
        assert_eq!(
            received.split('/').count(),
            input.path.split('/').count(),
            "{path:?} read as {:?}",
            input.path
        );
        assert!(
            !input.path.split('/').any(|s| s == "." || s == ".."),
            "{path:?} kept a dot segment: {:?}",
            input.path
        );
        assert!(
            !input.host.contains(['@', ' ']) && input.host == input.host.to_ascii_lowercase(),
            "{host:?} read as {:?}",
            input.host
        );
    }
});
