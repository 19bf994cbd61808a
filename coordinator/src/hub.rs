//! The coordinator's live state: the policy in force per network, the connected control
//! sessions, and the recompute that turns any change into new netmaps and pushes them.
//!
//! Order rule: a recompute and a session's attach both hold `recompute` while they read and
//! write netmaps, so a session always gets its full netmap before any delta that follows it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use ztnet_proto::admin::PendingAck;
use ztnet_proto::control::{ControlError, Netmap, NetmapDelta, NetmapVersion, ServerMsg};

use crate::ca::Ca;
use crate::netmap;
use crate::policy::{self, Effective};
use crate::store::nodes::Node;
use crate::store::{NetworkId, NodeId, Store, StoreError, networks, nodes, policies, unix_now};

/// How long a netmap is valid.
pub const NETMAP_LIFETIME_SECS: u64 = 24 * 3600;
/// A netmap with less than this left is re-issued with a fresh expiry.
pub const NETMAP_REFRESH_SECS: u64 = 12 * 3600;

/// Whether [`Hub::attach`] registered a live session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// Registered; the full netmap is on its way.
    Live,
    /// The node was revoked or deleted while its session was being set up.
    Gone,
}

/// What a session task is told to do.
#[derive(Debug)]
pub enum SessionEvent {
    /// Send this netmap: the delta when the node runs `delta.from`, else the full one.
    Netmap {
        /// The full netmap.
        full: Arc<Netmap>,
        /// The change from the node's previous netmap, when there was one.
        delta: Option<Box<NetmapDelta>>,
    },
    /// Send this error and close the connection.
    Close(ControlError),
    /// Send this message (key rotation steps).
    Send(Box<ServerMsg>),
}

struct Session {
    conn_id: u64,
    remote: SocketAddr,
    tx: mpsc::UnboundedSender<SessionEvent>,
    /// Its hello announced the flow query.
    answers_flows: bool,
}

/// A node's answer to a flow query.
#[derive(Debug)]
pub struct FlowAnswer {
    /// At most [`ztnet_proto::control::MAX_FLOWS_ANSWERED`] open flows.
    pub flows: Vec<netpolicy::OpenFlow>,
    /// The node had more than it sent.
    pub truncated: bool,
}

/// Why a node's flows cannot be asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoFlowQuery {
    /// No control session.
    Offline,
    /// Its session did not announce the query (a ztnet-node built before it).
    Unsupported,
}

/// Everything the admin API and the control server share.
pub struct Hub {
    /// The database.
    pub store: Store,
    /// The CA.
    pub ca: Ca,
    /// Trust domain of SPIFFE IDs.
    pub trust_domain: String,
    /// Address written into join tokens.
    pub advertise: String,
    policies: Mutex<HashMap<NetworkId, Effective>>,
    problems: Mutex<BTreeMap<String, String>>,
    sessions: Mutex<HashMap<NodeId, Session>>,
    identity_conflicts: AtomicU64,
    recompute: tokio::sync::Mutex<()>,
    /// Held by a policy apply from storing to putting in force.
    pub apply_lock: tokio::sync::Mutex<()>,
    /// Key rotations an operator asked for, not yet started by their node.
    pub rotations: crate::rotation::Requests,
    rotation_locks: Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<()>>>>,
    /// Flow queries waiting for their answer: id to the node asked and where the answer goes.
    flow_queries: Mutex<HashMap<u64, (NodeId, tokio::sync::oneshot::Sender<FlowAnswer>)>>,
    next_flow_query: AtomicU64,
}

