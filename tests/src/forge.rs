//! Forging referrers as someone with push rights to a repository would: read an image's
//! manifests, artifacts and blobs, push new blobs and manifests, and make a manifest's referrers
//! exactly what the forger wants (the referrers fallback tag, as docker-registry 2.8 has no
//! referrers API). The trust and hostile-input tests build their forged artifacts with it.

use bytes::Bytes;
use streamsnap_format::oci::{Descriptor, ImageIndex, ImageManifest};
use streamsnap_format::{Digest, media};
use streamsnap_registry::{Client, ClientConfig, Reference, Repository, fallback_tag};

/// A registry client on one repository, with its own runtime (the harness is synchronous).
#[derive(Debug)]
pub struct Forger {
    pub client: Client,
    pub repo: Repository,
    pub rt: tokio::runtime::Runtime,
}

impl Forger {
    /// On repository `name` of the registry at `addr` (plain HTTP on loopback).
    pub fn new(addr: &str, name: &str) -> anyhow::Result<Self> {
        let repo = Reference::parse(&format!("{addr}/{name}:x"))?.repository;
        Ok(Self {
            client: Client::new(ClientConfig::default())?,
            repo,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        })
    }

    /// The digest of the manifest `tag` names.
    pub fn manifest_digest(&self, tag: &str) -> anyhow::Result<Digest> {
        Ok(self
            .rt
            .block_on(self.client.get_manifest(&self.repo, tag))?
            .digest)
    }

    pub fn manifest(&self, digest: &Digest) -> anyhow::Result<ImageManifest> {
        let fetched = self
            .rt
            .block_on(self.client.get_manifest(&self.repo, &digest.to_string()))?;
        Ok(serde_json::from_slice(&fetched.bytes)?)
    }

    /// A blob of at most 64 MiB.
    pub fn blob(&self, digest: &Digest) -> anyhow::Result<Vec<u8>> {
        Ok(self
            .rt
            .block_on(self.client.get_blob_bytes(&self.repo, digest, 64 << 20))?
            .to_vec())
    }

    pub fn push_blob(&self, data: Vec<u8>) -> anyhow::Result<Digest> {
        let digest = Digest::sha256(&data);
        self.rt.block_on(
            self.client
                .push_blob(&self.repo, &digest, Bytes::from(data)),
        )?;
        Ok(digest)
    }

    /// Pushes `manifest` by digest; returns its descriptor as a referrers list has it.
    pub fn push_manifest(&self, manifest: &ImageManifest) -> anyhow::Result<Descriptor> {
        let bytes = serde_json::to_vec(manifest)?;
        let mut descriptor = Descriptor::of(media::OCI_MANIFEST, &bytes);
        descriptor.artifact_type = manifest.artifact_type.clone();
        descriptor.annotations = manifest.annotations.clone();
        self.rt.block_on(self.client.put_manifest(
            &self.repo,
            &descriptor.digest.to_string(),
            media::OCI_MANIFEST,
            Bytes::from(bytes),
        ))?;
        Ok(descriptor)
    }

    /// The referrers of `subject` of `artifact_type`.
    pub fn referrers(
        &self,
        subject: &Digest,
        artifact_type: &str,
    ) -> anyhow::Result<Vec<Descriptor>> {
        Ok(self
            .rt
            .block_on(
                self.client
                    .referrers(&self.repo, subject, Some(artifact_type)),
            )?
            .manifests)
    }

    /// Makes `subject`'s referrers exactly `descriptors` (the fallback tag's index).
    pub fn set_referrers(
        &self,
        subject: &Digest,
        descriptors: Vec<Descriptor>,
    ) -> anyhow::Result<()> {
        let mut index = ImageIndex::empty();
        index.manifests = descriptors;
        self.rt.block_on(self.client.put_manifest(
            &self.repo,
            &fallback_tag(subject),
            media::OCI_INDEX,
            Bytes::from(serde_json::to_vec(&index)?),
        ))?;
        Ok(())
    }

    /// The streaming artifact of image manifest `subject`: its digest and manifest.
    pub fn artifact_of(&self, subject: &Digest) -> anyhow::Result<(Digest, ImageManifest)> {
        let descriptor = self
            .referrers(subject, media::ARTIFACT_TYPE)?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("{subject} has no streaming artifact"))?;
        Ok((descriptor.digest, self.manifest(&descriptor.digest)?))
    }
}
