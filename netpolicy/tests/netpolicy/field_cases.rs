//! The netpolicy field cases of `shared/FIELD-CASES.md`, written in the real policy format.

use std::net::IpAddr;

use netpolicy::{AllowReason, Inventory, NodeIdentity, Policy, Probe, Verdict, explain};

use crate::common::*;

/// FC-01: the reply to an allowed ping passes on the way back; an unsolicited ping the other
/// way does not; ICMP errors of allowed flows pass as related.
#[test]
fn fc01_the_reply_to_an_allowed_ping_passes() {
    let src = r#"
[groups]
ops = ["tag:ops"]

[[grant]]
from = ["group:ops"]
to = ["node:nas1"]
ports = ["any"]
"#;
    let ops = node("ops1", 1, "it", &["ops"]);
    let nas = node("nas1", 2, "it", &[]);
    for (o, n) in [(v4(&ops), v4(&nas)), (v6(&ops), v6(&nas))] {
        let mut m = Mesh::new(src, &[ops.clone(), nas.clone()]);

        assert!(m.passes("ops1", "nas1", &echo(o, n, true, 1)));
        assert_eq!(
            m.send("nas1", "ops1", &echo(n, o, false, 1)).1,
            Some(Verdict::Allow(AllowReason::Established))
        );
        assert!(!m.passes("nas1", "ops1", &echo(n, o, true, 2)));
        assert!(!allowed(&m.inbound("ops1", "nas1", &echo(n, o, true, 2))));

        let dgram = udp(o, 5000, n, 161);
        assert!(m.passes("ops1", "nas1", &dgram));
        let port_unreachable = if o.is_ipv4() { (3, 3) } else { (1, 4) };
        let err = icmp_error(n, o, port_unreachable.0, port_unreachable.1, &dgram);
        assert_eq!(
            m.send("nas1", "ops1", &err).1,
            Some(Verdict::Allow(AllowReason::Related))
        );

        let seg = tcp(o, 40000, n, 445, SYN);
        assert!(m.passes("ops1", "nas1", &seg));
        let too_big = if o.is_ipv4() { (3, 4) } else { (2, 0) };
        let err = icmp_error(n, o, too_big.0, too_big.1, &seg);
        assert_eq!(
            m.send("nas1", "ops1", &err).1,
            Some(Verdict::Allow(AllowReason::Related))
        );
    }
}

const FC05: &str = r#"
[groups]
dev = ["tag:dev"]
support = ["tag:support"]

[[grant]]
from = ["node:admin1"]
to = ["*"]
ports = ["any"]

[[grant]]
from = ["group:dev"]
to = ["node:db1"]
ports = ["tcp:5432"]

[[grant]]
from = ["group:dev"]
to = ["node:srv1"]
ports = ["any"]

[[grant]]
from = ["group:support"]
to = ["node:db1"]
ports = ["tcp:5432"]
"#;

/// FC-05: a node in no group reaches nothing, and is told about nobody but admin1.
#[test]
fn fc05_a_node_in_no_group_gets_nothing() {
    let admin = node("admin1", 1, "corp", &[]);
    let db = node("db1", 2, "corp", &[]);
    let srv = node("srv1", 3, "corp", &[]);
    let dev = node("dev1", 4, "corp", &["dev"]);
    let stray = node("stray1", 5, "corp", &[]);
    let all = [
        admin.clone(),
        db.clone(),
        srv.clone(),
        dev.clone(),
        stray.clone(),
    ];
    let mut m = Mesh::new(FC05, &all);

    for target in [&db, &srv, &admin] {
        for pkt in [
            tcp(v4(&stray), 1, v4(target), 5432, SYN),
            echo(v4(&stray), v4(target), true, 1),
        ] {
            assert!(
                !m.passes("stray1", &target.name, &pkt),
                "stray1 -> {}",
                target.name
            );
            assert!(
                !allowed(&m.inbound(&target.name, "stray1", &pkt)),
                "at {}",
                target.name
            );
        }
    }
    let peers: Vec<&String> = m.net.filters["stray1"].peers.keys().collect();
    assert_eq!(peers, ["admin1"]);
    assert!(m.passes("admin1", "stray1", &tcp(v4(&admin), 1, v4(&stray), 22, SYN)));
    assert!(m.passes("dev1", "db1", &tcp(v4(&dev), 1, v4(&db), 5432, SYN)));
    assert!(!m.passes("dev1", "db1", &tcp(v4(&dev), 1, v4(&db), 22, SYN)));
}

