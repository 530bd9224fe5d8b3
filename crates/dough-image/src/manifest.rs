//! `manifest.json`: what an image is made of.
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{io_err, ImageError};

pub const FILE: &str = "manifest.json";

/// One part of the image.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct PartInfo {
    /// sha256 of the file as stored.
    pub sha256: String,
    pub size: u64,
    /// Hash of everything the part was built from; equal inputs ⇒ no rebuild.
    pub inputs: String,
    /// Human-readable description of the inputs.
    pub source: String,
    /// RFC 3339 UTC time the part was built.
    pub built_at: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// `uname -r` of the guest kernel.
    pub kernel_version: String,
    pub kernel: PartInfo,
    /// Dough's own minimal kernel (`vmlinux-minimal`): everything built in,
    /// no modules. Absent in images built with `--kernel debian`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_minimal: Option<PartInfo>,
    /// Its `uname -r`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kernel_minimal_version: String,
    /// The hosts it is compiled for (absent: `kvm`, every mitigation).
    #[serde(default)]
    pub kernel_minimal_target: crate::KernelTarget,
    pub initramfs: PartInfo,
    pub rootfs: PartInfo,
    /// sha256 of the agent written into the rootfs as [`crate::ROOT_INIT`]
    /// (the minimal kernel boots it without an initramfs); empty: none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rootfs_agent: String,
    /// The image this one was built on (named images; absent for the
    /// base Dough builds from Debian packages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseRef>,
    /// The OCI image its rootfs was made from (`--from oci:…` /
    /// `docker-archive:…`); absent for Debian-based images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<crate::oci::OciInfo>,
    /// The build steps' layers, lowest first (`dough image build NAME
    /// --packages/--run`; docs/images.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<Layer>,
    /// sha256 over the parts' hashes and the layers' keys: names the image
    /// as a whole.
    pub digest: String,
}

/// The image a named image was built on, when it was built.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct BaseRef {
    pub name: String,
    pub digest: String,
}

/// One build step's result: the scratch disk of the VM that ran it, kept
/// read-only in the layer store as `<key>.ext4`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    /// The step as given (`packages: …`, `run: …`, with its `env:`).
    pub step: String,
    /// sha256 of the base's digest and every step up to this one: equal
    /// keys, equal layers, so an unchanged step is never run again.
    pub key: String,
    /// Bytes the layer's disk holds (it is sparse).
    pub size: u64,
    pub built_at: String,
    /// How long the step took, in milliseconds.
    #[serde(default)]
    pub ms: u64,
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Manifest, ImageError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ImageError::Manifest(path.into(), e))?;
        serde_json::from_str(&text).map_err(|e| ImageError::ManifestFormat(path.into(), e))
    }

    pub fn write(&self, path: &Path) -> Result<(), ImageError> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).expect("manifest serializes");
        std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err(path))
    }

    pub fn compute_digest(&mut self) {
        let mut text = format!(
            "{}\n{}\n{}\n",
            self.kernel.sha256, self.initramfs.sha256, self.rootfs.sha256
        );
        if let Some(k) = &self.kernel_minimal {
            text.push_str(&format!("minimal {}\n", k.sha256));
        }
        for l in &self.layers {
            text.push_str(&format!("layer {}\n", l.key));
        }
        self.digest = sha256_hex(text.as_bytes());
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Now as RFC 3339 UTC, without a date crate.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_785), (2026, 11, 28));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    /// An image's digest names its layers too: the same base with other
    /// steps is another image; the same steps, the same image.
    #[test]
    fn digest_covers_the_layers() {
        let mut a = Manifest::default();
        a.rootfs.sha256 = "r".into();
        a.compute_digest();
        let mut b = a.clone();
        b.layers.push(Layer {
            key: "k1".into(),
            ..Default::default()
        });
        b.compute_digest();
        assert_ne!(a.digest, b.digest);
        let mut c = b.clone();
        c.layers[0].built_at = "later".into();
        c.compute_digest();
        assert_eq!(b.digest, c.digest);
        c.layers[0].key = "k2".into();
        c.compute_digest();
        assert_ne!(b.digest, c.digest);
    }

    #[test]
    fn manifest_round_trips_and_rejects_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(FILE);
        let mut m = Manifest {
            format: 1,
            kernel_version: "6.1".into(),
            ..Default::default()
        };
        m.kernel.sha256 = "aa".into();
        m.compute_digest();
        m.write(&p).unwrap();
        assert_eq!(Manifest::read(&p).unwrap(), m);
        std::fs::write(&p, r#"{"format":1,"bogus":2}"#).unwrap();
        assert!(matches!(
            Manifest::read(&p),
            Err(ImageError::ManifestFormat(..))
        ));
    }
}
