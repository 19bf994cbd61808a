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

    let mut filter = Filter::new(spec.clone(), ConntrackConfig::default());
    let now = Instant::now();
    let syn = v4_packet(web_ip, db_ip, TCP, 40000, 1999, 0x02);
    assert!(matches!(
        filter.inbound("web1", &syn, now),
        netpolicy::Verdict::Allow(_)
    ));
    let ack = v4_packet(web_ip, db_ip, TCP, 40000, 1999, 0x10);
    c.bench_function("established flow, inbound TCP", |b| {
        b.iter(|| filter.inbound(black_box("web1"), black_box(&ack), now))
    });

    let mut filter = Filter::new(spec.clone(), ConntrackConfig::default());
    let mut pkt = v4_packet(web_ip, db_ip, UDP, 0, 1999, 0);
    let mut t = Instant::now();
    let mut port: u16 = 0;
    c.bench_function("new flow, 1000 grants, allowed (UDP, last grant)", |b| {
        b.iter(|| {
            port = port.wrapping_add(1);
            pkt[20..22].copy_from_slice(&port.to_be_bytes());
            t += Duration::from_millis(1);
            let v = filter.inbound(black_box("web1"), black_box(&pkt), t);
            debug_assert!(matches!(
                v,
                netpolicy::Verdict::Allow(netpolicy::AllowReason::Rule(_))
            ));
            v
        })
    });

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
    let denied = v4_packet(web_ip, db_ip, TCP, 40000, 22, 0x02);
    c.bench_function("new flow, 1000 grants, default deny", |b| {
        b.iter(|| filter.inbound(black_box("web1"), black_box(&denied), now))
    });
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
