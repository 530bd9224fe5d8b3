//! `dough run -- CMD`.
use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use dough_core::{run_task, Event, Outcome, Phase, RunError, TaskSpec};
use dough_net::Egress;
use dough_proto::Stream;
use dough_vmm::{AccelChoice, BackendChoice};

use crate::{Cli, EXIT_DOUGH};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 512, value_parser = clap::value_parser!(u32).range(128..=262144))]
    pub memory: u32,
    /// Kill the task after SECS seconds and exit 124.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: Option<u64>,
    /// Give up if the guest has not said Hello after SECS seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub boot_timeout: u64,
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
    /// No network device at all (vsock only).
    #[arg(long, conflicts_with_all = ["egress", "allow_host", "allow_cidr"])]
    pub no_network: bool,
    /// Upstream DNS server for the VM's resolver [default: the host's
    /// /etc/resolv.conf; env DOUGH_DNS].
    #[arg(long, value_name = "ADDR", value_parser = dough_core::config::parse_dns)]
    pub dns: Option<std::net::SocketAddr>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
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
        let network = if a.no_network {
            None
        } else {
            Some(
                Egress::from_flags(
                    a.egress.as_deref(),
                    a.allow_host.clone(),
                    a.allow_cidr.clone(),
                )
                .map_err(anyhow::Error::msg)?,
            )
        };
        Ok((host, network))
    })();
    let (host, network) = match prepared {
        Ok(p) => p,
        Err(e) => {
            crate::print_error(&e);
            return Ok(crate::EXIT_USAGE);
        }
    };
    let spec = TaskSpec {
        task_id: String::new(),
        command: a.command.clone(),
        env: a.env.clone(),
        root: a.root,
        workdir: a.workdir.clone(),
        vcpus: a.vcpus,
        memory_mib: a.memory,
        scratch_mib: a.disk,
        timeout: a.timeout.map(Duration::from_secs),
        boot_timeout: Duration::from_secs(a.boot_timeout),
        network,
        ..TaskSpec::default()
    };
    let mut write_err: Option<std::io::Error> = None;
    // On a terminal, a transient status line while the VM boots.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut status_shown = false;
    let mut on_event = |ev: Event<'_>| {
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
        if let Event::Output(stream, data) = ev {
            let res = match stream {
                Stream::Stdout => {
                    let mut o = std::io::stdout().lock();
                    o.write_all(data).and_then(|_| o.flush())
                }
                Stream::Stderr => {
                    let mut o = std::io::stderr().lock();
                    o.write_all(data).and_then(|_| o.flush())
                }
            };
            if let Err(e) = res {
                write_err.get_or_insert(e);
            }
        }
    };
    let rep = run_task(&host, &spec, &mut on_event, interrupted()).await;
    for e in &rep.teardown_errors {
        eprintln!("dough: warning: teardown: {e}");
    }
    if let Some(e) = write_err {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("dough: warning: could not write the task's output: {e}");
        }
    }
    match rep.result {
        Ok(Outcome::Exited(st)) => Ok(st.shell_code().clamp(0, 255) as u8),
        Ok(Outcome::OutOfMemory(st)) => {
            eprintln!(
                "dough: the task ran out of memory (oom): the guest has {} MiB; try a larger --memory",
                a.memory
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
