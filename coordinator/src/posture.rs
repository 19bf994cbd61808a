//! Posture and quarantine (issue 6), and the measured time to enforcement of audited changes.
//!
//! Every node sends its posture ([`Posture`]: version, kernel, OS, operator facts) after its
//! hello and on every report. The policy's `[[posture]]` entries say what a node matched by
//! their selector must report. A node that fails one, or never reported, is quarantined: at the
//! next recompute it leaves every peer's netmap and its own netmap has no peers, exactly as a
//! revoked node leaves them, until a report passes again. Entering and leaving quarantine are
//! audited (`node.quarantine`, `node.release`) with the reason.
//!
//! `max_session`: a session's age counts from its first posture report. Once that is in,
//! [`watch_sessions`] tells a node that said `Hello::reauthenticates` its deadline
//! (`ServerMsg::SessionDeadline`); such a node opens a new mutual-TLS session ahead of it
//! (`Hello::replaces`), which replaces the old one at once and whose own age starts at its first
//! report, so an honest node is never quarantined and its peers never lose it. A session older
//! than the entry allows (the node did not re-authenticate in time, or cannot) quarantines the
//! node and is closed with `reauthenticate`; the node connects again (its certificate checked
//! again), and the first posture of the new session releases it. The age is checked on each
//! posture message and every second by [`watch_sessions`]. While a replacement session has not
//! reported yet, the age counts as zero: the old session's report is not the live one's.
//!
//! Time to enforcement: for a revoke, a quarantine, a release or a policy apply, a task waits
//! until every connected node whose netmap changed acknowledged the new version, then writes
//! the time from the change to the last acknowledgement into the audit entry
//! ([`Enforcement`]). Acknowledgements are polled every [`POLL`]; a peer that does not
//! acknowledge within [`TRACK_TIMEOUT`] is named. A peer whose netmap the change altered but
//! that is offline keeps its last netmap (fail-static) and so does not enforce the change yet:
//! it is named in `pending_offline` (stored at once, with what it goes on accepting), never
//! counted as enforced, and `ms` is the connected peers' figure. When it reconnects and
//! acknowledges, [`complete_late`] (every [`SESSION_CHECK`]) moves it to `late` in the same
//! audit entry with the time; the pending list is in the store, so this survives a restart.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use netpolicy::{NodeIdentity, Policy, PostureFacts};
use sqlx::SqliteConnection;
use tracing::{debug, info, warn};
use ztnet_proto::admin::{Enforcement, LateAck, OfflinePeer, PendingAck, Reach};
use ztnet_proto::control::{Netmap, Posture};

use crate::enroll::refuse;
use crate::hub::Hub;
use crate::store::networks::Network;
use crate::store::nodes::Node;
use crate::store::{NetworkId, NodeId, Store, StoreError, audit, to_i64, unix_now};

/// How often acknowledgements are polled while a change is tracked.
pub const POLL: Duration = Duration::from_millis(5);
/// How long a change is tracked before the peers that did not acknowledge are named.
pub const TRACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Most operator facts kept per report.
const MAX_FACTS: usize = 64;
/// Longest fact name, value or version string kept, in characters.
const MAX_TEXT: usize = 256;

/// One node's stored posture state.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// Its last report, if any.
    pub report: Option<Posture>,
    /// Unix seconds of that report.
    pub reported_at: Option<u64>,
    /// Which control session sent it.
    pub session_key: Option<String>,
    /// Unix seconds at which that session started.
    pub session_started_at: Option<u64>,
    /// Why it is quarantined, when it is.
    pub quarantine: Option<String>,
}

/// Every posture row of a network's nodes.
pub async fn rows(
    conn: &mut SqliteConnection,
    network: NetworkId,
) -> Result<HashMap<NodeId, Row>, StoreError> {
    type Raw = (
        i64,
        Option<String>,
        Option<i64>,
        Option<String>,
        Option<i64>,
        Option<String>,
    );
    let raw: Vec<Raw> = sqlx::query_as(
        "SELECT p.node_id, p.report_json, p.reported_at, p.session_key, p.session_started_at,
                p.quarantine
         FROM node_posture p JOIN nodes n ON n.id = p.node_id WHERE n.network_id = ?",
    )
    .bind(network.0)
    .fetch_all(&mut *conn)
    .await?;
    let mut out = HashMap::new();
    for (id, json, at, key, started, quarantine) in raw {
        let report = match json {
            Some(j) => Some(crate::store::from_json::<Posture>(&j, "stored posture")?),
            None => None,
        };
        out.insert(
            NodeId(id),
            Row {
                report,
                reported_at: at.and_then(|v| u64::try_from(v).ok()),
                session_key: key,
                session_started_at: started.and_then(|v| u64::try_from(v).ok()),
                quarantine,
            },
        );
    }
    Ok(out)
}

