//! Issue 6, key expiry (FC-17, node half), end to end in namespaces. Needs root.
//!
//! With a 40 s key life, connected nodes rotate by themselves at half life under traffic. Then
//! web1 and db1 both lose the coordinator: web1 cannot rotate, and db1 must drop web1 when
//! web1's key expires, by db1's own clock, with nobody telling it. Once the coordinator is
//! back, web1 rotates and comes back.

#[path = "e2e_rotate_support.rs"]
mod support;

use std::time::{Duration, Instant};

use support::{Streams, audit, block_control, instant_of, log, peer_key_expiry, two_nodes};
use ztnet_integration::{require_root, wait_for};

/// The key life of this test's network.
const KEY_TTL: &str = "40s";
/// How long after the key's expiry db1 may still accept web1's packets (the watchdog's
/// 250 ms tick plus the second the expiry is counted in).
const GRACE: Duration = Duration::from_millis(1500);
/// Silence that counts as the stream being cut.
const QUIET: Duration = Duration::from_millis(1500);

#[test]
fn nodes_rotate_before_expiry_and_a_node_that_cannot_is_dropped_at_expiry_by_its_peer() {
    require_root();
    let topo = two_nodes(Some(KEY_TTL));
    let streams = Streams::start(&topo);

    // Renewal allowed: both rotate at half life with no loss to speak of.
    let started = Instant::now();
    wait_for(
        "both nodes to rotate on their own",
        Duration::from_secs(45),
        || {
            Ok((!audit(&topo, "node.key-rotate", "web1").is_empty()
                && !audit(&topo, "node.key-rotate", "db1").is_empty())
            .then_some(()))
        },
    )
    .expect("automatic rotation at half life");
    let loss = streams.udp_rx.longest_gap(started, Instant::now());
    eprintln!(
        "expiry: automatic rotations at half life cost {} ms of loss",
        loss.as_millis()
    );
    assert!(
        loss <= Duration::from_secs(1),
        "automatic rotation lost {loss:?}"
    );
    assert!(
        audit(&topo, "node.key-rotate-request", "web1").is_empty(),
        "nobody asked: the nodes rotated by themselves"
    );

    // Renewal blocked: neither node hears the coordinator any more.
    block_control(&topo.node("web1").ns, true);
    block_control(&topo.node("db1").ns, true);
    // A rotation may have been under way; db1's saved netmap has what db1 enforces.
    std::thread::sleep(Duration::from_millis(300));
    let expires = peer_key_expiry(&topo, "db1", "web1").expect("db1's netmap has web1's expiry");
    let expiry = instant_of(expires);
    assert!(
        expiry > Instant::now() + Duration::from_secs(5),
        "web1's key expires too soon to watch"
    );

    let deadline = expiry + GRACE + QUIET + Duration::from_secs(5);
    let last = loop {
        let now = Instant::now();
        let last = streams.udp_rx.last().expect("the stream flowed");
        if now > expiry && now.duration_since(last.max(expiry)) >= QUIET {
            break last;
        }
        assert!(
            now < deadline,
            "db1 still accepted web1's packets {:?} after web1's key expired",
            now.saturating_duration_since(expiry)
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    match last.checked_duration_since(expiry) {
        Some(after) => eprintln!(
            "expiry: db1 dropped web1 {} ms after its key expired (by db1's clock, coordinator \
             unreachable)",
            after.as_millis()
        ),
        None => eprintln!(
            "expiry: db1's last packet from web1 came {} ms before the expiry second",
            expiry.duration_since(last).as_millis()
        ),
    }
    assert!(
        last + Duration::from_secs(2) >= expiry,
        "the stream stopped {:?} before the expiry: not the expiry that cut it",
        expiry.saturating_duration_since(last)
    );
    assert!(
        last <= expiry + GRACE,
        "db1 accepted web1 {:?} after the expiry, over the {GRACE:?} grace",
        last.saturating_duration_since(expiry)
    );
    let db_log = log(&topo, "db1");
    assert!(db_log.contains("key expired"), "{db_log}");
    let web_log = log(&topo, "web1");
    assert!(
        web_log.contains("this node's WireGuard key expired"),
        "{web_log}"
    );

    // The coordinator saw it too, and takes web1 out of every netmap.
    wait_for("node.key-expire of web1", Duration::from_secs(10), || {
        Ok((!audit(&topo, "node.key-expire", "web1").is_empty()).then_some(()))
    })
    .expect("the expiry is audited");

    // Back in touch, web1 rotates (its key is past half life) and comes back.
    let rotations = audit(&topo, "node.key-rotate", "web1").len();
    block_control(&topo.node("web1").ns, false);
    block_control(&topo.node("db1").ns, false);
    let back = Instant::now();
    wait_for("web1 to rotate again", Duration::from_secs(45), || {
        Ok((audit(&topo, "node.key-rotate", "web1").len() > rotations).then_some(()))
    })
    .expect("web1 rotates once it reaches the coordinator");
    wait_for(
        "the UDP stream to flow again",
        Duration::from_secs(20),
        || Ok((streams.udp_rx.since(back) > 100).then_some(())),
    )
    .expect("web1 is a peer again after rotating");
}
