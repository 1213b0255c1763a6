//! A private PostgreSQL cluster for a test (Debian's `postgresql` package): `initdb` and
//! `pg_ctl` run as the user `postgres` in a temp dir that user owns, the server listens on a
//! free 127.0.0.1 port (TCP needs a password: SCRAM-SHA-256) and on a Unix socket in that dir
//! (no password: only root and `postgres` can reach it). [`PgCluster::start`] creates a role
//! and a database it owns for the test; more databases with [`PgCluster::create_database`].
//! Dropping the cluster stops the server by its PID and removes the dir (kept, with its log,
//! with `STREAMSNAP_E2E_KEEP=1`); its log is printed when a test panics.
//!
//! Needs root (to run as `postgres`); every test gets its own cluster (about a second to make),
//! so tests run in parallel without sharing anything.

use std::fs::{self, File};
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tempfile::TempDir;

/// The role every test database belongs to.
pub const ROLE: &str = "streamsnap";
/// The database [`PgCluster::start`] creates.
pub const DATABASE: &str = "streamsnap";

const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A running private cluster. See the module doc.
#[derive(Debug)]
pub struct PgCluster {
    dir: Option<TempDir>,
    bin: PathBuf,
    port: u16,
    pid: i32,
    password: String,
}

impl PgCluster {
    /// initdb, start, and a role [`ROLE`] with a random password owning a database
    /// [`DATABASE`].
    pub fn start() -> anyhow::Result<Self> {
        crate::require_root()?;
        let bin = pg_bin_dir()?;
        let (uid, gid) = postgres_user()?;
        let dir = tempfile::Builder::new()
            .prefix("streamsnap-e2e-pg.")
            .tempdir()
            .context("creating a temp dir for PostgreSQL")?;
        let root = dir.path();
        fs::create_dir(root.join("sock"))?;
        for path in [root, &root.join("sock")] {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("chown postgres {}", path.display()))?;
            fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
        }
        let data = root.join("data");
        let output = as_postgres(Command::new(bin.join("initdb")), uid, gid)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .output()
            .context("running initdb")?;
        ensure!(
            output.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let password = random_hex()?;
        let mut cluster = Self {
            dir: Some(dir),
            bin,
            port: 0,
            pid: 0,
            password,
        };
        // A free port may be taken between the probe and the server's bind: try a few.
        let mut last = None;
        for _ in 0..5 {
            cluster.port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            match cluster.pg_ctl_start(uid, gid) {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            return Err(e);
        }
        cluster.pid = cluster.read_pid()?;
        cluster.psql(
            "postgres",
            &format!("CREATE ROLE {ROLE} LOGIN PASSWORD '{}'", cluster.password),
        )?;
        cluster.create_database(DATABASE)?;
        let password_file = cluster.password_file();
        fs::write(&password_file, format!("{}\n", cluster.password))?;
        fs::set_permissions(&password_file, fs::Permissions::from_mode(0o600))?;
        Ok(cluster)
    }

    fn root(&self) -> &Path {
        self.dir.as_ref().expect("taken only on drop").path()
    }

    fn pg_ctl_start(&self, uid: u32, gid: u32) -> anyhow::Result<()> {
        let root = self.root();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            root.join("sock").display()
        );
        let status = as_postgres(Command::new(self.bin.join("pg_ctl")), uid, gid)
            .arg("-D")
            .arg(root.join("data"))
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", "60", "-o", &options, "start"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running pg_ctl start")?;
        ensure!(
            status.success(),
            "pg_ctl start failed ({status}); the server's log:\n{}",
            self.log()
        );
        Ok(())
    }

    fn read_pid(&self) -> anyhow::Result<i32> {
        let pidfile = self.root().join("data/postmaster.pid");
        let text = fs::read_to_string(&pidfile)
            .with_context(|| format!("reading {}", pidfile.display()))?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .with_context(|| format!("no PID in {}", pidfile.display()))
    }

    /// Runs SQL as the superuser over the Unix socket; returns psql's output (unaligned, no
    /// headers).
    pub fn psql(&self, database: &str, sql: &str) -> anyhow::Result<String> {
        let output = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(self.root().join("sock"))
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                database,
            ])
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .env_remove("PGPASSWORD")
            .output()
            .context("running psql")?;
        ensure!(
            output.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// A new empty database owned by [`ROLE`].
    pub fn create_database(&self, name: &str) -> anyhow::Result<()> {
        ensure!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "database names here are [a-z0-9_]: {name:?}"
        );
        self.psql("postgres", &format!("CREATE DATABASE {name} OWNER {ROLE}"))
            .map(drop)
    }

    /// `postgres://streamsnap@127.0.0.1:PORT/DATABASE`: no password in it.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{ROLE}@127.0.0.1:{}/{database}", self.port)
    }

    /// The role's password (also in [`PgCluster::password_file`]).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// A file holding the role's password, mode 0600.
    pub fn password_file(&self) -> PathBuf {
        self.root().join("password")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's PID.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn log_path(&self) -> PathBuf {
        self.root().join("postgres.log")
    }

    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.log_path()).unwrap_or_default()).into_owned()
    }

    /// Stops the server by its PID (fast shutdown, then SIGKILL) and waits for it to exit.
    fn stop(&mut self) {
        if self.pid <= 0 {
            return;
        }
        // SAFETY: kill(2) takes no pointers. The PID is the postmaster's, read from its pid
        // file; it is not our child (pg_ctl detached it), so it is reaped by init.
        unsafe { libc::kill(self.pid, libc::SIGINT) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while alive(self.pid) {
            if Instant::now() > deadline {
                // SAFETY: as above.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.pid = 0;
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- last lines of the PostgreSQL log {} ---\n{}",
                self.log_path().display(),
                lines[lines.len().saturating_sub(30)..].join("\n")
            );
        }
        self.stop();
        if let Some(dir) = self.dir.take()
            && std::env::var_os(crate::registry::KEEP_ENV).is_some()
        {
            eprintln!("keeping PostgreSQL dir {}", dir.keep().display());
        }
    }
}

