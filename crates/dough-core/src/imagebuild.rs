//! **Where a named image is built from steps run in microVMs.**
//!
//! `dough image build NAME --packages … --run … [--from IMAGE]`: every step
//! is a task, as root, in a VM of the image so far (the base plus the
//! layers of the steps before it), with the network of a task. Nothing of
//! a step runs on the host. When the step exits 0 its command ends with a
//! `sync` and the agent powers the VM off; the VM's scratch disk — the
//! overlay's upper layer, whiteouts and opaque directories as the guest
//! kernel wrote them — becomes the step's read-only **layer**. The host
//! never mounts or parses it: the next VM gets it as one more read-only
//! drive and the agent stacks its `upper/` over the base
//! (`dough.layers=N`; `dough-agent/src/init.rs`).
//!
//! Layers are kept by key in `<state>/images/.layers/<key>.ext4`, where the
//! key hashes the base image's digest and every step up to this one: an
//! unchanged build runs no VM, and changing the last step reruns only that
//! step. An image is a directory with the base's kernel, initramfs and
//! rootfs (hard links) and a manifest naming its layers; it replaces the
//! previous image of that name in one `renameat2(RENAME_EXCHANGE)`, only
//! after every step succeeded, so a failing or interrupted build leaves the
//! previous image usable.
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dough_image::{valid_name, BaseRef, Image, ImageError, Layer};
use dough_net::Egress;

use crate::supervisor::{Event, Outcome, RunError, TaskSpec};
use crate::HostConfig;

/// One build step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Certificate authorities the guest trusts from now on (kept in
    /// `/usr/local/share/ca-certificates/dough/` and appended to
    /// `/etc/ssl/certs/ca-certificates.crt`): for hosts behind a
    /// TLS-intercepting proxy. (file name, PEM text)
    TrustCas(Vec<(String, String)>),
    /// Debian packages, installed with apt in the VM.
    Packages(Vec<String>),
    /// Files of the host put in the image (`--copy HOST:GUEST`): `src` is
    /// handed to the step's VM as a read-only layer of its own (made on the
    /// host with `mkfs.ext4 -d`, never mounted there) and copied into place
    /// inside the VM, so the directories it lands in keep the image's
    /// owners and modes. The copy keeps the host's modes and is owned by
    /// the owner of the directory it lands in (the task user's in
    /// `/home/dough`, root's in `/usr/local/bin`). `digest` names the
    /// content ([`content_digest`]).
    Copy {
        src: PathBuf,
        dest: String,
        digest: String,
    },
    /// A shell command (`sh -c`), as root, with these variables.
    Run {
        cmd: String,
        env: Vec<(String, String)>,
    },
}

impl Step {
    /// The step as the manifest records it and its key hashes.
    pub fn describe(&self) -> String {
        match self {
            Step::TrustCas(cas) => {
                let named: Vec<String> = cas
                    .iter()
                    .map(|(n, pem)| {
                        format!("{n} {}", &dough_image::sha256_hex(pem.as_bytes())[..12])
                    })
                    .collect();
                format!("trust CAs: {}", named.join(", "))
            }
            Step::Packages(p) => format!("packages: {}", p.join(",")),
            Step::Copy { dest, digest, .. } => format!("copy: {dest} ({})", &digest[..16]),
            Step::Run { cmd, env } if env.is_empty() => format!("run: {cmd}"),
            Step::Run { cmd, env } => {
                let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("run: {cmd}\nenv: {}", env.join(" "))
            }
        }
    }

    /// What the VM runs. It ends with `sync`, so the layer is on its disk
    /// when the agent powers off; the step's own exit code is kept.
    fn command(&self) -> Vec<String> {
        let body = match self {
            Step::TrustCas(cas) => {
                let mut b = String::from(
                    "set -e; d=/usr/local/share/ca-certificates/dough; mkdir -p \"$d\" /etc/ssl/certs",
                );
                for (i, _) in cas.iter().enumerate() {
                    b.push_str(&format!(
                        "; printf '%s\\n' \"$DOUGH_CA_{i}\" > \"$d/ca-{i}.crt\""
                    ));
                }
                // Appended to the bundle every TLS library here reads
                // (update-ca-certificates would rehash all ~140 system
                // CAs: ~100 s under TCG); a later run of it keeps them,
                // as they sit in its local directory.
                b.push_str("; cat \"$d\"/ca-*.crt >> /etc/ssl/certs/ca-certificates.crt; echo \"trusting $(ls \"$d\" | wc -l) more CAs\"");
                b
            }
            Step::Packages(p) => format!(
                "export DEBIAN_FRONTEND=noninteractive; apt-get update -q && apt-get install -y -q --no-install-recommends {} && apt-get clean && rm -rf /var/lib/apt/lists/*",
                p.join(" ")
            ),
            Step::Copy { dest, .. } => format!(
                "set -e; d='{dest}'; rm -rf \"$d\"; mkdir -p \"$(dirname \"$d\")\"; cp -a {COPY_PAYLOAD} \"$d\"; chown -R -h \"$(stat -c %u:%g \"$(dirname \"$d\")\")\" \"$d\"; echo \"copied $(find \"$d\" | wc -l) entries to $d\""
            ),
            Step::Run { cmd, .. } => cmd.clone(),
        };
        vec![
            "sh".into(),
            "-c".into(),
            format!("(\n{body}\n)\nrc=$?\nsync\nexit $rc"),
        ]
    }

