//! `dough run -- CMD`.
use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use dough_core::repo::{Finalized, PullRequestRequest, RepoError, RepoRequest};
use dough_core::{run_task, Event, Outcome, Phase, RunError, TaskSpec};
use dough_net::Egress;
use dough_proto::Stream;
use dough_vmm::{AccelChoice, BackendChoice};

use crate::{Cli, EXIT_DOUGH};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Run this agent preset (`dough agents`): its image, command, secrets,
    /// allowlist and resources, each unless given here.
    #[arg(long, value_name = "NAME")]
    pub agent: Option<String>,
    /// With --agent: the model API's address (an enterprise gateway, a
    /// self-hosted model); the allowlist follows it.
    #[arg(long, value_name = "URL", requires = "agent")]
    pub model_url: Option<String>,
    /// Virtual CPUs [default: 1, or the agent preset's].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vcpus: Option<u32>,
    /// Guest memory in MiB [default: 512, or the agent preset's].
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(128..=262144))]
    pub memory: Option<u32>,
    /// Kill the task after SECS seconds and exit 124.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: Option<u64>,
    /// Give up if the guest has not said Hello after SECS seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub boot_timeout: u64,
    /// At the end, print on stderr where the time went: host set-up, boot,
    /// clone, the task, teardown, and gate/push/pull request.
    #[arg(long)]
    pub timings: bool,
    /// At the end, print what the guest did on the network ("dough:
    /// network: reached 3 hosts, 1 blocked: 10.0.0.5:22") also when stderr
    /// is not a terminal (on a terminal it is always printed; otherwise
    /// stderr carries only the task's own unless asked).
    #[arg(long)]
    pub network_summary: bool,
    /// Set an environment variable for the task (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Run as root in the guest instead of the unprivileged `dough` user.
    #[arg(long)]
    pub root: bool,
    /// Working directory in the guest (default: the user's home).
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// Scratch disk size (the guest's writable layer) in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(64..=1048576))]
    pub disk: u64,
    /// The image to boot (`dough image ls`) [default: default].
    #[arg(long, value_name = "NAME")]
    pub image: Option<String>,
    /// Accelerator: auto picks KVM only where it boots a guest, else TCG.
    #[arg(long, default_value = "auto")]
    pub accel: AccelChoice,
    /// VMM: auto picks firecracker where KVM works and it is installed, else qemu.
    #[arg(long, default_value = "auto")]
    pub backend: BackendChoice,
    /// Run the VMM unconfined (as Dough's own user, in Dough's mount
    /// namespace, no cgroup). Confinement is on by default when run as root.
    #[arg(long)]
    pub no_confine: bool,
    #[command(flatten)]
    pub net: EgressArgs,
    /// No network device at all (vsock only).
    #[arg(long, conflicts_with_all = ["egress", "allow_host", "allow_cidr"])]
    pub no_network: bool,
    /// Upstream DNS server for the VM's resolver [default: the host's
    /// /etc/resolv.conf; env DOUGH_DNS].
    #[arg(long, value_name = "ADDR", value_parser = dough_core::config::parse_dns)]
    pub dns: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The command and its arguments, after `--` (with --agent: the
    /// preset's unless given).
    #[arg(last = true, required_unless_present = "agent", value_name = "CMD")]
    pub command: Vec<String>,
}

/// Where a VM may connect (`dough run`, and the steps of `dough image build`).
#[derive(Args, Debug, Clone, Default)]
pub struct EgressArgs {
    /// Where the VM may connect: `open` (the internet, never the host, other
    /// VMs, private ranges or metadata), `none` (nothing, not even DNS), or
    /// `allowlist` (implied by --allow-host/--allow-cidr).
    #[arg(long, value_name = "MODE", value_parser = ["open", "none", "allowlist"])]
    pub egress: Option<String>,
    /// Allow this DNS name (or `*.domain`): only addresses Dough's resolver
    /// answers for it are reachable, for their TTL (repeatable).
    #[arg(long = "allow-host", value_name = "NAME")]
    pub allow_host: Vec<String>,
    /// Allow this IPv4 network (repeatable); may open a private range, never
    /// the host, loopback, link-local or the slot pool.
    #[arg(long = "allow-cidr", value_name = "CIDR")]
    pub allow_cidr: Vec<dough_net::Cidr>,
}

