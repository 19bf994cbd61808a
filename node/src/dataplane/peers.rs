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
//! - A peer that arrives with an endpoint and no session (a new table, a new peer, a changed
//!   key) gets a handshake initiation on the next `handle_timers`, without waiting for traffic:
//!   a restarted node so replaces the dead sessions its peers still hold. While a peer has no
//!   session and its last initiation went unanswered, each retry goes to its next endpoint.
//!   An authenticated packet from any address still moves the endpoint there (roaming).
//! - Time: the filter runs on the `now` passed in. boringtun's `Tunn` reads its own clock for
//!   the WireGuard timers; that is the only clock read, and it stays inside `Tunn`.
//!
//! The methods take `&self`: per-peer state sits behind its own mutex and the filter behind one
//! shared mutex, so the TUN and UDP threads run side by side. The table itself is immutable
//! once built; a new configuration is a new table.

use std::collections::{HashMap, HashSet};
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
use super::pmtu::{self, Classified, Message, Prober};
use super::rekey;
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
    /// Sends a WireGuard datagram to `to` from the local address `from` (the one the peer
    /// last reached this node at), or from whatever address the kernel picks for `None`.
    fn send_udp_from(&mut self, to: SocketAddr, from: Option<IpAddr>, datagram: &[u8]) {
        let _ = from;
        self.send_udp(to, datagram);
    }
    /// Like [`Transmit::send_udp_from`], for a datagram larger than the learned path MTU
    /// that must arrive anyway (an inner IPv6 packet of at most 1280 bytes, IPv4 without
    /// DF): over IPv6 it goes as fragments that fit any IPv6 path (FC-23).
    fn send_udp_fragmenting(&mut self, to: SocketAddr, from: Option<IpAddr>, datagram: &[u8]) {
        self.send_udp_from(to, from, datagram);
    }
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

/// A sign that a peer and this node disagree about a WireGuard key (FC-20): handshakes
/// between them cannot succeed until one of them gets fresh peer state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMismatch {
    /// The peer whose address the handshake came from.
    pub peer: String,
    /// That address.
    pub from: SocketAddr,
    /// What was wrong.
    pub kind: MismatchKind,
}

/// What a [`KeyMismatch`] was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MismatchKind {
    /// A handshake initiation under a key this node does not hold for the peer: the peer
    /// changed its key and this node missed it.
    UnknownKey(WgKey),
    /// A handshake initiation for a key this node no longer has: the peer missed this node's
    /// key change.
    StaleKeyForUs,
}

impl std::fmt::Display for KeyMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            MismatchKind::UnknownKey(k) => write!(
                f,
                "peer key mismatch: {} ({}) sent a handshake under key {}, not the key this \
                 node holds for it",
                self.peer,
                self.from,
                k.short()
            ),
            MismatchKind::StaleKeyForUs => write!(
                f,
                "peer key mismatch: {} ({}) sent a handshake for a key this node no longer has",
                self.peer, self.from
            ),
        }
    }
}

/// Most mismatches kept until [`PeerTable::take_mismatches`] collects them.
const MAX_MISMATCHES: usize = 64;

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
    /// Handshake initiations sent to the peer (first handshakes, rekeys, retries).
    pub initiations_sent: u64,
    /// Handshake initiations from the peer that reached its session (after the MAC check).
    pub initiations_received: u64,
    /// Fresh initiations held back by the tie-break of [`rekey::defers`].
    pub initiations_held: u64,
    /// The learned inner path MTU (IPv6 underlay only), if measured.
    pub path_mtu: Option<u16>,
    /// Where the path MTU measurement stands.
    pub path_mtu_state: ztnet_proto::status::PathMtuState,
}

/// Hashes a session index, which this node hands out itself in sequence (see
/// `PeerTable::new_peer`), with one multiplication: every data packet looks its index up, and
/// SipHash's keyed rounds guard against keys an attacker chooses, which these are not. A
/// datagram only chooses which index it asks for.
#[derive(Default)]
struct IndexHasher(u64);

