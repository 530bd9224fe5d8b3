//! Starting and stopping microVMs.
//!
//! A [`Vmm`] backend turns a [`VmSpec`] into a running [`VmProcess`]: the VMM
//! process plus its helpers (QEMU needs one `vhost-device-vsock` per VM).
//! Both backends expose the same host side of vsock — Firecracker's hybrid
//! vsock: a Unix socket `vsock.sock` for host-initiated connections and
//! `vsock.sock_<port>` listeners for guest-initiated ones ([`vsock`]).
//!
//! This crate knows nothing about tasks: the supervisor in `dough-core`
//! decides what to run and when to stop.

pub mod accel;
pub mod cgroup;
pub mod disk;
pub mod firecracker;
pub mod jail;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod tools;
pub mod vsock;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

pub use accel::{Accel, AccelChoice, HostFacts};
pub use process::{Control, StopReport, VmProcess};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("`{tool}` not found ({hint})")]
    MissingTool { tool: String, hint: String },
    #[error("KVM was requested but is not usable here: {0}")]
    KvmUnusable(String),
    #[error("cannot start {what}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} exited during start-up ({status}); its log ends:\n{log_tail}")]
    EarlyExit {
        what: String,
        status: String,
        log_tail: String,
    },
    #[error("{what} did not create {path} within {secs} s")]
    SocketTimeout {
        what: String,
        path: PathBuf,
        secs: u64,
    },
    #[error("unix socket path {0} is longer than 107 bytes; use a shorter state directory")]
    PathTooLong(PathBuf),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("qmp: {0}")]
    Qmp(String),
    #[error("firecracker api: {0}")]
    Api(String),
    #[error("cannot confine the vmm: {0}")]
    Confine(String),
    #[error("invalid vm spec: {0}")]
    Spec(String),
}

pub(crate) fn io_err(path: impl AsRef<Path>) -> impl FnOnce(std::io::Error) -> VmmError {
    let path = path.as_ref().to_path_buf();
    move |source| VmmError::Io { path, source }
}

/// Which VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Qemu,
    Firecracker,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Qemu => "qemu",
            Backend::Firecracker => "firecracker",
        })
    }
}

/// What the user asked for: `auto` picks Firecracker where KVM boots a
/// guest and a firecracker binary is found, else QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    #[default]
    Auto,
    Qemu,
    Firecracker,
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "qemu" => Ok(BackendChoice::Qemu),
            "firecracker" => Ok(BackendChoice::Firecracker),
            _ => Err(format!(
                "unknown backend `{s}` (expected auto, qemu or firecracker)"
            )),
        }
    }
}

/// A chosen, located backend and the accelerator it will use.
pub struct Selected {
    pub vmm: Box<dyn Vmm>,
    pub accel: Accel,
    /// Why this backend (for `dough doctor` and debug logs).
    pub why: String,
}

/// Resolve backend and accelerator choices on this host.
pub fn select(
    facts: &HostFacts,
    backend: BackendChoice,
    accel: AccelChoice,
) -> Result<Selected, VmmError> {
    select_with(facts, backend, accel, tools::find(tools::FIRECRACKER))
}

