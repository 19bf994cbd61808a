//! The peer table: cryptokey routing, one boringtun session per peer, anti-spoofing, the
//! netpolicy filter and drop counters. No sockets, no TUN: the shell hands packets in and gets
//! them back through a [`Transmit`].
//!
//! # How to drive it
//!
//! - Build a table with [`PeerTable::new`], passing the previous table so that peers whose key
//!   did not change keep their session.
//! - Feed inputs: [`PeerTable::handle_tun_packet`] for a packet read from the TUN,
//!   [`PeerTable::handle_datagram`] for a UDP datagram, [`PeerTable::handle_timers`] every
//!   100-250 ms. Each writes its outputs to the `Transmit` before it returns.
//! - Time: the filter runs on the `now` passed in. boringtun's `Tunn` reads its own clock for
//!   the WireGuard timers; that is the only clock read, and it stays inside `Tunn`.
//!
//! The methods take `&self`: per-peer state sits behind its own mutex and the filter behind one
//! shared mutex, so the TUN and UDP threads run side by side. The table itself is immutable
//! once built; a new configuration is a new table.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use netpolicy::{Filter, Verdict};
use ztnet_proto::{PrivateKey, WgKey};

use super::counters::{Counters, DropReason};
use super::routes::PrefixTable;
use crate::netconfig::PeerConfig;

/// Handshakes per second above which the node answers with cookies (WireGuard's under-load
/// rule).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// Smallest buffer the `handle_*` methods accept: the largest datagram plus WireGuard overhead.
pub const MIN_BUFFER: usize = 65_535 + 32;

/// Where the peer table's outputs go.
pub trait Transmit {
    /// Sends a WireGuard datagram to `to`.
    fn send_udp(&mut self, to: SocketAddr, datagram: &[u8]);
    /// Writes a decrypted, checked IP packet to the TUN.
    fn write_tun(&mut self, packet: &[u8]);
}

/// A peer's session up or down, reported by [`PeerTable::handle_timers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// A handshake completed with a peer that had no session.
    SessionUp {
        /// Peer name.
        peer: String,
    },
    /// A peer's session expired.
    SessionDown {
        /// Peer name.
        peer: String,
    },
}

/// One peer's counters and session state, for status.
#[derive(Debug, Clone)]
pub struct PeerSnapshot {
    /// The peer's configuration.
    pub config: PeerConfig,
    /// Current endpoint (configured, or learnt from an authenticated packet).
    pub endpoint: Option<SocketAddr>,
    /// Time since the last completed handshake.
    pub since_handshake: Option<Duration>,
    /// Bytes sent to the peer, before encryption.
    pub tx_bytes: u64,
    /// Bytes received from the peer, after decryption.
    pub rx_bytes: u64,
}

/// The node's peers and how packets reach them. See the module doc for the order of calls.
pub struct PeerTable {
    private: StaticSecret,
    public: PublicKey,
    rate_limiter: Arc<RateLimiter>,
    peers: Vec<Peer>,
    by_key: HashMap<[u8; 32], usize>,
    by_index: HashMap<u32, usize>,
    routes: PrefixTable<usize>,
    filter: Arc<Mutex<Filter>>,
    counters: Arc<Counters>,
    next_index: u32,
    warnings: Vec<String>,
}

struct Peer {
    config: PeerConfig,
    /// 24-bit local index; boringtun puts it in the top bits of every receiver index.
    index: u32,
    state: Arc<Mutex<PeerState>>,
}

struct PeerState {
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
    session_up: bool,
}

/// The kind of an incoming WireGuard message, kept to decide what authenticates.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Init,
    Response,
    Cookie,
    Data,
}

