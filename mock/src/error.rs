//! Every error the mock sends, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::bucket::Rejection;
use crate::duration::go_duration;

const RATE_LIMITS_URL: &str = "https://platform.openai.com/account/rate-limits";

/// An OpenAI-shaped error, before it becomes a response.
#[derive(Clone, Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    fn invalid_request(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    pub(crate) fn missing_api_key() -> ApiError {
        ApiError {
            code: Some("invalid_api_key"),
            ..ApiError::invalid_request(
                StatusCode::UNAUTHORIZED,
                "You didn't provide an API key. You need to provide your API key in an \
                 Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). \
                 You can obtain an API key from https://platform.openai.com/account/api-keys.",
            )
        }
    }

    /// A key the provider does not (or no longer) accept; the message shows only its ends.
    pub(crate) fn incorrect_api_key(key: &str) -> ApiError {
        let head: String = key.chars().take(3).collect();
        let tail: String = key
            .chars()
            .rev()
            .take(4)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        ApiError {
            code: Some("invalid_api_key"),
            ..ApiError::invalid_request(
                StatusCode::UNAUTHORIZED,
                format!(
                    "Incorrect API key provided: {head}***{tail}. You can find your API key at \
                     https://platform.openai.com/account/api-keys."
                ),
            )
        }
    }

    pub(crate) fn unknown_url(method: &str, path: &str) -> ApiError {
        ApiError {
            code: Some("unknown_url"),
            ..ApiError::invalid_request(
                StatusCode::NOT_FOUND,
                format!("Invalid URL ({method} {path})"),
            )
        }
    }

    pub(crate) fn invalid_json() -> ApiError {
        ApiError::invalid_request(
            StatusCode::BAD_REQUEST,
            "We could not parse the JSON body of your request. (HINT: This likely means you \
             aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, \
             but what was sent was not valid JSON. If you have trouble figuring out how to fix \
             this, please contact us through our help center at help.openai.com.)",
        )
    }

    pub(crate) fn unreadable_body() -> ApiError {
        ApiError::invalid_request(
            StatusCode::BAD_REQUEST,
            "The request body could not be read.",
        )
    }

    pub(crate) fn missing_model() -> ApiError {
        ApiError::invalid_request(
            StatusCode::BAD_REQUEST,
            "you must provide a model parameter",
        )
    }

    pub(crate) fn missing_parameter(param: &'static str) -> ApiError {
        ApiError {
            param: Some(param),
            code: Some("missing_required_parameter"),
            ..ApiError::invalid_request(
                StatusCode::BAD_REQUEST,
                format!("Missing required parameter: '{param}'."),
            )
        }
    }

    pub(crate) fn server_error() -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "The server had an error while processing your request. Sorry about that!"
                .to_owned(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub(crate) fn insufficient_quota() -> ApiError {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: "You exceeded your current quota, please check your plan and billing \
                      details. For more information on this error, read the docs: \
                      https://platform.openai.com/docs/guides/error-codes/api-errors."
                .to_owned(),
            kind: "insufficient_quota",
            param: None,
            code: Some("insufficient_quota"),
        }
    }

    /// The 429 of a rate limit, worded exactly as OpenAI words it.
    pub(crate) fn rate_limited(rejection: &Rejection, model: &str, org: &str) -> ApiError {
        let resource = rejection.resource;
        let per_min = match resource {
            crate::Resource::Requests => "requests per min (RPM)",
            crate::Resource::Tokens => "tokens per min (TPM)",
        };
        let Rejection {
            limit,
            used,
            requested,
            ..
        } = *rejection;
        let message = if rejection.too_large {
            format!(
                "Request too large for {model} in organization {org} on {per_min}: Limit \
                 {limit}, Requested {requested}. The input or output tokens must be reduced in \
                 order to run successfully. Visit {RATE_LIMITS_URL} to learn more."
            )
        } else {
            format!(
                "Rate limit reached for {model} in organization {org} on {per_min}: Limit \
                 {limit}, Used {used}, Requested {requested}. Please try again in {}. Visit \
                 {RATE_LIMITS_URL} to learn more.",
                go_duration(rejection.wait)
            )
        };
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message,
            kind: resource.as_str(),
            param: None,
            code: Some("rate_limit_exceeded"),
        }
    }

    pub(crate) fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::Resource;

    #[test]
    fn rate_limit_message_matches_openai() {
        let rejection = Rejection {
            resource: Resource::Tokens,
            too_large: false,
            limit: 30_000,
            used: 29_937,
            requested: 385,
            wait: Duration::from_millis(644),
        };
        let err = ApiError::rate_limited(&rejection, "gpt-4o", "org-X");
        assert_eq!(
            err.body(),
            json!({"error": {
                "message": "Rate limit reached for gpt-4o in organization org-X on tokens per min (TPM): Limit 30000, Used 29937, Requested 385. Please try again in 644ms. Visit https://platform.openai.com/account/rate-limits to learn more.",
                "type": "tokens",
                "param": null,
                "code": "rate_limit_exceeded",
            }})
        );
    }

    #[test]
    fn too_large_message_matches_openai() {
        let rejection = Rejection {
            resource: Resource::Tokens,
            too_large: true,
            limit: 30_000,
            used: 0,
            requested: 31_538,
            wait: Duration::ZERO,
        };
        let err = ApiError::rate_limited(&rejection, "gpt-4o", "org-X");
        assert_eq!(
            err.message,
            "Request too large for gpt-4o in organization org-X on tokens per min (TPM): Limit \
             30000, Requested 31538. The input or output tokens must be reduced in order to run \
             successfully. Visit https://platform.openai.com/account/rate-limits to learn more."
        );
    }

    #[test]
    fn requests_message_matches_openai() {
        let rejection = Rejection {
            resource: Resource::Requests,
            too_large: false,
            limit: 500,
            used: 500,
            requested: 1,
            wait: Duration::from_millis(120),
        };
        let err = ApiError::rate_limited(&rejection, "gpt-4o", "org-X");
        assert_eq!(err.kind, "requests");
        assert!(err.message.contains(
            "on requests per min (RPM): Limit 500, Used 500, Requested 1. Please try again in 120ms."
        ));
    }
}
