//! Prompt tokens of a chat completions request, counted the way OpenAI's cookbook does:
//! 3 tokens per message, plus the tokens of its role, content and name, plus 1 per name, plus
//! 3 for priming the reply. Tools and response formats add their text.
//!
//! The pieces shared with the Responses API (content parts, tool definitions) live here too.

use serde_json::{Map, Value};

use super::{field, invalid, kind, Counter, EstimateError};

/// The framing every message adds (`<|start|>{role}\n{content}<|end|>\n` in the cookbook).
pub(super) const TOKENS_PER_MESSAGE: u64 = 3;

/// A message's `name` costs one token beyond its text.
const TOKENS_PER_NAME: u64 = 1;

/// Every reply is primed with `<|start|>assistant<|message|>`.
pub(super) const REPLY_PRIMING: u64 = 3;

/// An image part at `detail: "low"`: one 512 px tile, OpenAI's documented base cost for
/// gpt-4o-class models. Also used for `auto` and unset detail, which OpenAI resolves from the
/// image's size; an approximation, corrected by the usage that comes back.
pub(super) const IMAGE_LOW_DETAIL_TOKENS: u64 = 85;

/// An image part at `detail: "high"`: the base 85 plus 170 per 512 px tile, for the four tiles
/// of a typical image scaled to 768 px on its short side. Larger, non-square images can cost
/// more (and other model families price differently); an approximation like the above.
const IMAGE_HIGH_DETAIL_TOKENS: u64 = 765;

/// An audio part. Its token cost depends on its duration, which only decoding would tell,
/// and OpenAI does not publish the rate; usage reports are on the order of 10 to 25 tokens
/// per second of speech, so this covers roughly a minute. Longer clips are under-reserved
/// until the actual usage is settled.
pub(super) const AUDIO_PART_TOKENS: u64 = 1000;

/// Each tool or function definition, beyond the text counted: OpenAI renders definitions as
/// TypeScript-like declarations (`type name = (_: {...}) => any;` under a `namespace
/// functions` header) and does not publish the cost. The parameters are counted as compact
/// JSON, which is already longer than that rendering, so a small allowance covers the rest.
pub(super) const TOKENS_PER_TOOL: u64 = 10;

/// Prompt tokens of a chat completions request: its `messages`, and its `tools` or
/// `functions`, `response_format` and `prediction`. `messages` must be an array of objects.
pub(super) fn prompt_tokens(
    counter: &Counter<'_>,
    request: &Map<String, Value>,
) -> Result<u64, EstimateError> {
    let messages = match field(request, "messages") {
        Some(Value::Array(messages)) => messages,
        Some(other) => {
            return Err(invalid(
                "messages",
                format!("expected an array, found {}", kind(other)),
            ))
        }
        None => return Err(invalid("messages", "missing")),
    };
    let mut tokens = REPLY_PRIMING;
    for message in messages {
        tokens += self::message(counter, message)?;
    }
    tokens += tool_definitions(counter, request)?;
    if let Some(Value::Object(format)) = field(request, "response_format") {
        if let Some(schema) = format.get("json_schema") {
            tokens += counter.value(schema);
        }
    }
    // Predicted output is not prompt text, but OpenAI processes it with the prompt; counting
    // it keeps the estimate on the safe side.
    if let Some(Value::Object(prediction)) = field(request, "prediction") {
        tokens += prediction.get("content").map_or(0, |c| content(counter, c));
    }
    Ok(tokens)
}

fn message(counter: &Counter<'_>, message: &Value) -> Result<u64, EstimateError> {
    let Value::Object(message) = message else {
        return Err(invalid(
            "messages",
            format!("each message must be an object, found {}", kind(message)),
        ));
    };
    let mut tokens = TOKENS_PER_MESSAGE;
    for (key, value) in message {
        tokens += match key.as_str() {
            "role" | "tool_call_id" | "refusal" => counter.value(value),
            "content" => content(counter, value),
            "name" if !value.is_null() => TOKENS_PER_NAME + counter.value(value),
            "name" => 0,
            "tool_calls" => match value {
                Value::Array(calls) => calls.iter().map(|call| tool_call(counter, call)).sum(),
                other => counter.value(other),
            },
            "function_call" => function_call(counter, value),
            // A reference to an earlier audio reply ({"id": ...}): its transcript is not here.
            "audio" if !value.is_null() => AUDIO_PART_TOKENS,
            // Unknown fields may be shown to the model; their JSON text is an upper bound.
            _ => counter.text(key) + counter.value(value),
        };
    }
    Ok(tokens)
}

