//! `dough gc`: reclaim what crashed Dough processes left.
use crate::Cli;

pub fn run(cli: &Cli) -> anyhow::Result<u8> {
    let host = super::host_config(cli, Default::default(), Default::default());
    let r = dough_core::rundir::gc_host(&host);
    for id in &r.removed {
        println!("removed vm {id}");
    }
    for pid in &r.killed {
        println!("killed process {pid}");
    }
    for uid in &r.released_uids {
        println!("released uid {uid}");
    }
    for vm in &r.removed_jails {
        println!("removed jail root of vm {vm}");
    }
    for cg in &r.removed_cgroups {
        println!("removed cgroup {cg}");
    }
    for ns in &r.net.removed_netns {
        println!("removed network namespace {ns}");
    }
    for l in &r.net.removed_veths {
        println!("removed veth {l}");
    }
    for s in &r.net.released_slots {
        println!("released network slot {s}");
    }
    if r.net.removed_host_table {
        println!("removed the host's nftables table inet dough (no vm left)");
    }
    for id in &r.kept_live {
        println!("kept vm {id} (its owner is running)");
    }
    for e in &r.errors {
        eprintln!("dough: gc: {e}");
    }
    if r.removed.is_empty()
        && r.killed.is_empty()
        && r.released_uids.is_empty()
        && r.removed_jails.is_empty()
        && r.removed_cgroups.is_empty()
        && r.net.removed_netns.is_empty()
        && r.net.removed_veths.is_empty()
        && r.net.released_slots.is_empty()
        && !r.net.removed_host_table
    {
        println!("nothing to reclaim");
    }
    Ok(if r.errors.is_empty() { 0 } else { 1 })
}
