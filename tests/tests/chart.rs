//! The Helm chart (helm/streamsnap) and the plain manifests (deploy/kubernetes): both validate
//! against the Kubernetes 1.26 and newest API schemas (kubernetes-validate) and describe the same
//! objects; values.schema.json types every value and refuses keys it does not know (checked with
//! Python's jsonschema on the values helm-template coalesces, as Helm does; helm-template itself
//! does not validate); the update strategy, the config checksum, the pod values, templates that
//! take null for every optional value, and NOTES whose health check needs nothing in the image.
//! The conversion service's part (off by default) and its own plain manifests:
//! `conversion_service`.
//!
//! helm-template renders NOTES.txt but does not print it, and prints no values: the tests render a
//! copy of the chart with one more template that puts both into the output ([`ChartUnderTest`]).
//!
//! The workspace binaries must be built first (the daemon is started on the config the chart
//! renders): `cargo build --workspace --bins`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};
use streamsnap_e2e::k8s_tools::{
    ChartUnderTest, deploy_manifests, render_chart, schema_errors, schema_nodes, types,
    validate_manifests, workspace_root, yaml_documents,
};
use streamsnap_e2e::{http, sys, workspace_bin};

#[path = "chart/conversion_service.rs"]
mod conversion_service;

const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);
/// The Pod Security admission label deploy/kubernetes/00-namespace.yaml sets.
const PSA_LABEL: &str = "pod-security.kubernetes.io/enforce";

fn wait_for(what: &str, mut done: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    while !done()? {
        ensure!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        thread::sleep(POLL);
    }
    Ok(())
}

fn chart_dir() -> PathBuf {
    workspace_root().join("helm/streamsnap")
}

fn schema() -> anyhow::Result<Value> {
    let path = chart_dir().join("values.schema.json");
    serde_json::from_slice(&fs::read(&path)?).with_context(|| format!("parsing {}", path.display()))
}

fn deploy_object(kind: &str) -> anyhow::Result<Value> {
    for file in deploy_manifests()? {
        for doc in yaml_documents(&fs::read_to_string(&file)?)? {
            if doc["kind"] == kind {
                return Ok(doc);
            }
        }
    }
    bail!("deploy/kubernetes has no {kind}")
}

/// Labels only a Helm release has.
const HELM_ONLY_LABELS: [&str; 2] = ["helm.sh/chart", "app.kubernetes.io/managed-by"];
/// Pod annotations only the chart has: Helm computes them.
const HELM_ONLY_POD_ANNOTATIONS: [&str; 1] = ["checksum/config"];

fn by_kind_and_name(docs: Vec<Value>) -> anyhow::Result<BTreeMap<(String, String), Value>> {
    let mut objects = BTreeMap::new();
    for mut doc in docs {
        if let Some(labels) = doc
            .pointer_mut("/metadata/labels")
            .and_then(|l| l.as_object_mut())
        {
            for label in HELM_ONLY_LABELS {
                labels.remove(label);
            }
        }
        if let Some(metadata) = doc
            .pointer_mut("/spec/template/metadata")
            .and_then(|m| m.as_object_mut())
        {
            if let Some(annotations) = metadata
                .get_mut("annotations")
                .and_then(|a| a.as_object_mut())
            {
                for annotation in HELM_ONLY_POD_ANNOTATIONS {
                    annotations.remove(annotation);
                }
            }
            if metadata
                .get("annotations")
                .and_then(|a| a.as_object())
                .is_some_and(|a| a.is_empty())
            {
                metadata.remove("annotations");
            }
        }
        let kind = doc["kind"]
            .as_str()
            .context("a document without kind")?
            .to_owned();
        let name = doc["metadata"]["name"]
            .as_str()
            .context("a document without name")?
            .to_owned();
        ensure!(
            objects.insert((kind.clone(), name.clone()), doc).is_none(),
            "{kind}/{name} twice"
        );
    }
    Ok(objects)
}

