//! Plain WireGuard mode (`ztnet-node wg IFACE`) configured with the stock `wg`, in network
//! namespaces made by each test: the behaviours WireGuard's own netns test checks, written
//! from the behaviour. Needs root.
//!
//! Layout: namespaces `a` and `b` joined by a veth `v0` (underlay 10.77.0.0/24 and fd77::/64),
//! each with a `ztnet-node wg` interface (overlay 192.168.241.0/24 and fd00::/64). The NAT test
//! puts a router namespace between them instead.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ztnet_integration::{Netns, bin, require_root, run, unique, veth, wait_for};

/// A `ztnet-node wg` interface: its name, keys, and the namespace it was started in. The
/// daemon ends with its namespace; its sockets are removed on drop in any case.
struct Iface {
    name: String,
    key_file: PathBuf,
    public_key: String,
    log: PathBuf,
}

impl Drop for Iface {
    fn drop(&mut self) {
        let _ = fs::remove_file(format!("/var/run/wireguard/{}.sock", self.name));
        let _ = fs::remove_file(format!("/var/run/ztnet/{}.sock", self.name));
    }
}

/// Makes a private key file in `dir`; returns its path and the public key.
fn keypair(dir: &Path, name: &str) -> Result<(PathBuf, String)> {
    let key = run("wg", &["genkey"])?.stdout;
    let path = dir.join(format!("{name}.key"));
    fs::write(&path, &key)?;
    let public = pubkey(&key)?;
    Ok((path, public))
}

fn pubkey(private: &[u8]) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run wg pubkey")?;
    child
        .stdin
        .take()
        .context("stdin is piped")?
        .write_all(private)?;
    let out = child.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Starts `ztnet-node wg` in `ns`; returns once the daemon reports the interface ready.
fn start(ns: &Netns, dir: &Path, prefix: &str) -> Result<Iface> {
    let name = unique(prefix);
    let (key_file, public_key) = keypair(dir, &name)?;
    let log = dir.join(format!("{name}.log"));
    let node = bin("ztnet-node");
    let log_arg = log.to_string_lossy().into_owned();
    ns.exec(
        &node.to_string_lossy(),
        &["wg", &name, "--log-file", &log_arg],
    )?;
    Ok(Iface {
        name,
        key_file,
        public_key,
        log,
    })
}

/// `wg ARGS` on the host (the UAPI socket is on the shared file system).
fn wg(args: &[&str]) -> Result<String> {
    Ok(String::from_utf8_lossy(&run("wg", args)?.stdout).into_owned())
}

/// What `wg show IFACE endpoints` says for the one peer.
fn endpoint_of(iface: &Iface) -> Result<String> {
    let out = wg(&["show", &iface.name, "endpoints"])?;
    Ok(out
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string())
}

/// Two namespaces joined by a veth `v0`, a `ztnet-node wg` interface in each, configured as
/// each other's peer (no endpoints yet) with their overlay addresses up. Fields drop in
/// order: interfaces' sockets, namespaces (and the daemons in them), files.
struct Pair {
    wa: Iface,
    wb: Iface,
    a: Netns,
    b: Netns,
    dir: tempfile::TempDir,
}

impl Pair {
    fn new() -> Result<Pair> {
        require_root();
        let dir = tempfile::tempdir()?;
        let a = Netns::new("zwa")?;
        let b = Netns::new("zwb")?;
        veth(&a, "v0", &b, "v0")?;
        for (ns, i) in [(&a, 1), (&b, 2)] {
            ns.ip(&["addr", "add", &format!("10.77.0.{i}/24"), "dev", "v0"])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("fd77::{i}/64"),
                "dev",
                "v0",
                "nodad",
            ])?;
        }
        let wa = start(&a, dir.path(), "zwa")?;
        let wb = start(&b, dir.path(), "zwb")?;
        let pair = Pair { wa, wb, a, b, dir };
        pair.configure()?;
        Ok(pair)
    }

    fn configure(&self) -> Result<()> {
        for (me, other, ns, i, j, port) in [
            (&self.wa, &self.wb, &self.a, 1, 2, "10000"),
            (&self.wb, &self.wa, &self.b, 2, 1, "20000"),
        ] {
            let key = me.key_file.to_string_lossy().into_owned();
            let allowed = format!("192.168.241.{j}/32,fd00::{j}/128");
            wg(&[
                "set",
                &me.name,
                "private-key",
                &key,
                "listen-port",
                port,
                "peer",
                &other.public_key,
                "allowed-ips",
                &allowed,
            ])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("192.168.241.{i}/24"),
                "dev",
                &me.name,
            ])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("fd00::{i}/64"),
                "dev",
                &me.name,
                "nodad",
            ])?;
            ns.ip(&["link", "set", &me.name, "up"])?;
        }
        Ok(())
    }

    fn logs(&self) -> String {
        format!(
            "--- a ---\n{}\n--- b ---\n{}",
            fs::read_to_string(&self.wa.log).unwrap_or_default(),
            fs::read_to_string(&self.wb.log).unwrap_or_default()
        )
    }
}

