//! Prometheus metrics of the registry client: requests by kind and outcome, range reads (count,
//! bytes, latency), retries by reason and token fetches. Label values are fixed enums below:
//! never a repository, digest, URL or credential.

use std::fmt;

use http::StatusCode;
use prometheus::core::Collector;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

use crate::error::Error;

/// Upper bounds of the range read latency histogram, in seconds: 1 ms to 60 s.
const RANGE_DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The metric handles of a [`Client`](crate::Client). Build it with [`Metrics::register`] to
/// export it, or [`Metrics::unregistered`] (also `Default`) for handles that count but are not
/// exported; hand it to the client in [`ClientConfig::metrics`](crate::ClientConfig::metrics).
/// Cheap to clone: clones share the counters.
#[derive(Clone)]
pub struct Metrics {
    /// `streamsnap_registry_requests_total{kind,outcome}`: logical requests (retries and the
    /// 401 token flow of one request count once), by what they were for and how they ended.
    requests: IntCounterVec,
    /// `streamsnap_registry_range_requests_total`: range reads (one per `read_range` call, its
    /// retries included).
    range_requests: IntCounter,
    /// `streamsnap_registry_range_bytes_total`: body bytes received in answers to range reads,
    /// all attempts, including bytes discarded (a server ignoring `Range`).
    range_bytes: IntCounter,
    /// `streamsnap_registry_range_duration_seconds`: time of a whole range read, retries and
    /// backoff included, whatever its outcome.
    range_duration: Histogram,
    /// `streamsnap_registry_retries_total{reason}`: attempts made again, by what failed.
    retries: IntCounterVec,
    /// `streamsnap_registry_auth_token_fetches_total{outcome}`: bearer token requests to a
    /// token endpoint, by outcome.
    token_fetches: IntCounterVec,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("range_requests", &self.range_requests.get())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::unregistered()
    }
}

impl Metrics {
    /// Creates the handles and registers them in `registry`. Fails if metrics of these names are
    /// registered there already (one client's metrics per registry); then nothing is left
    /// registered.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self::build()?;
        register_all(registry, || {
            vec![
                Box::new(m.requests.clone()),
                Box::new(m.range_requests.clone()),
                Box::new(m.range_bytes.clone()),
                Box::new(m.range_duration.clone()),
                Box::new(m.retries.clone()),
                Box::new(m.token_fetches.clone()),
            ]
        })?;
        Ok(m)
    }

    /// Handles that count but are exported nowhere (tests, the CLI).
    pub fn unregistered() -> Self {
        Self::build().expect("the registry metric definitions are valid")
    }

    fn build() -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "streamsnap_registry_requests_total",
                "Registry requests (retries included in one), by kind and outcome",
            ),
            &["kind", "outcome"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "streamsnap_registry_retries_total",
                "Registry request attempts made again, by the reason the previous one failed",
            ),
            &["reason"],
        )?;
        let token_fetches = IntCounterVec::new(
            Opts::new(
                "streamsnap_registry_auth_token_fetches_total",
                "Bearer token requests to registry token endpoints, by outcome",
            ),
            &["outcome"],
        )?;
        // Every series exists from the start, so that rates and alerts see zeros, not gaps.
        for kind in Kind::ALL {
            for outcome in Outcome::ALL {
                requests.with_label_values(&[kind.as_str(), outcome.as_str()]);
            }
        }
        for reason in RetryReason::ALL {
            retries.with_label_values(&[reason.as_str()]);
        }
        for outcome in Outcome::ALL {
            token_fetches.with_label_values(&[outcome.as_str()]);
        }
        Ok(Self {
            requests,
            range_requests: IntCounter::new(
                "streamsnap_registry_range_requests_total",
                "Blob range reads (one per read, its retries included)",
            )?,
            range_bytes: IntCounter::new(
                "streamsnap_registry_range_bytes_total",
                "Body bytes received in answers to blob range reads, all attempts",
            )?,
            range_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "streamsnap_registry_range_duration_seconds",
                    "Time of a blob range read, retries and backoff included",
                )
                .buckets(RANGE_DURATION_BUCKETS.to_vec()),
            )?,
            retries,
            token_fetches,
        })
    }

    pub(crate) fn request(&self, kind: Kind, outcome: Outcome) {
        self.requests
            .with_label_values(&[kind.as_str(), outcome.as_str()])
            .inc();
    }

    pub(crate) fn retry(&self, reason: RetryReason) {
        self.retries.with_label_values(&[reason.as_str()]).inc();
    }

    pub(crate) fn token_fetch(&self, outcome: Outcome) {
        self.token_fetches
            .with_label_values(&[outcome.as_str()])
            .inc();
    }

    /// Accounts for one finished range read.
    pub(crate) fn range_read(&self, outcome: Outcome, seconds: f64) {
        self.range_requests.inc();
        self.range_duration.observe(seconds);
        self.request(Kind::Range, outcome);
    }

    pub(crate) fn range_bytes(&self) -> &IntCounter {
        &self.range_bytes
    }
}

