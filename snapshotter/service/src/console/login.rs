//! The login form (the service's API token), logout, and the pre-login CSRF cookie.

use std::collections::HashMap;
use std::time::Duration;

use http::{HeaderValue, StatusCode, header};

use super::html::{self, Nav, esc};
use super::session::{self, LOGIN_COOKIE, SESSION_COOKIE, SESSION_LIFETIME, Session};
use super::{Ctx, Reply, local_path, redirect};
use crate::api::Timestamp;

/// A wrong token is answered after this long, so guessing is slow (tokens are long random
/// strings anyway).
const WRONG_TOKEN_DELAY: Duration = Duration::from_millis(500);
/// How long the login form may stay open.
const LOGIN_FORM_LIFETIME: Duration = Duration::from_secs(3600);

/// The login page; `error` above the form after a failed attempt.
pub fn page(ctx: &Ctx<'_>, error: Option<&str>) -> Reply {
    render(ctx, error, ctx.query.get("next").map(String::as_str))
}

/// The login page, returning to `next` (a console path) after login.
fn render(ctx: &Ctx<'_>, error: Option<&str>, next: Option<&str>) -> Reply {
    if ctx.session.is_some() && error.is_none() {
        return redirect("/");
    }
    let nonce = match ctx.cookie(LOGIN_COOKIE) {
        Some(n) if n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit()) => n.to_owned(),
        _ => ctx.console.sessions.nonce(),
    };
    let csrf = ctx.console.sessions.login_csrf(&nonce);
    let next = next.and_then(local_path).unwrap_or("/");
    let dev = ctx.service.config.auth.token.is_none();
    let explain = if dev {
        "This service runs with <code>--insecure-dev-loopback</code> and no token: \
         from this machine, log in with an empty token."
    } else {
        "Log in with the service's API token (the contents of the file given to \
         <code>streamsnap serve --token-file</code>)."
    };
    let body = format!(
        "<div class=\"login\"><h1>Log in</h1><p>{explain}</p>{error}\
         <form method=\"post\" action=\"/login\">{csrf_field}\
         <input type=\"hidden\" name=\"next\" value=\"{next}\">\
         <label for=\"token\">API token</label>\
         <input type=\"password\" id=\"token\" name=\"token\" autocomplete=\"current-password\" \
         {required} autofocus>\
         <button type=\"submit\">Log in</button></form></div>",
        error = error.map(|e| html::notice("error", e)).unwrap_or_default(),
        csrf_field = html::csrf_field(&csrf),
        next = esc(next),
        required = if dev { "" } else { "required" },
    );
    let status = if error.is_some() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    let mut reply = super::html_reply(
        status,
        html::page(
            &html::Chrome {
                title: "Log in",
                nav: Nav::None,
                csrf: None,
                registry: &ctx.service.config.registry,
            },
            &body,
        ),
    );
    let cookie = session::set_cookie(LOGIN_COOKIE, &nonce, Some(LOGIN_FORM_LIFETIME), ctx.secure);
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        reply.headers_mut().append(header::SET_COOKIE, value);
    }
    reply
}

/// Checks the login form: its CSRF token, then the API token.
pub async fn submit(ctx: &Ctx<'_>, form: HashMap<String, String>) -> Reply {
    let sessions = &ctx.console.sessions;
    let next = form.get("next").map(String::as_str);
    if !sessions.check_login_csrf(
        ctx.cookie(LOGIN_COOKIE),
        form.get("csrf").map(String::as_str),
    ) {
        tracing::info!(peer = %ctx.peer, "console login without a valid form token refused");
        return render(
            ctx,
            Some("The login form expired or did not come from this console: log in again."),
            next,
        );
    }
    let given = form.get("token").map(String::as_str).unwrap_or_default();
    let auth = &ctx.service.config.auth;
    let ok = match &auth.token {
        Some(token) => token.matches(given.trim()),
        None => auth.check(ctx.peer.ip(), None).is_ok(),
    };
    if !ok {
        tracing::info!(peer = %ctx.peer, "console login refused: wrong token");
        tokio::time::sleep(WRONG_TOKEN_DELAY).await;
        return render(
            ctx,
            Some(
                "That is not the service's API token. Paste the whole token from the file \
                 given to --token-file (ask whoever runs the service).",
            ),
            next,
        );
    }
    let (_, value) = sessions.create(Timestamp::now());
    tracing::info!(peer = %ctx.peer, "console login");
    let mut reply = redirect(next.and_then(local_path).unwrap_or("/"));
    for cookie in [
        session::set_cookie(SESSION_COOKIE, &value, Some(SESSION_LIFETIME), ctx.secure),
        session::set_cookie(LOGIN_COOKIE, "", None, ctx.secure),
    ] {
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            reply.headers_mut().append(header::SET_COOKIE, value);
        }
    }
    reply
}

/// Ends the session (its cookie is cleared and it is refused from now on here).
pub fn logout(ctx: &Ctx<'_>, session: &Session) -> Reply {
    ctx.console.sessions.revoke(session, Timestamp::now());
    tracing::info!(peer = %ctx.peer, "console logout");
    let mut reply = redirect("/login");
    let cookie = session::set_cookie(SESSION_COOKIE, "", None, ctx.secure);
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        reply.headers_mut().append(header::SET_COOKIE, value);
    }
    reply
}
