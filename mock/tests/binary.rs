//! The `mock-openai` binary: announces its address, serves, exits cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

#[tokio::test]
async fn binary_announces_serves_and_stops_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mock-openai"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--rpm",
            "1",
            "--completion-tokens",
            "2",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("announcement line");
    let url = line
        .trim()
        .strip_prefix("mock-openai listening on ")
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let body = serde_json::json!({"model": "m", "messages": []});
    let statuses = [200, 429];
    for want in statuses {
        let response = client
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth("sk-x")
            .json(&body)
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), want);
    }

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("waitable") {
            break exit;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}");
}
