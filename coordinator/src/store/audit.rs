//! The audit log: who did what to which object, and when. Appended inside the transaction of
//! the change it records, so a change and its entry commit or roll back together. A change that
//! takes or changes access later gets its measured time to enforcement (see `crate::posture`).

use sqlx::SqliteConnection;
use ztnet_proto::admin::AuditEvent;

use super::{NetworkId, Store, StoreError, to_i64, to_u64, unix_now_ms};

/// One entry to append.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    /// The network concerned, if any.
    pub network: Option<NetworkId>,
    /// API key name, `node:NAME` or `coordinator`.
    pub actor: &'a str,
    /// `network.create`, `node.enroll`, ...
    pub action: &'a str,
    /// The object acted on.
    pub target: &'a str,
    /// Readable details. Never a secret.
    pub detail: String,
}

/// Appends an entry on the connection of a running transaction.
pub async fn append(conn: &mut SqliteConnection, entry: Entry<'_>) -> Result<(), StoreError> {
    append_id(conn, entry).await.map(|_| ())
}

/// Appends an entry and returns its id (to fill in its time to enforcement later).
pub async fn append_id(conn: &mut SqliteConnection, entry: Entry<'_>) -> Result<i64, StoreError> {
    let done = sqlx::query(
        "INSERT INTO audit (network_id, at_ms, actor, action, target, detail)
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(entry.network.map(|n| n.0))
    .bind(to_i64(unix_now_ms()))
    .bind(entry.actor)
    .bind(entry.action)
    .bind(entry.target)
    .bind(&entry.detail)
    .execute(conn)
    .await?;
    Ok(done.last_insert_rowid())
}

/// Appends an entry in its own transaction (for events that change nothing else, such as a
/// refused policy).
pub async fn append_alone(store: &Store, entry: Entry<'_>) -> Result<(), StoreError> {
    let mut tx = store.write().await?;
    append(&mut tx, entry).await?;
    tx.commit().await?;
    Ok(())
}

type Raw = (i64, i64, String, String, String, String, Option<String>);

/// Every entry of a network, oldest first.
pub async fn list(store: &Store, network: NetworkId) -> Result<Vec<AuditEvent>, StoreError> {
    let rows: Vec<Raw> = sqlx::query_as(
        "SELECT id, at_ms, actor, action, target, detail, enforcement FROM audit
         WHERE network_id = ? ORDER BY id",
    )
    .bind(network.0)
    .fetch_all(store.pool())
    .await?;
    events(rows)
}

/// Every entry that belongs to no network (API keys, CA rotation), oldest first.
pub async fn list_global(store: &Store) -> Result<Vec<AuditEvent>, StoreError> {
    let rows: Vec<Raw> = sqlx::query_as(
        "SELECT id, at_ms, actor, action, target, detail, enforcement FROM audit
         WHERE network_id IS NULL ORDER BY id",
    )
    .fetch_all(store.pool())
    .await?;
    events(rows)
}

fn events(rows: Vec<Raw>) -> Result<Vec<AuditEvent>, StoreError> {
    rows.into_iter()
        .map(|(id, at_ms, actor, action, target, detail, enforcement)| {
            let enforcement = match enforcement {
                Some(json) => Some(super::from_json(&json, "audit enforcement")?),
                None => None,
            };
            Ok(AuditEvent {
                enforcement,
                id: to_u64(id, "audit id")?,
                at_ms: to_u64(at_ms, "audit time")?,
                actor,
                action,
                target,
                detail,
            })
        })
        .collect()
}
