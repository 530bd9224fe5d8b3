//! Per-VM run directories, and reclaiming what a crash left behind.
//!
//! Intent before action: the directory and its `owner.json` (the owning
//! process and its start time) exist before any disk, socket or process of
//! the VM does. Every VM resource lives inside the directory or names it on
//! its command line, so `gc` can find all of it from the directory alone.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const OWNER: &str = "owner.json";

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct OwnerRecord {
    pub vm_id: String,
    /// The Dough process that owns the VM.
    pub owner_pid: u32,
    /// Its start time (clock ticks since boot, /proc/PID/stat field 22), so a
    /// recycled PID is not mistaken for the owner.
    pub owner_start: u64,
    pub created_unix: u64,
    /// The image the VM boots (`dough image rm` refuses it meanwhile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

#[derive(Debug)]
pub struct RunDir {
    pub id: String,
    pub path: PathBuf,
}

impl RunDir {
    /// Make `<runs>/<id>` (mode 0700) with its owner record.
    pub fn create(runs: &Path, id: &str) -> std::io::Result<RunDir> {
        Self::create_for(runs, id, None)
    }

    /// As [`RunDir::create`], for a VM that boots the image `image`.
    pub fn create_for(runs: &Path, id: &str, image: Option<&str>) -> std::io::Result<RunDir> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(runs)?;
        let path = runs.join(id);
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        let me = std::process::id();
        let rec = OwnerRecord {
            vm_id: id.to_string(),
            owner_pid: me,
            owner_start: proc_start_time(me).unwrap_or(0),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            image: image.map(str::to_string),
        };
        std::fs::write(
            path.join(OWNER),
            serde_json::to_vec(&rec).expect("record serializes"),
        )?;
        Ok(RunDir {
            id: id.to_string(),
            path,
        })
    }

    /// Remove the directory and everything in it (sockets, disks, logs).
    pub fn remove(&self) -> std::io::Result<()> {
        match std::fs::remove_dir_all(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}

/// Field 22 of /proc/PID/stat (start time in clock ticks since boot).
pub use dough_net::proc_start_time;

fn owner_alive(rec: &OwnerRecord) -> bool {
    proc_start_time(rec.owner_pid).is_some_and(|t| t == rec.owner_start)
}

/// PIDs of processes whose command line mentions `dir` (QEMU and
/// vhost-device-vsock name their sockets and disks there).
pub fn processes_using(dir: &Path) -> Vec<u32> {
    let needle = format!("{}/", dir.display());
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .split('\0')
                        .any(|arg| arg.contains(&needle))
                })
                .unwrap_or(false)
        })
        .collect()
}

/// The VMs whose live owner boots them on the image `name`.
pub fn image_users(runs: &Path, name: &str) -> Vec<String> {
    std::fs::read_dir(runs)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let rec: OwnerRecord =
                serde_json::from_slice(&std::fs::read(e.path().join(OWNER)).ok()?).ok()?;
            (rec.image.as_deref() == Some(name) && owner_alive(&rec)).then_some(rec.vm_id)
        })
        .collect()
}

/// What `gc` did.
#[derive(Debug, Default)]
pub struct GcReport {
    pub removed: Vec<String>,
    pub killed: Vec<u32>,
    pub released_uids: Vec<u32>,
    pub removed_jails: Vec<String>,
    pub removed_cgroups: Vec<String>,
    /// Network namespaces, veths, slots, host table (its errors are in
    /// `errors`).
    pub net: dough_net::NetGc,
    pub kept_live: Vec<String>,
    pub errors: Vec<String>,
}