impl EgressArgs {
    /// Whether any of the flags was given.
    pub fn given(&self) -> bool {
        self.egress.is_some() || !self.allow_host.is_empty() || !self.allow_cidr.is_empty()
    }

    /// The policy the flags say (`open` when none is given).
    pub fn egress(&self) -> anyhow::Result<Egress> {
        Egress::from_flags(
            self.egress.as_deref(),
            self.allow_host.clone(),
            self.allow_cidr.clone(),
        )
        .map_err(anyhow::Error::msg)
    }
}

/// A task on a repository: clone, run, commit, push, pull request.
#[derive(Args, Debug, Default)]
pub struct RepoArgs {
    /// Clone this repository (https:// URL) into the guest's work directory
    /// first; what the task changes comes back as a branch and a pull
    /// request. The host's DOUGH_GIT_TOKEN pushes and DOUGH_FORGE_TOKEN opens
    /// the pull request; neither enters the VM.
    #[arg(long, value_name = "URL", help_heading = "Repository")]
    pub repo: Option<String>,
    /// Branch to start from [default: the remote's default branch].
    #[arg(
        long,
        value_name = "BRANCH",
        requires = "repo",
        help_heading = "Repository"
    )]
    pub base: Option<String>,
    /// Branch for the work [default: dough/<task id>].
    #[arg(
        long,
        value_name = "NAME",
        requires = "repo",
        help_heading = "Repository"
    )]
    pub branch: Option<String>,
    /// The task's instructions, as the file $DOUGH_PROMPT_FILE in the guest.
    #[arg(
        long,
        value_name = "TEXT",
        conflicts_with = "prompt_file",
        help_heading = "Repository"
    )]
    pub prompt: Option<String>,
    /// Read the prompt from this file.
    #[arg(long, value_name = "FILE", help_heading = "Repository")]
    pub prompt_file: Option<std::path::PathBuf>,
    /// Message of the commit made of what the task left uncommitted.
    #[arg(
        long,
        value_name = "MSG",
        requires = "repo",
        help_heading = "Repository"
    )]
    pub commit_message: Option<String>,
    /// Author of that commit, `Name <email>` [default: Dough <dough@localhost>].
    #[arg(
        long,
        value_name = "AUTHOR",
        requires = "repo",
        help_heading = "Repository"
    )]
    pub commit_author: Option<String>,
    /// Pull request title [default: the commit message's first line].
    #[arg(long, value_name = "T", requires = "repo", help_heading = "Repository")]
    pub pr_title: Option<String>,
    /// Pull request body (Dough appends the task's record).
    #[arg(long, value_name = "B", requires = "repo", help_heading = "Repository")]
    pub pr_body: Option<String>,
    /// The forge's API flavour.
    #[arg(long, value_name = "KIND", value_parser = ["github", "gitea", "forgejo"], requires = "repo", help_heading = "Repository")]
    pub forge: Option<String>,
    /// The forge's API base URL [default: from the repository's host].
    #[arg(
        long,
        value_name = "URL",
        requires = "repo",
        help_heading = "Repository"
    )]
    pub forge_api: Option<String>,
    /// Let the task change protected paths (CI definitions such as
    /// .github/workflows/**; see DOUGH_PROTECTED_PATHS).
    #[arg(long, requires = "repo", help_heading = "Repository")]
    pub allow_protected: bool,
    /// If the task fails after changing the repository, push what it left
    /// to the branch anyway (gated; no pull request). Off: nothing of a
    /// failed task is pushed.
    #[arg(long, requires = "repo", help_heading = "Repository")]
    pub push_partial: bool,
    /// Pass this variable from Dough's environment to the task (e.g. an
    /// agent's API key); repeatable. Never stored, never in the guest's argv.
    #[arg(long = "secret-env", value_name = "NAME", help_heading = "Repository")]
    pub secret_env: Vec<String>,
    /// Print the result as JSON on stdout (the task's output goes to stderr).
    #[arg(long)]
    pub json: bool,
}

