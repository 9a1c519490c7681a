//! The retry policy: what an upstream failure means, how long it asks to wait, how long to back
//! off when it does not say, and a budget that stops retries from multiplying an outage.
//!
//! Decisions only, in tower's split of policy from machinery: nothing here sleeps, sends or
//! reads a clock. The proxy asks [`classify`] whether an outcome can succeed later,
//! [`wait_hint`] how long the upstream wants it to wait (else [`backoff`]), and the shared
//! [`RetryBudget`] whether one more retry is affordable.
//!
//! Classification follows docs/upstream.md §2: it reads the error body's `type` and `code`, and the
//! numbers in its message, never the message's prose.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use http::{header, HeaderMap};
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::resource::Resource;
use crate::upstream::ratelimit::{
    message_figures, parse_retry_after, parse_retry_after_ms, try_again_in, Family,
    RateLimitHeaders, Reason, Scope,
};

/// The fields of an upstream error body that classification reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorBody {
    /// `error.type`: `tokens`, `requests`, `insufficient_quota`, `rate_limit_error`, ...
    pub kind: Option<String>,
    /// `error.code`, with a numeric code (Azure's `429`) read as its decimal text.
    pub code: Option<String>,
    pub message: Option<String>,
}

/// A string field, or a number written out; `null`, booleans, objects and arrays read as absent.
fn text(value: Option<Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Reads an error body: OpenAI's and Azure's `{"error": {"message", "type", "param", "code"}}`
/// or Anthropic's `{"type": "error", "error": {"type", "message"}}`. Unknown fields are
/// ignored, and a field of an unexpected JSON type reads as absent. `None` when the body is
/// not JSON or has no `error` object. Never panics.
pub fn parse_error_body(body: &[u8]) -> Option<ErrorBody> {
    // Maps rather than derived structs: serde would also accept a JSON array as a struct.
    let mut top: Map<String, Value> = serde_json::from_slice(body).ok()?;
    let Value::Object(mut error) = top.remove("error")? else {
        return None;
    };
    Some(ErrorBody {
        kind: text(error.remove("type")),
        code: text(error.remove("code")),
        message: match error.remove("message") {
            Some(Value::String(message)) => Some(message),
            _ => None,
        },
    })
}

/// What an upstream failure means for retrying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A bucket is momentarily empty: retry after the hinted wait. The resource the 429 says
    /// ran out; `None` when it does not say (Azure's and Anthropic's 429s, or a body that
    /// could not be read).
    RateLimited(Option<Resource>),
    /// Traffic ramped up too fast: retry after the hinted wait, and ramp more gently.
    SlowDown,
    /// The request is larger than the whole token bucket: it can never succeed.
    TooLarge,
    /// Out of credit or over a spend limit: retrying does not restore access.
    Quota,
    /// 503 or Anthropic's 529: retry, honouring `retry-after`.
    Overloaded,
    /// 500, 502, 504 (and Cloudflare's 520-524): retry with backoff, only if nothing was
    /// streamed yet.
    ServerError,
    /// Anything else: the same request fails the same way again.
    Fatal,
}

impl Class {
    /// What a 429 of this class says: a rate limit names its resource, when it does.
    pub fn reason(self) -> Reason {
        match self {
            Self::RateLimited(Some(resource)) => Reason::Limited(resource),
            Self::SlowDown => Reason::SlowDown,
            Self::Quota => Reason::Quota,
            Self::TooLarge => Reason::TooLarge,
            Self::RateLimited(None) | Self::Overloaded | Self::ServerError | Self::Fatal => {
                Reason::Other
            }
        }
    }

    /// A Prometheus reason label: `requests`, `tokens`, `slow_down`, `quota`, `too_large` or
    /// `other` (see [`Reason::as_str`]).
    pub fn label(self) -> &'static str {
        self.reason().as_str()
    }

    #[cfg(test)]
    /// Whether a later attempt of the same request can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::RateLimited(_) | Self::SlowDown | Self::Overloaded | Self::ServerError
        )
    }
}

/// 429 codes (or types) after which no wait restores access.
const QUOTA: &[&str] = &[
    "insufficient_quota",
    "credit_balance_exhausted",
    "organization_spend_limit_exceeded",
    "project_spend_limit_exceeded",
    "organization_usage_limit_exceeded",
    "billing_hard_limit_reached",
    "billing_not_active",
];

/// Classifies a failed upstream response (status >= 400; anything else reads as `Fatal`).
///
/// `requested_tokens` is what sluice estimated for the request and `token_limit` the
/// upstream's `x-ratelimit-limit-tokens`; when both are known and the request exceeds the
/// limit, a token 429 is [`Class::TooLarge`] even if its message carries no figures.
pub fn classify(
    status: u16,
    body: Option<&ErrorBody>,
    requested_tokens: Option<u64>,
    token_limit: Option<u64>,
) -> Class {
    match status {
        429 => classify_429(body, requested_tokens, token_limit),
        503 | 529 => Class::Overloaded,
        // 520-524 are Cloudflare's "origin unreachable/timed out", seen in front of OpenAI:
        // transient like a 502 or 504.
        500 | 502 | 504 | 520..=524 => Class::ServerError,
        _ => Class::Fatal,
    }
}

