//! The web console of `streamsnap serve`, in a real browser: Debian's chromium, headless,
//! driven through chromedriver (WebDriver), against the real distribution registry sending
//! push notifications to the service. One scenario walks what an operator does: log in (a
//! wrong token first), start artifact streaming on a repository, push an image with skopeo and
//! see it converted, create an artifact for an older image and watch its operation go Running
//! -> Succeeded with live progress, find the artifact in the image's Referrers tab, cancel a
//! long conversion (Canceled, no referrer left), see forged POSTs refused, hostile registry
//! strings rendered as text, and log out. With `STREAMSNAP_SCREENSHOTS=DIR` it saves a PNG of
//! each page there (how docs/console.md is illustrated).

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::{Value, json};
use streamsnap_e2e::browser::{Browser, screenshot_if_asked};
use streamsnap_e2e::image::{Compression, ImageSpec, LayerBlob, OciLayout};
use streamsnap_e2e::service::{ServiceHome, push_image, request_with_body};
use streamsnap_e2e::targen::XorShift;
use streamsnap_e2e::{
    LinkShape, Registry, ShapingProxy, TarGen, http, require_root_tools, skopeo_push,
};
use streamsnap_format::oci::{Descriptor, ImageManifest};
use streamsnap_format::{Digest, media};
use streamsnap_registry::{Client, ClientConfig, Reference, Repository};

const WAIT: Duration = Duration::from_secs(60);

/// What a registry could hand the console: an artifact type and a creation time with markup.
const HOSTILE: &str = "x\"><script>window.pwned=1</script><img src=x onerror=\"window.pwned=2\">";

struct Env {
    home: ServiceHome,
    registry: Registry,
    client: Client,
    rt: tokio::runtime::Runtime,
}

impl Env {
    fn repo(&self, name: &str) -> Repository {
        Reference::parse(&format!("{}/{name}:x", self.registry.addr()))
            .unwrap()
            .repository
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.home.url())
    }

    /// `GET` an API path with the token, as JSON.
    fn api(&self, path: &str) -> anyhow::Result<Value> {
        let auth = format!("Bearer {}", self.home.token);
        let response = http::get(&self.home.addr(), path, &[("Authorization", &auth)])?;
        ensure!(response.status == 200, "GET {path}: {}", response.status);
        Ok(serde_json::from_slice(&response.body)?)
    }

    fn push(&self, name: &str, tag: &str, spec: &ImageSpec) -> anyhow::Result<Digest> {
        self.rt
            .block_on(push_image(&self.client, &self.repo(name), tag, spec))
    }

    fn referrers(&self, name: &str, subject: &Digest) -> anyhow::Result<Vec<Descriptor>> {
        Ok(self
            .rt
            .block_on(self.client.referrers(&self.repo(name), subject, None))?
            .manifests)
    }
}
/// A referrer of `subject` whose artifact type and creation time carry markup.
async fn push_hostile_referrer(
    client: &Client,
    repo: &Repository,
    subject: Descriptor,
) -> anyhow::Result<Descriptor> {
    let config = Descriptor::of(media::OCI_EMPTY, media::OCI_EMPTY_CONTENT);
    client
        .push_blob(
            repo,
            &config.digest,
            media::OCI_EMPTY_CONTENT.to_vec().into(),
        )
        .await?;
    let layer = Descriptor::of("application/octet-stream", b"hostile");
    client
        .push_blob(repo, &layer.digest, b"hostile".to_vec().into())
        .await?;
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.into()),
        artifact_type: Some(format!("application/{HOSTILE}")),
        config,
        layers: vec![layer],
        subject: Some(subject),
        annotations: [(
            "org.opencontainers.image.created".to_owned(),
            HOSTILE.to_owned(),
        )]
        .into(),
    };
    Ok(client.push_referrer(repo, &manifest).await?)
}

/// An image with 10 MB of random lowercase text in an uncompressed layer.
fn slow_spec(seed: u64) -> ImageSpec {
    let mut rng = XorShift::new(seed);
    let text: Vec<u8> = (0..10 << 20)
        .map(|_| b'a' + (rng.next_u64() % 26) as u8)
        .collect();
    let tar = TarGen::new().file("data.txt", 0o644, &text).finish();
    ImageSpec::linux_amd64(vec![LayerBlob::new(tar, Compression::None)])
}

fn small_spec(content: &str) -> ImageSpec {
    ImageSpec::linux_amd64(vec![LayerBlob::gzip(
        TarGen::new().file("id", 0o644, content.as_bytes()).finish(),
    )])
}

