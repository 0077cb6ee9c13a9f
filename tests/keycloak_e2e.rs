//! The sidecar against a real Keycloak (tests/common/keycloak.rs: realm `mcp-server` from
//! deploy/keycloak/realm.json, realm `other` from tests/fixtures/keycloak/other-realm.json):
//! password-grant and client-credentials tokens, both key-source paths (`KEYCLOAK_URL` +
//! `KEYCLOAK_REALM` discovery, `AUTH_PUBLIC_KEY_URL` + `JWT_ISSUER`), issuer and audience
//! checks, key rotation, a Keycloak outage, and one trip through a real Envoy.
//!
//! One shared Keycloak serves every test of this binary except the rotation/outage test,
//! which owns a second instance (it adds signing keys and stops the server). Tests run in
//! parallel against the shared instance, so each one changes only state no other test reads:
//! alice's realm roles are read and changed only by `alice_needs_admin_for_admin_routes`; the
//! keys imported by `shared_signing_key_is_stopped_by_the_issuer_check` are passive in realm
//! `mcp-server` (they never sign its tokens).
//!
//! The sidecar config uses `jwt.refresh_cooldown: 1s` (default 10 s): an unknown `kid` is
//! refetched at most once per cooldown, and the tests wait out the cooldown rather than 10 s.

mod common;

use std::time::Duration;

use authz_sidecar::proto::pb::envoy::service::auth::v3::CheckResponse;
use common::envoy::Envoy;
use common::keycloak::*;
use common::process::tcp_open;
use common::sidecar::*;
use common::upstream::EchoUpstream;
use serde_json::{Value, json};

/// The sidecar config of these tests; the key source and issuer/audience come from the
/// environment, by the operators' variable names.
const CONFIG: &str = r#"
jwt:
  realm: mcp-server
  refresh_cooldown: 1s
principals:
  service_principals:
    - { id: svc-reporter, enabled: true, scopes: [read:agents] }
    - { id: svc-disabled, enabled: false }
routes:
  unmatched: deny
  rules:
    - { name: admin, path: "/admin/**", roles: [admin] }
    - { name: premium, path: "/premium/**", roles: [premium] }
    - { name: api, path: "/api/**" }
"#;

/// A little over `refresh_cooldown`.
const COOLDOWN: Duration = Duration::from_millis(1200);

/// `KEYCLOAK_URL` + `KEYCLOAK_REALM` (+ `JWT_AUDIENCE`): issuer and JWKS by OIDC discovery.
async fn discovery_sidecar(kc: &Keycloak, audience: &str) -> Sidecar {
    let base = kc.base_url();
    let s = Sidecar::start(
        CONFIG,
        &repo(),
        &[
            ("KEYCLOAK_URL", &base),
            ("KEYCLOAK_REALM", REALM),
            ("JWT_AUDIENCE", audience),
        ],
    )
    .await;
    s.wait_ready(Duration::from_secs(10)).await;
    s
}

/// `AUTH_PUBLIC_KEY_URL` = the certs endpoint of `keys_realm`, `JWT_ISSUER` = `issuer`.
async fn jwks_url_sidecar(kc: &Keycloak, keys_realm: &str, issuer: &str) -> Sidecar {
    let url = kc.jwks_url(keys_realm);
    let s = Sidecar::start(
        CONFIG,
        &repo(),
        &[
            ("AUTH_PUBLIC_KEY_URL", &url),
            ("JWT_ISSUER", issuer),
            ("JWT_AUDIENCE", CLIENT_ID),
        ],
    )
    .await;
    s.wait_ready(Duration::from_secs(10)).await;
    s
}

async fn get(s: &Sidecar, path: &str, token: &str) -> CheckResponse {
    s.check(Req::get(path).bearer(token)).await
}

fn kid(token: &str) -> String {
    jwt_header(token)["kid"]
        .as_str()
        .expect("Keycloak tokens carry a kid")
        .to_string()
}

/// The comma-separated roles header, sorted (Keycloak's role order is not fixed).
fn roles(r: &CheckResponse) -> Vec<String> {
    let mut v: Vec<String> = header(r, "x-auth-roles")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    v.sort();
    v
}

fn jwks_kids(jwks: &Value) -> Vec<String> {
    jwks["keys"]
        .as_array()
        .expect("JWKS keys")
        .iter()
        .filter_map(|k| k["kid"].as_str().map(String::from))
        .collect()
}