/// One ping from `ns` to `to` that must be answered within a few retries (the first may wait
/// for the handshake).
fn ping_ok(ns: &Netns, to: &str, extra: &[&str]) -> Result<()> {
    wait_for(&format!("a ping to {to}"), Duration::from_secs(10), || {
        let mut args = vec!["-n", "-c", "1", "-W", "1"];
        args.extend_from_slice(extra);
        args.push(to);
        Ok(ns.output("ping", &args)?.status.success().then_some(()))
    })
}

/// One ping that must go unanswered.
fn ping_fails(ns: &Netns, to: &str) -> Result<bool> {
    Ok(!ns
        .output("ping", &["-n", "-c", "1", "-W", "1", to])?
        .status
        .success())
}

#[test]
fn peers_roam_in_both_families_and_follow_a_new_listen_port() -> Result<()> {
    let p = Pair::new()?;
    wg(&[
        "set",
        &p.wa.name,
        "peer",
        &p.wb.public_key,
        "endpoint",
        "10.77.0.2:20000",
    ])?;

    ping_ok(&p.a, "192.168.241.2", &[]).context(p.logs())?;
    assert_eq!(endpoint_of(&p.wb)?, "10.77.0.1:10000");

    // a moves to another port and to IPv6: b learns the new endpoint from a's packets.
    wg(&["set", &p.wa.name, "listen-port", "9998"])?;
    wg(&[
        "set",
        &p.wa.name,
        "peer",
        &p.wb.public_key,
        "endpoint",
        "[fd77::2]:20000",
    ])?;
    ping_ok(&p.a, "fd00::2", &[]).context(p.logs())?;
    assert_eq!(endpoint_of(&p.wb)?, "[fd77::1]:9998");
    assert!(wg(&["show", &p.wa.name, "listen-port"])?.trim() == "9998");

    // And back to IPv4 from yet another port.
    wg(&["set", &p.wa.name, "listen-port", "9999"])?;
    wg(&[
        "set",
        &p.wa.name,
        "peer",
        &p.wb.public_key,
        "endpoint",
        "10.77.0.2:20000",
    ])?;
    ping_ok(&p.a, "192.168.241.2", &[]).context(p.logs())?;
    assert_eq!(endpoint_of(&p.wb)?, "10.77.0.1:9999");
    Ok(())
}

#[test]
fn a_more_specific_peer_takes_the_address_and_gives_it_back_when_removed() -> Result<()> {
    let p = Pair::new()?;
    wg(&[
        "set",
        &p.wa.name,
        "peer",
        &p.wb.public_key,
        "endpoint",
        "10.77.0.2:20000",
    ])?;
    wg(&[
        "set",
        &p.wa.name,
        "peer",
        &p.wb.public_key,
        "allowed-ips",
        "192.168.241.0/24",
    ])?;
    ping_ok(&p.b, "192.168.241.1", &[]).context(p.logs())?;

    let other = pubkey(&run("wg", &["genkey"])?.stdout)?;
    wg(&[
        "set",
        &p.wa.name,
        "peer",
        &other,
        "allowed-ips",
        "192.168.241.2/32",
    ])?;
    // b's packets still authenticate (its new port is learnt) but their source now belongs
    // to the other peer: a drops them.
    wg(&["set", &p.wb.name, "listen-port", "9997"])?;
    assert!(ping_fails(&p.b, "192.168.241.1")?, "{}", p.logs());
    assert_eq!(endpoint_of(&p.wa)?.as_str(), "10.77.0.2:9997");
    let allowed = wg(&["show", &p.wa.name, "allowed-ips"])?;
    assert!(
        allowed.contains(&format!("{}\t192.168.241.0/24", p.wb.public_key))
            && allowed.contains(&format!("{other}\t192.168.241.2/32")),
        "{allowed}"
    );

    wg(&["set", &p.wa.name, "peer", &other, "remove"])?;
    ping_ok(&p.b, "192.168.241.1", &[]).context(p.logs())?;
    Ok(())
}

