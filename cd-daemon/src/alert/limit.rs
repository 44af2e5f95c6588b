//! Rate limiting of one sink's notices, sans I/O: time comes in as an argument, what
//! may be sent goes out as a value.
//!
//! A sink may send at most `max` messages in any window of [`WINDOW`]. A notice that
//! arrives while the window is full (or while others already wait) is held, not lost:
//! when the window reopens, everything held goes out as **one** digest, in which each
//! alert appears once, in its latest state, with the number of changes folded into it.
//! So a flapping alert costs at most `max` messages per window, plus nothing: its
//! later flips ride in the digests, and the digest always ends in the current state.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::Notice;

/// The window `max_per_minute` counts in.
pub const WINDOW: Duration = Duration::from_secs(60);

/// One alert in a batch: its latest notice and how many notices were folded into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folded {
    pub notice: Notice,
    /// 1 for a notice on its own; more when it changed state again while held.
    pub changes: u32,
}

/// What a sink sends at once: one notice, or a digest of the notices held while the
/// window was full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub items: Vec<Folded>,
    /// Held notices folded together (even if only one alert is in it).
    pub digest: bool,
}

impl Batch {
    fn one(n: Notice) -> Batch {
        Batch {
            items: vec![Folded {
                notice: n,
                changes: 1,
            }],
            digest: false,
        }
    }

