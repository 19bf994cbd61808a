//! Offline questions about a policy: can A reach B and why, who can reach a node, what a new
//! policy adds and removes, and the document's own `[[test]]` entries. Pure functions.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::model::{PacketClass, PortSpec, Rule};
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

/// A node that may open a flow to the target, and the grant that lets it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reacher {
    /// The node's name.
    pub node: String,
    /// The grant that allows it, e.g. `grant[0] (line 5)`.
    pub rule: String,
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
}

/// What a new policy changes compared with the current one, pair by pair.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessDiff {
    /// Access the new policy gives that the old one did not.
    pub added: Vec<AccessChange>,
    /// Access the old policy gave that the new one does not.
    pub removed: Vec<AccessChange>,
}

impl AccessDiff {
    /// True when the two policies give the same access.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
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
    let src = from.addresses.first().map(|a| a.addr());
    let dst = dst.or_else(|| to.addresses.first().map(|a| a.addr()));
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
/// with the grant that allows each.
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
    let mut out: Vec<Reacher> = inventory
        .nodes
        .iter()
        .filter(|n| n.name != target)
        .filter_map(|from| {
            let e = explain(policy, from, to, None, probe);
            e.allowed.then(|| Reacher {
                node: from.name.clone(),
                rule: e.decided_by,
            })
        })
        .collect();
    out.sort_by(|a, b| a.node.cmp(&b.node));
    out.dedup_by(|a, b| a.node == b.node);
    Ok(out)
}

/// Compares the access two policies give between the nodes of `inventory`.
///
/// Access is taken between each pair of distinct nodes at their first own address (the
/// source's and the destination's), per protocol and port, grants minus denies. Flows towards
/// routed prefixes (`cidr:` selectors matching a node's routes) are not part of the diff.
pub fn diff(old: &Policy, new: &Policy, inventory: &Inventory) -> AccessDiff {
    let before = access(old, inventory);
    let after = access(new, inventory);
    let mut out = AccessDiff::default();
    let empty = PortSet::default();
    for (pair, now) in &after {
        let was = before.get(pair).unwrap_or(&empty);
        let gained = now.minus(was);
        if !gained.is_empty() {
            out.added.push(change(pair, &gained));
        }
    }
    for (pair, was) in &before {
        let now = after.get(pair).unwrap_or(&empty);
        let lost = was.minus(now);
        if !lost.is_empty() {
            out.removed.push(change(pair, &lost));
        }
    }
    out
}

fn change(pair: &(String, String), ports: &PortSet) -> AccessChange {
    AccessChange {
        from: pair.0.clone(),
        to: pair.1.clone(),
        ports: ports.render(),
    }
}

/// Effective access per ordered pair of node names.
fn access(policy: &Policy, inventory: &Inventory) -> BTreeMap<(String, String), PortSet> {
    let mut granted: BTreeMap<(usize, usize), PortSet> = BTreeMap::new();
    let mut denied: BTreeMap<(usize, usize), PortSet> = BTreeMap::new();
    let nodes = &inventory.nodes;
    let first = |n: &NodeIdentity| n.addresses.first().map(|a| a.addr());
    for rule in &policy.rules {
        let sources: Vec<usize> = (0..nodes.len())
            .filter(|&i| {
                rule.from
                    .iter()
                    .any(|s| s.matches(&nodes[i], first(&nodes[i])))
            })
            .collect();
        let targets: Vec<usize> = (0..nodes.len())
            .filter(|&i| {
                rule.to
                    .iter()
                    .any(|s| s.matches(&nodes[i], first(&nodes[i])))
            })
            .collect();
        let into = if rule.id.kind == RuleKind::Grant {
            &mut granted
        } else {
            &mut denied
        };
        for &a in &sources {
            for &b in &targets {
                if a != b {
                    into.entry((a, b)).or_default().add_all(&rule.ports);
                }
            }
        }
    }
    let empty = PortSet::default();
    granted
        .into_iter()
        .filter_map(|((a, b), set)| {
            let set = set.minus(denied.get(&(a, b)).unwrap_or(&empty));
            (!set.is_empty()).then(|| ((nodes[a].name.clone(), nodes[b].name.clone()), set))
        })
        .collect()
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
