//! Fuzzes the packet classifier and the filter: any bytes, in either direction, from a known
//! or unknown peer, never panic; an allowed packet opens state that a second look agrees with.

#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use netpolicy::{ConntrackConfig, Filter, FilterSpec, Inventory, NodeIdentity, Policy, compile};

const POLICY: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432", "udp:53", "icmp"]

[[grant]]
from = ["tag:ops"]
to = ["*", "cidr:10.95.0.0/24"]
ports = ["any"]

[[deny]]
from = ["*"]
to = ["*"]
ports = ["tcp:23"]
"#;

fn node(name: &str, n: u8, tags: &[&str]) -> NodeIdentity {
    NodeIdentity {
        name: name.to_string(),
        namespace: "p".to_string(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        spiffe_id: String::new(),
        addresses: vec![
            format!("10.90.0.{n}/32").parse().expect("a valid address"),
            format!("fd00:90::{n}/128")
                .parse()
                .expect("a valid address"),
        ],
        routes: if n == 2 {
            vec!["10.95.0.0/24".parse().expect("a valid prefix")]
        } else {
            vec![]
        },
    }
}

fn spec() -> &'static FilterSpec {
    static SPEC: OnceLock<FilterSpec> = OnceLock::new();
    SPEC.get_or_init(|| {
        let policy = Policy::parse(POLICY)
            .expect("the fuzz policy is valid")
            .policy;
        let nodes = vec![
            node("web1", 1, &["web"]),
            node("db1", 2, &["db"]),
            node("ops1", 3, &["ops"]),
        ];
        compile(&policy, &Inventory { nodes }).filters["db1"].clone()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, packet)) = data.split_first() else {
        return;
    };
    let mut filter = Filter::new(spec().clone(), ConntrackConfig { max_flows: 4 });
    let now = Instant::now();
    let peer = ["web1", "ops1", "stranger"][usize::from(selector % 3)];
    let first = if selector & 0x80 == 0 {
        filter.inbound(peer, packet, now)
    } else {
        filter.outbound(peer, packet, now)
    };
    // The same packet again, a little later, is never denied where it first passed.
    let later = now + Duration::from_millis(1);
    let again = if selector & 0x80 == 0 {
        filter.inbound(peer, packet, later)
    } else {
        filter.outbound(peer, packet, later)
    };
    if matches!(first, netpolicy::Verdict::Allow(_)) {
        assert!(
            matches!(again, netpolicy::Verdict::Allow(_)),
            "{first:?} then {again:?}"
        );
    }
    // A filter used through a peer handle decides both packets as the name does.
    let mut by_ref = Filter::new(spec().clone(), ConntrackConfig { max_flows: 4 });
    let verdicts: Vec<_> = [now, later]
        .into_iter()
        .map(|t| match by_ref.peer(peer) {
            Some(h) if selector & 0x80 == 0 => by_ref.inbound_ref(h, packet, t),
            Some(h) => by_ref.outbound_ref(h, packet, t),
            None if selector & 0x80 == 0 => by_ref.inbound(peer, packet, t),
            None => by_ref.outbound(peer, packet, t),
        })
        .collect();
    assert_eq!(verdicts, [first, again]);
    filter.install(FilterSpec::default(), later);
    assert!(matches!(
        filter.inbound(peer, packet, later),
        netpolicy::Verdict::Deny(_)
    ));
});