fn classify_429(
    body: Option<&ErrorBody>,
    requested_tokens: Option<u64>,
    token_limit: Option<u64>,
) -> Class {
    let kind = body.and_then(|b| b.kind.as_deref());
    let code = body.and_then(|b| b.code.as_deref());
    let either_in = |names: &[&str]| {
        kind.is_some_and(|k| names.contains(&k)) || code.is_some_and(|c| names.contains(&c))
    };
    if either_in(QUOTA) {
        return Class::Quota;
    }
    if either_in(&["slow_down"]) {
        return Class::SlowDown;
    }
    // `requests`, `tokens` and their variants (`tokens_usage_based`, daily ones); Azure's
    // code "429" and Anthropic's `rate_limit_error` do not say which bucket.
    let limited = match kind {
        Some(k) if k.starts_with("requests") => Some(Resource::Requests),
        Some(k) if k.starts_with("tokens") => Some(Resource::Tokens),
        _ => None,
    };
    if limited != Some(Resource::Requests) {
        // A request bigger than the whole bucket: the message's "Limit 30000, Requested 31538"
        // (no "Used" figure), or sluice's own estimate against the header's limit.
        let figures_too_large = body
            .and_then(|b| b.message.as_deref())
            .and_then(message_figures)
            .is_some_and(|f| f.requested > f.limit);
        let estimate_too_large = matches!(
            (requested_tokens, token_limit),
            (Some(requested), Some(limit)) if requested > limit
        );
        if figures_too_large || estimate_too_large {
            return Class::TooLarge;
        }
    }
    Class::RateLimited(limited)
}

/// Where a wait came from, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HintSource {
    RetryAfterMs,
    RetryAfter,
    Message,
    Reset,
    Backoff,
}

impl HintSource {
    /// A Prometheus label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::RetryAfterMs => "retry_after_ms",
            Self::RetryAfter => "retry_after",
            Self::Message => "message",
            Self::Reset => "reset",
            Self::Backoff => "backoff",
        }
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok()
}

/// How long the upstream asked to wait before retrying, and where that came from, taking the
/// first usable of, in the official SDKs' order and then the next-best hints (docs/upstream.md §2):
/// `retry-after-ms`, `retry-after` (relative to `now` when it is a date), the message's
/// "try again in", and the `x-ratelimit-reset-*` of the limited resource.
///
/// Resets are read only for [`Class::RateLimited`] and [`Class::SlowDown`], and a zero reset
/// is never a hint: on a 429 the bucket that did not bind may read `0s`, and one that did
/// cannot truly be full. For `Requests` (`Tokens`) the requests (tokens) reset is used, else
/// the project and usage-based ones of the same kind; when the resource is unknown, the
/// largest of the requests, tokens and project resets.
///
/// A hint longer than [`PLAUSIBLE_WAIT`] is malformed, not a wait: it is skipped (the next
/// source is read instead) and counted by [`implausible_hints`]. `None` when nothing is
/// usable; the caller then uses [`backoff`].
pub fn wait_hint(
    class: Class,
    headers: &HeaderMap,
    limits: &RateLimitHeaders,
    body: Option<&ErrorBody>,
    now: SystemTime,
) -> Option<(Duration, HintSource)> {
    hints(class, headers, limits, body, now)
        .into_iter()
        .flatten()
        .find(|(wait, _)| *wait <= PLAUSIBLE_WAIT)
}

/// The longest wait an upstream can mean: its longest window is a day, and a daily bucket
/// has been seen announcing resets a few minutes past 24 h. Anything longer (Azure-style bare
/// seconds gone wrong, `retry-after: 300000000`) would stop a bucket for years on one header.
pub const PLAUSIBLE_WAIT: Duration = Duration::from_secs(25 * 3600);

/// How many of the response's wait hints were longer than [`PLAUSIBLE_WAIT`] (and so ignored
/// by [`wait_hint`]).
pub fn implausible_hints(
    class: Class,
    headers: &HeaderMap,
    limits: &RateLimitHeaders,
    body: Option<&ErrorBody>,
    now: SystemTime,
) -> u32 {
    hints(class, headers, limits, body, now)
        .into_iter()
        .flatten()
        .filter(|(wait, _)| *wait > PLAUSIBLE_WAIT)
        .count() as u32
}

/// Every hint the response carries, in the order they are honoured, as read (up to
/// [`MAX_DURATION`]).
///
/// [`MAX_DURATION`]: crate::upstream::ratelimit::MAX_DURATION
fn hints(
    class: Class,
    headers: &HeaderMap,
    limits: &RateLimitHeaders,
    body: Option<&ErrorBody>,
    now: SystemTime,
) -> [Option<(Duration, HintSource)>; 4] {
    let retry_after_ms = header_str(headers, "retry-after-ms")
        .and_then(parse_retry_after_ms)
        .map(|wait| (wait, HintSource::RetryAfterMs));
    let retry_after = header_str(headers, header::RETRY_AFTER.as_str())
        .and_then(|s| parse_retry_after(s, now))
        .map(|wait| (wait, HintSource::RetryAfter));
    let message = body
        .and_then(|b| b.message.as_deref())
        .and_then(try_again_in)
        .map(|wait| (wait, HintSource::Message));
    let reset = reset_hint(class, limits).map(|wait| (wait, HintSource::Reset));
    [retry_after_ms, retry_after, message, reset]
}

fn reset_hint(class: Class, limits: &RateLimitHeaders) -> Option<Duration> {
    let reset = |family| {
        limits
            .get(family)
            .and_then(|w| w.reset)
            .filter(|d| !d.is_zero())
    };
    match class {
        Class::RateLimited(Some(resource)) => Scope::ALL
            .into_iter()
            .find_map(|scope| reset(Family::of(resource, scope))),
        Class::RateLimited(None) | Class::SlowDown => Family::ALL
            .into_iter()
            .filter(|family| family.scope() != Scope::UsageBased)
            .filter_map(reset)
            .max(),
        _ => None,
    }
}

/// `d * factor`, `factor` clamped to `[0, 1]` (NaN reads 0), in integer nanoseconds so no `Duration` can
/// overflow (a float `mul_f64` panics near `Duration::MAX`).
fn scale(d: Duration, factor: f64) -> Duration {
    const ONE: u128 = 1 << 20;
    let factor = if factor.is_nan() {
        0.0
    } else {
        factor.clamp(0.0, 1.0)
    };
    let nanos = d.as_nanos() * ((factor * ONE as f64) as u128) / ONE;
    // nanos <= d.as_nanos(), so the seconds fit in u64.
    Duration::new(
        (nanos / 1_000_000_000) as u64,
        (nanos % 1_000_000_000) as u32,
    )
}

