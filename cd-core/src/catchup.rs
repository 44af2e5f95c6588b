//! Catch-up of recovered nodes: when, per policy, and what a node is until then.
//!
//! A node that was down (or restarted: a new incarnation in its heartbeat, even if the
//! master never saw it miss one) missed change sets. The next route computation gives
//! it a parent again, and it catches up with a full reconcile from its nearest healthy
//! peer ([`Topology::nearest`](crate::topology::Topology::nearest) over the content
//! set's members that are up and not catching up themselves) according to the
//! [`CatchUpPolicy`]:
//!
//! - [`Immediate`](CatchUpPolicy::Immediate): at once;
//! - [`At(t)`](CatchUpPolicy::At): at virtual time `t` (the daemon turns its schedule
//!   into the next instant), or at once if `t` has passed;
//! - [`OnCommand`](CatchUpPolicy::OnCommand): when an operator asks (`cdctl`).
//!
//! Until its catch-up is done a node is stale, so it must not relay (its children
//! would inherit its gaps): [`CatchUpScheduler::route_health`] turns `Up` into
//! `Degraded` for the route computation. It still receives live change sets; those it
//! cannot apply in order wait for the catch-up.
//!
//! [`CatchUpScheduler`] is the master's sans-IO bookkeeping: feed it recoveries,
//! failures, commands and results; poll it for catch-ups that are due.

use std::collections::BTreeMap;

use crate::route::Health;
use crate::topology::ServerId;

/// When a recovered node catches up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CatchUpPolicy {
    Immediate,
    /// At this time (ms, the caller's clock), or at once if it has passed.
    At(u64),
    OnCommand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting; `None` until a command makes it due.
    Waiting(Option<u64>),
    /// Handed out by `poll_due`, not yet done or failed.
    Running,
}

/// The master's record of nodes that must catch up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatchUpScheduler {
    policy: CatchUpPolicy,
    nodes: BTreeMap<ServerId, State>,
}

impl CatchUpScheduler {
    pub fn new(policy: CatchUpPolicy) -> Self {
        Self {
            policy,
            nodes: BTreeMap::new(),
        }
    }

    pub fn policy(&self) -> CatchUpPolicy {
        self.policy
    }

    /// `node` is back at `now_ms` after being down or restarting. A catch-up already
    /// running for it is void (its state is as of its last applied change set).
    pub fn handle_recovered(&mut self, node: ServerId, now_ms: u64) {
        let due = match self.policy {
            CatchUpPolicy::Immediate => Some(now_ms),
            CatchUpPolicy::At(t) => Some(t.max(now_ms)),
            CatchUpPolicy::OnCommand => None,
        };
        // A restart while waiting keeps the earlier due time if there was one.
        let due = match self.nodes.get(&node) {
            Some(State::Waiting(Some(d))) => Some(*d),
            _ => due,
        };
        self.nodes.insert(node, State::Waiting(due));
    }

    /// `node` went down: nothing runs for it; it is scheduled again when it recovers.
    pub fn handle_down(&mut self, node: ServerId) {
        self.nodes.remove(&node);
    }

    /// An operator's command: catch `node` up now (also one that is not waiting: a
    /// manual full reconcile), or with `None` every waiting node. Returns how many
    /// became due.
    pub fn handle_command(&mut self, node: Option<ServerId>, now_ms: u64) -> usize {
        match node {
            Some(n) => match self.nodes.get(&n) {
                Some(State::Running) => 0,
                _ => {
                    self.nodes.insert(n, State::Waiting(Some(now_ms)));
                    1
                }
            },
            None => {
                let mut n = 0;
                for s in self.nodes.values_mut() {
                    if let State::Waiting(due) = s
                        && due.is_none_or(|d| d > now_ms)
                    {
                        *due = Some(now_ms);
                        n += 1;
                    }
                }
                n
            }
        }
    }

    /// The next node whose catch-up is due at `now_ms` (smallest id first); it is
    /// running until [`handle_done`](Self::handle_done) or
    /// [`handle_failed`](Self::handle_failed).
    pub fn poll_due(&mut self, now_ms: u64) -> Option<ServerId> {
        let (&n, s) = self
            .nodes
            .iter_mut()
            .find(|(_, s)| matches!(s, State::Waiting(Some(d)) if *d <= now_ms))?;
        *s = State::Running;
        Some(n)
    }

    /// The catch-up of `node` completed: it is current and may relay again.
    pub fn handle_done(&mut self, node: ServerId) {
        if self.nodes.get(&node) == Some(&State::Running) {
            self.nodes.remove(&node);
        }
    }

    /// The catch-up of `node` failed (its peer went away, a link broke): try again at
    /// `retry_at_ms`.
    pub fn handle_failed(&mut self, node: ServerId, retry_at_ms: u64) {
        if let Some(s) = self.nodes.get_mut(&node)
            && *s == State::Running
        {
            *s = State::Waiting(Some(retry_at_ms));
        }
    }

