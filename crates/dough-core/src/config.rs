//! Where Dough keeps things on the host, and host-wide choices.
use std::path::PathBuf;

use dough_vmm::{AccelChoice, BackendChoice, HostFacts};

/// Host-side configuration shared by every VM.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Root of Dough's state (`/var/lib/dough` by default).
    pub state_dir: PathBuf,
    /// The guest image (`<state>/images/default` by default).
    pub image_dir: PathBuf,
    pub accel: AccelChoice,
    pub backend: BackendChoice,
    pub facts: HostFacts,
    /// Run each VMM jailed (own uid, mount namespace, cgroup). Needs root;
    /// on by default when Dough runs as root.
    pub confine: bool,
}

pub const DEFAULT_STATE_DIR: &str = "/var/lib/dough";

impl HostConfig {
    pub fn new(state_dir: Option<PathBuf>, image_dir: Option<PathBuf>, accel: AccelChoice) -> Self {
        let state_dir = state_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let image_dir = image_dir.unwrap_or_else(|| dough_image::Image::dir_in(&state_dir));
        HostConfig {
            state_dir,
            image_dir,
            accel,
            backend: BackendChoice::Auto,
            facts: HostFacts::probe(),
            confine: nix::unistd::geteuid().is_root(),
        }
    }

    /// Per-VM run directories live here.
    pub fn runs_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.state_dir.join("cache")
    }

    /// uid leases of running VMs.
    pub fn uids_dir(&self) -> PathBuf {
        self.state_dir.join("uids")
    }

    /// The private roots of jailed VMMs.
    pub fn jails_dir(&self) -> PathBuf {
        self.state_dir.join("jails")
    }
}
