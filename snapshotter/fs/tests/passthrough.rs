//! FUSE passthrough (Linux 6.9+): a file whose chunks are all on the node is copied once at its
//! second open, and later opens hand the copy to the kernel, which reads it without asking the daemon; through
//! overlayfs too, as a container reads. An open of the file held from before the copy keeps
//! later opens cached (the kernel refuses a mix), a file with a chunk off the node is never
//! copied, and with passthrough turned off no open is passed through. Needs root and /dev/fuse.

mod common;

use std::fs::{self, File};
use std::io::Read as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nix::mount::MsFlags;
use streamsnap_fs::{
    KernelFeature, KernelFeatures, Metrics, MountOptions, PassthroughConfig, PassthroughStore,
};

use common::testutil::{LayerBuilder, MemoryChunks};
use common::{DetachOnDrop, Mounted, fuse_available, metric, mount_options, pattern, runtime};

const CHUNK: u32 = 64 << 10;

/// Whether this kernel has FUSE passthrough (6.9+): then the test insists on it being used.
fn kernel_has_passthrough() -> bool {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release.trim().split(['.', '-']);
    let major: u32 = parts.next().unwrap().parse().unwrap();
    let minor: u32 = parts.next().unwrap().parse().unwrap();
    (major, minor) >= (6, 9)
}

struct Rig {
    mounted: Mounted,
    reader: Arc<MemoryChunks>,
    registry: prometheus::Registry,
    store: Arc<PassthroughStore>,
    big: Vec<u8>,
    other: Vec<u8>,
    _store_dir: tempfile::TempDir,
}

impl Rig {
    /// A layer with `big` (4 chunks), `other` (3 chunks, its second not on the node) and a small
    /// file, mounted with a passthrough store for files of at least 100 KiB.
    fn new(rt: &tokio::runtime::Runtime, features: KernelFeatures) -> Self {
        Self::with_min(rt, features, 100 << 10)
    }

    /// With files of at least `min_file_bytes` copied.
    fn with_min(
        rt: &tokio::runtime::Runtime,
        features: KernelFeatures,
        min_file_bytes: u64,
    ) -> Self {
        let mut b = LayerBuilder::new(CHUNK);
        b.dir("data", 0o755);
        let big = pattern(4 * CHUNK as usize, 7);
        let other = pattern(3 * CHUNK as usize - 5, 9);
        b.file("data/big", 0o644, &big);
        b.file("data/other", 0o644, &other);
        b.file("data/small", 0o644, b"small");
        let (toc, reader) = b.build();
        reader.remote(5);
        let store_dir = tempfile::tempdir().unwrap();
        let registry = prometheus::Registry::new();
        let metrics = Arc::new(Metrics::register(&registry).unwrap());
        let config = PassthroughConfig {
            dir: store_dir.path().join("passthrough"),
            capacity_bytes: 1 << 30,
            min_file_bytes,
        };
        let store = PassthroughStore::open(config, Arc::clone(&metrics)).unwrap();
        let options = MountOptions {
            metrics: Some(metrics),
            kernel_features: features,
            passthrough: Some(Arc::clone(&store)),
            ..mount_options()
        };
        let mounted = Mounted::with_options(toc, reader.clone(), rt.handle().clone(), &options);
        Self {
            mounted,
            reader,
            registry,
            store,
            big,
            other,
            _store_dir: store_dir,
        }
    }

    fn count(&self, name: &str) -> f64 {
        metric(&self.registry, name, &[])
    }

    fn opens(&self) -> f64 {
        self.count("streamsnap_fuse_passthrough_opens_total")
    }

    fn copies(&self) -> f64 {
        self.count("streamsnap_fuse_passthrough_copies_total")
    }
}