/// Imports a PEM private key as an `rsa` key provider of `realm` (RS256). `active: false`
/// makes it passive: published in the JWKS, never used to sign. Returns the component id.
async fn import_rsa_key(kc: &Keycloak, realm: &str, name: &str, active: bool, prio: u32) -> String {
    let pem = std::fs::read_to_string(repo().join("tests/fixtures/keys/rsa-b.pem")).unwrap();
    let (realm_rep, _) = kc
        .admin(reqwest::Method::GET, &format!("/{realm}"), None)
        .await;
    let body = json!({
        "name": name,
        "providerId": "rsa",
        "providerType": "org.keycloak.keys.KeyProvider",
        "parentId": realm_rep["id"],
        "config": {
            "priority": [prio.to_string()],
            "enabled": ["true"],
            "active": [active.to_string()],
            "algorithm": ["RS256"],
            "privateKey": [pem]
        }
    });
    kc.create_component(realm, &body).await
}

#[tokio::test]
async fn alice_needs_admin_for_admin_routes() {
    let kc = Keycloak::shared().await;
    let s = discovery_sidecar(kc, CLIENT_ID).await;
    let token = kc.password_token("alice", "alice123").await;
    let claims = jwt_claims(&token);
    assert_eq!(claims["iss"], json!(kc.issuer(REALM)), "{claims}");
    assert_eq!(claims["aud"], json!(CLIENT_ID), "{claims}");

    let r = get(&s, "/api/agents", &token).await;
    assert_eq!(status(&r), 200, "{r:?}");
    assert_eq!(header(&r, "x-auth-subject").as_deref(), Some("user:alice"));
    assert_eq!(header(&r, "x-auth-principal-type").as_deref(), Some("user"));
    assert_eq!(header(&r, "x-auth-username").as_deref(), Some("alice"));
    assert_eq!(header(&r, "x-auth-method").as_deref(), Some("jwt"));
    assert_eq!(roles(&r), ["premium", "user"], "roles from realm_access");
    assert_eq!(header(&r, "x-auth-key-id"), Some(kid(&token)));
    let r = get(&s, "/premium/report", &token).await;
    assert_eq!(status(&r), 200, "alice has premium: {r:?}");
    let r = get(&s, "/admin/users", &token).await;
    assert_eq!(
        (status(&r), reason(&r).as_str()),
        (403, "role admin required")
    );

    kc.grant_realm_role("alice", "admin").await;
    // The token she holds was issued without the role: still denied.
    let r = get(&s, "/admin/users", &token).await;
    assert_eq!(status(&r), 403, "{r:?}");
    let fresh = kc.password_token("alice", "alice123").await;
    let r = get(&s, "/admin/users", &fresh).await;
    kc.revoke_realm_role("alice", "admin").await;
    assert_eq!(status(&r), 200, "after the grant: {r:?}");
    assert_eq!(roles(&r), ["admin", "premium", "user"]);

    let after = kc.password_token("alice", "alice123").await;
    let r = get(&s, "/admin/users", &after).await;
    assert_eq!(
        (status(&r), reason(&r).as_str()),
        (403, "role admin required"),
        "after the revoke"
    );
    s.stop().await.unwrap();
}

/// The README's way to point at a realm: the embedded default config plus `KEYCLOAK_URL` and
/// `KEYCLOAK_REALM`. The file's `jwt.issuer` (and challenge realm) belonged to its own key
/// source, which the variables replaced, so the realm's issuer applies: every Keycloak token
/// used to be 401 "wrong issuer" here.
#[tokio::test]
async fn variables_that_replace_the_key_source_replace_the_files_issuer_too() {
    let kc = Keycloak::shared().await;
    let yaml = std::fs::read_to_string(local_dir().join("sidecar.yaml")).unwrap();
    let base = kc.base_url();
    let s = Sidecar::start(
        &yaml,
        &local_dir(),
        &[("KEYCLOAK_URL", &base), ("KEYCLOAK_REALM", REALM)],
    )
    .await;
    s.wait_ready(Duration::from_secs(10)).await;
    let token = kc.password_token("bob", "bob123").await;
    let r = get(&s, "/api/agents", &token).await;
    assert_eq!(status(&r), 200, "{r:?}");
    assert_eq!(header(&r, "x-auth-subject").as_deref(), Some("user:bob"));
    let r = s.check(Req::get("/api/agents")).await;
    assert_eq!(status(&r), 401);
    assert_eq!(
        header(&r, "www-authenticate").as_deref(),
        Some(format!("Bearer realm=\"{REALM}\"").as_str()),
        "the challenge names the realm the keys come from"
    );
    // JWT_ISSUER still wins over discovery, and a wrong one says so.
    let pinned = Sidecar::start(
        &yaml,
        &local_dir(),
        &[
            ("KEYCLOAK_URL", &base),
            ("KEYCLOAK_REALM", REALM),
            ("JWT_ISSUER", "https://elsewhere/realms/x"),
        ],
    )
    .await;
    pinned.wait_ready(Duration::from_secs(10)).await;
    let r = get(&pinned, "/api/agents", &token).await;
    assert_eq!(status(&r), 401, "{r:?}");
    s.stop().await.unwrap();
    pinned.stop().await.unwrap();
}

