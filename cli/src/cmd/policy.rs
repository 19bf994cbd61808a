//! `ztnet policy ...`: apply, show and history through the admin API; who-can-reach and diff
//! over the policy in force and the node list (and for who-can-reach the workload
//! registrations) fetched from it, with netpolicy's queries, diff adding the coordinator's
//! preview (open flows it would cut, posture changes); check and explain offline, with
//! netpolicy alone.

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use netpolicy::{Diagnostic, NodeIdentity, Policy, Probe, Severity, TestReport};
use serde::Serialize;
use ztnet_proto::admin::{
    ApplyPolicy, CutFlow, NodeInfo, NotReported, PendingAck, PolicyApplied, PolicyPreview,
    PolicyRecord, PostureChange,
};
use ztnet_proto::workload::WorkloadInfo;

use crate::args::{
    OutputFormat, PolicyApplyArgs, PolicyCmd, PolicyDiffArgs, PolicyExplainArgs, PolicyWhoArgs,
};
use crate::client::{ApiClient, ApiFailure};
use crate::cmd::admin::{node_list, segment};
use crate::output::{Table, emit, fields, note, noteln, time};

/// Runs the policy commands that need the coordinator.
pub fn online(client: &ApiClient, fmt: OutputFormat, cmd: &PolicyCmd) -> Result<()> {
    match cmd {
        PolicyCmd::Apply(a) => apply(client, fmt, a),
        PolicyCmd::Show(a) => {
            let path = format!("/v1/networks/{}/policy", segment(&a.network)?);
            let rec: PolicyRecord = client.get(&path)?;
            emit(fmt, &rec, |r| {
                let mut s = fields(&[
                    ("version", format!("v{}", r.version)),
                    ("applied", time(r.applied_at)),
                    ("applied by", r.applied_by.clone()),
                    ("in force", if r.active { "yes" } else { "no" }.into()),
                ]);
                s.push('\n');
                s.push_str(&r.source);
                if !r.source.ends_with('\n') {
                    s.push('\n');
                }
                s
            })
        }
        PolicyCmd::History(a) => {
            let path = format!("/v1/networks/{}/policy/history", segment(&a.network)?);
            let recs: Vec<PolicyRecord> = client.get(&path)?;
            emit(fmt, &recs, |recs| {
                let mut t = Table::new(&["VERSION", "APPLIED", "BY", "IN FORCE", "LINES"]);
                for r in recs {
                    t.row(vec![
                        format!("v{}", r.version),
                        time(r.applied_at),
                        r.applied_by.clone(),
                        if r.active { "yes" } else { "" }.into(),
                        r.source.lines().count().to_string(),
                    ]);
                }
                t.render("no policy was ever applied (deny all)")
            })
        }
        PolicyCmd::WhoCanReach(a) => who_can_reach(client, fmt, a),
        PolicyCmd::Diff(a) => diff(client, fmt, a),
        PolicyCmd::Check(_) | PolicyCmd::Explain(_) => {
            unreachable!("offline policy commands are dispatched before a client is built")
        }
    }
}

/// The policy in force in a network (deny all when none was applied), and its version.
fn policy_in_force(client: &ApiClient, network: &str) -> Result<(Policy, Option<u64>)> {
    let path = format!("/v1/networks/{}/policy", segment(network)?);
    let rec: PolicyRecord = match client.get(&path) {
        Ok(r) => r,
        Err(e) if matches!(e.downcast_ref::<ApiFailure>(), Some(ApiFailure(api)) if api.status == 404 && api.message.contains("no policy")) =>
        {
            return Ok((Policy::deny_all(), None));
        }
        Err(e) => return Err(e),
    };
    if !rec.active {
        return Ok((Policy::deny_all(), None));
    }
    let checked = Policy::parse(&rec.source).map_err(|e| {
        anyhow!(
            "the policy in force (v{}) does not parse here: {}",
            rec.version,
            e.diagnostics
                .first()
                .map_or_else(|| "no diagnostic".to_string(), |d| d.message.clone())
        )
    })?;
    Ok((checked.policy, Some(rec.version)))
}

/// A node the access review leaves out, and why.
#[derive(Debug, Serialize)]
struct LeftOut {
    node: String,
    /// The coordinator's reason for the quarantine.
    reason: String,
}

impl LeftOut {
    fn sentence(&self) -> String {
        format!(
            "left out: {} is quarantined ({}); a quarantined node is in no netmap, so it reaches \
             nobody and nobody reaches it now",
            self.node, self.reason
        )
    }
}

/// The nodes the coordinator compiles policy over now (active, not quarantined), and the
/// quarantined ones, left out as revoked ones are.
struct ReviewNodes {
    inventory: netpolicy::Inventory,
    quarantined: Vec<LeftOut>,
}

/// A node as the coordinator compiles policy over it: host prefixes of its overlay addresses,
/// no routes.
fn identity(n: &NodeInfo) -> NodeIdentity {
    NodeIdentity {
        addresses: n
            .addresses
            .iter()
            .map(|a| match a {
                ipnet::IpNet::V4(v4) => ipnet::IpNet::V4(v4.addr().into()),
                ipnet::IpNet::V6(v6) => ipnet::IpNet::V6(v6.addr().into()),
            })
            .collect(),
        name: n.name.clone(),
        namespace: n.namespace.clone(),
        tags: n.tags.clone(),
        spiffe_id: n.spiffe_id.clone(),
        routes: Vec::new(),
    }
}

