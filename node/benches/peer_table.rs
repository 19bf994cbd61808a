//! Cost of one packet through two peer tables wired back to back in memory: route, outbound
//! filter, encrypt at one node; find the peer, decrypt, anti-spoofing, inbound filter at the
//! other. No sockets, so this is the data plane's CPU cost without system calls.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ipnet::IpNet;
use netpolicy::{ConntrackConfig, Filter, Inventory, NodeIdentity, Policy};
use ztnet_node::dataplane::counters::Counters;
use ztnet_node::dataplane::peers::{MIN_BUFFER, PeerTable, Transmit};
use ztnet_node::netconfig::PeerConfig;
use ztnet_proto::PrivateKey;

const ALLOW_ALL: &str = "[[grant]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"any\"]\n";

/// Keeps the last datagram and TUN packet, reusing its buffers.
#[derive(Default)]
struct Last {
    udp: Vec<u8>,
    tun: Vec<u8>,
}

impl Transmit for Last {
    fn send_udp(&mut self, _to: SocketAddr, datagram: &[u8]) {
        self.udp.clear();
        self.udp.extend_from_slice(datagram);
    }
    fn write_tun(&mut self, packet: &[u8]) {
        self.tun.clear();
        self.tun.extend_from_slice(packet);
    }
}

fn ip(i: u8) -> IpAddr {
    IpAddr::from([10, 90, 0, i])
}

fn underlay(i: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, i], 51820))
}

fn table(me: u8, key: &PrivateKey, peer_key: &PrivateKey) -> PeerTable {
    let nodes = (1..=2)
        .map(|i| NodeIdentity {
            name: format!("n{i}"),
            namespace: "default".into(),
            tags: vec![],
            spiffe_id: format!("spiffe://bench/ns/default/node/n{i}"),
            addresses: vec![IpNet::from(ip(i))],
            routes: vec![],
        })
        .collect();
    let policy = Policy::parse(ALLOW_ALL).expect("policy parses").policy;
    let compiled = netpolicy::compile(&policy, &Inventory { nodes });
    let spec = compiled.filters[&format!("n{me}")].clone();
    let other = 3 - me;
    let peer = PeerConfig {
        name: format!("n{other}"),
        public_key: peer_key.public_key(),
        endpoint: Some(underlay(other)),
        endpoints: vec![],
        allowed_ips: vec![IpNet::from(ip(other))],
        persistent_keepalive: None,
        identity: None,
        preshared_key: None,
        next_public_key: None,
    };
    let filter = Arc::new(Mutex::new(Filter::new(spec, ConntrackConfig::default())));
    // With its own address, as the node runs it: path MTU probing on (nothing is learned over
    // this IPv4 underlay, so every packet takes the one length compare).
    PeerTable::new(
        key,
        &[peer],
        None,
        filter,
        Arc::new(Counters::default()),
        me as u32 * 100,
    )
    .with_local(&[IpNet::from(ip(me))], 1420)
}

/// A UDP packet of `len` bytes from n1 to n2.
fn udp_packet(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 90, 0, 1]);
    p[16..20].copy_from_slice(&[10, 90, 0, 2]);
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[24..26].copy_from_slice(&((len - 20) as u16).to_be_bytes());
    p
}

fn bench(c: &mut Criterion) {
    let (k1, k2) = (PrivateKey::generate(), PrivateKey::generate());
    let (t1, t2) = (table(1, &k1, &k2), table(2, &k2, &k1));
    let mut buf = vec![0u8; MIN_BUFFER];
    let mut out = Last::default();
    let now = Instant::now();
    let packet = udp_packet(1420);

    // Handshake: initiation, response, keepalive, then the queued packet.
    t1.handle_tun_packet(&packet, now, &mut buf, &mut out);
    for _ in 0..4 {
        let d = std::mem::take(&mut out.udp);
        if d.is_empty() {
            break;
        }
        let (from, to) = if d[0] == 2 {
            (underlay(2), &t1)
        } else {
            (underlay(1), &t2)
        };
        to.handle_datagram(from, &d, now, &mut buf, &mut out);
    }

    let mut g = c.benchmark_group("peer_table");
    g.throughput(Throughput::Bytes(packet.len() as u64));
    g.bench_function("tun_to_tun_1420B", |b| {
        b.iter(|| {
            t1.handle_tun_packet(&packet, now, &mut buf, &mut out);
            let d = std::mem::take(&mut out.udp);
            t2.handle_datagram(underlay(1), &d, now, &mut buf, &mut out);
            out.udp = d;
        })
    });
    g.finish();
    assert_eq!(out.tun, packet, "the packet made it through");
}

criterion_group!(benches, bench);
criterion_main!(benches);
