//! Node revocation: the node leaves its peers' netmaps at once, its session is closed with
//! `revoked` and the reason, its certificate and WireGuard key stay refused, and it stays
//! listed as revoked.

use serde_json::json;
use ztnet_proto::control::{NetmapUpdate, NodeMsg, ServerMsg};

use crate::common::{TestNode, send_first};
use crate::netmaps::Fixture;

fn refusal(msg: &ServerMsg) -> (String, String) {
    match msg {
        ServerMsg::Error(e) => (e.code.clone(), e.message.clone()),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_revoked_node_leaves_every_netmap_and_its_key_stays_refused() {
    let mut f = Fixture::new().await;
    let api = f.coord.api();
    f.apply_web_db_ops().await;
    let (web1, db1) = (f.index("web1"), f.index("db1"));

    // A control character in the reason is refused, and nothing changes.
    let (status, body) = api
        .call(
            "POST",
            "/v1/networks/prod-vpc/nodes/db1/revoke",
            Some(json!({"reason": "a\nb"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = api
        .call(
            "POST",
            "/v1/networks/prod-vpc/nodes/db1/revoke",
            Some(json!({"reason": "x", "force": true})),
        )
        .await;
    assert_eq!(status, 400, "an unknown field was accepted: {body}");
    let shown = api.ok("GET", "/v1/networks/prod-vpc/nodes/db1", None).await;
    assert_eq!(shown["state"], "active");

    let gone = api
        .ok(
            "POST",
            "/v1/networks/prod-vpc/nodes/db1/revoke",
            Some(json!({"reason": "disk stolen"})),
        )
        .await;
    assert_eq!(gone["state"], "revoked");
    assert_eq!(gone["revoke_reason"], "disk stolen");
    assert!(gone["revoked_at"].as_u64().is_some(), "{gone}");

    let (code, message) = refusal(&f.sessions[db1].next().await);
    assert_eq!(code, "revoked");
    assert!(message.contains("disk stolen"), "{message}");
    let update = f.sessions[web1].next().await;
    let ServerMsg::Netmap(NetmapUpdate::Delta(d)) = update else {
        panic!("expected a delta, got {update:?}");
    };
    assert_eq!(d.remove_peers, vec!["db1"]);
    let filter = d.filter.expect("web1's filter kept db1");
    assert!(!filter.peers.contains_key("db1"));

    // Its certificate is refused, with the reason.
    let mut again = f.nodes[db1].connect(&f.coord).await;
    let (code, message) = refusal(&again.next().await);
    assert_eq!(code, "revoked");
    assert!(message.contains("revoked: disk stolen"), "{message}");

    // It stays listed, with its state and reason.
    let list = api.ok("GET", "/v1/networks/prod-vpc/nodes", None).await;
    let listed: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_owned(),
                n["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(listed.contains(&("db1".into(), "revoked".into())), "{list}");
    assert!(listed.contains(&("web1".into(), "active".into())), "{list}");
    // Show, a second revoke and a key rotation say that it was revoked, not that it is unknown.
    for (method, path) in [
        ("GET", "/v1/networks/prod-vpc/nodes/db1"),
        ("POST", "/v1/networks/prod-vpc/nodes/db1/revoke"),
        ("POST", "/v1/networks/prod-vpc/nodes/DB1/rotate-key"),
    ] {
        let body = (method == "POST").then(|| json!({}));
        let (status, answer) = api.call(method, path, body).await;
        assert_eq!(status, 409, "{method} {path}: {answer}");
        let text = answer.to_string();
        assert!(
            text.contains("db1 of network prod-vpc was revoked at") && text.contains("disk stolen"),
            "{method} {path}: {answer}"
        );
    }
    let (status, _) = api.get("/v1/networks/prod-vpc/nodes/nosuch").await;
    assert_eq!(status, 404);

    // A new token with the revoked WireGuard key is refused and uses nothing.
    let (token, _) = api.token("prod-vpc", "production", &["db"], 1).await;
    let mut same_key = TestNode::new("db9", 51830);
    same_key.wg = f.nodes[db1].wg.clone();
    let req = serde_json::to_value(NodeMsg::Enroll(same_key.enroll_request(&token))).unwrap();
    let (code, message) = refusal(&send_first(&f.coord, None, &req).await);
    assert_eq!(code, "revoked");
    assert!(message.contains("db1"), "{message}");

    // The same token with a new key enrolls a new node, which may take the name again.
    let mut fresh = TestNode::new("db1", 51831);
    let r = fresh.enroll(&f.coord, &token).await;
    assert_ne!(
        r.addresses[0].to_string(),
        "100.64.0.2/16",
        "an address came back"
    );
    let mut s = fresh.connect(&f.coord).await;
    assert_eq!(s.full().await.node.name, "db1");

    let audit = api.ok("GET", "/v1/networks/prod-vpc/audit", None).await;
    let revoke = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "node.revoke")
        .expect("no node.revoke audit event");
    assert_eq!(revoke["target"], "db1");
    assert!(
        revoke["detail"].as_str().unwrap().contains("disk stolen"),
        "{revoke}"
    );
}

#[tokio::test]
async fn revocation_survives_a_restart() {
    let mut f = Fixture::new().await;
    let api = f.coord.api();
    let stray1 = f.index("stray1");
    api.ok(
        "POST",
        "/v1/networks/prod-vpc/nodes/stray1/revoke",
        Some(json!({"reason": "left the company"})),
    )
    .await;
    let (code, _) = refusal(&f.sessions[stray1].next().await);
    assert_eq!(code, "revoked");
    let dir = f._tmp.path().to_owned();
    f.sessions.clear();
    f.coord.stop();
    let coord = crate::common::start(&dir);
    let mut again = f.nodes[stray1].connect(&coord).await;
    let (code, message) = refusal(&again.next().await);
    assert_eq!(code, "revoked");
    assert!(message.contains("left the company"), "{message}");
    let list = coord
        .api()
        .ok("GET", "/v1/networks/prod-vpc/nodes", None)
        .await;
    let stray = list
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "stray1")
        .expect("the revoked node is not listed after a restart");
    assert_eq!(stray["revoke_reason"], "left the company");
}
