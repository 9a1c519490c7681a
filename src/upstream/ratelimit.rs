//! What an upstream says about its rate limits: the `x-ratelimit-*` response headers, the
//! `retry-after` family, and the figures inside a 429's message.
//!
//! Pure functions over text and headers: no I/O, and the current time is passed in where a
//! value depends on it. Every input may be missing or malformed (docs/upstream.md §1), so every parser
//! returns `None` rather than guessing, and none of them panics on any input. Header parsing
//! runs on every upstream response, so it looks up a fixed set of names and allocates nothing.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::resource::Resource;

/// The longest duration any parser here returns. Real hints are seconds to a day; anything
/// beyond this is garbage, and rejecting it keeps every later `Duration`/`Instant` sum far
/// from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

const MAX_NANOS: u128 = MAX_DURATION.as_nanos();

/// Fraction digits kept; further digits are below a nanosecond of even an hour and are ignored.
const MAX_FRACTION_DIGITS: u32 = 18;

const NANOS_PER_SEC: u128 = 1_000_000_000;
const NANOS_PER_MILLI: u128 = 1_000_000;

/// An unsigned decimal read from the front of some text: `12`, `1.5`, `.5` or `5.`.
struct Decimal {
    /// The integer part, saturated at `MAX_NANOS + 1`: anything larger is out of range
    /// whatever the unit.
    int: u128,
    frac: u128,
    /// `10^(fraction digits kept)`.
    scale: u128,
}

impl Decimal {
    /// Splits a decimal off the front of `s`. `None` without a single digit.
    fn split(s: &[u8]) -> Option<(Decimal, &[u8])> {
        let mut i = 0;
        let mut int: u128 = 0;
        while let Some(d) = s.get(i).filter(|b| b.is_ascii_digit()) {
            // Saturating, so a thousand digits only ever reads as "too large".
            int = int
                .saturating_mul(10)
                .saturating_add(u128::from(d - b'0'))
                .min(MAX_NANOS + 1);
            i += 1;
        }
        let mut digits = i;
        let (mut frac, mut scale) = (0, 1);
        if s.get(i) == Some(&b'.') {
            i += 1;
            let mut kept = 0;
            while let Some(d) = s.get(i).filter(|b| b.is_ascii_digit()) {
                if kept < MAX_FRACTION_DIGITS {
                    frac = frac * 10 + u128::from(d - b'0');
                    scale *= 10;
                    kept += 1;
                }
                i += 1;
                digits += 1;
            }
        }
        (digits > 0).then_some((Decimal { int, frac, scale }, &s[i..]))
    }

    /// The value times `unit_ns` in nanoseconds, truncated; `None` above [`MAX_NANOS`].
    fn nanos(&self, unit_ns: u128) -> Option<u128> {
        let whole = self.int.checked_mul(unit_ns)?;
        // frac < scale <= 10^18 and unit_ns <= 3.6e12, so the product fits easily in u128.
        let part = self.frac * unit_ns / self.scale;
        whole.checked_add(part).filter(|n| *n <= MAX_NANOS)
    }
}

fn from_nanos(nanos: u128) -> Duration {
    // Callers have capped nanos at MAX_NANOS, far below u64::MAX seconds.
    Duration::new(
        (nanos / NANOS_PER_SEC) as u64,
        (nanos % NANOS_PER_SEC) as u32,
    )
}

/// A Go duration unit, matched as the whole run of non-numeric bytes after a number.
fn unit_nanos(unit: &[u8]) -> Option<u128> {
    Some(match unit {
        b"ns" => 1,
        // "us", and "µs" with the micro sign U+00B5 or the Greek mu U+03BC (in UTF-8), as Go's
        // time.ParseDuration.
        b"us" | b"\xc2\xb5s" | b"\xce\xbcs" => 1_000,
        b"ms" => NANOS_PER_MILLI,
        b"s" => NANOS_PER_SEC,
        b"m" => 60 * NANOS_PER_SEC,
        b"h" => 3600 * NANOS_PER_SEC,
        _ => return None,
    })
}

/// A sum of `<decimal><unit>` terms (`1m26.4s`), or, with `bare_seconds`, a lone unitless
/// decimal read as seconds.
fn parse_duration(s: &str, bare_seconds: bool) -> Option<Duration> {
    let mut rest = s.trim().as_bytes();
    let (first, after) = Decimal::split(rest)?;
    if after.is_empty() {
        // Go itself accepts a unitless "0"; Azure sends bare seconds.
        return if bare_seconds || (first.int == 0 && first.frac == 0) {
            first.nanos(NANOS_PER_SEC).map(from_nanos)
        } else {
            None
        };
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let (number, after) = Decimal::split(rest)?;
        let unit_len = after
            .iter()
            .position(|b| b.is_ascii_digit() || *b == b'.')
            .unwrap_or(after.len());
        let unit = unit_nanos(&after[..unit_len])?;
        total = total
            .checked_add(number.nanos(unit)?)
            .filter(|n| *n <= MAX_NANOS)?;
        rest = &after[unit_len..];
    }
    Some(from_nanos(total))
}

