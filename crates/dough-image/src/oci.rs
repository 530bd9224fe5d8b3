//! OCI images as an image's base: `--from oci:DIR[:REF]` (an OCI image
//! layout) and `--from docker-archive:FILE` (what `docker save` and
//! `podman save` write).
//!
//! [`import`] resolves the image (index → the linux/amd64 manifest →
//! config and layers), checks every blob's digest and every layer's
//! uncompressed digest (the config's `diff_ids`) while it streams, applies
//! the layers in order into a staging tree (whiteouts and opaque
//! directories honoured; owners, modes, setuid bits, symlinks, hard links
//! and mtimes kept), adds what Dough's guest needs, and makes the base
//! rootfs with `mkfs.ext4 -d`: nothing is mounted.
//!
//! The layers are untrusted input unpacked by root, so every path is
//! resolved inside the staging tree the way a container runtime does
//! (symlinks followed but clamped at its root, `..` in an entry's name
//! refused) and nothing is ever written through a symlink. Device nodes are
//! skipped (the guest has devtmpfs) and counted; extended attributes (file
//! capabilities) are not kept.
use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::{io_err, ImageError};

/// Where an image comes from (skopeo's transport names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An OCI image layout directory, and optionally the
    /// `org.opencontainers.image.ref.name` to pick from its index.
    Layout {
        dir: PathBuf,
        reference: Option<String>,
    },
    /// A `docker save` / `podman save` tar archive (one image).
    DockerArchive(PathBuf),
    /// A registry reference (`docker://` stripped), pulled into a layout
    /// first (`dough_core::registry`).
    Registry(String),
}

impl Source {
    /// `Ok(None)` for a name that is no OCI transport (a Dough image name).
    pub fn parse(from: &str) -> Result<Option<Source>, ImageError> {
        if let Some(rest) = from.strip_prefix("oci:") {
            if rest.is_empty() {
                return Err(ImageError::Invalid(
                    "--from oci:DIR names no directory".into(),
                ));
            }
            // `oci:DIR:REF` when DIR is a directory and DIR:REF is not.
            if !Path::new(rest).is_dir() {
                if let Some((dir, r)) = rest.rsplit_once(':') {
                    if Path::new(dir).is_dir() && !r.is_empty() && !r.contains('/') {
                        return Ok(Some(Source::Layout {
                            dir: dir.into(),
                            reference: Some(r.into()),
                        }));
                    }
                }
            }
            return Ok(Some(Source::Layout {
                dir: rest.into(),
                reference: None,
            }));
        }
        if let Some(rest) = from.strip_prefix("docker-archive:") {
            if rest.is_empty() {
                return Err(ImageError::Invalid(
                    "--from docker-archive:FILE names no file".into(),
                ));
            }
            return Ok(Some(Source::DockerArchive(rest.into())));
        }
        if let Some(r) = from.strip_prefix("docker://") {
            if r.is_empty() {
                return Err(ImageError::Invalid(
                    "--from docker://REF names no image".into(),
                ));
            }
            return Ok(Some(Source::Registry(r.into())));
        }
        // A Dough image name has neither; a registry reference has a host.
        if from.contains('/') || from.contains('@') {
            return Ok(Some(Source::Registry(from.into())));
        }
        Ok(None)
    }

    /// How the manifest names it.
    pub fn describe(&self) -> String {
        match self {
            Source::Layout { dir, reference } => match reference {
                Some(r) => format!("oci:{}:{r}", dir.display()),
                None => format!("oci:{}", dir.display()),
            },
            Source::DockerArchive(f) => format!("docker-archive:{}", f.display()),
            Source::Registry(r) => format!("docker://{r}"),
        }
    }
}

/// What was imported (kept in the image's manifest).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OciInfo {
    /// As given to `--from`.
    pub source: String,
    /// The image manifest's digest (for an archive: of its manifest.json entry).
    pub manifest_digest: String,
    /// The config's digest: names the image's content.
    pub config_digest: String,
    pub layers: usize,
    /// Bytes of the files the layers hold, uncompressed.
    pub bytes: u64,
    /// The image config's `Env` (recorded; tasks get Dough's environment).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Device nodes in the layers, not created (the guest has devtmpfs).
    #[serde(default)]
    pub skipped_devices: u64,
    /// Time spent unpacking the layers (digests checked on the way), and
    /// making the file system.
    #[serde(default)]
    pub unpack_ms: u64,
    #[serde(default)]
    pub mkfs_ms: u64,
}

/// Limits of an import.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The most bytes of files the image may unpack to.
    pub max_bytes: u64,
}

/// A blob: a byte range of a file (a layout's blob file, or an entry of an
/// archive).
#[derive(Debug, Clone)]
struct Blob {
    file: PathBuf,
    offset: u64,
    size: u64,
    /// `sha256:…` when the source names it (always for a layout).
    digest: Option<String>,
    /// What the error messages call it.
    what: String,
}

impl Blob {
    fn open(&self) -> Result<HashingReader<io::Take<File>>, ImageError> {
        let mut f = File::open(&self.file).map_err(io_err(&self.file))?;
        f.seek(SeekFrom::Start(self.offset))
            .map_err(io_err(&self.file))?;
        Ok(HashingReader::new(f.take(self.size)))
    }

