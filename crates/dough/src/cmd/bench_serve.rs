//! `dough bench serve`: the daemon's own costs, each measured against the
//! real `dough serve` binary in a state dir of its own:
//! * `POST /v1/tasks` throughput for tasks that stay queued (`--max-vms 0`);
//! * scheduler latency, room freed → next task provisioning (`--max-vms 1`,
//!   a queue of short tasks), as the daemon records it;
//! * the daemon's resident memory per running VM (VMMs are separate
//!   processes and not counted).
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

#[derive(Args, Debug)]
pub struct ServeBenchArgs {
    /// Tasks to POST for the throughput measurement.
    #[arg(long, default_value_t = 20000)]
    pub posts: u32,
    /// Client threads posting at once.
    #[arg(long, default_value_t = 4)]
    pub clients: u32,
    /// Short tasks through a one-VM scheduler (latency samples = this - 1).
    #[arg(long, default_value_t = 6)]
    pub queue: u32,
    /// VMs running at once for the memory measurement.
    #[arg(long, default_value_t = 4)]
    pub vms: u32,
}

/// A `dough serve` of a bench's own, in a state dir of its own (also used
/// by `dough bench faults`).
pub(super) struct Daemon {
    pub(super) child: Child,
    pub(super) url: String,
    pub(super) token: String,
    pub(super) dir: std::path::PathBuf,
}

impl Daemon {
    pub(super) fn start(dir: &std::path::Path, args: &[&str]) -> anyhow::Result<Daemon> {
        Self::start_logged(dir, args, None)
    }

    /// As [`Daemon::start`], its stderr appended to `log`.
    pub(super) fn start_logged(
        dir: &std::path::Path,
        args: &[&str],
        log: Option<&std::path::Path>,
    ) -> anyhow::Result<Daemon> {
        std::fs::create_dir_all(dir)?;
        let _ = std::fs::remove_file(dir.join("api-url"));
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("--state-dir")
            .arg(dir)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(match log {
                Some(p) => Stdio::from(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)?,
                ),
                None => Stdio::null(),
            });
        if let Ok(img) = std::env::var("DOUGH_IMAGE_DIR") {
            cmd.env("DOUGH_IMAGE_DIR", img);
        } else {
            cmd.env(
                "DOUGH_IMAGE_DIR",
                dough_image::Image::dir_in(std::path::Path::new(
                    dough_core::config::DEFAULT_STATE_DIR,
                )),
            );
        }
        let child = cmd.spawn().context("start dough serve")?;
        let t = Instant::now();
        while !dir.join("api-url").exists() {
            if t.elapsed() > Duration::from_secs(20) {
                bail!("dough serve did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Daemon {
            child,
            url: std::fs::read_to_string(dir.join("api-url"))?
                .trim()
                .to_string(),
            token: std::fs::read_to_string(dir.join("api-token"))?
                .trim()
                .to_string(),
            dir: dir.to_path_buf(),
        })
    }

