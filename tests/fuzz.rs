//! Time-bounded fuzzing of the pure parsers every request and response goes through: the
//! rate-limit headers, retry hints, the SSE usage scanner, usage in whole bodies, the
//! stream-usage rewrite of request bodies, path normalization and token estimation.
//!
//! Each target first runs its corpus (`tests/fuzz-corpus/<target>/`, one input per file, real
//! OpenAI values), then generated inputs (mutations of the corpus, and inputs built from the
//! grammar the parser reads) until `SLUICE_FUZZ_SECS` seconds (default 3) have passed, and
//! prints how many inputs it ran (`--no-capture` shows it). Every target checks an invariant
//! beyond "does not panic". `make fuzz` runs each for a minute.
#![allow(clippy::unwrap_used)]
// The fuzzing deadline is the wall clock's: proptest runs outside any tokio runtime.
#![allow(clippy::disallowed_types)]

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt::Debug;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, OnceLock};
// The budget is wall-clock time, outside any runtime: nothing here pauses tokio's clock.
#[allow(clippy::disallowed_types)]
use std::time::Instant;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{Config, TestCaseResult, TestRunner};
use serde::de::{Error as _, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use sluice::endpoint::{normalize, Endpoint};
use sluice::estimate::{estimate, Estimate, EstimateError, OutputDefaults, Tokenizers};
use sluice::retry::{
    classify, implausible_hints, parse_error_body, wait_hint, Class, HintSource, PLAUSIBLE_WAIT,
};
use sluice::upstream::ratelimit::{
    implied_capacity, message_figures, parse_go_duration, parse_retry_after, parse_retry_after_ms,
    try_again_in, Family, RateLimitHeaders, Window, MAX_DURATION,
};
use sluice::upstream::usage::{request_stream_usage, usage_from_json, SseUsage, Usage};

// ---------------------------------------------------------------------------------------------
// The harness

/// How long each target runs, its corpus included.
fn budget() -> Duration {
    match std::env::var("SLUICE_FUZZ_SECS") {
        Err(_) => Duration::from_secs(3),
        Ok(secs) => secs
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .unwrap_or_else(|| panic!("SLUICE_FUZZ_SECS={secs:?} is not a number of seconds")),
    }
}

/// One corpus file.
struct Seed {
    name: String,
    bytes: Vec<u8>,
}

fn corpus(target: &str) -> Vec<Seed> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(target);
    let mut seeds: Vec<Seed> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let entry = entry.unwrap();
            Seed {
                name: entry.file_name().to_string_lossy().into_owned(),
                bytes: std::fs::read(entry.path()).unwrap(),
            }
        })
        .collect();
    seeds.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(!seeds.is_empty(), "{} holds no corpus", dir.display());
    seeds
}

/// Runs one target: every input `seed` makes of each corpus file, then inputs from the
/// strategy `generate` builds (given the corpus) until the budget is spent. A failing
/// generated input is shrunk by proptest and reported.
#[allow(clippy::disallowed_types)]
fn fuzz<T, S>(
    target: &str,
    seed: impl Fn(&Seed) -> Vec<T>,
    generate: impl FnOnce(Vec<Vec<u8>>) -> S,
    check: impl Fn(&T) -> TestCaseResult,
) where
    T: Debug,
    S: Strategy<Value = T>,
{
    let started = Instant::now();
    let deadline = started + budget();
    let corpus = corpus(target);
    let mut seeded = 0u64;
    for file in &corpus {
        for input in seed(file) {
            seeded += 1;
            match catch_unwind(AssertUnwindSafe(|| check(&input))) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("{target}: corpus file {}: {e}\ninput: {input:?}", file.name),
                Err(_) => panic!(
                    "{target}: corpus file {} panicked\ninput: {input:?}",
                    file.name
                ),
            }
        }
    }
    let strategy = generate(corpus.into_iter().map(|seed| seed.bytes).collect());
    // Small batches, so a target overruns its deadline by little. A runner runs its cases
    // once, so each batch has a runner of its own, seeded from one random generator.
    let config = Config {
        cases: 16,
        max_shrink_iters: 4096,
        failure_persistence: None,
        ..Config::default()
    };
    let mut seeds = TestRunner::new(config.clone());
    let generated = Cell::new(0u64);
    while Instant::now() < deadline {
        let mut runner = TestRunner::new_with_rng(config.clone(), seeds.new_rng());
        let result = runner.run(&strategy, |input| {
            generated.set(generated.get() + 1);
            check(&input)
        });
        if let Err(e) = result {
            panic!("{target}: {e}");
        }
    }
    println!(
        "fuzz {target}: {seeded} corpus inputs, {} generated inputs in {:.1?}",
        generated.get(),
        started.elapsed()
    );
}

/// An edit of a corpus entry.
#[derive(Clone, Debug)]
enum Edit {
    /// Overwrites one byte.
    Set(Index, u8),
    /// Inserts one of the target's grammar tokens.
    Token(Index, Index),
    /// Removes up to that many bytes.
    Remove(Index, usize),
    /// Copies a range of the input elsewhere in it.
    Repeat(Index, usize, Index),
    /// Inserts a range of another corpus entry.
    Splice(Index, Index, usize, Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        1 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Edit::Set(at, byte)),
        3 => (any::<Index>(), any::<Index>()).prop_map(|(at, token)| Edit::Token(at, token)),
        2 => (any::<Index>(), 1usize..64).prop_map(|(at, len)| Edit::Remove(at, len)),
        1 => (any::<Index>(), 1usize..64, any::<Index>())
            .prop_map(|(from, len, to)| Edit::Repeat(from, len, to)),
        1 => (any::<Index>(), any::<Index>(), 1usize..128, any::<Index>())
            .prop_map(|(entry, from, len, to)| Edit::Splice(entry, from, len, to)),
    ]
}

fn insert(bytes: &mut Vec<u8>, at: usize, piece: &[u8]) {
    bytes.splice(at..at, piece.iter().copied());
}

fn range(source: &[u8], from: &Index, len: usize) -> Vec<u8> {
    if source.is_empty() {
        return Vec::new();
    }
    let start = from.index(source.len());
    source[start..(start + len).min(source.len())].to_vec()
}

fn apply(bytes: &mut Vec<u8>, edit: &Edit, corpus: &[Vec<u8>], tokens: &[&[u8]]) {
    let len = bytes.len();
    match edit {
        Edit::Set(at, byte) if len > 0 => bytes[at.index(len)] = *byte,
        Edit::Set(..) => {}
        Edit::Token(at, token) => {
            insert(bytes, at.index(len + 1), tokens[token.index(tokens.len())])
        }
        Edit::Remove(at, n) => {
            let start = at.index(len + 1);
            bytes.drain(start..(start + n).min(len));
        }
        Edit::Repeat(from, n, to) => {
            let piece = range(bytes, from, *n);
            insert(bytes, to.index(len + 1), &piece);
        }
        Edit::Splice(entry, from, n, to) => {
            let piece = range(&corpus[entry.index(corpus.len())], from, *n);
            insert(bytes, to.index(len + 1), &piece);
        }
    }
}

/// A corpus entry with a few edits applied.
fn mutations(
    corpus: Vec<Vec<u8>>,
    tokens: &'static [&'static [u8]],
) -> impl Strategy<Value = Vec<u8>> {
    let corpus = Arc::new(corpus);
    (any::<Index>(), vec(edit(), 0..8)).prop_map(move |(entry, edits)| {
        let mut bytes = corpus[entry.index(corpus.len())].clone();
        for edit in &edits {
            apply(&mut bytes, edit, &corpus, tokens);
        }
        bytes
    })
}

/// The bytes of `text` up to the first difference with `other`, and after the last.
fn common_ends(text: &[u8], other: &[u8]) -> (usize, usize) {
    let prefix = text.iter().zip(other).take_while(|(a, b)| a == b).count();
    let room = text.len().min(other.len()) - prefix;
    let suffix = text
        .iter()
        .rev()
        .zip(other.iter().rev())
        .take(room)
        .take_while(|(a, b)| a == b)
        .count();
    (prefix, suffix)
}

// ---------------------------------------------------------------------------------------------
// JSON text, written out (not through serde_json::Value) so that it keeps the spellings a
// round trip would change: long floats, integers beyond 64 bits, escapes, whitespace.

#[rustfmt::skip]
const JSON_TOKENS: &[&[u8]] = &[
    b"{", b"}", b"[", b"]", b",", b":", b"\"", b"\\", b"\\u0000", b"\\ud83d", b"null", b"true",
    b"false", b"0", b"-1", b"1e400", b"18446744073709551616", b"-4.285522746181832e-197", b" ",
    b"\n", b"\xff", b"\"usage\":", b"\"usage\":[1,2,null,null]", b"{\"prompt_tokens\":1}",
    b"\"stream\":true", b"\"stream_options\":", b"\"include_usage\":true", b"\"model\":\"gpt-4o\"",
    b"\"messages\":[", b"{\"role\":\"user\",\"content\":\"hi\"}", b"\"content\":",
    b"{\"type\":\"image_url\",\"image_url\":{\"url\":\"x\",\"detail\":\"high\"}}",
    b"{\"type\":\"input_audio\"}", b"\"input\":[", b"\"tools\":[{\"type\":\"function\"}]",
];