    /// The number of notices it carries.
    pub fn notices(&self) -> u32 {
        self.items.iter().map(|f| f.changes).sum()
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct Limiter {
    max: usize,
    /// When the messages of the current window went out, oldest first.
    sent: VecDeque<Instant>,
    /// Notices waiting for the window to reopen, in arrival order.
    held: Vec<Notice>,
    /// The latest time seen.
    now: Option<Instant>,
}

impl Limiter {
    /// At most `max_per_window` messages per [`WINDOW`] (at least 1).
    pub fn new(max_per_window: u32) -> Limiter {
        Limiter {
            max: max_per_window.max(1) as usize,
            sent: VecDeque::new(),
            held: Vec::new(),
            now: None,
        }
    }

    fn prune(&mut self, now: Instant) {
        self.now = Some(self.now.map_or(now, |t| t.max(now)));
        while self
            .sent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= WINDOW)
        {
            self.sent.pop_front();
        }
    }

    /// A notice to send at `now`: returned as a batch to send now, or held.
    pub fn handle(&mut self, n: Notice, now: Instant) -> Option<Batch> {
        self.prune(now);
        if self.held.is_empty() && self.sent.len() < self.max {
            self.sent.push_back(now);
            return Some(Batch::one(n));
        }
        self.held.push(n);
        None
    }

    /// When [`Limiter::poll`] will have a digest to send, if anything is held.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.held.is_empty() {
            return None;
        }
        // With the window full, the oldest send leaving it opens a slot; with room
        // (it emptied while notices arrived behind held ones), at once.
        if self.sent.len() < self.max {
            return self.now;
        }
        self.sent.front().map(|t| *t + WINDOW)
    }

    /// The held notices folded into one digest, if the window has room at `now`.
    pub fn poll(&mut self, now: Instant) -> Option<Batch> {
        self.prune(now);
        if self.held.is_empty() || self.sent.len() >= self.max {
            return None;
        }
        self.sent.push_back(now);
        let mut items: Vec<Folded> = Vec::new();
        for n in self.held.drain(..) {
            let key = n.alert.key();
            match items.iter_mut().find(|f| f.notice.alert.key() == key) {
                Some(f) => {
                    f.notice = n;
                    f.changes += 1;
                }
                None => items.push(Folded {
                    notice: n,
                    changes: 1,
                }),
            }
        }
        Some(Batch {
            items,
            digest: true,
        })
    }

    /// Notices held now.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::{Alert, AlertState, Severity};

    fn notice(node: &str, firing: bool, at_ms: i64) -> Notice {
        let a = Alert::firing("NodeDown", Some(node), Severity::Critical, "down");
        Notice {
            alert: if firing { a } else { a.resolved("up") },
            starts_at_ms: 0,
            at_ms,
        }
    }

    #[test]
    fn under_the_limit_everything_goes_at_once() {
        let t0 = Instant::now();
        let mut l = Limiter::new(3);
        for i in 0..3 {
            let b = l.handle(notice(&format!("n{i}"), true, i), t0).unwrap();
            assert!(!b.digest);
            assert_eq!(
                b.items[0].notice.alert.node.as_deref(),
                Some(&*format!("n{i}"))
            );
        }
        assert_eq!(l.poll_timeout(), None);
        // A minute later the window is empty again.
        assert!(l.handle(notice("n9", true, 9), t0 + WINDOW).is_some());
    }

    #[test]
    fn over_the_limit_notices_are_held_and_sent_as_one_digest_when_the_window_reopens() {
        let t0 = Instant::now();
        let mut l = Limiter::new(2);
        assert!(l.handle(notice("a", true, 0), t0).is_some());
        assert!(
            l.handle(notice("b", true, 1), t0 + Duration::from_secs(10))
                .is_some()
        );
        // Full: c, d and the resolution of a wait.
        let t1 = t0 + Duration::from_secs(20);
        assert!(l.handle(notice("c", true, 2), t1).is_none());
        assert!(l.handle(notice("d", true, 3), t1).is_none());
        assert!(l.handle(notice("a", false, 4), t1).is_none());
        assert_eq!(l.held(), 3);
        // The first send leaves the window at t0 + 60 s; not before.
        assert_eq!(l.poll_timeout(), Some(t0 + WINDOW));
        assert!(l.poll(t0 + WINDOW - Duration::from_millis(1)).is_none());
        let d = l.poll(t0 + WINDOW).unwrap();
        assert!(d.digest);
        let got: Vec<(String, AlertState)> = d
            .items
            .iter()
            .map(|f| (f.notice.alert.node.clone().unwrap(), f.notice.alert.state))
            .collect();
        assert_eq!(
            got,
            [
                ("c".to_owned(), AlertState::Firing),
                ("d".to_owned(), AlertState::Firing),
                ("a".to_owned(), AlertState::Resolved),
            ]
        );
        assert_eq!(d.notices(), 3);
        assert_eq!(l.held(), 0);
        assert_eq!(l.poll_timeout(), None);
        // The digest used the slot that opened: the window is full again until b leaves.
        assert!(l.handle(notice("e", true, 5), t0 + WINDOW).is_none());
        assert_eq!(
            l.poll_timeout(),
            Some(t0 + Duration::from_secs(10) + WINDOW)
        );
    }

    #[test]
    fn a_held_notice_does_not_overtake_older_held_ones() {
        let t0 = Instant::now();
        let mut l = Limiter::new(1);
        assert!(l.handle(notice("a", true, 0), t0).is_some());
        assert!(l.handle(notice("b", true, 1), t0).is_none());
        // The window has room at t0 + 60 s, but b waits: c must join it, not pass it.
        assert!(l.handle(notice("c", true, 2), t0 + WINDOW).is_none());
        let d = l.poll(t0 + WINDOW).unwrap();
        assert_eq!(d.items.len(), 2);
        assert_eq!(d.items[0].notice.alert.node.as_deref(), Some("b"));
    }

    #[test]
    fn a_flapping_alert_is_bounded_and_its_last_state_always_arrives() {
        let t0 = Instant::now();
        let max = 5;
        let mut l = Limiter::new(max);
        let mut sent: Vec<(Instant, Batch)> = Vec::new();
        let mut firing = true;
        // One flip every 2 s for 10 minutes (300 notices), the sink's loop polling
        // whenever the limiter asks.
        let mut now = t0;
        let end = t0 + Duration::from_secs(600);
        let mut i = 0;
        while now < end {
            if let Some(b) = l.handle(notice("n1", firing, i), now) {
                sent.push((now, b));
            }
            firing = !firing;
            i += 1;
            let next = now + Duration::from_secs(2);
            while let Some(t) = l.poll_timeout().filter(|t| *t <= next) {
                let b = l.poll(t).expect("ready when it said");
                sent.push((t, b));
            }
            now = next;
        }
        // Drain what is left.
        if let Some(t) = l.poll_timeout() {
            sent.push((t, l.poll(t).unwrap()));
        }
        assert_eq!(l.held(), 0);
        // Never more than `max` messages in any window.
        for (j, (t, _)) in sent.iter().enumerate() {
            let in_window = sent[j..]
                .iter()
                .take_while(|(u, _)| u.duration_since(*t) < WINDOW)
                .count();
            assert!(
                in_window <= max as usize,
                "{in_window} messages within a window"
            );
        }
        // Nothing lost: every notice is in some message; the last message ends in the
        // last state (300 flips starting firing: the last is resolved).
        assert_eq!(sent.iter().map(|(_, b)| b.notices()).sum::<u32>(), 300);
        let last = &sent.last().unwrap().1;
        assert_eq!(last.items.len(), 1, "one alert, folded if held");
        assert_eq!(last.items[0].notice.alert.state, AlertState::Resolved);
        assert_eq!(last.items[0].notice.at_ms, 299);
    }
}
