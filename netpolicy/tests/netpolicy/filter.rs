//! The per-packet filter: decisions, connection tracking, ICMP errors, extension headers,
//! fragments, malformed input, timeouts, the table bound and policy changes on open flows.

use std::time::Duration;

use netpolicy::{
    AllowReason, ConntrackConfig, DenyReason, Filter, FilterSpec, NodeIdentity, RuleKind, Verdict,
};

use crate::common::*;

const WEB_DB: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432", "udp:53", "icmp"]
"#;

fn web_db() -> (NodeIdentity, NodeIdentity, Mesh) {
    let web = node("web1", 1, "production", &["web"]);
    let db = node("db1", 2, "production", &["db"]);
    let mesh = Mesh::new(WEB_DB, &[web.clone(), db.clone()]);
    (web, db, mesh)
}

#[test]
fn an_empty_spec_denies_everything() {
    let mut f = Filter::new(FilterSpec::default(), ConntrackConfig::default());
    let web = node("web1", 1, "p", &[]);
    let db = node("db1", 2, "p", &[]);
    let pkt = tcp(v4(&web), 40000, v4(&db), 5432, SYN);

    let out = f.outbound("db1", &pkt, std::time::Instant::now());
    let inb = f.inbound("db1", &pkt, std::time::Instant::now());

    assert_eq!(out, Verdict::Deny(DenyReason::UnknownPeer));
    assert_eq!(inb, Verdict::Deny(DenyReason::UnknownPeer));
}

#[test]
fn a_granted_tcp_flow_opens_and_its_replies_pass_both_ways() {
    let (web, db, mut m) = web_db();
    let syn = tcp(v4(&web), 40000, v4(&db), 5432, SYN);

    let (out, inb) = m.send("web1", "db1", &syn);

    match (&out, &inb) {
        (Verdict::Allow(AllowReason::Rule(a)), Some(Verdict::Allow(AllowReason::Rule(b)))) => {
            assert_eq!(a, b);
            assert_eq!(a.kind, RuleKind::Grant);
            assert_eq!(a.kind, "grant");
            assert_eq!(a.to_string(), "grant[0] (line 2)");
        }
        other => panic!("{other:?}"),
    }
    let synack = tcp(v4(&db), 5432, v4(&web), 40000, SYN | ACK);
    assert_eq!(
        m.send("db1", "web1", &synack),
        (
            Verdict::Allow(AllowReason::Established),
            Some(Verdict::Allow(AllowReason::Established))
        )
    );
    let ack = tcp(v4(&web), 40000, v4(&db), 5432, ACK);
    assert!(m.passes("web1", "db1", &ack));
}

#[test]
fn the_reverse_direction_stays_closed() {
    let (web, db, mut m) = web_db();
    let syn = tcp(v4(&db), 40000, v4(&web), 5432, SYN);

    assert_eq!(
        m.outbound("db1", "web1", &syn),
        Verdict::Deny(DenyReason::NoRule)
    );
    assert_eq!(
        m.inbound("web1", "db1", &syn),
        Verdict::Deny(DenyReason::NoRule)
    );
}

#[test]
fn the_receiver_checks_even_when_the_sender_let_it_out() {
    // A compromised sender skips its own filter: the receiver still refuses.
    let (web, db, mut m) = web_db();
    let syn = tcp(v4(&web), 40000, v4(&db), 22, SYN);
    assert_eq!(
        m.inbound("db1", "web1", &syn),
        Verdict::Deny(DenyReason::NoRule)
    );
}

#[test]
fn a_source_address_outside_the_peer_is_not_granted() {
    let (_, db, mut m) = web_db();
    let spoofed = tcp("10.90.0.99".parse().unwrap(), 40000, v4(&db), 5432, SYN);
    assert_eq!(
        m.inbound("db1", "web1", &spoofed),
        Verdict::Deny(DenyReason::NoRule)
    );
}

