//! Parsing and validation of the TOML policy document, with a line and column for every
//! finding. Turns the raw document into [`Policy`]: groups expanded, selectors and ports typed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::ops::Range;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::model::{PortSpec, PostureRule, Rule, Selector, parse_version};
use crate::{Diagnostic, NodeIdentity, Policy, PolicyError, Probe, RuleId, RuleKind, Severity};

/// One `[[test]]` entry, validated.
#[derive(Debug, Clone)]
pub(crate) struct PolicyTest {
    pub(crate) line: usize,
    pub(crate) from: NodeIdentity,
    pub(crate) to: NodeIdentity,
    pub(crate) dst: Option<IpAddr>,
    pub(crate) probe: Probe,
    pub(crate) expect_allow: bool,
}

type SpannedList = Spanned<Vec<Spanned<String>>>;
type RawGroups = BTreeMap<Spanned<String>, SpannedList>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocument {
    #[serde(default)]
    groups: RawGroups,
    #[serde(default)]
    grant: Vec<Spanned<RawRule>>,
    #[serde(default)]
    deny: Vec<Spanned<RawRule>>,
    #[serde(default)]
    test: Vec<Spanned<RawTest>>,
    #[serde(default)]
    posture: Vec<Spanned<RawPosture>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPosture {
    selector: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    min_version: Option<Spanned<String>>,
    #[serde(default)]
    facts: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
    #[serde(default)]
    max_session: Option<Spanned<String>>,
    #[serde(default)]
    #[allow(
        dead_code,
        reason = "a free-text note for the operator; nothing reads it"
    )]
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    from: Spanned<Vec<Spanned<String>>>,
    to: Spanned<Vec<Spanned<String>>>,
    ports: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    #[allow(
        dead_code,
        reason = "a free-text note for the operator; nothing reads it"
    )]
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    from: Spanned<RawIdentity>,
    to: Spanned<RawIdentity>,
    port: Spanned<String>,
    expect: Spanned<String>,
    #[serde(default)]
    dst: Option<Spanned<String>>,
    #[serde(default)]
    #[allow(
        dead_code,
        reason = "a free-text note for the operator; nothing reads it"
    )]
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    name: Spanned<String>,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    spiffe_id: Option<String>,
    #[serde(default)]
    addresses: Vec<Spanned<String>>,
    #[serde(default)]
    routes: Vec<Spanned<String>>,
}

/// Collects findings against one source text.
struct Findings<'s> {
    source: &'s str,
    list: Vec<Diagnostic>,
}

impl<'s> Findings<'s> {
    fn push(&mut self, severity: Severity, span: Range<usize>, message: String) {
        let (line, column) = line_column(self.source, span.start);
        let text = span_text(self.source, span);
        self.list.push(Diagnostic {
            severity,
            line,
            column,
            text,
            message,
        });
    }

    fn error(&mut self, span: Range<usize>, message: String) {
        self.push(Severity::Error, span, message);
    }

    fn warning(&mut self, span: Range<usize>, message: String) {
        self.push(Severity::Warning, span, message);
    }

    fn line(&self, offset: usize) -> usize {
        line_column(self.source, offset).0
    }
}

/// Parses and validates a document: see [`Policy::parse`].
pub(crate) fn parse(source: &str) -> Result<(Policy, Vec<Diagnostic>), PolicyError> {
    let mut findings = Findings {
        source,
        list: Vec::new(),
    };
    let raw: RawDocument = match toml::from_str(source) {
        Ok(raw) => raw,
        Err(err) => {
            let span = err.span().unwrap_or(0..0);
            let message = err.message().trim().replace('\n', " ");
            findings.error(span, message);
            return Err(PolicyError {
                diagnostics: findings.list,
            });
        }
    };

    let groups = Groups::new(&raw.groups, &mut findings);
    let mut rules = Vec::new();
    for (kind, entries) in [(RuleKind::Grant, &raw.grant), (RuleKind::Deny, &raw.deny)] {
        for (index, entry) in entries.iter().enumerate() {
            let id = RuleId {
                kind,
                index,
                line: findings.line(entry.span().start),
            };
            if let Some(rule) = rule(id, entry.get_ref(), &groups, &mut findings) {
                rules.push(rule);
            }
        }
    }
    let mut posture = Vec::new();
    for entry in &raw.posture {
        if let Some(p) = posture_rule(entry, &groups, &mut findings) {
            posture.push(p);
        }
    }
    groups.warn_unused(&mut findings);

    let mut tests = Vec::new();
    for entry in &raw.test {
        if let Some(test) = policy_test(entry, &mut findings) {
            tests.push(test);
        }
    }

    let mut diagnostics = findings.list;
    diagnostics.sort_by_key(|d| (d.severity == Severity::Warning, d.line, d.column));
    if diagnostics.iter().any(|d| d.severity == Severity::Error) {
        return Err(PolicyError { diagnostics });
    }
    Ok((
        Policy {
            rules,
            tests,
            posture,
        },
        diagnostics,
    ))
}

