//! The `sluice` binary: parse the command line, set up logging, load the config, bind, run.

use std::io::{IsTerminal, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

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
    /// A separate address for /metrics, /status and the health endpoints [default: none;
    /// they are served on --listen].
    #[arg(long, env = "SLUICE_METRICS_LISTEN")]
    metrics_listen: Option<String>,
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
    /// Exit 0 if sluice answers GET /readyz with 200 within 2 s, else 1 (for container
    /// health checks and exec probes; no curl needed).
    Healthcheck {
        /// Base URL of sluice, e.g. http://127.0.0.1:8787 [default: from the listen address,
        /// with 0.0.0.0 or [::] probed as 127.0.0.1 or [::1]].
        #[arg(long)]
        url: Option<String>,
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
        metrics_listen: cli.metrics_listen.clone(),
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
    if let Some(Command::Healthcheck { url }) = &cli.command {
        return healthcheck(url.as_deref(), cli.config.as_deref(), &overrides);
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

/// `sluice healthcheck`: probes `url`, else the address this configuration listens on.
/// Docker reserves exit code 2, so every failure, a bad configuration included, is 1.
fn healthcheck(url: Option<&str>, config: Option<&Path>, overrides: &Overrides) -> ExitCode {
    let url = match url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => {
            let loaded = match config {
                Some(path) => Config::load(path, overrides),
                None => Config::from_overrides(overrides),
            };
            match loaded {
                Ok(config) => probe_url(config.listen),
                Err(err) => {
                    eprintln!("sluice healthcheck: {}", err.to_string().replace('\n', " "));
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    match probe_ready(&url, HEALTHCHECK_TIMEOUT) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("sluice healthcheck: {url}/readyz: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The whole budget of one `sluice healthcheck`: connect, send, and read the status line.
const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The base URL that reaches a server listening on `listen` from the same host (or container):
/// an unspecified address is probed on loopback.
fn probe_url(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, listen.port()))
}

/// `GET {base_url}/readyz` over plain HTTP/1.1, all within `timeout`. `Ok` only on status 200;
/// the error says what went wrong in a few words. Deliberately blocking and dependency-free:
/// it runs as a short-lived process every few seconds, in an image without curl.
fn probe_ready(base_url: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
            .ok_or_else(|| format!("no answer within {timeout:?}"))
    };
    let rest = base_url
        .strip_prefix("http://")
        .ok_or("the URL must start with http://")?;
    let (authority, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = prefix.trim_end_matches('/');
    let path = if prefix.is_empty() {
        "/readyz".to_owned()
    } else {
        format!("/{prefix}/readyz")
    };
    // "host" and "[v6]" carry no port; "host:port" and "[v6]:port" do.
    let target = if authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:80")
    } else {
        authority.to_owned()
    };
    let addrs = target
        .to_socket_addrs()
        .map_err(|err| format!("cannot resolve {authority}: {err}"))?;
    // "localhost" may resolve to ::1 and 127.0.0.1 while sluice listens on only one of them.
    let mut failure = format!("{authority} resolves to no address");
    let mut connected = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, remaining()?) {
            Ok(stream) => {
                connected = Some(stream);
                break;
            }
            Err(err) => failure = format!("cannot connect to {addr}: {err}"),
        }
    }
    let mut stream = connected.ok_or(failure)?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream
        .set_write_timeout(Some(remaining()?))
        .and_then(|()| stream.write_all(request.as_bytes()))
        .map_err(|err| format!("cannot send the request: {err}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < 4096 {
        stream
            .set_read_timeout(Some(remaining()?))
            .map_err(|err| err.to_string())?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(format!("no answer: {err}")),
        }
    }
    match status_code(&head) {
        Some(200) => Ok(()),
        Some(status) => Err(format!("status {status}")),
        None => Err("no HTTP status line in the answer".to_owned()),
    }
}

/// The status code of an HTTP/1.x response whose first bytes are `head`.
fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let mut parts = std::str::from_utf8(line).ok()?.split_whitespace();
    parts
        .next()
        .filter(|version| version.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_listen_addresses_are_probed_on_loopback() {
        let probe = |listen: &str| probe_url(listen.parse().expect("a socket address"));
        assert_eq!(probe("0.0.0.0:8787"), "http://127.0.0.1:8787");
        assert_eq!(probe("[::]:8787"), "http://[::1]:8787");
        assert_eq!(probe("10.1.2.3:9000"), "http://10.1.2.3:9000");
        assert_eq!(probe("[fd00::1]:8787"), "http://[fd00::1]:8787");
    }

    #[test]
    fn status_line_parsing() {
        assert_eq!(
            status_code(b"HTTP/1.1 200 OK\r\ncontent-length: 0"),
            Some(200)
        );
        assert_eq!(
            status_code(b"HTTP/1.0 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(status_code(b"HTTP/1.1 204\r\n"), Some(204));
        assert_eq!(status_code(b"SSH-2.0-OpenSSH_9.2\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 abc\r\n"), None);
        assert_eq!(status_code(b""), None);
    }

    #[test]
    fn only_plain_http_urls_are_probed() {
        let err = probe_ready("https://127.0.0.1:8787", HEALTHCHECK_TIMEOUT);
        assert!(err.is_err_and(|message| message.contains("http://")));
    }
}
