//! Admission control: a bucket and a queue per (organization, model), and the reservation a
//! request holds while it runs.
//!
//! A reservation has exactly two exits: settled against the actual usage once the upstream
//! has answered, or refunded when dropped before the request reached the upstream (client
//! gone, rejected, failed before sending).

pub mod bucket;
pub mod gate;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{Accounting, QueueConfig};
use crate::queue::{BucketQueue, Evidence, Mark, Priority, QueueBounds, RateLimited, Rejection};
use crate::upstream::ratelimit::RateLimitHeaders;
use bucket::{Cost, Limits};
use gate::Probe;

/// Buckets sluice keeps at most. Org and model names come from requests (keys, model
/// fields), so without a bound a stream of made-up names would grow the map forever; past
/// it, new (org, model) pairs are forwarded unmetered.
const MAX_BUCKETS: usize = 10_000;

/// Buckets by org, then by model.
type Buckets = HashMap<Arc<str>, HashMap<Arc<str>, Arc<BucketQueue>>>;

/// Every bucket, by org then model.
pub struct Limiter {
    buckets: RwLock<Buckets>,
    count: AtomicUsize,
    bounds: Arc<QueueBounds>,
}

impl Limiter {
    pub fn new(config: &QueueConfig, circuit_threshold: u32) -> Self {
        Self {
            buckets: RwLock::new(HashMap::new()),
            count: AtomicUsize::new(0),
            bounds: Arc::new(QueueBounds::new(config, circuit_threshold)),
        }
    }

    /// Takes a reloaded configuration: new queue bounds, and each configured org's new limits
    /// (`limits_of(org, model)`) in its existing buckets, which keep what they have spent and
    /// let their queues move on at once if the limits rose.
    pub fn reconfigure(
        &self,
        config: &QueueConfig,
        generation: u64,
        limits_of: impl Fn(&str, &str) -> Limits,
    ) {
        self.bounds.update(config);
        for queue in self.buckets() {
            queue.set_limits(limits_of(&queue.org, &queue.model), generation);
        }
    }

    /// The bucket of (org, model), created with `limits` on first use; an existing bucket
    /// takes `limits` in place (keeping what it has spent) if they changed and come from a
    /// configuration (`generation`) no older than its own. A new bucket
    /// without limits is created only to `learn` them, and only while fewer than
    /// [`MAX_BUCKETS`] exist; otherwise `None`: nothing meters the pair.
    pub fn bucket(
        &self,
        org: &Arc<str>,
        model: &str,
        limits: Limits,
        generation: u64,
        learn: bool,
    ) -> Option<Arc<BucketQueue>> {
        let existing = self
            .buckets
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(org)
            .and_then(|models| models.get(model))
            .cloned();
        if let Some(queue) = existing {
            queue.set_limits(limits, generation);
            return Some(queue);
        }
        if limits.is_empty() && !learn {
            return None;
        }
        let mut buckets = self
            .buckets
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(queue) = buckets.get(org).and_then(|models| models.get(model)) {
            return Some(Arc::clone(queue));
        }
        if self.count.load(Ordering::Relaxed) >= MAX_BUCKETS {
            return None;
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let queue = Arc::new(BucketQueue::new(
            Arc::clone(org),
            Arc::from(model),
            limits,
            learn,
            Arc::clone(&self.bounds),
        ));
        queue.set_limits(limits, generation);
        buckets
            .entry(Arc::clone(org))
            .or_default()
            .insert(Arc::from(model), Arc::clone(&queue));
        Some(queue)
    }

    /// Waits for `cost` in the bucket of (org, model) and returns the reservation holding it;
    /// `None` when no bucket meters the pair (see [`Limiter::bucket`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn admit(
        &self,
        org: &Arc<str>,
        model: &str,
        limits: Limits,
        generation: u64,
        learn: bool,
        cost: Cost,
        priority: Priority,
        deadline: Instant,
    ) -> Result<Option<Reservation>, Rejection> {
        let Some(queue) = self.bucket(org, model, limits, generation, learn) else {
            return Ok(None);
        };
        let admitted = queue.admit(cost, priority, deadline).await?;
        Ok(Some(Reservation {
            queue,
            cost,
            reached_upstream: false,
            waited: admitted.waited,
            probe: admitted.probe,
            mark: None,
        }))
    }

    /// Every bucket, for status and metrics.
    pub fn buckets(&self) -> Vec<Arc<BucketQueue>> {
        self.buckets
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .flat_map(|models| models.values().cloned())
            .collect()
    }
}

/// Budget taken from a bucket for one request.
#[must_use = "a reservation is refunded when dropped; settle it once the upstream answered"]
pub struct Reservation {
    queue: Arc<BucketQueue>,
    cost: Cost,
    reached_upstream: bool,
    /// Time spent queued before admission (and before re-sends after 429s).
    pub waited: Duration,
    /// Set while this request is its bucket's probe (learning limits, or testing a circuit).
    probe: Option<Probe>,
    /// When it was last sent upstream.
    mark: Option<Mark>,
}

impl Reservation {
    pub fn cost(&self) -> Cost {
        self.cost
    }

    pub fn bucket(&self) -> &Arc<BucketQueue> {
        &self.queue
    }

