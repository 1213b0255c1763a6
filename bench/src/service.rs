//! Conversion service throughput: conversions per minute of 1, 2 and 3 replicas of
//! `streamsnap serve` sharing one PostgreSQL database (a private cluster, tests/src/postgres.rs),
//! against the real distribution registry on loopback. Each run starts the replicas on a fresh
//! database, pushes the images into a fresh repository (untimed), then creates one operation
//! per image, spread over the replicas in turn as a load balancer would, and times from the
//! first create to the last Succeeded. Figures: conversions per minute and MB/s of uncompressed
//! layer data (median, min, max over runs), how busy the machine's cores were, and the CPU time
//! the replicas, the registry and the database spent per conversion, with the ceiling that cost
//! puts on the machine's cores (a figure that other programs on the machine do not skew).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use streamsnap_e2e::demo_image::{DemoShape, app_layer};
use streamsnap_e2e::image::{ImageSpec, LayerBlob};
use streamsnap_e2e::postgres::PgCluster;
use streamsnap_e2e::service::{ServiceHome, ServiceProcess, request_with_body};
use streamsnap_e2e::{Registry, TarGen, http, require_root_tools};
use streamsnap_format::media;
use streamsnap_format::oci::{Descriptor, ImageManifest};
use streamsnap_registry::{Client, ClientConfig, Reference};

use crate::stats::Summary;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Replica counts measured, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    replicas: Vec<usize>,
    /// Images converted per run.
    #[arg(long, default_value_t = 24)]
    images: usize,
    /// Approximate uncompressed size of each image's one layer, in MB (40% small text files,
    /// 60% incompressible data, gzip).
    #[arg(long, default_value_t = 16)]
    image_mb: usize,
    /// Timed runs per replica count.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// `serve --concurrency` of each replica (its default is 2).
    #[arg(long, default_value_t = 2)]
    concurrency: u16,
}

