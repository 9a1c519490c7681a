//! One request's lifecycle, top to bottom: count -> read -> record -> fault -> authenticate ->
//! route -> validate -> admit -> respond.

use std::collections::hash_map::DefaultHasher;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::time::Instant;

use crate::bucket::{Rejection, Resource, Snapshot};
use crate::config::MockConfig;
use crate::duration::{ceil_millis, from_secs, go_duration, MAX_WAIT};
use crate::error::ApiError;
use crate::faults::{Fault, FaultQueue};
use crate::limiter::Limiter;
use crate::openai::{self, Generation, ResponseIds};
use crate::request::{Kind, Plan};
use crate::stats::{InFlight, Received, Recorder};

/// Largest JSON body read; the real API's limits are lower.
const MAX_JSON_BODY: usize = 64 * 1024 * 1024;

/// Everything the handlers share.
#[derive(Debug)]
pub(crate) struct App {
    pub config: MockConfig,
    pub limiter: Limiter,
    pub stats: Arc<Recorder>,
    pub faults: FaultQueue,
    /// Keys the provider no longer accepts (rotated out): answered 401 `invalid_api_key`.
    pub revoked: std::sync::Mutex<std::collections::HashSet<String>>,
    ids: Ids,
}

impl App {
    pub(crate) fn new(config: MockConfig) -> App {
        App {
            limiter: Limiter::new(&config),
            config,
            stats: Arc::default(),
            faults: FaultQueue::default(),
            revoked: Default::default(),
            ids: Ids::default(),
        }
    }
}

/// Unique-enough, unguessable-enough ids (`chatcmpl-…`, `req_…`) without a random crate.
#[derive(Debug, Default)]
struct Ids {
    seed: RandomState,
    next: AtomicU64,
}

impl Ids {
    fn hex(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{:08x}", self.seed.hash_one(n), n & 0xffff_ffff)
    }
}

/// The organization OpenAI would bill for `key` when no `OpenAI-Organization` header says
/// otherwise: `org-` and 8 hex digits of a stable hash, so tests can tell keys apart without the
/// mock ever echoing a key.
pub fn org_for_key(key: &str) -> String {
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    format!("org-{:08x}", hasher.finish() >> 32)
}

/// Marks a response that must reach the client as a dropped connection, not a status.
#[derive(Clone, Copy, Debug)]
struct NoResponse;

/// What a request routes to.
#[derive(Clone, Copy, Debug)]
enum Endpoint<'a> {
    Inference(Kind),
    Models,
    Model(&'a str),
    Files,
    Unknown,
}

impl<'a> Endpoint<'a> {
    fn route(method: &Method, path: &'a str) -> Endpoint<'a> {
        let post = *method == Method::POST;
        let get = *method == Method::GET;
        match path {
            "/v1/chat/completions" if post => Endpoint::Inference(Kind::Chat),
            "/v1/completions" if post => Endpoint::Inference(Kind::Completions),
            "/v1/embeddings" if post => Endpoint::Inference(Kind::Embeddings),
            "/v1/responses" if post => Endpoint::Inference(Kind::Responses),
            "/v1/files" if post => Endpoint::Files,
            "/v1/models" if get => Endpoint::Models,
            _ => match path.strip_prefix("/v1/models/") {
                Some(id) if get && !id.is_empty() && !id.contains('/') => Endpoint::Model(id),
                _ => Endpoint::Unknown,
            },
        }
    }
}

/// Per-request facts the responses need.
struct Ctx<'a> {
    org: &'a str,
    started: Instant,
}

/// Entry point of every non-control request.
pub(crate) async fn handle(State(app): State<Arc<App>>, request: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    // Dropped with this future if the client goes away: that is what counts as cancelled.
    let mut in_flight = Some(app.stats.begin(parts.uri.path()));
    let response = app.serve(&parts, body, started, &mut in_flight).await;
    if let Some(in_flight) = in_flight.take() {
        in_flight.complete();
    }
    if response.extensions().get::<NoResponse>().is_none() {
        app.stats.status(response.status().as_u16());
    }
    response
}

