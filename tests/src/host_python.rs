//! A Python runtime layer made from the host's Debian Python (packages `python3.11-minimal`,
//! `libpython3.11-minimal`, `libpython3.11-stdlib`): the interpreter, its standard library and
//! every shared library they load, at the paths they have on the host (with the `/lib64` and
//! `/usr/lib64` symlinks of a merged-/usr Debian). On top of the busybox layer it runs
//! `python3 SCRIPT` in a container, so the demo and tests can start a real interpreter that
//! imports hundreds of modules: the start-up shape of real application images.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::targen::TarGen;

/// The Debian packages whose files make up the runtime.
pub const PACKAGES: &[&str] = &[
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
];
/// The interpreter, as the layer has it (`/usr/bin/python3` links to it).
pub const INTERPRETER: &str = "/usr/bin/python3.11";
/// Documentation and other files a container never reads.
const SKIPPED_PREFIXES: &[&str] = &[
    "/usr/share/doc/",
    "/usr/share/man/",
    "/usr/share/lintian/",
    "/usr/share/binfmts/",
    "/usr/share/applications/",
    "/usr/share/pixmaps/",
];

/// The uncompressed tar of the runtime layer. Fails with the package to install when the host has
/// no Debian Python 3.11.
pub fn python_layer() -> anyhow::Result<Vec<u8>> {
    let mut paths = BTreeSet::new();
    for package in PACKAGES {
        for path in package_files(package)? {
            if !SKIPPED_PREFIXES.iter().any(|p| path.starts_with(p)) {
                paths.insert(PathBuf::from(path));
            }
        }
    }
    // The shared libraries the interpreter and its extension modules load.
    let elves: Vec<PathBuf> = paths
        .iter()
        .filter(|p| p.starts_with("/usr/bin") || p.extension().is_some_and(|e| e == "so"))
        .cloned()
        .collect();
    for elf in elves {
        paths.extend(shared_libraries(&elf)?);
    }
    let mut tar = TarGen::new();
    let mut added = BTreeSet::new();
    for path in &paths {
        add_host_path(&mut tar, &mut added, path)?;
    }
    add_host_path(&mut tar, &mut added, Path::new("/usr/bin/python3"))?;
    Ok(tar.finish())
}

/// The regular files and symlinks `dpkg -L PACKAGE` lists.
fn package_files(package: &str) -> anyhow::Result<Vec<String>> {
    let output = Command::new("dpkg")
        .args(["-L", package])
        .output()
        .context("running dpkg -L")?;
    if !output.status.success() {
        bail!(
            "the Debian package {package} is not installed: apt-get install python3 ({})",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.starts_with('/'))
        .filter(|l| {
            fs::symlink_metadata(l).is_ok_and(|m| m.is_file() || m.file_type().is_symlink())
        })
        .map(str::to_owned)
        .collect())
}

/// The absolute paths `ldd FILE` resolves (the loader included); none for a file that is not a
/// dynamic ELF object. A library `ldd` cannot find is left out: the modules that need it fail to
/// import, as on a host without it.
fn shared_libraries(file: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(file)
        .output()
        .context("running ldd (Debian package libc-bin)")?;
    if !output.status.success() {
        return Ok(Vec::new());
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Adds `path` as the host has it: each directory on the way (once), each symlink on the way as
/// a symlink followed to its target, and the final file or symlink (a symlink's target too).
fn add_host_path(
    tar: &mut TarGen,
    added: &mut BTreeSet<PathBuf>,
    path: &Path,
) -> anyhow::Result<()> {
    let mut pending = vec![path.to_owned()];
    let mut hops = 0;
    while let Some(path) = pending.pop() {
        hops += 1;
        if hops > 64 {
            bail!("too many symlinks resolving {}", path.display());
        }
        let mut current = PathBuf::from("/");
        let components: Vec<Component> = path.components().skip(1).collect();
        for (i, component) in components.iter().enumerate() {
            current.push(component);
            let last = i + 1 == components.len();
            let meta = fs::symlink_metadata(&current)
                .with_context(|| format!("reading {}", current.display()))?;
            let name = current
                .strip_prefix("/")
                .expect("absolute")
                .to_string_lossy()
                .into_owned();
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&current)?;
                if added.insert(current.clone()) {
                    tar.symlink(&name, &target.to_string_lossy());
                }
                let resolved = current.parent().expect("not the root").join(&target);
                let rest: PathBuf = components[i + 1..].iter().collect();
                pending.push(normalize(&resolved.join(rest)));
                break;
            }
            if !added.insert(current.clone()) {
                continue;
            }
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                tar.dir(&name, mode);
            } else if last && meta.is_file() {
                let data =
                    fs::read(&current).with_context(|| format!("reading {}", current.display()))?;
                tar.file(&name, mode, &data);
            } else {
                bail!("{} is neither a directory nor a file", current.display());
            }
        }
    }
    Ok(())
}

/// `path` with `.` and `..` resolved lexically (symlinks were resolved by the caller).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => out.push(name),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_resolves_dots() {
        assert_eq!(
            normalize(Path::new("/usr/lib64/../lib/./x86_64-linux-gnu/libc.so.6")),
            PathBuf::from("/usr/lib/x86_64-linux-gnu/libc.so.6")
        );
    }

    #[test]
    fn layer_holds_the_interpreter_its_loader_and_the_stdlib() {
        let tar = python_layer().unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        let names: BTreeSet<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        for expected in [
            "usr/bin/python3.11",
            "usr/bin/python3",
            "usr/lib/python3.11/os.py",
            "usr/lib/python3.11/json/__init__.py",
            "lib64",
        ] {
            assert!(names.contains(expected), "{expected} missing");
        }
        assert!(
            names.iter().any(|n| n.contains("ld-linux-x86-64.so.2")),
            "no dynamic loader"
        );
        assert!(!names.iter().any(|n| n.starts_with("usr/share/doc/")));
    }
}
