//! The KV event log: every block that gains or loses a copy in a tier, in
//! the order the store made the change, for routers (`Subscribe`).
//!
//! Invariants:
//! - Events are appended under the store's lock by the same helpers that
//!   change residency (`add_dram`, `drop_dram`, `add_nvme`, `clear_nvme`,
//!   `remove_block`), so their order is the order of the state changes and
//!   replaying them over a snapshot gives the store's state.
//! - Sequence numbers are consecutive from 1 per daemon start.
//! - The log is a ring of `capacity` events allocated at start; the oldest
//!   are overwritten (counted), never grown. A subscriber whose cursor
//!   falls behind the ring is told how many it missed.
//! - Recovery at start logs nothing: a restart voids every subscription
//!   (the epoch changes) and subscribers resync from a snapshot.

use std::collections::VecDeque;
use std::sync::Arc;

use strata_proto::{BlockKey, TierKind};
use tokio::sync::Notify;

use super::index::NsOrd;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Stored,
    Removed,
    /// Every copy in `medium` is gone (fenced NVMe tier).
    Cleared,
}

/// One logged event; the namespace is the store's ordinal (resolved to its
/// id when read out).
#[derive(Debug, Clone, Copy)]
pub struct Event {
    pub seq: u64,
    pub kind: EventKind,
    pub medium: TierKind,
    pub ns: NsOrd,
    pub key: BlockKey,
    pub parent: Option<BlockKey>,
    pub len: u32,
}

pub struct EventLog {
    buf: VecDeque<Event>,
    capacity: usize,
    next_seq: u64,
    overwritten: u64,
    /// While set (recovery), nothing is logged.
    paused: bool,
    notify: Arc<Notify>,
}

/// What a read found.
#[derive(Debug, Default)]
pub struct Read {
    /// Events after the cursor that the reader lost to the ring.
    pub missed: u64,
    /// The cursor after this read: the last sequence number examined.
    pub cursor: u64,
}

impl EventLog {
    pub fn new(capacity: usize) -> Self {
        EventLog {
            buf: VecDeque::with_capacity(capacity),
            capacity,
            next_seq: 1,
            overwritten: 0,
            paused: false,
            notify: Arc::new(Notify::new()),
        }
    }

    pub fn notify(&self) -> Arc<Notify> {
        self.notify.clone()
    }

    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// The last sequence number given out (0 before the first event).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    pub fn overwritten(&self) -> u64 {
        self.overwritten
    }

    pub fn push(
        &mut self,
        kind: EventKind,
        medium: TierKind,
        ns: NsOrd,
        key: BlockKey,
        parent: Option<BlockKey>,
        len: u32,
    ) {
        if self.capacity == 0 || self.paused {
            return;
        }
        if self.buf.len() == self.capacity {
            self.buf.pop_front();
            self.overwritten += 1;
        }
        self.buf.push_back(Event {
            seq: self.next_seq,
            kind,
            medium,
            ns,
            key,
            parent,
            len,
        });
        self.next_seq += 1;
        self.notify.notify_waiters();
    }

    /// Logs that every copy in `medium` is gone.
    pub fn push_cleared(&mut self, medium: TierKind) {
        let none = BlockKey::new(&[0]).expect("a one-byte key is valid");
        self.push(EventKind::Cleared, medium, 0, none, None, 0);
    }

    /// Appends to `out` up to `max` events after `cursor` that `keep`
    /// accepts, examining at most `16 * max` events (a filtered reader must
    /// not hold the store's lock for long; it reads on from the cursor).
    pub fn read(
        &self,
        cursor: u64,
        max: usize,
        keep: &dyn Fn(&Event) -> bool,
        out: &mut Vec<Event>,
    ) -> Read {
        let last = self.last_seq();
        if cursor >= last {
            // Nothing new (a cursor from the future, after a restart, also
            // lands here; the epoch tells the subscriber).
            return Read {
                missed: 0,
                cursor: cursor.min(last),
            };
        }
        let oldest = self.buf.front().map_or(self.next_seq, |e| e.seq);
        let (start, missed) = if cursor + 1 < oldest {
            (0, oldest - cursor - 1)
        } else {
            ((cursor + 1 - oldest) as usize, 0)
        };
        let mut cursor = if missed > 0 { oldest - 1 } else { cursor };
        for (examined, e) in self.buf.range(start..).enumerate() {
            if out.len() >= max || examined >= 16 * max {
                break;
            }
            cursor = e.seq;
            if keep(e) {
                out.push(*e);
            }
        }
        Read { missed, cursor }
    }
}

