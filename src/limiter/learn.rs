//! What the upstream's answers teach a bucket: the limits its rate-limit headers announce
//! (learned limits, which age out and can be doubted), and how far the bucket's levels are
//! from what the upstream had left, read against the sends the headers had not yet counted
//! (the send ledger). Pure state: every function takes `now`; the queue holds it under its
//! bucket's lock.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::limiter::bucket::{Bucket, Cost, Limits, Oversize, DAY, MINUTE};
use crate::resource::{PerResource, Resource};
use crate::upstream::ratelimit::{self, Family, RateLimitHeaders, Scope};

/// Header resets longer than this describe a daily window: a per-minute bucket is full again
/// within a minute, or within two when it is in debt (rejected requests count too).
const MINUTE_RESET_MAX: Duration = Duration::from_secs(125);

/// How long a learned limit stands without a response confirming it. Every response with
/// rate-limit headers confirms it, so only a bucket that sent nothing upstream for this long
/// (idle, or refusing everything on a limit that was wrong) forgets it and learns it anew.
const LEARNED_TTL: Duration = Duration::from_secs(3600);

/// When a request was sent upstream, and which send it was, so a header it brings back can
/// be corrected for what was sent after it.
#[derive(Clone, Copy, Debug)]
pub struct Mark {
    at: Instant,
    seq: u64,
}

/// One send upstream, and what the upstream had left when it admitted it (per resource: the
/// `remaining` of its response's headers), once known.
#[derive(Clone, Copy, Debug)]
struct Dispatch {
    seq: u64,
    cost: Cost,
    remaining: PerResource<Option<f64>>,
}

/// Sends remembered per bucket. A header is corrected for the sends after its own; one
/// older than this many sends is long superseded by newer headers.
const TRACKED_DISPATCHES: usize = 1024;

/// The latest sends upstream (re-sends included), oldest first, to tell what a header has
/// not seen.
#[derive(Debug, Default)]
struct Ledger {
    dispatches: VecDeque<Dispatch>,
    next: u64,
}

impl Ledger {
    fn dispatched(&mut self, cost: Cost, now: Instant) -> Mark {
        let seq = self.next;
        self.next += 1;
        if self.dispatches.len() >= TRACKED_DISPATCHES {
            self.dispatches.pop_front();
        }
        self.dispatches.push_back(Dispatch {
            seq,
            cost,
            remaining: PerResource::default(),
        });
        Mark { at: now, seq }
    }

    fn undispatched(&mut self, mark: Mark) {
        if let Some(index) = self.index(mark.seq) {
            self.dispatches.remove(index);
        }
    }

    /// Where the send `seq` is among those remembered.
    fn index(&self, seq: u64) -> Option<usize> {
        let first = self.dispatches.front()?.seq;
        let index = usize::try_from(seq.checked_sub(first)?).ok()?;
        // Sends removed from the middle (refused connections) shift the rest down.
        let guess = index.min(self.dispatches.len().saturating_sub(1));
        self.dispatches
            .range(..=guess)
            .rposition(|dispatch| dispatch.seq == seq)
    }

    /// The units of `resource` sent after the send `seq` that the upstream had not counted
    /// when it admitted `seq` with `remaining` left: all of them, except those whose own
    /// answers showed more left (the upstream admitted them first, so `remaining` already
    /// counts them).
    fn unseen_since(&self, seq: u64, resource: Resource, remaining: f64) -> f64 {
        self.dispatches
            .iter()
            .rev()
            .take_while(|dispatch| dispatch.seq > seq)
            .filter(|dispatch| {
                !dispatch
                    .remaining
                    .get(resource)
                    .is_some_and(|seen| seen > remaining)
            })
            .map(|dispatch| dispatch.cost.of(resource))
            .sum()
    }
}

