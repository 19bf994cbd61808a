//! The `nodes` and `node_certs` tables. A deleted node keeps its row (state `deleted`), so its
//! addresses are never issued again and its certificates keep mapping to a refused node. A
//! revoked node is a deleted one with `revoked_at` set: it is reported as state `revoked`, and
//! its WireGuard key is refused for every later enrollment.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use sqlx::SqliteConnection;
use ztnet_proto::WgKey;

use super::{NetworkId, NodeId, Store, StoreError, from_json, to_i64, to_json, to_u64, unix_now};

/// A stored node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Row id.
    pub id: NodeId,
    /// Its network.
    pub network: NetworkId,
    /// Name as enrolled.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Tags.
    pub tags: Vec<String>,
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// WireGuard public key.
    pub public_key: WgKey,
    /// IPv4 overlay address.
    pub ipv4: Ipv4Addr,
    /// IPv6 overlay address.
    pub ipv6: Ipv6Addr,
    /// Token it enrolled with.
    pub token_id: Option<String>,
    /// WireGuard listen port it reported.
    pub listen_port: u16,
    /// Endpoints, best first: observed address first, then reported ones.
    pub endpoints: Vec<SocketAddr>,
    /// Endpoint pinned by an operator, tried first by peers.
    pub pinned_endpoint: Option<SocketAddr>,
    /// Revision of the pin.
    pub endpoint_revision: u64,
    /// ztnet-node version it reported.
    pub version: String,
    /// `active`, `deleted` or `revoked`.
    pub state: String,
    /// Unix seconds of its revocation.
    pub revoked_at: Option<u64>,
    /// Why it was revoked.
    pub revoke_reason: Option<String>,
    /// Latest netmap version computed for it.
    pub netmap_version: u64,
    /// That netmap, JSON.
    pub netmap_json: Option<String>,
    /// Version it acknowledged.
    pub applied_version: u64,
    /// When it acknowledged it.
    pub applied_at: Option<u64>,
    /// Last message from it.
    pub last_seen: Option<u64>,
    /// Unix seconds.
    pub created_at: u64,
    /// When its current WireGuard key was made (its enrollment, or its last rotation).
    pub key_created_at: u64,
    /// The key it is rotating to, while its peers learn it.
    pub next_public_key: Option<WgKey>,
}

impl Node {
    /// Whether the node is active (not deleted).
    pub fn is_active(&self) -> bool {
        self.state == "active"
    }

    /// When its key expires under a key life of `ttl` seconds; `None` when keys do not
    /// expire (`ttl` 0).
    pub fn key_expires_at(&self, ttl: u64) -> Option<u64> {
        (ttl > 0).then(|| self.key_created_at.saturating_add(ttl))
    }
}

/// A node to insert.
#[derive(Debug, Clone)]
pub struct NewNode<'a> {
    /// Network.
    pub network: NetworkId,
    /// Name.
    pub name: &'a str,
    /// Namespace.
    pub namespace: &'a str,
    /// Tags.
    pub tags: &'a [String],
    /// SPIFFE ID.
    pub spiffe_id: &'a str,
    /// WireGuard public key.
    pub public_key: WgKey,
    /// Host offset in the network.
    pub offset: u32,
    /// IPv4 address.
    pub ipv4: Ipv4Addr,
    /// IPv6 address.
    pub ipv6: Ipv6Addr,
    /// Token used.
    pub token_id: &'a str,
    /// Listen port.
    pub listen_port: u16,
    /// Endpoints.
    pub endpoints: &'a [SocketAddr],
    /// Node software version.
    pub version: &'a str,
}

