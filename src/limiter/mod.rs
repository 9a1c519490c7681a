//! Admission control: a bucket and a queue per (organization, model), and the reservation a
//! request holds while it runs.
//!
//! The queue ([`queue`]) is the waiting line; what it waits for is the bucket's [`budget`],
//! the one interface to a bucket's level, pause and learned limits (see that module for the
//! seam it is).
//!
//! A reservation has exactly two exits: settled against the actual usage once the upstream
//! has answered, or refunded when dropped before the request reached the upstream (client
//! gone, rejected, failed before sending).

mod bounds;
pub(crate) mod bucket;
pub(crate) mod budget;
pub(crate) mod gate;
mod learn;
pub(crate) mod queue;
mod reservation;
pub(crate) mod status;
pub(crate) mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::QueueConfig;
use crate::priority::Priority;
use bounds::QueueBounds;
use bucket::{Cost, Limits};
use queue::{BucketQueue, Rejection};
pub(crate) use reservation::{Charged, Reservation};
use store::Store;

/// How often at most a full bucket table is logged: a flood of made-up names hits the cap
/// on every request, and one line per request would be a flood of its own.
const CAP_LOG_EVERY: Duration = Duration::from_secs(60);

/// How long after a search for idle learned buckets found none the next search waits: the
/// search walks every bucket under the table's write lock, and while every bucket is busy
/// each new name would repeat it for nothing.
const EVICTION_BACKOFF: Duration = Duration::from_millis(100);

/// A bucket, and when it was last looked up (a tick of [`Limiter::clock`], for LRU order).
struct Slot {
    queue: Arc<BucketQueue>,
    used: AtomicU64,
}

/// Buckets by org, then by model, and what the cap has done to them.
#[derive(Default)]
struct Table {
    orgs: HashMap<Arc<str>, HashMap<Arc<str>, Slot>>,
    len: usize,
    evicted: u64,
    unmetered: u64,
    beyond_cap: u64,
    /// When no idle bucket was found last; searches wait [`EVICTION_BACKOFF`] after it.
    found_none_at: Option<Instant>,
    /// When the cap was last logged, and what happened since (for the next line).
    logged_at: Option<Instant>,
    since_log: CapEvents,
}

/// What the bucket cap did since it was last logged.
#[derive(Clone, Copy, Debug, Default)]
struct CapEvents {
    evicted: u64,
    unmetered: u64,
    beyond_cap: u64,
}

/// The bucket table's figures, for metrics: how many buckets exist and what the cap did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BucketCounts {
    pub buckets: usize,
    /// Idle learned buckets removed to make room.
    pub evicted: u64,
    /// Requests of an unconfigured (org, model) forwarded without a bucket: the cap was
    /// reached and no learned bucket was idle.
    pub unmetered: u64,
    /// Buckets with configured limits created beyond the cap (no learned bucket was idle).
    pub beyond_cap: u64,
}

/// Every bucket, by org then model.
///
/// Org and model names come from requests (made-up keys, model fields), so the table is
/// bounded by `queue.max_buckets`, which buckets of both kinds count toward. Buckets with
/// configured limits are always created and never evicted: evicting one would hand its org a
/// fresh budget. Learned buckets (no
/// configured limits: they exist only to learn the upstream's) make room for new ones when
/// the cap is reached: the least recently used idle ones are evicted. When none is idle, an
/// unconfigured pair is forwarded unmetered, and a configured one gets its bucket beyond the
/// cap; both are counted and logged (at most every [`CAP_LOG_EVERY`]).
pub struct Limiter {
    table: RwLock<Table>,
    /// Ticks once per lookup: the order buckets were last used in.
    clock: AtomicU64,
    max_buckets: AtomicUsize,
    bounds: Arc<QueueBounds>,
    /// Where buckets keep their levels and pauses when replicas share them.
    store: Option<Arc<Store>>,
}

impl Limiter {
    /// The limiter of one process; its buckets share their budgets through `store`, if any.
    pub(crate) fn new(
        config: &QueueConfig,
        circuit_threshold: u32,
        store: Option<Arc<Store>>,
    ) -> Self {
        Self {
            table: RwLock::new(Table::default()),
            clock: AtomicU64::new(0),
            max_buckets: AtomicUsize::new(config.max_buckets),
            bounds: Arc::new(QueueBounds::new(config, circuit_threshold)),
            store,
        }
    }

    /// The shared store, when one is configured.
    pub(crate) fn store(&self) -> Option<&Arc<Store>> {
        self.store.as_ref()
    }

