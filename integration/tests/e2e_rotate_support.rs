//! Shared by the issue-6 key rotation and expiry tests (`e2e_rotate*.rs`, `e2e_expiry*.rs`):
//! streams whose every arrival is timed, control traffic cut in a node's own namespace, and
//! reads of the audit log and a node's status. Included with `#[path]`; as a test target of
//! its own it holds no tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::process::CommandExt as _;
use std::process::{ChildStdin, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use ztnet_integration::topology::{COORDINATOR_PORT, NETWORK, NodeSpec, Topology, story_nodes};
use ztnet_integration::{Netns, wait_for};

/// web may reach db on a TCP port and a UDP port.
pub const POLICY: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432", "udp:5433"]
"#;

/// Sending period of the UDP stream (about 1000 packets a second, FC-19).
pub const UDP_PERIOD: Duration = Duration::from_millis(1);
/// Sending period of the TCP stream.
pub const TCP_PERIOD: Duration = Duration::from_millis(5);

/// A child process (in its own process group) killed on drop.
pub use ztnet_integration::stream::Guard;

/// A receiver in a namespace that times every line it gets.
pub struct Arrivals {
    child: Guard,
    times: Arc<Mutex<Vec<Instant>>>,
}

impl Arrivals {
    /// Listens with socat (`TCP4-LISTEN:...` or `UDP4-RECV:...`).
    pub fn start(ns: &Netns, listen: &str) -> Arrivals {
        let mut child = ns
            .command("socat")
            .args(["-u", listen, "STDOUT"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start the receiver");
        let stdout = child.stdout.take().expect("receiver stdout");
        let times = Arc::new(Mutex::new(Vec::new()));
        let seen = times.clone();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout);
            let mut line = String::new();
            while lines.read_line(&mut line).is_ok_and(|n| n > 0) {
                seen.lock()
                    .expect("no panic holds this lock")
                    .push(Instant::now());
                line.clear();
            }
        });
        Arrivals {
            child: Guard(child),
            times,
        }
    }

    /// How many lines arrived.
    pub fn count(&self) -> usize {
        self.times.lock().expect("no panic holds this lock").len()
    }

    /// When the last line arrived.
    pub fn last(&self) -> Option<Instant> {
        self.times
            .lock()
            .expect("no panic holds this lock")
            .last()
            .copied()
    }

    /// Lines that arrived after `t`.
    pub fn since(&self, t: Instant) -> usize {
        let times = self.times.lock().expect("no panic holds this lock");
        times.len() - times.partition_point(|&a| a <= t)
    }

    /// The first arrival after `t`.
    pub fn first_after(&self, t: Instant) -> Option<Instant> {
        let times = self.times.lock().expect("no panic holds this lock");
        times.get(times.partition_point(|&a| a <= t)).copied()
    }

    /// The longest stretch inside `[from, to]` with no arrival: the loss window.
    pub fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        let times = self.times.lock().expect("no panic holds this lock");
        let mut prev = from;
        let mut gap = Duration::ZERO;
        for &t in times.iter().filter(|&&t| t > from && t <= to) {
            gap = gap.max(t - prev);
            prev = t;
        }
        gap.max(to.saturating_duration_since(prev))
    }

    /// Whether the receiving process still runs (a TCP receiver exits when its stream ends).
    pub fn alive(&mut self) -> bool {
        self.child.0.try_wait().ok().flatten().is_none()
    }
}

/// A sender in a namespace, fed a numbered line every `period`.
pub struct Sender {
    child: Guard,
    stop: Arc<AtomicBool>,
    /// Lines handed to socat so far: a sender alive but blocked on its pipe shows here.
    written: Arc<AtomicU64>,
}