#[test]
fn nat_mapping_is_kept_open_by_persistent_keepalive() -> Result<()> {
    require_root();
    let dir = tempfile::tempdir()?;
    // c (192.168.1.100) -- router r (192.168.1.1 | 10.0.0.1, SNAT) -- s (10.0.0.100)
    let r = Netns::new("zwr")?;
    let c = Netns::new("zwc")?;
    let s = Netns::new("zws")?;
    veth(&r, "rc", &c, "v0")?;
    veth(&r, "rs", &s, "v0")?;
    r.ip(&["addr", "add", "192.168.1.1/24", "dev", "rc"])?;
    r.ip(&["addr", "add", "10.0.0.1/24", "dev", "rs"])?;
    c.ip(&["addr", "add", "192.168.1.100/24", "dev", "v0"])?;
    c.ip(&["route", "add", "default", "via", "192.168.1.1"])?;
    s.ip(&["addr", "add", "10.0.0.100/24", "dev", "v0"])?;
    r.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    r.sh("nft add table ip nat && \
         nft add chain ip nat post '{ type nat hook postrouting priority 100; }' && \
         nft add rule ip nat post ip saddr 192.168.1.0/24 ip daddr 10.0.0.0/24 snat to 10.0.0.1 \
         && nft add table ip wgcount && \
         nft add chain ip wgcount seen '{ type filter hook forward priority 0; }' && \
         nft add rule ip wgcount seen ip saddr 192.168.1.100 udp dport 20000 counter")?;
    // A mapping idle for 2 s is forgotten.
    r.exec(
        "sysctl",
        &["-qw", "net.netfilter.nf_conntrack_udp_timeout=2"],
    )?;
    r.exec(
        "sysctl",
        &["-qw", "net.netfilter.nf_conntrack_udp_timeout_stream=2"],
    )?;

    let wc = start(&c, dir.path(), "zwc")?;
    let ws = start(&s, dir.path(), "zws")?;
    for (me, other, ns, i, j, port) in
        [(&wc, &ws, &c, 1, 2, "10000"), (&ws, &wc, &s, 2, 1, "20000")]
    {
        let key = me.key_file.to_string_lossy().into_owned();
        let allowed = format!("192.168.241.{j}/32");
        wg(&[
            "set",
            &me.name,
            "private-key",
            &key,
            "listen-port",
            port,
            "peer",
            &other.public_key,
            "allowed-ips",
            &allowed,
        ])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("192.168.241.{i}/24"),
            "dev",
            &me.name,
        ])?;
        ns.ip(&["link", "set", &me.name, "up"])?;
    }
    wg(&[
        "set",
        &wc.name,
        "peer",
        &ws.public_key,
        "endpoint",
        "10.0.0.100:20000",
        "persistent-keepalive",
        "1",
    ])?;

    ping_ok(&c, "192.168.241.2", &[])?;
    ping_ok(&s, "192.168.241.1", &[])?;
    assert_eq!(
        endpoint_of(&ws)?,
        "10.0.0.1:10000",
        "s sees c through the NAT"
    );

    // Wait for three keepalives from c to cross the router: the mapping is older than its
    // 2 s idle timeout by then, and only the keepalives kept it.
    let forwarded = || -> Result<u64> {
        let out = r.exec("nft", &["list", "chain", "ip", "wgcount", "seen"])?;
        let n = out
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .context("nft shows a packet counter")?;
        Ok(n.parse()?)
    };
    let before = forwarded()?;
    wait_for(
        "three keepalives through the NAT",
        Duration::from_secs(15),
        || Ok((forwarded()? >= before + 3).then_some(())),
    )?;
    assert!(
        s.output("ping", &["-n", "-c", "1", "-W", "2", "192.168.241.1"])?
            .status
            .success(),
        "s reaches c through the mapping the keepalives kept"
    );
    Ok(())
}