/// Whether a process with this PID still runs (a zombie does not count).
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Runs `command` as `uid`:`gid` (no supplementary groups), in `/` so the user can read its
/// working directory.
fn as_postgres(mut command: Command, uid: u32, gid: u32) -> Command {
    command
        .uid(uid)
        .gid(gid)
        .current_dir("/")
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null());
    command
}

/// The newest `/usr/lib/postgresql/N/bin` with initdb (Debian keeps the server binaries off
/// `PATH`).
pub fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "no PostgreSQL server in /usr/lib/postgresql/*/bin: install the Debian package \
             postgresql"
        ),
    }
}

/// The `postgres` user's uid and gid.
fn postgres_user() -> anyhow::Result<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&"postgres") && fields.len() > 3)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
        .context("no user postgres in /etc/passwd: install the Debian package postgresql")
}

fn random_hex() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_starts_answers_over_tcp_with_the_password_and_stops_on_drop() {
        let cluster = PgCluster::start().unwrap();
        let pid = cluster.pid();
        assert!(alive(pid));
        cluster.create_database("other_db").unwrap();
        // TCP with the role's password, as the service connects.
        let output = Command::new(cluster.bin.join("psql"))
            .arg(cluster.url(DATABASE))
            .args(["-X", "-A", "-t", "-c", "SELECT current_user"])
            .env("PGPASSWORD", cluster.password())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), ROLE);
        // And not without it.
        let refused = Command::new(cluster.bin.join("psql"))
            .arg(cluster.url(DATABASE))
            .args(["-X", "-w", "-c", "SELECT 1"])
            .env_remove("PGPASSWORD")
            .env("PGPASSFILE", "/nonexistent")
            .output()
            .unwrap();
        assert!(!refused.status.success());
        let root = cluster.root().to_owned();
        drop(cluster);
        assert!(!alive(pid), "the server still runs");
        assert!(!root.exists(), "{} was not removed", root.display());
    }
}
