//! Output tokens a request reserves.
//!
//! OpenAI charges a request's output cap at admission, whatever it then generates, and `n`
//! choices reserve the cap `n` times. What it reserves when a request gives no cap is not
//! documented, so that is configured per model ([`OutputDefaults`]).

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::{base_model, field, invalid, kind, EstimateError};

/// Output tokens reserved when a request gives no cap, per model, with a fallback.
#[derive(Clone, Debug)]
pub struct OutputDefaults {
    by_model: HashMap<String, u64>,
    fallback: u64,
}

impl OutputDefaults {
    /// `by_model` maps model names or name prefixes (`gpt-4o` covers `gpt-4o-2024-08-06`) to
    /// the tokens reserved; `fallback` applies to every other model.
    pub fn new(by_model: HashMap<String, u64>, fallback: u64) -> Self {
        Self { by_model, fallback }
    }

    /// The tokens reserved for an uncapped request to `model`: the entry for the exact model,
    /// else for the model with its `ft:` wrapping stripped, else for the longest configured
    /// key that is a prefix of that, else the fallback.
    pub fn for_model(&self, model: &str) -> u64 {
        let base = base_model(model);
        self.by_model
            .get(model)
            .or_else(|| self.by_model.get(base))
            .or_else(|| {
                self.by_model
                    .iter()
                    .filter(|(key, _)| base.starts_with(key.as_str()))
                    .max_by_key(|(key, _)| key.len())
                    .map(|(_, tokens)| tokens)
            })
            .copied()
            .unwrap_or(self.fallback)
    }
}

impl Default for OutputDefaults {
    /// 4096 tokens for every model.
    fn default() -> Self {
        Self::new(HashMap::new(), 4096)
    }
}

/// Output tokens a request reserves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Reserved {
    pub(super) tokens: u64,
    /// Whether `tokens` is a cap the API enforces (the request's own, or the API's default),
    /// rather than sluice's guess from [`OutputDefaults`].
    pub(super) capped: bool,
}

/// Chat completions: (`max_completion_tokens` or `max_tokens`, else the default) * `n`.
/// When both caps are given the larger counts.
pub(super) fn chat(
    request: &Map<String, Value>,
    model: &str,
    defaults: &OutputDefaults,
) -> Result<Reserved, EstimateError> {
    let cap = match (
        count(request, "max_completion_tokens")?,
        count(request, "max_tokens")?,
    ) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (cap, None) | (None, cap) => cap,
    };
    let n = choices(request, "n")?;
    Ok(Reserved {
        tokens: cap
            .unwrap_or_else(|| defaults.for_model(model))
            .saturating_mul(n),
        capped: cap.is_some(),
    })
}

/// Responses: `max_output_tokens`, else the default. (The Responses API has no `n`.)
pub(super) fn responses(
    request: &Map<String, Value>,
    model: &str,
    defaults: &OutputDefaults,
) -> Result<Reserved, EstimateError> {
    let cap = count(request, "max_output_tokens")?;
    Ok(Reserved {
        tokens: cap.unwrap_or_else(|| defaults.for_model(model)),
        capped: cap.is_some(),
    })
}

/// Legacy completions: `max_tokens` (the API's default is 16) * max(`n`, `best_of`), since
/// `best_of` completions are generated and `n` of them returned. Always capped.
pub(super) fn completions(request: &Map<String, Value>) -> Result<Reserved, EstimateError> {
    const DEFAULT_MAX_TOKENS: u64 = 16;
    let cap = count(request, "max_tokens")?.unwrap_or(DEFAULT_MAX_TOKENS);
    let choices = choices(request, "n")?.max(choices(request, "best_of")?);
    Ok(Reserved {
        tokens: cap.saturating_mul(choices),
        capped: true,
    })
}

/// A number of choices: 1 when unset; 0 counts as 1 (the API rejects it anyway).
fn choices(request: &Map<String, Value>, name: &'static str) -> Result<u64, EstimateError> {
    Ok(count(request, name)?.unwrap_or(1).max(1))
}

