//! The compiler: a policy plus an inventory of nodes into one [`FilterSpec`] per node. Pure and
//! deterministic; [`Compiler`] keeps the resolved selector sets so that one node joining is
//! recompiled without redoing the whole network.

use std::collections::{BTreeMap, HashMap};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::model::{PortSpec, Rule, Selector};
use crate::{CompiledNetwork, FilterSpec, Inventory, NodeIdentity, PeerRules, Policy, RuleId};

/// One compiled grant or deny between a node and one peer, in one direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RuleEntry {
    /// The policy entry this comes from; its kind says grant or deny.
    pub(crate) rule: RuleId,
    /// Source addresses the entry covers.
    pub(crate) src: Vec<IpNet>,
    /// Destination addresses the entry covers.
    pub(crate) dst: Vec<IpNet>,
    /// Ports the entry covers.
    pub(crate) ports: Vec<PortSpec>,
}

/// A policy resolved against an inventory: for every rule, the nodes each side selects.
///
/// Build it once with [`Compiler::new`]; [`Compiler::compile`] gives the whole network,
/// [`Compiler::filter_for`] one node, and [`Compiler::add_node`] takes a node that joined and
/// says whose filters changed, so that only those are recompiled.
#[derive(Debug, Clone)]
pub struct Compiler<'p> {
    policy: &'p Policy,
    nodes: Vec<NodeIdentity>,
    by_name: HashMap<String, usize>,
    /// Per rule: the nodes its `from` side touches, ascending, with the prefixes it covers.
    from_sets: Vec<Vec<(u32, Vec<IpNet>)>>,
    /// Per rule: the nodes its `to` side touches, ascending, with the prefixes it covers.
    to_sets: Vec<Vec<(u32, Vec<IpNet>)>>,
    /// Per node: the rules whose `from` touches it.
    from_rules: Vec<Vec<u32>>,
    /// Per node: the rules whose `to` touches it.
    to_rules: Vec<Vec<u32>>,
}

impl<'p> Compiler<'p> {
    /// Resolves every rule's selectors against the inventory. A node name that appears twice
    /// keeps its first entry.
    pub fn new(policy: &'p Policy, inventory: &Inventory) -> Self {
        let mut compiler = Compiler {
            policy,
            nodes: Vec::new(),
            by_name: HashMap::new(),
            from_sets: vec![Vec::new(); policy.rules.len()],
            to_sets: vec![Vec::new(); policy.rules.len()],
            from_rules: Vec::new(),
            to_rules: Vec::new(),
        };
        for node in &inventory.nodes {
            compiler.insert(node.clone());
        }
        compiler
    }

    /// Adds a node that joined; returns the names of the nodes whose filters change (the new
    /// node and every node that may now talk to it), sorted. A name already present changes
    /// nothing and returns an empty list.
    pub fn add_node(&mut self, node: NodeIdentity) -> Vec<String> {
        let Some(idx) = self.insert(node) else {
            return Vec::new();
        };
        let mut affected: Vec<u32> = vec![idx];
        for &r in &self.from_rules[idx as usize] {
            if self.policy.rules[r as usize].id.kind.is_grant() {
                affected.extend(self.to_sets[r as usize].iter().map(|(n, _)| *n));
            }
        }
        for &r in &self.to_rules[idx as usize] {
            if self.policy.rules[r as usize].id.kind.is_grant() {
                affected.extend(self.from_sets[r as usize].iter().map(|(n, _)| *n));
            }
        }
        affected.sort_unstable();
        affected.dedup();
        let mut names: Vec<String> = affected
            .into_iter()
            .map(|i| self.nodes[i as usize].name.clone())
            .collect();
        names.sort();
        names
    }