fn ws() -> impl Strategy<Value = &'static str> {
    select(&["", "", "", " ", "\n  ", "\t", "\r\n"][..])
}

fn json_number() -> BoxedStrategy<String> {
    prop_oneof![
        "-?(0|[1-9][0-9]{0,24})(\\.[0-9]{1,24})?([eE][+-]?[0-9]{1,3})?",
        select(
            &[
                "-4.285522746181832e-197",
                "18446744073709551616",
                "-9223372036854775809",
                "1e400",
                "-0.0",
                "0.1",
                "1E+2",
                "5e-324",
                "1.7976931348623157e308",
            ][..]
        )
        .prop_map(str::to_owned),
    ]
    .boxed()
}

fn json_string() -> BoxedStrategy<String> {
    "\"([a-zA-Z0-9 _.:/-]|é|東|😀|\\\\[\"\\\\/bfnrt]|\\\\u00[0-7][0-9a-fA-F]|\\\\ud83d\\\\ude00){0,12}\""
        .boxed()
}

/// Keys a request or response object has, spelled as JSON text.
const KEYS: &[&str] = &[
    "\"model\"",
    "\"messages\"",
    "\"stream\"",
    "\"stream_options\"",
    "\"stream\\u005foptions\"",
    "\"include_usage\"",
    "\"usage\"",
    "\"n\"",
    "\"temperature\"",
    "\"seed\"",
    "\"logit_bias\"",
    "\"prompt_tokens\"",
    "\"x\"",
];

fn json_key() -> BoxedStrategy<String> {
    prop_oneof![
        3 => select(KEYS).prop_map(str::to_owned),
        1 => json_string(),
    ]
    .boxed()
}

fn object_text(members: &[(String, String)], spaces: &[&str]) -> String {
    let space = |i: usize| spaces.get(i % spaces.len().max(1)).copied().unwrap_or("");
    let inner: Vec<String> = members
        .iter()
        .enumerate()
        .map(|(i, (key, value))| {
            format!(
                "{}{key}{}:{}{value}{}",
                space(i),
                space(i + 1),
                space(i + 2),
                space(i + 3)
            )
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn json_text() -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        json_number(),
        json_string(),
        select(&["true", "false", "null"][..]).prop_map(str::to_owned),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            (vec(inner.clone(), 0..6), vec(ws(), 1..4)).prop_map(|(items, spaces)| {
                let items: Vec<String> = items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| format!("{}{item}", spaces[i % spaces.len()]))
                    .collect();
                format!("[{}]", items.join(","))
            }),
            (vec((json_key(), inner), 0..6), vec(ws(), 1..4))
                .prop_map(|(members, spaces)| object_text(&members, &spaces)),
        ]
    })
    .boxed()
}

