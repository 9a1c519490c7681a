//! The storage seam: one bucket's budget, and everything the upstream taught it.
//!
//! A [`Budget`] holds what a bucket knows and spends: its level (the [`Bucket`]), the limits
//! in force (configured, learned from headers, and the tighter of the two), the gate (the
//! pause after a 429, the circuit, the probes), and the last 429 for the status view. The
//! waiting line ([`super::queue`]) and the reservation reach it only through the methods
//! below, and never hold the line's lock across [`Budget::take`], so the state can live
//! somewhere other than this process (a store shared by replicas) behind the same calls:
//!
//! - **admission** is one round trip, [`Budget::take`] (and [`Budget::take_again`] for a
//!   replay), which takes a request's whole cost or says when to ask again; both are `async`
//!   for that reason, although here they never wait;
//! - **settlement** is [`Budget::settle`], by the [`Ticket`] admission handed out, so a store
//!   that may see a settle twice can refuse the second;
//! - **what the upstream shows** (`dispatched`, `observe`, `answered`, `rate_limited`) and
//!   **configuration** (`set_limits`) change the state in place;
//! - **predictions** (`check_size`, `projected_wait`, `binding_limit`, `status`) read it.
//!
//! Lock order: the line may call in here while holding its own lock; nothing in here calls
//! the line. Methods that may let a waiter go say so (they return `true`, or always do), and
//! the line wakes its heads after them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::limiter::bucket::{Bucket, Cost, Limits, MeterSpec, Oversize, Shortfall, BURST_RETRY};
use crate::limiter::gate::{Gate, Pass, Probe, ProbeOutcome};
use crate::priority::Priority;
use crate::resource::{PerResource, Resource};
use crate::upstream::ratelimit::{RateLimitHeaders, Reason};

use super::bounds::QueueBounds;
use super::learn::{remaining, views, warn_if_above_upstream, Learned, Mark};
use super::status::{BucketStatus, Last429, LastHeaders, Sharing};
use super::store::{Admission, BucketKeys, Correction, Mode, Reply, Sent, Store, StoreError};
use crate::config::OnStoreError;

/// How soon a replay asks again when the shared store failed it.
const STORE_RETRY: Duration = Duration::from_millis(100);

/// A replica sends the store at most one level correction per bucket this often.
const CORRECTION_INTERVAL: Duration = Duration::from_millis(100);

/// How long a settle that failed is tried again (its marker outlives it: see the store).
const SETTLE_PATIENCE: Duration = Duration::from_secs(10);
/// How often within it (the breaker stays open 0.5 s at first).
const SETTLE_RETRY: Duration = Duration::from_millis(500);

/// Hands out reservation ids; unique within the process.
static NEXT_TICKET: AtomicU64 = AtomicU64::new(1);

/// The id of one admission's reservation: what its settlement is recorded under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ticket {
    id: u64,
    /// Taken from the shared store (not from this replica's degraded share): what every
    /// replica had taken then, this admission included.
    shared: Option<Sent>,
}

impl Ticket {
    fn next(shared: Option<Sent>) -> Self {
        Self {
            id: NEXT_TICKET.fetch_add(1, Ordering::Relaxed),
            shared,
        }
    }

    /// The store's send counters when this reservation (or its latest re-send) was taken.
    pub(crate) fn sent(&self) -> Option<Sent> {
        self.shared
    }

    /// A re-send was taken from the store: headers answering it are read against these.
    pub(crate) fn resent(&mut self, sent: Option<Sent>) {
        if sent.is_some() {
            self.shared = sent;
        }
    }
}

/// The outcome of one admission round trip ([`Budget::take`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Go {
    /// The cost is taken; the request goes, as this probe if any.
    Now(Ticket, Option<Probe>),
    /// Not before this instant.
    At(Instant),
    /// Not until woken (a probe's answer, a refund, new limits).
    Hold,
    /// Never: it is larger than a limit.
    Never(Oversize),
    /// The shared store cannot be reached and the configuration says to refuse meanwhile.
    Unavailable,
}

/// The outcome of asking to send a refused request again ([`Budget::take_again`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Again {
    /// It goes now, as this probe if any (with the store's send counters, when shared).
    Now(Option<Probe>, Option<Sent>),
    /// Not before this instant.
    At(Instant),
    /// Another request is probing the circuit: ask again shortly.
    Hold,
}

/// How a reservation ends in its bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Budget comes back: unused output, or a request that never reached the upstream.
    Refund(Cost),
    /// More budget is taken: usage beyond the estimate.
    Debt(Cost),
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

/// What an upstream 429 does to a bucket (see [`Budget::rate_limited`]).
#[derive(Clone, Copy, Debug)]
pub struct RateLimited {
    pub resume: Instant,
    pub reset: Instant,
    pub evidence: Evidence,
    pub probe: Option<Probe>,
    pub reason: Reason,
}

/// The last upstream 429 of a bucket, for the status view.
#[derive(Clone, Copy, Debug)]
struct Refused {
    at: Instant,
    reason: Reason,
    /// How long the bucket paused for it.
    wait: Duration,
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
    last_429: Option<Refused>,
    /// While the shared store is out of reach: this replica's share of the limits.
    degraded: Option<Degraded>,
    /// The version of the store's learned limits this bucket took (see `scripts/learn.lua`).
    version: u64,
    /// The store was asked for learned limits while this bucket was learning its own.
    asked: bool,
    /// When this replica last sent the store a level correction (see [`Budget::observe`]).
    corrected_at: Option<Instant>,
}

