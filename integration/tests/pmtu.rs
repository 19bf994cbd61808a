//! Path MTU over an IPv6 underlay (FC-23): two nodes in static mode through a router whose
//! side towards n2 has a narrower MTU and which sends no ICMPv6 "packet too big". The default
//! tunnel MTU (1420, so 1500-byte datagrams) is left alone. Needs root.
//!
//! Layout: n1 `u0` 2001:db8:1::1/64 -- router -- 2001:db8:2::2/64 `u0` n2, the router's side
//! towards n2 and n2's link at the MTU under test; overlay 10.90.0.0/16 and fd00:90::/64.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use ztnet_integration::{Netns, Proc, bin, make_key, require_root, unique, veth, wait_for};

const WG_PORT: u16 = 51820;

const ALLOW_ALL: &str = "[[grant]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"any\"]\n";

struct Node {
    name: String,
    index: u8,
    iface: String,
    underlay: String,
    public_key: String,
    proc: Option<Proc>,
    helpers: Vec<Proc>,
    ns: Netns,
}

impl Node {
    fn v4(&self) -> IpAddr {
        IpAddr::from([10, 90, 0, self.index])
    }

    fn v6(&self) -> IpAddr {
        format!("fd00:90::{}", self.index).parse().expect("v6")
    }
}

/// Fields drop in order: nodes (processes, namespaces), router, files.
struct Pair {
    nodes: Vec<Node>,
    _router: Netns,
    dir: tempfile::TempDir,
}