/// One image, compressed once and pushed by every run.
struct Image {
    layer: Vec<u8>,
    layer_descriptor: Descriptor,
    config: Vec<u8>,
    manifest: Vec<u8>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    require_root_tools(&["docker-registry"])?;
    ensure!(
        args.images > 0 && args.runs > 0 && !args.replicas.is_empty(),
        "nothing to measure"
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "generating {} images of about {} MB",
        args.images, args.image_mb
    );
    let (images, uncompressed) = generate(args.images, args.image_mb)?;
    let compressed: usize = images.iter().map(|i| i.layer.len()).sum();
    let postgres = PgCluster::start()?;
    let registry = Registry::start()?;
    let client = Client::new(ClientConfig::default())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "{} images per run, {:.1} MB uncompressed ({:.1} MB gzip) in all; {} runs each; \
         serve --concurrency {} per replica; {cores} cores",
        args.images,
        uncompressed as f64 / 1e6,
        compressed as f64 / 1e6,
        args.runs,
        args.concurrency,
    );
    println!(
        "{:<10} {:>26}  {:>24}  {:>16}  {:>8}  {:>8}  operations per replica (last run)",
        "replicas",
        "conversions/min [min..max]",
        "MB/s [min..max]",
        "CPU busy",
        "CPU/conv",
        "ceiling"
    );
    for &replicas in &args.replicas {
        ensure!(replicas > 0, "--replicas takes counts of at least 1");
        let mut times = Vec::new();
        let mut busy = Vec::new();
        let mut spread = BTreeMap::new();
        let mut cpu_per_conversion = Vec::new();
        for run in 0..args.runs {
            let database = format!("bench_{replicas}r_{run}");
            postgres.create_database(&database)?;
            let mut first = ServiceHome::new()?;
            first.use_postgres(postgres.url(&database), postgres.password_file());
            let mut homes = vec![first];
            for _ in 1..replicas {
                homes.push(homes[0].replica()?);
            }
            let concurrency = args.concurrency.to_string();
            let mut services: Vec<ServiceProcess> = homes
                .iter()
                .map(|home| home.start(&registry.addr(), &["--concurrency", &concurrency]))
                .collect::<anyhow::Result<_>>()?;
            let repo = format!("bench/r{replicas}-{run}");
            let repository = Reference::parse(&format!("{}/{repo}:x", registry.addr()))?.repository;
            rt.block_on(async {
                for (i, image) in images.iter().enumerate() {
                    client
                        .push_blob(
                            &repository,
                            &image.layer_descriptor.digest,
                            image.layer.clone().into(),
                        )
                        .await?;
                    let config = Descriptor::of(media::OCI_CONFIG, &image.config);
                    client
                        .push_blob(&repository, &config.digest, image.config.clone().into())
                        .await?;
                    client
                        .put_manifest(
                            &repository,
                            &format!("t{i}"),
                            media::OCI_MANIFEST,
                            image.manifest.clone().into(),
                        )
                        .await?;
                }
                Ok::<_, anyhow::Error>(())
            })?;

            let mut pids: Vec<i32> = services.iter().map(|s| s.pid() as i32).collect();
            pids.push(registry.pid() as i32);
            pids.push(postgres.pid());
            let own_before = process_ticks(&pids);
            let cpu_before = cpu_times()?;
            let started = Instant::now();
            for i in 0..images.len() {
                let home = &homes[i % replicas];
                let response = request_with_body(
                    &home.addr(),
                    "POST",
                    &format!("/v1/repositories/{}/operations", encode(&repo)),
                    &[
                        ("Authorization", &format!("Bearer {}", home.token)),
                        ("Content-Type", "application/json"),
                    ],
                    format!("{{\"reference\":\"t{i}\"}}").as_bytes(),
                )?;
                ensure!(
                    response.status == 201,
                    "create t{i}: {} {}",
                    response.status,
                    String::from_utf8_lossy(&response.body)
                );
            }
            if let Err(e) = wait_all_succeeded(&homes[0], &repo, images.len()) {
                for (i, service) in services.iter().enumerate() {
                    let log = service.log();
                    let lines: Vec<&str> = log.lines().collect();
                    eprintln!(
                        "--- replica {i}: last lines of {} ---\n{}",
                        service.log_path().display(),
                        lines[lines.len().saturating_sub(40)..].join("\n")
                    );
                }
                return Err(e);
            }
            let elapsed = started.elapsed();
            busy.push(cpu_busy(&cpu_before, &cpu_times()?));
            let own = process_ticks(&pids).saturating_sub(own_before);
            cpu_per_conversion.push(own as f64 / ticks_per_second() / images.len() as f64);
            times.push(elapsed);
            spread = operations_per_replica(&homes[0], &repo, &services)?;
            for service in &mut services {
                service.terminate()?;
            }
        }
        let s = Summary::of(&times);
        let per_min = |d: Duration| images.len() as f64 * 60.0 / d.as_secs_f64();
        let mbps = |d: Duration| uncompressed as f64 / 1e6 / d.as_secs_f64();
        busy.sort_by(f64::total_cmp);
        cpu_per_conversion.sort_by(f64::total_cmp);
        let cpu = cpu_per_conversion[cpu_per_conversion.len() / 2];
        println!(
            "{replicas:<10} {:>9.0} [{:.0} .. {:.0}]{:>8}  {:>7.1} [{:.1} .. {:.1}]{:>6}  {:>5.0}% of {cores}  {:>6.2} s  {:>8.0}  {:?}",
            per_min(s.median),
            per_min(s.max),
            per_min(s.min),
            "",
            mbps(s.median),
            mbps(s.max),
            mbps(s.min),
            "",
            busy[busy.len() / 2] * 100.0,
            cpu,
            cores as f64 * 60.0 / cpu,
            spread.values().collect::<Vec<_>>(),
        );
    }
    println!(
        "load average at the end (other programs too): {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "CPU/conv: CPU time of the replicas, the registry and the PostgreSQL server per \
         conversion (median); ceiling: conversions per minute that {cores} cores give at that \
         cost, whatever the replica count. CPU busy: the whole machine, other programs included."
    );
    Ok(())
}

