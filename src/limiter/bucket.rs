//! A continuously refilling bucket holding several limits at once (requests and tokens, per
//! minute and optionally per day): a request is admitted only when every limit has room, and
//! takes from all of them together.
//!
//! Pure logic: every method takes `now`, so tests drive time by hand. Levels are `f64` so the
//! refill is exact between integer units; a level may go negative (debt) when usage turns
//! out larger than its estimate, and it then takes correspondingly longer to refill.
//!
//! Each limit refills at `limit / window`, up to its *burst*: normally the whole limit, but a
//! provider may enforce 600 RPM as 10 per second (docs/upstream.md §1, quantized limits). When the
//! upstream shows that (a 429 while its per-minute figures had room, or figures that imply a
//! smaller bucket), the burst shrinks to what it really allows at once; the rate stays. A
//! shrunk burst doubles again every [`BURST_RETRY`] without new evidence.
//!
//! Nothing before a 429 tells a quantized limit from a plain one, so a burst is *proven*
//! before it is used whole: up to one [`QUANTUM`]'s worth of a per-minute limit goes at once
//! freely; beyond it, a single request goes first ([`Shortfall::Unproven`]). If the upstream
//! takes it, the whole burst is proven; if it refuses it although its per-minute figures had
//! room, the burst shrinks. A quantized upstream thus costs one 429 instead of a second's
//! worth of them, and a plain one one round trip.

use std::time::Duration;

use tokio::time::Instant;

/// What a bucket meters; re-exported because every limit and cost here is keyed by it.
pub(crate) use crate::resource::Resource;

pub(crate) const MINUTE: Duration = Duration::from_secs(60);
pub(crate) const DAY: Duration = Duration::from_secs(86_400);

/// How long a shrunk burst stays as it is before it doubles (back up to the whole limit).
pub(crate) const BURST_RETRY: Duration = Duration::from_secs(60);
/// The slice of a minute a per-minute limit may be enforced in (docs/upstream.md §1: 60 000 RPM as
/// 1 000 per second): that much of a burst is assumed to be there without proof.
pub(crate) const QUANTUM: Duration = Duration::from_secs(1);
/// The most refill an unexpected 429 makes a bucket keep in hand (see [`Bucket::contended`]).
pub(crate) const MAX_CONTENTION: Duration = Duration::from_secs(5);
/// How long the extra margin of [`Bucket::contended`] holds before it halves.
pub(crate) const CONTENTION_DECAY: Duration = Duration::from_secs(60);
/// 429s this close together come from one overshoot and count as one piece of evidence.
const EVIDENCE_COALESCE: Duration = Duration::from_millis(200);

/// The configured limits of one (organization, model). `None` means "not limited".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub rpd: Option<u64>,
    pub tpd: Option<u64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.rpm.is_none() && self.tpm.is_none() && self.rpd.is_none() && self.tpd.is_none()
    }

    /// The tighter of two sets of limits, field by field (a limit only one side has stands).
    pub fn tightest(&self, other: &Limits) -> Limits {
        fn min(a: Option<u64>, b: Option<u64>) -> Option<u64> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        Limits {
            rpm: min(self.rpm, other.rpm),
            tpm: min(self.tpm, other.tpm),
            rpd: min(self.rpd, other.rpd),
            tpd: min(self.tpd, other.tpd),
        }
    }

    /// One replica's share of these limits among `replicas` (rounded down, at least 1):
    /// what it may spend alone while the shared store is out of reach.
    pub fn share(&self, replicas: usize) -> Limits {
        let replicas = replicas.max(1) as u64;
        let part = |limit: Option<u64>| limit.map(|limit| (limit / replicas).max(1));
        Limits {
            rpm: part(self.rpm),
            tpm: part(self.tpm),
            rpd: part(self.rpd),
            tpd: part(self.tpd),
        }
    }

    /// The limit of `resource` over `window` (a minute or a day).
    pub fn get(&self, resource: Resource, window: Duration) -> Option<u64> {
        match (resource, window == DAY) {
            (Resource::Requests, false) => self.rpm,
            (Resource::Tokens, false) => self.tpm,
            (Resource::Requests, true) => self.rpd,
            (Resource::Tokens, true) => self.tpd,
        }
    }

    /// Forgets the limit of `resource` over `window`.
    pub fn clear(&mut self, resource: Resource, window: Duration) {
        *self.field(resource, window) = None;
    }

    pub fn set(&mut self, resource: Resource, window: Duration, limit: u64) {
        *self.field(resource, window) = Some(limit);
    }

    fn field(&mut self, resource: Resource, window: Duration) -> &mut Option<u64> {
        match (resource, window == DAY) {
            (Resource::Requests, false) => &mut self.rpm,
            (Resource::Tokens, false) => &mut self.tpm,
            (Resource::Requests, true) => &mut self.rpd,
            (Resource::Tokens, true) => &mut self.tpd,
        }
    }
}

/// What one request takes from a bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub requests: u64,
    pub tokens: u64,
}

impl Cost {
    pub fn request(tokens: u64) -> Self {
        Self {
            requests: 1,
            tokens,
        }
    }

    pub fn of(self, resource: Resource) -> f64 {
        match resource {
            Resource::Requests => self.requests as f64,
            Resource::Tokens => self.tokens as f64,
        }
    }
}

