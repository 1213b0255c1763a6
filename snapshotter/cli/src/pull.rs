//! `streamsnap pull`: pulls an image through containerd's CRI image service, the call the
//! kubelet makes. containerd's CRI plugin then passes the `containerd.io/snapshot/cri.*` labels
//! (image ref, manifest and layer digests) with each Prepare, which a remote snapshotter needs to
//! mount layers lazily; a plain `ctr images pull` sends none and downloads every layer.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{AuthConfig, ImageSpec, PullImageRequest};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::output::Format;

/// containerd's gRPC socket on a stock node.
const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";
/// How long connecting to the socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra time past `--timeout` for containerd to report its own deadline error.
const DEADLINE_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image to pull, as a pod spec names it: REGISTRY/REPO:TAG or REGISTRY/REPO@DIGEST, no
    /// scheme. containerd puts a name without a registry (busybox) on Docker Hub
    /// (docker.io/library/busybox:latest); a notice on stderr says so.
    image: String,
    /// containerd's gRPC socket.
    #[arg(long, value_name = "PATH", env = "STREAMSNAP_CONTAINERD_SOCKET",
          default_value = DEFAULT_SOCKET)]
    containerd_socket: PathBuf,
    /// Seconds the whole pull may take.
    #[arg(long, value_name = "SECONDS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// text: one line; json: {"image", "imageRef", "seconds"} on stdout.
    #[arg(long, value_enum, default_value_t)]
    output: Format,
    /// Registry user name, passed to containerd for this pull (with --password-stdin or
    /// STREAMSNAP_PASSWORD). Without it, containerd uses its own registry configuration.
    #[arg(long, env = "STREAMSNAP_USERNAME")]
    username: Option<String>,
    /// Read the registry password from standard input.
    #[arg(long, requires = "username")]
    password_stdin: bool,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    crate::registry_args::reject_scheme(
        &args.image,
        "containerd's registry configuration (its hosts.toml files) decides between HTTP and HTTPS",
    )?;
    // containerd expands a short name the same way; say so, as `--image` does elsewhere.
    if let Ok(reference) = streamsnap_registry::Reference::parse(&args.image)
        && let Some(notice) = crate::registry_args::short_name_notice(&args.image, &reference)
    {
        eprintln!("{notice}");
    }
    let auth = match &args.username {
        Some(username) => Some(AuthConfig {
            username: username.clone(),
            password: password(args.password_stdin)?,
            ..AuthConfig::default()
        }),
        None => None,
    };
    let timeout = Duration::from_secs(args.timeout);
    let started = Instant::now();
    let image_ref = tokio::time::timeout(
        timeout + DEADLINE_GRACE,
        pull(&args.containerd_socket, &args.image, auth, timeout),
    )
    .await
    .map_err(|_| deadline_error(&args.image, args.timeout))??;
    let seconds = started.elapsed().as_secs_f64();
    match args.output {
        Format::Json => {
            let doc = serde_json::json!({
                "image": args.image,
                "imageRef": image_ref,
                "seconds": seconds,
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        Format::Text => println!("pulled {} as {image_ref} in {seconds:.1} s", args.image),
    }
    Ok(())
}

/// One `ImageService/PullImage` call; returns the image ID containerd reports.
async fn pull(
    socket: &Path,
    image: &str,
    auth: Option<AuthConfig>,
    timeout: Duration,
) -> anyhow::Result<String> {
    let channel = connect(socket).await?;
    let mut client = ImageServiceClient::new(channel);
    let mut request = tonic::Request::new(PullImageRequest {
        image: Some(ImageSpec {
            image: image.to_owned(),
            ..ImageSpec::default()
        }),
        auth,
        sandbox_config: None,
    });
    // grpc-timeout: containerd cancels its pull when the deadline passes.
    request.set_timeout(timeout);
    tracing::info!(image, socket = %socket.display(), "pulling through containerd's CRI image service");
    match client.pull_image(request).await {
        Ok(response) => Ok(response.into_inner().image_ref),
        Err(status) => Err(status_error(&status, socket, image, timeout.as_secs())),
    }
}

/// A channel to containerd over its unix socket, with errors that say what to do.
async fn connect(socket: &Path) -> anyhow::Result<Channel> {
    match tokio::fs::metadata(socket).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "containerd socket {} not found: is containerd running? pass --containerd-socket",
            socket.display()
        ),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("checking containerd socket {}", socket.display()));
        }
    }
    let path = socket.to_owned();
    // The URI is a placeholder: the connector ignores it and dials the socket.
    let connected = Endpoint::from_static("http://[::]:50051")
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await;
    connected.map_err(|e| connect_error(socket, e))
}