/// An object's members in the order written, duplicates included, each value as its text.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// `(key, raw text)` of each member whose key is not `skip`.
fn others<'a>(members: &'a [(String, &'a RawValue)], skip: &str) -> Vec<(&'a str, &'a str)> {
    members
        .iter()
        .filter(|(key, _)| key != skip)
        .map(|(key, value)| (key.as_str(), value.get()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Target: rate-limit headers

#[rustfmt::skip]
const HEADER_TOKENS: &[&[u8]] = &[
    b"\n", b": ", b"x-ratelimit-", b"limit-", b"remaining-", b"reset-", b"requests", b"tokens",
    b"project-", b"_usage_based", b"0", b"9", b".", b"-", b"+", b" ", b"\t", b"h", b"m", b"s",
    b"ms", b"us", b"\xc2\xb5s", b"\xce\xbcs", b"ns", b"18446744073709551616", b"87840h", b"\x7f",
];

/// A response head: the header lines in order, as sent.
#[derive(Clone, Debug)]
struct Head(Vec<(Bytes, Bytes)>);

impl Head {
    /// `name: value` lines (one space after the colon is the separator's).
    fn from_text(text: &[u8]) -> Self {
        let lines = text.split(|b| *b == b'\n').filter_map(|line| {
            let colon = line.iter().position(|b| *b == b':')?;
            let value = &line[colon + 1..];
            let value = value.strip_prefix(b" ").unwrap_or(value);
            Some((
                Bytes::copy_from_slice(&line[..colon]),
                Bytes::copy_from_slice(value),
            ))
        });
        Self(lines.collect())
    }

    /// The lines a `HeaderMap` accepts.
    fn map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in &self.0 {
            if let (Ok(name), Ok(value)) =
                (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
            {
                map.append(name, value);
            }
        }
        map
    }
}

fn header_names() -> Vec<&'static str> {
    Family::ALL
        .iter()
        .flat_map(|resource| resource.header_names().iter().map(HeaderName::as_str))
        .collect()
}

fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[0-9]{1,21}".prop_map(String::into_bytes),
        "[ \t]?-?[+]?[0-9]{0,6}[ \t]?".prop_map(String::into_bytes),
        "([0-9]{0,3}(\\.[0-9]{0,12})?(h|m|s|ms|us|µs|μs|ns|)){1,4}".prop_map(String::into_bytes),
        "[0-9.hmsunµμ +-]{0,12}".prop_map(String::into_bytes),
        vec(any::<u8>(), 0..12),
    ]
}

fn heads(corpus: Vec<Vec<u8>>) -> impl Strategy<Value = Head> {
    let names: Vec<String> = header_names()
        .into_iter()
        .map(str::to_owned)
        .chain(
            [
                "retry-after",
                "X-RateLimit-Limit-Tokens",
                "x-ratelimit-limit",
                "content-type",
            ]
            .map(String::from),
        )
        .collect();
    let name = prop_oneof![
        6 => select(names),
        1 => "x-ratelimit-[a-z_-]{0,24}",
    ];
    let built = vec((name, header_value()), 0..24).prop_map(|pairs| {
        Head(
            pairs
                .into_iter()
                .map(|(name, value)| (Bytes::from(name), Bytes::from(value)))
                .collect(),
        )
    });
    prop_oneof![
        mutations(corpus, HEADER_TOKENS).prop_map(|text| Head::from_text(&text)),
        built,
    ]
}

/// A count as `u64::from_str` reads one, minus the `+` it would take.
fn count_oracle(text: &str) -> Option<u64> {
    if text.starts_with('+') {
        return None;
    }
    text.parse().ok()
}

fn check_head(head: &Head) -> TestCaseResult {
    let map = head.map();
    let parsed = RateLimitHeaders::parse(&map);
    let mut malformed = 0;
    for resource in Family::ALL {
        let [limit, remaining, reset] = resource.header_names();
        // The first value of each header counts; a present one that does not parse is malformed.
        let mut read = |name: &HeaderName, parse: &dyn Fn(&str) -> Option<u64>| {
            let value = map.get(name)?;
            let parsed = value.to_str().ok().map(str::trim).and_then(parse);
            malformed += u32::from(parsed.is_none());
            parsed
        };
        let want = Window {
            limit: read(limit, &count_oracle),
            remaining: read(remaining, &|s| match s.strip_prefix('-') {
                Some(negative) => count_oracle(negative).map(|_| 0),
                None => count_oracle(s),
            }),
            reset: None,
        };
        let reset = match map.get(reset) {
            None => None,
            Some(value) => {
                let parsed = value
                    .to_str()
                    .ok()
                    .map(str::trim)
                    .and_then(parse_go_duration);
                malformed += u32::from(parsed.is_none());
                parsed
            }
        };
        let want = Window { reset, ..want };
        let want = (want != Window::default()).then_some(want);
        prop_assert_eq!(parsed.get(resource), want, "{:?}", resource);
        if let Some(window) = want {
            prop_assert!(window.reset.is_none_or(|d| d <= MAX_DURATION));
            if let Some(capacity) = implied_capacity(&window, 60.0) {
                prop_assert!(capacity.is_finite());
                prop_assert!(capacity >= window.remaining.unwrap_or(0) as f64);
            }
        }
    }
    prop_assert_eq!(parsed.malformed(), malformed);
    prop_assert_eq!(parsed.is_empty(), parsed.iter().next().is_none());
    // Only the first value of each name counts, so the order of the names does not matter.
    let mut reversed = HeaderMap::new();
    let names: Vec<&HeaderName> = map.keys().collect();
    for name in names.into_iter().rev() {
        for value in map.get_all(name) {
            reversed.append(name.clone(), value.clone());
        }
    }
    prop_assert_eq!(RateLimitHeaders::parse(&reversed), parsed);
    Ok(())
}

#[test]
fn ratelimit_headers() {
    fuzz(
        "ratelimit_headers",
        |seed| vec![Head::from_text(&seed.bytes)],
        heads,
        check_head,
    );
}

// ---------------------------------------------------------------------------------------------
// Target: retry hints (`retry-after`, `retry-after-ms`, `x-ratelimit-reset-*`, "try again in")

#[rustfmt::skip]
const HINT_TOKENS: &[&[u8]] = &[
    b"try again in ", b"Try again in ", b"retry after ", b"Limit ", b", Used ", b", Requested ",
    b"ms", b"s", b"m", b"h", b"\xc2\xb5s", b".", b"0", b"9", b",000", b" seconds", b" milliseconds",
    b"GMT", b"Wed, 21 Oct 2015 07:28:00 GMT", b"-", b"\"message\":", b"\"error\":{",
    b"\"type\":\"tokens\"", b"\"code\":429", b" ", b"e9",
];

/// A term of a Go duration: `<int>[.<frac>]<unit>`.
#[derive(Clone, Debug)]
struct Term {
    int: Option<u64>,
    frac: Option<String>,
    unit: &'static str,
}

const UNITS: &[(&str, u128)] = &[
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ns", 1),
];

const UNIT_WORDS: &[(&str, u128)] = &[
    ("seconds", 1_000_000_000),
    ("second", 1_000_000_000),
    ("secs", 1_000_000_000),
    ("milliseconds", 1_000_000),
    ("ms", 1_000_000),
    ("minutes", 60_000_000_000),
    ("min", 60_000_000_000),
    ("hours", 3_600_000_000_000),
];

impl Term {
    fn text(&self) -> String {
        let mut text = self.int.map(|i| i.to_string()).unwrap_or_default();
        if let Some(frac) = &self.frac {
            text.push('.');
            text.push_str(frac);
        }
        text.push_str(self.unit);
        text
    }

    /// The exact value, truncated to the nanosecond, the way Go reads it (18 fraction
    /// digits kept). `None` without a digit.
    fn nanos(&self) -> Option<u128> {
        let frac = self.frac.as_deref().unwrap_or("");
        if self.int.is_none() && frac.is_empty() {
            return None;
        }
        let unit = UNITS
            .iter()
            .find(|(u, _)| *u == self.unit)
            .map_or(1_000_000_000, |(_, n)| *n);
        let kept = &frac[..frac.len().min(18)];
        let scale = 10u128.pow(kept.len() as u32);
        let frac: u128 = if kept.is_empty() {
            0
        } else {
            kept.parse().unwrap()
        };
        Some(u128::from(self.int.unwrap_or(0)) * unit + frac * unit / scale)
    }
}

#[derive(Clone, Debug)]
enum Hint {
    /// Any text, read by every parser.
    Text(String),
    /// A Go duration built from terms (a lone unitless term reads as seconds).
    Go(Vec<Term>),
    /// "retry after <number> <unit word>".
    Spelled { number: String, word: usize },
    /// An HTTP date `offset` seconds from `now` (whole seconds since the epoch).
    Date { now: u64, offset: i64 },
    /// `retry-after-ms` as a float's `Display`.
    Ms(f64),
    /// A failed response's headers and body.
    Response {
        status: u16,
        body: Bytes,
        retry_after_ms: Option<String>,
        retry_after: Option<String>,
        resets: Vec<(usize, String)>,
        now: u64,
    },
}

fn term(unit: BoxedStrategy<&'static str>) -> impl Strategy<Value = Term> {
    (
        option::weighted(0.9, 0u64..10_000_000),
        option::weighted(0.4, "[0-9]{0,22}"),
        unit,
    )
        // A term with neither digits nor a point would run its unit into the previous one's.
        .prop_map(|(int, frac, unit)| Term {
            int: int.or(frac.is_none().then_some(0)),
            frac,
            unit,
        })
}

fn hints(corpus: Vec<Vec<u8>>) -> impl Strategy<Value = Hint> {
    let units = || select(UNITS.iter().map(|(u, _)| *u).collect::<Vec<_>>()).boxed();
    let durations = prop_oneof![
        vec(term(units()), 1..5),
        term(Just("").boxed()).prop_map(|t| vec![t]),
    ];
    let value_text = prop_oneof![
        durations
            .clone()
            .prop_map(|terms| terms.iter().map(Term::text).collect::<String>()),
        "[0-9]{1,12}(\\.[0-9]{0,6})?",
        "[0-9.hmsu +-]{0,10}",
    ];
    let corpus = Arc::new(corpus);
    let bodies = mutations(corpus.to_vec(), HINT_TOKENS);
    prop_oneof![
        3 => mutations(corpus.to_vec(), HINT_TOKENS)
            .prop_map(|text| Hint::Text(String::from_utf8_lossy(&text).into_owned())),
        2 => durations.prop_map(Hint::Go),
        1 => ("[0-9]{1,6}(\\.[0-9]{1,3})?", 0..UNIT_WORDS.len())
            .prop_map(|(number, word)| Hint::Spelled { number, word }),
        1 => (0u64..4_000_000_000, -400_000_000i64..400_000_000)
            .prop_map(|(now, offset)| Hint::Date { now, offset }),
        1 => prop_oneof![
            0.0f64..1e12,
            any::<f64>(),
            (0u64..100_000_000).prop_map(|ms| ms as f64),
        ]
        .prop_map(Hint::Ms),
        2 => (
            select(&[429u16, 429, 429, 503, 500, 400][..]),
            bodies,
            option::of(value_text.clone()),
            option::of(prop_oneof![
                value_text.clone(),
                Just("Wed, 21 Oct 2015 07:28:00 GMT".to_owned()),
            ]),
            vec((0..Family::ALL.len() * 3, value_text), 0..6),
            1_400_000_000u64..1_500_000_000,
        )
            .prop_map(|(status, body, retry_after_ms, retry_after, resets, now)| Hint::Response {
                status,
                body: Bytes::from(body),
                retry_after_ms,
                retry_after,
                resets,
                now,
            }),
    ]
}

fn at_secs(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn check_text(text: &str) -> TestCaseResult {
    let now = at_secs(1_741_570_283);
    let padded = format!(" \t{text}\t ");
    for (parsed, again) in [
        (parse_go_duration(text), parse_go_duration(&padded)),
        (parse_retry_after_ms(text), parse_retry_after_ms(&padded)),
        (
            parse_retry_after(text, now),
            parse_retry_after(&padded, now),
        ),
        (try_again_in(text), try_again_in(text)),
    ] {
        prop_assert!(parsed.is_none_or(|d| d <= MAX_DURATION), "{:?}", parsed);
        prop_assert_eq!(parsed, again);
    }
    let lower = text.to_ascii_lowercase();
    if try_again_in(text).is_some() {
        prop_assert!(lower.contains("try again in ") || lower.contains("retry after "));
    }
    if let Some(figures) = message_figures(text) {
        let limit = lower.find("limit");
        prop_assert!(limit.is_some_and(|at| lower[at..].contains("requested")));
        let digits = text.replace(',', "");
        prop_assert!(digits.contains(&figures.limit.to_string()));
        prop_assert!(digits.contains(&figures.requested.to_string()));
        if let Some(used) = figures.used {
            prop_assert!(digits.contains(&used.to_string()));
        }
    }
    // An error body is an object with an `error` object, or it is not one.
    let is_error_object = serde_json::from_str::<serde_json::Map<String, Value>>(text)
        .is_ok_and(|top| top.get("error").is_some_and(Value::is_object));
    prop_assert_eq!(parse_error_body(text.as_bytes()).is_some(), is_error_object);
    // As the only hint of a 503, `retry-after` is honoured exactly when it is plausible.
    if let Ok(value) = HeaderValue::from_str(text) {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::RETRY_AFTER, value);
        let limits = RateLimitHeaders::parse(&headers);
        let want = parse_retry_after(text, now)
            .filter(|d| *d <= PLAUSIBLE_WAIT)
            .map(|d| (d, HintSource::RetryAfter));
        prop_assert_eq!(
            wait_hint(Class::Overloaded, &headers, &limits, None, now),
            want
        );
    }
    Ok(())
}

fn check_go(terms: &[Term]) -> TestCaseResult {
    let text: String = terms.iter().map(Term::text).collect();
    let bare = terms.len() == 1 && terms[0].unit.is_empty();
    let want = terms
        .iter()
        .try_fold(0u128, |total, term| Some(total + term.nanos()?))
        .filter(|nanos| *nanos <= MAX_DURATION.as_nanos())
        .map(|nanos| {
            Duration::new(
                (nanos / 1_000_000_000) as u64,
                (nanos % 1_000_000_000) as u32,
            )
        });
    prop_assert_eq!(parse_go_duration(&text), want, "{}", text);
    // In a message, a unitless number is ambiguous: only zero reads (as Go's "0" does).
    let in_message = if bare {
        want.filter(Duration::is_zero)
    } else {
        want
    };
    let message = format!("Rate limit reached for gpt-4o on tokens per min (TPM): Limit 30000, Used 29937, Requested 385. Please try again in {text}. Visit https://platform.openai.com/account/rate-limits to learn more.");
    prop_assert_eq!(try_again_in(&message), in_message, "{}", message);
    Ok(())
}

fn check_spelled(number: &str, word: usize) -> TestCaseResult {
    let (name, unit) = UNIT_WORDS[word];
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let scale = 10u128.pow(frac.len() as u32);
    let frac_value: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().unwrap()
    };
    let nanos = int.parse::<u128>().unwrap() * unit + frac_value * unit / scale;
    let want = (nanos <= MAX_DURATION.as_nanos()).then(|| {
        Duration::new(
            (nanos / 1_000_000_000) as u64,
            (nanos % 1_000_000_000) as u32,
        )
    });
    let message = format!("Requests to the ChatCompletions_Create Operation have exceeded call rate limit. Please retry after {number} {name}. Please go here: https://aka.ms/oai/quotaincrease");
    prop_assert_eq!(try_again_in(&message), want, "{}", message);
    Ok(())
}

