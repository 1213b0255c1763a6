//! Prometheus metrics of the FUSE adapter: latency and errors of each kind of request, and
//! bytes read. Label values are the fixed op names below and errno names: never a path, inode or
//! digest.

use std::fmt;
use std::time::Instant;

use nix::errno::Errno;
use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Upper bounds of the op latency histogram, in seconds: metadata answers take microseconds,
/// reads that fetch chunks up to the fetch deadline (60 s by default).
const OP_DURATION_BUCKETS: &[f64] = &[
    0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Upper bounds of the metadata load histogram, in seconds: an index is read in milliseconds, a
/// rebuild from a large TOC takes up to seconds.
const LOAD_DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// The `source` labels of the metadata loads, and the `reason` labels of its evictions.
const LOAD_SOURCES: [&str; 2] = ["index", "toc"];
const EVICTION_REASONS: [&str; 2] = ["idle", "budget"];

/// The metric handles of mounted layers ([`FuseLayer`](crate::FuseLayer)). Build it with
/// [`Metrics::register`] to export it, or [`Metrics::unregistered`] (also `Default`) for
/// handles that count but are not exported; hand it to [`mount`](crate::mount) in
/// [`MountOptions::metrics`](crate::MountOptions::metrics). Shared by all the layers of a
/// daemon: the values add up over them. Cheap to clone: clones share the values.
#[derive(Clone)]
pub struct Metrics {
    /// `streamsnap_fuse_op_duration_seconds{op}`: time from a request's arrival to its answer
    /// being ready, for every request of that kind, failed ones included.
    op_duration: HistogramVec,
    /// The histogram of each [`Op`], by its index.
    durations: Vec<Histogram>,
    /// `streamsnap_fuse_op_errors_total{op,errno}`: requests answered with an error, by op and
    /// errno name (ENOENT from lookup is normal: it is how a missing name is told).
    op_errors: IntCounterVec,
    /// `streamsnap_fuse_read_bytes_total`: file content bytes returned by reads.
    read_bytes: IntCounter,
    /// `streamsnap_fuse_metadata_bytes`: bytes of layer indexes held in memory.
    metadata_bytes: IntGauge,
    /// `streamsnap_fuse_metadata_layers`: mounted layers whose index is held in memory.
    metadata_layers: IntGauge,
    /// `streamsnap_fuse_metadata_loads_total{source}`: indexes loaded after a mount or a drop,
    /// from the saved index or rebuilt from the TOC.
    metadata_loads: IntCounterVec,
    /// `streamsnap_fuse_metadata_load_failures_total`: loads that failed (the request: EIO).
    metadata_load_failures: IntCounter,
    /// `streamsnap_fuse_metadata_load_duration_seconds`: time to load an index.
    metadata_load_duration: Histogram,
    /// `streamsnap_fuse_metadata_evictions_total{reason}`: indexes dropped, idle or over budget.
    metadata_evictions: IntCounterVec,
    /// `streamsnap_fuse_passthrough_opens_total`: opens answered with a passthrough file, whose
    /// reads the kernel then serves from the node's copy without a request.
    passthrough_opens: IntCounter,
    /// `streamsnap_fuse_passthrough_copies_total`: files copied whole for passthrough.
    passthrough_copies: IntCounter,
    /// `streamsnap_fuse_passthrough_bytes`: bytes of passthrough copies on disk or being written.
    passthrough_bytes: IntGauge,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("read_bytes", &self.read_bytes.get())
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
    /// registered there already (one set of FUSE metrics per registry); then nothing is left
    /// registered.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self::build()?;
        register_all(registry, || {
            vec![
                Box::new(m.op_duration.clone()),
                Box::new(m.op_errors.clone()),
                Box::new(m.read_bytes.clone()),
                Box::new(m.metadata_bytes.clone()),
                Box::new(m.metadata_layers.clone()),
                Box::new(m.metadata_loads.clone()),
                Box::new(m.metadata_load_failures.clone()),
                Box::new(m.metadata_load_duration.clone()),
                Box::new(m.metadata_evictions.clone()),
                Box::new(m.passthrough_opens.clone()),
                Box::new(m.passthrough_copies.clone()),
                Box::new(m.passthrough_bytes.clone()),
            ]
        })?;
        Ok(m)
    }

    /// Handles that count but are exported nowhere (tests, tools).
    pub fn unregistered() -> Self {
        Self::build().expect("the fuse metric definitions are valid")
    }

    fn build() -> Result<Self, prometheus::Error> {
        let op_duration = HistogramVec::new(
            HistogramOpts::new(
                "streamsnap_fuse_op_duration_seconds",
                "Time to answer FUSE requests of mounted layers, by op",
            )
            .buckets(OP_DURATION_BUCKETS.to_vec()),
            &["op"],
        )?;
        let durations = Op::ALL
            .iter()
            .map(|op| op_duration.with_label_values(&[op.as_str()]))
            .collect();
        let op_errors = IntCounterVec::new(
            Opts::new(
                "streamsnap_fuse_op_errors_total",
                "FUSE requests of mounted layers answered with an error, by op and errno",
            ),
            &["op", "errno"],
        )?;
        // The series alerts watch exists from the start (others appear with their first error).
        op_errors.with_label_values(&[Op::Read.as_str(), "EIO"]);
        let metadata_loads = IntCounterVec::new(
            Opts::new(
                "streamsnap_fuse_metadata_loads_total",
                "Layer indexes loaded into memory when a request needed one, by source (the saved \
                 index, or rebuilt from the TOC)",
            ),
            &["source"],
        )?;
        for source in LOAD_SOURCES {
            metadata_loads.with_label_values(&[source]);
        }
        let metadata_evictions = IntCounterVec::new(
            Opts::new(
                "streamsnap_fuse_metadata_evictions_total",
                "Layer indexes dropped from memory, by reason (idle, or over the budget)",
            ),
            &["reason"],
        )?;
        for reason in EVICTION_REASONS {
            metadata_evictions.with_label_values(&[reason]);
        }
        Ok(Self {
            op_duration,
            durations,
            op_errors,
            read_bytes: IntCounter::new(
                "streamsnap_fuse_read_bytes_total",
                "File content bytes returned by reads of mounted layers",
            )?,
            metadata_bytes: IntGauge::new(
                "streamsnap_fuse_metadata_bytes",
                "Bytes of layer metadata (layer indexes) held in memory",
            )?,
            metadata_layers: IntGauge::new(
                "streamsnap_fuse_metadata_layers",
                "Mounted layers whose metadata (index) is held in memory",
            )?,
            metadata_loads,
            metadata_load_failures: IntCounter::new(
                "streamsnap_fuse_metadata_load_failures_total",
                "Layer index loads that failed (the request that needed it got EIO)",
            )?,
            metadata_load_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "streamsnap_fuse_metadata_load_duration_seconds",
                    "Time to load a layer index into memory for a request",
                )
                .buckets(LOAD_DURATION_BUCKETS.to_vec()),
            )?,
            metadata_evictions,
            passthrough_opens: IntCounter::new(
                "streamsnap_fuse_passthrough_opens_total",
                "Opens of layer files answered with a passthrough file: the kernel reads the \
                 node's copy of the file itself",
            )?,
            passthrough_copies: IntCounter::new(
                "streamsnap_fuse_passthrough_copies_total",
                "Layer files copied whole from verified chunks on the node, for passthrough",
            )?,
            passthrough_bytes: IntGauge::new(
                "streamsnap_fuse_passthrough_bytes",
                "Bytes of passthrough copies of layer files on disk or being written",
            )?,
        })
    }

    pub(crate) fn passthrough_opened(&self) {
        self.passthrough_opens.inc();
    }

    pub(crate) fn passthrough_copied(&self) {
        self.passthrough_copies.inc();
    }

    pub(crate) fn passthrough_bytes(&self, bytes: u64) {
        self.passthrough_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Accounts for a request of kind `op` that arrived at `started` and ended with `error`.
    pub(crate) fn observe(&self, op: Op, started: Instant, error: Option<Errno>) {
        self.durations[op as usize].observe(started.elapsed().as_secs_f64());
        if let Some(error) = error {
            self.op_errors
                .with_label_values(&[op.as_str(), errno_name(error)])
                .inc();
        }
    }

    pub(crate) fn read_bytes(&self, bytes: usize) {
        self.read_bytes.inc_by(bytes as u64);
    }

    pub(crate) fn metadata_resident(&self, bytes: u64, layers: u64) {
        self.metadata_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.metadata_layers
            .set(i64::try_from(layers).unwrap_or(i64::MAX));
    }

    /// A load that took `took`, from `source` (`None`: it failed).
    pub(crate) fn metadata_loaded(&self, took: std::time::Duration, source: Option<&str>) {
        self.metadata_load_duration.observe(took.as_secs_f64());
        match source {
            Some(source) => self.metadata_loads.with_label_values(&[source]).inc(),
            None => self.metadata_load_failures.inc(),
        }
    }

    pub(crate) fn metadata_evicted(&self, reason: &str) {
        self.metadata_evictions.with_label_values(&[reason]).inc();
    }

    /// Bytes of layer metadata held in memory now (`streamsnap_fuse_metadata_bytes`).
    pub fn metadata_bytes(&self) -> u64 {
        self.metadata_bytes.get().max(0) as u64
    }
}