/// A subscriber's view of the store, for tests: a snapshot, then the
/// events after it replayed on top; [`EventMirror::check`] compares the view
/// with a fresh snapshot. A residency change without its event (or with a
/// wrong one) shows up as a difference.
#[cfg(test)]
pub struct EventMirror {
    held: std::collections::BTreeSet<(u64, Vec<u8>, TierKind)>,
    cursor: u64,
}

#[cfg(test)]
impl EventMirror {
    fn snapshot(store: &super::Store) -> std::collections::BTreeSet<(u64, Vec<u8>, TierKind)> {
        let (events, next) = store.snapshot_events(0, usize::MAX, &[]);
        assert!(next.is_none());
        events
            .iter()
            .map(|e| (e.namespace.0, e.key.as_bytes().to_vec(), e.medium))
            .collect()
    }

    pub fn new(store: &super::Store) -> Self {
        EventMirror {
            cursor: store.last_event_seq(),
            held: Self::snapshot(store),
        }
    }

    /// Applies the events since the last call and checks the view.
    pub fn check(&mut self, store: &super::Store, context: &str) {
        loop {
            let r = store.read_events(self.cursor, 4096, &[]);
            assert_eq!(r.missed, 0, "{context}: the test's event ring overflowed");
            for e in &r.events {
                let k = (e.namespace.0, e.key.as_bytes().to_vec(), e.medium);
                match e.kind {
                    EventKind::Stored => {
                        self.held.insert(k);
                    }
                    EventKind::Removed => {
                        assert!(
                            self.held.remove(&k),
                            "{context}: removal of {e:?} never stored"
                        );
                    }
                    EventKind::Cleared => self.held.retain(|h| h.2 != e.medium),
                }
            }
            if r.cursor == self.cursor {
                break;
            }
            self.cursor = r.cursor;
        }
        let now = Self::snapshot(store);
        assert_eq!(
            self.held, now,
            "{context}: events replayed over the snapshot differ from the store"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> BlockKey {
        BlockKey::new(&[i]).unwrap()
    }

    #[test]
    fn ring_counts_what_a_slow_reader_missed() {
        let mut log = EventLog::new(4);
        for i in 0..6u8 {
            log.push(
                EventKind::Stored,
                TierKind::Dram,
                NsOrd::from(i % 2),
                key(i),
                None,
                1,
            );
        }
        assert_eq!(log.last_seq(), 6);
        assert_eq!(log.overwritten(), 2);
        let mut out = vec![];
        // Cursor 0: events 1 and 2 are gone.
        let r = log.read(0, 10, &|_| true, &mut out);
        assert_eq!(r.missed, 2);
        assert_eq!(out.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4, 5, 6]);
        assert_eq!(r.cursor, 6);
        // Caught up: nothing, nothing missed.
        out.clear();
        let r = log.read(6, 10, &|_| true, &mut out);
        assert_eq!((r.missed, r.cursor, out.len()), (0, 6, 0));
        // Filtered and bounded reads move the cursor past what they skip.
        out.clear();
        let r = log.read(2, 1, &|e| e.ns == 1, &mut out);
        assert_eq!(out.iter().map(|e| e.seq).collect::<Vec<_>>(), [4]);
        assert_eq!(r.cursor, 4);
        // Paused (recovery): nothing logged.
        log.set_paused(true);
        log.push(EventKind::Removed, TierKind::Dram, 0, key(9), None, 1);
        assert_eq!(log.last_seq(), 6);
        // A disabled log logs nothing.
        let mut off = EventLog::new(0);
        off.push(EventKind::Stored, TierKind::Dram, 0, key(1), None, 1);
        assert_eq!(off.last_seq(), 0);
    }
}
