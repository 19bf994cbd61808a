//! Netmaps: least privilege of knowledge, their contents, and deltas after changes.

use ztnet_proto::control::{NetmapUpdate, NodeMsg, Report, ServerMsg};

use crate::common::{Coord, Session, TestNode, eventually, peer_names, start};

pub const WEB_DB_OPS: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432"]

[[grant]]
from = ["ns:ops"]
to = ["*"]
ports = ["any"]

[[test]]
from = { name = "web1", namespace = "production", tags = ["web"] }
to = { name = "db1", namespace = "production", tags = ["db"] }
port = "tcp:5432"
expect = "allow"

[[test]]
from = { name = "db1", namespace = "production", tags = ["db"] }
to = { name = "web1", namespace = "production", tags = ["web"] }
port = "tcp:80"
expect = "deny"
"#;

/// A network with web1, db1, ops1 and stray1 (no tags), each with a live session that has
/// read its first full netmap.
pub struct Fixture {
    pub coord: Coord,
    pub nodes: Vec<TestNode>,
    pub sessions: Vec<Session>,
    pub _tmp: tempfile::TempDir,
}

impl Fixture {
    pub async fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let coord = start(tmp.path());
        let api = coord.api();
        api.network("prod-vpc").await;
        let mut nodes = Vec::new();
        for (i, (name, ns, tags)) in [
            ("web1", "production", vec!["web"]),
            ("db1", "production", vec!["db"]),
            ("ops1", "ops", vec![]),
            ("stray1", "production", vec![]),
        ]
        .into_iter()
        .enumerate()
        {
            let (token, _) = api.token("prod-vpc", ns, &tags, 1).await;
            let mut n = TestNode::new(name, 51820 + i as u16);
            n.enroll(&coord, &token).await;
            nodes.push(n);
        }
        let mut sessions = Vec::new();
        for n in &nodes {
            let mut s = n.connect(&coord).await;
            let full = s.full().await;
            assert!(
                full.peers.is_empty(),
                "{} learned peers without a policy",
                n.name
            );
            assert!(full.filter.peers.is_empty());
            sessions.push(s);
        }
        Fixture {
            coord,
            nodes,
            sessions,
            _tmp: tmp,
        }
    }

    /// Applies `WEB_DB_OPS` and reads the netmap update it pushes to every session.
    pub async fn apply_web_db_ops(&mut self) {
        let (status, body) = self.coord.api().policy("prod-vpc", WEB_DB_OPS).await;
        assert_eq!(status, 200, "{body}");
        for s in self.sessions.iter_mut() {
            s.next().await;
        }
    }

    pub fn index(&self, name: &str) -> usize {
        self.nodes.iter().position(|n| n.name == name).unwrap()
    }
}

