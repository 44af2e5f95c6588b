//! N:M content sets: hybrid logical clocks and last-writer-wins per path.
//!
//! Several sources may write one content set (two editors' servers). Every write of
//! a path carries a [`Version`]: its [`Stamp`] (hybrid clock time and origin name) and
//! what its origin had seen when it wrote (a [`VersionVector`] that includes the write
//! itself). Replicas keep, per path, the version with the greatest stamp — greatest
//! [`Hlc`], ties broken by origin name — so every replica that has seen the same writes
//! holds the same winner, whatever order they arrived in.
//!
//! **Conflicts.** A write overwritten by one its writer had seen is an ordinary update.
//! A write that loses to one *concurrent* with it (neither origin had seen the other)
//! is a conflict: [`resolve`] reports it as a [`Conflict`] (path, winner, loser) for
//! the job log. Whoever holds the loser when the winner arrives (at least the loser's
//! origin does) reports it, so every write that ends up discarded without its origin
//! having seen the winner is named by some replica; replicas that see the same pair
//! report the same record, so the job log deduplicates them.
//!
//! **Clocks.** [`HlcClock`] follows Kulkarni et al., "Logical Physical Clocks and
//! Consistent Snapshots in Globally Distributed Databases" (2014): a timestamp is the
//! largest physical time seen (local or in a message) plus a counter that orders events
//! within one millisecond. It never goes backwards even when the physical clock does,
//! and a write made after observing another always gets a greater timestamp, so
//! last-writer-wins never undoes a causal overwrite. A restarted node must seed its
//! clock with the greatest stamp in its persisted state ([`HlcClock::observe`]).

use std::collections::BTreeMap;
use std::fmt;

use crate::path::RelPath;

/// A hybrid logical clock timestamp: milliseconds, then a counter within them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hlc {
    pub wall_ms: u64,
    pub logical: u32,
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.wall_ms, self.logical)
    }
}

impl Hlc {
    /// The timestamp right after `self`: the counter plus one, or the next
    /// millisecond if the counter is full.
    fn tick(self) -> Hlc {
        match self.logical.checked_add(1) {
            Some(logical) => Hlc {
                wall_ms: self.wall_ms,
                logical,
            },
            None => Hlc {
                wall_ms: self.wall_ms.saturating_add(1),
                logical: 0,
            },
        }
    }
}

/// The hybrid clock of one node: the last timestamp it issued or observed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    pub fn new() -> Self {
        Self::default()
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A timestamp for a local event (a write) at physical time `physical_ms`:
    /// greater than every timestamp issued or observed before.
    pub fn now(&mut self, physical_ms: u64) -> Hlc {
        self.last = if physical_ms > self.last.wall_ms {
            Hlc {
                wall_ms: physical_ms,
                logical: 0,
            }
        } else {
            self.last.tick()
        };
        self.last
    }

    /// Takes in a timestamp received from another node (on applying its write) at
    /// physical time `physical_ms`; returns the new clock, greater than both.
    pub fn observe(&mut self, remote: Hlc, physical_ms: u64) -> Hlc {
        let wall = self.last.wall_ms.max(remote.wall_ms).max(physical_ms);
        self.last = if wall == self.last.wall_ms && wall == remote.wall_ms {
            Hlc {
                wall_ms: wall,
                logical: self.last.logical.max(remote.logical),
            }
            .tick()
        } else if wall == self.last.wall_ms {
            self.last.tick()
        } else if wall == remote.wall_ms {
            remote.tick()
        } else {
            Hlc {
                wall_ms: wall,
                logical: 0,
            }
        };
        self.last
    }
}

/// Who wrote when: compared by clock, then origin name. The greatest stamp wins.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stamp {
    pub hlc: Hlc,
    pub origin: String,
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.origin, self.hlc)
    }
}