#[test]
fn source_address_is_sticky_but_falls_over_when_removed() -> Result<()> {
    let p = Pair::new()?;
    p.a.exec("sysctl", &["-qw", "net.ipv4.conf.v0.promote_secondaries=1"])?;
    wg(&[
        "set",
        &p.wa.name,
        "peer",
        &p.wb.public_key,
        "endpoint",
        "10.77.0.2:20000",
    ])?;
    ping_ok(&p.a, "192.168.241.2", &[]).context(p.logs())?;
    assert_eq!(endpoint_of(&p.wb)?, "10.77.0.1:10000");

    p.a.ip(&["addr", "add", "10.77.0.10/24", "dev", "v0"])?;
    p.a.ip(&["addr", "del", "10.77.0.1/24", "dev", "v0"])?;
    ping_ok(&p.a, "192.168.241.2", &[]).context(p.logs())?;
    assert_eq!(endpoint_of(&p.wb)?, "10.77.0.10:10000");

    wg(&[
        "set",
        &p.wa.name,
        "peer",
        &p.wb.public_key,
        "endpoint",
        "[fd77::2]:20000",
    ])?;
    ping_ok(&p.a, "192.168.241.2", &[]).context(p.logs())?;
    p.a.ip(&["addr", "add", "fd77::10/64", "dev", "v0", "nodad"])?;
    p.a.ip(&["addr", "del", "fd77::1/64", "dev", "v0"])?;
    ping_ok(&p.a, "192.168.241.2", &[]).context(p.logs())?;
    assert_eq!(endpoint_of(&p.wb)?, "[fd77::10]:10000");
    Ok(())
}

#[test]
fn replies_leave_from_the_address_the_peer_used() -> Result<()> {
    let p = Pair::new()?;
    // a has two addresses of each family on one link; b sends to the second one.
    p.a.ip(&["addr", "add", "10.77.0.3/24", "dev", "v0"])?;
    p.a.ip(&["addr", "add", "fd77::3/64", "dev", "v0", "nodad"])?;
    for (target, shown) in [
        ("10.77.0.3:10000", "10.77.0.3:10000"),
        ("[fd77::3]:10000", "[fd77::3]:10000"),
        ("10.77.0.1:10000", "10.77.0.1:10000"),
        ("[fd77::1]:10000", "[fd77::1]:10000"),
    ] {
        wg(&[
            "set",
            &p.wb.name,
            "peer",
            &p.wa.public_key,
            "endpoint",
            target,
        ])?;
        ping_ok(&p.b, "192.168.241.1", &[]).context(p.logs())?;
        assert_eq!(
            endpoint_of(&p.wb)?,
            shown,
            "a answered from another address than {target}"
        );
    }
    Ok(())
}

#[test]
fn large_and_small_mtus_carry_full_size_packets() -> Result<()> {
    let p = Pair::new()?;
    wg(&[
        "set",
        &p.wa.name,
        "peer",
        &p.wb.public_key,
        "endpoint",
        "[fd77::2]:20000",
    ])?;
    ping_ok(&p.a, "192.168.241.2", &[]).context(p.logs())?;

    for (mtu, v4_payload, v6_payload) in [("9000", "8972", "8952"), ("1280", "1252", "1232")] {
        for (ns, iface) in [(&p.a, &p.wa.name), (&p.b, &p.wb.name)] {
            ns.ip(&["link", "set", iface, "mtu", mtu])?;
        }
        // Don't-fragment inside: each echo is one full-size packet through the tunnel.
        ping_ok(&p.a, "192.168.241.2", &["-M", "do", "-s", v4_payload])
            .with_context(|| format!("IPv4 at MTU {mtu}\n{}", p.logs()))?;
        ping_ok(&p.b, "fd00::1", &["-M", "do", "-s", v6_payload])
            .with_context(|| format!("IPv6 at MTU {mtu}\n{}", p.logs()))?;
    }

    // A short TCP transfer at the large MTU.
    for (ns, iface) in [(&p.a, &p.wa.name), (&p.b, &p.wb.name)] {
        ns.ip(&["link", "set", iface, "mtu", "9000"])?;
    }
    let server_log = p.dir.path().join("iperf3.log");
    let mut server =
        p.b.spawn("iperf3", &["-s", "-1", "-B", "192.168.241.2"], &server_log)?;
    wait_for("iperf3 to listen", Duration::from_secs(10), || {
        let out = p.b.output("ss", &["-tln", "sport = 5201"])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .contains("5201")
            .then_some(()))
    })?;
    let out = p.a.output(
        "timeout",
        &["30", "iperf3", "-c", "192.168.241.2", "-n", "20M", "-J"],
    )?;
    server.stop(Duration::from_secs(5));
    assert!(
        out.status.success(),
        "iperf3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let sent = report["end"]["sum_sent"]["bytes"].as_u64().unwrap_or(0);
    let received = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    // The server's count stops a moment before the last bytes land; most must be there.
    assert!(
        sent >= 20 << 20 && received >= 16 << 20,
        "sent {sent}, received {received} bytes"
    );
    Ok(())
}

