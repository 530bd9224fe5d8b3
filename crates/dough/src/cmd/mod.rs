pub mod bench;
pub mod doctor;
pub mod gc;
pub mod image;
pub mod run;

use dough_core::HostConfig;
use dough_vmm::{AccelChoice, BackendChoice};

use crate::Cli;

pub fn host_config(cli: &Cli, accel: AccelChoice, backend: BackendChoice) -> HostConfig {
    let mut h = HostConfig::new(cli.state_dir.clone(), cli.image_dir.clone(), accel);
    h.backend = backend;
    h
}
