//! Token estimation: what a request will cost against a tokens-per-minute limit, known before
//! it is sent (docs/upstream.md §4).
//!
//! [`estimate`] parses a request body once and returns its [`Estimate`]: the prompt tokens,
//! counted the way OpenAI's cookbook counts them with the model's tiktoken [`Encoding`], and
//! the output tokens the request reserves (its cap times `n`, or a configured default when it
//! gives no cap). Where a request holds something whose cost cannot be known from its text
//! (an image, audio, a file), the estimate uses a documented fixed figure or the part's JSON
//! text; the limiter corrects the prompt estimate from the usage that comes back.
//!
//! Everything here is pure and synchronous. The [`Tokenizers`] are built once at start-up;
//! counting (bpe-openai, identical to tiktoken's counts) is linear in the text, even on text
//! built to be slow.
//!
//! - `tokenizer`: model -> encoding, and counting.
//! - `output`: output tokens reserved, and the per-model defaults.
//! - `chat`, `responses`, `completions`: prompt tokens per endpoint.

mod chat;
mod completions;
mod output;
mod responses;
mod tokenizer;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::endpoint::Endpoint;

pub use output::OutputDefaults;
pub use tokenizer::{Encoding, Tokenizers};

/// What a request costs against a tokens-per-minute limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Estimate {
    /// The `model` field of the body, as sent; empty when an unestimated endpoint's body has
    /// none.
    pub model: String,
    pub prompt_tokens: u64,
    /// Output tokens reserved: cap * n (chat: `max_completion_tokens` | `max_tokens`;
    /// responses: `max_output_tokens`; legacy completions: `max_tokens`, default 16, times
    /// max(`n`, `best_of`)); embeddings: 0. When no cap: [`OutputDefaults::for_model`] * n.
    pub output_tokens: u64,
    /// Whether `output_tokens` is fixed by the request or the API (a cap the provider charges
    /// whole; embeddings' zero), rather than sluice's guess: the configured default for an
    /// uncapped request, or the zero of an endpoint sluice does not estimate.
    pub output_capped: bool,
    pub stream: bool,
    /// Whether the request itself asked for usage in its stream
    /// (`stream_options.include_usage == true`); false when not streaming.
    pub include_usage: bool,
}

impl Estimate {
    /// Prompt plus output tokens (saturating).
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.output_tokens)
    }
}

/// Why a request body could not be estimated. Every variant but [`Self::Tokenizer`] is the
/// client's fault: the API would reject the body too.
#[derive(Debug, thiserror::Error)]
pub enum EstimateError {
    /// The body is not JSON / not an object: message says what is wrong.
    #[error("the request body is not a JSON object: {0}")]
    InvalidJson(String),
    /// No string `model` field.
    #[error("the request body has no string `model` field")]
    MissingModel,
    /// A field has a shape the API would reject (e.g. messages not an array); names the field.
    #[error("invalid `{field}`: {reason}")]
    InvalidField { field: &'static str, reason: String },
    /// Tokenizer tables failed to load.
    #[error("the tokenizer tables failed to load: {0}")]
    Tokenizer(String),
}

/// Parses the request body once and estimates its cost. Pure and synchronous: the caller
/// moves it off the async reactor for large bodies.
///
/// Chat completions, legacy completions, embeddings and responses are estimated; the body
/// must be a JSON object with a string `model`, and the fields that are counted must have
/// the shapes the API accepts (else [`EstimateError`]). Unknown fields and unknown kinds of
/// content are counted by their JSON text, which over-counts rather than under-counts.
/// Every other endpoint costs nothing here: its estimate has zero tokens, and the `model`
/// and `stream` of its body if it is a JSON object that has them.
///
/// Time is linear in the size of the body; it never panics.
pub fn estimate(
    tokenizers: &Tokenizers,
    endpoint: Endpoint,
    body: &[u8],
    defaults: &OutputDefaults,
) -> Result<Estimate, EstimateError> {
    if !matches!(
        endpoint,
        Endpoint::ChatCompletions
            | Endpoint::Completions
            | Endpoint::Embeddings
            | Endpoint::Responses
    ) {
        return Ok(unestimated(body));
    }
    let request = match serde_json::from_slice(body) {
        Ok(Value::Object(request)) => request,
        Ok(other) => {
            return Err(EstimateError::InvalidJson(format!(
                "found {} instead",
                kind(&other)
            )))
        }
        Err(e) => return Err(EstimateError::InvalidJson(e.to_string())),
    };
    let Some(Value::String(model)) = request.get("model") else {
        return Err(EstimateError::MissingModel);
    };
    let counter = Counter {
        tokenizers,
        encoding: Encoding::for_model(model),
    };
    let (prompt_tokens, output) = match endpoint {
        Endpoint::ChatCompletions => (
            chat::prompt_tokens(&counter, &request)?,
            output::chat(&request, model, defaults)?,
        ),
        Endpoint::Responses => (
            responses::prompt_tokens(&counter, &request)?,
            output::responses(&request, model, defaults)?,
        ),
        Endpoint::Completions => (
            completions::prompt_tokens(&counter, &request)?,
            output::completions(&request)?,
        ),
        _ => (
            completions::embeddings_tokens(&counter, &request)?,
            output::Reserved {
                tokens: 0,
                capped: true,
            },
        ),
    };
    let stream = match request.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(stream)) => *stream,
        Some(other) => {
            return Err(invalid(
                "stream",
                format!("expected a boolean, found {}", kind(other)),
            ))
        }
    };
    Ok(Estimate {
        model: model.clone(),
        prompt_tokens,
        output_tokens: output.tokens,
        output_capped: output.capped,
        stream,
        include_usage: stream && asks_for_usage(request.get("stream_options")),
    })
}

