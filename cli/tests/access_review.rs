//! Issue 6's access review against the real `ztnet` and `ztnet-coordinator` binaries: the audit
//! entries of no network, and (with in-process nodes enrolled over the real control channel)
//! who-can-reach and diff leaving quarantined nodes out and listing workloads.

mod common;

use std::path::Path;
use std::time::Duration;

use common::review::{Node, token};
use common::{Coordinator, expect_failure, wait_for};

const WAIT: Duration = Duration::from_secs(30);

fn apply(c: &Coordinator, dir: &Path, network: &str, source: &str) {
    let file = dir.join("policy.toml");
    std::fs::write(&file, source).expect("write");
    let file = file.to_str().expect("utf-8");
    c.ok(&["policy", "apply", "--network", network, "-f", file]);
}

const API: &str = "spiffe://corp.example/ns/production/sa/api";
const BATCH: &str = "spiffe://corp.example/ns/production/sa/batch";
const OPS: &str = "spiffe://corp.example/ns/production/sa/ops";

/// web may reach db on 5432; a grant names only a workload ID (of ops-1's workload), which the
/// data plane cannot enforce; ops nodes must run at least 1.0 and ours run 0.9.0.
const POLICY: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432"]

[[grant]]
from = ["spiffe://corp.example/ns/production/sa/ops"]
to = ["tag:db"]
ports = ["tcp:5432"]
"#;

/// Quarantines web-2: it runs 0.9.0.
const QUARANTINE_WEB2: &str = r#"
[[posture]]
selector = ["node:web-2"]
min_version = "1.0"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_can_reach_lists_workloads_and_leaves_quarantined_nodes_out() {
    let c = Coordinator::start();
    c.ok(&["network", "create", "--name", "rev3"]);
    let dirs = tempfile::tempdir().expect("tempdir");
    let mut nodes = Vec::new();
    for (name, tag) in [
        ("web-1", "web"),
        ("web-2", "web"),
        ("db-1", "db"),
        ("ops-1", "ops"),
    ] {
        let t = token(&c, "rev3", tag);
        nodes.push(Node::start(&dirs.path().join(name), name, t));
    }
    wait_for("four nodes enrolled", WAIT, || {
        c.json(&["node", "list", "--network", "rev3"])
            .as_array()
            .is_some_and(|a| a.len() == 4)
    });
    for (id, node) in [(API, "web-1"), (BATCH, "web-2"), (OPS, "ops-1")] {
        c.ok(&[
            "workload",
            "register",
            "--network",
            "rev3",
            "--spiffe-id",
            id,
            "--node",
            node,
            "--selector",
            "unix:uid:1001",
        ]);
    }
    apply(&c, dirs.path(), "rev3", POLICY);
    let who = [
        "policy",
        "who-can-reach",
        "--network",
        "rev3",
        "db-1",
        "--port",
        "tcp:5432",
    ];

    let out = c.ok(&who);
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("workload {API} on web-1")) && l.contains("grant[0]")),
        "{out}"
    );
    assert!(out.contains(&format!("workload {BATCH} on web-2")), "{out}");
    assert!(
        out.contains(&format!(
            "note: workload {OPS} on ops-1: grant[1] (line 7) allows its SPIFFE ID, but the \
             data plane decides by node and ops-1 may not reach db-1, so the workload cannot"
        )),
        "{out}"
    );
    assert!(!out.lines().any(|l| l.starts_with("ops-1")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("web-2")), "{out}");
    assert!(!out.contains("left out"), "{out}");
    let json = c.json(&who);
    let workloads: Vec<(String, String, String)> = json["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .map(|w| {
            (
                w["spiffe_id"].as_str().expect("id").to_owned(),
                w["node"].as_str().expect("node").to_owned(),
                w["rule"].as_str().expect("rule").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        workloads,
        [
            (API.into(), "web-1".into(), "grant[0] (line 2)".into()),
            (BATCH.into(), "web-2".into(), "grant[0] (line 2)".into()),
        ],
        "{json}"
    );

    // web-2 fails posture: quarantined, it is left out and said so; its workload with it.
    let diff_file = dirs.path().join("new.toml");
    std::fs::write(
        &diff_file,
        format!(
            "{POLICY}\n[[grant]]\nfrom = [\"tag:ops\"]\nto = [\"tag:web\"]\nports = [\"tcp:22\"]\n"
        ),
    )
    .expect("write");
    let diff_file = diff_file.to_str().expect("utf-8");
    apply(
        &c,
        dirs.path(),
        "rev3",
        &format!("{POLICY}\n{QUARANTINE_WEB2}"),
    );
    wait_for("web-2 quarantined", WAIT, || {
        c.json(&["node", "show", "--network", "rev3", "web-2"])["quarantine"].is_string()
    });
    let out = c.ok(&who);
    assert!(
        out.contains("left out: web-2 is quarantined (")
            && out.contains("so it reaches nobody and nobody reaches it now"),
        "{out}"
    );
    assert!(!out.lines().any(|l| l.starts_with("web-2")), "{out}");
    assert!(!out.contains(BATCH), "{out}");
    assert!(out.lines().any(|l| l.starts_with("web-1")), "{out}");
    let json = c.json(&who);
    assert_eq!(json["left_out"][0]["node"], "web-2", "{json}");
    assert_eq!(
        json["workloads"].as_array().map(Vec::len),
        Some(1),
        "{json}"
    );

    // The quarantined node is out of the diff too: ops may newly reach web-1, not web-2.
    let diff = c.json(&["policy", "diff", "--network", "rev3", "-f", diff_file]);
    let added: Vec<String> = diff["added"]
        .as_array()
        .expect("added")
        .iter()
        .map(|p| {
            format!(
                "{}->{}",
                p["from"].as_str().expect("from"),
                p["to"].as_str().expect("to")
            )
        })
        .collect();
    assert_eq!(added, ["ops-1->web-1"], "{diff}");
    assert_eq!(diff["left_out"][0]["node"], "web-2", "{diff}");
    let table = c.ok(&["policy", "diff", "--network", "rev3", "-f", diff_file]);
    assert!(table.contains("left out: web-2 is quarantined"), "{table}");

    // The target itself quarantined: nobody reaches it, and the answer says why.
    let out = c.ok(&[
        "policy",
        "who-can-reach",
        "--network",
        "rev3",
        "web-2",
        "--port",
        "tcp:22",
    ]);
    assert!(out.contains("left out: web-2 is quarantined"), "{out}");
    for n in nodes {
        n.shutdown().await;
    }
}

