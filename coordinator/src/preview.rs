//! The policy preview behind `ztnet policy diff`: what a candidate policy would do to the
//! network now, without changing anything.
//!
//! It compiles the candidate over the same nodes as a recompute would, asks every connected
//! active node for its open flows (a [`ServerMsg::FlowQuery`](ztnet_proto::control::ServerMsg)
//! with a deadline of [`FLOW_DEADLINE`]), and judges each flow as the node itself will when it
//! installs the candidate's filter ([`netpolicy::Filter::judge_open_flow`], the same code as
//! `install`). A flow whose either end the candidate's `[[posture]]` entries would quarantine
//! is cut too, since a quarantined node leaves every netmap. Posture is judged on each node's
//! last stored report, as a recompute judges it.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use netpolicy::{ConntrackConfig, Filter, FlowFate, FlowOrigin, OpenFlow, Policy};
use ztnet_proto::admin::{CutFlow, NotReported, PolicyPreview, PostureChange};

use crate::hub::{FlowAnswer, Hub, NoFlowQuery};
use crate::netmap;
use crate::posture;
use crate::store::networks::Network;
use crate::store::nodes::{self, Node};
use crate::store::{StoreError, unix_now};

/// How long the preview waits for the nodes' answers, all together.
pub const FLOW_DEADLINE: Duration = Duration::from_secs(2);

/// What a preview is asked about: the candidate, already checked.
pub struct Candidate<'a> {
    /// The candidate policy.
    pub policy: &'a Policy,
    /// Its warnings, passed through.
    pub warnings: Vec<netpolicy::Diagnostic>,
}

/// Previews a checked candidate policy for a network.
pub async fn preview(
    hub: &Hub,
    network: &Network,
    candidate: Candidate<'_>,
) -> Result<PolicyPreview, StoreError> {
    let now = unix_now();
    let mut conn = hub.store.pool().acquire().await?;
    let members = nodes::active(&mut conn, network.id).await?;
    let rows = posture::rows(&mut conn, network.id).await?;
    drop(conn);

    // Posture, as a recompute would judge it under the candidate.
    let mut after: HashMap<&str, String> = HashMap::new();
    let mut changes = Vec::new();
    for node in &members {
        let row = rows.get(&node.id);
        let live = hub.session_id(node.id).map(posture::session_key);
        let judged = posture::judge(Some(candidate.policy), node, row, live.as_deref(), now);
        let before = row.and_then(|r| r.quarantine.clone());
        match (&before, &judged) {
            (None, Some(why)) => changes.push(PostureChange {
                node: node.name.clone(),
                change: "quarantine".into(),
                reason: why.clone(),
            }),
            (Some(was), None) => changes.push(PostureChange {
                node: node.name.clone(),
                change: "release".into(),
                reason: was.clone(),
            }),
            _ => {}
        }
        if let Some(why) = judged {
            after.insert(node.name.as_str(), why);
        }
    }

    let (answers, not_reported) = collect_flows(hub, &members).await;
    let compiled = netpolicy::compile(candidate.policy, &netmap::inventory(&members));
    let names: HashMap<&str, &Node> = members.iter().map(|n| (n.name.as_str(), n)).collect();

    let mut seen: BTreeMap<FlowId, CutFlow> = BTreeMap::new();
    let mut cut: BTreeMap<FlowId, bool> = BTreeMap::new();
    let mut truncated = Vec::new();
    for (reporter, answer) in &answers {
        if answer.truncated {
            truncated.push(reporter.clone());
        }
        let spec = compiled.filters.get(reporter).cloned().unwrap_or_default();
        let judge = Filter::new(spec, ConntrackConfig { max_flows: 16 });
        for flow in &answer.flows {
            // A flow with a peer this network does not have is not one of its flows.
            if !names.contains_key(flow.peer.as_str()) || flow.peer == *reporter {
                continue;
            }
            let (id, entry) = identify(reporter, flow);
            let reason = fate(reporter, flow, &after, &judge);
            let slot = seen.entry(id.clone()).or_insert(entry);
            if !slot.reported_by.contains(reporter) {
                slot.reported_by.push(reporter.clone());
            }
            let is_cut = cut.entry(id).or_insert(false);
            if let Some(reason) = reason
                && !*is_cut
            {
                *is_cut = true;
                slot.reason = reason;
            }
        }
    }
    let open_flows = seen.len();
    let cut_flows: Vec<CutFlow> = seen
        .into_iter()
        .filter(|(id, _)| cut.get(id).copied().unwrap_or(false))
        .map(|(_, mut f)| {
            f.reported_by.sort();
            f
        })
        .collect();
    truncated.sort();
    Ok(PolicyPreview {
        policy_version: hub.effective(network.id).version,
        open_flows,
        cut: cut_flows,
        not_reported,
        truncated,
        posture: changes,
        warnings: candidate.warnings,
    })
}

