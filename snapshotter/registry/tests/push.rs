//! Writes against an in-memory registry: blob uploads (monolithic and chunked), manifests, and
//! referrers through the API or the fallback tag.

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use common::*;
use http::Method;
use streamsnap_format::oci::{Descriptor, ImageIndex, ImageManifest};
use streamsnap_format::{Digest, media};
use streamsnap_registry::{Error, ReferrersSource, Repository, fallback_tag};

#[tokio::test]
async fn monolithic_push_posts_then_puts_and_skips_existing_blobs() {
    let (server, state) = fake_registry(|_| {}).await;
    let repo = Repository::new(server.registry(), "a/b");
    let data = blob_data(5000);
    let digest = Digest::sha256(&data);
    let c = client(|_| {});
    c.push_blob(&repo, &digest, data.clone()).await.unwrap();
    assert_eq!(state.lock().unwrap().blobs[&digest], data);
    let methods: Vec<String> = server
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path()))
        .collect();
    assert_eq!(
        methods,
        [
            format!("HEAD /v2/a/b/blobs/{digest}"),
            "POST /v2/a/b/blobs/uploads/".to_owned(),
            "PUT /v2/a/b/blobs/uploads/u1".to_owned(),
        ]
    );
    let put = &server.requests()[2];
    assert_eq!(
        put.query(),
        format!("_state=s0&digest=sha256%3A{}", digest.hex())
    );
    assert_eq!(put.header("content-length"), Some("5000"));
    assert_eq!(server.requests()[1].header("content-length"), Some("0"));

    c.push_blob(&repo, &digest, data).await.unwrap();
    assert_eq!(server.requests().len(), 4, "second push should only HEAD");
    assert_eq!(c.blob_size(&repo, &digest).await.unwrap(), Some(5000));
}

#[tokio::test]
async fn chunked_push_patches_in_order_following_locations() {
    let (server, state) = fake_registry(|_| {}).await;
    let repo = Repository::new(server.registry(), "a/b");
    let data = blob_data(25);
    let digest = Digest::sha256(&data);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    std::fs::write(&path, &data).unwrap();
    let c = client(|c| c.upload_chunk_size = 10);
    c.push_blob_file(&repo, &digest, &path).await.unwrap();
    assert_eq!(state.lock().unwrap().blobs[&digest], data);

    let patches = server.requests_to(&Method::PATCH, "/uploads/");
    let ranges: Vec<&str> = patches
        .iter()
        .map(|r| r.header("content-range").unwrap())
        .collect();
    assert_eq!(ranges, ["0-9", "10-19", "20-24"]);
    // Each PATCH goes to the Location the previous answer gave (relative, then absolute).
    let states: Vec<&str> = patches.iter().map(|r| r.query()).collect();
    assert_eq!(states, ["_state=s0", "_state=s10", "_state=s20"]);
    for (p, chunk) in patches.iter().zip(data.chunks(10)) {
        assert_eq!(p.body.as_ref(), chunk);
        assert_eq!(p.header("content-type"), Some("application/octet-stream"));
    }
    let put = &server.requests_to(&Method::PUT, "/uploads/")[0];
    assert!(put.body.is_empty());
    assert_eq!(
        put.query(),
        format!("_state=s25&digest=sha256%3A{}", digest.hex())
    );

    // Already there: only a HEAD.
    let before = server.requests().len();
    c.push_blob_file(&repo, &digest, &path).await.unwrap();
    assert_eq!(server.requests().len(), before + 1);
}

#[tokio::test]
async fn chunked_push_of_an_empty_file_puts_once() {
    let (server, state) = fake_registry(|_| {}).await;
    let repo = Repository::new(server.registry(), "a");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty");
    std::fs::write(&path, b"").unwrap();
    let digest = Digest::sha256(b"");
    client(|_| {})
        .push_blob_file(&repo, &digest, &path)
        .await
        .unwrap();
    assert!(state.lock().unwrap().blobs.contains_key(&digest));
    assert!(server.requests_to(&Method::PATCH, "/").is_empty());
}

#[tokio::test]
async fn failed_chunked_push_cancels_the_upload() {
    let (server, state) = fake_registry(|r| r.fail_patch = Some(500)).await;
    let repo = Repository::new(server.registry(), "a");
    let data = blob_data(30);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    std::fs::write(&path, &data).unwrap();
    let c = client(|c| {
        c.upload_chunk_size = 10;
        c.retries = 3;
    });
    let e = c
        .push_blob_file(&repo, &Digest::sha256(&data), &path)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(http::StatusCode::INTERNAL_SERVER_ERROR));
    assert_eq!(
        server.requests_to(&Method::PATCH, "/").len(),
        1,
        "PATCH is not retried"
    );
    let deletes = server.requests_to(&Method::DELETE, "/blobs/uploads/u1");
    assert_eq!(deletes.len(), 1);
    assert!(state.lock().unwrap().uploads.is_empty());
}