/// Registers every collector `make` gives, or none: on an error the ones already registered
/// are taken out again (the registry matches collectors by their descriptions).
fn register_all(
    registry: &Registry,
    make: impl Fn() -> Vec<Box<dyn Collector>>,
) -> Result<(), prometheus::Error> {
    for (i, collector) in make().into_iter().enumerate() {
        if let Err(e) = registry.register(collector) {
            for done in make().into_iter().take(i) {
                let _ = registry.unregister(done);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// What a request is for: the `kind` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Manifest or index GET, HEAD, PUT, DELETE.
    Manifest,
    /// Whole blob GET or HEAD.
    Blob,
    /// Blob range read.
    Range,
    /// A step of a blob upload (POST, PATCH, PUT, cancelling DELETE).
    Upload,
    /// A page of the referrers API.
    Referrers,
    /// A bearer token request to a token endpoint.
    Token,
}

impl Kind {
    const ALL: [Self; 6] = [
        Self::Manifest,
        Self::Blob,
        Self::Range,
        Self::Upload,
        Self::Referrers,
        Self::Token,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Manifest => "manifest",
            Self::Blob => "blob",
            Self::Range => "range",
            Self::Upload => "upload",
            Self::Referrers => "referrers",
            Self::Token => "token",
        }
    }
}

/// How a request ended: the `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A 1xx-3xx answer (and, for range reads, the whole body).
    Ok,
    /// 404.
    NotFound,
    /// 401 or 403 (after the token flow), or a token endpoint refusing.
    Unauthorized,
    /// Another 4xx, 429 included.
    ClientError,
    /// 5xx.
    ServerError,
    /// No answer, or no progress of the body, within the request timeout.
    Timeout,
    /// Connection refused or reset, TLS or protocol failure.
    Transport,
    /// The body ended before its announced or requested length.
    ShortBody,
    /// An answer that breaks the protocol: wrong Content-Range, bad JSON, redirect loop, body
    /// over its limit, content not matching its digest.
    InvalidResponse,
    /// A range read answered with the whole blob, the range too far into it to read through
    /// ([`Error::RangeIgnored`]).
    RangeIgnored,
}

impl Outcome {
    const ALL: [Self; 10] = [
        Self::Ok,
        Self::NotFound,
        Self::Unauthorized,
        Self::ClientError,
        Self::ServerError,
        Self::Timeout,
        Self::Transport,
        Self::ShortBody,
        Self::InvalidResponse,
        Self::RangeIgnored,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::NotFound => "not_found",
            Self::Unauthorized => "unauthorized",
            Self::ClientError => "client_error",
            Self::ServerError => "server_error",
            Self::Timeout => "timeout",
            Self::Transport => "transport",
            Self::ShortBody => "short_body",
            Self::InvalidResponse => "invalid_response",
            Self::RangeIgnored => "range_ignored",
        }
    }

    pub(crate) fn of_status(status: StatusCode) -> Self {
        match status.as_u16() {
            401 | 403 => Self::Unauthorized,
            404 => Self::NotFound,
            400..=499 => Self::ClientError,
            500..=599 => Self::ServerError,
            _ => Self::Ok,
        }
    }

    pub(crate) fn of_error(error: &Error) -> Self {
        match error {
            Error::Timeout { .. } => Self::Timeout,
            Error::Body { source, .. } if cut_short(source) => Self::ShortBody,
            Error::Transport { .. } | Error::Body { .. } | Error::Tls(_) => Self::Transport,
            Error::ShortBody { .. } => Self::ShortBody,
            Error::Unauthorized { .. } => Self::Unauthorized,
            Error::NotFound { .. } => Self::NotFound,
            Error::Status { status, .. } => Self::of_status(*status),
            Error::RangeIgnored { .. } => Self::RangeIgnored,
            _ => Self::InvalidResponse,
        }
    }

    pub(crate) fn of<T>(result: &Result<T, Error>) -> Self {
        match result {
            Ok(_) => Self::Ok,
            Err(e) => Self::of_error(e),
        }
    }
}

