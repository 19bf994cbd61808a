//! Runs one per-packet scenario of the criterion benches a given number of times, for counting
//! instructions under valgrind, which the machine's load does not disturb:
//!
//! ```text
//! cargo build --release -p netpolicy --example packet_cost
//! netpolicy/benches/instructions.sh
//! ```
//!
//! `packet_cost SCENARIO N` sets the scenario up, then decides N packets. The script runs it
//! with two values of N and divides the difference of the instruction counts by the difference
//! of N, which leaves out the setup.

use std::hint::black_box;
use std::net::IpAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use netpolicy::{
    AllowReason, ConntrackConfig, Filter, FilterSpec, Inventory, NodeIdentity, Policy, Verdict,
    compile,
};

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

fn host(name: &str, tag: &str, i: u32) -> NodeIdentity {
    let v4: IpAddr = std::net::Ipv4Addr::from(0x6440_0000u32 + i + 1).into();
    NodeIdentity {
        name: name.to_string(),
        namespace: "prod".to_string(),
        tags: vec![tag.to_string()],
        spiffe_id: format!("spiffe://corp.example/ns/prod/node/{name}"),
        addresses: vec![v4.into()],
        routes: Vec::new(),
    }
}

/// The benches' policy: 1,000 grants from web to db, one TCP and one UDP port each.
fn spec() -> FilterSpec {
    let mut src = String::new();
    for k in 0..1000 {
        src += &format!(
            "[[grant]]\nfrom = [\"tag:web\"]\nto = [\"tag:db\"]\nports = [\"tcp:{}\", \"udp:{}\"]\n",
            1000 + k,
            1000 + k
        );
    }
    src += "[[deny]]\nfrom = [\"tag:contractor\"]\nto = [\"*\"]\nports = [\"any\"]\n";
    let policy = Policy::parse(&src)
        .expect("the bench policy is valid")
        .policy;
    let nodes = vec![host("web1", "web", 1), host("db1", "db", 2)];
    compile(&policy, &Inventory { nodes }).filters["db1"].clone()
}

const WEB: [u8; 4] = [100, 64, 0, 2];
const DB: [u8; 4] = [100, 64, 0, 3];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(scenario), Some(Ok(n))) = (args.get(1), args.get(2).map(|n| n.parse::<u64>())) else {
        eprintln!(
            "usage: packet_cost established|established-large|established-ref|\
             established-large-ref|new|new-ref|new-small|deny N"
        );
        return ExitCode::from(2);
    };
    let mut filter = Filter::new(spec(), ConntrackConfig::default());
    let web1 = filter.peer("web1").expect("web1 is a peer of db1");
    let by_ref = scenario.ends_with("-ref");
    let mut allowed = 0u64;
    let mut count = |v: Verdict| allowed += u64::from(matches!(v, Verdict::Allow(_)));
    match scenario.trim_end_matches("-ref") {
        s @ ("established" | "established-large") => {
            let flows: u16 = if s == "established" { 4096 } else { 32_768 };
            let now = Instant::now();
            for i in 0..flows {
                let syn = v4_packet(WEB, DB, TCP, 1024 + i, 1999, 0x02);
                assert!(matches!(
                    filter.inbound("web1", &syn, now),
                    Verdict::Allow(_)
                ));
            }
            let mut ack = v4_packet(WEB, DB, TCP, 1024, 1999, 0x10);
            let mut i = 0;
            for _ in 0..n {
                i = (i + 1) % flows;
                ack[20..22].copy_from_slice(&(1024 + i).to_be_bytes());
                let v = if by_ref {
                    filter.inbound_ref(black_box(web1), black_box(&ack), now)
                } else {
                    filter.inbound(black_box("web1"), black_box(&ack), now)
                };
                debug_assert_eq!(v, Verdict::Allow(AllowReason::Established));
                count(v);
            }
        }
        s @ ("new" | "new-small") => {
            let mut pkt = v4_packet(WEB, DB, UDP, 0, 1999, 0);
            let mut t = Instant::now();
            let mut port: u16 = 0;
            // Fill the table as the bench's warm-up does: 60,000 flows 1 ms apart.
            let (warm, wrap, step) = if s == "new" {
                (60_000, u32::from(u16::MAX) + 1, Duration::from_millis(1))
            } else {
                (64, 64, Duration::from_secs(1))
            };
            for _ in 0..warm + n {
                port = ((u32::from(port) + 1) % wrap) as u16;
                pkt[20..22].copy_from_slice(&port.to_be_bytes());
                t += step;
                let v = if by_ref {
                    filter.inbound_ref(black_box(web1), black_box(&pkt), t)
                } else {
                    filter.inbound(black_box("web1"), black_box(&pkt), t)
                };
                count(v);
            }
        }
        "deny" => {
            let now = Instant::now();
            let denied = v4_packet(WEB, DB, TCP, 40000, 22, 0x02);
            for _ in 0..n {
                let v = if by_ref {
                    filter.inbound_ref(black_box(web1), black_box(&denied), now)
                } else {
                    filter.inbound(black_box("web1"), black_box(&denied), now)
                };
                count(v);
            }
        }
        other => {
            eprintln!("unknown scenario {other}");
            return ExitCode::from(2);
        }
    }
    println!(
        "{scenario} {n} allowed {allowed} flows {}",
        filter.flow_count()
    );
    ExitCode::SUCCESS
}