#[tokio::test]
async fn bob_through_the_jwks_url_path() {
    let kc = Keycloak::shared().await;
    let s = jwks_url_sidecar(kc, REALM, &kc.issuer(REALM)).await;
    let token = kc.password_token("bob", "bob123").await;
    let r = get(&s, "/api/agents", &token).await;
    assert_eq!(status(&r), 200, "{r:?}");
    assert_eq!(header(&r, "x-auth-subject").as_deref(), Some("user:bob"));
    assert_eq!(roles(&r), ["user"]);
    let r = get(&s, "/premium/report", &token).await;
    assert_eq!(
        (status(&r), reason(&r).as_str()),
        (403, "role premium required")
    );
    let r = get(&s, "/admin/users", &token).await;
    assert_eq!(
        (status(&r), reason(&r).as_str()),
        (403, "role admin required")
    );

    // A JWT_ISSUER that differs from the realm's (here: "localhost" instead of the pinned
    // 127.0.0.1 hostname) refuses every genuine token, saying so.
    let wrong = kc.issuer(REALM).replace("127.0.0.1", "localhost");
    let s2 = jwks_url_sidecar(kc, REALM, &wrong).await;
    let r = get(&s2, "/api/agents", &token).await;
    assert_eq!(status(&r), 401);
    // The expected issuer is the operator's (log and doctor), not the client's to read.
    assert_eq!(reason(&r), format!("wrong issuer {:?}", kc.issuer(REALM)));
    s.stop().await.unwrap();
    s2.stop().await.unwrap();
}

#[tokio::test]
async fn service_principals_from_client_credentials() {
    let kc = Keycloak::shared().await;
    let s = discovery_sidecar(kc, CLIENT_ID).await;
    let token = kc
        .client_credentials_token(SVC_REPORTER, SVC_REPORTER_SECRET)
        .await;
    let r = get(&s, "/api/reports", &token).await;
    assert_eq!(status(&r), 200, "{r:?}");
    assert_eq!(
        header(&r, "x-auth-principal-type").as_deref(),
        Some("service_principal")
    );
    assert_eq!(
        header(&r, "x-auth-subject").as_deref(),
        Some("service_principal:svc-reporter")
    );
    assert_eq!(
        header(&r, "x-auth-username").as_deref(),
        Some("service-account-svc-reporter")
    );
    let scopes = header(&r, "x-auth-scopes").unwrap_or_default();
    assert!(
        scopes.split(' ').any(|s| s == "read:agents"),
        "the listing adds read:agents: {scopes}"
    );

    // Keycloak issues svc-disabled a token; the sidecar's listing refuses it.
    let disabled = kc
        .client_credentials_token(SVC_DISABLED, SVC_DISABLED_SECRET)
        .await;
    let r = get(&s, "/api/reports", &disabled).await;
    assert_eq!(
        (status(&r), reason(&r).as_str()),
        (403, "service principal svc-disabled disabled")
    );

    // Disabled in Keycloak too: no new tokens at all. A token issued before stays valid to
    // the sidecar until it expires (no introspection), so the listing is the quick stop.
    kc.set_client_enabled(SVC_DISABLED, false).await;
    let refused = kc
        .try_client_credentials_token(SVC_DISABLED, SVC_DISABLED_SECRET)
        .await;
    kc.set_client_enabled(SVC_DISABLED, true).await;
    assert!(refused.is_err(), "{refused:?}");
    s.stop().await.unwrap();
}