/// A process-wide nonce, so that session keys of two coordinator runs never collide.
fn nonce() -> u64 {
    static NONCE: OnceLock<u64> = OnceLock::new();
    *NONCE.get_or_init(|| rand::RngCore::next_u64(&mut rand::rngs::OsRng))
}

pub(crate) fn session_key(conn_id: u64) -> String {
    format!("{:016x}-{conn_id}", nonce())
}

fn clip(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_TEXT)
        .collect()
}

/// Keeps what a report may hold: bounded lengths, no control characters, valid fact names.
fn sanitize(p: Posture) -> Posture {
    let facts = p
        .facts
        .into_iter()
        .filter(|(k, _)| {
            !k.is_empty()
                && k.len() <= MAX_TEXT
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
        .take(MAX_FACTS)
        .map(|(k, v)| (k, clip(&v)))
        .collect();
    Posture {
        version: clip(&p.version),
        kernel: clip(&p.kernel),
        os: clip(&p.os),
        facts,
        error: p.error.as_deref().map(clip),
    }
}

fn identity(node: &Node) -> NodeIdentity {
    NodeIdentity {
        name: node.name.clone(),
        namespace: node.namespace.clone(),
        tags: node.tags.clone(),
        spiffe_id: node.spiffe_id.clone(),
        addresses: Vec::new(),
        routes: Vec::new(),
    }
}

/// Why `node` fails the policy's posture entries now, or `None` when it passes (or none
/// applies). `live` is the key of its live session, if it has one.
pub fn judge(
    policy: Option<&Policy>,
    node: &Node,
    row: Option<&Row>,
    live: Option<&str>,
    now: u64,
) -> Option<String> {
    let policy = policy?;
    let id = identity(node);
    let rules: Vec<_> = policy
        .posture()
        .iter()
        .filter(|r| r.applies_to(&id))
        .collect();
    if rules.is_empty() {
        return None;
    }
    let Some(report) = row.and_then(|r| r.report.as_ref()) else {
        return Some(format!(
            "posture at line {}: no posture report yet",
            rules[0].line
        ));
    };
    let mut facts = report.facts.clone();
    facts.insert("kernel".into(), report.kernel.clone());
    facts.insert("os".into(), report.os.clone());
    // A live session other than the one that sent the report has just started.
    let started = row.and_then(|r| r.session_started_at);
    let same_session = row.and_then(|r| r.session_key.as_deref()) == live;
    let session_secs = match (started, same_session || live.is_none()) {
        (Some(at), true) => now.saturating_sub(at),
        _ => 0,
    };
    let judged = PostureFacts {
        version: report.version.clone(),
        facts,
        session_secs,
    };
    for rule in rules {
        if let Some(why) = rule.failure(&judged) {
            let said = report
                .error
                .as_deref()
                .map(|e| format!(" (the node says: {e})"))
                .unwrap_or_default();
            return Some(format!("posture at line {}: {why}{said}", rule.line));
        }
    }
    None
}

/// Stores a posture report from `node`'s live session; recomputes the network when the judgment
/// changes, and closes a session older than its `max_session`.
pub async fn on_report(hub: &Hub, node: &Node, report: Posture) -> Result<(), StoreError> {
    let report = sanitize(report);
    let now = unix_now();
    let live = hub.session_id(node.id).map(session_key);
    let mut tx = hub.store.write().await?;
    let old = rows(&mut tx, node.network).await?.remove(&node.id);
    let new_session = old.as_ref().and_then(|r| r.session_key.as_deref()) != live.as_deref();
    let started = match (&old, new_session) {
        (Some(r), false) => r.session_started_at.unwrap_or(now),
        _ => now,
    };
    sqlx::query(
        "INSERT INTO node_posture (node_id, report_json, reported_at, session_key,
                                   session_started_at)
         VALUES (?, ?, ?, ?, ?)
         ON CONFLICT (node_id) DO UPDATE SET report_json = excluded.report_json,
             reported_at = excluded.reported_at, session_key = excluded.session_key,
             session_started_at = excluded.session_started_at",
    )
    .bind(node.id.0)
    .bind(crate::store::to_json(&report))
    .bind(to_i64(now))
    .bind(live.as_deref())
    .bind(to_i64(started))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;

    let policy = hub.effective(node.network).policy;
    let row = Row {
        report: Some(report),
        reported_at: Some(now),
        session_key: live.clone(),
        session_started_at: Some(started),
        quarantine: old.as_ref().and_then(|r| r.quarantine.clone()),
    };
    let judged = judge(policy.as_deref(), node, Some(&row), live.as_deref(), now);
    if let Some(why) = &judged
        && why.contains("max_session")
    {
        info!(node = %node.name, "session over max_session: asking the node to authenticate again");
        hub.close_session(
            node.id,
            refuse(
                "reauthenticate",
                format!("{why}; connect again to authenticate"),
            ),
        );
    }
    if judged != row.quarantine {
        hub.recompute(node.network).await?;
    }
    Ok(())
}

/// How often [`watch_sessions`] looks for sessions older than their `max_session`.
pub const SESSION_CHECK: Duration = Duration::from_secs(1);

/// Every [`SESSION_CHECK`]: completes the enforcement records of offline peers that since
/// acknowledged ([`complete_late`]); tells each live session under a `max_session` its
/// deadline (once per session and deadline), closes the sessions older than the `max_session`
/// of an entry that selects their node, and recomputes their networks (which quarantines them
/// until the node's new session reports). Does not rely on the node reporting: a node that
/// stops sending posture is cut at its deadline all the same. Runs for the coordinator's life.
pub async fn watch_sessions(hub: Arc<Hub>) {
    let mut tick = tokio::time::interval(SESSION_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut told = Told::new();
    loop {
        tick.tick().await;
        if let Err(e) = check_sessions(&hub, &mut told).await {
            warn!(error = %e, "max_session check failed");
        }
        // The same tick completes the enforcement of changes that offline peers missed.
        if let Err(e) = complete_late(&hub.store).await {
            warn!(error = %e, "completing the enforcement of offline peers failed");
        }
        told.retain(|id, _| hub.is_online(*id));
    }
}

/// The deadline each node's live session was told: its session key and the Unix second.
type Told = HashMap<NodeId, (String, u64)>;

/// The shortest `max_session` of the policy's entries that select `node`, in seconds.
pub fn max_session_for(policy: &Policy, node: &Node) -> Option<u64> {
    let id = identity(node);
    policy
        .posture()
        .iter()
        .filter(|r| r.applies_to(&id))
        .filter_map(|r| r.max_session_secs)
        .min()
}

/// Sends `node`'s live session its deadline when it was not told this one yet.
fn tell_deadline(
    hub: &Hub,
    told: &mut Told,
    node: &Node,
    live: &str,
    row: &Row,
    max: u64,
    now: u64,
) {
    let Some(started) = row.session_started_at else {
        return;
    };
    let deadline = started.saturating_add(max);
    if told
        .get(&node.id)
        .is_some_and(|(k, d)| k == live && *d == deadline)
    {
        return;
    }
    let msg = ztnet_proto::control::ServerMsg::SessionDeadline {
        max_session_secs: max,
        remaining_secs: deadline.saturating_sub(now),
    };
    if hub.send(node.id, msg) {
        debug!(node = %node.name, deadline, "session deadline sent");
        told.insert(node.id, (live.to_owned(), deadline));
    }
}

async fn check_sessions(hub: &Hub, told: &mut Told) -> Result<(), StoreError> {
    let now = unix_now();
    for network in crate::store::networks::list(&hub.store).await? {
        let Some(policy) = hub.effective(network.id).policy else {
            continue;
        };
        if policy
            .posture()
            .iter()
            .all(|r| r.max_session_secs.is_none())
        {
            continue;
        }
        let mut conn = hub.store.pool().acquire().await?;
        let members = crate::store::nodes::active(&mut conn, network.id).await?;
        let stored = rows(&mut conn, network.id).await?;
        drop(conn);
        let mut expired = false;
        for node in &members {
            let Some(live) = hub.session_id(node.id).map(session_key) else {
                // Offline (cut off from the coordinator, say) but maybe still talking to its
                // peers: its last session's age goes on counting, and it is quarantined at
                // that session's deadline, once.
                let row = stored.get(&node.id);
                expired |= row.is_some_and(|r| r.quarantine.is_none())
                    && judge(Some(&policy), node, row, None, now)
                        .is_some_and(|why| why.contains("max_session"));
                continue;
            };
            let Some(row) = stored
                .get(&node.id)
                .filter(|r| r.session_key.as_deref() == Some(live.as_str()))
            else {
                continue;
            };
            if let Some(max) = max_session_for(&policy, node) {
                tell_deadline(hub, told, node, &live, row, max, now);
            }
            let row = Some(row);
            let Some(why) = judge(Some(&policy), node, row, Some(&live), now) else {
                continue;
            };
            if !why.contains("max_session") {
                continue;
            }
            info!(
                node = %node.name,
                "session over max_session: asking the node to authenticate again"
            );
            hub.close_session(
                node.id,
                refuse(
                    "reauthenticate",
                    format!("{why}; connect again to authenticate"),
                ),
            );
            expired = true;
        }
        if expired {
            hub.recompute(network.id).await?;
        }
    }
    Ok(())
}

/// What [`enforce`] changed: the audit entries of quarantines and releases, and the node ids
/// by name (for tracking their acknowledgements).
#[derive(Debug, Default)]
pub struct Enforced {
    started: Option<Instant>,
    /// Audit id, node name, and whether it was a quarantine (else a release).
    entries: Vec<(i64, String, bool)>,
    /// Every member's id and last message time, by name.
    ids: HashMap<String, (NodeId, Option<u64>)>,
}

/// Judges every member's posture, stores and audits what changed, and takes quarantined nodes
/// out of every netmap in `fresh` (a quarantined node's own netmap keeps no peers). Runs inside
/// the recompute's transaction.
pub async fn enforce(
    conn: &mut SqliteConnection,
    network: &Network,
    members: &[Node],
    policy: Option<&Policy>,
    fresh: &mut BTreeMap<String, Netmap>,
    live: impl Fn(NodeId) -> Option<u64>,
) -> Result<Enforced, StoreError> {
    let started = Instant::now();
    let now = unix_now();
    let stored = rows(conn, network.id).await?;
    let mut out = Enforced {
        started: Some(started),
        entries: Vec::new(),
        ids: members
            .iter()
            .map(|n| (n.name.clone(), (n.id, n.last_seen)))
            .collect(),
    };
    let mut quarantined = BTreeMap::new();
    for node in members {
        let row = stored.get(&node.id);
        let key = live(node.id).map(session_key);
        let judged = judge(policy, node, row, key.as_deref(), now);
        let before = row.and_then(|r| r.quarantine.clone());
        if let Some(why) = &judged {
            quarantined.insert(node.name.clone(), why.clone());
            if before.as_deref() == Some(why.as_str()) {
                continue;
            }
        } else if before.is_none() {
            continue;
        }
        sqlx::query(
            "INSERT INTO node_posture (node_id, quarantine, quarantined_at) VALUES (?, ?, ?)
             ON CONFLICT (node_id) DO UPDATE SET quarantine = excluded.quarantine,
                 quarantined_at = excluded.quarantined_at",
        )
        .bind(node.id.0)
        .bind(judged.as_deref())
        .bind(judged.as_ref().map(|_| to_i64(now)))
        .execute(&mut *conn)
        .await?;
        let (action, detail) = match &judged {
            Some(why) => {
                warn!(node = %node.name, reason = %why, "node quarantined");
                ("node.quarantine", why.clone())
            }
            None => {
                info!(node = %node.name, "node passes its posture again: released");
                (
                    "node.release",
                    format!(
                        "passes its posture again (was: {})",
                        before.unwrap_or_default()
                    ),
                )
            }
        };
        let id = audit::append_id(
            conn,
            audit::Entry {
                network: Some(network.id),
                actor: "coordinator",
                action,
                target: &node.name,
                detail,
            },
        )
        .await?;
        out.entries.push((id, node.name.clone(), judged.is_some()));
    }
    if !quarantined.is_empty() {
        for (name, map) in fresh.iter_mut() {
            if let Some(why) = quarantined.get(name) {
                // Told why, so that its own log says it, not only "no peers".
                map.peers.clear();
                map.node.quarantine = Some(why.clone());
            } else {
                map.peers.retain(|p| !quarantined.contains_key(&p.name));
            }
        }
    }
    Ok(out)
}

impl Enforced {
    /// Tracks the acknowledgements of the changed netmaps for every audited quarantine or
    /// release. Call after the netmaps were pushed, without holding the hub's session lock.
    pub fn track(self, hub: &Hub, pending: &[PendingAck]) {
        let Some(started) = self.started else {
            return;
        };
        for (audit_id, subject, quarantined) in &self.entries {
            let what = if *quarantined {
                Change::Quarantine(subject)
            } else {
                Change::Release(subject)
            };
            let (online, offline) = split(hub, pending, &self.ids, subject);
            track_with(hub, *audit_id, started, online, offline, &what);
        }
    }
}

/// What a tracked change did, for the words about the peers that do not have it yet.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// A node left the network (revoke, delete, expired key); its key's expiry, if it has one.
    Removed(&'a str, Option<u64>),
    /// A node was quarantined.
    Quarantine(&'a str),
    /// A node was released from quarantine.
    Release(&'a str),
    /// A node's key expired without a rotation.
    KeyExpired(&'a str),
    /// A policy was applied.
    Policy,
}

/// A bare node name is a key expiry (the tracker's older callers pass the name alone).
impl<'a> From<&'a String> for Change<'a> {
    fn from(name: &'a String) -> Change<'a> {
        Change::KeyExpired(name)
    }
}

impl Change<'_> {
    /// The change's subject, which is not one of its peers.
    fn subject(&self) -> &str {
        match self {
            Change::Removed(s, _)
            | Change::Quarantine(s)
            | Change::Release(s)
            | Change::KeyExpired(s) => s,
            Change::Policy => "",
        }
    }

    /// What an offline peer goes on doing until it acknowledges.
    fn offline_keeps(&self, one: bool) -> String {
        let it = if one { "it" } else { "each" };
        let reconnects = "it reconnects";
        match self {
            Change::Removed(s, Some(at)) => format!(
                "{it} still accepts {s} until {reconnects} or {s}'s key expires at {}",
                rfc3339(*at)
            ),
            Change::Removed(s, None) => format!(
                "{it} still accepts {s} until {reconnects} (keys do not expire in this network)"
            ),
            Change::Quarantine(s) => format!("{it} still accepts {s} until {reconnects}"),
            Change::Release(s) => format!("{it} does not see {s} again until {reconnects}"),
            Change::KeyExpired(s) => {
                format!("{it} drops {s} by its own clock, as the key's expiry is in its netmap")
            }
            Change::Policy => format!("{it} keeps the previous policy until {reconnects}"),
        }
    }
}

fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// A connected peer to wait for: its id, name and the version it must acknowledge.
type Waiting = (NodeId, String, u64);

/// Splits the nodes whose netmap changed (the subject left out) into the connected ones, which
/// are waited for, and the offline ones, which keep their last netmap until they reconnect.
fn split(
    hub: &Hub,
    pending: &[PendingAck],
    ids: &HashMap<String, (NodeId, Option<u64>)>,
    subject: &str,
) -> (Vec<Waiting>, Vec<OfflinePeer>) {
    let mut online = Vec::new();
    let mut offline = Vec::new();
    for p in pending.iter().filter(|p| p.node != subject) {
        let Some((id, last_seen)) = ids.get(&p.node) else {
            continue;
        };
        if hub.is_online(*id) {
            online.push((*id, p.node.clone(), p.netmap_version));
        } else {
            offline.push(OfflinePeer {
                node: p.node.clone(),
                last_seen: *last_seen,
                netmap_version: p.netmap_version,
            });
        }
    }
    (online, offline)
}

/// Tracks the acknowledgements after a change made outside a recompute (a revoke, a policy
/// apply): `started` is when the change committed, `pending` what the recompute returned.
/// Answers where the change went: the connected peers and the offline ones.
pub async fn track(
    hub: &Hub,
    network: NetworkId,
    audit_id: i64,
    started: Instant,
    pending: &[PendingAck],
    what: impl Into<Change<'_>>,
) -> Result<Reach, StoreError> {
    let what = what.into();
    let mut conn = hub.store.pool().acquire().await?;
    let ids: HashMap<String, (NodeId, Option<u64>)> =
        crate::store::nodes::active(&mut conn, network)
            .await?
            .into_iter()
            .map(|n| (n.name, (n.id, n.last_seen)))
            .collect();
    drop(conn);
    let (online, offline) = split(hub, pending, &ids, what.subject());
    let reach = Reach {
        audit_id: u64::try_from(audit_id).unwrap_or(0),
        connected: online.iter().map(|(_, n, _)| n.clone()).collect(),
        offline: offline.clone(),
        subject_key_expires_at: match what {
            Change::Removed(_, at) => at,
            _ => None,
        },
    };
    track_with(hub, audit_id, started, online, offline, &what);
    Ok(reach)
}

fn track_with(
    hub: &Hub,
    audit_id: i64,
    started: Instant,
    waiting: Vec<Waiting>,
    offline: Vec<OfflinePeer>,
    what: &Change<'_>,
) {
    let keeps = (!offline.is_empty()).then(|| what.offline_keeps(offline.len() == 1));
    let store = hub.store.clone();
    tokio::spawn(async move {
        if !offline.is_empty() {
            // Stored at once, so that the offline peers are named even while the connected
            // ones are waited for, and after a coordinator restart.
            let mut first = Enforcement {
                ms: None,
                peers: u32::try_from(waiting.len()).unwrap_or(u32::MAX),
                acknowledged: 0,
                summary: String::new(),
                pending_offline: offline.clone(),
                late: Vec::new(),
                unacknowledged: Vec::new(),
                offline_keeps: keeps.clone(),
            };
            first.summary = describe(&first);
            if let Err(err) = write_enforcement(&store, audit_id, &first).await {
                warn!(error = %err, "pending offline peers not stored");
            }
        }
        let mut e = wait_acks(&store, started, &waiting).await;
        e.pending_offline = offline;
        e.offline_keeps = keeps;
        if let Err(err) = write_final(&store, audit_id, &mut e).await {
            warn!(error = %err, "time to enforcement not stored");
        } else {
            info!(audit = audit_id, summary = %e.summary, "time to enforcement");
        }
    });
}

/// The readable summary of an enforcement record, from its fields.
pub fn describe(e: &Enforcement) -> String {
    let offline = !e.pending_offline.is_empty() || !e.late.is_empty();
    let mut out = if !e.unacknowledged.is_empty() {
        format!(
            "{} of {} connected peers did not acknowledge within {} s: {}",
            e.unacknowledged.len(),
            e.peers,
            TRACK_TIMEOUT.as_secs(),
            e.unacknowledged.join(", ")
        )
    } else {
        match e.ms {
            None => format!("waiting for {} connected peers", e.peers),
            Some(_) if e.peers == 0 && !offline => "enforced at once: no peer had to change".into(),
            Some(_) if e.peers == 0 => "no connected peer had to change".into(),
            Some(ms) if !offline => {
                format!("enforced in {ms} ms: {} peers acknowledged", e.peers)
            }
            Some(ms) => format!("{ms} ms on {} connected peers", e.peers),
        }
    };
    if !e.pending_offline.is_empty() {
        let named: Vec<String> = e
            .pending_offline
            .iter()
            .map(|p| match p.last_seen {
                Some(t) => format!("{} (offline since {})", p.node, rfc3339(t)),
                None => format!("{} (never connected)", p.node),
            })
            .collect();
        out.push_str(&format!("; not yet on {}", named.join(", ")));
        if let Some(keeps) = &e.offline_keeps {
            out.push_str(&format!(": {keeps}"));
        }
    }
    for l in &e.late {
        if l.removed {
            out.push_str(&format!(
                "; {} left the network before it acknowledged",
                l.node
            ));
        } else {
            // Acknowledgements are stored to the second.
            let after = match l.after_ms {
                0..1000 => "within a second".to_string(),
                ms => humantime::format_duration(Duration::from_secs(ms / 1000)).to_string(),
            };
            out.push_str(&format!(
                "; on {} at {} ({after} after the change, when it reconnected)",
                l.node,
                rfc3339(l.at_ms / 1000),
            ));
        }
    }
    out
}

async fn wait_acks(store: &Store, started: Instant, waiting: &[Waiting]) -> Enforcement {
    let peers = u32::try_from(waiting.len()).unwrap_or(u32::MAX);
    let done = |ms, acknowledged, unacknowledged| Enforcement {
        ms,
        peers,
        acknowledged,
        summary: String::new(),
        pending_offline: Vec::new(),
        late: Vec::new(),
        unacknowledged,
        offline_keeps: None,
    };
    if waiting.is_empty() {
        return done(Some(0), 0, Vec::new());
    }
    let deadline = started + TRACK_TIMEOUT;
    let missing = loop {
        let mut left = Vec::new();
        for (id, name, version) in waiting {
            let applied: Option<(i64,)> =
                sqlx::query_as("SELECT applied_version FROM nodes WHERE id = ?")
                    .bind(id.0)
                    .fetch_optional(store.pool())
                    .await
                    .unwrap_or(None);
            if applied.is_none_or(|(a,)| a < to_i64(*version)) {
                left.push(name.clone());
            }
        }
        if left.is_empty() {
            let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            return done(Some(ms), peers, Vec::new());
        }
        if Instant::now() >= deadline {
            break left;
        }
        tokio::time::sleep(POLL).await;
    };
    let acked = peers.saturating_sub(u32::try_from(missing.len()).unwrap_or(u32::MAX));
    done(None, acked, missing)
}

async fn write_enforcement(
    store: &Store,
    audit_id: i64,
    e: &Enforcement,
) -> Result<(), StoreError> {
    let mut tx = store.write().await?;
    sqlx::query("UPDATE audit SET enforcement = ? WHERE id = ?")
        .bind(crate::store::to_json(e))
        .bind(audit_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Writes the tracker's result, keeping the offline peers [`complete_late`] completed
/// meanwhile (read and written in one write transaction).
async fn write_final(store: &Store, audit_id: i64, e: &mut Enforcement) -> Result<(), StoreError> {
    let mut tx = store.write().await?;
    let stored: Option<(Option<String>,)> =
        sqlx::query_as("SELECT enforcement FROM audit WHERE id = ?")
            .bind(audit_id)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some(before) = stored
        .and_then(|(j,)| j)
        .and_then(|j| serde_json::from_str::<Enforcement>(&j).ok())
    {
        e.pending_offline
            .retain(|p| !before.late.iter().any(|l| l.node == p.node));
        e.late = before.late;
    }
    e.summary = describe(e);
    sqlx::query("UPDATE audit SET enforcement = ? WHERE id = ?")
        .bind(crate::store::to_json(&*e))
        .bind(audit_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Completes the enforcement records that name offline peers: a peer that since acknowledged
/// the netmap version carrying the change (or a later one) moves from `pending_offline` to
/// `late`, with the time of its acknowledgement; a peer that left the network moves there as
/// removed. Reads and writes only the store, so it picks up the records of an earlier run.
pub async fn complete_late(store: &Store) -> Result<usize, StoreError> {
    let rows: Vec<(i64, Option<i64>, i64, String)> = sqlx::query_as(
        "SELECT id, network_id, at_ms, enforcement FROM audit
         WHERE enforcement LIKE '%\"pending_offline\"%'",
    )
    .fetch_all(store.pool())
    .await?;
    let mut completed = 0;
    for (id, network, at_ms, json) in rows {
        let Ok(mut e) = serde_json::from_str::<Enforcement>(&json) else {
            warn!(audit = id, "stored enforcement unreadable; left as it is");
            continue;
        };
        let change_ms = u64::try_from(at_ms).unwrap_or(0);
        let had = e.late.len();
        let mut still = Vec::new();
        for p in std::mem::take(&mut e.pending_offline) {
            let row: Option<(i64, Option<i64>)> = sqlx::query_as(
                "SELECT applied_version, applied_at FROM nodes
                 WHERE network_id = ? AND name = ? AND state = 'active'",
            )
            .bind(network)
            .bind(&p.node)
            .fetch_optional(store.pool())
            .await?;
            match row {
                None => e.late.push(LateAck {
                    node: p.node,
                    at_ms: crate::store::unix_now_ms(),
                    after_ms: crate::store::unix_now_ms().saturating_sub(change_ms),
                    removed: true,
                }),
                Some((applied, at)) if applied >= to_i64(p.netmap_version) => {
                    let at_ms = at
                        .and_then(|s| u64::try_from(s).ok())
                        .map_or_else(crate::store::unix_now_ms, |s| s.saturating_mul(1000));
                    info!(audit = id, node = %p.node, "offline peer acknowledged the change");
                    e.late.push(LateAck {
                        node: p.node,
                        at_ms,
                        after_ms: at_ms.saturating_sub(change_ms),
                        removed: false,
                    });
                }
                Some(_) => still.push(p),
            }
        }
        let moved = e.late.len() - had;
        e.pending_offline = still;
        if moved == 0 {
            continue;
        }
        if e.pending_offline.is_empty() {
            // Nobody keeps accepting any more: the warning would now be false.
            e.offline_keeps = None;
        }
        e.summary = describe(&e);
        // Only over the record read: a tracker that wrote meanwhile wins, and the next pass
        // completes its record.
        let mut tx = store.write().await?;
        let done = sqlx::query("UPDATE audit SET enforcement = ? WHERE id = ? AND enforcement = ?")
            .bind(crate::store::to_json(&e))
            .bind(id)
            .bind(&json)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        completed += usize::try_from(done.rows_affected()).unwrap_or(0);
    }
    Ok(completed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, tags: &[&str]) -> Node {
        Node {
            id: NodeId(1),
            network: NetworkId(1),
            name: name.into(),
            namespace: "prod".into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            spiffe_id: format!("spiffe://td/ns/prod/node/{name}"),
            public_key: ztnet_proto::WgKey([1; 32]),
            ipv4: std::net::Ipv4Addr::new(100, 64, 0, 1),
            ipv6: "fd00::1".parse().expect("v6"),
            token_id: None,
            listen_port: 51820,
            endpoints: vec![],
            pinned_endpoint: None,
            endpoint_revision: 0,
            version: String::new(),
            state: "active".into(),
            revoked_at: None,
            revoke_reason: None,
            netmap_version: 0,
            netmap_json: None,
            applied_version: 0,
            applied_at: None,
            last_seen: None,
            created_at: 0,
            key_created_at: 0,
            next_public_key: None,
        }
    }

    fn row(session: &str, started: u64) -> Row {
        Row {
            report: Some(Posture {
                version: "0.1.0".into(),
                ..Posture::default()
            }),
            reported_at: Some(started),
            session_key: Some(session.into()),
            session_started_at: Some(started),
            quarantine: None,
        }
    }

    #[test]
    fn the_shortest_max_session_that_selects_the_node_applies() {
        let policy = Policy::parse(
            "[[posture]]\nselector = [\"tag:db\"]\nmax_session = \"8h\"\n\n\
             [[posture]]\nselector = [\"*\"]\nmax_session = \"10m\"\n\n\
             [[posture]]\nselector = [\"tag:web\"]\nmin_version = \"0.0.1\"\n",
        )
        .expect("policy")
        .policy;
        assert_eq!(max_session_for(&policy, &node("db1", &["db"])), Some(600));
        assert_eq!(max_session_for(&policy, &node("web1", &["web"])), Some(600));
        let only_db = Policy::parse("[[posture]]\nselector = [\"tag:db\"]\nmax_session = \"8h\"\n")
            .expect("policy")
            .policy;
        assert_eq!(max_session_for(&only_db, &node("web1", &["web"])), None);
    }

    #[test]
    fn a_replacement_session_is_young_until_it_reports_and_an_old_one_is_not() {
        let policy = Policy::parse("[[posture]]\nselector = [\"*\"]\nmax_session = \"10s\"\n")
            .expect("policy")
            .policy;
        let db1 = node("db1", &["db"]);
        let old = row("a-1", 1000);
        // Within its life the old session passes; past it, it fails, live or offline.
        assert_eq!(
            judge(Some(&policy), &db1, Some(&old), Some("a-1"), 1010),
            None
        );
        let past = judge(Some(&policy), &db1, Some(&old), Some("a-1"), 1011);
        assert!(past.is_some_and(|w| w.contains("max_session 10 s")));
        assert!(judge(Some(&policy), &db1, Some(&old), None, 1011).is_some());
        // A replacement that has not reported yet is not judged by the old session's age.
        assert_eq!(
            judge(Some(&policy), &db1, Some(&old), Some("a-2"), 1011),
            None
        );
        // Once it reported, its own start counts.
        let new = row("a-2", 1008);
        assert_eq!(
            judge(Some(&policy), &db1, Some(&new), Some("a-2"), 1018),
            None
        );
        assert!(judge(Some(&policy), &db1, Some(&new), Some("a-2"), 1019).is_some());
    }
}
