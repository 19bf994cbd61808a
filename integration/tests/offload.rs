//! TUN offloads end to end: two nodes in their own namespaces on one veth pair, bulk TCP both
//! ways checked byte for byte, with the offloads on (super-packets read from and written to
//! the TUN, as the TUN's own packet counters show) and off (`ZTNET_TUN_OFFLOAD=off`). While
//! the bulk flows run, a port the receiver's policy does not grant stays closed, although the
//! sender's own filter lets everything out. The TUN's two queues (and one, with
//! `ZTNET_TUN_QUEUES=1`) carry the replies of every UDP flow and of ping, whichever queue the
//! kernel steers them to. Needs root.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use ztnet_integration::topology::{ping, tcp_echo};
use ztnet_integration::{Netns, Proc, bin, make_key, require_root, unique, veth, wait_for};

/// n1 is compromised: its filter lets everything out.
const ALLOW_ALL: &str = "[[grant]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"any\"]\n";

/// n2's view: n1 may ping it and open tcp:5001, tcp:5003 and udp:5007; n2 may ping n1 and
/// send to its udp:5008; nothing else.
const N2_POLICY: &str = "[[grant]]\nfrom = [\"node:n1\"]\nto = [\"node:n2\"]\n\
                         ports = [\"icmp\", \"tcp:5001\", \"tcp:5003\", \"udp:5007\"]\n\n\
                         [[grant]]\nfrom = [\"node:n2\"]\nto = [\"node:n1\"]\n\
                         ports = [\"icmp\", \"udp:5008\"]\n";

/// Bytes moved each way.
const SIZE: usize = 24 << 20;

struct Side {
    iface: String,
    proc: Option<Proc>,
    helpers: Vec<Proc>,
    ns: Netns,
}

/// Fields drop in order: processes and namespaces, then the files.
struct Pair {
    sides: Vec<Side>,
    dir: tempfile::TempDir,
}

impl Pair {
    fn start(offload: bool) -> Result<Pair> {
        Pair::start_with(offload, &[])
    }

    /// Like [`Pair::start`], with `env` set for both daemons.
    fn start_with(offload: bool, env: &[(&str, &str)]) -> Result<Pair> {
        require_root();
        let dir = tempfile::tempdir()?;
        let a = Netns::new("ztoa")?;
        let b = Netns::new("ztob")?;
        veth(&a, "u0", &b, "u0")?;
        a.ip(&["addr", "add", "192.0.2.1/24", "dev", "u0"])?;
        b.ip(&["addr", "add", "192.0.2.2/24", "dev", "u0"])?;
        let mut sides: Vec<Side> = [a, b]
            .into_iter()
            .map(|ns| Side {
                iface: unique("zto"),
                proc: None,
                helpers: vec![],
                ns,
            })
            .collect();
        let mut keys = Vec::new();
        for i in 1..=2 {
            keys.push(make_key(&dir.path().join(format!("n{i}.key")))?);
        }
        std::fs::write(dir.path().join("n1.policy.toml"), ALLOW_ALL)?;
        std::fs::write(dir.path().join("n2.policy.toml"), N2_POLICY)?;
        for i in 1..=2usize {
            let peer = 3 - i;
            let config = format!(
                "[interface]\nname = \"{iface}\"\nprivate_key_file = \"n{i}.key\"\n\
                 addresses = [\"10.91.0.{i}/24\"]\nlisten_port = 51820\n\
                 policy_file = \"n{i}.policy.toml\"\n\n\
                 [identity]\nname = \"n{i}\"\nnamespace = \"test\"\n\n\
                 [[peer]]\nname = \"n{peer}\"\npublic_key = \"{key}\"\n\
                 endpoint = \"192.0.2.{peer}:51820\"\nallowed_ips = [\"10.91.0.{peer}/32\"]\n\
                 namespace = \"test\"\n",
                iface = sides[i - 1].iface,
                key = keys[peer - 1],
            );
            let path = dir.path().join(format!("n{i}.toml"));
            std::fs::write(&path, config)?;
            let mut cmd = sides[i - 1].ns.command(bin("ztnet-node"));
            cmd.arg("--config").arg(&path).env("RUST_LOG", "info");
            if !offload {
                cmd.env("ZTNET_TUN_OFFLOAD", "off");
            }
            cmd.envs(env.iter().copied());
            let log = dir.path().join(format!("n{i}.log"));
            sides[i - 1].proc = Some(Proc::spawn(cmd, &log)?);
        }
        let pair = Pair { sides, dir };
        for i in 0..2 {
            wait_for("the status socket", Duration::from_secs(15), || {
                Ok(pair.status(i).ok())
            })?;
        }
        Ok(pair)
    }

