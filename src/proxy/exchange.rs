//! The exchange with the upstream: a request sent, and sent again while the upstream's
//! answer says a later attempt can succeed ([`crate::retry::decide`]) and its deadline allows.
//! Only a request that never reached the upstream is retried after a broken connection.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use http_body_util::{BodyExt, Either, Full, Limited};
use tokio::time::Instant;

use crate::access::AccessRecord;
use crate::client::ClientWatch;
use crate::config::Config;
use crate::error::ProxyError;
use crate::retry::{self, Class, Decision, Draws, ErrorBody, RetryReason};
use crate::state::AppState;
use crate::upstream::ratelimit::{Family, RateLimitHeaders};
use crate::upstream::{strip_hop_by_hop, SendError, TimedBody};

use super::admission::{unless_left, Admission, RequestBody};

/// Error bodies (429, 5xx) are read whole to classify them; real ones are a few hundred bytes.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The answer that goes back to the client.
pub(super) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Either<TimedBody, Full<Bytes>>,
}

impl Answer {
    /// The upstream's response, its body still streaming.
    fn streaming(response: http::Response<TimedBody>) -> Self {
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Self {
            status: parts.status,
            headers: parts.headers,
            body: Either::Left(body),
        }
    }

    pub(super) fn buffered(status: StatusCode, headers: HeaderMap, body: Bytes) -> Self {
        Self {
            status,
            headers,
            body: Either::Right(Full::new(body)),
        }
    }
}

/// An upstream error response, read whole.
struct UpstreamError {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    parsed: Option<ErrorBody>,
}

/// One request's conversation with the upstream: sent, and sent again while the upstream's
/// answer says a later attempt can succeed and the request's deadline allows.
pub(super) struct Exchange<'a> {
    pub state: &'a AppState,
    pub config: &'a Config,
    pub org: &'a Arc<str>,
    pub method: Method,
    /// The upstream's URL for the request's path and query.
    pub uri: Uri,
    pub headers: HeaderMap,
    /// `None` once a streamed body has been sent (it cannot be sent again).
    pub body: Option<RequestBody>,
    pub deadline: Instant,
    pub estimated_tokens: Option<u64>,
    /// Attempts made so far.
    pub attempt: u32,
}

