//! The issue-4 topology in network namespaces: a coordinator host, a router, and two clouds with
//! their nodes, driven as an operator would drive them (the real binaries and `ztnet`).
//!
//! ```text
//!   coordinator 192.0.2.10/24 --- router --- cloud A (bridge) 198.51.100.0/24: web1, web2
//!                                        \-- cloud B (bridge) 203.0.113.0/24:  db1, ops1, ...
//! ```
//!
//! The router holds the gateway address of each subnet, so everything between the clouds, and
//! every control connection, crosses its links `to-a` and `to-b`. Underlay IPv6 is off on every
//! link, so a capture there shows only what the nodes send. All names (namespaces, TUN devices
//! and so the node status sockets under `/var/run/ztnet`) are unique per topology; dropping a
//! [`Topology`] ends its processes and removes its namespaces and files, panics included.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{Netns, Proc, bin, unique, veth, wait_for};

/// The coordinator's underlay address and port.
pub const COORDINATOR_ADDR: &str = "192.0.2.10:7443";
/// The coordinator's UDP/TCP port.
pub const COORDINATOR_PORT: u16 = 7443;
/// The WireGuard port every node listens on (each in its own namespace).
pub const WIREGUARD_PORT: u16 = 51820;
/// Where nodes put their status sockets (shared by every namespace: one filesystem).
pub const STATUS_DIR: &str = "/var/run/ztnet";
/// The name of the network the topology's operator creates.
pub const NETWORK: &str = "prod-vpc";

/// Which cloud (subnet) a node lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    /// 198.51.100.0/24.
    A,
    /// 203.0.113.0/24.
    B,
}

impl Cloud {
    fn gateway(self) -> Ipv4Addr {
        match self {
            Cloud::A => Ipv4Addr::new(198, 51, 100, 1),
            Cloud::B => Ipv4Addr::new(203, 0, 113, 1),
        }
    }

    /// The router's interface that leads into this cloud: the link to capture on.
    pub fn router_link(self) -> &'static str {
        match self {
            Cloud::A => "to-a",
            Cloud::B => "to-b",
        }
    }
}

/// What a node is: its name, where it lives and what its join token grants.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Node name, as enrolled.
    pub name: &'static str,
    /// Its cloud.
    pub cloud: Cloud,
    /// Last octet of its underlay address in that cloud.
    pub host: u8,
    /// Namespace its token grants.
    pub namespace: &'static str,
    /// Tags its token grants.
    pub tags: &'static [&'static str],
}

/// The story's nodes: two web servers, a database, an operator's machine, and a node with no
/// grant at all.
pub fn story_nodes() -> Vec<NodeSpec> {
    let spec = |name, cloud, host, namespace, tags| NodeSpec {
        name,
        cloud,
        host,
        namespace,
        tags,
    };
    vec![
        spec("web1", Cloud::A, 11, "production", &["web"]),
        spec("web2", Cloud::A, 12, "production", &["web"]),
        spec("db1", Cloud::B, 21, "production", &["db"]),
        spec("ops1", Cloud::B, 22, "ops", &["ops"]),
        spec("stray1", Cloud::B, 23, "production", &["stray"]),
    ]
}

/// A web server that joins late, to try enrolling with a token that was already used.
pub fn late_node() -> NodeSpec {
    NodeSpec {
        name: "late1",
        cloud: Cloud::A,
        host: 13,
        namespace: "production",
        tags: &["web"],
    }
}

/// One node: its namespace, its TUN interface and its `ztnet-node` process.
#[derive(Debug)]
pub struct Node {
    /// The running daemon, if started. Declared first so that it ends before its namespace.
    proc: Option<Proc>,
    /// Background helpers in the node's namespace (echo servers).
    helpers: Vec<Proc>,
    /// What it is.
    pub spec: NodeSpec,
    /// Its namespace.
    pub ns: Netns,
    /// Its TUN interface name, unique per topology (its status socket is named after it).
    pub iface: String,
    /// Its underlay address.
    pub underlay: Ipv4Addr,
    /// Its state directory.
    pub state_dir: PathBuf,
    starts: u32,
}

