//! Pushing blobs: monolithic (POST, then PUT with the body) from memory, chunked (POST, PATCH
//! per chunk, PUT) from a file. An upload that fails after it started is cancelled with a
//! DELETE of its session, best effort.

use std::path::Path;

use bytes::Bytes;
use http::{Method, StatusCode, Uri, header};
use streamsnap_format::{Digest, DigestHasher};
use tokio::io::AsyncReadExt as _;

use crate::auth::{Access, Scope};
use crate::client::{Client, display_url, with_query};
use crate::error::{Error, Result};
use crate::metrics::Kind;
use crate::reference::Repository;
use crate::transport::{Call, Retry};

const OCTET_STREAM: &str = "application/octet-stream";

impl Client {
    /// Pushes `data` as blob `digest` in one PUT, unless the registry already has it.
    pub async fn push_blob(&self, repo: &Repository, digest: &Digest, data: Bytes) -> Result<()> {
        if self.blob_size(repo, digest).await?.is_some() {
            tracing::debug!(%digest, "blob already present, not pushing");
            return Ok(());
        }
        let location = self.start_upload(repo).await?;
        let result = self.finish_upload(repo, &location, digest, data).await;
        if result.is_err() {
            self.cancel_upload(repo, &location).await;
        }
        result
    }

    /// Pushes the file at `path` as blob `digest` in chunks of `upload_chunk_size`, unless the
    /// registry already has it. The file must hash to `digest`; that is checked before the
    /// upload is committed.
    pub async fn push_blob_file(
        &self,
        repo: &Repository,
        digest: &Digest,
        path: &Path,
    ) -> Result<()> {
        if self.blob_size(repo, digest).await?.is_some() {
            tracing::debug!(%digest, "blob already present, not pushing");
            return Ok(());
        }
        let file_error = |action| {
            move |source| Error::File {
                path: path.to_path_buf(),
                action,
                source,
            }
        };
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(file_error("cannot open the blob to push"))?;
        let mut location = self.start_upload(repo).await?;
        let result = async {
            let mut hasher = DigestHasher::new();
            let mut offset = 0u64;
            loop {
                let chunk = read_chunk(&mut file, self.config().upload_chunk_size)
                    .await
                    .map_err(file_error("cannot read the blob to push"))?;
                if chunk.is_empty() {
                    break;
                }
                hasher.update(&chunk);
                let len = chunk.len() as u64;
                location = self.patch_chunk(repo, &location, offset, chunk).await?;
                offset += len;
            }
            let actual = hasher.finish();
            if actual != *digest {
                return Err(Error::FileDigestMismatch {
                    path: path.to_path_buf(),
                    expected: *digest,
                    actual,
                });
            }
            self.finish_upload(repo, &location, digest, Bytes::new())
                .await
        }
        .await;
        if result.is_err() {
            self.cancel_upload(repo, &location).await;
        }
        result
    }

    /// POST `/v2/<name>/blobs/uploads/`: the session's location.
    async fn start_upload(&self, repo: &Repository) -> Result<Uri> {
        let uri = self.url(repo, "blobs/uploads/")?;
        let call = Call::new(Kind::Upload, Method::POST, uri, push_scope(repo));
        let mut retry = Retry::new(self.config().retries);
        let response = self.execute(&call, &mut retry).await?;
        let response = response.expect(&[StatusCode::ACCEPTED]).await?;
        response.location()
    }

    /// PATCH one chunk at `offset`; the location to use next.
    async fn patch_chunk(
        &self,
        repo: &Repository,
        location: &Uri,
        offset: u64,
        chunk: Bytes,
    ) -> Result<Uri> {
        let end = offset + chunk.len() as u64 - 1;
        let call = Call::new(
            Kind::Upload,
            Method::PATCH,
            location.clone(),
            push_scope(repo),
        )
        .header(header::CONTENT_TYPE, OCTET_STREAM)
        .header(header::CONTENT_RANGE, &format!("{offset}-{end}"))
        .body(chunk);
        let mut retry = Retry::new(self.config().retries);
        let response = self.execute(&call, &mut retry).await?;
        let response = response.expect(&[StatusCode::ACCEPTED]).await?;
        if let Some(range) = response.header_str(header::RANGE)
            && let Some((_, got_end)) = range.trim().split_once('-')
            && got_end.trim().parse::<u64>().ok() != Some(end)
        {
            return Err(response.unexpected(format!(
                "after writing bytes {offset}-{end} the registry reports Range {range:?}"
            )));
        }
        response.location()
    }

    /// PUT `<location>?digest=<digest>` with the last (or only) bytes of the blob.
    async fn finish_upload(
        &self,
        repo: &Repository,
        location: &Uri,
        digest: &Digest,
        data: Bytes,
    ) -> Result<()> {
        let uri = with_query(location, "digest", &digest.to_string())?;
        let call = Call::new(Kind::Upload, Method::PUT, uri, push_scope(repo))
            .header(header::CONTENT_TYPE, OCTET_STREAM)
            .body(data);
        let mut retry = Retry::new(self.config().retries);
        let response = self.execute(&call, &mut retry).await?;
        response
            .expect(&[StatusCode::CREATED, StatusCode::NO_CONTENT])
            .await?;
        Ok(())
    }

    /// DELETE the upload session so the registry can drop what it received. Failures are only
    /// logged: the caller is already returning the error that made it cancel.
    async fn cancel_upload(&self, repo: &Repository, location: &Uri) {
        let call = Call::new(
            Kind::Upload,
            Method::DELETE,
            location.clone(),
            push_scope(repo),
        );
        let mut retry = Retry::new(0);
        match self.execute(&call, &mut retry).await {
            Ok(r) if r.status.is_success() || r.status == StatusCode::NOT_FOUND => {
                tracing::debug!(url = %display_url(location), "cancelled upload");
            }
            Ok(r) => tracing::debug!(status = %r.status, "cancelling the upload failed"),
            Err(error) => tracing::debug!(%error, "cancelling the upload failed"),
        }
    }
}

fn push_scope(repo: &Repository) -> Scope<'_> {
    Scope {
        registry: &repo.registry,
        repository: &repo.name,
        access: Access::Push,
    }
}

/// Up to `size` bytes; fewer only at the end of the file.
async fn read_chunk(file: &mut tokio::fs::File, size: usize) -> std::io::Result<Bytes> {
    let mut buf = vec![0u8; size];
    let mut filled = 0;
    while filled < size {
        let n = file.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    buf.truncate(filled);
    Ok(Bytes::from(buf))
}