    /// Takes a reloaded configuration: new queue bounds and bucket cap (a lowered cap is
    /// reached by evicting as new buckets come), and each configured org's new limits
    /// (`limits_of(org, model)`) in its existing buckets, which keep what they have spent and
    /// let their queues move on at once if the limits rose.
    pub fn reconfigure(
        &self,
        config: &QueueConfig,
        generation: u64,
        limits_of: impl Fn(&str, &str) -> Limits,
    ) {
        self.bounds.update(config);
        self.max_buckets
            .store(config.max_buckets, Ordering::Relaxed);
        for queue in self.buckets() {
            queue.set_limits(limits_of(&queue.org, &queue.model), generation);
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The bucket of (org, model), created with `limits` on first use; an existing bucket
    /// takes `limits` in place (keeping what it has spent) if they changed and come from a
    /// configuration (`generation`) no older than its own. A new bucket without limits is
    /// created only to `learn` them. `None` when nothing meters the pair: no limits and
    /// nothing to learn, or a learned bucket that found the cap reached with no learned
    /// bucket idle (see [`Limiter`]). A bucket with limits is always returned.
    pub fn bucket(
        &self,
        org: &Arc<str>,
        model: &str,
        limits: Limits,
        generation: u64,
        learn: bool,
    ) -> Option<Arc<BucketQueue>> {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let existing = self
            .read()
            .orgs
            .get(org)
            .and_then(|models| models.get(model))
            .map(|slot| {
                slot.used.store(tick, Ordering::Relaxed);
                Arc::clone(&slot.queue)
            });
        if let Some(queue) = existing {
            queue.set_limits(limits, generation);
            return Some(queue);
        }
        if limits.is_empty() && !learn {
            return None;
        }
        let mut table = self.write();
        if let Some(slot) = table.orgs.get(org).and_then(|models| models.get(model)) {
            slot.used.store(tick, Ordering::Relaxed);
            return Some(Arc::clone(&slot.queue));
        }
        let configured = !limits.is_empty();
        let max = self.max_buckets.load(Ordering::Relaxed);
        let mut events = CapEvents::default();
        if table.len >= max {
            let now = Instant::now();
            let backing_off = table
                .found_none_at
                .is_some_and(|at| now.saturating_duration_since(at) < EVICTION_BACKOFF);
            if !backing_off {
                // Back under the cap (configured buckets may have pushed it over), and a
                // batch more: each search walks the whole table.
                let batch = (table.len - max + 1).max(max / 64);
                let evicted = table.evict_idle(batch);
                table.found_none_at = (evicted == 0).then_some(now);
                events.evicted = evicted as u64;
            }
            if table.len >= max {
                if configured {
                    events.beyond_cap = 1;
                } else {
                    events.unmetered = 1;
                }
            }
            let line = table.record(events, now);
            if events.unmetered > 0 {
                drop(table);
                log_cap(line, max, org, model);
                return None;
            }
            // Logged after the bucket is in place, outside the lock.
            let queue = table.insert(
                org,
                model,
                limits,
                generation,
                learn,
                (&self.bounds, &self.store),
                tick,
            );
            drop(table);
            log_cap(line, max, org, model);
            return Some(queue);
        }
        Some(table.insert(
            org,
            model,
            limits,
            generation,
            learn,
            (&self.bounds, &self.store),
            tick,
        ))
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
        Ok(Some(Reservation::new(queue, cost, admitted)))
    }

    /// Every bucket, for status and metrics. Holding them keeps them from being evicted, so
    /// callers let go soon.
    pub fn buckets(&self) -> Vec<Arc<BucketQueue>> {
        self.read()
            .orgs
            .values()
            .flat_map(|models| models.values().map(|slot| Arc::clone(&slot.queue)))
            .collect()
    }

    /// How many buckets exist, and what the cap has done so far.
    pub fn counts(&self) -> BucketCounts {
        let table = self.read();
        BucketCounts {
            buckets: table.len,
            evicted: table.evicted,
            unmetered: table.unmetered,
            beyond_cap: table.beyond_cap,
        }
    }
}

impl Table {
    #[allow(clippy::too_many_arguments)]
    fn insert(
        &mut self,
        org: &Arc<str>,
        model: &str,
        limits: Limits,
        generation: u64,
        learn: bool,
        (bounds, store): (&Arc<QueueBounds>, &Option<Arc<Store>>),
        tick: u64,
    ) -> Arc<BucketQueue> {
        let model: Arc<str> = Arc::from(model);
        let queue = Arc::new(BucketQueue::new(
            Arc::clone(org),
            Arc::clone(&model),
            limits,
            learn,
            Arc::clone(bounds),
            store.clone(),
        ));
        queue.set_limits(limits, generation);
        self.orgs.entry(Arc::clone(org)).or_default().insert(
            model,
            Slot {
                queue: Arc::clone(&queue),
                used: AtomicU64::new(tick),
            },
        );
        self.len += 1;
        queue
    }

    /// Removes up to `batch` idle learned buckets, least recently used first; returns how
    /// many. Idle: nothing but this table holds the bucket. Every reservation (queued,
    /// admitted, in flight, replaying) holds its bucket's `Arc`, and new holders are made only
    /// from the table, under its lock, which the caller holds: a count of one cannot rise
    /// while this runs.
    fn evict_idle(&mut self, batch: usize) -> usize {
        let mut idle: Vec<(u64, Arc<str>, Arc<str>)> = self
            .orgs
            .iter()
            .flat_map(|(org, models)| {
                models
                    .iter()
                    .filter(|(_, slot)| {
                        Arc::strong_count(&slot.queue) == 1 && !slot.queue.is_configured()
                    })
                    .map(move |(model, slot)| {
                        let used = slot.used.load(Ordering::Relaxed);
                        (used, Arc::clone(org), Arc::clone(model))
                    })
            })
            .collect();
        if idle.len() > batch {
            idle.select_nth_unstable_by_key(batch - 1, |(used, _, _)| *used);
            idle.truncate(batch);
        }
        for (_, org, model) in &idle {
            if let Some(models) = self.orgs.get_mut(org) {
                models.remove(model);
                if models.is_empty() {
                    self.orgs.remove(org);
                }
            }
        }
        self.len -= idle.len();
        self.evicted += idle.len() as u64;
        idle.len()
    }

    /// Counts what the cap did; returns what to log, if a line is due.
    fn record(&mut self, events: CapEvents, now: Instant) -> Option<CapEvents> {
        self.unmetered += events.unmetered;
        self.beyond_cap += events.beyond_cap;
        self.since_log.evicted += events.evicted;
        self.since_log.unmetered += events.unmetered;
        self.since_log.beyond_cap += events.beyond_cap;
        let due = self
            .logged_at
            .is_none_or(|at| now.saturating_duration_since(at) >= CAP_LOG_EVERY);
        if !due {
            return None;
        }
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.since_log))
    }
}