#[test]
fn audit_global_lists_the_entries_of_no_network() {
    let c = Coordinator::start();
    c.ok(&["network", "create", "--name", "glob"]);
    let key = c.ok(&["api-key", "create", "ci-bot"]);
    let key = key.trim();
    assert!(key.starts_with("ztkey_"), "{key}");

    let table = c.ok(&["audit", "--global"]);
    assert!(
        table
            .lines()
            .any(|l| l.contains("apikey.create") && l.contains("ci-bot")),
        "apikey.create of ci-bot missing:\n{table}"
    );
    assert!(!table.contains(key), "the audit log must never hold a key");
    assert!(
        !table.contains("network.create"),
        "a network's entries are not global:\n{table}"
    );

    let json = c.json(&["audit", "--global"]);
    let actions: Vec<&str> = json
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(actions.contains(&"apikey.create"), "{json}");

    // The network's log still works, and holds none of the global entries.
    let net = c.ok(&["audit", "--network", "glob"]);
    assert!(net.contains("network.create"), "{net}");
    assert!(!net.contains("apikey.create"), "{net}");

    // One of the two is needed, and not both.
    let err = expect_failure(c.cli().args(["audit"]), 2);
    assert!(
        err.contains("--network") && err.contains("--global"),
        "{err}"
    );
    let err = expect_failure(c.cli().args(["audit", "--global", "--network", "glob"]), 2);
    assert!(err.contains("cannot be used with"), "{err}");
}