/// Waits until the browser shows a page whose path starts with `prefix` (a click that submits
/// a form returns before the next page is there); answers the path.
fn wait_path(b: &Browser, prefix: &str) -> anyhow::Result<String> {
    b.wait_for(&format!("a page under {prefix}"), WAIT, |b| {
        let path = b.path()?;
        Ok(path.starts_with(prefix).then_some(path))
    })
}

/// The state shown by the first state badge inside `scope`.
fn shown_state(b: &Browser, scope: &str) -> anyhow::Result<String> {
    let badge = b.find(&format!("{scope} [data-state]"))?;
    Ok(b.attribute(&badge, "data-state")?.unwrap_or_default())
}

/// Fills the repository page's Create form for `reference` (with a chunk size from its
/// options) and submits it; answers the operation's ID (the page it lands on).
fn create_slow(b: &Browser, env: &Env, reference: &str) -> anyhow::Result<String> {
    b.goto(&env.url("/repositories/app"))?;
    b.type_into(&b.find("form.create input[name=reference]")?, reference)?;
    b.click(&b.find("form.create details summary")?)?;
    b.type_into(&b.find("form.create input[name=chunk_size]")?, "262144")?;
    b.click(&b.find("form.create button[type=submit]")?)?;
    let path = wait_path(b, "/repositories/app/operations/")?;
    let id = path
        .strip_prefix("/repositories/app/operations/")
        .with_context(|| format!("Create landed on {path}, not an operation"))?;
    Ok(id.to_owned())
}

