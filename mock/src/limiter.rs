//! The buckets of every (organization, model), behind one mutex held for a few float operations.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::bucket::{BucketPair, Rejection, Snapshot};
use crate::config::{Limits, MockConfig};

#[derive(Debug)]
pub(crate) struct Limiter {
    quantum: Option<Duration>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    defaults: Limits,
    overrides: HashMap<String, Limits>,
    /// org -> model -> buckets; nested so a lookup needs no allocation.
    buckets: HashMap<String, HashMap<String, BucketPair>>,
}

impl State {
    fn limits_for(&self, model: &str) -> Limits {
        self.overrides.get(model).copied().unwrap_or(self.defaults)
    }

    fn with_bucket<R>(
        &mut self,
        org: &str,
        model: &str,
        quantum: Option<Duration>,
        now: Instant,
        f: impl FnOnce(&mut BucketPair) -> R,
    ) -> R {
        if let Some(bucket) = self.buckets.get_mut(org).and_then(|m| m.get_mut(model)) {
            return f(bucket);
        }
        let limits = self.limits_for(model);
        let bucket = self
            .buckets
            .entry(org.to_owned())
            .or_default()
            .entry(model.to_owned())
            .or_insert_with(|| BucketPair::new(limits.rpm, limits.tpm, quantum, now));
        f(bucket)
    }
}

impl Limiter {
    pub(crate) fn new(config: &MockConfig) -> Limiter {
        Limiter {
            quantum: config.quantum,
            state: Mutex::new(State {
                defaults: config.default_limits(),
                overrides: config.model_limits.clone(),
                buckets: HashMap::new(),
            }),
        }
    }

    /// Charges a request of `cost` tokens; see [`BucketPair::admit`].
    pub(crate) fn admit(
        &self,
        org: &str,
        model: &str,
        cost: u64,
        now: Instant,
    ) -> (Result<(), Rejection>, Snapshot) {
        self.lock()
            .with_bucket(org, model, self.quantum, now, |b| b.admit(cost, now))
    }

    pub(crate) fn peek(&self, org: &str, model: &str, now: Instant) -> Snapshot {
        self.lock()
            .with_bucket(org, model, self.quantum, now, |b| b.peek(now))
    }

    pub(crate) fn spend(&self, org: &str, model: &str, requests: u64, tokens: u64, now: Instant) {
        self.lock().with_bucket(org, model, self.quantum, now, |b| {
            b.spend(requests, tokens, now);
        });
    }

    /// `None` changes the default, and every existing bucket of a model without its own limits.
    pub(crate) fn set_limits(&self, model: Option<&str>, limits: Limits, now: Instant) {
        let mut state = self.lock();
        let State {
            defaults,
            overrides,
            buckets,
        } = &mut *state;
        match model {
            None => *defaults = limits,
            Some(model) => {
                overrides.insert(model.to_owned(), limits);
            }
        }
        let affected = |m: &str| match model {
            None => !overrides.contains_key(m),
            Some(model) => m == model,
        };
        for models in buckets.values_mut() {
            for (_, bucket) in models.iter_mut().filter(|(m, _)| affected(m)) {
                bucket.set_limits(limits.rpm, limits.tpm, self.quantum, now);
            }
        }
    }

    /// Forgets every bucket (they start full again); limits stay.
    pub(crate) fn reset(&self) {
        self.lock().buckets.clear();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_per_org_and_model_and_limits_apply_in_place() {
        let limiter = Limiter::new(&MockConfig {
            rpm: 10,
            tpm: 1_000,
            ..MockConfig::default()
        });
        let now = Instant::now();
        limiter.spend("org-a", "m1", 4, 0, now);
        assert_eq!(limiter.peek("org-a", "m1", now).requests.remaining, 6);
        assert_eq!(limiter.peek("org-b", "m1", now).requests.remaining, 10);
        assert_eq!(limiter.peek("org-a", "m2", now).requests.remaining, 10);

        limiter.set_limits(Some("m2"), Limits { rpm: 3, tpm: 30 }, now);
        limiter.set_limits(
            None,
            Limits {
                rpm: 20,
                tpm: 2_000,
            },
            now,
        );
        assert_eq!(limiter.peek("org-a", "m1", now).requests.remaining, 16);
        assert_eq!(limiter.peek("org-a", "m2", now).requests.limit, 3);
        assert_eq!(limiter.peek("org-c", "m3", now).tokens.limit, 2_000);

        limiter.reset();
        assert_eq!(limiter.peek("org-a", "m1", now).requests.remaining, 20);
    }
}
