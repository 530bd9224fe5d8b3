//! The orchestrator core.
//!
//! * [`supervisor`] — **where a VM boots, runs one task and is torn down**:
//!   run directory → scratch disk → vsock listener → VMM → Hello → Assign →
//!   output/heartbeats → Exit → Shutdown → stop → delete.
//! * [`pool`] — **where warm VMs wait for tasks**: per-shape pools of VMs
//!   booted to Hello, claimed by tasks, refilled and replaced in the background.
//! * [`snapshot`] — **where a template VM is snapshotted and clones are
//!   restored from it** (reseeded, clock set, re-identified).
//! * [`rundir`] — the per-VM run directory, its owner record (written before
//!   anything is created) and `gc` of what a crashed Dough left behind.
//! * [`agents`] — agent presets (TOML data): image, command, secrets,
//!   allowlist, model API.
//! * [`conn`] — the async side of the control protocol.
//! * [`imagebuild`] — **where a named image is built**: each step a task in
//!   a VM, its scratch disk kept as a read-only layer.
//! * [`repo`] — **where a task's work becomes a branch and a pull request**:
//!   resolve the base, the gate on the guest's bundle, push, forge API.
#![forbid(unsafe_code)]

pub mod agents;
pub mod config;
pub mod conn;
pub mod imagebuild;
pub mod leases;
pub mod pool;
pub mod provenance;
pub mod registry;
pub mod repo;
pub mod rundir;
pub mod service;
pub mod snapshot;
pub mod store;
pub mod supervisor;

pub use config::HostConfig;
pub use supervisor::{
    run_task, run_task_in, BootedVm, Event, Outcome, Phase, RunError, RunReport, TaskSpec,
};

/// A fresh random id (12 hex digits) for a VM.
pub fn new_id() -> String {
    let mut b = [0u8; 6];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b.copy_from_slice(&(t as u64 ^ std::process::id() as u64).to_le_bytes()[..6]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}
