//! Building each node's netmap from the network's nodes and its compiled policy. Pure: no I/O,
//! no clock (the expiry comes in as an argument).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netpolicy::{CompiledNetwork, Inventory, NodeIdentity};
use ztnet_proto::control::{Identity, Netmap, NetmapVersion, PeerInfo, SelfInfo};

use crate::store::networks::Network;
use crate::store::nodes::Node;

/// Most endpoints kept per node.
pub const MAX_ENDPOINTS: usize = 16;

/// The inventory that policy compiles over: every active node with its host prefixes.
pub fn inventory(nodes: &[Node]) -> Inventory {
    Inventory {
        nodes: nodes
            .iter()
            .map(|n| NodeIdentity {
                name: n.name.clone(),
                namespace: n.namespace.clone(),
                tags: n.tags.clone(),
                spiffe_id: n.spiffe_id.clone(),
                addresses: host_prefixes(n),
                routes: Vec::new(),
            })
            .collect(),
    }
}

/// How long node keys live, and the time to judge them at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyLife {
    /// Key life in seconds; 0 when keys do not expire (a network without `--zero-trust`).
    pub ttl: u64,
    /// Unix seconds now.
    pub now: u64,
}

impl KeyLife {
    /// Whether `node`'s key has expired.
    pub fn expired(&self, node: &Node) -> bool {
        node.key_expires_at(self.ttl)
            .is_some_and(|at| at <= self.now)
    }

    /// When `node` should rotate its key: half its life.
    pub fn rotate_at(&self, node: &Node) -> Option<u64> {
        (self.ttl > 0).then(|| node.key_created_at.saturating_add(self.ttl / 2))
    }
}

/// Every node's netmap, by node name, with version 0 (the caller numbers them). A node's peers
/// are exactly the keys of its compiled filter; a node without a filter gets no peers. A node
/// whose key expired is no one's peer, and has no peers itself, until it rotates.
pub fn build(
    network: &Network,
    nodes: &[Node],
    compiled: &CompiledNetwork,
    expires_at: u64,
    keys: KeyLife,
) -> BTreeMap<String, Netmap> {
    let by_name: BTreeMap<&str, &Node> = nodes
        .iter()
        .filter(|n| !keys.expired(n))
        .map(|n| (n.name.as_str(), n))
        .collect();
    let mut out = BTreeMap::new();
    for node in nodes {
        let expired = keys.expired(node);
        let filter = compiled
            .filters
            .get(&node.name)
            .cloned()
            .unwrap_or_default();
        let mut peers: Vec<PeerInfo> = filter
            .peers
            .keys()
            .filter(|name| name.as_str() != node.name && !expired)
            .filter_map(|name| by_name.get(name.as_str()))
            .map(|peer| PeerInfo {
                name: peer.name.clone(),
                public_key: peer.public_key,
                endpoints: peer_endpoints(peer),
                allowed_ips: host_prefixes(peer),
                identity: identity(peer),
                key_expires_at: peer.key_expires_at(keys.ttl),
                next_public_key: peer.next_public_key,
            })
            .collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        let netmap = Netmap {
            version: NetmapVersion(0),
            network: network.name.clone(),
            node: SelfInfo {
                name: node.name.clone(),
                identity: identity(node),
                addresses: vec![
                    IpNet::V4(prefixed4(node.ipv4, network.cidr)),
                    IpNet::V6(prefixed6(node.ipv6, network.cidr6)),
                ],
                routes: vec![IpNet::V4(network.cidr), IpNet::V6(network.cidr6)],
                key_expires_at: node.key_expires_at(keys.ttl),
                key_rotate_at: keys.rotate_at(node),
                quarantine: None,
            },
            peers,
            filter,
            expires_at,
            bundle_pem: None,
        };
        out.insert(node.name.clone(), netmap);
    }
    out
}

/// True when two netmaps say the same thing (versions and expiry aside).
pub fn same_content(a: &Netmap, b: &Netmap) -> bool {
    a.network == b.network
        && a.node == b.node
        && a.peers == b.peers
        && a.filter == b.filter
        && a.bundle_pem == b.bundle_pem
}

