//! `ztnet status`: asks the local node over its status socket and shows the answer.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use ztnet_proto::status::{STATUS_DIR, StatusReport};

use crate::args::{OutputFormat, StatusArgs};
use crate::output::{self, Table, emit, fields, list};

/// Largest answer accepted from the socket.
const MAX_ANSWER: u64 = 16 << 20;

/// Runs `ztnet status`.
pub fn run(fmt: OutputFormat, args: &StatusArgs) -> Result<()> {
    let path = args
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(STATUS_DIR).join(format!("{}.sock", args.interface)));
    let report = query(&path)?;
    emit(fmt, &report, render)
}

/// Sends `status\n` and reads one JSON report.
pub fn query(path: &std::path::Path) -> Result<StatusReport> {
    let mut s = UnixStream::connect(path).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::PermissionDenied => {
                "the socket is root-only: run this as root (sudo ztnet status)"
            }
            _ => "is ztnet-node running on this interface? (try --interface or --socket)",
        };
        anyhow::anyhow!(
            "cannot open the status socket {}: {e}; {hint}",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .and_then(|()| s.set_write_timeout(Some(Duration::from_secs(5))))
        .context("setting socket timeouts")?;
    s.write_all(b"status\n")
        .with_context(|| format!("writing to {}", path.display()))?;
    let mut body = Vec::new();
    s.take(MAX_ANSWER)
        .read_to_end(&mut body)
        .with_context(|| format!("reading the answer from {}", path.display()))?;
    serde_json::from_slice(&body).with_context(|| {
        format!(
            "the node's answer on {} is not a status report",
            path.display()
        )
    })
}

