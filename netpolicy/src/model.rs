//! The validated form of a policy: selectors, port specs and rules, and how they match a node,
//! an address and a packet class. Pure data, no I/O.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{NodeIdentity, RuleId};

/// One selector of a `from` or `to` list, with groups already expanded.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Selector {
    /// `*`: every member of the network.
    Any,
    /// `node:NAME`.
    Node(String),
    /// `tag:NAME`.
    Tag(String),
    /// `ns:NAMESPACE`.
    Namespace(String),
    /// A SPIFFE ID, exact.
    SpiffeExact(String),
    /// A SPIFFE ID ending in `/*`: the prefix kept includes the trailing `/`.
    SpiffePrefix(String),
    /// `cidr:PREFIX`, normalised (no host bits).
    Cidr(IpNet),
}

impl Selector {
    /// Whether the selector matches a node by identity alone (`cidr:` never does).
    pub(crate) fn matches_identity(&self, node: &NodeIdentity) -> bool {
        match self {
            Selector::Any => true,
            Selector::Node(name) => node.name == *name,
            Selector::Tag(tag) => node.tags.iter().any(|t| t == tag),
            Selector::Namespace(ns) => node.namespace == *ns,
            Selector::SpiffeExact(id) => !node.spiffe_id.is_empty() && node.spiffe_id == *id,
            Selector::SpiffePrefix(prefix) => node.spiffe_id.starts_with(prefix.as_str()),
            Selector::Cidr(_) => false,
        }
    }

    /// Whether the selector matches `node` sending from (or receiving at) `addr`.
    ///
    /// With `addr` unknown, identity selectors match on identity and `cidr:` matches nothing.
    /// With `addr` known, identity selectors also need `addr` to be one of the node's own
    /// addresses, and `cidr:` needs it inside the prefix and inside the node's addresses or
    /// routes.
    pub(crate) fn matches(&self, node: &NodeIdentity, addr: Option<IpAddr>) -> bool {
        match (self, addr) {
            (Selector::Cidr(_), None) => false,
            (Selector::Cidr(net), Some(a)) => {
                net.contains(&a)
                    && (node.addresses.iter().any(|p| host_prefix(p).contains(&a))
                        || node.routes.iter().any(|p| p.trunc().contains(&a)))
            }
            (_, None) => self.matches_identity(node),
            (_, Some(a)) => {
                self.matches_identity(node)
                    && node.addresses.iter().any(|p| host_prefix(p).contains(&a))
            }
        }
    }

    /// The prefixes of `node` this selector covers: its own addresses for identity selectors,
    /// the overlap of the prefix with its addresses and routes for `cidr:`.
    pub(crate) fn prefixes_of(&self, node: &NodeIdentity, out: &mut Vec<IpNet>) {
        match self {
            Selector::Cidr(net) => {
                let own = node.addresses.iter().map(host_prefix);
                for p in own.chain(node.routes.iter().map(IpNet::trunc)) {
                    if let Some(both) = intersect(net, &p) {
                        out.push(both);
                    }
                }
            }
            _ => {
                if self.matches_identity(node) {
                    out.extend(node.addresses.iter().map(host_prefix));
                }
            }
        }
    }

    /// Whether the selector can match `node` at any address.
    pub(crate) fn touches(&self, node: &NodeIdentity) -> bool {
        match self {
            Selector::Cidr(net) => {
                node.addresses
                    .iter()
                    .any(|p| intersect(net, &host_prefix(p)).is_some())
                    || node
                        .routes
                        .iter()
                        .any(|p| intersect(net, &p.trunc()).is_some())
            }
            _ => self.matches_identity(node),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Any => f.write_str("*"),
            Selector::Node(n) => write!(f, "node:{n}"),
            Selector::Tag(t) => write!(f, "tag:{t}"),
            Selector::Namespace(n) => write!(f, "ns:{n}"),
            Selector::SpiffeExact(id) => f.write_str(id),
            Selector::SpiffePrefix(p) => write!(f, "{p}*"),
            Selector::Cidr(net) => write!(f, "cidr:{net}"),
        }
    }
}

/// The host prefix of a node's own address: `100.64.0.2/16` means the host `100.64.0.2/32`.
pub(crate) fn host_prefix(net: &IpNet) -> IpNet {
    IpNet::from(net.addr())
}

