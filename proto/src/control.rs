//! The control channel between a node and the coordinator.
//!
//! Transport: QUIC with TLS 1.3, ALPN [`crate::CONTROL_ALPN`], server name
//! [`crate::COORDINATOR_SERVER_NAME`]. The coordinator presents `[leaf, CA]`.
//!
//! 1. Enrollment: a node without a certificate connects (no client certificate), checks that the
//!    CA in the server's chain has the token's fingerprint and that the leaf chains to it, opens
//!    one bidirectional stream and sends [`NodeMsg::Enroll`]. The coordinator answers
//!    [`ServerMsg::Enrolled`] or [`ServerMsg::Error`] and closes the connection.
//! 2. Session: the node connects with its node certificate (mutual TLS), opens one bidirectional
//!    stream and sends [`NodeMsg::Hello`]. The coordinator answers with a
//!    [`NetmapUpdate::Full`], then pushes [`NetmapUpdate::Delta`]s on every change that affects
//!    the node. The node sends [`NodeMsg::Ack`] for every version it applied and
//!    [`NodeMsg::Report`] when its endpoints change (and at least every 30 s).
//! 3. Re-authentication: under a `max_session`, a node whose hello set
//!    [`Hello::reauthenticates`] is sent [`ServerMsg::SessionDeadline`]; before it, the node
//!    opens a new session from the same QUIC endpoint with [`Hello::replaces`], which becomes
//!    the node's session at once, and then closes the old connection.
//!
//! Every frame is [`crate::frame`]-encoded JSON.

use std::net::SocketAddr;

use ipnet::IpNet;
use netpolicy::FilterSpec;
use serde::{Deserialize, Serialize};

use crate::WgKey;

/// A netmap version. Per node, only ever grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NetmapVersion(pub u64);

/// Messages from a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NodeMsg {
    /// First message of an enrollment connection.
    Enroll(EnrollRequest),
    /// First message of a session connection.
    Hello(Hello),
    /// The node applied this netmap version.
    Ack {
        /// The version applied.
        version: NetmapVersion,
    },
    /// Endpoints and posture, sent on change and periodically.
    Report(Report),
    /// Asks for a fresh node certificate for a new TLS key (sent at half the certificate's
    /// life, over the session stream).
    Renew {
        /// PEM certificate signing request.
        csr_pem: String,
    },
    /// Proposes a new WireGuard public key (issue 6 rotation). The private key stays on the
    /// node. The coordinator gives it to every peer as [`PeerInfo::next_public_key`], waits for
    /// their acks, then answers [`ServerMsg::SwitchKey`].
    RotateKey {
        /// The new public key.
        public_key: WgKey,
    },
    /// Asks for a full netmap again, because what the node sees contradicts the one it runs
    /// (a peer key mismatch, FC-20). Answered with a [`NetmapUpdate::Full`].
    Resync {
        /// Why, in one sentence: logged by the coordinator.
        reason: String,
    },
    /// The node's posture (issue 6): sent after [`NodeMsg::Hello`], on every report and when it
    /// changes. The coordinator judges it against the policy's `[[posture]]` entries.
    Posture(Posture),
    /// Asks for the workload registrations of this node.
    WorkloadList {
        /// Echoed in the answer.
        request_id: u64,
    },
    /// Asks for an X.509-SVID for a key made on the node; the coordinator signs only a SPIFFE
    /// ID registered for this node.
    SignSvid {
        /// Echoed in the answer.
        request_id: u64,
        /// The SPIFFE ID wanted.
        spiffe_id: String,
        /// PEM certificate signing request for the workload's key.
        csr_pem: String,
    },
    /// The answer to [`ServerMsg::FlowQuery`]: the node's open flows, from a copy of its
    /// filter's flow table.
    Flows {
        /// From the query.
        id: u64,
        /// At most [`MAX_FLOWS_ANSWERED`] live flows.
        flows: Vec<netpolicy::OpenFlow>,
        /// The node had more live flows than it sent.
        #[serde(default)]
        truncated: bool,
    },
}

/// Most flows a node puts in one [`NodeMsg::Flows`]; the coordinator ignores any beyond.
pub const MAX_FLOWS_ANSWERED: usize = 10_000;

/// What a node announces in [`Hello::features`] when it answers [`ServerMsg::FlowQuery`]. The
/// coordinator sends a query only to a session that announced it: a node built before it would
/// take the unknown message for a broken stream and reconnect.
pub const FEATURE_FLOWS: &str = "flows";

