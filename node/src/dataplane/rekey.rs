//! Rekeying of idle sessions that persistent keepalives hold open (FC-26).
//!
//! boringtun 0.7 counts only data packets in its rekey rules, never keepalives. Two peers that
//! exchange nothing but persistent keepalives therefore never rekey: the session lapses at
//! REJECT_AFTER_TIME (180 s), traffic in the next few seconds waits for a handshake, and the
//! next keepalive on *each* side (up to `persistent_keepalive` later) starts a handshake from
//! scratch. When the two sides' timers run in phase both do so at once and the handshakes
//! cross: two handshakes where one would do, both sides then believing they initiated.
//!
//! The peer table adds three rules on top of boringtun's timers, for peers with a persistent
//! keepalive (a peer without one lets an idle session lapse, as WireGuard intends):
//!
//! 1. The side that initiated the session in force rekeys it once it is REKEY_AFTER_TIME
//!    (120 s) old plus a jitter of up to [`MAX_JITTER`], as kernel WireGuard does when it sends
//!    a keepalive on an old session. The session never lapses, and the jitter, fixed per peer
//!    and round, keeps 200 peers started together from rekeying in one burst.
//! 2. The side that answered rekeys only once the session is [`RESPONDER_REKEY_AFTER`] old
//!    plus the jitter: its peer does not rekey idle sessions (stock boringtun). Against a
//!    ztnet or kernel peer the initiator's rekey always comes first.
//! 3. With no session at all, a timer-driven initiation that starts a handshake afresh (no
//!    initiation for [`FRESH_GAP`]) is held back by the side with the larger public key, a
//!    tie-break both sides compute alike. boringtun resends it REKEY_TIMEOUT (5 s) later
//!    unless the peer's initiation came first and was answered.
//!
//! Pure decisions only; the peer table calls them with boringtun's session age.

use std::time::Duration;

/// WireGuard's REKEY_AFTER_TIME.
pub const REKEY_AFTER: Duration = Duration::from_secs(120);

/// Age at which the answering side of an idle session rekeys it itself (below boringtun's
/// own 165 s receive-side rule and REJECT_AFTER_TIME's 180 s, whatever the jitter).
pub const RESPONDER_REKEY_AFTER: Duration = Duration::from_secs(150);

/// Largest jitter added to the rekey age.
pub const MAX_JITTER: Duration = Duration::from_secs(10);

/// An initiation with none before it for this long starts a handshake afresh; boringtun's
/// retries come every 5 s.
pub const FRESH_GAP: Duration = Duration::from_secs(8);

/// The jitter for a peer's rekey round: fixed for one peer and round (so the decision does not
/// flicker between ticks), spread evenly over `0..MAX_JITTER` across peers and rounds.
pub fn jitter(peer_index: u32, round: u32) -> Duration {
    // splitmix64 finaliser over the two inputs.
    let mut z =
        (u64::from(peer_index) << 32 | u64::from(round)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let max_ms = MAX_JITTER.as_millis() as u64;
    Duration::from_millis(z % max_ms)
}

/// Whether an idle session of `age` is due for this node's rekey: `own` when this node
/// initiated it.
pub fn due(own: bool, age: Duration, jitter: Duration) -> bool {
    let after = if own {
        REKEY_AFTER
    } else {
        RESPONDER_REKEY_AFTER
    };
    age >= after + jitter
}

/// Whether this node, with public key `ours`, holds back a fresh timer-driven initiation to
/// the peer with key `theirs` (rule 3): the larger key waits for the smaller.
pub fn defers(ours: &[u8; 32], theirs: &[u8; 32]) -> bool {
    ours > theirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_initiator_rekeys_first_whatever_the_jitter() {
        for i in 0..1000 {
            let j = jitter(i, i / 7);
            assert!(j < MAX_JITTER);
            // The latest the initiator rekeys is before the earliest the responder would.
            assert!(due(true, REKEY_AFTER + MAX_JITTER, j));
            assert!(!due(false, REKEY_AFTER + MAX_JITTER, Duration::ZERO));
            assert!(!due(true, REKEY_AFTER + j - Duration::from_millis(1), j));
            // And the responder's latest is well before the 180 s expiry.
            assert!(due(false, RESPONDER_REKEY_AFTER + MAX_JITTER, j));
            assert!(RESPONDER_REKEY_AFTER + MAX_JITTER < Duration::from_secs(165));
        }
    }

    #[test]
    fn jitter_spreads_200_peers_over_the_window() {
        let mut buckets = [0u32; 10];
        for i in 0..200 {
            let s = jitter(0x12_3400 + i, 0).as_secs() as usize;
            buckets[s] += 1;
        }
        // 20 a second on average; none empty, none holding a third of them.
        assert!(buckets.iter().all(|&b| (1..70).contains(&b)), "{buckets:?}");
        // A peer's next round gets another value.
        assert!((0..50).any(|r| jitter(7, r) != jitter(7, 0)));
    }

    #[test]
    fn exactly_one_side_defers() {
        let a = [1u8; 32];
        let mut b = [1u8; 32];
        b[31] = 2;
        assert!(defers(&b, &a));
        assert!(!defers(&a, &b));
        assert!(!defers(&a, &a));
    }
}
