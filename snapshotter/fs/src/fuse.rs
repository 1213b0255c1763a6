//! The `fuser` adapter: kernel requests in, [`LayerFs`] calls, replies out.
//!
//! Metadata requests are answered inline on the fuser thread (they only read the inode table).
//! Reads are spawned on the tokio runtime whose handle the caller passes in and answered from
//! the task, so a slow chunk fetch holds up no other request. The layer is immutable: open files
//! keep the page cache, attributes, entries and missing names are cached for a long TTL, and
//! every request that would change something is refused with EROFS.
//!
//! Each request is a round trip through the kernel, and a start-up under overlayfs makes
//! thousands, so the adapter lets the kernel skip what it can: listings come with every entry's
//! attributes (READDIRPLUS, so looking a listed name up costs nothing), opens of files take no
//! request at all where the kernel supports it (the answer would always be "read-only, keep the
//! cache"), and a layer without any xattr says so once (ENOSYS) instead of answering the xattr
//! queries overlayfs makes for every directory. Each of those kernel features can be turned off
//! ([`KernelFeatures`]); the adapter then answers the plain requests the kernel sends instead.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, CopyFileRangeFlags, Errno as FuseErrno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use nix::errno::Errno;
use tokio::runtime::Handle;
use tracing::Instrument as _;

use crate::features::{KernelFeature, KernelFeatures};
use crate::index::LayerIndex;
use crate::layer::{Attr, FileKind};
use crate::merged::{Merged, decode};
use crate::metadata::Layer;
use crate::metrics::{Metrics, Op};
use crate::mount::IntoLayer;
use crate::passthrough::PassthroughStore;
use crate::warnings::{READ_WARNING_INTERVAL, RateLimit};

/// Readahead asked of the kernel (it may allow less): chunks are up to 1 MiB and fetched whole.
const MAX_READAHEAD: u32 = 1 << 20;
/// The open flags of a passthrough open: the kernel refuses any but a few next to
/// FOPEN_PASSTHROUGH (FOPEN_KEEP_CACHE among them: the page cache is the backing file's).
const PASSTHROUGH_FLAGS: FopenFlags = FopenFlags::empty();
/// Background requests (readahead, async reads) the kernel may have in flight at once.
const MAX_BACKGROUND: u16 = 64;
/// Capabilities asked for when the kernel offers them: parallel reads of one file, lookups and
/// readdirs in one directory in parallel, symlink targets in the page cache, large requests.
const WANTED_CAPABILITIES: InitFlags = InitFlags::FUSE_ASYNC_READ
    .union(InitFlags::FUSE_PARALLEL_DIROPS)
    .union(InitFlags::FUSE_CACHE_SYMLINKS)
    .union(InitFlags::FUSE_MAX_PAGES)
    .union(InitFlags::FUSE_DO_READDIRPLUS);

/// What a session asks of a kernel offering `offered`, and whether it answers opens of files
/// ENOSYS so the kernel stops sending them (FUSE_NO_OPEN_SUPPORT): only what the kernel offers
/// and `features` allows.
pub(crate) fn negotiate(offered: InitFlags, features: KernelFeatures) -> (InitFlags, bool) {
    let mut wanted = WANTED_CAPABILITIES & offered;
    if !features.allows(KernelFeature::Readdirplus) {
        wanted.remove(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
    }
    let zero_message_open = features.allows(KernelFeature::ZeroMessageOpen)
        && offered.contains(InitFlags::FUSE_NO_OPEN_SUPPORT);
    (wanted, zero_message_open)
}

/// Whether the session answers opens of directories ENOSYS so the kernel stops sending them
/// (FUSE_NO_OPENDIR_SUPPORT): the kernel then keeps every listing cached, as the answer would
/// have told it.
pub(crate) fn negotiate_opendir(offered: InitFlags, features: KernelFeatures) -> bool {
    features.allows(KernelFeature::ZeroMessageOpendir)
        && offered.contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT)
}

/// Whether a session with a passthrough store uses passthrough with a kernel offering
/// `offered`: where `features` allows it, on a connection whose INIT this process answers (a
/// connection taken over keeps what the first answer asked for, and the opens the previous
/// process saw are not known here).
pub(crate) fn negotiate_passthrough(
    offered: InitFlags,
    features: KernelFeatures,
    answers_init: bool,
) -> bool {
    answers_init
        && features.allows(KernelFeature::Passthrough)
        && offered.contains(InitFlags::FUSE_PASSTHROUGH)
}