impl PeerTable {
    /// Builds a table for `peers`. Peers of `previous` with the same name and public key keep
    /// their session (and their learnt endpoint unless the configured one changed). Two peers
    /// claiming the same prefix: the later one wins, as WireGuard requires, and a warning names
    /// both. `first_index` seeds the local session indices when there is no previous table.
    pub fn new(
        private_key: &PrivateKey,
        peers: &[PeerConfig],
        previous: Option<&PeerTable>,
        filter: Arc<Mutex<Filter>>,
        counters: Arc<Counters>,
        first_index: u32,
    ) -> PeerTable {
        let private = StaticSecret::from(private_key.to_bytes());
        let public = PublicKey::from(&private);
        let rate_limiter = match previous {
            Some(p) => p.rate_limiter.clone(),
            None => Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
        };
        let mut table = PeerTable {
            private,
            public,
            rate_limiter,
            peers: Vec::with_capacity(peers.len()),
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            routes: PrefixTable::default(),
            filter,
            counters,
            next_index: previous.map_or(first_index, |p| p.next_index) & 0x00ff_ffff,
            warnings: Vec::new(),
        };
        let old: HashMap<(&str, WgKey), &Peer> = previous
            .map(|p| {
                p.peers
                    .iter()
                    .map(|peer| ((peer.config.name.as_str(), peer.config.public_key), peer))
                    .collect()
            })
            .unwrap_or_default();

        for config in peers {
            if table.by_key.contains_key(&config.public_key.0) {
                table.warnings.push(format!(
                    "peer {} repeats the public key {} of an earlier peer; ignored",
                    config.name,
                    config.public_key.short()
                ));
                continue;
            }
            let key = (config.name.as_str(), config.public_key);
            let reused = old
                .get(&key)
                .filter(|p| p.config.persistent_keepalive == config.persistent_keepalive);
            let peer = match reused {
                Some(p) => {
                    if p.config.endpoint != config.endpoint && config.endpoint.is_some() {
                        lock(&p.state).endpoint = config.endpoint;
                    }
                    Peer {
                        config: config.clone(),
                        index: p.index,
                        state: p.state.clone(),
                    }
                }
                None => table.new_peer(config),
            };
            let slot = table.peers.len();
            table.by_key.insert(config.public_key.0, slot);
            table.by_index.insert(peer.index, slot);
            table.peers.push(peer);
        }
        table.build_routes();
        table
    }

    /// Handles an IP packet read from the TUN: route, outbound filter, encrypt, send.
    pub fn handle_tun_packet(
        &self,
        packet: &[u8],
        now: Instant,
        buf: &mut [u8],
        out: &mut impl Transmit,
    ) {
        let Some(dst) = Tunn::dst_address(packet) else {
            self.counters.drop_packet(DropReason::MalformedPacket);
            return;
        };
        let Some(&slot) = self.routes.lookup(dst) else {
            self.counters.drop_packet(DropReason::NoPeer);
            return;
        };
        let peer = &self.peers[slot];

        let verdict = lock(&self.filter).outbound(&peer.config.name, packet, now);
        if let Verdict::Deny(reason) = verdict {
            self.counters
                .drop_packet(DropReason::Outbound((&reason).into()));
            return;
        }

        let mut state = lock(&peer.state);
        match state.tunn.encapsulate(packet, buf) {
            TunnResult::WriteToNetwork(datagram) => match state.endpoint {
                Some(to) => out.send_udp(to, datagram),
                None => self.counters.drop_packet(DropReason::NoEndpoint),
            },
            TunnResult::Err(e) => self.counters.drop_packet(engine_drop(&e)),
            _ => {}
        }
    }