    pub(super) fn agent() -> ureq::Agent {
        ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(30))
            .build()
    }

    pub(super) fn post(&self, a: &ureq::Agent, body: &Value) -> anyhow::Result<String> {
        let r: Value = a
            .post(&format!("{}/v1/tasks", self.url))
            .set("Authorization", &format!("Bearer {}", self.token))
            .send_json(body.clone())?
            .into_json()?;
        Ok(r["id"].as_str().unwrap_or_default().to_string())
    }

    pub(super) fn get(&self, a: &ureq::Agent, path: &str) -> anyhow::Result<ureq::Response> {
        Ok(a.get(&format!("{}{path}", self.url))
            .set("Authorization", &format!("Bearer {}", self.token))
            .call()?)
    }

    pub(super) fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    }

    pub(super) fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(super) fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn wait_all_terminal(d: &Daemon, a: &ureq::Agent, n: usize, limit: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        let m = d.get(a, "/metrics")?.into_string()?;
        let done: f64 = ["succeeded", "failed", "cancelled", "timed_out"]
            .iter()
            .filter_map(|s| metric(&m, &format!("dough_tasks{{state=\"{s}\"}}")))
            .sum();
        if done as usize >= n {
            return Ok(());
        }
        if t.elapsed() > limit {
            bail!("tasks did not finish in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn run(a: &ServeBenchArgs) -> anyhow::Result<u8> {
    let base = std::env::temp_dir().join(format!("dough-bench-serve-{}", std::process::id()));

    // 1. Throughput of POST /v1/tasks (queued only).
    let d = Daemon::start(&base.join("post"), &["--max-vms", "0"])?;
    let body = json!({"command": ["true"], "labels": {"bench": "post"}});
    let per = a.posts / a.clients.max(1);
    let t = Instant::now();
    let handles: Vec<_> = (0..a.clients)
        .map(|_| {
            let (url, token, body) = (d.url.clone(), d.token.clone(), body.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let ag = Daemon::agent();
                for _ in 0..per {
                    ag.post(&format!("{url}/v1/tasks"))
                        .set("Authorization", &format!("Bearer {token}"))
                        .send_json(body.clone())?;
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    let el = t.elapsed();
    let posted = per * a.clients;
    let rate = posted as f64 / el.as_secs_f64();
    let m = d.get(&Daemon::agent(), "/metrics")?.into_string()?;
    let queued = metric(&m, "dough_tasks{state=\"queued\"}").unwrap_or(0.0) as u32;
    d.stop();
    if queued != posted {
        bail!("{posted} posted but {queued} queued");
    }

    // 2. Scheduler latency with one VM at a time.
    let d = Daemon::start(&base.join("sched"), &["--max-vms", "1"])?;
    let ag = Daemon::agent();
    for _ in 0..a.queue {
        d.post(&ag, &json!({"command": ["true"]}))?;
    }
    wait_all_terminal(
        &d,
        &ag,
        a.queue as usize,
        Duration::from_secs(60 * a.queue as u64),
    )?;
    let m = d.get(&ag, "/metrics")?.into_string()?;
    let p50 = metric(&m, "dough_scheduler_latency_seconds{quantile=\"0.5\"}").unwrap_or(0.0);
    let p99 = metric(&m, "dough_scheduler_latency_seconds{quantile=\"0.99\"}").unwrap_or(0.0);
    let samples = metric(&m, "dough_scheduler_latency_seconds_count").unwrap_or(0.0);
    d.stop();

    // 3. Resident memory per running VM.
    let d = Daemon::start(&base.join("mem"), &["--max-vms", &a.vms.to_string()])?;
    // One task first, so code and one-time state of the VM path are already
    // resident: what remains is the cost of each running VM.
    d.post(&ag, &json!({"command": ["true"]}))?;
    wait_all_terminal(&d, &ag, 1, Duration::from_secs(120))?;
    std::thread::sleep(Duration::from_millis(500));
    let idle = d.rss_kib();
    let ids: Vec<String> = (0..a.vms)
        .map(|_| d.post(&ag, &json!({"command": ["sh", "-c", "echo up; sleep 30"]})))
        .collect::<anyhow::Result<_>>()?;
    let t = Instant::now();
    loop {
        let m = d.get(&ag, "/metrics")?.into_string()?;
        if metric(&m, "dough_tasks{state=\"running\"}").unwrap_or(0.0) as u32 == a.vms {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("the VMs did not all start");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    let busy = d.rss_kib();
    for id in &ids {
        let _ = ag
            .delete(&format!("{}/v1/tasks/{id}", d.url))
            .set("Authorization", &format!("Bearer {}", d.token))
            .call();
    }
    wait_all_terminal(&d, &ag, a.vms as usize + 1, Duration::from_secs(60))?;
    d.stop();
    let per_vm = busy.saturating_sub(idle) as f64 / a.vms as f64;

    println!("## dough bench serve — one run");
    println!();
    println!("| measure | result | target |");
    println!("|---|---|---|");
    println!(
        "| `POST /v1/tasks` (queued), {posted} requests, {} clients | **{rate:.0}/s** ({:.2} s) | ≥ 2000/s |",
        a.clients,
        el.as_secs_f64()
    );
    println!(
        "| scheduler latency, room freed → next provisioning ({samples:.0} samples) | p50 **{:.2} ms**, p99 {:.2} ms | p50 ≤ 10 ms |",
        p50 * 1000.0,
        p99 * 1000.0
    );
    println!(
        "| daemon RSS per running VM (after one warm-up task: idle {idle} KiB, {} VMs {busy} KiB) | **{:.0} KiB** | ≤ 1024 KiB |",
        a.vms, per_vm
    );
    Ok(0)
}