impl Sender {
    /// Starts socat towards `target` (`TCP4:...` or `UDP4:...`).
    pub fn start(ns: &Netns, target: &str, period: Duration) -> Sender {
        let mut child = ns
            .command("socat")
            .args(["-u", "STDIN", target])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start the sender");
        let mut stdin: ChildStdin = child.stdin.take().expect("sender stdin");
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let (halt, count) = (stop.clone(), written.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !halt.load(Ordering::Relaxed) {
                n += 1;
                // One write per line: socat sends what one read gives it as one datagram.
                let line = format!("seq {n} ztnet-rotate-stream\n");
                if stdin.write_all(line.as_bytes()).is_err() {
                    break;
                }
                count.store(n, Ordering::Relaxed);
                std::thread::sleep(period);
            }
        });
        Sender {
            child: Guard(child),
            stop,
            written,
        }
    }

    /// How many lines were handed to socat.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Whether the sending process still runs (a TCP sender exits when its stream breaks).
    pub fn alive(&mut self) -> bool {
        self.child.0.try_wait().ok().flatten().is_none()
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A TCP and a UDP stream from web1 to db1, both flowing.
pub struct Streams {
    pub tcp_rx: Arrivals,
    pub udp_rx: Arrivals,
    pub tcp_tx: Sender,
    pub udp_tx: Sender,
}

impl Streams {
    /// Starts both streams and waits until each has carried a few lines.
    pub fn start(topo: &Topology) -> Streams {
        let db1 = topo.overlay_v4("db1").expect("db1 address");
        let (db_ns, web_ns) = (&topo.node("db1").ns, &topo.node("web1").ns);
        let tcp_rx = Arrivals::start(db_ns, "TCP4-LISTEN:5432,reuseaddr,fork");
        let udp_rx = Arrivals::start(db_ns, "UDP4-RECV:5433,reuseaddr");
        // Each sender is restarted on its own, but only once it has exited (a connection
        // refused before the receiver listened, say): a sender still running is left to get
        // through, however slowly it starts on a loaded machine. (Restarting every half second
        // while nothing had arrived could kill each one before its first line, for the whole
        // 30 s.) The TCP receiver forks per connection, so a replaced sender does not end it;
        // what must survive is the one connection left, the sender's.
        let mut tcp_tx: Option<Sender> = None;
        let mut udp_tx: Option<Sender> = None;
        let (mut tcp_starts, mut udp_starts) = (0, 0);
        let flowed = wait_for("both streams to flow", Duration::from_secs(30), || {
            if tcp_rx.count() == 0 && !tcp_tx.as_mut().is_some_and(Sender::alive) {
                tcp_starts += 1;
                tcp_tx = Some(Sender::start(
                    web_ns,
                    &format!("TCP4:{}:5432,connect-timeout=2", host(db1)),
                    TCP_PERIOD,
                ));
            }
            if udp_rx.count() == 0 && !udp_tx.as_mut().is_some_and(Sender::alive) {
                udp_starts += 1;
                udp_tx = Some(Sender::start(
                    web_ns,
                    &format!("UDP4:{}:5433", host(db1)),
                    UDP_PERIOD,
                ));
            }
            if tcp_rx.count() == 0 || udp_rx.count() == 0 {
                std::thread::sleep(Duration::from_millis(500));
            }
            Ok((tcp_rx.count() > 50 && udp_rx.count() > 50).then_some(()))
        });
        if let Err(e) = flowed {
            // An intermittent stall seen in CI: say how far each stream got and what the
            // nodes saw (peers, bytes each way, drops by reason), so the next one can be read.
            let status = |name: &str| {
                topo.status(name)
                    .map_or_else(|e| format!("no status: {e:#}"), |v| v.to_string())
            };
            let written = |tx: &Option<Sender>| tx.as_ref().map_or(0, Sender::written);
            panic!(
                "the allowed streams flow: {e:#}\n\
                 tcp: {} lines arrived, {} written by the last sender, which was started \
                 {tcp_starts} times; udp: {} lines arrived, {} written by the last sender, \
                 started {udp_starts} times\n\
                 web1 status: {}\ndb1 status: {}",
                tcp_rx.count(),
                written(&tcp_tx),
                udp_rx.count(),
                written(&udp_tx),
                status("web1"),
                status("db1"),
            );
        }
        let (Some(tcp_tx), Some(udp_tx)) = (tcp_tx, udp_tx) else {
            unreachable!("both senders were started before their streams flowed");
        };
        Streams {
            tcp_rx,
            udp_rx,
            tcp_tx,
            udp_tx,
        }
    }

    /// Whether the TCP stream is still the same connection and still carries data: its sender
    /// (one connection for its whole life) runs, and lines arrived after `t`.
    pub fn tcp_survived(&mut self, t: Instant) -> bool {
        let (tx, rx, since) = (
            self.tcp_tx.alive(),
            self.tcp_rx.alive(),
            self.tcp_rx.since(t),
        );
        if !(tx && rx && since > 0) {
            eprintln!(
                "tcp stream: sender running {tx}, receiver running {rx}, {since} lines since \
                 the mark, {} in all, the last {:?} ago",
                self.tcp_rx.count(),
                self.tcp_rx.last().map(|l| l.elapsed())
            );
        }
        tx && rx && since > 0
    }
}

/// web1 and db1 only.
pub fn specs() -> Vec<NodeSpec> {
    story_nodes()
        .into_iter()
        .filter(|s| s.name == "web1" || s.name == "db1")
        .collect()
}

/// Builds the two-node topology, optionally with a key life, enrolls both and applies
/// [`POLICY`].
pub fn two_nodes(key_ttl: Option<&str>) -> Topology {
    let mut topo = Topology::build(&specs()).expect("build the topology");
    topo.start_coordinator().expect("start the coordinator");
    topo.create_network().expect("create the network");
    if let Some(ttl) = key_ttl {
        let out = topo
            .ztnet(&["network", "set", NETWORK, "--key-ttl", ttl])
            .expect("ztnet network set --key-ttl");
        assert!(out.contains("key ttl"), "{out}");
    }
    for name in ["web1", "db1"] {
        let token = topo.token_for(name).expect("token");
        topo.start_node(name, Some(&token)).expect("start node");
    }
    topo.wait_online(&["web1", "db1"], Duration::from_secs(90))
        .expect("both nodes enroll and connect");
    topo.apply_policy(POLICY, &["web1", "db1"], Duration::from_secs(30))
        .expect("apply the policy");
    topo
}

/// An address as socat wants it.
pub fn host(a: IpAddr) -> String {
    match a {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Drops (or lets through again) a node's control traffic, in its own namespace.
pub fn block_control(ns: &Netns, block: bool) {
    let script = if block {
        format!(
            "nft add table inet ztrotate && \
             nft add chain inet ztrotate out '{{ type filter hook output priority 0 ; }}' && \
             nft add rule inet ztrotate out udp dport {COORDINATOR_PORT} drop && \
             nft add chain inet ztrotate in '{{ type filter hook input priority 0 ; }}' && \
             nft add rule inet ztrotate in udp sport {COORDINATOR_PORT} drop"
        )
    } else {
        "nft delete table inet ztrotate".to_string()
    };
    ns.sh(&script).expect("nft in the node's namespace");
}

/// The node's WireGuard public key, from its status.
pub fn public_key(topo: &Topology, name: &str) -> String {
    topo.status(name).expect("node status")["public_key"]
        .as_str()
        .expect("public key in status")
        .to_string()
}

/// The audit entries with this action and target.
pub fn audit(topo: &Topology, action: &str, target: &str) -> Vec<Value> {
    let all = topo
        .ztnet_json(&["audit", "--network", NETWORK])
        .expect("ztnet audit");
    all.as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["action"] == action && e["target"] == target)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// What a node's log says so far (its first run).
pub fn log(topo: &Topology, name: &str) -> String {
    std::fs::read_to_string(topo.dir.path().join(format!("{name}.1.log"))).unwrap_or_default()
}

/// The monotonic instant of a Unix time in seconds.
pub fn instant_of(unix: u64) -> Instant {
    let now_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    let at = Duration::from_secs(unix);
    let now = Instant::now();
    if at >= now_unix {
        now + (at - now_unix)
    } else {
        now - (now_unix - at)
    }
}

/// The key expiry of `peer` in the netmap `node` saved to its state directory.
pub fn peer_key_expiry(topo: &Topology, node: &str, peer: &str) -> Option<u64> {
    let path = topo.node(node).state_dir.join("netmap.json");
    let text = std::fs::read_to_string(path).ok()?;
    let map: Value = serde_json::from_str(&text).ok()?;
    map["peers"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == peer)?["key_expires_at"]
        .as_u64()
}