impl RepoArgs {
    /// `--prompt`, or the contents of `--prompt-file`.
    pub fn prompt_text(&self) -> anyhow::Result<Option<String>> {
        Ok(match (&self.prompt, &self.prompt_file) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(f)) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("--prompt-file {}", f.display()))?,
            ),
            (None, None) => None,
        })
    }

    pub fn request(&self) -> Option<(RepoRequest, PullRequestRequest)> {
        let url = self.repo.clone()?;
        Some((
            RepoRequest {
                url,
                base: self.base.clone(),
                branch: self.branch.clone(),
                commit_message: self.commit_message.clone(),
                author: self.commit_author.clone(),
            },
            PullRequestRequest {
                title: self.pr_title.clone(),
                body: self.pr_body.clone(),
                forge: self.forge.as_deref().and_then(|f| f.parse().ok()),
                api: self.forge_api.clone(),
                allow_protected: self.allow_protected,
                push_partial: self.push_partial,
            },
        ))
    }
}

pub fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not K=V"))?;
    if k.is_empty() || k.contains('\0') || v.contains('\0') {
        return Err(format!(
            "`{s}`: the name must be non-empty and neither part may hold NUL"
        ));
    }
    Ok((k.to_string(), v.to_string()))
}

/// Resolves to a signal number on SIGINT or SIGTERM.
pub async fn interrupted() -> i32 {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => libc_sig(nix::sys::signal::Signal::SIGINT),
        _ = term.recv() => libc_sig(nix::sys::signal::Signal::SIGTERM),
    }
}

fn libc_sig(s: nix::sys::signal::Signal) -> i32 {
    s as i32
}