impl std::hash::Hasher for IndexHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u32(u32::from(b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        // Fibonacci hashing: spreads consecutive indices over the high bits, which the
        // table's control bytes use.
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type IndexHash = std::hash::BuildHasherDefault<IndexHasher>;

/// The node's peers and how packets reach them. See the module doc for the order of calls.
pub struct PeerTable {
    private: StaticSecret,
    public: PublicKey,
    rate_limiter: Arc<RateLimiter>,
    peers: Vec<Peer>,
    by_key: HashMap<[u8; 32], usize>,
    by_index: HashMap<u32, usize, IndexHash>,
    routes: PrefixTable<usize>,
    filter: Arc<Mutex<Filter>>,
    counters: Arc<Counters>,
    next_index: u32,
    warnings: Vec<String>,
    /// Key mismatches seen, shared by successive tables, until collected.
    mismatches: Arc<Mutex<Vec<KeyMismatch>>>,
    /// Plain WireGuard mode: cryptokey routing and anti-spoofing decide, the filter is not
    /// consulted. Set only by [`PeerTable::plain_wireguard`].
    plain: bool,
    /// This node's overlay addresses: the source of its path MTU probes, and the only
    /// destinations of probes it answers. Empty: no probing ([`PeerTable::with_local`]).
    local: Vec<IpAddr>,
    /// The tunnel MTU: the largest size probed.
    mtu: u16,
    /// Not plain WireGuard mode, and `local` is known: probe and answer probes.
    probing: bool,
    /// Synthetic ICMP "too big" messages allowed now (refilled over time).
    icmp_budget: Mutex<(u32, Instant)>,
}

/// Synthetic ICMP "too big" messages per second at most, and the burst allowed.
const ICMP_PER_SECOND: u32 = 100;

struct Peer {
    config: PeerConfig,
    /// 24-bit local index; boringtun puts it in the top bits of every receiver index.
    index: u32,
    state: Arc<Mutex<PeerState>>,
}

struct PeerState {
    tunn: Tunn,
    /// The peer's key that `tunn` runs under: `config.public_key`, or its next key once the
    /// peer handshook under that (or, until then, the key it is rotating away from).
    tunn_key: WgKey,
    endpoint: Option<SocketAddr>,
    /// This node's address that the peer last reached it at, at `endpoint`: replies leave from
    /// it. Cleared when the endpoint is set by configuration.
    source: Option<IpAddr>,
    session_up: bool,
    /// The configured endpoints, tried in turn while handshakes go unanswered.
    candidates: Vec<SocketAddr>,
    /// Index in `candidates` of the one tried last.
    cursor: usize,
    /// An initiation went to `endpoint` and nothing authenticated came back since.
    unanswered: bool,
    /// Initiate a handshake on the next timer run (new peer with an endpoint).
    initiate: bool,
    /// A key the peer was seen handshaking under that this node did not hold for it (a key
    /// mismatch): once the configuration names it, the session moves to it at once.
    seen_key: Option<WgKey>,
    /// The last key mismatch seen from this peer, until an authenticated packet from it shows
    /// that the keys agree again: shown in status as a warning.
    mismatch: Option<String>,
    /// This node initiated the session in force (it processed the handshake response and
    /// answered no initiation since): it is the one to rekey an idle session.
    own_session: bool,
    /// Rekeys of idle sessions started, for the jitter.
    rekey_round: u32,
    /// This node answered an initiation: its queued packets go out with the peer's first
    /// data packet on the new session.
    flush_pending: bool,
    /// When `tunn` last produced a handshake initiation (sent or held).
    last_initiation: Option<Instant>,
    /// The path MTU search and its result (FC-23).
    pmtu: Prober,
    initiations_sent: u64,
    initiations_received: u64,
    initiations_held: u64,
}

/// The kind of an incoming WireGuard message, kept to decide what authenticates.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// With the static key of the initiator.
    Init([u8; 32]),
    Response,
    Cookie,
    Data,
}

impl PeerTable {
    /// Builds a table for `peers`. Peers of `previous` with the same name and public key keep
    /// their session (and their learnt endpoint unless the configured one changed). With a
    /// private key other than `previous`'s, or a changed keepalive or preshared key, a peer
    /// gets a fresh session but keeps its learnt endpoint and handshakes there at once. Two peers
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
        let limit = HANDSHAKE_RATE_LIMIT;
        Self::with_limit(
            private_key,
            peers,
            previous,
            filter,
            counters,
            first_index,
            limit,
        )
    }

    /// Like [`PeerTable::new`], with the number of handshakes per second above which the node
    /// answers with cookies instead (when there is no previous table to take it from).
    pub fn with_limit(
        private_key: &PrivateKey,
        peers: &[PeerConfig],
        previous: Option<&PeerTable>,
        filter: Arc<Mutex<Filter>>,
        counters: Arc<Counters>,
        first_index: u32,
        handshake_limit: u64,
    ) -> PeerTable {
        let private = StaticSecret::from(private_key.to_bytes());
        let public = PublicKey::from(&private);
        // A new static key: no session of the previous table is valid any more, and the
        // cookie MACs are keyed by the public key, so the rate limiter is new too.
        let rekeyed = previous.is_some_and(|p| p.public.as_bytes() != public.as_bytes());
        let rate_limiter = match previous {
            Some(p) if !rekeyed => p.rate_limiter.clone(),
            _ => Arc::new(RateLimiter::new(&public, handshake_limit)),
        };
        let mut table = PeerTable {
            private,
            public,
            rate_limiter,
            peers: Vec::with_capacity(peers.len()),
            by_key: HashMap::new(),
            by_index: HashMap::default(),
            routes: PrefixTable::default(),
            filter,
            counters,
            next_index: previous.map_or(first_index, |p| p.next_index) & 0x00ff_ffff,
            warnings: Vec::new(),
            mismatches: previous.map_or_else(Default::default, |p| p.mismatches.clone()),
            plain: false,
            local: Vec::new(),
            mtu: 0,
            probing: false,
            icmp_budget: Mutex::new((ICMP_PER_SECOND, Instant::now())),
        };
        let old_by_name: HashMap<&str, &Peer> = previous
            .map(|p| {
                p.peers
                    .iter()
                    .map(|peer| (peer.config.name.as_str(), peer))
                    .collect()
            })
            .unwrap_or_default();
        let old: HashMap<(&str, WgKey), &Peer> = previous
            .map(|p| {
                p.peers
                    .iter()
                    .map(|peer| ((peer.config.name.as_str(), peer.config.public_key), peer))
                    .collect()
            })
            .unwrap_or_default();

        let taken: HashSet<u32> = old.values().map(|p| p.index).collect();
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
            let reused = old_by_name.get(config.name.as_str()).copied().filter(|p| {
                !rekeyed
                    && p.config.persistent_keepalive == config.persistent_keepalive
                    && p.config.preshared_key == config.preshared_key
                    && p.keeps_session_for(config)
            });
            let peer = match reused {
                Some(p) => {
                    let mut state = lock(&p.state);
                    let had_endpoint = state.endpoint.is_some();
                    if p.config.endpoint != config.endpoint && config.endpoint.is_some() {
                        state.endpoint = config.endpoint.map(unmap);
                        state.source = None;
                        state.unanswered = false;
                    }
                    let fresh = candidates(config);
                    if state.candidates != fresh {
                        state.cursor = 0;
                        state.candidates = fresh;
                    }
                    if state.endpoint.is_none() {
                        state.endpoint = state.candidates.first().copied();
                    }
                    if !had_endpoint && state.endpoint.is_some() {
                        state.initiate = true;
                    }
                    if let Some(seen) = state.seen_key.take()
                        && seen != state.tunn_key
                        && (seen == config.public_key || Some(seen) == config.next_public_key)
                    {
                        // The peer already runs the key this configuration brings: handshake
                        // under it now instead of waiting for the peer's next retry.
                        state.tunn = Tunn::new(
                            table.private.clone(),
                            PublicKey::from(seen.0),
                            config.preshared_key.as_ref().map(|k| k.0),
                            config.persistent_keepalive.filter(|&k| k > 0),
                            p.index,
                            Some(table.rate_limiter.clone()),
                        );
                        state.tunn_key = seen;
                        state.initiate = state.endpoint.is_some();
                        state.own_session = false;
                        state.last_initiation = None;
                    }
                    drop(state);
                    Peer {
                        config: config.clone(),
                        index: p.index,
                        state: p.state.clone(),
                    }
                }
                None => {
                    let peer = table.new_peer(config, &taken);
                    if let Some(prev) = old.get(&key) {
                        prev.carry_endpoint(&peer, config);
                    }
                    peer
                }
            };
            let slot = table.peers.len();
            table.by_key.insert(config.public_key.0, slot);
            if let Some(next) = config.next_public_key {
                table.by_key.entry(next.0).or_insert(slot);
            }
            let running = lock(&peer.state).tunn_key;
            table.by_key.entry(running.0).or_insert(slot);
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

        if !self.plain {
            let verdict = lock(&self.filter).outbound(&peer.config.name, packet, now);
            if let Verdict::Deny(reason) = verdict {
                self.counters
                    .drop_packet(DropReason::Outbound((&reason).into()));
                return;
            }
        }

        let mut state = lock(&peer.state);
        // The one compare the path MTU costs on the hot path (usize::MAX when not measured).
        let whole = packet.len() <= state.pmtu.limit();
        if !whole && !self.oversized(packet, state.pmtu.limit(), out) {
            return;
        }
        match state.tunn.encapsulate(packet, buf) {
            TunnResult::WriteToNetwork(datagram) if whole && !is_initiation(datagram) => {
                match state.endpoint {
                    Some(to) => out.send_udp_from(to, state.source, datagram),
                    None => self.counters.drop_packet(DropReason::NoEndpoint),
                }
            }
            other => self.encapsulated(&mut state, other, whole, now, out),
        }
    }

    /// What encapsulating gave other than a datagram that fits the path: an initiation (no
    /// session yet; the packet waits in the session's queue), a datagram to send in IP
    /// fragments, an error. Out of line: the packet path is the datagram that fits.
    #[cold]
    #[inline(never)]
    fn encapsulated(
        &self,
        state: &mut PeerState,
        result: TunnResult<'_>,
        whole: bool,
        now: Instant,
        out: &mut impl Transmit,
    ) {
        match result {
            TunnResult::WriteToNetwork(datagram) => {
                let sent = if is_initiation(datagram) {
                    state.last_initiation = Some(now);
                    state.send_initiation(datagram, out)
                } else if let Some(to) = state.endpoint {
                    if whole {
                        out.send_udp_from(to, state.source, datagram);
                    } else {
                        out.send_udp_fragmenting(to, state.source, datagram);
                    }
                    true
                } else {
                    false
                };
                if !sent {
                    self.counters.drop_packet(DropReason::NoEndpoint);
                }
            }
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
        self.handle_datagram_at(from, None, datagram, now, buf, out);
    }

    /// Like [`PeerTable::handle_datagram`], for a datagram that arrived at this node's local
    /// address `local` (from IP_PKTINFO): replies to it, and later datagrams to the peer once
    /// it authenticates, leave from that address.
    pub fn handle_datagram_at(
        &self,
        from: SocketAddr,
        local: Option<IpAddr>,
        datagram: &[u8],
        now: Instant,
        buf: &mut [u8],
        out: &mut impl Transmit,
    ) {
        let from = unmap(from);
        let local = local.map(|ip| unmap(SocketAddr::new(ip, 0)).ip());
        let Some((slot, kind)) = self.find_peer(from, local, datagram, buf, out) else {
            return;
        };
        let peer = &self.peers[slot];
        let mut state = lock(&peer.state);
        if let Kind::Init(_) = kind {
            state.initiations_received += 1;
        }
        if let Kind::Init(key) = kind
            && key != state.tunn_key.0
        {
            return self.promote(
                peer,
                &mut state,
                WgKey(key),
                (from, local),
                datagram,
                buf,
                out,
            );
        }

        let base = buf.as_ptr() as usize;
        let result = state.tunn.decapsulate(Some(from.ip()), datagram, buf);
        let (packet, src) = match result {
            TunnResult::WriteToTunnelV4(packet, src) => (packet, IpAddr::V4(src)),
            TunnResult::WriteToTunnelV6(packet, src) => (packet, IpAddr::V6(src)),
            other => {
                let other = self.answer(other, (from, local), out);
                return self.control(&mut state, other, kind, (from, local), buf, out);
            }
        };
        // A decrypted packet (or a path MTU probe) authenticates the sender.
        state.authenticated(from, local);
        if state.flush_pending || (self.probing && pmtu::may_be_probe(packet)) {
            // Where in `buf` the packet lies, so that the slow way can use `buf` after it.
            let at = (packet.as_ptr() as usize).wrapping_sub(base);
            let within = (at, packet.len());
            return self.first_or_probe(slot, state, src, within, buf, now, out);
        }
        drop(state);
        self.deliver(slot, src, packet, now, out);
    }

    /// Sends what decapsulation gave to send back (a handshake response, a cookie reply),
    /// and says what it was, so that [`PeerTable::control`] can use the buffer it was in.
    #[cold]
    #[inline(never)]
    fn answer(
        &self,
        result: TunnResult<'_>,
        (from, local): (SocketAddr, Option<IpAddr>),
        out: &mut impl Transmit,
    ) -> Control {
        match result {
            TunnResult::WriteToNetwork(reply) => {
                // A cookie reply (type 3) proves nothing about the sender; a handshake
                // response or keepalive does.
                let authenticated = reply.first() != Some(&3);
                out.send_udp_from(from, local, reply);
                Control::Answered { authenticated }
            }
            TunnResult::Done => Control::Done,
            TunnResult::Err(e) => Control::Failed(engine_drop(&e)),
            // Not given here: the caller handles packets for the TUN.
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => Control::Done,
        }
    }

    /// What decapsulation gave other than a packet for the TUN: a handshake answered, a
    /// keepalive, an error. Out of line: the packet path is the data packet.
    #[cold]
    #[inline(never)]
    fn control(
        &self,
        state: &mut PeerState,
        result: Control,
        kind: Kind,
        (from, local): (SocketAddr, Option<IpAddr>),
        buf: &mut [u8],
        out: &mut impl Transmit,
    ) {
        match result {
            Control::Answered { authenticated } => {
                if authenticated {
                    state.authenticated(from, local);
                    match kind {
                        // Answered: the peer started the newest session and rekeys it. The
                        // session is not this node's to send on until the peer's first data
                        // packet confirms it (then the queue goes out, below): flushing now
                        // would make boringtun start a second handshake for the queue.
                        Kind::Init(_) => {
                            state.own_session = false;
                            state.flush_pending = true;
                        }
                        // The answer to this node's initiation: its session now.
                        Kind::Response => {
                            state.own_session = true;
                            self.flush_queue(state, buf, out);
                        }
                        Kind::Cookie | Kind::Data => self.flush_queue(state, buf, out),
                    }
                }
            }
            Control::Done => {
                // A keepalive authenticates the sender; a cookie reply does not (FC-25).
                if kind == Kind::Data {
                    state.authenticated(from, local);
                    // The initiator's first keepalive confirms a session this node answered:
                    // what waited for a session goes out on it now.
                    state.flush_pending = false;
                    self.flush_queue(state, buf, out);
                }
            }
            Control::Failed(reason) => self.counters.drop_packet(reason),
        }
    }

    /// A decrypted packet that is the first on a session this node answered (the queue of
    /// packets that waited for it goes out after it), or a path MTU probe. Out of line.
    #[allow(clippy::too_many_arguments)]
    #[cold]
    #[inline(never)]
    fn first_or_probe(
        &self,
        slot: usize,
        mut state: MutexGuard<'_, PeerState>,
        src: IpAddr,
        (at, len): (usize, usize),
        buf: &mut [u8],
        now: Instant,
        out: &mut impl Transmit,
    ) {
        let Some(packet) = buf.get(at..).and_then(|rest| rest.get(..len)) else {
            return self.counters.drop_packet(DropReason::MalformedPacket);
        };
        let flush = std::mem::take(&mut state.flush_pending);
        let probe = if self.probing && pmtu::may_be_probe(packet) {
            self.probe(slot, &mut state, src, packet, now)
        } else {
            Probe::No
        };
        match probe {
            Probe::No => {
                drop(state);
                self.deliver(slot, src, packet, now, out);
                if flush {
                    self.flush_queue(&mut lock(&self.peers[slot].state), buf, out);
                }
            }
            probe => {
                if let Probe::Answer(ack, dst) = probe {
                    self.send_ack(&mut state, dst, src, ack, buf, out);
                }
                if flush {
                    self.flush_queue(&mut state, buf, out);
                }
            }
        }
    }

    /// Runs boringtun's timers for every peer: first handshakes of new peers, handshake
    /// retries (each to the next endpoint while unanswered), keepalives, rekeys, expiry, and
    /// the rekeys of idle keepalive sessions that boringtun leaves out ([`rekey`]). `now` is
    /// the time of the tick. Returns the sessions that came up or went down since the last
    /// call.
    pub fn handle_timers(
        &self,
        now: Instant,
        buf: &mut [u8],
        out: &mut impl Transmit,
    ) -> Vec<SessionEvent> {
        self.rate_limiter.reset_count();
        let mut events = Vec::new();
        for peer in &self.peers {
            let mut state = lock(&peer.state);
            let keepalive = peer.config.persistent_keepalive.is_some_and(|k| k > 0);
            if std::mem::take(&mut state.initiate) && !has_session(&state.tunn) {
                // Not forced: a handshake already under way is left to its own retries.
                if let TunnResult::WriteToNetwork(d) =
                    state.tunn.format_handshake_initiation(buf, false)
                {
                    state.last_initiation = Some(now);
                    state.send_initiation(d, out);
                }
            }
            if keepalive {
                self.rekey_idle(peer, &mut state, now, buf, out);
            }
            match state.tunn.update_timers(buf) {
                TunnResult::WriteToNetwork(datagram) if is_initiation(datagram) => {
                    let fresh = state
                        .last_initiation
                        .is_none_or(|t| now.saturating_duration_since(t) >= rekey::FRESH_GAP);
                    state.last_initiation = Some(now);
                    if fresh
                        && keepalive
                        && !has_session(&state.tunn)
                        && rekey::defers(self.public.as_bytes(), &state.tunn_key.0)
                    {
                        // boringtun resends it in 5 s unless the peer's comes first.
                        state.initiations_held += 1;
                        tracing::debug!(
                            peer = %peer.config.name,
                            "no session: holding this side's initiation back for the peer's"
                        );
                    } else {
                        state.send_initiation(datagram, out);
                    }
                }
                TunnResult::WriteToNetwork(datagram) => {
                    if let Some(to) = state.endpoint {
                        out.send_udp_from(to, state.source, datagram);
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                _ => {}
            }
            let up = has_session(&state.tunn);
            if up && !state.session_up {
                state.pmtu.session_up(now);
            }
            self.probe_path(peer, &mut state, up, now, buf, out);
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

    /// The endpoints of the peers with a session, each with the local address its replies
    /// leave from, in configuration order, into `out` (emptied first): the data plane keeps a
    /// connected socket for each.
    pub fn connected_endpoints(&self, out: &mut Vec<(SocketAddr, Option<IpAddr>)>) {
        out.clear();
        for peer in &self.peers {
            let state = lock(&peer.state);
            if let (true, Some(to)) = (state.session_up, state.endpoint) {
                out.push((to, state.source));
            }
        }
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
                    initiations_sent: state.initiations_sent,
                    initiations_received: state.initiations_received,
                    initiations_held: state.initiations_held,
                    path_mtu: state.pmtu.learned(),
                    path_mtu_state: state.pmtu.state(),
                }
            })
            .collect()
    }

    /// Problems found while building the table (overlapping allowed IPs, repeated keys).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// This table for plain WireGuard mode: the filter is bypassed, cryptokey routing and the
    /// anti-spoofing check alone decide (WireGuard's trust model). Only
    /// `Dataplane::start_plain_wireguard` calls this; the zero-trust modes never do.
    pub fn plain_wireguard(mut self) -> PeerTable {
        self.plain = true;
        self.probing = false;
        self
    }

    /// Gives the table this node's overlay addresses and the tunnel MTU, which turns on path
    /// MTU probing to peers with an IPv6 endpoint ([`pmtu`]). Never called in plain WireGuard
    /// mode, which neither probes nor answers probes (and ignores this if it were).
    pub fn with_local(mut self, addresses: &[ipnet::IpNet], mtu: u16) -> PeerTable {
        self.set_local(addresses, mtu);
        self
    }

    fn set_local(&mut self, addresses: &[ipnet::IpNet], mtu: u16) {
        self.local = addresses.iter().map(|n| n.addr()).collect();
        self.mtu = mtu;
        self.probing = !self.plain && !self.local.is_empty();
    }

    /// Moves the peer with `key` to `endpoint` now, as `wg set ... endpoint` does, even when the
    /// configured endpoint did not change (the peer roamed away from it). Returns false when
    /// there is no such peer.
    pub fn set_endpoint(&self, key: &WgKey, endpoint: SocketAddr) -> bool {
        let Some(&slot) = self.by_key.get(&key.0) else {
            return false;
        };
        let mut state = lock(&self.peers[slot].state);
        state.endpoint = Some(unmap(endpoint));
        state.source = None;
        state.unanswered = false;
        if !has_session(&state.tunn) {
            state.initiate = true;
        }
        true
    }

    /// The node's own public key.
    pub fn public_key(&self) -> WgKey {
        WgKey(self.public.to_bytes())
    }

    /// The drop counters this table counts into.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Makes a peer with a fresh session. Its index is unused in this table and in `taken`
    /// (every index of the previous table, kept or not).
    fn new_peer(&mut self, config: &PeerConfig, taken: &HashSet<u32>) -> Peer {
        let mut index = self.next_index;
        while self.by_index.contains_key(&index) || taken.contains(&index) {
            index = (index + 1) & 0x00ff_ffff;
        }
        self.next_index = (index + 1) & 0x00ff_ffff;
        let tunn = Tunn::new(
            self.private.clone(),
            PublicKey::from(config.public_key.0),
            config.preshared_key.as_ref().map(|k| k.0),
            config.persistent_keepalive.filter(|&k| k > 0),
            index,
            Some(self.rate_limiter.clone()),
        );
        let candidates = candidates(config);
        let endpoint = candidates.first().copied();
        Peer {
            config: config.clone(),
            index,
            state: Arc::new(Mutex::new(PeerState {
                tunn,
                tunn_key: config.public_key,
                endpoint,
                source: None,
                session_up: false,
                candidates,
                cursor: 0,
                unanswered: false,
                initiate: endpoint.is_some(),
                seen_key: None,
                mismatch: None,
                own_session: false,
                flush_pending: false,
                rekey_round: 0,
                last_initiation: None,
                pmtu: Prober::new(index),
                initiations_sent: 0,
                initiations_received: 0,
                initiations_held: 0,
            })),
        }
    }

    fn build_routes(&mut self) {
        let mut owner: HashMap<ipnet::IpNet, usize> = HashMap::new();
        for (slot, peer) in self.peers.iter().enumerate() {
            for net in &peer.config.allowed_ips {
                let net = net.trunc();
                if let Some(prev) = owner.insert(net, slot).filter(|&p| p != slot) {
                    let (a, b) = (&self.peers[prev].config.name, &peer.config.name);
                    self.warnings.push(format!(
                        "allowed ip {net} is claimed by peers {a} and {b}; {b} wins (listed last)"
                    ));
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
        local: Option<IpAddr>,
        datagram: &[u8],
        buf: &mut [u8],
        out: &mut impl Transmit,
    ) -> Option<(usize, Kind)> {
        let Ok(parsed) = Tunn::parse_incoming_packet(datagram) else {
            self.counters.drop_packet(DropReason::MalformedDatagram);
            return None;
        };
        let (receiver, kind) = match parsed {
            Packet::HandshakeInit(ref init) => {
                return self.find_initiator(init, (from, local), datagram, buf, out);
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

    /// The peer that sent a handshake initiation, found by the static key in it, after the
    /// rate limiter's check (which may answer with a cookie instead). Out of line: one
    /// datagram in a few minutes per peer.
    #[cold]
    #[inline(never)]
    fn find_initiator(
        &self,
        init: &boringtun::noise::HandshakeInit<'_>,
        (from, local): (SocketAddr, Option<IpAddr>),
        datagram: &[u8],
        buf: &mut [u8],
        out: &mut impl Transmit,
    ) -> Option<(usize, Kind)> {
        match self
            .rate_limiter
            .verify_packet(Some(from.ip()), datagram, buf)
        {
            Ok(_) => {}
            Err(TunnResult::WriteToNetwork(cookie)) => {
                out.send_udp_from(from, local, cookie);
                return None;
            }
            Err(_) => {
                // MAC1 is keyed by this node's public key: from a peer's address, a bad one
                // means the peer still holds a key this node no longer has.
                self.counters.drop_packet(DropReason::InvalidMac);
                self.note_mismatch(from, MismatchKind::StaleKeyForUs);
                return None;
            }
        }
        let Ok(half) = parse_handshake_anon(&self.private, &self.public, init) else {
            self.counters.drop_packet(DropReason::HandshakeFailed);
            self.note_mismatch(from, MismatchKind::StaleKeyForUs);
            return None;
        };
        let Some(&slot) = self.by_key.get(&half.peer_static_public) else {
            self.counters.drop_packet(DropReason::UnknownKey);
            let key = WgKey(half.peer_static_public);
            self.note_mismatch(from, MismatchKind::UnknownKey(key));
            return None;
        };
        Some((slot, Kind::Init(half.peer_static_public)))
    }

    /// The key mismatch of every peer that has not shown since that the keys agree, one
    /// sentence each, for status.
    pub fn mismatch_warnings(&self) -> Vec<String> {
        self.peers
            .iter()
            .filter_map(|p| lock(&p.state).mismatch.clone())
            .collect()
    }

    /// Key mismatches seen since the last call, oldest first.
    pub fn take_mismatches(&self) -> Vec<KeyMismatch> {
        std::mem::take(&mut *lock(&self.mismatches))
    }

    /// Records a failed handshake from `from` as a key mismatch when `from` is where one of
    /// the peers is (its current or a configured endpoint); anything else is just counted.
    fn note_mismatch(&self, from: SocketAddr, kind: MismatchKind) {
        let Some(peer) = self.peers.iter().find(|p| {
            let state = lock(&p.state);
            state.endpoint == Some(from) || state.candidates.contains(&from)
        }) else {
            return;
        };
        let mismatch = KeyMismatch {
            peer: peer.config.name.clone(),
            from,
            kind,
        };
        {
            let mut state = lock(&peer.state);
            if let MismatchKind::UnknownKey(k) = kind {
                state.seen_key = Some(k);
            }
            state.mismatch = Some(mismatch.to_string());
        }
        let mut log = lock(&self.mismatches);
        if log.len() < MAX_MISMATCHES {
            log.push(mismatch);
        }
    }

    /// A handshake initiation under the peer's other accepted key (its next key, or its
    /// configured key while the session still runs on the one it rotates away from): a session
    /// under that key replaces the running one, but only once the initiation checks out.
    ///
    /// Out of line: it builds a whole `Tunn` on the stack, and inlined into the receive path
    /// it made that frame 22 KiB, five stack probes (five pages touched) on every datagram.
    #[allow(clippy::too_many_arguments)]
    #[cold]
    #[inline(never)]
    fn promote(
        &self,
        peer: &Peer,
        state: &mut PeerState,
        key: WgKey,
        (from, local): (SocketAddr, Option<IpAddr>),
        datagram: &[u8],
        buf: &mut [u8],
        out: &mut impl Transmit,
    ) {
        let mut tunn = Tunn::new(
            self.private.clone(),
            PublicKey::from(key.0),
            peer.config.preshared_key.as_ref().map(|k| k.0),
            peer.config.persistent_keepalive.filter(|&k| k > 0),
            peer.index,
            Some(self.rate_limiter.clone()),
        );
        match tunn.decapsulate(Some(from.ip()), datagram, buf) {
            TunnResult::WriteToNetwork(reply) => {
                out.send_udp_from(from, local, reply);
                tracing::info!(
                    peer = %peer.config.name,
                    key = %key.short(),
                    "peer handshook under its new key; session moved to it"
                );
                state.tunn = tunn;
                state.tunn_key = key;
                // As for any initiation answered: the session is the peer's until its first
                // data packet, which sends what waited for it.
                state.own_session = false;
                state.flush_pending = true;
                state.last_initiation = None;
                state.authenticated(from, local);
            }
            TunnResult::Err(e) => self.counters.drop_packet(engine_drop(&e)),
            _ => self.counters.drop_packet(DropReason::HandshakeFailed),
        }
    }

    /// Starts the rekey of an idle keepalive session that is due ([`rekey::due`]); boringtun
    /// would let it lapse instead. A handshake already under way is left alone.
    fn rekey_idle(
        &self,
        peer: &Peer,
        state: &mut PeerState,
        now: Instant,
        buf: &mut [u8],
        out: &mut impl Transmit,
    ) {
        if !has_session(&state.tunn) {
            return;
        }
        let Some(age) = state.tunn.time_since_last_handshake() else {
            return;
        };
        let jitter = rekey::jitter(peer.index, state.rekey_round);
        if !rekey::due(state.own_session, age, jitter) {
            return;
        }
        if let TunnResult::WriteToNetwork(d) = state.tunn.format_handshake_initiation(buf, false) {
            state.rekey_round = state.rekey_round.wrapping_add(1);
            state.last_initiation = Some(now);
            tracing::debug!(
                peer = %peer.config.name,
                age_s = age.as_secs(),
                initiator = state.own_session,
                "rekeying an idle session"
            );
            state.send_initiation(d, out);
        }
    }

    fn flush_queue(&self, state: &mut PeerState, buf: &mut [u8], out: &mut impl Transmit) {
        let Some(to) = state.endpoint else {
            return;
        };
        while let TunnResult::WriteToNetwork(datagram) = state.tunn.decapsulate(None, &[], buf) {
            out.send_udp_from(to, state.source, datagram);
        }
    }

    /// The slow path of a packet larger than the peer's learned path MTU `limit`: returns
    /// true when it is to be sent anyway, as fragments (IPv6 of at most 1280 bytes, which
    /// IPv6 must carry; IPv4 without DF); otherwise drops it and tells its sender the size
    /// with a synthetic ICMP error written to the TUN (rate-limited).
    #[cold]
    #[inline(never)]
    fn oversized(&self, packet: &[u8], limit: usize, out: &mut impl Transmit) -> bool {
        let ipv4 = packet.first().is_some_and(|b| b >> 4 == 4);
        let mtu = if ipv4 {
            if !pmtu::ipv4_dont_fragment(packet) {
                return true;
            }
            limit
        } else {
            if packet.len() <= pmtu::IPV6_MIN_MTU {
                return true;
            }
            limit.max(pmtu::IPV6_MIN_MTU)
        };
        self.counters.drop_packet(DropReason::TooBig);
        if !self.icmp_allowed() {
            return false;
        }
        let mut icmp = [0u8; pmtu::IPV6_MIN_MTU];
        match pmtu::icmp_too_big(packet, mtu, &mut icmp) {
            Ok(n) => out.write_tun(&icmp[..n]),
            Err(e) => tracing::trace!(?e, "no ICMP for a too-big packet"),
        }
        false
    }

    /// Takes one synthetic ICMP message from the budget, if any is left.
    fn icmp_allowed(&self) -> bool {
        let mut budget = lock(&self.icmp_budget);
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(budget.1);
        let refill = (elapsed.as_millis() as u64 * u64::from(ICMP_PER_SECOND) / 1000) as u32;
        if refill > 0 {
            budget.0 = budget.0.saturating_add(refill).min(ICMP_PER_SECOND);
            budget.1 = now;
        }
        if budget.0 == 0 {
            return false;
        }
        budget.0 -= 1;
        true
    }

    /// Whether a decrypted packet from the peer in `slot` is a path MTU probe or ack, and if
    /// so, what to do with it. Plain WireGuard mode never looks. Called only for packets of
    /// protocol 253 ([`pmtu::may_be_probe`]), off the hot path.
    #[cold]
    #[inline(never)]
    fn probe(
        &self,
        slot: usize,
        state: &mut PeerState,
        src: IpAddr,
        packet: &[u8],
        now: Instant,
    ) -> Probe {
        if !self.probing {
            return Probe::No;
        }
        let (message, dst) = match pmtu::classify(packet) {
            Classified::Other => return Probe::No,
            Classified::Bad => {
                self.counters.drop_packet(DropReason::BadProbe);
                return Probe::Done;
            }
            Classified::Message(m, dst) => (m, dst),
        };
        if self.routes.lookup(src) != Some(&slot) {
            self.counters.drop_packet(DropReason::SpoofedSource);
            return Probe::Done;
        }
        if !self.local.contains(&dst) {
            self.counters.drop_packet(DropReason::BadProbe);
            return Probe::Done;
        }
        match message {
            Message::Probe { id, .. } => {
                let size = u16::try_from(packet.len()).unwrap_or(u16::MAX);
                Probe::Answer(Message::Ack { id, size }, dst)
            }
            Message::Ack { id, size } => {
                state.pmtu.ack(id, size, now, self.mtu);
                Probe::Done
            }
        }
    }

    /// Sends a probe ack from `from` to `to` through the peer's session.
    fn send_ack(
        &self,
        state: &mut PeerState,
        from: IpAddr,
        to: IpAddr,
        ack: Message,
        buf: &mut [u8],
        out: &mut impl Transmit,
    ) {
        let mut packet = [0u8; 64];
        let Some(n) = pmtu::build(from, to, ack, 0, &mut packet) else {
            return;
        };
        self.encapsulate_to_endpoint(state, &packet[..n], buf, out);
    }

    /// Runs the path MTU search for one peer on a timer tick, sending the probe that is due.
    fn probe_path(
        &self,
        peer: &Peer,
        state: &mut PeerState,
        up: bool,
        now: Instant,
        buf: &mut [u8],
        out: &mut impl Transmit,
    ) {
        if !self.probing {
            return;
        }
        // A session this node answered is not its to send on until the peer confirms it.
        let ready = up && !state.flush_pending;
        let Some((id, size)) = state.pmtu.poll(now, state.endpoint, ready, self.mtu) else {
            return;
        };
        let Some((src, dst)) = self.probe_addresses(peer) else {
            return;
        };
        let mut packet = vec![0u8; usize::from(size)];
        let message = Message::Probe { id, size };
        let Some(n) = pmtu::build(src, dst, message, usize::from(size), &mut packet) else {
            return;
        };
        tracing::trace!(peer = %peer.config.name, size, "path MTU probe");
        self.encapsulate_to_endpoint(state, &packet[..n], buf, out);
    }

    /// This node's address and the peer's for a probe: the peer's first allowed host address
    /// (a /32 or /128, its own rather than a subnet it routes) of a family this node has an
    /// address in, or failing that its first allowed prefix of such a family.
    fn probe_addresses(&self, peer: &Peer) -> Option<(IpAddr, IpAddr)> {
        let nets = &peer.config.allowed_ips;
        let hosts = nets.iter().filter(|n| n.prefix_len() == n.max_prefix_len());
        hosts.chain(nets.iter()).find_map(|net| {
            let dst = net.addr();
            let src = self.local.iter().find(|l| l.is_ipv4() == dst.is_ipv4())?;
            Some((*src, dst))
        })
    }

    /// Encrypts a packet this node makes itself (probe, ack) and sends it to the peer's
    /// endpoint; nothing when there is no session to carry it.
    fn encapsulate_to_endpoint(
        &self,
        state: &mut PeerState,
        packet: &[u8],
        buf: &mut [u8],
        out: &mut impl Transmit,
    ) {
        if !has_session(&state.tunn) {
            return;
        }
        let Some(to) = state.endpoint else {
            return;
        };
        if let TunnResult::WriteToNetwork(d) = state.tunn.encapsulate(packet, buf)
            && !is_initiation(d)
        {
            out.send_udp_from(to, state.source, d);
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
        if self.plain {
            out.write_tun(packet);
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

impl Peer {
    /// Whether this peer's session may carry on under `config`: it runs under the configured
    /// key or the next one, or under the key that `config`'s key was announced to replace (the
    /// peer has not switched yet; its first handshake under the new key moves the session).
    fn keeps_session_for(&self, config: &PeerConfig) -> bool {
        let running = lock(&self.state).tunn_key;
        running == config.public_key
            || Some(running) == config.next_public_key
            || (self.config.next_public_key == Some(config.public_key)
                && running == self.config.public_key)
    }

    /// Gives `next` (the same peer with a fresh session: a new static key, keepalive or
    /// preshared key) the endpoint this one learnt, unless the configuration names a new one;
    /// `next` then starts a handshake there on the next timer run.
    fn carry_endpoint(&self, next: &Peer, config: &PeerConfig) {
        if config.endpoint.is_some() && config.endpoint != self.config.endpoint {
            return;
        }
        let (learnt, source) = {
            let state = lock(&self.state);
            (state.endpoint, state.source)
        };
        if let Some(ep) = learnt {
            let mut state = lock(&next.state);
            state.endpoint = Some(ep);
            state.source = source;
            state.initiate = true;
        }
    }
}

impl PeerState {
    /// Records an authenticated packet from `from`: the peer is there now (roaming).
    #[inline]
    fn authenticated(&mut self, from: SocketAddr, local: Option<IpAddr>) {
        // Every data packet comes here; nearly all come from where the last one did.
        if self.endpoint == Some(from)
            && self.source == local
            && !self.unanswered
            && self.mismatch.is_none()
        {
            return;
        }
        self.moved(from, local);
    }

    /// [`PeerState::authenticated`] when something changed: kept out of the packet path.
    #[cold]
    #[inline(never)]
    fn moved(&mut self, from: SocketAddr, local: Option<IpAddr>) {
        self.endpoint = Some(from);
        self.source = local;
        self.unanswered = false;
        self.mismatch = None;
    }

    /// Sends a handshake initiation. With no session and the last initiation to the current
    /// endpoint unanswered, it goes to the next configured endpoint instead. Returns false
    /// when there is no endpoint at all.
    fn send_initiation(&mut self, datagram: &[u8], out: &mut impl Transmit) -> bool {
        if self.unanswered && self.candidates.len() > 1 && !has_session(&self.tunn) {
            self.cursor = (self.cursor + 1) % self.candidates.len();
            self.endpoint = Some(self.candidates[self.cursor]);
        }
        let Some(to) = self.endpoint else {
            return false;
        };
        out.send_udp_from(to, self.source, datagram);
        self.unanswered = true;
        self.initiations_sent += 1;
        true
    }
}

/// What decapsulating a datagram gave, other than a packet for the TUN.
enum Control {
    /// A reply went back; a cookie reply does not authenticate the sender.
    Answered { authenticated: bool },
    /// Nothing to send or write: a keepalive, or a datagram boringtun took.
    Done,
    /// Refused, with the drop reason.
    Failed(DropReason),
}

/// What [`PeerTable::probe`] found in a decrypted packet.
enum Probe {
    /// Not a probe: deliver it.
    No,
    /// A probe: send this ack from the address it was sent to.
    Answer(Message, IpAddr),
    /// Handled (an ack, or dropped and counted).
    Done,
}

/// A peer's endpoints in the order to try them: `endpoint`, then the others, no repeats.
fn candidates(config: &PeerConfig) -> Vec<SocketAddr> {
    let mut list: Vec<SocketAddr> = Vec::new();
    for addr in config.endpoint.iter().chain(&config.endpoints) {
        let addr = unmap(*addr);
        if !list.contains(&addr) {
            list.push(addr);
        }
    }
    list
}

/// Whether boringtun holds a usable session with the peer.
fn has_session(tunn: &Tunn) -> bool {
    tunn.time_since_last_handshake().is_some() && !tunn.is_expired()
}

/// Whether a datagram boringtun produced is a handshake initiation (message type 1).
fn is_initiation(datagram: &[u8]) -> bool {
    datagram.first() == Some(&1)
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

#[cfg(test)]
mod tests {
    //! Two or three peer tables wired together through an in-memory network.

    use std::collections::VecDeque;

    use ipnet::IpNet;
    use netpolicy::{ConntrackConfig, Inventory, NodeIdentity, Policy};

    use super::*;
    use crate::dataplane::counters::FilterDrop;

    /// Grants n1 ping and tcp:22 to n2, nothing back; n3 may ping n1.
    const POLICY: &str = r#"
[[grant]]
from = ["node:n1"]
to = ["node:n2"]
ports = ["icmp", "tcp:22"]

[[grant]]
from = ["node:n3"]
to = ["node:n1"]
ports = ["icmp"]
"#;

    /// A compromised node's view: everything to everyone.
    const ALLOW_ALL: &str = r#"
[[grant]]
from = ["*"]
to = ["*"]
ports = ["any"]
"#;

    #[derive(Default)]
    struct Wire {
        sent: Vec<(SocketAddr, Vec<u8>)>,
        tun: Vec<Vec<u8>>,
    }

    impl Transmit for Wire {
        fn send_udp(&mut self, to: SocketAddr, datagram: &[u8]) {
            self.sent.push((to, datagram.to_vec()));
        }
        fn write_tun(&mut self, packet: &[u8]) {
            self.tun.push(packet.to_vec());
        }
    }

    struct Node {
        name: String,
        ip: IpAddr,
        addr: SocketAddr,
        key: PrivateKey,
        table: PeerTable,
        filter: Arc<Mutex<Filter>>,
        tun: Vec<Vec<u8>>,
    }

    struct Mesh {
        nodes: Vec<Node>,
        in_flight: VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>,
        /// Datagrams larger than this vanish on the way (a silent narrow hop).
        max_datagram: usize,
        /// Every datagram that crossed the network, for inspection.
        seen: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
        now: Instant,
        buf: Vec<u8>,
    }

    fn inventory(n: usize) -> Inventory {
        Inventory {
            nodes: (1..=n)
                .map(|i| NodeIdentity {
                    name: format!("n{i}"),
                    namespace: "default".into(),
                    tags: vec![],
                    spiffe_id: format!("spiffe://test/ns/default/node/n{i}"),
                    addresses: vec![IpNet::from(ip(i))],
                    routes: vec![],
                })
                .collect(),
        }
    }

    fn ip(i: usize) -> IpAddr {
        IpAddr::from([10, 90, 0, i as u8])
    }

    fn spec(policy: &str, n: usize, me: &str) -> netpolicy::FilterSpec {
        let checked = Policy::parse(policy).expect("test policy parses");
        let compiled = netpolicy::compile(&checked.policy, &inventory(n));
        compiled.filters.get(me).cloned().unwrap_or_default()
    }

    fn peer_configs(keys: &[PrivateKey], me: usize) -> Vec<PeerConfig> {
        (0..keys.len())
            .filter(|&j| j != me)
            .map(|j| PeerConfig {
                name: format!("n{}", j + 1),
                public_key: keys[j].public_key(),
                endpoint: Some(underlay(j + 1)),
                endpoints: vec![],
                allowed_ips: vec![IpNet::from(ip(j + 1))],
                persistent_keepalive: None,
                identity: None,
                preshared_key: None,
                next_public_key: None,
            })
            .collect()
    }

    fn underlay(i: usize) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, i as u8], 51820))
    }

    impl Mesh {
        /// `policies[i]` is the policy node i+1 compiled its filter from.
        fn new(policies: &[&str]) -> Mesh {
            Self::with_limit(policies, HANDSHAKE_RATE_LIMIT)
        }

        fn with_limit(policies: &[&str], limit: u64) -> Mesh {
            let n = policies.len();
            let keys: Vec<PrivateKey> = (0..n).map(|_| PrivateKey::generate()).collect();
            let nodes = (0..n)
                .map(|i| {
                    let name = format!("n{}", i + 1);
                    let filter = Arc::new(Mutex::new(Filter::new(
                        spec(policies[i], n, &name),
                        ConntrackConfig::default(),
                    )));
                    let table = PeerTable::with_limit(
                        &keys[i],
                        &peer_configs(&keys, i),
                        None,
                        filter.clone(),
                        Arc::new(Counters::default()),
                        (i as u32 + 1) * 1000,
                        limit,
                    );
                    Node {
                        name,
                        ip: ip(i + 1),
                        addr: underlay(i + 1),
                        key: keys[i].clone(),
                        table,
                        filter,
                        tun: vec![],
                    }
                })
                .collect();
            Mesh {
                nodes,
                in_flight: VecDeque::new(),
                max_datagram: usize::MAX,
                seen: vec![],
                now: Instant::now(),
                buf: vec![0; MIN_BUFFER],
            }
        }

        fn node(&self, name: &str) -> usize {
            self.nodes
                .iter()
                .position(|n| n.name == name)
                .expect("test names a node that exists")
        }

        /// A packet from node `from`'s TUN; returns after the network is quiet.
        fn send(&mut self, from: &str, packet: &[u8]) {
            let i = self.node(from);
            let mut wire = Wire::default();
            self.nodes[i]
                .table
                .handle_tun_packet(packet, self.now, &mut self.buf, &mut wire);
            self.absorb(i, wire);
            self.pump();
        }

        /// Delivers a datagram as if it came from `from` (any address) to node `to`.
        fn inject(&mut self, from: SocketAddr, to: &str, datagram: &[u8]) {
            let i = self.node(to);
            let mut wire = Wire::default();
            self.nodes[i]
                .table
                .handle_datagram(from, datagram, self.now, &mut self.buf, &mut wire);
            self.absorb(i, wire);
        }

        fn absorb(&mut self, i: usize, wire: Wire) {
            let from = self.nodes[i].addr;
            for (to, d) in wire.sent {
                self.in_flight.push_back((from, to, d));
            }
            self.nodes[i].tun.extend(wire.tun);
        }

        fn pump(&mut self) {
            let mut steps = 0;
            while let Some((from, to, d)) = self.in_flight.pop_front() {
                steps += 1;
                assert!(steps < 1000, "the network never went quiet");
                self.seen.push((from, to, d.clone()));
                if d.len() > self.max_datagram {
                    continue;
                }
                let Some(i) = self.nodes.iter().position(|n| n.addr == to) else {
                    continue;
                };
                let mut wire = Wire::default();
                self.nodes[i]
                    .table
                    .handle_datagram(from, &d, self.now, &mut self.buf, &mut wire);
                self.absorb(i, wire);
            }
        }

        /// Runs node `name`'s timers once; returns after the network is quiet.
        fn tick(&mut self, name: &str) {
            let i = self.node(name);
            let mut wire = Wire::default();
            self.nodes[i]
                .table
                .handle_timers(Instant::now(), &mut self.buf, &mut wire);
            self.absorb(i, wire);
            self.pump();
        }

        /// Node `name` retries every handshake now, as boringtun does after 5 s unanswered.
        fn retry(&mut self, name: &str) {
            let i = self.node(name);
            let mut wire = Wire::default();
            let table = &self.nodes[i].table;
            for peer in &table.peers {
                let mut state = lock(&peer.state);
                if let TunnResult::WriteToNetwork(d) =
                    state.tunn.format_handshake_initiation(&mut self.buf, true)
                {
                    state.send_initiation(d, &mut wire);
                }
            }
            self.absorb(i, wire);
            self.pump();
        }

        /// Node `name` restarts from its state: same key and peers, every session lost.
        fn restart(&mut self, name: &str) {
            let i = self.node(name);
            let peers = self.peers_of(name);
            let n = &self.nodes[i];
            let fresh = PeerTable::new(
                &n.key,
                &peers,
                None,
                n.filter.clone(),
                Arc::new(Counters::default()),
                7000,
            );
            self.nodes[i].table = fresh;
        }

        fn take_tun(&mut self, name: &str) -> Vec<Vec<u8>> {
            let i = self.node(name);
            std::mem::take(&mut self.nodes[i].tun)
        }

        fn drops(&self, name: &str, reason: DropReason) -> u64 {
            self.nodes[self.node(name)].table.counters().count(reason)
        }

        fn endpoint(&self, at: &str, peer: &str) -> Option<SocketAddr> {
            self.nodes[self.node(at)]
                .table
                .snapshot()
                .into_iter()
                .find(|p| p.config.name == peer)
                .and_then(|p| p.endpoint)
        }

        fn ip_of(&self, name: &str) -> IpAddr {
            self.nodes[self.node(name)].ip
        }

        /// Rebuilds node `name`'s table from `peers`, keeping what is unchanged.
        fn reconfigure(&mut self, name: &str, peers: &[PeerConfig]) {
            let i = self.node(name);
            let n = &self.nodes[i];
            let next = PeerTable::new(
                &n.key,
                peers,
                Some(&n.table),
                n.filter.clone(),
                n.table.counters().clone(),
                0,
            );
            self.nodes[i].table = next;
        }

        fn peers_of(&self, name: &str) -> Vec<PeerConfig> {
            self.nodes[self.node(name)]
                .table
                .snapshot()
                .into_iter()
                .map(|p| p.config)
                .collect()
        }
    }

    fn ipv4(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
        let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) else {
            panic!("test builds IPv4 only");
        };
        let len = 20 + payload.len();
        let mut p = vec![
            0x45,
            0,
            (len >> 8) as u8,
            len as u8,
            0,
            0,
            0x40,
            0,
            64,
            proto,
            0,
            0,
        ];
        p.extend_from_slice(&s.octets());
        p.extend_from_slice(&d.octets());
        let sum = checksum(&p);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    fn checksum(bytes: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for c in bytes.chunks(2) {
            let word = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn echo(src: IpAddr, dst: IpAddr, reply: bool, marker: &[u8]) -> Vec<u8> {
        let mut icmp = vec![if reply { 0 } else { 8 }, 0, 0, 0, 0x12, 0x34, 0, 1];
        icmp.extend_from_slice(marker);
        let sum = checksum(&icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        ipv4(src, dst, 1, &icmp)
    }

    fn tcp_syn(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&dport.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x02;
        tcp[14] = 0xff;
        ipv4(src, dst, 6, &tcp)
    }

    #[test]
    fn allowed_ping_passes_and_its_reply_comes_back() {
        let mut m = Mesh::new(&[POLICY, POLICY]);
        let (a, b) = (m.ip_of("n1"), m.ip_of("n2"));

        m.send("n1", &echo(a, b, false, b"hello"));
        let at_n2 = m.take_tun("n2");
        m.send("n2", &echo(b, a, true, b"hello"));
        let at_n1 = m.take_tun("n1");

        assert_eq!(
            at_n2,
            vec![echo(a, b, false, b"hello")],
            "request delivered once"
        );
        assert_eq!(
            at_n1,
            vec![echo(b, a, true, b"hello")],
            "FC-01: reply delivered"
        );
    }

    #[test]
    fn unsolicited_ping_from_the_other_side_is_dropped_by_the_receiver() {
        // n2 is compromised: its own filter lets everything out. n1's inbound check decides.
        let mut m = Mesh::new(&[POLICY, ALLOW_ALL]);
        let (a, b) = (m.ip_of("n1"), m.ip_of("n2"));

        m.send("n2", &echo(b, a, false, b"x"));

        assert!(m.take_tun("n1").is_empty());
        assert_eq!(m.drops("n1", DropReason::Inbound(FilterDrop::NoRule)), 1);
    }

    #[test]
    fn denied_port_is_dropped_at_the_sender() {
        let mut m = Mesh::new(&[POLICY, POLICY]);
        let (a, b) = (m.ip_of("n1"), m.ip_of("n2"));

        m.send("n1", &tcp_syn(a, b, 40000, 22));
        m.send("n1", &tcp_syn(a, b, 40001, 23));

        assert_eq!(m.take_tun("n2"), vec![tcp_syn(a, b, 40000, 22)]);
        assert_eq!(m.drops("n1", DropReason::Outbound(FilterDrop::NoRule)), 1);
    }

    #[test]
    fn spoofed_inner_source_is_dropped() {
        let mut m = Mesh::new(&[ALLOW_ALL, ALLOW_ALL, ALLOW_ALL]);
        let (a, c) = (m.ip_of("n1"), m.ip_of("n3"));

        // n2 is compromised: its own filter believes it owns n3's address too.
        let mut lying = inventory(3);
        lying.nodes[1].addresses.push(IpNet::from(c));
        let checked = Policy::parse(ALLOW_ALL).expect("parses");
        let spec = netpolicy::compile(&checked.policy, &lying).filters["n2"].clone();
        let n2 = m.node("n2");
        *lock(&m.nodes[n2].filter) = Filter::new(spec, ConntrackConfig::default());

        m.send("n2", &echo(c, a, false, b"spoof"));

        assert!(m.take_tun("n1").is_empty());
        assert_eq!(m.drops("n1", DropReason::SpoofedSource), 1);
    }

    #[test]
    fn no_route_is_counted_as_no_peer() {
        let mut m = Mesh::new(&[ALLOW_ALL, ALLOW_ALL]);
        let a = m.ip_of("n1");

        m.send("n1", &echo(a, IpAddr::from([10, 90, 9, 9]), false, b""));
        m.send("n1", b"\x00garbage");

        assert_eq!(m.drops("n1", DropReason::NoPeer), 1);
        assert_eq!(m.drops("n1", DropReason::MalformedPacket), 1);
    }

    #[test]
    fn endpoint_follows_authenticated_data_from_a_new_address() {
        let mut m = Mesh::new(&[ALLOW_ALL, ALLOW_ALL]);
        let (a, b) = (m.ip_of("n1"), m.ip_of("n2"));
        m.send("n1", &echo(a, b, false, b"1"));
        m.take_tun("n2");

        // n2 roams: its next datagram leaves from a new address.
        let roamed = SocketAddr::from(([203, 0, 113, 10], 4444));
        let n2 = m.node("n2");
        m.nodes[n2].addr = roamed;
        m.send("n2", &echo(b, a, false, b"2"));

        assert_eq!(m.take_tun("n1").len(), 1);
        assert_eq!(m.endpoint("n1", "n2"), Some(roamed));
    }

    #[test]
    fn reapplying_the_same_endpoint_keeps_the_one_learnt_from_the_peer() {
        let mut m = Mesh::new(&[ALLOW_ALL, ALLOW_ALL]);
        let (a, b) = (m.ip_of("n1"), m.ip_of("n2"));
        m.send("n1", &echo(a, b, false, b"1"));
        let roamed = SocketAddr::from(([203, 0, 113, 10], 4444));
        let n2 = m.node("n2");
        m.nodes[n2].addr = roamed;
        m.send("n2", &echo(b, a, false, b"2"));
        let peers = m.peers_of("n1");

        // The same configuration again (a netmap repeating the old endpoint): no change.
        m.reconfigure("n1", &peers);
        let kept = m.endpoint("n1", "n2");
        // A configuration that names a new endpoint: the operator's word wins.
        let mut moved = peers.clone();
        let pinned = SocketAddr::from(([198, 51, 100, 2], 51820));
        moved[0].endpoint = Some(pinned);
        m.reconfigure("n1", &moved);

        assert_eq!(kept, Some(roamed), "FC-24: the learnt endpoint survives");
        assert_eq!(m.endpoint("n1", "n2"), Some(pinned));
    }

    #[test]
    fn cookie_reply_from_a_spoofed_source_does_not_move_the_endpoint() {
        // n2 is under load from the start, so it answers n1's initiation with a cookie.
        let mut m = Mesh::with_limit(&[ALLOW_ALL, ALLOW_ALL], 0);
        let (a, b) = (m.ip_of("n1"), m.ip_of("n2"));
        m.send("n1", &echo(a, b, false, b"1"));
        let cookie = m
            .seen
            .iter()
            .find(|(_, to, d)| *to == underlay(1) && d[0] == 3)
            .map(|(_, _, d)| d.clone())
            .expect("n2 answered with a cookie reply");

        let spoofed = SocketAddr::from(([203, 0, 113, 66], 51820));
        m.inject(spoofed, "n1", &cookie);

        assert_eq!(m.endpoint("n1", "n2"), Some(underlay(2)), "FC-25");
        assert!(m.in_flight.iter().all(|(_, to, _)| *to != spoofed));
    }

    #[test]
    fn reconfigure_keeps_the_session_of_an_unchanged_peer() {
        let mut m = Mesh::new(&[ALLOW_ALL, ALLOW_ALL, ALLOW_ALL]);
        let (a, b) = (m.ip_of("n1"), m.ip_of("n2"));
        m.send("n1", &echo(a, b, false, b"1"));
        m.take_tun("n2");
        let mut peers = m.peers_of("n1");
        peers[1]
            .allowed_ips
            .push("10.95.0.0/24".parse().expect("prefix"));

        m.reconfigure("n1", &peers);
        m.seen.clear();
        m.send("n1", &echo(a, b, false, b"2"));

        assert_eq!(m.take_tun("n2").len(), 1);
        let kinds: Vec<u8> = m.seen.iter().map(|(_, _, d)| d[0]).collect();
        assert_eq!(kinds, vec![4], "data at once, no new handshake");
    }

    #[test]
    fn removed_peer_is_dropped_at_once() {
        let mut m = Mesh::new(&[ALLOW_ALL, ALLOW_ALL, ALLOW_ALL]);
        let (a, b, c) = (m.ip_of("n1"), m.ip_of("n2"), m.ip_of("n3"));
        m.send("n2", &echo(b, a, false, b"1"));
        m.send("n3", &echo(c, a, false, b"1"));
        assert_eq!(m.take_tun("n1").len(), 2);
        let peers: Vec<PeerConfig> = m
            .peers_of("n1")
            .into_iter()
            .filter(|p| p.name != "n2")
            .collect();

        m.reconfigure("n1", &peers);
        m.send("n2", &echo(b, a, false, b"2"));
        m.send("n3", &echo(c, a, false, b"2"));

        assert_eq!(m.take_tun("n1"), vec![echo(c, a, false, b"2")]);
        assert_eq!(m.drops("n1", DropReason::UnknownIndex), 1);
    }

    #[test]
    fn garbage_and_strangers_are_counted_and_the_table_keeps_serving() {
        let mut m = Mesh::new(&[ALLOW_ALL, ALLOW_ALL]);
        let (a, b) = (m.ip_of("n1"), m.ip_of("n2"));
        let stranger = SocketAddr::from(([198, 51, 100, 7], 9999));

        m.inject(stranger, "n1", b"");
        m.inject(stranger, "n1", b"not wireguard at all");
        let mut fake_init = vec![0u8; 148];
        fake_init[0] = 1;
        m.inject(stranger, "n1", &fake_init);
        let mut fake_data = vec![0u8; 64];
        fake_data[0] = 4;
        m.inject(stranger, "n1", &fake_data);
        m.send("n2", &echo(b, a, false, b"still here"));

        assert_eq!(m.drops("n1", DropReason::MalformedDatagram), 2);
        assert_eq!(m.drops("n1", DropReason::InvalidMac), 1);
        assert_eq!(m.drops("n1", DropReason::UnknownIndex), 1);
        assert_eq!(m.take_tun("n1").len(), 1);
    }

    #[test]
    fn handshake_from_an_unknown_key_is_counted() {
        let mut m = Mesh::new(&[ALLOW_ALL, ALLOW_ALL]);
        let (a, b) = (m.ip_of("n1"), m.ip_of("n2"));
        // n2 forgets n1: n1's initiation now comes from a key n2 does not know.
        m.reconfigure("n2", &[]);

        m.send("n1", &echo(a, b, false, b"1"));

        assert_eq!(m.drops("n2", DropReason::UnknownKey), 1);
        assert!(m.take_tun("n2").is_empty());
    }

    #[test]
    fn overlapping_allowed_ips_go_to_the_last_peer_with_a_warning() {
        let mut m = Mesh::new(&[ALLOW_ALL, ALLOW_ALL, ALLOW_ALL]);
        let mut peers = m.peers_of("n1");
        let shared: IpNet = "10.90.0.7/32".parse().expect("prefix");
        peers[0].allowed_ips.push(shared);
        peers[1].allowed_ips.push(shared);

        m.reconfigure("n1", &peers);

        let n1 = &m.nodes[m.node("n1")].table;
        let w = n1.warnings().join("\n");
        assert!(
            w.contains("n2") && w.contains("n3") && w.contains("10.90.0.7/32"),
            "{w}"
        );
        assert_eq!(
            n1.routes.lookup(shared.addr()),
            Some(&1),
            "last listed wins"
        );
    }

    #[test]
    fn new_peer_with_an_endpoint_gets_a_handshake_on_the_first_tick() {
        let mut m = Mesh::new(&[ALLOW_ALL, ALLOW_ALL]);

        m.tick("n1");

        let kinds: Vec<(SocketAddr, u8)> = m.seen.iter().map(|(_, to, d)| (*to, d[0])).collect();
        assert_eq!(
            kinds[..2],
            [(underlay(2), 1), (underlay(1), 2)],
            "{kinds:?}"
        );
        let n1 = m.node("n1");
        let snap = m.nodes[n1].table.snapshot();
        assert!(
            snap[0].since_handshake.is_some(),
            "session up without traffic"
        );
    }

    #[test]
    fn restarted_node_replaces_the_dead_session_its_peer_holds() {
        let mut m = Mesh::new(&[ALLOW_ALL, ALLOW_ALL]);
        let (a, b) = (m.ip_of("n1"), m.ip_of("n2"));
        m.send("n2", &echo(b, a, false, b"before"));
        assert_eq!(m.take_tun("n1").len(), 1);

        m.restart("n1");
        m.tick("n1");
        m.send("n2", &echo(b, a, false, b"after"));

        assert_eq!(
            m.take_tun("n1"),
            vec![echo(b, a, false, b"after")],
            "n2 sends on the new session at once, not on the one n1 lost"
        );
        assert_eq!(m.drops("n1", DropReason::UnknownIndex), 0);
    }

    #[test]
    fn unanswered_handshakes_move_to_the_next_endpoint() {
        let mut m = Mesh::new(&[ALLOW_ALL, ALLOW_ALL]);
        let dead = SocketAddr::from(([198, 51, 100, 9], 51820));
        let mut peers = m.peers_of("n1");
        peers[0].endpoint = Some(dead);
        peers[0].endpoints = vec![dead, underlay(2)];
        m.reconfigure("n1", &peers);
        m.restart("n1");

        m.tick("n1");
        let first = m.endpoint("n1", "n2");
        m.retry("n1");

        assert_eq!(first, Some(dead), "the first endpoint is tried first");
        assert_eq!(m.endpoint("n1", "n2"), Some(underlay(2)));
        let n1 = m.node("n1");
        assert!(m.nodes[n1].table.snapshot()[0].since_handshake.is_some());
        let to_dead = m.seen.iter().filter(|(_, to, _)| *to == dead).count();
        assert_eq!(
            to_dead, 1,
            "one initiation to the dead endpoint, then the next"
        );
    }

    #[test]
    fn a_rotation_announced_first_moves_the_session_to_the_next_key_in_one_handshake() {
        let mut m = Mesh::new(&[ALLOW_ALL, ALLOW_ALL]);
        let (a, b) = (m.ip_of("n1"), m.ip_of("n2"));
        m.send("n1", &echo(a, b, false, b"1"));
        assert_eq!(m.take_tun("n2").len(), 1);

        // n2 learns n1's next key; the running session is kept and still carries traffic.
        let next = PrivateKey::generate();
        let mut n2_peers = m.peers_of("n2");
        n2_peers[0].next_public_key = Some(next.public_key());
        m.reconfigure("n2", &n2_peers);
        m.send("n1", &echo(a, b, false, b"2"));
        assert_eq!(m.take_tun("n2").len(), 1, "the old session still works");

        // The coordinator's switch reaches n2 before n1 switches: the old session stays.
        n2_peers[0].public_key = next.public_key();
        n2_peers[0].next_public_key = None;
        m.reconfigure("n2", &n2_peers);
        m.send("n1", &echo(a, b, false, b"3"));
        assert_eq!(
            m.take_tun("n2").len(),
            1,
            "kept until n1 handshakes under the new key"
        );

        // n1 switches and handshakes at once; n2 moves the session to the new key.
        let n1 = m.node("n1");
        m.nodes[n1].key = next.clone();
        let peers = m.peers_of("n1");
        m.reconfigure("n1", &peers);
        m.seen.clear();
        m.tick("n1");
        let kinds: Vec<u8> = m.seen.iter().map(|(_, _, d)| d[0]).collect();
        assert_eq!(
            kinds[..2],
            [1, 2],
            "one initiation, one response: {kinds:?}"
        );
        // What n2 sends before n1's first data packet on the moved session is not lost.
        m.send("n2", &echo(b, a, true, b"early"));
        m.send("n1", &echo(a, b, false, b"4"));
        assert_eq!(m.take_tun("n2"), vec![echo(a, b, false, b"4")]);
        assert_eq!(m.take_tun("n1"), vec![echo(b, a, true, b"early")]);
        m.send("n2", &echo(b, a, true, b"5"));
        assert_eq!(m.take_tun("n1"), vec![echo(b, a, true, b"5")]);
        assert!(m.nodes[m.node("n2")].table.take_mismatches().is_empty());
    }

    #[test]
    fn a_key_change_the_peer_missed_is_reported_as_a_mismatch_on_both_sides() {
        let mut m = Mesh::new(&[ALLOW_ALL, ALLOW_ALL]);
        let (a, b) = (m.ip_of("n1"), m.ip_of("n2"));
        m.send("n1", &echo(a, b, false, b"1"));
        assert_eq!(m.take_tun("n2").len(), 1);

        // n1 switches; n2 never hears of the new key.
        let next = PrivateKey::generate();
        let n1 = m.node("n1");
        m.nodes[n1].key = next.clone();
        let peers = m.peers_of("n1");
        m.reconfigure("n1", &peers);
        m.seen.clear();
        m.tick("n1");
        let init = m.seen.first().map(|(_, _, d)| d.clone());
        let n2 = m.node("n2");
        let seen = m.nodes[n2].table.take_mismatches();
        assert_eq!(
            seen,
            vec![KeyMismatch {
                peer: "n1".into(),
                from: underlay(1),
                kind: MismatchKind::UnknownKey(next.public_key()),
            }]
        );
        assert!(
            seen[0].to_string().contains("peer key mismatch"),
            "{}",
            seen[0]
        );
        assert_eq!(
            m.nodes[n2].table.mismatch_warnings(),
            vec![seen[0].to_string()],
            "status shows it until the keys agree"
        );
        assert!(m.nodes[n2].table.take_mismatches().is_empty(), "taken once");

        // n2's own handshake goes to n1's old key: n1 says n2 holds a stale key.
        m.retry("n2");
        let at_n1 = m.nodes[n1].table.take_mismatches();
        assert_eq!(at_n1.len(), 1, "{at_n1:?}");
        assert_eq!(at_n1[0].peer, "n2");
        assert_eq!(at_n1[0].kind, MismatchKind::StaleKeyForUs);

        // The same handshake from an address that is no peer's is counted, not reported.
        let before = m.drops("n2", DropReason::UnknownKey);
        let init = init.expect("n1's initiation crossed the network");
        m.inject(SocketAddr::from(([198, 51, 100, 99], 4000)), "n2", &init);
        assert_eq!(m.drops("n2", DropReason::UnknownKey), before + 1);
        assert!(m.nodes[n2].table.take_mismatches().is_empty());

        // n2 gets the key it missed (a fresh netmap): it handshakes under it at once.
        let mut n2_peers = m.peers_of("n2");
        n2_peers[0].next_public_key = Some(next.public_key());
        m.reconfigure("n2", &n2_peers);
        m.seen.clear();
        m.tick("n2");
        assert_eq!(
            m.seen.first().map(|(from, to, d)| (*from, *to, d[0])),
            Some((underlay(2), underlay(1), 1)),
            "n2 initiates under the key it learnt"
        );
        m.send("n2", &echo(b, a, false, b"healed"));
        assert_eq!(m.take_tun("n1"), vec![echo(b, a, false, b"healed")]);
        assert!(m.nodes[n2].table.mismatch_warnings().is_empty());
        assert!(m.nodes[n1].table.mismatch_warnings().is_empty());
    }

    #[test]
    fn a_new_private_key_gives_fresh_sessions_and_keeps_learnt_endpoints() {
        let mut m = Mesh::new(&[ALLOW_ALL, ALLOW_ALL]);
        let (a, b) = (m.ip_of("n1"), m.ip_of("n2"));
        m.send("n1", &echo(a, b, false, b"1"));
        assert_eq!(m.take_tun("n2").len(), 1);
        let roamed = SocketAddr::from(([203, 0, 113, 10], 4444));
        let n2 = m.node("n2");
        m.nodes[n2].addr = roamed;
        m.send("n2", &echo(b, a, false, b"2"));
        assert_eq!(m.take_tun("n1").len(), 1);

        // n1 switches to a new key; n2 learns the new public key.
        let new_key = PrivateKey::generate();
        let n1 = m.node("n1");
        m.nodes[n1].key = new_key.clone();
        let peers = m.peers_of("n1");
        m.reconfigure("n1", &peers);
        let mut n2_peers = m.peers_of("n2");
        n2_peers[0].public_key = new_key.public_key();
        m.reconfigure("n2", &n2_peers);
        m.seen.clear();
        m.tick("n1");
        m.send("n1", &echo(a, b, false, b"3"));

        assert_eq!(m.nodes[n1].table.public_key(), new_key.public_key());
        assert_eq!(m.endpoint("n1", "n2"), Some(roamed), "learnt endpoint kept");
        let kinds: Vec<(SocketAddr, u8)> = m.seen.iter().map(|(_, to, d)| (*to, d[0])).collect();
        assert_eq!(
            kinds[0],
            (roamed, 1),
            "a fresh handshake on the new key: {kinds:?}"
        );
        assert_eq!(m.take_tun("n2"), vec![echo(a, b, false, b"3")]);
    }

    #[test]
    fn a_peer_with_a_session_stays_on_its_endpoint_when_a_retry_is_due() {
        let mut m = Mesh::new(&[ALLOW_ALL, ALLOW_ALL]);
        let other = SocketAddr::from(([198, 51, 100, 9], 51820));
        let mut peers = m.peers_of("n1");
        peers[0].endpoints = vec![other];
        m.reconfigure("n1", &peers);
        m.restart("n1");
        m.tick("n1");

        // The first tick's handshake was answered; a rekey-style retry keeps the endpoint.
        m.retry("n1");

        assert_eq!(m.endpoint("n1", "n2"), Some(underlay(2)));
        assert!(m.seen.iter().all(|(_, to, _)| *to != other));
    }

    #[test]
    fn with_no_session_the_larger_key_holds_its_keepalive_initiation_for_the_peers() {
        let mut m = Mesh::new(&[ALLOW_ALL, ALLOW_ALL]);
        // Keepalive every second; the fresh sessions this makes start without a handshake.
        for name in ["n1", "n2"] {
            let mut peers = m.peers_of(name);
            peers[0].persistent_keepalive = Some(1);
            m.reconfigure(name, &peers);
            let i = m.node(name);
            lock(&m.nodes[i].table.peers[0].state).initiate = false;
        }
        let (n1, n2) = (m.nodes[0].key.public_key(), m.nodes[1].key.public_key());
        let (larger, smaller) = if n1.0 > n2.0 {
            ("n1", "n2")
        } else {
            ("n2", "n1")
        };
        let counts = |m: &Mesh, name: &str| {
            let p = m.nodes[m.node(name)].table.snapshot().remove(0);
            (
                p.initiations_sent,
                p.initiations_held,
                p.since_handshake.is_some(),
            )
        };

        // The larger key's keepalive comes due first: its initiation is held, nothing is sent.
        let deadline = Instant::now() + Duration::from_secs(5);
        while counts(&m, larger).1 == 0 {
            assert!(
                Instant::now() < deadline,
                "no keepalive initiation from {larger}"
            );
            m.tick(larger);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(counts(&m, larger), (0, 1, false));
        assert!(m.seen.is_empty(), "{larger} sent {:?}", m.seen);

        // The smaller key's goes out at once and the larger answers it: one handshake.
        while counts(&m, smaller).0 == 0 {
            assert!(
                Instant::now() < deadline,
                "no keepalive initiation from {smaller}"
            );
            m.tick(smaller);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(counts(&m, smaller), (1, 0, true));
        let (sent, held, up) = counts(&m, larger);
        assert_eq!((sent, held, up), (0, 1, true));
        let inits = m
            .seen
            .iter()
            .filter(|(_, _, d)| d.first() == Some(&1))
            .count();
        let kinds: Vec<u8> = m.seen.iter().map(|(_, _, d)| d[0]).collect();
        assert_eq!(inits, 1, "one initiation crossed the network: {kinds:?}");
    }

    /// Turns on path MTU probing on every node (its overlay address, tunnel MTU 1420).
    /// Two probing nodes with a session, n1 having learned a 1200-byte path to n2. Returns the
    /// mesh and the nodes' addresses.
    fn session_over_a_1200_byte_path() -> (Mesh, IpAddr, IpAddr) {
        let mut m = Mesh::new(&[ALLOW_ALL, ALLOW_ALL]);
        probing(&mut m);
        let (a, b) = (m.ip_of("n1"), m.ip_of("n2"));
        m.send("n1", &echo(a, b, false, b"session"));
        m.take_tun("n2");
        let n1 = m.node("n1");
        lock(&m.nodes[n1].table.peers[0].state)
            .pmtu
            .set_learned(1200);
        (m, a, b)
    }

    fn probing(m: &mut Mesh) {
        for n in &mut m.nodes {
            let net = IpNet::from(n.ip);
            n.table.set_local(&[net], 1420);
        }
    }

    fn probe_packet(src: IpAddr, dst: IpAddr, id: u32, size: usize) -> Vec<u8> {
        let mut p = vec![0u8; size];
        let message = Message::Probe {
            id,
            size: size as u16,
        };
        let n = pmtu::build(src, dst, message, size, &mut p).expect("probe");
        p.truncate(n);
        p
    }

    #[test]
    fn a_probe_is_answered_through_the_tunnel_and_reaches_neither_tun_nor_filter() {
        // n2 allows nothing from n1 but ping and tcp:22: a probe that reached its filter would
        // be counted there; n1 allows all: an ack that reached its TUN would show there.
        let mut m = Mesh::new(&[ALLOW_ALL, POLICY]);
        probing(&mut m);
        let (a, b) = (m.ip_of("n1"), m.ip_of("n2"));
        m.send("n1", &echo(a, b, false, b"session"));
        m.take_tun("n2");
        m.seen.clear();

        m.send("n1", &probe_packet(a, b, 42, 1300));

        assert!(
            m.take_tun("n2").is_empty(),
            "the probe never reaches n2's TUN"
        );
        assert!(
            m.take_tun("n1").is_empty(),
            "the ack never reaches n1's TUN"
        );
        let to_n1: Vec<usize> = m
            .seen
            .iter()
            .filter(|(_, to, d)| *to == underlay(1) && d[0] == 4)
            .map(|(_, _, d)| d.len())
            .collect();
        assert_eq!(to_n1.len(), 1, "one ack came back: {to_n1:?}");
        assert!(to_n1[0] < 100, "a small one: {to_n1:?}");
        let n2 = m.nodes[m.node("n2")].table.counters().snapshot();
        assert!(n2.is_empty(), "no drop, no filter verdict at n2: {n2:?}");
    }

    #[test]
    fn garbled_and_spoofed_probes_are_dropped_and_counted() {
        let mut m = Mesh::new(&[ALLOW_ALL, ALLOW_ALL, ALLOW_ALL]);
        probing(&mut m);
        // n1 is compromised: its own filter lets it send from n3's address.
        let mut lying = inventory(3);
        lying.nodes[0].addresses.push(IpNet::from(m.ip_of("n3")));
        let checked = Policy::parse(ALLOW_ALL).expect("parses");
        let spec = netpolicy::compile(&checked.policy, &lying).filters["n1"].clone();
        let n1 = m.node("n1");
        *lock(&m.nodes[n1].filter) = Filter::new(spec, ConntrackConfig::default());
        let (a, b) = (m.ip_of("n1"), m.ip_of("n2"));
        let good = probe_packet(a, b, 7, 200);

        let mut version = good.clone();
        version[24] = 99;
        m.send("n1", &version);
        let mut truncated = good[..100].to_vec();
        truncated[2..4].copy_from_slice(&100u16.to_be_bytes());
        m.send("n1", &truncated);
        let mut kind = good.clone();
        kind[25] = 0xee;
        m.send("n1", &kind);
        assert_eq!(m.drops("n2", DropReason::BadProbe), 3);

        // From an inner source that is not n1's (n3's): the anti-spoofing check.
        m.send("n1", &probe_packet(m.ip_of("n3"), b, 8, 200));
        assert_eq!(m.drops("n2", DropReason::SpoofedSource), 1);

        // Protocol 253 without the magic is somebody else's experiment: the ordinary path.
        let mut foreign = good.clone();
        foreign[20..24].copy_from_slice(b"XXXX");
        m.send("n1", &foreign);
        assert_eq!(m.take_tun("n2"), vec![foreign]);
        assert_eq!(m.drops("n2", DropReason::BadProbe), 3);
        assert!(m.take_tun("n1").is_empty(), "no ack for any of them");
    }

    #[test]
    fn plain_wireguard_mode_neither_answers_nor_swallows_probes() {
        let mut m = Mesh::new(&[ALLOW_ALL, ALLOW_ALL]);
        probing(&mut m);
        let (a, b) = (m.ip_of("n1"), m.ip_of("n2"));
        let i = m.node("n2");
        let peers = m.peers_of("n2");
        let n = &m.nodes[i];
        let plain = PeerTable::new(
            &n.key,
            &peers,
            None,
            n.filter.clone(),
            Arc::new(Counters::default()),
            5000,
        )
        .plain_wireguard()
        .with_local(&[IpNet::from(b)], 1420);
        m.nodes[i].table = plain;
        let probe = probe_packet(a, b, 9, 300);

        m.send("n1", &probe);

        assert_eq!(m.take_tun("n2"), vec![probe], "delivered as any packet is");
        assert!(m.take_tun("n1").is_empty(), "no ack");
        // Even with an IPv6 endpoint, plain mode's timers send no probe.
        let v6: SocketAddr = "[2001:db8::1]:51820".parse().expect("addr");
        lock(&m.nodes[i].table.peers[0].state).endpoint = Some(v6);
        m.seen.clear();
        m.tick("n2");
        assert!(
            m.seen.iter().all(|(_, to, _)| *to != v6),
            "{:?}",
            m.seen.len()
        );
        let snap = m.nodes[i].table.snapshot();
        assert_eq!(
            snap[0].path_mtu_state,
            ztnet_proto::status::PathMtuState::NotProbed
        );
    }

    #[test]
    fn a_packet_above_the_learned_path_gets_a_synthetic_icmp_error_and_is_counted() {
        let (mut m, a, b) = session_over_a_1200_byte_path();

        let big = echo(a, b, false, &[0u8; 1372]);
        assert!(pmtu::ipv4_dont_fragment(&big));
        m.send("n1", &big);

        assert!(m.take_tun("n2").is_empty(), "dropped");
        assert_eq!(m.drops("n1", DropReason::TooBig), 1);
        let icmp = m.take_tun("n1");
        assert_eq!(icmp.len(), 1, "one ICMP error back into n1's TUN");
        let e = &icmp[0];
        assert_eq!((e[9], e[20], e[21]), (1, 3, 4), "fragmentation needed");
        assert_eq!(u16::from_be_bytes([e[26], e[27]]), 1200);
        assert_eq!(checksum(&e[..20]), 0, "header checksum");
        assert_eq!(checksum(&e[20..]), 0, "ICMP checksum");
        assert_eq!(&e[28..48], &big[..20], "quotes the dropped packet");

        // Without DF it goes anyway (fragmented on the way); at the limit it is untouched.
        let mut no_df = big.clone();
        no_df[6] = 0;
        no_df[10..12].copy_from_slice(&[0, 0]);
        let sum = checksum(&no_df[..20]);
        no_df[10..12].copy_from_slice(&sum.to_be_bytes());
        m.send("n1", &no_df);
        let fits = echo(a, b, false, &[0u8; 1172]);
        m.send("n1", &fits);
        assert_eq!(m.take_tun("n2"), vec![no_df, fits]);
        assert_eq!(m.drops("n1", DropReason::TooBig), 1);
    }

    /// Moves n2 to an IPv6 underlay address, as n1 sees it; returns that address.
    fn n2_over_ipv6(m: &mut Mesh) -> SocketAddr {
        let v6: SocketAddr = "[2001:db8::2]:51820".parse().expect("addr");
        let n2 = m.node("n2");
        m.nodes[n2].addr = v6;
        let mut peers = m.peers_of("n1");
        peers[0].endpoint = Some(v6);
        m.reconfigure("n1", &peers);
        v6
    }

    fn path_mtu(m: &Mesh, at: &str) -> (ztnet_proto::status::PathMtuState, Option<u16>) {
        let p = m.nodes[m.node(at)].table.snapshot().remove(0);
        (p.path_mtu_state, p.path_mtu)
    }

    #[test]
    fn the_timer_measures_a_silent_narrow_ipv6_path_through_the_tunnel() {
        use ztnet_proto::status::PathMtuState;
        let mut m = Mesh::new(&[ALLOW_ALL, ALLOW_ALL]);
        n2_over_ipv6(&mut m);
        probing(&mut m);
        // WireGuard messages above 1340 bytes vanish (the in-memory network carries UDP
        // payloads): inner packets of up to 1340 - 32 bytes cross.
        m.max_datagram = 1340;

        let deadline = Instant::now() + Duration::from_secs(30);
        while path_mtu(&m, "n1").0 != PathMtuState::Learned {
            assert!(
                Instant::now() < deadline,
                "no result: {:?}",
                path_mtu(&m, "n1")
            );
            m.tick("n1");
            std::thread::sleep(Duration::from_millis(20));
        }

        let (_, learned) = path_mtu(&m, "n1");
        let learned = learned.expect("learned");
        assert!((1300..=1308).contains(&learned), "{learned}");
        assert!(m.take_tun("n2").is_empty(), "no probe reached n2's TUN");
        assert!(m.take_tun("n1").is_empty(), "no ack reached n1's TUN");
        let probes = m
            .seen
            .iter()
            .filter(|(_, to, d)| to.is_ipv6() && d[0] == 4 && d.len() > 1200)
            .count();
        assert!(probes <= 20, "bounded: {probes} probes");
        assert_eq!(
            path_mtu(&m, "n2").0,
            PathMtuState::NotProbed,
            "IPv4 endpoint"
        );
    }

    #[test]
    fn synthetic_icmp_errors_are_rate_limited_but_every_drop_is_counted() {
        let (mut m, a, b) = session_over_a_1200_byte_path();
        let big = echo(a, b, false, &[0u8; 1372]);

        for _ in 0..250 {
            m.send("n1", &big);
        }

        let icmp = m.take_tun("n1").len();
        assert!(
            (ICMP_PER_SECOND as usize..=ICMP_PER_SECOND as usize + 10).contains(&icmp),
            "{icmp} ICMP errors for 250 packets in well under a second"
        );
        assert_eq!(m.drops("n1", DropReason::TooBig), 250);
        assert!(m.take_tun("n2").is_empty());
    }
}