fn select_with(
    facts: &HostFacts,
    backend: BackendChoice,
    accel: AccelChoice,
    fc_binary: Option<PathBuf>,
) -> Result<Selected, VmmError> {
    let kvm = facts.kvm_problem_for(accel);
    let qemu = |why: String| -> Result<Selected, VmmError> {
        let accel = facts.choose(accel).map_err(VmmError::KvmUnusable)?;
        Ok(Selected {
            vmm: Box::new(qemu::Qemu::locate(facts.tsc_khz)?),
            accel,
            why,
        })
    };
    match backend {
        BackendChoice::Qemu => qemu("qemu was asked for".into()),
        BackendChoice::Firecracker => {
            if let Some(why) = kvm {
                return Err(VmmError::KvmUnusable(format!(
                    "firecracker needs KVM: {why}"
                )));
            }
            if accel == AccelChoice::Tcg {
                return Err(VmmError::Spec(
                    "firecracker runs only on kvm, not tcg".into(),
                ));
            }
            Ok(Selected {
                vmm: Box::new(firecracker::Firecracker::locate()?),
                accel: Accel::Kvm,
                why: "firecracker was asked for".into(),
            })
        }
        BackendChoice::Auto => match (kvm, fc_binary, accel) {
            (None, Some(binary), AccelChoice::Auto | AccelChoice::Kvm) => Ok(Selected {
                vmm: Box::new(firecracker::Firecracker { binary }),
                accel: Accel::Kvm,
                why: "KVM boots guests here and a firecracker binary is on PATH".into(),
            }),
            (Some(why), _, _) => qemu(format!(
                "qemu, because KVM is not usable for firecracker: {why}"
            )),
            (None, None, _) => qemu("qemu, because no firecracker binary is on PATH".into()),
            (None, Some(_), AccelChoice::Tcg) => qemu("qemu, because tcg was asked for".into()),
        },
    }
}

/// The files of one VM, all inside its run directory.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub run_dir: PathBuf,
}

impl VmPaths {
    pub fn new(run_dir: impl Into<PathBuf>) -> Self {
        VmPaths {
            run_dir: run_dir.into(),
        }
    }
    /// Host side of hybrid vsock (host-initiated connections).
    pub fn vsock_uds(&self) -> PathBuf {
        self.run_dir.join("vsock.sock")
    }
    /// vhost-user socket between QEMU and vhost-device-vsock.
    pub fn vhost_user(&self) -> PathBuf {
        self.run_dir.join("vhost.sock")
    }
    pub fn qmp(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }
    pub fn serial_log(&self) -> PathBuf {
        self.run_dir.join("serial.log")
    }
    pub fn vmm_log(&self) -> PathBuf {
        self.run_dir.join("vmm.log")
    }
    pub fn vsock_log(&self) -> PathBuf {
        self.run_dir.join("vsock.log")
    }
    /// Firecracker's logger and metrics: named pipes Dough drains into
    /// capped files ([`VmPaths::fc_log`], [`VmPaths::fc_metrics`]).
    pub fn fc_log_fifo(&self) -> PathBuf {
        self.run_dir.join("fc-log.fifo")
    }
    pub fn fc_metrics_fifo(&self) -> PathBuf {
        self.run_dir.join("fc-metrics.fifo")
    }
    pub fn fc_log(&self) -> PathBuf {
        self.run_dir.join("firecracker.log")
    }
    pub fn fc_metrics(&self) -> PathBuf {
        self.run_dir.join("metrics.json")
    }
    /// The virtio-serial control port's socket (QEMU listens).
    pub fn agent_sock(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }
    /// Where a template's QEMU sends its migration stream (Dough listens).
    pub fn migrate_sock(&self) -> PathBuf {
        self.run_dir.join("migrate.sock")
    }
    pub fn scratch(&self) -> PathBuf {
        self.run_dir.join("scratch.ext4")
    }
    /// Every Unix socket path, for the length check.
    pub fn sockets(&self, guest_port: u32) -> Vec<PathBuf> {
        vec![
            self.vsock_uds(),
            vsock::guest_listener_path(&self.vsock_uds(), guest_port),
            self.vhost_user(),
            self.qmp(),
        ]
    }
}

