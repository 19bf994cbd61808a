//! Path MTU discovery to peers over an IPv6 underlay (FC-23), without ICMP from the path.
//!
//! IPv6 routers never fragment, and a narrower hop that drops silently (no "packet too big")
//! black-holes every datagram above its MTU. So the node measures the path itself, through
//! the tunnel:
//!
//! - A **probe** is an inner IP packet from this node's overlay address to the peer's, of the
//!   size being tested, protocol 253 (RFC 3692, for experiments), whose payload is a
//!   [`Message`]: magic `ZTPM`, version, kind, probe id and the probe's own size. It travels
//!   as an ordinary WireGuard data packet, so it is authenticated like any other.
//! - The peer's node recognises it after decryption and the anti-spoofing check, and answers
//!   with a small **ack** (the same format, kind ack, same id and size). Neither ever reaches
//!   a TUN or the policy filter. Anything with the magic that does not parse is counted
//!   (`bad-probe`) and dropped.
//! - [`Prober`] runs the search for one peer on the timer thread: the smallest inner size
//!   whose datagram fits any IPv6 path (1280 bytes outer), then the full tunnel MTU, then a
//!   binary search between the largest size acknowledged and the smallest that was not. A
//!   peer that never acknowledges the smallest probe "does not probe" (stock WireGuard): it
//!   keeps the configured MTU for the rest of the session. The search runs again 10 minutes
//!   after it ends, when a new session comes up and as soon as the peer's endpoint moves.
//!
//! The hot path compares a packet's length against [`Prober::limit`]; larger packets go to
//! the slow path in the peer table: a synthetic ICMP "fragmentation needed" / ICMPv6 "packet
//! too big" to the inner sender ([`icmp_too_big`]), or, for IPv6 packets of at most 1280
//! bytes and IPv4 without DF, a send the kernel cannot lose to the narrow hop
//! ([`fragments`], outer IPv6 fragments of at most 1280 bytes).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use ztnet_proto::status::PathMtuState;

/// The IP protocol number of probes and acks (RFC 3692: for experimentation).
pub const PROTOCOL: u8 = 253;

/// The first bytes of every probe payload.
const MAGIC: [u8; 4] = *b"ZTPM";

/// The version of the payload format.
const VERSION: u8 = 1;

const KIND_PROBE: u8 = 1;
const KIND_ACK: u8 = 2;

/// Length of the payload that carries a [`Message`] (the rest of a probe is zeros).
pub const PAYLOAD_LEN: usize = 16;

/// What an IPv6 underlay adds to an inner packet: IPv6 header, UDP header, WireGuard data
/// header (16) and tag (16).
pub const OVERHEAD_V6: usize = 40 + 8 + 32;

/// The IPv6 minimum link MTU (RFC 8200): every IPv6 path carries a packet this large.
pub const IPV6_MIN_MTU: usize = 1280;

/// The smallest inner size probed: its datagram is exactly the IPv6 minimum.
pub const MIN_INNER: u16 = (IPV6_MIN_MTU - OVERHEAD_V6) as u16;

/// How long a probe waits for its ack before the peer's round-trip time is known, and at
/// most; once known, four round trips (at least [`MIN_TIMEOUT`]).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const MIN_TIMEOUT: Duration = Duration::from_millis(100);

/// Probes of one size before it counts as too big (the first is at `MIN_INNER`: before the
/// peer counts as not probing).
const TRIES: u8 = 2;
const TRIES_MIN: u8 = 3;

/// The search stops when the gap between what fits and what does not is this small.
const GRANULARITY: u16 = 8;

/// How long a learned MTU stands before it is measured again.
pub const REPROBE: Duration = Duration::from_secs(600);

/// After a re-probe that got no answer at all (the peer answered before in this session):
/// keep the old result and try again after this long.
const RETRY_AFTER_SILENCE: Duration = Duration::from_secs(60);

/// A probe or its ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// "Does a packet of `size` bytes reach you?"
    Probe {
        /// Identifies the probe.
        id: u32,
        /// The probe packet's total length, as sent.
        size: u16,
    },
    /// "Your probe `id` of `size` bytes arrived."
    Ack {
        /// The probe's id.
        id: u32,
        /// The probe's length as received.
        size: u16,
    },
}

/// What a decrypted packet is, as far as probing goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classified {
    /// Not a probe: the ordinary path (filter, TUN).
    Other,
    /// A well-formed probe or ack, to `dst`.
    Message(Message, IpAddr),
    /// Protocol 253 with the magic, but not a valid probe: dropped and counted.
    Bad,
}

