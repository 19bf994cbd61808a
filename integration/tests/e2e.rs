//! The issue-4 story end to end, with the real binaries driven as an operator drives them: a
//! coordinator, a router and two clouds in network namespaces, nodes enrolled with join tokens,
//! a default-deny policy applied with `ztnet`, and real TCP, UDP and ICMP traffic checked
//! against it. Needs root.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ztnet_integration::pcap::{Frame, FrameKind};
use ztnet_integration::topology::{
    COORDINATOR_PORT, Cloud, NETWORK, NodeSpec, Topology, WIREGUARD_PORT, late_node, ping,
    story_nodes, tcp_echo, udp_echo,
};
use ztnet_integration::{Capture, require_root, unique, wait_for};

/// web may reach db on PostgreSQL, ops may reach everything, nothing else passes.
const POLICY_V1: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432"]

[[grant]]
from = ["ns:ops"]
to = ["*"]
ports = ["any"]

[[test]]
from = { name = "web1", namespace = "production", tags = ["web"] }
to = { name = "db1", namespace = "production", tags = ["db"] }
port = "tcp:5432"
expect = "allow"

[[test]]
from = { name = "db1", namespace = "production", tags = ["db"] }
to = { name = "web1", namespace = "production", tags = ["web"] }
port = "tcp:5432"
expect = "deny"
"#;

/// V1 plus web -> db on ssh and web -> web on 8080.
const POLICY_V2_EXTRA: &str = r#"
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:22"]

[[grant]]
from = ["tag:web"]
to = ["tag:web"]
ports = ["tcp:8080"]
"#;

/// Only the ops grant: web loses its access to db.
const POLICY_V3: &str = r#"
[[grant]]
from = ["ns:ops"]
to = ["*"]
ports = ["any"]

[[test]]
from = { name = "web1", namespace = "production", tags = ["web"] }
to = { name = "db1", namespace = "production", tags = ["db"] }
port = "tcp:5432"
expect = "deny"
"#;

const TCP_PORTS: &[u16] = &[5432, 22, 8080];
const UDP_PORTS: &[u16] = &[5432];

/// What a probe opens.
#[derive(Debug, Clone, Copy)]
enum Probe {
    /// A TCP echo to the overlay IPv4 address.
    Tcp(u16),
    /// A TCP echo to the overlay IPv6 address.
    Tcp6(u16),
    /// A UDP echo to the overlay IPv4 address.
    Udp(u16),
    /// A ping to the overlay IPv4 address.
    Icmp,
    /// A ping to the overlay IPv6 address.
    Icmp6,
}

