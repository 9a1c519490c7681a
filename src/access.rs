//! The last phase of every exchange: one access-log line and the request metrics, written
//! when the response body has ended (or at once, for a response sluice produced itself).
//!
//! Only the method, the path without its query, the endpoint and figures are logged: never a
//! header, so never a key.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{Method, StatusCode};
use tokio::time::Instant;

use crate::endpoint::Endpoint;
use crate::limiter::queue::Rejection;
use crate::metrics::Metrics;
use crate::priority::Priority;
use crate::retry::RetryReason;
use crate::upstream::body::{BodyEnd, BodyOutcome};
use crate::upstream::ratelimit::Reason;

/// What is known of an exchange while it runs; consumed by [`AccessRecord::finish`].
pub struct AccessRecord {
    metrics: Arc<Metrics>,
    method: Method,
    path: String,
    endpoint: Option<Endpoint>,
    org: Option<Arc<str>>,
    model: Option<String>,
    priority: Option<Priority>,
    queue_ms: Option<f64>,
    usage: Option<(u64, u64)>,
    estimate: Option<(u64, u64)>,
    started: Instant,
    upstream: Option<UpstreamTiming>,
    /// Whether `finish` ran: the in-flight gauge is decremented exactly once either way.
    finished: bool,
}

struct UpstreamTiming {
    sent: Instant,
    headers_after: std::time::Duration,
}

impl AccessRecord {
    pub fn start(
        metrics: Arc<Metrics>,
        method: Method,
        path: &str,
        endpoint: Option<Endpoint>,
    ) -> Self {
        metrics.in_flight.inc();
        Self {
            metrics,
            method,
            path: path.to_owned(),
            endpoint,
            org: None,
            model: None,
            priority: None,
            queue_ms: None,
            usage: None,
            estimate: None,
            started: Instant::now(),
            upstream: None,
            finished: false,
        }
    }

    pub fn identity(&mut self, org: &Arc<str>, priority: Priority) {
        self.org = Some(Arc::clone(org));
        self.priority = Some(priority);
    }

    /// The model and what sluice estimated the request would cost (prompt, output reserved).
    pub fn estimate(&mut self, model: &str, prompt_tokens: u64, output_tokens: u64) {
        self.model = Some(model.to_owned());
        self.estimate = Some((prompt_tokens, output_tokens));
    }

    pub fn queued(&mut self, waited: std::time::Duration) {
        self.queue_ms = Some(millis(waited));
    }

    /// sluice answered 429 itself (reason label: see [`Rejection::label`]).
    pub fn rejected(&self, rejection: &Rejection) {
        let (org, model) = self.labels();
        self.metrics
            .queue_rejections
            .with_label_values(&[org, model, rejection.label()])
            .inc();
    }

    /// The upstream answered 429.
    pub fn upstream_429(&self, reason: Reason) {
        let (org, model) = self.labels();
        self.metrics
            .upstream_429
            .with_label_values(&[org, model, reason.as_str()])
            .inc();
    }

    /// The request is sent upstream again.
    pub fn retried(&self, reason: RetryReason) {
        let (org, model) = self.labels();
        self.metrics
            .retries
            .with_label_values(&[org, model, reason.as_str()])
            .inc();
    }

    /// The `org` and `model` metric labels of this exchange (bounded as pairs, see
    /// [`Metrics::labels`]; `none` when unknown).
    fn labels(&self) -> (&str, &str) {
        let org = self.org.as_deref().unwrap_or("none");
        let model = self.model.as_deref().unwrap_or("none");
        self.metrics.labels(org, model)
    }

    pub fn usage(&mut self, prompt_tokens: u64, completion_tokens: u64) {
        self.usage = Some((prompt_tokens, completion_tokens));
    }

    /// Marks the moment the request left for the upstream; returns it for the caller's use.
    pub fn upstream_sent(&mut self) -> Instant {
        let now = Instant::now();
        if self.upstream.is_none() {
            let queued = std::time::Duration::from_secs_f64(self.queue_ms.unwrap_or(0.0) / 1000.0);
            let inside = now
                .saturating_duration_since(self.started)
                .saturating_sub(queued);
            self.metrics.overhead.observe(inside.as_secs_f64());
        }
        self.upstream = Some(UpstreamTiming {
            sent: now,
            headers_after: std::time::Duration::ZERO,
        });
        now
    }

    /// Marks the arrival of the upstream's response headers.
    pub fn upstream_headers(&mut self) {
        if let Some(timing) = &mut self.upstream {
            timing.headers_after = timing.sent.elapsed();
            let headers_after = timing.headers_after;
            if let Some(endpoint) = self.endpoint {
                let (org, model) = self.labels();
                self.metrics
                    .upstream_ttfb
                    .with_label_values(&[org, model, endpoint.label()])
                    .observe(headers_after.as_secs_f64());
            }
        }
    }

