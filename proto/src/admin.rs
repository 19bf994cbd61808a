//! The admin API: HTTP/1.1 + JSON over TLS on the coordinator's TCP port, bearer API keys
//! (`Authorization: Bearer ztkey_...`). Errors come back as [`ApiError`] with the HTTP status.
//!
//! | method and path | body | answer |
//! | --- | --- | --- |
//! | `POST /v1/networks` | [`CreateNetwork`] | [`Network`] |
//! | `GET /v1/networks` | | `Vec<Network>` |
//! | `GET /v1/networks/{net}` | | [`Network`] |
//! | `PATCH /v1/networks/{net}` | [`NetworkSettings`] | [`Network`] |
//! | `POST /v1/networks/{net}/tokens` | [`CreateToken`] | [`TokenCreated`] |
//! | `GET /v1/networks/{net}/tokens` | | `Vec<TokenInfo>` |
//! | `DELETE /v1/networks/{net}/tokens/{id}` | | [`TokenInfo`] |
//! | `GET /v1/networks/{net}/nodes` | | `Vec<NodeInfo>` |
//! | `GET /v1/networks/{net}/nodes/{name}` | | [`NodeInfo`] |
//! | `DELETE /v1/networks/{net}/nodes/{name}` | | [`NodeInfo`] |
//! | `POST /v1/networks/{net}/nodes/{name}/revoke` | [`RevokeNode`] | [`NodeInfo`] (state `revoked`) |
//! | `POST /v1/networks/{net}/nodes/{name}/rotate-key` | [`RotateKey`] | [`NodeInfo`] (409 when the node is offline) |
//! | `PUT /v1/networks/{net}/nodes/{name}/endpoint` | [`SetEndpoint`] | [`NodeInfo`] (409 when `expected_revision` is stale) |
//! | `PUT /v1/networks/{net}/policy` | [`ApplyPolicy`] | [`PolicyApplied`] (422 with [`ApiError::diagnostics`] when refused) |
//! | `GET /v1/networks/{net}/policy` | | [`PolicyRecord`] |
//! | `GET /v1/networks/{net}/policy/history` | | `Vec<PolicyRecord>` |
//! | `POST /v1/networks/{net}/policy/preview` | [`ApplyPolicy`] | [`PolicyPreview`] (422 as an apply when refused; changes nothing) |
//! | `GET /v1/networks/{net}/audit` | | `Vec<AuditEvent>` |
//! | `GET /v1/audit` | | `Vec<AuditEvent>`: the entries of no network (API keys, CA) |
//! | `GET /v1/health` (no auth) | | [`Health`] |

use std::net::SocketAddr;

use ipnet::IpNet;
use netpolicy::Diagnostic;
use serde::{Deserialize, Serialize};

use crate::WgKey;

/// Body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("{message} (HTTP {status})")]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// One readable sentence.
    pub message: String,
    /// Policy findings, when a policy was refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub diagnostics: Vec<Diagnostic>,
}

/// `POST /v1/networks`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateNetwork {
    /// Name, `[a-z0-9-]`, 1 to 63 characters.
    pub name: String,
    /// IPv4 overlay prefix inside 100.64.0.0/10; default 100.64.0.0/16 (the next free one).
    pub cidr: Option<IpNet>,
    /// Zero-trust mode: default deny, expiring keys, mandatory identity checks.
    pub zero_trust: bool,
}

/// A network.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Network {
    /// Name.
    pub name: String,
    /// IPv4 overlay prefix.
    pub cidr: IpNet,
    /// IPv6 ULA overlay prefix.
    pub cidr6: IpNet,
    /// Zero-trust mode.
    pub zero_trust: bool,
    /// Number of nodes.
    pub nodes: u64,
    /// Current policy version, 0 when none was applied (deny all).
    pub policy_version: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// Life of a node's WireGuard key in seconds (zero-trust networks; 0 = keys never expire).
    #[serde(default)]
    pub key_ttl_secs: u64,
}

/// `PATCH /v1/networks/{net}`: changes a network's settings; absent fields stay as they are.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSettings {
    /// Life of a node's WireGuard key in seconds (at least 10, at most 30 days). Only a
    /// zero-trust network's keys expire.
    #[serde(default)]
    pub key_ttl_secs: Option<u64>,
}