/// The most levels of groups inside groups.
const MAX_GROUP_DEPTH: usize = 32;

/// The groups of a document, each expanded once (memoised) with cycle and depth checks.
struct Groups<'r> {
    raw: &'r RawGroups,
    /// Group name to its expansion; `None` when its body has an error (already reported).
    expanded: std::cell::RefCell<BTreeMap<String, Option<Vec<Selector>>>>,
    used: std::cell::RefCell<BTreeSet<String>>,
}

impl<'r> Groups<'r> {
    fn new(raw: &'r RawGroups, findings: &mut Findings<'_>) -> Self {
        for name in raw.keys() {
            if !valid_name(name.get_ref()) {
                findings.error(
                    name.span(),
                    format!(
                        "group name `{}` is not valid: use letters, digits, '.', '_' and '-'",
                        name.get_ref()
                    ),
                );
            }
        }
        let groups = Groups {
            raw,
            expanded: Default::default(),
            used: Default::default(),
        };
        // Expand every group once, so that errors inside an unused group are reported too.
        for name in raw.keys() {
            groups.expand(name.get_ref(), &mut Vec::new(), findings);
        }
        groups
    }

    fn lookup(&self, name: &str) -> Option<&'r SpannedList> {
        // Spanned keys compare by value only, so a lookup by name finds them.
        self.raw.get(name)
    }

    /// The selectors group `name` stands for, sorted and deduplicated; `stack` holds the groups
    /// being expanded. Each body is checked once; its errors are reported then.
    fn expand(
        &self,
        name: &str,
        stack: &mut Vec<String>,
        findings: &mut Findings<'_>,
    ) -> Option<Vec<Selector>> {
        if let Some(done) = self.expanded.borrow().get(name) {
            return done.clone();
        }
        let body = self.lookup(name)?;
        if stack.len() >= MAX_GROUP_DEPTH {
            findings.error(
                body.span(),
                format!("group `{name}` is nested more than {MAX_GROUP_DEPTH} groups deep"),
            );
            self.expanded.borrow_mut().insert(name.to_string(), None);
            return None;
        }
        stack.push(name.to_string());
        let mut out = Vec::new();
        let mut ok = true;
        for member in body.get_ref() {
            let text = member.get_ref();
            let Some(inner) = text.strip_prefix("group:") else {
                match parse_selector(text) {
                    Ok(sel) => out.push(sel),
                    Err(message) => {
                        findings.error(member.span(), message);
                        ok = false;
                    }
                }
                continue;
            };
            if let Some(pos) = stack.iter().position(|g| g == inner) {
                let mut path: Vec<String> =
                    stack[pos..].iter().map(|g| format!("group:{g}")).collect();
                path.push(format!("group:{inner}"));
                findings.error(
                    member.span(),
                    format!("group `{}` includes itself: {}", inner, path.join(" -> ")),
                );
                ok = false;
                continue;
            }
            if self.lookup(inner).is_none() {
                findings.error(
                    member.span(),
                    format!("group `{inner}` is not defined in [groups]"),
                );
                ok = false;
                continue;
            }
            match self.expand(inner, stack, findings) {
                Some(selectors) => out.extend(selectors),
                None => ok = false,
            }
        }
        stack.pop();
        out.sort();
        out.dedup();
        let result = ok.then_some(out);
        self.expanded
            .borrow_mut()
            .insert(name.to_string(), result.clone());
        result
    }

    /// Expands `group:NAME` as used in a rule. Errors inside the group were reported when it
    /// was checked; a missing or empty group is reported here, at the use.
    fn expand_use(
        &self,
        name: &str,
        span: Range<usize>,
        findings: &mut Findings<'_>,
    ) -> Option<Vec<Selector>> {
        if self.lookup(name).is_none() {
            findings.error(span, format!("group `{name}` is not defined in [groups]"));
            return None;
        }
        self.mark_used(name);
        let out = self.expand(name, &mut Vec::new(), findings)?;
        if out.is_empty() {
            findings.error(
                span,
                format!("group `{name}` has no members, so `group:{name}` can never match"),
            );
            return None;
        }
        Some(out)
    }

    /// Marks a group and every group it includes as used.
    fn mark_used(&self, name: &str) {
        let mut todo = vec![name.to_string()];
        while let Some(g) = todo.pop() {
            if !self.used.borrow_mut().insert(g.clone()) {
                continue;
            }
            if let Some(body) = self.lookup(&g) {
                let inner = body
                    .get_ref()
                    .iter()
                    .filter_map(|m| m.get_ref().strip_prefix("group:"));
                todo.extend(inner.map(str::to_string));
            }
        }
    }

    fn warn_unused(&self, findings: &mut Findings<'_>) {
        let used = self.used.borrow();
        for (name, body) in self.raw {
            if used.contains(name.get_ref()) {
                continue;
            }
            let what = if body.get_ref().is_empty() {
                "is empty and "
            } else {
                ""
            };
            findings.warning(
                name.span(),
                format!(
                    "group `{}` {what}is not used by any grant or deny",
                    name.get_ref()
                ),
            );
        }
    }
}

