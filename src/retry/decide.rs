//! The decision after a failed attempt: replay at the upstream's hint, answer now with an
//! honest `retry-after`, cool the org down, or never retry. One pure function, [`decide`], in
//! the spirit of tower's `Policy::retry`; the proxy's exchange loop only carries it out.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::RetryConfig;
use crate::limiter::bucket::Cost;
use crate::limiter::budget::Evidence;
use crate::resource::Resource;
use crate::upstream::ratelimit::{message_figures, Family, RateLimitHeaders, Scope};

use super::{backoff, jitter, Class, ErrorBody, HintSource};

/// A 429's pause is spread by up to this share of its hint (at most [`MAX_JITTER`]), so the
/// requests of several sluice instances do not return in lockstep.
const JITTER_SHARE: f64 = 0.1;
const MAX_JITTER: Duration = Duration::from_millis(250);

/// The longest an open circuit waits beyond the 429's own hint.
const MAX_CIRCUIT_OPEN: Duration = Duration::from_secs(5);

/// An attempt that failed (no response, or a 429 or 5xx), as the retry decision reads it.
#[derive(Clone, Copy, Debug)]
pub struct Failure<'a> {
    pub class: Class,
    /// The upstream's wait hint, already checked for plausibility ([`implausible_hints`]).
    pub hint: Option<(Duration, HintSource)>,
    pub limits: &'a RateLimitHeaders,
    pub error: Option<&'a ErrorBody>,
}

/// Where a request stands after a failed attempt.
#[derive(Clone, Copy, Debug)]
pub struct Attempt {
    /// Attempts made, the failed one included.
    pub made: u32,
    /// Attempts allowed (`retry.max_attempts`).
    pub max: u32,
    /// The body can be sent again: it was read whole.
    pub resendable: bool,
    /// The cost its reservation holds; `None` when no bucket meters the request.
    pub metered: Option<Cost>,
    /// The latest moment it may still be sent.
    pub deadline: Instant,
}

impl Attempt {
    fn may_try_again(&self) -> bool {
        self.resendable && self.made < self.max
    }
}

/// The random draws a decision uses, each in `[0, 1)`: drawn by the caller, so the decision
/// itself is a pure function.
#[derive(Clone, Copy, Debug)]
pub struct Draws {
    pub backoff: f64,
    pub jitter: f64,
}

impl Draws {
    pub fn random() -> Self {
        Self {
            backoff: fastrand::f64(),
            jitter: fastrand::f64(),
        }
    }
}

/// What a rate-limit 429 does to the request's bucket, and then to the request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pause {
    /// Nothing of the bucket is sent before this.
    pub resume: Instant,
    /// When the circuit, if this 429 opens it, closes again.
    pub reset: Instant,
    /// What the 429 shows about the bucket's budget.
    pub evidence: Evidence,
    /// The wait the upstream asked for (or the backoff), plus the refused request's share.
    pub wait: Duration,
    /// Where `wait` came from; `None` for the backoff.
    pub source: Option<HintSource>,
    /// Send the request again after the pause; else answer the 429 now.
    pub replay: bool,
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    /// A rate limit on a metered request: pause its bucket, then replay the request or
    /// answer the 429 with the pause's wait.
    Pause(Pause),
    /// Answer with the upstream's response as it is: a 429 no bucket meters (the client
    /// decides), or an error no retry can fix that the client may still retry itself.
    Answer,
    /// Answer, telling the client not to retry (`x-should-retry: false`): the request can
    /// never succeed as sent.
    Refuse,
    /// The org's quota is spent: cool the org down, and refuse.
    CoolDown,
    /// A server error or a failed connection: retry after this wait if the retry budget
    /// allows one more.
    Retry(Duration),
}

/// Why a request is sent upstream again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    /// A rate-limit 429, replayed after its bucket's pause ([`Decision::Pause`]).
    RateLimit,
    /// A server error ([`Decision::Retry`]).
    ServerError,
    /// The connection failed before the request reached the upstream ([`retry_wait`]).
    Connection,
}

impl RetryReason {
    /// A Prometheus label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimit => "rate_limit",
            Self::ServerError => "server_error",
            Self::Connection => "connection",
        }
    }
}

