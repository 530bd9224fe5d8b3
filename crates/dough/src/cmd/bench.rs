//! `dough bench boot`: where the time of a cold run goes, against a bare
//! boot of the same kernel measured in the same run.
use std::time::Duration;

use clap::{Args, Subcommand};
use dough_core::supervisor::{bare_boot, Phase};
use dough_core::{run_task, Outcome, TaskSpec};
use dough_vmm::{AccelChoice, BackendChoice};

use crate::Cli;

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Cold `dough run -- true` split into phases, vs bare boots.
    Boot(BootArgs),
    /// Per-VM network setup/teardown: dough-net vs `ip`/`nft` commands.
    Net(super::bench_net::NetArgs),
    /// The daemon: POST throughput, scheduler latency, memory per VM.
    Serve(super::bench_serve::ServeBenchArgs),
    /// Task asked → command running, per start path: cold boots (Debian,
    /// minimal kernel), snapshot clone, warm-pool claim; pool refill rates.
    Start(BootArgs),
    /// Image builds (nothing cached, unchanged, last step changed), the OCI
    /// import rate vs `tar -x`, and a task's start on a big image vs the
    /// default image.
    Image(super::bench_image::ImageBenchArgs),
    /// Tasks through the daemon while faults land on them (VMM killed or
    /// stopped, vsock backend killed, daemon restarted, guest panic, OOM,
    /// disk full, output flood, cancels); every end checked, then a leak
    /// audit. The same seed gives the same plan.
    Faults(super::bench_faults::FaultsArgs),
    /// Many short tasks through a daemon with a warm pool: all succeed, the
    /// daemon's RSS and descriptors first and last, then the leak audit.
    Soak(super::bench_faults::SoakArgs),
    /// Nodes on one PostgreSQL store: submit and claim rates with 1, 3 and
    /// 20 nodes, a node's death to its task settled, scheduler latency
    /// against SQLite.
    Cluster(super::bench_cluster::ClusterBenchArgs),
    /// The egress record's cost: connection rate and download throughput
    /// from a guest with the record on and off (interleaved), and the
    /// record's size for a task opening 10 000 connections.
    Egress(super::bench_egress::EgressBenchArgs),
}

#[derive(Args, Debug)]
pub struct BootArgs {
    /// Runs of each kind, or start path (interleaved).
    #[arg(short, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub n: u32,
    #[arg(long, default_value = "auto")]
    pub accel: AccelChoice,
    #[arg(long, default_value = "auto")]
    pub backend: BackendChoice,
}

pub(super) fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

pub async fn run(cli: &Cli, c: &BenchCmd) -> anyhow::Result<u8> {
    let a = match c {
        BenchCmd::Boot(a) => a,
        BenchCmd::Net(n) => return super::bench_net::run(n),
        BenchCmd::Serve(s) => return super::bench_serve::run(s),
        BenchCmd::Start(s) => return super::bench_start::run(cli, s).await,
        BenchCmd::Image(i) => return super::bench_image::run(cli, i).await,
        BenchCmd::Faults(f) => return super::bench_faults::run(f),
        BenchCmd::Soak(s) => return super::bench_faults::soak(s),
        BenchCmd::Cluster(c) => return super::bench_cluster::run(c),
        BenchCmd::Egress(e) => return super::bench_egress::run(cli, e).await,
    };
    let host = super::host_config(cli, a.accel, a.backend);
    let spec = TaskSpec {
        command: vec!["true".into()],
        ..TaskSpec::default()
    };
    let (mut spawned, mut hello, mut started, mut done, mut teardown, mut bare) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for i in 0..a.n {
        eprintln!("run {}/{}", i + 1, a.n);
        let rep = run_task(&host, &spec, &mut |_| {}, std::future::pending()).await;
        match rep.result {
            Ok(Outcome::Exited(s)) if s.shell_code() == 0 => {}
            Ok(o) => anyhow::bail!("bench run ended {o:?}"),
            Err(e) => return Err(e.into()),
        }
        let p = |x| rep.phase(x).unwrap_or_default();
        spawned.push(p(Phase::Spawned));
        hello.push(p(Phase::Hello));
        started.push(p(Phase::Started));
        done.push(p(Phase::Done));
        teardown.push(p(Phase::TornDown) - p(Phase::Done));
        bare.push(bare_boot(&host, spec.vcpus, spec.memory_mib).await?);
    }
    let (m_sp, m_he, m_st, m_do, m_td, m_bare) = (
        median(spawned),
        median(hello),
        median(started),
        median(done),
        median(teardown),
        median(bare),
    );
    let accel = host.facts.choose(a.accel).map_err(anyhow::Error::msg)?;
    println!(
        "## dough bench boot — {} runs each, qemu/{accel}, 1 vCPU, 512 MiB; medians",
        a.n
    );
    println!();
    println!("| phase (from start of `dough run`) | ms |");
    println!("|---|---|");
    println!("| VMM spawned | {} |", ms(m_sp));
    println!("| Hello received | {} |", ms(m_he));
    println!("| command started | {} |", ms(m_st));
    println!("| command done | {} |", ms(m_do));
    println!("| teardown (done → all gone) | {} |", ms(m_td));
    println!(
        "| bare boot (VMM spawn → exit, init powers off at once) | {} |",
        ms(m_bare)
    );
    println!();
    let to_hello = m_he.saturating_sub(m_sp);
    let ratio = to_hello.as_secs_f64() / m_bare.as_secs_f64().max(1e-9);
    println!(
        "time to Hello (spawn → Hello) {} ms / bare boot {} ms = **{ratio:.2}** (target ≤ 1.15); teardown {} ms (target ≤ 100)",
        ms(to_hello),
        ms(m_bare),
        ms(m_td)
    );
    Ok(0)
}
