//! Flags every command that talks to a registry shares, and the client built from them.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use streamsnap_registry::{Client, ClientConfig, CredentialStore, Credentials, Reference};

#[derive(Debug, clap::Args)]
pub struct RegistryArgs {
    /// Reach the image's registry over plain HTTP (localhost and 127.0.0.0/8 always are).
    #[arg(long)]
    pub plain_http: bool,
    /// Registry user name (with --password-stdin or STREAMSNAP_PASSWORD). Without it,
    /// credentials come from the docker config.
    #[arg(long, env = "STREAMSNAP_USERNAME")]
    pub username: Option<String>,
    /// Read the registry password from standard input.
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
    /// Docker config file with registry credentials [default: $DOCKER_CONFIG/config.json or
    /// ~/.docker/config.json].
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

pub fn parse_reference(image: &str) -> anyhow::Result<Reference> {
    Ok(Reference::parse(image)?)
}
