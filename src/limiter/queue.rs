//! Bounded, fair waiting for a bucket's budget, with deadlines.
//!
//! Each (organization, model) bucket has its own queue and its own lock, so one org's
//! backlog never delays another's. Within a bucket:
//! - FIFO per priority class, strictly: only the head of a class may take from the bucket, so
//!   a large request at the head is never starved by small ones slipping past it;
//! - interactive requests go first: batch requests are admitted only while no interactive
//!   request waits, and only from the share of the bucket above the interactive reserve;
//! - a request that cannot be admitted before its deadline (predicted from the refill rate
//!   and what is queued ahead) is rejected at once instead of after waiting.
//!
//! Waiting is driven by the waiters themselves: the head of a class sleeps until the bucket
//! will have room for it, the others sleep until they become head. Whoever changes the queue
//! or returns budget wakes the heads, so no wake-up is lost and no timer task is needed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::QueueConfig;
use crate::limiter::bucket::{Bucket, Cost, Limits, Oversize, Resource, Shortfall};
use crate::limiter::gate::{Gate, Pass, Probe, ProbeOutcome};
use crate::priority::{ByPriority, Priority};
use crate::resource::PerResource;
use crate::upstream::ratelimit::{RateLimitHeaders, Reason};

use super::learn::{views, warn_if_above_upstream, Learned, Mark};
use super::status::{BucketStatus, Last429, LastHeaders};

/// Why a request was not admitted.
#[derive(Clone, Debug, PartialEq)]
pub enum Rejection {
    /// Larger than the limit itself: it can never be admitted.
    TooLarge {
        resource: Resource,
        limit: u64,
        window: Duration,
        requested: u64,
    },
    /// Admission would come after the request's deadline; `wait` is the expected wait.
    Deadline {
        resource: Resource,
        limit: Option<u64>,
        wait: Duration,
        waited: Duration,
    },
    /// The bucket's or sluice's queue is full.
    QueueFull { depth: usize, wait: Duration },
}

impl Rejection {
    /// A Prometheus reason label: `too_large`, `deadline` or `queue_full`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::Deadline { .. } => "deadline",
            Self::QueueFull { .. } => "queue_full",
        }
    }
}

/// The queue-wide bounds, shared by every bucket. The depths and the reserve change in place
/// on a config reload; the margin and the circuit threshold are fixed when a bucket is made.
#[derive(Debug)]
pub struct QueueBounds {
    max_depth: AtomicUsize,
    max_depth_per_bucket: AtomicUsize,
    /// An `f64`, as its bits.
    interactive_reserve: AtomicU64,
    /// Refill left unused in every bucket (see [`Bucket::with_margin`]).
    refill_margin: Duration,
    /// See [`QueueConfig::relearn_interval`].
    relearn_interval: Duration,
    /// Consecutive upstream 429s that open a bucket's circuit.
    circuit_threshold: u32,
    /// Requests waiting in all buckets.
    depth: AtomicUsize,
}

impl QueueBounds {
    pub fn new(config: &QueueConfig, circuit_threshold: u32) -> Self {
        Self {
            max_depth: AtomicUsize::new(config.max_depth),
            max_depth_per_bucket: AtomicUsize::new(config.max_depth_per_bucket),
            interactive_reserve: AtomicU64::new(config.interactive_reserve.to_bits()),
            refill_margin: config.refill_margin,
            relearn_interval: config.relearn_interval,
            circuit_threshold,
            depth: AtomicUsize::new(0),
        }
    }

    /// Takes a reloaded config's depths and reserve. Requests already queued stay queued,
    /// even past a lowered depth; the bound applies to new arrivals.
    pub fn update(&self, config: &QueueConfig) {
        self.max_depth.store(config.max_depth, Ordering::Relaxed);
        self.max_depth_per_bucket
            .store(config.max_depth_per_bucket, Ordering::Relaxed);
        self.interactive_reserve
            .store(config.interactive_reserve.to_bits(), Ordering::Relaxed);
    }

    fn interactive_reserve(&self) -> f64 {
        f64::from_bits(self.interactive_reserve.load(Ordering::Relaxed))
    }
}

struct Waiter {
    id: u64,
    cost: Cost,
    wake: Arc<Notify>,
}

struct State {
    bucket: Bucket,
    /// The limits in force: the tighter of the configured and the learned ones.
    limits: Limits,
    configured: Limits,
    /// The configuration (reload count) `configured` came from.
    generation: u64,
    /// What the upstream's answers taught: limits, and the sends its headers are read against.
    learned: Learned,
    gate: Gate,
    classes: ByPriority<VecDeque<Waiter>>,
    /// Total cost queued per class, for predicting waits in O(1).
    queued: ByPriority<Cost>,
    next_id: u64,
    last_429: Option<Refused>,
}

/// The last upstream 429 of a bucket, for the status view.
#[derive(Clone, Copy, Debug)]
struct Refused {
    at: Instant,
    reason: Reason,
    /// How long the bucket paused for it.
    wait: Duration,
}

/// A request let through by [`BucketQueue::admit`].
#[derive(Debug, PartialEq, Eq)]
pub struct Admitted {
    /// Time spent queued.
    pub waited: Duration,
    /// Set when this request is the gate's probe.
    pub probe: Option<Probe>,
}

impl State {
    fn keep(&self, priority: Priority, bounds: &QueueBounds) -> f64 {
        match priority {
            Priority::Interactive => 0.0,
            Priority::Batch => bounds.interactive_reserve(),
        }
    }

