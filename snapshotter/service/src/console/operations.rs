//! Operations: the list across repositories, one operation (progress that the script updates
//! while it runs), its JSON status for that script, Create and Cancel.

use std::collections::HashMap;
use std::fmt::Write as _;

use http::StatusCode;

use super::html::{self, Nav, esc};
use super::{Ctx, Reply, json_reply, redirect};
use crate::api::{CreateOperation, Operation, OperationState};
use crate::error::Error;

/// Operations listed on the Operations page at most.
const MAX_LISTED: usize = 500;

/// A table of operations; `with_repository` adds the repository to the image column.
pub fn table(ops: &[Operation], csrf: &str, with_repository: bool) -> String {
    let mut out = String::from(
        "<table class=\"operations\"><caption>Operations, newest first</caption><thead><tr>\
         <th scope=\"col\">ID</th><th scope=\"col\">Image</th><th scope=\"col\">State</th>\
         <th scope=\"col\">Progress</th><th scope=\"col\">Updated</th>\
         <th scope=\"col\">Reason</th><th scope=\"col\">Action</th></tr></thead><tbody>",
    );
    for op in ops {
        let path = html::operation_path(&op.repository, &op.id);
        let image = if with_repository {
            op.image()
        } else {
            op.reference.clone()
        };
        let _ = write!(
            out,
            "<tr data-operation=\"{id}\" data-status-url=\"{status}\">\
             <th scope=\"row\"><a href=\"{href}\"><code>{id}</code></a></th>\
             <td><a href=\"{image_href}\">{image}</a></td><td class=\"op-state\">{state}</td>\
             <td class=\"op-progress\">{progress}</td><td>{updated}</td>\
             <td class=\"op-error\">{error}</td><td>{action}</td></tr>",
            id = esc(&op.id),
            status = esc(&format!("{path}/status")),
            href = esc(&path),
            image_href = esc(&html::image_path(&op.repository, &op.reference)),
            image = esc(&image),
            state = html::state_badge(op.state),
            progress = html::progress(op.progress),
            updated = html::time(op.updated),
            error = esc(op.error.as_deref().unwrap_or("")),
            action = cancel_button(op, csrf),
        );
    }
    out.push_str("</tbody></table>");
    out
}

fn cancel_button(op: &Operation, csrf: &str) -> String {
    if op.state.is_terminal() {
        return String::new();
    }
    if op.cancel_requested {
        return "<span class=\"muted\">canceling</span>".into();
    }
    html::button_form(
        &format!("{}/cancel", html::operation_path(&op.repository, &op.id)),
        csrf,
        &[],
        "Cancel",
    )
}

pub async fn list(ctx: &Ctx<'_>) -> Reply {
    let service = ctx.service;
    let filter = ctx
        .query
        .get("state")
        .and_then(|s| OperationState::ALL.into_iter().find(|st| st.as_str() == s));
    let repos = match service.repositories(None).await {
        Ok(r) => r,
        Err(e) => return ctx.error_page("The operations could not be read", &e, "/"),
    };
    let mut ops = Vec::new();
    for repo in &repos {
        match service.operations(&repo.name, None).await {
            Ok(list) => ops.extend(
                list.into_iter()
                    .filter(|op| filter.is_none_or(|f| op.state == f)),
            ),
            Err(e) => return ctx.error_page("The operations could not be read", &e, "/"),
        }
    }
    ops.sort_by(|a, b| b.created.cmp(&a.created).then(b.seq.cmp(&a.seq)));
    let total = ops.len();
    ops.truncate(MAX_LISTED);
    let csrf = ctx.csrf();
    let mut body =
        String::from("<h1>Operations</h1><nav class=\"filters\" aria-label=\"Filter by state\">");
    let _ = write!(
        body,
        "<a href=\"/operations\"{}>All</a>",
        if filter.is_none() {
            " aria-current=\"page\""
        } else {
            ""
        }
    );
    for state in OperationState::ALL {
        let _ = write!(
            body,
            "<a href=\"/operations?state={s}\"{c}>{s}</a>",
            s = state.as_str(),
            c = if filter == Some(state) {
                " aria-current=\"page\""
            } else {
                ""
            }
        );
    }
    body.push_str("</nav>");
    if ops.is_empty() {
        body.push_str(match filter {
            Some(_) => "<p class=\"empty\">No operations in this state.</p>",
            None => {
                "<p class=\"empty\">No operations yet. Create a streaming artifact from a \
                 repository's page, or start artifact streaming on a repository and push.</p>"
            }
        });
    } else {
        body.push_str(&table(&ops, &csrf, true));
        if total > MAX_LISTED {
            let _ = write!(body, "<p>The newest {MAX_LISTED} of {total} are shown.</p>");
        }
    }
    ctx.page(StatusCode::OK, "Operations", Nav::Operations, &body)
}

