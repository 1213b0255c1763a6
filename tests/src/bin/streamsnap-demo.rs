//! The demo: a private registry, an image shaped like a large application image (busybox, a
//! Python runtime, thousands of application modules and 200 MB of model weights), converted into
//! a streaming artifact; then a private containerd with streamsnap-snapshotterd pulls it through
//! the CRI image service (`streamsnap pull`, the call the kubelet makes) and starts two
//! containers lazily: one that prints a file, one whose Python interpreter imports modules the
//! way an application starts. The same runs on containerd's overlayfs snapshotter after a full
//! pull, for comparison. Bytes are counted by a proxy in front of the registry, outside every
//! program under test. Run by `deploy/demo.sh` (which installs the Debian packages it needs and
//! builds what it runs).

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use streamsnap_e2e::demo_image::{
    CONFIG, CONFIG_PATH, DemoShape, MAIN_PATH, MAIN_READY, demo_image_with_python,
};
use streamsnap_e2e::image::OciLayout;
use streamsnap_e2e::{
    CRI_NAMESPACE, Containerd, ContainerdOptions, CountingProxy, Registry, Snapshotterd,
    SnapshotterdOptions, manifest_digest, require_root_tools, run_container_in, skopeo_push,
    workspace_bin,
};

const USAGE: &str = "\
usage: streamsnap-demo [--keep [--ready-file FILE]]

Runs the streamsnap demo as root: a private registry (docker-registry) behind a byte-counting
proxy, an application image with a Python runtime converted into a streaming artifact, a private
containerd with streamsnap-snapshotterd pulling it through the CRI image service and starting
containers lazily, and the same on containerd's overlayfs snapshotter after a full pull. Prints
what each fetched and how long each start took. Nothing outside its temp dirs is changed; every
process it starts is stopped and its data removed at the end.

options:
  --keep             leave the registry, containerd and the daemon running after the demo and
                     print next steps to try; stop with SIGTERM or Ctrl-C (deploy/demo.sh --stop)
  --ready-file FILE  with --keep: write the next steps to FILE once everything runs
  -h, --help         print this help
";

