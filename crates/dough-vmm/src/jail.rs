//! Confinement of a VMM and its helpers, done by Dough itself (QEMU has no
//! jailer): a per-VM unprivileged uid/gid, a mount namespace whose root holds
//! only `/usr`, a few device nodes and this VM's own files, a cgroup with
//! the VM's limits, no capabilities, `PR_SET_NO_NEW_PRIVS`.
//!
//! The skeleton root is built on disk by the parent (ordinary file
//! operations); the child, between fork and exec, only makes syscalls from
//! paths computed beforehand: join the cgroup, unshare the mount namespace,
//! bind-mount, `pivot_root`, drop to the VM's uid/gid.
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::cgroup::{Cgroup, Layout, Limits};
use crate::{io_err, VmmError};

/// What the supervisor decides for a VM's jail.
#[derive(Debug, Clone)]
pub struct JailSpec {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (e.g. `kvm` for /dev/kvm).
    pub groups: Vec<u32>,
    /// Empty directory to build the VM's root in (deleted at teardown).
    pub root: PathBuf,
    pub limits: Limits,
}

/// A bind mount into the jail, at the same absolute path as on the host.
#[derive(Debug, Clone)]
pub struct Bind {
    pub path: PathBuf,
    pub writable: bool,
}

/// A built jail: skeleton on disk and cgroup created.
#[derive(Debug)]
pub struct Jail {
    pub spec: JailSpec,
    pub cgroup: Cgroup,
    binds: Vec<Bind>,
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("paths have no NUL")
}

fn inside(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

/// Device nodes a VMM may need; those that exist are bound.
const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/urandom",
    "/dev/random",
    "/dev/kvm",
    "/dev/net/tun",
];

impl Jail {
    /// Build the skeleton for `binds` (plus `/usr` read-only and the device
    /// nodes) and create the cgroup.
    pub fn create(
        spec: JailSpec,
        layout: &Layout,
        vm_id: &str,
        mut binds: Vec<Bind>,
    ) -> Result<Jail, VmmError> {
        let root = &spec.root;
        std::fs::create_dir_all(root).map_err(io_err(root))?;
        binds.insert(
            0,
            Bind {
                path: "/usr".into(),
                writable: false,
            },
        );
        for d in DEVICES.iter().map(Path::new).filter(|d| d.exists()) {
            binds.push(Bind {
                path: d.into(),
                writable: true,
            });
        }
        let mk = |p: &Path| std::fs::create_dir_all(p).map_err(io_err(p));
        mk(&root.join(".oldroot"))?;
        mk(&root.join("tmp"))?;
        // Debian 12 is merged-/usr: /lib, /lib64, /bin and /sbin are links.
        for l in ["lib", "lib64", "bin", "sbin"] {
            let link = root.join(l);
            if !link.exists() {
                std::os::unix::fs::symlink(format!("usr/{l}"), &link).map_err(io_err(&link))?;
            }
        }
        for b in &binds {
            let target = inside(root, &b.path);
            if b.path.is_dir() {
                mk(&target)?;
            } else {
                if let Some(parent) = target.parent() {
                    mk(parent)?;
                }
                std::fs::File::create(&target).map_err(io_err(&target))?;
            }
        }
        let cgroup = Cgroup::create(layout, vm_id, spec.limits)?;
        Ok(Jail {
            spec,
            cgroup,
            binds,
        })
    }

    /// Make `cmd` enter the jail between fork and exec. Call before other
    /// `pre_exec` hooks that must run as the VM's user (PR_SET_PDEATHSIG is
    /// cleared by a uid change, so it must come after).
    pub fn apply(&self, cmd: &mut Command) {
        let procs: Vec<CString> = self.cgroup.procs_files().iter().map(|p| cstr(p)).collect();
        let root = cstr(&self.spec.root);
        let mounts: Vec<(CString, CString, bool)> = self
            .binds
            .iter()
            .map(|b| {
                (
                    cstr(&b.path),
                    cstr(&inside(&self.spec.root, &b.path)),
                    b.writable,
                )
            })
            .collect();
        let (uid, gid) = (self.spec.uid, self.spec.gid);
        let groups: Vec<libc::gid_t> = self.spec.groups.clone();
        let oldroot = CString::new(".oldroot").expect("literal");
        let oldroot_abs = CString::new("/.oldroot").expect("literal");
        let dot = CString::new(".").expect("literal");
        let slash = CString::new("/").expect("literal");
        let zero = b"0";
        // SAFETY: between fork and exec this closure only makes raw syscalls
        // on memory prepared before the fork (no allocation, no locks).
        unsafe {
            cmd.pre_exec(move || {
                let check = |r: libc::c_int| {
                    if r < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                };
                for p in &procs {
                    let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    check(fd)?;
                    let n = libc::write(fd, zero.as_ptr().cast(), zero.len());
                    libc::close(fd);
                    check(n as libc::c_int)?;
                }
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    std::ptr::null(),
                    slash.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                // pivot_root needs the new root to be a mount point.
                check(libc::mount(
                    root.as_ptr(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
                for (src, dst, writable) in &mounts {
                    check(libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ))?;
                    let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID;
                    if !writable {
                        flags |= libc::MS_RDONLY;
                    }
                    check(libc::mount(
                        std::ptr::null(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        flags,
                        std::ptr::null(),
                    ))?;
                }
                check(libc::chdir(root.as_ptr()))?;
                check(
                    libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), oldroot.as_ptr())
                        as libc::c_int,
                )?;
                check(libc::chdir(slash.as_ptr()))?;
                check(libc::umount2(oldroot_abs.as_ptr(), libc::MNT_DETACH))?;
                check(libc::setgroups(groups.len(), groups.as_ptr()))?;
                check(libc::setresgid(gid, gid, gid))?;
                // Changing every uid away from 0 clears all capabilities.
                check(libc::setresuid(uid, uid, uid))?;
                check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
                Ok(())
            });
        }
    }

    /// A jail built by someone else (Firecracker's jailer), kept for its
    /// clean-up: the cgroup and `spec.root` are removed by [`Jail::destroy`].
    pub fn adopt(spec: JailSpec, cgroup: Cgroup) -> Jail {
        Jail {
            spec,
            cgroup,
            binds: vec![],
        }
    }

    /// Remove the cgroup and the skeleton (after every jailed process has
    /// exited; the mounts went with their namespace).
    pub fn destroy(&self) -> Vec<String> {
        let mut errs = self.cgroup.remove();
        match std::fs::remove_dir_all(&self.spec.root) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errs.push(format!(
                "remove jail root {}: {e}",
                self.spec.root.display()
            )),
        }
        errs
    }
}

/// Give the VM's uid what it must write: the run directory, its scratch disk
/// and the socket the guest's connections arrive on.
pub fn hand_over(paths: &[PathBuf], uid: u32, gid: u32) -> Result<(), VmmError> {
    for p in paths.iter().filter(|p| p.exists()) {
        std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(io_err(p))?;
    }
    Ok(())
}
