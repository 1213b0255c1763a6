//! A layer mounted through FUSE and used with ordinary system calls: content, metadata, xattrs,
//! concurrency, unmounting, and recovering from a daemon that died. Needs root and /dev/fuse.

mod common;

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use streamsnap_format::Toc;
use streamsnap_format::api::{EntryType, Xattr};
use streamsnap_fs::{FsOptions, LayerFs, force_unmount, is_stale_mount};

use common::testutil::{LayerBuilder, MemoryChunks};
use common::{
    DetachOnDrop, Mounted, c_path, fuse_available, getxattr, mount_entry, pattern, runtime,
    wait_until,
};

const MAX_CHUNK: u32 = 4096;
const BIG_LEN: usize = 50_000;
const MANY: usize = 1500;
const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\n";

fn sample() -> (Arc<Toc>, Arc<MemoryChunks>) {
    let mut b = LayerBuilder::new(MAX_CHUNK);
    b.dir("", 0o755);
    b.dir("etc", 0o755);
    b.file("etc/passwd", 0o644, PASSWD);
    let shadow = b.file("etc/shadow", 0o640, b"root:*:19000::::::\n");
    shadow.gid = 42;
    let big = b.file("big.bin", 0o644, &pattern(BIG_LEN, 7));
    big.uid = 1000;
    big.gid = 1001;
    big.mtime = 1_650_000_000;
    big.mtime_nanos = 123_456_789;
    b.file("bin/tool", 0o4755, b"#!/bin/sh\necho tool\n");
    b.hardlink("bin/tool2", "bin/tool");
    b.symlink("lnk", "etc/passwd");
    b.device("dev/null", EntryType::CharDevice, 1, 3);
    b.device("dev/loop0", EntryType::BlockDevice, 7, 0);
    b.fifo("run/fifo");
    let gone = b.whiteout("gone");
    gone.uid = 1000;
    gone.gid = 1000;
    b.dir("opq", 0o755);
    b.opaque("opq");
    b.file("opq/a", 0o644, b"a");
    let xa = b.file("xa", 0o644, b"xattrs");
    xa.xattrs = vec![Xattr {
        name: "user.test".into(),
        value: b"hello".to_vec(),
    }];
    b.file("sub/deeper/file", 0o600, b"deep");
    // enough names that a listing takes many readdir replies
    for i in (0..MANY).rev() {
        b.file(
            &format!("many/a-rather-long-file-name-{i:05}.py"),
            0o644,
            b"",
        );
    }
    b.build()
}