    /// Writes the log line and the metrics for a response of `status` whose body ended as
    /// `end` says.
    pub fn finish(mut self, status: StatusCode, end: BodyEnd, error_code: Option<&str>) {
        self.finished = true;
        self.metrics.in_flight.dec();
        let endpoint = self.endpoint.map_or("none", Endpoint::label);
        let (org_label, model_label) = self.labels();
        let metrics = &self.metrics;
        metrics
            .requests
            .with_label_values(&[org_label, model_label, endpoint, status.as_str()])
            .inc();
        let upstream_ms = self.upstream.as_ref().map(|timing| {
            let elapsed = timing.sent.elapsed();
            if let Some(endpoint) = self.endpoint {
                metrics
                    .upstream_duration
                    .with_label_values(&[org_label, model_label, endpoint.label()])
                    .observe(elapsed.as_secs_f64());
            }
            millis(elapsed)
        });
        if let Some(queue_ms) = self.queue_ms {
            metrics
                .queue_wait
                .with_label_values(&[org_label, model_label])
                .observe(queue_ms / 1000.0);
            if let Some((prompt, output)) = self.estimate {
                metrics
                    .tokens_reserved
                    .with_label_values(&[org_label, model_label])
                    .inc_by(prompt + output);
            }
        }
        if let Some((prompt, completion)) = self.usage {
            metrics
                .tokens_used
                .with_label_values(&[org_label, model_label, "prompt"])
                .inc_by(prompt);
            metrics
                .tokens_used
                .with_label_values(&[org_label, model_label, "completion"])
                .inc_by(completion);
            if let (Some((estimated, _)), true) = (self.estimate, prompt > 0) {
                metrics
                    .prompt_estimate_ratio
                    .with_label_values(&[model_label])
                    .observe(estimated as f64 / prompt as f64);
            }
        }
        let total_ms = millis(self.started.elapsed());
        let (prompt_tokens, completion_tokens) = self.usage.unzip();
        let (est_prompt_tokens, est_output_tokens) = self.estimate.unzip();
        let line = Line {
            warn: !matches!((end.outcome, error_code), (BodyOutcome::Complete, None)),
            method: self.method.clone(),
            path: std::mem::take(&mut self.path),
            endpoint,
            org: self.org.take(),
            model: self.model.take(),
            priority: self.priority.map(Priority::label),
            status: status.as_u16(),
            queue_ms: self.queue_ms,
            upstream_ms,
            total_ms,
            bytes: end.bytes,
            est_prompt_tokens,
            est_output_tokens,
            prompt_tokens,
            completion_tokens,
            outcome: end.outcome.as_str(),
            error: error_code.map(str::to_owned),
        };
        deferred::log(line);
    }
}

/// One access line, captured as values when the exchange ends and formatted later, off the
/// event loop ([`deferred`]).
struct Line {
    warn: bool,
    method: Method,
    path: String,
    endpoint: &'static str,
    org: Option<Arc<str>>,
    model: Option<String>,
    priority: Option<&'static str>,
    status: u16,
    queue_ms: Option<f64>,
    upstream_ms: Option<f64>,
    total_ms: f64,
    bytes: u64,
    est_prompt_tokens: Option<u64>,
    est_output_tokens: Option<u64>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    outcome: &'static str,
    error: Option<String>,
}

/// The target of access lines (`RUST_LOG=sluice::access=warn` keeps only the failures).
pub const TARGET: &str = "sluice::access";

/// Whether access lines go out as one pre-formatted message (see [`plain_text_lines`]).
static PLAIN_TEXT: AtomicBool = AtomicBool::new(false);

/// With `true`, access lines are written as one message already in the text format's
/// `name=value` shape (strings quoted, absent values left out, control characters escaped),
/// instead of as structured fields the subscriber formats one by one. For plain-text logs
/// whose subscriber writes this target's messages without escaping them again; JSON logs
/// (and colored terminal output) get the fields.
pub fn plain_text_lines(on: bool) {
    PLAIN_TEXT.store(on, Ordering::Relaxed);
}

impl Line {
    fn emit(self) {
        self.emit_as(PLAIN_TEXT.load(Ordering::Relaxed));
    }