/// What a bucket learned from the upstream.
#[derive(Debug)]
pub(super) struct Learned {
    /// Limits the upstream's headers announced.
    pub limits: Limits,
    /// When a response last announced a limit.
    confirmed_at: Option<Instant>,
    /// Unknown limits are learned from the upstream (`upstream.learn_limits`).
    pub enabled: bool,
    ledger: Ledger,
    /// The last rate-limit headers the upstream sent, and when.
    upstream: Option<(RateLimitHeaders, Instant)>,
}

impl Learned {
    pub(super) fn new(enabled: bool) -> Self {
        Self {
            limits: Limits::default(),
            confirmed_at: None,
            enabled,
            ledger: Ledger::default(),
            upstream: None,
        }
    }

    /// A request holding `cost` is being sent upstream now.
    pub(super) fn dispatched(&mut self, cost: Cost, now: Instant) -> Mark {
        self.ledger.dispatched(cost, now)
    }

    /// The send at `mark` never reached the upstream.
    pub(super) fn undispatched(&mut self, mark: Mark) {
        self.ledger.undispatched(mark);
    }

    /// Whether learned limits stood for [`LEARNED_TTL`] without a response confirming them.
    pub(super) fn is_stale(&self, now: Instant) -> bool {
        !self.limits.is_empty()
            && self
                .confirmed_at
                .is_some_and(|at| now.saturating_duration_since(at) > LEARNED_TTL)
    }

    /// Takes limits another replica learned, as if a response had announced them now.
    pub(super) fn adopt(&mut self, limits: Limits, now: Instant) {
        self.limits = limits;
        self.confirmed_at = (!limits.is_empty()).then_some(now);
    }

    pub(super) fn forget(&mut self) {
        self.limits = Limits::default();
        self.confirmed_at = None;
    }

    /// A request is larger than a limit in force. When that limit is only learned (the
    /// `configured` limits allow the request) and no response confirmed it for `interval`,
    /// the learned limit is forgotten so this request goes upstream: its answer teaches the
    /// limit again, whether it was real or came from a broken header. One header
    /// (`x-ratelimit-limit-tokens: 1`) thus refuses a bucket's requests for at most
    /// `interval`, and a real limit costs one refused request per `interval`. Returns whether
    /// it was forgotten.
    pub(super) fn doubt(
        &mut self,
        configured: &Limits,
        oversize: Oversize,
        cost: Cost,
        interval: Duration,
        now: Instant,
    ) -> bool {
        let Oversize {
            resource, window, ..
        } = oversize;
        let configured_allows = configured
            .get(resource, window)
            .is_none_or(|limit| cost.of(resource) <= limit as f64);
        let learned = self.limits.get(resource, window);
        let unconfirmed = self
            .confirmed_at
            .is_none_or(|at| now.saturating_duration_since(at) >= interval);
        if !(configured_allows && learned.is_some() && unconfirmed) {
            return false;
        }
        self.limits.clear(resource, window);
        // The doubt counts as a confirmation: the next doubt waits a whole interval again.
        self.confirmed_at = Some(now);
        true
    }

    /// Takes in the limits a response's headers announce (`views`, read from `headers`).
    /// Returns the learned limits when they changed.
    pub(super) fn learn(
        &mut self,
        headers: &RateLimitHeaders,
        views: &[(Resource, View)],
        now: Instant,
    ) -> Option<Limits> {
        self.upstream = Some((headers.clone(), now));
        let mut learned = self.limits;
        for (resource, view) in views {
            if let Some(limit) = view.limit {
                learned.set(*resource, view.window, limit);
            }
        }
        let changed = learned != self.limits;
        self.limits = learned;
        if !learned.is_empty() {
            self.confirmed_at = Some(now);
        }
        changed.then_some(learned)
    }