/// Set by SIGINT or SIGTERM while `--keep` waits.
static STOP: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Default)]
struct Options {
    keep: bool,
    ready_file: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Option<Options>> {
    let mut options = Options::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--keep" => options.keep = true,
            "--ready-file" => {
                let file = args.next().context("--ready-file needs a FILE")?;
                options.ready_file = Some(file.into());
            }
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    ensure!(
        options.ready_file.is_none() || options.keep,
        "--ready-file only goes with --keep"
    );
    Ok(Some(options))
}

fn main() {
    let result = parse_args().and_then(|options| match options {
        None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(options) => demo(&options),
    });
    if let Err(e) = result {
        eprintln!("streamsnap-demo: error: {e:#}");
        std::process::exit(1);
    }
}

fn demo(options: &Options) -> anyhow::Result<()> {
    require_root_tools(&[
        "docker-registry",
        "skopeo",
        "busybox",
        "containerd",
        "ctr",
        "runc",
    ])?;
    let streamsnap = workspace_bin("streamsnap")?;

    step("starting a private registry (docker-registry 2.8) behind a byte-counting proxy");
    let registry = Registry::start()?;
    let proxy = CountingProxy::start(&registry.addr())?;
    println!(
        "   registry at {}, proxy at {}",
        registry.addr(),
        proxy.addr()
    );

    step("building and pushing the demo image (busybox, Python 3.11, an application)");
    let started = Instant::now();
    let spec = demo_image_with_python(DemoShape::default())?;
    let mut layout = OciLayout::new()?;
    let written = layout.write_image(&spec, "v1")?;
    let image = format!("{}/demo/app:v1", registry.addr());
    skopeo_push(layout.path(), "v1", &image)?;
    let compressed: u64 = written.layers.iter().map(|l| l.size).sum();
    let uncompressed: usize = spec.layers.iter().map(|l| l.tar.len()).sum();
    println!(
        "   {image}: {} layers, {} compressed, {} uncompressed ({:.1} s)",
        written.layers.len(),
        mb(compressed),
        mb(uncompressed as u64),
        started.elapsed().as_secs_f64()
    );
    let before = manifest_digest(&image)?;

    step(&format!(
        "streamsnap artifact-streaming create --image {image}"
    ));
    streamsnap_cli(
        &streamsnap,
        &["artifact-streaming", "create", "--image", &image],
    )?;
    ensure!(
        manifest_digest(&image)? == before,
        "the original image changed"
    );
    step(&format!(
        "streamsnap manifest list-referrers --image {image}"
    ));
    streamsnap_cli(
        &streamsnap,
        &["manifest", "list-referrers", "--image", &image],
    )?;

    step("starting streamsnap-snapshotterd and a private containerd whose CRI plugin uses it");
    let daemon = Snapshotterd::start(SnapshotterdOptions::default().with_metrics())?;
    let containerd = Containerd::start(
        ContainerdOptions::default()
            .with_proxy_snapshotter("streamsnap", daemon.socket())
            .with_cri("streamsnap")
            .with_plain_http(&proxy.addr())
            .with_plain_http(&registry.addr()),
    )?;
    println!(
        "   snapshotter socket {}, containerd socket {}",
        daemon.socket().display(),
        containerd.address().display()
    );

    // Through the proxy, so every byte the node reads from the registry is counted.
    let node_image = format!("{}/demo/app:v1", proxy.addr());
    let id = std::process::id();
    step("lazy: streamsnap pull (CRI), then two containers on the streamsnap snapshotter");
    let lazy = Starts::measure(
        &proxy,
        &streamsnap,
        &containerd,
        "streamsnap",
        &node_image,
        id,
    )?;
    lazy.print();

    step("baseline: the same on containerd's overlayfs snapshotter (a full pull)");
    let baseline_containerd = Containerd::start(
        ContainerdOptions::default()
            .with_cri("overlayfs")
            .with_plain_http(&proxy.addr()),
    )?;
    let full = Starts::measure(
        &proxy,
        &streamsnap,
        &baseline_containerd,
        "overlayfs",
        &node_image,
        id + 1,
    )?;
    full.print();
    ensure!(
        full.cat.output == lazy.cat.output,
        "the containers printed different files"
    );
    drop(baseline_containerd);

    step(&format!(
        "result (image {} compressed, registry on loopback)",
        mb(compressed)
    ));
    println!(
        "                                     streamsnap (lazy)          overlayfs (full pull)"
    );
    println!("                                   ready in      fetched      ready in      fetched");
    let rows = [
        ("pull", &lazy.pull, &full.pull),
        ("then start printing one file", &lazy.cat, &full.cat),
        ("then start a Python app", &lazy.python, &full.python),
        ("all three", &lazy.total(), &full.total()),
    ];
    for (what, l, f) in rows {
        println!(
            "   {what:<30} {:>7.2} s {:>9} {:>6}  {:>7.2} s {:>9} {:>6}",
            l.elapsed.as_secs_f64(),
            mb(l.bytes),
            percent(l.bytes, compressed),
            f.elapsed.as_secs_f64(),
            mb(f.bytes),
            percent(f.bytes, compressed),
        );
    }
    println!("   same container output on both: yes");
    println!(
        "   (percentages are of the image; over a real network a full pull takes longer the larger \
         the image,\n    a lazy start does not)"
    );

    if options.keep {
        let steps = next_steps(
            &registry,
            &proxy,
            &daemon,
            &containerd,
            &node_image,
            &streamsnap,
        );
        print!("\n{steps}");
        // The processes live as long as this one waits: the Drop of each stops it and removes
        // its data.
        install_stop_handler()?;
        if let Some(file) = &options.ready_file {
            std::fs::write(file, &steps).with_context(|| format!("writing {}", file.display()))?;
        }
        while !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
        println!("\nstopping: containerd, the snapshotter daemon, the registry");
        drop(containerd);
        drop(daemon);
        drop(proxy);
        drop(registry);
    }
    println!(
        "\ndemo done; registry, containerd and snapshotter are stopped and their data removed"
    );
    Ok(())
}

/// What one snapshotter did: the CRI pull, then a container printing one file, then a container
/// running the Python application's start.
struct Starts {
    pull: Measured,
    cat: Measured,
    python: Measured,
}

impl Starts {
    fn measure(
        proxy: &CountingProxy,
        streamsnap: &std::path::Path,
        containerd: &Containerd,
        snapshotter: &str,
        image: &str,
        id: u32,
    ) -> anyhow::Result<Self> {
        let socket = containerd.address().to_string_lossy().into_owned();
        let pull = measure(proxy, || {
            let args = ["pull", "--containerd-socket", &socket, image];
            streamsnap_cli(streamsnap, &args)?;
            Ok(String::new())
        })?;
        let cat = measure(proxy, || {
            run_container_in(
                containerd,
                CRI_NAMESPACE,
                snapshotter,
                image,
                &format!("demo-cat-{id}"),
                &["cat", &format!("/{CONFIG_PATH}")],
            )
        })?;
        ensure!(cat.output == CONFIG, "unexpected output: {:?}", cat.output);
        let python = measure(proxy, || {
            run_container_in(
                containerd,
                CRI_NAMESPACE,
                snapshotter,
                image,
                &format!("demo-python-{id}"),
                &["/usr/bin/python3", "-B", &format!("/{MAIN_PATH}")],
            )
        })?;
        ensure!(
            python.output.starts_with(CONFIG)
                && python
                    .output
                    .lines()
                    .last()
                    .is_some_and(|l| l.starts_with(MAIN_READY)),
            "unexpected output of the Python start: {:?}",
            python.output
        );
        Ok(Self { pull, cat, python })
    }