/// Why a node could not be inserted.
#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    /// An active node of the network has this name (ignoring case).
    #[error("node name {0:?} is taken in this network")]
    NameTaken(String),
    /// An active node uses this WireGuard key.
    #[error("this WireGuard public key is already used by node {0:?}")]
    KeyInUse(String),
    /// A revoked node had this WireGuard key; it is refused for good.
    #[error(
        "this WireGuard public key belonged to node {0:?}, which was revoked; \
         enroll with a new key"
    )]
    KeyRevoked(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

const COLUMNS: &str = "id, network_id, name, namespace, tags, spiffe_id, public_key, ipv4, ipv6,
    token_id, listen_port, endpoints, pinned_endpoint, endpoint_revision, version, state,
    netmap_version, netmap_json, applied_version, applied_at, last_seen, created_at, revoked_at,
    revoke_reason, key_created_at, next_public_key";

#[derive(sqlx::FromRow)]
struct Raw {
    id: i64,
    network_id: i64,
    name: String,
    namespace: String,
    tags: String,
    spiffe_id: String,
    public_key: String,
    ipv4: String,
    ipv6: String,
    token_id: Option<String>,
    listen_port: i64,
    endpoints: String,
    pinned_endpoint: Option<String>,
    endpoint_revision: i64,
    version: String,
    state: String,
    netmap_version: i64,
    netmap_json: Option<String>,
    applied_version: i64,
    applied_at: Option<i64>,
    last_seen: Option<i64>,
    created_at: i64,
    revoked_at: Option<i64>,
    revoke_reason: Option<String>,
    key_created_at: Option<i64>,
    next_public_key: Option<String>,
}

fn decode(r: Raw) -> Result<Node, StoreError> {
    let bad = |what: &str, e: String| StoreError::Corrupt(format!("node {}: {what}: {e}", r.name));
    Ok(Node {
        id: NodeId(r.id),
        network: NetworkId(r.network_id),
        tags: from_json(&r.tags, "node tags")?,
        public_key: WgKey::parse(&r.public_key).map_err(|e| bad("public key", e.to_string()))?,
        ipv4: r
            .ipv4
            .parse()
            .map_err(|e: std::net::AddrParseError| bad("ipv4", e.to_string()))?,
        ipv6: r
            .ipv6
            .parse()
            .map_err(|e: std::net::AddrParseError| bad("ipv6", e.to_string()))?,
        listen_port: u16::try_from(r.listen_port).map_err(|e| bad("listen port", e.to_string()))?,
        endpoints: from_json(&r.endpoints, "node endpoints")?,
        pinned_endpoint: r
            .pinned_endpoint
            .as_deref()
            .map(|p| {
                p.parse()
                    .map_err(|e: std::net::AddrParseError| bad("pin", e.to_string()))
            })
            .transpose()?,
        endpoint_revision: to_u64(r.endpoint_revision, "endpoint revision")?,
        netmap_version: to_u64(r.netmap_version, "netmap version")?,
        applied_version: to_u64(r.applied_version, "applied version")?,
        applied_at: r.applied_at.map(|v| to_u64(v, "applied_at")).transpose()?,
        last_seen: r.last_seen.map(|v| to_u64(v, "last_seen")).transpose()?,
        created_at: to_u64(r.created_at, "node created_at")?,
        key_created_at: to_u64(r.key_created_at.unwrap_or(r.created_at), "key_created_at")?,
        next_public_key: r
            .next_public_key
            .as_deref()
            .map(|k| WgKey::parse(k).map_err(|e| bad("next public key", e.to_string())))
            .transpose()?,
        revoked_at: r.revoked_at.map(|v| to_u64(v, "revoked_at")).transpose()?,
        state: if r.revoked_at.is_some() {
            "revoked".to_owned()
        } else {
            r.state
        },
        revoke_reason: r.revoke_reason,
        name: r.name,
        namespace: r.namespace,
        spiffe_id: r.spiffe_id,
        token_id: r.token_id,
        version: r.version,
        netmap_json: r.netmap_json,
    })
}

/// The next host offset of a network: one past the highest ever issued, so a deleted node's
/// addresses are never given to another.
pub async fn next_offset(
    conn: &mut SqliteConnection,
    network: NetworkId,
) -> Result<u64, StoreError> {
    let (max,): (i64,) =
        sqlx::query_as("SELECT COALESCE(MAX(addr_offset), 0) FROM nodes WHERE network_id = ?")
            .bind(network.0)
            .fetch_one(conn)
            .await?;
    Ok(to_u64(max, "addr_offset")? + 1)
}

/// Inserts a node in the caller's transaction, refusing a taken name or WireGuard key.
pub async fn insert(conn: &mut SqliteConnection, n: &NewNode<'_>) -> Result<Node, InsertError> {
    let key = n.name.to_ascii_lowercase();
    let clash: Option<(String,)> = sqlx::query_as(
        "SELECT name FROM nodes WHERE network_id = ? AND name_key = ? AND state = 'active'",
    )
    .bind(n.network.0)
    .bind(&key)
    .fetch_optional(&mut *conn)
    .await
    .map_err(StoreError::from)?;
    if let Some((existing,)) = clash {
        return Err(InsertError::NameTaken(existing));
    }
    let holder: Option<(String,)> =
        sqlx::query_as("SELECT name FROM nodes WHERE public_key = ? AND state = 'active'")
            .bind(n.public_key.to_base64())
            .fetch_optional(&mut *conn)
            .await
            .map_err(StoreError::from)?;
    if let Some((holder,)) = holder {
        return Err(InsertError::KeyInUse(holder));
    }
    let revoked: Option<(String,)> = sqlx::query_as(
        "SELECT name FROM nodes WHERE public_key = ? AND revoked_at IS NOT NULL LIMIT 1",
    )
    .bind(n.public_key.to_base64())
    .fetch_optional(&mut *conn)
    .await
    .map_err(StoreError::from)?;
    if let Some((name,)) = revoked {
        return Err(InsertError::KeyRevoked(name));
    }

    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO nodes (network_id, name, name_key, namespace, tags, spiffe_id, public_key,
                            addr_offset, ipv4, ipv6, token_id, listen_port, endpoints, version,
                            created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(n.network.0)
    .bind(n.name)
    .bind(&key)
    .bind(n.namespace)
    .bind(to_json(&n.tags))
    .bind(n.spiffe_id)
    .bind(n.public_key.to_base64())
    .bind(i64::from(n.offset))
    .bind(n.ipv4.to_string())
    .bind(n.ipv6.to_string())
    .bind(n.token_id)
    .bind(i64::from(n.listen_port))
    .bind(to_json(&n.endpoints))
    .bind(n.version)
    .bind(to_i64(unix_now()))
    .fetch_one(&mut *conn)
    .await
    .map_err(StoreError::from)?;
    let node = find_in(conn, NodeId(id)).await?;
    node.ok_or_else(|| InsertError::Store(StoreError::Corrupt("inserted node vanished".into())))
}

/// Records a certificate issued to a node, in the caller's transaction.
pub async fn add_cert(
    conn: &mut SqliteConnection,
    node: NodeId,
    serial: &str,
    not_after: u64,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO node_certs (serial, node_id, not_after) VALUES (?, ?, ?)")
        .bind(serial)
        .bind(node.0)
        .bind(to_i64(not_after))
        .execute(conn)
        .await?;
    Ok(())
}

/// The form in which a node's TLS key is kept on record: the lowercase hex SHA-256 of the
/// SubjectPublicKeyInfo of a DER certificate. `None` when the certificate does not parse.
pub fn tls_key_hash(cert_der: &[u8]) -> Option<String> {
    use sha2::Digest;
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der).ok()?;
    Some(hex::encode(sha2::Sha256::digest(
        cert.tbs_certificate.subject_pki.raw,
    )))
}

/// [`tls_key_hash`] of the first certificate of a PEM.
pub fn tls_key_hash_pem(cert_pem: &str) -> Option<String> {
    let mut reader = cert_pem.as_bytes();
    let der = rustls_pemfile::certs(&mut reader).next()?.ok()?;
    tls_key_hash(der.as_ref())
}

/// Records the TLS key (its [`tls_key_hash`]) of the certificate just issued to a node, in
/// the caller's transaction: at enrollment and at every renewal.
pub async fn set_tls_key(
    conn: &mut SqliteConnection,
    node: NodeId,
    hash: &str,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE nodes SET tls_spki_sha256 = ? WHERE id = ?")
        .bind(hash)
        .bind(node.0)
        .execute(conn)
        .await?;
    Ok(())
}

/// The TLS key on record for a node; `None` for a node enrolled before keys were recorded.
pub async fn tls_key(store: &Store, node: NodeId) -> Result<Option<String>, StoreError> {
    let row: Option<(Option<String>,)> =
        sqlx::query_as("SELECT tls_spki_sha256 FROM nodes WHERE id = ?")
            .bind(node.0)
            .fetch_optional(store.pool())
            .await?;
    Ok(row.and_then(|(h,)| h))
}

/// Records `hash` as a node's TLS key only when none is on record (a node enrolled before keys
/// were recorded). True when it was filled in.
pub async fn fill_tls_key(store: &Store, node: NodeId, hash: &str) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE nodes SET tls_spki_sha256 = ? WHERE id = ? AND tls_spki_sha256 IS NULL",
    )
    .bind(hash)
    .bind(node.0)
    .execute(store.pool())
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The node a certificate serial was issued to, whatever its state.
pub async fn by_cert_serial(store: &Store, serial: &str) -> Result<Option<Node>, StoreError> {
    let row: Option<Raw> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM nodes WHERE id = (SELECT node_id FROM node_certs WHERE serial = ?)"
    ))
    .bind(serial)
    .fetch_optional(store.pool())
    .await?;
    row.map(decode).transpose()
}