    fn env(&self) -> Vec<(String, String)> {
        match self {
            Step::TrustCas(cas) => cas
                .iter()
                .enumerate()
                .map(|(i, (_, pem))| (format!("DOUGH_CA_{i}"), pem.clone()))
                .collect(),
            Step::Packages(_) | Step::Copy { .. } => vec![],
            Step::Run { env, .. } => env.clone(),
        }
    }
}

/// Where a copy step's VM sees the files it copies (its extra layer's
/// `upper/` holds this path; the step's own layer never does).
const COPY_PAYLOAD: &str = "/.dough-copy/payload";

/// A `--copy HOST:GUEST` as a step: GUEST absolute, HOST present; the
/// content hashed ([`content_digest`]).
pub fn copy_step(arg: &str) -> Result<Step, BuildError> {
    let (src, dest) = arg
        .rsplit_once(':')
        .ok_or_else(|| BuildError::Invalid(format!("--copy {arg:?}: give HOST_PATH:GUEST_PATH")))?;
    let dest_ok = dest.starts_with('/')
        && dest.len() > 1
        && !dest.ends_with('/')
        && dest
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'\'' && b != b'\\')
        && !dest.split('/').any(|c| c == ".." || c == ".");
    if !dest_ok {
        return Err(BuildError::Invalid(format!(
            "--copy {arg:?}: the guest path must be absolute, not `/`, without `.`, `..`, quotes or spaces"
        )));
    }
    let src = PathBuf::from(src);
    if std::fs::symlink_metadata(&src).is_err() {
        return Err(BuildError::Invalid(format!(
            "--copy {arg:?}: {} does not exist",
            src.display()
        )));
    }
    let digest = content_digest(&src)?;
    Ok(Step::Copy {
        src,
        dest: dest.to_string(),
        digest,
    })
}