impl Exchange<'_> {
    pub(super) fn resendable(&self) -> bool {
        matches!(self.body, Some(RequestBody::Read(_)))
    }

    pub(super) async fn run(
        &mut self,
        admission: &mut Option<Admission>,
        watch: &mut Option<ClientWatch>,
        record: &mut AccessRecord,
    ) -> Result<Answer, ProxyError> {
        loop {
            // A client that leaves before the answer's head cancels the upstream request: that
            // is what stops the provider generating (and billing) an answer nobody reads.
            let sent = unless_left(watch, self.send(admission, record)).await?;
            let response = match sent {
                Ok(response) => response,
                Err(err) => {
                    // No response came back. Only a request that never reached the upstream
                    // (refused connection, a pooled connection found closed before the write)
                    // goes again: one that broke after it was written may have run.
                    if err.retriable() {
                        let now = Instant::now();
                        let attempt = self.attempt_state(admission);
                        let config = &self.config.retry;
                        let wait = retry::retry_wait(None, &attempt, config, Draws::random(), now)
                            .filter(|_| self.state.retry_budget.try_withdraw(now));
                        if let Some(wait) = wait {
                            record.retried(RetryReason::Connection);
                            tracing::info!(
                                attempt = self.attempt,
                                wait_ms = wait.as_millis() as u64,
                                error = %err,
                                "upstream connection failed; retrying"
                            );
                            unless_left(watch, tokio::time::sleep(wait)).await?;
                            continue;
                        }
                    }
                    // A refused connection never reached the upstream: give the budget back.
                    if err.unsent() {
                        if let Some(admitted) = admission.take() {
                            admitted.reservation.refund();
                        }
                    }
                    return Err(ProxyError::from_upstream(err));
                }
            };
            record.upstream_headers();
            let limits = RateLimitHeaders::parse(response.headers());
            if limits.malformed() > 0 {
                self.state
                    .metrics
                    .header_errors
                    .inc_by(u64::from(limits.malformed()));
                tracing::debug!(
                    count = limits.malformed(),
                    "ignored malformed x-ratelimit-* headers"
                );
            }
            if let Some(admitted) = admission.as_mut() {
                admitted.reservation.observe(&limits);
            }
            let status = response.status();
            if status != StatusCode::TOO_MANY_REQUESTS && !status.is_server_error() {
                if let Some(admitted) = admission.as_mut() {
                    admitted.reservation.answered();
                }
                let mut answer = Answer::streaming(response);
                // A JSON (or other whole) body that fails before its first byte still gets a
                // 502 the client can read; an event stream is not held back (its first event
                // may take long), and a break there ends with an error event instead.
                if !is_event_stream(&answer.headers) {
                    if let Either::Left(body) = &mut answer.body {
                        unless_left(watch, body.prefetch()).await?.map_err(|err| {
                            ProxyError::UpstreamFailed(format!(
                                "the response body failed before its first byte: {err}"
                            ))
                        })?;
                    }
                }
                return Ok(answer);
            }
            let error = read_error(response).await;
            let token_limit = limits.get(Family::Tokens).and_then(|window| window.limit);
            let class = retry::classify(
                status.as_u16(),
                error.parsed.as_ref(),
                self.estimated_tokens,
                token_limit,
            );
            if status == StatusCode::TOO_MANY_REQUESTS {
                record.upstream_429(class.reason());
            }
            // A server error or a fatal one is an answer: the bucket's probe, if this was
            // one, has its outcome.
            if matches!(class, Class::Overloaded | Class::ServerError | Class::Fatal) {
                if let Some(admitted) = admission.as_mut() {
                    admitted.reservation.answered();
                }
            }
            let hinted = match class {
                Class::RateLimited(_) | Class::SlowDown => admission.is_some(),
                Class::Overloaded | Class::ServerError => true,
                Class::Quota | Class::TooLarge | Class::Fatal => false,
            };
            let failure = retry::Failure {
                class,
                hint: if hinted {
                    self.wait_hint(class, &error, &limits)
                } else {
                    None
                },
                limits: &limits,
                error: error.parsed.as_ref(),
            };
            let now = Instant::now();
            let attempt = self.attempt_state(admission);
            match retry::decide(&failure, &attempt, &self.config.retry, Draws::random(), now) {
                Decision::Pause(pause) => {
                    let Some(admitted) = admission.as_mut() else {
                        return Ok(Answer::buffered(error.status, error.headers, error.body));
                    };
                    let opened = admitted.reservation.rate_limited(
                        pause.resume,
                        pause.reset,
                        pause.evidence,
                        class.reason(),
                    );
                    tracing::info!(
                        org = %self.org,
                        reason = class.label(),
                        attempt = self.attempt,
                        wait_ms = pause.wait.as_millis() as u64,
                        hint = pause.source.unwrap_or(retry::HintSource::Backoff).label(),
                        circuit_opened = opened,
                        "upstream 429; pausing the bucket and replaying"
                    );
                    if !pause.replay {
                        let wait = pause.resume.saturating_duration_since(now);
                        return Ok(honest_429(&error, wait));
                    }
                    let replayed = admitted.reservation.replay(self.deadline);
                    match unless_left(watch, replayed).await? {
                        Ok(()) => {
                            record.retried(RetryReason::RateLimit);
                            continue;
                        }
                        Err(wait) => return Ok(honest_429(&error, wait)),
                    }
                }
                Decision::Retry(wait) if self.state.retry_budget.try_withdraw(now) => {
                    record.retried(RetryReason::ServerError);
                    tracing::info!(
                        status = status.as_u16(),
                        attempt = self.attempt,
                        wait_ms = wait.as_millis() as u64,
                        "upstream failed; retrying"
                    );
                    unless_left(watch, tokio::time::sleep(wait)).await?;
                    continue;
                }
                Decision::Retry(_) | Decision::Answer => {
                    return Ok(Answer::buffered(error.status, error.headers, error.body));
                }
                Decision::Refuse => {
                    let mut headers = error.headers;
                    headers.insert("x-should-retry", HeaderValue::from_static("false"));
                    return Ok(Answer::buffered(error.status, headers, error.body));
                }
                Decision::CoolDown => {
                    tracing::warn!(
                        org = %self.org,
                        code = error.parsed.as_ref().and_then(|e| e.code.as_deref()).unwrap_or(""),
                        cooldown_secs = self.config.retry.quota_cooldown.as_secs_f64(),
                        "upstream quota exhausted; answering this org's requests from the cool-down"
                    );
                    let mut headers = error.headers;
                    headers.insert("x-should-retry", HeaderValue::from_static("false"));
                    self.state.exhausted.mark(
                        self.org,
                        error.status,
                        headers.clone(),
                        error.body.clone(),
                        self.config.retry.quota_cooldown,
                        now,
                    );
                    return Ok(Answer::buffered(error.status, headers, error.body));
                }
            }
        }
    }

    /// Sends the request once more.
    async fn send(
        &mut self,
        admission: &mut Option<Admission>,
        record: &mut AccessRecord,
    ) -> Result<http::Response<TimedBody>, SendError> {
        self.attempt += 1;
        let body = match self.body.take() {
            Some(RequestBody::Read(bytes)) => {
                self.body = Some(RequestBody::Read(bytes.clone()));
                Body::from(bytes)
            }
            Some(RequestBody::Streaming(body)) => body,
            None => Body::empty(),
        };
        let headers = if self.resendable() {
            self.headers.clone()
        } else {
            std::mem::take(&mut self.headers)
        };
        let mut request = http::Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = headers;
        let pending = self.state.upstream.send(request);
        record.upstream_sent();
        // From here the provider may count the request, even if the client goes away
        // meanwhile (dropping this future, and the upstream request with it).
        if let Some(admitted) = admission.as_mut() {
            admitted.reservation.dispatch();
        }
        pending.await
    }

    /// The upstream's wait hint for an error response ([`retry::wait_hint`]); hints too long
    /// to be meant are counted as malformed headers and ignored.
    fn wait_hint(
        &self,
        class: Class,
        error: &UpstreamError,
        limits: &RateLimitHeaders,
    ) -> Option<(Duration, retry::HintSource)> {
        let now = SystemTime::now();
        let parsed = error.parsed.as_ref();
        let implausible = retry::implausible_hints(class, &error.headers, limits, parsed, now);
        if implausible > 0 {
            self.state
                .metrics
                .header_errors
                .inc_by(u64::from(implausible));
            tracing::warn!(
                org = %self.org,
                count = implausible,
                max_secs = retry::PLAUSIBLE_WAIT.as_secs(),
                "ignored upstream wait hints longer than any limit window"
            );
        }
        retry::wait_hint(class, &error.headers, limits, parsed, now)
    }

    /// Where the request stands, for the retry decision.
    fn attempt_state(&self, admission: &Option<Admission>) -> retry::Attempt {
        retry::Attempt {
            made: self.attempt,
            max: self.config.retry.max_attempts,
            resendable: self.resendable(),
            metered: admission
                .as_ref()
                .map(|admitted| admitted.reservation.cost()),
            deadline: self.deadline,
        }
    }
}

/// The upstream's 429, with the wait sluice knows it implies: the client's SDK sleeps exactly
/// what `retry-after-ms` says.
fn honest_429(error: &UpstreamError, wait: Duration) -> Answer {
    let mut headers = error.headers.clone();
    let millis = wait.as_millis().max(1) as u64;
    headers.insert("retry-after-ms", HeaderValue::from(millis));
    headers.insert("retry-after", HeaderValue::from(millis.div_ceil(1000)));
    Answer::buffered(error.status, headers, error.body.clone())
}

/// Reads an upstream error response whole (bounded) to classify it.
async fn read_error(response: http::Response<TimedBody>) -> UpstreamError {
    let (parts, body) = response.into_parts();
    let status = parts.status;
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    let body = match Limited::new(body, MAX_ERROR_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) => {
            tracing::debug!(error = %err, "could not read the upstream's error body");
            Bytes::new()
        }
    };
    let parsed = retry::parse_error_body(&body);
    UpstreamError {
        status,
        headers,
        body,
        parsed,
    }
}

pub(super) fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/event-stream"))
}