/// A replica's share of a bucket while the shared store is out of reach.
struct Degraded {
    share: Bucket,
    /// The replicas the limits were divided by.
    replicas: usize,
    /// What this replica spent from its share and has not charged to the shared bucket.
    spent: Cost,
    /// An admission is carrying the charge to the store (see [`Budget::owe`]).
    owing: bool,
}

/// Where a shared bucket lives in the store.
struct Shared {
    store: Arc<Store>,
    keys: BucketKeys,
}

/// One bucket's budget: in this process's memory, or, with a shared store, its levels and
/// pause in the store (mirrored here for predictions and the status view).
pub(crate) struct Budget {
    org: Arc<str>,
    model: Arc<str>,
    bounds: Arc<QueueBounds>,
    shared: Option<Shared>,
    state: Mutex<State>,
}

impl Budget {
    /// A budget with the configured `limits`; `learn` sends its first request alone while
    /// no limit is known, to learn them from the upstream's headers.
    pub(crate) fn new(
        org: Arc<str>,
        model: Arc<str>,
        limits: Limits,
        learn: bool,
        bounds: Arc<QueueBounds>,
        store: Option<Arc<Store>>,
    ) -> Self {
        let now = Instant::now();
        let bucket = Bucket::with_margin(&limits, bounds.refill_margin, now);
        let gate = Gate::new(learn && limits.is_empty(), bounds.circuit_threshold, now);
        let shared = store.map(|store| Shared {
            keys: store.bucket_keys(&org, &model),
            store,
        });
        Self {
            org,
            model,
            bounds,
            shared,
            state: Mutex::new(State {
                bucket,
                limits,
                configured: limits,
                generation: 0,
                learned: Learned::new(learn),
                gate,
                last_429: None,
                degraded: None,
                version: 0,
                asked: false,
                corrected_at: None,
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

    /// What a request of `priority` leaves in the bucket for others.
    fn keep(&self, priority: Priority) -> f64 {
        match priority {
            Priority::Interactive => 0.0,
            Priority::Batch => self.bounds.interactive_reserve(),
        }
    }

    /// Takes `cost` if the gate and the bucket let a request of `priority` go now: from the
    /// shared store when there is one (one round trip, two for the burst's proof), else
    /// from this process's bucket.
    pub(crate) async fn take(&self, cost: Cost, priority: Priority, now: Instant) -> Go {
        let keep = self.keep(priority);
        self.ask_learned(now).await;
        let (shared, probe, mut specs, in_hand, version, owed) = {
            let mut state = self.lock();
            let probe = match state.gate.check(false, now) {
                Pass::Go(probe) => probe,
                Pass::Until(until) => return Go::At(until),
                Pass::Hold => return Go::Hold,
            };
            // In memory (no store, or nothing to share: a bucket still learning its limits),
            // without building the store's view of the limits.
            let shared = match &self.shared {
                Some(shared) if state.bucket.is_limited() => shared,
                _ => {
                    let State { bucket, gate, .. } = &mut *state;
                    return take_from(bucket, gate, probe, cost, keep, now);
                }
            };
            if let Err(never) = state.bucket.fits_ever(cost) {
                return Go::Never(never);
            }
            if !shared.store.usable() {
                return self.take_degraded(&mut state, shared, probe, cost, keep, now);
            }
            let owed = owe(&mut state);
            let specs = with_debt(state.bucket.specs_at(now), owed);
            // Claimed before the round trip, so no other request takes the same probe
            // meanwhile; given back if the store refuses.
            state.gate.claim(probe, now);
            (
                shared,
                probe,
                specs,
                state.bucket.in_hand(),
                state.version,
                owed,
            )
        };
        // Gives the probes back if the admission does not complete, also when this future is
        // dropped during a round trip (the client left).
        let mut claimed = Claimed {
            budget: self,
            probes: [probe, None],
        };
        let mut owing = Owing { budget: self, owed };
        let store = &shared.store;
        let key = &shared.keys.bucket;
        let mut answer = store
            .admit(key, cost, keep, in_hand, Mode::New, version, &specs)
            .await;
        if let Ok(reply) = &answer {
            self.absorb(reply, now);
            if self.recovered(reply, shared, &mut owing) {
                specs = with_debt(specs, None);
            }
        }
        if let Ok(Reply {
            admission: Admission::Wait { unproven: true, .. },
            ..
        }) = answer
        {
            // Beyond the proven burst: one request goes to prove it (a gate probe already
            // going proves it as well as any), the others wait for its answer or the refill.
            if probe.is_none() {
                let mut state = self.lock();
                if !state.gate.burst_probe_free() {
                    // This replica's proof is out: its answer (which wakes the line) says
                    // more than the refill, which other replicas' spending may have slowed.
                    return Go::Hold;
                }
                state.gate.claim(Some(Probe::Burst), now);
                claimed.probes[1] = Some(Probe::Burst);
            }
            answer = store
                .admit(key, cost, keep, in_hand, Mode::Proof, version, &specs)
                .await;
        }
        let going = probe.or(claimed.probes[1]);
        if let Ok(Reply {
            admission: Admission::Taken { levels },
            sent,
            ..
        }) = &answer
        {
            claimed.probes = [None, None];
            self.lock().bucket.mirror_if_same(&specs, levels, now);
            return Go::Now(Ticket::next(Some(*sent)), going);
        }
        drop(claimed);
        let mut state = self.lock();
        match answer.map(|reply| reply.admission) {
            Ok(Admission::Wait { wait, .. }) => Go::At(now + wait),
            Ok(Admission::Paused(wait)) => {
                // Another replica's 429: this one pauses too, until the same instant.
                state.gate.pause(now + wait);
                Go::At(now + wait)
            }
            // The store failed on this call: from this replica's share, as while it is down.
            Ok(Admission::Taken { .. }) | Err(_) => match state.gate.check(false, now) {
                Pass::Go(probe) => self.take_degraded(&mut state, shared, probe, cost, keep, now),
                Pass::Until(until) => Go::At(until),
                Pass::Hold => Go::Hold,
            },
        }
    }

    /// While this bucket still learns its limits, asks the store once whether another
    /// replica learned them already: a replica that joins late then spends from the shared
    /// bucket from its first request, instead of sending one alone (and uncounted by the
    /// others) to learn them.
    async fn ask_learned(&self, now: Instant) {
        let Some(shared) = &self.shared else { return };
        {
            let mut state = self.lock();
            if state.asked
                || !state.learned.enabled
                || !state.gate.is_learning()
                || state.bucket.is_limited()
                || !shared.store.is_up()
            {
                return;
            }
            state.asked = true;
        }
        let Ok((version, limits)) = shared.store.learned(&shared.keys.bucket).await else {
            return;
        };
        if !limits.is_empty() {
            let mut state = self.lock();
            self.adopt(&mut state, version, limits, now);
        }
    }

    /// Takes what an admission's reply tells beside its answer: limits another replica
    /// learned, or that the store lost this replica's (restarted empty), which are then
    /// published again.
    fn absorb(&self, reply: &Reply, now: Instant) {
        let mut state = self.lock();
        if let Some(limits) = reply.learned {
            if reply.version > state.version {
                self.adopt(&mut state, reply.version, limits, now);
            }
            return;
        }
        // Version 0: nothing published (a store restarted empty, or this replica's own
        // publication still on its way, which publishing again leaves as it is).
        let lost = reply.version == 0 || reply.version < state.version;
        if lost && !state.learned.limits.is_empty() {
            // Taken back from the store with the next admission once published.
            state.version = 0;
            let limits = state.learned.limits;
            let specs = Some(state.bucket.specs());
            self.spawn_on_store(specs, move |store, key, specs| async move {
                store.learn(&key, &limits, &specs).await.map(|_| ())
            });
        }
    }

    /// Takes the learned limits of the store's `version` (another replica's, or this one's
    /// coming back). Returns whether the limits in force changed.
    fn adopt(&self, state: &mut State, version: u64, limits: Limits, now: Instant) -> bool {
        state.version = version;
        if !state.learned.enabled || state.learned.limits == limits {
            return false;
        }
        state.learned.adopt(limits, now);
        warn_if_above_upstream(&self.org, &self.model, &state.configured, &limits);
        tracing::info!(
            org = %self.org,
            model = %self.model,
            rpm = ?limits.rpm,
            tpm = ?limits.tpm,
            rpd = ?limits.rpd,
            tpd = ?limits.tpd,
            "took the upstream's limits another replica learned"
        );
        if !limits.is_empty() {
            state.gate.learned();
        }
        state.apply_limits(now)
    }

    /// The store ran an admission: a replica that was degraded is not any more, and the
    /// admission that carried `owing` (see [`owe`]) charged the shared bucket what this
    /// replica spent from its share meanwhile (the other replicas spent theirs from the same
    /// upstream budget), in the same round trip, so no request admitted right after the
    /// recovery finds budget that was spent. Returns whether the charge was taken (not for a
    /// paused bucket: the script stopped before it).
    fn recovered(&self, reply: &Reply, shared: &Shared, owing: &mut Owing<'_>) -> bool {
        if matches!(reply.admission, Admission::Paused(_)) {
            return false;
        }
        let Some(owed) = owing.owed.take() else {
            return false;
        };
        let mut state = self.lock();
        let Some(degraded) = state.degraded.take() else {
            return true;
        };
        tracing::info!(
            org = %self.org,
            model = %self.model,
            requests = owed.requests,
            tokens = owed.tokens,
            "shared store back: charged the shared bucket what this replica spent meanwhile"
        );
        // Spent from the share while the charge was on its way: charged on its own.
        let left = degraded.spent;
        if left.requests > 0 || left.tokens > 0 {
            let specs = state.bucket.specs();
            let id = NEXT_TICKET.fetch_add(1, Ordering::Relaxed);
            self.spawn_settle(shared, id, specs, left, false, None);
        }
        true
    }

    /// Admission while the shared store is out of reach: from this replica's share of the
    /// limits (never the whole of them), or none (`shared.on_store_error = "fail_closed"`).
    #[allow(clippy::too_many_arguments)]
    fn take_degraded(
        &self,
        state: &mut State,
        shared: &Shared,
        probe: Option<Probe>,
        cost: Cost,
        keep: f64,
        now: Instant,
    ) -> Go {
        if shared.store.on_error() == OnStoreError::FailClosed {
            return Go::Unavailable;
        }
        self.ensure_share(state, shared, now);
        let State { degraded, gate, .. } = state;
        let Some(degraded) = degraded else {
            return Go::Hold;
        };
        let go = take_from(&mut degraded.share, gate, probe, cost, keep, now);
        if matches!(go, Go::Now(..)) {
            degraded.spend(cost, false);
        }
        go
    }

    /// This replica's share of the bucket while the store is out of reach, set up on first
    /// use (and re-divided when the replicas seen alive change).
    fn ensure_share(&self, state: &mut State, shared: &Shared, now: Instant) {
        let replicas = shared.store.replicas();
        let limits = state.limits.share(replicas);
        match &mut state.degraded {
            Some(degraded) if degraded.replicas != replicas => {
                // A changed share keeps what was spent.
                degraded.share.set_limits(&limits, now);
                degraded.replicas = replicas;
            }
            Some(_) => {}
            None => {
                tracing::info!(
                    org = %self.org,
                    model = %self.model,
                    replicas,
                    rpm = ?limits.rpm,
                    tpm = ?limits.tpm,
                    "shared store out of reach: admitting from this replica's share"
                );
                let mut bucket = Bucket::with_margin(&limits, self.bounds.refill_margin, now);
                if state.bucket.is_proven() {
                    // What the upstream proved of the whole burst holds for a share of it.
                    bucket.burst_proven();
                }
                // Not a full share: this replica's share of what the shared bucket had left
                // when it was last seen (spent by every replica, and not refilled since).
                let left: Vec<f64> = state
                    .bucket
                    .levels(now)
                    .into_iter()
                    .map(|level| level / replicas as f64)
                    .collect();
                bucket.mirror(&left, now);
                state.degraded = Some(Degraded {
                    share: bucket,
                    replicas,
                    spent: Cost::default(),
                    owing: false,
                });
            }
        }
    }

    /// Takes `again` for a refused request to be sent once more: after the pause, and
    /// before anything new (it ignores the reserve and the burst proof; limits that shrank
    /// below it do not strand it mid-replay).
    pub(crate) async fn take_again(&self, again: Cost, now: Instant) -> Again {
        let (shared, probe, specs, in_hand, version, owed) = {
            let mut state = self.lock();
            let probe = match state.gate.check(true, now) {
                Pass::Go(probe) => probe,
                Pass::Until(until) => return Again::At(until),
                Pass::Hold => return Again::Hold,
            };
            let limited = state.bucket.is_limited();
            match &self.shared {
                Some(shared) if limited && shared.store.is_up() => {
                    state.gate.claim(probe, now);
                    let owed = owe(&mut state);
                    let specs = with_debt(state.bucket.specs_at(now), owed);
                    (
                        shared,
                        probe,
                        specs,
                        state.bucket.in_hand(),
                        state.version,
                        owed,
                    )
                }
                Some(shared) if limited => {
                    if shared.store.on_error() == OnStoreError::FailClosed {
                        // Holding its reservation, the replay waits for the store instead.
                        return Again::At(now + STORE_RETRY);
                    }
                    self.ensure_share(&mut state, shared, now);
                    let State {
                        degraded,
                        bucket,
                        gate,
                        ..
                    } = &mut *state;
                    let Some(degraded) = degraded else {
                        return again_from(bucket, gate, probe, again, now);
                    };
                    let go = again_from(&mut degraded.share, gate, probe, again, now);
                    if matches!(go, Again::Now(..)) {
                        degraded.spend(again, false);
                    }
                    return go;
                }
                _ => {
                    let State { bucket, gate, .. } = &mut *state;
                    return again_from(bucket, gate, probe, again, now);
                }
            }
        };
        let mut claimed = Claimed {
            budget: self,
            probes: [probe, None],
        };
        let mut owing = Owing { budget: self, owed };
        let answer = shared
            .store
            .admit(
                &shared.keys.bucket,
                again,
                0.0,
                in_hand,
                Mode::Again,
                version,
                &specs,
            )
            .await;
        if let Ok(reply) = &answer {
            self.absorb(reply, now);
            self.recovered(reply, shared, &mut owing);
        }
        if let Ok(Reply {
            admission: Admission::Taken { levels },
            sent,
            ..
        }) = &answer
        {
            claimed.probes = [None, None];
            self.lock().bucket.mirror_if_same(&specs, levels, now);
            return Again::Now(probe, Some(*sent));
        }
        drop(claimed);
        let mut state = self.lock();
        match answer.map(|reply| reply.admission) {
            Ok(Admission::Wait { wait, .. }) => Again::At(now + wait),
            Ok(Admission::Paused(wait)) => {
                state.gate.pause(now + wait);
                Again::At(now + wait)
            }
            // Asked again shortly: from the store if it answers, else from the share.
            Ok(Admission::Taken { .. }) | Err(_) => Again::At(now + STORE_RETRY),
        }
    }

    /// Ends reservation `ticket` in the bucket. Returns whether budget came back (waiters
    /// may fit). In memory, a reservation is consumed by its one settle, so the ticket is
    /// only carried; the shared store records it and refuses a settle it already applied,
    /// so the settle (one round trip, off the request's path) is retried once on failure.
    ///
    /// A shared reservation's settle carries the `correction` its response's headers asked
    /// for (see [`Budget::observe`]); one with nothing to settle still sends it.
    pub(crate) fn settle(
        &self,
        ticket: Ticket,
        settle: Settle,
        correction: Option<Correction>,
    ) -> bool {
        let now = Instant::now();
        let mut state = self.lock();
        let (cost, refund) = match settle {
            Settle::Refund(cost) => (cost, true),
            Settle::Debt(cost) => (cost, false),
        };
        let degraded = state.degraded.is_some();
        let bucket = match (&mut state.degraded, ticket.shared) {
            (Some(degraded), None) if self.shared.is_some() => {
                degraded.spend(cost, refund);
                &mut degraded.share
            }
            _ => &mut state.bucket,
        };
        let nothing = cost.requests == 0 && cost.tokens == 0;
        if refund {
            bucket.give_back(cost, now);
        } else {
            bucket.charge(cost, now);
        }
        tracing::trace!(ticket = ticket.id, ?cost, refund, "settled");
        let specs = match (&self.shared, ticket.shared) {
            (Some(_), Some(_)) if !(nothing && correction.is_none()) => state.bucket.specs(),
            // Admitted from the share while the store was out of reach, settled after it came
            // back (the charge for the share went with the recovery): usage beyond the
            // estimate is real spending every replica must know of. A refund is dropped, the
            // conservative side.
            (Some(_), None) if !refund && !nothing && !degraded && state.bucket.is_limited() => {
                state.bucket.specs()
            }
            _ => return refund,
        };
        drop(state);
        if let Some(shared) = &self.shared {
            self.spawn_settle(shared, ticket.id, specs, cost, refund, correction);
        }
        refund
    }

    /// Sends a settlement to the store, off the request's path.
    fn spawn_settle(
        &self,
        shared: &Shared,
        id: u64,
        specs: Vec<MeterSpec>,
        cost: Cost,
        refund: bool,
        correction: Option<Correction>,
    ) {
        let store = Arc::clone(&shared.store);
        let keys = shared.keys.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                // A failed settle is tried again once the breaker lets calls through (the
                // store's marker makes a repeat harmless), for up to SETTLE_PATIENCE.
                let mut tries = SETTLE_PATIENCE.as_millis() / SETTLE_RETRY.as_millis();
                loop {
                    match store
                        .settle(&keys, id, &specs, cost, refund, correction.as_ref())
                        .await
                    {
                        Ok(_) => return,
                        Err(err) if tries == 0 => {
                            tracing::debug!(error = ?err, ticket = id, "shared settle given up");
                            return;
                        }
                        Err(_) => {
                            tries -= 1;
                            tokio::time::sleep(SETTLE_RETRY).await;
                        }
                    }
                }
            });
        }
    }

    /// Whether `cost` can ever fit. Forgets learned limits no response confirmed for an hour
    /// first, and a learned limit the request is larger than when the configuration allows
    /// it and nothing confirmed it for `relearn_interval` (the request then goes to learn it
    /// again). `Ok(true)` when the limits in force changed (waiters may fit).
    pub(crate) fn check_size(&self, cost: Cost, now: Instant) -> Result<bool, Oversize> {
        let mut state = self.lock();
        let mut changed = state.age_learned(&self.org, &self.model, now);
        if let Err(never) = state.bucket.fits_ever(cost) {
            if !state.doubt_learned(never, cost, self.bounds.relearn_interval, now) {
                return Err(never);
            }
            changed = true;
            tracing::warn!(
                org = %self.org,
                model = %self.model,
                resource = never.resource.label(),
                learned = never.limit,
                requested = cost.of(never.resource),
                "a request is larger than a learned limit; sending it to learn the limit again"
            );
            state.bucket.fits_ever(cost)?;
        }
        Ok(changed)
    }

    /// The predicted wait for `cost` (a request and everything queued ahead of it), no
    /// earlier than the gate reopens.
    pub(crate) fn projected_wait(&self, cost: Cost, priority: Priority, now: Instant) -> Duration {
        let keep = self.keep(priority);
        let mut state = self.lock();
        let bucket = state.bucket.projected_wait(cost, keep, now);
        let gate = state
            .gate
            .blocked_until(now)
            .map_or(Duration::ZERO, |until| until - now);
        bucket.max(gate)
    }

    /// The resource that makes `cost` wait longest, and its limit (for naming the limit in a
    /// rejection).
    pub(crate) fn binding_limit(
        &self,
        cost: Cost,
        priority: Priority,
        now: Instant,
    ) -> (Resource, Option<u64>) {
        let keep = self.keep(priority);
        let mut state = self.lock();
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
        (resource, state.bucket.limit(resource))
    }

    /// Replaces the configured limits (the learned ones still cap them), keeping what was
    /// spent, unless the bucket already took the limits of a newer configuration than
    /// `generation`. Returns whether the limits in force changed.
    pub(crate) fn set_limits(&self, limits: Limits, generation: u64) -> bool {
        let mut state = self.lock();
        if generation < state.generation {
            return false;
        }
        state.generation = generation;
        if state.configured == limits {
            return false;
        }
        state.configured = limits;
        // What the bucket learned and the pauses it took were under the old limits; a
        // changed configuration is the operator's way to clear them (a pause from a broken
        // header, a limit learned from one).
        let now = Instant::now();
        state.gate.clear_pause();
        state.last_429 = None;
        state.learned.forget();
        warn_if_above_upstream(
            &self.org,
            &self.model,
            &state.configured,
            &state.learned.limits,
        );
        state.apply_limits(now);
        // The pause is gone even if the limits in force are the same.
        true
    }

    /// Whether the bucket has configured limits (not only learned ones).
    pub(crate) fn is_configured(&self) -> bool {
        !self.lock().configured.is_empty()
    }

    /// How this bucket's budget is shared now (`None` without a store).
    fn sharing(&self, state: &State) -> Option<Sharing> {
        let shared = self.shared.as_ref()?;
        Some(match &state.degraded {
            Some(degraded) => Sharing::Degraded {
                replicas: degraded.replicas,
            },
            None if !state.bucket.is_limited() => Sharing::Local,
            None if shared.store.is_up() => Sharing::Shared,
            None => match shared.store.on_error() {
                OnStoreError::Degrade => Sharing::Degraded {
                    replicas: shared.store.replicas(),
                },
                OnStoreError::FailClosed => Sharing::Refusing,
            },
        })
    }

    /// A request holding `cost` is being sent upstream (again, for a replay).
    pub(crate) fn dispatched(&self, cost: Cost) -> Mark {
        self.lock().learned.dispatched(cost, Instant::now())
    }

    /// The send at `mark` never reached the upstream (its connection was refused).
    pub(crate) fn undispatched(&self, mark: Mark) {
        self.lock().learned.undispatched(mark);
    }

    /// Corrects the bucket toward the upstream's view in `headers`, which came back for a
    /// request sent at `mark`: adopts the limits they announce (a configured limit above the
    /// upstream's is lowered to it), lowers the levels to what the upstream had left less
    /// what was sent since, and shrinks the burst when the figures show a quantized limit.
    /// Never loosens anything. Returns whether the limits in force changed.
    ///
    /// A shared bucket's levels are corrected in the store, for what every replica took
    /// after the request (`sent`, from its admission): the [`Correction`] returned rides the
    /// request's settlement, and the limits learned are published for every replica.
    pub(crate) fn observe(
        &self,
        mark: Mark,
        sent: Option<Sent>,
        headers: &RateLimitHeaders,
    ) -> (bool, Option<Correction>) {
        if headers.is_empty() {
            return (false, None);
        }
        let now = Instant::now();
        let mut state = self.lock();
        let views = views(headers);
        let mut changed = false;
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
            changed = state.apply_limits(now);
            let specs = self.shared.as_ref().map(|_| state.bucket.specs());
            self.spawn_on_store(specs, move |store, key, specs| async move {
                store.learn(&key, &learned, &specs).await.map(|_| ())
            });
        }
        if !state.learned.limits.is_empty() {
            state.gate.learned();
        }
        let shared = self.shared.is_some() && state.bucket.is_limited();
        let State {
            learned, bucket, ..
        } = &mut *state;
        // A shared bucket's local levels mirror the store's: only its burst is corrected here.
        learned.correct(mark, &views, bucket, !shared, now);
        // A header showing clearly less than this replica last saw in the store (by more than
        // what is usually in flight: a twentieth of the limit) goes at once; otherwise one
        // correction per CORRECTION_INTERVAL is enough (the next headers carry the same
        // news), and keeps settlement off most requests' path.
        let remaining = remaining(&views);
        let lower = remaining.iter().any(|(resource, window, left)| {
            bucket
                .level_and_capacity(*resource, *window, now)
                .is_some_and(|(level, capacity)| *left + (capacity / 20.0).max(1.0) < level)
        });
        let due = lower
            || state
                .corrected_at
                .is_none_or(|at| now.saturating_duration_since(at) >= CORRECTION_INTERVAL);
        let correction = match sent {
            Some(sent) if shared && due && !remaining.is_empty() => {
                state.corrected_at = Some(now);
                Some(Correction {
                    sent,
                    at: now,
                    remaining,
                })
            }
            _ => None,
        };
        (changed, correction)
    }

