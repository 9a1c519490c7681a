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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::limiter::bucket::{Bucket, Cost, Limits, Resource, Shortfall};

/// Which class a request waits in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    #[default]
    Interactive,
    Batch,
}

impl Priority {
    /// Parses the `x-sluice-priority` header value; `None` when unrecognized.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "interactive" => Some(Self::Interactive),
            "batch" => Some(Self::Batch),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Interactive => "interactive",
            Self::Batch => "batch",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Interactive => 0,
            Self::Batch => 1,
        }
    }
}

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

/// The queue-wide bounds, shared by every bucket.
#[derive(Debug)]
pub struct QueueBounds {
    pub max_depth: usize,
    pub max_depth_per_bucket: usize,
    pub interactive_reserve: f64,
    /// Refill left unused in every bucket (see [`Bucket::with_margin`]).
    pub refill_margin: Duration,
    /// Requests waiting in all buckets.
    pub depth: AtomicUsize,
}

struct Waiter {
    id: u64,
    cost: Cost,
    wake: Arc<Notify>,
}

struct State {
    bucket: Bucket,
    limits: Limits,
    classes: [VecDeque<Waiter>; 2],
    /// Total cost queued per class, for predicting waits in O(1).
    queued: [Cost; 2],
    next_id: u64,
}

impl State {
    fn keep(&self, priority: Priority, bounds: &QueueBounds) -> f64 {
        match priority {
            Priority::Interactive => 0.0,
            Priority::Batch => bounds.interactive_reserve,
        }
    }

    /// Whether nobody waits ahead of a new request of this priority.
    fn nobody_ahead(&self, priority: Priority) -> bool {
        match priority {
            Priority::Interactive => self.classes[0].is_empty(),
            Priority::Batch => self.classes[0].is_empty() && self.classes[1].is_empty(),
        }
    }

    /// The head that may take next: the interactive head, else the batch head.
    fn current_head(&self) -> Option<(Priority, u64)> {
        if let Some(waiter) = self.classes[0].front() {
            return Some((Priority::Interactive, waiter.id));
        }
        self.classes[1]
            .front()
            .map(|waiter| (Priority::Batch, waiter.id))
    }

    fn remove(&mut self, priority: Priority, id: u64) -> bool {
        let class = &mut self.classes[priority.index()];
        let Some(position) = class.iter().position(|waiter| waiter.id == id) else {
            return false;
        };
        if let Some(waiter) = class.remove(position) {
            let queued = &mut self.queued[priority.index()];
            queued.requests -= waiter.cost.requests;
            queued.tokens -= waiter.cost.tokens;
        }
        true
    }

