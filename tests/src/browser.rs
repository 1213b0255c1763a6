//! A real browser for the web console's tests: Debian's `chromium`, headless, driven through
//! `chromedriver` (Debian's `chromium-driver`) with the W3C WebDriver protocol, spoken here as
//! JSON over HTTP/1.1 on a plain `TcpStream` (no HTTP client dependency, no browser download).
//!
//! [`Browser::start`] runs a private chromedriver on a free 127.0.0.1 port with a fresh
//! profile dir, opens one session, and on drop ends the session (chromium quits) and kills the
//! driver by PID. Its log is printed when a test panics.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine as _;
use serde_json::{Value, json};
use tempfile::TempDir;

/// The key of an element reference in WebDriver answers.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
const IO_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);
/// How long [`Browser::find`] waits for an element to appear.
pub const FIND_TIMEOUT: Duration = Duration::from_secs(10);

/// The programs a browser test needs and their Debian packages.
pub const BROWSER_TOOLS: &[(&str, &str)] = &[
    ("chromium", "chromium"),
    ("chromedriver", "chromium-driver"),
];

/// Checks that chromium and chromedriver are installed; the error names the packages.
pub fn require_browser() -> anyhow::Result<()> {
    let missing: Vec<String> = BROWSER_TOOLS
        .iter()
        .filter(|(program, _)| crate::find_on_path(program).is_none())
        .map(|(program, package)| format!("{program} (install the Debian package {package})"))
        .collect();
    if !missing.is_empty() {
        bail!("the browser tests need: {}", missing.join(", "));
    }
    Ok(())
}

/// An element found on the current page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element(String);

