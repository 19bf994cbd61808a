//! Offline questions about a policy: can A reach B and why, who can reach a node, what a new
//! policy adds and removes, and the document's own `[[test]]` entries. Pure functions.
//!
//! Access review (who-can-reach, diff) judges every address a flow can use: each overlay
//! address of the destination (IPv4 and IPv6), from each address of the source in the same
//! family, and the routed prefixes of both when the inventory has them. A routed prefix is
//! judged at one address of every part of it that the policy's `cidr:` prefixes and the
//! node's own addresses and routes cut it into, so every address of it is covered exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::model::{PacketClass, PortSpec, Rule, Selector, host_prefix};
use crate::{
    Explanation, Inventory, NodeIdentity, Policy, Probe, RuleKind, TestReport, TestResult,
};

/// Why a query could not be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// The node named in the query is not in the inventory.
    #[error("node `{0}` is not in the inventory")]
    UnknownNode(String),
}

/// An IP address family. Serialized as `"ipv4"` / `"ipv6"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Family {
    /// IPv4.
    #[serde(rename = "ipv4")]
    V4,
    /// IPv6.
    #[serde(rename = "ipv6")]
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// Where on the destination node access is open: the families of its own overlay addresses,
/// and its routed prefixes (subnet routes) that some address of is open.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OpenOn {
    /// Families of the node's own addresses, sorted (IPv4 first).
    #[serde(default)]
    pub families: Vec<Family>,
    /// Routed prefixes of the node, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<IpNet>,
}

impl OpenOn {
    /// True when nothing is open.
    pub fn is_empty(&self) -> bool {
        self.families.is_empty() && self.routes.is_empty()
    }
}

impl fmt::Display for OpenOn {
    /// `IPv4 and IPv6`, `IPv6 only`, `IPv4 and route 10.9.0.0/16`, `route 10.9.0.0/16 only`,
    /// `nowhere`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self.families.iter().map(Family::to_string).collect();
        parts.extend(self.routes.iter().map(|r| format!("route {r}")));
        match parts.as_slice() {
            [] => f.write_str("nowhere"),
            [one] => write!(f, "{one} only"),
            [init @ .., last] => write!(f, "{} and {last}", init.join(", ")),
        }
    }
}

/// A node that may open a flow to the target, and the grant that lets it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reacher {
    /// The node's name.
    pub node: String,
    /// The grant that allows it at the first open address (IPv4 before IPv6, own addresses
    /// before routes), e.g. `grant[0] (line 5)`.
    pub rule: String,
    /// Where the flow is open: a node that may reach any one address is listed.
    #[serde(default)]
    pub open_on: OpenOn,
}

/// Access between two nodes that a policy change adds or removes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessChange {
    /// The node that opens the flows.
    pub from: String,
    /// The node it opens them to.
    pub to: String,
    /// The port expressions gained or lost, e.g. `tcp:5432`, `udp:1000-2000`, `icmp`,
    /// `other` (protocols besides TCP, UDP and ICMP echo), or `any` when it is everything.
    pub ports: Vec<String>,
    /// Where the ports are open: under the new policy for an addition, under the old one for
    /// a removal.
    #[serde(default)]
    pub open_on: OpenOn,
}

/// Ports a pair may use under both policies, but on other addresses: only the family (or the
/// routed prefixes) changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenOnChange {
    /// The node that opens the flows.
    pub from: String,
    /// The node it opens them to.
    pub to: String,
    /// The port expressions concerned, as in [`AccessChange::ports`].
    pub ports: Vec<String>,
    /// Where they are open under the old policy.
    pub before: OpenOn,
    /// Where they are open under the new policy.
    pub after: OpenOn,
}

/// What a new policy changes compared with the current one, pair by pair.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessDiff {
    /// Access the new policy gives that the old one did not, on any address.
    pub added: Vec<AccessChange>,
    /// Access the old policy gave that the new one does not, on any address.
    pub removed: Vec<AccessChange>,
    /// Access both give, on other families or routed prefixes.
    #[serde(default)]
    pub changed: Vec<OpenOnChange>,
}