    /// Compiles the filter of one node, or `None` when the inventory has no such node.
    pub fn filter_for(&self, name: &str) -> Option<FilterSpec> {
        let me = *self.by_name.get(name)? as u32;
        let mut peers: BTreeMap<u32, PeerRules> = BTreeMap::new();
        // Rules are in RuleId order, so entries come out sorted.
        let mut rules: Vec<(u32, bool)> = self.to_rules[me as usize]
            .iter()
            .map(|&r| (r, true))
            .chain(self.from_rules[me as usize].iter().map(|&r| (r, false)))
            .collect();
        rules.sort_unstable();
        for (r, inbound) in rules {
            let rule = &self.policy.rules[r as usize];
            let (mine, others) = if inbound {
                (&self.to_sets[r as usize], &self.from_sets[r as usize])
            } else {
                (&self.from_sets[r as usize], &self.to_sets[r as usize])
            };
            let Ok(at) = mine.binary_search_by_key(&me, |(n, _)| *n) else {
                continue;
            };
            let my_nets = &mine[at].1;
            for (other, other_nets) in others {
                if *other == me {
                    continue;
                }
                let entry = if inbound {
                    entry(rule, other_nets, my_nets)
                } else {
                    entry(rule, my_nets, other_nets)
                };
                let Some(entry) = entry else { continue };
                let rules = peers.entry(*other).or_default();
                if inbound {
                    rules.inbound.push(entry);
                } else {
                    rules.outbound.push(entry);
                }
            }
        }
        Some(self.finish(peers))
    }

    /// Compiles every node's filter.
    pub fn compile(&self) -> CompiledNetwork {
        let mut per_node: Vec<BTreeMap<u32, PeerRules>> = vec![BTreeMap::new(); self.nodes.len()];
        for (r, rule) in self.policy.rules.iter().enumerate() {
            for (a, a_nets) in &self.from_sets[r] {
                for (b, b_nets) in &self.to_sets[r] {
                    if a == b {
                        continue;
                    }
                    let Some(entry) = entry(rule, a_nets, b_nets) else {
                        continue;
                    };
                    per_node[*b as usize]
                        .entry(*a)
                        .or_default()
                        .inbound
                        .push(entry.clone());
                    per_node[*a as usize]
                        .entry(*b)
                        .or_default()
                        .outbound
                        .push(entry);
                }
            }
        }
        let mut filters = BTreeMap::new();
        for (i, peers) in per_node.into_iter().enumerate() {
            let spec = self.finish(peers);
            if !spec.peers.is_empty() {
                filters.insert(self.nodes[i].name.clone(), spec);
            }
        }
        CompiledNetwork { filters }
    }

    /// Keeps only peers with at least one grant, keyed by name.
    fn finish(&self, peers: BTreeMap<u32, PeerRules>) -> FilterSpec {
        let peers = peers
            .into_iter()
            .filter(|(_, rules)| rules.has_grant())
            .map(|(i, rules)| (self.nodes[i as usize].name.clone(), rules))
            .collect();
        FilterSpec { peers }
    }

    fn insert(&mut self, node: NodeIdentity) -> Option<u32> {
        if self.by_name.contains_key(&node.name) {
            return None;
        }
        let idx = self.nodes.len() as u32;
        let mut from_rules = Vec::new();
        let mut to_rules = Vec::new();
        for (r, rule) in self.policy.rules.iter().enumerate() {
            if rule.from.iter().any(|s| s.touches(&node)) {
                self.from_sets[r].push((idx, side_prefixes(&rule.from, &node)));
                from_rules.push(r as u32);
            }
            if rule.to.iter().any(|s| s.touches(&node)) {
                self.to_sets[r].push((idx, side_prefixes(&rule.to, &node)));
                to_rules.push(r as u32);
            }
        }
        self.from_rules.push(from_rules);
        self.to_rules.push(to_rules);
        self.by_name.insert(node.name.clone(), idx as usize);
        self.nodes.push(node);
        Some(idx)
    }
}

/// Compiles a policy for every node: see [`crate::compile`].
pub(crate) fn compile(policy: &Policy, inventory: &Inventory) -> CompiledNetwork {
    Compiler::new(policy, inventory).compile()
}

/// The entry of `rule` for flows between the given prefixes, or `None` when one side covers no
/// address.
fn entry(rule: &Rule, src: &[IpNet], dst: &[IpNet]) -> Option<RuleEntry> {
    if src.is_empty() || dst.is_empty() {
        return None;
    }
    let ports = rule.ports.clone();
    Some(RuleEntry {
        rule: rule.id,
        src: src.to_vec(),
        dst: dst.to_vec(),
        ports,
    })
}

fn side_prefixes(selectors: &[Selector], node: &NodeIdentity) -> Vec<IpNet> {
    let mut out = Vec::new();
    for sel in selectors {
        sel.prefixes_of(node, &mut out);
    }
    out.sort_unstable();
    out.dedup();
    // Drop prefixes already inside another one of the list.
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if out.iter().any(|q| *q != p && q.contains(&p)) {
            out.remove(i);
        } else {
            i += 1;
        }
    }
    out
}