    fn emit_as(self, plain_text: bool) {
        if plain_text {
            let text = self.text();
            if self.warn {
                tracing::warn!(target: TARGET, "{text}");
            } else {
                tracing::info!(target: TARGET, "{text}");
            }
            return;
        }
        let Line {
            warn,
            method,
            path,
            endpoint,
            org,
            model,
            priority,
            status,
            queue_ms,
            upstream_ms,
            total_ms,
            bytes,
            est_prompt_tokens,
            est_output_tokens,
            prompt_tokens,
            completion_tokens,
            outcome,
            error,
        } = self;
        let (org, model, error) = (org.as_deref(), model.as_deref(), error.as_deref());
        if warn {
            tracing::warn!(
                target: TARGET,
                method = %method, path = %path, endpoint, org, model, priority,
                status, queue_ms, upstream_ms, total_ms, bytes,
                est_prompt_tokens, est_output_tokens, prompt_tokens, completion_tokens, outcome,
                error,
                "request"
            );
        } else {
            tracing::info!(
                target: TARGET,
                method = %method, path = %path, endpoint, org, model, priority,
                status, queue_ms, upstream_ms, total_ms, bytes,
                est_prompt_tokens, est_output_tokens, prompt_tokens, completion_tokens, outcome,
                "request"
            );
        }
    }

    /// The line's fields as the text format writes the structured event above: `%` fields
    /// as displayed, strings quoted, numbers as `Debug` shows them (`0.0`, not `0`), `None`
    /// left out, and the error only on warnings.
    fn text(&self) -> String {
        use std::fmt::Write;

        fn quoted(out: &mut String, name: &str, value: Option<&str>) {
            if let Some(value) = value {
                let _ = write!(out, " {name}={value:?}");
            }
        }
        fn number<T: std::fmt::Debug>(out: &mut String, name: &str, value: Option<T>) {
            if let Some(value) = value {
                let _ = write!(out, " {name}={value:?}");
            }
        }

        /// A value shown unquoted: control characters (terminal escapes, line breaks) are
        /// escaped, as the subscriber would otherwise do.
        fn bare(out: &mut String, value: &str) {
            if value.chars().any(|c| c.is_control()) {
                out.extend(value.chars().flat_map(char::escape_debug));
            } else {
                out.push_str(value);
            }
        }

        let mut out = String::with_capacity(384);
        out.push_str("request method=");
        bare(&mut out, self.method.as_str());
        out.push_str(" path=");
        bare(&mut out, &self.path);
        quoted(&mut out, "endpoint", Some(self.endpoint));
        quoted(&mut out, "org", self.org.as_deref());
        quoted(&mut out, "model", self.model.as_deref());
        quoted(&mut out, "priority", self.priority);
        number(&mut out, "status", Some(self.status));
        number(&mut out, "queue_ms", self.queue_ms);
        number(&mut out, "upstream_ms", self.upstream_ms);
        number(&mut out, "total_ms", Some(self.total_ms));
        number(&mut out, "bytes", Some(self.bytes));
        number(&mut out, "est_prompt_tokens", self.est_prompt_tokens);
        number(&mut out, "est_output_tokens", self.est_output_tokens);
        number(&mut out, "prompt_tokens", self.prompt_tokens);
        number(&mut out, "completion_tokens", self.completion_tokens);
        quoted(&mut out, "outcome", Some(self.outcome));
        if self.warn {
            quoted(&mut out, "error", self.error.as_deref());
        }
        out
    }
}

/// Access lines are formatted and written by a thread of their own, in batches: formatting
/// a line is a tenth of sluice's work on a small request (~14k instructions of ~133k under
/// callgrind, as plain text; more as JSON), and on an event loop it would delay the next
/// request. A
/// line waits at most [`LINGER`](crate::log_writer::LINGER) (the first of a batch wakes the
/// thread), so its timestamp is up to that much later than the request's end.
mod deferred {
    use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};

    use super::Line;
    use crate::log_writer::LINGER;

    #[derive(Default)]
    struct Queue {
        lines: Mutex<Vec<Line>>,
        wake: Condvar,
    }

    static QUEUE: OnceLock<Option<&'static Queue>> = OnceLock::new();

    /// Lines waiting beyond this are formatted by their own request's thread instead
    /// (backpressure, as the log writer has): the queue never grows without bound.
    const MAX_PENDING: usize = 64 * 1024;

    fn lock(queue: &Queue) -> MutexGuard<'_, Vec<Line>> {
        queue.lines.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The queue, its thread started on first use; `None` if the thread cannot start.
    fn queue() -> Option<&'static Queue> {
        *QUEUE.get_or_init(|| {
            let queue: &'static Queue = Box::leak(Box::default());
            std::thread::Builder::new()
                .name("sluice-access".into())
                .spawn(move || run(queue))
                .ok()
                .map(|_| queue)
        })
    }

    fn run(queue: &'static Queue) {
        loop {
            let mut lines = lock(queue);
            while lines.is_empty() {
                lines = queue
                    .wake
                    .wait(lines)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            drop(lines);
            std::thread::sleep(LINGER);
            let batch = std::mem::take(&mut *lock(queue));
            for line in batch {
                line.emit();
            }
        }
    }

    pub(super) fn log(line: Line) {
        // Filtered out (RUST_LOG): nothing to capture.
        let enabled = if line.warn {
            tracing::enabled!(target: super::TARGET, tracing::Level::WARN)
        } else {
            tracing::enabled!(target: super::TARGET, tracing::Level::INFO)
        };
        if !enabled {
            return;
        }
        let Some(queue) = queue() else {
            line.emit();
            return;
        };
        let mut lines = lock(queue);
        if lines.len() >= MAX_PENDING {
            drop(lines);
            line.emit();
            return;
        }
        let first = lines.is_empty();
        lines.push(line);
        drop(lines);
        if first {
            queue.wake.notify_one();
        }
    }

    /// Writes the lines still waiting, on the calling thread (at exit).
    pub fn flush() {
        if let Some(Some(queue)) = QUEUE.get() {
            let batch = std::mem::take(&mut *lock(queue));
            for line in batch {
                line.emit();
            }
        }
    }
}