fn rule(
    id: RuleId,
    raw: &RawRule,
    groups: &Groups<'_>,
    findings: &mut Findings<'_>,
) -> Option<Rule> {
    let before = findings
        .list
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    let from = selector_list("from", &raw.from, groups, findings);
    let to = selector_list("to", &raw.to, groups, findings);
    let ports = port_list(&raw.ports, findings);
    let after = findings
        .list
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    if after > before {
        return None;
    }
    Some(Rule {
        id,
        from,
        to,
        ports,
    })
}

fn selector_list(
    key: &str,
    list: &Spanned<Vec<Spanned<String>>>,
    groups: &Groups<'_>,
    findings: &mut Findings<'_>,
) -> Vec<Selector> {
    if list.get_ref().is_empty() {
        findings.error(
            list.span(),
            format!("`{key}` is empty: name at least one selector (`*` means every node)"),
        );
        return Vec::new();
    }
    let mut out: Vec<Selector> = Vec::new();
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    let star = list.get_ref().iter().find(|s| s.get_ref() == "*");
    for item in list.get_ref() {
        let text = item.get_ref().as_str();
        if !seen.insert(text) {
            findings.warning(
                item.span(),
                format!("`{text}` appears twice in `{key}`; the second one adds nothing"),
            );
            continue;
        }
        let expanded = match text.strip_prefix("group:") {
            Some(name) => groups.expand_use(name, item.span(), findings),
            None => match parse_selector(text) {
                Ok(sel) => Some(vec![sel]),
                Err(message) => {
                    findings.error(item.span(), message);
                    None
                }
            },
        };
        if let (Some(_), Some(star)) = (&expanded, star)
            && text != "*"
        {
            findings.warning(
                item.span(),
                format!(
                    "`{text}` is redundant: `*` at column {} of this `{key}` list already \
                     matches every node, and selectors in a list are OR'ed, so this entry \
                     applies to every node",
                    line_column(findings.source, star.span().start).1
                ),
            );
        }
        out.extend(expanded.into_iter().flatten());
    }
    out.sort();
    out.dedup();
    out
}