/// One limit: `capacity` units over `window`, refilling continuously at `capacity / window`
/// up to `burst` (at most `capacity`).
#[derive(Clone, Debug)]
struct Meter {
    resource: Resource,
    window: Duration,
    capacity: f64,
    burst: f64,
    /// Units per second.
    rate: f64,
    level: f64,
    /// When the burst (below capacity) next grows.
    grow_at: Option<Instant>,
    /// Whether the upstream has shown it takes more than a [`QUANTUM`]'s worth at once.
    proven: bool,
}

impl Meter {
    fn new(resource: Resource, limit: u64, window: Duration) -> Self {
        let capacity = limit as f64;
        Self {
            resource,
            window,
            capacity,
            burst: capacity,
            rate: capacity / window.as_secs_f64(),
            level: capacity,
            grow_at: None,
            // Daily limits are not quantized.
            proven: window != MINUTE,
        }
    }

    /// What this limit may spend at once before its burst is proven.
    fn quantum(&self) -> f64 {
        (self.rate * QUANTUM.as_secs_f64()).max(1.0)
    }

    /// Seconds until taking `amount` spends no more of an unproven burst than a quantum
    /// (zero when it already does, or the burst needs no proof).
    fn seconds_until_proof_unneeded(&self, amount: f64) -> f64 {
        if self.proven || self.burst <= self.quantum() {
            return 0.0;
        }
        let floor = self.burst - self.quantum();
        self.seconds_until(amount, floor)
    }

    /// Doubles a shrunk burst for every [`BURST_RETRY`] due by `now`. The level then refills
    /// into the larger burst at the usual rate.
    fn recover(&mut self, now: Instant) {
        while let Some(at) = self.grow_at {
            if at > now {
                break;
            }
            self.burst = (self.burst * 2.0).min(self.capacity);
            self.grow_at = (self.burst < self.capacity).then_some(at + BURST_RETRY);
            // The regrown part is a guess until a request proves it.
            self.proven = false;
        }
    }

    /// The level this meter must keep untouched for a request that may only use the share of
    /// the burst above `keep` (a fraction in 0..1).
    fn floor(&self, keep: f64) -> f64 {
        self.burst * keep
    }

    /// Seconds until `amount` fits above `floor`, from the current level.
    fn seconds_until(&self, amount: f64, floor: f64) -> f64 {
        let missing = amount + floor - self.level;
        if missing <= 0.0 {
            0.0
        } else if self.rate > 0.0 {
            missing / self.rate
        } else {
            f64::INFINITY
        }
    }

    /// What must be in the meter before `amount` may be taken: a request larger than the
    /// burst (but within the limit) is admitted from a full burst and leaves the meter in
    /// debt, as a quantized provider admits it; otherwise it could never run.
    fn needed(&self, amount: f64) -> f64 {
        amount.min(self.burst)
    }
}

/// One limit of a bucket as a shared store keeps it (see [`super::store`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct MeterSpec {
    pub resource: Resource,
    pub window: Duration,
    pub capacity: f64,
    pub burst: f64,
    /// Whether only a [`QUANTUM`]'s worth may go at once until a request proves the rest.
    pub unproven: bool,
    /// The level this replica last knew (the store's, refilled since): what a store that
    /// lost the bucket (restarted empty) starts it at, so a restart never resets a live window.
    pub level: f64,
    /// Charged by the admission before anything is taken: what this replica spent from its
    /// share while the store was out of reach.
    pub debt: f64,
}

/// Why a cost cannot be admitted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Shortfall {
    /// It fits after this wait, if nothing else is taken meanwhile.
    Wait { wait: Duration, resource: Resource },
    /// It fits, but beyond the part of the burst the upstream has shown it takes at once:
    /// it may go only as the single request that proves the burst ([`Bucket::take_as_proof`]),
    /// or after `wait`, when the refill has brought it within the proven part.
    Unproven { wait: Duration },
    /// It is larger than the limit itself and never fits.
    Never(Oversize),
}

/// The limit a cost is larger than.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Oversize {
    pub resource: Resource,
    pub limit: u64,
    pub window: Duration,
}

#[derive(Clone, Debug)]
pub(crate) struct Bucket {
    meters: Vec<Meter>,
    updated: Instant,
    /// Seconds of refill left unused (see [`Bucket::with_margin`]).
    margin: f64,
    /// When a shrink last happened: several 429s of one burst are one piece of evidence.
    shrunk_at: Option<Instant>,
    /// Extra seconds of refill kept in hand because the upstream refused requests this
    /// bucket had room for: someone else spends the same budget ([`Bucket::contended`]).
    contention: f64,
    /// When `contention` next halves, and when it last grew.
    contention_decays_at: Option<Instant>,
    contended_at: Option<Instant>,
}

impl Bucket {
    /// A full bucket that leaves `margin` worth of refill unused on every admission.
    ///
    /// The upstream charges a request when it arrives there, a moment after sluice admitted
    /// it; at the start of a burst its full bucket is not refilling during that moment while
    /// sluice's already is. Keeping a fraction of a second of refill in hand keeps sluice
    /// behind the upstream rather than a few tokens ahead of it.
    pub(crate) fn with_margin(limits: &Limits, margin: Duration, now: Instant) -> Self {
        let mut bucket = Self::new(limits, now);
        bucket.margin = margin.as_secs_f64();
        bucket
    }

