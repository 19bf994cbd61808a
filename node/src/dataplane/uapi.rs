//! WireGuard's cross-platform configuration protocol (`get=1` and `set=1`), so that the stock
//! `wg` reads the node in every mode and configures it in plain WireGuard mode. No I/O here.
//!
//! - In the zero-trust modes (static, coordinator) `set=1` is refused with EPERM: the peers come
//!   from the config file or the coordinator, with their identities and filter.
//! - In plain WireGuard mode ([`Device`]) a `set=1` request is parsed whole and applied to a copy
//!   of the device; any error answers `errno=-N` (N a positive errno) and leaves the device as it was.
//!
//! A [`Device`] is WireGuard's view of the interface: the keys, port and peers exactly as `wg`
//! set them, in the order it set them, so that `get=1` (and `wg showconf`) reads them back.

use std::collections::{HashMap, HashSet};
use std::fmt::Write;
use std::net::SocketAddr;
use std::time::SystemTime;

use ipnet::IpNet;
use ztnet_proto::{PrivateKey, WgKey};

use super::peers::PeerSnapshot;
use crate::netconfig::{PeerConfig, PresharedKey};

/// errno answered to `set=1` in the zero-trust modes: EPERM, not permitted in this mode.
pub const SET_REFUSED_ERRNO: i32 = 1;

/// errno for a malformed or unknown line: EINVAL.
pub const EINVAL: i32 = 22;

/// errno for a `protocol_version` other than 1: EPROTONOSUPPORT.
pub const EPROTONOSUPPORT: i32 = 93;

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

/// A refused `set=1`: the errno to answer and what was wrong (for the log).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (errno {errno})")]
pub struct SetError {
    /// The errno answered.
    pub errno: i32,
    /// What was wrong, naming the line.
    pub message: String,
}

fn invalid(message: String) -> SetError {
    SetError {
        errno: EINVAL,
        message,
    }
}

/// One peer as `wg` configured it.
#[derive(Debug, Clone)]
pub struct DevicePeer {
    /// The peer's public key.
    pub public_key: WgKey,
    /// Preshared key, if any.
    pub preshared_key: Option<PresharedKey>,
    /// The endpoint last set.
    pub endpoint: Option<SocketAddr>,
    /// Persistent keepalive in seconds, 0 for off.
    pub persistent_keepalive: u16,
    /// Allowed IPs in the order they were set. Between requests every entry is owned by this
    /// peer and listed once; within a request it may hold entries moved to another peer.
    allowed_ips: Vec<IpNet>,
}

impl DevicePeer {
    /// The allowed IPs, in the order they were set.
    pub fn allowed_ips(&self) -> &[IpNet] {
        &self.allowed_ips
    }
}

/// The plain WireGuard device: what `set=1` changes and `get=1` reads back.
#[derive(Debug, Clone, Default)]
pub struct Device {
    /// The private key; none until one is set (then no handshake happens).
    pub private_key: Option<PrivateKey>,
    /// The listen port asked for; 0 keeps the port the socket has.
    pub listen_port: u16,
    /// The firewall mark for outgoing datagrams; 0 for none.
    pub fwmark: u32,
    peers: Vec<DevicePeer>,
    by_key: HashMap<[u8; 32], usize>,
    /// Which peer each allowed IP belongs to (an allowed IP belongs to one peer at most).
    owner: HashMap<IpNet, [u8; 32]>,
}

/// What a successful `set=1` changed besides the peers, for the shell to carry out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetOutcome {
    /// A listen port was given (it may equal the current one).
    pub listen_port: Option<u16>,
    /// A fwmark was given.
    pub fwmark: Option<u32>,
    /// The private key was given (set or removed).
    pub private_key_changed: bool,
    /// Peers whose endpoint was given, with it: the data plane moves them there now, even
    /// when the peer had roamed away from the same configured endpoint.
    pub endpoints: Vec<(WgKey, SocketAddr)>,
}

impl Device {
    /// The peers, in the order they were added.
    pub fn peers(&self) -> &[DevicePeer] {
        &self.peers
    }

