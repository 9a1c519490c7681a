//! The proxy over real HTTP: sluice on port 0 in front of the mock OpenAI upstream.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use mock_openai::{Fault, FaultRule, MockConfig};

#[tokio::test]
async fn chat_passes_status_headers_and_body_through() {
    let mock = mock().await;
    let sluice = Sluice::start(&mock.url()).await;
    let response = client()
        .post(sluice.url("/v1/chat/completions?trace=1"))
        .bearer_auth(KEY)
        .header("OpenAI-Organization", "org-acme")
        .header("OpenAI-Project", "proj-1")
        .header("x-stainless-retry-count", "0")
        .header("x-custom-header", "kept")
        .header("Connection", "keep-alive, x-hop")
        .header("x-hop", "dropped")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    for header in [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
        "x-request-id",
    ] {
        assert!(response.headers().contains_key(header), "missing {header}");
    }
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0);

    let stats = mock.stats();
    assert_eq!(stats.requests, 1);
    let received = &stats.received[0];
    assert_eq!(received.path, "/v1/chat/completions");
    assert_eq!(received.query.as_deref(), Some("trace=1"));
    let header = |name: &str| {
        received
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    // The mock redacts keys in what it records; it answers 401 without one, so the 200 above
    // shows the key arrived, and the org it was charged to shows the header did.
    assert_eq!(header("authorization").as_deref(), Some("[redacted]"));
    assert_eq!(received.org, "org-acme");
    assert_eq!(header("openai-organization").as_deref(), Some("org-acme"));
    assert_eq!(header("openai-project").as_deref(), Some("proj-1"));
    assert_eq!(header("x-stainless-retry-count").as_deref(), Some("0"));
    assert_eq!(header("x-custom-header").as_deref(), Some("kept"));
    assert_eq!(
        header("x-hop"),
        None,
        "headers named by Connection are hop-by-hop"
    );
    assert_eq!(
        header("host").as_deref(),
        Some(&*mock.addr().to_string()),
        "Host is rewritten"
    );
    sluice.stop().await;
}

#[tokio::test]
async fn json_bodies_are_forwarded_byte_for_byte() {
    // Odd spacing, key order and number formats that any re-serialization would change.
    const BODY: &str = "{\"z\":1.50,  \"a\" : [1e3, -0.0],\n\"id\":\"x\"}";
    let response = format!(
        "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\nx-upstream-custom: yes\r\n\
         content-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let upstream = raw_upstream(Box::leak(response.into_bytes().into_boxed_slice())).await;
    let sluice = Sluice::start(&format!("http://{upstream}")).await;
    let response = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["x-upstream-custom"], "yes");
    assert_eq!(
        response.headers()["content-length"],
        BODY.len().to_string().as_str()
    );
    assert_eq!(response.bytes().await.unwrap(), BODY.as_bytes());
    sluice.stop().await;
}

