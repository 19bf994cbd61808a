//! The `policies` table: every applied version of each network's policy, kept as history.
//! The highest version is the one last applied; which version is in force is decided at run
//! time (see `crate::policy`), because a stored version may no longer validate.

use sqlx::SqliteConnection;

use super::{NetworkId, Store, StoreError, to_i64, to_u64, unix_now};

/// A stored policy version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPolicy {
    /// Version, from 1.
    pub version: u64,
    /// The TOML document.
    pub source: String,
    /// Unix seconds.
    pub applied_at: u64,
    /// API key name.
    pub applied_by: String,
}

/// Stores a new version in the caller's transaction and returns its number.
pub async fn insert(
    conn: &mut SqliteConnection,
    network: NetworkId,
    source: &str,
    applied_by: &str,
) -> Result<u64, StoreError> {
    let (version,): (i64,) = sqlx::query_as(
        "INSERT INTO policies (network_id, version, source, applied_at, applied_by)
         VALUES (?1, (SELECT COALESCE(MAX(version), 0) + 1 FROM policies WHERE network_id = ?1),
                 ?2, ?3, ?4)
         RETURNING version",
    )
    .bind(network.0)
    .bind(source)
    .bind(to_i64(unix_now()))
    .bind(applied_by)
    .fetch_one(conn)
    .await?;
    to_u64(version, "policy version")
}

/// Every version of a network's policy, newest first.
pub async fn history(store: &Store, network: NetworkId) -> Result<Vec<StoredPolicy>, StoreError> {
    let rows: Vec<(i64, String, i64, String)> = sqlx::query_as(
        "SELECT version, source, applied_at, applied_by FROM policies
         WHERE network_id = ? ORDER BY version DESC",
    )
    .bind(network.0)
    .fetch_all(store.pool())
    .await?;
    rows.into_iter()
        .map(|(version, source, applied_at, applied_by)| {
            Ok(StoredPolicy {
                version: to_u64(version, "policy version")?,
                source,
                applied_at: to_u64(applied_at, "policy applied_at")?,
                applied_by,
            })
        })
        .collect()
}