impl AccessDiff {
    /// True when the two policies give the same access.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Answers whether `from` may open a flow to `to`: see [`crate::explain`].
pub(crate) fn explain(
    policy: &Policy,
    from: &NodeIdentity,
    to: &NodeIdentity,
    dst: Option<IpAddr>,
    probe: Probe,
) -> Explanation {
    let dst = dst.or_else(|| to.addresses.first().map(|a| a.addr()));
    // The source address a flow to `dst` would carry: one of the same family.
    let src = from
        .addresses
        .iter()
        .map(|a| a.addr())
        .find(|a| dst.is_none_or(|d| a.is_ipv4() == d.is_ipv4()))
        .or_else(|| from.addresses.first().map(|a| a.addr()));
    let class = probe.class();
    let matching: Vec<&Rule> = policy
        .rules
        .iter()
        .filter(|r| r.matches(from, src, to, dst, class))
        .collect();
    let deny = matching.iter().find(|r| r.id.kind == RuleKind::Deny);
    let grant = matching.iter().find(|r| r.id.kind == RuleKind::Grant);
    let (allowed, decided_by) = match (deny, grant) {
        (Some(d), _) => (false, d.id.to_string()),
        (None, Some(g)) => (true, g.id.to_string()),
        (None, None) => (false, "default deny".to_string()),
    };
    Explanation {
        allowed,
        decided_by,
        matching_rules: matching.iter().map(|r| r.id.to_string()).collect(),
    }
}

/// Runs the `[[test]]` entries of a policy.
pub(crate) fn run_tests(policy: &Policy) -> TestReport {
    let results = policy
        .tests
        .iter()
        .map(|t| {
            let e = explain(policy, &t.from, &t.to, t.dst, t.probe);
            let expect = if t.expect_allow { "allow" } else { "deny" };
            let at = t.dst.map(|d| format!(" at {d}")).unwrap_or_default();
            TestResult {
                line: t.line,
                description: format!(
                    "{} -> {}{at} {} (expect {expect})",
                    t.from.name, t.to.name, t.probe
                ),
                passed: e.allowed == t.expect_allow,
                decided_by: e.decided_by,
            }
        })
        .collect();
    TestReport { results }
}

/// Lists every node of `inventory` that may open a flow to `target` on `probe`, sorted by name,
/// with the grant that allows each and where the flow is open.
///
/// A node is listed when it may open the flow to any address of the target: each of its own
/// overlay addresses (IPv4 and IPv6) and every address of its routed prefixes, from any
/// address of the source of the same family (its own, or of its routed prefixes).
pub fn who_can_reach(
    policy: &Policy,
    inventory: &Inventory,
    target: &str,
    probe: Probe,
) -> Result<Vec<Reacher>, QueryError> {
    let to = inventory
        .nodes
        .iter()
        .find(|n| n.name == target)
        .ok_or_else(|| QueryError::UnknownNode(target.to_string()))?;
    let nets = policy_nets(policy);
    let dst_points = points(to, &nets);
    let class = probe.class();
    let mut out: Vec<Reacher> = Vec::new();
    for from in inventory.nodes.iter().filter(|n| n.name != target) {
        let src_points = points(from, &nets);
        let mut rule = None;
        let mut open = Places::default();
        for d in &dst_points {
            for s in src_points.iter().filter(|s| same_family(s.addr, d.addr)) {
                if let Some(grant) = decide(policy, from, s.addr, to, d.addr, class) {
                    rule.get_or_insert(grant);
                    open.extend(d.places.iter().cloned());
                    break;
                }
            }
        }
        if let Some(rule) = rule {
            out.push(Reacher {
                node: from.name.clone(),
                rule,
                open_on: open_on(&open),
            });
        }
    }
    out.sort_by(|a, b| a.node.cmp(&b.node));
    out.dedup_by(|a, b| a.node == b.node);
    Ok(out)
}

/// The grant that lets `from` at `src` open a flow of `class` to `to` at `dst`, or `None` when
/// no grant matches or a deny does.
fn decide(
    policy: &Policy,
    from: &NodeIdentity,
    src: IpAddr,
    to: &NodeIdentity,
    dst: IpAddr,
    class: PacketClass,
) -> Option<String> {
    let mut grant = None;
    for r in &policy.rules {
        if r.matches(from, Some(src), to, Some(dst), class) {
            if r.id.kind == RuleKind::Deny {
                return None;
            }
            grant.get_or_insert(r.id);
        }
    }
    grant.map(|g| g.to_string())
}

fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

/// One place of a destination node that access is reported on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Place {
    /// Its own address of this family.
    Own(Family),
    /// One of its routed prefixes.
    Route(IpNet),
}

type Places = BTreeSet<Place>;

fn open_on(places: &Places) -> OpenOn {
    let mut out = OpenOn::default();
    for p in places {
        match p {
            Place::Own(f) => out.families.push(*f),
            Place::Route(r) => out.routes.push(*r),
        }
    }
    out
}

/// An address a node can send from or receive at, and the places it stands for.
#[derive(Debug, Clone)]
struct Point {
    addr: IpAddr,
    places: Vec<Place>,
}

