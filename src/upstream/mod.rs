//! The upstream side: one shared HTTP client and the header rules for crossing the proxy.

pub mod body;
pub mod ratelimit;
pub mod usage;

use std::time::Duration;

use http::{header, HeaderMap, HeaderName, Method};

use crate::config::UpstreamConfig;

/// The upstream HTTP clients: one per worker ([`crate::workers`]), each pooling the
/// connections (and HTTP/2 sessions) its worker's requests use. A connection's task runs on
/// the worker that opened it, so a request that used another worker's connection would wake
/// that worker's thread twice per exchange.
#[derive(Clone, Debug)]
pub struct Upstream {
    clients: Vec<reqwest::Client>,
    /// The upstream's origin (and path prefix, if any), parsed once: each request only sets
    /// its own path and query on a copy.
    base: reqwest::Url,
    /// The base's path without its trailing slash ("" for an origin).
    prefix: String,
}

impl Upstream {
    /// Clients for `workers` workers (at least one).
    pub fn new(config: &UpstreamConfig, workers: usize) -> Result<Self, UpstreamError> {
        let clients = (0..workers.max(1))
            .map(|_| client(config))
            .collect::<Result<_, _>>()?;
        let base = reqwest::Url::parse(&config.base_url)?;
        let prefix = base.path().trim_end_matches('/').to_owned();
        Ok(Self {
            clients,
            base,
            prefix,
        })
    }

    /// Starts a request to the upstream's same path and query, with the calling worker's
    /// client. The returned builder carries no timeout of its own: connect and read timeouts
    /// come from the client.
    pub fn request(&self, method: Method, path_and_query: &str) -> reqwest::RequestBuilder {
        let (path, query) = match path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path_and_query, None),
        };
        let mut url = self.base.clone();
        if self.prefix.is_empty() {
            url.set_path(path);
        } else {
            url.set_path(&format!("{}{path}", self.prefix));
        }
        url.set_query(query);
        let client = &self.clients[crate::workers::current() % self.clients.len()];
        client.request(method, url)
    }
}

/// Why the upstream clients could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    Client(#[from] reqwest::Error),
    #[error("invalid upstream URL: {0}")]
    Url(#[from] url::ParseError),
}

fn client(config: &UpstreamConfig) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .connect_timeout(config.connect_timeout)
        .read_timeout(config.read_timeout)
        .pool_idle_timeout(config.pool_idle_timeout)
        // No small cap: under a burst every in-flight request holds a connection, and
        // re-handshaking TLS for each would add latency exactly when it hurts.
        .pool_max_idle_per_host(usize::MAX)
        .tcp_nodelay(true)
        .tcp_keepalive(Duration::from_secs(60))
        // A proxy passes redirects to its client instead of following them.
        .redirect(reqwest::redirect::Policy::none())
        .build()
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

/// The upstream's headers as they go to the client: everything but hop-by-hop headers.
/// `Content-Length` stays, so a sized upstream body stays sized.
pub fn response_headers(upstream: &HeaderMap) -> HeaderMap {
    let listed = connection_listed(upstream);
    let mut out = HeaderMap::with_capacity(upstream.len());
    for (name, value) in upstream {
        if !is_hop_by_hop(name, &listed) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

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
        let request = upstream
            .request(Method::GET, path_and_query)
            .build()
            .expect("request");
        request.url().as_str().to_owned()
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
        let out = response_headers(&upstream);
        assert!(out.contains_key("x-ratelimit-remaining-tokens"));
        assert!(out.contains_key("content-length"));
        assert!(!out.contains_key("connection"));
        assert!(!out.contains_key("transfer-encoding"));
        let mut in_place = upstream.clone();
        strip_hop_by_hop(&mut in_place);
        assert_eq!(in_place, out);
    }
}