    /// Whether nobody waits ahead of a new request of this priority.
    fn nobody_ahead(&self, priority: Priority) -> bool {
        match priority {
            Priority::Interactive => self.classes[Priority::Interactive].is_empty(),
            Priority::Batch => {
                self.classes[Priority::Interactive].is_empty()
                    && self.classes[Priority::Batch].is_empty()
            }
        }
    }

    /// The head that may take next: the interactive head, else the batch head.
    fn current_head(&self) -> Option<(Priority, u64)> {
        if let Some(waiter) = self.classes[Priority::Interactive].front() {
            return Some((Priority::Interactive, waiter.id));
        }
        self.classes[Priority::Batch]
            .front()
            .map(|waiter| (Priority::Batch, waiter.id))
    }

    fn remove(&mut self, priority: Priority, id: u64) -> bool {
        let class = &mut self.classes[priority];
        let Some(position) = class.iter().position(|waiter| waiter.id == id) else {
            return false;
        };
        if let Some(waiter) = class.remove(position) {
            let queued = &mut self.queued[priority];
            queued.requests -= waiter.cost.requests;
            queued.tokens -= waiter.cost.tokens;
        }
        true
    }

    /// Takes `cost` for the request at the head if the gate and the bucket let it go now.
    fn try_go(&mut self, cost: Cost, keep: f64, now: Instant) -> Go {
        let probe = match self.gate.check(false, now) {
            Pass::Go(probe) => probe,
            Pass::Until(until) => return Go::At(until),
            Pass::Hold => return Go::Hold,
        };
        let taken = match self.bucket.try_take(cost, keep, now) {
            Ok(()) => Ok(probe),
            // Beyond the proven burst: one request goes to prove it (a gate probe already
            // going proves it as well as any), the others wait for its answer or the refill.
            Err(Shortfall::Unproven { wait }) => {
                let probe = probe.or(Some(Probe::Burst));
                if probe == Some(Probe::Burst) && !self.gate.burst_probe_free() {
                    return Go::At(now + wait);
                }
                self.bucket.take_as_proof(cost, keep, now).map(|()| probe)
            }
            Err(shortfall) => Err(shortfall),
        };
        match taken {
            Ok(probe) => {
                self.gate.claim(probe, now);
                Go::Now(probe)
            }
            Err(Shortfall::Wait { wait, .. } | Shortfall::Unproven { wait }) => Go::At(now + wait),
            Err(Shortfall::Never(oversize)) => Go::Never(oversize),
        }
    }

    /// The bucket's predicted wait for `cost`, and no earlier than the gate reopens.
    fn projected_wait(&mut self, cost: Cost, keep: f64, now: Instant) -> Duration {
        let bucket = self.bucket.projected_wait(cost, keep, now);
        let gate = self
            .gate
            .blocked_until(now)
            .map_or(Duration::ZERO, |until| until - now);
        bucket.max(gate)
    }

    /// Forgets learned limits no response has confirmed for an hour; a bucket with nothing
    /// configured then learns again, its next request going alone.
    fn age_learned(&mut self, org: &str, model: &str, now: Instant) {
        if !self.learned.is_stale(now) {
            return;
        }
        tracing::info!(
            org,
            model,
            "learned limits unconfirmed for an hour; learning them again"
        );
        self.forget_learned(now);
        if self.learned.enabled && self.configured.is_empty() {
            self.gate.relearn(now);
        }
    }

    fn forget_learned(&mut self, now: Instant) {
        self.learned.forget();
        self.apply_limits(now);
    }

    /// A request is larger than a limit in force: forgets the learned limit when the
    /// configuration would allow the request and nothing confirmed it for `interval` (see
    /// [`Learned::doubt`]), so the request goes to learn it again. Returns whether it did.
    fn doubt_learned(
        &mut self,
        oversize: Oversize,
        cost: Cost,
        interval: Duration,
        now: Instant,
    ) -> bool {
        if !self
            .learned
            .doubt(&self.configured, oversize, cost, interval, now)
        {
            return false;
        }
        self.apply_limits(now);
        true
    }

    /// Puts the tighter of the configured and learned limits in force, keeping what was spent.
    fn apply_limits(&mut self, now: Instant) {
        let limits = self.configured.tightest(&self.learned.limits);
        if limits != self.limits {
            self.bucket.set_limits(&limits, now);
            self.limits = limits;
            self.wake_head();
        }
    }

    fn depth(&self) -> ByPriority<usize> {
        ByPriority {
            interactive: self.classes.interactive.len(),
            batch: self.classes.batch.len(),
        }
    }

    fn wake_head(&self) {
        for priority in Priority::ALL {
            if let Some(head) = self.classes[priority].front() {
                head.wake.notify_one();
            }
        }
    }
}

/// Whether the request at the head goes now ([`State::try_go`]).
enum Go {
    /// It took its cost and goes, as this probe if any.
    Now(Option<Probe>),
    /// Not before this instant.
    At(Instant),
    /// Not until woken (a probe's answer, a refund, new limits).
    Hold,
    /// Never: it is larger than a limit.
    Never(Oversize),
}

/// The budget and the waiting line of one (organization, model).
pub struct BucketQueue {
    pub org: Arc<str>,
    pub model: Arc<str>,
    bounds: Arc<QueueBounds>,
    state: Mutex<State>,
}

