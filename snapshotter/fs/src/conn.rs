//! FUSE connections the filesystem owns itself, so they can outlive the process serving them.
//!
//! Instead of letting fuser mount, a layer is mounted here: `/dev/fuse` is opened, mounted with
//! `fd=N`, and the kernel's INIT request read and kept. The descriptor can be handed to a holder
//! process (see the `streamsnap-holder` crate) and taken back by the next daemon, which sets up
//! its fuser session from the kept INIT request without the kernel sending another (see
//! [`crate::serve`]).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::fcntl::OFlag;
use nix::mount::MsFlags;
use nix::sys::stat::Mode;

/// The read buffer the kernel requires for a FUSE request (FUSE_MIN_READ_BUFFER) is 8 KiB; an
/// INIT request is about 100 bytes.
const INIT_BUFFER: usize = 64 << 10;
/// `FUSE_INIT` opcode and `FUSE_NOTIFY_RESEND` notification code of the FUSE protocol.
const FUSE_INIT: u32 = 26;
const FUSE_NOTIFY_RESEND: i32 = 7;
/// `FUSE_INIT_EXT` in `flags` announces `flags2`; `FUSE_HAS_RESEND` is bit 39 (bit 7 of flags2).
const FUSE_INIT_EXT: u32 = 1 << 30;
const FUSE_HAS_RESEND_IN_FLAGS2: u32 = 1 << 7;

/// A mounted FUSE connection: its `/dev/fuse` descriptor and the INIT request the kernel sent.
#[derive(Debug)]
pub struct FuseConnection {
    pub fd: OwnedFd,
    pub init: Vec<u8>,
}

/// How a connection is mounted.
#[derive(Clone, Debug)]
pub struct ConnectionOptions {
    pub fsname: String,
    pub allow_other: bool,
}

impl FuseConnection {
    /// Opens `/dev/fuse`, mounts it read-only on `mountpoint` and reads the kernel's INIT
    /// request, which is left unanswered: [`crate::serve`] answers it.
    pub fn mount(mountpoint: &Path, options: &ConnectionOptions) -> io::Result<Self> {
        let fd = nix::fcntl::open("/dev/fuse", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| {
                io::Error::new(
                    io::Error::from(e).kind(),
                    format!("opening /dev/fuse: {e} (is the fuse module loaded?)"),
                )
            })?;
        use std::os::unix::fs::PermissionsExt;
        let root_mode = std::fs::metadata(mountpoint)?.permissions().mode() & 0o170000;
        let mut data = format!(
            "fd={},rootmode={root_mode:o},user_id={},group_id={}",
            fd.as_raw_fd(),
            nix::unistd::getuid(),
            nix::unistd::getgid()
        );
        if options.allow_other {
            data.push_str(",allow_other,default_permissions");
        }
        // Images carry device nodes and setuid binaries; containerd adds nodev/nosuid itself
        // where it wants them.
        nix::mount::mount(
            Some(options.fsname.as_str()),
            mountpoint,
            Some("fuse.streamsnap"),
            MsFlags::MS_RDONLY,
            Some(data.as_str()),
        )
        .map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("mounting FUSE on {}: {e}", mountpoint.display()),
            )
        })?;
        let mut buf = vec![0u8; INIT_BUFFER];
        let init = loop {
            match nix::unistd::read(&fd, &mut buf) {
                Ok(n) => break buf[..n].to_vec(),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("reading FUSE INIT: {e}"),
                    ));
                }
            }
        };
        if opcode(&init) != Some(FUSE_INIT) {
            let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the first FUSE request is not INIT",
            ));
        }
        Ok(Self { fd, init })
    }

    /// A connection from a descriptor and INIT request kept elsewhere (the holder).
    pub fn from_parts(fd: OwnedFd, init: Vec<u8>) -> io::Result<Self> {
        if opcode(&init) != Some(FUSE_INIT) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the kept request is not a FUSE INIT",
            ));
        }
        Ok(Self { fd, init })
    }

    /// Another descriptor of the same connection (the holder keeps one).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
            init: self.init.clone(),
        })
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Whether the kernel can resend requests a dead daemon had taken (Linux 6.9+), as it said
    /// in its INIT request.
    pub fn resend_supported(&self) -> bool {
        self.offered() & (u64::from(FUSE_HAS_RESEND_IN_FLAGS2) << 32) != 0
    }

    /// The capabilities the kernel offered in its INIT request: `flags`, and `flags2` in the
    /// upper half when `FUSE_INIT_EXT` announces it (see
    /// [`KernelFeatures::describe`](crate::KernelFeatures::describe)).
    pub fn offered(&self) -> u64 {
        // fuse_in_header (40 bytes), then fuse_init_in: major, minor, max_readahead, flags,
        // flags2 (u32 each).
        let word = |offset: usize| {
            self.init
                .get(offset..offset + 4)
                .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
        };
        let flags = word(40 + 12).unwrap_or(0);
        let flags2 = if flags & FUSE_INIT_EXT != 0 {
            word(40 + 16).unwrap_or(0)
        } else {
            0
        };
        u64::from(flags) | u64::from(flags2) << 32
    }

    /// Asks the kernel to queue again every request a previous daemon took and did not answer
    /// (`FUSE_NOTIFY_RESEND`). They are then read and answered by this process.
    pub fn notify_resend(&self) -> io::Result<()> {
        // fuse_out_header: len, error (the notification code), unique 0.
        let mut message = Vec::with_capacity(16);
        message.extend_from_slice(&16u32.to_ne_bytes());
        message.extend_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
        message.extend_from_slice(&0u64.to_ne_bytes());
        nix::unistd::write(&self.fd, &message)
            .map(drop)
            .map_err(io::Error::from)
    }
}