/// The SDKs' backoff when the upstream gave no hint: `min(base * 2^attempt, cap) * (1 - 0.25 *
/// rand01)`, so between 75 % and 100 % of the capped exponential. `attempt` counts from 0;
/// `rand01` is clamped to `[0, 1]` (NaN reads 0). Saturates at `cap`; never panics.
pub fn backoff(attempt: u32, base: Duration, cap: Duration, rand01: f64) -> Duration {
    let exponential = 1u32
        .checked_shl(attempt)
        .and_then(|factor| base.checked_mul(factor))
        .map_or(cap, |d| d.min(cap));
    let rand01 = if rand01.is_nan() { 0.0 } else { rand01 };
    scale(exponential, 1.0 - 0.25 * rand01.clamp(0.0, 1.0))
}

/// `wait + rand01 * max_extra`, saturating: a small spread so waiters released by the same
/// hint do not all retry in the same instant. `rand01` is clamped to `[0, 1]` (NaN reads 0).
pub fn jitter(wait: Duration, max_extra: Duration, rand01: f64) -> Duration {
    wait.saturating_add(scale(max_extra, rand01))
}

/// How many slots the budget's window is divided into: deposits leave the window between
/// `ttl * (SLOTS - 1) / SLOTS` and `ttl` after they were made.
const SLOTS: usize = 10;

/// Limits retries to a share of the traffic, as tower's `TpsBudget`, so an upstream outage is
/// not multiplied by every client's retries.
///
/// Each original request [`deposit`](Self::deposit)s one; each retry must
/// [`try_withdraw`](Self::try_withdraw), which succeeds while the retries made in the last
/// `ttl` number fewer than `ratio` times the requests deposited in the same window plus a
/// reserve of `min_per_sec * ttl_secs`, the retries always allowed even with no traffic (like
/// tower, the reserve is a per-window total, not a per-second rate). Deposits and withdrawals
/// count for `ttl`, to within a tenth of it.
///
/// Time is passed in. Shared by every request: one short mutex section per call, never held
/// across an `.await`. Instants earlier than one already seen count in the current slot.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    reserve: u64,
    slot: Duration,
    ring: Mutex<Ring>,
}

#[derive(Debug)]
struct Ring {
    /// The first instant seen; slots are counted from it.
    origin: Option<Instant>,
    /// The slot number (since `origin`) the ring was last advanced to.
    current: u64,
    deposits: [u64; SLOTS],
    withdrawals: [u64; SLOTS],
}

impl Ring {
    /// Moves the ring to the slot of `now`, clearing the slots that left the window, and
    /// returns the index of the slot to count in.
    fn advance(&mut self, now: Instant, slot: Duration) -> usize {
        let origin = *self.origin.get_or_insert(now);
        let since = now.saturating_duration_since(origin).as_nanos() / slot.as_nanos();
        let number = u64::try_from(since).unwrap_or(u64::MAX);
        if number > self.current {
            let stale = (number - self.current).min(SLOTS as u64);
            for step in 1..=stale {
                let index = ((self.current + step) % SLOTS as u64) as usize;
                self.deposits[index] = 0;
                self.withdrawals[index] = 0;
            }
            self.current = number;
        }
        (self.current % SLOTS as u64) as usize
    }
}

impl RetryBudget {
    /// `ratio`: retries allowed per original request (0.2 = a fifth of the traffic), clamped
    /// to `[0, 1000]`, NaN read as 0. `min_per_sec`: retries allowed per second of `ttl`
    /// whatever the traffic. `ttl`: how long a deposit counts, clamped to `[1 s, 1 h]`.
    pub fn new(ratio: f64, min_per_sec: u32, ttl: Duration) -> RetryBudget {
        let ratio = if ratio.is_nan() {
            0.0
        } else {
            ratio.clamp(0.0, 1000.0)
        };
        let ttl = ttl.clamp(Duration::from_secs(1), Duration::from_secs(3600));
        RetryBudget {
            ratio,
            reserve: (f64::from(min_per_sec) * ttl.as_secs_f64()) as u64,
            slot: ttl / SLOTS as u32,
            ring: Mutex::new(Ring {
                origin: None,
                current: 0,
                deposits: [0; SLOTS],
                withdrawals: [0; SLOTS],
            }),
        }
    }

    /// Records one original (not retried) request.
    pub fn deposit(&self, now: Instant) {
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        let index = ring.advance(now, self.slot);
        ring.deposits[index] = ring.deposits[index].saturating_add(1);
    }

    /// Takes one retry from the budget: true if it may be made, false if the budget is spent
    /// (and then nothing is taken).
    pub fn try_withdraw(&self, now: Instant) -> bool {
        // Counters are plain integers, consistent even if a holder panicked.
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        let index = ring.advance(now, self.slot);
        let deposits = ring.deposits.iter().fold(0u64, |a, n| a.saturating_add(*n));
        let withdrawals = ring
            .withdrawals
            .iter()
            .fold(0u64, |a, n| a.saturating_add(*n));
        let allowed = self
            .reserve
            .saturating_add((self.ratio * deposits as f64) as u64);
        if withdrawals >= allowed {
            return false;
        }
        ring.withdrawals[index] += 1;
        true
    }
}

mod decide;