    /// The upstream answered a request of this bucket without a rate limit (as `probe`,
    /// which then ends).
    pub(crate) fn answered(&self, probe: Option<Probe>) {
        let mut state = self.lock();
        state.gate.answered();
        if let Some(probe) = probe {
            state.gate.finish_probe(probe, ProbeOutcome::Answered);
            if probe == Probe::Burst && state.bucket.is_proven() {
                // Proven already (by this replica's earlier proof): nothing to publish, but
                // the claim on the proof ends.
                self.release_proof(&state);
            }
            if probe == Probe::Burst && !state.bucket.is_proven() {
                state.bucket.burst_proven();
                let specs = self.shared.as_ref().map(|_| state.bucket.specs());
                self.spawn_on_store(specs, |store, key, specs| async move {
                    store.prove(&key, &specs).await
                });
                tracing::debug!(
                    org = %self.org,
                    model = %self.model,
                    "the upstream took a request beyond a second's worth at once: burst proven"
                );
            }
        }
    }

    /// Tells the shared store what this replica learned (`call`), off the request's path;
    /// nothing without a store, while it is down, or for a bucket without limits.
    fn spawn_on_store<F, Fut>(&self, specs: Option<Vec<MeterSpec>>, call: F)
    where
        F: FnOnce(Arc<Store>, String, Vec<MeterSpec>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), StoreError>> + Send + 'static,
    {
        let (Some(shared), Some(specs)) = (&self.shared, specs) else {
            return;
        };
        if specs.is_empty() || !shared.store.is_up() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = Arc::clone(&shared.store);
        let key = shared.keys.bucket.clone();
        runtime.spawn(async move {
            if let Err(err) = call(store, key, specs).await {
                tracing::debug!(error = ?err, "shared store update failed");
            }
        });
    }