impl App {
    /// A streamed response takes `in_flight` into its body, which settles it at the end.
    async fn serve(
        &self,
        parts: &Parts,
        body: Body,
        started: Instant,
        in_flight: &mut Option<InFlight>,
    ) -> Response {
        let path = parts.uri.path();
        let endpoint = Endpoint::route(&parts.method, path);
        let key = bearer_key(&parts.headers);
        let org = organization(&parts.headers, key);
        let ctx = Ctx { org: &org, started };

        let read = match endpoint {
            Endpoint::Files => count_body(body).await.map(|n| (n, Bytes::new())),
            _ => axum::body::to_bytes(body, MAX_JSON_BODY)
                .await
                .map(|bytes| (bytes.len() as u64, bytes)),
        };
        let (body_bytes, bytes, readable) = match read {
            Ok((body_bytes, bytes)) => (body_bytes, bytes, true),
            Err(_) => (0, Bytes::new(), false),
        };
        let json = match endpoint {
            Endpoint::Inference(_) => Some(serde_json::from_slice::<Value>(&bytes)),
            _ => None,
        };
        let model = json
            .as_ref()
            .and_then(|json| json.as_ref().ok())
            .and_then(|json| json.get("model"))
            .and_then(Value::as_str);
        self.stats
            .received(received(parts, body_bytes, &org, model));
        if !readable {
            return self.error(&ctx, ApiError::unreadable_body(), HeaderMap::new());
        }

        let mut reset_after = None;
        match self.faults.take(path) {
            None => {}
            Some(Fault::Delay { ms }) => tokio::time::sleep(Duration::from_millis(ms)).await,
            Some(Fault::StreamReset { after_events }) => reset_after = Some(after_events),
            Some(fault) => {
                let cost = match (endpoint, &json) {
                    (Endpoint::Inference(kind), Some(Ok(json))) => {
                        Plan::from_request(kind, json, &self.config).map_or(1, |plan| plan.cost())
                    }
                    _ => 1,
                };
                return self.fault(&ctx, fault, model.unwrap_or("unknown"), cost);
            }
        }

        let revoked = key.is_some_and(|key| {
            self.revoked
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .contains(key)
        });
        let response = match (key, endpoint) {
            (None, _) => self.error(&ctx, ApiError::missing_api_key(), HeaderMap::new()),
            (Some(key), _) if revoked => {
                self.error(&ctx, ApiError::incorrect_api_key(key), HeaderMap::new())
            }
            (Some(_), Endpoint::Unknown) => {
                let err = ApiError::unknown_url(parts.method.as_str(), path);
                self.error(&ctx, err, HeaderMap::new())
            }
            (Some(_), Endpoint::Models) => self.ok(&ctx, &openai::models_body()),
            (Some(_), Endpoint::Model(id)) => self.ok(&ctx, &openai::model_body(id)),
            (Some(_), Endpoint::Files) => {
                let id = format!("file-{}", self.ids.hex());
                self.ok(&ctx, &openai::file_body(&id, body_bytes, unix_now()))
            }
            (Some(_), Endpoint::Inference(kind)) => match &json {
                Some(Ok(json)) => self.infer(&ctx, kind, json, reset_after, in_flight),
                _ => self.error(&ctx, ApiError::invalid_json(), HeaderMap::new()),
            },
        };
        // A stream applied the reset itself and took `in_flight`; anything else breaks here.
        match reset_after {
            Some(_) if in_flight.is_some() => abort_after_headers(response),
            _ => response,
        }
    }

