//! The stateful per-packet filter of one node: rule tables indexed by protocol and port, and
//! a bounded connection-tracking table ([`crate::flows`]). No I/O, no clock of its own, no
//! allocation per packet once a flow is open.
//!
//! Peers live in slots whose index stays the same across `install`s for as long as the peer
//! stays in the spec; a [`PeerRef`] names a slot and the generation it was given out in, so that
//! a handle to a peer that left never reaches the peer that took its slot.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::compile::RuleEntry;
pub(crate) use crate::flows::Direction;
use crate::flows::{Find, Flow, FlowKey, FlowTable, TcpState};
use crate::model::{PacketClass, PortSpec};
use crate::open::{self, FlowFate, FlowSnapshot, OpenFlow};
use crate::packet::{
    self, Addr, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Packet, Transport,
};
use crate::{AllowReason, ConntrackConfig, DenyReason, FilterSpec, RuleId, RuleKind, Verdict};

/// A TCP flow that has seen only its opening SYN.
pub const TCP_OPENING_TIMEOUT: Duration = Duration::from_secs(60);
/// An established TCP flow, idle.
pub const TCP_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// A TCP flow after FIN in both directions.
pub const TCP_CLOSING_TIMEOUT: Duration = Duration::from_secs(60);
/// A TCP flow after a RST.
pub const TCP_RESET_TIMEOUT: Duration = Duration::from_secs(10);
/// A UDP flow that has seen no reply.
pub const UDP_UNREPLIED_TIMEOUT: Duration = Duration::from_secs(30);
/// A UDP flow that has seen a reply, idle.
pub const UDP_TIMEOUT: Duration = Duration::from_secs(120);
/// An ICMP echo flow, idle.
pub const ICMP_TIMEOUT: Duration = Duration::from_secs(30);
/// A flow of another protocol (allowed by `any`), idle.
pub const OTHER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the later fragments of an allowed first fragment pass.
pub const FRAGMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Most fragmented datagrams tracked at once.
const MAX_FRAGMENTS: usize = 4096;
/// A full table is swept for expired flows at most this often.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Above this many indexed entries per protocol, a rule table scans linearly instead.
const MAX_INDEX_PER_ENTRY: usize = 64;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A duration in the filter's clock: nanoseconds. 2^64 ns is 584 years.
const fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

/// Gives every filter its own id, so that a [`PeerRef`] of one filter is refused by another.
static NEXT_FILTER_ID: AtomicU32 = AtomicU32::new(1);

/// A peer of one [`crate::Filter`], resolved from its name once by [`crate::Filter::peer`], so
/// that deciding a packet costs no name lookup.
///
/// A handle stays valid across [`crate::Filter::install`] for as long as the peer stays in the
/// installed spec. Once an install drops the peer, its handle is refused for good (every packet
/// through it is denied with [`DenyReason::UnknownPeer`]), even if a later spec brings a peer of
/// that name back: resolve the name again then. A handle of another filter is refused likewise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerRef {
    filter: u32,
    slot: u32,
    generation: u32,
}

/// The filter's state; see [`crate::Filter`].
#[derive(Debug)]
pub(crate) struct State {
    id: u32,
    peers: Vec<PeerSlot>,
    /// Slots that no peer holds.
    free: Vec<u32>,
    by_name: HashMap<Box<str>, u32, FastHash>,
    flows: FlowTable,
    fragments: HashMap<FragmentKey, (u32, u64), FastHash>,
    /// What the filter's clock counts from: the first `now` it was given.
    epoch: Option<Instant>,
    /// The last `now` given and its ticks: a batch of packets often shares one `now`.
    last: Option<(Instant, u64)>,
    /// The slot of the last peer a name resolved to: a burst of packets from or to one peer
    /// compares one name instead of hashing it.
    last_peer: Option<u32>,
}

/// One peer slot: its name and rules while a peer holds it.
#[derive(Debug)]
struct PeerSlot {
    name: Box<str>,
    /// Raised each time a peer leaves the slot.
    generation: u32,
    tables: Option<PeerTable>,
}

impl State {
    pub(crate) fn new(spec: FilterSpec, config: ConntrackConfig) -> Self {
        let mut state = State {
            id: NEXT_FILTER_ID.fetch_add(1, Ordering::Relaxed),
            peers: Vec::with_capacity(spec.peers.len()),
            free: Vec::new(),
            by_name: HashMap::with_capacity_and_hasher(spec.peers.len(), FastHash::default()),
            flows: FlowTable::new(config.max_flows),
            fragments: HashMap::with_capacity_and_hasher(MAX_FRAGMENTS, FastHash::default()),
            epoch: None,
            last: None,
            last_peer: None,
        };
        state.place_peers(&spec);
        state
    }

    /// Gives every peer of the spec its slot: the one it had, or a free or new one.
    fn place_peers(&mut self, spec: &FilterSpec) {
        for (name, rules) in &spec.peers {
            let tables = PeerTable {
                inbound: RuleTable::new(&rules.inbound),
                outbound: RuleTable::new(&rules.outbound),
            };
            if let Some(&slot) = self.by_name.get(name.as_str()) {
                self.peers[slot as usize].tables = Some(tables);
                continue;
            }
            let slot = match self.free.pop() {
                Some(slot) => {
                    let p = &mut self.peers[slot as usize];
                    p.name = Box::from(name.as_str());
                    p.tables = Some(tables);
                    slot
                }
                None => {
                    self.peers.push(PeerSlot {
                        name: Box::from(name.as_str()),
                        generation: 0,
                        tables: Some(tables),
                    });
                    (self.peers.len() - 1) as u32
                }
            };
            self.by_name.insert(Box::from(name.as_str()), slot);
        }
    }