    /// The whole blob, its digest checked (manifests and configs: small).
    fn read_checked(&self, max: u64) -> Result<Vec<u8>, ImageError> {
        if self.size > max {
            return Err(corrupt(format!(
                "{} is {} bytes; more than a {} can be",
                self.what, self.size, self.what
            )));
        }
        let mut r = self.open()?;
        let mut v = Vec::with_capacity(self.size as usize);
        r.read_to_end(&mut v).map_err(io_err(&self.file))?;
        if v.len() as u64 != self.size {
            return Err(corrupt(format!("{} is cut short", self.what)));
        }
        self.check(&r.digest())?;
        Ok(v)
    }

    fn check(&self, got: &str) -> Result<(), ImageError> {
        match &self.digest {
            Some(want) if want != got => Err(ImageError::Invalid(format!(
                "digest mismatch: {} should be {want} but is {got}; the image is corrupt or was changed",
                self.what
            ))),
            _ => Ok(()),
        }
    }
}

fn corrupt(msg: String) -> ImageError {
    ImageError::Invalid(format!("the image is not valid: {msg}"))
}

/// sha256 of what was read through it.
struct HashingReader<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hash: Sha256::new(),
        }
    }
    fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.hash.clone().finalize()))
    }
    /// Read what is left (a tar reader stops at the end-of-archive blocks).
    fn drain(&mut self) -> io::Result<()> {
        io::copy(self, &mut io::sink()).map(|_| ())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// A digest as the spec writes it; anything else is refused (it becomes a
/// path in a layout).
fn valid_digest(d: &str) -> Result<&str, ImageError> {
    match d.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(h),
        _ => Err(corrupt(format!(
            "digest {d:?} is not a sha256 digest (the only algorithm Dough takes)"
        ))),
    }
}

/// An image, resolved: its config and its layers, in order.
struct Resolved {
    manifest_digest: String,
    config_digest: String,
    config: serde_json::Value,
    layers: Vec<Blob>,
}

const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// The blob `desc` names in layout `dir`; absent is refused unless not
/// `must_exist` (a layer of a layout still being pulled).
fn layout_blob(
    dir: &Path,
    desc: &serde_json::Value,
    what: &str,
    must_exist: bool,
) -> Result<Blob, ImageError> {
    let digest = desc["digest"]
        .as_str()
        .ok_or_else(|| corrupt(format!("{what} has no digest")))?;
    let hex = valid_digest(digest)?;
    let file = dir.join("blobs/sha256").join(hex);
    if !must_exist && desc["size"].is_u64() && !file.exists() {
        return Ok(Blob {
            file,
            offset: 0,
            size: desc["size"].as_u64().unwrap_or(0),
            digest: Some(digest.to_string()),
            what: what.to_string(),
        });
    }
    let size = fs::metadata(&file)
        .map_err(|_| {
            ImageError::Invalid(format!(
                "the image is not valid: {what} {digest} is not in {}",
                dir.display()
            ))
        })?
        .len();
    if let Some(want) = desc["size"].as_u64() {
        if want != size {
            return Err(ImageError::Invalid(format!(
                "digest mismatch: {what} {digest} should be {want} bytes but is {size}; the image is corrupt or was changed"
            )));
        }
    }
    Ok(Blob {
        file,
        offset: 0,
        size,
        digest: Some(digest.to_string()),
        what: what.to_string(),
    })
}

fn json(bytes: &[u8], what: &str) -> Result<serde_json::Value, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(format!("{what} is not JSON: {e}")))
}

fn platform_of(v: &serde_json::Value) -> (String, String) {
    (
        v["os"].as_str().unwrap_or("?").to_string(),
        v["architecture"].as_str().unwrap_or("?").to_string(),
    )
}

/// The linux/amd64 entry of an index's `manifests`, or why there is none.
pub fn pick_platform(ms: &[serde_json::Value]) -> Result<serde_json::Value, ImageError> {
    if let Some(m) = ms
        .iter()
        .find(|m| platform_of(&m["platform"]) == ("linux".into(), "amd64".into()))
    {
        return Ok(m.clone());
    }
    let have: Vec<String> = ms
        .iter()
        .map(|m| {
            let (os, arch) = platform_of(&m["platform"]);
            format!("{os}/{arch}")
        })
        .collect();
    Err(ImageError::Invalid(format!(
        "the image has no linux/amd64 variant (it has {}); Dough's VMs are amd64",
        have.join(", ")
    )))
}