/// Messages from the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// Enrollment succeeded.
    Enrolled(EnrollResponse),
    /// A netmap, full or delta.
    Netmap(NetmapUpdate),
    /// A renewed node certificate, with the current trust bundle.
    Renewed {
        /// PEM node certificate.
        cert_pem: String,
        /// PEM CA certificate(s).
        ca_pem: String,
    },
    /// The request was refused; the connection closes after this.
    Error(ControlError),
    /// The answer to [`NodeMsg::WorkloadList`].
    Workloads {
        /// From the request.
        request_id: u64,
        /// Every registration for this node.
        entries: Vec<crate::workload::WorkloadEntry>,
    },
    /// The answer to [`NodeMsg::SignSvid`].
    Svid {
        /// From the request.
        request_id: u64,
        /// PEM X.509-SVID, leaf first.
        cert_pem: String,
        /// PEM CA certificate(s) of the trust domain.
        bundle_pem: String,
    },
    /// Asks the node to rotate its WireGuard key now (`ztnet node rotate-key`): it answers
    /// with [`NodeMsg::RotateKey`].
    RotateKey,
    /// Every connected peer holds `public_key` as this node's next key: the node switches to
    /// it now and initiates handshakes. A key other than the one the node proposed is ignored.
    SwitchKey {
        /// The key proposed in [`NodeMsg::RotateKey`].
        public_key: WgKey,
    },
    /// A [`NodeMsg::RotateKey`] refused (a key already in use, say); the old key stays.
    RotateRefused {
        /// Why.
        error: ControlError,
    },
    /// This session is closed with `reauthenticate` `remaining_secs` from now, because a
    /// `[[posture]]` entry's `max_session` (`max_session_secs`) selects the node. Sent only to a
    /// node whose hello said [`Hello::reauthenticates`], when the session's first posture is in
    /// and when the deadline changes; the node opens a new session before it.
    SessionDeadline {
        /// The `max_session` that applies, in seconds.
        max_session_secs: u64,
        /// Seconds left, by the coordinator's clock, when this was sent.
        remaining_secs: u64,
    },
    /// A [`NodeMsg::WorkloadList`] or [`NodeMsg::SignSvid`] refused; the session goes on.
    WorkloadRefused {
        /// From the request.
        request_id: u64,
        /// Why.
        error: ControlError,
    },
    /// Asks for the node's open flows (`ztnet policy diff`): answered with
    /// [`NodeMsg::Flows`]. Sent only to sessions whose hello announced [`FEATURE_FLOWS`].
    FlowQuery {
        /// Echoed in the answer.
        id: u64,
    },
}

/// An enrollment request. The private keys stay on the node: only public keys and a CSR go.
/// Its `Debug` hides the token secret.
#[derive(Clone, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// Protocol version of the node.
    pub protocol: u32,
    /// The join token's secret.
    pub token_secret: String,
    /// Requested node name (unique in the network, case-insensitive).
    pub name: String,
    /// The node's WireGuard public key.
    pub wg_public_key: WgKey,
    /// PEM certificate signing request for the node's TLS key.
    pub csr_pem: String,
    /// The node's WireGuard listen port.
    pub listen_port: u16,
    /// Addresses the node sees on its own interfaces, with the listen port.
    pub endpoints: Vec<SocketAddr>,
    /// ztnet-node version string.
    pub version: String,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("protocol", &self.protocol)
            .field("token_secret", &"redacted")
            .field("name", &self.name)
            .field("wg_public_key", &self.wg_public_key)
            .field("listen_port", &self.listen_port)
            .field("endpoints", &self.endpoints)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// What an enrolled node gets back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// Node name as recorded.
    pub name: String,
    /// Network name.
    pub network: String,
    /// SPIFFE ID of the node.
    pub spiffe_id: String,
    /// PEM node certificate (URI SAN = SPIFFE ID).
    pub cert_pem: String,
    /// PEM CA certificate(s): the trust bundle.
    pub ca_pem: String,
    /// The node's overlay addresses, with the network's prefix length.
    pub addresses: Vec<IpNet>,
}

/// First message of a session connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version of the node.
    pub protocol: u32,
    /// The netmap version the node currently runs, if any (from its state directory).
    pub have_version: Option<NetmapVersion>,
    /// Endpoints and posture.
    pub report: Report,
    /// The node opens a new session by itself before a [`ServerMsg::SessionDeadline`]; only
    /// such a node is sent one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reauthenticates: bool,
    /// This session replaces a live session of the same node ahead of its deadline (a
    /// re-authentication), over the same QUIC endpoint; the old one closes once this is up.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replaces: bool,
    /// Optional messages this node understands ([`FEATURE_FLOWS`]). Empty from a node built
    /// before them, and ignored by a coordinator built before them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

