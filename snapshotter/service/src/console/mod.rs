//! The web console: server-rendered HTML pages at `/` of the service's address, beside the
//! API (`/v1/...`). Repositories and their streaming states, a repository's images with their
//! streaming artifacts, signatures, profiles and referrers, operations with live progress, and
//! an overview. See `docs/console.md`.
//!
//! No framework and no template engine: pages are `format!` over [`html::esc`]aped data. The
//! stylesheet and the small progressive-enhancement script are embedded in the binary. Every
//! page but the login page needs a session (a signed cookie, [`session`]); every POST needs
//! the session's CSRF token. The console calls the same domain functions as the API.

mod html;
mod login;
mod operations;
mod pages;
mod session;
mod view;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use streamsnap_format::Digest;

use crate::api::{self, Timestamp};
use crate::error::{Error, chain};
use crate::service::Service;

use self::html::{Chrome, Nav};
use self::session::{SESSION_COOKIE, Session, Sessions};

/// Largest form body read.
const MAX_FORM: usize = 64 << 10;

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// Whether a path belongs to the console (everything but the API).
pub(crate) fn owns(path: &str) -> bool {
    path != api::PREFIX && !path.starts_with("/v1/") && path != crate::metrics::METRICS_PATH
}

/// The console's state: the session keys, and sizes of artifacts already looked up (they are
/// immutable, so the overview does not fetch them again).
#[derive(Debug)]
pub(crate) struct Console {
    sessions: Sessions,
    sizes: Mutex<HashMap<Digest, u64>>,
}

impl Console {
    pub fn new(service: &Service) -> Self {
        Self {
            sessions: Sessions::new(service.config.auth.token.as_ref()),
            sizes: Mutex::new(HashMap::new()),
        }
    }
}

/// One request as the pages see it.
pub(crate) struct Ctx<'a> {
    pub service: &'a Service,
    pub console: &'a Console,
    pub peer: SocketAddr,
    pub method: Method,
    pub path: String,
    pub query: HashMap<String, String>,
    /// Over TLS (as a proxy in front says): cookies get `Secure`.
    pub secure: bool,
    pub session: Option<Session>,
    cookies: Option<String>,
}

impl Ctx<'_> {
    /// The CSRF token for forms on this page (empty without a session).
    pub fn csrf(&self) -> String {
        self.session
            .as_ref()
            .map(|s| self.console.sessions.csrf(s))
            .unwrap_or_default()
    }

    pub fn chrome<'b>(&'b self, title: &'b str, nav: Nav, csrf: &'b str) -> Chrome<'b> {
        Chrome {
            title,
            nav,
            csrf: self.session.as_ref().map(|_| csrf),
            registry: &self.service.config.registry,
        }
    }

    pub fn cookie(&self, name: &str) -> Option<&str> {
        session::cookie(self.cookies.as_deref(), name)
    }

    /// A full page for the current session.
    pub fn page(&self, status: StatusCode, title: &str, nav: Nav, body: &str) -> Reply {
        let csrf = self.csrf();
        html_reply(status, html::page(&self.chrome(title, nav, &csrf), body))
    }

    /// An error page: what failed, and what to do; `back` is the page to return to.
    pub fn error_page(&self, what: &str, error: &Error, back: &str) -> Reply {
        let status = error.status();
        let body = format!(
            "<h1>{}</h1>{}<p>{}</p><p><a href=\"{}\">Go back</a> or \
             <a href=\"/\">go to the overview</a>.</p>",
            html::esc(what),
            html::notice("error", &chain(error)),
            html::esc(&hint(self.service, error)),
            html::esc(back),
        );
        self.page(status, what, Nav::None, &body)
    }
}

/// What the person can do about an error.
pub(crate) fn hint(service: &Service, error: &Error) -> String {
    match error {
        Error::Registry(_) => format!(
            "The registry {} did not answer as expected. Check that it is up and that the \
             service's credentials may pull from (and push to) it, then try again.",
            service.config.registry
        ),
        Error::NotFound { .. } => {
            "Check the name: repositories are named relative to the registry (team/app), \
             images by tag or digest."
                .into()
        }
        Error::BadRequest(_) => "Correct the value and send the form again.".into(),
        Error::Conflict(_) => "Nothing was changed.".into(),
        Error::ShuttingDown => "The service is restarting: try again in a minute.".into(),
        _ => "The service's store failed: the service's log has the details. Try again; \
              if it persists, tell whoever runs the service."
            .into(),
    }
}

pub(crate) type Reply = Response<Full<Bytes>>;

