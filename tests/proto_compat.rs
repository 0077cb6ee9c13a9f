//! Wire compatibility of our hand-written `proto/` subset with upstream Envoy's
//! ext_authz API, as compiled by the `envoy-types` crate.
//!
//! Every field we define is set to a distinct non-default value, encoded with
//! one side and decoded with the other, then compared field by field against
//! the original. A wrong or swapped field number in `proto/` loses or moves a
//! value and fails these tests.

use std::collections::HashMap;

use prost::Message;

/// Our generated types.
mod o {
    pub use authz_sidecar::proto::pb::envoy::config::core::v3 as core_v3;
    pub use authz_sidecar::proto::pb::envoy::service::auth::v3 as auth_v3;
    pub use authz_sidecar::proto::pb::envoy::r#type::v3 as type_v3;
    pub use authz_sidecar::proto::pb::google::rpc;
    pub use prost_types as wkt;

    /// `google.protobuf.BoolValue` is `Option<bool>` on our side.
    pub fn bool_value(value: bool) -> Option<bool> {
        Some(value)
    }
}

/// Upstream's generated types (envoy-types compiles the well-known types itself).
mod u {
    pub use envoy_types::pb::envoy::config::core::v3 as core_v3;
    pub use envoy_types::pb::envoy::service::auth::v3 as auth_v3;
    pub use envoy_types::pb::envoy::r#type::v3 as type_v3;
    pub use envoy_types::pb::google::protobuf as wkt;
    pub use envoy_types::pb::google::rpc;

    /// `google.protobuf.BoolValue` is a message on the envoy-types side.
    pub fn bool_value(value: bool) -> Option<wkt::BoolValue> {
        Some(wkt::BoolValue { value })
    }
}

/// Encodes `from` and decodes the bytes as `To`.
fn transcode<To: Message + Default>(from: &impl Message) -> To {
    To::decode(from.encode_to_vec().as_slice()).expect("decode transcoded message")
}

fn string_map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

// ---------------------------------------------------------------------------
// Test data. The same literal builds either side's types: `$m` is `o` or `u`.
// ---------------------------------------------------------------------------

macro_rules! wkt_struct {
    ($m:ident, { $($key:literal => $kind:expr),* $(,)? }) => {
        $m::wkt::Struct {
            fields: [$(($key.to_owned(), $m::wkt::Value { kind: Some($kind) })),*]
                .into_iter()
                .collect(),
        }
    };
}

macro_rules! any {
    ($m:ident, $type_url:literal, $value:expr) => {
        $m::wkt::Any {
            type_url: $type_url.to_owned(),
            value: $value.to_vec(),
        }
    };
}

/// `header_option!(m, key, value, append, append_action, keep_empty_value)`
macro_rules! header_option {
    ($m:ident, $key:literal, $value:literal, $append:expr, $action:ident, $keep:expr $(,)?) => {
        $m::core_v3::HeaderValueOption {
            header: Some($m::core_v3::HeaderValue {
                key: $key.to_owned(),
                value: $value.to_owned(),
                raw_value: Vec::new(),
            }),
            append: $append,
            append_action: $m::core_v3::header_value_option::HeaderAppendAction::$action as i32,
            keep_empty_value: $keep,
        }
    };
}

