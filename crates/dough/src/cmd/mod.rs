pub mod agents;
pub mod bench;
pub mod bench_cluster;
pub mod bench_egress;
pub mod bench_faults;
pub mod bench_image;
pub mod bench_net;
pub mod bench_serve;
pub mod bench_start;
pub mod client;
pub mod doctor;
pub mod gc;
pub mod image;
pub mod record;
pub mod run;
pub mod serve;
pub mod table;

use dough_core::HostConfig;
use dough_vmm::{AccelChoice, BackendChoice};

use crate::Cli;

pub fn host_config(cli: &Cli, accel: AccelChoice, backend: BackendChoice) -> HostConfig {
    let mut h = HostConfig::new(cli.state_dir.clone(), cli.image_dir.clone(), accel);
    h.backend = backend;
    h.kernel = cli.kernel;
    h.guest_mitigations = cli.guest_mitigations == "on";
    h.facts.allow_pvm = cli.allow_pvm;
    h
}

/// The image `name` of this host (`default`: the one `--image-dir` names).
pub fn load_image(host: &HostConfig, name: &str) -> anyhow::Result<dough_image::Image> {
    dough_image::valid_name(name).map_err(|e| anyhow::anyhow!("--image: {e}"))?;
    let dir = if name == dough_image::DEFAULT_IMAGE {
        host.image_dir.clone()
    } else {
        dough_image::Image::named(&host.state_dir, name)
    };
    dough_image::Image::load(&dir).map_err(|e| match e {
        dough_image::ImageError::NotBuilt(_) => anyhow::anyhow!(
            "--image {name}: no such image here (dough image ls; dough image build {name} …)"
        ),
        e => anyhow::Error::new(e).context(format!("--image {name}")),
    })
}

/// As [`host_config`], with the network settings from the environment
/// (`DOUGH_SLOT_POOL`, `DOUGH_DNS`, `DOUGH_HOST_NAT`).
pub fn host_config_net(
    cli: &Cli,
    accel: AccelChoice,
    backend: BackendChoice,
) -> anyhow::Result<HostConfig> {
    host_config(cli, accel, backend)
        .with_net_env()
        .map_err(anyhow::Error::msg)
}