fn listxattr(path: &Path) -> io::Result<Vec<u8>> {
    let path = c_path(path);
    let mut buf = vec![0u8; 4096];
    // SAFETY: `path` is NUL-terminated and outlives the call; `buf` is writable for its length.
    let n = unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn errno(result: io::Result<impl Sized>) -> Option<i32> {
    result.err().and_then(|e| e.raw_os_error())
}

#[test]
fn files_metadata_and_xattrs_read_through_the_kernel() {
    if !fuse_available() {
        return;
    }
    let rt = runtime();
    let (toc, reader) = sample();
    let mut m = Mounted::new(toc, reader, rt.handle().clone());
    let root = m.path();

    let (options, fstype, source) = mount_entry(&root).expect("mounted");
    assert_eq!(
        (fstype.as_str(), source.as_str()),
        ("fuse.streamsnap", "streamsnap-test")
    );
    assert!(options.split(',').any(|o| o == "ro"), "{options}");
    assert!(
        !options.split(',').any(|o| o == "nosuid" || o == "nodev"),
        "{options}"
    );

    assert_eq!(
        listing(&root),
        [
            "big.bin", "bin", "dev", "etc", "gone", "lnk", "many", "opq", "run", "sub", "xa"
        ]
    );
    let many: Vec<String> = (0..MANY)
        .map(|i| format!("a-rather-long-file-name-{i:05}.py"))
        .collect();
    assert_eq!(listing(&m.join("many")), many);
    assert_eq!(listing(&m.join("etc")), ["passwd", "shadow"]);
    assert_eq!(listing(&m.join("opq")), ["a"]);

    // content
    assert_eq!(fs::read(m.join("etc/passwd")).unwrap(), PASSWD);
    assert_eq!(fs::read(m.join("big.bin")).unwrap(), pattern(BIG_LEN, 7));
    assert_eq!(fs::read(m.join("sub/deeper/file")).unwrap(), b"deep");
    let file = File::open(m.join("big.bin")).unwrap();
    let mut buf = vec![0u8; 5000];
    file.read_exact_at(&mut buf, 4000).unwrap();
    assert_eq!(buf, pattern(BIG_LEN, 7)[4000..9000]);

    // metadata
    let meta = fs::metadata(m.join("big.bin")).unwrap();
    assert!(meta.is_file());
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid()),
        (0o644, 1000, 1001)
    );
    assert_eq!(
        (meta.size(), meta.blocks(), meta.nlink()),
        (BIG_LEN as u64, 98, 1)
    );
    assert_eq!(
        (meta.mtime(), meta.mtime_nsec()),
        (1_650_000_000, 123_456_789)
    );
    let shadow = fs::metadata(m.join("etc/shadow")).unwrap();
    assert_eq!((shadow.mode() & 0o7777, shadow.gid()), (0o640, 42));
    let tool = fs::metadata(m.join("bin/tool")).unwrap();
    let tool2 = fs::metadata(m.join("bin/tool2")).unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o4755);
    assert_eq!((tool.ino(), tool.nlink()), (tool2.ino(), 2));
    let root_meta = fs::metadata(&root).unwrap();
    assert!(root_meta.is_dir());
    assert_eq!(root_meta.nlink(), 2 + 7, "etc bin dev run opq sub many");
    let implied = fs::metadata(m.join("sub/deeper")).unwrap();
    assert_eq!(
        (implied.mode() & 0o7777, implied.uid(), implied.mtime()),
        (0o755, 0, 0)
    );

    // symlink, devices, fifo, whiteout
    assert_eq!(
        fs::read_link(m.join("lnk")).unwrap(),
        PathBuf::from("etc/passwd")
    );
    assert_eq!(fs::read(m.join("lnk")).unwrap(), PASSWD);
    let null = fs::symlink_metadata(m.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    let lo = fs::symlink_metadata(m.join("dev/loop0")).unwrap();
    assert!(lo.file_type().is_block_device());
    assert_eq!(lo.rdev(), libc::makedev(7, 0));
    assert!(
        fs::symlink_metadata(m.join("run/fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    let gone = fs::symlink_metadata(m.join("gone")).unwrap();
    assert!(gone.file_type().is_char_device());
    assert_eq!((gone.rdev(), gone.mode() & 0o7777), (0, 0));
    assert_eq!((gone.uid(), gone.gid()), (1000, 1000));

    // xattrs
    let opq = m.join("opq");
    assert_eq!(
        getxattr(&opq, "trusted.overlay.opaque", 16).unwrap().1,
        b"y"
    );
    assert_eq!(getxattr(&opq, "trusted.overlay.opaque", 0).unwrap().0, 1);
    assert_eq!(listxattr(&opq).unwrap(), b"trusted.overlay.opaque\0");
    assert_eq!(
        getxattr(&m.join("xa"), "user.test", 64).unwrap().1,
        b"hello"
    );
    assert_eq!(
        errno(getxattr(&m.join("xa"), "user.test", 2)),
        Some(libc::ERANGE)
    );
    assert_eq!(
        errno(getxattr(&m.join("xa"), "user.none", 64)),
        Some(libc::ENODATA)
    );
    assert_eq!(
        errno(getxattr(&m.join("etc"), "trusted.overlay.opaque", 64)),
        Some(libc::ENODATA)
    );
    assert_eq!(listxattr(&m.join("xa")).unwrap(), b"user.test\0");

    // read-only
    assert_eq!(errno(fs::write(m.join("new"), b"x")), Some(libc::EROFS));
    assert_eq!(
        errno(
            fs::OpenOptions::new()
                .append(true)
                .open(m.join("etc/passwd"))
        ),
        Some(libc::EROFS)
    );
    assert_eq!(errno(fs::create_dir(m.join("newdir"))), Some(libc::EROFS));
    assert_eq!(
        errno(fs::remove_file(m.join("etc/passwd"))),
        Some(libc::EROFS)
    );

    // statfs
    let stat = nix::sys::statvfs::statvfs(&root).unwrap();
    assert_eq!(stat.blocks_free(), 0);
    assert!(stat.files() >= 20, "{}", stat.files());
    assert!(stat.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));

    drop(file);
    m.unmount().unwrap();
    assert!(mount_entry(&root).is_none(), "unmounted");
    assert!(!is_stale_mount(&root));
}

#[test]
fn many_threads_read_the_same_files_and_get_the_same_bytes() {
    if !fuse_available() {
        return;
    }
    let rt = runtime();
    let (toc, reader) = sample();
    let m = Mounted::new(toc, reader, rt.handle().clone());
    let start = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..8 {
            let m = &m;
            scope.spawn(move || {
                for round in 0..20 {
                    let offset = (t * 997 + round * 131) % BIG_LEN;
                    let file = File::open(m.join("big.bin")).unwrap();
                    let mut buf = vec![0u8; 3000.min(BIG_LEN - offset)];
                    file.read_exact_at(&mut buf, offset as u64).unwrap();
                    assert_eq!(buf, pattern(BIG_LEN, 7)[offset..offset + buf.len()]);
                    assert_eq!(fs::read(m.join("etc/passwd")).unwrap(), PASSWD);
                    assert_eq!(listing(&m.join("etc")).len(), 2);
                }
            });
        }
    });
    eprintln!("8 threads x 20 rounds: {:?}", start.elapsed());
}