    pub(crate) fn install(&mut self, spec: FilterSpec, now: Instant) {
        let now = self.ticks(now);
        self.last_peer = None;
        // Peers that leave free their slots first; their flows go below.
        let mut kept = vec![true; self.peers.len()];
        for (slot, p) in self.peers.iter_mut().enumerate() {
            if p.tables.is_some() && !spec.peers.contains_key(&*p.name) {
                self.by_name.remove(&p.name);
                p.tables = None;
                p.generation = p.generation.wrapping_add(1);
                self.free.push(slot as u32);
                kept[slot] = false;
            }
        }
        self.place_peers(&spec);
        let peers = &self.peers;
        self.flows.retain(|key, flow| {
            if flow.expires <= now || !kept.get(flow.peer as usize).copied().unwrap_or(false) {
                return false;
            }
            let Some(tables) = peers
                .get(flow.peer as usize)
                .and_then(|p| p.tables.as_ref())
            else {
                return false;
            };
            matches!(
                rejudge(tables, key, flow.origin, flow.echo),
                Some(e) if e.kind == RuleKind::Grant
            )
        });
        // Fragments in flight are re-checked by their next first fragment.
        self.fragments.clear();
    }

    pub(crate) fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// Copies at most `limit` live flows that are not ending, and counts all of them.
    pub(crate) fn flow_snapshot(&self, now: Instant, limit: usize) -> FlowSnapshot {
        let now = self.ticks_peek(now);
        let mut entries = Vec::with_capacity(limit.min(self.flows.len()));
        let mut live = 0;
        for (key, flow) in self.flows.iter() {
            if !open::listed(flow, now) {
                continue;
            }
            live += 1;
            if entries.len() < limit {
                entries.push((*key, *flow));
            }
        }
        let names = self
            .peers
            .iter()
            .map(|p| p.tables.as_ref().map(|_| p.name.clone()))
            .collect();
        FlowSnapshot {
            entries,
            names,
            live,
            now,
        }
    }

    /// How the installed rules judge an open flow: as [`State::install`] judges each one.
    pub(crate) fn judge_open_flow(&self, flow: &OpenFlow) -> FlowFate {
        let Some((key, origin)) = open::key_of(flow) else {
            return FlowFate::Malformed;
        };
        let Some(tables) = self
            .by_name
            .get(flow.peer.as_str())
            .and_then(|&slot| self.peers.get(slot as usize))
            .and_then(|p| p.tables.as_ref())
        else {
            return FlowFate::PeerGone;
        };
        match rejudge(tables, &key, origin, flow.echo) {
            Some(e) if e.kind == RuleKind::Grant => FlowFate::Kept(e.rule),
            Some(e) => FlowFate::Denied(e.rule),
            None => FlowFate::NoRule,
        }
    }

    /// The handle of a peer, if the installed spec has it.
    pub(crate) fn peer(&self, name: &str) -> Option<PeerRef> {
        let slot = *self.by_name.get(name)?;
        Some(PeerRef {
            filter: self.id,
            slot,
            generation: self.peers[slot as usize].generation,
        })
    }

    /// The name of the peer a handle names, while it is valid.
    pub(crate) fn peer_name(&self, peer: PeerRef) -> Option<&str> {
        let slot = self.resolve(peer)?;
        Some(&self.peers[slot as usize].name)
    }

    /// The slot of a peer's name, if the installed spec has it.
    #[inline]
    fn slot_of(&mut self, name: &str) -> Option<u32> {
        if let Some(slot) = self.last_peer
            && let Some(p) = self.peers.get(slot as usize)
            && p.tables.is_some()
            && *p.name == *name
        {
            return Some(slot);
        }
        let slot = self.by_name.get(name).copied();
        self.last_peer = slot;
        slot
    }

    /// The slot of a valid handle.
    #[inline]
    fn resolve(&self, peer: PeerRef) -> Option<u32> {
        let p = self.peers.get(peer.slot as usize)?;
        let valid = peer.filter == self.id && p.generation == peer.generation;
        (valid && p.tables.is_some()).then_some(peer.slot)
    }

    /// Nanoseconds from the epoch to `now`; a time before the epoch counts as the epoch.
    #[inline]
    fn ticks(&mut self, now: Instant) -> u64 {
        match self.last {
            Some((last, ticks)) if last == now => ticks,
            _ => self.ticks_of(now),
        }
    }

