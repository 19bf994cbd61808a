//! Property tests against a small reference evaluator written from the language's definition,
//! independent of the crate's own matching code.

use std::net::IpAddr;
use std::time::Instant;

use ipnet::IpNet;
use netpolicy::{
    ConntrackConfig, Family, Filter, NodeIdentity, OpenOn, Policy, Probe, explain, who_can_reach,
};
use proptest::prelude::*;

use crate::common::*;

const TAGS: [&str; 3] = ["a", "b", "c"];
const NAMESPACES: [&str; 2] = ["x", "y"];
const NODES: usize = 5;
const PREFIXES: [&str; 7] = [
    "10.90.0.0/30",
    "10.90.0.2/31",
    "10.90.0.4/32",
    "10.95.0.0/25",
    "fd00:90::/126",
    "fd00:90::4/127",
    "::/0",
];

/// A selector as the reference understands it.
#[derive(Debug, Clone)]
enum Sel {
    Any,
    Node(usize),
    Tag(usize),
    Ns(usize),
    Cidr(usize),
    Group(usize),
}

#[derive(Debug, Clone, Copy)]
enum Port {
    Tcp(u16, u16),
    Udp(u16, u16),
    Icmp,
    Any,
}

#[derive(Debug, Clone)]
struct Entry {
    deny: bool,
    from: Vec<Sel>,
    to: Vec<Sel>,
    ports: Vec<Port>,
}

#[derive(Debug, Clone, Copy)]
enum Class {
    Tcp(u16),
    Udp(u16),
    Echo,
    Other,
}

#[derive(Debug, Clone, Copy)]
struct Probe2 {
    src: usize,
    dst: usize,
    v6: bool,
    /// Send to the destination's routed prefix instead of its own address.
    routed: bool,
    class: Class,
}

/// The world: nodes and two fixed groups (group 0 = tag a or node n1, group 1 = ns y).
#[derive(Debug, Clone)]
struct World {
    nodes: Vec<NodeIdentity>,
}

fn groups() -> [Vec<Sel>; 2] {
    [vec![Sel::Tag(0), Sel::Node(1)], vec![Sel::Ns(1)]]
}

fn world_strategy() -> impl Strategy<Value = World> {
    prop::collection::vec(
        (prop::collection::vec(any::<bool>(), 3), any::<bool>()),
        NODES,
    )
    .prop_map(|specs| {
        let nodes = specs
            .into_iter()
            .enumerate()
            .map(|(i, (tags, ns))| {
                let tags: Vec<&str> = TAGS
                    .iter()
                    .zip(tags)
                    .filter(|(_, on)| *on)
                    .map(|(t, _)| *t)
                    .collect();
                let mut n = node(
                    &format!("n{i}"),
                    i as u8 + 1,
                    NAMESPACES[ns as usize],
                    &tags,
                );
                if i == NODES - 1 {
                    n.routes = vec![
                        "10.95.0.0/24".parse().unwrap(),
                        "fd00:95::/64".parse().unwrap(),
                    ];
                }
                n
            })
            .collect();
        World { nodes }
    })
}

fn sel_strategy() -> impl Strategy<Value = Sel> {
    prop_oneof![
        1 => Just(Sel::Any),
        2 => (0..NODES).prop_map(Sel::Node),
        3 => (0..TAGS.len()).prop_map(Sel::Tag),
        2 => (0..NAMESPACES.len()).prop_map(Sel::Ns),
        2 => (0..PREFIXES.len()).prop_map(Sel::Cidr),
        1 => (0..2usize).prop_map(Sel::Group),
    ]
}

fn port_strategy() -> impl Strategy<Value = Port> {
    prop_oneof![
        3 => (20u16..26, 0u16..3).prop_map(|(lo, w)| Port::Tcp(lo, lo + w)),
        2 => (20u16..26, 0u16..3).prop_map(|(lo, w)| Port::Udp(lo, lo + w)),
        1 => Just(Port::Icmp),
        1 => Just(Port::Any),
    ]
}

