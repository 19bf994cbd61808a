//! The packet classifier: a checked view of an IPv4 or IPv6 packet down to what the filter
//! needs (addresses, protocol, ports, ICMP kind, the flow an ICMP error quotes). Walks IPv6
//! extension headers. Never panics; a packet it cannot read gets a reason.

/// IP protocol numbers the classifier knows.
pub(crate) const PROTO_ICMP: u8 = 1;
pub(crate) const PROTO_TCP: u8 = 6;
pub(crate) const PROTO_UDP: u8 = 17;
pub(crate) const PROTO_ICMPV6: u8 = 58;

/// The most IPv6 extension headers walked before the packet is refused.
const MAX_EXTENSION_HEADERS: usize = 16;

/// An address as a 128-bit number, IPv4 mapped into `::ffff:0:0/96`; the family is kept apart.
pub(crate) type Addr = u128;

/// The transport part of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// TCP with ports and flags.
    Tcp {
        src_port: u16,
        dst_port: u16,
        flags: u8,
    },
    /// UDP with ports.
    Udp { src_port: u16, dst_port: u16 },
    /// ICMP or ICMPv6 echo request or reply.
    Echo { request: bool, id: u16 },
    /// ICMP or ICMPv6 error quoting the start of the packet it is about; read the quoted packet
    /// with [`quoted`]. Kept out of this enum so that the common case stays small.
    Error,
    /// Any other ICMP type.
    IcmpOther,
    /// A non-first fragment: no transport header.
    Fragment,
    /// Another protocol.
    Other,
}

/// The flow an ICMP error quotes, as the quoted packet saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Quoted {
    pub(crate) src: Addr,
    pub(crate) dst: Addr,
    pub(crate) proto: u8,
    /// Source and destination ports, or the echo id and 0.
    pub(crate) src_port: u16,
    pub(crate) dst_port: u16,
    /// Whether the quoted packet is an echo request (echo only).
    pub(crate) echo_request: bool,
}

/// A classified packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Packet {
    pub(crate) v4: bool,
    pub(crate) src: Addr,
    pub(crate) dst: Addr,
    pub(crate) proto: u8,
    pub(crate) transport: Transport,
    /// Offset of the transport header in the packet.
    pub(crate) l4: u32,
    /// Fragment identification when the packet is a fragment (first or later).
    pub(crate) fragment: Option<FragmentInfo>,
}

/// What a fragment carries for matching its siblings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FragmentInfo {
    pub(crate) id: u32,
    /// More fragments follow.
    pub(crate) more: bool,
    /// Offset is zero.
    pub(crate) first: bool,
}

/// The common packet, read in a few instructions: IPv4 with a 20-byte header, not a fragment,
/// TCP, UDP or an ICMP echo request or reply. Addresses are the raw IPv4 numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Simple {
    pub(crate) src: u32,
    pub(crate) dst: u32,
    pub(crate) proto: u8,
    /// Source and destination ports; for an echo, its id and 0.
    pub(crate) src_port: u16,
    pub(crate) dst_port: u16,
    /// TCP flags; 0 for UDP; for an echo, [`ECHO_REQUEST`] or 0 (a reply).
    pub(crate) flags: u8,
}

/// [`Simple::flags`] of an ICMP echo request.
pub(crate) const ECHO_REQUEST: u8 = 1;

impl Simple {
    pub(crate) fn src(&self) -> Addr {
        mapped(self.src)
    }

    pub(crate) fn dst(&self) -> Addr {
        mapped(self.dst)
    }
}