/// The open files of an inode, as the kernel needs them to be: all read through the page cache
/// of the mount, or all passed through to one backing file (it refuses a mix).
#[derive(Debug)]
enum OpenFile {
    Cached(u32),
    Passthrough(BackingId, u32),
}

/// Counts a request from the moment it is taken until its reply is sent (or the task ends).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn begin(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(counter))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A [`Layer`] served through FUSE. Cheap to create; one per mount. Every request is timed
/// and its errors counted in its [`Metrics`]; a read failing with EIO, and a failure to load
/// the layer's index, log a warning at most once a minute per layer.
#[derive(Debug)]
pub struct FuseLayer {
    layer: Arc<Layer>,
    handle: Handle,
    ttl: Duration,
    metrics: Arc<Metrics>,
    read_warnings: Arc<RateLimit>,
    load_warnings: RateLimit,
    /// Reads taken from the kernel and not answered yet (a handover waits for them).
    in_flight: Arc<AtomicUsize>,
    /// The kernel opens files without asking once told ENOSYS (FUSE_NO_OPEN_SUPPORT).
    zero_message_open: bool,
    /// The same for directories (FUSE_NO_OPENDIR_SUPPORT).
    zero_message_opendir: bool,
    /// The optional kernel features this layer may use.
    features: KernelFeatures,
    /// Where copies of whole files are kept for passthrough; kept past INIT only where
    /// passthrough was asked for (opens are then tracked). `None`: not used.
    passthrough_store: Option<Arc<PassthroughStore>>,
    /// The process answers the connection's INIT (not a connection taken over).
    answers_init: bool,
    /// The kernel refused a backing file: no more are tried on this mount.
    backing_refused: AtomicBool,
    /// Open files by inode, kept while passthrough is used.
    open_files: Mutex<HashMap<u64, OpenFile>>,
    /// The layers below this one, merged with it into one tree (`None`: the layer alone).
    merged: Option<Merged>,
}

impl FuseLayer {
    /// `handle` runs the reads; `ttl` is how long the kernel may cache entries and attributes.
    /// Counts into metrics registered nowhere unless [`with_metrics`](Self::with_metrics).
    pub fn new(layer: impl IntoLayer, handle: Handle, ttl: Duration) -> Self {
        Self {
            layer: layer.into_layer(),
            handle,
            ttl,
            metrics: Arc::default(),
            read_warnings: Arc::new(RateLimit::new(READ_WARNING_INTERVAL)),
            load_warnings: RateLimit::new(READ_WARNING_INTERVAL),
            in_flight: Arc::default(),
            zero_message_open: false,
            zero_message_opendir: false,
            features: KernelFeatures::default(),
            passthrough_store: None,
            answers_init: true,
            backing_refused: AtomicBool::new(false),
            open_files: Mutex::default(),
            merged: None,
        }
    }