/// Everything needed to start one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub id: String,
    pub paths: VmPaths,
    pub kernel: PathBuf,
    /// The kernel finds its virtio-mmio devices through ACPI (Debian's
    /// kernel); false: on the command line (Dough's minimal kernel), and
    /// QEMU runs the machine without ACPI.
    pub acpi: bool,
    pub initramfs: Option<PathBuf>,
    /// Read-only base rootfs (`/dev/vda` in the guest).
    pub rootfs: PathBuf,
    /// Writable scratch disk (`/dev/vdb`).
    pub scratch: PathBuf,
    /// An image's read-only layers, lowest first (`/dev/vdc`, `/dev/vdd`,
    /// …): each the scratch disk of one build step, its `upper/` stacked
    /// over the base by the agent (`dough.layers=N`).
    pub layers: Vec<PathBuf>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub accel: Accel,
    /// Extra kernel arguments (the `dough.*` keys for the agent).
    pub kernel_args: Vec<String>,
    /// TAP device (in the VMM's network namespace) for a virtio-net, if any.
    pub tap: Option<String>,
    /// The network namespace the VMM runs in (a bind-mounted namespace
    /// file, as `dough_net` makes them); None: Dough's own.
    pub netns: Option<PathBuf>,
    /// The guest NIC's MAC address (with `tap`).
    pub mac: String,
    /// `tap`, already attached: QEMU inherits this descriptor rather than
    /// opening /dev/net/tun (which a jailed VMM's uid may not open). The
    /// caller keeps it open until the VMM has started.
    pub tap_fd: Option<i32>,
    pub guest_cid: u32,
    /// vsock port the agent dials, for the socket path check.
    pub guest_port: u32,
    /// Confine the VMM and its helpers (None: run them as Dough's user).
    pub jail: Option<jail::JailSpec>,
    /// A VM that can be snapshotted, or a clone of one (QEMU): its control
    /// channel is a virtio-serial port instead of vsock (docs/boot.md).
    pub snapshot: Option<SnapshotRole>,
}

/// The group that may open a template's snapshot files (a clone's VMM maps
/// the memory privately; QEMU opens it read-write, Firecracker read-only).
/// A QEMU clone's jail gets it as a supplementary group, a jailed
/// Firecracker clone as its group (the jailer takes no other).
pub const TEMPLATE_GID: u32 = 899_999;

/// How a VM takes part in snapshots (docs/boot.md, docs/firecracker.md).
#[derive(Debug, Clone, PartialEq)]
pub enum SnapshotRole {
    /// A VM booted to be snapshotted. QEMU: guest RAM lives in `memory` (a
    /// shared file mapping), so a snapshot needs only the device state.
    /// Firecracker: booted like any VM (jailed); its snapshot writes the
    /// guest memory out ([`firecracker::snapshot_template`]).
    Template { memory: PathBuf },
    /// Restored from a template: `memory` mapped privately (copy on
    /// write; the file is never changed), device state from `state`. QEMU
    /// reads the state from `state_fd` (an open descriptor it inherits);
    /// jailed Firecracker from `state` linked into its chroot.
    Clone {
        memory: PathBuf,
        state: PathBuf,
        state_fd: i32,
    },
}

impl VmSpec {
    pub fn validate(&self) -> Result<(), VmmError> {
        if self.vcpus == 0 || self.vcpus > 64 {
            return Err(VmmError::Spec(format!(
                "vcpus must be 1..=64, not {}",
                self.vcpus
            )));
        }
        if self.memory_mib < 128 || self.memory_mib > 256 * 1024 {
            return Err(VmmError::Spec(format!(
                "memory must be 128..=262144 MiB, not {}",
                self.memory_mib
            )));
        }
        if self.layers.len() > MAX_LAYERS {
            return Err(VmmError::Spec(format!(
                "{} image layers; at most {MAX_LAYERS}",
                self.layers.len()
            )));
        }
        for s in self.paths.sockets(self.guest_port) {
            if s.as_os_str().len() > 107 {
                return Err(VmmError::PathTooLong(s));
            }
        }
        Ok(())
    }
}

/// Image layers a VM takes (read-only drives after the base and scratch).
pub const MAX_LAYERS: usize = 16;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A VMM backend.
pub trait Vmm: Send + Sync {
    fn backend(&self) -> Backend;
    /// Spawn the VMM (and helpers) for `spec`. Returns once the VM is
    /// starting; readiness is the agent's Hello, which the caller awaits.
    /// On error nothing the call started is left running.
    fn start<'a>(&'a self, spec: &'a VmSpec) -> BoxFuture<'a, Result<VmProcess, VmmError>>;
}