    /// Handles a UDP datagram from `from`: find the peer, decrypt, check the inner source
    /// against the peer's allowed IPs, inbound filter, write to the TUN. Replies (handshake
    /// responses, cookies, queued packets) go out through `out`.
    pub fn handle_datagram(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        buf: &mut [u8],
        out: &mut impl Transmit,
    ) {
        let from = unmap(from);
        let Some((slot, kind)) = self.find_peer(from, datagram, buf, out) else {
            return;
        };
        let peer = &self.peers[slot];
        let mut state = lock(&peer.state);

        let result = state.tunn.decapsulate(Some(from.ip()), datagram, buf);
        match result {
            TunnResult::WriteToNetwork(reply) => {
                // A cookie reply (type 3) proves nothing about the sender; a handshake
                // response or keepalive does.
                let authenticated = reply.first() != Some(&3);
                out.send_udp(from, reply);
                if authenticated {
                    state.endpoint = Some(from);
                    self.flush_queue(&mut state, buf, out);
                }
            }
            TunnResult::WriteToTunnelV4(packet, src) => {
                state.endpoint = Some(from);
                drop(state);
                self.deliver(slot, IpAddr::V4(src), packet, now, out);
            }
            TunnResult::WriteToTunnelV6(packet, src) => {
                state.endpoint = Some(from);
                drop(state);
                self.deliver(slot, IpAddr::V6(src), packet, now, out);
            }
            TunnResult::Done => {
                // A keepalive authenticates the sender; a cookie reply does not (FC-25).
                if kind == Kind::Data {
                    state.endpoint = Some(from);
                }
            }
            TunnResult::Err(e) => self.counters.drop_packet(engine_drop(&e)),
        }
    }

    /// Runs boringtun's timers for every peer: handshake retries, keepalives, rekeys,
    /// expiry. Returns the sessions that came up or went down since the last call.
    pub fn handle_timers(&self, buf: &mut [u8], out: &mut impl Transmit) -> Vec<SessionEvent> {
        self.rate_limiter.reset_count();
        let mut events = Vec::new();
        for peer in &self.peers {
            let mut state = lock(&peer.state);
            match state.tunn.update_timers(buf) {
                TunnResult::WriteToNetwork(datagram) => {
                    if let Some(to) = state.endpoint {
                        out.send_udp(to, datagram);
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                _ => {}
            }
            let up = state.tunn.time_since_last_handshake().is_some() && !state.tunn.is_expired();
            if up != state.session_up {
                state.session_up = up;
                let peer = peer.config.name.clone();
                events.push(if up {
                    SessionEvent::SessionUp { peer }
                } else {
                    SessionEvent::SessionDown { peer }
                });
            }
        }
        events
    }

    /// Each peer's state, in configuration order.
    pub fn snapshot(&self) -> Vec<PeerSnapshot> {
        self.peers
            .iter()
            .map(|p| {
                let state = lock(&p.state);
                let (since, tx, rx, _, _) = state.tunn.stats();
                PeerSnapshot {
                    config: p.config.clone(),
                    endpoint: state.endpoint,
                    since_handshake: since,
                    tx_bytes: tx as u64,
                    rx_bytes: rx as u64,
                }
            })
            .collect()
    }

    /// Problems found while building the table (overlapping allowed IPs, repeated keys).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The node's own public key.
    pub fn public_key(&self) -> WgKey {
        WgKey(self.public.to_bytes())
    }

    /// The drop counters this table counts into.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    fn new_peer(&mut self, config: &PeerConfig) -> Peer {
        let mut index = self.next_index;
        while self.by_index.contains_key(&index) {
            index = (index + 1) & 0x00ff_ffff;
        }
        self.next_index = (index + 1) & 0x00ff_ffff;
        let tunn = Tunn::new(
            self.private.clone(),
            PublicKey::from(config.public_key.0),
            None,
            config.persistent_keepalive.filter(|&k| k > 0),
            index,
            Some(self.rate_limiter.clone()),
        );
        Peer {
            config: config.clone(),
            index,
            state: Arc::new(Mutex::new(PeerState {
                tunn,
                endpoint: config.endpoint.map(unmap),
                session_up: false,
            })),
        }
    }

    fn build_routes(&mut self) {
        let mut owner: HashMap<ipnet::IpNet, usize> = HashMap::new();
        for (slot, peer) in self.peers.iter().enumerate() {
            for net in &peer.config.allowed_ips {
                let net = net.trunc();
                if let Some(prev) = owner.insert(net, slot) {
                    if prev != slot {
                        self.warnings.push(format!(
                            "allowed ip {net} is claimed by peers {} and {}; {} wins (listed last)",
                            self.peers[prev].config.name, peer.config.name, peer.config.name
                        ));
                    }
                }
                self.routes.insert(net, slot);
            }
        }
    }

    /// Finds the peer a datagram belongs to: by static key for a handshake initiation (after
    /// its MAC checks out), by receiver index otherwise.
    fn find_peer(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        buf: &mut [u8],
        out: &mut impl Transmit,
    ) -> Option<(usize, Kind)> {
        let parsed = match Tunn::parse_incoming_packet(datagram) {
            Ok(p) => p,
            Err(_) => {
                self.counters.drop_packet(DropReason::MalformedDatagram);
                return None;
            }
        };
        let (receiver, kind) = match parsed {
            Packet::HandshakeInit(ref init) => {
                match self
                    .rate_limiter
                    .verify_packet(Some(from.ip()), datagram, buf)
                {
                    Ok(_) => {}
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        out.send_udp(from, cookie);
                        return None;
                    }
                    Err(_) => {
                        self.counters.drop_packet(DropReason::InvalidMac);
                        return None;
                    }
                }
                let Ok(half) = parse_handshake_anon(&self.private, &self.public, init) else {
                    self.counters.drop_packet(DropReason::HandshakeFailed);
                    return None;
                };
                let Some(&slot) = self.by_key.get(&half.peer_static_public) else {
                    self.counters.drop_packet(DropReason::UnknownKey);
                    return None;
                };
                return Some((slot, Kind::Init));
            }
            Packet::HandshakeResponse(ref p) => (p.receiver_idx, Kind::Response),
            Packet::PacketCookieReply(ref p) => (p.receiver_idx, Kind::Cookie),
            Packet::PacketData(ref p) => (p.receiver_idx, Kind::Data),
        };
        match self.by_index.get(&(receiver >> 8)) {
            Some(&slot) => Some((slot, kind)),
            None => {
                self.counters.drop_packet(DropReason::UnknownIndex);
                None
            }
        }
    }