    /// A full bucket with the given limits and no margin.
    pub(crate) fn new(limits: &Limits, now: Instant) -> Self {
        let mut meters = Vec::with_capacity(4);
        for (limit, resource, window) in [
            (limits.rpm, Resource::Requests, MINUTE),
            (limits.tpm, Resource::Tokens, MINUTE),
            (limits.rpd, Resource::Requests, DAY),
            (limits.tpd, Resource::Tokens, DAY),
        ] {
            if let Some(limit) = limit {
                meters.push(Meter::new(resource, limit, window));
            }
        }
        Self {
            meters,
            updated: now,
            margin: 0.0,
            shrunk_at: None,
            contention: 0.0,
            contention_decays_at: None,
            contended_at: None,
        }
    }

    /// Whether any limit meters this bucket.
    pub(crate) fn is_limited(&self) -> bool {
        !self.meters.is_empty()
    }

    /// Its limits as a shared store keeps them: capacity, burst and whether it is proven.
    pub(crate) fn specs(&self) -> Vec<MeterSpec> {
        self.meters
            .iter()
            .map(|meter| MeterSpec {
                resource: meter.resource,
                window: meter.window,
                capacity: meter.capacity,
                burst: meter.burst,
                unproven: !meter.proven && meter.burst > meter.quantum(),
                level: meter.level,
                debt: 0.0,
            })
            .collect()
    }

    /// [`Bucket::specs`], with the levels refilled to `now`.
    pub(crate) fn specs_at(&mut self, now: Instant) -> Vec<MeterSpec> {
        self.refill(now);
        self.specs()
    }

    /// The level and the capacity of `resource`'s limit over `window` now, if it has one.
    pub(crate) fn level_and_capacity(
        &mut self,
        resource: Resource,
        window: Duration,
        now: Instant,
    ) -> Option<(f64, f64)> {
        self.refill(now);
        self.meters
            .iter()
            .find(|meter| meter.resource == resource && meter.window == window)
            .map(|meter| (meter.level, meter.capacity))
    }

    /// The levels now, in the order of [`Bucket::specs`].
    pub(crate) fn levels(&mut self, now: Instant) -> Vec<f64> {
        self.refill(now);
        self.meters.iter().map(|meter| meter.level).collect()
    }

    /// Takes the levels a shared store reported (in the order of [`Bucket::specs`]), so
    /// predictions and the status view read the shared state.
    pub(crate) fn mirror(&mut self, levels: &[f64], now: Instant) {
        self.refill(now);
        for (meter, level) in self.meters.iter_mut().zip(levels) {
            meter.level = level.clamp(-meter.capacity, meter.burst);
        }
    }

    /// [`Bucket::mirror`], unless the limits changed since `specs` were taken (learned or
    /// reloaded during the round trip): the levels would land on the wrong limits then.
    pub(crate) fn mirror_if_same(&mut self, specs: &[MeterSpec], levels: &[f64], now: Instant) {
        let same = specs.len() == self.meters.len()
            && specs.iter().zip(&self.meters).all(|(spec, meter)| {
                spec.resource == meter.resource
                    && spec.window == meter.window
                    && spec.capacity == meter.capacity
            });
        if same {
            self.mirror(levels, now);
        }
    }

    /// Seconds of refill every admission leaves unused: the margin, plus what contention
    /// added.
    pub(crate) fn in_hand(&self) -> f64 {
        self.margin + self.contention
    }

    /// The upstream refused a request this bucket had room for, and not for a burst: another
    /// client spends the same budget unseen. The bucket keeps more refill in hand (at least
    /// a second's worth, doubling per refusal up to [`MAX_CONTENTION`]), so that client's
    /// spending no longer turns sluice's next requests into 429s; without new refusals the
    /// extra halves every [`CONTENTION_DECAY`]. The 429s of one overshoot count once.
    pub(crate) fn contended(&mut self, now: Instant) {
        if self
            .contended_at
            .is_some_and(|at| now.saturating_duration_since(at) < EVIDENCE_COALESCE)
        {
            return;
        }
        self.refill(now);
        self.contended_at = Some(now);
        self.contention = (self.contention * 2.0).clamp(1.0, MAX_CONTENTION.as_secs_f64());
        self.contention_decays_at = Some(now + CONTENTION_DECAY);
    }

    #[cfg(test)]
    /// The extra refill kept in hand for contention, in seconds.
    pub(crate) fn contention(&self) -> f64 {
        self.contention
    }

    fn refill(&mut self, now: Instant) {
        while let Some(at) = self.contention_decays_at.filter(|at| *at <= now) {
            self.contention /= 2.0;
            if self.contention < 0.1 {
                self.contention = 0.0;
                self.contention_decays_at = None;
            } else {
                self.contention_decays_at = Some(at + CONTENTION_DECAY);
            }
        }
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        if elapsed > 0.0 {
            for meter in &mut self.meters {
                meter.level = (meter.level + meter.rate * elapsed).min(meter.burst);
                meter.recover(now);
            }
            self.updated = now;
        }
    }

