//! Issue 6, first slice, end to end: revoking a node in the middle of a busy TCP stream and a
//! UDP stream towards a peer that the policy allows, measured from the moment `ztnet node
//! revoke` returns to the last packet of the revoked node that the peer accepted. Then the
//! revoked node tries to come back: reconnecting, re-enrolling with its used token, and
//! enrolling with a new token but its old WireGuard key. Needs root.
//!
//! The revoked node is kept from hearing of its revocation (its control traffic is dropped in
//! its own namespace while the figure is measured), so it goes on sending like a node that
//! ignores the coordinator: what ends access is the peer, not the revoked node's goodwill.

use std::time::{Duration, Instant};

use ztnet_integration::stream::{Receiver, Sender, socat_host};
use ztnet_integration::topology::{COORDINATOR_PORT, NETWORK, NodeSpec, Topology, story_nodes};
use ztnet_integration::{Netns, require_root, wait_for};

/// web may reach db on PostgreSQL over TCP and on a UDP port.
const POLICY: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432", "udp:5433"]
"#;

/// Access must end this soon after the command returns.
const BOUND: Duration = Duration::from_secs(2);
/// How long the receiver must stay silent before the stream counts as cut.
const QUIET: Duration = Duration::from_millis(1500);
/// Sending period of both streams.
const PERIOD: Duration = Duration::from_millis(5);

fn specs() -> Vec<NodeSpec> {
    story_nodes()
        .into_iter()
        .filter(|s| s.name == "web1" || s.name == "db1")
        .collect()
}

/// Drops (or lets through again) the node's control traffic to the coordinator, in the
/// node's own namespace.
fn block_control(ns: &Netns, block: bool) {
    let script = if block {
        format!(
            "nft add table inet ztrevoke && \
             nft add chain inet ztrevoke out '{{ type filter hook output priority 0 ; }}' && \
             nft add rule inet ztrevoke out udp dport {COORDINATOR_PORT} drop && \
             nft add chain inet ztrevoke in '{{ type filter hook input priority 0 ; }}' && \
             nft add rule inet ztrevoke in udp sport {COORDINATOR_PORT} drop"
        )
    } else {
        "nft delete table inet ztrevoke".to_string()
    };
    ns.sh(&script).expect("nft in the node's namespace");
}

