//! Prompt tokens of the endpoints whose input is text or token ids: legacy completions
//! (`prompt`) and embeddings (`input`). Each accepts a string, an array of strings, an array
//! of token ids or an array of arrays of token ids; a token id is one token, and there is no
//! message framing.

use serde_json::{Map, Value};

use super::{field, invalid, kind, Counter, EstimateError};

/// Legacy completions: `prompt` plus `suffix`. No prompt means the API's default, the single
/// `<|endoftext|>` token.
pub(super) fn prompt_tokens(
    counter: &Counter<'_>,
    request: &Map<String, Value>,
) -> Result<u64, EstimateError> {
    let prompt = match field(request, "prompt") {
        None => 1,
        Some(prompt) => text_or_ids(counter, "prompt", prompt)?,
    };
    let suffix = field(request, "suffix").map_or(0, |s| counter.value(s));
    Ok(prompt + suffix)
}

/// Embeddings: `input`, which is required.
pub(super) fn embeddings_tokens(
    counter: &Counter<'_>,
    request: &Map<String, Value>,
) -> Result<u64, EstimateError> {
    match field(request, "input") {
        None => Err(invalid("input", "missing")),
        Some(input) => text_or_ids(counter, "input", input),
    }
}

fn text_or_ids(
    counter: &Counter<'_>,
    name: &'static str,
    value: &Value,
) -> Result<u64, EstimateError> {
    let wrong = |found: &Value| {
        invalid(
            name,
            format!(
                "expected a string, an array of strings, an array of token ids or an array of \
                 arrays of token ids, found {} in it",
                kind(found)
            ),
        )
    };
    match value {
        Value::String(text) => Ok(counter.text(text)),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => Ok(counter.text(text)),
                Value::Number(_) => Ok(1),
                Value::Array(ids) => match ids.iter().find(|id| !id.is_number()) {
                    None => Ok(ids.len() as u64),
                    Some(other) => Err(wrong(other)),
                },
                other => Err(wrong(other)),
            })
            .sum(),
        other => Err(wrong(other)),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tokenizer::tests::tokenizers;
    use super::super::Encoding;
    use super::*;

    fn counter() -> Counter<'static> {
        Counter {
            tokenizers: tokenizers(),
            encoding: Encoding::Cl100kBase,
        }
    }

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    #[test]
    fn counts_every_shape_of_input() {
        let c = counter();
        let cases = [
            (json!("hello world"), 2),
            (json!(["hello world", "hello world"]), 4),
            (json!([15339, 1917]), 2),
            (json!([[15339, 1917], [15339], []]), 3),
            (json!([]), 0),
        ];
        for (input, want) in cases {
            let request = object(json!({ "input": input.clone() }));
            assert_eq!(
                embeddings_tokens(&c, &request).expect("valid"),
                want,
                "{input}"
            );
            let request = object(json!({ "prompt": input.clone() }));
            assert_eq!(prompt_tokens(&c, &request).expect("valid"), want, "{input}");
        }
    }

    #[test]
    fn legacy_prompt_defaults_to_one_token_and_adds_the_suffix() {
        let c = counter();
        assert_eq!(prompt_tokens(&c, &object(json!({}))).expect("valid"), 1);
        let request = object(json!({"prompt": "hello", "suffix": " world"}));
        assert_eq!(prompt_tokens(&c, &request).expect("valid"), 2);
    }

    #[test]
    fn rejects_other_shapes() {
        let c = counter();
        for input in [
            json!(5),
            json!({"a": 1}),
            json!([true]),
            json!([["a"]]),
            json!([{}]),
        ] {
            let request = object(json!({ "input": input.clone() }));
            assert!(
                matches!(
                    embeddings_tokens(&c, &request),
                    Err(EstimateError::InvalidField { field: "input", .. })
                ),
                "{input}"
            );
        }
        assert!(matches!(
            embeddings_tokens(&c, &object(json!({}))),
            Err(EstimateError::InvalidField { field: "input", .. })
        ));
    }
}
