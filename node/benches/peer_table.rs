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

/// An ICMP echo request (`ping`'s 84 bytes) from n1 to n2, or its reply from n2 to n1.
fn echo(request: bool) -> Vec<u8> {
    let mut p = vec![0u8; 84];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&84u16.to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    let (src, dst) = if request { (1, 2) } else { (2, 1) };
    p[12..16].copy_from_slice(&[10, 90, 0, src]);
    p[16..20].copy_from_slice(&[10, 90, 0, dst]);
    p[20] = if request { 8 } else { 0 };
    p[24..26].copy_from_slice(&7u16.to_be_bytes());
    p
}

/// The same exchange through two bare boringtun sessions: what encryption alone costs.
fn bare_pair(k1: &PrivateKey, k2: &PrivateKey) -> (boringtun::noise::Tunn, boringtun::noise::Tunn) {
    use boringtun::x25519::{PublicKey, StaticSecret};
    let s1 = StaticSecret::from(k1.to_bytes());
    let s2 = StaticSecret::from(k2.to_bytes());
    let (p1, p2) = (PublicKey::from(&s1), PublicKey::from(&s2));
    let mut t1 = boringtun::noise::Tunn::new(s1, p2, None, None, 1, None);
    let mut t2 = boringtun::noise::Tunn::new(s2, p1, None, None, 2, None);
    let (mut a, mut b) = (vec![0u8; 2048], vec![0u8; 2048]);
    let init = match t1.format_handshake_initiation(&mut a, false) {
        boringtun::noise::TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("no initiation"),
    };
    let resp = match t2.decapsulate(None, &init, &mut b) {
        boringtun::noise::TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("no response"),
    };
    if let boringtun::noise::TunnResult::WriteToNetwork(d) = t1.decapsulate(None, &resp, &mut a) {
        let keepalive = d.to_vec();
        let _ = t2.decapsulate(None, &keepalive, &mut b);
    }
    (t1, t2)
}

fn bare_pass(
    from: &mut boringtun::noise::Tunn,
    to: &mut boringtun::noise::Tunn,
    packet: &[u8],
    x: &mut [u8],
    y: &mut [u8],
) {
    let d = match from.encapsulate(packet, x) {
        boringtun::noise::TunnResult::WriteToNetwork(d) => d.len(),
        _ => panic!("no session"),
    };
    match to.decapsulate(None, &x[..d], y) {
        boringtun::noise::TunnResult::WriteToTunnelV4(..) => {}
        _ => panic!("not decrypted"),
    }
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

    // One ping round trip in memory: the request out of n1 and into n2, the reply back.
    let (request, reply) = (echo(true), echo(false));
    let mut tables = || {
        t1.handle_tun_packet(&request, now, &mut buf, &mut out);
        let d = std::mem::take(&mut out.udp);
        t2.handle_datagram(underlay(1), &d, now, &mut buf, &mut out);
        out.udp = d;
        t2.handle_tun_packet(&reply, now, &mut buf, &mut out);
        let d = std::mem::take(&mut out.udp);
        t1.handle_datagram(underlay(2), &d, now, &mut buf, &mut out);
        out.udp = d;
        assert_eq!(out.tun.len(), reply.len(), "the reply made it through");
    };
    let (mut b1, mut b2) = bare_pair(&k1, &k2);
    let (mut x, mut y) = (vec![0u8; 2048], vec![0u8; 2048]);
    let mut bare = || {
        bare_pass(&mut b1, &mut b2, &request, &mut x, &mut y);
        bare_pass(&mut b2, &mut b1, &reply, &mut x, &mut y);
    };
    let mut g = c.benchmark_group("ping_round_trip");
    g.bench_function("peer_tables", |b| b.iter(&mut tables));
    g.bench_function("bare_boringtun", |b| b.iter(&mut bare));
    g.finish();

    // The same with cold caches, as for a ping after 20 ms of other work: 32 MiB of
    // unrelated memory is written between round trips, outside the time measured.
    let mut flush = vec![0u64; 4 << 20];
    let mut cold = |b: &mut criterion::Bencher<'_>, f: &mut dyn FnMut()| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            for _ in 0..iters {
                for (i, v) in flush.iter_mut().enumerate().step_by(8) {
                    *v = v.wrapping_add(i as u64);
                }
                let t = Instant::now();
                f();
                total += t.elapsed();
            }
            total
        })
    };
    let mut g = c.benchmark_group("ping_round_trip_cold");
    g.bench_function("peer_tables", |b| cold(b, &mut tables));
    g.bench_function("bare_boringtun", |b| cold(b, &mut bare));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
