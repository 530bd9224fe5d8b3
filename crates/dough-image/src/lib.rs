//! The guest image: what every VM boots.
//!
//! | file | from |
//! |---|---|
//! | `vmlinux` | the uncompressed kernel of Debian's `linux-image-cloud-amd64` |
//! | `initramfs.cpio` | the virtio/vsock/overlay modules of that kernel + `dough-agent` as `/init` |
//! | `rootfs.ext4` | `debootstrap` bookworm with the task tools and the `dough` user, read-only |
//! | `manifest.json` | content hashes, kernel version, inputs, build date |
//!
//! [`build`] redoes only the parts whose inputs changed; [`Image::load`]
//! gives the VM side verified paths or a clear "run `dough image build`".
#![forbid(unsafe_code)]

pub mod build;
mod cpio;
mod elf;
mod manifest;

pub use build::{build, BuildOptions, Progress, ROOT_INIT};
pub use manifest::{Manifest, PartInfo};

use std::path::{Path, PathBuf};

/// Errors of the image store and build.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("no guest image at {0}: run `dough image build`")]
    NotBuilt(PathBuf),
    #[error("guest image at {dir} is incomplete ({missing} missing): run `dough image build`")]
    Incomplete { dir: PathBuf, missing: String },
    #[error("cannot read manifest {0}")]
    Manifest(PathBuf, #[source] std::io::Error),
    #[error("manifest {0} is not valid")]
    ManifestFormat(PathBuf, #[source] serde_json::Error),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{tool}` is not installed ({hint})")]
    MissingTool { tool: String, hint: String },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("agent binary {0} not found: build it with `scripts/build-agent.sh` or pass --agent")]
    AgentMissing(PathBuf),
    #[error("agent binary {0} is dynamically linked; the guest needs a static build (`scripts/build-agent.sh`)")]
    AgentDynamic(PathBuf),
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn io_err(path: impl AsRef<Path>) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.as_ref().to_path_buf();
    move |source| ImageError::Io { path, source }
}

/// Which kernel a VM boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelChoice {
    /// The minimal kernel when the image has one, else Debian's.
    #[default]
    Auto,
    Minimal,
    Debian,
}

impl std::str::FromStr for KernelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(KernelChoice::Auto),
            "minimal" => Ok(KernelChoice::Minimal),
            "debian" => Ok(KernelChoice::Debian),
            _ => Err(format!("kernel {s:?}: expected auto, minimal or debian")),
        }
    }
}

/// The kernel actually booted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// Dough's build: drivers built in, virtio-mmio devices from the
    /// command line, so the VMM runs it without ACPI.
    Minimal,
    /// Debian's cloud kernel: drivers as modules (in the initramfs), devices
    /// found through ACPI.
    Debian,
}

impl KernelKind {
    /// Whether the VMM must describe devices through ACPI.
    pub fn needs_acpi(self) -> bool {
        self == KernelKind::Debian
    }
}

/// A built image, ready to boot.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
    /// Debian's cloud kernel (needs the initramfs's modules and ACPI).
    pub kernel: PathBuf,
    /// Dough's minimal kernel, when built.
    pub kernel_minimal: Option<PathBuf>,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
    pub manifest: Manifest,
}

impl Image {
    /// The image directory under a state directory.
    pub fn dir_in(state_dir: &Path) -> PathBuf {
        state_dir.join("images").join("default")
    }

    /// Load the image in `dir`: the manifest and all three files must exist.
    /// (Hashes are checked by `build` and `dough doctor`, not on every boot.)
    pub fn load(dir: &Path) -> Result<Image, ImageError> {
        let mpath = dir.join(manifest::FILE);
        if !mpath.exists() {
            return Err(ImageError::NotBuilt(dir.to_path_buf()));
        }
        let manifest = Manifest::read(&mpath)?;
        let img = Image {
            dir: dir.to_path_buf(),
            kernel: dir.join(build::KERNEL),
            kernel_minimal: manifest
                .kernel_minimal
                .as_ref()
                .map(|_| dir.join(build::KERNEL_MINIMAL)),
            initramfs: dir.join(build::INITRAMFS),
            rootfs: dir.join(build::ROOTFS),
            manifest,
        };
        for p in [&img.kernel, &img.initramfs, &img.rootfs]
            .into_iter()
            .chain(img.kernel_minimal.as_ref())
        {
            if !p.exists() {
                return Err(ImageError::Incomplete {
                    dir: dir.to_path_buf(),
                    missing: p.file_name().unwrap_or_default().to_string_lossy().into(),
                });
            }
        }
        Ok(img)
    }

    /// The kernel to boot for `choice`, and which one it is.
    pub fn kernel_for(&self, choice: KernelChoice) -> Result<(PathBuf, KernelKind), ImageError> {
        match (choice, &self.kernel_minimal) {
            (KernelChoice::Debian, _) | (KernelChoice::Auto, None) => {
                Ok((self.kernel.clone(), KernelKind::Debian))
            }
            (KernelChoice::Auto | KernelChoice::Minimal, Some(k)) => {
                Ok((k.clone(), KernelKind::Minimal))
            }
            (KernelChoice::Minimal, None) => Err(ImageError::Invalid(format!(
                "the image in {} has no minimal kernel; run `dough image build` (without --kernel debian)",
                self.dir.display()
            ))),
        }
    }

    /// Re-hash every part and compare with the manifest; the names of parts
    /// that differ.
    pub fn verify(&self) -> Result<Vec<String>, ImageError> {
        let mut bad = Vec::new();
        if let (Some(p), Some(part)) = (&self.kernel_minimal, &self.manifest.kernel_minimal) {
            if manifest::sha256_file(p)? != part.sha256 {
                bad.push("kernel_minimal".to_string());
            }
        }
        for (name, path, part) in [
            ("kernel", &self.kernel, &self.manifest.kernel),
            ("initramfs", &self.initramfs, &self.manifest.initramfs),
            ("rootfs", &self.rootfs, &self.manifest.rootfs),
        ] {
            if manifest::sha256_file(path)? != part.sha256 {
                bad.push(name.to_string());
            }
        }
        Ok(bad)
    }
}
