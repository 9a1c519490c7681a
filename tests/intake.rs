//! Request bodies read whole are bounded over the whole process: one that finds no room gets
//! a clear 503 instead of growing memory, and the room comes back when bodies are done.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn a_body_beyond_the_buffered_bound_gets_a_503_and_room_comes_back() {
    let mock = mock().await;
    let config = "[server]\nmax_body_bytes = 65536\nmax_buffered_body_bytes = 65536\n";
    let sluice = Sluice::start_with(&mock.url(), config).await;
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "x".repeat(50_000)}],
        "max_tokens": 5,
    })
    .to_string();

    // A slow client announces its 50 KB body and sends half: its room is held meanwhile.
    let mut slow = tokio::net::TcpStream::connect(sluice.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: sluice\r\nauthorization: Bearer {KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    let half = body.len() / 2;
    slow.write_all(&body.as_bytes()[..half]).await.unwrap();
    // Give sluice the moment it needs to take the slow body's room.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let refused = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let error = assert_sluice_error(&refused.bytes().await.unwrap());
    assert_eq!(error["code"], "body_buffer_full");
    assert_eq!(mock.stats().requests, 0);

    // The slow body completes and is served; then there is room again.
    slow.write_all(&body.as_bytes()[half..]).await.unwrap();
    let mut answer = Vec::new();
    slow.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let again = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(mock.stats().requests, 2);
    sluice.stop().await;
}
