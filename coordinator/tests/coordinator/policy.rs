//! Policies: refused applies keep the one in force (FC-12 a, b); a stored policy that no
//! longer validates never stops a start (FC-12 c).

use std::path::Path;

use ztnet_proto::control::{NetmapUpdate, ServerMsg};

use crate::common::{TestNode, peer_names, start};
use crate::netmaps::{Fixture, WEB_DB_OPS};

const UNDEFINED_GROUP: &str = r#"
[groups]
db-hosts = ["tag:db"]

[[grant]]
from = ["tag:web"]
to = ["group:old-db"]
ports = ["tcp:5432"]
"#;

const BROKEN_SYNTAX: &str = "[[grant]\nfrom = [\"*\"]\n";

const FAILING_TEST: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432"]

[[test]]
from = { name = "db1", namespace = "production", tags = ["db"] }
to = { name = "web1", namespace = "production", tags = ["web"] }
port = "tcp:22"
expect = "allow"
"#;

#[tokio::test]
async fn refused_policies_leave_the_current_one_in_force() {
    let mut f = Fixture::new().await;
    let api = f.coord.api();
    f.apply_web_db_ops().await;

    for (source, needle) in [
        (UNDEFINED_GROUP, "old-db"),
        (BROKEN_SYNTAX, ""),
        (FAILING_TEST, "test failed"),
    ] {
        let (status, body) = api.policy("prod-vpc", source).await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["status"], 422);
        let diags = body["diagnostics"].as_array().expect("diagnostics");
        assert!(!diags.is_empty(), "{body}");
        assert!(diags.iter().all(|d| d["line"].as_u64().unwrap() >= 1));
        assert!(body.to_string().contains(needle), "{needle} not in {body}");
    }

    let current = api.ok("GET", "/v1/networks/prod-vpc/policy", None).await;
    assert_eq!(current["version"], 1);
    assert_eq!(current["active"], true);
    assert_eq!(current["source"], WEB_DB_OPS);
    let history = api
        .ok("GET", "/v1/networks/prod-vpc/policy/history", None)
        .await;
    assert_eq!(history.as_array().unwrap().len(), 1);
    let net = api.ok("GET", "/v1/networks/prod-vpc", None).await;
    assert_eq!(net["policy_version"], 1);
    let audit = api.ok("GET", "/v1/networks/prod-vpc/audit", None).await;
    let refusals = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "policy.refuse")
        .count();
    assert_eq!(refusals, 3);

    // No node was sent anything by the refused applies: web1's next message is the delta of
    // the next accepted apply.
    let narrower = WEB_DB_OPS.replace("to = [\"*\"]", "to = [\"tag:db\"]");
    let (status, applied) = api.policy("prod-vpc", &narrower).await;
    assert_eq!(status, 200, "{applied}");
    assert_eq!(applied["version"], 2);
    let pending: Vec<_> = applied["pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap().to_string())
        .collect();
    assert!(pending.contains(&"stray1".to_string()), "{applied}");
    let stray = f.index("stray1");
    match f.sessions[stray].next().await {
        ServerMsg::Netmap(NetmapUpdate::Delta(d)) => {
            assert_eq!(d.from.0, 2);
            assert_eq!(d.remove_peers, vec!["ops1"]);
        }
        other => panic!("expected a delta, got {other:?}"),
    }
}

async fn write_policy_row(dir: &Path, version: i64, source: &str) {
    use sqlx::sqlite::SqliteConnectOptions;
    let opts = SqliteConnectOptions::new().filename(dir.join("coordinator.db"));
    let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
    sqlx::query(
        "INSERT INTO policies (network_id, version, source, applied_at, applied_by)
         VALUES ((SELECT id FROM networks WHERE name = 'prod-vpc'), ?, ?, 0, 'old-build')",
    )
    .bind(version)
    .bind(source)
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
}

#[tokio::test]
async fn a_broken_stored_policy_keeps_the_last_good_one_and_degrades_health() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start(tmp.path());
    let api = coord.api();
    api.network("prod-vpc").await;
    let mut web1 = TestNode::new("web1", 51820);
    let mut db1 = TestNode::new("db1", 51821);
    let (t, _) = api.token("prod-vpc", "production", &["web"], 1).await;
    web1.enroll(&coord, &t).await;
    let (t, _) = api.token("prod-vpc", "production", &["db"], 1).await;
    db1.enroll(&coord, &t).await;
    let (status, _) = api.policy("prod-vpc", WEB_DB_OPS).await;
    assert_eq!(status, 200);
    coord.stop();

    write_policy_row(tmp.path(), 2, UNDEFINED_GROUP).await;
    let coord = start(tmp.path());
    let api = coord.api();
    let (_, health) = api.with_key(None).get("/v1/health").await;
    assert_eq!(health["status"], "degraded");
    let problem = health["problems"][0].as_str().unwrap();
    assert!(
        problem.contains("prod-vpc") && problem.contains("version 2"),
        "{problem}"
    );
    assert!(problem.contains("version 1 is in force"), "{problem}");
    assert!(
        coord.log().contains("ERROR"),
        "not logged loudly:\n{}",
        coord.log()
    );

    let current = api.ok("GET", "/v1/networks/prod-vpc/policy", None).await;
    assert_eq!(current["version"], 1);
    assert_eq!(current["active"], true);
    let mut s = web1.connect(&coord).await;
    assert_eq!(
        peer_names(&s.full().await),
        vec!["db1"],
        "last good policy not served"
    );

    // The operator fixes it through the API.
    let (status, applied) = api.policy("prod-vpc", WEB_DB_OPS).await;
    assert_eq!(status, 200);
    assert_eq!(applied["version"], 3);
    let (_, health) = api.with_key(None).get("/v1/health").await;
    assert_eq!(health["status"], "ok");
}

#[tokio::test]
async fn a_broken_only_policy_means_deny_all() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start(tmp.path());
    let api = coord.api();
    api.network("prod-vpc").await;
    let mut web1 = TestNode::new("web1", 51820);
    let mut db1 = TestNode::new("db1", 51821);
    let (t, _) = api.token("prod-vpc", "production", &["web"], 1).await;
    web1.enroll(&coord, &t).await;
    let (t, _) = api.token("prod-vpc", "production", &["db"], 1).await;
    db1.enroll(&coord, &t).await;
    coord.stop();

    let allow_all_but_broken = "[[grant]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"any\"]\n\
                                [[grant]]\nfrom = [\"group:gone\"]\nto = [\"*\"]\nports = [\"any\"]\n";
    write_policy_row(tmp.path(), 1, allow_all_but_broken).await;
    let coord = start(tmp.path());
    let api = coord.api();
    let (_, health) = api.with_key(None).get("/v1/health").await;
    assert_eq!(health["status"], "degraded");
    assert!(
        health["problems"][0]
            .as_str()
            .unwrap()
            .contains("denying all")
    );
    let net = api.ok("GET", "/v1/networks/prod-vpc", None).await;
    assert_eq!(net["policy_version"], 0);
    let shown = api.ok("GET", "/v1/networks/prod-vpc/policy", None).await;
    assert_eq!(shown["active"], false);
    let mut s = web1.connect(&coord).await;
    let full = s.full().await;
    assert!(
        full.peers.is_empty() && full.filter.peers.is_empty(),
        "never allow-all"
    );
}
