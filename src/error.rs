//! The one error type of the proxy and its one conversion to an OpenAI-shaped HTTP response.
//!
//! Every failure sluice itself produces reaches the client as
//! `{"error": {"message", "type", "param", "code"}}`, so the official SDKs raise the usual
//! exception classes. Internal details (the upstream's error chain) go to the log, never to
//! the client, and never carry a key: they name no request detail beyond the upstream's
//! address.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};

use crate::estimate::EstimateError;
use crate::limiter::queue::Rejection;
use crate::resource::Resource;
use crate::upstream::{SendError, SendFailure};

/// Whose fault a failure was: drives logging level and, later, whether a retry is safe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Client,
    Upstream,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route for {path}")]
    UnknownPath { path: String },
    #[error("{path} is served on the metrics listener")]
    ServedElsewhere {
        path: String,
        addr: Option<std::net::SocketAddr>,
    },
    #[error("path {path:?} has {reason}")]
    InvalidPath {
        path: String,
        reason: crate::endpoint::PathError,
    },
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error("the request body arrived too slowly (server.body_read_timeout_secs = {0:?})")]
    BodyTimeout(Duration),
    #[error("request bodies buffered at once would exceed {limit} bytes")]
    BodyBufferFull { limit: usize },
    #[error("upstream unreachable: {0}")]
    UpstreamUnreachable(String),
    #[error("upstream timed out: {0}")]
    UpstreamTimeout(String),
    #[error("upstream failed: {0}")]
    UpstreamFailed(String),
    #[error("sluice is shutting down")]
    ShuttingDown,
    /// The client left while its request waited inside sluice; nobody reads this answer.
    #[error("the client closed the connection while its request waited")]
    ClientGone,
    #[error("no valid client token")]
    Unauthenticated,
    #[error("invalid request body: {0}")]
    InvalidBody(EstimateError),
    #[error("not admitted for {model} in org {org}: {rejection:?}")]
    Rejected {
        org: String,
        model: String,
        rejection: Rejection,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    /// A request the upstream did not answer, by why.
    pub fn from_upstream(err: SendError) -> Self {
        match err.kind {
            SendFailure::Timeout => Self::UpstreamTimeout(err.detail),
            // No connection in time is an unreachable upstream, not a slow answer.
            SendFailure::ConnectTimeout | SendFailure::Unreachable | SendFailure::NotSent => {
                Self::UpstreamUnreachable(err.detail)
            }
            SendFailure::Failed => Self::UpstreamFailed(err.detail),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::UnknownPath { .. } | Self::ServedElsewhere { .. } => StatusCode::NOT_FOUND,
            Self::InvalidPath { .. } => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyRead(_) => StatusCode::BAD_REQUEST,
            Self::BodyBufferFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::UpstreamUnreachable(_) | Self::UpstreamFailed(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            // nginx's "client closed request".
            Self::ClientGone => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::InvalidBody(EstimateError::Tokenizer(_)) | Self::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Self::InvalidBody(_) => StatusCode::BAD_REQUEST,
            Self::Rejected {
                rejection: Rejection::StoreDown,
                ..
            } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Rejected { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// A stable, low-cardinality name for metrics and logs, also sent as the error `code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownPath { .. } | Self::ServedElsewhere { .. } => "unknown_url",
            Self::InvalidPath { .. } => "invalid_path",
            Self::BodyTooLarge { .. } => "request_body_too_large",
            Self::BodyRead(_) => "request_body_unreadable",
            Self::BodyBufferFull { .. } => "body_buffer_full",
            Self::BodyTimeout(_) => "request_timeout",
            Self::UpstreamUnreachable(_) => "upstream_unreachable",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::UpstreamFailed(_) => "upstream_failed",
            Self::ShuttingDown => "shutting_down",
            Self::ClientGone => "client_cancelled",
            // OpenAI's code for a bad key, so SDKs raise AuthenticationError.
            Self::Unauthenticated => "invalid_api_key",
            Self::InvalidBody(EstimateError::Tokenizer(_)) | Self::Internal(_) => "internal_error",
            Self::InvalidBody(_) => "invalid_request_body",
            Self::Rejected { rejection, .. } => match rejection {
                Rejection::TooLarge { .. } => "request_too_large",
                // The code OpenAI uses, so clients treat it as the rate limit it is.
                Rejection::Deadline { .. } => "rate_limit_exceeded",
                Rejection::QueueFull { .. } => "queue_full",
                Rejection::StoreDown => "shared_store_unavailable",
            },
        }
    }

    /// How long a client should wait before retrying, when that is known.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::BodyBufferFull { .. } | Self::ShuttingDown => Some(Duration::from_secs(1)),
            Self::Rejected { rejection, .. } => match rejection {
                Rejection::TooLarge { .. } => None,
                Rejection::Deadline { wait, .. } | Rejection::QueueFull { wait, .. } => {
                    Some((*wait).max(Duration::from_millis(1)))
                }
                Rejection::StoreDown => Some(Duration::from_secs(1)),
            },
            _ => None,
        }
    }

    pub fn fault(&self) -> Fault {
        match self {
            Self::UnknownPath { .. }
            | Self::ServedElsewhere { .. }
            | Self::InvalidPath { .. }
            | Self::BodyTooLarge { .. }
            | Self::BodyRead(_)
            | Self::BodyTimeout(_)
            | Self::ClientGone
            | Self::Unauthenticated => Fault::Client,
            Self::UpstreamUnreachable(_) | Self::UpstreamTimeout(_) | Self::UpstreamFailed(_) => {
                Fault::Upstream
            }
            Self::ShuttingDown | Self::Internal(_) | Self::BodyBufferFull { .. } => Fault::Internal,
            Self::InvalidBody(EstimateError::Tokenizer(_)) => Fault::Internal,
            Self::InvalidBody(_) | Self::Rejected { .. } => Fault::Client,
        }
    }

    fn error_type(&self) -> &'static str {
        if let Self::Rejected { rejection, .. } = self {
            // OpenAI names the limit that bound in `type`.
            return match rejection {
                Rejection::TooLarge { resource, .. } | Rejection::Deadline { resource, .. } => {
                    resource.label()
                }
                Rejection::QueueFull { .. } => Resource::Requests.label(),
                Rejection::StoreDown => "server_error",
            };
        }
        match self.fault() {
            Fault::Client => "invalid_request_error",
            Fault::Upstream | Fault::Internal => "server_error",
        }
    }

    /// What the client should read: what happened and what to do about it.
    fn client_message(&self) -> String {
        match self {
            Self::UnknownPath { path } => format!(
                "sluice has no route for {path}: it proxies the OpenAI API under /v1/ \
                 (set your client's base URL to http://<sluice-address>/v1), and serves \
                 /healthz, /readyz and /metrics."
            ),
            Self::ServedElsewhere { path, addr } => format!(
                "{path} is served only on sluice's metrics listener ({}), not on the one \
                 applications use (metrics_listen in the sluice config).",
                addr.map_or_else(|| "metrics_listen".to_owned(), |addr| addr.to_string())
            ),
            Self::InvalidPath { path, reason } => format!(
                "sluice refuses the request path {path:?}: it has {reason}, so it has no one \
                 meaning that sluice and the upstream would both read. Send the API's own \
                 path (for example /v1/chat/completions)."
            ),
            Self::BodyTooLarge { limit } => format!(
                "The request body is larger than sluice's limit of {limit} bytes for this \
                 endpoint. Send a smaller request, or raise server.max_body_bytes in the \
                 sluice config."
            ),
            Self::BodyTimeout(grace) => format!(
                "The request body arrived too slowly: sluice waits at most {grace:?} between \
                 two pieces of a body, and the whole body must arrive at 64 KiB/s or faster \
                 past that (server.body_read_timeout_secs). Send the body at once."
            ),
            Self::BodyBufferFull { limit } => format!(
                "sluice is already holding {limit} bytes of other requests' bodies \
                 (server.max_buffered_body_bytes) and had no room for this one. Retry in a \
                 moment; if this happens often, raise server.max_buffered_body_bytes."
            ),
            Self::BodyRead(_) => "sluice could not read the request body (the client closed \
                 the connection or sent a malformed body). Retry the request."
                .to_owned(),
            Self::UpstreamUnreachable(_) => "sluice could not connect to the upstream API \
                 (refused, unresolvable, or no answer within upstream.connect_timeout_secs). \
                 Check the upstream URL in sluice's config and the network, then retry."
                .to_owned(),
            Self::UpstreamTimeout(_) => "The upstream API did not answer within sluice's \
                 upstream.read_timeout_secs. Retry, or raise it in the sluice config."
                .to_owned(),
            Self::UpstreamFailed(_) => "The connection to the upstream API broke after the \
                 request was sent and before a response arrived. The upstream may have run (and \
                 billed) it, so sluice did not send it again: retry it if running it twice is \
                 acceptable."
                .to_owned(),
            Self::ShuttingDown => "sluice is shutting down and accepts no new requests. Retry \
                 against another instance or after it restarts."
                .to_owned(),
            Self::ClientGone => "The client closed the connection while the request waited \
                 in sluice, so it was not sent."
                .to_owned(),
            Self::Unauthenticated => "This sluice requires a client token: use one of the \
                 tokens your operator configured (client_tokens_env) as the API key, not the \
                 provider's key."
                .to_owned(),
            Self::InvalidBody(EstimateError::Tokenizer(_)) | Self::Internal(_) => {
                "sluice hit an internal error while handling this request; it has been logged. \
                 Retry the request."
                    .to_owned()
            }
            Self::InvalidBody(err) => format!(
                "sluice could not read this request's JSON body ({err}). Fix the request body; \
                 the API would reject it too."
            ),
            Self::Rejected {
                org,
                model,
                rejection,
            } => rejection_message(org, model, rejection),
        }
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let mut response = error_response(
            self.status(),
            &self.client_message(),
            self.error_type(),
            self.code(),
        );
        let headers = response.headers_mut();
        if let Some(wait) = self.retry_after() {
            // Both hints the SDKs read: milliseconds first, then whole seconds (rounded up, so
            // a client honouring only `retry-after` never comes back early).
            let millis = wait.as_millis().max(1);
            headers.insert("retry-after-ms", HeaderValue::from(millis as u64));
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(millis.div_ceil(1000) as u64),
            );
        }
        if matches!(
            self,
            Self::Rejected {
                rejection: Rejection::TooLarge { .. },
                ..
            }
        ) {
            // The SDKs obey this before their own retry rules: retrying cannot succeed.
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        response
    }
}