/// A non-negative integer field; `None` when absent or null.
fn count(request: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, EstimateError> {
    match field(request, name) {
        None => Ok(None),
        Some(value) => value.as_u64().map(Some).ok_or_else(|| {
            invalid(
                name,
                format!("expected a non-negative integer, found {}", describe(value)),
            )
        }),
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Number(n) => n.to_string(),
        other => kind(other).to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    fn defaults() -> OutputDefaults {
        OutputDefaults::new(
            HashMap::from([
                ("gpt-4o".to_owned(), 1000),
                ("gpt-4o-mini".to_owned(), 500),
                ("gpt-4o-mini-2024-07-18".to_owned(), 700),
                ("ft:gpt-4o:acme:x:1".to_owned(), 42),
            ]),
            4096,
        )
    }

    #[test]
    fn defaults_prefer_exact_then_fine_tune_base_then_longest_prefix() {
        let d = defaults();
        assert_eq!(d.for_model("ft:gpt-4o:acme:x:1"), 42);
        assert_eq!(d.for_model("gpt-4o-mini-2024-07-18"), 700);
        assert_eq!(d.for_model("ft:gpt-4o-mini-2024-07-18:acme:y:2"), 700);
        assert_eq!(d.for_model("gpt-4o-mini-2025-01-01"), 500);
        assert_eq!(d.for_model("ft:gpt-4o-mini-2025:acme:z:3"), 500);
        assert_eq!(d.for_model("gpt-4o-2024-08-06"), 1000);
        assert_eq!(d.for_model("gpt-4.1"), 4096);
        assert_eq!(d.for_model("llama3:8b"), 4096);
        assert_eq!(OutputDefaults::default().for_model("gpt-4o"), 4096);
    }

    #[test]
    fn chat_reserves_the_cap_times_n() {
        let d = defaults();
        let cases = [
            (json!({"max_tokens": 100}), 100, true),
            (json!({"max_completion_tokens": 200, "n": 3}), 600, true),
            (
                json!({"max_completion_tokens": 200, "max_tokens": 50}),
                200,
                true,
            ),
            (json!({"max_tokens": null, "n": null}), 1000, false),
            (json!({"n": 2}), 2000, false),
            (json!({"max_tokens": 0}), 0, true),
            (json!({"max_tokens": u64::MAX, "n": 2}), u64::MAX, true),
        ];
        for (request, tokens, capped) in cases {
            let got = chat(&object(request.clone()), "gpt-4o", &d).expect("valid");
            assert_eq!(got, Reserved { tokens, capped }, "{request}");
        }
    }

    #[test]
    fn responses_reserve_max_output_tokens() {
        let d = defaults();
        let got = responses(&object(json!({"max_output_tokens": 300})), "gpt-4o", &d);
        let want = Reserved {
            tokens: 300,
            capped: true,
        };
        assert_eq!(got.expect("valid"), want);
        let got = responses(&object(json!({})), "gpt-5", &d);
        let want = Reserved {
            tokens: 4096,
            capped: false,
        };
        assert_eq!(got.expect("valid"), want);
    }

    #[test]
    fn legacy_completions_default_to_16_times_best_of() {
        let cases = [
            (json!({}), 16),
            (json!({"max_tokens": 10, "n": 2}), 20),
            (json!({"max_tokens": 10, "n": 2, "best_of": 5}), 50),
            (json!({"best_of": 3}), 48),
        ];
        for (request, tokens) in cases {
            let got = completions(&object(request.clone())).expect("valid");
            assert_eq!(
                got,
                Reserved {
                    tokens,
                    capped: true
                },
                "{request}"
            );
        }
    }

    #[test]
    fn caps_that_are_not_counts_are_invalid() {
        let d = defaults();
        for request in [
            json!({"max_tokens": -1}),
            json!({"max_tokens": 1.5}),
            json!({"max_completion_tokens": "100"}),
            json!({"n": true}),
        ] {
            let err = chat(&object(request.clone()), "gpt-4o", &d);
            assert!(
                matches!(err, Err(EstimateError::InvalidField { .. })),
                "{request}"
            );
        }
        let err = completions(&object(json!({"best_of": [1]})));
        assert!(matches!(
            err,
            Err(EstimateError::InvalidField {
                field: "best_of",
                ..
            })
        ));
    }
}
