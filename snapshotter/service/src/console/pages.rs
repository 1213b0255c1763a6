//! The overview, the Repositories list, a Repository (its images), and an image with its
//! Referrers tab.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use http::StatusCode;
use streamsnap_format::media;
use streamsnap_registry::Repository as RegistryRepo;
use tokio::task::JoinSet;

use super::html::{self, Nav, esc};
use super::view::{self, MAX_TAGS};
use super::{Ctx, Reply, local_path, redirect};
use crate::api::{
    ArtifactKind, Counts, Operation, OperationState, Repository, Streaming, UpdateRepository,
};
use crate::error::{Error, chain};

/// Repositories listed on one page at most.
const MAX_REPOSITORIES: usize = 500;
/// Artifacts whose sizes the overview adds up at most.
const MAX_SIZED: usize = 500;
/// Operations listed on a repository page.
const REPO_OPERATIONS: usize = 20;

pub async fn overview(ctx: &Ctx<'_>) -> Reply {
    let service = ctx.service;
    let repos = match service.repositories(None).await {
        Ok(r) => r,
        Err(e) => return ctx.error_page("The overview could not be read", &e, "/"),
    };
    let count =
        |state: OperationState| -> u64 { repos.iter().map(|r| r.operations.get(state)).sum() };
    let active = repos
        .iter()
        .filter(|r| r.streaming == Streaming::Active)
        .count();
    let mut body = String::from("<h1>Overview</h1><div class=\"cards\">");
    let _ = write!(
        body,
        "<section class=\"card\"><h2>Repositories</h2><p class=\"big\">{}</p>\
         <p>{active} Active (new pushes are converted)</p>\
         <p><a href=\"/repositories\">All repositories</a></p></section>",
        repos.len()
    );
    let _ = write!(
        body,
        "<section class=\"card\"><h2>Operations</h2><ul class=\"counts\">"
    );
    for state in OperationState::ALL {
        let _ = write!(
            body,
            "<li><a href=\"/operations?state={s}\">{badge}</a> {n}</li>",
            s = state.as_str(),
            badge = html::state_badge(state),
            n = count(state)
        );
    }
    body.push_str("</ul><p><a href=\"/operations\">All operations</a></p></section>");

    // What the artifacts add to the registry (the service's own artifacts, still recorded).
    let mut artifacts = Vec::new();
    for repo in repos.iter().filter(|r| r.operations.succeeded > 0) {
        match service.operations(&repo.name, None).await {
            Ok(ops) => artifacts.extend(
                ops.into_iter()
                    .filter(|op| op.state == OperationState::Succeeded)
                    .filter_map(|op| Some((op.repository, op.artifact_digest?))),
            ),
            Err(e) => return ctx.error_page("The overview could not be read", &e, "/"),
        }
    }
    let capped = artifacts.len() > MAX_SIZED;
    artifacts.truncate(MAX_SIZED);
    let mut storage = 0u64;
    let mut unknown = Vec::new();
    for (name, digest) in &artifacts {
        let known = ctx
            .console
            .sizes
            .lock()
            .expect("sizes lock")
            .get(digest)
            .copied();
        let size = match known {
            Some(size) => Ok(size),
            None => match service.repository(name) {
                Ok(repo) => view::artifact_size(&service.client, &repo, digest).await,
                Err(e) => Err(chain(&e)),
            },
        };
        match size {
            Ok(size) => {
                ctx.console
                    .sizes
                    .lock()
                    .expect("sizes lock")
                    .insert(*digest, size);
                storage += size;
            }
            Err(e) => unknown.push(format!("{name}@{digest}: {e}")),
        }
    }
    let _ = write!(
        body,
        "<section class=\"card\"><h2>Storage the artifacts add</h2><p class=\"big\">{}{}</p>\
         <p>{} streaming artifacts made by this service{}</p>",
        if capped { "at least " } else { "" },
        html::bytes(storage),
        artifacts.len(),
        if capped {
            format!(" (the first {MAX_SIZED} counted)")
        } else {
            String::new()
        }
    );
    if !unknown.is_empty() {
        let _ = write!(
            body,
            "{}",
            html::notice(
                "error",
                &format!(
                    "{} artifacts could not be read from the registry and are not counted; \
                     the first: {}",
                    unknown.len(),
                    unknown[0]
                )
            )
        );
    }
    body.push_str("</section>");
    let _ = write!(
        body,
        "<section class=\"card\"><h2>Service</h2><dl>\
         <dt>Registry</dt><dd><code>{registry}</code></dd>\
         <dt>Conversions at once</dt><dd>{concurrency}</dd>\
         <dt>Store</dt><dd>{store}</dd>\
         <dt>Worker</dt><dd><code>{worker}</code></dd></dl>\
         <p>Health: <a href=\"/v1/healthz\">/v1/healthz</a>. Metrics (Prometheus, this \
         replica's conversions and the store's counts): <a href=\"/metrics\">/metrics</a>, \
         described in <code>docs/metrics.md</code>.</p></section>",
        registry = esc(&service.config.registry),
        concurrency = service.config.concurrency,
        store = if service.store.is_shared() {
            "PostgreSQL (shared by the replicas)"
        } else {
            "embedded (redb)"
        },
        worker = esc(&service.worker_id),
    );
    body.push_str("</div>");
    ctx.page(StatusCode::OK, "Overview", Nav::Overview, &body)
}

