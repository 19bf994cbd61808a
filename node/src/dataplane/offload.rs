//! TUN offloads, as pure packet work (no system calls):
//!
//! - [`VnetHdr`]: the virtio-net header that a TUN opened with `IFF_VNET_HDR` puts before every
//!   packet, in both directions.
//! - [`split`]: a packet read from the TUN may be a GSO super-packet (a TCP or UDP payload of up
//!   to 64 KiB with one set of headers) or carry a checksum left for the device to finish. It
//!   comes out as plain IP packets of at most the MTU, each with complete checksums, exactly as
//!   the kernel would have segmented them itself.
//! - [`Coalescer`]: decrypted TCP segments that continue one another within a flow are joined
//!   into one super-packet written to the TUN in one call (GRO in userspace). Every segment
//!   has passed the anti-spoofing check and the filter on its own before it arrives here; the
//!   coalescer only changes how many writes carry them.
//!
//! The rules for joining follow what the kernel's own TCP GRO accepts, so that the kernel can
//! split the result again into the very segments that arrived: same addresses, ports, ACK
//! number, window, options, TTL and TOS; consecutive sequence numbers; no flag but ACK (PSH
//! ends a run); each segment the size of the first, the last possibly shorter; a valid TCP
//! checksum on each.

use thiserror::Error;

/// Bytes of the virtio-net header (`struct virtio_net_hdr`, without `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset` is to be finished.
const F_NEEDS_CSUM: u8 = 1;

const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;
const TCP_ECE: u8 = 0x40;
const TCP_CWR: u8 = 0x80;

/// Most segments joined into one super-packet (the kernel's GRO limit).
const MAX_SEGMENTS: usize = 64;

/// Largest IP packet a super-packet may become (the 16-bit length fields).
const MAX_PACKET: usize = 65_535;

/// The virtio-net header, host order (little-endian on every machine ztnet runs on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`, possibly with the ECN bit.
    pub gso_type: u8,
    /// Length of the headers before the payload (a hint; recomputed here).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where the checksummed part starts (the transport header).
    pub csum_start: u16,
    /// Where the checksum field is, counted from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Whether the packet behind this header is a super-packet, to be cut into segments.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }

    /// Reads the header at the start of `b`; `None` when `b` is shorter than a header.
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// The header as the kernel reads it.
    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }
}

/// Why a packet read from the TUN could not be split. The packet is dropped and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SplitError {
    /// The packet ends inside its own headers.
    #[error("packet shorter than its headers")]
    Truncated,
    /// A GSO kind this node did not ask the kernel for.
    #[error("unsupported GSO type {0}")]
    GsoType(u8),
    /// The checksum position lies outside the packet.
    #[error("checksum position outside the packet")]
    ChecksumOffset,
    /// The headers do not match the GSO kind (IP version, protocol, transport offset).
    #[error("headers do not match the GSO type")]
    Headers,
    /// A GSO packet with a segment size of 0.
    #[error("GSO segment size 0")]
    SegmentSize,
}

