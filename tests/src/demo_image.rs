//! The demo image: a busybox rootfs plus an "application" layer shaped like a real large image:
//! thousands of small Python modules, a few large model/data files, one small config file and
//! `app/main.py`, which imports part of the application and of the standard library and prints
//! the config. A container that prints the config reads a tiny fraction of the image; one that
//! runs `main.py` (on [`demo_image_with_python`], which adds the host's Python runtime) is the
//! start-up of a real interpreter, which is the case artifact streaming is for.

use crate::image::{Compression, ImageSpec, LayerBlob};
use crate::targen::{TarGen, XorShift, pseudo_random_bytes};

/// The file the demo container prints.
pub const CONFIG_PATH: &str = "app/config/settings.ini";
pub const CONFIG: &str = "[app]\nname = streamsnap demo\nmessage = started lazily\n";

/// The start-up script: `python3 -B /app/main.py`.
pub const MAIN_PATH: &str = "app/main.py";
/// Every how many application modules `main.py` imports one.
pub const IMPORT_EVERY: usize = 10;
/// The standard library modules `main.py` imports (what a web service or data tool pulls in).
pub const STDLIB_IMPORTS: &[&str] = &[
    "argparse",
    "asyncio",
    "base64",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "email.parser",
    "gzip",
    "hashlib",
    "http.client",
    "json",
    "logging.handlers",
    "pathlib",
    "sqlite3",
    "ssl",
    "subprocess",
    "tarfile",
    "typing",
    "unittest",
    "urllib.request",
    "uuid",
    "xml.etree.ElementTree",
    "zipfile",
];
/// What the last line `main.py` prints starts with.
pub const MAIN_READY: &str = "ready: ";

/// Sizes of the generated application layer.
#[derive(Clone, Copy, Debug)]
pub struct DemoShape {
    /// Small text files (Python-module-like), 2 to 40 KB each.
    pub source_files: usize,
    /// Large incompressible files (model weights, datasets).
    pub large_files: usize,
    pub large_file_size: usize,
}

impl Default for DemoShape {
    fn default() -> Self {
        Self {
            source_files: 3000,
            large_files: 3,
            large_file_size: 64 << 20,
        }
    }
}

/// The application layer tar.
pub fn app_layer(shape: DemoShape) -> Vec<u8> {
    let mut tar = TarGen::new();
    tar.dir("app", 0o755)
        .dir("app/config", 0o755)
        .dir("app/lib", 0o755)
        .dir("app/models", 0o755);
    tar.file(CONFIG_PATH, 0o644, CONFIG.as_bytes());
    tar.file(MAIN_PATH, 0o644, main_py(shape).as_bytes());
    tar.file("app/lib/__init__.py", 0o644, b"");
    let mut rng = XorShift::new(42);
    let words = [
        "import", "def", "return", "self", "class", "numpy", "tensor", "for", "in", "if",
    ];
    for i in 0..shape.source_files {
        if i % 100 == 0 {
            tar.dir(&format!("app/lib/pkg{:03}", i / 100), 0o755);
            tar.file(
                &format!("app/lib/pkg{:03}/__init__.py", i / 100),
                0o644,
                b"",
            );
        }
        // A docstring of words, then a function: valid Python of the usual size.
        let len = rng.below(2_000..40_000) as usize;
        let mut text = String::with_capacity(len + 64);
        text.push_str("\"\"\"");
        while text.len() < len {
            text.push_str(words[rng.below(0..words.len() as u64) as usize]);
            text.push(if rng.below(0..8) == 0 { '\n' } else { ' ' });
        }
        text.push_str(&format!("\"\"\"\n\n\ndef run(x):\n    return x + {i}\n"));
        tar.file(
            &format!("app/lib/pkg{:03}/module{i:05}.py", i / 100),
            0o644,
            text.as_bytes(),
        );
    }
    for i in 0..shape.large_files {
        let data = pseudo_random_bytes(7 + i as u64, shape.large_file_size);
        tar.file(&format!("app/models/weights-{i}.bin"), 0o644, &data);
    }
    tar.finish()
}

/// `app/main.py`: imports [`STDLIB_IMPORTS`] and every [`IMPORT_EVERY`]th application module,
/// calls each, reads the config and prints it, then a last line starting with [`MAIN_READY`].
fn main_py(shape: DemoShape) -> String {
    format!(
        r#"import configparser
import importlib
import sys
import time

started = time.monotonic()
for name in {stdlib:?}:
    importlib.import_module(name)
total = 0
for i in range(0, {modules}, {every}):
    total += importlib.import_module(f"lib.pkg{{i // 100:03}}.module{{i:05}}").run(0)
config = configparser.ConfigParser()
config.read("/{config}")
sys.stdout.write(open("/{config}").read())
print(f"{ready}python {{sys.version.split()[0]}}, {{len(sys.modules)}} modules imported, "
      f"{{time.monotonic() - started:.2f}} s, app {{config['app']['name']!r}}")
"#,
        stdlib = STDLIB_IMPORTS,
        modules = shape.source_files,
        every = IMPORT_EVERY,
        config = CONFIG_PATH,
        ready = MAIN_READY,
    )
}

/// The demo image: busybox + the application layer, gzip-compressed like most registries' images.
pub fn demo_image(shape: DemoShape) -> anyhow::Result<ImageSpec> {
    let spec = ImageSpec::busybox(vec![LayerBlob::new(app_layer(shape), Compression::Gzip)])?;
    Ok(spec.with_cmd(&["/bin/cat", &format!("/{CONFIG_PATH}")]))
}

/// The demo image with the host's Python runtime between busybox and the application, so that
/// `python3 -B /app/main.py` runs (see [`crate::host_python`]).
pub fn demo_image_with_python(shape: DemoShape) -> anyhow::Result<ImageSpec> {
    let spec = ImageSpec::busybox(vec![
        LayerBlob::new(crate::host_python::python_layer()?, Compression::Gzip),
        LayerBlob::new(app_layer(shape), Compression::Gzip),
    ])?;
    Ok(spec.with_cmd(&["/usr/bin/python3", "-B", &format!("/{MAIN_PATH}")]))
}