fn port_list(list: &Spanned<Vec<Spanned<String>>>, findings: &mut Findings<'_>) -> Vec<PortSpec> {
    if list.get_ref().is_empty() {
        findings.error(
            list.span(),
            "`ports` is empty: name at least one port spec (`any` means every port)".to_string(),
        );
        return Vec::new();
    }
    let has_any = list.get_ref().iter().any(|p| p.get_ref() == "any");
    let mut out = Vec::new();
    for item in list.get_ref() {
        match item.get_ref().parse::<PortSpec>() {
            Ok(spec) => {
                if out.contains(&spec) {
                    findings.warning(
                        item.span(),
                        format!("`{}` appears twice in `ports`", item.get_ref()),
                    );
                } else if has_any && spec != PortSpec::Any {
                    findings.warning(
                        item.span(),
                        format!(
                            "`{}` is redundant: `any` in the same list already covers every \
                             protocol and port",
                            item.get_ref()
                        ),
                    );
                }
                out.push(spec);
            }
            Err(message) => findings.error(item.span(), message),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Parses one selector other than `group:`; the error says what is wrong and how to write it.
pub(crate) fn parse_selector(text: &str) -> Result<Selector, String> {
    if text == "*" {
        return Ok(Selector::Any);
    }
    if let Some(rest) = text.strip_prefix("cidr:") {
        return parse_cidr(text, rest).map(Selector::Cidr);
    }
    if text.starts_with("spiffe://") {
        return parse_spiffe(text);
    }
    if let Some((kind, value)) = text.split_once(':') {
        let make: fn(String) -> Selector = match kind {
            "node" => Selector::Node,
            "tag" => Selector::Tag,
            "ns" => Selector::Namespace,
            _ => return Err(unknown_selector(text)),
        };
        if value.is_empty() {
            return Err(format!("`{text}` names nothing, so it can never match"));
        }
        if !valid_name(value) {
            return Err(format!(
                "`{text}` can never match: names are letters, digits, '.', '_' and '-'"
            ));
        }
        return Ok(make(value.to_string()));
    }
    Err(unknown_selector(text))
}

fn unknown_selector(text: &str) -> String {
    if looks_like_address(text) {
        return format!(
            "`{text}` looks like an address: write it as `cidr:ADDRESS/LENGTH` (for example \
             `cidr:10.0.0.5/32` or `cidr:fd00::5/128`), and put any port in `ports` \
             (for example \"tcp:22\")"
        );
    }
    let kind = text.split_once(':').map_or(text, |(k, _)| k);
    format!(
        "unknown selector kind `{kind}` in `{text}`: expected node:NAME, tag:NAME, ns:NAME, \
         group:NAME, spiffe://..., cidr:PREFIX or *"
    )
}

fn looks_like_address(text: &str) -> bool {
    let head = text
        .split(['/', ']'])
        .next()
        .unwrap_or(text)
        .trim_start_matches('[');
    text.starts_with('[')
        || head.parse::<IpAddr>().is_ok()
        || text.parse::<IpNet>().is_ok()
        || head.contains("::")
        || head
            .split(':')
            .next()
            .is_some_and(|h| h.parse::<std::net::Ipv4Addr>().is_ok())
        || (head.chars().all(|c| c.is_ascii_hexdigit() || c == ':')
            && head.matches(':').count() >= 2)
}

fn parse_cidr(text: &str, rest: &str) -> Result<IpNet, String> {
    const PORT_HINT: &str = "a selector holds only the prefix: write the port in `ports` \
                             (for example \"tcp:22\")";
    if rest.contains('[') || rest.contains(']') {
        return Err(format!(
            "`{text}` has brackets or a port glued on; {PORT_HINT}, and the address as \
             `cidr:ADDRESS/LENGTH`"
        ));
    }
    let Some((addr, len)) = rest.split_once('/') else {
        let hint = match rest.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => format!(" (`cidr:{rest}/32` for this one address)"),
            Ok(IpAddr::V6(_)) => format!(
                " (`cidr:{rest}/128` for this one address; if the part after the last ':' \
                 was meant as a port, {PORT_HINT})"
            ),
            Err(_) => String::new(),
        };
        return Err(format!(
            "`{text}` needs a prefix length, as in ADDRESS/LENGTH{hint}"
        ));
    };
    if !len.is_empty() && !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "`{text}`: `{len}` after the '/' is not a prefix length; if a port is glued on, \
             {PORT_HINT}"
        ));
    }
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("`{addr}` in `{text}` is not an IPv4 or IPv6 address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let bits: u8 = match len.parse::<u16>() {
        Ok(n) if n <= max => n as u8,
        _ => {
            return Err(format!(
                "prefix length `{len}` in `{text}` is not between 0 and {max}"
            ));
        }
    };
    let net = IpNet::new(ip, bits).map_err(|_| format!("`{text}` is not a valid prefix"))?;
    if net.trunc() != net {
        return Err(format!(
            "`{text}` has host bits set: the prefix is `cidr:{}`; for the one address write \
             `cidr:{}/{max}`",
            net.trunc(),
            ip
        ));
    }
    Ok(net)
}

