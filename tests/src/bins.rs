//! Finding the workspace's own binaries and running programs with errors that show what went
//! wrong.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, bail};

/// Most of a program's stdout or stderr an error message quotes (the end is kept).
const MAX_QUOTED_OUTPUT: usize = 16 * 1024;

/// Path of the workspace binary `name` (e.g. `"streamsnap"`) built with the same profile as the
/// running test: tests run from `target/<profile>/deps/`, binaries live in `target/<profile>/`.
pub fn workspace_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the test executable")?;
    let mut dir = exe
        .parent()
        .context("the test executable has no parent dir")?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().context("deps/ has no parent dir")?;
    }
    let bin = dir.join(name);
    if !bin.is_file() {
        bail!(
            "workspace binary {name:?} not found at {}: build it first: cargo build --workspace \
             --bins (with the same profile as the tests)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Runs `cmd` to completion with stdout and stderr captured (stdin is null). A failure to start
/// or a non-zero exit is an error quoting the command line and both outputs.
pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let output = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| spawn_error(cmd, e))?;
    if !output.status.success() {
        bail!(
            "{} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            command_line(cmd),
            output.status,
            quote_output(&output.stdout),
            quote_output(&output.stderr)
        );
    }
    Ok(output)
}

fn spawn_error(cmd: &Command, e: std::io::Error) -> anyhow::Error {
    let program = cmd.get_program().to_string_lossy().into_owned();
    if e.kind() == std::io::ErrorKind::NotFound {
        let name = Path::new(&program)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| program.clone());
        let hint = match crate::debian_package(&name) {
            Some(package) => format!("install the Debian package {package}"),
            None => "install it or put it on PATH".to_owned(),
        };
        anyhow::Error::new(e).context(format!("{program} not found: {hint}"))
    } else {
        anyhow::Error::new(e).context(format!("starting {}", command_line(cmd)))
    }
}

/// The command line, shell-quoted enough to paste into a terminal for simple arguments.
pub fn command_line(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$\\*?;&|<>()".contains(c))
        {
            format!("'{}'", a.replace('\'', r"'\''"))
        } else {
            a.into_owned()
        }
    }));
    format!("`{}`", parts.join(" "))
}

fn quote_output(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim_end();
    if text.len() <= MAX_QUOTED_OUTPUT {
        return text.to_owned();
    }
    let mut start = text.len() - MAX_QUOTED_OUTPUT;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("[... {start} bytes cut ...]\n{}", &text[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_quotes_command_and_both_outputs() {
        let err = run(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`sh -c 'echo out; echo err >&2; exit 3'`"),
            "{err}"
        );
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(err.contains("out\n--- stderr ---\nerr"), "{err}");
    }

    #[test]
    fn missing_program_names_the_package() {
        let err = run(&mut Command::new("streamsnap-no-such-program")).unwrap_err();
        assert!(format!("{err:#}").contains("not found"), "{err:#}");
        assert_eq!(crate::debian_package("skopeo"), Some("skopeo"));
    }
}
