//! The daemon binary's stderr as journald or `kubectl logs` get it: plain text (no colour codes
//! off a terminal), and an error that stops the daemon printed once.

use std::path::Path;
use std::process::{Command, Output};

const DAEMON: &str = env!("CARGO_BIN_EXE_streamsnap-snapshotterd");

/// The daemon on a fresh root with a config holding an unknown key, which stops it at start.
fn start_with_a_bad_config(dir: &Path, extra: &[&str]) -> Output {
    let config = dir.join("config.toml");
    std::fs::write(&config, "[cache]\nmax_size = 1\n").unwrap();
    Command::new(DAEMON)
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--address")
        .arg(dir.join("snapshotter.sock"))
        .arg("--config")
        .arg(&config)
        .args(extra)
        .env_remove("STREAMSNAP_LOG")
        .env_remove("NO_COLOR")
        .output()
        .unwrap()
}

#[test]
fn a_fatal_error_is_one_plain_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let output = start_with_a_bad_config(dir.path(), &[]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains('\u{1b}'), "colour codes in {stderr:?}");
    assert_eq!(
        stderr.matches("unknown field `max_size`").count(),
        1,
        "once: {stderr}"
    );
    assert_eq!(stderr.matches(" ERROR ").count(), 1, "{stderr}");
    assert!(
        !stderr.lines().any(|l| l.starts_with("error:")),
        "printed twice: {stderr}"
    );
}

#[test]
fn with_errors_filtered_out_the_fatal_error_still_shows_once() {
    let dir = tempfile::tempdir().unwrap();
    let output = start_with_a_bad_config(dir.path(), &["--log-level", "off"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{stderr}"
    );
    assert!(!stderr.contains(" ERROR "), "{stderr}");
}

#[test]
fn a_misspelt_log_level_is_a_warning_not_silence() {
    let dir = tempfile::tempdir().unwrap();
    let output = start_with_a_bad_config(dir.path(), &["--log-level", "inf"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(" WARN ") && stderr.contains("\"inf\" is not a log filter"),
        "{stderr}"
    );
    assert_eq!(stderr.matches(" ERROR ").count(), 1, "{stderr}");
}