macro_rules! check_request {
    ($m:ident) => {{
        use $m::wkt::value::Kind;
        use $m::{auth_v3::attribute_context as ac, core_v3};

        $m::auth_v3::CheckRequest {
            attributes: Some($m::auth_v3::AttributeContext {
                source: Some(ac::Peer {
                    address: Some(core_v3::Address {
                        address: Some(core_v3::address::Address::SocketAddress(
                            core_v3::SocketAddress {
                                protocol: core_v3::socket_address::Protocol::Udp as i32,
                                address: "10.1.2.3".to_owned(),
                                port_specifier: Some(
                                    core_v3::socket_address::PortSpecifier::PortValue(54321),
                                ),
                                resolver_name: "custom-resolver".to_owned(),
                                ipv4_compat: true,
                                network_namespace_filepath: "/var/run/netns/ns1".to_owned(),
                            },
                        )),
                    }),
                    service: "frontend".to_owned(),
                    labels: string_map(&[("app", "web"), ("version", "v2")]),
                    principal: "spiffe://cluster.local/ns/default/sa/web".to_owned(),
                    certificate: "-----BEGIN%20CERTIFICATE-----%0Asource".to_owned(),
                }),
                destination: Some(ac::Peer {
                    address: Some(core_v3::Address {
                        address: Some(core_v3::address::Address::Pipe(core_v3::Pipe {
                            path: "/run/envoy/ingress.sock".to_owned(),
                            mode: 0o660,
                        })),
                    }),
                    service: "backend".to_owned(),
                    labels: string_map(&[("zone", "eu-west-1a")]),
                    principal: "spiffe://cluster.local/ns/default/sa/api".to_owned(),
                    certificate: "-----BEGIN%20CERTIFICATE-----%0Adestination".to_owned(),
                }),
                request: Some(ac::Request {
                    time: Some($m::wkt::Timestamp {
                        seconds: 1_700_000_000,
                        nanos: 123_456_789,
                    }),
                    http: Some(ac::HttpRequest {
                        id: "req-7f3a9c".to_owned(),
                        method: "POST".to_owned(),
                        headers: string_map(&[
                            (":path", "/api/v1/items?x=1"),
                            ("authorization", "Bearer abc.def.ghi"),
                            ("content-type", "application/json"),
                        ]),
                        header_map: Some(core_v3::HeaderMap {
                            headers: vec![
                                core_v3::HeaderValue {
                                    key: "x-binary".to_owned(),
                                    value: String::new(),
                                    raw_value: b"\xff\xfe\x00not-utf8".to_vec(),
                                },
                                core_v3::HeaderValue {
                                    key: "x-binary".to_owned(),
                                    value: "second-value".to_owned(),
                                    raw_value: b"second-raw".to_vec(),
                                },
                            ],
                        }),
                        path: "/api/v1/items?x=1".to_owned(),
                        host: "api.example.com".to_owned(),
                        scheme: "https".to_owned(),
                        query: "x=1".to_owned(),
                        fragment: "frag".to_owned(),
                        size: 4242,
                        protocol: "HTTP/2".to_owned(),
                        body: "{\"name\":\"widget\"}".to_owned(),
                        raw_body: b"\x00\x01\x02raw-body\xff".to_vec(),
                    }),
                }),
                context_extensions: string_map(&[("tenant", "acme"), ("route", "items")]),
                metadata_context: Some(core_v3::Metadata {
                    filter_metadata: [(
                        "envoy.filters.http.jwt_authn".to_owned(),
                        wkt_struct!($m, {
                            "sub" => Kind::StringValue("user-1".to_owned()),
                            "exp" => Kind::NumberValue(1.7e9),
                            "admin" => Kind::BoolValue(true),
                            "none" => Kind::NullValue(0),
                            "roles" => Kind::ListValue($m::wkt::ListValue {
                                values: vec![
                                    $m::wkt::Value {
                                        kind: Some(Kind::StringValue("reader".to_owned())),
                                    },
                                    $m::wkt::Value {
                                        kind: Some(Kind::StringValue("writer".to_owned())),
                                    },
                                ],
                            }),
                            "nested" => Kind::StructValue(wkt_struct!($m, {
                                "depth" => Kind::NumberValue(2.0),
                            })),
                        }),
                    )]
                    .into_iter()
                    .collect(),
                    typed_filter_metadata: [(
                        "com.acme.typed".to_owned(),
                        any!($m, "type.googleapis.com/google.protobuf.StringValue", b"\x0a\x03abc"),
                    )]
                    .into_iter()
                    .collect(),
                }),
                route_metadata_context: Some(core_v3::Metadata {
                    filter_metadata: [(
                        "com.acme.route".to_owned(),
                        wkt_struct!($m, { "policy" => Kind::StringValue("admin-only".to_owned()) }),
                    )]
                    .into_iter()
                    .collect(),
                    typed_filter_metadata: [(
                        "com.acme.route.typed".to_owned(),
                        any!($m, "type.googleapis.com/google.protobuf.UInt32Value", b"\x08\x07"),
                    )]
                    .into_iter()
                    .collect(),
                }),
                tls_session: Some(ac::TlsSession {
                    sni: "api.example.com.sni".to_owned(),
                }),
            }),
        }
    }};
}

