//! The ztnet policy engine: the policy document, its validation, the compiler that turns a
//! policy plus an inventory of nodes into one filter per node, and the stateful per-packet
//! filter that a node runs. No I/O, no async, no clock: time comes in as an argument.
//!
//! CONTRACT (shared with `node`, `coordinator`, `cli`): the public items below are what the other
//! crates call; keep the signatures.
//!
//! The layers, top to bottom:
//! - the document: [`Policy::parse`] validates TOML with a line and column for every finding
//!   ([`render_diagnostics`] prints them), and [`Policy::run_tests`] runs its `[[test]]`s;
//! - queries on a policy: [`explain`], [`who_can_reach`], [`diff`];
//! - the compiler: [`compile`] (or [`Compiler`], which also recompiles after a node joins)
//!   turns a policy and an [`Inventory`] into one [`FilterSpec`] per node;
//! - the filter: [`Filter`] decides each packet a node sends or receives, with connection
//!   tracking, from a [`FilterSpec`].
//!
//! The language itself is described in `docs/policy.md`.

#![warn(missing_docs)]

mod compile;
mod filter;
mod flows;
mod model;
mod open;
mod packet;
mod parse;
mod query;
mod render;

pub use compile::Compiler;
pub use filter::{
    FRAGMENT_TIMEOUT, ICMP_TIMEOUT, OTHER_TIMEOUT, PeerRef, TCP_CLOSING_TIMEOUT,
    TCP_ESTABLISHED_TIMEOUT, TCP_OPENING_TIMEOUT, TCP_RESET_TIMEOUT, UDP_TIMEOUT,
    UDP_UNREPLIED_TIMEOUT,
};
pub use model::{PostureFacts, PostureRule, parse_version};
pub use open::{FlowFate, FlowOrigin, FlowSnapshot, FlowState, OpenFlow};
pub use query::{
    AccessChange, AccessDiff, Family, OpenOn, OpenOnChange, QueryError, Reacher, diff,
    who_can_reach,
};
pub use render::{render_diagnostics, render_test_report};

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Instant;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// A validated policy document.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Grants then denies, each in document order, groups expanded.
    rules: Vec<model::Rule>,
    /// The `[[test]]` entries.
    tests: Vec<parse::PolicyTest>,
    /// The `[[posture]]` entries, in document order.
    posture: Vec<PostureRule>,
}

/// One finding of validation, with where it is in the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// 1-based line of the offending text.
    pub line: usize,
    /// 1-based column of the offending text.
    pub column: usize,
    /// The offending text itself.
    pub text: String,
    /// What is wrong, in one sentence.
    pub message: String,
}

/// How bad a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The document is refused.
    Error,
    /// The document is accepted; the operator should look.
    Warning,
}

/// A policy that was refused: every error found, with warnings.
#[derive(Debug, Clone, thiserror::Error)]
#[error("policy has {} error(s)", .diagnostics.iter().filter(|d| d.severity == Severity::Error).count())]
pub struct PolicyError {
    /// All findings, errors first.
    pub diagnostics: Vec<Diagnostic>,
}

/// A policy that parsed and validated, with its warnings.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The policy.
    pub policy: Policy,
    /// Harmless findings.
    pub warnings: Vec<Diagnostic>,
}

impl Policy {
    /// Parses and validates a TOML policy document. Does not run its `[[test]]` entries.
    ///
    /// Every error found is reported, errors first, each with its line and column; a TOML
    /// syntax error, an unknown key or a value of the wrong type stops the parse at the first.
    pub fn parse(source: &str) -> Result<Checked, PolicyError> {
        let (policy, warnings) = parse::parse(source)?;
        Ok(Checked { policy, warnings })
    }

    /// Runs the document's `[[test]]` entries.
    pub fn run_tests(&self) -> TestReport {
        query::run_tests(self)
    }

    /// A policy with no entries: it denies everything.
    pub fn deny_all() -> Self {
        Policy {
            rules: Vec::new(),
            tests: Vec::new(),
            posture: Vec::new(),
        }
    }

    /// Number of `[[grant]]` entries.
    pub fn grant_count(&self) -> usize {
        self.rules
            .iter()
            .filter(|r| r.id.kind == RuleKind::Grant)
            .count()
    }

