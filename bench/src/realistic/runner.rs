//! Running the contenders: a container until it prints "ready", the daemon's metrics and peak
//! memory, the kernel's caches.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use streamsnap_e2e::Containerd;

/// How long a container may take to print "ready".
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long it may take to exit after that.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// `ctr run --rm --snapshotter S IMAGE ID CMD...`; returns when the container printed a line
/// `ready`, that instant, after the container exited. An exit without it, or a timeout, is an
/// error quoting what it printed.
pub fn run_until_ready(
    containerd: &Containerd,
    image: &str,
    snapshotter: &str,
    id: &str,
    cmd: &[&str],
) -> anyhow::Result<Instant> {
    let mut args = vec!["run", "--rm", "--snapshotter", snapshotter, image, id];
    args.extend_from_slice(cmd);
    let mut child = containerd
        .ctr(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting ctr run")?;
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let stdout = child.stdout.take().context("ctr run has no stdout")?;
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let mut stderr = child.stderr.take().context("ctr run has no stderr")?;
    let errors = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut printed = Vec::new();
    let mut ready = None;
    while ready.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok((at, line)) => {
                if line.trim() == "ready" {
                    ready = Some(at);
                }
                printed.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(_) => break,
        }
    }
    let exit_deadline = Instant::now() + EXIT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > exit_deadline || ready.is_none() {
            break None;
        }
        thread::sleep(Duration::from_millis(10));
    };
    if status.is_none() {
        let _ = containerd
            .ctr(&["tasks", "kill", "--all", "--signal", "SIGKILL", id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = child.wait();
    }
    let _ = reader.join();
    let stderr = errors.join().unwrap_or_default();
    match (ready, status) {
        (Some(at), Some(status)) if status.success() => Ok(at),
        _ => bail!(
            "container {id} on {snapshotter} did not print ready and exit cleanly (status \
             {status:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            printed.join("\n"),
            stderr.trim_end()
        ),
    }
}

/// Writes back dirty pages and drops the page, dentry and inode caches of the whole machine.
pub fn drop_caches() -> anyhow::Result<()> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").context("writing /proc/sys/vm/drop_caches")
}

/// Peak resident set size (`VmHWM`) of a process, in bytes.
pub fn peak_rss(pid: i32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .context("no VmHWM in /proc/PID/status")?;
    Ok(kb * 1024)
}

/// A scrape of Prometheus text: `name{labels}` to value.
#[derive(Clone, Debug, Default)]
pub struct Scrape(HashMap<String, f64>);

impl Scrape {
    pub fn fetch(addr: &str) -> anyhow::Result<Self> {
        let response = streamsnap_e2e::http::get(addr, "/metrics", &[])?;
        if response.status != 200 {
            bail!("GET /metrics answered {}", response.status);
        }
        Ok(Self::parse(&String::from_utf8_lossy(&response.body)))
    }

    pub fn parse(text: &str) -> Self {
        let mut values = HashMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if let Some((key, value)) = line.rsplit_once(' ')
                && let Ok(value) = value.parse::<f64>()
            {
                values.insert(key.to_owned(), value);
            }
        }
        Self(values)
    }

    /// Sum over every series of metric `name` whose labels contain each of `labels`
    /// (`key="value"` strings).
    pub fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.0
            .iter()
            .filter(|(key, _)| {
                let (metric, rest) = key.split_once('{').unwrap_or((key.as_str(), ""));
                metric == name && labels.iter().all(|l| rest.contains(l))
            })
            .map(|(_, v)| v)
            .sum()
    }
}

impl Scrape {
    /// The values of metric `name` by the value of its label `label` (`op`, `tier`, ...).
    pub fn by_label(&self, name: &str, label: &str) -> std::collections::BTreeMap<String, f64> {
        let prefix = format!("{label}=\"");
        let mut out = std::collections::BTreeMap::new();
        for (key, value) in &self.0 {
            let Some((metric, rest)) = key.split_once('{') else {
                continue;
            };
            if metric != name {
                continue;
            }
            if let Some(start) = rest.find(&prefix) {
                let tail = &rest[start + prefix.len()..];
                if let Some(end) = tail.find('"') {
                    *out.entry(tail[..end].to_owned()).or_default() += value;
                }
            }
        }
        out
    }
}

/// Resident bytes and files with resident pages, over the regular files below `roots` (page
/// cache residency by mincore(2)).
#[derive(Clone, Copy, Debug, Default)]
pub struct Residency {
    pub bytes: u64,
    pub files: u64,
}

pub fn residency(roots: &[&Path]) -> anyhow::Result<Residency> {
    let page = 4096u64;
    let mut total = Residency::default();
    let mut stack: Vec<std::path::PathBuf> = roots.iter().map(|p| p.to_path_buf()).collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_file() {
                let resident = file_residency(&entry.path(), page).unwrap_or(0);
                if resident > 0 {
                    total.bytes += resident;
                    total.files += 1;
                }
            }
        }
    }
    Ok(total)
}

/// Bytes of `path` in the page cache (whole pages, capped at the file size).
fn file_residency(path: &Path, page: u64) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    let pages = len.div_ceil(page) as usize;
    let mut vec = vec![0u8; pages];
    // SAFETY: a shared read-only mapping of an open file of `len` bytes; it is only passed to
    // mincore (never read) and unmapped below; `vec` has one byte per page of the mapping.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let rc = libc::mincore(addr, len as usize, vec.as_mut_ptr());
        libc::munmap(addr, len as usize);
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let resident = vec.iter().filter(|&&b| b & 1 == 1).count() as u64;
    Ok((resident * page).min(len))
}

/// Drops the page cache of one file (posix_fadvise DONTNEED), e.g. a file on a FUSE mount,
/// without touching the rest of the machine's caches.
pub fn fadvise_dontneed(path: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path)?;
    // SAFETY: posix_fadvise takes a valid open descriptor and plain integers.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        bail!(
            "posix_fadvise({}): {}",
            path.display(),
            std::io::Error::from_raw_os_error(rc)
        );
    }
    Ok(())
}

/// Reads a file to the end with 1 MiB reads; returns bytes read and the time it took.
pub fn read_file(path: &Path) -> anyhow::Result<(u64, Duration)> {
    let started = Instant::now();
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok((total, started.elapsed()))
}

/// lstat of every entry below `root` (readdir + lstat, as `find -ls` does); returns the count and
/// the time it took.
pub fn stat_tree(root: &Path) -> anyhow::Result<(u64, Duration)> {
    let started = Instant::now();
    let mut count = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let entry = entry?;
            let meta = std::fs::symlink_metadata(entry.path())?;
            count += 1;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((count, started.elapsed()))
}