/// The overlap of two prefixes: prefixes either nest or are disjoint.
pub(crate) fn intersect(a: &IpNet, b: &IpNet) -> Option<IpNet> {
    if a.contains(b) {
        Some(*b)
    } else if b.contains(a) {
        Some(*a)
    } else {
        None
    }
}

/// One entry of a `ports` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum PortSpec {
    /// TCP to a port in the inclusive range.
    Tcp(u16, u16),
    /// UDP to a port in the inclusive range.
    Udp(u16, u16),
    /// ICMP and ICMPv6 echo requests (their replies pass as an established flow).
    Icmp,
    /// Every protocol and port.
    Any,
}

impl PortSpec {
    /// Whether this spec lets a packet of `class` open a flow.
    pub(crate) fn admits(self, class: PacketClass) -> bool {
        match (self, class) {
            (PortSpec::Any, _) => true,
            (PortSpec::Tcp(lo, hi), PacketClass::Tcp(p)) => lo <= p && p <= hi,
            (PortSpec::Udp(lo, hi), PacketClass::Udp(p)) => lo <= p && p <= hi,
            (PortSpec::Icmp, PacketClass::IcmpEcho) => true,
            _ => false,
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PortSpec::Tcp(lo, hi) if lo == hi => write!(f, "tcp:{lo}"),
            PortSpec::Tcp(lo, hi) => write!(f, "tcp:{lo}-{hi}"),
            PortSpec::Udp(lo, hi) if lo == hi => write!(f, "udp:{lo}"),
            PortSpec::Udp(lo, hi) => write!(f, "udp:{lo}-{hi}"),
            PortSpec::Icmp => f.write_str("icmp"),
            PortSpec::Any => f.write_str("any"),
        }
    }
}

impl FromStr for PortSpec {
    type Err = String;

    /// Parses `tcp:N`, `tcp:N-M`, `udp:N`, `udp:N-M`, `icmp` or `any`; the error says what is
    /// wrong and how to write it.
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "any" => return Ok(PortSpec::Any),
            "icmp" => return Ok(PortSpec::Icmp),
            "tcp" | "udp" => {
                return Err(format!(
                    "`{text}` needs a port: write `{text}:N` or `{text}:N-M` (1 to 65535)"
                ));
            }
            _ => {}
        }
        let Some((proto, rest)) = text.split_once(':') else {
            return Err(format!(
                "unknown port spec `{text}`: expected tcp:N, tcp:N-M, udp:N, udp:N-M, icmp or any"
            ));
        };
        let make: fn(u16, u16) -> PortSpec = match proto {
            "tcp" => PortSpec::Tcp,
            "udp" => PortSpec::Udp,
            "icmp" | "icmp6" | "icmpv6" => {
                return Err(format!(
                    "`{text}`: icmp takes no port or type; write `icmp` (echo, IPv4 and IPv6)"
                ));
            }
            "any" => return Err(format!("`{text}`: any takes no port; write `any`")),
            _ => {
                return Err(format!(
                    "unknown protocol `{proto}` in `{text}`: expected tcp, udp, icmp or any"
                ));
            }
        };
        if rest == "*" || rest.is_empty() {
            return Err(format!(
                "`{text}` names no port: write `{proto}:1-65535` for every port, or `any`"
            ));
        }
        if rest.contains(',') {
            return Err(format!(
                "`{text}`: one port or range per entry, e.g. [\"{proto}:80\", \"{proto}:443\"]"
            ));
        }
        let (lo, hi) = match rest.split_once('-') {
            Some((lo, hi)) => (parse_port(text, lo)?, parse_port(text, hi)?),
            None => {
                let p = parse_port(text, rest)?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(format!(
                "reversed range in `{text}`: write `{proto}:{hi}-{lo}`"
            ));
        }
        Ok(make(lo, hi))
    }
}

fn parse_port(text: &str, digits: &str) -> Result<u16, String> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "`{digits}` in `{text}` is not a port number (1 to 65535)"
        ));
    }
    match digits.parse::<u32>() {
        Ok(0) => Err(format!(
            "port 0 in `{text}` is out of range: ports are 1 to 65535"
        )),
        Ok(n) if n <= 65535 => Ok(n as u16),
        _ => Err(format!(
            "port {digits} in `{text}` is out of range: ports are 1 to 65535"
        )),
    }
}

