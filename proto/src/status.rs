//! A node's local status socket (`/var/run/ztnet/IFACE.sock`, mode 0600): the client writes one
//! line `status\n`, the node answers one JSON [`StatusReport`] and closes.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::WgKey;
use crate::control::Identity;

/// Directory of the status sockets.
pub const STATUS_DIR: &str = "/var/run/ztnet";

/// Everything `ztnet status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    /// TUN interface name.
    pub interface: String,
    /// Node name, when known.
    pub node: Option<String>,
    /// Mode: `static`, `coordinator` or `wireguard`.
    pub mode: String,
    /// The node's public key.
    pub public_key: WgKey,
    /// UDP listen port.
    pub listen_port: u16,
    /// Overlay addresses.
    pub addresses: Vec<IpNet>,
    /// Netmap version in force, if any.
    pub netmap_version: Option<u64>,
    /// Whether the control channel is up (coordinator mode only).
    pub control_connected: Option<bool>,
    /// Peers, sorted by name.
    pub peers: Vec<PeerStatus>,
    /// Dropped packets by reason.
    pub drops: BTreeMap<String, u64>,
    /// Problems in the configuration in force (two peers claiming one prefix, a repeated
    /// key). Absent from older nodes.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Static mode: the files in force, when they were loaded, and the last refused reload.
    /// Absent from older nodes and in the other modes.
    #[serde(default)]
    pub config_source: Option<ConfigSource>,
    /// Datagrams the kernel dropped on the node's UDP socket because its receive buffer was
    /// full (the `drops` column of `/proc/net/udp`), since the socket was opened. `None` when
    /// it could not be read (and from older nodes).
    #[serde(default)]
    pub socket_drops: Option<u64>,
}

/// A reload that was refused: the configuration before it stayed in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedReload {
    /// When (Unix seconds).
    pub at: u64,
    /// Why, as the node logged it (`node.toml:3:14: ...`).
    pub error: String,
}

/// Where a static-mode node's configuration came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSource {
    /// The `node.toml` in force, as given on the command line.
    pub file: String,
    /// Its policy file, resolved against the config file's directory; `None`: none (every
    /// packet is dropped).
    pub policy_file: Option<String>,
    /// When the configuration in force was loaded (Unix seconds).
    pub loaded_at: u64,
    /// The last reload that was refused after that load, if any.
    pub refused: Option<RefusedReload>,
    /// Settings the file changes that take effect only at a restart (`listen_port 51820 ->
    /// 51821`); the running ones stay until then.
    #[serde(default)]
    pub pending_restart: Vec<String>,
}

/// One peer's live state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Peer name.
    pub name: String,
    /// Identity.
    pub identity: Option<Identity>,
    /// Public key.
    pub public_key: WgKey,
    /// Current endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Allowed addresses.
    pub allowed_ips: Vec<IpNet>,
    /// Unix seconds of the last completed handshake.
    pub last_handshake: Option<u64>,
    /// Bytes received from the peer (decrypted).
    pub rx_bytes: u64,
    /// Bytes sent to the peer (before encryption).
    pub tx_bytes: u64,
    /// Handshake initiations this node sent to the peer. Absent from older nodes.
    #[serde(default)]
    pub initiations_sent: u64,
    /// Handshake initiations from the peer that reached its session. Absent from older nodes.
    #[serde(default)]
    pub initiations_received: u64,
    /// Initiations this node held back so as not to cross the peer's (FC-26). Absent from
    /// older nodes.
    #[serde(default)]
    pub initiations_held: u64,
    /// The largest inner packet that reaches the peer whole, as probed through the tunnel
    /// over an IPv6 underlay (FC-23); `None` when not measured. Absent from older nodes.
    #[serde(default)]
    pub path_mtu: Option<u16>,
    /// Where the path MTU measurement stands. Absent from older nodes.
    #[serde(default)]
    pub path_mtu_state: PathMtuState,
}

/// Where a peer's path MTU measurement stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathMtuState {
    /// Not measured: an IPv4 underlay (routers fragment), no endpoint, or plain WireGuard
    /// mode. The configured MTU stands.
    #[default]
    NotProbed,
    /// The first search is under way, or waits for a session; the configured MTU stands until
    /// it ends.
    Probing,
    /// The peer answered no probe in this session (a stock WireGuard peer): the configured
    /// MTU stands.
    PeerDoesNotProbe,
    /// `path_mtu` holds the result.
    Learned,
}

impl PathMtuState {
    /// How `ztnet status` shows it, with the learned MTU.
    pub fn describe(self, mtu: Option<u16>) -> String {
        match (self, mtu) {
            (PathMtuState::Learned, Some(m)) => m.to_string(),
            (PathMtuState::Learned, None) => "learned".into(),
            (PathMtuState::Probing, _) => "probing".into(),
            (PathMtuState::PeerDoesNotProbe, _) => "peer does not probe".into(),
            (PathMtuState::NotProbed, _) => "not probed".into(),
        }
    }
}