    /// [`State::ticks`] without remembering `now`.
    fn ticks_peek(&self, now: Instant) -> u64 {
        let Some(epoch) = self.epoch else {
            return 0;
        };
        let d = now.saturating_duration_since(epoch);
        d.as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(d.subsec_nanos()))
    }

    #[inline(never)]
    fn ticks_of(&mut self, now: Instant) -> u64 {
        let epoch = *self.epoch.get_or_insert(now);
        let d = now.saturating_duration_since(epoch);
        let ticks = d
            .as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(d.subsec_nanos()));
        self.last = Some((now, ticks));
        ticks
    }

    pub(crate) fn decide_name(
        &mut self,
        dir: Direction,
        peer: &str,
        buf: &[u8],
        now: Instant,
    ) -> Verdict {
        let slot = self.slot_of(peer);
        self.decide(dir, slot, buf, now)
    }

    #[inline]
    pub(crate) fn decide_ref(
        &mut self,
        dir: Direction,
        peer: PeerRef,
        buf: &[u8],
        now: Instant,
    ) -> Verdict {
        let slot = self.resolve(peer);
        self.decide(dir, slot, buf, now)
    }

    #[inline]
    fn decide(&mut self, dir: Direction, peer: Option<u32>, buf: &[u8], now: Instant) -> Verdict {
        let now = self.ticks(now);
        // The common packet from a known peer takes the short way; it decides the same.
        if let Some(peer) = peer
            && let Some(simple) = packet::simple(buf)
            && let Some(verdict) = self.simple(dir, peer, &simple, now)
        {
            return verdict;
        }
        self.general(dir, peer, buf, now)
    }

    /// An IPv4 TCP, UDP or ICMP echo packet that is not a fragment, read by
    /// [`packet::simple`]: the same steps as [`State::tcp`] and [`State::stateful`], without
    /// the general packet's fields. An echo is decided here only when it belongs to a live
    /// echo flow; `None` leaves any other echo to [`State::general`].
    #[inline]
    fn simple(
        &mut self,
        dir: Direction,
        peer: u32,
        pkt: &packet::Simple,
        now: u64,
    ) -> Option<Verdict> {
        let (src, dst) = (pkt.src(), pkt.dst());
        let (local, remote) = match dir {
            Direction::Outbound => (src, dst),
            Direction::Inbound => (dst, src),
        };
        let (local_port, remote_port) = match dir {
            Direction::Outbound => (pkt.src_port, pkt.dst_port),
            Direction::Inbound => (pkt.dst_port, pkt.src_port),
        };
        if pkt.proto == PROTO_ICMP {
            // The echo's flow key, as [`State::general`] makes it: the id, and no second port.
            let key = FlowKey::new(true, PROTO_ICMP, local, remote, pkt.src_port, 0);
            let (_, flow) = self.live_flow(&key, peer, now);
            let flow = flow?;
            // Requests go the way the flow was opened, replies the other way ([`State::echo`]).
            let request = pkt.flags == packet::ECHO_REQUEST;
            if !flow.echo || request != (dir == flow.origin) {
                return None;
            }
            flow.expires = now.saturating_add(ns(ICMP_TIMEOUT));
            return Some(Verdict::Allow(AllowReason::Established));
        }
        let key = FlowKey::new(true, pkt.proto, local, remote, local_port, remote_port);
        let (find, flow) = self.live_flow(&key, peer, now);
        let addrs = (src, dst, true);
        Some(if pkt.proto == PROTO_TCP {
            let fresh_syn = pkt.flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            if let Some(flow) = flow {
                let reopen = fresh_syn && matches!(flow.tcp, TcpState::Closing | TcpState::Reset);
                if !reopen {
                    flow.tcp_update(dir, pkt.flags, now);
                    return Some(Verdict::Allow(AllowReason::Established));
                }
            }
            self.tcp_new(dir, peer, addrs, key, find, pkt.flags, now)
        } else {
            if let Some(flow) = flow {
                flow.udp_update(dir, PROTO_UDP, now);
                return Some(Verdict::Allow(AllowReason::Established));
            }
            let class = PacketClass::Udp(pkt.dst_port);
            self.stateful_new(dir, peer, addrs, key, find, class, now)
        })
    }

    /// Any packet, classified in full. Kept out of line so that the short way stays short.
    #[inline(never)]
    fn general(&mut self, dir: Direction, peer: Option<u32>, buf: &[u8], now: u64) -> Verdict {
        let pkt = match packet::classify(buf) {
            Ok(p) => p,
            Err(reason) => return Verdict::Deny(DenyReason::Malformed(reason)),
        };
        let Some(peer) = peer else {
            // A packet that cannot be read is malformed whoever sent it.
            if let Transport::Error = pkt.transport
                && let Err(reason) = packet::quoted(buf, &pkt)
            {
                return Verdict::Deny(DenyReason::Malformed(reason));
            }
            return Verdict::Deny(DenyReason::UnknownPeer);
        };
        let (local, remote) = match dir {
            Direction::Outbound => (pkt.src, pkt.dst),
            Direction::Inbound => (pkt.dst, pkt.src),
        };
        let verdict = match pkt.transport {
            Transport::Tcp {
                src_port,
                dst_port,
                flags,
            } => {
                let key = ported_key(&pkt, local, remote, dir, src_port, dst_port);
                self.tcp(dir, peer, &pkt, key, flags, now)
            }
            Transport::Udp { src_port, dst_port } => {
                let key = ported_key(&pkt, local, remote, dir, src_port, dst_port);
                self.stateful(dir, peer, &pkt, key, PacketClass::Udp(dst_port), now)
            }
            Transport::Echo { request, id } => {
                let key = FlowKey::new(pkt.v4, pkt.proto, local, remote, id, 0);
                self.echo(dir, peer, &pkt, key, request, now)
            }
            Transport::Error => match packet::quoted(buf, &pkt) {
                Ok(inner) => self.icmp_error(dir, peer, &pkt, &inner, now),
                Err(reason) => Verdict::Deny(DenyReason::Malformed(reason)),
            },
            Transport::Fragment => self.later_fragment(peer, &pkt, now),
            Transport::IcmpOther => {
                self.stateless(dir, peer, (pkt.src, pkt.dst, pkt.v4), PacketClass::Other)
            }
            Transport::Other => {
                let key = FlowKey::new(pkt.v4, pkt.proto, local, remote, 0, 0);
                self.stateful(dir, peer, &pkt, key, PacketClass::Other, now)
            }
        };
        if let (Verdict::Allow(_), Some(frag)) = (&verdict, pkt.fragment)
            && frag.first
            && frag.more
        {
            self.remember_fragment(peer, &pkt, frag.id, now);
        }
        verdict
    }

    /// Looks up a flow, in one probe of the table: the live flow of this peer, if there is
    /// one, and where a new flow with this key would go. An expired flow counts as absent; it
    /// stays until a new flow takes its slot or a sweep removes it.
    #[inline]
    fn live_flow(&mut self, key: &FlowKey, peer: u32, now: u64) -> (Find, Option<&mut Flow>) {
        let find = self.flows.find(key);
        let flow = find
            .found
            .and_then(|at| self.flows.flow_mut(at))
            .filter(|f| f.expires > now && f.peer == peer);
        (find, flow)
    }

    fn tcp(
        &mut self,
        dir: Direction,
        peer: u32,
        pkt: &Packet,
        key: FlowKey,
        flags: u8,
        now: u64,
    ) -> Verdict {
        let fresh_syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let (find, flow) = self.live_flow(&key, peer, now);
        if let Some(flow) = flow {
            let reopen = fresh_syn && matches!(flow.tcp, TcpState::Closing | TcpState::Reset);
            if !reopen {
                flow.tcp_update(dir, flags, now);
                return Verdict::Allow(AllowReason::Established);
            }
            // A new SYN on an ended flow opens it again, in the same slot, if the rules allow.
        }
        self.tcp_new(dir, peer, (pkt.src, pkt.dst, pkt.v4), key, find, flags, now)
    }

    /// A TCP packet that no live flow of its peer takes: the rules decide, and open a flow.
    #[inline(never)]
    #[allow(
        clippy::too_many_arguments,
        reason = "the parts of one packet, kept in registers"
    )]
    fn tcp_new(
        &mut self,
        dir: Direction,
        peer: u32,
        addrs: (Addr, Addr, bool),
        key: FlowKey,
        find: Find,
        flags: u8,
        now: u64,
    ) -> Verdict {
        let fresh_syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let port = match dir {
            Direction::Outbound => key.remote_port(),
            Direction::Inbound => key.local_port(),
        };
        let verdict = self.stateless(dir, peer, addrs, PacketClass::Tcp(port));
        if matches!(verdict, Verdict::Allow(_)) && flags & TCP_RST == 0 {
            let tcp = if fresh_syn {
                TcpState::Opening
            } else {
                TcpState::Established
            };
            let flow = Flow {
                peer,
                origin: dir,
                echo: false,
                replied: false,
                tcp,
                fin: 0,
                expires: now,
            };
            return self.open(find, key, flow, verdict, now);
        }
        verdict
    }

    fn stateful(
        &mut self,
        dir: Direction,
        peer: u32,
        pkt: &Packet,
        key: FlowKey,
        class: PacketClass,
        now: u64,
    ) -> Verdict {
        let (find, flow) = self.live_flow(&key, peer, now);
        if let Some(flow) = flow {
            flow.udp_update(dir, key.proto(), now);
            return Verdict::Allow(AllowReason::Established);
        }
        self.stateful_new(dir, peer, (pkt.src, pkt.dst, pkt.v4), key, find, class, now)
    }

    /// A UDP (or other protocol's) packet that no live flow of its peer takes.
    #[inline(never)]
    #[allow(
        clippy::too_many_arguments,
        reason = "the parts of one packet, kept in registers"
    )]
    fn stateful_new(
        &mut self,
        dir: Direction,
        peer: u32,
        addrs: (Addr, Addr, bool),
        key: FlowKey,
        find: Find,
        class: PacketClass,
        now: u64,
    ) -> Verdict {
        let verdict = self.stateless(dir, peer, addrs, class);
        if matches!(verdict, Verdict::Allow(_)) {
            let flow = Flow {
                peer,
                origin: dir,
                echo: false,
                replied: false,
                tcp: TcpState::Established,
                fin: 0,
                expires: now,
            };
            return self.open(find, key, flow, verdict, now);
        }
        verdict
    }

    fn echo(
        &mut self,
        dir: Direction,
        peer: u32,
        pkt: &Packet,
        key: FlowKey,
        request: bool,
        now: u64,
    ) -> Verdict {
        let (find, flow) = self.live_flow(&key, peer, now);
        if let Some(flow) = flow {
            // Requests go the way the flow was opened, replies the other way.
            if request == (dir == flow.origin) && flow.echo {
                flow.expires = now.saturating_add(ns(ICMP_TIMEOUT));
                return Verdict::Allow(AllowReason::Established);
            }
        }
        if !request {
            return self.stateless(dir, peer, (pkt.src, pkt.dst, pkt.v4), PacketClass::Other);
        }
        let verdict = self.stateless(dir, peer, (pkt.src, pkt.dst, pkt.v4), PacketClass::IcmpEcho);
        if matches!(verdict, Verdict::Allow(_)) {
            let flow = Flow {
                peer,
                origin: dir,
                echo: true,
                replied: false,
                tcp: TcpState::Established,
                fin: 0,
                expires: now,
            };
            return self.open(find, key, flow, verdict, now);
        }
        verdict
    }

    fn icmp_error(
        &mut self,
        dir: Direction,
        peer: u32,
        pkt: &Packet,
        inner: &packet::Quoted,
        now: u64,
    ) -> Verdict {
        // The quoted packet went the other way: an error this node receives quotes a packet it
        // sent, so the quoted source is local; an error it sends quotes a packet it received.
        let (local, remote, local_port, remote_port) = match dir {
            Direction::Inbound => (inner.src, inner.dst, inner.src_port, inner.dst_port),
            Direction::Outbound => (inner.dst, inner.src, inner.dst_port, inner.src_port),
        };
        // Either way the error goes back to the quoted packet's sender.
        let error_goes_back = pkt.dst == inner.src;
        let inner_echo = matches!(inner.proto, PROTO_ICMP | PROTO_ICMPV6);
        let (local_port, remote_port) = if inner_echo {
            (inner.src_port, 0)
        } else {
            (local_port, remote_port)
        };
        let key = FlowKey::new(pkt.v4, inner.proto, local, remote, local_port, remote_port);
        if error_goes_back && self.live_flow(&key, peer, now).1.is_some() {
            return Verdict::Allow(AllowReason::Related);
        }
        self.stateless(dir, peer, (pkt.src, pkt.dst, pkt.v4), PacketClass::Other)
    }

    fn later_fragment(&mut self, peer: u32, pkt: &Packet, now: u64) -> Verdict {
        let Some(frag) = pkt.fragment else {
            return Verdict::Deny(DenyReason::Malformed("fragment-without-header"));
        };
        let key = FragmentKey {
            src: pkt.src,
            dst: pkt.dst,
            proto: pkt.proto,
            id: frag.id,
        };
        match self.fragments.get(&key) {
            // Kept until it expires: fragments may come in any order, and may be duplicated.
            Some(&(p, expires)) if p == peer && expires > now => {
                Verdict::Allow(AllowReason::Related)
            }
            _ => Verdict::Deny(DenyReason::NoRule),
        }
    }

    fn remember_fragment(&mut self, peer: u32, pkt: &Packet, id: u32, now: u64) {
        if self.fragments.len() >= MAX_FRAGMENTS {
            self.fragments.retain(|_, (_, expires)| *expires > now);
            if self.fragments.len() >= MAX_FRAGMENTS {
                return;
            }
        }
        let key = FragmentKey {
            src: pkt.src,
            dst: pkt.dst,
            proto: pkt.proto,
            id,
        };
        let expires = now.saturating_add(ns(FRAGMENT_TIMEOUT));
        self.fragments.insert(key, (peer, expires));
    }

    /// Decides a packet by the rules alone.
    fn stateless(
        &self,
        dir: Direction,
        peer: u32,
        (src, dst, v4): (Addr, Addr, bool),
        class: PacketClass,
    ) -> Verdict {
        let Some(rules) = self
            .peers
            .get(peer as usize)
            .and_then(|p| p.tables.as_ref())
        else {
            return Verdict::Deny(DenyReason::UnknownPeer);
        };
        let table = match dir {
            Direction::Outbound => &rules.outbound,
            Direction::Inbound => &rules.inbound,
        };
        match table.decide(&src, &dst, v4, class) {
            Some(e) if e.kind == RuleKind::Deny => Verdict::Deny(DenyReason::Rule(e.rule)),
            Some(e) => Verdict::Allow(AllowReason::Rule(e.rule)),
            None => Verdict::Deny(DenyReason::NoRule),
        }
    }

    /// Records an allowed new flow where the lookup said it goes; a full table refuses it.
    fn open(
        &mut self,
        find: Find,
        key: FlowKey,
        mut flow: Flow,
        verdict: Verdict,
        now: u64,
    ) -> Verdict {
        flow.expires = now.saturating_add(flow.initial_timeout(key.proto()));
        if self.flows.insert(find, key, flow, now, ns(SWEEP_INTERVAL)) {
            verdict
        } else {
            Verdict::Deny(DenyReason::TableFull)
        }
    }
}