    fn infer(
        &self,
        ctx: &Ctx<'_>,
        kind: Kind,
        request: &Value,
        reset_after: Option<u32>,
        in_flight: &mut Option<InFlight>,
    ) -> Response {
        if !request.is_object() {
            return self.error(ctx, ApiError::invalid_json(), HeaderMap::new());
        }
        let Some(model) = request
            .get("model")
            .and_then(Value::as_str)
            .filter(|model| !model.is_empty())
        else {
            return self.error(ctx, ApiError::missing_model(), HeaderMap::new());
        };
        let plan = match Plan::from_request(kind, request, &self.config) {
            Ok(plan) => plan,
            Err(err) => return self.error(ctx, err, HeaderMap::new()),
        };

        let (admitted, snapshot) = self
            .limiter
            .admit(ctx.org, model, plan.cost(), Instant::now());
        let mut headers = HeaderMap::new();
        rate_limit_headers(&mut headers, &snapshot);
        if let Err(rejection) = admitted {
            self.stats.rate_limited();
            if self.config.retry_after && !rejection.too_large {
                retry_after_headers(&mut headers, rejection.wait);
            }
            let err = ApiError::rate_limited(&rejection, model, ctx.org);
            return self.error(ctx, err, headers);
        }

        let id = match kind {
            Kind::Chat => format!("chatcmpl-{}", self.ids.hex()),
            Kind::Completions => format!("cmpl-{}", self.ids.hex()),
            Kind::Responses => format!("resp_{}", self.ids.hex()),
            Kind::Embeddings => String::new(),
        };
        let generation = Generation {
            id: &id,
            created: unix_now(),
            model,
            plan: &plan,
        };
        let message_id = format!("msg_{}", self.ids.hex());
        let response_ids = ResponseIds {
            response: &id,
            message: &message_id,
        };
        let events = match (kind, plan.stream) {
            (Kind::Chat, false) => {
                return self.ok_with(ctx, headers, &openai::chat_body(&generation))
            }
            (Kind::Completions, false) => {
                return self.ok_with(ctx, headers, &openai::completion_body(&generation))
            }
            (Kind::Responses, false) => {
                let body = openai::response_body(&generation, &response_ids, request);
                return self.ok_with(ctx, headers, &body);
            }
            (Kind::Embeddings, _) => {
                return self.ok_with(ctx, headers, &openai::embeddings_body(model, &plan))
            }
            (Kind::Chat, true) => openai::chat_events(&generation),
            (Kind::Completions, true) => openai::completion_events(&generation),
            (Kind::Responses, true) => openai::response_events(&generation, &response_ids, request),
        };
        let stream = EventStream {
            events: events.into_iter(),
            sent: 0,
            delay: self.config.chunk_delay,
            reset_after,
            in_flight: in_flight.take(),
            done: false,
        };
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        self.respond(ctx, StatusCode::OK, headers, stream.into_body())
    }

    fn fault(&self, ctx: &Ctx<'_>, fault: Fault, model: &str, cost: u64) -> Response {
        match fault {
            Fault::Status {
                status,
                body,
                headers: extra,
            } => {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let body = body.unwrap_or_else(|| ApiError::server_error().body());
                let mut headers = HeaderMap::new();
                for (name, value) in extra {
                    if let (Ok(name), Ok(value)) = (
                        HeaderName::from_bytes(name.as_bytes()),
                        HeaderValue::from_str(&value),
                    ) {
                        headers.append(name, value);
                    }
                }
                if !headers.contains_key(CONTENT_TYPE) {
                    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                }
                self.respond(ctx, status, headers, Body::from(body.to_string()))
            }
            Fault::RateLimit {
                resource,
                retry_after,
            } => {
                let snapshot = self.limiter.peek(ctx.org, model, Instant::now());
                let (rejection, snapshot) = injected_rejection(resource, cost, snapshot);
                let mut headers = HeaderMap::new();
                rate_limit_headers(&mut headers, &snapshot);
                if retry_after {
                    retry_after_headers(&mut headers, rejection.wait);
                }
                let err = ApiError::rate_limited(&rejection, model, ctx.org);
                self.error(ctx, err, headers)
            }
            Fault::InsufficientQuota => {
                self.error(ctx, ApiError::insufficient_quota(), HeaderMap::new())
            }
            Fault::CloseConnection => close_connection(),
            Fault::OversizedHead { bytes } => {
                let mut headers = HeaderMap::new();
                if let Ok(value) = HeaderValue::from_str(&"x".repeat(bytes)) {
                    headers.insert("x-mock-padding", value);
                }
                self.error(ctx, ApiError::server_error(), headers)
            }
            // Handled before routing; a rule never reaches here with these.
            Fault::Delay { .. } | Fault::StreamReset { .. } => {
                self.error(ctx, ApiError::server_error(), HeaderMap::new())
            }
        }
    }

    fn ok(&self, ctx: &Ctx<'_>, body: &Value) -> Response {
        self.ok_with(ctx, HeaderMap::new(), body)
    }

    fn ok_with(&self, ctx: &Ctx<'_>, mut headers: HeaderMap, body: &Value) -> Response {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        self.respond(ctx, StatusCode::OK, headers, Body::from(body.to_string()))
    }

    fn error(&self, ctx: &Ctx<'_>, err: ApiError, mut headers: HeaderMap) -> Response {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        self.respond(ctx, err.status, headers, Body::from(err.body().to_string()))
    }