    /// The public key of the private key in force.
    pub fn public_key(&self) -> Option<WgKey> {
        self.private_key.as_ref().map(PrivateKey::public_key)
    }

    /// Applies the lines of a `set=1` request (without the `set=1` line and the blank line).
    /// All or nothing: on error `self` is unchanged.
    pub fn apply_set<'a>(
        &mut self,
        lines: impl IntoIterator<Item = &'a str>,
    ) -> Result<SetOutcome, SetError> {
        let mut next = self.clone();
        let mut outcome = SetOutcome::default();
        let mut dirty: HashSet<[u8; 32]> = HashSet::new();
        // The peer the following lines are about; None before the first public_key, or when
        // `update_only` skips a peer that does not exist, or after `remove`.
        let mut current: Option<[u8; 32]> = None;
        let mut in_peer = false;
        let mut skipping = false;
        // The current peer did not exist before its `public_key` line (for `update_only`).
        let mut created = false;
        for (n, line) in lines.into_iter().enumerate() {
            let n = n + 2;
            let line = line.trim_end_matches('\r');
            if line.is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(invalid(format!("line {n}: {line:?} is not KEY=VALUE")));
            };
            if key == "public_key" {
                let k = parse_hex_key(value).map_err(|e| invalid(format!("line {n}: {e}")))?;
                in_peer = true;
                skipping = false;
                current = Some(k);
                if next.public_key().is_some_and(|own| own.0 == k) {
                    // WireGuard ignores a peer that has the interface's own key.
                    skipping = true;
                    current = None;
                    continue;
                }
                // A bare `public_key` line adds the peer.
                created = !next.by_key.contains_key(&k);
                next.peer_slot(k);
                continue;
            }
            if !in_peer {
                next.set_interface(key, value, n, &mut outcome, &mut dirty)?;
                continue;
            }
            if skipping {
                if key == "update_only" || key == "remove" || is_peer_key(key) {
                    continue;
                }
                return Err(invalid(format!("line {n}: unknown peer key {key:?}")));
            }
            let Some(k) = current else {
                return Err(invalid(format!("line {n}: {key} outside a peer")));
            };
            match key {
                "update_only" => {
                    expect_true(value, n)?;
                    if created {
                        next.remove_peer(&k);
                        skipping = true;
                    }
                    continue;
                }
                "remove" => {
                    expect_true(value, n)?;
                    next.remove_peer(&k);
                    skipping = true;
                    continue;
                }
                _ => {}
            }
            let slot = next.peer_slot(k);
            match key {
                "preshared_key" => {
                    let psk =
                        parse_hex_key(value).map_err(|e| invalid(format!("line {n}: {e}")))?;
                    next.peers[slot].preshared_key = (psk != [0; 32]).then_some(PresharedKey(psk));
                }
                "endpoint" => {
                    let ep: SocketAddr = value.parse().map_err(|_| {
                        invalid(format!("line {n}: endpoint {value:?} is not IP:PORT"))
                    })?;
                    next.peers[slot].endpoint = Some(ep);
                    outcome.endpoints.retain(|(key, _)| key.0 != k);
                    outcome.endpoints.push((WgKey(k), ep));
                }
                "persistent_keepalive_interval" => {
                    next.peers[slot].persistent_keepalive = value.parse().map_err(|_| {
                        invalid(format!("line {n}: keepalive {value:?} is not 0-65535"))
                    })?;
                }
                "replace_allowed_ips" => {
                    expect_true(value, n)?;
                    for net in std::mem::take(&mut next.peers[slot].allowed_ips) {
                        if next.owner.get(&net) == Some(&k) {
                            next.owner.remove(&net);
                        }
                    }
                }
                "allowed_ip" => {
                    let net = ztnet_proto::prefix::parse(value)
                        .map_err(|e| invalid(format!("line {n}: allowed_ip: {e}")))?;
                    next.add_allowed_ip(slot, net.trunc(), &mut dirty);
                }
                "protocol_version" => {
                    if value != "1" {
                        return Err(SetError {
                            errno: EPROTONOSUPPORT,
                            message: format!("line {n}: protocol_version {value} unsupported"),
                        });
                    }
                }
                other => return Err(invalid(format!("line {n}: unknown peer key {other:?}"))),
            }
        }
        next.compact(&dirty);
        *self = next;
        Ok(outcome)
    }

    fn set_interface(
        &mut self,
        key: &str,
        value: &str,
        n: usize,
        outcome: &mut SetOutcome,
        dirty: &mut HashSet<[u8; 32]>,
    ) -> Result<(), SetError> {
        match key {
            "private_key" => {
                let k = parse_hex_key(value).map_err(|e| invalid(format!("line {n}: {e}")))?;
                self.private_key = if k == [0; 32] {
                    None
                } else {
                    let text = WgKey(k).to_base64();
                    Some(
                        PrivateKey::parse(&text)
                            .map_err(|e| invalid(format!("line {n}: private key: {e}")))?,
                    )
                };
                outcome.private_key_changed = true;
            }
            "listen_port" => {
                let port: u16 = value
                    .parse()
                    .map_err(|_| invalid(format!("line {n}: listen_port {value:?}")))?;
                self.listen_port = port;
                outcome.listen_port = Some(port);
            }
            "fwmark" => {
                let mark: u32 = if value.is_empty() {
                    0
                } else {
                    value
                        .parse()
                        .map_err(|_| invalid(format!("line {n}: fwmark {value:?}")))?
                };
                self.fwmark = mark;
                outcome.fwmark = Some(mark);
            }
            "replace_peers" => {
                expect_true(value, n)?;
                self.peers.clear();
                self.by_key.clear();
                self.owner.clear();
                dirty.clear();
            }
            other => {
                return Err(invalid(format!(
                    "line {n}: unknown interface key {other:?}"
                )));
            }
        }
        Ok(())
    }

    /// The slot of the peer with key `k`, added at the end when it is new.
    fn peer_slot(&mut self, k: [u8; 32]) -> usize {
        if let Some(&slot) = self.by_key.get(&k) {
            return slot;
        }
        self.peers.push(DevicePeer {
            public_key: WgKey(k),
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: 0,
            allowed_ips: Vec::new(),
        });
        let slot = self.peers.len() - 1;
        self.by_key.insert(k, slot);
        slot
    }

    fn remove_peer(&mut self, k: &[u8; 32]) {
        let Some(slot) = self.by_key.remove(k) else {
            return;
        };
        let peer = self.peers.remove(slot);
        for net in peer.allowed_ips {
            if self.owner.get(&net) == Some(k) {
                self.owner.remove(&net);
            }
        }
        for (i, p) in self.peers.iter().enumerate().skip(slot) {
            self.by_key.insert(p.public_key.0, i);
        }
    }

    /// Gives `net` to the peer in `slot`, taking it from whichever peer had it.
    fn add_allowed_ip(&mut self, slot: usize, net: IpNet, dirty: &mut HashSet<[u8; 32]>) {
        let k = self.peers[slot].public_key.0;
        match self.owner.insert(net, k) {
            Some(prev) if prev == k => return,
            Some(prev) => {
                dirty.insert(prev);
                // This peer may still list `net` from before it moved away in this request.
                dirty.insert(k);
            }
            None => {}
        }
        self.peers[slot].allowed_ips.push(net);
    }

    /// Drops the entries a peer lost to another one, and repeats.
    fn compact(&mut self, dirty: &HashSet<[u8; 32]>) {
        for k in dirty {
            let Some(&slot) = self.by_key.get(k) else {
                continue;
            };
            let owner = &self.owner;
            let mut seen = HashSet::new();
            self.peers[slot]
                .allowed_ips
                .retain(|net| owner.get(net) == Some(k) && seen.insert(*net));
        }
    }

    /// The data plane's peers: none without a private key (WireGuard does not handshake then).
    /// Each is named by its public key; the persistent keepalive 0 means off.
    pub fn peer_configs(&self) -> Vec<PeerConfig> {
        if self.private_key.is_none() {
            return Vec::new();
        }
        self.peers
            .iter()
            .map(|p| PeerConfig {
                name: p.public_key.to_base64(),
                public_key: p.public_key,
                endpoint: p.endpoint,
                endpoints: Vec::new(),
                allowed_ips: p.allowed_ips.clone(),
                persistent_keepalive: (p.persistent_keepalive > 0)
                    .then_some(p.persistent_keepalive),
                identity: None,
                preshared_key: p.preshared_key.clone(),
                next_public_key: None,
            })
            .collect()
    }

    /// The answer to `get=1`: the device as set, with each peer's live endpoint, handshake time
    /// and byte counts from `live` (matched by public key).
    pub fn format_get(&self, listen_port: u16, live: &[PeerSnapshot], now: SystemTime) -> String {
        let by_key: HashMap<[u8; 32], &PeerSnapshot> =
            live.iter().map(|p| (p.config.public_key.0, p)).collect();
        let mut s = String::with_capacity(64 + self.owner.len() * 32);
        if let Some(k) = &self.private_key {
            let _ = writeln!(s, "private_key={}", hex::encode(k.to_bytes()));
        }
        let _ = writeln!(s, "listen_port={listen_port}");
        if self.fwmark != 0 {
            let _ = writeln!(s, "fwmark={}", self.fwmark);
        }
        for p in &self.peers {
            let snap = by_key.get(&p.public_key.0).copied();
            let _ = writeln!(s, "public_key={}", hex::encode(p.public_key.0));
            if let Some(psk) = &p.preshared_key {
                let _ = writeln!(s, "preshared_key={}", hex::encode(psk.0));
            }
            let _ = writeln!(s, "protocol_version=1");
            if let Some(ep) = snap.and_then(|l| l.endpoint).or(p.endpoint) {
                let _ = writeln!(s, "endpoint={ep}");
            }
            write_stats(&mut s, snap, now);
            let _ = writeln!(
                s,
                "persistent_keepalive_interval={}",
                p.persistent_keepalive
            );
            for net in &p.allowed_ips {
                let _ = writeln!(s, "allowed_ip={net}");
            }
        }
        s.push_str("errno=0\n\n");
        s
    }
}

