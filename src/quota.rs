//! Orgs out of quota. A quota or billing 429 (`insufficient_quota` and its kin) never clears
//! by retrying, so for a cool-down after one, the org's requests are answered with the same
//! error at once, without calling the upstream. With a shared store, every replica cools the
//! org down: one replica's quota error reaches the others with their next heartbeat.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use tokio::time::Instant;

use crate::limiter::store::{HeardQuota, Store};

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
    /// Where the other replicas hear of a cool-down.
    store: Option<Arc<Store>>,
}

impl Exhausted {
    /// Cool-downs shared through `store`, when there is one.
    pub(crate) fn new(store: Option<Arc<Store>>) -> Self {
        Self {
            store,
            ..Self::default()
        }
    }

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
        if let (Some(store), Ok(runtime)) = (&self.store, tokio::runtime::Handle::try_current()) {
            let store = Arc::clone(store);
            let (org, body) = (Arc::clone(org), body.clone());
            runtime.spawn(async move {
                if let Err(err) = store.quota(&org, cooldown, status, &body).await {
                    tracing::debug!(error = ?err, "sharing the quota cool-down failed");
                }
            });
        }
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

    /// Another replica put an org in cool-down (see [`HeardQuota`]). A longer cool-down
    /// already here stands.
    pub(crate) fn heard(&self, heard: HeardQuota) {
        let HeardQuota {
            org,
            status,
            body,
            until,
        } = heard;
        let org = org.as_str();
        let left = until.saturating_duration_since(Instant::now());
        let mut orgs = self.lock();
        // This replica's own cool-down comes back from the store too, a moment later.
        if orgs
            .get(org)
            .is_some_and(|error| error.until + Duration::from_secs(1) >= until)
        {
            return;
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert("x-should-retry", HeaderValue::from_static("false"));
        if !orgs.contains_key(org) {
            tracing::warn!(
                org,
                cooldown_secs = left.as_secs_f64(),
                "another replica found the upstream quota exhausted; answering this org's \
                 requests from the cool-down"
            );
        }
        orgs.insert(
            Arc::from(org),
            QuotaError {
                status,
                headers,
                body,
                until,
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
