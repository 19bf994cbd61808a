//! The per-packet path allocates nothing: an allocator that counts proves it for established
//! flows, new flows, denied and malformed packets.

#![expect(
    unsafe_code,
    reason = "a counting global allocator that forwards to the system one"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use netpolicy::{ConntrackConfig, Filter, Inventory, NodeIdentity, Policy, Verdict, compile};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn node(name: &str, n: u8, tags: &[&str]) -> NodeIdentity {
    NodeIdentity {
        name: name.into(),
        namespace: "p".into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        spiffe_id: String::new(),
        addresses: vec![format!("10.90.0.{n}/32").parse().unwrap()],
        routes: Vec::new(),
    }
}

fn udp(sport: u16, dport: u16, reply: bool) -> Vec<u8> {
    let (src, dst) = if reply {
        ([10, 90, 0, 2], [10, 90, 0, 1])
    } else {
        ([10, 90, 0, 1], [10, 90, 0, 2])
    };
    let (sport, dport) = if reply {
        (dport, sport)
    } else {
        (sport, dport)
    };
    let mut p = vec![0x45, 0, 0, 36, 0, 0, 0x40, 0, 64, 17, 0, 0];
    p.extend(src);
    p.extend(dst);
    p.extend(sport.to_be_bytes());
    p.extend(dport.to_be_bytes());
    p.extend([0, 16, 0, 0]);
    p.extend([0u8; 8]);
    p
}

#[test]
fn deciding_packets_allocates_nothing() {
    let src = "[[grant]]\nfrom = [\"tag:web\"]\nto = [\"tag:db\"]\nports = [\"udp:53\", \"tcp:1-1000\"]\n";
    let policy = Policy::parse(src).unwrap().policy;
    let net = compile(
        &policy,
        &Inventory {
            nodes: vec![node("web1", 1, &["web"]), node("db1", 2, &["db"])],
        },
    );
    let mut filter = Filter::new(
        net.filters["db1"].clone(),
        ConntrackConfig { max_flows: 4096 },
    );
    let packets: Vec<Vec<u8>> = (0..2000u16).map(|i| udp(10_000 + i, 53, false)).collect();
    let replies: Vec<Vec<u8>> = (0..2000u16).map(|i| udp(10_000 + i, 53, true)).collect();
    let denied = udp(1, 54, false);
    let garbage = vec![0x45u8, 0, 0];
    // A first fragment (more fragments, offset 0) and its second fragment.
    let mut first = udp(9, 53, false);
    first[6] = 0x20;
    let mut second = udp(9, 53, false);
    second[6] = 0;
    second[7] = 2;
    let mut now = Instant::now();

    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let mut passed = 0;
    for round in 0..3 {
        for (p, r) in packets.iter().zip(&replies) {
            passed += usize::from(matches!(filter.inbound("web1", p, now), Verdict::Allow(_)));
            passed += usize::from(matches!(filter.outbound("web1", r, now), Verdict::Allow(_)));
            let _ = filter.inbound("web1", &denied, now);
            let _ = filter.inbound("stranger", p, now);
            let _ = filter.inbound("web1", &garbage, now);
            let _ = filter.inbound("web1", &first, now);
            passed += usize::from(matches!(
                filter.inbound("web1", &second, now),
                Verdict::Allow(_)
            ));
        }
        // Let every flow expire, so that the next round opens new flows in place.
        now += Duration::from_secs(600 * (round + 1));
    }
    let after = ALLOCATIONS.load(Ordering::Relaxed);

    assert_eq!(passed, 3 * 3 * 2000);
    assert_eq!(after - before, 0, "allocations on the packet path");
}