/// Parses a Go duration as the `x-ratelimit-reset-*` headers carry it: one or more
/// `<decimal><unit>` terms with units `h`, `m`, `s`, `ms`, `us`/`µs`/`μs`, `ns` (`0s`,
/// `120ms`, `9.816s`, `1m26.4s`, `24h6m34s`), or a bare decimal number of seconds (Azure's
/// form; `0` included). Surrounding whitespace is ignored; precision is truncated to the
/// nanosecond.
///
/// `None` for anything else: empty text, a sign, an unknown or missing unit between terms,
/// `1.2.3s`, `NaN`, `inf`, or a total above [`MAX_DURATION`]. Never panics.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    parse_duration(s, true)
}

/// Parses `retry-after-ms`: milliseconds as a float (`644`, `644.5`, as Azure and the SDKs
/// read it). `None` unless finite, non-negative and at most [`MAX_DURATION`].
pub fn parse_retry_after_ms(s: &str) -> Option<Duration> {
    let ms: f64 = s.trim().parse().ok()?;
    if !(ms.is_finite() && ms >= 0.0 && ms <= MAX_DURATION.as_secs_f64() * 1000.0) {
        return None;
    }
    Duration::try_from_secs_f64(ms / 1000.0).ok()
}

/// Parses `retry-after` (RFC 9110 §10.2.3): non-negative seconds, integer or decimal, or an
/// HTTP date (IMF-fixdate, or the obsolete RFC 850 and asctime forms) measured from `now`.
/// A date already past gives [`Duration::ZERO`]. `None` for anything else or a wait above
/// [`MAX_DURATION`].
pub fn parse_retry_after(s: &str, now: SystemTime) -> Option<Duration> {
    let s = s.trim();
    if s.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
        let (seconds, rest) = Decimal::split(s.as_bytes())?;
        if !rest.is_empty() {
            return None;
        }
        return seconds.nanos(NANOS_PER_SEC).map(from_nanos);
    }
    let at = httpdate::parse_http_date(s).ok()?;
    let wait = at.duration_since(now).unwrap_or(Duration::ZERO);
    (wait <= MAX_DURATION).then_some(wait)
}

/// Finds `needle` (lowercase ASCII) in `haystack`, ignoring ASCII case, from byte `from` on.
fn find_ignore_case(haystack: &str, needle: &str, from: usize) -> Option<usize> {
    let (hay, needle) = (haystack.as_bytes(), needle.as_bytes());
    (from..=hay.len().checked_sub(needle.len())?)
        .find(|&i| hay[i..i + needle.len()].eq_ignore_ascii_case(needle))
}

/// A spelled-out unit after a bare number ("7 seconds"), in nanoseconds; ASCII case ignored.
fn unit_word_nanos(word: &str) -> Option<u128> {
    const WORDS: [(&str, u128); 15] = [
        ("ms", NANOS_PER_MILLI),
        ("millisecond", NANOS_PER_MILLI),
        ("milliseconds", NANOS_PER_MILLI),
        ("s", NANOS_PER_SEC),
        ("sec", NANOS_PER_SEC),
        ("secs", NANOS_PER_SEC),
        ("second", NANOS_PER_SEC),
        ("seconds", NANOS_PER_SEC),
        ("min", 60 * NANOS_PER_SEC),
        ("mins", 60 * NANOS_PER_SEC),
        ("minute", 60 * NANOS_PER_SEC),
        ("minutes", 60 * NANOS_PER_SEC),
        ("h", 3600 * NANOS_PER_SEC),
        ("hour", 3600 * NANOS_PER_SEC),
        ("hours", 3600 * NANOS_PER_SEC),
    ];
    let word = word.trim_end_matches(|c: char| c.is_ascii_punctuation());
    WORDS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(word))
        .map(|(_, nanos)| *nanos)
}

/// The wait a 429 message asks for: OpenAI's "Please try again in 644ms." /
/// "try again in 1m26.4s. Visit ...", or a spelled-out unit ("try again in 7 seconds",
/// "try again in 500 milliseconds"). Azure's "Please retry after 6 seconds." is read the same
/// way. The phrase is matched ignoring ASCII case; the duration ends at whitespace, and
/// sentence punctuation after it is dropped. A unitless number without a unit word is too
/// ambiguous and gives `None`. The first occurrence that parses wins.
pub fn try_again_in(message: &str) -> Option<Duration> {
    ["try again in ", "retry after "]
        .into_iter()
        .find_map(|phrase| after_phrase(message, phrase))
}

