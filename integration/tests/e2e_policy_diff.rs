//! Issue 6, access review, end to end: `ztnet policy diff` names the open flows a candidate
//! policy would cut and the nodes its `[[posture]]` entries would quarantine, and the diff
//! tells the truth: applied, the candidate cuts exactly the flow it named. web1 keeps a TCP
//! session open to db1:5432 and another to ops1:7000; web2 is enrolled but offline. Needs
//! root.

use std::time::{Duration, Instant};

use serde_json::Value;
use ztnet_integration::topology::{NETWORK, NodeSpec, Topology, story_nodes};
use ztnet_integration::{require_root, wait_for};

/// In force: web may reach db on 5432 and ops on 7000.
const POLICY: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432"]

[[grant]]
from = ["tag:web"]
to = ["tag:ops"]
ports = ["tcp:7000"]
"#;

/// The candidate: the web -> db grant is gone, web -> ops stays.
const WITHOUT_DB: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["tag:ops"]
ports = ["tcp:7000"]
"#;

/// The same grants as in force, and ops must report a fact that ops1 does not report.
const OPS_POSTURE: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432"]

[[grant]]
from = ["tag:web"]
to = ["tag:ops"]
ports = ["tcp:7000"]

[[posture]]
selector = ["tag:ops"]
facts = { disk_encryption = "on" }
"#;

/// How long an echo may take on a flow that is open.
const ECHO: Duration = Duration::from_secs(5);

fn specs() -> Vec<NodeSpec> {
    story_nodes()
        .into_iter()
        .filter(|s| ["web1", "web2", "db1", "ops1"].contains(&s.name))
        .collect()
}

/// `ztnet policy diff` of `policy`, as JSON and as text.
fn diff(topo: &Topology, name: &str, policy: &str) -> (Value, String) {
    let file = topo.dir.path().join(format!("{name}.toml"));
    std::fs::write(&file, policy).expect("write the candidate");
    let file = file.to_string_lossy().into_owned();
    let args = ["policy", "diff", "--network", NETWORK, "-f", &file];
    let json = topo.ztnet_json(&args).expect("policy diff --output json");
    let text = topo.ztnet(&args).expect("policy diff");
    (json, text)
}

/// Applies `policy` and waits until each of `online` acknowledged a netmap newer than before.
fn apply_online(topo: &Topology, policy: &str, online: &[&str]) {
    let before = topo.netmap_versions().expect("netmap versions");
    let file = topo.dir.path().join("apply.toml");
    std::fs::write(&file, policy).expect("write the policy");
    let file = file.to_string_lossy().into_owned();
    topo.ztnet(&["policy", "apply", "--network", NETWORK, "-f", &file])
        .expect("policy apply");
    wait_for(
        "the online nodes to apply it",
        Duration::from_secs(30),
        || {
            let now = topo.netmap_versions()?;
            Ok(online
                .iter()
                .all(|n| {
                    let old = before.get(*n).map_or(0, |v| v.1);
                    now.get(*n)
                        .is_some_and(|(computed, applied)| applied >= computed && *applied > old)
                })
                .then_some(()))
        },
    )
    .expect("every online node applied the candidate");
}

