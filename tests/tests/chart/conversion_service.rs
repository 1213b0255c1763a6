//! The conversion service's part of the chart (`conversionService`, off by default) and its
//! plain manifests (deploy/kubernetes/conversion-service/, applied on their own): both validate
//! against Kubernetes 1.26 and the newest schemas and describe the same objects; the pods are
//! not the DaemonSet's; the PostgreSQL password and the API secrets reach the pod only as
//! mounted files; and the real `streamsnap serve` starts on the Deployment's command line and
//! environment against a real PostgreSQL.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};
use streamsnap_e2e::k8s_tools::{
    ChartUnderTest, schema_errors, validate_manifests, workspace_root, yaml_documents,
};
use streamsnap_e2e::postgres::{DATABASE, PgCluster};
use streamsnap_e2e::{Registry, http, require_root_tools, sys, workspace_bin};

use super::{by_kind_and_name, schema, wait_for};

/// The values that make the chart render what deploy/kubernetes/conversion-service/ holds.
const PLAIN_VALUES: [&str; 3] = [
    "conversionService.enabled=true",
    "conversionService.registry=registry.example.com",
    "conversionService.store.url=postgres://streamsnap@postgres.example.com:5432/streamsnap",
];

fn plain_manifests() -> anyhow::Result<Vec<PathBuf>> {
    let dir = workspace_root().join("deploy/kubernetes/conversion-service");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Whether `selector` (matchLabels) selects a pod with `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels[k] == *v))
}

/// Issue 17: a Deployment of `streamsnap serve` replicas, their Secrets and a Service, as plain
/// manifests and as the chart's `conversionService` part, valid against Kubernetes 1.26 and
/// newest and the same objects.
#[test]
fn conversion_service_manifests_and_chart_validate_and_agree() -> anyhow::Result<()> {
    let chart = ChartUnderTest::new()?;
    let off = chart.render(&[])?;
    ensure!(
        !off.docs
            .iter()
            .any(|d| d["metadata"]["name"] == "streamsnap-conversion-service"),
        "the conversion service is rendered by default"
    );
    let on = chart.render_set(&PLAIN_VALUES)?;
    let errors = schema_errors(&schema()?, &on.values)?;
    ensure!(errors.is_empty(), "{errors:?}");
    let dir = tempfile::tempdir()?;
    let rendered = dir.path().join("chart.yaml");
    on.write_manifests(&rendered)?;
    let mut files = plain_manifests()?;
    files.push(rendered);
    for version in [Some("1.26.0"), None] {
        let said = validate_manifests(version, &files)
            .with_context(|| format!("validating against {}", version.unwrap_or("the newest")))?;
        for object in [
            "deployment/streamsnap-conversion-service",
            "service/streamsnap-conversion-service",
            "secret/streamsnap-conversion-service-postgres",
            "poddisruptionbudget/streamsnap-conversion-service",
        ] {
            ensure!(
                said.matches(&format!("passed for resource {object}"))
                    .count()
                    == 2,
                "{object} not validated in both the plain manifests and the chart: {said}"
            );
        }
    }

    // The chart's extra objects when enabled are the plain manifests' objects.
    let mut plain_docs = Vec::new();
    for file in plain_manifests()? {
        plain_docs.extend(yaml_documents(&fs::read_to_string(&file)?)?);
    }
    let plain = by_kind_and_name(plain_docs)?;
    let default_keys: Vec<(String, String)> =
        by_kind_and_name(off.docs.clone())?.into_keys().collect();
    let mut from_chart = by_kind_and_name(on.docs.clone())?;
    from_chart.retain(|key, _| !default_keys.contains(key));
    ensure!(
        plain.keys().collect::<Vec<_>>() == from_chart.keys().collect::<Vec<_>>(),
        "plain: {:?}, chart: {:?}",
        plain.keys().collect::<Vec<_>>(),
        from_chart.keys().collect::<Vec<_>>()
    );
    for (key, object) in &plain {
        ensure!(
            from_chart[key] == *object,
            "{key:?} differs:\n--- deploy/kubernetes/conversion-service ---\n{}\n--- chart ---\n{}",
            serde_json::to_string_pretty(object)?,
            serde_json::to_string_pretty(&from_chart[key])?
        );
    }
    // The NOTES say where the registry and the CLI reach it (the Service's name and port).
    ensure!(
        on.notes.contains(
            "http://streamsnap-conversion-service.streamsnap.svc:8080/v1/registry-events"
        ) && !off.notes.contains("conversion service"),
        "{}",
        on.notes
    );
    let deployment = on.object("Deployment", "streamsnap-conversion-service")?;
    ensure!(
        deployment["spec"]["replicas"].as_u64() >= Some(2),
        "{deployment}"
    );
    ensure!(
        deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"].is_string(),
        "no checksum of the config and secrets"
    );

    // The DaemonSet and the metrics Service do not take the service's pods; its own Service
    // and PodDisruptionBudget do.
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    ensure!(selects(
        &deployment["spec"]["selector"]["matchLabels"],
        pod_labels
    ));
    let daemonset = on.daemonset()?;
    ensure!(
        !selects(&daemonset["spec"]["selector"]["matchLabels"], pod_labels),
        "the DaemonSet's selector takes the service's pods"
    );
    ensure!(!selects(
        &on.object("Service", "streamsnap-metrics")?["spec"]["selector"],
        pod_labels
    ));
    ensure!(selects(
        &on.object("Service", "streamsnap-conversion-service")?["spec"]["selector"],
        pod_labels
    ));
    ensure!(selects(
        &on.object("PodDisruptionBudget", "streamsnap-conversion-service")?["spec"]["selector"]["matchLabels"],
        pod_labels
    ));

    // The password is a mounted file (0400) of its own Secret: not in the command line, the
    // environment or the ConfigMap, whose store URL has no password.
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let command: Vec<&str> = container["command"]
        .as_array()
        .context("no command")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let after = |flag: &str| {
        command
            .iter()
            .position(|a| *a == flag)
            .and_then(|i| command.get(i + 1).copied())
    };
    let password_file = after("--store-password-file").context("no --store-password-file")?;
    ensure!(!command.contains(&"--store"), "{command:?}");
    let mounted = |file: &str| -> anyhow::Result<String> {
        let mount = container["volumeMounts"]
            .as_array()
            .context("no mounts")?
            .iter()
            .find(|m| {
                m["mountPath"]
                    .as_str()
                    .is_some_and(|p| file.starts_with(&format!("{p}/")))
            })
            .with_context(|| format!("{file} is not in a mounted volume"))?;
        let volume = pod["volumes"]
            .as_array()
            .context("no volumes")?
            .iter()
            .find(|v| v["name"] == mount["name"])
            .context("a mount without its volume")?;
        ensure!(
            volume["secret"]["defaultMode"] == 0o400,
            "{file}: not a Secret mounted 0400: {volume}"
        );
        Ok(volume["secret"]["secretName"]
            .as_str()
            .context("no secretName")?
            .to_owned())
    };
    ensure!(mounted(password_file)? == "streamsnap-conversion-service-postgres");
    for flag in ["--token-file", "--webhook-secret-file"] {
        let file = after(flag).with_context(|| format!("no {flag}"))?;
        ensure!(mounted(file)? == "streamsnap-conversion-service");
    }
    let env = container["env"].as_array().context("no env")?;
    ensure!(
        env.iter()
            .all(|e| e["name"] != "PGPASSWORD" && e["valueFrom"]["secretKeyRef"].is_null()),
        "a secret in the environment: {env:?}"
    );
    let store = env
        .iter()
        .find(|e| e["name"] == "STREAMSNAP_STORE")
        .context("no STREAMSNAP_STORE")?;
    ensure!(store["valueFrom"]["configMapKeyRef"]["key"] == "store");
    let url = on.object("ConfigMap", "streamsnap-conversion-service")?["data"]["store"]
        .as_str()
        .context("no store URL")?
        .to_owned();
    let user = url
        .strip_prefix("postgres://")
        .and_then(|rest| rest.split_once('@'))
        .map(|(user, _)| user);
    ensure!(
        user.is_some_and(|u| !u.contains(':')),
        "not postgres://USER@..., or a password in it: {url}"
    );
    for secret in [
        "streamsnap-conversion-service",
        "streamsnap-conversion-service-postgres",
    ] {
        ensure!(
            on.object("Secret", secret)?["stringData"]
                .as_object()
                .is_some_and(|data| data.values().all(|v| v == "")),
            "the chart's default {secret} holds a value"
        );
    }

    // Existing Secrets, registry credentials and the other options: nothing made, everything
    // referred to, still valid against 1.26; the schema refuses typos and a password in the
    // URL; the chart refuses to render without a registry.
    let options = chart.render_file(&serde_json::to_string(&json!({
        "conversionService": {
            "enabled": true,
            "replicas": 3,
            "registry": "registry.local:5000",
            "plainHttp": true,
            "store": {"url": "postgres://conv@db.example:5432/conv", "existingSecret": "pg"},
            "existingSecret": "api",
            "credentials": {"existingSecret": "push"},
            "extraArgs": ["--operation-timeout", 7200],
            "workDirSizeLimit": "64Gi",
            "operationLease": 10,
            "concurrency": 4,
        }
    }))?)?;
    let errors = schema_errors(&schema()?, &options.values)?;
    ensure!(errors.is_empty(), "{errors:?}");
    ensure!(
        !options.docs.iter().any(|d| d["kind"] == "Secret"),
        "the chart made a Secret beside the existing ones"
    );
    let path = dir.path().join("options.yaml");
    options.write_manifests(&path)?;
    validate_manifests(Some("1.26.0"), &[path])?;
    let deployment = options.object("Deployment", "streamsnap-conversion-service")?;
    let pod = &deployment["spec"]["template"]["spec"];
    let command = pod["containers"][0]["command"].to_string();
    for wanted in [
        r#""--plain-http""#,
        r#""--docker-config","/etc/streamsnap-service/registry/config.json""#,
        r#""--operation-timeout","7200""#,
        r#""--operation-lease","10""#,
        r#""--concurrency","4""#,
    ] {
        ensure!(command.contains(wanted), "{wanted} not in {command}");
    }
    let secrets: BTreeMap<&str, &str> = pod["volumes"]
        .as_array()
        .context("no volumes")?
        .iter()
        .filter_map(|v| Some((v["name"].as_str()?, v["secret"]["secretName"].as_str()?)))
        .collect();
    ensure!(
        secrets
            == BTreeMap::from([
                ("api-secrets", "api"),
                ("postgres-password", "pg"),
                ("registry-credentials", "push")
            ]),
        "{secrets:?}"
    );
    ensure!(deployment["spec"]["replicas"] == 3);
    ensure!(pod["volumes"][0]["emptyDir"]["sizeLimit"] == "64Gi");
    for (set, named) in [
        ("conversionService.replcas=3", "replcas"),
        (
            "conversionService.store.url=postgres://u:secret@db:5432/d",
            "store/url",
        ),
        (
            "conversionService.registry=https://registry.example.com",
            "registry",
        ),
        ("conversionService.operationLease=1", "operationLease"),
    ] {
        let rendered = chart.render_set(&[set])?;
        let errors = schema_errors(&schema()?, &rendered.values)?;
        ensure!(
            errors.iter().any(|e| e.contains(named)),
            "--set {set}: the schema does not refuse {named}: {errors:?}"
        );
    }
    match chart.render_set(&["conversionService.enabled=true"]) {
        Ok(_) => bail!("the chart renders the service without a registry"),
        Err(e) => ensure!(
            format!("{e:#}").contains("conversionService.registry is required"),
            "{e:#}"
        ),
    }
    Ok(())
}

/// The real `streamsnap serve` takes the Deployment's command line and environment (the
/// ConfigMap's registry and store, the mounted secret files) and serves, against a real
/// PostgreSQL and registry: the flags and the variables the manifests use exist.
#[test]
fn serve_starts_on_the_deployments_command_line() -> anyhow::Result<()> {
    require_root_tools(&["docker-registry"])?;
    let chart = ChartUnderTest::new()?;
    let on = chart.render_set(&PLAIN_VALUES)?;
    let container = &on.object("Deployment", "streamsnap-conversion-service")?["spec"]["template"]
        ["spec"]["containers"][0];
    let postgres = PgCluster::start()?;
    let registry = Registry::start()?;
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = format!("127.0.0.1:{port}");
    for (name, value) in [("api/token", "tok"), ("api/webhook-secret", "hook")] {
        let path = dir.path().join(name);
        fs::create_dir_all(path.parent().unwrap())?;
        fs::write(&path, value)?;
    }
    fs::create_dir_all(dir.path().join("postgres"))?;
    fs::copy(
        postgres.password_file(),
        dir.path().join("postgres/password"),
    )?;
    // The ConfigMap's values, pointed at this machine's registry and database.
    let env: BTreeMap<&str, String> = container["env"]
        .as_array()
        .context("no env")?
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap_or_default();
            let value = match name {
                "STREAMSNAP_REGISTRY" => registry.addr(),
                "STREAMSNAP_STORE" => postgres.url(DATABASE),
                _ => e["value"].as_str().unwrap_or_default().to_owned(),
            };
            (name, value)
        })
        .collect();
    ensure!(env.len() == 3, "{env:?}");
    let mut command: Vec<String> = Vec::new();
    for arg in container["command"].as_array().context("no command")? {
        let arg = arg.as_str().context("an argument that is not a string")?;
        // Kubernetes expands $(VAR) from the container's environment.
        let arg = env.iter().fold(arg.to_owned(), |a, (name, value)| {
            a.replace(&format!("$({name})"), value)
        });
        let arg = arg
            .replace("0.0.0.0:8080", &listen)
            .replace("/etc/streamsnap-service", &dir.path().to_string_lossy())
            .replace(
                "/var/lib/streamsnap-service",
                &dir.path().join("state").to_string_lossy(),
            );
        command.push(arg);
    }
    ensure!(command[0] == "/usr/local/bin/streamsnap", "{command:?}");
    let mut serve = Command::new(workspace_bin("streamsnap")?)
        .args(&command[1..])
        .envs(
            env.iter()
                .filter(|(name, _)| **name != "STREAMSNAP_REGISTRY"),
        )
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let served = wait_for("serve answering on the Deployment's command line", || {
        if let Some(status) = serve.try_wait()? {
            let mut stderr = String::new();
            if let Some(mut pipe) = serve.stderr.take() {
                use std::io::Read;
                let _ = pipe.read_to_string(&mut stderr);
            }
            bail!("serve exited ({status}) on {command:?}: {stderr}");
        }
        Ok(http::get(&listen, "/v1/healthz", &[]).is_ok_and(|r| r.status == 200))
    });
    // Its tables are in the database: it used the store, not state.redb.
    let tables = served.and_then(|()| {
        postgres.psql(
            DATABASE,
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
        )
    });
    sys::signal(i32::try_from(serve.id())?, libc::SIGTERM);
    let _ = serve.wait();
    let tables: u32 = tables?.trim().parse()?;
    ensure!(tables > 0, "no tables in the database");
    ensure!(
        !dir.path().join("state/state.redb").exists(),
        "serve made state.redb"
    );
    Ok(())
}
