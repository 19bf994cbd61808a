//! A small reader for the classic pcap files that `tcpdump -w` writes, and a classifier for the
//! frames in them: enough to check what crossed a link.

use anyhow::{Result, bail};

/// One captured frame and what it carried.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The raw link-layer bytes.
    pub data: Vec<u8>,
    /// The IP payload classification.
    pub kind: FrameKind,
}

/// What a frame carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameKind {
    /// UDP over IPv4 or IPv6, with its ports.
    Udp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
    },
    /// TCP, with its ports.
    Tcp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
    },
    /// ICMP or ICMPv6.
    Icmp,
    /// IGMP: the multicast membership reports an interface sends when it comes up.
    Igmp,
    /// ARP, or IPv6 neighbour discovery carried as ICMPv6 is reported as `Icmp`.
    Arp,
    /// Anything else (with its ethertype or IP protocol).
    Other(u16),
}

impl Frame {
    /// Whether `needle` appears anywhere in the frame's bytes.
    pub fn contains(&self, needle: &[u8]) -> bool {
        !needle.is_empty() && self.data.windows(needle.len()).any(|w| w == needle)
    }
}

/// Parses a pcap file (microsecond or nanosecond, either byte order, Ethernet link type).
pub fn parse(bytes: &[u8]) -> Result<Vec<Frame>> {
    if bytes.len() < 24 {
        bail!("pcap file too short ({} bytes)", bytes.len());
    }
    let magic = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        _ => bail!("not a pcap file (magic {magic:#x})"),
    };
    let u32_at = |b: &[u8], i: usize| {
        let a = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let linktype = u32_at(bytes, 20);
    let mut frames = Vec::new();
    let mut i = 24;
    while i + 16 <= bytes.len() {
        let incl = u32_at(bytes, i + 8) as usize;
        let start = i + 16;
        let end = start + incl;
        if end > bytes.len() {
            break; // tcpdump was stopped mid-record
        }
        let data = bytes[start..end].to_vec();
        let kind = classify(linktype, &data);
        frames.push(Frame { data, kind });
        i = end;
    }
    Ok(frames)
}

fn classify(linktype: u32, data: &[u8]) -> FrameKind {
    // 1 = Ethernet, 113 = Linux cooked (SLL), 101 = raw IP.
    let (ethertype, ip) = match linktype {
        1 if data.len() >= 14 => (u16::from_be_bytes([data[12], data[13]]), &data[14..]),
        113 if data.len() >= 16 => (u16::from_be_bytes([data[14], data[15]]), &data[16..]),
        101 if !data.is_empty() => (if data[0] >> 4 == 6 { 0x86dd } else { 0x0800 }, data),
        _ => return FrameKind::Other(0),
    };
    let (proto, l4) = match ethertype {
        0x0806 => return FrameKind::Arp,
        0x0800 if ip.len() >= 20 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            (ip[9], ip.get(ihl..).unwrap_or(&[]))
        }
        0x86dd if ip.len() >= 40 => (ip[6], &ip[40..]),
        other => return FrameKind::Other(other),
    };
    let ports = || {
        (l4.len() >= 4).then(|| {
            (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
            )
        })
    };
    match proto {
        17 => ports().map_or(FrameKind::Other(17), |(s, d)| FrameKind::Udp {
            src_port: s,
            dst_port: d,
        }),
        6 => ports().map_or(FrameKind::Other(6), |(s, d)| FrameKind::Tcp {
            src_port: s,
            dst_port: d,
        }),
        1 | 58 => FrameKind::Icmp,
        2 => FrameKind::Igmp,
        p => FrameKind::Other(u16::from(p)),
    }
}
