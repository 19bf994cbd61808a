//! Issue 6, continuous validation, end to end: nodes report posture facts (db1 from a file,
//! web1 from a command run without a shell), the policy requires disk encryption of both, and
//! flipping db1's fact to "off" quarantines it: a busy TCP stream from web1 ends, db1 leaves
//! web1's netmap and `ztnet node list` says why; flipping it back releases db1 and access comes
//! back. Both changes are audited with their measured time to enforcement. Needs root.

use std::time::{Duration, Instant};

use serde_json::Value;
use ztnet_integration::stream::{Receiver, Sender};
use ztnet_integration::topology::{NETWORK, NodeSpec, Topology, story_nodes, tcp_echo};
use ztnet_integration::{require_root, wait_for};

/// web may reach db on two TCP ports; both must report disk encryption on, and run a
/// ztnet-node at least 0.0.1.
const POLICY: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432-5433"]

[[posture]]
selector = ["tag:db", "tag:web"]
min_version = "0.0.1"
facts = { disk_encryption = "on" }
"#;

/// Access must end this soon after the fact flips (the node reads its facts every 200 ms).
const BOUND: Duration = Duration::from_secs(3);
/// How long the receiver must stay silent before the stream counts as cut.
const QUIET: Duration = Duration::from_millis(1500);

fn specs() -> Vec<NodeSpec> {
    story_nodes()
        .into_iter()
        .filter(|s| s.name == "web1" || s.name == "db1")
        .collect()
}

/// Replaces a file at once (write aside, rename), so the node never reads half of it.
fn write_facts(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write the facts");
    std::fs::rename(&tmp, path).expect("rename the facts into place");
}

fn node_entry(topo: &Topology, name: &str) -> Value {
    topo.node_list()
        .expect("node list")
        .into_iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("{name} is listed"))
}

