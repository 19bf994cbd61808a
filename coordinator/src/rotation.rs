//! Node key expiry and rotation (issue 6).
//!
//! In a zero-trust network a node's WireGuard key lives `key_ttl_secs` (24 h unless changed).
//! Netmaps carry each key's expiry, so a peer drops the node at expiry by its own clock even
//! when the coordinator is unreachable; [`watch_expiry`] audits `node.key-expire` and takes
//! the node out of every netmap.
//!
//! Rotation, peers first (the default):
//! 1. the node makes a key and sends its public half ([`NodeMsg::RotateKey`]);
//! 2. the coordinator stores it as the node's next key and pushes it to every peer as
//!    `next_public_key`, a key they accept as well as the current one;
//! 3. it waits (at most [`ACK_TIMEOUT`]) until every connected peer acknowledged that netmap;
//!    an offline peer gets the new key in the full netmap of its next connection;
//! 4. it makes the next key the node's key (audit `node.key-rotate`) and tells the node to
//!    switch ([`ServerMsg::SwitchKey`]); the node initiates handshakes under the new key at once.
//!
//! `node-first` (a drill, `ztnet node rotate-key --order node-first`) tells the node to switch
//! first and the peers after the gap: the peers see a key mismatch meanwhile (FC-19, FC-20).
//!
//! [`NodeMsg::RotateKey`]: ztnet_proto::control::NodeMsg::RotateKey
//! [`ServerMsg::SwitchKey`]: ztnet_proto::control::ServerMsg::SwitchKey

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};
use ztnet_proto::WgKey;
use ztnet_proto::control::{ControlError, ServerMsg};

use crate::hub::Hub;
use crate::store::networks::Network;
use crate::store::nodes::{self, InsertError, Node};
use crate::store::{NetworkId, NodeId, StoreError, audit, networks, unix_now};

/// Key life of a new network, seconds.
pub const DEFAULT_KEY_TTL_SECS: u64 = 24 * 3600;
/// Shortest key life an operator may set (tests use it).
pub const MIN_KEY_TTL_SECS: u64 = 10;
/// Longest key life an operator may set: 30 days.
pub const MAX_KEY_TTL_SECS: u64 = 30 * 24 * 3600;
/// How long a rotation waits for the connected peers' acknowledgements.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest gap between the two steps of a rotation.
pub const MAX_GAP: Duration = Duration::from_secs(60);
/// How often [`watch_expiry`] looks for expired keys.
const EXPIRY_TICK: Duration = Duration::from_millis(500);

/// Which side of a rotation goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// Peers learn the next key, then the node switches: no loss beyond one handshake.
    #[default]
    PeersFirst,
    /// The node switches, then peers learn the key: a drill for key mismatch handling.
    NodeFirst,
}

impl Order {
    /// Parses `peers-first` or `node-first`.
    pub fn parse(s: &str) -> Result<Order, String> {
        match s {
            "peers-first" => Ok(Order::PeersFirst),
            "node-first" => Ok(Order::NodeFirst),
            other => Err(format!(
                "order {other:?} is not known: give peers-first or node-first"
            )),
        }
    }
}

/// How an operator asked a rotation to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Plan {
    /// Which side first.
    pub order: Order,
    /// Wait between the two steps.
    pub gap: Duration,
}

/// Rotations asked for by an operator and not yet started by the node, by node.
#[derive(Debug, Default)]
pub struct Requests(Mutex<HashMap<NodeId, Plan>>);

impl Requests {
    fn put(&self, node: NodeId, plan: Plan) {
        crate::hub::lock(&self.0).insert(node, plan);
    }

    fn take(&self, node: NodeId) -> Plan {
        crate::hub::lock(&self.0).remove(&node).unwrap_or_default()
    }
}

/// The key life that applies to a network's nodes: 0 (never expire) unless it is zero-trust.
pub async fn key_ttl(
    conn: &mut sqlx::SqliteConnection,
    network: &Network,
) -> Result<u64, StoreError> {
    if !network.zero_trust {
        return Ok(0);
    }
    stored_ttl(conn, network.id).await
}