/// Reclaim every run directory whose owner is gone: kill its processes,
/// delete the directory. Directories of live owners are left alone.
pub fn gc(runs: &Path) -> GcReport {
    let mut r = GcReport::default();
    let Ok(rd) = std::fs::read_dir(runs) else {
        return r;
    };
    for e in rd.flatten() {
        let path = e.path();
        let id = e.file_name().to_string_lossy().into_owned();
        if !path.is_dir() {
            continue;
        }
        let rec: Option<OwnerRecord> = std::fs::read(path.join(OWNER))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if rec.as_ref().is_some_and(owner_alive) {
            r.kept_live.push(id);
            continue;
        }
        for pid in processes_using(&path) {
            match nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            ) {
                Ok(()) => r.killed.push(pid),
                Err(e) => r.errors.push(format!("kill {pid}: {e}")),
            }
        }
        // Killed processes may hold files open for a moment; deletion works
        // regardless on Linux.
        match std::fs::remove_dir_all(&path) {
            Ok(()) => r.removed.push(id),
            Err(e) => r.errors.push(format!("remove {}: {e}", path.display())),
        }
    }
    r
}

/// `gc` of everything a VM can leave on the host: run directories of dead
/// owners (and their processes), then uid leases, jail roots and cgroups of
/// VMs that no longer have a run directory, then network namespaces, veths
/// and slots whose owner is gone (host-wide, by owner record).
pub fn gc_host(host: &crate::HostConfig) -> GcReport {
    let runs = host.runs_dir();
    let mut r = gc(&runs);
    // Repository tasks' host-side scratch: the same owner records.
    let w = gc(&host.work_dir());
    r.removed
        .extend(w.removed.into_iter().map(|id| format!("work/{id}")));
    r.killed.extend(w.killed);
    r.errors.extend(w.errors);
    // Snapshot templates of a dead daemon.
    let t = gc(&host.templates_dir());
    r.removed
        .extend(t.removed.into_iter().map(|id| format!("templates/{id}")));
    r.killed.extend(t.killed);
    r.errors.extend(t.errors);
    let gone = |vm: &str| !runs.join(vm).exists();
    // VMs this state directory has records of: only their cgroups are ours
    // to reclaim (cgroups are host-wide; another Dough may own the rest).
    let mut known: std::collections::HashSet<String> = crate::leases::list(&host.uids_dir())
        .into_iter()
        .map(|(_, vm, _)| vm.trim().to_string())
        .collect();
    if let Ok(rd) = std::fs::read_dir(host.jails_dir()) {
        known.extend(
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned()),
        );
    }
    for (uid, vm, path) in crate::leases::list(&host.uids_dir()) {
        if gone(vm.trim()) {
            match std::fs::remove_file(&path) {
                Ok(()) => r.released_uids.push(uid),
                Err(e) => r
                    .errors
                    .push(format!("remove lease {}: {e}", path.display())),
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(host.jails_dir()) {
        for e in rd.flatten() {
            let vm = e.file_name().to_string_lossy().into_owned();
            if gone(&vm) {
                match std::fs::remove_dir_all(e.path()) {
                    Ok(()) => r.removed_jails.push(vm),
                    Err(err) => r
                        .errors
                        .push(format!("remove jail {}: {err}", e.path().display())),
                }
            }
        }
    }
    if let Ok(layout) = dough_vmm::cgroup::Layout::detect() {
        let parents = dough_vmm::cgroup::Cgroup::dirs_for(&layout, "x");
        for parent in parents.iter().filter_map(|d| d.parent()) {
            let Ok(rd) = std::fs::read_dir(parent) else {
                continue;
            };
            for e in rd.flatten().filter(|e| e.path().is_dir()) {
                let vm = e.file_name().to_string_lossy().into_owned();
                if !known.contains(&vm) || !gone(&vm) {
                    continue;
                }
                let procs =
                    std::fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    r.killed.push(pid as u32);
                }
                // A killed process leaves its cgroup once it has exited,
                // which takes longer for a big VMM on a loaded host (its
                // memory is freed first): up to 10 s.
                let mut last = None;
                for _ in 0..500 {
                    match std::fs::remove_dir(e.path()) {
                        Ok(()) => {
                            last = None;
                            break;
                        }
                        Err(err) => last = Some(err),
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                match last {
                    None => r.removed_cgroups.push(e.path().display().to_string()),
                    Some(err) => r
                        .errors
                        .push(format!("remove cgroup {}: {err}", e.path().display())),
                }
            }
        }
    }
    r.net = dough_net::gc(Path::new(dough_net::RUN_ROOT));
    r.errors.append(&mut r.net.errors);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dough image rm` sees a live VM's image and not a dead owner's.
    #[test]
    fn image_users_are_live_vms_of_that_image() {
        let runs = tempfile::tempdir().unwrap();
        RunDir::create_for(runs.path(), "aaaa00000001", Some("py")).unwrap();
        RunDir::create_for(runs.path(), "aaaa00000002", Some("node")).unwrap();
        RunDir::create(runs.path(), "aaaa00000003").unwrap();
        let dead = RunDir::create_for(runs.path(), "aaaa00000004", Some("py")).unwrap();
        let mut rec: OwnerRecord =
            serde_json::from_slice(&std::fs::read(dead.path.join(OWNER)).unwrap()).unwrap();
        rec.owner_start += 1;
        std::fs::write(dead.path.join(OWNER), serde_json::to_vec(&rec).unwrap()).unwrap();
        assert_eq!(image_users(runs.path(), "py"), ["aaaa00000001"]);
        assert!(image_users(runs.path(), "ruby").is_empty());
    }

    #[test]
    fn gc_keeps_live_owners_and_reclaims_dead_ones() {
        let runs = tempfile::tempdir().unwrap();
        let live = RunDir::create(runs.path(), "live000000aa").unwrap();
        let dead = RunDir::create(runs.path(), "dead000000bb").unwrap();
        // Pretend the owner of `dead` was another, now gone, process.
        let mut rec: OwnerRecord =
            serde_json::from_slice(&std::fs::read(dead.path.join(OWNER)).unwrap()).unwrap();
        rec.owner_start += 1;
        std::fs::write(dead.path.join(OWNER), serde_json::to_vec(&rec).unwrap()).unwrap();
        // A process of the dead VM, named by its directory.
        // `sh -c 'read x' PATH`: blocks on stdin with PATH as its $0.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read x"])
            .arg(format!("{}/marker", dead.path.display()))
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Until it has exec'd, its command line is still this test's.
        let start = std::time::Instant::now();
        while !processes_using(&dead.path).contains(&child.id()) {
            assert!(start.elapsed().as_secs() < 5, "child never showed up");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let r = gc(runs.path());
        assert_eq!(r.kept_live, vec!["live000000aa".to_string()]);
        assert_eq!(r.removed, vec!["dead000000bb".to_string()]);
        assert_eq!(r.killed, vec![child.id()]);
        assert!(!child.wait().unwrap().success());
        assert!(live.path.exists() && !dead.path.exists());
    }

    /// A repository task's host-side work directory (bundle, gate repo)
    /// left by a dead `dough` is reclaimed by the host-wide gc too.
    #[test]
    fn gc_host_reclaims_dead_repo_work_dirs() {
        let state = tempfile::tempdir().unwrap();
        let host =
            crate::HostConfig::new(Some(state.path().to_path_buf()), None, Default::default());
        let live = crate::repo::work_dir(&host, "live000000cc").unwrap();
        let dead = crate::repo::work_dir(&host, "dead000000dd").unwrap();
        std::fs::write(crate::repo::bundle_path(&dead.path), b"partial").unwrap();
        let mut rec: OwnerRecord =
            serde_json::from_slice(&std::fs::read(dead.path.join(OWNER)).unwrap()).unwrap();
        rec.owner_start += 1;
        std::fs::write(dead.path.join(OWNER), serde_json::to_vec(&rec).unwrap()).unwrap();
        let r = gc_host(&host);
        assert!(
            r.removed.contains(&"work/dead000000dd".to_string()),
            "{r:?}"
        );
        assert!(live.path.exists() && !dead.path.exists());
    }

    #[test]
    fn start_time_of_self_is_readable() {
        assert!(proc_start_time(std::process::id()).is_some());
        assert!(proc_start_time(u32::MAX).is_none());
    }
}
