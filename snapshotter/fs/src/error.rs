/// Why a layer's TOC cannot be presented as a filesystem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("layer root entry is a {kind}, not a directory: the layer cannot be mounted")]
    RootNotDirectory { kind: &'static str },

    #[error("toc has {count} entries, more than a layer filesystem can index ({max})")]
    TooManyEntries { count: usize, max: usize },
}