/// Tokens of message content: a string, or an array of parts.
pub(super) fn content(counter: &Counter<'_>, content: &Value) -> u64 {
    match content {
        Value::Array(parts) => parts.iter().map(|p| part(counter, p)).sum(),
        other => counter.value(other),
    }
}

/// Tokens of one content part, of chat (`text`, `image_url`, `input_audio`, `refusal`) or of
/// the Responses API (`input_text`, `output_text`, `input_image`). Images and audio get fixed
/// estimates, never their URL or base64 data; any other part, its JSON text.
fn part(counter: &Counter<'_>, part: &Value) -> u64 {
    let Value::Object(fields) = part else {
        return counter.value(part);
    };
    match fields.get("type").and_then(Value::as_str) {
        Some("text" | "input_text" | "output_text") => {
            fields.get("text").map_or(0, |t| counter.value(t))
        }
        Some("refusal") => fields.get("refusal").map_or(0, |t| counter.value(t)),
        Some("image_url" | "input_image") => image(fields),
        Some("input_audio") => AUDIO_PART_TOKENS,
        _ => counter.value(part),
    }
}

/// An image part: chat puts `detail` in the `image_url` object, Responses beside it.
fn image(fields: &Map<String, Value>) -> u64 {
    let detail = fields
        .get("detail")
        .or_else(|| fields.get("image_url").and_then(|url| url.get("detail")))
        .and_then(Value::as_str);
    if detail == Some("high") {
        IMAGE_HIGH_DETAIL_TOKENS
    } else {
        IMAGE_LOW_DETAIL_TOKENS
    }
}

/// An assistant's tool call: its function's name and arguments (`custom` tools: name and
/// input).
fn tool_call(counter: &Counter<'_>, call: &Value) -> u64 {
    if let Some(function) = call.get("function") {
        function_call(counter, function)
    } else if let Some(Value::Object(custom)) = call.get("custom") {
        ["name", "input"]
            .iter()
            .filter_map(|k| custom.get(*k))
            .map(|v| counter.value(v))
            .sum()
    } else {
        counter.value(call)
    }
}

/// A function call (`{"name": ..., "arguments": "..."}`): its name and arguments text.
pub(super) fn function_call(counter: &Counter<'_>, call: &Value) -> u64 {
    match call {
        Value::Object(call) => ["name", "arguments"]
            .iter()
            .filter_map(|k| call.get(*k))
            .map(|v| counter.value(v))
            .sum(),
        other => counter.value(other),
    }
}

/// Tokens of a request's `tools` and legacy `functions`, which must be arrays when present.
///
/// A function tool counts its name, description and the JSON text of its parameters, nested
/// (chat: `{"type": "function", "function": {...}}`) or flat (Responses); other tools (web
/// search, MCP, custom grammars) count their JSON text. Each adds [`TOKENS_PER_TOOL`].
pub(super) fn tool_definitions(
    counter: &Counter<'_>,
    request: &Map<String, Value>,
) -> Result<u64, EstimateError> {
    let mut tokens = 0;
    for name in ["tools", "functions"] {
        let tools = match field(request, name) {
            None => continue,
            Some(Value::Array(tools)) => tools,
            Some(other) => {
                return Err(invalid(
                    name,
                    format!("expected an array, found {}", kind(other)),
                ))
            }
        };
        for tool in tools {
            tokens += TOKENS_PER_TOOL + tool_definition(counter, tool);
        }
    }
    Ok(tokens)
}