pub async fn show(ctx: &Ctx<'_>, name: &str, id: &str) -> Reply {
    let op = match ctx.service.operation(name, id).await {
        Ok(op) => op,
        Err(e) => {
            return ctx.error_page("The operation could not be read", &e, "/operations");
        }
    };
    let csrf = ctx.csrf();
    let path = html::operation_path(name, id);
    let artifact = match (&op.artifact_digest, &op.subject_digest) {
        (Some(artifact), _) => format!(
            "<a href=\"{}?tab=referrers\">{}</a>",
            esc(&html::image_path(name, &op.manifest_digest.to_string())),
            html::short_digest(&artifact.to_string())
        ),
        _ => "<span class=\"muted\">none yet</span>".into(),
    };
    let body = format!(
        "<p class=\"crumbs\"><a href=\"/operations\">Operations</a> /</p>\
         <h1>Operation <code>{id}</code></h1>\
         <section data-operation=\"{id}\" data-status-url=\"{status}\">\
         <dl class=\"details\">\
         <dt>Image</dt><dd><a href=\"{image_href}\">{image}</a></dd>\
         <dt>Manifest</dt><dd><code>{digest}</code></dd>\
         <dt>State</dt><dd class=\"op-state\">{state}</dd>\
         <dt>Progress</dt><dd class=\"op-progress\">{progress}</dd>\
         <dt>Reason</dt><dd class=\"op-error\">{error}</dd>\
         <dt>Streaming artifact</dt><dd>{artifact}</dd>\
         <dt>Artifact kind</dt><dd class=\"op-kind\">{kind}</dd>\
         <dt>Started by</dt><dd>{trigger}</dd>\
         <dt>Created</dt><dd>{created}</dd><dt>Updated</dt><dd>{updated}</dd>\
         <dt>Worker</dt><dd><code>{worker}</code></dd>\
         <dt>Interruptions</dt><dd>{interruptions}</dd></dl>\
         <div class=\"op-action\">{cancel}</div></section>",
        id = esc(&op.id),
        status = esc(&format!("{path}/status")),
        image_href = esc(&html::image_path(name, &op.reference)),
        image = esc(&op.image()),
        digest = esc(&op.manifest_digest.to_string()),
        state = html::state_badge(op.state),
        progress = html::progress(op.progress),
        error = esc(op.error.as_deref().unwrap_or("")),
        kind = match (op.kind, op.state) {
            (Some(kind), _) => kind.as_str(),
            (None, OperationState::NotStarted) => {
                "<span class=\"muted\">the repository's when it starts</span>"
            }
            // Operations of versions before the kinds made chunked artifacts.
            (None, _) => "chunked",
        },
        trigger = match op.trigger {
            crate::api::Trigger::Api => "a request (console, CLI or API)",
            crate::api::Trigger::Push => "a push into an Active repository",
        },
        created = html::time(op.created),
        updated = html::time(op.updated),
        worker = esc(op.worker.as_deref().unwrap_or("")),
        interruptions = op.interruptions,
        cancel = cancel_button(&op, &csrf),
    );
    ctx.page(
        StatusCode::OK,
        &format!("Operation {id}"),
        Nav::Operations,
        &body,
    )
}

