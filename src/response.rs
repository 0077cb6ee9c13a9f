//! The edge out: turns a [`Decision`] into Envoy's `CheckResponse`.
//!
//! Allow: identity headers set on the upstream request (overwriting anything the client sent
//! under those names), every identity header we do not set removed, so the app can trust
//! `x-auth-*`, and the API-key headers removed, so the secret never reaches the app (unless
//! `api_keys.forward_to_app`). Deny: the HTTP status, `WWW-Authenticate`, and a JSON body
//! saying why.
//!
//! Every answer of a logged check (allow, deny, local reply) carries the check's decision id
//! as dynamic metadata (`decision_id`, `decision`, `rule`, `subject` when known), which Envoy
//! files under `envoy.filters.http.ext_authz` for its access log; a deny's body carries it
//! too. Invariant: the metadata holds ids only, never a token, key or client text beyond the
//! rule name and the principal's subject.

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

/// Header values cannot hold CR/LF; identity values come from tokens, so make sure. A value
/// of printable ASCII (nearly all) is copied whole; any other byte (C1 controls are
/// multi-byte) sends it through the char filter.
fn clean(v: &str) -> String {
    if is_printable_ascii(v) {
        return v.to_string();
    }
    v.chars().filter(|c| !c.is_control()).collect()
}

fn is_printable_ascii(v: &str) -> bool {
    v.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// [`clean`] for a value built for the header (a join): kept as is when already clean.
fn clean_owned(v: String) -> String {
    if is_printable_ascii(&v) { v } else { clean(&v) }
}

/// `strip`: request headers to remove on allow besides the identity headers we do not set
/// (the credential headers, [`crate::authn::api_key_headers_to_strip`]). No decision id: for
/// answers that are shown, not served (no decision line names them).
pub fn to_proto(decision: &Decision, request_id: &str, strip: &[String]) -> CheckResponse {
    to_proto_with_id(decision, request_id, "", strip)
}

/// [`to_proto`] for a served check: `decision_id` goes into the dynamic metadata and the
/// deny body (nothing is added when it is empty).
pub fn to_proto_with_id(
    decision: &Decision,
    request_id: &str,
    decision_id: &str,
    strip: &[String],
) -> CheckResponse {
    let mut response = match decision {
        Decision::Allow(a) => match a.local_reply {
            Some(status) => local_reply(status, &a.response_headers, request_id),
            None => allow(a, strip),
        },
        Decision::Deny(d) => deny(d, request_id, decision_id),
    };
    if !decision_id.is_empty() {
        response.dynamic_metadata = Some(dynamic_metadata(decision, decision_id));
    }
    response
}

/// What Envoy keeps of the decision for its access log and later filters.
fn dynamic_metadata(decision: &Decision, decision_id: &str) -> prost_types::Struct {
    use prost_types::value::Kind;
    let (verdict, rule, principal) = match decision {
        Decision::Allow(a) => ("allow", Some(a.rule.as_str()), a.principal.as_ref()),
        Decision::Deny(d) => ("deny", d.rule.as_deref(), d.principal.as_ref()),
    };
    let mut fields = std::collections::BTreeMap::new();
    let mut put = |k: &str, v: String| {
        fields.insert(
            k.to_string(),
            prost_types::Value {
                kind: Some(Kind::StringValue(v)),
            },
        );
    };
    put("decision_id", decision_id.to_string());
    put("decision", verdict.to_string());
    if let Some(rule) = rule {
        put("rule", rule.to_string());
    }
    if let Some(p) = principal {
        put("subject", clean(&p.subject));
    }
    prost_types::Struct { fields }
}

/// What Envoy does with a request, as plain data (for `authz-sidecar check`): the values
/// [`to_proto`] sends, built by the same functions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The HTTP status the client gets from the sidecar (200 when the request goes on).
    pub status: u16,
    /// The request goes on to the app.
    pub forwarded: bool,
    /// Request headers set (overwritten) on the way to the app.
    pub set: Vec<(String, String)>,
    /// Request headers removed on the way to the app.
    pub remove: Vec<String>,
    /// Headers on the answer to the client (CORS; a deny's challenge and content type).
    pub response_headers: Vec<(String, String)>,
    /// A deny's JSON body.
    pub body: Option<String>,
}