impl Hello {
    /// Whether the node announced a feature.
    pub fn has_feature(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
}

/// A node's view of itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// WireGuard listen port.
    pub listen_port: u16,
    /// Local interface addresses with the listen port.
    pub endpoints: Vec<SocketAddr>,
    /// ztnet-node version.
    pub version: String,
}

/// What a node reports about itself for posture checks. Facts come from the operator's
/// `--posture-file` or `--posture-command`; `kernel` and `os` from the node itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posture {
    /// ztnet-node version.
    pub version: String,
    /// Kernel release (`uname -r`).
    #[serde(default)]
    pub kernel: String,
    /// Operating system (`PRETTY_NAME` of os-release).
    #[serde(default)]
    pub os: String,
    /// Operator-defined facts, name to value.
    #[serde(default)]
    pub facts: std::collections::BTreeMap<String, String>,
    /// Why the operator's facts could not be read, when they could not (the facts are then
    /// empty, which fails any entry that requires one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A refusal on the control channel.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ControlError {
    /// Stable code: `token-invalid`, `token-expired`, `token-used-up`, `name-taken`,
    /// `revoked`, `unknown-node`, `bad-request`, `protocol`, `internal`; on an expired node
    /// certificate `cert-expired`, `cert-key-mismatch` (not the node's TLS key on record) and
    /// `renewal-only`; `reauthenticate` for a session past its `max_session`.
    pub code: String,
    /// Readable reason.
    pub message: String,
}

/// A netmap push.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NetmapUpdate {
    /// Replaces everything.
    Full(Netmap),
    /// Changes relative to `from`.
    Delta(NetmapDelta),
}

/// Everything one node is told: itself, its peers (only those policy lets it talk to) and its
/// compiled filter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Netmap {
    /// Version of this netmap.
    pub version: NetmapVersion,
    /// Network name.
    pub network: String,
    /// The node itself.
    pub node: SelfInfo,
    /// Peers, sorted by name.
    pub peers: Vec<PeerInfo>,
    /// The node's compiled filter.
    pub filter: FilterSpec,
    /// Unix seconds after which the node must stop using this netmap (fail closed).
    pub expires_at: u64,
    /// The trust bundle: every CA the node must trust for the control channel, PEM. The node
    /// saves it to its `ca.pem` before it acknowledges the version. `None` from a coordinator
    /// that does not send it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_pem: Option<String>,
}

/// Changes to a netmap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetmapDelta {
    /// The version this delta applies to. A node that runs another version asks for a full one
    /// by reconnecting.
    pub from: NetmapVersion,
    /// The version after this delta.
    pub version: NetmapVersion,
    /// Peers added or changed (replaced whole).
    pub upsert_peers: Vec<PeerInfo>,
    /// Names of peers removed.
    pub remove_peers: Vec<String>,
    /// A new filter, if it changed.
    pub filter: Option<FilterSpec>,
    /// A new self description, if it changed.
    pub node: Option<SelfInfo>,
    /// New expiry.
    pub expires_at: u64,
    /// A new trust bundle, if it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_pem: Option<String>,
}

impl Netmap {
    /// Applies a delta. Refuses one that does not start at this version.
    pub fn apply(&mut self, delta: &NetmapDelta) -> Result<(), ControlError> {
        if delta.from != self.version || delta.version <= self.version {
            return Err(ControlError {
                code: "protocol".into(),
                message: format!(
                    "delta {}->{} does not apply to version {}",
                    delta.from.0, delta.version.0, self.version.0
                ),
            });
        }
        self.peers.retain(|p| !delta.remove_peers.contains(&p.name));
        for p in &delta.upsert_peers {
            match self.peers.iter_mut().find(|q| q.name == p.name) {
                Some(q) => *q = p.clone(),
                None => self.peers.push(p.clone()),
            }
        }
        self.peers.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(f) = &delta.filter {
            self.filter = f.clone();
        }
        if let Some(n) = &delta.node {
            self.node = n.clone();
        }
        if let Some(b) = &delta.bundle_pem {
            self.bundle_pem = Some(b.clone());
        }
        self.version = delta.version;
        self.expires_at = delta.expires_at;
        Ok(())
    }

