//! Open flows as data: a copy of a filter's live flows taken under its lock
//! ([`crate::Filter::flow_snapshot`]), turned into readable [`OpenFlow`]s outside it, and the
//! judgment of one such flow against a filter's installed rules
//! ([`crate::Filter::judge_open_flow`]), the same judgment `install` makes of every open flow.
//! No I/O, no clock.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::RuleId;
use crate::flows::{Direction, Flow, FlowKey, TcpState};
use crate::packet::Addr;

/// Which side opened a flow, seen from the node that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowOrigin {
    /// This node sent the first packet.
    Local,
    /// The peer sent the first packet.
    Peer,
}

/// Where a flow stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowState {
    /// TCP: only the opening SYN was seen.
    Opening,
    /// TCP: answered, or picked up mid-stream; ICMP echo: open.
    Established,
    /// UDP or another protocol: nothing came back yet.
    Unreplied,
    /// UDP or another protocol: the other side answered.
    Replied,
}

/// One live flow of a node, as readable data. Ended flows (TCP after FIN both ways or a RST)
/// are not listed: they pass only their last stragglers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenFlow {
    /// The peer at the other end, by name.
    pub peer: String,
    /// Who opened it.
    pub opened_by: FlowOrigin,
    /// IP protocol number: 6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, or another one allowed by `any`.
    pub proto: u8,
    /// An ICMP or ICMPv6 echo flow: `initiator_port` is the echo id, `responder_port` 0.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub echo: bool,
    /// The address of the side that opened it.
    pub initiator: IpAddr,
    /// Its port (TCP, UDP), or the echo id; 0 for other protocols.
    pub initiator_port: u16,
    /// The address of the side it was opened towards.
    pub responder: IpAddr,
    /// Its port: the destination port that the policy judges (TCP, UDP); 0 otherwise.
    pub responder_port: u16,
    /// Where it stands.
    pub state: FlowState,
    /// Seconds since its last packet.
    pub idle_secs: u64,
}

impl OpenFlow {
    /// `tcp:5432`, `udp:53`, `icmp` or `proto 47`: what the policy judges the flow by.
    pub fn port_label(&self) -> String {
        match (self.proto, self.echo) {
            (crate::packet::PROTO_TCP, _) => format!("tcp:{}", self.responder_port),
            (crate::packet::PROTO_UDP, _) => format!("udp:{}", self.responder_port),
            (_, true) => "icmp".to_string(),
            (p, false) => format!("proto {p}"),
        }
    }
}

/// How a filter's installed rules judge an open flow, as `install` judges every open flow: as
/// if its first packet came now from the side that opened it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowFate {
    /// A grant still allows it; the flow goes on.
    Kept(RuleId),
    /// The filter has no rules for its peer: the flow stops.
    PeerGone,
    /// No grant allows it any more (default deny): the flow stops.
    NoRule,
    /// A deny matches it: the flow stops.
    Denied(RuleId),
    /// Its two addresses are of different families: no node holds such a flow.
    Malformed,
}

impl FlowFate {
    /// True when the flow goes on.
    pub fn kept(&self) -> bool {
        matches!(self, FlowFate::Kept(_))
    }
}

/// A copy of a filter's live flows, taken under its lock by
/// [`crate::Filter::flow_snapshot`]; [`FlowSnapshot::flows`] makes them readable afterwards,
/// so that the lock is held only for the copy.
#[derive(Debug, Clone)]
pub struct FlowSnapshot {
    pub(crate) entries: Vec<(FlowKey, Flow)>,
    /// Peer names by slot, as they were at the copy.
    pub(crate) names: Vec<Option<Box<str>>>,
    /// Live flows in the table, beyond the limit included.
    pub(crate) live: usize,
    /// The filter's clock at the copy.
    pub(crate) now: u64,
}

impl FlowSnapshot {
    /// The live flows copied, at most the limit given to the snapshot.
    pub fn flows(&self) -> Vec<OpenFlow> {
        self.entries
            .iter()
            .filter_map(|(key, flow)| {
                let peer = self.names.get(flow.peer as usize)?.as_deref()?;
                Some(open_flow(peer, key, flow, self.now))
            })
            .collect()
    }

    /// Live flows in the table when the copy was taken, those beyond the limit included.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Whether there were more live flows than the limit.
    pub fn truncated(&self) -> bool {
        self.live > self.entries.len()
    }
}

/// Whether a flow is live and not ending at `now` (filter ticks).
pub(crate) fn listed(flow: &Flow, now: u64) -> bool {
    flow.expires > now && !matches!(flow.tcp, TcpState::Closing | TcpState::Reset)
}

