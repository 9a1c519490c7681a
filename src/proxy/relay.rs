//! The answer on its way to the client: the upstream's status, headers and body relayed
//! unchanged as they arrive, then the reservation settled against the usage the body showed,
//! and the exchange recorded.

use axum::body::Body;
use axum::response::Response;
use http::{header, HeaderValue, StatusCode};

use crate::access::AccessRecord;
use crate::endpoint::Endpoint;
use crate::upstream::body::{BodyEnd, BodyOutcome, Ended, ObservedBody, UsageTap};
use crate::upstream::usage::SseUsage;

use super::admission::Admission;
use super::exchange::{is_event_stream, Answer};

/// Sends the upstream's status, headers and body bytes to the client unchanged, the body
/// chunk by chunk as it arrives. When the body ends (or is dropped) the reservation is
/// settled against the usage it reported, and the exchange is recorded.
pub(super) fn relay(
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
