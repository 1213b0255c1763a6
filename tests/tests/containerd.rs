//! Tests of the containerd side of the harness against the real containerd, runc, registry and
//! skopeo, on containerd's own overlayfs snapshotter: private instances side by side, pulls
//! through the counting proxy, containers, mounted rootfs trees, and the clean-up.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use streamsnap_e2e::busybox::HOSTNAME;
use streamsnap_e2e::image::{ImageSpec, LayerBlob, OciLayout};
use streamsnap_e2e::{
    Containerd, ContainerdOptions, CountingProxy, NodeKind, Registry, TarGen, diff_trees,
    mount_rootfs, pull, require_root, require_root_tools, rpull, run, run_container,
    run_container_with, skopeo_push, sys, walk_tree,
};

const TOOLS: &[&str] = &[
    "docker-registry",
    "skopeo",
    "containerd",
    "ctr",
    "runc",
    "containerd-shim-runc-v2",
];
const OVERLAYFS: &str = "overlayfs";
/// What headers and manifests may add to the blob bytes a pull downloads through the proxy.
const PROXY_OVERHEAD: u64 = 16 * 1024;

fn preflight() -> anyhow::Result<()> {
    require_root()?;
    require_root_tools(TOOLS)
}

/// Pushes `spec` as `e2e/busybox:TAG` and returns the reference on the registry.
fn push(registry: &Registry, spec: &ImageSpec, tag: &str) -> anyhow::Result<String> {
    let mut layout = OciLayout::new()?;
    layout.write_image(spec, tag)?;
    let reference = format!("{}/e2e/busybox:{tag}", registry.addr());
    skopeo_push(layout.path(), tag, &reference)?;
    Ok(reference)
}