/// A node by id, in the caller's transaction.
pub async fn find_in(conn: &mut SqliteConnection, id: NodeId) -> Result<Option<Node>, StoreError> {
    let row: Option<Raw> = sqlx::query_as(&format!("SELECT {COLUMNS} FROM nodes WHERE id = ?"))
        .bind(id.0)
        .fetch_optional(conn)
        .await?;
    row.map(decode).transpose()
}

/// The active node of a network with this name (exact, as enrolled, or ignoring case).
pub async fn by_name(
    store: &Store,
    network: NetworkId,
    name: &str,
) -> Result<Option<Node>, StoreError> {
    let row: Option<Raw> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM nodes WHERE network_id = ? AND name_key = ? AND state = 'active'"
    ))
    .bind(network.0)
    .bind(name.to_ascii_lowercase())
    .fetch_optional(store.pool())
    .await?;
    row.map(decode).transpose()
}

/// Active nodes of a network, by name, in the caller's transaction or on the pool.
pub async fn active(
    conn: &mut SqliteConnection,
    network: NetworkId,
) -> Result<Vec<Node>, StoreError> {
    let rows: Vec<Raw> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM nodes WHERE network_id = ? AND state = 'active' ORDER BY name"
    ))
    .bind(network.0)
    .fetch_all(conn)
    .await?;
    rows.into_iter().map(decode).collect()
}