/// Answers a console request (any path [`owns`] accepts).
pub(crate) async fn handle(
    service: &Service,
    console: &Console,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Reply {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = parse_pairs(request.uri().query().unwrap_or_default());
    let headers = request.headers();
    let cookies = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let secure = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"));
    let cross_origin = is_cross_origin(headers);
    let session = session::cookie(cookies.as_deref(), SESSION_COOKIE)
        .and_then(|value| console.sessions.verify(value, Timestamp::now()));
    let ctx = Ctx {
        service,
        console,
        peer,
        method: method.clone(),
        path: path.clone(),
        query,
        secure,
        session,
        cookies,
    };
    let reply = if method == Method::POST && cross_origin {
        forbidden(&ctx, "the form was sent from another site")
    } else {
        route(&ctx, request).await
    };
    tracing::debug!(%method, %path, %peer, status = %reply.status(), "console request");
    reply
}

async fn route(ctx: &Ctx<'_>, request: Request<Incoming>) -> Reply {
    let path = ctx.path.as_str();
    match (&ctx.method, path) {
        (&Method::GET | &Method::HEAD, "/static/console.css") => {
            return asset("text/css; charset=utf-8", CSS);
        }
        (&Method::GET | &Method::HEAD, "/static/console.js") => {
            return asset("text/javascript; charset=utf-8", JS);
        }
        (&Method::GET | &Method::HEAD, "/favicon.ico") => {
            return plain(StatusCode::NOT_FOUND, "no icon");
        }
        (&Method::GET | &Method::HEAD, "/login") => return login::page(ctx, None),
        (&Method::POST, "/login") => {
            let form = read_form(request).await;
            return login::submit(ctx, form).await;
        }
        _ => {}
    }
    let Some(session) = &ctx.session else {
        if path.ends_with("/status") {
            return plain(StatusCode::UNAUTHORIZED, "log in again");
        }
        let next = if ctx.method == Method::GET && path != "/" {
            format!("?next={}", api::encode_segment(path))
        } else {
            String::new()
        };
        return redirect(&format!("/login{next}"));
    };
    let form = if ctx.method == Method::POST {
        let form = read_form(request).await;
        if !ctx
            .console
            .sessions
            .check_csrf(session, form.get("csrf").map(String::as_str))
        {
            tracing::info!(peer = %ctx.peer, path, "console POST without a valid CSRF token refused");
            return forbidden(
                ctx,
                "the form did not carry this session's CSRF token (it may be from an old page, \
                 or forged)",
            );
        }
        form
    } else {
        HashMap::new()
    };
    if ctx.method == Method::POST && path == "/logout" {
        return login::logout(ctx, session);
    }
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let decode = |s: &str| api::decode_segment(s).map(|n| ctx.service.relative_name(n));
    let get = ctx.method == Method::GET || ctx.method == Method::HEAD;
    let post = ctx.method == Method::POST;
    match segments.as_slice() {
        [""] if get => pages::overview(ctx).await,
        ["repositories"] if get => pages::repositories(ctx).await,
        ["repositories", name] if get => match decode(name) {
            Some(name) => pages::repository(ctx, &name).await,
            None => not_found(ctx),
        },
        ["repositories", name, "streaming"] if post => match decode(name) {
            Some(name) => pages::set_streaming(ctx, &name, &form).await,
            None => not_found(ctx),
        },
        ["repositories", name, "operations"] if post => match decode(name) {
            Some(name) => operations::create(ctx, &name, &form).await,
            None => not_found(ctx),
        },
        ["repositories", name, "images", reference] if get => {
            match (decode(name), api::decode_segment(reference)) {
                (Some(name), Some(reference)) => pages::image(ctx, &name, &reference).await,
                _ => not_found(ctx),
            }
        }
        ["repositories", name, "operations", id] if get => match decode(name) {
            Some(name) => operations::show(ctx, &name, id).await,
            None => not_found(ctx),
        },
        ["repositories", name, "operations", id, "status"] if get => match decode(name) {
            Some(name) => operations::status(ctx, &name, id).await,
            None => not_found(ctx),
        },
        ["repositories", name, "operations", id, "cancel"] if post => match decode(name) {
            Some(name) => operations::cancel(ctx, &name, id).await,
            None => not_found(ctx),
        },
        ["operations"] if get => operations::list(ctx).await,
        _ => not_found(ctx),
    }
}

fn not_found(ctx: &Ctx<'_>) -> Reply {
    let body = format!(
        "<h1>Not found</h1><p>There is no page at <code>{}</code> (for this method).</p>\
         <p><a href=\"/\">Go to the overview</a>.</p>",
        html::esc(&ctx.path)
    );
    ctx.page(StatusCode::NOT_FOUND, "Not found", Nav::None, &body)
}

fn forbidden(ctx: &Ctx<'_>, why: &str) -> Reply {
    let body = format!(
        "<h1>Refused</h1>{}<p>Nothing was changed. Reload the page and use its buttons.</p>",
        html::notice("error", &format!("The request was refused: {why}."))
    );
    ctx.page(StatusCode::FORBIDDEN, "Refused", Nav::None, &body)
}

/// Whether a request names an `Origin` (or, without one, a `Referer`) whose host is neither
/// its `Host` nor the `X-Forwarded-Host` a proxy in front set.
fn is_cross_origin(headers: &http::HeaderMap) -> bool {
    let header_str = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let origin = header_str("origin").or_else(|| header_str("referer"));
    let Some(origin) = origin.filter(|o| *o != "null") else {
        return false;
    };
    let rest = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or(origin);
    let origin_host = rest.split('/').next().unwrap_or_default();
    let forwarded = header_str("x-forwarded-host")
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim);
    !header_str("host")
        .into_iter()
        .chain(forwarded)
        .any(|host| host.eq_ignore_ascii_case(origin_host))
}