/// Per origin, the highest change-set number seen (each origin numbers its change
/// sets 1, 2, 3…; seeing `n` means seeing everything up to `n`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct VersionVector(BTreeMap<String, u64>);

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    /// The highest number seen from `origin` (0: nothing).
    pub fn get(&self, origin: &str) -> u64 {
        self.0.get(origin).copied().unwrap_or(0)
    }

    /// Raises `origin`'s entry to `seq` (never lowers it).
    pub fn observe(&mut self, origin: &str, seq: u64) {
        if seq > self.get(origin) {
            self.0.insert(origin.to_string(), seq);
        }
    }

    /// Has seen change set `seq` of `origin`.
    pub fn covers(&self, origin: &str, seq: u64) -> bool {
        self.get(origin) >= seq
    }

    /// Pointwise maximum.
    pub fn merge(&mut self, other: &VersionVector) {
        for (o, &s) in &other.0 {
            self.observe(o, s);
        }
    }

    /// Covers everything `other` covers.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other.0.iter().all(|(o, &s)| self.covers(o, s))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(o, s)| (o.as_str(), *s))
    }
}

/// The version of one write of a path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version {
    stamp: Stamp,
    seq: u64,
    seen: VersionVector,
}

impl Version {
    /// The write made in change set `seq` of `stamp.origin`, whose origin had seen
    /// `seen` before it (the write itself is added).
    pub fn new(stamp: Stamp, seq: u64, mut seen: VersionVector) -> Self {
        seen.observe(&stamp.origin, seq);
        Self { stamp, seq, seen }
    }
    pub fn stamp(&self) -> &Stamp {
        &self.stamp
    }
    pub fn origin(&self) -> &str {
        &self.stamp.origin
    }
    /// The change set of its origin that carried it.
    pub fn seq(&self) -> u64 {
        self.seq
    }
    /// What the origin had seen when it wrote, this write included.
    pub fn seen(&self) -> &VersionVector {
        &self.seen
    }
    /// `self`'s origin had seen `other` when it wrote (`other` happened before).
    pub fn has_seen(&self, other: &Version) -> bool {
        self.seen.covers(other.origin(), other.seq)
    }
    /// Neither had seen the other.
    pub fn concurrent_with(&self, other: &Version) -> bool {
        !self.has_seen(other) && !other.has_seen(self)
    }
}

/// A write lost to a concurrent one: for the job log.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Conflict {
    pub path: RelPath,
    pub winner: Stamp,
    pub loser: Stamp,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} overwrote concurrent {}",
            self.path, self.winner, self.loser
        )
    }
}

/// What to do with an incoming write of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The incoming write replaces the current one.
    pub take: bool,
    /// The loser, when the two were concurrent.
    pub conflict: Option<Conflict>,
}