macro_rules! ok_check_response {
    ($m:ident) => {{
        use $m::wkt::value::Kind;
        use $m::{auth_v3, core_v3};

        auth_v3::CheckResponse {
            status: Some($m::rpc::Status {
                code: 0,
                message: "allowed by rule items-write".to_owned(),
                details: vec![any!(
                    $m,
                    "type.googleapis.com/google.protobuf.StringValue",
                    b"\x0a\x02ok"
                )],
            }),
            http_response: Some(auth_v3::check_response::HttpResponse::OkResponse(
                auth_v3::OkHttpResponse {
                    headers: vec![
                        header_option!(
                            $m,
                            "x-user-id",
                            "user-1",
                            $m::bool_value(true),
                            OverwriteIfExistsOrAdd,
                            true,
                        ),
                        header_option!(
                            $m,
                            "x-tenant",
                            "acme",
                            $m::bool_value(false),
                            AddIfAbsent,
                            false,
                        ),
                        header_option!(
                            $m,
                            "x-roles",
                            "reader,writer",
                            None,
                            OverwriteIfExists,
                            false,
                        ),
                    ],
                    headers_to_remove: vec!["authorization".to_owned(), "x-api-key".to_owned()],
                    response_headers_to_add: vec![
                        header_option!(
                            $m,
                            "x-authz",
                            "allowed",
                            None,
                            OverwriteIfExistsOrAdd,
                            true,
                        ),
                    ],
                    query_parameters_to_set: vec![
                        core_v3::QueryParameter {
                            key: "tenant".to_owned(),
                            value: "acme".to_owned(),
                        },
                        core_v3::QueryParameter {
                            key: "debug".to_owned(),
                            value: "0".to_owned(),
                        },
                    ],
                    query_parameters_to_remove: vec!["api_key".to_owned(), "token".to_owned()],
                    ..Default::default()
                },
            )),
            dynamic_metadata: Some(wkt_struct!($m, {
                "user" => Kind::StringValue("user-1".to_owned()),
                "tenant" => Kind::StringValue("acme".to_owned()),
            })),
        }
    }};
}

macro_rules! denied_response {
    ($m:ident, $status_code:ident) => {
        $m::auth_v3::DeniedHttpResponse {
            status: Some($m::type_v3::HttpStatus {
                code: $m::type_v3::StatusCode::$status_code as i32,
            }),
            headers: vec![
                header_option!(
                    $m,
                    "www-authenticate",
                    "Bearer realm=\"api\"",
                    $m::bool_value(false),
                    OverwriteIfExistsOrAdd,
                    false,
                ),
                header_option!(
                    $m,
                    "content-type",
                    "application/json",
                    None,
                    AddIfAbsent,
                    true
                ),
            ],
            body: "{\"error\":\"forbidden\"}".to_owned(),
        }
    };
}

macro_rules! denied_check_response {
    ($m:ident) => {{
        use $m::wkt::value::Kind;
        use $m::auth_v3;

        auth_v3::CheckResponse {
            status: Some($m::rpc::Status {
                code: 7,
                message: "permission denied: missing role writer".to_owned(),
                details: vec![any!(
                    $m,
                    "type.googleapis.com/google.rpc.ErrorInfo",
                    b"\x0a\x06REASON"
                )],
            }),
            http_response: Some(auth_v3::check_response::HttpResponse::DeniedResponse(
                denied_response!($m, Forbidden),
            )),
            dynamic_metadata: Some(wkt_struct!($m, {
                "reason" => Kind::StringValue("missing role".to_owned()),
            })),
        }
    }};
}

macro_rules! error_check_response {
    ($m:ident) => {{
        $m::auth_v3::CheckResponse {
            status: Some($m::rpc::Status {
                code: 14,
                message: "policy backend unavailable".to_owned(),
                details: Vec::new(),
            }),
            http_response: Some($m::auth_v3::check_response::HttpResponse::ErrorResponse(
                denied_response!($m, ServiceUnavailable),
            )),
            dynamic_metadata: None,
        }
    }};
}

fn ours_check_request() -> o::auth_v3::CheckRequest {
    check_request!(o)
}

fn up_check_request() -> u::auth_v3::CheckRequest {
    check_request!(u)
}

// Upstream's OkHttpResponse also has the deprecated `dynamic_metadata` (field 3),
// which the shared literal fills with `..Default::default()`.
#[allow(clippy::needless_update)]
fn ours_ok_response() -> o::auth_v3::CheckResponse {
    ok_check_response!(o)
}