/// One row of the Repositories page.
struct RepoRow {
    state: Repository,
    /// Image tags, or why they could not be listed.
    images: Result<usize, String>,
    last: Option<Operation>,
}

pub async fn repositories(ctx: &Ctx<'_>) -> Reply {
    let service = ctx.service;
    if let Some(name) = ctx.query.get("name") {
        let name = service.relative_name(name.trim().to_owned());
        return redirect(&html::repo_path(&name));
    }
    let known = match service.repositories(None).await {
        Ok(r) => r,
        Err(e) => return ctx.error_page("The repositories could not be read", &e, "/"),
    };
    let mut all: BTreeMap<String, Repository> =
        known.into_iter().map(|r| (r.name.clone(), r)).collect();
    let catalog = service.client.catalog(&service.config.registry).await;
    let catalog_note = match &catalog {
        Ok(listing) => {
            for name in &listing.names {
                all.entry(name.clone()).or_insert_with(|| Repository {
                    name: name.clone(),
                    streaming: Streaming::Inactive,
                    kind: ArtifactKind::default(),
                    updated: None,
                    operations: Counts::default(),
                });
            }
            listing.truncated.then(|| {
                "The registry's catalog is longer than the console reads: open others by name."
                    .to_owned()
            })
        }
        Err(e) => Some(format!(
            "The registry did not list its repositories ({}): only those the service knows \
             are shown; open another one by name.",
            chain(e)
        )),
    };
    let total_repos = all.len();
    let names: Vec<Repository> = all.into_values().take(MAX_REPOSITORIES).collect();
    let mut set = JoinSet::new();
    for (i, state) in names.into_iter().enumerate() {
        let repo = service.repository(&state.name);
        let client = service.client.clone();
        let last = service
            .operations(&state.name, None)
            .await
            .ok()
            .and_then(|ops| ops.into_iter().next());
        set.spawn(async move {
            let images = match repo {
                Ok(repo) => match client.list_tags(&repo).await {
                    Ok(listing) => Ok(listing
                        .names
                        .iter()
                        .filter(|t| !view::is_fallback_tag(t))
                        .count()),
                    Err(e) if e.is_not_found() => Ok(0),
                    Err(e) => Err(chain(&e)),
                },
                Err(e) => Err(chain(&e)),
            };
            (
                i,
                RepoRow {
                    state,
                    images,
                    last,
                },
            )
        });
    }
    let mut rows = Vec::new();
    while let Some(joined) = set.join_next().await {
        if let Ok(row) = joined {
            rows.push(row);
        }
    }
    rows.sort_by_key(|(i, _)| *i);

    let csrf = ctx.csrf();
    let mut body = String::from("<h1>Repositories</h1>");
    body.push_str(
        "<form method=\"get\" action=\"/repositories\" class=\"open\">\
         <label for=\"name\">Open a repository by name</label>\
         <input id=\"name\" name=\"name\" placeholder=\"team/app\" required>\
         <button type=\"submit\">Open</button></form>",
    );
    if let Some(note) = &catalog_note {
        body.push_str(&html::notice("info", note));
    }
    if rows.is_empty() {
        body.push_str(
            "<p class=\"empty\">No repositories yet: the registry lists none and the service \
             has no state for any. Push an image, or open a repository by name.</p>",
        );
    } else {
        body.push_str(
            "<table><caption>Repositories of the registry, with their streaming state</caption>\
             <thead><tr><th scope=\"col\">Repository</th><th scope=\"col\">Streaming</th>\
             <th scope=\"col\">Kind</th><th scope=\"col\">Images</th><th scope=\"col\">Artifacts</th>\
             <th scope=\"col\">Last conversion</th><th scope=\"col\">Action</th></tr></thead><tbody>",
        );
        for (_, row) in &rows {
            let name = &row.state.name;
            let images = match &row.images {
                Ok(n) => n.to_string(),
                Err(e) => format!("<span class=\"error\" title=\"{}\">unknown</span>", esc(e)),
            };
            let last = match &row.last {
                Some(op) => format!(
                    "{} {} <a href=\"{}\">{}</a>",
                    html::state_badge(op.state),
                    html::time(op.updated),
                    esc(&html::operation_path(name, &op.id)),
                    esc(&op.reference)
                ),
                None => "never".into(),
            };
            let action = streaming_button(name, row.state.streaming, &csrf, "/repositories");
            let _ = write!(
                body,
                "<tr data-repository=\"{attr}\"><th scope=\"row\"><a href=\"{href}\">{text}</a></th>\
                 <td>{badge}</td><td>{kind}</td><td>{images}</td><td>{artifacts}</td>\
                 <td>{last}</td><td>{action}</td></tr>",
                attr = esc(name),
                href = esc(&html::repo_path(name)),
                text = esc(name),
                badge = html::streaming_badge(row.state.streaming),
                kind = kind_label(row.state.kind),
                artifacts = row.state.operations.succeeded,
            );
        }
        body.push_str("</tbody></table>");
        if total_repos > MAX_REPOSITORIES {
            let _ = write!(
                body,
                "<p>The first {MAX_REPOSITORIES} of {total_repos} repositories are shown.</p>"
            );
        }
    }
    ctx.page(StatusCode::OK, "Repositories", Nav::Repositories, &body)
}

