//! Tools for checking Kubernetes manifests without a cluster or a helm binary:
//! - `helm-template` (the project's shared stand-in for `helm template`), built once per machine
//!   with its `build.sh` (Debian's Go packages) into `target/ci-tools/`;
//! - `kubernetes-validate` (PyPI, with the Kubernetes API schemas of every release), installed
//!   once into a virtualenv `target/ci-tools/kv-venv` made by Debian's python3 (python3-venv),
//!   whose PyYAML also turns YAML into JSON for the tests and whose jsonschema (a dependency of
//!   kubernetes-validate) checks chart values against `values.schema.json`, which
//!   helm-template does not.
//!
//! Both are set up on first use and reused after; a process-wide lock keeps parallel tests from
//! setting them up twice.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{Context, bail};

use crate::bins::run;

/// The kubernetes-validate release the checks run with (its schemas go up to Kubernetes 1.37).
pub const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

static SETUP: Mutex<()> = Mutex::new(());

/// The workspace root (the parent of this crate's dir).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the workspace")
        .to_owned()
}

fn tools_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("ci-tools")
}

/// The `helm-template` binary, built from `../shared/tools/helm-template` if needed.
pub fn helm_template() -> anyhow::Result<PathBuf> {
    let _guard = SETUP.lock().unwrap_or_else(|e| e.into_inner());
    // The workplace's shared tools sit beside the checkout; a CI clone elsewhere finds them at
    // the workplace's fixed path.
    let source = [
        workspace_root().join("../shared/tools/helm-template"),
        PathBuf::from("/work/shared/tools/helm-template"),
    ]
    .into_iter()
    .find(|dir| dir.join("main.go").is_file())
    .unwrap_or_else(|| workspace_root().join("../shared/tools/helm-template"));
    let binary = tools_dir().join("helm-template");
    let main_go = source.join("main.go");
    let stale = match (binary.metadata(), main_go.metadata()) {
        (Ok(bin), Ok(src)) => bin.modified()? < src.modified()?,
        (Ok(_), Err(_)) => false,
        (Err(_), _) => true,
    };
    if stale {
        if !main_go.is_file() {
            bail!(
                "{} not found: the shared tools dir must be beside the workspace (../shared)",
                main_go.display()
            );
        }
        std::fs::create_dir_all(tools_dir())?;
        run(Command::new("sh")
            .arg(source.join("build.sh"))
            .arg(&binary)
            .env("HOME", tools_dir()))
        .context("building helm-template (it installs Debian's Go packages if missing)")?;
    }
    Ok(binary)
}

/// The virtualenv holding kubernetes-validate and PyYAML, made if needed.
fn venv() -> anyhow::Result<PathBuf> {
    let _guard = SETUP.lock().unwrap_or_else(|e| e.into_inner());
    let venv = tools_dir().join("kv-venv");
    let stamp = venv.join(".installed");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == KUBERNETES_VALIDATE) {
        return Ok(venv);
    }
    std::fs::create_dir_all(tools_dir())?;
    let python = ["/usr/bin/python3", "python3"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .args(["-c", "import venv, ensurepip"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .context("no python3 with venv and ensurepip: install the Debian package python3-venv")?;
    run(Command::new(python)
        .args(["-m", "venv", "--clear"])
        .arg(&venv))
    .context("making the kubernetes-validate virtualenv")?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        KUBERNETES_VALIDATE,
    ]))
    .context("installing kubernetes-validate from PyPI")?;
    std::fs::write(&stamp, KUBERNETES_VALIDATE)?;
    Ok(venv)
}

/// The `kubernetes-validate` program.
pub fn kubernetes_validate() -> anyhow::Result<PathBuf> {
    Ok(venv()?.join("bin/kubernetes-validate"))
}

/// The venv's python running `script` on `input`: its stdout, or an error with `what` and
/// python's stderr.
fn python(script: &str, args: &[&str], input: &[u8], what: &str) -> anyhow::Result<Vec<u8>> {
    let mut child = Command::new(venv()?.join("bin/python"))
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the kubernetes-validate virtualenv's python")?;
    child
        .stdin
        .take()
        .context("python's stdin")?
        .write_all(input)?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(output.stdout)
}

/// Every document of a multi-document YAML text, as JSON (empty documents dropped).
pub fn yaml_documents(yaml: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let json = python(
        "import json, sys, yaml\n\
         docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]\n\
         json.dump(docs, sys.stdout)",
        &[],
        yaml.as_bytes(),
        "not valid YAML",
    )?;
    match serde_json::from_slice(&json)? {
        serde_json::Value::Array(docs) => Ok(docs),
        other => bail!("expected a list of documents, got {other}"),
    }
}

/// What JSON Schema draft 7 (the dialect of Helm's `values.schema.json`) finds wrong with
/// `values`: one `path: message` line per error, none when the values are valid. Fails if
/// `schema` is not a valid draft 7 schema.
pub fn schema_errors(
    schema: &serde_json::Value,
    values: &serde_json::Value,
) -> anyhow::Result<Vec<String>> {
    let input = serde_json::to_vec(&serde_json::json!({"schema": schema, "values": values}))?;
    let json = python(
        "import json, sys, jsonschema\n\
         given = json.load(sys.stdin)\n\
         jsonschema.Draft7Validator.check_schema(given['schema'])\n\
         validator = jsonschema.Draft7Validator(given['schema'])\n\
         errors = sorted(validator.iter_errors(given['values']), key=lambda e: list(map(str, e.absolute_path)))\n\
         json.dump(['/'.join(map(str, e.absolute_path)) + ': ' + e.message for e in errors], sys.stdout)",
        &[],
        &input,
        "checking values against the schema",
    )?;
    Ok(serde_json::from_slice(&json)?)
}

/// `helm-template streamsnap CHART --namespace streamsnap ARGS` (`--set`, `-f` ...): the
/// rendered manifests. Release and namespace are the names deploy/kubernetes uses.
pub fn render_chart_at(chart: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = run(Command::new(helm_template()?)
        .arg("streamsnap")
        .arg(chart)
        .args(["--namespace", "streamsnap"])
        .args(args))
    .with_context(|| format!("rendering {}", chart.display()))?;
    Ok(String::from_utf8(output.stdout)?)
}

/// helm/streamsnap rendered with `--set` each of `sets`.
pub fn render_chart(sets: &[&str]) -> anyhow::Result<String> {
    let args: Vec<&str> = sets.iter().flat_map(|set| ["--set", set]).collect();
    render_chart_at(&workspace_root().join("helm/streamsnap"), &args)
}

/// `kubernetes-validate --strict [-k VERSION] FILES` (the newest schemas without a version):
/// its output on success.
pub fn validate_manifests(version: Option<&str>, files: &[PathBuf]) -> anyhow::Result<String> {
    let mut cmd = Command::new(kubernetes_validate()?);
    cmd.arg("--strict");
    if let Some(v) = version {
        cmd.args(["-k", v]);
    }
    cmd.args(files);
    let output = run(&mut cmd)?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}
