//! The request lifecycle, top to bottom:
//! route -> read the body -> identify the org -> estimate -> admit (queue) -> forward
//! upstream -> relay the response -> settle the reservation and record.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::time::Instant;

use crate::access::AccessRecord;
use crate::config::{Accounting, QueueConfig};
use crate::endpoint::Endpoint;
use crate::error::ProxyError;
use crate::estimate::{estimate, Estimate};
use crate::limiter::bucket::Cost;
use crate::limiter::{settlement, Charged, Reservation};
use crate::org::Identity;
use crate::server::AppState;
use crate::upstream::body::{BodyEnd, BodyOutcome, ObservedBody, UsageTap};
use crate::upstream::usage::{request_stream_usage, SseUsage};
use crate::upstream::{request_headers, response_headers};

/// Bodies above this size are estimated on the blocking pool, so tokenizing a large prompt
/// never stalls the requests sharing this worker thread.
const BLOCKING_ESTIMATE_BYTES: usize = 64 * 1024;

/// A request body on its way upstream.
enum RequestBody {
    /// Read whole: an estimated endpoint's JSON.
    Read(Bytes),
    /// Streamed through as it arrives: uploads, audio, everything else.
    Streaming(Body),
}

/// What admission decided for a request that spends budget.
struct Admission {
    reservation: Reservation,
    charged: Charged,
    /// sluice asked the upstream for stream usage itself and must hide that chunk.
    strip_usage_chunk: bool,
}

/// Handles every request the server has no other route for.
pub async fn proxy(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let endpoint = Endpoint::from_path(request.uri().path());
    let mut record = AccessRecord::start(
        Arc::clone(&state.metrics),
        request.method().clone(),
        request.uri().path(),
        endpoint,
    );
    let result = match endpoint {
        Some(endpoint) => forward(&state, endpoint, request, &mut record).await,
        None => Err(ProxyError::UnknownPath {
            path: request.uri().path().to_owned(),
        }),
    };
    match result {
        Ok((response, admission)) => relay(&state, endpoint, response, admission, record),
        Err(err) => reject(err, record),
    }
}

/// Reads, identifies, estimates, admits, and sends the request upstream.
async fn forward(
    state: &AppState,
    endpoint: Endpoint,
    request: Request,
    record: &mut AccessRecord,
) -> Result<(reqwest::Response, Option<Admission>), ProxyError> {
    let (parts, body) = request.into_parts();
    let mut body = read_body(
        endpoint,
        &parts.headers,
        body,
        state.config.server.max_body_bytes,
    )
    .await?;
    let identity = state.orgs.identify(&parts.headers);
    record.identity(&identity.org, identity.priority);

    let mut admission = None;
    // Only a request that spends from a limited bucket is estimated: an org without limits
    // (or a key no org lists) has nothing to charge.
    let limited = identity
        .config
        .as_ref()
        .is_some_and(|org| !org.limits.is_empty());
    if let (RequestBody::Read(bytes), true) = (&body, limited) {
        let estimate = estimate_cost(state, endpoint, bytes).await?;
        record.estimate(
            &estimate.model,
            estimate.prompt_tokens,
            estimate.output_tokens,
        );
        if let Some(mut admitted) =
            admit(state, &identity, &estimate, &parts.headers, record).await?
        {
            // Without usage in the stream the reservation could not be settled: ask for it,
            // and hide the extra chunk from a client that did not.
            if estimate.stream
                && !estimate.include_usage
                && matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions)
            {
                if let Some(rewritten) = request_stream_usage(bytes) {
                    body = RequestBody::Read(Bytes::from(rewritten));
                    admitted.strip_usage_chunk = true;
                }
            }
            admission = Some(admitted);
        }
    }

    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path(), |pq| pq.as_str());
    let read_whole = matches!(body, RequestBody::Read(_));
    let mut headers = request_headers(&parts.headers, read_whole);
    if read_whole {
        // sluice reads these responses for their usage; compressed bytes would hide it. The
        // client still gets exactly what the upstream sent.
        headers.remove(header::ACCEPT_ENCODING);
    }
    let upstream_body = match body {
        RequestBody::Read(bytes) => reqwest::Body::from(bytes),
        RequestBody::Streaming(body) => reqwest::Body::wrap_stream(body.into_data_stream()),
    };
    let pending = state
        .upstream
        .request(parts.method, path_and_query)
        .headers(headers)
        .body(upstream_body)
        .send();
    record.upstream_sent();
    // From here the provider may count the request, even if the client goes away meanwhile
    // (dropping this future, and the upstream request with it).
    if let Some(admitted) = &mut admission {
        admitted.reservation.reached_upstream();
    }
    let response = match pending.await {
        Ok(response) => response,
        Err(err) => {
            // A refused connection never reached the upstream: give the budget back. Any
            // other failure may have been counted there, so it stays spent.
            if err.is_connect() {
                if let Some(admitted) = admission {
                    admitted.reservation.refund();
                }
            }
            return Err(ProxyError::from_upstream(&err));
        }
    };
    record.upstream_headers();
    Ok((response, admission))
}