/// Every `cidr:` prefix of the policy's grants and denies.
fn policy_nets(policy: &Policy) -> Vec<IpNet> {
    let mut nets: Vec<IpNet> = policy
        .rules
        .iter()
        .flat_map(|r| r.from.iter().chain(&r.to))
        .filter_map(|s| match s {
            Selector::Cidr(net) => Some(*net),
            _ => None,
        })
        .collect();
    nets.sort_unstable();
    nets.dedup();
    nets
}

/// The addresses that stand for every address of `node`: its own ones, and in each routed
/// prefix one address of every part that `nets`, its own addresses and its other routes cut
/// the prefix into (prefixes nest or are disjoint, so the parts are the prefixes minus the
/// smaller ones inside them, and every address of a part is matched by the same selectors).
fn points(node: &NodeIdentity, nets: &[IpNet]) -> Vec<Point> {
    let own: Vec<IpNet> = node.addresses.iter().map(host_prefix).collect();
    let routes: Vec<IpNet> = node.routes.iter().map(IpNet::trunc).collect();
    let mut out: Vec<Point> = own
        .iter()
        .map(|a| Point {
            addr: a.addr(),
            places: vec![Place::Own(Family::of(a.addr()))],
        })
        .collect();
    let mut seen: BTreeSet<IpAddr> = out.iter().map(|p| p.addr).collect();
    for route in &routes {
        let mut cuts: Vec<IpNet> = vec![*route];
        for n in nets.iter().chain(&own).chain(&routes) {
            if let Some(both) = crate::model::intersect(route, n) {
                cuts.push(both);
            }
        }
        cuts.sort_unstable();
        cuts.dedup();
        for q in &cuts {
            let inner: Vec<IpNet> = cuts
                .iter()
                .filter(|c| *c != q && q.contains(*c))
                .copied()
                .collect();
            let Some(addr) = free_address(*q, &inner) else {
                continue;
            };
            if !seen.insert(addr) {
                continue;
            }
            let places = routes
                .iter()
                .filter(|r| r.contains(&addr))
                .map(|r| Place::Route(*r))
                .collect();
            out.push(Point { addr, places });
        }
    }
    out
}

/// An address of `net` inside none of `inner` (prefixes inside `net`), if there is one.
fn free_address(net: IpNet, inner: &[IpNet]) -> Option<IpAddr> {
    if inner.is_empty() {
        return Some(net.network());
    }
    if inner.contains(&net) {
        return None;
    }
    let halves = net.subnets(net.prefix_len() + 1).ok()?;
    for half in halves {
        if inner.iter().any(|p| p.contains(&half)) {
            continue;
        }
        let within: Vec<IpNet> = inner
            .iter()
            .filter(|p| half.contains(*p))
            .copied()
            .collect();
        if let Some(a) = free_address(half, &within) {
            return Some(a);
        }
    }
    None
}

/// Compares the access two policies give between the nodes of `inventory`.
///
/// Access is judged between each pair of distinct nodes on every address (see
/// [`who_can_reach`]), per protocol and port, grants minus denies. A port open on any address
/// under one policy and on none under the other is added or removed; a port open under both
/// but on other families or routed prefixes is in `changed`.
pub fn diff(old: &Policy, new: &Policy, inventory: &Inventory) -> AccessDiff {
    let before = access(old, inventory);
    let after = access(new, inventory);
    let mut out = AccessDiff::default();
    let pairs: BTreeSet<&(String, String)> = before.keys().chain(after.keys()).collect();
    let none = BTreeMap::new();
    for pair in pairs {
        let was = before.get(pair).unwrap_or(&none);
        let now = after.get(pair).unwrap_or(&none);
        if was == now {
            continue;
        }
        for ((old_on, new_on), ports) in regroup(was, now) {
            if old_on == new_on || ports.is_empty() {
                continue;
            }
            let (from, to, ports) = (pair.0.clone(), pair.1.clone(), ports.render());
            if old_on.is_empty() {
                let open_on = open_on(&new_on);
                out.added.push(AccessChange {
                    from,
                    to,
                    ports,
                    open_on,
                });
            } else if new_on.is_empty() {
                let open_on = open_on(&old_on);
                out.removed.push(AccessChange {
                    from,
                    to,
                    ports,
                    open_on,
                });
            } else {
                out.changed.push(OpenOnChange {
                    from,
                    to,
                    ports,
                    before: open_on(&old_on),
                    after: open_on(&new_on),
                });
            }
        }
    }
    out
}

