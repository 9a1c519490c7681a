//! Response bodies and SSE events shaped like OpenAI's, complete enough for the official SDKs
//! to parse: every required field is present.

use bytes::Bytes;
use serde_json::{json, Value};

use crate::request::Plan;
use crate::tokens::{generated_text, token_piece};

const SYSTEM_FINGERPRINT: &str = "fp_mock";
const DONE: &[u8] = b"data: [DONE]\n\n";

/// Identity of one generated object.
pub(crate) struct Generation<'a> {
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
    pub plan: &'a Plan,
}

fn data_frame(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn chat_usage(plan: &Plan) -> Value {
    let completion = plan.completion_tokens();
    json!({
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": plan.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    })
}

fn legacy_usage(plan: &Plan) -> Value {
    let completion = plan.completion_tokens();
    json!({
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": plan.prompt_tokens + completion,
    })
}

pub(crate) fn chat_body(g: &Generation<'_>) -> Value {
    let text = generated_text(g.plan.output_per_choice);
    let choices: Vec<Value> = (0..g.plan.choices)
        .map(|index| {
            json!({
                "index": index,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": null,
                    "annotations": [],
                },
                "logprobs": null,
                "finish_reason": g.plan.finish_reason,
            })
        })
        .collect();
    json!({
        "id": g.id,
        "object": "chat.completion",
        "created": g.created,
        "model": g.model,
        "choices": choices,
        "usage": chat_usage(g.plan),
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    })
}

/// A role chunk per choice, one chunk per token per choice, a finish chunk per choice, the usage
/// chunk when asked for, then `[DONE]`. Like OpenAI, chunks carry `"usage": null` only when
/// usage was asked for.
pub(crate) fn chat_events(g: &Generation<'_>) -> Vec<Bytes> {
    let plan = g.plan;
    let chunk = |choices: Value| {
        let mut chunk = json!({
            "id": g.id,
            "object": "chat.completion.chunk",
            "created": g.created,
            "model": g.model,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        });
        if plan.include_usage {
            insert(&mut chunk, "usage", Value::Null);
        }
        chunk
    };
    let choice = |index: u64, delta: Value, finish: Value| json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    let mut events = Vec::new();
    for index in 0..plan.choices {
        let delta = json!({"role": "assistant", "content": "", "refusal": null});
        events.push(data_frame(&chunk(choice(index, delta, Value::Null))));
    }
    for k in 0..plan.output_per_choice {
        for index in 0..plan.choices {
            let delta = json!({"content": token_piece(k)});
            events.push(data_frame(&chunk(choice(index, delta, Value::Null))));
        }
    }
    for index in 0..plan.choices {
        let finish = Value::from(plan.finish_reason);
        events.push(data_frame(&chunk(choice(index, json!({}), finish))));
    }
    if plan.include_usage {
        let mut last = chunk(json!([]));
        insert(&mut last, "usage", chat_usage(plan));
        events.push(data_frame(&last));
    }
    events.push(Bytes::from_static(DONE));
    events
}

pub(crate) fn completion_body(g: &Generation<'_>) -> Value {
    let text = generated_text(g.plan.output_per_choice);
    let choices: Vec<Value> = (0..g.plan.choices)
        .map(|index| {
            json!({
                "text": text,
                "index": index,
                "logprobs": null,
                "finish_reason": g.plan.finish_reason,
            })
        })
        .collect();
    json!({
        "id": g.id,
        "object": "text_completion",
        "created": g.created,
        "model": g.model,
        "choices": choices,
        "usage": legacy_usage(g.plan),
        "system_fingerprint": SYSTEM_FINGERPRINT,
    })
}

pub(crate) fn completion_events(g: &Generation<'_>) -> Vec<Bytes> {
    let plan = g.plan;
    let chunk = |choices: Value| {
        let mut chunk = json!({
            "id": g.id,
            "object": "text_completion",
            "created": g.created,
            "model": g.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        });
        if plan.include_usage {
            insert(&mut chunk, "usage", Value::Null);
        }
        chunk
    };
    let choice = |index: u64, text: String, finish: Value| json!([{"text": text, "index": index, "logprobs": null, "finish_reason": finish}]);
    let mut events = Vec::new();
    for k in 0..plan.output_per_choice {
        for index in 0..plan.choices {
            events.push(data_frame(&chunk(choice(
                index,
                token_piece(k),
                Value::Null,
            ))));
        }
    }
    for index in 0..plan.choices {
        let finish = Value::from(plan.finish_reason);
        events.push(data_frame(&chunk(choice(index, String::new(), finish))));
    }
    if plan.include_usage {
        let mut last = chunk(json!([]));
        insert(&mut last, "usage", legacy_usage(plan));
        events.push(data_frame(&last));
    }
    events.push(Bytes::from_static(DONE));
    events
}

/// Deterministic vectors: the same request always gets the same numbers.
pub(crate) fn embeddings_body(model: &str, plan: &Plan) -> Value {
    let data: Vec<Value> = (0..plan.embeddings)
        .map(|index| {
            // Multiples of 1/1000 in [-1, 1), exact enough in f32 and short in JSON.
            let vector: Vec<f64> = (0..plan.dimensions as u64)
                .map(|j| ((index * 7_919 + j * 104_729) % 2_000) as f64 / 1_000.0 - 1.0)
                .collect();
            let embedding = if plan.base64 {
                let bytes: Vec<u8> = vector
                    .iter()
                    .flat_map(|v| (*v as f32).to_le_bytes())
                    .collect();
                Value::from(base64(&bytes))
            } else {
                Value::from(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": plan.prompt_tokens, "total_tokens": plan.prompt_tokens},
    })
}

/// Identity of one Responses API response.
pub(crate) struct ResponseIds<'a> {
    pub response: &'a str,
    pub message: &'a str,
}

fn response_usage(plan: &Plan) -> Value {
    let output = plan.completion_tokens();
    json!({
        "input_tokens": plan.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": plan.prompt_tokens + output,
    })
}

fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

fn message_item(ids: &ResponseIds<'_>, status: &str, content: Value) -> Value {
    json!({
        "type": "message",
        "id": ids.message,
        "status": status,
        "role": "assistant",
        "content": content,
    })
}

/// The response object, echoing the request's settings as OpenAI does.
fn response_object(
    g: &Generation<'_>,
    ids: &ResponseIds<'_>,
    request: &Value,
    status: &str,
    output: Value,
    usage: Value,
) -> Value {
    let echo = |key: &str, default: Value| match request.get(key) {
        Some(value) if !value.is_null() => value.clone(),
        _ => default,
    };
    json!({
        "id": ids.response,
        "object": "response",
        "created_at": g.created,
        "status": status,
        "background": false,
        "error": null,
        "incomplete_details": null,
        "instructions": echo("instructions", Value::Null),
        "max_output_tokens": echo("max_output_tokens", Value::Null),
        "model": g.model,
        "output": output,
        "parallel_tool_calls": echo("parallel_tool_calls", Value::Bool(true)),
        "previous_response_id": echo("previous_response_id", Value::Null),
        "reasoning": {"effort": null, "summary": null},
        "service_tier": "default",
        "store": echo("store", Value::Bool(true)),
        "temperature": echo("temperature", json!(1.0)),
        "text": {"format": {"type": "text"}},
        "tool_choice": echo("tool_choice", json!("auto")),
        "tools": echo("tools", json!([])),
        "top_p": echo("top_p", json!(1.0)),
        "truncation": "disabled",
        "usage": usage,
        "user": null,
        "metadata": echo("metadata", json!({})),
    })
}

pub(crate) fn response_body(g: &Generation<'_>, ids: &ResponseIds<'_>, request: &Value) -> Value {
    let text = generated_text(g.plan.output_per_choice);
    let message = message_item(ids, "completed", json!([output_text(&text)]));
    response_object(
        g,
        ids,
        request,
        "completed",
        json!([message]),
        response_usage(g.plan),
    )
}

/// `event:` + `data:` pairs from `response.created` to `response.completed` (which carries the
/// usage), numbered by `sequence_number`; no `[DONE]`.
pub(crate) fn response_events(
    g: &Generation<'_>,
    ids: &ResponseIds<'_>,
    request: &Value,
) -> Vec<Bytes> {
    let text = generated_text(g.plan.output_per_choice);
    let mut events = Vec::new();
    let mut push = |kind: &str, mut payload: Value| {
        insert(&mut payload, "type", Value::from(kind));
        insert(&mut payload, "sequence_number", Value::from(events.len()));
        events.push(Bytes::from(format!("event: {kind}\ndata: {payload}\n\n")));
    };
    let in_progress = response_object(g, ids, request, "in_progress", json!([]), Value::Null);
    push("response.created", json!({"response": in_progress}));
    push("response.in_progress", json!({"response": in_progress}));
    let part_position = json!({"item_id": ids.message, "output_index": 0, "content_index": 0});
    let at_part = |mut fields: Value| {
        if let (Some(fields), Some(position)) = (fields.as_object_mut(), part_position.as_object())
        {
            fields.extend(position.clone());
        }
        fields
    };
    push(
        "response.output_item.added",
        json!({"output_index": 0, "item": message_item(ids, "in_progress", json!([]))}),
    );
    push(
        "response.content_part.added",
        at_part(json!({"part": output_text("")})),
    );
    for k in 0..g.plan.output_per_choice {
        let delta = json!({"delta": token_piece(k), "logprobs": []});
        push("response.output_text.delta", at_part(delta));
    }
    push(
        "response.output_text.done",
        at_part(json!({"text": text, "logprobs": []})),
    );
    push(
        "response.content_part.done",
        at_part(json!({"part": output_text(&text)})),
    );
    let message = message_item(ids, "completed", json!([output_text(&text)]));
    push(
        "response.output_item.done",
        json!({"output_index": 0, "item": message}),
    );
    let completed = response_object(
        g,
        ids,
        request,
        "completed",
        json!([message]),
        response_usage(g.plan),
    );
    push("response.completed", json!({"response": completed}));
    events
}

const MODELS: &[&str] = &[
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "o3-mini",
    "gpt-3.5-turbo-instruct",
    "text-embedding-3-small",
    "text-embedding-3-large",
];

pub(crate) fn model_body(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 1_715_367_049, "owned_by": "system"})
}

pub(crate) fn models_body() -> Value {
    let data: Vec<Value> = MODELS.iter().map(|id| model_body(id)).collect();
    json!({"object": "list", "data": data})
}

pub(crate) fn file_body(id: &str, bytes: u64, created: u64) -> Value {
    json!({
        "id": id,
        "object": "file",
        "bytes": bytes,
        "created_at": created,
        "filename": "upload",
        "purpose": "batch",
        "status": "processed",
        "status_details": null,
    })
}

fn insert(object: &mut Value, key: &str, value: Value) {
    if let Some(map) = object.as_object_mut() {
        map.insert(key.to_owned(), value);
    }
}

/// Standard base64 with padding: what `encoding_format: "base64"` returns (the Python SDK asks
/// for it by default and decodes little-endian f32s).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sextet = |n: u32, shift: u32| char::from(ALPHABET[((n >> shift) & 63) as usize]);
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        out.push(sextet(n, 18));
        out.push(sextet(n, 12));
        out.push(if chunk.len() > 1 { sextet(n, 6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(n, 0) } else { '=' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, want) in cases {
            assert_eq!(base64(input.as_bytes()), want);
        }
    }
}