impl Pair {
    /// The two nodes and the router; `path_mtu` is the MTU of the router's side towards n2
    /// (and of n2's link). The router drops every ICMPv6 error it would send.
    fn new(path_mtu: u32) -> Result<Pair> {
        require_root();
        let dir = tempfile::tempdir()?;
        let router = Netns::new("zpmr")?;
        router.enable_forwarding()?;
        let mut nodes = Vec::new();
        for index in [1u8, 2] {
            let name = format!("n{index}");
            let ns = Netns::new("zpmn")?;
            let port = format!("zpm{index}");
            veth(&ns, "u0", &router, &port)?;
            let addr = format!("2001:db8:{index}::{index}");
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                "u0",
                "nodad",
            ])?;
            ns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("2001:db8:{index}::ff"),
            ])?;
            let gw = format!("2001:db8:{index}::ff/64");
            router.ip(&["-6", "addr", "add", &gw, "dev", &port, "nodad"])?;
            if index == 2 {
                let mtu = path_mtu.to_string();
                router.ip(&["link", "set", &port, "mtu", &mtu])?;
                ns.ip(&["link", "set", "u0", "mtu", &mtu])?;
            }
            let public_key = make_key(&dir.path().join(format!("{name}.key")))?;
            nodes.push(Node {
                name,
                index,
                iface: unique("zpm"),
                underlay: addr,
                public_key,
                proc: None,
                helpers: vec![],
                ns,
            });
        }
        router.sh(
            "nft add table ip6 zpmblackhole && nft add chain ip6 zpmblackhole out \
             '{ type filter hook output priority 0; }' && \
             nft add rule ip6 zpmblackhole out icmpv6 type packet-too-big drop",
        )?;
        let pair = Pair {
            nodes,
            _router: router,
            dir,
        };
        std::fs::write(pair.dir.path().join("policy.toml"), ALLOW_ALL)?;
        Ok(pair)
    }

    fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    fn start_all(&mut self) -> Result<()> {
        self.start("n1")?;
        self.start("n2")
    }

    /// Writes `name`'s config (the other node as its peer) and starts its daemon.
    fn start(&mut self, name: &str) -> Result<()> {
        {
            let me = self.node(name);
            let peer = self.nodes.iter().find(|n| n.name != name).context("peer")?;
            let text = format!(
                "[interface]\nname = \"{}\"\nprivate_key_file = \"{name}.key\"\n\
                 addresses = [\"10.90.0.{i}/16\", \"fd00:90::{i}/64\"]\n\
                 listen_port = {WG_PORT}\npolicy_file = \"policy.toml\"\n\n\
                 [identity]\nname = \"{name}\"\nnamespace = \"test\"\ntags = []\n\n\
                 [[peer]]\nname = \"{p}\"\npublic_key = \"{key}\"\n\
                 endpoint = \"[{ep}]:{WG_PORT}\"\n\
                 allowed_ips = [\"10.90.0.{j}/32\", \"fd00:90::{j}/128\"]\n\
                 namespace = \"test\"\ntags = []\n",
                me.iface,
                i = me.index,
                p = peer.name,
                key = peer.public_key,
                ep = peer.underlay,
                j = peer.index,
            );
            let config = self.dir.path().join(format!("{name}.toml"));
            std::fs::write(&config, text)?;
            let log = self.dir.path().join(format!("{name}.log"));
            // With only the shipped systemd unit's capabilities, as in production: the raw
            // socket for fragments must work under them.
            let mut cmd = me.ns.command("setpriv");
            cmd.args(["--bounding-set", &units_bounding_set(), "--"])
                .arg(bin("ztnet-node"));
            cmd.arg("--config").arg(&config).env("RUST_LOG", "info");
            let proc = Proc::spawn(cmd, &log)?;
            self.node_mut(name).proc = Some(proc);
        }
        wait_for(
            &format!("{name}'s status socket"),
            Duration::from_secs(15),
            || {
                if let Some(p) = self.node_mut(name).proc.as_mut()
                    && let Some(st) = p.try_wait()
                {
                    bail!("ztnet-node {name} exited ({st}): {}", p.log());
                }
                Ok(self.status(name).ok())
            },
        )?;
        Ok(())
    }

    /// Runs wireguard-go as n2, configured with `wg` like a stock WireGuard peer of n1.
    fn start_wireguard_go(&mut self) -> Result<()> {
        let n1 = self.node("n1");
        let (n1_key, n1_underlay) = (n1.public_key.clone(), n1.underlay.clone());
        let allowed = format!("{}/32,{}/128", n1.v4(), n1.v6());
        let key = self.file("n2.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        let log = self.file("n2.log");
        let n2 = self.node("n2");
        let iface = n2.iface.clone();
        let mut cmd = n2.ns.command("wireguard-go");
        cmd.arg(&iface).env("WG_PROCESS_FOREGROUND", "1");
        let proc = Proc::spawn(cmd, &log)?;
        self.node_mut("n2").helpers.push(proc);
        let ns = &self.node("n2").ns;
        wait_for("wireguard-go's interface", Duration::from_secs(10), || {
            Ok(ns.ip(&["link", "show", &iface]).ok().map(|_| ()))
        })?;
        let endpoint = format!("[{n1_underlay}]:{WG_PORT}");
        let key = key.to_string_lossy().into_owned();
        ns.exec(
            "wg",
            &[
                "set",
                &iface,
                "private-key",
                &key,
                "listen-port",
                "51820",
                "peer",
                &n1_key,
                "endpoint",
                &endpoint,
                "allowed-ips",
                &allowed,
            ],
        )?;
        ns.sh(&format!(
            "ip addr add 10.90.0.2/16 dev {iface} && ip addr add fd00:90::2/64 dev {iface} \
             nodad && ip link set {iface} mtu 1420 up"
        ))?;
        Ok(())
    }

    fn status(&self, name: &str) -> Result<Value> {
        let path = Path::new("/var/run/ztnet").join(format!("{}.sock", self.node(name).iface));
        let out = std::process::Command::new(bin("ztnet"))
            .args(["status", "--output", "json", "--socket"])
            .arg(&path)
            .output()?;
        if !out.status.success() {
            bail!("ztnet status: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// `ztnet status` as a table, for the PATH MTU column.
    fn status_text(&self, name: &str) -> Result<String> {
        let path = Path::new("/var/run/ztnet").join(format!("{}.sock", self.node(name).iface));
        let out = std::process::Command::new(bin("ztnet"))
            .args(["status", "--socket"])
            .arg(&path)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until `name`'s only peer has a path MTU result; returns (state, mtu).
    fn wait_path_mtu(&self, name: &str) -> Result<(String, Option<u64>)> {
        wait_for(
            &format!("{name}'s path MTU result"),
            Duration::from_secs(30),
            || {
                let st = self.status(name)?;
                let peer = &st["peers"][0];
                let state = peer["path_mtu_state"].as_str().unwrap_or("").to_string();
                Ok(matches!(state.as_str(), "learned" | "peer-does-not-probe")
                    .then(|| (state, peer["path_mtu"].as_u64())))
            },
        )
    }

    fn drops(&self, name: &str, reason: &str) -> u64 {
        self.status(name)
            .ok()
            .and_then(|s| s["drops"][reason].as_u64())
            .unwrap_or(0)
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Sends 1 MiB over TCP from n1 to `to` port `port` on n2; returns the bytes n2 received
    /// and how long it took.
    fn transfer(&mut self, to: IpAddr, port: u16) -> Result<(u64, Duration)> {
        let out = self.file(&format!("received-{port}"));
        let sink = format!("wc -c > {}", out.display());
        let log = self.file(&format!("sink-{port}.log"));
        let listen = format!("TCP6-LISTEN:{port},reuseaddr,ipv6only=0");
        let p =
            self.node("n2")
                .ns
                .spawn("socat", &["-u", &listen, &format!("SYSTEM:{sink}")], &log)?;
        self.node_mut("n2").helpers.push(p);
        let ns2 = &self.node("n2").ns;
        wait_for("the sink to listen", Duration::from_secs(5), || {
            Ok(ns2
                .sh(&format!("ss -Hltn 'sport = :{port}' | grep -q LISTEN"))
                .ok())
        })?;
        let target = match to {
            IpAddr::V4(a) => format!("TCP4:{a}:{port}"),
            IpAddr::V6(a) => format!("TCP6:[{a}]:{port}"),
        };
        let started = Instant::now();
        let send = format!("head -c 1048576 /dev/zero | timeout 30 socat -u - {target}");
        self.node("n1").ns.sh(&send).context("1 MiB sent")?;
        let received = wait_for("the whole transfer", Duration::from_secs(30), || {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            Ok(text.trim().parse::<u64>().ok())
        })?;
        Ok((received, started.elapsed()))
    }

    /// Sends one UDP datagram of `size` bytes from n1 to `to` up to `tries` times, until n2
    /// has it; returns the tries it took, or `None` when none arrived.
    fn udp_datagram(
        &mut self,
        to: IpAddr,
        port: u16,
        size: usize,
        tries: u32,
    ) -> Result<Option<u32>> {
        let out = self.file(&format!("udp-{port}"));
        let log = self.file(&format!("udp-{port}.log"));
        let listen = format!("UDP6-RECV:{port},ipv6only=0");
        let sink = format!("OPEN:{},creat,append", out.display());
        let p = self
            .node("n2")
            .ns
            .spawn("socat", &["-u", &listen, &sink], &log)?;
        self.node_mut("n2").helpers.push(p);
        let ns2 = &self.node("n2").ns;
        wait_for("the UDP sink", Duration::from_secs(5), || {
            Ok(ns2
                .sh(&format!("ss -Hlun 'sport = :{port}' | grep -q {port}"))
                .ok())
        })?;
        // One socket for every try, open until the last: the ICMP error that a dropped try
        // brings back updates the kernel's path MTU only while its socket exists.
        let any: IpAddr = match to {
            IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let socket = self.node("n1").ns.udp_socket(SocketAddr::new(any, 0))?;
        let datagram = vec![0u8; size];
        for attempt in 1..=tries {
            socket
                .send_to(&datagram, SocketAddr::new(to, port))
                .with_context(|| format!("try {attempt} to {to}"))?;
            let arrived = wait_for("the datagram", Duration::from_secs(2), || {
                let len = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
                Ok((len >= size as u64).then_some(()))
            });
            if arrived.is_ok() {
                return Ok(Some(attempt));
            }
        }
        Ok(None)
    }

    /// A counter of `/proc/net/snmp6` in `name`'s namespace.
    fn snmp6(&self, name: &str, counter: &str) -> u64 {
        let text = self
            .node(name)
            .ns
            .exec("cat", &["/proc/net/snmp6"])
            .unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(counter)?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `ping` from n1 to `to` with `size` bytes of data and DF set; whether all 3 came back.
    fn ping_df(&self, to: IpAddr, size: usize) -> Result<bool> {
        let out = self.node("n1").ns.output(
            "ping",
            &[
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "2",
                "-s",
                &size.to_string(),
                "-M",
                "do",
                &to.to_string(),
            ],
        )?;
        Ok(out.status.success())
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in &self.nodes {
                eprintln!("----- {} -----\n{}", n.name, self.log(&n.name));
            }
        }
        for n in &mut self.nodes {
            for mut h in n.helpers.drain(..) {
                h.stop(Duration::from_secs(5));
            }
            if let Some(mut p) = n.proc.take() {
                p.stop(Duration::from_secs(5));
            }
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", n.iface));
            let _ = std::fs::remove_file(format!("/var/run/ztnet/{}.sock", n.iface));
        }
    }
}

/// The shipped node unit's `CapabilityBoundingSet`, as `setpriv --bounding-set` takes it.
fn units_bounding_set() -> String {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/ztnet-node.service");
    let text = std::fs::read_to_string(&unit).expect("the shipped node unit");
    let caps = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit bounds the capabilities");
    let mut set = String::from("-all");
    for cap in caps.split_whitespace() {
        let name = cap.strip_prefix("CAP_").expect("a capability name");
        set.push_str(&format!(",+{}", name.to_ascii_lowercase()));
    }
    set
}

/// The whole FC-23 scenario over a path of `path_mtu` bytes; `expected` is the range the
/// learned inner MTU of n1 towards n2 must fall in.
fn scenario(path_mtu: u32, expected: std::ops::RangeInclusive<u64>) {
    let mut m = Pair::new(path_mtu).expect("topology");
    m.start_all().expect("start");
    let started = Instant::now();
    let (n2_v4, n2_v6) = (m.node("n2").v4(), m.node("n2").v6());

    let (state, mtu) = m.wait_path_mtu("n1").expect("n1 measures its path to n2");
    eprintln!(
        "path {path_mtu}: n1 learned {mtu:?} ({state}) in {:?}",
        started.elapsed()
    );
    assert_eq!(state, "learned", "{}", m.log("n1"));
    let mtu = mtu.expect("a learned MTU");
    assert!(
        expected.contains(&mtu),
        "path {path_mtu}: learned {mtu}, want {expected:?}"
    );
    let table = m.status_text("n1").expect("status");
    assert!(
        table.contains("PATH MTU") && table.contains(&mtu.to_string()),
        "{table}"
    );

    // First, before TCP has lowered any path MTU in n1's kernel: a 1400-byte UDP datagram over
    // IPv4, which the kernel cuts at the TUN's 1420 into fragments without DF; the first is
    // above the learned limit on a narrow path and goes as outer fragments.
    let v4 = m.udp_datagram(n2_v4, 5003, 1400, 1).expect("udp v4");
    assert_eq!(v4, Some(1), "a 1400-byte UDP datagram over IPv4 arrives");
    // Over IPv6 the first fragment is above 1280: dropped, and n1's kernel told (packet too
    // big); the next try is cut at 1280 and arrives. Never silently lost.
    let too_big = m.drops("n1", "too-big");
    let v6 = m.udp_datagram(n2_v6, 5004, 1400, 3).expect("udp v6");
    eprintln!("path {path_mtu}: 1400-byte UDP over IPv4 on try {v4:?}, over IPv6 on try {v6:?}");
    match v6 {
        Some(1) => {}
        // The first try's ICMP error reached its socket, so the second is cut to fit.
        Some(2) => assert!(m.drops("n1", "too-big") > too_big, "a lost try was told"),
        other => panic!("a 1400-byte UDP datagram over IPv6 arrived on try {other:?}, not 1 or 2"),
    }
    let (got, took) = m.transfer(n2_v4, 5001).expect("TCP over the tunnel's IPv4");
    eprintln!("path {path_mtu}: 1 MiB over IPv4 in {took:?}");
    assert_eq!(
        got, 1_048_576,
        "FC-23: the bulk transfer over IPv4 completes"
    );
    let before = m.snmp6("n2", "Ip6ReasmOKs");
    let (got, took) = m.transfer(n2_v6, 5002).expect("TCP over the tunnel's IPv6");
    eprintln!("path {path_mtu}: 1 MiB over IPv6 in {took:?}");
    assert_eq!(
        got, 1_048_576,
        "FC-23: the bulk transfer over IPv6 completes"
    );
    // TCP never sends fragments, so what n2 reassembled meanwhile came from n1's raw socket:
    // outer fragments, only where the path is below 1280 + 80 bytes (inner IPv6 packets of
    // 1201-1280 bytes must still cross it).
    let reassembled = m.snmp6("n2", "Ip6ReasmOKs") - before;
    eprintln!("path {path_mtu}: n2 reassembled {reassembled} datagrams of the IPv6 transfer");
    if path_mtu < 1360 {
        assert!(reassembled > 0, "n2 reassembled n1's outer fragments");
    } else {
        assert_eq!(reassembled, 0, "no outer fragments on a path that fits");
    }

    // IPv6 inside the tunnel carries 1280-byte packets whatever the path (RFC 8200).
    assert!(
        m.ping_df(n2_v6, 1280 - 48).expect("ping"),
        "a 1280-byte IPv6 packet crosses the tunnel"
    );
    assert!(
        !m.log("n1").contains("no raw IPv6 socket"),
        "{}",
        m.log("n1")
    );
    // n2's own link is the narrow one: its kernel fragments its datagrams (and probes) to
    // that link before they leave, so n2 learns the full size towards n1.
    let (state, n2_mtu) = m.wait_path_mtu("n2").expect("n2's result");
    assert_eq!((state.as_str(), n2_mtu), ("learned", Some(1420)));
    eprintln!(
        "path {path_mtu}: n1 drops {}, n2 sees n1 as {:?}",
        m.status("n1").expect("status")["drops"],
        m.status("n2").expect("status")["peers"][0]["path_mtu"]
    );
}

#[test]
fn an_ipv6_path_of_1280_bytes_that_sends_no_icmp_is_measured_and_carries_bulk_traffic() {
    // 1280 - 80 bytes of IPv6, UDP and WireGuard overhead.
    scenario(1280, 1200..=1200);
}

#[test]
fn an_ipv6_path_of_1420_bytes_is_measured_within_8_bytes() {
    scenario(1420, 1333..=1340);
}

#[test]
fn a_full_1500_byte_ipv6_path_keeps_the_tunnel_mtu() {
    scenario(1500, 1420..=1420);
}

#[test]
fn a_stock_wireguard_peer_does_not_probe_and_keeps_the_configured_mtu() {
    let mut m = Pair::new(1500).expect("topology");
    m.start("n1").expect("start n1");
    m.start_wireguard_go().expect("wireguard-go as n2");
    let n2_v4 = m.node("n2").v4();
    let ns1 = &m.node("n1").ns;
    wait_for("n1 reaches wireguard-go", Duration::from_secs(15), || {
        Ok(ztnet_integration::topology::ping(ns1, n2_v4)?.then_some(()))
    })
    .expect("ping");

    let started = Instant::now();
    let (state, mtu) = m.wait_path_mtu("n1").expect("a verdict");
    eprintln!(
        "wireguard-go: {state} after {:?} from the first ping",
        started.elapsed()
    );
    assert_eq!((state.as_str(), mtu), ("peer-does-not-probe", None));
    let table = m.status_text("n1").expect("status");
    assert!(table.contains("peer does not probe"), "{table}");

    assert!(
        m.ping_df(n2_v4, 1420 - 28).expect("ping"),
        "the configured 1420 stands"
    );
    let (got, _) = m.transfer(n2_v4, 5001).expect("TCP to wireguard-go");
    assert_eq!(got, 1_048_576);
    assert_eq!(m.drops("n1", "too-big"), 0, "nothing clamped");
}
