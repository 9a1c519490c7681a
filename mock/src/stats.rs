//! What the mock saw: counters and the last requests, for tests to assert on.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// How many requests [`Stats::received`] keeps.
pub const RECEIVED_CAPACITY: usize = 10_000;

/// A snapshot of the counters. Control routes (`/_mock/*`) are never counted.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Stats {
    /// Every request received, including 429s and faults.
    pub requests: u64,
    pub by_path: BTreeMap<String, u64>,
    pub status_counts: BTreeMap<u16, u64>,
    /// 429s the limiter produced (`rate_limit_exceeded`), not injected ones.
    pub rate_limited: u64,
    /// Requests whose handler or response body was dropped before completion: the client went
    /// away.
    pub cancelled: u64,
    /// Streams that sent their last event.
    pub completed_streams: u64,
    pub in_flight: u64,
    /// The last [`RECEIVED_CAPACITY`] requests, oldest first.
    pub received: Vec<Received>,
}

/// One request as received. The `authorization` header's value is redacted: keys are never
/// echoed; `org` tells keys apart.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body_bytes: u64,
    pub org: String,
    pub model: Option<String>,
}

#[derive(Debug, Default)]
struct Counters {
    stats: Stats,
    received: VecDeque<Received>,
}

/// The shared, mutex-guarded counters. Every critical section is a few increments.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    counters: Mutex<Counters>,
}

impl Recorder {
    /// Counts a request arriving; the returned guard counts how it ends.
    pub(crate) fn begin(self: &Arc<Self>, path: &str) -> InFlight {
        let mut counters = self.lock();
        let stats = &mut counters.stats;
        stats.requests += 1;
        stats.in_flight += 1;
        match stats.by_path.get_mut(path) {
            Some(count) => *count += 1,
            None => {
                stats.by_path.insert(path.to_owned(), 1);
            }
        }
        InFlight {
            recorder: Arc::clone(self),
            finished: false,
        }
    }

    pub(crate) fn received(&self, received: Received) {
        let mut counters = self.lock();
        if counters.received.len() >= RECEIVED_CAPACITY {
            counters.received.pop_front();
        }
        counters.received.push_back(received);
    }

    pub(crate) fn status(&self, status: u16) {
        *self.lock().stats.status_counts.entry(status).or_insert(0) += 1;
    }

    pub(crate) fn rate_limited(&self) {
        self.lock().stats.rate_limited += 1;
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let counters = self.lock();
        Stats {
            received: counters.received.iter().cloned().collect(),
            ..counters.stats.clone()
        }
    }

    /// Forgets everything except the requests still in flight, whose guards will decrement.
    pub(crate) fn reset(&self) {
        let mut counters = self.lock();
        let in_flight = counters.stats.in_flight;
        *counters = Counters::default();
        counters.stats.in_flight = in_flight;
    }

    fn lock(&self) -> MutexGuard<'_, Counters> {
        // Counters stay meaningful after a panicking test thread; keep serving.
        self.counters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Held by a request from arrival until its response is complete. Dropped unfinished, it counts
/// the request as cancelled: that is how a client going away shows up (hyper drops the handler
/// future or the response body).
#[derive(Debug)]
#[must_use = "dropping an unfinished request counts it as cancelled"]
pub(crate) struct InFlight {
    recorder: Arc<Recorder>,
    finished: bool,
}

impl InFlight {
    /// The response was handed over in full.
    pub(crate) fn complete(mut self) {
        self.finished = true;
    }

    /// A stream sent its last event.
    pub(crate) fn complete_stream(mut self) {
        self.finished = true;
        self.recorder.lock().stats.completed_streams += 1;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut counters = self.recorder.lock();
        let stats = &mut counters.stats;
        stats.in_flight = stats.in_flight.saturating_sub(1);
        if !self.finished {
            stats.cancelled += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(n: usize) -> Received {
        Received {
            method: "POST".into(),
            path: format!("/{n}"),
            query: None,
            headers: Vec::new(),
            body_bytes: 0,
            org: "org-x".into(),
            model: None,
        }
    }

    #[test]
    fn counts_lifecycles() {
        let recorder = Arc::new(Recorder::default());
        let a = recorder.begin("/v1/a");
        let b = recorder.begin("/v1/a");
        let c = recorder.begin("/v1/b");
        assert_eq!(recorder.snapshot().in_flight, 3);
        a.complete();
        b.complete_stream();
        drop(c);
        let stats = recorder.snapshot();
        assert_eq!(stats.requests, 3);
        assert_eq!(stats.in_flight, 0);
        assert_eq!(stats.cancelled, 1);
        assert_eq!(stats.completed_streams, 1);
        assert_eq!(stats.by_path.get("/v1/a"), Some(&2));
    }

    #[test]
    fn received_is_a_bounded_ring() {
        let recorder = Recorder::default();
        for n in 0..RECEIVED_CAPACITY + 5 {
            recorder.received(received(n));
        }
        let stats = recorder.snapshot();
        assert_eq!(stats.received.len(), RECEIVED_CAPACITY);
        assert_eq!(stats.received.first().map(|r| r.path.as_str()), Some("/5"));
    }
}
