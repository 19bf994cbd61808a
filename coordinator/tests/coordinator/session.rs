//! `max_session` on the control channel (issue 6): a node whose hello says it re-authenticates
//! is told its session's deadline once its first posture is in, and a replacement session it
//! opens from the same endpoint takes over at once (the old one is told it was replaced), with
//! the node online and never quarantined. A node that does not re-authenticate is never sent a
//! deadline, and at its deadline its session is closed with `reauthenticate` and it is
//! quarantined, as before.

use std::time::{Duration, Instant};

use ztnet_proto::control::{Hello, NodeMsg, Posture, Report, ServerMsg};
use ztnet_proto::frame;

use crate::common::{Coord, Session, TestNode, start};

const POLICY: &str = r#"
[[grant]]
from = ["tag:db"]
to = ["tag:db"]
ports = ["tcp:5432"]

[[posture]]
selector = ["tag:db"]
max_session = "10s"
"#;

/// Opens a session for `node` from `endpoint` (a new one when `None`) with the given hello
/// flags, and sends its first posture.
async fn open(
    coord: &Coord,
    node: &TestNode,
    endpoint: Option<&quinn::Endpoint>,
    reauthenticates: bool,
    replaces: bool,
) -> Session {
    let (endpoint, conn) = match endpoint {
        None => crate::common::connect(coord, Some(node.identity())).await,
        Some(e) => {
            let conn = e
                .connect(coord.addr, ztnet_proto::COORDINATOR_SERVER_NAME)
                .unwrap()
                .await
                .expect("QUIC handshake from the same endpoint");
            (e.clone(), conn)
        }
    };
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let hello = NodeMsg::Hello(Hello {
        protocol: ztnet_proto::PROTOCOL_VERSION,
        have_version: None,
        report: Report {
            listen_port: node.listen_port,
            endpoints: vec![],
            version: "test".into(),
        },
        reauthenticates,
        replaces,
        features: Vec::new(),
    });
    frame::write(&mut send, &hello).await.unwrap();
    let posture = NodeMsg::Posture(Posture {
        version: "0.1.0".into(),
        ..Posture::default()
    });
    frame::write(&mut send, &posture).await.unwrap();
    Session {
        endpoint,
        conn,
        send,
        recv,
    }
}

/// Reads messages until one that `want` picks, or `None` when the stream ends first; panics
/// past `within`.
async fn until<T>(s: &mut Session, within: Duration, want: impl Fn(&ServerMsg) -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, frame::read::<_, ServerMsg>(&mut s.recv))
            .await
            .expect("the awaited message in time")
            .expect("a readable frame")
            .expect("the stream stays open until then");
        if let Some(v) = want(&msg) {
            return v;
        }
    }
}

/// The nodes audited as quarantined for their session's age, in order.
async fn max_session_quarantines(api: &crate::common::Api) -> Vec<String> {
    let audit = api.ok("GET", "/v1/networks/prod-vpc/audit", None).await;
    audit
        .as_array()
        .map(|v| {
            v.iter()
                .filter(|e| e["action"] == "node.quarantine")
                .filter(|e| {
                    e["detail"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("max_session")
                })
                .map(|e| e["target"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn deadline_of(msg: &ServerMsg) -> Option<(u64, u64)> {
    match msg {
        ServerMsg::SessionDeadline {
            max_session_secs,
            remaining_secs,
        } => Some((*max_session_secs, *remaining_secs)),
        _ => None,
    }
}

#[tokio::test]
async fn a_replacement_session_keeps_the_node_online_and_one_that_never_comes_is_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = start(tmp.path());
    let api = coord.api();
    api.network("prod-vpc").await;
    let (token, _) = api.token("prod-vpc", "production", &["db"], 2).await;
    let mut honest = TestNode::new("db1", 51820);
    honest.enroll(&coord, &token).await;
    let mut old = TestNode::new("db2", 51821);
    old.enroll(&coord, &token).await;
    let (status, body) = api.policy("prod-vpc", POLICY).await;
    assert_eq!(status, 200, "{body}");

    let mut a = open(&coord, &honest, None, true, false).await;
    let mut b = open(&coord, &old, None, false, false).await;

    // The honest node learns its deadline: 10 s at most from now.
    let (max, remaining) = until(&mut a, Duration::from_secs(5), deadline_of).await;
    assert_eq!(max, 10);
    assert!(remaining <= 10, "{remaining}");

    // Its replacement from the same endpoint takes over; the old session is told so.
    let mut a2 = open(&coord, &honest, Some(&a.endpoint), true, true).await;
    until(&mut a2, Duration::from_secs(5), |m| {
        matches!(m, ServerMsg::Netmap(_)).then_some(())
    })
    .await;
    let replaced = until(&mut a, Duration::from_secs(5), |m| match m {
        ServerMsg::Error(e) => Some(e.clone()),
        _ => None,
    })
    .await;
    assert!(replaced.message.contains("replaced"), "{replaced:?}");
    a.conn.close(0u32.into(), b"reauthenticated");
    let (_, remaining) = until(&mut a2, Duration::from_secs(5), deadline_of).await;
    assert!(
        remaining >= 8,
        "the new session's own deadline: {remaining}"
    );
    // Replaced, the node stayed online and was never quarantined for its session's age (this
    // test node does not re-authenticate again: its new session is cut at its own deadline).
    let listed = api.ok("GET", "/v1/networks/prod-vpc/nodes", None).await;
    let db1 = listed
        .as_array()
        .and_then(|v| v.iter().find(|n| n["name"] == "db1").cloned())
        .unwrap();
    assert_eq!(db1["online"], true, "{listed}");
    assert!(db1["quarantine"].is_null(), "{listed}");
    assert!(
        max_session_quarantines(&api).await.is_empty(),
        "nobody is quarantined for max_session yet"
    );

    // The node that never re-authenticates: no deadline, then cut at it and quarantined.
    let cut = until(&mut b, Duration::from_secs(20), |m| {
        assert!(deadline_of(m).is_none(), "sent to a node that did not ask");
        match m {
            ServerMsg::Error(e) => Some(e.clone()),
            _ => None,
        }
    })
    .await;
    assert_eq!(cut.code, "reauthenticate", "{cut:?}");
    assert!(cut.message.contains("max_session 10 s"), "{cut:?}");

    // The quarantine is stored by the recompute that follows the close.
    let deadline = Instant::now() + Duration::from_secs(10);
    let listed = loop {
        let listed = api.ok("GET", "/v1/networks/prod-vpc/nodes", None).await;
        let quarantine = |name: &str| {
            listed
                .as_array()
                .and_then(|v| v.iter().find(|n| n["name"] == name))
                .map(|n| n["quarantine"].clone())
        };
        if quarantine("db2").is_some_and(|q| !q.is_null()) || Instant::now() > deadline {
            break listed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let db2 = listed
        .as_array()
        .and_then(|v| v.iter().find(|n| n["name"] == "db2").cloned())
        .unwrap();
    let q = db2["quarantine"].as_str().unwrap_or_default().to_owned();
    assert!(q.contains("max_session"), "{listed}");
    assert!(
        max_session_quarantines(&api)
            .await
            .contains(&"db2".to_owned()),
        "the quarantine is audited"
    );
    let log = coord.log();
    assert!(
        log.lines()
            .any(|l| l.contains("node=db1") && l.contains("re-authenticated")),
        "{log}"
    );
    assert!(
        !log.contains("two machines"),
        "a re-authentication from the same endpoint is not an identity conflict: {log}"
    );
}