/// `wg showconf`'s peers as (public key, allowed IPs in order).
fn showconf_peers(text: &str) -> Vec<(String, Vec<String>)> {
    let mut peers: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(" = ") else {
            continue;
        };
        match k.trim() {
            "PublicKey" => peers.push((v.trim().to_string(), Vec::new())),
            "AllowedIPs" => {
                if let Some(p) = peers.last_mut() {
                    p.1.extend(v.split(',').map(|s| s.trim().to_string()));
                }
            }
            _ => {}
        }
    }
    peers
}

#[test]
fn a_large_configuration_reads_back_exactly() -> Result<()> {
    require_root();
    let dir = tempfile::tempdir()?;
    let ns = Netns::new("zwl")?;
    let w = start(&ns, dir.path(), "zwl")?;

    // One peer with 32768 allowed IPs of both families, then 40 peers with 52 each.
    let key = fs::read_to_string(&w.key_file)?;
    let mut conf = format!(
        "[Interface]\nPrivateKey = {}\nListenPort = 31000\n",
        key.trim()
    );
    let mut want: Vec<(String, Vec<String>)> = Vec::new();
    let big = pubkey(&run("wg", &["genkey"])?.stdout)?;
    let mut ips = Vec::new();
    for a in 1..=64u32 {
        for b in 0..=255u32 {
            ips.push(format!("{a}.{b}.0.0/16"));
            ips.push(format!("{a:x}::{b:x}/128"));
        }
    }
    want.push((big.clone(), ips));
    for a in 1..=40u32 {
        let k = pubkey(&run("wg", &["genkey"])?.stdout)?;
        want.push((
            k,
            (1..=52u32).map(|b| format!("100.{a}.{b}.0/24")).collect(),
        ));
    }
    for (k, ips) in &want {
        conf.push_str(&format!("[Peer]\nPublicKey = {k}\n"));
        for ip in ips {
            conf.push_str(&format!("AllowedIPs = {ip}\n"));
        }
    }
    let file = dir.path().join("big.conf");
    fs::write(&file, &conf)?;

    wg(&["setconf", &w.name, &file.to_string_lossy()])?;
    let shown = wg(&["showconf", &w.name])?;

    let got = showconf_peers(&shown);
    assert_eq!(got.len(), want.len());
    for ((gk, gips), (wk, wips)) in got.iter().zip(&want) {
        assert_eq!(gk, wk);
        // wg prints IPv6 prefixes in canonical form (1::/128 for 1::0/128).
        let canon: Vec<String> = wips
            .iter()
            .map(|s| {
                s.parse::<ipnet_like::Net>()
                    .map(|n| n.0)
                    .unwrap_or_else(|_| s.clone())
            })
            .collect();
        assert_eq!(gips, &canon, "allowed IPs of {gk} differ");
    }
    assert!(shown.contains("ListenPort = 31000"));
    // The same configuration again replaces, not adds.
    wg(&["setconf", &w.name, &file.to_string_lossy()])?;
    assert_eq!(wg(&["showconf", &w.name])?, shown);
    Ok(())
}

/// Canonical text of a prefix, as `wg` prints it, without a dependency for one test.
mod ipnet_like {
    use std::net::IpAddr;

    pub struct Net(pub String);

    impl std::str::FromStr for Net {
        type Err = ();

        fn from_str(s: &str) -> Result<Net, ()> {
            let (ip, len) = s.split_once('/').ok_or(())?;
            let ip: IpAddr = ip.parse().map_err(|_| ())?;
            Ok(Net(format!("{ip}/{len}")))
        }
    }
}

#[test]
fn the_daemon_exits_and_removes_its_socket_when_the_interface_is_deleted() -> Result<()> {
    require_root();
    let dir = tempfile::tempdir()?;
    let ns = Netns::new("zwd")?;
    let w = start(&ns, dir.path(), "zwd")?;
    let sock = PathBuf::from(format!("/var/run/wireguard/{}.sock", w.name));
    assert!(
        sock.exists(),
        "the parent returned before the socket existed"
    );
    assert!(wg(&["show", &w.name])?.contains("listening port"));

    ns.ip(&["link", "del", &w.name])?;

    wait_for("the socket to go", Duration::from_secs(10), || {
        Ok((!sock.exists()).then_some(()))
    })?;
    wait_for("the daemon to exit", Duration::from_secs(10), || {
        let out = Command::new("ip")
            .args(["netns", "pids", ns.name()])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .trim()
            .is_empty()
            .then_some(()))
    })?;
    Ok(())
}