/// Whether `new` must be issued as a new version in place of `old`: when there is no old one,
/// when the content changed, or when the old one has less than `refresh_secs` left at `now`.
pub fn must_reissue(old: Option<&Netmap>, new: &Netmap, now: u64, refresh_secs: u64) -> bool {
    match old {
        None => true,
        Some(o) => !same_content(o, new) || o.expires_at < now.saturating_add(refresh_secs),
    }
}

/// A node's endpoints, best first: the address the coordinator observed with the reported
/// listen port, then the reported ones, without duplicates, unusable ones dropped.
pub fn endpoints(observed: IpAddr, listen_port: u16, reported: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    let observed = canonical(observed);
    let candidates = (listen_port != 0)
        .then_some(SocketAddr::new(observed, listen_port))
        .into_iter()
        .chain(
            reported
                .iter()
                .map(|a| SocketAddr::new(canonical(a.ip()), a.port())),
        );
    for addr in candidates {
        if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_multicast() {
            continue;
        }
        if !out.contains(&addr) && out.len() < MAX_ENDPOINTS {
            out.push(addr);
        }
    }
    out
}

/// The address at host offset `offset` of each prefix, or `None` when the IPv4 prefix has no
/// room for it (the network address and the broadcast address are never issued).
pub fn addresses_at(cidr: Ipv4Net, cidr6: Ipv6Net, offset: u64) -> Option<(Ipv4Addr, Ipv6Addr)> {
    let hosts = (1u64 << (32 - u32::from(cidr.prefix_len()))).saturating_sub(2);
    if offset == 0 || offset > hosts {
        return None;
    }
    let v4 = u32::from(cidr.network()).checked_add(u32::try_from(offset).ok()?)?;
    let v6 = u128::from(cidr6.network()).checked_add(u128::from(offset))?;
    Some((Ipv4Addr::from(v4), Ipv6Addr::from(v6)))
}

/// What peers are told to try, best first: the operator's pin wins (FC-30), then the
/// observed and reported endpoints.
fn peer_endpoints(n: &Node) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = n.pinned_endpoint.into_iter().collect();
    for e in &n.endpoints {
        if !out.contains(e) && out.len() < MAX_ENDPOINTS {
            out.push(*e);
        }
    }
    out
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn identity(n: &Node) -> Identity {
    Identity {
        spiffe_id: n.spiffe_id.clone(),
        namespace: n.namespace.clone(),
        tags: n.tags.clone(),
    }
}

fn host_prefixes(n: &Node) -> Vec<IpNet> {
    vec![
        IpNet::V4(Ipv4Net::from(n.ipv4)),
        IpNet::V6(Ipv6Net::from(n.ipv6)),
    ]
}

fn prefixed4(addr: Ipv4Addr, net: Ipv4Net) -> Ipv4Net {
    // The prefix length comes from a parsed Ipv4Net, so it is at most 32.
    Ipv4Net::new(addr, net.prefix_len()).expect("prefix length of a valid Ipv4Net")
}