    /// Lowers `bucket`'s levels (when `levels`) to what the upstream had left when it
    /// admitted the send at `mark` less what was sent since, and shrinks its burst when the
    /// figures show a quantized limit.
    pub(super) fn correct(
        &mut self,
        mark: Mark,
        views: &[(Resource, View)],
        bucket: &mut Bucket,
        levels: bool,
        now: Instant,
    ) {
        let age = now.saturating_duration_since(mark.at);
        let own = self.ledger.index(mark.seq);
        for (resource, view) in views {
            if let Some(remaining) = view.remaining.filter(|_| levels) {
                let remaining = remaining as f64;
                let unseen = self.ledger.unseen_since(mark.seq, *resource, remaining);
                bucket.observe(*resource, view.window, remaining, unseen, age, now);
                if let Some(index) = own {
                    *self.ledger.dispatches[index].remaining.get_mut(*resource) = Some(remaining);
                }
            }
            // The reset tells how big the bucket really is: a quantized limit refills its
            // small slice within a fraction of the minute.
            if let (Some(capacity), Some(limit), true) =
                (view.implied_capacity, view.limit, view.window == MINUTE)
            {
                if capacity < 0.9 * limit as f64 {
                    bucket.shrink_burst(*resource, capacity, now);
                }
            }
        }
    }

    /// The upstream's last rate-limit headers, and how long ago they came.
    pub(super) fn last_headers(&self, now: Instant) -> Option<(RateLimitHeaders, Duration)> {
        self.upstream
            .as_ref()
            .map(|(headers, at)| (headers.clone(), now.saturating_duration_since(*at)))
    }
}

/// Each bucket resource as `headers` describe it.
pub(super) fn views(headers: &RateLimitHeaders) -> Vec<(Resource, View)> {
    Resource::BOTH
        .into_iter()
        .filter_map(|resource| View::of(headers, resource).map(|view| (resource, view)))
        .collect()
}

/// What the upstream had left per resource and window, as `views` tell.
pub(super) fn remaining(views: &[(Resource, View)]) -> Vec<(Resource, Duration, f64)> {
    views
        .iter()
        .filter_map(|(resource, view)| {
            view.remaining
                .map(|remaining| (*resource, view.window, remaining as f64))
        })
        .collect()
}

/// One resource as a response's headers describe it: the organization's and the project's
/// families together (the tighter wins).
#[derive(Clone, Copy, Debug)]
pub(super) struct View {
    window: Duration,
    limit: Option<u64>,
    remaining: Option<u64>,
    implied_capacity: Option<f64>,
}

impl View {
    fn of(headers: &RateLimitHeaders, resource: Resource) -> Option<View> {
        let families =
            [Scope::Organization, Scope::Project].map(|scope| Family::of(resource, scope));
        let mut view: Option<View> = None;
        for family in families {
            let Some(window) = headers.get(family) else {
                continue;
            };
            let span = if window.reset.is_some_and(|reset| reset > MINUTE_RESET_MAX) {
                DAY
            } else {
                MINUTE
            };
            let limit = window.limit.filter(|limit| *limit > 0);
            let next = View {
                window: span,
                limit,
                remaining: window.remaining,
                implied_capacity: ratelimit::implied_capacity(&window, span.as_secs_f64()),
            };
            view = Some(match view {
                None => next,
                Some(current) => View {
                    window: current.window,
                    limit: min_some(current.limit, next.limit),
                    remaining: min_some(current.remaining, next.remaining),
                    implied_capacity: current.implied_capacity,
                },
            });
        }
        view
    }
}

fn min_some(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A configured limit above what the upstream announces cannot be had: it is lowered, and
/// the operator told.
pub(super) fn warn_if_above_upstream(
    org: &str,
    model: &str,
    configured: &Limits,
    learned: &Limits,
) {
    for (name, configured, learned) in [
        ("rpm", configured.rpm, learned.rpm),
        ("tpm", configured.tpm, learned.tpm),
        ("rpd", configured.rpd, learned.rpd),
        ("tpd", configured.tpd, learned.tpd),
    ] {
        if let (Some(configured), Some(learned)) = (configured, learned) {
            if configured > learned {
                tracing::warn!(
                    org,
                    model,
                    limit = name,
                    configured,
                    upstream = learned,
                    "configured limit is above the upstream's; using the upstream's"
                );
            }
        }
    }
}