/// The entry that decides an open flow now, as if its first packet came from the side that
/// opened it: what `install` keeps a flow by, and what [`State::judge_open_flow`] answers.
fn rejudge<'a>(
    tables: &'a PeerTable,
    key: &FlowKey,
    origin: Direction,
    echo: bool,
) -> Option<&'a CompiledEntry> {
    let table = match origin {
        Direction::Outbound => &tables.outbound,
        Direction::Inbound => &tables.inbound,
    };
    let (src, dst, port) = match origin {
        Direction::Outbound => (key.local(), key.remote(), key.remote_port()),
        Direction::Inbound => (key.remote(), key.local(), key.local_port()),
    };
    let class = match key.proto() {
        PROTO_TCP => PacketClass::Tcp(port),
        PROTO_UDP => PacketClass::Udp(port),
        _ if echo => PacketClass::IcmpEcho,
        _ => PacketClass::Other,
    };
    table.decide(&src, &dst, key.v4(), class)
}

/// The key of a TCP or UDP packet's flow.
#[inline]
fn ported_key(
    pkt: &Packet,
    local: Addr,
    remote: Addr,
    dir: Direction,
    src_port: u16,
    dst_port: u16,
) -> FlowKey {
    let (local_port, remote_port) = match dir {
        Direction::Outbound => (src_port, dst_port),
        Direction::Inbound => (dst_port, src_port),
    };
    FlowKey::new(pkt.v4, pkt.proto, local, remote, local_port, remote_port)
}

