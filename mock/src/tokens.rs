//! The mock's token "truth": real `o200k_base` counts (the encoding of every current OpenAI
//! chat model), arranged the way OpenAI's own examples count chat prompts. Images, audio and
//! tools are not counted, so a client's estimate is at or above the mock's usage, as it
//! should be against the real service.

use serde_json::Value;

/// Above this, text is counted at one token per 4 bytes instead: BPE merging is quadratic in
/// the length of a single piece, and the mock must stay fast on adversarial test prompts.
const EXACT_COUNT_LIMIT: usize = 64 * 1024;

/// Tokens of a text with `o200k_base` (the tables are built once, on first use).
pub(crate) fn text_tokens(text: &str) -> u64 {
    if text.len() > EXACT_COUNT_LIMIT {
        return (text.len() as u64).div_ceil(4);
    }
    tiktoken_rs::o200k_base_singleton()
        .encode_ordinary(text)
        .len() as u64
}

/// A message content: a string, or an array of parts of which those with a `text` count (each
/// part rounded up on its own). Images, audio and anything else count nothing.
pub(crate) fn content_tokens(content: &Value) -> u64 {
    match content {
        Value::String(text) => text_tokens(text),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .map(text_tokens)
            .sum(),
        _ => 0,
    }
}

/// Chat prompt tokens the way OpenAI's examples count them: 3 per message, plus its role,
/// content and name, plus 1 per name, plus 3 for priming the reply.
pub(crate) fn chat_tokens<'a>(messages: impl IntoIterator<Item = &'a Value>) -> u64 {
    messages.into_iter().map(message_tokens).sum::<u64>() + 3
}

/// One chat message (or Responses API input item): 3, plus its role, content and name, plus 1
/// per name.
pub(crate) fn message_tokens(message: &Value) -> u64 {
    let field = |name: &str| message.get(name).and_then(Value::as_str);
    let name = field("name").map_or(0, |name| text_tokens(name) + 1);
    3 + field("role").map_or(0, text_tokens)
        + message.get("content").map_or(0, content_tokens)
        + name
}

/// A Responses API request counted as a chat: `instructions` as a system message, a string
/// `input` as a user message, an array `input` as messages.
pub(crate) fn responses_tokens(request: &Value) -> u64 {
    let instructions = request
        .get("instructions")
        .and_then(Value::as_str)
        .map_or(0, |text| 3 + text_tokens("system") + text_tokens(text));
    let input = match request.get("input") {
        Some(Value::String(text)) => 3 + text_tokens("user") + text_tokens(text),
        Some(Value::Array(items)) => items.iter().map(message_tokens).sum(),
        _ => 0,
    };
    instructions + input + 3
}

/// An embeddings `input` or a legacy `prompt`: a string, an array of strings, an array of token
/// ids or an array of arrays of token ids (ids count one each). Returns (tokens, how many inputs).
pub(crate) fn input_tokens(input: &Value) -> (u64, u64) {
    match input {
        Value::String(text) => (text_tokens(text), 1),
        Value::Array(items) if items.iter().all(Value::is_number) => (items.len() as u64, 1),
        Value::Array(items) => {
            let tokens = items
                .iter()
                .map(|item| match item {
                    Value::String(text) => text_tokens(text),
                    Value::Array(ids) => ids.len() as u64,
                    _ => 0,
                })
                .sum();
            (tokens, items.len() as u64)
        }
        _ => (0, 1),
    }
}

/// The words generated for one choice: `tok0 tok1 ...`, one token each.
pub(crate) fn generated_text(tokens: u64) -> String {
    (0..tokens).map(token_piece).collect()
}

/// The `k`-th generated token as it appears in a stream delta; the pieces concatenate to
/// [`generated_text`].
pub(crate) fn token_piece(k: u64) -> String {
    if k == 0 {
        "tok0".to_owned()
    } else {
        format!(" tok{k}")
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn text_is_counted_with_o200k() {
        assert_eq!(text_tokens(""), 0);
        assert_eq!(text_tokens("hello world"), 2);
        assert_eq!(text_tokens("hello"), 1);
        // Past the exact-count limit: a quarter of the bytes, rounded up.
        assert_eq!(
            text_tokens(&"a".repeat(EXACT_COUNT_LIMIT + 2)),
            (EXACT_COUNT_LIMIT as u64 + 2).div_ceil(4)
        );
    }

    #[test]
    fn chat_counts_messages_roles_names_and_priming() {
        let messages = json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "name": "bob", "content": [{"type": "text", "text": "hello"}, {"type": "image_url", "image_url": {"url": "x"}}]},
        ]);
        let messages = messages.as_array().expect("array literal");
        let t = text_tokens;
        let expected =
            (3 + t("system") + t("be brief")) + (3 + t("user") + t("hello") + t("bob") + 1) + 3;
        assert_eq!(chat_tokens(messages), expected);
    }

    #[test]
    fn responses_count_instructions_and_input_as_messages() {
        let t = text_tokens;
        let request = json!({"instructions": "be", "input": "hello world"});
        assert_eq!(
            responses_tokens(&request),
            (3 + t("system") + t("be")) + (3 + t("user") + t("hello world")) + 3
        );
        let request = json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": "hello"}]}]});
        assert_eq!(responses_tokens(&request), 3 + t("user") + t("hello") + 3);
    }

    #[test]
    fn inputs_of_every_shape() {
        let t = text_tokens;
        assert_eq!(input_tokens(&json!("hello world")), (2, 1));
        assert_eq!(
            input_tokens(&json!(["abcd", "abcdefgh"])),
            (t("abcd") + t("abcdefgh"), 2)
        );
        assert_eq!(input_tokens(&json!([1, 2, 3])), (3, 1));
        assert_eq!(input_tokens(&json!([[1, 2], [3]])), (3, 2));
    }

    #[test]
    fn generated_pieces_concatenate_to_the_text() {
        assert_eq!(generated_text(3), "tok0 tok1 tok2");
        let pieces: String = (0..3).map(token_piece).collect();
        assert_eq!(pieces, generated_text(3));
        assert_eq!(generated_text(0), "");
    }
}
