//! The mock over real sockets, driven by reqwest.

use std::time::Duration;

use futures_util::StreamExt;
use mock_openai::{org_for_key, Fault, FaultRule, Limits, MockConfig, MockServer, Resource};
use serde_json::{json, Value};

const KEY: &str = "sk-test-key";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client builds")
}

async fn post(server: &MockServer, path: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{}{path}", server.url()))
        .bearer_auth(KEY)
        .json(body)
        .send()
        .await
        .expect("request sent")
}

fn chat(extra: Value) -> Value {
    let mut body =
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello there"}]});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("header {name} missing"))
        .to_str()
        .expect("ascii header")
}

/// Parses the Go durations the mock writes (`644ms`, `5.995s`, `1m29.997s`), in milliseconds.
fn go_millis(text: &str) -> f64 {
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.parse().expect("milliseconds");
    }
    let text = text.strip_suffix('s').expect("seconds suffix");
    let (minutes, seconds) = text.split_once('m').unwrap_or(("0", text));
    let minutes: f64 = minutes.parse().expect("minutes");
    let seconds: f64 = seconds.parse().expect("seconds");
    (minutes * 60.0 + seconds) * 1000.0
}

/// A 429 message with its wait replaced by `{wait}`, and the wait in milliseconds: the wait
/// depends on the few milliseconds that pass between requests.
fn split_wait(message: &str) -> (String, f64) {
    let (head, tail) = message.split_once("Please try again in ").expect("a wait");
    let (wait, rest) = tail.split_once(". ").expect("end of the wait");
    (
        format!("{head}Please try again in {{wait}}. {rest}"),
        go_millis(wait),
    )
}

/// The `data:` payloads of an SSE body.
fn data_lines(body: &str) -> Vec<&str> {
    body.split("\n\n")
        .filter_map(|frame| frame.strip_prefix("data: "))
        .collect()
}

#[tokio::test]
async fn chat_completion_has_headers_and_usage() {
    let server = MockServer::start(MockConfig::default())
        .await
        .expect("starts");
    let response = post(
        &server,
        "/v1/chat/completions",
        &chat(json!({"max_tokens": 100})),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-ratelimit-limit-requests"), "10000");
    assert_eq!(header(&response, "x-ratelimit-remaining-requests"), "9999");
    assert_eq!(header(&response, "x-ratelimit-limit-tokens"), "10000000");
    // 3 + 1 ("user") + 2 ("hello there", o200k) + 3 = 9 prompt tokens, plus the cap of 100.
    assert_eq!(header(&response, "x-ratelimit-remaining-tokens"), "9999891");
    assert_eq!(header(&response, "x-ratelimit-reset-requests"), "6ms");
    assert!(header(&response, "x-request-id").starts_with("req_"));
    header(&response, "openai-processing-ms");
    assert_eq!(header(&response, "openai-organization"), org_for_key(KEY));
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("chatcmpl-")));
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 tok8 tok9 tok10 tok11 tok12 tok13 tok14 tok15"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["choices"][0]["logprobs"], Value::Null);
    assert_eq!(body["usage"]["prompt_tokens"], 9);
    assert_eq!(body["usage"]["completion_tokens"], 16);
    assert_eq!(body["usage"]["total_tokens"], 25);
    server.shutdown().await;
}

#[tokio::test]
async fn stream_with_include_usage_ends_with_usage_then_done() {
    let server = MockServer::start(MockConfig {
        completion_tokens: 3,
        ..MockConfig::default()
    })
    .await
    .expect("starts");
    let request = chat(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let response = post(&server, "/v1/chat/completions", &request).await;
    assert_eq!(response.status(), 200);
    assert!(header(&response, "content-type").starts_with("text/event-stream"));
    assert_eq!(header(&response, "x-ratelimit-remaining-requests"), "9999");
    let body = response.text().await.expect("body");
    let data = data_lines(&body);
    // role, 3 tokens, finish, usage, [DONE]
    assert_eq!(data.len(), 7, "{body}");
    assert_eq!(data.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = data[..6]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk json"))
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "tok0 tok1 tok2");
    assert!(chunks[..5]
        .iter()
        .all(|c| c["usage"].is_null() && c.get("usage").is_some()));
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[5]["choices"], json!([]));
    assert_eq!(chunks[5]["usage"]["completion_tokens"], 3);
    assert_eq!(chunks[5]["usage"]["prompt_tokens"], 9);
    // The client read to the end, so the guard settles a moment later at most.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(server.stats().completed_streams, 1);
    assert_eq!(server.stats().in_flight, 0);
}

