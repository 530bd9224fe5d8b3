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
    /// Slot pool for the VMs' veth pairs (`DOUGH_SLOT_POOL`, default
    /// 10.213.0.0/16).
    pub slot_pool: dough_net::Cidr,
    /// Upstream resolver for the VMs' DNS forwarders (`DOUGH_DNS`, default:
    /// the first nameserver of /etc/resolv.conf).
    pub dns_upstream: Option<std::net::SocketAddr>,
    /// Masquerade VM traffic behind the host's address (`DOUGH_HOST_NAT=0`
    /// turns it off where the pool is routed to the host).
    pub host_nat: bool,
    /// Which of the image's kernels VMs boot (`--kernel`, `DOUGH_KERNEL`).
    pub kernel: dough_image::KernelChoice,
    /// CPU vulnerability mitigations inside the guest (on by default;
    /// `--guest-mitigations off` trades them for a faster boot).
    pub guest_mitigations: bool,
    /// Keep a per-task egress record (`DOUGH_EGRESS_RECORD=0` turns it
    /// off; see `dough_net::record`).
    pub record_egress: bool,
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
            slot_pool: dough_net::DEFAULT_POOL.parse().expect("default pool"),
            dns_upstream: None,
            host_nat: true,
            kernel: dough_image::KernelChoice::Auto,
            guest_mitigations: true,
            record_egress: true,
        }
    }

    /// Apply `DOUGH_SLOT_POOL`, `DOUGH_DNS`, `DOUGH_HOST_NAT` and
    /// `DOUGH_EGRESS_RECORD`.
    pub fn with_net_env(mut self) -> Result<Self, String> {
        if let Ok(p) = std::env::var("DOUGH_SLOT_POOL") {
            self.slot_pool = p.parse().map_err(|e| format!("DOUGH_SLOT_POOL: {e}"))?;
            if self.slot_pool.len > 30 {
                return Err(format!(
                    "DOUGH_SLOT_POOL {}: too small, a VM needs a /30",
                    self.slot_pool
                ));
            }
        }
        if let Ok(d) = std::env::var("DOUGH_DNS") {
            self.dns_upstream = Some(parse_dns(&d).map_err(|e| format!("DOUGH_DNS: {e}"))?);
        }
        if let Ok(v) = std::env::var("DOUGH_HOST_NAT") {
            self.host_nat = !matches!(v.as_str(), "0" | "off" | "no" | "false");
        }
        if let Ok(v) = std::env::var("DOUGH_EGRESS_RECORD") {
            self.record_egress = !matches!(v.as_str(), "0" | "off" | "no" | "false");
        }
        Ok(self)
    }

    /// The network settings for `dough_net`.
    pub fn net_config(&self) -> Result<dough_net::NetConfig, dough_net::NetError> {
        let dns_upstream = match self.dns_upstream {
            Some(d) => d,
            None => dough_net::resolv_conf_upstream(std::path::Path::new("/etc/resolv.conf"))?,
        };
        Ok(dough_net::NetConfig {
            pool: self.slot_pool,
            dns_upstream,
            host_nat: self.host_nat,
            run_root: PathBuf::from(dough_net::RUN_ROOT),
            tag: self.state_dir.display().to_string(),
            record_egress: self.record_egress,
        })
    }

    /// Per-VM run directories live here.
    /// Host-side scratch of repository tasks (bundles, gate repositories).
    /// Snapshot templates (memory file, device state, scratch disk).
    pub fn templates_dir(&self) -> PathBuf {
        self.state_dir.join("templates")
    }

    pub fn work_dir(&self) -> PathBuf {
        self.state_dir.join("work")
    }

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

/// `ADDR` or `ADDR:PORT` of a DNS server (port 53 by default).
pub fn parse_dns(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(a) = s.parse::<std::net::SocketAddr>() {
        return Ok(a);
    }
    s.parse::<std::net::IpAddr>()
        .map(|ip| std::net::SocketAddr::new(ip, 53))
        .map_err(|_| format!("'{s}' is not an IP address (optionally with :port)"))
}
