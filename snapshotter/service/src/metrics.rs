//! The service's Prometheus metrics, served at `GET /metrics` beside the API (no token, as an
//! exporter is scraped; nothing in it comes from the registry: no repository names, tags or
//! error texts, only counts). Counters are this replica's; the gauges of repositories and
//! operations are read from the store at each scrape, so every replica reports the same.

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::api::{OperationState, Repository, Streaming, WebhookSummary};

/// Where the metrics are served.
pub const METRICS_PATH: &str = "/metrics";

/// How a conversion this replica ran ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    Succeeded,
    Failed,
    Canceled,
    /// Stopped by this replica's shutdown and queued again.
    Requeued,
    /// Another replica took the operation over (this one lost its lease).
    LostLease,
}

impl Ended {
    fn as_str(self) -> &'static str {
        match self {
            Ended::Succeeded => "succeeded",
            Ended::Failed => "failed",
            Ended::Canceled => "canceled",
            Ended::Requeued => "requeued",
            Ended::LostLease => "lost_lease",
        }
    }
}

#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    conversions: IntCounterVec,
    conversion_seconds: HistogramVec,
    webhook_events: IntCounterVec,
    repositories: IntGaugeVec,
    operations: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let conversions = IntCounterVec::new(
            Opts::new(
                "streamsnap_service_conversions_total",
                "Conversions this replica ran, by how they ended",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let conversion_seconds = HistogramVec::new(
            HistogramOpts::new(
                "streamsnap_service_conversion_duration_seconds",
                "Time of each conversion this replica ran, from its start to its end",
            )
            .buckets(vec![
                0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 150.0, 300.0, 600.0, 1800.0, 3600.0,
            ]),
            &["outcome"],
        )
        .expect("valid metric");
        let webhook_events = IntCounterVec::new(
            Opts::new(
                "streamsnap_service_webhook_events_total",
                "Registry notification events this replica handled, by what they led to",
            ),
            &["result"],
        )
        .expect("valid metric");
        let repositories = IntGaugeVec::new(
            Opts::new(
                "streamsnap_service_repositories",
                "Repositories the service knows, by streaming state (from the store)",
            ),
            &["streaming"],
        )
        .expect("valid metric");
        let operations = IntGaugeVec::new(
            Opts::new(
                "streamsnap_service_operations",
                "Operations in the store, by state (all replicas)",
            ),
            &["state"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(conversions.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(conversion_seconds.clone()),
            Box::new(webhook_events.clone()),
            Box::new(repositories.clone()),
            Box::new(operations.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        // Every series from the start, so that rate() and absent() work before the first event.
        for ended in [
            Ended::Succeeded,
            Ended::Failed,
            Ended::Canceled,
            Ended::Requeued,
            Ended::LostLease,
        ] {
            conversions.with_label_values(&[ended.as_str()]);
        }
        for result in ["created", "duplicate", "deleted", "ignored"] {
            webhook_events.with_label_values(&[result]);
        }
        Self {
            registry,
            conversions,
            conversion_seconds,
            webhook_events,
            repositories,
            operations,
        }
    }

    pub fn conversion_ended(&self, ended: Ended, took: Duration) {
        self.conversions.with_label_values(&[ended.as_str()]).inc();
        self.conversion_seconds
            .with_label_values(&[ended.as_str()])
            .observe(took.as_secs_f64());
    }

    pub fn webhook(&self, summary: &WebhookSummary) {
        for (result, n) in [
            ("created", summary.created),
            ("duplicate", summary.duplicates),
            ("deleted", summary.deleted),
            ("ignored", summary.ignored),
        ] {
            self.webhook_events
                .with_label_values(&[result])
                .inc_by(u64::from(n));
        }
    }

    /// The text exposition, the gauges set from `repositories` (as the store has them now).
    pub fn render(&self, repositories: &[Repository]) -> Vec<u8> {
        for streaming in [Streaming::Active, Streaming::Inactive] {
            let n = repositories
                .iter()
                .filter(|r| r.streaming == streaming)
                .count();
            self.repositories
                .with_label_values(&[streaming_label(streaming)])
                .set(n as i64);
        }
        for state in OperationState::ALL {
            let n: u64 = repositories.iter().map(|r| r.operations.get(state)).sum();
            self.operations
                .with_label_values(&[state.as_str()])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("writing to a Vec cannot fail");
        out
    }
}

fn streaming_label(streaming: Streaming) -> &'static str {
    match streaming {
        Streaming::Active => "active",
        Streaming::Inactive => "inactive",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_there_before_the_first_event_and_counts_after() {
        let metrics = Metrics::new();
        let text = String::from_utf8(metrics.render(&[])).unwrap();
        assert!(text.contains("streamsnap_service_conversions_total{outcome=\"succeeded\"} 0"));
        assert!(text.contains("streamsnap_service_webhook_events_total{result=\"created\"} 0"));
        assert!(
            text.contains("streamsnap_service_operations{state=\"Running\"} 0"),
            "{text}"
        );
        assert!(text.contains("streamsnap_service_repositories{streaming=\"active\"} 0"));

        metrics.conversion_ended(Ended::Failed, Duration::from_secs(3));
        metrics.webhook(&WebhookSummary {
            created: 2,
            duplicates: 1,
            deleted: 0,
            ignored: 4,
        });
        let text = String::from_utf8(metrics.render(&[])).unwrap();
        assert!(text.contains("streamsnap_service_conversions_total{outcome=\"failed\"} 1"));
        assert!(text.contains(
            "streamsnap_service_conversion_duration_seconds_bucket{outcome=\"failed\",le=\"5\"} 1"
        ));
        assert!(text.contains("streamsnap_service_webhook_events_total{result=\"created\"} 2"));
        assert!(text.contains("streamsnap_service_webhook_events_total{result=\"ignored\"} 4"));
    }
}
