//! The binary's own HTTP/1.1 client, for the subcommands that talk to a running sluice
//! (`healthcheck`, `status`). Part of the binary, not the library (`main.rs` declares it).
//!
//! Deliberately blocking and dependency-free: it runs as a short-lived process (every few
//! seconds, for a health check) in an image without curl, and speaks plain `http://` only.
//! Everything, connecting included, happens within one overall timeout.
// The CLI runs no tokio runtime: its deadlines are the wall clock's.
#![allow(clippy::disallowed_types)]

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// A response read whole.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// The most of a response head read before giving up on it.
const MAX_HEAD: usize = 16 * 1024;

/// `GET {base_url}{path}` and only the status code: what a probe needs. The error says what
/// went wrong in a few words.
pub fn get_status(base_url: &str, path: &str, timeout: Duration) -> Result<u16, String> {
    let mut conn = Connection::open(base_url, path, timeout)?;
    let mut head = Vec::new();
    while !head.contains(&b'\n') && head.len() < MAX_HEAD {
        if conn.read_some(&mut head)? == 0 {
            break;
        }
    }
    status_code(&head).ok_or_else(|| "no HTTP status line in the answer".to_owned())
}

/// `GET {base_url}{path}`, the body read whole (at most `max_body` bytes, else an error).
pub fn get(
    base_url: &str,
    path: &str,
    timeout: Duration,
    max_body: usize,
) -> Result<Response, String> {
    let mut conn = Connection::open(base_url, path, timeout)?;
    let mut bytes = Vec::new();
    let head_end = loop {
        if let Some(end) = find(&bytes, b"\r\n\r\n") {
            break end + 4;
        }
        if bytes.len() > MAX_HEAD {
            return Err("the answer's header is too large".to_owned());
        }
        if conn.read_some(&mut bytes)? == 0 {
            return Err(match status_code(&bytes) {
                Some(_) => "the connection closed within the answer's header".to_owned(),
                None => "no HTTP status line in the answer".to_owned(),
            });
        }
    };
    let status = status_code(&bytes).ok_or("no HTTP status line in the answer")?;
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_ascii_lowercase();
    let chunked = header(&head, "transfer-encoding").is_some_and(|value| value.contains("chunked"));
    let length = header(&head, "content-length").and_then(|value| value.parse::<usize>().ok());
    if length.is_some_and(|length| length > max_body) {
        return Err(format!("the answer is larger than {max_body} bytes"));
    }
    let mut body = bytes.split_off(head_end);
    // The request said `Connection: close`: the body ends where the connection does, or
    // earlier when its length is known. A chunked body's framing adds a little to its size.
    let max_read = max_body
        .saturating_add(max_body / 8)
        .saturating_add(MAX_HEAD);
    while length.is_none_or(|length| body.len() < length) {
        if body.len() > max_read {
            return Err(format!("the answer is larger than {max_body} bytes"));
        }
        if conn.read_some(&mut body)? == 0 {
            break;
        }
    }
    let body = match length {
        _ if chunked => dechunk(&body).ok_or("a malformed or cut-short chunked body")?,
        Some(length) if body.len() < length => {
            return Err("the connection closed within the answer's body".to_owned())
        }
        Some(length) => {
            body.truncate(length);
            body
        }
        None => body,
    };
    if body.len() > max_body {
        return Err(format!("the answer is larger than {max_body} bytes"));
    }
    Ok(Response { status, body })
}

/// An open connection with the request sent, and the time left to read the answer.
struct Connection {
    stream: TcpStream,
    deadline: Instant,
    timeout: Duration,
}