/// Decides what follows a failed attempt, in the spirit of tower's `Policy::retry`: given the
/// failure, where the request stands, the retry settings, random draws and `now`.
pub fn decide(
    failure: &Failure<'_>,
    attempt: &Attempt,
    config: &RetryConfig,
    draws: Draws,
    now: Instant,
) -> Decision {
    match failure.class {
        Class::RateLimited(_) | Class::SlowDown => match attempt.metered {
            Some(cost) => Decision::Pause(pause(failure, attempt, cost, config, draws, now)),
            // Nothing meters this request (no bucket to pause): the client decides.
            None => Decision::Answer,
        },
        Class::Quota => Decision::CoolDown,
        Class::TooLarge => Decision::Refuse,
        Class::Overloaded | Class::ServerError => {
            match retry_wait(
                failure.hint.map(|(wait, _)| wait),
                attempt,
                config,
                draws,
                now,
            ) {
                Some(wait) => Decision::Retry(wait),
                None => Decision::Answer,
            }
        }
        Class::Fatal => Decision::Answer,
    }
}

/// How long to wait before retrying a server error or a refused connection (whose `hint` is
/// `None`), or `None` when it must not be retried: the body cannot be sent again, the
/// attempts are spent, or the wait would pass the deadline.
pub fn retry_wait(
    hint: Option<Duration>,
    attempt: &Attempt,
    config: &RetryConfig,
    draws: Draws,
    now: Instant,
) -> Option<Duration> {
    if !attempt.may_try_again() {
        return None;
    }
    let backoff = backoff(
        attempt.made.saturating_sub(1),
        config.backoff_base,
        config.backoff_max,
        draws.backoff,
    );
    // A failing upstream's hint is a minimum, not a licence: `retry-after: 0` on every 5xx
    // of a burst must not send the attempts back to back.
    let wait = hint.map_or(backoff, |hint| hint.max(backoff));
    (now + wait <= attempt.deadline).then_some(wait)
}

/// The pause a rate-limit 429 puts on a metered request's bucket.
fn pause(
    failure: &Failure<'_>,
    attempt: &Attempt,
    cost: Cost,
    config: &RetryConfig,
    draws: Draws,
    now: Instant,
) -> Pause {
    let Failure {
        class,
        hint,
        limits,
        error,
    } = *failure;
    let hinted = hint.map_or_else(
        || {
            backoff(
                attempt.made.saturating_sub(1),
                config.backoff_base,
                config.backoff_max,
                draws.backoff,
            )
        },
        |(wait, _)| wait,
    );
    // The refused request was counted too (docs/upstream.md): the hint is when this request
    // would have fitted before that, so the replay waits one more of its share.
    let wait = hinted + refused_share(class, limits, cost);
    let jitter_cap = wait.mul_f64(JITTER_SHARE).min(MAX_JITTER);
    let resume = now + jitter(wait, jitter_cap, draws.jitter);
    // The announced reset is when the bucket is full again (up to a minute for a drained
    // per-minute bucket); the circuit needs only room again, so it waits at most
    // MAX_CIRCUIT_OPEN past the hint.
    let reset = now + announced_reset(class, limits).clamp(wait, wait + MAX_CIRCUIT_OPEN);
    let evidence = match (burst_evidence(class, limits, error, cost), class) {
        (Some(resource), _) => Evidence::Burst(resource),
        // sluice admitted it, so its own account had room: someone else spent it.
        (None, Class::RateLimited(_)) => Evidence::Contention,
        (None, _) => Evidence::Nothing,
    };
    Pause {
        resume,
        reset,
        evidence,
        wait,
        source: hint.map(|(_, source)| source),
        replay: attempt.may_try_again(),
    }
}

/// When the bucket the 429 is about is full again, as the upstream announced it: when an
/// open circuit may try once more. For a 429 that names no resource, the longest per-minute
/// reset; resets beyond a minute describe a daily bucket, which is the deadline's business.
fn announced_reset(class: Class, limits: &RateLimitHeaders) -> Duration {
    Family::ALL
        .into_iter()
        .filter(|family| match class {
            Class::RateLimited(Some(resource)) => {
                family.resource() == resource && family.scope() != Scope::UsageBased
            }
            _ => true,
        })
        .filter_map(|family| limits.get(family)?.reset)
        .filter(|reset| *reset <= Duration::from_secs(61))
        .max()
        .unwrap_or(Duration::ZERO)
}

/// How long the upstream takes to refill what the refused request itself cost, capped.
fn refused_share(class: Class, limits: &RateLimitHeaders, cost: Cost) -> Duration {
    let (resource, units) = match class {
        Class::RateLimited(Some(Resource::Tokens)) => (Resource::Tokens, cost.tokens),
        _ => (Resource::Requests, cost.requests.max(1)),
    };
    let Some(limit) = limits
        .get(Family::of(resource, Scope::Organization))
        .and_then(|window| window.limit)
        .filter(|limit| *limit > 0)
    else {
        return Duration::ZERO;
    };
    Duration::from_secs_f64((units as f64 * 60.0 / limit as f64).min(10.0))
}