pub use deferred::flush;

impl Drop for AccessRecord {
    fn drop(&mut self) {
        // A record dropped unfinished belongs to a handler cancelled by a client disconnect
        // before any response existed: still one request, still logged.
        if !self.finished {
            self.finished = true;
            self.metrics.in_flight.dec();
            let endpoint = self.endpoint.map_or("none", Endpoint::label);
            let (org, model) = self.labels();
            // 499, as nginx logs it: the client closed the request before a response.
            self.metrics
                .requests
                .with_label_values(&[org, model, endpoint, "499"])
                .inc();
            let (est_prompt_tokens, est_output_tokens) = self.estimate.unzip();
            deferred::log(Line {
                warn: true,
                method: self.method.clone(),
                path: std::mem::take(&mut self.path),
                endpoint,
                org: self.org.take(),
                model: self.model.take(),
                priority: self.priority.map(Priority::label),
                status: 499,
                queue_ms: self.queue_ms,
                upstream_ms: None,
                total_ms: millis(self.started.elapsed()),
                bytes: 0,
                est_prompt_tokens,
                est_output_tokens,
                prompt_tokens: None,
                completion_tokens: None,
                outcome: BodyOutcome::Cancelled.as_str(),
                error: Some("client_cancelled".to_owned()),
            });
        }
    }
}

fn millis(duration: std::time::Duration) -> f64 {
    (duration.as_secs_f64() * 1_000_000.0).round() / 1_000.0
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("test mutex").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The line as the text format writes it (level and target included, no timestamp).
    fn written(line: Line, plain_text: bool) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            // As sluice's plain-text logs write access lines: escaped by `Line::text`.
            .with_ansi_sanitization(!plain_text)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, || line.emit_as(plain_text));
        let bytes = captured.0.lock().expect("test mutex").clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    fn line(warn: bool, full: bool) -> Line {
        Line {
            warn,
            method: Method::POST,
            path: "/v1/chat/completions".to_owned(),
            endpoint: "chat_completions",
            org: full.then(|| Arc::from("team \"a\"")),
            model: full.then(|| "gpt-4o-mini".to_owned()),
            priority: full.then_some("batch"),
            status: if warn { 502 } else { 200 },
            queue_ms: full.then_some(0.0),
            upstream_ms: full.then_some(12.5),
            total_ms: 13.0,
            bytes: 655,
            est_prompt_tokens: full.then_some(216),
            est_output_tokens: full.then_some(16),
            prompt_tokens: full.then_some(210),
            completion_tokens: full.then_some(16),
            outcome: "complete",
            error: full.then(|| "upstream_unreachable".to_owned()),
        }
    }

    #[test]
    fn plain_text_lines_read_exactly_as_the_structured_event_does() {
        for warn in [false, true] {
            for full in [false, true] {
                let structured = written(line(warn, full), false);
                assert!(structured.contains("request method=POST"), "{structured}");
                assert_eq!(written(line(warn, full), true), structured);
            }
        }
    }

    #[test]
    fn plain_text_lines_escape_control_characters() {
        let mut hostile = line(true, true);
        hostile.path = "/v1/\u{1b}[31mred\nINFO fake".to_owned();
        hostile.model = Some("\u{1b}]0;title\u{7}".to_owned());
        hostile.error = Some("\u{9b}31m".to_owned());
        let text = written(hostile, true);
        assert!(
            !text.trim_end().chars().any(|c| c.is_control()),
            "a control character reached the log: {text:?}"
        );
        assert!(
            text.contains("path=/v1/\\u{1b}[31mred\\nINFO fake"),
            "{text}"
        );
    }
}