    /// The request is on its way upstream (again, for a re-send): the provider counts it
    /// from now on, so dropping the reservation no longer refunds it.
    pub fn dispatch(&mut self) {
        self.reached_upstream = true;
        self.mark = Some(self.queue.dispatched(self.cost));
    }

    /// Corrects the bucket with the rate-limit headers of this request's response.
    pub fn observe(&self, headers: &RateLimitHeaders) {
        if let Some(mark) = self.mark {
            self.queue.observe(mark, headers);
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
        reason: &'static str,
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
        // The refused attempt was counted as a request, not for its tokens (PROTOCOL §1).
        let again = Cost {
            requests: self.cost.requests,
            tokens: 0,
        };
        let result = self.queue.replay(again, deadline).await;
        self.waited += started.elapsed();
        self.probe = result?;
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

    /// Corrects the reservation by `delta` tokens once the actual usage is known: positive is
    /// charged (debt if the bucket is short), negative refunded.
    pub fn settle(mut self, delta: i64) {
        self.reached_upstream = true;
        if delta > 0 {
            self.queue.charge(Cost {
                requests: 0,
                tokens: delta.unsigned_abs(),
            });
        } else if delta < 0 {
            self.queue.give_back(Cost {
                requests: 0,
                tokens: delta.unsigned_abs(),
            });
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(probe) = self.probe.take() {
            self.queue.abandon_probe(probe);
        }
        if !self.reached_upstream {
            self.queue.give_back(self.cost);
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
pub fn settlement(
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
    use bucket::Resource;
    use std::time::Duration;

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

    impl Limiter {
        fn test_queue_config() -> QueueConfig {
            QueueConfig {
                max_wait: Duration::from_secs(60),
                max_depth: 10,
                max_depth_per_bucket: 10,
                interactive_reserve: 0.0,
                client_timeout_margin: Duration::from_secs(2),
                refill_margin: Duration::ZERO,
                relearn_interval: Duration::from_secs(60),
            }
        }
    }

    fn limiter() -> Limiter {
        Limiter::new(&Limiter::test_queue_config(), 3)
    }

    fn tpm(tokens: u64) -> Limits {
        Limits {
            tpm: Some(tokens),
            ..Limits::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reservation_has_exactly_two_exits() {
        let limiter = &limiter();
        let org: &Arc<str> = &Arc::from("acme");
        let far = Instant::now() + Duration::from_secs(60);
        let admit = |tokens| async move {
            limiter
                .admit(
                    org,
                    "m",
                    tpm(1000),
                    0,
                    false,
                    Cost::request(tokens),
                    Priority::Interactive,
                    far,
                )
                .await
                .map(|reservation| reservation.expect("a limited bucket"))
        };
        let tokens = || {
            limiter
                .bucket(org, "m", tpm(1000), 0, false)
                .expect("limited")
                .available(Resource::Tokens)
        };

        // Dropped before reaching the upstream: refunded.
        drop(admit(600).await.expect("fits"));
        assert_eq!(tokens(), Some(1000.0));
        // Refused connection: refunded, even after being marked as sent.
        let mut reservation = admit(600).await.expect("fits");
        reservation.dispatch();
        reservation.refund();
        assert_eq!(tokens(), Some(1000.0));
        // Reached the upstream, then dropped without usage: stays spent.
        let mut reservation = admit(600).await.expect("fits");
        reservation.dispatch();
        drop(reservation);
        assert_eq!(tokens(), Some(400.0));
        // Settled: usage above the estimate is debt, below it a refund.
        admit(300).await.expect("fits").settle(250);
        assert_eq!(tokens(), Some(-150.0));
        // Debt is paid back by the refill like any other spending: 30 s at 1000/min is 500.
        let before = tokens().expect("limited");
        tokio::time::advance(Duration::from_secs(30)).await;
        let after = tokens().expect("limited");
        assert!((after - before - 500.0).abs() < 1e-6, "{before} -> {after}");
        assert!((after - 350.0).abs() < 1e-6, "{after}");
        admit(300).await.expect("fits").settle(-100);
        assert!((tokens().expect("limited") - 150.0).abs() < 1e-6);
    }

    #[tokio::test(start_paused = true)]
    async fn limits_from_an_older_configuration_do_not_undo_a_reload() {
        let limiter = limiter();
        let org: Arc<str> = Arc::from("acme");
        let configured = |limiter: &Limiter| {
            limiter
                .bucket(&org, "m", tpm(1), 0, false)
                .expect("limited")
                .status()
                .configured
        };
        limiter.bucket(&org, "m", tpm(1000), 0, false);
        // The reload (generation 1) sets 5000 on the existing bucket...
        limiter.reconfigure(&Limiter::test_queue_config(), 1, |_, _| tpm(5000));
        assert_eq!(configured(&limiter), tpm(5000));
        // ...and a request that read the configuration before it cannot put 1000 back.
        limiter.bucket(&org, "m", tpm(1000), 0, false);
        assert_eq!(configured(&limiter), tpm(5000));
        // The next configuration's requests set theirs.
        limiter.bucket(&org, "m", tpm(7000), 1, false);
        assert_eq!(configured(&limiter), tpm(7000));
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