fn parse_spiffe(text: &str) -> Result<Selector, String> {
    let rest = &text["spiffe://".len()..];
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    let domain_ok = !domain.is_empty()
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if !domain_ok {
        return Err(format!(
            "`{text}`: the trust domain `{domain}` must be non-empty lowercase letters, digits, \
             '.', '-' or '_'"
        ));
    }
    if path.is_empty() {
        return Err(format!(
            "`{text}` names only the trust domain, so it can never match a node or workload; \
             write `spiffe://{domain}/*` for everything in it"
        ));
    }
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        if seg.is_empty() {
            return Err(format!(
                "`{text}` has an empty path segment, so it can never match"
            ));
        }
        if seg.contains('*') && !(i == last && *seg == "*") {
            return Err(format!(
                "`{text}`: `*` is allowed only as the whole last segment, as in \
                 `spiffe://{domain}/ns/production/*`"
            ));
        }
        let seg_ok = *seg == "*"
            || seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        if !seg_ok {
            return Err(format!(
                "`{text}`: path segment `{seg}` may hold only letters, digits, '.', '-' and '_'"
            ));
        }
    }
    if segments[last] == "*" {
        Ok(Selector::SpiffePrefix(text[..text.len() - 1].to_string()))
    } else {
        Ok(Selector::SpiffeExact(text.to_string()))
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Shortest `max_session` accepted.
const MIN_SESSION_SECS: u64 = 10;

fn posture_rule(
    entry: &Spanned<RawPosture>,
    groups: &Groups<'_>,
    findings: &mut Findings<'_>,
) -> Option<PostureRule> {
    let raw = entry.get_ref();
    let errors = |f: &Findings<'_>| {
        f.list
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .count()
    };
    let before = errors(findings);
    let selectors = selector_list("selector", &raw.selector, groups, findings);
    for item in raw.selector.get_ref() {
        if item.get_ref().starts_with("cidr:") {
            findings.error(
                item.span(),
                format!(
                    "`{}`: posture is about a node's identity; select it with node:, tag:, ns:, \
                     a SPIFFE ID or a group of those",
                    item.get_ref()
                ),
            );
        }
    }
    let min_version = raw
        .min_version
        .as_ref()
        .and_then(|v| match parse_version(v.get_ref()) {
            Some(parts) => Some(parts),
            None => {
                findings.error(
                    v.span(),
                    format!(
                        "`min_version` `{}` is not a version: write numbers and dots, for \
                         example \"0.3.1\"",
                        v.get_ref()
                    ),
                );
                None
            }
        });
    let mut facts = BTreeMap::new();
    for (name, value) in &raw.facts {
        if !valid_name(name.get_ref()) {
            findings.error(
                name.span(),
                format!(
                    "fact name `{}` is not valid: use letters, digits, '.', '_' and '-'",
                    name.get_ref()
                ),
            );
            continue;
        }
        let text = match value.get_ref() {
            toml::Value::String(s) => s.clone(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Integer(i) => i.to_string(),
            other => {
                findings.error(
                    value.span(),
                    format!(
                        "fact `{}` is a {}: a required fact is a string, a boolean or an integer",
                        name.get_ref(),
                        other.type_str()
                    ),
                );
                continue;
            }
        };
        facts.insert(name.get_ref().clone(), text);
    }
    let max_session_secs =
        raw.max_session
            .as_ref()
            .and_then(|m| match parse_duration(m.get_ref()) {
                Ok(secs) if secs >= MIN_SESSION_SECS => Some(secs),
                Ok(secs) => {
                    findings.error(
                        m.span(),
                        format!(
                            "`max_session` of {secs} s is shorter than the {MIN_SESSION_SECS} s a \
                         node needs to authenticate again"
                        ),
                    );
                    None
                }
                Err(message) => {
                    findings.error(m.span(), message);
                    None
                }
            });
    if min_version.is_none()
        && raw.min_version.is_none()
        && raw.facts.is_empty()
        && raw.max_session.is_none()
    {
        findings.warning(
            entry.span(),
            "this [[posture]] requires nothing (no min_version, facts or max_session), so every \
             node passes it"
                .into(),
        );
    }
    if errors(findings) > before {
        return None;
    }
    Some(PostureRule {
        line: findings.line(entry.span().start),
        selectors,
        min_version,
        facts,
        max_session_secs,
    })
}

/// `90s`, `30m`, `8h`, `1d` (or plain seconds) to seconds.
fn parse_duration(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || {
        format!(
            "`max_session` `{text}` is not a duration: write a number and a unit s, m, h or d, \
             for example \"8h\""
        )
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(scale).ok_or_else(bad)
}

fn policy_test(entry: &Spanned<RawTest>, findings: &mut Findings<'_>) -> Option<PolicyTest> {
    let raw = entry.get_ref();
    let before = findings.list.len();
    let from = identity(&raw.from, findings);
    let to = identity(&raw.to, findings);
    let probe = match raw.port.get_ref().parse::<Probe>() {
        Ok(p) => Some(p),
        Err(message) => {
            findings.error(raw.port.span(), message);
            None
        }
    };
    let expect_allow = match raw.expect.get_ref().as_str() {
        "allow" => Some(true),
        "deny" => Some(false),
        other => {
            findings.error(
                raw.expect.span(),
                format!("`expect` is `{other}`; it must be \"allow\" or \"deny\""),
            );
            None
        }
    };
    let dst = match &raw.dst {
        None => None,
        Some(text) => match text.get_ref().parse::<IpAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                findings.error(
                    text.span(),
                    format!("`dst` `{}` is not an IPv4 or IPv6 address", text.get_ref()),
                );
                None
            }
        },
    };
    if let (Some(to), Some(addr), Some(span)) = (&to, dst, raw.dst.as_ref().map(|d| d.span())) {
        let inside = to.addresses.iter().any(|p| p.contains(&addr))
            || to.routes.iter().any(|p| p.contains(&addr));
        if !inside {
            findings.error(
                span,
                format!(
                    "`dst` {addr} is not one of `to`'s addresses or routes, so this test could \
                     never pass as meant; add it to `to.addresses` or `to.routes`"
                ),
            );
        }
    }
    if findings.list.len() > before {
        return None;
    }
    Some(PolicyTest {
        line: findings.line(entry.span().start),
        from: from?,
        to: to?,
        dst,
        probe: probe?,
        expect_allow: expect_allow?,
    })
}

