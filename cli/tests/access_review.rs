//! Issue 6's access review against the real `ztnet` and `ztnet-coordinator` binaries: the audit
//! entries of no network, and (with in-process nodes enrolled over the real control channel)
//! who-can-reach and diff leaving quarantined nodes out and listing workloads.

mod common;

use common::{Coordinator, expect_failure};

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