fn peers_of(topo: &Topology, name: &str) -> Vec<String> {
    let status = topo.status(name).expect("status");
    status["peers"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The audit entry with `action` on `target` after `after_id`, once its time to enforcement
/// is in.
fn enforced_entry(topo: &Topology, action: &str, target: &str, after_id: u64) -> Value {
    wait_for(
        &format!("{action} {target} audited with its enforcement"),
        Duration::from_secs(40),
        || {
            let events = topo.ztnet_json(&["audit", "--network", NETWORK])?;
            Ok(events.as_array().and_then(|v| {
                v.iter()
                    .find(|e| {
                        e["action"] == action
                            && e["target"] == target
                            && e["id"].as_u64().is_some_and(|id| id > after_id)
                            && !e["enforcement"].is_null()
                    })
                    .cloned()
            }))
        },
    )
    .expect("the audit entry and its time to enforcement")
}

#[test]
fn a_posture_fact_flipped_quarantines_the_node_and_flipping_it_back_releases_it() {
    require_root();
    let mut topo = Topology::build(&specs()).expect("build the topology");
    topo.start_coordinator().expect("start the coordinator");
    topo.create_network().expect("create the network");
    let db_facts = topo.dir.path().join("db1-facts.toml");
    let web_facts = topo.dir.path().join("web1-facts.json");
    write_facts(&db_facts, "disk_encryption = \"on\"\n");
    write_facts(&web_facts, "{\"disk_encryption\": \"on\"}\n");
    let (db_file, web_file) = (
        db_facts.to_string_lossy().into_owned(),
        web_facts.to_string_lossy().into_owned(),
    );

    let db_token = topo.token_for("db1").expect("token");
    let web_token = topo.token_for("web1").expect("token");
    let fast = ["--posture-interval", "0.2"];
    let mut db_args = vec!["--posture-file", &db_file];
    db_args.extend(fast);
    topo.start_node_with("db1", Some(&db_token), &db_args)
        .expect("start db1");
    // web1's facts come from a command: `cat FILE`, run directly.
    let mut web_args = vec!["--posture-command", "cat", "--posture-arg", &web_file];
    web_args.extend(fast);
    topo.start_node_with("web1", Some(&web_token), &web_args)
        .expect("start web1");
    topo.wait_online(&["web1", "db1"], Duration::from_secs(90))
        .expect("both nodes enroll and connect");
    // Both reported before the policy requires anything of them.
    wait_for("both posture reports", Duration::from_secs(30), || {
        let list = topo.node_list()?;
        Ok(list
            .iter()
            .all(|n| n["posture"]["facts"]["disk_encryption"] == "on")
            .then_some(()))
    })
    .expect("posture reported");
    let db = node_entry(&topo, "db1");
    assert!(
        !db["posture"]["kernel"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
            && !db["posture"]["version"]
                .as_str()
                .unwrap_or_default()
                .is_empty(),
        "db1 reports its kernel and version: {db}"
    );

    topo.apply_policy(POLICY, &["web1", "db1"], Duration::from_secs(30))
        .expect("apply the policy");
    let shown = topo
        .ztnet(&["node", "show", "--network", NETWORK, "db1"])
        .expect("node show");
    assert!(shown.contains("disk_encryption=on"), "{shown}");
    for n in ["web1", "db1"] {
        assert!(node_entry(&topo, n)["quarantine"].is_null(), "{n} passes");
    }

    let db1 = topo.overlay_v4("db1").expect("db1 address");
    topo.start_echo_servers("db1", &[5433], &[])
        .expect("echo server");
    let rx = Receiver::start(&topo.node("db1").ns, "TCP4-LISTEN:5432,reuseaddr");
    let mut sender = None;
    wait_for("the stream to flow", Duration::from_secs(30), || {
        if rx.last().is_none() {
            sender = Some(Sender::start(
                &topo.node("web1").ns,
                &format!("TCP4:{db1}:5432,connect-timeout=2"),
                "ztnet-posture-stream",
                Duration::from_millis(5),
            ));
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(rx.last().filter(|(_, n)| *n > 50).map(|_| ()))
    })
    .expect("web1 streams to db1");
    let audit_before = topo
        .ztnet_json(&["audit", "--network", NETWORK])
        .expect("audit")
        .as_array()
        .and_then(|v| v.last().and_then(|e| e["id"].as_u64()))
        .unwrap_or(0);

    // Flip the fact: db1 is quarantined and the stream ends.
    write_facts(&db_facts, "disk_encryption = \"off\"\n");
    let flipped = Instant::now();
    let deadline = flipped + BOUND + QUIET + Duration::from_secs(3);
    let last = loop {
        let (at, _) = rx.last().expect("the stream flowed");
        let now = Instant::now();
        if now.duration_since(at.max(flipped)) >= QUIET {
            break at;
        }
        assert!(
            now < deadline,
            "web1 still reached db1 {:?} after the fact flipped",
            now - flipped
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let cut = last.saturating_duration_since(flipped);
    eprintln!(
        "posture: last packet accepted {} ms after the fact flipped (facts read every 200 ms)",
        cut.as_millis()
    );
    assert!(cut <= BOUND, "access ended {cut:?} after the flip");
    drop(sender);

    let list = topo
        .ztnet(&["node", "list", "--network", NETWORK])
        .expect("node list");
    let line = list
        .lines()
        .find(|l| l.starts_with("db1"))
        .unwrap_or_default();
    assert!(
        line.contains("quarantined: posture at line 7: fact disk_encryption is \"off\""),
        "{list}"
    );
    assert!(
        node_entry(&topo, "web1")["quarantine"].is_null(),
        "web1 still passes"
    );
    wait_for("db1 to leave web1's peers", Duration::from_secs(10), || {
        Ok((!peers_of(&topo, "web1").contains(&"db1".to_string())).then_some(()))
    })
    .expect("db1 is not web1's peer");
    assert!(
        peers_of(&topo, "db1").is_empty(),
        "a quarantined node has no peers"
    );
    // ... and it is told why, in its own log, not only that it has no peers.
    wait_for(
        "db1 to log why it is quarantined",
        Duration::from_secs(10),
        || {
            let log = topo.node("db1").log();
            Ok(
                (log.contains("quarantined by the coordinator") && log.contains("disk_encryption"))
                    .then_some(()),
            )
        },
    )
    .expect("db1's log names its quarantine");
    assert!(
        !tcp_echo(&topo.node("web1").ns, db1, 5433, "while quarantined").expect("socat"),
        "a new connection to the quarantined db1 must fail"
    );
    let q = enforced_entry(&topo, "node.quarantine", "db1", audit_before);
    eprintln!("posture: audit {}", q["enforcement"]["summary"]);
    assert!(
        q["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("disk_encryption"),
        "{q}"
    );
    assert!(
        q["enforcement"]["ms"].as_u64().is_some_and(|ms| ms < 2000),
        "{q}"
    );

    // Flip it back: released, and access comes back.
    write_facts(&db_facts, "disk_encryption = \"on\"\n");
    let restored = Instant::now();
    wait_for("web1 to reach db1 again", Duration::from_secs(20), || {
        Ok(tcp_echo(&topo.node("web1").ns, db1, 5433, "released")?.then_some(()))
    })
    .expect("access comes back once db1 passes again");
    eprintln!(
        "posture: access back {} ms after the fact flipped back (a new connection, its \
         handshake included)",
        restored.elapsed().as_millis()
    );
    assert!(node_entry(&topo, "db1")["quarantine"].is_null());
    let r = enforced_entry(&topo, "node.release", "db1", audit_before);
    eprintln!("posture: audit {}", r["enforcement"]["summary"]);
    // The policy change is measured the same way: both nodes had to acknowledge it.
    let p = enforced_entry(&topo, "policy.apply", NETWORK, 0);
    eprintln!("posture: policy.apply {}", p["enforcement"]["summary"]);
    assert_eq!(p["enforcement"]["peers"], 2, "{p}");
    assert!(p["enforcement"]["ms"].as_u64().is_some(), "{p}");
    let table = topo
        .ztnet(&["audit", "--network", NETWORK])
        .expect("ztnet audit");
    assert!(
        table
            .lines()
            .any(|l| l.contains("node.quarantine") && l.contains(" ms (")),
        "{table}"
    );

    // A fact file that goes missing quarantines too (no facts, the node says why).
    std::fs::remove_file(&db_facts).expect("remove the facts");
    wait_for(
        "db1 quarantined without facts",
        Duration::from_secs(10),
        || {
            let q = node_entry(&topo, "db1")["quarantine"].clone();
            Ok(q.as_str()
                .filter(|q| q.contains("not reported") && q.contains("db1-facts.toml"))
                .map(str::to_string))
        },
    )
    .expect("a missing facts file quarantines");
}

/// `max_session`: the coordinator closes a session older than the entry allows (whatever the
/// node reports), quarantining the node until it has authenticated again; the node reconnects
/// by itself and is released.
#[test]
fn a_session_older_than_max_session_must_authenticate_again() {
    require_root();
    let mut topo = Topology::build(&specs()).expect("build the topology");
    topo.start_coordinator().expect("start the coordinator");
    topo.create_network().expect("create the network");
    for n in ["web1", "db1"] {
        let token = topo.token_for(n).expect("token");
        topo.start_node(n, Some(&token)).expect("start node");
    }
    topo.wait_online(&["web1", "db1"], Duration::from_secs(90))
        .expect("both nodes enroll and connect");
    let policy = r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5433"]

[[posture]]
selector = ["tag:db"]
max_session = "10s"
"#;
    let applied = Instant::now();
    topo.apply_policy(policy, &["web1", "db1"], Duration::from_secs(30))
        .expect("apply the policy");
    topo.start_echo_servers("db1", &[5433], &[])
        .expect("echo server");
    let db1 = topo.overlay_v4("db1").expect("db1 address");
    wait_for("web1 reaches db1", Duration::from_secs(20), || {
        Ok(tcp_echo(&topo.node("web1").ns, db1, 5433, "before")?.then_some(()))
    })
    .expect("access before the session ages");

    let q = enforced_entry(&topo, "node.quarantine", "db1", 0);
    let at = applied.elapsed();
    let detail = q["detail"].as_str().unwrap_or_default().to_string();
    assert!(detail.contains("max_session 10 s"), "{q}");
    eprintln!(
        "max_session: db1 quarantined {} s after the policy apply: {detail}",
        at.as_secs()
    );
    let r = enforced_entry(&topo, "node.release", "db1", 0);
    eprintln!("max_session: released: {}", r["enforcement"]["summary"]);
    assert!(
        r["id"].as_u64() > q["id"].as_u64(),
        "released after the quarantine"
    );
    wait_for("web1 reaches db1 again", Duration::from_secs(20), || {
        Ok(tcp_echo(&topo.node("web1").ns, db1, 5433, "after")?.then_some(()))
    })
    .expect("access after the new session");
    let entry = node_entry(&topo, "db1");
    assert_eq!(entry["online"], true, "db1 reconnected: {entry}");
}
