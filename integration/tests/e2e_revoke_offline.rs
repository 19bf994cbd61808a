//! Issue 6, end to end: a revoke while a peer is cut off from the coordinator is not reported
//! as enforced. db1 holds web1 as a peer; db1's control traffic is dropped in its own
//! namespace until the coordinator lists it offline; then web1 is revoked. The CLI and the
//! audit name db1 as the peer that still accepts web1 (fail-static: db1 keeps its netmap, as
//! its own status shows); once db1 hears the coordinator again and acknowledges, the same audit
//! entry records when. Needs root.

use std::time::Duration;

use serde_json::Value;
use ztnet_integration::topology::{COORDINATOR_PORT, NETWORK, NodeSpec, Topology, story_nodes};
use ztnet_integration::{Netns, require_root, wait_for};

const POLICY: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432"]
"#;

fn specs() -> Vec<NodeSpec> {
    story_nodes()
        .into_iter()
        .filter(|s| s.name == "web1" || s.name == "db1")
        .collect()
}

/// Drops (or lets through again) the node's control traffic, in the node's own namespace.
fn block_control(ns: &Netns, block: bool) {
    let script = if block {
        format!(
            "nft add table inet ztoffline && \
             nft add chain inet ztoffline out '{{ type filter hook output priority 0 ; }}' && \
             nft add rule inet ztoffline out udp dport {COORDINATOR_PORT} drop && \
             nft add chain inet ztoffline in '{{ type filter hook input priority 0 ; }}' && \
             nft add rule inet ztoffline in udp sport {COORDINATOR_PORT} drop"
        )
    } else {
        "nft delete table inet ztoffline".to_string()
    };
    ns.sh(&script).expect("nft in the node's namespace");
}

fn peers(status: &Value) -> Vec<String> {
    status["peers"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The enforcement of the newest `node.revoke` entry once `done` holds for it.
fn revoke_enforcement(topo: &Topology, timeout: Duration, done: fn(&Value) -> bool) -> Value {
    wait_for("the node.revoke enforcement", timeout, || {
        let audit = topo.ztnet_json(&["audit", "--network", NETWORK])?;
        Ok(audit.as_array().and_then(|a| {
            a.iter()
                .rev()
                .find(|e| e["action"] == "node.revoke")
                .map(|e| e["enforcement"].clone())
                .filter(done)
        }))
    })
    .expect("the revoke's enforcement record")
}

#[test]
fn a_revoke_names_the_offline_peer_that_still_accepts_the_node_and_completes_when_it_is_back() {
    require_root();
    let mut topo = Topology::build(&specs()).expect("build the topology");
    topo.start_coordinator().expect("start the coordinator");
    topo.create_network().expect("create the network");
    for name in ["web1", "db1"] {
        let token = topo.token_for(name).expect("token");
        topo.start_node(name, Some(&token)).expect("start the node");
    }
    topo.wait_online(&["web1", "db1"], Duration::from_secs(90))
        .expect("both nodes enroll and connect");
    topo.apply_policy(POLICY, &["web1", "db1"], Duration::from_secs(30))
        .expect("apply the policy");

    block_control(&topo.node("db1").ns, true);
    wait_for("db1 listed offline", Duration::from_secs(60), || {
        let list = topo.node_list()?;
        Ok(list
            .iter()
            .any(|n| n["name"] == "db1" && n["online"] == Value::Bool(false))
            .then_some(()))
    })
    .expect("the coordinator sees db1 offline");

    let out = topo
        .ztnet(&[
            "node",
            "revoke",
            "--network",
            NETWORK,
            "web1",
            "--reason",
            "stolen",
        ])
        .expect("ztnet node revoke");
    eprintln!("revoke-offline: {}", out.trim());
    assert!(
        out.contains("no connected peer had it (0 of 1 peers)")
            && out.contains("db1 (offline since")
            && out.contains("keeps accepting web1 until it reconnects or web1's key expires"),
        "{out}"
    );
    let pending = revoke_enforcement(&topo, Duration::from_secs(10), |e| !e.is_null());
    eprintln!("revoke-offline: audit {}", pending["summary"]);
    assert_eq!(pending["pending_offline"][0]["node"], "db1", "{pending}");
    assert!(
        !pending["summary"]
            .as_str()
            .unwrap_or_default()
            .contains("enforced"),
        "{pending}"
    );
    // Fail-static, as designed: db1 still holds web1.
    let db_status = topo.status("db1").expect("db1 status");
    assert!(
        peers(&db_status).contains(&"web1".to_owned()),
        "{db_status}"
    );

    block_control(&topo.node("db1").ns, false);
    let done = revoke_enforcement(&topo, Duration::from_secs(90), |e| !e["late"].is_null());
    eprintln!("revoke-offline: audit {}", done["summary"]);
    assert_eq!(done["late"][0]["node"], "db1", "{done}");
    assert!(done["pending_offline"].is_null(), "{done}");
    wait_for("db1 drops web1", Duration::from_secs(30), || {
        let st = topo.status("db1")?;
        Ok((!peers(&st).contains(&"web1".to_owned())).then_some(()))
    })
    .expect("db1 drops web1 once it reconnected");
}