impl Serialize for PortSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What a packet that would open a flow looks like to a port spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PacketClass {
    /// TCP to this destination port.
    Tcp(u16),
    /// UDP to this destination port.
    Udp(u16),
    /// ICMP or ICMPv6 echo request.
    IcmpEcho,
    /// Anything else: other ICMP types, other protocols. Only `any` admits it.
    Other,
}

/// One grant or deny, groups expanded.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    /// Kind, index and line.
    pub(crate) id: RuleId,
    /// Sources, OR'ed.
    pub(crate) from: Vec<Selector>,
    /// Destinations, OR'ed.
    pub(crate) to: Vec<Selector>,
    /// Ports, OR'ed.
    pub(crate) ports: Vec<PortSpec>,
}

impl Rule {
    /// Whether the rule matches a flow opened by `from` (at `src`) towards `to` (at `dst`).
    pub(crate) fn matches(
        &self,
        from: &NodeIdentity,
        src: Option<IpAddr>,
        to: &NodeIdentity,
        dst: Option<IpAddr>,
        class: PacketClass,
    ) -> bool {
        self.ports.iter().any(|p| p.admits(class))
            && self.from.iter().any(|s| s.matches(from, src))
            && self.to.iter().any(|s| s.matches(to, dst))
    }
}

/// One `[[posture]]` entry: what a node matched by `selector` must report to stay in the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostureRule {
    /// Line of the entry in the document.
    pub line: usize,
    pub(crate) selectors: Vec<Selector>,
    /// The lowest ztnet-node version accepted, as numeric parts (`0.3.1` is `[0, 3, 1]`).
    pub min_version: Option<Vec<u64>>,
    /// Facts the node must report, with the exact value each must have.
    pub facts: std::collections::BTreeMap<String, String>,
    /// Longest control session, in seconds, after which the node must authenticate again.
    pub max_session_secs: Option<u64>,
}

/// What a node reports about itself, as the coordinator judges it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostureFacts {
    /// ztnet-node version string.
    pub version: String,
    /// Every fact by name: the node's own (`kernel`, `os`) and the operator's.
    pub facts: std::collections::BTreeMap<String, String>,
    /// Seconds the node's current control session has lasted.
    pub session_secs: u64,
}

impl PostureRule {
    /// Whether the entry covers `node` (by identity).
    pub fn applies_to(&self, node: &NodeIdentity) -> bool {
        self.selectors.iter().any(|s| s.matches_identity(node))
    }

    /// The selectors, as written after group expansion.
    pub fn selector_text(&self) -> String {
        let parts: Vec<String> = self.selectors.iter().map(ToString::to_string).collect();
        parts.join(", ")
    }

    /// Why `facts` fail this entry, in one sentence, or `None` when they pass.
    pub fn failure(&self, facts: &PostureFacts) -> Option<String> {
        if let Some(min) = &self.min_version {
            let want = join_version(min);
            match parse_version(&facts.version) {
                None => {
                    return Some(format!(
                        "ztnet-node version {:?} is not a version; at least {want} is required",
                        facts.version
                    ));
                }
                Some(have) if have < *min => {
                    return Some(format!(
                        "ztnet-node {} is older than the required {want}",
                        facts.version
                    ));
                }
                Some(_) => {}
            }
        }
        for (name, want) in &self.facts {
            match facts.facts.get(name) {
                None => return Some(format!("fact {name} is not reported; {want:?} is required")),
                Some(have) if have != want => {
                    return Some(format!("fact {name} is {have:?}; {want:?} is required"));
                }
                Some(_) => {}
            }
        }
        if let Some(max) = self.max_session_secs
            && facts.session_secs > max
        {
            // No age in the text: the reason must stay the same while the session lasts, or
            // every re-check would read as a new quarantine (and audit it again).
            return Some(format!(
                "its control session is older than max_session {max} s: it must authenticate \
                 again"
            ));
        }
        None
    }
}