/// FC-06: adding a rule for op -> c1 gives nothing to c2.
#[test]
fn fc06_adding_one_rule_gives_nothing_to_an_unrelated_source() {
    let three = r#"
[[grant]]
from = ["tag:op"]
to = ["tag:op"]
ports = ["any"]

[[grant]]
from = ["tag:c1"]
to = ["tag:c1"]
ports = ["any"]

[[grant]]
from = ["tag:c2"]
to = ["tag:c2"]
ports = ["any"]
"#;
    let four =
        format!("{three}\n[[grant]]\nfrom = [\"tag:op\"]\nto = [\"tag:c1\"]\nports = [\"any\"]\n");
    let nodes = [
        node("op1", 1, "t", &["op"]),
        node("op2", 2, "t", &["op"]),
        node("c1a", 3, "t", &["c1"]),
        node("c1b", 4, "t", &["c1"]),
        node("c2a", 5, "t", &["c2"]),
    ];
    let group = |n: &NodeIdentity| n.tags[0].clone();
    for (src, extra) in [(three.to_string(), false), (four, true)] {
        let mut m = Mesh::new(&src, &nodes);
        for a in &nodes {
            for b in &nodes {
                if a.name == b.name {
                    continue;
                }
                let (ga, gb) = (group(a), group(b));
                let want = ga == gb || (extra && ga == "op" && gb == "c1");
                let got = m.passes(&a.name, &b.name, &tcp(v4(a), 1000, v4(b), 80, SYN));
                assert_eq!(got, want, "{} -> {} (fourth rule: {extra})", a.name, b.name);
            }
        }
    }
}

/// FC-07: a `cidr:` destination of any length allows exactly the addresses inside it.
#[test]
fn fc07_prefixes_of_every_length_are_honoured() {
    let ops = node("dev1", 1, "eng", &["dev"]);
    let mut router = node("router1", 9, "net", &[]);
    router.routes = vec![
        "10.91.0.0/16".parse().unwrap(),
        "fd00:91::/48".parse().unwrap(),
    ];
    let prefixes = [
        "10.91.1.0/25",
        "10.91.1.64/26",
        "10.91.1.113/32",
        "10.91.1.112/30",
        "10.91.1.0/24",
        "10.91.0.0/16",
        "0.0.0.0/0",
        "fd00:91:0:1::/64",
        "fd00:91:0:1::40/122",
        "fd00:91:0:1::71/128",
        "fd00:91::/48",
        "::/0",
    ];
    let probes_v4 = [0u8, 1, 63, 64, 111, 112, 113, 115, 116, 127, 128, 255];
    for p in prefixes {
        let src = format!(
            "[groups]\ndev = [\"tag:dev\"]\n[[grant]]\nfrom = [\"group:dev\"]\nto = [\"cidr:{p}\"]\nports = [\"tcp:8006\"]\n"
        );
        let net: ipnet::IpNet = p.parse().unwrap();
        let mut m = Mesh::new(&src, &[ops.clone(), router.clone()]);
        let mut addrs: Vec<IpAddr> = Vec::new();
        for last in probes_v4 {
            addrs.push(format!("10.91.1.{last}").parse().unwrap());
            addrs.push(format!("fd00:91:0:1::{last:x}").parse().unwrap());
        }
        addrs.extend(
            [
                "10.91.0.5",
                "10.91.2.1",
                "10.92.0.1",
                "fd00:91:0:2::1",
                "fd00:92::1",
            ]
            .map(|a| a.parse::<IpAddr>().unwrap()),
        );
        for dst in addrs {
            let routed = router.routes.iter().any(|r| r.contains(&dst));
            let want = net.contains(&dst) && routed;
            let s = if dst.is_ipv4() { v4(&ops) } else { v6(&ops) };
            let got = m.passes("dev1", "router1", &tcp(s, 1000, dst, 8006, SYN));
            assert_eq!(got, want, "cidr:{p} probe {dst}");
            let e = explain(&policy(&src), &ops, &router, Some(dst), Probe::Tcp(8006));
            assert_eq!(e.allowed, want, "explain cidr:{p} probe {dst}");
            assert!(!m.passes("dev1", "router1", &tcp(s, 1000, dst, 8007, SYN)));
        }
    }
    // Host bits set: refused, naming the prefix that was meant.
    let err = Policy::parse(
        "[[grant]]\nfrom = [\"*\"]\nto = [\"cidr:10.91.1.113/25\"]\nports = [\"any\"]\n",
    )
    .unwrap_err();
    assert!(
        err.diagnostics[0].message.contains("cidr:10.91.1.0/25"),
        "{:?}",
        err.diagnostics
    );
}

