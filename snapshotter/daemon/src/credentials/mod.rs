//! Where the daemon's registry credentials come from besides docker config files: the kubelet's
//! credential provider plugins ([`kubelet`]).

pub mod kubelet;

pub use kubelet::KubeletProviders;
