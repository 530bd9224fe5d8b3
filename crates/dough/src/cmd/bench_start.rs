//! `dough bench start`: time from asking for a task to its command running,
//! per start path, interleaved in one run; medians and ratios against the
//! cold boot of Debian's kernel measured in the same run.
use std::time::Duration;

use clap::Args;
use dough_core::supervisor::Phase;
use dough_core::{run_task, Outcome, TaskSpec};
use dough_image::KernelChoice;
use dough_vmm::{AccelChoice, BackendChoice};

use super::bench::median;
use crate::Cli;

#[derive(Args, Debug)]
pub struct StartArgs {
    /// Runs of each start path (interleaved).
    #[arg(short, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub n: u32,
    #[arg(long, default_value = "auto")]
    pub accel: AccelChoice,
    #[arg(long, default_value = "auto")]
    pub backend: BackendChoice,
}

pub async fn run(cli: &Cli, a: &StartArgs) -> anyhow::Result<u8> {
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
    for i in 0..a.n {
        for (k, (name, choice, mitigations)) in paths.iter().enumerate() {
            eprintln!("run {}/{}: {name}", i + 1, a.n);
            let mut host = base.clone();
            host.kernel = *choice;
            host.guest_mitigations = *mitigations;
            let rep = run_task(&host, &spec, &mut |_| {}, std::future::pending()).await;
            match rep.result {
                Ok(Outcome::Exited(s)) if s.shell_code() == 0 => {}
                Ok(o) => anyhow::bail!("{name}: the run ended {o:?}"),
                Err(e) => return Err(anyhow::Error::new(e).context(name.to_string())),
            }
            samples[k].push(rep.phase(Phase::Started).unwrap_or_default());
            hello_at[k].push(rep.phase(Phase::Hello).unwrap_or_default());
            guest_ms[k].push(rep.hello.map_or(0, |h| h.boot_ms));
        }
    }
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
    Ok(0)
}