fn after_phrase(message: &str, phrase: &str) -> Option<Duration> {
    let mut from = 0;
    while let Some(at) = find_ignore_case(message, phrase, from) {
        from = at + phrase.len();
        let mut words = message[from..].split_whitespace();
        let Some(word) = words.next() else { break };
        // A duration ends in a unit letter or a digit, so trailing punctuation is the sentence's.
        let token = word.trim_end_matches(|c: char| c.is_ascii_punctuation());
        let found = match parse_duration(token, false) {
            Some(wait) => Some(wait),
            None => Decimal::split(token.as_bytes())
                .filter(|(_, rest)| rest.is_empty())
                .and_then(|(number, _)| number.nanos(unit_word_nanos(words.next()?)?))
                .map(from_nanos),
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

/// The figures of an OpenAI rate-limit message: "Limit 30000, Used 29937, Requested 385"
/// (a bucket that is momentarily short) or "Limit 30000, Requested 31538" (a request larger
/// than the whole bucket, which never fits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageFigures {
    pub limit: u64,
    pub used: Option<u64>,
    pub requested: u64,
}

/// The unsigned integer right after `label` (matched ignoring case, then optional `:` and
/// spaces), searching from byte `from`; thousands separators (`30,000`) are accepted. Returns
/// the value and the byte offset after it.
fn figure_after(text: &str, label: &str, mut from: usize) -> Option<(u64, usize)> {
    while let Some(at) = find_ignore_case(text, label, from) {
        from = at + label.len();
        let bytes = text.as_bytes();
        let mut i = from;
        while matches!(bytes.get(i), Some(b' ' | b':')) {
            i += 1;
        }
        let mut value: Option<u64> = None;
        while let Some(b) = bytes.get(i) {
            if b.is_ascii_digit() {
                let digit = u64::from(b - b'0');
                value = Some(value.unwrap_or(0).checked_mul(10)?.checked_add(digit)?);
            } else if *b == b','
                && value.is_some()
                && bytes
                    .get(i + 1..i + 4)
                    .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
                && !bytes.get(i + 4).is_some_and(u8::is_ascii_digit)
            {
                // A thousands separator, as opposed to the comma that ends "Limit 30000,".
            } else {
                break;
            }
            i += 1;
        }
        if let Some(value) = value {
            return Some((value, i));
        }
    }
    None
}

/// Reads "Limit N[, Used N], Requested N" out of a rate-limit message. `None` unless both a
/// limit and a requested figure (after the limit) are present. These are numbers only; the
/// prose around them is never interpreted.
pub fn message_figures(message: &str) -> Option<MessageFigures> {
    let (limit, after_limit) = figure_after(message, "limit", 0)?;
    let (requested, _) = figure_after(message, "requested", after_limit)?;
    let used = figure_after(message, "used", after_limit).map(|(used, _)| used);
    Some(MessageFigures {
        limit,
        used,
        requested,
    })
}

/// How widely an upstream bucket applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The organization's bucket (`x-ratelimit-*-requests`, `-tokens`).
    Organization,
    /// A per-project bucket, possibly much tighter than the organization's.
    Project,
    /// The `*_usage_based` buckets.
    UsageBased,
}

impl Scope {
    /// In [`Family::ALL`]'s order: the organization's, the project's, the usage-based.
    pub const ALL: [Scope; 3] = [Scope::Organization, Scope::Project, Scope::UsageBased];
}

/// A family of `x-ratelimit-{limit,remaining,reset}-*` headers: one bucket upstream, metering
/// one [`Resource`] over one [`Scope`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Requests,
    Tokens,
    ProjectRequests,
    ProjectTokens,
    RequestsUsageBased,
    TokensUsageBased,
}

impl Family {
    pub const ALL: [Family; 6] = [
        Family::Requests,
        Family::Tokens,
        Family::ProjectRequests,
        Family::ProjectTokens,
        Family::RequestsUsageBased,
        Family::TokensUsageBased,
    ];

    /// The family metering `resource` over `scope`.
    pub fn of(resource: Resource, scope: Scope) -> Family {
        use Resource::{Requests, Tokens};
        match (scope, resource) {
            (Scope::Organization, Requests) => Self::Requests,
            (Scope::Organization, Tokens) => Self::Tokens,
            (Scope::Project, Requests) => Self::ProjectRequests,
            (Scope::Project, Tokens) => Self::ProjectTokens,
            (Scope::UsageBased, Requests) => Self::RequestsUsageBased,
            (Scope::UsageBased, Tokens) => Self::TokensUsageBased,
        }
    }

    /// What this family's bucket meters.
    pub fn resource(self) -> Resource {
        match self {
            Self::Requests | Self::ProjectRequests | Self::RequestsUsageBased => Resource::Requests,
            Self::Tokens | Self::ProjectTokens | Self::TokensUsageBased => Resource::Tokens,
        }
    }

    pub fn scope(self) -> Scope {
        match self {
            Self::Requests | Self::Tokens => Scope::Organization,
            Self::ProjectRequests | Self::ProjectTokens => Scope::Project,
            Self::RequestsUsageBased | Self::TokensUsageBased => Scope::UsageBased,
        }
    }

    /// A Prometheus label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
            Self::ProjectRequests => "project_requests",
            Self::ProjectTokens => "project_tokens",
            Self::RequestsUsageBased => "requests_usage_based",
            Self::TokensUsageBased => "tokens_usage_based",
        }
    }

    /// The position in [`Self::ALL`] and in `HEADER_NAMES`: the declaration order.
    fn index(self) -> usize {
        self as usize
    }

    /// The `limit`, `remaining` and `reset` header names of this family.
    pub fn header_names(self) -> &'static [HeaderName; 3] {
        &HEADER_NAMES[self.index()]
    }
}

static HEADER_NAMES: [[HeaderName; 3]; 6] = [
    [
        HeaderName::from_static("x-ratelimit-limit-requests"),
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
    ],
    [
        HeaderName::from_static("x-ratelimit-limit-tokens"),
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
    ],
    [
        HeaderName::from_static("x-ratelimit-limit-project-requests"),
        HeaderName::from_static("x-ratelimit-remaining-project-requests"),
        HeaderName::from_static("x-ratelimit-reset-project-requests"),
    ],
    [
        HeaderName::from_static("x-ratelimit-limit-project-tokens"),
        HeaderName::from_static("x-ratelimit-remaining-project-tokens"),
        HeaderName::from_static("x-ratelimit-reset-project-tokens"),
    ],
    [
        HeaderName::from_static("x-ratelimit-limit-requests_usage_based"),
        HeaderName::from_static("x-ratelimit-remaining-requests_usage_based"),
        HeaderName::from_static("x-ratelimit-reset-requests_usage_based"),
    ],
    [
        HeaderName::from_static("x-ratelimit-limit-tokens_usage_based"),
        HeaderName::from_static("x-ratelimit-remaining-tokens_usage_based"),
        HeaderName::from_static("x-ratelimit-reset-tokens_usage_based"),
    ],
];

