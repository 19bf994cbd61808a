//! The connection-tracking table: open addressing with linear probing, a keyed multiply hash,
//! one byte of tag per slot in an array of its own, and one 64-byte cache line per flow. A
//! lookup reads tags until it meets an empty one, and a flow's line only when its tag matches:
//! the tags of 65,536 flows take 128 KiB and stay in the L2 cache, so a packet that opens a new
//! flow usually touches no flow line before it writes its own. The table is kept at most half
//! full and probes are bounded by [`MAX_PROBE`]; removal shifts the entries after it back, so
//! there are no tombstones.
//!
//! Times are nanoseconds since the filter's epoch (see `filter::State::ticks`).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

/// The most slots a lookup or an insertion looks at, from a key's home slot on. With the table
/// at most half full, a random key needs more than this with a probability of the order of
/// 10^-10 (linear probing at load 1/2); a new flow that finds no room within it is refused as if
/// the table were full.
const MAX_PROBE: usize = 128;
/// Fewest slots of a table.
const MIN_SLOTS: usize = 16;
/// The table starts with room for this many flows (or `max_flows` if smaller) and doubles up to
/// twice `max_flows` slots as flows come.
const INITIAL_FLOWS: usize = 8192;
/// Most slots ever allocated: 2^27 lines of 64 bytes (8 GiB). A larger `max_flows` is cut to
/// half of this.
const MAX_SLOTS: usize = 1 << 27;

/// The tail word's marker: set in every key, so that an empty slot's key (all zero) is none.
const OCCUPIED: u64 = 1 << 41;
/// The tag of an empty slot; an occupied slot's tag has its top bit set.
const EMPTY_TAG: u8 = 0;

/// Which way a packet goes, seen from this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Outbound,
    Inbound,
}

/// A flow, keyed from this node's side so that both directions find it: the two addresses
/// (IPv4 mapped into `::ffff:0:0/96`) and one word holding the ports, protocol and family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FlowKey {
    /// The addresses as pairs of words (low, high): 8-byte alignment keeps a slot at 64 bytes.
    local: [u64; 2],
    remote: [u64; 2],
    /// `local_port | remote_port << 16 | proto << 32 | v4 << 40 | OCCUPIED`.
    tail: u64,
}

impl FlowKey {
    #[inline]
    pub(crate) fn new(
        v4: bool,
        proto: u8,
        local: u128,
        remote: u128,
        local_port: u16,
        remote_port: u16,
    ) -> Self {
        let tail = u64::from(local_port)
            | u64::from(remote_port) << 16
            | u64::from(proto) << 32
            | u64::from(v4) << 40
            | OCCUPIED;
        FlowKey {
            local: [local as u64, (local >> 64) as u64],
            remote: [remote as u64, (remote >> 64) as u64],
            tail,
        }
    }

    pub(crate) fn local(&self) -> u128 {
        u128::from(self.local[0]) | u128::from(self.local[1]) << 64
    }

    pub(crate) fn remote(&self) -> u128 {
        u128::from(self.remote[0]) | u128::from(self.remote[1]) << 64
    }

    pub(crate) fn local_port(&self) -> u16 {
        self.tail as u16
    }

    pub(crate) fn remote_port(&self) -> u16 {
        (self.tail >> 16) as u16
    }

    pub(crate) fn proto(&self) -> u8 {
        (self.tail >> 32) as u8
    }

    pub(crate) fn v4(&self) -> bool {
        self.tail & 1 << 40 != 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TcpState {
    /// Only the opening SYN seen.
    Opening,
    Established,
    /// FIN seen both ways.
    Closing,
    Reset,
}

/// What the table keeps about one flow.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Flow {
    /// Nanoseconds since the epoch at which the flow ends unless a packet renews it.
    pub(crate) expires: u64,
    /// The peer's slot in the filter's peer tables.
    pub(crate) peer: u32,
    pub(crate) origin: Direction,
    pub(crate) echo: bool,
    pub(crate) replied: bool,
    pub(crate) tcp: TcpState,
    /// FIN seen: bit 0 from the origin side, bit 1 from the other.
    pub(crate) fin: u8,
}

/// One slot, one cache line: the key (40 bytes) and the flow (24 bytes).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Slot {
    key: FlowKey,
    flow: Flow,
}

const EMPTY: Slot = Slot {
    key: FlowKey {
        local: [0; 2],
        remote: [0; 2],
        tail: 0,
    },
    flow: Flow {
        expires: 0,
        peer: 0,
        origin: Direction::Outbound,
        echo: false,
        replied: false,
        tcp: TcpState::Established,
        fin: 0,
    },
};

/// Where a lookup ended: the key's slot, or the empty slot a new entry for it would take.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Find {
    /// The slot holding the key, live or not.
    pub(crate) found: Option<usize>,
    /// The empty slot that ended the probe.
    vacant: Option<usize>,
}

