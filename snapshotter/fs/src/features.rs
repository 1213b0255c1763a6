//! The optional kernel FUSE features a layer uses when the kernel offers them, and the switch
//! that turns each off (a workaround for a kernel bug, and how the tests run the fallbacks).
//!
//! Every feature has a fallback that is always correct, only slower:
//! - READDIRPLUS: listings without attributes (plain READDIR); the kernel then looks up the
//!   names it needs one request each.
//! - zero-message opens (FUSE_NO_OPEN_SUPPORT): every open of a file is a request, answered
//!   "read-only, keep the cache".
//! - zero-message opendirs (FUSE_NO_OPENDIR_SUPPORT): every open of a directory is a request,
//!   answered "keep the listing cached" (what the kernel assumes without the request).
//! - RESEND (FUSE_NOTIFY_RESEND, Linux 6.9+): after a crash the next daemon cannot get back the
//!   requests the dead one took, so it mounts the layers afresh instead of taking their
//!   connections over (running containers reading them see errors; new ones work).
//!
//! - passthrough (FUSE_PASSTHROUGH, Linux 6.9+): files whose copy is on the node are read by the
//!   kernel itself ([`crate::PassthroughStore`]); off, every read of them is a request answered
//!   from the chunk cache. Passthrough needs the opens, so where it is used zero-message opens
//!   are not: a mount uses one or the other.

use std::fmt;

/// One optional kernel feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelFeature {
    /// Listings carry every entry's attributes (FUSE_DO_READDIRPLUS, asked for at INIT).
    Readdirplus,
    /// Opens of files take no request once the first is answered ENOSYS (FUSE_NO_OPEN_SUPPORT).
    ZeroMessageOpen,
    /// After a crash the kernel resends what the dead daemon took (FUSE_HAS_RESEND).
    Resend,
    /// Whole files on the node are read by the kernel from their copy (FUSE_PASSTHROUGH).
    Passthrough,
    /// Opens of directories take no request once the first is answered ENOSYS
    /// (FUSE_NO_OPENDIR_SUPPORT).
    ZeroMessageOpendir,
}

impl KernelFeature {
    pub const ALL: [Self; 5] = [
        Self::Readdirplus,
        Self::ZeroMessageOpen,
        Self::Resend,
        Self::Passthrough,
        Self::ZeroMessageOpendir,
    ];

    /// The name used in the config, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Readdirplus => "readdirplus",
            Self::ZeroMessageOpen => "zero_message_open",
            Self::Resend => "resend",
            Self::Passthrough => "passthrough",
            Self::ZeroMessageOpendir => "zero_message_opendir",
        }
    }

    /// The bit of the kernel's INIT flags (flags | flags2 << 32) offering it.
    pub(crate) fn init_bit(self) -> u64 {
        match self {
            Self::Readdirplus => 1 << 13,
            Self::ZeroMessageOpen => 1 << 17,
            Self::Resend => 1 << 39,
            Self::Passthrough => 1 << 37,
            Self::ZeroMessageOpendir => 1 << 24,
        }
    }
}

impl fmt::Display for KernelFeature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which optional kernel features may be used where the kernel offers them. The default
/// allows all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelFeatures {
    off: u8,
}

impl Default for KernelFeatures {
    fn default() -> Self {
        Self::all()
    }
}

impl KernelFeatures {
    /// Every feature allowed.
    pub fn all() -> Self {
        Self { off: 0 }
    }

    /// Every feature allowed but those in `off`.
    pub fn without(off: impl IntoIterator<Item = KernelFeature>) -> Self {
        let mut features = Self::all();
        for feature in off {
            features.off |= 1 << feature as u8;
        }
        features
    }

    /// Whether `feature` may be used (if the kernel offers it).
    pub fn allows(self, feature: KernelFeature) -> bool {
        self.off & (1 << feature as u8) == 0
    }

    /// One line saying, for each feature, whether it is used with a kernel whose INIT flags are
    /// `offered` (`None`: not known yet), for the log: `readdirplus: used, resend: off (config),
    /// ...`. Zero-message opens are used only where passthrough is not.
    pub fn describe(self, offered: Option<u64>) -> String {
        let passthrough = self.allows(KernelFeature::Passthrough)
            && offered.is_some_and(|f| f & KernelFeature::Passthrough.init_bit() != 0);
        let parts: Vec<String> = KernelFeature::ALL
            .iter()
            .map(|&feature| {
                let state = if !self.allows(feature) {
                    "off (config)"
                } else if feature == KernelFeature::ZeroMessageOpen && passthrough {
                    "not used (passthrough needs the opens)"
                } else {
                    match offered {
                        Some(flags) if flags & feature.init_bit() != 0 => "used",
                        Some(_) => "not offered by the kernel",
                        None => "used if the kernel offers it",
                    }
                };
                format!("{feature}: {state}")
            })
            .collect();
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_feature_turns_off_alone() {
        assert!(
            KernelFeature::ALL
                .iter()
                .all(|&f| KernelFeatures::default().allows(f))
        );
        for off in KernelFeature::ALL {
            let features = KernelFeatures::without([off]);
            for feature in KernelFeature::ALL {
                assert_eq!(
                    features.allows(feature),
                    feature != off,
                    "{off} off: {feature}"
                );
            }
        }
        let none = KernelFeatures::without(KernelFeature::ALL);
        assert!(KernelFeature::ALL.iter().all(|&f| !none.allows(f)));
    }

    #[test]
    fn the_description_tells_config_from_kernel() {
        let features = KernelFeatures::without([KernelFeature::Resend]);
        let offered = KernelFeature::Readdirplus.init_bit() | KernelFeature::Resend.init_bit();
        assert_eq!(
            features.describe(Some(offered)),
            "readdirplus: used, zero_message_open: not offered by the kernel, resend: off \
             (config), passthrough: not offered by the kernel, zero_message_opendir: not offered by \
             the kernel"
        );
        assert!(
            features
                .describe(None)
                .starts_with("readdirplus: used if the kernel offers it")
        );
    }
}