/// The network's nodes for the review: revoked ones are not listed, quarantined ones are set
/// apart (the coordinator puts them in no netmap).
fn review_nodes(client: &ApiClient, network: &str) -> Result<ReviewNodes> {
    let mut nodes = Vec::new();
    let mut quarantined = Vec::new();
    for n in node_list(client, network)? {
        match (&n.quarantine, n.state.as_str()) {
            (Some(reason), _) => quarantined.push(LeftOut {
                node: n.name.clone(),
                reason: reason.clone(),
            }),
            (None, "quarantined") => quarantined.push(LeftOut {
                node: n.name.clone(),
                reason: "no reason given".into(),
            }),
            (None, _) => nodes.push(identity(&n)),
        }
    }
    Ok(ReviewNodes {
        inventory: netpolicy::Inventory { nodes },
        quarantined,
    })
}

/// A workload that may open the flow: its node may, and the data plane decides by node.
#[derive(Debug, Serialize)]
struct WorkloadReach {
    spiffe_id: String,
    node: String,
    /// The grant that lets its node open the flow.
    rule: String,
    /// Where its node's flow is open.
    open_on: netpolicy::OpenOn,
}

/// What `policy who-can-reach` reports.
#[derive(Debug, Serialize)]
struct WhoCanReach {
    node: String,
    port: String,
    policy_version: Option<u64>,
    reachers: Vec<netpolicy::Reacher>,
    /// Workload registrations on the reaching nodes.
    workloads: Vec<WorkloadReach>,
    /// Where the policy says about a workload's SPIFFE ID something else than about its node:
    /// the node's answer is what the data plane enforces.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    workload_notes: Vec<String>,
    /// Quarantined nodes, left out (the target itself, when it is quarantined).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    left_out: Vec<LeftOut>,
}

/// `ztnet policy who-can-reach --network N NODE --port P`.
fn who_can_reach(client: &ApiClient, fmt: OutputFormat, a: &PolicyWhoArgs) -> Result<()> {
    let probe = Probe::from_str(&a.port)
        .map_err(|e| anyhow!("--port {:?}: {e} (try tcp:5432, udp:53 or icmp)", a.port))?;
    let (policy, version) = policy_in_force(client, &a.network)?;
    let nodes = review_nodes(client, &a.network)?;
    let mut out = WhoCanReach {
        node: a.node.clone(),
        port: a.port.clone(),
        policy_version: version,
        reachers: Vec::new(),
        workloads: Vec::new(),
        workload_notes: Vec::new(),
        left_out: nodes.quarantined,
    };
    if !out.left_out.iter().any(|q| q.node == a.node) {
        out.reachers = netpolicy::who_can_reach(&policy, &nodes.inventory, &a.node, probe)
            .map_err(|e| {
                anyhow!(
                    "{e}; `ztnet node list --network {}` shows its nodes",
                    a.network
                )
            })?;
        let path = format!("/v1/networks/{}/workloads", segment(&a.network)?);
        let registered: Vec<WorkloadInfo> = client.get(&path)?;
        let (workloads, notes) = workload_reach(
            &policy,
            &nodes.inventory,
            &a.node,
            probe,
            &out.reachers,
            &registered,
        );
        out.workloads = workloads;
        out.workload_notes = notes;
    }
    emit(fmt, &out, |w| {
        let mut t = Table::new(&["NODE", "ALLOWED BY", "OPEN ON"]);
        for r in &w.reachers {
            t.row(vec![r.node.clone(), r.rule.clone(), r.open_on.to_string()]);
        }
        for r in &w.workloads {
            t.row(vec![
                format!("workload {} on {}", r.spiffe_id, r.node),
                format!("{} (as its node)", r.rule),
                r.open_on.to_string(),
            ]);
        }
        let none = match w.policy_version {
            Some(v) => format!(
                "no node may reach {} on {} under policy v{v}",
                w.node, w.port
            ),
            None => format!("no policy in force: no node may reach {}", w.node),
        };
        let mut s = t.render(&none);
        for n in &w.workload_notes {
            s.push_str(&format!("note: {n}\n"));
        }
        for q in &w.left_out {
            s.push_str(&q.sentence());
            s.push('\n');
        }
        s
    })
}