fn resolve_layout(
    dir: &Path,
    reference: Option<&str>,
    layers_present: bool,
) -> Result<Resolved, ImageError> {
    let layout = fs::read(dir.join("oci-layout")).map_err(|_| {
        ImageError::Invalid(format!(
            "{} is not an OCI image layout (no oci-layout file)",
            dir.display()
        ))
    })?;
    let layout = json(&layout, "oci-layout")?;
    if layout["imageLayoutVersion"].as_str() != Some("1.0.0") {
        return Err(corrupt(format!(
            "oci-layout version {} (Dough reads 1.0.0)",
            layout["imageLayoutVersion"]
        )));
    }
    let index_bytes = fs::read(dir.join("index.json")).map_err(io_err(dir.join("index.json")))?;
    let mut index = json(&index_bytes, "index.json")?;
    let mut first = true;
    // index → (nested index →) manifest
    loop {
        let mut ms: Vec<serde_json::Value> =
            index["manifests"].as_array().cloned().unwrap_or_default();
        if first {
            if let Some(r) = reference {
                ms.retain(|m| m["annotations"]["org.opencontainers.image.ref.name"] == r);
                if ms.is_empty() {
                    return Err(ImageError::Invalid(format!(
                        "{} has no image named {r:?}",
                        dir.display()
                    )));
                }
            }
        }
        first = false;
        if ms.is_empty() {
            return Err(corrupt("the index names no manifest".into()));
        }
        let pick = if ms.iter().any(|m| m["platform"].is_object()) {
            pick_platform(&ms)?
        } else if ms.len() > 1 {
            return Err(ImageError::Invalid(format!(
                "{} holds {} images: name one (--from oci:DIR:REF)",
                dir.display(),
                ms.len()
            )));
        } else {
            ms[0].clone()
        };
        let media = pick["mediaType"].as_str().unwrap_or_default().to_string();
        let blob = layout_blob(dir, &pick, "the manifest", true)?;
        let bytes = blob.read_checked(4 << 20)?;
        let v = json(&bytes, "the manifest")?;
        let media = if media.is_empty() {
            v["mediaType"].as_str().unwrap_or_default().to_string()
        } else {
            media
        };
        if INDEX_TYPES.contains(&media.as_str()) {
            index = v;
            continue;
        }
        if !MANIFEST_TYPES.contains(&media.as_str()) && !media.is_empty() {
            return Err(ImageError::Invalid(format!(
                "the manifest is a {media}, not an image manifest"
            )));
        }
        let config = layout_blob(dir, &v["config"], "the config", true)?;
        let config_bytes = config.read_checked(4 << 20)?;
        let mut layers = vec![];
        for (i, l) in v["layers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let mt = l["mediaType"].as_str().unwrap_or_default();
            if mt.contains("nondistributable") || l["urls"].is_array() {
                return Err(ImageError::Invalid(format!(
                    "layer {} is a foreign layer (to be fetched from {}); Dough imports only layers in the image",
                    i + 1,
                    l["urls"]
                )));
            }
            layers.push(layout_blob(
                dir,
                l,
                &format!("layer {}", i + 1),
                layers_present,
            )?);
        }
        return Ok(Resolved {
            manifest_digest: blob.digest.unwrap_or_default(),
            config_digest: config.digest.clone().unwrap_or_default(),
            config: json(&config_bytes, "the config")?,
            layers,
        });
    }
}

fn resolve_archive(file: &Path) -> Result<Resolved, ImageError> {
    let f = File::open(file).map_err(io_err(file))?;
    let mut ar = tar::Archive::new(BufReader::new(f));
    let mut entries = std::collections::HashMap::new();
    for e in ar
        .entries()
        .map_err(|e| corrupt(format!("{} is not a tar archive: {e}", file.display())))?
    {
        let e = e.map_err(|e| corrupt(format!("{}: {e}", file.display())))?;
        let p = e
            .path()
            .map_err(|e| corrupt(format!("{}: {e}", file.display())))?;
        let name = clean(&p).map_err(corrupt)?;
        entries.insert(name, (e.raw_file_position(), e.size()));
    }
    let entry = |name: &str, what: &str| -> Result<Blob, ImageError> {
        let key = clean(Path::new(name)).map_err(corrupt)?;
        let (offset, size) = entries
            .get(&key)
            .copied()
            .ok_or_else(|| corrupt(format!("{what} ({name}) is not in {}", file.display())))?;
        // The name of a blob is its digest in docker's formats
        // (`blobs/sha256/HEX`; before that the config was `HEX.json`).
        let name = key.to_string_lossy();
        let digest = match name.strip_prefix("blobs/sha256/") {
            Some(h) => Some(h),
            None if what == "the config" => name.strip_suffix(".json"),
            None => None,
        }
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|h| format!("sha256:{h}"));
        Ok(Blob {
            file: file.to_path_buf(),
            offset,
            size,
            digest,
            what: what.to_string(),
        })
    };
    let manifest = entry("manifest.json", "manifest.json")?;
    let manifest_bytes = manifest.read_checked(4 << 20)?;
    let list = json(&manifest_bytes, "manifest.json")?;
    let images = list.as_array().cloned().unwrap_or_default();
    if images.len() != 1 {
        return Err(ImageError::Invalid(format!(
            "{} holds {} images; Dough imports an archive of one (`docker save IMAGE`)",
            file.display(),
            images.len()
        )));
    }
    let img = &images[0];
    let config_name = img["Config"]
        .as_str()
        .ok_or_else(|| corrupt("manifest.json names no Config".into()))?;
    let config = entry(config_name, "the config")?;
    let config_bytes = config.read_checked(4 << 20)?;
    let config_digest = format!("sha256:{}", hex::encode(Sha256::digest(&config_bytes)));
    let mut layers = vec![];
    for (i, l) in img["Layers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let name = l
            .as_str()
            .ok_or_else(|| corrupt("manifest.json: a layer is not a path".into()))?;
        layers.push(entry(name, &format!("layer {}", i + 1))?);
    }
    Ok(Resolved {
        manifest_digest: format!("sha256:{}", hex::encode(Sha256::digest(&manifest_bytes))),
        config_digest,
        config: json(&config_bytes, "the config")?,
        layers,
    })
}