/// The rules between this node and one peer, ready for lookups.
#[derive(Debug)]
struct PeerTable {
    inbound: RuleTable,
    outbound: RuleTable,
}

/// A prefix as a mask over a 128-bit number (IPv4 mapped into `::ffff:0:0/96`).
#[derive(Debug, Clone, Copy)]
struct Prefix {
    v4: bool,
    bits: u128,
    mask: u128,
}

impl Prefix {
    fn new(net: &IpNet) -> Self {
        let (v4, bits, len) = match net {
            IpNet::V4(n) => {
                let mapped = n.network().to_ipv6_mapped();
                (true, u128::from(mapped), 96 + u32::from(n.prefix_len()))
            }
            IpNet::V6(n) => (false, u128::from(n.network()), u32::from(n.prefix_len())),
        };
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        };
        Prefix {
            v4,
            bits: bits & mask,
            mask,
        }
    }

    fn contains(&self, v4: bool, addr: u128) -> bool {
        self.v4 == v4 && addr & self.mask == self.bits
    }
}

#[derive(Debug)]
struct CompiledEntry {
    kind: RuleKind,
    rule: RuleId,
    src: Vec<Prefix>,
    dst: Vec<Prefix>,
    ports: Vec<PortSpec>,
}

/// The entries of one direction, denies before grants, with a port index per protocol.
#[derive(Debug)]
struct RuleTable {
    entries: Vec<CompiledEntry>,
    tcp: PortIndex,
    udp: PortIndex,
    echo: Vec<u32>,
    other: Vec<u32>,
}