#[tokio::test]
async fn tokens_for_another_audience_are_refused() {
    let kc = Keycloak::shared().await;
    let token = kc.password_token("bob", "bob123").await;
    // JWT_AUDIENCE demands an audience Keycloak's token does not carry.
    let s = discovery_sidecar(kc, "reports-api").await;
    let r = get(&s, "/api/agents", &token).await;
    assert_eq!(status(&r), 401);
    assert_eq!(
        reason(&r),
        "wrong audience \"mcp-server\": expected \"reports-api\""
    );
    s.stop().await.unwrap();

    // A client without the audience mapper: its tokens are not for mcp-server.
    let s = discovery_sidecar(kc, CLIENT_ID).await;
    let client = json!({
        "clientId": "svc-no-audience",
        "enabled": true,
        "publicClient": false,
        "clientAuthenticatorType": "client-secret",
        "secret": "test-only-no-audience-secret",
        "serviceAccountsEnabled": true,
        "standardFlowEnabled": false,
        "directAccessGrantsEnabled": false
    });
    let (_, location) = kc
        .admin(
            reqwest::Method::POST,
            &format!("/{REALM}/clients"),
            Some(&client),
        )
        .await;
    let id = location.unwrap().rsplit('/').next().unwrap().to_string();
    let other = kc
        .try_client_credentials_token("svc-no-audience", "test-only-no-audience-secret")
        .await;
    kc.admin(
        reqwest::Method::DELETE,
        &format!("/{REALM}/clients/{id}"),
        None,
    )
    .await;
    let other = other.unwrap()["access_token"].as_str().unwrap().to_string();
    let aud = jwt_claims(&other)["aud"].clone();
    let r = get(&s, "/api/agents", &other).await;
    assert_eq!(status(&r), 401, "aud {aud}: {r:?}");
    let why = reason(&r);
    if aud.is_null() {
        assert_eq!(why, "missing claim aud");
    } else {
        assert_eq!(
            why,
            format!("wrong audience {aud}: expected \"mcp-server\"")
        );
    }
    s.stop().await.unwrap();
}

/// Realm `other` issues tokens with the same client id, audience and username ("alice") as
/// realm `mcp-server`. With its own key, the signature check refuses them; when both realms
/// share a signing key (an imported key, as some operators do), only the issuer stops them.
#[tokio::test]
async fn shared_signing_key_is_stopped_by_the_issuer_check() {
    let kc = Keycloak::shared().await;
    let disc = discovery_sidecar(kc, CLIENT_ID).await;
    let url = jwks_url_sidecar(kc, REALM, &kc.issuer(REALM)).await;
    let foreign = kc.other_realm_token().await;
    assert_eq!(jwt_claims(&foreign)["aud"], json!(CLIENT_ID));
    assert_eq!(jwt_claims(&foreign)["preferred_username"], json!("alice"));
    for s in [&disc, &url] {
        let r = get(s, "/api/agents", &foreign).await;
        assert_eq!(status(&r), 401);
        // The JWKS URL is internal: the log and doctor name it, the client does not read it.
        assert_eq!(
            reason(&r),
            format!("signing key kid={} not found", kid(&foreign))
        );
    }

    // Same RSA key: active (signing) in realm `other`, passive (published only) in
    // `mcp-server`, so realm mcp-server's own tokens are unaffected.
    let in_other = import_rsa_key(kc, OTHER_REALM, "shared-key", true, 500).await;
    let in_main = import_rsa_key(kc, REALM, "shared-key-passive", false, 1).await;
    let foreign = kc.other_realm_token().await;
    let published = jwks_kids(&kc.jwks(REALM).await);
    let cleanup = async {
        kc.admin(
            reqwest::Method::DELETE,
            &format!("/{OTHER_REALM}/components/{in_other}"),
            None,
        )
        .await;
        kc.remove_component(&in_main).await;
    };
    assert!(
        published.contains(&kid(&foreign)),
        "passive key {} published by {REALM}: {published:?}",
        kid(&foreign)
    );
    tokio::time::sleep(COOLDOWN).await;
    let mut reasons = Vec::new();
    for s in [&disc, &url] {
        let r = get(s, "/api/agents", &foreign).await;
        reasons.push((status(&r), reason(&r)));
    }
    cleanup.await;
    let want = format!("wrong issuer {:?}", kc.issuer(OTHER_REALM));
    assert_eq!(reasons, vec![(401, want.clone()), (401, want)]);
    disc.stop().await.unwrap();
    url.stop().await.unwrap();
}