#[tokio::test]
async fn chunked_push_of_content_not_matching_the_digest_is_refused_before_commit() {
    let (server, state) = fake_registry(|_| {}).await;
    let repo = Repository::new(server.registry(), "a");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    std::fs::write(&path, b"actual content").unwrap();
    let claimed = Digest::sha256(b"claimed content");
    let e = client(|_| {})
        .push_blob_file(&repo, &claimed, &path)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::FileDigestMismatch { .. }), "{e:?}");
    assert!(server.requests_to(&Method::PUT, "/").is_empty());
    assert_eq!(server.requests_to(&Method::DELETE, "/uploads/").len(), 1);
    assert!(state.lock().unwrap().blobs.is_empty());
    let e = client(|_| {})
        .push_blob_file(&repo, &claimed, &dir.path().join("missing"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
}

fn image_manifest(
    layer: &[u8],
    subject: Option<Descriptor>,
    artifact_type: Option<&str>,
) -> ImageManifest {
    let mut annotations = BTreeMap::new();
    annotations.insert("k".to_owned(), String::from_utf8_lossy(layer).into_owned());
    ImageManifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.to_owned()),
        artifact_type: artifact_type.map(str::to_owned),
        config: Descriptor::of(media::OCI_EMPTY, media::OCI_EMPTY_CONTENT),
        layers: vec![Descriptor::of("application/x-test", layer)],
        subject,
        annotations,
    }
}

#[tokio::test]
async fn manifests_put_get_head_delete() {
    let (server, _) = fake_registry(|_| {}).await;
    let repo = Repository::new(server.registry(), "a/b");
    let c = client(|_| {});
    let bytes = Bytes::from(serde_json::to_vec(&image_manifest(b"l", None, None)).unwrap());
    let digest = Digest::sha256(&bytes);
    let put = c
        .put_manifest(&repo, "v1", media::OCI_MANIFEST, bytes.clone())
        .await
        .unwrap();
    assert_eq!(put.digest, digest);
    assert!(!put.subject_acknowledged);
    let puts = server.requests_to(&Method::PUT, "/manifests/v1");
    assert_eq!(puts[0].header("content-type"), Some(media::OCI_MANIFEST));
    assert_eq!(puts[0].body, bytes);

    let m = c.get_manifest(&repo, "v1").await.unwrap();
    assert_eq!(
        (m.media_type.as_str(), m.digest, &m.bytes),
        (media::OCI_MANIFEST, digest, &bytes)
    );
    let accept = server.requests_to(&Method::GET, "/manifests/v1")[0]
        .header("accept")
        .unwrap()
        .to_owned();
    for mt in media::MANIFEST_ACCEPT {
        assert!(accept.contains(mt), "{accept} lacks {mt}");
    }
    assert_eq!(
        c.get_manifest(&repo, &digest.to_string())
            .await
            .unwrap()
            .bytes,
        bytes
    );

    let d = c.head_manifest(&repo, "v1").await.unwrap().unwrap();
    assert_eq!(
        d,
        Descriptor::new(media::OCI_MANIFEST, digest, bytes.len() as u64)
    );
    assert_eq!(c.head_manifest(&repo, "nope").await.unwrap(), None);

    c.delete_manifest(&repo, &digest).await.unwrap();
    let e = c.get_manifest(&repo, "v1").await.unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
    assert!(e.to_string().contains("MANIFEST_UNKNOWN"), "{e}");
    let e = c.delete_manifest(&repo, &digest).await.unwrap_err();
    assert!(e.is_not_found(), "{e:?}");

    let e = c
        .put_manifest(
            &repo,
            &Digest::sha256(b"other").to_string(),
            media::OCI_MANIFEST,
            bytes,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e:?}");
}