/// sha256 over a file or tree: each entry's path (relative), kind, mode
/// and content or link target, in name order. Owners and times are not
/// part of it (the copy is root's).
pub fn content_digest(src: &Path) -> Result<String, BuildError> {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        // (`join("")` would add a `/`, which a file refuses.)
        let p = if rel.as_os_str().is_empty() {
            src.to_path_buf()
        } else {
            src.join(&rel)
        };
        let m = std::fs::symlink_metadata(&p).map_err(io(format!("read {}", p.display())))?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777;
        h.update(format!("{}\0{mode:o}\0", rel.display()).as_bytes());
        if m.file_type().is_symlink() {
            let t = std::fs::read_link(&p).map_err(io(format!("read {}", p.display())))?;
            h.update(format!("link\0{}\0", t.display()).as_bytes());
        } else if m.is_dir() {
            h.update(b"dir\0");
            let mut names: Vec<_> = std::fs::read_dir(&p)
                .map_err(io(format!("read {}", p.display())))?
                .flatten()
                .map(|e| e.file_name())
                .collect();
            names.sort();
            // Popped in name order.
            stack.extend(names.into_iter().rev().map(|n| rel.join(n)));
        } else if m.is_file() {
            h.update(format!("file\0{}\0", m.len()).as_bytes());
            let mut f = std::fs::File::open(&p).map_err(io(format!("read {}", p.display())))?;
            std::io::copy(&mut f, &mut h).map_err(io(format!("read {}", p.display())))?;
        } else {
            return Err(BuildError::Invalid(format!(
                "--copy: {} is neither a file, a directory nor a symlink",
                p.display()
            )));
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The read-only layer a copy step's VM gets: `upper/.dough-copy/payload`
/// holding `src` (root's, the host's modes), made with `mkfs.ext4 -d`.
fn copy_layer(src: &Path, tree: &Path, out: &Path) -> Result<(), BuildError> {
    let _ = std::fs::remove_dir_all(tree);
    let payload = tree.join(format!("upper{COPY_PAYLOAD}"));
    std::fs::create_dir_all(payload.parent().unwrap_or(tree))
        .map_err(io(format!("create {}", tree.display())))?;
    let mut bytes = 0u64;
    if let Err(e) = copy_tree(src, &payload, &mut bytes) {
        let _ = std::fs::remove_dir_all(tree);
        return Err(e);
    }
    let size_mb = bytes / (1 << 20) * 5 / 4 + 16;
    let made = dough_image::mkfs_ext4_from(tree, out, size_mb, None, None);
    let _ = std::fs::remove_dir_all(tree);
    if let Err(e) = made {
        let _ = std::fs::remove_file(out);
        return Err(BuildError::Invalid(format!(
            "--copy {}: mkfs.ext4 -d failed: {e}",
            src.display()
        )));
    }
    std::fs::set_permissions(out, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .map_err(io(format!("chmod {}", out.display())))
}

fn copy_tree(from: &Path, to: &Path, bytes: &mut u64) -> Result<(), BuildError> {
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::symlink_metadata(from).map_err(io(format!("read {}", from.display())))?;
    if m.file_type().is_symlink() {
        let t = std::fs::read_link(from).map_err(io(format!("read {}", from.display())))?;
        std::os::unix::fs::symlink(t, to).map_err(io(format!("create {}", to.display())))?;
        return Ok(());
    }
    if m.is_dir() {
        std::fs::create_dir(to).map_err(io(format!("create {}", to.display())))?;
        for e in std::fs::read_dir(from)
            .map_err(io(format!("read {}", from.display())))?
            .flatten()
        {
            copy_tree(&e.path(), &to.join(e.file_name()), bytes)?;
        }
    } else {
        *bytes += m.len() + 4096;
        std::fs::copy(from, to).map_err(io(format!("copy {}", from.display())))?;
    }
    std::fs::set_permissions(
        to,
        std::fs::Permissions::from_mode(m.permissions().mode() & 0o7777),
    )
    .map_err(io(format!("chmod {}", to.display())))?;
    std::os::unix::fs::lchown(to, Some(0), Some(0)).map_err(io(format!("chown {}", to.display())))
}

/// The certificates in `path` (a PEM file, or a directory of `*.crt`
/// files, as `/usr/local/share/ca-certificates` is), as (name, PEM) pairs.
/// Anything that is not a PEM certificate is refused.
pub fn read_cas(path: &Path) -> Result<Vec<(String, String)>, BuildError> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io(format!("read {}", path.display())))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "crt"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    files
        .into_iter()
        .map(|f| {
            let pem = std::fs::read_to_string(&f).map_err(io(format!("read {}", f.display())))?;
            let pem = pem.trim().to_string();
            if !pem.starts_with("-----BEGIN CERTIFICATE-----")
                || !pem.ends_with("-----END CERTIFICATE-----")
                || pem.len() > 64 << 10
            {
                return Err(BuildError::Invalid(format!(
                    "{}: not a PEM certificate (-----BEGIN CERTIFICATE----- …)",
                    f.display()
                )));
            }
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok((name, pem))
        })
        .collect()
}

/// Where Debian keeps the certificate authorities an administrator added:
/// on hosts behind a TLS-intercepting proxy, its CA is here.
pub const HOST_LOCAL_CAS: &str = "/usr/local/share/ca-certificates";

/// A Debian package name, optionally `=VERSION` (what apt-get install
/// takes, and nothing a shell would read as more).
pub fn valid_package(p: &str) -> Result<(), BuildError> {
    let (name, version) = p.split_once('=').unwrap_or((p, ""));
    let name_ok = name.len() >= 2
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
    let version_ok = p.contains('=') != version.is_empty()
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.~:".contains(&b));
    if name_ok && version_ok {
        Ok(())
    } else {
        Err(BuildError::Invalid(format!(
            "package {p:?}: a Debian package name (a-z 0-9 + - .), optionally =VERSION"
        )))
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    pub name: String,
    /// The image it is built on (`default` unless `--from`).
    pub from: String,
    pub steps: Vec<Step>,
    /// The steps' network (as for a task).
    pub network: Egress,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Each step's scratch disk: the most its layer can hold.
    pub disk_mib: u64,
    /// Each step's time limit.
    pub step_timeout: Duration,
    /// The most bytes of files an OCI image (`from` = `oci:…` or
    /// `docker-archive:…`) may unpack to: over it, `image_too_large`.
    pub max_import_bytes: u64,
    /// Pull `from` (a registry reference) over plain HTTP.
    pub plain_http: bool,
}

/// Why a build failed. The previous image of the name is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("step {n} ({step}) failed: {how}")]
    StepFailed { n: usize, step: String, how: String },
    #[error("step {n} ({step}): the vm failed")]
    Vm {
        n: usize,
        step: String,
        #[source]
        source: RunError,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Io { what, source }
}

/// What happened to each step and to the image.
#[derive(Debug)]
pub struct Built {
    pub image: Image,
    /// Steps whose layer was already in the store.
    pub cached: usize,
    /// The image of that name was already exactly this.
    pub unchanged: bool,
}

/// What a layer built on `m` depends on: the base rootfs's contents (named
/// by the inputs it was bootstrapped from) and the layers already over it.
/// Not the kernels, and not the agent Dough writes into the rootfs as its
/// init: a step changes neither, so rebuilding Dough (a new agent) keeps
/// every cached layer, as the kernel compile is kept.
pub fn base_identity(m: &dough_image::Manifest) -> String {
    let mut text = format!("rootfs {}\n", m.rootfs.inputs);
    for l in &m.layers {
        text.push_str(&format!("layer {}\n", l.key));
    }
    dough_image::sha256_hex(text.as_bytes())
}

/// The keys of `steps` over a base of this identity ([`base_identity`]).
pub fn layer_keys(base: &str, steps: &[Step]) -> Vec<String> {
    let mut prev = dough_image::sha256_hex(format!("layer/1\n{base}").as_bytes());
    steps
        .iter()
        .map(|s| {
            prev = dough_image::sha256_hex(format!("{prev}\n{}", s.describe()).as_bytes());
            prev.clone()
        })
        .collect()
}

/// Build `spec` (see the module doc). `on_event` gets each step's live
/// output and progress lines; `cancel` ends the step running (its VM torn
/// down, nothing kept).
pub async fn build(
    host: &HostConfig,
    spec: &BuildSpec,
    on_event: &mut (dyn FnMut(Event<'_>) + Send),
    cancel: impl std::future::Future<Output = i32>,
) -> Result<Built, BuildError> {
    valid_name(&spec.name)?;
    if spec.name == dough_image::DEFAULT_IMAGE {
        return Err(BuildError::Invalid(
            "`default` is Dough's base image (`dough image build` without steps); name the image to build on it".into(),
        ));
    }
    let oci = dough_image::oci::Source::parse(&spec.from)?;
    if spec.steps.is_empty() && oci.is_none() {
        return Err(BuildError::Invalid(
            "nothing to build: give --from oci:…, --packages, --run or --ca-file".into(),
        ));
    }
    for s in &spec.steps {
        if let Step::Packages(p) = s {
            if p.is_empty() {
                return Err(BuildError::Invalid("--packages names no package".into()));
            }
            p.iter().try_for_each(|p| valid_package(p))?;
        }
    }
    let state = &host.state_dir;
    let base = match &oci {
        Some(src) => import_base(host, src, spec, on_event).await?,
        None => {
            valid_name(&spec.from)?;
            let base_dir = if spec.from == dough_image::DEFAULT_IMAGE {
                host.image_dir.clone()
            } else {
                Image::named(state, &spec.from)
            };
            Image::load(&base_dir).map_err(|e| match e {
                ImageError::NotBuilt(_) => BuildError::Invalid(format!(
                    "--from {}: no such image here (dough image ls)",
                    spec.from
                )),
                e => e.into(),
            })?
        }
    };
    // Layers live beside the image being built (`<state>/images/.layers`),
    // wherever its base is.
    let dir = Image::named(state, &spec.name);
    // (A copy step's VM has one more layer than the image so far: never
    // more than the image will have.)
    let total = base.manifest.layers.len() + spec.steps.len();
    if total > dough_vmm::MAX_LAYERS {
        return Err(BuildError::Invalid(format!(
            "{total} layers ({} from {}); an image has at most {}",
            base.manifest.layers.len(),
            spec.from,
            dough_vmm::MAX_LAYERS
        )));
    }
    let store = Image::layer_path(&dir, "x")
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    std::fs::create_dir_all(&store).map_err(io(format!("create {}", store.display())))?;
    let keys = layer_keys(&base_identity(&base.manifest), &spec.steps);
    tokio::pin!(cancel);

    let mut image = base.clone();
    let mut layers = base.manifest.layers.clone();
    let mut cached = 0;
    for (i, (step, key)) in spec.steps.iter().zip(&keys).enumerate() {
        let n = i + 1;
        let path = Image::layer_path(&dir, key);
        let label = step
            .describe()
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        if path.exists() {
            cached += 1;
            progress_line(
                on_event,
                format!("step {n}/{}: {label}: cached", spec.steps.len()),
            );
            let size = allocated(&path);
            layers.push(Layer {
                step: step.describe(),
                key: key.clone(),
                size,
                built_at: String::new(),
                ms: 0,
            });
            image.layers.push(path);
            continue;
        }
        progress_line(
            on_event,
            format!("step {n}/{}: {label}: running in a vm", spec.steps.len()),
        );
        let tmp = store.join(format!(".{key}.{}.tmp", std::process::id()));
        let t = Instant::now();
        // A copy step's VM boots with one more read-only layer: the files.
        let mut step_image = image.clone();
        let copy_files = match step {
            Step::Copy { src, .. } => {
                let out = store.join(format!(".copy-{}.{}.ext4", &key[..16], std::process::id()));
                let tree = store.join(format!(".copy-{}.{}.tree", &key[..16], std::process::id()));
                copy_layer(src, &tree, &out)?;
                step_image.layers.push(out.clone());
                Some(out)
            }
            _ => None,
        };
        let task = TaskSpec {
            task_id: format!("image-{}-{n}", spec.name),
            command: step.command(),
            env: step.env(),
            root: true,
            workdir: Some("/".into()),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            scratch_mib: spec.disk_mib,
            timeout: Some(spec.step_timeout),
            network: Some(spec.network.clone()),
            image: Some(step_image),
            keep_scratch: Some(tmp.clone()),
            ..TaskSpec::default()
        };
        let report = crate::run_task(host, &task, on_event, &mut cancel).await;
        if let Some(f) = &copy_files {
            let _ = std::fs::remove_file(f);
        }
        let fail = |how: String| {
            let _ = std::fs::remove_file(&tmp);
            BuildError::StepFailed {
                n,
                step: label.clone(),
                how,
            }
        };
        match report.result {
            Ok(Outcome::Exited(dough_proto::ExitStatus::Code(0))) => {}
            Ok(Outcome::Exited(dough_proto::ExitStatus::Code(c))) => {
                return Err(fail(format!("exit code {c}")))
            }
            Ok(Outcome::Exited(dough_proto::ExitStatus::Signal(s))) => {
                return Err(fail(format!("killed by signal {s}")))
            }
            Ok(Outcome::OutOfMemory(_)) => {
                return Err(fail(format!(
                    "out of memory in {} MiB (--memory)",
                    spec.memory_mib
                )))
            }
            Ok(Outcome::TimedOut(d)) => {
                return Err(fail(format!("timed out after {} s", d.as_secs())))
            }
            Ok(Outcome::SpawnFailed(m)) => return Err(fail(m)),
            Ok(Outcome::Cancelled(s)) => return Err(fail(format!("interrupted (signal {s})"))),
            Ok(Outcome::CloneFailed(m)) => return Err(fail(m)),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(BuildError::Vm {
                    n,
                    step: label,
                    source: e,
                });
            }
        }
        if !report.scratch_kept {
            return Err(fail(format!(
                "its disk could not be kept: {}",
                report.teardown_errors.join("; ")
            )));
        }
        // Root's and readable: every later VM's jail opens it read-only.
        std::os::unix::fs::chown(&tmp, Some(0), Some(0))
            .and_then(|_| {
                std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            })
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                BuildError::Io {
                    what: format!("store layer {}", path.display()),
                    source: e,
                }
            })?;
        let ms = t.elapsed().as_millis() as u64;
        let size = allocated(&path);
        progress_line(
            on_event,
            format!(
                "step {n}/{}: {label}: done in {:.1} s, layer {} MiB",
                spec.steps.len(),
                ms as f64 / 1000.0,
                size >> 20
            ),
        );
        layers.push(Layer {
            step: step.describe(),
            key: key.clone(),
            size,
            built_at: dough_image::now_rfc3339(),
            ms,
        });
        image.layers.push(path);
    }

    // The image: the base's files, its manifest with the layers.
    let mut m = base.manifest.clone();
    m.base = Some(BaseRef {
        name: spec.from.clone(),
        digest: base.manifest.digest.clone(),
    });
    m.layers = layers;
    m.compute_digest();
    if let Ok(old) = Image::load(&dir) {
        if old.manifest.digest == m.digest {
            progress_line(on_event, format!("image {}: unchanged", spec.name));
            return Ok(Built {
                image: old,
                cached,
                unchanged: true,
            });
        }
    }
    let image = install(&base, &m, &dir)?;
    Ok(Built {
        image,
        cached,
        unchanged: false,
    })
}

/// Where imported OCI images' bases are kept, by key (`.bases/<key>/`: the
/// default image's kernels and initramfs, the rootfs made from the OCI
/// image, a manifest).
pub const BASE_STORE: &str = ".bases";

/// The base an OCI image makes: its layers unpacked into a rootfs with what
/// Dough's guest needs (`dough_image::oci`), booted with the default
/// image's kernels. Kept by key (the image's config digest, what Dough
/// adds, the default image), so importing it again is a no-op.
async fn import_base(
    host: &HostConfig,
    from: &dough_image::oci::Source,
    spec: &BuildSpec,
    on_event: &mut (dyn FnMut(Event<'_>) + Send),
) -> Result<Image, BuildError> {
    use dough_image::oci;
    let default = Image::load(&host.image_dir)?;
    let store = host.state_dir.join("images").join(BASE_STORE);
    std::fs::create_dir_all(&store).map_err(io(format!("create {}", store.display())))?;
    // A registry's image: its manifest and config into a layout first (the
    // layers only when its base is not imported yet).
    let pulled = store.join(format!(".pull.{}.tmp", std::process::id()));
    let pull = match from {
        oci::Source::Registry(r) => Some(crate::registry::Pull {
            reference: r.clone(),
            plain_http: spec.plain_http,
        }),
        _ => None,
    };
    let src = match &pull {
        Some(p) => {
            let _ = std::fs::remove_dir_all(&pulled);
            progress_line(
                on_event,
                format!("pull {}: manifest and config", from.describe()),
            );
            if let Err(e) = crate::registry::pull_manifests(p, &pulled).await {
                let _ = std::fs::remove_dir_all(&pulled);
                return Err(e);
            }
            oci::Source::Layout {
                dir: pulled.clone(),
                reference: None,
            }
        }
        None => from.clone(),
    };
    let result = import_layout(
        &default,
        from,
        &src,
        pull.as_ref(),
        spec.max_import_bytes,
        &store,
        on_event,
    )
    .await;
    let _ = std::fs::remove_dir_all(&pulled);
    result
}

/// [`import_base`] once the image is a layout (or an archive).
async fn import_layout(
    default: &Image,
    from: &dough_image::oci::Source,
    src: &dough_image::oci::Source,
    pull: Option<&crate::registry::Pull>,
    max_bytes: u64,
    store: &Path,
    on_event: &mut (dyn FnMut(Event<'_>) + Send),
) -> Result<Image, BuildError> {
    use dough_image::oci;
    let config_digest = oci::resolve_source_digest(src)?;
    let inputs = oci::rootfs_inputs(&config_digest);
    let key = dough_image::sha256_hex(
        format!("oci-base/1\n{inputs}\n{}", default.manifest.digest).as_bytes(),
    );
    let dir = store.join(&key[..32]);
    if let Ok(img) = Image::load(&dir) {
        progress_line(
            on_event,
            format!(
                "import {}: cached ({})",
                from.describe(),
                &config_digest[..19]
            ),
        );
        return Ok(img);
    }
    if let Some(p) = pull {
        let dir = match src {
            oci::Source::Layout { dir, .. } => dir.clone(),
            _ => PathBuf::new(),
        };
        let mut say = |m: String| progress_line(on_event, m);
        crate::registry::pull_layers(p, &dir, max_bytes, &mut say).await?;
    }
    let pid = std::process::id();
    let tmp = |ext: &str| store.join(format!(".{}.{pid}.{ext}", &key[..32]));
    let (agent, tree, rootfs, staging) = (tmp("agent"), tmp("tree"), tmp("ext4"), tmp("new"));
    let result = (|| {
        // The agent the default image boots as its init, so kernel,
        // initramfs and init all come from one build of Dough.
        let out = std::process::Command::new("debugfs")
            .arg("-R")
            .arg(format!(
                "dump {} {}",
                dough_image::ROOT_INIT,
                agent.display()
            ))
            .arg(&default.rootfs)
            .output()
            .map_err(io("run debugfs"))?;
        if !agent.metadata().is_ok_and(|m| m.len() > 0) {
            return Err(BuildError::Invalid(format!(
                "the default image's rootfs has no {}: rebuild it with `dough image build` ({})",
                dough_image::ROOT_INIT,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let mut say = |m: String| progress_line(on_event, m);
        say(format!(
            "import {}: {}",
            from.describe(),
            &config_digest[..19]
        ));
        let mut info = oci::import(
            src,
            &agent,
            &tree,
            &rootfs,
            oci::Limits { max_bytes },
            &mut say,
        )?;
        info.source = from.describe();
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir(&staging).map_err(io(format!("create {}", staging.display())))?;
        for f in [&default.kernel, &default.initramfs]
            .into_iter()
            .chain(default.kernel_minimal.as_ref())
        {
            let to = staging.join(f.file_name().unwrap_or_default());
            if std::fs::hard_link(f, &to).is_err() {
                std::fs::copy(f, &to).map_err(io(format!("copy {}", f.display())))?;
            }
        }
        let to = staging.join(default.rootfs.file_name().unwrap_or_default());
        std::fs::rename(&rootfs, &to).map_err(io(format!("move {}", rootfs.display())))?;
        std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .map_err(io(format!("chmod {}", to.display())))?;
        let mut m = default.manifest.clone();
        m.rootfs = dough_image::PartInfo {
            sha256: dough_image::sha256_file(&to)?,
            size: std::fs::metadata(&to).map(|x| x.len()).unwrap_or(0),
            inputs,
            source: format!("{} {}", info.source, info.manifest_digest),
            built_at: dough_image::now_rfc3339(),
        };
        m.rootfs_agent = dough_image::sha256_file(&agent)?;
        m.oci = Some(info);
        m.base = None;
        m.layers.clear();
        m.compute_digest();
        m.write(&staging.join(dough_image::MANIFEST))?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&staging, &dir).map_err(io(format!("create {}", dir.display())))?;
        Ok(Image::load(&dir)?)
    })();
    for p in [&agent, &rootfs] {
        let _ = std::fs::remove_file(p);
    }
    for p in [&tree, &staging] {
        let _ = std::fs::remove_dir_all(p);
    }
    result
}

fn progress_line(on_event: &mut (dyn FnMut(Event<'_>) + Send), msg: String) {
    on_event(Event::Progress(&msg));
}

/// Bytes a (sparse) file holds on disk.
fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap_or(0)
}

/// Lay out image `m` in a staging directory next to `dir` (the base's files
/// hard-linked), then put it in place in one exchange; the previous image
/// is removed after.
fn install(base: &Image, m: &dough_image::Manifest, dir: &Path) -> Result<Image, BuildError> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let staging = parent.join(format!(".{name}.{}.new", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir(&staging).map_err(io(format!("create {}", staging.display())))?;
    let result = (|| {
        let files: Vec<&PathBuf> = [&base.kernel, &base.initramfs, &base.rootfs]
            .into_iter()
            .chain(base.kernel_minimal.as_ref())
            .collect();
        for f in files {
            let to = staging.join(f.file_name().unwrap_or_default());
            if std::fs::hard_link(f, &to).is_err() {
                std::fs::copy(f, &to).map_err(io(format!("copy {}", f.display())))?;
            }
        }
        m.write(&staging.join(dough_image::MANIFEST))?;
        if dir.exists() {
            nix::fcntl::renameat2(
                None,
                &staging,
                None,
                dir,
                nix::fcntl::RenameFlags::RENAME_EXCHANGE,
            )
            .map_err(|e| io(format!("replace {}", dir.display()))(e.into()))?;
        } else {
            std::fs::rename(&staging, dir).map_err(io(format!("create {}", dir.display())))?;
        }
        Ok::<_, BuildError>(())
    })();
    // After an exchange the staging name holds the previous image.
    let _ = std::fs::remove_dir_all(&staging);
    result?;
    Ok(Image::load(dir)?)
}

/// The image directories under `state` (not the layer store or staging).
pub fn list(state: &Path) -> Vec<Result<Image, (String, ImageError)>> {
    let mut names: Vec<String> = std::fs::read_dir(state.join("images"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| Image::load(&Image::named(state, &n)).map_err(|e| (n, e)))
        .collect()
}

/// Delete what no image uses: layers no manifest names, and the staging
/// and half-written files of builds that died. Returns (files, bytes).
pub fn gc(state: &Path) -> (Vec<PathBuf>, u64) {
    let mut used = std::collections::HashSet::new();
    for img in list(state).into_iter().flatten() {
        used.extend(
            img.manifest
                .layers
                .iter()
                .map(|l| format!("{}.ext4", l.key)),
        );
    }
    let images = state.join("images");
    let mut removed = vec![];
    let mut bytes = 0;
    let store = images.join(dough_image::LAYER_STORE);
    for e in std::fs::read_dir(&store).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let live_tmp = n.starts_with('.') && pid_alive(&n);
        if !used.contains(&n) && !live_tmp {
            bytes += dir_allocated(&e.path());
            let gone = if e.path().is_dir() {
                std::fs::remove_dir_all(e.path())
            } else {
                std::fs::remove_file(e.path())
            };
            if gone.is_ok() {
                removed.push(e.path());
            }
        }
    }
    // Imported OCI bases no image boots (an image hard-links its base's
    // rootfs, so the rootfs's hash names the base), and the unpacking
    // trees, rootfs files and staging of imports that died.
    let rootfs_used: std::collections::HashSet<String> = list(state)
        .into_iter()
        .flatten()
        .map(|i| i.manifest.rootfs.sha256)
        .collect();
    let bases = images.join(BASE_STORE);
    for e in std::fs::read_dir(&bases).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let gone = if n.starts_with('.') {
            !pid_alive(&n)
        } else {
            Image::load(&e.path())
                .map_or(true, |b| !rootfs_used.contains(&b.manifest.rootfs.sha256))
        };
        if gone {
            bytes += dir_allocated(&e.path());
            let removed_ok = if e.path().is_dir() {
                std::fs::remove_dir_all(e.path()).is_ok()
            } else {
                std::fs::remove_file(e.path()).is_ok()
            };
            if removed_ok {
                removed.push(e.path());
            }
        }
    }
    for e in std::fs::read_dir(&images).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with('.')
            && n.ends_with(".new")
            && !pid_alive(&n)
            && std::fs::remove_dir_all(e.path()).is_ok()
        {
            removed.push(e.path());
        }
    }
    (removed, bytes)
}

/// Bytes a file or a directory tree holds on disk (files with more than one
/// link counted once per name: an estimate).
fn dir_allocated(p: &Path) -> u64 {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| dir_allocated(&e.path()))
            .sum(),
        Ok(m) if m.nlink() > 1 => 0,
        Ok(m) => m.blocks() * 512,
        Err(_) => 0,
    }
}

/// `.<what>.<pid>.<ext>`: whether that pid still runs.
fn pid_alive(name: &str) -> bool {
    let parts: Vec<&str> = name.rsplitn(3, '.').collect();
    parts
        .get(1)
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(cmd: &str) -> Step {
        Step::Run {
            cmd: cmd.into(),
            env: vec![],
        }
    }

    /// A key depends on the base and every step before it: changing the
    /// last step changes only the last key.
    #[test]
    fn keys_chain_over_the_base_and_the_steps() {
        let a = layer_keys("base1", &[run("a"), run("b")]);
        let b = layer_keys("base1", &[run("a"), run("c")]);
        let c = layer_keys("base2", &[run("a"), run("b")]);
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        assert_ne!(a[0], c[0]);
        assert_ne!(a[1], c[1]);
        let env = Step::Run {
            cmd: "a".into(),
            env: vec![("K".into(), "V".into())],
        };
        assert_ne!(layer_keys("base1", &[env])[0], a[0]);
        assert_eq!(layer_keys("base1", &[run("a"), run("b")]), a);
    }

    /// A new agent in the base rootfs (a rebuilt Dough) or a new kernel keeps
    /// the cached layers; other rootfs inputs or base layers do not.
    #[test]
    fn the_base_identity_ignores_the_agent_and_kernels() {
        let mut m = dough_image::Manifest::default();
        m.rootfs.inputs = "debootstrap bookworm".into();
        m.rootfs.sha256 = "r1".into();
        m.rootfs_agent = "agent1".into();
        let id = base_identity(&m);
        let mut m2 = m.clone();
        m2.rootfs.sha256 = "r2".into();
        m2.rootfs_agent = "agent2".into();
        m2.kernel.sha256 = "k2".into();
        assert_eq!(base_identity(&m2), id);
        m2.rootfs.inputs = "debootstrap trixie".into();
        assert_ne!(base_identity(&m2), id);
        let mut m3 = m.clone();
        m3.layers.push(dough_image::Layer {
            key: "k".into(),
            ..Default::default()
        });
        assert_ne!(base_identity(&m3), id);
    }

    #[test]
    fn package_names_are_what_apt_takes_and_nothing_more() {
        for ok in ["python3", "g++", "libc6=2.36-9", "nodejs", "lib32z1"] {
            assert!(valid_package(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "a", "x;rm", "Py", "-o", "a b", "foo=", "foo=1;2", "$(id)",
        ] {
            assert!(valid_package(bad).is_err(), "{bad}");
        }
    }

    /// The step's exit code survives the `sync` after it.
    #[test]
    fn the_command_keeps_the_steps_exit_code() {
        let c = run("exit 7").command();
        let st = std::process::Command::new(&c[0])
            .args(&c[1..])
            .status()
            .unwrap();
        assert_eq!(st.code(), Some(7));
        let c = run("true").command();
        let st = std::process::Command::new(&c[0])
            .args(&c[1..])
            .status()
            .unwrap();
        assert_eq!(st.code(), Some(0));
    }

    /// CAs come from a file or a directory of `.crt` files; anything else
    /// is refused; the step writes each from its own variable.
    #[test]
    fn cas_are_read_checked_and_handed_over_by_variable() {
        let d = tempfile::tempdir().unwrap();
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----";
        std::fs::write(d.path().join("b.crt"), format!("{pem}\n")).unwrap();
        std::fs::write(d.path().join("a.crt"), pem).unwrap();
        std::fs::write(d.path().join("notes.txt"), "x").unwrap();
        let cas = read_cas(d.path()).unwrap();
        assert_eq!(
            cas.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(),
            ["a.crt", "b.crt"]
        );
        assert!(cas.iter().all(|c| c.1 == pem));
        std::fs::write(d.path().join("bad.crt"), "hello").unwrap();
        let e = read_cas(d.path()).unwrap_err().to_string();
        assert!(e.contains("bad.crt") && e.contains("not a PEM"), "{e}");
        let step = Step::TrustCas(cas);
        assert_eq!(step.env()[1], ("DOUGH_CA_1".to_string(), pem.to_string()));
        assert!(step.describe().starts_with("trust CAs: a.crt "));
        assert!(step.command()[2].contains("\"$DOUGH_CA_1\" > \"$d/ca-1.crt\""));
    }

    #[test]
    fn stale_tmp_names_carry_their_pid() {
        assert!(pid_alive(&format!(".abc.{}.tmp", std::process::id())));
        assert!(!pid_alive(".abc.999999999.tmp"));
        assert!(!pid_alive("abc.ext4"));
    }
}
