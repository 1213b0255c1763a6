//! The demo image: a busybox rootfs plus an "application" layer shaped like a real large image:
//! thousands of small source files, a few large model/data files, and one small config file the
//! container reads at start. A container that starts and prints its config reads a tiny fraction
//! of the image, which is the case artifact streaming is for.

use crate::image::{Compression, ImageSpec, LayerBlob};
use crate::targen::{TarGen, XorShift, pseudo_random_bytes};

/// The file the demo container prints.
pub const CONFIG_PATH: &str = "app/config/settings.ini";
pub const CONFIG: &str = "[app]\nname = streamsnap demo\nmessage = started lazily\n";

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
    let mut rng = XorShift::new(42);
    let words = [
        "import", "def", "return", "self", "class", "numpy", "tensor", "for", "in", "if",
    ];
    for i in 0..shape.source_files {
        if i % 100 == 0 {
            tar.dir(&format!("app/lib/pkg{:03}", i / 100), 0o755);
        }
        let len = rng.below(2_000..40_000) as usize;
        let mut text = String::with_capacity(len + 16);
        while text.len() < len {
            text.push_str(words[rng.below(0..words.len() as u64) as usize]);
            text.push(if rng.below(0..8) == 0 { '\n' } else { ' ' });
        }
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

/// The demo image: busybox + the application layer, gzip-compressed like most registries' images.
pub fn demo_image(shape: DemoShape) -> anyhow::Result<ImageSpec> {
    let spec = ImageSpec::busybox(vec![LayerBlob::new(app_layer(shape), Compression::Gzip)])?;
    Ok(spec.with_cmd(&["/bin/cat", &format!("/{CONFIG_PATH}")]))
}