/// Looks at a decrypted packet: protocol 253 with the magic is a probe or an ack (or bad);
/// anything else is [`Classified::Other`]. Never panics, whatever the bytes.
pub fn classify(packet: &[u8]) -> Classified {
    if !may_be_probe(packet) {
        return Classified::Other;
    }
    let Some((dst, header, _, total)) = ip_header(packet) else {
        return Classified::Other;
    };
    let payload = &packet[header.min(packet.len())..];
    if payload.get(..4) != Some(&MAGIC[..]) {
        return Classified::Other;
    }
    // From here on it claims to be ours: every inconsistency is a bad probe.
    if total != Some(packet.len()) || payload.len() < PAYLOAD_LEN {
        return Classified::Bad;
    }
    let (version, kind) = (payload[4], payload[5]);
    let id = u32::from_be_bytes([payload[8], payload[9], payload[10], payload[11]]);
    let size = u16::from_be_bytes([payload[12], payload[13]]);
    if version != VERSION {
        return Classified::Bad;
    }
    let message = match kind {
        KIND_PROBE if usize::from(size) == packet.len() => Message::Probe { id, size },
        KIND_ACK if payload.len() == PAYLOAD_LEN => Message::Ack { id, size },
        _ => return Classified::Bad,
    };
    Classified::Message(message, dst)
}

/// Whether a decrypted packet carries protocol 253 (IPv4 protocol or IPv6 next header):
/// the receive hot path's only cost, one byte compare for every other packet.
#[inline]
pub fn may_be_probe(packet: &[u8]) -> bool {
    let at = match packet.first().map(|b| b >> 4) {
        Some(4) => 9,
        Some(6) => 6,
        _ => return false,
    };
    packet.get(at) == Some(&PROTOCOL)
}

/// The destination, header length, protocol (IPv4) or next header (IPv6), and the total
/// length the header claims (`None` for an IPv4 fragment, which a probe never is).
fn ip_header(packet: &[u8]) -> Option<(IpAddr, usize, u8, Option<usize>)> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            let fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0;
            let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
            let total = (ihl >= 20 && !fragment).then_some(total);
            Some((IpAddr::V4(dst), ihl.max(20), packet[9], total))
        }
        6 if packet.len() >= 40 => {
            let payload = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
            let mut dst = [0u8; 16];
            dst.copy_from_slice(&packet[24..40]);
            Some((
                IpAddr::V6(Ipv6Addr::from(dst)),
                40,
                packet[6],
                Some(40 + payload),
            ))
        }
        _ => None,
    }
}

/// Writes a probe or ack from `src` to `dst` into `out`, `size` bytes in all (at least the
/// headers and [`PAYLOAD_LEN`]); returns the length, or `None` when the families differ or
/// `out` is too short.
pub fn build(
    src: IpAddr,
    dst: IpAddr,
    message: Message,
    size: usize,
    out: &mut [u8],
) -> Option<usize> {
    let header = match (src, dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => 20,
        (IpAddr::V6(_), IpAddr::V6(_)) => 40,
        _ => return None,
    };
    let size = size.max(header + PAYLOAD_LEN);
    if out.len() < size || size > usize::from(u16::MAX) {
        return None;
    }
    let packet = &mut out[..size];
    packet.fill(0);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_header(packet, PROTOCOL, s, d),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6_header(packet, PROTOCOL, s, d),
        _ => return None,
    }
    let (kind, id, size_field) = match message {
        Message::Probe { id, size } => (KIND_PROBE, id, size),
        Message::Ack { id, size } => (KIND_ACK, id, size),
    };
    let p = &mut packet[header..];
    p[..4].copy_from_slice(&MAGIC);
    p[4] = VERSION;
    p[5] = kind;
    p[8..12].copy_from_slice(&id.to_be_bytes());
    p[12..14].copy_from_slice(&size_field.to_be_bytes());
    Some(size)
}

