//! `dough image build|show`.
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use dough_image::{BuildOptions, Image, KernelTarget, Progress};

use crate::Cli;

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Build the guest image (kernel, initramfs, rootfs); unchanged parts are skipped.
    Build(BuildArgs),
    /// Print the image manifest.
    Show,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The static dough-agent binary (default: found next to this program's build).
    #[arg(long, env = "DOUGH_AGENT", value_name = "PATH")]
    pub agent: Option<PathBuf>,
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

pub fn run(cli: &Cli, c: &ImageCmd) -> anyhow::Result<u8> {
    let host = super::host_config(cli, Default::default(), Default::default());
    match c {
        ImageCmd::Build(a) => {
            let opts = BuildOptions {
                dir: host.image_dir.clone(),
                cache_dir: host.cache_dir(),
                agent: a.agent.clone().unwrap_or_else(default_agent),
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
        ImageCmd::Show => {
            let img = Image::load(&host.image_dir)?;
            println!("{}", serde_json::to_string_pretty(&img.manifest)?);
            Ok(0)
        }
    }
}
