//! `dough bench start`: time from asking for a task to its command running,
//! per start path, interleaved in one run; medians and ratios against the
//! cold boot of Debian's kernel measured in the same run. Also the warm
//! pool's claim (a VM booted to Hello beforehand, as `dough serve
//! --pool-size` keeps them), a snapshot clone (restore of a template made
//! once) and how fast a pool refills with cold boots and with clones.
use std::time::Duration;

use dough_core::supervisor::boot_idle;
use dough_core::supervisor::Phase;
use dough_core::{run_task, Outcome, RunReport, TaskSpec};
use dough_image::KernelChoice;

use super::bench::{median, BootArgs};
use crate::Cli;

pub async fn run(cli: &Cli, a: &BootArgs) -> anyhow::Result<u8> {
    let base = super::host_config_net(cli, a.accel, a.backend)?;
    let image = dough_image::Image::load(&base.image_dir)?;
    let mut paths = vec![("cold boot, Debian kernel", KernelChoice::Debian, true)];
    if image.kernel_minimal.is_some() {
        paths.push(("cold boot, minimal kernel", KernelChoice::Minimal, true));
        paths.push((
            "cold boot, minimal kernel, guest mitigations off",
            KernelChoice::Minimal,
            false,
        ));
    } else {
        eprintln!(
            "the image has no minimal kernel (built with --kernels debian): only the Debian row"
        );
    }
    let spec = TaskSpec {
        command: vec!["true".into()],
        ..TaskSpec::default()
    };
    let mut samples: Vec<Vec<Duration>> = vec![vec![]; paths.len()];
    let mut guest_ms: Vec<Vec<u64>> = vec![vec![]; paths.len()];
    let mut hello_at: Vec<Vec<Duration>> = vec![vec![]; paths.len()];
    // The default kernel: what a pool of `dough serve` boots.
    let mut claims: Vec<Duration> = vec![];
    let mut assigned: Vec<Duration> = vec![];
    let check = |name: &str, rep: &RunReport| -> anyhow::Result<()> {
        match &rep.result {
            Ok(Outcome::Exited(s)) if s.shell_code() == 0 => Ok(()),
            Ok(o) => anyhow::bail!("{name}: the run ended {o:?}"),
            Err(e) => anyhow::bail!("{name}: {e}"),
        }
    };
    // Snapshot clones: one template, then a clone per run.
    eprintln!("making a snapshot template");
    let template = match dough_core::snapshot::make_template(&base, &spec).await {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("no snapshot row: the template failed: {e}");
            None
        }
    };
    let mut clones: Vec<Duration> = vec![];
    let mut clone_claims: Vec<Duration> = vec![];
    for i in 0..a.n {
        for (k, (name, choice, mitigations)) in paths.iter().enumerate() {
            eprintln!("run {}/{}: {name}", i + 1, a.n);
            let mut host = base.clone();
            host.kernel = *choice;
            host.guest_mitigations = *mitigations;
            let rep = run_task(&host, &spec, &mut |_| {}, std::future::pending()).await;
            check(name, &rep)?;
            samples[k].push(rep.phase(Phase::Started).unwrap_or_default());
            hello_at[k].push(rep.phase(Phase::Hello).unwrap_or_default());
            guest_ms[k].push(rep.hello.map_or(0, |h| h.boot_ms));
        }
        if let Some(t) = &template {
            eprintln!("run {}/{}: snapshot clone", i + 1, a.n);
            let t0 = std::time::Instant::now();
            let vm = dough_core::snapshot::clone_vm(&base, t, &spec).await?;
            let restored = t0.elapsed();
            let rep = vm.run(&spec, &mut |_| {}, std::future::pending()).await;
            check("snapshot clone", &rep)?;
            clones.push(restored + rep.phase(Phase::Started).unwrap_or_default());

            eprintln!("run {}/{}: warm pool claim, clone", i + 1, a.n);
            let vm = dough_core::snapshot::clone_vm(&base, t, &spec).await?;
            let rep = claim(vm, &spec).await;
            check("warm pool claim, clone", &rep)?;
            clone_claims.push(rep.phase(Phase::Started).unwrap_or_default());
        }
        eprintln!("run {}/{}: warm pool claim", i + 1, a.n);
        let rep = claim(boot_idle(&base, &spec).await?, &spec).await;
        check("warm pool claim", &rep)?;
        claims.push(rep.phase(Phase::Started).unwrap_or_default());
        assigned.push(rep.phase(Phase::Assigned).unwrap_or_default());
    }
    // Refill: a pool of n refills all of its VMs at once; VMs ready per
    // second of wall time, with cold boots and with clones.
    let template = template.map(std::sync::Arc::new);
    eprintln!("refill: {} cold boots at once", a.n);
    let refill = refill_time(a.n, &base, &spec, None).await?;
    let clone_refill = match &template {
        Some(t) => {
            eprintln!("refill: {} clones at once", a.n);
            Some(refill_time(a.n, &base, &spec, Some(t.clone())).await?)
        }
        None => None,
    };
    let baseline = median(samples[0].clone());
    println!(
        "start path | command running (median of {}) | Hello received | guest uptime at Hello | vs Debian cold boot",
        a.n
    );
    println!("---|---|---|---|---");
    for (k, (name, _, _)) in paths.iter().enumerate() {
        let m = median(samples[k].clone());
        let mut g = guest_ms[k].clone();
        g.sort();
        println!(
            "{name} | {:.1} ms | {:.1} ms | {} ms | {:.2}×",
            m.as_secs_f64() * 1000.0,
            median(hello_at[k].clone()).as_secs_f64() * 1000.0,
            g.get(g.len() / 2).copied().unwrap_or(0),
            m.as_secs_f64() / baseline.as_secs_f64().max(1e-9)
        );
    }
    if let Some(t) = &template {
        let m = median(clones.clone());
        println!(
            "snapshot clone (restore, reseed, run; template made once in {:.1} s) | {:.1} ms | — | — | {:.3}× ({:.1}× faster)",
            t.made_in.as_secs_f64(),
            m.as_secs_f64() * 1000.0,
            m.as_secs_f64() / baseline.as_secs_f64().max(1e-9),
            baseline.as_secs_f64() / m.as_secs_f64().max(1e-9)
        );
        let _ = t.remove();
    }
    if !clone_claims.is_empty() {
        let m = median(clone_claims.clone());
        println!(
            "warm pool claim, VM a snapshot clone (as `dough serve` pools refill) | {:.1} ms | — | — | {:.3}×",
            m.as_secs_f64() * 1000.0,
            m.as_secs_f64() / baseline.as_secs_f64().max(1e-9)
        );
    }
    let m = median(claims.clone());
    let mut c = claims.clone();
    c.sort();
    println!(
        "warm pool claim, VM cold-booted (max {:.1} ms) | {:.1} ms | — | — | {:.3}×",
        c.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
        m.as_secs_f64() * 1000.0,
        m.as_secs_f64() / baseline.as_secs_f64().max(1e-9)
    );
    println!(
        "\nwarm pool claim, host side (egress policy applied, Assign sent): p50 {:.2} ms; the rest of the claim row is the guest starting the process",
        median(assigned).as_secs_f64() * 1000.0
    );
    if let Some(r) = clone_refill {
        println!(
            "\npool refill with snapshot clones ({} VMs at once): {:.2} VMs/s ({:.1} s)",
            a.n,
            a.n as f64 / r.as_secs_f64().max(1e-9),
            r.as_secs_f64()
        );
    }
    println!(
        "pool refill with cold boots ({} VMs at once, {} kernel): {:.2} VMs/s ({:.1} s)",
        a.n,
        if image.kernel_minimal.is_some() {
            "minimal"
        } else {
            "Debian"
        },
        a.n as f64 / refill.as_secs_f64().max(1e-9),
        refill.as_secs_f64()
    );
    Ok(0)
}