/// The workload registrations on nodes that may reach `target`, each with its node's grant,
/// and notes where netpolicy answers differently for the workload's SPIFFE ID (asked as the
/// node's identity carrying that ID) than for the node: the data plane sees only the node a
/// packet came from, so the node's answer is the one enforced.
fn workload_reach(
    policy: &Policy,
    inventory: &netpolicy::Inventory,
    target: &str,
    probe: Probe,
    reachers: &[netpolicy::Reacher],
    registered: &[WorkloadInfo],
) -> (Vec<WorkloadReach>, Vec<String>) {
    let mut reach = Vec::new();
    let mut notes = Vec::new();
    let Some(to) = inventory.nodes.iter().find(|n| n.name == target) else {
        return (reach, notes);
    };
    for w in registered {
        let Some(node) = inventory.nodes.iter().find(|n| n.name == w.node) else {
            continue;
        };
        if node.name == target {
            continue;
        }
        let as_id = NodeIdentity {
            spiffe_id: w.spiffe_id.to_string(),
            ..node.clone()
        };
        // Judged on every address, as for the node: the pair alone, with the ID.
        let pair = netpolicy::Inventory {
            nodes: vec![as_id.clone(), to.clone()],
        };
        let id_reach = netpolicy::who_can_reach(policy, &pair, target, probe)
            .ok()
            .and_then(|r| r.into_iter().next());
        let mut id_answer = netpolicy::explain(policy, &as_id, to, None, probe);
        if let Some(r) = &id_reach {
            id_answer.allowed = true;
            id_answer.decided_by = r.rule.clone();
        }
        match (
            reachers.iter().find(|r| r.node == node.name),
            id_reach.is_some(),
        ) {
            (Some(r), allowed) => {
                if !allowed {
                    notes.push(format!(
                        "workload {} on {}: the policy does not allow its SPIFFE ID ({}), but \
                         the data plane decides by node and {} may reach {target}, so the \
                         workload can too",
                        w.spiffe_id, node.name, id_answer.decided_by, node.name
                    ));
                }
                reach.push(WorkloadReach {
                    spiffe_id: w.spiffe_id.to_string(),
                    node: node.name.clone(),
                    rule: r.rule.clone(),
                    open_on: r.open_on.clone(),
                });
            }
            (None, true) => notes.push(format!(
                "workload {} on {}: {} allows its SPIFFE ID, but the data plane decides by node \
                 and {} may not reach {target}, so the workload cannot",
                w.spiffe_id, node.name, id_answer.decided_by, node.name
            )),
            (None, false) => {}
        }
    }
    reach.sort_by(|a, b| (&a.node, &a.spiffe_id).cmp(&(&b.node, &b.spiffe_id)));
    (reach, notes)
}

/// What `policy diff` reports: the access pairs, the open flows the change would cut and the
/// posture changes it would make.
#[derive(Debug, Serialize)]
struct PolicyDiff {
    policy_version: Option<u64>,
    #[serde(flatten)]
    diff: netpolicy::AccessDiff,
    /// Quarantined nodes, left out of both sides.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    left_out: Vec<LeftOut>,
    /// The open flows, from the coordinator's preview; `None` from a coordinator without it.
    open_flows: Option<OpenFlows>,
    /// Nodes the candidate's `[[posture]]` entries would quarantine or release; `None` from a
    /// coordinator without the preview.
    posture: Option<Vec<PostureChange>>,
    /// What could not be shown, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    notes: Vec<String>,
}

/// The open-flow part of `policy diff`.
#[derive(Debug, Serialize)]
struct OpenFlows {
    /// Distinct open flows the nodes reported.
    total: usize,
    /// Those the candidate would cut.
    cut: Vec<CutFlow>,
    /// Active nodes whose flows are not known.
    not_reported: Vec<NotReported>,
    /// Nodes with more open flows than they could send.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    truncated: Vec<String>,
}

/// `ztnet policy diff --network N -f FILE`.
fn diff(client: &ApiClient, fmt: OutputFormat, a: &PolicyDiffArgs) -> Result<()> {
    let source = read_source(&a.file)?;
    let new = match Policy::parse(&source) {
        Ok(c) => c.policy,
        Err(e) => {
            note!(
                "{}",
                render_diagnostics(&a.file, Some(&source), &e.diagnostics)
            );
            bail!("{}: policy has errors; fix them first", a.file.display());
        }
    };
    let (old, version) = policy_in_force(client, &a.network)?;
    let nodes = review_nodes(client, &a.network)?;
    let mut out = PolicyDiff {
        policy_version: version,
        diff: netpolicy::diff(&old, &new, &nodes.inventory),
        left_out: nodes.quarantined,
        open_flows: None,
        posture: None,
        notes: Vec::new(),
    };
    let path = format!("/v1/networks/{}/policy/preview", segment(&a.network)?);
    let body = ApplyPolicy {
        source: source.clone(),
    };
    match client.post::<_, PolicyPreview>(&path, &body) {
        Ok(p) => {
            out.open_flows = Some(OpenFlows {
                total: p.open_flows,
                cut: p.cut,
                not_reported: p.not_reported,
                truncated: p.truncated,
            });
            out.posture = Some(p.posture);
        }
        Err(e) if is_missing_endpoint(&e) => out.notes.push(
            "the coordinator is older than the policy preview: open flows and posture changes \
             are not shown"
                .into(),
        ),
        Err(e) => return Err(with_rendered_diagnostics(e, &a.file, &source)),
    }
    emit(fmt, &out, render_policy_diff)
}

/// Whether an API error says the path does not exist (a coordinator built before it).
fn is_missing_endpoint(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<ApiFailure>(),
        Some(ApiFailure(api)) if api.status == 404 && api.message.contains("no such API path")
    )
}