    /// Serves the layer merged with `lowers` (the layers below it, nearest first, down to the
    /// image's first layer) as one tree ([`crate::merged`]); no lowers: the layer alone, its
    /// whiteouts and opaque directories presented for overlayfs. EINVAL for more layers than
    /// [`MAX_MERGED_LAYERS`](crate::MAX_MERGED_LAYERS).
    pub fn with_lowers(mut self, lowers: Vec<Arc<Layer>>) -> io::Result<Self> {
        if lowers.is_empty() {
            self.merged = None;
            return Ok(self);
        }
        let mut layers = Vec::with_capacity(lowers.len() + 1);
        layers.push(Arc::clone(&self.layer));
        layers.extend(lowers);
        self.merged = Some(Merged::new(layers).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "cannot merge more than {} layers into one mount",
                    crate::MAX_MERGED_LAYERS
                ),
            )
        })?);
        Ok(self)
    }

    /// Passes files whose copy `store` holds through to the kernel (where the kernel and the
    /// kernel features allow) and copies files that are whole on the node into it.
    pub fn with_passthrough(mut self, store: Arc<PassthroughStore>) -> Self {
        self.passthrough_store = Some(store);
        self
    }

    /// Whether this process answers the connection's INIT (false: a connection taken over).
    pub(crate) fn answering_init(mut self, answers_init: bool) -> Self {
        self.answers_init = answers_init;
        self
    }

    /// Uses only the optional kernel features `features` allows (all by default).
    pub fn with_kernel_features(mut self, features: KernelFeatures) -> Self {
        self.features = features;
        self
    }

    /// The count of reads in flight, shared with the mount so a handover can wait for them.
    pub(crate) fn in_flight(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.in_flight)
    }

    /// Counts requests, their latency and errors, and bytes read in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Accounts for a request of kind `op` that arrived at `started`.
    fn done<T>(&self, op: Op, started: Instant, result: &Result<T, Errno>) {
        self.metrics
            .observe(op, started, result.as_ref().err().copied());
    }

    /// The answer to a request that would change the layer, counted.
    fn refuse(&self) -> FuseErrno {
        self.metrics
            .observe(Op::Modify, Instant::now(), Some(Errno::EROFS));
        FuseErrno::EROFS
    }

    fn attr(&self, attr: &Attr) -> FileAttr {
        to_file_attr(attr)
    }

    /// Answers an open while passthrough is used: passed through to the file's copy when the
    /// store has one and no open of the inode reads through the page cache; otherwise cached,
    /// and a copy is started if the file is whole on the node. Every open is counted until its
    /// release, so the kernel never sees the two kinds mixed on one inode.
    /// `attr` is the file's in `layer` (whose `index` it is from), `ino` the number presented.
    fn open_tracked(
        &self,
        store: &Arc<PassthroughStore>,
        layer: &Arc<Layer>,
        index: &Arc<LayerIndex>,
        attr: &Attr,
        ino: u64,
        reply: ReplyOpen,
    ) {
        let cached = FopenFlags::FOPEN_KEEP_CACHE;
        let mut open_files = self.open_files.lock().unwrap_or_else(|e| e.into_inner());
        match open_files.get_mut(&ino) {
            Some(OpenFile::Passthrough(backing, count)) => {
                *count += 1;
                self.metrics.passthrough_opened();
                reply.opened_passthrough(FileHandle(1), PASSTHROUGH_FLAGS, backing);
                return;
            }
            Some(OpenFile::Cached(count)) => {
                *count += 1;
                reply.opened(FileHandle(0), cached);
                return;
            }
            None => {}
        }
        if attr.kind == FileKind::RegularFile && !self.backing_refused.load(Ordering::Relaxed) {
            let toc = crate::passthrough::toc_key(index, layer);
            if let Some(file) = store.file(toc, attr.ino) {
                match reply.open_backing(&file) {
                    Ok(backing) => {
                        self.metrics.passthrough_opened();
                        reply.opened_passthrough(FileHandle(1), PASSTHROUGH_FLAGS, &backing);
                        open_files.insert(ino, OpenFile::Passthrough(backing, 1));
                        return;
                    }
                    Err(error) => {
                        // Not on this connection (a backing file on a stacked file system, a
                        // kernel refusing): read through FUSE from now on.
                        self.backing_refused.store(true, Ordering::Relaxed);
                        tracing::warn!(
                            layer = %layer.digest(),
                            %error,
                            "the kernel refused a passthrough file: this layer's reads go \
                             through FUSE (turn passthrough off in [fuse] kernel_features_off \
                             to stop trying)"
                        );
                    }
                }
            } else {
                store.copy(layer, index, toc, attr.ino, attr.size, &self.handle);
            }
        }
        open_files.insert(ino, OpenFile::Cached(1));
        drop(open_files);
        reply.opened(FileHandle(0), cached);
    }

    /// The layer's index, loaded if it was dropped; EIO (and a rate-limited warning) when it
    /// cannot be loaded.
    fn index(&self) -> Result<Arc<LayerIndex>, Errno> {
        self.load(&self.layer)
    }

    /// [`index`](Self::index) of any layer of the mount.
    fn load(&self, layer: &Layer) -> Result<Arc<LayerIndex>, Errno> {
        layer.index().map_err(|error| {
            let layer = layer.digest();
            let error = crate::error_chain(&error);
            match self.load_warnings.allow(Instant::now()) {
                Some(suppressed) => tracing::warn!(
                    %layer,
                    error,
                    suppressed,
                    "cannot load the metadata of a mounted layer: its requests fail with EIO \
                     (further failures within {}s are only counted in the metrics)",
                    READ_WARNING_INTERVAL.as_secs()
                ),
                None => tracing::debug!(%layer, error, "layer metadata load failed"),
            }
            Errno::EIO
        })
    }
}

impl FuseLayer {
    /// The attributes of presented node `ino`.
    fn getattr_of(&self, ino: u64) -> Result<Attr, Errno> {
        match &self.merged {
            Some(merged) => merged.getattr(ino, &|layer| self.load(layer)),
            None => self.index().and_then(|index| index.getattr(ino)),
        }
    }