/// Revoked nodes of a network, by name, in the caller's transaction or on the pool.
pub async fn revoked(
    conn: &mut SqliteConnection,
    network: NetworkId,
) -> Result<Vec<Node>, StoreError> {
    let rows: Vec<Raw> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM nodes WHERE network_id = ? AND revoked_at IS NOT NULL
         ORDER BY name, id"
    ))
    .bind(network.0)
    .fetch_all(conn)
    .await?;
    rows.into_iter().map(decode).collect()
}

/// Number of active nodes of a network.
pub async fn count(store: &Store, network: NetworkId) -> Result<u64, StoreError> {
    let (n,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM nodes WHERE network_id = ? AND state = 'active'")
            .bind(network.0)
            .fetch_one(store.pool())
            .await?;
    to_u64(n, "node count")
}

/// Marks a node deleted, in the caller's transaction.
pub async fn mark_deleted(conn: &mut SqliteConnection, id: NodeId) -> Result<(), StoreError> {
    sqlx::query("UPDATE nodes SET state = 'deleted', deleted_at = ? WHERE id = ?")
        .bind(to_i64(unix_now()))
        .bind(id.0)
        .execute(conn)
        .await?;
    Ok(())
}

/// Marks a node revoked (and so no longer active), with the reason, in the caller's
/// transaction.
pub async fn mark_revoked(
    conn: &mut SqliteConnection,
    id: NodeId,
    reason: &str,
) -> Result<(), StoreError> {
    let now = to_i64(unix_now());
    sqlx::query(
        "UPDATE nodes SET state = 'deleted', deleted_at = ?, revoked_at = ?, revoke_reason = ?
         WHERE id = ?",
    )
    .bind(now)
    .bind(now)
    .bind(reason)
    .bind(id.0)
    .execute(conn)
    .await?;
    Ok(())
}

/// Stores what a node reported. True when its endpoint list changed.
pub async fn record_report(
    store: &Store,
    id: NodeId,
    listen_port: u16,
    endpoints: &[SocketAddr],
    version: &str,
) -> Result<bool, StoreError> {
    let mut tx = store.write().await?;
    let old: Option<(String,)> = sqlx::query_as("SELECT endpoints FROM nodes WHERE id = ?")
        .bind(id.0)
        .fetch_optional(&mut *tx)
        .await?;
    let new = to_json(&endpoints);
    let changed = old.is_some_and(|(old,)| old != new);
    sqlx::query(
        "UPDATE nodes SET listen_port = ?, endpoints = ?, version = ?, last_seen = ? WHERE id = ?",
    )
    .bind(i64::from(listen_port))
    .bind(&new)
    .bind(version)
    .bind(to_i64(unix_now()))
    .bind(id.0)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(changed)
}

/// Records that a node applied `version` (never lowering what was recorded before).
pub async fn record_ack(store: &Store, id: NodeId, version: u64) -> Result<(), StoreError> {
    let now = to_i64(unix_now());
    sqlx::query(
        "UPDATE nodes SET applied_version = ?, applied_at = ?, last_seen = ?
         WHERE id = ? AND applied_version <= ? AND netmap_version >= ?",
    )
    .bind(to_i64(version))
    .bind(now)
    .bind(now)
    .bind(id.0)
    .bind(to_i64(version))
    .bind(to_i64(version))
    .execute(store.pool())
    .await?;
    Ok(())
}

/// Records that a message came from a node.
pub async fn touch(store: &Store, id: NodeId) -> Result<(), StoreError> {
    sqlx::query("UPDATE nodes SET last_seen = ? WHERE id = ?")
        .bind(to_i64(unix_now()))
        .bind(id.0)
        .execute(store.pool())
        .await?;
    Ok(())
}

/// Stores a node's new netmap, in the caller's transaction.
pub async fn set_netmap(
    conn: &mut SqliteConnection,
    id: NodeId,
    version: u64,
    json: &str,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE nodes SET netmap_version = ?, netmap_json = ? WHERE id = ?")
        .bind(to_i64(version))
        .bind(json)
        .bind(id.0)
        .execute(conn)
        .await?;
    Ok(())
}

/// Sets or clears a node's pinned endpoint, in the caller's transaction. With `expected`, only
/// when the pin is still at that revision. Returns the new revision, or `Err(current)` when
/// the expected revision is stale.
pub async fn set_pin(
    conn: &mut SqliteConnection,
    id: NodeId,
    endpoint: Option<SocketAddr>,
    expected: Option<u64>,
) -> Result<Result<u64, u64>, StoreError> {
    let row: Option<(i64,)> = sqlx::query_as(
        "UPDATE nodes SET pinned_endpoint = ?, endpoint_revision = endpoint_revision + 1
         WHERE id = ? AND (?3 IS NULL OR endpoint_revision = ?3)
         RETURNING endpoint_revision",
    )
    .bind(endpoint.map(|e| e.to_string()))
    .bind(id.0)
    .bind(expected.map(to_i64))
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((rev,)) = row {
        return Ok(Ok(to_u64(rev, "endpoint revision")?));
    }
    let (current,): (i64,) = sqlx::query_as("SELECT endpoint_revision FROM nodes WHERE id = ?")
        .bind(id.0)
        .fetch_one(conn)
        .await?;
    Ok(Err(to_u64(current, "endpoint revision")?))
}

/// Records the key a node proposed, in the caller's transaction. Refuses a key that another
/// active node uses (as its key or its next one) or that a revoked node had.
pub async fn set_next_key(
    conn: &mut SqliteConnection,
    id: NodeId,
    key: WgKey,
) -> Result<(), InsertError> {
    let b64 = key.to_base64();
    let holder: Option<(String,)> = sqlx::query_as(
        "SELECT name FROM nodes WHERE (public_key = ?1 OR next_public_key = ?1) AND id != ?2
         AND state = 'active' LIMIT 1",
    )
    .bind(&b64)
    .bind(id.0)
    .fetch_optional(&mut *conn)
    .await
    .map_err(StoreError::from)?;
    if let Some((holder,)) = holder {
        return Err(InsertError::KeyInUse(holder));
    }
    let revoked: Option<(String,)> = sqlx::query_as(
        "SELECT name FROM nodes WHERE public_key = ? AND revoked_at IS NOT NULL LIMIT 1",
    )
    .bind(&b64)
    .fetch_optional(&mut *conn)
    .await
    .map_err(StoreError::from)?;
    if let Some((name,)) = revoked {
        return Err(InsertError::KeyRevoked(name));
    }
    sqlx::query("UPDATE nodes SET next_public_key = ? WHERE id = ?")
        .bind(&b64)
        .bind(id.0)
        .execute(&mut *conn)
        .await
        .map_err(StoreError::from)?;
    Ok(())
}

/// Makes a node's next key its key, made at `now`, in the caller's transaction. Returns false
/// when the node has no next key equal to `key` (a newer proposal replaced it).
pub async fn switch_key(
    conn: &mut SqliteConnection,
    id: NodeId,
    key: WgKey,
    now: u64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE nodes SET public_key = next_public_key, next_public_key = NULL,
         key_created_at = ? WHERE id = ? AND next_public_key = ?",
    )
    .bind(to_i64(now))
    .bind(id.0)
    .bind(key.to_base64())
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{networks, tokens};

    async fn enrolled(store: &Store) -> Node {
        let mut tx = store.write().await.expect("tx");
        let network = networks::insert(
            &mut tx,
            "prod-vpc",
            "100.64.0.0/16".parse().expect("v4"),
            "fd00::/64".parse().expect("v6"),
            false,
        )
        .await
        .expect("network");
        tokens::insert(
            &mut tx,
            &tokens::NewToken {
                id: "t",
                secret_hash: "h",
                network: network.id,
                namespace: "prod",
                tags: &[],
                uses: 1,
                expires_at: u64::MAX / 4,
                created_by: "test",
                created_at: 0,
            },
        )
        .await
        .expect("token");
        let node = insert(
            &mut tx,
            &NewNode {
                network: network.id,
                name: "web1",
                namespace: "prod",
                tags: &[],
                spiffe_id: "spiffe://td/ns/prod/node/web1",
                public_key: WgKey([1; 32]),
                offset: 1,
                ipv4: Ipv4Addr::new(100, 64, 0, 1),
                ipv6: "fd00::1".parse().expect("v6"),
                token_id: "t",
                listen_port: 51820,
                endpoints: &[],
                version: "0",
            },
        )
        .await
        .expect("insert");
        tx.commit().await.expect("commit");
        node
    }

    fn cert_for(key: &rcgen::KeyPair) -> rcgen::Certificate {
        rcgen::CertificateParams::new(vec!["n".into()])
            .expect("params")
            .self_signed(key)
            .expect("cert")
    }

    #[test]
    fn the_key_hash_is_the_certificates_spki_and_differs_per_key() {
        let k1 = rcgen::KeyPair::generate().expect("key");
        let k2 = rcgen::KeyPair::generate().expect("key");
        let (a, b, c) = (cert_for(&k1), cert_for(&k1), cert_for(&k2));
        let ha = tls_key_hash(a.der()).expect("parses");
        assert_eq!(ha.len(), 64, "{ha}");
        assert_eq!(
            Some(ha.clone()),
            tls_key_hash(b.der()),
            "same key, same hash"
        );
        assert_ne!(Some(ha.clone()), tls_key_hash(c.der()), "another key");
        assert_eq!(tls_key_hash_pem(&a.pem()), Some(ha));
        assert_eq!(tls_key_hash(b"not a certificate"), None);
        assert_eq!(tls_key_hash_pem("garbage"), None);
    }

    #[tokio::test]
    async fn a_recorded_tls_key_is_replaced_by_a_renewal_and_never_by_a_fill() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).await.expect("open").store;
        let node = enrolled(&store).await;
        assert_eq!(tls_key(&store, node.id).await.expect("read"), None);

        // A node enrolled before keys were recorded gets the first key it shows.
        assert!(fill_tls_key(&store, node.id, "aa").await.expect("fill"));
        assert!(!fill_tls_key(&store, node.id, "bb").await.expect("fill"));
        assert_eq!(
            tls_key(&store, node.id).await.expect("read").as_deref(),
            Some("aa")
        );

        // A renewal records its new key; a rolled-back one changes nothing.
        let mut tx = store.write().await.expect("tx");
        set_tls_key(&mut tx, node.id, "cc").await.expect("set");
        drop(tx);
        assert_eq!(
            tls_key(&store, node.id).await.expect("read").as_deref(),
            Some("aa")
        );
        let mut tx = store.write().await.expect("tx");
        set_tls_key(&mut tx, node.id, "cc").await.expect("set");
        tx.commit().await.expect("commit");
        assert_eq!(
            tls_key(&store, node.id).await.expect("read").as_deref(),
            Some("cc")
        );
        assert_eq!(tls_key(&store, NodeId(999)).await.expect("read"), None);
    }
}
