//! Flags every command that talks to a registry shares, and the client built from them.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use streamsnap_registry::{Client, ClientConfig, CredentialStore, Credentials, Reference};

#[derive(Debug, clap::Args)]
pub struct RegistryArgs {
    /// Reach the registry over plain HTTP (localhost and 127.0.0.0/8 always are, unless
    /// --https).
    #[arg(long)]
    pub plain_http: bool,
    /// Reach a loopback registry (localhost, 127.0.0.0/8, [::1]) over HTTPS all the same, e.g. a
    /// node-local registry with TLS (its CA from the system roots, which honour SSL_CERT_FILE).
    #[arg(long, conflicts_with = "plain_http")]
    pub https: bool,
    /// Registry user name (with --password-stdin or STREAMSNAP_PASSWORD). Without it,
    /// credentials come from the docker config.
    #[arg(long, env = "STREAMSNAP_USERNAME")]
    pub username: Option<String>,
    /// Read the registry password from standard input.
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
    /// Docker config file with registry credentials; a file named here must exist [default:
    /// $DOCKER_CONFIG/config.json or ~/.docker/config.json, no credentials when absent].
    #[arg(long, value_name = "FILE")]
    pub docker_config: Option<PathBuf>,
    /// Seconds to wait for a registry response before retrying.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub timeout: u64,
}

impl RegistryArgs {
    pub fn client_for(&self, reference: &Reference) -> anyhow::Result<Client> {
        self.client_for_registry(&reference.repository.registry)
    }

    /// A client for `registry` (`host[:port]`).
    pub fn client_for_registry(&self, registry: &str) -> anyhow::Result<Client> {
        let registry = &registry.to_owned();
        let mut credentials = CredentialStore::from_docker_config(self.docker_config.as_deref())
            .context("reading registry credentials")?;
        if let Some(username) = &self.username {
            let password = self.password()?;
            credentials.insert(registry, Credentials::new(username.clone(), password));
        }
        let config = ClientConfig {
            credentials,
            plain_http: if self.plain_http {
                vec![registry.clone()]
            } else {
                Vec::new()
            },
            https: if self.https {
                vec![registry.clone()]
            } else {
                Vec::new()
            },
            request_timeout: Duration::from_secs(self.timeout.max(1)),
            ..ClientConfig::default()
        };
        Client::new(config).context("setting up the registry client")
    }

    fn password(&self) -> anyhow::Result<String> {
        if self.password_stdin {
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .context("reading the password from stdin")?;
            return Ok(password.trim_end_matches(['\r', '\n']).to_owned());
        }
        match std::env::var("STREAMSNAP_PASSWORD") {
            Ok(password) => Ok(password),
            Err(_) => bail!(
                "--username needs a password: pass --password-stdin or set STREAMSNAP_PASSWORD"
            ),
        }
    }
}

/// `--image`: `HOST[:PORT]/REPO:TAG` or `HOST[:PORT]/REPO@DIGEST`. A short name (`busybox`,
/// `user/app`) means Docker Hub, as for docker and the kubelet: a notice on stderr names the
/// image it expands to.
pub fn parse_reference(image: &str) -> anyhow::Result<Reference> {
    reject_scheme(image, "use --plain-http for a registry served over HTTP")?;
    let reference = Reference::parse(image)?;
    if let Some(notice) = short_name_notice(image, &reference) {
        eprintln!("{notice}");
    }
    Ok(reference)
}

/// An image or registry written as a URL (`http://host:5000/app:1`) gets an error that says how
/// to write it, instead of "port must be a number". `hint` says how to choose HTTP.
pub fn reject_scheme(image: &str, hint: &str) -> anyhow::Result<()> {
    if let Some((scheme, rest)) = image.split_once("://") {
        bail!(
            "{image:?} has a scheme ({scheme}://): give the reference without a scheme: \
             HOST[:PORT]/REPO:TAG (here {rest}); {hint}"
        );
    }
    Ok(())
}

/// `busybox` -> "notice: busybox names no registry: using docker.io/library/busybox:latest ...".
pub fn short_name_notice(image: &str, reference: &Reference) -> Option<String> {
    Reference::is_short_name(image).then(|| {
        format!(
            "notice: {image} names no registry: using {reference} (Docker Hub, as docker and \
             the kubelet do); write HOST[:PORT]/REPO:TAG to use another registry"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_with_a_scheme_says_how_to_write_it() {
        let error = parse_reference("HTTP://127.0.0.1:5000/app:1")
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "\"HTTP://127.0.0.1:5000/app:1\" has a scheme (HTTP://): give the reference without \
             a scheme: HOST[:PORT]/REPO:TAG (here 127.0.0.1:5000/app:1); use --plain-http for a \
             registry served over HTTP"
        );
        assert!(!error.contains("port must be a number"));
    }

    #[test]
    fn short_names_go_to_docker_hub_with_a_notice() {
        let reference = parse_reference("busybox").unwrap();
        assert_eq!(reference.to_string(), "docker.io/library/busybox:latest");
        let notice = short_name_notice("busybox", &reference).unwrap();
        assert!(
            notice.starts_with(
                "notice: busybox names no registry: using docker.io/library/busybox:latest"
            ),
            "{notice}"
        );
        let full = parse_reference("127.0.0.1:5000/app:1").unwrap();
        assert_eq!(short_name_notice("127.0.0.1:5000/app:1", &full), None);
        let hub = parse_reference("docker.io/library/busybox:1.36").unwrap();
        assert_eq!(
            short_name_notice("docker.io/library/busybox:1.36", &hub),
            None
        );
    }
}