#[test]
fn a_slow_chunk_does_not_hold_up_reads_of_other_files() {
    if !fuse_available() {
        return;
    }
    let mut b = LayerBuilder::new(MAX_CHUNK);
    b.file("fast", 0o644, b"fast content");
    let slow_chunk = b.chunk_count() as u32; // the pack holding "fast" closes: "slow" starts here
    b.file("slow", 0o644, &pattern(2 * MAX_CHUNK as usize, 3));
    b.file("other/fast2", 0o644, &pattern(MAX_CHUNK as usize, 9));
    let (toc, reader) = b.build();
    assert_eq!(slow_chunk, 1);
    reader.delay(slow_chunk, Duration::from_secs(2));
    let rt = runtime();
    let m = Mounted::new(toc, reader.clone(), rt.handle().clone());

    let slow_path = m.join("slow");
    let slow = std::thread::spawn(move || {
        let start = Instant::now();
        let content = fs::read(slow_path).unwrap();
        (content, start.elapsed())
    });
    wait_until(
        "the slow chunk to be asked for",
        Duration::from_secs(5),
        || reader.calls().iter().any(|call| call.contains(&slow_chunk)),
    );

    let start = Instant::now();
    assert_eq!(fs::read(m.join("fast")).unwrap(), b"fast content");
    assert_eq!(
        fs::read(m.join("other/fast2")).unwrap(),
        pattern(MAX_CHUNK as usize, 9)
    );
    assert_eq!(listing(&m.path()), ["fast", "other", "slow"]);
    assert_eq!(
        fs::metadata(m.join("slow")).unwrap().len(),
        2 * u64::from(MAX_CHUNK)
    );
    let fast = start.elapsed();

    let (content, slow_time) = slow.join().unwrap();
    eprintln!("fast reads during a slow fetch: {fast:?}; slow read: {slow_time:?}");
    assert!(
        fast < Duration::from_millis(500),
        "fast reads took {fast:?}"
    );
    assert!(
        slow_time >= Duration::from_millis(1800),
        "the slow read took {slow_time:?}"
    );
    assert_eq!(content, pattern(2 * MAX_CHUNK as usize, 3));
}