    /// The delta that turns `old` into `self`, or `None` when nothing but the version differs.
    pub fn delta_from(&self, old: &Netmap) -> NetmapDelta {
        let upsert_peers = self
            .peers
            .iter()
            .filter(|p| !old.peers.iter().any(|q| q == *p))
            .cloned()
            .collect();
        let remove_peers = old
            .peers
            .iter()
            .filter(|q| !self.peers.iter().any(|p| p.name == q.name))
            .map(|q| q.name.clone())
            .collect();
        NetmapDelta {
            from: old.version,
            version: self.version,
            upsert_peers,
            remove_peers,
            filter: (self.filter != old.filter).then(|| self.filter.clone()),
            node: (self.node != old.node).then(|| self.node.clone()),
            expires_at: self.expires_at,
            bundle_pem: (self.bundle_pem != old.bundle_pem)
                .then(|| self.bundle_pem.clone())
                .flatten(),
        }
    }
}

/// The node itself, as the coordinator knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfInfo {
    /// Node name.
    pub name: String,
    /// Identity.
    pub identity: Identity,
    /// Overlay addresses with the network prefix length (e.g. `100.64.0.2/16`).
    pub addresses: Vec<IpNet>,
    /// The network's prefixes, routed through the TUN.
    pub routes: Vec<IpNet>,
    /// Unix seconds at which this node's WireGuard key expires (zero-trust networks only):
    /// its peers drop it then, by their own clocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_expires_at: Option<u64>,
    /// Unix seconds from which the node should rotate its key (half its life).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_rotate_at: Option<u64>,
    /// Why this node is quarantined (it fails a `[[posture]]` entry), when it is: its netmap
    /// then has no peers and no peer's netmap has it, until it passes again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<String>,
}

/// What policy selects on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// Namespace.
    pub namespace: String,
    /// Tags without prefix.
    pub tags: Vec<String>,
}

/// One peer in a netmap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Peer node name (the key used in [`FilterSpec::peers`]).
    pub name: String,
    /// Its WireGuard public key.
    pub public_key: WgKey,
    /// Endpoints to try, best first (admin-pinned, then observed, then reported).
    pub endpoints: Vec<SocketAddr>,
    /// Its overlay addresses and routed prefixes (cryptokey routing).
    pub allowed_ips: Vec<IpNet>,
    /// Its identity.
    pub identity: Identity,
    /// Unix seconds at which its key expires (zero-trust networks only): from then on the
    /// node drops this peer by its own clock, whether the coordinator is reachable or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_expires_at: Option<u64>,
    /// The key the peer is rotating to: a handshake under it is accepted too, and then
    /// replaces `public_key` for this peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<WgKey>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_without_features_still_reads_and_a_flow_answer_round_trips() {
        let old = r#"{"type":"hello","protocol":1,"have_version":null,
                      "report":{"listen_port":1,"endpoints":[],"version":"0.1.0"}}"#;
        let NodeMsg::Hello(h) = serde_json::from_str::<NodeMsg>(old).expect("an old hello") else {
            panic!("not a hello");
        };
        assert!(h.features.is_empty() && !h.has_feature(FEATURE_FLOWS));

        let query = serde_json::to_string(&ServerMsg::FlowQuery { id: 7 }).expect("encodes");
        assert_eq!(query, r#"{"type":"flow_query","id":7}"#);
        let answer = r#"{"type":"flows","id":7,"flows":[{"peer":"n2","opened_by":"local",
            "proto":6,"initiator":"100.64.0.1","initiator_port":40000,
            "responder":"100.64.0.2","responder_port":5432,"state":"established",
            "idle_secs":3}]}"#;
        match serde_json::from_str::<NodeMsg>(answer).expect("a flow answer") {
            NodeMsg::Flows {
                id,
                flows,
                truncated,
            } => {
                assert_eq!((id, flows.len(), truncated), (7, 1, false));
                assert_eq!(flows[0].port_label(), "tcp:5432");
            }
            other => panic!("not flows: {other:?}"),
        }
    }

    #[test]
    fn an_unknown_message_type_does_not_parse_so_queries_need_the_feature() {
        // What a node built before the flow query does with one: a malformed frame.
        #[derive(Debug, Deserialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        enum OldServerMsg {
            #[allow(dead_code, reason = "only the variant's existence matters")]
            RotateKey,
        }
        assert!(serde_json::from_str::<OldServerMsg>(r#"{"type":"flow_query","id":1}"#).is_err());
    }
}