/// The key life stored for a network, whether it applies or not.
pub async fn stored_ttl(
    conn: &mut sqlx::SqliteConnection,
    network: NetworkId,
) -> Result<u64, StoreError> {
    let (ttl,): (i64,) = sqlx::query_as("SELECT key_ttl_secs FROM networks WHERE id = ?")
        .bind(network.0)
        .fetch_one(conn)
        .await?;
    crate::store::to_u64(ttl, "key_ttl_secs")
}

/// Stores a network's key life, in the caller's transaction.
pub async fn set_key_ttl(
    conn: &mut sqlx::SqliteConnection,
    network: NetworkId,
    ttl: u64,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE networks SET key_ttl_secs = ? WHERE id = ?")
        .bind(crate::store::to_i64(ttl))
        .bind(network.0)
        .execute(conn)
        .await?;
    Ok(())
}

/// Checks an operator's key life.
pub fn check_ttl(ttl: u64) -> Result<(), String> {
    if !(MIN_KEY_TTL_SECS..=MAX_KEY_TTL_SECS).contains(&ttl) {
        return Err(format!(
            "key ttl must be between {MIN_KEY_TTL_SECS} seconds and 30 days, not {ttl} seconds"
        ));
    }
    Ok(())
}

/// Asks an online node to rotate its key now, the way `plan` says. False when the node has
/// no control session.
pub fn request(hub: &Hub, node: &Node, plan: Plan) -> bool {
    hub.rotations.put(node.id, plan);
    if hub.send(node.id, ServerMsg::RotateKey) {
        info!(node = %node.name, ?plan, "key rotation requested");
        true
    } else {
        hub.rotations.take(node.id);
        false
    }
}

/// Runs one rotation for the key a node proposed; the answer goes out on its session.
pub async fn propose(hub: Arc<Hub>, node: Node, key: WgKey) {
    if let Err(e) = run(&hub, &node, key).await {
        error!(node = %node.name, error = %e, "key rotation failed");
        refuse(
            &hub,
            &node,
            "internal",
            "the coordinator could not store the key",
        );
    }
}

async fn run(hub: &Hub, node: &Node, key: WgKey) -> Result<(), StoreError> {
    let started = Instant::now();
    // Held for the whole rotation: a second proposal of the same node waits its turn.
    let _one = hub.rotation_lock(node.id).lock_owned().await;
    let Some(current) = find(hub, node.id).await? else {
        return Ok(());
    };
    if current.public_key == key {
        // Proposed again after the switch (the node restarted before it heard of it).
        hub.send(node.id, ServerMsg::SwitchKey { public_key: key });
        return Ok(());
    }
    let plan = hub.rotations.take(node.id);
    let mut tx = hub.store.write().await?;
    match nodes::set_next_key(&mut tx, node.id, key).await {
        Ok(()) => tx.commit().await?,
        Err(InsertError::Store(e)) => return Err(e),
        Err(e) => {
            drop(tx);
            warn!(node = %node.name, "key rotation refused: {e}");
            refuse(hub, node, "bad-request", &e.to_string());
            return Ok(());
        }
    }
    info!(node = %node.name, next = %key.short(), ?plan, "key rotation started");

    let (acked, waited) = match plan.order {
        Order::PeersFirst => {
            let (acked, waited) = push_and_wait(hub, node).await?;
            tokio::time::sleep(plan.gap.min(MAX_GAP)).await;
            hub.send(node.id, ServerMsg::SwitchKey { public_key: key });
            (acked, waited)
        }
        Order::NodeFirst => {
            hub.send(node.id, ServerMsg::SwitchKey { public_key: key });
            tokio::time::sleep(plan.gap.min(MAX_GAP)).await;
            push_and_wait(hub, node).await?
        }
    };

    let mut tx = hub.store.write().await?;
    if !nodes::switch_key(&mut tx, node.id, key, unix_now()).await? {
        debug!(node = %node.name, "a newer proposal replaced this one");
        return Ok(());
    }
    audit::append(
        &mut tx,
        audit::Entry {
            network: Some(node.network),
            actor: &format!("node:{}", node.name),
            action: "node.key-rotate",
            target: &node.name,
            detail: format!(
                "key {} -> {}, {:?}, gap {} ms, {acked} of {waited} connected peers acked, \
                 {} ms",
                current.public_key.short(),
                key.short(),
                plan.order,
                plan.gap.as_millis(),
                started.elapsed().as_millis()
            ),
        },
    )
    .await?;
    tx.commit().await?;
    hub.recompute(node.network).await?;
    info!(
        node = %node.name,
        key = %key.short(),
        took_ms = started.elapsed().as_millis() as u64,
        "key rotated"
    );
    Ok(())
}