fn open_flow(peer: &str, key: &FlowKey, flow: &Flow, now: u64) -> OpenFlow {
    let v4 = key.v4();
    let (local, remote) = (ip(key.local(), v4), ip(key.remote(), v4));
    let (initiator, responder, initiator_port, responder_port) = match (flow.echo, flow.origin) {
        (true, Direction::Outbound) => (local, remote, key.local_port(), 0),
        (true, Direction::Inbound) => (remote, local, key.local_port(), 0),
        (false, Direction::Outbound) => (local, remote, key.local_port(), key.remote_port()),
        (false, Direction::Inbound) => (remote, local, key.remote_port(), key.local_port()),
    };
    let ported = matches!(
        key.proto(),
        crate::packet::PROTO_TCP | crate::packet::PROTO_UDP
    );
    let state = match (key.proto(), flow.tcp) {
        (crate::packet::PROTO_TCP, TcpState::Opening) => FlowState::Opening,
        (crate::packet::PROTO_TCP, _) => FlowState::Established,
        _ if flow.echo => FlowState::Established,
        _ if flow.replied => FlowState::Replied,
        _ => FlowState::Unreplied,
    };
    let lifetime = flow.lifetime(key.proto());
    let left = flow.expires.saturating_sub(now);
    OpenFlow {
        peer: peer.to_string(),
        opened_by: match flow.origin {
            Direction::Outbound => FlowOrigin::Local,
            Direction::Inbound => FlowOrigin::Peer,
        },
        proto: key.proto(),
        echo: flow.echo,
        initiator,
        initiator_port: if ported || flow.echo {
            initiator_port
        } else {
            0
        },
        responder,
        responder_port: if ported { responder_port } else { 0 },
        state,
        idle_secs: lifetime.saturating_sub(left) / 1_000_000_000,
    }
}

/// The flow key an open flow had in the table of the node that reported it, with the side
/// that opened it; `None` when its addresses are of two families.
pub(crate) fn key_of(flow: &OpenFlow) -> Option<(FlowKey, Direction)> {
    let v4 = match (flow.initiator, flow.responder) {
        (IpAddr::V4(_), IpAddr::V4(_)) => true,
        (IpAddr::V6(_), IpAddr::V6(_)) => false,
        _ => return None,
    };
    let (initiator, responder) = (addr(flow.initiator), addr(flow.responder));
    let origin = match flow.opened_by {
        FlowOrigin::Local => Direction::Outbound,
        FlowOrigin::Peer => Direction::Inbound,
    };
    let (local, remote, local_port, remote_port) = match (flow.echo, origin) {
        (true, Direction::Outbound) => (initiator, responder, flow.initiator_port, 0),
        (true, Direction::Inbound) => (responder, initiator, flow.initiator_port, 0),
        (false, Direction::Outbound) => (
            initiator,
            responder,
            flow.initiator_port,
            flow.responder_port,
        ),
        (false, Direction::Inbound) => (
            responder,
            initiator,
            flow.responder_port,
            flow.initiator_port,
        ),
    };
    let key = FlowKey::new(v4, flow.proto, local, remote, local_port, remote_port);
    Some((key, origin))
}

fn ip(a: Addr, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(a as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(a))
    }
}