/// The Start / Stop artifact streaming button of a repository.
fn streaming_button(name: &str, streaming: Streaming, csrf: &str, back: &str) -> String {
    let (to, label) = match streaming {
        Streaming::Active => ("Inactive", "Stop artifact streaming"),
        Streaming::Inactive => ("Active", "Start artifact streaming"),
    };
    html::button_form(
        &format!("{}/streaming", html::repo_path(name)),
        csrf,
        &[("streaming", to), ("back", back)],
        label,
    )
}

/// The artifact kind, as the repository pages show it.
fn kind_label(kind: ArtifactKind) -> String {
    format!("<span class=\"kind\" data-kind=\"{kind}\">{kind}</span>")
}

/// The form that changes a repository's artifact kind (posted where the streaming state is).
fn kind_form(name: &str, kind: ArtifactKind, csrf: &str, back: &str) -> String {
    let mut options = String::new();
    for (value, label) in [
        (
            ArtifactKind::Chunked,
            "chunked: the content in zstd chunks (a second copy; any layer compression)",
        ),
        (
            ArtifactKind::Index,
            "index: an index over the original gzip layers (no second copy; gzip only)",
        ),
    ] {
        let _ = write!(
            options,
            "<option value=\"{value}\"{selected}>{label}</option>",
            selected = if value == kind { " selected" } else { "" },
        );
    }
    format!(
        "<form method=\"post\" action=\"{action}\" class=\"inline kind\">{csrf_field}\
         <input type=\"hidden\" name=\"back\" value=\"{back}\">\
         <label for=\"kind\">change it for the conversions started from now on:</label>\
         <select id=\"kind\" name=\"kind\">{options}</select>\
         <button type=\"submit\">Change kind</button></form>",
        action = esc(&format!("{}/streaming", html::repo_path(name))),
        csrf_field = html::csrf_field(csrf),
        back = esc(back),
    )
}