#[tokio::test]
async fn models_list_is_identical_through_sluice() {
    let mock = mock().await;
    let sluice = Sluice::start(&mock.url()).await;
    let direct = client()
        .get(format!("{}/v1/models", mock.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let proxied = client()
        .get(sluice.url("/v1/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(direct, proxied);
    let stats = mock.stats();
    assert!(stats
        .received
        .iter()
        .all(|r| r.org == mock_openai::org_for_key(KEY)));
    sluice.stop().await;
}

#[tokio::test]
async fn sse_chunks_arrive_incrementally() {
    let mock = mock_with(MockConfig {
        chunk_delay: Duration::from_millis(40),
        completion_tokens: 10,
        ..MockConfig::default()
    })
    .await;
    let sluice = Sluice::start(&mock.url()).await;
    let mut body = chat_body(true);
    body["max_tokens"] = serde_json::json!(10);
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let response = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut stream = response.bytes_stream();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        arrivals.push(tokio::time::Instant::now());
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(
        text.contains("\"usage\":{"),
        "usage chunk passes through: {text}"
    );
    // Ten tokens 40 ms apart: were sluice buffering, everything would land at once.
    assert!(
        arrivals.len() >= 8,
        "only {} reads: the stream was buffered",
        arrivals.len()
    );
    let spread = *arrivals.last().unwrap() - arrivals[0];
    assert!(
        spread >= Duration::from_millis(300),
        "first-to-last spread {spread:?}"
    );
    sluice.stop().await;
}

/// Streams a chat completion of `tokens` chunks `chunk_delay` apart through sluice with the
/// given upstream settings; returns the text the client received.
async fn stream_through(chunk_delay: Duration, tokens: u32, upstream: &str) -> String {
    let mock = mock_with(MockConfig {
        chunk_delay,
        completion_tokens: tokens,
        ..MockConfig::default()
    })
    .await;
    let sluice = Sluice::start_with(&mock.url(), &format!("[upstream]\n{upstream}\n")).await;
    let mut body = chat_body(true);
    body["max_tokens"] = serde_json::json!(tokens);
    let response = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .expect("response head");
    assert_eq!(response.status(), 200);
    let text = String::from_utf8(response.bytes().await.expect("body").to_vec()).expect("utf-8");
    sluice.stop().await;
    text
}

#[tokio::test]
async fn the_read_timeout_applies_between_reads_not_to_the_whole_stream() {
    // 15 chunks 60 ms apart: about a second in all, twice the read timeout.
    let text = stream_through(Duration::from_millis(60), 15, "read_timeout_secs = 0.5").await;
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("upstream_stream_broken"), "{text}");
}

#[tokio::test]
async fn a_stream_that_stalls_past_the_read_timeout_ends_with_an_error_event() {
    let text = stream_through(Duration::from_millis(1_500), 3, "read_timeout_secs = 0.5").await;
    assert!(
        text.contains("\"code\":\"upstream_stream_broken\""),
        "{text}"
    );
    assert!(!text.contains("[DONE]"), "{text}");
}

#[tokio::test]
async fn a_stream_that_drips_past_the_total_timeout_ends_with_an_error_event() {
    // 30 chunks 60 ms apart: each read is quick, the whole takes ~1.8 s, past the 0.8 s total.
    let text = stream_through(
        Duration::from_millis(60),
        30,
        "read_timeout_secs = 0.5\ntotal_timeout_secs = 0.8",
    )
    .await;
    assert!(
        text.contains("\"code\":\"upstream_stream_broken\""),
        "{text}"
    );
    assert!(!text.contains("[DONE]"), "{text}");
}

#[tokio::test]
async fn uploads_stream_through_without_buffering() {
    let mock = mock().await;
    let sluice = Sluice::start(&mock.url()).await;
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 48;
    let stats_url = format!("{}/_mock/stats", mock.url());
    // The second half is only sent once the upstream has the request: were sluice reading the
    // upload whole before forwarding, this would never happen and the test would time out.
    let body = futures_util::stream::unfold(0usize, move |sent| {
        let stats_url = stats_url.clone();
        async move {
            if sent == CHUNKS {
                return None;
            }
            if sent == CHUNKS / 2 {
                wait_for_upstream_in_flight(&stats_url).await;
            }
            Some((
                Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; CHUNK])),
                sent + 1,
            ))
        }
    });
    let response = client()
        .post(sluice.url("/v1/files"))
        .bearer_auth(KEY)
        .header("content-type", "multipart/form-data; boundary=x")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let file: serde_json::Value = response.json().await.unwrap();
    assert_eq!(file["bytes"].as_u64(), Some((CHUNK * CHUNKS) as u64));
    sluice.stop().await;
}