/// The flow table. See the module documentation.
#[derive(Debug)]
pub(crate) struct FlowTable {
    /// Per slot: [`EMPTY_TAG`], or `0x80` with seven bits of the key's hash.
    tags: Vec<u8>,
    slots: Vec<Slot>,
    mask: usize,
    /// Occupied slots, expired flows not yet removed included.
    len: usize,
    max_flows: usize,
    max_slots: usize,
    /// The next time a full table may be swept.
    next_sweep: Option<u64>,
    seed: [u64; 5],
}

impl FlowTable {
    pub(crate) fn new(max_flows: usize) -> Self {
        let max_flows = max_flows.min(MAX_SLOTS / 2);
        let max_slots = slots_for(max_flows);
        let slots = slots_for(max_flows.min(INITIAL_FLOWS));
        // Random per table, so that a peer cannot aim its flows at one chain of slots.
        let random = RandomState::new();
        let seed = [0u64, 1, 2, 3, 4].map(|i| random.hash_one(i));
        FlowTable {
            tags: vec![EMPTY_TAG; slots],
            slots: vec![EMPTY; slots],
            mask: slots - 1,
            len: 0,
            max_flows,
            max_slots,
            next_sweep: None,
            seed,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Three 64x64->128 multiplies, two of them independent, each folded; every bit of the key
    /// and of the seed reaches the low bits that pick the slot.
    #[inline]
    fn hash(&self, k: &FlowKey) -> u64 {
        let s = &self.seed;
        let a = mum(k.local[0] ^ s[0], k.local[1] ^ k.tail ^ s[1]);
        let b = mum(k.remote[0] ^ s[2], k.remote[1] ^ s[3]);
        mum(a ^ s[4], b)
    }

    /// Looks a key up. An expired flow is still found; the caller decides what it means.
    #[inline]
    pub(crate) fn find(&self, key: &FlowKey) -> Find {
        let hash = self.hash(key);
        let tag = tag_of(hash);
        let mut at = hash as usize & self.mask;
        for _ in 0..MAX_PROBE.min(self.slots.len()) {
            let t = self.tags[at];
            if t == EMPTY_TAG {
                return Find {
                    found: None,
                    vacant: Some(at),
                };
            }
            if t == tag && self.slots[at].key == *key {
                return Find {
                    found: Some(at),
                    vacant: None,
                };
            }
            at = (at + 1) & self.mask;
        }
        Find {
            found: None,
            vacant: None,
        }
    }

    /// The flow in a slot that [`FlowTable::find`] returned.
    #[inline]
    pub(crate) fn flow_mut(&mut self, at: usize) -> Option<&mut Flow> {
        self.slots.get_mut(at).map(|s| &mut s.flow)
    }

    /// Stores a flow for a key that `find` just looked up (nothing changed the table since).
    /// A key already present is replaced in place. A full table is swept for expired flows, at
    /// most once per `sweep_interval`; false when there is still no room.
    pub(crate) fn insert(
        &mut self,
        mut find: Find,
        key: FlowKey,
        flow: Flow,
        now: u64,
        sweep_interval: u64,
    ) -> bool {
        if let Some(at) = find.found {
            self.slots[at] = Slot { key, flow };
            return true;
        }
        if self.len >= self.max_flows {
            if self.next_sweep.is_some_and(|t| now < t) {
                return false;
            }
            self.retain(|_, f| f.expires > now);
            self.next_sweep = Some(now.saturating_add(sweep_interval));
            if self.len >= self.max_flows {
                return false;
            }
            find = self.find(&key);
        }
        if self.len >= self.slots.len() / 2 && self.slots.len() < self.max_slots {
            self.grow();
            find = self.find(&key);
        }
        let Some(at) = find.vacant else {
            return false;
        };
        self.tags[at] = tag_of(self.hash(&key));
        self.slots[at] = Slot { key, flow };
        self.len += 1;
        true
    }

    /// Every entry, expired ones not yet removed included, in slot order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&FlowKey, &Flow)> {
        self.tags
            .iter()
            .zip(&self.slots)
            .filter(|(t, _)| **t != EMPTY_TAG)
            .map(|(_, s)| (&s.key, &s.flow))
    }

    /// Keeps the flows for which `keep` is true; it sees each flow once.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&FlowKey, &mut Flow) -> bool) {
        let n = self.slots.len();
        // Start after an empty slot: no probe chain runs across it, so removing an entry only
        // moves entries that are still ahead of the walk.
        let start = self
            .tags
            .iter()
            .position(|&t| t == EMPTY_TAG)
            .map_or(0, |e| e + 1);
        let mut visited = 0;
        let mut at = start & self.mask;
        while visited < n {
            if self.tags[at] != EMPTY_TAG {
                let slot = &mut self.slots[at];
                if !keep(&slot.key, &mut slot.flow) {
                    // The slot now holds the next entry of the chain, if any: look again.
                    self.remove_at(at);
                    if self.tags[at] != EMPTY_TAG {
                        continue;
                    }
                }
            }
            visited += 1;
            at = (at + 1) & self.mask;
        }
    }