#[test]
fn a_packet_of_a_flow_opened_by_another_peer_is_not_established() {
    let web = node("web1", 1, "p", &["web"]);
    let web2 = node("web2", 3, "p", &["web"]);
    let db = node("db1", 2, "p", &["db"]);
    let mut m = Mesh::new(WEB_DB, &[web.clone(), web2, db.clone()]);
    let syn = tcp(v4(&web), 40000, v4(&db), 5432, SYN);
    assert!(m.passes("web1", "db1", &syn));

    // The same tuple arriving from web2 is judged as new: web2 may not use web1's address.
    let ack = tcp(v4(&web), 40000, v4(&db), 5432, ACK);
    assert_eq!(
        m.inbound("db1", "web2", &ack),
        Verdict::Deny(DenyReason::NoRule)
    );
}

#[test]
fn udp_replies_pass_and_udp_is_matched_by_port() {
    let (web, db, mut m) = web_db();
    assert!(m.passes("web1", "db1", &udp(v4(&web), 5000, v4(&db), 53)));
    assert!(m.passes("db1", "web1", &udp(v4(&db), 53, v4(&web), 5000)));
    assert!(!m.passes("web1", "db1", &udp(v4(&web), 5000, v4(&db), 54)));
    assert!(!m.passes("db1", "web1", &udp(v4(&db), 53, v4(&web), 5001)));
}

#[test]
fn ipv6_flows_work_like_ipv4() {
    let (web, db, mut m) = web_db();
    assert!(m.passes("web1", "db1", &tcp(v6(&web), 40000, v6(&db), 5432, SYN)));
    assert!(m.passes(
        "db1",
        "web1",
        &tcp(v6(&db), 5432, v6(&web), 40000, SYN | ACK)
    ));
    assert!(m.passes("web1", "db1", &echo(v6(&web), v6(&db), true, 9)));
    assert!(m.passes("db1", "web1", &echo(v6(&db), v6(&web), false, 9)));
    assert!(!m.passes("web1", "db1", &tcp(v6(&web), 40000, v6(&db), 5433, SYN)));
}

#[test]
fn ipv6_extension_headers_are_walked_to_the_transport_header() {
    let (web, db, mut m) = web_db();
    assert!(m.passes(
        "web1",
        "db1",
        &tcp6_with_extensions(v6(&web), 40000, v6(&db), 5432, SYN)
    ));
    assert!(!m.passes(
        "web1",
        "db1",
        &tcp6_with_extensions(v6(&web), 40000, v6(&db), 22, SYN)
    ));
}

#[test]
fn echo_replies_pass_only_for_requests_that_went_out() {
    let (web, db, mut m) = web_db();
    assert!(m.passes("web1", "db1", &echo(v4(&web), v4(&db), true, 7)));
    assert!(m.passes("db1", "web1", &echo(v4(&db), v4(&web), false, 7)));
    // Another id has no flow.
    assert!(!m.passes("db1", "web1", &echo(v4(&db), v4(&web), false, 8)));
    // A request the other way is not a reply, even with the same id.
    assert!(!m.passes("db1", "web1", &echo(v4(&db), v4(&web), true, 7)));
}

#[test]
fn icmp_errors_of_an_open_flow_are_related() {
    let (web, db, mut m) = web_db();
    let sent = udp(v4(&web), 5000, v4(&db), 53);
    assert!(m.passes("web1", "db1", &sent));

    for (kind, code) in [(3, 3), (3, 4), (11, 0), (12, 0)] {
        let err = icmp_error(v4(&db), v4(&web), kind, code, &sent);
        assert_eq!(
            m.send("db1", "web1", &err),
            (
                Verdict::Allow(AllowReason::Related),
                Some(Verdict::Allow(AllowReason::Related))
            ),
            "{kind}/{code}"
        );
    }

    let sent6 = tcp(v6(&web), 40001, v6(&db), 5432, SYN);
    assert!(m.passes("web1", "db1", &sent6));
    for (kind, code) in [(1, 4), (2, 0), (3, 0), (4, 0)] {
        let err = icmp_error(v6(&db), v6(&web), kind, code, &sent6);
        assert!(m.passes("db1", "web1", &err), "icmpv6 {kind}/{code}");
    }
}

#[test]
fn icmp_errors_about_an_echo_request_are_related() {
    let (web, db, mut m) = web_db();
    let ping = echo(v4(&web), v4(&db), true, 77);
    assert!(m.passes("web1", "db1", &ping));
    assert!(m.passes("db1", "web1", &icmp_error(v4(&db), v4(&web), 3, 1, &ping)));
}

