//! `sluice healthcheck`, the container image's HEALTHCHECK and the Kubernetes exec probes:
//! exit 0 only when sluice answers /readyz with 200, exit 1 otherwise, within 2 s.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use tokio::time::Instant;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// Runs `sluice healthcheck` with `args` and `envs` off the async runtime, so the in-process
/// sluice it probes keeps serving meanwhile.
async fn healthcheck(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let envs: Vec<(String, String)> = envs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .arg("healthcheck")
            .args(&args)
            .env_remove("SLUICE_CONFIG")
            .env_remove("SLUICE_LISTEN")
            .envs(envs)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn a_ready_sluice_passes() {
    let mock = mock().await;
    let sluice = Sluice::start(&mock.url()).await;

    let output = healthcheck(&["--url", &sluice.url("")], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    // Without --url, the probe follows the listen address; the image listens on 0.0.0.0,
    // which is probed on loopback. (Serving there needs tokens or this explicit opt-out,
    // which the container's environment holds for the probe as for the server.)
    let listen = format!("0.0.0.0:{}", sluice.addr.port());
    let output = healthcheck(
        &[],
        &[
            ("SLUICE_LISTEN", &listen),
            ("SLUICE_ALLOW_UNAUTHENTICATED", "true"),
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    sluice.stop().await;
}

#[tokio::test]
async fn a_closed_port_fails_with_one_line() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let output = healthcheck(&["--url", &format!("http://{closed}")], &[]).await;
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert_eq!(message.trim_end().lines().count(), 1, "{message}");
    assert!(message.contains("/readyz"), "{message}");
}

#[tokio::test]
async fn a_status_other_than_200_fails() {
    let upstream = raw_upstream(
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .await;
    let output = healthcheck(&["--url", &format!("http://{upstream}")], &[]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("status 503"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test]
async fn a_silent_server_fails_within_the_timeout() {
    // Bound but never accepted: the connection succeeds (backlog) and nothing ever answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let started = Instant::now();
    let output = healthcheck(&["--url", &url], &[]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    drop(silent);
}

#[tokio::test]
async fn an_invalid_configuration_fails_with_1_not_2() {
    // Docker reserves exit code 2 for health checks.
    let output = healthcheck(&[], &[("SLUICE_LISTEN", "not an address")]).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
}
