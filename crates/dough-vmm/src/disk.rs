//! The per-VM scratch disk: a sparse file with an empty ext4, the upper
//! layer of the guest's overlay root. Deleted with the VM's run directory.
use std::path::Path;
use std::process::Stdio;

use crate::{tools, VmmError};

/// Create a sparse `size_mib` scratch disk at `path` (ext4 without a journal:
/// the disk never outlives the VM, so crash consistency buys nothing).
pub async fn create_scratch(path: &Path, size_mib: u64) -> Result<(), VmmError> {
    let mkfs = tools::find("mkfs.ext4").ok_or_else(|| VmmError::MissingTool {
        tool: "mkfs.ext4".into(),
        hint: tools::hint("mkfs.ext4").into(),
    })?;
    let f = std::fs::File::create(path).map_err(crate::io_err(path))?;
    f.set_len(size_mib << 20).map_err(crate::io_err(path))?;
    drop(f);
    let out = tokio::process::Command::new(mkfs)
        .args([
            "-q",
            "-F",
            "-O",
            "^has_journal",
            "-m",
            "0",
            "-L",
            "dough-scratch",
        ])
        .args(["-E", "lazy_itable_init=1,nodiscard", "-E", "root_owner=0:0"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| VmmError::Spawn {
            what: "mkfs.ext4".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(VmmError::EarlyExit {
            what: "mkfs.ext4 (scratch disk)".into(),
            status: out.status.to_string(),
            log_tail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn scratch_is_sparse_ext4() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.ext4");
        super::create_scratch(&p, 1024).await.unwrap();
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.len(), 1 << 30);
        use std::os::unix::fs::MetadataExt;
        assert!(
            md.blocks() * 512 < 64 << 20,
            "sparse: {} blocks",
            md.blocks()
        );
        let sb = std::fs::read(&p).unwrap();
        // ext4 superblock magic at 1024 + 0x38.
        assert_eq!(&sb[1024 + 0x38..1024 + 0x3a], &[0x53, 0xef]);
    }
}
