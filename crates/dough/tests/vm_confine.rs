//! Tier 2: every VMM runs confined (root only; CI runs as root). Checked
//! from outside, on the live processes: a per-VM non-root uid (two VMs never
//! share one), no capabilities, no_new_privs, QEMU's seccomp filter, its own
//! mount namespace whose root shows neither /home nor another VM's files,
//! and a cgroup with the VM's limits — all gone after teardown.
mod common;

use std::path::PathBuf;

use common::*;

fn status_field(pid: u32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The memory cgroup directory of `pid` (v1 `memory` line or v2 `0::`).
fn memory_cgroup(pid: u32) -> (PathBuf, PathBuf) {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    if let Some(rel) = cg
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
    {
        let d = PathBuf::from("/sys/fs/cgroup/memory").join(rel.trim_start_matches('/'));
        (d.clone(), d.join("memory.limit_in_bytes"))
    } else {
        let rel = cg
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap()
            .to_string();
        let root = if PathBuf::from("/sys/fs/cgroup/cgroup.controllers").exists() {
            PathBuf::from("/sys/fs/cgroup")
        } else {
            PathBuf::from("/sys/fs/cgroup/unified")
        };
        let d = root.join(rel.trim_start_matches('/'));
        (d.clone(), d.join("memory.max"))
    }
}

#[test]
fn two_vmms_run_jailed_under_distinct_uids_with_limits_and_leave_nothing() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "confinement tests need root"
    );
    let h = Harness::new();
    let a = h.spawn_running_task();
    let b = h.spawn_running_task();
    let pids = qemu_pids(&h);
    assert_eq!(pids.len(), 2, "{pids:?}");
    let my_mnt = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let mut uids = vec![];
    let mut cgroups = vec![];
    for &pid in &pids {
        let uid: u32 = status_field(pid, "Uid")
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(uid >= 900_000, "vmm uid {uid}");
        uids.push(uid);
        assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
        assert_eq!(status_field(pid, "NoNewPrivs"), "1");
        assert_eq!(status_field(pid, "Seccomp"), "2", "qemu -sandbox on");
        assert_ne!(
            std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
            my_mnt
        );
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        assert!(!root.join("home").exists(), "/home visible in the jail");
        assert!(!root.join("etc/shadow").exists());
        let runs = root.join(h.runs_dir().strip_prefix("/").unwrap());
        let visible: Vec<_> = std::fs::read_dir(&runs).unwrap().flatten().collect();
        assert_eq!(visible.len(), 1, "only its own run dir: {visible:?}");
        let (dir, limit) = memory_cgroup(pid);
        assert!(dir.to_string_lossy().contains("/dough/"), "{dir:?}");
        let bytes: u64 = std::fs::read_to_string(&limit)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Guest RAM + the VMM's overhead, which is larger under TCG (its
        // translation cache) than under KVM.
        let tcg = dough_vmm::HostFacts::probe().choose(dough_vmm::AccelChoice::Auto)
            == Ok(dough_vmm::Accel::Tcg);
        let overhead = if tcg { 384 } else { 192 };
        assert_eq!(
            bytes,
            (512 + overhead) << 20,
            "memory limit = guest RAM + overhead"
        );
        cgroups.push(dir);
    }
    assert_ne!(uids[0], uids[1], "two VMs never share a uid");
    for child in [a, b] {
        signal(child.id(), nix::sys::signal::Signal::SIGINT);
        assert_eq!(child.wait_with_output().unwrap().status.code(), Some(130));
    }
    h.assert_clean();
    for d in cgroups {
        assert!(!d.exists(), "cgroup {d:?} left");
    }
    // The jail's mounts lived only in the VMMs' own namespaces.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&h.state.path().to_string_lossy().to_string()),
        "a jail mount leaked"
    );
}

/// A task that allocates past `--memory` is killed by the guest's OOM
/// killer and reported as such. (100 MB parked in tmpfs first, which cannot
/// be reclaimed without swap, so the 150 MB buffer — small enough for the
/// overcommit check — cannot fit and the OOM killer acts at once.)
#[test]
fn allocating_past_guest_memory_is_reported_oom() {
    let h = Harness::new();
    let out = h.run(&[
        "--memory",
        "256",
        "--",
        "sh",
        "-c",
        "head -c 100M /dev/zero > /dev/shm/fill; echo filled; exec dd if=/dev/zero of=/dev/null bs=150M count=1",
    ]);
    assert_eq!(text(&out.stdout), "filled\n");
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("ran out of memory (oom)"),
        "{}",
        text(&out.stderr)
    );
    h.assert_clean();
}
