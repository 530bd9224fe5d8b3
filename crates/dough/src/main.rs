//! `dough`: the command line. Thin: parsing, printing and exit codes; the
//! work is in `dough-core` (supervisor), `dough-vmm` and `dough-image`.
mod api;
mod cmd;
mod http;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for Dough's own failures (the VM, not the task), as `docker run`.
pub const EXIT_DOUGH: u8 = 125;
/// Bad flags or environment (as clap exits for usage errors).
pub const EXIT_USAGE: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "dough",
    version,
    about = "Run AI coding-agent tasks in ephemeral microVMs"
)]
pub struct Cli {
    /// Where Dough keeps images, VM run directories and caches.
    #[arg(long, global = true, env = "DOUGH_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// The guest image directory (default: STATE_DIR/images/default).
    #[arg(long, global = true, env = "DOUGH_IMAGE_DIR", value_name = "DIR")]
    pub image_dir: Option<PathBuf>,
    /// The guest kernel VMs boot: auto (the image's minimal kernel when it
    /// has one, else Debian's), minimal, or debian.
    #[arg(
        long,
        global = true,
        env = "DOUGH_KERNEL",
        default_value = "auto",
        value_name = "KERNEL"
    )]
    pub kernel: dough_image::KernelChoice,
    /// CPU vulnerability mitigations inside the guest kernel. `off` boots
    /// faster under TCG but weakens isolation between the task's own
    /// processes inside the VM (never the VM boundary); see docs/boot.md.
    #[arg(long, global = true, env = "DOUGH_GUEST_MITIGATIONS", default_value = "on", value_parser = ["on", "off"], value_name = "ON|OFF")]
    pub guest_mitigations: String,
    /// With `--accel kvm`: use /dev/kvm even where a PVM nested hypervisor
    /// provides it. For PVM guest kernels, and for checks that stop short of
    /// a finished boot (scripts/firecracker-check.sh); `auto` never does.
    #[arg(long, global = true, env = "DOUGH_ALLOW_PVM")]
    pub allow_pvm: bool,
    /// More logging on stderr (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log format on stderr.
    #[arg(long, global = true, default_value = "human", value_parser = ["human", "json"])]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a command in a fresh microVM; its output streams back and its exit code is ours.
    Run(cmd::run::RunArgs),
    /// Build or inspect the guest image.
    #[command(subcommand)]
    Image(cmd::image::ImageCmd),
    /// List the agent presets (Claude Code, Codex CLI, aider, yours) and
    /// whether each image is built.
    Agents,
    /// Tell what works on this host and why.
    Doctor(cmd::doctor::DoctorArgs),
    /// Remove what crashed Dough processes left behind (VM processes, run directories).
    Gc,
    /// Benchmarks.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCmd),
    /// Run the orchestrator daemon (HTTP API, durable queue, scheduler).
    Serve(cmd::serve::ServeArgs),
    /// Submit a task to `dough serve`; prints its id (or follows it with --wait).
    Submit(cmd::client::SubmitArgs),
    /// List tasks of `dough serve`.
    Ls(cmd::client::LsArgs),
    /// Show one task (JSON).
    Show(cmd::client::IdArgs),
    /// Print a task's output (-f: follow it live).
    Logs(cmd::client::LogsArgs),
    /// Cancel a task.
    Cancel(cmd::client::IdArgs),
    /// What a task did on the network: DNS questions, hosts reached (with
    /// bytes), attempts blocked (with the rule).
    Egress(cmd::record::EgressArgs),
    /// Print a task's signed provenance statement (in-toto, SLSA).
    Provenance(cmd::client::IdArgs),
    /// Check a provenance statement's signature and shape (exit 1: it does
    /// not verify).
    Verify(cmd::record::VerifyArgs),
    /// Delete a finished task with everything kept for it.
    Rm(cmd::client::IdArgs),
    /// List the nodes (`dough serve` daemons) sharing this store.
    Nodes(cmd::client::NodesArgs),
    /// Drain a node (it finishes its tasks, takes no new ones) or take it
    /// back.
    Node(cmd::client::NodeArgs),
}

fn init_logging(cli: &Cli) {
    let level = match cli.verbose {
        0 => "warn",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DOUGH_LOG").unwrap_or_else(|_| {
        // netlink-packet-route warns about kernel attributes newer than it.
        tracing_subscriber::EnvFilter::new(format!("{level},netlink_packet_route=error"))
    });
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

/// Print an error with its whole chain of causes.
pub fn print_error(e: &anyhow::Error) {
    eprintln!("dough: error: {e}");
    for cause in e.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dough: error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_DOUGH);
        }
    };
    let res = rt.block_on(async {
        match &cli.command {
            Command::Run(a) => cmd::run::run(&cli, a).await,
            Command::Image(c) => cmd::image::run(&cli, c).await,
            Command::Doctor(a) => cmd::doctor::run(&cli, a),
            Command::Agents => cmd::agents::run(&cli),
            Command::Gc => cmd::gc::run(&cli),
            Command::Bench(c) => cmd::bench::run(&cli, c).await,
            Command::Serve(a) => cmd::serve::run(&cli, a).await,
            Command::Submit(a) => cmd::client::submit(&cli, a),
            Command::Ls(a) => cmd::client::ls(&cli, a),
            Command::Show(a) => cmd::client::show(&cli, a),
            Command::Logs(a) => cmd::client::logs(&cli, a),
            Command::Cancel(a) => cmd::client::cancel(&cli, a),
            Command::Egress(a) => cmd::record::egress(&cli, a),
            Command::Provenance(a) => cmd::record::provenance(&cli, a),
            Command::Verify(a) => cmd::record::verify(&cli, a),
            Command::Rm(a) => cmd::record::rm(&cli, a),
            Command::Nodes(a) => cmd::client::nodes(&cli, a),
            Command::Node(a) => cmd::client::node(&cli, a),
        }
    });
    match res {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            print_error(&e);
            ExitCode::from(EXIT_DOUGH)
        }
    }
}