#[test]
fn revoking_a_node_ends_its_live_streams_within_the_bound_and_it_cannot_come_back() {
    require_root();
    let mut topo = Topology::build(&specs()).expect("build the topology");
    topo.start_coordinator().expect("start the coordinator");
    topo.create_network().expect("create the network");
    let web_token = topo.token_for("web1").expect("token");
    let db_token = topo.token_for("db1").expect("token");
    topo.start_node("web1", Some(&web_token))
        .expect("start web1");
    topo.start_node("db1", Some(&db_token)).expect("start db1");
    topo.wait_online(&["web1", "db1"], Duration::from_secs(90))
        .expect("both nodes enroll and connect");
    topo.apply_policy(POLICY, &["web1", "db1"], Duration::from_secs(30))
        .expect("apply the policy");

    let db1 = topo.overlay_v4("db1").expect("db1 address");
    let (db_ns, web_ns) = (&topo.node("db1").ns, &topo.node("web1").ns);
    let tcp_rx = Receiver::start(db_ns, "TCP4-LISTEN:5432,reuseaddr");
    let udp_rx = Receiver::start(db_ns, "UDP4-RECV:5433,reuseaddr");
    // The TCP listener must be up before the sender connects; the first handshake may take a
    // moment, so the senders are retried until both streams flow.
    let mut senders = Vec::new();
    wait_for("both streams to flow", Duration::from_secs(30), || {
        if tcp_rx.last().is_none() || udp_rx.last().is_none() {
            senders.clear();
            senders.push(Sender::start(
                web_ns,
                &format!("TCP4:{}:5432,connect-timeout=2", socat_host(db1)),
                "ztnet-revoke-stream",
                PERIOD,
            ));
            senders.push(Sender::start(
                web_ns,
                &format!("UDP4:{}:5433", socat_host(db1)),
                "ztnet-revoke-stream",
                PERIOD,
            ));
            std::thread::sleep(Duration::from_millis(500));
        }
        let (Some((_, tcp)), Some((_, udp))) = (tcp_rx.last(), udp_rx.last()) else {
            return Ok(None);
        };
        Ok((tcp > 50 && udp > 50).then_some(()))
    })
    .expect("the allowed streams flow before the revocation");
    let drops_before = topo.drops("db1").expect("db1 drop counters");

    // The revoked node does not hear of it (it keeps its netmap and goes on sending).
    block_control(web_ns, true);
    let out = topo
        .ztnet(&[
            "node",
            "revoke",
            "--network",
            NETWORK,
            "web1",
            "--reason",
            "e2e revocation",
        ])
        .expect("ztnet node revoke");
    let returned = Instant::now();
    assert!(out.contains("revoked node web1"), "{out}");

    // Poll every 20 ms until both receivers have been silent for QUIET, within a deadline.
    let deadline = returned + BOUND + QUIET + Duration::from_secs(3);
    let last_accepted = loop {
        let now = Instant::now();
        let last = [tcp_rx.last(), udp_rx.last()]
            .into_iter()
            .flatten()
            .map(|(at, _)| at)
            .max()
            .expect("both streams flowed");
        if now.duration_since(last.max(returned)) >= QUIET {
            break last;
        }
        assert!(
            now < deadline,
            "the revoked node's packets were still accepted {:?} after the command returned",
            now - returned
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let after = last_accepted.saturating_duration_since(returned);
    eprintln!(
        "revoke: last packet accepted {} ms after the command returned",
        after.as_millis()
    );
    if let Some(before) = returned.checked_duration_since(last_accepted) {
        eprintln!(
            "revoke: (the peer had refused web1 already; its last packet arrived {} ms before \
             the command returned)",
            before.as_millis()
        );
    }
    // The revoked node did not hear of it: still running, still holding db1 as a peer.
    let web_status = topo.status("web1").expect("web1 still runs while cut off");
    let web_peers: Vec<&str> = web_status["peers"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        web_peers,
        vec!["db1"],
        "web1 must not have learned of its revocation: {web_status}"
    );
    assert!(
        after <= BOUND,
        "access ended {after:?} after the command returned, over the {BOUND:?} bound"
    );
    // The revoked node really went on sending, and the peer refused it.
    let drops_after = topo.drops("db1").expect("db1 drop counters");
    assert!(
        drops_after > drops_before,
        "db1 counted no drop of web1's packets after the revocation ({drops_before} -> \
         {drops_after}): web1 may have stopped sending, so the figure proves nothing"
    );
    drop(senders);

    // It stays listed, revoked, with the reason.
    let list = topo
        .ztnet(&["node", "list", "--network", NETWORK])
        .expect("node list");
    assert!(
        list.lines()
            .any(|l| l.starts_with("web1") && l.contains("revoked (e2e revocation)")),
        "{list}"
    );

    // Once it hears the coordinator again, it is told `revoked` and exits.
    block_control(web_ns, false);
    let (status, log) = topo
        .wait_exit("web1", Duration::from_secs(30))
        .expect("the revoked node exits");
    assert!(!status.success(), "a revoked node exits with an error");
    assert!(log.contains("e2e revocation"), "{log}");

    // Restarted from its state directory, it is refused again.
    topo.start_node("web1", None).expect("restart web1");
    let (status, log) = topo
        .wait_exit("web1", Duration::from_secs(30))
        .expect("the restarted revoked node exits");
    assert!(!status.success());
    assert!(log.contains("revoked"), "{log}");

    // Without its certificate, its used token is refused.
    let state = topo.node("web1").state_dir.clone();
    for f in ["node.pem", "enrollment.json"] {
        let _ = std::fs::remove_file(state.join(f));
    }
    topo.start_node("web1", Some(&web_token))
        .expect("start web1");
    let (status, log) = topo
        .wait_exit("web1", Duration::from_secs(30))
        .expect("re-enrolling with the old token fails");
    assert!(!status.success());
    assert!(log.contains("needs a new token"), "{log}");

    // A new token with its old WireGuard key is refused too.
    let fresh = topo.token_for("web1").expect("token");
    topo.start_node("web1", Some(&fresh)).expect("start web1");
    let (status, log) = topo
        .wait_exit("web1", Duration::from_secs(30))
        .expect("enrolling with the revoked key fails");
    assert!(!status.success());
    assert!(log.contains("revoked"), "{log}");

    let audit = topo
        .ztnet(&["audit", "--network", NETWORK])
        .expect("ztnet audit");
    assert!(
        audit.contains("node.revoke") && audit.contains("e2e revocation"),
        "{audit}"
    );
}