#[test]
fn reader_failures_reach_the_caller_as_eio() {
    if !fuse_available() {
        return;
    }
    let mut b = LayerBuilder::new(MAX_CHUNK);
    b.file("ok", 0o644, b"fine");
    b.file("broken", 0o644, &pattern(MAX_CHUNK as usize, 1));
    let (toc, reader) = b.build();
    reader.fail(1);
    let rt = runtime();
    let m = Mounted::new(toc, reader, rt.handle().clone());
    assert_eq!(errno(fs::read(m.join("broken"))), Some(libc::EIO));
    assert_eq!(fs::read(m.join("ok")).unwrap(), b"fine");
}

#[test]
fn unmounting_a_busy_layer_detaches_it_and_open_files_keep_working() {
    if !fuse_available() {
        return;
    }
    let rt = runtime();
    let (toc, reader) = sample();
    let mut m = Mounted::new(toc, reader, rt.handle().clone());
    let root = m.path();
    let mut open = File::open(m.join("big.bin")).unwrap();

    let start = Instant::now();
    m.unmount().unwrap();
    eprintln!("busy unmount took {:?}", start.elapsed());
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(
        mount_entry(&root).is_none(),
        "detached from the mount table"
    );

    let mut content = Vec::new();
    open.read_to_end(&mut content).unwrap();
    assert_eq!(
        content,
        pattern(BIG_LEN, 7),
        "the detached layer is still served"
    );
}

#[test]
fn dropping_the_mount_unmounts_it() {
    if !fuse_available() {
        return;
    }
    let rt = runtime();
    let (toc, reader) = sample();
    let mut m = Mounted::new(toc, reader, rt.handle().clone());
    let root = m.path();
    assert!(mount_entry(&root).is_some());
    drop(m.layer.take());
    assert!(mount_entry(&root).is_none());
}

#[test]
fn the_mount_gets_the_kernel_readahead_it_asks_for() {
    if !fuse_available() {
        return;
    }
    let rt = runtime();
    let (toc, reader) = sample();
    let m = Mounted::new(toc, reader, rt.handle().clone());
    // A mount gets the default (the INIT answer alone would leave the kernel's 128 KiB).
    assert_eq!(
        streamsnap_fs::readahead(&m.path()).unwrap(),
        streamsnap_fs::DEFAULT_READAHEAD_BYTES
    );
    streamsnap_fs::set_readahead(&m.path(), 512 << 10).unwrap();
    assert_eq!(streamsnap_fs::readahead(&m.path()).unwrap(), 512 << 10);
    streamsnap_fs::set_readahead(&m.path(), 0).unwrap();
    assert_eq!(streamsnap_fs::readahead(&m.path()).unwrap(), 0);
}

const CHILD_ENV: &str = "STREAMSNAP_FS_TEST_CHILD_MOUNT";

/// Not a test on its own: run as a child process by the stale mount test, it mounts a layer
/// on the directory named in the environment and waits to be killed.
#[test]
fn child_mount_helper() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let rt = runtime();
    let (toc, reader) = sample();
    let fs = Arc::new(LayerFs::new(toc, reader, FsOptions::default()).unwrap());
    let options = common::mount_options();
    let _layer = streamsnap_fs::mount(fs, Path::new(&dir), rt.handle().clone(), &options).unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_mount_whose_daemon_died_is_stale_until_force_unmounted() {
    if !fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().canonicalize().unwrap();
    let _detach = DetachOnDrop(path.clone());
    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_mount_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("the child to mount", Duration::from_secs(20), || {
        mount_entry(&path).is_some()
    });
    assert_eq!(fs::read(path.join("etc/passwd")).unwrap(), PASSWD);
    assert!(!is_stale_mount(&path));
    assert!(
        !is_stale_mount(dir.path().parent().unwrap()),
        "not a mount at all"
    );

    child.0.kill().unwrap();
    child.0.wait().unwrap();
    assert!(
        is_stale_mount(&path),
        "daemon gone: transport endpoint is not connected"
    );
    assert_eq!(errno(fs::read_dir(&path)), Some(libc::ENOTCONN));

    force_unmount(&path).unwrap();
    assert!(mount_entry(&path).is_none());
    assert!(!is_stale_mount(&path));
    assert_eq!(listing(&path), Vec::<String>::new());
    assert!(force_unmount(&path).is_err(), "nothing left to unmount");
}
