//! Admin API keys: create (the key is in the answer, once), list, revoke. Keys are stored as
//! their SHA-256 only; a revoked key is refused (401) from the next request on, its name kept
//! for the audit log. The last live key cannot be revoked: that would lock every operator out.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use ztnet_proto::admin::{ApiKeyCreated, ApiKeyInfo, CreateApiKey};

use super::Actor;
use super::error::{ApiErr, ApiJson};
use crate::hub::Hub;
use crate::store::{audit, keys};

/// Longest key name.
const MAX_NAME: usize = 64;

fn check_name(name: &str) -> Result<(), ApiErr> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiErr::BadRequest(format!(
            "API key name {name:?} is not valid: 1 to {MAX_NAME} letters, digits, '.', '_' or '-'"
        )))
    }
}

/// `POST /v1/api-keys`.
pub async fn create(
    State(hub): State<Arc<Hub>>,
    actor: Actor,
    ApiJson(req): ApiJson<CreateApiKey>,
) -> Result<Json<ApiKeyCreated>, ApiErr> {
    check_name(&req.name)?;
    let key = keys::NewKey::generate();
    let mut tx = hub.store.write().await?;
    let Some(info) = keys::create(&mut tx, &req.name, &actor.0, &key).await? else {
        return Err(ApiErr::Conflict(format!(
            "an API key named {} exists or existed; names are never reused",
            req.name
        )));
    };
    audit::append(
        &mut tx,
        audit::Entry {
            network: None,
            actor: &actor.0,
            action: "apikey.create",
            target: &req.name,
            detail: String::new(),
        },
    )
    .await?;
    tx.commit().await?;
    tracing::info!(key = %req.name, by = %actor.0, "API key created");
    Ok(Json(ApiKeyCreated {
        info,
        key: key.expose().to_string(),
    }))
}

/// `GET /v1/api-keys`.
pub async fn list(
    State(hub): State<Arc<Hub>>,
    _actor: Actor,
) -> Result<Json<Vec<ApiKeyInfo>>, ApiErr> {
    Ok(Json(keys::list(&hub.store).await?))
}

/// `DELETE /v1/api-keys/{name}`.
pub async fn revoke(
    State(hub): State<Arc<Hub>>,
    actor: Actor,
    Path(name): Path<String>,
) -> Result<Json<ApiKeyInfo>, ApiErr> {
    let mut tx = hub.store.write().await?;
    let Some(found) = keys::find(&mut tx, &name).await? else {
        return Err(ApiErr::NotFound(format!("no API key named {name:?}")));
    };
    if found.revoked_at.is_some() {
        return Err(ApiErr::Conflict(format!(
            "API key {name} is already revoked"
        )));
    }
    if keys::live_count(&mut tx).await? <= 1 {
        return Err(ApiErr::Conflict(format!(
            "API key {name} is the last one: revoking it would lock every operator out; create \
             another first"
        )));
    }
    keys::revoke(&mut tx, &name, &actor.0).await?;
    audit::append(
        &mut tx,
        audit::Entry {
            network: None,
            actor: &actor.0,
            action: "apikey.revoke",
            target: &name,
            detail: String::new(),
        },
    )
    .await?;
    let info = keys::find(&mut tx, &name)
        .await?
        .ok_or_else(|| ApiErr::NotFound(format!("no API key named {name:?}")))?;
    tx.commit().await?;
    tracing::info!(key = %name, by = %actor.0, "API key revoked");
    Ok(Json(info))
}
