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
pub mod oci;

pub use build::{build, BuildOptions, Progress, ROOT_INIT};
pub use manifest::{
    now_rfc3339, sha256_file, sha256_hex, BaseRef, Layer, Manifest, PartInfo, FILE as MANIFEST,
};

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

/// Which hosts Dough's minimal kernel is compiled for (`dough image build
/// --kernel-target`; docs/boot.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelTarget {
    /// Firecracker's config with every mitigation it has: boots under KVM
    /// and under TCG. (Images made before targets existed are this.)
    #[default]
    Kvm,
    /// For hosts whose VMs run under QEMU TCG only: also without the
    /// return-thunk code (`kernel/tcg.fragment`) that only matters on a
    /// hardware CPU affected by Retbleed or SRSO. An emulated CPU is never
    /// affected, and the kernel would patch all ~58,000 sites back to a plain
    /// `ret` at every boot; under KVM it would leave the guest without
    /// those mitigations, so Dough does not boot it there.
    Tcg,
}

impl std::str::FromStr for KernelTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm" => Ok(KernelTarget::Kvm),
            "tcg" => Ok(KernelTarget::Tcg),
            _ => Err(format!("kernel target {s:?}: expected kvm or tcg")),
        }
    }
}

impl std::fmt::Display for KernelTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelTarget::Kvm => "kvm",
            KernelTarget::Tcg => "tcg",
        })
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
    /// Read-only layers over the rootfs, lowest first (files in the layer
    /// store, [`Image::layer_path`]).
    pub layers: Vec<PathBuf>,
    pub manifest: Manifest,
}

/// The name of the image every task gets unless it names another.
pub const DEFAULT_IMAGE: &str = "default";

/// Where layers are kept, shared by every image of a state directory
/// (by key, so two images built on the same steps share their files).
pub const LAYER_STORE: &str = ".layers";

/// An ext4 file system of `size_mb` MiB at `out` holding the tree at
/// `tree` (`mkfs.ext4 -d`: nothing is mounted), without a journal or
/// reserved blocks (every disk Dough makes is written once, then read).
/// `label` and `inodes` (`-L`, `-N`) when given. The error is mkfs's
/// own message.
pub fn mkfs_ext4_from(
    tree: &std::path::Path,
    out: &std::path::Path,
    size_mb: u64,
    label: Option<&str>,
    inodes: Option<u64>,
) -> Result<(), String> {
    let mut c = std::process::Command::new("mkfs.ext4");
    c.args(["-q", "-F", "-O", "^has_journal", "-m", "0"]);
    if let Some(l) = label {
        c.args(["-L", l]);
    }
    if let Some(n) = inodes {
        c.arg("-N").arg(n.to_string());
    }
    let o = c
        .arg("-d")
        .arg(tree)
        .arg(out)
        .arg(format!("{size_mb}M"))
        .output()
        .map_err(|e| format!("run mkfs.ext4: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
    }
}

/// Image names: what a directory and a URL path can hold.
pub fn valid_name(name: &str) -> Result<(), ImageError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ImageError::Invalid(format!(
            "image name {name:?}: 1-63 of [a-z0-9._-], starting with a letter or digit"
        )))
    }
}

impl Image {
    /// The image directory under a state directory.
    pub fn dir_in(state_dir: &Path) -> PathBuf {
        Self::named(state_dir, DEFAULT_IMAGE)
    }

    /// The directory of the image `name` under a state directory.
    pub fn named(state_dir: &Path, name: &str) -> PathBuf {
        state_dir.join("images").join(name)
    }

    /// A layer's file in the store next to the image directory `dir`.
    pub fn layer_path(dir: &Path, key: &str) -> PathBuf {
        dir.parent()
            .unwrap_or(Path::new("."))
            .join(LAYER_STORE)
            .join(format!("{key}.ext4"))
    }