/// Changes a repository's streaming state (`streaming`), its artifact kind (`kind`), or both.
pub async fn set_streaming(ctx: &Ctx<'_>, name: &str, form: &HashMap<String, String>) -> Reply {
    let back = form
        .get("back")
        .and_then(|b| local_path(b))
        .map_or_else(|| html::repo_path(name), str::to_owned);
    let title = "The repository's settings were not changed";
    let streaming = match form.get("streaming").map(String::as_str) {
        None => None,
        Some("Active") => Some(Streaming::Active),
        Some("Inactive") => Some(Streaming::Inactive),
        Some(_) => {
            let e = Error::BadRequest("streaming must be Active or Inactive".into());
            return ctx.error_page(title, &e, &back);
        }
    };
    let kind = match form.get("kind").map(|k| k.parse::<ArtifactKind>()) {
        None => None,
        Some(Ok(kind)) => Some(kind),
        Some(Err(reason)) => return ctx.error_page(title, &Error::BadRequest(reason), &back),
    };
    let update = UpdateRepository { streaming, kind };
    match ctx.service.update_repository(name, update).await {
        Ok(_) => redirect(&back),
        Err(e) => ctx.error_page(title, &e, &back),
    }
}

pub async fn repository(ctx: &Ctx<'_>, name: &str) -> Reply {
    let service = ctx.service;
    let back = "/repositories";
    let state = match service.repositories(Some(name.to_owned())).await {
        Ok(mut r) => r.remove(0),
        Err(e) => return ctx.error_page("The repository could not be read", &e, back),
    };
    let operations = match service.operations(name, None).await {
        Ok(ops) => ops,
        Err(e) => return ctx.error_page("The repository could not be read", &e, back),
    };
    let repo = match service.repository(name) {
        Ok(r) => r,
        Err(e) => return ctx.error_page("The repository could not be read", &e, back),
    };
    let csrf = ctx.csrf();
    let path = html::repo_path(name);
    let mut body = format!(
        "<p class=\"crumbs\"><a href=\"/repositories\">Repositories</a> /</p>\
         <h1>{}</h1><div class=\"state\">Artifact streaming: {} {}</div>",
        esc(name),
        html::streaming_badge(state.streaming),
        streaming_button(name, state.streaming, &csrf, &path),
    );
    let explain = match state.streaming {
        Streaming::Active => "Images pushed by tag from now on are converted automatically.",
        Streaming::Inactive => {
            "Pushed images are not converted automatically; create artifacts below, or start \
             artifact streaming."
        }
    };
    let _ = write!(
        body,
        "<p>{explain}</p><div class=\"state\">Artifact kind: {} {}</div><p>{}</p>",
        kind_label(state.kind),
        kind_form(name, state.kind, &csrf, &path),
        match state.kind {
            ArtifactKind::Chunked => {
                "Conversions make chunked artifacts: a copy of the image's content in zstd \
                 chunks, for layers of any compression."
            }
            ArtifactKind::Index => {
                "Conversions make index artifacts: only an index over the original gzip \
                 layers, no second copy of them; an image with a layer that is not gzip \
                 fails to convert."
            }
        }
    );
    body.push_str(&images_table(ctx, &repo, name, &operations, &csrf).await);
    let _ = write!(
        body,
        "<h2>Create a streaming artifact</h2>\
         <form method=\"post\" action=\"{action}\" class=\"create\">{csrf_field}\
         <label for=\"reference\">Tag or digest</label>\
         <input id=\"reference\" name=\"reference\" required placeholder=\"1.4 or sha256:...\">\
         {options}<button type=\"submit\">Create streaming artifact</button></form>",
        action = esc(&format!("{path}/operations")),
        csrf_field = html::csrf_field(&csrf),
        options = options_fields(),
    );
    body.push_str("<h2>Operations</h2>");
    if operations.is_empty() {
        body.push_str("<p class=\"empty\">No operations in this repository yet.</p>");
    } else {
        body.push_str(&super::operations::table(
            &operations[..operations.len().min(REPO_OPERATIONS)],
            &csrf,
            false,
        ));
        if operations.len() > REPO_OPERATIONS {
            let _ = write!(
                body,
                "<p>The newest {REPO_OPERATIONS} of {} are shown.</p>",
                operations.len()
            );
        }
    }
    ctx.page(StatusCode::OK, name, Nav::Repositories, &body)
}