/// Through a real Envoy: a Keycloak token in, the app sees who called, and identity headers
/// sent by the client do not get through.
#[tokio::test]
async fn through_envoy_the_app_sees_the_keycloak_identity() {
    let kc = Keycloak::shared().await;
    let s = jwks_url_sidecar(kc, REALM, &kc.issuer(REALM)).await;
    let (up_addr, upstream) = EchoUpstream::start().await;
    let envoy = Envoy::start(s.grpc_addr, up_addr).await;
    let alice = kc.password_token("alice", "alice123").await;
    let http = reqwest::Client::new();

    let resp = http
        .get(format!("{}/api/agents?page=2", envoy.url()))
        .bearer_auth(&alice)
        .header("x-auth-subject", "user:mallory")
        .header("x-auth-roles", "superuser")
        .header("x-auth-failed-open", "yes")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo: Value = resp.json().await.unwrap();
    let h = &echo["headers"];
    assert_eq!(h["x-auth-subject"], "user:alice", "{echo}");
    assert_eq!(h["x-auth-principal-type"], "user");
    assert_eq!(h["x-auth-username"], "alice");
    assert_eq!(h["x-auth-method"], "jwt");
    assert_eq!(h["x-auth-key-id"], json!(kid(&alice)));
    let seen_roles = h["x-auth-roles"].as_str().unwrap_or_default();
    assert!(
        seen_roles.split(',').any(|r| r == "user") && !seen_roles.contains("superuser"),
        "{seen_roles}"
    );
    assert!(h.get("x-auth-failed-open").is_none(), "{echo}");
    assert_eq!(echo["path"], "/api/agents");

    let hits = upstream.hits();
    let resp = http
        .get(format!("{}/api/agents", envoy.url()))
        .header("x-auth-subject", "user:alice")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().contains_key("www-authenticate"));
    let bob = kc.password_token("bob", "bob123").await;
    let resp = http
        .get(format!("{}/admin/users", envoy.url()))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["reason"], "role admin required");
    assert_eq!(upstream.hits(), hits, "denied requests never reach the app");
    drop(envoy);
    s.stop().await.unwrap();
}