fn entry_strategy(deny: bool) -> impl Strategy<Value = Entry> {
    (
        prop::collection::vec(sel_strategy(), 1..3),
        prop::collection::vec(sel_strategy(), 1..3),
        prop::collection::vec(port_strategy(), 1..3),
    )
        .prop_map(move |(from, to, ports)| Entry {
            deny,
            from,
            to,
            ports,
        })
}

fn entries_strategy() -> impl Strategy<Value = Vec<Entry>> {
    (
        prop::collection::vec(entry_strategy(false), 0..5),
        prop::collection::vec(entry_strategy(true), 0..3),
    )
        .prop_map(|(mut g, d)| {
            g.extend(d);
            g
        })
}

fn class_strategy() -> impl Strategy<Value = Class> {
    prop_oneof![
        3 => (19u16..29).prop_map(Class::Tcp),
        2 => (19u16..29).prop_map(Class::Udp),
        1 => Just(Class::Echo),
        1 => Just(Class::Other),
    ]
}

fn probe_strategy() -> impl Strategy<Value = Probe2> {
    (
        0..NODES,
        0..NODES,
        any::<bool>(),
        prop::bool::weighted(0.25),
        class_strategy(),
    )
        .prop_filter("distinct nodes", |(s, d, ..)| s != d)
        .prop_map(|(src, dst, v6, routed, class)| Probe2 {
            src,
            dst,
            v6,
            routed,
            class,
        })
}

fn sel_text(s: &Sel) -> String {
    match s {
        Sel::Any => "*".into(),
        Sel::Node(i) => format!("node:n{i}"),
        Sel::Tag(t) => format!("tag:{}", TAGS[*t]),
        Sel::Ns(n) => format!("ns:{}", NAMESPACES[*n]),
        Sel::Cidr(p) => format!("cidr:{}", PREFIXES[*p]),
        Sel::Group(g) => format!("group:g{g}"),
    }
}

fn port_text(p: &Port) -> String {
    match *p {
        Port::Tcp(lo, hi) => format!("tcp:{lo}-{hi}"),
        Port::Udp(lo, hi) => format!("udp:{lo}-{hi}"),
        Port::Icmp => "icmp".into(),
        Port::Any => "any".into(),
    }
}