/// Last-writer-wins for `path`, which holds `current` (`None`: never written),
/// receiving `incoming`. A duplicate (same stamp) is kept and not a conflict.
pub fn resolve(path: &RelPath, current: Option<&Version>, incoming: &Version) -> Resolution {
    let Some(cur) = current else {
        return Resolution {
            take: true,
            conflict: None,
        };
    };
    let take = incoming.stamp > cur.stamp;
    let conflict = (incoming.stamp != cur.stamp && incoming.concurrent_with(cur)).then(|| {
        let (w, l) = if take {
            (incoming, cur)
        } else {
            (cur, incoming)
        };
        Conflict {
            path: path.clone(),
            winner: w.stamp.clone(),
            loser: l.stamp.clone(),
        }
    });
    Resolution { take, conflict }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{p, version as v};
    use proptest::prelude::*;

    fn hlc(wall_ms: u64, logical: u32) -> Hlc {
        Hlc { wall_ms, logical }
    }

    #[test]
    fn clock_follows_physical_time_and_counts_within_a_millisecond() {
        let mut c = HlcClock::new();
        assert_eq!(c.now(100), hlc(100, 0));
        assert_eq!(c.now(100), hlc(100, 1));
        assert_eq!(c.now(101), hlc(101, 0));
        // Physical time goes backwards: the clock does not.
        assert_eq!(c.now(50), hlc(101, 1));
        assert_eq!(c.now(50), hlc(101, 2));
    }

    #[test]
    fn observe_orders_after_both_per_the_paper() {
        let mut c = HlcClock::new();
        c.now(100);
        // Remote ahead: take its wall time and count past it.
        assert_eq!(c.observe(hlc(200, 5), 150), hlc(200, 6));
        // Same wall on both sides: past the larger counter.
        assert_eq!(c.observe(hlc(200, 9), 150), hlc(200, 10));
        assert_eq!(c.observe(hlc(200, 3), 150), hlc(200, 11));
        // Physical time ahead of both: counter resets.
        assert_eq!(c.observe(hlc(200, 3), 300), hlc(300, 0));
        // A write after observing is greater than what was observed.
        let seen = hlc(900, 7);
        c.observe(seen, 10);
        assert!(c.now(10) > seen);
    }

    #[test]
    fn counter_overflow_moves_to_the_next_millisecond() {
        let mut c = HlcClock::new();
        c.observe(hlc(5, u32::MAX), 0);
        assert_eq!(c.last(), hlc(6, 0));
        assert_eq!(c.now(0), hlc(6, 1));
    }

    proptest! {
        /// Whatever physical time does and whatever arrives, timestamps strictly
        /// increase and a local event after an observation is greater than it.
        #[test]
        fn clock_is_strictly_monotonic(steps in proptest::collection::vec((any::<bool>(), 0u64..1000, 0u64..1000, 0u32..4), 1..64)) {
            let mut c = HlcClock::new();
            let mut prev = c.last();
            for (remote, pt, rw, rl) in steps {
                let t = if remote {
                    let r = hlc(rw, rl);
                    let t = c.observe(r, pt);
                    prop_assert!(t > r);
                    t
                } else {
                    c.now(pt)
                };
                prop_assert!(t > prev);
                // Never behind physical time.
                prop_assert!(t.wall_ms >= pt);
                prev = t;
            }
        }
    }

    #[test]
    fn later_stamp_wins_and_ties_go_to_the_greater_origin() {
        let path = p("f");
        // Same clock reading at two editors: the origin name decides, the same way on
        // every replica.
        let a = v("alpha", 10, 1, &[]);
        let b = v("beta", 10, 1, &[]);
        let r = resolve(&path, Some(&a), &b);
        assert!(r.take);
        let c = r.conflict.unwrap();
        assert_eq!(
            (c.winner.origin.as_str(), c.loser.origin.as_str()),
            ("beta", "alpha")
        );
        let r = resolve(&path, Some(&b), &a);
        assert!(!r.take);
        assert_eq!(r.conflict.unwrap(), c);
        // Later clock beats the origin name.
        let a2 = v("alpha", 11, 2, &[]);
        assert!(resolve(&path, Some(&b), &a2).take);
    }

    #[test]
    fn causal_overwrite_is_not_a_conflict_and_duplicates_are_kept() {
        let path = p("f");
        let a = v("alpha", 10, 1, &[]);
        // beta had applied alpha's change set 1 before writing.
        let b = v("beta", 12, 1, &[("alpha", 1)]);
        assert_eq!(
            resolve(&path, Some(&a), &b),
            Resolution {
                take: true,
                conflict: None
            }
        );
        // Arriving late where b already is: dropped, still not a conflict.
        assert_eq!(
            resolve(&path, Some(&b), &a),
            Resolution {
                take: false,
                conflict: None
            }
        );
        // The same origin's later write.
        let a2 = v("alpha", 20, 2, &[]);
        assert!(a2.has_seen(&a) && !a.has_seen(&a2));
        assert_eq!(resolve(&path, Some(&a), &a2).conflict, None);
        // Re-delivery.
        assert_eq!(
            resolve(&path, Some(&b), &b.clone()),
            Resolution {
                take: false,
                conflict: None
            }
        );
        assert!(resolve(&path, None, &a).take);
    }

    #[test]
    fn version_vectors() {
        let mut x = VersionVector::new();
        x.observe("a", 3);
        x.observe("a", 1);
        assert_eq!(x.get("a"), 3);
        assert!(x.covers("a", 3) && !x.covers("a", 4) && x.covers("b", 0));
        let mut y = VersionVector::new();
        y.observe("b", 2);
        assert!(!x.dominates(&y) && !y.dominates(&x));
        y.merge(&x);
        assert!(y.dominates(&x));
        assert_eq!(y.iter().collect::<Vec<_>>(), [("a", 3), ("b", 2)]);
    }
}
