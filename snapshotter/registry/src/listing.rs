//! Listings: a repository's tags (`GET /v2/<name>/tags/list`) and the registry's catalog of
//! repositories (`GET /v2/_catalog`), both paginated with `Link: <...>; rel="next"`. What the
//! conversion service's web console shows; counted in metrics as manifest requests.

use http::{Method, StatusCode, Uri, header};
use serde::Deserialize;

use crate::auth::{Access, Scope};
use crate::blob::pull_scope;
use crate::client::Client;
use crate::error::{Error, Result};
use crate::manifest::MAX_MANIFEST_SIZE;
use crate::metrics::Kind;
use crate::reference::Repository;
use crate::referrers::next_link;
use crate::transport::{Call, Retry};

/// Entries asked for per page.
const PAGE: usize = 1000;
/// Pages followed at most: a listing stops (`truncated`) after this many.
const MAX_PAGES: usize = 20;

/// Names listed, in the registry's order, and whether the listing stopped before the end.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub names: Vec<String>,
    pub truncated: bool,
}

#[derive(Deserialize)]
struct TagsPage {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct CatalogPage {
    #[serde(default)]
    repositories: Option<Vec<String>>,
}

impl Client {
    /// The tags of `repo`. A repository the registry does not know is a not-found error.
    pub async fn list_tags(&self, repo: &Repository) -> Result<Listing> {
        let first = self.url(repo, &format!("tags/list?n={PAGE}"))?;
        self.list(first, pull_scope(repo), "tag list", |body, url| {
            let page: TagsPage =
                serde_json::from_slice(body).map_err(|source| Error::InvalidJson {
                    url: url.to_owned(),
                    what: "tag list",
                    source,
                })?;
            Ok(page.tags.unwrap_or_default())
        })
        .await
    }

    /// The repositories of `registry` (`host[:port]`), where the registry lists them (many
    /// hosted registries refuse the catalog: an error then).
    pub async fn catalog(&self, registry: &str) -> Result<Listing> {
        let probe = self.url(&Repository::new(registry, "_"), "_")?;
        let mut parts = probe.into_parts();
        parts.path_and_query = Some(
            format!("/v2/_catalog?n={PAGE}")
                .parse()
                .expect("a constant path"),
        );
        let first = Uri::from_parts(parts).map_err(|_| Error::InvalidUrl {
            url: format!("{registry}/v2/_catalog"),
            reason: "not a valid URL",
        })?;
        let scope = Scope {
            registry,
            repository: "",
            access: Access::Pull,
        };
        self.list(first, scope, "catalog", |body, url| {
            let page: CatalogPage =
                serde_json::from_slice(body).map_err(|source| Error::InvalidJson {
                    url: url.to_owned(),
                    what: "catalog",
                    source,
                })?;
            Ok(page.repositories.unwrap_or_default())
        })
        .await
    }

    async fn list(
        &self,
        first: Uri,
        scope: Scope<'_>,
        what: &'static str,
        parse: impl Fn(&[u8], &str) -> Result<Vec<String>>,
    ) -> Result<Listing> {
        let mut listing = Listing::default();
        let mut uri = first;
        for page in 0.. {
            let call = Call::new(Kind::Manifest, Method::GET, uri.clone(), scope)
                .header(header::ACCEPT, "application/json");
            let mut retry = Retry::new(self.config().retries);
            let response = self.execute(&call, &mut retry).await?;
            let response = response.expect(&[StatusCode::OK]).await?;
            let next = next_link(&response)?;
            let url = response.url();
            let body = response.into_stream().read_all(MAX_MANIFEST_SIZE).await?;
            listing.names.extend(parse(&body, &url)?);
            match next {
                Some(next) if page + 1 < MAX_PAGES => uri = next,
                Some(_) => {
                    tracing::debug!(%url, pages = MAX_PAGES, what, "listing truncated");
                    listing.truncated = true;
                    break;
                }
                None => break,
            }
        }
        Ok(listing)
    }
}