/// Why an attempt is made again: the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RetryReason {
    /// Connection refused or reset, or the body broke off.
    Transport,
    /// No response headers within the request timeout.
    Timeout,
    /// A 5xx answer.
    ServerError,
    /// A 429 answer.
    TooManyRequests,
    /// The body ended before its announced or requested length.
    ShortBody,
    /// The body stopped making progress for the request timeout.
    Stall,
}

impl RetryReason {
    const ALL: [Self; 6] = [
        Self::Transport,
        Self::Timeout,
        Self::ServerError,
        Self::TooManyRequests,
        Self::ShortBody,
        Self::Stall,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Transport => "transport",
            Self::Timeout => "timeout",
            Self::ServerError => "server_error",
            Self::TooManyRequests => "too_many_requests",
            Self::ShortBody => "short_body",
            Self::Stall => "stall",
        }
    }

    pub(crate) fn of_status(status: StatusCode) -> Self {
        if status == StatusCode::TOO_MANY_REQUESTS {
            Self::TooManyRequests
        } else {
            Self::ServerError
        }
    }

    /// The reason for retrying after `error`; errors that are never retried map to transport.
    pub(crate) fn of_error(error: &Error) -> Self {
        match error {
            Error::Timeout { phase, .. } if *phase == crate::blob::BODY_PHASE => Self::Stall,
            Error::Timeout { .. } => Self::Timeout,
            Error::ShortBody { .. } => Self::ShortBody,
            Error::Body { source, .. } if cut_short(source) => Self::ShortBody,
            Error::Status { status, .. } => Self::of_status(*status),
            _ => Self::Transport,
        }
    }
}

/// Whether a body error is the connection ending before the body's `Content-Length` (hyper
/// reports it as an `UnexpectedEof` I/O error), rather than a reset or a protocol error.
fn cut_short(error: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::UnexpectedEof)
        {
            return true;
        }
        source = e.source();
    }
    error.is_incomplete_message()
}

#[cfg(test)]
mod tests {
    use prometheus::{Encoder as _, TextEncoder};

    use super::*;

    fn exposition(registry: &Registry) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn registers_once_per_registry_with_conventional_names() {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry).unwrap();
        assert!(Metrics::register(&registry).is_err());
        // The failed second registration left the first one intact.
        metrics.retry(RetryReason::Stall);
        let text = exposition(&registry);
        assert!(text.contains("streamsnap_registry_retries_total{reason=\"stall\"} 1\n"));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let fields: Vec<&str> = line.split(' ').collect();
            let (name, kind) = (fields[2], fields[3]);
            assert!(name.starts_with("streamsnap_registry_"), "{line}");
            match kind {
                "counter" => assert!(name.ends_with("_total"), "{line}"),
                "histogram" => assert!(name.ends_with("_seconds"), "{line}"),
                _ => panic!("unexpected type: {line}"),
            }
        }
        assert_eq!(text.matches("# TYPE").count(), 6, "{text}");
        // All label combinations exist from the start.
        assert!(text.contains(
            "streamsnap_registry_requests_total{kind=\"token\",outcome=\"short_body\"} 0\n"
        ));

        let unregistered = Metrics::unregistered();
        unregistered.retry(RetryReason::Stall);
        assert!(exposition(&registry).contains("{reason=\"stall\"} 1\n"));
    }

    #[test]
    fn statuses_map_to_outcomes() {
        let outcome = |s: u16| Outcome::of_status(StatusCode::from_u16(s).unwrap());
        assert_eq!(outcome(200), Outcome::Ok);
        assert_eq!(outcome(206), Outcome::Ok);
        assert_eq!(outcome(307), Outcome::Ok);
        assert_eq!(outcome(401), Outcome::Unauthorized);
        assert_eq!(outcome(403), Outcome::Unauthorized);
        assert_eq!(outcome(404), Outcome::NotFound);
        assert_eq!(outcome(429), Outcome::ClientError);
        assert_eq!(outcome(503), Outcome::ServerError);
        assert_eq!(
            RetryReason::of_status(StatusCode::TOO_MANY_REQUESTS),
            RetryReason::TooManyRequests
        );
        assert_eq!(
            RetryReason::of_status(StatusCode::BAD_GATEWAY),
            RetryReason::ServerError
        );
    }
}