fn check_response(
    status: u16,
    body: &[u8],
    retry_after_ms: Option<&str>,
    retry_after: Option<&str>,
    resets: &[(usize, String)],
    now: u64,
) -> TestCaseResult {
    let now = at_secs(now);
    let mut headers = HeaderMap::new();
    let mut put = |name: HeaderName, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.append(name, value);
        }
    };
    if let Some(value) = retry_after_ms {
        put(HeaderName::from_static("retry-after-ms"), value);
    }
    if let Some(value) = retry_after {
        put(http::header::RETRY_AFTER, value);
    }
    for (header, value) in resets {
        let resource = Family::ALL[header / 3];
        put(resource.header_names()[header % 3].clone(), value);
    }
    let limits = RateLimitHeaders::parse(&headers);
    let error = parse_error_body(body);
    let class = classify(status, error.as_ref(), None, None);
    let hint = wait_hint(class, &headers, &limits, error.as_ref(), now);
    let implausible = implausible_hints(class, &headers, &limits, error.as_ref(), now);
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    // The SDKs' order: retry-after-ms, retry-after, then the message.
    let sources = [
        (
            header("retry-after-ms").and_then(parse_retry_after_ms),
            HintSource::RetryAfterMs,
        ),
        (
            header("retry-after").and_then(|s| parse_retry_after(s, now)),
            HintSource::RetryAfter,
        ),
        (
            error
                .as_ref()
                .and_then(|e| e.message.as_deref())
                .and_then(try_again_in),
            HintSource::Message,
        ),
    ];
    let first = sources
        .iter()
        .find_map(|(wait, source)| wait.filter(|d| *d <= PLAUSIBLE_WAIT).map(|d| (d, *source)));
    let too_long = sources
        .iter()
        .filter(|(wait, _)| wait.is_some_and(|d| d > PLAUSIBLE_WAIT))
        .count() as u32;
    prop_assert!(implausible == too_long || implausible == too_long + 1);
    match (first, hint) {
        (Some(want), _) => prop_assert_eq!(hint, Some(want)),
        (None, None) => {}
        (None, Some((wait, source))) => {
            // Only a reset is left, and only for a rate limit.
            prop_assert_eq!(source, HintSource::Reset);
            prop_assert!(matches!(class, Class::RateLimited(_) | Class::SlowDown));
            prop_assert!(!wait.is_zero() && wait <= PLAUSIBLE_WAIT);
            prop_assert!(limits.iter().any(|(_, window)| window.reset == Some(wait)));
        }
    }
    Ok(())
}

fn check_hint(hint: &Hint) -> TestCaseResult {
    match hint {
        Hint::Text(text) => check_text(text),
        Hint::Go(terms) => check_go(terms),
        Hint::Spelled { number, word } => check_spelled(number, *word),
        Hint::Date { now, offset } => {
            let now_at = at_secs(*now);
            let at = at_secs(now.saturating_add_signed(*offset));
            let text = httpdate::fmt_http_date(at);
            let wait = at.duration_since(now_at).unwrap_or(Duration::ZERO);
            let want = (wait <= MAX_DURATION).then_some(wait);
            prop_assert_eq!(parse_retry_after(&text, now_at), want, "{}", text);
            Ok(())
        }
        Hint::Ms(ms) => {
            let text = ms.to_string();
            let want = (ms.is_finite() && *ms >= 0.0 && *ms <= MAX_DURATION.as_secs_f64() * 1000.0)
                .then(|| Duration::from_secs_f64(ms / 1000.0));
            prop_assert_eq!(parse_retry_after_ms(&text), want, "{}", text);
            Ok(())
        }
        Hint::Response {
            status,
            body,
            retry_after_ms,
            retry_after,
            resets,
            now,
        } => check_response(
            *status,
            body,
            retry_after_ms.as_deref(),
            retry_after.as_deref(),
            resets,
            *now,
        ),
    }
}

#[test]
fn retry_hints() {
    fuzz(
        "retry_hints",
        |seed| {
            let text = String::from_utf8_lossy(&seed.bytes).into_owned();
            vec![
                Hint::Response {
                    status: 429,
                    body: Bytes::from(seed.bytes.clone()),
                    retry_after_ms: None,
                    retry_after: Some(text.clone()),
                    resets: vec![(2, text.clone()), (5, "0s".to_owned())],
                    now: 1_445_412_480,
                },
                Hint::Text(text),
            ]
        },
        hints,
        check_hint,
    );
}

// ---------------------------------------------------------------------------------------------
// Target: the SSE usage scanner

#[rustfmt::skip]
const SSE_TOKENS: &[&[u8]] = &[
    b"\n", b"\r", b"\r\n", b"\n\n", b"\r\r", b"data: ", b"data:", b"event: ", b"event: error\n",
    b": ", b"[DONE]", b"\"usage\":", b"{\"prompt_tokens\":1,\"completion_tokens\":2}",
    b"\"choices\":[]", b"\"error\":", b"\"type\":\"error\"", b"response.completed",
    b"response.failed", b"\"response\":", b"\"input_tokens\":7", b"{", b"}", b"\"", b"null",
    b"event: response.completed\n", b"id: 1\n",
];

const SEPARATORS: [&str; 3] = ["\n\n", "\r\n\r\n", "\r\r"];

/// What a stream built event by event must give.
#[derive(Clone, Debug)]
struct Expect {
    usage: Option<Usage>,
    error: bool,
    /// What the client receives when the usage-only chunk is stripped.
    stripped: Bytes,
}

#[derive(Clone, Debug)]
struct Stream {
    bytes: Bytes,
    endpoint: Endpoint,
    strip: bool,
    /// Two ways to cut the stream into chunks: each cut at `cut % (len + 1)`.
    cuts: [Vec<usize>; 2],
    expect: Option<Expect>,
}

#[derive(Clone, Debug)]
enum ChatEvent {
    Delta(String),
    /// With `only`, the usage-only chunk (`"choices": []`); else vLLM's usage on a delta.
    Usage {
        prompt: u32,
        completion: u32,
        only: bool,
    },
    Error,
    Done,
    Comment,
}

const CHUNK_HEAD: &str = r#""id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8""#;

fn delta_choices(text: &str) -> String {
    format!(
        r#"[{{"index":0,"delta":{{"content":{}}},"logprobs":null,"finish_reason":null}}]"#,
        serde_json::to_string(text).unwrap()
    )
}

impl ChatEvent {
    fn text(&self) -> String {
        match self {
            Self::Delta(text) => format!(
                "data: {{{CHUNK_HEAD},\"choices\":{},\"usage\":null}}",
                delta_choices(text)
            ),
            Self::Usage { prompt, completion, only } => format!(
                "data: {{{CHUNK_HEAD},\"choices\":{},\"usage\":{{\"prompt_tokens\":{prompt},\"completion_tokens\":{completion},\"total_tokens\":{}}}}}",
                if *only { "[]".to_owned() } else { delta_choices("x") },
                u64::from(*prompt) + u64::from(*completion)
            ),
            Self::Error => r#"data: {"error":{"message":"The server had an error while processing your request. Sorry about that!","type":"server_error","param":null,"code":null}}"#.to_owned(),
            Self::Done => "data: [DONE]".to_owned(),
            Self::Comment => ": keep-alive".to_owned(),
        }
    }
}

/// Model text, with the quotes, braces, newlines and words that look like SSE or usage.
fn model_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,16}",
        select(
            &[
                "\"usage\": {\"prompt_tokens\": 1}",
                "\n\ndata: {\"usage\":{}}\n\n",
                "error",
                "response.completed",
                "\"choices\": []",
                "\r\r",
                "[DONE]"
            ][..]
        )
        .prop_map(str::to_owned),
    ]
}

fn chat_event() -> impl Strategy<Value = ChatEvent> {
    prop_oneof![
        6 => model_text().prop_map(ChatEvent::Delta),
        2 => (any::<u32>(), any::<u32>(), prop::bool::weighted(0.7))
            .prop_map(|(prompt, completion, only)| ChatEvent::Usage { prompt, completion, only }),
        1 => Just(ChatEvent::Error),
        1 => Just(ChatEvent::Done),
        1 => Just(ChatEvent::Comment),
    ]
}

/// Joins events, each with its separator (none after the last when `unterminated`), and an
/// optional `id:` line with its own line ending before it.
fn join_events<E>(
    events: &[(E, usize, Option<usize>)],
    unterminated: bool,
    text: impl Fn(&E) -> String,
    keep: impl Fn(&E) -> bool,
) -> (Vec<u8>, Vec<u8>) {
    let (mut all, mut kept) = (String::new(), String::new());
    for (i, (event, sep, id)) in events.iter().enumerate() {
        let mut piece = String::new();
        if let Some(ending) = id {
            piece.push_str("id: 7");
            piece.push_str(["\n", "\r\n", "\r"][*ending]);
        }
        piece.push_str(&text(event));
        if !(unterminated && i + 1 == events.len()) {
            piece.push_str(SEPARATORS[*sep]);
        }
        all.push_str(&piece);
        if keep(event) {
            kept.push_str(&piece);
        }
    }
    (all.into_bytes(), kept.into_bytes())
}

fn cuts() -> impl Strategy<Value = [Vec<usize>; 2]> {
    [vec(any::<usize>(), 0..16), vec(any::<usize>(), 0..16)]
}

