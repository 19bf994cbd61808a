//! CA rotation: the status, the operator's steps (`rotate`, `activate`) and the driver that
//! takes the automatic ones. The stages themselves are in [`crate::ca`]; this module decides
//! when each may run:
//!
//! - staged -> signing: once every active node has acknowledged a netmap that carries the new
//!   bundle (so each saved it to its `ca.pem`) and every SVID issued before the staging has
//!   expired (so each `--watch` fetched a `bundle.pem` with both CAs); `activate --force`
//!   skips the wait.
//! - retiring -> dropped: when the last certificate the old CA signed has expired.
//!
//! Each step is audited (`ca.stage`, `ca.activate`, `ca.retire`, network-less entries) and
//! pushes the new bundle to every node.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use tracing::{error, info, warn};
use ztnet_proto::ca::{ActivateRequest, CaAuthority, CaEvent, CaStatus, PendingNode};

use super::Actor;
use super::error::{ApiErr, ApiJson};
use crate::ca::{CaError, CaView, Phase, node_cert_lifetime};
use crate::hub::Hub;
use crate::store::{StoreError, audit, networks, nodes, unix_now};

/// How often the driver looks for a step to take.
const DRIVE_EVERY: Duration = Duration::from_secs(1);

/// `GET /v1/ca`.
pub async fn show(State(hub): State<Arc<Hub>>, _actor: Actor) -> Result<Json<CaStatus>, ApiErr> {
    Ok(Json(status(&hub).await?))
}

/// `POST /v1/ca/rotate`: stage 1, a new CA in the bundle, pushed to every node.
pub async fn rotate(State(hub): State<Arc<Hub>>, actor: Actor) -> Result<Json<CaStatus>, ApiErr> {
    let now = unix_now();
    let wait = max_svid_ttl(&hub).await?;
    let mut tx = hub.store.write().await?;
    let view = hub.ca.stage_next(now, now + wait).map_err(ca_err)?;
    let staged = view
        .authorities
        .iter()
        .find(|a| a.role == "staged")
        .map(|a| format!("generation {} ({})", a.generation, a.fingerprint))
        .unwrap_or_default();
    audit::append(
        &mut tx,
        audit::Entry {
            network: None,
            actor: &actor.0,
            action: "ca.stage",
            target: "ca",
            detail: format!(
                "staged CA {staged}; it signs once every node has it and SVIDs issued \
                 before now have expired (in {wait}s)"
            ),
        },
    )
    .await?;
    commit_audit(tx).await;
    info!(%staged, "new CA staged");
    push_bundle(&hub).await;
    Ok(Json(status(&hub).await?))
}

/// `POST /v1/ca/activate`: stage 2 now, refused while nodes or SVIDs lag unless `force`.
pub async fn activate(
    State(hub): State<Arc<Hub>>,
    actor: Actor,
    ApiJson(req): ApiJson<ActivateRequest>,
) -> Result<Json<CaStatus>, ApiErr> {
    let current = status(&hub).await?;
    if current.phase != "staged" {
        return Err(ApiErr::Conflict(format!(
            "there is no staged CA to activate ({}); start with `ztnet ca rotate`",
            current.summary
        )));
    }
    if !req.force && !ready(&current, unix_now()) {
        return Err(ApiErr::Conflict(format!(
            "not ready: {}; pass --force to activate anyway (nodes that lag keep working \
             through the cross-signed chain; workloads with an old bundle.pem reject SVIDs of \
             the new CA until they fetch again)",
            current.summary
        )));
    }
    do_activate(&hub, &actor.0, req.force).await?;
    Ok(Json(status(&hub).await?))
}

/// Takes the automatic steps until the process ends: activation when ready, retirement when
/// due. Errors are logged and retried at the next tick.
pub async fn drive(hub: Arc<Hub>) {
    let mut tick = tokio::time::interval(DRIVE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = step(&hub).await {
            warn!(error = %e, "CA rotation step failed; retrying");
        }
    }
}