/// Locks a std mutex, carrying on with the data if a holder panicked (every critical section
/// here only inserts or removes whole entries, so the data stays consistent).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Hub {
    /// Makes the hub and chooses the policy in force for every stored network.
    pub async fn new(
        store: Store,
        ca: Ca,
        trust_domain: String,
        advertise: String,
    ) -> Result<Hub, StoreError> {
        let hub = Hub {
            store,
            ca,
            trust_domain,
            advertise,
            policies: Mutex::new(HashMap::new()),
            problems: Mutex::new(BTreeMap::new()),
            sessions: Mutex::new(HashMap::new()),
            identity_conflicts: AtomicU64::new(0),
            recompute: tokio::sync::Mutex::new(()),
            apply_lock: tokio::sync::Mutex::new(()),
            rotations: crate::rotation::Requests::default(),
            rotation_locks: Mutex::new(HashMap::new()),
            flow_queries: Mutex::new(HashMap::new()),
            next_flow_query: AtomicU64::new(1),
        };
        for network in networks::list(&hub.store).await? {
            let history = policies::history(&hub.store, network.id).await?;
            let (effective, problem) = policy::choose(&history);
            if let Some(problem) = problem {
                tracing::error!(network = %network.name, "{problem}");
                hub.set_problem(&network.name, Some(problem));
            } else if effective.version > 0 {
                info!(network = %network.name, version = effective.version, "policy in force");
            }
            lock(&hub.policies).insert(network.id, effective);
        }
        Ok(hub)
    }

    /// The policy in force for a network.
    pub fn effective(&self, network: NetworkId) -> Effective {
        lock(&self.policies)
            .get(&network)
            .cloned()
            .unwrap_or_default()
    }

    /// Puts a new policy in force (after it was stored) and clears the network's problem.
    pub fn set_effective(&self, network: NetworkId, name: &str, effective: Effective) {
        lock(&self.policies).insert(network, effective);
        self.set_problem(name, None);
    }

    /// Problems an operator must look at, one sentence each.
    pub fn problems(&self) -> Vec<String> {
        lock(&self.problems)
            .iter()
            .map(|(net, p)| format!("network {net}: {p}"))
            .collect()
    }

    fn set_problem(&self, network: &str, problem: Option<String>) {
        let mut problems = lock(&self.problems);
        match problem {
            Some(p) => problems.insert(network.to_string(), p),
            None => problems.remove(network),
        };
    }

    /// The id of a node's live control session, if it has one.
    pub fn session_id(&self, node: NodeId) -> Option<u64> {
        lock(&self.sessions).get(&node).map(|s| s.conn_id)
    }

    /// Whether a node has a control session now.
    pub fn is_online(&self, node: NodeId) -> bool {
        lock(&self.sessions).contains_key(&node)
    }

    /// Sessions that replaced a live session of the same node from another address.
    pub fn identity_conflicts(&self) -> u64 {
        self.identity_conflicts.load(Ordering::Relaxed)
    }

    /// Registers a session for a node and queues its full netmap first. A session already
    /// registered for the node is replaced (its connection is told so and closes); when the
    /// two came from different addresses this is logged at warn and counted, since two
    /// machines sharing one state directory replace each other forever.
    pub async fn attach(
        &self,
        node: &Node,
        conn_id: u64,
        remote: SocketAddr,
        tx: mpsc::UnboundedSender<SessionEvent>,
    ) -> Result<Attached, StoreError> {
        let _order = self.recompute.lock().await;
        self.recompute_locked(node.network).await?;
        let session = Session {
            conn_id,
            remote,
            tx: tx.clone(),
            answers_flows: false,
        };
        // Register first, read the node's state second: a revoke or delete commits before it
        // closes sessions, so either it finds this session or this read sees it gone.
        let old = lock(&self.sessions).insert(node.id, session);
        if let Some(old) = old {
            self.replaced(node, &old, remote);
        }
        let mut conn = self.store.pool().acquire().await?;
        let current = match nodes::find_in(&mut conn, node.id).await? {
            Some(n) if n.is_active() => n,
            _ => {
                self.detach(node.id, conn_id);
                return Ok(Attached::Gone);
            }
        };
        let json = current.netmap_json.ok_or_else(|| {
            StoreError::Corrupt(format!("node {} has no netmap after recompute", node.name))
        })?;
        let full: Netmap = crate::store::from_json(&json, "stored netmap")?;
        // The receiver is owned by the session task, which is running; a send error only
        // means it already ended, and then there is nothing to deliver.
        let _ = tx.send(SessionEvent::Netmap {
            full: Arc::new(full),
            delta: None,
        });
        Ok(Attached::Live)
    }

    /// Tells a replaced session to end, warning when the new one comes from elsewhere.
    fn replaced(&self, node: &Node, old: &Session, remote: SocketAddr) {
        if old.remote != remote {
            self.identity_conflicts.fetch_add(1, Ordering::Relaxed);
            warn!(
                node = %node.name,
                old_remote = %old.remote,
                new_remote = %remote,
                "a control session from {remote} replaced a live one from {}: two machines \
                 are using node {}'s identity: a copied state directory?",
                old.remote,
                node.name
            );
        } else {
            debug!(node = %node.name, %remote, "control session replaced by a newer one");
        }
        let _ = old.tx.send(SessionEvent::Close(ControlError {
            code: "protocol".into(),
            message: "a newer control connection of this node replaced this one".into(),
        }));
    }

    /// Removes a session, unless a newer one replaced it already.
    pub fn detach(&self, node: NodeId, conn_id: u64) {
        let mut sessions = lock(&self.sessions);
        if sessions.get(&node).is_some_and(|s| s.conn_id == conn_id) {
            sessions.remove(&node);
        }
    }

    /// Queues a message on a node's session; false when it has none.
    pub fn send(&self, node: NodeId, msg: ServerMsg) -> bool {
        lock(&self.sessions)
            .get(&node)
            .is_some_and(|s| s.tx.send(SessionEvent::Send(Box::new(msg))).is_ok())
    }

    /// Records that a node's session (still the live one) answers flow queries.
    pub fn enable_flow_queries(&self, node: NodeId, conn_id: u64) {
        if let Some(s) = lock(&self.sessions).get_mut(&node)
            && s.conn_id == conn_id
        {
            s.answers_flows = true;
        }
    }

    /// Sends a node a flow query; the answer arrives on the receiver. Call
    /// [`Hub::forget_flow_query`] with the id when giving up on it.
    pub fn ask_flows(
        &self,
        node: NodeId,
    ) -> Result<(u64, tokio::sync::oneshot::Receiver<FlowAnswer>), NoFlowQuery> {
        let id = self.next_flow_query.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sessions = lock(&self.sessions);
        let session = sessions.get(&node).ok_or(NoFlowQuery::Offline)?;
        if !session.answers_flows {
            return Err(NoFlowQuery::Unsupported);
        }
        lock(&self.flow_queries).insert(id, (node, tx));
        let msg = ServerMsg::FlowQuery { id };
        if session.tx.send(SessionEvent::Send(Box::new(msg))).is_err() {
            lock(&self.flow_queries).remove(&id);
            return Err(NoFlowQuery::Offline);
        }
        Ok((id, rx))
    }

    /// Hands a node's answer to the query waiting for it. An answer to a query that was not
    /// sent to this node, or that was given up, is dropped.
    pub fn answer_flows(&self, node: NodeId, id: u64, answer: FlowAnswer) {
        let mut queries = lock(&self.flow_queries);
        if queries.get(&id).is_some_and(|(asked, _)| *asked == node)
            && let Some((_, tx)) = queries.remove(&id)
        {
            let _ = tx.send(answer);
        } else {
            debug!(query = id, "flow answer for no waiting query dropped");
        }
    }

    /// Gives up on a flow query.
    pub fn forget_flow_query(&self, id: u64) {
        lock(&self.flow_queries).remove(&id);
    }

    /// The lock that runs one key rotation of a node at a time.
    pub fn rotation_lock(&self, node: NodeId) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.rotation_locks).entry(node).or_default().clone()
    }

    /// Recomputes the node's network, then sends the node its full netmap again (it asked:
    /// what it sees contradicts its netmap).
    pub async fn resend_full(&self, node: &Node) -> Result<(), StoreError> {
        let _order = self.recompute.lock().await;
        self.recompute_locked(node.network).await?;
        let mut conn = self.store.pool().acquire().await?;
        let Some(json) = nodes::find_in(&mut conn, node.id)
            .await?
            .filter(Node::is_active)
            .and_then(|n| n.netmap_json)
        else {
            return Ok(());
        };
        let full: Netmap = crate::store::from_json(&json, "stored netmap")?;
        if let Some(s) = lock(&self.sessions).get(&node.id) {
            let _ = s.tx.send(SessionEvent::Netmap {
                full: Arc::new(full),
                delta: None,
            });
        }
        Ok(())
    }

    /// Closes a node's session with an error (node deleted: `revoked`).
    pub fn close_session(&self, node: NodeId, error: ControlError) {
        if let Some(s) = lock(&self.sessions).remove(&node) {
            let _ = s.tx.send(SessionEvent::Close(error));
        }
    }

    /// Recomputes a network's netmaps, stores the changed ones with a higher version and
    /// pushes them to connected nodes. Returns the nodes that must acknowledge.
    pub async fn recompute(&self, network: NetworkId) -> Result<Vec<PendingAck>, StoreError> {
        let _order = self.recompute.lock().await;
        self.recompute_locked(network).await
    }

    /// Recomputes every network (used periodically to refresh expiring netmaps).
    pub async fn recompute_all(&self) -> Result<(), StoreError> {
        for network in networks::list(&self.store).await? {
            self.recompute(network.id).await?;
        }
        Ok(())
    }

    async fn recompute_locked(&self, network_id: NetworkId) -> Result<Vec<PendingAck>, StoreError> {
        let Some(network) = networks::by_id(&self.store, network_id).await? else {
            return Ok(Vec::new());
        };
        let effective = self.effective(network_id);
        let now = unix_now();
        let expires_at = now + NETMAP_LIFETIME_SECS;

        let mut tx = self.store.write().await?;
        let members = nodes::active(&mut tx, network_id).await?;
        let compiled = match &effective.policy {
            Some(p) => netpolicy::compile(p, &netmap::inventory(&members)),
            None => netpolicy::CompiledNetwork::default(),
        };
        let keys = netmap::KeyLife {
            ttl: crate::rotation::key_ttl(&mut tx, &network).await?,
            now,
        };
        let mut fresh = netmap::build(&network, &members, &compiled, expires_at, keys);
        let bundle = self.ca.ca_pem();
        for map in fresh.values_mut() {
            map.bundle_pem = Some(bundle.clone());
        }

        let enforced = crate::posture::enforce(
            &mut tx,
            &network,
            &members,
            effective.policy.as_deref(),
            &mut fresh,
            |id| self.session_id(id),
        )
        .await?;
        let mut changed = Vec::new();
        for node in &members {
            let Some(mut new) = fresh.remove(&node.name) else {
                continue;
            };
            let old: Option<Netmap> = match &node.netmap_json {
                Some(json) => match serde_json::from_str(json) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        warn!(node = %node.name, error = %e, "stored netmap unreadable; replacing it");
                        None
                    }
                },
                None => None,
            };
            if !netmap::must_reissue(old.as_ref(), &new, now, NETMAP_REFRESH_SECS) {
                continue;
            }
            new.version = NetmapVersion(node.netmap_version + 1);
            nodes::set_netmap(
                &mut tx,
                node.id,
                new.version.0,
                &crate::store::to_json(&new),
            )
            .await?;
            changed.push((node.id, node.name.clone(), old, new));
        }
        tx.commit().await?;

        let sessions = lock(&self.sessions);
        let mut pending = Vec::with_capacity(changed.len());
        for (id, name, old, new) in changed {
            debug!(node = %name, version = new.version.0, peers = new.peers.len(), "netmap changed");
            pending.push(PendingAck {
                node: name,
                netmap_version: new.version.0,
            });
            if let Some(s) = sessions.get(&id) {
                let delta = old.as_ref().map(|o| Box::new(new.delta_from(o)));
                let _ = s.tx.send(SessionEvent::Netmap {
                    full: Arc::new(new),
                    delta,
                });
            }
        }
        drop(sessions);
        enforced.track(self, &pending);
        Ok(pending)
    }
}