#[tokio::test]
async fn stream_without_include_usage_has_no_usage_field() {
    let server = MockServer::start(MockConfig {
        completion_tokens: 2,
        ..MockConfig::default()
    })
    .await
    .expect("starts");
    let response = post(
        &server,
        "/v1/chat/completions",
        &chat(json!({"stream": true, "n": 2})),
    )
    .await;
    let body = response.text().await.expect("body");
    let data = data_lines(&body);
    // 2 role chunks, 2 tokens x 2 choices, 2 finish chunks, [DONE]
    assert_eq!(data.len(), 9);
    let first: Value = serde_json::from_str(data[0]).expect("json");
    assert!(first.get("usage").is_none());
}

#[tokio::test]
async fn third_request_over_rpm_two_is_a_realistic_429() {
    let server = MockServer::start(MockConfig {
        rpm: 2,
        ..MockConfig::default()
    })
    .await
    .expect("starts");
    for _ in 0..2 {
        let response = post(&server, "/v1/chat/completions", &chat(json!({}))).await;
        assert_eq!(response.status(), 200);
    }
    let response = post(&server, "/v1/chat/completions", &chat(json!({}))).await;
    assert_eq!(response.status(), 429);
    // 30 s less the few ms that passed since the first request.
    let retry_ms: f64 = header(&response, "retry-after-ms")
        .parse()
        .expect("float ms");
    assert!((29_000.0..=30_000.0).contains(&retry_ms), "{retry_ms}");
    assert_eq!(header(&response, "retry-after"), "30");
    assert_eq!(header(&response, "x-ratelimit-remaining-requests"), "0");
    assert_eq!(header(&response, "x-ratelimit-limit-requests"), "2");
    let reset = go_millis(header(&response, "x-ratelimit-reset-requests"));
    assert!((89_000.0..=90_000.0).contains(&reset), "{reset}");
    assert_eq!(header(&response, "content-type"), "application/json");
    let mut body: Value = response.json().await.expect("json");
    let org = org_for_key(KEY);
    let (message, wait) = split_wait(body["error"]["message"].as_str().expect("message"));
    assert!((wait - retry_ms).abs() < 1.0, "{wait} vs {retry_ms}");
    body["error"]["message"] = Value::from(message);
    assert_eq!(
        body,
        json!({"error": {
            "message": format!("Rate limit reached for gpt-4o in organization {org} on requests per min (RPM): Limit 2, Used 2, Requested 1. Please try again in {{wait}}. Visit https://platform.openai.com/account/rate-limits to learn more."),
            "type": "requests",
            "param": null,
            "code": "rate_limit_exceeded",
        }})
    );
    let stats = server.stats();
    assert_eq!(stats.rate_limited, 1);
    assert_eq!(stats.status_counts.get(&429), Some(&1));
}

#[tokio::test]
async fn token_limits_and_too_large_requests() {
    let server = MockServer::start(MockConfig::default())
        .await
        .expect("starts");
    server.set_limits(
        Some("small"),
        Limits {
            rpm: 100,
            tpm: 1_000,
        },
    );
    let org = org_for_key(KEY);
    let request = json!({"model": "small", "messages": [], "max_tokens": 2_000});
    let response = post(&server, "/v1/chat/completions", &request).await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().get("retry-after").is_none());
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["type"], "tokens");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m
        .starts_with("Request too large for small in organization")
        && m.contains("Limit 1000, Requested 2003.")));

    server.spend(&org, "small", 0, 900);
    let request = json!({"model": "small", "messages": [], "max_tokens": 197});
    let response = post(&server, "/v1/chat/completions", &request).await;
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "x-ratelimit-remaining-tokens"), "100");
    let body: Value = response.json().await.expect("json");
    let (message, wait) = split_wait(body["error"]["message"].as_str().expect("message"));
    assert!(
        message.contains("on tokens per min (TPM): Limit 1000, Used 900, Requested 200. Please try again in {wait}."),
        "{message}"
    );
    // (900 + 200 - 1000) * 60 s / 1000 = 6 s, less what refilled meanwhile.
    assert!((5_900.0..=6_000.0).contains(&wait), "{wait}");
}

