//! Service principals the operator lists (`principals.service_principals`): whether each is
//! enabled and which scopes it holds. Applied to every authenticated principal, whatever the
//! credential, so disabling a principal stops its tokens and its API keys alike.

use std::collections::HashMap;
use std::sync::Arc;

use super::{AuthnError, Principal, PrincipalKind};
use crate::config::{PrincipalsConfig, ServicePrincipalConfig};

#[derive(Debug, Clone, Default)]
pub struct Principals {
    require_listed: bool,
    by_id: HashMap<String, ServicePrincipalConfig>,
}

impl Principals {
    pub fn new(cfg: &PrincipalsConfig) -> Self {
        Self {
            require_listed: cfg.require_listed,
            by_id: cfg
                .service_principals
                .iter()
                .map(|sp| (sp.id.clone(), sp.clone()))
                .collect(),
        }
    }

    /// Lets a principal through, adding the scopes its listing grants. The principal may be
    /// shared (the token cache's): it is copied only when a scope has to be added.
    pub fn admit(&self, mut p: Arc<Principal>) -> Result<Arc<Principal>, AuthnError> {
        if p.kind != PrincipalKind::ServicePrincipal {
            return Ok(p);
        }
        match self.by_id.get(&p.id) {
            Some(sp) if !sp.enabled => Err(AuthnError::PrincipalDisabled { id: p.id.clone() }),
            Some(sp) => {
                for s in &sp.scopes {
                    if !p.has_scope(s) {
                        Arc::make_mut(&mut p).scopes.push(s.clone());
                    }
                }
                Ok(p)
            }
            None if self.require_listed => Err(AuthnError::PrincipalNotListed { id: p.id.clone() }),
            None => Ok(p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::AuthMethod;

    #[test]
    fn disabled_and_unlisted() {
        let cfg = PrincipalsConfig {
            require_listed: true,
            service_principals: vec![
                ServicePrincipalConfig {
                    id: "on".into(),
                    enabled: true,
                    scopes: vec!["execute:tools".into()],
                },
                ServicePrincipalConfig {
                    id: "off".into(),
                    enabled: false,
                    scopes: vec![],
                },
            ],
        };
        let ps = Principals::new(&cfg);
        let sp = |id| {
            Arc::new(Principal::new(
                PrincipalKind::ServicePrincipal,
                id,
                AuthMethod::Jwt,
            ))
        };
        assert_eq!(ps.admit(sp("on")).unwrap().scopes, vec!["execute:tools"]);
        assert_eq!(
            ps.admit(sp("off")).unwrap_err().to_string(),
            "service principal off disabled"
        );
        assert!(matches!(
            ps.admit(sp("other")),
            Err(AuthnError::PrincipalNotListed { .. })
        ));
        let user = Arc::new(Principal::new(
            PrincipalKind::User,
            "alice",
            AuthMethod::Jwt,
        ));
        assert!(ps.admit(user).is_ok());
    }

    /// The token cache hands out its own principal: granting a listed principal its scopes
    /// must not write them into the cached one (a later policy without them would still see
    /// them), and a principal with nothing to add stays the very same one.
    #[test]
    fn granted_scopes_go_on_a_copy_never_on_the_shared_principal() {
        let cfg = PrincipalsConfig {
            require_listed: false,
            service_principals: vec![ServicePrincipalConfig {
                id: "svc".into(),
                enabled: true,
                scopes: vec!["execute:tools".into()],
            }],
        };
        let ps = Principals::new(&cfg);
        let cached = Arc::new(Principal::new(
            PrincipalKind::ServicePrincipal,
            "svc",
            AuthMethod::Jwt,
        ));
        let admitted = ps.admit(cached.clone()).unwrap();
        assert_eq!(admitted.scopes, vec!["execute:tools"]);
        assert!(cached.scopes.is_empty(), "the shared principal was changed");

        let user = Arc::new(Principal::new(
            PrincipalKind::User,
            "alice",
            AuthMethod::Jwt,
        ));
        assert!(Arc::ptr_eq(&ps.admit(user.clone()).unwrap(), &user));
    }
}
