//! Issue 6, continuous validation, end to end: nodes report posture facts (db1 from a file,
//! web1 from a command run without a shell), the policy requires disk encryption of both, and
//! flipping db1's fact to "off" quarantines it: a busy TCP stream from web1 ends, db1 leaves
//! web1's netmap and `ztnet node list` says why; flipping it back releases db1 and access comes
//! back. Both changes are audited with their measured time to enforcement. `max_session`: a
//! UDP stream crosses re-authentications without loss, and a node that cannot re-authenticate
//! is cut at its deadline. Needs root.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt as _;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use ztnet_integration::stream::{Guard, Receiver, Sender};
use ztnet_integration::topology::{
    COORDINATOR_ADDR, COORDINATOR_PORT, NETWORK, NodeSpec, Topology, story_nodes, tcp_echo,
};
use ztnet_integration::{Netns, require_root, wait_for};

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

/// Both nodes must re-authenticate every 10 s (the shortest `max_session`); web may send db
/// UDP on 5433 and TCP on 5434.
const MAX_SESSION_POLICY: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["udp:5433", "tcp:5434"]

[[posture]]
selector = ["tag:db", "tag:web"]
max_session = "10s"
"#;

/// Datagrams per second of the stream across the re-authentications.
const RATE_HZ: u64 = 100;
/// Re-authentications of each node the stream must span.
const REAUTHS: usize = 2;