fn prefixed6(addr: Ipv6Addr, net: Ipv6Net) -> Ipv6Net {
    // The prefix length comes from a parsed Ipv6Net, so it is at most 128.
    Ipv6Net::new(addr, net.prefix_len()).expect("prefix length of a valid Ipv6Net")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_put_observed_first_and_drop_duplicates() {
        let reported: Vec<SocketAddr> = vec![
            "192.0.2.7:51820".parse().unwrap(),
            "10.0.0.1:51820".parse().unwrap(),
            "0.0.0.0:51820".parse().unwrap(),
            "10.0.0.1:0".parse().unwrap(),
        ];
        let observed: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let eps = endpoints(observed, 51820, &reported);
        assert_eq!(
            eps,
            vec![
                "192.0.2.7:51820".parse::<SocketAddr>().unwrap(),
                "10.0.0.1:51820".parse().unwrap()
            ]
        );
    }

    #[test]
    fn netmaps_are_reissued_on_change_or_near_expiry_only() {
        let map = Netmap {
            version: NetmapVersion(3),
            network: "n".into(),
            node: SelfInfo {
                name: "a".into(),
                identity: Identity {
                    spiffe_id: "spiffe://td/ns/x/node/a".into(),
                    namespace: "x".into(),
                    tags: vec![],
                },
                addresses: vec![],
                routes: vec![],
                key_expires_at: None,
                key_rotate_at: None,
                quarantine: None,
            },
            peers: vec![],
            filter: Default::default(),
            expires_at: 1_000 + 24 * 3600,
            bundle_pem: None,
        };
        let mut same = map.clone();
        same.version = NetmapVersion(0);
        same.expires_at = 5_000 + 24 * 3600;
        assert!(must_reissue(None, &same, 1_000, 12 * 3600));
        assert!(!must_reissue(Some(&map), &same, 1_000, 12 * 3600));
        let later = 1_000 + 12 * 3600 + 1;
        assert!(must_reissue(Some(&map), &same, later, 12 * 3600));
        let mut changed = same.clone();
        changed.node.identity.tags = vec!["web".into()];
        assert!(must_reissue(Some(&map), &changed, 1_000, 12 * 3600));
        let mut rebundled = same.clone();
        rebundled.bundle_pem = Some("two CAs".into());
        assert!(must_reissue(Some(&map), &rebundled, 1_000, 12 * 3600));
    }

    fn node(id: i64, name: &str, key_created_at: u64) -> Node {
        Node {
            id: crate::store::NodeId(id),
            network: crate::store::NetworkId(1),
            name: name.into(),
            namespace: "prod".into(),
            tags: vec![],
            spiffe_id: format!("spiffe://td/ns/prod/node/{name}"),
            public_key: ztnet_proto::WgKey([id as u8; 32]),
            ipv4: Ipv4Addr::new(100, 64, 0, id as u8),
            ipv6: format!("fd00::{id}").parse().unwrap(),
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
            created_at: key_created_at,
            key_created_at,
            next_public_key: None,
        }
    }

    #[test]
    fn a_node_whose_key_expired_is_nobodys_peer_and_has_none() {
        let network = Network {
            id: crate::store::NetworkId(1),
            name: "prod-vpc".into(),
            cidr: "100.64.0.0/16".parse().unwrap(),
            cidr6: "fd00::/64".parse().unwrap(),
            zero_trust: true,
            created_at: 0,
        };
        let policy = netpolicy::Policy::parse(
            "[[grant]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"any\"]\n",
        )
        .unwrap()
        .policy;
        let mut b = node(2, "b", 1_000);
        b.next_public_key = Some(ztnet_proto::WgKey([9; 32]));
        let nodes = vec![node(1, "a", 100), b, node(3, "c", 1_000)];
        let compiled = netpolicy::compile(&policy, &inventory(&nodes));
        let keys = KeyLife { ttl: 600, now: 700 };
        let maps = build(&network, &nodes, &compiled, 10_000, keys);
        let names = |m: &Netmap| m.peers.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        assert!(maps["a"].peers.is_empty(), "a's key expired at 700");
        assert_eq!(names(&maps["b"]), ["c"]);
        assert_eq!(names(&maps["c"]), ["b"]);
        let b_at_c = &maps["c"].peers[0];
        assert_eq!(b_at_c.key_expires_at, Some(1_600));
        assert_eq!(b_at_c.next_public_key, Some(ztnet_proto::WgKey([9; 32])));
        assert_eq!(maps["b"].node.key_expires_at, Some(1_600));
        assert_eq!(maps["b"].node.key_rotate_at, Some(1_300));

        // Keys that never expire (not zero-trust): everyone is everyone's peer.
        let maps = build(
            &network,
            &nodes,
            &compiled,
            10_000,
            KeyLife { ttl: 0, now: 700 },
        );
        assert_eq!(names(&maps["a"]), ["b", "c"]);
        assert_eq!(maps["a"].peers[0].key_expires_at, None);
        assert_eq!(maps["a"].node.key_rotate_at, None);
    }

    #[test]
    fn addresses_skip_network_and_broadcast() {
        let v4: Ipv4Net = "100.64.0.0/30".parse().unwrap();
        let v6: Ipv6Net = "fd00:1:2:3::/64".parse().unwrap();
        let (a, b) = addresses_at(v4, v6, 1).unwrap();
        assert_eq!(a.to_string(), "100.64.0.1");
        assert_eq!(b.to_string(), "fd00:1:2:3::1");
        assert!(addresses_at(v4, v6, 2).is_some());
        assert!(addresses_at(v4, v6, 3).is_none());
        assert!(addresses_at(v4, v6, 0).is_none());
    }
}
