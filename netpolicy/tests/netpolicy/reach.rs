//! Access review on every address: who-can-reach and the diff judge each overlay address of
//! the destination (IPv4 and IPv6) and its routed prefixes, and agree with the filter the
//! nodes run on packets to each of those addresses.

use std::net::IpAddr;

use netpolicy::{AccessDiff, Family, OpenOn, Policy, Probe, diff, who_can_reach};

use crate::common::*;

fn nodes() -> Vec<netpolicy::NodeIdentity> {
    vec![
        node("a1", 1, "prod", &["web"]),
        node("b1", 2, "prod", &["db"]),
        node("c1", 3, "prod", &[]),
    ]
}

/// The grant of the field report: to b1's IPv6 address alone.
const V6_ONLY: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["cidr:fd00:90::2/128"]
ports = ["tcp:5432"]
"#;

const V4_ONLY: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["cidr:10.90.0.2/32"]
ports = ["tcp:5432"]
"#;

const BOTH: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432"]
"#;

fn on(families: &[Family]) -> OpenOn {
    OpenOn {
        families: families.to_vec(),
        routes: Vec::new(),
    }
}

/// Whether a TCP SYN from `a` at `src` to `b` at `dst` passes both filters of a mesh.
fn syn_passes(
    source: &str,
    nodes: &[netpolicy::NodeIdentity],
    a: &str,
    src: IpAddr,
    b: &str,
    dst: IpAddr,
) -> bool {
    let mut mesh = Mesh::new(source, nodes);
    mesh.passes(a, b, &tcp(src, 40000, dst, 5432, SYN))
}

fn reach(source: &str, n: &[netpolicy::NodeIdentity]) -> Vec<(String, OpenOn)> {
    who_can_reach(&policy(source), &inventory(n), "b1", Probe::Tcp(5432))
        .unwrap()
        .into_iter()
        .map(|r| (r.node, r.open_on))
        .collect()
}

#[test]
fn an_ipv6_only_grant_is_seen_and_said_to_be_ipv6_only() {
    let n = nodes();
    assert!(syn_passes(V6_ONLY, &n, "a1", v6(&n[0]), "b1", v6(&n[1])));
    assert!(!syn_passes(V6_ONLY, &n, "a1", v4(&n[0]), "b1", v4(&n[1])));

    assert_eq!(reach(V6_ONLY, &n), [("a1".to_string(), on(&[Family::V6]))]);
    let r = &who_can_reach(&policy(V6_ONLY), &inventory(&n), "b1", Probe::Tcp(5432)).unwrap()[0];
    assert_eq!(r.rule, "grant[0] (line 2)");
    assert_eq!(r.open_on.to_string(), "IPv6 only");
}

#[test]
fn an_ipv4_only_grant_is_said_to_be_ipv4_only() {
    let n = nodes();
    assert!(syn_passes(V4_ONLY, &n, "a1", v4(&n[0]), "b1", v4(&n[1])));
    assert!(!syn_passes(V4_ONLY, &n, "a1", v6(&n[0]), "b1", v6(&n[1])));
    assert_eq!(reach(V4_ONLY, &n), [("a1".to_string(), on(&[Family::V4]))]);
}

#[test]
fn a_grant_by_tag_is_open_on_both_families() {
    let n = nodes();
    assert!(syn_passes(BOTH, &n, "a1", v4(&n[0]), "b1", v4(&n[1])));
    assert!(syn_passes(BOTH, &n, "a1", v6(&n[0]), "b1", v6(&n[1])));
    let r = reach(BOTH, &n);
    assert_eq!(r, [("a1".to_string(), on(&[Family::V4, Family::V6]))]);
    assert_eq!(r[0].1.to_string(), "IPv4 and IPv6");
}

#[test]
fn a_deny_on_one_family_leaves_the_other_open() {
    let n = nodes();
    let src = format!(
        "{BOTH}\n[[deny]]\nfrom = [\"*\"]\nto = [\"cidr:10.90.0.0/24\"]\nports = [\"any\"]\n"
    );
    assert!(!syn_passes(&src, &n, "a1", v4(&n[0]), "b1", v4(&n[1])));
    assert!(syn_passes(&src, &n, "a1", v6(&n[0]), "b1", v6(&n[1])));
    assert_eq!(reach(&src, &n), [("a1".to_string(), on(&[Family::V6]))]);
}

#[test]
fn the_diff_does_not_call_a_family_change_an_addition() {
    let inv = inventory(&nodes());
    let (v6_only, both, v4_only) = (policy(V6_ONLY), policy(BOTH), policy(V4_ONLY));

    // The field report: back from the IPv6-only grant to the tag grant a1 already had (on IPv6).
    let d = diff(&v6_only, &both, &inv);
    assert!(d.added.is_empty() && d.removed.is_empty(), "{d:?}");
    assert_eq!(d.changed.len(), 1, "{d:?}");
    let c = &d.changed[0];
    assert_eq!((c.from.as_str(), c.to.as_str()), ("a1", "b1"));
    assert_eq!(c.ports, ["tcp:5432"]);
    assert_eq!(
        (c.before.clone(), c.after.clone()),
        (on(&[Family::V6]), on(&[Family::V4, Family::V6]))
    );

    let d = diff(&v4_only, &v6_only, &inv);
    assert!(d.added.is_empty() && d.removed.is_empty(), "{d:?}");
    assert_eq!(d.changed[0].before.to_string(), "IPv4 only");
    assert_eq!(d.changed[0].after.to_string(), "IPv6 only");

    // Gone altogether: removed, saying where it was open.
    let d = diff(&v6_only, &Policy::deny_all(), &inv);
    assert_eq!(d.removed.len(), 1, "{d:?}");
    assert_eq!(d.removed[0].open_on, on(&[Family::V6]));
    assert!(d.added.is_empty() && d.changed.is_empty());

    let d = diff(&Policy::deny_all(), &v6_only, &inv);
    assert_eq!(d.added.len(), 1, "{d:?}");
    assert_eq!(d.added[0].ports, ["tcp:5432"]);
    assert_eq!(d.added[0].open_on, on(&[Family::V6]));

    assert!(diff(&v6_only, &v6_only, &inv).is_empty());
    assert_eq!(diff(&both, &both, &inv), AccessDiff::default());
}