#[allow(deprecated)] // upstream HeaderValueOption.append
fn up_ok_response() -> u::auth_v3::CheckResponse {
    ok_check_response!(u)
}

fn ours_denied_response() -> o::auth_v3::CheckResponse {
    denied_check_response!(o)
}

#[allow(deprecated)] // upstream HeaderValueOption.append
fn up_denied_response() -> u::auth_v3::CheckResponse {
    denied_check_response!(u)
}

fn ours_error_response() -> o::auth_v3::CheckResponse {
    error_check_response!(o)
}

#[allow(deprecated)] // upstream HeaderValueOption.append
fn up_error_response() -> u::auth_v3::CheckResponse {
    error_check_response!(u)
}

// ---------------------------------------------------------------------------
// Field-by-field comparison of our types against upstream's.
// ---------------------------------------------------------------------------

/// Converts an envoy-types `Struct` into prost-types' (built by hand, not via the wire).
fn wkt_struct_from_up(s: &u::wkt::Struct) -> o::wkt::Struct {
    o::wkt::Struct {
        fields: s
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), wkt_value_from_up(v)))
            .collect(),
    }
}

fn wkt_value_from_up(v: &u::wkt::Value) -> o::wkt::Value {
    use o::wkt::value::Kind as O;
    use u::wkt::value::Kind as U;
    o::wkt::Value {
        kind: v.kind.as_ref().map(|kind| match kind {
            U::NullValue(n) => O::NullValue(*n),
            U::NumberValue(n) => O::NumberValue(*n),
            U::StringValue(s) => O::StringValue(s.clone()),
            U::BoolValue(b) => O::BoolValue(*b),
            U::StructValue(s) => O::StructValue(wkt_struct_from_up(s)),
            U::ListValue(l) => O::ListValue(o::wkt::ListValue {
                values: l.values.iter().map(wkt_value_from_up).collect(),
            }),
        }),
    }
}

fn assert_any_eq(ours: &o::wkt::Any, up: &u::wkt::Any) {
    assert_eq!(ours.type_url, up.type_url, "Any.type_url");
    assert_eq!(ours.value, up.value, "Any.value");
}

fn assert_anys_eq(ours: &[o::wkt::Any], up: &[u::wkt::Any]) {
    assert_eq!(ours.len(), up.len(), "number of Any");
    for (o, u) in ours.iter().zip(up) {
        assert_any_eq(o, u);
    }
}

fn assert_address_eq(ours: &o::core_v3::Address, up: &u::core_v3::Address) {
    use o::core_v3::{address::Address as OA, socket_address::PortSpecifier as OP};
    use u::core_v3::{address::Address as UA, socket_address::PortSpecifier as UP};
    match (ours.address.as_ref(), up.address.as_ref()) {
        (Some(OA::SocketAddress(o)), Some(UA::SocketAddress(u))) => {
            assert_eq!(o.protocol, u.protocol, "SocketAddress.protocol");
            assert_eq!(o.address, u.address, "SocketAddress.address");
            match (o.port_specifier.as_ref(), u.port_specifier.as_ref()) {
                (Some(OP::PortValue(o)), Some(UP::PortValue(u))) => assert_eq!(o, u, "port_value"),
                (Some(OP::NamedPort(o)), Some(UP::NamedPort(u))) => assert_eq!(o, u, "named_port"),
                (None, None) => {}
                (o, u) => panic!("port_specifier differs: ours {o:?}, upstream {u:?}"),
            }
            assert_eq!(
                o.resolver_name, u.resolver_name,
                "SocketAddress.resolver_name"
            );
            assert_eq!(o.ipv4_compat, u.ipv4_compat, "SocketAddress.ipv4_compat");
            assert_eq!(
                o.network_namespace_filepath, u.network_namespace_filepath,
                "SocketAddress.network_namespace_filepath"
            );
        }
        (Some(OA::Pipe(o)), Some(UA::Pipe(u))) => {
            assert_eq!(o.path, u.path, "Pipe.path");
            assert_eq!(o.mode, u.mode, "Pipe.mode");
        }
        (Some(OA::EnvoyInternalAddress(o)), Some(UA::EnvoyInternalAddress(u))) => {
            use o::core_v3::envoy_internal_address::AddressNameSpecifier as ON;
            use u::core_v3::envoy_internal_address::AddressNameSpecifier as UN;
            match (
                o.address_name_specifier.as_ref(),
                u.address_name_specifier.as_ref(),
            ) {
                (Some(ON::ServerListenerName(o)), Some(UN::ServerListenerName(u))) => {
                    assert_eq!(o, u, "EnvoyInternalAddress.server_listener_name");
                }
                (None, None) => {}
                (o, u) => panic!("address_name_specifier differs: ours {o:?}, upstream {u:?}"),
            }
            assert_eq!(
                o.endpoint_id, u.endpoint_id,
                "EnvoyInternalAddress.endpoint_id"
            );
        }
        (None, None) => {}
        (o, u) => panic!("Address variant differs: ours {o:?}, upstream {u:?}"),
    }
}

