//! The `sluice` binary: parse the command line, set up logging, load the config, bind, run.

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;
use sluice::config::{Config, ConfigError, LogFormat, Overrides};
use sluice::log_writer::{BatchedWriter, LogGuard};
use tracing::Metadata;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

mod cli_http;

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
    /// Serve beyond loopback without client tokens (only where the network in front of
    /// sluice is trusted) [default: false].
    #[arg(long, env = "SLUICE_ALLOW_UNAUTHENTICATED", num_args = 0..=1, default_missing_value = "true")]
    allow_unauthenticated: Option<bool>,
    /// Upstream API origin [default: https://api.openai.com].
    #[arg(long, env = "SLUICE_UPSTREAM")]
    upstream: Option<String>,
    /// Log format [default: pretty].
    #[arg(long, value_enum, env = "SLUICE_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// Share limits with other replicas through this Redis (redis://host:6379/0, or
    /// rediss:// for TLS) [default: none, limits are this process's own].
    #[arg(long, env = "SLUICE_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
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
    /// Print every (org, model) bucket of a running sluice: limits in force, its own and the
    /// upstream's remaining budget, queue, circuit, pause, last 429; then the orgs in quota
    /// cool-down. Exit 1 if sluice cannot be reached.
    Status {
        /// Base URL of sluice [default: as for healthcheck].
        #[arg(long)]
        url: Option<String>,
        /// Print the /status JSON as it came instead of a table.
        #[arg(long)]
        json: bool,
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
        allow_unauthenticated: cli.allow_unauthenticated,
        upstream: cli.upstream.clone(),
        log_format: cli.log_format,
        redis_url: cli.redis_url.clone(),
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
    if let Some(Command::Status { url, json }) = &cli.command {
        return status(url.as_deref(), *json, cli.config.as_deref(), &overrides);
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
    raise_open_files_limit();

    // The main thread is the first worker; it also runs the signal handlers, the reload
    // watcher and the metrics listener.
    let runtime = match sluice::state::tokenizers()
        .map_err(|err| err.to_string())
        .and_then(|tokenizers| {
            tokenizers.warm();
            sluice::workers::runtime(tokenizers).map_err(|err| err.to_string())
        }) {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!("cannot start: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(serve(config));
    // Exchanges the drain timeout cut end here, with the runtime, and log their lines.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    // Access lines still waiting for their writer thread, before the log's own flush.
    sluice::access::flush();
    code
}

async fn serve(config: Config) -> ExitCode {
    let mut listeners = match sluice::workers::bind(config.listen, config.server.workers) {
        Ok(listeners) => listeners.into_iter(),
        Err(err) => {
            tracing::error!(
                "cannot listen on {}: {err} (choose another address with --listen or SLUICE_LISTEN)",
                config.listen
            );
            return ExitCode::FAILURE;
        }
    };
    let Some(first) = listeners.next() else {
        tracing::error!("no listening socket was bound");
        return ExitCode::FAILURE;
    };
    match sluice::run_workers(first, listeners.collect(), config, shutdown_signal()).await {
        Ok(sluice::server::Drain::Complete) => ExitCode::SUCCESS,
        Ok(sluice::server::Drain::Cut { connections }) => {
            tracing::warn!(
                connections,
                "exiting with code {DRAIN_CUT}: the drain timeout cut requests in flight"
            );
            ExitCode::from(DRAIN_CUT)
        }
        Err(err) => {
            tracing::error!("{err}");
            ExitCode::FAILURE
        }
    }
}

/// The exit code when the drain timeout cut exchanges still in flight (1 is a failure to run,
/// 2 a bad configuration): an orchestrator can tell a clean stop from a cut one.
const DRAIN_CUT: u8 = 3;

/// Every connection takes a descriptor (and a proxied one two): the soft limit, often 1024,
/// is raised to the hard one, so `server.max_connections` binds before the kernel does.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(err) => tracing::warn!(error = %err, "could not raise the open files limit"),
    }
}

fn report_config_error(err: &ConfigError) -> ExitCode {
    eprintln!("sluice: {err}");
    ExitCode::from(2)
}

/// Logs go to stderr through a background writer thread that writes them in batches
/// ([`sluice::log_writer`]): a request never waits on the log's write nor wakes a thread for it
/// (a synchronous write per access line cost ~60 µs of latency in the load benchmark, a
/// channel with a wake-up per line ~100 µs). No line is dropped.
fn init_tracing(format: LogFormat) -> Option<LogGuard> {
    match BatchedWriter::new(std::io::stderr()) {
        Ok((writer, guard)) => {
            install_subscriber(format, writer);
            Some(guard)
        }
        Err(err) => {
            install_subscriber(format, std::io::stderr);
            tracing::warn!("cannot start the log writer thread ({err}); logging synchronously");
            None
        }
    }
}

fn install_subscriber<W>(format: LogFormat, writer: W)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Clone + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match format {
        LogFormat::Json => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(writer)
            .json()
            .flatten_event(true)
            .init(),
        LogFormat::Pretty if std::io::stderr().is_terminal() => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(writer)
            .with_ansi(true)
            .init(),
        LogFormat::Pretty => {
            // Access lines arrive as one message sluice formatted and escaped itself
            // (sluice::access): their layer skips the per-character escaping pass, which
            // would cost more than formatting them. Every other line keeps it.
            sluice::access::plain_text_lines(true);
            let access = |meta: &Metadata<'_>| meta.target() == sluice::access::TARGET;
            tracing_subscriber::registry()
                .with(filter)
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(writer.clone())
                        .with_ansi(false)
                        .with_filter(filter_fn(move |meta| !access(meta))),
                )
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(writer)
                        .with_ansi(false)
                        .with_ansi_sanitization(false)
                        .with_filter(filter_fn(access)),
                )
                .init();
        }
    }
}