fn limit_name(resource: Resource, window: Duration) -> &'static str {
    match (resource, window.as_secs() >= 86_400) {
        (Resource::Requests, false) => "requests per min (RPM)",
        (Resource::Tokens, false) => "tokens per min (TPM)",
        (Resource::Requests, true) => "requests per day (RPD)",
        (Resource::Tokens, true) => "tokens per day (TPD)",
    }
}

fn rejection_message(org: &str, model: &str, rejection: &Rejection) -> String {
    match rejection {
        Rejection::TooLarge {
            resource,
            limit,
            window,
            requested,
        } => format!(
            "Request too large for {model} in organization {org} on {}: Limit {limit}, \
             Requested {requested}. It can never be admitted: reduce the prompt or the output \
             cap (max_tokens / max_completion_tokens / max_output_tokens), or raise the \
             limit in sluice's config. (sluice rejected it without sending it upstream.)",
            limit_name(*resource, *window)
        ),
        Rejection::Deadline {
            resource,
            limit,
            wait,
            waited,
        } => {
            let limit = limit.map(|l| format!(": Limit {l}")).unwrap_or_default();
            let name = limit_name(*resource, Duration::from_secs(60));
            let waited = if waited.is_zero() {
                String::new()
            } else {
                format!(
                    " after waiting {:.1}s in sluice's queue",
                    waited.as_secs_f64()
                )
            };
            format!(
                "Rate limit reached for {model} in organization {org} on {name}{limit}. \
                 sluice could not admit this request before its deadline{waited}: admission \
                 is expected in {:.1}s. Please try again in {:.1}s, or allow a longer wait \
                 with the x-sluice-max-wait header (seconds) or queue.max_wait_secs.",
                wait.as_secs_f64(),
                wait.as_secs_f64()
            )
        }
        Rejection::QueueFull { depth, wait } => format!(
            "sluice's queue for {model} in organization {org} is full ({depth} requests \
             waiting). Please try again in {:.1}s, or raise queue.max_depth_per_bucket / \
             queue.max_depth in sluice's config.",
            wait.as_secs_f64()
        ),
        Rejection::StoreDown => format!(
            "sluice cannot reach the shared store (Redis) that holds the budget of {model} in \
             organization {org}, and is set to refuse requests while it cannot \
             (shared.on_store_error = \"fail_closed\"). Please try again in 1s; operators: \
             check that Redis answers at shared.redis_url, or set on_store_error = \"degrade\" \
             to admit each replica's share meanwhile."
        ),
    }
}

/// Builds an OpenAI-shaped JSON error response.
pub(crate) fn error_response(
    status: StatusCode,
    message: &str,
    kind: &str,
    code: &str,
) -> Response {
    let body = serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    });
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