/// `max_session` without loss (issue 6): each node learns its session's deadline and opens a
/// new session ahead of it, so a UDP stream at 100 Hz from web1 to db1 loses nothing across at
/// least two re-authentications of each node, neither is quarantined and both stay online; the
/// coordinator logs every replacement. Then db1 is cut off from the coordinator (an nftables
/// drop in its own namespace) while its tunnel to web1 still works: it cannot re-authenticate,
/// and at its session's deadline it is quarantined as before, web1 drops it and the stream
/// stops; once the coordinator is reachable again it reconnects and is released.
#[test]
fn max_session_reauthenticates_without_loss_and_a_node_that_cannot_is_cut() {
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
    topo.apply_policy(
        MAX_SESSION_POLICY,
        &["web1", "db1"],
        Duration::from_secs(30),
    )
    .expect("apply the policy");
    let audit_before = last_audit_id(&topo);
    let db1 = topo.overlay_v4("db1").expect("db1 address");

    let rx = UdpReceiver::start(&topo.node("db1").ns, 5433);
    let tx = UdpSender::start(&topo.node("web1").ns, &format!("{db1}:5433"), RATE_HZ, 1);
    let start = wait_for("the UDP stream to flow", Duration::from_secs(30), || {
        Ok(rx.highest().filter(|&n| n > 20))
    })
    .expect("web1 streams to db1");
    let reauths = |name: &str| -> usize {
        std::fs::read_to_string(topo.dir.path().join("coordinator.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&format!("node={name}")) && l.contains("re-authenticated"))
            .count()
    };
    let (db_before, web_before) = (reauths("db1"), reauths("web1"));
    let began = Instant::now();
    wait_for(
        "two re-authentications of each node",
        Duration::from_secs(60),
        || {
            Ok(
                (reauths("db1") >= db_before + REAUTHS && reauths("web1") >= web_before + REAUTHS)
                    .then_some(()),
            )
        },
    )
    .expect("both nodes re-authenticate ahead of max_session");
    let sent = tx.stop();
    wait_for("the last datagram", Duration::from_secs(5), || {
        Ok((rx.highest() == Some(sent)).then_some(()))
    })
    .ok();
    let (db_n, web_n) = (reauths("db1") - db_before, reauths("web1") - web_before);
    let missing = rx.missing(start + 1, sent);
    eprintln!(
        "max_session: {} datagrams at {RATE_HZ} Hz over {} ms across {db_n} re-authentications \
         of db1 and {web_n} of web1: {} lost, longest gap between arrivals {} ms",
        sent - start,
        began.elapsed().as_millis(),
        missing.len(),
        rx.longest_gap().as_millis()
    );
    assert!(
        missing.is_empty(),
        "datagrams lost across the re-authentications: {missing:?}"
    );
    let events = audit_since(&topo, audit_before);
    assert!(
        !events.iter().any(|e| e["action"] == "node.quarantine"),
        "an honest node was quarantined: {events:?}"
    );
    for n in ["web1", "db1"] {
        let entry = node_entry(&topo, n);
        assert_eq!(entry["online"], true, "{n} stayed online: {entry}");
        assert!(entry["quarantine"].is_null(), "{n}: {entry}");
        assert!(
            topo.node(n)
                .log()
                .contains("re-authenticated ahead of its max_session deadline"),
            "{n} logs its re-authentications"
        );
    }

    // db1 cut off from the coordinator, its tunnel to web1 intact: quarantined at its deadline.
    let table = format!("ztnet_cut_{}", std::process::id());
    let coordinator = COORDINATOR_ADDR.split(':').next().unwrap_or_default();
    let db_ns = &topo.node("db1").ns;
    db_ns
        .sh(&format!(
            "nft add table inet {table} && nft add chain inet {table} out \
             '{{ type filter hook output priority 0; }}' && nft add rule inet {table} out \
             ip daddr {coordinator} udp dport {COORDINATOR_PORT} drop"
        ))
        .expect("block db1's control channel");
    let cut_at = Instant::now();
    let audit_cut = last_audit_id(&topo);
    // A second stream, numbered on from a million: it still reaches db1 through the tunnel.
    let second = 1_000_000;
    let tx = UdpSender::start(
        &topo.node("web1").ns,
        &format!("{db1}:5433"),
        RATE_HZ,
        second,
    );
    wait_for("the second stream to flow", Duration::from_secs(10), || {
        Ok(rx.highest().filter(|&n| n > second + 10))
    })
    .expect("db1, cut off from the coordinator, still reaches web1 through the tunnel");
    let q = enforced_entry(&topo, "node.quarantine", "db1", audit_cut);
    let detail = q["detail"].as_str().unwrap_or_default().to_string();
    assert!(detail.contains("max_session 10 s"), "{q}");
    eprintln!(
        "max_session: db1, cut off from the coordinator, quarantined {} ms later: {}",
        cut_at.elapsed().as_millis(),
        q["enforcement"]["summary"]
    );
    assert!(
        cut_at.elapsed() < Duration::from_secs(25),
        "quarantined only {:?} after the cut (max_session is 10 s)",
        cut_at.elapsed()
    );
    wait_for("db1 to leave web1's peers", Duration::from_secs(10), || {
        Ok((!peers_of(&topo, "web1").contains(&"db1".to_string())).then_some(()))
    })
    .expect("db1 is not web1's peer");
    wait_for("the stream to stop", Duration::from_secs(10), || {
        Ok(rx.quiet_for(Duration::from_secs(1)).then_some(()))
    })
    .expect("nothing from web1 reaches the quarantined db1");
    let sent = tx.stop();
    let arrived = rx.highest().unwrap_or(0).saturating_sub(second);
    eprintln!(
        "max_session: the second stream stopped at datagram {arrived} of the {} sent",
        sent - second + 1
    );
    assert!(
        arrived + 50 < sent - second,
        "the stream went on after the quarantine"
    );

    // The coordinator reachable again: db1 reconnects by itself and is released.
    db_ns
        .exec("nft", &["delete", "table", "inet", &table])
        .expect("unblock db1");
    let r = enforced_entry(&topo, "node.release", "db1", q["id"].as_u64().unwrap_or(0));
    eprintln!("max_session: released: {}", r["enforcement"]["summary"]);
    topo.start_echo_servers("db1", &[5434], &[])
        .expect("echo server");
    wait_for("web1 reaches db1 again", Duration::from_secs(20), || {
        Ok(tcp_echo(&topo.node("web1").ns, db1, 5434, "after")?.then_some(()))
    })
    .expect("access after the new session");
}

fn last_audit_id(topo: &Topology) -> u64 {
    topo.ztnet_json(&["audit", "--network", NETWORK])
        .expect("audit")
        .as_array()
        .and_then(|v| v.iter().filter_map(|e| e["id"].as_u64()).max())
        .unwrap_or(0)
}

fn audit_since(topo: &Topology, after_id: u64) -> Vec<Value> {
    topo.ztnet_json(&["audit", "--network", NETWORK])
        .expect("audit")
        .as_array()
        .map(|v| {
            v.iter()
                .filter(|e| e["id"].as_u64().is_some_and(|id| id > after_id))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// `socat -u UDP4-RECV:PORT STDOUT` in a namespace; every line is a sequence number, kept
/// with the time the largest gap between two arrivals.
struct UdpReceiver {
    _child: Guard,
    seen: Arc<Mutex<Seen>>,
}

#[derive(Default)]
struct Seen {
    numbers: BTreeSet<u64>,
    last: Option<Instant>,
    longest_gap: Duration,
}

impl UdpReceiver {
    fn start(ns: &Netns, port: u16) -> UdpReceiver {
        let mut child = ns
            .command("socat")
            .args(["-u", &format!("UDP4-RECV:{port}"), "STDOUT"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start the UDP receiver");
        let stdout = child.stdout.take().expect("receiver stdout");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(n) = line.trim().parse::<u64>() else {
                    continue;
                };
                let now = Instant::now();
                let mut s = shared.lock().expect("no panic holds this lock");
                if let Some(at) = s.last {
                    s.longest_gap = s.longest_gap.max(now - at);
                }
                s.last = Some(now);
                s.numbers.insert(n);
            }
        });
        UdpReceiver {
            _child: Guard(child),
            seen,
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().expect("no panic holds this lock")
    }

    fn highest(&self) -> Option<u64> {
        self.seen().numbers.last().copied()
    }

    /// The numbers from `from` to `to` (both included) that never arrived.
    fn missing(&self, from: u64, to: u64) -> Vec<u64> {
        let s = self.seen();
        (from..=to).filter(|n| !s.numbers.contains(n)).collect()
    }

    /// Whether nothing arrived for `quiet`.
    fn quiet_for(&self, quiet: Duration) -> bool {
        self.seen().last.is_some_and(|at| at.elapsed() >= quiet)
    }

    /// The longest time between two arrivals so far.
    fn longest_gap(&self) -> Duration {
        self.seen().longest_gap
    }
}

/// `socat -u STDIN UDP4:TARGET` in a namespace, fed one numbered line (one datagram, numbered
/// from `first`) at `rate_hz` until stopped.
struct UdpSender {
    _child: Guard,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl UdpSender {
    fn start(ns: &Netns, target: &str, rate_hz: u64, first: u64) -> UdpSender {
        let mut child = ns
            .command("socat")
            .args(["-u", "STDIN", &format!("UDP4:{target}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start the UDP sender");
        let mut stdin = child.stdin.take().expect("sender stdin");
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let period = Duration::from_micros(1_000_000 / rate_hz);
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut n = 0u64;
            while !halt.load(Ordering::Relaxed) {
                if writeln!(stdin, "{}", first + n).is_err() || stdin.flush().is_err() {
                    break;
                }
                n += 1;
                // The stream's pace, not a wait for a condition: datagram n leaves at n periods.
                let next = started + period * u32::try_from(n).unwrap_or(u32::MAX);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            first + n.saturating_sub(1)
        });
        UdpSender {
            _child: Guard(child),
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sending; returns the number of the last datagram sent.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

impl Drop for UdpSender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
