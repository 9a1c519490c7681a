//! The request lifecycle, top to bottom:
//! route -> read the body -> identify the org -> estimate -> admit (queue) -> forward
//! upstream, replaying 429s and retrying failures -> relay the response -> settle the
//! reservation and record.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use http_body_util::{BodyExt, Either, Full, Limited};
use tokio::time::Instant;

use crate::access::AccessRecord;
use crate::body_budget::Held;
use crate::client::{ClientSocket, ClientWatch};
use crate::config::{Accounting, Config, QueueConfig};
use crate::endpoint::Endpoint;
use crate::error::ProxyError;
use crate::estimate::{estimate, Estimate};
use crate::limiter::bucket::Cost;
use crate::limiter::{Charged, Reservation};
use crate::org::Identity;
use crate::retry::{self, Class, Decision, Draws, ErrorBody};
use crate::state::{AppState, Live};
use crate::upstream::body::{BodyEnd, BodyOutcome, Ended, ObservedBody, UsageTap};
use crate::upstream::ratelimit::{self, RateLimitHeaders};
use crate::upstream::usage::{request_stream_usage, SseUsage};
use crate::upstream::{request_headers, strip_hop_by_hop, SendError, TimedBody};

/// Bodies above this size are estimated on the blocking pool, so tokenizing a large prompt
/// never stalls the requests sharing this worker thread.
const BLOCKING_ESTIMATE_BYTES: usize = 64 * 1024;

/// Error bodies (429, 5xx) are read whole to classify them; real ones are a few hundred bytes.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// A request body on its way upstream.
enum RequestBody {
    /// Read whole: an estimated endpoint's JSON. It can be sent again.
    Read(Bytes),
    /// Streamed through as it arrives: uploads, audio, everything else. Sent once.
    Streaming(Body),
}

/// What admission decided for a request that spends budget.
struct Admission {
    reservation: Reservation,
    charged: Charged,
    /// How the upstream counts the request (from the configuration it was admitted under).
    accounting: Accounting,
    /// sluice asked the upstream for stream usage itself and must hide that chunk.
    strip_usage_chunk: bool,
}

/// The answer that goes back to the client.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Either<TimedBody, Full<Bytes>>,
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

    fn buffered(status: StatusCode, headers: HeaderMap, body: Bytes) -> Self {
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

/// Handles every request the server has no other route for.
pub async fn proxy(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (request, endpoint) = match route(request) {
        Ok(routed) => routed,
        Err((request, err)) => {
            let record = AccessRecord::start(
                Arc::clone(&state.metrics),
                request.method().clone(),
                request.uri().path(),
                None,
            );
            return reject(err, record);
        }
    };
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
        Ok((answer, admission)) => relay(endpoint, answer, admission, record),
        Err(ProxyError::ClientGone) => {
            // Nobody reads an answer: the record logs the 499 a cancelled exchange gets.
            tracing::debug!("the client left while its request waited; dropped unsent");
            drop(record);
            ProxyError::ClientGone.into_response()
        }
        Err(err) => reject(err, record),
    }
}

/// Puts the request's path in its canonical spelling (the one that is classified, metered
/// and forwarded) and names its endpoint; `None` for a path outside `/v1/`. A path with no
/// safe canonical form is refused with the request, for the access log.
#[allow(clippy::result_large_err)]
fn route(mut request: Request) -> Result<(Request, Option<Endpoint>), (Request, ProxyError)> {
    let canonical = match crate::endpoint::normalize(request.uri().path()) {
        Ok(std::borrow::Cow::Borrowed(path)) => {
            let endpoint = Endpoint::from_path(path);
            return Ok((request, endpoint));
        }
        Ok(std::borrow::Cow::Owned(path)) => path,
        Err(reason) => {
            let err = ProxyError::InvalidPath {
                path: request.uri().path().to_owned(),
                reason,
            };
            return Err((request, err));
        }
    };
    let path_and_query = match request.uri().query() {
        Some(query) => format!("{canonical}?{query}"),
        None => canonical,
    };
    let mut parts = request.uri().clone().into_parts();
    match PathAndQuery::try_from(path_and_query) {
        Ok(path_and_query) => parts.path_and_query = Some(path_and_query),
        Err(err) => {
            let err = ProxyError::Internal(format!("normalized path is not a URI: {err}"));
            return Err((request, err));
        }
    }
    match Uri::from_parts(parts) {
        Ok(uri) => *request.uri_mut() = uri,
        Err(err) => {
            let err = ProxyError::Internal(format!("normalized path is not a URI: {err}"));
            return Err((request, err));
        }
    }
    let endpoint = Endpoint::from_path(request.uri().path());
    Ok((request, endpoint))
}

