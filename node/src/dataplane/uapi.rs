//! WireGuard's cross-platform configuration protocol, the read side (`get=1`), so that the
//! stock `wg show IFACE` reads the node. `set=1` is answered with an error for now: the node's
//! configuration comes from its own config file or from the coordinator. No I/O here.

use std::fmt::Write;
use std::time::SystemTime;

use ztnet_proto::PrivateKey;

use super::peers::PeerSnapshot;

/// errno answered to `set=1`: EPERM, the operation is not permitted in this mode.
pub const SET_REFUSED_ERRNO: i32 = 1;

/// A request read from the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `get=1`.
    Get,
    /// `set=1` with its lines.
    Set,
    /// Anything else.
    Unknown(String),
}

/// Parses the first line of a request.
pub fn parse_request(first_line: &str) -> Request {
    match first_line.trim_end() {
        "get=1" => Request::Get,
        "set=1" => Request::Set,
        other => Request::Unknown(other.to_string()),
    }
}

/// The answer to `get=1`. The private key is included because `wg` derives the interface's
/// public key from it; the socket is root-only (0600) on the node's own machine.
pub fn format_get(
    private_key: &PrivateKey,
    listen_port: u16,
    peers: &[PeerSnapshot],
    now: SystemTime,
) -> String {
    let mut s = String::new();
    let secret = private_key.to_bytes();
    let _ = writeln!(s, "private_key={}", hex::encode(secret));
    let _ = writeln!(s, "listen_port={listen_port}");
    for p in peers {
        let _ = writeln!(s, "public_key={}", hex::encode(p.config.public_key.0));
        if let Some(ep) = p.endpoint {
            let _ = writeln!(s, "endpoint={ep}");
        }
        let (sec, nsec) = match p.since_handshake.and_then(|d| now.checked_sub(d)) {
            Some(at) => {
                let d = at
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default();
                (d.as_secs(), d.subsec_nanos())
            }
            None => (0, 0),
        };
        let _ = writeln!(s, "last_handshake_time_sec={sec}");
        let _ = writeln!(s, "last_handshake_time_nsec={nsec}");
        let _ = writeln!(s, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(s, "rx_bytes={}", p.rx_bytes);
        let keepalive = p.config.persistent_keepalive.unwrap_or(0);
        let _ = writeln!(s, "persistent_keepalive_interval={keepalive}");
        for net in &p.config.allowed_ips {
            let _ = writeln!(s, "allowed_ip={net}");
        }
        let _ = writeln!(s, "protocol_version=1");
    }
    s.push_str("errno=0\n\n");
    s
}

/// The answer to a request the node does not carry out.
pub fn format_error(errno: i32) -> String {
    format!("errno={errno}\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netconfig::PeerConfig;
    use std::time::Duration;
    use ztnet_proto::WgKey;

    #[test]
    fn get_lists_interface_then_each_peer() {
        let key = PrivateKey::generate();
        let peer_key = PrivateKey::generate().public_key();
        let peer = PeerSnapshot {
            config: PeerConfig {
                name: "n2".into(),
                public_key: peer_key,
                endpoint: None,
                endpoints: vec![],
                allowed_ips: vec!["10.90.0.2/32".parse().expect("prefix")],
                persistent_keepalive: Some(25),
                identity: None,
                preshared_key: None,
                next_public_key: None,
            },
            endpoint: Some("192.0.2.2:51820".parse().expect("addr")),
            since_handshake: Some(Duration::from_secs(5)),
            tx_bytes: 10,
            rx_bytes: 20,
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);

        let text = format_get(&key, 51820, &[peer], now);

        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "listen_port=51820");
        assert_eq!(lines[2], format!("public_key={}", hex::encode(peer_key.0)));
        assert!(lines.contains(&"endpoint=192.0.2.2:51820"));
        assert!(lines.contains(&"last_handshake_time_sec=995"));
        assert!(lines.contains(&"allowed_ip=10.90.0.2/32"));
        assert!(lines.contains(&"persistent_keepalive_interval=25"));
        assert!(text.ends_with("errno=0\n\n"));
        assert_ne!(WgKey(key.to_bytes()), peer_key);
    }

    #[test]
    fn requests_are_recognised() {
        assert_eq!(parse_request("get=1\n"), Request::Get);
        assert_eq!(parse_request("set=1"), Request::Set);
        assert!(matches!(parse_request("xyz"), Request::Unknown(_)));
    }
}