fn connect_error(socket: &Path, error: tonic::transport::Error) -> anyhow::Error {
    let io_kind = {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
        let mut kind = None;
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                kind = Some(io.kind());
                break;
            }
            source = e.source();
        }
        kind
    };
    let socket = socket.display();
    let hint = match io_kind {
        Some(std::io::ErrorKind::PermissionDenied) => format!(
            "cannot connect to containerd socket {socket}: permission denied: run as root or as \
             a user allowed to use the socket"
        ),
        Some(std::io::ErrorKind::ConnectionRefused) => format!(
            "nothing listens on containerd socket {socket}: is containerd running? pass \
             --containerd-socket"
        ),
        _ => format!("cannot connect to containerd socket {socket}"),
    };
    anyhow::Error::new(error).context(hint)
}

/// What a failed `PullImage` means for the user. containerd's own message is kept whole: it says
/// which registry, reference or layer failed.
fn status_error(status: &tonic::Status, socket: &Path, image: &str, timeout: u64) -> anyhow::Error {
    let message = status.message();
    match status.code() {
        tonic::Code::Unimplemented => anyhow::anyhow!(
            "containerd's CRI plugin is disabled (containerd at {} does not serve \
             runtime.v1.ImageService: {message}): enable it (remove \"cri\" from \
             disabled_plugins in containerd's config.toml) and restart containerd",
            socket.display()
        ),
        tonic::Code::DeadlineExceeded => deadline_error(image, timeout),
        tonic::Code::Unavailable => anyhow::anyhow!(
            "containerd at {} is unavailable: {message}",
            socket.display()
        ),
        code => anyhow::anyhow!("containerd could not pull {image} ({code:?}): {message}"),
    }
}

fn deadline_error(image: &str, timeout: u64) -> anyhow::Error {
    anyhow::anyhow!("pulling {image} did not finish within {timeout} s: pass a larger --timeout")
}

fn password(from_stdin: bool) -> anyhow::Result<String> {
    if from_stdin {
        let mut password = String::new();
        std::io::stdin()
            .read_to_string(&mut password)
            .context("reading the password from stdin")?;
        return Ok(password.trim_end_matches(['\r', '\n']).to_owned());
    }
    std::env::var("STREAMSNAP_PASSWORD").map_err(|_| {
        anyhow::anyhow!(
            "--username needs a password: pass --password-stdin or set STREAMSNAP_PASSWORD"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_missing_socket_says_what_to_do() {
        let err = runtime()
            .block_on(connect(Path::new("/nonexistent/containerd.sock")))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "containerd socket /nonexistent/containerd.sock not found: is containerd running? \
             pass --containerd-socket"
        );
    }

    #[test]
    fn a_socket_nobody_listens_on_is_refused() {
        let dir = tempfile_dir();
        let socket = dir.join("dead.sock");
        // Bind and drop: the socket file stays, nothing accepts.
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        let err = runtime().block_on(connect(&socket)).unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            err.to_string()
                .starts_with("nothing listens on containerd socket"),
            "{err:#}"
        );
    }

    #[test]
    fn status_codes_map_to_actionable_errors() {
        let socket = Path::new("/run/c.sock");
        let unimplemented = tonic::Status::unimplemented("unknown service runtime.v1.ImageService");
        let err = status_error(&unimplemented, socket, "r/i:1", 600).to_string();
        assert!(
            err.starts_with("containerd's CRI plugin is disabled"),
            "{err}"
        );
        assert!(
            err.contains("unknown service runtime.v1.ImageService"),
            "{err}"
        );
        let not_found = tonic::Status::not_found("failed to resolve reference \"r/i:1\"");
        let err = status_error(&not_found, socket, "r/i:1", 600).to_string();
        assert_eq!(
            err,
            "containerd could not pull r/i:1 (NotFound): failed to resolve reference \"r/i:1\""
        );
        let late = tonic::Status::deadline_exceeded("context deadline exceeded");
        let err = status_error(&late, socket, "r/i:1", 7).to_string();
        assert!(err.contains("within 7 s: pass a larger --timeout"), "{err}");
    }

    /// A fresh dir under the system temp dir (the crate has no tempfile dependency).
    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "streamsnap-pull-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
