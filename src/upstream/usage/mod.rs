//! Actual token usage, read from what the upstream sends back: a whole JSON body, or an SSE
//! stream watched as it passes through the proxy.
//!
//! This is what a reservation settles against, and it sits on the path of every streamed
//! chunk, so the stream scanner frames events incrementally, parses only the few events that
//! can carry usage or an error (found by a cheap byte scan), and keeps every buffer bounded
//! whatever the upstream sends.

use std::borrow::Cow;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::endpoint::Endpoint;

/// Actual token usage reported by the upstream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    #[cfg(test)]
    /// Prompt plus completion tokens, saturating rather than wrapping on absurd counts.
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// A `usage` object under either family of names. Unknown fields (`total_tokens`, the
/// `*_details` objects) are ignored.
#[derive(Deserialize)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

impl RawUsage {
    /// Reads the endpoint's own names first and the other family's as a fallback, since some
    /// OpenAI-compatible servers mix them. Without a prompt count there is no usage; a missing
    /// completion count is 0 (embeddings have none).
    fn resolve(self, endpoint: Endpoint) -> Option<Usage> {
        let (prompt, completion) = if matches!(endpoint, Endpoint::Responses | Endpoint::Audio) {
            (
                self.input_tokens.or(self.prompt_tokens),
                self.output_tokens.or(self.completion_tokens),
            )
        } else {
            (
                self.prompt_tokens.or(self.input_tokens),
                self.completion_tokens.or(self.output_tokens),
            )
        };
        Some(Usage {
            prompt_tokens: prompt?,
            completion_tokens: completion.unwrap_or(0),
        })
    }
}

/// Reads an optional struct from a JSON object or `null` only. A derived struct also accepts
/// an array, its elements read as the fields in order, so `"usage": [9, 12, null, null]`
/// would otherwise be a usage.
fn object<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Visit<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for Visit<T> {
        type Value = Option<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object or null")
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, inner: D) -> Result<Self::Value, D::Error> {
            inner.deserialize_map(self)
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            T::deserialize(MapAccessDeserializer::new(map)).map(Some)
        }
    }
    deserializer.deserialize_option(Visit(PhantomData))
}

/// A whole response body, or one stream event's data: only the members that matter here.
/// Everything else is skipped without being built.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(default, deserialize_with = "object")]
    usage: Option<RawUsage>,
    choices: Option<Vec<IgnoredAny>>,
    error: Option<IgnoredAny>,
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default, deserialize_with = "object")]
    response: Option<ResponseObject>,
}

/// The `response` object inside a Responses API stream event.
#[derive(Deserialize)]
struct ResponseObject {
    #[serde(default, deserialize_with = "object")]
    usage: Option<RawUsage>,
}

impl<'a> Envelope<'a> {
    /// Event data that is a JSON object (checked first: serde would read an array's elements
    /// as the fields in order).
    fn parse(data: &'a [u8]) -> Option<Self> {
        object_start(data)?;
        serde_json::from_slice(data).ok()
    }

    /// A chat-style `{"error": ...}` or a Responses API `{"type": "error", ...}` event.
    fn is_error(&self) -> bool {
        self.error.is_some() || self.kind.as_deref() == Some("error")
    }
}

/// Where a JSON text's top-level object opens, if it is an object. Checked before handing
/// the text to a derived struct, because serde would also accept an array positionally.
fn object_start(json: &[u8]) -> Option<usize> {
    let start = json.iter().position(|b| !is_json_space(*b))?;
    (json[start] == b'{').then_some(start)
}

fn is_json_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Usage from a complete (non-streaming) JSON response body: chat and legacy completions
/// `usage{prompt_tokens, completion_tokens}`, responses `usage{input_tokens, output_tokens}`,
/// embeddings `usage{prompt_tokens}` (completion 0). Only the top-level `usage` counts; the
/// rest of the document is skipped, not built. `None` when the body is not a JSON object or
/// its usage is absent or malformed.
pub fn usage_from_json(endpoint: Endpoint, body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct Body {
        #[serde(default, deserialize_with = "object")]
        usage: Option<RawUsage>,
    }
    object_start(body)?;
    serde_json::from_slice::<Body>(body)
        .ok()?
        .usage?
        .resolve(endpoint)
}

/// The members of a request body that decide whether sluice must ask for streamed usage.
#[derive(Deserialize)]
struct StreamRequest<'a> {
    stream: Option<bool>,
    /// `None` only when the member is absent: a `null` is `Some("null")`, so an insertion
    /// can never duplicate the key. Borrowed from the body, so its place in it is known.
    #[serde(default, borrow, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
}

fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// An object's members in the order written, duplicates included, each value as its text.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = Members<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// Rewrites a streaming chat/completions (or legacy completions) request body so the
/// upstream reports usage: sets `stream_options.include_usage = true`, keeping every other
/// member (and any other `stream_options` member). Returns `None`, meaning "send the body
/// unchanged", when it is not a JSON object, not streaming (`stream` is not `true`),
/// already asks for usage (the last `include_usage` of an object `stream_options` is `true`),
/// or has a `stream_options` object with a key serde_json cannot read (a lone surrogate).
///
/// Every byte outside the `stream_options` value is the client's, unchanged: numbers keep
/// their spelling (no float rounding, no integer beyond 64 bits turned into a float), keys
/// their order, whitespace its place. Without a `stream_options` member (the usual case) the
/// member is spliced in after the opening brace. Otherwise only its value is replaced: by
/// `{"include_usage":true}` when it is not an object, else by an object whose first member
/// is `"include_usage":true`, followed by the old object's other members, their values
/// copied as written.
pub fn request_stream_usage(body: &[u8]) -> Option<Vec<u8>> {
    let open = object_start(body)?;
    let request: StreamRequest<'_> = serde_json::from_slice(body).ok()?;
    if request.stream != Some(true) {
        return None;
    }
    let Some(options) = request.stream_options else {
        const MEMBER: &[u8] = br#""stream_options":{"include_usage":true},"#;
        // The object has a `stream` member, so the spliced one is followed by a comma.
        let mut out = Vec::with_capacity(body.len() + MEMBER.len());
        out.extend_from_slice(&body[..=open]);
        out.extend_from_slice(MEMBER);
        out.extend_from_slice(&body[open + 1..]);
        return Some(out);
    };
    let old = options.get();
    // The value was borrowed from `body`, so its text is a sub-slice of it.
    let start = (old.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start
        .checked_add(old.len())
        .filter(|end| *end <= body.len())?;
    let mut value = String::from(r#"{"include_usage":true"#);
    if old.starts_with('{') {
        let Members(members) = serde_json::from_str(old).ok()?;
        let asked = members
            .iter()
            .rev()
            .find(|(key, _)| key == "include_usage")
            .is_some_and(|(_, value)| value.get() == "true");
        if asked {
            return None;
        }
        for (key, raw) in members.iter().filter(|(key, _)| key != "include_usage") {
            value.push(',');
            value.push_str(&serde_json::to_string(key).ok()?);
            value.push(':');
            value.push_str(raw.get());
        }
    }
    value.push('}');
    let mut out = Vec::with_capacity(body.len() - old.len() + value.len());
    out.extend_from_slice(&body[..start]);
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(&body[end..]);
    Some(out)
}

mod sse;

pub use sse::SseUsage;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    use super::sse::tests::{
        message, response_object, CHAT_USAGE, CHAT_WANT, RESPONSES_USAGE, RESPONSES_WANT,
    };

    #[test]
    fn request_stream_usage_inserts_stream_options() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"temperature":0.70,"stream":true}"#;
        let out = request_stream_usage(body).expect("rewritten");
        assert_eq!(
            String::from_utf8_lossy(&out),
            r#"{"stream_options":{"include_usage":true},"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"temperature":0.70,"stream":true}"#
        );
        let pretty = b"  \n{\n  \"stream\": true\n}";
        let out: Value = serde_json::from_slice(&request_stream_usage(pretty).expect("rewritten"))
            .expect("json");
        assert_eq!(
            out,
            json!({"stream": true, "stream_options": {"include_usage": true}})
        );
    }

    #[test]
    fn request_stream_usage_overrides_stream_options() {
        let cases = [
            (
                json!({"model": "m", "stream": true, "stream_options": {"include_usage": false, "include_obfuscation": false}}),
                json!({"model": "m", "stream": true, "stream_options": {"include_usage": true, "include_obfuscation": false}}),
            ),
            (
                json!({"model": "m", "stream": true, "stream_options": null, "n": 2}),
                json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}, "n": 2}),
            ),
            (
                json!({"stream": true, "stream_options": {}}),
                json!({"stream": true, "stream_options": {"include_usage": true}}),
            ),
        ];
        for (body, want) in cases {
            let out =
                request_stream_usage(&serde_json::to_vec(&body).expect("json")).expect("rewritten");
            let out: Value = serde_json::from_slice(&out).expect("json");
            assert_eq!(out, want);
        }
    }

    /// The rewritten body is the client's outside the `stream_options` value: numbers that a
    /// round trip through `f64` or `u64` would change, key order, escapes and whitespace.
    #[test]
    fn request_stream_usage_keeps_the_rest_of_the_body_byte_for_byte() {
        let head = r#"{ "model":"gpt-4o", "logit_bias":{"1734":-4.285522746181832e-197}, "seed":123456789012345678901234567890,"#;
        let tail = r#", "stream":true,"z":1.0E+2, "a":"caf\u00e9","temperature":0.70 }"#;
        let cases = [
            ("null", r#"{"include_usage":true}"#),
            ("{}", r#"{"include_usage":true}"#),
            ("\"yes\"", r#"{"include_usage":true}"#),
            ("[true]", r#"{"include_usage":true}"#),
            ("false", r#"{"include_usage":true}"#),
            (
                r#"{"include_usage": false, "include_obfuscation" :false}"#,
                r#"{"include_usage":true,"include_obfuscation":false}"#,
            ),
            (
                r#"{ "x\u0041":1e400, "include_usage":null, "n":-0.0 }"#,
                r#"{"include_usage":true,"xA":1e400,"n":-0.0}"#,
            ),
            (
                r#"{"include_usage":true,"include_usage":false}"#,
                r#"{"include_usage":true}"#,
            ),
        ];
        for (old, new) in cases {
            let body = format!("{head}\n  \"stream_options\" :  {old}{tail}");
            let out = request_stream_usage(body.as_bytes()).expect(old);
            assert_eq!(
                String::from_utf8_lossy(&out),
                format!("{head}\n  \"stream_options\" :  {new}{tail}"),
                "{old}"
            );
        }
        // Put last, and in a body with a number no 64-bit integer holds.
        let body = br#"{"stream":true,"max_tokens":18446744073709551616,"stream_options":{}}"#;
        assert_eq!(
            String::from_utf8_lossy(&request_stream_usage(body).expect("rewritten")),
            r#"{"stream":true,"max_tokens":18446744073709551616,"stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn request_stream_usage_leaves_other_bodies_alone() {
        let bodies: [&[u8]; 12] = [
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
            br#"{"stream":true,"stream_options":{"include_usage":false,"include_usage":true}}"#,
            br#"{"stream":true,"stream_options":null,"stream_options":{}}"#,
            br#"{"stream":true,"stream_options":{"include_usage":true,}}"#,
            br#"{"model":"m","stream":false}"#,
            br#"{"model":"m"}"#,
            br#"{"model":"m","stream":"true"}"#,
            br#"[{"stream":true}]"#,
            br#"{"stream":true"#,
            b"",
            b"not json",
            br#"{"stream":true,"stream":false}"#,
        ];
        for body in bodies {
            assert_eq!(
                request_stream_usage(body),
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn usage_from_json_for_each_endpoint() {
        let chat = format!(
            r#"{{"id":"chatcmpl-1","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"\"usage\": {{\"prompt_tokens\": 1}}"}},"finish_reason":"stop"}}],"usage":{CHAT_USAGE},"service_tier":"default"}}"#
        );
        assert_eq!(
            usage_from_json(Endpoint::ChatCompletions, chat.as_bytes()),
            Some(CHAT_WANT)
        );
        let legacy = br#"{"id":"cmpl-1","object":"text_completion","choices":[{"text":"hi","index":0,"logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":16,"total_tokens":21}}"#;
        assert_eq!(
            usage_from_json(Endpoint::Completions, legacy),
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 16
            })
        );
        let embeddings = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        assert_eq!(
            usage_from_json(Endpoint::Embeddings, embeddings),
            Some(Usage {
                prompt_tokens: 8,
                completion_tokens: 0
            })
        );
        let responses = response_object("completed", &message("Hi there!"), RESPONSES_USAGE);
        assert_eq!(
            usage_from_json(Endpoint::Responses, responses.as_bytes()),
            Some(RESPONSES_WANT)
        );
    }

    #[test]
    fn usage_from_json_rejects_garbage() {
        let bodies: [&[u8]; 12] = [
            b"",
            b"not json",
            b"{",
            // Arrays are not objects, whatever serde would make of their elements.
            br#"{"usage":[9,12,null,null]}"#,
            br#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}"#,
            br#"{"id":"x"}"#,
            br#"{"usage":null}"#,
            br#"{"usage":{}}"#,
            br#"{"usage":{"prompt_tokens":-1}}"#,
            br#"{"usage":"lots"}"#,
            br#"[{"prompt_tokens":1}]"#,
            br#"{"error":{"message":"Rate limit reached","type":"tokens"}}"#,
        ];
        for body in bodies {
            assert_eq!(
                usage_from_json(Endpoint::ChatCompletions, body),
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn usage_total_saturates() {
        assert_eq!(CHAT_WANT.total(), 21);
        let huge = Usage {
            prompt_tokens: u64::MAX,
            completion_tokens: 1,
        };
        assert_eq!(huge.total(), u64::MAX);
    }
}
