//! Whether a bucket may send anything upstream right now, apart from its budget: paused by a
//! 429's hint, stopped by the circuit breaker, or still learning its limits from a first
//! request. Pure state: every method takes `now`.
//!
//! Requests that already hold a reservation and wait to be re-sent after a 429 (replays) go
//! before anything new: they keep their place at the head of the line.

use std::time::Duration;

use tokio::time::Instant;

/// What a dispatch must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pass {
    /// Go now; a probe tells the gate how it went ([`Gate::finish_probe`]).
    Go(Option<Probe>),
    /// Nothing may go before this instant.
    Until(Instant),
    /// Waiting on a probe's outcome (or on replays ahead), with no known end.
    Hold,
}

/// The single request a gate lets through to learn something.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// The first request of a bucket whose limits are unknown: its headers teach them.
    Learning,
    /// The one request after the circuit's pause: it closes the circuit or opens it again.
    Circuit,
    /// The one request beyond the proven part of the bucket's burst: its answer proves the
    /// burst, or its 429 shows a quantized limit (see [`crate::limiter::bucket`]).
    Burst,
}

/// How a probe's request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProbeOutcome {
    /// The upstream answered without a rate limit.
    Answered,
    /// The upstream answered 429 (rate limit or slow down).
    RateLimited,
    /// It never got an answer (cancelled, connection failed).
    Abandoned,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Circuit {
    Closed,
    /// Stopped until the reset the upstream announced.
    Open {
        until: Instant,
    },
    /// One request is let through (`probing` once it is out).
    HalfOpen {
        probing: bool,
    },
}

#[derive(Clone, Copy, Debug)]
struct Learning {
    probing: bool,
    since: Instant,
}

/// How long requests wait behind a learning probe before going anyway: a probe whose
/// response takes long (a non-streaming generation) must not hold a whole burst hostage, and
/// sluice not knowing a limit is no reason to fail a request.
pub(crate) const LEARNING_PATIENCE: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub(crate) struct Gate {
    paused_until: Option<Instant>,
    circuit: Circuit,
    consecutive_429: u32,
    /// Consecutive 429s that open the circuit.
    threshold: u32,
    learning: Option<Learning>,
    /// Requests holding a reservation, waiting to be sent again.
    replays: u32,
    /// A [`Probe::Burst`] is out.
    burst_probing: bool,
}

impl Gate {
    /// `learning`: the bucket's limits are unknown, so its first request goes alone.
    pub(crate) fn new(learning: bool, threshold: u32, now: Instant) -> Self {
        Self {
            paused_until: None,
            circuit: Circuit::Closed,
            consecutive_429: 0,
            threshold: threshold.max(1),
            learning: learning.then_some(Learning {
                probing: false,
                since: now,
            }),
            replays: 0,
            burst_probing: false,
        }
    }

    /// Whether a dispatch may go now. `replay` is a request re-sent after a 429: it passes
    /// before new requests and is not held by learning.
    pub(crate) fn check(&mut self, replay: bool, now: Instant) -> Pass {
        if let Some(until) = self.paused_until {
            if until > now {
                return Pass::Until(until);
            }
            self.paused_until = None;
        }
        if let Circuit::Open { until } = self.circuit {
            if until > now {
                return Pass::Until(until);
            }
            self.circuit = Circuit::HalfOpen { probing: false };
        }
        if !replay && self.replays > 0 {
            return Pass::Hold;
        }
        match self.circuit {
            Circuit::HalfOpen { probing: true } => return Pass::Hold,
            Circuit::HalfOpen { probing: false } => return Pass::Go(Some(Probe::Circuit)),
            Circuit::Closed | Circuit::Open { .. } => {}
        }
        match self.learning {
            Some(learning) if !replay && learning.probing => {
                let patience_ends = learning.since + LEARNING_PATIENCE;
                if now < patience_ends {
                    Pass::Until(patience_ends)
                } else {
                    Pass::Go(None)
                }
            }
            Some(_) if !replay => Pass::Go(Some(Probe::Learning)),
            _ => Pass::Go(None),
        }
    }

    /// The dispatch `check` allowed is going now: a probe takes its slot.
    pub(crate) fn claim(&mut self, probe: Option<Probe>, now: Instant) {
        match probe {
            Some(Probe::Circuit) => self.circuit = Circuit::HalfOpen { probing: true },
            Some(Probe::Learning) => {
                if let Some(learning) = &mut self.learning {
                    learning.probing = true;
                    learning.since = now;
                }
            }
            Some(Probe::Burst) => self.burst_probing = true,
            None => {}
        }
    }

