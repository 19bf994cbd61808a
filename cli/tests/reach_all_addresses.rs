//! Issue 6, the field report: access review judged at each node's first (IPv4) address missed a
//! grant to a node's IPv6 address. Against the real `ztnet` and `ztnet-coordinator` binaries,
//! with in-process nodes enrolled over the real control channel: who-can-reach and diff judge
//! every overlay address and say which families are open, and `apply --wait` says when no
//! online node had to change.

mod common;

use std::path::Path;
use std::time::Duration;

use common::review::{Node, token};
use common::{Coordinator, wait_for};

const WAIT: Duration = Duration::from_secs(30);

/// `ztnet policy apply` of `source`, with `--wait` when asked: (stdout, stderr).
fn apply(c: &Coordinator, dir: &Path, name: &str, source: &str, wait: bool) -> (String, String) {
    let file = dir.join(name);
    std::fs::write(&file, source).expect("write");
    let mut cmd = c.cli();
    cmd.args(["policy", "apply", "--network", "v6net", "-f"])
        .arg(&file);
    if wait {
        cmd.args(["--wait", "--timeout", "20s"]);
    }
    let out = cmd.output().expect("ztnet runs");
    common::assert_success(&out, &["policy", "apply"]);
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The overlay address of `node` of the family asked for, from the node list.
fn address(c: &Coordinator, node: &str, v6: bool) -> String {
    let n = c.json(&["node", "show", "--network", "v6net", node]);
    n["addresses"]
        .as_array()
        .expect("addresses")
        .iter()
        .filter_map(|a| a.as_str())
        .map(|a| a.split('/').next().expect("address").to_string())
        .find(|a| a.contains(':') == v6)
        .unwrap_or_else(|| panic!("{node} has no address of that family: {n}"))
}

const BY_TAG: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_to_an_ipv6_address_is_reviewed_on_that_address() {
    let c = Coordinator::start();
    c.ok(&["network", "create", "--name", "v6net"]);
    let dirs = tempfile::tempdir().expect("tempdir");
    let mut nodes = Vec::new();
    for (name, tag) in [("a1", "web"), ("b1", "db"), ("c1", "ops"), ("d1", "ops")] {
        let t = token(&c, "v6net", tag);
        nodes.push(Node::start(&dirs.path().join(name), name, t));
    }
    wait_for("four nodes online", WAIT, || {
        c.json(&["node", "list", "--network", "v6net"])
            .as_array()
            .is_some_and(|a| a.len() == 4 && a.iter().all(|n| n["online"] == true))
    });
    let b1_v6 = address(&c, "b1", true);
    let b1_v4 = address(&c, "b1", false);
    let v6_only = format!(
        "[[grant]]\nfrom = [\"tag:web\"]\nto = [\"cidr:{b1_v6}/128\"]\nports = [\"tcp:5432\"]\n"
    );
    apply(&c, dirs.path(), "v6.toml", &v6_only, false);

    // who-can-reach finds a1 and says the flow is open on IPv6 only.
    let who = [
        "policy",
        "who-can-reach",
        "--network",
        "v6net",
        "b1",
        "--port",
        "tcp:5432",
    ];
    let out = c.ok(&who);
    eprintln!("$ ztnet policy who-can-reach --network v6net b1 --port tcp:5432\n{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("a1"))
        .unwrap_or_else(|| panic!("a1 missing:\n{out}"));
    assert!(
        row.contains("grant[0]") && row.contains("IPv6 only"),
        "{out}"
    );
    assert!(!out.contains("no node may reach"), "{out}");
    let json = c.json(&who);
    assert_eq!(json["reachers"][0]["node"], "a1", "{json}");
    assert_eq!(
        json["reachers"][0]["open_on"]["families"],
        serde_json::json!(["ipv6"]),
        "{json}"
    );

    // The IPv4-only grant: IPv4 only.
    let v4_only = v6_only.replace(&format!("{b1_v6}/128"), &format!("{b1_v4}/32"));
    apply(&c, dirs.path(), "v4.toml", &v4_only, false);
    let out = c.ok(&who);
    assert!(
        out.lines()
            .any(|l| l.starts_with("a1") && l.contains("IPv4 only")),
        "{out}"
    );

    // Back to the IPv6 grant; the diff to the tag grant is a family change, not an addition.
    apply(&c, dirs.path(), "v6.toml", &v6_only, false);
    let tag_file = dirs.path().join("tag.toml");
    std::fs::write(&tag_file, BY_TAG).expect("write");
    let tag_file = tag_file.to_str().expect("utf-8");
    let diff = ["policy", "diff", "--network", "v6net", "-f", tag_file];
    let out = c.ok(&diff);
    eprintln!("$ ztnet policy diff --network v6net -f tag.toml\n{out}");
    assert!(!out.contains("+ added"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("~ family"))
        .unwrap_or_else(|| panic!("no family change:\n{out}"));
    assert!(
        row.contains("a1") && row.contains("b1") && row.contains("tcp:5432"),
        "{out}"
    );
    assert!(row.contains("IPv6 only -> IPv4 and IPv6"), "{out}");
    let json = c.json(&diff);
    assert_eq!(json["added"], serde_json::json!([]), "{json}");
    assert_eq!(
        json["changed"][0]["before"]["families"],
        serde_json::json!(["ipv6"])
    );
    assert_eq!(
        json["changed"][0]["after"]["families"],
        serde_json::json!(["ipv4", "ipv6"])
    );

    // apply --wait of a policy that changes no netmap: said so, no time measured.
    let (out, _) = apply(&c, dirs.path(), "v6.toml", &v6_only, true);
    assert!(out.contains("no online node had to change"), "{out}");
    assert!(!out.contains("acknowledged in"), "{out}");

    // c1 and d1 offline; a grant between them alone changes only offline netmaps.
    let d1 = nodes.pop().expect("d1");
    let c1 = nodes.pop().expect("c1");
    c1.shutdown().await;
    d1.shutdown().await;
    wait_for("c1 and d1 offline", WAIT, || {
        ["c1", "d1"]
            .iter()
            .all(|n| c.json(&["node", "show", "--network", "v6net", n])["online"] == false)
    });
    let ops = format!(
        "{v6_only}\n[[grant]]\nfrom = [\"tag:ops\"]\nto = [\"tag:ops\"]\nports = [\"tcp:22\"]\n"
    );
    let (out, err) = apply(&c, dirs.path(), "ops.toml", &ops, true);
    eprintln!("$ ztnet policy apply --network v6net -f ops.toml --wait\n{err}{out}");
    assert!(
        err.contains("c1 is offline; it gets the policy when it reconnects")
            && err.contains("d1 is offline; it gets the policy when it reconnects"),
        "{err}"
    );
    assert!(
        out.contains(
            "no online node had to change; 2 offline node(s) get it when they reconnect: c1, d1"
        ),
        "{out}"
    );
    let (out, _) = apply(&c, dirs.path(), "ops.toml", &ops, true);
    assert!(out.contains("no online node had to change\n"), "{out}");
    for n in nodes {
        n.shutdown().await;
    }
}