/// Resolves on SIGINT or SIGTERM (Ctrl-C elsewhere).
/// The handlers are installed when this is called, not when the future is first polled: a
/// signal that arrives while the server is still starting must not kill it outright.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let handlers = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        async move {
            match handlers {
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
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `sluice healthcheck`: probes `url`, else the address this configuration listens on.
/// Docker reserves exit code 2, so every failure, a bad configuration included, is 1.
fn healthcheck(url: Option<&str>, config: Option<&Path>, overrides: &Overrides) -> ExitCode {
    let url = match base_url("healthcheck", url, config, overrides) {
        Ok(url) => url,
        Err(code) => return code,
    };
    match cli_http::get_status(&url, "/readyz", HEALTHCHECK_TIMEOUT) {
        Ok(200) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("sluice healthcheck: {url}/readyz: status {status}");
            ExitCode::FAILURE
        }
        Err(message) => {
            eprintln!("sluice healthcheck: {url}/readyz: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `sluice status`: fetches `/status` from `url` (else from the address this configuration
/// listens on, as `healthcheck` does) and prints it as a table, or as it came with `--json`.
/// Exit 1, with one line on stderr, when there is no usable answer.
fn status(url: Option<&str>, json: bool, config: Option<&Path>, overrides: &Overrides) -> ExitCode {
    let url = match base_url("status", url, config, overrides) {
        Ok(url) => url,
        Err(code) => return code,
    };
    let fail = |message: String| {
        eprintln!("sluice status: {url}/status: {message}");
        ExitCode::FAILURE
    };
    let body = match cli_http::get(&url, "/status", STATUS_TIMEOUT, STATUS_MAX_BYTES) {
        Ok(response) if response.status == 200 => response.body,
        Ok(response) => return fail(format!("status {}", response.status)),
        Err(message) => return fail(message),
    };
    let value = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(value) => value,
        Err(err) => return fail(format!("the answer is not JSON: {err}")),
    };
    if json {
        println!("{}", String::from_utf8_lossy(&body).trim_end());
    } else {
        print!("{}", sluice::status_view::render(&value));
    }
    ExitCode::SUCCESS
}

/// The base URL a client subcommand talks to: `url`, else the address the configuration
/// listens on. A configuration error is reported on one line and exits 1.
fn base_url(
    command: &str,
    url: Option<&str>,
    config: Option<&Path>,
    overrides: &Overrides,
) -> Result<String, ExitCode> {
    if let Some(url) = url {
        return Ok(url.trim_end_matches('/').to_owned());
    }
    let loaded = match config {
        Some(path) => Config::load(path, overrides),
        None => Config::from_overrides(overrides),
    };
    match loaded {
        Ok(config) => Ok(probe_url(config.listen)),
        Err(err) => {
            eprintln!("sluice {command}: {}", err.to_string().replace('\n', " "));
            Err(ExitCode::FAILURE)
        }
    }
}

/// The whole budget of one `sluice healthcheck`: connect, send, and read the status line.
const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The whole budget of one `sluice status`: connect, send, and read the answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest `/status` answer read: far above the ~1 KB per bucket of the label caps' 200
/// orgs by 100 models.
const STATUS_MAX_BYTES: usize = 64 * 1024 * 1024;

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
}
