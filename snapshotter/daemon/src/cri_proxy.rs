//! An optional CRI image-service proxy, so images pulled with Kubernetes image pull secrets
//! stream too.
//!
//! Pull secrets reach containerd only inside CRI `PullImageRequest.auth`; a snapshotter never
//! sees them. With `[cri_proxy] address` set, the daemon serves the CRI `ImageService` on that
//! socket and the kubelet's `--image-service-endpoint` points at it: every call is forwarded to
//! containerd's CRI socket unchanged (the answers come back unchanged), and the `AuthConfig` of
//! each `PullImage` is kept, in memory only, for that image's repository, so that the layers
//! containerd then prepares on this snapshotter are read with it. A credential is never used for
//! another repository (an image of another repository pulled without credentials falls back as
//! containerd would), never written to disk, never logged.
//!
//! Kept credentials are lost when the daemon restarts: until the image is pulled again, reads of
//! chunks not yet cached fail for its remounted layers (docs/deploy.md, "Image pull secrets").

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine as _;
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::image_service_server::{ImageService, ImageServiceServer};
use k8s_cri::v1::{
    AuthConfig, ImageFsInfoRequest, ImageFsInfoResponse, ImageStatusRequest, ImageStatusResponse,
    ListImagesRequest, ListImagesResponse, PullImageRequest, PullImageResponse, RemoveImageRequest,
    RemoveImageResponse,
};
use streamsnap_registry::{Credentials, Reference};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

/// Most repositories whose pull secrets are kept (least recently pulled dropped first).
const MAX_KEPT: usize = 4096;
/// How long connecting to containerd may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The credentials of the pull secrets seen in `PullImage` calls, by (registry, repository).
#[derive(Default)]
pub struct PullSecrets {
    entries: Mutex<HashMap<(String, String), (Credentials, Instant)>>,
}

impl std::fmt::Debug for PullSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self.entries.lock().map(|e| e.len()).unwrap_or(0);
        f.debug_struct("PullSecrets")
            .field("repositories", &count)
            .finish()
    }
}

impl PullSecrets {
    /// Keeps `auth` for the repository `image` names. An empty or unusable `auth` (a bearer
    /// `registry_token` only) keeps nothing; it returns whether something was kept.
    pub fn remember(&self, image: &str, auth: &AuthConfig) -> bool {
        let Ok(reference) = Reference::parse(image) else {
            return false;
        };
        let Some(credentials) = credentials_of(auth) else {
            if !auth.registry_token.is_empty() {
                tracing::info!(
                    image,
                    "the pull carries a bearer registry token only: its layers are pulled by \
                     containerd, not streamed"
                );
            }
            return false;
        };
        let key = (
            reference.repository.registry.to_ascii_lowercase(),
            reference.repository.name.clone(),
        );
        let mut entries = self.entries.lock().expect("pull secrets lock");
        if entries.len() >= MAX_KEPT && !entries.contains_key(&key) {
            let oldest = entries
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                entries.remove(&oldest);
            }
        }
        entries.insert(key, (credentials, Instant::now()));
        true
    }

    /// The credentials kept for `repository` of `registry`, if a pull brought some.
    pub fn lookup(&self, registry: &str, repository: &str) -> Option<Credentials> {
        self.entries
            .lock()
            .expect("pull secrets lock")
            .get(&(registry.to_ascii_lowercase(), repository.to_owned()))
            .map(|(c, _)| c.clone())
    }
}

impl streamsnap_registry::CredentialSource for PullSecrets {
    fn credentials<'a>(
        &'a self,
        registry: &'a str,
        repository: &'a str,
    ) -> streamsnap_registry::BoxFuture<'a, Option<Credentials>> {
        let found = self.lookup(registry, repository);
        Box::pin(async move { found })
    }
}

/// Username and password from an `AuthConfig`: the fields, the `auth` (base64 `user:pass`), or
/// an identity token (an OAuth2 refresh token, which registries such as ACR take as the
/// password of the token endpoint's basic auth).
fn credentials_of(auth: &AuthConfig) -> Option<Credentials> {
    if !auth.username.is_empty() && !auth.password.is_empty() {
        return Some(Credentials::new(&auth.username, &auth.password));
    }
    if !auth.auth.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.auth.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, pass) = text.split_once(':')?;
        return Some(Credentials::new(user, pass));
    }
    if !auth.identity_token.is_empty() {
        let user = if auth.username.is_empty() {
            "<token>"
        } else {
            &auth.username
        };
        return Some(Credentials::new(user, &auth.identity_token));
    }
    None
}

/// The proxy: containerd's CRI image service behind, the pull secrets beside.
#[derive(Debug)]
pub struct ImageProxy {
    containerd: PathBuf,
    upstream: tokio::sync::OnceCell<ImageServiceClient<Channel>>,
    secrets: Arc<PullSecrets>,
}

impl ImageProxy {
    pub fn new(containerd: PathBuf, secrets: Arc<PullSecrets>) -> Self {
        Self {
            containerd,
            upstream: tokio::sync::OnceCell::new(),
            secrets,
        }
    }