impl Connection {
    fn open(base_url: &str, path: &str, timeout: Duration) -> Result<Self, String> {
        let deadline = Instant::now() + timeout;
        let remaining = || remaining(deadline, timeout);
        let rest = base_url
            .strip_prefix("http://")
            .ok_or("the URL must start with http://")?;
        let (authority, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_end_matches('/');
        let path = if prefix.is_empty() {
            path.to_owned()
        } else {
            format!("/{prefix}{path}")
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
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream
            .set_write_timeout(Some(remaining()?))
            .and_then(|()| stream.write_all(request.as_bytes()))
            .map_err(|err| format!("cannot send the request: {err}"))?;
        Ok(Self {
            stream,
            deadline,
            timeout,
        })
    }

    /// Reads what has arrived onto `buf`; 0 at the end of the answer.
    fn read_some(&mut self, buf: &mut Vec<u8>) -> Result<usize, String> {
        let mut chunk = [0u8; 8192];
        loop {
            self.stream
                .set_read_timeout(Some(remaining(self.deadline, self.timeout)?))
                .map_err(|err| err.to_string())?;
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => return Err(format!("no answer: {err}")),
            }
        }
    }
}

/// The time left before `deadline`, or the error that says the answer did not come in time.
fn remaining(deadline: Instant, timeout: Duration) -> Result<Duration, String> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|left| !left.is_zero())
        .ok_or_else(|| format!("no answer within {timeout:?}"))
}

/// The status code of an HTTP/1.x response whose first bytes are `head`.
pub fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let mut parts = std::str::from_utf8(line).ok()?.split_whitespace();
    parts
        .next()
        .filter(|version| version.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

/// The value of header `name` in a lowercased response head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == name).then(|| value.trim())
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Decodes a `Transfer-Encoding: chunked` body (extensions and trailers ignored); `None` when
/// malformed or cut short.
fn dechunk(mut bytes: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = find(bytes, b"\r\n")?;
        let size_text = std::str::from_utf8(&bytes[..line_end]).ok()?;
        let size_text = size_text.split(';').next()?.trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        bytes = &bytes[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(bytes.get(..size)?);
        bytes = bytes.get(size..)?.strip_prefix(b"\r\n")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn only_plain_http_urls_are_fetched() {
        let err = get_status("https://127.0.0.1:8787", "/readyz", Duration::from_secs(2));
        assert!(err.is_err_and(|message| message.contains("http://")));
    }

    #[test]
    fn headers_are_found_by_name() {
        let head =
            "http/1.1 200 ok\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n";
        assert_eq!(header(head, "content-length"), Some("12"));
        assert_eq!(header(head, "content-type"), Some("application/json"));
        assert_eq!(header(head, "transfer-encoding"), None);
    }

    #[test]
    fn chunked_bodies_are_decoded() {
        assert_eq!(
            dechunk(b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n").as_deref(),
            Some(&b"hello, world"[..])
        );
        assert_eq!(dechunk(b"0\r\n\r\n").as_deref(), Some(&b""[..]));
        assert_eq!(dechunk(b"5\r\nhel"), None);
        assert_eq!(dechunk(b"zz\r\nhello\r\n0\r\n\r\n"), None);
    }

    /// Serves one connection with `answer`, then closes it.
    fn serve_once(answer: &'static [u8]) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        std::thread::spawn(move || {
            if let Ok((mut socket, _)) = listener.accept() {
                let mut seen = Vec::new();
                let mut buf = [0u8; 1024];
                while find(&seen, b"\r\n\r\n").is_none() {
                    match socket.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = socket.write_all(answer);
            }
        });
        url
    }

    #[test]
    fn bodies_are_read_by_length_chunks_or_to_the_end() {
        let timeout = Duration::from_secs(5);
        let url = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        let response = get(&url, "/status", timeout, 1024).expect("answer");
        assert_eq!((response.status, &response.body[..]), (200, &b"hello"[..]));

        let url = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        );
        let response = get(&url, "/status", timeout, 1024).expect("answer");
        assert_eq!(&response.body[..], b"hi");

        let url = serve_once(b"HTTP/1.0 503 Service Unavailable\r\n\r\nbusy");
        let response = get(&url, "/status", timeout, 1024).expect("answer");
        assert_eq!((response.status, &response.body[..]), (503, &b"busy"[..]));

        let url = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n");
        let err = get(&url, "/status", timeout, 1024).expect_err("too large");
        assert!(err.contains("larger than"), "{err}");

        let url = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\ncut");
        let err = get(&url, "/status", timeout, 1024).expect_err("cut short");
        assert!(err.contains("closed"), "{err}");
    }
}