/// Optional conversion settings of a Create form, folded away.
pub fn options_fields() -> String {
    "<details><summary>Options</summary>\
     <label for=\"compression_level\">zstd level (1-19; empty: the service's default)</label>\
     <input id=\"compression_level\" name=\"compression_level\" inputmode=\"numeric\" size=\"4\">\
     <label for=\"chunk_size\">Chunk size in bytes (65536-16777216)</label>\
     <input id=\"chunk_size\" name=\"chunk_size\" inputmode=\"numeric\" size=\"10\">\
     <label><input type=\"checkbox\" name=\"force\" value=\"true\"> Convert again even if \
     it has an artifact</label></details>"
        .to_owned()
}

async fn images_table(
    ctx: &Ctx<'_>,
    repo: &RegistryRepo,
    name: &str,
    operations: &[Operation],
    csrf: &str,
) -> String {
    let tags = match ctx.service.client.list_tags(repo).await {
        Ok(listing) => listing,
        Err(e) if e.is_not_found() => {
            return "<h2>Images</h2><p class=\"empty\">The registry has no images in this \
                    repository (push one, then reload).</p>"
                .into();
        }
        Err(e) => {
            let e = Error::from(e);
            return format!(
                "<h2>Images</h2>{}<p>{}</p>",
                html::notice(
                    "error",
                    &format!("The tags could not be listed: {}", chain(&e))
                ),
                esc(&super::hint(ctx.service, &e))
            );
        }
    };
    let mut tags: Vec<String> = tags
        .names
        .into_iter()
        .filter(|t| !view::is_fallback_tag(t))
        .collect();
    tags.sort();
    let total = tags.len();
    tags.truncate(MAX_TAGS);
    if tags.is_empty() {
        return "<h2>Images</h2><p class=\"empty\">No tagged images in this repository.</p>".into();
    }
    let rows = view::tag_rows(
        &ctx.service.client,
        repo,
        tags,
        Arc::new(operations.to_vec()),
    )
    .await;
    let mut out = String::from(
        "<h2>Images</h2><table><caption>Tags and what their images have</caption><thead><tr>\
         <th scope=\"col\">Tag</th><th scope=\"col\">Manifest</th><th scope=\"col\">Size (compressed)</th>\
         <th scope=\"col\">Streaming artifact</th><th scope=\"col\">Signature</th>\
         <th scope=\"col\">Start-up profile</th></tr></thead><tbody>",
    );
    for row in &rows {
        let image = html::image_path(name, &row.tag);
        let (manifest, size) = match &row.manifest {
            Ok(d) => (
                format!(
                    "{} <span class=\"muted\">{}</span>",
                    html::short_digest(&d.digest.to_string()),
                    esc(kind_of(&d.media_type))
                ),
                row.image_size.map(html::bytes).unwrap_or_default(),
            ),
            Err(e) => (
                format!("<span class=\"error\">cannot be read: {}</span>", esc(e)),
                String::new(),
            ),
        };
        let live = row.manifest.as_ref().ok().and_then(|d| {
            operations
                .iter()
                .find(|op| op.manifest_digest == d.digest && !op.state.is_terminal())
        });
        let artifact = match (&row.artifact, live, &row.referrers_error) {
            (Some(_), _, _) => format!(
                "<a href=\"{}?tab=referrers\" class=\"yes\">Yes</a>",
                esc(&image)
            ),
            (None, Some(op), _) => format!(
                "{} <a href=\"{}\">operation</a>",
                html::state_badge(op.state),
                esc(&html::operation_path(name, &op.id))
            ),
            (None, None, Some(e)) => {
                format!("<span class=\"error\">unknown: {}</span>", esc(e))
            }
            (None, None, None) if row.manifest.is_ok() => format!(
                "<span class=\"no\">No</span> {}",
                html::button_form(
                    &format!("{}/operations", html::repo_path(name)),
                    csrf,
                    &[("reference", &row.tag)],
                    "Create streaming artifact",
                )
            ),
            (None, None, None) => String::new(),
        };
        let yes_no = |b: bool| {
            if row.referrers_error.is_some() {
                "<span class=\"muted\">unknown</span>"
            } else if b {
                "<span class=\"yes\">Yes</span>"
            } else {
                "<span class=\"no\">No</span>"
            }
        };
        let _ = write!(
            out,
            "<tr data-tag=\"{attr}\"><th scope=\"row\"><a href=\"{href}\">{text}</a></th>\
             <td>{manifest}</td><td>{size}</td><td data-artifact>{artifact}</td>\
             <td>{signature}</td><td>{profile}</td></tr>",
            attr = esc(&row.tag),
            href = esc(&image),
            text = esc(&row.tag),
            signature = yes_no(row.signature),
            profile = yes_no(row.profile),
        );
    }
    out.push_str("</tbody></table>");
    if total > MAX_TAGS {
        let _ = write!(
            out,
            "<p>The first {MAX_TAGS} of {total} tags (by name) are shown.</p>"
        );
    }
    out
}

