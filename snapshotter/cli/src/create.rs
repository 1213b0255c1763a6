//! `streamsnap artifact-streaming create`

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use streamsnap_convert::{ArtifactKind, ConvertOptions, CreateOptions, Progress};
use streamsnap_format::MAX_CHUNK_SIZE;

use crate::output::{Format, human_bytes, plural};
use crate::registry_args::{RegistryArgs, parse_reference};
use crate::remote;
use crate::service_args::ServerArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image to convert: REGISTRY/REPO:TAG or REGISTRY/REPO@DIGEST, no scheme (linux/amd64, or
    /// an index with a linux/amd64 entry). A name without a registry (busybox) means Docker Hub
    /// (docker.io/library/busybox:latest), with a notice on stderr. With --server: REPO:TAG or
    /// REPO@DIGEST, relative to the service's registry.
    #[arg(long)]
    image: String,
    /// text: a summary; json: the pushed artifact's descriptor (with --server: the operation)
    /// and nothing else on stdout.
    #[arg(long, value_enum, default_value_t)]
    output: Format,
    /// Convert and push even if the image already has a streaming artifact.
    #[arg(long)]
    force: bool,
    /// What to make: chunked (the content in zstd chunks: a second copy of the image, any layer
    /// compression, the fastest to start) or index (only a table of contents and decompression
    /// checkpoints over the ORIGINAL gzip layers: no second copy; gzip layers only).
    #[arg(long, value_name = "KIND", default_value = "chunked",
          value_parser = ["chunked", "index"])]
    kind: String,
    /// Index kind: uncompressed bytes between two checkpoints (64 KiB to 8 MiB): what a read
    /// fetches and inflates at most, plus a deflate block [default: 1048576].
    #[arg(long, value_name = "BYTES",
          value_parser = clap::value_parser!(u32).range(65536..=i64::from(MAX_CHUNK_SIZE / 2)))]
    span_size: Option<u32>,
    /// Largest uncompressed chunk in bytes (64 KiB to 16 MiB) [default: 1048576].
    #[arg(long, value_name = "BYTES",
          value_parser = clap::value_parser!(u32).range(65536..=i64::from(MAX_CHUNK_SIZE)))]
    chunk_size: Option<u32>,
    /// zstd compression level of the chunks (1 to 19) [default: 3].
    #[arg(long, value_name = "LEVEL", value_parser = clap::value_parser!(i32).range(1..=19))]
    compression_level: Option<i32>,
    /// With --server: print the operation and return at once instead of waiting for it.
    #[arg(long)]
    no_wait: bool,
    /// Directory for the chunk blobs staged before upload, for a local conversion [default:
    /// the system temp dir].
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Sign the artifact with this private key (PKCS#8 PEM, ECDSA P-256, mode 0600): a cosign
    /// signature pushed as a referrer of the artifact, before it. Nodes with a [verify] policy
    /// use only artifacts signed by a key they trust. On an image converted before, signs its
    /// existing artifact. With --server, the service signs with its own --sign-key.
    #[arg(long, value_name = "FILE")]
    sign_key: Option<PathBuf>,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub async fn run(args: Args, server: &ServerArgs) -> anyhow::Result<()> {
    if let Some(service) = server.client()? {
        if args.kind != "chunked" || args.span_size.is_some() {
            bail!(
                "--kind and --span-size apply to a local conversion; the service converts a repository with its kind (`streamsnap artifact-streaming update --kind`)"
            );
        }
        if args.sign_key.is_some() {
            bail!(
                "--sign-key signs a local conversion; with --server, start the service with --sign-key"
            );
        }
        return remote::create(
            &service,
            remote::Request {
                image: &args.image,
                force: args.force,
                chunk_size: args.chunk_size,
                compression_level: args.compression_level,
                no_wait: args.no_wait,
                output: args.output,
            },
        )
        .await;
    }
    if args.no_wait {
        bail!("--no-wait needs a conversion service: pass --server URL or set STREAMSNAP_SERVER");
    }
    let reference = parse_reference(&args.image)?;
    let client = args.registry.client_for(&reference)?;
    let defaults = ConvertOptions::default();
    let kind: ArtifactKind = args.kind.parse().map_err(anyhow::Error::msg)?;
    let options = CreateOptions {
        kind,
        convert: ConvertOptions {
            span_size: args.span_size.unwrap_or(defaults.span_size),
            max_chunk_size: args.chunk_size.unwrap_or(defaults.max_chunk_size),
            compression_level: args.compression_level.unwrap_or(defaults.compression_level),
            ..defaults
        },
        force: args.force,
        work_dir: args.work_dir,
        sign: args
            .sign_key
            .as_deref()
            .map(crate::signing::load)
            .transpose()?,
    };
    let progress = Arc::new(Progress::default());
    let bar = std::io::stderr()
        .is_terminal()
        .then(|| show_progress(progress.clone()));
    let started = Instant::now();
    let result = streamsnap_convert::create(&client, &reference, &options, progress).await;
    if let Some(bar) = bar {
        bar.abort();
        let _ = bar.await;
    }
    let created = result.with_context(|| format!("converting {reference}"))?;
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&created.artifact)?),
        Format::Text => {
            if created.existing {
                println!(
                    "{reference} already has a streaming artifact (use --force to convert again)"
                );
            } else {
                let source: u64 = created.layers.iter().map(|l| l.source_size).sum();
                let uncompressed: u64 = created.layers.iter().map(|l| l.uncompressed_size).sum();
                let streaming: u64 = created
                    .layers
                    .iter()
                    .map(|l| l.data.size + l.toc.size)
                    .sum();
                let seconds = started.elapsed().as_secs_f64();
                println!(
                    "converted {reference}: {}, {} compressed ({} uncompressed) -> {} streaming ({kind}, {:.1}% of the image), in {seconds:.1} s ({:.0} MB/s uncompressed)",
                    plural(created.layers.len() as u64, "layer"),
                    human_bytes(source),
                    human_bytes(uncompressed),
                    human_bytes(streaming),
                    100.0 * streaming as f64 / source.max(1) as f64,
                    uncompressed as f64 / 1e6 / seconds.max(1e-9),
                );
            }
            println!("artifact {}", created.artifact.digest);
            println!(
                "  artifactType {}",
                created.artifact.artifact_type.as_deref().unwrap_or("-")
            );
            println!("  subject {}", created.subject.digest);
        }
    }
    Ok(())
}

/// Draws a progress bar on stderr from the conversion's counters until aborted.
fn show_progress(progress: Arc<Progress>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} converting [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("progress template is valid")
            .progress_chars("=> "),
        );
        let _clear = ClearOnDrop(bar.clone());
        loop {
            bar.set_length(progress.total.load(Ordering::Relaxed));
            bar.set_position(progress.done.load(Ordering::Relaxed));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

struct ClearOnDrop(indicatif::ProgressBar);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}
