//! `mock-openai`: serve the mock on a port for benchmarks and manual tests.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use mock_openai::{MockConfig, MockServer};
use tokio::net::TcpListener;

/// A mock OpenAI upstream with realistic rate limiting.
#[derive(Debug, Parser)]
#[command(name = "mock-openai", version)]
struct Args {
    /// Address to listen on; port 0 picks a free one (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Requests per minute of each (organization, model).
    #[arg(long)]
    rpm: Option<u64>,
    /// Tokens per minute of each (organization, model).
    #[arg(long)]
    tpm: Option<u64>,
    /// Enforce limits over this window instead of the whole minute.
    #[arg(long)]
    quantum_ms: Option<u64>,
    /// Do not send retry-after / retry-after-ms on 429s.
    #[arg(long)]
    no_retry_after: bool,
    /// Pause between SSE events.
    #[arg(long)]
    chunk_delay_ms: Option<u64>,
    /// Tokens generated per choice when the request sets no cap.
    #[arg(long)]
    completion_tokens: Option<u32>,
}

impl Args {
    fn config(&self) -> MockConfig {
        let defaults = MockConfig::default();
        MockConfig {
            rpm: self.rpm.unwrap_or(defaults.rpm),
            tpm: self.tpm.unwrap_or(defaults.tpm),
            quantum: self.quantum_ms.map(Duration::from_millis),
            retry_after: !self.no_retry_after,
            chunk_delay: self
                .chunk_delay_ms
                .map_or(defaults.chunk_delay, Duration::from_millis),
            completion_tokens: self.completion_tokens.unwrap_or(defaults.completion_tokens),
            ..defaults
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // tiktoken keeps a regex per thread whose cache is built on first use (hundreds of
    // milliseconds): warm it on every runtime thread so no request pays for it.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(|| {
            tiktoken_rs::o200k_base_singleton().encode_ordinary("warm up: words 123, 漢字 😀!");
        })
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(serve(args)),
        Err(err) => {
            eprintln!("mock-openai: cannot start the runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> ExitCode {
    let listener = match TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("mock-openai: cannot listen on {}: {err}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let server = match MockServer::start_on(listener, args.config()).await {
        Ok(server) => server,
        Err(err) => {
            eprintln!("mock-openai: cannot start: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Tests parse this line to find the port.
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "mock-openai listening on {}", server.url());
    let _ = stdout.flush();
    shutdown_signal().await;
    server.shutdown().await;
    ExitCode::SUCCESS
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