#[tokio::test]
async fn injected_faults() {
    let server = MockServer::start(MockConfig::default())
        .await
        .expect("starts");
    server.inject(FaultRule::once(Fault::InsufficientQuota));
    let response = post(&server, "/v1/chat/completions", &chat(json!({}))).await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().get("retry-after").is_none());
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["type"], "insufficient_quota");
    assert_eq!(body["error"]["code"], "insufficient_quota");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| m.starts_with(
            "You exceeded your current quota, please check your plan and billing details."
        )));

    server.inject(FaultRule {
        fault: Fault::RateLimit {
            resource: Resource::Tokens,
            retry_after: true,
        },
        path_contains: Some("embeddings".into()),
        times: 1,
    });
    server.inject(FaultRule {
        fault: Fault::Status {
            status: 503,
            body: None,
            headers: vec![("x-should-retry".into(), "true".into())],
        },
        path_contains: None,
        times: 2,
    });
    let response = post(
        &server,
        "/v1/embeddings",
        &json!({"model": "e", "input": "abcdefgh"}),
    )
    .await;
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "x-ratelimit-remaining-tokens"), "0");
    assert_eq!(header(&response, "x-ratelimit-remaining-requests"), "10000");
    header(&response, "retry-after-ms");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains(" on tokens per min (TPM): Limit 10000000, Used "),
        "{message}"
    );
    assert!(message.contains(". Please try again in "), "{message}");
    for _ in 0..2 {
        let response = post(&server, "/v1/chat/completions", &chat(json!({}))).await;
        assert_eq!(response.status(), 503);
        assert_eq!(header(&response, "x-should-retry"), "true");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["error"]["type"], "server_error");
    }
    let response = post(&server, "/v1/chat/completions", &chat(json!({}))).await;
    assert_eq!(response.status(), 200);
    // Injected 429s are not the limiter's.
    assert_eq!(server.stats().rate_limited, 0);
}

#[tokio::test]
async fn stream_reset_sends_some_events_then_breaks() {
    let server = MockServer::start(MockConfig::default())
        .await
        .expect("starts");
    server.inject(FaultRule::once(Fault::StreamReset { after_events: 3 }));
    let response = post(
        &server,
        "/v1/chat/completions",
        &chat(json!({"stream": true})),
    )
    .await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut received = Vec::new();
    let mut failed = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => received.extend_from_slice(&bytes),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the body must end in an error, not cleanly");
    let text = String::from_utf8(received).expect("utf8");
    assert_eq!(data_lines(&text).len(), 3, "{text}");

    server.inject(FaultRule::once(Fault::StreamReset { after_events: 0 }));
    let response = post(&server, "/v1/chat/completions", &chat(json!({}))).await;
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.is_err());
    assert_eq!(server.stats().completed_streams, 0);
}

#[tokio::test]
async fn close_connection_sends_no_response() {
    let server = MockServer::start(MockConfig::default())
        .await
        .expect("starts");
    server.inject(FaultRule::once(Fault::CloseConnection));
    let result = client()
        .post(format!("{}/v1/chat/completions", server.url()))
        .bearer_auth(KEY)
        .json(&chat(json!({})))
        .send()
        .await;
    assert!(result.is_err(), "got a response: {result:?}");
    let stats = server.stats();
    assert_eq!(stats.requests, 1);
    assert!(stats.status_counts.is_empty());
}

