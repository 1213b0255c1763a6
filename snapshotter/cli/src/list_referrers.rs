//! `streamsnap manifest list-referrers`

use anyhow::Context;
use streamsnap_registry::ReferrersSource;

use crate::output::Format;
use crate::registry_args::{RegistryArgs, parse_reference};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image whose manifest's referrers to list: REGISTRY/REPO:TAG or REGISTRY/REPO@DIGEST.
    #[arg(long)]
    image: String,
    /// Only referrers of this artifactType.
    #[arg(long)]
    artifact_type: Option<String>,
    /// text: one line per referrer (digest, artifactType); json: an array of descriptors.
    #[arg(long, value_enum, default_value_t)]
    output: Format,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let reference = parse_reference(&args.image)?;
    let client = args.registry.client_for(&reference)?;
    let repo = &reference.repository;
    let subject = match reference.digest {
        Some(digest) => digest,
        None => {
            client
                .head_manifest(repo, &reference.reference())
                .await
                .with_context(|| format!("resolving {reference}"))?
                .with_context(|| format!("{reference}: no such manifest"))?
                .digest
        }
    };
    let referrers = client
        .referrers(repo, &subject, args.artifact_type.as_deref())
        .await
        .with_context(|| format!("listing referrers of {reference}"))?;
    tracing::info!(
        source = match referrers.source {
            ReferrersSource::Api => "referrers API",
            ReferrersSource::FallbackTag => "fallback tag",
        },
        count = referrers.manifests.len(),
        "listed referrers"
    );
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&referrers.manifests)?),
        Format::Text => {
            for referrer in &referrers.manifests {
                println!(
                    "{}\t{}",
                    referrer.digest,
                    referrer.artifact_type.as_deref().unwrap_or("-")
                );
            }
        }
    }
    Ok(())
}