    /// Number of `[[deny]]` entries.
    pub fn deny_count(&self) -> usize {
        self.rules
            .iter()
            .filter(|r| r.id.kind == RuleKind::Deny)
            .count()
    }

    /// Number of `[[test]]` entries.
    pub fn test_count(&self) -> usize {
        self.tests.len()
    }

    /// The `[[posture]]` entries, in document order.
    pub fn posture(&self) -> &[PostureRule] {
        &self.posture
    }
}

/// The outcome of a policy's own tests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TestReport {
    /// One line per test.
    pub results: Vec<TestResult>,
}

impl TestReport {
    /// True when every test passed.
    pub fn passed(&self) -> bool {
        self.results.iter().all(|r| r.passed)
    }
}

/// One `[[test]]` entry's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TestResult {
    /// Line of the `[[test]]` entry.
    pub line: usize,
    /// `from -> to port`, readable.
    pub description: String,
    /// Whether the expectation held.
    pub passed: bool,
    /// The rule that decided, or "default deny".
    pub decided_by: String,
}

/// What the policy knows about one node: what selectors match on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// Node name, unique in its network.
    pub name: String,
    /// Namespace, as in `ns:NAME`.
    pub namespace: String,
    /// Tags, as in `tag:NAME`, without the prefix.
    pub tags: Vec<String>,
    /// SPIFFE ID, `spiffe://TD/ns/NS/node/NAME`.
    pub spiffe_id: String,
    /// Overlay addresses of the node itself (host prefixes).
    pub addresses: Vec<IpNet>,
    /// Prefixes the node routes for others (subnet router), matched by `cidr:`.
    pub routes: Vec<IpNet>,
}

/// Every node of a network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// Nodes, in any order.
    pub nodes: Vec<NodeIdentity>,
}

/// A policy compiled for a whole network: one filter per node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompiledNetwork {
    /// Node name to its filter. A node without an entry may talk to nobody.
    pub filters: BTreeMap<String, FilterSpec>,
}

/// Compiles a policy for every node of an inventory. Deterministic: the same input gives the
/// same output, byte for byte once serialized.
///
/// A node's filter lists exactly the peers that at least one grant connects it with, in either
/// direction; a node with no such peer gets no entry.
pub fn compile(policy: &Policy, inventory: &Inventory) -> CompiledNetwork {
    compile::compile(policy, inventory)
}

/// The compiled, serializable filter of one node: per peer, what it may accept from and send to
/// that peer. The keys are exactly the peers the node is told about; a peer absent here is
/// denied everything. Shipped inside the netmap.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterSpec {
    /// Peer name to its rules.
    pub peers: BTreeMap<String, PeerRules>,
}

/// The compiled rules between this node and one peer. Internals are netpolicy's own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRules {
    /// What this node accepts from the peer (flows the peer opens).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    inbound: Vec<compile::RuleEntry>,
    /// What this node may send to the peer (flows this node opens).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    outbound: Vec<compile::RuleEntry>,
}

impl PeerRules {
    /// Whether any grant lets a flow be opened between the two, either way.
    pub fn has_grant(&self) -> bool {
        self.inbound
            .iter()
            .chain(&self.outbound)
            .any(|e| e.rule.kind == RuleKind::Grant)
    }

    /// The grants and denies that decide what the peer may open towards this node.
    pub fn inbound_rules(&self) -> impl Iterator<Item = RuleId> + '_ {
        self.inbound.iter().map(|e| e.rule)
    }

    /// The grants and denies that decide what this node may open towards the peer.
    pub fn outbound_rules(&self) -> impl Iterator<Item = RuleId> + '_ {
        self.outbound.iter().map(|e| e.rule)
    }
}

/// Connection-tracking limits. Idle timeouts are the `*_TIMEOUT` constants of this crate.
#[derive(Debug, Clone, Copy)]
pub struct ConntrackConfig {
    /// Most flows held at once.
    pub max_flows: usize,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        Self { max_flows: 65_536 }
    }
}