#[test]
fn a_bad_set_is_refused_and_changes_nothing() -> Result<()> {
    require_root();
    let dir = tempfile::tempdir()?;
    let ns = Netns::new("zwe")?;
    let w = start(&ns, dir.path(), "zwe")?;
    let key = w.key_file.to_string_lossy().into_owned();
    let peer = pubkey(&run("wg", &["genkey"])?.stdout)?;
    wg(&[
        "set",
        &w.name,
        "private-key",
        &key,
        "peer",
        &peer,
        "allowed-ips",
        "10.1.0.0/16",
    ])?;
    let before = wg(&["showconf", &w.name])?;

    // Raw UAPI: a valid line, then an invalid one; nothing of it may stick.
    let sock = format!("/var/run/wireguard/{}.sock", w.name);
    let request = format!(
        "set=1\npublic_key={}\nallowed_ip=10.2.0.0/16\nallowed_ip=10.3.0.0/99\n\n",
        hex_of_base64(&peer)?
    );
    let answer = uapi(&sock, &request)?;

    assert_eq!(answer, "errno=-22\n\n");
    assert_eq!(wg(&["showconf", &w.name])?, before);
    assert!(uapi(&sock, "get=1\n\n")?.ends_with("errno=0\n\n"));
    Ok(())
}

fn uapi(path: &str, request: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(request.as_bytes())?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.ends_with(b"\n\n") {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A base64 WireGuard key as the 64 hex digits UAPI uses.
fn hex_of_base64(key: &str) -> Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits: u32 = 0;
    let mut n = 0;
    let mut bytes = Vec::new();
    for c in key.trim().trim_end_matches('=').bytes() {
        let v = ALPHABET
            .iter()
            .position(|&a| a == c)
            .context("base64 digit")? as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            bytes.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    if bytes.len() != 32 {
        bail!("a key is 32 bytes, not {}", bytes.len());
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[test]
fn the_zero_trust_static_mode_refuses_wg_set_and_keeps_its_peers() -> Result<()> {
    require_root();
    let dir = tempfile::tempdir()?;
    let ns = Netns::new("zws")?;
    let name = unique("zwz");
    let guard = Iface {
        name: name.clone(),
        key_file: dir.path().join("n1.key"),
        public_key: String::new(),
        log: dir.path().join("static.log"),
    };
    fs::write(&guard.key_file, run("wg", &["genkey"])?.stdout)?;
    fs::set_permissions(&guard.key_file, fs::Permissions::from_mode(0o600))?;
    let peer = pubkey(&run("wg", &["genkey"])?.stdout)?;
    let config = dir.path().join("node.toml");
    fs::write(
        &config,
        format!(
            "[interface]\nname = \"{name}\"\nprivate_key_file = \"n1.key\"\n\
             addresses = [\"10.98.0.1/24\"]\n[identity]\nname = \"n1\"\n\
             [[peer]]\nname = \"n2\"\npublic_key = \"{peer}\"\nallowed_ips = [\"10.98.0.2/32\"]\n"
        ),
    )?;
    let node = bin("ztnet-node");
    let config_arg = config.to_string_lossy().into_owned();
    let _proc = ns.spawn(&node, &["--config", &config_arg], &guard.log)?;
    let sock = PathBuf::from(format!("/var/run/wireguard/{name}.sock"));
    wait_for("the static node's sockets", Duration::from_secs(10), || {
        Ok(sock.exists().then_some(()))
    })
    .with_context(|| fs::read_to_string(&guard.log).unwrap_or_default())?;
    let before = wg(&["showconf", &name])?;

    let other = pubkey(&run("wg", &["genkey"])?.stdout)?;
    let refused = Command::new("wg")
        .args(["set", &name, "peer", &other, "allowed-ips", "10.98.0.0/24"])
        .output()?;

    assert!(!refused.status.success(), "wg set must fail in static mode");
    // errno=-1 (EPERM), which wg prints by its name.
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Operation not permitted"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(wg(&["showconf", &name])?, before);
    assert!(before.contains(&peer) && !before.contains(&other));
    assert!(
        fs::read_to_string(&guard.log)?.contains("`wg set` refused"),
        "the refusal is logged"
    );
    Ok(())
}
