//! The configuration the data plane runs from. Static mode builds it from a TOML file,
//! coordinator mode from a netmap; the data plane does not know which.
//!
//! CONTRACT between the data plane (issue 3) and the control client (issue 4).

use std::net::SocketAddr;

use ipnet::IpNet;
use netpolicy::FilterSpec;
use ztnet_proto::control::Identity;
use ztnet_proto::{PrivateKey, WgKey};

/// What is fixed for the life of the interface.
#[derive(Debug, Clone)]
pub struct InterfaceConfig {
    /// TUN interface name (default `ztnet0`).
    pub name: String,
    /// MTU (default 1420).
    pub mtu: u16,
    /// UDP listen port (default 51820; 0 picks one).
    pub listen_port: u16,
    /// The node's WireGuard private key.
    pub private_key: PrivateKey,
    /// `static`, `coordinator` or `wireguard`: shown in status.
    pub mode: String,
}

/// What can change at run time; applied atomically by `Dataplane::apply`.
#[derive(Debug, Clone, Default)]
pub struct DataplaneConfig {
    /// Node name, shown in status.
    pub node_name: Option<String>,
    /// Netmap version, shown in status.
    pub version: Option<u64>,
    /// Overlay addresses of this node, with prefix length (e.g. `100.64.0.2/16`).
    pub addresses: Vec<IpNet>,
    /// Prefixes routed through the TUN (e.g. the network's `100.64.0.0/16`).
    pub routes: Vec<IpNet>,
    /// Peers. Names are unique.
    pub peers: Vec<PeerConfig>,
    /// The compiled filter. `FilterSpec::default()` passes nothing.
    pub filter: FilterSpec,
    /// A new private key for the node: `None` keeps the key in force; `Some` replaces it, and
    /// every peer's session is rebuilt on the new static key (endpoints are kept).
    pub private_key: Option<PrivateKey>,
}

/// One peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Peer name: the key into the filter's peers.
    pub name: String,
    /// WireGuard public key.
    pub public_key: WgKey,
    /// Endpoint to send to until the peer roams.
    pub endpoint: Option<SocketAddr>,
    /// Further endpoints to try in turn, after `endpoint`, while handshakes go unanswered.
    /// Empty in static mode; repeats of `endpoint` are ignored.
    pub endpoints: Vec<SocketAddr>,
    /// Cryptokey routing: addresses this peer may send from and is routed to.
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive in seconds.
    pub persistent_keepalive: Option<u16>,
    /// Identity, shown in status.
    pub identity: Option<Identity>,
    /// WireGuard's optional symmetric key mixed into the handshake (plain WireGuard mode).
    pub preshared_key: Option<PresharedKey>,
    /// The key the peer is rotating to (coordinator mode): a handshake under it is accepted
    /// and moves the peer's session to it.
    pub next_public_key: Option<WgKey>,
}

/// A 32-byte preshared key. Never printed: `Debug` shows only that there is one.
#[derive(Clone, PartialEq, Eq, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct PresharedKey(pub [u8; 32]);

impl std::fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PresharedKey(..)")
    }
}
