//! `dough image build|ls|show|rm|gc`.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use dough_core::imagebuild::{self, BuildSpec, Step};
use dough_image::{BuildOptions, Image, KernelTarget, Progress, DEFAULT_IMAGE};

use crate::Cli;

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Build an image: without a NAME (or `default`), Dough's base image
    /// (kernel, initramfs, rootfs; unchanged parts are skipped); with a NAME,
    /// an image on a base (`--from`) made by steps run in microVMs.
    Build(Box<BuildArgs>),
    /// List the images.
    Ls,
    /// Print an image's manifest (source, steps, sizes, digest, kernel).
    Show {
        #[arg(default_value = DEFAULT_IMAGE)]
        name: String,
    },
    /// Delete an image (refused while a VM runs on it; its layers go with
    /// `dough image gc`).
    Rm { name: String },
    /// Delete layers no image uses, and what interrupted builds left.
    Gc,
}

#[derive(Args, Debug, Clone)]
pub struct BuildArgs {
    /// The image to build (default: Dough's base image, `default`).
    #[arg(value_name = "NAME")]
    pub name: Option<String>,
    /// Build the image a spec file describes (TOML: name, from, packages,
    /// copy, run, env, ca_files, host_cas, egress, allow_hosts, allow_cidrs,
    /// vcpus, memory_mib, disk_mib, step_timeout_secs, max_size_mib;
    /// docs/images.md).
    #[arg(short = 'f', long = "file", value_name = "FILE", conflicts_with_all = ["name", "agent", "packages", "runs", "copies", "env", "ca_files", "egress", "allow_host", "allow_cidr"], help_heading = "Steps")]
    pub file: Option<PathBuf>,
    /// The image to build on: a Dough image, an OCI image layout
    /// (`oci:DIR`, or `oci:DIR:REF` to pick one by its ref name), a
    /// `docker save` archive (`docker-archive:FILE`), or an image in a
    /// registry (`docker://REF`, or `HOST/REPO:TAG`, `…@sha256:…`). An OCI
    /// image alone, without steps, is a build too.
    #[arg(long, value_name = "IMAGE", default_value = DEFAULT_IMAGE, help_heading = "Steps")]
    pub from: String,
    /// The most an OCI image may unpack to, in MiB (over it the build is
    /// refused: `image_too_large`).
    #[arg(long, value_name = "MIB", default_value_t = 16384, value_parser = clap::value_parser!(u64).range(1..=4194304), help_heading = "Steps")]
    pub max_size: u64,
    /// Pull `--from`'s registry over plain HTTP (a registry on a trusted
    /// network without TLS). Credentials: DOUGH_REGISTRY_USERNAME and
    /// DOUGH_REGISTRY_PASSWORD.
    #[arg(long, help_heading = "Steps")]
    pub plain_http: bool,
    /// Debian packages to install (comma-separated, repeatable): the first
    /// step, with apt in a microVM.
    #[arg(
        long,
        value_name = "PKG,…",
        value_delimiter = ',',
        help_heading = "Steps"
    )]
    pub packages: Vec<String>,
    /// A shell command run as root in a microVM (repeatable, in order, after
    /// the packages); what it leaves becomes part of the image.
    #[arg(long = "run", value_name = "CMD", help_heading = "Steps")]
    pub runs: Vec<String>,
    /// Put a host file or directory in the image at GUEST_PATH (absolute;
    /// repeatable, in order, after the packages and before the --run
    /// steps). Copied inside a microVM, so the directories it lands in keep
    /// the image's owners; the copy keeps the host's modes and belongs to
    /// the owner of the directory it lands in.
    #[arg(long = "copy", value_name = "HOST:GUEST", help_heading = "Steps")]
    pub copies: Vec<String>,
    /// Make the guest trust this CA (a PEM file, or a directory of .crt
    /// files; repeatable): the first step. For hosts whose HTTPS passes a
    /// TLS-intercepting proxy.
    #[arg(long = "ca-file", value_name = "PATH", help_heading = "Steps")]
    pub ca_files: Vec<PathBuf>,
    /// Do not adopt the CAs this host's administrator added
    /// (/usr/local/share/ca-certificates/*.crt), which builds trust by
    /// default: a host that needs them for HTTPS has guests that do too.
    #[arg(long, help_heading = "Steps")]
    pub no_host_cas: bool,
    /// A variable for every --run step (K=V, repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = super::run::parse_env, help_heading = "Steps")]
    pub env: Vec<(String, String)>,
    /// The steps' network, as for `dough run` (default: open).
    #[command(flatten)]
    pub net: super::run::EgressArgs,
    /// vCPUs of each step's VM.
    #[arg(long, default_value_t = 2, help_heading = "Steps")]
    pub vcpus: u32,
    /// Memory of each step's VM, in MiB.
    #[arg(
        long,
        value_name = "MIB",
        default_value_t = 1024,
        help_heading = "Steps"
    )]
    pub memory: u32,
    /// Each step's disk in MiB: the most one step can add.
    #[arg(long, value_name = "MIB", default_value_t = 8192, value_parser = clap::value_parser!(u64).range(64..=1048576), help_heading = "Steps")]
    pub disk: u64,
    /// Each step's time limit in seconds.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 1800,
        help_heading = "Steps"
    )]
    pub step_timeout: u64,
    /// Build the image of this agent preset (`dough agents`) from its
    /// public package, under the preset's image name.
    #[arg(long, value_name = "PRESET", conflicts_with_all = ["name", "packages", "runs"], help_heading = "Steps")]
    pub agent: Option<String>,
    /// The static dough-agent binary (default: found next to this program's build).
    #[arg(long, env = "DOUGH_GUEST_AGENT", value_name = "PATH")]
    pub guest_agent: Option<PathBuf>,
    /// Debian mirror for debootstrap.
    #[arg(long, default_value = "http://deb.debian.org/debian")]
    pub mirror: String,
    /// Debian suite.
    #[arg(long, default_value = "bookworm")]
    pub suite: String,
    /// Rebuild every part.
    #[arg(long)]
    pub force: bool,
    /// Kernels to build: `all` (Debian's cloud kernel and Dough's minimal
    /// kernel, compiled once from Debian's linux-source — about 10 minutes on
    /// 2 cores, then cached) or `debian` (skip the compile).
    #[arg(long = "kernels", default_value = "all", value_parser = ["all", "debian"])]
    pub kernels: String,
    /// The hosts the minimal kernel is for: `kvm` (every mitigation of
    /// Firecracker's config; boots anywhere), `tcg` (also without the
    /// return-thunk code only an affected hardware CPU needs: boots faster
    /// under QEMU TCG, never booted under KVM), or `auto` (tcg where this
    /// host has no usable KVM). See docs/boot.md.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    pub kernel_target: String,

    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Where `scripts/build-agent.sh` puts the static agent, relative to the
