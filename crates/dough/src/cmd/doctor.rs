//! `dough doctor`: what works here, and why.
use clap::Args;
use dough_image::Image;
use dough_vmm::{tools, Accel, AccelChoice, BackendChoice};

use crate::Cli;

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Also re-hash the image files against the manifest.
    #[arg(long)]
    pub verify: bool,
}

fn version_of(bin: &std::path::Path, arg: &str) -> String {
    std::process::Command::new(bin)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

pub fn run(cli: &Cli, a: &DoctorArgs) -> anyhow::Result<u8> {
    let host = super::host_config(cli, AccelChoice::Auto, BackendChoice::Auto);
    let mut ok = true;
    println!("accelerator");
    match host.facts.kvm_problem() {
        None => println!("  kvm: usable (hardware virtualization, kvm_intel/kvm_amd)"),
        Some(why) => println!("  kvm: not usable: {why}"),
    }
    if host.facts.allow_pvm {
        match host.facts.kvm_problem_for(AccelChoice::Kvm) {
            None if host.facts.kvm_problem().is_some() => println!(
                "  --allow-pvm: --accel kvm uses this PVM /dev/kvm (a stock guest kernel does not finish booting under it)"
            ),
            None => {}
            Some(why) => println!("  --allow-pvm: no effect: {why}"),
        }
    }
    println!("  tcg: always available (software emulation; guest code runs several times slower)");
    let auto = host.facts.choose(AccelChoice::Auto).unwrap_or(Accel::Tcg);
    println!("  auto → {auto}");
    match host.facts.tsc_khz {
        Some(k) => println!("  tsc_early_khz={k} (from /proc/cpuinfo)"),
        None => println!(
            "  warning: cannot read the host TSC frequency; TCG boots may hang calibrating"
        ),
    }

    println!("backends");
    let qemu = tools::find(tools::QEMU);
    let vhost = tools::find(tools::VHOST_VSOCK);
    match (&qemu, &vhost) {
        (Some(q), Some(v)) => println!(
            "  qemu: usable — {} ({}), vsock via {}",
            q.display(),
            version_of(q, "--version"),
            v.display()
        ),
        _ => {
            ok = false;
            println!("  qemu: NOT usable");
        }
    }
    match (tools::find(tools::FIRECRACKER), host.facts.kvm_problem()) {
        (Some(f), None) => println!(
            "  firecracker: usable — {} ({})",
            f.display(),
            version_of(&f, "--version")
        ),
        (Some(f), Some(why)) => println!(
            "  firecracker: found at {} but not usable: needs KVM ({why})",
            f.display()
        ),
        (None, _) => println!(
            "  firecracker: not installed ({}); supported: {}",
            tools::hint(tools::FIRECRACKER),
            dough_vmm::firecracker::SUPPORTED_VERSIONS
        ),
    }
    match dough_vmm::select(&host.facts, BackendChoice::Auto, AccelChoice::Auto) {
        Ok(sel) => println!(
            "  auto → {} with {}: {}",
            sel.vmm.backend(),
            sel.accel,
            sel.why
        ),
        Err(e) => {
            ok = false;
            println!("  auto → nothing usable: {e}");
        }
    }

    println!("confinement");
    if !host.confine {
        println!("  off: not running as root (VMMs run as this user, unconfined)");
    } else {
        match dough_vmm::cgroup::Layout::detect() {
            Ok(l) => println!(
                "  on: per-VM uid, private mount namespace, no capabilities, no_new_privs, cgroup v{} ({})",
                l.version(),
                match &l {
                    dough_vmm::cgroup::Layout::V2(p) => p.display().to_string(),
                    dough_vmm::cgroup::Layout::V1 { memory, .. } => format!("v1 hierarchies, e.g. {}", memory.display()),
                }
            ),
            Err(e) => {
                ok = false;
                println!("  NOT possible: {e}; run with --no-confine or fix cgroups");
            }
        }
        match tools::find(tools::JAILER) {
            Some(j) => println!("  firecracker jailer: {}", j.display()),
            None => {
                println!("  firecracker jailer: not installed (needed to run firecracker confined)")
            }
        }
    }

    println!("network");
    let h = host.clone().with_net_env();
    match h
        .as_ref()
        .map_err(|e| e.clone())
        .and_then(|h| h.net_config().map_err(|e| e.to_string()))
    {
        Ok(c) => println!(
            "  slot pool {} ({} VMs at once), dns upstream {}, host nat {}",
            c.pool,
            c.slot_count(),
            c.dns_upstream,
            if c.host_nat { "on" } else { "off" }
        ),
        Err(e) => {
            ok = false;
            println!("  NOT usable: {e} (or run tasks with --no-network)");
        }
    }
    match dough_net::nft::Nft::new() {
        Ok(_) => println!("  nftables: libnftables loaded"),
        Err(e) => {
            ok = false;
            println!("  nftables: {e}");
        }
    }
    if std::path::Path::new("/dev/net/tun").exists() {
        println!("  /dev/net/tun: present");
    } else {
        ok = false;
        println!("  /dev/net/tun: missing (modprobe tun)");
    }
    if !host.confine {
        println!("  warning: not root: network namespaces need root (use --no-network)");
    }

    println!("tools");
    for (t, needed_for) in [
        (tools::QEMU, "running VMs"),
        (tools::VHOST_VSOCK, "vsock for QEMU VMs"),
        ("mkfs.ext4", "scratch disks, image build"),
        ("debootstrap", "image build"),
        ("lz4", "image build"),
        ("dpkg-deb", "image build"),
        ("apt-get", "image build"),
    ] {
        match tools::find(t) {
            Some(p) => println!("  ok       {t:<20} {}", p.display()),
            None => {
                ok = false;
                println!(
                    "  MISSING  {t:<20} needed for {needed_for}: {}",
                    tools::hint(t)
                );
            }
        }
    }

    println!("image");
    match Image::load(&host.image_dir) {
        Ok(img) => {
            println!(
                "  built: {} · kernel {} · digest {} · rootfs built {}",
                img.dir.display(),
                img.manifest.kernel_version,
                &img.manifest.digest[..12.min(img.manifest.digest.len())],
                img.manifest.rootfs.built_at
            );
            let emulated = dough_vmm::select(&host.facts, host.backend, host.accel)
                .map_or(true, |s| s.accel == dough_vmm::Accel::Tcg);
            if img.kernel_minimal.is_some() {
                println!(
                    "  minimal kernel built for: {} hosts{}",
                    img.manifest.kernel_minimal_target,
                    if img.minimal_fits(emulated) {
                        ""
                    } else {
                        " — not booted here (KVM): rebuild with `dough image build`"
                    }
                );
            }
            match img.kernel_for(host.kernel, emulated) {
                Ok((path, kind)) => println!(
                    "  VMs boot: {} kernel {} ({}; --kernel {:?})",
                    match kind {
                        dough_image::KernelKind::Minimal => "minimal",
                        dough_image::KernelKind::Debian => "Debian's",
                    },
                    match kind {
                        dough_image::KernelKind::Minimal => &img.manifest.kernel_minimal_version,
                        dough_image::KernelKind::Debian => &img.manifest.kernel_version,
                    },
                    path.display(),
                    host.kernel
                ),
                Err(e) => {
                    ok = false;
                    println!("  {e}");
                }
            }
            if a.verify {
                let bad = img.verify()?;
                if bad.is_empty() {
                    println!("  hashes match the manifest");
                } else {
                    ok = false;
                    println!(
                        "  CHANGED since build: {} — run `dough image build`",
                        bad.join(", ")
                    );
                }
            }
        }
        Err(e) => {
            ok = false;
            println!("  {e}");
        }
    }
    let named: Vec<String> = dough_core::imagebuild::list(&host.state_dir)
        .into_iter()
        .map(|i| match i {
            Ok(img) if img.name() == dough_image::DEFAULT_IMAGE => String::new(),
            Ok(img) => format!(
                "{} ({} layer{}, {})",
                img.name(),
                img.manifest.layers.len(),
                if img.manifest.layers.len() == 1 {
                    ""
                } else {
                    "s"
                },
                &img.manifest.digest[..12.min(img.manifest.digest.len())]
            ),
            Err((name, e)) => format!("{name} (unusable: {e})"),
        })
        .filter(|s| !s.is_empty())
        .collect();
    if !named.is_empty() {
        println!("  named images: {}", named.join(", "));
    }
    println!("state: {}", host.state_dir.display());
    println!(
        "{}",
        if ok {
            "ready: `dough run -- CMD` will work"
        } else {
            "not ready: see above"
        }
    );
    Ok(if ok { 0 } else { 1 })
}