fn assert_peer_eq(
    ours: &o::auth_v3::attribute_context::Peer,
    up: &u::auth_v3::attribute_context::Peer,
) {
    assert_address_eq(
        ours.address.as_ref().expect("ours: Peer.address"),
        up.address.as_ref().expect("upstream: Peer.address"),
    );
    assert_eq!(ours.service, up.service, "Peer.service");
    assert_eq!(ours.labels, up.labels, "Peer.labels");
    assert_eq!(ours.principal, up.principal, "Peer.principal");
    assert_eq!(ours.certificate, up.certificate, "Peer.certificate");
}

fn assert_header_value_eq(ours: &o::core_v3::HeaderValue, up: &u::core_v3::HeaderValue) {
    assert_eq!(ours.key, up.key, "HeaderValue.key");
    assert_eq!(ours.value, up.value, "HeaderValue.value");
    assert_eq!(ours.raw_value, up.raw_value, "HeaderValue.raw_value");
}

fn assert_http_request_eq(
    ours: &o::auth_v3::attribute_context::HttpRequest,
    up: &u::auth_v3::attribute_context::HttpRequest,
) {
    assert_eq!(ours.id, up.id, "HttpRequest.id");
    assert_eq!(ours.method, up.method, "HttpRequest.method");
    assert_eq!(ours.headers, up.headers, "HttpRequest.headers");
    let ours_map = &ours.header_map.as_ref().expect("ours: header_map").headers;
    let up_map = &up
        .header_map
        .as_ref()
        .expect("upstream: header_map")
        .headers;
    assert_eq!(ours_map.len(), up_map.len(), "HeaderMap.headers length");
    for (o, u) in ours_map.iter().zip(up_map) {
        assert_header_value_eq(o, u);
    }
    assert_eq!(ours.path, up.path, "HttpRequest.path");
    assert_eq!(ours.host, up.host, "HttpRequest.host");
    assert_eq!(ours.scheme, up.scheme, "HttpRequest.scheme");
    assert_eq!(ours.query, up.query, "HttpRequest.query");
    assert_eq!(ours.fragment, up.fragment, "HttpRequest.fragment");
    assert_eq!(ours.size, up.size, "HttpRequest.size");
    assert_eq!(ours.protocol, up.protocol, "HttpRequest.protocol");
    assert_eq!(ours.body, up.body, "HttpRequest.body");
    assert_eq!(ours.raw_body, up.raw_body, "HttpRequest.raw_body");
}

fn assert_metadata_eq(ours: &o::core_v3::Metadata, up: &u::core_v3::Metadata) {
    assert_eq!(
        ours.filter_metadata.len(),
        up.filter_metadata.len(),
        "Metadata.filter_metadata size"
    );
    for (key, up_struct) in &up.filter_metadata {
        let ours_struct = ours
            .filter_metadata
            .get(key)
            .unwrap_or_else(|| panic!("ours: filter_metadata[{key}] missing"));
        assert_eq!(
            ours_struct,
            &wkt_struct_from_up(up_struct),
            "filter_metadata[{key}]"
        );
    }
    assert_eq!(
        ours.typed_filter_metadata.len(),
        up.typed_filter_metadata.len(),
        "Metadata.typed_filter_metadata size"
    );
    for (key, up_any) in &up.typed_filter_metadata {
        let ours_any = ours
            .typed_filter_metadata
            .get(key)
            .unwrap_or_else(|| panic!("ours: typed_filter_metadata[{key}] missing"));
        assert_any_eq(ours_any, up_any);
    }
}