async fn wait_for_upstream_in_flight(stats_url: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats: serde_json::Value = client()
            .get(stats_url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if stats["in_flight"].as_u64().unwrap_or(0) >= 1 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upload never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn client_disconnect_while_waiting_cancels_the_upstream_request() {
    let mock = mock().await;
    mock.inject(FaultRule {
        fault: Fault::Delay { ms: 5_000 },
        path_contains: None,
        times: 1,
    });
    let sluice = Sluice::start(&mock.url()).await;
    let request = tokio::spawn(
        client()
            .post(sluice.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&chat_body(false))
            .send(),
    );
    eventually(
        Duration::from_secs(20),
        "the request to reach the mock",
        || mock.stats().in_flight == 1,
    )
    .await;
    // The client gives up while the upstream is still working on the request (well after
    // sending it: a FIN right behind a request is read as its half-close, and answered).
    tokio::time::sleep(Duration::from_millis(200)).await;
    request.abort();
    assert!(request.await.is_err_and(|err| err.is_cancelled()));
    eventually(
        Duration::from_secs(2),
        "the mock to see the cancellation",
        || mock.stats().cancelled == 1,
    )
    .await;
    sluice.stop().await;
}

#[tokio::test]
async fn client_disconnect_mid_stream_cancels_the_upstream_stream() {
    let mock = mock_with(MockConfig {
        chunk_delay: Duration::from_millis(100),
        completion_tokens: 100,
        ..MockConfig::default()
    })
    .await;
    let sluice = Sluice::start(&mock.url()).await;
    let mut body = chat_body(true);
    body["max_tokens"] = serde_json::json!(100);
    let response = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    eventually(
        Duration::from_secs(3),
        "the mock to see the stream dropped",
        || mock.stats().cancelled == 1,
    )
    .await;
    assert_eq!(mock.stats().completed_streams, 0);
    sluice.stop().await;
}

#[tokio::test]
async fn upstream_errors_pass_through_unchanged() {
    let mock = mock().await;
    let not_found = serde_json::json!({"error": {"message": "The model `gpt-9` does not exist", "type": "invalid_request_error", "param": null, "code": "model_not_found"}});
    mock.inject(FaultRule {
        fault: Fault::Status {
            status: 404,
            body: Some(not_found.clone()),
            headers: vec![("x-upstream-note".to_owned(), "kept".to_owned())],
        },
        path_contains: None,
        times: 1,
    });
    mock.inject(FaultRule {
        fault: Fault::Status {
            status: 503,
            body: Some(serde_json::json!({"error": {"message": "overloaded", "type": "server_error", "param": null, "code": "server_is_overloaded"}})),
            headers: vec![("retry-after".to_owned(), "2".to_owned())],
        },
        path_contains: None,
        times: 1,
    });
    // One attempt only: the 503 is the client's to see, exactly as sent.
    let sluice = Sluice::start_with(&mock.url(), "[retry]\nmax_attempts = 1\n").await;
    let missing = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.headers()["x-upstream-note"], "kept");
    let body: serde_json::Value = serde_json::from_slice(&missing.bytes().await.unwrap()).unwrap();
    assert_eq!(body, not_found);

    let overloaded = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(overloaded.status(), 503);
    assert_eq!(overloaded.headers()["retry-after"], "2");
    let error = assert_openai_error(&overloaded.bytes().await.unwrap());
    assert_eq!(error["code"], "server_is_overloaded");
    assert_eq!(mock.stats().requests, 2);
    sluice.stop().await;
}

#[tokio::test]
async fn unreachable_upstream_is_a_502() {
    // Bind then drop a listener: nothing listens on that port any more.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let sluice = Sluice::start(&format!("http://127.0.0.1:{port}")).await;
    let response = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["content-type"], "application/json");
    let error = assert_sluice_error(&response.bytes().await.unwrap());
    assert_eq!(error["code"], "upstream_unreachable");
    sluice.stop().await;
}

#[tokio::test]
async fn an_upstream_that_never_accepts_is_a_502_after_the_connect_timeout() {
    // A listener whose accept queue is full: the kernel drops further SYNs, so connecting
    // neither succeeds nor fails until the connect timeout.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(1).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let mut held = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(stream)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            held.push(stream);
        }
    }
    let sluice = Sluice::start_with(
        &format!("http://{addr}"),
        "[upstream]\nconnect_timeout_secs = 0.2\n[retry]\nmax_attempts = 1\n",
    )
    .await;
    let response = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&chat_body(false))
        .send()
        .await
        .expect("response");
    let status = response.status();
    let error = assert_sluice_error(&response.bytes().await.expect("body"));
    assert_eq!(status, 502, "{error}");
    assert_eq!(error["code"], "upstream_unreachable");
    sluice.stop().await;
    drop((held, listener));
}

