//! Fuzzes the policy parser: any text is parsed, checked, rendered and, when valid, tested,
//! explained and compiled, without a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use netpolicy::{Inventory, NodeIdentity, Policy, Probe, compile, explain, render_diagnostics};

fn node(name: &str, n: u8, tags: &[&str]) -> NodeIdentity {
    NodeIdentity {
        name: name.to_string(),
        namespace: "production".to_string(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        spiffe_id: format!("spiffe://corp.example/ns/production/node/{name}"),
        addresses: vec![
            format!("10.90.0.{n}/32").parse().expect("a valid address"),
            format!("fd00:90::{n}/128")
                .parse()
                .expect("a valid address"),
        ],
        routes: vec!["10.95.0.0/24".parse().expect("a valid prefix")],
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    match Policy::parse(source) {
        Err(err) => {
            assert!(!err.diagnostics.is_empty());
            let _ = render_diagnostics(source, "fuzz.toml", &err.diagnostics);
        }
        Ok(checked) => {
            let _ = render_diagnostics(source, "fuzz.toml", &checked.warnings);
            let _ = checked.policy.run_tests();
            let nodes = vec![
                node("web1", 1, &["web"]),
                node("db1", 2, &["db"]),
                node("ops1", 3, &[]),
            ];
            let _ = explain(
                &checked.policy,
                &nodes[0],
                &nodes[1],
                None,
                Probe::Tcp(5432),
            );
            let _ = compile(&checked.policy, &Inventory { nodes });
        }
    }
});
