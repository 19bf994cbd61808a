//! The `tokens` table: join tokens, stored by the hash of their secret only.

use sqlx::SqliteConnection;
use ztnet_proto::admin::TokenInfo;

use super::{NetworkId, Store, StoreError, from_json, to_i64, to_json, to_u64};

/// A token to store.
#[derive(Debug, Clone)]
pub struct NewToken<'a> {
    /// First 12 hex digits of the secret's hash.
    pub id: &'a str,
    /// The secret's hash.
    pub secret_hash: &'a str,
    /// The network it enrolls into.
    pub network: NetworkId,
    /// Namespace given to nodes.
    pub namespace: &'a str,
    /// Tags given to nodes.
    pub tags: &'a [String],
    /// Enrollments allowed.
    pub uses: u32,
    /// Unix seconds.
    pub expires_at: u64,
    /// API key name.
    pub created_by: &'a str,
    /// Unix seconds.
    pub created_at: u64,
}

/// What a consumed token grants.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Token id.
    pub id: String,
    /// Network.
    pub network: NetworkId,
    /// Namespace.
    pub namespace: String,
    /// Tags.
    pub tags: Vec<String>,
}

/// Why a token could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No such token.
    Unknown,
    /// Revoked by an operator.
    Revoked,
    /// Past its expiry.
    Expired,
    /// No uses left.
    UsedUp,
}

/// Inserts a token in the caller's transaction.
pub async fn insert(conn: &mut SqliteConnection, t: &NewToken<'_>) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO tokens (id, secret_hash, network_id, namespace, tags, uses, uses_left,
                             expires_at, revoked, created_by, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
    )
    .bind(t.id)
    .bind(t.secret_hash)
    .bind(t.network.0)
    .bind(t.namespace)
    .bind(to_json(&t.tags))
    .bind(i64::from(t.uses))
    .bind(i64::from(t.uses))
    .bind(to_i64(t.expires_at))
    .bind(t.created_by)
    .bind(to_i64(t.created_at))
    .execute(conn)
    .await?;
    Ok(())
}

/// Takes one use of the token with this secret hash, atomically: the decrement happens only
/// when a use is left, the token has not expired and is not revoked. Runs in the caller's
/// transaction, so a failed enrollment gives the use back.
pub async fn consume(
    conn: &mut SqliteConnection,
    secret_hash: &str,
    now: u64,
) -> Result<Result<Grant, Refusal>, StoreError> {
    let row: Option<(String, i64, String, String)> = sqlx::query_as(
        "UPDATE tokens SET uses_left = uses_left - 1
         WHERE secret_hash = ? AND uses_left > 0 AND expires_at > ? AND revoked = 0
         RETURNING id, network_id, namespace, tags",
    )
    .bind(secret_hash)
    .bind(to_i64(now))
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((id, network, namespace, tags)) = row {
        return Ok(Ok(Grant {
            id,
            network: NetworkId(network),
            namespace,
            tags: from_json(&tags, "token tags")?,
        }));
    }

    let state: Option<(i64, i64, bool)> =
        sqlx::query_as("SELECT uses_left, expires_at, revoked FROM tokens WHERE secret_hash = ?")
            .bind(secret_hash)
            .fetch_optional(conn)
            .await?;
    Ok(Err(match state {
        None => Refusal::Unknown,
        Some((_, _, true)) => Refusal::Revoked,
        Some((_, expires_at, _)) if expires_at <= to_i64(now) => Refusal::Expired,
        Some(_) => Refusal::UsedUp,
    }))
}

type Raw = (String, String, String, String, i64, i64, i64, bool, String);

const SELECT: &str = "SELECT t.id, n.name, t.namespace, t.tags, t.uses, t.uses_left,
        t.expires_at, t.revoked, t.created_by
    FROM tokens t JOIN networks n ON n.id = t.network_id";

async fn decode(conn: &mut SqliteConnection, r: Raw) -> Result<TokenInfo, StoreError> {
    let (id, network, namespace, tags, uses, uses_left, expires_at, revoked, created_by) = r;
    let used_by: Vec<(String,)> =
        sqlx::query_as("SELECT name FROM nodes WHERE token_id = ? ORDER BY id")
            .bind(&id)
            .fetch_all(conn)
            .await?;
    let count = |v: i64, what| {
        u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("token {id}: {what} is {v}")))
    };
    Ok(TokenInfo {
        uses: count(uses, "uses")?,
        uses_left: count(uses_left, "uses_left")?,
        expires_at: to_u64(expires_at, "token expiry")?,
        tags: from_json(&tags, "token tags")?,
        used_by: used_by.into_iter().map(|(n,)| n).collect(),
        id,
        network,
        namespace,
        revoked,
        created_by,
    })
}

/// Every token of a network, newest first.
pub async fn list(store: &Store, network: NetworkId) -> Result<Vec<TokenInfo>, StoreError> {
    let mut conn = store.pool().acquire().await?;
    let rows: Vec<Raw> = sqlx::query_as(&format!(
        "{SELECT} WHERE t.network_id = ? ORDER BY t.created_at DESC, t.id"
    ))
    .bind(network.0)
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        out.push(decode(&mut conn, r).await?);
    }
    Ok(out)
}

/// One token of a network, in the caller's transaction.
pub async fn find(
    conn: &mut SqliteConnection,
    network: NetworkId,
    id: &str,
) -> Result<Option<TokenInfo>, StoreError> {
    let row: Option<Raw> = sqlx::query_as(&format!("{SELECT} WHERE t.network_id = ? AND t.id = ?"))
        .bind(network.0)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    match row {
        Some(r) => Ok(Some(decode(conn, r).await?)),
        None => Ok(None),
    }
}

/// Marks a token revoked, in the caller's transaction. False when there is no such token.
pub async fn revoke(
    conn: &mut SqliteConnection,
    network: NetworkId,
    id: &str,
) -> Result<bool, StoreError> {
    let done = sqlx::query("UPDATE tokens SET revoked = 1 WHERE network_id = ? AND id = ?")
        .bind(network.0)
        .bind(id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}
