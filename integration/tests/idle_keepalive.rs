//! FC-26: idle sessions held open by persistent keepalive. Needs root; each test takes about
//! 3 minutes, and they run side by side.
//!
//! - Two idle static nodes with persistent keepalive 25 s, started together, run past one
//!   full session expiry (180 s; `ZTNET_IDLE_SECS` runs it longer). Counts the handshake
//!   initiations each sends (from the status JSON) and checks that the pair keeps to one
//!   handshake per rekey period, that the session never lapses, and that a ping afterwards
//!   gets through at once.
//! - One node whose session a stock boringtun peer (the `wg-idle-peers` stand-in) initiated:
//!   the node rekeys it itself before it lapses.
//!
//! Layout: two namespaces joined by one veth pair (underlay 192.0.2.1-2/24), overlay
//! 10.90.0.1-2/16 (10.91.0.0/16 with the stand-in) on the TUN.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;
use ztnet_integration::topology::ping;
use ztnet_integration::{Netns, Proc, bin, make_key, require_root, unique, veth, wait_for};

const WG_PORT: u16 = 51820;

const POLICY: &str = r#"
[[grant]]
from = ["node:n1", "node:n2"]
to = ["node:n1", "node:n2"]
ports = ["icmp"]
"#;

/// One node: its namespace, interface name and daemon. Drops the daemon before the
/// namespace.
struct Node {
    name: &'static str,
    iface: String,
    proc: Option<Proc>,
    ns: Netns,
}