impl RuleTable {
    fn new(raw: &[RuleEntry]) -> Self {
        let mut entries: Vec<CompiledEntry> = raw
            .iter()
            .map(|e| CompiledEntry {
                kind: e.rule.kind,
                rule: e.rule,
                src: e.src.iter().map(Prefix::new).collect(),
                dst: e.dst.iter().map(Prefix::new).collect(),
                ports: e.ports.clone(),
            })
            .collect();
        entries.sort_by_key(|e| (e.kind != RuleKind::Deny, e.rule));
        let pick = |f: fn(&PortSpec) -> bool| -> Vec<u32> {
            (0..entries.len() as u32)
                .filter(|&i| entries[i as usize].ports.iter().any(f))
                .collect()
        };
        let echo = pick(|p| matches!(p, PortSpec::Icmp | PortSpec::Any));
        let other = pick(|p| matches!(p, PortSpec::Any));
        let tcp = PortIndex::new(&entries, |p| match *p {
            PortSpec::Tcp(lo, hi) => Some((lo, hi)),
            PortSpec::Any => Some((0, u16::MAX)),
            _ => None,
        });
        let udp = PortIndex::new(&entries, |p| match *p {
            PortSpec::Udp(lo, hi) => Some((lo, hi)),
            PortSpec::Any => Some((0, u16::MAX)),
            _ => None,
        });
        RuleTable {
            entries,
            tcp,
            udp,
            echo,
            other,
        }
    }

    /// The first matching entry, denies first. (A reference, not a copy of its kind and id:
    /// returning those through the stack cost a store-forwarding stall per new flow.)
    fn decide(
        &self,
        src: &Addr,
        dst: &Addr,
        v4: bool,
        class: PacketClass,
    ) -> Option<&CompiledEntry> {
        let (s, d) = (*src, *dst);
        // Every entry that an exact list gives for a port admits that port; only a port index
        // that fell back to listing every entry needs each entry's ports checked.
        let (candidates, exact): (&[u32], bool) = match class {
            PacketClass::Tcp(port) => (self.tcp.lookup(port), self.tcp.exact),
            PacketClass::Udp(port) => (self.udp.lookup(port), self.udp.exact),
            PacketClass::IcmpEcho => (&self.echo, true),
            PacketClass::Other => (&self.other, true),
        };
        for &i in candidates {
            let e = &self.entries[i as usize];
            if !exact && !e.ports.iter().any(|p| p.admits(class)) {
                continue;
            }
            if e.src.iter().any(|p| p.contains(v4, s)) && e.dst.iter().any(|p| p.contains(v4, d)) {
                return Some(e);
            }
        }
        None
    }
}

/// Port ranges cut into segments; each segment lists the entries covering it, in order.
#[derive(Debug)]
struct PortIndex {
    /// Segment starts, ascending, the first is 0.
    starts: Vec<u16>,
    /// Per segment, its slice of `flat`.
    slices: Vec<(u32, u32)>,
    flat: Vec<u32>,
    /// Each segment lists exactly the entries whose ranges cover all of it; false when the
    /// index fell back to one segment holding every entry.
    exact: bool,
    /// With many segments: per block of 16 ports, the segment holding the block's first port,
    /// so that a lookup searches at most 17 starts instead of all of them. Empty otherwise.
    blocks: Vec<u32>,
}

/// Above this many segments a port index gets its block directory (16 KiB).
const BLOCKS_ABOVE: usize = 64;

impl PortIndex {
    /// The segment holding `port`: the last start at or below it.
    #[inline]
    fn segment(&self, port: u16) -> usize {
        let Some(&first) = self.blocks.get(usize::from(port >> 4)) else {
            return self
                .starts
                .partition_point(|&s| s <= port)
                .saturating_sub(1);
        };
        // A block of 16 ports holds at most 16 starts after its first port's segment.
        let lo = first as usize;
        let hi = (lo + 17).min(self.starts.len());
        let after = self.starts.get(lo + 1..hi).unwrap_or(&[]);
        lo + after.partition_point(|&s| s <= port)
    }
}