fn render_policy_diff(d: &PolicyDiff) -> String {
    let mut s = String::from("access pairs:\n");
    s.push_str(&render_diff(&d.diff));
    for q in &d.left_out {
        s.push_str(&q.sentence());
        s.push('\n');
    }
    if let Some(f) = &d.open_flows {
        s.push('\n');
        s.push_str(&render_open_flows(f));
    }
    if let Some(p) = &d.posture {
        s.push('\n');
        s.push_str(&render_posture(p));
    }
    for n in &d.notes {
        s.push_str(&format!("note: {n}\n"));
    }
    s
}

fn render_open_flows(f: &OpenFlows) -> String {
    let mut s = if f.cut.is_empty() {
        format!(
            "open flows: none of {} open flow(s) would be cut\n",
            f.total
        )
    } else {
        let mut t = Table::new(&["FROM", "TO", "PORT", "STATE", "IDLE", "WHY"]);
        for c in &f.cut {
            t.row(vec![
                format!("{} {}", c.from, endpoint(c.from_addr, c.from_port)),
                format!("{} {}", c.to, endpoint(c.to_addr, c.to_port)),
                c.port.clone(),
                serde_json::to_value(c.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                humantime::format_duration(Duration::from_secs(c.idle_secs)).to_string(),
                c.reason.clone(),
            ]);
        }
        format!(
            "open flows that would be cut ({} of {}):\n{}",
            f.cut.len(),
            f.total,
            t.render("")
        )
    };
    if !f.not_reported.is_empty() {
        let names: Vec<String> = f
            .not_reported
            .iter()
            .map(|n| format!("{} ({})", n.node, n.reason))
            .collect();
        s.push_str(&format!("not reported: {}\n", names.join(", ")));
    }
    if !f.truncated.is_empty() {
        s.push_str(&format!(
            "more open flows than reported (only the first {} judged): {}\n",
            ztnet_proto::control::MAX_FLOWS_ANSWERED,
            f.truncated.join(", ")
        ));
    }
    s
}

fn render_posture(changes: &[PostureChange]) -> String {
    if changes.is_empty() {
        return "posture: no node would be quarantined or released\n".into();
    }
    let mut s = String::from("posture:\n");
    for c in changes {
        let line = match c.change.as_str() {
            "quarantine" => format!("  would quarantine {}: {}\n", c.node, c.reason),
            "release" => format!(
                "  would release {} (quarantined now: {})\n",
                c.node, c.reason
            ),
            other => format!("  {other} {}: {}\n", c.node, c.reason),
        };
        s.push_str(&line);
    }
    s
}

/// `100.64.0.1:40000`, `[fd00::1]:22`, or the bare address when there is no port.
fn endpoint(addr: std::net::IpAddr, port: u16) -> String {
    match (addr, port) {
        (a, 0) => a.to_string(),
        (std::net::IpAddr::V6(a), p) => format!("[{a}]:{p}"),
        (a, p) => format!("{a}:{p}"),
    }
}

fn render_diff(d: &netpolicy::AccessDiff) -> String {
    if d.is_empty() {
        return "no change in access\n".to_string();
    }
    let mut t = Table::new(&["CHANGE", "FROM", "TO", "PORTS", "OPEN ON"]);
    for (sign, changes) in [("+ added", &d.added), ("- removed", &d.removed)] {
        for c in changes {
            t.row(vec![
                sign.to_string(),
                c.from.clone(),
                c.to.clone(),
                c.ports.join(" "),
                c.open_on.to_string(),
            ]);
        }
    }
    for c in &d.changed {
        let label = if c.before.routes == c.after.routes {
            "~ family"
        } else {
            "~ moved"
        };
        t.row(vec![
            label.to_string(),
            c.from.clone(),
            c.to.clone(),
            c.ports.join(" "),
            format!("{} -> {}", c.before, c.after),
        ]);
    }
    t.render("no change in access")
}

/// What `policy apply --wait` reports.
#[derive(Debug, Serialize)]
struct ApplyOutcome {
    #[serde(flatten)]
    applied: PolicyApplied,
    /// Milliseconds from the apply request to the last acknowledgement, with `--wait` when at
    /// least one online node had to change.
    acknowledged_ms: Option<u64>,
    /// With `--wait`: the online nodes waited for (0 when no online node had to change).
    #[serde(skip_serializing_if = "Option::is_none")]
    waited_for: Option<usize>,
    /// Nodes offline at apply time, not waited for: each gets the policy when it reconnects.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    not_waited_for: Vec<String>,
}

fn apply(client: &ApiClient, fmt: OutputFormat, a: &PolicyApplyArgs) -> Result<()> {
    let source = read_source(&a.file)?;
    let path = format!("/v1/networks/{}/policy", segment(&a.network)?);
    let started = Instant::now();
    let applied: PolicyApplied = match client.put(
        &path,
        &ApplyPolicy {
            source: source.clone(),
        },
    ) {
        Ok(p) => p,
        Err(e) => return Err(with_rendered_diagnostics(e, &a.file, &source)),
    };

    let (acknowledged, offline) = if a.wait {
        let (online, offline) = match &applied.reach {
            // The coordinator's own split, made when it sent the netmaps.
            Some(reach) => split_by_reach(&applied.pending, reach),
            // An older coordinator: split on the node list as it is now.
            None => split_online(&applied.pending, &node_list(client, &a.network)?),
        };
        for name in &offline {
            noteln!("{name} is offline; it gets the policy when it reconnects");
        }
        let elapsed = wait_for_acks(client, &a.network, &online, started, a.timeout)?;
        (Some((elapsed, online.len())), offline)
    } else {
        (None, Vec::new())
    };
    let outcome = ApplyOutcome {
        applied,
        acknowledged_ms: acknowledged
            .filter(|(_, waited)| *waited > 0)
            .map(|(d, _)| d.as_millis() as u64),
        waited_for: acknowledged.map(|(_, waited)| waited),
        not_waited_for: offline,
    };
    emit(fmt, &outcome, |o| {
        let mut s = render_diagnostics(&a.file, Some(&source), &o.applied.warnings);
        s.push_str(&format!(
            "applied policy v{} to {}: {} test(s) passed, {} node(s) to update\n",
            o.applied.version,
            a.network,
            o.applied.tests_passed,
            o.applied.pending.len()
        ));
        if let Some((d, waited)) = acknowledged {
            s.push_str(&wait_summary(d, waited, &o.not_waited_for));
        }
        s
    })
}

/// The last line of `apply --wait`: what the online nodes did, and who has yet to get it.
fn wait_summary(elapsed: Duration, waited: usize, offline: &[String]) -> String {
    let mut s = if waited == 0 {
        "no online node had to change".to_string()
    } else {
        format!(
            "all {waited} online node(s) acknowledged in {:.3}s",
            elapsed.as_secs_f64()
        )
    };
    if !offline.is_empty() {
        s.push_str(&format!(
            "; {} offline node(s) get it when they reconnect: {}",
            offline.len(),
            offline.join(", ")
        ));
    }
    s.push('\n');
    s
}

/// Splits pending acks as the apply answer's `reach` does: connected nodes to wait for, the
/// offline ones named. A pending node in neither list (deleted meanwhile) is not waited for.
fn split_by_reach(
    pending: &[PendingAck],
    reach: &ztnet_proto::admin::Reach,
) -> (Vec<PendingAck>, Vec<String>) {
    let online = pending
        .iter()
        .filter(|p| reach.connected.contains(&p.node))
        .cloned()
        .collect();
    // Only the offline nodes whose netmap the apply changed have anything to get later.
    let offline = reach
        .offline
        .iter()
        .filter(|o| pending.iter().any(|p| p.node == o.node))
        .map(|o| o.node.clone())
        .collect();
    (online, offline)
}

/// Splits pending acks into those of nodes online now (to wait for) and the names of nodes
/// offline now, which get the policy when they reconnect. Deleted nodes are in neither.
fn split_online(pending: &[PendingAck], nodes: &[NodeInfo]) -> (Vec<PendingAck>, Vec<String>) {
    let mut online = Vec::new();
    let mut offline = Vec::new();
    for p in pending {
        match nodes.iter().find(|n| n.name == p.node) {
            Some(n) if n.online => online.push(p.clone()),
            Some(_) => offline.push(p.node.clone()),
            None => {}
        }
    }
    (online, offline)
}

/// Polls the node list until every pending node applied its version; the time since `started`.
fn wait_for_acks(
    client: &ApiClient,
    network: &str,
    pending: &[PendingAck],
    started: Instant,
    timeout: Duration,
) -> Result<Duration> {
    let deadline = Instant::now() + timeout;
    loop {
        let nodes = node_list(client, network)?;
        let waiting = waiting_nodes(pending, &nodes);
        if waiting.is_empty() {
            return Ok(started.elapsed());
        }
        if Instant::now() >= deadline {
            let names: Vec<String> = waiting
                .iter()
                .map(|(p, n)| match n {
                    Some(n) if !n.online => format!("{} (offline)", p.node),
                    Some(n) => format!(
                        "{} (at v{} of v{})",
                        p.node, n.applied_version, p.netmap_version
                    ),
                    None => p.node.clone(),
                })
                .collect();
            bail!(
                "the policy is applied, but {} node(s) did not acknowledge within {}: {}",
                names.len(),
                humantime::format_duration(timeout),
                names.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Pending acks not yet reached. A node that disappeared (deleted) no longer waits.
fn waiting_nodes<'a>(
    pending: &'a [PendingAck],
    nodes: &'a [NodeInfo],
) -> Vec<(&'a PendingAck, Option<&'a NodeInfo>)> {
    pending
        .iter()
        .filter_map(|p| {
            let node = nodes.iter().find(|n| n.name == p.node)?;
            (node.applied_version < p.netmap_version).then_some((p, Some(node)))
        })
        .collect()
}

/// Prints a refused apply's diagnostics against the local file, then passes the error on.
fn with_rendered_diagnostics(e: anyhow::Error, file: &Path, source: &str) -> anyhow::Error {
    match e.downcast_ref::<ApiFailure>() {
        Some(ApiFailure(api)) if !api.diagnostics.is_empty() => {
            note!(
                "{}",
                render_diagnostics(file, Some(source), &api.diagnostics)
            );
            anyhow!("coordinator refused the policy: {}", api.message)
        }
        _ => e,
    }
}

/// What `policy check --output json` prints.
#[derive(Debug, Serialize)]
struct CheckOutcome {
    ok: bool,
    diagnostics: Vec<Diagnostic>,
    tests: Option<TestReport>,
}

/// `ztnet policy check FILE`: validates and runs the document's tests. Fails on any error or
/// failed test, after printing the whole report.
pub fn check(fmt: OutputFormat, file: &Path) -> Result<()> {
    let source = read_source(file)?;
    let outcome = match Policy::parse(&source) {
        Err(e) => CheckOutcome {
            ok: false,
            diagnostics: e.diagnostics,
            tests: None,
        },
        Ok(checked) => {
            let report = checked.policy.run_tests();
            CheckOutcome {
                ok: report.passed(),
                diagnostics: checked.warnings,
                tests: Some(report),
            }
        }
    };
    emit(fmt, &outcome, |o| render_check(file, &source, o))?;

    let errors = count(&outcome.diagnostics, Severity::Error);
    let failed = outcome
        .tests
        .as_ref()
        .map_or(0, |t| t.results.iter().filter(|r| !r.passed).count());
    if errors > 0 {
        bail!("{}: policy has {errors} error(s)", file.display());
    }
    if failed > 0 {
        bail!("{}: {failed} policy test(s) failed", file.display());
    }
    Ok(())
}

fn render_check(file: &Path, source: &str, o: &CheckOutcome) -> String {
    let mut s = render_diagnostics(file, Some(source), &o.diagnostics);
    let warnings = count(&o.diagnostics, Severity::Warning);
    match &o.tests {
        None => {
            let errors = count(&o.diagnostics, Severity::Error);
            s.push_str(&format!(
                "{}: {errors} error(s), {warnings} warning(s); tests not run\n",
                file.display()
            ));
        }
        Some(report) => {
            s.push_str(&netpolicy::render_test_report(
                &file.display().to_string(),
                report,
            ));
            let failed = report.results.iter().filter(|r| !r.passed).count();
            let verdict = if failed == 0 { "ok" } else { "FAILED" };
            s.push_str(&format!(
                "{}: valid, {warnings} warning(s); tests {verdict}\n",
                file.display()
            ));
        }
    }
    s
}

/// `ztnet policy explain FILE --from A --to B --port P`.
pub fn explain(fmt: OutputFormat, a: &PolicyExplainArgs) -> Result<()> {
    let from = parse_identity(&a.from, a.trust_domain.as_deref()).context("--from")?;
    let to = parse_identity(&a.to, a.trust_domain.as_deref()).context("--to")?;
    let probe = Probe::from_str(&a.port)
        .map_err(|e| anyhow!("--port {:?}: {e} (try tcp:5432, udp:53 or icmp)", a.port))?;
    let source = read_source(&a.file)?;
    let checked = match Policy::parse(&source) {
        Ok(c) => c,
        Err(e) => {
            note!(
                "{}",
                render_diagnostics(&a.file, Some(&source), &e.diagnostics)
            );
            bail!("{}: policy has errors; fix them first", a.file.display());
        }
    };

    let answer = netpolicy::explain(&checked.policy, &from, &to, a.dst, probe);
    emit(fmt, &answer, |x| {
        let verdict = if x.allowed { "ALLOWED" } else { "DENIED" };
        let mut s = format!(
            "{verdict}: {} -> {} on {}\ndecided by: {}\n",
            from.name, to.name, a.port, x.decided_by
        );
        if x.matching_rules.is_empty() {
            s.push_str("matching rules: none\n");
        } else {
            s.push_str("matching rules:\n");
            for r in &x.matching_rules {
                s.push_str(&format!("  {r}\n"));
            }
        }
        s
    })
}

/// Parses `NAME[,ns=NS][,tags=a+b][,ip=ADDR+ADDR][,spiffe=ID]` into an identity.
pub fn parse_identity(spec: &str, trust_domain: Option<&str>) -> Result<NodeIdentity> {
    let mut parts = spec.split(',');
    let name = parts.next().unwrap_or("").trim();
    if name.is_empty() || name.contains('=') {
        bail!("identity {spec:?} must start with a node name, e.g. web-1,ns=production,tags=web");
    }
    let mut namespace = String::new();
    let mut tags = Vec::new();
    let mut addresses = Vec::new();
    let mut spiffe = None;
    for part in parts {
        let (k, v) = part
            .split_once('=')
            .with_context(|| format!("identity {spec:?}: {part:?} is not KEY=VALUE"))?;
        let v = v.trim();
        match k.trim() {
            "ns" | "namespace" => namespace = nonempty(v, "ns")?.to_string(),
            "tags" | "tag" => {
                for t in v.split('+') {
                    let t = t.trim().strip_prefix("tag:").unwrap_or(t.trim());
                    tags.push(nonempty(t, "tags")?.to_string());
                }
            }
            "ip" | "addr" => {
                for ip in v.split('+') {
                    let ip: std::net::IpAddr = ip
                        .trim()
                        .parse()
                        .with_context(|| format!("identity {spec:?}: {ip:?} is not an address"))?;
                    addresses.push(ipnet::IpNet::from(ip));
                }
            }
            "spiffe" => spiffe = Some(nonempty(v, "spiffe")?.to_string()),
            other => {
                bail!("identity {spec:?}: unknown key {other:?} (known: ns, tags, ip, spiffe)")
            }
        }
    }
    tags.sort();
    tags.dedup();
    let spiffe_id = match (spiffe, trust_domain) {
        (Some(id), _) => id,
        (None, Some(td)) if !namespace.is_empty() => {
            format!("spiffe://{td}/ns/{namespace}/node/{name}")
        }
        (None, _) => String::new(),
    };
    Ok(NodeIdentity {
        name: name.to_string(),
        namespace,
        tags,
        spiffe_id,
        addresses,
        routes: Vec::new(),
    })
}

fn nonempty<'a>(v: &'a str, key: &str) -> Result<&'a str> {
    if v.is_empty() {
        bail!("{key}= has an empty value");
    }
    Ok(v)
}

fn read_source(file: &Path) -> Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("reading policy {}", file.display()))
}

