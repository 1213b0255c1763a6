//! `streamsnap artifact-streaming profile`: attach a start-up profile to an image.

use std::collections::HashSet;
use std::io::Read as _;
use std::path::PathBuf;

use anyhow::{Context, bail};
use bytes::Bytes;
use streamsnap_convert::ArtifactKind;
use streamsnap_format::oci::{Descriptor, ImageManifest};
use streamsnap_format::{MAX_PROFILE_BLOB, Profile, media};
use streamsnap_service::api::Timestamp;

use crate::output::{Format, plural};
use crate::registry_args::{RegistryArgs, parse_reference};
use crate::service_args::ServerArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image the profile is for: REGISTRY/REPO:TAG or REGISTRY/REPO@DIGEST, no scheme (it must
    /// have a streaming artifact). A name without a registry (busybox) means Docker Hub, with a
    /// notice on stderr.
    #[arg(long)]
    image: String,
    /// The profile, as a node serves it at http://NODE:9464/debug/profile after the image's
    /// start-up ran there ("-": standard input). Layers of other images are dropped.
    #[arg(long, value_name = "PATH")]
    file: PathBuf,
    /// text: a summary; json: the pushed profile's descriptor and nothing else on stdout.
    #[arg(long, value_enum, default_value_t)]
    output: Format,
    /// Sign the profile with this private key (PKCS#8 PEM, ECDSA P-256, mode 0600), as
    /// `create --sign-key` signs artifacts: nodes with a [verify] policy ignore unsigned
    /// profiles.
    #[arg(long, value_name = "FILE")]
    sign_key: Option<PathBuf>,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub async fn run(args: Args, server: &ServerArgs) -> anyhow::Result<()> {
    if server.client()?.is_some() {
        bail!("`profile` pushes to the registry itself; drop --server");
    }
    let sign = args
        .sign_key
        .as_deref()
        .map(crate::signing::load)
        .transpose()?;
    let recorded = read_profile(&args.file)?;
    let reference = parse_reference(&args.image)?;
    let client = args.registry.client_for(&reference)?;
    let repo = &reference.repository;
    let image = streamsnap_convert::resolve(&client, &reference)
        .await
        .with_context(|| format!("reading {reference}"))?;
    let mut converted = false;
    for kind in [ArtifactKind::Chunked, ArtifactKind::Index] {
        converted |=
            streamsnap_convert::find_existing_kind(&client, repo, &image.manifest.digest, kind)
                .await
                .with_context(|| format!("listing the referrers of {reference}"))?
                .is_some();
    }
    if !converted {
        bail!(
            "{reference} has no streaming artifact: convert it first with \
             `streamsnap artifact-streaming create --image {reference}`"
        );
    }
    let layers: HashSet<_> = image.layers.iter().map(|l| l.descriptor.digest).collect();
    let mut profile = recorded;
    profile.layers.retain(|l| layers.contains(&l.layer));
    if profile.is_empty() {
        bail!(
            "the profile lists no chunk of {reference}'s layers: record it on a node that ran \
             the image from its streaming artifact, within a minute of the start"
        );
    }
    let blob = profile.encode().context("encoding the profile")?;
    let layer = Descriptor::of(media::PROFILE.to_owned(), &blob);
    client
        .push_blob(repo, &layer.digest, Bytes::from(blob))
        .await
        .context("pushing the profile blob")?;
    let config = Descriptor::of(media::OCI_EMPTY.to_owned(), media::OCI_EMPTY_CONTENT);
    client
        .push_blob(
            repo,
            &config.digest,
            Bytes::from_static(media::OCI_EMPTY_CONTENT),
        )
        .await
        .context("pushing the empty config blob")?;
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.to_owned()),
        artifact_type: Some(media::PROFILE_ARTIFACT_TYPE.to_owned()),
        config,
        layers: vec![layer],
        subject: Some(image.subject()),
        annotations: [(
            "org.opencontainers.image.created".to_owned(),
            Timestamp::now().to_string(),
        )]
        .into(),
    };
    if let Some(key) = &sign {
        let descriptor = streamsnap_convert::referrer_descriptor(&manifest)?;
        streamsnap_convert::push_signature(&client, repo, key, &descriptor)
            .await
            .context("pushing the profile's signature")?;
    }
    let pushed = client
        .push_referrer(repo, &manifest)
        .await
        .context("pushing the profile manifest")?;
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&pushed)?),
        Format::Text => println!(
            "pushed start-up profile {} for {reference} ({} in {}); nodes prefetch them \
             from the next pull on",
            pushed.digest,
            plural(profile.len() as u64, "chunk"),
            plural(profile.layers.len() as u64, "layer")
        ),
    }
    Ok(())
}

fn read_profile(path: &std::path::Path) -> anyhow::Result<Profile> {
    let mut bytes = Vec::new();
    let limit = MAX_PROFILE_BLOB + 1;
    if path.as_os_str() == "-" {
        std::io::stdin()
            .take(limit)
            .read_to_end(&mut bytes)
            .context("reading the profile from standard input")?;
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(limit).read_to_end(&mut bytes))
            .with_context(|| format!("reading {}", path.display()))?;
    }
    Profile::decode(&bytes).with_context(|| format!("{} is not a profile", path.display()))
}