/// Adds `data`, as big-endian 16-bit words, to a ones'-complement running sum. `data` must
/// start at an even offset of the checksummed region; an odd last byte is padded with zero.
fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        acc += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a running sum to 16 bits (not inverted).
fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The pseudo-header sum of the transport checksum for `ip` (an IPv4 or IPv6 header at the
/// start of the slice), protocol `proto` and `len` transport bytes.
fn pseudo(ip: &[u8], proto: u8, len: usize) -> u64 {
    let addrs = if ip[0] >> 4 == 4 {
        &ip[12..20]
    } else {
        &ip[8..40]
    };
    sum(addrs, u64::from(proto) + len as u64)
}

/// Recomputes an IPv4 header checksum in place; `ip` is exactly the header.
fn ipv4_checksum(ip: &mut [u8]) {
    ip[10] = 0;
    ip[11] = 0;
    let c = !fold(sum(ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// The full transport checksum over `ip` (whole packet) with its transport header at `l4`, the
/// checksum field taken as zero. A UDP checksum of 0 is sent as 0xffff.
fn transport_checksum(packet: &mut [u8], l4: usize, proto: u8) -> u16 {
    let field = l4 + if proto == PROTO_TCP { 16 } else { 6 };
    packet[field] = 0;
    packet[field + 1] = 0;
    let c = !fold(sum(&packet[l4..], pseudo(packet, proto, packet.len() - l4)));
    let c = if c == 0 && proto == PROTO_UDP {
        0xffff
    } else {
        c
    };
    packet[field..field + 2].copy_from_slice(&c.to_be_bytes());
    c
}

/// IP header length and transport protocol of an IPv4 or IPv6 packet (IPv6 without extension
/// headers).
fn ip_header(packet: &[u8]) -> Option<(usize, u8, bool)> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            (ihl >= 20 && packet.len() >= ihl).then_some((ihl, packet[9], false))
        }
        6 if packet.len() >= 40 => Some((40, packet[6], true)),
        _ => None,
    }
}

/// Turns a packet read from the TUN (after its virtio-net header `hdr`) into plain IP packets
/// with complete checksums and hands each to `each`, in order. `scratch` is working room; it
/// grows to one segment. Returns how many packets came out.
pub fn split(
    hdr: &VnetHdr,
    packet: &mut [u8],
    scratch: &mut Vec<u8>,
    mut each: impl FnMut(&[u8]),
) -> Result<usize, SplitError> {
    let gso = hdr.gso_type & !GSO_ECN;
    if gso == GSO_NONE {
        if hdr.flags & F_NEEDS_CSUM != 0 {
            finish_checksum(packet, hdr)?;
        }
        each(packet);
        return Ok(1);
    }
    let (ihl, proto, v6) = ip_header(packet).ok_or(SplitError::Truncated)?;
    let want = match gso {
        GSO_TCPV4 if !v6 => PROTO_TCP,
        GSO_TCPV6 if v6 => PROTO_TCP,
        GSO_UDP_L4 => PROTO_UDP,
        GSO_TCPV4 | GSO_TCPV6 => return Err(SplitError::Headers),
        other => return Err(SplitError::GsoType(other)),
    };
    let l4 = usize::from(hdr.csum_start);
    if proto != want || l4 != ihl {
        return Err(SplitError::Headers);
    }
    let thl = if proto == PROTO_TCP {
        let off = packet.get(l4 + 12).ok_or(SplitError::Truncated)?;
        usize::from(off >> 4) * 4
    } else {
        8
    };
    let hl = l4 + thl;
    if thl < 8 || (proto == PROTO_TCP && thl < 20) || packet.len() < hl {
        return Err(SplitError::Truncated);
    }
    let size = usize::from(hdr.gso_size);
    if size == 0 {
        return Err(SplitError::SegmentSize);
    }
    let (head, payload) = packet.split_at(hl);
    let id = u16::from_be_bytes([head[4], head[5]]);
    let seq = u32::from_be_bytes([head[l4 + 4], head[l4 + 5], head[l4 + 6], head[l4 + 7]]);
    let count = payload.len().div_ceil(size).max(1);
    for (i, chunk) in payload
        .chunks(size)
        .chain(payload.is_empty().then_some(&[][..]))
        .enumerate()
    {
        scratch.clear();
        scratch.extend_from_slice(head);
        scratch.extend_from_slice(chunk);
        let s = &mut scratch[..];
        let len = s.len();
        if v6 {
            let plen = u16::try_from(len - 40).map_err(|_| SplitError::Headers)?;
            s[4..6].copy_from_slice(&plen.to_be_bytes());
        } else {
            let total = u16::try_from(len).map_err(|_| SplitError::Headers)?;
            s[2..4].copy_from_slice(&total.to_be_bytes());
            s[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
            ipv4_checksum(&mut s[..ihl]);
        }
        if proto == PROTO_TCP {
            let seq = seq.wrapping_add((i * size) as u32);
            s[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
            if i + 1 < count {
                s[l4 + 13] &= !(TCP_FIN | TCP_PSH);
            }
            if i > 0 {
                s[l4 + 13] &= !TCP_CWR;
            }
        } else {
            let ulen = (len - l4) as u16;
            s[l4 + 4..l4 + 6].copy_from_slice(&ulen.to_be_bytes());
        }
        transport_checksum(s, l4, proto);
        each(s);
    }
    Ok(count)
}

/// Finishes a partial checksum (CHECKSUM_PARTIAL): the field holds the pseudo-header sum, the
/// rest of the sum runs from `csum_start` to the end of the packet.
fn finish_checksum(packet: &mut [u8], hdr: &VnetHdr) -> Result<(), SplitError> {
    let start = usize::from(hdr.csum_start);
    let field = start + usize::from(hdr.csum_offset);
    if field + 2 > packet.len() {
        return Err(SplitError::ChecksumOffset);
    }
    let c = !fold(sum(&packet[start..], 0));
    let udp = hdr.csum_offset == 6
        && ip_header(packet).is_some_and(|(ihl, p, _)| p == PROTO_UDP && ihl == start);
    let c = if c == 0 && udp { 0xffff } else { c };
    packet[field..field + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// What identifies a TCP flow for joining: IP version, addresses, ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct FlowKey {
    v6: bool,
    addrs: [u8; 32],
    ports: [u8; 4],
}

/// A TCP segment that may be joined, as read from its headers.
struct Segment {
    key: FlowKey,
    ihl: usize,
    thl: usize,
    seq: u32,
    flags: u8,
    payload: usize,
}

/// Reads a packet as a joinable TCP segment: IPv4 without options or fragmentation, or IPv6
/// without extension headers; flags ACK and maybe PSH; some payload; a valid checksum.
fn segment(packet: &[u8]) -> Option<Segment> {
    let (ihl, proto, v6) = ip_header(packet)?;
    if proto != PROTO_TCP || packet.len() < ihl + 20 {
        return None;
    }
    let mut key = FlowKey {
        v6,
        ..FlowKey::default()
    };
    if v6 {
        let plen = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
        if plen + 40 != packet.len() {
            return None;
        }
        key.addrs.copy_from_slice(&packet[8..40]);
    } else {
        let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
        let frag = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff;
        if ihl != 20 || total != packet.len() || frag != 0 {
            return None;
        }
        key.addrs[..8].copy_from_slice(&packet[12..20]);
    }
    let tcp = &packet[ihl..];
    let thl = usize::from(tcp[12] >> 4) * 4;
    let flags = tcp[13];
    let bad = TCP_FIN | TCP_SYN | TCP_RST | TCP_URG | TCP_ECE | TCP_CWR;
    if thl < 20 || tcp.len() <= thl || flags & bad != 0 || flags & TCP_ACK == 0 {
        return None;
    }
    if fold(sum(tcp, pseudo(packet, PROTO_TCP, tcp.len()))) != 0xffff {
        return None;
    }
    key.ports.copy_from_slice(&tcp[..4]);
    Some(Segment {
        key,
        ihl,
        thl,
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        flags,
        payload: tcp.len() - thl,
    })
}

/// One flow's segments joined so far: the first packet's headers and all the payloads.
struct Run {
    active: bool,
    /// Order in which runs were opened; the oldest is written first.
    opened: u64,
    key: FlowKey,
    ihl: usize,
    thl: usize,
    /// Payload bytes of the first segment: every later one is this size, the last at most.
    size: usize,
    segments: usize,
    next_seq: u32,
    /// A shorter segment or PSH ended the run: nothing more may follow it.
    closed: bool,
    /// The IP packet so far.
    packet: Vec<u8>,
}

impl Run {
    /// Whether `p` (read as `s`) continues this run. Compares the header fields that the
    /// kernel's GRO requires to be equal.
    fn continues(&self, p: &[u8], s: &Segment) -> bool {
        if self.closed
            || s.seq != self.next_seq
            || s.thl != self.thl
            || s.ihl != self.ihl
            || s.payload > self.size
            || self.segments >= MAX_SEGMENTS
            || self.packet.len() + s.payload > MAX_PACKET
        {
            return false;
        }
        let first = &self.packet;
        let same_ip = if s.key.v6 {
            // Version, traffic class, flow label; hop limit.
            first[..4] == p[..4] && first[7] == p[7]
        } else {
            // TOS; DF; TTL.
            first[1] == p[1] && first[6] & 0x40 == p[6] & 0x40 && first[8] == p[8]
        };
        let (a, b) = (&first[self.ihl..], &p[s.ihl..]);
        // ACK number and window; the options.
        same_ip && a[8..12] == b[8..12] && a[14..16] == b[14..16] && a[20..self.thl] == b[20..s.thl]
    }
}

/// Joins consecutive TCP segments of a flow (see the module doc). Feed it packets with
/// [`Coalescer::push`] and call [`Coalescer::flush`] at the end of each batch; it writes through
/// the closure it is given: a virtio-net header and an IP packet.
pub struct Coalescer {
    runs: Vec<Run>,
    opened: u64,
    /// Runs that hold segments not yet written.
    waiting: usize,
}

/// Flows joined side by side; a new flow beyond these writes out the oldest run.
const RUNS: usize = 8;

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer::new()
    }
}

impl Coalescer {
    /// An empty coalescer with room for [`RUNS`] flows at a time.
    pub fn new() -> Coalescer {
        Coalescer {
            runs: (0..RUNS)
                .map(|_| Run {
                    active: false,
                    opened: 0,
                    key: FlowKey::default(),
                    ihl: 0,
                    thl: 0,
                    size: 0,
                    segments: 0,
                    next_seq: 0,
                    closed: false,
                    packet: Vec::with_capacity(MAX_PACKET),
                })
                .collect(),
            opened: 0,
            waiting: 0,
        }
    }

    /// Takes one IP packet that has passed every check. A TCP segment that may be joined waits
    /// in its flow's run; anything else first writes every waiting run (so nothing overtakes
    /// what came before it) and then goes out alone.
    pub fn push(&mut self, packet: &[u8], write: &mut impl FnMut(&[u8], &[u8])) {
        // The common packet other than TCP (an echo, a UDP datagram), with nothing waiting:
        // written at once, without the segment's checks.
        if self.waiting == 0 && !carries_tcp(packet) {
            write(&VnetHdr::default().encode(), packet);
            return;
        }
        let Some(s) = segment(packet) else {
            self.flush(write);
            write(&VnetHdr::default().encode(), packet);
            return;
        };
        if let Some(i) = self.runs.iter().position(|r| r.active && r.key == s.key) {
            if self.runs[i].continues(packet, &s) {
                let r = &mut self.runs[i];
                r.packet.extend_from_slice(&packet[s.ihl + s.thl..]);
                r.segments += 1;
                r.next_seq = r.next_seq.wrapping_add(s.payload as u32);
                if s.flags & TCP_PSH != 0 {
                    let at = r.ihl + 13;
                    r.packet[at] |= TCP_PSH;
                    r.closed = true;
                }
                if s.payload < r.size {
                    r.closed = true;
                }
                return;
            }
            self.emit(i, write);
            self.open(i, packet, &s);
            return;
        }
        let i = match self.runs.iter().position(|r| !r.active) {
            Some(i) => i,
            None => {
                let oldest = (0..self.runs.len())
                    .min_by_key(|&i| self.runs[i].opened)
                    .unwrap_or(0);
                self.emit(oldest, write);
                oldest
            }
        };
        self.open(i, packet, &s);
    }

    /// Writes every waiting run, oldest first.
    pub fn flush(&mut self, write: &mut impl FnMut(&[u8], &[u8])) {
        while let Some(i) = (0..self.runs.len())
            .filter(|&i| self.runs[i].active)
            .min_by_key(|&i| self.runs[i].opened)
        {
            self.emit(i, write);
        }
    }

    /// Writes run `i`, which holds segments.
    fn emit(&mut self, i: usize, write: &mut impl FnMut(&[u8], &[u8])) {
        self.waiting -= 1;
        emit(&mut self.runs[i], write);
    }

    /// Starts run `i`, which holds none, with `packet`.
    fn open(&mut self, i: usize, packet: &[u8], s: &Segment) {
        self.opened += 1;
        self.waiting += 1;
        let r = &mut self.runs[i];
        r.active = true;
        r.opened = self.opened;
        r.key = s.key;
        r.ihl = s.ihl;
        r.thl = s.thl;
        r.size = s.payload;
        r.segments = 1;
        r.next_seq = s.seq.wrapping_add(s.payload as u32);
        r.closed = s.flags & TCP_PSH != 0;
        r.packet.clear();
        r.packet.extend_from_slice(packet);
    }
}

/// Whether `packet` is IPv4 or IPv6 with TCP right after the fixed header (the only packets
/// [`segment`] may take).
pub fn carries_tcp(packet: &[u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => packet.get(9) == Some(&PROTO_TCP),
        Some(6) => packet.get(6) == Some(&PROTO_TCP),
        _ => false,
    }
}

/// Writes a run: alone and untouched when it holds one segment, else as one super-packet with
/// fixed lengths, a partial checksum (the pseudo-header sum) and a GSO header.
fn emit(r: &mut Run, write: &mut impl FnMut(&[u8], &[u8])) {
    r.active = false;
    if r.segments == 1 {
        write(&VnetHdr::default().encode(), &r.packet);
        return;
    }
    let p = &mut r.packet[..];
    let len = p.len();
    let v6 = p[0] >> 4 == 6;
    // Both fit: `continues` keeps the packet within MAX_PACKET.
    if v6 {
        p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    } else {
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        ipv4_checksum(&mut p[..r.ihl]);
    }
    let partial = fold(pseudo(p, PROTO_TCP, len - r.ihl));
    p[r.ihl + 16..r.ihl + 18].copy_from_slice(&partial.to_be_bytes());
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
        hdr_len: (r.ihl + r.thl) as u16,
        gso_size: r.size as u16,
        csum_start: r.ihl as u16,
        csum_offset: 16,
    };
    write(&hdr.encode(), p);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071 done the slow way, byte pair by byte pair: the independent reference.
    fn reference_sum(parts: &[&[u8]]) -> u16 {
        let mut bytes = Vec::new();
        for p in parts {
            bytes.extend_from_slice(p);
            if bytes.len() % 2 == 1 && !std::ptr::eq(*p, *parts.last().expect("parts")) {
                panic!("only the last part may be odd");
            }
        }
        let mut total: u32 = 0;
        let mut i = 0;
        while i < bytes.len() {
            let hi = u32::from(bytes[i]) << 8;
            let lo = bytes.get(i + 1).map_or(0, |&b| u32::from(b));
            total += hi | lo;
            total = (total & 0xffff) + (total >> 16);
            i += 2;
        }
        total as u16
    }

    /// Whether a packet's IP header (v4) and transport checksums verify by the reference.
    fn checksums_ok(p: &[u8]) -> bool {
        let v6 = p[0] >> 4 == 6;
        let (ihl, proto) = if v6 {
            (40, p[6])
        } else {
            (usize::from(p[0] & 15) * 4, p[9])
        };
        if !v6 && reference_sum(&[&p[..ihl]]) != 0xffff {
            return false;
        }
        let l4 = &p[ihl..];
        let len = l4.len() as u32;
        let pseudo: Vec<u8> = if v6 {
            let mut v = p[8..40].to_vec();
            v.extend_from_slice(&len.to_be_bytes());
            v.extend_from_slice(&[0, 0, 0, proto]);
            v
        } else {
            let mut v = p[12..20].to_vec();
            v.extend_from_slice(&[0, proto]);
            v.extend_from_slice(&(len as u16).to_be_bytes());
            v
        };
        reference_sum(&[&pseudo, l4]) == 0xffff
    }

    fn payload(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// A TCP/IPv4 or IPv6 packet with correct checksums.
    fn tcp(v6: bool, seq: u32, flags: u8, id: u16, data: &[u8]) -> Vec<u8> {
        let mut t = vec![0u8; 32];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&5001u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&777u32.to_be_bytes());
        t[12] = 8 << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&512u16.to_be_bytes());
        // Timestamp option: NOP NOP TS.
        t[20..24].copy_from_slice(&[1, 1, 8, 10]);
        t[24..28].copy_from_slice(&1234u32.to_be_bytes());
        t.extend_from_slice(data);
        let mut p = ip(v6, PROTO_TCP, id, t.len());
        let l4 = p.len();
        p.extend_from_slice(&t);
        transport_checksum(&mut p, l4, PROTO_TCP);
        p
    }

    fn udp(v6: bool, id: u16, data: &[u8]) -> Vec<u8> {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&5353u16.to_be_bytes());
        u[2..4].copy_from_slice(&9u16.to_be_bytes());
        u[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
        u.extend_from_slice(data);
        let mut p = ip(v6, PROTO_UDP, id, u.len());
        let l4 = p.len();
        p.extend_from_slice(&u);
        transport_checksum(&mut p, l4, PROTO_UDP);
        p
    }

    fn ip(v6: bool, proto: u8, id: u16, l4_len: usize) -> Vec<u8> {
        if v6 {
            let mut h = vec![0x60, 0, 0, 0, 0, 0, proto, 64];
            h[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            h.extend_from_slice(&[0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            h.extend_from_slice(&[0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
            h
        } else {
            let mut h = vec![
                0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0, 10, 99, 0, 1, 10, 99, 0, 2,
            ];
            h[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
            h[4..6].copy_from_slice(&id.to_be_bytes());
            ipv4_checksum(&mut h);
            h
        }
    }

    /// What the kernel hands over for a TSO/USO send: one header, the whole payload, the
    /// transport checksum holding only the pseudo-header sum.
    fn super_packet(whole: &[u8]) -> Vec<u8> {
        let mut p = whole.to_vec();
        let (ihl, proto, _) = ip_header(&p).expect("ip");
        let field = ihl + if proto == PROTO_TCP { 16 } else { 6 };
        let partial = fold(pseudo(&p, proto, p.len() - ihl));
        p[field..field + 2].copy_from_slice(&partial.to_be_bytes());
        p
    }

    fn split_all(hdr: &VnetHdr, packet: &[u8]) -> Result<Vec<Vec<u8>>, SplitError> {
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        let mut p = packet.to_vec();
        split(hdr, &mut p, &mut scratch, |s| out.push(s.to_vec()))?;
        Ok(out)
    }

    #[test]
    fn checksum_matches_the_rfc_1071_example_and_the_reference() {
        // The IPv4 header example used across the literature: its checksum is 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0, 0, 0xc0, 0xa8, 0x00,
            0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        ipv4_checksum(&mut h);
        assert_eq!(u16::from_be_bytes([h[10], h[11]]), 0xb861);
        for n in [0, 1, 2, 3, 5, 7, 8, 1379, 1380, 65_000] {
            let data = payload(n, n as u8);
            assert_eq!(fold(sum(&data, 0)), reference_sum(&[&data]), "length {n}");
        }
    }

    #[test]
    fn tcp_super_packets_split_like_the_kernel_would() {
        for v6 in [false, true] {
            let data = payload(3 * 1000 + 421, 7);
            let whole = tcp(v6, 0xffff_fe00, TCP_ACK | TCP_PSH | TCP_FIN, 0xfffe, &data);
            let ihl = if v6 { 40 } else { 20 };
            let hdr = VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                hdr_len: (ihl + 32) as u16,
                gso_size: 1000,
                csum_start: ihl as u16,
                csum_offset: 16,
            };

            let segs = split_all(&hdr, &super_packet(&whole)).expect("splits");

            assert_eq!(segs.len(), 4);
            let mut joined = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                let want = if i < 3 { 1000 } else { 421 };
                assert_eq!(s.len(), ihl + 32 + want, "v6 {v6} segment {i}");
                assert!(checksums_ok(s), "v6 {v6} segment {i} checksums");
                let t = &s[ihl..];
                let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
                assert_eq!(seq, 0xffff_fe00u32.wrapping_add(1000 * i as u32));
                let last = i == 3;
                assert_eq!(
                    t[13],
                    if last {
                        TCP_ACK | TCP_PSH | TCP_FIN
                    } else {
                        TCP_ACK
                    }
                );
                if !v6 {
                    assert_eq!(
                        u16::from_be_bytes([s[4], s[5]]),
                        0xfffeu16.wrapping_add(i as u16)
                    );
                }
                // Everything but lengths, ID, sequence, flags and checksums is the original's.
                assert_eq!(t[20..32], whole[ihl + 20..ihl + 32]);
                joined.extend_from_slice(&t[32..]);
            }
            assert_eq!(joined, data);
        }
    }

    #[test]
    fn udp_super_packets_split_with_their_own_lengths_and_checksums() {
        let data = payload(2 * 1200 + 5, 3);
        for v6 in [false, true] {
            let ihl = if v6 { 40 } else { 20 };
            let hdr = VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: GSO_UDP_L4,
                hdr_len: (ihl + 8) as u16,
                gso_size: 1200,
                csum_start: ihl as u16,
                csum_offset: 6,
            };
            let segs = split_all(&hdr, &super_packet(&udp(v6, 9, &data))).expect("splits");
            let lens: Vec<usize> = segs.iter().map(|s| s.len() - ihl - 8).collect();
            assert_eq!(lens, [1200, 1200, 5]);
            for s in &segs {
                assert!(checksums_ok(s));
                let ulen = u16::from_be_bytes([s[ihl + 4], s[ihl + 5]]);
                assert_eq!(usize::from(ulen), s.len() - ihl);
            }
            let joined: Vec<u8> = segs.iter().flat_map(|s| s[ihl + 8..].to_vec()).collect();
            assert_eq!(joined, data);
        }
    }

    #[test]
    fn a_partial_checksum_is_finished() {
        for p in [
            tcp(false, 1, TCP_ACK, 1, &payload(333, 1)),
            udp(true, 0, &payload(77, 2)),
        ] {
            let (ihl, proto, _) = ip_header(&p).expect("ip");
            let hdr = VnetHdr {
                flags: F_NEEDS_CSUM,
                csum_start: ihl as u16,
                csum_offset: if proto == PROTO_TCP { 16 } else { 6 },
                ..VnetHdr::default()
            };
            let out = split_all(&hdr, &super_packet(&p)).expect("finishes");
            assert_eq!(out, vec![p.clone()]);
        }
        let bad = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 60,
            csum_offset: 16,
            ..VnetHdr::default()
        };
        assert_eq!(
            split_all(&bad, &udp(false, 0, b"x")),
            Err(SplitError::ChecksumOffset)
        );
    }

    /// Feeds packets through a coalescer; returns what it wrote (header, packet).
    fn coalesce(packets: &[Vec<u8>]) -> Vec<(VnetHdr, Vec<u8>)> {
        let mut c = Coalescer::new();
        let mut out = Vec::new();
        let mut write =
            |h: &[u8], p: &[u8]| out.push((VnetHdr::parse(h).expect("hdr"), p.to_vec()));
        for p in packets {
            c.push(p, &mut write);
        }
        c.flush(&mut write);
        out
    }

    fn flow(v6: bool, seq: u32, sizes: &[usize], last_flags: u8) -> Vec<Vec<u8>> {
        let mut seq = seq;
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let flags = if i + 1 == sizes.len() {
                    last_flags
                } else {
                    TCP_ACK
                };
                let p = tcp(v6, seq, flags, 100 + i as u16, &payload(n, i as u8));
                seq = seq.wrapping_add(n as u32);
                p
            })
            .collect()
    }

    #[test]
    fn consecutive_segments_join_and_split_back_into_the_same_packets() {
        for v6 in [false, true] {
            let segs = flow(v6, 0xffff_f000, &[1368, 1368, 1368, 900], TCP_ACK | TCP_PSH);

            let out = coalesce(&segs);

            assert_eq!(out.len(), 1, "v6 {v6}: one write");
            let (hdr, joined) = &out[0];
            let ihl = if v6 { 40 } else { 20 };
            assert_eq!(hdr.gso_type, if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
            assert_eq!(
                (hdr.gso_size, hdr.csum_start, hdr.csum_offset),
                (1368, ihl as u16, 16)
            );
            assert_eq!(joined.len(), ihl + 32 + 3 * 1368 + 900);
            // What the kernel will do with it: finish the checksum, or segment it again.
            let mut whole = joined.clone();
            let field = ihl + 16;
            let c = !reference_sum(&[&whole[ihl..]]);
            whole[field..field + 2].copy_from_slice(&c.to_be_bytes());
            assert!(
                checksums_ok(&whole),
                "v6 {v6}: the finished checksum verifies"
            );
            let again = split_all(hdr, joined).expect("splits");
            assert_eq!(
                again, segs,
                "v6 {v6}: segmenting gives back the very packets"
            );
        }
    }

    #[test]
    fn runs_end_where_the_kernel_would_not_join() {
        let base = flow(false, 1000, &[1000, 1000], TCP_ACK);
        let count = |packets: &[Vec<u8>]| coalesce(packets).len();

        // A gap in the sequence.
        let gap = vec![
            base[0].clone(),
            tcp(false, 3000, TCP_ACK, 0, &payload(1000, 1)),
        ];
        assert_eq!(count(&gap), 2, "gap");
        // A different ACK number.
        let mut ack = base.clone();
        ack[1][20 + 11] ^= 1;
        let l4 = 20;
        transport_checksum(&mut ack[1], l4, PROTO_TCP);
        assert_eq!(count(&ack), 2, "ack");
        // A larger segment after a smaller one, and anything after a short one.
        assert_eq!(count(&flow(false, 0, &[500, 1000], TCP_ACK)), 2, "grows");
        assert_eq!(
            count(&flow(false, 0, &[1000, 500, 500], TCP_ACK)),
            2,
            "after short"
        );
        // PSH ends the run; the next segment starts another.
        let mut pushed = flow(false, 0, &[1000, 1000, 1000], TCP_ACK);
        pushed[1][20 + 13] |= TCP_PSH;
        transport_checksum(&mut pushed[1], l4, PROTO_TCP);
        assert_eq!(count(&pushed), 2, "psh");
        // A corrupted segment is written alone, for the kernel to drop.
        let mut corrupt = flow(false, 0, &[1000, 1000, 1000], TCP_ACK);
        corrupt[1][100] ^= 0xff;
        let out = coalesce(&corrupt);
        assert_eq!(out.len(), 3, "corrupt");
        assert!(out.iter().all(|(h, _)| h.gso_type == GSO_NONE));
        // SYN, FIN, RST never join.
        for f in [TCP_SYN | TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST | TCP_ACK] {
            let mut p = flow(false, 0, &[1000, 1000], TCP_ACK);
            p[1][20 + 13] = f;
            transport_checksum(&mut p[1], l4, PROTO_TCP);
            assert_eq!(count(&p), 2, "flags {f:#x}");
        }
    }

    #[test]
    fn other_packets_keep_their_place_and_flows_join_side_by_side() {
        let a = flow(false, 0, &[1000, 1000, 1000], TCP_ACK);
        let mut b = flow(false, 50_000, &[1000, 1000], TCP_ACK);
        for p in &mut b {
            p[20..22].copy_from_slice(&40001u16.to_be_bytes());
            transport_checksum(p, 20, PROTO_TCP);
        }
        let ping = udp(false, 1, b"between");
        let input = vec![
            a[0].clone(),
            b[0].clone(),
            a[1].clone(),
            b[1].clone(),
            ping.clone(),
            a[2].clone(),
        ];

        let out = coalesce(&input);

        let kinds: Vec<(u8, usize)> = out.iter().map(|(h, p)| (h.gso_type, p.len())).collect();
        assert_eq!(
            kinds,
            [
                (GSO_TCPV4, 52 + 2000),
                (GSO_TCPV4, 52 + 2000),
                (GSO_NONE, ping.len()),
                (GSO_NONE, a[2].len())
            ],
        );
        assert_eq!(out[2].1, ping);
    }

    #[test]
    fn a_packet_other_than_tcp_never_overtakes_a_waiting_run() {
        // More flows than runs (the oldest run is written to make room), then a UDP datagram
        // after each round: every segment read before it is written before it, whichever way
        // the runs came and went.
        let flows: Vec<Vec<Vec<u8>>> = (0..RUNS as u16 + 3)
            .map(|i| {
                let mut f = flow(false, 0, &[1000, 1000], TCP_ACK);
                for p in &mut f {
                    p[20..22].copy_from_slice(&(40000 + i).to_be_bytes());
                    transport_checksum(p, 20, PROTO_TCP);
                }
                f
            })
            .collect();
        let mut input = Vec::new();
        for round in 0..2 {
            for f in &flows {
                input.push(f[round].clone());
            }
            input.push(udp(false, round as u16, b"after the round"));
        }
        let out = coalesce(&input);
        // TCP segments of 1,000 bytes written, joined or alone.
        let segments = |o: &[(VnetHdr, Vec<u8>)]| -> usize {
            o.iter()
                .filter(|(_, p)| p[9] == PROTO_TCP)
                .map(|(_, p)| (p.len() - 40) / 1000)
                .sum()
        };
        let marks: Vec<usize> = out
            .iter()
            .enumerate()
            .filter(|(_, (_, p))| p.get(9) == Some(&PROTO_UDP))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(marks.len(), 2, "both datagrams written");
        assert_eq!(
            segments(&out[..marks[0]]),
            flows.len(),
            "the first round before the first"
        );
        assert_eq!(
            segments(&out[..marks[1]]),
            2 * flows.len(),
            "all before the second"
        );
        assert_eq!(segments(&out), 2 * flows.len());
    }

    #[test]
    fn runs_stop_at_64_segments_and_64_kib() {
        let many = flow(false, 0, &[100; 70], TCP_ACK);
        let out = coalesce(&many);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].1.len(), 52 + 64 * 100);
        let big = flow(true, 0, &[1400; 48], TCP_ACK);
        let out = coalesce(&big);
        assert!(out.iter().all(|(_, p)| p.len() <= 40 + MAX_PACKET));
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn malformed_input_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut scratch = Vec::new();
        let mut c = Coalescer::new();
        let seeds = [
            tcp(false, 0, TCP_ACK, 0, &payload(3000, 0)),
            tcp(true, 0, TCP_ACK, 0, &payload(3000, 0)),
            udp(false, 0, &payload(3000, 0)),
        ];
        for round in 0..20_000 {
            let mut p = seeds[round % seeds.len()].clone();
            let cut = rng.gen_range(0..=p.len());
            p.truncate(cut);
            for _ in 0..rng.gen_range(0..4) {
                if !p.is_empty() {
                    let i = rng.gen_range(0..p.len());
                    p[i] = rng.r#gen();
                }
            }
            let mut h = [0u8; VNET_HDR_LEN];
            rng.fill(&mut h[..]);
            h[1] = [0, 1, 3, 4, 5, 0x81][rng.gen_range(0..6)];
            let hdr = VnetHdr::parse(&h).expect("ten bytes");
            let _ = split(&hdr, &mut p, &mut scratch, |_| {});
            c.push(&p, &mut |_, _| {});
        }
        c.flush(&mut |_, _| {});
    }
}

