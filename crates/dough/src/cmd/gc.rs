//! `dough gc`: reclaim what crashed Dough processes left.
use crate::Cli;

pub fn run(cli: &Cli) -> anyhow::Result<u8> {
    let host = super::host_config(cli, Default::default(), Default::default());
    let r = dough_core::rundir::gc(&host.runs_dir());
    for id in &r.removed {
        println!("removed vm {id}");
    }
    for pid in &r.killed {
        println!("killed process {pid}");
    }
    for id in &r.kept_live {
        println!("kept vm {id} (its owner is running)");
    }
    for e in &r.errors {
        eprintln!("dough: gc: {e}");
    }
    if r.removed.is_empty() && r.killed.is_empty() {
        println!("nothing to reclaim");
    }
    Ok(if r.errors.is_empty() { 0 } else { 1 })
}