#[test]
fn a_port_range_splits_where_the_family_changes() {
    let inv = inventory(&nodes());
    let old = policy(V6_ONLY);
    let new = policy(
        r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432-5433"]
"#,
    );
    let d = diff(&old, &new, &inv);
    assert_eq!(d.added.len(), 1, "{d:?}");
    assert_eq!(d.added[0].ports, ["tcp:5433"]);
    assert_eq!(d.added[0].open_on, on(&[Family::V4, Family::V6]));
    assert_eq!(d.changed.len(), 1, "{d:?}");
    assert_eq!(d.changed[0].ports, ["tcp:5432"]);
}

/// b1 routes 10.95.0.0/24 for hosts behind it; a1 routes 10.96.0.0/24.
fn routed_nodes() -> Vec<netpolicy::NodeIdentity> {
    let mut n = nodes();
    n[1].routes = vec!["10.95.0.0/24".parse().unwrap()];
    n[0].routes = vec!["10.96.0.0/24".parse().unwrap()];
    n
}

#[test]
fn routed_prefixes_are_judged_on_every_part() {
    let n = routed_nodes();
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    // Open to the upper half of b1's route only, the lower half denied.
    let src = r#"
[[grant]]
from = ["tag:web"]
to = ["cidr:10.95.0.0/24"]
ports = ["tcp:5432"]

[[deny]]
from = ["*"]
to = ["cidr:10.95.0.0/25"]
ports = ["any"]
"#;
    assert!(!syn_passes(src, &n, "a1", v4(&n[0]), "b1", ip("10.95.0.0")));
    assert!(syn_passes(
        src,
        &n,
        "a1",
        v4(&n[0]),
        "b1",
        ip("10.95.0.200")
    ));
    let r = reach(src, &n);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].1.families, Vec::<Family>::new());
    assert_eq!(
        r[0].1.routes,
        vec!["10.95.0.0/24".parse::<ipnet::IpNet>().unwrap()]
    );
    assert_eq!(r[0].1.to_string(), "route 10.95.0.0/24 only");

    // From the hosts behind a1's route, to b1 itself.
    let src = r#"
[[grant]]
from = ["cidr:10.96.0.0/24"]
to = ["node:b1"]
ports = ["tcp:5432"]
"#;
    assert!(syn_passes(src, &n, "a1", ip("10.96.0.7"), "b1", v4(&n[1])));
    assert_eq!(reach(src, &n), [("a1".to_string(), on(&[Family::V4]))]);
    let d = diff(&Policy::deny_all(), &policy(src), &inventory(&n));
    assert_eq!(d.added.len(), 1, "{d:?}");
    assert_eq!(
        (d.added[0].from.as_str(), d.added[0].to.as_str()),
        ("a1", "b1")
    );
}

#[test]
fn explain_at_an_ipv6_destination_sends_from_the_ipv6_address() {
    let n = nodes();
    let p = policy(
        r#"
[[grant]]
from = ["cidr:fd00:90::1/128"]
to = ["node:b1"]
ports = ["tcp:5432"]
"#,
    );
    assert!(syn_passes(
        "[[grant]]\nfrom = [\"cidr:fd00:90::1/128\"]\nto = [\"node:b1\"]\nports = [\"tcp:5432\"]\n",
        &n,
        "a1",
        v6(&n[0]),
        "b1",
        v6(&n[1])
    ));
    let e = netpolicy::explain(&p, &n[0], &n[1], Some(v6(&n[1])), Probe::Tcp(5432));
    assert!(e.allowed, "{e:?}");
    let e = netpolicy::explain(&p, &n[0], &n[1], Some(v4(&n[1])), Probe::Tcp(5432));
    assert!(!e.allowed, "{e:?}");
}

#[test]
#[ignore = "timing, run by hand"]
fn timing_of_a_large_diff() {
    let nodes: Vec<_> = (0..300u32)
        .map(|i| {
            let mut n = node(
                &format!("n{i}"),
                1,
                "prod",
                &[["web", "db", "ops"][i as usize % 3]],
            );
            n.addresses = vec![
                format!("10.90.{}.{}/32", i / 250, i % 250 + 1)
                    .parse()
                    .unwrap(),
                format!("fd00:90::{:x}/128", i + 1).parse().unwrap(),
            ];
            n
        })
        .collect();
    let src = |p: &str| {
        format!(
            "[[grant]]\nfrom = [\"tag:web\"]\nto = [\"tag:db\"]\nports = [\"{p}\"]\n[[grant]]\nfrom = [\"tag:ops\"]\nto = [\"*\"]\nports = [\"any\"]\n[[deny]]\nfrom = [\"*\"]\nto = [\"cidr:10.90.0.0/24\"]\nports = [\"tcp:22\"]\n"
        )
    };
    let (a, b) = (policy(&src("tcp:5432")), policy(&src("tcp:5433")));
    let t = std::time::Instant::now();
    let d = diff(&a, &b, &inventory(&nodes));
    eprintln!("300 nodes: {:?}, {} added", t.elapsed(), d.added.len());
    assert!(!d.added.is_empty());
}
