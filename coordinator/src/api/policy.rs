//! Policies, the audit log and health.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use ztnet_proto::admin::{
    ApplyPolicy, AuditEvent, Health, PolicyApplied, PolicyPreview, PolicyRecord,
};

use super::Actor;
use super::error::{ApiErr, ApiJson};
use super::networks::find;
use crate::hub::Hub;
use crate::policy::{self, Effective};
use crate::store::{audit, policies};

/// Largest policy document accepted.
const MAX_SOURCE: usize = 1 << 20;

/// `PUT /v1/networks/{net}/policy`: validates and tests the document, and only then stores it
/// as a new version and puts it in force. A refused document changes nothing.
pub async fn apply(
    State(hub): State<Arc<Hub>>,
    actor: Actor,
    Path(net): Path<String>,
    ApiJson(req): ApiJson<ApplyPolicy>,
) -> Result<Json<PolicyApplied>, ApiErr> {
    let network = find(&hub, &net).await?;
    if req.source.len() > MAX_SOURCE {
        return Err(ApiErr::BadRequest(format!(
            "policy is {} bytes; at most {MAX_SOURCE} are accepted",
            req.source.len()
        )));
    }
    let accepted = match policy::check(&req.source) {
        Ok(a) => a,
        Err(refused) => {
            audit::append_alone(
                &hub.store,
                audit::Entry {
                    network: Some(network.id),
                    actor: &actor.0,
                    action: "policy.refuse",
                    target: &network.name,
                    detail: refused.message.clone(),
                },
            )
            .await?;
            tracing::info!(network = %network.name, "policy refused");
            return Err(ApiErr::PolicyRefused {
                message: refused.message,
                diagnostics: refused.diagnostics,
            });
        }
    };

    // One apply at a time, so the version put in force is always the newest stored.
    let _apply = hub.apply_lock.lock().await;
    let mut tx = hub.store.write().await?;
    let version = policies::insert(&mut tx, network.id, &req.source, &actor.0).await?;
    let audit_id = audit::append_id(
        &mut tx,
        audit::Entry {
            network: Some(network.id),
            actor: &actor.0,
            action: "policy.apply",
            target: &network.name,
            detail: format!(
                "version {version}, {} test(s) passed, {} warning(s)",
                accepted.tests_passed,
                accepted.warnings.len()
            ),
        },
    )
    .await?;
    tx.commit().await?;
    let started = std::time::Instant::now();
    hub.set_effective(
        network.id,
        &network.name,
        Effective {
            version,
            policy: Some(Arc::new(accepted.policy)),
        },
    );
    tracing::info!(network = %network.name, version, "policy applied");
    let pending = hub.recompute(network.id).await?;
    let what = crate::posture::Change::Policy;
    let reach = crate::posture::track(&hub, network.id, audit_id, started, &pending, what).await?;
    Ok(Json(PolicyApplied {
        version,
        warnings: accepted.warnings,
        tests_passed: accepted.tests_passed,
        pending,
        reach: Some(reach),
    }))
}

/// `POST /v1/networks/{net}/policy/preview`: what the document would do if applied now: the
/// open flows it would cut, the nodes it would quarantine or release. A refused document gets
/// the same answer as from an apply; nothing is stored, audited or pushed either way.
pub async fn preview(
    State(hub): State<Arc<Hub>>,
    _actor: Actor,
    Path(net): Path<String>,
    ApiJson(req): ApiJson<ApplyPolicy>,
) -> Result<Json<PolicyPreview>, ApiErr> {
    let network = find(&hub, &net).await?;
    if req.source.len() > MAX_SOURCE {
        return Err(ApiErr::BadRequest(format!(
            "policy is {} bytes; at most {MAX_SOURCE} are accepted",
            req.source.len()
        )));
    }
    let accepted = policy::check(&req.source).map_err(|refused| ApiErr::PolicyRefused {
        message: refused.message,
        diagnostics: refused.diagnostics,
    })?;
    let candidate = crate::preview::Candidate {
        policy: &accepted.policy,
        warnings: accepted.warnings.clone(),
    };
    let answer = crate::preview::preview(&hub, &network, candidate).await?;
    tracing::debug!(
        network = %network.name,
        open = answer.open_flows,
        cut = answer.cut.len(),
        "policy previewed"
    );
    Ok(Json(answer))
}

/// `GET /v1/networks/{net}/policy`: the version in force, or the newest stored when none is.
pub async fn show(
    State(hub): State<Arc<Hub>>,
    _actor: Actor,
    Path(net): Path<String>,
) -> Result<Json<PolicyRecord>, ApiErr> {
    let network = find(&hub, &net).await?;
    let in_force = hub.effective(network.id).version;
    let history = policies::history(&hub.store, network.id).await?;
    let pick = history
        .iter()
        .find(|p| p.version == in_force)
        .or(history.first())
        .ok_or_else(|| {
            ApiErr::NotFound(format!(
                "network {net} has no policy yet: all traffic is denied"
            ))
        })?;
    Ok(Json(record(pick, in_force)))
}

/// `GET /v1/networks/{net}/policy/history`: every version, newest first.
pub async fn history(
    State(hub): State<Arc<Hub>>,
    _actor: Actor,
    Path(net): Path<String>,
) -> Result<Json<Vec<PolicyRecord>>, ApiErr> {
    let network = find(&hub, &net).await?;
    let in_force = hub.effective(network.id).version;
    let history = policies::history(&hub.store, network.id).await?;
    Ok(Json(history.iter().map(|p| record(p, in_force)).collect()))
}

/// `GET /v1/networks/{net}/audit`.
pub async fn audit(
    State(hub): State<Arc<Hub>>,
    _actor: Actor,
    Path(net): Path<String>,
) -> Result<Json<Vec<AuditEvent>>, ApiErr> {
    let network = find(&hub, &net).await?;
    Ok(Json(audit::list(&hub.store, network.id).await?))
}

/// `GET /v1/audit`: the entries of no network (API keys, CA rotation).
pub async fn audit_global(
    State(hub): State<Arc<Hub>>,
    _actor: Actor,
) -> Result<Json<Vec<AuditEvent>>, ApiErr> {
    Ok(Json(audit::list_global(&hub.store).await?))
}

/// `GET /v1/health`, without authentication.
pub async fn health(State(hub): State<Arc<Hub>>) -> Json<Health> {
    let problems = hub.problems();
    Json(Health {
        status: if problems.is_empty() {
            "ok"
        } else {
            "degraded"
        }
        .into(),
        problems,
        version: env!("CARGO_PKG_VERSION").into(),
        identity_conflicts: hub.identity_conflicts(),
    })
}

fn record(p: &policies::StoredPolicy, in_force: u64) -> PolicyRecord {
    PolicyRecord {
        version: p.version,
        source: p.source.clone(),
        applied_at: p.applied_at,
        applied_by: p.applied_by.clone(),
        active: p.version == in_force,
    }
}