/// `{"state", "terminal", "percent", "progress", "error"}` for the page's script.
pub async fn status(ctx: &Ctx<'_>, name: &str, id: &str) -> Reply {
    match ctx.service.operation(name, id).await {
        Ok(op) => json_reply(&serde_json::json!({
            "state": op.state.as_str(),
            "terminal": op.state.is_terminal(),
            "percent": html::percent(op.progress),
            "progress": html::progress_text(op.progress),
            "error": op.error.unwrap_or_default(),
        })),
        Err(e) => super::plain(e.status(), &crate::error::chain(&e)),
    }
}

pub async fn create(ctx: &Ctx<'_>, name: &str, form: &HashMap<String, String>) -> Reply {
    let back = html::repo_path(name);
    let number = |field: &str| -> Result<Option<i64>, Error> {
        match form.get(field).map(|v| v.trim()).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| Error::BadRequest(format!("{field} {v:?} is not a number"))),
        }
    };
    let request = (|| {
        let reference = form
            .get("reference")
            .map(|r| r.trim().to_owned())
            .filter(|r| !r.is_empty())
            .ok_or_else(|| Error::BadRequest("give a tag or a digest".into()))?;
        let out_of_range = |field: &str| Error::BadRequest(format!("{field} is out of range"));
        Ok::<_, Error>(CreateOperation {
            reference,
            force: form.get("force").is_some_and(|v| v == "true"),
            chunk_size: number("chunk_size")?
                .map(|n| u32::try_from(n).map_err(|_| out_of_range("chunk_size")))
                .transpose()?,
            compression_level: number("compression_level")?
                .map(|n| i32::try_from(n).map_err(|_| out_of_range("compression_level")))
                .transpose()?,
        })
    })();
    let result = match request {
        Ok(request) => ctx.service.create(name, request).await,
        Err(e) => Err(e),
    };
    match result {
        Ok((op, _new)) => redirect(&html::operation_path(name, &op.id)),
        Err(e) => ctx.error_page("The streaming artifact was not created", &e, &back),
    }
}

pub async fn cancel(ctx: &Ctx<'_>, name: &str, id: &str) -> Reply {
    let path = html::operation_path(name, id);
    match ctx.service.cancel(name, id).await {
        Ok(_) => redirect(&path),
        Err(e) => ctx.error_page("The operation was not canceled", &e, &path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{OperationOptions, Progress, Timestamp, Trigger};

    fn op(state: OperationState, error: &str) -> Operation {
        Operation {
            id: "0123456789abcdef".into(),
            repository: "team/app".into(),
            reference: "<b>v1</b>".into(),
            manifest_digest: streamsnap_format::Digest::sha256(b"m"),
            state,
            progress: Progress {
                done: 1 << 20,
                total: 4 << 20,
            },
            error: Some(error.into()),
            artifact_digest: None,
            subject_digest: None,
            trigger: Trigger::Push,
            options: OperationOptions::default(),
            kind: None,
            interruptions: 0,
            cancel_requested: false,
            worker: Some("<w>".into()),
            created: Timestamp(0),
            updated: Timestamp(0),
            seq: 1,
        }
    }

    #[test]
    fn operation_rows_escape_what_they_show_and_offer_cancel_while_live() {
        let hostile = "layer \"x\"><script>alert(1)</script>";
        let running = table(&[op(OperationState::Running, hostile)], "tok", true);
        assert!(!running.contains("<script>") && !running.contains("<b>"));
        assert!(running.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(running.contains("team/app:&lt;b&gt;v1&lt;/b&gt;"));
        assert!(running.contains("/repositories/team%2Fapp/operations/0123456789abcdef/cancel"));
        assert!(running.contains("1.0 MiB of 4.0 MiB (25%)"));
        assert!(running.contains("name=\"csrf\" value=\"tok\""));
        let failed = table(&[op(OperationState::Failed, "x")], "tok", false);
        assert!(
            !failed.contains("/cancel"),
            "no Cancel for a final operation"
        );
        let mut canceling = op(OperationState::Running, "");
        canceling.cancel_requested = true;
        assert!(table(&[canceling], "tok", false).contains("canceling"));
    }
}