/// Wall time to make `n` idle VMs at once (as a pool refills): cold boots,
/// or clones of `template`.
async fn refill_time(
    n: u32,
    base: &dough_core::HostConfig,
    spec: &TaskSpec,
    template: Option<std::sync::Arc<dough_core::snapshot::Template>>,
) -> anyhow::Result<Duration> {
    let t = std::time::Instant::now();
    let local = tokio::task::LocalSet::new();
    let booted = local
        .run_until(async {
            let handles: Vec<_> = (0..n)
                .map(|_| {
                    let (host, spec, tpl) = (base.clone(), spec.clone(), template.clone());
                    tokio::task::spawn_local(async move {
                        match tpl {
                            Some(t) => dough_core::snapshot::clone_vm(&host, &t, &spec).await,
                            None => boot_idle(&host, &spec).await,
                        }
                    })
                })
                .collect();
            let mut out = vec![];
            for h in handles {
                out.push(h.await);
            }
            out
        })
        .await;
    let took = t.elapsed();
    let mut failed = None;
    for b in booted {
        match b {
            Ok(Ok(vm)) => {
                vm.discard().await;
            }
            Ok(Err(e)) => failed = Some(e.to_string()),
            Err(e) => failed = Some(e.to_string()),
        }
    }
    match failed {
        Some(e) => anyhow::bail!("refill: a boot failed: {e}"),
        None => Ok(took),
    }
}

/// Run `spec` in an idle VM after it has waited as a pooled VM does (and
/// warmed its page cache meanwhile).
async fn claim(vm: dough_core::BootedVm, spec: &TaskSpec) -> RunReport {
    tokio::time::sleep(Duration::from_secs(2)).await;
    vm.run(spec, &mut |_| {}, std::future::pending()).await
}
