//! Admission control: a bucket and a queue per (organization, model), and the reservation a
//! request holds while it runs.
//!
//! A reservation has exactly two exits: settled against the actual usage once the upstream
//! has answered, or refunded when dropped before the request reached the upstream (client
//! gone, rejected, failed before sending).

pub mod bucket;

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{Accounting, QueueConfig};
use crate::queue::{BucketQueue, Priority, QueueBounds, Rejection};
use bucket::{Cost, Limits};

/// Buckets by org, then by model.
type Buckets = HashMap<Arc<str>, HashMap<Arc<str>, Arc<BucketQueue>>>;

/// Every bucket, by org then model.
pub struct Limiter {
    buckets: RwLock<Buckets>,
    bounds: Arc<QueueBounds>,
}

impl Limiter {
    pub fn new(config: &QueueConfig) -> Self {
        Self {
            buckets: RwLock::new(HashMap::new()),
            bounds: Arc::new(QueueBounds {
                max_depth: config.max_depth,
                max_depth_per_bucket: config.max_depth_per_bucket,
                interactive_reserve: config.interactive_reserve,
                refill_margin: config.refill_margin,
                depth: AtomicUsize::new(0),
            }),
        }
    }

    /// The bucket of (org, model), created with `limits` on first use; an existing bucket
    /// takes `limits` in place (keeping what it has spent) if they changed.
    pub fn bucket(&self, org: &Arc<str>, model: &str, limits: Limits) -> Arc<BucketQueue> {
        let existing = self
            .buckets
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(org)
            .and_then(|models| models.get(model))
            .cloned();
        if let Some(queue) = existing {
            queue.set_limits(limits);
            return queue;
        }
        let mut buckets = self
            .buckets
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let queue = buckets
            .entry(Arc::clone(org))
            .or_default()
            .entry(Arc::from(model))
            .or_insert_with(|| {
                Arc::new(BucketQueue::new(
                    Arc::clone(org),
                    Arc::from(model),
                    limits,
                    Arc::clone(&self.bounds),
                ))
            });
        Arc::clone(queue)
    }

    /// Waits for `cost` in the bucket of (org, model) and returns the reservation holding it.
    pub async fn admit(
        &self,
        org: &Arc<str>,
        model: &str,
        limits: Limits,
        cost: Cost,
        priority: Priority,
        deadline: Instant,
    ) -> Result<Reservation, Rejection> {
        let queue = self.bucket(org, model, limits);
        let waited = queue.admit(cost, priority, deadline).await?;
        Ok(Reservation {
            queue,
            cost,
            reached_upstream: false,
            waited,
        })
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
    /// Time spent queued before admission.
    pub waited: Duration,
}

impl Reservation {
    pub fn cost(&self) -> Cost {
        self.cost
    }

    /// The request is on its way upstream: the provider counts it from now on, so dropping
    /// the reservation no longer refunds it.
    pub fn reached_upstream(&mut self) {
        self.reached_upstream = true;
    }

    /// Gives the whole reservation back: the request turned out never to reach the upstream
    /// (its connection was refused).
    pub fn refund(mut self) {
        self.reached_upstream = false;
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

    fn limiter() -> Limiter {
        Limiter::new(&QueueConfig {
            max_wait: Duration::from_secs(60),
            max_depth: 10,
            max_depth_per_bucket: 10,
            interactive_reserve: 0.0,
            client_timeout_margin: Duration::from_secs(2),
            refill_margin: Duration::ZERO,
        })
    }

    fn tpm(tokens: u64) -> Limits {
        Limits {
            tpm: Some(tokens),
            ..Limits::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reservation_has_exactly_two_exits() {
        use bucket::Resource;
        let limiter = limiter();
        let org: Arc<str> = Arc::from("acme");
        let far = Instant::now() + Duration::from_secs(60);
        let admit = |tokens| {
            limiter.admit(
                &org,
                "m",
                tpm(1000),
                Cost::request(tokens),
                Priority::Interactive,
                far,
            )
        };
        let tokens = || {
            limiter
                .bucket(&org, "m", tpm(1000))
                .available(Resource::Tokens)
        };

        // Dropped before reaching the upstream: refunded.
        drop(admit(600).await.expect("fits"));
        assert_eq!(tokens(), Some(1000.0));
        // Refused connection: refunded, even after being marked as sent.
        let mut reservation = admit(600).await.expect("fits");
        reservation.reached_upstream();
        reservation.refund();
        assert_eq!(tokens(), Some(1000.0));
        // Reached the upstream, then dropped without usage: stays spent.
        let mut reservation = admit(600).await.expect("fits");
        reservation.reached_upstream();
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