/// Decodes `a=1&b=x+y` (queries and urlencoded forms).
pub(crate) fn parse_pairs(s: &str) -> HashMap<String, String> {
    s.split('&')
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = api::decode_segment(&key.replace('+', " "))?;
            let value = api::decode_segment(&value.replace('+', " "))?;
            (!key.is_empty()).then_some((key, value))
        })
        .collect()
}

async fn read_form(request: Request<Incoming>) -> HashMap<String, String> {
    let body = Limited::new(request.into_body(), MAX_FORM)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    parse_pairs(&String::from_utf8_lossy(&body))
}

fn secure_headers(response: &mut Reply) {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; \
             img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
}

pub(crate) fn html_reply(status: StatusCode, body: String) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    secure_headers(&mut response);
    response
}

pub(crate) fn plain(status: StatusCode, text: &str) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from(text.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    secure_headers(&mut response);
    response
}

pub(crate) fn json_reply(value: &serde_json::Value) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    secure_headers(&mut response);
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    secure_headers(&mut response);
    response
}

/// 303 See Other to a path of the console (after a POST, or to the login page).
pub(crate) fn redirect(location: &str) -> Reply {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SEE_OTHER;
    let location = HeaderValue::from_str(location).unwrap_or(HeaderValue::from_static("/"));
    response.headers_mut().insert(header::LOCATION, location);
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `path` if it is a path of this console (`/...`, not `//host`), for redirects after login.
pub(crate) fn local_path(path: &str) -> Option<&str> {
    (path.starts_with('/')
        && !path.starts_with("//")
        && !path.contains('\\')
        && !path.bytes().any(|b| b.is_ascii_control()))
    .then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_owns_everything_but_the_api() {
        assert!(owns("/"));
        assert!(owns("/repositories/a"));
        assert!(owns("/v1x"));
        assert!(!owns("/v1"));
        assert!(!owns("/v1/repositories"));
        assert!(!owns("/v1/healthz"));
        assert!(!owns("/metrics"));
    }

    #[test]
    fn forms_decode_plus_and_percent() {
        let form = parse_pairs("csrf=ab&reference=v1+%2B+x&empty=&=skip&bad=%zz");
        assert_eq!(form["csrf"], "ab");
        assert_eq!(form["reference"], "v1 + x");
        assert_eq!(form["empty"], "");
        assert!(!form.contains_key("bad") && !form.contains_key(""));
    }

    #[test]
    fn redirects_after_login_stay_on_the_console() {
        assert_eq!(local_path("/repositories"), Some("/repositories"));
        for bad in [
            "//evil.example",
            "https://evil.example",
            "/\\evil",
            "x",
            "/a\r\nb",
        ] {
            assert_eq!(local_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn cross_origin_posts_are_recognized() {
        let mut h = http::HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(!is_cross_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(!is_cross_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(is_cross_origin(&h));
        // Behind a proxy that rewrites Host and says which host it served.
        h.insert(
            "x-forwarded-host",
            HeaderValue::from_static("console.example"),
        );
        assert!(is_cross_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://console.example"),
        );
        assert!(!is_cross_origin(&h));
        h.remove(header::ORIGIN);
        h.insert(
            header::REFERER,
            HeaderValue::from_static("https://evil.example/x"),
        );
        assert!(is_cross_origin(&h));
    }
}
