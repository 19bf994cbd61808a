//! Nodes: list, show, delete, revoke, pin an endpoint. Deleting or revoking a node removes it
//! from every netmap at once and closes its control connection with `revoked`; a revoked node
//! stays listed with its reason, and its WireGuard key is refused for any new enrollment.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use ztnet_proto::admin::{NodeInfo, RevokeNode, SetEndpoint};

use super::Actor;
use super::error::{ApiErr, ApiJson};
use super::networks::find;
use crate::enroll::refuse;
use crate::hub::Hub;
use crate::store::{audit, networks, nodes};

/// `GET /v1/networks/{net}/nodes`.
pub async fn list(
    State(hub): State<Arc<Hub>>,
    _actor: Actor,
    Path(net): Path<String>,
) -> Result<Json<Vec<NodeInfo>>, ApiErr> {
    let network = find(&hub, &net).await?;
    let mut conn = hub.store.pool().acquire().await?;
    let mut all = nodes::active(&mut conn, network.id).await?;
    all.extend(nodes::revoked(&mut conn, network.id).await?);
    let posture = crate::posture::rows(&mut conn, network.id).await?;
    let ttl = crate::rotation::key_ttl(&mut conn, &network).await?;
    Ok(Json(
        all.iter()
            .map(|n| {
                let shown = with_posture(info(&hub, &network, n), posture.get(&n.id));
                with_key_life(shown, n, ttl)
            })
            .collect(),
    ))
}

/// `GET /v1/networks/{net}/nodes/{name}`.
pub async fn show(
    State(hub): State<Arc<Hub>>,
    _actor: Actor,
    Path((net, name)): Path<(String, String)>,
) -> Result<Json<NodeInfo>, ApiErr> {
    let network = find(&hub, &net).await?;
    let node = find_node(&hub, &network, &name).await?;
    let mut conn = hub.store.pool().acquire().await?;
    let posture = crate::posture::rows(&mut conn, network.id).await?;
    let ttl = crate::rotation::key_ttl(&mut conn, &network).await?;
    let shown = with_posture(info(&hub, &network, &node), posture.get(&node.id));
    Ok(Json(with_key_life(shown, &node, ttl)))
}

/// `DELETE /v1/networks/{net}/nodes/{name}`.
pub async fn delete(
    State(hub): State<Arc<Hub>>,
    actor: Actor,
    Path((net, name)): Path<(String, String)>,
) -> Result<Json<NodeInfo>, ApiErr> {
    let network = find(&hub, &net).await?;
    let node = find_node(&hub, &network, &name).await?;
    let mut tx = hub.store.write().await?;
    nodes::mark_deleted(&mut tx, node.id).await?;
    let why = format!("node {} was deleted", node.name);
    revoke_workloads(&mut tx, &network, &node, &actor.0, &why).await?;
    let audit_id = audit::append_id(
        &mut tx,
        audit::Entry {
            network: Some(network.id),
            actor: &actor.0,
            action: "node.delete",
            target: &node.name,
            detail: format!(
                "key {}, addresses {} {}",
                node.public_key.short(),
                node.ipv4,
                node.ipv6
            ),
        },
    )
    .await?;
    tx.commit().await?;
    let started = std::time::Instant::now();
    tracing::info!(node = %node.name, network = %network.name, "node deleted");

    hub.close_session(
        node.id,
        refuse(
            "revoked",
            format!(
                "node {} was deleted from network {}",
                node.name, network.name
            ),
        ),
    );
    let pending = hub.recompute(network.id).await?;
    let what =
        crate::posture::Change::Removed(&node.name, key_expiry(&hub, &network, &node).await?);
    let reach = crate::posture::track(&hub, network.id, audit_id, started, &pending, what).await?;
    let mut gone = info(&hub, &network, &node);
    gone.state = "revoked".into();
    gone.online = false;
    gone.reach = Some(reach);
    Ok(Json(gone))
}

/// Longest revocation reason kept, in bytes.
const MAX_REASON: usize = 512;