#[cfg(test)]
mod select_tests {
    use super::*;

    fn kvm_host() -> HostFacts {
        HostFacts {
            kvm_device: true,
            kvm_openable: true,
            cpu_virt_flag: true,
            hw_kvm_module: true,
            pvm_module: false,
            tsc_khz: Some(2_000_000),
            allow_pvm: false,
        }
    }

    fn pvm_host() -> HostFacts {
        HostFacts {
            cpu_virt_flag: false,
            hw_kvm_module: false,
            pvm_module: true,
            ..kvm_host()
        }
    }

    fn pick(
        f: &HostFacts,
        b: BackendChoice,
        a: AccelChoice,
        fc: bool,
    ) -> Result<(Backend, Accel), String> {
        select_with(
            f,
            b,
            a,
            fc.then(|| PathBuf::from("/usr/local/bin/firecracker")),
        )
        .map(|s| (s.vmm.backend(), s.accel))
        .map_err(|e| e.to_string())
    }

    /// (QEMU must be installed for the qemu cases, as scripts/setup.sh does.)
    #[test]
    fn auto_prefers_firecracker_only_with_kvm_and_a_binary() {
        use AccelChoice as A;
        use BackendChoice as B;
        let kvm = kvm_host();
        let pvm = pvm_host();
        assert_eq!(
            pick(&kvm, B::Auto, A::Auto, true),
            Ok((Backend::Firecracker, Accel::Kvm))
        );
        assert_eq!(
            pick(&kvm, B::Auto, A::Auto, false),
            Ok((Backend::Qemu, Accel::Kvm))
        );
        assert_eq!(
            pick(&kvm, B::Auto, A::Tcg, true),
            Ok((Backend::Qemu, Accel::Tcg))
        );
        assert_eq!(
            pick(&pvm, B::Auto, A::Auto, true),
            Ok((Backend::Qemu, Accel::Tcg))
        );
        assert_eq!(
            pick(&kvm, B::Qemu, A::Auto, true),
            Ok((Backend::Qemu, Accel::Kvm))
        );
        assert!(pick(&pvm, B::Firecracker, A::Auto, true)
            .unwrap_err()
            .contains("firecracker needs KVM"));
        assert!(pick(&kvm, B::Firecracker, A::Tcg, true)
            .unwrap_err()
            .contains("only on kvm"));
        assert!(pick(&pvm, B::Qemu, A::Kvm, false)
            .unwrap_err()
            .contains("kvm_pvm"));
    }

    /// `--accel kvm --allow-pvm` picks KVM (and Firecracker) on a PVM host;
    /// without an explicit `kvm` the choice is what it always was.
    #[test]
    fn allow_pvm_needs_an_explicit_kvm() {
        use AccelChoice as A;
        use BackendChoice as B;
        let pvm = HostFacts {
            allow_pvm: true,
            ..pvm_host()
        };
        assert_eq!(
            pick(&pvm, B::Auto, A::Auto, true),
            Ok((Backend::Qemu, Accel::Tcg))
        );
        assert_eq!(
            pick(&pvm, B::Auto, A::Kvm, true),
            Ok((Backend::Firecracker, Accel::Kvm))
        );
        assert_eq!(
            pick(&pvm, B::Qemu, A::Kvm, false),
            Ok((Backend::Qemu, Accel::Kvm))
        );
        assert!(pick(&pvm, B::Firecracker, A::Auto, true)
            .unwrap_err()
            .contains("firecracker needs KVM"));
        // Past the KVM check: what is left is finding the binary.
        if let Err(e) = pick(&pvm, B::Firecracker, A::Kvm, true) {
            assert!(e.contains("`firecracker` not found"), "{e}");
        }
    }
}
