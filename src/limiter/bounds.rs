//! The queue-wide bounds every bucket shares: depths, the interactive reserve, and the
//! settings a bucket's budget is made with.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::config::QueueConfig;

/// The queue-wide bounds, shared by every bucket. The depths and the reserve change in place
/// on a config reload; the margin and the circuit threshold are fixed when a bucket is made.
#[derive(Debug)]
pub(crate) struct QueueBounds {
    pub(super) max_depth: AtomicUsize,
    pub(super) max_depth_per_bucket: AtomicUsize,
    /// An `f64`, as its bits.
    interactive_reserve: AtomicU64,
    /// Refill left unused in every bucket (see [`Bucket::with_margin`](super::bucket::Bucket::with_margin)).
    pub(super) refill_margin: Duration,
    /// See [`QueueConfig::relearn_interval`].
    pub(super) relearn_interval: Duration,
    /// Consecutive upstream 429s that open a bucket's circuit.
    pub(super) circuit_threshold: u32,
    /// Requests waiting in all buckets.
    pub(super) depth: AtomicUsize,
}

impl QueueBounds {
    pub(crate) fn new(config: &QueueConfig, circuit_threshold: u32) -> Self {
        Self {
            max_depth: AtomicUsize::new(config.max_depth),
            max_depth_per_bucket: AtomicUsize::new(config.max_depth_per_bucket),
            interactive_reserve: AtomicU64::new(config.interactive_reserve.to_bits()),
            refill_margin: config.refill_margin,
            relearn_interval: config.relearn_interval,
            circuit_threshold,
            depth: AtomicUsize::new(0),
        }
    }

    /// Takes a reloaded config's depths and reserve. Requests already queued stay queued,
    /// even past a lowered depth; the bound applies to new arrivals.
    pub(crate) fn update(&self, config: &QueueConfig) {
        self.max_depth.store(config.max_depth, Ordering::Relaxed);
        self.max_depth_per_bucket
            .store(config.max_depth_per_bucket, Ordering::Relaxed);
        self.interactive_reserve
            .store(config.interactive_reserve.to_bits(), Ordering::Relaxed);
    }

    /// The share of every bucket batch requests leave to interactive ones.
    pub(super) fn interactive_reserve(&self) -> f64 {
        f64::from_bits(self.interactive_reserve.load(Ordering::Relaxed))
    }
}
