//! `streamsnap-fuse-holder --socket PATH`: see the library documentation. Started by
//! `streamsnap-snapshotterd` when none runs, or by the deployment (a sidecar, a systemd unit).

fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let socket = match (args.next().as_deref(), args.next()) {
        (Some("--socket"), Some(path)) => std::path::PathBuf::from(path),
        _ => {
            eprintln!("usage: streamsnap-fuse-holder --socket PATH");
            return std::process::ExitCode::from(2);
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
    eprintln!(
        "streamsnap-fuse-holder {} serving {}",
        std::process::id(),
        socket.display()
    );
    match streamsnap_holder::serve(&socket) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("streamsnap-fuse-holder: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
