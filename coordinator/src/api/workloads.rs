//! Workload registrations: register, list, show, delete. Each change is audited; a node sees
//! a change at its next workload request, so a deleted registration is never issued again.
//! The registrations of a revoked or deleted node stay listed as `revoked`, with the node's
//! revocation as the reason (audited `workload.revoke` when the node was revoked); SVIDs
//! issued to them before stay valid until they expire (X.509 has no live revocation here).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use ztnet_proto::workload::{
    DEFAULT_SVID_TTL_SECS, MAX_SVID_TTL_SECS, MIN_SVID_TTL_SECS, RegisterWorkload, Selector,
    SpiffeId, WorkloadInfo,
};

use super::Actor;
use super::error::{ApiErr, ApiJson};
use super::networks::find;
use crate::hub::Hub;
use crate::store::workloads::{self, NewWorkload, Workload, WorkloadId};
use crate::store::{audit, networks, nodes, unix_now};

/// `POST /v1/networks/{net}/workloads`.
pub async fn register(
    State(hub): State<Arc<Hub>>,
    actor: Actor,
    Path(net): Path<String>,
    ApiJson(req): ApiJson<RegisterWorkload>,
) -> Result<Json<WorkloadInfo>, ApiErr> {
    let network = find(&hub, &net).await?;
    let spiffe_id = SpiffeId::parse_workload(&req.spiffe_id, &hub.trust_domain)
        .map_err(|e| ApiErr::BadRequest(e.to_string()))?;
    let selectors =
        Selector::parse_all(&req.selectors).map_err(|e| ApiErr::BadRequest(e.to_string()))?;
    let ttl_secs = req.ttl_secs.unwrap_or(DEFAULT_SVID_TTL_SECS);
    if !(MIN_SVID_TTL_SECS..=MAX_SVID_TTL_SECS).contains(&ttl_secs) {
        return Err(ApiErr::BadRequest(format!(
            "ttl of {ttl_secs}s is out of range: give {MIN_SVID_TTL_SECS}s to \
             {MAX_SVID_TTL_SECS}s"
        )));
    }
    let node = nodes::by_name(&hub.store, network.id, &req.node)
        .await?
        .ok_or_else(|| {
            ApiErr::NotFound(format!(
                "network {} has no node named {:?}",
                network.name, req.node
            ))
        })?;

    let mut tx = hub.store.write().await?;
    let new = NewWorkload {
        network: network.id,
        node: node.id,
        spiffe_id: &spiffe_id,
        selectors: &selectors,
        ttl_secs,
        created_by: &actor.0,
        created_at: unix_now(),
    };
    let id = workloads::insert(&mut tx, &new).await?.ok_or_else(|| {
        ApiErr::Conflict(format!(
            "{spiffe_id} is already registered on node {}; delete it first to change it",
            node.name
        ))
    })?;
    let shown: Vec<String> = selectors.iter().map(Selector::to_string).collect();
    audit::append(
        &mut tx,
        audit::Entry {
            network: Some(network.id),
            actor: &actor.0,
            action: "workload.register",
            target: spiffe_id.as_str(),
            detail: format!(
                "id {}, node {}, selectors {}, ttl {ttl_secs}s",
                id.0,
                node.name,
                shown.join(" ")
            ),
        },
    )
    .await?;
    tx.commit().await?;
    tracing::info!(network = %network.name, node = %node.name, %spiffe_id, "workload registered");
    let w = find_workload(&hub, &network, id).await?;
    Ok(Json(info(&network, w)))
}

/// `GET /v1/networks/{net}/workloads`.
pub async fn list(
    State(hub): State<Arc<Hub>>,
    _actor: Actor,
    Path(net): Path<String>,
) -> Result<Json<Vec<WorkloadInfo>>, ApiErr> {
    let network = find(&hub, &net).await?;
    let all = workloads::list(&hub.store, network.id).await?;
    Ok(Json(all.into_iter().map(|w| info(&network, w)).collect()))
}

/// `GET /v1/networks/{net}/workloads/{id}`.
pub async fn show(
    State(hub): State<Arc<Hub>>,
    _actor: Actor,
    Path((net, id)): Path<(String, String)>,
) -> Result<Json<WorkloadInfo>, ApiErr> {
    let network = find(&hub, &net).await?;
    let w = find_workload(&hub, &network, parse_id(&id)?).await?;
    Ok(Json(info(&network, w)))
}

/// `DELETE /v1/networks/{net}/workloads/{id}`.
pub async fn delete(
    State(hub): State<Arc<Hub>>,
    actor: Actor,
    Path((net, id)): Path<(String, String)>,
) -> Result<Json<WorkloadInfo>, ApiErr> {
    let network = find(&hub, &net).await?;
    let w = find_workload(&hub, &network, parse_id(&id)?).await?;
    if w.state != "active" {
        return Err(ApiErr::Conflict(format!(
            "workload registration {} ({}) was revoked with its node ({}); it stays listed as \
             a record and is never issued again",
            w.id.0,
            w.spiffe_id,
            w.revoked_reason.as_deref().unwrap_or("node gone")
        )));
    }
    let mut tx = hub.store.write().await?;
    workloads::delete(&mut tx, w.id).await?;
    audit::append(
        &mut tx,
        audit::Entry {
            network: Some(network.id),
            actor: &actor.0,
            action: "workload.delete",
            target: w.spiffe_id.as_str(),
            detail: format!("id {}, node {}", w.id.0, w.node_name),
        },
    )
    .await?;
    tx.commit().await?;
    tracing::info!(network = %network.name, node = %w.node_name, spiffe_id = %w.spiffe_id,
        "workload registration deleted");
    Ok(Json(info(&network, w)))
}

fn parse_id(id: &str) -> Result<WorkloadId, ApiErr> {
    id.parse::<i64>()
        .ok()
        .filter(|v| *v > 0)
        .map(WorkloadId)
        .ok_or_else(|| {
            ApiErr::BadRequest(format!(
                "workload id {id:?} is not a number; `ztnet workload list` shows the ids"
            ))
        })
}

async fn find_workload(
    hub: &Hub,
    network: &networks::Network,
    id: WorkloadId,
) -> Result<Workload, ApiErr> {
    workloads::find(&hub.store, network.id, id)
        .await?
        .ok_or_else(|| {
            ApiErr::NotFound(format!(
                "network {} has no workload registration {}",
                network.name, id.0
            ))
        })
}

fn info(network: &networks::Network, w: Workload) -> WorkloadInfo {
    WorkloadInfo {
        id: u64::try_from(w.id.0).unwrap_or(0),
        network: network.name.clone(),
        spiffe_id: w.spiffe_id,
        node: w.node_name,
        selectors: w.selectors,
        ttl_secs: w.ttl_secs,
        created_by: w.created_by,
        created_at: w.created_at,
        state: w.state,
        revoked_reason: w.revoked_reason,
        revoked_at: w.revoked_at,
    }
}