/// The symbolic name of an errno (`ENOENT`), from the fixed set the kernel defines.
fn errno_name(error: Errno) -> &'static str {
    match error {
        Errno::ENOENT => "ENOENT",
        Errno::EIO => "EIO",
        Errno::ENODATA => "ENODATA",
        Errno::ERANGE => "ERANGE",
        Errno::EROFS => "EROFS",
        Errno::EISDIR => "EISDIR",
        Errno::ENOTDIR => "ENOTDIR",
        Errno::EINVAL => "EINVAL",
        Errno::E2BIG => "E2BIG",
        Errno::ENAMETOOLONG => "ENAMETOOLONG",
        Errno::EACCES => "EACCES",
        Errno::EPERM => "EPERM",
        Errno::ENOMEM => "ENOMEM",
        Errno::ENOSYS => "ENOSYS",
        Errno::EOPNOTSUPP => "EOPNOTSUPP",
        Errno::EBADF => "EBADF",
        Errno::EEXIST => "EEXIST",
        Errno::ENOTEMPTY => "ENOTEMPTY",
        Errno::EINTR => "EINTR",
        Errno::EAGAIN => "EAGAIN",
        Errno::ENOTCONN => "ENOTCONN",
        _ => "other",
    }
}

/// A kind of FUSE request: the `op` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Lookup,
    Getattr,
    Readlink,
    Open,
    Read,
    Opendir,
    Readdir,
    /// A listing with attributes (READDIRPLUS): `readdir` when that is turned off.
    Readdirplus,
    Statfs,
    Getxattr,
    Listxattr,
    Access,
    /// Any request that would change the layer (write, setattr, mkdir, ...): refused.
    Modify,
}