    /// The layer holding presented node `ino`, its index, and the node's number there.
    fn locate(&self, ino: u64) -> Result<(Arc<Layer>, Arc<LayerIndex>, u64), Errno> {
        match &self.merged {
            Some(merged) => {
                let (pos, local) = decode(ino);
                let (layer, index) = merged.layer_index(pos, &|layer| self.load(layer))?;
                Ok((Arc::clone(layer), index, local))
            }
            None => Ok((Arc::clone(&self.layer), self.index()?, ino)),
        }
    }

    /// Whether the mount's layers are worth passthrough ([`LayerIndex::worth_passthrough`],
    /// over all of them when merged).
    fn worth_passthrough(&self, min_file_bytes: u64) -> bool {
        match &self.merged {
            Some(merged) => merged.worth_passthrough(min_file_bytes, &|layer| self.load(layer)),
            None => self
                .index()
                .is_ok_and(|index| index.worth_passthrough(min_file_bytes)),
        }
    }

    /// Whether some layer of the mount has xattrs.
    fn has_xattrs(&self) -> Result<bool, Errno> {
        match &self.merged {
            Some(merged) => merged.has_xattrs(&|layer| self.load(layer)),
            None => Ok(self.index()?.has_xattrs()),
        }
    }
}

impl FuseLayer {
    /// Adds `entries` (node, offset, name, attributes) to a READDIRPLUS reply until it is full;
    /// an entry's attributes are worked out only when it is reached. The error of the first
    /// entry without attributes, which ends the reply.
    fn add_plus<'a>(
        &self,
        reply: &mut ReplyDirectoryPlus,
        entries: impl Iterator<Item = (u64, u64, &'a OsStr, Result<Attr, Errno>)>,
    ) -> Option<Errno> {
        for (ino, offset, name, attr) in entries {
            let attr = match attr {
                Ok(attr) => attr,
                Err(error) => return Some(error),
            };
            if reply.add(
                INodeNo(ino),
                offset,
                name,
                &self.ttl,
                &self.attr(&attr),
                Generation(0),
            ) {
                break;
            }
        }
        None
    }
}

/// Where a listing of `len` entries resumes after `offset` (past the end: nothing left).
fn listing_start(offset: u64, len: usize) -> usize {
    usize::try_from(offset).unwrap_or(usize::MAX).min(len)
}

fn errno(error: Errno) -> FuseErrno {
    FuseErrno::from_i32(error as i32)
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Directory => FileType::Directory,
        FileKind::RegularFile => FileType::RegularFile,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::NamedPipe => FileType::NamedPipe,
    }
}

/// The attributes of a negative entry: only its node number (0) matters to the kernel.
fn negative_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn to_file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.blocks,
        atime: attr.mtime,
        mtime: attr.mtime,
        ctime: attr.mtime,
        crtime: UNIX_EPOCH,
        kind: file_type(attr.kind),
        perm: attr.perm,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: attr.rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// Replies to an xattr request: the size when asked for it, ERANGE when the buffer is small.
/// Returns the error it answered with.
fn reply_xattr(reply: ReplyXattr, size: u32, value: Result<Vec<u8>, Errno>) -> Result<(), Errno> {
    match value {
        Err(error) => {
            reply.error(errno(error));
            return Err(error);
        }
        Ok(value) if size == 0 => reply.size(value.len() as u32),
        Ok(value) if value.len() > size as usize => {
            reply.error(FuseErrno::ERANGE);
            return Err(Errno::ERANGE);
        }
        Ok(value) => reply.data(&value),
    }
    Ok(())
}

/// Logs a read that failed with EIO: a warning at most once per [`READ_WARNING_INTERVAL`] per
/// layer, with how many were held back since the last one; the others at debug level.
fn read_failed(
    layer: streamsnap_format::Digest,
    warnings: &RateLimit,
    ino: u64,
    offset: u64,
    size: u32,
) {
    match warnings.allow(Instant::now()) {
        Some(suppressed) => tracing::warn!(
            %layer,
            ino,
            offset,
            size,
            suppressed,
            "a read of this layer failed with EIO: its chunks could not be fetched and verified \
             in time (details at debug level; further failures within {}s are only counted in \
             the metrics)",
            READ_WARNING_INTERVAL.as_secs()
        ),
        None => tracing::debug!(%layer, ino, offset, size, "read failed with EIO"),
    }
}

