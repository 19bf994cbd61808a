//! The time to enforcement tells the truth about offline peers (issue 6): a peer whose netmap
//! a revoke or a policy apply alters while it is cut off from the coordinator keeps its last
//! netmap, so it is named as not yet enforcing, never counted as enforced; once it reconnects
//! and acknowledges, the same audit entry is completed, also across a coordinator restart. A
//! revoked node's workload registrations stay listed as revoked, each with an audit entry.

use serde_json::{Value, json};
use ztnet_proto::control::{NetmapUpdate, ServerMsg};

use crate::common::{Api, eventually};
use crate::netmaps::Fixture;

/// Reads updates until a delta, and answers its version.
async fn delta_version(s: &mut crate::common::Session) -> u64 {
    loop {
        if let ServerMsg::Netmap(NetmapUpdate::Delta(d)) = s.next().await {
            return d.version.0;
        }
    }
}

/// Waits until the coordinator lists `node` offline.
async fn until_offline(api: &Api, node: &str) {
    eventually(&format!("{node} listed offline"), || async {
        let n = api
            .ok("GET", &format!("/v1/networks/prod-vpc/nodes/{node}"), None)
            .await;
        (n["online"] == false).then_some(())
    })
    .await;
}

/// The enforcement of the newest audit entry `action` on `target`, once `done` holds for it.
async fn enforcement(api: &Api, action: &str, target: &str, done: fn(&Value) -> bool) -> Value {
    eventually(&format!("{action} {target} enforcement"), || async {
        let audit = api.ok("GET", "/v1/networks/prod-vpc/audit", None).await;
        audit
            .as_array()?
            .iter()
            .rev()
            .find(|e| e["action"] == action && e["target"] == target)
            .map(|e| e["enforcement"].clone())
            .filter(done)
    })
    .await
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|p| p["node"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn an_offline_peer_is_named_pending_and_completed_when_it_acknowledges() {
    let mut f = Fixture::new().await;
    let api = f.coord.api();
    f.apply_web_db_ops().await;
    let (web1, ops1) = (f.index("web1"), f.index("ops1"));
    let wl = api
        .ok(
            "POST",
            "/v1/networks/prod-vpc/workloads",
            Some(
                json!({"spiffe_id": "spiffe://corp.example/ns/production/sa/pg",
                        "node": "db1", "selectors": ["unix:uid:70"], "ttl_secs": 600}),
            ),
        )
        .await;
    let wl_id = wl["id"].as_u64().expect("workload id");

    // ops1 is cut off from the coordinator (fail-static: it keeps its netmap, db1 in it).
    f.sessions[ops1].conn.close(0u32.into(), b"partitioned");
    until_offline(&api, "ops1").await;

    let gone = api
        .ok(
            "POST",
            "/v1/networks/prod-vpc/nodes/db1/revoke",
            Some(json!({"reason": "stolen"})),
        )
        .await;
    // The answer says where the change went: web1 got it, ops1 did not.
    assert_eq!(gone["reach"]["connected"], json!(["web1"]), "{gone}");
    assert_eq!(names(&gone["reach"]["offline"]), ["ops1"], "{gone}");
    assert!(gone["reach"]["audit_id"].as_u64().is_some(), "{gone}");

    // Before web1 acknowledges, the record already names ops1 as pending.
    let waiting = enforcement(&api, "node.revoke", "db1", |e| !e.is_null()).await;
    assert_eq!(names(&waiting["pending_offline"]), ["ops1"], "{waiting}");

    let v = delta_version(&mut f.sessions[web1]).await;
    f.sessions[web1].ack(v).await;
    let e = enforcement(&api, "node.revoke", "db1", |e| e["ms"].is_u64()).await;
    let summary = e["summary"].as_str().unwrap();
    assert_eq!(e["peers"], 1, "{e}");
    assert_eq!(e["acknowledged"], 1, "{e}");
    assert_eq!(names(&e["pending_offline"]), ["ops1"], "{e}");
    assert!(!summary.contains("enforced at once"), "{summary}");
    assert!(
        summary.contains("on 1 connected peers; not yet on ops1 (offline since")
            && summary.contains("it still accepts db1 until it reconnects"),
        "{summary}"
    );

    // The revoked node's registration stays listed, as revoked, with the node's reason.
    let list = api.ok("GET", "/v1/networks/prod-vpc/workloads", None).await;
    let shown = list
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == wl_id)
        .unwrap_or_else(|| panic!("the revoked node's workload vanished: {list}"))
        .clone();
    assert_eq!(shown["state"], "revoked", "{shown}");
    assert_eq!(shown["revoked_reason"], "node db1 was revoked: stolen");
    let path = format!("/v1/networks/prod-vpc/workloads/{wl_id}");
    let one = api.ok("GET", &path, None).await;
    assert_eq!(one["state"], "revoked", "{one}");
    let (status, body) = api.call("DELETE", &path, None).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.to_string().contains("revoked with its node"), "{body}");
    let audit = api.ok("GET", "/v1/networks/prod-vpc/audit", None).await;
    let wrevoke = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "workload.revoke")
        .unwrap_or_else(|| panic!("no workload.revoke entry: {audit}"))
        .clone();
    assert_eq!(
        wrevoke["target"],
        "spiffe://corp.example/ns/production/sa/pg"
    );
    assert_eq!(wrevoke["actor"], "admin", "{wrevoke}");
    let detail = wrevoke["detail"].as_str().unwrap();
    assert!(
        detail.contains("stolen") && detail.contains("stay valid until they expire"),
        "{detail}"
    );

    // A policy apply while ops1 is still offline names it too, in the answer.
    let less = crate::netmaps::WEB_DB_OPS.replace("from = [\"ns:ops\"]", "from = [\"ns:none\"]");
    let (status, applied) = api.policy("prod-vpc", &less).await;
    assert_eq!(status, 200, "{applied}");
    assert!(
        names(&applied["reach"]["offline"]).contains(&"ops1".to_owned()),
        "{applied}"
    );
    let p = enforcement(&api, "policy.apply", "prod-vpc", |e| {
        !e["pending_offline"].is_null()
    })
    .await;
    assert!(
        p["summary"]
            .as_str()
            .unwrap()
            .contains("keeps the previous policy until it reconnects"),
        "{p}"
    );

    // ops1 reconnects and acknowledges its full netmap: both records are completed.
    let mut back = f.nodes[ops1].connect(&f.coord).await;
    let full = back.full().await;
    assert!(
        !full.peers.iter().any(|p| p.name == "db1"),
        "db1 still in ops1's netmap"
    );
    back.ack(full.version.0).await;
    let done = enforcement(&api, "node.revoke", "db1", |e| !e["late"].is_null()).await;
    assert!(done["pending_offline"].is_null(), "{done}");
    assert!(
        done["offline_keeps"].is_null(),
        "a stale warning stayed: {done}"
    );
    assert_eq!(names(&done["late"]), ["ops1"], "{done}");
    assert!(done["late"][0]["after_ms"].is_u64(), "{done}");
    assert_eq!(done["ms"], e["ms"], "the connected figure changed: {done}");
    let summary = done["summary"].as_str().unwrap();
    assert!(
        summary.contains("; on ops1 at ") && !summary.contains("not yet on"),
        "{summary}"
    );
    let p = enforcement(&api, "policy.apply", "prod-vpc", |e| !e["late"].is_null()).await;
    assert_eq!(names(&p["late"]), ["ops1"], "{p}");
}

