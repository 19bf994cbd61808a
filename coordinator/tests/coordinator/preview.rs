//! The policy preview behind `ztnet policy diff`: it asks only the sessions that announced the
//! flow query (a node built before it never sees the message), judges the flows the nodes
//! report as their filters will, names the nodes that do not answer, and changes nothing.

use std::net::IpAddr;

use netpolicy::{FlowOrigin, FlowState, OpenFlow};
use serde_json::{Value, json};
use ztnet_proto::control::{FEATURE_FLOWS, Hello, NetmapUpdate, NodeMsg, Report, ServerMsg};
use ztnet_proto::frame;

use crate::common::{Coord, Session, TestNode, connect, start};
use crate::netmaps::{Fixture, WEB_DB_OPS};

/// The candidate: ops may still reach everyone, the web -> db grant is gone.
const OPS_ONLY: &str = r#"
[[grant]]
from = ["ns:ops"]
to = ["*"]
ports = ["any"]
"#;

async fn preview(coord: &Coord, source: &str) -> (u16, Value) {
    coord
        .api()
        .call(
            "POST",
            "/v1/networks/prod-vpc/policy/preview",
            Some(json!({ "source": source })),
        )
        .await
}

#[tokio::test]
async fn sessions_without_the_feature_are_not_asked_and_a_preview_changes_nothing() {
    let mut f = Fixture::new().await;
    f.apply_web_db_ops().await;

    let (status, body) = preview(&f.coord, OPS_ONLY).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["policy_version"], 1);
    assert_eq!(body["open_flows"], 0);
    assert_eq!(body["cut"], json!([]));
    let silent = body["not_reported"].as_array().expect("not_reported");
    assert_eq!(silent.len(), 4, "{body}");
    assert!(
        silent.iter().all(|n| n["reason"]
            .as_str()
            .is_some_and(|r| r.contains("does not answer flow queries"))),
        "{body}"
    );

    // A document the apply would refuse is refused alike, and nothing changed.
    let failing = format!(
        "{OPS_ONLY}\n[[test]]\nfrom = {{ name = \"web1\", namespace = \
                           \"production\", tags = [\"web\"] }}\nto = {{ name = \"db1\", \
                           namespace = \"production\", tags = [\"db\"] }}\nport = \
                           \"tcp:5432\"\nexpect = \"allow\"\n"
    );
    let (status, body) = preview(&f.coord, &failing).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("test failed"), "{body}");
    let api = f.coord.api();
    let history = api
        .ok("GET", "/v1/networks/prod-vpc/policy/history", None)
        .await;
    assert_eq!(history.as_array().map(Vec::len), Some(1), "{history}");
    let audit = api.ok("GET", "/v1/networks/prod-vpc/audit", None).await;
    assert!(
        !audit.to_string().contains("policy.refuse"),
        "a preview audits nothing: {audit}"
    );

    // The old-style sessions were sent nothing: web1's next message is the next apply's netmap.
    let narrower = WEB_DB_OPS.replace("to = [\"*\"]", "to = [\"tag:db\"]");
    let (status, _) = api.policy("prod-vpc", &narrower).await;
    assert_eq!(status, 200);
    let web1 = f.index("web1");
    match f.sessions[web1].next().await {
        ServerMsg::Netmap(NetmapUpdate::Delta(_)) | ServerMsg::Netmap(NetmapUpdate::Full(_)) => {}
        other => panic!("web1 was sent {other:?}"),
    }
}

/// Opens a session whose hello announces the flow query.
async fn open_with_flows(coord: &Coord, node: &TestNode) -> Session {
    let (endpoint, conn) = connect(coord, Some(node.identity())).await;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let hello = NodeMsg::Hello(Hello {
        protocol: ztnet_proto::PROTOCOL_VERSION,
        have_version: None,
        report: Report {
            listen_port: node.listen_port,
            endpoints: vec![format!("10.1.2.3:{}", node.listen_port).parse().unwrap()],
            version: "test".into(),
        },
        reauthenticates: false,
        replaces: false,
        features: vec![FEATURE_FLOWS.into()],
    });
    frame::write(&mut send, &hello).await.unwrap();
    Session {
        endpoint,
        conn,
        send,
        recv,
    }
}

/// Reads messages until the flow query and returns its id.
async fn query_id(s: &mut Session) -> u64 {
    loop {
        if let ServerMsg::FlowQuery { id } = s.next().await {
            return id;
        }
    }
}

