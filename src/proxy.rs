//! The request lifecycle, top to bottom:
//! route -> read the body -> forward upstream -> relay the response -> record.
//!
//! Admission (identify the org, estimate, queue) slots in between reading and forwarding.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::access::AccessRecord;
use crate::endpoint::Endpoint;
use crate::error::ProxyError;
use crate::server::AppState;
use crate::upstream::body::{BodyEnd, BodyOutcome, ObservedBody};
use crate::upstream::{request_headers, response_headers};

/// A request body on its way upstream.
enum RequestBody {
    /// Read whole: an estimated endpoint's JSON.
    Read(Bytes),
    /// Streamed through as it arrives: uploads, audio, everything else.
    Streaming(Body),
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
        Ok(response) => relay(response, record),
        Err(err) => reject(err, record),
    }
}

/// Reads the body as the endpoint needs it and sends the request upstream.
async fn forward(
    state: &AppState,
    endpoint: Endpoint,
    request: Request,
    record: &mut AccessRecord,
) -> Result<reqwest::Response, ProxyError> {
    let (parts, body) = request.into_parts();
    let body = read_body(
        endpoint,
        &parts.headers,
        body,
        state.config.server.max_body_bytes,
    )
    .await?;
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path(), |pq| pq.as_str());
    let headers = request_headers(&parts.headers, matches!(body, RequestBody::Read(_)));
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
    // Dropping this future (the client went away) drops the upstream request with it.
    let response = pending
        .await
        .map_err(|err| ProxyError::from_upstream(&err))?;
    record.upstream_headers();
    Ok(response)
}

async fn read_body(
    endpoint: Endpoint,
    headers: &http::HeaderMap,
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

/// Sends the upstream's status, headers and body bytes to the client unchanged, the body
/// chunk by chunk as it arrives. The record is finished when the body ends or is dropped.
fn relay(upstream: reqwest::Response, record: AccessRecord) -> Response {
    let status = upstream.status();
    let headers = response_headers(upstream.headers());
    let body = ObservedBody::new(reqwest::Body::from(upstream), move |end: BodyEnd| {
        let error = match end.outcome {
            BodyOutcome::Complete => None,
            BodyOutcome::Failed => Some("upstream_body_failed"),
            BodyOutcome::Cancelled => Some("client_cancelled"),
        };
        record.finish(status, end, error);
    });
    let mut response = Response::new(Body::new(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
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
        },
        Some(code),
    );
    response
}