#[tokio::test]
async fn a_pending_offline_peer_is_completed_after_a_coordinator_restart() {
    let mut f = Fixture::new().await;
    let api = f.coord.api();
    f.apply_web_db_ops().await;
    let (web1, ops1) = (f.index("web1"), f.index("ops1"));
    f.sessions[ops1].conn.close(0u32.into(), b"partitioned");
    until_offline(&api, "ops1").await;
    api.ok(
        "POST",
        "/v1/networks/prod-vpc/nodes/db1/revoke",
        Some(json!({"reason": "stolen"})),
    )
    .await;
    let v = delta_version(&mut f.sessions[web1]).await;
    f.sessions[web1].ack(v).await;
    enforcement(&api, "node.revoke", "db1", |e| e["ms"].is_u64()).await;

    let dir = f._tmp.path().to_owned();
    f.sessions.clear();
    f.coord.stop();
    let coord = crate::common::start(&dir);
    let api = coord.api();
    let kept = enforcement(&api, "node.revoke", "db1", |e| !e.is_null()).await;
    assert_eq!(names(&kept["pending_offline"]), ["ops1"], "{kept}");

    let mut back = f.nodes[ops1].connect(&coord).await;
    let full = back.full().await;
    back.ack(full.version.0).await;
    let done = enforcement(&api, "node.revoke", "db1", |e| !e["late"].is_null()).await;
    assert_eq!(names(&done["late"]), ["ops1"], "{done}");
    assert!(done["pending_offline"].is_null(), "{done}");
}

#[tokio::test]
async fn a_rotation_request_is_audited_with_the_order_as_the_cli_spells_it() {
    let f = Fixture::new().await;
    let api = f.coord.api();
    let path = "/v1/networks/prod-vpc/nodes/web1/rotate-key";
    api.ok("POST", path, Some(json!({}))).await;
    api.ok(
        "POST",
        path,
        Some(json!({"order": "node-first", "gap_secs": 2})),
    )
    .await;
    let audit = api.ok("GET", "/v1/networks/prod-vpc/audit", None).await;
    let details: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "node.key-rotate-request")
        .filter_map(|e| e["detail"].as_str())
        .collect();
    assert_eq!(details, ["peers-first, gap 0 s", "node-first, gap 2 s"]);
}