#[test]
fn icmp_errors_without_a_flow_are_denied() {
    let (web, db, mut m) = web_db();
    let never_sent = udp(v4(&web), 5000, v4(&db), 53);
    let err = icmp_error(v4(&db), v4(&web), 3, 3, &never_sent);
    assert_eq!(
        m.inbound("web1", "db1", &err),
        Verdict::Deny(DenyReason::NoRule)
    );

    // An error about a flow of web1's, sent to someone else, is not related.
    assert!(m.passes("web1", "db1", &never_sent));
    let misdirected = icmp_error(v4(&db), "10.90.0.50".parse().unwrap(), 3, 3, &never_sent);
    assert_eq!(
        m.inbound("web1", "db1", &misdirected),
        Verdict::Deny(DenyReason::NoRule)
    );
}

#[test]
fn an_error_this_node_sends_about_a_received_flow_is_related() {
    let (web, db, mut m) = web_db();
    let dns = udp(v4(&web), 5000, v4(&db), 53);
    assert!(m.passes("web1", "db1", &dns));
    let unreachable = icmp_error(v4(&db), v4(&web), 3, 3, &dns);
    assert_eq!(
        m.outbound("db1", "web1", &unreachable),
        Verdict::Allow(AllowReason::Related)
    );
}

#[test]
fn other_icmp_types_and_protocols_need_any() {
    let (web, db, mut m) = web_db();
    assert!(!m.passes("web1", "db1", &icmp_other(v4(&web), v4(&db), 13)));
    assert!(!m.passes("web1", "db1", &icmp_other(v6(&web), v6(&db), 135)));

    let any = "[[grant]]\nfrom = [\"tag:web\"]\nto = [\"tag:db\"]\nports = [\"any\"]\n";
    let mut m = Mesh::new(any, &[web.clone(), db.clone()]);
    assert!(m.passes("web1", "db1", &icmp_other(v4(&web), v4(&db), 13)));
    let mut gre = tcp(v4(&web), 1, v4(&db), 2, 0);
    gre[9] = 47;
    assert!(m.passes("web1", "db1", &gre));
    let mut gre_back = tcp(v4(&db), 2, v4(&web), 1, 0);
    gre_back[9] = 47;
    assert_eq!(
        m.inbound("web1", "db1", &gre_back),
        Verdict::Allow(AllowReason::Established)
    );
}

#[test]
fn later_fragments_follow_their_first_fragment() {
    let (web, db, mut m) = web_db();
    let (first, second) = udp4_fragments(v4(&web), v4(&db), 53, 0x1234);
    assert!(m.passes("web1", "db1", &first));
    assert_eq!(
        m.send("web1", "db1", &second),
        (
            Verdict::Allow(AllowReason::Related),
            Some(Verdict::Allow(AllowReason::Related))
        )
    );

    let (first, second) = udp6_fragments(v6(&web), v6(&db), 53, 0xdead_beef);
    assert!(m.passes("web1", "db1", &first));
    assert!(m.passes("web1", "db1", &second));
}

#[test]
fn fragments_of_a_denied_datagram_are_denied() {
    let (web, db, mut m) = web_db();
    let (first, second) = udp4_fragments(v4(&web), v4(&db), 54, 0x4321);
    assert!(!m.passes("web1", "db1", &first));
    assert_eq!(
        m.inbound("db1", "web1", &second),
        Verdict::Deny(DenyReason::NoRule)
    );
    let (_, orphan) = udp6_fragments(v6(&web), v6(&db), 53, 5);
    assert_eq!(
        m.inbound("db1", "web1", &orphan),
        Verdict::Deny(DenyReason::NoRule)
    );
}

