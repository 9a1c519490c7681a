//! The request lifecycle, one phase after the other, each in the file named:
//! 1. route: the path's canonical spelling and its endpoint (`route`, here);
//! 2. identify: the org, from the headers alone, before any body is read (`identify`);
//! 3. read the body whole, within the process's body budget (`read_body`);
//! 4. meter: estimate the tokens and wait for the bucket's budget (`admission.rs`);
//! 5. forward upstream, replaying 429s and retrying what never reached it (`exchange.rs`);
//! 6. relay the answer unchanged, then settle the reservation and record (`relay.rs`).
//!
//! A failure at any phase is answered as an OpenAI-shaped error (`reject`).

mod admission;
mod exchange;
mod relay;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::uri::PathAndQuery;
use http::{header, HeaderMap, Uri};
use tokio::time::Instant;

use crate::access::AccessRecord;
use crate::body_budget::Held;
use crate::client::ClientSocket;
use crate::config::Config;
use crate::endpoint::Endpoint;
use crate::error::ProxyError;
use crate::org::Identity;
use crate::state::{AppState, Live};
use crate::upstream::body::{BodyEnd, BodyOutcome};
use crate::upstream::request_headers;

pub(crate) use admission::deadline;
use admission::{Admission, Metered, RequestBody};
use exchange::{Answer, Exchange};
use relay::relay;

/// Handles every request the server has no other route for.
pub(crate) async fn proxy(State(state): State<Arc<AppState>>, request: Request) -> Response {
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

/// Identifies, reads, meters, and sends the request upstream until it has an answer worth
/// relaying.
async fn forward(
    state: &AppState,
    endpoint: Endpoint,
    request: Request,
    record: &mut AccessRecord,
) -> Result<(Answer, Option<Admission>), ProxyError> {
    let (parts, body) = request.into_parts();
    let uri = upstream_uri(state, &parts.uri)?;
    // This request runs under the configuration in force now, whatever a reload does later.
    let live = state.live();
    let identity = match identify(state, &live, &parts.headers, record)? {
        Identified::Org(identity) => identity,
        Identified::CoolingDown(answer) => return Ok((*answer, None)),
    };
    // Held until the exchange is over: the body's bytes live that long.
    let (body, _held) = read_body(state, endpoint, &parts.headers, body, &live.config).await?;
    // Read whole: from here on, a client that leaves while its request waits is noticed.
    let mut watch = parts
        .extensions
        .get::<ClientSocket>()
        .map(ClientSocket::watch);
    let asked = Asked {
        live: &live,
        identity: &identity,
        endpoint,
        deadline: deadline(&parts.headers, &live.config.queue, Instant::now()),
    };
    let Metered {
        body,
        mut admission,
        estimated_tokens,
    } = admission::meter(state, &asked, body, &mut watch, record).await?;

    let headers = upstream_headers(&parts.headers, &identity, body.is_read());
    let mut exchange = Exchange {
        state,
        config: &live.config,
        org: &identity.org,
        method: parts.method,
        uri,
        headers,
        body: Some(body),
        deadline: asked.deadline,
        estimated_tokens,
        attempt: 0,
    };
    if exchange.resendable() {
        state.retry_budget.deposit(Instant::now());
    }
    let answer = exchange.run(&mut admission, &mut watch, record).await?;
    Ok((answer, admission))
}

/// Who asks what, under which configuration, and until when.
#[derive(Clone, Copy)]
struct Asked<'a> {
    live: &'a Live,
    identity: &'a Identity,
    endpoint: Endpoint,
    /// The latest moment the request may still be admitted or sent again.
    deadline: Instant,
}

/// The upstream's URL for the request's path and query.
fn upstream_uri(state: &AppState, uri: &Uri) -> Result<Uri, ProxyError> {
    let path_and_query = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    state
        .upstream
        .uri(&path_and_query)
        .map_err(|err| ProxyError::Internal(format!("no upstream URL for the request: {err}")))
}

/// Who is asking.
enum Identified {
    Org(Identity),
    /// The org is in quota cool-down: this is its answer, without calling upstream.
    CoolingDown(Box<Answer>),
}

/// Who is asking, known from the headers alone: a client without a valid token is refused
/// before sluice reads (and holds) a byte of its body.
fn identify(
    state: &AppState,
    live: &Live,
    headers: &HeaderMap,
    record: &mut AccessRecord,
) -> Result<Identified, ProxyError> {
    let identity = live
        .orgs
        .authenticate(headers)
        .map_err(|_| ProxyError::Unauthenticated)?;
    record.identity(&identity.org, identity.priority);
    if let Some(error) = state.exhausted.check(&identity.org, Instant::now()) {
        tracing::debug!(org = %identity.org, "org in quota cool-down; answered without calling upstream");
        let answer = Answer::buffered(error.status, error.headers, error.body);
        return Ok(Identified::CoolingDown(Box::new(answer)));
    }
    Ok(Identified::Org(identity))
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

/// The headers the upstream gets: the client's, less hop-by-hop ones, with the org's own key
/// in managed-key mode.
fn upstream_headers(client: &HeaderMap, identity: &Identity, read_whole: bool) -> HeaderMap {
    let mut headers = request_headers(client, read_whole);
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
    headers
}

fn reject(err: ProxyError, record: AccessRecord) -> Response {
    match err.fault() {
        crate::error::Fault::Client => tracing::info!(error = %err, "request rejected"),
        _ => tracing::warn!(error = %err, "request failed"),
    }
    if let ProxyError::Rejected { rejection, .. } = &err {
        record.rejected(rejection);
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
