//! The `sluice` binary: parse the command line, set up logging, load the config, bind, run.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;
use sluice::config::{Config, ConfigError, LogFormat, Overrides};
use tracing_subscriber::EnvFilter;

/// Every request allocates many small, short-lived buffers (headers, JSON, body chunks) across
/// threads; mimalloc serves that pattern with less contention and fewer page faults than the
/// system allocator (measured with bench/load.py).
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// A rate-limit-aware reverse proxy for OpenAI-compatible APIs.
///
/// Point your application at it with OPENAI_BASE_URL=http://127.0.0.1:8787/v1.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
struct Cli {
    /// TOML configuration file (every key optional; see config/sluice.toml).
    #[arg(long, env = "SLUICE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8787].
    #[arg(long, env = "SLUICE_LISTEN")]
    listen: Option<String>,
    /// Upstream API origin [default: https://api.openai.com].
    #[arg(long, env = "SLUICE_UPSTREAM")]
    upstream: Option<String>,
    /// Log format [default: pretty].
    #[arg(long, value_enum, env = "SLUICE_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a configuration file and explain every error by its key path.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    // An empty SLUICE_* variable (`-e SLUICE_CONFIG=` in Docker, `VAR= sluice` in a shell)
    // means "not set", not "set to nothing": clap would reject it as a missing value.
    // Done first, before any thread exists that could read the environment concurrently.
    for (name, value) in std::env::vars_os() {
        if value.is_empty() && name.to_str().is_some_and(|n| n.starts_with("SLUICE_")) {
            std::env::remove_var(name);
        }
    }
    let cli = Cli::parse();
    let overrides = Overrides {
        listen: cli.listen.clone(),
        upstream: cli.upstream.clone(),
        log_format: cli.log_format,
    };
    if let Some(Command::CheckConfig { file }) = &cli.command {
        return match Config::load(file, &overrides) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(err) => report_config_error(&err),
        };
    }
    let loaded = match &cli.config {
        Some(path) => Config::load(path, &overrides),
        None => Config::from_overrides(&overrides),
    };
    let config = match loaded {
        Ok(config) => config,
        Err(err) => return report_config_error(&err),
    };
    // Dropped at the end of main, which flushes every log line still queued.
    let _log_writer = init_tracing(config.log_format);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("sluice: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(
                "cannot listen on {}: {err} (choose another address with --listen or SLUICE_LISTEN)",
                config.listen
            );
            return ExitCode::FAILURE;
        }
    };
    match sluice::run(listener, config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            ExitCode::FAILURE
        }
    }
}

fn report_config_error(err: &ConfigError) -> ExitCode {
    eprintln!("sluice: {err}");
    ExitCode::from(2)
}

/// Logs go to stderr through a background writer thread: a request never waits on the log's
/// write (a synchronous write per access line cost ~60 µs of latency in the load benchmark).
/// The writer is lossless: if the log cannot keep up, requests wait rather than lines vanish.
fn init_tracing(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("sluice-log")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Pretty => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    guard
}

/// Resolves on SIGINT or SIGTERM (Ctrl-C elsewhere).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                tracing::warn!("cannot install signal handlers; stop sluice by killing it");
                std::future::pending::<()>().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