#[test]
fn malformed_packets_are_dropped_with_a_reason() {
    let (web, db, mut m) = web_db();
    let good = tcp(v4(&web), 40000, v4(&db), 5432, SYN);
    let good6 = tcp(v6(&web), 40000, v6(&db), 5432, SYN);
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("bad-ip-version", vec![0x50; 40]),
        ("truncated-ip", good[..19].to_vec()),
        ("bad-ipv4-total-length", good[..30].to_vec()),
        ("truncated-ip", good6[..39].to_vec()),
        ("bad-ipv6-payload-length", good6[..50].to_vec()),
    ];
    let mut bad_ihl = good.clone();
    bad_ihl[0] = 0x44;
    cases.push(("bad-ipv4-header-length", bad_ihl));
    let mut short_tcp = good.clone();
    short_tcp.truncate(30);
    short_tcp[2..4].copy_from_slice(&30u16.to_be_bytes());
    cases.push(("truncated-tcp", short_tcp));
    let mut bad_offset = good.clone();
    bad_offset[32] = 0xf0;
    cases.push(("bad-tcp-header-length", bad_offset));
    let err = icmp_error(v4(&db), v4(&web), 3, 3, &[0x45, 0, 0, 1]);
    cases.push(("bad-icmp-quoted-packet", err));
    let mut ext_loop = good6[..40].to_vec();
    ext_loop[6] = 60;
    for _ in 0..20 {
        ext_loop.extend([60, 0, 1, 4, 0, 0, 0, 0]);
    }
    let len = (ext_loop.len() - 40) as u16;
    ext_loop[4..6].copy_from_slice(&len.to_be_bytes());
    cases.push(("too-many-ipv6-extension-headers", ext_loop));

    for (want, pkt) in cases {
        let v = m.inbound("db1", "web1", &pkt);
        assert_eq!(v, Verdict::Deny(DenyReason::Malformed(want)), "{want}");
        if let Verdict::Deny(r) = v {
            assert_eq!(r.as_str(), "malformed");
        }
    }
}

#[test]
fn every_prefix_of_a_packet_is_handled_without_panic() {
    let (web, db, mut m) = web_db();
    let sent = udp(v4(&web), 5000, v4(&db), 53);
    let samples = [
        tcp(v4(&web), 1, v4(&db), 5432, SYN),
        tcp6_with_extensions(v6(&web), 1, v6(&db), 5432, SYN),
        icmp_error(v4(&db), v4(&web), 3, 4, &sent),
        udp6_fragments(v6(&web), v6(&db), 53, 1).0,
        echo(v6(&web), v6(&db), true, 1),
    ];
    for pkt in samples {
        for end in 0..pkt.len() {
            let _ = m.inbound("db1", "web1", &pkt[..end]);
            let _ = m.outbound("web1", "db1", &pkt[..end]);
        }
    }
}

#[test]
fn deny_reasons_have_stable_counter_names() {
    use netpolicy::{RuleId, RuleKind};
    let id = RuleId {
        kind: RuleKind::Deny,
        index: 0,
        line: 1,
    };
    let names: Vec<&str> = [
        DenyReason::NoRule,
        DenyReason::Rule(id),
        DenyReason::UnknownPeer,
        DenyReason::Malformed("x"),
        DenyReason::TableFull,
    ]
    .iter()
    .map(DenyReason::as_str)
    .collect();
    assert_eq!(
        names,
        [
            "no-rule",
            "denied-by-rule",
            "unknown-peer",
            "malformed",
            "table-full"
        ]
    );
}

#[test]
fn a_deny_names_itself_in_the_verdict() {
    let src = format!(
        "{WEB_DB}\n[[deny]]\nfrom = [\"tag:contractor\"]\nto = [\"*\"]\nports = [\"tcp:5432\"]\n"
    );
    let c = node("c1", 5, "p", &["web", "contractor"]);
    let db = node("db1", 2, "p", &["db"]);
    let mut m = Mesh::new(&src, &[c.clone(), db.clone()]);
    match m.inbound("db1", "c1", &tcp(v4(&c), 1000, v4(&db), 5432, SYN)) {
        Verdict::Deny(DenyReason::Rule(id)) => assert_eq!(id.to_string(), "deny[0] (line 7)"),
        other => panic!("{other:?}"),
    }
    // The deny covers only tcp:5432; the grant's icmp still passes.
    assert!(m.passes("c1", "db1", &echo(v4(&c), v4(&db), true, 1)));
}

#[test]
fn unreplied_udp_flows_time_out() {
    let (web, db, mut m) = web_db();
    assert!(m.passes("web1", "db1", &udp(v4(&web), 5000, v4(&db), 53)));
    m.now += netpolicy::UDP_UNREPLIED_TIMEOUT + Duration::from_secs(1);
    assert_eq!(
        m.inbound("web1", "db1", &udp(v4(&db), 53, v4(&web), 5000)),
        Verdict::Deny(DenyReason::NoRule)
    );
}