/// directory of the `dough` binary (target/release or target/debug).
fn default_agent() -> PathBuf {
    let exe = std::env::current_exe().ok();
    let candidates: Vec<PathBuf> = exe
        .iter()
        .flat_map(|e| {
            let dir = e.parent().map(PathBuf::from).unwrap_or_default();
            vec![
                dir.join("../x86_64-unknown-linux-gnu/release/dough-agent"),
                dir.join("../../x86_64-unknown-linux-gnu/release/dough-agent"),
                dir.join("dough-agent-static"),
            ]
        })
        .chain([PathBuf::from("/usr/local/lib/dough/dough-agent")])
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| candidates[0].clone())
}

pub async fn run(cli: &Cli, c: &ImageCmd) -> anyhow::Result<u8> {
    let host = super::host_config(cli, Default::default(), Default::default());
    match c {
        ImageCmd::Build(a)
            if a.agent.is_some()
                || a.file.is_some()
                || a.name.as_deref().is_some_and(|n| n != DEFAULT_IMAGE) =>
        {
            build_named(cli, a).await
        }
        ImageCmd::Build(a) if !a.packages.is_empty() || !a.runs.is_empty() => {
            crate::print_error(&anyhow::anyhow!(
                "`default` is Dough's base image, built from Debian packages on the host; name the image to build steps on it: dough image build NAME --packages …"
            ));
            Ok(crate::EXIT_USAGE)
        }
        ImageCmd::Build(a) => {
            let opts = BuildOptions {
                dir: host.image_dir.clone(),
                cache_dir: host.cache_dir(),
                agent: a.guest_agent.clone().unwrap_or_else(default_agent),
                mirror: a.mirror.clone(),
                suite: a.suite.clone(),
                force: a.force,
                minimal_kernel: a.kernels == "all",
                kernel_target: match a.kernel_target.as_str() {
                    // The same test `--accel auto` makes at boot.
                    "auto" if host.facts.kvm_problem().is_none() => KernelTarget::Kvm,
                    "auto" => KernelTarget::Tcg,
                    t => t.parse().map_err(anyhow::Error::msg)?,
                },
            };
            let img =
                dough_image::build(&opts, &Progress::new(a.quiet)).context("image build failed")?;
            if !a.quiet {
                eprintln!(
                    "kernel {} · digest {} · {}",
                    img.manifest.kernel_version,
                    &img.manifest.digest[..12],
                    img.dir.display()
                );
            }
            Ok(0)
        }
        ImageCmd::Show { name } => {
            let dir = if name == DEFAULT_IMAGE {
                host.image_dir.clone()
            } else {
                dough_image::valid_name(name)?;
                Image::named(&host.state_dir, name)
            };
            let img = Image::load(&dir)?;
            println!("{}", serde_json::to_string_pretty(&img.manifest)?);
            Ok(0)
        }
        ImageCmd::Ls => {
            use super::table::{print, Align::*};
            let (mut rows, mut unusable) = (vec![], vec![]);
            for i in imagebuild::list(&host.state_dir) {
                match i {
                    Ok(img) => {
                        let m = &img.manifest;
                        let size = m.rootfs.size + m.layers.iter().map(|l| l.size).sum::<u64>();
                        rows.push(vec![
                            img.name().to_string(),
                            m.digest[..12.min(m.digest.len())].to_string(),
                            m.layers.len().to_string(),
                            (size >> 20).to_string(),
                            m.base.as_ref().map_or("-".to_string(), |b| b.name.clone()),
                            if m.kernel_minimal_version.is_empty() {
                                m.kernel_version.clone()
                            } else {
                                format!("{} (minimal)", m.kernel_minimal_version)
                            },
                        ]);
                    }
                    Err((name, e)) => unusable.push(format!("{name}: unusable: {e}")),
                }
            }
            print(
                &[
                    ("NAME", Left),
                    ("DIGEST", Left),
                    ("LAYERS", Right),
                    ("SIZE_MIB", Right),
                    ("BASE", Left),
                    ("KERNEL", Left),
                ],
                &rows,
            );
            for u in unusable {
                println!("{u}");
            }
            Ok(0)
        }
        ImageCmd::Rm { name } => {
            dough_image::valid_name(name)?;
            if name == DEFAULT_IMAGE {
                anyhow::bail!("`default` is the base every task and pool uses; rebuild it with `dough image build`");
            }
            let dir = Image::named(&host.state_dir, name);
            if !dir.join(dough_image::MANIFEST).exists() {
                anyhow::bail!("no image {name:?} (dough image ls)");
            }
            let users = dough_core::rundir::image_users(&host.runs_dir(), name);
            if !users.is_empty() {
                anyhow::bail!(
                    "image {name:?} is in use by vm {}: try again when it is done",
                    users.join(", ")
                );
            }
            // Tasks of the daemon (`dough serve`) that will boot it.
            let waiting = daemon_tasks_on(&host.state_dir, name)?;
            if !waiting.is_empty() {
                anyhow::bail!(
                    "image {name:?} is wanted by task {} of the daemon (queued or running): cancel them (dough cancel ID) or try again when they are done",
                    waiting.join(", ")
                );
            }
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
            eprintln!("removed image {name}; `dough image gc` deletes layers no image uses");
            Ok(0)
        }
        ImageCmd::Gc => {
            let (removed, bytes) = imagebuild::gc(&host.state_dir);
            for r in &removed {
                println!("removed {}", r.display());
            }
            eprintln!("{} removed, {} MiB freed", removed.len(), bytes >> 20);
            Ok(0)
        }
    }
}

