//! Admin API keys: `ztkey_` and 64 hex digits, stored as their SHA-256 only.

use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;
use ztnet_proto::token::secret_hash;

use super::{Store, StoreError, to_i64, unix_now};

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
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT name, key_hash FROM api_keys")
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