/// `POST /v1/networks/{net}/nodes/{name}/rotate-key`: asks the node to rotate its WireGuard
/// key now. Answered once the coordinator passed the request on (the node must be online).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateKey {
    /// `peers-first` (default: peers learn the new key, then the node switches) or
    /// `node-first` (the node switches, then peers learn it: a drill for FC-19).
    #[serde(default)]
    pub order: Option<String>,
    /// Seconds to wait between the two steps (default 0, at most 60).
    #[serde(default)]
    pub gap_secs: Option<u64>,
}

/// `POST /v1/networks/{net}/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Namespace that enrolled nodes get.
    pub namespace: String,
    /// Tags that enrolled nodes get.
    pub tags: Vec<String>,
    /// Number of enrollments allowed (default 1).
    pub uses: u32,
    /// Lifetime in seconds (default 3600).
    pub ttl_secs: u64,
}

/// The answer to a token creation: the only time the token string is shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    /// The token's record.
    pub info: TokenInfo,
    /// The join token (`ztjoin1_...`). Contains the secret.
    pub token: String,
}

/// A token's record (never its secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Short public id (first 12 hex digits of the secret's hash).
    pub id: String,
    /// Network name.
    pub network: String,
    /// Namespace.
    pub namespace: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Uses allowed in all.
    pub uses: u32,
    /// Uses left.
    pub uses_left: u32,
    /// Unix seconds.
    pub expires_at: u64,
    /// Revoked by an operator.
    pub revoked: bool,
    /// Names of nodes that enrolled with it.
    pub used_by: Vec<String>,
    /// Who made it (API key name).
    pub created_by: String,
}

/// A node's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Name.
    pub name: String,
    /// Network.
    pub network: String,
    /// Namespace.
    pub namespace: String,
    /// Tags.
    pub tags: Vec<String>,
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// Overlay addresses.
    pub addresses: Vec<IpNet>,
    /// WireGuard public key.
    pub public_key: WgKey,
    /// Endpoints: the address the coordinator observed first, then the reported ones.
    pub endpoints: Vec<SocketAddr>,
    /// Endpoint pinned by an operator; peers try it first, whatever the node reports.
    #[serde(default)]
    pub pinned_endpoint: Option<SocketAddr>,
    /// Revision of `pinned_endpoint`, raised by every change (for [`SetEndpoint`]).
    #[serde(default)]
    pub endpoint_revision: u64,
    /// Whether its control channel is connected now.
    pub online: bool,
    /// Unix seconds of the last message, if any.
    pub last_seen: Option<u64>,
    /// Latest netmap version computed for it.
    pub netmap_version: u64,
    /// Version it acknowledged.
    pub applied_version: u64,
    /// Unix seconds of that acknowledgement.
    pub applied_at: Option<u64>,
    /// ztnet-node version it reported.
    pub version: String,
    /// `active` or `revoked` (later also `quarantined`).
    pub state: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds of the revocation, for a revoked node.
    #[serde(default)]
    pub revoked_at: Option<u64>,
    /// The reason given for the revocation, for a revoked node.
    #[serde(default)]
    pub revoke_reason: Option<String>,
    /// Why the node is quarantined (it fails a `[[posture]]` entry and is in no peer's
    /// netmap), when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<String>,
    /// Its last posture report, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub posture: Option<crate::control::Posture>,
    /// Unix seconds when its WireGuard key was made (enrollment or last rotation).
    #[serde(default)]
    pub key_created_at: u64,
    /// Unix seconds when that key expires; `None` where keys do not expire (a network without
    /// `--zero-trust`). The node rotates it at half its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_expires_at: Option<u64>,
    /// In the answer to a revoke or a delete: which peers the change reached at once, and
    /// which hold it still because they are offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reach: Option<Reach>,
}

/// Where a change that takes access away went when it was made: the peers whose netmap it
/// altered, split into those connected (sent at once; the audit entry's enforcement says when
/// they acknowledged) and those offline, which keep their last netmap (fail-static) until they
/// reconnect.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reach {
    /// The audit entry whose `enforcement` is measured.
    pub audit_id: u64,
    /// Connected peers the new netmap was sent to.
    pub connected: Vec<String>,
    /// Peers whose netmap the change altered but that are offline.
    pub offline: Vec<OfflinePeer>,
    /// For a node's removal in a zero-trust network: Unix seconds when its key expires, after
    /// which an offline peer drops it by its own clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_key_expires_at: Option<u64>,
}