    /// A probe ended without an answer (cancelled, failed to connect).
    pub(crate) fn abandon_probe(&self, probe: Probe) {
        let mut state = self.lock();
        state.gate.finish_probe(probe, ProbeOutcome::Abandoned);
        if probe == Probe::Burst {
            self.release_proof(&state);
        }
    }

    /// Ends this replica's claim on the shared bucket's burst proof (see
    /// `scripts/release.lua`), off the request's path.
    fn release_proof(&self, state: &State) {
        let specs = self.shared.as_ref().map(|_| state.bucket.specs());
        self.spawn_on_store(
            specs,
            |store, key, _| async move { store.release(&key).await },
        );
    }

    /// The upstream answered 429 for a request of this bucket: nothing is sent before
    /// `resume`; after enough consecutive 429s the circuit opens until `reset`. Its
    /// [`Evidence`] shrinks the burst or keeps more refill in hand. Returns whether the
    /// circuit opened.
    pub(crate) fn rate_limited(&self, rate_limited: RateLimited) -> bool {
        let now = Instant::now();
        let mut state = self.lock();
        let opened = state
            .gate
            .rate_limited(rate_limited.resume, rate_limited.reset);
        if let Some(probe) = rate_limited.probe {
            state.gate.finish_probe(probe, ProbeOutcome::RateLimited);
            if probe == Probe::Burst && !matches!(rate_limited.evidence, Evidence::Burst(_)) {
                // Refused for another reason than the burst (shrink.lua ends the claim then).
                self.release_proof(&state);
            }
        }
        match rate_limited.evidence {
            Evidence::Burst(resource) => {
                state.bucket.burst_refused(resource, now);
                // The upstream's burst is the same for every replica.
                let specs = self.shared.as_ref().map(|_| state.bucket.specs());
                self.spawn_on_store(specs, |store, key, specs| async move {
                    store.shrink(&key, &specs, BURST_RETRY).await
                });
            }
            Evidence::Contention => state.bucket.contended(now),
            Evidence::Nothing => {}
        }
        state.last_429 = Some(Refused {
            at: now,
            reason: rate_limited.reason,
            wait: rate_limited.resume.saturating_duration_since(now),
        });
        // One replica's 429 pauses the bucket for all, until the same hint; an open circuit
        // holds them all until the limit resets.
        let wait = state
            .gate
            .blocked_until(now)
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(now));
        if !wait.is_zero() {
            let specs = self.shared.as_ref().map(|_| state.bucket.specs());
            self.spawn_on_store(specs, move |store, key, specs| async move {
                store.pause(&key, wait, &specs).await.map(|_| ())
            });
        }
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

