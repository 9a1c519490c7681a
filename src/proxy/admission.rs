//! Metering: a request's tokens estimated with a real tokenizer, and its wait for budget in
//! its (org, model) bucket, bounded by its deadline, the drain, and its client leaving.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::HeaderMap;
use tokio::time::Instant;

use crate::access::AccessRecord;
use crate::client::ClientWatch;
use crate::config::{Accounting, QueueConfig};
use crate::endpoint::Endpoint;
use crate::error::ProxyError;
use crate::estimate::{estimate, Estimate};
use crate::limiter::bucket::Cost;
use crate::limiter::{Charged, Reservation};
use crate::state::{AppState, Live};
use crate::upstream::usage::request_stream_usage;

use super::Asked;

/// Bodies above this size are estimated on the blocking pool, so tokenizing a large prompt
/// never stalls the requests sharing this worker thread.
const BLOCKING_ESTIMATE_BYTES: usize = 64 * 1024;

/// A request body on its way upstream.
pub(super) enum RequestBody {
    /// Read whole: an estimated endpoint's JSON. It can be sent again.
    Read(Bytes),
    /// Streamed through as it arrives: uploads, audio, everything else. Sent once.
    Streaming(Body),
}

impl RequestBody {
    /// Read whole (and so can be sent again).
    pub(super) fn is_read(&self) -> bool {
        matches!(self, Self::Read(_))
    }
}

/// What admission decided for a request that spends budget.
pub(super) struct Admission {
    pub reservation: Reservation,
    pub charged: Charged,
    /// How the upstream counts the request (from the configuration it was admitted under).
    pub accounting: Accounting,
    /// sluice asked the upstream for stream usage itself and must hide that chunk.
    pub strip_usage_chunk: bool,
}

/// What metering made of a request: its body (rewritten when sluice must ask for stream
/// usage), its admission, and the tokens it was estimated at.
pub(super) struct Metered {
    pub body: RequestBody,
    pub admission: Option<Admission>,
    pub estimated_tokens: Option<u64>,
}

/// Estimates a request a bucket may meter (its org has limits, or unknown limits are learned
/// from the upstream) and waits for its admission. Other requests pass as they are.
pub(super) async fn meter(
    state: &AppState,
    asked: &Asked<'_>,
    body: RequestBody,
    watch: &mut Option<ClientWatch>,
    record: &mut AccessRecord,
) -> Result<Metered, ProxyError> {
    let metered = asked.live.config.upstream.learn_limits
        || asked
            .identity
            .config
            .as_ref()
            .is_some_and(|org| !org.limits.is_empty());
    let bytes = match &body {
        RequestBody::Read(bytes) if metered => bytes.clone(),
        _ => {
            return Ok(Metered {
                body,
                admission: None,
                estimated_tokens: None,
            })
        }
    };
    let estimate = estimate_cost(state, asked.live, asked.endpoint, &bytes).await?;
    record.estimate(
        &estimate.model,
        estimate.prompt_tokens,
        estimate.output_tokens,
    );
    let estimated_tokens = Some(estimate.total());
    let Some(mut admitted) = admit(state, asked, &estimate, watch, record).await? else {
        return Ok(Metered {
            body,
            admission: None,
            estimated_tokens,
        });
    };
    // Without usage in the stream the reservation could not be settled: ask for it, and
    // hide the extra chunk from a client that did not.
    let mut body = body;
    if estimate.stream
        && !estimate.include_usage
        && matches!(
            asked.endpoint,
            Endpoint::ChatCompletions | Endpoint::Completions
        )
    {
        if let Some(rewritten) = request_stream_usage(&bytes) {
            body = RequestBody::Read(Bytes::from(rewritten));
            admitted.strip_usage_chunk = true;
        }
    }
    Ok(Metered {
        body,
        admission: Some(admitted),
        estimated_tokens,
    })
}

/// Estimates the request's tokens; large bodies go to the blocking pool.
async fn estimate_cost(
    state: &AppState,
    live: &Live,
    endpoint: Endpoint,
    body: &Bytes,
) -> Result<Estimate, ProxyError> {
    let defaults = &live.output_defaults;
    if body.len() < BLOCKING_ESTIMATE_BYTES {
        return estimate(&state.tokenizers, endpoint, body, defaults)
            .map_err(ProxyError::InvalidBody);
    }
    let tokenizers = Arc::clone(&state.tokenizers);
    let defaults = defaults.clone();
    let body = body.clone();
    tokio::task::spawn_blocking(move || estimate(&tokenizers, endpoint, &body, &defaults))
        .await
        .map_err(|err| ProxyError::Internal(format!("estimation task failed: {err}")))?
        .map_err(ProxyError::InvalidBody)
}

