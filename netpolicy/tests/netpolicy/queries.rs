//! Queries and the compiler: explain, who-can-reach, diff, determinism, least knowledge and
//! incremental recompilation.

use netpolicy::{
    AccessChange, Compiler, Family, OpenOn, Probe, compile, diff, explain, who_can_reach,
};

use crate::common::*;

const POLICY: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432"]

[[grant]]
from = ["ns:ops"]
to = ["*"]
ports = ["any"]

[[deny]]
from = ["tag:contractor"]
to = ["tag:db"]
ports = ["any"]
"#;

fn nodes() -> Vec<netpolicy::NodeIdentity> {
    vec![
        node("web1", 1, "production", &["web"]),
        node("web2", 2, "production", &["web", "contractor"]),
        node("db1", 3, "production", &["db"]),
        node("ops1", 4, "ops", &[]),
        node("lonely", 5, "production", &[]),
    ]
}

#[test]
fn explain_names_the_deciding_rule_and_every_match() {
    let p = policy(POLICY);
    let n = nodes();

    let ok = explain(&p, &n[0], &n[2], None, Probe::Tcp(5432));
    let denied = explain(&p, &n[1], &n[2], None, Probe::Tcp(5432));
    let nothing = explain(&p, &n[4], &n[2], None, Probe::Tcp(5432));
    let ops = explain(&p, &n[3], &n[2], None, Probe::Udp(53));

    assert!(ok.allowed);
    assert_eq!(ok.decided_by, "grant[0] (line 2)");
    assert!(!denied.allowed);
    assert_eq!(denied.decided_by, "deny[0] (line 12)");
    assert_eq!(
        denied.matching_rules,
        ["grant[0] (line 2)", "deny[0] (line 12)"]
    );
    assert!(!nothing.allowed);
    assert_eq!(nothing.decided_by, "default deny");
    assert!(nothing.matching_rules.is_empty());
    assert!(ops.allowed);
}

#[test]
fn who_can_reach_lists_nodes_with_their_grant() {
    let p = policy(POLICY);
    let inv = inventory(&nodes());

    let reach = who_can_reach(&p, &inv, "db1", Probe::Tcp(5432)).unwrap();

    let names: Vec<(&str, &str)> = reach
        .iter()
        .map(|r| (r.node.as_str(), r.rule.as_str()))
        .collect();
    assert_eq!(
        names,
        [("ops1", "grant[1] (line 7)"), ("web1", "grant[0] (line 2)")]
    );
    assert!(who_can_reach(&p, &inv, "nope", Probe::Icmp).is_err());
}

#[test]
fn diff_lists_access_added_and_removed() {
    let old = policy(POLICY);
    let new = policy(
        r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432-5433"]

[[deny]]
from = ["tag:contractor"]
to = ["tag:db"]
ports = ["any"]
"#,
    );
    let inv = inventory(&nodes());

    let d = diff(&old, &new, &inv);

    assert_eq!(
        d.added,
        [AccessChange {
            from: "web1".into(),
            to: "db1".into(),
            ports: vec!["tcp:5433".into()],
            open_on: OpenOn {
                families: vec![Family::V4, Family::V6],
                routes: Vec::new(),
            },
        }]
    );
    let removed: Vec<(&str, &str)> = d
        .removed
        .iter()
        .map(|c| (c.from.as_str(), c.to.as_str()))
        .collect();
    assert_eq!(
        removed,
        [
            ("ops1", "db1"),
            ("ops1", "lonely"),
            ("ops1", "web1"),
            ("ops1", "web2")
        ]
    );
    assert_eq!(d.removed[0].ports, ["any"]);
    assert!(diff(&old, &old, &inv).is_empty());
}

#[test]
fn a_node_is_told_only_about_peers_a_grant_connects_it_with() {
    let net = compile(&policy(POLICY), &inventory(&nodes()));

    let peers = |n: &str| -> Vec<String> {
        net.filters
            .get(n)
            .map(|f| f.peers.keys().cloned().collect())
            .unwrap_or_default()
    };

    assert_eq!(peers("web1"), ["db1", "ops1"]);
    assert_eq!(peers("lonely"), ["ops1"]);
    assert_eq!(peers("db1"), ["ops1", "web1", "web2"]);
    assert_eq!(peers("ops1"), ["db1", "lonely", "web1", "web2"]);
}

#[test]
fn a_network_without_grants_compiles_to_no_filters() {
    let net = compile(
        &policy("[[deny]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"any\"]\n"),
        &inventory(&nodes()),
    );
    assert!(net.filters.is_empty());
}

#[test]
fn compiling_is_deterministic_whatever_the_inventory_order() {
    let p = policy(POLICY);
    let mut n = nodes();
    let a = serde_json::to_string(&compile(&p, &inventory(&n))).unwrap();
    n.reverse();
    let b = serde_json::to_string(&compile(&p, &inventory(&n))).unwrap();
    assert_eq!(a, b);
}

#[test]
fn the_spec_survives_json_and_bad_json_is_refused() {
    let net = compile(&policy(POLICY), &inventory(&nodes()));
    let text = serde_json::to_string(&net.filters["db1"]).unwrap();
    let back: netpolicy::FilterSpec = serde_json::from_str(&text).unwrap();
    assert_eq!(back, net.filters["db1"]);
    let broken = text.replace("tcp:5432", "tcp:0");
    assert!(serde_json::from_str::<netpolicy::FilterSpec>(&broken).is_err());
}

#[test]
fn one_node_joining_recompiles_to_the_same_filters_as_a_full_compile() {
    let p = policy(POLICY);
    let mut all = nodes();
    let newcomer = node("web3", 9, "production", &["web"]);
    let mut compiler = Compiler::new(&p, &inventory(&all));

    let affected = compiler.add_node(newcomer.clone());

    all.push(newcomer);
    let full = compile(&p, &inventory(&all));
    assert_eq!(affected, ["db1", "ops1", "web3"]);
    for name in &affected {
        assert_eq!(
            compiler.filter_for(name).unwrap(),
            spec_of(&full, name),
            "{name}"
        );
    }
    assert_eq!(compiler.compile(), full);
    assert!(compiler.filter_for("ghost").is_none());
}

#[test]
fn probes_parse_and_print() {
    for text in ["tcp:5432", "udp:53", "icmp"] {
        assert_eq!(text.parse::<Probe>().unwrap().to_string(), text);
    }
    for bad in ["tcp:0", "tcp:1-2", "any", "tcp", "x"] {
        assert!(bad.parse::<Probe>().is_err(), "{bad}");
    }
}
