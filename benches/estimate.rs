//! Throughput of `estimate()` on chat requests whose prompt is natural prose or one character
//! repeated (the input that makes tiktoken's per-piece work superlinear), from 200 B to 1 MB;
//! and sluice's count (bpe-openai) against the baseline, tiktoken-rs's `encode_ordinary`.
//!
//! `cargo bench --bench estimate -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use serde_json::json;
use sluice::endpoint::Endpoint;
use sluice::estimate::{estimate, Encoding, OutputDefaults, Tokenizers};

const SIZES: [(usize, &str); 4] = [
    (200, "200B"),
    (2_000, "2KB"),
    (20_000, "20KB"),
    (1_000_000, "1MB"),
];

/// English-like prose of `len` bytes, the same on every run.
fn prose(len: usize) -> String {
    const WORDS: &[&str] = &[
        "the",
        "of",
        "and",
        "to",
        "in",
        "a",
        "is",
        "that",
        "for",
        "it",
        "as",
        "was",
        "with",
        "be",
        "by",
        "on",
        "not",
        "he",
        "this",
        "are",
        "or",
        "his",
        "from",
        "at",
        "which",
        "but",
        "have",
        "an",
        "had",
        "they",
        "you",
        "were",
        "their",
        "one",
        "all",
        "we",
        "can",
        "her",
        "has",
        "there",
        "been",
        "if",
        "more",
        "when",
        "will",
        "would",
        "who",
        "so",
        "no",
        "request",
        "token",
        "limit",
        "minute",
        "estimate",
        "model",
        "response",
        "stream",
        "budget",
        "queue",
        "upstream",
        "organization",
        "reservation",
        "throughput",
        "latency",
        "1999",
        "42",
    ];
    // xorshift64: deterministic, no dependency.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move |bound: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % bound as u64) as usize
    };
    let mut text = String::with_capacity(len + 16);
    let mut sentences = 0;
    while text.len() < len {
        let words = 5 + next(12);
        for i in 0..words {
            let word = WORDS[next(WORDS.len())];
            if i == 0 {
                let mut chars = word.chars();
                text.extend(chars.next().map(|c| c.to_ascii_uppercase()));
                text.push_str(chars.as_str());
            } else {
                text.push(' ');
                text.push_str(word);
                if next(8) == 0 && i + 1 < words {
                    text.push(',');
                }
            }
        }
        text.push('.');
        sentences += 1;
        text.push_str(if sentences % 6 == 0 { "\n\n" } else { " " });
    }
    text.truncate(len);
    text
}

fn adversarial(len: usize) -> String {
    "a".repeat(len)
}

fn chat_body(prompt: &str) -> Vec<u8> {
    let body = json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prompt},
        ],
        "max_completion_tokens": 1000,
    });
    serde_json::to_vec(&body).expect("a Value serializes")
}

/// `estimate()` with the memo of recent counts off: every iteration tokenizes the prompt, as
/// for a prompt seen for the first time. (`estimate_chat_repeated` measures the memo hit.)
fn estimate_chat(c: &mut Criterion) {
    let tokenizers = Tokenizers::without_memo().expect("the embedded tables load");
    estimate_group(c, "estimate_chat", &tokenizers);
}

/// The same prompts seen again, as when a client resends its system prompt and history.
fn estimate_chat_repeated(c: &mut Criterion) {
    let tokenizers = Tokenizers::new().expect("the embedded tables load");
    estimate_group(c, "estimate_chat_repeated", &tokenizers);
}

fn estimate_group(c: &mut Criterion, name: &str, tokenizers: &Tokenizers) {
    let defaults = OutputDefaults::default();
    let mut group = c.benchmark_group(name);
    for (kind, prompt) in [
        ("natural", prose as fn(usize) -> String),
        ("adversarial", adversarial),
    ] {
        for (len, label) in SIZES {
            let body = chat_body(&prompt(len));
            group.throughput(Throughput::Bytes(body.len() as u64));
            // A megabyte takes tens of milliseconds: fewer, equal samples keep the run short.
            if len >= 1_000_000 {
                group.sampling_mode(SamplingMode::Flat).sample_size(10);
            } else {
                group.sampling_mode(SamplingMode::Auto).sample_size(100);
            }
            group.bench_with_input(BenchmarkId::new(kind, label), &body, |b, body| {
                b.iter(|| {
                    estimate(
                        tokenizers,
                        Endpoint::ChatCompletions,
                        black_box(body),
                        &defaults,
                    )
                })
            });
        }
    }
    group.finish();
}

/// sluice's count (bpe-openai) against tiktoken-rs's `encode_ordinary`: faster on prose, and
/// on runs of one character the gap widens with length (at 1 MB, tiktoken takes about half a
/// second, and panics on spaces under o200k).
fn count_vs_naive(c: &mut Criterion) {
    let tokenizers = Tokenizers::without_memo().expect("the embedded tables load");
    let naive = tiktoken_rs::o200k_base().expect("the embedded table loads");
    let mut group = c.benchmark_group("count");
    let cases = [
        ("prose_20KB", prose(20_000)),
        ("a_20KB", "a".repeat(20_000)),
        ("a_200KB", "a".repeat(200_000)),
        ("space_20KB", " ".repeat(20_000)),
        ("space_200KB", " ".repeat(200_000)),
    ];
    for (kind, text) in &cases {
        group.throughput(Throughput::Bytes(text.len() as u64));
        if text.len() > 100_000 {
            group.sampling_mode(SamplingMode::Flat).sample_size(10);
        } else {
            group.sampling_mode(SamplingMode::Auto).sample_size(100);
        }
        group.bench_with_input(BenchmarkId::new("bpe_openai", kind), text, |b, text| {
            b.iter(|| tokenizers.count(Encoding::O200kBase, black_box(text)))
        });
        group.bench_with_input(
            BenchmarkId::new("naive_encode_ordinary", kind),
            text,
            |b, text| b.iter(|| naive.encode_ordinary(black_box(text)).len()),
        );
    }
    group.finish();
}

criterion_group!(
    benches,
    estimate_chat,
    estimate_chat_repeated,
    count_vs_naive
);
criterion_main!(benches);
