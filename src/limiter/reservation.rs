//! The reservation a request holds from admission to the end of its exchange: the budget
//! it took, charged once it reaches the upstream and settled against the actual usage.
//!
//! A reservation has exactly two exits: settled once the upstream has answered, or refunded
//! when dropped before the request reached the upstream (client gone, rejected, failed
//! before sending).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Accounting;
use crate::upstream::ratelimit::{RateLimitHeaders, Reason};
use crate::upstream::usage::Usage;

use super::bucket::Cost;
use super::budget::{Evidence, RateLimited, Settle, Ticket};
use super::gate::Probe;
use super::learn::Mark;
use super::queue::{Admitted, BucketQueue};
use super::store::Correction;

/// Budget taken from a bucket for one request.
#[must_use = "a reservation is refunded when dropped; settle it once the upstream answered"]
pub struct Reservation {
    queue: Arc<BucketQueue>,
    /// What the budget knows this reservation by.
    ticket: Ticket,
    cost: Cost,
    reached_upstream: bool,
    /// Time spent queued before admission (and before re-sends after 429s).
    pub waited: Duration,
    /// Set while this request is its bucket's probe (learning limits, or testing a circuit).
    probe: Option<Probe>,
    /// When it was last sent upstream.
    mark: Option<Mark>,
    /// The shared store's correction from its response's headers, sent with the settlement.
    correction: Option<Correction>,
}

impl Reservation {
    /// The reservation of a request `queue` admitted at `cost`.
    pub(super) fn new(queue: Arc<BucketQueue>, cost: Cost, admitted: Admitted) -> Self {
        Self {
            queue,
            ticket: admitted.ticket,
            cost,
            reached_upstream: false,
            waited: admitted.waited,
            probe: admitted.probe,
            mark: None,
            correction: None,
        }
    }

    pub fn cost(&self) -> Cost {
        self.cost
    }

    /// The request is on its way upstream (again, for a re-send): the provider counts it
    /// from now on, so dropping the reservation no longer refunds it.
    pub fn dispatch(&mut self) {
        self.reached_upstream = true;
        self.mark = Some(self.queue.dispatched(self.cost));
    }

    /// Corrects the bucket with the rate-limit headers of this request's response.
    pub fn observe(&mut self, headers: &RateLimitHeaders) {
        if let Some(mark) = self.mark {
            let correction = self.queue.observe(mark, self.ticket.sent(), headers);
            if correction.is_some() {
                self.correction = correction;
            }
        }
    }

    /// The upstream answered without a rate limit.
    pub fn answered(&mut self) {
        self.queue.answered(self.probe.take());
    }

    /// The upstream answered 429; see [`BucketQueue::rate_limited`]. Returns whether the
    /// bucket's circuit opened.
    pub fn rate_limited(
        &mut self,
        resume: Instant,
        reset: Instant,
        evidence: Evidence,
        reason: Reason,
    ) -> bool {
        self.queue.rate_limited(RateLimited {
            resume,
            reset,
            evidence,
            probe: self.probe.take(),
            reason,
        })
    }

    /// Waits, keeping the budget and the head of the line, until the request may be sent
    /// again (spending one more request of the bucket: the refused attempt counted);
    /// `Err` with the remaining wait when that is after `deadline`.
    pub async fn replay(&mut self, deadline: Instant) -> Result<(), Duration> {
        let started = Instant::now();
        // The refused attempt was counted as a request, not for its tokens (docs/upstream.md §1).
        let again = Cost {
            requests: self.cost.requests,
            tokens: 0,
        };
        let result = self.queue.replay(again, deadline).await;
        self.waited += started.elapsed();
        let (probe, sent) = result?;
        self.probe = probe;
        self.ticket.resent(sent);
        Ok(())
    }

    /// Gives the whole reservation back: the request turned out never to reach the upstream
    /// (its connection was refused).
    pub fn refund(mut self) {
        self.reached_upstream = false;
        if let Some(mark) = self.mark.take() {
            self.queue.undispatched(mark);
        }
    }

    /// Settles the reservation of an exchange that is over, by what it showed: a 429 or an
    /// exchange without usage keeps the whole charge; usage trues it up (see [`settlement`]).
    pub fn close(
        self,
        charged: Charged,
        accounting: Accounting,
        rate_limited: bool,
        usage: Option<Usage>,
    ) {
        match usage {
            // The upstream had less budget than sluice thought: keep the whole charge, so the
            // requests queued behind do not follow straight into more 429s.
            _ if rate_limited => self.settle(0),
            Some(usage) => self.settle(settlement(
                charged,
                usage.prompt_tokens,
                usage.completion_tokens,
                accounting,
            )),
            // No usage seen (an error status, a broken stream): keep the estimate charged,
            // the conservative choice.
            None => self.settle(0),
        }
    }

    /// Corrects the reservation by `delta` tokens once the actual usage is known: positive is
    /// charged (debt if the bucket is short), negative refunded.
    pub fn settle(mut self, delta: i64) {
        self.reached_upstream = true;
        let tokens = Cost {
            requests: 0,
            tokens: delta.unsigned_abs(),
        };
        let correction = self.correction.take();
        if delta > 0 {
            self.queue
                .settle(self.ticket, Settle::Debt(tokens), correction);
        } else if delta < 0 || correction.is_some() {
            self.queue
                .settle(self.ticket, Settle::Refund(tokens), correction);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(probe) = self.probe.take() {
            self.queue.abandon_probe(probe);
        }
        if !self.reached_upstream {
            self.queue
                .settle(self.ticket, Settle::Refund(self.cost), None);
        }
    }
}

/// What a request was charged at admission, split as settlement needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Charged {
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    /// Whether `output_tokens` is a cap the request set (the provider charges it whole) or
    /// sluice's own default for a request without a cap (a guess, trued up to the usage).
    pub output_capped: bool,
}

/// The token correction once actual usage is known (positive: charge more; negative: refund).
///
/// `Reserved` (OpenAI): the provider keeps a capped output charged whatever was generated, so
/// only the prompt estimate is corrected, in both directions. An uncapped output was sluice's
/// guess and is trued up. `Actual`: everything is trued up to the usage.
pub(crate) fn settlement(
    charged: Charged,
    prompt_tokens: u64,
    completion_tokens: u64,
    accounting: Accounting,
) -> i64 {
    let prompt_delta = prompt_tokens as i64 - charged.prompt_tokens as i64;
    let output_delta = completion_tokens as i64 - charged.output_tokens as i64;
    match accounting {
        Accounting::Reserved if charged.output_capped => prompt_delta,
        Accounting::Reserved | Accounting::Actual => prompt_delta + output_delta,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_accounting_keeps_the_cap_and_corrects_the_prompt() {
        let charged = Charged {
            prompt_tokens: 100,
            output_tokens: 4000,
            output_capped: true,
        };
        assert_eq!(settlement(charged, 90, 200, Accounting::Reserved), -10);
        assert_eq!(settlement(charged, 130, 200, Accounting::Reserved), 30);
        assert_eq!(settlement(charged, 90, 200, Accounting::Actual), -10 - 3800);
    }

    #[test]
    fn an_uncapped_default_is_trued_up() {
        let charged = Charged {
            prompt_tokens: 100,
            output_tokens: 1024,
            output_capped: false,
        };
        assert_eq!(settlement(charged, 100, 24, Accounting::Reserved), -1000);
        assert_eq!(settlement(charged, 100, 2024, Accounting::Reserved), 1000);
    }
}
