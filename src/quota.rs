//! Orgs out of quota. A quota or billing 429 (`insufficient_quota` and its kin) never clears
//! by retrying, so for a cool-down after one, the org's requests are answered with the same
//! error at once, without calling the upstream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::time::Instant;

/// The upstream's answer that put an org in cool-down, replayed to its next requests.
#[derive(Clone, Debug)]
pub struct QuotaError {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub until: Instant,
}

#[derive(Default)]
pub struct Exhausted {
    /// Whether any org is in cool-down: requests skip the lock while none is.
    any: AtomicBool,
    orgs: Mutex<HashMap<Arc<str>, QuotaError>>,
}

impl Exhausted {
    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, QuotaError>> {
        self.orgs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The error to answer `org` with, while it is in cool-down.
    pub fn check(&self, org: &Arc<str>, now: Instant) -> Option<QuotaError> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        let mut orgs = self.lock();
        match orgs.get(org) {
            Some(error) if error.until > now => Some(error.clone()),
            Some(_) => {
                orgs.remove(org);
                tracing::info!(org = %org, "quota cool-down over; forwarding again");
                self.any.store(!orgs.is_empty(), Ordering::Relaxed);
                None
            }
            None => None,
        }
    }

    /// Puts `org` in cool-down for `cooldown`, answering with `error` meanwhile.
    pub fn mark(
        &self,
        org: &Arc<str>,
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        cooldown: Duration,
        now: Instant,
    ) {
        let mut orgs = self.lock();
        orgs.insert(
            Arc::clone(org),
            QuotaError {
                status,
                headers,
                body,
                until: now + cooldown,
            },
        );
        self.any.store(true, Ordering::Relaxed);
    }

    /// Orgs in cool-down, for the status view.
    pub fn orgs(&self, now: Instant) -> Vec<(Arc<str>, Duration)> {
        if !self.any.load(Ordering::Relaxed) {
            return Vec::new();
        }
        self.lock()
            .iter()
            .filter(|(_, error)| error.until > now)
            .map(|(org, error)| (Arc::clone(org), error.until - now))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_org_is_answered_from_the_cool_down_until_it_ends() {
        let exhausted = Exhausted::default();
        let acme: Arc<str> = Arc::from("acme");
        let other: Arc<str> = Arc::from("other");
        let now = Instant::now();
        assert!(exhausted.check(&acme, now).is_none());
        exhausted.mark(
            &acme,
            StatusCode::TOO_MANY_REQUESTS,
            HeaderMap::new(),
            Bytes::from_static(b"{}"),
            Duration::from_secs(60),
            now,
        );
        let error = exhausted.check(&acme, now).expect("in cool-down");
        assert_eq!(error.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(exhausted.check(&other, now).is_none());
        assert_eq!(exhausted.orgs(now).len(), 1);
        let later = now + Duration::from_secs(60);
        assert!(exhausted.check(&acme, later).is_none());
        assert!(exhausted.orgs(later).is_empty());
    }
}