fn tool_definition(counter: &Counter<'_>, tool: &Value) -> u64 {
    let function = match tool.get("type").and_then(Value::as_str) {
        Some("function") => tool.get("function").unwrap_or(tool),
        // Legacy `functions` entries have no type.
        None if tool.get("name").is_some() => tool,
        _ => return counter.value(tool),
    };
    let Value::Object(function) = function else {
        return counter.value(function);
    };
    ["name", "description", "parameters"]
        .iter()
        .filter_map(|k| function.get(*k))
        .map(|v| counter.value(v))
        .sum()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn counter() -> Counter<'static> {
        super::super::test_counter()
    }

    fn tokens(request: Value) -> u64 {
        let Value::Object(request) = request else {
            panic!("test requests are objects");
        };
        prompt_tokens(&counter(), &request).expect("valid request")
    }

    fn text(s: &str) -> u64 {
        counter().text(s)
    }

    #[test]
    fn counts_messages_like_the_cookbook() {
        let request = json!({"messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "name": "alice", "content": "What is 2 + 2?"},
        ]});
        let want = REPLY_PRIMING
            + (TOKENS_PER_MESSAGE + text("system") + text("You are a helpful assistant."))
            + (TOKENS_PER_MESSAGE
                + text("user")
                + TOKENS_PER_NAME
                + text("alice")
                + text("What is 2 + 2?"));
        assert_eq!(tokens(request), want);
        // Framing 3 + "user" 1 + "hello world" 2 + priming 3.
        let hello = json!({"messages": [{"role": "user", "content": "hello world"}]});
        assert_eq!(tokens(hello), 9);
    }

    #[test]
    fn counts_text_parts_and_fixed_costs_for_images_and_audio() {
        let data_url = format!("data:image/png;base64,{}", "A".repeat(100_000));
        let request = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "Describe these."},
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "high"}},
            {"type": "input_audio", "input_audio": {"data": "UklGR", "format": "wav"}},
        ]}]});
        let want = REPLY_PRIMING
            + TOKENS_PER_MESSAGE
            + text("user")
            + text("Describe these.")
            + IMAGE_LOW_DETAIL_TOKENS
            + IMAGE_HIGH_DETAIL_TOKENS
            + AUDIO_PART_TOKENS;
        assert_eq!(tokens(request), want);
    }

    #[test]
    fn unknown_parts_and_fields_count_their_json_text() {
        let part = json!({"type": "hologram", "data": "xyz"});
        let request = json!({"messages": [
            {"role": "user", "content": [part.clone()], "weight": 1}
        ]});
        let want = REPLY_PRIMING
            + TOKENS_PER_MESSAGE
            + text("user")
            + text(&part.to_string())
            + text("weight")
            + text("1");
        assert_eq!(tokens(request), want);
    }

    #[test]
    fn counts_tool_calls_and_tool_results() {
        let request = json!({"messages": [
            {"role": "assistant", "content": null, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}
            }]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
            {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
        ]});
        let want = REPLY_PRIMING
            + (TOKENS_PER_MESSAGE
                + text("assistant")
                + text("get_weather")
                + text("{\"city\":\"Paris\"}"))
            + (TOKENS_PER_MESSAGE + text("tool") + text("call_1") + text("18C and sunny"))
            + (TOKENS_PER_MESSAGE + text("assistant") + text("f") + text("{}"));
        assert_eq!(tokens(request), want);
    }

    #[test]
    fn counts_tool_definitions_and_response_schemas() {
        let parameters = json!({"type": "object", "properties": {"city": {"type": "string"}}});
        let schema = json!({"name": "answer", "schema": {"type": "object"}});
        let base = json!({"messages": []});
        let mut request = base.clone();
        request["tools"] = json!([
            {"type": "function", "function": {
                "name": "get_weather", "description": "Weather now", "parameters": parameters
            }},
            {"type": "web_search"},
        ]);
        request["functions"] = json!([{"name": "legacy", "parameters": parameters}]);
        request["response_format"] = json!({"type": "json_schema", "json_schema": schema});
        let want = tokens(base)
            + (TOKENS_PER_TOOL
                + text("get_weather")
                + text("Weather now")
                + text(&parameters.to_string()))
            + (TOKENS_PER_TOOL + text(&json!({"type": "web_search"}).to_string()))
            + (TOKENS_PER_TOOL + text("legacy") + text(&parameters.to_string()))
            + text(&schema.to_string());
        assert_eq!(tokens(request), want);
    }

    #[test]
    fn rejects_messages_and_tools_of_the_wrong_shape() {
        let cases = [
            (json!({}), "messages"),
            (json!({"messages": "hi"}), "messages"),
            (json!({"messages": ["hi"]}), "messages"),
            (json!({"messages": [], "tools": {}}), "tools"),
            (json!({"messages": [], "functions": 1}), "functions"),
        ];
        for (request, want) in cases {
            let Value::Object(request) = request else {
                panic!("test requests are objects");
            };
            match prompt_tokens(&counter(), &request) {
                Err(EstimateError::InvalidField { field, .. }) => assert_eq!(field, want),
                other => panic!("{request:?}: {other:?}"),
            }
        }
    }
}