#[tokio::test]
async fn netmaps_give_each_node_only_the_peers_policy_lets_it_talk_to() {
    let mut f = Fixture::new().await;
    let api = f.coord.api();
    let (status, applied) = api.policy("prod-vpc", WEB_DB_OPS).await;
    assert_eq!(status, 200, "{applied}");
    assert_eq!(applied["version"], 1);
    assert_eq!(applied["tests_passed"], 2);

    let mut maps = std::collections::BTreeMap::new();
    for (n, s) in f.nodes.iter().zip(f.sessions.iter_mut()) {
        let update = s.next().await;
        let ServerMsg::Netmap(NetmapUpdate::Delta(d)) = update else {
            panic!("{}: expected a delta, got {update:?}", n.name);
        };
        assert_eq!(d.from.0, 1);
        assert_eq!(d.version.0, 2);
        maps.insert(n.name.clone(), d);
    }
    let names = |n: &str| {
        let mut v: Vec<String> = maps[n]
            .upsert_peers
            .iter()
            .map(|p| p.name.clone())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names("web1"), vec!["db1", "ops1"]);
    assert_eq!(names("db1"), vec!["ops1", "web1"]);
    assert_eq!(names("ops1"), vec!["db1", "stray1", "web1"]);
    // FC-05: stray1 is in no grant's source; only ops1, which may reach everything, is its peer.
    assert_eq!(names("stray1"), vec!["ops1"]);
    for (name, d) in &maps {
        let filter = d.filter.as_ref().expect("the filter changed");
        let keys: Vec<&String> = filter.peers.keys().collect();
        let mut peers: Vec<&String> = d.upsert_peers.iter().map(|p| &p.name).collect();
        peers.sort();
        assert_eq!(
            keys, peers,
            "{name}: peers must be exactly the filter's keys"
        );
    }

    let db1 = &f.nodes[f.index("db1")];
    let peer = maps["web1"]
        .upsert_peers
        .iter()
        .find(|p| p.name == "db1")
        .unwrap();
    assert_eq!(peer.public_key, db1.public_key());
    assert_eq!(
        peer.identity.spiffe_id,
        "spiffe://corp.example/ns/production/node/db1"
    );
    assert_eq!(peer.identity.tags, vec!["db"]);
    assert_eq!(peer.endpoints[0].to_string(), "127.0.0.1:51821");
    assert_eq!(peer.endpoints[1].to_string(), "10.1.2.3:51821");
    let allowed: Vec<String> = peer.allowed_ips.iter().map(|p| p.to_string()).collect();
    assert_eq!(allowed[0], "100.64.0.2/32");
    assert!(allowed[1].ends_with("::2/128"), "{allowed:?}");

    // Acknowledgements are recorded per node.
    let web1 = f.index("web1");
    f.sessions[web1].ack(2).await;
    eventually("web1's ack to be recorded", || async {
        let n = api
            .ok("GET", "/v1/networks/prod-vpc/nodes/web1", None)
            .await;
        (n["applied_version"] == 2 && n["applied_at"].is_u64()).then_some(())
    })
    .await;
    let n = api
        .ok("GET", "/v1/networks/prod-vpc/nodes/web1", None)
        .await;
    assert_eq!(n["netmap_version"], 2);
    assert_eq!(n["online"], true);
}

#[tokio::test]
async fn a_reconnecting_node_gets_its_full_netmap_with_self_info() {
    let mut f = Fixture::new().await;
    let api = f.coord.api();
    let (status, _) = api.policy("prod-vpc", WEB_DB_OPS).await;
    assert_eq!(status, 200);
    let web1 = f.index("web1");
    f.sessions[web1].next().await;

    let mut again = f.nodes[web1].connect(&f.coord).await;
    let full = again.full().await;
    assert_eq!(full.version.0, 2);
    assert_eq!(peer_names(&full), vec!["db1", "ops1"]);
    let addrs: Vec<String> = full.node.addresses.iter().map(|a| a.to_string()).collect();
    assert_eq!(addrs[0], "100.64.0.1/16");
    assert!(addrs[1].ends_with("::1/64"));
    let routes: Vec<String> = full.node.routes.iter().map(|a| a.to_string()).collect();
    assert_eq!(routes[0], "100.64.0.0/16");
    assert!(routes[1].ends_with("::/64"));
    let now = ztnet_coordinator::store::unix_now();
    assert!(full.expires_at > now + 23 * 3600 && full.expires_at <= now + 24 * 3600 + 5);
}

#[tokio::test]
async fn endpoint_reports_and_deletions_reach_peers_as_deltas() {
    let mut f = Fixture::new().await;
    let api = f.coord.api();
    f.apply_web_db_ops().await;
    let (web1, db1) = (f.index("web1"), f.index("db1"));

    // db1 roams: web1, which may reach it, hears of its new endpoint.
    let report = Report {
        listen_port: 51821,
        endpoints: vec!["10.9.9.9:51821".parse().unwrap()],
        version: "test".into(),
    };
    f.sessions[db1].send(&NodeMsg::Report(report)).await;
    let update = f.sessions[web1].next().await;
    let ServerMsg::Netmap(NetmapUpdate::Delta(d)) = update else {
        panic!("expected a delta, got {update:?}");
    };
    assert_eq!((d.from.0, d.version.0), (2, 3));
    assert_eq!(d.upsert_peers.len(), 1);
    let eps: Vec<String> = d.upsert_peers[0]
        .endpoints
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(eps, vec!["127.0.0.1:51821", "10.9.9.9:51821"]);
    assert!(d.filter.is_none() && d.remove_peers.is_empty());

    // Deleting db1 closes its session and removes it from web1's netmap at once.
    api.ok("DELETE", "/v1/networks/prod-vpc/nodes/db1", None)
        .await;
    match f.sessions[db1].next().await {
        ServerMsg::Error(e) => assert_eq!(e.code, "revoked"),
        other => panic!("expected revoked, got {other:?}"),
    }
    let update = f.sessions[web1].next().await;
    let ServerMsg::Netmap(NetmapUpdate::Delta(d)) = update else {
        panic!("expected a delta, got {update:?}");
    };
    assert_eq!(d.remove_peers, vec!["db1"]);
    assert_eq!(d.from.0, 3);
    let filter = d.filter.expect("web1's filter lost db1");
    assert!(!filter.peers.contains_key("db1"));
    let audit = api.ok("GET", "/v1/networks/prod-vpc/audit", None).await;
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "node.delete")
    );
}