#[tokio::test]
async fn client_going_away_counts_as_cancelled() {
    let server = MockServer::start(MockConfig::default())
        .await
        .expect("starts");
    server.inject(FaultRule::once(Fault::Delay { ms: 2_000 }));
    let result = client()
        .post(format!("{}/v1/chat/completions", server.url()))
        .bearer_auth(KEY)
        .json(&chat(json!({})))
        .timeout(Duration::from_millis(100))
        .send()
        .await;
    assert!(result.is_err());
    let mut stats = server.stats();
    for _ in 0..50 {
        if stats.cancelled == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        stats = server.stats();
    }
    assert_eq!(stats.cancelled, 1);
    assert_eq!(stats.in_flight, 0);

    // A slow stream abandoned halfway is cancelled too.
    let server = MockServer::start(MockConfig {
        chunk_delay: Duration::from_millis(50),
        ..MockConfig::default()
    })
    .await
    .expect("starts");
    let response = post(
        &server,
        "/v1/chat/completions",
        &chat(json!({"stream": true})),
    )
    .await;
    let mut stream = response.bytes_stream();
    let _ = stream.next().await;
    drop(stream);
    let mut stats = server.stats();
    for _ in 0..50 {
        if stats.cancelled == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        stats = server.stats();
    }
    assert_eq!(stats.cancelled, 1);
    assert_eq!(stats.completed_streams, 0);
}

#[tokio::test]
async fn errors_are_openai_shaped() {
    let server = MockServer::start(MockConfig::default())
        .await
        .expect("starts");
    let url = server.url();
    let c = client();

    let response = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&chat(json!({})))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["param"], Value::Null);

    let response = c
        .get(format!("{url}/v1/nope"))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "unknown_url");

    let response = c
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(KEY)
        .body("{not json")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 400);
    assert_eq!(header(&response, "content-type"), "application/json");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let response = post(&server, "/v1/chat/completions", &json!({"messages": []})).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        body["error"]["message"],
        "you must provide a model parameter"
    );
}