impl Node {
    fn status(&self) -> Result<Value> {
        let path = Path::new("/var/run/ztnet").join(format!("{}.sock", self.iface));
        let mut s = UnixStream::connect(&path).with_context(|| format!("{}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"status\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(serde_json::from_str(&text)?)
    }

    /// (initiations sent, received, held, session up) for its one peer.
    fn counts(&self) -> Result<Counts> {
        let st = self.status()?;
        let peer = &st["peers"][0];
        let n = |k: &str| peer[k].as_u64().context(format!("no {k} in status"));
        Ok(Counts {
            sent: n("initiations_sent")?,
            received: n("initiations_received")?,
            held: n("initiations_held")?,
            up: !peer["last_handshake"].is_null(),
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            if std::thread::panicking() {
                eprintln!("----- {} -----\n{}", self.name, p.log());
            }
            p.stop(Duration::from_secs(5));
        }
        // A killed daemon leaves its sockets; the names are this test's own.
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.iface));
        let _ = std::fs::remove_file(format!("/var/run/ztnet/{}.sock", self.iface));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    sent: u64,
    received: u64,
    held: u64,
    up: bool,
}

fn config(dir: &Path, me: usize, iface: &str, peer_key: &str) -> Result<PathBuf> {
    let (i, other) = (me + 1, 2 - me);
    let text = format!(
        "[interface]\nname = \"{iface}\"\nprivate_key_file = \"n{i}.key\"\n\
         addresses = [\"10.90.0.{i}/16\"]\nlisten_port = {WG_PORT}\n\
         policy_file = \"policy.toml\"\n\n[identity]\nname = \"n{i}\"\n\n\
         [[peer]]\nname = \"n{other}\"\npublic_key = \"{peer_key}\"\n\
         endpoint = \"192.0.2.{other}:{WG_PORT}\"\nallowed_ips = [\"10.90.0.{other}/32\"]\n\
         persistent_keepalive = 25\n"
    );
    let path = dir.join(format!("n{i}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

#[test]
fn idle_keepalive_peers_keep_one_session_past_expiry_without_a_storm() {
    require_root();
    let secs: u64 = std::env::var("ZTNET_IDLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200)
        .max(190);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("policy.toml"), POLICY).expect("policy");
    let keys: Vec<String> = (1..=2)
        .map(|i| make_key(&dir.path().join(format!("n{i}.key"))).expect("key"))
        .collect();
    let mut nodes: Vec<Node> = ["n1", "n2"]
        .into_iter()
        .map(|name| Node {
            name,
            iface: unique("ztk"),
            proc: None,
            ns: Netns::new("ztkn").expect("netns"),
        })
        .collect();
    veth(&nodes[0].ns, "u0", &nodes[1].ns, "u0").expect("veth");
    for (i, n) in nodes.iter().enumerate() {
        n.ns.ip(&["addr", "add", &format!("192.0.2.{}/24", i + 1), "dev", "u0"])
            .expect("address");
    }

    // Started together: both first handshakes go out on their first timer tick.
    for i in 0..2 {
        let cfg = config(dir.path(), i, &nodes[i].iface, &keys[1 - i]).expect("config");
        let log = dir.path().join(format!("n{}.log", i + 1));
        let mut cmd = nodes[i].ns.command(bin("ztnet-node"));
        cmd.arg("--config").arg(cfg).env("RUST_LOG", "info");
        nodes[i].proc = Some(Proc::spawn(cmd, &log).expect("spawn"));
    }
    let start = Instant::now();
    wait_for("both sessions up", Duration::from_secs(15), || {
        let a = nodes[0].counts()?;
        let b = nodes[1].counts()?;
        Ok((a.up && b.up).then_some(()))
    })
    .expect("first handshake");
    // Every start-up initiation (one each when they cross) went out before both were up.
    let settle = start.elapsed();
    let base: Vec<Counts> = nodes.iter().map(|n| n.counts().expect("status")).collect();
    eprintln!(
        "start-up: sessions up after {settle:?}; n1 {:?}, n2 {:?}",
        base[0], base[1]
    );

    // No traffic: sample once a second, record every initiation and any lapse of the session.
    let mut last = base.clone();
    let mut events: Vec<(Duration, usize, u64)> = Vec::new();
    let mut lapses: Vec<(Duration, usize)> = Vec::new();
    let until = start + Duration::from_secs(secs);
    let mut next = Instant::now();
    while Instant::now() < until {
        next += Duration::from_secs(1);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        for (i, n) in nodes.iter().enumerate() {
            let c = n.counts().expect("status");
            if c.sent > last[i].sent {
                events.push((start.elapsed(), i, c.sent - last[i].sent));
            }
            if !c.up {
                lapses.push((start.elapsed(), i));
            }
            last[i] = c;
        }
    }
    let elapsed = start.elapsed();
    for (t, i, k) in &events {
        eprintln!(
            "t={:>6.1}s n{} sent {k} initiation(s)",
            t.as_secs_f64(),
            i + 1
        );
    }
    // Counts per 3-minute window, both nodes together.
    let mut t0 = 0;
    while t0 < elapsed.as_secs() {
        let w: u64 = events
            .iter()
            .filter(|(t, _, _)| (t0..t0 + 180).contains(&t.as_secs()))
            .map(|(_, _, k)| k)
            .sum();
        eprintln!(
            "window {t0}-{} s: {w} initiation(s) across the pair",
            t0 + 180
        );
        t0 += 180;
    }
    eprintln!(
        "after {:.0} s: n1 {:?}, n2 {:?} (start-up excluded: {} initiations)",
        elapsed.as_secs_f64(),
        last[0],
        last[1],
        events.iter().map(|e| e.2).sum::<u64>()
    );

    // At most one handshake per rekey period (120 s) across the pair after start-up.
    let idle = elapsed.saturating_sub(settle);
    let bound = idle.as_secs().div_ceil(120);
    let total: u64 = events.iter().map(|e| e.2).sum();
    assert!(
        total <= bound,
        "{total} initiations in {idle:?} idle across the pair, bound {bound}: {events:?}"
    );
    // The session was renewed before its 180 s expiry, so it never lapsed.
    assert!(
        total >= 1,
        "no rekey in {idle:?}: the session must have lapsed"
    );
    assert!(lapses.is_empty(), "the session lapsed: {lapses:?}");
    // Two initiations close together would be a crossing (both sides at once).
    for w in events.windows(2) {
        assert!(
            w[1].0 - w[0].0 > Duration::from_secs(60),
            "initiations {:?} and {:?} are close together",
            w[0],
            w[1]
        );
    }

    // One ping, now: it needs no handshake, so the first echo comes back.
    let sent_before: u64 = nodes.iter().map(|n| n.counts().expect("status").sent).sum();
    let t = Instant::now();
    let ok = ping(&nodes[0].ns, IpAddr::from([10, 90, 0, 2])).expect("ping");
    let rtt = t.elapsed();
    let sent_after: u64 = nodes.iter().map(|n| n.counts().expect("status").sent).sum();
    eprintln!(
        "ping after {:.0} s idle: {ok} in {rtt:?}; initiations during it: {}",
        elapsed.as_secs_f64(),
        sent_after - sent_before
    );
    assert!(ok, "the first ping after the idle period was lost");
    assert!(rtt < Duration::from_secs(1), "ping took {rtt:?}");
}

/// Rule 2 of `node/src/dataplane/rekey.rs`: a stock boringtun peer initiates the session and,
/// idle, never rekeys it; the node, which only answered, rekeys it itself at 150-160 s, so the
/// session does not lapse at 180 s. The peer is the `wg-idle-peers` stand-in with one peer.
#[test]
fn a_node_that_only_answered_rekeys_an_idle_session_its_peer_would_let_lapse() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let node_key = make_key(&dir.path().join("n1.key")).expect("key");
    let node = Node {
        name: "n1",
        iface: unique("ztk"),
        proc: None,
        ns: Netns::new("ztkn").expect("netns"),
    };
    let far = Netns::new("ztkp").expect("netns");
    veth(&node.ns, "u0", &far, "u0").expect("veth");
    node.ns
        .ip(&["addr", "add", "192.0.2.1/24", "dev", "u0"])
        .expect("address");
    far.ip(&["addr", "add", "192.0.2.2/24", "dev", "u0"])
        .expect("address");

    // The stand-in's keepalive (1 s) starts the handshake as soon as it runs.
    let peers = dir.path().join("peers.toml");
    let stats = dir.path().join("stats.txt");
    let mut cmd = far.command(bin("wg-idle-peers"));
    cmd.args([
        "--count",
        "1",
        "--bind",
        "192.0.2.2",
        "--first-port",
        "52000",
    ])
    .args(["--node-key", &node_key, "--node", "192.0.2.1:51820"])
    .args(["--keepalive", "1", "--peers-toml"])
    .arg(&peers)
    .arg("--stats")
    .arg(&stats);
    let _peer = Proc::spawn(cmd, &dir.path().join("peer.log")).expect("stand-in");
    let block = wait_for("the stand-in's peer block", Duration::from_secs(15), || {
        Ok(std::fs::read_to_string(&peers)
            .ok()
            .filter(|s| !s.is_empty()))
    })
    .expect("peers.toml");
    // No endpoint on the node's side: it can only answer.
    let block: String = block
        .lines()
        .filter(|l| !l.starts_with("endpoint") && !l.starts_with("persistent_keepalive"))
        .map(|l| format!("{l}\n"))
        .collect();
    let config = dir.path().join("n1.toml");
    std::fs::write(
        &config,
        format!(
            "[interface]\nname = \"{}\"\nprivate_key_file = \"n1.key\"\n\
             addresses = [\"10.91.255.254/16\"]\nlisten_port = {WG_PORT}\n\n\
             [identity]\nname = \"n1\"\n{block}persistent_keepalive = 25\n",
            node.iface
        ),
    )
    .expect("config");
    let mut node = node;
    let mut cmd = node.ns.command(bin("ztnet-node"));
    cmd.arg("--config").arg(&config).env("RUST_LOG", "info");
    node.proc = Some(Proc::spawn(cmd, &dir.path().join("n1.log")).expect("spawn"));

    let up_at = wait_for("the stand-in's session", Duration::from_secs(20), || {
        Ok(node.counts().ok().filter(|c| c.up).map(|_| Instant::now()))
    })
    .expect("session");
    let first = node.counts().expect("status");
    eprintln!("session up; node {first:?}");
    assert_eq!(first.sent, 0, "the node has no endpoint to initiate to");

    // Until 175 s into the session: the node's own initiations, and any lapse.
    let mut rekeys = Vec::new();
    let mut lapses = Vec::new();
    let mut last = first;
    let mut next = Instant::now();
    while up_at.elapsed() < Duration::from_secs(175) {
        next += Duration::from_secs(1);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let c = node.counts().expect("status");
        if c.sent > last.sent {
            rekeys.push(up_at.elapsed());
        }
        if !c.up {
            lapses.push(up_at.elapsed());
        }
        last = c;
    }
    let peer_stats = std::fs::read_to_string(&stats).unwrap_or_default();
    eprintln!(
        "node initiations at {rekeys:?} into the session; node {last:?}; stand-in: {}",
        peer_stats.replace('\n', ", ")
    );
    assert_eq!(rekeys.len(), 1, "one rekey by the node: {rekeys:?}");
    let at = rekeys[0].as_secs_f64();
    assert!(
        (149.0..163.0).contains(&at),
        "the node rekeyed {at:.1} s into the session, not at 150-160 s"
    );
    assert!(lapses.is_empty(), "the session lapsed at {lapses:?}");
    assert!(
        peer_stats.contains("inits_to_node 1\n"),
        "the stand-in initiated once only: {peer_stats}"
    );
}