impl Node {
    /// What the running daemon has logged so far (empty when it is not running).
    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log).unwrap_or_default()
    }

    /// The path of its status socket.
    pub fn status_socket(&self) -> PathBuf {
        Path::new(STATUS_DIR).join(format!("{}.sock", self.iface))
    }

    /// Whether its daemon process is running.
    pub fn running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.try_wait().is_none())
    }
}

/// The whole topology. Fields drop in order: processes, then namespaces, then files.
#[derive(Debug)]
pub struct Topology {
    coordinator: Option<Proc>,
    /// The nodes by name.
    pub nodes: BTreeMap<String, Node>,
    /// The coordinator's namespace (the operator's `ztnet` runs here too).
    pub coord_ns: Netns,
    /// The router between the coordinator and the clouds.
    pub router: Netns,
    /// Cloud A's bridge namespace.
    pub cloud_a: Netns,
    /// Cloud B's bridge namespace.
    pub cloud_b: Netns,
    /// Logs, state directories and the coordinator's data directory.
    pub dir: tempfile::TempDir,
}

impl Topology {
    /// Builds the namespaces and links for `specs`; starts nothing.
    pub fn build(specs: &[NodeSpec]) -> Result<Topology> {
        let dir = tempfile::Builder::new()
            .prefix("ztnet-e2e-")
            .tempdir()
            .context("make the test's directory")?;
        let coord_ns = Netns::new("zte-co")?;
        let router = Netns::new("zte-rt")?;
        let cloud_a = Netns::new("zte-ca")?;
        let cloud_b = Netns::new("zte-cb")?;
        router.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;

        veth(&coord_ns, "eth0", &router, "to-coord")?;
        no_ipv6(&coord_ns, "eth0")?;
        no_ipv6(&router, "to-coord")?;
        coord_ns.ip(&["addr", "add", "192.0.2.10/24", "dev", "eth0"])?;
        coord_ns.ip(&["route", "add", "default", "via", "192.0.2.1"])?;
        router.ip(&["addr", "add", "192.0.2.1/24", "dev", "to-coord"])?;

        for (cloud, ns) in [(Cloud::A, &cloud_a), (Cloud::B, &cloud_b)] {
            ns.ip(&["link", "add", "br0", "type", "bridge"])?;
            no_ipv6(ns, "br0")?;
            ns.ip(&["link", "set", "br0", "up"])?;
            veth(ns, "uplink", &router, cloud.router_link())?;
            no_ipv6(ns, "uplink")?;
            no_ipv6(&router, cloud.router_link())?;
            ns.ip(&["link", "set", "uplink", "master", "br0"])?;
            let gw = format!("{}/24", cloud.gateway());
            router.ip(&["addr", "add", &gw, "dev", cloud.router_link()])?;
        }

        let mut nodes = BTreeMap::new();
        for spec in specs {
            let ns = Netns::new("zte-n")?;
            let (cloud_ns, octets) = match spec.cloud {
                Cloud::A => (&cloud_a, [198, 51, 100, spec.host]),
                Cloud::B => (&cloud_b, [203, 0, 113, spec.host]),
            };
            let underlay = Ipv4Addr::from(octets);
            veth(&ns, "eth0", cloud_ns, spec.name)?;
            no_ipv6(&ns, "eth0")?;
            no_ipv6(cloud_ns, spec.name)?;
            cloud_ns.ip(&["link", "set", spec.name, "master", "br0"])?;
            ns.ip(&["addr", "add", &format!("{underlay}/24"), "dev", "eth0"])?;
            let gw = spec.cloud.gateway().to_string();
            ns.ip(&["route", "add", "default", "via", &gw])?;
            let state_dir = dir.path().join(spec.name);
            nodes.insert(
                spec.name.to_string(),
                Node {
                    proc: None,
                    helpers: Vec::new(),
                    spec: spec.clone(),
                    ns,
                    iface: unique("zt"),
                    underlay,
                    state_dir,
                    starts: 0,
                },
            );
        }

        Ok(Topology {
            coordinator: None,
            nodes,
            coord_ns,
            router,
            cloud_a,
            cloud_b,
            dir,
        })
    }