#[test]
fn replied_udp_flows_live_longer_and_are_refreshed_by_traffic() {
    let (web, db, mut m) = web_db();
    assert!(m.passes("web1", "db1", &udp(v4(&web), 5000, v4(&db), 53)));
    assert!(m.passes("db1", "web1", &udp(v4(&db), 53, v4(&web), 5000)));
    for _ in 0..5 {
        m.now += netpolicy::UDP_UNREPLIED_TIMEOUT + Duration::from_secs(1);
        assert!(m.passes("db1", "web1", &udp(v4(&db), 53, v4(&web), 5000)));
    }
    m.now += netpolicy::UDP_TIMEOUT + Duration::from_secs(1);
    assert!(!m.passes("db1", "web1", &udp(v4(&db), 53, v4(&web), 5000)));
}

#[test]
fn tcp_flows_end_with_reset_or_fin() {
    let (web, db, mut m) = web_db();
    let fwd = |f| tcp(v4(&web), 40000, v4(&db), 5432, f);
    let back = |f| tcp(v4(&db), 5432, v4(&web), 40000, f);
    assert!(m.passes("web1", "db1", &fwd(SYN)));
    assert!(m.passes("db1", "web1", &back(SYN | ACK)));
    // Established flows survive long idle periods.
    m.now += Duration::from_secs(3600);
    assert!(m.passes("db1", "web1", &back(ACK)));
    assert!(m.passes("db1", "web1", &back(RST)));
    m.now += netpolicy::TCP_RESET_TIMEOUT + Duration::from_secs(1);
    assert!(!m.passes("db1", "web1", &back(ACK)));

    assert!(m.passes("web1", "db1", &fwd(SYN)));
    assert!(m.passes("db1", "web1", &back(SYN | ACK)));
    assert!(m.passes("web1", "db1", &fwd(FIN | ACK)));
    assert!(m.passes("db1", "web1", &back(FIN | ACK)));
    assert!(m.passes("web1", "db1", &fwd(ACK)));
    m.now += netpolicy::TCP_CLOSING_TIMEOUT + Duration::from_secs(1);
    assert!(!m.passes("db1", "web1", &back(ACK)));
}

#[test]
fn an_unanswered_syn_times_out() {
    let (web, db, mut m) = web_db();
    assert!(m.passes("web1", "db1", &tcp(v4(&web), 40000, v4(&db), 5432, SYN)));
    m.now += netpolicy::TCP_OPENING_TIMEOUT + Duration::from_secs(1);
    assert!(!m.passes(
        "db1",
        "web1",
        &tcp(v4(&db), 5432, v4(&web), 40000, SYN | ACK)
    ));
}

#[test]
fn the_flow_table_is_bounded() {
    let web = node("web1", 1, "p", &["web"]);
    let db = node("db1", 2, "p", &["db"]);
    let net = compiled(WEB_DB, &[web.clone(), db.clone()]);
    let mut f = Filter::new(spec_of(&net, "db1"), ConntrackConfig { max_flows: 2 });
    let now = std::time::Instant::now();

    assert!(allowed(&f.inbound(
        "web1",
        &udp(v4(&web), 1, v4(&db), 53),
        now
    )));
    assert!(allowed(&f.inbound(
        "web1",
        &udp(v4(&web), 2, v4(&db), 53),
        now
    )));
    assert_eq!(
        f.inbound("web1", &udp(v4(&web), 3, v4(&db), 53), now),
        Verdict::Deny(DenyReason::TableFull)
    );
    assert_eq!(f.flow_count(), 2);
    // Open flows keep passing.
    assert_eq!(
        f.outbound("web1", &udp(v4(&db), 53, v4(&web), 1), now),
        Verdict::Allow(AllowReason::Established)
    );

    // Once they expire, the sweep makes room.
    let later = now + netpolicy::UDP_TIMEOUT + Duration::from_secs(5);
    assert!(allowed(&f.inbound(
        "web1",
        &udp(v4(&web), 3, v4(&db), 53),
        later
    )));
    assert_eq!(f.flow_count(), 1);
}