#[test]
fn policy_allows_exactly_what_it_grants_across_two_clouds() {
    require_root();
    let mut topo = enrolled_topology(&story_nodes());
    let all: Vec<&str> = ["web1", "web2", "db1", "ops1", "stray1"].to_vec();
    for name in &all {
        topo.start_echo_servers(name, TCP_PORTS, UDP_PORTS)
            .expect("echo servers");
    }

    // No policy yet: default deny, nobody knows any peer.
    let db1 = topo.overlay_v4("db1").expect("db1 address");
    assert!(
        !tcp_echo(&topo.node("web1").ns, db1, 5432, "before-policy").expect("probe"),
        "with no policy applied, web1 must not reach db1"
    );
    let web1_status = topo.status("web1").expect("web1 status");
    assert_eq!(
        web1_status["peers"].as_array().map_or(0, Vec::len),
        0,
        "with no policy, web1 is told about no peer: {web1_status}"
    );

    let capture_file = topo.dir.path().join("inter-cloud.pcap");
    let capture = Capture::start(&topo.router, Cloud::B.router_link(), &capture_file)
        .expect("capture on the link into cloud B");

    let took = topo
        .apply_policy(POLICY_V1, &all, Duration::from_secs(30))
        .expect("apply policy v1");
    eprintln!("policy v1: from apply to the last node's acknowledgement: {took:?}");

    // Allowed, each awaited with a deadline (the first packet also sets up the session).
    let marker = format!("ZTNET-MARKER-{}", unique(""));
    let allowed: Vec<(&str, &str, Probe)> = vec![
        ("web1", "db1", Probe::Tcp(5432)),
        ("web1", "db1", Probe::Tcp6(5432)),
        ("web2", "db1", Probe::Tcp(5432)),
        ("ops1", "web1", Probe::Tcp(22)),
        ("ops1", "web1", Probe::Tcp6(8080)),
        ("ops1", "web1", Probe::Tcp(8080)),
        ("ops1", "web1", Probe::Udp(5432)),
        ("ops1", "web1", Probe::Icmp),
        ("ops1", "web2", Probe::Tcp(5432)),
        ("ops1", "db1", Probe::Tcp(22)),
        ("ops1", "db1", Probe::Udp(5432)),
        ("ops1", "db1", Probe::Icmp),
        ("ops1", "db1", Probe::Icmp6),
        ("ops1", "stray1", Probe::Tcp(8080)),
        ("ops1", "stray1", Probe::Icmp),
    ];
    for (from, to, probe) in &allowed {
        wait_for(
            &format!("{from} -> {to} {probe:?} to pass"),
            Duration::from_secs(20),
            || Ok(probe_once(&topo, from, to, *probe, &marker)?.then_some(())),
        )
        .unwrap_or_else(|e| panic!("allowed traffic must pass: {e:#}"));
    }

    // Denied: probed in parallel; each must fail and be counted as a drop by someone.
    let denied: Vec<(&str, &str, Probe)> = vec![
        ("web1", "db1", Probe::Tcp(22)),
        ("web1", "db1", Probe::Tcp6(22)),
        ("web1", "db1", Probe::Udp(5432)),
        ("web1", "db1", Probe::Icmp),
        ("web1", "db1", Probe::Icmp6),
        ("web1", "web2", Probe::Tcp(8080)),
        ("web1", "ops1", Probe::Tcp(22)),
        ("db1", "web1", Probe::Tcp(5432)),
        ("db1", "web1", Probe::Tcp6(5432)),
        ("db1", "web1", Probe::Tcp(22)),
        ("db1", "web1", Probe::Udp(5432)),
        ("db1", "web1", Probe::Icmp),
        ("db1", "ops1", Probe::Tcp(8080)),
        ("stray1", "db1", Probe::Tcp(5432)),
        ("stray1", "web1", Probe::Tcp(8080)),
        ("stray1", "ops1", Probe::Tcp(22)),
        ("stray1", "ops1", Probe::Icmp),
    ];
    let drops_before = total_drops(&topo, &all);
    let results = run_parallel(&topo, &denied, &marker);
    let wrongly_passed: Vec<String> = denied
        .iter()
        .zip(&results)
        .filter(|(_, passed)| **passed)
        .map(|((from, to, probe), _)| format!("{from} -> {to} {probe:?}"))
        .collect();
    assert!(
        wrongly_passed.is_empty(),
        "denied traffic passed: {wrongly_passed:?}"
    );
    let drops_after = total_drops(&topo, &all);
    for sender in ["web1", "db1", "stray1"] {
        assert!(
            drops_after[sender] > drops_before[sender],
            "{sender}'s denied packets must show in its drop counters: {:?} -> {:?} ({})",
            drops_before[sender],
            drops_after[sender],
            topo.status(sender)
                .map(|s| s["drops"].clone())
                .unwrap_or_default()
        );
    }

    // The node with no grant learns only the peer that may reach it.
    let stray = topo.status("stray1").expect("stray1 status");
    let stray_peers: Vec<&str> = stray["peers"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        stray_peers,
        vec!["ops1"],
        "stray1 may only know ops1: {stray}"
    );

    // The link between the clouds carries WireGuard (and the control channel's QUIC), nothing
    // in the clear.
    capture
        .wait_until(
            "WireGuard frames on the inter-cloud link",
            Duration::from_secs(10),
            |frames| frames.iter().filter(|f| is_wireguard(f)).count() >= 10,
        )
        .expect("WireGuard traffic crossed the link");
    let frames = capture.finish().expect("read the capture");
    check_inter_cloud_capture(&frames, &marker);

    // A policy change reaches every node whose netmap changes, and takes effect.
    let v2 = format!("{POLICY_V1}\n{POLICY_V2_EXTRA}");
    let took = topo
        .apply_policy(&v2, &["web1", "web2", "db1"], Duration::from_secs(30))
        .expect("apply policy v2");
    eprintln!("policy v2: from apply to the last node's acknowledgement: {took:?}");
    for (from, to, probe) in [
        ("web1", "db1", Probe::Tcp(22)),
        ("web1", "web2", Probe::Tcp(8080)),
    ] {
        wait_for(
            &format!("{from} -> {to} {probe:?} to pass under v2"),
            Duration::from_secs(20),
            || Ok(probe_once(&topo, from, to, probe, "v2")?.then_some(())),
        )
        .unwrap_or_else(|e| panic!("the new grant must take effect: {e:#}"));
    }
    let still_denied = [
        ("db1", "web1", Probe::Tcp(5432)),
        ("web1", "db1", Probe::Tcp(8080)),
        ("stray1", "db1", Probe::Tcp(22)),
    ];
    let results = run_parallel(&topo, &still_denied, "v2");
    assert!(
        results.iter().all(|passed| !passed),
        "v2 must still deny {still_denied:?}: {results:?}"
    );

    // A refused apply (FC-12) changes nothing: same netmaps, the v2 grants still in force.
    let versions = topo.netmap_versions().expect("versions");
    let broken = topo.dir.path().join("broken.toml");
    let broken_policy = "[[grant]]\nfrom = [\"tag:web\"]\nto = [\"group:missing\"]\n\
                         ports = [\"any\"]\n";
    std::fs::write(&broken, broken_policy).expect("write the broken policy");
    let refused = topo.ztnet(&[
        "policy",
        "apply",
        "--network",
        NETWORK,
        "-f",
        &broken.to_string_lossy(),
    ]);
    let err = refused.expect_err("a policy naming an undefined group is refused");
    let err = format!("{err:#}");
    eprintln!("refused apply: {}", err.lines().next().unwrap_or_default());
    assert!(
        err.contains("missing"),
        "the refusal names the undefined group: {err}"
    );
    assert_eq!(
        topo.netmap_versions().expect("versions"),
        versions,
        "a refused policy pushes nothing"
    );
    assert!(
        probe_once(&topo, "web1", "db1", Probe::Tcp(22), "still v2").expect("probe"),
        "after a refused apply, the policy in force still applies"
    );

    // The stock WireGuard tool reads the node's interface.
    let web1 = topo.node("web1");
    let wg = web1
        .ns
        .exec("wg", &["show", &web1.iface, "peers"])
        .expect("wg show IFACE peers");
    let db1_key = topo.status("db1").expect("db1 status")["public_key"].clone();
    assert!(
        db1_key.as_str().is_some_and(|k| wg.contains(k)),
        "`wg show` on web1 lists db1's key {db1_key}: {wg}"
    );

    // Removing a grant cuts the flows it allowed that are already open, not only new ones.
    let mut stream = topo.open_stream("web1", db1, 5432).expect("open a stream");
    stream
        .echo("open before v3", Duration::from_secs(10))
        .expect("the stream carries data under v2");
    let took = topo
        .apply_policy(POLICY_V3, &["web1", "db1"], Duration::from_secs(30))
        .expect("apply policy v3, without the web grant");
    eprintln!("policy v3: from apply to the last node's acknowledgement: {took:?}");
    assert!(
        stream.echo("after v3", Duration::from_secs(3)).is_err(),
        "an open flow that the new policy no longer allows must stop passing"
    );
    assert!(
        !tcp_echo(&topo.node("web1").ns, db1, 5432, "v3").expect("probe"),
        "a new flow under v3 is denied"
    );

    // Deleting a node takes it out of every netmap: ops1 can no longer reach it.
    let stray1 = topo.overlay_v4("stray1").expect("stray1 address");
    let deleted_at = Instant::now();
    topo.ztnet(&["node", "delete", "--network", NETWORK, "stray1"])
        .expect("ztnet node delete");
    wait_for(
        "ops1 to lose stray1 as a peer",
        Duration::from_secs(10),
        || {
            let peers = topo.status("ops1")?["peers"].clone();
            let names: Vec<&str> = peers
                .as_array()
                .map(|ps| ps.iter().filter_map(|p| p["name"].as_str()).collect())
                .unwrap_or_default();
            Ok((!names.contains(&"stray1")).then_some(()))
        },
    )
    .expect("the deleted node leaves its peers' netmaps");
    eprintln!(
        "node delete: stray1 gone from ops1's peers after {:?}",
        deleted_at.elapsed()
    );
    assert!(
        !ping(&topo.node("ops1").ns, stray1).expect("ping"),
        "ops1 no longer reaches the deleted stray1"
    );

    let audit = topo
        .ztnet(&["audit", "--network", NETWORK])
        .expect("ztnet audit");
    for action in ["policy.apply", "node.enroll", "node.delete"] {
        assert!(
            audit.contains(action),
            "the audit log records {action}:\n{audit}"
        );
    }
}