/// Logs the cap's events since the last line (the request that made the line due names its
/// pair: an example of what fills the table).
fn log_cap(line: Option<CapEvents>, max: usize, org: &str, model: &str) {
    let Some(events) = line else {
        return;
    };
    tracing::warn!(
        max_buckets = max,
        evicted = events.evicted,
        unmetered = events.unmetered,
        beyond_cap = events.beyond_cap,
        org,
        model,
        "bucket cap (queue.max_buckets) reached: idle learned buckets evicted; with none idle, \
         unconfigured pairs are forwarded unmetered and configured ones get buckets beyond it \
         (counts since the last such line)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use bucket::Resource;
    use std::time::Duration;

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
                max_buckets: 10_000,
            }
        }
    }

    fn limiter() -> Limiter {
        Limiter::new(&Limiter::test_queue_config(), 3, None)
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

    fn capped(max_buckets: usize) -> Limiter {
        let config = QueueConfig {
            max_buckets,
            ..Limiter::test_queue_config()
        };
        Limiter::new(&config, 3, None)
    }

    fn learned(limiter: &Limiter, org: &str, model: &str) -> Option<Arc<BucketQueue>> {
        limiter.bucket(&Arc::from(org), model, Limits::default(), 0, true)
    }

    fn has(limiter: &Limiter, org: &str, model: &str) -> bool {
        limiter
            .buckets()
            .iter()
            .any(|queue| &*queue.org == org && &*queue.model == model)
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_evicts_idle_learned_buckets_least_recently_used_first() {
        let limiter = capped(3);
        let acme: Arc<str> = Arc::from("acme");
        let configured = limiter.bucket(&acme, "m", tpm(1000), 0, true);
        assert!(configured.is_some());
        drop(configured);
        learned(&limiter, "a", "m").expect("room");
        learned(&limiter, "b", "m").expect("room");
        // "a" was used after "b": "b" is the least recently used.
        learned(&limiter, "a", "m").expect("exists");
        learned(&limiter, "c", "m").expect("room made");
        assert!(has(&limiter, "a", "m") && has(&limiter, "c", "m"));
        assert!(
            !has(&limiter, "b", "m"),
            "the least recently used learned bucket went"
        );
        assert!(
            has(&limiter, "acme", "m"),
            "a configured bucket is never evicted"
        );
        let counts = limiter.counts();
        assert_eq!(
            (counts.buckets, counts.evicted, counts.unmetered),
            (3, 1, 0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn busy_buckets_stay_and_configured_ones_are_never_refused() {
        let limiter = capped(2);
        let far = Instant::now() + Duration::from_secs(60);
        let org: Arc<str> = Arc::from("a");
        let reservation = limiter
            .admit(
                &org,
                "m",
                Limits::default(),
                0,
                true,
                Cost::request(1),
                Priority::Interactive,
                far,
            )
            .await
            .expect("admitted")
            .expect("a learned bucket");
        let held = learned(&limiter, "b", "m").expect("room");
        // Both are busy (a reservation, a holder): nothing to evict.
        assert!(learned(&limiter, "c", "m").is_none(), "forwarded unmetered");
        let acme: Arc<str> = Arc::from("acme");
        assert!(
            limiter.bucket(&acme, "m", tpm(1000), 0, true).is_some(),
            "a configured bucket goes beyond the cap"
        );
        let counts = limiter.counts();
        assert_eq!(
            (
                counts.buckets,
                counts.evicted,
                counts.unmetered,
                counts.beyond_cap
            ),
            (3, 0, 1, 1)
        );
        // Once idle, the learned ones make room again (after the search's back-off).
        drop(reservation);
        drop(held);
        tokio::time::advance(EVICTION_BACKOFF).await;
        learned(&limiter, "c", "m").expect("room made");
        assert!(has(&limiter, "acme", "m"));
        assert!(limiter.counts().evicted >= 1);
    }
}