    /// Takes `cost` if every limit has room for it above `keep` (the share of each burst
    /// reserved for others, 0..1); otherwise takes nothing and says how long until it fits.
    pub(crate) fn try_take(
        &mut self,
        cost: Cost,
        keep: f64,
        now: Instant,
    ) -> Result<(), Shortfall> {
        self.refill(now);
        self.check(cost, keep)?;
        let unproven = self
            .meters
            .iter()
            .map(|meter| meter.seconds_until_proof_unneeded(meter.needed(cost.of(meter.resource))))
            .fold(0.0, f64::max);
        if unproven > 0.0 {
            return Err(Shortfall::Unproven {
                wait: duration_from_secs(unproven),
            });
        }
        self.take(cost);
        Ok(())
    }

    /// Takes `cost` as the request that proves the burst: as [`Bucket::try_take`], but past
    /// the unproven part of the burst. Its answer settles the proof
    /// ([`Bucket::burst_proven`], or [`Bucket::burst_refused`] on a 429).
    pub(crate) fn take_as_proof(
        &mut self,
        cost: Cost,
        keep: f64,
        now: Instant,
    ) -> Result<(), Shortfall> {
        self.refill(now);
        self.check(cost, keep)?;
        self.take(cost);
        Ok(())
    }

    fn take(&mut self, cost: Cost) {
        for meter in &mut self.meters {
            meter.level -= cost.of(meter.resource);
        }
    }

    /// The upstream took a request beyond the quantum at once: the whole burst is there.
    pub(crate) fn burst_proven(&mut self) {
        for meter in &mut self.meters {
            meter.proven = true;
        }
    }

    /// Whether every limit's burst is proven (or too small to need proof).
    pub(crate) fn is_proven(&self) -> bool {
        self.meters
            .iter()
            .all(|meter| meter.proven || meter.burst <= meter.quantum())
    }

    #[cfg(test)]
    /// How long until `cost` would fit above `keep`, if nothing else were taken: zero when it
    /// fits now.
    pub(crate) fn wait_for(
        &mut self,
        cost: Cost,
        keep: f64,
        now: Instant,
    ) -> Result<Duration, Shortfall> {
        self.refill(now);
        match self.check(cost, keep) {
            Ok(()) => Ok(Duration::ZERO),
            Err(Shortfall::Wait { wait, .. }) => Ok(wait),
            Err(Shortfall::Unproven { .. }) => Ok(Duration::ZERO),
            Err(never) => Err(never),
        }
    }

    fn check(&self, cost: Cost, keep: f64) -> Result<(), Shortfall> {
        self.fits_ever(cost).map_err(Shortfall::Never)?;
        let mut longest: Option<(f64, Resource)> = None;
        for meter in &self.meters {
            let needed = meter.needed(cost.of(meter.resource));
            // A request bigger than the unreserved share may still use the reserve (and the
            // margin): otherwise it could never run at all. It waits for a full burst instead.
            let floor = (meter.floor(keep) + meter.rate * self.in_hand()).min(meter.burst - needed);
            let seconds = meter.seconds_until(needed, floor);
            if seconds > 0.0 && longest.is_none_or(|(s, _)| seconds > s) {
                longest = Some((seconds, meter.resource));
            }
        }
        match longest {
            None => Ok(()),
            Some((seconds, resource)) => Err(Shortfall::Wait {
                wait: duration_from_secs(seconds),
                resource,
            }),
        }
    }

    /// How long until the bucket has accumulated `cost` above `keep`, even when `cost` is
    /// larger than a burst (it is then the total of several requests taken in turn, each as
    /// the refill allows).
    pub(crate) fn projected_wait(&mut self, cost: Cost, keep: f64, now: Instant) -> Duration {
        self.refill(now);
        let seconds = self
            .meters
            .iter()
            .map(|meter| {
                let floor = meter.floor(keep) + meter.rate * self.in_hand();
                meter.seconds_until(cost.of(meter.resource), floor)
            })
            .fold(0.0, f64::max);
        duration_from_secs(seconds)
    }

    /// Whether `cost` could ever fit (is within every limit).
    pub(crate) fn fits_ever(&self, cost: Cost) -> Result<(), Oversize> {
        for meter in &self.meters {
            if cost.of(meter.resource) > meter.capacity {
                return Err(Oversize {
                    resource: meter.resource,
                    limit: meter.capacity as u64,
                    window: meter.window,
                });
            }
        }
        Ok(())
    }

    /// Returns units to the bucket (a refund), never above the burst.
    pub(crate) fn give_back(&mut self, cost: Cost, now: Instant) {
        self.refill(now);
        for meter in &mut self.meters {
            meter.level = (meter.level + cost.of(meter.resource)).min(meter.burst);
        }
    }

    /// Takes units unconditionally: usage beyond the estimate, which the provider has already
    /// counted. The level may go negative (debt), delaying later admissions accordingly.
    pub(crate) fn charge(&mut self, cost: Cost, now: Instant) {
        self.refill(now);
        for meter in &mut self.meters {
            meter.level -= cost.of(meter.resource);
        }
    }

    /// Units available now per resource: the smallest level among that resource's limits
    /// (negative in debt). `None` when the resource is not limited.
    pub(crate) fn available(&mut self, resource: Resource, now: Instant) -> Option<f64> {
        self.refill(now);
        self.meters
            .iter()
            .filter(|meter| meter.resource == resource)
            .map(|meter| meter.level)
            .reduce(f64::min)
    }

    /// The per-minute limit of a resource, if it has one.
    pub(crate) fn limit(&self, resource: Resource) -> Option<u64> {
        self.meters
            .iter()
            .find(|meter| meter.resource == resource && meter.window == MINUTE)
            .map(|meter| meter.capacity as u64)
    }

