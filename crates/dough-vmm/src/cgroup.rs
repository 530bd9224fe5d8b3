//! One cgroup per VM holding its VMM and helpers, with CPU, memory and
//! process-count limits. cgroup v2 where its controllers are available;
//! otherwise the v1 `cpu`, `memory` and `pids` hierarchies (as on Dough's CI
//! machines, whose v2 mount has no controllers).
use std::path::{Path, PathBuf};

use crate::{io_err, VmmError};

/// Where the controllers are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    V2(PathBuf),
    V1 {
        cpu: PathBuf,
        memory: PathBuf,
        pids: PathBuf,
    },
}

impl Layout {
    /// Find a usable layout, or say why there is none.
    pub fn detect() -> Result<Layout, String> {
        Self::detect_in(Path::new("/sys/fs/cgroup"))
    }

    pub fn detect_in(root: &Path) -> Result<Layout, String> {
        for v2 in [root.to_path_buf(), root.join("unified")] {
            let ctrl = std::fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
            let have: Vec<&str> = ctrl.split_whitespace().collect();
            if ["cpu", "memory", "pids"].iter().all(|c| have.contains(c)) {
                return Ok(Layout::V2(v2));
            }
        }
        let (cpu, memory, pids) = (root.join("cpu"), root.join("memory"), root.join("pids"));
        if cpu.join("cpu.cfs_quota_us").exists()
            && memory.join("memory.limit_in_bytes").exists()
            && pids.join("cgroup.procs").exists()
        {
            return Ok(Layout::V1 { cpu, memory, pids });
        }
        Err(format!(
            "no cgroup v2 with cpu, memory and pids controllers and no v1 cpu/memory/pids hierarchies under {}",
            root.display()
        ))
    }

    pub fn version(&self) -> u32 {
        match self {
            Layout::V2(_) => 2,
            Layout::V1 { .. } => 1,
        }
    }
}

/// Limits for one VM's processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU time per 100 ms period, in µs (100 000 = one core).
    pub cpu_quota_us: u64,
    pub memory_bytes: u64,
    pub pids: u64,
}

pub const CPU_PERIOD_US: u64 = 100_000;

/// A created cgroup (one directory per hierarchy).
#[derive(Debug, Clone)]
pub struct Cgroup {
    pub dirs: Vec<PathBuf>,
}

fn write(path: PathBuf, value: &str) -> Result<(), VmmError> {
    std::fs::write(&path, value).map_err(io_err(&path))
}

impl Cgroup {
    /// The group directories `vm_id` has (or would have) under `layout`.
    pub fn dirs_for(layout: &Layout, vm_id: &str) -> Vec<PathBuf> {
        match layout {
            Layout::V2(root) => vec![root.join("dough").join(vm_id)],
            Layout::V1 { cpu, memory, pids } => [cpu, memory, pids]
                .iter()
                .map(|h| h.join("dough").join(vm_id))
                .collect(),
        }
    }

