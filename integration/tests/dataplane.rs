//! The node's data plane in static mode, in network namespaces made by each test: policy on
//! every packet, only WireGuard on the wire, interop with wireguard-go, live reconfiguration,
//! and garbage on the UDP port. Needs root.
//!
//! Layout of every test: one namespace per node, each with a veth `u0` into a shared link
//! namespace where a bridge `br0` joins them (underlay 192.0.2.0/24); overlay 10.90.0.0/16 and
//! fd00:90::/64 on the TUN.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use ztnet_integration::pcap::FrameKind;
use ztnet_integration::topology::{ping, tcp_echo};
use ztnet_integration::{
    Capture, Netns, Proc, bin, make_key, require_root, unique, veth, wait_for,
};

const WG_PORT: u16 = 51820;

/// One node of a static mesh.
struct Node {
    name: String,
    /// 1-based index: underlay 192.0.2.i, overlay 10.90.0.i.
    index: u8,
    iface: String,
    /// Underlay address of `u0`.
    underlay: String,
    public_key: String,
    /// Extra peer-level settings written into the others' configs.
    tags: Vec<String>,
    proc: Option<Proc>,
    helpers: Vec<Proc>,
    ns: Netns,
}

/// Nodes on one bridge. Fields drop in order: nodes (processes, namespaces), link, files.
struct Mesh {
    nodes: Vec<Node>,
    link: Netns,
    dir: tempfile::TempDir,
}

impl Node {
    fn v4(&self) -> IpAddr {
        IpAddr::from([10, 90, 0, self.index])
    }

    fn v6(&self) -> IpAddr {
        format!("fd00:90::{}", self.index)
            .parse()
            .expect("valid v6")
    }

    fn underlay(&self) -> String {
        self.underlay.clone()
    }
}