    /// A probe's request ended.
    pub(crate) fn finish_probe(&mut self, probe: Probe, outcome: ProbeOutcome) {
        match (probe, outcome) {
            (Probe::Learning, ProbeOutcome::Abandoned) => {
                if let Some(learning) = &mut self.learning {
                    learning.probing = false;
                }
            }
            // Answered, with limits or without (an upstream that sends none is not metered
            // until one of its responses does).
            (Probe::Learning, _) => self.learning = None,
            (Probe::Circuit, ProbeOutcome::Abandoned) => {
                if self.circuit == (Circuit::HalfOpen { probing: true }) {
                    self.circuit = Circuit::HalfOpen { probing: false };
                }
            }
            // A 429 has already reopened the circuit (see `rate_limited`); an answer closes it.
            (Probe::Circuit, ProbeOutcome::Answered) => self.answered(),
            (Probe::Circuit, ProbeOutcome::RateLimited) => {}
            // The bucket learns what the answer proved (`BucketQueue::answered`,
            // `rate_limited`); the slot is free for the next proof either way.
            (Probe::Burst, _) => self.burst_probing = false,
        }
    }

    /// Whether a [`Probe::Burst`] may go: none is out.
    pub(crate) fn burst_probe_free(&self) -> bool {
        !self.burst_probing
    }

    /// The limits are known now (learned from headers).
    pub(crate) fn learned(&mut self) {
        self.learning = None;
    }

    /// The limits are unknown again (the learned ones aged out): the next request goes alone
    /// to learn them, as a new bucket's first does.
    pub(crate) fn relearn(&mut self, now: Instant) {
        self.learning = Some(Learning {
            probing: false,
            since: now,
        });
    }

    /// Forgets pauses, an open circuit and the run of 429s: the configuration they were
    /// earned under was replaced.
    pub(crate) fn clear_pause(&mut self) {
        self.paused_until = None;
        self.circuit = Circuit::Closed;
        self.consecutive_429 = 0;
    }

    /// Whether the bucket still waits to learn its limits.
    pub(crate) fn is_learning(&self) -> bool {
        self.learning.is_some()
    }

    /// The upstream answered a request without a rate limit.
    pub(crate) fn answered(&mut self) {
        self.consecutive_429 = 0;
        if matches!(self.circuit, Circuit::HalfOpen { .. }) {
            self.circuit = Circuit::Closed;
        }
    }

    /// The upstream answered 429: nothing goes before `resume` (its hint). After `threshold`
    /// consecutive 429s (or one during the half-open probe) the circuit opens until `reset`
    /// (the upstream's announced reset, at least `resume`). Returns whether it opened.
    pub(crate) fn rate_limited(&mut self, resume: Instant, reset: Instant) -> bool {
        self.paused_until = Some(self.paused_until.map_or(resume, |until| until.max(resume)));
        self.consecutive_429 = self.consecutive_429.saturating_add(1);
        let probing = matches!(self.circuit, Circuit::HalfOpen { .. });
        if probing || self.consecutive_429 >= self.threshold {
            let until = reset.max(resume);
            self.circuit = match self.circuit {
                Circuit::Open { until: open } => Circuit::Open {
                    until: open.max(until),
                },
                _ => Circuit::Open { until },
            };
            return true;
        }
        false
    }

    /// Nothing goes before `until` (another replica's 429, seen through the shared store).
    pub(crate) fn pause(&mut self, until: Instant) {
        self.paused_until = Some(self.paused_until.map_or(until, |paused| paused.max(until)));
    }

    /// The end of the current pause or open circuit, if either lies ahead: no dispatch
    /// happens before it.
    pub(crate) fn blocked_until(&self, now: Instant) -> Option<Instant> {
        let open = match self.circuit {
            Circuit::Open { until } => Some(until),
            _ => None,
        };
        [self.paused_until, open]
            .into_iter()
            .flatten()
            .filter(|until| *until > now)
            .max()
    }

    pub(crate) fn circuit(&self) -> Circuit {
        self.circuit
    }

    #[cfg(test)]
    pub(crate) fn is_open(&self) -> bool {
        !matches!(self.circuit, Circuit::Closed)
    }

    pub(crate) fn paused_until(&self) -> Option<Instant> {
        self.paused_until
    }

    pub(crate) fn add_replay(&mut self) {
        self.replays += 1;
    }

    pub(crate) fn remove_replay(&mut self) {
        self.replays = self.replays.saturating_sub(1);
    }