    fn status(&self, i: usize) -> Result<Value> {
        let path = Path::new("/var/run/ztnet").join(format!("{}.sock", self.sides[i].iface));
        let mut s = UnixStream::connect(&path).with_context(|| format!("{}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"status\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(serde_json::from_str(&text)?)
    }

    fn drops(&self, i: usize, reason: &str) -> u64 {
        self.status(i)
            .ok()
            .and_then(|s| s["drops"][reason].as_u64())
            .unwrap_or(0)
    }

    fn log(&self, i: usize) -> String {
        let path = self.dir.path().join(format!("n{}.log", i + 1));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Packets and bytes through the TUN of side `i`: (tx packets, tx bytes, rx packets, rx
    /// bytes). The kernel counts one per buffer, so a super-packet counts once.
    fn tun_counters(&self, i: usize) -> Result<[u64; 4]> {
        let s = &self.sides[i];
        let out = s.ns.ip(&["-s", "-j", "link", "show", "dev", &s.iface])?;
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let stats = &v[0]["stats64"];
        let get = |dir: &str, what: &str| stats[dir][what].as_u64().unwrap_or(0);
        Ok([
            get("tx", "packets"),
            get("tx", "bytes"),
            get("rx", "packets"),
            get("rx", "bytes"),
        ])
    }

    fn spawn(&mut self, i: usize, script: &str, log: &str) -> Result<()> {
        let log = self.path(log);
        let p = self.sides[i].ns.spawn("sh", &["-c", script], &log)?;
        self.sides[i].helpers.push(p);
        Ok(())
    }

    fn wait_listen(&self, i: usize, port: u16) -> Result<()> {
        let check = format!("ss -Hltn 'sport = :{port}' | grep -q LISTEN");
        wait_for("a listener", Duration::from_secs(10), || {
            Ok(self.sides[i].ns.sh(&check).ok().map(drop))
        })
    }

    /// The TUN's queue count as the kernel reports it (`ip -d link`): 1 when single-queue.
    fn tun_queues(&self, i: usize) -> Result<u64> {
        let s = &self.sides[i];
        let out = s.ns.ip(&["-d", "-j", "link", "show", "dev", &s.iface])?;
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let data = &v[0]["linkinfo"]["info_data"];
        if data["multi_queue"].as_bool() != Some(true) {
            return Ok(1);
        }
        data["numqueues"].as_u64().context("numqueues")
    }

    fn dump(&self) {
        for i in 0..2 {
            eprintln!("----- n{} -----\n{}", i + 1, self.log(i));
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        for s in &mut self.sides {
            for mut h in s.helpers.drain(..) {
                h.stop(Duration::from_secs(5));
            }
            if let Some(mut p) = s.proc.take() {
                p.stop(Duration::from_secs(5));
            }
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", s.iface));
            let _ = std::fs::remove_file(format!("/var/run/ztnet/{}.sock", s.iface));
        }
    }
}

/// Bytes that no two runs of a broken offload would get right by chance.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Moves SIZE bytes n1 -> n2 (n1 sends) and n2 -> n1 (n2 sends on a flow n1 opened), tries
/// the ungranted tcp:5002 while both run, and checks every byte.
fn bulk_both_ways(offload: bool) -> Pair {
    let mut p = Pair::start(offload).expect("two nodes");
    let n2 = IpAddr::from([10, 91, 0, 2]);
    wait_for("ping n1 -> n2", Duration::from_secs(15), || {
        Ok(ping(&p.sides[0].ns, n2)?.then_some(()))
    })
    .expect("the tunnel comes up");
    let data = pattern(SIZE);
    std::fs::write(p.path("src"), &data).expect("source file");
    let (src, up, down) = (p.path("src"), p.path("up"), p.path("down"));

    p.spawn(
        1,
        &format!("socat -u TCP-LISTEN:5001,reuseaddr CREATE:{}", up.display()),
        "sink.log",
    )
    .expect("sink");
    p.spawn(
        1,
        &format!("socat -u FILE:{} TCP-LISTEN:5003,reuseaddr", src.display()),
        "source.log",
    )
    .expect("source");
    p.wait_listen(1, 5001).expect("sink listens");
    p.wait_listen(1, 5003).expect("source listens");
    let send = format!("timeout 60 socat -u FILE:{} TCP:{n2}:5001", src.display());
    let fetch = format!(
        "timeout 60 socat -u TCP:{n2}:5003 CREATE:{}",
        down.display()
    );
    p.spawn(0, &send, "send.log").expect("sender");
    p.spawn(0, &fetch, "fetch.log").expect("fetcher");

    let denied = tcp_echo(&p.sides[0].ns, n2, 5002, "not granted").expect("tcp");
    let size_of = |f: &Path| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
    wait_for("both transfers", Duration::from_secs(60), || {
        Ok([&up, &down]
            .iter()
            .all(|f| size_of(f) >= SIZE as u64)
            .then_some(()))
    })
    .expect("transfers finish");

    assert!(!denied, "tcp:5002 is not granted by n2");
    assert!(
        p.drops(1, "inbound-no-rule") >= 1,
        "n2's inbound filter dropped the ungranted SYN"
    );
    for (name, f) in [("n1 -> n2", &up), ("n2 -> n1", &down)] {
        let got = std::fs::read(f).expect("received file");
        assert_eq!(got.len(), data.len(), "{name}: length");
        let first_bad = got.iter().zip(&data).position(|(a, b)| a != b);
        assert_eq!(first_bad, None, "{name}: every byte as sent");
    }
    p
}

#[test]
fn bulk_tcp_with_tun_offloads_arrives_byte_for_byte_and_the_filter_still_holds() {
    let p = bulk_both_ways(true);

    for i in 0..2 {
        assert!(
            p.log(i).contains("TUN offloads enabled") && p.log(i).contains("tso4"),
            "{}",
            p.log(i)
        );
    }
    // n1 sends: its TUN hands over super-packets (tx), and n1 joins the stream coming back
    // from n2 into super-packets it writes (rx). The same holds for n2.
    for i in 0..2 {
        let [txp, txb, rxp, rxb] = p.tun_counters(i).expect("counters");
        assert!(
            txb / txp.max(1) > 2000,
            "n{}: TSO reads: {txp} packets, {txb} bytes",
            i + 1
        );
        assert!(
            rxb / rxp.max(1) > 2000,
            "n{}: joined writes: {rxp} packets, {rxb} bytes",
            i + 1
        );
    }
}

#[test]
fn bulk_tcp_without_tun_offloads_still_arrives_byte_for_byte() {
    let p = bulk_both_ways(false);

    for i in 0..2 {
        assert!(p.log(i).contains("TUN offloads off"), "{}", p.log(i));
        let [txp, txb, rxp, rxb] = p.tun_counters(i).expect("counters");
        assert!(
            txb / txp.max(1) <= 1420,
            "n{}: {txp} packets, {txb} bytes",
            i + 1
        );
        assert!(
            rxb / rxp.max(1) <= 1420,
            "n{}: {rxp} packets, {rxb} bytes",
            i + 1
        );
    }
}

/// Source ports each side sends from: with two queues the kernel steers the first packet of a
/// flow by its hash, so a few dozen flows land on both.
const FLOWS: u16 = 24;

/// UDP request and reply on FLOWS flows each way, answered by a forked userspace echo server
/// (so each reply comes after the receiving thread went back to waiting), and ping each way.
fn replies_of_every_flow(p: &mut Pair) {
    let n = [IpAddr::from([10, 91, 0, 1]), IpAddr::from([10, 91, 0, 2])];
    wait_for("ping n1 -> n2", Duration::from_secs(15), || {
        Ok(ping(&p.sides[0].ns, n[1])?.then_some(()))
    })
    .expect("the tunnel comes up");
    assert!(ping(&p.sides[1].ns, n[0]).expect("ping"), "n2 pings n1");
    // n2 serves udp:5007 for n1, n1 serves udp:5008 for n2.
    for (side, port) in [(1, 5007), (0, 5008)] {
        p.spawn(
            side,
            &format!("socat UDP4-RECVFROM:{port},fork EXEC:cat"),
            &format!("udp{port}.log"),
        )
        .expect("udp echo server");
    }
    for (side, port) in [(1, 5007), (0, 5008)] {
        let check = format!("ss -Hlun 'sport = :{port}' | grep -q {port}");
        wait_for("a UDP listener", Duration::from_secs(10), || {
            Ok(p.sides[side].ns.sh(&check).ok().map(drop))
        })
        .expect("listens");
    }
    for (from, to, port, base) in [(0, 1, 5007, 41000u16), (1, 0, 5008, 42000u16)] {
        // Every flow at once, each waiting up to 3 s for its echo.
        let script = format!(
            "for s in $(seq {base} {last}); do (echo q$s | timeout 5 socat -T 3 -t 3 - \
             UDP4:{dst}:{port},sourceport=$s | grep -q q$s && echo ok$s) & done; wait",
            last = base + FLOWS - 1,
            dst = n[to],
        );
        let out = p.sides[from].ns.sh(&script).expect("udp flows");
        let answered = (base..base + FLOWS)
            .filter(|s| out.lines().any(|l| l == format!("ok{s}")))
            .count();
        assert_eq!(
            answered,
            usize::from(FLOWS),
            "n{} -> n{}: every UDP flow got its echo: {out}",
            from + 1,
            to + 1
        );
    }
    let denied = tcp_echo(&p.sides[0].ns, n[1], 5002, "not granted").expect("tcp");
    assert!(!denied, "tcp:5002 stays closed");
}

#[test]
fn two_tun_queues_carry_the_replies_of_every_flow() {
    let mut p = Pair::start(true).expect("two nodes");
    for i in 0..2 {
        assert_eq!(
            p.tun_queues(i).expect("queues"),
            2,
            "n{}: two queues",
            i + 1
        );
    }
    replies_of_every_flow(&mut p);
}

#[test]
fn one_tun_queue_when_asked_still_carries_every_flow() {
    let mut p = Pair::start_with(true, &[("ZTNET_TUN_QUEUES", "1")]).expect("two nodes");
    for i in 0..2 {
        assert_eq!(p.tun_queues(i).expect("queues"), 1, "n{}: one queue", i + 1);
    }
    replies_of_every_flow(&mut p);
}