fn chat_stream() -> impl Strategy<Value = Stream> {
    (
        vec(
            (
                chat_event(),
                0..SEPARATORS.len(),
                option::weighted(0.2, 0..3usize),
            ),
            0..12,
        ),
        prop::bool::weighted(0.2),
        select(&[Endpoint::ChatCompletions, Endpoint::Completions][..]),
        any::<bool>(),
        cuts(),
    )
        .prop_map(|(events, unterminated, endpoint, strip, cuts)| {
            let only = |e: &ChatEvent| matches!(e, ChatEvent::Usage { only: true, .. });
            let (bytes, kept) = join_events(&events, unterminated, ChatEvent::text, |e| !only(e));
            let usage = events.iter().rev().find_map(|(event, ..)| match event {
                ChatEvent::Usage {
                    prompt, completion, ..
                } => Some(Usage {
                    prompt_tokens: u64::from(*prompt),
                    completion_tokens: u64::from(*completion),
                }),
                _ => None,
            });
            let error = events
                .iter()
                .any(|(event, ..)| matches!(event, ChatEvent::Error));
            Stream {
                bytes: Bytes::from(bytes),
                endpoint,
                strip,
                cuts,
                expect: Some(Expect {
                    usage,
                    error,
                    stripped: Bytes::from(kept),
                }),
            }
        })
}

#[derive(Clone, Debug)]
enum ResponsesEvent {
    Created,
    Delta(String),
    /// 0: completed, 1: incomplete, 2: failed.
    Terminal {
        kind: usize,
        input: u32,
        output: u32,
    },
    Error,
}

const TERMINALS: [(&str, &str); 3] = [
    ("response.completed", "completed"),
    ("response.incomplete", "incomplete"),
    ("response.failed", "failed"),
];

fn response_object(status: &str, usage: Value) -> Value {
    json!({
        "id": "resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654", "object": "response",
        "created_at": 1741290958, "status": status, "error": null, "incomplete_details": null,
        "model": "gpt-4.1-2025-04-14", "output": [],
        // A tool with a parameter named "usage", echoed back before the real usage.
        "tools": [{"type": "function", "name": "report", "parameters": {
            "type": "object",
            "properties": {"usage": {"type": "object", "properties": {"input_tokens": {"type": "integer"}}}}
        }}],
        "usage": usage, "user": null, "metadata": {}
    })
}

impl ResponsesEvent {
    fn text(&self, named: bool) -> String {
        let (kind, data) = match self {
            Self::Created => (
                "response.created",
                json!({
                    "type": "response.created", "sequence_number": 0,
                    "response": response_object("in_progress", Value::Null)
                }),
            ),
            Self::Delta(text) => (
                "response.output_text.delta",
                json!({
                    "type": "response.output_text.delta", "sequence_number": 4,
                    "item_id": "msg_67c9fdcf37fc8190ba82116e33fb28c5", "output_index": 0,
                    "content_index": 0, "delta": text
                }),
            ),
            Self::Terminal {
                kind,
                input,
                output,
            } => {
                let (kind, status) = TERMINALS[*kind];
                let usage = json!({
                    "input_tokens": input, "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": u64::from(*input) + u64::from(*output)
                });
                let response = response_object(status, usage);
                (
                    kind,
                    json!({"type": kind, "sequence_number": 9, "response": response}),
                )
            }
            Self::Error => (
                "error",
                json!({
                    "type": "error", "code": "server_error", "param": null, "sequence_number": 3,
                    "message": "The server had an error processing your request."
                }),
            ),
        };
        let data = format!("data: {data}");
        if named {
            format!("event: {kind}\n{data}")
        } else {
            data
        }
    }
}

fn responses_stream() -> impl Strategy<Value = Stream> {
    let event = prop_oneof![
        1 => Just(ResponsesEvent::Created),
        4 => model_text().prop_map(ResponsesEvent::Delta),
        2 => (0..3usize, any::<u32>(), any::<u32>())
            .prop_map(|(kind, input, output)| ResponsesEvent::Terminal { kind, input, output }),
        1 => Just(ResponsesEvent::Error),
    ];
    (
        vec(
            (
                (event, any::<bool>()),
                0..SEPARATORS.len(),
                option::weighted(0.1, 0..3usize),
            ),
            0..10,
        ),
        prop::bool::weighted(0.2),
        any::<bool>(),
        cuts(),
    )
        .prop_map(|(events, unterminated, strip, cuts)| {
            let (bytes, _) =
                join_events(&events, unterminated, |(e, named)| e.text(*named), |_| true);
            let usage = events
                .iter()
                .rev()
                .find_map(|((event, _), ..)| match event {
                    ResponsesEvent::Terminal { input, output, .. } => Some(Usage {
                        prompt_tokens: u64::from(*input),
                        completion_tokens: u64::from(*output),
                    }),
                    _ => None,
                });
            let error = events.iter().any(|((event, _), ..)| {
                matches!(
                    event,
                    ResponsesEvent::Error | ResponsesEvent::Terminal { kind: 2, .. }
                )
            });
            let bytes = Bytes::from(bytes);
            Stream {
                bytes: bytes.clone(),
                endpoint: Endpoint::Responses,
                strip,
                cuts,
                expect: Some(Expect {
                    usage,
                    error,
                    stripped: bytes,
                }),
            }
        })
}

const STREAM_ENDPOINTS: [Endpoint; 4] = [
    Endpoint::ChatCompletions,
    Endpoint::Completions,
    Endpoint::Responses,
    Endpoint::Embeddings,
];

fn streams(corpus: Vec<Vec<u8>>) -> impl Strategy<Value = Stream> {
    let mutated = (
        mutations(corpus, SSE_TOKENS),
        select(&STREAM_ENDPOINTS[..]),
        any::<bool>(),
        cuts(),
    )
        .prop_map(|(bytes, endpoint, strip, cuts)| Stream {
            bytes: Bytes::from(bytes),
            endpoint,
            strip,
            cuts,
            expect: None,
        });
    prop_oneof![2 => mutated, 1 => chat_stream(), 1 => responses_stream()]
}

/// Feeds `bytes` cut at `cuts` and returns what the client receives, the usage and whether an
/// error was seen.
fn scan(
    endpoint: Endpoint,
    strip: bool,
    bytes: &[u8],
    cuts: &[usize],
) -> (Bytes, Option<Usage>, bool) {
    let mut sse = SseUsage::new(endpoint, strip);
    let mut out = Vec::new();
    let mut at = 0;
    for &cut in cuts {
        out.extend_from_slice(&sse.feed(Bytes::copy_from_slice(&bytes[at..cut])));
        at = cut;
    }
    out.extend_from_slice(&sse.feed(Bytes::copy_from_slice(&bytes[at..])));
    out.extend_from_slice(&sse.finish());
    (Bytes::from(out), sse.usage(), sse.saw_error())
}

fn is_subsequence(short: &[u8], long: &[u8]) -> bool {
    let mut rest = long.iter();
    short.iter().all(|b| rest.any(|c| c == b))
}

