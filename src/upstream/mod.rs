//! The upstream side: one shared HTTP client and the header rules for crossing the proxy.

pub mod body;
pub mod ratelimit;
pub mod usage;

use std::time::Duration;

use http::{header, HeaderMap, HeaderName, Method};

use crate::config::UpstreamConfig;

/// The one client every request shares, so connections (and HTTP/2 sessions) are pooled.
#[derive(Clone, Debug)]
pub struct Upstream {
    client: reqwest::Client,
    base_url: String,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
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
            .build()?;
        Ok(Self {
            client,
            base_url: config.base_url.clone(),
        })
    }

    /// Starts a request to the upstream's same path and query. The returned builder carries
    /// no timeout of its own: connect and read timeouts come from the client.
    pub fn request(&self, method: Method, path_and_query: &str) -> reqwest::RequestBuilder {
        let mut url = String::with_capacity(self.base_url.len() + path_and_query.len());
        url.push_str(&self.base_url);
        url.push_str(path_and_query);
        self.client.request(method, url)
    }
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
    }
}