pub async fn run(cli: &Cli, a: &RunArgs) -> anyhow::Result<u8> {
    let prepared = (|| -> anyhow::Result<_> {
        let mut host = super::host_config_net(cli, a.accel, a.backend)?;
        if a.no_confine {
            host.confine = false;
        }
        if a.dns.is_some() {
            host.dns_upstream = a.dns;
        }
        let agent = match &a.agent {
            Some(name) => Some(
                dough_core::agents::find(&host.state_dir, name)
                    .map_err(|e| anyhow::anyhow!("--agent: {e}"))?
                    .0,
            ),
            None => None,
        };
        let given_egress = a.net.given();
        let network = if a.no_network {
            None
        } else {
            Some(a.net.egress()?)
        };
        let mut env = a.env.clone();
        let mut secret_env = a.repo.secret_env.clone();
        let mut network = network;
        if let Some(p) = &agent {
            let dough_core::agents::TaskNetwork {
                env: penv,
                hosts,
                cidrs,
            } = p
                .task_network(a.model_url.as_deref())
                .map_err(|e| anyhow::anyhow!("--agent {}: {e}", p.name))?;
            // The user's own variables win.
            for (k, v) in penv {
                if !env.iter().any(|(k2, _)| *k2 == k) {
                    env.push((k, v));
                }
            }
            for s in &p.task.secret_env {
                if std::env::var_os(s).is_none() {
                    anyhow::bail!(
                        "--agent {}: it needs {s} in this environment (the key stays on the host until the task starts; see docs/agents.md)",
                        p.name
                    );
                }
                if !secret_env.contains(s) {
                    secret_env.push(s.clone());
                }
            }
            // The preset's allowlist unless the flags said otherwise.
            if !given_egress && network.is_some() {
                network = Some(
                    Egress::from_flags(Some("allowlist"), hosts, cidrs)
                        .map_err(anyhow::Error::msg)?,
                );
            }
        }
        for name in &secret_env {
            let v = std::env::var(name).map_err(|_| {
                anyhow::anyhow!("--secret-env {name}: {name} is not set in this environment")
            })?;
            if name.starts_with("DOUGH_") {
                anyhow::bail!("--secret-env {name}: Dough's own settings never go to a task");
            }
            env.push((name.clone(), v));
        }
        let prompt = a.repo.prompt_text()?;
        let repo = a.repo.request();
        if repo.is_some() && matches!(network, None | Some(Egress::None)) {
            anyhow::bail!(
                "--repo needs the VM's network (the guest clones over it): drop --no-network / --egress none"
            );
        }
        if let Some((r, p)) = &repo {
            dough_core::repo::validate(r).map_err(|e| anyhow::anyhow!("--repo: {e}"))?;
            dough_core::repo::validate_pull_request(p)
                .map_err(|e| anyhow::anyhow!("--forge-api: {e}"))?;
        }
        let gate = dough_core::repo::GateConfig::from_env().map_err(anyhow::Error::msg)?;
        let image_name = a
            .image
            .clone()
            .or_else(|| agent.as_ref().map(|p| p.image.name.clone()));
        let image = match &image_name {
            None => None,
            Some(name) => Some(super::load_image(&host, name).map_err(|e| match &agent {
                Some(p) if a.image.is_none() => e.context(format!(
                    "--agent {}: its image is not built here: dough image build --agent {}",
                    p.name, p.name
                )),
                _ => e,
            })?),
        };
        let command = match (&agent, a.command.is_empty()) {
            (Some(p), true) => p.task.command.clone(),
            _ => a.command.clone(),
        };
        let vcpus = a
            .vcpus
            .or(agent.as_ref().and_then(|p| p.task.vcpus))
            .unwrap_or(1);
        let memory = a
            .memory
            .or(agent.as_ref().and_then(|p| p.task.memory_mib))
            .unwrap_or(512);
        let timeout = a
            .timeout
            .or(agent.as_ref().and_then(|p| p.task.timeout_secs));
        Ok((
            host,
            network,
            env,
            prompt,
            repo,
            gate,
            image,
            (command, vcpus, memory, timeout),
        ))
    })();
    let (host, network, env, prompt, repo, mut gate, image, (command, vcpus, memory, timeout)) =
        match prepared {
            Ok(p) => p,
            Err(e) => {
                crate::print_error(&e);
                return Ok(crate::EXIT_USAGE);
            }
        };
    let task_id = dough_core::new_id();
    let spec = TaskSpec {
        task_id: task_id.clone(),
        vm_id: Some(task_id.clone()),
        prompt,
        command,
        env,
        root: a.root,
        workdir: a.workdir.clone(),
        vcpus,
        memory_mib: memory,
        scratch_mib: a.disk,
        timeout: timeout.map(Duration::from_secs),
        boot_timeout: Duration::from_secs(a.boot_timeout),
        network,
        image,
        ..TaskSpec::default()
    };
    let json = a.repo.json;
    // The task's output is written by a thread of its own: a reader that
    // stops (a pager, `| (sleep 60; wc)`) slows the guest down instead of
    // stalling the runtime that watches timeouts, cancellation and the VM.
    let (writer, spec) = OutputWriter::start(json, spec);
    let mut write_err: Option<std::io::Error> = None;
    // On a terminal, a transient status line while the VM boots.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut status_shown = false;
    let mut marks = Timings::new();
    let mut on_event = |ev: Event<'_>| {
        marks.on_event(&ev);
        if tty {
            match ev {
                Event::Phase(Phase::Spawned, _) => {
                    eprint!("dough: booting a microVM…");
                    status_shown = true;
                }
                Event::Phase(_, _) | Event::Output(..) if status_shown => {
                    eprint!("\r\x1b[K");
                    status_shown = false;
                }
                _ => {}
            }
        }
        if let Event::Progress(p) = ev {
            eprintln!("dough: {p}");
        }
        // The task's output goes to the writer thread (spec.output).
    };
    let (rep, work) = match &repo {
        None => {
            // `spec` (and the output sink in it) goes at the end of this
            // arm, so the writer sees the end of the output.
            let spec = spec;
            (
                run_task(&host, &spec, &mut on_event, interrupted()).await,
                None,
            )
        }
        Some((r, p)) => {
            gate.allow_protected |= p.allow_protected;
            let creds = dough_core::repo::Credentials::from_env();
            let run = dough_core::repo::run(
                &host,
                spec,
                r,
                p,
                &creds,
                &gate,
                None,
                &mut on_event,
                interrupted(),
                None,
            )
            .await;
            match run.split() {
                Ok(parts) => parts,
                Err(e) => {
                    let _ = writer.finish();
                    if a.timings {
                        marks.print(repo.is_some());
                    }
                    let code = match e {
                        RepoError::Invalid(_) => crate::EXIT_USAGE,
                        _ => EXIT_DOUGH,
                    };
                    report_work(json, &task_id, None, Err(&e));
                    return Ok(code);
                }
            }
        }
    };
    if a.timings {
        marks.print(repo.is_some());
    }
    if let Some(e) = writer.finish() {
        write_err.get_or_insert(e);
    }
    for e in &rep.teardown_errors {
        eprintln!("dough: warning: teardown: {e}");
    }
    // What the guest did on the network, as the host saw it.
    if let Some(rec) = rep.egress.as_ref().filter(|_| tty || a.network_summary) {
        eprintln!("dough: network: {}", rec.summary().line());
    }
    if let Some(e) = write_err {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("dough: warning: could not write the task's output: {e}");
        }
    }
    if let Some(w) = &work {
        let code = match &rep.result {
            Ok(Outcome::Exited(st)) => Some(st.shell_code()),
            _ => None,
        };
        report_work(json, &task_id, code, w.as_ref());
        return Ok(match w {
            // A failed task's partial work (pushed as asked, or not): the
            // task's own exit code.
            Ok(_) | Err(RepoError::Partial { .. }) if code.is_some_and(|c| c != 0) => {
                code.unwrap_or(1).clamp(1, 255) as u8
            }
            Ok(_) => 0,
            Err(RepoError::CloneFailed(_)) => EXIT_CLONE,
            Err(_) => EXIT_DOUGH,
        });
    }
    if json {
        let (state, code) = match &rep.result {
            Ok(Outcome::Exited(st)) => ("failed", Some(st.shell_code())),
            _ => ("failed", None),
        };
        let v = serde_json::json!({"task_id": task_id, "state": state, "exit_code": code, "reason": "the task did not succeed; nothing was pushed"});
        println!("{v}");
    }
    match rep.result {
        Ok(Outcome::Exited(st)) => {
            if repo.is_some() && !json {
                let how = match st {
                    dough_proto::ExitStatus::Code(c) => format!("exit code {c}"),
                    dough_proto::ExitStatus::Signal(s) => format!("killed by signal {s}"),
                };
                eprintln!("dough: the task failed ({how}); nothing was pushed");
            }
            Ok(st.shell_code().clamp(0, 255) as u8)
        }
        Ok(Outcome::CloneFailed(msg)) => {
            eprintln!("dough: the guest could not clone the repository: {msg}");
            Ok(EXIT_CLONE)
        }
        Ok(Outcome::OutOfMemory(st)) => {
            eprintln!(
                "dough: the task ran out of memory (oom): the guest has {} MiB; try a larger --memory",
                memory
            );
            Ok(st.shell_code().clamp(0, 255) as u8)
        }
        Ok(Outcome::SpawnFailed(msg)) => {
            eprintln!("dough: {msg}");
            Ok(127)
        }
        Ok(Outcome::TimedOut(d)) => {
            eprintln!(
                "dough: timed out after {} s; the task was killed and the vm torn down",
                d.as_secs()
            );
            Ok(124)
        }
        Ok(Outcome::Cancelled(sig)) => {
            eprintln!("dough: interrupted; the vm was torn down");
            Ok((128 + sig).clamp(0, 255) as u8)
        }
        Err(e @ RunError::Image(_)) => Err(e).context("the guest image is not usable"),
        Err(e) => Err(anyhow::Error::new(e)).context(format!("vm {} failed", rep.vm_id)),
    }
    .or_else(|e| {
        crate::print_error(&e);
        Ok(EXIT_DOUGH)
    })
}

