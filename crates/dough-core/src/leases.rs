//! Per-VM host uids. A lease is a file `<state>/uids/<uid>` holding the VM
//! id, created with O_EXCL before the uid is used — so two VMs never share a
//! uid, and `gc` can return the uids of VMs that are gone.
use std::io::Write;
use std::path::{Path, PathBuf};

/// First uid (and gid) handed to VMs; far above any normal account.
pub const UID_BASE: u32 = 900_000;
pub const UID_COUNT: u32 = 65_536;

#[derive(Debug)]
pub struct UidLease {
    pub uid: u32,
    path: PathBuf,
}

impl UidLease {
    /// Take a free uid for `vm_id`.
    pub fn acquire(dir: &Path, vm_id: &str) -> std::io::Result<UidLease> {
        std::fs::create_dir_all(dir)?;
        // Start at a position derived from the id: few collisions to skip.
        let start = u32::from_str_radix(&vm_id[..vm_id.len().min(6)], 16).unwrap_or(0) % UID_COUNT;
        for i in 0..UID_COUNT {
            let uid = UID_BASE + (start + i) % UID_COUNT;
            let path = dir.join(uid.to_string());
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(vm_id.as_bytes())?;
                    return Ok(UidLease { uid, path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other("every VM uid is leased"))
    }

    pub fn release(self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}

/// (uid, vm id) of every lease in `dir`.
pub fn list(dir: &Path) -> Vec<(u32, String, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| {
            let uid = e.file_name().to_str()?.parse().ok()?;
            let vm = std::fs::read_to_string(e.path()).ok()?;
            Some((uid, vm, e.path()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_vms_never_share_a_uid_and_release_frees_it() {
        let d = tempfile::tempdir().unwrap();
        // Same id prefix: same starting point, still distinct uids.
        let a = UidLease::acquire(d.path(), "abcdef000001").unwrap();
        let b = UidLease::acquire(d.path(), "abcdef000002").unwrap();
        assert_ne!(a.uid, b.uid);
        assert!(a.uid >= UID_BASE && a.uid < UID_BASE + UID_COUNT);
        let listed = list(d.path());
        assert_eq!(listed.len(), 2);
        assert!(listed
            .iter()
            .any(|(u, vm, _)| *u == a.uid && vm == "abcdef000001"));
        let uid = a.uid;
        a.release().unwrap();
        let c = UidLease::acquire(d.path(), "abcdef000003").unwrap();
        assert_eq!(c.uid, uid, "a released uid is reused");
        b.release().unwrap();
        c.release().unwrap();
    }
}