fn delta(update: ServerMsg) -> ztnet_proto::control::NetmapDelta {
    match update {
        ServerMsg::Netmap(NetmapUpdate::Delta(d)) => d,
        other => panic!("expected a delta, got {other:?}"),
    }
}

#[tokio::test]
async fn a_pinned_endpoint_wins_over_reports_until_cleared() {
    let mut f = Fixture::new().await;
    let api = f.coord.api();
    f.apply_web_db_ops().await;
    let (web1, db1) = (f.index("web1"), f.index("db1"));
    let path = "/v1/networks/prod-vpc/nodes/db1/endpoint";

    let pinned = api
        .ok(
            "PUT",
            path,
            Some(serde_json::json!({"endpoint": "[2001:db8::3]:51820", "expected_revision": 0})),
        )
        .await;
    assert_eq!(pinned["pinned_endpoint"], "[2001:db8::3]:51820");
    assert_eq!(pinned["endpoint_revision"], 1);
    assert_eq!(
        pinned["endpoints"][0], "127.0.0.1:51821",
        "the node's own view is kept"
    );
    let d = delta(f.sessions[web1].next().await);
    assert_eq!(
        d.upsert_peers[0].endpoints[0].to_string(),
        "[2001:db8::3]:51820"
    );

    // The node keeps reporting what it sees: the pin stays first.
    let report = Report {
        listen_port: 51821,
        endpoints: vec!["198.51.100.7:51821".parse().unwrap()],
        version: "test".into(),
    };
    f.sessions[db1].send(&NodeMsg::Report(report)).await;
    let d = delta(f.sessions[web1].next().await);
    let eps: Vec<String> = d.upsert_peers[0]
        .endpoints
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(
        eps,
        vec![
            "[2001:db8::3]:51820",
            "127.0.0.1:51821",
            "198.51.100.7:51821"
        ]
    );

    // Two operators change the pin from the same revision: one wins, the other is told.
    let set = |ep: &'static str| {
        api.call(
            "PUT",
            path,
            Some(serde_json::json!({"endpoint": ep, "expected_revision": 1})),
        )
    };
    let ((a, _), (b, body)) = tokio::join!(set("192.0.2.1:1"), set("192.0.2.2:2"));
    let mut statuses = [a, b];
    statuses.sort();
    assert_eq!(statuses, [200, 409], "{body}");
    let (status, _) = api
        .call(
            "PUT",
            path,
            Some(serde_json::json!({"endpoint": "0.0.0.0:1"})),
        )
        .await;
    assert_eq!(status, 400);
    let _ = f.sessions[web1].next().await;

    let cleared = api
        .ok("PUT", path, Some(serde_json::json!({"endpoint": null})))
        .await;
    assert_eq!(cleared["pinned_endpoint"], serde_json::Value::Null);
    assert_eq!(cleared["endpoint_revision"], 3);
    let d = delta(f.sessions[web1].next().await);
    assert_eq!(
        d.upsert_peers[0].endpoints[0].to_string(),
        "127.0.0.1:51821"
    );
    let audit = api.ok("GET", "/v1/networks/prod-vpc/audit", None).await;
    let pins = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "node.set-endpoint")
        .count();
    assert_eq!(pins, 3);
}