#[tokio::test]
async fn manifest_by_digest_is_verified_and_size_limited() {
    let good = Bytes::from_static(br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#);
    let digest = Digest::sha256(&good);
    let server = Server::start(move |r| {
        if r.path().ends_with("/huge") {
            return respond(200, &[("content-type", "application/json")], full(vec![b' '; (4 << 20) + 1]));
        }
        // A registry serving other content than asked for, with a generic content type.
        respond(200, &[("content-type", "application/json")], full(r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[ ]}"#))
    })
    .await;
    let repo = Repository::new(server.registry(), "a");
    let c = client(|_| {});
    let e = c
        .get_manifest(&repo, &digest.to_string())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e:?}");
    let m = c.get_manifest(&repo, "tag").await.unwrap();
    assert_eq!(
        m.media_type,
        media::OCI_INDEX,
        "falls back to the JSON mediaType"
    );
    let e = c.get_manifest(&repo, "huge").await.unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
}

#[tokio::test]
async fn referrers_through_the_fallback_tag() {
    let (server, state) = fake_registry(|_| {}).await;
    let repo = Repository::new(server.registry(), "a/b");
    let c = client(|_| {});
    let subject_bytes =
        Bytes::from(serde_json::to_vec(&image_manifest(b"image", None, None)).unwrap());
    let subject = c
        .put_manifest(&repo, "v1", media::OCI_MANIFEST, subject_bytes.clone())
        .await
        .unwrap()
        .digest;
    let subject_desc = Descriptor::of(media::OCI_MANIFEST, &subject_bytes);

    // No referrers yet: API 404, no fallback tag -> empty.
    let r = c.referrers(&repo, &subject, None).await.unwrap();
    assert_eq!(
        (r.manifests.len(), r.source),
        (0, ReferrersSource::FallbackTag)
    );

    let streaming = image_manifest(b"s", Some(subject_desc.clone()), Some(media::ARTIFACT_TYPE));
    let other = image_manifest(b"sig", Some(subject_desc.clone()), None); // artifactType from config
    let d1 = c.push_referrer(&repo, &streaming).await.unwrap();
    let d2 = c.push_referrer(&repo, &other).await.unwrap();
    assert_eq!(d1.artifact_type.as_deref(), Some(media::ARTIFACT_TYPE));
    assert_eq!(d2.artifact_type.as_deref(), Some(media::OCI_EMPTY));
    assert_eq!(d1.annotations["k"], "s");
    assert_eq!(d1.media_type, media::OCI_MANIFEST);
    // Pushing again does not duplicate the entry.
    assert_eq!(c.push_referrer(&repo, &streaming).await.unwrap(), d1);

    let tag = fallback_tag(&subject);
    let (mt, index_bytes) = state.lock().unwrap().manifests[&tag].clone();
    assert_eq!(mt, media::OCI_INDEX);
    let index: ImageIndex = serde_json::from_slice(&index_bytes).unwrap();
    assert_eq!(index.manifests, vec![d1.clone(), d2.clone()]);
    assert_eq!(index.media_type.as_deref(), Some(media::OCI_INDEX));
    // The referrer itself was PUT by digest.
    let stored = state.lock().unwrap().manifests[&d1.digest.to_string()]
        .1
        .clone();
    assert_eq!(Digest::sha256(&stored), d1.digest);

    let all = c.referrers(&repo, &subject, None).await.unwrap();
    assert_eq!(all.manifests, vec![d1.clone(), d2.clone()]);
    let filtered = c
        .referrers(&repo, &subject, Some(media::ARTIFACT_TYPE))
        .await
        .unwrap();
    assert_eq!(
        (filtered.manifests, filtered.source),
        (vec![d1.clone()], ReferrersSource::FallbackTag)
    );
    let api_call = server
        .requests_to(&Method::GET, "/referrers/")
        .pop()
        .unwrap();
    assert_eq!(
        api_call.query(),
        "artifactType=application%2Fvnd.streamsnap.streaming.v1"
    );

    // Remove one: the index is rewritten; remove the last: the tag goes.
    c.remove_referrer(&repo, &subject, &d2.digest)
        .await
        .unwrap();
    let index: ImageIndex =
        serde_json::from_slice(&state.lock().unwrap().manifests[&tag].1).unwrap();
    assert_eq!(index.manifests, vec![d1.clone()]);
    assert!(
        !state
            .lock()
            .unwrap()
            .manifests
            .contains_key(&d2.digest.to_string())
    );
    c.remove_referrer(&repo, &subject, &d1.digest)
        .await
        .unwrap();
    assert!(!state.lock().unwrap().manifests.contains_key(&tag));
    assert!(
        !state
            .lock()
            .unwrap()
            .manifests
            .contains_key(&d1.digest.to_string())
    );
    assert!(
        c.referrers(&repo, &subject, None)
            .await
            .unwrap()
            .manifests
            .is_empty()
    );
    // The subject is untouched, and removing again is fine.
    assert_eq!(c.get_manifest(&repo, "v1").await.unwrap().digest, subject);
    c.remove_referrer(&repo, &subject, &d1.digest)
        .await
        .unwrap();
}

#[tokio::test]
async fn referrers_through_the_api_and_oci_subject() {
    let (server, state) = fake_registry(|r| {
        r.referrers_api = true;
        r.oci_subject = true;
    })
    .await;
    let repo = Repository::new(server.registry(), "a/b");
    let c = client(|_| {});
    let subject_desc = Descriptor::of(media::OCI_MANIFEST, b"{}");
    let subject = subject_desc.digest;
    let d1 = c
        .push_referrer(
            &repo,
            &image_manifest(b"s", Some(subject_desc.clone()), Some(media::ARTIFACT_TYPE)),
        )
        .await
        .unwrap();
    let d2 = c
        .push_referrer(
            &repo,
            &image_manifest(b"x", Some(subject_desc.clone()), Some("application/other")),
        )
        .await
        .unwrap();
    // OCI-Subject was returned: no fallback tag was read or written.
    assert!(
        !state
            .lock()
            .unwrap()
            .manifests
            .contains_key(&fallback_tag(&subject))
    );
    assert!(
        server
            .requests()
            .iter()
            .all(|r| !r.path().contains("sha256-"))
    );

    // The fake ignores artifactType; the client filters.
    let r = c
        .referrers(&repo, &subject, Some(media::ARTIFACT_TYPE))
        .await
        .unwrap();
    assert_eq!(r.source, ReferrersSource::Api);
    assert_eq!(r.manifests.len(), 1);
    assert_eq!(r.manifests[0].digest, d1.digest);
    let r = c.referrers(&repo, &subject, None).await.unwrap();
    let mut digests: Vec<Digest> = r.manifests.iter().map(|d| d.digest).collect();
    digests.sort();
    let mut want = vec![d1.digest, d2.digest];
    want.sort();
    assert_eq!(digests, want);
    let req = server
        .requests_to(&Method::GET, "/referrers/")
        .pop()
        .unwrap();
    assert_eq!(req.path(), format!("/v2/a/b/referrers/{subject}"));
    assert_eq!(req.header("accept"), Some(media::OCI_INDEX));
}

#[tokio::test]
async fn referrers_api_pages_are_followed() {
    let d = |n: u8| Descriptor::of(media::OCI_MANIFEST, &[n]);
    let (p1, p2) = (d(1), d(2));
    let server = Server::start(move |r| {
        let index =
            |m: &Descriptor| serde_json::json!({"schemaVersion":2,"manifests":[m]}).to_string();
        if r.query().contains("page=2") {
            respond(200, &[], full(index(&p2)))
        } else {
            respond(
                200,
                &[("link", r#"</v2/a/referrers/x?page=2>; rel="next""#)],
                full(index(&p1)),
            )
        }
    })
    .await;
    let repo = Repository::new(server.registry(), "a");
    let r = client(|_| {})
        .referrers(&repo, &Digest::sha256(b"s"), None)
        .await
        .unwrap();
    assert_eq!(r.manifests, vec![d(1), d(2)]);
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn push_referrer_requires_a_subject() {
    let c = client(|_| {});
    let repo = Repository::new("127.0.0.1:1", "a");
    let e = c
        .push_referrer(&repo, &image_manifest(b"s", None, None))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::MissingSubject), "{e:?}");
}

/// distribution 2.8 answers a manifest PUT 400 when a blob it names is still being committed by
/// a concurrent upload of the same blob; the PUT is tried again a few times, then fails.
#[tokio::test]
async fn a_manifest_put_racing_a_blob_commit_is_tried_again() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let refusals = std::sync::Arc::new(AtomicU32::new(2));
    let left = refusals.clone();
    let server = Server::start(move |r| {
        if r.method != Method::PUT {
            return status(404);
        }
        if left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return respond(
                400,
                &[("content-type", "application/json")],
                full(r#"{"errors":[{"code":"MANIFEST_BLOB_UNKNOWN","message":"blob unknown to registry"}]}"#),
            );
        }
        respond(201, &[], empty())
    })
    .await;
    let repo = Repository::new(server.registry(), "a/b");
    let c = client(|_| {});
    let put = c
        .put_manifest(&repo, "v1", media::OCI_MANIFEST, Bytes::from_static(b"{}"))
        .await
        .unwrap();
    assert_eq!(put.digest, Digest::sha256(b"{}"));
    assert_eq!(server.requests_to(&Method::PUT, "/manifests/").len(), 3);

    // A blob that stays unknown: the fourth answer is the error.
    refusals.store(u32::MAX, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let error = c
        .put_manifest(&repo, "v1", media::OCI_MANIFEST, Bytes::from_static(b"{}"))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, Error::Status { code: Some(code), .. } if code == "MANIFEST_BLOB_UNKNOWN"),
        "{error}"
    );
    assert_eq!(server.requests_to(&Method::PUT, "/manifests/").len(), 3 + 4);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));

    // Other 400s are not tried again.
    let server = Server::start(|_| {
        respond(
            400,
            &[],
            full(r#"{"errors":[{"code":"MANIFEST_INVALID","message":"manifest invalid"}]}"#),
        )
    })
    .await;
    let repo = Repository::new(server.registry(), "a/b");
    c.put_manifest(&repo, "v1", media::OCI_MANIFEST, Bytes::from_static(b"{}"))
        .await
        .unwrap_err();
    assert_eq!(server.requests().len(), 1);
}