    /// The burst of a resource's per-minute limit (its whole capacity unless shrunk).
    pub(crate) fn burst(&self, resource: Resource) -> Option<f64> {
        self.meters
            .iter()
            .find(|meter| meter.resource == resource && meter.window == MINUTE)
            .map(|meter| meter.burst)
    }

    /// Replaces the limits in place, keeping what has been spent: a bucket that had used 100
    /// of 500 has 100 used of its new capacity too (clamped to it). A shrunk burst stays
    /// shrunk (within the new capacity).
    pub(crate) fn set_limits(&mut self, limits: &Limits, now: Instant) {
        self.refill(now);
        let mut next = Self::new(limits, now);
        next.margin = self.margin;
        for meter in &mut next.meters {
            if let Some(old) = self
                .meters
                .iter()
                .find(|old| old.resource == meter.resource && old.window == meter.window)
            {
                let spent = old.burst - old.level;
                meter.proven = old.proven;
                if old.burst < old.capacity {
                    meter.burst = old.burst.min(meter.capacity);
                    meter.grow_at = old.grow_at.or(Some(now + BURST_RETRY));
                }
                meter.level = (meter.burst - spent).clamp(-meter.burst, meter.burst);
            }
        }
        self.meters = next.meters;
    }

    /// Corrects the level of `resource`'s limit over `window` toward what the upstream
    /// reported: `remaining` units when it admitted a request `age` ago, since when sluice has
    /// sent `sent_since` more units its way. Only ever lowers the level: a header is a
    /// snapshot, and a stale one must not hand out budget the upstream no longer has.
    /// Returns whether the level was lowered.
    pub(crate) fn observe(
        &mut self,
        resource: Resource,
        window: Duration,
        remaining: f64,
        sent_since: f64,
        age: Duration,
        now: Instant,
    ) -> bool {
        self.refill(now);
        let mut lowered = false;
        for meter in &mut self.meters {
            if meter.resource != resource || meter.window != window {
                continue;
            }
            let implied =
                (remaining + meter.rate * age.as_secs_f64()).min(meter.burst) - sent_since;
            if implied < meter.level {
                meter.level = implied.max(-meter.burst);
                lowered = true;
            }
        }
        lowered
    }

    /// Limits how much of `resource`'s per-minute limit may go at once to `burst` units (at
    /// least one unit), when the upstream shows it enforces the limit in smaller slices.
    /// Never raises the burst: it doubles back toward the limit every [`BURST_RETRY`] by itself.
    pub(crate) fn shrink_burst(&mut self, resource: Resource, burst: f64, now: Instant) {
        self.refill(now);
        for meter in &mut self.meters {
            if meter.resource == resource && meter.window == MINUTE {
                let burst = burst.max(1.0).min(meter.capacity);
                if burst < meter.burst {
                    meter.burst = burst;
                    meter.level = meter.level.min(burst);
                }
                if meter.burst < meter.capacity {
                    meter.grow_at = Some(now + BURST_RETRY);
                }
            }
        }
    }

    /// A 429 although the upstream's per-minute budget had room: its burst is smaller than
    /// this bucket's, and empty now. The first time, the burst drops to one second's worth
    /// (the quantum docs/upstream.md §1 names); while the evidence continues, it halves. The level
    /// drops to zero. The 429s of one overshoot count once.
    pub(crate) fn burst_refused(&mut self, resource: Resource, now: Instant) {
        if self
            .shrunk_at
            .is_some_and(|at| now.saturating_duration_since(at) < EVIDENCE_COALESCE)
        {
            return;
        }
        self.shrunk_at = Some(now);
        let Some(meter) = self
            .meters
            .iter()
            .find(|meter| meter.resource == resource && meter.window == MINUTE)
        else {
            return;
        };
        let burst = (meter.burst / 2.0).min(meter.rate);
        self.shrink_burst(resource, burst, now);
        // The upstream has nothing left at once: what sluice thought it had is not there.
        for meter in &mut self.meters {
            if meter.resource == resource && meter.window == MINUTE {
                meter.level = meter.level.min(0.0);
            }
        }
    }
}