impl PortIndex {
    fn new(entries: &[CompiledEntry], range: fn(&PortSpec) -> Option<(u16, u16)>) -> Self {
        let mut cuts: Vec<u32> = vec![0];
        let mut covering: Vec<(u32, u16, u16)> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            for (lo, hi) in e.ports.iter().filter_map(range) {
                cuts.push(u32::from(lo));
                cuts.push(u32::from(hi) + 1);
                covering.push((i as u32, lo, hi));
            }
        }
        cuts.sort_unstable();
        cuts.dedup();
        cuts.retain(|&c| c <= u32::from(u16::MAX));
        let budget = MAX_INDEX_PER_ENTRY * entries.len().max(1);
        let mut flat = Vec::new();
        let mut slices = Vec::with_capacity(cuts.len());
        for &start in &cuts {
            let begin = flat.len() as u32;
            let mut last = u32::MAX;
            for &(i, lo, hi) in &covering {
                let inside = u32::from(lo) <= start && start <= u32::from(hi);
                if inside && i != last {
                    flat.push(i);
                    last = i;
                }
            }
            slices.push((begin, flat.len() as u32));
            if flat.len() > budget {
                // Too many overlapping ranges to index: one segment holding every entry.
                let all: Vec<u32> = {
                    let mut v: Vec<u32> = covering.iter().map(|c| c.0).collect();
                    v.dedup();
                    v
                };
                let n = all.len() as u32;
                return PortIndex {
                    starts: vec![0],
                    slices: vec![(0, n)],
                    flat: all,
                    exact: false,
                    blocks: Vec::new(),
                };
            }
        }
        let starts: Vec<u16> = cuts.into_iter().map(|c| c as u16).collect();
        let blocks = if starts.len() > BLOCKS_ABOVE {
            (0..=u16::MAX >> 4)
                .map(|b| {
                    let port = b << 4;
                    starts.partition_point(|&s| s <= port).saturating_sub(1) as u32
                })
                .collect()
        } else {
            Vec::new()
        };
        PortIndex {
            starts,
            slices,
            flat,
            exact: true,
            blocks,
        }
    }

    #[inline]
    fn lookup(&self, port: u16) -> &[u32] {
        match self.slices.get(self.segment(port)) {
            Some(&(a, b)) => &self.flat[a as usize..b as usize],
            None => &[],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FragmentKey {
    src: Addr,
    dst: Addr,
    proto: u8,
    id: u32,
}

impl Hash for FragmentKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u128(self.src);
        state.write_u128(self.dst);
        state.write_u64(u64::from(self.id) | u64::from(self.proto) << 32);
    }
}

impl Flow {
    fn initial_timeout(&self, proto: u8) -> u64 {
        match (proto, self.tcp) {
            (PROTO_TCP, TcpState::Opening) => ns(TCP_OPENING_TIMEOUT),
            (PROTO_TCP, _) => ns(TCP_ESTABLISHED_TIMEOUT),
            (PROTO_UDP, _) => ns(UDP_UNREPLIED_TIMEOUT),
            _ if self.echo => ns(ICMP_TIMEOUT),
            _ => ns(OTHER_TIMEOUT),
        }
    }

    /// The timeout that the flow's last packet set: its idle time is this minus what is left.
    pub(crate) fn lifetime(&self, proto: u8) -> u64 {
        match (proto, self.tcp) {
            (PROTO_TCP, TcpState::Opening) => ns(TCP_OPENING_TIMEOUT),
            (PROTO_TCP, TcpState::Established) => ns(TCP_ESTABLISHED_TIMEOUT),
            (PROTO_TCP, TcpState::Closing) => ns(TCP_CLOSING_TIMEOUT),
            (PROTO_TCP, TcpState::Reset) => ns(TCP_RESET_TIMEOUT),
            _ if self.echo => ns(ICMP_TIMEOUT),
            _ => self.idle_timeout(proto),
        }
    }

    fn idle_timeout(&self, proto: u8) -> u64 {
        match proto {
            PROTO_UDP if self.replied => ns(UDP_TIMEOUT),
            PROTO_UDP => ns(UDP_UNREPLIED_TIMEOUT),
            _ => ns(OTHER_TIMEOUT),
        }
    }

    /// A packet of a live UDP (or other protocol's) flow.
    #[inline]
    fn udp_update(&mut self, dir: Direction, proto: u8, now: u64) {
        if dir != self.origin {
            self.replied = true;
        }
        self.expires = now.saturating_add(self.idle_timeout(proto));
    }

    #[inline]
    fn tcp_update(&mut self, dir: Direction, flags: u8, now: u64) {
        let from_origin = dir == self.origin;
        if flags & TCP_RST != 0 {
            self.tcp = TcpState::Reset;
        } else if self.tcp == TcpState::Reset {
            // Stay reset: stragglers pass until the short timeout ends.
        } else if flags & TCP_FIN != 0 {
            self.fin |= if from_origin { 1 } else { 2 };
            if self.fin == 3 {
                self.tcp = TcpState::Closing;
            }
        } else if self.tcp == TcpState::Opening && !from_origin {
            self.tcp = TcpState::Established;
        }
        let timeout = match self.tcp {
            TcpState::Opening => ns(TCP_OPENING_TIMEOUT),
            TcpState::Established => ns(TCP_ESTABLISHED_TIMEOUT),
            TcpState::Closing => ns(TCP_CLOSING_TIMEOUT),
            TcpState::Reset => ns(TCP_RESET_TIMEOUT),
        };
        // A closing or reset flow lives its short timeout from the last FIN or RST; the ACKs
        // after it do not extend it.
        let ending = matches!(self.tcp, TcpState::Closing | TcpState::Reset);
        if !ending || flags & (TCP_RST | TCP_FIN) != 0 {
            self.expires = now.saturating_add(timeout);
        }
    }
}

/// A small hasher for peer names and fragment keys: each word is mixed by a folded 64x64->128
/// multiply, so that every input bit reaches the low bits hashbrown takes its bucket from. A
/// peer can only vary its own fragment ids; peer names come from the coordinator.
#[derive(Debug, Default, Clone, Copy)]
struct FastHasher {
    hash: u64,
}

type FastHash = BuildHasherDefault<FastHasher>;

const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
const SEED: u64 = 0x243f_6a88_85a3_08d3;

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        let product = u128::from(self.hash ^ word ^ SEED) * u128::from(MULTIPLIER);
        self.hash = (product as u64) ^ ((product >> 64) as u64);
    }
}

