//! `streamsnap manifest list-referrers`

use anyhow::Context;
use streamsnap_registry::ReferrersSource;

use crate::output::Format;
use crate::registry_args::{RegistryArgs, parse_reference};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image whose manifest's referrers to list: REGISTRY/REPO:TAG or REGISTRY/REPO@DIGEST, no
    /// scheme. A name without a registry (busybox) means Docker Hub, with a notice on stderr.
    #[arg(long)]
    image: String,
    /// Only referrers of this artifactType, e.g. application/vnd.streamsnap.streaming.v1 (the
    /// streaming artifact) or application/vnd.streamsnap.profile.v1 (start-up profiles).
    #[arg(long, value_name = "TYPE")]
    artifact_type: Option<String>,
    /// text: one line per referrer (digest, artifactType), nothing when there is none (a note
    /// says so on stderr); json: an array of descriptors, `[]` when there is none.
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
            // Stdout stays empty for scripts; a person at a terminal learns the call worked.
            if referrers.manifests.is_empty() {
                eprintln!(
                    "{}",
                    none_found(&reference, &subject, args.artifact_type.as_deref())
                );
            }
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

/// The stderr line for an image without referrers.
fn none_found(
    reference: &streamsnap_registry::Reference,
    subject: &streamsnap_format::Digest,
    artifact_type: Option<&str>,
) -> String {
    let of_type = artifact_type
        .map(|t| format!(" of artifactType {t}"))
        .unwrap_or_default();
    format!("{reference} ({subject}) has no referrers{of_type}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_referrers_is_said_on_stderr_naming_the_image_and_the_filter() {
        let reference = streamsnap_registry::Reference::parse("127.0.0.1:5000/app:1").unwrap();
        let subject = streamsnap_format::Digest::sha256(b"manifest");
        assert_eq!(
            none_found(&reference, &subject, None),
            format!("127.0.0.1:5000/app:1 ({subject}) has no referrers")
        );
        assert!(
            none_found(&reference, &subject, Some("application/x"))
                .ends_with("has no referrers of artifactType application/x")
        );
    }
}