/// Acceptance 2 of issue 7: every manifest in deploy/kubernetes and every template of the chart
/// rendered with default values validates against the Kubernetes 1.26 and newest schemas, and
/// the two describe the same objects. With every option on, the chart is still valid and the
/// daemon takes the config file it renders.
#[test]
fn manifests_and_chart_validate_against_kubernetes_1_26_and_newest_and_agree() -> anyhow::Result<()>
{
    let rendered = render_chart(&[])?;
    let dir = tempfile::tempdir()?;
    let rendered_path = dir.path().join("chart.yaml");
    fs::write(&rendered_path, &rendered)?;
    let mut files = deploy_manifests()?;
    files.push(rendered_path.clone());
    for version in [Some("1.26.0"), None] {
        let said = validate_manifests(version, &files)
            .with_context(|| format!("validating against {}", version.unwrap_or("the newest")))?;
        for object in ["daemonset/streamsnap", "service/streamsnap-metrics"] {
            ensure!(
                said.contains(&format!("passed for resource {object}")),
                "{said}"
            );
        }
        let against = said
            .split("against version ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or("?");
        eprintln!(
            "validated against Kubernetes {against} ({}): {} resources",
            version.unwrap_or("the newest schemas"),
            said.matches("passed for resource").count()
        );
    }
    // The check can fail: a DaemonSet with a field the API does not have.
    let broken = dir.path().join("broken.yaml");
    fs::write(
        &broken,
        fs::read_to_string(workspace_root().join("deploy/kubernetes/30-daemonset.yaml"))?
            .replace("hostPID: true", "hostPID: true\n      hostFuse: true"),
    )?;
    ensure!(
        validate_manifests(Some("1.26.0"), &[broken]).is_err(),
        "an unknown field passed validation"
    );

    // deploy/kubernetes and the chart with default values: the same objects, except the
    // Namespace (made beforehand on the Helm path, docs/deploy.md), the dashboard (chart only)
    // and what Helm computes (labels naming the chart, the config checksum).
    let mut deploy_docs = Vec::new();
    for file in deploy_manifests()? {
        deploy_docs.extend(yaml_documents(&fs::read_to_string(&file)?)?);
    }
    let deploy = by_kind_and_name(deploy_docs)?;
    let chart_docs = yaml_documents(&rendered)?;
    ensure!(
        chart_docs.iter().any(|d| d["kind"] == "DaemonSet"
            && d["spec"]["template"]["metadata"]["annotations"]["checksum/config"].is_string()),
        "the chart's DaemonSet has no checksum/config annotation"
    );
    let chart = by_kind_and_name(chart_docs)?;
    let key = |k: &str, n: &str| (k.to_owned(), n.to_owned());
    for ((kind, name), object) in &deploy {
        if kind == "Namespace" {
            continue;
        }
        let Some(from_chart) = chart.get(&key(kind, name)) else {
            bail!("deploy/kubernetes has {kind}/{name}, the chart does not");
        };
        ensure!(
            object == from_chart,
            "{kind}/{name} differs:\n--- deploy/kubernetes ---\n{}\n--- chart ---\n{}",
            serde_json::to_string_pretty(object)?,
            serde_json::to_string_pretty(from_chart)?
        );
    }
    for (kind, name) in chart.keys() {
        ensure!(
            deploy.contains_key(&key(kind, name))
                || (kind == "ConfigMap" && name == "streamsnap-dashboard"),
            "the chart renders {kind}/{name}, deploy/kubernetes does not"
        );
    }
    // The namespace the docs have Helm users apply first: the one the objects are in, labelled
    // for the privileged pods.
    let namespace = deploy
        .get(&key("Namespace", "streamsnap"))
        .context("deploy/kubernetes has no Namespace streamsnap")?;
    ensure!(
        namespace["metadata"]["labels"][PSA_LABEL] == "privileged",
        "{namespace}"
    );

    // Every option on: still valid, and the daemon takes the config file it renders.
    let under_test = ChartUnderTest::new()?;
    let options = dir.path().join("options.yaml");
    fs::write(
        &options,
        serde_json::to_string(&json!({
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%"}},
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "agentpool", "operator": "In", "values": ["streaming"]}
                ]}]
            }}},
            "podLabels": {"team": "platform"},
            "podAnnotations": {"example.com/owner": "platform"},
            "extraEnv": [
                {"name": "RUST_BACKTRACE", "value": "1"},
                {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
            ],
            "extraArgs": ["--disarm-after", "120"],
            "tolerations": [{"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
        }))?,
    )?;
    let options = options.to_string_lossy().into_owned();
    let full = under_test.render(&[
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "credentials.existingSecret=regcred",
        "--set",
        "registry.plainHttp={registry.local:5000}",
        "--set",
        "registry.hosts.registry\\.example\\.com.mirrors={mirror.local:5000}",
        "--set",
        "registry.hosts.registry\\.example\\.com.plainHttp=false",
        "--set",
        "backgroundFetch.enabled=true",
        "--set",
        "imagePullSecrets[0].name=pull",
        "-f",
        &options,
    ])?;
    let errors = schema_errors(&schema()?, &full.values)?;
    ensure!(errors.is_empty(), "every option on: {errors:?}");
    let builtin: Vec<&Value> = full
        .docs
        .iter()
        .filter(|d| {
            !d["apiVersion"]
                .as_str()
                .unwrap_or("")
                .starts_with("monitoring.coreos.com")
        })
        .collect();
    ensure!(
        builtin.len() + 2 == full.docs.len(),
        "ServiceMonitor or PrometheusRule missing"
    );
    let full_path = dir.path().join("full.yaml");
    fs::write(
        &full_path,
        builtin
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()?
            .join("\n---\n"),
    )?;
    validate_manifests(Some("1.26.0"), std::slice::from_ref(&full_path))?;
    validate_manifests(None, &[full_path])?;
    let config_toml = full
        .object("ConfigMap", "streamsnap-config")?
        .pointer("/data/config.toml")
        .and_then(Value::as_str)
        .context("no daemon config in the chart")?;
    ensure!(
        config_toml.contains("mirrors = [\"mirror.local:5000\"]"),
        "{config_toml}"
    );
    daemon_serves_config(config_toml, dir.path(), None).map(|_| ())
}