/// `Duration::from_secs_f64` panics on infinities and overflow; waits are capped at a day,
/// far beyond any queue deadline.
fn duration_from_secs(seconds: f64) -> Duration {
    if seconds.is_finite() {
        Duration::from_secs_f64(seconds.clamp(0.0, DAY.as_secs_f64()))
    } else {
        DAY
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A full bucket whose burst is proven: the level arithmetic alone (the proof has tests
    /// of its own below).
    fn proven(limits: &Limits, now: Instant) -> Bucket {
        let mut bucket = Bucket::new(limits, now);
        bucket.burst_proven();
        bucket
    }

    fn proven_with_margin(limits: &Limits, margin: Duration, now: Instant) -> Bucket {
        let mut bucket = Bucket::with_margin(limits, margin, now);
        bucket.burst_proven();
        bucket
    }

    fn limits(rpm: u64, tpm: u64) -> Limits {
        Limits {
            rpm: Some(rpm),
            tpm: Some(tpm),
            ..Limits::default()
        }
    }

    fn at(start: Instant, millis: u64) -> Instant {
        start + Duration::from_millis(millis)
    }

    #[test]
    fn admits_up_to_capacity_then_waits_for_refill() {
        let t0 = Instant::now();
        let mut bucket = proven(&limits(60, 600), t0);
        for _ in 0..60 {
            bucket
                .try_take(Cost::request(10), 0.0, t0)
                .expect("within capacity");
        }
        let Err(Shortfall::Wait { wait, resource }) = bucket.try_take(Cost::request(10), 0.0, t0)
        else {
            panic!("the 61st request must wait");
        };
        // Both resources are empty; one request refills in 1 s (60/min), 10 tokens in 1 s.
        assert_eq!(wait, Duration::from_secs(1));
        assert!(matches!(resource, Resource::Requests | Resource::Tokens));
        assert!(bucket
            .try_take(Cost::request(10), 0.0, at(t0, 999))
            .is_err());
        assert!(bucket
            .try_take(Cost::request(10), 0.0, at(t0, 1000))
            .is_ok());
    }

    #[test]
    fn both_resources_must_have_room() {
        let t0 = Instant::now();
        let mut bucket = proven(&limits(100, 1000), t0);
        bucket.try_take(Cost::request(900), 0.0, t0).expect("fits");
        // Requests are plentiful, tokens are not: nothing is taken from either.
        let Err(Shortfall::Wait { wait, resource }) = bucket.try_take(Cost::request(200), 0.0, t0)
        else {
            panic!("tokens short");
        };
        assert_eq!(resource, Resource::Tokens);
        assert_eq!(wait, Duration::from_secs(6)); // 100 tokens at 1000/min
        assert_eq!(bucket.available(Resource::Requests, t0), Some(99.0));
        assert_eq!(bucket.available(Resource::Tokens, t0), Some(100.0));
    }

    #[test]
    fn larger_than_the_limit_never_fits() {
        let t0 = Instant::now();
        let mut bucket = proven(&limits(100, 1000), t0);
        assert_eq!(
            bucket.try_take(Cost::request(1001), 0.0, t0),
            Err(Shortfall::Never(Oversize {
                resource: Resource::Tokens,
                limit: 1000,
                window: MINUTE
            }))
        );
        assert!(bucket.fits_ever(Cost::request(1000)).is_ok());
    }

    #[test]
    fn the_reserved_share_is_kept_for_others() {
        let t0 = Instant::now();
        let mut bucket = proven(&limits(10, 1000), t0);
        // Keeping 20 %: 8 requests fit, the 9th waits, but a request not keeping anything fits.
        for _ in 0..8 {
            bucket
                .try_take(Cost::request(1), 0.2, t0)
                .expect("above the reserve");
        }
        assert!(bucket.try_take(Cost::request(1), 0.2, t0).is_err());
        assert!(bucket.try_take(Cost::request(1), 0.0, t0).is_ok());
    }

    #[test]
    fn a_request_larger_than_the_unreserved_share_waits_for_a_full_bucket() {
        let t0 = Instant::now();
        let mut bucket = proven(&limits(100, 1000), t0);
        assert!(bucket.try_take(Cost::request(900), 0.5, t0).is_ok());
    }

    #[test]
    fn debt_delays_later_admissions() {
        let t0 = Instant::now();
        let mut bucket = proven(&limits(1000, 600), t0);
        bucket.try_take(Cost::request(600), 0.0, t0).expect("fits");
        bucket.charge(
            Cost {
                requests: 0,
                tokens: 60,
            },
            t0,
        );
        assert_eq!(bucket.available(Resource::Tokens, t0), Some(-60.0));
        // 60 of debt plus 10 wanted at 10 tokens/s: 7 s.
        assert_eq!(
            bucket.wait_for(Cost::request(10), 0.0, t0),
            Ok(Duration::from_secs(7))
        );
    }

    #[test]
    fn refunds_never_exceed_capacity() {
        let t0 = Instant::now();
        let mut bucket = proven(&limits(10, 100), t0);
        bucket.give_back(Cost::request(50), t0);
        assert_eq!(bucket.available(Resource::Tokens, t0), Some(100.0));
        assert_eq!(bucket.available(Resource::Requests, t0), Some(10.0));
    }

    #[test]
    fn daily_limits_bind_alongside_minute_ones() {
        let t0 = Instant::now();
        let mut bucket = proven(
            &Limits {
                rpm: Some(100),
                rpd: Some(3),
                ..Limits::default()
            },
            t0,
        );
        for _ in 0..3 {
            bucket.try_take(Cost::request(0), 0.0, t0).expect("fits");
        }
        let Err(Shortfall::Wait { wait, .. }) =
            bucket.try_take(Cost::request(0), 0.0, at(t0, 60_000))
        else {
            panic!("the daily limit binds");
        };
        // One request of a 3/day limit refills in 8 h; a minute has passed.
        assert_eq!(wait, Duration::from_secs(8 * 3600 - 60));
    }

    #[test]
    fn changing_limits_keeps_what_was_spent() {
        let t0 = Instant::now();
        let mut bucket = proven(&limits(100, 1000), t0);
        bucket.try_take(Cost::request(400), 0.0, t0).expect("fits");
        bucket.set_limits(&limits(50, 500), t0);
        assert_eq!(bucket.available(Resource::Tokens, t0), Some(100.0));
        assert_eq!(bucket.available(Resource::Requests, t0), Some(49.0));
        assert_eq!(bucket.limit(Resource::Tokens), Some(500));
        bucket.set_limits(&limits(100, 2000), t0);
        assert_eq!(bucket.available(Resource::Tokens, t0), Some(1600.0));
    }

    #[test]
    fn the_margin_leaves_some_refill_unused() {
        let t0 = Instant::now();
        let mut bucket = proven_with_margin(&limits(60, 6000), Duration::from_millis(500), t0);
        bucket
            .try_take(Cost::request(6000), 0.0, t0)
            .expect("a full-size request still fits");
        // 100 tokens refill per second; 100 wanted plus half a second in hand: 1.5 s.
        assert_eq!(
            bucket.wait_for(Cost::request(100), 0.0, t0),
            Ok(Duration::from_millis(1500))
        );
        assert_eq!(
            bucket.projected_wait(Cost::request(200), 0.0, t0),
            Duration::from_millis(2500)
        );
    }

    #[test]
    fn unlimited_bucket_admits_everything() {
        let t0 = Instant::now();
        let mut bucket = proven(&Limits::default(), t0);
        for _ in 0..10_000 {
            bucket
                .try_take(Cost::request(1_000_000), 0.0, t0)
                .expect("no limits");
        }
        assert_eq!(bucket.available(Resource::Tokens, t0), None);
    }

    proptest! {
        /// Never above capacity, whatever sequence of takes, refunds and time steps.
        #[test]
        fn level_never_exceeds_capacity(
            ops in proptest::collection::vec((0u8..3, 0u64..3000, 0u64..5000), 1..200),
        ) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut bucket = proven(&limits(50, 2000), t0);
            for (op, amount, step) in ops {
                now += Duration::from_millis(step);
                match op {
                    0 => { let _ = bucket.try_take(Cost::request(amount), 0.0, now); }
                    1 => bucket.give_back(Cost::request(amount), now),
                    _ => bucket.charge(Cost { requests: 0, tokens: amount / 10 }, now),
                }
                prop_assert!(bucket.available(Resource::Tokens, now).unwrap_or(0.0) <= 2000.0);
                prop_assert!(bucket.available(Resource::Requests, now).unwrap_or(0.0) <= 50.0);
            }
        }

        /// Over any interval, a greedy client is admitted exactly what the refill allows:
        /// capacity plus rate times the interval (within one request of rounding).
        #[test]
        fn admits_exactly_the_refill_rate(
            rpm in 1u64..600,
            interval_ms in 1u64..180_000,
            step_ms in 1u64..500,
        ) {
            let t0 = Instant::now();
            let mut bucket = proven(&Limits { rpm: Some(rpm), ..Limits::default() }, t0);
            let mut admitted = 0u64;
            let mut elapsed = 0u64;
            while elapsed <= interval_ms {
                let now = at(t0, elapsed);
                while bucket.try_take(Cost::request(0), 0.0, now).is_ok() {
                    admitted += 1;
                }
                elapsed += step_ms;
            }
            let last = (interval_ms / step_ms) * step_ms;
            let allowed = rpm as f64 + rpm as f64 * last as f64 / 60_000.0;
            prop_assert!(admitted as f64 <= allowed + 1e-6, "admitted {admitted} > allowed {allowed}");
            prop_assert!(admitted as f64 >= allowed.floor() - 1.0, "admitted {admitted} < allowed {allowed}");
        }

        /// The predicted wait is exact: the cost does not fit just before it, and fits at it.
        #[test]
        fn predicted_wait_is_exact(tokens in 1u64..1000, spent in 0u64..1000) {
            let t0 = Instant::now();
            let mut bucket = proven(&limits(1000, 1000), t0);
            bucket.charge(Cost { requests: 0, tokens: spent }, t0);
            let wait = bucket.wait_for(Cost::request(tokens), 0.0, t0).expect("fits eventually");
            if wait > Duration::from_millis(2) {
                let mut early = bucket.clone();
                prop_assert!(early.try_take(Cost::request(tokens), 0.0, t0 + wait - Duration::from_millis(2)).is_err());
            }
            prop_assert!(bucket.try_take(Cost::request(tokens), 0.0, t0 + wait + Duration::from_micros(1)).is_ok());
        }
    }

    fn rpm(requests: u64) -> Limits {
        Limits {
            rpm: Some(requests),
            ..Limits::default()
        }
    }

    #[test]
    fn an_unproven_burst_lets_a_seconds_worth_go_then_asks_for_one_proof() {
        let t0 = Instant::now();
        let mut bucket = Bucket::new(&rpm(600), t0); // 10 per second
        assert!(!bucket.is_proven());
        for _ in 0..10 {
            bucket
                .try_take(Cost::request(0), 0.0, t0)
                .expect("within a quantum");
        }
        // The 11th would spend beyond a second's worth: it waits for the refill (0.1 s) or
        // goes alone to prove the burst.
        assert_eq!(
            bucket.try_take(Cost::request(0), 0.0, t0),
            Err(Shortfall::Unproven {
                wait: Duration::from_millis(100)
            })
        );
        bucket
            .take_as_proof(Cost::request(0), 0.0, t0)
            .expect("the proof goes");
        bucket.burst_proven();
        assert!(bucket.is_proven());
        // Proven, the rest of the minute's 600 goes at once.
        for _ in 0..589 {
            bucket
                .try_take(Cost::request(0), 0.0, t0)
                .expect("proven burst");
        }
        assert!(matches!(
            bucket.try_take(Cost::request(0), 0.0, t0),
            Err(Shortfall::Wait { .. })
        ));
    }

    #[test]
    fn within_a_seconds_worth_the_refill_keeps_an_unproven_bucket_flowing() {
        let t0 = Instant::now();
        let mut bucket = Bucket::new(&rpm(600), t0);
        for i in 0..100 {
            // One request every 100 ms, the rate itself: never beyond the quantum.
            let now = t0 + Duration::from_millis(100 * i);
            bucket
                .try_take(Cost::request(0), 0.0, now)
                .expect("at the rate");
        }
        assert!(!bucket.is_proven());
    }

    #[test]
    fn a_refused_proof_shrinks_the_burst_to_a_second_and_empties_it() {
        let t0 = Instant::now();
        let mut bucket = Bucket::new(&rpm(600), t0);
        for _ in 0..10 {
            bucket.try_take(Cost::request(0), 0.0, t0).expect("quantum");
        }
        bucket
            .take_as_proof(Cost::request(0), 0.0, t0)
            .expect("proof");
        bucket.burst_refused(Resource::Requests, t0);
        assert_eq!(bucket.burst(Resource::Requests), Some(10.0));
        assert!(bucket.available(Resource::Requests, t0).expect("limited") <= 0.0);
        // A second later the upstream's slice is full again, and so is sluice's: 10 go, and
        // no proof is asked of a burst no larger than a second's worth.
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..10 {
            bucket
                .try_take(Cost::request(0), 0.0, t1)
                .expect("refilled");
        }
        assert!(matches!(
            bucket.try_take(Cost::request(0), 0.0, t1),
            Err(Shortfall::Wait { .. })
        ));
    }

    #[test]
    fn a_regrown_burst_must_be_proven_again() {
        let t0 = Instant::now();
        let mut bucket = Bucket::new(&rpm(600), t0);
        bucket.burst_proven();
        bucket.burst_refused(Resource::Requests, t0);
        assert!(
            bucket.is_proven(),
            "a burst of a second's worth needs no proof"
        );
        // The burst doubles after BURST_RETRY; the level refills into it at the rate.
        let later = t0 + BURST_RETRY + Duration::from_secs(5);
        assert_eq!(bucket.available(Resource::Requests, later), Some(10.0));
        assert_eq!(bucket.burst(Resource::Requests), Some(20.0));
        assert!(!bucket.is_proven());
        let full = later + Duration::from_secs(1);
        for _ in 0..10 {
            bucket
                .try_take(Cost::request(0), 0.0, full)
                .expect("quantum");
        }
        assert!(matches!(
            bucket.try_take(Cost::request(0), 0.0, full),
            Err(Shortfall::Unproven { .. })
        ));
    }

    #[test]
    fn daily_limits_and_unproven_bursts_of_tokens() {
        let t0 = Instant::now();
        let daily = Limits {
            rpd: Some(1000),
            ..Limits::default()
        };
        let mut bucket = Bucket::new(&daily, t0);
        assert!(bucket.is_proven(), "daily limits are not quantized");
        for _ in 0..1000 {
            bucket
                .try_take(Cost::request(0), 0.0, t0)
                .expect("daily burst");
        }
        // 60 000 TPM: 1 000 tokens at once without proof; a request of 4 000 is larger than
        // a second's worth and goes only as the proof.
        let mut tokens = Bucket::new(&limits(1_000_000, 60_000), t0);
        assert!(matches!(
            tokens.try_take(Cost::request(4_000), 0.0, t0),
            Err(Shortfall::Unproven { .. })
        ));
        tokens
            .take_as_proof(Cost::request(4_000), 0.0, t0)
            .expect("proof");
    }

    #[test]
    fn refusals_it_had_room_for_make_a_bucket_keep_more_in_hand_for_a_while() {
        let t0 = Instant::now();
        let mut bucket = proven(&rpm(120), t0); // 2 per second
        bucket.contended(t0);
        // A second's worth (2 requests) stays in hand: 118 of 120 go at once.
        for _ in 0..118 {
            bucket
                .try_take(Cost::request(0), 0.0, t0)
                .expect("above the floor");
        }
        assert!(matches!(
            bucket.try_take(Cost::request(0), 0.0, t0),
            Err(Shortfall::Wait { .. })
        ));
        // One overshoot's 429s count once; the next refusal doubles it.
        bucket.contended(t0 + Duration::from_millis(50));
        assert_eq!(bucket.contention(), 1.0);
        bucket.contended(t0 + Duration::from_secs(1));
        assert_eq!(bucket.contention(), 2.0);
        for _ in 0..5 {
            bucket.contended(t0 + Duration::from_secs(10));
            bucket.contended(t0 + Duration::from_secs(11));
        }
        assert_eq!(bucket.contention(), MAX_CONTENTION.as_secs_f64());
        // Quiet for a decay period: it halves; after enough of them it is gone.
        let _ = bucket.available(
            Resource::Requests,
            t0 + Duration::from_secs(11) + CONTENTION_DECAY,
        );
        assert_eq!(bucket.contention(), MAX_CONTENTION.as_secs_f64() / 2.0);
        let _ = bucket.available(Resource::Requests, t0 + CONTENTION_DECAY * 10);
        assert_eq!(bucket.contention(), 0.0);
    }
}