impl Filesystem for FuseLayer {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let offered = config.capabilities();
        let (wanted, mut zero_message_open) = negotiate(offered, self.features);
        // Only asks for what the kernel offers, so this cannot fail.
        let _ = config.add_capabilities(wanted);
        let passthrough = self.passthrough_store.as_ref().is_some_and(|store| {
            negotiate_passthrough(offered, self.features, self.answers_init)
                && self.worth_passthrough(store.config().min_file_bytes)
        });
        if passthrough {
            // Depth 1: the backing files must be on a file system that stacks on nothing, and
            // overlayfs can still stack on this mount.
            let _ = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH);
            let _ = config.set_max_stack_depth(1);
            zero_message_open = false;
        }
        if !self.answers_init
            && offered.contains(InitFlags::FUSE_PASSTHROUGH | InitFlags::FUSE_NO_OPEN_SUPPORT)
        {
            // Taken over: the first answer may have asked for passthrough, and files may be
            // open passed through that this process knows nothing of. The kernel refuses a
            // cached open of such a file, so opens are left to the kernel (whatever the config
            // says of zero-message opens) until the layer is mounted afresh.
            zero_message_open = true;
        }
        if !passthrough {
            self.passthrough_store = None;
        }
        // Runs in every process that serves the connection (a handover replays the kept INIT).
        self.zero_message_open = zero_message_open;
        self.zero_message_opendir = negotiate_opendir(offered, self.features);
        if let Err(kernel_max) = config.set_max_readahead(MAX_READAHEAD) {
            let _ = config.set_max_readahead(kernel_max);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND / 4 * 3);
        tracing::debug!(
            layer = %self.layer.digest(),
            capabilities = ?wanted,
            zero_message_open,
            zero_message_opendir = self.zero_message_opendir,
            passthrough,
            "fuse session initialised"
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let started = Instant::now();
        let result = match &self.merged {
            Some(merged) => merged.lookup(parent.0, name, &|layer| self.load(layer)),
            None => self.index().and_then(|index| index.lookup(parent.0, name)),
        };
        self.done(Op::Lookup, started, &result);
        match result {
            Ok(attr) => reply.entry(&self.ttl, &self.attr(&attr), Generation(0)),
            // A negative entry (node 0) the kernel caches like a positive one: the name will
            // never appear.
            Err(Errno::ENOENT) => reply.entry(&self.ttl, &negative_entry(), Generation(0)),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let started = Instant::now();
        let result = self.getattr_of(ino.0);
        self.done(Op::Getattr, started, &result);
        match result {
            Ok(attr) => reply.attr(&self.ttl, &self.attr(&attr)),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let started = Instant::now();
        let result = match &self.merged {
            Some(merged) => merged.readlink(ino.0, &|layer| self.load(layer)),
            None => self.index().and_then(|index| index.readlink(ino.0)),
        };
        self.done(Op::Readlink, started, &result);
        match result {
            Ok(target) => reply.data(&target),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let started = Instant::now();
        if self.zero_message_open {
            // The mount is read-only, so the kernel refuses writes itself; every other open
            // would be answered "keep the cache", which is what the kernel then assumes.
            self.metrics.observe(Op::Open, started, None);
            reply.error(FuseErrno::ENOSYS);
            return;
        }
        let result = if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            Err(Errno::EROFS)
        } else {
            self.locate(ino.0)
                .and_then(|(layer, index, local)| match index.getattr(local) {
                    Ok(attr) if attr.kind == FileKind::Directory => Err(Errno::EISDIR),
                    Ok(attr) => Ok((layer, index, attr)),
                    Err(error) => Err(error),
                })
        };
        self.done(Op::Open, started, &result);
        match result {
            Ok((layer, index, attr)) if let Some(store) = &self.passthrough_store => {
                self.open_tracked(store, &layer, &index, &attr, ino.0, reply);
            }
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut open_files = self.open_files.lock().unwrap_or_else(|e| e.into_inner());
        let last = match open_files.get_mut(&ino.0) {
            Some(OpenFile::Cached(count) | OpenFile::Passthrough(_, count)) => {
                *count = count.saturating_sub(1);
                *count == 0
            }
            None => false,
        };
        if last {
            // Dropping the backing id closes it; the kernel keeps the file while it uses it.
            open_files.remove(&ino.0);
        }
        drop(open_files);
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let started = Instant::now();
        // Loaded here, on the session's thread, rather than in the task: a read seldom finds
        // the index dropped (its lookup came first), and a load must not hold a runtime thread.
        let (layer, index, local) = match self.locate(ino.0) {
            Ok(located) => located,
            Err(error) => {
                self.metrics.observe(Op::Read, started, Some(error));
                reply.error(errno(error));
                return;
            }
        };
        let metrics = Arc::clone(&self.metrics);
        let warnings = Arc::clone(&self.read_warnings);
        let span = tracing::debug_span!("layer_read", layer = %layer.digest());
        let answering = InFlight::begin(&self.in_flight);
        // If the runtime is shutting down the task is dropped, and with it the reply: fuser then
        // answers EIO.
        let read = async move {
            let _answering = answering;
            let result = crate::ops::read(
                &index,
                &**layer.reader(),
                layer.options(),
                local,
                offset,
                size,
            )
            .await;
            metrics.observe(Op::Read, started, result.as_ref().err().copied());
            match result {
                Ok(data) => {
                    metrics.read_bytes(data.len());
                    reply.data(&data);
                }
                Err(error) => {
                    if error == Errno::EIO {
                        read_failed(layer.digest(), &warnings, local, offset, size);
                    }
                    reply.error(errno(error));
                }
            }
        };
        self.handle.spawn(read.instrument(span));
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _ds: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let started = Instant::now();
        if self.zero_message_opendir {
            // The kernel refuses writes to directories itself, and without an answer it keeps
            // the listing cached (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR), the answer below.
            self.metrics.observe(Op::Opendir, started, None);
            reply.error(FuseErrno::ENOSYS);
            return;
        }
        let result = if flags.acc_mode() != OpenAccMode::O_RDONLY {
            Err(Errno::EROFS)
        } else {
            match self.getattr_of(ino.0) {
                Ok(attr) if attr.kind != FileKind::Directory => Err(Errno::ENOTDIR),
                Ok(_) => Ok(()),
                Err(error) => Err(error),
            }
        };
        self.done(Op::Opendir, started, &result);
        match result {
            // listings never change: let the kernel keep them in its cache
            Ok(()) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let started = Instant::now();
        // Adds entries until the reply is full.
        let mut add = |entries: &mut dyn Iterator<Item = (u64, u64, FileKind, &OsStr)>| {
            for (ino, offset, kind, name) in entries {
                if reply.add(INodeNo(ino), offset, file_type(kind), name) {
                    break;
                }
            }
        };
        let result = match &self.merged {
            Some(merged) => merged
                .listing(ino.0, &|layer| self.load(layer))
                .map(|listing| {
                    add(&mut listing[listing_start(offset, listing.len())..]
                        .iter()
                        .map(|e| (e.ino, e.offset, e.kind, OsStr::from_bytes(&e.name))));
                }),
            None => self.index().and_then(|index| {
                index.readdir_iter(ino.0, offset).map(|entries| {
                    add(&mut entries.map(|e| (e.ino, e.offset, e.kind, e.name)));
                })
            }),
        };
        self.done(Op::Readdir, started, &result);
        match result {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let started = Instant::now();
        let failed = match &self.merged {
            Some(merged) => {
                let load = |layer: &Layer| self.load(layer);
                match merged.listing(ino.0, &load) {
                    Ok(listing) => {
                        let entries =
                            listing[listing_start(offset, listing.len())..]
                                .iter()
                                .map(|entry| {
                                    // As a lookup answers (which remembers the directories
                                    // listed).
                                    let name = OsStr::from_bytes(&entry.name);
                                    let attr = if entry.name == b"." || entry.name == b".." {
                                        merged.getattr(entry.ino, &load)
                                    } else {
                                        merged.lookup(ino.0, name, &load)
                                    };
                                    (entry.ino, entry.offset, name, attr)
                                });
                        self.add_plus(&mut reply, entries)
                    }
                    Err(error) => Some(error),
                }
            }
            None => match self.index() {
                Ok(index) => match index.readdir_iter(ino.0, offset) {
                    Ok(entries) => self.add_plus(
                        &mut reply,
                        entries.map(|e| (e.ino, e.offset, e.name, index.getattr(e.ino))),
                    ),
                    Err(error) => Some(error),
                },
                Err(error) => Some(error),
            },
        };
        self.metrics.observe(Op::Readdirplus, started, failed);
        match failed {
            None => reply.ok(),
            Some(error) => reply.error(errno(error)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ds: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let started = Instant::now();
        let s = match &self.merged {
            Some(merged) => merged.statfs(&|layer| self.load(layer)),
            None => self.index().map(|index| index.statfs()),
        };
        let s = match s {
            Ok(s) => s,
            Err(error) => {
                self.metrics.observe(Op::Statfs, started, Some(error));
                reply.error(errno(error));
                return;
            }
        };
        self.metrics.observe(Op::Statfs, started, None);
        reply.statfs(
            s.blocks,
            0,
            0,
            s.files,
            0,
            s.block_size,
            s.name_max,
            s.block_size,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let started = Instant::now();
        let has_xattrs = match self.has_xattrs() {
            Ok(has) => has,
            Err(error) => {
                self.metrics.observe(Op::Getxattr, started, Some(error));
                reply.error(errno(error));
                return;
            }
        };
        if !has_xattrs {
            // The kernel stops asking this mount: every query then fails EOPNOTSUPP at once,
            // which overlayfs and capability checks read as "none".
            self.metrics.observe(Op::Getxattr, started, None);
            reply.error(FuseErrno::ENOSYS);
            return;
        }
        let value = match &self.merged {
            Some(merged) => merged.getxattr(ino.0, name, &|layer| self.load(layer)),
            None => self.index().and_then(|index| index.getxattr(ino.0, name)),
        };
        let result = reply_xattr(reply, size, value);
        self.done(Op::Getxattr, started, &result);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let started = Instant::now();
        let has_xattrs = match self.has_xattrs() {
            Ok(has) => has,
            Err(error) => {
                self.metrics.observe(Op::Listxattr, started, Some(error));
                reply.error(errno(error));
                return;
            }
        };
        if !has_xattrs {
            self.metrics.observe(Op::Listxattr, started, None);
            reply.error(FuseErrno::ENOSYS);
            return;
        }
        let value = match &self.merged {
            Some(merged) => merged.listxattr(ino.0, &|layer| self.load(layer)),
            None => self.index().and_then(|index| index.listxattr(ino.0)),
        };
        let result = reply_xattr(reply, size, value);
        self.done(Op::Listxattr, started, &result);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let started = Instant::now();
        let result = match self.getattr_of(ino.0) {
            Ok(_) if mask.contains(AccessFlags::W_OK) => Err(Errno::EROFS),
            Ok(_) => Ok(()),
            Err(error) => Err(error),
        };
        self.done(Op::Access, started, &result);
        match result {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno(error)),
        }
    }

    // Everything below would change the layer.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(self.refuse());
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse());
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse());
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.refuse());
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.refuse());
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse());
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(self.refuse());
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse());
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(self.refuse());
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(self.refuse());
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.refuse());
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(self.refuse());
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(self.refuse());
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(self.refuse());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_features_turned_off_are_neither_asked_for_nor_used() {
        let offered = WANTED_CAPABILITIES
            | InitFlags::FUSE_NO_OPEN_SUPPORT
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_HAS_RESEND;
        let (wanted, zero) = negotiate(offered, KernelFeatures::all());
        assert_eq!(wanted, WANTED_CAPABILITIES);
        assert!(zero);
        // Only what the kernel offers.
        let (wanted, zero) = negotiate(InitFlags::FUSE_ASYNC_READ, KernelFeatures::all());
        assert_eq!(wanted, InitFlags::FUSE_ASYNC_READ);
        assert!(!zero);

        let (wanted, zero) = negotiate(
            offered,
            KernelFeatures::without([KernelFeature::Readdirplus]),
        );
        assert!(
            !wanted.intersects(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO)
        );
        assert_eq!(wanted | InitFlags::FUSE_DO_READDIRPLUS, WANTED_CAPABILITIES);
        assert!(zero);

        let (wanted, zero) = negotiate(
            offered,
            KernelFeatures::without([KernelFeature::ZeroMessageOpen]),
        );
        assert_eq!(wanted, WANTED_CAPABILITIES);
        assert!(!zero);

        // Resend is not negotiated: the daemon decides whether to send FUSE_NOTIFY_RESEND.
        let (wanted, zero) = negotiate(offered, KernelFeatures::without([KernelFeature::Resend]));
        assert_eq!(wanted, WANTED_CAPABILITIES);
        assert!(zero);
    }

    #[test]
    fn zero_message_opendirs_are_used_only_where_offered_and_allowed() {
        let offered = WANTED_CAPABILITIES | InitFlags::FUSE_NO_OPENDIR_SUPPORT;
        assert!(negotiate_opendir(offered, KernelFeatures::all()));
        assert!(!negotiate_opendir(
            WANTED_CAPABILITIES,
            KernelFeatures::all()
        ));
        let off = KernelFeatures::without([KernelFeature::ZeroMessageOpendir]);
        assert!(!negotiate_opendir(offered, off));
    }

    #[test]
    fn passthrough_is_used_only_where_offered_allowed_and_answered() {
        let offered = WANTED_CAPABILITIES | InitFlags::FUSE_PASSTHROUGH;
        assert!(negotiate_passthrough(offered, KernelFeatures::all(), true));
        assert!(!negotiate_passthrough(
            WANTED_CAPABILITIES,
            KernelFeatures::all(),
            true
        ));
        let off = KernelFeatures::without([KernelFeature::Passthrough]);
        assert!(!negotiate_passthrough(offered, off, true));
        // A connection taken over: the first answer decided, the opens before are unknown.
        assert!(!negotiate_passthrough(
            offered,
            KernelFeatures::all(),
            false
        ));
    }

    #[test]
    fn only_layers_mostly_of_large_files_are_worth_passthrough() {
        let index = |files: &[usize]| {
            let mut b = crate::testutil::LayerBuilder::new(1 << 20);
            for (i, &len) in files.iter().enumerate() {
                b.file(&format!("f{i}"), 0o644, &vec![7u8; len]);
            }
            let (toc, _) = b.build();
            let digest = streamsnap_format::Digest::sha256(b"toc");
            LayerIndex::build(&toc, digest, &crate::layer::FsOptions::default()).unwrap()
        };
        assert!(index(&[3000, 2000]).worth_passthrough(2500), "3000 of 5000");
        assert!(
            !index(&[3000, 2000, 2000]).worth_passthrough(2500),
            "3000 of 7000"
        );
        assert!(!index(&[100, 200]).worth_passthrough(2500), "none large");
        assert!(!index(&[]).worth_passthrough(1), "no file");
    }

    #[test]
    fn errno_mapping_keeps_the_code() {
        for error in [
            Errno::ENOENT,
            Errno::EIO,
            Errno::ENODATA,
            Errno::ENOTDIR,
            Errno::EISDIR,
        ] {
            assert_eq!(i32::from(errno(error)), error as i32);
        }
    }

    /// Counts the events logged, by level.
    #[derive(Default)]
    struct Events {
        warn: std::sync::atomic::AtomicUsize,
        debug: std::sync::atomic::AtomicUsize,
    }

    impl tracing::Subscriber for Events {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            let counter = match *event.metadata().level() {
                tracing::Level::WARN => &self.warn,
                tracing::Level::DEBUG => &self.debug,
                _ => return,
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[test]
    fn failed_reads_warn_once_per_interval_per_layer_and_the_rest_go_to_debug() {
        let mut b = crate::testutil::LayerBuilder::new(4096);
        b.file("f", 0o644, b"x");
        let (toc, reader) = b.build();
        let fs = crate::LayerFs::new(toc, reader, crate::FsOptions::default()).unwrap();
        let layer = fs.toc().layer_digest();
        let events = Arc::new(Events::default());
        let (one, other) = (
            RateLimit::new(READ_WARNING_INTERVAL),
            RateLimit::new(READ_WARNING_INTERVAL),
        );
        tracing::subscriber::with_default(Arc::clone(&events), || {
            for i in 0..100 {
                read_failed(layer, &one, 2, i * 4096, 4096);
            }
            read_failed(layer, &other, 2, 0, 4096);
        });
        let count =
            |c: &std::sync::atomic::AtomicUsize| c.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(count(&events.warn), 2, "one per layer");
        assert_eq!(count(&events.debug), 99);
    }

    #[test]
    fn attributes_carry_over_to_fuser() {
        let attr = Attr {
            ino: 7,
            kind: FileKind::CharDevice,
            perm: 0o4755,
            nlink: 2,
            uid: 1000,
            gid: 100,
            size: 1025,
            blocks: 3,
            rdev: crate::layer::makedev(4, 64),
            mtime: UNIX_EPOCH + Duration::new(1_700_000_000, 5),
        };
        let fuse = to_file_attr(&attr);
        assert_eq!(fuse.ino, INodeNo(7));
        assert_eq!(fuse.kind, FileType::CharDevice);
        assert_eq!(
            (fuse.perm, fuse.nlink, fuse.uid, fuse.gid),
            (0o4755, 2, 1000, 100)
        );
        assert_eq!((fuse.size, fuse.blocks, fuse.rdev), (1025, 3, 0x440));
        assert_eq!(fuse.mtime, attr.mtime);
    }
}