/// Starts the real daemon on `config` (the credentials path moved into `dir`) and checks it
/// serves, i.e. it accepted every key; with `probe`, GETs that path from its metrics address
/// and returns the answer.
fn daemon_serves_config(
    config: &str,
    dir: &Path,
    probe: Option<&str>,
) -> anyhow::Result<Option<http::Response>> {
    let docker_config = dir.join("docker-config.json");
    fs::write(&docker_config, "{\"auths\": {}}")?;
    let config = config.replace(
        "/etc/streamsnap/credentials/config.json",
        &docker_config.to_string_lossy(),
    );
    let config_path = dir.join("config.toml");
    fs::write(&config_path, config)?;
    let socket = dir.join("s.sock");
    let root = dir.join("root");
    let metrics = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?.to_string()
    };
    let mut daemon = Command::new(workspace_bin("streamsnap-snapshotterd")?)
        .arg("--config")
        .arg(&config_path)
        .arg("--address")
        .arg(&socket)
        .arg("--root")
        .arg(&root)
        .args(["--metrics-address", &metrics])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let served = wait_for("the daemon serving on the chart's config", || {
        if let Some(status) = daemon.try_wait()? {
            let mut stderr = String::new();
            if let Some(mut pipe) = daemon.stderr.take() {
                use std::io::Read;
                let _ = pipe.read_to_string(&mut stderr);
            }
            bail!("the daemon refused the chart's config ({status}): {stderr}");
        }
        Ok(UnixStream::connect(&socket).is_ok())
    })
    .and_then(|()| match probe {
        None => Ok(None),
        Some(path) => {
            let mut answer = None;
            wait_for("the daemon answering on its metrics address", || {
                answer = http::get(&metrics, path, &[]).ok();
                Ok(answer.as_ref().is_some_and(|r| r.status == 200))
            })?;
            Ok(answer)
        }
    });
    sys::signal(i32::try_from(daemon.id())?, libc::SIGTERM);
    let _ = daemon.wait();
    // The FUSE holder the daemon started outlives it by design: stop it too.
    let needle = format!("{}/", dir.display());
    let left: Vec<i32> = sys::processes_mentioning(&needle)
        .iter()
        .map(|p| p.pid)
        .collect();
    sys::kill_and_wait(&left, Duration::from_secs(5));
    for (path, e) in sys::unmount_all_under(&root) {
        eprintln!("warning: cannot unmount {}: {e}", path.display());
    }
    served
}

// ---------------------------------------------------------------------------------------------
// values.schema.json

/// Kubernetes objects the chart passes through unchanged: the API server checks them.
const KUBERNETES_OBJECTS: [&str; 5] = [
    "affinity",
    "resources",
    "conversionService/resources",
    "tolerations/items",
    "extraEnv/items/valueFrom",
];

/// The examples in values.yaml: the comment lines after a line ending in "e.g.", uncommented.
fn values_yaml_examples(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut examples = Vec::new();
    for (at, line) in lines.iter().enumerate() {
        if !(line.trim_start().starts_with('#') && line.trim_end().ends_with("e.g.")) {
            continue;
        }
        let prefix = format!("{}#   ", &line[..line.len() - line.trim_start().len()]);
        let example: Vec<&str> = lines[at + 1..]
            .iter()
            .map_while(|l| l.strip_prefix(prefix.as_str()))
            .collect();
        examples.push(example.join("\n") + "\n");
    }
    examples
}