/// Fills a 20-byte IPv4 header at the start of `packet` (total length = `packet.len()`).
fn ipv4_header(packet: &mut [u8], proto: u8, src: Ipv4Addr, dst: Ipv4Addr) {
    let len = packet.len() as u16;
    packet[0] = 0x45;
    packet[1] = 0;
    packet[2..4].copy_from_slice(&len.to_be_bytes());
    packet[4..6].copy_from_slice(&[0, 0]);
    packet[6..8].copy_from_slice(&[0x40, 0]); // DF
    packet[8] = 64;
    packet[9] = proto;
    packet[10..12].copy_from_slice(&[0, 0]);
    packet[12..16].copy_from_slice(&src.octets());
    packet[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&[&packet[..20]], 0);
    packet[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// Fills a 40-byte IPv6 header at the start of `packet` (payload length from its length).
fn ipv6_header(packet: &mut [u8], next: u8, src: Ipv6Addr, dst: Ipv6Addr) {
    let payload = (packet.len() - 40) as u16;
    packet[..4].copy_from_slice(&[0x60, 0, 0, 0]);
    packet[4..6].copy_from_slice(&payload.to_be_bytes());
    packet[6] = next;
    packet[7] = 64;
    packet[8..24].copy_from_slice(&src.octets());
    packet[24..40].copy_from_slice(&dst.octets());
}

/// The Internet checksum (RFC 1071) of the concatenated `parts`, starting from `initial`
/// (a pseudo-header sum).
fn checksum(parts: &[&[u8]], initial: u32) -> u16 {
    let mut sum = u64::from(initial);
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in *part {
            match odd.take() {
                Some(hi) => sum += u64::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u64::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The IPv6 pseudo-header sum for `len` bytes of upper-layer protocol `next`.
fn pseudo_v6(src: &Ipv6Addr, dst: &Ipv6Addr, len: usize, next: u8) -> u32 {
    let mut sum = 0u32;
    for addr in [src.octets(), dst.octets()] {
        for w in addr.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
    }
    sum + (len as u32 >> 16) + (len as u32 & 0xffff) + u32::from(next)
}

/// Why no ICMP error was made for a too-big packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoIcmp {
    /// The packet is itself an ICMP error, a non-first fragment, or from an address no error
    /// may go to (RFC 1122 3.2.2, RFC 4443 2.4 (e)).
    NotAllowed,
    /// Not a parseable IP packet.
    Malformed,
}

/// Most bytes of an ICMPv4 error (RFC 1812 4.3.2.3: up to 576 in all).
const ICMP4_MAX: usize = 576;

/// Writes into `out` the ICMP error that tells the sender of `packet` (read from the TUN)
/// that its destination takes at most `mtu` bytes: ICMPv4 type 3 code 4 with the next-hop MTU,
/// or ICMPv6 type 2 (packet too big, `mtu` raised to 1280 at least, RFC 8200). It comes from
/// the packet's destination (so it passes a reverse-path filter on the TUN) and quotes the
/// packet's start: the header and as much as fits in 576 bytes (IPv4) or 1280 (IPv6).
/// Returns its length.
pub fn icmp_too_big(packet: &[u8], mtu: usize, out: &mut [u8]) -> Result<usize, NoIcmp> {
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => icmp4_frag_needed(packet, mtu, out),
        Some(6) if packet.len() >= 40 => icmp6_too_big(packet, mtu, out),
        _ => Err(NoIcmp::Malformed),
    }
}

fn icmp4_frag_needed(packet: &[u8], mtu: usize, out: &mut [u8]) -> Result<usize, NoIcmp> {
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    if ihl < 20 || packet.len() < ihl {
        return Err(NoIcmp::Malformed);
    }
    let offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let is_icmp_error = packet[9] == 1
        && packet.len() > ihl
        && !matches!(packet[ihl], 0 | 8 | 13 | 14 | 15 | 16 | 17 | 18);
    if offset != 0
        || is_icmp_error
        || src.is_unspecified()
        || src.is_broadcast()
        || src.is_multicast()
        || dst.is_multicast()
        || dst.is_broadcast()
    {
        return Err(NoIcmp::NotAllowed);
    }
    let quote = packet.len().min(ICMP4_MAX - 28);
    let len = 28 + quote;
    if out.len() < len {
        return Err(NoIcmp::Malformed);
    }
    let msg = &mut out[..len];
    ipv4_header(msg, 1, dst, src);
    msg[6] = 0; // no DF on the error itself
    msg[10..12].copy_from_slice(&[0, 0]);
    let sum = checksum(&[&msg[..20]], 0);
    msg[10..12].copy_from_slice(&sum.to_be_bytes());
    let icmp = &mut msg[20..];
    icmp[0] = 3;
    icmp[1] = 4;
    icmp[2..4].copy_from_slice(&[0, 0]);
    icmp[4..6].copy_from_slice(&[0, 0]);
    let mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
    icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
    icmp[8..].copy_from_slice(&packet[..quote]);
    let sum = checksum(&[icmp], 0);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    Ok(len)
}

fn icmp6_too_big(packet: &[u8], mtu: usize, out: &mut [u8]) -> Result<usize, NoIcmp> {
    let mut a = [0u8; 16];
    a.copy_from_slice(&packet[8..24]);
    let src = Ipv6Addr::from(a);
    a.copy_from_slice(&packet[24..40]);
    let dst = Ipv6Addr::from(a);
    // An ICMPv6 error (type below 128) is never answered with another. (Behind extension
    // headers it is not seen here; RFC 4443 2.4 (e) allows a packet too big to multicast,
    // but the node has no multicast peers to send it for.)
    let is_icmp_error = packet[6] == 58 && packet.len() > 40 && packet[40] < 128;
    if is_icmp_error || src.is_unspecified() || src.is_multicast() || dst.is_multicast() {
        return Err(NoIcmp::NotAllowed);
    }
    let quote = packet.len().min(IPV6_MIN_MTU - 48);
    let len = 48 + quote;
    if out.len() < len {
        return Err(NoIcmp::Malformed);
    }
    let msg = &mut out[..len];
    ipv6_header(msg, 58, dst, src);
    let icmp = &mut msg[40..];
    icmp[0] = 2;
    icmp[1] = 0;
    icmp[2..4].copy_from_slice(&[0, 0]);
    let mtu = u32::try_from(mtu.max(IPV6_MIN_MTU)).unwrap_or(u32::MAX);
    icmp[4..8].copy_from_slice(&mtu.to_be_bytes());
    icmp[8..].copy_from_slice(&packet[..quote]);
    let sum = checksum(&[icmp], pseudo_v6(&dst, &src, icmp.len(), 58));
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    Ok(len)
}

/// Whether an IPv4 packet has its don't-fragment bit set (false for anything else).
pub fn ipv4_dont_fragment(packet: &[u8]) -> bool {
    packet.first().is_some_and(|b| b >> 4 == 4) && packet.get(6).is_some_and(|b| b & 0x40 != 0)
}

/// Largest IPv6 packet [`fragments`] makes: the IPv6 minimum MTU, so every fragment crosses
/// every IPv6 path.
pub const FRAGMENT_MTU: usize = IPV6_MIN_MTU;

/// Cuts the UDP datagram `src:sport -> dst:dport` carrying `payload` into IPv6 fragments of at
/// most [`FRAGMENT_MTU`] bytes (RFC 8200 4.5), each a whole IPv6 packet with a fragment header,
/// and hands each to `emit`. `id` is the fragment identification. Used to send a datagram that
/// must arrive although it is larger than the learned path (the receiving kernel reassembles).
pub fn fragments(
    (src, sport): (Ipv6Addr, u16),
    (dst, dport): (Ipv6Addr, u16),
    payload: &[u8],
    id: u32,
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) {
    let udp_len = 8 + payload.len();
    let Ok(udp_len16) = u16::try_from(udp_len) else {
        return;
    };
    let mut udp = [0u8; 8];
    udp[..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&dport.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len16.to_be_bytes());
    let sum = checksum(&[&udp, payload], pseudo_v6(&src, &dst, udp_len, 17));
    let sum = if sum == 0 { 0xffff } else { sum };
    udp[6..8].copy_from_slice(&sum.to_be_bytes());

    let chunk = (FRAGMENT_MTU - 48) & !7;
    let mut offset = 0;
    while offset < udp_len {
        let end = (offset + chunk).min(udp_len);
        let more = end < udp_len;
        scratch.clear();
        scratch.resize(48 + end - offset, 0);
        ipv6_header(scratch, 44, src, dst);
        scratch[40] = 17;
        let field = (offset as u16) | u16::from(more);
        scratch[42..44].copy_from_slice(&field.to_be_bytes());
        scratch[44..48].copy_from_slice(&id.to_be_bytes());
        // Bytes `offset..end` of the UDP header followed by the payload.
        for (i, byte) in scratch[48..].iter_mut().enumerate() {
            let at = offset + i;
            *byte = if at < 8 { udp[at] } else { payload[at - 8] };
        }
        emit(scratch);
        offset = end;
    }
}

/// A probe in flight.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    id: u32,
    size: u16,
    sent: Instant,
    tries: u8,
}

/// One search: the largest size acknowledged and the smallest that was not.
#[derive(Debug, Clone, Copy)]
struct Search {
    fits: Option<u16>,
    too_big: u16,
    probe: Option<Outstanding>,
}

/// The path MTU search for one peer. Lives in the peer's state; driven by the timer thread.
#[derive(Debug, Clone)]
pub struct Prober {
    /// The largest inner packet the tunnel takes to this peer: the hot path's compare.
    limit: usize,
    learned: Option<u16>,
    /// The peer answered no probe in this session: it does not probe.
    silent: bool,
    search: Option<Search>,
    /// When the next search starts; `None` until the peer qualifies.
    next: Option<Instant>,
    /// The endpoint the result is for.
    endpoint: Option<SocketAddr>,
    /// The round-trip time of the last acknowledged probe.
    rtt: Option<Duration>,
    next_id: u32,
}

impl Prober {
    /// A prober that has measured nothing: the configured MTU stands.
    pub fn new(seed: u32) -> Prober {
        Prober {
            limit: usize::MAX,
            learned: None,
            silent: false,
            search: None,
            next: None,
            endpoint: None,
            rtt: None,
            next_id: seed.wrapping_mul(2_654_435_761) | 1,
        }
    }

    /// The largest inner packet to send to this peer whole; `usize::MAX` when unknown.
    #[inline]
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The learned inner MTU, if a search found one.
    pub fn learned(&self) -> Option<u16> {
        self.learned
    }

    /// For status.
    pub fn state(&self) -> PathMtuState {
        match (
            self.learned,
            self.silent,
            self.next.is_some() || self.search.is_some(),
        ) {
            (Some(_), _, _) => PathMtuState::Learned,
            (None, true, _) => PathMtuState::PeerDoesNotProbe,
            (None, false, true) => PathMtuState::Probing,
            (None, false, false) => PathMtuState::NotProbed,
        }
    }

    /// A new session with the peer: measure again now, and let a peer that did not answer
    /// in the last session try again.
    pub fn session_up(&mut self, now: Instant) {
        self.silent = false;
        self.search = None;
        if self.endpoint.is_some() {
            self.next = Some(now);
        }
    }

    /// Called on every timer tick with the peer's endpoint, whether a session is up, and the
    /// tunnel MTU. Returns the id and size of a probe to send now, if one is due.
    pub fn poll(
        &mut self,
        now: Instant,
        endpoint: Option<SocketAddr>,
        session: bool,
        mtu: u16,
    ) -> Option<(u32, u16)> {
        let endpoint = endpoint
            .filter(|e| matches!(e, SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_none()));
        if endpoint.is_none() || mtu <= MIN_INNER {
            // An IPv4 underlay (routers fragment) or a tunnel that fits any IPv6 path.
            *self = Prober {
                next_id: self.next_id,
                ..Prober::new(0)
            };
            return None;
        }
        if endpoint != self.endpoint {
            // New endpoint (first, or a roam): the old result may not hold; search at once,
            // keeping the old limit until the new one is known.
            self.endpoint = endpoint;
            self.rtt = None;
            self.search = None;
            self.silent = false;
            self.next = Some(now);
        }
        if !session {
            return None;
        }
        let mut search = match self.search {
            Some(s) => s,
            None => {
                if self.silent || self.next.is_none_or(|t| now < t) {
                    return None;
                }
                self.next = None;
                Search {
                    fits: None,
                    too_big: mtu.saturating_add(1),
                    probe: None,
                }
            }
        };
        if let Some(p) = search.probe {
            if now.saturating_duration_since(p.sent) < self.timeout() {
                self.search = Some(search);
                return None;
            }
            let tries = if search.fits.is_none() {
                TRIES_MIN
            } else {
                TRIES
            };
            if p.tries < tries {
                let id = self.fresh_id();
                search.probe = Some(Outstanding {
                    id,
                    sent: now,
                    tries: p.tries + 1,
                    ..p
                });
                self.search = Some(search);
                return Some((id, p.size));
            }
            search.probe = None;
            if search.fits.is_none() {
                self.search = None;
                if self.learned.is_some() {
                    self.next = Some(now + RETRY_AFTER_SILENCE);
                } else {
                    self.silent = true;
                }
                return None;
            }
            search.too_big = p.size;
        }
        let size = match search.fits {
            None => MIN_INNER,
            Some(fits) if fits >= mtu || search.too_big - fits <= GRANULARITY => {
                self.conclude(fits, now);
                return None;
            }
            Some(_) if search.too_big > mtu => mtu,
            Some(fits) => fits + (search.too_big - fits) / 2,
        };
        let id = self.fresh_id();
        search.probe = Some(Outstanding {
            id,
            size,
            sent: now,
            tries: 1,
        });
        self.search = Some(search);
        Some((id, size))
    }

    /// An ack from the peer. Returns whether it answered the probe in flight.
    pub fn ack(&mut self, id: u32, size: u16, now: Instant, mtu: u16) -> bool {
        let Some(search) = self.search.as_mut() else {
            return false;
        };
        let Some(p) = search.probe.filter(|p| p.id == id && p.size == size) else {
            return false;
        };
        search.probe = None;
        search.fits = Some(p.size);
        self.rtt = Some(now.saturating_duration_since(p.sent));
        if p.size >= mtu {
            self.conclude(p.size, now);
        }
        true
    }

    fn timeout(&self) -> Duration {
        self.rtt.map_or(PROBE_TIMEOUT, |rtt| {
            (rtt * 4).clamp(MIN_TIMEOUT, PROBE_TIMEOUT)
        })
    }

    fn conclude(&mut self, fits: u16, now: Instant) {
        self.search = None;
        self.learned = Some(fits);
        self.limit = usize::from(fits);
        self.next = Some(now + REPROBE);
    }

    /// Sets a result as if a search had found it.
    #[cfg(test)]
    pub fn set_learned(&mut self, inner: u16) {
        self.learned = Some(inner);
        self.limit = usize::from(inner);
    }

    fn fresh_id(&mut self) -> u32 {
        self.next_id = self.next_id.wrapping_add(0x9e37_79b9);
        self.next_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 90, 0, 1));
    const B4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 90, 0, 2));

    fn a6() -> IpAddr {
        "fd00:90::1".parse().expect("v6")
    }
    fn b6() -> IpAddr {
        "fd00:90::2".parse().expect("v6")
    }

    /// Checksum written independently of [`checksum`]: 16-bit words summed with wrap-around.
    fn verify(data: &[u8], pseudo: &[u8]) -> bool {
        let mut all = pseudo.to_vec();
        all.extend_from_slice(data);
        if all.len() % 2 == 1 {
            all.push(0);
        }
        let mut sum: u32 = 0;
        for w in all.chunks_exact(2) {
            sum = sum.wrapping_add(u32::from(w[0]) << 8 | u32::from(w[1]));
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16 == 0xffff
    }

    fn pseudo6(src: &[u8], dst: &[u8], len: usize, next: u8) -> Vec<u8> {
        let mut p = src.to_vec();
        p.extend_from_slice(dst);
        p.extend_from_slice(&(len as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, next]);
        p
    }

    #[test]
    fn probes_and_acks_round_trip_in_both_families() {
        let mut buf = vec![0u8; 2000];
        for (src, dst) in [(A4, B4), (a6(), b6())] {
            let probe = Message::Probe { id: 7, size: 1300 };
            let n = build(src, dst, probe, 1300, &mut buf).expect("built");
            assert_eq!(n, 1300);
            assert_eq!(classify(&buf[..n]), Classified::Message(probe, dst));
            let ack = Message::Ack { id: 7, size: 1300 };
            let n = build(dst, src, ack, 0, &mut buf).expect("built");
            assert!(n < 64, "acks are small: {n}");
            assert_eq!(classify(&buf[..n]), Classified::Message(ack, src));
        }
        let n = build(A4, B4, Message::Probe { id: 1, size: 60 }, 60, &mut buf).expect("v4");
        assert!(verify(&buf[..20], &[]), "IPv4 header checksum");
        assert_eq!(n, 60);
    }

    #[test]
    fn garbled_truncated_and_foreign_packets_are_told_apart() {
        let mut buf = vec![0u8; 2000];
        let n = build(A4, B4, Message::Probe { id: 9, size: 200 }, 200, &mut buf).expect("v4");
        let good = buf[..n].to_vec();

        // Every truncation of a probe is bad or not ours, never a probe, never a panic.
        for len in 0..good.len() {
            let c = classify(&good[..len]);
            assert!(
                matches!(c, Classified::Bad | Classified::Other),
                "{len}: {c:?}"
            );
        }
        // A truncation that keeps the header consistent (length field fixed) is still bad.
        let mut short = good[..40].to_vec();
        short[2..4].copy_from_slice(&40u16.to_be_bytes());
        assert_eq!(classify(&short), Classified::Bad, "size field disagrees");
        let mut short = good[..30].to_vec();
        short[2..4].copy_from_slice(&30u16.to_be_bytes());
        assert_eq!(classify(&short), Classified::Bad, "payload too short");

        let mut wrong_magic = good.clone();
        wrong_magic[20] = b'X';
        assert_eq!(
            classify(&wrong_magic),
            Classified::Other,
            "another protocol-253 user"
        );
        let mut wrong_version = good.clone();
        wrong_version[24] = 2;
        assert_eq!(classify(&wrong_version), Classified::Bad);
        let mut wrong_kind = good.clone();
        wrong_kind[25] = 9;
        assert_eq!(classify(&wrong_kind), Classified::Bad);
        let mut fragment = good.clone();
        fragment[6] |= 0x20;
        assert_eq!(classify(&fragment), Classified::Bad);
        let mut other_proto = good.clone();
        other_proto[9] = 17;
        assert_eq!(classify(&other_proto), Classified::Other);
        let mut long_ack = good.clone();
        long_ack[25] = KIND_ACK;
        assert_eq!(
            classify(&long_ack),
            Classified::Bad,
            "an ack is exactly its payload"
        );

        // Random bytes with the magic in place: any outcome but a panic.
        let mut x: u32 = 12345;
        for _ in 0..2000 {
            let mut p = good.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let at = x as usize % p.len();
                p[at] = (x >> 8) as u8;
            }
            p.truncate(x as usize % (p.len() + 1));
            let _ = classify(&p);
        }
    }

    #[test]
    fn icmpv4_fragmentation_needed_is_checksummed_and_quotes_the_packet() {
        let mut packet = vec![0u8; 1400];
        ipv4_header(
            &mut packet,
            6,
            Ipv4Addr::new(10, 90, 0, 1),
            Ipv4Addr::new(10, 90, 0, 2),
        );
        packet[20..24].copy_from_slice(&[0x1f, 0x90, 0x13, 0x89]);
        let mut out = [0u8; 1500];

        let n = icmp_too_big(&packet, 1200, &mut out).expect("made");
        let msg = &out[..n];

        assert_eq!(n, 576, "RFC 1812: at most 576 bytes");
        assert_eq!(msg[9], 1, "ICMP");
        assert_eq!(
            &msg[12..16],
            &[10, 90, 0, 2],
            "from the packet's destination"
        );
        assert_eq!(&msg[16..20], &[10, 90, 0, 1], "to its sender");
        assert_eq!(u16::from_be_bytes([msg[2], msg[3]]) as usize, n);
        assert!(verify(&msg[..20], &[]), "header checksum");
        assert_eq!((msg[20], msg[21]), (3, 4), "type 3 code 4");
        assert_eq!(u16::from_be_bytes([msg[26], msg[27]]), 1200, "next-hop MTU");
        assert!(verify(&msg[20..], &[]), "ICMP checksum");
        assert_eq!(&msg[28..], &packet[..548], "quotes header and data");

        // Never an error about an error, or about a later fragment.
        let mut err = packet.clone();
        err[9] = 1;
        err[20] = 3;
        assert_eq!(icmp_too_big(&err, 1200, &mut out), Err(NoIcmp::NotAllowed));
        let mut frag = packet.clone();
        frag[7] = 10;
        assert_eq!(icmp_too_big(&frag, 1200, &mut out), Err(NoIcmp::NotAllowed));
        let mut multicast = packet.clone();
        multicast[16..20].copy_from_slice(&[224, 0, 0, 9]);
        assert_eq!(
            icmp_too_big(&multicast, 1200, &mut out),
            Err(NoIcmp::NotAllowed)
        );
        assert_eq!(
            icmp_too_big(&packet[..10], 1200, &mut out),
            Err(NoIcmp::Malformed)
        );
    }

    #[test]
    fn icmpv6_packet_too_big_is_checksummed_with_the_pseudo_header() {
        let mut packet = vec![0u8; 1400];
        let (IpAddr::V6(s), IpAddr::V6(d)) = (a6(), b6()) else {
            unreachable!()
        };
        ipv6_header(&mut packet, 6, s, d);
        let mut out = [0u8; 1500];

        let n = icmp_too_big(&packet, 1200, &mut out).expect("made");
        let msg = &out[..n];

        assert_eq!(n, 1280, "RFC 4443: no larger than the minimum MTU");
        assert_eq!(msg[6], 58);
        assert_eq!(&msg[8..24], &d.octets(), "from the packet's destination");
        assert_eq!(&msg[24..40], &s.octets(), "to its sender");
        assert_eq!(usize::from(u16::from_be_bytes([msg[4], msg[5]])), n - 40);
        assert_eq!((msg[40], msg[41]), (2, 0), "packet too big");
        assert_eq!(
            u32::from_be_bytes([msg[44], msg[45], msg[46], msg[47]]),
            1280,
            "never below the IPv6 minimum"
        );
        let pseudo = pseudo6(&d.octets(), &s.octets(), n - 40, 58);
        assert!(verify(&msg[40..], &pseudo), "ICMPv6 checksum");
        assert_eq!(&msg[48..], &packet[..1232]);

        icmp_too_big(&packet, 1400, &mut out).expect("made");
        assert_eq!(
            u32::from_be_bytes([out[44], out[45], out[46], out[47]]),
            1400
        );
        let mut err = packet.clone();
        err[6] = 58;
        err[40] = 1;
        assert_eq!(icmp_too_big(&err, 1300, &mut out), Err(NoIcmp::NotAllowed));
    }

    #[test]
    fn fragments_reassemble_into_the_checksummed_datagram() {
        let (IpAddr::V6(s), IpAddr::V6(d)) = (a6(), b6()) else {
            unreachable!()
        };
        let payload: Vec<u8> = (0..1400u32).map(|i| (i * 7) as u8).collect();
        let mut frags: Vec<Vec<u8>> = Vec::new();
        let mut scratch = Vec::new();
        fragments((s, 51820), (d, 4242), &payload, 77, &mut scratch, |f| {
            frags.push(f.to_vec())
        });

        assert_eq!(frags.len(), 2);
        let mut udp = vec![0u8; 8 + payload.len()];
        for f in &frags {
            assert!(f.len() <= FRAGMENT_MTU);
            assert_eq!(f[6], 44, "fragment header");
            assert_eq!(usize::from(u16::from_be_bytes([f[4], f[5]])), f.len() - 40);
            assert_eq!(&f[44..48], &77u32.to_be_bytes());
            let field = u16::from_be_bytes([f[42], f[43]]);
            let offset = usize::from(field & !7);
            udp[offset..offset + f.len() - 48].copy_from_slice(&f[48..]);
        }
        assert_eq!(
            u16::from_be_bytes([frags[0][42], frags[0][43]]) & 1,
            1,
            "more"
        );
        assert_eq!(
            u16::from_be_bytes([frags[1][42], frags[1][43]]) & 1,
            0,
            "last"
        );
        assert_eq!(&udp[8..], &payload[..]);
        assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), 51820);
        assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), 4242);
        let pseudo = pseudo6(&s.octets(), &d.octets(), udp.len(), 17);
        assert!(verify(&udp, &pseudo), "UDP checksum");
    }

    fn v6_endpoint() -> Option<SocketAddr> {
        Some("[2001:db8::2]:51820".parse().expect("addr"))
    }

    /// Runs the search against a path that carries inner packets up to `path`; returns the
    /// probe sizes sent and the time taken.
    fn search(p: &mut Prober, path: u16, answers: bool, start: Instant) -> (Vec<u16>, Duration) {
        let mut now = start;
        let mut sizes = Vec::new();
        for _ in 0..400 {
            if let Some((id, size)) = p.poll(now, v6_endpoint(), true, 1420) {
                sizes.push(size);
                if answers && size <= path {
                    p.ack(id, size, now, 1420);
                }
            }
            if p.state() != PathMtuState::Probing && p.search.is_none() && !sizes.is_empty() {
                break;
            }
            now += Duration::from_millis(100);
        }
        (sizes, now - start)
    }

    #[test]
    fn the_search_finds_the_path_and_stops_within_granularity() {
        for path in [1200u16, 1213, 1340, 1419, 1420] {
            let mut p = Prober::new(1);
            let (sizes, took) = search(&mut p, path, true, Instant::now());
            let learned = p.learned().expect("learned");
            assert!(
                learned <= path && path - learned <= GRANULARITY,
                "{path}: {learned}"
            );
            assert_eq!(p.limit(), usize::from(learned));
            assert_eq!(sizes[0], MIN_INNER);
            assert!(took < Duration::from_secs(20), "{path}: {took:?} {sizes:?}");
        }
    }

    #[test]
    fn a_peer_that_never_answers_does_not_probe_and_keeps_the_configured_mtu() {
        let mut p = Prober::new(1);
        let (sizes, _) = search(&mut p, 1420, false, Instant::now());
        assert_eq!(
            sizes,
            vec![MIN_INNER; 3],
            "three tries of the smallest size"
        );
        assert_eq!(p.state(), PathMtuState::PeerDoesNotProbe);
        assert_eq!(p.limit(), usize::MAX);
        assert_eq!(
            p.poll(Instant::now() + REPROBE * 2, v6_endpoint(), true, 1420),
            None
        );
        p.session_up(Instant::now());
        assert!(
            p.poll(Instant::now(), v6_endpoint(), true, 1420).is_some(),
            "new session"
        );
    }

    #[test]
    fn ipv4_endpoints_and_stale_acks_change_nothing() {
        let mut p = Prober::new(1);
        let v4 = Some("192.0.2.2:51820".parse().expect("addr"));
        let mapped = Some("[::ffff:192.0.2.2]:51820".parse().expect("addr"));
        let now = Instant::now();
        assert_eq!(p.poll(now, v4, true, 1420), None);
        assert_eq!(p.poll(now, mapped, true, 1420), None);
        assert_eq!(p.state(), PathMtuState::NotProbed);
        let (id, size) = p.poll(now, v6_endpoint(), true, 1420).expect("probe");
        assert!(!p.ack(id ^ 1, size, now, 1420), "wrong id");
        assert!(!p.ack(id, size + 1, now, 1420), "wrong size");
        assert!(p.ack(id, size, now, 1420));
        assert!(!p.ack(id, size, now, 1420), "once");
    }

    #[test]
    fn the_path_is_measured_again_later_and_after_a_roam() {
        let start = Instant::now();
        let mut p = Prober::new(1);
        search(&mut p, 1300, true, start);
        let first = p.learned().expect("learned");
        assert!(
            p.poll(start + Duration::from_secs(60), v6_endpoint(), true, 1420)
                .is_none()
        );

        // The path grew: the re-probe after 10 minutes finds it.
        search(
            &mut p,
            1420,
            true,
            start + REPROBE + Duration::from_secs(30),
        );
        assert_eq!(p.learned(), Some(1420), "was {first}");

        // A roam: the limit stands until the new search ends, which starts at once.
        let roamed = Some("[2001:db8:1::2]:51820".parse().expect("addr"));
        let t = start + REPROBE + Duration::from_secs(90);
        assert!(
            p.poll(t, roamed, true, 1420).is_some(),
            "probes at once after a roam"
        );
        assert_eq!(p.limit(), 1420);
    }
}