fn cut_flows(d: &Value) -> Vec<Value> {
    d["open_flows"]["cut"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn policy_diff_names_the_open_flows_a_change_cuts_and_the_nodes_posture_would_quarantine() {
    require_root();
    let started = Instant::now();
    let mut topo = Topology::build(&specs()).expect("build the topology");
    topo.start_coordinator().expect("start the coordinator");
    topo.create_network().expect("create the network");
    let names = ["web1", "web2", "db1", "ops1"];
    for n in names {
        let token = topo.token_for(n).expect("token");
        topo.start_node(n, Some(&token)).expect("start node");
    }
    topo.wait_online(&names, Duration::from_secs(90))
        .expect("every node enrolls and connects");
    topo.apply_policy(POLICY, &["web1", "db1", "ops1"], Duration::from_secs(30))
        .expect("apply the policy");
    let stopped = Instant::now();
    topo.stop_node("web2").expect("stop web2");
    // A node stopped with SIGTERM closes its control session on the way out, so the
    // coordinator sees it leave well inside its ~9 s QUIC idle timeout.
    wait_for("web2 to be offline", Duration::from_secs(4), || {
        let list = topo.node_list()?;
        Ok(list
            .iter()
            .any(|n| n["name"] == "web2" && n["online"] == false)
            .then_some(()))
    })
    .expect("web2 offline");
    println!("web2 offline {:?} after SIGTERM", stopped.elapsed());

    topo.start_echo_servers("db1", &[5432], &[])
        .expect("echo on db1");
    topo.start_echo_servers("ops1", &[7000], &[])
        .expect("echo on ops1");
    let db1 = topo.overlay_v4("db1").expect("db1 address");
    let ops1 = topo.overlay_v4("ops1").expect("ops1 address");
    // The peers' sessions come up on the first packets: retry until each stream echoes.
    let open = |to, port| {
        wait_for("a long session to echo", Duration::from_secs(30), || {
            let mut s = topo.open_stream("web1", to, port)?;
            Ok(s.echo("hello", ECHO).is_ok().then_some(s))
        })
    };
    let mut to_db = open(db1, 5432).expect("web1 -> db1:5432 session");
    let mut to_ops = open(ops1, 7000).expect("web1 -> ops1:7000 session");

    // The grant to db goes: exactly the db session would be cut, and web2 is not reported.
    let (d, text) = diff(&topo, "without-db", WITHOUT_DB);
    eprintln!("policy diff without the db grant:\n{text}");
    let removed = d["removed"].as_array().cloned().unwrap_or_default();
    assert!(
        removed
            .iter()
            .any(|c| c["from"] == "web1" && c["to"] == "db1"),
        "the access pair web1 -> db1 is removed: {d}"
    );
    let cut = cut_flows(&d);
    assert_eq!(cut.len(), 1, "exactly one flow is cut: {d}");
    let flow = &cut[0];
    assert_eq!(
        (&flow["from"], &flow["to"], &flow["port"]),
        (
            &Value::from("web1"),
            &Value::from("db1"),
            &Value::from("tcp:5432")
        ),
        "{flow}"
    );
    assert_eq!(flow["to_addr"], db1.to_string(), "{flow}");
    assert_eq!(flow["state"], "established", "{flow}");
    let by = flow["reported_by"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        by,
        [Value::from("db1"), Value::from("web1")],
        "both ends saw it"
    );
    assert!(
        flow["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no grant")),
        "{flow}"
    );
    let total = d["open_flows"]["total"].as_u64().unwrap_or(0);
    assert!(total >= 2, "the ops session is open too: {d}");
    assert!(
        !cut.iter().any(|c| c["to"] == "ops1"),
        "the ops session stays: {d}"
    );
    let not_reported = d["open_flows"]["not_reported"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        not_reported,
        [serde_json::json!({"node": "web2", "reason": "offline"})],
        "{d}"
    );
    assert_eq!(d["posture"], serde_json::json!([]), "{d}");
    assert!(
        text.contains(&format!("open flows that would be cut (1 of {total})")),
        "{text}"
    );
    assert!(text.contains("not reported: web2 (offline)"), "{text}");
    assert!(
        text.contains("posture: no node would be quarantined or released"),
        "{text}"
    );

    // A posture entry that ops1 fails: ops1 would be quarantined, and its session cut.
    let (p, text) = diff(&topo, "ops-posture", OPS_POSTURE);
    eprintln!("policy diff with an ops posture entry:\n{text}");
    let changes = p["posture"].as_array().cloned().unwrap_or_default();
    assert_eq!(changes.len(), 1, "{p}");
    assert_eq!(
        (&changes[0]["node"], &changes[0]["change"]),
        (&Value::from("ops1"), &Value::from("quarantine")),
        "{p}"
    );
    assert!(
        changes[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("disk_encryption")),
        "{p}"
    );
    let cut = cut_flows(&p);
    assert_eq!(cut.len(), 1, "{p}");
    assert_eq!(cut[0]["to"], "ops1", "{p}");
    assert!(
        cut[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("ops1 would be quarantined")),
        "{p}"
    );
    assert!(text.contains("would quarantine ops1"), "{text}");
    // A diff changes nothing: both sessions still echo.
    to_db
        .echo("after the diffs", ECHO)
        .expect("db session open");
    to_ops
        .echo("after the diffs", ECHO)
        .expect("ops session open");

    // Apply the first candidate: the named flow really stops, the other goes on. (web2 is
    // offline, so only the online nodes can acknowledge it.)
    apply_online(&topo, WITHOUT_DB, &["web1", "db1"]);
    assert!(
        to_db.echo("after the apply", ECHO).is_err(),
        "the web1 -> db1 session was named as cut and must be cut"
    );
    to_ops
        .echo("after the apply", ECHO)
        .expect("the web1 -> ops1 session was not named and goes on");
    let (after, _) = diff(&topo, "without-db-again", WITHOUT_DB);
    assert!(cut_flows(&after).is_empty(), "nothing left to cut: {after}");
    eprintln!("policy diff: whole test {} s", started.elapsed().as_secs());
}