/// The ids of the daemon's tasks, queued or in flight, that name image
/// `name` (none when this state directory has no task store).
fn daemon_tasks_on(state: &std::path::Path, name: &str) -> anyhow::Result<Vec<String>> {
    use dough_core::store::Store;
    let db = state.join("dough.db");
    if !db.exists() {
        return Ok(vec![]);
    }
    let store = dough_core::store::SqliteStore::open(&db).context("open the task store")?;
    let mut tasks = store.queued(usize::MAX).context("read the queue")?;
    tasks.extend(store.in_flight().context("read the tasks in flight")?);
    Ok(tasks
        .into_iter()
        .filter(|t| t.request.image.as_deref() == Some(name))
        .map(|t| t.id)
        .collect())
}

/// `dough image build -f FILE`: an image as a reviewed file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    name: String,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    packages: Vec<String>,
    #[serde(default)]
    run: Vec<String>,
    /// "HOST:GUEST", HOST relative to the spec file's directory.
    #[serde(default)]
    copy: Vec<String>,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
    /// Relative to the spec file's directory.
    #[serde(default)]
    ca_files: Vec<PathBuf>,
    #[serde(default = "yes")]
    host_cas: bool,
    #[serde(default)]
    egress: Option<String>,
    #[serde(default)]
    allow_hosts: Vec<String>,
    #[serde(default)]
    allow_cidrs: Vec<String>,
    #[serde(default)]
    vcpus: Option<u32>,
    #[serde(default)]
    memory_mib: Option<u32>,
    #[serde(default)]
    disk_mib: Option<u64>,
    #[serde(default)]
    step_timeout_secs: Option<u64>,
    #[serde(default)]
    max_size_mib: Option<u64>,
}