fn drop_caches() {
    fs::write("/proc/sys/vm/drop_caches", "3\n").unwrap();
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn a_file_whole_on_the_node_is_read_by_the_kernel_from_its_copy() {
    if !fuse_available() {
        return;
    }
    let rt = runtime();
    let rig = Rig::new(&rt, KernelFeatures::all());
    let big = rig.mounted.join("data/big");

    // First open: read through FUSE; the second starts a copy.
    assert_eq!(read(&big), rig.big);
    assert_eq!(read(&big), rig.big);
    if !kernel_has_passthrough() {
        eprintln!("this kernel has no FUSE passthrough (Linux 6.9+ has): only reads are checked");
        assert_eq!(rig.opens(), 0.0);
        return;
    }
    common::wait_until("the copy", Duration::from_secs(10), || rig.copies() == 1.0);
    assert_eq!(rig.opens(), 0.0);
    assert_eq!(rig.store.used_bytes(), rig.big.len() as u64);

    // Later opens are passed through: reads, even of dropped pages, never reach the reader.
    drop_caches();
    rig.reader.clear_calls();
    assert_eq!(read(&big), rig.big);
    let mut partial = vec![0u8; 1000];
    let mut file = File::open(&big).unwrap();
    std::io::Seek::seek(
        &mut file,
        std::io::SeekFrom::Start(3 * u64::from(CHUNK) - 500),
    )
    .unwrap();
    file.read_exact(&mut partial).unwrap();
    assert_eq!(partial, rig.big[3 * CHUNK as usize - 500..][..1000]);
    drop(file);
    assert_eq!(rig.opens(), 2.0);
    assert_eq!(rig.reader.calls(), Vec::<Vec<u32>>::new());

    // Through overlayfs, as a container reads its lower layers.
    let merged_dir = tempfile::tempdir().unwrap();
    let merged = merged_dir.path().canonicalize().unwrap();
    // Two lower directories at least without an upper one: an empty one above the layer.
    let empty = tempfile::tempdir().unwrap();
    let lower = format!(
        "lowerdir={}:{}",
        empty.path().display(),
        rig.mounted.path().display()
    );
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        MsFlags::MS_RDONLY,
        Some(lower.as_str()),
    )
    .unwrap_or_else(|e| panic!("mount -t overlay -o {lower}: {e}"));
    let _overlay = DetachOnDrop(merged.clone());
    drop_caches();
    assert_eq!(read(&merged.join("data/big")), rig.big);
    assert_eq!(rig.opens(), 3.0);
    assert_eq!(rig.reader.calls(), Vec::<Vec<u32>>::new());

    // Small files and files with a chunk off the node are not copied.
    assert_eq!(read(&rig.mounted.join("data/small")), b"small");
    assert_eq!(read(&rig.mounted.join("data/other")), rig.other);
    assert_eq!(read(&rig.mounted.join("data/other")), rig.other);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rig.copies(), 1.0);
    assert_eq!(rig.opens(), 3.0);
}

#[test]
fn an_open_held_from_before_the_copy_keeps_the_next_opens_cached() {
    if !fuse_available() || !kernel_has_passthrough() {
        return;
    }
    let rt = runtime();
    let rig = Rig::new(&rt, KernelFeatures::all());
    let big = rig.mounted.join("data/big");
    assert_eq!(read(&big), rig.big);
    let mut held = File::open(&big).unwrap();
    common::wait_until("the copy", Duration::from_secs(10), || rig.copies() == 1.0);
    // The kernel would refuse a passthrough open next to a cached one: this open stays cached
    // and succeeds.
    assert_eq!(read(&big), rig.big);
    let mut content = Vec::new();
    held.read_to_end(&mut content).unwrap();
    assert_eq!(content, rig.big);
    assert_eq!(rig.opens(), 0.0);
    drop(held);
    // Released (the kernel sends the release after the close returns).
    common::wait_until("a passthrough open", Duration::from_secs(5), || {
        assert_eq!(read(&big), rig.big);
        rig.opens() >= 1.0
    });
    // And the other way round: a passthrough open held, further opens pass through too.
    let held = File::open(&big).unwrap();
    let before = rig.opens();
    assert_eq!(read(&big), rig.big);
    assert_eq!(rig.opens(), before + 1.0);
    drop(held);
}

/// Reads `data/big` three times and checks that no open was passed through, nothing was copied
/// and opens took no request but the first (zero-message opens).
fn assert_read_through_fuse_with_zero_message_opens(rig: &Rig) {
    let big = rig.mounted.join("data/big");
    for _ in 0..3 {
        assert_eq!(read(&big), rig.big);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rig.opens(), 0.0);
    assert_eq!(rig.copies(), 0.0);
    let opens = metric(
        &rig.registry,
        "streamsnap_fuse_op_duration_seconds_count",
        &[("op", "open")],
    );
    assert_eq!(
        opens, 1.0,
        "the first open is answered ENOSYS, the kernel sends no more"
    );
}

#[test]
fn with_passthrough_off_no_open_is_passed_through() {
    if !fuse_available() {
        return;
    }
    let rt = runtime();
    let rig = Rig::new(&rt, KernelFeatures::without([KernelFeature::Passthrough]));
    assert_read_through_fuse_with_zero_message_opens(&rig);
    assert_eq!(rig.reader.local_calls(), 0);
}

#[test]
fn a_layer_without_a_file_large_enough_to_copy_keeps_zero_message_opens() {
    if !fuse_available() {
        return;
    }
    let rt = runtime();
    // The largest file is 256 KiB.
    let rig = Rig::with_min(&rt, KernelFeatures::all(), 1 << 20);
    assert_read_through_fuse_with_zero_message_opens(&rig);
}

#[test]
fn a_copy_the_disk_refuses_is_given_up_and_the_file_still_reads_right() {
    if !fuse_available() || !kernel_has_passthrough() {
        return;
    }
    let rt = runtime();
    let rig = Rig::new(&rt, KernelFeatures::all());
    // The directory is gone: creating the copy fails.
    fs::remove_dir_all(&rig.store.config().dir).unwrap();
    let big = rig.mounted.join("data/big");
    for _ in 0..3 {
        assert_eq!(read(&big), rig.big);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rig.copies(), 0.0);
    assert_eq!(rig.opens(), 0.0);
    assert_eq!(rig.store.used_bytes(), 0, "the room it took is given back");
}
