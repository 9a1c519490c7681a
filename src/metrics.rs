//! sluice's Prometheus metrics, in a registry the server owns (not the global one), so two
//! servers in one test process never share counters. The names are a contract (README).
//!
//! Label values are bounded: `endpoint` comes from [`crate::endpoint::Endpoint`], `status`
//! from HTTP status codes, reasons from fixed lists, and `org` and `model` from what requests
//! name, bounded as pairs: see [`Metrics::labels`]. Never a key: an org without a configured
//! name is `key-` plus a hash prefix.
//!
//! Counters and histograms are recorded as requests run; the gauges describing buckets (the
//! upstream's last rate-limit headers, sluice's own view, queue depth, circuit) and the bucket
//! table's figures are read when `/metrics` is scraped, so keeping them costs requests nothing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::limiter::bucket::Resource;
use crate::limiter::gate::Circuit;
use crate::limiter::queue::BucketQueue;
use crate::limiter::BucketCounts;
use crate::priority::Priority;

/// Buckets from 1 ms to 10 min: upstream calls range from cached embeddings to long
/// reasoning-model streams, and queue waits up to the longest deadline.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// Time spent inside sluice itself: microseconds to a few milliseconds.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
];

/// Estimated / actual prompt tokens: 1 is a perfect estimate.
const RATIO_BUCKETS: &[f64] = &[
    0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0, 1.01, 1.05, 1.1, 1.2, 1.5, 2.0, 3.0,
];

/// Distinct automatic org names (`key-...`) with labels of their own.
pub const MAX_ORG_LABELS: usize = 200;
/// Distinct model names of automatic orgs with labels of their own.
pub const MAX_MODEL_LABELS: usize = 100;
/// (org, model) label pairs with series of their own. A pair used at one endpoint with three
/// statuses holds some 75 series (most of them histogram buckets): 1,000 such pairs render
/// 76k series, 7 MB, where the 200 x 100 the per-value caps alone allowed made 1.26M series
/// and a 120 MB scrape.
pub const MAX_LABEL_PAIRS: usize = 1_000;

/// The fold of pairs beyond the caps.
const OTHER: &str = "other";

/// Distinct values a label may take, then `other`.
struct LabelCap {
    seen: RwLock<HashSet<Box<str>>>,
    max: usize,
}

impl LabelCap {
    fn new(max: usize) -> Self {
        Self {
            seen: RwLock::new(HashSet::new()),
            max,
        }
    }

    fn get<'a>(&self, value: &'a str) -> &'a str {
        if self
            .seen
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(value)
        {
            return value;
        }
        let mut seen = self
            .seen
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen.contains(value) {
            value
        } else if seen.len() < self.max {
            seen.insert(value.into());
            value
        } else {
            "other"
        }
    }

    #[cfg(test)]
    fn admitted(&self, value: &str) -> bool {
        self.seen
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(value)
    }
}

/// Models by org, and how many pairs they make.
type Pairs = (HashMap<Box<str>, HashSet<Box<str>>>, usize);

/// (org, model) pairs admitted to label series, up to a bound.
struct LabelPairs {
    seen: RwLock<Pairs>,
    max: usize,
    /// Whether reaching the bound was logged (once: the fold is the steady state after).
    logged: AtomicBool,
}

impl LabelPairs {
    fn new(max: usize) -> Self {
        Self {
            seen: RwLock::new((HashMap::new(), 0)),
            max,
            logged: AtomicBool::new(false),
        }
    }

    fn contains(&self, org: &str, model: &str) -> bool {
        self.seen
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .0
            .get(org)
            .is_some_and(|models| models.contains(model))
    }

    /// Admits (org, model) while fewer than `limit` pairs are admitted; whether it is.
    fn admit(&self, org: &str, model: &str, limit: usize) -> bool {
        if self.contains(org, model) {
            return true;
        }
        let mut seen = self
            .seen
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (pairs, count) = &mut *seen;
        if pairs.get(org).is_some_and(|models| models.contains(model)) {
            return true;
        }
        if *count >= limit {
            drop(seen);
            if !self.logged.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max_pairs = self.max,
                    org,
                    model,
                    "metric label pairs reached their bound: further (org, model) pairs are \
                     counted under model=\"other\" (configured orgs) or org=\"other\", \
                     model=\"other\" (automatic key- orgs)"
                );
            }
            return false;
        }
        pairs.entry(org.into()).or_default().insert(model.into());
        *count += 1;
        true
    }
}

