//! The upstream side: the HTTP clients and the header rules for crossing the proxy.

pub mod body;
pub mod ratelimit;
pub mod usage;

use std::time::Duration;

use axum::body::Body;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderMap, HeaderName, Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::UpstreamConfig;

pub use body::TimedBody;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The upstream HTTP clients: one per worker ([`crate::workers`]), each pooling the
/// connections (and HTTP/2 sessions) its worker's requests use. A connection's task runs on
/// the worker that opened it, so a request that used another worker's connection would wake
/// that worker's thread twice per exchange.
///
/// These are hyper's own pooled clients (rustls, HTTP/1.1 and HTTP/2 by ALPN), the engine
/// reqwest wraps: a proxy forwards requests that are already built, so reqwest's URL
/// re-parsing, redirect and retry layers only cost time (about a sixth of sluice's
/// instructions per request).
#[derive(Clone, Debug)]
pub struct Upstream {
    clients: Vec<Client<Connector, Body>>,
    /// The upstream's origin, parsed once: each request only adds its own path and query.
    scheme: Scheme,
    authority: Authority,
    /// The base URL's path without its trailing slash ("" for an origin).
    prefix: String,
    /// The longest wait for the response head, and then between two reads of its body.
    read_timeout: Duration,
    /// The longest a whole response may take.
    total_timeout: Duration,
}

impl Upstream {
    /// Clients for `workers` workers (at least one).
    pub fn new(config: &UpstreamConfig, workers: usize) -> Result<Self, UpstreamError> {
        let base: Uri = config.base_url.parse()?;
        let (Some(scheme), Some(authority)) = (base.scheme(), base.authority()) else {
            return Err(UpstreamError::NotAbsolute(config.base_url.clone()));
        };
        let connector = connector(config)?;
        let clients = (0..workers.max(1))
            .map(|_| client(config, connector.clone()))
            .collect();
        Ok(Self {
            clients,
            scheme: scheme.clone(),
            authority: authority.clone(),
            prefix: base.path().trim_end_matches('/').to_owned(),
            read_timeout: config.read_timeout,
            total_timeout: config.total_timeout,
        })
    }

    /// The upstream URI for a request's path and query, kept byte for byte.
    pub fn uri(&self, path_and_query: &PathAndQuery) -> Result<Uri, http::Error> {
        let path_and_query = if self.prefix.is_empty() {
            path_and_query.clone()
        } else {
            PathAndQuery::try_from(format!("{}{path_and_query}", self.prefix))?
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }

    /// Sends a request (its URI from [`Upstream::uri`]) with the calling worker's client.
    /// The connect timeout bounds the connection; the read timeout bounds the wait for the
    /// response head and then each wait for the next piece of its body.
    pub async fn send(&self, request: Request<Body>) -> Result<Response<TimedBody>, SendError> {
        let client = &self.clients[client_index() % self.clients.len()];
        let deadline = tokio::time::Instant::now() + self.total_timeout;
        match tokio::time::timeout(self.read_timeout, client.request(request)).await {
            Ok(Ok(response)) => Ok(response
                .map(|body| TimedBody::new(body, self.read_timeout, deadline, self.total_timeout))),
            Ok(Err(err)) => Err(SendError::from_client(&err)),
            Err(_) => Err(SendError {
                kind: SendFailure::Timeout,
                detail: format!(
                    "no response within {:?} (upstream.read_timeout_secs)",
                    self.read_timeout
                ),
            }),
        }
    }
}

/// Why the upstream clients could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("invalid upstream URL: {0}")]
    Uri(#[from] http::uri::InvalidUri),
    #[error("upstream URL {0:?} needs a scheme and a host")]
    NotAbsolute(String),
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}

/// A request that got no response from the upstream.
#[derive(Debug)]
pub struct SendError {
    pub kind: SendFailure,
    /// The error and its causes on one line (never a header: no key can appear in it).
    pub detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendFailure {
    /// No connection within the connect timeout.
    ConnectTimeout,
    /// No connection could be made (refused, unresolvable, TLS handshake failed).
    Unreachable,
    /// The connection closed before any of the request was written (a pooled connection the
    /// upstream had already closed, which hyper found before the write).
    NotSent,
    /// The connection failed after the request may have been written, before a response
    /// (reset, closed early, a malformed or oversized response head). The upstream may have
    /// received, run and billed it.
    Failed,
    /// No response head within the read timeout: the upstream may still be working on it.
    Timeout,
}

impl SendError {
    fn from_client(err: &hyper_util::client::legacy::Error) -> Self {
        let timed_out = sources(err).any(|cause| {
            cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        });
        // hyper cancels a request that was still waiting in a connection's channel when that
        // connection closed: it was never written. Anything else after the connect step may
        // have reached the upstream.
        let canceled = sources(err).any(|cause| {
            cause
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_canceled)
        });
        let kind = match (err.is_connect(), timed_out, canceled) {
            (true, true, _) => SendFailure::ConnectTimeout,
            (true, false, _) => SendFailure::Unreachable,
            (false, _, true) => SendFailure::NotSent,
            (false, _, false) => SendFailure::Failed,
        };
        Self {
            kind,
            detail: error_chain(err),
        }
    }

    /// The request never reached the upstream, which therefore did not count it.
    pub fn unsent(&self) -> bool {
        matches!(
            self.kind,
            SendFailure::ConnectTimeout | SendFailure::Unreachable | SendFailure::NotSent
        )
    }