/// Reads the common packet (see [`Simple`]) with exactly the checks that [`classify`] makes
/// of it, so that a packet taken here would be classified the same way there. `None` for
/// every other packet, well-formed or not: [`classify`] decides those.
#[inline]
pub(crate) fn simple(buf: &[u8]) -> Option<Simple> {
    let head: &[u8; 20] = buf.first_chunk()?;
    // Version 4, IHL 5; flags other than DF, or a fragment offset, make a fragment.
    if head[0] != 0x45 || u16::from_be_bytes([head[6], head[7]]) & 0x3fff != 0 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let l4 = buf.get(20..total)?;
    let proto = head[9];
    let flags = match proto {
        PROTO_TCP => {
            let data_offset = usize::from(*l4.get(12)? >> 4) * 4;
            if l4.len() < 20 || data_offset < 20 || data_offset > l4.len() {
                return None;
            }
            l4[13]
        }
        PROTO_UDP if l4.len() >= 8 => 0,
        // An echo: its id stands where a port would, as in [`classify`]'s flow key.
        PROTO_ICMP if l4.len() >= 8 && (l4[0] == 8 || l4[0] == 0) => {
            return Some(Simple {
                src: u32::from_be_bytes([head[12], head[13], head[14], head[15]]),
                dst: u32::from_be_bytes([head[16], head[17], head[18], head[19]]),
                proto,
                src_port: u16::from_be_bytes([l4[4], l4[5]]),
                dst_port: 0,
                flags: if l4[0] == 8 { ECHO_REQUEST } else { 0 },
            });
        }
        _ => return None,
    };
    Some(Simple {
        src: u32::from_be_bytes([head[12], head[13], head[14], head[15]]),
        dst: u32::from_be_bytes([head[16], head[17], head[18], head[19]]),
        proto,
        src_port: u16::from_be_bytes([l4[0], l4[1]]),
        dst_port: u16::from_be_bytes([l4[2], l4[3]]),
        flags,
    })
}

fn mapped(v4: u32) -> Addr {
    0xffff_u128 << 32 | u128::from(v4)
}

/// Reads a packet; the error is a stable, short reason.
#[inline]
pub(crate) fn classify(buf: &[u8]) -> Result<Packet, &'static str> {
    let Some(&first) = buf.first() else {
        return Err("empty");
    };
    match first >> 4 {
        4 => classify_v4(buf, false),
        6 => classify_v6(buf, false),
        _ => Err("bad-ip-version"),
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn v4_addr(b: &[u8]) -> Addr {
    mapped(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn v6_addr(b: &[u8]) -> Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    u128::from_be_bytes(a)
}

/// `quoted` is true inside an ICMP error: the quoted packet is cut short, so its length fields
/// are not checked against the buffer.
#[inline]
fn classify_v4(buf: &[u8], quoted: bool) -> Result<Packet, &'static str> {
    if buf.len() < 20 {
        return Err("truncated-ip");
    }
    let ihl = usize::from(buf[0] & 0x0f) * 4;
    if ihl < 20 || buf.len() < ihl {
        return Err("bad-ipv4-header-length");
    }
    let total = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    let end = if quoted {
        buf.len()
    } else {
        if total < ihl || total > buf.len() {
            return Err("bad-ipv4-total-length");
        }
        total
    };
    let frag_field = u16::from_be_bytes([buf[6], buf[7]]);
    let more = frag_field & 0x2000 != 0;
    let offset = frag_field & 0x1fff;
    let fragment = (more || offset != 0).then(|| FragmentInfo {
        id: u32::from(u16::from_be_bytes([buf[4], buf[5]])),
        more,
        first: offset == 0,
    });
    let proto = buf[9];
    let src = v4_addr(&buf[12..16]);
    let dst = v4_addr(&buf[16..20]);
    let payload = &buf[ihl..end];
    let transport = if offset != 0 {
        Transport::Fragment
    } else {
        transport(proto, payload, true, quoted)?
    };
    Ok(Packet {
        v4: true,
        src,
        dst,
        proto,
        transport,
        l4: ihl as u32,
        fragment,
    })
}

fn classify_v6(buf: &[u8], quoted: bool) -> Result<Packet, &'static str> {
    if buf.len() < 40 {
        return Err("truncated-ip");
    }
    let payload_len = usize::from(u16::from_be_bytes([buf[4], buf[5]]));
    let end = if quoted {
        buf.len()
    } else {
        if payload_len == 0 && buf.len() > 40 {
            return Err("ipv6-jumbogram");
        }
        if 40 + payload_len > buf.len() {
            return Err("bad-ipv6-payload-length");
        }
        40 + payload_len
    };
    let src = v6_addr(&buf[8..24]);
    let dst = v6_addr(&buf[24..40]);
    let mut next = buf[6];
    let mut at = 40;
    let mut fragment = None;
    let mut later_fragment = false;
    for _ in 0..=MAX_EXTENSION_HEADERS {
        match next {
            // Hop-by-hop, routing, destination options, mobility, HIP, shim6.
            0 | 43 | 60 | 135 | 139 | 140 => {
                if at + 8 > end {
                    return Err("truncated-ipv6-extension-header");
                }
                let len = (usize::from(buf[at + 1]) + 1) * 8;
                if at + len > end {
                    return Err("truncated-ipv6-extension-header");
                }
                next = buf[at];
                at += len;
            }
            // Fragment header: fixed 8 bytes.
            44 => {
                if at + 8 > end {
                    return Err("truncated-ipv6-extension-header");
                }
                let field = u16::from_be_bytes([buf[at + 2], buf[at + 3]]);
                let offset = field >> 3;
                let more = field & 1 != 0;
                let id = u32::from_be_bytes([buf[at + 4], buf[at + 5], buf[at + 6], buf[at + 7]]);
                if offset != 0 || more {
                    fragment = Some(FragmentInfo {
                        id,
                        more,
                        first: offset == 0,
                    });
                }
                later_fragment = offset != 0;
                next = buf[at];
                at += 8;
            }
            // Authentication header: length in 4-octet units, plus 2.
            51 => {
                if at + 8 > end {
                    return Err("truncated-ipv6-extension-header");
                }
                let len = (usize::from(buf[at + 1]) + 2) * 4;
                if at + len > end {
                    return Err("truncated-ipv6-extension-header");
                }
                next = buf[at];
                at += len;
            }
            _ => {
                let transport = if later_fragment {
                    Transport::Fragment
                } else {
                    transport(next, &buf[at..end], false, quoted)?
                };
                return Ok(Packet {
                    v4: false,
                    src,
                    dst,
                    proto: next,
                    transport,
                    l4: at as u32,
                    fragment,
                });
            }
        }
        if later_fragment {
            // What follows a later fragment's header is not a header; stop here.
            return Ok(Packet {
                v4: false,
                src,
                dst,
                proto: next,
                transport: Transport::Fragment,
                l4: at as u32,
                fragment,
            });
        }
    }
    Err("too-many-ipv6-extension-headers")
}