    fn print(&self) {
        println!(
            "   pulled in {:.2} s, {} fetched",
            self.pull.elapsed.as_secs_f64(),
            mb(self.pull.bytes)
        );
        print!("   container printed:\n{}", indent(&self.cat.output));
        let last = self.python.output.lines().last().unwrap_or_default();
        println!("   python3 -B /{MAIN_PATH} printed the config, then:\n     | {last}");
    }

    fn total(&self) -> Measured {
        Measured {
            output: String::new(),
            bytes: self.pull.bytes + self.cat.bytes + self.python.bytes,
            elapsed: self.pull.elapsed + self.cat.elapsed + self.python.elapsed,
        }
    }
}

struct Measured {
    output: String,
    bytes: u64,
    elapsed: Duration,
}

fn measure(
    proxy: &CountingProxy,
    f: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<Measured> {
    let bytes_before = proxy.downstream_bytes();
    let started = Instant::now();
    let output = f()?;
    Ok(Measured {
        output,
        bytes: proxy.downstream_bytes() - bytes_before,
        elapsed: started.elapsed(),
    })
}

/// Runs the `streamsnap` CLI with its output going to ours.
fn streamsnap_cli(streamsnap: &std::path::Path, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(streamsnap)
        .args(args)
        .status()
        .context("running streamsnap")?;
    ensure!(status.success(), "`streamsnap {}` failed", args.join(" "));
    Ok(())
}

fn next_steps(
    registry: &Registry,
    proxy: &CountingProxy,
    daemon: &Snapshotterd,
    containerd: &Containerd,
    image: &str,
    streamsnap: &std::path::Path,
) -> String {
    let sock = containerd.address().display();
    let bin = streamsnap
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let metrics = daemon.metrics_url().unwrap_or_default();
    format!(
        "==> still running (--keep); try:\n\
         \x20  export PATH={bin}:$PATH\n\
         \x20  # the streaming artifact next to the image\n\
         \x20  streamsnap manifest list-referrers --image {direct}\n\
         \x20  # a shell in a lazily started container (files come from the registry on first read)\n\
         \x20  ctr --address {sock} --namespace {CRI_NAMESPACE} run --rm -t --snapshotter streamsnap {image} sh1 sh\n\
         \x20  # the daemon's metrics: fetched bytes, cache, FUSE operations\n\
         \x20  curl -s {metrics}/metrics | grep -E '^streamsnap_(registry_range|cache|fuse)' | head -20\n\
         \x20  # your own image: push it, convert it, pull it lazily\n\
         \x20  skopeo copy --dest-tls-verify=false docker://SOURCE docker://{registry_addr}/you/app:1\n\
         \x20  streamsnap artifact-streaming create --image {registry_addr}/you/app:1\n\
         \x20  streamsnap pull --containerd-socket {sock} {registry_addr}/you/app:1\n\
         \x20  # the proxy at {proxy_addr} counts what the node fetches; logs: {daemon_log}, {containerd_log}\n\
         stop everything and remove its data: bash deploy/demo.sh --stop (or Ctrl-C / kill {pid})\n",
        direct = image.replacen(&proxy.addr(), &registry.addr(), 1),
        registry_addr = registry.addr(),
        proxy_addr = proxy.addr(),
        daemon_log = daemon.log_path().display(),
        containerd_log = containerd.log_path().display(),
        pid = std::process::id(),
    )
}

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set [`STOP`] instead of killing the process, so `--keep` stops what it
/// started and removes its data.
fn install_stop_handler() -> anyhow::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let handler: extern "C" fn(libc::c_int) = on_stop_signal;
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; `signal` takes
        // no pointers besides the handler, a valid function for the life of the process.
        let previous = unsafe { libc::signal(signal, handler as libc::sighandler_t) };
        ensure!(
            previous != libc::SIG_ERR,
            "installing a handler for signal {signal}"
        );
    }
    Ok(())
}

fn step(what: &str) {
    println!("\n==> {what}");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("     | {l}\n")).collect()
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn percent(part: u64, whole: u64) -> String {
    format!("{:.1}%", 100.0 * part as f64 / whole.max(1) as f64)
}