/// FC-09: `*` beside a group is OR: every node gets in, and the check warns that the group is
/// redundant. Two groups in a list are OR too, never AND.
#[test]
fn fc09_wildcard_or_group_is_documented_or_and_warned() {
    let src = r#"
[groups]
team1 = ["tag:team1"]
team2 = ["tag:team2"]

[[grant]]
from = ["*", "group:team1"]
to = ["node:svc1"]
ports = ["any"]

[[grant]]
from = ["group:team1", "group:team2"]
to = ["node:svc2"]
ports = ["tcp:80"]
"#;
    let checked = parse(src);
    assert_eq!(checked.warnings.len(), 1, "{:#?}", checked.warnings);
    assert!(checked.warnings[0].message.contains("redundant"));
    assert_eq!(checked.warnings[0].line, 7);

    let t1 = node("a", 1, "x", &["team1"]);
    let t2 = node("b", 2, "x", &["team2"]);
    let both = node("c", 3, "x", &["team1", "team2"]);
    let none = node("d", 4, "x", &[]);
    let svc1 = node("svc1", 10, "x", &[]);
    let svc2 = node("svc2", 11, "x", &[]);
    let mut m = Mesh::new(
        src,
        &[
            t1.clone(),
            t2.clone(),
            both.clone(),
            none.clone(),
            svc1.clone(),
            svc2.clone(),
        ],
    );
    for n in [&t1, &t2, &both, &none] {
        assert!(
            m.passes(&n.name, "svc1", &echo(v4(n), v4(&svc1), true, 1)),
            "{} -> svc1",
            n.name
        );
        let want = n.name != "d";
        assert_eq!(
            m.passes(&n.name, "svc2", &tcp(v4(n), 1, v4(&svc2), 80, SYN)),
            want,
            "{} -> svc2",
            n.name
        );
    }
}