/// The stateful per-packet filter of one node.
///
/// Call `outbound` for every packet read from the TUN before it is encrypted for `peer`, and
/// `inbound` for every packet decrypted from `peer` before it is written to the TUN. `install`
/// swaps in a new spec and re-checks open flows against it.
///
/// A packet that opens a flow passes when a grant of the peer's rules for that direction
/// matches its addresses, protocol and port and no deny does. The flow is then tracked, keyed
/// from this node's side, so that every later packet of it passes both ways
/// ([`AllowReason::Established`]), as do the ICMP and ICMPv6 errors that quote one of its
/// packets ([`AllowReason::Related`]) and the later fragments of an allowed first fragment.
/// Flows end by TCP state or idle time (the `*_TIMEOUT` constants); the table holds at most
/// [`ConntrackConfig::max_flows`], and a new flow that finds it full (after expired flows are
/// swept, at most once a second) is denied with [`DenyReason::TableFull`].
///
/// Time comes in as `now` and must not go backwards. No method logs, allocates for an
/// established flow, or panics on any input.
#[derive(Debug)]
pub struct Filter {
    state: filter::State,
}

impl Filter {
    /// Makes a filter from a compiled spec. `FilterSpec::default()` denies everything.
    pub fn new(spec: FilterSpec, config: ConntrackConfig) -> Self {
        Filter {
            state: filter::State::new(spec, config),
        }
    }

    /// Installs a new spec; flows the new spec no longer allows stop passing at once.
    ///
    /// Each open flow is checked again as if its first packet came now: a flow whose peer is
    /// gone, or that no grant allows any more (or that a deny now matches), is dropped.
    pub fn install(&mut self, spec: FilterSpec, now: Instant) {
        self.state.install(spec, now);
    }

    /// Decides an IP packet that this node sends to `peer`.
    ///
    /// Looks the name up for every packet; [`Filter::outbound_ref`] skips that.
    pub fn outbound(&mut self, peer: &str, packet: &[u8], now: Instant) -> Verdict {
        self.state
            .decide_name(filter::Direction::Outbound, peer, packet, now)
    }

    /// Decides an IP packet that this node received from `peer`.
    ///
    /// Looks the name up for every packet; [`Filter::inbound_ref`] skips that.
    pub fn inbound(&mut self, peer: &str, packet: &[u8], now: Instant) -> Verdict {
        self.state
            .decide_name(filter::Direction::Inbound, peer, packet, now)
    }

    /// The handle of the peer named `name`, or `None` when the installed spec does not have it.
    /// See [`PeerRef`] for how long a handle stays valid.
    pub fn peer(&self, name: &str) -> Option<PeerRef> {
        self.state.peer(name)
    }

    /// The name of the peer behind a handle, or `None` when the handle is no longer valid.
    pub fn peer_name(&self, peer: PeerRef) -> Option<&str> {
        self.state.peer_name(peer)
    }

    /// [`Filter::outbound`] for a resolved peer: the same decision, with no name lookup. A
    /// handle that is no longer valid gives [`DenyReason::UnknownPeer`].
    #[inline]
    pub fn outbound_ref(&mut self, peer: PeerRef, packet: &[u8], now: Instant) -> Verdict {
        self.state
            .decide_ref(filter::Direction::Outbound, peer, packet, now)
    }

    /// [`Filter::inbound`] for a resolved peer: the same decision, with no name lookup. A
    /// handle that is no longer valid gives [`DenyReason::UnknownPeer`].
    #[inline]
    pub fn inbound_ref(&mut self, peer: PeerRef, packet: &[u8], now: Instant) -> Verdict {
        self.state
            .decide_ref(filter::Direction::Inbound, peer, packet, now)
    }

    /// Number of flows in the table, expired ones not yet swept included.
    pub fn flow_count(&self) -> usize {
        self.state.flow_count()
    }

    /// Copies at most `limit` of the flows live at `now` that are not ending (TCP after FIN
    /// both ways or a RST), and counts them all. Only copies: call [`FlowSnapshot::flows`]
    /// after releasing whatever lock guards the filter.
    pub fn flow_snapshot(&self, now: Instant, limit: usize) -> FlowSnapshot {
        self.state.flow_snapshot(now, limit)
    }

    /// How the installed spec judges an open flow (of this filter's node, from any filter's
    /// snapshot): exactly as [`Filter::install`] re-checks every open flow, so a flow that is
    /// not [`FlowFate::Kept`] here stops when this spec is installed on its node.
    pub fn judge_open_flow(&self, flow: &OpenFlow) -> FlowFate {
        self.state.judge_open_flow(flow)
    }
}