/// Splits the ports of a pair by where they are open before and after.
fn regroup(
    was: &BTreeMap<Place, PortSet>,
    now: &BTreeMap<Place, PortSet>,
) -> BTreeMap<(Places, Places), PortSet> {
    let mut out: BTreeMap<(Places, Places), PortSet> = BTreeMap::new();
    let sets: Vec<&PortSet> = was.values().chain(now.values()).collect();
    let at = |m: &BTreeMap<Place, PortSet>, f: &dyn Fn(&PortSet) -> bool| -> Places {
        m.iter()
            .filter(|(_, s)| f(s))
            .map(|(p, _)| p.clone())
            .collect()
    };
    for tcp in [true, false] {
        let pick = |s: &PortSet| -> Intervals { if tcp { s.tcp.clone() } else { s.udp.clone() } };
        let mut cuts: BTreeSet<u32> = BTreeSet::from([0, 65536]);
        for s in &sets {
            for &(lo, hi) in &pick(s).0 {
                cuts.insert(lo);
                cuts.insert(hi + 1);
            }
        }
        let cuts: Vec<u32> = cuts.into_iter().collect();
        for w in cuts.windows(2) {
            let (lo, hi) = (w[0], w[1] - 1);
            let has = |s: &PortSet| pick(s).contains(lo);
            let key = (at(was, &has), at(now, &has));
            if key.0.is_empty() && key.1.is_empty() {
                continue;
            }
            let set = out.entry(key).or_default();
            if tcp {
                set.tcp.add(lo, hi);
            } else {
                set.udp.add(lo, hi);
            }
        }
    }
    for icmp in [true, false] {
        let has = |s: &PortSet| if icmp { s.icmp } else { s.other };
        let key = (at(was, &has), at(now, &has));
        if key.0.is_empty() && key.1.is_empty() {
            continue;
        }
        let set = out.entry(key).or_default();
        if icmp {
            set.icmp = true;
        } else {
            set.other = true;
        }
    }
    out
}

/// Effective access per ordered pair of node names, per place of the destination.
fn access(
    policy: &Policy,
    inventory: &Inventory,
) -> BTreeMap<(String, String), BTreeMap<Place, PortSet>> {
    let nodes = &inventory.nodes;
    let nets = policy_nets(policy);
    let pts: Vec<Vec<Point>> = nodes.iter().map(|n| points(n, &nets)).collect();
    // Per rule, per node, per point: whether the rule's `from` (and `to`) side selects it.
    let side = |sel: &dyn Fn(&Rule) -> &[Selector]| -> Vec<Vec<Vec<bool>>> {
        policy
            .rules
            .iter()
            .map(|r| {
                nodes
                    .iter()
                    .zip(&pts)
                    .map(|(n, ps)| {
                        ps.iter()
                            .map(|p| sel(r).iter().any(|s| s.matches(n, Some(p.addr))))
                            .collect()
                    })
                    .collect()
            })
            .collect()
    };
    let from_ok = side(&|r: &Rule| r.from.as_slice());
    let to_ok = side(&|r: &Rule| r.to.as_slice());
    let any = |ok: &[Vec<Vec<bool>>], r: usize, n: usize| ok[r][n].iter().any(|&x| x);
    let grants: Vec<usize> = (0..policy.rules.len())
        .filter(|&r| policy.rules[r].id.kind == RuleKind::Grant)
        .collect();
    let mut out = BTreeMap::new();
    let empty = PortSet::default();
    for a in 0..nodes.len() {
        for b in 0..nodes.len() {
            if a == b || nodes[a].name == nodes[b].name {
                continue;
            }
            // No grant selects both: nothing to judge.
            if !grants
                .iter()
                .any(|&r| any(&from_ok, r, a) && any(&to_ok, r, b))
            {
                continue;
            }
            let mut per_place: BTreeMap<Place, PortSet> = BTreeMap::new();
            for (di, d) in pts[b].iter().enumerate() {
                let mut open = PortSet::default();
                for (si, s) in pts[a].iter().enumerate() {
                    if !same_family(s.addr, d.addr) {
                        continue;
                    }
                    let mut granted = PortSet::default();
                    let mut denied = PortSet::default();
                    for (r, rule) in policy.rules.iter().enumerate() {
                        if from_ok[r][a][si] && to_ok[r][b][di] {
                            let into = if rule.id.kind == RuleKind::Grant {
                                &mut granted
                            } else {
                                &mut denied
                            };
                            into.add_all(&rule.ports);
                        }
                    }
                    open = open.union(&granted.minus(&denied));
                }
                if open.is_empty() {
                    continue;
                }
                for place in &d.places {
                    let at = per_place.entry(place.clone()).or_default();
                    *at = at.union(&open);
                }
            }
            per_place.retain(|_, s| *s != empty);
            if !per_place.is_empty() {
                out.insert((nodes[a].name.clone(), nodes[b].name.clone()), per_place);
            }
        }
    }
    out
}

