//! Criterion benches: the per-packet decision (established flow, new flow with 1,000 grants)
//! and the compiler (10,000 nodes with 1,000 grants, and one node joining them).

use std::hint::black_box;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use netpolicy::{Compiler, ConntrackConfig, Filter, Inventory, NodeIdentity, Policy, compile};

const TCP: u8 = 6;
const UDP: u8 = 17;

fn v4_packet(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let l4_len = if proto == TCP { 20 } else { 8 };
    let total = 20 + l4_len + 32;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    if proto == TCP {
        p[32] = 5 << 4;
        p[33] = flags;
    } else {
        p[24..26].copy_from_slice(&((8 + 32) as u16).to_be_bytes());
    }
    p
}

fn host(name: &str, ns: &str, tags: &[String], i: u32) -> NodeIdentity {
    let v4: IpAddr = std::net::Ipv4Addr::from(0x6440_0000u32 + i + 1).into();
    let v6: IpAddr =
        std::net::Ipv6Addr::from(0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + u128::from(i) + 1)
            .into();
    NodeIdentity {
        name: name.to_string(),
        namespace: ns.to_string(),
        tags: tags.to_vec(),
        spiffe_id: format!("spiffe://corp.example/ns/{ns}/node/{name}"),
        addresses: vec![v4.into(), v6.into()],
        routes: Vec::new(),
    }
}

/// 1,000 grants from web to db, one TCP port each, and one deny.
fn thousand_grants() -> Policy {
    let mut src = String::new();
    for k in 0..1000 {
        src += &format!(
            "[[grant]]\nfrom = [\"tag:web\"]\nto = [\"tag:db\"]\nports = [\"tcp:{}\", \"udp:{}\"]\n",
            1000 + k,
            1000 + k
        );
    }
    src += "[[deny]]\nfrom = [\"tag:contractor\"]\nto = [\"*\"]\nports = [\"any\"]\n";
    Policy::parse(&src)
        .expect("the bench policy is valid")
        .policy
}

fn decision(c: &mut Criterion) {
    let policy = thousand_grants();
    let web = host("web1", "prod", &["web".into()], 1);
    let db = host("db1", "prod", &["db".into()], 2);
    let net = compile(
        &policy,
        &Inventory {
            nodes: vec![web, db],
        },
    );
    let spec = net.filters["db1"].clone();
    let (web_ip, db_ip) = ([100, 64, 0, 2], [100, 64, 0, 3]);

    // Established flows: ESTABLISHED_FLOWS TCP flows opened by SYN, then one ACK of each in
    // turn, so that every packet looks up another flow (one hot entry stayed in L1 and hid the
    // cost of the table lookup). The packet is rewritten in place, as a real one would be hot in
    // cache right after decryption; the flow table is not.
    for flows in [ESTABLISHED_FLOWS, ESTABLISHED_FLOWS_LARGE] {
        let mut filter = Filter::new(spec.clone(), ConntrackConfig::default());
        let web1 = filter.peer("web1").expect("web1 is a peer of db1");
        let now = Instant::now();
        for i in 0..flows {
            let syn = v4_packet(web_ip, db_ip, TCP, 1024 + i as u16, 1999, 0x02);
            assert!(matches!(
                filter.inbound("web1", &syn, now),
                netpolicy::Verdict::Allow(_)
            ));
        }
        let mut ack = v4_packet(web_ip, db_ip, TCP, 1024, 1999, 0x10);
        let mut i = 0;
        c.bench_function(
            &format!("established flow, inbound TCP, {flows} flows in turn"),
            |b| {
                b.iter(|| {
                    i = (i + 1) % flows;
                    ack[20..22].copy_from_slice(&(1024 + i as u16).to_be_bytes());
                    let v = filter.inbound(black_box("web1"), black_box(&ack), now);
                    debug_assert_eq!(v, established());
                    v
                })
            },
        );
        c.bench_function(
            &format!("established flow, inbound TCP, {flows} flows in turn, by handle"),
            |b| {
                b.iter(|| {
                    i = (i + 1) % flows;
                    ack[20..22].copy_from_slice(&(1024 + i as u16).to_be_bytes());
                    let v = filter.inbound_ref(black_box(web1), black_box(&ack), now);
                    debug_assert_eq!(v, established());
                    v
                })
            },
        );
    }

    // New flows: every packet has a new source port, 1 ms apart, so the table holds the last
    // 30 s of them (UDP_UNREPLIED_TIMEOUT): 30,000 live flows, and up to 65,536 with the
    // expired ones not yet swept. The grant that matches is the last of the 1,000.
    let mut pkt = v4_packet(web_ip, db_ip, UDP, 0, 1999, 0);
    for by_handle in [false, true] {
        let mut filter = Filter::new(spec.clone(), ConntrackConfig::default());
        let web1 = filter.peer("web1").expect("web1 is a peer of db1");
        let mut t = Instant::now();
        let mut port: u16 = 0;
        let name = if by_handle {
            "new flow, 1000 grants, allowed (UDP, last grant), by handle"
        } else {
            "new flow, 1000 grants, allowed (UDP, last grant)"
        };
        c.bench_function(name, |b| {
            b.iter(|| {
                port = port.wrapping_add(1);
                pkt[20..22].copy_from_slice(&port.to_be_bytes());
                t += Duration::from_millis(1);
                let v = if by_handle {
                    filter.inbound_ref(black_box(web1), black_box(&pkt), t)
                } else {
                    filter.inbound(black_box("web1"), black_box(&pkt), t)
                };
                debug_assert!(matches!(
                    v,
                    netpolicy::Verdict::Allow(netpolicy::AllowReason::Rule(_))
                ));
                v
            })
        });
        // 0 when a name filter on the command line (`cargo bench -- compile`) skipped it.
        let flows = filter.flow_count();
        assert!(
            flows == 0 || flows >= 30_000,
            "the new-flow bench ran with {flows} flows in the table"
        );
    }

    // The same decision with a small flow table: 64 keys in turn, each expired when it comes
    // back, so every packet is a new flow but the table stays in cache.
    let mut filter = Filter::new(spec.clone(), ConntrackConfig::default());
    let mut t = Instant::now();
    let mut port: u16 = 0;
    c.bench_function(
        "new flow, 1000 grants, allowed (UDP, last grant), 64-flow table",
        |b| {
            b.iter(|| {
                port = (port + 1) % 64;
                pkt[20..22].copy_from_slice(&port.to_be_bytes());
                t += Duration::from_secs(1);
                filter.inbound(black_box("web1"), black_box(&pkt), t)
            })
        },
    );

    let mut filter = Filter::new(spec, ConntrackConfig::default());
    let now = Instant::now();
    let denied = v4_packet(web_ip, db_ip, TCP, 40000, 22, 0x02);
    c.bench_function("new flow, 1000 grants, default deny", |b| {
        b.iter(|| filter.inbound(black_box("web1"), black_box(&denied), now))
    });
}