impl Hasher for FastHasher {
    /// Whole words, then the last 0 to 7 bytes with the length in the top byte.
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            self.add(u64::from_le_bytes(word));
        }
        let mut last = (bytes.len() as u64) << 56;
        for (i, &b) in words.remainder().iter().enumerate() {
            last |= u64::from(b) << (8 * i);
        }
        self.add(last);
    }

    /// `str` hashes end with a 0xff byte: one word, not another call of `write`.
    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_u128(&mut self, n: u128) {
        self.add(n as u64);
        self.add((n >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{Inventory, NodeIdentity, Policy, compile};

    fn node(name: &str, n: u8, tag: &str) -> NodeIdentity {
        NodeIdentity {
            name: name.into(),
            namespace: "p".into(),
            tags: vec![tag.into()],
            spiffe_id: String::new(),
            addresses: vec![format!("10.0.0.{n}/32").parse().expect("a valid prefix")],
            routes: Vec::new(),
        }
    }

    fn spec() -> FilterSpec {
        let src = "[[grant]]\nfrom = [\"tag:web\"]\nto = [\"tag:db\"]\nports = [\"tcp:20-25\", \"udp:20-22\", \"icmp\"]\n\
                   [[deny]]\nfrom = [\"tag:web\"]\nto = [\"tag:db\"]\nports = [\"tcp:23\"]\n";
        let policy = Policy::parse(src).expect("the test policy is valid").policy;
        let nodes = vec![node("web1", 1, "web"), node("db1", 2, "db")];
        compile(&policy, &Inventory { nodes }).filters["db1"].clone()
    }

    /// An ICMP echo request (`request`) or reply with id `id`, inbound from web1 or outbound.
    fn echo_packet(request: bool, inbound: bool, id: u16) -> Vec<u8> {
        let mut p = packet(false, inbound, id, 0, 0);
        p[9] = PROTO_ICMP;
        p[20..28].copy_from_slice(&[if request { 8 } else { 0 }, 0, 0, 0, 0, 0, 0, 1]);
        p[24..26].copy_from_slice(&id.to_be_bytes());
        p
    }

    fn packet(tcp: bool, inbound: bool, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let (src, dst) = if inbound { (1, 2) } else { (2, 1) };
        let l4 = if tcp { 20 } else { 8 };
        let total = 20 + l4 + 4;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[9] = if tcp { PROTO_TCP } else { PROTO_UDP };
        p[12..16].copy_from_slice(&[10, 0, 0, src]);
        p[16..20].copy_from_slice(&[10, 0, 0, dst]);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        if tcp {
            p[32] = 5 << 4;
            p[33] = flags;
        } else {
            p[24..26].copy_from_slice(&((8 + 4) as u16).to_be_bytes());
        }
        p
    }

    proptest! {
        /// The block directory finds the same segment as a search of every start.
        #[test]
        fn the_block_directory_finds_every_ports_segment(
            ranges in prop::collection::vec((1u16..=u16::MAX, 0u16..300), 1..200),
            ports in prop::collection::vec(any::<u16>(), 64),
        ) {
            let entries: Vec<CompiledEntry> = ranges
                .iter()
                .enumerate()
                .map(|(i, &(lo, len))| CompiledEntry {
                    kind: RuleKind::Grant,
                    rule: RuleId { kind: RuleKind::Grant, index: i, line: i + 1 },
                    src: Vec::new(),
                    dst: Vec::new(),
                    ports: vec![PortSpec::Tcp(lo, lo.saturating_add(len))],
                })
                .collect();
            let index = PortIndex::new(&entries, |p| match *p {
                PortSpec::Tcp(lo, hi) => Some((lo, hi)),
                _ => None,
            });
            let edges = ranges.iter().flat_map(|&(lo, len)| [lo, lo.saturating_add(len)]);
            for port in ports.into_iter().chain(edges).chain([0, 1, u16::MAX]) {
                let plain = index.starts.partition_point(|&s| s <= port).saturating_sub(1);
                prop_assert_eq!(index.segment(port), plain, "port {}", port);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The short way for common packets decides exactly as the general way, packet after
        /// packet, flows, timeouts and the full table included.
        #[test]
        fn the_short_way_decides_as_the_general_way(
            steps in prop::collection::vec(
                (any::<bool>(), any::<bool>(), 19u16..27, 19u16..27, any::<u8>(), 0u64..200,
                 prop::option::of((0usize..48, any::<u8>())), any::<bool>()),
                1..60,
            ),
        ) {
            let config = ConntrackConfig { max_flows: 8 };
            let (mut short, mut general) = (State::new(spec(), config), State::new(spec(), config));
            let web = short.by_name.get("web1").copied();
            let mut now = Instant::now();
            for (tcp, inbound, sport, dport, flags, secs, edit, echo) in steps {
                // Echoes in a few ids, requests and replies both ways, and a few seconds apart
                // so that their flows also expire (ICMP_TIMEOUT) between packets.
                let secs = if echo { secs / 4 } else { secs };
                now += Duration::from_secs(secs);
                let mut p = if echo {
                    echo_packet(tcp, inbound, sport % 3)
                } else {
                    packet(tcp, inbound, sport, dport, flags)
                };
                if let Some((at, byte)) = edit && let Some(b) = p.get_mut(at) {
                    *b = byte;
                }
                let dir = if inbound { Direction::Inbound } else { Direction::Outbound };
                let a = short.decide(dir, web, &p, now);
                let t = general.ticks(now);
                let b = general.general(dir, web, &p, t);
                prop_assert_eq!(a, b);
                prop_assert_eq!(short.flow_count(), general.flow_count());
            }
        }
    }
}
