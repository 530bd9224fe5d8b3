//! `dough image build`: kernel, initramfs and rootfs from Debian packages.
//! Each part is rebuilt only when the hash of its inputs changed.
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::cpio::CpioWriter;
use crate::manifest::{now_rfc3339, sha256_file, sha256_hex, Manifest, PartInfo};
use crate::{elf, io_err, Image, ImageError, KernelTarget};

pub const KERNEL: &str = "vmlinux";
pub const KERNEL_MINIMAL: &str = "vmlinux-minimal";

/// Debian's kernel source package the minimal kernel is built from.
const KERNEL_SOURCE: &str = "linux-source-6.1";
/// Firecracker's guest kernel config for 6.1, unchanged.
const MINIMAL_BASE_CONFIG: &str = include_str!("../kernel/microvm-kernel-ci-x86_64-6.1.config");
/// Dough's changes to it.
const MINIMAL_FRAGMENT: &str = include_str!("../kernel/dough.fragment");
/// Added for [`KernelTarget::Tcg`].
const TCG_FRAGMENT: &str = include_str!("../kernel/tcg.fragment");
pub const INITRAMFS: &str = "initramfs.cpio";
pub const ROOTFS: &str = "rootfs.ext4";
/// Where the rootfs holds the agent, for booting without an initramfs.
pub const ROOT_INIT: &str = "/usr/sbin/dough-init";

/// Debian's cloud kernel meta package; its dependency names the real one.
const KERNEL_META: &str = "linux-image-cloud-amd64";

/// Modules the agent loads before it dials the host (paths under `kernel/`),
/// in load order.
pub const MODULES_EARLY: &[&str] = &[
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_mmio.ko",
    "net/vmw_vsock/vsock.ko",
    "net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
    "net/vmw_vsock/vmw_vsock_virtio_transport.ko",
];

/// Modules loaded while the host is already being greeted: disks, overlay,
/// network.
pub const MODULES_LATE: &[&str] = &[
    "drivers/block/virtio_blk.ko",
    "fs/overlayfs/overlay.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
];

fn all_modules() -> impl Iterator<Item = &'static &'static str> {
    MODULES_EARLY.iter().chain(MODULES_LATE)
}

/// Packages of the base rootfs (on top of debootstrap's minbase).
pub const ROOTFS_PACKAGES: &[&str] = &[
    "bash",
    "coreutils",
    "git",
    "ca-certificates",
    "openssh-client",
    "curl",
    "procps",
    "iproute2",
    "nano",
    "less",
    "xz-utils",
];