    /// Sending again cannot run the request twice: only a request that never reached the
    /// upstream may go again. A connection that broke after the request was written (reset,
    /// early close, a garbage response head) may have had it executed and billed, and the
    /// client's SDK retries connection errors itself, so sluice answers those with a 502
    /// instead of multiplying the executions.
    pub fn retriable(&self) -> bool {
        self.unsent()
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// An error and its causes, outermost first.
fn sources<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |err| err.source())
}

fn connector(config: &UpstreamConfig) -> Result<Connector, rustls::Error> {
    let mut http = HttpConnector::new();
    // https:// URLs are for the TLS layer around it.
    http.enforce_http(false);
    http.set_connect_timeout(Some(config.connect_timeout));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http))
}

fn client(config: &UpstreamConfig, connector: Connector) -> Client<Connector, Body> {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(config.pool_idle_timeout)
        // No small cap: under a burst every in-flight request holds a connection, and
        // re-handshaking TLS for each would add latency exactly when it hurts.
        .pool_max_idle_per_host(usize::MAX)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// Headers that describe one connection, not the message, and so never cross a proxy
/// (RFC 9110 §7.6.1), plus those named by the `Connection` header itself.
fn is_hop_by_hop(name: &HeaderName, connection_listed: &[HeaderName]) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::TE
        || name == header::TRAILER
        || name == header::UPGRADE
        || name == header::PROXY_AUTHORIZATION
        || name == header::PROXY_AUTHENTICATE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
        || connection_listed.contains(name)
}

fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect()
}

/// The client's headers as they go upstream: end-to-end ones only, `Host` dropped (the client
/// sets the upstream's), `Content-Length` dropped when sluice re-sends a body it read whole
/// (the client recomputes it), and sluice's own `x-sluice-*` controls kept to itself.
/// Authorization and every other custom header pass unchanged.
pub fn request_headers(incoming: &HeaderMap, body_was_read: bool) -> HeaderMap {
    let listed = connection_listed(incoming);
    let mut out = HeaderMap::with_capacity(incoming.len());
    for (name, value) in incoming {
        if is_hop_by_hop(name, &listed)
            || name == header::HOST
            || (body_was_read && name == header::CONTENT_LENGTH)
            || name.as_str().starts_with("x-sluice-")
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Removes hop-by-hop headers in place (the upstream's headers, as they go to the client).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed = connection_listed(headers);
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name, &listed))
        .cloned()
        .collect();
    for name in hop {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::str::FromStr;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    fn url_of(base: &str, path_and_query: &str) -> String {
        let overrides = crate::config::Overrides {
            upstream: Some(base.to_owned()),
            ..crate::config::Overrides::default()
        };
        let config = crate::config::Config::from_overrides(&overrides).expect("valid");
        let upstream = Upstream::new(&config.upstream, 2).expect("clients");
        let path_and_query = PathAndQuery::from_str(path_and_query).expect("path and query");
        upstream.uri(&path_and_query).expect("uri").to_string()
    }

    #[test]
    fn requests_go_to_the_same_path_and_query_under_the_base() {
        assert_eq!(
            url_of("https://api.openai.com", "/v1/models?limit=2&after=a%20b"),
            "https://api.openai.com/v1/models?limit=2&after=a%20b"
        );
        assert_eq!(
            url_of(
                "http://127.0.0.1:9/gateway/openai/",
                "/v1/files/file-1/content"
            ),
            "http://127.0.0.1:9/gateway/openai/v1/files/file-1/content"
        );
        assert_eq!(
            url_of("http://127.0.0.1:9", "/v1/chat/completions?"),
            "http://127.0.0.1:9/v1/chat/completions?"
        );
    }

    #[test]
    fn request_headers_keep_end_to_end_ones() {
        let incoming = map(&[
            ("authorization", "Bearer sk-test"),
            ("openai-organization", "org-1"),
            ("openai-project", "proj-1"),
            ("x-stainless-retry-count", "0"),
            ("x-custom", "a"),
            ("x-custom", "b"),
            ("host", "127.0.0.1:8787"),
            ("connection", "keep-alive, x-drop-me"),
            ("keep-alive", "timeout=5"),
            ("x-drop-me", "1"),
            ("transfer-encoding", "chunked"),
            ("content-length", "12"),
            ("te", "trailers"),
            ("x-sluice-priority", "batch"),
            ("x-sluice-max-wait", "3"),
        ]);
        let out = request_headers(&incoming, true);
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(
            names,
            [
                "authorization",
                "openai-organization",
                "openai-project",
                "x-stainless-retry-count",
                "x-custom"
            ]
        );
        assert_eq!(out.get_all("x-custom").iter().count(), 2);
        // A streamed body keeps the client's length, so the upstream sees a sized upload.
        assert!(request_headers(&incoming, false).contains_key("content-length"));
    }

    #[test]
    fn response_headers_drop_only_hop_by_hop() {
        let upstream = map(&[
            ("content-type", "text/event-stream"),
            ("x-ratelimit-remaining-tokens", "100"),
            ("content-length", "5"),
            ("connection", "close"),
            ("transfer-encoding", "chunked"),
        ]);
        let mut out = upstream.clone();
        strip_hop_by_hop(&mut out);
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(
            names,
            [
                "content-type",
                "x-ratelimit-remaining-tokens",
                "content-length"
            ]
        );
    }
}

/// The error and its sources on one line: a client's top-level message alone ("client error
/// (Connect)") hides the cause an operator needs ("Connection refused").
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

thread_local! {
    /// Which of the per-worker clients this thread sends with: 0 for the main thread (and any
    /// thread that is not a worker's), a worker's index once it called [`use_client`].
    static CLIENT_INDEX: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Makes the calling thread (a worker's) send with client `index`, so each worker keeps its
/// own connection pool and never contends for another's.
pub fn use_client(index: usize) {
    CLIENT_INDEX.with(|current| current.set(index));
}

fn client_index() -> usize {
    CLIENT_INDEX.with(std::cell::Cell::get)
}