#[tokio::test]
async fn slow_upstream_is_a_504() {
    let mock = mock().await;
    mock.inject(FaultRule {
        fault: Fault::Delay { ms: 3_000 },
        path_contains: None,
        times: 1,
    });
    let sluice = Sluice::start_with(&mock.url(), "[upstream]\nread_timeout_secs = 0.3\n").await;
    let response = client()
        .post(sluice.url("/v1/embeddings"))
        .bearer_auth(KEY)
        .json(&serde_json::json!({"model": "text-embedding-3-small", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let error = assert_sluice_error(&response.bytes().await.unwrap());
    assert_eq!(error["code"], "upstream_timeout");
    sluice.stop().await;
}

#[tokio::test]
async fn oversized_json_body_is_a_413_and_never_reaches_upstream() {
    let mock = mock().await;
    let sluice = Sluice::start_with(&mock.url(), "[server]\nmax_body_bytes = 2048\n").await;
    let mut body = chat_body(false);
    body["messages"][0]["content"] = serde_json::json!("x".repeat(4096));
    // Once with a Content-Length (rejected before reading) and once chunked (rejected while
    // reading, at the limit).
    let sized = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(sized.status(), 413);
    assert_eq!(
        assert_sluice_error(&sized.bytes().await.unwrap())["code"],
        "request_body_too_large"
    );

    let bytes = Bytes::from(serde_json::to_vec(&body).unwrap());
    let chunked = futures_util::stream::iter(
        bytes
            .chunks(512)
            .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    );
    let streamed = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunked))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 413);
    assert_eq!(mock.stats().requests, 0);
    sluice.stop().await;
}

#[tokio::test]
async fn paths_outside_v1_are_a_404() {
    let mock = mock().await;
    let sluice = Sluice::start(&mock.url()).await;
    for path in ["/", "/chat/completions", "/v2/models", "/v1"] {
        let response = client().get(sluice.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
        let error = assert_sluice_error(&response.bytes().await.unwrap());
        assert_eq!(error["code"], "unknown_url");
    }
    assert_eq!(mock.stats().requests, 0);
    sluice.stop().await;
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let mock = mock().await;
    let sluice = Sluice::start(&mock.url()).await;
    assert_eq!(
        client()
            .get(sluice.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client()
            .get(sluice.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&chat_body(false))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    // The exchange is recorded just after its last byte leaves: poll briefly.
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = metrics_text(&sluice).await;
        if metrics.contains("sluice_requests_in_flight 0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Labels are rendered sorted: endpoint, model, org (the key's automatic org), status.
    let labels = "endpoint=\"chat_completions\",model=\"gpt-4o-mini\",org=\"key-";
    let has = |prefix: &str, suffix: &str| {
        metrics
            .lines()
            .any(|line| line.starts_with(prefix) && line.ends_with(suffix))
    };
    assert!(
        has(
            &format!("sluice_requests_total{{{labels}"),
            "status=\"200\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        has(
            &format!("sluice_upstream_duration_seconds_count{{{labels}"),
            "} 1"
        ),
        "{metrics}"
    );
    assert!(
        has(
            &format!("sluice_upstream_ttfb_seconds_count{{{labels}"),
            "} 1"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("sluice_requests_in_flight 0"), "{metrics}");
    sluice.stop().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_streams() {
    let mock = mock_with(MockConfig {
        chunk_delay: Duration::from_millis(50),
        completion_tokens: 20,
        ..MockConfig::default()
    })
    .await;
    let mut sluice = Sluice::start(&mock.url()).await;
    let mut body = chat_body(true);
    body["max_tokens"] = serde_json::json!(20);
    let response = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();
    sluice.begin_shutdown();
    // Readiness flips while the stream drains.
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "the stream finished: {text}"
    );
    let drain = tokio::time::timeout(Duration::from_secs(5), sluice.task)
        .await
        .expect("run() returns once drained")
        .unwrap()
        .unwrap();
    assert_eq!(drain, sluice::server::Drain::Complete);
    assert!(
        client()
            .get(format!("http://{}/healthz", sluice.addr))
            .send()
            .await
            .is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn drain_timeout_bounds_shutdown() {
    let mock = mock_with(MockConfig {
        chunk_delay: Duration::from_millis(200),
        completion_tokens: 1000,
        ..MockConfig::default()
    })
    .await;
    let mut sluice = Sluice::start_with(&mock.url(), "[server]\ndrain_timeout_secs = 0.5\n").await;
    let mut body = chat_body(true);
    body["max_tokens"] = serde_json::json!(1000);
    let response = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();
    sluice.begin_shutdown();
    let drain = tokio::time::timeout(Duration::from_secs(5), sluice.task)
        .await
        .expect("run() returns after the drain timeout, not after the 200 s stream")
        .unwrap()
        .unwrap();
    assert!(
        matches!(drain, sluice::server::Drain::Cut { connections: 1 }),
        "{drain:?}"
    );
}