/// A peer whose netmap a change altered while it was offline: it still enforces the old one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfflinePeer {
    /// Node name.
    pub node: String,
    /// Unix seconds of its last message to the coordinator, if any.
    #[serde(default)]
    pub last_seen: Option<u64>,
    /// The netmap version that carries the change; the change holds on it once it
    /// acknowledges this version (or a later one).
    pub netmap_version: u64,
}

/// An offline peer that later acknowledged the netmap carrying a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LateAck {
    /// Node name.
    pub node: String,
    /// Unix milliseconds of its acknowledgement (the coordinator stores it to the second).
    pub at_ms: u64,
    /// Milliseconds from the change to that acknowledgement.
    pub after_ms: u64,
    /// It left the network (deleted or revoked) before it acknowledged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
}

/// `POST /v1/networks/{net}/nodes/{name}/revoke`: the node leaves every netmap, its control
/// channel is closed with `revoked`, and its certificate and WireGuard key are refused from
/// then on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeNode {
    /// Why, recorded in the node and the audit log.
    #[serde(default)]
    pub reason: Option<String>,
}

/// `PUT /v1/networks/{net}/nodes/{name}/endpoint`: pins (or with `None` clears) the endpoint
/// that peers try first (FC-30: the operator's value wins over what the node reports).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetEndpoint {
    /// The endpoint, or `None` to clear the pin.
    pub endpoint: Option<SocketAddr>,
    /// When given, the change applies only if the pin is still at this revision (else 409).
    #[serde(default)]
    pub expected_revision: Option<u64>,
}

/// `PUT /v1/networks/{net}/policy`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyPolicy {
    /// The TOML document.
    pub source: String,
}

/// The answer to a policy apply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyApplied {
    /// New policy version.
    pub version: u64,
    /// Warnings found while validating.
    pub warnings: Vec<Diagnostic>,
    /// Number of `[[test]]` entries that ran (all passed).
    pub tests_passed: usize,
    /// Nodes whose netmap changed, with the netmap version each must acknowledge.
    pub pending: Vec<PendingAck>,
    /// The same nodes split into connected and offline (an offline one keeps the old policy
    /// until it reconnects); `None` from an older coordinator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reach: Option<Reach>,
}

/// What a candidate policy would do to the network now, before an apply: the open flows it
/// would cut, and the nodes its `[[posture]]` entries would quarantine or release.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyPreview {
    /// The version in force, 0 when none is (deny all).
    pub policy_version: u64,
    /// Distinct open flows the nodes reported (a flow seen by both its ends counts once).
    pub open_flows: usize,
    /// The open flows the candidate would cut, sorted.
    pub cut: Vec<CutFlow>,
    /// Active nodes whose open flows are not known, and why.
    pub not_reported: Vec<NotReported>,
    /// Nodes that had more open flows than they could send; flows beyond are not judged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub truncated: Vec<String>,
    /// Nodes the candidate's `[[posture]]` entries would quarantine or release, judged on their
    /// last posture reports.
    pub posture: Vec<PostureChange>,
    /// The candidate's warnings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<Diagnostic>,
}

/// An open flow that a candidate policy would cut.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutFlow {
    /// The node that opened it.
    pub from: String,
    /// The node it was opened towards.
    pub to: String,
    /// What the policy judges it by: `tcp:5432`, `udp:53`, `icmp`, `proto 47`.
    pub port: String,
    /// The opener's address.
    pub from_addr: std::net::IpAddr,
    /// The opener's port (TCP, UDP) or echo id; 0 otherwise.
    pub from_port: u16,
    /// The other side's address.
    pub to_addr: std::net::IpAddr,
    /// The other side's port (TCP, UDP); 0 otherwise.
    pub to_port: u16,
    /// Where the flow stands.
    pub state: netpolicy::FlowState,
    /// Seconds since its last packet, as the reporting node saw it.
    pub idle_secs: u64,
    /// Why it would stop, in one sentence.
    pub reason: String,
    /// The nodes that reported it (one or both ends).
    pub reported_by: Vec<String>,
}

/// An active node whose open flows a preview does not know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotReported {
    /// Node name.
    pub node: String,
    /// `offline`, `no answer within 2 s`, or that its ztnet-node does not answer the query.
    pub reason: String,
}

