//! Start-up profiles end to end, against the real docker-registry, containerd, runc and FUSE: a
//! node records what a container's start read, `streamsnap artifact-streaming profile` pushes
//! it as a referrer, and a second node with an empty cache fetches exactly those chunks as soon
//! as it mounts the layers, so the same start then runs with the registry gone.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use streamsnap_e2e::container::{rpull, run_container};
use streamsnap_e2e::streaming_node::{FILE_SIZE, FILES, StreamingNode, metric};
use streamsnap_e2e::{Containerd, ContainerdOptions, Snapshotterd, SnapshotterdOptions};
use streamsnap_format::{Profile, Toc};

#[test]
fn a_pushed_profile_is_prefetched_so_the_start_runs_without_the_registry() -> anyhow::Result<()> {
    let first = StreamingNode::start(SnapshotterdOptions::default().with_metrics())?;
    let read = [first.files[1].clone(), first.files[5].clone()];
    first.check_digests("record", &read)?;
    ensure!(
        metric(
            &first.metrics()?,
            "streamsnap_snapshotter_prefetch_layers_total",
            &[]
        ) == 0.0,
        "the image had no profile yet, but the node prefetched"
    );

    // What the node saw: busybox's reads of the warm-up and this start, and the two files.
    let recorded = first.daemon.get("/debug/profile")?;
    let profile = Profile::decode(&recorded)?;
    let per_file = FILE_SIZE.div_ceil(1 << 20);
    ensure!(
        profile.len() >= 2 * per_file && profile.len() < FILES * per_file,
        "the profile lists {} chunks; the start read {} chunks of data files:\n{profile:?}",
        profile.len(),
        2 * per_file
    );
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), &recorded)?;
    let direct = first
        .image
        .replace(&first.proxy.addr(), &first.registry.addr());
    let out = streamsnap_e2e::run(
        Command::new(streamsnap_e2e::workspace_bin("streamsnap")?).args([
            "artifact-streaming",
            "profile",
            "--image",
            &direct,
            "--file",
            file.path().to_str().context("temp path")?,
        ]),
    )?;
    let said = String::from_utf8_lossy(&out.stdout);
    let profile_manifest = said
        .strip_prefix("pushed start-up profile ")
        .and_then(|rest| rest.split_whitespace().next())
        .with_context(|| format!("no profile digest in {said:?}"))?
        .to_owned();

    // A second node, empty cache: pulling mounts the layers, which starts the prefetch. The
    // profile does not hold the layers' TOCs back: while the registry's answer for the profile
    // manifest is held, the node fetches a TOC.
    let daemon = Snapshotterd::start(SnapshotterdOptions::default().with_metrics())?;
    let containerd = Containerd::start(
        ContainerdOptions::default().with_proxy_snapshotter("streamsnap", daemon.socket()),
    )?;
    let mark = first.registry.access_log()?.len();
    first.proxy.set_hold(Some(&profile_manifest));
    let (toc_while_held, pulled) = thread::scope(|scope| {
        let pull = scope.spawn(|| rpull(&containerd, &first.image, "streamsnap", true));
        let toc = toc_fetched_since(&first, mark, Duration::from_secs(60));
        first.proxy.set_hold(None);
        (toc, pull.join().expect("the pull does not panic"))
    });
    pulled?;
    ensure!(
        toc_while_held?,
        "no TOC was fetched while the profile manifest {profile_manifest} was held: the \
         profile holds the TOCs back. The registry served:\n{:?}\ndaemon log:\n{}",
        first.registry.access_log()?[mark..]
            .iter()
            .filter(|e| !e.uri.contains("barrier"))
            .collect::<Vec<_>>(),
        daemon.log_tail(40)
    );
    let metrics = || -> anyhow::Result<String> { Ok(String::from_utf8(daemon.get("/metrics")?)?) };
    // Wait until the prefetch has settled: its byte count stops growing.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = -1.0;
    loop {
        let text = metrics()?;
        let bytes = metric(&text, "streamsnap_snapshotter_prefetch_bytes_total", &[]);
        if bytes > 0.0 && bytes == last {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no prefetch within 60 s:\n{text}"
        );
        last = bytes;
        thread::sleep(Duration::from_millis(500));
    }
    let text = metrics()?;
    ensure!(
        metric(&text, "streamsnap_snapshotter_prefetch_layers_total", &[]) >= 1.0,
        "{text}"
    );
    // The data layer was resolved (and its prefetch started) at the first layer's Prepare.
    ensure!(
        metric(
            &text,
            "streamsnap_snapshotter_layers_resolved_ahead_total",
            &[]
        ) >= 1.0,
        "{text}"
    );
    // Only what the profile lists: the two files, not all eight.
    ensure!(
        last < (FILES * FILE_SIZE) as f64 / 2.0,
        "prefetched {last} bytes: more than the start reads"
    );

    // A profile is a hint: a third node, whose registry never answers for the profile,
    // finishes its pull once the layers' wait for it (5 s) is over, without a prefetch.
    {
        let daemon = Snapshotterd::start(SnapshotterdOptions::default().with_metrics())?;
        let containerd = Containerd::start(
            ContainerdOptions::default().with_proxy_snapshotter("streamsnap", daemon.socket()),
        )?;
        first.proxy.set_hold(Some(&profile_manifest));
        let pulled = rpull(&containerd, &first.image, "streamsnap", true);
        let text = String::from_utf8(daemon.get("/metrics")?)?;
        first.proxy.set_hold(None);
        pulled?;
        ensure!(
            metric(&text, "streamsnap_snapshotter_prefetch_layers_total", &[]) == 0.0,
            "a prefetch started without the profile:\n{text}"
        );
        ensure!(
            std::fs::read_to_string(daemon.log_path())?
                .contains("the image's start-up profile has not arrived"),
            "{}",
            daemon.log_tail(20)
        );
    }

    // The registry goes away; the same start reads every byte correctly from the cache.
    first.proxy.set_refuse(true);
    first.proxy.drop_connections();
    let check = streamsnap_e2e::sha256_check(&read);
    run_container(
        &containerd,
        &first.image,
        "streamsnap",
        "offline",
        &["sh", "-c", &check],
    )
    .context("with the registry gone")?;
    Ok(())
}