/// Every `--set VALUE` in docs/deploy.md (code blocks and inline), quotes removed.
fn documented_sets(text: &str) -> Vec<String> {
    let mut sets = Vec::new();
    let mut words = text.split([' ', '\n', '`']).filter(|w| !w.is_empty());
    while let Some(word) = words.next() {
        if word == "--set"
            && let Some(value) = words.next()
        {
            sets.push(value.trim_matches(['\'', '"']).to_owned());
        }
    }
    sets
}

/// Helm's values.schema.json for the chart: draft 7, a type for every value, no object without
/// `additionalProperties: false` except maps and Kubernetes' own objects; values.yaml and every
/// documented example pass (values.yaml's examples, the `--set`s of docs/deploy.md), typos and
/// wrong types do not.
#[test]
fn values_schema_types_every_value_and_refuses_unknown_keys() -> anyhow::Result<()> {
    let schema = schema()?;
    ensure!(
        schema["$schema"] == "http://json-schema.org/draft-07/schema#",
        "values.schema.json does not declare draft 7: {}",
        schema["$schema"]
    );
    let mut nodes = Vec::new();
    schema_nodes("", &schema, &mut nodes);
    for (path, node) in &nodes {
        let types = types(node);
        ensure!(!types.is_empty(), "{path:?} has no type");
        if types.contains(&"object") {
            let closed = node["additionalProperties"] == false && node["properties"].is_object();
            let map = node["additionalProperties"].is_object() && node["properties"].is_null();
            ensure!(
                closed || map || KUBERNETES_OBJECTS.contains(&path.as_str()),
                "{path:?} is an object that takes unknown keys"
            );
        }
    }
    eprintln!("{} values typed", nodes.len());

    // values.yaml itself, as a file and as the templates see it.
    let values_yaml = fs::read_to_string(chart_dir().join("values.yaml"))?;
    let defaults = yaml_documents(&values_yaml)?
        .pop()
        .context("values.yaml is empty")?;
    let errors = schema_errors(&schema, &defaults)?;
    ensure!(errors.is_empty(), "values.yaml: {errors:?}");
    let under_test = ChartUnderTest::new()?;
    let rendered = under_test.render(&[])?;
    ensure!(
        rendered.values == defaults,
        "the templates see other values than values.yaml:\n{}",
        serde_json::to_string_pretty(&rendered.values)?
    );

    // values.yaml's examples: each a whole values file that renders, passes the schema and
    // validates against Kubernetes 1.26.
    let examples = values_yaml_examples(&values_yaml);
    let announced = values_yaml
        .lines()
        .filter(|l| l.trim_end().ends_with("e.g."))
        .count();
    ensure!(
        examples.len() == announced && examples.len() >= 5,
        "{} examples in values.yaml: {examples:#?}",
        examples.len()
    );
    let dir = tempfile::tempdir()?;
    let mut manifests = Vec::new();
    for (i, example) in examples.iter().enumerate() {
        let given = yaml_documents(example)?;
        ensure!(
            given.len() == 1 && given[0].is_object(),
            "the example is not a values file:\n{example}"
        );
        let rendered = under_test
            .render_file(example)
            .with_context(|| format!("rendering the example\n{example}"))?;
        let errors = schema_errors(&schema, &rendered.values)?;
        ensure!(errors.is_empty(), "the example\n{example}: {errors:?}");
        let path = dir.path().join(format!("example-{i}.yaml"));
        rendered.write_manifests(&path)?;
        manifests.push(path);
    }
    validate_manifests(Some("1.26.0"), &manifests)?;

    // docs/deploy.md's `--set`s, each on its own.
    let docs = fs::read_to_string(workspace_root().join("docs/deploy.md"))?;
    let sets = documented_sets(&docs);
    ensure!(sets.len() >= 8, "--set in docs/deploy.md: {sets:?}");
    for set in &sets {
        let rendered = under_test.render_set(&[set])?;
        let errors = schema_errors(&schema, &rendered.values)?;
        ensure!(
            errors.is_empty(),
            "docs/deploy.md's --set {set}: {errors:?}"
        );
    }
    eprintln!(
        "{} examples in values.yaml and {} --set in docs/deploy.md pass",
        examples.len(),
        sets.len()
    );

    // Typos and wrong types: the templates render them (helm-template does not validate), the
    // schema refuses each and names the key.
    for (set, named) in [
        ("nodeSelectr.kubernetes\\.io/os=linux", "nodeSelectr"),
        ("image.tga=0.2.0", "tga"),
        ("metrics.serviceMonitor.enabeld=true", "enabeld"),
        ("updateStrategy.type=Rollingupdate", "Rollingupdate"),
        ("updateStrategy.rollingUpdate.maxSurge=1", "maxSurge"),
        ("cache.maxSizeBytes=10GiB", "10GiB"),
        ("podLabels.team=1", "podLabels/team"),
        (
            "podLabels.app\\.kubernetes\\.io/name=other",
            "app.kubernetes.io/name",
        ),
        ("extraEnv[0].value=1", "name"),
        ("metrics.port=0", "metrics/port"),
    ] {
        let rendered = under_test.render_set(&[set])?;
        let errors = schema_errors(&schema, &rendered.values)?;
        ensure!(
            errors.iter().any(|e| e.contains(named)),
            "--set {set}: the schema does not refuse {named}: {errors:?}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// What the chart renders

/// The DaemonSet is OnDelete unless RollingUpdate is asked for (with maxUnavailable, 1 by
/// default); the plain manifests agree; docs/deploy.md has the procedure the NOTES point to.
#[test]
fn update_strategy_is_on_delete_unless_rolling_update_is_asked_for() -> anyhow::Result<()> {
    let chart = ChartUnderTest::new()?;
    let strategy = |sets: &[&str]| -> anyhow::Result<(Value, String)> {
        let rendered = chart.render_set(sets)?;
        Ok((
            rendered.daemonset()?["spec"]["updateStrategy"].clone(),
            rendered.notes,
        ))
    };
    let (default, notes) = strategy(&[])?;
    ensure!(default == json!({"type": "OnDelete"}), "{default}");
    ensure!(
        notes.contains("updateStrategy OnDelete") && notes.contains("\"Upgrading\""),
        "{notes}"
    );
    let (absent, _) = strategy(&["updateStrategy=null"])?;
    ensure!(absent == json!({"type": "OnDelete"}), "{absent}");
    let (rolling, notes) = strategy(&["updateStrategy.type=RollingUpdate"])?;
    ensure!(
        rolling == json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}),
        "{rolling}"
    );
    ensure!(notes.contains("updateStrategy RollingUpdate"), "{notes}");
    for (given, expected) in [("25%", json!("25%")), ("2", json!(2))] {
        let (rolling, _) = strategy(&[
            "updateStrategy.type=RollingUpdate",
            &format!("updateStrategy.rollingUpdate.maxUnavailable={given}"),
        ])?;
        ensure!(
            rolling["rollingUpdate"]["maxUnavailable"] == expected,
            "{rolling}"
        );
    }
    let plain = deploy_object("DaemonSet")?;
    ensure!(
        plain["spec"]["updateStrategy"] == json!({"type": "OnDelete"}),
        "deploy/kubernetes: {}",
        plain["spec"]["updateStrategy"]
    );
    let docs = fs::read_to_string(workspace_root().join("docs/deploy.md"))?;
    let upgrading = docs
        .split("\n## Upgrading\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .context("docs/deploy.md has no \"Upgrading\" section")?;
    for step in [
        "helm upgrade",
        "kubectl drain NODE",
        "delete pod",
        "kubectl uncordon NODE",
        "updateStrategy.type=RollingUpdate",
        "maxUnavailable",
    ] {
        ensure!(
            upgrading.contains(step),
            "docs/deploy.md's \"Upgrading\" does not say {step:?}"
        );
    }
    Ok(())
}

/// The pods carry a digest of the rendered config: it changes with every config value and with
/// nothing else, and podAnnotations cannot replace it.
#[test]
fn config_checksum_follows_the_config_and_nothing_else() -> anyhow::Result<()> {
    let chart = ChartUnderTest::new()?;
    let base = chart.render_set(&[])?.checksum()?;
    ensure!(
        base.len() == 64 && base.chars().all(|c| c.is_ascii_hexdigit()),
        "not a sha256: {base}"
    );
    for set in [
        "cache.maxSizeBytes=1073741824",
        "backgroundFetch.enabled=true",
        "registry.plainHttp={registry.local:5000}",
        "credentials.existingSecret=regcred",
        "extraConfig=[fuse]",
    ] {
        let rendered = chart.render_set(&[set])?;
        ensure!(
            rendered.checksum()? != base,
            "--set {set} changed the config but not the checksum"
        );
    }
    for set in [
        "logLevel=debug",
        "image.tag=9.9.9",
        "nodeSelector=null",
        "podAnnotations.example\\.com/owner=platform",
        "podAnnotations.checksum/config=forged",
    ] {
        let rendered = chart.render_set(&[set])?;
        ensure!(
            rendered.checksum()? == base,
            "--set {set} changed the checksum"
        );
    }
    let rendered = chart.render_set(&["podAnnotations.example\\.com/owner=platform"])?;
    let annotations = &rendered.daemonset()?["spec"]["template"]["metadata"]["annotations"];
    ensure!(
        annotations["example.com/owner"] == "platform",
        "{annotations}"
    );
    Ok(())
}

/// podLabels, affinity, extraEnv and extraArgs land where the values say, and cannot change the
/// labels the DaemonSet selects its pods by.
#[test]
fn pod_values_reach_the_pod() -> anyhow::Result<()> {
    let chart = ChartUnderTest::new()?;
    let affinity = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "agentpool", "operator": "In", "values": ["streaming"]}
        ]}]
    }}});
    let env = json!([
        {"name": "RUST_BACKTRACE", "value": "1"},
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
    ]);
    let rendered = chart.render_file(&serde_json::to_string(&json!({
        "podLabels": {"team": "platform", "app.kubernetes.io/instance": "other"},
        "affinity": affinity,
        "extraEnv": env,
        "extraArgs": ["--disarm-after", 120],
    }))?)?;
    let daemonset = rendered.daemonset()?;
    let pod = &daemonset["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    ensure!(labels["team"] == "platform", "{labels}");
    for (key, value) in daemonset["spec"]["selector"]["matchLabels"]
        .as_object()
        .context("no selector")?
    {
        ensure!(
            &labels[key] == value,
            "pod label {key}: {} (the selector wants {value})",
            labels[key]
        );
    }
    ensure!(
        pod["spec"]["affinity"] == affinity,
        "{}",
        pod["spec"]["affinity"]
    );
    let container = rendered.container()?;
    let got_env = container["env"].as_array().context("no env")?;
    ensure!(
        got_env.len() == 3
            && got_env[0]["name"] == "STREAMSNAP_LOG"
            && Value::Array(got_env[1..].to_vec()) == env,
        "{}",
        container["env"]
    );
    let command: Vec<&str> = container["command"]
        .as_array()
        .context("no command")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let split = command
        .iter()
        .position(|a| *a == "--")
        .context("no -- in the command")?;
    ensure!(
        command[..split].ends_with(&["--disarm-after", "120"])
            && command[1..3] == ["node", "run"]
            && !command[split..].contains(&"--disarm-after"),
        "{command:?}"
    );
    Ok(())
}