/// On an owned Keycloak: rotation (a new key provider with a higher priority) without a
/// sidecar restart, then an outage (cached keys keep working, unknown kids fail naming the
/// JWKS URL, readiness follows whether keys are loaded), then recovery, then a key removed
/// from the realm (its tokens refused at the sidecars' next fetch, cached or not).
#[tokio::test]
async fn key_rotation_and_keycloak_outage() {
    let mut kc = Keycloak::start_owned().await;
    let jwks_url = kc.jwks_url(REALM);
    let by_url = jwks_url_sidecar(&kc, REALM, &kc.issuer(REALM)).await;
    let by_disc = discovery_sidecar(&kc, CLIENT_ID).await;
    let both = [&by_url, &by_disc];

    // --- rotation ---------------------------------------------------------------------
    let t0 = kc.password_token("bob", "bob123").await;
    let old_spare = kc.password_token("alice", "alice123").await; // shown only after rotation
    let kid0 = kid(&t0);
    for s in both {
        assert_eq!(status(&get(s, "/api/x", &t0).await), 200);
    }
    kc.add_rsa_key_provider("rotated", 200).await;
    let t1 = kc.password_token("bob", "bob123").await;
    let kid1 = kid(&t1);
    assert_ne!(kid1, kid0, "the new provider signs new tokens");
    let published = jwks_kids(&kc.jwks(REALM).await);
    assert!(
        published.contains(&kid0) && published.contains(&kid1),
        "{published:?}"
    );
    tokio::time::sleep(COOLDOWN).await; // past the cooldown of the startup fetch
    for s in both {
        let r = get(s, "/api/x", &t1).await;
        assert_eq!(status(&r), 200, "new kid accepted without restart: {r:?}");
        assert_eq!(header(&r, "x-auth-key-id"), Some(kid1.clone()));
        // Signed with the old key, first seen now: verified against the refetched set.
        let r = get(s, "/api/x", &old_spare).await;
        assert_eq!(status(&r), 200, "old key still published: {r:?}");
        assert_eq!(header(&r, "x-auth-key-id"), Some(kid0.clone()));
    }

    // --- outage -------------------------------------------------------------------------
    let t1_spare = kc.password_token("alice", "alice123").await; // kid1, never shown yet
    kc.add_rsa_key_provider("unseen", 300).await;
    let t2 = kc.password_token("bob", "bob123").await;
    let kid2 = kid(&t2);
    assert!(kid2 != kid0 && kid2 != kid1);
    let foreign = kc.other_realm_token().await;
    kc.stop();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], kc.port()));
    assert!(!tcp_open(addr).await, "keycloak stopped");
    tokio::time::sleep(COOLDOWN).await;
    for s in both {
        for t in [&t0, &t1_spare] {
            let r = get(s, "/api/x", t).await;
            assert_eq!(status(&r), 200, "known kid, cached key: {r:?}");
        }
        let (code, body) = s.ops_get("/readyz").await;
        assert_eq!(code, 200, "keys are loaded: {body}");
    }
    // Two unknown kids back to back: the first refetch fails, the second falls inside the
    // cooldown; both must say the keys could not be refreshed, not "not found".
    for s in both {
        for (t, k) in [(&t2, &kid2), (&foreign, &kid(&foreign))] {
            let r = get(s, "/api/x", t).await;
            assert_eq!(status(&r), 401);
            let why = reason(&r);
            assert_eq!(
                why,
                format!("signing key kid={k} not found: the signing keys cannot be refreshed")
            );
        }
    }

    // A sidecar started while Keycloak is down: up, not ready, and says why.
    let cold = Sidecar::start(
        CONFIG,
        &repo(),
        &[
            ("AUTH_PUBLIC_KEY_URL", &jwks_url),
            ("JWT_ISSUER", &kc.issuer(REALM)),
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, body) = cold.ops_get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(&jwks_url), "{body}");
    let r = get(&cold, "/api/x", &t0).await;
    assert_eq!(status(&r), 401);
    // The cause ("connection refused") and the URL are in /readyz and the log, not the reason.
    assert_eq!(
        reason(&r),
        format!(
            "signing key kid={} not found: the signing keys cannot be refreshed",
            kid(&t0)
        )
    );

    // --- recovery -----------------------------------------------------------------------
    kc.start_again().await;
    cold.wait_ready(Duration::from_secs(10)).await;
    assert_eq!(status(&get(&cold, "/api/x", &t0).await), 200);
    assert_eq!(status(&get(&cold, "/api/x", &t2).await), 200);
    tokio::time::sleep(COOLDOWN).await;
    for s in both {
        let r = get(s, "/api/x", &t2).await;
        assert_eq!(status(&r), 200, "the key minted during the outage: {r:?}");
    }

    // --- a key leaves the JWKS (revoked): its tokens stop at once, cached or not --------
    let revoked = kc.add_rsa_key_provider("revoked", 400).await;
    let t_rev = kc.password_token("bob", "bob123").await;
    let kid_rev = kid(&t_rev);
    tokio::time::sleep(COOLDOWN).await;
    for s in both {
        for _ in 0..2 {
            // The second answer comes from the verified-token cache.
            assert_eq!(status(&get(s, "/api/x", &t_rev).await), 200);
        }
    }
    kc.remove_component(&revoked).await;
    assert!(!jwks_kids(&kc.jwks(REALM).await).contains(&kid_rev));
    // The sidecars learn of it at their next fetch: here a new key's first token.
    kc.add_rsa_key_provider("after", 500).await;
    let t_after = kc.password_token("bob", "bob123").await;
    tokio::time::sleep(COOLDOWN).await;
    for s in both {
        assert_eq!(status(&get(s, "/api/x", &t_after).await), 200);
        let r = get(s, "/api/x", &t_rev).await;
        assert_eq!(
            status(&r),
            401,
            "a token of a revoked key, cached before: {r:?}"
        );
        assert!(
            reason(&r).starts_with(&format!("signing key kid={kid_rev} not found")),
            "{}",
            reason(&r)
        );
    }
    cold.stop().await.unwrap();
    by_url.stop().await.unwrap();
    by_disc.stop().await.unwrap();
    kc.stop();
}