/// An entry's name inside the tree: relative, without `.`; `..` refused.
fn clean(p: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(x) => out.push(x),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("entry {} leaves the image's root", p.display()))
            }
        }
    }
    Ok(out)
}

/// `rel` inside `root`, every symlink on the way followed as the guest
/// would see it but clamped at `root` (a link to `/usr/bin` means the
/// tree's `usr/bin`, and `..` never climbs above it). For directories:
/// callers join the entry's own name to what this returns.
fn resolve(root: &Path, rel: &Path) -> io::Result<PathBuf> {
    let mut todo: Vec<OsString> = vec![];
    let push = |todo: &mut Vec<OsString>, p: &Path| {
        for c in p.components().rev() {
            match c {
                Component::Normal(x) => todo.push(x.to_os_string()),
                Component::ParentDir => todo.push("..".into()),
                _ => {}
            }
        }
    };
    push(&mut todo, rel);
    let mut cur = PathBuf::new();
    let mut links = 0;
    while let Some(c) = todo.pop() {
        if c == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&c);
        let full = root.join(&next);
        let is_link = fs::symlink_metadata(&full).is_ok_and(|m| m.file_type().is_symlink());
        if is_link {
            links += 1;
            if links > 40 {
                return Err(io::Error::other(format!(
                    "{}: too many levels of symbolic links",
                    rel.display()
                )));
            }
            let target = fs::read_link(&full)?;
            if target.is_absolute() {
                cur = PathBuf::new();
            }
            push(&mut todo, &target);
        } else {
            cur = next;
        }
    }
    Ok(root.join(cur))
}

/// Remove whatever is at `p` (never following a symlink); absent is fine.
fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Unpacks layers, lowest first, into a tree.
struct Applier<'a> {
    root: &'a Path,
    limits: Limits,
    bytes: u64,
    inodes: u64,
    devices: u64,
    /// Progress within a long layer: every 5 s, the bytes so far.
    say: Option<&'a mut dyn FnMut(String)>,
    said: std::time::Instant,
}