    /// A refused request starts waiting to be sent again: nothing new goes before it.
    pub(crate) fn add_replay(&self) {
        self.lock().gate.add_replay();
    }

    /// A refused request stopped waiting (sent, or given up).
    pub(crate) fn remove_replay(&self) {
        self.lock().gate.remove_replay();
    }

    /// What the status view and metrics show of this bucket; `depth` is the line's.
    pub(crate) fn status(&self) -> BucketStatus {
        let now = Instant::now();
        let mut state = self.lock();
        let sharing = self.sharing(&state);
        BucketStatus {
            sharing,
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
            depth: Default::default(),
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

    /// Units available now (negative in debt); `None` when unlimited.
    pub(crate) fn available(&self, resource: Resource) -> Option<f64> {
        self.lock().bucket.available(resource, Instant::now())
    }

    /// Marks the burst proven, as an answered burst probe would.
    #[cfg(test)]
    pub(crate) fn prove_burst(&self) {
        self.lock().bucket.burst_proven();
    }
}

/// What a degraded replica spent from its share, to be charged to the shared bucket by the
/// admission about to ask the store, which carries it (`None`: nothing degraded, or another
/// admission carries it now). All of it, up to one minute's worth of each limit (spending
/// older than that has refilled): exact for the outages of seconds the breaker is for,
/// conservative for a long one.
fn owe(state: &mut State) -> Option<Cost> {
    let limits = state.limits;
    let degraded = state.degraded.as_mut()?;
    if degraded.owing {
        return None;
    }
    degraded.owing = true;
    let cap = |limit: Option<u64>, spent: u64| limit.map_or(0, |limit| spent.min(limit));
    let owed = Cost {
        requests: cap(limits.rpm, degraded.spent.requests),
        tokens: cap(limits.tpm, degraded.spent.tokens),
    };
    // Beyond the cap it has refilled: not owed at all.
    degraded.spent = Cost::default();
    Some(owed)
}

/// `specs` with `owed` charged to each limit of its resource by the admission.
fn with_debt(mut specs: Vec<MeterSpec>, owed: Option<Cost>) -> Vec<MeterSpec> {
    let owed = owed.unwrap_or_default();
    for spec in &mut specs {
        spec.debt = owed.of(spec.resource);
    }
    specs
}

/// The charge a degraded replica's admission carries to the store ([`owe`]): given back to
/// the degraded share unless the store took it, however the round trip ends, also when its
/// future is dropped midway (it is carried by a later admission then). A reply lost after the
/// script ran charges it twice: the conservative side.
struct Owing<'a> {
    budget: &'a Budget,
    owed: Option<Cost>,
}

impl Drop for Owing<'_> {
    fn drop(&mut self) {
        let Some(owed) = self.owed.take() else {
            return;
        };
        let mut state = self.budget.lock();
        if let Some(degraded) = &mut state.degraded {
            degraded.spend(owed, false);
            degraded.owing = false;
        }
    }
}