#[test]
fn mesh_keeps_running_without_the_coordinator_and_restarts_from_state() {
    require_root();
    let specs: Vec<NodeSpec> = story_nodes()
        .into_iter()
        .filter(|s| s.name == "web1" || s.name == "db1")
        .collect();
    let (mut topo, tokens) = enrolled_topology_with(&specs, &[late_node()]);
    topo.start_echo_servers("db1", &[5432], &[])
        .expect("echo server");
    let took = topo
        .apply_policy(POLICY_V1, &["web1", "db1"], Duration::from_secs(30))
        .expect("apply policy");
    eprintln!("policy: from apply to the last node's acknowledgement: {took:?}");
    let db1 = topo.overlay_v4("db1").expect("db1 address");
    let web1 = topo.overlay_v4("web1").expect("web1 address");

    wait_for("web1 -> db1 tcp:5432", Duration::from_secs(20), || {
        Ok(tcp_echo(&topo.node("web1").ns, db1, 5432, "hello")?.then_some(()))
    })
    .expect("allowed traffic passes");
    let mut stream = topo.open_stream("web1", db1, 5432).expect("open a stream");
    stream
        .echo("before the coordinator stops", Duration::from_secs(10))
        .expect("the stream carries data");

    // The coordinator goes away: the running stream and new flows are untouched.
    topo.stop_coordinator();
    for name in ["web1", "db1"] {
        wait_for(
            &format!("{name} to notice the control channel is down"),
            Duration::from_secs(60),
            || Ok((topo.status(name)?["control_connected"] == false).then_some(())),
        )
        .expect("the node reports its control channel down");
    }
    stream
        .echo("after the coordinator stopped", Duration::from_secs(10))
        .expect("running traffic survives the coordinator stopping");
    assert!(
        tcp_echo(&topo.node("web1").ns, db1, 5432, "new flow").expect("probe"),
        "a new allowed flow opens while the coordinator is down"
    );
    assert!(
        !tcp_echo(&topo.node("db1").ns, web1, 5432, "x").expect("probe"),
        "denied traffic stays denied while the coordinator is down"
    );

    // db1 restarts while the coordinator is still down: it comes back from its state directory.
    let version_before = topo.status("db1").expect("db1 status")["netmap_version"].clone();
    topo.stop_node("db1").expect("stop db1");
    let restarted = Instant::now();
    topo.start_node("db1", None)
        .expect("restart db1 without a token");
    // The status socket opens before the saved netmap is applied (the node passes nothing
    // meanwhile): wait for a netmap, then check that it is the one from before.
    let status = wait_for(
        "db1's netmap from its state",
        Duration::from_secs(30),
        || {
            Ok(topo
                .status("db1")
                .ok()
                .filter(|st| !st["netmap_version"].is_null()))
        },
    )
    .expect("db1 serves status with a netmap again");
    assert_eq!(
        status["netmap_version"], version_before,
        "db1 runs the netmap it had before: {status}"
    );
    assert_ne!(
        status["control_connected"], true,
        "the coordinator is down: {status}"
    );
    wait_for(
        "web1 -> db1 tcp:5432 after db1 restarted",
        Duration::from_secs(60),
        || Ok(tcp_echo(&topo.node("web1").ns, db1, 5432, "back")?.then_some(())),
    )
    .expect("the mesh comes back from the state directory");
    eprintln!(
        "db1 restarted without the coordinator; traffic back after {:?}",
        restarted.elapsed()
    );

    // The coordinator returns and both nodes reconnect.
    let back = Instant::now();
    topo.start_coordinator().expect("restart the coordinator");
    topo.wait_online(&["web1", "db1"], Duration::from_secs(60))
        .expect("nodes reconnect to the coordinator");
    eprintln!(
        "nodes reconnected {:?} after the coordinator came back",
        back.elapsed()
    );

    // A used one-use token enrolls nothing more: the late node is refused and says so.
    topo.start_node("late1", Some(&tokens[0]))
        .expect("start late1 with web1's used token");
    let (status, log) = topo
        .wait_exit("late1", Duration::from_secs(60))
        .expect("a refused enrollment ends the daemon");
    assert!(
        !status.success(),
        "refused enrollment exits non-zero: {log}"
    );
    assert!(log.contains("token"), "the refusal names the token: {log}");
    eprintln!(
        "late1 with a used token: {}",
        log.lines().last().unwrap_or_default()
    );
    let names: Vec<String> = topo
        .node_list()
        .expect("node list")
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        names,
        ["db1", "web1"],
        "nothing was enrolled with the used token"
    );
}