async fn step(hub: &Hub) -> Result<(), ApiErr> {
    let now = unix_now();
    match hub.ca.view().phase {
        Phase::Steady => {}
        Phase::Staged => {
            let current = status(hub).await?;
            if ready(&current, now) {
                do_activate(hub, "coordinator", false).await?;
            }
        }
        Phase::Retiring => {
            let due = hub
                .ca
                .view()
                .authorities
                .iter()
                .any(|a| a.retire_at.is_some_and(|t| t <= now));
            if !due {
                return Ok(());
            }
            let mut tx = hub.store.write().await?;
            let dropped = hub.ca.retire_due(now).map_err(ca_err)?;
            if dropped.is_empty() {
                return Ok(());
            }
            let list: Vec<String> = dropped.iter().map(u32::to_string).collect();
            audit::append(
                &mut tx,
                audit::Entry {
                    network: None,
                    actor: "coordinator",
                    action: "ca.retire",
                    target: "ca",
                    detail: format!(
                        "CA generation {} left the trust bundle: every certificate it signed \
                         has expired; its key is deleted",
                        list.join(", ")
                    ),
                },
            )
            .await?;
            commit_audit(tx).await;
            info!(generations = %list.join(","), "old CA retired");
            push_bundle(hub).await;
        }
    }
    Ok(())
}

async fn do_activate(hub: &Hub, actor: &str, forced: bool) -> Result<(), ApiErr> {
    let wait = max_svid_ttl(hub).await?;
    let retire_after = Duration::from_secs(wait).max(node_cert_lifetime());
    let mut tx = hub.store.write().await?;
    let view = hub.ca.activate(unix_now(), retire_after).map_err(ca_err)?;
    let signer = view
        .authorities
        .iter()
        .find(|a| a.role == "signing")
        .map(|a| format!("generation {} ({})", a.generation, a.fingerprint))
        .unwrap_or_default();
    let retire_at = view
        .authorities
        .iter()
        .filter_map(|a| a.retire_at)
        .max()
        .unwrap_or(0);
    audit::append(
        &mut tx,
        audit::Entry {
            network: None,
            actor,
            action: "ca.activate",
            target: "ca",
            detail: format!(
                "CA {signer} signs from now on{}; the old CA stays in the bundle until {}",
                if forced { " (forced)" } else { "" },
                rfc3339(retire_at)
            ),
        },
    )
    .await?;
    commit_audit(tx).await;
    info!(%signer, forced, "new CA signs");
    Ok(())
}

/// Commits an audit entry whose change (on files) is already made: a failure is logged, not
/// returned, since the step cannot be taken back.
async fn commit_audit(tx: sqlx::Transaction<'static, sqlx::Sqlite>) {
    if let Err(e) = tx.commit().await {
        error!(error = %e, "CA step made but its audit entry was not stored");
    }
}

/// Pushes the bundle of the moment to every node (each netmap carries it).
async fn push_bundle(hub: &Hub) {
    if let Err(e) = hub.recompute_all().await {
        warn!(error = %e, "pushing the new trust bundle failed; the periodic refresh retries");
    }
}

/// Whether a staged CA may sign now.
fn ready(status: &CaStatus, now: u64) -> bool {
    status.pending.is_empty() && status.activate_after.is_none_or(|t| now >= t)
}

/// The longest SVID lifetime any registration has: how long an SVID issued now may live.
async fn max_svid_ttl(hub: &Hub) -> Result<u64, StoreError> {
    let (max,): (Option<i64>,) = sqlx::query_as("SELECT MAX(ttl_secs) FROM workloads")
        .fetch_one(hub.store.pool())
        .await?;
    Ok(max.map_or(0, |m| u64::try_from(m).unwrap_or(0)))
}

/// The full status: the CAs, the nodes a staged CA waits for, the history.
pub async fn status(hub: &Hub) -> Result<CaStatus, StoreError> {
    let view = hub.ca.view();
    let pending = match view.phase {
        Phase::Staged => pending_nodes(hub, &view).await?,
        _ => Vec::new(),
    };
    let summary = summary(&view, &pending, unix_now());
    let phase = match view.phase {
        Phase::Steady => "steady",
        Phase::Staged => "staged",
        Phase::Retiring => "retiring",
    };
    Ok(CaStatus {
        phase: phase.into(),
        summary,
        authorities: view
            .authorities
            .iter()
            .map(|a| CaAuthority {
                generation: a.generation,
                fingerprint: a.fingerprint.clone(),
                subject: a.subject.clone(),
                role: a.role.clone(),
                not_before: a.not_before,
                not_after: a.not_after,
                added_at: a.added_at,
                activated_at: a.activated_at,
                retire_at: a.retire_at,
            })
            .collect(),
        pending,
        activate_after: view.activate_after,
        bundle_pem: view.bundle_pem,
        history: history(hub).await?,
    })
}