    /// Empties a slot, moving back the entries after it that may live closer to their home.
    fn remove_at(&mut self, mut hole: usize) {
        let mut next = hole;
        loop {
            next = (next + 1) & self.mask;
            if self.tags[next] == EMPTY_TAG {
                break;
            }
            let home = self.hash(&self.slots[next].key) as usize & self.mask;
            // The entry may move to the hole when the hole lies between its home and its slot.
            if hole.wrapping_sub(home) & self.mask < next.wrapping_sub(home) & self.mask {
                self.tags[hole] = self.tags[next];
                self.slots[hole] = self.slots[next];
                hole = next;
            }
        }
        self.tags[hole] = EMPTY_TAG;
        self.slots[hole] = EMPTY;
        self.len -= 1;
    }

    /// Doubles the slots and puts every entry back.
    fn grow(&mut self) {
        let new_len = self.slots.len() * 2;
        let old_tags = std::mem::replace(&mut self.tags, vec![EMPTY_TAG; new_len]);
        let old = std::mem::replace(&mut self.slots, vec![EMPTY; new_len]);
        self.mask = new_len - 1;
        self.len = 0;
        for (slot, _) in old
            .into_iter()
            .zip(old_tags)
            .filter(|(_, t)| *t != EMPTY_TAG)
        {
            let hash = self.hash(&slot.key);
            let mut at = hash as usize & self.mask;
            // At load 1/4 a chain longer than the probe bound is all but impossible; an entry
            // that found none would be dropped, and its next packet decided as a new flow.
            for _ in 0..MAX_PROBE {
                if self.tags[at] == EMPTY_TAG {
                    self.tags[at] = tag_of(hash);
                    self.slots[at] = slot;
                    self.len += 1;
                    break;
                }
                at = (at + 1) & self.mask;
            }
        }
    }
}

/// The tag of a hash: its top seven bits (the slot comes from the low bits) and the top bit.
#[inline]
fn tag_of(hash: u64) -> u8 {
    0x80 | (hash >> 57) as u8
}

/// Slots for a number of flows: a power of two at least twice as large.
fn slots_for(flows: usize) -> usize {
    (flows * 2).next_power_of_two().clamp(MIN_SLOTS, MAX_SLOTS)
}

/// Multiplies two words to 128 bits and folds the halves.
#[inline]
fn mum(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(expires: u64) -> Flow {
        Flow {
            expires,
            ..EMPTY.flow
        }
    }

    fn key(i: u32) -> FlowKey {
        FlowKey::new(
            true,
            17,
            0xffff_0a00_0001,
            0xffff_0a00_0002,
            i as u16,
            (i >> 16) as u16,
        )
    }

    #[test]
    fn a_slot_is_one_cache_line() {
        assert_eq!(size_of::<Slot>(), 64);
        assert_eq!(align_of::<Slot>(), 64);
    }

    #[test]
    fn inserted_keys_are_found_and_removed_ones_are_not() {
        let mut t = FlowTable::new(10_000);
        for i in 0..10_000 {
            let f = t.find(&key(i));
            assert!(f.found.is_none());
            assert!(t.insert(f, key(i), flow(u64::from(i % 2) + 1), 0, 1));
        }
        assert_eq!(t.len(), 10_000);
        // The table grew from its first size and kept everything.
        assert!(t.slots.len() >= 20_000);
        for i in 0..10_000 {
            assert!(t.find(&key(i)).found.is_some(), "key {i}");
        }
        // Remove the odd half (expires 2 > 1), keep the even half.
        t.retain(|_, f| f.expires == 2);
        assert_eq!(t.len(), 5_000);
        for i in 0..10_000 {
            assert_eq!(t.find(&key(i)).found.is_some(), i % 2 == 1, "key {i}");
        }
    }

    #[test]
    fn a_full_table_refuses_until_flows_expire() {
        let mut t = FlowTable::new(4);
        for i in 0..4 {
            let f = t.find(&key(i));
            assert!(t.insert(f, key(i), flow(100), 0, 10));
        }
        let f = t.find(&key(9));
        assert!(!t.insert(f, key(9), flow(100), 0, 10));
        // At 100 all four have ended: the sweep makes room.
        let f = t.find(&key(9));
        assert!(t.insert(f, key(9), flow(200), 100, 10));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn retain_sees_every_entry_once() {
        let mut t = FlowTable::new(1000);
        for i in 0..1000 {
            let f = t.find(&key(i));
            assert!(t.insert(f, key(i), flow(5), 0, 1));
        }
        let mut seen = std::collections::HashSet::new();
        t.retain(|k, _| {
            assert!(seen.insert(k.local_port()), "seen twice");
            k.local_port() % 3 != 0
        });
        assert_eq!(seen.len(), 1000);
        assert_eq!(t.len(), 1000 - 334);
    }
}