#[test]
fn profiles_for_missing_images_and_files_that_are_not_profiles_are_refused() -> anyhow::Result<()> {
    let node = StreamingNode::start(SnapshotterdOptions::default().with_metrics())?;
    let body = node.daemon.get("/debug/profile")?;
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), &body)?;
    let missing = format!("{}/res/other:v1", node.registry.addr());
    let output = Command::new(streamsnap_e2e::workspace_bin("streamsnap")?)
        .args([
            "artifact-streaming",
            "profile",
            "--image",
            &missing,
            "--file",
        ])
        .arg(file.path())
        .output()?;
    ensure!(
        !output.status.success(),
        "a profile for a missing image was pushed"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(stderr.contains("res/other:v1"), "{stderr}");
    // A file that is not a profile is refused before anything is pushed.
    std::fs::write(file.path(), b"{\"version\":1,\"layers\":[],\"chunks\":3}")?;
    let output = Command::new(streamsnap_e2e::workspace_bin("streamsnap")?)
        .args([
            "artifact-streaming",
            "profile",
            "--image",
            &node.image,
            "--file",
        ])
        .arg(file.path())
        .output()?;
    ensure!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(stderr.contains("is not a profile"), "{stderr}");
    Ok(())
}

/// Whether the registry served a layer TOC after access log entry `mark`, waiting up to
/// `within` for one.
fn toc_fetched_since(node: &StreamingNode, mark: usize, within: Duration) -> anyhow::Result<bool> {
    let deadline = Instant::now() + within;
    let repo = node.image.rsplit_once(':').map_or("", |(name, _)| name);
    let repo = repo.split_once('/').map_or("", |(_, repo)| repo);
    let mut checked = std::collections::HashSet::new();
    loop {
        for entry in &node.registry.access_log()?[mark..] {
            let Some(digest) = entry.blob_get_digest() else {
                continue;
            };
            if !checked.insert(digest.to_owned()) {
                continue;
            }
            let blob = streamsnap_e2e::http::get(
                &node.registry.addr(),
                &format!("/v2/{repo}/blobs/{digest}"),
                &[],
            )?;
            if Toc::decode(&blob.body).is_ok() {
                return Ok(true);
            }
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(100));
    }
}
