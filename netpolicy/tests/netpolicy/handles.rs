//! Peer handles: `Filter::peer` resolves a name once; `inbound_ref` and `outbound_ref` decide
//! as the name-taking methods do; a handle outlives installs that keep its peer and never
//! reaches another peer.

use std::time::{Duration, Instant};

use netpolicy::{AllowReason, ConntrackConfig, DenyReason, Filter, Verdict};

use crate::common::*;

const POLICY: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432", "udp:53", "icmp"]
"#;

/// Every kind of packet web1 and db1 exchange, from db1's side: (inbound?, packet).
fn traffic(web: &netpolicy::NodeIdentity, db: &netpolicy::NodeIdentity) -> Vec<(bool, Vec<u8>)> {
    let (w, d) = (v4(web), v4(db));
    let (w6, d6) = (v6(web), v6(db));
    let syn = tcp(w, 40000, d, 5432, SYN);
    let mut out = vec![
        (true, syn.clone()),
        (false, tcp(d, 5432, w, 40000, SYN | ACK)),
        (true, tcp(w, 40000, d, 5432, ACK)),
        (true, tcp(w, 40001, d, 22, SYN)),
        (true, tcp(w6, 40002, d6, 5432, SYN)),
        (false, tcp(d6, 5432, w6, 40002, SYN | ACK)),
        (true, udp(w, 5000, d, 53)),
        (false, udp(d, 53, w, 5000)),
        (false, udp(d, 53, w, 5001)),
        (true, echo(w, d, true, 7)),
        (false, echo(d, w, false, 7)),
        (false, icmp_error(d, w, 3, 3, &syn)),
        (true, tcp(w, 40000, d, 5432, FIN | ACK)),
        (false, tcp(d, 5432, w, 40000, FIN | ACK)),
        (true, tcp(w, 40000, d, 5432, RST)),
        (true, vec![0x45, 0, 0]),
    ];
    let (first, second) = udp4_fragments(w, d, 53, 99);
    out.push((true, first));
    out.push((true, second));
    out
}

#[test]
fn a_handle_decides_as_the_name_does() {
    let web = node("web1", 1, "p", &["web"]);
    let db = node("db1", 2, "p", &["db"]);
    let net = compiled(POLICY, &[web.clone(), db.clone()]);
    let mut by_name = Filter::new(spec_of(&net, "db1"), ConntrackConfig::default());
    let mut by_ref = Filter::new(spec_of(&net, "db1"), ConntrackConfig::default());
    let peer = by_ref.peer("web1").expect("web1 is db1's peer");
    assert_eq!(by_ref.peer_name(peer), Some("web1"));

    let mut now = Instant::now();
    let mut allowed_count = 0;
    for (inbound, pkt) in traffic(&web, &db) {
        now += Duration::from_millis(10);
        let (a, b) = if inbound {
            (
                by_name.inbound("web1", &pkt, now),
                by_ref.inbound_ref(peer, &pkt, now),
            )
        } else {
            (
                by_name.outbound("web1", &pkt, now),
                by_ref.outbound_ref(peer, &pkt, now),
            )
        };
        assert_eq!(a, b, "packet {pkt:02x?}");
        allowed_count += usize::from(allowed(&a));
    }
    // The sequence exercises both outcomes.
    assert!(allowed_count >= 8, "{allowed_count} allowed");
    assert_eq!(by_name.flow_count(), by_ref.flow_count());
}