fn count(diags: &[Diagnostic], sev: Severity) -> usize {
    diags.iter().filter(|d| d.severity == sev).count()
}

/// Renders findings against the source with netpolicy's renderer (`error: ...`,
/// `--> file:line:col`, the line and a caret). Without the source, the message and position.
pub fn render_diagnostics(file: &Path, source: Option<&str>, diags: &[Diagnostic]) -> String {
    netpolicy::render_diagnostics(source.unwrap_or(""), &file.display().to_string(), diags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_syntax_reads_every_key() {
        let id = parse_identity(
            "web-1,ns=production,tags=web+tag:front,ip=100.64.0.2",
            Some("td"),
        )
        .expect("valid identity");
        assert_eq!(id.name, "web-1");
        assert_eq!(id.namespace, "production");
        assert_eq!(id.tags, vec!["front".to_string(), "web".to_string()]);
        assert_eq!(id.spiffe_id, "spiffe://td/ns/production/node/web-1");
        assert_eq!(
            id.addresses,
            vec!["100.64.0.2/32".parse::<ipnet::IpNet>().unwrap()]
        );

        let id = parse_identity("db", Some("td")).expect("name alone");
        assert_eq!(id.namespace, "");
        assert_eq!(id.spiffe_id, "");
        assert!(id.tags.is_empty());
    }

    #[test]
    fn identity_mistakes_are_named() {
        let e = |s: &str| format!("{:#}", parse_identity(s, None).unwrap_err());
        assert!(e("").contains("must start with a node name"));
        assert!(e("ns=x").contains("must start with a node name"));
        assert!(e("a,role=x").contains("unknown key \"role\""));
        assert!(e("a,tags").contains("not KEY=VALUE"));
        assert!(e("a,ip=999.1.1.1").contains("not an address"));
        assert!(e("a,ns=").contains("empty value"));
    }

    fn cut_flow() -> CutFlow {
        CutFlow {
            from: "web1".into(),
            to: "db1".into(),
            port: "tcp:5432".into(),
            from_addr: "100.64.0.1".parse().unwrap(),
            from_port: 40000,
            to_addr: "100.64.0.3".parse().unwrap(),
            to_port: 5432,
            state: netpolicy::FlowState::Established,
            idle_secs: 75,
            reason: "no grant allows it any more (default deny)".into(),
            reported_by: vec!["db1".into(), "web1".into()],
        }
    }

    #[test]
    fn the_diff_prints_its_three_sections() {
        let mut d = PolicyDiff {
            policy_version: Some(3),
            diff: netpolicy::AccessDiff::default(),
            left_out: Vec::new(),
            open_flows: Some(OpenFlows {
                total: 4,
                cut: vec![cut_flow()],
                not_reported: vec![NotReported {
                    node: "web2".into(),
                    reason: "offline".into(),
                }],
                truncated: Vec::new(),
            }),
            posture: Some(vec![PostureChange {
                node: "ops1".into(),
                change: "quarantine".into(),
                reason: "posture at line 9: fact disk is not reported".into(),
            }]),
            notes: Vec::new(),
        };
        let s = render_policy_diff(&d);
        assert!(s.starts_with("access pairs:\nno change in access\n"), "{s}");
        assert!(s.contains("open flows that would be cut (1 of 4):"), "{s}");
        assert!(
            s.contains("web1 100.64.0.1:40000  db1 100.64.0.3:5432  tcp:5432"),
            "{s}"
        );
        assert!(s.contains("established  1m 15s"), "{s}");
        assert!(s.contains("not reported: web2 (offline)\n"), "{s}");
        assert!(
            s.contains("would quarantine ops1: posture at line 9"),
            "{s}"
        );

        d.open_flows.as_mut().unwrap().cut.clear();
        d.posture = Some(Vec::new());
        let s = render_policy_diff(&d);
        assert!(
            s.contains("open flows: none of 4 open flow(s) would be cut"),
            "{s}"
        );
        assert!(
            s.contains("posture: no node would be quarantined or released"),
            "{s}"
        );

        // An older coordinator: the pairs, and a note instead of the other two.
        d.open_flows = None;
        d.posture = None;
        d.notes
            .push("the coordinator is older than the policy preview".into());
        let s = render_policy_diff(&d);
        assert!(!s.contains("open flows"), "{s}");
        assert!(s.contains("note: the coordinator is older"), "{s}");
        let json = serde_json::to_value(&d).unwrap();
        assert!(
            json["open_flows"].is_null() && json["posture"].is_null(),
            "{json}"
        );
    }

    #[test]
    fn the_diff_says_where_access_is_open_and_when_only_the_family_changes() {
        let on = |families: &[netpolicy::Family]| netpolicy::OpenOn {
            families: families.to_vec(),
            routes: Vec::new(),
        };
        let (v4, v6) = (netpolicy::Family::V4, netpolicy::Family::V6);
        let d = netpolicy::AccessDiff {
            added: vec![netpolicy::AccessChange {
                from: "a1".into(),
                to: "b1".into(),
                ports: vec!["tcp:22".into()],
                open_on: on(&[v6]),
            }],
            removed: Vec::new(),
            changed: vec![netpolicy::OpenOnChange {
                from: "a1".into(),
                to: "b1".into(),
                ports: vec!["tcp:5432".into()],
                before: on(&[v6]),
                after: on(&[v4, v6]),
            }],
        };
        let s = render_diff(&d);
        let added = s.lines().find(|l| l.starts_with("+ added")).expect("added");
        assert!(
            added.contains("tcp:22") && added.ends_with("IPv6 only"),
            "{s}"
        );
        let family = s
            .lines()
            .find(|l| l.starts_with("~ family"))
            .expect("family");
        assert!(
            family.contains("tcp:5432") && family.ends_with("IPv6 only -> IPv4 and IPv6"),
            "{s}"
        );
        // Only the family changed: not "no change in access".
        let only = netpolicy::AccessDiff {
            added: Vec::new(),
            ..d
        };
        assert!(
            !render_diff(&only).contains("no change"),
            "{}",
            render_diff(&only)
        );
    }

    #[test]
    fn the_apply_answers_split_is_used_when_there_is_one() {
        let ack = |n: &str| PendingAck {
            node: n.into(),
            netmap_version: 4,
        };
        let reach = ztnet_proto::admin::Reach {
            audit_id: 1,
            connected: vec!["web1".into()],
            offline: vec![ztnet_proto::admin::OfflinePeer {
                node: "web9".into(),
                last_seen: None,
                netmap_version: 4,
            }],
            subject_key_expires_at: None,
        };
        let (online, offline) = split_by_reach(&[ack("web1"), ack("web9")], &reach);
        assert_eq!(online.len(), 1);
        assert_eq!(online[0].node, "web1");
        assert_eq!(offline, ["web9"]);
        // An offline node whose netmap the apply did not change gets nothing later.
        let (_, offline) = split_by_reach(&[ack("web1")], &reach);
        assert!(offline.is_empty(), "{offline:?}");
    }

    #[test]
    fn apply_wait_says_when_no_online_node_had_to_change() {
        let none = wait_summary(Duration::from_millis(75), 0, &[]);
        assert_eq!(none, "no online node had to change\n");
        let offline = wait_summary(Duration::ZERO, 0, &["web9".to_string()]);
        assert_eq!(
            offline,
            "no online node had to change; 1 offline node(s) get it when they reconnect: web9\n"
        );
        let some = wait_summary(Duration::from_millis(75), 2, &["web9".to_string()]);
        assert!(
            some.starts_with("all 2 online node(s) acknowledged in 0.075s; 1 offline"),
            "{some}"
        );
    }

    #[test]
    fn only_an_unknown_path_counts_as_an_older_coordinator() {
        let failure = |status, message: &str| {
            anyhow::Error::from(ApiFailure(ztnet_proto::admin::ApiError {
                status,
                message: message.into(),
                diagnostics: Vec::new(),
            }))
        };
        assert!(is_missing_endpoint(&failure(404, "no such API path")));
        assert!(!is_missing_endpoint(&failure(404, "network x not found")));
        assert!(!is_missing_endpoint(&failure(422, "no such API path")));
        assert!(!is_missing_endpoint(&anyhow!("connection refused")));
    }

    #[test]
    fn diagnostics_point_at_the_text() {
        let d = Diagnostic {
            severity: Severity::Error,
            line: 2,
            column: 8,
            text: "tcp:0".into(),
            message: "port 0 is not a port".into(),
        };
        let s = render_diagnostics(Path::new("p.toml"), Some("a = 1\nport = tcp:0\n"), &[d]);
        assert!(s.contains("error: port 0 is not a port"), "{s}");
        assert!(s.contains("p.toml:2:8"), "{s}");
        assert!(s.contains("port = tcp:0\n"), "{s}");
        assert!(s.contains("       ^^^^^\n"), "{s}");
    }
}