pub use decide::{decide, retry_wait, Attempt, Decision, Draws, Failure, Pause, RetryReason};

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;
    use std::sync::Arc;

    use crate::upstream::ratelimit::Window;

    const TOKENS_429: &str = r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-X on tokens per min (TPM): Limit 30000, Used 29937, Requested 385. Please try again in 644ms. Visit https://platform.openai.com/account/rate-limits to learn more.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
    const REQUESTS_429: &str = r#"{"error":{"message":"Rate limit reached for gpt-4o-mini in organization org-X on requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 20s. Visit https://platform.openai.com/account/rate-limits to learn more.","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
    const TOO_LARGE_429: &str = r#"{"error":{"message":"Request too large for gpt-4o in organization org-X on tokens per min (TPM): Limit 30000, Requested 31538. The input or output tokens must be reduced in order to run successfully. Visit https://platform.openai.com/account/rate-limits to learn more.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
    const QUOTA_429: &str = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
    const AZURE_429: &str = r#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-02-01 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 6 seconds. Go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit."}}"#;
    const ANTHROPIC_429: &str = r#"{"type":"error","error":{"type":"rate_limit_error","message":"This request would exceed the rate limit for your organization (org-X) of 40,000 input tokens per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits."}}"#;
    const ANTHROPIC_529: &str =
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    const OVERLOADED_503: &str = r#"{"error":{"message":"The server is overloaded or not ready yet.","type":"server_error","param":null,"code":"server_is_overloaded"}}"#;
    const SERVER_500: &str = r#"{"error":{"message":"The server had an error while processing your request. Sorry about that!","type":"server_error","param":null,"code":null}}"#;
    const BAD_KEY_401: &str = r#"{"error":{"message":"Incorrect API key provided: sk-abc. You can find your API key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
    const NO_MODEL_404: &str = r#"{"error":{"message":"The model `gpt-9` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#;

    fn body(json: &str) -> ErrorBody {
        parse_error_body(json.as_bytes()).expect("an error body")
    }

    /// An error body of these fields (also for [`decide`]'s tests).
    pub(super) fn error(
        kind: Option<&str>,
        code: Option<&str>,
        message: Option<&str>,
    ) -> ErrorBody {
        ErrorBody {
            kind: kind.map(str::to_owned),
            code: code.map(str::to_owned),
            message: message.map(str::to_owned),
        }
    }

    fn classify_json(status: u16, json: &str) -> Class {
        classify(status, Some(&body(json)), None, None)
    }

    #[test]
    fn parses_openai_bodies() {
        assert_eq!(
            body(TOKENS_429),
            error(
                Some("tokens"),
                Some("rate_limit_exceeded"),
                Some("Rate limit reached for gpt-4o in organization org-X on tokens per min (TPM): Limit 30000, Used 29937, Requested 385. Please try again in 644ms. Visit https://platform.openai.com/account/rate-limits to learn more.")
            )
        );
        let quota = body(QUOTA_429);
        assert_eq!(quota.kind.as_deref(), Some("insufficient_quota"));
        assert_eq!(quota.code.as_deref(), Some("insufficient_quota"));
        assert_eq!(body(SERVER_500).code, None);
    }

    #[test]
    fn parses_azure_and_anthropic_bodies() {
        let azure = body(AZURE_429);
        assert_eq!(azure.kind, None);
        assert_eq!(azure.code.as_deref(), Some("429"));
        assert!(azure.message.is_some());
        assert_eq!(
            body(r#"{"error":{"code":429,"message":"Too many requests"}}"#),
            error(None, Some("429"), Some("Too many requests"))
        );
        let anthropic = body(ANTHROPIC_429);
        assert_eq!(anthropic.kind.as_deref(), Some("rate_limit_error"));
        assert_eq!(anthropic.code, None);
        assert_eq!(
            body(ANTHROPIC_529),
            error(Some("overloaded_error"), None, Some("Overloaded"))
        );
    }

    #[test]
    fn odd_fields_read_as_absent() {
        assert_eq!(body(r#"{"error":{}}"#), ErrorBody::default());
        assert_eq!(
            body(
                r#"{"error":{"type":["x"],"code":{"a":1},"message":42,"param":"p","extra":true}}"#
            ),
            ErrorBody::default()
        );
        assert_eq!(
            body(r#"{"error":{"type":null,"code":1.5,"message":null}}"#),
            error(None, Some("1.5"), None)
        );
    }

    #[test]
    fn garbage_bodies_are_not_errors() {
        for raw in [
            &b""[..],
            b"Too Many Requests",
            b"<html><body>502 Bad Gateway</body></html>",
            b"{",
            b"null",
            b"[]",
            b"{}",
            b"{\"error\":null}",
            b"{\"error\":\"rate limited\"}",
            b"{\"error\":[1,2]}",
            b"{\"message\":\"x\",\"type\":\"tokens\"}",
            b"\xff\xfe\x00",
            b"data: {\"error\":{}}",
        ] {
            assert_eq!(
                parse_error_body(raw),
                None,
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        // Deep nesting hits serde_json's recursion limit instead of the stack.
        let deep = format!(
            "{{\"error\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(parse_error_body(deep.as_bytes()), None);
    }

    #[test]
    fn protocol_table_rows() {
        let rows: &[(u16, &str, Class)] = &[
            (
                429,
                REQUESTS_429,
                Class::RateLimited(Some(Resource::Requests)),
            ),
            (429, TOKENS_429, Class::RateLimited(Some(Resource::Tokens))),
            (429, TOO_LARGE_429, Class::TooLarge),
            (429, QUOTA_429, Class::Quota),
            (
                429,
                r#"{"error":{"message":"Too fast","type":"slow_down","param":null,"code":"slow_down"}}"#,
                Class::SlowDown,
            ),
            (503, OVERLOADED_503, Class::Overloaded),
            (500, SERVER_500, Class::ServerError),
            (502, SERVER_500, Class::ServerError),
            (504, SERVER_500, Class::ServerError),
            (401, BAD_KEY_401, Class::Fatal),
            (404, NO_MODEL_404, Class::Fatal),
            (429, AZURE_429, Class::RateLimited(None)),
            (429, ANTHROPIC_429, Class::RateLimited(None)),
            (529, ANTHROPIC_529, Class::Overloaded),
        ];
        for (status, json, want) in rows {
            assert_eq!(classify_json(*status, json), *want, "{status} {json}");
        }
    }

    #[test]
    fn every_quota_code() {
        for name in QUOTA {
            let by_code = error(Some("requests"), Some(name), None);
            assert_eq!(
                classify(429, Some(&by_code), None, None),
                Class::Quota,
                "{name}"
            );
            let by_type = error(Some(name), None, None);
            assert_eq!(
                classify(429, Some(&by_type), None, None),
                Class::Quota,
                "{name}"
            );
        }
        // Quota wins over the figures of a message that would otherwise read as too large.
        let quota = error(
            Some("insufficient_quota"),
            Some("insufficient_quota"),
            Some("Limit 10, Requested 20"),
        );
        assert_eq!(
            classify(429, Some(&quota), Some(50), Some(10)),
            Class::Quota
        );
    }

    #[test]
    fn slow_down_by_code_or_type() {
        for body in [
            error(None, Some("slow_down"), None),
            error(Some("slow_down"), None, None),
            error(
                Some("tokens"),
                Some("slow_down"),
                Some("Limit 1, Requested 2"),
            ),
        ] {
            assert_eq!(classify(429, Some(&body), None, None), Class::SlowDown);
        }
    }

    #[test]
    fn rate_limit_variants() {
        let cases: &[(Option<&str>, Option<&str>, Class)] = &[
            (
                Some("tokens_usage_based"),
                Some("rate_limit_exceeded"),
                Class::RateLimited(Some(Resource::Tokens)),
            ),
            (
                Some("requests_usage_based"),
                Some("rate_limit_exceeded"),
                Class::RateLimited(Some(Resource::Requests)),
            ),
            (
                Some("tokens_per_day"),
                None,
                Class::RateLimited(Some(Resource::Tokens)),
            ),
            (
                Some("requests_per_day"),
                None,
                Class::RateLimited(Some(Resource::Requests)),
            ),
            (None, Some("rate_limit_exceeded"), Class::RateLimited(None)),
            (
                Some("invalid_request_error"),
                Some("something_new"),
                Class::RateLimited(None),
            ),
            (None, None, Class::RateLimited(None)),
        ];
        for (kind, code, want) in cases {
            let body = error(*kind, *code, None);
            assert_eq!(
                classify(429, Some(&body), None, None),
                *want,
                "{kind:?} {code:?}"
            );
        }
        assert_eq!(classify(429, None, None, None), Class::RateLimited(None));
    }

    #[test]
    fn too_large_from_figures_or_estimate() {
        // A momentary shortage ("Used" present, requested within the limit) is retryable.
        assert_eq!(
            classify_json(429, TOKENS_429),
            Class::RateLimited(Some(Resource::Tokens))
        );
        // Requested above the limit never fits, with or without a Used figure.
        let used = error(
            Some("tokens"),
            None,
            Some("Limit 30000, Used 100, Requested 31538."),
        );
        assert_eq!(classify(429, Some(&used), None, None), Class::TooLarge);
        // sluice's estimate against the header's limit, when the message has no figures.
        let bare = error(Some("tokens"), Some("rate_limit_exceeded"), None);
        assert_eq!(
            classify(429, Some(&bare), Some(40_001), Some(40_000)),
            Class::TooLarge
        );
        assert_eq!(
            classify(429, Some(&bare), Some(40_000), Some(40_000)),
            Class::RateLimited(Some(Resource::Tokens))
        );
        assert_eq!(
            classify(429, Some(&bare), Some(40_001), None),
            Class::RateLimited(Some(Resource::Tokens))
        );
        assert_eq!(
            classify(429, Some(&bare), None, Some(1)),
            Class::RateLimited(Some(Resource::Tokens))
        );
        // Unknown resource (Azure, Anthropic, no body) can be too large too.
        assert_eq!(classify(429, None, Some(10), Some(5)), Class::TooLarge);
        let azure = body(AZURE_429);
        assert_eq!(
            classify(429, Some(&azure), Some(10), Some(5)),
            Class::TooLarge
        );
        // A requests 429 is never about size.
        let requests = error(Some("requests"), None, Some("Limit 3, Requested 5"));
        assert_eq!(
            classify(429, Some(&requests), Some(10), Some(5)),
            Class::RateLimited(Some(Resource::Requests))
        );
        // A too-large request only matters on a 429.
        assert_eq!(classify_json(400, TOO_LARGE_429), Class::Fatal);
    }

    #[test]
    fn status_rows() {
        for status in [503, 529] {
            assert_eq!(classify(status, None, None, None), Class::Overloaded);
        }
        for status in [500, 502, 504, 520, 522, 524] {
            assert_eq!(classify(status, None, None, None), Class::ServerError);
        }
        for status in [
            0, 200, 204, 301, 304, 400, 401, 403, 404, 408, 409, 413, 422, 501, 505, 511, 599, 999,
        ] {
            assert_eq!(classify(status, None, None, None), Class::Fatal, "{status}");
        }
        // Body fields never turn a non-429 into a rate limit or quota error.
        assert_eq!(classify_json(400, QUOTA_429), Class::Fatal);
        assert_eq!(classify_json(503, TOKENS_429), Class::Overloaded);
    }

    #[test]
    fn labels_and_retryability() {
        let cases = [
            (
                Class::RateLimited(Some(Resource::Requests)),
                "requests",
                true,
            ),
            (Class::RateLimited(Some(Resource::Tokens)), "tokens", true),
            (Class::RateLimited(None), "other", true),
            (Class::SlowDown, "slow_down", true),
            (Class::TooLarge, "too_large", false),
            (Class::Quota, "quota", false),
            (Class::Overloaded, "other", true),
            (Class::ServerError, "other", true),
            (Class::Fatal, "other", false),
        ];
        for (class, label, retryable) in cases {
            assert_eq!(class.label(), label, "{class:?}");
            assert_eq!(class.is_retryable(), retryable, "{class:?}");
        }
        let sources = [
            HintSource::RetryAfterMs,
            HintSource::RetryAfter,
            HintSource::Message,
            HintSource::Reset,
            HintSource::Backoff,
        ];
        let labels: Vec<&str> = sources.iter().map(|s| s.label()).collect();
        assert_eq!(
            labels,
            [
                "retry_after_ms",
                "retry_after",
                "message",
                "reset",
                "backoff"
            ]
        );
    }

    fn header_map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    const TOKENS: Class = Class::RateLimited(Some(Resource::Tokens));
    const REQUESTS: Class = Class::RateLimited(Some(Resource::Requests));
    const UNKNOWN: Class = Class::RateLimited(None);

    fn hint(
        class: Class,
        headers: &[(&'static str, &'static str)],
        body: Option<&ErrorBody>,
    ) -> Option<(Duration, HintSource)> {
        let headers = header_map(headers);
        let limits = RateLimitHeaders::parse(&headers);
        wait_hint(class, &headers, &limits, body, now())
    }

    #[test]
    fn hints_longer_than_any_window_are_skipped_and_counted() {
        let implausible = |headers: &[(&'static str, &'static str)]| {
            let headers = header_map(headers);
            let limits = RateLimitHeaders::parse(&headers);
            implausible_hints(REQUESTS, &headers, &limits, None, now())
        };
        // 9.5 years in seconds: skipped for the next usable hint.
        let headers = [
            ("retry-after", "300000000"),
            ("x-ratelimit-reset-requests", "2s"),
        ];
        assert_eq!(
            hint(REQUESTS, &headers, None),
            Some((ms(2000), HintSource::Reset))
        );
        assert_eq!(implausible(&headers), 1);
        let headers = [("retry-after-ms", "1e11"), ("retry-after", "99999999")];
        assert_eq!(hint(REQUESTS, &headers, None), None);
        assert_eq!(implausible(&headers), 2);
        // A daily bucket's real reset, a few minutes past a day, is still honoured.
        let headers = [("x-ratelimit-reset-requests", "24h6m34s")];
        assert_eq!(
            hint(REQUESTS, &headers, None),
            Some((
                Duration::from_secs(24 * 3600 + 6 * 60 + 34),
                HintSource::Reset
            ))
        );
        assert_eq!(implausible(&headers), 0);
        assert_eq!(
            hint(REQUESTS, &[("x-ratelimit-reset-requests", "26h")], None),
            None
        );
    }

    #[test]
    fn hints_in_sdk_order() {
        let tokens = body(TOKENS_429);
        let all = [
            ("retry-after-ms", "1500"),
            ("retry-after", "2"),
            ("x-ratelimit-reset-tokens", "3s"),
        ];
        assert_eq!(
            hint(TOKENS, &all, Some(&tokens)),
            Some((ms(1500), HintSource::RetryAfterMs))
        );
        assert_eq!(
            hint(TOKENS, &all[1..], Some(&tokens)),
            Some((ms(2000), HintSource::RetryAfter))
        );
        assert_eq!(
            hint(TOKENS, &all[2..], Some(&tokens)),
            Some((ms(644), HintSource::Message))
        );
        assert_eq!(
            hint(TOKENS, &all[2..], None),
            Some((ms(3000), HintSource::Reset))
        );
        assert_eq!(
            hint(TOKENS, &[], Some(&tokens)),
            Some((ms(644), HintSource::Message))
        );
        assert_eq!(hint(TOKENS, &[], None), None);
    }

    #[test]
    fn malformed_hints_fall_through() {
        let headers = [
            ("retry-after-ms", "soon"),
            ("retry-after", "-5"),
            ("x-ratelimit-reset-requests", "20s"),
        ];
        let garbled = error(None, None, Some("Please try again in a while."));
        assert_eq!(
            hint(REQUESTS, &headers, Some(&garbled)),
            Some((ms(20_000), HintSource::Reset))
        );
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(
            hint(
                Class::Overloaded,
                &[("retry-after", "Wed, 21 Oct 2015 07:28:10 GMT")],
                None
            ),
            Some((ms(10_000), HintSource::RetryAfter))
        );
        assert_eq!(
            hint(
                Class::Overloaded,
                &[("retry-after", "Wed, 21 Oct 2015 07:00:00 GMT")],
                None
            ),
            Some((Duration::ZERO, HintSource::RetryAfter))
        );
        // An explicit zero is the upstream's word: retry now.
        assert_eq!(
            hint(UNKNOWN, &[("retry-after-ms", "0")], None),
            Some((Duration::ZERO, HintSource::RetryAfterMs))
        );
        // Azure sends both; the milliseconds are the finer one.
        let azure = body(AZURE_429);
        assert_eq!(
            hint(
                UNKNOWN,
                &[("retry-after-ms", "5400"), ("retry-after", "6")],
                Some(&azure)
            ),
            Some((ms(5400), HintSource::RetryAfterMs))
        );
        assert_eq!(
            hint(UNKNOWN, &[], Some(&azure)),
            Some((ms(6000), HintSource::Message))
        );
    }

    #[test]
    fn the_other_resources_zero_reset_is_not_retry_now() {
        let headers = [
            ("x-ratelimit-reset-requests", "0s"),
            ("x-ratelimit-reset-tokens", "1m26.4s"),
        ];
        assert_eq!(
            hint(TOKENS, &headers, None),
            Some((ms(86_400), HintSource::Reset))
        );
        // The limited resource's own zero reset is no hint either.
        assert_eq!(hint(REQUESTS, &headers, None), None);
        assert_eq!(
            hint(TOKENS, &[("x-ratelimit-reset-tokens", "0s")], None),
            None
        );
    }

    #[test]
    fn reset_falls_back_to_project_buckets() {
        let headers = [
            ("x-ratelimit-reset-requests", "0s"),
            ("x-ratelimit-reset-project-requests", "12s"),
            ("x-ratelimit-reset-tokens", "5s"),
            ("x-ratelimit-reset-project-tokens", "9s"),
        ];
        assert_eq!(
            hint(REQUESTS, &headers, None),
            Some((ms(12_000), HintSource::Reset))
        );
        // The organization's own reset comes first when it says anything.
        assert_eq!(
            hint(TOKENS, &headers, None),
            Some((ms(5_000), HintSource::Reset))
        );
        assert_eq!(
            hint(
                TOKENS,
                &[("x-ratelimit-reset-tokens_usage_based", "4s")],
                None
            ),
            Some((ms(4_000), HintSource::Reset))
        );
    }

    #[test]
    fn unknown_resource_takes_the_largest_reset() {
        let headers = [
            ("x-ratelimit-reset-requests", "120ms"),
            ("x-ratelimit-reset-tokens", "0s"),
            ("x-ratelimit-reset-project-tokens", "7s"),
        ];
        for class in [UNKNOWN, Class::SlowDown] {
            assert_eq!(
                hint(class, &headers, None),
                Some((ms(7_000), HintSource::Reset))
            );
        }
        // Resets say nothing about overload, server errors or hopeless requests.
        for class in [
            Class::Overloaded,
            Class::ServerError,
            Class::Quota,
            Class::TooLarge,
            Class::Fatal,
        ] {
            assert_eq!(hint(class, &headers, None), None, "{class:?}");
        }
    }

    #[test]
    fn reset_hint_reads_parsed_limits() {
        // The limits passed in are what counts, not a re-read of the headers.
        let mut limits = RateLimitHeaders::default();
        assert_eq!(
            wait_hint(TOKENS, &HeaderMap::new(), &limits, None, now()),
            None
        );
        limits = RateLimitHeaders::parse(&header_map(&[("x-ratelimit-reset-tokens", "2s")]));
        assert_eq!(
            limits.get(Family::Tokens),
            Some(Window {
                limit: None,
                remaining: None,
                reset: Some(ms(2000))
            })
        );
        assert_eq!(
            wait_hint(TOKENS, &HeaderMap::new(), &limits, None, now()),
            Some((ms(2000), HintSource::Reset))
        );
    }

    #[test]
    fn backoff_matches_the_sdks() {
        let base = ms(500);
        let cap = Duration::from_secs(8);
        let waits: Vec<Duration> = (0..6).map(|n| backoff(n, base, cap, 0.0)).collect();
        assert_eq!(
            waits,
            [ms(500), ms(1000), ms(2000), ms(4000), ms(8000), ms(8000)]
        );
        assert_eq!(backoff(0, base, cap, 1.0), ms(375));
        assert_eq!(backoff(4, base, cap, 1.0), ms(6000));
        assert_eq!(backoff(1, base, cap, 0.5), ms(875));
        // rand01 outside [0, 1] is clamped.
        assert_eq!(backoff(1, base, cap, -3.0), ms(1000));
        assert_eq!(backoff(1, base, cap, 7.0), ms(750));
        assert_eq!(backoff(1, base, cap, f64::NAN), ms(1000));
    }

    #[test]
    fn backoff_saturates() {
        let cap = Duration::from_secs(8);
        for attempt in [31, 32, 33, 64, 1000, u32::MAX] {
            assert_eq!(backoff(attempt, ms(500), cap, 0.0), cap, "{attempt}");
        }
        assert_eq!(
            backoff(u32::MAX, Duration::MAX, Duration::MAX, 0.0),
            Duration::MAX
        );
        assert_eq!(backoff(3, Duration::ZERO, cap, 0.5), Duration::ZERO);
        assert_eq!(backoff(3, ms(500), Duration::ZERO, 0.5), Duration::ZERO);
    }

    #[test]
    fn jitter_spreads_and_saturates() {
        assert_eq!(jitter(ms(644), ms(100), 0.0), ms(644));
        assert_eq!(jitter(ms(644), ms(100), 1.0), ms(744));
        assert_eq!(jitter(ms(644), ms(100), 0.25), ms(669));
        assert_eq!(jitter(ms(644), ms(100), 9.0), ms(744));
        assert_eq!(jitter(ms(644), ms(100), f64::NAN), ms(644));
        assert_eq!(jitter(Duration::MAX, Duration::MAX, 1.0), Duration::MAX);
    }

    fn withdraw_all(budget: &RetryBudget, now: Instant) -> usize {
        (0..100_000)
            .take_while(|_| budget.try_withdraw(now))
            .count()
    }

    #[test]
    fn budget_reserve_without_traffic() {
        let start = Instant::now();
        let budget = RetryBudget::new(0.2, 1, Duration::from_secs(10));
        assert_eq!(withdraw_all(&budget, start), 10);
        assert!(!budget.try_withdraw(start + ms(5_000)));
        let none = RetryBudget::new(0.2, 0, Duration::from_secs(10));
        assert!(!none.try_withdraw(start));
    }

    #[test]
    fn budget_share_of_traffic() {
        let start = Instant::now();
        let budget = RetryBudget::new(0.2, 1, Duration::from_secs(10));
        for i in 0..100 {
            budget.deposit(start + ms(i * 10));
        }
        // 20 % of 100 requests, plus the reserve of 1 per second over 10 s.
        assert_eq!(withdraw_all(&budget, start + ms(2_000)), 30);
        assert!(!budget.try_withdraw(start + ms(9_000)));
        // More traffic earns more retries.
        for _ in 0..10 {
            budget.deposit(start + ms(9_000));
        }
        assert_eq!(withdraw_all(&budget, start + ms(9_000)), 2);
    }

    #[test]
    fn budget_deposits_and_withdrawals_expire() {
        let start = Instant::now();
        let ttl = Duration::from_secs(10);
        let budget = RetryBudget::new(0.5, 0, ttl);
        for _ in 0..10 {
            budget.deposit(start);
        }
        assert_eq!(withdraw_all(&budget, start), 5);
        assert!(!budget.try_withdraw(start + ms(9_999)));
        // A ttl later both the deposits and the retries they paid for have left the window.
        assert!(!budget.try_withdraw(start + ttl));
        for _ in 0..4 {
            budget.deposit(start + ttl);
        }
        assert_eq!(withdraw_all(&budget, start + ttl), 2);
        // Long idle gaps clear everything, however long.
        assert!(!budget.try_withdraw(start + ttl * 1000));
    }

    #[test]
    fn budget_window_slides_by_slot() {
        let start = Instant::now();
        let ttl = Duration::from_secs(10);
        let budget = RetryBudget::new(1.0, 0, ttl);
        budget.deposit(start);
        budget.deposit(start + ms(5_000));
        // Both count just before the first expires, and then only the later one.
        assert_eq!(withdraw_all(&budget, start + ms(9_999)), 2);
        let budget = RetryBudget::new(1.0, 0, ttl);
        budget.deposit(start);
        budget.deposit(start + ms(5_000));
        assert_eq!(withdraw_all(&budget, start + ms(10_000)), 1);
        assert_eq!(withdraw_all(&budget, start + ms(15_000)), 0);
    }

    #[test]
    fn budget_counts_out_of_order_instants_now() {
        let start = Instant::now();
        let budget = RetryBudget::new(1.0, 0, Duration::from_secs(10));
        budget.deposit(start + ms(3_000));
        // An instant taken before the lock by a slower task is earlier than one already seen.
        budget.deposit(start);
        assert_eq!(withdraw_all(&budget, start + ms(12_000)), 2);
    }

    #[test]
    fn budget_parameters_are_clamped() {
        let start = Instant::now();
        let budget = RetryBudget::new(f64::NAN, 2, Duration::ZERO);
        budget.deposit(start);
        // ttl clamped to 1 s: a reserve of 2, and the NaN ratio earns nothing.
        assert_eq!(withdraw_all(&budget, start), 2);
        let budget = RetryBudget::new(-1.0, 0, Duration::from_secs(10));
        budget.deposit(start);
        assert!(!budget.try_withdraw(start));
        let budget = RetryBudget::new(f64::INFINITY, 0, Duration::MAX);
        budget.deposit(start);
        assert_eq!(withdraw_all(&budget, start), 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_in_paused_time() {
        let budget = RetryBudget::new(0.2, 0, Duration::from_secs(10));
        for _ in 0..50 {
            budget.deposit(Instant::now());
        }
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(withdraw_all(&budget, Instant::now()), 10);
        // The deposits expire at 10 s, the retries made at 9 s only at 19 s.
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..5 {
            budget.deposit(Instant::now());
        }
        assert_eq!(withdraw_all(&budget, Instant::now()), 0);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(withdraw_all(&budget, Instant::now()), 1);
    }

    #[test]
    fn budget_is_exact_under_contention() {
        let start = Instant::now();
        let budget = Arc::new(RetryBudget::new(0.2, 1, Duration::from_secs(10)));
        for _ in 0..1000 {
            budget.deposit(start);
        }
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let budget = Arc::clone(&budget);
                std::thread::spawn(move || (0..100).filter(|_| budget.try_withdraw(start)).count())
            })
            .collect();
        let granted: usize = threads.into_iter().map(|t| t.join().expect("thread")).sum();
        assert_eq!(granted, 210);
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(raw in any::<Vec<u8>>(), status in any::<u16>(), requested in any::<Option<u64>>(), limit in any::<Option<u64>>()) {
            let body = parse_error_body(&raw);
            let class = classify(status, body.as_ref(), requested, limit);
            let _ = class.label();
            let headers = HeaderMap::new();
            let _ = wait_hint(class, &headers, &RateLimitHeaders::default(), body.as_ref(), now());
        }

        #[test]
        fn json_shaped_bodies_never_panic(
            kind in proptest::option::of("[a-z_]{0,30}"),
            code in proptest::option::of("[a-z_0-9]{0,30}"),
            message in proptest::option::of(".{0,200}"),
            status in prop_oneof![Just(429u16), Just(503), Just(500), 400u16..600],
        ) {
            let json = serde_json::json!({"error": {"type": kind, "code": code, "message": message, "param": null}});
            let body = parse_error_body(json.to_string().as_bytes()).expect("an error object");
            prop_assert_eq!(&body.kind, &kind);
            prop_assert_eq!(&body.code, &code);
            let class = classify(status, Some(&body), None, None);
            if status != 429 {
                prop_assert!(!matches!(class, Class::RateLimited(_) | Class::SlowDown | Class::Quota | Class::TooLarge));
            }
            let _ = wait_hint(class, &HeaderMap::new(), &RateLimitHeaders::default(), Some(&body), now());
        }

        #[test]
        fn backoff_stays_within_bounds(attempt in any::<u32>(), base_ms in 0u64..100_000, cap_ms in 0u64..1_000_000, rand01 in any::<f64>()) {
            let base = ms(base_ms);
            let cap = ms(cap_ms);
            let wait = backoff(attempt, base, cap, rand01);
            prop_assert!(wait <= cap);
            let full = base.checked_mul(1u32.checked_shl(attempt).unwrap_or(u32::MAX)).map_or(cap, |d| d.min(cap));
            prop_assert!(wait >= full.mul_f64(0.75).saturating_sub(Duration::from_nanos(1)));
            let spread = jitter(wait, ms(250), rand01);
            prop_assert!(spread >= wait && spread <= wait + ms(250));
        }

        #[test]
        fn budget_never_grants_more_than_allowed(
            ratio in 0.0f64..2.0,
            min_per_sec in 0u32..5,
            ops in proptest::collection::vec((any::<bool>(), 0u64..30_000), 0..200),
        ) {
            let start = Instant::now();
            let ttl = Duration::from_secs(10);
            let budget = RetryBudget::new(ratio, min_per_sec, ttl);
            let mut ops = ops;
            ops.sort_by_key(|(_, at)| *at);
            let mut deposits = 0u64;
            let mut granted = 0u64;
            for (is_deposit, at) in ops {
                let now = start + ms(at);
                if is_deposit {
                    budget.deposit(now);
                    deposits += 1;
                } else if budget.try_withdraw(now) {
                    granted += 1;
                }
            }
            // The run spans at most 4 windows; a sliding window overlaps two of them, so each
            // deposit can pay for retries twice, and each window adds its reserve.
            let windows = 4;
            let bound = windows * u64::from(min_per_sec) * 10 + (2.0 * ratio * deposits as f64) as u64 + windows;
            prop_assert!(granted <= bound, "{granted} > {bound}");
        }
    }
}