fn identity(raw: &Spanned<RawIdentity>, findings: &mut Findings<'_>) -> Option<NodeIdentity> {
    let r = raw.get_ref();
    let mut ok = true;
    if !valid_name(r.name.get_ref()) {
        findings.error(
            r.name.span(),
            format!(
                "name `{}` is not valid: use letters, digits, '.', '_' and '-'",
                r.name.get_ref()
            ),
        );
        ok = false;
    }
    let mut prefixes = |list: &[Spanned<String>], host: bool| -> Vec<IpNet> {
        let mut out = Vec::new();
        for item in list {
            let text = item.get_ref();
            let parsed = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                .ok()
                .filter(|n| host || n.trunc() == *n);
            match parsed {
                Some(net) => out.push(net),
                None => {
                    findings.error(
                        item.span(),
                        format!("`{text}` is not an address or a prefix without host bits"),
                    );
                    ok = false;
                }
            }
        }
        out
    };
    let addresses = prefixes(&r.addresses, true);
    let routes = prefixes(&r.routes, false);
    if !ok {
        return None;
    }
    Some(NodeIdentity {
        name: r.name.get_ref().clone(),
        namespace: r.namespace.clone(),
        tags: r.tags.clone(),
        spiffe_id: r.spiffe_id.clone().unwrap_or_default(),
        addresses,
        routes,
    })
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let offset = floor_char_boundary(source, offset.min(source.len()));
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

fn span_text(source: &str, span: Range<usize>) -> String {
    let start = floor_char_boundary(source, span.start.min(source.len()));
    let end = floor_char_boundary(source, span.end.min(source.len()).max(start));
    let text = &source[start..end];
    text.lines().next().unwrap_or("").to_string()
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod posture_tests {
    use crate::{NodeIdentity, Policy, PostureFacts, Severity};

    fn node(tags: &[&str]) -> NodeIdentity {
        NodeIdentity {
            name: "db1".into(),
            namespace: "production".into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            spiffe_id: "spiffe://corp.example/ns/production/node/db1".into(),
            addresses: Vec::new(),
            routes: Vec::new(),
        }
    }

    #[test]
    fn a_posture_entry_parses_with_its_selector_version_facts_and_session() {
        let src = r#"
[groups]
data = ["tag:db"]

[[posture]]
selector = ["group:data"]
min_version = "0.1.0"
facts = { disk_encryption = "on", managed = true, level = 3 }
max_session = "8h"
"#;
        let checked = Policy::parse(src).expect("valid");
        let rules = checked.policy.posture();
        assert_eq!(rules.len(), 1);
        let r = &rules[0];
        assert_eq!(r.line, 5);
        assert!(r.applies_to(&node(&["db"])));
        assert!(!r.applies_to(&node(&["web"])));
        assert_eq!(r.max_session_secs, Some(8 * 3600));
        assert_eq!(r.facts["managed"], "true");
        assert_eq!(r.facts["level"], "3");
        let mut facts = PostureFacts {
            version: "0.1.0".into(),
            facts: r.facts.clone(),
            session_secs: 0,
        };
        assert_eq!(r.failure(&facts), None);
        facts.facts.insert("disk_encryption".into(), "off".into());
        let why = r.failure(&facts).expect("fails");
        assert!(why.contains("disk_encryption"), "{why}");
    }

    #[test]
    fn bad_posture_entries_are_refused_with_line_and_column() {
        let src = "[[posture]]\nselector = [\"cidr:10.0.0.0/8\", \"tag:\"]\nmin_version = \
                   \"latest\"\nmax_session = \"5\"\nfacts = { \"bad name\" = \"x\", list = [1] }\n";
        let err = Policy::parse(src).expect_err("invalid");
        let found: Vec<(usize, usize, String)> = err
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .map(|d| (d.line, d.column, d.message.clone()))
            .collect();
        let has =
            |line: usize, text: &str| found.iter().any(|(l, _, m)| *l == line && m.contains(text));
        assert!(has(2, "posture is about a node's identity"), "{found:?}");
        assert!(has(2, "names nothing"), "{found:?}");
        assert!(has(3, "not a version"), "{found:?}");
        assert!(has(4, "shorter than"), "{found:?}");
        assert!(has(5, "fact name `bad name`"), "{found:?}");
        assert!(has(5, "is a array"), "{found:?}");
        assert!(found.iter().all(|(_, c, _)| *c >= 1));

        let err = Policy::parse("[[posture]]\nselector = [\"*\"]\nmax_session = \"8 hours\"\n")
            .expect_err("bad duration");
        assert_eq!(err.diagnostics[0].line, 3);
        assert_eq!(err.diagnostics[0].column, 15);

        let err = Policy::parse("[[posture]]\nselector = [\"*\"]\nminimum = \"1\"\n")
            .expect_err("unknown key");
        assert_eq!(err.diagnostics[0].line, 3);
    }

    #[test]
    fn a_posture_entry_that_requires_nothing_is_a_warning() {
        let checked = Policy::parse("[[posture]]\nselector = [\"*\"]\n").expect("valid");
        assert!(checked.warnings[0].message.contains("requires nothing"));
    }
}