/// Why an upstream answered 429, as metrics, logs and the status view name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A bucket of this resource is empty.
    Limited(Resource),
    /// Traffic ramped up too fast.
    SlowDown,
    /// Out of credit or over a spend limit.
    Quota,
    /// The request is larger than the whole bucket.
    TooLarge,
    /// Anything else, a rate limit that does not say which bucket included.
    Other,
}

impl Reason {
    /// A Prometheus label value: `requests`, `tokens`, `slow_down`, `quota`, `too_large` or
    /// `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Limited(resource) => resource.label(),
            Self::SlowDown => "slow_down",
            Self::Quota => "quota",
            Self::TooLarge => "too_large",
            Self::Other => "other",
        }
    }
}

/// One bucket's state as a response reported it. Each field is `None` when its header was
/// absent or malformed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Window {
    /// Capacity per window. `Some(0)` is kept: it means no access, not "unknown".
    pub limit: Option<u64>,
    /// Left at admission of this request; a negative value (Azure has sent `-1`) reads as 0.
    pub remaining: Option<u64>,
    /// Time until the bucket is full again, from when the response was received.
    pub reset: Option<Duration>,
}

impl Window {
    fn is_empty(&self) -> bool {
        self.limit.is_none() && self.remaining.is_none() && self.reset.is_none()
    }
}

/// Every `x-ratelimit-*` family of one response, parsed once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateLimitHeaders {
    windows: [Window; 6],
    malformed: u32,
}

/// A header's value, parsed; a present but unparseable value counts as malformed.
fn read<T>(value: &HeaderValue, parse: fn(&str) -> Option<T>, malformed: &mut u32) -> Option<T> {
    let parsed = value.to_str().ok().map(str::trim).and_then(parse);
    if parsed.is_none() {
        *malformed = malformed.saturating_add(1);
    }
    parsed
}

/// Digits only: `u64::from_str` would also take a leading `+`.
fn parse_count(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_remaining(s: &str) -> Option<u64> {
    match s.strip_prefix('-') {
        Some(negative) => parse_count(negative).map(|_| 0),
        None => parse_count(s),
    }
}

impl RateLimitHeaders {
    /// Reads the 18 known `x-ratelimit-*` headers (the first value of each). A value that is
    /// present but unusable (not UTF-8, not an integer, not a duration) is left out of its
    /// window and counted in [`malformed`](Self::malformed).
    pub fn parse(headers: &HeaderMap) -> RateLimitHeaders {
        let mut out = RateLimitHeaders::default();
        // One pass over the response's headers, matching names rather than looking up each
        // of the 18 (a lookup hashes the name; most responses carry six of them).
        let mut seen = 0u32;
        for (name, value) in headers {
            if !name.as_str().starts_with("x-ratelimit-") {
                continue;
            }
            for family in Family::ALL {
                let Some(field) = family
                    .header_names()
                    .iter()
                    .position(|known| *known == name)
                else {
                    continue;
                };
                let bit = 1 << (family.index() * 3 + field);
                if seen & bit == 0 {
                    seen |= bit;
                    let window = &mut out.windows[family.index()];
                    let malformed = &mut out.malformed;
                    match field {
                        0 => window.limit = read(value, parse_count, malformed),
                        1 => window.remaining = read(value, parse_remaining, malformed),
                        _ => window.reset = read(value, parse_go_duration, malformed),
                    }
                }
                break;
            }
        }
        out
    }

    /// The window of one family; `None` when none of its three headers was present and valid.
    pub fn get(&self, family: Family) -> Option<Window> {
        let window = self.windows[family.index()];
        (!window.is_empty()).then_some(window)
    }

    /// True when no family had a single valid header.
    pub fn is_empty(&self) -> bool {
        self.windows.iter().all(Window::is_empty)
    }

    /// The families present, in [`Family::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (Family, Window)> + '_ {
        Family::ALL
            .into_iter()
            .filter_map(|family| Some((family, self.get(family)?)))
    }

    /// How many `x-ratelimit-*` values were present but could not be parsed.
    pub fn malformed(&self) -> u32 {
        self.malformed
    }
}