/// Every value the schema lets be null renders (manifests and NOTES) when it is null, one at a
/// time and all together, and the result still validates against Kubernetes 1.26.
#[test]
fn every_optional_value_may_be_null() -> anyhow::Result<()> {
    let schema = schema()?;
    let mut nodes = Vec::new();
    schema_nodes("", &schema, &mut nodes);
    let nullable: Vec<String> = nodes
        .iter()
        .filter(|(path, _)| !path.contains('*') && !path.contains("items"))
        .filter(|(_, node)| types(node).contains(&"null"))
        .map(|(path, _)| path.replace('/', "."))
        .collect();
    for expected in [
        "nodeSelector",
        "tolerations",
        "affinity",
        "podLabels",
        "extraEnv",
    ] {
        ensure!(
            nullable.iter().any(|n| n == expected),
            "the schema does not let {expected} be null: {nullable:?}"
        );
    }
    let chart = ChartUnderTest::new()?;
    let dir = tempfile::tempdir()?;
    let mut sets = Vec::new();
    for path in &nullable {
        let set = format!("{path}=null");
        let rendered = chart
            .render_set(&[&set])
            .with_context(|| format!("--set {set}"))?;
        ensure!(
            rendered.notes.contains("streamsnap runs as DaemonSet"),
            "--set {set}: {}",
            rendered.notes
        );
        let errors = schema_errors(&schema, &rendered.values)?;
        ensure!(errors.is_empty(), "--set {set}: {errors:?}");
        sets.push(set);
    }
    let set_refs: Vec<&str> = sets.iter().map(String::as_str).collect();
    let all = chart
        .render_set(&set_refs)
        .with_context(|| format!("--set {sets:?}"))?;
    let path = dir.path().join("nulls.yaml");
    all.write_manifests(&path)?;
    validate_manifests(Some("1.26.0"), &[path])?;
    ensure!(
        !all.notes.contains("labelled"),
        "no nodeSelector, yet the notes name labels: {}",
        all.notes
    );
    eprintln!("null renders for {}: {nullable:?}", nullable.len());
    Ok(())
}

