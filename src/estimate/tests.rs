//! Whole-request tests of [`estimate`], and fuzzing for panics.

use proptest::prelude::*;
use serde_json::{json, Value};

use super::tokenizer::tests::tokenizers;
use super::*;

const ENDPOINTS: [Endpoint; 6] = [
    Endpoint::ChatCompletions,
    Endpoint::Completions,
    Endpoint::Embeddings,
    Endpoint::Responses,
    Endpoint::Models,
    Endpoint::Audio,
];

fn run(endpoint: Endpoint, body: &Value) -> Result<Estimate, EstimateError> {
    let body = serde_json::to_vec(body).expect("a Value serializes");
    estimate(tokenizers(), endpoint, &body, &OutputDefaults::default())
}

fn count(encoding: Encoding, text: &str) -> u64 {
    tokenizers().count(encoding, text)
}

#[test]
fn estimates_a_streaming_chat_request() {
    let body = json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello world"}],
        "max_completion_tokens": 500,
        "n": 2,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let want = Estimate {
        model: "gpt-4o-mini".to_owned(),
        prompt_tokens: 9,
        output_tokens: 1000,
        output_capped: true,
        stream: true,
        include_usage: true,
    };
    assert_eq!(run(Endpoint::ChatCompletions, &body).expect("valid"), want);
    assert_eq!(want.total(), 1009);
}

#[test]
fn include_usage_needs_both_the_stream_and_the_option() {
    let base = json!({"model": "gpt-4o", "messages": []});
    let cases = [
        (json!({"stream": true}), true, false),
        (
            json!({"stream": true, "stream_options": {"include_usage": false}}),
            true,
            false,
        ),
        (
            json!({"stream": false, "stream_options": {"include_usage": true}}),
            false,
            false,
        ),
        (json!({"stream": null}), false, false),
    ];
    for (fields, stream, include_usage) in cases {
        let mut body = base.clone();
        for (k, v) in fields.as_object().into_iter().flatten() {
            body[k] = v.clone();
        }
        let got = run(Endpoint::ChatCompletions, &body).expect("valid");
        assert_eq!(
            (got.stream, got.include_usage),
            (stream, include_usage),
            "{fields}"
        );
    }
}

#[test]
fn uncapped_requests_reserve_the_configured_default() {
    let defaults = OutputDefaults::new([("gpt-4.1".to_owned(), 2000)].into(), 300);
    let chat = json!({"model": "gpt-4.1-mini", "messages": [], "n": 3});
    let body = serde_json::to_vec(&chat).expect("a Value serializes");
    let got = estimate(tokenizers(), Endpoint::ChatCompletions, &body, &defaults);
    let got = got.expect("valid");
    assert_eq!((got.output_tokens, got.output_capped), (6000, false));
    let responses = json!({"model": "o3", "input": "hi"});
    let body = serde_json::to_vec(&responses).expect("a Value serializes");
    let got = estimate(tokenizers(), Endpoint::Responses, &body, &defaults);
    let got = got.expect("valid");
    assert_eq!((got.output_tokens, got.output_capped), (300, false));
}

#[test]
fn embeddings_count_with_the_model_encoding_and_reserve_no_output() {
    // cl100k and o200k split this differently, so the encoding shows in the count.
    let text = "Déjà vu: 東京 🚀 supercalifragilisticexpialidocious";
    assert_ne!(
        count(Encoding::Cl100kBase, text),
        count(Encoding::O200kBase, text)
    );
    let body = json!({"model": "text-embedding-3-small", "input": [text, text]});
    let got = run(Endpoint::Embeddings, &body).expect("valid");
    assert_eq!(got.prompt_tokens, 2 * count(Encoding::Cl100kBase, text));
    assert_eq!((got.output_tokens, got.output_capped), (0, true));
}

#[test]
fn legacy_completions_reserve_16_by_default() {
    let body = json!({"model": "gpt-3.5-turbo-instruct", "prompt": "hello world"});
    let got = run(Endpoint::Completions, &body).expect("valid");
    let got = (got.prompt_tokens, got.output_tokens, got.output_capped);
    assert_eq!(got, (2, 16, true));
}