#[test]
fn an_operator_manages_artifact_streaming_from_the_console() -> anyhow::Result<()> {
    require_root_tools(&["docker-registry", "skopeo"])?;
    let started = Instant::now();
    let home = ServiceHome::new()?;
    let registry =
        Registry::start_with_config_extra(&home.notifications_yaml(&home.webhook_url()))?;
    // The service reaches the registry through an 8 Mbit/s link, so a 10 MB layer takes
    // seconds to convert whatever the CPU: long enough to watch progress and to cancel.
    let link = ShapingProxy::start(&registry.addr(), LinkShape::mbit(8.0, 0.0))?;
    let _service = home.start(&link.addr(), &["-v", "--concurrency", "1"])?;
    let env = Env {
        home,
        registry,
        client: Client::new(ClientConfig::default())?,
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
    };
    // Older images, pushed while the repository is Inactive: nothing converts them.
    let old = env.push("app", "old", &slow_spec(1))?;
    let older = env.push("app", "older", &slow_spec(2))?;
    let b = Browser::start()?;

    // Unauthenticated: every page leads to the login page, and only to it.
    b.goto(&env.url("/repositories"))?;
    ensure!(
        b.path()?.starts_with("/login"),
        "unauthenticated, the console showed {}",
        b.path()?
    );
    let raw = http::get(&env.home.addr(), "/operations", &[])?;
    ensure!(
        raw.status == 303
            && raw
                .header("location")
                .is_some_and(|l| l.starts_with("/login")),
        "unauthenticated GET /operations answered {} {:?}",
        raw.status,
        raw.header("location")
    );
    screenshot_if_asked(&b, "login")?;

    // A wrong token is refused, saying what to do; the right one opens the console.
    b.type_into(&b.find("#token")?, "not-the-token")?;
    b.click(&b.find("form[action='/login'] button")?)?;
    ensure!(
        b.text_of("[role=alert]")?
            .contains("not the service's API token"),
        "no explanation of the refused login"
    );
    b.type_into(&b.find("#token")?, &env.home.token)?;
    b.click(&b.find("form[action='/login'] button")?)?;
    wait_path(&b, "/repositories")?;
    let cookies = b.cookies()?;
    let session = cookies
        .iter()
        .find(|c| c["name"] == "streamsnap_session")
        .context("no session cookie")?;
    ensure!(
        session["httpOnly"] == true && session["sameSite"] == "Strict",
        "session cookie flags: {session}"
    );
    ensure!(
        !b.url()?.contains(&env.home.token),
        "the token is in the URL"
    );
    let session_cookie = format!(
        "streamsnap_session={}",
        session["value"].as_str().unwrap_or_default()
    );

    // Repositories: app is listed (from the registry's catalog), Inactive; Start makes it Active.
    let row = "tr[data-repository='app']";
    ensure!(shown_state_streaming(&b, row)? == "Inactive");
    b.click(&b.find(&format!("{row} form button"))?)?;
    b.wait_for("the repository to show Active", WAIT, |b| {
        Ok((shown_state_streaming(b, row)? == "Active").then_some(()))
    })?;
    ensure!(env.api("/v1/repositories/app")?["streaming"] == "Active");
    screenshot_if_asked(&b, "repositories")?;

    // A push with skopeo into the Active repository is converted; the repository page shows it.
    let mut layout = OciLayout::new()?;
    layout.write_image(&small_spec("pushed"), "new")?;
    skopeo_push(
        layout.path(),
        "new",
        &format!("{}/app:new", env.registry.addr()),
    )?;
    b.wait_for("the pushed image's artifact", WAIT, |b| {
        b.goto(&env.url("/repositories/app"))?;
        let cell = b.text_of("tr[data-tag='new'] td[data-artifact]")?;
        Ok(cell.contains("Yes").then_some(()))
    })?;
    screenshot_if_asked(&b, "repository")?;
    ensure!(
        b.text_of("tr[data-tag='old'] td[data-artifact]")?
            .contains("Create streaming artifact"),
        "the older image offers no Create button"
    );

    // Create for the older image: Running with progress updating in place, then Succeeded.
    let id = create_slow(&b, &env, "old")?;
    b.execute("window.streamsnapMark = 42; return null;", json!([]))?;
    let first_progress = b.text_of(".op-progress .progress-text")?;
    let mut live_running = false;
    b.wait_for("the operation to succeed", WAIT, |b| {
        let state = shown_state(b, "section[data-operation]")?;
        let text = b.text_of(".op-progress .progress-text").unwrap_or_default();
        let mark = b.execute("return window.streamsnapMark || 0;", json!([]))?;
        if state == "Running" && text != first_progress && text.contains('%') && mark == 42 {
            if !live_running {
                screenshot_if_asked(b, "operation-running")?;
            }
            live_running = true;
        }
        Ok((state == "Succeeded").then_some(()))
    })?;
    ensure!(
        live_running,
        "progress never updated in place while the operation was Running"
    );
    eprintln!("{:?}: the first conversion succeeded", started.elapsed());
    // The page reloads when the operation ends: the artifact is linked.
    let artifact = env.api(&format!("/v1/repositories/app/operations/{id}"))?["artifact_digest"]
        .as_str()
        .context("no artifact digest")?
        .to_owned();
    let link = b.wait_for("the reloaded page's artifact link", WAIT, |b| {
        Ok(b.find_all("a[href$='?tab=referrers']")?.into_iter().next())
    })?;
    screenshot_if_asked(&b, "operation")?;
    b.click(&link)?;
    let listed = b.find(&format!("tr[data-referrer='{artifact}']"))?;
    ensure!(
        b.text(&listed)?.contains("streaming artifact"),
        "the Referrers tab does not show the artifact: {}",
        b.text(&listed)?
    );
    screenshot_if_asked(&b, "referrers")?;

    // Cancel a long one: Canceled, and no referrer of it is left.
    let id = create_slow(&b, &env, "older")?;
    b.wait_for("the conversion to run", WAIT, |b| {
        let state = shown_state(b, "section[data-operation]")?;
        let text = b.text_of(".op-progress .progress-text")?;
        Ok((state == "Running" && text.contains('%')).then_some(()))
    })?;
    eprintln!("{:?}: the conversion to cancel runs", started.elapsed());
    b.click(&b.find(".op-action form button")?)?;
    b.wait_for("the operation to be Canceled", WAIT, |b| {
        Ok((shown_state(b, "section[data-operation]")? == "Canceled").then_some(()))
    })?;
    let op = env.api(&format!("/v1/repositories/app/operations/{id}"))?;
    ensure!(op["state"] == "Canceled", "{op:#}");
    ensure!(
        env.referrers("app", &older)?.is_empty(),
        "a canceled conversion left a referrer"
    );
    ensure!(!env.referrers("app", &old)?.is_empty());
    b.goto(&env.url("/operations"))?;
    ensure!(b.find_all("tr[data-operation]")?.len() >= 3);
    screenshot_if_asked(&b, "operations")?;

    // Forged POSTs are refused: a form without the CSRF token (from the page itself), one with
    // a wrong token, and one from another origin with the right session cookie.
    b.execute(
        "var f = document.createElement('form'); f.method = 'post';\
         f.action = '/repositories/app/streaming';\
         var i = document.createElement('input'); i.name = 'streaming'; i.value = 'Inactive';\
         f.appendChild(i); document.body.appendChild(f); f.submit(); return null;",
        json!([]),
    )?;
    b.wait_for("the refusal page", WAIT, |b| {
        Ok(b.title()?.starts_with("Refused").then_some(()))
    })?;
    ensure!(b.body_text()?.contains("CSRF token"));
    for (headers, what) in [
        (vec![("Cookie", session_cookie.as_str())], "no CSRF token"),
        (
            vec![
                ("Cookie", session_cookie.as_str()),
                ("Origin", "http://evil.example"),
            ],
            "another origin",
        ),
    ] {
        let mut all = headers.clone();
        all.push(("Content-Type", "application/x-www-form-urlencoded"));
        let body = if what == "another origin" {
            "streaming=Inactive&csrf=0000".to_owned()
        } else {
            "streaming=Inactive".to_owned()
        };
        let answer = request_with_body(
            &env.home.addr(),
            "POST",
            "/repositories/app/streaming",
            &all,
            body.as_bytes(),
        )?;
        ensure!(
            answer.status == 403,
            "a POST with {what} answered {}",
            answer.status
        );
    }
    ensure!(
        env.api("/v1/repositories/app")?["streaming"] == "Active",
        "a forged POST changed the state"
    );

    // Hostile strings from the registry and from the form are text, never markup.
    let new = env
        .rt
        .block_on(env.client.head_manifest(&env.repo("app"), "new"))?;
    let hostile = env.rt.block_on(push_hostile_referrer(
        &env.client,
        &env.repo("app"),
        new.context("app:new is gone")?,
    ))?;
    b.goto(&env.url("/repositories/app/images/new?tab=referrers"))?;
    let row = b.find(&format!("tr[data-referrer='{}']", hostile.digest))?;
    ensure!(
        b.text(&row)?.contains("<script>window.pwned=1</script>"),
        "the hostile artifact type is not shown as text: {}",
        b.text(&row)?
    );
    ensure!(
        b.execute("return window.pwned || 0;", json!([]))? == 0,
        "a script ran"
    );
    ensure!(
        b.find_all("img")?.is_empty(),
        "registry text became an element"
    );
    b.goto(&env.url("/repositories/app"))?;
    b.type_into(
        &b.find("form.create input[name=reference]")?,
        "<img src=x onerror=\"window.pwned=3\">",
    )?;
    b.click(&b.find("form.create button[type=submit]")?)?;
    b.wait_for("the error page", WAIT, |b| {
        Ok(b.title()?
            .starts_with("The streaming artifact was not created")
            .then_some(()))
    })?;
    ensure!(
        b.body_text()?.contains("<img src=x"),
        "the error does not quote the input"
    );
    ensure!(
        b.find_all("main img")?.is_empty()
            && b.execute("return window.pwned || 0;", json!([]))? == 0
    );

    // Pages read without JavaScript: the server's HTML already holds what the browser showed.
    let page = http::get(
        &env.home.addr(),
        "/repositories/app",
        &[("Cookie", &session_cookie)],
    )?;
    let html = String::from_utf8_lossy(&page.body);
    ensure!(
        page.status == 200
            && html.contains("data-tag=\"new\"")
            && html.contains("data-streaming=\"Active\""),
        "the repository page needs a script to show its images: {} {html}",
        page.status
    );

    // The artifact kind: shown on the repository page and changed with its form (posted
    // where the streaming state is, so CSRF-protected as the forged POSTs above showed); the
    // streaming state stays.
    b.goto(&env.url("/repositories/app"))?;
    ensure!(shown_kind(&b)? == "chunked");
    b.execute(
        "document.getElementById('kind').value = 'index'; return null;",
        json!([]),
    )?;
    b.click(&b.find("form.kind button[type=submit]")?)?;
    b.wait_for("the repository to show the index kind", WAIT, |b| {
        Ok((shown_kind(b)? == "index").then_some(()))
    })?;
    let repo = env.api("/v1/repositories/app")?;
    ensure!(
        repo["kind"] == "index" && repo["streaming"] == "Active",
        "after the kind form: {repo}"
    );

    // Log out: the console is closed again, and the old cookie no longer opens it.
    b.goto(&env.url("/"))?;
    screenshot_if_asked(&b, "overview")?;
    b.click(&b.find("form.logout button")?)?;
    wait_path(&b, "/login")?;
    b.goto(&env.url("/"))?;
    ensure!(
        b.path()?.starts_with("/login"),
        "logged out, / showed {}",
        b.path()?
    );
    let replay = http::get(&env.home.addr(), "/", &[("Cookie", &session_cookie)])?;
    ensure!(
        replay.status == 303,
        "a logged-out cookie answered {}",
        replay.status
    );
    eprintln!("console scenario took {:?}", started.elapsed());
    Ok(())
}

/// The streaming state badge inside `scope`.
fn shown_state_streaming(b: &Browser, scope: &str) -> anyhow::Result<String> {
    let badge = b.find(&format!("{scope} [data-streaming]"))?;
    Ok(b.attribute(&badge, "data-streaming")?.unwrap_or_default())
}

/// The artifact kind the repository page shows.
fn shown_kind(b: &Browser) -> anyhow::Result<String> {
    let label = b.find(".state [data-kind]")?;
    Ok(b.attribute(&label, "data-kind")?.unwrap_or_default())
}
