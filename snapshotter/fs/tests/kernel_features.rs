//! Each optional kernel feature turned off in `MountOptions::kernel_features` really is: the
//! kernel sends the plain requests instead (READDIR rather than READDIRPLUS, an OPEN per open, an
//! OPENDIR per listing),
//! counted by op in the metrics, and the layer still reads right. Needs root and /dev/fuse.

mod common;

use std::fs;
use std::sync::Arc;

use streamsnap_fs::{KernelFeature, KernelFeatures, Metrics, MountOptions};

use common::testutil::LayerBuilder;
use common::{Mounted, fuse_available, metric, mount_options, pattern, runtime};

/// Lists the root and `etc`, and opens and reads `etc/data.bin` three times, on a layer mounted
/// with `features`; returns the requests counted by op (readdir, readdirplus, open, opendir).
fn requests_with(features: KernelFeatures) -> (f64, f64, f64, f64) {
    let mut b = LayerBuilder::new(4096);
    b.dir("etc", 0o755);
    let data = pattern(20_000, 3);
    b.file("etc/data.bin", 0o644, &data);
    b.file("etc/other", 0o644, b"x");
    let (toc, reader) = b.build();
    let rt = runtime();
    let registry = prometheus::Registry::new();
    let options = MountOptions {
        metrics: Some(Arc::new(Metrics::register(&registry).unwrap())),
        kernel_features: features,
        ..mount_options()
    };
    let m = Mounted::with_options(toc, reader, rt.handle().clone(), &options);
    assert_eq!(fs::read_dir(m.path()).unwrap().count(), 1);
    assert_eq!(fs::read_dir(m.join("etc")).unwrap().count(), 2);
    for _ in 0..3 {
        assert_eq!(fs::read(m.join("etc/data.bin")).unwrap(), data);
    }
    let count = |op| {
        metric(
            &registry,
            "streamsnap_fuse_op_duration_seconds_count",
            &[("op", op)],
        )
    };
    (
        count("readdir"),
        count("readdirplus"),
        count("open"),
        count("opendir"),
    )
}

#[test]
fn every_feature_on_lists_with_attributes_and_opens_without_requests() {
    if !fuse_available() {
        return;
    }
    let (readdir, readdirplus, open, opendir) = requests_with(KernelFeatures::all());
    assert_eq!(readdir, 0.0);
    assert!(readdirplus >= 2.0, "{readdirplus}");
    // The first open (and opendir) is answered ENOSYS and the kernel sends no more.
    assert_eq!(open, 1.0);
    assert_eq!(opendir, 1.0);
}

#[test]
fn without_readdirplus_the_kernel_lists_with_readdir() {
    if !fuse_available() {
        return;
    }
    let (readdir, readdirplus, open, _) =
        requests_with(KernelFeatures::without([KernelFeature::Readdirplus]));
    assert!(readdir >= 2.0, "{readdir}");
    assert_eq!(readdirplus, 0.0);
    assert_eq!(open, 1.0);
}

#[test]
fn without_zero_message_opens_every_open_is_a_request() {
    if !fuse_available() {
        return;
    }
    let (readdir, readdirplus, open, _) =
        requests_with(KernelFeatures::without([KernelFeature::ZeroMessageOpen]));
    assert_eq!(readdir, 0.0);
    assert!(readdirplus >= 2.0, "{readdirplus}");
    assert_eq!(open, 3.0);
}

#[test]
fn with_every_feature_off_the_layer_still_reads_right() {
    if !fuse_available() {
        return;
    }
    let (readdir, readdirplus, open, opendir) =
        requests_with(KernelFeatures::without(KernelFeature::ALL));
    assert!(readdir >= 2.0, "{readdir}");
    assert_eq!(readdirplus, 0.0);
    assert_eq!(open, 3.0);
    assert_eq!(opendir, 2.0);
}

#[test]
fn without_zero_message_opendirs_every_listing_opens_with_a_request() {
    if !fuse_available() {
        return;
    }
    let (readdir, readdirplus, open, opendir) =
        requests_with(KernelFeatures::without([KernelFeature::ZeroMessageOpendir]));
    assert_eq!(readdir, 0.0);
    assert!(readdirplus >= 2.0, "{readdirplus}");
    assert_eq!(open, 1.0);
    assert_eq!(opendir, 2.0, "the root and etc");
}