/// [`Applied`] for `decision`, as [`to_proto`] would answer it.
pub fn applied(decision: &Decision, request_id: &str, strip: &[String]) -> Applied {
    let own = |h: &[(String, String)]| h.to_vec();
    match decision {
        Decision::Allow(a) => match a.local_reply {
            Some(status) => Applied {
                status,
                forwarded: false,
                set: Vec::new(),
                remove: Vec::new(),
                response_headers: local_reply_headers(&a.response_headers, request_id),
                body: None,
            },
            None => {
                let (set, remove) = upstream_headers(a, strip);
                Applied {
                    status: 200,
                    forwarded: true,
                    set: set.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                    remove,
                    response_headers: own(&a.response_headers),
                    body: None,
                }
            }
        },
        Decision::Deny(d) => Applied {
            status: d.http_status,
            forwarded: false,
            set: Vec::new(),
            remove: Vec::new(),
            response_headers: deny_headers(d, request_id),
            body: Some(deny_body(d, request_id, "")),
        },
    }
}

/// The identity headers set on the upstream request, and the headers removed from it.
fn upstream_headers(a: &Allow, strip: &[String]) -> (Vec<(&'static str, String)>, Vec<String>) {
    let mut set: Vec<(&'static str, String)> = Vec::with_capacity(IDENTITY_HEADERS.len());
    if let Some(p) = &a.principal {
        set.push((H_SUBJECT, clean(&p.subject)));
        set.push((H_PRINCIPAL_TYPE, p.kind.as_str().to_string()));
        set.push((H_USERNAME, clean(&p.username)));
        set.push((H_METHOD, p.method.as_str().to_string()));
        if !p.roles.is_empty() {
            set.push((H_ROLES, clean_owned(p.roles.join(","))));
        }
        if !p.scopes.is_empty() {
            set.push((H_SCOPES, clean_owned(p.scopes.join(" "))));
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
    let is_set = |h: &str| set.iter().any(|(k, _)| *k == h);
    let mut headers_to_remove = Vec::with_capacity(IDENTITY_HEADERS.len() + strip.len());
    headers_to_remove.extend(
        IDENTITY_HEADERS
            .iter()
            .filter(|h| !is_set(h))
            .map(|h| h.to_string()),
    );
    headers_to_remove.extend(strip.iter().filter(|h| !is_set(h)).cloned());
    (set, headers_to_remove)
}

fn allow(a: &Allow, strip: &[String]) -> CheckResponse {
    let (set, headers_to_remove) = upstream_headers(a, strip);
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
    let set: Vec<HeaderValueOption> = local_reply_headers(headers, request_id)
        .into_iter()
        .map(|(k, v)| header(&k, v))
        .collect();
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

fn local_reply_headers(headers: &[(String, String)], request_id: &str) -> Vec<(String, String)> {
    let mut set = headers.to_vec();
    if !request_id.is_empty() {
        set.push(("x-request-id".into(), clean(request_id)));
    }
    set
}

/// The headers of a deny's answer: content type, the challenge, the request id, CORS.
fn deny_headers(d: &Deny, request_id: &str) -> Vec<(String, String)> {
    let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
    if let Some(c) = &d.www_authenticate {
        headers.push(("www-authenticate".into(), c.clone()));
    }
    if !request_id.is_empty() {
        headers.push(("x-request-id".into(), clean(request_id)));
    }
    headers.extend(d.response_headers.iter().cloned());
    headers
}

/// The JSON body of a deny; `decision_id` joins it to the decision line (left out when empty).
pub fn deny_body(d: &Deny, request_id: &str, decision_id: &str) -> String {
    let mut body = serde_json::json!({
        "error": d.error,
        "reason": d.reason,
        "status": d.http_status,
        "request_id": request_id,
    });
    if !decision_id.is_empty() {
        body["decision_id"] = decision_id.into();
    }
    body.to_string()
}

fn deny(d: &Deny, request_id: &str, decision_id: &str) -> CheckResponse {
    let headers = deny_headers(d, request_id)
        .into_iter()
        .map(|(k, v)| header(&k, v))
        .collect();
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
            body: deny_body(d, request_id, decision_id),
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
    fn header_values_lose_every_control_character_and_keep_the_rest() {
        for (value, want) in [
            ("alice", "alice"),
            ("a b~", "a b~"),
            ("alice\r\nx-admin: 1", "alicex-admin: 1"),
            ("tab\there\u{7f}", "tabhere"),
            ("c1\u{85}\u{9b}end", "c1end"),
            ("jos\u{e9}", "jos\u{e9}"),
        ] {
            assert_eq!(clean(value), want, "{value:?}");
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
        with_key.principal = Some(p.into());
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

    fn metadata(r: &CheckResponse) -> std::collections::BTreeMap<String, String> {
        use prost_types::value::Kind;
        r.dynamic_metadata
            .as_ref()
            .map(|m| {
                m.fields
                    .iter()
                    .map(|(k, v)| match &v.kind {
                        Some(Kind::StringValue(s)) => (k.clone(), s.clone()),
                        other => panic!("{k} is not a string: {other:?}"),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn every_answer_carries_its_decision_id_as_metadata_and_a_deny_in_its_body() {
        let mut alice = crate::authn::Principal::new(
            crate::authn::PrincipalKind::User,
            "alice",
            crate::authn::AuthMethod::Jwt,
        );
        alice.key_id = "dev-local-1".into();
        let allow = Allow {
            principal: Some(alice.clone().into()),
            rule: "api".into(),
            failed_open: None,
            response_headers: Vec::new(),
            relations: Vec::new(),
            local_reply: None,
        };
        let r = to_proto_with_id(
            &Decision::Allow(allow.clone()),
            "rid",
            "00c0ffee00c0ffee",
            &[],
        );
        let m = metadata(&r);
        assert_eq!(m["decision_id"], "00c0ffee00c0ffee");
        assert_eq!(m["decision"], "allow");
        assert_eq!(m["rule"], "api");
        assert_eq!(m["subject"], "user:alice");
        assert_eq!(m.len(), 4, "ids only: {m:?}");

        let preflight = Allow {
            principal: None,
            local_reply: Some(204),
            ..allow
        };
        let m = metadata(&to_proto_with_id(
            &Decision::Allow(preflight),
            "rid",
            "0a",
            &[],
        ));
        assert_eq!((m["decision_id"].as_str(), m.get("subject")), ("0a", None));

        let refused = crate::decision::Failure::CorsOrigin("https://evil.example".into());
        let deny = crate::decision::deny_for(&refused, "realm");
        let r = to_proto_with_id(&Decision::Deny(deny), "rid", "0b", &[]);
        let m = metadata(&r);
        assert_eq!(
            (m["decision_id"].as_str(), m["decision"].as_str()),
            ("0b", "deny")
        );
        let Some(HttpResponse::DeniedResponse(denied)) = &r.http_response else {
            panic!("a deny is a denied response");
        };
        let body: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
        assert_eq!(body["decision_id"], "0b");
        assert_eq!(body["request_id"], "rid");

        // An answer that is only shown carries no id.
        let shown = to_proto(
            &Decision::Deny(crate::decision::deny_for(&refused, "r")),
            "rid",
            &[],
        );
        assert!(shown.dynamic_metadata.is_none());
    }
}
