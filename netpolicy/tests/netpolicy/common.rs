//! Packet builders and small helpers shared by the tests.

#![allow(dead_code, reason = "each test module uses a different part")]

use std::net::IpAddr;
use std::time::Instant;

use netpolicy::{
    Checked, CompiledNetwork, ConntrackConfig, Filter, FilterSpec, Inventory, NodeIdentity, Policy,
    Verdict,
};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;

pub fn parse(source: &str) -> Checked {
    match Policy::parse(source) {
        Ok(c) => c,
        Err(e) => panic!("policy refused: {:#?}", e.diagnostics),
    }
}

pub fn policy(source: &str) -> Policy {
    parse(source).policy
}

/// A node with one IPv4 and one IPv6 overlay address derived from `n`.
pub fn node(name: &str, n: u8, namespace: &str, tags: &[&str]) -> NodeIdentity {
    NodeIdentity {
        name: name.to_string(),
        namespace: namespace.to_string(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        spiffe_id: format!("spiffe://corp.example/ns/{namespace}/node/{name}"),
        addresses: vec![
            format!("10.90.0.{n}/32").parse().unwrap(),
            format!("fd00:90::{n:x}/128").parse().unwrap(),
        ],
        routes: Vec::new(),
    }
}

pub fn v4(n: &NodeIdentity) -> IpAddr {
    n.addresses[0].addr()
}

pub fn v6(n: &NodeIdentity) -> IpAddr {
    n.addresses[1].addr()
}

pub fn inventory(nodes: &[NodeIdentity]) -> Inventory {
    Inventory {
        nodes: nodes.to_vec(),
    }
}

pub fn compiled(source: &str, nodes: &[NodeIdentity]) -> CompiledNetwork {
    netpolicy::compile(&policy(source), &inventory(nodes))
}

pub fn spec_of(net: &CompiledNetwork, name: &str) -> FilterSpec {
    net.filters.get(name).cloned().unwrap_or_default()
}

/// One filter per node of a compiled network.
pub struct Mesh {
    pub net: CompiledNetwork,
    pub filters: std::collections::BTreeMap<String, Filter>,
    pub now: Instant,
}

impl Mesh {
    pub fn new(source: &str, nodes: &[NodeIdentity]) -> Self {
        let net = compiled(source, nodes);
        let filters = nodes
            .iter()
            .map(|n| {
                (
                    n.name.clone(),
                    Filter::new(spec_of(&net, &n.name), ConntrackConfig::default()),
                )
            })
            .collect();
        Mesh {
            net,
            filters,
            now: Instant::now(),
        }
    }

    /// Sends `pkt` from `a` to `b`: outbound at `a`, then inbound at `b` if it passed. Returns
    /// both verdicts.
    pub fn send(&mut self, a: &str, b: &str, pkt: &[u8]) -> (Verdict, Option<Verdict>) {
        let out = self.filters.get_mut(a).unwrap().outbound(b, pkt, self.now);
        if !matches!(out, Verdict::Allow(_)) {
            return (out, None);
        }
        let inb = self.filters.get_mut(b).unwrap().inbound(a, pkt, self.now);
        (out, Some(inb))
    }

    /// Whether `pkt` from `a` reaches `b` through both filters.
    pub fn passes(&mut self, a: &str, b: &str, pkt: &[u8]) -> bool {
        matches!(
            self.send(a, b, pkt),
            (Verdict::Allow(_), Some(Verdict::Allow(_)))
        )
    }

    /// The receiver's verdict alone.
    pub fn inbound(&mut self, at: &str, from: &str, pkt: &[u8]) -> Verdict {
        self.filters
            .get_mut(at)
            .unwrap()
            .inbound(from, pkt, self.now)
    }

    /// The sender's verdict alone.
    pub fn outbound(&mut self, at: &str, to: &str, pkt: &[u8]) -> Verdict {
        self.filters
            .get_mut(at)
            .unwrap()
            .outbound(to, pkt, self.now)
    }
}

pub fn allowed(v: &Verdict) -> bool {
    matches!(v, Verdict::Allow(_))
}

fn ip_header(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = 20 + payload.len();
            let mut p = vec![
                0x45,
                0,
                (total >> 8) as u8,
                total as u8,
                0,
                1,
                0x40,
                0,
                64,
                proto,
                0,
                0,
            ];
            p.extend(s.octets());
            p.extend(d.octets());
            p.extend(payload);
            p
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let len = payload.len();
            let mut p = vec![0x60, 0, 0, 0, (len >> 8) as u8, len as u8, proto, 64];
            p.extend(s.octets());
            p.extend(d.octets());
            p.extend(payload);
            p
        }
        _ => panic!("mixed address families"),
    }
}

pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    ip_header(src, dst, TCP, &t)
}

pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[5] = 8;
    u.extend(b"payload!");
    ip_header(src, dst, UDP, &u)
}

fn icmp_proto(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 1 } else { 58 }
}

/// ICMP or ICMPv6 echo request (`request`) or reply with an id.
pub fn echo(src: IpAddr, dst: IpAddr, request: bool, id: u16) -> Vec<u8> {
    let kind = match (src.is_ipv4(), request) {
        (true, true) => 8,
        (true, false) => 0,
        (false, true) => 128,
        (false, false) => 129,
    };
    let mut m = vec![kind, 0, 0, 0];
    m.extend(id.to_be_bytes());
    m.extend([0, 1]);
    m.extend(b"ping");
    ip_header(src, dst, icmp_proto(src), &m)
}

/// An ICMP or ICMPv6 message of a type and code, quoting `quoted` (cut to its first 28 or 48
/// bytes, as routers do).
pub fn icmp_error(src: IpAddr, dst: IpAddr, kind: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let keep = if src.is_ipv4() { 28 } else { 48 };
    let mut m = vec![kind, code, 0, 0, 0, 0, 0x05, 0x78];
    m.extend(&quoted[..quoted.len().min(keep)]);
    ip_header(src, dst, icmp_proto(src), &m)
}

/// Any ICMP message with a type and an 8-byte body.
pub fn icmp_other(src: IpAddr, dst: IpAddr, kind: u8) -> Vec<u8> {
    let m = vec![kind, 0, 0, 0, 0, 0, 0, 0];
    ip_header(src, dst, icmp_proto(src), &m)
}

/// An IPv6 packet with extension headers (hop-by-hop, destination options) before TCP.
pub fn tcp6_with_extensions(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    flags: u8,
) -> Vec<u8> {
    let inner = tcp(src, sport, dst, dport, flags);
    let tcp_part = &inner[40..];
    let mut payload = Vec::new();
    // Hop-by-hop: next = destination options (60), length 0 (8 bytes), PadN.
    payload.extend([60, 0, 1, 4, 0, 0, 0, 0]);
    // Destination options: next = TCP, length 1 (16 bytes).
    payload.extend([TCP, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    payload.extend(tcp_part);
    let mut p = inner[..40].to_vec();
    p[6] = 0; // next header: hop-by-hop
    p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend(payload);
    p
}

/// Splits a UDP datagram into IPv4 fragments: the first carries the UDP header.
pub fn udp4_fragments(src: IpAddr, dst: IpAddr, dport: u16, id: u16) -> (Vec<u8>, Vec<u8>) {
    let mut whole = udp(src, 4000, dst, dport);
    whole.extend([0u8; 16]);
    let payload = whole[20..].to_vec();
    let mut first = whole[..20].to_vec();
    first[4..6].copy_from_slice(&id.to_be_bytes());
    first[6] = 0x20; // more fragments, offset 0
    first.extend(&payload[..16]);
    let total = first.len() as u16;
    first[2..4].copy_from_slice(&total.to_be_bytes());
    let mut second = whole[..20].to_vec();
    second[4..6].copy_from_slice(&id.to_be_bytes());
    second[6] = 0;
    second[7] = 2; // offset 16 bytes = 2 units, last fragment
    second.extend(&payload[16..]);
    let total = second.len() as u16;
    second[2..4].copy_from_slice(&total.to_be_bytes());
    (first, second)
}

/// Splits a UDP datagram into IPv6 fragments with a fragment header.
pub fn udp6_fragments(src: IpAddr, dst: IpAddr, dport: u16, id: u32) -> (Vec<u8>, Vec<u8>) {
    let mut whole = udp(src, 4000, dst, dport);
    whole.extend([0u8; 16]);
    let payload = whole[40..].to_vec();
    let make = |offset_units: u16, more: bool, part: &[u8]| {
        let mut p = whole[..40].to_vec();
        p[6] = 44;
        let field = (offset_units << 3) | u16::from(more);
        let mut frag = vec![UDP, 0];
        frag.extend(field.to_be_bytes());
        frag.extend(id.to_be_bytes());
        frag.extend(part);
        p[4..6].copy_from_slice(&(frag.len() as u16).to_be_bytes());
        p.extend(frag);
        p
    };
    (
        make(0, true, &payload[..16]),
        make(2, false, &payload[16..]),
    )
}