#[test]
fn a_policy_change_cuts_open_flows_it_no_longer_allows() {
    let (web, db, mut m) = web_db();
    let fwd = tcp(v4(&web), 40000, v4(&db), 5432, SYN);
    let dns = udp(v4(&web), 5000, v4(&db), 53);
    assert!(m.passes("web1", "db1", &fwd));
    assert!(m.passes(
        "db1",
        "web1",
        &tcp(v4(&db), 5432, v4(&web), 40000, SYN | ACK)
    ));
    assert!(m.passes("web1", "db1", &dns));

    // The new policy keeps DNS and drops postgres.
    let narrower = "[[grant]]\nfrom = [\"tag:web\"]\nto = [\"tag:db\"]\nports = [\"udp:53\"]\n";
    let net = compiled(narrower, &[web.clone(), db.clone()]);
    let now = m.now;
    for name in ["web1", "db1"] {
        m.filters
            .get_mut(name)
            .unwrap()
            .install(spec_of(&net, name), now);
    }

    assert_eq!(
        m.inbound("db1", "web1", &tcp(v4(&web), 40000, v4(&db), 5432, ACK)),
        Verdict::Deny(DenyReason::NoRule)
    );
    assert_eq!(
        m.inbound("web1", "db1", &tcp(v4(&db), 5432, v4(&web), 40000, ACK)),
        Verdict::Deny(DenyReason::NoRule)
    );
    assert_eq!(
        m.inbound("web1", "db1", &udp(v4(&db), 53, v4(&web), 5000)),
        Verdict::Allow(AllowReason::Established)
    );
}

#[test]
fn a_new_deny_cuts_open_flows_and_a_removed_peer_cuts_everything() {
    let (web, db, mut m) = web_db();
    assert!(m.passes("web1", "db1", &udp(v4(&web), 5000, v4(&db), 53)));
    assert!(m.passes("web1", "db1", &echo(v4(&web), v4(&db), true, 3)));

    let with_deny =
        format!("{WEB_DB}[[deny]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"udp:53\"]\n");
    let net = compiled(&with_deny, &[web.clone(), db.clone()]);
    let now = m.now;
    m.filters
        .get_mut("web1")
        .unwrap()
        .install(spec_of(&net, "web1"), now);
    // The flow is gone: the reply is judged as a new flow, which nothing grants.
    assert_eq!(
        m.inbound("web1", "db1", &udp(v4(&db), 53, v4(&web), 5000)),
        Verdict::Deny(DenyReason::NoRule)
    );
    // And the deny names itself for a new flow it matches.
    let dns = udp(v4(&web), 5001, v4(&db), 53);
    assert!(matches!(
        m.outbound("web1", "db1", &dns),
        Verdict::Deny(DenyReason::Rule(_))
    ));
    assert_eq!(
        m.inbound("web1", "db1", &echo(v4(&db), v4(&web), false, 3)),
        Verdict::Allow(AllowReason::Established)
    );

    m.filters
        .get_mut("web1")
        .unwrap()
        .install(FilterSpec::default(), now);
    assert_eq!(
        m.inbound("web1", "db1", &echo(v4(&db), v4(&web), false, 3)),
        Verdict::Deny(DenyReason::UnknownPeer)
    );
    assert_eq!(m.filters["web1"].flow_count(), 0);
}

#[test]
fn cidr_selectors_reach_routed_prefixes_and_identity_selectors_do_not() {
    let src = r#"
[[grant]]
from = ["tag:ops"]
to = ["cidr:10.95.0.0/24"]
ports = ["tcp:22"]

[[grant]]
from = ["tag:ops"]
to = ["tag:router"]
ports = ["tcp:443"]
"#;
    let ops = node("ops1", 1, "ops", &["ops"]);
    let mut router = node("router1", 9, "net", &["router"]);
    router.routes = vec!["10.95.0.0/16".parse().unwrap()];
    let mut m = Mesh::new(src, &[ops.clone(), router.clone()]);
    let behind: std::net::IpAddr = "10.95.0.7".parse().unwrap();
    let outside: std::net::IpAddr = "10.95.1.7".parse().unwrap();

    assert!(m.passes("ops1", "router1", &tcp(v4(&ops), 1, behind, 22, SYN)));
    assert!(!m.passes("ops1", "router1", &tcp(v4(&ops), 1, outside, 22, SYN)));
    assert!(!m.passes("ops1", "router1", &tcp(v4(&ops), 1, behind, 443, SYN)));
    assert!(m.passes("ops1", "router1", &tcp(v4(&ops), 1, v4(&router), 443, SYN)));
    assert!(!m.passes("ops1", "router1", &tcp(v4(&ops), 1, v4(&router), 22, SYN)));
}