/// FC-10: the port is enforced, a narrowed rule really replaces the broad one, `icmp` works
/// without a port, ranges are inclusive.
#[test]
fn fc10_ports_are_enforced_exactly() {
    let web = node("web1", 1, "p", &["web"]);
    let db = node("db1", 2, "p", &["db"]);
    let nodes = [web.clone(), db.clone()];
    let grant = |ports: &str| {
        format!(
            "[groups]\nweb = [\"tag:web\"]\ndb = [\"tag:db\"]\n[[grant]]\nfrom = [\"group:web\"]\nto = [\"group:db\"]\nports = [{ports}]\n"
        )
    };

    // (a)
    let mut m = Mesh::new(&grant("\"tcp:5432\""), &nodes);
    assert!(m.passes("web1", "db1", &tcp(v4(&web), 1, v4(&db), 5432, SYN)));
    assert!(!m.passes("web1", "db1", &tcp(v4(&web), 1, v4(&db), 5433, SYN)));
    assert!(!m.passes("web1", "db1", &udp(v4(&web), 1, v4(&db), 5432)));
    assert!(!m.passes("web1", "db1", &echo(v4(&web), v4(&db), true, 1)));

    // (b) narrowed in place from any to tcp:1: tcp:3000 passes before, not after, open flow
    // included.
    let mut m = Mesh::new(&grant("\"any\""), &nodes);
    assert!(m.passes("web1", "db1", &tcp(v4(&web), 1, v4(&db), 3000, SYN)));
    let narrowed = compiled(&grant("\"tcp:1\""), &nodes);
    let now = m.now;
    for n in ["web1", "db1"] {
        m.filters
            .get_mut(n)
            .unwrap()
            .install(spec_of(&narrowed, n), now);
    }
    assert!(!m.passes("web1", "db1", &tcp(v4(&web), 1, v4(&db), 3000, ACK)));
    assert!(!m.passes("web1", "db1", &tcp(v4(&web), 2, v4(&db), 3000, SYN)));
    assert!(m.passes("web1", "db1", &tcp(v4(&web), 2, v4(&db), 1, SYN)));

    // (c) icmp needs no port field and means echo, v4 and v6; a rule without `ports` is refused.
    let mut m = Mesh::new(
        "[[grant]]\nfrom = [\"*\"]\nto = [\"node:db1\"]\nports = [\"icmp\"]\n",
        &nodes,
    );
    assert!(m.passes("web1", "db1", &echo(v4(&web), v4(&db), true, 1)));
    assert!(m.passes("web1", "db1", &echo(v6(&web), v6(&db), true, 1)));
    assert!(!m.passes("web1", "db1", &tcp(v4(&web), 1, v4(&db), 1, SYN)));
    let err = Policy::parse("[[grant]]\nfrom = [\"*\"]\nto = [\"node:h1\"]\n").unwrap_err();
    assert!(err.diagnostics[0].message.contains("missing field `ports`"));

    // (d)
    let mut m = Mesh::new(&grant("\"tcp:5061-65535\", \"udp:5061-65535\""), &nodes);
    for (port, want) in [(5060, false), (5061, true), (30000, true), (65535, true)] {
        assert_eq!(
            m.passes("web1", "db1", &tcp(v4(&web), 7, v4(&db), port, SYN)),
            want,
            "tcp {port}"
        );
        assert_eq!(
            m.passes("web1", "db1", &udp(v4(&web), 7, v4(&db), port)),
            want,
            "udp {port}"
        );
    }
}

/// FC-11: the address goes in the selector and the port in `ports`; that form compiles to the
/// same access as naming the node.
#[test]
fn fc11_an_ipv6_host_with_a_port_is_written_unambiguously() {
    let client = node("client1", 1, "p", &["client"]);
    let mut host = node("h5", 5, "p", &[]);
    host.addresses[1] = "fd00:90::5/128".parse().unwrap();
    let nodes = [client.clone(), host.clone()];
    let by_cidr = "[[grant]]\nfrom = [\"tag:client\"]\nto = [\"cidr:fd00:90::5/128\"]\nports = [\"tcp:22\", \"tcp:80\", \"tcp:443\", \"tcp:1000-2000\"]\n";
    let by_name = "[[grant]]\nfrom = [\"tag:client\"]\nto = [\"node:h5\"]\nports = [\"tcp:22\", \"tcp:80\", \"tcp:443\", \"tcp:1000-2000\"]\n";
    let mut a = Mesh::new(by_cidr, &nodes);
    let mut b = Mesh::new(by_name, &nodes);
    let dst: IpAddr = "fd00:90::5".parse().unwrap();
    for port in [21, 22, 23, 80, 443, 999, 1000, 1500, 2000, 2001] {
        let pkt = tcp(v6(&client), 40000, dst, port, SYN);
        assert_eq!(
            a.passes("client1", "h5", &pkt),
            b.passes("client1", "h5", &pkt),
            "port {port}"
        );
    }
    assert!(a.passes("client1", "h5", &tcp(v6(&client), 1, dst, 22, SYN)));
    assert!(!a.passes("client1", "h5", &tcp(v6(&client), 1, dst, 23, SYN)));
    // The cidr form covers only that address, not the node's IPv4 one.
    assert!(!a.passes("client1", "h5", &tcp(v4(&client), 1, v4(&host), 22, SYN)));
    assert!(b.passes("client1", "h5", &tcp(v4(&client), 1, v4(&host), 22, SYN)));
    let _ = Inventory::default();
}