/// The estimate of an endpoint whose cost sluice does not count. Reads no more of the body
/// than its top-level `model`, `stream` and `stream_options`, and accepts any body.
fn unestimated(body: &[u8]) -> Estimate {
    #[derive(Deserialize)]
    struct Head {
        model: Option<Value>,
        stream: Option<Value>,
        stream_options: Option<Value>,
    }
    let head = serde_json::from_slice::<Head>(body).ok();
    let model = match head.as_ref().and_then(|h| h.model.as_ref()) {
        Some(Value::String(model)) => model.clone(),
        _ => String::new(),
    };
    let stream = head.as_ref().and_then(|h| h.stream.as_ref()) == Some(&Value::Bool(true));
    Estimate {
        model,
        prompt_tokens: 0,
        output_tokens: 0,
        output_capped: false,
        stream,
        include_usage: stream && asks_for_usage(head.and_then(|h| h.stream_options).as_ref()),
    }
}

/// Whether `stream_options` is an object with `include_usage: true`.
fn asks_for_usage(stream_options: Option<&Value>) -> bool {
    stream_options.and_then(|o| o.get("include_usage")) == Some(&Value::Bool(true))
}

/// The model a fine-tune was trained from (`ft:gpt-4o-mini-2024-07-18:org:name:id` ->
/// `gpt-4o-mini-2024-07-18`); any other model name unchanged.
fn base_model(model: &str) -> &str {
    match model.strip_prefix("ft:") {
        Some(rest) => rest.split(':').next().unwrap_or(rest),
        None => model,
    }
}

/// Counts the tokens of a request's parts with one encoding.
struct Counter<'t> {
    tokenizers: &'t Tokenizers,
    encoding: Encoding,
}

impl Counter<'_> {
    fn text(&self, text: &str) -> u64 {
        self.tokenizers.count(self.encoding, text)
    }

    /// Tokens of a JSON value as the model sees it: a string's text, nothing for null, and
    /// for anything else its compact JSON text.
    fn value(&self, value: &Value) -> u64 {
        match value {
            Value::String(text) => self.text(text),
            Value::Null => 0,
            other => self.text(&other.to_string()),
        }
    }
}

/// A field of a request object, `None` when absent or null (the API treats both as unset).
fn field<'r>(request: &'r Map<String, Value>, name: &str) -> Option<&'r Value> {
    request.get(name).filter(|v| !v.is_null())
}

fn invalid(field: &'static str, reason: impl Into<String>) -> EstimateError {
    EstimateError::InvalidField {
        field,
        reason: reason.into(),
    }
}

/// A JSON value's kind, for error messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests;

/// An o200k counter over the test process's shared tables, for the endpoint modules' tests.
#[cfg(test)]
fn test_counter() -> Counter<'static> {
    Counter {
        tokenizers: tokenizer::tests::tokenizers(),
        encoding: Encoding::O200kBase,
    }
}