/// Builds the topology for `specs` (plus `idle`, built but not started), starts the
/// coordinator, creates the network, enrolls every node of `specs` with its own one-use token,
/// and waits until all are online. Returns the tokens too (all used).
fn enrolled_topology_with(specs: &[NodeSpec], idle: &[NodeSpec]) -> (Topology, Vec<String>) {
    let all: Vec<NodeSpec> = specs.iter().chain(idle).cloned().collect();
    let mut topo = Topology::build(&all).expect("build the topology");
    topo.start_coordinator().expect("start the coordinator");
    topo.create_network().expect("create the network");
    let names: Vec<&str> = specs.iter().map(|s| s.name).collect();
    let mut tokens = Vec::new();
    for name in &names {
        let token = topo.token_for(name).expect("make a join token");
        topo.start_node(name, Some(&token)).expect("start the node");
        tokens.push(token);
    }
    topo.wait_online(&names, Duration::from_secs(90))
        .expect("every node enrolls and connects");
    let list = topo
        .ztnet(&["node", "list", "--network", NETWORK])
        .expect("ztnet node list");
    eprintln!("$ ztnet node list --network {NETWORK}\n{list}");
    (topo, tokens)
}

fn enrolled_topology(specs: &[NodeSpec]) -> Topology {
    enrolled_topology_with(specs, &[]).0
}

