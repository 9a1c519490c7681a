//! Prompt tokens of a Responses API request.
//!
//! OpenAI publishes no formula for the Responses API; its input is chat messages in another
//! shape, so it is counted with the chat framing: `instructions` as a developer message,
//! `input` as a user message or a list of items (each framed like a message), plus tools and
//! the structured-output schema, plus the reply priming.
//!
//! Conversation state stored upstream (`previous_response_id`, `conversation`) is not in the
//! request and is not counted; the settled usage corrects for it.

use serde_json::{Map, Value};

use super::chat::{self, REPLY_PRIMING, TOKENS_PER_MESSAGE};
use super::{field, invalid, kind, Counter, EstimateError};

/// Prompt tokens of a Responses request. `input`, when present, must be a string or an array.
pub(super) fn prompt_tokens(
    counter: &Counter<'_>,
    request: &Map<String, Value>,
) -> Result<u64, EstimateError> {
    let mut tokens = REPLY_PRIMING;
    if let Some(instructions) = field(request, "instructions") {
        tokens += TOKENS_PER_MESSAGE + counter.text("developer") + counter.value(instructions);
    }
    tokens += match field(request, "input") {
        None => 0,
        Some(Value::String(text)) => TOKENS_PER_MESSAGE + counter.text("user") + counter.text(text),
        Some(Value::Array(items)) => items.iter().map(|i| item(counter, i)).sum(),
        Some(other) => {
            return Err(invalid(
                "input",
                format!("expected a string or an array, found {}", kind(other)),
            ))
        }
    };
    tokens += chat::tool_definitions(counter, request)?;
    if let Some(format) = field(request, "text").and_then(|text| text.get("format")) {
        if format.get("type").and_then(Value::as_str) == Some("json_schema") {
            tokens += counter.value(format);
        }
    }
    // A stored prompt template: its text is upstream, but its variables are here.
    if let Some(prompt) = field(request, "prompt") {
        tokens += counter.value(prompt);
    }
    Ok(tokens)
}

/// One input item: a message (role and content, `type` optional), a function call (name and
/// arguments) or its output; any other item (reasoning, item references, built-in tool calls)
/// counts its JSON text.
fn item(counter: &Counter<'_>, item: &Value) -> u64 {
    let Value::Object(fields) = item else {
        return TOKENS_PER_MESSAGE + counter.value(item);
    };
    let item_type = fields.get("type").and_then(Value::as_str);
    let is_message =
        item_type == Some("message") || (item_type.is_none() && fields.contains_key("role"));
    TOKENS_PER_MESSAGE
        + if is_message {
            fields.get("role").map_or(0, |r| counter.value(r))
                + fields
                    .get("content")
                    .map_or(0, |c| chat::content(counter, c))
        } else {
            match item_type {
                Some("function_call") => chat::function_call(counter, item),
                Some("custom_tool_call") => ["name", "input"]
                    .iter()
                    .filter_map(|k| fields.get(*k))
                    .map(|v| counter.value(v))
                    .sum(),
                Some("function_call_output" | "custom_tool_call_output") => fields
                    .get("output")
                    .map_or(0, |output| chat::content(counter, output)),
                _ => counter.value(item),
            }
        }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn counter() -> Counter<'static> {
        super::super::test_counter()
    }

    fn tokens(request: Value) -> Result<u64, EstimateError> {
        let Value::Object(request) = request else {
            panic!("test requests are objects");
        };
        prompt_tokens(&counter(), &request)
    }

    fn text(s: &str) -> u64 {
        counter().text(s)
    }

    #[test]
    fn counts_instructions_and_string_input_as_messages() {
        let got = tokens(json!({"instructions": "Be brief.", "input": "hello world"}));
        let want = REPLY_PRIMING
            + (TOKENS_PER_MESSAGE + text("developer") + text("Be brief."))
            + (TOKENS_PER_MESSAGE + text("user") + text("hello world"));
        assert_eq!(got.expect("valid"), want);
    }

    #[test]
    fn counts_items() {
        let reasoning = json!({"type": "reasoning", "id": "rs_1", "summary": []});
        let request = json!({"input": [
            {"role": "user", "content": [
                {"type": "input_text", "text": "What is in this image?"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
            ]},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "A cat.", "annotations": []}]},
            {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "found"},
            reasoning,
        ]});
        let want = REPLY_PRIMING
            + (TOKENS_PER_MESSAGE
                + text("user")
                + text("What is in this image?")
                + chat::IMAGE_LOW_DETAIL_TOKENS)
            + (TOKENS_PER_MESSAGE + text("assistant") + text("A cat."))
            + (TOKENS_PER_MESSAGE + text("lookup") + text("{}"))
            + (TOKENS_PER_MESSAGE + text("found"))
            + (TOKENS_PER_MESSAGE + text(&reasoning.to_string()));
        assert_eq!(tokens(request).expect("valid"), want);
    }

    #[test]
    fn counts_flat_function_tools_and_schemas() {
        let parameters = json!({"type": "object", "properties": {}});
        let format = json!({"type": "json_schema", "name": "a", "schema": {"type": "object"}});
        let request = json!({
            "input": [],
            "tools": [{"type": "function", "name": "f", "description": "d",
                       "parameters": parameters}],
            "text": {"format": format},
        });
        let want = REPLY_PRIMING
            + chat::TOKENS_PER_TOOL
            + text("f")
            + text("d")
            + text(&parameters.to_string())
            + text(&format.to_string());
        assert_eq!(tokens(request).expect("valid"), want);
    }

    #[test]
    fn rejects_input_of_the_wrong_shape() {
        assert!(matches!(
            tokens(json!({"input": 5})),
            Err(EstimateError::InvalidField { field: "input", .. })
        ));
        assert_eq!(
            tokens(json!({"input": null})).expect("valid"),
            REPLY_PRIMING
        );
    }
}
