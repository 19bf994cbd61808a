//! Admin API keys: `ztkey_` and 64 hex digits, stored as their SHA-256 only. Several keys, each
//! named; a revoked key keeps its row and name and is refused from the next request on.

use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;
use ztnet_proto::token::secret_hash;

use sqlx::SqliteConnection;
use ztnet_proto::admin::ApiKeyInfo;

use super::{Store, StoreError, to_i64, to_u64, unix_now};

const PREFIX: &str = "ztkey_";

/// A fresh API key. Its `Debug` hides it; it is zeroed on drop.
pub struct NewKey(Zeroizing<String>);

impl NewKey {
    /// Makes a key from the OS random source.
    pub fn generate() -> NewKey {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, bytes.as_mut());
        NewKey(Zeroizing::new(format!("{PREFIX}{}", hex::encode(*bytes))))
    }

    /// The key itself, for writing to its file only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NewKey(redacted)")
    }
}

/// Number of stored keys.
pub async fn count(store: &Store) -> Result<i64, StoreError> {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM api_keys")
        .fetch_one(store.pool())
        .await?;
    Ok(n)
}

/// Stores a key's hash under `name`.
pub async fn insert(store: &Store, name: &str, key: &NewKey) -> Result<(), StoreError> {
    let mut tx = store.write().await?;
    sqlx::query("INSERT INTO api_keys (name, key_hash, created_at) VALUES (?, ?, ?)")
        .bind(name)
        .bind(secret_hash(key.expose()))
        .bind(to_i64(unix_now()))
        .execute(&mut *tx)
        .await?;
    super::audit::append(
        &mut tx,
        super::audit::Entry {
            network: None,
            actor: "coordinator",
            action: "apikey.create",
            target: name,
            detail: "first admin key, written to admin.key".into(),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The name of the key that `presented` is, if any. Compares every stored hash in constant
/// time, so the answer's timing says nothing about how close a guess was.
pub async fn authenticate(store: &Store, presented: &str) -> Result<Option<String>, StoreError> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT name, key_hash FROM api_keys WHERE revoked_at IS NULL")
            .fetch_all(store.pool())
            .await?;
    let hash = secret_hash(presented);
    let mut found = None;
    for (name, stored) in rows {
        if bool::from(stored.as_bytes().ct_eq(hash.as_bytes())) {
            found = Some(name);
        }
    }
    Ok(found)
}

type Raw = (String, i64, String, Option<i64>, Option<String>);

const COLUMNS: &str = "name, created_at, created_by, revoked_at, revoked_by";

fn info(r: Raw) -> Result<ApiKeyInfo, StoreError> {
    let (name, created_at, created_by, revoked_at, revoked_by) = r;
    Ok(ApiKeyInfo {
        name,
        created_at: to_u64(created_at, "key creation time")?,
        created_by,
        revoked_at: revoked_at
            .map(|t| to_u64(t, "key revocation time"))
            .transpose()?,
        revoked_by,
    })
}

/// Every key, oldest first, revoked ones included.
pub async fn list(store: &Store) -> Result<Vec<ApiKeyInfo>, StoreError> {
    let rows: Vec<Raw> = sqlx::query_as(&format!("SELECT {COLUMNS} FROM api_keys ORDER BY id"))
        .fetch_all(store.pool())
        .await?;
    rows.into_iter().map(info).collect()
}

/// One key by name.
pub async fn find(
    conn: &mut SqliteConnection,
    name: &str,
) -> Result<Option<ApiKeyInfo>, StoreError> {
    let row: Option<Raw> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM api_keys WHERE name = ?"))
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?;
    row.map(info).transpose()
}

/// Stores a new key's hash under `name`, made by `by`, in the caller's transaction. `None` when
/// the name is taken (by a live or a revoked key).
pub async fn create(
    conn: &mut SqliteConnection,
    name: &str,
    by: &str,
    key: &NewKey,
) -> Result<Option<ApiKeyInfo>, StoreError> {
    if find(conn, name).await?.is_some() {
        return Ok(None);
    }
    sqlx::query(
        "INSERT INTO api_keys (name, key_hash, created_at, created_by) VALUES (?, ?, ?, ?)",
    )
    .bind(name)
    .bind(secret_hash(key.expose()))
    .bind(to_i64(unix_now()))
    .bind(by)
    .execute(&mut *conn)
    .await?;
    find(conn, name).await
}

/// Number of keys not revoked.
pub async fn live_count(conn: &mut SqliteConnection) -> Result<i64, StoreError> {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL")
        .fetch_one(&mut *conn)
        .await?;
    Ok(n)
}

/// Marks a live key revoked by `by`, in the caller's transaction. False when there is no live
/// key of that name.
pub async fn revoke(conn: &mut SqliteConnection, name: &str, by: &str) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE api_keys SET revoked_at = ?, revoked_by = ? WHERE name = ? AND revoked_at IS NULL",
    )
    .bind(to_i64(unix_now()))
    .bind(by)
    .bind(name)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}
