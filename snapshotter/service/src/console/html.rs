//! HTML building blocks: escaping, the page layout, and small formatters. Every string that
//! comes from the registry, the store or the request goes through [`esc`] (text and attribute
//! values alike); nothing else builds markup from data.

use std::fmt::Write as _;

use crate::api::{OperationState, Progress, Streaming, Timestamp, encode_segment};

/// Escapes text for an HTML text node or a quoted attribute value.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The console path of a repository (its name is one percent-encoded segment).
pub fn repo_path(name: &str) -> String {
    format!("/repositories/{}", encode_segment(name))
}

/// The console path of an image (a tag or a digest) of a repository.
pub fn image_path(name: &str, reference: &str) -> String {
    format!("{}/images/{}", repo_path(name), encode_segment(reference))
}

pub fn operation_path(name: &str, id: &str) -> String {
    format!("{}/operations/{}", repo_path(name), encode_segment(id))
}

/// Which entry of the navigation is the current page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nav {
    Overview,
    Repositories,
    Operations,
    None,
}

/// What a page needs besides its body.
#[derive(Debug)]
pub struct Chrome<'a> {
    pub title: &'a str,
    pub nav: Nav,
    /// The session's CSRF token (for the logout form); `None` on the login page.
    pub csrf: Option<&'a str>,
    pub registry: &'a str,
}

/// The whole document around `body`.
pub fn page(chrome: &Chrome<'_>, body: &str) -> String {
    let mut nav = String::new();
    if let Some(csrf) = chrome.csrf {
        nav.push_str("<nav aria-label=\"Main\"><ul>");
        for (entry, href, label) in [
            (Nav::Overview, "/", "Overview"),
            (Nav::Repositories, "/repositories", "Repositories"),
            (Nav::Operations, "/operations", "Operations"),
        ] {
            let current = if entry == chrome.nav {
                " aria-current=\"page\""
            } else {
                ""
            };
            let _ = write!(nav, "<li><a href=\"{href}\"{current}>{label}</a></li>");
        }
        nav.push_str("</ul>");
        let _ = write!(
            nav,
            "<form method=\"post\" action=\"/logout\" class=\"logout\">{}\
             <button type=\"submit\">Log out</button></form></nav>",
            csrf_field(csrf)
        );
    }
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · streamsnap</title>\
         <link rel=\"stylesheet\" href=\"/static/console.css\">\
         <script src=\"/static/console.js\" defer></script></head>\
         <body><a class=\"skip\" href=\"#main\">Skip to content</a>\
         <header><p class=\"brand\"><a href=\"/\">streamsnap</a> \
         <span class=\"registry\">{registry}</span></p>{nav}</header>\
         <main id=\"main\">{body}</main></body></html>\n",
        title = esc(chrome.title),
        registry = esc(chrome.registry),
    )
}

/// The hidden CSRF field of a POST form.
pub fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(csrf)
    )
}

/// A one-button POST form.
pub fn button_form(action: &str, csrf: &str, fields: &[(&str, &str)], label: &str) -> String {
    let mut out = format!(
        "<form method=\"post\" action=\"{}\" class=\"inline\">{}",
        esc(action),
        csrf_field(csrf)
    );
    for (name, value) in fields {
        let _ = write!(
            out,
            "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
            esc(name),
            esc(value)
        );
    }
    let _ = write!(
        out,
        "<button type=\"submit\">{}</button></form>",
        esc(label)
    );
    out
}

/// A notice box: `kind` is `error`, `info` or `ok`.
pub fn notice(kind: &str, text: &str) -> String {
    let role = if kind == "error" { "alert" } else { "status" };
    format!(
        "<div class=\"notice {kind}\" role=\"{role}\">{}</div>",
        esc(text)
    )
}

pub fn streaming_badge(streaming: Streaming) -> String {
    let class = match streaming {
        Streaming::Active => "active",
        Streaming::Inactive => "inactive",
    };
    format!("<span class=\"badge {class}\" data-streaming=\"{streaming}\">{streaming}</span>")
}

pub fn state_badge(state: OperationState) -> String {
    format!(
        "<span class=\"badge state-{s}\" data-state=\"{s}\">{s}</span>",
        s = state.as_str()
    )
}

/// A progress bar with its text (bytes read of the total, and the percentage).
pub fn progress(progress: Progress) -> String {
    let percent = percent(progress);
    format!(
        "<progress max=\"100\" value=\"{percent}\" aria-label=\"conversion progress\"></progress> \
         <span class=\"progress-text\">{}</span>",
        progress_text(progress)
    )
}

pub fn percent(p: Progress) -> u64 {
    (p.done.min(p.total).saturating_mul(100))
        .checked_div(p.total)
        .unwrap_or(0)
}

pub fn progress_text(p: Progress) -> String {
    if p.total == 0 {
        "not started".to_owned()
    } else {
        format!("{} of {} ({}%)", bytes(p.done), bytes(p.total), percent(p))
    }
}

/// Bytes in binary units with one decimal (`1.5 MiB`).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A `<time>` element in UTC, minutes precision, the full timestamp as its `datetime`.
pub fn time(t: Timestamp) -> String {
    let full = t.to_string();
    let short = format!("{} {} UTC", &full[..10], &full[11..16]);
    format!("<time datetime=\"{full}\">{short}</time>")
}

/// A digest shortened for a table (`sha256:0123456789ab`), the full one in a `title`.
pub fn short_digest(digest: &str) -> String {
    let short: String = digest.chars().take(19).collect();
    format!("<code title=\"{}\">{}</code>", esc(digest), esc(&short))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_text_is_escaped_for_text_and_attributes() {
        let hostile = "<script>alert('x')</script>\"><img src=x onerror=alert(1)>&amp;";
        let escaped = esc(hostile);
        assert!(!escaped.contains('<') && !escaped.contains('>'));
        assert!(!escaped.contains('"') && !escaped.contains('\''));
        assert!(escaped.contains("&amp;amp;"));
        let digest = short_digest(hostile);
        assert!(!digest.contains("<script") && !digest.contains("\"><img"));
    }

    #[test]
    fn formatters_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(10 << 20), "10.0 MiB");
        let p = Progress {
            done: 5 << 20,
            total: 10 << 20,
        };
        assert_eq!(progress_text(p), "5.0 MiB of 10.0 MiB (50%)");
        assert_eq!(progress_text(Progress::default()), "not started");
        assert_eq!(
            time(Timestamp(1_795_865_712_413)),
            "<time datetime=\"2026-11-28T11:35:12.413Z\">2026-11-28 11:35 UTC</time>"
        );
        assert_eq!(
            image_path("team/app", "sha256:ab"),
            "/repositories/team%2Fapp/images/sha256%3Aab"
        );
    }

    #[test]
    fn pages_carry_the_logout_form_only_with_a_session() {
        let chrome = Chrome {
            title: "<x>",
            nav: Nav::Overview,
            csrf: Some("tok"),
            registry: "r:5000",
        };
        let html = page(&chrome, "body");
        assert!(html.contains("<title>&lt;x&gt; · streamsnap</title>"));
        assert!(html.contains("action=\"/logout\""));
        assert!(html.contains("name=\"csrf\" value=\"tok\""));
        assert!(html.contains("aria-current=\"page\">Overview"));
        let login = page(
            &Chrome {
                csrf: None,
                ..chrome
            },
            "",
        );
        assert!(!login.contains("/logout"));
    }
}
