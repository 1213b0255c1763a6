//! Cleaning up after real programs: processes found through `/proc`, mounts found through
//! `/proc/self/mountinfo`. Used by the drops of [`crate::Containerd`] and the mount guards, and
//! by tests that check nothing of theirs is left behind.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;

const POLL: Duration = Duration::from_millis(20);

/// A process as `/proc` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: i32,
    pub ppid: i32,
    /// The command line, arguments joined by spaces.
    pub cmdline: String,
}

/// Every process that `/proc` lists now (kernel threads have an empty command line). Processes
/// that exit while the list is read are skipped.
pub fn processes() -> Vec<ProcessInfo> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(process)
        .collect()
}

fn process(pid: i32) -> Option<ProcessInfo> {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`; comm may hold spaces and parentheses, so split at the last ')'.
    let ppid = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let cmdline = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(String::from_utf8_lossy)
        .collect::<Vec<_>>()
        .join(" ");
    Some(ProcessInfo { pid, ppid, cmdline })
}

/// Processes whose command line contains `needle`, except this process.
pub fn processes_mentioning(needle: &str) -> Vec<ProcessInfo> {
    let me = i32::try_from(std::process::id()).expect("pids fit in i32");
    processes()
        .into_iter()
        .filter(|p| p.pid != me && p.cmdline.contains(needle))
        .collect()
}

/// `roots` and all their descendants (children first found through the parent pid).
pub fn with_descendants(roots: &[i32]) -> Vec<i32> {
    let all = processes();
    let mut found: Vec<i32> = roots.to_vec();
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        for p in &all {
            if p.ppid == parent && !found.contains(&p.pid) {
                found.push(p.pid);
            }
        }
        i += 1;
    }
    found
}

/// Sends `signal` to `pid`; a process that is already gone is not an error.
pub fn signal(pid: i32, signal: libc::c_int) {
    // SAFETY: kill(2) takes no pointers. The caller found `pid` by scanning /proc a moment ago;
    // the harness only signals processes it identified by their command line or ancestry.
    unsafe { libc::kill(pid, signal) };
}

/// SIGKILLs every process in `pids` and waits (up to `timeout`) until `/proc` no longer lists
/// them (zombies of other parents count as gone). Returns the pids still there.
pub fn kill_and_wait(pids: &[i32], timeout: Duration) -> Vec<i32> {
    for &pid in pids {
        signal(pid, libc::SIGKILL);
    }
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|&p| is_alive(p)).collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        thread::sleep(POLL);
    }
}

/// Whether `pid` exists and is not a zombie.
pub fn is_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Mount points of this process's mount namespace, in mountinfo order (parents before the
/// mounts on top of them).
pub fn mount_points() -> anyhow::Result<Vec<PathBuf>> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .collect())
}

/// Mount points at or below `dir`, deepest (longest path) first.
pub fn mounts_under(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut mounts: Vec<PathBuf> = mount_points()?
        .into_iter()
        .filter(|m| m.starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    mounts.dedup();
    Ok(mounts)
}

/// Detaches (`umount2(MNT_DETACH)`) every mount at or below `dir`, deepest first, stacked mounts
/// included. Returns the mount points that could not be detached, with the error.
pub fn unmount_all_under(dir: &Path) -> Vec<(PathBuf, std::io::Error)> {
    let mut failed = Vec::new();
    // A mount point can carry several stacked mounts: repeat while something is left and the
    // last round made progress.
    for _ in 0..8 {
        let Ok(mounts) = mounts_under(dir) else {
            break;
        };
        if mounts.is_empty() {
            return Vec::new();
        }
        failed.clear();
        for m in &mounts {
            if let Err(e) = unmount_detach(m) {
                failed.push((m.clone(), e));
            }
        }
        if failed.len() == mounts.len() {
            break;
        }
    }
    failed
}

/// `umount2(path, MNT_DETACH)`.
pub fn unmount_detach(path: &Path) -> std::io::Result<()> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c_path` is a NUL-terminated string that outlives the call.
    let rc = unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// mountinfo writes space, tab, newline and backslash in paths as `\040`-style octal escapes.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let octal = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or_default();
            if let Ok(b) = u8::from_str_radix(octal, 8) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes `dir` and everything below it, after detaching any mounts below it (so a leftover
/// mount never makes the removal descend into a mounted filesystem).
pub fn remove_tree(dir: &Path) -> anyhow::Result<()> {
    let failed = unmount_all_under(dir);
    if let Some((path, e)) = failed.first() {
        anyhow::bail!("cannot unmount {}: {e}", path.display());
    }
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mountinfo(r"/x\134y"), r"/x\y");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\04"), r"/end\04");
    }

    #[test]
    fn finds_itself_and_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("30.123456")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let me = i32::try_from(std::process::id()).unwrap();
        // Between fork and exec the child still shows this test's command line: poll.
        let deadline = Instant::now() + Duration::from_secs(5);
        let found = loop {
            let found = processes_mentioning("sleep 30.123456");
            if !found.is_empty() || Instant::now() > deadline {
                break found;
            }
            thread::sleep(POLL);
        };
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].ppid, me);
        assert!(with_descendants(&[me]).contains(&pid));
        assert!(kill_and_wait(&[pid], Duration::from_secs(5)).is_empty());
        child.wait().unwrap();
        assert!(!is_alive(pid));
    }

    #[test]
    fn root_is_a_mount_point() {
        assert!(mount_points().unwrap().contains(&PathBuf::from("/")));
    }
}