/// The thread that writes a task's output ([`TaskSpec::output`]).
struct OutputWriter {
    thread: std::thread::JoinHandle<Option<std::io::Error>>,
}

impl OutputWriter {
    /// Chunks that may wait for the writer: with frames of at most 64 KiB,
    /// at most 1 MiB of output is held on the host for a stalled reader.
    const QUEUE: usize = 16;

    /// Start the writer; `spec` gets its sink. With `json`, all output
    /// goes to stderr (stdout carries the result).
    fn start(json: bool, mut spec: TaskSpec) -> (OutputWriter, TaskSpec) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(Stream, Vec<u8>)>(Self::QUEUE);
        spec.output = Some(tx);
        let thread = std::thread::spawn(move || {
            let mut err: Option<std::io::Error> = None;
            while let Some((stream, data)) = rx.blocking_recv() {
                if err.is_some() {
                    continue; // keep draining: the task goes on regardless
                }
                let res = if json || stream == Stream::Stderr {
                    let mut o = std::io::stderr().lock();
                    o.write_all(&data).and_then(|_| o.flush())
                } else {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&data).and_then(|_| o.flush())
                };
                if let Err(e) = res {
                    err = Some(e);
                }
            }
            err
        });
        (OutputWriter { thread }, spec)
    }

    /// Wait for everything queued to be written (every sender is gone
    /// once the run has returned); the first write error.
    fn finish(self) -> Option<std::io::Error> {
        self.thread.join().unwrap_or(None)
    }
}