/// A set of (protocol, port) pairs: TCP and UDP port intervals, ICMP echo, everything else.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PortSet {
    tcp: Intervals,
    udp: Intervals,
    icmp: bool,
    other: bool,
}

impl PortSet {
    fn add_all(&mut self, specs: &[PortSpec]) {
        for spec in specs {
            match *spec {
                PortSpec::Tcp(lo, hi) => self.tcp.add(u32::from(lo), u32::from(hi)),
                PortSpec::Udp(lo, hi) => self.udp.add(u32::from(lo), u32::from(hi)),
                PortSpec::Icmp => self.icmp = true,
                PortSpec::Any => {
                    self.tcp.add(0, 65535);
                    self.udp.add(0, 65535);
                    self.icmp = true;
                    self.other = true;
                }
            }
        }
    }

    fn minus(&self, other: &PortSet) -> PortSet {
        PortSet {
            tcp: self.tcp.minus(&other.tcp),
            udp: self.udp.minus(&other.udp),
            icmp: self.icmp && !other.icmp,
            other: self.other && !other.other,
        }
    }

    fn union(&self, other: &PortSet) -> PortSet {
        let mut out = self.clone();
        for &(lo, hi) in &other.tcp.0 {
            out.tcp.add(lo, hi);
        }
        for &(lo, hi) in &other.udp.0 {
            out.udp.add(lo, hi);
        }
        out.icmp |= other.icmp;
        out.other |= other.other;
        out
    }

    fn is_empty(&self) -> bool {
        self.tcp.0.is_empty() && self.udp.0.is_empty() && !self.icmp && !self.other
    }

    fn render(&self) -> Vec<String> {
        let full = vec![(0, 65535)];
        if self.tcp.0 == full && self.udp.0 == full && self.icmp && self.other {
            return vec!["any".to_string()];
        }
        let mut out = Vec::new();
        for (proto, set) in [("tcp", &self.tcp), ("udp", &self.udp)] {
            for &(lo, hi) in &set.0 {
                out.push(match (lo, hi) {
                    (0, 65535) => format!("{proto}:*"),
                    (lo, hi) if lo == hi => format!("{proto}:{lo}"),
                    (lo, hi) => format!("{proto}:{lo}-{hi}"),
                });
            }
        }
        if self.icmp {
            out.push("icmp".to_string());
        }
        if self.other {
            out.push("other".to_string());
        }
        out
    }
}

/// Sorted, disjoint, non-adjacent inclusive intervals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Intervals(Vec<(u32, u32)>);

impl Intervals {
    fn contains(&self, x: u32) -> bool {
        self.0.iter().any(|&(lo, hi)| lo <= x && x <= hi)
    }

    fn add(&mut self, lo: u32, hi: u32) {
        self.0.push((lo, hi));
        self.0.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(self.0.len());
        for &(a, b) in &self.0 {
            match merged.last_mut() {
                Some(last) if a <= last.1 + 1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        self.0 = merged;
    }

    fn minus(&self, other: &Intervals) -> Intervals {
        let mut out = Vec::new();
        for &(mut a, b) in &self.0 {
            let mut done = false;
            for &(c, d) in &other.0 {
                if d < a || c > b {
                    continue;
                }
                if c > a {
                    out.push((a, c - 1));
                }
                if d >= b {
                    done = true;
                    break;
                }
                a = d + 1;
            }
            if !done {
                out.push((a, b));
            }
        }
        Intervals(out)
    }
}

impl Probe {
    pub(crate) fn class(self) -> PacketClass {
        match self {
            Probe::Tcp(p) => PacketClass::Tcp(p),
            Probe::Udp(p) => PacketClass::Udp(p),
            Probe::Icmp => PacketClass::IcmpEcho,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_subtract_exactly() {
        let mut a = Intervals::default();
        a.add(10, 20);
        a.add(30, 40);
        let mut b = Intervals::default();
        b.add(15, 32);
        assert_eq!(a.minus(&b).0, vec![(10, 14), (33, 40)]);
        let mut all = Intervals::default();
        all.add(0, 65535);
        assert!(a.minus(&all).0.is_empty());
        a.add(21, 29);
        assert_eq!(a.0, vec![(10, 40)]);
    }
}