impl BucketQueue {
    /// A bucket with the configured `limits`; `learn` sends its first request alone while
    /// no limit is known, to learn them from the upstream's headers.
    pub fn new(
        org: Arc<str>,
        model: Arc<str>,
        limits: Limits,
        learn: bool,
        bounds: Arc<QueueBounds>,
    ) -> Self {
        let now = Instant::now();
        let bucket = Bucket::with_margin(&limits, bounds.refill_margin, now);
        let gate = Gate::new(learn && limits.is_empty(), bounds.circuit_threshold, now);
        Self {
            org,
            model,
            bounds,
            state: Mutex::new(State {
                bucket,
                limits,
                configured: limits,
                generation: 0,
                learned: Learned::new(learn),
                gate,
                classes: ByPriority::default(),
                queued: ByPriority::default(),
                next_id: 0,
                last_429: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the bucket half-updated in a way that
        // matters more than stopping admission entirely; keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until `cost` is taken from the bucket and the gate lets the request go, or
    /// rejects. Cancel-safe: dropping the future leaves the queue and wakes whoever is next.
    pub async fn admit(
        &self,
        cost: Cost,
        priority: Priority,
        deadline: Instant,
    ) -> Result<Admitted, Rejection> {
        let arrived = Instant::now();
        let wake = Arc::new(Notify::new());
        let id = {
            let mut state = self.lock();
            let keep = state.keep(priority, &self.bounds);
            state.age_learned(&self.org, &self.model, arrived);
            if let Err(never) = state.bucket.fits_ever(cost) {
                if !state.doubt_learned(never, cost, self.bounds.relearn_interval, arrived) {
                    return Err(too_large(never, cost));
                }
                tracing::warn!(
                    org = %self.org,
                    model = %self.model,
                    resource = never.resource.label(),
                    learned = never.limit,
                    requested = cost.of(never.resource),
                    "a request is larger than a learned limit; sending it to learn the limit again"
                );
                if let Err(never) = state.bucket.fits_ever(cost) {
                    return Err(too_large(never, cost));
                }
            }
            if state.nobody_ahead(priority) {
                match state.try_go(cost, keep, arrived) {
                    Go::Now(probe) => {
                        return Ok(Admitted {
                            waited: Duration::ZERO,
                            probe,
                        })
                    }
                    Go::Never(never) => return Err(too_large(never, cost)),
                    Go::At(_) | Go::Hold => {}
                }
            }
            let ahead = self.cost_ahead(&state, priority, cost);
            let wait = state.projected_wait(ahead, keep, arrived);
            let depth = state.classes.interactive.len() + state.classes.batch.len();
            if depth >= self.bounds.max_depth_per_bucket.load(Ordering::Relaxed) {
                return Err(Rejection::QueueFull { depth, wait });
            }
            if arrived + wait > deadline {
                let resource = self.binding_resource(&mut state, ahead, keep, arrived);
                return Err(Rejection::Deadline {
                    resource,
                    limit: state.bucket.limit(resource),
                    wait,
                    waited: Duration::ZERO,
                });
            }
            let total = self.bounds.depth.fetch_add(1, Ordering::Relaxed);
            if total >= self.bounds.max_depth.load(Ordering::Relaxed) {
                self.bounds.depth.fetch_sub(1, Ordering::Relaxed);
                return Err(Rejection::QueueFull { depth: total, wait });
            }
            let id = state.next_id;
            state.next_id += 1;
            state.classes[priority].push_back(Waiter {
                id,
                cost,
                wake: Arc::clone(&wake),
            });
            let queued = &mut state.queued[priority];
            queued.requests += cost.requests;
            queued.tokens += cost.tokens;
            id
        };

        let mut place = Place {
            queue: self,
            priority,
            id,
            queued: true,
        };
        loop {
            let now = Instant::now();
            // `None`: nothing to time, wait to be woken (or for the deadline).
            let next_try = {
                let mut state = self.lock();
                let keep = state.keep(priority, &self.bounds);
                if state.current_head() == Some((priority, id)) {
                    match state.try_go(cost, keep, now) {
                        Go::Now(probe) => {
                            state.remove(priority, id);
                            place.queued = false;
                            self.bounds.depth.fetch_sub(1, Ordering::Relaxed);
                            // The next in line may fit too.
                            state.wake_head();
                            return Ok(Admitted {
                                waited: now.saturating_duration_since(arrived),
                                probe,
                            });
                        }
                        Go::At(at) => Some(at),
                        Go::Hold => None,
                        // The limits shrank below this request while it waited.
                        Go::Never(never) => return Err(too_large(never, cost)),
                    }
                } else {
                    None
                }
            };
            if next_try.is_some_and(|at| at > deadline) || now >= deadline {
                let mut state = self.lock();
                let keep = state.keep(priority, &self.bounds);
                let resource = self.binding_resource(&mut state, cost, keep, now);
                let wait = state.projected_wait(cost, keep, now);
                return Err(Rejection::Deadline {
                    resource,
                    limit: state.bucket.limit(resource),
                    wait,
                    waited: now.saturating_duration_since(arrived),
                });
            }
            let sleep_until = next_try.map_or(deadline, |at| at.min(deadline));
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep_until(sleep_until) => {}
            }
        }
    }

    fn cost_ahead(&self, state: &State, priority: Priority, cost: Cost) -> Cost {
        let mut total = cost;
        let classes: &[Priority] = match priority {
            Priority::Interactive => &[Priority::Interactive],
            Priority::Batch => &[Priority::Interactive, Priority::Batch],
        };
        for &class in classes {
            total.requests += state.queued[class].requests;
            total.tokens += state.queued[class].tokens;
        }
        total
    }

    /// Which resource makes `cost` wait (for naming the limit in a rejection).
    fn binding_resource(&self, state: &mut State, cost: Cost, keep: f64, now: Instant) -> Resource {
        let mut resource = Resource::Requests;
        let mut longest = Duration::ZERO;
        for candidate in [Resource::Requests, Resource::Tokens] {
            let only = match candidate {
                Resource::Requests => Cost {
                    requests: cost.requests,
                    tokens: 0,
                },
                Resource::Tokens => Cost {
                    requests: 0,
                    tokens: cost.tokens,
                },
            };
            let wait = state.bucket.projected_wait(only, keep, now);
            if wait > longest {
                longest = wait;
                resource = candidate;
            }
        }
        resource
    }

    /// Returns budget (a refund) and wakes the heads, who may now fit.
    pub fn give_back(&self, cost: Cost) {
        let mut state = self.lock();
        state.bucket.give_back(cost, Instant::now());
        state.wake_head();
    }

    /// Takes budget unconditionally (usage beyond the estimate): debt.
    pub fn charge(&self, cost: Cost) {
        self.lock().bucket.charge(cost, Instant::now());
    }

    /// Replaces the configured limits (the learned ones still cap them), keeping what was
    /// spent, and wakes the heads; unless the bucket already took the limits of a newer
    /// configuration than `generation`.
    pub fn set_limits(&self, limits: Limits, generation: u64) {
        let mut state = self.lock();
        if generation < state.generation {
            return;
        }
        state.generation = generation;
        if state.configured != limits {
            state.configured = limits;
            // What the bucket learned and the pauses it took were under the old limits; a
            // changed configuration is the operator's way to clear them (a pause from a
            // broken header, a limit learned from one).
            let now = Instant::now();
            state.gate.clear_pause();
            state.last_429 = None;
            state.forget_learned(now);
            warn_if_above_upstream(
                &self.org,
                &self.model,
                &state.configured,
                &state.learned.limits,
            );
            state.apply_limits(Instant::now());
        }
    }

    /// Whether the bucket has configured limits (not only learned ones).
    pub fn is_configured(&self) -> bool {
        !self.lock().configured.is_empty()
    }

    /// A request holding `cost` is being sent upstream (again, for a replay).
    pub fn dispatched(&self, cost: Cost) -> Mark {
        self.lock().learned.dispatched(cost, Instant::now())
    }

    /// The send at `mark` never reached the upstream (its connection was refused).
    pub fn undispatched(&self, mark: Mark) {
        self.lock().learned.undispatched(mark);
    }

    /// Corrects the bucket toward the upstream's view in `headers`, which came back for a
    /// request sent at `mark`: adopts the limits they announce (a configured limit above the
    /// upstream's is lowered to it), lowers the levels to what the upstream had left less
    /// what was sent since, and shrinks the burst when the figures show a quantized limit.
    /// Never loosens anything.
    pub fn observe(&self, mark: Mark, headers: &RateLimitHeaders) {
        let now = Instant::now();
        let mut state = self.lock();
        if headers.is_empty() {
            return;
        }
        let views = views(headers);
        if let Some(learned) = state.learned.learn(headers, &views, now) {
            warn_if_above_upstream(&self.org, &self.model, &state.configured, &learned);
            tracing::info!(
                org = %self.org,
                model = %self.model,
                rpm = ?learned.rpm,
                tpm = ?learned.tpm,
                rpd = ?learned.rpd,
                tpd = ?learned.tpd,
                "learned the upstream's limits"
            );
            state.apply_limits(now);
        }
        if !state.learned.limits.is_empty() {
            state.gate.learned();
        }
        let State {
            learned, bucket, ..
        } = &mut *state;
        learned.correct(mark, &views, bucket, now);
    }

    /// The upstream answered a request of this bucket without a rate limit.
    pub fn answered(&self, probe: Option<Probe>) {
        let mut state = self.lock();
        state.gate.answered();
        if let Some(probe) = probe {
            state.gate.finish_probe(probe, ProbeOutcome::Answered);
            if probe == Probe::Burst && !state.bucket.is_proven() {
                state.bucket.burst_proven();
                tracing::debug!(
                    org = %self.org,
                    model = %self.model,
                    "the upstream took a request beyond a second's worth at once: burst proven"
                );
            }
        }
        state.wake_head();
    }

    /// A probe ended without an answer (cancelled, failed to connect).
    pub fn abandon_probe(&self, probe: Probe) {
        let mut state = self.lock();
        state.gate.finish_probe(probe, ProbeOutcome::Abandoned);
        state.wake_head();
    }

    /// The upstream answered 429 for a request of this bucket: nothing is sent before
    /// `resume`; after enough consecutive 429s the circuit opens until `reset`. Its
    /// [`Evidence`] shrinks the burst or keeps more refill in hand. Returns whether the
    /// circuit opened.
    pub fn rate_limited(&self, rate_limited: RateLimited) -> bool {
        let now = Instant::now();
        let mut state = self.lock();
        let opened = state
            .gate
            .rate_limited(rate_limited.resume, rate_limited.reset);
        if let Some(probe) = rate_limited.probe {
            state.gate.finish_probe(probe, ProbeOutcome::RateLimited);
        }
        match rate_limited.evidence {
            Evidence::Burst(resource) => state.bucket.burst_refused(resource, now),
            Evidence::Contention => state.bucket.contended(now),
            Evidence::Nothing => {}
        }
        // Whoever waited on a probe looks again (and finds the pause).
        state.wake_head();
        state.last_429 = Some(Refused {
            at: now,
            reason: rate_limited.reason,
            wait: rate_limited.resume.saturating_duration_since(now),
        });
        if opened {
            tracing::warn!(
                org = %self.org,
                model = %self.model,
                until_ms = state
                    .gate
                    .blocked_until(now)
                    .map_or(0, |until| (until - now).as_millis() as u64),
                "circuit open: consecutive upstream 429s"
            );
        }
        opened
    }

    /// Waits, holding the request's reservation, until the bucket may send it again: after
    /// the pause, before anything new, and once the bucket has `again` for it (the upstream
    /// counted the refused attempt, so sending it again spends once more: several refused
    /// requests go again at the refill rate, not all at once). Returns the gate's probe if
    /// this re-send is one, or the remaining wait when it cannot go before `deadline`.
    pub async fn replay(&self, again: Cost, deadline: Instant) -> Result<Option<Probe>, Duration> {
        self.lock().gate.add_replay();
        let _replay = ReplayGuard { queue: self };
        loop {
            let now = Instant::now();
            let until = {
                let mut state = self.lock();
                match state.gate.check(true, now) {
                    Pass::Go(probe) => match state.bucket.take_as_proof(again, 0.0, now) {
                        // Limits that shrank below the request do not strand it mid-replay.
                        Ok(()) | Err(Shortfall::Never(_) | Shortfall::Unproven { .. }) => {
                            state.gate.claim(probe, now);
                            return Ok(probe);
                        }
                        Err(Shortfall::Wait { wait, .. }) if now + wait > deadline => {
                            return Err(wait);
                        }
                        Err(Shortfall::Wait { wait, .. }) => now + wait,
                    },
                    Pass::Until(until) if until > deadline => {
                        return Err(until.saturating_duration_since(now));
                    }
                    Pass::Until(until) => until,
                    // Another request is probing the circuit: look again shortly.
                    Pass::Hold if now >= deadline => return Err(Duration::from_secs(1)),
                    Pass::Hold => (now + Duration::from_millis(50)).min(deadline),
                }
            };
            tokio::time::sleep_until(until).await;
        }
    }

    /// What the status view and metrics show of this bucket.
    pub fn status(&self) -> BucketStatus {
        let now = Instant::now();
        let mut state = self.lock();
        BucketStatus {
            configured: state.configured,
            learned: state.learned.limits,
            in_force: state.limits,
            available: PerResource {
                requests: state.bucket.available(Resource::Requests, now),
                tokens: state.bucket.available(Resource::Tokens, now),
            },
            burst: PerResource {
                requests: state.bucket.burst(Resource::Requests),
                tokens: state.bucket.burst(Resource::Tokens),
            },
            learning: state.gate.is_learning(),
            circuit: state.gate.circuit(),
            paused_for: state
                .gate
                .paused_until()
                .map(|until| until.saturating_duration_since(now))
                .filter(|wait| !wait.is_zero()),
            depth: state.depth(),
            replays: state.gate.replays(),
            upstream: state
                .learned
                .last_headers(now)
                .map(|(headers, age)| LastHeaders { headers, age }),
            last_429: state.last_429.map(|refused| Last429 {
                reason: refused.reason,
                wait: refused.wait,
                age: now.saturating_duration_since(refused.at),
            }),
        }
    }

    /// Requests waiting per class.
    pub fn depth(&self) -> ByPriority<usize> {
        self.lock().depth()
    }

    /// Units available now (negative in debt); `None` when unlimited.
    pub fn available(&self, resource: Resource) -> Option<f64> {
        self.lock().bucket.available(resource, Instant::now())
    }
}

/// What an upstream rate-limit 429 shows about the bucket's budget, beyond its pause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evidence {
    /// The upstream refused although its per-minute figures had room for the request: its
    /// burst of this resource is smaller than the bucket's (a quantized limit).
    Burst(Resource),
    /// The upstream refused a request the bucket had room for, not for a burst: another
    /// client spends the same budget.
    Contention,
    /// Nothing beyond the pause (`slow_down`).
    Nothing,
}

/// What an upstream 429 does to a bucket (see [`BucketQueue::rate_limited`]).
#[derive(Clone, Copy, Debug)]
pub struct RateLimited {
    pub resume: Instant,
    pub reset: Instant,
    pub evidence: Evidence,
    pub probe: Option<Probe>,
    pub reason: Reason,
}

/// Leaves the replay line however the replay ends.
struct ReplayGuard<'a> {
    queue: &'a BucketQueue,
}

impl Drop for ReplayGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.queue.lock();
        state.gate.remove_replay();
        state.wake_head();
    }
}

