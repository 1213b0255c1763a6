//! The shell scripts a new user runs first, checked for what they must never do: `deploy/demo.sh
//! --help` answers without building or installing anything, and `deploy/image/build.sh OUT`
//! refuses an OUT that holds anything but its own earlier output, leaving it untouched.
//! (The demo itself runs in CI as `.ci/run`'s first step, from a fresh clone.)

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use anyhow::{Context, ensure};
use streamsnap_e2e::k8s_tools::workspace_root;

fn bash(script: &str, args: &[&str]) -> anyhow::Result<Output> {
    Command::new("bash")
        .arg(workspace_root().join(script))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running bash {script}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn demo_help_answers_without_doing_anything() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    for flag in ["--help", "-h"] {
        let out = bash("deploy/demo.sh", &[flag])?;
        ensure!(
            out.status.success(),
            "demo.sh {flag}: {}",
            text(&out.stderr)
        );
        let stdout = text(&out.stdout);
        for expected in ["--keep", "--stop", "Rust 1.88", "CARGO_TARGET_DIR"] {
            ensure!(stdout.contains(expected), "help lacks {expected}: {stdout}");
        }
        ensure!(!stdout.contains("==>"), "help did something: {stdout}");
    }
    ensure!(
        started.elapsed().as_secs() < 5,
        "--help took {:?}: it must not build",
        started.elapsed()
    );
    let out = bash("deploy/demo.sh", &["--no-such-flag"])?;
    ensure!(
        out.status.code() == Some(2),
        "unknown flag: {:?}",
        out.status
    );
    ensure!(text(&out.stderr).contains("unknown argument --no-such-flag"));
    Ok(())
}

/// A tree no build may delete: a file at the top and one below.
fn user_files(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir.join("sub"))?;
    fs::write(dir.join("notes.txt"), "mine")?;
    fs::write(dir.join("sub/data"), "mine too")?;
    Ok(())
}

#[test]
fn image_build_refuses_to_replace_what_it_did_not_write() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    // A directory with the user's files, and one that merely has an oci-layout file among them.
    let theirs = tmp.path().join("theirs");
    user_files(&theirs)?;
    let mixed = tmp.path().join("mixed");
    user_files(&mixed)?;
    fs::write(mixed.join("oci-layout"), "{}")?;
    // A plain file.
    let file = tmp.path().join("file");
    fs::write(&file, "mine")?;
    for out in [&theirs, &mixed, &file] {
        let arg = out.to_string_lossy();
        // An empty --bin-dir: the refusal must come before the missing binaries are noticed.
        let bins = tmp.path().join("no-bins");
        fs::create_dir_all(&bins)?;
        let output = bash(
            "deploy/image/build.sh",
            &["--bin-dir", &bins.to_string_lossy(), &arg],
        )?;
        let stderr = text(&output.stderr);
        ensure!(!output.status.success(), "build.sh {arg} succeeded");
        ensure!(
            stderr.contains("give a new or empty directory"),
            "build.sh {arg}: {stderr}"
        );
    }
    for dir in [&theirs, &mixed] {
        ensure!(fs::read_to_string(dir.join("notes.txt"))? == "mine");
        ensure!(fs::read_to_string(dir.join("sub/data"))? == "mine too");
    }
    ensure!(fs::read_to_string(&file)? == "mine");
    // The checkout itself, the case that would have deleted everything.
    let root = workspace_root();
    let bins = tmp.path().join("no-bins");
    let output = bash(
        "deploy/image/build.sh",
        &["--bin-dir", &bins.to_string_lossy(), "."],
    )?;
    ensure!(!output.status.success(), "build.sh . succeeded");
    ensure!(
        root.join("Cargo.toml").is_file(),
        "the checkout was touched"
    );
    Ok(())
}
