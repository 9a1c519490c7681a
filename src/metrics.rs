//! sluice's Prometheus metrics, in a registry the server owns (not the global one), so two
//! servers in one test process never share counters.
//!
//! Label values are bounded by construction: `endpoint` comes from [`crate::endpoint::Endpoint`]
//! and `status` from HTTP status codes.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Buckets from 1 ms to 10 min: upstream calls range from cached embeddings to long
/// reasoning-model streams.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

pub struct Metrics {
    registry: Registry,
    /// Requests answered, by endpoint and final status (sluice's own errors included).
    pub requests: IntCounterVec,
    /// From sending upstream to the end of the upstream body.
    pub upstream_duration: HistogramVec,
    /// From sending upstream to the upstream's response headers.
    pub upstream_ttfb: HistogramVec,
    pub in_flight: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "sluice_requests_total",
                "Requests answered, by endpoint and status.",
            ),
            &["endpoint", "status"],
        )
        .expect("static metric definition");
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "sluice_upstream_duration_seconds",
                "Time from sending a request upstream to the end of its response body.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["endpoint"],
        )
        .expect("static metric definition");
        let upstream_ttfb = HistogramVec::new(
            HistogramOpts::new(
                "sluice_upstream_ttfb_seconds",
                "Time from sending a request upstream to its response headers.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["endpoint"],
        )
        .expect("static metric definition");
        let in_flight = IntGauge::new(
            "sluice_requests_in_flight",
            "Requests being proxied now, streams included.",
        )
        .expect("static metric definition");
        let build_info = IntGaugeVec::new(
            Opts::new("sluice_build_info", "sluice's version; always 1."),
            &["version"],
        )
        .expect("static metric definition");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(upstream_duration.clone()),
            Box::new(upstream_ttfb.clone()),
            Box::new(in_flight.clone()),
            Box::new(build_info),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Self {
            registry,
            requests,
            upstream_duration,
            upstream_ttfb,
            in_flight,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::with_capacity(8 * 1024);
        // Encoding into a Vec cannot fail on I/O; a failure here would be a bug in the
        // metric definitions, which the tests render.
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(error = %err, "could not encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
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
            .with_label_values(&["chat_completions", "200"])
            .inc();
        metrics
            .upstream_ttfb
            .with_label_values(&["chat_completions"])
            .observe(0.01);
        metrics
            .upstream_duration
            .with_label_values(&["chat_completions"])
            .observe(0.02);
        let text = metrics.render();
        for name in [
            "sluice_requests_total{endpoint=\"chat_completions\",status=\"200\"} 1",
            "sluice_upstream_duration_seconds_bucket",
            "sluice_upstream_ttfb_seconds_count",
            "sluice_requests_in_flight 0",
            "sluice_build_info{version=",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
