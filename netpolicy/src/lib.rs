//! The ztnet policy engine: the policy document, its validation, the compiler that turns a
//! policy plus an inventory of nodes into one filter per node, and the stateful per-packet
//! filter that a node runs. No I/O, no async, no clock: time comes in as an argument.
//!
//! CONTRACT (shared with `node`, `coordinator`, `cli`): the public items below are what the other
//! crates call. Their bodies are filled in by the netpolicy work (issue 2); keep the signatures.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Instant;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// A validated policy document.
#[derive(Debug, Clone)]
pub struct Policy {
    _private: (),
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
    pub fn parse(source: &str) -> Result<Checked, PolicyError> {
        let _ = source;
        unimplemented!("netpolicy: Policy::parse")
    }

    /// Runs the document's `[[test]]` entries.
    pub fn run_tests(&self) -> TestReport {
        unimplemented!("netpolicy: Policy::run_tests")
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
pub fn compile(policy: &Policy, inventory: &Inventory) -> CompiledNetwork {
    let _ = (policy, inventory);
    unimplemented!("netpolicy: compile")
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
    #[serde(default)]
    _private: (),
}

/// Connection-tracking limits.
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
#[derive(Debug)]
pub struct Filter {
    _private: (),
}

impl Filter {
    /// Makes a filter from a compiled spec. `FilterSpec::default()` denies everything.
    pub fn new(spec: FilterSpec, config: ConntrackConfig) -> Self {
        let _ = (spec, config);
        unimplemented!("netpolicy: Filter::new")
    }

    /// Installs a new spec; flows the new spec no longer allows stop passing at once.
    pub fn install(&mut self, spec: FilterSpec, now: Instant) {
        let _ = (spec, now);
        unimplemented!("netpolicy: Filter::install")
    }

    /// Decides an IP packet that this node sends to `peer`.
    pub fn outbound(&mut self, peer: &str, packet: &[u8], now: Instant) -> Verdict {
        let _ = (peer, packet, now);
        unimplemented!("netpolicy: Filter::outbound")
    }

    /// Decides an IP packet that this node received from `peer`.
    pub fn inbound(&mut self, peer: &str, packet: &[u8], now: Instant) -> Verdict {
        let _ = (peer, packet, now);
        unimplemented!("netpolicy: Filter::inbound")
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
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RuleId {
    /// `grant` or `deny`.
    pub kind: String,
    /// Index among entries of that kind, from 0.
    pub index: usize,
    /// 1-based line of the entry in its document.
    pub line: usize,
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
    fn from_str(s: &str) -> Result<Self, String> {
        let _ = s;
        unimplemented!("netpolicy: Probe::from_str")
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
    let _ = (policy, from, to, dst, probe);
    unimplemented!("netpolicy: explain")
}