impl Mesh {
    /// Makes the namespaces and links, and a key pair per node; starts nothing.
    fn new(names: &[&str], policy: &str) -> Result<Mesh> {
        require_root();
        let dir = tempfile::tempdir()?;
        let link = Netns::new("ztdl")?;
        link.ip(&["link", "add", "br0", "type", "bridge"])?;
        link.ip(&["link", "set", "br0", "up"])?;
        let mut nodes = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let index = i as u8 + 1;
            let ns = Netns::new("ztdn")?;
            let port = format!("b{index}");
            veth(&ns, "u0", &link, &port)?;
            link.ip(&["link", "set", &port, "master", "br0"])?;
            ns.ip(&["addr", "add", &format!("192.0.2.{index}/24"), "dev", "u0"])?;
            let v6 = format!("2001:db8::{index}/64");
            ns.ip(&["-6", "addr", "add", &v6, "dev", "u0", "nodad"])?;
            let key = dir.path().join(format!("{name}.key"));
            let public_key = make_key(&key)?;
            nodes.push(Node {
                name: name.to_string(),
                index,
                iface: unique("ztd"),
                underlay: format!("192.0.2.{index}"),
                public_key,
                tags: vec![],
                proc: None,
                helpers: vec![],
                ns,
            });
        }
        let mesh = Mesh { nodes, link, dir };
        std::fs::write(mesh.dir.path().join("policy.toml"), policy)?;
        Ok(mesh)
    }

    /// Two nodes on two subnets joined by a router (the `link` namespace) whose side towards
    /// n2 has an MTU of 1280 and which sends no ICMP errors: a path-MTU black hole for any
    /// outer packet larger than 1280 bytes with DF set (FC-23).
    fn black_hole_pair(policy: &str) -> Result<Mesh> {
        require_root();
        let dir = tempfile::tempdir()?;
        let router = Netns::new("ztdr")?;
        router.enable_forwarding()?;
        let mut nodes = Vec::new();
        for (index, net) in [(1u8, "192.0.2"), (2, "198.51.100")] {
            let name = format!("n{index}");
            let ns = Netns::new("ztdn")?;
            let port = format!("r{index}");
            veth(&ns, "u0", &router, &port)?;
            ns.ip(&["addr", "add", &format!("{net}.{index}/24"), "dev", "u0"])?;
            ns.ip(&["route", "add", "default", "via", &format!("{net}.254")])?;
            router.ip(&["addr", "add", &format!("{net}.254/24"), "dev", &port])?;
            if index == 2 {
                router.ip(&["link", "set", &port, "mtu", "1280"])?;
                ns.ip(&["link", "set", "u0", "mtu", "1280"])?;
            }
            let public_key = make_key(&dir.path().join(format!("{name}.key")))?;
            nodes.push(Node {
                name,
                index,
                iface: unique("ztd"),
                underlay: format!("{net}.{index}"),
                public_key,
                tags: vec![],
                proc: None,
                helpers: vec![],
                ns,
            });
        }
        router.sh(
            "nft add table ip blackhole && nft add chain ip blackhole out \
             '{ type filter hook output priority 0; }' && \
             nft add rule ip blackhole out icmp type destination-unreachable drop",
        )?;
        let mesh = Mesh {
            nodes,
            link: router,
            dir,
        };
        std::fs::write(mesh.dir.path().join("policy.toml"), policy)?;
        Ok(mesh)
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

    fn config_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.toml"))
    }

    /// Writes `name`'s config with the peers `peers` (all others when `None`), plus `extra`
    /// peer blocks as written.
    fn write_config(&self, name: &str, peers: Option<&[&str]>, extra: &str) -> Result<()> {
        let me = self.node(name);
        let mut text = format!(
            "[interface]\nname = \"{}\"\nprivate_key_file = \"{name}.key\"\n\
             addresses = [\"10.90.0.{i}/16\", \"fd00:90::{i}/64\"]\n\
             listen_port = {WG_PORT}\npolicy_file = \"policy.toml\"\n\n\
             [identity]\nname = \"{name}\"\nnamespace = \"test\"\ntags = {:?}\n",
            me.iface,
            me.tags,
            i = me.index
        );
        for n in &self.nodes {
            if n.name == name || peers.is_some_and(|p| !p.contains(&n.name.as_str())) {
                continue;
            }
            text.push_str(&peer_block(n, ""));
        }
        text.push_str(extra);
        std::fs::write(self.config_path(name), text)?;
        Ok(())
    }

    /// Starts every node with a config naming all the others.
    fn start_all(&mut self) -> Result<()> {
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        for n in &names {
            self.write_config(n, None, "")?;
            self.start(n)?;
        }
        Ok(())
    }

    /// Starts `name`'s daemon from its config file and waits for its status socket.
    fn start(&mut self, name: &str) -> Result<()> {
        let config = self.config_path(name);
        let log = self.dir.path().join(format!("{name}.log"));
        let node = self.node(name);
        let mut cmd = node.ns.command(bin("ztnet-node"));
        cmd.arg("--config").arg(&config).env("RUST_LOG", "info");
        let proc = Proc::spawn(cmd, &log)?;
        self.node_mut(name).proc = Some(proc);
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

    fn status(&self, name: &str) -> Result<Value> {
        let path = Path::new("/var/run/ztnet").join(format!("{}.sock", self.node(name).iface));
        let mut s = UnixStream::connect(&path).with_context(|| format!("{}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"status\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(serde_json::from_str(&text)?)
    }

    fn drops(&self, name: &str, reason: &str) -> u64 {
        self.status(name)
            .ok()
            .and_then(|s| s["drops"][reason].as_u64())
            .unwrap_or(0)
    }

    fn peer_count(&self, name: &str) -> usize {
        self.status(name)
            .ok()
            .and_then(|s| s["peers"].as_array().map(Vec::len))
            .unwrap_or(0)
    }

    /// Sends SIGHUP to `name`'s daemon.
    fn reload(&self, name: &str) {
        if let Some(p) = &self.node(name).proc {
            p.signal(libc::SIGHUP);
        }
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Starts a TCP echo server on `port` in `name`'s namespace.
    fn echo_server(&mut self, name: &str, port: u16) -> Result<()> {
        let log = self.dir.path().join(format!("{name}.echo.log"));
        let listen = format!("TCP6-LISTEN:{port},reuseaddr,fork,ipv6only=0");
        let node = self.node_mut(name);
        let p = node.ns.spawn("socat", &[&listen, "EXEC:cat"], &log)?;
        node.helpers.push(p);
        let ns = &self.node(name).ns;
        wait_for("echo server", Duration::from_secs(10), || {
            Ok(tcp_echo(ns, IpAddr::from([127, 0, 0, 1]), port, "ready")?.then_some(()))
        })
    }

    /// Waits until `from` reaches `to` with ping (the first one waits for the handshake).
    fn wait_ping(&self, from: &str, to: IpAddr) -> Result<()> {
        let ns = &self.node(from).ns;
        wait_for(
            &format!("ping {from} -> {to}"),
            Duration::from_secs(15),
            || Ok(ping(ns, to)?.then_some(())),
        )
    }

    fn dump(&self) {
        for n in &self.nodes {
            eprintln!("----- {} -----\n{}", n.name, self.log(&n.name));
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        for n in &mut self.nodes {
            for mut h in n.helpers.drain(..) {
                h.stop(Duration::from_secs(5));
            }
            if let Some(mut p) = n.proc.take() {
                p.stop(Duration::from_secs(5));
            }
            // A daemon that was killed leaves its socket behind; the name is this test's own.
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", n.iface));
            let _ = std::fs::remove_file(format!("/var/run/ztnet/{}.sock", n.iface));
        }
    }
}

fn peer_block(n: &Node, extra: &str) -> String {
    format!(
        "\n[[peer]]\nname = \"{}\"\npublic_key = \"{}\"\nendpoint = \"{}:{WG_PORT}\"\n\
         allowed_ips = [\"10.90.0.{i}/32\", \"fd00:90::{i}/128\"]\nnamespace = \"test\"\n\
         tags = {:?}\n{extra}",
        n.name,
        n.public_key,
        n.underlay(),
        n.tags,
        i = n.index
    )
}

/// A TCP connection kept open by socat; the far end echoes each line.
struct Stream {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Stream {
    fn open(ns: &Netns, to: IpAddr, port: u16) -> Result<Stream> {
        let target = format!("TCP:{to}:{port},connect-timeout=5");
        let mut child = ns
            .command("socat")
            .args(["-", &target])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Stream {
            child,
            stdin,
            lines,
        })
    }

    fn echo(&mut self, line: &str, timeout: Duration) -> Result<()> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(got) if got == line => return Ok(()),
                Ok(_) => {}
                Err(_) => bail!("no echo of {line:?} within {timeout:?}"),
            }
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const TWO_NODE_POLICY: &str = r#"
[[grant]]
from = ["node:n1"]
to = ["node:n2"]
ports = ["icmp", "tcp:5432"]
"#;

/// Every node may reach every other on everything.
const ALLOW_ALL: &str = "[[grant]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"any\"]\n";

/// The connected UDP sockets in `ns`, as (local, peer) address pairs from `ss`: the node's
/// per-peer sockets (see node/src/dataplane/conns.rs).
fn connected_udp(ns: &Netns) -> Vec<(String, String)> {
    let out = ns
        .exec("ss", &["-Hnu", "state", "established"])
        .expect("ss");
    out.lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // Recv-Q Send-Q Local Peer (the state column is left out with a state filter).
            let n = cols.len();
            (n >= 2).then(|| (cols[n - 2].to_string(), cols[n - 1].to_string()))
        })
        .collect()
}

/// Waits until `ns` has exactly the connected UDP sockets `want`.
fn wait_connected(ns: &Netns, want: &[(&str, &str)]) -> Result<()> {
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    wait_for("the connected UDP sockets", Duration::from_secs(10), || {
        let mut have = connected_udp(ns);
        have.sort();
        if have == want {
            Ok(Some(()))
        } else {
            bail!("have {have:?}, want {want:?}")
        }
    })
}

/// The host's routes in `ns` for `family` ("-4" or "-6"), as `ip route` prints them.
fn routes(ns: &Netns, family: &str) -> String {
    let out = ns.ip(&[family, "route", "show"]).expect("ip route");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A reload that narrows the routes removes only the node's own routes, never the kernel's
/// route of the interface's own address network (which the node had counted as installed);
/// a link taken down and up loses the node's routes, and the node puts them back itself.
#[test]
fn a_reload_removes_only_the_nodes_own_routes_and_restores_lost_ones() {
    let mut m = Mesh::new(&["n1", "n2"], ALLOW_ALL).expect("mesh");
    m.start_all().expect("start");
    let n2 = m.node("n2").v4();
    m.wait_ping("n1", n2).expect("n1 -> n2");
    let iface = m.node("n1").iface.clone();
    let kernel = format!("10.90.0.0/16 dev {iface} proto kernel");
    assert!(routes(&m.node("n1").ns, "-4").contains(&kernel));

    // Only 10.95.0.0/24 now: the default routes (the address networks) go from the config.
    let with_routes = |m: &Mesh| {
        let path = m.config_path("n1");
        let text = std::fs::read_to_string(&path).expect("read");
        let text = text.replacen(
            "policy_file = ",
            "routes = [\"10.95.0.0/24\"]\npolicy_file = ",
            1,
        );
        std::fs::write(&path, text).expect("write");
    };
    m.write_config("n1", None, "").expect("config");
    with_routes(&m);
    m.reload("n1");
    let ours = format!("10.95.0.0/24 dev {iface} proto 122");
    wait_for("the new route", Duration::from_secs(5), || {
        Ok(routes(&m.node("n1").ns, "-4").contains(&ours).then_some(()))
    })
    .expect("10.95.0.0/24 installed with the node's protocol");
    let v4 = routes(&m.node("n1").ns, "-4");
    assert!(v4.contains(&kernel), "the kernel's own route stays: {v4}");
    m.wait_ping("n1", n2).expect("n1 -> n2 after the reload");

    // Down and up: the kernel drops the node's IPv4 route; the node hears the link come up
    // and puts it back by itself, with no reload.
    let ns = &m.node("n1").ns;
    ns.ip(&["link", "set", &iface, "down"]).expect("down");
    wait_for(
        "the kernel to drop the route",
        Duration::from_secs(5),
        || Ok((!routes(&m.node("n1").ns, "-4").contains(&ours)).then_some(())),
    )
    .expect("a link down loses the route");
    let ns = &m.node("n1").ns;
    ns.ip(&["link", "set", &iface, "up"]).expect("up");
    wait_for("the route back", Duration::from_secs(5), || {
        Ok(routes(&m.node("n1").ns, "-4").contains(&ours).then_some(()))
    })
    .expect("the node restores its route when the link comes up");
    m.wait_ping("n1", n2).expect("n1 -> n2 after down and up");

    // A route that holds a peer's endpoint would carry the tunnel into itself: left out,
    // with a warning, and the tunnel stays up.
    let endpoint = format!("{}/32", m.node("n2").underlay());
    let path = m.config_path("n1");
    let text = std::fs::read_to_string(&path).expect("read");
    let text = text.replacen(
        "routes = [\"10.95.0.0/24\"]",
        &format!("routes = [\"10.95.0.0/24\", \"{endpoint}\"]"),
        1,
    );
    std::fs::write(&path, text).expect("write");
    m.reload("n1");
    let says = format!("route {endpoint} is not installed: it holds peer n2's endpoint");
    wait_for("the endpoint warning", Duration::from_secs(5), || {
        let w = m.status("n1")?["warnings"].to_string();
        Ok(w.contains(&says).then_some(()))
    })
    .expect("the route that holds n2's endpoint is refused with a warning");
    m.wait_ping("n1", n2).expect("the tunnel is not cut");

    // A reload while the link is down cannot add routes, but still takes a removed peer away.
    let ns = &m.node("n1").ns;
    ns.ip(&["link", "set", &iface, "down"]).expect("down");
    m.write_config("n1", Some(&[]), "")
        .expect("config without n2");
    with_routes(&m);
    m.reload("n1");
    wait_for(
        "n2 removed while the link is down",
        Duration::from_secs(5),
        || Ok((m.peer_count("n1") == 0).then_some(())),
    )
    .expect("the peer goes although its routes cannot be set");
    let ns = &m.node("n1").ns;
    ns.ip(&["link", "set", &iface, "up"]).expect("up");
    assert!(
        !ping(ns, n2).expect("ping"),
        "nothing reaches the removed peer after the link comes back"
    );
}

/// A full-tunnel peer (allowed IPs 0.0.0.0/0 and ::/0) and a peer allowed IP equal to the
/// underlay's own subnet: the node installs neither route, says so in status, and the host's
/// default routes and the underlay route stay, so the tunnel to the peer keeps working.
#[test]
fn a_full_tunnel_peer_never_takes_the_hosts_default_route() {
    let mut m = Mesh::new(&["n1", "n2"], ALLOW_ALL).expect("mesh");
    let n1 = m.node("n1");
    n1.ns
        .ip(&["route", "add", "default", "via", "192.0.2.254"])
        .expect("default route");
    n1.ns
        .ip(&["-6", "route", "add", "default", "via", "2001:db8::fe"])
        .expect("default route v6");
    let before = (routes(&n1.ns, "-4"), routes(&n1.ns, "-6"));
    let n2 = m.node("n2");
    // n2 claims the IPv6 default route and the underlay subnet; n9, a peer with no endpoint,
    // the IPv4 default route.
    let n9 = make_key(&m.dir.path().join("n9.key")).expect("key");
    let full = format!(
        "\n[[peer]]\nname = \"n2\"\npublic_key = \"{}\"\nendpoint = \"{}:{WG_PORT}\"\n\
         allowed_ips = [\"10.90.0.2/32\", \"fd00:90::2/128\", \"::/0\", \"192.0.2.0/24\"]\n\
         namespace = \"test\"\n\n[[peer]]\nname = \"n9\"\npublic_key = \"{n9}\"\n\
         allowed_ips = [\"0.0.0.0/0\"]\nnamespace = \"test\"\n",
        n2.public_key,
        n2.underlay()
    );
    m.write_config("n1", Some(&[]), &full).expect("n1 config");
    m.start("n1").expect("start n1");
    m.write_config("n2", None, "").expect("n2 config");
    m.start("n2").expect("start n2");

    let n2v4 = m.node("n2").v4();
    m.wait_ping("n1", n2v4)
        .expect("the tunnel comes up: its endpoint is still reached over the underlay");
    let (v4, v6) = (
        routes(&m.node("n1").ns, "-4"),
        routes(&m.node("n1").ns, "-6"),
    );
    assert!(
        v4.contains("default via 192.0.2.254"),
        "IPv4 default route kept: {v4}"
    );
    assert!(
        v6.contains("default via 2001:db8::fe"),
        "IPv6 default route kept: {v6}"
    );
    assert!(
        v4.contains("192.0.2.0/24 dev u0"),
        "the underlay subnet stays on the underlay: {v4}"
    );
    let iface = m.node("n1").iface.clone();
    assert!(
        !v4.contains(&format!("192.0.2.0/24 dev {iface}")),
        "no second underlay route through the tunnel: {v4}"
    );
    let status = m.status("n1").expect("status");
    let warnings = status["warnings"].to_string();
    for prefix in ["0.0.0.0/0", "::/0", "192.0.2.0/24"] {
        assert!(
            warnings.contains(&format!("route {prefix} is not installed")),
            "{prefix} named in the warnings: {warnings}"
        );
    }
    // The tunnel's routes are gone with the node; the host's stay as they were.
    if let Some(mut p) = m.node_mut("n1").proc.take() {
        p.stop(Duration::from_secs(5));
    }
    let after = (
        routes(&m.node("n1").ns, "-4"),
        routes(&m.node("n1").ns, "-6"),
    );
    assert_eq!(after, before, "the host's routes after the node stopped");
}

/// Deleting the node's TUN interface stops the node with an error (so that a service manager
/// restarts it), instead of leaving it running with nothing to pass traffic through.
#[test]
fn a_deleted_interface_stops_the_node_with_an_error() {
    let mut m = Mesh::new(&["n1", "n2"], ALLOW_ALL).expect("mesh");
    m.start_all().expect("start");
    let n2 = m.node("n2").v4();
    m.wait_ping("n1", n2).expect("tunnel up");
    let iface = m.node("n1").iface.clone();
    m.node("n1")
        .ns
        .ip(&["link", "del", &iface])
        .expect("ip link del");
    let status = wait_for("n1 to exit", Duration::from_secs(10), || {
        Ok(m.node_mut("n1").proc.as_mut().and_then(|p| p.try_wait()))
    })
    .expect("the node stops");
    assert!(!status.success(), "it exits with an error: {status}");
    let log = m.log("n1");
    assert!(log.contains("was deleted"), "it says why: {log}");
}

/// Clients that connect to the status socket and say nothing do not hold up `ztnet status`:
/// each connection is answered on its own (before, five idle ones took 10 s of a 5 s wait).
#[test]
fn idle_status_clients_do_not_hold_up_status() {
    let mut m = Mesh::new(&["n1", "n2"], ALLOW_ALL).expect("mesh");
    m.start_all().expect("start");
    let path = Path::new("/var/run/ztnet").join(format!("{}.sock", m.node("n1").iface));
    let idle: Vec<UnixStream> = (0..5)
        .map(|_| UnixStream::connect(&path).expect("connect"))
        .collect();
    let status = m
        .status("n1")
        .expect("status answers beside five idle clients");
    assert_eq!(status["node"], "n1", "{status}");
    drop(idle);
}

/// A second daemon on a running node's config is refused before it makes anything: in the same
/// namespace (opening the name again would add a queue to the running node's TUN), and in
/// another namespace (the socket paths are host-wide).
#[test]
fn a_second_daemon_for_a_running_interface_is_refused_before_it_makes_anything() {
    let mut m = Mesh::new(&["n1", "n2"], ALLOW_ALL).expect("mesh");
    m.start_all().expect("start");
    let n2 = m.node("n2").v4();
    m.wait_ping("n1", n2).expect("tunnel up");
    let config = m.config_path("n1");
    for (i, ns) in [&m.node("n1").ns, &m.node("n2").ns].into_iter().enumerate() {
        let out = ns
            .command(bin("ztnet-node"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .output()
            .expect("second daemon");
        let log = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "refused ({i}): {log}");
        assert!(
            log.contains("another ztnet-node serves interface"),
            "says why ({i}): {log}"
        );
        assert!(
            !log.contains("data plane started"),
            "made nothing ({i}): {log}"
        );
    }
    // An interface of the name that some other program made is not taken over either.
    let other = unique("ztx");
    let text = std::fs::read_to_string(&config).expect("config");
    let moved = m.dir.path().join("other.toml");
    let iface = m.node("n1").iface.clone();
    std::fs::write(&moved, text.replace(&iface, &other)).expect("config");
    let ns2 = &m.node("n2").ns;
    ns2.ip(&["link", "add", &other, "type", "bridge"])
        .expect("a bridge of that name");
    let out = ns2
        .command(bin("ztnet-node"))
        .arg("--config")
        .arg(&moved)
        .output()
        .expect("daemon");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "refused: {log}");
    assert!(
        log.contains(&format!("interface {other} already exists")),
        "{log}"
    );

    let out = m
        .node("n1")
        .ns
        .ip(&["-d", "-j", "link", "show", "dev", &iface])
        .expect("ip");
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v[0]["linkinfo"]["info_data"]["numqueues"], 2, "{v}");
    assert!(
        ping(&m.node("n1").ns, n2).expect("ping"),
        "the first node still serves"
    );
}

/// The overlay's IPv6 address survives `ip link set down` and `up` (the kernel drops IPv6
/// addresses on down unless `keep_addr_on_down` is set).
#[test]
fn a_link_down_and_up_keeps_the_overlay_ipv6_address() {
    let mut m = Mesh::new(&["n1", "n2"], ALLOW_ALL).expect("mesh");
    m.start_all().expect("start");
    let n2v6 = m.node("n2").v6();
    wait_for("ping6 n1 -> n2", Duration::from_secs(15), || {
        Ok(ping(&m.node("n1").ns, n2v6)?.then_some(()))
    })
    .expect("tunnel up over IPv6");
    let n2 = m.node("n2");
    n2.ns.ip(&["link", "set", &n2.iface, "down"]).expect("down");
    n2.ns.ip(&["link", "set", &n2.iface, "up"]).expect("up");
    let out = n2
        .ns
        .ip(&["-6", "addr", "show", "dev", &n2.iface])
        .expect("addr");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("fd00:90::2/64"), "address kept: {text}");
    wait_for("ping6 after down/up", Duration::from_secs(15), || {
        Ok(ping(&m.node("n1").ns, n2v6)?.then_some(()))
    })
    .expect("IPv6 through the tunnel again");
}

#[test]
fn two_nodes_follow_the_policy_and_the_link_carries_only_wireguard() {
    let mut m = Mesh::new(&["n1", "n2"], TWO_NODE_POLICY).expect("mesh");
    let cap_file = m.dir.path().join("link.pcap");
    let cap = Capture::start(&m.link, "br0", &cap_file).expect("capture");
    m.start_all().expect("start");
    m.echo_server("n2", 5432).expect("echo 5432");
    m.echo_server("n2", 5433).expect("echo 5433");
    m.echo_server("n1", 5432).expect("echo on n1");
    let (n1, n2) = (m.node("n1").v4(), m.node("n2").v4());
    let marker = format!("ZTNET-MARKER-{}", unique("m"));

    m.wait_ping("n1", n2)
        .expect("FC-01: n1 pings n2 and the echo reply comes back");
    // With a session, each node sends to the other from a socket connected to its endpoint,
    // bound to the listen port.
    wait_connected(&m.node("n1").ns, &[("192.0.2.1:51820", "192.0.2.2:51820")])
        .expect("n1 has a connected socket to n2");
    let tcp_ok = tcp_echo(&m.node("n1").ns, n2, 5432, &marker).expect("tcp");
    let v6_ok = ping(&m.node("n1").ns, m.node("n2").v6()).expect("ping6");
    let denied_port = tcp_echo(&m.node("n1").ns, n2, 5433, "denied").expect("tcp");
    let reverse_ping = ping(&m.node("n2").ns, n1).expect("ping");
    let reverse_tcp = tcp_echo(&m.node("n2").ns, n1, 5432, "reverse").expect("tcp");

    assert!(
        tcp_ok,
        "tcp:5432 is granted; data flows both ways on the flow"
    );
    assert!(v6_ok, "IPv6 inside the tunnel");
    assert!(!denied_port, "tcp:5433 is not granted");
    assert!(
        m.drops("n1", "outbound-no-rule") >= 1,
        "denied port counted"
    );
    assert!(!reverse_ping, "n2 may not open a flow to n1 (ping)");
    assert!(!reverse_tcp, "n2 may not open a flow to n1 (tcp)");
    assert!(
        m.drops("n2", "outbound-no-rule") >= 2,
        "reverse flows counted at n2"
    );

    let wg = m.node("n1").ns.exec("wg", &["show", &m.node("n1").iface]);
    let wg = wg.expect("wg show reads the node");
    assert!(wg.contains(&m.node("n2").public_key), "{wg}");
    assert!(
        wg.contains("latest handshake") && wg.contains("transfer"),
        "{wg}"
    );
    let iface = m.node("n1").iface.clone();
    let ztnet = |args: &[&str]| {
        let out = std::process::Command::new(bin("ztnet"))
            .args(["status", "-i", &iface])
            .args(args)
            .output()
            .expect("ztnet status runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let table = ztnet(&[]);
    assert!(
        table.contains("n2") && table.contains("outbound-no-rule"),
        "{table}"
    );
    let json: Value = serde_json::from_str(&ztnet(&["--output", "json"])).expect("json");
    assert_eq!(json["peers"][0]["name"], "n2", "{json}");
    let conf = m
        .node("n1")
        .ns
        .exec("wg", &["showconf", &iface])
        .expect("showconf");
    assert!(conf.contains("ListenPort = 51820"), "{conf}");
    assert!(
        conf.contains("AllowedIPs = 10.90.0.2/32, fd00:90::2/128"),
        "{conf}"
    );
    let set = m
        .node("n1")
        .ns
        .output("wg", &["set", &iface, "listen-port", "1"]);
    let set = set.expect("wg set runs");
    assert!(!set.status.success(), "set=1 is refused in static mode");
    assert!(
        String::from_utf8_lossy(&set.stderr).contains("Operation not permitted"),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );

    cap.wait_until("tunnel traffic on the link", Duration::from_secs(5), |f| {
        f.iter().any(|f| matches!(f.kind, FrameKind::Udp { .. }))
    })
    .expect("capture");
    let frames = cap.finish().expect("pcap");
    let udp = frames
        .iter()
        .filter(|f| matches!(f.kind, FrameKind::Udp { .. }))
        .count();
    assert!(
        udp >= 10,
        "the traffic crossed the link as UDP ({udp} frames)"
    );
    for f in &frames {
        match &f.kind {
            FrameKind::Udp { src_port, dst_port } => {
                assert!(*src_port == WG_PORT && *dst_port == WG_PORT, "{:?}", f.kind)
            }
            FrameKind::Tcp { .. } => panic!("TCP in clear on the link: {:?}", f.kind),
            FrameKind::Icmp => {
                // IPv6 neighbour discovery is expected, and so is a port unreachable for a
                // handshake that reached a node before it bound its port (the first
                // initiation leaves at once). Any other IPv4 ICMP would be overlay traffic.
                let v4 = f.data.get(12..14) == Some(&[0x08, 0x00][..]);
                assert!(
                    !v4 || is_wireguard_port_unreachable(&f.data),
                    "IPv4 ICMP in clear on the link: {:02x?}",
                    f.data
                );
            }
            // ARP, IGMP/MLD and bridge control frames.
            FrameKind::Arp | FrameKind::Igmp | FrameKind::Other(_) => {}
        }
        assert!(
            !f.contains(marker.as_bytes()),
            "the marker crossed the link in clear"
        );
    }
}

/// Whether an Ethernet frame is an IPv4 ICMP port unreachable quoting a datagram from and to
/// the WireGuard port.
fn is_wireguard_port_unreachable(frame: &[u8]) -> bool {
    let Some(ip) = frame.get(14..) else {
        return false;
    };
    let ihl = usize::from(ip.first().map_or(0, |b| b & 0x0f)) * 4;
    let Some(icmp) = ip.get(ihl..) else {
        return false;
    };
    let Some(inner) = icmp.get(8..) else {
        return false;
    };
    let inner_ihl = usize::from(inner.first().map_or(0, |b| b & 0x0f)) * 4;
    let ports = inner.get(inner_ihl..inner_ihl + 4);
    let wg = [WG_PORT.to_be_bytes(), WG_PORT.to_be_bytes()].concat();
    icmp.get(..2) == Some(&[3, 3][..]) && inner.get(9) == Some(&17) && ports == Some(&wg[..])
}

#[test]
fn garbage_on_the_udp_port_is_counted_and_the_node_keeps_serving() {
    let mut m = Mesh::new(&["n1", "n2"], TWO_NODE_POLICY).expect("mesh");
    m.start_all().expect("start");
    let n2 = m.node("n2").v4();
    m.wait_ping("n1", n2).expect("ping before");
    let target = format!("UDP:{}:{WG_PORT}", m.node("n1").underlay());
    // dash's printf knows octal escapes only.
    let init = format!("\\001{}", "\\000".repeat(147));

    let ns2 = &m.node("n2").ns;
    ns2.sh(&format!(
        "printf 'garbage from a stranger' | socat -u - {target}"
    ))
    .expect("garbage");
    ns2.sh(&format!("printf '{init}' | socat -u - {target}"))
        .expect("fake handshake");
    ns2.sh(&format!(
        "printf '\\004\\000\\000\\000{}' | socat -u - {target}",
        "X".repeat(40)
    ))
    .expect("fake data");
    wait_for("garbage counted", Duration::from_secs(5), || {
        Ok((m.drops("n1", "malformed-datagram") >= 1
            && m.drops("n1", "invalid-mac") >= 1
            && m.drops("n1", "unknown-index") >= 1)
            .then_some(()))
    })
    .expect("every kind of garbage counted");

    assert!(ping(&m.node("n1").ns, n2).expect("ping"), "still serving");
    assert!(
        m.node_mut("n1")
            .proc
            .as_mut()
            .expect("proc")
            .try_wait()
            .is_none()
    );
}

/// A flood of fake handshake initiations at the node's port, from a stranger's socket, does
/// not starve a peer with a session: the peer's datagrams come in on its own connected socket,
/// which the UDP thread reads in turn with the flooded main socket.
#[test]
fn a_flood_from_a_stranger_does_not_starve_a_peer() {
    let mut m = Mesh::new(&["n1", "n2"], ALLOW_ALL).expect("mesh");
    m.start_all().expect("start");
    let n1 = m.node("n1").v4();
    m.wait_ping("n2", n1).expect("ping before");
    wait_connected(&m.node("n1").ns, &[("192.0.2.1:51820", "192.0.2.2:51820")])
        .expect("n1 has n2's socket");

    // The stranger is another port in n2's namespace: its datagrams do not match n2's
    // connected socket on n1, so they all land on n1's main socket.
    let target: std::net::SocketAddr = format!("{}:{WG_PORT}", m.node("n1").underlay())
        .parse()
        .expect("addr");
    let flooder = m
        .node("n2")
        .ns
        .udp_socket("0.0.0.0:0".parse().expect("addr"))
        .expect("stranger socket");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut init = [0u8; 148];
            init[0] = 1;
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for i in 0..64u32 {
                    init[4..8].copy_from_slice(&(i ^ sent as u32).to_le_bytes());
                    if flooder.send_to(&init, target).is_ok() {
                        sent += 1;
                    }
                }
            }
            sent
        })
    };
    // Let the flood fill n1's main socket first.
    let before = m.drops("n1", "invalid-mac");
    wait_for("the flood to arrive", Duration::from_secs(10), || {
        Ok((m.drops("n1", "invalid-mac") > before + 10_000).then_some(()))
    })
    .expect("the flood reaches n1");
    let out = m
        .node("n2")
        .ns
        .output(
            "ping",
            &["-n", "-c", "20", "-i", "0.2", "-W", "2", &n1.to_string()],
        )
        .expect("ping");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flood.join().expect("flooder");
    let text = String::from_utf8_lossy(&out.stdout);
    let received = text
        .split(',')
        .find_map(|part| part.trim().strip_suffix(" received")?.parse::<u32>().ok())
        .unwrap_or(0);
    assert!(
        received >= 18,
        "{received} of 20 pings answered during a flood of {sent} fake initiations:\n{text}"
    );
}

