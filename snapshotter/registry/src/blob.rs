//! Reading blobs: size, whole-blob streams, and the range reads lazy pulling is built on.

use std::fmt;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use prometheus::IntCounter;
use streamsnap_format::Digest;

use crate::auth::{Access, Scope};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::metrics::{Kind, Outcome, RetryReason};
use crate::reference::Repository;
use crate::transport::{Call, Response, Retry, is_transient};

/// The `phase` of a [`Error::Timeout`] waiting for body bytes (a stall, not a slow answer).
pub(crate) const BODY_PHASE: &str = "next chunk of the body";
/// Most bytes a body read reserves before they arrive.
const MAX_RESERVE: u64 = 64 << 20;

/// A response body read chunk by chunk. Waiting longer than the request timeout for the next
/// chunk is an error, and so is a body that ends before its `Content-Length`.
pub struct BlobStream {
    body: Incoming,
    content_length: Option<u64>,
    received: u64,
    timeout: Duration,
    method: Method,
    url: String,
    /// Counts the body bytes as they arrive (range reads).
    received_counter: Option<IntCounter>,
}

impl fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobStream")
            .field("url", &self.url)
            .field("content_length", &self.content_length)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl BlobStream {
    pub(crate) fn new(response: Response) -> Self {
        let content_length = response.content_length();
        let url = response.url();
        Self {
            body: response.body,
            content_length,
            received: 0,
            timeout: response.timeout,
            method: response.method,
            url,
            received_counter: None,
        }
    }

    /// Adds every body byte received from now on to `counter`.
    pub(crate) fn counting(mut self, counter: &IntCounter) -> Self {
        self.received_counter = Some(counter.clone());
        self
    }

    /// The `Content-Length` the server announced, if any.
    pub fn content_length(&self) -> Option<u64> {
        self.content_length
    }

    /// The next piece of the body; `None` at its end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        loop {
            let frame = match tokio::time::timeout(self.timeout, self.body.frame()).await {
                Err(_) => {
                    return Err(Error::Timeout {
                        method: self.method.clone(),
                        url: self.url.clone(),
                        phase: BODY_PHASE,
                        after: self.timeout,
                    });
                }
                Ok(None) => {
                    if let Some(expected) = self.content_length
                        && self.received < expected
                    {
                        return Err(self.short(expected));
                    }
                    return Ok(None);
                }
                Ok(Some(Err(source))) => {
                    return Err(Error::Body {
                        method: self.method.clone(),
                        url: self.url.clone(),
                        source,
                    });
                }
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data()
                && !data.is_empty()
            {
                self.received += data.len() as u64;
                if let Some(counter) = &self.received_counter {
                    counter.inc_by(data.len() as u64);
                }
                return Ok(Some(data));
            }
        }
    }

    fn short(&self, expected: u64) -> Error {
        Error::ShortBody {
            method: self.method.clone(),
            url: self.url.clone(),
            expected,
            received: self.received,
        }
    }

    /// The whole body, refusing more than `limit` bytes (by `Content-Length` up front, or
    /// while reading).
    pub(crate) async fn read_all(mut self, limit: u64) -> Result<Bytes> {
        let too_large = |url: &str| Error::TooLarge {
            url: url.to_owned(),
            limit,
        };
        if self.content_length.is_some_and(|l| l > limit) {
            return Err(too_large(&self.url));
        }
        let capacity = self.content_length.unwrap_or(0).min(limit);
        let mut out = BytesMut::with_capacity(usize::try_from(capacity).unwrap_or(0));
        while let Some(chunk) = self.next_chunk().await? {
            if out.len() as u64 + chunk.len() as u64 > limit {
                return Err(too_large(&self.url));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out.freeze())
    }

    /// Bytes `skip..skip+take` of the body, then drops the connection without reading the
    /// rest. Fewer than `skip + take` bytes is an error.
    pub(crate) async fn read_slice(mut self, skip: u64, take: u64) -> Result<Bytes> {
        // Reserved up front only as far as the body can hold it: `take` is what was asked for,
        // not what the server sends.
        let reserve = take.min(self.content_length.unwrap_or(0)).min(MAX_RESERVE);
        let mut out = BytesMut::with_capacity(reserve as usize);
        let mut to_skip = skip;
        while (out.len() as u64) < take {
            let Some(mut chunk) = self.next_chunk().await? else {
                return Err(self.short(skip.saturating_add(take)));
            };
            if to_skip > 0 {
                let n = to_skip.min(chunk.len() as u64);
                let _ = chunk.split_to(n as usize);
                to_skip -= n;
            }
            let want = (take - out.len() as u64).min(chunk.len() as u64);
            out.extend_from_slice(&chunk[..want as usize]);
        }
        Ok(out.freeze())
    }
}

impl Client {
    /// The blob's size from a HEAD request; `None` when the registry does not have it.
    pub async fn blob_size(&self, repo: &Repository, digest: &Digest) -> Result<Option<u64>> {
        let call = self.blob_call(Method::HEAD, repo, digest)?;
        let mut retry = Retry::new(self.config().retries);
        let response = self.execute(&call, &mut retry).await?;
        if response.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let response = response.expect(&[StatusCode::OK]).await?;
        match response.content_length() {
            Some(size) => Ok(Some(size)),
            None => Err(response.unexpected("HEAD of a blob without Content-Length".into())),
        }
    }