    fn flush_queue(&self, state: &mut PeerState, buf: &mut [u8], out: &mut impl Transmit) {
        let Some(to) = state.endpoint else {
            return;
        };
        while let TunnResult::WriteToNetwork(datagram) = state.tunn.decapsulate(None, &[], buf) {
            out.send_udp(to, datagram);
        }
    }

    fn deliver(
        &self,
        slot: usize,
        src: IpAddr,
        packet: &[u8],
        now: Instant,
        out: &mut impl Transmit,
    ) {
        if self.routes.lookup(src) != Some(&slot) {
            self.counters.drop_packet(DropReason::SpoofedSource);
            return;
        }
        let name = &self.peers[slot].config.name;
        let verdict = lock(&self.filter).inbound(name, packet, now);
        match verdict {
            Verdict::Allow(_) => out.write_tun(packet),
            Verdict::Deny(reason) => self
                .counters
                .drop_packet(DropReason::Inbound((&reason).into())),
        }
    }
}

/// Locks a mutex, going on with the data if a thread panicked while holding it: every value
/// behind these locks stays consistent between statements, so a poisoned one is still usable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An IPv4-mapped IPv6 address (from a dual-stack socket) as plain IPv4.
pub fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        v4 => v4,
    }
}

fn engine_drop(e: &WireGuardError) -> DropReason {
    match e {
        WireGuardError::InvalidAeadTag => DropReason::DecryptFailed,
        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => DropReason::Replayed,
        WireGuardError::NoCurrentSession | WireGuardError::ConnectionExpired => {
            DropReason::NoSession
        }
        WireGuardError::InvalidMac => DropReason::InvalidMac,
        WireGuardError::WrongKey
        | WireGuardError::WrongIndex
        | WireGuardError::InvalidTai64nTimestamp
        | WireGuardError::WrongTai64nTimestamp
        | WireGuardError::UnexpectedPacket => DropReason::HandshakeFailed,
        WireGuardError::InvalidPacket | WireGuardError::IncorrectPacketLength => {
            DropReason::MalformedDatagram
        }
        _ => DropReason::Engine,
    }
}