/// The NOTES' health check asks the API server's pod proxy for the daemon's /healthz on the
/// port the pod serves metrics on (nothing runs inside the image, which has no wget), picks pods
/// by the DaemonSet's own selector, and the real daemon answers that path with "ok"; the
/// Pod Security label command is the label deploy/kubernetes/00-namespace.yaml sets.
#[test]
fn notes_give_a_health_check_that_needs_nothing_in_the_image() -> anyhow::Result<()> {
    let chart = ChartUnderTest::new()?;
    let mut health_paths = BTreeSet::new();
    for port in [9464, 9500] {
        let rendered = chart.render_set(&[&format!("metrics.port={port}")])?;
        let notes = &rendered.notes;
        for absent in ["wget", " exec ", "rollout status"] {
            ensure!(
                !notes.contains(absent),
                "the notes say {absent:?}:\n{notes}"
            );
        }
        let container = rendered.container()?;
        let probe_path = container["readinessProbe"]["httpGet"]["path"]
            .as_str()
            .context("no readiness probe")?;
        ensure!(
            container["ports"][0]["name"] == "metrics"
                && container["ports"][0]["containerPort"] == port,
            "{}",
            container["ports"]
        );
        let health =
            format!("kubectl get --raw \"/api/v1/namespaces/streamsnap/pods/POD:{port}/proxy");
        let path = notes
            .split(&health)
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .with_context(|| format!("the notes have no {health}...:\n{notes}"))?;
        ensure!(path == probe_path, "{path} is not the probe's {probe_path}");
        health_paths.insert(path.to_owned());
        ensure!(
            notes.contains(&format!("port-forward pod/POD {port}"))
                && notes.contains(&format!("http://127.0.0.1:{port}{probe_path}")),
            "{notes}"
        );
        let selector = notes
            .split("get pods -l ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .context("the notes list no pods")?;
        let wanted: BTreeSet<String> = rendered.daemonset()?["spec"]["selector"]["matchLabels"]
            .as_object()
            .context("no selector")?
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect();
        let given: BTreeSet<String> = selector.split(',').map(str::to_owned).collect();
        ensure!(
            given == wanted,
            "the notes select {given:?}, the DaemonSet {wanted:?}"
        );
        ensure!(
            notes.contains("labelled kubernetes.io/arch=amd64, kubernetes.io/os=linux"),
            "{notes}"
        );
    }

    let rendered = chart.render_set(&[])?;
    let namespace = deploy_object("Namespace")?;
    let label = format!(
        "{PSA_LABEL}={}",
        namespace["metadata"]["labels"][PSA_LABEL]
            .as_str()
            .context("00-namespace.yaml has no Pod Security label")?
    );
    ensure!(
        rendered
            .notes
            .contains(&format!("kubectl label namespace streamsnap {label}")),
        "the notes do not give the label of 00-namespace.yaml ({label}):\n{}",
        rendered.notes
    );

    // The path the notes ask for, on the real daemon running the chart's config.
    let config = rendered
        .object("ConfigMap", "streamsnap-config")?
        .pointer("/data/config.toml")
        .and_then(Value::as_str)
        .context("no daemon config in the chart")?;
    let [path] = Vec::from_iter(health_paths)
        .try_into()
        .map_err(|paths| anyhow::anyhow!("the notes ask for several paths: {paths:?}"))?;
    let dir = tempfile::tempdir()?;
    let answer = daemon_serves_config(config, dir.path(), Some(&path))?
        .with_context(|| format!("no answer from {path}"))?;
    ensure!(
        answer.body == b"ok\n",
        "{path}: {}",
        String::from_utf8_lossy(&answer.body)
    );
    Ok(())
}

/// `verify.publicKeys`: the keys land in the ConfigMap, `[verify]` names them where the pod
/// mounts it, and the real daemon starts on that config with those keys (it refuses a key it
/// cannot read or parse).
#[test]
fn verify_public_keys_reach_the_daemon() -> anyhow::Result<()> {
    streamsnap_e2e::require_root()?;
    let key =
        fs::read_to_string(workspace_root().join("snapshotter/trust/tests/data/test-key.pub"))?;
    let indented: String = key.lines().map(|l| format!("      {l}\n")).collect();
    let chart = ChartUnderTest::new()?;
    let rendered = chart.render_file(&format!("verify:\n  publicKeys:\n    - |\n{indented}"))?;
    let config = rendered.object("ConfigMap", "streamsnap-config")?;
    let toml = config
        .pointer("/data/config.toml")
        .and_then(Value::as_str)
        .context("no daemon config")?;
    ensure!(
        toml.contains("[verify]\npublic_keys = [\"/etc/streamsnap/verify-key-0.pub\"]"),
        "{toml}"
    );
    let shipped = config
        .pointer("/data/verify-key-0.pub")
        .and_then(Value::as_str)
        .context("the key is not in the ConfigMap")?;
    ensure!(
        shipped.trim() == key.trim(),
        "the key changed on the way: {shipped}"
    );
    let dir = tempfile::tempdir()?;
    let key_path = dir.path().join("verify-key-0.pub");
    fs::write(&key_path, shipped)?;
    let toml = toml.replace(
        "/etc/streamsnap/verify-key-0.pub",
        &key_path.to_string_lossy(),
    );
    daemon_serves_config(&toml, dir.path(), None)?;
    // Without keys, no [verify] section at all.
    let plain = chart.render_file("verify:\n  publicKeys: []\n")?;
    let toml = plain
        .object("ConfigMap", "streamsnap-config")?
        .pointer("/data/config.toml")
        .and_then(Value::as_str)
        .context("no daemon config")?;
    ensure!(!toml.contains("[verify]"), "{toml}");
    Ok(())
}

/// `credentialProviders` mounts the kubelet's plugin config, bin dir and the files the plugins
/// read, read-only at their host paths, and passes the kubelet's flags to the daemon;
/// `criProxy.enabled` turns on `[cri_proxy]` on the socket dir the node shares. Both render and
/// validate against 1.26.
#[test]
fn private_registry_values_reach_the_pod_and_the_config() -> anyhow::Result<()> {
    let chart = ChartUnderTest::new()?;
    let rendered = chart.render_file(
        "credentialProviders:\n  config: /var/lib/kubelet/credential-provider-config.yaml\n  \
         binDir: /var/lib/kubelet/credential-provider\n  hostPaths: [/etc/kubernetes/azure.json]\n\
         criProxy:\n  enabled: true\n",
    )?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("chart.yaml");
    rendered.write_manifests(&path)?;
    validate_manifests(Some("1.26.0"), std::slice::from_ref(&path))?;
    let container = rendered.container()?;
    let command: Vec<&str> = container["command"]
        .as_array()
        .context("no command")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let daemon = command
        .iter()
        .position(|a| a.ends_with("streamsnap-snapshotterd"))
        .context("no daemon in the command")?;
    let flag = |name: &str| {
        command[daemon..]
            .windows(2)
            .find(|w| w[0] == name)
            .map(|w| w[1])
    };
    ensure!(
        flag("--image-credential-provider-config")
            == Some("/var/lib/kubelet/credential-provider-config.yaml")
            && flag("--image-credential-provider-bin-dir")
                == Some("/var/lib/kubelet/credential-provider"),
        "the daemon does not get the kubelet's flags: {command:?}"
    );
    let mounts = container["volumeMounts"].as_array().context("no mounts")?;
    for path in [
        "/var/lib/kubelet/credential-provider-config.yaml",
        "/var/lib/kubelet/credential-provider",
        "/etc/kubernetes/azure.json",
    ] {
        ensure!(
            mounts
                .iter()
                .any(|m| m["mountPath"] == path && m["readOnly"] == true),
            "{path} is not mounted read-only: {mounts:?}"
        );
    }
    let toml = rendered
        .object("ConfigMap", "streamsnap-config")?
        .pointer("/data/config.toml")
        .and_then(Value::as_str)
        .context("no daemon config")?;
    ensure!(
        toml.contains("[cri_proxy]\naddress = \"/run/streamsnap/cri-image.sock\""),
        "{toml}"
    );
    // Off by default: no flags, no mounts, no proxy.
    let plain = chart.render_file("")?;
    let text = serde_json::to_string(&plain.docs)?;
    ensure!(!text.contains("credential-provider") && !text.contains("cri_proxy"));
    Ok(())
}