fn list(items: impl Iterator<Item = String>) -> String {
    items
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The document for `entries`, in the given order.
fn document(entries: &[Entry]) -> String {
    let mut out = String::from("[groups]\n");
    for (i, g) in groups().iter().enumerate() {
        out += &format!("g{i} = [{}]\n", list(g.iter().map(sel_text)));
    }
    for e in entries {
        out += if e.deny { "[[deny]]\n" } else { "[[grant]]\n" };
        out += &format!("from = [{}]\n", list(e.from.iter().map(sel_text)));
        out += &format!("to = [{}]\n", list(e.to.iter().map(sel_text)));
        out += &format!("ports = [{}]\n", list(e.ports.iter().map(port_text)));
    }
    out
}

fn compile_world(src: &str, world: &World) -> netpolicy::CompiledNetwork {
    let p = Policy::parse(src)
        .unwrap_or_else(|e| panic!("{src}\n{:#?}", e.diagnostics))
        .policy;
    netpolicy::compile(&p, &inventory(&world.nodes))
}

/// The reference: does `s` select `node` at `addr`?
fn ref_sel(s: &Sel, node: &NodeIdentity, i: usize, addr: IpAddr) -> bool {
    let own = node.addresses.iter().any(|a| a.addr() == addr);
    match s {
        Sel::Any => own,
        Sel::Node(n) => *n == i && own,
        Sel::Tag(t) => node.tags.iter().any(|x| x == TAGS[*t]) && own,
        Sel::Ns(n) => node.namespace == NAMESPACES[*n] && own,
        Sel::Cidr(p) => {
            let net: IpNet = PREFIXES[*p].parse().unwrap();
            let routed = node.routes.iter().any(|r| r.contains(&addr));
            net.contains(&addr) && (own || routed)
        }
        Sel::Group(g) => groups()[*g].iter().any(|s| ref_sel(s, node, i, addr)),
    }
}

fn ref_port(p: &Port, c: Class) -> bool {
    match (*p, c) {
        (Port::Any, _) => true,
        (Port::Tcp(lo, hi), Class::Tcp(x)) | (Port::Udp(lo, hi), Class::Udp(x)) => {
            lo <= x && x <= hi
        }
        (Port::Icmp, Class::Echo) => true,
        _ => false,
    }
}

fn ref_matches(e: &Entry, w: &World, p: &Probe2) -> bool {
    let (src, dst) = addrs(w, p);
    e.ports.iter().any(|x| ref_port(x, p.class))
        && e.from
            .iter()
            .any(|s| ref_sel(s, &w.nodes[p.src], p.src, src))
        && e.to.iter().any(|s| ref_sel(s, &w.nodes[p.dst], p.dst, dst))
}

/// The reference verdict: some grant matches and no deny does.
fn ref_allows(entries: &[Entry], w: &World, p: &Probe2) -> bool {
    entries.iter().any(|e| !e.deny && ref_matches(e, w, p))
        && !entries.iter().any(|e| e.deny && ref_matches(e, w, p))
}

fn addrs(w: &World, p: &Probe2) -> (IpAddr, IpAddr) {
    let s = &w.nodes[p.src];
    let d = &w.nodes[p.dst];
    let src = if p.v6 { v6(s) } else { v4(s) };
    let dst = if p.routed && !d.routes.is_empty() {
        if p.v6 {
            "fd00:95::9".parse().unwrap()
        } else {
            "10.95.0.9".parse().unwrap()
        }
    } else if p.v6 {
        v6(d)
    } else {
        v4(d)
    };
    (src, dst)
}

fn packet(w: &World, p: &Probe2) -> Vec<u8> {
    let (src, dst) = addrs(w, p);
    match p.class {
        Class::Tcp(port) => tcp(src, 40000, dst, port, SYN),
        Class::Udp(port) => udp(src, 40000, dst, port),
        Class::Echo => echo(src, dst, true, 1),
        Class::Other => icmp_other(src, dst, if p.v6 { 140 } else { 13 }),
    }
}

/// The filters' verdicts: (outbound at the source, inbound at the destination).
fn filter_allows(net: &netpolicy::CompiledNetwork, w: &World, p: &Probe2) -> (bool, bool) {
    let config = ConntrackConfig { max_flows: 8 };
    let now = Instant::now();
    let pkt = packet(w, p);
    let (a, b) = (&w.nodes[p.src].name, &w.nodes[p.dst].name);
    let mut fa = Filter::new(spec_of(net, a), config);
    let mut fb = Filter::new(spec_of(net, b), config);
    (
        allowed(&fa.outbound(b, &pkt, now)),
        allowed(&fb.inbound(a, &pkt, now)),
    )
}

fn all_probes(w: &World) -> Vec<Probe2> {
    let mut out = Vec::new();
    for src in 0..NODES {
        for dst in 0..NODES {
            if src == dst {
                continue;
            }
            for v6 in [false, true] {
                for routed in [false, true] {
                    if routed && w.nodes[dst].routes.is_empty() {
                        continue;
                    }
                    for class in [
                        Class::Tcp(19),
                        Class::Tcp(22),
                        Class::Tcp(25),
                        Class::Udp(21),
                        Class::Udp(27),
                        Class::Echo,
                        Class::Other,
                    ] {
                        out.push(Probe2 {
                            src,
                            dst,
                            v6,
                            routed,
                            class,
                        });
                    }
                }
            }
        }
    }
    out
}

fn verdicts(net: &netpolicy::CompiledNetwork, w: &World) -> Vec<bool> {
    all_probes(w)
        .iter()
        .map(|p| filter_allows(net, w, p).1)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn the_filter_agrees_with_the_reference(w in world_strategy(), entries in entries_strategy(), probes in prop::collection::vec(probe_strategy(), 1..24)) {
        let net = compile_world(&document(&entries), &w);
        for p in &probes {
            let want = ref_allows(&entries, &w, p);
            let (out, inb) = filter_allows(&net, &w, p);
            prop_assert_eq!(inb, want, "inbound {:?}", p);
            prop_assert_eq!(out, want, "outbound {:?}", p);
        }
    }

    #[test]
    fn explain_agrees_with_the_reference(w in world_strategy(), entries in entries_strategy(), probes in prop::collection::vec(probe_strategy(), 1..24)) {
        let policy = Policy::parse(&document(&entries)).unwrap().policy;
        for p in &probes {
            let probe = match p.class {
                Class::Tcp(x) => Probe::Tcp(x),
                Class::Udp(x) => Probe::Udp(x),
                Class::Echo => Probe::Icmp,
                Class::Other => continue,
            };
            let (_, dst) = addrs(&w, p);
            let mut from = w.nodes[p.src].clone();
            if p.v6 {
                from.addresses.swap(0, 1);
            }
            let e = explain(&policy, &from, &w.nodes[p.dst], Some(dst), probe);
            prop_assert_eq!(e.allowed, ref_allows(&entries, &w, p), "{:?}", p);
        }
    }

    #[test]
    fn with_no_grant_nothing_passes(w in world_strategy(), entries in entries_strategy()) {
        let denies: Vec<Entry> = entries.into_iter().filter(|e| e.deny).collect();
        let net = compile_world(&document(&denies), &w);
        prop_assert!(net.filters.is_empty());
        prop_assert!(verdicts(&net, &w).iter().all(|v| !v));
    }

    #[test]
    fn a_new_grant_never_enables_a_flow_whose_source_it_does_not_match(w in world_strategy(), entries in entries_strategy(), extra in entry_strategy(false)) {
        let before = verdicts(&compile_world(&document(&entries), &w), &w);
        let mut more = entries.clone();
        more.push(extra.clone());
        let after = verdicts(&compile_world(&document(&more), &w), &w);
        for (p, (b, a)) in all_probes(&w).iter().zip(before.iter().zip(&after)) {
            if *a && !*b {
                let (src, _) = addrs(&w, p);
                let matched = extra.from.iter().any(|s| ref_sel(s, &w.nodes[p.src], p.src, src));
                prop_assert!(matched, "{:?} enabled by {:?}", p, extra);
            }
        }
    }

    #[test]
    fn shuffling_entries_changes_nothing(w in world_strategy(), entries in entries_strategy(), seed in any::<u64>()) {
        let mut shuffled = entries.clone();
        // A deterministic shuffle from the seed.
        let mut s = seed | 1;
        for i in (1..shuffled.len()).rev() {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            shuffled.swap(i, (s % (i as u64 + 1)) as usize);
        }
        for e in &mut shuffled {
            e.from.reverse();
            e.ports.reverse();
        }
        let a = verdicts(&compile_world(&document(&entries), &w), &w);
        let b = verdicts(&compile_world(&document(&shuffled), &w), &w);
        prop_assert_eq!(a, b);
    }

    #[test]
    fn a_deny_always_beats_a_grant(w in world_strategy(), entries in entries_strategy(), deny in entry_strategy(true)) {
        let before = verdicts(&compile_world(&document(&entries), &w), &w);
        let mut more = entries.clone();
        more.push(deny.clone());
        let after = verdicts(&compile_world(&document(&more), &w), &w);
        for (p, (b, a)) in all_probes(&w).iter().zip(before.iter().zip(&after)) {
            prop_assert!(!*a || *b, "a deny enabled {:?}", p);
            if ref_matches(&deny, &w, p) {
                prop_assert!(!*a, "{:?} passed despite {:?}", p, deny);
            }
        }
    }
}

#[test]
fn shuffled_verdicts_are_checked_on_something() {
    // Guards the properties above against a world where nothing is ever allowed.
    let w = World {
        nodes: (0..NODES)
            .map(|i| node(&format!("n{i}"), i as u8 + 1, "x", &["a"]))
            .collect(),
    };
    let entries = vec![Entry {
        deny: false,
        from: vec![Sel::Tag(0)],
        to: vec![Sel::Any],
        ports: vec![Port::Tcp(22, 22)],
    }];
    let v = verdicts(&compile_world(&document(&entries), &w), &w);
    assert!(v.iter().any(|x| *x) && v.iter().any(|x| !*x));
}

/// Addresses that stand for every address of a node in this world, each with where it is
/// reported: its own two addresses, and one address of each part that `PREFIXES` cut its
/// routes into (10.95.0.0/24 into two halves; fd00:95::/64 is cut by none but `::/0`).
fn sample_points(n: &NodeIdentity) -> Vec<(IpAddr, Option<Family>)> {
    let mut out = vec![(v4(n), Some(Family::V4)), (v6(n), Some(Family::V6))];
    if !n.routes.is_empty() {
        for a in ["10.95.0.9", "10.95.0.200", "fd00:95::9"] {
            out.push((a.parse().unwrap(), None));
        }
    }
    out
}

fn class_packet(src: IpAddr, dst: IpAddr, class: Class) -> Vec<u8> {
    match class {
        Class::Tcp(port) => tcp(src, 40000, dst, port, SYN),
        Class::Udp(port) => udp(src, 40000, dst, port),
        Class::Echo => echo(src, dst, true, 1),
        Class::Other => icmp_other(src, dst, if src.is_ipv6() { 140 } else { 13 }),
    }
}

/// Where the filters of `net` let node `s` open a flow of `class` to node `d`.
fn filter_open_on(
    net: &netpolicy::CompiledNetwork,
    w: &World,
    s: usize,
    d: usize,
    class: Class,
) -> OpenOn {
    let config = ConntrackConfig { max_flows: 8 };
    let now = Instant::now();
    let (a, b) = (&w.nodes[s].name, &w.nodes[d].name);
    let mut on = OpenOn::default();
    for (dst, place) in sample_points(&w.nodes[d]) {
        let open = sample_points(&w.nodes[s]).into_iter().any(|(src, _)| {
            if src.is_ipv4() != dst.is_ipv4() {
                return false;
            }
            let pkt = class_packet(src, dst, class);
            let mut fa = Filter::new(spec_of(net, a), config);
            let mut fb = Filter::new(spec_of(net, b), config);
            allowed(&fa.outbound(b, &pkt, now)) && allowed(&fb.inbound(a, &pkt, now))
        });
        if !open {
            continue;
        }
        match place {
            Some(f) if !on.families.contains(&f) => on.families.push(f),
            Some(_) => {}
            None => {
                let route = w.nodes[d].routes.iter().find(|r| r.contains(&dst)).unwrap();
                if !on.routes.contains(route) {
                    on.routes.push(*route);
                }
            }
        }
    }
    on.families.sort();
    on.routes.sort();
    on
}

/// Whether a rendered port list (`tcp:22`, `udp:20-25`, `tcp:*`, `icmp`, `other`, `any`)
/// covers `class`.
fn covers(ports: &[String], class: Class) -> bool {
    ports.iter().any(|p| {
        let range = |r: &str, x: u16| -> bool {
            if r == "*" {
                return true;
            }
            let (lo, hi) = r.split_once('-').unwrap_or((r, r));
            lo.parse::<u16>().unwrap() <= x && x <= hi.parse::<u16>().unwrap()
        };
        match (p.split_once(':'), class) {
            _ if p == "any" => true,
            (Some(("tcp", r)), Class::Tcp(x)) | (Some(("udp", r)), Class::Udp(x)) => range(r, x),
            (None, Class::Echo) => p == "icmp",
            (None, Class::Other) => p == "other",
            _ => false,
        }
    })
}

const REVIEW_CLASSES: [Class; 7] = [
    Class::Tcp(19),
    Class::Tcp(22),
    Class::Tcp(25),
    Class::Udp(21),
    Class::Udp(27),
    Class::Echo,
    Class::Other,
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn who_can_reach_agrees_with_the_filter_on_every_address(w in world_strategy(), entries in entries_strategy()) {
        let src = document(&entries);
        let policy = Policy::parse(&src).unwrap().policy;
        let net = compile_world(&src, &w);
        let inv = inventory(&w.nodes);
        for d in 0..NODES {
            for (class, probe) in [(Class::Tcp(22), Probe::Tcp(22)), (Class::Udp(27), Probe::Udp(27)), (Class::Echo, Probe::Icmp)] {
                let reach = who_can_reach(&policy, &inv, &w.nodes[d].name, probe).unwrap();
                for s in (0..NODES).filter(|s| *s != d) {
                    let want = filter_open_on(&net, &w, s, d, class);
                    let got = reach.iter().find(|r| r.node == w.nodes[s].name);
                    match got {
                        Some(r) => prop_assert_eq!(&r.open_on, &want, "n{} -> n{} {:?}", s, d, class),
                        None => prop_assert!(want.is_empty(), "n{} -> n{} {:?} open on {} but not listed", s, d, class, want),
                    }
                }
            }
        }
    }

    #[test]
    fn the_diff_agrees_with_the_filter_on_every_address(w in world_strategy(), old in entries_strategy(), new in entries_strategy()) {
        let (old_src, new_src) = (document(&old), document(&new));
        let d = netpolicy::diff(
            &Policy::parse(&old_src).unwrap().policy,
            &Policy::parse(&new_src).unwrap().policy,
            &inventory(&w.nodes),
        );
        let (old_net, new_net) = (compile_world(&old_src, &w), compile_world(&new_src, &w));
        for s in 0..NODES {
            for t in (0..NODES).filter(|t| *t != s) {
                let (a, b) = (&w.nodes[s].name, &w.nodes[t].name);
                for class in REVIEW_CLASSES {
                    let before = filter_open_on(&old_net, &w, s, t, class);
                    let after = filter_open_on(&new_net, &w, s, t, class);
                    let pick = |c: &[netpolicy::AccessChange]| -> Vec<OpenOn> {
                        c.iter()
                            .filter(|c| &c.from == a && &c.to == b && covers(&c.ports, class))
                            .map(|c| c.open_on.clone())
                            .collect()
                    };
                    let added = pick(&d.added);
                    let removed = pick(&d.removed);
                    let changed: Vec<(OpenOn, OpenOn)> = d
                        .changed
                        .iter()
                        .filter(|c| &c.from == a && &c.to == b && covers(&c.ports, class))
                        .map(|c| (c.before.clone(), c.after.clone()))
                        .collect();
                    let what = format!("{a} -> {b} {class:?}: {before} then {after}; {d:?}");
                    if before == after {
                        prop_assert!(added.is_empty() && removed.is_empty() && changed.is_empty(), "{}", what);
                    } else if before.is_empty() {
                        prop_assert_eq!(added, vec![after.clone()], "{}", what);
                        prop_assert!(removed.is_empty() && changed.is_empty(), "{}", what);
                    } else if after.is_empty() {
                        prop_assert_eq!(removed, vec![before.clone()], "{}", what);
                        prop_assert!(added.is_empty() && changed.is_empty(), "{}", what);
                    } else {
                        prop_assert_eq!(changed, vec![(before.clone(), after.clone())], "{}", what);
                        prop_assert!(added.is_empty() && removed.is_empty(), "{}", what);
                    }
                }
            }
        }
    }
}

#[test]
fn the_review_properties_see_each_family_alone() {
    // Guards the two properties above: a world where one family alone is open exists.
    let w = World {
        nodes: (0..NODES)
            .map(|i| node(&format!("n{i}"), i as u8 + 1, "x", &["a"]))
            .collect(),
    };
    let entries = vec![Entry {
        deny: false,
        from: vec![Sel::Tag(0)],
        to: vec![Sel::Cidr(4)],
        ports: vec![Port::Tcp(22, 22)],
    }];
    let net = compile_world(&document(&entries), &w);
    let on = filter_open_on(&net, &w, 0, 1, Class::Tcp(22));
    assert_eq!(on.families, [Family::V6]);
    let p = Policy::parse(&document(&entries)).unwrap().policy;
    let r = who_can_reach(&p, &inventory(&w.nodes), "n1", Probe::Tcp(22)).unwrap();
    assert_eq!(r.iter().find(|r| r.node == "n0").unwrap().open_on, on);
}