    /// Make `dough/<vm_id>` and set the limits.
    pub fn create(layout: &Layout, vm_id: &str, l: Limits) -> Result<Cgroup, VmmError> {
        let dirs = Self::dirs_for(layout, vm_id);
        let cg = Cgroup { dirs: dirs.clone() };
        let res = (|| {
            match layout {
                Layout::V2(root) => {
                    let parent = root.join("dough");
                    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
                    // Delegate the controllers down to dough/ and its children.
                    write(root.join("cgroup.subtree_control"), "+cpu +memory +pids")?;
                    write(parent.join("cgroup.subtree_control"), "+cpu +memory +pids")?;
                    let d = &dirs[0];
                    std::fs::create_dir(d).map_err(io_err(d))?;
                    write(
                        d.join("cpu.max"),
                        &format!("{} {CPU_PERIOD_US}", l.cpu_quota_us),
                    )?;
                    write(d.join("memory.max"), &l.memory_bytes.to_string())?;
                    // No swap for VMs; absent where the host has no swap accounting.
                    let _ = write(d.join("memory.swap.max"), "0");
                    write(d.join("pids.max"), &l.pids.to_string())?;
                }
                Layout::V1 { .. } => {
                    for d in &dirs {
                        std::fs::create_dir_all(d).map_err(io_err(d))?;
                    }
                    write(
                        dirs[0].join("cpu.cfs_period_us"),
                        &CPU_PERIOD_US.to_string(),
                    )?;
                    write(
                        dirs[0].join("cpu.cfs_quota_us"),
                        &l.cpu_quota_us.to_string(),
                    )?;
                    write(
                        dirs[1].join("memory.limit_in_bytes"),
                        &l.memory_bytes.to_string(),
                    )?;
                    write(dirs[2].join("pids.max"), &l.pids.to_string())?;
                }
            }
            Ok(())
        })();
        if let Err(e) = res {
            cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    /// The `cgroup.procs` files a child writes "0" to, to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Remove the group (its processes must have exited). Errors listed.
    pub fn remove(&self) -> Vec<String> {
        let mut errs = vec![];
        for d in &self.dirs {
            match std::fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => errs.push(format!("remove cgroup {}: {e}", d.display())),
            }
        }
        errs
    }
}

/// Limits for a VM with `vcpus` and `memory_mib` of guest RAM: the vCPUs
/// plus one core for QEMU's own threads; guest RAM plus the VMM's overhead
/// (TCG's translation cache, device emulation); room for QEMU's I/O thread
/// pool.
pub fn limits_for(vcpus: u32, memory_mib: u32, tcg: bool) -> Limits {
    let overhead_mib = if tcg { 384 } else { 192 };
    Limits {
        cpu_quota_us: (vcpus as u64 + 1) * CPU_PERIOD_US,
        memory_bytes: (memory_mib as u64 + overhead_mib) << 20,
        pids: 128 + 4 * vcpus as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_preferred_when_it_has_the_controllers() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("unified")).unwrap();
        std::fs::write(t.path().join("unified/cgroup.controllers"), "hugetlb").unwrap();
        assert!(Layout::detect_in(t.path()).is_err());
        std::fs::write(
            t.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids",
        )
        .unwrap();
        assert_eq!(
            Layout::detect_in(t.path()).unwrap(),
            Layout::V2(t.path().into())
        );
    }

    #[test]
    fn limits_scale_with_resources() {
        let l = limits_for(2, 512, true);
        assert_eq!(l.cpu_quota_us, 300_000);
        assert_eq!(l.memory_bytes, (512 + 384) << 20);
        assert!(l.pids >= 128);
    }

    /// Tier 1: on this machine, create a real group, check the limits are
    /// in the kernel's files, remove it.
    #[test]
    fn real_group_round_trip() {
        let layout = Layout::detect().expect("cgroups usable (root)");
        let id = format!("test-{}", std::process::id());
        let l = limits_for(1, 256, true);
        let cg = Cgroup::create(&layout, &id, l).unwrap();
        match &layout {
            Layout::V2(_) => {
                let read = |f: &str| {
                    std::fs::read_to_string(cg.dirs[0].join(f))
                        .unwrap_or_else(|e| panic!("{f}: {e}"))
                        .trim()
                        .to_string()
                };
                assert_eq!(read("memory.max"), l.memory_bytes.to_string());
                assert_eq!(read("cpu.max"), format!("200000 {CPU_PERIOD_US}"));
                assert_eq!(read("pids.max"), l.pids.to_string());
                // Present only where the kernel accounts swap (not on the
                // Debian cloud kernels of these machines).
                if cg.dirs[0].join("memory.swap.max").exists() {
                    assert_eq!(read("memory.swap.max"), "0");
                }
            }
            Layout::V1 { .. } => {
                let q = std::fs::read_to_string(cg.dirs[0].join("cpu.cfs_quota_us")).unwrap();
                assert_eq!(q.trim(), "200000");
                let m = std::fs::read_to_string(cg.dirs[1].join("memory.limit_in_bytes")).unwrap();
                assert_eq!(m.trim(), l.memory_bytes.to_string());
                let p = std::fs::read_to_string(cg.dirs[2].join("pids.max")).unwrap();
                assert_eq!(p.trim(), l.pids.to_string());
            }
        }
        assert!(cg.remove().is_empty());
        assert!(cg.dirs.iter().all(|d| !d.exists()));
    }
}
