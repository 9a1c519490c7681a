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
//!
//! The line holds only the waiters. The budget they wait for is the bucket's [`Budget`]
//! (the storage seam): the line asks it, one round trip per try, and never holds its own
//! lock while it does.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::limiter::bucket::{Cost, Limits, Oversize, Resource};
use crate::limiter::gate::Probe;
use crate::priority::{ByPriority, Priority};
use crate::upstream::ratelimit::RateLimitHeaders;

use super::bounds::QueueBounds;
use super::budget::{Again, Budget, Go, RateLimited, Settle, Ticket};
use super::learn::Mark;
use super::status::BucketStatus;
use super::store::Store;
use super::store::{Correction, Sent};

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
    /// The shared store cannot be reached and `shared.on_store_error` is `fail_closed`.
    StoreDown,
}

impl Rejection {
    /// A Prometheus reason label: `too_large`, `deadline`, `queue_full` or `store_down`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::Deadline { .. } => "deadline",
            Self::QueueFull { .. } => "queue_full",
            Self::StoreDown => "store_down",
        }
    }
}

struct Waiter {
    id: u64,
    cost: Cost,
    wake: Arc<Notify>,
}

/// The waiting line of one bucket.
#[derive(Default)]
struct Line {
    classes: ByPriority<VecDeque<Waiter>>,
    /// Total cost queued per class, for predicting waits in O(1).
    queued: ByPriority<Cost>,
    next_id: u64,
}

/// A request let through by [`BucketQueue::admit`].
#[derive(Debug, PartialEq, Eq)]
pub struct Admitted {
    /// Time spent queued.
    pub waited: Duration,
    /// Set when this request is the gate's probe.
    pub probe: Option<Probe>,
    /// The reservation's id in the budget.
    pub ticket: Ticket,
}

impl Line {
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