fn v4(node: &TestNode) -> IpAddr {
    let enrolled = node.enrolled.as_ref().expect("enrolled");
    enrolled
        .addresses
        .iter()
        .map(|a| a.addr())
        .find(IpAddr::is_ipv4)
        .expect("an IPv4 address")
}

fn tcp(peer: &str, opened_by: FlowOrigin, from: (IpAddr, u16), to: (IpAddr, u16)) -> OpenFlow {
    OpenFlow {
        peer: peer.into(),
        opened_by,
        proto: 6,
        echo: false,
        initiator: from.0,
        initiator_port: from.1,
        responder: to.0,
        responder_port: to.1,
        state: FlowState::Established,
        idle_secs: 4,
    }
}

#[tokio::test]
async fn reported_flows_are_judged_as_their_nodes_will_and_silent_nodes_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start(tmp.path());
    let api = coord.api();
    api.network("prod-vpc").await;
    let mut nodes = Vec::new();
    for (i, (name, ns, tags)) in [
        ("web1", "production", vec!["web"]),
        ("db1", "production", vec!["db"]),
        ("ops1", "ops", vec![]),
    ]
    .into_iter()
    .enumerate()
    {
        let (token, _) = api.token("prod-vpc", ns, &tags, 1).await;
        let mut n = TestNode::new(name, 51830 + i as u16);
        n.enroll(&coord, &token).await;
        nodes.push(n);
    }
    let (status, body) = api.policy("prod-vpc", WEB_DB_OPS).await;
    assert_eq!(status, 200, "{body}");
    let mut sessions = Vec::new();
    for n in &nodes {
        let mut s = open_with_flows(&coord, n).await;
        // The full netmap is written after the session is marked as answering queries.
        s.full().await;
        sessions.push(s);
    }
    let (web, db, ops) = (v4(&nodes[0]), v4(&nodes[1]), v4(&nodes[2]));

    let asking = tokio::spawn({
        let api = coord.api();
        async move {
            api.call(
                "POST",
                "/v1/networks/prod-vpc/policy/preview",
                Some(json!({ "source": OPS_ONLY })),
            )
            .await
        }
    });
    // web1 holds its session to db1 and one that ops1 opened; it also names a peer that this
    // network does not have, which is ignored. db1 holds the same session from its side. ops1
    // never answers.
    let to_db = tcp("db1", FlowOrigin::Local, (web, 40000), (db, 5432));
    let from_ops_at_web = tcp("ops1", FlowOrigin::Peer, (ops, 41000), (web, 22));
    let ghost = tcp("ghost", FlowOrigin::Local, (web, 1), (db, 2));
    let id = query_id(&mut sessions[0]).await;
    let answer = NodeMsg::Flows {
        id,
        flows: vec![to_db.clone(), from_ops_at_web, ghost],
        truncated: false,
    };
    sessions[0].send(&answer).await;
    let id = query_id(&mut sessions[1]).await;
    let mut at_db = tcp("web1", FlowOrigin::Peer, (web, 40000), (db, 5432));
    at_db.idle_secs = 5;
    // An answer under another node's query id is dropped: it cannot speak for web1.
    sessions[2]
        .send(&NodeMsg::Flows {
            id,
            flows: vec![],
            truncated: true,
        })
        .await;
    sessions[1]
        .send(&NodeMsg::Flows {
            id,
            flows: vec![at_db],
            truncated: false,
        })
        .await;
    query_id(&mut sessions[2]).await;

    let (status, body) = asking.await.expect("the preview request");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["open_flows"], 2, "the db session counts once: {body}");
    let cut = body["cut"].as_array().expect("cut");
    assert_eq!(cut.len(), 1, "{body}");
    assert_eq!(cut[0]["from"], "web1");
    assert_eq!(cut[0]["to"], "db1");
    assert_eq!(cut[0]["port"], "tcp:5432");
    assert_eq!(cut[0]["from_port"], 40000);
    assert_eq!(cut[0]["reported_by"], json!(["db1", "web1"]));
    assert_eq!(
        body["not_reported"],
        json!([{"node": "ops1", "reason": "no answer within 2 s"}]),
        "{body}"
    );
    assert!(body.get("truncated").is_none(), "{body}");
    assert_eq!(body["posture"], json!([]));
}