/// Where a run's time went (`--timings`): each span ends at a phase the
/// run reached, timed on the host as the events arrive.
struct Timings {
    start: std::time::Instant,
    marks: Vec<(&'static str, std::time::Instant)>,
}

impl Timings {
    fn new() -> Timings {
        Timings {
            start: std::time::Instant::now(),
            marks: vec![],
        }
    }

    fn on_event(&mut self, ev: &Event<'_>) {
        let name = match ev {
            Event::Phase(Phase::Spawned, _) => "host set-up",
            Event::Phase(Phase::Hello, _) => "boot",
            Event::Phase(Phase::Cloned, _) => "clone",
            Event::Phase(Phase::Started, _) => "start",
            Event::Phase(Phase::Done, _) => "task",
            Event::Phase(Phase::TornDown, _) => "teardown",
            _ => return,
        };
        self.marks.push((name, std::time::Instant::now()));
    }

    /// One line: each span, then the total (the span after teardown is
    /// the host's gate, push and pull request).
    fn print(&self, repo: bool) {
        let end = std::time::Instant::now();
        let mut prev = self.start;
        let mut parts: Vec<String> = vec![];
        for (name, at) in &self.marks {
            parts.push(format!("{name} {:.1} s", (*at - prev).as_secs_f64()));
            prev = *at;
        }
        if repo && self.marks.last().is_some_and(|(n, _)| *n == "teardown") {
            parts.push(format!(
                "gate, push, pr {:.1} s",
                (end - prev).as_secs_f64()
            ));
        }
        parts.push(format!("total {:.1} s", (end - self.start).as_secs_f64()));
        eprintln!("dough: timings: {}", parts.join(" · "));
    }
}

/// Exit status when the guest could not clone the repository.
pub const EXIT_CLONE: u8 = 3;

/// The end of a repository task: the pull request URL on stdout (the
/// branch when there is none), or the whole result as JSON.
fn report_work(
    json: bool,
    task_id: &str,
    exit_code: Option<i32>,
    w: Result<&Finalized, &RepoError>,
) {
    match w {
        Ok(f) => {
            if json {
                let mut v = serde_json::to_value(f).unwrap_or_default();
                v["task_id"] = task_id.into();
                let failed = exit_code.is_some_and(|c| c != 0);
                v["state"] = if failed { "failed" } else { "succeeded" }.into();
                v["exit_code"] = exit_code.into();
                println!("{v}");
                return;
            }
            if let Some(n) = &f.note {
                eprintln!("dough: {n}");
            }
            if f.pushed {
                eprintln!(
                    "dough: pushed {} ({} commit{}) onto {}",
                    f.branch,
                    f.commits.len(),
                    if f.commits.len() == 1 { "" } else { "s" },
                    f.base
                );
            }
            if let Some(u) = &f.pr_url {
                println!("{u}");
            }
        }
        Err(e) => {
            if json {
                let v = serde_json::json!({
                    "task_id": task_id, "state": "failed", "exit_code": exit_code,
                    "reason": e.reason(), "detail": e.to_string(),
                });
                println!("{v}");
            }
            eprintln!("dough: {e} [{}]", e.reason());
            match e {
                RepoError::PullRequest(_) => {
                    eprintln!("dough: the branch was pushed; only the pull request is missing")
                }
                RepoError::Gate(_)
                | RepoError::Push { .. }
                | RepoError::Work { .. }
                | RepoError::NoReport => {
                    eprintln!("dough: nothing was pushed")
                }
                _ => {}
            }
        }
    }
}