impl Applier<'_> {
    fn tell(&mut self, m: String) {
        if let Some(say) = self.say.as_mut() {
            say(m);
        }
    }

    /// One layer (gzip or plain tar). Whiteouts apply to the layers below
    /// only: what this layer made itself is never removed by them.
    fn apply(&mut self, r: impl Read, what: &str) -> Result<String, ImageError> {
        let mut r = BufReader::with_capacity(1 << 16, r);
        let head = r
            .fill_buf()
            .map_err(|e| corrupt(format!("{what}: {e}")))?
            .to_vec();
        let mut inner: Box<dyn Read + '_> = if head.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::GzDecoder::new(r))
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            return Err(ImageError::Invalid(format!(
                "{what} is zstd-compressed; Dough imports gzip and uncompressed layers (`skopeo copy --dest-compress-format gzip`)"
            )));
        } else {
            Box::new(r)
        };
        let mut plain = HashingReader::new(&mut inner);
        let mut made: HashSet<PathBuf> = HashSet::new();
        {
            let mut ar = tar::Archive::new(&mut plain);
            let entries = ar.entries().map_err(|e| corrupt(format!("{what}: {e}")))?;
            for e in entries {
                let mut e = e.map_err(|e| corrupt(format!("{what}: {e}")))?;
                self.entry(&mut e, &mut made).map_err(|m| match m {
                    ImageError::Invalid(m) if !m.starts_with("image_too_large") => {
                        corrupt(format!("{what}: {m}"))
                    }
                    other => other,
                })?;
            }
        }
        plain.drain().map_err(|e| corrupt(format!("{what}: {e}")))?;
        Ok(plain.digest())
    }

    fn entry<R: Read>(
        &mut self,
        e: &mut tar::Entry<'_, R>,
        made: &mut HashSet<PathBuf>,
    ) -> Result<(), ImageError> {
        let raw = e.path().map_err(|x| ImageError::Invalid(x.to_string()))?;
        let path = clean(&raw).map_err(ImageError::Invalid)?;
        let Some(name) = path.file_name().map(|n| n.to_os_string()) else {
            return Ok(()); // the root itself
        };
        let parent_rel = path.parent().unwrap_or(Path::new(""));
        let parent = resolve(self.root, parent_rel).map_err(io_err(parent_rel))?;
        let io = |p: &Path| io_err(p.to_path_buf());
        let n = name.to_string_lossy();
        if let Some(hidden) = n.strip_prefix(".wh.") {
            if hidden == ".wh..opq" {
                for c in fs::read_dir(&parent).into_iter().flatten().flatten() {
                    if !made.contains(&c.path()) {
                        remove_any(&c.path()).map_err(io(&c.path()))?;
                    }
                }
            } else {
                let target = parent.join(hidden);
                if !made.contains(&target) {
                    remove_any(&target).map_err(io(&target))?;
                }
            }
            return Ok(());
        }
        if !parent.is_dir() {
            if fs::symlink_metadata(&parent).is_ok() {
                remove_any(&parent).map_err(io(&parent))?;
            }
            fs::create_dir_all(&parent).map_err(io(&parent))?;
        }
        let target = parent.join(&name);
        let h = e.header();
        let mode = h.mode().unwrap_or(0o644) & 0o7777;
        let uid = h.uid().unwrap_or(0) as u32;
        let gid = h.gid().unwrap_or(0) as u32;
        let mtime = h.mtime().ok();
        let kind = h.entry_type();
        self.inodes += 1;
        self.bytes += 4096;
        match kind {
            tar::EntryType::Directory => {
                if !fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                    remove_any(&target).map_err(io(&target))?;
                    fs::create_dir(&target).map_err(io(&target))?;
                }
                std::os::unix::fs::lchown(&target, Some(uid), Some(gid)).map_err(io(&target))?;
                fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                    .map_err(io(&target))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = e.size();
                self.bytes += size;
                self.check_size()?;
                if self.said.elapsed() > Duration::from_secs(5) {
                    self.said = std::time::Instant::now();
                    let b = self.bytes >> 20;
                    self.tell(format!("import: {b} MiB of files unpacked"));
                }
                remove_any(&target).map_err(io(&target))?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&target)
                    .map_err(io(&target))?;
                let copied = io::copy(e, &mut f)
                    .map_err(|x| ImageError::Invalid(format!("{}: {x}", path.display())))?;
                if copied != size {
                    return Err(ImageError::Invalid(format!(
                        "{} is cut short",
                        path.display()
                    )));
                }
                // Owner first: a chown clears the setuid and setgid bits.
                std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(io(&target))?;
                f.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(io(&target))?;
                if let Some(t) = mtime {
                    let _ = f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(t));
                }
            }
            tar::EntryType::Symlink => {
                let to = e
                    .link_name()
                    .map_err(|x| ImageError::Invalid(x.to_string()))?
                    .ok_or_else(|| {
                        ImageError::Invalid(format!("symlink {} has no target", path.display()))
                    })?;
                remove_any(&target).map_err(io(&target))?;
                std::os::unix::fs::symlink(&to, &target).map_err(io(&target))?;
                std::os::unix::fs::lchown(&target, Some(uid), Some(gid)).map_err(io(&target))?;
            }
            tar::EntryType::Link => {
                let to = e
                    .link_name()
                    .map_err(|x| ImageError::Invalid(x.to_string()))?
                    .ok_or_else(|| {
                        ImageError::Invalid(format!("hard link {} has no target", path.display()))
                    })?;
                let to = clean(&to).map_err(ImageError::Invalid)?;
                let src_dir = resolve(self.root, to.parent().unwrap_or(Path::new("")))
                    .map_err(io_err(&to))?;
                let src = src_dir.join(to.file_name().unwrap_or_default());
                if src == target {
                    return Ok(());
                }
                if !fs::symlink_metadata(&src).is_ok_and(|m| !m.is_dir()) {
                    return Err(ImageError::Invalid(format!(
                        "hard link {} names {}, which the layers do not hold",
                        path.display(),
                        to.display()
                    )));
                }
                remove_any(&target).map_err(io(&target))?;
                fs::hard_link(&src, &target).map_err(io(&target))?;
                self.inodes -= 1;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                self.devices += 1;
                return Ok(());
            }
            // Metadata entries the tar reader folds into the next entry, and
            // kinds an image has no use for.
            _ => return Ok(()),
        }
        made.insert(target);
        Ok(())
    }

    fn check_size(&self) -> Result<(), ImageError> {
        if self.bytes > self.limits.max_bytes {
            return Err(ImageError::Invalid(format!(
                "image_too_large: the image unpacks to more than the limit of {} MiB (--max-size); nothing was kept",
                self.limits.max_bytes >> 20
            )));
        }
        Ok(())
    }
}

/// What Dough adds to an imported tree, as text: part of the base's key.
const ADDITIONS: &str = "additions/1: init, user dough 1000:1000 (/home/dough, /work), /tmp 1777, mount points, resolv.conf, hostname, hosts";