/// "image", "index" or the media type itself.
fn kind_of(media_type: &str) -> &str {
    match media_type {
        media::OCI_MANIFEST | media::DOCKER_MANIFEST => "image",
        media::OCI_INDEX | media::DOCKER_MANIFEST_LIST => "index",
        other => other,
    }
}

/// An image (a tag or a digest): its manifest and operations, or its Referrers tab.
pub async fn image(ctx: &Ctx<'_>, name: &str, reference: &str) -> Reply {
    let service = ctx.service;
    let repo_page = html::repo_path(name);
    let repo = match service.repository(name) {
        Ok(r) => r,
        Err(e) => return ctx.error_page("The image could not be read", &e, "/repositories"),
    };
    let manifest = match service.client.head_manifest(&repo, reference).await {
        Ok(Some(d)) => d,
        Ok(None) => {
            let e = Error::not_found(format!("image {name}:{reference}"));
            return ctx.error_page("The image could not be read", &e, &repo_page);
        }
        Err(e) => {
            return ctx.error_page("The image could not be read", &e.into(), &repo_page);
        }
    };
    let operations: Vec<Operation> = match service.operations(name, None).await {
        Ok(ops) => ops
            .into_iter()
            .filter(|op| op.manifest_digest == manifest.digest)
            .collect(),
        Err(e) => return ctx.error_page("The image could not be read", &e, &repo_page),
    };
    let referrers_tab = ctx.query.get("tab").map(String::as_str) == Some("referrers");
    let path = html::image_path(name, reference);
    let csrf = ctx.csrf();
    let title = format!("{name}:{reference}");
    let mut body = format!(
        "<p class=\"crumbs\"><a href=\"/repositories\">Repositories</a> / \
         <a href=\"{}\">{}</a> /</p><h1>{}</h1>\
         <nav class=\"tabs\" aria-label=\"Image\"><a href=\"{p}\"{d}>Details</a>\
         <a href=\"{p}?tab=referrers\"{r}>Referrers</a></nav>",
        esc(&repo_page),
        esc(name),
        esc(reference),
        p = esc(&path),
        d = if referrers_tab {
            ""
        } else {
            " aria-current=\"page\""
        },
        r = if referrers_tab {
            " aria-current=\"page\""
        } else {
            ""
        },
    );
    let subject = view::subject_of(&manifest.digest, &operations);
    if referrers_tab {
        body.push_str(&referrers(ctx, &repo, &subject, &operations).await);
        return ctx.page(StatusCode::OK, &title, Nav::Repositories, &body);
    }
    let _ = write!(
        body,
        "<dl class=\"details\"><dt>Digest</dt><dd><code>{}</code></dd>\
         <dt>Media type</dt><dd><code>{}</code></dd><dt>Manifest size</dt><dd>{}</dd>",
        esc(&manifest.digest.to_string()),
        esc(&manifest.media_type),
        html::bytes(manifest.size)
    );
    if subject != manifest.digest {
        let _ = write!(
            body,
            "<dt>Converted entry (linux/amd64)</dt><dd><code>{}</code></dd>",
            esc(&subject.to_string())
        );
    }
    body.push_str("</dl>");
    match view::flags(&service.client, &repo, &subject).await {
        Ok((Some(artifact), signature, profile)) => {
            let _ = write!(
                body,
                "<p>Streaming artifact: <a href=\"{}?tab=referrers\">{}</a>. Signature: {}. \
                 Start-up profile: {}.</p>",
                esc(&path),
                html::short_digest(&artifact.to_string()),
                if signature { "yes" } else { "no" },
                if profile { "yes" } else { "no" },
            );
        }
        Ok((None, _, _)) => {
            let _ = write!(
                body,
                "<p>This image has no streaming artifact.</p>\
                 <form method=\"post\" action=\"{}\" class=\"create\">{}\
                 <input type=\"hidden\" name=\"reference\" value=\"{}\">{}\
                 <button type=\"submit\">Create streaming artifact</button></form>",
                esc(&format!("{repo_page}/operations")),
                html::csrf_field(&csrf),
                esc(&manifest.digest.to_string()),
                options_fields(),
            );
        }
        Err(e) => body.push_str(&html::notice(
            "error",
            &format!("The referrers could not be read: {e}"),
        )),
    }
    body.push_str("<h2>Operations of this image</h2>");
    if operations.is_empty() {
        body.push_str("<p class=\"empty\">None yet.</p>");
    } else {
        body.push_str(&super::operations::table(&operations, &csrf, false));
    }
    ctx.page(StatusCode::OK, &title, Nav::Repositories, &body)
}

