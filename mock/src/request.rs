//! What an inference request asks for: what it costs at admission and what it gets back.

use serde_json::Value;

use crate::config::MockConfig;
use crate::error::ApiError;
use crate::tokens;

/// Legacy completions default `max_tokens` to 16, and reserve it.
const LEGACY_DEFAULT_MAX_TOKENS: u64 = 16;
/// Bounds that keep a silly request from making the mock allocate without limit.
const MAX_CHOICES: u64 = 128;
const MAX_DIMENSIONS: u64 = 8_192;
const DEFAULT_DIMENSIONS: u64 = 8;

/// The rate-limited endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Chat,
    Completions,
    Embeddings,
    Responses,
}

/// A validated inference request, reduced to what the mock needs.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub prompt_tokens: u64,
    /// Output tokens charged per choice at admission, whatever is generated.
    pub reserved_per_choice: u64,
    pub choices: u64,
    pub output_per_choice: u64,
    /// `length` when the cap cut the output short, else `stop`.
    pub finish_reason: &'static str,
    pub stream: bool,
    pub include_usage: bool,
    /// Embeddings only: how many vectors, how long, and whether base64-encoded.
    pub embeddings: u64,
    pub dimensions: usize,
    pub base64: bool,
}

impl Plan {
    /// Reads `request` (a JSON object) for endpoint `kind`; missing required fields are 400s.
    pub(crate) fn from_request(
        kind: Kind,
        request: &Value,
        config: &MockConfig,
    ) -> Result<Plan, ApiError> {
        let uint = |name: &str| request.get(name).and_then(Value::as_u64);
        let n = uint("n").unwrap_or(1).clamp(1, MAX_CHOICES);
        let generated = u64::from(config.completion_tokens);
        let default_reservation = u64::from(config.default_output_reservation);
        let mut plan = Plan {
            prompt_tokens: 0,
            reserved_per_choice: 0,
            choices: n,
            output_per_choice: 0,
            finish_reason: "stop",
            stream: request.get("stream").and_then(Value::as_bool) == Some(true),
            include_usage: request
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                == Some(true),
            embeddings: 0,
            dimensions: 0,
            base64: false,
        };
        let cap = match kind {
            Kind::Chat => {
                let messages = request
                    .get("messages")
                    .and_then(Value::as_array)
                    .ok_or(ApiError::missing_parameter("messages"))?;
                plan.prompt_tokens = tokens::chat_tokens(messages);
                uint("max_completion_tokens").or(uint("max_tokens"))
            }
            Kind::Completions => {
                let (prompt_tokens, prompts) =
                    request.get("prompt").map_or((0, 1), tokens::input_tokens);
                plan.prompt_tokens = prompt_tokens;
                plan.choices = (n * prompts.max(1)).min(MAX_CHOICES);
                Some(uint("max_tokens").unwrap_or(LEGACY_DEFAULT_MAX_TOKENS))
            }
            Kind::Embeddings => {
                let input = request
                    .get("input")
                    .ok_or(ApiError::missing_parameter("input"))?;
                let (prompt_tokens, inputs) = tokens::input_tokens(input);
                plan.prompt_tokens = prompt_tokens;
                plan.choices = 0;
                plan.stream = false;
                plan.embeddings = inputs.min(u64::from(u16::MAX));
                plan.dimensions = usize::try_from(
                    uint("dimensions")
                        .unwrap_or(DEFAULT_DIMENSIONS)
                        .clamp(1, MAX_DIMENSIONS),
                )
                .unwrap_or(DEFAULT_DIMENSIONS as usize);
                plan.base64 =
                    request.get("encoding_format").and_then(Value::as_str) == Some("base64");
                return Ok(plan);
            }
            Kind::Responses => {
                plan.prompt_tokens = tokens::responses_tokens(request);
                plan.choices = 1;
                uint("max_output_tokens")
            }
        };
        plan.reserved_per_choice = cap.unwrap_or(default_reservation);
        plan.output_per_choice = cap.map_or(generated, |cap| cap.min(generated));
        if plan.output_per_choice < generated {
            plan.finish_reason = "length";
        }
        Ok(plan)
    }

    /// Tokens charged at admission: the prompt plus the output cap of every choice.
    pub(crate) fn cost(&self) -> u64 {
        self.prompt_tokens
            .saturating_add(self.reserved_per_choice.saturating_mul(self.choices))
    }

    /// Tokens generated over all choices.
    pub(crate) fn completion_tokens(&self) -> u64 {
        self.output_per_choice * self.choices
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn plan(kind: Kind, request: Value) -> Plan {
        Plan::from_request(kind, &request, &MockConfig::default()).expect("valid request")
    }

    #[test]
    fn chat_charges_the_cap_times_n() {
        let p = plan(
            Kind::Chat,
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "n": 2}),
        );
        // 3 + 1 + 1 + 3
        assert_eq!(p.prompt_tokens, 8);
        assert_eq!(p.cost(), 8 + 200);
        assert_eq!(p.output_per_choice, 16);
        assert_eq!(p.completion_tokens(), 32);
        assert_eq!(p.finish_reason, "stop");
    }

    #[test]
    fn a_small_cap_cuts_the_output() {
        let p = plan(
            Kind::Chat,
            json!({"model": "m", "messages": [], "max_completion_tokens": 4, "max_tokens": 100}),
        );
        assert_eq!(p.output_per_choice, 4);
        assert_eq!(p.reserved_per_choice, 4);
        assert_eq!(p.finish_reason, "length");
    }

    #[test]
    fn without_a_cap_chat_reserves_the_configured_default() {
        let config = MockConfig {
            default_output_reservation: 50,
            ..MockConfig::default()
        };
        let request = json!({"model": "m", "messages": []});
        let p = Plan::from_request(Kind::Chat, &request, &config).expect("valid");
        assert_eq!(p.cost(), 3 + 50);
        assert_eq!(p.output_per_choice, 16);
    }

    #[test]
    fn legacy_completions_reserve_sixteen_by_default() {
        let p = plan(Kind::Completions, json!({"model": "m", "prompt": "abcd"}));
        assert_eq!(p.cost(), 1 + 16);
        let p = plan(
            Kind::Completions,
            json!({"model": "m", "prompt": ["a", "b"], "max_tokens": 2}),
        );
        assert_eq!(p.choices, 2);
        assert_eq!(p.cost(), 2 + 4);
    }

    #[test]
    fn embeddings_charge_only_input() {
        let p = plan(
            Kind::Embeddings,
            json!({"model": "m", "input": [[1, 2, 3], [4]], "dimensions": 3}),
        );
        assert_eq!(p.cost(), 4);
        assert_eq!((p.embeddings, p.dimensions), (2, 3));
    }

    #[test]
    fn missing_required_fields_are_reported() {
        let config = MockConfig::default();
        let err = Plan::from_request(Kind::Chat, &json!({"model": "m"}), &config)
            .expect_err("messages missing");
        assert_eq!(err.param, Some("messages"));
    }
}