async fn read_body(
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<RequestBody, ProxyError> {
    if !endpoint.reads_body() {
        return Ok(RequestBody::Streaming(body));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(RequestBody::Read(collected.to_bytes())),
        Err(err) if err.is::<LengthLimitError>() => Err(ProxyError::BodyTooLarge { limit }),
        Err(err) => Err(ProxyError::BodyRead(err.to_string())),
    }
}

/// Estimates the request's tokens; large bodies go to the blocking pool.
async fn estimate_cost(
    state: &AppState,
    endpoint: Endpoint,
    body: &Bytes,
) -> Result<Estimate, ProxyError> {
    let defaults = &state.output_defaults;
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

/// Waits for the budget of a request whose org has limits for its model. `None` when nothing
/// limits it (no org config, or no limits for that model).
async fn admit(
    state: &AppState,
    identity: &Identity,
    estimate: &Estimate,
    headers: &HeaderMap,
    record: &mut AccessRecord,
) -> Result<Option<Admission>, ProxyError> {
    let Some(limits) = identity
        .config
        .as_ref()
        .and_then(|org| org.limits_for(&estimate.model))
    else {
        return Ok(None);
    };
    let cost = Cost::request(estimate.total());
    let deadline = deadline(headers, &state.config.queue, Instant::now());
    let reservation = state
        .limiter
        .admit(
            &identity.org,
            &estimate.model,
            limits,
            cost,
            identity.priority,
            deadline,
        )
        .await
        .map_err(|rejection| ProxyError::Rejected {
            org: identity.org.to_string(),
            model: estimate.model.clone(),
            rejection,
        })?;
    record.queued(reservation.waited);
    Ok(Some(Admission {
        reservation,
        charged: Charged {
            prompt_tokens: estimate.prompt_tokens,
            output_tokens: estimate.output_tokens,
            output_capped: estimate.output_capped,
        },
        strip_usage_chunk: false,
    }))
}

/// The latest moment a request may still be admitted: the smallest of sluice's maximum
/// wait, the request's own `x-sluice-max-wait`, and the client's own timeout (as the
/// official SDKs announce it) less a margin.
pub fn deadline(headers: &HeaderMap, queue: &QueueConfig, now: Instant) -> Instant {
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

/// Sends the upstream's status, headers and body bytes to the client unchanged, the body
/// chunk by chunk as it arrives. When the body ends (or is dropped) the reservation is
/// settled against the usage it reported, and the exchange is recorded.
fn relay(
    state: &AppState,
    endpoint: Option<Endpoint>,
    upstream: reqwest::Response,
    admission: Option<Admission>,
    mut record: AccessRecord,
) -> Response {
    let status = upstream.status();
    let mut headers = response_headers(upstream.headers());
    let tap = admission.as_ref().and_then(|admitted| {
        let endpoint = endpoint?;
        let is_sse = headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.starts_with("text/event-stream"));
        Some(if is_sse {
            UsageTap::Sse(SseUsage::new(endpoint, admitted.strip_usage_chunk))
        } else {
            UsageTap::json(endpoint)
        })
    });
    if let Some(admitted) = &admission {
        let queued_ms = admitted.reservation.waited.as_millis() as u64;
        headers.insert("x-sluice-queue-ms", HeaderValue::from(queued_ms));
        if tap
            .as_ref()
            .is_some_and(|tap| matches!(tap, UsageTap::Sse(_)))
        {
            // Stripping the usage chunk may change the length.
            headers.remove(header::CONTENT_LENGTH);
        }
    }
    let accounting = state.config.upstream.accounting;
    let body = ObservedBody::new(reqwest::Body::from(upstream), tap, move |end: BodyEnd| {
        let finish = move || {
            if let Some(admitted) = admission {
                settle(admitted, status, &end, accounting);
            }
            if let Some(usage) = end.usage {
                record.usage(usage.prompt_tokens, usage.completion_tokens);
            }
            let error = match end.outcome {
                BodyOutcome::Complete => None,
                BodyOutcome::Failed => Some("upstream_body_failed"),
                BodyOutcome::Cancelled => Some("client_cancelled"),
            };
            record.finish(status, end, error);
        };
        // The body reports its end while handing its last bytes to the server: settling and
        // logging in a task of their own lets those bytes leave first. Outside a runtime (it
        // is shutting down) they run here.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { finish() });
            }
            Err(_) => finish(),
        }
    });
    let mut response = Response::new(Body::new(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// The reservation's exit once the upstream has answered.
fn settle(admitted: Admission, status: StatusCode, end: &BodyEnd, accounting: Accounting) {
    let Admission {
        reservation,
        charged,
        ..
    } = admitted;
    if status == StatusCode::TOO_MANY_REQUESTS {
        // The upstream had less budget than sluice thought: keep the whole charge, so the
        // requests queued behind do not follow straight into more 429s.
        reservation.settle(0);
    } else if let Some(usage) = end.usage {
        reservation.settle(settlement(
            charged,
            usage.prompt_tokens,
            usage.completion_tokens,
            accounting,
        ));
    } else {
        // No usage seen (an error status, a broken stream): keep the estimate charged, the
        // conservative choice.
        reservation.settle(0);
    }
}

fn reject(err: ProxyError, record: AccessRecord) -> Response {
    match err.fault() {
        crate::error::Fault::Client => tracing::info!(error = %err, "request rejected"),
        _ => tracing::warn!(error = %err, "request failed"),
    }
    let status = err.status();
    let code = err.code();
    let response = err.into_response();
    let bytes = http_body::Body::size_hint(response.body())
        .exact()
        .unwrap_or(0);
    record.finish(
        status,
        BodyEnd {
            outcome: BodyOutcome::Complete,
            bytes,
            usage: None,
        },
        Some(code),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue_config() -> QueueConfig {
        QueueConfig {
            max_wait: Duration::from_secs(60),
            max_depth: 10,
            max_depth_per_bucket: 10,
            interactive_reserve: 0.2,
            client_timeout_margin: Duration::from_secs(2),
            refill_margin: Duration::ZERO,
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