/// Add what Dough's guest needs to the tree at `root`: its init (`agent`),
/// the task user when the image has none, the mount points, the resolver.
fn add_guest_needs(root: &Path, agent: &Path) -> Result<(), ImageError> {
    let at = |rel: &str| -> Result<PathBuf, ImageError> {
        let p = Path::new(rel);
        let dir = resolve(root, p.parent().unwrap_or(Path::new(""))).map_err(io_err(p))?;
        if !dir.is_dir() {
            remove_any(&dir).map_err(io_err(&dir))?;
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(dir.join(p.file_name().unwrap_or_default()))
    };
    let dir = |rel: &str, mode: u32, owner: u32| -> Result<(), ImageError> {
        let p = at(rel)?;
        if !fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
            remove_any(&p).map_err(io_err(&p))?;
            fs::create_dir(&p).map_err(io_err(&p))?;
            std::os::unix::fs::lchown(&p, Some(owner), Some(owner)).map_err(io_err(&p))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(io_err(&p))?;
        }
        Ok(())
    };
    let write = |rel: &str, text: &[u8], mode: u32| -> Result<(), ImageError> {
        let p = at(rel)?;
        remove_any(&p).map_err(io_err(&p))?;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .map_err(io_err(&p))?;
        io::Write::write_all(&mut f, text).map_err(io_err(&p))?;
        std::os::unix::fs::fchown(&f, Some(0), Some(0)).map_err(io_err(&p))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err(&p))
    };
    for d in ["proc", "sys", "dev", "run", "mnt", "etc", "root", "home"] {
        dir(d, 0o755, 0)?;
    }
    dir("tmp", 0o1777, 0)?;
    let agent_bytes = fs::read(agent).map_err(io_err(agent))?;
    write(
        crate::ROOT_INIT.trim_start_matches('/'),
        &agent_bytes,
        0o755,
    )?;
    // The task user: uid and gid 1000, as in Dough's own rootfs.
    let read = |rel: &str| at(rel).ok().and_then(|p| fs::read_to_string(p).ok());
    let has = |text: &Option<String>, name: &str| {
        text.as_deref()
            .is_some_and(|t| t.lines().any(|l| l.split(':').next() == Some(name)))
    };
    let passwd = read("etc/passwd");
    let group = read("etc/group");
    let mut passwd_text = passwd.clone().unwrap_or_default();
    if !has(&passwd, "root") {
        passwd_text.push_str("root:x:0:0:root:/root:/bin/sh\n");
    }
    if !has(&passwd, "dough") {
        passwd_text.push_str("dough:x:1000:1000:Dough task user:/home/dough:/bin/sh\n");
    }
    let mut group_text = group.clone().unwrap_or_default();
    if !has(&group, "root") {
        group_text.push_str("root:x:0:\n");
    }
    if !has(&group, "dough") {
        group_text.push_str("dough:x:1000:\n");
    }
    for (rel, old, new) in [
        ("etc/passwd", passwd, passwd_text),
        ("etc/group", group, group_text),
    ] {
        if old.as_deref() != Some(&new) {
            let new = if new.ends_with('\n') || new.is_empty() {
                new
            } else {
                format!("{new}\n")
            };
            write(rel, new.as_bytes(), 0o644)?;
        }
    }
    dir("home/dough", 0o755, 1000)?;
    dir("work", 0o755, 1000)?;
    write("etc/resolv.conf", b"nameserver 172.16.0.1\n", 0o644)?;
    write("etc/hostname", b"dough\n", 0o644)?;
    write("etc/hosts", b"127.0.0.1\tlocalhost\n", 0o644)?;
    Ok(())
}

/// Whether the tree has an executable `/bin/sh` (symlinks followed inside it).
fn has_shell(root: &Path) -> bool {
    let mut p = PathBuf::from("bin/sh");
    for _ in 0..40 {
        let Ok(dir) = resolve(root, p.parent().unwrap_or(Path::new(""))) else {
            return false;
        };
        let full = dir.join(p.file_name().unwrap_or_default());
        match fs::symlink_metadata(&full) {
            Ok(m) if m.file_type().is_symlink() => {
                let Ok(t) = fs::read_link(&full) else {
                    return false;
                };
                let rel = full.strip_prefix(root).unwrap_or(&full).to_path_buf();
                p = if t.is_absolute() {
                    t.strip_prefix("/").unwrap_or(&t).to_path_buf()
                } else {
                    rel.parent().unwrap_or(Path::new("")).join(t)
                };
            }
            Ok(m) => return m.is_file() && m.mode() & 0o111 != 0,
            Err(_) => return false,
        }
    }
    false
}

/// The base's key: what its rootfs depends on (the image's config names
/// its layers' content) and what Dough adds.
pub fn rootfs_inputs(config_digest: &str) -> String {
    crate::sha256_hex(format!("oci/1\n{config_digest}\n{ADDITIONS}").as_bytes())
}

/// Resolve `src`, check it, and make `out` (an ext4 file) from its layers
/// plus Dough's guest needs, unpacking in `scratch` (removed after, also on
/// failure). `say` gets progress lines.
pub fn import(
    src: &Source,
    agent: &Path,
    scratch: &Path,
    out: &Path,
    limits: Limits,
    say: &mut dyn FnMut(String),
) -> Result<OciInfo, ImageError> {
    let r = resolve_source(src, true)?;
    let result = unpack_and_mkfs(src, &r, agent, scratch, out, limits, say);
    let _ = fs::remove_dir_all(scratch);
    if result.is_err() {
        let _ = fs::remove_file(out);
    }
    result
}

/// The config's digest of `src` (what names its content), checked: the
/// manifest and config only (a layout being pulled has no layers yet).
pub fn resolve_source_digest(src: &Source) -> Result<String, ImageError> {
    Ok(resolve_source(src, false)?.config_digest)
}