/// A node whose quarantine a candidate policy would change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostureChange {
    /// Node name.
    pub node: String,
    /// `quarantine` (it would leave every netmap) or `release` (it would come back).
    pub change: String,
    /// For a quarantine, the entry it would fail and why; for a release, why it is
    /// quarantined now.
    pub reason: String,
}

/// A node that must acknowledge a netmap version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingAck {
    /// Node name.
    pub node: String,
    /// The version it must reach.
    pub netmap_version: u64,
}

/// A stored policy version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// Version, from 1.
    pub version: u64,
    /// The TOML document.
    pub source: String,
    /// Unix seconds.
    pub applied_at: u64,
    /// API key name that applied it.
    pub applied_by: String,
    /// Whether this version is the one in force.
    pub active: bool,
}

/// One audit log entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Sequence number.
    pub id: u64,
    /// Unix milliseconds.
    pub at_ms: u64,
    /// Who: API key name, `node:NAME` or `coordinator`.
    pub actor: String,
    /// What: `network.create`, `token.create`, `token.revoke`, `node.enroll`, `node.delete`,
    /// `node.revoke`, `node.set-endpoint`, `policy.apply`, `policy.refuse`, ...
    pub action: String,
    /// The object acted on.
    pub target: String,
    /// Details, readable.
    pub detail: String,
    /// For a change that takes access away or changes it (a revoke, a quarantine, a policy
    /// apply): how it was enforced, once every affected peer acknowledged the netmap that
    /// enforces it, or why it was not measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
}

/// The measured time to enforcement of one audited change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enforcement {
    /// Milliseconds from the change (its audit entry) to the last acknowledgement by an
    /// affected peer; `None` while waiting, or when not every peer acknowledged in time.
    pub ms: Option<u64>,
    /// Connected peers that had to acknowledge.
    pub peers: u32,
    /// Of those, how many did.
    pub acknowledged: u32,
    /// Readable: `enforced in 12 ms by 19 peers`, `waiting`, `2 of 19 peers did not
    /// acknowledge within 30 s: db1, web2`, and the offline peers that do not have it yet.
    pub summary: String,
    /// Peers whose netmap the change altered but that were offline: they keep their last
    /// netmap until they reconnect and acknowledge. Not counted in `peers` or `ms`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_offline: Vec<OfflinePeer>,
    /// Offline peers that acknowledged later, moved here from `pending_offline`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub late: Vec<LateAck>,
    /// Connected peers that did not acknowledge within the tracking time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unacknowledged: Vec<String>,
    /// What a peer in `pending_offline` goes on doing until it acknowledges, in words:
    /// `it still accepts r1 until it reconnects or r1's key expires at ...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_keeps: Option<String>,
}

/// `POST /v1/api-keys`: makes another admin API key. The key is in the answer only; the
/// coordinator keeps its SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateApiKey {
    /// Its name, unique for good (a revoked key keeps its name): letters, digits, `.`, `_`, `-`.
    pub name: String,
}

/// One admin API key, without the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyInfo {
    /// Name; the audit log's actor for everything done with it.
    pub name: String,
    /// Unix seconds.
    pub created_at: u64,
    /// The key that made it, or `coordinator` for the first one.
    pub created_by: String,
    /// Unix seconds of its revocation: from then on it gets 401.
    #[serde(default)]
    pub revoked_at: Option<u64>,
    /// Who revoked it.
    #[serde(default)]
    pub revoked_by: Option<String>,
}

/// The answer to [`CreateApiKey`]. Its `Debug` hides the key.
#[derive(Clone, Serialize, Deserialize)]
pub struct ApiKeyCreated {
    /// The key.
    pub info: ApiKeyInfo,
    /// `ztkey_...`: shown this once.
    pub key: String,
}

impl std::fmt::Debug for ApiKeyCreated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyCreated")
            .field("info", &self.info)
            .field("key", &"redacted")
            .finish()
    }
}

/// `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    /// `ok` or `degraded`.
    pub status: String,
    /// Problems an operator must look at (e.g. a stored policy that no longer validates).
    pub problems: Vec<String>,
    /// Coordinator version.
    pub version: String,
    /// Control sessions that replaced a live session of the same node from another address
    /// since start: a rising count means two machines share one node's identity.
    #[serde(default)]
    pub identity_conflicts: u64,
}
