//! `dough bench net`: per-VM network setup and teardown through Dough's
//! library (netlink, TUN ioctl, one libnftables batch) against the same
//! steps done with `ip` and `nft` commands, interleaved in one run. All of
//! it happens inside a namespace the benchmark makes and deletes, standing
//! in for the host, so the machine's own network is not touched.
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use dough_net::{Egress, NetConfig, VmNet};

#[derive(Args, Debug)]
pub struct NetArgs {
    /// Iterations of each kind.
    #[arg(short, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub n: u32,
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// Run a command; its stderr is the error when it fails.
pub(super) fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("spawn {}", args[0]))?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn sh_stdin(args: &[&str], input: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut c = Command::new(args[0])
        .args(&args[1..])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {}", args[0]))?;
    c.stdin.take().unwrap().write_all(input.as_bytes())?;
    let out = c.wait_with_output()?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The same namespace, tap, veth, addresses, routes, sysctls and ruleset,
/// one command per step (as a shell script would do it).
fn commands_setup(
    cfg: &NetConfig,
    id: &str,
    slot: u32,
    host_addrs: &[std::net::Ipv4Addr],
) -> anyhow::Result<()> {
    let ns = format!("dough-{id}");
    let veth = dough_net::host_veth(id);
    let (h, n) = cfg.slot_addrs(slot);
    let (h, n) = (format!("{h}/30"), format!("{n}/30"));
    sh(&["ip", "netns", "add", &ns])?;
    sh(&[
        "ip",
        "netns",
        "exec",
        &ns,
        "sysctl",
        "-q",
        "-w",
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
        "net.ipv4.ip_forward=1",
    ])?;
    sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
    sh(&[
        "ip", "-n", &ns, "tuntap", "add", "tap0", "mode", "tap", "vnet_hdr",
    ])?;
    sh(&[
        "ip",
        "-n",
        &ns,
        "addr",
        "add",
        "172.16.0.1/30",
        "dev",
        "tap0",
    ])?;
    sh(&["ip", "-n", &ns, "link", "set", "tap0", "up"])?;
    sh(&[
        "ip", "link", "add", &veth, "type", "veth", "peer", "name", "veth0", "netns", &ns,
    ])?;
    sh(&["ip", "addr", "add", &h, "dev", &veth])?;
    sh(&["ip", "link", "set", &veth, "up"])?;
    sh(&["ip", "-n", &ns, "addr", "add", &n, "dev", "veth0"])?;
    sh(&["ip", "-n", &ns, "link", "set", "veth0", "up"])?;
    sh(&[
        "ip",
        "-n",
        &ns,
        "route",
        "add",
        "default",
        "via",
        &cfg.slot_addrs(slot).0.to_string(),
    ])?;
    let rules = dough_net::policy::vm_ruleset(
        &Egress::Open,
        cfg.slot_addrs(slot).1,
        host_addrs,
        cfg.pool,
        false,
    );
    sh_stdin(&["ip", "netns", "exec", &ns, "nft", "-f", "-"], &rules)
}

/// As Dough's teardown: delete the namespace; the kernel takes the veth.
fn commands_teardown(id: &str) -> anyhow::Result<()> {
    sh(&["ip", "netns", "del", &format!("dough-{id}")])
}

pub fn run(a: &NetArgs) -> anyhow::Result<u8> {
    let bench_ns = format!("doughbench-{}", std::process::id());
    sh(&["ip", "netns", "add", &bench_ns])?;
    let res = in_namespace(&bench_ns, a.n);
    let _ = sh(&["ip", "netns", "del", &bench_ns]);
    let (lib_setup, lib_down, cmd_setup, cmd_down) = res?;
    let n = a.n;
    println!(
        "## dough bench net — {n} iterations each, interleaved; egress open (one VM at a time)"
    );
    println!();
    println!("| path | setup p50 | setup p99 | teardown p50 | teardown p99 |");
    println!("|---|---|---|---|---|");
    for (name, s, d) in [
        (
            "dough-net (netlink + TUN ioctl + one libnftables batch + DNS forwarder)",
            &lib_setup,
            &lib_down,
        ),
        (
            "`ip` / `nft` commands (same steps, no DNS forwarder)",
            &cmd_setup,
            &cmd_down,
        ),
    ] {
        println!(
            "| {name} | {} ms | {} ms | {} ms | {} ms |",
            ms(pct(s, 0.5)),
            ms(pct(s, 0.99)),
            ms(pct(d, 0.5)),
            ms(pct(d, 0.99))
        );
    }
    let speedup = pct(&cmd_setup, 0.5).as_secs_f64() / pct(&lib_setup, 0.5).as_secs_f64().max(1e-9);
    let down_speedup =
        pct(&cmd_down, 0.5).as_secs_f64() / pct(&lib_down, 0.5).as_secs_f64().max(1e-9);
    println!();
    println!(
        "setup p50 {} ms (target ≤ 5), **{speedup:.1}×** faster than commands (target ≥ 8); teardown p50 {} ms (target ≤ 5), {down_speedup:.1}× faster",
        ms(pct(&lib_setup, 0.5)),
        ms(pct(&lib_down, 0.5)),
    );
    Ok(0)
}

type Samples = (Vec<Duration>, Vec<Duration>, Vec<Duration>, Vec<Duration>);

/// Runs on a thread inside the benchmark's stand-in host namespace.
fn in_namespace(ns: &str, n: u32) -> anyhow::Result<Samples> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<Samples> {
            let f = std::fs::File::open(&path)?;
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
            sh(&["ip", "link", "set", "lo", "up"])?;
            let cfg = NetConfig {
                pool: dough_net::DEFAULT_POOL.parse().expect("pool"),
                dns_upstream: "127.0.0.1:53".parse().expect("addr"),
                host_nat: true,
                run_root: dough_net::RUN_ROOT.into(),
                tag: "bench".into(),
                record_egress: false,
            };
            dough_net::prepare_host(&cfg)?;
            let host_addrs = vec![std::net::Ipv4Addr::LOCALHOST];
            let mut out: Samples = Default::default();
            for i in 0..n {
                if i % 50 == 0 {
                    eprintln!("iteration {}/{n}", i + 1);
                }
                let id = format!("b{:05}{i:06}", std::process::id() % 100000);
                let t = Instant::now();
                let net = VmNet::setup(&cfg, &id, &Egress::Open, dough_net::TapSpec::ROOT_FD)?;
                out.0.push(t.elapsed());
                let slot = net.slot;
                let t = Instant::now();
                let errs = net.teardown();
                out.1.push(t.elapsed());
                if !errs.is_empty() {
                    bail!("teardown: {errs:?}");
                }
                // The command path uses the same slot, and names of its own
                // (the kernel may still be destroying the library's veth).
                let cid = format!("c{}", &id[1..]);
                let t = Instant::now();
                let r = commands_setup(&cfg, &cid, slot, &host_addrs);
                out.2.push(t.elapsed());
                let t = Instant::now();
                let d = commands_teardown(&cid);
                r.and(d)?;
                out.3.push(t.elapsed());
            }
            Ok(out)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("benchmark thread panicked"))?
    })
}
