//! The `workloads` table: SPIFFE IDs registered for the workloads of a node.

use sqlx::SqliteConnection;
use ztnet_proto::workload::{Selector, SpiffeId, WorkloadEntry};

use super::{NetworkId, NodeId, Store, StoreError, from_json, to_i64, to_json, to_u64};

/// A registration's row id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadId(pub i64);

/// One stored registration, with its node's name.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Row id.
    pub id: WorkloadId,
    /// Its network.
    pub network: NetworkId,
    /// Its node.
    pub node: NodeId,
    /// The node's name.
    pub node_name: String,
    /// SPIFFE ID issued.
    pub spiffe_id: SpiffeId,
    /// Conditions on the caller.
    pub selectors: Vec<Selector>,
    /// SVID lifetime.
    pub ttl_secs: u64,
    /// API key name.
    pub created_by: String,
    /// Unix seconds.
    pub created_at: u64,
    /// `active`, or `revoked` once its node left the network (revoked or deleted).
    pub state: String,
    /// For a revoked registration: its node's revocation reason, or that it was deleted.
    pub revoked_reason: Option<String>,
    /// For a revoked registration: Unix seconds its node left.
    pub revoked_at: Option<u64>,
}

/// A registration to store.
#[derive(Debug, Clone)]
pub struct NewWorkload<'a> {
    /// Its network.
    pub network: NetworkId,
    /// Its node.
    pub node: NodeId,
    /// SPIFFE ID.
    pub spiffe_id: &'a SpiffeId,
    /// Sorted selectors.
    pub selectors: &'a [Selector],
    /// SVID lifetime.
    pub ttl_secs: u64,
    /// API key name.
    pub created_by: &'a str,
    /// Unix seconds.
    pub created_at: u64,
}

type Raw = (
    i64,
    i64,
    i64,
    String,
    String,
    String,
    i64,
    String,
    i64,
    String,
    Option<i64>,
    Option<String>,
    Option<i64>,
);

const COLUMNS: &str = "w.id, w.network_id, w.node_id, n.name, w.spiffe_id, w.selectors, \
                       w.ttl_secs, w.created_by, w.created_at, n.state, n.revoked_at, \
                       n.revoke_reason, n.deleted_at";

/// Inserts a registration; `Ok(None)` when the node already has this SPIFFE ID.
pub async fn insert(
    conn: &mut SqliteConnection,
    w: &NewWorkload<'_>,
) -> Result<Option<WorkloadId>, StoreError> {
    let done = sqlx::query(
        "INSERT INTO workloads (network_id, node_id, spiffe_id, selectors, ttl_secs, created_by,
                                created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node_id, spiffe_id) DO NOTHING",
    )
    .bind(w.network.0)
    .bind(w.node.0)
    .bind(w.spiffe_id.as_str())
    .bind(to_json(&w.selectors))
    .bind(to_i64(w.ttl_secs))
    .bind(w.created_by)
    .bind(to_i64(w.created_at))
    .execute(conn)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(None);
    }
    Ok(Some(WorkloadId(done.last_insert_rowid())))
}

/// The registrations of a network, those of revoked or deleted nodes included (as
/// `revoked`), by SPIFFE ID then node name.
pub async fn list(store: &Store, network: NetworkId) -> Result<Vec<Workload>, StoreError> {
    let rows: Vec<Raw> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM workloads w JOIN nodes n ON n.id = w.node_id
         WHERE w.network_id = ? ORDER BY w.spiffe_id, n.name, w.id"
    ))
    .bind(network.0)
    .fetch_all(store.pool())
    .await?;
    rows.into_iter().map(decode).collect()
}

/// The registrations of one node, whatever its state, in the caller's transaction.
pub async fn of_node(
    conn: &mut SqliteConnection,
    node: NodeId,
) -> Result<Vec<Workload>, StoreError> {
    let rows: Vec<Raw> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM workloads w JOIN nodes n ON n.id = w.node_id
         WHERE w.node_id = ? ORDER BY w.spiffe_id, w.id"
    ))
    .bind(node.0)
    .fetch_all(conn)
    .await?;
    rows.into_iter().map(decode).collect()
}

/// One registration of a network, a revoked one included (see [`Workload::state`]).
pub async fn find(
    store: &Store,
    network: NetworkId,
    id: WorkloadId,
) -> Result<Option<Workload>, StoreError> {
    let row: Option<Raw> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM workloads w JOIN nodes n ON n.id = w.node_id
         WHERE w.network_id = ? AND w.id = ?"
    ))
    .bind(network.0)
    .bind(id.0)
    .fetch_optional(store.pool())
    .await?;
    row.map(decode).transpose()
}

/// Deletes a registration in the caller's transaction.
pub async fn delete(conn: &mut SqliteConnection, id: WorkloadId) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM workloads WHERE id = ?")
        .bind(id.0)
        .execute(conn)
        .await?;
    Ok(())
}

/// What a node is told: its registrations, by SPIFFE ID.
pub async fn for_node(store: &Store, node: NodeId) -> Result<Vec<WorkloadEntry>, StoreError> {
    let rows: Vec<Raw> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM workloads w JOIN nodes n ON n.id = w.node_id
         WHERE w.node_id = ? AND n.state = 'active' ORDER BY w.spiffe_id"
    ))
    .bind(node.0)
    .fetch_all(store.pool())
    .await?;
    rows.into_iter()
        .map(|r| {
            decode(r).map(|w| WorkloadEntry {
                spiffe_id: w.spiffe_id,
                selectors: w.selectors,
                ttl_secs: w.ttl_secs,
            })
        })
        .collect()
}

/// The registration of `spiffe_id` on an active `node`, if there is one.
pub async fn for_node_and_id(
    store: &Store,
    node: NodeId,
    spiffe_id: &str,
) -> Result<Option<Workload>, StoreError> {
    let row: Option<Raw> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM workloads w JOIN nodes n ON n.id = w.node_id
         WHERE w.node_id = ? AND w.spiffe_id = ? AND n.state = 'active'"
    ))
    .bind(node.0)
    .bind(spiffe_id)
    .fetch_optional(store.pool())
    .await?;
    row.map(decode).transpose()
}

fn decode(r: Raw) -> Result<Workload, StoreError> {
    let (id, network, node, node_name, spiffe_id, selectors, ttl, created_by, created_at) =
        (r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7, r.8);
    let (node_state, revoked_at, revoke_reason, deleted_at) = (r.9, r.10, r.11, r.12);
    let active = node_state == "active";
    let revoked_reason = (!active).then(|| match revoke_reason.filter(|r| !r.is_empty()) {
        Some(reason) => format!("node {node_name} was revoked: {reason}"),
        None if revoked_at.is_some() => format!("node {node_name} was revoked"),
        None => format!("node {node_name} was deleted"),
    });
    let left_at = revoked_at.or(deleted_at).filter(|_| !active);
    let spiffe_id = SpiffeId::parse(&spiffe_id)
        .map_err(|e| StoreError::Corrupt(format!("workload {id}: {e}")))?;
    Ok(Workload {
        id: WorkloadId(id),
        network: NetworkId(network),
        node: NodeId(node),
        node_name,
        spiffe_id,
        selectors: from_json(&selectors, "workload selectors")?,
        ttl_secs: to_u64(ttl, "workload ttl")?,
        created_by,
        created_at: to_u64(created_at, "workload creation time")?,
        state: if active { "active" } else { "revoked" }.into(),
        revoked_reason,
        revoked_at: left_at
            .map(|t| to_u64(t, "node revocation time"))
            .transpose()?,
    })
}