    /// Adds the headers every OpenAI response has.
    fn respond(
        &self,
        ctx: &Ctx<'_>,
        status: StatusCode,
        mut headers: HeaderMap,
        body: Body,
    ) -> Response {
        insert(
            &mut headers,
            "x-request-id",
            &format!("req_{}", self.ids.hex()),
        );
        let elapsed = ctx.started.elapsed().as_millis();
        insert(&mut headers, "openai-processing-ms", &elapsed.to_string());
        if !ctx.org.is_empty() {
            insert(&mut headers, "openai-organization", ctx.org);
        }
        headers.insert("openai-version", HeaderValue::from_static("2020-10-01"));
        let mut response = Response::new(body);
        *response.status_mut() = status;
        response.headers_mut().extend(headers);
        response
    }
}

/// The 429 an injected rate limit shows: the named resource exhausted, the other as it is.
fn injected_rejection(
    resource: Resource,
    cost: u64,
    mut snapshot: Snapshot,
) -> (Rejection, Snapshot) {
    let state = match resource {
        Resource::Requests => &mut snapshot.requests,
        Resource::Tokens => &mut snapshot.tokens,
    };
    let requested = match resource {
        Resource::Requests => 1,
        Resource::Tokens => cost,
    };
    state.remaining = 0;
    state.reset = if state.limit == 0 {
        MAX_WAIT
    } else {
        Duration::from_secs(60)
    };
    let wait = if state.limit == 0 {
        MAX_WAIT
    } else {
        from_secs(requested as f64 * 60.0 / state.limit as f64)
    };
    let rejection = Rejection {
        resource,
        too_large: false,
        limit: state.limit,
        used: state.limit,
        requested,
        wait,
    };
    (rejection, snapshot)
}

fn rate_limit_headers(headers: &mut HeaderMap, snapshot: &Snapshot) {
    let pairs = [
        (
            "x-ratelimit-limit-requests",
            snapshot.requests.limit.to_string(),
        ),
        (
            "x-ratelimit-limit-tokens",
            snapshot.tokens.limit.to_string(),
        ),
        (
            "x-ratelimit-remaining-requests",
            snapshot.requests.remaining.to_string(),
        ),
        (
            "x-ratelimit-remaining-tokens",
            snapshot.tokens.remaining.to_string(),
        ),
        (
            "x-ratelimit-reset-requests",
            go_duration(snapshot.requests.reset),
        ),
        (
            "x-ratelimit-reset-tokens",
            go_duration(snapshot.tokens.reset),
        ),
    ];
    for (name, value) in pairs {
        insert(headers, name, &value);
    }
}

/// `retry-after-ms` as (float) milliseconds and `retry-after` as whole seconds, both rounded up
/// so that a client sleeping exactly that long finds room.
fn retry_after_headers(headers: &mut HeaderMap, wait: Duration) {
    let ms = ceil_millis(wait);
    insert(headers, "retry-after-ms", &ms.to_string());
    insert(headers, "retry-after", &ms.div_ceil(1000).to_string());
}

fn insert(headers: &mut HeaderMap, name: &'static str, value: &str) {
    // Every value here is generated ASCII or came from a header; skipping a bad one beats a panic.
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// The key of `Authorization: Bearer <key>`, if there is a non-empty one.
fn bearer_key(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, key) = value.split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

/// `OpenAI-Organization` if given, else derived from the key; empty when there is neither.
fn organization(headers: &HeaderMap, key: Option<&str>) -> String {
    let header = headers
        .get("openai-organization")
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|org| !org.is_empty());
    match (header, key) {
        (Some(org), _) => org.to_owned(),
        (None, Some(key)) => org_for_key(key),
        (None, None) => String::new(),
    }
}

fn received(parts: &Parts, body_bytes: u64, org: &str, model: Option<&str>) -> Received {
    let headers = parts
        .headers
        .iter()
        .map(|(name, value)| {
            let value = if name == AUTHORIZATION || name.as_str() == "api-key" {
                "[redacted]".to_owned()
            } else {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            };
            (name.as_str().to_owned(), value)
        })
        .collect();
    Received {
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers,
        body_bytes,
        org: org.to_owned(),
        model: model.map(str::to_owned),
    }
}

/// Reads an upload chunk by chunk, keeping nothing: uploads may be hundreds of MB.
async fn count_body(body: Body) -> Result<u64, axum::Error> {
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        total += chunk?.len() as u64;
    }
    Ok(total)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

fn injected_error(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("injected fault: {what}"),
    )
}

