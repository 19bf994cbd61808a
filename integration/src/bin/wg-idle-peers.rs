//! Stands in for many remote WireGuard machines in one process, for `bench/idle-peers.sh`
//! (FC-26's scale check): one boringtun `Tunn` and one UDP socket per peer, with persistent
//! keepalive, no traffic. Not a shipped component; it plays the far ends of one node under test.
//!
//! ```text
//! wg-idle-peers --count 200 --bind 192.0.2.2 --first-port 52000 \
//!     --node-key BASE64 --node 192.0.2.1:51820 --peers-toml peers.toml --stats stats.txt
//! ```
//!
//! It writes the `[[peer]]` blocks for the node's `node.toml` to `--peers-toml` (peer i at
//! `BIND:FIRST_PORT+i`, overlay address from 10.91.0.1 up, see [`overlay`]), then serves.
//! Every second it rewrites `--stats` with its running totals, one `name value` a line:
//! initiations received from the node and sent to it, responses, sessions up, and the
//! peer-seconds spent without a session.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

/// Largest datagram handled, with WireGuard's overhead.
const BUF: usize = 65_535 + 32;

#[derive(Default)]
struct Totals {
    inits_from_node: AtomicU64,
    inits_to_node: AtomicU64,
    responses_to_node: AtomicU64,
}

struct Peer {
    tunn: Mutex<Tunn>,
    socket: UdpSocket,
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let node_key = decode_key(args.get("--node-key").context("--node-key is required")?)?;
    let node: SocketAddr = args
        .get("--node")
        .context("--node is required")?
        .parse()
        .context("--node: not IP:PORT")?;
    let count: u32 = args.get("--count").map_or(Ok(200), |s| s.parse())?;
    let bind: IpAddr = args
        .get("--bind")
        .map_or(Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)), |s| s.parse())?;
    let first_port: u16 = args.get("--first-port").map_or(Ok(52_000), |s| s.parse())?;
    let keepalive: u16 = args.get("--keepalive").map_or(Ok(25), |s| s.parse())?;
    let peers_toml = args
        .get("--peers-toml")
        .context("--peers-toml is required")?;
    let stats = args
        .get("--stats")
        .context("--stats is required")?
        .to_string();
    if count == 0 || count > 60_000 || u32::from(first_port) + count > 65_535 {
        bail!("--count {count} from port {first_port} does not fit the port range");
    }

    let mut toml = String::new();
    let mut peers = Vec::new();
    for i in 0..count {
        let secret = StaticSecret::from(rand::random::<[u8; 32]>());
        let public = PublicKey::from(&secret);
        let port = first_port + i as u16;
        let socket =
            UdpSocket::bind((bind, port)).with_context(|| format!("bind {bind}:{port}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(500)))?;
        let tunn = Tunn::new(
            secret,
            PublicKey::from(node_key),
            None,
            Some(keepalive),
            i,
            None,
        );
        toml.push_str(&format!(
            "\n[[peer]]\nname = \"p{i}\"\npublic_key = \"{}\"\nendpoint = \"{bind}:{port}\"\n\
             allowed_ips = [\"{}/32\"]\npersistent_keepalive = {keepalive}\n",
            base64::engine::general_purpose::STANDARD.encode(public.as_bytes()),
            overlay(i)
        ));
        peers.push(Arc::new(Peer {
            tunn: Mutex::new(tunn),
            socket,
        }));
    }
    std::fs::write(peers_toml, toml).with_context(|| format!("write {peers_toml}"))?;

    let totals = Arc::new(Totals::default());
    for peer in &peers {
        let (peer, totals) = (peer.clone(), totals.clone());
        std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || receive(&peer, node, &totals))?;
    }

    // Timers every 100 ms; stats every second.
    let mut buf = vec![0u8; BUF];
    let mut next = Instant::now();
    let mut next_stats = Instant::now();
    // Peer-seconds without a session, counted once a second.
    let mut no_session_secs = 0u64;
    loop {
        let mut up = 0u64;
        for peer in &peers {
            let mut tunn = lock(&peer.tunn);
            if let TunnResult::WriteToNetwork(d) = tunn.update_timers(&mut buf) {
                if d.first() == Some(&1) {
                    totals.inits_to_node.fetch_add(1, Ordering::Relaxed);
                }
                let _ = peer.socket.send_to(d, node);
            }
            if tunn.time_since_last_handshake().is_some() {
                up += 1;
            }
        }
        if Instant::now() >= next_stats {
            next_stats += Duration::from_secs(1);
            no_session_secs += u64::from(count) - up;
            let mut text = HashMap::new();
            text.insert(
                "inits_from_node",
                totals.inits_from_node.load(Ordering::Relaxed),
            );
            text.insert(
                "inits_to_node",
                totals.inits_to_node.load(Ordering::Relaxed),
            );
            text.insert(
                "responses_to_node",
                totals.responses_to_node.load(Ordering::Relaxed),
            );
            text.insert("sessions_up", up);
            text.insert("no_session_peer_seconds", no_session_secs);
            let mut lines: Vec<String> = text.iter().map(|(k, v)| format!("{k} {v}")).collect();
            lines.sort();
            let tmp = format!("{stats}.tmp");
            std::fs::write(&tmp, lines.join("\n") + "\n")?;
            std::fs::rename(&tmp, &stats)?;
        }
        next += Duration::from_millis(100);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        } else {
            next = Instant::now();
        }
    }
}

/// One peer's receive loop: decapsulate what the node sends, answer it.
fn receive(peer: &Peer, node: SocketAddr, totals: &Totals) {
    let mut datagram = vec![0u8; BUF];
    let mut buf = vec![0u8; BUF];
    loop {
        let Ok((n, from)) = peer.socket.recv_from(&mut datagram) else {
            continue;
        };
        if datagram.first() == Some(&1) {
            totals.inits_from_node.fetch_add(1, Ordering::Relaxed);
        }
        let mut tunn = lock(&peer.tunn);
        let mut result = tunn.decapsulate(Some(from.ip()), &datagram[..n], &mut buf);
        while let TunnResult::WriteToNetwork(d) = result {
            match d.first() {
                Some(&1) => totals.inits_to_node.fetch_add(1, Ordering::Relaxed),
                Some(&2) => totals.responses_to_node.fetch_add(1, Ordering::Relaxed),
                _ => 0,
            };
            let _ = peer.socket.send_to(d, node);
            result = tunn.decapsulate(None, &[], &mut buf);
        }
    }
}

/// Overlay address of peer `i`: 10.91.0.1 upwards, skipping .0 and .255.
fn overlay(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 91, (i / 254) as u8, (i % 254 + 1) as u8)
}

fn decode_key(s: &str) -> Result<[u8; 32]> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .context("--node-key: not base64")?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("--node-key: not 32 bytes"))
}

fn parse_args() -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if !flag.starts_with("--") {
            bail!("unexpected argument {flag}");
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        out.insert(flag, value);
    }
    Ok(out)
}

/// Locks a mutex, going on if a thread panicked holding it (a `Tunn` stays usable).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