#[test]
fn any_beside_a_port_range_covers_every_port() {
    // Found by the reference property: overlapping ranges of one entry once left holes in the
    // port index.
    let src = "[[grant]]\nfrom = [\"ns:x\"]\nto = [\"*\"]\nports = [\"tcp:20-21\", \"any\", \"udp:5-6\"]\n";
    let a = node("n0", 1, "x", &[]);
    let b = node("n1", 2, "x", &[]);
    let mut m = Mesh::new(src, &[a.clone(), b.clone()]);
    for port in [1, 19, 20, 21, 22, 65535] {
        assert!(
            m.passes("n0", "n1", &tcp(v4(&a), 40000, v4(&b), port, SYN)),
            "tcp {port}"
        );
        assert!(
            m.passes("n0", "n1", &udp(v4(&a), 40000, v4(&b), port)),
            "udp {port}"
        );
    }
}

#[test]
fn many_overlapping_ranges_still_decide_exactly() {
    // Past the index budget the table falls back to one segment; decisions stay the same.
    let mut src = String::new();
    for i in 0..300u32 {
        src += &format!(
            "[[grant]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"tcp:{}-{}\"]\n",
            1000 + i,
            60000 - i
        );
    }
    src += "[[deny]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"tcp:30000\"]\n";
    let a = node("n0", 1, "x", &[]);
    let b = node("n1", 2, "x", &[]);
    let mut m = Mesh::new(&src, &[a.clone(), b.clone()]);
    for (port, want) in [
        (999, false),
        (1000, true),
        (30000, false),
        (59999, true),
        (60000, true),
        (60001, false),
    ] {
        assert_eq!(
            m.passes("n0", "n1", &tcp(v4(&a), 40000, v4(&b), port, SYN)),
            want,
            "tcp {port}"
        );
    }
}

#[test]
fn an_icmpv6_error_quoting_a_packet_with_extension_headers_is_related() {
    let (web, db, mut m) = web_db();
    let sent = tcp6_with_extensions(v6(&web), 40002, v6(&db), 5432, SYN);
    assert!(m.passes("web1", "db1", &sent));
    let mut quoted = sent.clone();
    quoted.truncate(40 + 24 + 8);
    let err = icmp_error(v6(&db), v6(&web), 2, 0, &quoted);
    // The builder keeps 48 quoted bytes; give it the whole cut packet instead.
    let mut full = err[..48].to_vec();
    full.extend(&quoted);
    let len = (full.len() - 40) as u16;
    full[4..6].copy_from_slice(&len.to_be_bytes());
    assert_eq!(
        m.send("db1", "web1", &full).1,
        Some(Verdict::Allow(AllowReason::Related))
    );
}

#[test]
fn a_new_syn_on_a_closed_flow_is_judged_again() {
    let (web, db, mut m) = web_db();
    let fwd = |f| tcp(v4(&web), 40000, v4(&db), 5432, f);
    let back = |f| tcp(v4(&db), 5432, v4(&web), 40000, f);
    assert!(m.passes("web1", "db1", &fwd(SYN)));
    assert!(m.passes("db1", "web1", &back(SYN | ACK)));
    assert!(m.passes("web1", "db1", &fwd(RST)));

    // The port is reused by a new connection: a SYN opens it again, by the rules.
    assert!(matches!(
        m.send("web1", "db1", &fwd(SYN)).1,
        Some(Verdict::Allow(AllowReason::Rule(_)))
    ));
    // And a SYN the other way on the same ports is not a new flow db1 may open.
    assert!(m.passes("web1", "db1", &fwd(RST)));
    assert_eq!(
        m.outbound("db1", "web1", &back(SYN)),
        Verdict::Deny(DenyReason::NoRule)
    );
}