    /// A client of containerd's image service (connected on first use, reconnecting itself).
    async fn upstream(&self) -> Result<ImageServiceClient<Channel>, Status> {
        let path = self.containerd.clone();
        let client = self
            .upstream
            .get_or_try_init(|| async move {
                // The URI is a placeholder: the connector dials the socket.
                let channel = Endpoint::from_static("http://[::]:50051")
                    .connect_timeout(CONNECT_TIMEOUT)
                    .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(stream))
                        }
                    }));
                Ok::<_, Status>(ImageServiceClient::new(channel))
            })
            .await?;
        Ok(client.clone())
    }
}

/// Forwards a request with its metadata (deadline included) and returns containerd's answer.
fn forward<T>(request: Request<T>) -> Request<T> {
    let (metadata, extensions, message) = request.into_parts();
    Request::from_parts(metadata, extensions, message)
}

#[tonic::async_trait]
impl ImageService for ImageProxy {
    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        self.upstream().await?.list_images(forward(request)).await
    }

    async fn image_status(
        &self,
        request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        self.upstream().await?.image_status(forward(request)).await
    }

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let message = request.get_ref();
        if let (Some(image), Some(auth)) = (&message.image, &message.auth) {
            // Before forwarding: containerd prepares the layers during this very call.
            let kept = self.secrets.remember(&image.image, auth);
            tracing::debug!(image = image.image, kept, "pull with credentials");
        }
        self.upstream().await?.pull_image(forward(request)).await
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        self.upstream().await?.remove_image(forward(request)).await
    }

    async fn image_fs_info(
        &self,
        request: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        self.upstream().await?.image_fs_info(forward(request)).await
    }
}

/// Serves the proxy on `address` (a unix socket, mode 0660) until `shutdown` resolves.
pub async fn serve(
    address: &Path,
    containerd: PathBuf,
    secrets: Arc<PullSecrets>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if let Some(parent) = address.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::remove_file(address) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e)
                .with_context(|| format!("removing the old socket {}", address.display()));
        }
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(address)
        .with_context(|| format!("binding the CRI image proxy socket {}", address.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(address, std::fs::Permissions::from_mode(0o660))
            .with_context(|| format!("setting the mode of {}", address.display()))?;
    }
    tracing::info!(address = %address.display(), containerd = %containerd.display(), "serving the CRI image service proxy (point the kubelet's --image-service-endpoint here)");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(ImageServiceServer::new(ImageProxy::new(
            containerd, secrets,
        )))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("serving the CRI image proxy")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(user: &str, pass: &str) -> AuthConfig {
        AuthConfig {
            username: user.into(),
            password: pass.into(),
            ..AuthConfig::default()
        }
    }

    #[test]
    fn secrets_are_kept_per_repository_and_never_lent_to_another() {
        let secrets = PullSecrets::default();
        assert!(secrets.remember("reg.io:5000/team/app:1", &auth("u", "p")));
        let c = secrets.lookup("reg.io:5000", "team/app").unwrap();
        assert_eq!((c.username.as_str(), c.password()), ("u", "p"));
        assert!(secrets.lookup("reg.io:5000", "team/other").is_none());
        assert!(secrets.lookup("other.io", "team/app").is_none());
        // A later pull of the same repository replaces them.
        secrets.remember("reg.io:5000/team/app@sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", &auth("u2", "p2"));
        assert_eq!(
            secrets.lookup("reg.io:5000", "team/app").unwrap().username,
            "u2"
        );
        // Short names are Docker Hub's, as containerd reads them.
        secrets.remember("busybox", &auth("hub", "p"));
        assert!(secrets.lookup("docker.io", "library/busybox").is_some());
    }

    #[test]
    fn every_auth_form_is_read_and_a_bearer_token_alone_is_not_kept() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("user:pa:ss");
        let c = credentials_of(&AuthConfig {
            auth: b64,
            ..AuthConfig::default()
        })
        .unwrap();
        assert_eq!((c.username.as_str(), c.password()), ("user", "pa:ss"));
        let c = credentials_of(&AuthConfig {
            username: "00000000-0000-0000-0000-000000000000".into(),
            identity_token: "refresh".into(),
            ..AuthConfig::default()
        })
        .unwrap();
        assert_eq!(c.password(), "refresh");
        let bearer = AuthConfig {
            registry_token: "t".into(),
            ..AuthConfig::default()
        };
        assert!(credentials_of(&bearer).is_none());
        assert!(!PullSecrets::default().remember("reg.io/a:1", &bearer));
        assert!(credentials_of(&AuthConfig::default()).is_none());
        // Debug never shows a secret.
        let secrets = PullSecrets::default();
        secrets.remember("reg.io/a:1", &auth("u", "topsecret"));
        assert!(!format!("{secrets:?}").contains("topsecret"));
    }

    #[test]
    fn the_oldest_repository_goes_when_full() {
        let secrets = PullSecrets::default();
        for i in 0..=MAX_KEPT {
            secrets.remember(&format!("reg.io/r{i}:1"), &auth("u", "p"));
        }
        assert!(secrets.lookup("reg.io", "r0").is_none());
        assert!(secrets.lookup("reg.io", &format!("r{MAX_KEPT}")).is_some());
        assert_eq!(secrets.entries.lock().unwrap().len(), MAX_KEPT);
    }
}