fn addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => 0xffff_u128 << 32 | u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::{Duration, Instant};

    use proptest::prelude::*;

    use super::*;
    use crate::{ConntrackConfig, Filter, FilterSpec, Inventory, NodeIdentity, Policy, compile};

    const TCP: u8 = 6;
    const UDP: u8 = 17;
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const RST: u8 = 0x04;

    fn node(name: &str, n: u8, tag: &str) -> NodeIdentity {
        NodeIdentity {
            name: name.into(),
            namespace: "p".into(),
            tags: vec![tag.into()],
            spiffe_id: String::new(),
            addresses: vec![format!("10.0.0.{n}/32").parse().expect("a valid prefix")],
            routes: Vec::new(),
        }
    }

    /// db1's filter under a policy text.
    fn db_spec(source: &str) -> FilterSpec {
        let policy = Policy::parse(source)
            .expect("the test policy is valid")
            .policy;
        let nodes = vec![node("web1", 1, "web"), node("db1", 2, "db")];
        compile(&policy, &Inventory { nodes })
            .filters
            .get("db1")
            .cloned()
            .unwrap_or_default()
    }

    const BOTH: &str = "[[grant]]\nfrom = [\"tag:web\"]\nto = [\"tag:db\"]\n\
                        ports = [\"tcp:5432\", \"udp:53\", \"icmp\"]\n\
                        [[grant]]\nfrom = [\"tag:db\"]\nto = [\"tag:web\"]\nports = [\"tcp:22\"]\n";

    /// An IPv4 packet between web1 (10.0.0.1) and db1 (10.0.0.2), as db1 sees it.
    fn packet(proto: u8, from_web: bool, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let (src, dst) = if from_web { (1, 2) } else { (2, 1) };
        let l4 = if proto == TCP { 20 } else { 8 };
        let total = 20 + l4;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&[10, 0, 0, src]);
        p[16..20].copy_from_slice(&[10, 0, 0, dst]);
        if proto == 1 {
            p[20] = 8;
            p[24..26].copy_from_slice(&sport.to_be_bytes());
            return p;
        }
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        if proto == TCP {
            p[32] = 5 << 4;
            p[33] = flags;
        } else {
            p[24..26].copy_from_slice(&8u16.to_be_bytes());
        }
        p
    }

    /// db1 with a TCP flow from web1 to 5432, a UDP flow from web1 to 53, an echo from web1,
    /// a TCP flow from db1 to web1:22, and one reset flow.
    fn busy_filter(t0: Instant) -> Filter {
        let mut f = Filter::new(db_spec(BOTH), ConntrackConfig::default());
        let allow = |v: crate::Verdict| assert!(matches!(v, crate::Verdict::Allow(_)), "{v:?}");
        allow(f.inbound("web1", &packet(TCP, true, 40000, 5432, SYN), t0));
        allow(f.outbound("web1", &packet(TCP, false, 5432, 40000, SYN | ACK), t0));
        allow(f.inbound("web1", &packet(UDP, true, 5000, 53, 0), t0));
        allow(f.inbound("web1", &packet(1, true, 77, 0, 0), t0));
        allow(f.outbound("web1", &packet(TCP, false, 41000, 22, SYN), t0));
        allow(f.inbound("web1", &packet(TCP, true, 40001, 5432, SYN), t0));
        allow(f.outbound("web1", &packet(TCP, false, 5432, 40001, RST), t0));
        f
    }

    fn find(flows: &[OpenFlow], proto: u8, port: u16) -> &OpenFlow {
        flows
            .iter()
            .find(|f| f.proto == proto && f.responder_port == port)
            .unwrap_or_else(|| panic!("no flow {proto}/{port} in {flows:?}"))
    }

    #[test]
    fn a_snapshot_names_both_ends_the_opener_and_the_idle_time() {
        let t0 = Instant::now();
        let f = busy_filter(t0);
        let snap = f.flow_snapshot(t0 + Duration::from_secs(5), 100);
        let flows = snap.flows();

        assert_eq!(flows.len(), 4, "the reset flow is not listed: {flows:?}");
        assert_eq!(snap.live(), 4);
        assert!(!snap.truncated());
        let db = find(&flows, TCP, 5432);
        assert_eq!(db.peer, "web1");
        assert_eq!(db.opened_by, FlowOrigin::Peer);
        assert_eq!(db.initiator, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(db.initiator_port, 40000);
        assert_eq!(db.responder, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(db.state, FlowState::Established);
        assert_eq!(db.idle_secs, 5);
        assert_eq!(db.port_label(), "tcp:5432");
        let ssh = find(&flows, TCP, 22);
        assert_eq!(ssh.opened_by, FlowOrigin::Local);
        assert_eq!(ssh.initiator, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(ssh.initiator_port, 41000);
        assert_eq!(ssh.state, FlowState::Opening);
        assert_eq!(find(&flows, UDP, 53).state, FlowState::Unreplied);
        let echo = flows.iter().find(|f| f.echo).expect("the echo flow");
        assert_eq!(
            (echo.initiator_port, echo.port_label()),
            (77, "icmp".into())
        );
    }

    #[test]
    fn a_snapshot_stops_at_its_limit_and_says_so() {
        let t0 = Instant::now();
        let snap = busy_filter(t0).flow_snapshot(t0, 2);
        assert_eq!(snap.flows().len(), 2);
        assert_eq!(snap.live(), 4);
        assert!(snap.truncated());
    }

    #[test]
    fn expired_flows_are_not_listed() {
        let t0 = Instant::now();
        let snap = busy_filter(t0).flow_snapshot(t0 + Duration::from_secs(3600), 100);
        let flows = snap.flows();
        // The established TCP flow lives 24 h idle; the others have ended.
        assert_eq!(flows.len(), 1, "{flows:?}");
        assert_eq!(flows[0].responder_port, 5432);
        assert_eq!(flows[0].idle_secs, 3600);
    }

    #[test]
    fn the_judgment_of_open_flows_is_what_install_does() {
        let t0 = Instant::now();
        let mut f = busy_filter(t0);
        let before = f.flow_snapshot(t0, 100).flows();
        let without_db = concat!(
            "[[grant]]\nfrom = [\"tag:web\"]\nto = [\"tag:db\"]\nports = [\"udp:53\", \"icmp\"]\n",
            "[[grant]]\nfrom = [\"tag:db\"]\nto = [\"tag:web\"]\nports = [\"tcp:22\"]\n",
            "[[deny]]\nfrom = [\"tag:web\"]\nto = [\"tag:db\"]\nports = [\"icmp\"]\n",
        );
        let candidate = Filter::new(db_spec(without_db), ConntrackConfig { max_flows: 16 });
        let fates: Vec<FlowFate> = before
            .iter()
            .map(|o| candidate.judge_open_flow(o))
            .collect();
        assert_eq!(
            fates[before
                .iter()
                .position(|o| o.responder_port == 5432)
                .unwrap()],
            FlowFate::NoRule
        );
        let echo = before.iter().position(|o| o.echo).unwrap();
        assert!(matches!(fates[echo], FlowFate::Denied(r) if r.kind == crate::RuleKind::Deny));

        f.install(db_spec(without_db), t0);
        let after: BTreeSet<String> = f
            .flow_snapshot(t0, 100)
            .flows()
            .iter()
            .map(|o| format!("{o:?}"))
            .collect();
        let kept: BTreeSet<String> = before
            .iter()
            .zip(&fates)
            .filter(|(_, fate)| fate.kept())
            .map(|(o, _)| format!("{o:?}"))
            .collect();
        assert_eq!(after, kept);
        assert_eq!(after.len(), 2, "udp:53 and tcp:22 stay");
    }

    #[test]
    fn a_flow_with_an_unknown_peer_or_mixed_families_is_judged_without_panic() {
        let t0 = Instant::now();
        let f = busy_filter(t0);
        let mut flow = f.flow_snapshot(t0, 1).flows().remove(0);
        flow.peer = "nobody".into();
        assert_eq!(f.judge_open_flow(&flow), FlowFate::PeerGone);
        flow.peer = "web1".into();
        flow.responder = "fd00::2".parse().unwrap();
        assert_eq!(f.judge_open_flow(&flow), FlowFate::Malformed);
        let empty = Filter::new(FilterSpec::default(), ConntrackConfig::default());
        assert!(empty.flow_snapshot(t0, 10).flows().is_empty());
    }

    proptest! {
        /// For any set of flows and any candidate grants, the flows the judgment keeps are
        /// exactly the flows that survive installing the candidate.
        #[test]
        fn judging_matches_install_for_any_grants(
            flows in prop::collection::vec(
                (any::<bool>(), any::<bool>(), 20u16..30, 1000u16..1010),
                1..20,
            ),
            tcp in prop::collection::vec(20u16..30, 0..4),
            udp in prop::collection::vec(20u16..30, 0..4),
        ) {
            let all = "[[grant]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"any\"]\n";
            let t0 = Instant::now();
            let mut f = Filter::new(db_spec(all), ConntrackConfig::default());
            for (is_tcp, from_web, port, other) in flows {
                let proto = if is_tcp { TCP } else { UDP };
                let p = if from_web {
                    packet(proto, true, other, port, SYN)
                } else {
                    packet(proto, false, other, port, SYN)
                };
                if from_web { f.inbound("web1", &p, t0) } else { f.outbound("web1", &p, t0) };
            }
            let mut ports: Vec<String> = tcp.iter().map(|p| format!("\"tcp:{p}\"")).collect();
            ports.extend(udp.iter().map(|p| format!("\"udp:{p}\"")));
            let source = if ports.is_empty() {
                String::new()
            } else {
                format!("[[grant]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [{}]\n", ports.join(", "))
            };
            let before = f.flow_snapshot(t0, 1000).flows();
            let candidate = Filter::new(db_spec(&source), ConntrackConfig { max_flows: 16 });
            let kept: BTreeSet<String> = before
                .iter()
                .filter(|o| candidate.judge_open_flow(o).kept())
                .map(|o| format!("{o:?}"))
                .collect();
            f.install(db_spec(&source), t0);
            let after: BTreeSet<String> =
                f.flow_snapshot(t0, 1000).flows().iter().map(|o| format!("{o:?}")).collect();
            prop_assert_eq!(after, kept);
        }
    }
}
