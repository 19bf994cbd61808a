//! Drop counters by reason: one atomic per reason, no allocation on the hot path.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use netpolicy::DenyReason;

/// Why the data plane dropped a packet or datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A packet from the TUN whose destination no peer's allowed IPs hold.
    NoPeer,
    /// A packet for a peer whose endpoint is not known yet.
    NoEndpoint,
    /// A packet from the TUN that is not IPv4 or IPv6.
    MalformedPacket,
    /// A decrypted packet whose inner source is not in the sending peer's allowed IPs.
    SpoofedSource,
    /// A datagram that is not a WireGuard message.
    MalformedDatagram,
    /// A WireGuard message for a receiver index that no peer holds.
    UnknownIndex,
    /// A handshake initiation from a static key that is not a peer.
    UnknownKey,
    /// A handshake message whose MAC does not verify.
    InvalidMac,
    /// A handshake that failed to decrypt or was stale.
    HandshakeFailed,
    /// A data message that failed authentication.
    DecryptFailed,
    /// A data message with a counter already seen.
    Replayed,
    /// A data message for a session that does not exist (any more).
    NoSession,
    /// Any other error from the WireGuard engine.
    Engine,
    /// A packet from the TUN larger than the peer's learned path MTU that may not be
    /// fragmented: dropped, with an ICMP "too big" to its sender (rate-limited).
    TooBig,
    /// A decrypted path MTU probe or ack that does not parse, or that is not for this node.
    BadProbe,
    /// A datagram the UDP socket refused to send (an error other than those the node works
    /// around, such as a source address gone from the host).
    SendFailed,
    /// A packet for this host that the TUN refused to take.
    TunWriteFailed,
    /// A read from a TUN queue that failed (not "empty"): whatever packet it held is lost.
    TunReadFailed,
    /// Refused by the inbound filter.
    Inbound(FilterDrop),
    /// Refused by the outbound filter.
    Outbound(FilterDrop),
}

/// The netpolicy deny reasons, without their payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterDrop {
    /// Default deny.
    NoRule,
    /// A deny entry matched.
    DeniedByRule,
    /// The peer is not in the filter.
    UnknownPeer,
    /// The filter could not parse the packet.
    Malformed,
    /// The flow table is full.
    TableFull,
}

impl From<&DenyReason> for FilterDrop {
    fn from(r: &DenyReason) -> Self {
        match r {
            DenyReason::NoRule => FilterDrop::NoRule,
            DenyReason::Rule(_) => FilterDrop::DeniedByRule,
            DenyReason::UnknownPeer => FilterDrop::UnknownPeer,
            DenyReason::Malformed(_) => FilterDrop::Malformed,
            DenyReason::TableFull => FilterDrop::TableFull,
        }
    }
}

const FILTER_DROPS: [FilterDrop; 5] = [
    FilterDrop::NoRule,
    FilterDrop::DeniedByRule,
    FilterDrop::UnknownPeer,
    FilterDrop::Malformed,
    FilterDrop::TableFull,
];

const PLAIN: [DropReason; 18] = [
    DropReason::NoPeer,
    DropReason::NoEndpoint,
    DropReason::MalformedPacket,
    DropReason::SpoofedSource,
    DropReason::MalformedDatagram,
    DropReason::UnknownIndex,
    DropReason::UnknownKey,
    DropReason::InvalidMac,
    DropReason::HandshakeFailed,
    DropReason::DecryptFailed,
    DropReason::Replayed,
    DropReason::NoSession,
    DropReason::Engine,
    DropReason::TooBig,
    DropReason::BadProbe,
    DropReason::SendFailed,
    DropReason::TunWriteFailed,
    DropReason::TunReadFailed,
];

const SLOTS: usize = PLAIN.len() + 2 * FILTER_DROPS.len();

impl DropReason {
    /// A short, stable counter name (`no-peer`, `spoofed-source`, `inbound-no-rule`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NoPeer => "no-peer",
            DropReason::NoEndpoint => "no-endpoint",
            DropReason::MalformedPacket => "malformed-packet",
            DropReason::SpoofedSource => "spoofed-source",
            DropReason::MalformedDatagram => "malformed-datagram",
            DropReason::UnknownIndex => "unknown-index",
            DropReason::UnknownKey => "unknown-key",
            DropReason::InvalidMac => "invalid-mac",
            DropReason::HandshakeFailed => "handshake-failed",
            DropReason::DecryptFailed => "decrypt-failed",
            DropReason::Replayed => "replayed",
            DropReason::NoSession => "no-session",
            DropReason::Engine => "engine-error",
            DropReason::TooBig => "too-big",
            DropReason::BadProbe => "bad-probe",
            DropReason::SendFailed => "send-failed",
            DropReason::TunWriteFailed => "tun-write-failed",
            DropReason::TunReadFailed => "tun-read-failed",
            DropReason::Inbound(f) => match f {
                FilterDrop::NoRule => "inbound-no-rule",
                FilterDrop::DeniedByRule => "inbound-denied-by-rule",
                FilterDrop::UnknownPeer => "inbound-unknown-peer",
                FilterDrop::Malformed => "inbound-malformed",
                FilterDrop::TableFull => "inbound-table-full",
            },
            DropReason::Outbound(f) => match f {
                FilterDrop::NoRule => "outbound-no-rule",
                FilterDrop::DeniedByRule => "outbound-denied-by-rule",
                FilterDrop::UnknownPeer => "outbound-unknown-peer",
                FilterDrop::Malformed => "outbound-malformed",
                FilterDrop::TableFull => "outbound-table-full",
            },
        }
    }

    fn slot(self) -> usize {
        let filter = |f: FilterDrop| {
            FILTER_DROPS
                .iter()
                .position(|&x| x == f)
                .unwrap_or_default()
        };
        match self {
            DropReason::Inbound(f) => PLAIN.len() + filter(f),
            DropReason::Outbound(f) => PLAIN.len() + FILTER_DROPS.len() + filter(f),
            plain => PLAIN.iter().position(|&x| x == plain).unwrap_or_default(),
        }
    }

    fn all() -> impl Iterator<Item = DropReason> {
        PLAIN
            .iter()
            .copied()
            .chain(FILTER_DROPS.iter().map(|&f| DropReason::Inbound(f)))
            .chain(FILTER_DROPS.iter().map(|&f| DropReason::Outbound(f)))
    }
}

/// Drop counters, shared by the packet threads and read by status.
#[derive(Debug, Default)]
pub struct Counters {
    drops: [AtomicU64; SLOTS],
}

impl Counters {
    /// Counts one drop.
    pub fn drop_packet(&self, reason: DropReason) {
        self.drops[reason.slot()].fetch_add(1, Ordering::Relaxed);
    }

    /// The count for one reason.
    pub fn count(&self, reason: DropReason) -> u64 {
        self.drops[reason.slot()].load(Ordering::Relaxed)
    }

    /// Every non-zero counter by name.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        DropReason::all()
            .filter_map(|r| {
                let n = self.count(r);
                (n > 0).then(|| (r.as_str().to_string(), n))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_slot_and_name() {
        let c = Counters::default();
        for (i, r) in DropReason::all().enumerate() {
            for _ in 0..=i {
                c.drop_packet(r);
            }
        }
        let snap = c.snapshot();
        assert_eq!(snap.len(), SLOTS);
        for (i, r) in DropReason::all().enumerate() {
            assert_eq!(snap[r.as_str()], i as u64 + 1, "{}", r.as_str());
        }
    }
}