fn render(r: &StatusReport) -> String {
    let control = match r.control_connected {
        Some(true) => "connected",
        Some(false) => "disconnected",
        None => "-",
    };
    let drops = if r.drops.is_empty() {
        "none".to_string()
    } else {
        r.drops
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // Only a coordinator-mode node runs from a netmap; the others say where their rules are.
    let now = output::now_unix();
    let rules = match r.mode.as_str() {
        "static" => ("config", static_source(r, now)),
        "wireguard" => ("config", "plain WireGuard (no policy filter)".to_string()),
        _ => (
            "netmap",
            r.netmap_version
                .map_or_else(|| "none (passes nothing)".into(), |v| format!("v{v}")),
        ),
    };
    let mut s = fields(&[
        ("interface", r.interface.clone()),
        ("node", r.node.clone().unwrap_or_else(|| "-".into())),
        ("mode", r.mode.clone()),
        ("public key", r.public_key.to_base64()),
        ("listen port", r.listen_port.to_string()),
        ("addresses", list(&r.addresses)),
        rules,
        ("control", control.into()),
        ("drops", drops),
        (
            "socket",
            r.socket_drops.map_or_else(
                || "-".into(),
                |n| format!("{n} datagrams dropped by the kernel (receive buffer full)"),
            ),
        ),
    ]);
    for w in &r.warnings {
        s.push_str(&format!("warning:     {w}\n"));
    }
    for change in r.config_source.iter().flat_map(|c| &c.pending_restart) {
        s.push_str(&format!(
            "warning:     the file changes {change}: that takes effect at a restart\n"
        ));
    }
    if let Some(refused) = r.config_source.as_ref().and_then(|c| c.refused.as_ref()) {
        s.push_str(&format!(
            "warning:     reload refused {}, the configuration above stays: {}\n",
            output::relative(refused.at, now),
            refused.error
        ));
    }
    s.push('\n');

    let mut t = Table::new(&[
        "PEER",
        "IDENTITY",
        "ENDPOINT",
        "ALLOWED IPS",
        "HANDSHAKE",
        "RX",
        "TX",
        "PATH MTU",
    ]);
    for p in &r.peers {
        let identity = p.identity.as_ref().map_or_else(
            || "-".to_string(),
            |i| {
                let mut s = format!("ns:{}", i.namespace);
                for t in &i.tags {
                    s.push_str(&format!(" tag:{t}"));
                }
                s
            },
        );
        t.row(vec![
            p.name.clone(),
            identity,
            p.endpoint.map_or_else(|| "-".into(), |e| e.to_string()),
            list(&p.allowed_ips),
            p.last_handshake
                .map_or_else(|| "never".into(), |h| output::relative(h, now)),
            bytes(p.rx_bytes),
            bytes(p.tx_bytes),
            p.path_mtu_state.describe(p.path_mtu),
        ]);
    }
    s.push_str(&t.render("no peers"));
    s
}

/// A static node's files and load time; "static (policy file)" from a node that does not
/// report them.
fn static_source(r: &StatusReport, now: u64) -> String {
    let Some(c) = &r.config_source else {
        return "static (policy file)".into();
    };
    let policy = c.policy_file.as_deref().map_or_else(
        || "no policy file: every packet is dropped".to_string(),
        |p| format!("policy {p}"),
    );
    format!(
        "static: {}, {policy}, loaded {}",
        c.file,
        output::relative(c.loaded_at, now)
    )
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ztnet_proto::WgKey;
    use ztnet_proto::control::Identity;
    use ztnet_proto::status::PeerStatus;

    use super::*;

    #[test]
    fn report_renders_fields_then_one_row_per_peer() {
        let report = StatusReport {
            interface: "ztnet0".into(),
            node: Some("web-1".into()),
            mode: "coordinator".into(),
            public_key: WgKey([7; 32]),
            listen_port: 51820,
            addresses: vec!["100.64.0.2/16".parse().expect("net")],
            netmap_version: None,
            control_connected: Some(false),
            peers: vec![PeerStatus {
                name: "db-1".into(),
                identity: Some(Identity {
                    spiffe_id: "spiffe://td/ns/prod/node/db-1".into(),
                    namespace: "prod".into(),
                    tags: vec!["db".into()],
                }),
                public_key: WgKey([8; 32]),
                endpoint: Some("192.0.2.1:51820".parse().expect("addr")),
                allowed_ips: vec!["100.64.0.3/32".parse().expect("net")],
                last_handshake: None,
                rx_bytes: 2048,
                tx_bytes: 5,
                initiations_sent: 0,
                initiations_received: 0,
                initiations_held: 0,
                path_mtu: Some(1200),
                path_mtu_state: ztnet_proto::status::PathMtuState::Learned,
            }],
            drops: BTreeMap::from([("no-rule".to_string(), 3)]),
            warnings: vec!["allowed ip 10.0.0.0/24 is claimed by peers a and b".into()],
            config_source: None,
            socket_drops: Some(12),
        };
        let text = render(&report);
        assert!(
            text.contains("netmap:      none (passes nothing)"),
            "{text}"
        );
        assert!(!text.contains("config:"), "{text}");

        let static_mode = StatusReport {
            mode: "static".into(),
            control_connected: None,
            ..report.clone()
        };
        let text = render(&static_mode);
        assert!(text.contains("config:      static (policy file)"), "{text}");
        assert!(!text.contains("netmap"), "no netmap in static mode: {text}");
        let now = output::now_unix();
        let with_files = StatusReport {
            config_source: Some(ztnet_proto::status::ConfigSource {
                file: "/etc/ztnet/node.toml".into(),
                policy_file: Some("/etc/ztnet/policy.toml".into()),
                loaded_at: now - 300,
                refused: Some(ztnet_proto::status::RefusedReload {
                    at: now - 30,
                    error: "node.toml:3:13: prefix length 40".into(),
                }),
                pending_restart: vec!["listen_port 51820 -> 51821".into()],
            }),
            ..static_mode.clone()
        };
        let text = render(&with_files);
        assert!(
            text.contains(
                "config:      static: /etc/ztnet/node.toml, policy /etc/ztnet/policy.toml, \
                 loaded 5m ago"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "warning:     the file changes listen_port 51820 -> 51821: that takes effect at \
                 a restart"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "warning:     reload refused 30s ago, the configuration above stays: \
                 node.toml:3:13: prefix length 40"
            ),
            "{text}"
        );
        let wg_mode = StatusReport {
            mode: "wireguard".into(),
            ..static_mode
        };
        let text = render(&wg_mode);
        assert!(text.contains("config:      plain WireGuard"), "{text}");
        assert!(!text.contains("passes nothing"), "{text}");
        let text = render(&report);
        assert!(text.contains("control:     disconnected"), "{text}");
        assert!(text.contains("drops:       no-rule=3"), "{text}");
        assert!(text.contains("socket:      12 datagrams dropped"), "{text}");
        assert!(
            text.contains("warning:     allowed ip 10.0.0.0/24 is claimed by peers a and b"),
            "FC-27: {text}"
        );
        let row = text
            .lines()
            .find(|l| l.starts_with("db-1"))
            .expect("peer row");
        for cell in [
            "ns:prod tag:db",
            "192.0.2.1:51820",
            "never",
            "2.0 KiB",
            "5 B",
            "1200",
        ] {
            assert!(row.contains(cell), "{cell} missing: {row}");
        }
    }

    #[test]
    fn a_report_from_a_node_before_path_mtu_probing_still_parses() {
        let old = r#"{"name":"db-1","identity":null,"public_key":"CAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAg=","endpoint":null,"allowed_ips":[],"last_handshake":null,"rx_bytes":0,"tx_bytes":0}"#;
        let p: PeerStatus = serde_json::from_str(old).expect("old peer status parses");
        assert_eq!(p.path_mtu, None);
        assert_eq!(p.path_mtu_state.describe(p.path_mtu), "not probed");
    }
}