impl Op {
    const ALL: [Self; 13] = [
        Self::Lookup,
        Self::Getattr,
        Self::Readlink,
        Self::Open,
        Self::Read,
        Self::Opendir,
        Self::Readdir,
        Self::Readdirplus,
        Self::Statfs,
        Self::Getxattr,
        Self::Listxattr,
        Self::Access,
        Self::Modify,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Lookup => "lookup",
            Self::Getattr => "getattr",
            Self::Readlink => "readlink",
            Self::Open => "open",
            Self::Read => "read",
            Self::Opendir => "opendir",
            Self::Readdir => "readdir",
            Self::Readdirplus => "readdirplus",
            Self::Statfs => "statfs",
            Self::Getxattr => "getxattr",
            Self::Listxattr => "listxattr",
            Self::Access => "access",
            Self::Modify => "modify",
        }
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

#[cfg(test)]
mod tests {
    use prometheus::{Encoder as _, TextEncoder};

    use super::*;

    #[test]
    fn ops_index_their_histograms() {
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i, "{op:?}");
        }
    }

    #[test]
    fn registers_once_per_registry_and_counts_errors_by_errno_name() {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry).unwrap();
        assert!(Metrics::register(&registry).is_err());
        let started = Instant::now();
        metrics.observe(Op::Lookup, started, Some(Errno::ENOENT));
        metrics.observe(Op::Read, started, Some(Errno::EIO));
        metrics.observe(Op::Read, started, None);
        metrics.observe(Op::Read, started, Some(Errno::EXDEV));
        metrics.read_bytes(10);
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        for series in [
            "streamsnap_fuse_op_errors_total{errno=\"ENOENT\",op=\"lookup\"} 1\n",
            "streamsnap_fuse_op_errors_total{errno=\"EIO\",op=\"read\"} 1\n",
            "streamsnap_fuse_op_errors_total{errno=\"other\",op=\"read\"} 1\n",
            "streamsnap_fuse_op_duration_seconds_count{op=\"read\"} 3\n",
            "streamsnap_fuse_op_duration_seconds_count{op=\"statfs\"} 0\n",
            "streamsnap_fuse_read_bytes_total 10\n",
        ] {
            assert!(text.contains(series), "{series} in\n{text}");
        }
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let fields: Vec<&str> = line.split(' ').collect();
            let (name, kind) = (fields[2], fields[3]);
            assert!(name.starts_with("streamsnap_fuse_"), "{line}");
            match kind {
                "counter" => assert!(name.ends_with("_total"), "{line}"),
                "histogram" => assert!(name.ends_with("_seconds"), "{line}"),
                "gauge" => assert!(
                    name.ends_with("_bytes") || name.ends_with("_layers"),
                    "{line}"
                ),
                _ => panic!("unexpected type: {line}"),
            }
        }
    }
}
