//! Client connections over raw sockets: what a hostile or careless client can hold, and for
//! how long. Bounds are asserted as outcomes (closed, refused, answered), each with a generous
//! wait, never as timings.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use mock_openai::{Fault, FaultRule};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection; `None` if it is still open after `wait`.
async fn closed_within(socket: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let result = tokio::time::timeout(wait, async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    result.ok().map(|()| seen)
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

#[tokio::test]
async fn headers_sent_slowly_and_idle_keep_alives_are_closed_by_the_header_timeout() {
    let mock = mock().await;
    let sluice =
        Sluice::start_with(&mock.url(), "[server]\nheader_read_timeout_secs = 0.5\n").await;
    // Slowloris: a request line, then a header line every 200 ms, never the blank line.
    let mut slow = connect(sluice.addr).await;
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    let mut dripping = slow;
    let drip = tokio::spawn(async move {
        for n in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if dripping
                .write_all(format!("x-drip-{n}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                return true;
            }
        }
        false
    });
    assert!(
        tokio::time::timeout(Duration::from_secs(8), drip)
            .await
            .expect("the slow client is cut off")
            .unwrap(),
        "writing kept succeeding: the connection was never closed"
    );

    // Idle keep-alive: one request answered, then silence.
    let mut idle = connect(sluice.addr).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let seen = closed_within(&mut idle, Duration::from_secs(8))
        .await
        .expect("the idle connection is closed");
    assert!(
        seen.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    assert_eq!(mock.stats().requests, 0);
    sluice.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once_and_counted() {
    let mock = mock().await;
    let sluice = Sluice::start_with(&mock.url(), "[server]\nmax_connections = 3\n").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut socket = connect(sluice.addr).await;
        socket
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = socket.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(socket);
    }
    // The fourth is accepted and closed without an answer.
    let mut extra = connect(sluice.addr).await;
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n")
        .await;
    let seen = closed_within(&mut extra, Duration::from_secs(5))
        .await
        .expect("closed at once");
    assert!(seen.is_empty(), "{}", String::from_utf8_lossy(&seen));
    // One held connection asks for the metrics: the refusal is counted.
    let socket = &mut held[0];
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let text =
        String::from_utf8(closed_within(socket, Duration::from_secs(5)).await.unwrap()).unwrap();
    assert!(
        text.contains("sluice_connections_refused_total 1"),
        "{text}"
    );
    assert!(text.contains("sluice_connections_open 3"), "{text}");
    drop(held);
    // Room again once they are gone.
    let mut again = None;
    for _ in 0..100 {
        if let Ok(response) = client().get(sluice.url("/healthz")).send().await {
            again = Some(response.status());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(again, Some(reqwest::StatusCode::OK));
    sluice.stop().await;
}

#[tokio::test]
async fn a_body_dripped_slowly_gets_a_408_and_never_reaches_the_upstream() {
    let mock = mock().await;
    let sluice = Sluice::start_with(&mock.url(), "[server]\nbody_read_timeout_secs = 0.5\n").await;
    let mut socket = connect(sluice.addr).await;
    socket
        .write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\nauthorization: Bearer {KEY}\r\n\
                 content-type: application/json\r\ncontent-length: 100000\r\n\r\n{{"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let (mut reader, mut writer) = socket.into_split();
    let drip = tokio::spawn(async move {
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if writer.write_all(b" ").await.is_err() {
                return;
            }
        }
    });
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(8), reader.read_to_end(&mut answer))
        .await
        .expect("answered and closed")
        .ok();
    drip.abort();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    assert_eq!(
        assert_sluice_error(body.as_bytes())["code"],
        "request_timeout"
    );
    assert_eq!(mock.stats().requests, 0);
    sluice.stop().await;
}

#[tokio::test]
async fn a_client_that_writes_an_oversized_body_whole_still_reads_its_413() {
    let mock = mock().await;
    let sluice = Sluice::start_with(&mock.url(), "[server]\nmax_body_bytes = 65536\n").await;
    // As Python's urllib does: the whole body first, then the answer.
    let body = vec![b' '; 4 * 1024 * 1024];
    let mut socket = connect(sluice.addr).await;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\nauthorization: Bearer {KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket
        .write_all(&body)
        .await
        .expect("the whole body is taken");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(10), async {
        while !answer.ends_with(b"}}") {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("answered");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert_eq!(mock.stats().requests, 0);
    sluice.stop().await;
}

#[tokio::test]
async fn metrics_and_status_stay_on_the_metrics_listener_when_it_is_set() {
    let mock = mock().await;
    let ops = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ops_addr = ops.local_addr().unwrap();
    drop(ops);
    let sluice =
        Sluice::start_with(&mock.url(), &format!("metrics_listen = \"{ops_addr}\"\n")).await;
    for path in ["/metrics", "/status"] {
        let response = client().get(sluice.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
        let error = assert_sluice_error(&response.bytes().await.unwrap());
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains(&ops_addr.to_string()),
            "{error}"
        );
    }
    let mut served = None;
    for _ in 0..100 {
        if let Ok(response) = client()
            .get(format!("http://{ops_addr}/metrics"))
            .send()
            .await
        {
            served = Some(response.status());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(served, Some(reqwest::StatusCode::OK));
    assert_eq!(
        client()
            .get(sluice.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    sluice.stop().await;
}

#[tokio::test]
async fn queued_requests_get_a_503_shutting_down_when_the_drain_begins() {
    let mock = mock().await;
    let config = format!(
        "[queue]\nmax_wait_secs = 300\n[[org]]\nname = \"acme\"\nkeys = [\"{KEY}\"]\n\
         [org.limits.\"*\"]\nrpm = 1\ntpm = 1000000\n"
    );
    let mut sluice = Sluice::start_with(&mock.url(), &config).await;
    // One admitted at once, three queued for minutes.
    let sends: Vec<_> = (0..4)
        .map(|_| {
            let request = client()
                .post(sluice.url("/v1/chat/completions"))
                .bearer_auth(KEY)
                .json(&chat_body(false));
            tokio::spawn(async move {
                let response = request.send().await.unwrap();
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .map(|value| value.to_str().unwrap().to_owned());
                (status, retry_after, response.bytes().await.unwrap())
            })
        })
        .collect();
    eventually(Duration::from_secs(10), "three queued", || {
        mock.stats().requests == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    sluice.begin_shutdown();
    let mut answered = Vec::new();
    for send in sends {
        let (status, retry_after, body) = tokio::time::timeout(Duration::from_secs(10), send)
            .await
            .expect("every queued request is answered during the drain")
            .unwrap();
        if status == 503 {
            assert_eq!(retry_after.as_deref(), Some("1"));
            assert_eq!(assert_sluice_error(&body)["code"], "shutting_down");
        }
        answered.push(status);
    }
    answered.sort_unstable();
    assert_eq!(answered, [200, 503, 503, 503]);
    assert_eq!(mock.stats().requests, 1);
    let drain = tokio::time::timeout(Duration::from_secs(10), sluice.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(drain, sluice::server::Drain::Complete);
}

#[tokio::test]
async fn a_request_with_both_content_length_and_transfer_encoding_closes_its_connection() {
    let mock = mock().await;
    let sluice = Sluice::start(&mock.url()).await;
    let body = chat_body(false).to_string();
    let mut socket = connect(sluice.addr).await;
    socket
        .write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\nauthorization: Bearer {KEY}\r\n\
                 content-type: application/json\r\ncontent-length: 5\r\n\
                 transfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // Answered (or refused), then closed: nothing after it is read as another request.
    let seen = closed_within(&mut socket, Duration::from_secs(10))
        .await
        .expect("the connection is closed after the answer");
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 "), "{text}");
    sluice.stop().await;
}

/// An org whose token bucket (600 a minute, 10 a second) one large request fills.
fn token_limited() -> String {
    format!("[[org]]\nname = \"acme\"\nkeys = [\"{KEY}\"]\n[org.limits.\"*\"]\nrpm = 10000\ntpm = 600\n")
}

fn chat_request(max_tokens: u64) -> Vec<u8> {
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": max_tokens,
    })
    .to_string();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\nauthorization: Bearer {KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Fills acme's token bucket, so that a request for ~40 tokens queues for a few seconds.
async fn fill_bucket(sluice: &Sluice) {
    let response = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&serde_json::json!({
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 570,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// Requests waiting for admission, over every bucket (from `/status`).
async fn queued(sluice: &Sluice) -> u64 {
    let status = status_json(sluice).await;
    let buckets = status["buckets"].as_array().unwrap();
    buckets
        .iter()
        .map(|bucket| {
            bucket["queue"]["interactive"].as_u64().unwrap()
                + bucket["queue"]["batch"].as_u64().unwrap()
        })
        .sum()
}

fn header_value<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response
        .lines()
        .take_while(|line| !line.is_empty())
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(": "))
}

#[tokio::test]
async fn a_client_that_half_closes_after_its_request_is_answered_and_the_request_sent_once() {
    let mock = mock().await;
    let sluice = Sluice::start_with(&mock.url(), &token_limited()).await;
    fill_bucket(&sluice).await;
    // Queued for admission, then answered slowly by the upstream: a FIN that came with the
    // request cancels neither wait.
    mock.inject(FaultRule {
        fault: Fault::Delay { ms: 500 },
        path_contains: None,
        times: 1,
    });
    let mut socket = connect(sluice.addr).await;
    socket.write_all(&chat_request(30)).await.unwrap();
    socket.shutdown().await.unwrap();
    let seen = closed_within(&mut socket, Duration::from_secs(30))
        .await
        .expect("answered, then closed");
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(text.contains("\"chat.completion\""), "{text}");
    let queued: u64 = header_value(&text, "x-sluice-queue-ms")
        .expect("queue header")
        .parse()
        .unwrap();
    assert!(queued >= 100, "the request was queued first ({queued} ms)");
    assert_eq!(mock.stats().requests, 2);
    sluice.stop().await;
}

#[tokio::test]
async fn a_client_that_shuts_its_side_while_queued_is_dropped_unsent() {
    let mock = mock().await;
    let sluice = Sluice::start_with(&mock.url(), &token_limited()).await;
    fill_bucket(&sluice).await;
    let mut socket = connect(sluice.addr).await;
    socket.write_all(&chat_request(30)).await.unwrap();
    let waited = tokio::time::Instant::now();
    while queued(&sluice).await != 1 {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the request never queued"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Long after its request: a client that gave up, not a half-close.
    tokio::time::sleep(Duration::from_millis(300)).await;
    socket.shutdown().await.unwrap();
    let seen = closed_within(&mut socket, Duration::from_secs(10))
        .await
        .expect("closed without waiting for admission");
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 499 "), "{text}");
    assert_eq!(queued(&sluice).await, 0);
    // Its place and budget came back: the next small request goes at once, and the
    // upstream never saw the one that left.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(mock.stats().requests, 1);
    sluice.stop().await;
}
