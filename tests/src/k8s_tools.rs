//! Tools for checking Kubernetes manifests without a cluster or a helm binary:
//! - `helm-template` (the project's shared stand-in for `helm template`), built once per machine
//!   with its `build.sh` (Debian's Go packages) into `target/ci-tools/`;
//! - `kubernetes-validate` (PyPI, with the Kubernetes API schemas of every release), installed
//!   once into a virtualenv `target/ci-tools/kv-venv` made by Debian's python3 (python3-venv),
//!   whose PyYAML also turns YAML into JSON for the tests and whose jsonschema (a dependency of
//!   kubernetes-validate) checks chart values against `values.schema.json`, which
//!   helm-template does not.
//!
//! [`ChartUnderTest`] renders a copy of helm/streamsnap that also prints what helm-template does
//! not: the NOTES and the coalesced values.
//!
//! Both tools are set up on first use and reused after; a process-wide lock keeps parallel tests
//! from setting them up twice.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{Context, bail, ensure};

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

/// The ConfigMap [`ChartUnderTest`] adds to the output.
const PROBE: &str = "chart-under-test";

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// A copy of helm/streamsnap with a template that adds the ConfigMap `chart-under-test` to the
/// output: the NOTES (NOTES.txt's text, unchanged, as a `define`) and the values the templates
/// saw (values.yaml, `-f` files and `--set`s coalesced), which is what Helm checks against
/// values.schema.json.
#[derive(Debug)]
pub struct ChartUnderTest {
    dir: tempfile::TempDir,
}

/// One rendering of [`ChartUnderTest`].
#[derive(Debug)]
pub struct Rendered {
    /// The chart's own documents, without the probe.
    pub docs: Vec<serde_json::Value>,
    /// The NOTES, as `helm install` prints them.
    pub notes: String,
    /// The coalesced values, as Helm checks them against values.schema.json.
    pub values: serde_json::Value,
}

impl Rendered {
    /// The rendered object `kind`/`name`.
    pub fn object(&self, kind: &str, name: &str) -> anyhow::Result<&serde_json::Value> {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .with_context(|| format!("the chart renders no {kind}/{name}"))
    }

    /// The DaemonSet (release `streamsnap`).
    pub fn daemonset(&self) -> anyhow::Result<&serde_json::Value> {
        self.object("DaemonSet", "streamsnap")
    }

    /// The DaemonSet's container.
    pub fn container(&self) -> anyhow::Result<&serde_json::Value> {
        Ok(&self.daemonset()?["spec"]["template"]["spec"]["containers"][0])
    }

    /// The pod template's `checksum/config` annotation.
    pub fn checksum(&self) -> anyhow::Result<String> {
        self.daemonset()?["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            .as_str()
            .map(str::to_owned)
            .context("the pod template has no checksum/config annotation")
    }

    /// The chart's documents as one multi-document file for kubernetes-validate.
    pub fn write_manifests(&self, path: &Path) -> anyhow::Result<()> {
        let docs = self
            .docs
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()?;
        fs::write(path, docs.join("\n---\n"))?;
        Ok(())
    }
}

impl ChartUnderTest {
    /// Copies helm/streamsnap into a temporary directory and adds the probe template.
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let chart = dir.path().join("streamsnap");
        copy_dir(&workspace_root().join("helm/streamsnap"), &chart)?;
        let notes = fs::read_to_string(chart.join("templates/NOTES.txt"))?;
        fs::write(
            chart.join("templates/_chart_under_test.tpl"),
            format!("{{{{- define \"chart-under-test.notes\" -}}}}\n{notes}{{{{- end -}}}}\n"),
        )?;
        fs::write(
            chart.join("templates/chart-under-test.yaml"),
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {PROBE}\ndata:\n  \
                 notes: {{{{ include \"chart-under-test.notes\" . | toJson }}}}\n  \
                 values: {{{{ .Values | toJson | toJson }}}}\n"
            ),
        )?;
        Ok(Self { dir })
    }

    fn chart(&self) -> PathBuf {
        self.dir.path().join("streamsnap")
    }

    /// Renders with helm-template ARGS (`--set`, `-f` ...).
    pub fn render(&self, args: &[&str]) -> anyhow::Result<Rendered> {
        let text = render_chart_at(&self.chart(), args)?;
        let (probe, docs): (Vec<serde_json::Value>, Vec<serde_json::Value>) =
            yaml_documents(&text)?
                .into_iter()
                .partition(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == PROBE);
        let probe = probe.first().context("the probe ConfigMap is missing")?;
        let notes = probe["data"]["notes"]
            .as_str()
            .context("no notes in the probe")?
            .to_owned();
        let values = serde_json::from_str(
            probe["data"]["values"]
                .as_str()
                .context("no values in the probe")?,
        )?;
        Ok(Rendered {
            docs,
            notes,
            values,
        })
    }

    /// Renders with `--set` each of `sets`.
    pub fn render_set(&self, sets: &[&str]) -> anyhow::Result<Rendered> {
        let args: Vec<&str> = sets.iter().flat_map(|set| ["--set", set]).collect();
        self.render(&args)
    }

    /// Renders with the values file `yaml`.
    pub fn render_file(&self, yaml: &str) -> anyhow::Result<Rendered> {
        let path = self.dir.path().join("values-under-test.yaml");
        fs::write(&path, yaml)?;
        self.render(&["-f", &path.to_string_lossy()])
    }
}

/// The manifests in deploy/kubernetes, in the order `kubectl apply -f` takes them.
pub fn deploy_manifests() -> anyhow::Result<Vec<PathBuf>> {
    let dir = workspace_root().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    ensure!(!files.is_empty(), "no manifests in {}", dir.display());
    Ok(files)
}

/// Walks a JSON schema's properties: for each, its path (`a/b`; `items` for list items, `*`
/// for map values) and its schema.
pub fn schema_nodes<'a>(
    path: &str,
    node: &'a serde_json::Value,
    out: &mut Vec<(String, &'a serde_json::Value)>,
) {
    out.push((path.to_owned(), node));
    let join = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}/{key}")
        }
    };
    if let Some(properties) = node["properties"].as_object() {
        for (key, child) in properties {
            schema_nodes(&join(key), child, out);
        }
    }
    if node["items"].is_object() {
        schema_nodes(&join("items"), &node["items"], out);
    }
    if node["additionalProperties"].is_object() {
        schema_nodes(&join("*"), &node["additionalProperties"], out);
    }
}

/// The `type` of a schema node: one or several names.
pub fn types(node: &serde_json::Value) -> Vec<&str> {
    match &node["type"] {
        serde_json::Value::String(t) => vec![t.as_str()],
        serde_json::Value::Array(ts) => ts.iter().filter_map(serde_json::Value::as_str).collect(),
        _ => Vec::new(),
    }
}