/// A flow as both its ends name it: opener, other end, protocol, addresses and ports.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct FlowId {
    from: String,
    to: String,
    proto: u8,
    echo: bool,
    from_addr: IpAddr,
    from_port: u16,
    to_addr: IpAddr,
    to_port: u16,
}

fn identify(reporter: &str, flow: &OpenFlow) -> (FlowId, CutFlow) {
    let (from, to) = match flow.opened_by {
        FlowOrigin::Local => (reporter.to_string(), flow.peer.clone()),
        FlowOrigin::Peer => (flow.peer.clone(), reporter.to_string()),
    };
    let id = FlowId {
        from: from.clone(),
        to: to.clone(),
        proto: flow.proto,
        echo: flow.echo,
        from_addr: flow.initiator,
        from_port: flow.initiator_port,
        to_addr: flow.responder,
        to_port: flow.responder_port,
    };
    let entry = CutFlow {
        from,
        to,
        port: flow.port_label(),
        from_addr: flow.initiator,
        from_port: flow.initiator_port,
        to_addr: flow.responder,
        to_port: flow.responder_port,
        state: flow.state,
        idle_secs: flow.idle_secs,
        reason: String::new(),
        reported_by: Vec::new(),
    };
    (id, entry)
}

/// Why the candidate would cut a flow that `reporter` holds, or `None` when it goes on.
fn fate(
    reporter: &str,
    flow: &OpenFlow,
    quarantined: &HashMap<&str, String>,
    judge: &Filter,
) -> Option<String> {
    for end in [reporter, flow.peer.as_str()] {
        if let Some(why) = quarantined.get(end) {
            return Some(format!(
                "{end} would be quarantined ({why}) and leave every netmap"
            ));
        }
    }
    match judge.judge_open_flow(flow) {
        FlowFate::Kept(_) => None,
        FlowFate::PeerGone => Some(format!(
            "no grant connects {reporter} and {} any more",
            flow.peer
        )),
        FlowFate::NoRule => Some("no grant allows it any more (default deny)".into()),
        FlowFate::Denied(rule) => Some(format!("{rule} denies it")),
        FlowFate::Malformed => Some("its addresses are of two families".into()),
    }
}

/// Asks every connected node for its flows and waits for the answers until the deadline.
async fn collect_flows(
    hub: &Hub,
    members: &[Node],
) -> (Vec<(String, FlowAnswer)>, Vec<NotReported>) {
    let mut not_reported = Vec::new();
    let mut waiting = Vec::new();
    for node in members {
        match hub.ask_flows(node.id) {
            Ok((id, rx)) => waiting.push((node.name.clone(), id, rx)),
            Err(NoFlowQuery::Offline) => not_reported.push(NotReported {
                node: node.name.clone(),
                reason: "offline".into(),
            }),
            Err(NoFlowQuery::Unsupported) => not_reported.push(NotReported {
                node: node.name.clone(),
                reason: "its ztnet-node does not answer flow queries (built before them)".into(),
            }),
        }
    }
    let deadline = tokio::time::Instant::now() + FLOW_DEADLINE;
    let mut answers = Vec::new();
    // The queries went out together: waiting for each in turn costs one deadline in all.
    for (name, id, rx) in waiting {
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(answer)) => answers.push((name, answer)),
            Ok(Err(_)) => not_reported.push(NotReported {
                node: name,
                reason: "its session ended before it answered".into(),
            }),
            Err(_) => {
                hub.forget_flow_query(id);
                not_reported.push(NotReported {
                    node: name,
                    reason: format!("no answer within {} s", FLOW_DEADLINE.as_secs()),
                });
            }
        }
    }
    not_reported.sort_by(|a, b| a.node.cmp(&b.node));
    (answers, not_reported)
}