/// Pushes the network's netmaps and waits for the connected peers that got a new one.
/// Returns how many acknowledged and how many were waited for.
async fn push_and_wait(hub: &Hub, node: &Node) -> Result<(usize, usize), StoreError> {
    let pending: Vec<_> = hub
        .recompute(node.network)
        .await?
        .into_iter()
        .filter(|p| p.node != node.name)
        .collect();
    let mut waiting = Vec::new();
    for p in pending {
        if let Some(peer) = nodes::by_name(&hub.store, node.network, &p.node).await?
            && hub.is_online(peer.id)
        {
            waiting.push((peer.id, p.node, p.netmap_version));
        }
    }
    let total = waiting.len();
    let deadline = Instant::now() + ACK_TIMEOUT;
    while !waiting.is_empty() && Instant::now() < deadline {
        let mut left = Vec::new();
        for (id, name, version) in waiting {
            match find(hub, id).await? {
                Some(n) if n.applied_version < version && hub.is_online(id) => {
                    left.push((id, name, version))
                }
                _ => {}
            }
        }
        waiting = left;
        if !waiting.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for (_, name, version) in &waiting {
        warn!(
            node = %node.name,
            peer = %name,
            version,
            "peer did not acknowledge the next key within {} s; it heals on a key mismatch",
            ACK_TIMEOUT.as_secs()
        );
    }
    Ok((total - waiting.len(), total))
}

async fn find(hub: &Hub, id: NodeId) -> Result<Option<Node>, StoreError> {
    let mut conn = hub.store.pool().acquire().await?;
    Ok(nodes::find_in(&mut conn, id).await?.filter(Node::is_active))
}

fn refuse(hub: &Hub, node: &Node, code: &str, message: &str) {
    hub.send(
        node.id,
        ServerMsg::RotateRefused {
            error: ControlError {
                code: code.into(),
                message: message.into(),
            },
        },
    );
}

/// Takes nodes whose key expired out of every netmap, once, with an audit entry
/// `node.key-expire`. Runs until the runtime stops.
pub async fn watch_expiry(hub: Arc<Hub>) {
    let mut seen: HashSet<(NodeId, u64)> = HashSet::new();
    loop {
        if let Err(e) = expire_once(&hub, &mut seen).await {
            warn!(error = %e, "key expiry check failed");
        }
        tokio::time::sleep(EXPIRY_TICK).await;
    }
}

async fn expire_once(hub: &Hub, seen: &mut HashSet<(NodeId, u64)>) -> Result<(), StoreError> {
    let now = unix_now();
    for network in networks::list(&hub.store).await? {
        let mut conn = hub.store.pool().acquire().await?;
        let ttl = key_ttl(&mut conn, &network).await?;
        if ttl == 0 {
            continue;
        }
        let members = nodes::active(&mut conn, network.id).await?;
        drop(conn);
        let mut expired = Vec::new();
        for n in &members {
            let Some(at) = n.key_expires_at(ttl) else {
                continue;
            };
            if at <= now && seen.insert((n.id, n.key_created_at)) {
                expired.push((n, at));
            }
        }
        if expired.is_empty() {
            continue;
        }
        let mut tx = hub.store.write().await?;
        let mut audited = Vec::with_capacity(expired.len());
        for (n, at) in &expired {
            warn!(
                node = %n.name,
                network = %network.name,
                expired_at = at,
                "node key expired without a rotation: peers drop it"
            );
            let id = audit::append_id(
                &mut tx,
                audit::Entry {
                    network: Some(network.id),
                    actor: "coordinator",
                    action: "node.key-expire",
                    target: &n.name,
                    detail: format!(
                        "key {} made at {}, life {ttl} s, expired at {at}",
                        n.public_key.short(),
                        n.key_created_at
                    ),
                },
            )
            .await?;
            audited.push((id, n.name.clone()));
        }
        tx.commit().await?;
        let started = Instant::now();
        let pending = hub.recompute(network.id).await?;
        for (id, name) in &audited {
            crate::posture::track(hub, network.id, *id, started, &pending, name).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::store::nodes::NewNode;

    async fn node(tx: &mut sqlx::SqliteConnection, net: NetworkId, name: &str, b: u8) -> Node {
        nodes::insert(
            tx,
            &NewNode {
                network: net,
                name,
                namespace: "prod",
                tags: &[],
                spiffe_id: &format!("spiffe://td/ns/prod/node/{name}"),
                public_key: WgKey([b; 32]),
                offset: u32::from(b),
                ipv4: std::net::Ipv4Addr::new(100, 64, 0, b),
                ipv6: format!("fd00::{b}").parse().expect("v6"),
                token_id: "t",
                listen_port: 51820,
                endpoints: &[],
                version: "0",
            },
        )
        .await
        .expect("insert node")
    }

    #[tokio::test]
    async fn a_proposed_key_is_stored_then_switched_and_a_taken_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Store = Store::open(dir.path()).await.expect("open").store;
        let mut tx = store.write().await.expect("tx");
        let network = networks::insert(
            &mut tx,
            "prod-vpc",
            "100.64.0.0/16".parse().expect("v4"),
            "fd00::/64".parse().expect("v6"),
            true,
        )
        .await
        .expect("network");
        crate::store::tokens::insert(
            &mut tx,
            &crate::store::tokens::NewToken {
                id: "t",
                secret_hash: "h",
                network: network.id,
                namespace: "prod",
                tags: &[],
                uses: 2,
                expires_at: u64::MAX / 4,
                created_by: "test",
                created_at: 0,
            },
        )
        .await
        .expect("token");
        let a = node(&mut tx, network.id, "a", 1).await;
        let b = node(&mut tx, network.id, "b", 2).await;
        assert_eq!(
            key_ttl(&mut tx, &network).await.expect("ttl"),
            DEFAULT_KEY_TTL_SECS
        );
        set_key_ttl(&mut tx, network.id, 60).await.expect("set ttl");
        assert_eq!(key_ttl(&mut tx, &network).await.expect("ttl"), 60);
        assert_eq!(a.key_expires_at(60), Some(a.key_created_at + 60));

        // b's key, or one that a proposed, cannot be proposed by another node.
        let refused = nodes::set_next_key(&mut tx, a.id, b.public_key).await;
        assert!(matches!(refused, Err(InsertError::KeyInUse(ref n)) if n == "b"));
        nodes::set_next_key(&mut tx, a.id, WgKey([7; 32]))
            .await
            .expect("a fresh key");
        let taken = nodes::set_next_key(&mut tx, b.id, WgKey([7; 32])).await;
        assert!(matches!(taken, Err(InsertError::KeyInUse(ref n)) if n == "a"));

        // Switching needs the key that is pending; then it is the node's key, made now.
        assert!(
            !nodes::switch_key(&mut tx, a.id, WgKey([8; 32]), 5_000)
                .await
                .expect("switch")
        );
        assert!(
            nodes::switch_key(&mut tx, a.id, WgKey([7; 32]), 5_000)
                .await
                .expect("switch")
        );
        let a = nodes::find_in(&mut tx, a.id)
            .await
            .expect("find")
            .expect("a");
        assert_eq!(a.public_key, WgKey([7; 32]));
        assert_eq!(a.next_public_key, None);
        assert_eq!(a.key_created_at, 5_000);
        assert_eq!(a.key_expires_at(60), Some(5_060));
        assert_eq!(a.key_expires_at(0), None);

        // A network that is not zero-trust: keys never expire, whatever is stored.
        let open = networks::insert(
            &mut tx,
            "lab",
            "100.65.0.0/16".parse().expect("v4"),
            "fd01::/64".parse().expect("v6"),
            false,
        )
        .await
        .expect("network");
        assert_eq!(key_ttl(&mut tx, &open).await.expect("ttl"), 0);
    }

    #[test]
    fn orders_and_ttls_are_checked() {
        assert_eq!(Order::parse("peers-first"), Ok(Order::PeersFirst));
        assert_eq!(Order::parse("node-first"), Ok(Order::NodeFirst));
        assert!(Order::parse("sideways").is_err());
        assert!(check_ttl(9).is_err());
        assert!(check_ttl(10).is_ok());
        assert!(check_ttl(MAX_KEY_TTL_SECS + 1).is_err());
    }
}