/// The bucket capacity a window's `reset` implies: `remaining + reset_secs * limit /
/// window_secs`.
///
/// The upstream's limiter (docs/upstream.md §1) is a bucket of capacity `limit` refilling at
/// `limit / window_secs` per second and reports `reset = (limit - remaining) * window_secs /
/// limit`, the time to refill what is missing. Solving for the capacity gives this value,
/// which equals `limit` (up to the reset's millisecond rounding) when the bucket enforced is
/// the one the headers name. A value far from `limit` says the bucket is a different one,
/// such as a quantized limit (60 000 RPM enforced as 1 000 per second), or another window.
///
/// `None` unless `limit` (non-zero), `remaining` and `reset` are all known and `window_secs`
/// is finite and positive.
pub fn implied_capacity(window: &Window, window_secs: f64) -> Option<f64> {
    let limit = window.limit.filter(|l| *l > 0)? as f64;
    let remaining = window.remaining? as f64;
    let reset = window.reset?.as_secs_f64();
    if !(window_secs.is_finite() && window_secs > 0.0) {
        return None;
    }
    Some(remaining + reset * limit / window_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn go_durations_from_the_protocol() {
        let cases: &[(&str, Duration)] = &[
            ("0s", Duration::ZERO),
            ("2ms", ms(2)),
            ("120ms", ms(120)),
            ("180ms", ms(180)),
            ("1s", ms(1000)),
            ("9.816s", ms(9816)),
            ("1m26.4s", ms(86_400)),
            ("6m0s", ms(360_000)),
            ("11m32.334s", ms(692_334)),
            ("2h2m24s", Duration::from_secs(2 * 3600 + 2 * 60 + 24)),
            ("24h6m34s", Duration::from_secs(24 * 3600 + 6 * 60 + 34)),
            ("0", Duration::ZERO),
        ];
        for (text, want) in cases {
            assert_eq!(parse_go_duration(text), Some(*want), "{text}");
        }
    }

    #[test]
    fn go_duration_units_and_forms() {
        let cases: &[(&str, Duration)] = &[
            ("1ns", Duration::from_nanos(1)),
            ("1500ns", Duration::from_nanos(1500)),
            ("3us", Duration::from_micros(3)),
            ("3\u{b5}s", Duration::from_micros(3)),
            ("3\u{3bc}s", Duration::from_micros(3)),
            ("1.5h", Duration::from_secs(5400)),
            ("1.5m", Duration::from_secs(90)),
            (".5s", ms(500)),
            ("5.s", ms(5000)),
            ("0.000000001s", Duration::from_nanos(1)),
            // Digits below a nanosecond are truncated, not rounded.
            ("0.0000000019s", Duration::from_nanos(1)),
            ("1h1h", Duration::from_secs(7200)),
            ("1s500ms", ms(1500)),
            ("000001s", ms(1000)),
            ("  2ms\t", ms(2)),
            // Azure: a bare number of seconds.
            ("7", Duration::from_secs(7)),
            ("0.5", ms(500)),
            ("86400", Duration::from_secs(86_400)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_go_duration(text), Some(*want), "{text}");
        }
    }

    #[test]
    fn go_duration_rejects_garbage() {
        for text in [
            "", " ", "s", "ms", "-1s", "-0s", "+1s", "-1", "1.2.3s", "1.2.3", "NaN", "nan", "inf",
            "infs", "1x", "1S", "1Ms", "1 s", "1s 2ms", "1s-2ms", "1d", "1w", "1sx", "1s.", ".s",
            ".", "1e3s", "1e3", "0x10s", "1,5s", "١s", "1µ", "1m2", "1ms2", "s1",
        ] {
            assert_eq!(parse_go_duration(text), None, "{text:?}");
        }
    }

    #[test]
    fn go_duration_rejects_overflow_without_panicking() {
        let max_secs = MAX_DURATION.as_secs();
        assert_eq!(
            parse_go_duration(&format!("{max_secs}s")),
            Some(MAX_DURATION)
        );
        assert_eq!(parse_go_duration(&format!("{}s", max_secs + 1)), None);
        assert_eq!(parse_go_duration(&format!("{max_secs}s1ns")), None);
        assert_eq!(parse_go_duration("99999999999999999999999999999999h"), None);
        assert_eq!(parse_go_duration(&"9".repeat(5000)), None);
        assert_eq!(parse_go_duration(&format!("{}ns", "9".repeat(400))), None);
        assert_eq!(parse_go_duration("1000000h"), None);
        // Many small terms that only overflow together.
        assert_eq!(parse_go_duration(&"87600h".repeat(2)), None);
        // Absurdly many fraction digits are fine.
        assert_eq!(
            parse_go_duration(&format!("1.{}s", "0".repeat(1000))),
            Some(ms(1000))
        );
    }

    #[test]
    fn retry_after_ms() {
        assert_eq!(parse_retry_after_ms("644"), Some(ms(644)));
        assert_eq!(parse_retry_after_ms(" 20000 "), Some(ms(20_000)));
        assert_eq!(parse_retry_after_ms("0"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after_ms("-0"), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after_ms("1.5"),
            Some(Duration::from_micros(1500))
        );
        for text in [
            "", "-1", "NaN", "inf", "-inf", "1e300", "12ms", "abc", "1,5",
        ] {
            assert_eq!(parse_retry_after_ms(text), None, "{text:?}");
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // 21 Oct 2015 07:28:00 GMT
        assert_eq!(parse_retry_after("20", now), Some(Duration::from_secs(20)));
        assert_eq!(parse_retry_after("0", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("1.5", now), Some(ms(1500)));
        assert_eq!(parse_retry_after(" 6 ", now), Some(Duration::from_secs(6)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        // RFC 850 and asctime, the obsolete forms a recipient must still accept.
        assert_eq!(
            parse_retry_after("Wednesday, 21-Oct-15 07:29:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Wed Oct 21 07:28:05 2015", now),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        for text in [
            "",
            "-1",
            "-0",
            "+5",
            "1e3",
            "NaN",
            "inf",
            "1.2.3",
            "5s",
            "soon",
            "Wed, 99 Oct 2015",
            "Wed, 21 Oct 9999 07:28:30 GMT",
        ] {
            assert_eq!(parse_retry_after(text, now), None, "{text:?}");
        }
    }

    #[test]
    fn try_again_in_openai_messages() {
        let tokens = "Rate limit reached for gpt-4o in organization org-X on tokens per min (TPM): Limit 30000, Used 29937, Requested 385. Please try again in 644ms. Visit https://platform.openai.com/account/rate-limits to learn more.";
        assert_eq!(try_again_in(tokens), Some(ms(644)));
        let requests = "Rate limit reached for gpt-4o-mini in organization org-X on requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 20s. Visit https://platform.openai.com/account/rate-limits to learn more.";
        assert_eq!(try_again_in(requests), Some(Duration::from_secs(20)));
        assert_eq!(
            try_again_in("Please try again in 1m26.4s. Visit ..."),
            Some(ms(86_400))
        );
        assert_eq!(try_again_in("try again in 20s"), Some(ms(20_000)));
        assert_eq!(try_again_in("TRY AGAIN IN 2ms."), Some(ms(2)));
        assert_eq!(
            try_again_in("Please try again in 11m32.334s."),
            Some(ms(692_334))
        );
        assert_eq!(
            try_again_in("(try again in 6m0s), thanks"),
            Some(Duration::from_secs(360))
        );
        assert_eq!(try_again_in("(try again in 20s)."), Some(ms(20_000)));
        assert_eq!(try_again_in("try again in 9.816s..."), Some(ms(9816)));
    }

    #[test]
    fn try_again_in_spelled_out_units() {
        assert_eq!(
            try_again_in("Please try again in 7 seconds."),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            try_again_in("try again in 1 second"),
            Some(Duration::from_secs(1))
        );
        assert_eq!(try_again_in("try again in 500 milliseconds"), Some(ms(500)));
        assert_eq!(
            try_again_in("try again in 1.5 Minutes!"),
            Some(Duration::from_secs(90))
        );
        // Azure's wording.
        let azure = "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-02-01 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 6 seconds. Go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit.";
        assert_eq!(try_again_in(azure), Some(Duration::from_secs(6)));
    }

    #[test]
    fn try_again_in_without_a_usable_duration() {
        for text in [
            "",
            "You exceeded your current quota, please check your plan and billing details.",
            "try again in",
            "try again in ",
            "try again in a moment",
            "try again in 7",
            "try again in 7 fortnights",
            "try again in -5s",
            "try again in 5x",
            "try again later. try again in",
            "tryagain in 5s",
        ] {
            assert_eq!(try_again_in(text), None, "{text:?}");
        }
        // A later occurrence that parses is used.
        assert_eq!(
            try_again_in("try again in a bit; try again in 3s"),
            Some(ms(3000))
        );
        // Non-ASCII around the phrase is fine (case folding is ASCII only).
        assert_eq!(try_again_in("ÄÖ try again in 5s ÄÖ"), Some(ms(5000)));
        assert_eq!(
            try_again_in("try again in 5µs"),
            Some(Duration::from_micros(5))
        );
    }

    #[test]
    fn figures_from_messages() {
        let tokens = "Rate limit reached for gpt-4o in organization org-X on tokens per min (TPM): Limit 30000, Used 29937, Requested 385. Please try again in 644ms. Visit https://platform.openai.com/account/rate-limits to learn more.";
        assert_eq!(
            message_figures(tokens),
            Some(MessageFigures {
                limit: 30000,
                used: Some(29937),
                requested: 385
            })
        );
        let too_large = "Request too large for gpt-4o in organization org-X on tokens per min (TPM): Limit 30000, Requested 31538. The input or output tokens must be reduced in order to run successfully. Visit https://platform.openai.com/account/rate-limits to learn more.";
        assert_eq!(
            message_figures(too_large),
            Some(MessageFigures {
                limit: 30000,
                used: None,
                requested: 31538
            })
        );
        assert_eq!(
            message_figures("limit: 1,000,000, used: 999,999, requested: 2"),
            Some(MessageFigures {
                limit: 1_000_000,
                used: Some(999_999),
                requested: 2
            })
        );
    }

    #[test]
    fn figures_absent_or_partial() {
        for text in [
            "",
            "You exceeded your current quota, please check your plan and billing details.",
            "Limit 30000",
            "Requested 5, Limit 30000",
            "Limit abc, Requested 5",
            "Limit 99999999999999999999999, Requested 5",
            "Rate limit reached. Please try again in 1s.",
        ] {
            assert_eq!(message_figures(text), None, "{text:?}");
        }
    }

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_bytes(value).expect("value"),
            );
        }
        map
    }

    #[test]
    fn resource_labels_and_names() {
        let labels: Vec<&str> = Family::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(
            labels,
            [
                "requests",
                "tokens",
                "project_requests",
                "project_tokens",
                "requests_usage_based",
                "tokens_usage_based"
            ]
        );
        for resource in Family::ALL {
            let [limit, remaining, reset] = resource.header_names();
            let suffix = resource.label().replacen("project_", "project-", 1);
            assert_eq!(limit.as_str(), format!("x-ratelimit-limit-{suffix}"));
            assert_eq!(
                remaining.as_str(),
                format!("x-ratelimit-remaining-{suffix}")
            );
            assert_eq!(reset.as_str(), format!("x-ratelimit-reset-{suffix}"));
        }
    }

    #[test]
    fn a_family_is_one_resource_over_one_scope() {
        for family in Family::ALL {
            assert_eq!(Family::of(family.resource(), family.scope()), family);
        }
        assert_eq!(
            Family::of(Resource::Tokens, Scope::Project),
            Family::ProjectTokens
        );
    }

    #[test]
    fn openai_headers() {
        let map = headers(&[
            ("x-ratelimit-limit-requests", b"500"),
            ("x-ratelimit-remaining-requests", b"499"),
            ("x-ratelimit-reset-requests", b"120ms"),
            ("x-ratelimit-limit-tokens", b"40000"),
            ("x-ratelimit-remaining-tokens", b"39880"),
            ("x-ratelimit-reset-tokens", b"180ms"),
            ("content-type", b"application/json"),
        ]);
        let parsed = RateLimitHeaders::parse(&map);
        assert_eq!(
            parsed.get(Family::Requests),
            Some(Window {
                limit: Some(500),
                remaining: Some(499),
                reset: Some(ms(120))
            })
        );
        assert_eq!(
            parsed.get(Family::Tokens),
            Some(Window {
                limit: Some(40000),
                remaining: Some(39880),
                reset: Some(ms(180))
            })
        );
        assert_eq!(parsed.get(Family::ProjectTokens), None);
        assert!(!parsed.is_empty());
        assert_eq!(parsed.malformed(), 0);
        let families: Vec<Family> = parsed.iter().map(|(r, _)| r).collect();
        assert_eq!(families, [Family::Requests, Family::Tokens]);
    }

    #[test]
    fn every_family_parses() {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for (i, resource) in Family::ALL.iter().enumerate() {
            let [limit, remaining, reset] = resource.header_names();
            pairs.push((limit.to_string(), format!("{}", 100 + i)));
            pairs.push((remaining.to_string(), format!("{i}")));
            pairs.push((reset.to_string(), format!("{i}s")));
        }
        let mut map = HeaderMap::new();
        for (name, value) in &pairs {
            map.insert(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        let parsed = RateLimitHeaders::parse(&map);
        assert_eq!(parsed.iter().count(), 6);
        for (i, resource) in Family::ALL.iter().enumerate() {
            let i = i as u64;
            assert_eq!(
                parsed.get(*resource),
                Some(Window {
                    limit: Some(100 + i),
                    remaining: Some(i),
                    reset: Some(Duration::from_secs(i))
                }),
                "{resource:?}"
            );
        }
    }

    #[test]
    fn a_repeated_header_counts_once_by_its_first_value() {
        let map = headers(&[
            ("x-ratelimit-remaining-requests", b"7"),
            ("x-ratelimit-remaining-requests", b"not a number"),
            ("x-ratelimit-limit-requests", b"oops"),
            ("x-ratelimit-limit-requests", b"60"),
            ("x-ratelimit-unknown", b"1"),
        ]);
        let parsed = RateLimitHeaders::parse(&map);
        let window = parsed.get(Family::Requests).expect("requests");
        assert_eq!(window.remaining, Some(7));
        // The first value is the one read, malformed or not; later ones are ignored.
        assert_eq!(window.limit, None);
        assert_eq!(parsed.malformed(), 1);
    }

    #[test]
    fn header_names_match_any_case() {
        // HeaderMap lowercases names on insertion, whatever case the upstream used.
        let map = headers(&[
            ("X-RateLimit-Limit-Tokens", b"1000"),
            ("X-RATELIMIT-REMAINING-TOKENS", b"10"),
        ]);
        let window = RateLimitHeaders::parse(&map)
            .get(Family::Tokens)
            .expect("tokens");
        assert_eq!(window.limit, Some(1000));
        assert_eq!(window.remaining, Some(10));
        assert_eq!(window.reset, None);
    }

    #[test]
    fn azure_quirks() {
        let map = headers(&[
            ("x-ratelimit-limit-requests", b"0"),
            ("x-ratelimit-remaining-requests", b"-1"),
            ("x-ratelimit-reset-requests", b"7"),
            ("x-ratelimit-remaining-tokens", b" 89000 "),
        ]);
        let parsed = RateLimitHeaders::parse(&map);
        assert_eq!(
            parsed.get(Family::Requests),
            Some(Window {
                limit: Some(0),
                remaining: Some(0),
                reset: Some(Duration::from_secs(7))
            })
        );
        assert_eq!(
            parsed.get(Family::Tokens),
            Some(Window {
                limit: None,
                remaining: Some(89000),
                reset: None
            })
        );
        assert_eq!(parsed.malformed(), 0);
    }

    #[test]
    fn malformed_values_are_counted_and_dropped() {
        let map = headers(&[
            ("x-ratelimit-limit-requests", b"lots"),
            ("x-ratelimit-remaining-requests", b"1.5"),
            ("x-ratelimit-reset-requests", b"soon"),
            ("x-ratelimit-limit-tokens", b"\xff\xfe"),
            ("x-ratelimit-remaining-tokens", b"-x"),
            ("x-ratelimit-reset-tokens", b"-1s"),
            ("x-ratelimit-limit-project-tokens", b""),
            (
                "x-ratelimit-remaining-project-tokens",
                b"99999999999999999999999",
            ),
            ("x-ratelimit-reset-project-tokens", b"1s"),
            ("x-ratelimit-limit-project-requests", b"+5"),
            ("x-ratelimit-remaining-project-requests", b"-+5"),
            ("x-ratelimit-reset-project-requests", b"1h 2m"),
        ]);
        let parsed = RateLimitHeaders::parse(&map);
        assert_eq!(parsed.malformed(), 11);
        assert_eq!(parsed.get(Family::ProjectRequests), None);
        assert_eq!(parsed.get(Family::Requests), None);
        assert_eq!(parsed.get(Family::Tokens), None);
        assert_eq!(
            parsed.get(Family::ProjectTokens),
            Some(Window {
                limit: None,
                remaining: None,
                reset: Some(ms(1000))
            })
        );
    }

    #[test]
    fn no_headers() {
        let parsed = RateLimitHeaders::parse(&headers(&[("x-ratelimit-other", b"1")]));
        assert!(parsed.is_empty());
        assert_eq!(parsed, RateLimitHeaders::default());
        assert_eq!(parsed.iter().count(), 0);
        assert_eq!(parsed.malformed(), 0);
    }

    #[test]
    fn first_value_wins() {
        let map = headers(&[
            ("x-ratelimit-limit-tokens", b"10"),
            ("x-ratelimit-limit-tokens", b"20"),
        ]);
        let window = RateLimitHeaders::parse(&map).get(Family::Tokens);
        assert_eq!(window.and_then(|w| w.limit), Some(10));
    }

    #[test]
    fn implied_capacity_matches_the_protocol_samples() {
        // 40000/39880 gives 180ms and 500/499 gives 120ms over a 60 s window.
        let tokens = Window {
            limit: Some(40_000),
            remaining: Some(39_880),
            reset: Some(ms(180)),
        };
        let capacity = implied_capacity(&tokens, 60.0).expect("complete window");
        assert!((capacity - 40_000.0).abs() < 1.0, "{capacity}");
        let requests = Window {
            limit: Some(500),
            remaining: Some(499),
            reset: Some(ms(120)),
        };
        let capacity = implied_capacity(&requests, 60.0).expect("complete window");
        assert!((capacity - 500.0).abs() < 0.01, "{capacity}");
        // A daily bucket read as a per-minute one implies a far larger capacity.
        let daily = Window {
            limit: Some(10_000),
            remaining: Some(9_990),
            reset: Some(ms(86_400)),
        };
        let per_minute = implied_capacity(&daily, 60.0).expect("complete window");
        let per_day = implied_capacity(&daily, 86_400.0).expect("complete window");
        assert!(per_minute > 20_000.0);
        assert!((per_day - 10_000.0).abs() < 0.01, "{per_day}");
    }

    #[test]
    fn implied_capacity_needs_a_complete_window() {
        let full = Window {
            limit: Some(100),
            remaining: Some(50),
            reset: Some(ms(30_000)),
        };
        assert_eq!(implied_capacity(&full, 60.0), Some(100.0));
        for window in [
            Window {
                limit: None,
                ..full
            },
            Window {
                limit: Some(0),
                ..full
            },
            Window {
                remaining: None,
                ..full
            },
            Window {
                reset: None,
                ..full
            },
        ] {
            assert_eq!(implied_capacity(&window, 60.0), None, "{window:?}");
        }
        for secs in [0.0, -60.0, f64::NAN, f64::INFINITY] {
            assert_eq!(implied_capacity(&full, secs), None, "{secs}");
        }
    }

    proptest! {
        #[test]
        fn parsers_never_panic(text in any::<String>()) {
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
            for parsed in [
                parse_go_duration(&text),
                parse_retry_after_ms(&text),
                parse_retry_after(&text, now),
                try_again_in(&text),
            ] {
                prop_assert!(parsed.is_none_or(|d| d <= MAX_DURATION));
            }
            let _ = message_figures(&text);
        }

        /// Text built from the characters durations are made of, so parsers see many near-misses.
        #[test]
        fn duration_alphabet_never_panics(
            text in "[0-9.hmsuµμn +-]{0,24}",
            prefix in "(try again in |Limit |, Used |, Requested |retry after )?",
        ) {
            let now = SystemTime::UNIX_EPOCH;
            for parsed in [
                parse_go_duration(&text),
                parse_retry_after(&text, now),
                try_again_in(&format!("{prefix}{text}")),
            ] {
                prop_assert!(parsed.is_none_or(|d| d <= MAX_DURATION));
            }
            let _ = message_figures(&format!("{prefix}{text}"));
        }

        /// Printing a duration the way Go does and parsing it back gives it to the nanosecond.
        #[test]
        fn go_format_round_trips(h in 0u64..100, m in 0u64..60, s in 0u64..60, nanos in 0u32..1_000_000_000) {
            let mut text = String::new();
            if h > 0 {
                text.push_str(&format!("{h}h"));
            }
            if h > 0 || m > 0 {
                text.push_str(&format!("{m}m"));
            }
            text.push_str(&format!("{s}.{nanos:09}s"));
            let want = Duration::new(h * 3600 + m * 60 + s, nanos);
            prop_assert_eq!(parse_go_duration(&text), Some(want));
        }

        #[test]
        fn header_values_never_panic(values in proptest::collection::vec(any::<Vec<u8>>(), 18)) {
            let mut map = HeaderMap::new();
            let names = Family::ALL.iter().flat_map(|r| r.header_names().iter());
            for (name, value) in names.zip(&values) {
                if let Ok(value) = HeaderValue::from_bytes(value) {
                    map.insert(name.clone(), value);
                }
            }
            let parsed = RateLimitHeaders::parse(&map);
            prop_assert!(parsed.malformed() as usize <= map.len());
            for (_, window) in parsed.iter() {
                let _ = implied_capacity(&window, 60.0);
            }
        }
    }
}