/// Flows the established-flow bench takes in turn: 256 KiB of slots, 8 times the L1 data cache
/// of this machine's cores (32 KiB), within their L2 (1 MiB).
const ESTABLISHED_FLOWS: usize = 4096;
/// The same with 2 MiB of slots, twice L2: most lookups go to L3.
const ESTABLISHED_FLOWS_LARGE: usize = 32_768;

fn established() -> netpolicy::Verdict {
    netpolicy::Verdict::Allow(netpolicy::AllowReason::Established)
}

/// 10,000 nodes in 20 namespaces with 500 service tags; 1,000 grants between service tags.
fn network() -> (Policy, Inventory) {
    let nodes = (0..10_000u32)
        .map(|i| {
            host(
                &format!("n{i}"),
                &format!("ns{}", i % 20),
                &[format!("svc{}", i % 500)],
                i,
            )
        })
        .collect();
    let mut src = String::new();
    for k in 0..1000u32 {
        src += &format!(
            "[[grant]]\nfrom = [\"tag:svc{}\"]\nto = [\"tag:svc{}\"]\nports = [\"tcp:{}\"]\n",
            k % 500,
            (k * 7 + 3) % 500,
            1000 + k
        );
    }
    let policy = Policy::parse(&src)
        .expect("the bench policy is valid")
        .policy;
    (policy, Inventory { nodes })
}

fn compiler(c: &mut Criterion) {
    let (policy, inventory) = network();
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function("10000 nodes x 1000 grants", |b| {
        b.iter(|| compile(&policy, &inventory))
    });

    let base = Compiler::new(&policy, &inventory);
    let newcomer = host("joiner", "ns3", &["svc42".into()], 20_000);
    group.bench_function("one node joins 10000 (affected filters recompiled)", |b| {
        b.iter_batched(
            || base.clone(),
            |mut compiler| {
                let affected = compiler.add_node(newcomer.clone());
                let specs: Vec<_> = affected
                    .iter()
                    .filter_map(|n| compiler.filter_for(n))
                    .collect();
                specs
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, decision, compiler);
criterion_main!(benches);