/// The opcode of a FUSE request (fuse_in_header: len u32, opcode u32, ...).
fn opcode(request: &[u8]) -> Option<u32> {
    (request.len() >= 40).then(|| u32::from_ne_bytes(request[4..8].try_into().expect("4 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init_request(flags: u32, flags2: u32) -> Vec<u8> {
        let mut request = vec![0u8; 40 + 64];
        request[0..4].copy_from_slice(&104u32.to_ne_bytes());
        request[4..8].copy_from_slice(&FUSE_INIT.to_ne_bytes());
        request[52..56].copy_from_slice(&flags.to_ne_bytes());
        request[56..60].copy_from_slice(&flags2.to_ne_bytes());
        request
    }

    #[test]
    fn resend_support_is_read_from_the_init_flags() {
        let fd = std::fs::File::open("/dev/null").unwrap().into();
        let yes =
            FuseConnection::from_parts(fd, init_request(FUSE_INIT_EXT, FUSE_HAS_RESEND_IN_FLAGS2))
                .unwrap();
        assert!(yes.resend_supported());
        let fd = std::fs::File::open("/dev/null").unwrap().into();
        let no =
            FuseConnection::from_parts(fd, init_request(0, FUSE_HAS_RESEND_IN_FLAGS2)).unwrap();
        assert!(
            !no.resend_supported(),
            "flags2 counts only with FUSE_INIT_EXT"
        );
        let fd = std::fs::File::open("/dev/null").unwrap().into();
        assert!(FuseConnection::from_parts(fd, vec![0; 10]).is_err());
    }

    #[test]
    fn offered_features_are_read_from_the_init_flags() {
        use crate::{KernelFeature, KernelFeatures};
        // FUSE_PASSTHROUGH is bit 37: bit 5 of flags2.
        let flags2 = FUSE_HAS_RESEND_IN_FLAGS2 | 1 << 5;
        let fd = std::fs::File::open("/dev/null").unwrap().into();
        let all = FuseConnection::from_parts(
            fd,
            init_request(FUSE_INIT_EXT | 1 << 13 | 1 << 17 | 1 << 24, flags2),
        )
        .unwrap();
        assert_eq!(
            KernelFeatures::without([KernelFeature::ZeroMessageOpen]).describe(Some(all.offered())),
            "readdirplus: used, zero_message_open: off (config), resend: used, passthrough: used, \
             zero_message_opendir: used"
        );
        assert_eq!(
            KernelFeatures::all().describe(Some(all.offered())),
            "readdirplus: used, zero_message_open: not used (passthrough needs the opens), resend: \
             used, passthrough: used, zero_message_opendir: used"
        );
        assert_eq!(
            KernelFeatures::without([KernelFeature::Passthrough]).describe(Some(all.offered())),
            "readdirplus: used, zero_message_open: used, resend: used, passthrough: off (config), \
             zero_message_opendir: used"
        );
        let fd = std::fs::File::open("/dev/null").unwrap().into();
        let old = FuseConnection::from_parts(fd, init_request(1 << 13, 0)).unwrap();
        assert_eq!(
            KernelFeatures::all().describe(Some(old.offered())),
            "readdirplus: used, zero_message_open: not offered by the kernel, resend: not offered \
             by the kernel, passthrough: not offered by the kernel, zero_message_opendir: not \
             offered by the kernel"
        );
    }
}