/// Run inside the new rootfs (chroot) after debootstrap. Changing this text
/// changes the rootfs inputs, so the next build redoes the rootfs.
const CUSTOMIZE: &str = r#"set -e
groupadd -g 1000 dough
useradd -m -u 1000 -g 1000 -s /bin/bash -c "Dough task user" dough
install -d -o 1000 -g 1000 -m 0755 /work
printf 'nameserver 172.16.0.1\n' > /etc/resolv.conf
printf 'dough\n' > /etc/hostname
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log /var/log/apt/* /tmp/* /root/.bash_history
"#;

/// What to build and from where.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The image directory (see [`Image::dir_in`]).
    pub dir: PathBuf,
    /// Downloads and build scratch, kept between builds.
    pub cache_dir: PathBuf,
    /// The static `dough-agent` binary to put in the initramfs as `/init`.
    pub agent: PathBuf,
    pub mirror: String,
    pub suite: String,
    /// Rebuild every part even if its inputs are unchanged.
    pub force: bool,
    /// Build Dough's minimal kernel too (about 10 minutes on 2 cores, once:
    /// cached by the hash of source version and config).
    pub minimal_kernel: bool,
    /// The hosts the minimal kernel is for (`dough image build` picks `tcg`
    /// where KVM is not usable).
    pub kernel_target: KernelTarget,
}

/// Progress lines on stderr, with the time since the build started.
pub struct Progress {
    start: Instant,
    quiet: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Progress {
            start: Instant::now(),
            quiet,
        }
    }

    pub fn say(&self, msg: &str) {
        if !self.quiet {
            eprintln!("[{:>6.1}s] {msg}", self.start.elapsed().as_secs_f64());
        }
    }
}

/// Build (or bring up to date) the image; returns what was built.
pub fn build(opts: &BuildOptions, progress: &Progress) -> Result<Image, ImageError> {
    for (tool, pkg) in [
        ("apt-get", "apt"),
        ("dpkg-deb", "dpkg"),
        ("lz4", "lz4"),
        ("debootstrap", "debootstrap"),
        ("mkfs.ext4", "e2fsprogs"),
    ] {
        if which(tool).is_none() {
            return Err(ImageError::MissingTool {
                tool: tool.into(),
                hint: format!("apt-get install {pkg}, or run scripts/setup.sh"),
            });
        }
    }
    let agent =
        std::fs::read(&opts.agent).map_err(|_| ImageError::AgentMissing(opts.agent.clone()))?;
    match elf::has_interpreter(&agent) {
        Some(false) => {}
        Some(true) => return Err(ImageError::AgentDynamic(opts.agent.clone())),
        None => {
            return Err(ImageError::Invalid(format!(
                "{} is not an x86-64 ELF binary",
                opts.agent.display()
            )))
        }
    }
    for d in [&opts.dir, &opts.cache_dir] {
        std::fs::create_dir_all(d).map_err(io_err(d))?;
    }
    let mpath = opts.dir.join(crate::manifest::FILE);
    let old = if opts.force {
        Manifest::default()
    } else {
        Manifest::read(&mpath).unwrap_or_default()
    };
    let mut m = old.clone();
    m.format = 1;

    // 1. Kernel. The unpacked package (cache) is fetched only when a part
    // that needs it is rebuilt.
    let (pkg, version) = kernel_package()?;
    let kernel_inputs = sha256_hex(format!("kernel/2 (strip -s)\n{pkg}\n{version}\n").as_bytes());
    let kernel_tree = opts.cache_dir.join(format!("{pkg}_{version}"));
    let fetch = || -> Result<String, ImageError> {
        fetch_kernel(&pkg, &version, &opts.cache_dir, &kernel_tree)?;
        kernel_release(&kernel_tree)
    };
    let kpath = opts.dir.join(KERNEL);
    let mut kver = None;
    if part_fresh(&old.kernel, &kernel_inputs, &kpath) && !old.kernel_version.is_empty() {
        progress.say(&format!("[1/3] kernel {pkg} {version}: unchanged, skipped"));
    } else {
        progress.say(&format!("[1/3] kernel: fetching {pkg} {version}"));
        kver = Some(fetch()?);
        extract_vmlinux(&kernel_tree, &kpath)?;
        m.kernel = part_info(&kpath, kernel_inputs.clone(), format!("{pkg} {version}"))?;
        progress.say(&format!("[1/3] kernel: vmlinux {} MB", m.kernel.size >> 20));
    }

    // 2. Initramfs: agent + modules. The modules' contents are fixed by the
    // kernel package version, which `kernel_inputs` names.
    let mut initramfs_src = format!(
        "initramfs/4\nagent {}\nkernel {kernel_inputs}\n",
        sha256_hex(&agent)
    );
    for module in all_modules() {
        initramfs_src.push_str(module);
        initramfs_src.push('\n');
    }
    let initramfs_inputs = sha256_hex(initramfs_src.as_bytes());
    let ipath = opts.dir.join(INITRAMFS);
    if part_fresh(&old.initramfs, &initramfs_inputs, &ipath) {
        progress.say("[2/3] initramfs: unchanged, skipped");
    } else {
        progress.say("[2/3] initramfs: agent + modules");
        let release = match kver.clone() {
            Some(k) => k,
            None => fetch()?,
        };
        kver = Some(release.clone());
        let mod_root = kernel_tree
            .join("lib/modules")
            .join(&release)
            .join("kernel");
        write_initramfs(&ipath, &agent, &mod_root, &release)?;
        m.initramfs = part_info(
            &ipath,
            initramfs_inputs,
            format!(
                "dough-agent {} + {} modules of {release}",
                &sha256_hex(&agent)[..12],
                all_modules().count()
            ),
        )?;
    }
    if let Some(k) = kver {
        m.kernel_version = k;
    }

    // 2b. Dough's minimal kernel, from Debian's kernel source.
    if opts.minimal_kernel {
        let (version, fragment) = minimal_inputs(opts.kernel_target)?;
        // The compile is cached by what it was built from; the image's copy
        // also by how it was post-processed (its symbol table stripped).
        let build_key = sha256_hex(
            format!(
                "kernel-minimal/1\n{KERNEL_SOURCE} {version}\n{MINIMAL_BASE_CONFIG}\n{fragment}"
            )
            .as_bytes(),
        );
        let inputs = sha256_hex(format!("{build_key}\nstrip -s\n").as_bytes());
        let path = opts.dir.join(KERNEL_MINIMAL);
        let fresh = old
            .kernel_minimal
            .as_ref()
            .is_some_and(|k| part_fresh(k, &inputs, &path));
        if fresh {
            progress.say("[2b] minimal kernel: unchanged, skipped");
        } else {
            let release =
                build_minimal_kernel(opts, &version, &fragment, &build_key, &path, progress)?;
            let extra = match opts.kernel_target {
                KernelTarget::Kvm => "",
                KernelTarget::Tcg => " + kernel/tcg.fragment",
            };
            m.kernel_minimal = Some(part_info(
                &path,
                inputs,
                format!(
                    "{KERNEL_SOURCE} {version} + Firecracker's 6.1 guest config + kernel/dough.fragment{extra}"
                ),
            )?);
            m.kernel_minimal_version = release;
            m.kernel_minimal_target = opts.kernel_target;
        }
    } else if m.kernel_minimal.take().is_some() {
        m.kernel_minimal_version.clear();
        m.kernel_minimal_target = KernelTarget::default();
        let _ = std::fs::remove_file(opts.dir.join(KERNEL_MINIMAL));
    }

    // 3. Rootfs.
    let rootfs_src = format!(
        "rootfs/1\n{}\n{}\n{}\n{CUSTOMIZE}",
        opts.suite,
        opts.mirror,
        ROOTFS_PACKAGES.join(",")
    );
    let rootfs_inputs = sha256_hex(rootfs_src.as_bytes());
    let rpath = opts.dir.join(ROOTFS);
    if part_fresh(&old.rootfs, &rootfs_inputs, &rpath) {
        progress.say("[3/3] rootfs: unchanged, skipped");
    } else {
        progress.say(&format!(
            "[3/3] rootfs: debootstrap {} (about a minute)",
            opts.suite
        ));
        build_rootfs(opts, &rpath, progress)?;
        m.rootfs = part_info(
            &rpath,
            rootfs_inputs,
            format!(
                "debootstrap minbase {} + {}",
                opts.suite,
                ROOTFS_PACKAGES.join(",")
            ),
        )?;
    }
    // 3b. The agent inside the rootfs too, as its init: Dough's minimal
    // kernel (drivers built in) mounts the rootfs itself and needs no
    // initramfs. Written into a copy (running VMs keep the old file) with
    // debugfs, so an agent change does not redo the debootstrap.
    let agent_digest = sha256_hex(&agent);
    if m.rootfs_agent == agent_digest && part_fresh(&m.rootfs, &m.rootfs.inputs, &rpath) {
        progress.say("[3b] agent in the rootfs: unchanged, skipped");
    } else {
        progress.say(&format!("[3b] agent in the rootfs: as {ROOT_INIT}"));
        put_agent_in_rootfs(&rpath, &opts.agent)?;
        m.rootfs = part_info(&rpath, m.rootfs.inputs.clone(), m.rootfs.source.clone())?;
        m.rootfs_agent = agent_digest;
    }
    m.compute_digest();
    if m != old {
        m.write(&mpath)?;
    }
    progress.say(&format!(
        "image {} ready in {}",
        &m.digest[..12],
        opts.dir.display()
    ));
    Image::load(&opts.dir)
}

/// Copy `rootfs`, write `agent` into the copy as [`ROOT_INIT`] (root's,
/// 0755), and move the copy over the original.
fn put_agent_in_rootfs(rootfs: &Path, agent: &Path) -> Result<(), ImageError> {
    let tmp = rootfs.with_extension("ext4.tmp");
    std::fs::copy(rootfs, &tmp).map_err(io_err(&tmp))?;
    let debugfs = |req: &str| {
        let mut c = Command::new("debugfs");
        c.arg("-w").arg("-R").arg(req).arg(&tmp);
        c
    };
    // Absent in a fresh rootfs; debugfs reports it on stderr, not by status.
    let _ = run(&mut debugfs(&format!("rm {ROOT_INIT}")));
    run(&mut debugfs(&format!(
        "write {} {ROOT_INIT}",
        agent.display()
    )))?;
    run(&mut debugfs(&format!("sif {ROOT_INIT} mode 0100755")))?;
    run(&mut debugfs(&format!("sif {ROOT_INIT} uid 0")))?;
    run(&mut debugfs(&format!("sif {ROOT_INIT} gid 0")))?;
    let listed = run(&mut debugfs(&format!("stat {ROOT_INIT}")))?;
    if !listed.contains("Size: ") {
        let _ = std::fs::remove_file(&tmp);
        return Err(ImageError::Invalid(format!(
            "debugfs did not write {ROOT_INIT} into {}",
            rootfs.display()
        )));
    }
    std::fs::rename(&tmp, rootfs).map_err(io_err(rootfs))?;
    Ok(())
}

fn part_fresh(old: &PartInfo, inputs: &str, path: &Path) -> bool {
    old.inputs == inputs && path.exists() && sha256_file(path).ok().as_deref() == Some(&old.sha256)
}

fn part_info(path: &Path, inputs: String, source: String) -> Result<PartInfo, ImageError> {
    Ok(PartInfo {
        sha256: sha256_file(path)?,
        size: std::fs::metadata(path).map_err(io_err(path))?.len(),
        inputs,
        source,
        built_at: now_rfc3339(),
    })
}

pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn run(cmd: &mut Command) -> Result<String, ImageError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ImageError::Command {
            command: shown.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(8).collect();
        return Err(ImageError::Command {
            command: shown,
            detail: format!(
                "{}: {}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The concrete kernel package behind the meta package, and its version.
fn kernel_package() -> Result<(String, String), ImageError> {
    let deps = run(Command::new("apt-cache").args(["depends", KERNEL_META]))?;
    let pkg = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|d| d.starts_with("linux-image-"))
        .ok_or_else(|| {
            ImageError::Invalid(format!(
                "apt knows no {KERNEL_META}; run `apt-get update` (scripts/setup.sh does)"
            ))
        })?
        .to_string();
    let show = run(Command::new("apt-cache").args(["show", "--no-all-versions", &pkg]))?;
    let version = show
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .ok_or_else(|| ImageError::Invalid(format!("apt-cache shows no version of {pkg}")))?
        .trim()
        .to_string();
    Ok((pkg, version))
}

fn fetch_kernel(pkg: &str, version: &str, cache: &Path, tree: &Path) -> Result<(), ImageError> {
    if tree.join("boot").exists() {
        return Ok(());
    }
    fetch_deb(pkg, version, cache, tree)
}

/// `apt-get download PKG=VERSION` into the cache, unpacked at `tree`.
fn fetch_deb(pkg: &str, version: &str, cache: &Path, tree: &Path) -> Result<(), ImageError> {
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs).map_err(io_err(&debs))?;
    run(Command::new("apt-get")
        .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
        .arg(format!("{pkg}={version}"))
        .current_dir(&debs))?;
    let deb = std::fs::read_dir(&debs)
        .map_err(io_err(&debs))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
                .unwrap_or(false)
        })
        .ok_or_else(|| ImageError::Invalid(format!("apt-get download left no {pkg} .deb")))?;
    let tmp = tree.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
    let _ = std::fs::remove_dir_all(tree);
    std::fs::rename(&tmp, tree).map_err(io_err(tree))?;
    let _ = std::fs::remove_file(&deb);
    Ok(())
}

fn kernel_release(tree: &Path) -> Result<String, ImageError> {
    let dir = tree.join("lib/modules");
    std::fs::read_dir(&dir)
        .map_err(io_err(&dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .ok_or_else(|| ImageError::Invalid(format!("no kernel modules in {}", dir.display())))
}

/// Debian's vmlinuz is a bzImage whose payload is LZ4 (legacy frame): find
/// the frame magic and decompress from there.
fn extract_vmlinux(tree: &Path, out: &Path) -> Result<(), ImageError> {
    let boot = tree.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(io_err(&boot))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| ImageError::Invalid(format!("no vmlinuz in {}", boot.display())))?;
    let bz = std::fs::read(&vmlinuz).map_err(io_err(&vmlinuz))?;
    const LZ4_LEGACY: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
    let off = bz
        .windows(4)
        .position(|w| w == LZ4_LEGACY)
        .ok_or_else(|| ImageError::Invalid(format!("{} has no LZ4 payload", vmlinuz.display())))?;
    let tmp = out.with_extension("tmp");
    let outf = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    let mut child = Command::new("lz4")
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(outf)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| ImageError::Command {
            command: "lz4 -dc".into(),
            detail: e.to_string(),
        })?;
    // lz4 stops with an error at the bzImage trailer after the frame; the
    // output is checked below instead of its exit status.
    let _ = child.stdin.take().expect("piped").write_all(&bz[off..]);
    let _ = child.wait();
    let head = std::fs::read(&tmp).map_err(io_err(&tmp))?;
    if !elf::is_elf64(&head) {
        return Err(ImageError::Invalid(format!(
            "decompressing {} did not give an ELF vmlinux",
            vmlinuz.display()
        )));
    }
    strip_symbols(&tmp)?;
    std::fs::rename(&tmp, out).map_err(io_err(out))
}

fn write_initramfs(
    out: &Path,
    agent: &[u8],
    mod_root: &Path,
    release: &str,
) -> Result<(), ImageError> {
    let tmp = out.with_extension("tmp");
    let f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    let mut w = CpioWriter::new(std::io::BufWriter::new(f));
    let e = io_err(&tmp);
    (|| -> std::io::Result<()> {
        for d in [
            "dev",
            "proc",
            "sys",
            "mnt",
            "newroot",
            "lib",
            "lib/dough",
            "lib/dough/modules",
        ] {
            w.dir(d, 0o755)?;
        }
        w.file("init", 0o755, agent)?;
        // The modules are Debian's: a kernel of another release (the
        // minimal one, drivers built in) skips them.
        w.file(
            "lib/dough/modules.release",
            0o644,
            format!("{release}\n").as_bytes(),
        )?;
        for (list, modules) in [
            ("modules.early", MODULES_EARLY),
            ("modules.late", MODULES_LATE),
        ] {
            let mut order = String::new();
            for module in modules {
                let name = Path::new(module)
                    .file_name()
                    .expect("module path")
                    .to_string_lossy();
                let data = std::fs::read(mod_root.join(module))?;
                w.file(&format!("lib/dough/modules/{name}"), 0o644, &data)?;
                order.push_str(&name);
                order.push('\n');
            }
            w.file(&format!("lib/dough/{list}"), 0o644, order.as_bytes())?;
        }
        w.finish()?;
        Ok(())
    })()
    .map_err(e)?;
    std::fs::rename(&tmp, out).map_err(io_err(out))
}

fn build_rootfs(opts: &BuildOptions, out: &Path, progress: &Progress) -> Result<(), ImageError> {
    let tree = opts.cache_dir.join("rootfs.tmp");
    if tree.exists() {
        std::fs::remove_dir_all(&tree).map_err(io_err(&tree))?;
    }
    let mut child = Command::new("debootstrap")
        .args(["--variant=minbase", "--include"])
        .arg(ROOTFS_PACKAGES.join(","))
        .arg(&opts.suite)
        .arg(&tree)
        .arg(&opts.mirror)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ImageError::Command {
            command: "debootstrap".into(),
            detail: e.to_string(),
        })?;
    let stderr = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            s.push_str(&line);
            s.push('\n');
        }
        s
    });
    let mut seen = std::collections::HashSet::new();
    let mut fetched = 0u32;
    for line in BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        // debootstrap's "I: Retrieving/Validating/Unpacking/Configuring X"
        // lines are its progress; show the stage changes, not every package.
        if let Some(rest) = line.strip_prefix("I: ") {
            let stage = rest.split_whitespace().next().unwrap_or("").to_string();
            if stage == "Retrieving" {
                fetched += 1;
                if fetched.is_multiple_of(25) {
                    progress.say(&format!("      debootstrap: {fetched} packages downloaded"));
                }
            }
            if seen.insert(stage) {
                progress.say(&format!("      debootstrap: {rest}"));
            }
        }
        if line.starts_with("E: ") || line.starts_with("W: ") {
            progress.say(&format!("      debootstrap: {line}"));
        }
    }
    let status = child.wait().map_err(io_err(&tree))?;
    let err = err_thread.join().unwrap_or_default();
    if !status.success() {
        let log = tree.join("debootstrap/debootstrap.log");
        let tail = std::fs::read_to_string(&log).unwrap_or(err);
        let tail: Vec<&str> = tail.lines().rev().take(10).collect();
        return Err(ImageError::Command {
            command: "debootstrap".into(),
            detail: format!(
                "{status}: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ),
        });
    }
    progress.say("      customizing (task user, resolver, clean-up)");
    run(Command::new("chroot")
        .arg(&tree)
        .args(["/bin/sh", "-c", CUSTOMIZE]))?;
    let bytes = dir_size(&tree);
    // Room for ext4 metadata plus some slack; the image is sparse anyway.
    let size_mb = bytes / (1 << 20) * 5 / 4 + 64;
    progress.say(&format!(
        "      mkfs.ext4 -d ({} MB of files, {size_mb} MB image)",
        bytes >> 20
    ));
    let tmp = out.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    crate::mkfs_ext4_from(&tree, &tmp, size_mb, Some("dough-base"), None).map_err(|detail| {
        ImageError::Command {
            command: "mkfs.ext4 -d".into(),
            detail,
        }
    })?;
    std::fs::rename(&tmp, out).map_err(io_err(out))?;
    std::fs::remove_dir_all(&tree).map_err(io_err(&tree))?;
    Ok(())
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if md.is_dir() {
                stack.push(e.path());
            } else {
                total += md.len();
            }
        }
    }
    total
}

/// The source version to build and the fragment in effect.
fn minimal_inputs(target: KernelTarget) -> Result<(String, String), ImageError> {
    let show = run(Command::new("apt-cache").args(["show", "--no-all-versions", KERNEL_SOURCE]))?;
    let version = show
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .ok_or_else(|| {
            ImageError::Invalid(format!(
                "apt knows no {KERNEL_SOURCE}; run `apt-get update` (scripts/setup.sh does)"
            ))
        })?
        .trim()
        .to_string();
    let fragment = match target {
        KernelTarget::Kvm => MINIMAL_FRAGMENT.to_string(),
        KernelTarget::Tcg => format!("{MINIMAL_FRAGMENT}{TCG_FRAGMENT}"),
    };
    Ok((version, fragment))
}

/// `NAME=y|n` lines of a fragment.
fn fragment_options(fragment: &str) -> Vec<(&str, &str)> {
    fragment
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect()
}

/// Drop a vmlinux's symbol table (`strip -s`): QEMU's ELF loader reads and
/// sorts it at every VM start (~13 ms for the minimal kernel's 100k
/// symbols); the guest has its own kallsyms and the cache keeps the full
/// file.
fn strip_symbols(path: &Path) -> Result<(), ImageError> {
    if which("strip").is_none() {
        return Err(ImageError::MissingTool {
            tool: "strip".into(),
            hint: "apt-get install binutils, or run scripts/setup.sh".into(),
        });
    }
    run(Command::new("strip").arg("-s").arg(path)).map(|_| ())
}

/// Configure and compile the minimal kernel; cached under the cache dir by
/// `build_key` (so switching options back reuses the earlier build). Returns
/// its release string.
fn build_minimal_kernel(
    opts: &BuildOptions,
    version: &str,
    fragment: &str,
    build_key: &str,
    out: &Path,
    progress: &Progress,
) -> Result<String, ImageError> {
    let cached = opts.cache_dir.join("kernels").join(&build_key[..16]);
    let cached_vmlinux = cached.join("vmlinux");
    let cached_release = cached.join("release");
    if !cached_vmlinux.exists() || !cached_release.exists() {
        for (tool, pkg) in [
            ("make", "make"),
            ("gcc", "build-essential"),
            ("flex", "flex"),
            ("bison", "bison"),
            ("bc", "bc"),
        ] {
            if which(tool).is_none() {
                return Err(ImageError::MissingTool {
                    tool: tool.into(),
                    hint: format!("apt-get install {pkg}, or run scripts/setup.sh"),
                });
            }
        }
        let src = opts.cache_dir.join(format!("{KERNEL_SOURCE}_{version}"));
        if !src.join("usr/src").exists() {
            progress.say(&format!(
                "[2b] minimal kernel: fetching {KERNEL_SOURCE} {version}"
            ));
            fetch_deb(KERNEL_SOURCE, version, &opts.cache_dir, &src)?;
        }
        let tarball = std::fs::read_dir(src.join("usr/src"))
            .map_err(io_err(&src))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.to_string_lossy().ends_with(".tar.xz"))
            .ok_or_else(|| {
                ImageError::Invalid(format!("no kernel source tarball in {}", src.display()))
            })?;
        let tree = opts.cache_dir.join("kernel-build");
        let _ = std::fs::remove_dir_all(&tree);
        std::fs::create_dir_all(&tree).map_err(io_err(&tree))?;
        progress.say("[2b] minimal kernel: unpacking the source");
        run(Command::new("tar")
            .args(["-xf"])
            .arg(&tarball)
            .args(["--strip-components=1", "-C"])
            .arg(&tree))?;
        std::fs::write(tree.join(".config"), MINIMAL_BASE_CONFIG).map_err(io_err(&tree))?;
        let mut cfg = Command::new(tree.join("scripts/config"));
        cfg.arg("--file").arg(tree.join(".config"));
        let options = fragment_options(fragment);
        for (name, value) in &options {
            match *value {
                "y" => cfg.arg("-e").arg(name),
                "n" => cfg.arg("-d").arg(name),
                v => cfg.arg("--set-val").arg(name).arg(v),
            };
        }
        run(&mut cfg)?;
        run(Command::new("make")
            .args(["-s", "olddefconfig"])
            .current_dir(&tree))?;
        let config = std::fs::read_to_string(tree.join(".config")).map_err(io_err(&tree))?;
        for (name, value) in &options {
            let line = config
                .lines()
                .find(|l| l.starts_with(&format!("CONFIG_{name}=")));
            let ok = match *value {
                "n" => line.is_none_or(|l| !l.ends_with("=y")),
                v => line == Some(&format!("CONFIG_{name}={v}")),
            };
            if !ok {
                return Err(ImageError::Invalid(format!(
                    "kernel option {name} is {} after olddefconfig; kernel/dough.fragment asks for {value}",
                    line.unwrap_or("unset")
                )));
            }
        }
        let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
        progress.say(&format!(
            "[2b] minimal kernel: compiling with {jobs} jobs (about 10 minutes on 2 cores; once)"
        ));
        compile_kernel(&tree, jobs, progress)?;
        let release = run(Command::new("make")
            .args(["-s", "kernelrelease"])
            .current_dir(&tree))?
        .trim()
        .to_string();
        std::fs::create_dir_all(&cached).map_err(io_err(&cached))?;
        std::fs::copy(tree.join("vmlinux"), &cached_vmlinux).map_err(io_err(&cached_vmlinux))?;
        std::fs::write(&cached_release, &release).map_err(io_err(&cached_release))?;
        let _ = std::fs::remove_dir_all(&tree);
    } else {
        progress.say("[2b] minimal kernel: from the build cache");
    }
    let tmp = out.with_extension("tmp");
    std::fs::copy(&cached_vmlinux, &tmp).map_err(io_err(&tmp))?;
    strip_symbols(&tmp)?;
    std::fs::rename(&tmp, out).map_err(io_err(out))?;
    let release = std::fs::read_to_string(&cached_release).map_err(io_err(&cached_release))?;
    progress.say(&format!(
        "[2b] minimal kernel: {} ({} MB)",
        release.trim(),
        std::fs::metadata(out).map(|m| m.len() >> 20).unwrap_or(0)
    ));
    Ok(release.trim().to_string())
}

/// `make vmlinux`, with a progress line every 30 s (objects compiled).
fn compile_kernel(tree: &Path, jobs: usize, progress: &Progress) -> Result<(), ImageError> {
    let mut child = Command::new("make")
        .arg(format!("-j{jobs}"))
        .arg("vmlinux")
        .current_dir(tree)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ImageError::Command {
            command: "make vmlinux".into(),
            detail: e.to_string(),
        })?;
    let stderr = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut tail: std::collections::VecDeque<String> = Default::default();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tail.len() == 20 {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        tail.into_iter().collect::<Vec<_>>().join("\n")
    });
    let mut objects = 0u32;
    let mut last = Instant::now();
    for line in BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        if line.trim_start().starts_with("CC") {
            objects += 1;
        }
        if last.elapsed().as_secs() >= 30 {
            progress.say(&format!("      make: {objects} files compiled"));
            last = Instant::now();
        }
    }
    let status = child.wait().map_err(io_err(tree))?;
    let err = err_thread.join().unwrap_or_default();
    if !status.success() {
        return Err(ImageError::Command {
            command: "make vmlinux".into(),
            detail: format!("{status}: {err}"),
        });
    }
    Ok(())
}
