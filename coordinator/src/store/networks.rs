//! The `networks` table.

use ipnet::{Ipv4Net, Ipv6Net};
use sqlx::SqliteConnection;

use super::{NetworkId, Store, StoreError, to_i64, to_u64, unix_now};

/// A stored network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// Row id.
    pub id: NetworkId,
    /// Name.
    pub name: String,
    /// IPv4 overlay prefix.
    pub cidr: Ipv4Net,
    /// IPv6 overlay prefix.
    pub cidr6: Ipv6Net,
    /// Zero-trust mode.
    pub zero_trust: bool,
    /// Unix seconds.
    pub created_at: u64,
}

type Raw = (i64, String, String, String, bool, i64);

const COLUMNS: &str = "id, name, cidr, cidr6, zero_trust, created_at";

fn decode(r: Raw) -> Result<Network, StoreError> {
    let (id, name, cidr, cidr6, zero_trust, created_at) = r;
    let bad = |what: &str, e: ipnet::AddrParseError| {
        StoreError::Corrupt(format!("network {name}: {what}: {e}"))
    };
    Ok(Network {
        id: NetworkId(id),
        cidr: cidr.parse().map_err(|e| bad("cidr", e))?,
        cidr6: cidr6.parse().map_err(|e| bad("cidr6", e))?,
        zero_trust,
        created_at: to_u64(created_at, "network created_at")?,
        name,
    })
}

/// Inserts a network; the caller's transaction commits it.
pub async fn insert(
    conn: &mut SqliteConnection,
    name: &str,
    cidr: Ipv4Net,
    cidr6: Ipv6Net,
    zero_trust: bool,
) -> Result<Network, StoreError> {
    let created_at = unix_now();
    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO networks (name, cidr, cidr6, zero_trust, created_at)
         VALUES (?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(name)
    .bind(cidr.to_string())
    .bind(cidr6.to_string())
    .bind(zero_trust)
    .bind(to_i64(created_at))
    .fetch_one(conn)
    .await?;
    Ok(Network {
        id: NetworkId(id),
        name: name.to_string(),
        cidr,
        cidr6,
        zero_trust,
        created_at,
    })
}

/// The network called `name`.
pub async fn by_name(store: &Store, name: &str) -> Result<Option<Network>, StoreError> {
    let row: Option<Raw> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM networks WHERE name = ?"))
            .bind(name)
            .fetch_optional(store.pool())
            .await?;
    row.map(decode).transpose()
}

/// The network with row id `id`.
pub async fn by_id(store: &Store, id: NetworkId) -> Result<Option<Network>, StoreError> {
    let row: Option<Raw> = sqlx::query_as(&format!("SELECT {COLUMNS} FROM networks WHERE id = ?"))
        .bind(id.0)
        .fetch_optional(store.pool())
        .await?;
    row.map(decode).transpose()
}

/// Every network, by name.
pub async fn list(store: &Store) -> Result<Vec<Network>, StoreError> {
    let rows: Vec<Raw> = sqlx::query_as(&format!("SELECT {COLUMNS} FROM networks ORDER BY name"))
        .fetch_all(store.pool())
        .await?;
    rows.into_iter().map(decode).collect()
}

/// Every network, read on the connection of a running transaction.
pub async fn list_in(conn: &mut SqliteConnection) -> Result<Vec<Network>, StoreError> {
    let rows: Vec<Raw> = sqlx::query_as(&format!("SELECT {COLUMNS} FROM networks ORDER BY id"))
        .fetch_all(conn)
        .await?;
    rows.into_iter().map(decode).collect()
}