const THREE_NODE_POLICY: &str = r#"
[[grant]]
from = ["node:n1"]
to = ["node:n2"]
ports = ["icmp", "tcp:5432"]

[[grant]]
from = ["node:n3"]
to = ["*"]
ports = ["any"]
"#;

#[test]
fn reconfiguring_one_peer_leaves_another_alone_and_removal_is_immediate() {
    let mut m = Mesh::new(&["n1", "n2", "n3"], THREE_NODE_POLICY).expect("mesh");
    m.start_all().expect("start");
    m.echo_server("n2", 5432).expect("echo");
    let (n1, n2) = (m.node("n1").v4(), m.node("n2").v4());
    m.wait_ping("n1", n2).expect("n1 -> n2");
    m.wait_ping("n3", n1).expect("ops n3 -> n1");
    m.wait_ping("n3", n2).expect("ops n3 -> n2");
    let mut stream = Stream::open(&m.node("n1").ns, n2, 5432).expect("stream");
    stream
        .echo("before", Duration::from_secs(5))
        .expect("stream up");

    // Change n3's entry on n1 (a new keepalive and an extra prefix): n2's flow carries on.
    let n3_changed = peer_block(m.node("n3"), "persistent_keepalive = 5\n").replace(
        "\"fd00:90::3/128\"]",
        "\"fd00:90::3/128\", \"10.95.0.0/24\"]",
    );
    m.write_config("n1", Some(&["n2"]), &n3_changed)
        .expect("config");
    m.reload("n1");
    wait_for("n1 applied the change", Duration::from_secs(5), || {
        let s = m.status("n1")?;
        let peers = s["peers"].as_array().cloned().unwrap_or_default();
        Ok(peers
            .iter()
            .any(|p| p["allowed_ips"].to_string().contains("10.95.0.0/24"))
            .then_some(()))
    })
    .expect("reload");
    stream
        .echo("during", Duration::from_secs(5))
        .expect("n2 flow untouched");
    m.wait_ping("n3", n1)
        .expect("n3 comes back after its change");

    // A broken file at reload leaves the running configuration in force.
    std::fs::write(m.config_path("n1"), "[interface\n").expect("write");
    m.reload("n1");
    wait_for("reload refused", Duration::from_secs(5), || {
        Ok(m.log("n1").contains("reload refused").then_some(()))
    })
    .expect("log");
    // Status says so too, beside the file still in force.
    let source = &m.status("n1").expect("status")["config_source"];
    assert!(
        source["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("n1.toml"))
            && source["refused"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("n1.toml:1:")),
        "{source}"
    );
    stream
        .echo("after-bad-reload", Duration::from_secs(5))
        .expect("still up");

    // So does a bad identity value, or a prefix given to two peers (static mode refuses both).
    m.write_config("n1", Some(&["n2"]), &n3_changed)
        .expect("config");
    let good = std::fs::read_to_string(m.config_path("n1")).expect("read");
    for (bad, says) in [
        (
            good.replacen("name = \"n1\"", "name = \"n 1\"", 1),
            "node name \"n 1\" has ' '",
        ),
        (
            good.replacen("\"10.95.0.0/24\"", "\"10.90.0.2/32\"", 1),
            "allowed ip 10.90.0.2/32 is claimed by peers n2 and n3; a prefix may belong",
        ),
    ] {
        std::fs::write(m.config_path("n1"), &bad).expect("write");
        m.reload("n1");
        wait_for(says, Duration::from_secs(5), || {
            Ok(m.log("n1").contains(says).then_some(()))
        })
        .expect("refused");
        stream
            .echo("after-refused-reload", Duration::from_secs(5))
            .expect("still up");
        m.wait_ping("n3", n1).expect("n3 keeps its address");
    }

    // Remove n3: from the moment the reload is applied, nothing from n3 passes.
    m.write_config("n1", Some(&["n2"]), "").expect("config");
    let before = m.drops("n1", "unknown-index") + m.drops("n1", "unknown-key");
    m.reload("n1");
    wait_for("n1 dropped n3", Duration::from_secs(5), || {
        Ok((m.peer_count("n1") == 1).then_some(()))
    })
    .expect("reload");
    let n3_reaches = ping(&m.node("n3").ns, n1).expect("ping");
    let after = m.drops("n1", "unknown-index") + m.drops("n1", "unknown-key");

    assert!(!n3_reaches, "a removed peer's traffic stops at once");
    assert!(
        after > before,
        "its packets are counted ({before} -> {after})"
    );
    stream
        .echo("after", Duration::from_secs(5))
        .expect("n2 flow untouched");
    assert!(
        ping(&m.node("n3").ns, n2).expect("ping"),
        "n3 still reaches n2"
    );

    // Put n3 back: it handshakes again and reaches n1. (Its old socket on n1, connected to
    // n3's endpoint, must be closed by now, or it would take n3's datagrams unread.)
    let n3_back = peer_block(m.node("n3"), "");
    m.write_config("n1", Some(&["n2"]), &n3_back)
        .expect("config");
    m.reload("n1");
    m.wait_ping("n3", n1)
        .expect("a peer put back reaches the node again");
}

#[test]
fn wireguard_go_peer_interoperates_and_is_still_filtered() {
    let policy = r#"
[[grant]]
from = ["node:n1"]
to = ["node:wg"]
ports = ["icmp", "tcp:5432"]

[[grant]]
from = ["node:wg"]
to = ["node:n1"]
ports = ["tcp:7000"]
"#;
    // Node "wg" is the second namespace; it runs wireguard-go instead of ztnet-node.
    let mut m = Mesh::new(&["n1", "wg"], policy).expect("mesh");
    m.write_config("n1", None, "").expect("config");
    m.start("n1").expect("start n1");
    let wg_iface = m.node("wg").iface.clone();
    let key = m.dir.path().join("wg.key");
    let log = m.dir.path().join("wg.log");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let wgns = &m.node("wg").ns;
    let mut cmd = wgns.command("wireguard-go");
    cmd.arg(&wg_iface).env("WG_PROCESS_FOREGROUND", "1");
    let wg_proc = Proc::spawn(cmd, &log).expect("wireguard-go");
    wait_for("wireguard-go's interface", Duration::from_secs(10), || {
        Ok(wgns.ip(&["link", "show", &wg_iface]).ok().map(|_| ()))
    })
    .expect("wireguard-go up");
    let n1 = m.node("n1");
    let allowed = format!("{}/32,{}/128", n1.v4(), n1.v6());
    let endpoint = format!("{}:{WG_PORT}", n1.underlay());
    let key_arg = key.to_string_lossy().into_owned();
    wgns.exec(
        "wg",
        &[
            "set",
            &wg_iface,
            "private-key",
            &key_arg,
            "listen-port",
            "51820",
            "peer",
            &n1.public_key,
            "endpoint",
            &endpoint,
            "allowed-ips",
            &allowed,
        ],
    )
    .expect("wg set");
    wgns.sh(&format!(
        "ip addr add 10.90.0.2/16 dev {wg_iface} && ip addr add fd00:90::2/64 dev {wg_iface} \
         nodad && ip link set {wg_iface} mtu 1420 up"
    ))
    .expect("addresses");
    m.node_mut("wg").helpers.push(wg_proc);
    m.echo_server("wg", 5432).expect("echo on wg");
    m.echo_server("wg", 5433).expect("echo on wg");
    m.echo_server("n1", 7000).expect("echo on n1");
    m.echo_server("n1", 7001).expect("echo on n1");
    let (n1, wg) = (m.node("n1").v4(), m.node("wg").v4());
    let (ns1, nsw) = (&m.node("n1").ns, &m.node("wg").ns);

    m.wait_ping("n1", wg).expect("n1 pings wireguard-go");
    assert!(
        tcp_echo(ns1, wg, 5432, "to-wg").expect("tcp"),
        "n1 -> wg tcp:5432"
    );
    assert!(
        ping(ns1, m.node("wg").v6()).expect("ping6"),
        "n1 -> wg over IPv6"
    );
    assert!(
        tcp_echo(nsw, n1, 7000, "from-wg").expect("tcp"),
        "wg -> n1 tcp:7000"
    );

    // wireguard-go sends anything; n1's inbound filter refuses what is not granted.
    let before = m.drops("n1", "inbound-no-rule");
    assert!(
        !tcp_echo(nsw, n1, 7001, "nope").expect("tcp"),
        "wg -> n1 tcp:7001 refused"
    );
    assert!(!ping(nsw, n1).expect("ping"), "wg may not ping n1");
    assert!(m.drops("n1", "inbound-no-rule") > before, "counted at n1");
    assert!(
        !tcp_echo(ns1, wg, 5433, "nope").expect("tcp"),
        "n1 -> wg tcp:5433 refused"
    );
}

#[test]
fn config_errors_name_the_file_and_line() {
    let dir = tempfile::tempdir().expect("dir");
    let key = dir.path().join("k.key");
    make_key(&key).expect("key");
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[interface]\nprivate_key_file = \"k.key\"\n\n[identity]\nname = \"n1\"\n\n[[peer]]\n\
         name = \"n2\"\npublic_key = \"YAnz9Y8PjnnuEmBN2dQmZNWPtnHnLgoy2o+aR1ib5G=\"\n",
    )
    .expect("write");

    let out = std::process::Command::new(bin("ztnet-node"))
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run");

    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.toml:9:"), "{err}");
    assert!(err.contains("43 characters"), "{err}");
}