fn resolve_source(src: &Source, layers: bool) -> Result<Resolved, ImageError> {
    let r = match src {
        Source::Layout { dir, reference } => {
            if !dir.is_dir() {
                return Err(ImageError::Invalid(format!(
                    "--from oci:{}: no such directory",
                    dir.display()
                )));
            }
            resolve_layout(dir, reference.as_deref(), layers)?
        }
        Source::DockerArchive(f) => {
            if !f.is_file() {
                return Err(ImageError::Invalid(format!(
                    "--from docker-archive:{}: no such file",
                    f.display()
                )));
            }
            resolve_archive(f)?
        }
        Source::Registry(r) => {
            return Err(ImageError::Invalid(format!(
                "docker://{r}: pull it into a layout first"
            )))
        }
    };
    let (os, arch) = platform_of(&r.config);
    if (os.as_str(), arch.as_str()) != ("linux", "amd64") {
        return Err(ImageError::Invalid(format!(
            "the image is for {os}/{arch}; Dough's VMs run linux/amd64"
        )));
    }
    let diff_ids = r.config["rootfs"]["diff_ids"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if diff_ids.len() != r.layers.len() {
        return Err(corrupt(format!(
            "the manifest has {} layers but the config {}",
            r.layers.len(),
            diff_ids.len()
        )));
    }
    Ok(r)
}

fn unpack_and_mkfs(
    src: &Source,
    r: &Resolved,
    agent: &Path,
    scratch: &Path,
    out: &Path,
    limits: Limits,
    say: &mut dyn FnMut(String),
) -> Result<OciInfo, ImageError> {
    let _ = fs::remove_dir_all(scratch);
    fs::create_dir_all(scratch).map_err(io_err(scratch))?;
    fs::set_permissions(scratch, fs::Permissions::from_mode(0o755)).map_err(io_err(scratch))?;
    let diff_ids: Vec<String> = r.config["rootfs"]["diff_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect();
    let mut ap = Applier {
        root: scratch,
        limits,
        bytes: 0,
        inodes: 0,
        devices: 0,
        say: Some(say),
        said: std::time::Instant::now(),
    };
    let total: u64 = r.layers.iter().map(|l| l.size).sum();
    let mut done = 0u64;
    let t = std::time::Instant::now();
    for (i, (layer, diff_id)) in r.layers.iter().zip(&diff_ids).enumerate() {
        ap.tell(format!(
            "import: layer {}/{}: {} MiB ({} of {} MiB read)",
            i + 1,
            r.layers.len(),
            layer.size >> 20,
            done >> 20,
            total >> 20
        ));
        let mut blob = layer.open()?;
        let got = ap.apply(&mut blob, &layer.what)?;
        blob.drain().map_err(io_err(&layer.file))?;
        layer.check(&blob.digest())?;
        if &got != diff_id {
            return Err(ImageError::Invalid(format!(
                "digest mismatch: {} unpacks to {got}, the config says {diff_id}; the image is corrupt or was changed",
                layer.what
            )));
        }
        done += layer.size;
    }
    let unpack_ms = t.elapsed().as_millis() as u64;
    let secs = t.elapsed().as_secs_f64().max(0.001);
    ap.tell(format!(
        "import: {} layers, {} MiB of files in {:.1} s ({:.0} MB/s of layers)",
        r.layers.len(),
        ap.bytes >> 20,
        secs,
        done as f64 / 1e6 / secs
    ));
    if !has_shell(scratch) {
        return Err(ImageError::Invalid(
            "the image has no /bin/sh: Dough runs build steps and repository tasks with it".into(),
        ));
    }
    add_guest_needs(scratch, agent)?;
    let size_mb = ap.bytes / (1 << 20) * 5 / 4 + 64 + (agent_size(agent) >> 20);
    let inodes = ap.inodes * 5 / 4 + 4096;
    ap.tell(format!(
        "import: mkfs.ext4 -d ({} MiB of files, {size_mb} MiB file system)",
        ap.bytes >> 20
    ));
    let tmp = out.with_extension("ext4.tmp");
    let _ = fs::remove_file(&tmp);
    let t = std::time::Instant::now();
    if let Err(detail) =
        crate::mkfs_ext4_from(scratch, &tmp, size_mb, Some("dough-base"), Some(inodes))
    {
        let _ = fs::remove_file(&tmp);
        return Err(ImageError::Command {
            command: "mkfs.ext4 -d".into(),
            detail,
        });
    }
    fs::rename(&tmp, out).map_err(io_err(out))?;
    let mkfs_ms = t.elapsed().as_millis() as u64;
    Ok(OciInfo {
        source: src.describe(),
        manifest_digest: r.manifest_digest.clone(),
        config_digest: r.config_digest.clone(),
        layers: r.layers.len(),
        bytes: ap.bytes,
        env: r.config["config"]["Env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        skipped_devices: ap.devices,
        unpack_ms,
        mkfs_ms,
    })
}

fn agent_size(p: &Path) -> u64 {
    fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(entries: &[(&str, tar::EntryType, &[u8], u32, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, mode, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(*mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_size(data.len() as u64);
            // Raw names: the builder refuses `..`, which these tests need.
            let old = h.as_old_mut();
            old.name[..path.len()].copy_from_slice(path.as_bytes());
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn apply(root: &Path, layers: &[Vec<u8>]) -> Result<(), ImageError> {
        let mut ap = Applier {
            root,
            limits: Limits { max_bytes: 1 << 30 },
            bytes: 0,
            inodes: 0,
            devices: 0,
            say: None,
            said: std::time::Instant::now(),
        };
        for l in layers {
            ap.apply(&l[..], "layer")?;
        }
        Ok(())
    }

    use tar::EntryType as T;

    /// Whiteouts remove what lower layers hold, never what their own layer
    /// made; an opaque directory hides all of the lower one's entries.
    #[test]
    fn whiteouts_apply_to_lower_layers_only() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        apply(
            root,
            &[
                layer(&[
                    ("a/", T::Directory, b"", 0o755, ""),
                    ("a/gone", T::Regular, b"x", 0o644, ""),
                    ("a/kept", T::Regular, b"x", 0o644, ""),
                    ("o/", T::Directory, b"", 0o755, ""),
                    ("o/old", T::Regular, b"x", 0o644, ""),
                ]),
                layer(&[
                    ("a/.wh.gone", T::Regular, b"", 0o644, ""),
                    ("o/new", T::Regular, b"y", 0o644, ""),
                    ("o/.wh..wh..opq", T::Regular, b"", 0o644, ""),
                    ("b", T::Regular, b"1", 0o644, ""),
                    (".wh.b", T::Regular, b"", 0o644, ""),
                ]),
            ],
        )
        .unwrap();
        assert!(!root.join("a/gone").exists());
        assert!(root.join("a/kept").exists());
        assert!(!root.join("o/old").exists());
        assert_eq!(fs::read(root.join("o/new")).unwrap(), b"y");
        assert!(
            root.join("b").exists(),
            "a whiteout hid its own layer's file"
        );
        assert!(!root.join("a/.wh.gone").exists());
    }

    /// Entries never land outside the tree: `..` is refused, and a symlink
    /// to an absolute directory is followed inside the tree, not the host's.
    #[test]
    fn nothing_is_written_outside_the_tree() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        fs::create_dir(&root).unwrap();
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let e = apply(
            &root,
            &[layer(&[("../escape", T::Regular, b"x", 0o644, "")])],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("leaves the image's root"), "{e}");
        assert!(!d.path().join("escape").exists());
        let abs = outside.to_str().unwrap().to_string();
        apply(
            &root,
            &[
                layer(&[("link", T::Symlink, b"", 0o777, &abs)]),
                layer(&[("link/file", T::Regular, b"x", 0o644, "")]),
                layer(&[("up", T::Symlink, b"", 0o777, "../../..")]),
                layer(&[("up/file2", T::Regular, b"x", 0o644, "")]),
            ],
        )
        .unwrap();
        assert!(!outside.join("file").exists(), "wrote through a symlink");
        assert!(root.join(abs.trim_start_matches('/')).join("file").exists());
        assert!(root.join("file2").exists(), "`..` climbed above the root");
        assert!(!d.path().join("file2").exists());
        // A file over a symlink replaces the link; the target is untouched.
        fs::write(outside.join("t"), b"keep").unwrap();
        apply(
            &root,
            &[
                layer(&[(
                    "l2",
                    T::Symlink,
                    b"",
                    0o777,
                    outside.join("t").to_str().unwrap(),
                )]),
                layer(&[("l2", T::Regular, b"new", 0o644, "")]),
            ],
        )
        .unwrap();
        assert_eq!(fs::read(outside.join("t")).unwrap(), b"keep");
        assert_eq!(fs::read(root.join("l2")).unwrap(), b"new");
    }

    /// setuid bits, hard links and symlinks are kept; the size limit is
    /// `image_too_large`.
    #[test]
    fn modes_links_and_the_size_limit() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        apply(
            root,
            &[layer(&[
                ("bin/", T::Directory, b"", 0o755, ""),
                ("bin/su", T::Regular, b"#!", 0o4755, ""),
                ("bin/again", T::Link, b"", 0o4755, "bin/su"),
                ("bin/sh", T::Symlink, b"", 0o777, "su"),
            ])],
        )
        .unwrap();
        let m = fs::metadata(root.join("bin/su")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o4755);
        assert_eq!(m.ino(), fs::metadata(root.join("bin/again")).unwrap().ino());
        assert_eq!(fs::read_link(root.join("bin/sh")).unwrap(), Path::new("su"));
        assert!(has_shell(root));
        let big = vec![0u8; 3 << 20];
        let mut ap = Applier {
            root,
            limits: Limits { max_bytes: 2 << 20 },
            bytes: 0,
            inodes: 0,
            devices: 0,
            say: None,
            said: std::time::Instant::now(),
        };
        let e = ap
            .apply(
                &layer(&[("big", T::Regular, &big, 0o644, "")])[..],
                "layer 1",
            )
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("image_too_large"), "{e}");
        assert!(!root.join("big").exists());
    }

    #[test]
    fn sources_by_transport() {
        assert_eq!(Source::parse("py").unwrap(), None);
        assert_eq!(
            Source::parse("docker-archive:/x.tar").unwrap(),
            Some(Source::DockerArchive("/x.tar".into()))
        );
        assert_eq!(
            Source::parse("oci:/nope").unwrap(),
            Some(Source::Layout {
                dir: "/nope".into(),
                reference: None
            })
        );
        let d = tempfile::tempdir().unwrap();
        let with_ref = format!("oci:{}:v1", d.path().display());
        assert_eq!(
            Source::parse(&with_ref).unwrap(),
            Some(Source::Layout {
                dir: d.path().into(),
                reference: Some("v1".into())
            })
        );
        assert_eq!(
            Source::parse("docker.io/library/alpine:3").unwrap(),
            Some(Source::Registry("docker.io/library/alpine:3".into()))
        );
        assert_eq!(
            Source::parse("docker://alpine").unwrap(),
            Some(Source::Registry("alpine".into()))
        );
        assert!(Source::parse("oci:").is_err());
    }
}