    /// Whether a HEAD of the blob says range reads of it are served (`Accept-Ranges: bytes`).
    /// A pull-through cache (distribution in proxy mode) says so only once it has stored the
    /// blob, and a HEAD does not make it fetch the blob: a cheap way to ask whether a range GET
    /// would get a 206 now. A missing blob is [`Error::NotFound`].
    pub async fn blob_accepts_ranges(&self, repo: &Repository, digest: &Digest) -> Result<bool> {
        self.accepts_ranges_tries(repo, digest, self.config().retries)
            .await
    }

    /// [`blob_accepts_ranges`](Self::blob_accepts_ranges) tried once, not retried: for a
    /// mirror, whose retry is the next source.
    pub async fn blob_accepts_ranges_once(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<bool> {
        self.accepts_ranges_tries(repo, digest, 0).await
    }

    /// The bound on waiting for a response's headers, and on any stall of its body
    /// ([`ClientConfig::request_timeout`](crate::ClientConfig::request_timeout)).
    pub fn request_timeout(&self) -> Duration {
        self.config().request_timeout
    }

    async fn accepts_ranges_tries(
        &self,
        repo: &Repository,
        digest: &Digest,
        retries: u32,
    ) -> Result<bool> {
        let call = self.blob_call(Method::HEAD, repo, digest)?;
        let mut retry = Retry::new(retries);
        let response = self.execute(&call, &mut retry).await?;
        let response = response.expect(&[StatusCode::OK]).await?;
        Ok(response
            .header_str(header::ACCEPT_RANGES)
            .is_some_and(|v| v.split(',').any(|u| u.trim().eq_ignore_ascii_case("bytes"))))
    }

    /// Streams the blob. Redirects (to a CDN or object store) are followed; the caller verifies
    /// the digest while it reads.
    pub async fn get_blob(&self, repo: &Repository, digest: &Digest) -> Result<BlobStream> {
        let call = self.blob_call(Method::GET, repo, digest)?;
        let mut retry = Retry::new(self.config().retries);
        let response = self.execute(&call, &mut retry).await?;
        Ok(response.expect(&[StatusCode::OK]).await?.into_stream())
    }

    /// The whole blob in memory, at most `max_size` bytes, verified against `digest`.
    pub async fn get_blob_bytes(
        &self,
        repo: &Repository,
        digest: &Digest,
        max_size: u64,
    ) -> Result<Bytes> {
        let stream = self.get_blob(repo, digest).await?;
        let url = stream.url.clone();
        let data = stream.read_all(max_size).await?;
        let actual = Digest::sha256(&data);
        if actual != *digest {
            return Err(Error::DigestMismatch {
                url,
                expected: *digest,
                actual,
            });
        }
        Ok(data)
    }

    /// Exactly `len` bytes of the blob from `offset`, with `Range: bytes=offset-(offset+len-1)`.
    /// A 206 must start at `offset`; a 200 (a server ignoring Range) is sliced, reading no more
    /// than `offset + len` bytes. Transient failures, including bodies cut short, are retried.
    /// Counted in the range metrics (count, bytes received, duration) and, by how it ended, in
    /// the requests metric.
    pub async fn read_range(
        &self,
        repo: &Repository,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        self.read_range_within(repo, digest, offset, len, u64::MAX)
            .await
    }

    /// [`read_range`](Self::read_range) from a server that may answer a range with the whole
    /// blob when reading elsewhere is cheaper than reading through it: a 200 is sliced only
    /// when the range starts within `max_skip` bytes of the blob's start; otherwise the read
    /// ends at the response headers with [`Error::RangeIgnored`], none of the body read. The
    /// distribution registry as a pull-through cache answers so for a blob it has not cached
    /// yet (docs/snapshotter.md, "Mirrors").
    pub async fn read_range_within(
        &self,
        repo: &Repository,
        digest: &Digest,
        offset: u64,
        len: u64,
        max_skip: u64,
    ) -> Result<Bytes> {
        self.read_range_tries(repo, digest, offset, len, max_skip, self.config().retries)
            .await
    }

    /// [`read_range_within`](Self::read_range_within) tried once: no retry, whatever failed
    /// (connection refused, timeout, cut body, 5xx). For a mirror, whose retry is the next
    /// source: retrying it would only add backoff to the wait.
    pub async fn read_range_once(
        &self,
        repo: &Repository,
        digest: &Digest,
        offset: u64,
        len: u64,
        max_skip: u64,
    ) -> Result<Bytes> {
        self.read_range_tries(repo, digest, offset, len, max_skip, 0)
            .await
    }

    async fn read_range_tries(
        &self,
        repo: &Repository,
        digest: &Digest,
        offset: u64,
        len: u64,
        max_skip: u64,
        retries: u32,
    ) -> Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let started = Instant::now();
        let result = self
            .read_range_retrying(repo, digest, offset, len, max_skip, retries)
            .await;
        self.metrics()
            .range_read(Outcome::of(&result), started.elapsed().as_secs_f64());
        result
    }

