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
pub mod disk;
pub mod process;
pub mod qemu;
mod qmp;
pub mod tools;
pub mod vsock;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

pub use accel::{Accel, AccelChoice, HostFacts};
pub use process::{StopReport, VmProcess};

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
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Qemu => "qemu",
        })
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
    pub initramfs: Option<PathBuf>,
    /// Read-only base rootfs (`/dev/vda` in the guest).
    pub rootfs: PathBuf,
    /// Writable scratch disk (`/dev/vdb`).
    pub scratch: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub accel: Accel,
    /// Extra kernel arguments (the `dough.*` keys for the agent).
    pub kernel_args: Vec<String>,
    /// TAP device (in the VMM's network namespace) for a virtio-net, if any.
    pub tap: Option<String>,
    pub guest_cid: u32,
    /// vsock port the agent dials, for the socket path check.
    pub guest_port: u32,
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
        for s in self.paths.sockets(self.guest_port) {
            if s.as_os_str().len() > 107 {
                return Err(VmmError::PathTooLong(s));
            }
        }
        Ok(())
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A VMM backend.
pub trait Vmm: Send + Sync {
    fn backend(&self) -> Backend;
    /// Spawn the VMM (and helpers) for `spec`. Returns once the VM is
    /// starting; readiness is the agent's Hello, which the caller awaits.
    /// On error nothing the call started is left running.
    fn start<'a>(&'a self, spec: &'a VmSpec) -> BoxFuture<'a, Result<VmProcess, VmmError>>;
}