/// Reads, identifies, estimates, admits, and sends the request upstream until it has an
/// answer worth relaying.
async fn forward(
    state: &AppState,
    endpoint: Endpoint,
    request: Request,
    record: &mut AccessRecord,
) -> Result<(Answer, Option<Admission>), ProxyError> {
    let (parts, body) = request.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let uri = state
        .upstream
        .uri(&path_and_query)
        .map_err(|err| ProxyError::Internal(format!("no upstream URL for the request: {err}")))?;
    // This request runs under the configuration in force now, whatever a reload does later.
    let live = state.live();
    // Who is asking is known from the headers alone: a client without a valid token is
    // refused before sluice reads (and holds) a byte of its body.
    let identity = live
        .orgs
        .authenticate(&parts.headers)
        .map_err(|_| ProxyError::Unauthenticated)?;
    record.identity(&identity.org, identity.priority);
    if let Some(error) = state.exhausted.check(&identity.org, Instant::now()) {
        tracing::debug!(org = %identity.org, "org in quota cool-down; answered without calling upstream");
        return Ok((
            Answer::buffered(error.status, error.headers, error.body),
            None,
        ));
    }
    // Held until the exchange is over: the body's bytes live that long.
    let (mut body, _held) = read_body(state, endpoint, &parts.headers, body, &live.config).await?;
    // Read whole: from here on, a client that leaves while its request waits is noticed.
    let mut watch = parts
        .extensions
        .get::<ClientSocket>()
        .map(ClientSocket::watch);

    let deadline = deadline(&parts.headers, &live.config.queue, Instant::now());
    let mut admission = None;
    let mut estimated_tokens = None;
    // A request is estimated when a bucket may meter it: its org has limits, or unknown
    // limits are learned from the upstream.
    let metered = live.config.upstream.learn_limits
        || identity
            .config
            .as_ref()
            .is_some_and(|org| !org.limits.is_empty());
    if let (RequestBody::Read(bytes), true) = (&body, metered) {
        let estimate = estimate_cost(state, &live, endpoint, bytes).await?;
        record.estimate(
            &estimate.model,
            estimate.prompt_tokens,
            estimate.output_tokens,
        );
        estimated_tokens = Some(estimate.total());
        if let Some(mut admitted) = admit(
            state, &live, &identity, &estimate, deadline, &mut watch, record,
        )
        .await?
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

    let read_whole = matches!(body, RequestBody::Read(_));
    let mut headers = request_headers(&parts.headers, read_whole);
    if let Some(key) = &identity.upstream_key {
        // The client's token stays here; the upstream sees only the org's own key.
        headers.insert(header::AUTHORIZATION, key.0.clone());
        headers.remove("api-key");
    }
    if read_whole {
        // sluice reads these responses for their usage; compressed bytes would hide it. The
        // client still gets exactly what the upstream sent.
        headers.remove(header::ACCEPT_ENCODING);
    }
    let mut exchange = Exchange {
        state,
        config: &live.config,
        org: &identity.org,
        method: parts.method,
        uri,
        headers,
        body: Some(body),
        deadline,
        estimated_tokens,
        attempt: 0,
    };
    if exchange.resendable() {
        state.retry_budget.deposit(Instant::now());
    }
    let answer = exchange.run(&mut admission, &mut watch, record).await?;
    Ok((answer, admission))
}

/// One request's conversation with the upstream: sent, and sent again while the upstream's
/// answer says a later attempt can succeed and the request's deadline allows.
struct Exchange<'a> {
    state: &'a AppState,
    config: &'a Config,
    org: &'a Arc<str>,
    method: Method,
    /// The upstream's URL for the request's path and query.
    uri: Uri,
    headers: HeaderMap,
    /// `None` once a streamed body has been sent (it cannot be sent again).
    body: Option<RequestBody>,
    deadline: Instant,
    estimated_tokens: Option<u64>,
    /// Attempts made so far.
    attempt: u32,
}