/// Waits for the budget of a request in its (org, model) bucket. `None` when no bucket meters
/// it (no limits configured and none to learn).
async fn admit(
    state: &AppState,
    asked: &Asked<'_>,
    estimate: &Estimate,
    watch: &mut Option<ClientWatch>,
    record: &mut AccessRecord,
) -> Result<Option<Admission>, ProxyError> {
    let Asked {
        live,
        identity,
        deadline,
        ..
    } = *asked;
    let limits = identity
        .config
        .as_ref()
        .and_then(|org| org.limits_for(&estimate.model))
        .unwrap_or_default();
    let cost = Cost::request(estimate.total());
    let admitting = state.limiter.admit(
        &identity.org,
        &estimate.model,
        limits,
        live.generation,
        live.config.upstream.learn_limits,
        cost,
        identity.priority,
        deadline,
    );
    // Once sluice drains, a request that cannot go at once is answered now, while its client
    // can still retry it against another replica, instead of being cut at the drain's end.
    let admitted = tokio::select! {
        biased;
        admitted = unless_left(watch, admitting) => admitted?,
        () = state.drained() => return Err(ProxyError::ShuttingDown),
    };
    let reservation = admitted.map_err(|rejection| ProxyError::Rejected {
        org: identity.org.to_string(),
        model: estimate.model.clone(),
        rejection,
    })?;
    let Some(reservation) = reservation else {
        return Ok(None);
    };
    record.queued(reservation.waited);
    Ok(Some(Admission {
        reservation,
        charged: Charged {
            prompt_tokens: estimate.prompt_tokens,
            output_tokens: estimate.output_tokens,
            output_capped: estimate.output_capped,
        },
        accounting: live.config.upstream.accounting,
        strip_usage_chunk: false,
    }))
}

/// Runs `wait` (for admission, a replay, a backoff, the upstream's answer) unless the client
/// leaves first, which ends the wait with [`ProxyError::ClientGone`] (see [`crate::client`]).
pub(super) async fn unless_left<T>(
    watch: &mut Option<ClientWatch>,
    wait: impl Future<Output = T>,
) -> Result<T, ProxyError> {
    let Some(watch) = watch else {
        return Ok(wait.await);
    };
    tokio::select! {
        biased;
        done = wait => Ok(done),
        () = watch.left() => Err(ProxyError::ClientGone),
    }
}

/// The latest moment a request may still be admitted: the smallest of sluice's maximum
/// wait, the request's own `x-sluice-max-wait`, and the client's own timeout (as the
/// official SDKs announce it) less a margin.
pub(crate) fn deadline(headers: &HeaderMap, queue: &QueueConfig, now: Instant) -> Instant {
    let mut wait = queue.max_wait;
    if let Some(requested) = header_seconds(headers, "x-sluice-max-wait") {
        wait = wait.min(requested);
    }
    for name in ["x-stainless-read-timeout", "x-stainless-timeout"] {
        if let Some(client) = header_seconds(headers, name) {
            wait = wait.min(client.saturating_sub(queue.client_timeout_margin));
        }
    }
    now + wait
}

/// A non-negative number of seconds from a header; `None` when absent or malformed.
fn header_seconds(headers: &HeaderMap, name: &str) -> Option<Duration> {
    let seconds: f64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(86_400.0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn queue_config() -> QueueConfig {
        QueueConfig {
            max_wait: Duration::from_secs(60),
            max_depth: 10,
            max_depth_per_bucket: 10,
            interactive_reserve: 0.2,
            client_timeout_margin: Duration::from_secs(2),
            refill_margin: Duration::ZERO,
            relearn_interval: Duration::from_secs(60),
            max_buckets: 10_000,
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn deadline_is_the_smallest_bound() {
        let now = Instant::now();
        let config = queue_config();
        assert_eq!(
            deadline(&HeaderMap::new(), &config, now),
            now + Duration::from_secs(60)
        );
        assert_eq!(
            deadline(&headers(&[("x-sluice-max-wait", "2.5")]), &config, now),
            now + Duration::from_millis(2500)
        );
        assert_eq!(
            deadline(
                &headers(&[("x-stainless-read-timeout", "10")]),
                &config,
                now
            ),
            now + Duration::from_secs(8)
        );
        assert_eq!(
            deadline(
                &headers(&[("x-stainless-timeout", "600"), ("x-sluice-max-wait", "30")]),
                &config,
                now
            ),
            now + Duration::from_secs(30)
        );
        // A client timeout shorter than the margin leaves no time to queue.
        assert_eq!(
            deadline(&headers(&[("x-stainless-read-timeout", "1")]), &config, now),
            now
        );
        // Garbage is ignored, never trusted.
        assert_eq!(
            deadline(
                &headers(&[("x-sluice-max-wait", "-3"), ("x-stainless-timeout", "NaN")]),
                &config,
                now
            ),
            now + Duration::from_secs(60)
        );
    }
}
