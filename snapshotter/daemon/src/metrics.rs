//! The daemon's own metrics, and the registry every component's metrics are registered in.
//! Exposed as Prometheus text on `/metrics` (see `http.rs`); names and meanings in
//! docs/metrics.md.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The `reason` labels of `streamsnap_snapshotter_fallbacks_total`.
pub const FALLBACK_REASONS: [&str; 12] = [
    "no_artifact",
    "no_platform",
    "layer_not_in_artifact",
    "invalid_artifact",
    "artifact_mismatch",
    "invalid_image",
    "unsigned",
    "invalid_reference",
    "registry_unavailable",
    "registry_error",
    "mount",
    "snapshot",
];
/// The `method` labels of the API call metrics.
pub const RPC_METHODS: [&str; 10] = [
    "prepare", "view", "mounts", "commit", "remove", "stat", "update", "list", "usage", "cleanup",
];

#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Registry,
    /// Snapshots by kind (view, active, committed) and whether remote, set at each scrape.
    pub snapshots: IntGaugeVec,
    /// Layers mounted remotely (through FUSE) since start.
    pub remote_mounts: IntCounter,
    /// Prepares that fell back to an ordinary pull, by reason.
    pub fallbacks: IntCounterVec,
    /// Remote snapshots mounted again at start, and those that could not be.
    pub mounts_restored: IntGauge,
    pub mounts_restore_failures: IntGauge,
    /// Seconds it took at start to serve the remote snapshots again (before the socket opened).
    pub mounts_restore_duration: prometheus::Gauge,
    /// Snapshots API calls by method, and their failures by gRPC code.
    pub rpc_duration: HistogramVec,
    pub rpc_errors: IntCounterVec,
    /// Compressed bytes fetched by background fetch, and layers it completed.
    pub background_bytes: IntCounter,
    pub background_layers: IntCounter,
    /// Compressed bytes fetched ahead of the reads because an image's start-up profile lists
    /// them, and layers whose profile prefetch started.
    pub prefetch_bytes: IntCounter,
    pub prefetch_layers: IntCounter,
    /// Per mirror: 1 while it is down (reads go past it to the next source), and the times it
    /// was found down (no answer in time, refused connections, 5xx, wrong bytes).
    pub mirror_down: IntGaugeVec,
    pub mirror_failures: IntCounterVec,
    /// Layers a Prepare found resolved ahead (TOC fetched, checked and indexed at their
    /// image's first Prepare).
    pub layers_resolved_ahead: IntCounter,
    /// Takeovers of the FUSE connections from the holder, by how the previous daemon ended
    /// (graceful: it handed over; crash: it died), and mounts done afresh instead.
    pub handovers: IntCounterVec,
    /// FUSE_NOTIFY_RESEND notifications sent (each makes the kernel resend every request the
    /// dead daemon took on that connection and did not answer).
    pub fuse_resends: IntCounter,
    /// 1 when the kernel can resend requests (Linux 6.9+) and the config lets the daemon ask it
    /// to, so a crash loses nothing in flight.
    pub fuse_resend_supported: IntGauge,
    /// 1 when a holder keeps the FUSE connections (mounts survive a daemon restart).
    pub fuse_holder: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let snapshots = IntGaugeVec::new(
            Opts::new(
                "streamsnap_snapshotter_snapshots",
                "Snapshots by kind and origin (local or remote)",
            ),
            &["kind", "origin"],
        )?;
        let remote_mounts = IntCounter::new(
            "streamsnap_snapshotter_remote_mounts_total",
            "Layers mounted remotely through FUSE instead of being pulled",
        )?;
        let fallbacks = IntCounterVec::new(
            Opts::new(
                "streamsnap_snapshotter_fallbacks_total",
                "Prepares of a pulled layer that fell back to an ordinary pull, by reason",
            ),
            &["reason"],
        )?;
        let mounts_restored = IntGauge::new(
            "streamsnap_snapshotter_mounts_restored",
            "Remote snapshots mounted again when the daemon started",
        )?;
        let mounts_restore_failures = IntGauge::new(
            "streamsnap_snapshotter_mounts_restore_failures",
            "Remote snapshots that could not be mounted again when the daemon started",
        )?;
        let mounts_restore_duration = prometheus::Gauge::new(
            "streamsnap_snapshotter_mounts_restore_duration_seconds",
            "Time the daemon took at start to serve the remote snapshots again, before accepting calls",
        )?;
        let rpc_duration = HistogramVec::new(
            HistogramOpts::new(
                "streamsnap_snapshotter_rpc_duration_seconds",
                "Snapshots API call duration by method",
            )
            .buckets(vec![
                0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0,
            ]),
            &["method"],
        )?;
        let rpc_errors = IntCounterVec::new(
            Opts::new(
                "streamsnap_snapshotter_rpc_errors_total",
                "Snapshots API calls that failed, by method and gRPC code",
            ),
            &["method", "code"],
        )?;
        let background_bytes = IntCounter::new(
            "streamsnap_snapshotter_background_fetch_bytes_total",
            "Compressed bytes fetched by background fetch",
        )?;
        let background_layers = IntCounter::new(
            "streamsnap_snapshotter_background_fetch_layers_total",
            "Layers whose every chunk background fetch brought into the cache",
        )?;
        let prefetch_bytes = IntCounter::new(
            "streamsnap_snapshotter_prefetch_bytes_total",
            "Compressed bytes fetched ahead of the reads because the image's start-up profile lists them",
        )?;
        let prefetch_layers = IntCounter::new(
            "streamsnap_snapshotter_prefetch_layers_total",
            "Layer mounts that started prefetching the chunks of a start-up profile",
        )?;
        let mirror_down = IntGaugeVec::new(
            Opts::new(
                "streamsnap_snapshotter_mirror_down",
                "1 while a mirror is down and chunk reads go past it to the next source",
            ),
            &["mirror"],
        )?;
        let mirror_failures = IntCounterVec::new(
            Opts::new(
                "streamsnap_snapshotter_mirror_failures_total",
                "Times a mirror was found down (no answer in time, refused, 5xx, wrong bytes)",
            ),
            &["mirror"],
        )?;
        let layers_resolved_ahead = IntCounter::new(
            "streamsnap_snapshotter_layers_resolved_ahead_total",
            "Layers whose Prepare found them resolved ahead, at their image's first Prepare",
        )?;
        let handovers = IntCounterVec::new(
            Opts::new(
                "streamsnap_snapshotter_handovers_total",
                "FUSE connections taken over by kind (graceful, crash) or remounted (remount)",
            ),
            &["kind"],
        )?;
        let fuse_resends = IntCounter::new(
            "streamsnap_snapshotter_fuse_resends_total",
            "FUSE_NOTIFY_RESEND notifications sent after taking over from a daemon that died",
        )?;
        let fuse_resend_supported = IntGauge::new(
            "streamsnap_snapshotter_fuse_resend_supported",
            "1 when the kernel resends requests a dead daemon took (Linux 6.9+) and [fuse] \
             kernel_features_off does not turn that off",
        )?;
        let fuse_holder = IntGauge::new(
            "streamsnap_snapshotter_fuse_holder",
            "1 when a holder process keeps the FUSE connections across daemon restarts",
        )?;
        // Every series of a fixed label set exists from the start, at 0.
        for kind in ["graceful", "crash", "remount"] {
            handovers.with_label_values(&[kind]);
        }
        for reason in FALLBACK_REASONS {
            fallbacks.with_label_values(&[reason]);
        }
        for method in RPC_METHODS {
            rpc_duration.with_label_values(&[method]);
        }
        for kind in ["view", "active", "committed"] {
            for origin in ["local", "remote"] {
                snapshots.with_label_values(&[kind, origin]);
            }
        }
        registry.register(Box::new(handovers.clone()))?;
        registry.register(Box::new(fuse_resends.clone()))?;
        registry.register(Box::new(fuse_resend_supported.clone()))?;
        registry.register(Box::new(fuse_holder.clone()))?;
        registry.register(Box::new(snapshots.clone()))?;
        registry.register(Box::new(remote_mounts.clone()))?;
        registry.register(Box::new(fallbacks.clone()))?;
        registry.register(Box::new(mounts_restored.clone()))?;
        registry.register(Box::new(mounts_restore_failures.clone()))?;
        registry.register(Box::new(mounts_restore_duration.clone()))?;
        registry.register(Box::new(rpc_duration.clone()))?;
        registry.register(Box::new(rpc_errors.clone()))?;
        registry.register(Box::new(background_bytes.clone()))?;
        registry.register(Box::new(background_layers.clone()))?;
        registry.register(Box::new(prefetch_bytes.clone()))?;
        registry.register(Box::new(prefetch_layers.clone()))?;
        registry.register(Box::new(layers_resolved_ahead.clone()))?;
        registry.register(Box::new(mirror_down.clone()))?;
        registry.register(Box::new(mirror_failures.clone()))?;
        Ok(Self {
            registry,
            snapshots,
            remote_mounts,
            fallbacks,
            mounts_restored,
            mounts_restore_failures,
            mounts_restore_duration,
            rpc_duration,
            rpc_errors,
            background_bytes,
            background_layers,
            prefetch_bytes,
            prefetch_layers,
            layers_resolved_ahead,
            mirror_down,
            mirror_failures,
            handovers,
            fuse_resends,
            fuse_resend_supported,
            fuse_holder,
        })
    }

    /// The Prometheus text exposition of every registered metric.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|error| {
                tracing::warn!(%error, "encoding metrics failed");
                String::new()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exposed_with_its_prefix() {
        let metrics = Metrics::new().unwrap();
        metrics.fallbacks.with_label_values(&["no_artifact"]).inc();
        metrics
            .snapshots
            .with_label_values(&["committed", "remote"])
            .set(2);
        metrics
            .rpc_duration
            .with_label_values(&["prepare"])
            .observe(0.01);
        let text = metrics.render();
        assert!(
            text.contains("streamsnap_snapshotter_fallbacks_total{reason=\"no_artifact\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "streamsnap_snapshotter_snapshots{kind=\"committed\",origin=\"remote\"} 2"
            )
        );
        assert!(text.contains("streamsnap_snapshotter_rpc_duration_seconds_bucket"));
    }
}