fn yes() -> bool {
    true
}

/// The build `file` describes, as the flags would say it.
fn from_file(a: &BuildArgs, file: &std::path::Path) -> anyhow::Result<BuildArgs> {
    let text = std::fs::read_to_string(file).with_context(|| format!("-f {}", file.display()))?;
    let f: SpecFile = toml::from_str(&text).with_context(|| format!("-f {}", file.display()))?;
    let dir = file.parent().unwrap_or(std::path::Path::new("."));
    let mut b = a.clone();
    b.file = None;
    b.name = Some(f.name);
    if let Some(from) = f.from {
        // An OCI source's relative path is the spec file's directory's.
        b.from = match from.split_once(':') {
            Some((t @ ("oci" | "docker-archive"), p)) if !p.starts_with('/') => {
                format!("{t}:{}", dir.join(p).display())
            }
            _ => from,
        };
    }
    b.packages = f.packages;
    b.runs = f.run;
    b.copies = f
        .copy
        .into_iter()
        .map(|c| match c.rsplit_once(':') {
            Some((h, g)) if !h.starts_with('/') => format!("{}:{g}", dir.join(h).display()),
            _ => c,
        })
        .collect();
    b.env = f.env.into_iter().collect();
    b.ca_files = f.ca_files.into_iter().map(|p| dir.join(p)).collect();
    b.no_host_cas = !f.host_cas;
    b.net.egress = f.egress;
    b.net.allow_host = f.allow_hosts;
    b.net.allow_cidr = f
        .allow_cidrs
        .iter()
        .map(|c| c.parse().map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()
        .with_context(|| format!("-f {}: allow_cidrs", file.display()))?;
    b.vcpus = f.vcpus.unwrap_or(b.vcpus);
    b.memory = f.memory_mib.unwrap_or(b.memory);
    b.disk = f.disk_mib.unwrap_or(b.disk);
    b.step_timeout = f.step_timeout_secs.unwrap_or(b.step_timeout);
    b.max_size = f.max_size_mib.unwrap_or(b.max_size);
    Ok(b)
}

/// `dough image build NAME …`: steps in microVMs (dough_core::imagebuild).
async fn build_named(cli: &Cli, a: &BuildArgs) -> anyhow::Result<u8> {
    let from_spec;
    let a = match &a.file {
        Some(f) => match from_file(a, f) {
            Ok(b) => {
                from_spec = b;
                &from_spec
            }
            Err(e) => {
                crate::print_error(&e);
                return Ok(crate::EXIT_USAGE);
            }
        },
        None => a,
    };
    let prepared = (|| -> anyhow::Result<_> {
        let host = super::host_config_net(cli, Default::default(), Default::default())?;
        let network = a.net.egress()?;
        let preset = match &a.agent {
            Some(n) => Some(
                dough_core::agents::find(&host.state_dir, n)
                    .map_err(|e| anyhow::anyhow!("--agent: {e}"))?
                    .0,
            ),
            None => None,
        };
        let oci = dough_image::oci::Source::parse(&a.from)?.is_some();
        if preset.is_none()
            && !oci
            && a.packages.is_empty()
            && a.runs.is_empty()
            && a.copies.is_empty()
            && a.ca_files.is_empty()
        {
            anyhow::bail!(
                "nothing to build: give --from oci:…, --packages, --copy, --run or --ca-file"
            );
        }
        let mut steps = vec![];
        let mut cas = vec![];
        let host_cas = std::path::Path::new(imagebuild::HOST_LOCAL_CAS);
        if !a.no_host_cas && host_cas.is_dir() {
            cas.extend(imagebuild::read_cas(host_cas)?);
        }
        for f in &a.ca_files {
            cas.extend(
                imagebuild::read_cas(f).with_context(|| format!("--ca-file {}", f.display()))?,
            );
        }
        if !cas.is_empty() {
            steps.push(Step::TrustCas(cas));
        }
        if let Some(p) = &preset {
            steps.extend(p.steps());
        }
        if !a.packages.is_empty() {
            steps.push(Step::Packages(a.packages.clone()));
        }
        for c in &a.copies {
            steps.push(imagebuild::copy_step(c)?);
        }
        steps.extend(a.runs.iter().map(|cmd| Step::Run {
            cmd: cmd.clone(),
            env: a.env.clone(),
        }));
        let (name, from) = match &preset {
            Some(p) => (
                p.image.name.clone(),
                p.image.from.clone().unwrap_or_else(|| a.from.clone()),
            ),
            None => (a.name.clone().unwrap_or_default(), a.from.clone()),
        };
        Ok((host, network, steps, name, from))
    })();
    let (host, network, steps, name, from) = match prepared {
        Ok(p) => p,
        Err(e) => {
            crate::print_error(&e);
            return Ok(crate::EXIT_USAGE);
        }
    };
    let spec = BuildSpec {
        name,
        from,
        steps,
        network,
        vcpus: a.vcpus,
        memory_mib: a.memory,
        disk_mib: a.disk,
        step_timeout: Duration::from_secs(a.step_timeout),
        max_import_bytes: a.max_size << 20,
        plain_http: a.plain_http,
    };
    let progress = Progress::new(a.quiet);
    let mut on_event = |ev: dough_core::Event<'_>| match ev {
        dough_core::Event::Progress(p) => progress.say(p),
        dough_core::Event::Output(_, data) if !a.quiet => {
            use std::io::Write;
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(data).and_then(|_| e.flush());
        }
        _ => {}
    };
    match imagebuild::build(&host, &spec, &mut on_event, super::run::interrupted()).await {
        Ok(b) => {
            let m = &b.image.manifest;
            eprintln!(
                "image {} · digest {} · {} layer{} ({} cached){}",
                spec.name,
                &m.digest[..12],
                m.layers.len(),
                if m.layers.len() == 1 { "" } else { "s" },
                b.cached,
                if b.unchanged { " · unchanged" } else { "" }
            );
            Ok(0)
        }
        Err(e @ (imagebuild::BuildError::Invalid(_) | imagebuild::BuildError::Image(_))) => {
            crate::print_error(&anyhow::Error::new(e).context("image build refused"));
            Ok(crate::EXIT_USAGE)
        }
        Err(e) => {
            crate::print_error(&anyhow::Error::new(e).context(format!(
                "image build failed; the previous image {:?} (if any) is unchanged",
                spec.name
            )));
            Ok(crate::EXIT_DOUGH)
        }
    }
}