/// Sends the status and headers, then breaks the connection instead of sending the body.
fn abort_after_headers(response: Response) -> Response {
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    let body = futures_util::stream::once(async {
        // Pending once, so hyper flushes the headers before it sees the error.
        tokio::task::yield_now().await;
        Err::<Bytes, _>(injected_error("reset after headers"))
    });
    Response::from_parts(parts, Body::from_stream(body))
}

/// A body that fails before hyper has flushed anything: the client sees the connection close
/// without a response.
fn close_connection() -> Response {
    let body =
        futures_util::stream::once(async { Err::<Bytes, _>(injected_error("close connection")) });
    let mut response = Response::new(Body::from_stream(body));
    response.extensions_mut().insert(NoResponse);
    response
}

/// An SSE body: the events with `delay` between them, optionally broken after `reset_after`.
struct EventStream {
    events: std::vec::IntoIter<Bytes>,
    sent: u32,
    delay: Duration,
    reset_after: Option<u32>,
    /// Settled when the stream ends; dropped with the body if the client goes away first.
    in_flight: Option<InFlight>,
    done: bool,
}

impl EventStream {
    fn into_body(self) -> Body {
        Body::from_stream(futures_util::stream::unfold(self, EventStream::next))
    }

    async fn next(mut self) -> Option<(Result<Bytes, io::Error>, EventStream)> {
        if self.done {
            return None;
        }
        if self.reset_after.is_some_and(|after| self.sent >= after) {
            self.done = true;
            // A deliberate abort, not a client going away.
            if let Some(in_flight) = self.in_flight.take() {
                in_flight.complete();
            }
            // Pending once, so hyper flushes the events already written before the error.
            tokio::task::yield_now().await;
            return Some((Err(injected_error("stream reset")), self));
        }
        let Some(event) = self.events.next() else {
            self.done = true;
            if let Some(in_flight) = self.in_flight.take() {
                in_flight.complete_stream();
            }
            return None;
        };
        if self.sent > 0 && !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.sent += 1;
        Some((Ok(event), self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let post = Method::POST;
        let get = Method::GET;
        assert!(matches!(
            Endpoint::route(&post, "/v1/chat/completions"),
            Endpoint::Inference(Kind::Chat)
        ));
        assert!(matches!(
            Endpoint::route(&get, "/v1/chat/completions"),
            Endpoint::Unknown
        ));
        assert!(matches!(
            Endpoint::route(&get, "/v1/models/gpt-4o"),
            Endpoint::Model("gpt-4o")
        ));
        assert!(matches!(
            Endpoint::route(&get, "/v1/models/"),
            Endpoint::Unknown
        ));
        assert!(matches!(
            Endpoint::route(&post, "/v1/files"),
            Endpoint::Files
        ));
        assert!(matches!(
            Endpoint::route(&post, "/v1/batches"),
            Endpoint::Unknown
        ));
    }

    #[test]
    fn bearer_keys() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_key(&headers), None);
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer   "));
        assert_eq!(bearer_key(&headers), None);
        headers.insert(AUTHORIZATION, HeaderValue::from_static("bearer sk-1"));
        assert_eq!(bearer_key(&headers), Some("sk-1"));
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_key(&headers), None);
    }

    #[test]
    fn organization_prefers_the_header_and_hashes_keys_stably() {
        let org = org_for_key("sk-test");
        assert_eq!(org, org_for_key("sk-test"));
        assert_ne!(org, org_for_key("sk-other"));
        assert_eq!(org.len(), 12);
        assert!(!org.contains("sk-test"));
        let mut headers = HeaderMap::new();
        assert_eq!(organization(&headers, Some("sk-test")), org);
        headers.insert("openai-organization", HeaderValue::from_static("org-mine"));
        assert_eq!(organization(&headers, Some("sk-test")), "org-mine");
    }

    #[test]
    fn injected_rate_limits_exhaust_the_named_resource() {
        let t0 = Instant::now();
        let snapshot = crate::bucket::BucketPair::new(500, 30_000, None, t0).peek(t0);
        let (rejection, snapshot) = injected_rejection(Resource::Tokens, 300, snapshot);
        assert_eq!(rejection.requested, 300);
        assert_eq!(go_duration(rejection.wait), "600ms");
        assert_eq!(snapshot.tokens.remaining, 0);
        assert_eq!(snapshot.requests.remaining, 500);
    }
}