    fn wake_head(&self) {
        for class in &self.classes {
            if let Some(head) = class.front() {
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
    state: Mutex<State>,
}

impl BucketQueue {
    pub fn new(org: Arc<str>, model: Arc<str>, limits: Limits, bounds: Arc<QueueBounds>) -> Self {
        let now = Instant::now();
        let bucket = Bucket::with_margin(&limits, bounds.refill_margin, now);
        Self {
            org,
            model,
            bounds,
            state: Mutex::new(State {
                bucket,
                limits,
                classes: [VecDeque::new(), VecDeque::new()],
                queued: [Cost::default(); 2],
                next_id: 0,
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

    /// Waits until `cost` is taken from the bucket, or rejects. Cancel-safe: dropping the
    /// future leaves the queue and wakes whoever is next.
    pub async fn admit(
        &self,
        cost: Cost,
        priority: Priority,
        deadline: Instant,
    ) -> Result<Duration, Rejection> {
        let arrived = Instant::now();
        let wake = Arc::new(Notify::new());
        let id = {
            let mut state = self.lock();
            let keep = state.keep(priority, &self.bounds);
            if let Err(never) = state.bucket.fits_ever(cost) {
                return Err(too_large(never, cost));
            }
            if state.nobody_ahead(priority) {
                match state.bucket.try_take(cost, keep, arrived) {
                    Ok(()) => return Ok(Duration::ZERO),
                    Err(Shortfall::Wait { .. }) => {}
                    Err(never) => return Err(too_large(never, cost)),
                }
            }
            let ahead = self.cost_ahead(&state, priority, cost);
            let wait = state.bucket.projected_wait(ahead, keep, arrived);
            let depth = state.classes[0].len() + state.classes[1].len();
            if depth >= self.bounds.max_depth_per_bucket {
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
            if total >= self.bounds.max_depth {
                self.bounds.depth.fetch_sub(1, Ordering::Relaxed);
                return Err(Rejection::QueueFull { depth: total, wait });
            }
            let id = state.next_id;
            state.next_id += 1;
            state.classes[priority.index()].push_back(Waiter {
                id,
                cost,
                wake: Arc::clone(&wake),
            });
            let queued = &mut state.queued[priority.index()];
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
            let next_try = {
                let mut state = self.lock();
                let keep = state.keep(priority, &self.bounds);
                if state.current_head() == Some((priority, id)) {
                    match state.bucket.try_take(cost, keep, now) {
                        Ok(()) => {
                            state.remove(priority, id);
                            place.queued = false;
                            self.bounds.depth.fetch_sub(1, Ordering::Relaxed);
                            // The next in line may fit too.
                            state.wake_head();
                            return Ok(now.saturating_duration_since(arrived));
                        }
                        Err(Shortfall::Wait { wait, .. }) => Some(now + wait),
                        // The limits shrank below this request while it waited.
                        Err(never) => return Err(too_large(never, cost)),
                    }
                } else {
                    None
                }
            };
            if next_try.is_some_and(|at| at > deadline) || now >= deadline {
                let mut state = self.lock();
                let keep = state.keep(priority, &self.bounds);
                let resource = self.binding_resource(&mut state, cost, keep, now);
                let wait = state.bucket.projected_wait(cost, keep, now);
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
        let classes: &[usize] = match priority {
            Priority::Interactive => &[0],
            Priority::Batch => &[0, 1],
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

    /// Replaces the limits, keeping what was spent, and wakes the heads.
    pub fn set_limits(&self, limits: Limits) {
        let mut state = self.lock();
        if state.limits != limits {
            state.bucket.set_limits(&limits, Instant::now());
            state.limits = limits;
            state.wake_head();
        }
    }

    /// Requests waiting per class: (interactive, batch).
    pub fn depth(&self) -> (usize, usize) {
        let state = self.lock();
        (state.classes[0].len(), state.classes[1].len())
    }

    /// Units available now (negative in debt); `None` when unlimited.
    pub fn available(&self, resource: Resource) -> Option<f64> {
        self.lock().bucket.available(resource, Instant::now())
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

fn too_large(shortfall: Shortfall, cost: Cost) -> Rejection {
    match shortfall {
        Shortfall::Never {
            resource,
            limit,
            window,
        } => Rejection::TooLarge {
            resource,
            limit,
            window,
            requested: match resource {
                Resource::Requests => cost.requests,
                Resource::Tokens => cost.tokens,
            },
        },
        // Only `Never` is passed here; a wait is not a size problem.
        Shortfall::Wait { wait, resource } => Rejection::Deadline {
            resource,
            limit: None,
            wait,
            waited: Duration::ZERO,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn queue(limits: Limits, reserve: f64, max_depth: usize) -> Arc<BucketQueue> {
        Arc::new(BucketQueue::new(
            Arc::from("acme"),
            Arc::from("gpt-4o"),
            limits,
            Arc::new(QueueBounds {
                max_depth,
                max_depth_per_bucket: max_depth,
                interactive_reserve: reserve,
                refill_margin: Duration::ZERO,
                depth: AtomicUsize::new(0),
            }),
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
    ) -> tokio::task::JoinHandle<Result<Duration, Rejection>> {
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
        assert_eq!(queue.depth(), (0, 0));
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
        assert_eq!(queue.depth(), (1, 1));
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
        assert_eq!(waited, Duration::from_secs(3));
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        // Interactive traffic can still use the reserve.
        let waited = queue
            .admit(Cost::request(240), Priority::Interactive, far())
            .await
            .expect("fits");
        assert_eq!(waited, Duration::ZERO);
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
        assert_eq!(queue.depth(), (0, 0));
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
        assert_eq!(queue.depth(), (2, 0));
        first.abort();
        let _ = first.await;
        assert_eq!(queue.depth(), (1, 0));
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
}