    /// The image's name (its directory's).
    pub fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
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
            layers: manifest
                .layers
                .iter()
                .map(|l| Self::layer_path(dir, &l.key))
                .collect(),
            manifest,
        };
        for p in [&img.kernel, &img.initramfs, &img.rootfs]
            .into_iter()
            .chain(img.kernel_minimal.as_ref())
            .chain(&img.layers)
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

    /// The kernel to boot for `choice` on an accelerator (`emulated`: QEMU
    /// TCG), and which one it is. A minimal kernel built for TCG only is
    /// never booted under KVM: `auto` falls back to Debian's kernel
    /// ([`Image::minimal_fits`] tells why), `minimal` is refused.
    pub fn kernel_for(
        &self,
        choice: KernelChoice,
        emulated: bool,
    ) -> Result<(PathBuf, KernelKind), ImageError> {
        match (choice, &self.kernel_minimal, self.minimal_fits(emulated)) {
            (KernelChoice::Debian, _, _)
            | (KernelChoice::Auto, None, _)
            | (KernelChoice::Auto, Some(_), false) => Ok((self.kernel.clone(), KernelKind::Debian)),
            (KernelChoice::Auto | KernelChoice::Minimal, Some(k), true) => {
                Ok((k.clone(), KernelKind::Minimal))
            }
            (KernelChoice::Minimal, Some(_), false) => Err(ImageError::Invalid(format!(
                "the minimal kernel of the image in {} is built for TCG hosts (without the return-thunk mitigations a CPU under KVM may need); build one for this host with `dough image build --kernel-target kvm`, or boot --kernel debian",
                self.dir.display()
            ))),
            (KernelChoice::Minimal, None, _) => Err(ImageError::Invalid(format!(
                "the image in {} has no minimal kernel; run `dough image build` (without --kernels debian)",
                self.dir.display()
            ))),
        }
    }

    /// Whether the image's minimal kernel (if any) may boot on this
    /// accelerator: a `tcg` kernel only when `emulated`.
    pub fn minimal_fits(&self, emulated: bool) -> bool {
        emulated || self.manifest.kernel_minimal_target == KernelTarget::Kvm
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

#[cfg(test)]
mod tests {
    use super::*;

    fn image(minimal: Option<KernelTarget>) -> Image {
        let mut manifest = Manifest::default();
        if let Some(t) = minimal {
            manifest.kernel_minimal = Some(PartInfo::default());
            manifest.kernel_minimal_target = t;
        }
        Image {
            dir: PathBuf::from("/img"),
            kernel: PathBuf::from("/img/vmlinux"),
            kernel_minimal: minimal.map(|_| PathBuf::from("/img/vmlinux-minimal")),
            initramfs: PathBuf::from("/img/initramfs.cpio"),
            rootfs: PathBuf::from("/img/rootfs.ext4"),
            layers: vec![],
            manifest,
        }
    }

    /// A TCG-only minimal kernel never boots under KVM; a `kvm` one boots
    /// anywhere; `auto` falls back to Debian's kernel instead of failing.
    #[test]
    fn kernel_choice_respects_the_minimal_kernels_target() {
        use KernelChoice::*;
        use KernelKind as K;
        let kind = |img: &Image, c, emulated| img.kernel_for(c, emulated).map(|k| k.1).ok();
        let tcg = image(Some(KernelTarget::Tcg));
        let kvm = image(Some(KernelTarget::Kvm));
        let none = image(None);
        assert_eq!(kind(&tcg, Auto, true), Some(K::Minimal));
        assert_eq!(kind(&tcg, Auto, false), Some(K::Debian));
        assert_eq!(kind(&tcg, Minimal, true), Some(K::Minimal));
        let e = tcg.kernel_for(Minimal, false).unwrap_err().to_string();
        assert!(e.contains("--kernel-target kvm"), "{e}");
        assert_eq!(kind(&kvm, Auto, false), Some(K::Minimal));
        assert_eq!(kind(&kvm, Minimal, true), Some(K::Minimal));
        assert_eq!(kind(&none, Auto, false), Some(K::Debian));
        assert!(none.kernel_for(Minimal, true).is_err());
        for img in [&tcg, &kvm, &none] {
            assert_eq!(kind(img, Debian, false), Some(K::Debian));
        }
    }

    /// Manifests written before targets existed describe kernels with
    /// every mitigation: they read as `kvm`.
    #[test]
    fn a_manifest_without_a_target_is_kvm() {
        let m: Manifest = serde_json::from_str(
            r#"{"format":1,"kernel_version":"k","kernel":{"sha256":"","size":0,"inputs":"","source":"","built_at":""},
                "initramfs":{"sha256":"","size":0,"inputs":"","source":"","built_at":""},
                "rootfs":{"sha256":"","size":0,"inputs":"","source":"","built_at":""},"digest":"d"}"#,
        )
        .unwrap();
        assert_eq!(m.kernel_minimal_target, KernelTarget::Kvm);
        let text = serde_json::to_string(&Manifest {
            kernel_minimal_target: KernelTarget::Tcg,
            ..m
        })
        .unwrap();
        assert!(text.contains(r#""kernel_minimal_target":"tcg""#), "{text}");
    }
}
