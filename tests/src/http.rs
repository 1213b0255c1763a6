//! A minimal HTTP/1.0 client over a plain `TcpStream`: enough for readiness probes, log barriers
//! and peeking at a registry from a test, without an HTTP client dependency. The server closes
//! the connection after an HTTP/1.0 response, so the body is everything up to EOF.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, bail};

/// How long one request may take before it is abandoned.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed HTTP response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Header names as sent by the server; compare them case-insensitively (see [`Self::header`]).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The value of the first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET http://{addr}{path}` with extra request headers (e.g. `Accept`, `Range`).
pub fn get(addr: &str, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<Response> {
    request(addr, "GET", path, headers)
}

/// One HTTP/1.0 request with an empty body.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Response> {
    let what = || format!("{method} http://{addr}{path}");
    let mut stream =
        TcpStream::connect(addr).with_context(|| format!("connecting for {}", what()))?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .with_context(|| format!("sending {}", what()))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the response to {}", what()))?;
    parse_response(&raw).with_context(|| format!("parsing the response to {}", what()))
}

fn parse_response(raw: &[u8]) -> anyhow::Result<Response> {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("no end of headers in {} bytes", raw.len());
    };
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_headers_and_body() {
        let r = parse_response(
            b"HTTP/1.0 206 Partial Content\r\nContent-Length: 3\r\nX-A: b\r\n\r\nabc",
        )
        .unwrap();
        assert_eq!(r.status, 206);
        assert_eq!(r.header("content-length"), Some("3"));
        assert_eq!(r.body, b"abc");
        assert!(parse_response(b"HTTP/1.0 200 OK\r\n").is_err());
    }
}