/// `POST /v1/networks/{net}/nodes/{name}/revoke`: like delete, and the node stays listed as
/// `revoked` with its reason; its certificate and WireGuard key are refused from then on.
pub async fn revoke(
    State(hub): State<Arc<Hub>>,
    actor: Actor,
    Path((net, name)): Path<(String, String)>,
    ApiJson(req): ApiJson<RevokeNode>,
) -> Result<Json<NodeInfo>, ApiErr> {
    let reason = req.reason.unwrap_or_default();
    let reason = reason.trim();
    if reason.len() > MAX_REASON {
        return Err(ApiErr::BadRequest(format!(
            "the reason is {} bytes long; at most {MAX_REASON} are kept",
            reason.len()
        )));
    }
    if reason.chars().any(char::is_control) {
        return Err(ApiErr::BadRequest(
            "the reason holds a control character; give plain text on one line".into(),
        ));
    }
    let network = find(&hub, &net).await?;
    let node = find_node(&hub, &network, &name).await?;
    let mut tx = hub.store.write().await?;
    nodes::mark_revoked(&mut tx, node.id, reason).await?;
    let why = if reason.is_empty() {
        format!("node {} was revoked", node.name)
    } else {
        format!("node {} was revoked: {reason}", node.name)
    };
    revoke_workloads(&mut tx, &network, &node, &actor.0, &why).await?;
    let audit_id = audit::append_id(
        &mut tx,
        audit::Entry {
            network: Some(network.id),
            actor: &actor.0,
            action: "node.revoke",
            target: &node.name,
            detail: format!(
                "reason {reason:?}, key {}, addresses {} {}",
                node.public_key.short(),
                node.ipv4,
                node.ipv6
            ),
        },
    )
    .await?;
    let revoked = nodes::find_in(&mut tx, node.id).await?;
    tx.commit().await?;
    let started = std::time::Instant::now();
    tracing::info!(node = %node.name, network = %network.name, %reason, "node revoked");

    let message = if reason.is_empty() {
        format!(
            "node {} was revoked from network {}",
            node.name, network.name
        )
    } else {
        format!(
            "node {} was revoked from network {}: {reason}",
            node.name, network.name
        )
    };
    hub.close_session(node.id, refuse("revoked", message));
    let pending = hub.recompute(network.id).await?;
    let what =
        crate::posture::Change::Removed(&node.name, key_expiry(&hub, &network, &node).await?);
    let reach = crate::posture::track(&hub, network.id, audit_id, started, &pending, what).await?;
    let mut gone = info(&hub, &network, revoked.as_ref().unwrap_or(&node));
    gone.state = "revoked".into();
    gone.online = false;
    gone.reach = Some(reach);
    Ok(Json(gone))
}

/// `POST /v1/networks/{net}/nodes/{name}/rotate-key`: asks the node to rotate its WireGuard
/// key now (it makes the key; the private half never leaves it). 409 when it is offline.
pub async fn rotate_key(
    State(hub): State<Arc<Hub>>,
    actor: Actor,
    Path((net, name)): Path<(String, String)>,
    ApiJson(req): ApiJson<ztnet_proto::admin::RotateKey>,
) -> Result<Json<NodeInfo>, ApiErr> {
    let order = match req.order.as_deref() {
        None => crate::rotation::Order::default(),
        Some(o) => crate::rotation::Order::parse(o).map_err(ApiErr::BadRequest)?,
    };
    let gap = std::time::Duration::from_secs(req.gap_secs.unwrap_or(0));
    if gap > crate::rotation::MAX_GAP {
        return Err(ApiErr::BadRequest(format!(
            "the gap is at most {} seconds",
            crate::rotation::MAX_GAP.as_secs()
        )));
    }
    let network = find(&hub, &net).await?;
    let node = find_node(&hub, &network, &name).await?;
    let plan = crate::rotation::Plan { order, gap };
    if !crate::rotation::request(&hub, &node, plan) {
        return Err(ApiErr::Conflict(format!(
            "node {} is offline: it rotates its key when it connects again and its key is \
             past half its life",
            node.name
        )));
    }
    audit::append_alone(
        &hub.store,
        audit::Entry {
            network: Some(network.id),
            actor: &actor.0,
            action: "node.key-rotate-request",
            target: &node.name,
            detail: format!("{}, gap {} s", order_name(order), gap.as_secs()),
        },
    )
    .await?;
    Ok(Json(info(&hub, &network, &node)))
}

/// `PUT /v1/networks/{net}/nodes/{name}/endpoint`: pins or clears the endpoint peers try
/// first. With `expected_revision`, a pin changed meanwhile by someone else gives 409.
pub async fn set_endpoint(
    State(hub): State<Arc<Hub>>,
    actor: Actor,
    Path((net, name)): Path<(String, String)>,
    ApiJson(req): ApiJson<SetEndpoint>,
) -> Result<Json<NodeInfo>, ApiErr> {
    let network = find(&hub, &net).await?;
    let node = find_node(&hub, &network, &name).await?;
    if let Some(e) = req.endpoint
        && (e.port() == 0 || e.ip().is_unspecified() || e.ip().is_multicast())
    {
        return Err(ApiErr::BadRequest(format!(
            "endpoint {e} is not usable: give a unicast address and a non-zero port"
        )));
    }
    let mut tx = hub.store.write().await?;
    let revision =
        match nodes::set_pin(&mut tx, node.id, req.endpoint, req.expected_revision).await? {
            Ok(r) => r,
            Err(current) => {
                return Err(ApiErr::Conflict(format!(
                    "the endpoint of node {} changed meanwhile: revision {current}, not {}; \
                 read it again",
                    node.name,
                    req.expected_revision.unwrap_or_default()
                )));
            }
        };
    let detail = match req.endpoint {
        Some(e) => format!("pinned {e} (revision {revision})"),
        None => format!("pin cleared (revision {revision})"),
    };
    audit::append(
        &mut tx,
        audit::Entry {
            network: Some(network.id),
            actor: &actor.0,
            action: "node.set-endpoint",
            target: &node.name,
            detail,
        },
    )
    .await?;
    tx.commit().await?;
    hub.recompute(network.id).await?;
    let node = find_node(&hub, &network, &name).await?;
    Ok(Json(info(&hub, &network, &node)))
}

