//! The built `sluice` binary as an operator runs it: flags, environment, config file, logs,
//! signals and exit codes.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

struct Running {
    child: Child,
    addr: String,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Running {
    /// Starts the binary and waits for its "listening on" line.
    fn start(args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env_remove("SLUICE_CONFIG")
            .env_remove("SLUICE_LISTEN")
            .env_remove("SLUICE_UPSTREAM")
            .env_remove("SLUICE_LOG_FORMAT")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, value) in envs {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut log = Vec::new();
        let addr = loop {
            let line = lines
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("sluice did not start; log so far: {log:#?}"));
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let addr: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                    .collect();
                log.push(line);
                break addr;
            }
            log.push(line);
        };
        Self {
            child,
            addr,
            lines,
            log,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sends SIGTERM, waits for the exit and returns its code and the whole log.
    fn terminate(mut self) -> (Option<i32>, String) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = self.child.wait().unwrap();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.log.push(line);
        }
        (exit.code(), self.log.join("\n"))
    }
}

#[tokio::test]
async fn logs_every_request_and_never_the_key() {
    let mock = mock().await;
    let running = Running::start(
        &["--listen", "127.0.0.1:0", "--upstream", &mock.url()],
        &[("RUST_LOG", "debug")],
    );
    let client = client();
    for stream in [false, true] {
        let response = client
            .post(running.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .header("x-api-key", KEY)
            .json(&chat_body(stream))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    let missing = client
        .get(running.url("/nope"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    let (code, log) = running.terminate();
    assert_eq!(code, Some(0), "exit 0 on SIGTERM; log:\n{log}");
    assert!(
        !log.contains(KEY),
        "the API key leaked into the log:\n{log}"
    );
    assert!(
        !log.contains("0123456789abcdef0123"),
        "part of the key leaked:\n{log}"
    );
    let access: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("sluice::access"))
        .collect();
    assert_eq!(access.len(), 3, "one access line per request:\n{log}");
    assert!(access[0].contains("path=/v1/chat/completions") && access[0].contains("status=200"));
    assert!(access[0].contains("bytes=") && access[0].contains("upstream_ms="));
    assert!(access[2].contains("status=404"));
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let mock = mock().await;
    let running = Running::start(
        &["--listen", "127.0.0.1:0", "--log-format", "json"],
        &[("SLUICE_UPSTREAM", &mock.url())],
    );
    client()
        .get(running.url("/v1/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let (code, log) = running.terminate();
    assert_eq!(code, Some(0));
    let access = log
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("every line is JSON"))
        .find(|line| line["target"] == "sluice::access")
        .expect("an access line");
    assert_eq!(access["path"], "/v1/models");
    assert_eq!(access["status"], 200);
    assert_eq!(access["endpoint"], "models");
}

#[tokio::test]
async fn failed_and_cancelled_exchanges_are_logged_with_their_cause() {
    let mock = mock_with(mock_openai::MockConfig {
        chunk_delay: Duration::from_millis(1_500),
        completion_tokens: 3,
        ..mock_openai::MockConfig::default()
    })
    .await;
    let dir = std::env::temp_dir().join(format!("sluice-failures-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("sluice.toml");
    std::fs::write(&config, "[upstream]\nread_timeout_secs = 0.5\n").unwrap();
    let running = Running::start(
        &[
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &mock.url(),
        ],
        &[],
    );
    // A stream the upstream stalls past the read timeout.
    let stalled = client()
        .post(running.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&chat_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(stalled.status(), 200);
    stalled.bytes().await.unwrap();
    // A client that gives up before the upstream answers.
    mock.inject(mock_openai::FaultRule {
        fault: mock_openai::Fault::Delay { ms: 2_000 },
        path_contains: None,
        times: 1,
    });
    let gave_up = client()
        .post(running.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&chat_body(false))
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(gave_up.is_err(), "the client timed out");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (code, log) = running.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.lines()
            .any(|line| line.contains("upstream response body failed")
                && line.contains("upstream.read_timeout_secs")),
        "the body failure's cause is logged:\n{log}"
    );
    let access: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("sluice::access"))
        .collect();
    assert!(
        access
            .iter()
            .any(|line| line.contains("status=200")
                && line.contains("outcome=\"upstream_body_failed\"")),
        "{log}"
    );
    assert!(
        access.iter().any(|line| line.contains("status=499")
            && line.contains("model=\"gpt-4o-mini\"")
            && line.contains("error=\"client_cancelled\"")),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn flags_beat_environment_which_beats_the_file() {
    let dir = std::env::temp_dir().join(format!("sluice-precedence-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sluice.toml");
    // The file's listen address is taken (by us), so only the environment's can work; the
    // environment's upstream is invalid, so only the flag's can work.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std::fs::write(
        &file,
        format!(
            "listen = \"{}\"\n[upstream]\nurl = \"http://127.0.0.1:9\"\n",
            taken.local_addr().unwrap()
        ),
    )
    .unwrap();
    let running = Running::start(
        &[
            "--config",
            file.to_str().unwrap(),
            "--upstream",
            "http://127.0.0.1:7",
        ],
        &[
            ("SLUICE_LISTEN", "127.0.0.1:0"),
            ("SLUICE_UPSTREAM", "not a url"),
        ],
    );
    assert_ne!(running.addr, taken.local_addr().unwrap().to_string());
    let (code, log) = running.terminate();
    assert_eq!(code, Some(0));
    assert!(log.contains("upstream=http://127.0.0.1:7"), "{log}");
}

#[test]
fn check_config_explains_errors_by_key_path() {
    let dir = std::env::temp_dir().join(format!("sluice-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[upstream]\nurl = \"https://api.openai.com/v1\"\n[server]\ndrain_timeout_secs = 0\n",
    )
    .unwrap();
    let output = Command::new(BIN)
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("upstream.url:"), "{stderr}");
    assert!(stderr.contains("server.drain_timeout_secs:"), "{stderr}");

    let unknown = dir.join("unknown.toml");
    std::fs::write(&unknown, "[server]\nmax_body = 1\n").unwrap();
    let output = Command::new(BIN)
        .args(["check-config", unknown.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("server.max_body: unknown field"),
        "{stderr}"
    );

    let good = Command::new(BIN)
        .args([
            "check-config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/sluice.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
}

#[test]
fn a_taken_address_fails_with_a_clear_message() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let output = Command::new(BIN)
        .args(["--listen", &taken.local_addr().unwrap().to_string()])
        .env_remove("SLUICE_CONFIG")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("cannot listen on"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_serves_and_drains_its_connections_on_sigterm() {
    use futures_util::StreamExt;

    let mock = mock_with(mock_openai::MockConfig {
        chunk_delay: Duration::from_millis(30),
        completion_tokens: 20,
        ..mock_openai::MockConfig::default()
    })
    .await;
    let dir = std::env::temp_dir().join(format!("sluice-workers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("sluice.toml");
    std::fs::write(&config, "[server]\nworkers = 3\n").unwrap();
    let running = Running::start(
        &[
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &mock.url(),
        ],
        &[],
    );
    assert!(
        running.log.iter().any(|line| line.contains("workers=3")),
        "{:#?}",
        running.log
    );
    #[cfg(target_os = "linux")]
    {
        let mut threads: Vec<String> =
            std::fs::read_dir(format!("/proc/{}/task", running.child.id()))
                .unwrap()
                .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
                .map(|name| name.trim().to_owned())
                .filter(|name| name.starts_with("sluice-worker"))
                .collect();
        threads.sort();
        assert_eq!(threads, ["sluice-worker-1", "sluice-worker-2"]);
    }

    // Twelve connections, each its own client: the kernel spreads them over the three
    // workers' sockets. Each stream has started when SIGTERM arrives, and each must finish.
    let mut body = chat_body(true);
    body["max_tokens"] = serde_json::json!(20);
    let mut streams = Vec::new();
    for _ in 0..12 {
        let response = reqwest::Client::new()
            .post(running.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut stream = response.bytes_stream();
        let first = stream.next().await.unwrap().unwrap();
        streams.push(tokio::spawn(async move {
            let mut text = String::from_utf8(first.to_vec()).unwrap();
            while let Some(chunk) = stream.next().await {
                text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
            }
            text
        }));
    }
    let ended = tokio::task::spawn_blocking(move || running.terminate());
    for stream in streams {
        let text = stream.await.unwrap();
        assert!(
            text.ends_with("data: [DONE]\n\n"),
            "a stream was cut: {text}"
        );
    }
    let (code, log) = ended.await.unwrap();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(
        log.matches("drained; shutting down").count(),
        3,
        "each worker drains:\n{log}"
    );
}
