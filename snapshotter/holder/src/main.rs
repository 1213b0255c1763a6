//! `streamsnap-fuse-holder --socket PATH [--idle-timeout SECONDS]`: see the library
//! documentation. Started by `streamsnap-snapshotterd` when none runs, or by the deployment (a
//! sidecar, a systemd unit). Arguments are parsed by hand: the holder stays small.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use streamsnap_holder::{DEFAULT_IDLE_TIMEOUT, Exit, ServeOptions};

const NAME: &str = "streamsnap-fuse-holder";

fn usage() -> String {
    format!(
        "Keeps the FUSE connections of streamsnap-snapshotterd's layer mounts open across \
         restarts of the daemon

Usage: {NAME} --socket PATH [--idle-timeout SECONDS]

Options:
      --socket PATH             Unix socket to serve the daemon on (the daemon's [fuse]
                                holder_socket, by default <root>/fuse-holder.sock)
      --idle-timeout SECONDS    Exit after this long holding no connection with no daemon
                                connected; 0: never [default: {}]. A holder that keeps
                                connections never exits on its own.
  -h, --help                    Print help
  -V, --version                 Print version

The daemon starts a holder when none answers on the socket, and asks it to exit when it stops
for good (SIGINT). See \"Zero-downtime restarts\" in docs/snapshotter.md.
",
        DEFAULT_IDLE_TIMEOUT.as_secs()
    )
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Run {
        socket: PathBuf,
        idle_timeout: Option<Duration>,
    },
    Help,
    Version,
}

fn parse(args: impl IntoIterator<Item = String>) -> Result<Parsed, String> {
    let mut socket = None;
    let mut idle_timeout = Some(DEFAULT_IDLE_TIMEOUT);
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_owned(), Some(value.into())),
            _ => (arg, None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "-V" | "--version" => return Ok(Parsed::Version),
            "--socket" => socket = Some(PathBuf::from(value("--socket PATH")?)),
            "--idle-timeout" => {
                let text = value("--idle-timeout SECONDS")?;
                let seconds: u64 = text.parse().map_err(|_| {
                    format!("--idle-timeout {text:?} is not a number of seconds (0: never)")
                })?;
                idle_timeout = (seconds > 0).then(|| Duration::from_secs(seconds));
            }
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    match socket {
        Some(socket) => Ok(Parsed::Run {
            socket,
            idle_timeout,
        }),
        None => Err("--socket PATH is required".into()),
    }
}

fn main() -> ExitCode {
    let (socket, idle_timeout) = match parse(std::env::args().skip(1)) {
        Ok(Parsed::Run {
            socket,
            idle_timeout,
        }) => (socket, idle_timeout),
        Ok(Parsed::Help) => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!("{NAME} {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!(
                "error: {error}\n\nUsage: {NAME} --socket PATH [--idle-timeout SECONDS]\n\nFor \
                 more information, try '--help'."
            );
            return ExitCode::from(2);
        }
    };
    // Dying with the terminal or the daemon's process group would defeat the purpose.
    // SAFETY: ignoring SIGHUP and SIGPIPE installs no handler code; nothing else runs yet.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGHUP,
            nix::sys::signal::SigHandler::SigIgn,
        );
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigIgn,
        );
    }
    let pid = std::process::id();
    let idle = match idle_timeout {
        Some(timeout) => format!("exits after {} s idle", timeout.as_secs()),
        None => "no idle timeout".to_owned(),
    };
    eprintln!("{NAME} {pid} serving {} ({idle})", socket.display());
    let idle_seconds = idle_timeout.map_or(0, |t| t.as_secs());
    match streamsnap_holder::serve(&socket, &ServeOptions { idle_timeout }) {
        Ok(Exit::Stopped { released }) => {
            eprintln!(
                "{NAME} {pid}: the daemon stopped for good; closed {released} kept \
                 connection{}, exiting",
                if released == 1 { "" } else { "s" }
            );
            ExitCode::SUCCESS
        }
        Ok(Exit::Idle) => {
            eprintln!(
                "{NAME} {pid}: no connection kept and no daemon connected for {idle_seconds} s: \
                 exiting"
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{NAME}: {}: {error}", socket.display());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn arguments_parse_with_defaults_and_clear_errors() {
        assert_eq!(
            parse(args(&["--socket", "/run/h.sock"])),
            Ok(Parsed::Run {
                socket: "/run/h.sock".into(),
                idle_timeout: Some(DEFAULT_IDLE_TIMEOUT)
            })
        );
        assert_eq!(
            parse(args(&["--idle-timeout=0", "--socket=/s"])),
            Ok(Parsed::Run {
                socket: "/s".into(),
                idle_timeout: None
            })
        );
        assert_eq!(
            parse(args(&["--socket", "/s", "--idle-timeout", "30"])),
            Ok(Parsed::Run {
                socket: "/s".into(),
                idle_timeout: Some(Duration::from_secs(30))
            })
        );
        assert_eq!(parse(args(&["--help"])), Ok(Parsed::Help));
        assert_eq!(parse(args(&["--socket", "/s", "-h"])), Ok(Parsed::Help));
        assert_eq!(parse(args(&["-V"])), Ok(Parsed::Version));
        assert!(
            parse(args(&[]))
                .unwrap_err()
                .contains("--socket PATH is required")
        );
        assert!(
            parse(args(&["--socket"]))
                .unwrap_err()
                .contains("needs a value")
        );
        assert!(
            parse(args(&["--socket", "/s", "--idle-timeout", "10m"]))
                .unwrap_err()
                .contains("not a number of seconds")
        );
        assert!(
            parse(args(&["--sockt", "/s"]))
                .unwrap_err()
                .contains("--sockt")
        );
    }
}