fn start_two() -> anyhow::Result<(Containerd, Containerd)> {
    let starts: Vec<_> = (0..2)
        .map(|_| thread::spawn(|| Containerd::start(ContainerdOptions::default())))
        .collect();
    let mut instances = starts
        .into_iter()
        .map(|t| t.join().expect("start thread panicked"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let b = instances.pop().expect("two instances");
    let a = instances.pop().expect("two instances");
    Ok((a, b))
}

/// What an instance leaves on the machine that its drop must remove.
struct Footprint {
    dir: PathBuf,
    runc_root: PathBuf,
    namespace: String,
}

impl Footprint {
    fn of(containerd: &Containerd) -> Self {
        Self {
            dir: containerd.dir().to_owned(),
            runc_root: Path::new("/run/containerd/runc").join(containerd.namespace()),
            namespace: containerd.namespace().to_owned(),
        }
    }

    fn check_gone(&self) -> anyhow::Result<()> {
        let needle = format!("{}/", self.dir.display());
        let processes = sys::processes_mentioning(&needle);
        ensure!(
            processes.is_empty(),
            "processes left behind: {processes:#?}"
        );
        let mounts = sys::mounts_under(&self.dir)?;
        ensure!(mounts.is_empty(), "mounts left behind: {mounts:?}");
        ensure!(!self.dir.exists(), "{} left behind", self.dir.display());
        ensure!(
            !self.runc_root.exists(),
            "{} left behind",
            self.runc_root.display()
        );
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup")? {
            let cgroup = hierarchy?.path().join(&self.namespace);
            ensure!(!cgroup.exists(), "cgroup {} left behind", cgroup.display());
        }
        Ok(())
    }
}

#[test]
fn two_instances_pull_through_the_proxy_run_and_clean_up() -> anyhow::Result<()> {
    preflight()?;
    let registry = Registry::start()?;
    let (a, b) = start_two()?;
    ensure!(a.address() != b.address() && a.namespace() != b.namespace());
    ensure!(a.address().as_os_str().len() < 100);

    let image = push(&registry, &ImageSpec::busybox(Vec::new())?, "v1")?;
    let proxy = CountingProxy::start(&registry.addr())?;
    let via_proxy = image.replacen(&registry.addr(), &proxy.addr(), 1);

    let served_before = registry.served_blob_bytes()?;
    pull(&a, &via_proxy, OVERLAYFS, true)?;
    let served = registry.served_blob_bytes()? - served_before;
    let downstream = proxy.downstream_bytes();
    eprintln!(
        "pull through the proxy: {downstream} bytes downstream, {served} blob bytes served, {} \
         connections",
        proxy.connections()
    );
    ensure!(
        proxy.connections() > 0,
        "the pull did not go through the proxy"
    );
    ensure!(
        served > 500_000 && (served..=served + PROXY_OVERHEAD).contains(&downstream),
        "the proxy forwarded {downstream} bytes, the registry served {served} blob bytes"
    );
    // The stargz labels rpull adds are ignored by overlayfs: it unpacks as usual.
    rpull(&b, &image, OVERLAYFS, true)?;

    // Both instances run a container at the same time, with the same container ID.
    let runs: Vec<anyhow::Result<String>> = thread::scope(|s| {
        let threads: Vec<_> = [(&a, &via_proxy), (&b, &image)]
            .into_iter()
            .map(|(containerd, image)| {
                s.spawn(move || {
                    run_container(
                        containerd,
                        image,
                        OVERLAYFS,
                        "hostname",
                        &["cat", "/etc/hostname"],
                    )
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("run thread panicked"))
            .collect()
    });
    for output in runs {
        let output = output?;
        ensure!(output == HOSTNAME, "the container printed {output:?}");
    }
    let sum = run_container(
        &a,
        &via_proxy,
        OVERLAYFS,
        "sum",
        &["sh", "-c", "sha256sum /etc/passwd && id -u && ls -ld /tmp"],
    )?;
    ensure!(sum.contains("/etc/passwd") && sum.contains("\n0\n") && sum.contains("drwxrwxrwt"));
    // The containers were removed (`--rm`).
    let containers = run(&mut a.ctr(&["containers", "list", "--quiet"]))?;
    ensure!(containers.stdout.is_empty(), "{containers:?}");

    // A failing command is an error carrying its output.
    let err = run_container(&b, &image, OVERLAYFS, "fails", &["cat", "/no/such/file"])
        .unwrap_err()
        .to_string();
    ensure!(err.contains("/no/such/file"), "{err}");

    let footprints = [Footprint::of(&a), Footprint::of(&b)];
    drop(a);
    drop(b);
    for footprint in &footprints {
        footprint.check_gone()?;
    }
    Ok(())
}

#[test]
fn drop_kills_a_running_container_and_unmounts() -> anyhow::Result<()> {
    preflight()?;
    let registry = Registry::start()?;
    let containerd = Containerd::start(ContainerdOptions::default())?;
    let image = push(&registry, &ImageSpec::busybox(Vec::new())?, "sleep")?;
    pull(&containerd, &image, OVERLAYFS, true)?;
    run(&mut containerd.ctr(&[
        "run",
        "--detach",
        "--snapshotter",
        OVERLAYFS,
        &image,
        "sleeper",
        "sleep",
        "600",
    ]))?;
    let shim = sys::processes_mentioning(&format!("{}/", containerd.dir().display()))
        .into_iter()
        .find(|p| p.cmdline.contains("containerd-shim"))
        .context("no shim runs for the detached container")?;
    let container_pids = sys::with_descendants(&[shim.pid]);
    ensure!(
        container_pids.len() > 1,
        "the shim has no container process"
    );
    ensure!(!sys::mounts_under(containerd.dir())?.is_empty());

    let footprint = Footprint::of(&containerd);
    drop(containerd);
    footprint.check_gone()?;
    for pid in container_pids {
        ensure!(
            !sys::is_alive(pid),
            "process {pid} of the container survived"
        );
    }
    Ok(())
}

#[test]
fn a_container_that_runs_too_long_is_killed() -> anyhow::Result<()> {
    preflight()?;
    let registry = Registry::start()?;
    let containerd = Containerd::start(ContainerdOptions::default())?;
    let image = push(&registry, &ImageSpec::busybox(Vec::new())?, "slow")?;
    pull(&containerd, &image, OVERLAYFS, true)?;
    let start = Instant::now();
    let err = run_container_with(
        &containerd,
        &image,
        OVERLAYFS,
        "slow",
        &["sh", "-c", "echo started; sleep 600"],
        &[],
        Duration::from_secs(2),
    )
    .unwrap_err()
    .to_string();
    ensure!(
        err.contains("did not finish within 2s") && err.contains("started"),
        "{err}"
    );
    ensure!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    let containers = run(&mut containerd.ctr(&["containers", "list", "--quiet"]))?;
    ensure!(containers.stdout.is_empty(), "{containers:?}");
    let tasks = run(&mut containerd.ctr(&["tasks", "list", "--quiet"]))?;
    ensure!(tasks.stdout.is_empty(), "{tasks:?}");
    Ok(())
}

/// The busybox image with a layer on top that changes a file's content, a file's mode, removes
/// a file (whiteout) and adds one with an xattr.
fn changed_busybox() -> anyhow::Result<ImageSpec> {
    let top = TarGen::new()
        .dir("etc", 0o755)
        .file("etc/hostname", 0o644, b"changed\n")
        .file(
            "etc/group",
            0o600,
            streamsnap_e2e::busybox::GROUP.as_bytes(),
        )
        .dir("bin", 0o755)
        .whiteout("bin", "wc")
        .dir("data", 0o755)
        .file_with(
            "data/new",
            streamsnap_e2e::EntryOpts::mode(0o640)
                .owner(1000, 1000)
                .xattr("user.e2e", b"yes"),
            b"new file\n",
        )
        .finish();
    ImageSpec::busybox(vec![LayerBlob::gzip(top)])
}

#[test]
fn mounted_rootfs_trees_compare() -> anyhow::Result<()> {
    preflight()?;
    let registry = Registry::start()?;
    let containerd = Containerd::start(ContainerdOptions::default())?;
    let plain = push(&registry, &ImageSpec::busybox(Vec::new())?, "plain")?;
    let changed = push(&registry, &changed_busybox()?, "changed")?;
    pull(&containerd, &plain, OVERLAYFS, true)?;
    pull(&containerd, &changed, OVERLAYFS, true)?;

    let first = mount_rootfs(&containerd, &plain, OVERLAYFS, "first")?;
    let second = mount_rootfs(&containerd, &plain, OVERLAYFS, "second")?;
    let other = mount_rootfs(&containerd, &changed, OVERLAYFS, "other")?;
    let (a, b, c) = (
        walk_tree(first.path())?,
        walk_tree(second.path())?,
        walk_tree(other.path())?,
    );
    let same = diff_trees(&a, &b);
    ensure!(
        same.is_empty(),
        "the same image differs from itself: {same:#?}"
    );

    let sh = &a[Path::new("/bin/sh")];
    ensure!(sh.kind == NodeKind::Symlink && sh.link_target == Some("busybox".into()));
    ensure!(a[Path::new("/tmp")].mode == 0o1777);
    ensure!(a[Path::new("/home/user")].uid == 1000);
    ensure!(a[Path::new("/bin/busybox")].sha256.is_some());

    let diff = diff_trees(&a, &c);
    for expected in [
        "/etc/group: mode 0644 != 0600",
        "only in a: /bin/wc (symlink)",
        "only in b: /data (dir)",
        "only in b: /data/new (file)",
    ] {
        ensure!(
            diff.iter().any(|d| d == expected),
            "{expected:?} missing in {diff:#?}"
        );
    }
    ensure!(
        diff.iter().any(|d| d.starts_with("/etc/hostname: content")),
        "{diff:#?}"
    );
    let new = &c[Path::new("/data/new")];
    ensure!(new.xattrs.get("user.e2e").map(Vec::as_slice) == Some(&b"yes"[..]));
    ensure!((new.uid, new.gid, new.mode) == (1000, 1000, 0o640));

    let mount_dir = containerd.mount_dir();
    drop((first, second, other));
    let left = sys::mounts_under(&mount_dir)?;
    ensure!(
        left.is_empty(),
        "mounts left after the guards dropped: {left:?}"
    );
    let snapshots = run(&mut containerd.ctr(&["snapshots", "--snapshotter", OVERLAYFS, "ls"]))?;
    let snapshots = String::from_utf8_lossy(&snapshots.stdout);
    ensure!(
        !snapshots.contains(&*mount_dir.to_string_lossy()),
        "view snapshots left behind:\n{snapshots}"
    );
    Ok(())
}

#[test]
fn cri_plugin_starts_with_the_private_config() -> anyhow::Result<()> {
    preflight()?;
    let registry = Registry::start()?;
    let containerd = Containerd::start(
        ContainerdOptions::default()
            .with_cri(OVERLAYFS)
            .with_plain_http(&registry.addr()),
    )?;
    let plugins = run(&mut containerd.ctr(&["plugins", "ls"]))?;
    let plugins = String::from_utf8_lossy(&plugins.stdout);
    let cri = plugins
        .lines()
        .find(|l| l.contains("io.containerd.grpc.v1") && l.contains(" cri "))
        .with_context(|| format!("no CRI plugin in:\n{plugins}"))?;
    ensure!(cri.trim_end().ends_with("ok"), "{cri}");
    let hosts = containerd
        .hosts_dir()
        .join(registry.addr())
        .join("hosts.toml");
    ensure!(std::fs::read_to_string(&hosts)?.contains(&format!("http://{}", registry.addr())));
    Ok(())
}