/// The numeric parts of a version such as `0.3.1` or `v1.2.0-rc1` (pre-release and build
/// suffixes ignored); `None` when it has none.
pub fn parse_version(text: &str) -> Option<Vec<u64>> {
    let core = text.trim().trim_start_matches('v');
    let core = core.split(['-', '+', ' ']).next().unwrap_or_default();
    if core.is_empty() {
        return None;
    }
    let mut parts: Vec<u64> = core
        .split('.')
        .map(|p| p.parse::<u64>().ok())
        .collect::<Option<_>>()?;
    while parts.len() > 1 && parts.last() == Some(&0) {
        parts.pop();
    }
    Some(parts)
}

fn join_version(parts: &[u64]) -> String {
    let text: Vec<String> = parts.iter().map(u64::to_string).collect();
    text.join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs_parse_and_print_back() {
        for text in [
            "tcp:22",
            "tcp:5061-65535",
            "udp:53",
            "udp:1-2",
            "icmp",
            "any",
        ] {
            let spec: PortSpec = text.parse().unwrap();
            assert_eq!(spec.to_string(), text);
        }
    }

    #[test]
    fn bad_port_specs_say_what_is_wrong() {
        let cases = [
            ("tcp:0", "port 0"),
            ("tcp:65536", "out of range"),
            ("udp:99999", "out of range"),
            ("tcp:10-5", "reversed range"),
            ("tcp", "needs a port"),
            ("tcp:*", "names no port"),
            ("tcp:80,443", "one port or range"),
            ("icmp:8", "icmp takes no port"),
            ("sctp:1", "unknown protocol"),
            ("http", "unknown port spec"),
            ("tcp:-5", "not a port number"),
            ("tcp:+5", "not a port number"),
        ];
        for (text, want) in cases {
            let err = text.parse::<PortSpec>().unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn range_bounds_are_inclusive() {
        let spec: PortSpec = "tcp:5061-65535".parse().unwrap();
        assert!(!spec.admits(PacketClass::Tcp(5060)));
        assert!(spec.admits(PacketClass::Tcp(5061)));
        assert!(spec.admits(PacketClass::Tcp(65535)));
        assert!(!spec.admits(PacketClass::Udp(5061)));
    }

    fn posture(min: Option<&str>, facts: &[(&str, &str)], max: Option<u64>) -> PostureRule {
        PostureRule {
            line: 1,
            selectors: vec![Selector::Tag("db".into())],
            min_version: min.map(|m| parse_version(m).unwrap()),
            facts: facts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            max_session_secs: max,
        }
    }

    #[test]
    fn versions_compare_by_their_numbers() {
        assert_eq!(parse_version("0.3.1"), Some(vec![0, 3, 1]));
        assert_eq!(parse_version("v1.2.0-rc1"), Some(vec![1, 2]));
        assert_eq!(parse_version("1.0"), parse_version("1"));
        assert!(parse_version("0.10.0") > parse_version("0.9.9"));
        assert_eq!(parse_version("banana"), None);
        assert_eq!(parse_version(""), None);
    }

    #[test]
    fn a_posture_entry_names_the_first_thing_that_fails() {
        let rule = posture(Some("0.2.0"), &[("disk", "on")], Some(60));
        let mut facts = PostureFacts {
            version: "0.2.1".into(),
            facts: [("disk".to_string(), "on".to_string())].into(),
            session_secs: 10,
        };
        assert_eq!(rule.failure(&facts), None);
        facts.version = "0.1.9".into();
        assert!(
            rule.failure(&facts)
                .unwrap()
                .contains("older than the required 0.2")
        );
        facts.version = "0.2.0".into();
        facts.facts.insert("disk".into(), "off".into());
        assert!(
            rule.failure(&facts)
                .unwrap()
                .contains("fact disk is \"off\"")
        );
        facts.facts.clear();
        assert!(rule.failure(&facts).unwrap().contains("not reported"));
        facts.facts.insert("disk".into(), "on".into());
        facts.session_secs = 61;
        let over = rule.failure(&facts).unwrap();
        assert!(over.contains("max_session"), "{over}");
        // The reason does not change while the session ages: the coordinator audits a
        // quarantine only when its reason changes.
        facts.session_secs = 3600;
        assert_eq!(rule.failure(&facts).unwrap(), over);
    }
}
