//! The limiter OpenAI's headers describe (docs/upstream.md §1), as pure math: `now` is passed in.
//!
//! Each resource is a bucket of capacity `Limit` refilling continuously at `Limit / 60 s`. With a
//! quantum, a second, smaller bucket does the enforcing while the per-minute one keeps feeding
//! the headers, because that is what a client of a quantized OpenAI limit sees.

use std::time::Duration;

use tokio::time::Instant;

use crate::duration::{from_secs, MAX_WAIT};

const WINDOW_SECS: f64 = 60.0;

/// Which limit a 429 is about; it is the error `type` of the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    Requests,
    Tokens,
}

impl Resource {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Resource::Requests => "requests",
            Resource::Tokens => "tokens",
        }
    }
}

/// A continuously refilling level. It may go into debt down to `-capacity`: rejected requests
/// still cost a request, and another client may overspend.
#[derive(Clone, Debug)]
struct Level {
    capacity: f64,
    per_sec: f64,
    level: f64,
    updated: Instant,
}

impl Level {
    fn full(capacity: f64, per_sec: f64, now: Instant) -> Level {
        Level {
            capacity,
            per_sec,
            level: capacity,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * self.per_sec).min(self.capacity);
        self.updated = now;
    }

    /// A charge larger than the whole capacity is admitted from a full level (then it is in
    /// debt); otherwise it could never be admitted at all.
    fn can_take(&self, amount: f64) -> bool {
        amount <= 0.0 || (self.capacity > 0.0 && self.level >= amount.min(self.capacity))
    }

    fn wait_for(&self, amount: f64) -> Duration {
        let needed = amount.min(self.capacity) - self.level;
        if amount <= 0.0 || (needed <= 0.0 && self.capacity > 0.0) {
            Duration::ZERO
        } else if self.per_sec <= 0.0 {
            MAX_WAIT
        } else {
            from_secs(needed / self.per_sec)
        }
    }

    fn until_full(&self) -> Duration {
        self.wait_for(self.capacity)
    }

    fn charge(&mut self, amount: f64) {
        self.level = (self.level - amount).max(-self.capacity);
    }

    /// Changes the size and keeps what has been used.
    fn resize(&mut self, capacity: f64, per_sec: f64) {
        let used = self.capacity - self.level;
        self.capacity = capacity;
        self.per_sec = per_sec;
        self.level = (capacity - used).clamp(-capacity, capacity);
    }
}

/// One resource (requests or tokens) of one (organization, model).
#[derive(Clone, Debug)]
pub(crate) struct ResourceBucket {
    limit: u64,
    minute: Level,
    /// The enforcing level when quantized; `None` enforces `minute`.
    burst: Option<Level>,
}

impl ResourceBucket {
    pub(crate) fn new(limit: u64, quantum: Option<Duration>, now: Instant) -> ResourceBucket {
        let per_sec = limit as f64 / WINDOW_SECS;
        ResourceBucket {
            limit,
            minute: Level::full(limit as f64, per_sec, now),
            burst: burst_capacity(limit, quantum).map(|cap| Level::full(cap, per_sec, now)),
        }
    }

    fn refill(&mut self, now: Instant) {
        self.minute.refill(now);
        if let Some(burst) = &mut self.burst {
            burst.refill(now);
        }
    }

    fn enforcing(&self) -> &Level {
        self.burst.as_ref().unwrap_or(&self.minute)
    }

    fn can_take(&self, amount: u64) -> bool {
        self.enforcing().can_take(amount as f64)
    }

    fn wait_for(&self, amount: u64) -> Duration {
        self.enforcing().wait_for(amount as f64)
    }

    fn charge(&mut self, amount: u64) {
        self.minute.charge(amount as f64);
        if let Some(burst) = &mut self.burst {
            burst.charge(amount as f64);
        }
    }

    /// What the `x-ratelimit-remaining-*` header shows: floored, never below 0.
    fn remaining(&self) -> u64 {
        let level = self.minute.level.max(0.0).floor();
        (level as u64).min(self.limit)
    }

    fn used(&self) -> u64 {
        self.limit - self.remaining()
    }

    fn set_limit(&mut self, limit: u64, quantum: Option<Duration>, now: Instant) {
        self.refill(now);
        let per_sec = limit as f64 / WINDOW_SECS;
        self.limit = limit;
        self.minute.resize(limit as f64, per_sec);
        self.burst = match (burst_capacity(limit, quantum), self.burst.take()) {
            (Some(cap), Some(mut burst)) => {
                burst.resize(cap, per_sec);
                Some(burst)
            }
            (Some(cap), None) => Some(Level::full(cap, per_sec, now)),
            (None, _) => None,
        };
    }

    fn state(&self) -> ResourceState {
        ResourceState {
            limit: self.limit,
            remaining: self.remaining(),
            reset: self.minute.until_full(),
        }
    }
}