/// Active nodes whose acknowledged netmap does not carry the staged CA.
async fn pending_nodes(hub: &Hub, view: &CaView) -> Result<Vec<PendingNode>, StoreError> {
    let bundle = view.bundle_pem.as_str();
    let mut out = Vec::new();
    let mut conn = hub.store.pool().acquire().await?;
    for network in networks::list(&hub.store).await? {
        for node in nodes::active(&mut conn, network.id).await? {
            if !has_bundle(&node, bundle) {
                out.push(PendingNode {
                    network: network.name.clone(),
                    node: node.name.clone(),
                    online: hub.is_online(node.id),
                });
            }
        }
    }
    Ok(out)
}

/// Whether a node acknowledged the netmap version it was last sent, and that netmap carries
/// `bundle`.
fn has_bundle(node: &nodes::Node, bundle: &str) -> bool {
    if node.applied_version != node.netmap_version {
        return false;
    }
    let Some(json) = &node.netmap_json else {
        return false;
    };
    match serde_json::from_str::<ztnet_proto::control::Netmap>(json) {
        Ok(map) => map.bundle_pem.as_deref() == Some(bundle),
        Err(_) => false,
    }
}

fn summary(view: &CaView, pending: &[PendingNode], now: u64) -> String {
    match view.phase {
        Phase::Steady => {
            "one CA signs and is the whole trust bundle; `ztnet ca rotate` starts a rotation".into()
        }
        Phase::Staged => {
            let mut waits = Vec::new();
            if !pending.is_empty() {
                let names: Vec<String> = pending
                    .iter()
                    .map(|p| {
                        let state = if p.online { "online" } else { "offline" };
                        format!("{}/{} ({state})", p.network, p.node)
                    })
                    .collect();
                waits.push(format!(
                    "{} node(s) have not acknowledged the new bundle: {}",
                    pending.len(),
                    names.join(", ")
                ));
            }
            if let Some(t) = view.activate_after.filter(|t| *t > now) {
                waits.push(format!(
                    "SVIDs issued before the rotation expire by {} ({}s from now)",
                    rfc3339(t),
                    t - now
                ));
            }
            if waits.is_empty() {
                "the new CA is in every node's bundle; it signs within a second".into()
            } else {
                format!(
                    "the new CA is in the bundle but does not sign yet: {}",
                    waits.join("; ")
                )
            }
        }
        Phase::Retiring => {
            let at = view
                .authorities
                .iter()
                .filter_map(|a| a.retire_at)
                .max()
                .unwrap_or(now);
            format!(
                "the new CA signs; the old one stays in the bundle until {} (when the last \
                 certificate it signed has expired); refresh copies of ca.pem before then",
                rfc3339(at)
            )
        }
    }
}

async fn history(hub: &Hub) -> Result<Vec<CaEvent>, StoreError> {
    let rows: Vec<(i64, String, String, String)> = sqlx::query_as(
        "SELECT at_ms, actor, action, detail FROM audit
         WHERE network_id IS NULL AND action LIKE 'ca.%' ORDER BY id",
    )
    .fetch_all(hub.store.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(|(at_ms, actor, action, detail)| CaEvent {
            at_ms: u64::try_from(at_ms).unwrap_or(0),
            actor,
            action,
            detail,
        })
        .collect())
}

fn ca_err(e: CaError) -> ApiErr {
    match e {
        CaError::Conflict(m) => ApiErr::Conflict(m),
        other => {
            error!(error = %other, "CA step failed");
            ApiErr::Internal(StoreError::Corrupt(format!("CA step failed: {other}")))
        }
    }
}

fn rfc3339(unix: u64) -> String {
    let t = i64::try_from(unix).unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}