fn probe_once(topo: &Topology, from: &str, to: &str, probe: Probe, payload: &str) -> Result<bool> {
    let ns = &topo.node(from).ns;
    let v4 = || topo.overlay_v4(to);
    match probe {
        Probe::Tcp(port) => tcp_echo(ns, v4()?, port, payload),
        Probe::Tcp6(port) => tcp_echo(ns, topo.overlay_v6(to)?, port, payload),
        Probe::Udp(port) => udp_echo(ns, v4()?, port, payload),
        Probe::Icmp => ping(ns, v4()?),
        Probe::Icmp6 => ping(ns, topo.overlay_v6(to)?),
    }
}

type Result<T> = anyhow::Result<T>;

/// Runs the probes at the same time (each waits out its own timeout when dropped) and returns
/// whether each one passed.
fn run_parallel(topo: &Topology, probes: &[(&str, &str, Probe)], payload: &str) -> Vec<bool> {
    std::thread::scope(|s| {
        let handles: Vec<_> = probes
            .iter()
            .map(|(from, to, probe)| {
                s.spawn(move || {
                    probe_once(topo, from, to, *probe, payload)
                        .unwrap_or_else(|e| panic!("probe {from} -> {to} {probe:?}: {e:#}"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a probe thread panicked"))
            .collect()
    })
}

fn total_drops(topo: &Topology, names: &[&str]) -> std::collections::BTreeMap<String, u64> {
    names
        .iter()
        .map(|n| (n.to_string(), topo.drops(n).expect("drop counters")))
        .collect()
}

/// The UDP payload of an Ethernet + IPv4 frame, if it is one.
fn udp_payload(frame: &Frame) -> Option<&[u8]> {
    let d = &frame.data;
    if d.len() < 14 + 20 || d[12..14] != [0x08, 0x00] || d[14 + 9] != 17 {
        return None;
    }
    let ihl = usize::from(d[14] & 0x0f) * 4;
    d.get(14 + ihl + 8..)
}

/// Whether a frame is IGMP over IPv4: the kernel's multicast membership reports on the
/// underlay links, which carry nothing from the overlay.
fn is_igmp(frame: &Frame) -> bool {
    frame.kind == FrameKind::Igmp
}

/// Whether a frame is a well-formed WireGuard message on the WireGuard port.
fn is_wireguard(frame: &Frame) -> bool {
    let on_port = matches!(frame.kind, FrameKind::Udp { src_port, dst_port }
        if src_port == WIREGUARD_PORT || dst_port == WIREGUARD_PORT);
    // Message types 1-4 (initiation, response, cookie, data), then three zero bytes.
    on_port
        && udp_payload(frame)
            .is_some_and(|p| p.len() >= 32 && (1..=4).contains(&p[0]) && p[1..4] == [0, 0, 0])
}

fn check_inter_cloud_capture(frames: &[Frame], marker: &str) {
    let mut wireguard = 0;
    let mut control = 0;
    let mut other = Vec::new();
    for f in frames {
        if f.kind == FrameKind::Arp || is_igmp(f) {
            continue;
        }
        let ports = match f.kind {
            FrameKind::Udp { src_port, dst_port } => Some((src_port, dst_port)),
            _ => None,
        };
        match (ipv4_ends(f), ports) {
            // Node to node: WireGuard between the nodes' WireGuard ports, nothing else.
            (Some((src, dst)), Some((sp, dp)))
                if in_cloud(src)
                    && in_cloud(dst)
                    && sp == WIREGUARD_PORT
                    && dp == WIREGUARD_PORT
                    && is_wireguard(f) =>
            {
                wireguard += 1
            }
            // Node and coordinator: the control channel's QUIC on the coordinator's UDP port.
            (Some((src, dst)), Some((sp, dp)))
                if (src == COORDINATOR_IP && sp == COORDINATOR_PORT && in_cloud(dst))
                    || (dst == COORDINATOR_IP && dp == COORDINATOR_PORT && in_cloud(src)) =>
            {
                control += 1
            }
            (ends, _) => other.push(format!("{:?} {ends:?}", f.kind)),
        }
    }
    eprintln!(
        "inter-cloud capture: {} frames, {wireguard} WireGuard, {control} control (QUIC)",
        frames.len()
    );
    assert!(wireguard > 0, "the capture saw the tunnel traffic");
    assert!(
        other.is_empty(),
        "only WireGuard between nodes and QUIC to the coordinator may cross: {other:?}"
    );
    assert!(
        !frames.iter().any(|f| f.contains(marker.as_bytes())),
        "the marker sent through the tunnel appears in clear on the link"
    );
    assert!(
        !frames.iter().any(|f| f.contains(b"before-policy")),
        "the probe sent before the policy appears in clear on the link"
    );
}

const COORDINATOR_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// Whether an underlay address is a node's, in cloud A or cloud B.
fn in_cloud(addr: Ipv4Addr) -> bool {
    let o = addr.octets();
    o[..3] == [198, 51, 100] || o[..3] == [203, 0, 113]
}

/// The source and destination of an Ethernet + IPv4 frame.
fn ipv4_ends(frame: &Frame) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let d = &frame.data;
    if d.len() < 14 + 20 || d[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &d[14..];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    Some((src, dst))
}

#[test]
fn topology_routes_between_the_clouds_and_to_the_coordinator() {
    require_root();
    let topo = Topology::build(&story_nodes()).expect("build the topology");
    let capture_file = topo.dir.path().join("underlay.pcap");
    let capture = Capture::start(&topo.router, Cloud::B.router_link(), &capture_file)
        .expect("capture on the link into cloud B");

    for (from, to) in [
        ("web1", "203.0.113.21"),
        ("db1", "198.51.100.11"),
        ("ops1", "192.0.2.10"),
    ] {
        let ns = &topo.node(from).ns;
        wait_for(
            &format!("{from} to ping {to} on the underlay"),
            Duration::from_secs(10),
            || {
                Ok(ns
                    .output("ping", &["-n", "-c1", "-W1", to])?
                    .status
                    .success()
                    .then_some(()))
            },
        )
        .expect("the router joins the clouds and the coordinator");
    }

    capture
        .wait_until("the pings on the link", Duration::from_secs(5), |frames| {
            frames.iter().any(|f| f.kind == FrameKind::Icmp)
        })
        .expect("the inter-cloud capture sees underlay traffic");
    let frames = capture.finish().expect("read the capture");
    assert!(
        frames
            .iter()
            .all(|f| matches!(f.kind, FrameKind::Icmp | FrameKind::Arp | FrameKind::Igmp)),
        "with underlay IPv6 off, only the pings, ARP and IGMP cross: {:?}",
        frames.iter().map(|f| &f.kind).collect::<Vec<_>>()
    );
}