fn burst_capacity(limit: u64, quantum: Option<Duration>) -> Option<f64> {
    let quantum = quantum?.as_secs_f64();
    if quantum >= WINDOW_SECS {
        return None;
    }
    Some((limit as f64 * quantum / WINDOW_SECS).max(1.0))
}

/// What the headers say about one resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ResourceState {
    pub limit: u64,
    pub remaining: u64,
    /// Time until the per-minute bucket is full again.
    pub reset: Duration,
}

/// The `x-ratelimit-*` headers of one response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub requests: ResourceState,
    pub tokens: ResourceState,
}

/// Why a request was turned away, with everything the 429 message states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub resource: Resource,
    /// The request is larger than the whole token limit: it can never succeed.
    pub too_large: bool,
    pub limit: u64,
    pub used: u64,
    pub requested: u64,
    /// Time until the request would fit ("Please try again in ...").
    pub wait: Duration,
}

/// The requests and tokens buckets of one (organization, model).
#[derive(Clone, Debug)]
pub(crate) struct BucketPair {
    requests: ResourceBucket,
    tokens: ResourceBucket,
}

impl BucketPair {
    pub(crate) fn new(rpm: u64, tpm: u64, quantum: Option<Duration>, now: Instant) -> BucketPair {
        BucketPair {
            requests: ResourceBucket::new(rpm, quantum, now),
            tokens: ResourceBucket::new(tpm, quantum, now),
        }
    }

    /// Admits a request costing `cost` tokens, or says why not. Either way one request is
    /// charged, because OpenAI counts rejected requests too; tokens only when admitted. The
    /// snapshot is taken after charging, as OpenAI's headers are.
    pub(crate) fn admit(&mut self, cost: u64, now: Instant) -> (Result<(), Rejection>, Snapshot) {
        self.refill(now);
        let outcome = if !self.requests.can_take(1) {
            Err(Rejection {
                resource: Resource::Requests,
                too_large: false,
                limit: self.requests.limit,
                used: self.requests.used(),
                requested: 1,
                wait: self.requests.wait_for(1),
            })
        } else if cost > self.tokens.limit {
            Err(Rejection {
                resource: Resource::Tokens,
                too_large: true,
                limit: self.tokens.limit,
                used: self.tokens.used(),
                requested: cost,
                wait: Duration::ZERO,
            })
        } else if !self.tokens.can_take(cost) {
            Err(Rejection {
                resource: Resource::Tokens,
                too_large: false,
                limit: self.tokens.limit,
                used: self.tokens.used(),
                requested: cost,
                wait: self.tokens.wait_for(cost),
            })
        } else {
            self.tokens.charge(cost);
            Ok(())
        };
        self.requests.charge(1);
        (outcome, self.snapshot())
    }

    /// Spending by someone else (another client of the same organization).
    pub(crate) fn spend(&mut self, requests: u64, tokens: u64, now: Instant) {
        self.refill(now);
        self.requests.charge(requests);
        self.tokens.charge(tokens);
    }

    /// The current state without charging anything.
    pub(crate) fn peek(&mut self, now: Instant) -> Snapshot {
        self.refill(now);
        self.snapshot()
    }

    pub(crate) fn set_limits(
        &mut self,
        rpm: u64,
        tpm: u64,
        quantum: Option<Duration>,
        now: Instant,
    ) {
        self.requests.set_limit(rpm, quantum, now);
        self.tokens.set_limit(tpm, quantum, now);
    }

