pub mod bench;
pub mod bench_net;
pub mod bench_serve;
pub mod bench_start;
pub mod client;
pub mod doctor;
pub mod gc;
pub mod image;
pub mod run;
pub mod serve;

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