impl Degraded {
    /// Counts `cost` taken from the share (given back, when `refund`).
    fn spend(&mut self, cost: Cost, refund: bool) {
        if refund {
            self.spent.requests = self.spent.requests.saturating_sub(cost.requests);
            self.spent.tokens = self.spent.tokens.saturating_sub(cost.tokens);
        } else {
            self.spent.requests += cost.requests;
            self.spent.tokens += cost.tokens;
        }
    }
}

/// Probes a request claimed before a round trip to the shared store: given back to the gate
/// (as abandoned) unless the admission completed, however the round trip ends, also when its
/// future is dropped midway. Without it, a cancelled request would hold the circuit's or the
/// burst's probe for good.
struct Claimed<'a> {
    budget: &'a Budget,
    probes: [Option<Probe>; 2],
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        if self.probes.iter().all(Option::is_none) {
            return;
        }
        let mut state = self.budget.lock();
        for probe in self.probes.into_iter().flatten() {
            state.gate.finish_probe(probe, ProbeOutcome::Abandoned);
        }
    }
}

/// Takes `cost` from `bucket` for a request the gate let go (as `probe`); beyond the proven
/// part of the burst, one request goes to prove it (a gate probe already going proves it as
/// well as any), the others wait for its answer or the refill.
fn take_from(
    bucket: &mut Bucket,
    gate: &mut Gate,
    probe: Option<Probe>,
    cost: Cost,
    keep: f64,
    now: Instant,
) -> Go {
    let taken = match bucket.try_take(cost, keep, now) {
        Ok(()) => Ok(probe),
        Err(Shortfall::Unproven { wait }) => {
            let probe = probe.or(Some(Probe::Burst));
            if probe == Some(Probe::Burst) && !gate.burst_probe_free() {
                return Go::At(now + wait);
            }
            bucket.take_as_proof(cost, keep, now).map(|()| probe)
        }
        Err(shortfall) => Err(shortfall),
    };
    match taken {
        Ok(probe) => {
            gate.claim(probe, now);
            Go::Now(Ticket::next(None), probe)
        }
        Err(Shortfall::Wait { wait, .. } | Shortfall::Unproven { wait }) => Go::At(now + wait),
        Err(Shortfall::Never(oversize)) => Go::Never(oversize),
    }
}