fn assert_check_request_eq(ours: &o::auth_v3::CheckRequest, up: &u::auth_v3::CheckRequest) {
    let o = ours.attributes.as_ref().expect("ours: attributes");
    let u = up.attributes.as_ref().expect("upstream: attributes");

    assert_peer_eq(
        o.source.as_ref().expect("ours: source"),
        u.source.as_ref().expect("upstream: source"),
    );
    assert_peer_eq(
        o.destination.as_ref().expect("ours: destination"),
        u.destination.as_ref().expect("upstream: destination"),
    );

    let o_req = o.request.as_ref().expect("ours: request");
    let u_req = u.request.as_ref().expect("upstream: request");
    let o_time = o_req.time.as_ref().expect("ours: request.time");
    let u_time = u_req.time.as_ref().expect("upstream: request.time");
    assert_eq!(o_time.seconds, u_time.seconds, "Request.time.seconds");
    assert_eq!(o_time.nanos, u_time.nanos, "Request.time.nanos");
    assert_http_request_eq(
        o_req.http.as_ref().expect("ours: request.http"),
        u_req.http.as_ref().expect("upstream: request.http"),
    );

    assert_eq!(
        o.context_extensions, u.context_extensions,
        "context_extensions"
    );
    assert_metadata_eq(
        o.metadata_context.as_ref().expect("ours: metadata_context"),
        u.metadata_context
            .as_ref()
            .expect("upstream: metadata_context"),
    );
    assert_metadata_eq(
        o.route_metadata_context
            .as_ref()
            .expect("ours: route_metadata_context"),
        u.route_metadata_context
            .as_ref()
            .expect("upstream: route_metadata_context"),
    );
    assert_eq!(
        o.tls_session.as_ref().expect("ours: tls_session").sni,
        u.tls_session.as_ref().expect("upstream: tls_session").sni,
        "TLSSession.sni"
    );
}

#[allow(deprecated)] // upstream HeaderValueOption.append
fn assert_header_options_eq(
    ours: &[o::core_v3::HeaderValueOption],
    up: &[u::core_v3::HeaderValueOption],
) {
    assert_eq!(ours.len(), up.len(), "number of HeaderValueOption");
    for (o, u) in ours.iter().zip(up) {
        assert_header_value_eq(
            o.header.as_ref().expect("ours: HeaderValueOption.header"),
            u.header
                .as_ref()
                .expect("upstream: HeaderValueOption.header"),
        );
        assert_eq!(
            o.append,
            u.append.map(|b| b.value),
            "HeaderValueOption.append"
        );
        assert_eq!(
            o.append_action, u.append_action,
            "HeaderValueOption.append_action"
        );
        assert_eq!(
            o.keep_empty_value, u.keep_empty_value,
            "HeaderValueOption.keep_empty_value"
        );
    }
}

fn assert_denied_eq(ours: &o::auth_v3::DeniedHttpResponse, up: &u::auth_v3::DeniedHttpResponse) {
    assert_eq!(
        ours.status
            .as_ref()
            .expect("ours: DeniedHttpResponse.status")
            .code,
        up.status
            .as_ref()
            .expect("upstream: DeniedHttpResponse.status")
            .code,
        "DeniedHttpResponse.status.code"
    );
    assert_header_options_eq(&ours.headers, &up.headers);
    assert_eq!(ours.body, up.body, "DeniedHttpResponse.body");
}