    /// A node by name; panics on a name the test did not build (a bug in the test).
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .get(name)
            .unwrap_or_else(|| panic!("no node {name} in this topology"))
    }

    fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes
            .get_mut(name)
            .unwrap_or_else(|| panic!("no node {name} in this topology"))
    }

    /// The coordinator's data directory.
    pub fn coordinator_dir(&self) -> PathBuf {
        self.dir.path().join("coordinator")
    }

    /// Starts `ztnet-coordinator` in its namespace and waits until its admin API answers.
    pub fn start_coordinator(&mut self) -> Result<()> {
        let data = self.coordinator_dir();
        let log = self.dir.path().join("coordinator.log");
        let proc = self.coord_ns.spawn(
            bin("ztnet-coordinator"),
            &[
                "--data-dir",
                &data.to_string_lossy(),
                "--trust-domain",
                "corp.example",
                "--listen",
                COORDINATOR_ADDR,
            ],
            &log,
        )?;
        self.coordinator = Some(proc);
        wait_for(
            "the coordinator's admin API",
            Duration::from_secs(60),
            || {
                if let Some(st) = self.coordinator.as_mut().and_then(Proc::try_wait) {
                    bail!("ztnet-coordinator exited ({st}): {}", tail(&log, 20));
                }
                if !data.join("admin.key").exists() || !data.join("ca.pem").exists() {
                    return Ok(None);
                }
                Ok(self.ztnet(&["network", "list"]).ok().map(|_| ()))
            },
        )
    }

    /// Stops the coordinator with SIGTERM (SIGKILL after 10 s).
    pub fn stop_coordinator(&mut self) {
        if let Some(mut p) = self.coordinator.take() {
            p.stop(Duration::from_secs(10));
        }
    }

    /// Runs `ztnet ARGS` as the operator, in the coordinator's namespace, and returns stdout.
    pub fn ztnet(&self, args: &[&str]) -> Result<String> {
        let data = self.coordinator_dir();
        let out = self
            .coord_ns
            .command(bin("ztnet"))
            .args(args)
            .env("ZTNET_COORDINATOR", COORDINATOR_ADDR)
            .env("ZTNET_API_KEY_FILE", data.join("admin.key"))
            .env("ZTNET_CA_CERT", data.join("ca.pem"))
            .output()
            .context("run ztnet")?;
        if !out.status.success() {
            bail!(
                "`ztnet {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `ztnet ARGS --output json` and parses the answer.
    pub fn ztnet_json(&self, args: &[&str]) -> Result<Value> {
        let mut full = args.to_vec();
        full.extend(["--output", "json"]);
        let text = self.ztnet(&full)?;
        serde_json::from_str(&text).with_context(|| format!("`ztnet {}`: {text}", full.join(" ")))
    }

    /// Creates the zero-trust network [`NETWORK`].
    pub fn create_network(&self) -> Result<()> {
        self.ztnet(&["network", "create", "--name", NETWORK, "--zero-trust"])?;
        Ok(())
    }

    /// Makes a one-use join token for `name`'s namespace and tags.
    pub fn token_for(&self, name: &str) -> Result<String> {
        let spec = &self.node(name).spec;
        let mut args = vec![
            "token",
            "create",
            "--network",
            NETWORK,
            "--namespace",
            spec.namespace,
            "--uses",
            "1",
            "--ttl",
            "10m",
        ];
        for tag in spec.tags {
            args.extend(["--tag", tag]);
        }
        let token = self.ztnet(&args)?.trim().to_string();
        if !token.starts_with("ztjoin1_") {
            bail!("`ztnet token create` printed {token:?}, not a join token");
        }
        Ok(token)
    }

    /// Starts `ztnet-node` for `name` in coordinator mode; `token` (passed as `ZTNET_TOKEN`) is
    /// needed on the first start only. Returns once the process runs (enrollment is awaited with [`Self::wait_online`]).
    pub fn start_node(&mut self, name: &str, token: Option<&str>) -> Result<()> {
        self.start_node_with(name, token, &[])
    }

    /// [`Self::start_node`] with more `ztnet-node` arguments (`--posture-file F`, say).
    pub fn start_node_with(
        &mut self,
        name: &str,
        token: Option<&str>,
        extra: &[&str],
    ) -> Result<()> {
        let log_dir = self.dir.path().to_path_buf();
        let node = self.node_mut(name);
        if node.running() {
            bail!("{name} is already running");
        }
        node.starts += 1;
        let log = log_dir.join(format!("{name}.{}.log", node.starts));
        let state = node.state_dir.to_string_lossy().into_owned();
        let args = [
            "--coordinator",
            COORDINATOR_ADDR,
            "--state-dir",
            &state,
            "--name",
            name,
            "--interface",
            &node.iface,
        ];
        let mut cmd = node.ns.command(bin("ztnet-node"));
        // ZTNET_TEST_LOG sets the nodes' log filter (default info), to debug a test.
        let filter = std::env::var("ZTNET_TEST_LOG").unwrap_or_else(|_| "info".into());
        cmd.args(args).args(extra).env("RUST_LOG", filter);
        // Through the environment, as the systemd unit does, so it is not in the process list.
        match token {
            Some(t) => cmd.env("ZTNET_TOKEN", t),
            None => cmd.env_remove("ZTNET_TOKEN"),
        };
        node.proc = Some(Proc::spawn(cmd, &log)?);
        Ok(())
    }

    /// Stops `name`'s daemon with SIGTERM (SIGKILL after 10 s) and waits until its status
    /// socket is gone or dead.
    pub fn stop_node(&mut self, name: &str) -> Result<()> {
        let node = self.node_mut(name);
        if let Some(mut p) = node.proc.take() {
            p.stop(Duration::from_secs(10));
        }
        let sock = node.status_socket();
        wait_for(
            &format!("{name}'s status socket to close"),
            Duration::from_secs(10),
            || {
                Ok(std::os::unix::net::UnixStream::connect(&sock)
                    .is_err()
                    .then_some(()))
            },
        )
    }

    /// Waits until `name`'s daemon exits by itself; returns its exit status and its log.
    pub fn wait_exit(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> Result<(std::process::ExitStatus, String)> {
        let node = self.node_mut(name);
        let status = wait_for(&format!("ztnet-node {name} to exit"), timeout, || {
            Ok(node.proc.as_mut().and_then(Proc::try_wait))
        })?;
        let log = node.proc.take().map(|p| p.log()).unwrap_or_default();
        Ok((status, log))
    }

    /// The coordinator's node list.
    pub fn node_list(&self) -> Result<Vec<Value>> {
        match self.ztnet_json(&["node", "list", "--network", NETWORK])? {
            Value::Array(v) => Ok(v),
            other => bail!("`ztnet node list` gave {other}, not a list"),
        }
    }

    /// Waits until every named node is enrolled and connected.
    pub fn wait_online(&mut self, names: &[&str], timeout: Duration) -> Result<()> {
        let what = format!("nodes {names:?} online");
        wait_for(&what, timeout, || {
            for name in names {
                let node = self.node_mut(name);
                if let Some(st) = node.proc.as_mut().and_then(Proc::try_wait) {
                    let log = node.proc.as_ref().map(Proc::log).unwrap_or_default();
                    bail!("ztnet-node {name} exited ({st}): {}", last_lines(&log, 20));
                }
            }
            let list = self.node_list()?;
            let online = names.iter().all(|n| {
                list.iter()
                    .any(|v| v["name"] == *n && v["online"] == Value::Bool(true))
            });
            Ok(online.then_some(()))
        })
    }

    /// Each node's netmap versions as the coordinator sees them: (computed, acknowledged).
    pub fn netmap_versions(&self) -> Result<BTreeMap<String, (u64, u64)>> {
        let mut out = BTreeMap::new();
        for v in self.node_list()? {
            let name = v["name"].as_str().unwrap_or_default().to_string();
            let computed = v["netmap_version"].as_u64().unwrap_or(0);
            let applied = v["applied_version"].as_u64().unwrap_or(0);
            out.insert(name, (computed, applied));
        }
        Ok(out)
    }

    /// Applies `policy` and waits until every node acknowledged its newest netmap and every
    /// node in `must_change` got a newer one than before. Returns the time from just before
    /// the apply to the last acknowledgement seen.
    pub fn apply_policy(
        &self,
        policy: &str,
        must_change: &[&str],
        timeout: Duration,
    ) -> Result<Duration> {
        let before = self.netmap_versions()?;
        let file = self.dir.path().join(format!("policy-{}.toml", unique("")));
        std::fs::write(&file, policy).context("write the policy file")?;

        let start = Instant::now();
        self.ztnet(&[
            "policy",
            "apply",
            "--network",
            NETWORK,
            "-f",
            &file.to_string_lossy(),
        ])?;
        wait_for("every node to acknowledge the policy", timeout, || {
            let now = self.netmap_versions()?;
            let all_acked = now.values().all(|(computed, applied)| applied >= computed);
            let changed = must_change.iter().all(|n| {
                let old = before.get(*n).map_or(0, |v| v.0);
                now.get(*n).is_some_and(|v| v.0 > old)
            });
            Ok((all_acked && changed).then_some(()))
        })
        .map_err(|e| anyhow::anyhow!("{e:#}; versions now: {:?}", self.netmap_versions()))?;
        Ok(start.elapsed())
    }

    /// The node's status report (`ztnet status --output json` on that node).
    pub fn status(&self, name: &str) -> Result<Value> {
        let node = self.node(name);
        let out = node
            .ns
            .command(bin("ztnet"))
            .args(["status", "--interface", &node.iface, "--output", "json"])
            .output()
            .context("run ztnet status")?;
        if !out.status.success() {
            bail!(
                "`ztnet status` on {name} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("parse ztnet status")
    }

    /// The sum of a node's drop counters.
    pub fn drops(&self, name: &str) -> Result<u64> {
        let status = self.status(name)?;
        Ok(status["drops"]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0))
    }

    /// The node's overlay IPv4 address, from the coordinator's node list.
    pub fn overlay_v4(&self, name: &str) -> Result<IpAddr> {
        self.overlay(name, true)
    }

    /// The node's overlay IPv6 address, from the coordinator's node list.
    pub fn overlay_v6(&self, name: &str) -> Result<IpAddr> {
        self.overlay(name, false)
    }

    fn overlay(&self, name: &str, v4: bool) -> Result<IpAddr> {
        let list = self.node_list()?;
        let node = list
            .iter()
            .find(|v| v["name"] == name)
            .with_context(|| format!("{name} is not in the node list"))?;
        let addrs = node["addresses"].as_array().cloned().unwrap_or_default();
        addrs
            .iter()
            .filter_map(Value::as_str)
            .filter_map(|a| a.split('/').next()?.parse::<IpAddr>().ok())
            .find(|a| a.is_ipv4() == v4)
            .with_context(|| format!("{name} has no overlay address of that family: {addrs:?}"))
    }

    /// Starts TCP echo servers on `tcp` ports and UDP echo servers on `udp` ports in the node's
    /// namespace, and waits until they answer locally.
    pub fn start_echo_servers(&mut self, name: &str, tcp: &[u16], udp: &[u16]) -> Result<()> {
        let log = self.dir.path().join(format!("{name}.echo.log"));
        let node = self.node_mut(name);
        for port in tcp {
            let listen = format!("TCP6-LISTEN:{port},reuseaddr,fork,ipv6only=0");
            node.helpers
                .push(node.ns.spawn("socat", &[&listen, "EXEC:cat"], &log)?);
        }
        for port in udp {
            let listen = format!("UDP6-RECVFROM:{port},reuseaddr,fork,ipv6only=0");
            node.helpers.push(
                node.ns
                    .spawn("socat", &["-T", "2", &listen, "EXEC:cat"], &log)?,
            );
        }
        let node = self.node(name);
        for port in tcp {
            let local: IpAddr = Ipv4Addr::LOCALHOST.into();
            wait_for(
                &format!("echo server on {name} tcp:{port}"),
                Duration::from_secs(10),
                || Ok(tcp_echo(&node.ns, local, *port, "ready")?.then_some(())),
            )?;
        }
        Ok(())
    }

    /// Opens a TCP connection from `from` to `to`'s overlay address that stays open, for
    /// checking that running traffic survives a change.
    pub fn open_stream(&self, from: &str, to: IpAddr, port: u16) -> Result<Stream> {
        let target = format!("TCP:{}:{port},connect-timeout=5", socat_host(to));
        let mut child = self
            .node(from)
            .ns
            .command("socat")
            .args(["-", &target])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("start socat")?;
        let stdin = child.stdin.take().context("socat stdin")?;
        let stdout = child.stdout.take().context("socat stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Stream {
            child,
            stdin,
            lines: rx,
        })
    }

    /// Writes the last lines of every log to stderr (called when a test fails).
    pub fn dump_logs(&self) {
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else {
            return;
        };
        let mut logs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        for log in logs {
            eprintln!("----- {} -----\n{}", log.display(), tail(&log, 40));
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        self.stop_coordinator();
        for node in self.nodes.values_mut() {
            node.helpers.clear();
            if let Some(mut p) = node.proc.take() {
                p.stop(Duration::from_secs(5));
            }
        }
    }
}

/// A TCP connection kept open by a `socat` child; the other end echoes each line.
#[derive(Debug)]
pub struct Stream {
    child: std::process::Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Stream {
    /// Sends `line` and waits up to `timeout` for it to come back.
    pub fn echo(&mut self, line: &str, timeout: Duration) -> Result<()> {
        writeln!(self.stdin, "{line}").context("write to the stream")?;
        self.stdin.flush()?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(got) if got == line => return Ok(()),
                Ok(_) => continue,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("no echo of {line:?} within {timeout:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the stream closed before {line:?} came back")
                }
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

/// Sends `payload` over TCP from `ns` to `to:port` and reports whether the echo came back.
/// A connection that cannot be opened within 2 s counts as not reached.
pub fn tcp_echo(ns: &Netns, to: IpAddr, port: u16, payload: &str) -> Result<bool> {
    let target = format!("TCP:{}:{port},connect-timeout=2", socat_host(to));
    exchange(ns, &["-T", "2", "-", &target], payload)
}

/// Sends `payload` in one UDP datagram from `ns` to `to:port` and reports whether the echo came
/// back within 1 s.
pub fn udp_echo(ns: &Netns, to: IpAddr, port: u16, payload: &str) -> Result<bool> {
    let target = format!("UDP:{}:{port}", socat_host(to));
    exchange(ns, &["-T", "1", "-t", "1", "-", &target], payload)
}

/// One ICMP echo from `ns` to `to`, waiting up to 2 s for the reply.
pub fn ping(ns: &Netns, to: IpAddr) -> Result<bool> {
    let addr = to.to_string();
    let out = ns.output("ping", &["-n", "-c", "1", "-W", "2", &addr])?;
    Ok(out.status.success())
}

fn exchange(ns: &Netns, socat_args: &[&str], payload: &str) -> Result<bool> {
    // `timeout` bounds socat even if it misbehaves; socat's own timeouts are far shorter.
    let mut child = ns
        .command("timeout")
        .arg("10")
        .arg("socat")
        .args(socat_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("start socat")?;
    if let Some(mut stdin) = child.stdin.take() {
        // A refused connection may close the pipe first; that is a "not reached".
        let _ = writeln!(stdin, "{payload}");
    }
    let out = child.wait_with_output().context("wait for socat")?;
    Ok(String::from_utf8_lossy(&out.stdout).contains(payload))
}

fn socat_host(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

fn no_ipv6(ns: &Netns, iface: &str) -> Result<()> {
    let key = format!("net.ipv6.conf.{iface}.disable_ipv6=1");
    ns.exec("sysctl", &["-qw", &key])?;
    Ok(())
}

fn tail(path: &Path, n: usize) -> String {
    last_lines(&std::fs::read_to_string(path).unwrap_or_default(), n)
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