/// The resource whose burst the 429 shows is smaller than assumed: the upstream refused the
/// request although its per-minute figures had room for it (a quantized limit).
fn burst_evidence(
    class: Class,
    limits: &RateLimitHeaders,
    error: Option<&ErrorBody>,
    cost: Cost,
) -> Option<Resource> {
    let Class::RateLimited(Some(resource)) = class else {
        return None;
    };
    let needed = cost.of(resource).max(1.0);
    let family = Family::of(resource, Scope::Organization);
    if let Some(remaining) = limits.get(family).and_then(|window| window.remaining) {
        return (remaining as f64 >= needed).then_some(resource);
    }
    let figures = message_figures(error?.message.as_deref()?)?;
    let used = figures.used?;
    (used + figures.requested <= figures.limit).then_some(resource)
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue};

    use super::*;
    use crate::retry::tests::error;

    fn config() -> RetryConfig {
        RetryConfig {
            max_attempts: 5,
            circuit_threshold: 3,
            budget_ratio: 0.2,
            budget_min_per_sec: 10,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(8),
            quota_cooldown: Duration::from_secs(60),
        }
    }

    fn attempt(made: u32, now: Instant) -> Attempt {
        Attempt {
            made,
            max: 5,
            resendable: true,
            metered: Some(Cost::request(100)),
            deadline: now + Duration::from_secs(60),
        }
    }

    /// No jitter, no spread on the backoff: the decision's figures are exact.
    const FIXED: Draws = Draws {
        backoff: 0.0,
        jitter: 0.0,
    };

    fn headers(pairs: &[(&'static str, &'static str)]) -> RateLimitHeaders {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        RateLimitHeaders::parse(&map)
    }

    fn failure<'a>(
        class: Class,
        hint: Option<Duration>,
        limits: &'a RateLimitHeaders,
        error: Option<&'a ErrorBody>,
    ) -> Failure<'a> {
        Failure {
            class,
            hint: hint.map(|wait| (wait, HintSource::RetryAfterMs)),
            limits,
            error,
        }
    }

    fn paused(decision: Decision) -> Pause {
        match decision {
            Decision::Pause(pause) => pause,
            other => panic!("expected a pause, got {other:?}"),
        }
    }

    #[test]
    fn a_metered_rate_limit_pauses_its_bucket_and_replays_after_the_hint() {
        let now = Instant::now();
        let none = headers(&[]);
        let hint = Duration::from_millis(800);
        let limited = Class::RateLimited(Some(Resource::Requests));
        let pause = paused(decide(
            &failure(limited, Some(hint), &none, None),
            &attempt(1, now),
            &config(),
            FIXED,
            now,
        ));
        assert_eq!(pause.wait, hint);
        assert_eq!(pause.resume, now + hint);
        assert_eq!(pause.source, Some(HintSource::RetryAfterMs));
        assert!(pause.replay);
        // sluice had room for it, and nothing shows a burst: someone else spent it.
        assert_eq!(pause.evidence, Evidence::Contention);
        // No announced reset: the circuit reopens once the hint has passed.
        assert_eq!(pause.reset, now + hint);
    }

    #[test]
    fn the_refused_request_s_own_share_is_added_and_the_reset_bounds_the_circuit() {
        let now = Instant::now();
        // 60 a minute: the refused request itself takes a second to refill.
        let limits = headers(&[
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "30s"),
        ]);
        let hint = Duration::from_secs(1);
        let pause = paused(decide(
            &failure(
                Class::RateLimited(Some(Resource::Requests)),
                Some(hint),
                &limits,
                None,
            ),
            &attempt(1, now),
            &config(),
            FIXED,
            now,
        ));
        assert_eq!(pause.wait, Duration::from_secs(2));
        // The announced 30 s reset, but at most MAX_CIRCUIT_OPEN past the wait.
        assert_eq!(pause.reset, now + Duration::from_secs(2) + MAX_CIRCUIT_OPEN);
        assert_eq!(pause.evidence, Evidence::Contention);
    }

    #[test]
    fn a_429_with_room_left_in_the_minute_shows_a_smaller_burst() {
        let now = Instant::now();
        let limits = headers(&[
            ("x-ratelimit-limit-requests", "600"),
            ("x-ratelimit-remaining-requests", "590"),
        ]);
        let pause = paused(decide(
            &failure(
                Class::RateLimited(Some(Resource::Requests)),
                Some(Duration::from_millis(100)),
                &limits,
                None,
            ),
            &attempt(1, now),
            &config(),
            FIXED,
            now,
        ));
        assert_eq!(pause.evidence, Evidence::Burst(Resource::Requests));
        // Without headers, the message's figures tell the same.
        let none = headers(&[]);
        let room = error(
            Some("tokens"),
            Some("rate_limit_exceeded"),
            Some("Rate limit reached for gpt-4o on tokens per min (TPM): Limit 30000, Used 1000, Requested 100. Please try again in 6ms."),
        );
        let pause = paused(decide(
            &failure(
                Class::RateLimited(Some(Resource::Tokens)),
                Some(Duration::from_millis(6)),
                &none,
                Some(&room),
            ),
            &attempt(1, now),
            &config(),
            FIXED,
            now,
        ));
        assert_eq!(pause.evidence, Evidence::Burst(Resource::Tokens));
    }

    #[test]
    fn without_a_hint_the_pause_is_the_backoff_and_jitter_spreads_it() {
        let now = Instant::now();
        let none = headers(&[]);
        let slow = failure(Class::SlowDown, None, &none, None);
        let pause = paused(decide(&slow, &attempt(2, now), &config(), FIXED, now));
        // The second attempt's backoff: base * 2.
        assert_eq!(pause.wait, Duration::from_secs(1));
        assert_eq!(pause.source, None);
        assert_eq!(pause.evidence, Evidence::Nothing);
        let spread = Draws {
            backoff: 0.0,
            jitter: 1.0,
        };
        let pause = paused(decide(&slow, &attempt(2, now), &config(), spread, now));
        // A tenth of the wait, within MAX_JITTER.
        assert_eq!(pause.resume, now + Duration::from_millis(1_100));
    }

    #[test]
    fn a_rate_limit_that_cannot_be_replayed_is_answered_with_its_pause() {
        let now = Instant::now();
        let none = headers(&[]);
        let limited = failure(
            Class::RateLimited(Some(Resource::Tokens)),
            Some(Duration::from_secs(3)),
            &none,
            None,
        );
        let spent = paused(decide(&limited, &attempt(5, now), &config(), FIXED, now));
        assert!(!spent.replay, "the attempts are spent");
        let streamed = Attempt {
            resendable: false,
            ..attempt(1, now)
        };
        let once = paused(decide(&limited, &streamed, &config(), FIXED, now));
        assert!(!once.replay, "a streamed body cannot be sent again");
        // Nothing meters it: no bucket to pause, the client decides.
        let unmetered = Attempt {
            metered: None,
            ..attempt(1, now)
        };
        assert_eq!(
            decide(&limited, &unmetered, &config(), FIXED, now),
            Decision::Answer
        );
    }

    #[test]
    fn quota_too_large_and_fatal_are_never_retried() {
        let now = Instant::now();
        let none = headers(&[]);
        for (class, want) in [
            (Class::Quota, Decision::CoolDown),
            (Class::TooLarge, Decision::Refuse),
            (Class::Fatal, Decision::Answer),
        ] {
            let failed = failure(class, Some(Duration::from_secs(1)), &none, None);
            assert_eq!(
                decide(&failed, &attempt(1, now), &config(), FIXED, now),
                want,
                "{class:?}"
            );
        }
    }

    #[test]
    fn server_errors_retry_after_the_longer_of_hint_and_backoff_within_bounds() {
        let now = Instant::now();
        let none = headers(&[]);
        let zero = failure(Class::ServerError, Some(Duration::ZERO), &none, None);
        // `retry-after: 0` is a minimum, not a licence: the backoff still applies.
        assert_eq!(
            decide(&zero, &attempt(1, now), &config(), FIXED, now),
            Decision::Retry(Duration::from_millis(500))
        );
        let long = failure(Class::Overloaded, Some(Duration::from_secs(4)), &none, None);
        assert_eq!(
            decide(&long, &attempt(1, now), &config(), FIXED, now),
            Decision::Retry(Duration::from_secs(4))
        );
        let past_deadline = Attempt {
            deadline: now + Duration::from_secs(3),
            ..attempt(1, now)
        };
        assert_eq!(
            decide(&long, &past_deadline, &config(), FIXED, now),
            Decision::Answer
        );
        assert_eq!(
            decide(&zero, &attempt(5, now), &config(), FIXED, now),
            Decision::Answer,
            "the attempts are spent"
        );
        let streamed = Attempt {
            resendable: false,
            ..attempt(1, now)
        };
        assert_eq!(
            decide(&zero, &streamed, &config(), FIXED, now),
            Decision::Answer
        );
    }

    #[test]
    fn a_refused_connection_backs_off_by_attempt() {
        let now = Instant::now();
        let waits: Vec<Option<Duration>> = (1..=5)
            .map(|made| retry_wait(None, &attempt(made, now), &config(), FIXED, now))
            .collect();
        assert_eq!(
            waits,
            [
                Some(Duration::from_millis(500)),
                Some(Duration::from_secs(1)),
                Some(Duration::from_secs(2)),
                Some(Duration::from_secs(4)),
                None,
            ]
        );
    }
}