#[inline]
fn transport(proto: u8, p: &[u8], v4: bool, quoted: bool) -> Result<Transport, &'static str> {
    match proto {
        PROTO_TCP => {
            // A quoted header is guaranteed only its first 8 bytes: the ports.
            if quoted {
                let (Some(src_port), Some(dst_port)) = (be16(p, 0), be16(p, 2)) else {
                    return Err("truncated-tcp");
                };
                return Ok(Transport::Tcp {
                    src_port,
                    dst_port,
                    flags: 0,
                });
            }
            if p.len() < 20 {
                return Err("truncated-tcp");
            }
            let data_offset = usize::from(p[12] >> 4) * 4;
            if data_offset < 20 || data_offset > p.len() {
                return Err("bad-tcp-header-length");
            }
            Ok(Transport::Tcp {
                src_port: u16::from_be_bytes([p[0], p[1]]),
                dst_port: u16::from_be_bytes([p[2], p[3]]),
                flags: p[13],
            })
        }
        PROTO_UDP => {
            let (Some(src_port), Some(dst_port)) = (be16(p, 0), be16(p, 2)) else {
                return Err("truncated-udp");
            };
            if !quoted && p.len() < 8 {
                return Err("truncated-udp");
            }
            Ok(Transport::Udp { src_port, dst_port })
        }
        PROTO_ICMP if v4 => icmp(p, true, quoted),
        PROTO_ICMPV6 if !v4 => icmp(p, false, quoted),
        _ => Ok(Transport::Other),
    }
}

fn icmp(p: &[u8], v4: bool, quoted: bool) -> Result<Transport, &'static str> {
    if p.len() < 8 {
        return Err("truncated-icmp");
    }
    let kind = p[0];
    let (echo_request, echo_reply) = if v4 { (8, 0) } else { (128, 129) };
    if kind == echo_request || kind == echo_reply {
        let id = u16::from_be_bytes([p[4], p[5]]);
        return Ok(Transport::Echo {
            request: kind == echo_request,
            id,
        });
    }
    // Destination unreachable (incl. fragmentation needed), time exceeded, parameter problem;
    // for ICMPv6 also packet too big. Source quench is obsolete and not related to a flow.
    let is_error = if v4 {
        matches!(kind, 3 | 11 | 12)
    } else {
        matches!(kind, 1..=4)
    };
    if !is_error {
        return Ok(Transport::IcmpOther);
    }
    if quoted {
        // An error quoting an error is never generated; refuse rather than recurse.
        return Err("icmp-error-in-icmp-error");
    }
    parse_quoted(&p[8..], v4)?;
    Ok(Transport::Error)
}

