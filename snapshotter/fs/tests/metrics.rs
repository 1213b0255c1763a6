//! A mounted layer's metrics, read from a registry's text exposition after ordinary system calls
//! through the kernel: op latency samples, errors by op and errno, bytes read. Needs root and
//! /dev/fuse.

mod common;

use std::fs;
use std::io;
use std::sync::Arc;

use streamsnap_fs::{Metrics, MountOptions};

use common::testutil::LayerBuilder;
use common::{Mounted, fuse_available, metric, mount_options, pattern, runtime};

const MAX_CHUNK: u32 = 4096;

fn metered() -> (MountOptions, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let metrics = Metrics::register(&registry).unwrap();
    let options = MountOptions {
        metrics: Some(Arc::new(metrics)),
        ..mount_options()
    };
    (options, registry)
}

fn durations(registry: &prometheus::Registry, op: &str) -> f64 {
    metric(
        registry,
        "streamsnap_fuse_op_duration_seconds_count",
        &[("op", op)],
    )
}

fn errors(registry: &prometheus::Registry, op: &str, errno: &str) -> f64 {
    metric(
        registry,
        "streamsnap_fuse_op_errors_total",
        &[("op", op), ("errno", errno)],
    )
}

#[test]
fn requests_through_the_kernel_are_timed_and_their_errors_counted() {
    if !fuse_available() {
        return;
    }
    let mut b = LayerBuilder::new(MAX_CHUNK);
    b.dir("etc", 0o755);
    b.file("etc/data.bin", 0o644, &pattern(20_000, 5));
    b.symlink("lnk", "etc/data.bin");
    let (toc, reader) = b.build();
    let rt = runtime();
    let (options, registry) = metered();
    let m = Mounted::with_options(toc, reader, rt.handle().clone(), &options);
    assert_eq!(durations(&registry, "read"), 0.0);

    assert_eq!(
        fs::read(m.join("etc/data.bin")).unwrap(),
        pattern(20_000, 5)
    );
    assert!(durations(&registry, "lookup") >= 2.0, "etc, data.bin");
    assert!(durations(&registry, "open") >= 1.0);
    assert!(durations(&registry, "read") >= 1.0);
    assert_eq!(
        metric(&registry, "streamsnap_fuse_read_bytes_total", &[]),
        20_000.0
    );
    let sum = metric(
        &registry,
        "streamsnap_fuse_op_duration_seconds_sum",
        &[("op", "read")],
    );
    assert!(sum > 0.0, "{sum}");

    assert_eq!(
        fs::metadata(m.join("etc/missing")).unwrap_err().kind(),
        io::ErrorKind::NotFound
    );
    assert!(errors(&registry, "lookup", "ENOENT") >= 1.0);
    assert_eq!(
        fs::read_link(m.join("lnk")).unwrap().to_str(),
        Some("etc/data.bin")
    );
    assert!(durations(&registry, "readlink") >= 1.0);
    assert_eq!(fs::read_dir(m.path()).unwrap().count(), 2);
    // A listing with attributes where the kernel offers READDIRPLUS.
    assert!(durations(&registry, "readdir") + durations(&registry, "readdirplus") >= 1.0);
    nix::sys::statfs::statfs(&m.path()).unwrap();
    assert!(durations(&registry, "statfs") >= 1.0);
    assert_eq!(errors(&registry, "read", "EIO"), 0.0);
}

#[test]
fn failed_reads_count_as_eio_and_return_no_bytes() {
    if !fuse_available() {
        return;
    }
    let mut b = LayerBuilder::new(MAX_CHUNK);
    b.file("ok", 0o644, b"fine");
    b.file("broken", 0o644, &pattern(MAX_CHUNK as usize, 1));
    let (toc, reader) = b.build();
    reader.fail(1);
    let rt = runtime();
    let (options, registry) = metered();
    let m = Mounted::with_options(toc, reader, rt.handle().clone(), &options);
    for _ in 0..3 {
        let e = fs::read(m.join("broken")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
    }
    // The kernel may retry a failed page read itself: at least one EIO per read(2).
    let eio = errors(&registry, "read", "EIO");
    assert!(eio >= 3.0, "{eio}");
    assert_eq!(durations(&registry, "read"), eio);
    assert_eq!(
        metric(&registry, "streamsnap_fuse_read_bytes_total", &[]),
        0.0
    );

    assert_eq!(fs::read(m.join("ok")).unwrap(), b"fine");
    assert_eq!(
        metric(&registry, "streamsnap_fuse_read_bytes_total", &[]),
        4.0
    );
    assert_eq!(durations(&registry, "read"), eio + 1.0);
}