#[test]
fn a_handle_stays_valid_while_its_peer_stays_and_its_flows_stay_open() {
    let web = node("web1", 1, "p", &["web"]);
    let db = node("db1", 2, "p", &["db"]);
    let other = node("web2", 3, "p", &["web"]);
    let net = compiled(POLICY, &[web.clone(), db.clone()]);
    let mut f = Filter::new(spec_of(&net, "db1"), ConntrackConfig::default());
    let peer = f.peer("web1").expect("web1 is db1's peer");
    let now = Instant::now();
    assert!(allowed(&f.inbound_ref(
        peer,
        &tcp(v4(&web), 40000, v4(&db), 5432, SYN),
        now
    )));

    // A new spec that adds a peer and keeps web1: same handle, same open flow.
    let bigger = compiled(POLICY, &[web.clone(), db.clone(), other]);
    f.install(spec_of(&bigger, "db1"), now);
    assert_eq!(f.peer("web1"), Some(peer));
    assert_eq!(
        f.outbound_ref(peer, &tcp(v4(&db), 5432, v4(&web), 40000, SYN | ACK), now),
        Verdict::Allow(AllowReason::Established)
    );
    assert!(f.peer("web2").is_some());
    assert_ne!(f.peer("web2"), Some(peer));
}

#[test]
fn a_handle_of_a_peer_that_left_is_refused_even_when_its_slot_is_taken_again() {
    let web = node("web1", 1, "p", &["web"]);
    let db = node("db1", 2, "p", &["db"]);
    let web2 = node("web2", 3, "p", &["web"]);
    let with_web1 = compiled(POLICY, &[web.clone(), db.clone()]);
    let with_web2 = compiled(POLICY, &[web2.clone(), db.clone()]);
    let mut f = Filter::new(spec_of(&with_web1, "db1"), ConntrackConfig::default());
    let old = f.peer("web1").expect("web1 is db1's peer");
    let now = Instant::now();
    let syn = tcp(v4(&web), 40000, v4(&db), 5432, SYN);
    assert!(allowed(&f.inbound_ref(old, &syn, now)));

    // web1 leaves and web2 comes in the same install: web2 takes the free slot.
    f.install(spec_of(&with_web2, "db1"), now);
    assert_eq!(f.peer("web1"), None);
    assert_eq!(f.peer_name(old), None);
    let new = f.peer("web2").expect("web2 is db1's peer now");
    assert_ne!(new, old);
    // The old handle reaches nobody, not even for a packet web2 would be allowed to send.
    let syn2 = tcp(v4(&web2), 40000, v4(&db), 5432, SYN);
    assert_eq!(
        f.inbound_ref(old, &syn2, now),
        Verdict::Deny(DenyReason::UnknownPeer)
    );
    assert!(allowed(&f.inbound_ref(new, &syn2, now)));
    // web1's flow went with it: web2 cannot use it, and neither can web1 by name.
    let ack = tcp(v4(&web), 40000, v4(&db), 5432, ACK);
    assert!(!allowed(&f.inbound_ref(new, &ack, now)));
    assert_eq!(
        f.inbound("web1", &ack, now),
        Verdict::Deny(DenyReason::UnknownPeer)
    );

    // web1 comes back: its old handle stays refused; a new one works.
    f.install(spec_of(&with_web1, "db1"), now);
    assert_eq!(
        f.inbound_ref(old, &syn, now),
        Verdict::Deny(DenyReason::UnknownPeer)
    );
    let again = f.peer("web1").expect("web1 is back");
    assert!(allowed(&f.inbound_ref(again, &syn, now)));
    assert_eq!(f.peer_name(again), Some("web1"));
}

#[test]
fn a_handle_of_another_filter_is_refused() {
    let web = node("web1", 1, "p", &["web"]);
    let db = node("db1", 2, "p", &["db"]);
    let net = compiled(POLICY, &[web.clone(), db.clone()]);
    let first = Filter::new(spec_of(&net, "db1"), ConntrackConfig::default());
    let mut second = Filter::new(spec_of(&net, "db1"), ConntrackConfig::default());
    let foreign = first.peer("web1").expect("web1 is db1's peer");
    let syn = tcp(v4(&web), 40000, v4(&db), 5432, SYN);
    assert_eq!(
        second.inbound_ref(foreign, &syn, Instant::now()),
        Verdict::Deny(DenyReason::UnknownPeer)
    );
    assert_eq!(second.peer_name(foreign), None);
    let own = second.peer("web1").expect("web1 is db1's peer");
    assert!(allowed(&second.inbound_ref(own, &syn, Instant::now())));
}