    async fn read_range_retrying(
        &self,
        repo: &Repository,
        digest: &Digest,
        offset: u64,
        len: u64,
        max_skip: u64,
        retries: u32,
    ) -> Result<Bytes> {
        let last = offset
            .checked_add(len - 1)
            .ok_or_else(|| Error::InvalidUrl {
                url: format!("{repo}@{digest}"),
                reason: "range end overflows",
            })?;
        let call = self
            .blob_call(Method::GET, repo, digest)?
            .header(header::RANGE, &format!("bytes={offset}-{last}"));
        let call = Call {
            kind: Kind::Range,
            ..call
        };
        let mut retry = Retry::new(retries);
        loop {
            let result = self
                .read_range_attempt(&call, &mut retry, offset, len, max_skip)
                .await;
            match result {
                Err(e) if is_transient(&e) => match retry.backoff(None) {
                    Some(delay) => {
                        tracing::debug!(error = %e, ?delay, "retrying range read");
                        self.metrics().retry(RetryReason::of_error(&e));
                        tokio::time::sleep(delay).await;
                    }
                    None => return Err(e),
                },
                other => return other,
            }
        }
    }

    async fn read_range_attempt(
        &self,
        call: &Call<'_>,
        retry: &mut Retry,
        offset: u64,
        len: u64,
        max_skip: u64,
    ) -> Result<Bytes> {
        let response = self.execute(call, retry).await?;
        match response.status {
            StatusCode::PARTIAL_CONTENT => {
                let content_range = response
                    .header_str(header::CONTENT_RANGE)
                    .ok_or_else(|| response.unexpected("206 without Content-Range".into()))?;
                let (start, end) = parse_content_range(content_range).ok_or_else(|| {
                    response.unexpected(format!("unparsable Content-Range {content_range:?}"))
                })?;
                if start != offset {
                    return Err(response.unexpected(format!(
                        "asked for bytes from {offset}, got Content-Range {content_range:?}"
                    )));
                }
                if end - start < len - 1 {
                    return Err(response.unexpected(format!(
                        "asked for {len} bytes at {offset}, got Content-Range {content_range:?} \
                         (range past the end of the blob?)"
                    )));
                }
                let counter = self.metrics().range_bytes();
                response
                    .into_stream()
                    .counting(counter)
                    .read_slice(0, len)
                    .await
            }
            StatusCode::OK if offset > max_skip => {
                // Dropping the response closes the connection: nothing more of the body comes.
                tracing::debug!(
                    offset,
                    len,
                    max_skip,
                    "server ignored Range, not reading through the body"
                );
                Err(Error::RangeIgnored {
                    url: response.url(),
                    offset,
                    max_skip,
                })
            }
            StatusCode::OK => {
                tracing::debug!(offset, len, "server ignored Range, slicing the full body");
                let stream = response
                    .into_stream()
                    .counting(self.metrics().range_bytes());
                if let Some(total) = stream.content_length
                    && total <= offset + (len - 1)
                {
                    return Err(Error::UnexpectedResponse {
                        method: Method::GET,
                        url: stream.url,
                        reason: format!(
                            "range {offset}+{len} is past the end of the blob ({total} bytes)"
                        ),
                    });
                }
                stream.read_slice(offset, len).await
            }
            _ => Err(response.into_error().await),
        }
    }

    fn blob_call<'a>(
        &self,
        method: Method,
        repo: &'a Repository,
        digest: &Digest,
    ) -> Result<Call<'a>> {
        let uri = self.url(repo, &format!("blobs/{digest}"))?;
        Ok(Call::new(Kind::Blob, method, uri, pull_scope(repo)))
    }
}

pub(crate) fn pull_scope(repo: &Repository) -> Scope<'_> {
    Scope {
        registry: &repo.registry,
        repository: &repo.name,
        access: Access::Pull,
    }
}

/// `bytes first-last/length` or `bytes first-last/*` (RFC 9110, 14.4) with
/// `first <= last < length` -> (first, last). Anything else (signs, spaces inside, a range past
/// the length it states) is not a range to take bytes by.
fn parse_content_range(value: &str) -> Option<(u64, u64)> {
    let (unit, range) = value.trim_matches([' ', '\t']).split_at_checked(6)?;
    if !unit.eq_ignore_ascii_case("bytes ") {
        return None;
    }
    let number = |s: &str| {
        if s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse::<u64>().ok()
        } else {
            None
        }
    };
    let (span, length) = range.split_once('/')?;
    let (first, last) = span.split_once('-')?;
    let (first, last) = (number(first)?, number(last)?);
    let within = length == "*" || last < number(length)?;
    (first <= last && within).then_some((first, last))
}

#[cfg(test)]
#[path = "blob_props.rs"]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses() {
        assert_eq!(parse_content_range("bytes 10-19/100"), Some((10, 19)));
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0, 0)));
        assert_eq!(parse_content_range("bytes 5-4/10"), None);
        assert_eq!(parse_content_range("bytes */10"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }
}