/// The flow an ICMP error packet quotes; `pkt` is its classification.
pub(crate) fn quoted(buf: &[u8], pkt: &Packet) -> Result<Quoted, &'static str> {
    let at = pkt.l4 as usize + 8;
    parse_quoted(buf.get(at..).unwrap_or(&[]), pkt.v4)
}

fn parse_quoted(inner: &[u8], v4: bool) -> Result<Quoted, &'static str> {
    let quoted_packet = match inner.first().map(|b| b >> 4) {
        Some(4) if v4 => classify_v4(inner, true),
        Some(6) if !v4 => classify_v6(inner, true),
        _ => Err("bad-icmp-quoted-packet"),
    }
    .map_err(|_| "bad-icmp-quoted-packet")?;
    let (src_port, dst_port, echo_request) = match quoted_packet.transport {
        Transport::Tcp {
            src_port, dst_port, ..
        }
        | Transport::Udp { src_port, dst_port } => (src_port, dst_port, false),
        Transport::Echo { request, id } => (id, 0, request),
        _ => (0, 0, false),
    };
    Ok(Quoted {
        src: quoted_packet.src,
        dst: quoted_packet.dst,
        proto: quoted_packet.proto,
        src_port,
        dst_port,
        echo_request,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A valid IPv4 packet with a 20-byte header: TCP (20-byte header) or UDP, and a payload.
    fn base(tcp: bool, payload: usize) -> Vec<u8> {
        let l4 = if tcp { 20 } else { 8 };
        let total = 20 + l4 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = if tcp { PROTO_TCP } else { PROTO_UDP };
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5432u16.to_be_bytes());
        if tcp {
            p[32] = 5 << 4;
            p[33] = 0x02;
        } else {
            p[24..26].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
        }
        p
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// The short reader takes a packet only when the full classifier reads it the same way,
        /// and takes every IPv4 TCP, UDP or ICMP echo packet with a 20-byte header that is not
        /// a fragment.
        #[test]
        fn simple_agrees_with_classify(
            tcp in any::<bool>(),
            echo in any::<bool>(),
            payload in 0usize..40,
            edits in prop::collection::vec((0usize..80, any::<u8>()), 0..4),
            cut in 0usize..100,
        ) {
            let mut p = base(tcp && !echo, payload);
            if echo && !tcp {
                // An echo request: type 8, code 0, id 77, sequence 1.
                p[9] = PROTO_ICMP;
                p[20..28].copy_from_slice(&[8, 0, 0, 0, 0, 77, 0, 1]);
            }
            for (at, byte) in edits {
                if let Some(b) = p.get_mut(at) {
                    *b = byte;
                }
            }
            p.truncate(cut.max(1).min(p.len()));
            let full = classify(&p);
            match simple(&p) {
                Some(s) => {
                    let transport = match s.proto {
                        PROTO_TCP => Transport::Tcp {
                            src_port: s.src_port,
                            dst_port: s.dst_port,
                            flags: s.flags,
                        },
                        PROTO_ICMP => {
                            prop_assert_eq!(s.dst_port, 0);
                            Transport::Echo { request: s.flags == ECHO_REQUEST, id: s.src_port }
                        }
                        _ => Transport::Udp { src_port: s.src_port, dst_port: s.dst_port },
                    };
                    let expected = Packet {
                        v4: true,
                        src: s.src(),
                        dst: s.dst(),
                        proto: s.proto,
                        transport,
                        l4: 20,
                        fragment: None,
                    };
                    prop_assert_eq!(full, Ok(expected));
                }
                None => {
                    let common = matches!(
                        full,
                        Ok(Packet {
                            v4: true,
                            l4: 20,
                            fragment: None,
                            transport: Transport::Tcp { .. }
                                | Transport::Udp { .. }
                                | Transport::Echo { .. },
                            ..
                        })
                    );
                    prop_assert!(!common, "simple refused a common packet: {:?}", full);
                }
            }
        }
    }
}