/// The Referrers tab: every referrer of `subject`, with type, size and creation time.
async fn referrers(
    ctx: &Ctx<'_>,
    repo: &RegistryRepo,
    subject: &streamsnap_format::Digest,
    operations: &[Operation],
) -> String {
    let list = match ctx.service.client.referrers(repo, subject, None).await {
        Ok(r) => r,
        Err(e) => {
            let e = Error::from(e);
            return format!(
                "{}<p>{}</p>",
                html::notice(
                    "error",
                    &format!("The referrers could not be read: {}", chain(&e))
                ),
                esc(&super::hint(ctx.service, &e))
            );
        }
    };
    let source = match list.source {
        streamsnap_registry::ReferrersSource::Api => "the registry's referrers API",
        streamsnap_registry::ReferrersSource::FallbackTag => {
            "the referrers fallback tag (the registry has no referrers API)"
        }
    };
    let mut out = format!(
        "<p>Manifests that refer to <code>{}</code>, from {source}.</p>",
        esc(&subject.to_string())
    );
    if list.manifests.is_empty() {
        out.push_str("<p class=\"empty\">No referrers: nothing refers to this image.</p>");
        return out;
    }
    out.push_str(
        "<table><caption>Referrers</caption><thead><tr><th scope=\"col\">Type</th>\
         <th scope=\"col\">Digest</th><th scope=\"col\">Size</th><th scope=\"col\">Created</th>\
         </tr></thead><tbody>",
    );
    for d in &list.manifests {
        let kind = d.artifact_type.as_deref().unwrap_or(&d.media_type);
        let label = match kind {
            media::ARTIFACT_TYPE => " (streaming artifact)",
            media::PROFILE_ARTIFACT_TYPE => " (start-up profile)",
            streamsnap_trust::SIGNATURE_ARTIFACT_TYPE => " (signature)",
            _ => "",
        };
        let created = match d.annotations.get(view::ANNOTATION_CREATED) {
            Some(c) => esc(c),
            None => match operations
                .iter()
                .find(|op| op.artifact_digest == Some(d.digest))
            {
                Some(op) => format!("{} (by this service)", html::time(op.updated)),
                None => "<span class=\"muted\">not recorded</span>".into(),
            },
        };
        let _ = write!(
            out,
            "<tr data-referrer=\"{digest}\"><td><code>{kind}</code>{label}</td><td>{short}</td>\
             <td>{size}</td><td>{created}</td></tr>",
            digest = esc(&d.digest.to_string()),
            kind = esc(kind),
            short = html::short_digest(&d.digest.to_string()),
            size = html::bytes(d.size),
        );
    }
    out.push_str("</tbody></table>");
    out
}
