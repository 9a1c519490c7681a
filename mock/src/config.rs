//! What the mock is told to be: its limits, how it generates, how it answers 429s.

use std::collections::HashMap;
use std::time::Duration;

/// Per-minute limits of one (organization, model) bucket pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Limits {
    /// Requests per minute.
    pub rpm: u64,
    /// Tokens per minute.
    pub tpm: u64,
}

/// Configuration of a [`crate::MockServer`]. Every field has a default that behaves like a
/// generous OpenAI organization, so tests only set what they are about.
#[derive(Clone, Debug)]
pub struct MockConfig {
    /// Default requests per minute of each (organization, model) bucket.
    pub rpm: u64,
    /// Default tokens per minute of each (organization, model) bucket.
    pub tpm: u64,
    /// Per-model overrides of `rpm` / `tpm`.
    pub model_limits: HashMap<String, Limits>,
    /// Quantized enforcement (docs/upstream.md §1): the buckets hold only `limit * quantum / 60 s` (at
    /// least 1) while still refilling at `limit / 60 s`, so bursts below the per-minute total are
    /// rejected. Headers keep describing the per-minute bucket. `None` (or >= 60 s) enforces the
    /// whole minute.
    pub quantum: Option<Duration>,
    /// Send `retry-after` (whole seconds, rounded up) and `retry-after-ms` on the 429s the
    /// limiter produces.
    pub retry_after: bool,
    /// Tokens generated per choice when the request sets no cap; a cap lowers it.
    pub completion_tokens: u32,
    /// Pause between two SSE events of a stream.
    pub chunk_delay: Duration,
    /// Output tokens charged at admission for chat and responses requests without a cap.
    /// Legacy completions always reserve their `max_tokens`, which defaults to 16.
    pub default_output_reservation: u32,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            rpm: 10_000,
            tpm: 10_000_000,
            model_limits: HashMap::new(),
            quantum: None,
            retry_after: true,
            completion_tokens: 16,
            chunk_delay: Duration::ZERO,
            default_output_reservation: 0,
        }
    }
}

impl MockConfig {
    /// The default limits, as set by `rpm` and `tpm`.
    pub fn default_limits(&self) -> Limits {
        Limits {
            rpm: self.rpm,
            tpm: self.tpm,
        }
    }
}