#[tokio::test]
async fn other_endpoints() {
    let server = MockServer::start(MockConfig {
        completion_tokens: 2,
        ..MockConfig::default()
    })
    .await
    .expect("starts");
    let url = server.url();
    let c = client();

    let response = c
        .get(format!("{url}/v1/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    assert!(response
        .headers()
        .get("x-ratelimit-limit-requests")
        .is_none());
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["object"], "list");
    let response = c
        .get(format!("{url}/v1/models/gpt-4o"))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("sent");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["id"], "gpt-4o");

    let response = post(
        &server,
        "/v1/embeddings",
        &json!({"model": "e", "input": [[1, 2, 3], [4]], "dimensions": 4}),
    )
    .await;
    header(&response, "x-ratelimit-remaining-tokens");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        body["data"][0]["embedding"].as_array().map(Vec::len),
        Some(4)
    );
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 4, "total_tokens": 4})
    );
    let response = post(
        &server,
        "/v1/embeddings",
        &json!({"model": "e", "input": "x", "encoding_format": "base64"}),
    )
    .await;
    let body: Value = response.json().await.expect("json");
    // 8 f32s = 32 bytes = 44 base64 characters.
    assert_eq!(
        body["data"][0]["embedding"].as_str().map(str::len),
        Some(44)
    );

    let response = post(
        &server,
        "/v1/completions",
        &json!({"model": "gpt-3.5-turbo-instruct", "prompt": "abcd"}),
    )
    .await;
    assert_eq!(
        header(&response, "x-ratelimit-remaining-tokens"),
        (10_000_000 - 1 - 16).to_string()
    );
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], "tok0 tok1");

    let response = post(
        &server,
        "/v1/responses",
        &json!({"model": "gpt-4.1", "input": "hello world", "max_output_tokens": 1}),
    )
    .await;
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["object"], "response");
    assert_eq!(body["status"], "completed");
    assert_eq!(body["output"][0]["content"][0]["type"], "output_text");
    assert_eq!(body["output"][0]["content"][0]["text"], "tok0");
    assert_eq!(body["usage"]["input_tokens"], 9);
    assert_eq!(body["usage"]["output_tokens"], 1);
    assert_eq!(body["usage"]["total_tokens"], 10);
    assert_eq!(body["usage"]["input_tokens_details"]["cached_tokens"], 0);

    let response = post(
        &server,
        "/v1/responses",
        &json!({"model": "gpt-4.1", "input": "hi", "stream": true}),
    )
    .await;
    let text = response.text().await.expect("body");
    let events: Vec<(&str, Value)> = text
        .split("\n\n")
        .filter(|frame| !frame.is_empty())
        .map(|frame| {
            let (event, data) = frame.split_once('\n').expect("event and data lines");
            let kind = event.strip_prefix("event: ").expect("event line");
            let data = data.strip_prefix("data: ").expect("data line");
            (kind, serde_json::from_str(data).expect("json"))
        })
        .collect();
    assert_eq!(events.first().map(|e| e.0), Some("response.created"));
    assert_eq!(events.last().map(|e| e.0), Some("response.completed"));
    assert!(!text.contains("[DONE]"));
    let deltas: String = events
        .iter()
        .filter(|(kind, _)| *kind == "response.output_text.delta")
        .filter_map(|(_, data)| data["delta"].as_str())
        .collect();
    assert_eq!(deltas, "tok0 tok1");
    for (n, (kind, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], *kind);
        assert_eq!(data["sequence_number"], n);
    }
    let completed = &events.last().expect("events").1;
    assert_eq!(completed["response"]["usage"]["output_tokens"], 2);

    // An upload is counted as it streams, never buffered.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..64).map(|_| Ok(vec![7u8; 16 * 1024])).collect();
    let response = c
        .post(format!("{url}/v1/files"))
        .bearer_auth(KEY)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("x-ratelimit-limit-tokens").is_none());
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["object"], "file");
    assert_eq!(body["bytes"], 64 * 16 * 1024);
    assert!(body["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("file-")));
}

#[tokio::test]
async fn stats_count_requests_but_not_control_routes() {
    let server = MockServer::start(MockConfig {
        rpm: 1,
        ..MockConfig::default()
    })
    .await
    .expect("starts");
    let url = server.url();
    let c = client();
    let _ = c
        .post(format!("{url}/v1/chat/completions?x=1"))
        .bearer_auth(KEY)
        .header("openai-organization", "org-fixed")
        .json(&chat(json!({})))
        .send()
        .await
        .expect("sent");
    let _ = post(&server, "/v1/chat/completions", &chat(json!({}))).await;
    let _ = post(&server, "/v1/chat/completions", &chat(json!({}))).await;
    let _ = c
        .get(format!("{url}/v1/models"))
        .send()
        .await
        .expect("sent");

    let stats: Value = c
        .get(format!("{url}/_mock/stats"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(stats["requests"], 4);
    assert_eq!(stats["by_path"]["/v1/chat/completions"], 3);
    assert_eq!(stats["status_counts"]["200"], 2);
    assert_eq!(stats["status_counts"]["429"], 1);
    assert_eq!(stats["status_counts"]["401"], 1);
    assert_eq!(stats["rate_limited"], 1);
    let first = &stats["received"][0];
    assert_eq!(first["org"], "org-fixed");
    assert_eq!(first["query"], "x=1");
    assert_eq!(first["model"], "gpt-4o");
    assert!(first["body_bytes"].as_u64().is_some_and(|n| n > 0));
    let text = stats.to_string();
    assert!(!text.contains(KEY), "the key must never be echoed");
    assert!(text.contains("[redacted]"));

    // Control routes: limits, spend, faults, reset.
    let ok = |r: reqwest::Response| assert!(r.status().is_success(), "{}", r.status());
    ok(c.post(format!("{url}/_mock/limits"))
        .json(&json!({"rpm": 100, "tpm": 1000}))
        .send()
        .await
        .expect("sent"));
    let org = org_for_key(KEY);
    ok(c.post(format!("{url}/_mock/spend"))
        .json(&json!({"org": org, "model": "gpt-4o", "tokens": 500}))
        .send()
        .await
        .expect("sent"));
    ok(c.post(format!("{url}/_mock/faults"))
        .json(&json!([{"fault": {"kind": "status", "status": 502}}]))
        .send()
        .await
        .expect("sent"));
    let response = post(&server, "/v1/chat/completions", &chat(json!({}))).await;
    assert_eq!(response.status(), 502);
    let response = post(&server, "/v1/chat/completions", &chat(json!({}))).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-ratelimit-limit-requests"), "100");
    let remaining: u64 = header(&response, "x-ratelimit-remaining-tokens")
        .parse()
        .expect("integer");
    assert!(remaining < 500, "{remaining}");
    ok(c.post(format!("{url}/_mock/reset"))
        .send()
        .await
        .expect("sent"));
    let stats = server.stats();
    assert_eq!(stats.requests, 0);
    assert!(stats.received.is_empty());
}