/// The decision for one packet, with what decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Passes.
    Allow(AllowReason),
    /// Dropped.
    Deny(DenyReason),
}

/// Why a packet passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowReason {
    /// A grant opened a new flow; the id names it (e.g. `grant[2]` at line 14).
    Rule(RuleId),
    /// The packet belongs to a flow that is already open (either direction).
    Established,
    /// An ICMP or ICMPv6 error that belongs to an open flow.
    Related,
}

/// Why a packet was dropped. `as_str` gives a stable counter name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// No grant matched: default deny.
    NoRule,
    /// A deny entry matched.
    Rule(RuleId),
    /// The peer is not in this node's filter at all.
    UnknownPeer,
    /// The packet could not be parsed.
    Malformed(&'static str),
    /// The flow table is full.
    TableFull,
}

impl DenyReason {
    /// A short, stable name for counters: `no-rule`, `denied-by-rule`, `unknown-peer`,
    /// `malformed`, `table-full`.
    pub fn as_str(&self) -> &'static str {
        match self {
            DenyReason::NoRule => "no-rule",
            DenyReason::Rule(_) => "denied-by-rule",
            DenyReason::UnknownPeer => "unknown-peer",
            DenyReason::Malformed(_) => "malformed",
            DenyReason::TableFull => "table-full",
        }
    }
}

/// Names one entry of a policy: its kind, index and line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RuleId {
    /// `grant` or `deny`. Compares equal to those strings.
    pub kind: RuleKind,
    /// Index among entries of that kind, from 0.
    pub index: usize,
    /// 1-based line of the entry in its document.
    pub line: usize,
}

/// Whether an entry is a `[[grant]]` or a `[[deny]]`. Serialized as `"grant"` / `"deny"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleKind {
    /// A `[[grant]]` entry.
    Grant,
    /// A `[[deny]]` entry.
    Deny,
}

impl RuleKind {
    /// `grant` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Grant => "grant",
            RuleKind::Deny => "deny",
        }
    }

    /// True for a grant.
    pub fn is_grant(self) -> bool {
        self == RuleKind::Grant
    }
}

impl std::fmt::Display for RuleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for RuleKind {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for RuleKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Display for RuleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}] (line {})", self.kind, self.index, self.line)
    }
}

/// A port expression as written in policies and queries: `tcp:5432`, `udp:53`, `icmp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// TCP to a port.
    Tcp(u16),
    /// UDP to a port.
    Udp(u16),
    /// ICMP echo (v4 or v6).
    Icmp,
}

impl std::str::FromStr for Probe {
    type Err = String;

    /// Parses `tcp:N`, `udp:N` or `icmp`; the error says what is wrong.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.parse::<model::PortSpec>() {
            Ok(model::PortSpec::Tcp(lo, hi)) if lo == hi => Ok(Probe::Tcp(lo)),
            Ok(model::PortSpec::Udp(lo, hi)) if lo == hi => Ok(Probe::Udp(lo)),
            Ok(model::PortSpec::Icmp) => Ok(Probe::Icmp),
            Ok(_) => Err(format!(
                "`{s}`: a probe is one flow, `tcp:N`, `udp:N` or `icmp`, not a range or `any`"
            )),
            Err(message) => Err(message),
        }
    }
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Probe::Tcp(p) => write!(f, "tcp:{p}"),
            Probe::Udp(p) => write!(f, "udp:{p}"),
            Probe::Icmp => f.write_str("icmp"),
        }
    }
}

/// The answer to "can A reach B on this port, and why".
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Explanation {
    /// Whether a new flow would pass.
    pub allowed: bool,
    /// The rule that decided, or "default deny".
    pub decided_by: String,
    /// Every grant that matched, and every deny that matched.
    pub matching_rules: Vec<String>,
}

/// Answers whether `from` may open a flow to `to` (at `dst`, one of `to`'s addresses or routes,
/// or its first address when `None`) on `probe`.
pub fn explain(
    policy: &Policy,
    from: &NodeIdentity,
    to: &NodeIdentity,
    dst: Option<IpAddr>,
    probe: Probe,
) -> Explanation {
    query::explain(policy, from, to, dst, probe)
}