/// `count` distinct images of one gzip layer each: small text files and one incompressible
/// file (app_layer), made distinct by a file of their own. Returns them and the uncompressed
/// bytes of all their layers.
fn generate(count: usize, image_mb: usize) -> anyhow::Result<(Vec<Image>, usize)> {
    let target = image_mb * 1_000_000;
    let shape = DemoShape {
        source_files: (target * 4 / 10 / 21_000).max(1),
        large_files: 1,
        large_file_size: target * 6 / 10,
    };
    let base = app_layer(shape);
    let mut images = Vec::new();
    let mut uncompressed = 0;
    for i in 0..count {
        // The base tar without its two zero end blocks, then this image's own file.
        let own = TarGen::new()
            .file(
                &format!("app/image-{i}"),
                0o644,
                format!("{i}\n").as_bytes(),
            )
            .finish();
        let mut tar = base[..base.len() - 1024].to_vec();
        tar.extend_from_slice(&own);
        uncompressed += tar.len();
        let blob = LayerBlob::gzip(tar);
        let layer = blob.compressed()?;
        let layer_descriptor = Descriptor::of(blob.media_type(), &layer);
        let config = ImageSpec::linux_amd64(vec![blob.clone()]).config_json(&[blob.diff_id()]);
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(media::OCI_MANIFEST.into()),
            artifact_type: None,
            config: Descriptor::of(media::OCI_CONFIG, &config),
            layers: vec![layer_descriptor.clone()],
            subject: None,
            annotations: Default::default(),
        };
        images.push(Image {
            layer,
            layer_descriptor,
            config,
            manifest: serde_json::to_vec(&manifest)?,
        });
    }
    Ok((images, uncompressed))
}

fn encode(s: &str) -> String {
    s.replace('/', "%2F")
}

fn get_json(home: &ServiceHome, path: &str) -> anyhow::Result<Value> {
    let auth = format!("Bearer {}", home.token);
    let response = http::get(&home.addr(), path, &[("Authorization", &auth)])?;
    ensure!(
        response.status == 200,
        "GET {path}: {} {}",
        response.status,
        String::from_utf8_lossy(&response.body)
    );
    Ok(serde_json::from_slice(&response.body)?)
}

fn wait_all_succeeded(home: &ServiceHome, repo: &str, count: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let shown = get_json(home, &format!("/v1/repositories/{}", encode(repo)))?;
        let counts = &shown["operations"];
        if counts["Failed"].as_u64() > Some(0) || counts["Canceled"].as_u64() > Some(0) {
            let list = get_json(
                home,
                &format!("/v1/repositories/{}/operations", encode(repo)),
            )?;
            let errors: Vec<String> = list["operations"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|op| op["error"].is_string())
                .map(|op| format!("{} {}: {}", op["reference"], op["state"], op["error"]))
                .collect();
            bail!("operations did not succeed: {shown}; {errors:#?}");
        }
        if counts["Succeeded"].as_u64() == Some(count as u64) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "not done in 10 minutes: {shown}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Operations of `repo` per replica (by the PID in their worker `HOST-PID-RANDOM`).
fn operations_per_replica(
    home: &ServiceHome,
    repo: &str,
    services: &[ServiceProcess],
) -> anyhow::Result<BTreeMap<usize, usize>> {
    let list = get_json(
        home,
        &format!("/v1/repositories/{}/operations", encode(repo)),
    )?;
    let mut spread: BTreeMap<usize, usize> = (0..services.len()).map(|i| (i, 0)).collect();
    for op in list["operations"].as_array().into_iter().flatten() {
        let pid: Option<u32> = op["worker"]
            .as_str()
            .and_then(|w| w.rsplit('-').nth(1))
            .and_then(|p| p.parse().ok());
        let replica = services
            .iter()
            .position(|s| Some(s.pid()) == pid)
            .context("an operation run by no replica of this run")?;
        *spread.entry(replica).or_default() += 1;
    }
    Ok(spread)
}

/// The machine's CPU time so far (/proc/stat): (busy, total) in clock ticks.
fn cpu_times() -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    ensure!(fields.len() >= 5, "unexpected /proc/stat: {line}");
    let total: u64 = fields.iter().sum();
    // idle and iowait
    let idle = fields[3] + fields[4];
    Ok((total - idle, total))
}

/// CPU time (user + system, clock ticks) of the processes `roots` and of their children that
/// are still running (the PostgreSQL server's backends), from /proc.
fn process_ticks(roots: &[i32]) -> u64 {
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command's closing parenthesis: state, ppid, ..., utime (14th field of
        // the line), stime (15th).
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ppid: i32 = fields.get(1).and_then(|f| f.parse().ok()).unwrap_or(0);
        if !roots.contains(&pid) && !roots.contains(&ppid) {
            continue;
        }
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        total += ticks(11) + ticks(12);
    }
    total
}

/// Clock ticks per second (`getconf CLK_TCK`).
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf takes no pointers.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// The share of the machine's CPU time that was busy between two [`cpu_times`].
fn cpu_busy(before: &(u64, u64), after: &(u64, u64)) -> f64 {
    let busy = after.0.saturating_sub(before.0) as f64;
    let total = after.1.saturating_sub(before.1).max(1) as f64;
    busy / total
}