async fn find_node(
    hub: &Hub,
    network: &networks::Network,
    name: &str,
) -> Result<nodes::Node, ApiErr> {
    if let Some(node) = nodes::by_name(&hub.store, network.id, name).await? {
        return Ok(node);
    }
    // Say so when the name belongs to a revoked node: "no node named" reads as a typo.
    let mut conn = hub.store.pool().acquire().await?;
    let revoked = nodes::revoked(&mut conn, network.id).await?;
    if let Some(gone) = revoked
        .iter()
        .rev()
        .find(|n| n.name.eq_ignore_ascii_case(name))
    {
        let when = gone
            .revoked_at
            .map(|t| {
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(t),
                )
                .to_string()
            })
            .unwrap_or_else(|| "an unknown time".into());
        let reason = match gone.revoke_reason.as_deref() {
            Some(r) if !r.is_empty() => format!(" ({r})"),
            _ => String::new(),
        };
        return Err(ApiErr::Conflict(format!(
            "node {} of network {} was revoked at {when}{reason}; a revoked node comes back \
             only by enrolling again with a new token, as a new node",
            gone.name, network.name
        )));
    }
    Err(ApiErr::NotFound(format!(
        "network {} has no node named {name:?}",
        network.name
    )))
}

fn info(hub: &Hub, network: &networks::Network, n: &nodes::Node) -> NodeInfo {
    let mut addresses = Vec::with_capacity(2);
    if let Ok(a) = Ipv4Net::new(n.ipv4, network.cidr.prefix_len()) {
        addresses.push(IpNet::V4(a));
    }
    if let Ok(a) = Ipv6Net::new(n.ipv6, network.cidr6.prefix_len()) {
        addresses.push(IpNet::V6(a));
    }
    NodeInfo {
        name: n.name.clone(),
        network: network.name.clone(),
        namespace: n.namespace.clone(),
        tags: n.tags.clone(),
        spiffe_id: n.spiffe_id.clone(),
        addresses,
        public_key: n.public_key,
        endpoints: n.endpoints.clone(),
        pinned_endpoint: n.pinned_endpoint,
        endpoint_revision: n.endpoint_revision,
        online: hub.is_online(n.id),
        last_seen: n.last_seen,
        netmap_version: n.netmap_version,
        applied_version: n.applied_version,
        applied_at: n.applied_at,
        version: n.version.clone(),
        state: n.state.clone(),
        created_at: n.created_at,
        revoked_at: n.revoked_at,
        revoke_reason: n.revoke_reason.clone(),
        quarantine: None,
        posture: None,
        key_created_at: n.key_created_at,
        key_expires_at: None,
        reach: None,
    }
}

/// Audits `workload.revoke` for each registration of a node that leaves the network, in the
/// caller's transaction. The rows stay (listed as `revoked`); nothing is issued for them again.
async fn revoke_workloads(
    conn: &mut sqlx::SqliteConnection,
    network: &networks::Network,
    node: &nodes::Node,
    actor: &str,
    why: &str,
) -> Result<(), ApiErr> {
    for w in crate::store::workloads::of_node(conn, node.id).await? {
        audit::append(
            conn,
            audit::Entry {
                network: Some(network.id),
                actor,
                action: "workload.revoke",
                target: w.spiffe_id.as_str(),
                detail: format!(
                    "id {}, {why}; SVIDs issued before stay valid until they expire (ttl {} s)",
                    w.id.0, w.ttl_secs
                ),
            },
        )
        .await?;
    }
    Ok(())
}

/// The order as the CLI and the API spell it.
fn order_name(order: crate::rotation::Order) -> &'static str {
    match order {
        crate::rotation::Order::PeersFirst => "peers-first",
        crate::rotation::Order::NodeFirst => "node-first",
    }
}

/// When the node's key expires under the network's key life (none outside zero trust).
async fn key_expiry(
    hub: &Hub,
    network: &networks::Network,
    node: &nodes::Node,
) -> Result<Option<u64>, ApiErr> {
    let mut conn = hub.store.pool().acquire().await?;
    let ttl = crate::rotation::key_ttl(&mut conn, network).await?;
    Ok(node.key_expires_at(ttl))
}

/// Adds when the node's key expires under the network's key life (none outside zero trust).
fn with_key_life(mut info: NodeInfo, n: &nodes::Node, ttl: u64) -> NodeInfo {
    info.key_expires_at = n.key_expires_at(ttl);
    info
}

/// Adds a node's posture and quarantine; an active quarantined node shows as `quarantined`.
fn with_posture(mut info: NodeInfo, row: Option<&crate::posture::Row>) -> NodeInfo {
    if let Some(row) = row {
        info.posture = row.report.clone();
        if info.state == "active" {
            info.quarantine = row.quarantine.clone();
            if info.quarantine.is_some() {
                info.state = "quarantined".into();
            }
        }
    }
    info
}
