//! The edge out: turns a [`Decision`] into Envoy's `CheckResponse`.
//!
//! Allow: identity headers set on the upstream request (overwriting anything the client sent
//! under those names), every identity header we do not set removed, so the app can trust
//! `x-auth-*`, and the API-key headers removed, so the secret never reaches the app (unless
//! `api_keys.forward_to_app`). Deny: the HTTP status, `WWW-Authenticate`, and a JSON body
//! saying why.

use crate::decision::{Allow, Decision, Deny};
use crate::proto::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
};
use crate::proto::pb::envoy::service::auth::v3::{
    CheckResponse, DeniedHttpResponse, OkHttpResponse, check_response::HttpResponse,
};
use crate::proto::pb::envoy::r#type::v3::HttpStatus;
use crate::proto::pb::google::rpc::Status;

pub const H_SUBJECT: &str = "x-auth-subject";
pub const H_PRINCIPAL_TYPE: &str = "x-auth-principal-type";
pub const H_USERNAME: &str = "x-auth-username";
pub const H_METHOD: &str = "x-auth-method";
pub const H_ROLES: &str = "x-auth-roles";
pub const H_SCOPES: &str = "x-auth-scopes";
pub const H_KEY_ID: &str = "x-auth-key-id";
pub const H_FAILED_OPEN: &str = "x-auth-failed-open";

/// Every header the app may trust because only we set it.
pub const IDENTITY_HEADERS: [&str; 8] = [
    H_SUBJECT,
    H_PRINCIPAL_TYPE,
    H_USERNAME,
    H_METHOD,
    H_ROLES,
    H_SCOPES,
    H_KEY_ID,
    H_FAILED_OPEN,
];

/// `value` is taken as is when it is already an owned `String` (no second copy).
fn header(key: &str, value: impl Into<String>) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            value: value.into(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

/// Header values cannot hold CR/LF; identity values come from tokens, so make sure.
fn clean(v: &str) -> String {
    v.chars().filter(|c| !c.is_control()).collect()
}

/// `strip`: request headers to remove on allow besides the identity headers we do not set
/// (the credential headers, [`crate::authn::api_key_headers_to_strip`]).
pub fn to_proto(decision: &Decision, request_id: &str, strip: &[String]) -> CheckResponse {
    match decision {
        Decision::Allow(a) => match a.local_reply {
            Some(status) => local_reply(status, &a.response_headers, request_id),
            None => allow(a, strip),
        },
        Decision::Deny(d) => deny(d, request_id),
    }
}

fn allow(a: &Allow, strip: &[String]) -> CheckResponse {
    let mut set: Vec<(&str, String)> = Vec::new();
    if let Some(p) = &a.principal {
        set.push((H_SUBJECT, clean(&p.subject)));
        set.push((H_PRINCIPAL_TYPE, p.kind.as_str().to_string()));
        set.push((H_USERNAME, clean(&p.username)));
        set.push((H_METHOD, p.method.as_str().to_string()));
        if !p.roles.is_empty() {
            set.push((H_ROLES, clean(&p.roles.join(","))));
        }
        if !p.scopes.is_empty() {
            set.push((H_SCOPES, clean(&p.scopes.join(" "))));
        }
        if !p.key_id.is_empty() {
            set.push((H_KEY_ID, clean(&p.key_id)));
        }
    }
    if let Some(cause) = &a.failed_open {
        set.push((H_FAILED_OPEN, clean(cause)));
    }
    // Removing a header we also set would race with Envoy's order of operations; overwrite
    // those, remove the rest. The credential headers are never among those set.
    let headers_to_remove = IDENTITY_HEADERS
        .iter()
        .filter(|h| !set.iter().any(|(k, _)| k == *h))
        .map(|h| h.to_string())
        .chain(
            strip
                .iter()
                .filter(|h| !set.iter().any(|(k, _)| k == h))
                .cloned(),
        )
        .collect();
    CheckResponse {
        status: Some(Status {
            code: tonic::Code::Ok as i32,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: set.into_iter().map(|(k, v)| header(k, v)).collect(),
            headers_to_remove,
            response_headers_to_add: a
                .response_headers
                .iter()
                .map(|(k, v)| header(k, v))
                .collect(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// An answer given here instead of forwarding the request (a CORS preflight). A denied
/// response is Envoy's only way to let the authorizer answer the client itself, so the gRPC
/// status is not OK; the HTTP status and headers are the answer, with no body.
fn local_reply(status: u16, headers: &[(String, String)], request_id: &str) -> CheckResponse {
    let mut set: Vec<HeaderValueOption> = headers.iter().map(|(k, v)| header(k, v)).collect();
    if !request_id.is_empty() {
        set.push(header("x-request-id", clean(request_id)));
    }
    CheckResponse {
        status: Some(Status {
            code: tonic::Code::PermissionDenied as i32,
            message: "answered by the authorizer, not forwarded".into(),
            ..Default::default()
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(status),
            }),
            headers: set,
            body: String::new(),
        })),
        ..Default::default()
    }
}

/// The JSON body of a deny.
pub fn deny_body(d: &Deny, request_id: &str) -> String {
    serde_json::json!({
        "error": d.error,
        "reason": d.reason,
        "status": d.http_status,
        "request_id": request_id,
    })
    .to_string()
}

fn deny(d: &Deny, request_id: &str) -> CheckResponse {
    let mut headers = vec![header("content-type", "application/json")];
    if let Some(c) = &d.www_authenticate {
        headers.push(header("www-authenticate", c));
    }
    if !request_id.is_empty() {
        headers.push(header("x-request-id", clean(request_id)));
    }
    headers.extend(d.response_headers.iter().map(|(k, v)| header(k, v)));
    CheckResponse {
        status: Some(Status {
            code: d.grpc_code as i32,
            message: d.reason.clone(),
            ..Default::default()
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(d.http_status),
            }),
            headers,
            body: deny_body(d, request_id),
        })),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn removed(r: &CheckResponse) -> Vec<String> {
        match &r.http_response {
            Some(HttpResponse::OkResponse(o)) => o.headers_to_remove.clone(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn every_allow_removes_the_credential_headers() {
        let strip = vec!["x-api-key".to_string(), "apikey".to_string()];
        let public = Allow {
            principal: None,
            rule: "public".into(),
            failed_open: None,
            response_headers: Vec::new(),
            relations: Vec::new(),
            local_reply: None,
        };
        let mut with_key = public.clone();
        let mut p = crate::authn::Principal::new(
            crate::authn::PrincipalKind::User,
            "alice",
            crate::authn::AuthMethod::ApiKey,
        );
        p.key_id = "ak_1".into();
        with_key.principal = Some(p);
        for (allow, strip, want_removed) in [
            (&public, &strip, vec!["x-api-key", "apikey"]),
            (&with_key, &strip, vec!["x-api-key", "apikey"]),
            (&with_key, &Vec::new(), vec![]),
        ] {
            let r = to_proto(&Decision::Allow(allow.clone()), "id", strip);
            let removed = removed(&r);
            for h in &want_removed {
                assert!(removed.contains(&h.to_string()), "{h} in {removed:?}");
            }
            for h in ["x-api-key", "apikey"] {
                if !want_removed.contains(&h) {
                    assert!(!removed.contains(&h.to_string()), "{h} kept: {removed:?}");
                }
            }
            // Identity headers still: set ones overwritten, the others removed.
            assert!(removed.contains(&H_FAILED_OPEN.to_string()));
        }
    }
}