#[test]
fn rejects_bodies_the_api_would_reject() {
    let estimate_bytes = |body: &[u8]| {
        estimate(
            tokenizers(),
            Endpoint::ChatCompletions,
            body,
            &OutputDefaults::default(),
        )
    };
    assert!(matches!(
        estimate_bytes(b"{\"model\": "),
        Err(EstimateError::InvalidJson(_))
    ));
    assert!(matches!(
        estimate_bytes(b"[1, 2]"),
        Err(EstimateError::InvalidJson(m)) if m.contains("an array")
    ));
    assert!(matches!(
        estimate_bytes(b"{\"messages\": []}"),
        Err(EstimateError::MissingModel)
    ));
    assert!(matches!(
        estimate_bytes(b"{\"model\": 4, \"messages\": []}"),
        Err(EstimateError::MissingModel)
    ));
    assert!(matches!(
        estimate_bytes(b"{\"model\": \"gpt-4o\", \"messages\": [], \"stream\": \"yes\"}"),
        Err(EstimateError::InvalidField {
            field: "stream",
            ..
        })
    ));
    let error = estimate_bytes(b"{\"model\": \"gpt-4o\", \"messages\": {}}");
    assert_eq!(
        error.map_err(|e| e.to_string()),
        Err("invalid `messages`: expected an array, found an object".to_owned())
    );
}

#[test]
fn other_endpoints_cost_nothing_and_accept_any_body() {
    let got = run(
        Endpoint::Images,
        &json!({"model": "gpt-image-1", "stream": true}),
    );
    let want = Estimate {
        model: "gpt-image-1".to_owned(),
        prompt_tokens: 0,
        output_tokens: 0,
        output_capped: false,
        stream: true,
        include_usage: false,
    };
    assert_eq!(got.expect("never fails"), want);
    for body in [
        &b""[..],
        b"--boundary\r\nContent-Disposition",
        b"{\"model\": 1}",
        b"[]",
    ] {
        let got = estimate(
            tokenizers(),
            Endpoint::Audio,
            body,
            &OutputDefaults::default(),
        );
        let got = got.expect("never fails");
        assert_eq!((got.model.as_str(), got.total()), ("", 0));
    }
}

#[test]
fn total_saturates() {
    let estimate = Estimate {
        model: String::new(),
        prompt_tokens: 10,
        output_tokens: u64::MAX,
        output_capped: true,
        stream: false,
        include_usage: false,
    };
    assert_eq!(estimate.total(), u64::MAX);
}

/// JSON built from the names the estimator looks at, so that random bodies reach deep into it.
fn json_value() -> impl Strategy<Value = Value> {
    // The names the estimator looks at, shared with the fuzz suite.
    let words = || {
        include_str!("../../tests/fuzz-corpus/estimate-words.txt")
            .lines()
            .collect::<Vec<&'static str>>()
    };
    let word = move || proptest::sample::select(words()).prop_map(str::to_owned);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        word().prop_map(Value::String),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 96, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((word(), inner), 0..6)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
        for endpoint in ENDPOINTS {
            let _ = estimate(tokenizers(), endpoint, &body, &OutputDefaults::default());
        }
    }

    #[test]
    fn random_json_never_panics(mut body in json_value(), model in json_value()) {
        for endpoint in ENDPOINTS {
            let _ = run(endpoint, &body);
        }
        // Again with a valid model, so that every field behind it is read.
        if let Value::Object(fields) = &mut body {
            fields.insert("model".to_owned(), model);
        }
        let _ = run(Endpoint::ChatCompletions, &body);
        if let Value::Object(fields) = &mut body {
            fields.insert("model".to_owned(), json!("gpt-4o"));
        }
        for endpoint in ENDPOINTS {
            let _ = run(endpoint, &body);
        }
    }

    /// Random requests of the right shape: the estimate is at least the framing, and the
    /// output is the cap times n.
    #[test]
    fn chat_estimates_are_consistent(
        contents in prop::collection::vec(".{0,40}", 0..5),
        cap in 0u64..100_000,
        n in 1u64..5,
    ) {
        let messages: Vec<Value> = contents
            .iter()
            .map(|c| json!({"role": "user", "content": c}))
            .collect();
        let body = json!({"model": "gpt-4o", "messages": messages, "max_tokens": cap, "n": n});
        let got = run(Endpoint::ChatCompletions, &body).expect("valid");
        let text: u64 = contents.iter().map(|c| count(Encoding::O200kBase, c)).sum();
        prop_assert_eq!(got.prompt_tokens, 3 + contents.len() as u64 * 4 + text);
        prop_assert_eq!(got.output_tokens, cap * n);
    }
}