fn write_stats(s: &mut String, snap: Option<&PeerSnapshot>, now: SystemTime) {
    let (sec, nsec) = match snap
        .and_then(|p| p.since_handshake)
        .and_then(|d| now.checked_sub(d))
    {
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
    let _ = writeln!(s, "tx_bytes={}", snap.map_or(0, |p| p.tx_bytes));
    let _ = writeln!(s, "rx_bytes={}", snap.map_or(0, |p| p.rx_bytes));
}

fn is_peer_key(key: &str) -> bool {
    matches!(
        key,
        "preshared_key"
            | "endpoint"
            | "persistent_keepalive_interval"
            | "replace_allowed_ips"
            | "allowed_ip"
            | "protocol_version"
    )
}

fn expect_true(value: &str, n: usize) -> Result<(), SetError> {
    if value == "true" {
        Ok(())
    } else {
        Err(invalid(format!(
            "line {n}: only the value true is allowed, not {value:?}"
        )))
    }
}

fn parse_hex_key(value: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(value, &mut out)
        .map_err(|_| "a key must be 64 hexadecimal digits".to_string())?;
    Ok(out)
}

/// The answer to `get=1` in the zero-trust modes. The private key is included because `wg`
/// derives the interface's public key from it; the socket is root-only (0600) on the node's
/// own machine.
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
        write_stats(&mut s, Some(p), now);
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

/// The answer to a request the node does not carry out. The number goes negated, as
/// wireguard-go sends it: `wg` reads it into its return value and sets `errno` to its
/// negation, so `errno=-1` prints "Operation not permitted" (and `errno=1`, "Unknown error -1").
pub fn format_error(errno: i32) -> String {
    format!("errno={}\n\n", -errno.abs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netconfig::PeerConfig;
    use std::time::Duration;

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
            initiations_sent: 1,
            initiations_received: 0,
            initiations_held: 0,
            path_mtu: None,
            path_mtu_state: Default::default(),
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

    fn hexkey(k: &WgKey) -> String {
        hex::encode(k.0)
    }

    fn set(dev: &mut Device, text: &str) -> Result<SetOutcome, SetError> {
        dev.apply_set(text.lines())
    }

    fn get_lines(dev: &Device) -> Vec<String> {
        dev.format_get(1, &[], SystemTime::UNIX_EPOCH)
            .lines()
            .map(String::from)
            .collect()
    }

    #[test]
    fn set_then_get_reads_back_keys_port_peer_and_allowed_ips() {
        let own = PrivateKey::generate();
        let peer = PrivateKey::generate().public_key();
        let psk = [7u8; 32];
        let mut dev = Device::default();
        let text = format!(
            "private_key={}\nlisten_port=10000\nfwmark=5\nreplace_peers=true\n\
             public_key={}\npreshared_key={}\nendpoint=[::1]:20000\n\
             persistent_keepalive_interval=25\nreplace_allowed_ips=true\n\
             allowed_ip=192.168.241.2/32\nallowed_ip=fd00::2/128\nallowed_ip=10.1.2.3/16\n\
             protocol_version=1\n",
            hex::encode(own.to_bytes()),
            hexkey(&peer),
            hex::encode(psk)
        );

        let outcome = set(&mut dev, &text).expect("valid set");

        assert_eq!(outcome.listen_port, Some(10000));
        assert_eq!(
            outcome.endpoints,
            vec![(peer, "[::1]:20000".parse().expect("addr"))]
        );
        let lines = get_lines(&dev);
        for want in [
            format!("private_key={}", hex::encode(own.to_bytes())),
            "fwmark=5".into(),
            format!("public_key={}", hexkey(&peer)),
            format!("preshared_key={}", hex::encode(psk)),
            "endpoint=[::1]:20000".into(),
            "persistent_keepalive_interval=25".into(),
            "allowed_ip=192.168.241.2/32".into(),
            "allowed_ip=fd00::2/128".into(),
            "allowed_ip=10.1.0.0/16".into(),
        ] {
            assert!(lines.contains(&want), "{want} missing from {lines:?}");
        }
        let configs = dev.peer_configs();
        assert_eq!(configs.len(), 1);
        assert_eq!(configs[0].preshared_key, Some(PresharedKey(psk)));
        assert_eq!(configs[0].persistent_keepalive, Some(25));
    }

    #[test]
    fn an_allowed_ip_moves_to_the_more_specific_peers_owner_and_back() {
        let own = PrivateKey::generate();
        let (a, b) = (
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
        );
        let mut dev = Device::default();
        let base = format!(
            "private_key={}\npublic_key={}\nallowed_ip=10.0.0.0/24\nallowed_ip=10.0.0.2/32\n",
            hex::encode(own.to_bytes()),
            hexkey(&a)
        );
        set(&mut dev, &base).expect("set a");

        set(
            &mut dev,
            &format!("public_key={}\nallowed_ip=10.0.0.2/32\n", hexkey(&b)),
        )
        .expect("set b");

        let ips = |dev: &Device, i: usize| dev.peers()[i].allowed_ips().to_vec();
        assert_eq!(
            ips(&dev, 0),
            vec!["10.0.0.0/24".parse::<IpNet>().expect("net")]
        );
        assert_eq!(
            ips(&dev, 1),
            vec!["10.0.0.2/32".parse::<IpNet>().expect("net")]
        );

        set(
            &mut dev,
            &format!("public_key={}\nremove=true\n", hexkey(&b)),
        )
        .expect("remove");
        assert_eq!(dev.peers().len(), 1);
        assert_eq!(
            ips(&dev, 0).len(),
            1,
            "a removed peer's IPs do not come back"
        );
    }

    #[test]
    fn a_bad_line_answers_einval_and_changes_nothing() {
        let own = PrivateKey::generate();
        let peer = PrivateKey::generate().public_key();
        let mut dev = Device::default();
        set(
            &mut dev,
            &format!(
                "private_key={}\nlisten_port=1\n",
                hex::encode(own.to_bytes())
            ),
        )
        .expect("set");
        let before = get_lines(&dev);

        for bad in [
            format!(
                "listen_port=2\npublic_key={}\nallowed_ip=10.0.0.0/99\n",
                hexkey(&peer)
            ),
            format!("public_key={}\nendpoint=nowhere\n", hexkey(&peer)),
            "public_key=abc\n".to_string(),
            "bogus=1\n".to_string(),
            format!("public_key={}\nremove=false\n", hexkey(&peer)),
        ] {
            let e = set(&mut dev, &bad).expect_err("refused");
            assert_eq!(e.errno, EINVAL, "{bad}");
        }
        let e = set(
            &mut dev,
            &format!("public_key={}\nprotocol_version=2\n", hexkey(&peer)),
        )
        .expect_err("refused");
        assert_eq!(e.errno, EPROTONOSUPPORT);

        assert_eq!(get_lines(&dev), before);
    }

    #[test]
    fn update_only_skips_unknown_peers_and_replace_peers_clears() {
        let own = PrivateKey::generate();
        let (a, b) = (
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
        );
        let mut dev = Device::default();
        set(
            &mut dev,
            &format!(
                "private_key={}\npublic_key={}\n",
                hex::encode(own.to_bytes()),
                hexkey(&a)
            ),
        )
        .expect("set");

        set(
            &mut dev,
            &format!(
                "public_key={}\nupdate_only=true\nallowed_ip=10.9.0.0/16\n\
                 public_key={}\nupdate_only=true\nallowed_ip=10.8.0.0/16\n",
                hexkey(&b),
                hexkey(&a)
            ),
        )
        .expect("update only");
        assert_eq!(dev.peers().len(), 1);
        assert_eq!(dev.peers()[0].allowed_ips().len(), 1);

        set(&mut dev, "replace_peers=true\n").expect("replace");
        assert!(dev.peers().is_empty());
        // The own key as a peer is ignored, as WireGuard does.
        set(
            &mut dev,
            &format!("public_key={}\n", hexkey(&own.public_key())),
        )
        .expect("own");
        assert!(dev.peers().is_empty());
    }

    #[test]
    fn no_private_key_means_no_data_plane_peers() {
        let peer = PrivateKey::generate().public_key();
        let mut dev = Device::default();
        set(
            &mut dev,
            &format!("public_key={}\nallowed_ip=10.0.0.1/32\n", hexkey(&peer)),
        )
        .expect("set");

        assert_eq!(dev.peers().len(), 1);
        assert!(dev.peer_configs().is_empty());
        assert!(
            !get_lines(&dev)
                .iter()
                .any(|l| l.starts_with("private_key="))
        );
    }

    #[test]
    fn tens_of_thousands_of_allowed_ips_read_back_in_order() {
        let own = PrivateKey::generate();
        let peer = PrivateKey::generate().public_key();
        let mut text = format!(
            "private_key={}\nreplace_peers=true\npublic_key={}\nreplace_allowed_ips=true\n",
            hex::encode(own.to_bytes()),
            hexkey(&peer)
        );
        let mut want = Vec::new();
        for a in 1..=255u32 {
            for b in 0..=255u32 {
                let v4 = format!("{a}.{b}.0.0/16");
                let v6 = format!("{a:x}::{b:x}/128");
                text.push_str(&format!("allowed_ip={v4}\nallowed_ip={v6}\n"));
                want.push(format!("allowed_ip={v4}"));
                let v6: IpNet = v6.parse().expect("test prefix parses");
                want.push(format!("allowed_ip={v6}"));
            }
        }
        let mut dev = Device::default();
        set(&mut dev, &text).expect("set");

        let got: Vec<String> = get_lines(&dev)
            .into_iter()
            .filter(|l| l.starts_with("allowed_ip="))
            .collect();
        assert_eq!(got.len(), 255 * 256 * 2);
        assert_eq!(got, want);
    }
}