/// A waiter's place in line; leaving it (admitted, rejected or cancelled) wakes the next.
struct Place<'a> {
    queue: &'a BucketQueue,
    priority: Priority,
    id: u64,
    queued: bool,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if self.queued {
            let mut state = self.queue.lock();
            if state.remove(self.priority, self.id) {
                self.queue.bounds.depth.fetch_sub(1, Ordering::Relaxed);
            }
            state.wake_head();
        }
    }
}

fn too_large(oversize: Oversize, cost: Cost) -> Rejection {
    let Oversize {
        resource,
        limit,
        window,
    } = oversize;
    Rejection::TooLarge {
        resource,
        limit,
        window,
        requested: match resource {
            Resource::Requests => cost.requests,
            Resource::Tokens => cost.tokens,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waiting requests as (interactive, batch).
    fn depth(queue: &BucketQueue) -> (usize, usize) {
        let depth = queue.depth();
        (depth.interactive, depth.batch)
    }

    /// A queue whose bucket's burst is proven (the proof has tests of its own).
    fn queue(limits: Limits, reserve: f64, max_depth: usize) -> Arc<BucketQueue> {
        let queue = unproven_queue(limits, reserve, max_depth);
        queue.lock().bucket.burst_proven();
        queue
    }

    fn unproven_queue(limits: Limits, reserve: f64, max_depth: usize) -> Arc<BucketQueue> {
        Arc::new(BucketQueue::new(
            Arc::from("acme"),
            Arc::from("gpt-4o"),
            limits,
            false,
            Arc::new(QueueBounds::new(
                &QueueConfig {
                    max_wait: Duration::from_secs(60),
                    max_depth,
                    max_depth_per_bucket: max_depth,
                    interactive_reserve: reserve,
                    client_timeout_margin: Duration::from_secs(2),
                    refill_margin: Duration::ZERO,
                    relearn_interval: Duration::from_secs(60),
                    max_buckets: 10_000,
                },
                3,
            )),
        ))
    }

    fn tpm(tokens: u64) -> Limits {
        Limits {
            tpm: Some(tokens),
            ..Limits::default()
        }
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    /// Starts an admission in the background and records the admission order in `log`.
    fn spawn_admit(
        queue: &Arc<BucketQueue>,
        tokens: u64,
        priority: Priority,
        name: &'static str,
        log: &Arc<Mutex<Vec<(&'static str, Duration)>>>,
    ) -> tokio::task::JoinHandle<Result<Admitted, Rejection>> {
        let queue = Arc::clone(queue);
        let log = Arc::clone(log);
        let start = Instant::now();
        tokio::spawn(async move {
            let result = queue.admit(Cost::request(tokens), priority, far()).await;
            if result.is_ok() {
                log.lock()
                    .expect("test mutex")
                    .push((name, start.elapsed()));
            }
            result
        })
    }

    async fn settle_tasks() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn admits_in_fifo_order_at_the_refill_rate() {
        let queue = queue(tpm(600), 0.0, 100); // 10 tokens/s
        queue
            .admit(Cost::request(600), Priority::Interactive, far())
            .await
            .expect("drain");
        let log = Arc::new(Mutex::new(Vec::new()));
        let a = spawn_admit(&queue, 10, Priority::Interactive, "a", &log);
        settle_tasks().await;
        let b = spawn_admit(&queue, 10, Priority::Interactive, "b", &log);
        settle_tasks().await;
        let c = spawn_admit(&queue, 10, Priority::Interactive, "c", &log);
        for task in [a, b, c] {
            task.await.expect("task").expect("admitted");
        }
        let log = log.lock().expect("test mutex").clone();
        let names: Vec<_> = log.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, ["a", "b", "c"]);
        // 1 s per 10 tokens, each after the previous.
        let secs: Vec<u64> = log
            .iter()
            .map(|(_, at)| at.as_millis() as u64 / 100)
            .collect();
        assert_eq!(secs, [10, 20, 30]);
        assert_eq!(depth(&queue), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_head_is_not_starved_by_small_requests_behind_it() {
        let queue = queue(tpm(600), 0.0, 100);
        queue
            .admit(Cost::request(600), Priority::Interactive, far())
            .await
            .expect("drain");
        let log = Arc::new(Mutex::new(Vec::new()));
        let big = spawn_admit(&queue, 300, Priority::Interactive, "big", &log);
        settle_tasks().await;
        let small: Vec<_> = (0..5)
            .map(|_| spawn_admit(&queue, 5, Priority::Interactive, "small", &log))
            .collect();
        big.await.expect("task").expect("admitted");
        for task in small {
            task.await.expect("task").expect("admitted");
        }
        let log = log.lock().expect("test mutex").clone();
        assert_eq!(log[0].0, "big", "{log:?}");
        assert_eq!(log[0].1, Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn interactive_goes_before_batch() {
        let queue = queue(tpm(600), 0.0, 100);
        queue
            .admit(Cost::request(600), Priority::Interactive, far())
            .await
            .expect("drain");
        let log = Arc::new(Mutex::new(Vec::new()));
        let batch = spawn_admit(&queue, 10, Priority::Batch, "batch", &log);
        settle_tasks().await;
        let interactive = spawn_admit(&queue, 10, Priority::Interactive, "interactive", &log);
        settle_tasks().await;
        assert_eq!(depth(&queue), (1, 1));
        interactive.await.expect("task").expect("admitted");
        batch.await.expect("task").expect("admitted");
        let names: Vec<_> = log
            .lock()
            .expect("test mutex")
            .iter()
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(names, ["interactive", "batch"]);
    }

    #[tokio::test(start_paused = true)]
    async fn batch_leaves_the_interactive_reserve() {
        let queue = queue(tpm(1000), 0.25, 100);
        // Batch may use 750 of 1000 tokens at once.
        queue
            .admit(Cost::request(700), Priority::Batch, far())
            .await
            .expect("fits");
        let start = Instant::now();
        let waited = queue
            .admit(Cost::request(100), Priority::Batch, far())
            .await
            .expect("waits");
        // 50 more tokens needed above the reserve, at 1000/60 per second: 3 s.
        assert_eq!(waited.waited, Duration::from_secs(3));
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        // Interactive traffic can still use the reserve.
        let waited = queue
            .admit(Cost::request(240), Priority::Interactive, far())
            .await
            .expect("fits");
        assert_eq!(waited.waited, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_would_miss_its_deadline_is_rejected_at_once() {
        let queue = queue(tpm(600), 0.0, 100);
        queue
            .admit(Cost::request(600), Priority::Interactive, far())
            .await
            .expect("drain");
        let start = Instant::now();
        let rejection = queue
            .admit(
                Cost::request(50),
                Priority::Interactive,
                start + Duration::from_secs(2),
            )
            .await
            .expect_err("5 s of refill needed, 2 s allowed");
        assert_eq!(start.elapsed(), Duration::ZERO, "rejected without waiting");
        assert_eq!(
            rejection,
            Rejection::Deadline {
                resource: Resource::Tokens,
                limit: Some(600),
                wait: Duration::from_secs(5),
                waited: Duration::ZERO,
            }
        );
        // What is queued ahead counts: behind a 40-token request, 10 tokens need 5 s too.
        let log = Arc::new(Mutex::new(Vec::new()));
        let ahead = spawn_admit(&queue, 40, Priority::Interactive, "ahead", &log);
        settle_tasks().await;
        let rejection = queue
            .admit(
                Cost::request(10),
                Priority::Interactive,
                Instant::now() + Duration::from_millis(4900),
            )
            .await
            .expect_err("behind 40 tokens");
        assert!(
            matches!(rejection, Rejection::Deadline { wait, .. } if wait == Duration::from_secs(5))
        );
        ahead.await.expect("task").expect("admitted");
    }

    #[tokio::test(start_paused = true)]
    async fn no_request_waits_past_its_deadline() {
        let queue = queue(tpm(600), 0.0, 100);
        queue
            .admit(Cost::request(600), Priority::Interactive, far())
            .await
            .expect("drain");
        // Predicted to fit in 1 s, but the budget is charged away meanwhile (usage debt).
        let waiting = {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move {
                let start = Instant::now();
                let result = queue
                    .admit(
                        Cost::request(10),
                        Priority::Interactive,
                        start + Duration::from_secs(2),
                    )
                    .await;
                (result, start.elapsed())
            })
        };
        settle_tasks().await;
        queue.charge(Cost {
            requests: 0,
            tokens: 100,
        });
        let (result, elapsed) = waiting.await.expect("task");
        assert!(
            matches!(result, Err(Rejection::Deadline { .. })),
            "{result:?}"
        );
        assert!(elapsed <= Duration::from_secs(2), "waited {elapsed:?}");
        assert_eq!(depth(&queue), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_leaves_and_the_next_moves_up() {
        let queue = queue(tpm(600), 0.0, 100);
        queue
            .admit(Cost::request(600), Priority::Interactive, far())
            .await
            .expect("drain");
        let log = Arc::new(Mutex::new(Vec::new()));
        let first = spawn_admit(&queue, 300, Priority::Interactive, "first", &log);
        settle_tasks().await;
        let second = spawn_admit(&queue, 10, Priority::Interactive, "second", &log);
        settle_tasks().await;
        assert_eq!(depth(&queue), (2, 0));
        first.abort();
        let _ = first.await;
        assert_eq!(depth(&queue), (1, 0));
        second.await.expect("task").expect("admitted");
        let log = log.lock().expect("test mutex").clone();
        assert_eq!(log, [("second", Duration::from_secs(1))]);
        assert_eq!(queue.bounds.depth.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn oversized_requests_and_full_queues_are_rejected() {
        let queue = queue(tpm(600), 0.0, 1);
        assert_eq!(
            queue
                .admit(Cost::request(601), Priority::Interactive, far())
                .await,
            Err(Rejection::TooLarge {
                resource: Resource::Tokens,
                limit: 600,
                window: Duration::from_secs(60),
                requested: 601
            })
        );
        queue
            .admit(Cost::request(600), Priority::Interactive, far())
            .await
            .expect("drain");
        let log = Arc::new(Mutex::new(Vec::new()));
        let waiting = spawn_admit(&queue, 10, Priority::Interactive, "w", &log);
        settle_tasks().await;
        assert!(matches!(
            queue
                .admit(Cost::request(10), Priority::Interactive, far())
                .await,
            Err(Rejection::QueueFull { depth: 1, .. })
        ));
        waiting.await.expect("task").expect("admitted");
    }

    #[tokio::test(start_paused = true)]
    async fn refunds_wake_the_head_early() {
        let queue = queue(tpm(600), 0.0, 100);
        queue
            .admit(Cost::request(600), Priority::Interactive, far())
            .await
            .expect("drain");
        let log = Arc::new(Mutex::new(Vec::new()));
        let waiting = spawn_admit(&queue, 300, Priority::Interactive, "w", &log);
        settle_tasks().await;
        tokio::time::advance(Duration::from_secs(1)).await;
        queue.give_back(Cost::request(300));
        waiting.await.expect("task").expect("admitted");
        let log = log.lock().expect("test mutex").clone();
        assert_eq!(
            log[0].1,
            Duration::from_secs(1),
            "admitted at the refund, not after 30 s"
        );
    }

    fn rpm(requests: u64) -> Limits {
        Limits {
            rpm: Some(requests),
            ..Limits::default()
        }
    }

    /// Starts `n` admissions of one request each at once; returns them in arrival order.
    async fn burst_of(
        queue: &Arc<BucketQueue>,
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<Result<Admitted, Rejection>>> {
        let mut tasks = Vec::new();
        for _ in 0..n {
            let queue = Arc::clone(queue);
            tasks.push(tokio::spawn(async move {
                queue
                    .admit(Cost::request(0), Priority::Interactive, far())
                    .await
            }));
            settle_tasks().await;
        }
        tasks
    }

    #[tokio::test(start_paused = true)]
    async fn one_request_proves_the_burst_before_the_rest_of_it_goes() {
        let queue = unproven_queue(rpm(600), 0.0, 100); // 10 per second
        let tasks = burst_of(&queue, 15).await;
        // A second's worth went, and one more as the proof; the other 4 wait for its answer.
        for task in &tasks[..11] {
            assert!(task.is_finished());
        }
        assert_eq!(depth(&queue), (4, 0));
        let mut admitted = Vec::new();
        for task in tasks.into_iter().take(11) {
            admitted.push(task.await.expect("task").expect("admitted"));
        }
        let probes: Vec<Probe> = admitted.iter().filter_map(|a| a.probe).collect();
        assert_eq!(probes, [Probe::Burst]);
        assert_eq!(admitted[10].probe, Some(Probe::Burst));
        // The upstream took the proof: the rest goes at once, without waiting for refill.
        queue.answered(Some(Probe::Burst));
        settle_tasks().await;
        assert_eq!(depth(&queue), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_proof_shows_a_quantized_limit_and_the_rest_goes_at_its_rate() {
        let queue = unproven_queue(rpm(600), 0.0, 100);
        let start = Instant::now();
        let tasks = burst_of(&queue, 16).await;
        let waiting: Vec<_> = tasks.into_iter().skip(11).collect();
        // The proof met a 429 although the per-minute figures had room.
        let resume = Instant::now() + Duration::from_millis(100);
        queue.rate_limited(RateLimited {
            resume,
            reset: resume,
            evidence: Evidence::Burst(Resource::Requests),
            probe: Some(Probe::Burst),
            reason: Reason::Limited(Resource::Requests),
        });
        let mut at = Vec::new();
        for task in waiting {
            task.await.expect("task").expect("admitted");
            at.push(start.elapsed().as_millis() as u64 / 100);
        }
        // The bucket emptied and paces at 10 per second: 100 ms apart, not all at once.
        assert_eq!(at, [1, 2, 3, 4, 5]);
        assert_eq!(queue.status().burst.requests, Some(10.0));
    }

    fn remaining_requests(limit: u64, remaining: u64) -> RateLimitHeaders {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-ratelimit-limit-requests", limit.into());
        headers.insert("x-ratelimit-remaining-requests", remaining.into());
        RateLimitHeaders::parse(&headers)
    }

    #[tokio::test(start_paused = true)]
    async fn a_header_is_corrected_only_for_sends_the_upstream_had_not_counted() {
        let queue = queue(rpm(120), 0.0, 100);
        let mut marks = Vec::new();
        for _ in 0..3 {
            queue
                .admit(Cost::request(0), Priority::Interactive, far())
                .await
                .expect("admitted");
            marks.push(queue.dispatched(Cost::request(0)));
        }
        let [a, b, c] = [marks[0], marks[1], marks[2]];
        // The upstream admitted them in the reverse order: c with 119 left, b 118, a 117; the
        // answers come back in that order too.
        queue.observe(c, &remaining_requests(120, 119));
        queue.observe(b, &remaining_requests(120, 118));
        queue.observe(a, &remaining_requests(120, 117));
        // a's 117 already counts b and c (their answers showed more left): 117 are left, not
        // 115.
        assert_eq!(queue.available(Resource::Requests), Some(117.0));

        // A send whose answer has not come back is not counted by an earlier header.
        let d = queue.dispatched(Cost::request(0));
        queue.observe(b, &remaining_requests(120, 118));
        assert_eq!(queue.available(Resource::Requests), Some(117.0));
        queue.observe(c, &remaining_requests(120, 116));
        assert_eq!(
            queue.available(Resource::Requests),
            Some(115.0),
            "116 less d in flight"
        );
        queue.undispatched(d);
    }

    #[tokio::test(start_paused = true)]
    async fn refused_requests_go_again_one_refill_apart_not_all_at_once() {
        let queue = queue(rpm(60), 0.0, 100); // 1 per second
        let start = Instant::now();
        for _ in 0..60 {
            queue
                .admit(Cost::request(0), Priority::Interactive, far())
                .await
                .expect("the whole minute at once");
        }
        // Three in flight are refused: pause a second (slow_down: no contention evidence).
        queue.rate_limited(RateLimited {
            resume: start + Duration::from_secs(1),
            reset: start + Duration::from_secs(1),
            evidence: Evidence::Nothing,
            probe: None,
            reason: Reason::SlowDown,
        });
        let replays: Vec<_> = (0..3)
            .map(|_| {
                let queue = Arc::clone(&queue);
                tokio::spawn(async move {
                    let again = Cost {
                        requests: 1,
                        tokens: 0,
                    };
                    queue.replay(again, far()).await.expect("in time");
                    start.elapsed().as_millis() as u64 / 100
                })
            })
            .collect();
        let mut at = Vec::new();
        for replay in replays {
            at.push(replay.await.expect("task"));
        }
        at.sort_unstable();
        // Each refused attempt was counted upstream: each re-send waits for its own refill.
        assert_eq!(at, [10, 20, 30]);
    }
}