    /// The earliest time a waiting node becomes due (possibly past); `None` if none
    /// will without a command.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.nodes
            .values()
            .filter_map(|s| match s {
                State::Waiting(d) => *d,
                State::Running => None,
            })
            .min()
    }

    /// `node` still has to catch up (waiting or running).
    pub fn is_pending(&self, node: ServerId) -> bool {
        self.nodes.contains_key(&node)
    }

    /// `node` waits for a command (or for its time, when the caller turns a schedule
    /// into commands): it is not to be routed until then.
    pub fn is_held(&self, node: ServerId) -> bool {
        self.nodes.get(&node) == Some(&State::Waiting(None))
    }

    /// `node` caught up by other means (a full sync job reached it): nothing pending.
    pub fn forget(&mut self, node: ServerId) {
        self.nodes.remove(&node);
    }

    /// Nodes that still have to catch up, in id order.
    pub fn pending(&self) -> impl Iterator<Item = ServerId> {
        self.nodes.keys().copied()
    }

    /// The health to route `node` with: a node still to catch up does not relay.
    pub fn route_health(&self, node: ServerId, reported: Health) -> Health {
        if reported == Health::Up && self.is_pending(node) {
            Health::Degraded
        } else {
            reported
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{ServerSpec, Topology};

    fn ids() -> (ServerId, ServerId) {
        let t = Topology::new([
            ServerSpec::new("a", "r", "g", 1),
            ServerSpec::new("b", "r", "g", 1),
        ])
        .unwrap();
        (t.id("a").unwrap(), t.id("b").unwrap())
    }

    #[test]
    fn immediate() {
        let (a, _) = ids();
        let mut s = CatchUpScheduler::new(CatchUpPolicy::Immediate);
        s.handle_recovered(a, 100);
        assert_eq!(s.poll_timeout(), Some(100));
        assert_eq!(s.route_health(a, Health::Up), Health::Degraded);
        assert_eq!(s.poll_due(100), Some(a));
        assert_eq!(s.poll_due(100), None);
        // Still stale while running.
        assert_eq!(s.route_health(a, Health::Up), Health::Degraded);
        s.handle_done(a);
        assert_eq!(s.route_health(a, Health::Up), Health::Up);
        assert!(!s.is_pending(a));
    }

    #[test]
    fn scheduled_waits_for_its_time_unless_past() {
        let (a, b) = ids();
        let mut s = CatchUpScheduler::new(CatchUpPolicy::At(1_000));
        s.handle_recovered(a, 100);
        assert_eq!(s.poll_due(999), None);
        assert_eq!(s.poll_timeout(), Some(1_000));
        s.handle_recovered(b, 2_000);
        assert_eq!(s.poll_due(2_000), Some(a));
        assert_eq!(s.poll_due(2_000), Some(b));
    }

    #[test]
    fn on_command_waits_for_the_command() {
        let (a, b) = ids();
        let mut s = CatchUpScheduler::new(CatchUpPolicy::OnCommand);
        s.handle_recovered(a, 100);
        s.handle_recovered(b, 100);
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(s.poll_due(u64::MAX), None);
        assert_eq!(s.handle_command(Some(b), 500), 1);
        assert_eq!(s.poll_due(500), Some(b));
        assert_eq!(s.handle_command(None, 600), 1);
        assert_eq!(s.poll_due(600), Some(a));
        assert_eq!(s.route_health(a, Health::Degraded), Health::Degraded);
        assert_eq!(s.route_health(a, Health::Down), Health::Down);
    }

    #[test]
    fn held_until_commanded_and_forgotten_when_caught_up_otherwise() {
        let (a, b) = ids();
        let mut s = CatchUpScheduler::new(CatchUpPolicy::OnCommand);
        s.handle_recovered(a, 0);
        s.handle_recovered(b, 0);
        assert!(s.is_held(a) && s.is_held(b));
        s.handle_command(Some(a), 10);
        assert!(!s.is_held(a), "due: no longer held");
        s.forget(b);
        assert!(!s.is_pending(b) && !s.is_held(b));
        assert_eq!(s.poll_due(10), Some(a));
        assert_eq!(s.poll_due(10), None);
    }

    #[test]
    fn failure_retries_and_down_cancels() {
        let (a, b) = ids();
        let mut s = CatchUpScheduler::new(CatchUpPolicy::Immediate);
        s.handle_recovered(a, 0);
        assert_eq!(s.poll_due(0), Some(a));
        s.handle_failed(a, 50);
        assert_eq!(s.poll_due(49), None);
        assert_eq!(s.poll_due(50), Some(a));
        // Down while running: nothing pending; back again: scheduled again.
        s.handle_down(a);
        assert!(!s.is_pending(a));
        s.handle_done(a);
        s.handle_recovered(a, 70);
        assert_eq!(s.pending().collect::<Vec<_>>(), [a]);
        // A done report for a node that is not running (late, stale) changes nothing.
        s.handle_done(a);
        assert!(s.is_pending(a));
        // A manual catch-up of a node that is current.
        assert_eq!(s.handle_command(Some(b), 80), 1);
        assert_eq!(s.poll_due(80), Some(a));
        assert_eq!(s.poll_due(80), Some(b));
    }
}
