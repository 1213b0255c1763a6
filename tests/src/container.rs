//! Pulling, running and mounting images on a [`Containerd`] with `ctr` and `ctr-remote`, the way
//! an operator would:
//!
//! - [`pull`]: `ctr images pull [--plain-http] --snapshotter S IMAGE`. Sends no snapshot labels:
//!   every layer is downloaded and unpacked (a remote snapshotter sees plain Prepare calls).
//! - [`rpull`]: `ctr-remote images rpull [--plain-http] --snapshotter S IMAGE` (Debian package
//!   stargz-snapshotter). Sends `containerd.io/snapshot.ref` and the
//!   `containerd.io/snapshot/remote/stargz.{reference,digest,layers}` labels with each Prepare,
//!   so a remote snapshotter can skip layers. It needs no other flag.
//! - [`run_container`]: `ctr run --rm --snapshotter S IMAGE ID ARGS...`, bounded in time.
//! - [`mount_rootfs`]: `ctr images mount --snapshotter S IMAGE TARGET` (a read-only view snapshot
//!   keyed by TARGET, under a 24 h lease named TARGET), undone by
//!   `ctr images unmount --rm --snapshotter S TARGET` on drop.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::bins::{command_line, run};
use crate::containerd::Containerd;
use crate::sys;

/// How long [`run_container`] lets a container run.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `ctr run` may take to exit after its task got SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

/// `ctr images pull [--plain-http] --snapshotter SNAPSHOTTER IMAGE`: fetches every blob and
/// unpacks every layer.
pub fn pull(
    containerd: &Containerd,
    image: &str,
    snapshotter: &str,
    plain_http: bool,
) -> anyhow::Result<()> {
    let mut args = vec!["images", "pull", "--snapshotter", snapshotter];
    if plain_http {
        args.push("--plain-http");
    }
    args.push(image);
    run(&mut containerd.ctr(&args)).with_context(|| format!("pulling {image}"))?;
    Ok(())
}

/// `ctr-remote images rpull [--plain-http] --snapshotter SNAPSHOTTER IMAGE`: a pull whose
/// Prepare calls carry the remote-snapshot labels (see the module doc).
pub fn rpull(
    containerd: &Containerd,
    image: &str,
    snapshotter: &str,
    plain_http: bool,
) -> anyhow::Result<()> {
    let mut args = vec!["images", "rpull", "--snapshotter", snapshotter];
    if plain_http {
        args.push("--plain-http");
    }
    args.push(image);
    run(&mut containerd.ctr_remote(&args)).with_context(|| format!("rpulling {image}"))?;
    Ok(())
}