fn check_stream(stream: &Stream) -> TestCaseResult {
    let bytes = &stream.bytes[..];
    let whole = scan(stream.endpoint, stream.strip, bytes, &[]);
    for cuts in &stream.cuts {
        let mut cuts: Vec<usize> = cuts.iter().map(|cut| cut % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let split = scan(stream.endpoint, stream.strip, bytes, &cuts);
        prop_assert_eq!(&split, &whole, "cut at {:?}", cuts);
    }
    let (out, usage, error) = whole;
    let strips = stream.strip
        && matches!(
            stream.endpoint,
            Endpoint::ChatCompletions | Endpoint::Completions
        );
    if strips {
        prop_assert!(is_subsequence(&out, bytes));
        if out.len() < bytes.len() {
            prop_assert!(usage.is_some() || bytes.windows(7).any(|w| w == b"\"usage\""));
        }
    } else {
        prop_assert_eq!(&out[..], bytes);
    }
    if let Some(expect) = &stream.expect {
        prop_assert_eq!(usage, expect.usage);
        prop_assert_eq!(error, expect.error);
        if strips {
            prop_assert_eq!(&out, &expect.stripped);
        }
    }
    Ok(())
}

#[test]
fn sse_usage() {
    fuzz(
        "sse_usage",
        |seed| {
            let bytes = Bytes::from(seed.bytes.clone());
            let every = |step: usize| (0..bytes.len()).step_by(step).collect::<Vec<usize>>();
            let mut inputs = Vec::new();
            for endpoint in STREAM_ENDPOINTS {
                for strip in [false, true] {
                    inputs.push(Stream {
                        bytes: bytes.clone(),
                        endpoint,
                        strip,
                        cuts: [every(1), every(97)],
                        expect: None,
                    });
                }
            }
            inputs
        },
        streams,
        check_stream,
    );
}

// ---------------------------------------------------------------------------------------------
// Target: usage in whole response bodies

#[derive(Clone, Debug)]
struct Body {
    bytes: Bytes,
    endpoint: Endpoint,
}

const USAGE_KEYS: &[&str] = &[
    "\"prompt_tokens\"",
    "\"completion_tokens\"",
    "\"input_tokens\"",
    "\"output_tokens\"",
    "\"total_tokens\"",
    "\"prompt_tokens_details\"",
    "\"prompt\\u005ftokens\"",
];

fn usage_text() -> BoxedStrategy<String> {
    let count = prop_oneof![
        4 => (0u64..100_000).prop_map(|n| n.to_string()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => Just("null".to_owned()),
        1 => json_number(),
        1 => json_text(),
    ];
    let key = prop_oneof![4 => select(USAGE_KEYS).prop_map(str::to_owned), 1 => json_key()];
    prop_oneof![
        6 => (vec((key, count), 0..6), vec(ws(), 1..4))
            .prop_map(|(members, spaces)| object_text(&members, &spaces)),
        1 => Just("null".to_owned()),
        1 => json_text(),
    ]
    .boxed()
}

fn response_text() -> impl Strategy<Value = Vec<u8>> {
    (
        vec((json_key(), json_text()), 0..5),
        vec(usage_text(), 0..3),
        vec(any::<Index>(), 3),
        vec(ws(), 1..4),
    )
        .prop_map(|(mut members, usages, at, spaces)| {
            for (i, usage) in usages.into_iter().enumerate() {
                members.insert(
                    at[i].index(members.len() + 1),
                    ("\"usage\"".to_owned(), usage),
                );
            }
            object_text(&members, &spaces).into_bytes()
        })
}

const JSON_ENDPOINTS: [Endpoint; 5] = [
    Endpoint::ChatCompletions,
    Endpoint::Completions,
    Endpoint::Embeddings,
    Endpoint::Responses,
    Endpoint::Audio,
];

fn bodies(corpus: Vec<Vec<u8>>) -> impl Strategy<Value = Body> {
    (
        prop_oneof![mutations(corpus, JSON_TOKENS), response_text()],
        select(&JSON_ENDPOINTS[..]),
    )
        .prop_map(|(bytes, endpoint)| Body {
            bytes: Bytes::from(bytes),
            endpoint,
        })
}

/// The four counts of a `usage` object, read member by member. Only an object is a usage:
/// anything else fails, as does a count that is not a `u64` or `null`, or a repeated one.
struct OracleUsage([Option<u64>; 4]);

impl<'de> Deserialize<'de> for OracleUsage {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = OracleUsage;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a usage object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OracleUsage, A::Error> {
                const NAMES: [&str; 4] = [
                    "prompt_tokens",
                    "completion_tokens",
                    "input_tokens",
                    "output_tokens",
                ];
                let mut counts = [None; 4];
                let mut seen = [false; 4];
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match NAMES.iter().position(|name| *name == key) {
                        Some(i) => {
                            if std::mem::replace(&mut seen[i], true) {
                                return Err(A::Error::custom("repeated count"));
                            }
                            counts[i] = map.next_value::<Option<u64>>()?;
                        }
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(OracleUsage(counts))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// A body's top-level `usage` (`None` when absent or `null`); a repeated one fails.
struct OracleBody(Option<OracleUsage>);

impl<'de> Deserialize<'de> for OracleBody {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = OracleBody;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OracleBody, A::Error> {
                let mut usage = None;
                let mut seen = false;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "usage" {
                        if std::mem::replace(&mut seen, true) {
                            return Err(A::Error::custom("repeated usage"));
                        }
                        usage = map.next_value::<Option<OracleUsage>>()?;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(OracleBody(usage))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

fn usage_oracle(endpoint: Endpoint, body: &[u8]) -> Option<Usage> {
    let OracleBody(usage) = serde_json::from_slice(body).ok()?;
    let [prompt, completion, input, output] = usage?.0;
    let (prompt, completion) = if matches!(endpoint, Endpoint::Responses | Endpoint::Audio) {
        (input.or(prompt), output.or(completion))
    } else {
        (prompt.or(input), completion.or(output))
    };
    Some(Usage {
        prompt_tokens: prompt?,
        completion_tokens: completion.unwrap_or(0),
    })
}

fn check_body(body: &Body) -> TestCaseResult {
    let got = usage_from_json(body.endpoint, &body.bytes);
    prop_assert_eq!(got, usage_oracle(body.endpoint, &body.bytes));
    Ok(())
}

#[test]
fn usage_from_json_bodies() {
    fuzz(
        "usage_from_json",
        |seed| {
            JSON_ENDPOINTS
                .map(|endpoint| Body {
                    bytes: Bytes::from(seed.bytes.clone()),
                    endpoint,
                })
                .to_vec()
        },
        bodies,
        check_body,
    );
}

// ---------------------------------------------------------------------------------------------
// Target: the stream-usage rewrite of request bodies

fn options_text() -> impl Strategy<Value = String> {
    let member = prop_oneof![
        2 => (
            select(&["\"include_usage\"", "\"include\\u005fusage\""][..]).prop_map(str::to_owned),
            select(&["true", "false", "null", "1", "\"true\""][..]).prop_map(str::to_owned),
        ),
        1 => (json_key(), json_text()),
    ];
    prop_oneof![
        1 => select(
            &["null", "{}", "\"yes\"", "[true]", "1e400", "false", "{\"include_usage\":true}"][..]
        )
        .prop_map(str::to_owned),
        3 => (vec(member, 0..5), vec(ws(), 1..4))
            .prop_map(|(members, spaces)| object_text(&members, &spaces)),
        1 => json_text(),
    ]
}

fn request_text() -> impl Strategy<Value = Vec<u8>> {
    (
        vec((json_key(), json_text()), 0..6),
        prop_oneof![
            8 => Just("true"),
            1 => select(&["false", "null", "\"true\"", "1"][..]),
        ],
        option::weighted(0.8, options_text()),
        [any::<Index>(), any::<Index>()],
        vec(ws(), 1..4),
        ws(),
    )
        .prop_map(|(mut members, stream, options, at, spaces, outside)| {
            members.insert(
                at[0].index(members.len() + 1),
                ("\"stream\"".to_owned(), stream.to_owned()),
            );
            if let Some(options) = options {
                members.insert(
                    at[1].index(members.len() + 1),
                    ("\"stream_options\"".to_owned(), options),
                );
            }
            format!("{outside}{}{outside}", object_text(&members, &spaces)).into_bytes()
        })
}

fn requests(corpus: Vec<Vec<u8>>) -> impl Strategy<Value = Bytes> {
    prop_oneof![mutations(corpus, JSON_TOKENS), request_text()].prop_map(Bytes::from)
}

/// The members of a request that decide the rewrite, read member by member.
struct OracleRequest<'a> {
    stream: Option<bool>,
    options: Option<&'a RawValue>,
}

impl<'de> Deserialize<'de> for OracleRequest<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = OracleRequest<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<OracleRequest<'de>, A::Error> {
                let (mut stream, mut options) = (None, None);
                let (mut seen_stream, mut seen_options) = (false, false);
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "stream" {
                        if std::mem::replace(&mut seen_stream, true) {
                            return Err(A::Error::custom("repeated stream"));
                        }
                        stream = map.next_value()?;
                    } else if key == "stream_options" {
                        if std::mem::replace(&mut seen_options, true) {
                            return Err(A::Error::custom("repeated stream_options"));
                        }
                        options = Some(map.next_value()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(OracleRequest { stream, options })
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// Whether the body must be rewritten, and if so the old `stream_options` value.
fn rewrite_oracle(body: &[u8]) -> Option<Option<&RawValue>> {
    let first = body
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))?;
    if *first != b'{' {
        return None;
    }
    let request: OracleRequest<'_> = serde_json::from_slice(body).ok()?;
    if request.stream != Some(true) {
        return None;
    }
    if let Some(options) = request.options.filter(|o| o.get().starts_with('{')) {
        // An object with a key serde_json cannot read (a lone surrogate) is left alone.
        let Members(members) = serde_json::from_str(options.get()).ok()?;
        let last = members.iter().rev().find(|(key, _)| key == "include_usage");
        if last.is_some_and(|(_, value)| value.get() == "true") {
            return None;
        }
    }
    Some(request.options)
}

fn check_request(body: &Bytes) -> TestCaseResult {
    let out = request_stream_usage(body);
    let want = rewrite_oracle(body);
    prop_assert_eq!(
        out.is_some(),
        want.is_some(),
        "{:?}",
        out.as_deref().map(String::from_utf8_lossy)
    );
    let (Some(out), Some(old)) = (out, want) else {
        return Ok(());
    };
    // Only the old value's bytes differ (none when the member was spliced in).
    let old_len = old.map_or(0, |old| old.get().len());
    let (prefix, suffix) = common_ends(body, &out);
    prop_assert!(
        prefix + suffix >= body.len() - old_len,
        "{}",
        String::from_utf8_lossy(&out)
    );
    prop_assert!(serde_json::from_slice::<IgnoredAny>(&out).is_ok());
    prop_assert_eq!(request_stream_usage(&out), None, "not idempotent");
    let Ok(Members(before)) = serde_json::from_slice(body) else {
        // Text that is not UTF-8 inside some member: the bytes were checked above.
        prop_assert!(std::str::from_utf8(body).is_err());
        return Ok(());
    };
    let Members(after) = serde_json::from_slice(&out).expect("the output parses");
    prop_assert_eq!(
        others(&before, "stream_options"),
        others(&after, "stream_options")
    );
    let options: Vec<&RawValue> = after
        .iter()
        .filter(|(key, _)| key == "stream_options")
        .map(|(_, value)| *value)
        .collect();
    prop_assert_eq!(options.len(), 1);
    let Members(new) = serde_json::from_str(options[0].get()).expect("stream_options is an object");
    prop_assert_eq!(
        new.first().map(|(k, v)| (k.as_str(), v.get())),
        Some(("include_usage", "true"))
    );
    let kept = match old.map(|old| serde_json::from_str::<Members<'_>>(old.get())) {
        Some(Ok(Members(old))) => others(&old, "include_usage")
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        _ => Vec::new(),
    };
    let rest: Vec<(String, String)> = new[1..]
        .iter()
        .map(|(k, v)| (k.clone(), v.get().to_owned()))
        .collect();
    prop_assert_eq!(rest, kept);
    Ok(())
}

#[test]
fn request_stream_usage_bodies() {
    fuzz(
        "request_stream_usage",
        |seed| vec![Bytes::from(seed.bytes.clone())],
        requests,
        check_request,
    );
}

// ---------------------------------------------------------------------------------------------
// Target: path normalization

#[rustfmt::skip]
const PATH_TOKENS: &[&[u8]] = &[
    b"/", b"//", b"/.", b"/..", b"%", b"%2e", b"%2E", b"%2f", b"%5c", b"%00", b"%41", b"%7e",
    b"%7E", b"%20", b";", b"\\", b"v1", b"chat", b"completions", b"responses", b"embeddings",
    b"%63", b"%73", b"\xc3\xa9", b"%C3%A9", b"~", b"V1", b"%3b", b"%7f",
];

/// A way to spell a canonical path differently that must normalize back to it.
#[derive(Clone, Debug)]
enum Respell {
    /// A `/.` before the chosen `/` (or at the end); choices are taken modulo the count.
    Dot(usize),
    /// A second `/`.
    Empty(usize),
    /// `/<name>/..`.
    Detour(usize, String),
    /// The chosen unreserved character as `%XX`, in lower-case hex or not.
    Encode(usize, bool),
    /// A trailing `/`.
    Trailing,
}

#[derive(Clone, Debug)]
struct PathCase {
    path: String,
    respell: Vec<Respell>,
}

fn respell_op() -> impl Strategy<Value = Respell> {
    prop_oneof![
        1 => any::<usize>().prop_map(Respell::Dot),
        1 => any::<usize>().prop_map(Respell::Empty),
        1 => (any::<usize>(), "[a-z0-9_-]{1,4}").prop_map(|(at, name)| Respell::Detour(at, name)),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(at, lower)| Respell::Encode(at, lower)),
        1 => Just(Respell::Trailing),
    ]
}

fn respell(canonical: &str, ops: &[Respell]) -> String {
    let mut path = canonical.to_owned();
    for op in ops {
        let slashes: Vec<usize> = path
            .match_indices('/')
            .map(|(i, _)| i)
            .chain([path.len()])
            .collect();
        match op {
            Respell::Dot(at) => path.insert_str(slashes[at % slashes.len()], "/."),
            Respell::Empty(at) => path.insert(slashes[at % slashes.len()], '/'),
            Respell::Detour(at, name) => {
                path.insert_str(slashes[at % slashes.len()], &format!("/{name}/.."))
            }
            Respell::Encode(at, lower) => {
                let bytes = path.as_bytes();
                let mut plain = Vec::new();
                let mut i = 0;
                while i < bytes.len() {
                    if bytes[i] == b'%' {
                        i += 3;
                        continue;
                    }
                    if bytes[i].is_ascii_alphanumeric() || b"-._~".contains(&bytes[i]) {
                        plain.push(i);
                    }
                    i += 1;
                }
                if !plain.is_empty() {
                    let i = plain[at % plain.len()];
                    let escape = format!("%{:02X}", bytes[i]);
                    let escape = if *lower {
                        escape.to_ascii_lowercase()
                    } else {
                        escape
                    };
                    path.replace_range(i..=i, &escape);
                }
            }
            Respell::Trailing => path.push('/'),
        }
    }
    path
}

fn path_segments() -> impl Strategy<Value = String> {
    vec(
        prop_oneof![
            select(
                &[
                    "",
                    ".",
                    "..",
                    "v1",
                    "V1",
                    "chat",
                    "completions",
                    "completion%73",
                    "%2e",
                    "%2E%2e",
                    "%2f",
                    "%5c",
                    "%00",
                    "%",
                    "%4",
                    "%zz",
                    "a;b",
                    "a\\b",
                    "%41",
                    "%7e",
                    "%20",
                    "responses",
                    "models",
                    "embeddings",
                    "a..b",
                    "%C3%A9",
                    "é",
                ][..]
            )
            .prop_map(str::to_owned),
            "[ -~]{0,6}",
        ],
        0..10,
    )
    .prop_map(|segments| format!("/{}", segments.join("/")))
}

fn paths(corpus: Vec<Vec<u8>>) -> impl Strategy<Value = PathCase> {
    let path = prop_oneof![
        mutations(corpus, PATH_TOKENS)
            .prop_map(|bytes| String::from_utf8_lossy(&bytes).into_owned()),
        path_segments(),
    ];
    (path, vec(respell_op(), 0..6)).prop_map(|(path, respell)| PathCase { path, respell })
}

/// Whether `%XX` escapes are all kept ones: upper-case hex, not an unreserved character, not
/// a separator or control character.
fn escapes_are_canonical(path: &str) -> bool {
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |b: Option<&u8>| {
                b.filter(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b))
                    .map(|b| (*b as char).to_digit(16).unwrap())
            };
            let (Some(high), Some(low)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) else {
                return false;
            };
            let value = (high * 16 + low) as u8;
            if value.is_ascii_alphanumeric()
                || b"-._~/\\;".contains(&value)
                || value < 0x20
                || value == 0x7f
            {
                return false;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    true
}

fn check_path(case: &PathCase) -> TestCaseResult {
    let path = case.path.as_str();
    let canonical = match normalize(path) {
        Err(_) => {
            // Only an escape, a parameter, a backslash or a `..` can be refused.
            prop_assert!(path.contains(['%', ';', '\\']) || path.split('/').any(|s| s == ".."));
            return Ok(());
        }
        Ok(canonical) => canonical.into_owned(),
    };
    prop_assert!(!path.contains([';', '\\']), "{}", canonical);
    let again = normalize(&canonical);
    prop_assert_eq!(again.as_deref(), Ok(canonical.as_str()), "not idempotent");
    if canonical.starts_with('/') {
        prop_assert!(!canonical.contains("//"), "{}", canonical);
        prop_assert!(
            !canonical.split('/').any(|s| s == "." || s == ".."),
            "{}",
            canonical
        );
        prop_assert!(
            canonical.len() == 1 || !canonical.ends_with('/'),
            "{}",
            canonical
        );
        prop_assert!(!canonical.contains([';', '\\']), "{}", canonical);
        prop_assert!(escapes_are_canonical(&canonical), "{}", canonical);
        let lower = canonical.to_ascii_lowercase();
        prop_assert!(!lower.contains("%2f") && !lower.contains("%5c") && !lower.contains("%2e"));
        // However it is spelled, it is the same path and the same endpoint.
        let spelling = respell(&canonical, &case.respell);
        let respelled = normalize(&spelling);
        prop_assert_eq!(respelled.as_deref(), Ok(canonical.as_str()), "{}", spelling);
        prop_assert_eq!(
            Endpoint::from_path(&spelling.to_ascii_lowercase()).is_some(),
            spelling.to_ascii_lowercase().starts_with("/v1/")
        );
    } else {
        // Only a path already without anything to normalize is kept as it is.
        prop_assert_eq!(canonical.as_str(), path);
    }
    Ok(())
}

#[test]
fn path_normalize() {
    fuzz(
        "path_normalize",
        |seed| {
            let path = String::from_utf8_lossy(&seed.bytes).into_owned();
            let respelled = vec![
                Respell::Dot(0),
                Respell::Detour(usize::MAX, "x".to_owned()),
                Respell::Encode(7, true),
                Respell::Trailing,
            ];
            vec![
                PathCase {
                    path: path.clone(),
                    respell: Vec::new(),
                },
                PathCase {
                    path,
                    respell: respelled,
                },
            ]
        },
        paths,
        check_path,
    );
}

// ---------------------------------------------------------------------------------------------
// Target: token estimation

#[derive(Clone, Debug)]
struct Request {
    bytes: Bytes,
    endpoint: Endpoint,
    /// Where the list of messages (or inputs, or prompts) is cut in two, modulo its length + 1.
    split: usize,
}

const ESTIMATE_ENDPOINTS: [Endpoint; 6] = [
    Endpoint::ChatCompletions,
    Endpoint::Completions,
    Endpoint::Embeddings,
    Endpoint::Responses,
    Endpoint::Models,
    Endpoint::Audio,
];

/// The endpoint a corpus body is for, by its file name.
fn endpoint_for(name: &str) -> Endpoint {
    if name.starts_with("responses") {
        Endpoint::Responses
    } else if name.starts_with("completions") {
        Endpoint::Completions
    } else if name.starts_with("embeddings") {
        Endpoint::Embeddings
    } else {
        Endpoint::ChatCompletions
    }
}

/// The list whose items are counted one by one, so cutting it in two splits the prompt.
fn list_field(endpoint: Endpoint) -> Option<&'static str> {
    match endpoint {
        Endpoint::ChatCompletions => Some("messages"),
        Endpoint::Responses | Endpoint::Embeddings => Some("input"),
        Endpoint::Completions => Some("prompt"),
        _ => None,
    }
}

/// The names the estimator looks at, one per line: random bodies built from them reach deep
/// into it (shared with the estimator's own property tests).
fn words() -> Vec<&'static str> {
    include_str!("fuzz-corpus/estimate-words.txt")
        .lines()
        .collect()
}

fn json_value() -> BoxedStrategy<Value> {
    let word = || select(words()).prop_map(str::to_owned);
    let leaf = prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => (0u64..100_000).prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(Value::from),
        3 => word().prop_map(Value::String),
        1 => ".{0,24}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Value::Array),
            vec((word(), inner), 0..5)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
    .boxed()
}

/// A change to one node of a JSON document.
#[derive(Clone, Debug)]
enum ValueEdit {
    Set(Value),
    /// In an array or object: removes the chosen item.
    Remove(Index),
    /// In an array or object: repeats the chosen item (an object's under a new key).
    Repeat(Index, String),
    /// In an array or object: adds an item.
    Add(String, Value),
}

fn value_edit() -> impl Strategy<Value = (Index, ValueEdit)> {
    let word = || select(words()).prop_map(str::to_owned);
    (
        any::<Index>(),
        prop_oneof![
            1 => json_value().prop_map(ValueEdit::Set),
            1 => any::<Index>().prop_map(ValueEdit::Remove),
            2 => (any::<Index>(), word()).prop_map(|(i, key)| ValueEdit::Repeat(i, key)),
            2 => (word(), json_value()).prop_map(|(key, value)| ValueEdit::Add(key, value)),
        ],
    )
}

fn nodes(value: &Value) -> usize {
    1 + match value {
        Value::Array(items) => items.iter().map(nodes).sum(),
        Value::Object(fields) => fields.values().map(nodes).sum(),
        _ => 0,
    }
}

/// Applies `edit` to the node numbered `target` in pre-order; returns the nodes visited.
fn edit_value(value: &mut Value, target: usize, edit: &ValueEdit) -> usize {
    if target == 0 {
        match (edit, &mut *value) {
            (ValueEdit::Set(new), _) => *value = new.clone(),
            (ValueEdit::Remove(i), Value::Array(items)) if !items.is_empty() => {
                items.remove(i.index(items.len()));
            }
            (ValueEdit::Remove(i), Value::Object(fields)) if !fields.is_empty() => {
                let key = fields.keys().nth(i.index(fields.len())).unwrap().clone();
                fields.remove(&key);
            }
            (ValueEdit::Repeat(i, _), Value::Array(items)) if !items.is_empty() => {
                let item = items[i.index(items.len())].clone();
                items.push(item);
            }
            (ValueEdit::Repeat(i, key), Value::Object(fields)) if !fields.is_empty() => {
                let item = fields.values().nth(i.index(fields.len())).unwrap().clone();
                fields.insert(key.clone(), item);
            }
            (ValueEdit::Add(_, new), Value::Array(items)) => items.push(new.clone()),
            (ValueEdit::Add(key, new), Value::Object(fields)) => {
                fields.insert(key.clone(), new.clone());
            }
            _ => {}
        }
        return usize::MAX;
    }
    let mut seen = 1;
    let children: Vec<&mut Value> = match value {
        Value::Array(items) => items.iter_mut().collect(),
        Value::Object(fields) => fields.values_mut().collect(),
        _ => Vec::new(),
    };
    for child in children {
        let size = nodes(child);
        if target < seen + size {
            edit_value(child, target - seen, edit);
            return usize::MAX;
        }
        seen += size;
    }
    seen
}

fn requests_to_estimate(corpus: Vec<Vec<u8>>) -> impl Strategy<Value = Request> {
    let documents: Arc<Vec<Value>> = Arc::new(
        corpus
            .iter()
            .filter_map(|bytes| serde_json::from_slice(bytes).ok())
            .collect(),
    );
    let edited = (any::<Index>(), vec(value_edit(), 0..6)).prop_map(move |(entry, edits)| {
        let mut document = documents[entry.index(documents.len())].clone();
        for (at, edit) in &edits {
            let target = at.index(nodes(&document));
            edit_value(&mut document, target, edit);
        }
        serde_json::to_vec(&document).unwrap()
    });
    let invented = json_value().prop_map(|mut document| {
        if let Value::Object(fields) = &mut document {
            fields.insert("model".to_owned(), json!("gpt-4o"));
        }
        serde_json::to_vec(&document).unwrap()
    });
    (
        prop_oneof![2 => mutations(corpus, JSON_TOKENS), 4 => edited, 1 => invented],
        select(&ESTIMATE_ENDPOINTS[..]),
        any::<usize>(),
    )
        .prop_map(|(bytes, endpoint, split)| Request {
            bytes: Bytes::from(bytes),
            endpoint,
            split,
        })
}

/// The tables, with and without the memo of recent counts.
fn tokenizers() -> &'static (Tokenizers, Tokenizers) {
    static TOKENIZERS: OnceLock<(Tokenizers, Tokenizers)> = OnceLock::new();
    TOKENIZERS.get_or_init(|| {
        (
            Tokenizers::new().unwrap(),
            Tokenizers::without_memo().unwrap(),
        )
    })
}

fn output_defaults() -> &'static OutputDefaults {
    static DEFAULTS: OnceLock<OutputDefaults> = OnceLock::new();
    DEFAULTS.get_or_init(|| {
        OutputDefaults::new(
            [
                ("gpt-4o".to_owned(), 16_384),
                ("o3".to_owned(), 100_000),
                ("gpt-4o-mini".to_owned(), 8_192),
            ]
            .into(),
            4096,
        )
    })
}

fn run_estimate(endpoint: Endpoint, body: &[u8]) -> Result<Estimate, EstimateError> {
    estimate(&tokenizers().0, endpoint, body, output_defaults())
}

fn check_estimate(request: &Request) -> TestCaseResult {
    let (endpoint, body) = (request.endpoint, &request.bytes[..]);
    let got = run_estimate(endpoint, body);
    let unmemoized = estimate(&tokenizers().1, endpoint, body, output_defaults());
    prop_assert_eq!(format!("{got:?}"), format!("{unmemoized:?}"));
    let Ok(got) = got else {
        return Ok(());
    };
    // A fixed cost (an audio part: 1,000 tokens) takes at least a dozen bytes to ask for.
    prop_assert!(
        got.prompt_tokens <= 128 * body.len() as u64 + 16,
        "{:?}",
        got
    );
    prop_assert!(got.stream || !got.include_usage);
    let Some(field) = list_field(endpoint) else {
        prop_assert_eq!((got.prompt_tokens, got.output_tokens), (0, 0));
        return Ok(());
    };
    if endpoint == Endpoint::Embeddings {
        prop_assert_eq!(got.output_tokens, 0);
        prop_assert!(got.output_capped);
    }
    let document: Value = serde_json::from_slice(body).expect("an estimated body is JSON");
    prop_assert_eq!(Some(got.model.as_str()), document["model"].as_str());
    prop_assert_eq!(got.stream, document["stream"] == json!(true));
    // Layout does not count: the same document compact or indented costs the same. (Not
    // compared with `body` itself: serde_json may read a float 1 ULP off, and a float's
    // printed text, counted as such, then differs.)
    let compact = run_estimate(endpoint, &serde_json::to_vec(&document).unwrap());
    let Ok(whole) = compact else {
        return Err(TestCaseError::fail(format!(
            "the document re-serialized fails: {compact:?}"
        )));
    };
    let indented = run_estimate(endpoint, &serde_json::to_vec_pretty(&document).unwrap());
    prop_assert_eq!(indented.as_ref().ok(), Some(&whole));
    prop_assert_eq!(&whole.model, &got.model);
    prop_assert_eq!(whole.output_tokens, got.output_tokens);
    // The list's items are counted one by one: its two halves cost the whole plus the empty list.
    let Some(Value::Array(items)) = document.get(field) else {
        return Ok(());
    };
    let cut = request.split % (items.len() + 1);
    let with = |part: &[Value]| {
        let mut document = document.clone();
        document[field] = Value::Array(part.to_vec());
        run_estimate(endpoint, &serde_json::to_vec(&document).unwrap())
    };
    let (head, tail, none) = (with(&items[..cut]), with(&items[cut..]), with(&[]));
    let (Ok(head), Ok(tail), Ok(none)) = (&head, &tail, &none) else {
        return Err(TestCaseError::fail(format!(
            "a part of a valid list fails: {head:?} {tail:?} {none:?}"
        )));
    };
    prop_assert_eq!(
        head.prompt_tokens + tail.prompt_tokens,
        whole.prompt_tokens + none.prompt_tokens
    );
    prop_assert_eq!(head.output_tokens, whole.output_tokens);
    prop_assert_eq!(tail.output_tokens, whole.output_tokens);
    Ok(())
}

#[test]
fn estimate_bodies() {
    fuzz(
        "estimate",
        |seed| {
            let endpoint = endpoint_for(&seed.name);
            let bytes = Bytes::from(seed.bytes.clone());
            [endpoint, Endpoint::Models]
                .into_iter()
                .flat_map(|endpoint| {
                    [0, 1, usize::MAX].map(|split| Request {
                        bytes: bytes.clone(),
                        endpoint,
                        split,
                    })
                })
                .collect()
        },
        requests_to_estimate,
        check_estimate,
    );
}