fn assert_check_response_eq(ours: &o::auth_v3::CheckResponse, up: &u::auth_v3::CheckResponse) {
    use o::auth_v3::check_response::HttpResponse as O;
    use u::auth_v3::check_response::HttpResponse as U;

    let o_status = ours.status.as_ref().expect("ours: status");
    let u_status = up.status.as_ref().expect("upstream: status");
    assert_eq!(o_status.code, u_status.code, "Status.code");
    assert_eq!(o_status.message, u_status.message, "Status.message");
    assert_anys_eq(&o_status.details, &u_status.details);

    match (ours.http_response.as_ref(), up.http_response.as_ref()) {
        (Some(O::OkResponse(o)), Some(U::OkResponse(u))) => {
            assert_header_options_eq(&o.headers, &u.headers);
            assert_eq!(
                o.headers_to_remove, u.headers_to_remove,
                "headers_to_remove"
            );
            assert_header_options_eq(&o.response_headers_to_add, &u.response_headers_to_add);
            assert_eq!(
                o.query_parameters_to_set.len(),
                u.query_parameters_to_set.len(),
                "number of query_parameters_to_set"
            );
            for (o, u) in o
                .query_parameters_to_set
                .iter()
                .zip(&u.query_parameters_to_set)
            {
                assert_eq!(o.key, u.key, "QueryParameter.key");
                assert_eq!(o.value, u.value, "QueryParameter.value");
            }
            assert_eq!(
                o.query_parameters_to_remove, u.query_parameters_to_remove,
                "query_parameters_to_remove"
            );
        }
        (Some(O::DeniedResponse(o)), Some(U::DeniedResponse(u)))
        | (Some(O::ErrorResponse(o)), Some(U::ErrorResponse(u))) => assert_denied_eq(o, u),
        (None, None) => {}
        (o, u) => panic!("http_response variant differs: ours {o:?}, upstream {u:?}"),
    }

    assert_eq!(
        ours.dynamic_metadata,
        up.dynamic_metadata.as_ref().map(wkt_struct_from_up),
        "CheckResponse.dynamic_metadata"
    );
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn check_request_upstream_to_ours() {
    let up = up_check_request();
    let ours: o::auth_v3::CheckRequest = transcode(&up);

    assert_check_request_eq(&ours, &up);
    // Nothing dropped as an unknown field, and identical to the same data built natively.
    assert_eq!(ours.encoded_len(), up.encoded_len());
    assert_eq!(ours, ours_check_request());

    // Spot checks on the fields the server relies on most.
    let http = ours
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
        .expect("http request");
    assert_eq!(http.raw_body, b"\x00\x01\x02raw-body\xff");
    assert_eq!(
        http.header_map.as_ref().expect("header_map").headers[0].raw_value,
        b"\xff\xfe\x00not-utf8"
    );
    assert_eq!(http.headers["authorization"], "Bearer abc.def.ghi");
}

#[test]
fn check_request_ours_to_upstream() {
    let ours = ours_check_request();
    let up: u::auth_v3::CheckRequest = transcode(&ours);

    assert_check_request_eq(&ours, &up);
    assert_eq!(up.encoded_len(), ours.encoded_len());
    assert_eq!(up, up_check_request());
}

#[test]
fn check_response_upstream_to_ours() {
    for (up, expected) in [
        (up_ok_response(), ours_ok_response()),
        (up_denied_response(), ours_denied_response()),
        (up_error_response(), ours_error_response()),
    ] {
        let ours: o::auth_v3::CheckResponse = transcode(&up);
        assert_check_response_eq(&ours, &up);
        assert_eq!(ours.encoded_len(), up.encoded_len());
        assert_eq!(ours, expected);
    }
}

#[test]
fn check_response_ours_to_upstream() {
    for (ours, expected) in [
        (ours_ok_response(), up_ok_response()),
        (ours_denied_response(), up_denied_response()),
        (ours_error_response(), up_error_response()),
    ] {
        let up: u::auth_v3::CheckResponse = transcode(&ours);
        assert_check_response_eq(&ours, &up);
        assert_eq!(up.encoded_len(), ours.encoded_len());
        assert_eq!(up, expected);
    }
}

#[test]
fn denied_response_carries_http_status_and_grpc_status() {
    let ours: o::auth_v3::CheckResponse = transcode(&up_denied_response());
    assert_eq!(ours.status.as_ref().map(|s| s.code), Some(7));
    let Some(o::auth_v3::check_response::HttpResponse::DeniedResponse(denied)) =
        &ours.http_response
    else {
        panic!("expected denied_response, got {:?}", ours.http_response);
    };
    assert_eq!(
        denied.status.as_ref().map(|s| s.code()),
        Some(o::type_v3::StatusCode::Forbidden)
    );
    assert_eq!(
        denied.headers[0].header.as_ref().map(|h| h.key.as_str()),
        Some("www-authenticate")
    );
    assert_eq!(denied.body, "{\"error\":\"forbidden\"}");
}

#[test]
fn every_address_variant_round_trips() {
    macro_rules! addresses {
        ($m:ident) => {{
            use $m::core_v3::{address::Address as A, socket_address as sa, *};
            [
                A::SocketAddress(SocketAddress {
                    protocol: sa::Protocol::Tcp as i32,
                    address: "::1".to_owned(),
                    port_specifier: Some(sa::PortSpecifier::NamedPort("http".to_owned())),
                    resolver_name: String::new(),
                    ipv4_compat: false,
                    network_namespace_filepath: String::new(),
                }),
                A::Pipe(Pipe {
                    path: "@abstract".to_owned(),
                    mode: 0o600,
                }),
                A::EnvoyInternalAddress(EnvoyInternalAddress {
                    address_name_specifier: Some(
                        envoy_internal_address::AddressNameSpecifier::ServerListenerName(
                            "internal_listener".to_owned(),
                        ),
                    ),
                    endpoint_id: "endpoint-1".to_owned(),
                }),
            ]
            .map(|address| Address {
                address: Some(address),
            })
        }};
    }

    for (ours, up) in addresses!(o).into_iter().zip(addresses!(u)) {
        assert_address_eq(&transcode(&up), &up);
        assert_address_eq(&ours, &transcode(&ours));
        assert_eq!(transcode::<o::core_v3::Address>(&up), ours);
    }
}

/// Enum values must match upstream exactly: same numbers, same names.
#[test]
fn enums_match_upstream() {
    fn check<O, U>(
        range: std::ops::RangeInclusive<i32>,
        ours: fn(i32) -> Option<O>,
        up: fn(i32) -> Option<U>,
        name_o: fn(&O) -> &'static str,
        name_u: fn(&U) -> &'static str,
    ) -> usize {
        let mut count = 0;
        for value in range {
            match (ours(value), up(value)) {
                (Some(o), Some(u)) => {
                    assert_eq!(name_o(&o), name_u(&u), "name of value {value}");
                    count += 1;
                }
                (None, None) => {}
                (o, u) => panic!(
                    "value {value}: ours {:?}, upstream {:?}",
                    o.as_ref().map(name_o),
                    u.as_ref().map(name_u)
                ),
            }
        }
        count
    }

    let status_codes = check(
        -1..=1000,
        |v| o::type_v3::StatusCode::try_from(v).ok(),
        |v| u::type_v3::StatusCode::try_from(v).ok(),
        |c| c.as_str_name(),
        |c| c.as_str_name(),
    );
    assert_eq!(status_codes, 57, "number of StatusCode values");

    let actions = check(
        -1..=16,
        |v| o::core_v3::header_value_option::HeaderAppendAction::try_from(v).ok(),
        |v| u::core_v3::header_value_option::HeaderAppendAction::try_from(v).ok(),
        |a| a.as_str_name(),
        |a| a.as_str_name(),
    );
    assert_eq!(actions, 4, "number of HeaderAppendAction values");

    let protocols = check(
        -1..=16,
        |v| o::core_v3::socket_address::Protocol::try_from(v).ok(),
        |v| u::core_v3::socket_address::Protocol::try_from(v).ok(),
        |p| p.as_str_name(),
        |p| p.as_str_name(),
    );
    assert_eq!(protocols, 2, "number of SocketAddress.Protocol values");
}

/// The service path (`/envoy.service.auth.v3.Authorization/Check`) matches
/// upstream: an envoy-types client can call our server over real gRPC.
#[tokio::test]
async fn upstream_client_calls_our_server() {
    use o::auth_v3::authorization_server::{Authorization, AuthorizationServer};

    struct Echo;

    #[tonic::async_trait]
    impl Authorization for Echo {
        async fn check(
            &self,
            request: tonic::Request<o::auth_v3::CheckRequest>,
        ) -> Result<tonic::Response<o::auth_v3::CheckResponse>, tonic::Status> {
            assert_eq!(request.into_inner(), ours_check_request());
            Ok(tonic::Response::new(ours_ok_response()))
        }
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AuthorizationServer::new(Echo))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let mut client =
        u::auth_v3::authorization_client::AuthorizationClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
    let response = client
        .check(up_check_request())
        .await
        .expect("Check over gRPC")
        .into_inner();
    assert_eq!(response, up_ok_response());

    // And our own client against our own server.
    let mut ours_client =
        o::auth_v3::authorization_client::AuthorizationClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
    let response = ours_client
        .check(ours_check_request())
        .await
        .expect("Check over gRPC")
        .into_inner();
    assert_eq!(response, ours_ok_response());

    server.abort();
}