    pub(crate) fn replays(&self) -> u32 {
        self.replays
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn an_open_gate_lets_everything_go() {
        let now = Instant::now();
        let mut gate = Gate::new(false, 3, now);
        assert_eq!(gate.check(false, now), Pass::Go(None));
        assert_eq!(gate.check(true, now), Pass::Go(None));
    }

    #[test]
    fn a_pause_holds_everyone_until_the_hint() {
        let t0 = Instant::now();
        let mut gate = Gate::new(false, 3, t0);
        assert!(!gate.rate_limited(t0 + secs(2), t0 + secs(5)));
        assert_eq!(gate.check(false, t0), Pass::Until(t0 + secs(2)));
        assert_eq!(gate.check(true, t0 + secs(1)), Pass::Until(t0 + secs(2)));
        assert_eq!(gate.blocked_until(t0), Some(t0 + secs(2)));
        // A later 429 with a shorter hint does not shorten the pause.
        gate.rate_limited(t0 + secs(1), t0 + secs(1));
        assert_eq!(gate.check(false, t0), Pass::Until(t0 + secs(2)));
        assert_eq!(gate.check(false, t0 + secs(2)), Pass::Go(None));
        assert_eq!(gate.blocked_until(t0 + secs(2)), None);
    }

    #[test]
    fn replays_go_before_new_requests() {
        let t0 = Instant::now();
        let mut gate = Gate::new(false, 3, t0);
        gate.add_replay();
        assert_eq!(gate.check(false, t0), Pass::Hold);
        assert_eq!(gate.check(true, t0), Pass::Go(None));
        gate.remove_replay();
        assert_eq!(gate.check(false, t0), Pass::Go(None));
    }

    #[test]
    fn the_circuit_opens_after_consecutive_429s_until_the_reset_then_probes_once() {
        let t0 = Instant::now();
        let mut gate = Gate::new(false, 3, t0);
        assert!(!gate.rate_limited(t0 + secs(1), t0 + secs(10)));
        assert!(!gate.rate_limited(t0 + secs(1), t0 + secs(10)));
        assert!(gate.rate_limited(t0 + secs(1), t0 + secs(10)));
        assert_eq!(gate.check(true, t0 + secs(2)), Pass::Until(t0 + secs(10)));
        assert!(gate.is_open());
        // At the reset one request goes; everything else holds until it is answered.
        let at_reset = t0 + secs(10);
        let Pass::Go(Some(Probe::Circuit)) = gate.check(false, at_reset) else {
            panic!("one probe after the reset");
        };
        gate.claim(Some(Probe::Circuit), at_reset);
        assert_eq!(gate.check(false, at_reset), Pass::Hold);
        assert_eq!(gate.check(true, at_reset), Pass::Hold);
        gate.finish_probe(Probe::Circuit, ProbeOutcome::Answered);
        assert_eq!(gate.circuit(), Circuit::Closed);
        assert_eq!(gate.check(false, at_reset), Pass::Go(None));
    }

    #[test]
    fn an_answer_resets_the_count_of_consecutive_429s() {
        let t0 = Instant::now();
        let mut gate = Gate::new(false, 3, t0);
        gate.rate_limited(t0, t0);
        gate.rate_limited(t0, t0);
        gate.answered();
        assert!(!gate.rate_limited(t0, t0));
        assert_eq!(gate.circuit(), Circuit::Closed);
    }

    #[test]
    fn a_429_during_the_probe_reopens_the_circuit() {
        let t0 = Instant::now();
        let mut gate = Gate::new(false, 1, t0);
        assert!(gate.rate_limited(t0 + secs(1), t0 + secs(4)));
        let probe_at = t0 + secs(4);
        assert_eq!(gate.check(false, probe_at), Pass::Go(Some(Probe::Circuit)));
        gate.claim(Some(Probe::Circuit), probe_at);
        assert!(gate.rate_limited(probe_at + secs(1), probe_at + secs(3)));
        gate.finish_probe(Probe::Circuit, ProbeOutcome::RateLimited);
        assert_eq!(
            gate.circuit(),
            Circuit::Open {
                until: probe_at + secs(3)
            }
        );
    }

    #[test]
    fn an_abandoned_probe_frees_its_slot() {
        let t0 = Instant::now();
        let mut gate = Gate::new(false, 1, t0);
        gate.rate_limited(t0, t0 + secs(1));
        let at = t0 + secs(1);
        assert_eq!(gate.check(false, at), Pass::Go(Some(Probe::Circuit)));
        gate.claim(Some(Probe::Circuit), at);
        gate.finish_probe(Probe::Circuit, ProbeOutcome::Abandoned);
        assert_eq!(gate.check(false, at), Pass::Go(Some(Probe::Circuit)));
    }

    #[test]
    fn learning_sends_one_request_first_and_waits_a_bounded_time() {
        let t0 = Instant::now();
        let mut gate = Gate::new(true, 3, t0);
        assert!(gate.is_learning());
        assert_eq!(gate.check(false, t0), Pass::Go(Some(Probe::Learning)));
        gate.claim(Some(Probe::Learning), t0);
        assert_eq!(gate.check(false, t0), Pass::Until(t0 + LEARNING_PATIENCE));
        // A probe that takes too long stops holding the others.
        assert_eq!(gate.check(false, t0 + LEARNING_PATIENCE), Pass::Go(None));
        gate.finish_probe(Probe::Learning, ProbeOutcome::Answered);
        assert!(!gate.is_learning());
    }

    #[test]
    fn a_cancelled_learning_probe_lets_the_next_request_probe() {
        let t0 = Instant::now();
        let mut gate = Gate::new(true, 3, t0);
        gate.claim(Some(Probe::Learning), t0);
        gate.finish_probe(Probe::Learning, ProbeOutcome::Abandoned);
        assert_eq!(gate.check(false, t0), Pass::Go(Some(Probe::Learning)));
        gate.learned();
        assert_eq!(gate.check(false, t0), Pass::Go(None));
    }
}