/// Splitting and joining around two real peer tables (route, filter, boringtun): every
/// segment still meets the filter on its own.
#[cfg(test)]
mod filter_tests {
    use std::net::{IpAddr, SocketAddr};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use ipnet::IpNet;
    use netpolicy::{ConntrackConfig, Filter, Inventory, NodeIdentity, Policy};
    use ztnet_proto::PrivateKey;

    use super::*;
    use crate::dataplane::counters::{Counters, DropReason, FilterDrop};
    use crate::dataplane::peers::{MIN_BUFFER, PeerTable, Transmit};
    use crate::netconfig::PeerConfig;

    /// n1 may open tcp:22 on n2; nothing else.
    const STRICT: &str =
        "[[grant]]\nfrom = [\"node:n1\"]\nto = [\"node:n2\"]\nports = [\"tcp:22\"]\n";
    const ALLOW_ALL: &str = "[[grant]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"any\"]\n";

    fn ip(i: u8) -> IpAddr {
        IpAddr::from([10, 90, 0, i])
    }

    fn underlay(i: u8) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, i], 51820))
    }

    fn filter(policy: &str, me: &str) -> Arc<Mutex<Filter>> {
        let inventory = Inventory {
            nodes: (1..=2u8)
                .map(|i| NodeIdentity {
                    name: format!("n{i}"),
                    namespace: "default".into(),
                    tags: vec![],
                    spiffe_id: format!("spiffe://test/ns/default/node/n{i}"),
                    addresses: vec![IpNet::from(ip(i))],
                    routes: vec![],
                })
                .collect(),
        };
        let checked = Policy::parse(policy).expect("test policy parses");
        let spec = netpolicy::compile(&checked.policy, &inventory).filters[me].clone();
        Arc::new(Mutex::new(Filter::new(spec, ConntrackConfig::default())))
    }

    #[derive(Default)]
    struct Wire {
        sent: Vec<Vec<u8>>,
        tun: Vec<(VnetHdr, Vec<u8>)>,
        coalescer: Option<Coalescer>,
    }

    impl Transmit for Wire {
        fn send_udp(&mut self, _to: SocketAddr, datagram: &[u8]) {
            self.sent.push(datagram.to_vec());
        }
        fn write_tun(&mut self, packet: &[u8]) {
            let tun = &mut self.tun;
            let mut write = |h: &[u8], p: &[u8]| {
                tun.push((VnetHdr::parse(h).expect("header"), p.to_vec()));
            };
            match &mut self.coalescer {
                Some(c) => c.push(packet, &mut write),
                None => write(&VnetHdr::default().encode(), packet),
            }
        }
    }

    struct Two {
        tables: [PeerTable; 2],
        buf: Vec<u8>,
        now: Instant,
    }

    impl Two {
        fn new(policies: [&str; 2]) -> Two {
            let keys = [PrivateKey::generate(), PrivateKey::generate()];
            let table = |i: usize| {
                let other = 1 - i;
                let peer = PeerConfig {
                    name: format!("n{}", other + 1),
                    public_key: keys[other].public_key(),
                    endpoint: Some(underlay(other as u8 + 1)),
                    endpoints: vec![],
                    allowed_ips: vec![IpNet::from(ip(other as u8 + 1))],
                    persistent_keepalive: None,
                    identity: None,
                    preshared_key: None,
                    next_public_key: None,
                };
                let me = format!("n{}", i + 1);
                PeerTable::new(
                    &keys[i],
                    &[peer],
                    None,
                    filter(policies[i], &me),
                    Arc::new(Counters::default()),
                    (i as u32 + 1) * 1000,
                )
            };
            Two {
                tables: [table(0), table(1)],
                buf: vec![0; MIN_BUFFER],
                now: Instant::now(),
            }
        }

        /// Carries datagrams back and forth until both sides are quiet.
        fn pump(&mut self, from: usize, mut datagrams: Vec<Vec<u8>>, n2: &mut Wire) {
            let mut side = from;
            let mut rounds = 0;
            while !datagrams.is_empty() {
                rounds += 1;
                assert!(rounds < 20, "the two tables never went quiet");
                let to = 1 - side;
                let mut wire = Wire::default();
                let out = if to == 1 { &mut *n2 } else { &mut wire };
                let before = out.sent.len();
                for d in &datagrams {
                    let src = underlay(side as u8 + 1);
                    self.tables[to].handle_datagram(src, d, self.now, &mut self.buf, out);
                }
                datagrams = out.sent.split_off(before);
                side = to;
            }
        }

        /// n1's TUN gives `packets`; what n2 writes to its TUN lands in `n2`.
        fn send(&mut self, packets: &[Vec<u8>], n2: &mut Wire) {
            let mut wire = Wire::default();
            for p in packets {
                self.tables[0].handle_tun_packet(p, self.now, &mut self.buf, &mut wire);
            }
            self.pump(0, wire.sent, n2);
        }

        fn drops(&self, i: usize, reason: DropReason) -> u64 {
            self.tables[i].counters().count(reason)
        }
    }

    /// A TCP segment n1 -> n2 of `n` bytes; the IPv4 ID follows the sequence number, as the
    /// kernel numbers the segments it cuts.
    fn segment_to(port: u16, seq: u32, n: usize) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&port.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&1u32.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = TCP_ACK;
        t[14..16].copy_from_slice(&1000u16.to_be_bytes());
        t.extend((0..n).map(|i| (i as u8) ^ (seq as u8)));
        let id = (seq / 1000) as u8;
        let mut p = vec![0x45, 0, 0, 0, 0, id, 0x40, 0, 64, PROTO_TCP, 0, 0];
        p.extend_from_slice(&[10, 90, 0, 1, 10, 90, 0, 2]);
        let total = (20 + t.len()) as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        ipv4_checksum(&mut p);
        p.extend_from_slice(&t);
        transport_checksum(&mut p, 20, PROTO_TCP);
        p
    }

    #[test]
    fn a_denied_port_inside_a_joined_burst_is_still_dropped_by_the_receiver() {
        // n1 is compromised and lets everything out; n2's inbound filter is the one that holds.
        let mut two = Two::new([ALLOW_ALL, STRICT]);
        let mut n2 = Wire {
            coalescer: Some(Coalescer::new()),
            ..Wire::default()
        };
        two.send(&[segment_to(22, 0, 10)], &mut n2);
        let c = n2.coalescer.as_mut().expect("set above");
        c.flush(&mut |_: &[u8], _: &[u8]| {});
        n2.tun.clear();
        let allowed: Vec<Vec<u8>> = (0..4)
            .map(|i| segment_to(22, 10 + i * 1000, 1000))
            .collect();
        let burst = vec![
            allowed[0].clone(),
            allowed[1].clone(),
            segment_to(23, 10 + 1000, 1000),
            allowed[2].clone(),
            segment_to(23, 10 + 2000, 1000),
            allowed[3].clone(),
        ];

        two.send(&burst, &mut n2);
        n2.coalescer
            .as_mut()
            .expect("set above")
            .flush(&mut |h: &[u8], p: &[u8]| {
                n2.tun
                    .push((VnetHdr::parse(h).expect("header"), p.to_vec()));
            });

        assert_eq!(two.drops(1, DropReason::Inbound(FilterDrop::NoRule)), 2);
        assert_eq!(n2.tun.len(), 1, "the four allowed segments in one write");
        let (hdr, joined) = &n2.tun[0];
        assert_eq!(hdr.gso_type, GSO_TCPV4);
        let mut scratch = Vec::new();
        let mut again = Vec::new();
        let mut copy = joined.clone();
        split(hdr, &mut copy, &mut scratch, |s| again.push(s.to_vec())).expect("splits");
        assert!(
            again == allowed,
            "exactly the allowed segments, none of port 23"
        );
    }

    #[test]
    fn every_segment_of_a_super_packet_meets_the_senders_filter() {
        let mut two = Two::new([STRICT, ALLOW_ALL]);
        let mut n2 = Wire::default();
        two.send(&[segment_to(22, 0, 10)], &mut n2);
        n2.tun.clear();
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 40,
            gso_size: 1000,
            csum_start: 20,
            csum_offset: 16,
        };
        let segments = |port: u16| {
            let mut whole = segment_to(port, 10, 3000);
            let partial = fold(pseudo(&whole, PROTO_TCP, whole.len() - 20));
            whole[36..38].copy_from_slice(&partial.to_be_bytes());
            let mut out = Vec::new();
            let mut scratch = Vec::new();
            split(&hdr, &mut whole, &mut scratch, |s| out.push(s.to_vec())).expect("splits");
            out
        };

        let denied = segments(23);
        let granted = segments(22);
        two.send(&denied, &mut n2);
        let after_denied = n2.tun.len();
        two.send(&granted, &mut n2);

        assert_eq!(denied.len(), 3);
        assert_eq!(
            after_denied, 0,
            "nothing of the denied super-packet left n1"
        );
        assert_eq!(
            two.drops(0, DropReason::Outbound(FilterDrop::NoRule)),
            3,
            "each segment"
        );
        let got: Vec<Vec<u8>> = n2.tun.iter().map(|(_, p)| p.clone()).collect();
        assert!(
            got == granted,
            "the granted super-packet arrives as its segments"
        );
    }
}
