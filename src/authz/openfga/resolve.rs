//! Startup resolution: which store (`OPENFGA_STORE_ID` or `OPENFGA_STORE_NAME`) and which
//! authorization model (`OPENFGA_MODEL_ID`, or the store's latest) checks are asked against.
//!
//! Owns: the store and model look-ups and their errors. Invariant: every failure is one
//! [`OpenFgaError`] line naming the variable to fix and what the server has instead (its
//! stores, its models), so an operator never has to query OpenFGA to find the right value.

use reqwest::StatusCode;

use super::transport::{Transport, encode_query};
use super::wire::{ModelJson, ModelOne, ModelsPage, StoreJson, StoresPage};
use super::{MODEL_FILE, OpenFgaError};
use crate::config::{OpenFgaConfig, StoreRef};

/// Pages of `GET /stores` read to list what the server has (100 stores each).
const MAX_STORE_PAGES: usize = 20;
/// Stores and models quoted in an error before "and N more".
const MAX_LISTED: usize = 10;

/// The store and model the configuration names.
pub(super) struct Resolved {
    pub(super) store_id: String,
    pub(super) store_name: String,
    pub(super) model: ModelJson,
}

/// Finds the store, then the pinned model or the latest one.
pub(super) async fn resolve(t: &Transport, cfg: &OpenFgaConfig) -> Result<Resolved, OpenFgaError> {
    let (store_id, store_name) = resolve_store(t, &cfg.store).await?;
    let store_label = store_label(&store_name, &store_id);
    let model = match &cfg.model_id {
        Some(id) => pinned_model(t, &store_id, &store_label, id).await?,
        None => latest_model(t, &store_id)
            .await?
            .ok_or(OpenFgaError::NoModel { store: store_label })?,
    };
    Ok(Resolved {
        store_id,
        store_name,
        model,
    })
}

/// `mcp (01J...)`, as errors name a store.
pub(super) fn store_label(name: &str, id: &str) -> String {
    format!("{name} ({id})")
}

/// The store's newest model; `None` when it has none.
pub(super) async fn latest_model(
    t: &Transport,
    store_id: &str,
) -> Result<Option<ModelJson>, OpenFgaError> {
    let path = format!("/stores/{store_id}/authorization-models?page_size=1");
    let page: ModelsPage = t
        .get(&path)
        .await
        .map_err(|e| e.into_startup(t.base(), &format!("GET {path}")))?;
    Ok(page.authorization_models.into_iter().next())
}

async fn list_stores(t: &Transport) -> Result<Vec<StoreJson>, OpenFgaError> {
    let mut stores = Vec::new();
    let mut token = String::new();
    for _ in 0..MAX_STORE_PAGES {
        let mut path = "/stores?page_size=100".to_string();
        if !token.is_empty() {
            path.push_str("&continuation_token=");
            path.push_str(&encode_query(&token));
        }
        let page: StoresPage = t
            .get(&path)
            .await
            .map_err(|e| e.into_startup(t.base(), "GET /stores"))?;
        stores.extend(page.stores);
        if page.continuation_token.is_empty() || page.continuation_token == token {
            break;
        }
        token = page.continuation_token;
    }
    Ok(stores)
}

/// "the server has: mcp (01J...), other (01K...)".
fn describe_stores(stores: &[StoreJson]) -> String {
    if stores.is_empty() {
        return "the server has no stores: create one (POST /stores, or `fga store create`)".into();
    }
    let mut listed: Vec<String> = stores
        .iter()
        .take(MAX_LISTED)
        .map(|s| store_label(&s.name, &s.id))
        .collect();
    if stores.len() > MAX_LISTED {
        listed.push(format!("and {} more", stores.len() - MAX_LISTED));
    }
    format!("the server has: {}", listed.join(", "))
}

async fn resolve_store(t: &Transport, store: &StoreRef) -> Result<(String, String), OpenFgaError> {
    match store {
        StoreRef::Id(id) => {
            let err = match t
                .get::<StoreJson>(&format!("/stores/{}", encode_query(id)))
                .await
            {
                Ok(s) => return Ok((s.id, s.name)),
                Err(e) => e,
            };
            let reason = match (err.status(), err.code()) {
                (Some(StatusCode::NOT_FOUND), _) | (_, "store_id_not_found") => {
                    "store not found".to_string()
                }
                (Some(StatusCode::BAD_REQUEST), "validation_error") => {
                    "not a store id (26 characters, like 01HVMMBCMGZNT3SED4Z17ECXCA)".to_string()
                }
                _ => return Err(err.into_startup(t.base(), &format!("GET /stores/{id}"))),
            };
            let stores = list_stores(t).await?;
            Err(OpenFgaError::StoreNotFound {
                id: id.clone(),
                reason,
                have: describe_stores(&stores),
            })
        }
        StoreRef::Name(name) => {
            let stores = list_stores(t).await?;
            let matching: Vec<&StoreJson> = stores.iter().filter(|s| &s.name == name).collect();
            match matching.as_slice() {
                [one] => Ok((one.id.clone(), one.name.clone())),
                [] => Err(OpenFgaError::StoreNameNotFound {
                    name: name.clone(),
                    have: describe_stores(&stores),
                }),
                many => Err(OpenFgaError::StoreNameAmbiguous {
                    name: name.clone(),
                    count: many.len(),
                    ids: many
                        .iter()
                        .map(|s| s.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
            }
        }
    }
}

async fn pinned_model(
    t: &Transport,
    store_id: &str,
    store_label: &str,
    model_id: &str,
) -> Result<ModelJson, OpenFgaError> {
    let path = format!(
        "/stores/{store_id}/authorization-models/{}",
        encode_query(model_id)
    );
    let err = match t.get::<ModelOne>(&path).await {
        Ok(m) => return Ok(m.authorization_model),
        Err(e) => e,
    };
    let reason = match (err.status(), err.code()) {
        (_, "authorization_model_not_found") | (Some(StatusCode::NOT_FOUND), _) => {
            "authorization model not found".to_string()
        }
        (Some(StatusCode::BAD_REQUEST), "validation_error") => {
            "not a model id (26 characters, like 01HVMMBCMGZNT3SED4Z17ECXCA)".to_string()
        }
        _ => return Err(err.into_startup(t.base(), &format!("GET {path}"))),
    };
    let list = format!("/stores/{store_id}/authorization-models?page_size={MAX_LISTED}");
    let page: ModelsPage = t
        .get(&list)
        .await
        .map_err(|e| e.into_startup(t.base(), &format!("GET {list}")))?;
    let have = if page.authorization_models.is_empty() {
        format!("none: write one ({MODEL_FILE})")
    } else {
        page.authorization_models
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(OpenFgaError::ModelNotFound {
        id: model_id.to_string(),
        reason,
        store: store_label.to_string(),
        have,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_listing() {
        assert!(describe_stores(&[]).starts_with("the server has no stores"));
        let stores: Vec<StoreJson> = (0..12)
            .map(|i| StoreJson {
                id: format!("01S{i}"),
                name: format!("s{i}"),
            })
            .collect();
        let text = describe_stores(&stores);
        assert!(
            text.starts_with("the server has: s0 (01S0), s1 (01S1)"),
            "{text}"
        );
        assert!(text.ends_with("and 2 more"), "{text}");
    }
}