/// A headless chromium with one WebDriver session.
#[derive(Debug)]
pub struct Browser {
    driver: Child,
    addr: String,
    session: String,
    log_path: PathBuf,
    _dir: TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless chromium (a 1280x900 window, a fresh profile).
    pub fn start() -> anyhow::Result<Self> {
        require_browser()?;
        let dir = tempfile::Builder::new()
            .prefix("streamsnap-e2e-browser.")
            .tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log_path = dir.path().join("chromedriver.log");
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log_path.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver")?;
        let addr = format!("127.0.0.1:{port}");
        let mut browser = Self {
            driver,
            addr,
            session: String::new(),
            log_path,
            _dir: dir,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(status) = browser.call("GET", "/status", None)
                && status["ready"] == true
            {
                break;
            }
            if let Some(status) = browser.driver.try_wait()? {
                bail!(
                    "chromedriver exited at start with {status}: {}",
                    browser.log()
                );
            }
            if Instant::now() > deadline {
                bail!("chromedriver did not answer within {STARTUP_TIMEOUT:?}");
            }
            thread::sleep(POLL);
        }
        let profile = browser._dir.path().join("profile");
        let chromium = crate::find_on_path("chromium").context("chromium is not installed")?;
        let answer = browser.call(
            "POST",
            "/session",
            Some(json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chromium,
                    "args": [
                        "--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--window-size=1280,900",
                        "--no-first-run", "--disable-extensions",
                        format!("--user-data-dir={}", profile.display()),
                    ],
                },
            }}})),
        )?;
        browser.session = answer["sessionId"]
            .as_str()
            .context("no session ID in chromedriver's answer")?
            .to_owned();
        Ok(browser)
    }

    /// chromedriver's log so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// One WebDriver command; answers its `value`, or the error it reports.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let what = || format!("WebDriver {method} {path}");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut stream = TcpStream::connect(&self.addr).with_context(what)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
             Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        )?;
        // chromedriver keeps the connection open despite `Connection: close`: read the head,
        // then Content-Length bytes (or chunks, or up to EOF).
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 << 10];
        let end = loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let n = stream.read(&mut buf).with_context(what)?;
            if n == 0 {
                bail!(
                    "{}: the connection closed before the end of headers",
                    what()
                );
            }
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        let length = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        });
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
            || head
                .to_ascii_lowercase()
                .contains("transfer-encoding:chunked");
        loop {
            let body = raw.len() - (end + 4);
            let complete = match length {
                Some(length) => body >= length,
                None if chunked => raw.ends_with(b"0\r\n\r\n"),
                None => false,
            };
            if complete {
                break;
            }
            let n = stream.read(&mut buf).with_context(what)?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("{}: bad status line", what()))?;
        let mut payload = raw[end + 4..].to_vec();
        if chunked {
            payload = dechunk(&payload);
        }
        let answer: Value = serde_json::from_slice(&payload)
            .with_context(|| format!("{}: answer is not JSON", what()))?;
        let value = answer.get("value").cloned().unwrap_or(Value::Null);
        if status != 200 {
            bail!(
                "{} answered {status}: {} {}",
                what(),
                value["error"].as_str().unwrap_or_default(),
                value["message"].as_str().unwrap_or_default()
            );
        }
        Ok(value)
    }

    fn session_call(&self, method: &str, tail: &str, body: Option<Value>) -> anyhow::Result<Value> {
        self.call(method, &format!("/session/{}{tail}", self.session), body)
    }

    /// Opens `url` and waits for the page to load.
    pub fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.session_call("POST", "/url", Some(json!({ "url": url })))
            .map(drop)
    }

    /// The current page's URL.
    pub fn url(&self) -> anyhow::Result<String> {
        Ok(self
            .session_call("GET", "/url", None)?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// The path (and query) of the current page's URL.
    pub fn path(&self) -> anyhow::Result<String> {
        let url = self.url()?;
        let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
        Ok(rest.find('/').map_or("/", |i| &rest[i..]).to_owned())
    }

    pub fn title(&self) -> anyhow::Result<String> {
        Ok(self
            .session_call("GET", "/title", None)?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// The current document as the browser holds it (after scripts ran).
    pub fn source(&self) -> anyhow::Result<String> {
        Ok(self
            .session_call("GET", "/source", None)?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// Every element matching a CSS selector, in document order.
    pub fn find_all(&self, css: &str) -> anyhow::Result<Vec<Element>> {
        let found = self.session_call(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        Ok(found
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e[ELEMENT_KEY].as_str())
            .map(|id| Element(id.to_owned()))
            .collect())
    }

    /// The first element matching `css`, waiting up to [`FIND_TIMEOUT`] for one to appear (a
    /// page that is still loading); an error with the page's text when none does.
    pub fn find(&self, css: &str) -> anyhow::Result<Element> {
        let deadline = Instant::now() + FIND_TIMEOUT;
        loop {
            if let Some(e) = self.find_all(css)?.into_iter().next() {
                return Ok(e);
            }
            if Instant::now() > deadline {
                let body = self
                    .find_all("body")?
                    .first()
                    .map(|b| self.text(b))
                    .transpose()?
                    .unwrap_or_default();
                bail!(
                    "no element matches {css:?} on {}; the page says:\n{body}",
                    self.url()?
                );
            }
            thread::sleep(POLL);
        }
    }

    /// The visible text of an element.
    pub fn text(&self, element: &Element) -> anyhow::Result<String> {
        Ok(self
            .session_call("GET", &format!("/element/{}/text", element.0), None)?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// The visible text of the first element matching `css`.
    pub fn text_of(&self, css: &str) -> anyhow::Result<String> {
        self.text(&self.find(css)?)
    }

    /// The visible text of the page.
    pub fn body_text(&self) -> anyhow::Result<String> {
        self.text_of("body")
    }

    /// An attribute of an element (`None` if it has none).
    pub fn attribute(&self, element: &Element, name: &str) -> anyhow::Result<Option<String>> {
        Ok(self
            .session_call(
                "GET",
                &format!("/element/{}/attribute/{name}", element.0),
                None,
            )?
            .as_str()
            .map(str::to_owned))
    }

    /// A property of an element as the DOM has it now (`value` of a progress bar, ...).
    pub fn property(&self, element: &Element, name: &str) -> anyhow::Result<Value> {
        self.session_call(
            "GET",
            &format!("/element/{}/property/{name}", element.0),
            None,
        )
    }

    /// Clicks an element (following a link or submitting its form waits for the next page).
    pub fn click(&self, element: &Element) -> anyhow::Result<()> {
        self.session_call(
            "POST",
            &format!("/element/{}/click", element.0),
            Some(json!({})),
        )
        .map(drop)
    }

    /// Types `text` into an input (after what it holds).
    pub fn type_into(&self, element: &Element, text: &str) -> anyhow::Result<()> {
        self.session_call(
            "POST",
            &format!("/element/{}/value", element.0),
            Some(json!({ "text": text })),
        )
        .map(drop)
    }

    /// Empties an input.
    pub fn clear(&self, element: &Element) -> anyhow::Result<()> {
        self.session_call(
            "POST",
            &format!("/element/{}/clear", element.0),
            Some(json!({})),
        )
        .map(drop)
    }

    /// Runs a script in the page (`arguments` are `args`); answers what it returns.
    pub fn execute(&self, script: &str, args: Value) -> anyhow::Result<Value> {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// The cookies the browser holds for the current page (HttpOnly ones too).
    pub fn cookies(&self) -> anyhow::Result<Vec<Value>> {
        Ok(self
            .session_call("GET", "/cookie", None)?
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Saves a PNG of the viewport.
    pub fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        let b64 = self.session_call("GET", "/screenshot", None)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().context("screenshot is not a string")?)
            .context("screenshot is not base64")?;
        fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }

    /// Polls `check` until it answers `Some`, for at most `timeout`. An error of `check` counts
    /// as "not yet" (a page that reloads between two WebDriver calls makes an element stale);
    /// the last one is reported if time runs out.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        let mut last_error = None;
        loop {
            match check(self) {
                Ok(Some(found)) => return Ok(found),
                Ok(None) => {}
                Err(e) => last_error = Some(e),
            }
            if Instant::now() > deadline {
                bail!(
                    "waited {timeout:?} for {what} (last error: {}); the page ({}) says:\n{}",
                    last_error.map_or_else(|| "none".to_owned(), |e| format!("{e:#}")),
                    self.url().unwrap_or_default(),
                    self.body_text().unwrap_or_default()
                );
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        if matches!(self.driver.try_wait(), Ok(None)) {
            let _ = self.driver.kill();
        }
        let _ = self.driver.wait();
        if thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- last lines of the chromedriver log ---\n{}",
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}

/// Joins the chunks of a `Transfer-Encoding: chunked` body.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&raw[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 || raw.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[(eol + 2 + size + 2).min(raw.len())..];
    }
    out
}

/// Writes `name.png` into the dir named by `STREAMSNAP_SCREENSHOTS`, when it is set (the
/// console's docs are illustrated this way); otherwise does nothing.
pub fn screenshot_if_asked(browser: &Browser, name: &str) -> anyhow::Result<()> {
    let Some(dir) = std::env::var_os("STREAMSNAP_SCREENSHOTS") else {
        return Ok(());
    };
    let dir = PathBuf::from(dir);
    fs::create_dir_all(&dir)?;
    browser.screenshot(&dir.join(format!("{name}.png")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), b"abcde");
        assert_eq!(dechunk(b""), b"");
    }
}