/// Runs `ARGS` in a new container `id` of `image` (pulled before) and returns its stdout. A
/// non-zero exit is an error quoting stdout and stderr; so is running longer than
/// [`RUN_TIMEOUT`] (the task is killed then).
pub fn run_container(
    containerd: &Containerd,
    image: &str,
    snapshotter: &str,
    id: &str,
    args: &[&str],
) -> anyhow::Result<String> {
    let output = run_container_with(containerd, image, snapshotter, id, args, &[], RUN_TIMEOUT)?;
    if !output.status.success() {
        bail!(
            "container {id} of {image} on {snapshotter} ({args:?}) exited with {}\n--- stdout \
             ---\n{}\n--- stderr ---\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout).trim_end(),
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
    }
    String::from_utf8(output.stdout).context("the container's stdout is not UTF-8")
}

/// `ctr run --rm --snapshotter S FLAGS... IMAGE ID ARGS...` (`FLAGS` are more `ctr run` flags,
/// e.g. `--uidmap`, `--env`, `--mount`), whatever its exit status. After `timeout` the task gets
/// SIGKILL and this returns an error quoting what the container printed so far.
pub fn run_container_with(
    containerd: &Containerd,
    image: &str,
    snapshotter: &str,
    id: &str,
    args: &[&str],
    flags: &[&str],
    timeout: Duration,
) -> anyhow::Result<Output> {
    let mut ctr_args = vec!["run", "--rm", "--snapshotter", snapshotter];
    ctr_args.extend_from_slice(flags);
    ctr_args.extend_from_slice(&[image, id]);
    ctr_args.extend_from_slice(args);
    let mut cmd = containerd.ctr(&ctr_args);
    let what = command_line(&cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        thread::sleep(POLL);
    };
    match status {
        Some(status) => Ok(Output {
            status,
            stdout: join(stdout),
            stderr: join(stderr),
        }),
        None => {
            kill_task(containerd, id, &mut child);
            bail!(
                "{what} did not finish within {timeout:?}: killed\n--- stdout ---\n{}\n--- \
                 stderr ---\n{}",
                String::from_utf8_lossy(&join(stdout)).trim_end(),
                String::from_utf8_lossy(&join(stderr)).trim_end()
            )
        }
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> Option<JoinHandle<Vec<u8>>> {
    pipe.map(|mut pipe| {
        thread::spawn(move || {
            let mut out = Vec::new();
            let _ = pipe.read_to_end(&mut out);
            out
        })
    })
}

fn join(reader: Option<JoinHandle<Vec<u8>>>) -> Vec<u8> {
    reader.and_then(|r| r.join().ok()).unwrap_or_default()
}

/// SIGKILLs the task's processes; `ctr run --rm` then removes the container. If `ctr` itself
/// hangs, kills it and removes task and container by hand.
fn kill_task(containerd: &Containerd, id: &str, ctr_run: &mut Child) {
    let quiet = |mut cmd: Command| {
        let _ = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    };
    quiet(containerd.ctr(&["tasks", "kill", "--all", "--signal", "SIGKILL", id]));
    let deadline = Instant::now() + KILL_GRACE;
    while matches!(ctr_run.try_wait(), Ok(None)) && Instant::now() < deadline {
        thread::sleep(POLL);
    }
    if matches!(ctr_run.try_wait(), Ok(None)) {
        let _ = ctr_run.kill();
        let _ = ctr_run.wait();
        quiet(containerd.ctr(&["tasks", "delete", "--force", id]));
        quiet(containerd.ctr(&["containers", "delete", id]));
    }
}

/// An image's rootfs mounted read-only by `ctr images mount`; unmounted, and its snapshot and
/// lease removed, on drop.
#[derive(Debug)]
pub struct RootfsGuard<'a> {
    containerd: &'a Containerd,
    snapshotter: String,
    target: PathBuf,
}

impl RootfsGuard<'_> {
    /// Where the rootfs is mounted.
    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for RootfsGuard<'_> {
    fn drop(&mut self) {
        let target = self.target.to_string_lossy().into_owned();
        let unmount = run(&mut self.containerd.ctr(&[
            "images",
            "unmount",
            "--rm",
            "--snapshotter",
            &self.snapshotter,
            &target,
        ]));
        if let Err(e) = unmount {
            eprintln!("warning: {e:#}");
        }
        for (path, e) in sys::unmount_all_under(&self.target) {
            eprintln!("warning: cannot unmount {}: {e}", path.display());
        }
        let _ = std::fs::remove_dir(&self.target);
    }
}

/// A shell command for a container that checks every one of `files` (path, sha256 hex) with
/// `sha256sum -c` and exits non-zero unless each digest matches: run it with [`run_container`],
/// which fails on a non-zero exit. The exit status is the verdict, not the output: under load
/// `ctr run` can lose what a short-lived container printed (CI saw a `sha256sum` that exited 0
/// with empty output), never its exit status.
pub fn sha256_check(files: &[(String, String)]) -> String {
    let lines: Vec<String> = files
        .iter()
        .map(|(path, digest)| format!("'{digest}  {path}'"))
        .collect();
    format!("printf '%s\\n' {} | sha256sum -c -", lines.join(" "))
}

/// [`sha256_check`] for each of `files` at once (one reader per file), exiting non-zero when
/// any check fails.
pub fn sha256_check_parallel(files: &[(String, String)]) -> String {
    let readers: String = files
        .iter()
        .map(|file| {
            format!(
                "{{ {}; }} & pids=\"$pids $!\"; ",
                sha256_check(std::slice::from_ref(file))
            )
        })
        .collect();
    format!("pids=; {readers}for p in $pids; do wait $p || exit 1; done")
}

/// Mounts the rootfs of `image` (pulled before, or unpacked now by `ctr`) read-only at
/// `<containerd dir>/mnt/<key>`: `ctr images mount IMAGE TARGET` creates a view snapshot named
/// TARGET on the image's top layer.
///
/// containerd 1.6's `ctr images mount` ignores `--snapshotter` (it reads a global flag that does
/// not exist) and always uses overlayfs: use it for overlayfs rootfs only, and
/// [`crate::snapshotterd::mount_view`] for another snapshotter's.
///
/// What the mounts are is up to the snapshotter. overlayfs mounts the view of a single-layer
/// image as a read-only bind mount of the layer's dir (whiteouts and `trusted.overlay.*` xattrs
/// of that layer would show), and of a multi-layer image as an overlay mount with lower dirs
/// only (which hides them).
pub fn mount_rootfs<'a>(
    containerd: &'a Containerd,
    image: &str,
    snapshotter: &str,
    key: &str,
) -> anyhow::Result<RootfsGuard<'a>> {
    if key.is_empty() || key.contains('/') || key.starts_with('.') {
        bail!("mount key {key:?} must be a plain file name");
    }
    let target = containerd.mount_dir().join(key);
    std::fs::create_dir(&target).with_context(|| format!("creating {}", target.display()))?;
    let target_arg = target.to_string_lossy().into_owned();
    let mounted = run(&mut containerd.ctr(&[
        "images",
        "mount",
        "--snapshotter",
        snapshotter,
        image,
        &target_arg,
    ]));
    if let Err(e) = mounted {
        sys::unmount_all_under(&target);
        let _ = std::fs::remove_dir(&target);
        return Err(e.context(format!("mounting the rootfs of {image} ({snapshotter})")));
    }
    Ok(RootfsGuard {
        containerd,
        snapshotter: snapshotter.to_owned(),
        target,
    })
}
