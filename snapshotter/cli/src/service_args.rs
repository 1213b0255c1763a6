//! `--server` and `--token-file` of the `artifact-streaming` verbs: where the conversion
//! service is, and the API token to call it with.

use std::path::PathBuf;

use anyhow::{Context, bail};
use streamsnap_service::{Secret, ServiceClient};

/// Environment variable holding the API token itself (`--token-file` wins over it).
const TOKEN_ENV: &str = "STREAMSNAP_TOKEN";

#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// The conversion service (`streamsnap serve`), e.g. http://127.0.0.1:8080. `update`,
    /// `show` and `operation` need it; `create` starts an operation there instead of
    /// converting locally; `profile` does not use it.
    #[arg(long, env = "STREAMSNAP_SERVER", global = true, value_name = "URL")]
    pub server: Option<String>,
    /// File holding the service's API token (the one `serve --token-file` reads) [default:
    /// the token in the STREAMSNAP_TOKEN variable].
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

impl ServerArgs {
    /// The client, if a server was named.
    pub fn client(&self) -> anyhow::Result<Option<ServiceClient>> {
        let Some(server) = &self.server else {
            return Ok(None);
        };
        let token = match &self.token_file {
            Some(path) => Some(
                Secret::from_file(path)
                    .with_context(|| format!("reading the API token from {}", path.display()))?,
            ),
            None => std::env::var(TOKEN_ENV).ok().and_then(Secret::new),
        };
        Ok(Some(ServiceClient::new(server, token.as_ref())?))
    }

    /// The client; `verb` needs a server.
    pub fn require(&self, verb: &str) -> anyhow::Result<ServiceClient> {
        match self.client()? {
            Some(client) => Ok(client),
            None => bail!(
                "`{verb}` talks to the conversion service: pass --server URL or set \
                 STREAMSNAP_SERVER (and --token-file FILE or STREAMSNAP_TOKEN)"
            ),
        }
    }
}

/// Splits `REPO:TAG`, `REPO@DIGEST` or `REPO` (tag `latest`) into the repository and the
/// reference. The repository may carry the service's registry host (`HOST/REPO:TAG`): the
/// service drops it.
pub fn split_image(image: &str) -> anyhow::Result<(String, String)> {
    if let Some((scheme, rest)) = image.split_once("://") {
        bail!(
            "{image:?} has a scheme ({scheme}://): give the image without one, as REPO:TAG or \
             REPO@DIGEST relative to the service's registry (here {rest}); the service reaches \
             its registry the way `serve --plain-http` says"
        );
    }
    let (repo, reference) = match image.split_once('@') {
        Some((named, digest)) => (strip_tag(named), digest.to_owned()),
        None => match image.rfind(':') {
            Some(i) if !image[i..].contains('/') => (&image[..i], image[i + 1..].to_owned()),
            _ => (image, "latest".to_owned()),
        },
    };
    if repo.is_empty() || reference.is_empty() {
        bail!("{image:?} is not an image: write REPOSITORY:TAG or REPOSITORY@DIGEST");
    }
    Ok((repo.to_owned(), reference))
}

fn strip_tag(named: &str) -> &str {
    match named.rfind(':') {
        Some(i) if !named[i..].contains('/') => &named[..i],
        _ => named,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_split_into_repository_and_reference() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let cases = [
            ("team/app:1.4", ("team/app", "1.4")),
            ("team/app", ("team/app", "latest")),
            ("127.0.0.1:5000/app", ("127.0.0.1:5000/app", "latest")),
            ("127.0.0.1:5000/app:v2", ("127.0.0.1:5000/app", "v2")),
        ];
        for (image, (repo, reference)) in cases {
            assert_eq!(
                split_image(image).unwrap(),
                (repo.to_owned(), reference.to_owned()),
                "{image}"
            );
        }
        assert_eq!(
            split_image(&format!("app:v1@{d}")).unwrap(),
            ("app".to_owned(), d.to_owned())
        );
        assert!(split_image(":v1").is_err());
        let error = split_image("http://127.0.0.1:5000/app:v1")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("without one") && error.contains("127.0.0.1:5000/app:v1"),
            "{error}"
        );
        assert!(split_image("app@").is_err());
    }
}
