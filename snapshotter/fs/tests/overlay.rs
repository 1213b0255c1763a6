//! Two layers mounted through FUSE and stacked with the kernel's overlayfs, the way a container
//! rootfs uses them: the upper layer's whiteout hides a lower file, its opaque directory hides
//! the lower directory's content. Needs root, /dev/fuse and overlayfs.

mod common;

use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::MsFlags;

use common::testutil::LayerBuilder;
use common::{DetachOnDrop, Mounted, fuse_available, mount_entry, runtime};

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn overlayfs_honours_whiteouts_and_opaque_directories_of_fuse_layers() {
    if !fuse_available() {
        return;
    }
    let rt = runtime();

    let mut lower = LayerBuilder::new(4096);
    lower.dir("", 0o755);
    lower.file("a", 0o644, b"lower a");
    lower.file("b", 0o644, b"lower b");
    lower.dir("d", 0o755);
    lower.file("d/x", 0o644, b"lower d/x");
    lower.file("d/y", 0o644, b"lower d/y");
    lower.file("keep/z", 0o644, b"lower keep/z");
    lower.file(
        "keep/late",
        0o644,
        b"first read after the layer is unmounted",
    );
    lower.file(
        "keep/gone-too",
        0o644,
        b"hidden by a whiteout in a subdirectory",
    );
    let (toc, reader) = lower.build();
    let mut lower = Mounted::new(toc, reader, rt.handle().clone());

    let mut upper = LayerBuilder::new(4096);
    upper.dir("", 0o755);
    upper.whiteout("a");
    upper.dir("d", 0o755);
    upper.opaque("d");
    upper.file("d/new", 0o644, b"upper d/new");
    upper.file("c", 0o644, b"upper c");
    upper.whiteout("keep/gone-too");
    let (toc, reader) = upper.build();
    let mut upper = Mounted::new(toc, reader, rt.handle().clone());

    let merged_dir = tempfile::tempdir().unwrap();
    let merged = merged_dir.path().canonicalize().unwrap();
    let options = format!(
        "lowerdir={}:{}",
        upper.path().display(),
        lower.path().display()
    );
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        MsFlags::MS_RDONLY,
        Some(options.as_str()),
    )
    .unwrap_or_else(|e| panic!("mount -t overlay -o {options}: {e}"));
    let overlay = DetachOnDrop(merged.clone());

    assert_eq!(listing(&merged), ["b", "c", "d", "keep"]);
    assert_eq!(
        fs::read(merged.join("a")).unwrap_err().kind(),
        io::ErrorKind::NotFound,
        "whiteout hides the lower file"
    );
    assert_eq!(fs::read(merged.join("b")).unwrap(), b"lower b");
    assert_eq!(fs::read(merged.join("c")).unwrap(), b"upper c");
    assert_eq!(
        listing(&merged.join("d")),
        ["new"],
        "opaque directory hides lower entries"
    );
    assert!(!merged.join("d/x").exists());
    assert_eq!(fs::read(merged.join("d/new")).unwrap(), b"upper d/new");
    assert_eq!(listing(&merged.join("keep")), ["late", "z"]);
    assert_eq!(fs::read(merged.join("keep/z")).unwrap(), b"lower keep/z");

    // The overlay holds its own clone of the layer mounts: unmounting a layer returns at once
    // and the overlay goes on reading from it.
    let start = Instant::now();
    lower.unmount().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(mount_entry(&lower.path()).is_none());
    assert_eq!(
        fs::read(merged.join("keep/late")).unwrap(),
        b"first read after the layer is unmounted"
    );

    drop(overlay);
    assert!(mount_entry(&merged).is_none());
    upper.unmount().unwrap();
    assert!(mount_entry(&upper.path()).is_none());
}
