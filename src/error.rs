//! The one error type of the proxy and its one conversion to an OpenAI-shaped HTTP response.
//!
//! Every failure sluice itself produces reaches the client as
//! `{"error": {"message", "type", "param", "code"}}`, so the official SDKs raise the usual
//! exception classes. Internal details (the upstream's error chain) go to the log, never to
//! the client, and never carry a key: the upstream URL is the only request detail in them.

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};

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
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error("upstream unreachable: {0}")]
    UpstreamUnreachable(String),
    #[error("upstream timed out: {0}")]
    UpstreamTimeout(String),
    #[error("upstream failed: {0}")]
    UpstreamFailed(String),
    #[error("sluice is shutting down")]
    ShuttingDown,
}

impl ProxyError {
    /// Classifies a transport error from the upstream client. Only the error's own text is
    /// kept: reqwest's display names the URL (origin and path), never a header.
    pub fn from_upstream(err: &reqwest::Error) -> Self {
        let detail = error_chain(err);
        if err.is_timeout() {
            Self::UpstreamTimeout(detail)
        } else if err.is_connect() {
            Self::UpstreamUnreachable(detail)
        } else {
            Self::UpstreamFailed(detail)
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::UnknownPath { .. } => StatusCode::NOT_FOUND,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyRead(_) => StatusCode::BAD_REQUEST,
            Self::UpstreamUnreachable(_) | Self::UpstreamFailed(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A stable, low-cardinality name for metrics and logs, also sent as the error `code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownPath { .. } => "unknown_url",
            Self::BodyTooLarge { .. } => "request_body_too_large",
            Self::BodyRead(_) => "request_body_unreadable",
            Self::UpstreamUnreachable(_) => "upstream_unreachable",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::UpstreamFailed(_) => "upstream_failed",
            Self::ShuttingDown => "shutting_down",
        }
    }

    pub fn fault(&self) -> Fault {
        match self {
            Self::UnknownPath { .. } | Self::BodyTooLarge { .. } | Self::BodyRead(_) => {
                Fault::Client
            }
            Self::UpstreamUnreachable(_) | Self::UpstreamTimeout(_) | Self::UpstreamFailed(_) => {
                Fault::Upstream
            }
            Self::ShuttingDown => Fault::Internal,
        }
    }

    fn error_type(&self) -> &'static str {
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
            Self::BodyTooLarge { limit } => format!(
                "The request body is larger than sluice's limit of {limit} bytes for this \
                 endpoint. Send a smaller request, or raise server.max_body_bytes in the \
                 sluice config."
            ),
            Self::BodyRead(_) => "sluice could not read the request body (the client closed \
                 the connection or sent a malformed body). Retry the request."
                .to_owned(),
            Self::UpstreamUnreachable(_) => "sluice could not connect to the upstream API. \
                 Check the upstream URL in sluice's config and the network, then retry."
                .to_owned(),
            Self::UpstreamTimeout(_) => "The upstream API did not answer within sluice's \
                 upstream timeout. Retry, or raise upstream.read_timeout_secs / \
                 upstream.connect_timeout_secs in the sluice config."
                .to_owned(),
            Self::UpstreamFailed(_) => "The connection to the upstream API failed before a \
                 response arrived. Retry the request."
                .to_owned(),
            Self::ShuttingDown => "sluice is shutting down and accepts no new requests. Retry \
                 against another instance or after it restarts."
                .to_owned(),
        }
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        error_response(
            self.status(),
            &self.client_message(),
            self.error_type(),
            self.code(),
        )
    }
}

/// Builds an OpenAI-shaped JSON error response.
pub fn error_response(status: StatusCode, message: &str, kind: &str, code: &str) -> Response {
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

/// The error and its sources on one line: reqwest's top-level message alone ("error sending
/// request") hides the cause an operator needs ("connection refused").
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