    fn refill(&mut self, now: Instant) {
        self.requests.refill(now);
        self.tokens.refill(now);
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            requests: self.requests.state(),
            tokens: self.tokens.state(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn headers_describe_the_state_after_charging() {
        let t0 = Instant::now();
        let mut b = BucketPair::new(500, 40_000, None, t0);
        let (outcome, snap) = b.admit(120, t0);
        assert_eq!(outcome, Ok(()));
        assert_eq!(snap.requests.remaining, 499);
        assert_eq!(snap.tokens.remaining, 39_880);
        // docs/upstream.md §1: 500/499 gives 120ms, 40000/39880 gives 180ms.
        assert_eq!(snap.requests.reset, secs(0.12));
        assert_eq!(crate::go_duration(snap.tokens.reset), "180ms");
    }

    #[test]
    fn refills_continuously_up_to_the_limit() {
        let t0 = Instant::now();
        let mut b = BucketPair::new(60, 600, None, t0);
        b.spend(30, 300, t0);
        let snap = b.peek(t0 + secs(10.0));
        assert_eq!(snap.requests.remaining, 40);
        assert_eq!(snap.tokens.remaining, 400);
        let snap = b.peek(t0 + secs(1000.0));
        assert_eq!(snap.requests.remaining, 60);
        assert_eq!(snap.tokens.reset, Duration::ZERO);
    }

    #[test]
    fn third_request_over_an_rpm_of_two_is_rejected_and_still_counts() {
        let t0 = Instant::now();
        let mut b = BucketPair::new(2, 1_000, None, t0);
        assert!(b.admit(1, t0).0.is_ok());
        assert!(b.admit(1, t0).0.is_ok());
        let (outcome, snap) = b.admit(1, t0);
        let rejection = outcome.expect_err("third request exceeds rpm 2");
        assert_eq!(rejection.resource, Resource::Requests);
        assert_eq!(
            (rejection.limit, rejection.used, rejection.requested),
            (2, 2, 1)
        );
        // (Used + Requested - Limit) * 60 s / Limit
        assert_eq!(rejection.wait, secs(30.0));
        assert_eq!(snap.requests.remaining, 0);
        // The rejected request went into debt: now a full minute until the next fits.
        assert!(b.admit(1, t0 + secs(59.0)).0.is_err());
        assert!(b.admit(1, t0 + secs(61.0 + 30.0)).0.is_ok());
    }

    #[test]
    fn debt_is_floored_at_minus_capacity() {
        let t0 = Instant::now();
        let mut b = BucketPair::new(2, 1_000, None, t0);
        for _ in 0..100 {
            let _ = b.admit(1, t0);
        }
        // From -2, one request fits after (1 - -2) * 30 s = 90 s.
        assert!(b.admit(1, t0 + secs(89.0)).0.is_err());
        assert!(b.admit(1, t0 + secs(89.0 + 2.0 * 30.0 + 31.0)).0.is_ok());
    }

    #[test]
    fn token_wait_matches_the_protocol_example() {
        let t0 = Instant::now();
        let mut b = BucketPair::new(500, 30_000, None, t0);
        b.spend(0, 29_937, t0);
        let rejection = b.admit(385, t0).0.expect_err("385 tokens do not fit in 63");
        assert_eq!(rejection.resource, Resource::Tokens);
        assert!(!rejection.too_large);
        assert_eq!(
            (rejection.limit, rejection.used, rejection.requested),
            (30_000, 29_937, 385)
        );
        assert_eq!(crate::go_duration(rejection.wait), "644ms");
    }

    #[test]
    fn larger_than_the_limit_is_too_large_and_charges_no_tokens() {
        let t0 = Instant::now();
        let mut b = BucketPair::new(500, 30_000, None, t0);
        let (outcome, snap) = b.admit(31_538, t0);
        let rejection = outcome.expect_err("too large");
        assert!(rejection.too_large);
        assert_eq!(rejection.requested, 31_538);
        assert_eq!(snap.tokens.remaining, 30_000);
        assert_eq!(snap.requests.remaining, 499);
    }

    #[test]
    fn quantized_limits_reject_bursts_below_the_minute_total() {
        let t0 = Instant::now();
        // 60 RPM enforced per second: a burst of one.
        let mut b = BucketPair::new(60, 1_000_000, Some(secs(1.0)), t0);
        let (first, snap) = b.admit(1, t0);
        assert!(first.is_ok());
        assert_eq!(snap.requests.limit, 60);
        assert_eq!(snap.requests.remaining, 59);
        let rejection = b.admit(1, t0).0.expect_err("second in the same second");
        assert_eq!(rejection.wait, secs(1.0));
        // The rejection put the burst level into debt: 2 s until the next fits.
        assert!(b.admit(1, t0 + secs(2.0)).0.is_ok());
    }

    #[test]
    fn quantized_tokens_admit_a_request_larger_than_the_burst_from_a_full_bucket() {
        let t0 = Instant::now();
        let mut b = BucketPair::new(1_000, 6_000, Some(secs(1.0)), t0);
        // Burst capacity 100 tokens; 500 fits in the minute limit, so it borrows.
        assert!(b.admit(500, t0).0.is_ok());
        assert!(b.admit(50, t0 + secs(1.0)).0.is_err());
    }

    #[test]
    fn new_limits_keep_what_was_used() {
        let t0 = Instant::now();
        let mut b = BucketPair::new(100, 1_000, None, t0);
        b.spend(10, 400, t0);
        b.set_limits(50, 2_000, None, t0);
        let snap = b.peek(t0);
        assert_eq!((snap.requests.limit, snap.requests.remaining), (50, 40));
        assert_eq!((snap.tokens.limit, snap.tokens.remaining), (2_000, 1_600));
    }

    #[test]
    fn a_zero_limit_admits_nothing_and_states_a_bounded_wait() {
        let t0 = Instant::now();
        let mut b = BucketPair::new(0, 1_000, None, t0);
        let rejection = b.admit(1, t0).0.expect_err("rpm 0");
        assert_eq!(rejection.wait, MAX_WAIT);
        let mut b = BucketPair::new(10, 0, None, t0);
        assert!(b.admit(0, t0).0.is_ok());
    }
}