/// Takes `again` from `bucket` for a refused request sent once more (see
/// [`Budget::take_again`]).
fn again_from(
    bucket: &mut Bucket,
    gate: &mut Gate,
    probe: Option<Probe>,
    again: Cost,
    now: Instant,
) -> Again {
    match bucket.take_as_proof(again, 0.0, now) {
        Ok(()) | Err(Shortfall::Never(_) | Shortfall::Unproven { .. }) => {
            gate.claim(probe, now);
            Again::Now(probe, None)
        }
        Err(Shortfall::Wait { wait, .. }) => Again::At(now + wait),
    }
}

impl State {
    /// Forgets learned limits no response has confirmed for an hour; a bucket with nothing
    /// configured then learns again, its next request going alone. Returns whether the limits
    /// in force changed.
    fn age_learned(&mut self, org: &str, model: &str, now: Instant) -> bool {
        if !self.learned.is_stale(now) {
            return false;
        }
        tracing::info!(
            org,
            model,
            "learned limits unconfirmed for an hour; learning them again"
        );
        self.learned.forget();
        let changed = self.apply_limits(now);
        if self.learned.enabled && self.configured.is_empty() {
            self.gate.relearn(now);
            self.asked = false;
        }
        changed
    }

    /// A request is larger than a limit in force: forgets the learned limit when the
    /// configuration would allow the request and nothing confirmed it for `interval` (see
    /// [`Learned::doubt`]). Returns whether it did.
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

    /// Puts the tighter of the configured and learned limits in force, keeping what was
    /// spent. Returns whether they changed.
    fn apply_limits(&mut self, now: Instant) -> bool {
        let limits = self.configured.tightest(&self.learned.limits);
        if limits == self.limits {
            return false;
        }
        self.bucket.set_limits(&limits, now);
        self.limits = limits;
        true
    }
}