pub struct Metrics {
    registry: Registry,
    /// Requests answered, by org, model, endpoint and final status (sluice's own errors too).
    pub requests: IntCounterVec,
    /// From sending upstream to the end of the upstream body.
    pub upstream_duration: HistogramVec,
    /// From sending upstream to the upstream's response headers.
    pub upstream_ttfb: HistogramVec,
    /// Time inside sluice before the request left for the upstream, queueing excluded.
    pub overhead: Histogram,
    pub in_flight: IntGauge,
    pub upstream_429: IntCounterVec,
    pub retries: IntCounterVec,
    pub queue_wait: HistogramVec,
    pub queue_rejections: IntCounterVec,
    pub tokens_reserved: IntCounterVec,
    pub tokens_used: IntCounterVec,
    pub prompt_estimate_ratio: HistogramVec,
    pub config_reloads: IntCounterVec,
    /// 1 when the last reload (or the start) put its configuration in force, 0 when the last
    /// reload was rejected and an older configuration still runs.
    pub config_last_reload_ok: IntGauge,
    /// When the configuration in force was loaded (Unix seconds).
    pub config_loaded_at: prometheus::Gauge,
    pub header_errors: IntCounter,
    /// Client connections open now, over all workers.
    pub connections_open: IntGauge,
    /// Client connections closed at accept because `server.max_connections` were open.
    pub connections_refused: IntCounter,
    ratelimit_limit: GaugeVec,
    ratelimit_remaining: GaugeVec,
    ratelimit_reset: GaugeVec,
    bucket_available: GaugeVec,
    circuit_open: IntGaugeVec,
    queue_depth: IntGaugeVec,
    buckets: IntGauge,
    buckets_evicted: IntCounter,
    bucket_cap_reached: IntCounterVec,
    orgs: LabelCap,
    models: LabelCap,
    pairs: LabelPairs,
    /// Held while a scrape refreshes the bucket gauges and reads them: two concurrent scrapes
    /// would otherwise see each other's half-reset families.
    scrape: std::sync::Mutex<()>,
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("static definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let metric = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("static definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let metric = GaugeVec::new(Opts::new(name, help), labels).expect("static definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

fn int_gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("static definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

impl Metrics {
    pub fn new() -> Self {
        Self::with_pair_bound(MAX_LABEL_PAIRS)
    }

    fn with_pair_bound(max_pairs: usize) -> Self {
        let r = Registry::new();
        let bucket = &["org", "model", "resource"];
        let in_flight = IntGauge::new(
            "sluice_requests_in_flight",
            "Requests being proxied now, streams included.",
        )
        .expect("static definition");
        r.register(Box::new(in_flight.clone()))
            .expect("metric names are unique");
        let overhead = Histogram::with_opts(
            HistogramOpts::new(
                "sluice_overhead_seconds",
                "Time inside sluice before a request leaves for the upstream, queueing excluded.",
            )
            .buckets(OVERHEAD_BUCKETS.to_vec()),
        )
        .expect("static definition");
        r.register(Box::new(overhead.clone()))
            .expect("metric names are unique");
        let header_errors = IntCounter::new(
            "sluice_upstream_header_errors_total",
            "x-ratelimit-* header values the upstream sent that could not be parsed (ignored).",
        )
        .expect("static definition");
        r.register(Box::new(header_errors.clone()))
            .expect("metric names are unique");
        let connections_open =
            IntGauge::new("sluice_connections_open", "Client connections open now.")
                .expect("static definition");
        r.register(Box::new(connections_open.clone()))
            .expect("metric names are unique");
        let connections_refused = IntCounter::new(
            "sluice_connections_refused_total",
            "Client connections closed at once because server.max_connections were open.",
        )
        .expect("static definition");
        r.register(Box::new(connections_refused.clone()))
            .expect("metric names are unique");
        let build_info = int_gauge(
            &r,
            "sluice_build_info",
            "sluice's version; always 1.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let config_reloads = counter(
            &r,
            "sluice_config_reloads_total",
            "Configuration reloads, by result (ok, error).",
            &["result"],
        );
        for result in ["ok", "error"] {
            config_reloads.with_label_values(&[result]);
        }
        let config_last_reload_ok = IntGauge::new(
            "sluice_config_last_reload_successful",
            "1 if the configuration file's last load (start or reload) is in force, 0 if it was \
             rejected and the previous configuration still runs.",
        )
        .expect("static definition");
        config_last_reload_ok.set(1);
        r.register(Box::new(config_last_reload_ok.clone()))
            .expect("metric names are unique");
        let config_loaded_at = prometheus::Gauge::new(
            "sluice_config_last_reload_success_timestamp_seconds",
            "When the configuration in force was loaded, in Unix seconds.",
        )
        .expect("static definition");
        config_loaded_at.set(unix_now());
        r.register(Box::new(config_loaded_at.clone()))
            .expect("metric names are unique");
        let buckets = IntGauge::new(
            "sluice_buckets",
            "(org, model) buckets sluice keeps now (bounded by queue.max_buckets, which \
             configured buckets may exceed).",
        )
        .expect("static definition");
        r.register(Box::new(buckets.clone()))
            .expect("metric names are unique");
        let buckets_evicted = IntCounter::new(
            "sluice_buckets_evicted_total",
            "Idle learned buckets evicted to stay within queue.max_buckets.",
        )
        .expect("static definition");
        r.register(Box::new(buckets_evicted.clone()))
            .expect("metric names are unique");
        let bucket_cap_reached = counter(
            &r,
            "sluice_bucket_cap_reached_total",
            "Requests that needed a new bucket with queue.max_buckets reached and no learned \
             bucket idle, by outcome (unmetered: an unconfigured pair forwarded without a \
             bucket; beyond_cap: a configured pair given its bucket anyway).",
            &["outcome"],
        );
        for outcome in ["unmetered", "beyond_cap"] {
            bucket_cap_reached.with_label_values(&[outcome]);
        }
        Self {
            requests: counter(
                &r,
                "sluice_requests_total",
                "Requests answered, by org, model, endpoint and status.",
                &["org", "model", "endpoint", "status"],
            ),
            upstream_duration: histogram(
                &r,
                "sluice_upstream_duration_seconds",
                "Time from sending a request upstream to the end of its response body.",
                &["org", "model", "endpoint"],
                DURATION_BUCKETS,
            ),
            upstream_ttfb: histogram(
                &r,
                "sluice_upstream_ttfb_seconds",
                "Time from sending a request upstream to its response headers.",
                &["org", "model", "endpoint"],
                DURATION_BUCKETS,
            ),
            overhead,
            in_flight,
            upstream_429: counter(
                &r,
                "sluice_upstream_429_total",
                "429s the upstream answered, by reason \
                 (requests, tokens, slow_down, quota, too_large, other).",
                &["org", "model", "reason"],
            ),
            retries: counter(
                &r,
                "sluice_retries_total",
                "Requests sent upstream again, by reason (rate_limit, server_error, connection).",
                &["org", "model", "reason"],
            ),
            queue_wait: histogram(
                &r,
                "sluice_queue_wait_seconds",
                "Time a request waited in sluice before reaching the upstream (queue and 429 \
                 replays).",
                &["org", "model"],
                DURATION_BUCKETS,
            ),
            queue_rejections: counter(
                &r,
                "sluice_queue_rejections_total",
                "Requests sluice answered 429 itself, by reason (deadline, queue_full, too_large).",
                &["org", "model", "reason"],
            ),
            tokens_reserved: counter(
                &r,
                "sluice_tokens_reserved_total",
                "Tokens charged at admission (prompt estimate plus output reserved).",
                &["org", "model"],
            ),
            tokens_used: counter(
                &r,
                "sluice_tokens_used_total",
                "Tokens the upstream reported using, by kind (prompt, completion).",
                &["org", "model", "kind"],
            ),
            prompt_estimate_ratio: histogram(
                &r,
                "sluice_prompt_estimate_ratio",
                "Estimated / actual prompt tokens per request: how good the estimator is.",
                &["model"],
                RATIO_BUCKETS,
            ),
            config_reloads,
            config_last_reload_ok,
            config_loaded_at,
            header_errors,
            connections_open,
            connections_refused,
            ratelimit_limit: gauge(
                &r,
                "sluice_upstream_ratelimit_limit",
                "The limit in the upstream's last x-ratelimit-limit-* header.",
                bucket,
            ),
            ratelimit_remaining: gauge(
                &r,
                "sluice_upstream_ratelimit_remaining",
                "What was left in the upstream's last x-ratelimit-remaining-* header.",
                bucket,
            ),
            ratelimit_reset: gauge(
                &r,
                "sluice_upstream_ratelimit_reset_seconds",
                "The upstream's last x-ratelimit-reset-* header, in seconds.",
                bucket,
            ),
            bucket_available: gauge(
                &r,
                "sluice_bucket_available",
                "sluice's own view of a bucket: units available now (negative in debt).",
                bucket,
            ),
            circuit_open: int_gauge(
                &r,
                "sluice_circuit_open",
                "1 while a bucket's circuit breaker stops dispatching (or lets one probe out).",
                &["org", "model"],
            ),
            queue_depth: int_gauge(
                &r,
                "sluice_queue_depth",
                "Requests waiting in a bucket's queue, by priority.",
                &["org", "model", "priority"],
            ),
            registry: r,
            buckets,
            buckets_evicted,
            bucket_cap_reached,
            orgs: LabelCap::new(MAX_ORG_LABELS),
            models: LabelCap::new(MAX_MODEL_LABELS),
            pairs: LabelPairs::new(max_pairs),
            scrape: std::sync::Mutex::new(()),
        }
    }

    /// The `org` and `model` labels of a request of `org` for `model`: their own names while
    /// the pair is among the [`MAX_LABEL_PAIRS`] admitted, first come first served, then a
    /// fold, so the series (and the memory holding them) stay bounded whatever names requests
    /// bring.
    ///
    /// Automatic orgs (`key-` plus a hash of a key: anyone can make up keys) may fill only
    /// half the pairs, and only with the first [`MAX_ORG_LABELS`] names and
    /// [`MAX_MODEL_LABELS`] models they bring, so a flood of made-up keys leaves room for the
    /// configured orgs (whose names only the configuration makes); beyond, they fold into
    /// (`other`, `other`). A configured org's pairs fold into (its name, `other`), bounded by
    /// the configuration.
    pub fn labels<'a>(&self, org: &'a str, model: &'a str) -> (&'a str, &'a str) {
        if self.pairs.contains(org, model) {
            return (org, model);
        }
        if crate::org::is_automatic(org) {
            let admitted = self.orgs.get(org) != OTHER
                && self.models.get(model) != OTHER
                && self.pairs.admit(org, model, self.pairs.max / 2);
            if admitted {
                (org, model)
            } else {
                (OTHER, OTHER)
            }
        } else if self.pairs.admit(org, model, self.pairs.max) {
            (org, model)
        } else {
            (org, OTHER)
        }
    }

    /// Takes the bucket table's figures for the next scrape.
    pub fn bucket_counts(&self, counts: BucketCounts) {
        // Under the scrape lock: two scrapes adding the same difference would count it twice.
        let _scrape = self
            .scrape
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.buckets
            .set(i64::try_from(counts.buckets).unwrap_or(i64::MAX));
        self.buckets_evicted
            .inc_by(counts.evicted.saturating_sub(self.buckets_evicted.get()));
        for (outcome, total) in [
            ("unmetered", counts.unmetered),
            ("beyond_cap", counts.beyond_cap),
        ] {
            let counter = self.bucket_cap_reached.with_label_values(&[outcome]);
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }

    /// Reads every bucket into the gauges, then renders the Prometheus text exposition.
    pub fn render(&self, buckets: &[Arc<BucketQueue>]) -> String {
        let _scrape = self
            .scrape
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.refresh(buckets);
        let mut buffer = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail on I/O; a failure here would be a bug in the
        // metric definitions, which the tests render.
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(error = %err, "could not encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }

    /// The registry, for metrics defined beside their owner (the shared store's).
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts a reload's outcome.
    pub fn reloaded(&self, ok: bool) {
        self.config_reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
        self.config_last_reload_ok.set(i64::from(ok));
        if ok {
            self.config_loaded_at.set(unix_now());
        }
    }

    fn refresh(&self, buckets: &[Arc<BucketQueue>]) {
        for gauge in [
            &self.ratelimit_limit,
            &self.ratelimit_remaining,
            &self.ratelimit_reset,
            &self.bucket_available,
        ] {
            gauge.reset();
        }
        self.circuit_open.reset();
        self.queue_depth.reset();
        for queue in buckets {
            // Buckets beyond the label bounds share no series: they are left out rather than
            // overwrite each other under `other`.
            if !self.pairs.contains(&queue.org, &queue.model) {
                continue;
            }
            let org: &str = &queue.org;
            let model: &str = &queue.model;
            let status = queue.status();
            if let Some(upstream) = &status.upstream {
                for (resource, window) in upstream.headers.iter() {
                    let labels = [org, model, resource.label()];
                    if let Some(limit) = window.limit {
                        self.ratelimit_limit
                            .with_label_values(&labels)
                            .set(limit as f64);
                    }
                    if let Some(remaining) = window.remaining {
                        self.ratelimit_remaining
                            .with_label_values(&labels)
                            .set(remaining as f64);
                    }
                    if let Some(reset) = window.reset {
                        self.ratelimit_reset
                            .with_label_values(&labels)
                            .set(reset.as_secs_f64());
                    }
                }
            }
            for resource in Resource::BOTH {
                if let Some(available) = *status.available.get(resource) {
                    self.bucket_available
                        .with_label_values(&[org, model, resource.label()])
                        .set(available);
                }
            }
            let open = !matches!(status.circuit, Circuit::Closed);
            self.circuit_open
                .with_label_values(&[org, model])
                .set(i64::from(open));
            for priority in Priority::ALL {
                self.queue_depth
                    .with_label_values(&[org, model, priority.label()])
                    .set(status.depth[priority] as i64);
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family() {
        let metrics = Metrics::new();
        metrics
            .requests
            .with_label_values(&["acme", "gpt-4o", "chat_completions", "200"])
            .inc();
        metrics
            .upstream_ttfb
            .with_label_values(&["acme", "gpt-4o", "chat_completions"])
            .observe(0.01);
        metrics.overhead.observe(0.0001);
        let text = metrics.render(&[]);
        for name in [
            "sluice_requests_total{endpoint=\"chat_completions\",model=\"gpt-4o\",org=\"acme\",status=\"200\"} 1",
            "sluice_upstream_ttfb_seconds_count",
            "sluice_overhead_seconds_count 1",
            "sluice_requests_in_flight 0",
            "sluice_config_reloads_total{result=\"error\"} 0",
            "sluice_build_info{version=",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn label_values_are_capped() {
        let cap = LabelCap::new(2);
        assert_eq!(cap.get("a"), "a");
        assert_eq!(cap.get("b"), "b");
        assert_eq!(cap.get("c"), "other");
        assert_eq!(cap.get("a"), "a");
        assert!(!cap.admitted("c"));
    }

    #[test]
    fn label_pairs_are_bounded_and_leave_room_for_configured_orgs() {
        let metrics = Metrics::with_pair_bound(4);
        // Automatic orgs take at most half the pairs...
        assert_eq!(metrics.labels("key-1", "a"), ("key-1", "a"));
        assert_eq!(metrics.labels("key-1", "b"), ("key-1", "b"));
        assert_eq!(metrics.labels("key-2", "a"), ("other", "other"));
        // ...so configured ones, arriving later, still get theirs.
        assert_eq!(metrics.labels("acme", "a"), ("acme", "a"));
        assert_eq!(metrics.labels("acme", "b"), ("acme", "b"));
        // Beyond the bound a configured org keeps its name; pairs admitted stay.
        assert_eq!(metrics.labels("acme", "c"), ("acme", "other"));
        assert_eq!(metrics.labels("key-1", "a"), ("key-1", "a"));
        assert_eq!(metrics.labels("acme", "a"), ("acme", "a"));
    }

    #[test]
    fn bucket_counts_become_counters() {
        let metrics = Metrics::new();
        let counts = BucketCounts {
            buckets: 7,
            evicted: 3,
            unmetered: 2,
            beyond_cap: 1,
        };
        metrics.bucket_counts(counts);
        metrics.bucket_counts(counts);
        let text = metrics.render(&[]);
        for line in [
            "sluice_buckets 7",
            "sluice_buckets_evicted_total 3",
            "sluice_bucket_cap_reached_total{outcome=\"unmetered\"} 2",
            "sluice_bucket_cap_reached_total{outcome=\"beyond_cap\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
