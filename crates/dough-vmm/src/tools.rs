//! Finding the external programs a backend runs.
use std::path::PathBuf;

/// `name` on PATH (plus `~/.cargo/bin`, where `cargo install` puts
/// vhost-device-vsock, and the sbin directories).
pub fn find(name: &str) -> Option<PathBuf> {
    if let Some(over) =
        std::env::var_os(format!("DOUGH_{}", name.to_uppercase().replace(['-'], "_")))
    {
        let p = PathBuf::from(over);
        return p.is_file().then_some(p);
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.extend(["/root/.cargo/bin", "/usr/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

pub const QEMU: &str = "qemu-system-x86_64";
pub const VHOST_VSOCK: &str = "vhost-device-vsock";
pub const FIRECRACKER: &str = "firecracker";
pub const JAILER: &str = "jailer";

pub fn hint(name: &str) -> &'static str {
    match name {
        QEMU => "apt-get install qemu-system-x86, or run scripts/setup.sh",
        VHOST_VSOCK => {
            "cargo install vhost-device-vsock --version 0.3.0 --locked, or run scripts/setup.sh"
        }
        "mkfs.ext4" => "apt-get install e2fsprogs",
        FIRECRACKER => "put a firecracker release binary on PATH; see docs/firecracker.md",
        JAILER => {
            "put the jailer binary of the same firecracker release on PATH; see docs/firecracker.md"
        }
        _ => "see docs/install.md",
    }
}