#[test]
fn pubkey_matches_wg_and_bad_keys_are_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let key = dir.path().join("k.key");
    let ours = make_key(&key).expect("key");
    let theirs = std::process::Command::new("wg")
        .arg("pubkey")
        .stdin(std::fs::File::open(&key).expect("open"))
        .output()
        .expect("wg pubkey");
    let mode = std::fs::metadata(&key).expect("stat").permissions().mode() & 0o777;

    assert_eq!(ours, String::from_utf8_lossy(&theirs.stdout).trim());
    assert_eq!(mode, 0o600);
    for bad in [
        "",
        "\"abc\"",
        "YAnz9Y8PjnnuEmBN2dQmZNWPtnHnLgoy2o+aR1ib5GJ=",
    ] {
        let mut child = std::process::Command::new(bin("ztnet-node"))
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(bad.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("wait");
        assert!(!out.status.success(), "{bad:?} refused");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("key"),
            "{bad:?}"
        );
    }
}

#[test]
fn peer_roams_to_a_new_address_after_an_authenticated_packet() {
    let policy = "[[grant]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"any\"]\n";
    let mut m = Mesh::new(&["n1", "n2"], policy).expect("mesh");
    m.start_all().expect("start");
    let (n1, n2) = (m.node("n1").v4(), m.node("n2").v4());
    m.wait_ping("n1", n2).expect("ping before");

    // n2's underlay address changes (a new uplink); n1 still has the old endpoint.
    let ns2 = &m.node("n2").ns;
    // Without promotion, deleting the primary address would take the new one with it.
    ns2.exec("sysctl", &["-qw", "net.ipv4.conf.u0.promote_secondaries=1"])
        .expect("sysctl");
    ns2.ip(&["addr", "add", "192.0.2.20/24", "dev", "u0"])
        .expect("new address");
    ns2.ip(&["addr", "del", "192.0.2.2/24", "dev", "u0"])
        .expect("old address gone");
    m.wait_ping("n2", n1)
        .expect("n2 reaches n1 from its new address");

    let status = m.status("n1").expect("status");
    let endpoint = status["peers"][0]["endpoint"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(endpoint, "192.0.2.20:51820", "n1 learnt the new endpoint");
    assert!(ping(&m.node("n1").ns, n2).expect("ping"), "and uses it");
    // n1's socket connected to the old endpoint is gone; one to the new endpoint sends.
    wait_connected(&m.node("n1").ns, &[("192.0.2.1:51820", "192.0.2.20:51820")])
        .expect("n1's connected socket follows the peer");
}

#[test]
fn ipv6_underlay_carries_the_tunnel() {
    let policy = "[[grant]]\nfrom = [\"node:n1\"]\nto = [\"node:n2\"]\nports = [\"icmp\"]\n";
    let mut m = Mesh::new(&["n1", "n2"], policy).expect("mesh");
    for (name, other) in [("n1", 2), ("n2", 1)] {
        m.write_config(name, None, "").expect("config");
        let path = m.config_path(name);
        let text = std::fs::read_to_string(&path).expect("read");
        let v4 = format!("\"192.0.2.{other}:{WG_PORT}\"");
        let v6 = format!("\"[2001:db8::{other}]:{WG_PORT}\"");
        std::fs::write(&path, text.replace(&v4, &v6)).expect("write");
        m.start(name).expect("start");
    }
    let n2 = m.node("n2").v4();

    m.wait_ping("n1", n2).expect("ping over an IPv6 underlay");

    let status = m.status("n1").expect("status");
    let endpoint = status["peers"][0]["endpoint"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(endpoint, format!("[2001:db8::2]:{WG_PORT}"));
    assert!(
        !ping(&m.node("n2").ns, m.node("n1").v4()).expect("ping"),
        "still filtered"
    );
}

#[test]
fn bulk_transfer_survives_a_path_mtu_black_hole() {
    let policy = "[[grant]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"any\"]\n";
    let mut m = Mesh::black_hole_pair(policy).expect("topology");
    m.start_all().expect("start");
    let n2 = m.node("n2").v4();
    m.wait_ping("n1", n2).expect("small packets pass");
    let out = m.dir.path().join("received");
    let sink = format!("wc -c > {}", out.display());
    let log = m.dir.path().join("sink.log");
    let p = m.node("n2").ns.spawn(
        "socat",
        &["-u", "TCP-LISTEN:5001,reuseaddr", &format!("SYSTEM:{sink}")],
        &log,
    );
    m.node_mut("n2").helpers.push(p.expect("sink"));
    let ns1 = &m.node("n1").ns;
    wait_for("the sink to listen", Duration::from_secs(5), || {
        Ok(m.node("n2")
            .ns
            .sh("ss -Hltn 'sport = :5001' | grep -q LISTEN")
            .ok())
    })
    .expect("listen");

    // Inner packets of 1420 bytes become outer packets of 1452 + 20 bytes: over the 1280 hop.
    let big_ping = ns1
        .output(
            "ping",
            &[
                "-c",
                "3",
                "-W",
                "2",
                "-s",
                "1372",
                "-M",
                "do",
                &n2.to_string(),
            ],
        )
        .expect("ping");
    let send = format!("head -c 1048576 /dev/zero | timeout 20 socat -u - TCP:{n2}:5001");
    ns1.sh(&send).expect("1 MiB sent");
    let received = wait_for("the whole transfer", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        Ok(text.trim().parse::<u64>().ok())
    })
    .expect("transfer");

    assert!(
        big_ping.status.success(),
        "a 1400-byte packet crosses the 1280 hop"
    );
    assert_eq!(received, 1_048_576, "FC-23: the bulk transfer completes");
}

#[test]
fn node_without_ipv6_still_carries_ipv4() {
    let policy = "[[grant]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"any\"]\n";
    let mut m = Mesh::new(&["n1", "n2"], policy).expect("mesh");
    let ns1 = &m.node("n1").ns;
    for key in ["all", "default"] {
        let setting = format!("net.ipv6.conf.{key}.disable_ipv6=1");
        ns1.exec("sysctl", &["-qw", &setting]).expect("sysctl");
    }

    m.start_all()
        .expect("both start, n1 without its IPv6 address");
    let n2 = m.node("n2").v4();

    m.wait_ping("n1", n2).expect("IPv4 through the tunnel");
    assert!(m.log("n1").contains("IPv6 is disabled"), "{}", m.log("n1"));
}