    /// `cost` plus everything queued that goes before a request of `priority`.
    fn cost_ahead(&self, priority: Priority, cost: Cost) -> Cost {
        let mut total = cost;
        let classes: &[Priority] = match priority {
            Priority::Interactive => &[Priority::Interactive],
            Priority::Batch => &[Priority::Interactive, Priority::Batch],
        };
        for &class in classes {
            total.requests += self.queued[class].requests;
            total.tokens += self.queued[class].tokens;
        }
        total
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

/// The budget and the waiting line of one (organization, model).
pub struct BucketQueue {
    pub org: Arc<str>,
    pub model: Arc<str>,
    bounds: Arc<QueueBounds>,
    budget: Budget,
    line: Mutex<Line>,
}

impl BucketQueue {
    /// A bucket with the configured `limits`; `learn` sends its first request alone while
    /// no limit is known, to learn them from the upstream's headers; its budget lives in
    /// `store` when replicas share it.
    pub(crate) fn new(
        org: Arc<str>,
        model: Arc<str>,
        limits: Limits,
        learn: bool,
        bounds: Arc<QueueBounds>,
        store: Option<Arc<Store>>,
    ) -> Self {
        let budget = Budget::new(
            Arc::clone(&org),
            Arc::clone(&model),
            limits,
            learn,
            Arc::clone(&bounds),
            store,
        );
        Self {
            org,
            model,
            bounds,
            budget,
            line: Mutex::new(Line::default()),
        }
    }

    fn line(&self) -> MutexGuard<'_, Line> {
        // The line is a list of waiters; a panic elsewhere cannot leave it inconsistent in a
        // way that matters more than stopping admission entirely; keep serving.
        self.line
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wakes the heads when `changed`: the budget moved in a way that may let them go.
    fn wake_if(&self, changed: bool) {
        if changed {
            self.line().wake_head();
        }
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
        match self.budget.check_size(cost, arrived) {
            Ok(changed) => self.wake_if(changed),
            Err(never) => return Err(too_large(never, cost)),
        }
        if self.line().nobody_ahead(priority) {
            match self.budget.take(cost, priority, arrived).await {
                Go::Now(ticket, probe) => {
                    return Ok(Admitted {
                        waited: Duration::ZERO,
                        probe,
                        ticket,
                    })
                }
                Go::Never(never) => return Err(too_large(never, cost)),
                Go::Unavailable => return Err(Rejection::StoreDown),
                Go::At(_) | Go::Hold => {}
            }
        }
        let wake = Arc::new(Notify::new());
        let id = {
            let mut line = self.line();
            let ahead = line.cost_ahead(priority, cost);
            let wait = self.budget.projected_wait(ahead, priority, arrived);
            let depth = line.classes.interactive.len() + line.classes.batch.len();
            if depth >= self.bounds.max_depth_per_bucket.load(Ordering::Relaxed) {
                return Err(Rejection::QueueFull { depth, wait });
            }
            if arrived + wait > deadline {
                let (resource, limit) = self.budget.binding_limit(ahead, priority, arrived);
                return Err(Rejection::Deadline {
                    resource,
                    limit,
                    wait,
                    waited: Duration::ZERO,
                });
            }
            let total = self.bounds.depth.fetch_add(1, Ordering::Relaxed);
            if total >= self.bounds.max_depth.load(Ordering::Relaxed) {
                self.bounds.depth.fetch_sub(1, Ordering::Relaxed);
                return Err(Rejection::QueueFull { depth: total, wait });
            }
            let id = line.next_id;
            line.next_id += 1;
            line.classes[priority].push_back(Waiter {
                id,
                cost,
                wake: Arc::clone(&wake),
            });
            let queued = &mut line.queued[priority];
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
            let is_head = self.line().current_head() == Some((priority, id));
            // `None`: nothing to time, wait to be woken (or for the deadline).
            let next_try = if is_head {
                match self.budget.take(cost, priority, now).await {
                    Go::Now(ticket, probe) => {
                        let mut line = self.line();
                        line.remove(priority, id);
                        place.queued = false;
                        self.bounds.depth.fetch_sub(1, Ordering::Relaxed);
                        // The next in line may fit too.
                        line.wake_head();
                        return Ok(Admitted {
                            waited: now.saturating_duration_since(arrived),
                            probe,
                            ticket,
                        });
                    }
                    Go::At(at) => Some(at),
                    Go::Hold => None,
                    // The limits shrank below this request while it waited.
                    Go::Never(never) => return Err(too_large(never, cost)),
                    Go::Unavailable => return Err(Rejection::StoreDown),
                }
            } else {
                None
            };
            if next_try.is_some_and(|at| at > deadline) || now >= deadline {
                let (resource, limit) = self.budget.binding_limit(cost, priority, now);
                return Err(Rejection::Deadline {
                    resource,
                    limit,
                    wait: self.budget.projected_wait(cost, priority, now),
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

    /// Ends reservation `ticket` in the bucket, and wakes the heads if budget came back.
    pub(crate) fn settle(&self, ticket: Ticket, settle: Settle, correction: Option<Correction>) {
        let refunded = self.budget.settle(ticket, settle, correction);
        self.wake_if(refunded);
    }

    /// Replaces the configured limits, keeping what was spent, and wakes the heads (see
    /// [`Budget::set_limits`]).
    pub fn set_limits(&self, limits: Limits, generation: u64) {
        let changed = self.budget.set_limits(limits, generation);
        self.wake_if(changed);
    }

    /// Whether the bucket has configured limits (not only learned ones).
    pub fn is_configured(&self) -> bool {
        self.budget.is_configured()
    }

    /// A request holding `cost` is being sent upstream (again, for a replay).
    pub fn dispatched(&self, cost: Cost) -> Mark {
        self.budget.dispatched(cost)
    }

    /// The send at `mark` never reached the upstream (its connection was refused).
    pub fn undispatched(&self, mark: Mark) {
        self.budget.undispatched(mark);
    }

    /// Corrects the bucket with the headers of a response to the send at `mark` (see
    /// [`Budget::observe`]); a shared bucket's correction comes back, for the settlement.
    pub(crate) fn observe(
        &self,
        mark: Mark,
        sent: Option<Sent>,
        headers: &RateLimitHeaders,
    ) -> Option<Correction> {
        let (changed, correction) = self.budget.observe(mark, sent, headers);
        self.wake_if(changed);
        correction
    }

    /// The upstream answered a request of this bucket without a rate limit.
    pub fn answered(&self, probe: Option<Probe>) {
        self.budget.answered(probe);
        self.wake_if(true);
    }

    /// A probe ended without an answer (cancelled, failed to connect).
    pub fn abandon_probe(&self, probe: Probe) {
        self.budget.abandon_probe(probe);
        self.wake_if(true);
    }

    /// The upstream answered 429 for a request of this bucket (see
    /// [`Budget::rate_limited`]). Returns whether the circuit opened.
    pub fn rate_limited(&self, rate_limited: RateLimited) -> bool {
        let opened = self.budget.rate_limited(rate_limited);
        // Whoever waited on a probe looks again (and finds the pause).
        self.wake_if(true);
        opened
    }

    /// Waits, holding the request's reservation, until the bucket may send it again: after
    /// the pause, before anything new, and once the bucket has `again` for it (the upstream
    /// counted the refused attempt, so sending it again spends once more: several refused
    /// requests go again at the refill rate, not all at once). Returns the gate's probe if
    /// this re-send is one, or the remaining wait when it cannot go before `deadline`.
    pub(crate) async fn replay(
        &self,
        again: Cost,
        deadline: Instant,
    ) -> Result<(Option<Probe>, Option<Sent>), Duration> {
        self.budget.add_replay();
        let _replay = ReplayGuard { queue: self };
        loop {
            let now = Instant::now();
            let until = match self.budget.take_again(again, now).await {
                Again::Now(probe, sent) => return Ok((probe, sent)),
                Again::At(until) if until > deadline => {
                    return Err(until.saturating_duration_since(now));
                }
                Again::At(until) => until,
                // Another request is probing the circuit: look again shortly.
                Again::Hold if now >= deadline => return Err(Duration::from_secs(1)),
                Again::Hold => (now + Duration::from_millis(50)).min(deadline),
            };
            tokio::time::sleep_until(until).await;
        }
    }

    /// What the status view and metrics show of this bucket.
    pub fn status(&self) -> BucketStatus {
        let mut status = self.budget.status();
        status.depth = self.depth();
        status
    }

    /// Requests waiting per class.
    pub fn depth(&self) -> ByPriority<usize> {
        self.line().depth()
    }

    /// Units available now (negative in debt); `None` when unlimited.
    pub fn available(&self, resource: Resource) -> Option<f64> {
        self.budget.available(resource)
    }
}

/// Leaves the replay line however the replay ends.
struct ReplayGuard<'a> {
    queue: &'a BucketQueue,
}

impl Drop for ReplayGuard<'_> {
    fn drop(&mut self) {
        self.queue.budget.remove_replay();
        self.queue.wake_if(true);
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
            let mut line = self.queue.line();
            if line.remove(self.priority, self.id) {
                self.queue.bounds.depth.fetch_sub(1, Ordering::Relaxed);
            }
            line.wake_head();
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
    use crate::config::QueueConfig;
    use crate::limiter::budget::Evidence;
    use crate::upstream::ratelimit::Reason;

    /// Waiting requests as (interactive, batch).
    fn depth(queue: &BucketQueue) -> (usize, usize) {
        let depth = queue.depth();
        (depth.interactive, depth.batch)
    }

    /// A queue whose bucket's burst is proven (the proof has tests of its own).
    fn queue(limits: Limits, reserve: f64, max_depth: usize) -> Arc<BucketQueue> {
        let queue = unproven_queue(limits, reserve, max_depth);
        queue.budget.prove_burst();
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
            None,
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
        let drained = queue
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
        queue.settle(
            drained.ticket,
            Settle::Debt(Cost {
                requests: 0,
                tokens: 100,
            }),
            None,
        );
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
        let drained = queue
            .admit(Cost::request(600), Priority::Interactive, far())
            .await
            .expect("drain");
        let log = Arc::new(Mutex::new(Vec::new()));
        let waiting = spawn_admit(&queue, 300, Priority::Interactive, "w", &log);
        settle_tasks().await;
        tokio::time::advance(Duration::from_secs(1)).await;
        queue.settle(drained.ticket, Settle::Refund(Cost::request(300)), None);
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
        queue.observe(c, None, &remaining_requests(120, 119));
        queue.observe(b, None, &remaining_requests(120, 118));
        queue.observe(a, None, &remaining_requests(120, 117));
        // a's 117 already counts b and c (their answers showed more left): 117 are left, not
        // 115.
        assert_eq!(queue.available(Resource::Requests), Some(117.0));

        // A send whose answer has not come back is not counted by an earlier header.
        let d = queue.dispatched(Cost::request(0));
        queue.observe(b, None, &remaining_requests(120, 118));
        assert_eq!(queue.available(Resource::Requests), Some(117.0));
        queue.observe(c, None, &remaining_requests(120, 116));
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