impl Exchange<'_> {
    fn resendable(&self) -> bool {
        matches!(self.body, Some(RequestBody::Read(_)))
    }

    async fn run(
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
                            record.retried("connection");
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
            if let Some(admitted) = admission.as_ref() {
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
            let token_limit = limits
                .get(ratelimit::Resource::Tokens)
                .and_then(|window| window.limit);
            let class = retry::classify(
                status.as_u16(),
                error.parsed.as_ref(),
                self.estimated_tokens,
                token_limit,
            );
            if status == StatusCode::TOO_MANY_REQUESTS {
                record.upstream_429(class.label());
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
                        class.label(),
                    );
                    tracing::info!(
                        org = %self.org,
                        reason = class.label(),
                        attempt = self.attempt,
                        wait_ms = pause.wait.as_millis() as u64,
                        hint = pause.source.map_or("backoff", retry::HintSource::label),
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
                            record.retried("rate_limit");
                            continue;
                        }
                        Err(wait) => return Ok(honest_429(&error, wait)),
                    }
                }
                Decision::Retry(wait) if self.state.retry_budget.try_withdraw(now) => {
                    record.retried("server_error");
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

/// The request's body: read whole (within the process's body budget) for an estimated
/// endpoint, streamed through otherwise.
async fn read_body(
    state: &AppState,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Body,
    config: &Config,
) -> Result<(RequestBody, Option<Held>), ProxyError> {
    if !endpoint.reads_body() {
        return Ok((RequestBody::Streaming(body), None));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let (bytes, held) = state
        .body_budget
        .read(
            body,
            declared,
            config.server.max_body_bytes,
            config.server.body_read_timeout,
        )
        .await?;
    Ok((RequestBody::Read(bytes), Some(held)))
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
    live: &Live,
    identity: &Identity,
    estimate: &Estimate,
    deadline: Instant,
    watch: &mut Option<ClientWatch>,
    record: &mut AccessRecord,
) -> Result<Option<Admission>, ProxyError> {
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
async fn unless_left<T>(
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
    endpoint: Option<Endpoint>,
    answer: Answer,
    admission: Option<Admission>,
    mut record: AccessRecord,
) -> Response {
    let Answer {
        status,
        mut headers,
        body,
    } = answer;
    let is_sse = is_event_stream(&headers);
    let tap = admission.as_ref().and_then(|admitted| {
        let endpoint = endpoint?;
        Some(if is_sse {
            UsageTap::Sse(SseUsage::new(endpoint, admitted.strip_usage_chunk))
        } else {
            UsageTap::json(endpoint)
        })
    });
    if let Some(admitted) = &admission {
        let queued_ms = admitted.reservation.waited.as_millis() as u64;
        headers.insert("x-sluice-queue-ms", HeaderValue::from(queued_ms));
        if is_sse {
            // Stripping the usage chunk may change the length.
            headers.remove(header::CONTENT_LENGTH);
        }
    }
    let body = ObservedBody::new(body, tap, move |ended: Ended| {
        let finish = move || {
            let end = ended.resolve();
            if let Some(admitted) = admission {
                settle(admitted, status, &end);
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
        // The body reports its end while handing its last bytes to the server: reading the
        // usage, settling and logging in a task of their own lets those bytes leave first. Outside a runtime (it
        // is shutting down) they run here.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { finish() });
            }
            Err(_) => finish(),
        }
    });
    let body = if is_sse {
        body.with_error_event()
    } else {
        body
    };
    let mut response = Response::new(Body::new(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/event-stream"))
}

/// The reservation's exit once the upstream has answered.
fn settle(admitted: Admission, status: StatusCode, end: &BodyEnd) {
    let Admission {
        reservation,
        charged,
        accounting,
        ..
    } = admitted;
    let rate_limited = status == StatusCode::TOO_MANY_REQUESTS;
    reservation.close(charged, accounting, rate_limited, end.usage);
}

fn reject(err: ProxyError, record: AccessRecord) -> Response {
    match err.fault() {
        crate::error::Fault::Client => tracing::info!(error = %err, "request rejected"),
        _ => tracing::warn!(error = %err, "request failed"),
    }
    if let ProxyError::Rejected { rejection, .. } = &err {
        record.rejected(match rejection {
            crate::limiter::queue::Rejection::TooLarge { .. } => "too_large",
            crate::limiter::queue::Rejection::Deadline { .. } => "deadline",
            crate::limiter::queue::Rejection::QueueFull { .. } => "queue_full",
        });
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
