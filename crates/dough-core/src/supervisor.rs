//! **Where a VM boots, runs one task and is torn down.**
//!
//! ```text
//! run dir + owner record ─▶ scratch disk ─▶ vsock listener ─▶ VMM spawned
//!   ─▶ agent dials in, Hello ─▶ Welcome + Assign ─▶ Started
//!   ─▶ Output / Heartbeat … ─▶ Exit            (or timeout / cancel / loss)
//!   ─▶ teardown: Shutdown ─▶ VMM exits (else QMP quit, else SIGKILL)
//!      ─▶ helpers stopped ─▶ run dir (sockets, disk, logs) deleted
//! ```
//! Teardown runs on every path, keeps going past errors and reports them.
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use dough_image::{Image, ImageError, KernelKind};
use dough_proto::{Assign, ExitStatus, GuestMsg, Hello, HostMsg, ProtoError, Stream};
use dough_vmm::{vsock, Accel, Backend, SnapshotRole, VmPaths, VmProcess, VmSpec, Vmm, VmmError};
use tokio::net::unix::OwnedWriteHalf;
use tracing::{debug, info_span, warn, Instrument};

use crate::conn::{self, Incoming};
use crate::leases::UidLease;
use crate::rundir::RunDir;
use crate::HostConfig;
use dough_net::{Egress, VmNet};
use dough_vmm::jail::JailSpec;

/// The guest CID every VM gets (each VM has its own vsock device, so the
/// CID need not be unique on the host).
pub const GUEST_CID: u32 = 3;

/// What to run, and the VM to run it in.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    pub task_id: String,
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub root: bool,
    pub workdir: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Size of the sparse scratch disk (the guest's writable layer).
    pub scratch_mib: u64,
    /// Kill the task after this long (from Assign).
    pub timeout: Option<Duration>,
    /// The agent must say Hello within this long of the VMM starting.
    pub boot_timeout: Duration,
    /// Silence from the guest longer than this means it is lost.
    pub heartbeat_timeout: Duration,
    /// The VM's network: its own namespace with this egress policy; None:
    /// no NIC at all (a pooled VM keeps its NIC, with egress `none`).
    pub network: Option<Egress>,
    /// The VM id to use (the service records it before the VM exists);
    /// None: a fresh one.
    pub vm_id: Option<String>,
    /// On cancel: the task gets the cancel signal, then this long to exit
    /// before SIGKILL. Zero: tear down at once.
    pub cancel_grace: Duration,
    /// Clone before, bundle after (see [`crate::repo`]).
    pub repo: Option<dough_proto::RepoWork>,
    /// Given to the task as the file `$DOUGH_PROMPT_FILE`.
    pub prompt: Option<String>,
    /// Where the guest's bundle is written (at most `repo.max_bundle_bytes`;
    /// more marks the run's [`WorkOutput::oversized`]).
    pub bundle_path: Option<std::path::PathBuf>,
    /// The image to boot; None: the host's ([`HostConfig::image_dir`]).
    pub image: Option<Image>,
    /// An image build step: when the task exits 0 and the VM powers off by
    /// itself, its scratch disk (the overlay's upper layer) is moved here
    /// instead of being deleted with the run directory.
    pub keep_scratch: Option<PathBuf>,
    /// Where the task's output goes, with backpressure: while this channel
    /// is full the host stops reading the guest (which then slows down),
    /// the supervisor keeps watching the timeout, cancellation and the VMM,
    /// and silence is not held against the guest. None: output goes to the
    /// event callback, which must not block.
    pub output: Option<OutputSink>,
}

/// The task's output, for a consumer on its own thread or task
/// ([`TaskSpec::output`]). Bounded: at most its capacity of chunks (each
/// at most one frame) wait in it.
pub type OutputSink = tokio::sync::mpsc::Sender<(Stream, Vec<u8>)>;

impl Default for TaskSpec {
    fn default() -> Self {
        TaskSpec {
            task_id: String::new(),
            command: vec![],
            env: vec![],
            root: false,
            workdir: None,
            vcpus: 1,
            memory_mib: 512,
            scratch_mib: 4096,
            timeout: None,
            boot_timeout: Duration::from_secs(60),
            heartbeat_timeout: Duration::from_secs(5),
            network: Some(Egress::Open),
            vm_id: None,
            cancel_grace: Duration::ZERO,
            repo: None,
            prompt: None,
            bundle_path: None,
            image: None,
            keep_scratch: None,
            output: None,
        }
    }
}

/// Milestones of a run, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// VMM process spawned.
    Spawned,
    /// Agent's Hello received.
    Hello,
    /// The task was sent to the agent (Assign written).
    Assigned,
    /// The repository is cloned (repo tasks).
    Cloned,
    /// Task process started in the guest.
    Started,
    /// Task ended (Exit or spawn failure received).
    Done,
    /// The VMM exited on its own (guest power-off, crash or kill).
    VmmExit,
    /// Everything of the VM is gone.
    TornDown,
}

/// Streamed to the caller while the task runs.
#[derive(Debug)]
pub enum Event<'a> {
    Phase(Phase, Duration),
    Output(Stream, &'a [u8]),
    /// A step of long host-side work (resolving, gating, pushing).
    Progress(&'a str),
}

/// How the task ended (the VM itself worked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Exited(ExitStatus),
    /// The guest ran out of memory and its OOM killer killed the task (or
    /// part of it); the status is how the task ended.
    OutOfMemory(ExitStatus),
    /// The command could not be started in the guest.
    SpawnFailed(String),
    /// The guest could not clone the task's repository.
    CloneFailed(String),
    TimedOut(Duration),
    /// Stopped by the caller (e.g. Ctrl-C) with this signal number.
    Cancelled(i32),
}

/// Why the VM failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("cannot prepare the vm's run directory")]
    RunDir(#[source] std::io::Error),
    #[error("cannot lease a uid for the vm's jail")]
    Lease(#[source] std::io::Error),
    #[error("cannot set up the vm's network")]
    Net(#[source] dough_net::NetError),
    #[error("the guest did not say Hello within {secs} s (boot timeout); serial console ends:\n{serial_tail}")]
    BootTimeout { secs: u64, serial_tail: String },
    #[error("the vmm exited unexpectedly ({status}); serial console ends:\n{serial_tail}")]
    VmmExited { status: String, serial_tail: String },
    #[error("lost the guest agent: {reason}; serial console ends:\n{serial_tail}")]
    AgentLost { reason: String, serial_tail: String },
    #[error("protocol error from the guest")]
    Protocol(#[source] ProtoError),
}

/// Everything known after a run, whether it worked or not.
#[derive(Debug)]
pub struct RunReport {
    pub vm_id: String,
    pub accel: Option<Accel>,
    pub result: Result<Outcome, RunError>,
    pub hello: Option<Hello>,
    pub phases: Vec<(Phase, Duration)>,
    /// Problems met during teardown (the run's result is unaffected).
    pub teardown_errors: Vec<String>,
    /// How the VMM ended: "exited", "qmp quit" or "killed".
    pub vmm_ended_by: &'static str,
    /// What a repo task's guest reported and sent.
    pub work: WorkOutput,
    /// The image the VM booted: its name and digest (None: it never got
    /// that far).
    pub image: Option<ImageUsed>,
    /// `TaskSpec::keep_scratch` was honoured: the disk is there.
    pub scratch_kept: bool,
    /// What the guest did on the network, from the host's side (None: no
    /// network, or recording off).
    pub egress: Option<dough_net::EgressRecord>,
    /// When the VM's work began and ended (ms since the epoch): the run's
    /// start, and its teardown.
    pub started_ms: u64,
    pub ended_ms: u64,
}

/// Which image a run booted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageUsed {
    pub name: String,
    pub digest: String,
    /// The kernel booted: which one, its release and its sha256.
    pub kernel: KernelUsed,
}

/// Which of the image's kernels a run booted.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct KernelUsed {
    /// "debian" or "minimal".
    pub kind: String,
    pub release: String,
    pub sha256: String,
}

/// The repository side of a run, as received from the guest (untrusted).
#[derive(Debug, Default, Clone)]
pub struct WorkOutput {
    /// The guest's report after the task.
    pub report: Option<dough_proto::Work>,
    /// Bundle bytes received (all of them, also past the limit).
    pub bundle_bytes: u64,
    /// More bytes came than the limit allows; the file holds only a prefix.
    pub oversized: bool,
}

impl RunReport {
    pub fn phase(&self, p: Phase) -> Option<Duration> {
        self.phases.iter().find(|(q, _)| *q == p).map(|(_, d)| *d)
    }
}

/// The live parts that teardown must undo.
#[derive(Default)]
pub(crate) struct Live {
    pub(crate) vm: Option<VmProcess>,
    pub(crate) writer: Option<OwnedWriteHalf>,
    /// The agent is still connected and can be asked to shut down.
    pub(crate) agent_ok: bool,
    /// What the agent said at boot.
    pub(crate) hello: Option<Hello>,
}

pub(crate) struct Ctx<'a> {
    pub(crate) t0: Instant,
    pub(crate) phases: Vec<(Phase, Duration)>,
    pub(crate) on_event: &'a mut (dyn FnMut(Event<'_>) + Send),
}

impl Ctx<'_> {
    pub(crate) fn phase(&mut self, p: Phase) {
        let d = self.t0.elapsed();
        self.phases.push((p, d));
        (self.on_event)(Event::Phase(p, d));
    }
}

/// Boot a VM, run `spec` in it, stream events, tear it all down. `cancel`
/// resolves to a signal number when the caller wants to stop early.
pub async fn run_task(
    host: &HostConfig,
    spec: &TaskSpec,
    on_event: &mut (dyn FnMut(Event<'_>) + Send),
    cancel: impl Future<Output = i32>,
) -> RunReport {
    run_task_in(host, spec, None, on_event, cancel).await
}

/// [`run_task`] in `vm` when given (a VM claimed from a warm pool: the
/// boot is skipped), else in a VM booted for it.
pub async fn run_task_in(
    host: &HostConfig,
    spec: &TaskSpec,
    vm: Option<BootedVm>,
    on_event: &mut (dyn FnMut(Event<'_>) + Send),
    cancel: impl Future<Output = i32>,
) -> RunReport {
    match vm {
        Some(vm) => vm.run(spec, on_event, cancel).await,
        None => run_vm(host, spec, &[], on_event, cancel).await,
    }
}

/// Boot the image with `dough.bench=poweroff`: the agent powers off as its
/// first act. Time from spawning the VMM to its exit: the bare-boot baseline.
pub async fn bare_boot(
    host: &HostConfig,
    vcpus: u32,
    memory_mib: u32,
) -> Result<Duration, RunError> {
    let spec = TaskSpec {
        vcpus,
        memory_mib,
        network: None,
        ..TaskSpec::default()
    };
    let mut ignore = |_: Event<'_>| {};
    let rep = run_vm(
        host,
        &spec,
        &["dough.bench=poweroff".to_string()],
        &mut ignore,
        std::future::pending(),
    )
    .await;
    match rep.result {
        Err(RunError::VmmExited { ref status, .. }) if status.starts_with("exit status: 0") => {
            let spawned = rep.phase(Phase::Spawned).unwrap_or_default();
            Ok(rep
                .phase(Phase::VmmExit)
                .unwrap_or_default()
                .saturating_sub(spawned))
        }
        Err(e) => Err(e),
        Ok(o) => Err(RunError::AgentLost {
            reason: format!("bare boot unexpectedly ran a task: {o:?}"),
            serial_tail: String::new(),
        }),
    }
}

async fn run_vm(
    host: &HostConfig,
    spec: &TaskSpec,
    extra_args: &[String],
    on_event: &mut (dyn FnMut(Event<'_>) + Send),
    cancel: impl Future<Output = i32>,
) -> RunReport {
    let mut ctx = Ctx {
        t0: Instant::now(),
        phases: vec![],
        on_event,
    };
    tokio::pin!(cancel);
    let opts = BootOpts {
        extra_args,
        resolver: false,
        snapshot: None,
    };
    match boot_vm(host, spec, &opts, &mut ctx, &mut cancel).await {
        Ok(vm) => vm.run_with(spec, ctx, cancel).await,
        Err((parts, result)) => parts.finish(result, ctx, WorkOutput::default()).await,
    }
}

/// Boot a VM of `spec`'s shape to Hello, for a warm pool: its network is up
/// with egress `none` (the claiming task's policy replaces it, see
/// [`BootedVm::set_egress`]) and the guest's resolver points at the gateway.
pub async fn boot_idle(host: &HostConfig, spec: &TaskSpec) -> Result<BootedVm, RunError> {
    boot_idle_as(host, spec, None).await
}

/// A VM booted (or restored) to idle the way pools keep them — egress
/// `none` with a resolver, the page cache warmed — as a template, a clone
/// or neither. Whatever was made is torn down again on failure.
pub(crate) async fn boot_idle_as(
    host: &HostConfig,
    spec: &TaskSpec,
    snapshot: Option<SnapshotBoot<'_>>,
) -> Result<BootedVm, RunError> {
    let mut ignore = |_: Event<'_>| {};
    let mut ctx = Ctx {
        t0: Instant::now(),
        phases: vec![],
        on_event: &mut ignore,
    };
    let spec = TaskSpec {
        network: Some(Egress::None),
        ..spec.clone()
    };
    let cancel = std::future::pending::<i32>();
    tokio::pin!(cancel);
    let warm = ["dough.warm=1".to_string()];
    let opts = BootOpts {
        extra_args: &warm,
        resolver: true,
        snapshot,
    };
    match boot_vm(host, &spec, &opts, &mut ctx, &mut cancel).await {
        Ok(vm) => Ok(vm),
        Err((parts, result)) => {
            let rep = parts.finish(result, ctx, WorkOutput::default()).await;
            Err(rep.result.err().unwrap_or(RunError::AgentLost {
                reason: "boot ended without a VM".into(),
                serial_tail: String::new(),
            }))
        }
    }
}

/// How [`boot_vm`] boots.
pub(crate) struct BootOpts<'a> {
    pub extra_args: &'a [String],
    /// Give the guest the gateway's DNS forwarder whatever the policy
    /// (pooled VMs: their policy changes at claim).
    pub resolver: bool,
    pub snapshot: Option<SnapshotBoot<'a>>,
}

/// A VM that takes part in snapshots (see [`crate::snapshot`]).
pub(crate) enum SnapshotBoot<'a> {
    /// Booted normally, its RAM in a file, to be snapshotted.
    Template,
    /// Restored from `template`; `state` is its device state, open.
    Clone {
        template: &'a crate::snapshot::Template,
        state: std::fs::File,
    },
}

/// Everything a VM is made of, as far as it has been made; [`Parts::finish`]
/// undoes it all.
pub(crate) struct Parts {
    pub(crate) vm_id: String,
    pub(crate) task_id: String,
    pub(crate) accel: Option<Accel>,
    pub(crate) rd: Option<RunDir>,
    pub(crate) lease: Option<UidLease>,
    pub(crate) net: Option<VmNet>,
    pub(crate) live: Live,
    pub(crate) image: Option<ImageUsed>,
    /// Where the scratch disk goes if the task succeeds (build steps).
    pub(crate) keep_scratch: Option<PathBuf>,
}

pub(crate) type BootFailure = (Parts, Result<Outcome, RunError>);

/// How `backend` comes by the VM's TAP: QEMU inherits Dough's descriptor,
/// Firecracker opens tap0 by name (it calls `TUNSETIFF` itself, which a
/// TAP Dough still held open would refuse with EBUSY).
pub fn tap_attach(backend: Backend) -> dough_net::TapAttach {
    match backend {
        Backend::Qemu => dough_net::TapAttach::Fd,
        Backend::Firecracker => dough_net::TapAttach::ByName,
    }
}

/// The VM's network for `backend`: its namespace with tap0 owned by
/// `tap_owner` (the jail's uid), then the host's table. The VMM is started
/// inside the namespace afterwards.
pub fn setup_net(
    host: &HostConfig,
    vm_id: &str,
    egress: &Egress,
    backend: Backend,
    tap_owner: Option<u32>,
) -> Result<VmNet, dough_net::NetError> {
    let cfg = host.net_config()?;
    let tap = dough_net::TapSpec {
        owner: tap_owner,
        attach: tap_attach(backend),
    };
    let n = VmNet::setup(&cfg, vm_id, egress, tap)?;
    dough_net::prepare_host(&cfg)?;
    Ok(n)
}

/// Make the VM's resources, spawn the VMM and wait for the agent's Hello
/// (answered with Welcome), or for a clone restore it and wait for its
/// Restored.
pub(crate) async fn boot_vm(
    host: &HostConfig,
    spec: &TaskSpec,
    opts: &BootOpts<'_>,
    ctx: &mut Ctx<'_>,
    cancel: &mut std::pin::Pin<&mut impl Future<Output = i32>>,
) -> Result<BootedVm, BootFailure> {
    let vm_id = spec.vm_id.clone().unwrap_or_else(crate::new_id);
    let mut parts = Parts {
        vm_id: vm_id.clone(),
        task_id: spec.task_id.clone(),
        accel: None,
        rd: None,
        lease: None,
        net: None,
        live: Live::default(),
        image: None,
        keep_scratch: spec.keep_scratch.clone(),
    };
    // Checks that create nothing come first: a bad image or a missing tool
    // leaves nothing behind.
    type Prepared = (Image, Box<dyn Vmm>, Accel, (PathBuf, KernelKind));
    let prepared = (|| -> Result<Prepared, RunError> {
        let image = match &spec.image {
            Some(i) => i.clone(),
            None => Image::load(&host.image_dir)?,
        };
        let sel = dough_vmm::select(&host.facts, host.backend, host.accel)?;
        debug!(backend = %sel.vmm.backend(), accel = %sel.accel, why = %sel.why, "vmm selected");
        let emulated = sel.accel == Accel::Tcg;
        let kernel = image.kernel_for(host.kernel, emulated)?;
        if kernel.1 == KernelKind::Debian
            && host.kernel == dough_image::KernelChoice::Auto
            && !image.minimal_fits(emulated)
        {
            warn!(
                "the image's minimal kernel is built for TCG hosts only; booting Debian's kernel under KVM (rebuild the image on this host: dough image build)"
            );
        }
        Ok((image, sel.vmm, sel.accel, kernel))
    })();
    let (image, vmm, accel, kernel) = match prepared {
        Ok(p) => p,
        Err(e) => return Err((parts, Err(e))),
    };
    parts.accel = Some(accel);
    let m = &image.manifest;
    parts.image = Some(ImageUsed {
        name: image.name(),
        digest: m.digest.clone(),
        kernel: match kernel.1 {
            KernelKind::Minimal => KernelUsed {
                kind: "minimal".into(),
                release: m.kernel_minimal_version.clone(),
                sha256: m
                    .kernel_minimal
                    .as_ref()
                    .map(|k| k.sha256.clone())
                    .unwrap_or_default(),
            },
            KernelKind::Debian => KernelUsed {
                kind: "debian".into(),
                release: m.kernel_version.clone(),
                sha256: m.kernel.sha256.clone(),
            },
        },
    });
    let image_name = parts.image.as_ref().map(|i| i.name.clone());
    let rd = match RunDir::create_for(&host.runs_dir(), &vm_id, image_name.as_deref()) {
        Ok(rd) => parts.rd.insert(rd),
        Err(e) => return Err((parts, Err(RunError::RunDir(e)))),
    };
    // The uid lease is the record of the jail (its root and cgroup are
    // named by the VM id), taken before either exists.
    if host.confine {
        match UidLease::acquire(&host.uids_dir(), &vm_id) {
            Ok(l) => parts.lease = Some(l),
            Err(e) => return Err((parts, Err(RunError::Lease(e)))),
        }
    }
    let jail = parts.lease.as_ref().map(|l| JailSpec {
        uid: l.uid,
        gid: l.uid,
        groups: if accel == Accel::Kvm {
            kvm_gid().into_iter().collect()
        } else {
            vec![]
        },
        root: host.jails_dir().join(&vm_id),
        limits: dough_vmm::cgroup::limits_for(spec.vcpus, spec.memory_mib, accel == Accel::Tcg),
    });
    // The VM's own files live in `vm/`, which a jailed VMM's uid owns; the
    // run directory itself and its owner record stay root's.
    let paths = VmPaths::new(rd.path.join("vm"));
    if let Err(e) = std::fs::create_dir(&paths.run_dir) {
        return Err((parts, Err(RunError::RunDir(e))));
    }
    let mut kernel_args = vec![format!("dough.port={}", dough_proto::CONTROL_PORT)];
    // Dough's minimal kernel has every driver built in: it mounts the
    // read-only rootfs itself and starts the agent from it, no initramfs.
    let no_initramfs = kernel.1 == KernelKind::Minimal && !image.manifest.rootfs_agent.is_empty();
    if no_initramfs {
        kernel_args.extend([
            "root=/dev/vda".to_string(),
            "ro".into(),
            "rootfstype=ext4".into(),
            format!("init={}", dough_image::ROOT_INIT),
        ]);
    }
    if !host.guest_mitigations {
        // Opt-in (docs/boot.md): no CPU vulnerability mitigations inside
        // the guest; boots faster under TCG.
        kernel_args.push("mitigations=off".into());
    }
    if !image.layers.is_empty() {
        kernel_args.push(format!("dough.layers={}", image.layers.len()));
    }
    if spec.keep_scratch.is_some() {
        // Its disk becomes a layer: what the step deletes is given back.
        kernel_args.push("dough.discard=1".into());
    }
    kernel_args.extend(opts.extra_args.iter().cloned());
    if control_on_serial(vmm.backend(), opts.snapshot.is_some()) {
        kernel_args.push("dough.control=serial".into());
    }
    // Diagnostics only (e.g. `initcall_debug`): never set in production.
    if let Ok(extra) = std::env::var("DOUGH_DEBUG_KERNEL_ARGS") {
        kernel_args.extend(extra.split_whitespace().map(str::to_string));
    }
    // The network: a namespace of its own, made before the VMM that joins it.
    if let Some(egress) = &spec.network {
        let t = Instant::now();
        let made = setup_net(
            host,
            &vm_id,
            egress,
            vmm.backend(),
            parts.lease.as_ref().map(|l| l.uid),
        )
        .map_err(RunError::Net);
        match made {
            Ok(n) => {
                debug!(slot = n.slot, addr = %n.slot_addr, egress = egress.name(), ms = t.elapsed().as_millis() as u64, "network ready");
                kernel_args.extend(dough_net::guest_kernel_args(
                    opts.resolver || !matches!(egress, Egress::None),
                ));
                parts.net = Some(n);
            }
            Err(e) => return Err((parts, Err(e))),
        }
    }
    let net = parts.net.as_ref();
    let vmspec = VmSpec {
        id: vm_id.clone(),
        paths: paths.clone(),
        kernel: kernel.0,
        acpi: kernel.1.needs_acpi(),
        initramfs: (!no_initramfs).then(|| image.initramfs.clone()),
        rootfs: image.rootfs.clone(),
        scratch: paths.scratch(),
        layers: image.layers.clone(),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        accel,
        kernel_args,
        tap: net.map(|_| dough_net::TAP.to_string()),
        netns: net.map(|n| n.netns.clone()),
        mac: dough_net::GUEST_MAC.to_string(),
        tap_fd: net
            .and_then(|n| n.tap.as_ref())
            .map(std::os::fd::AsRawFd::as_raw_fd),
        guest_cid: GUEST_CID,
        guest_port: dough_proto::CONTROL_PORT,
        jail,
        snapshot: match &opts.snapshot {
            None => None,
            Some(SnapshotBoot::Template) => Some(SnapshotRole::Template {
                memory: paths.run_dir.join("memory"),
            }),
            Some(SnapshotBoot::Clone { template, state }) => Some(SnapshotRole::Clone {
                memory: template.memory.clone(),
                state: template.state.clone(),
                state_fd: std::os::fd::AsRawFd::as_raw_fd(state),
            }),
        },
    };
    let span = info_span!("vm", vm_id = %vm_id, task_id = %spec.task_id);
    let booted = match &opts.snapshot {
        Some(SnapshotBoot::Clone { template, .. }) => {
            crate::snapshot::drive_restore(
                vmm.as_ref(),
                &vmspec,
                spec,
                template,
                &mut parts.live,
                ctx,
            )
            .instrument(span)
            .await
        }
        _ => {
            drive_boot(vmm.as_ref(), &vmspec, spec, &mut parts.live, ctx, cancel)
                .instrument(span)
                .await
        }
    };
    match booted {
        Ok(Ok(rx)) => Ok(BootedVm {
            paths,
            rx,
            booted_at: Instant::now(),
            last_seen: Instant::now(),
            parts,
        }),
        Ok(Err(sig)) => Err((parts, Ok(Outcome::Cancelled(sig)))),
        Err(e) => Err((parts, Err(e))),
    }
}

/// A VM booted to Hello that has no task yet. A warm pool keeps these;
/// [`BootedVm::run`] gives it its one task, [`BootedVm::discard`] tears it
/// down unused.
pub struct BootedVm {
    pub(crate) parts: Parts,
    pub(crate) paths: VmPaths,
    pub(crate) rx: tokio::sync::mpsc::Receiver<Incoming>,
    pub(crate) booted_at: Instant,
    pub(crate) last_seen: Instant,
}

impl BootedVm {
    pub fn vm_id(&self) -> &str {
        &self.parts.vm_id
    }

    /// When the agent said Hello.
    pub fn booted_at(&self) -> Instant {
        self.booted_at
    }

    /// The VMM's process id.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.parts.live.vm.as_ref().and_then(|v| v.vmm.id())
    }

    /// Give the VM its task's egress policy (one nftables transaction in
    /// its namespace; see [`VmNet::set_egress`]).
    pub fn set_egress(&self, egress: &Egress) -> Result<(), RunError> {
        match &self.parts.net {
            Some(n) => n.set_egress(egress).map_err(RunError::Net),
            None => Err(RunError::Net(dough_net::NetError::Config(
                "this vm has no network".into(),
            ))),
        }
    }

    /// Whether an idle VM is still well: reads what the agent sent since
    /// the last check (heartbeats). An error: the VM is lost and must be
    /// discarded.
    pub fn check(&mut self, heartbeat_timeout: Duration) -> Result<(), RunError> {
        use tokio::sync::mpsc::error::TryRecvError;
        loop {
            match self.rx.try_recv() {
                Ok(Incoming::Msg(GuestMsg::Heartbeat { .. })) => self.last_seen = Instant::now(),
                Ok(Incoming::Msg(GuestMsg::Log { message })) => {
                    self.last_seen = Instant::now();
                    debug!(vm_id = %self.parts.vm_id, %message, "agent");
                }
                Ok(Incoming::Msg(m)) => {
                    self.parts.live.agent_ok = false;
                    return Err(RunError::AgentLost {
                        reason: format!("an idle vm's agent sent {m:?}"),
                        serial_tail: serial_tail(&self.paths),
                    });
                }
                Ok(Incoming::Failed(e)) => {
                    self.parts.live.agent_ok = false;
                    return Err(RunError::Protocol(e));
                }
                Ok(Incoming::Closed) | Err(TryRecvError::Disconnected) => {
                    self.parts.live.agent_ok = false;
                    return Err(RunError::AgentLost {
                        reason: "control connection closed while idle".into(),
                        serial_tail: serial_tail(&self.paths),
                    });
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        if self.last_seen.elapsed() > heartbeat_timeout {
            return Err(RunError::AgentLost {
                reason: format!("no heartbeat for {} s", heartbeat_timeout.as_secs()),
                serial_tail: serial_tail(&self.paths),
            });
        }
        Ok(())
    }

    /// Tear the VM down unused; returns teardown's problems.
    pub async fn discard(self) -> Vec<String> {
        let mut ignore = |_: Event<'_>| {};
        let ctx = Ctx {
            t0: Instant::now(),
            phases: vec![],
            on_event: &mut ignore,
        };
        let rep = self
            .parts
            .finish(Ok(Outcome::Cancelled(0)), ctx, WorkOutput::default())
            .await;
        rep.teardown_errors
    }

    /// Run `spec`'s task (Assign) in this VM, then tear it down. Phases are
    /// timed from this call; the boot's are not repeated. The VM's shape
    /// and network come from its boot: `spec.vcpus`, `memory_mib` and
    /// `network` are not looked at (set the egress first).
    pub async fn run(
        mut self,
        spec: &TaskSpec,
        on_event: &mut (dyn FnMut(Event<'_>) + Send),
        cancel: impl Future<Output = i32>,
    ) -> RunReport {
        self.parts.task_id = spec.task_id.clone();
        let ctx = Ctx {
            t0: Instant::now(),
            phases: vec![],
            on_event,
        };
        // The task's egress policy, before it can send a packet (no NIC
        // asked for: nothing gets out).
        let egress = spec.network.clone().unwrap_or(Egress::None);
        if let Err(e) = self.set_egress(&egress) {
            return self.parts.finish(Err(e), ctx, WorkOutput::default()).await;
        }
        debug!(vm_id = %self.parts.vm_id, egress = egress.name(), "claimed; egress set");
        tokio::pin!(cancel);
        self.run_with(spec, ctx, cancel).await
    }

    async fn run_with(
        mut self,
        spec: &TaskSpec,
        mut ctx: Ctx<'_>,
        cancel: std::pin::Pin<&mut impl Future<Output = i32>>,
    ) -> RunReport {
        let span = info_span!("vm", vm_id = %self.parts.vm_id, task_id = %spec.task_id);
        self.parts.keep_scratch = spec.keep_scratch.clone();
        let mut work = WorkOutput::default();
        let result = drive_task(
            &self.paths,
            spec,
            &mut self.parts.live,
            &mut self.rx,
            &mut ctx,
            &mut work,
            cancel,
        )
        .instrument(span)
        .await;
        self.parts.finish(result, ctx, work).await
    }
}

impl Parts {
    /// Tear down whatever exists, on every path, and report.
    pub(crate) async fn finish(
        mut self,
        result: Result<Outcome, RunError>,
        mut ctx: Ctx<'_>,
        work: WorkOutput,
    ) -> RunReport {
        let span = info_span!("vm", vm_id = %self.vm_id, task_id = %self.task_id);
        if let Err(e) = &result {
            debug!(parent: &span, error = %e, "vm failed");
        }
        let mut rep = RunReport {
            vm_id: self.vm_id.clone(),
            accel: self.accel,
            result,
            hello: self.live.hello.take(),
            phases: vec![],
            teardown_errors: vec![],
            vmm_ended_by: "never started",
            work,
            image: self.image.take(),
            scratch_kept: false,
            egress: None,
            started_ms: crate::store::now_ms().saturating_sub(ctx.t0.elapsed().as_millis() as u64),
            ended_ms: 0,
        };
        let Some(rd) = self.rd.take() else {
            // Nothing was made.
            rep.phases = ctx.phases;
            rep.ended_ms = crate::store::now_ms();
            return rep;
        };
        let keep = match &rep.result {
            Ok(Outcome::Exited(ExitStatus::Code(0))) => self.keep_scratch.take(),
            _ => None,
        };
        let (mut errors, ended_by) = teardown(&mut self.live, &rd, keep.as_deref())
            .instrument(span)
            .await;
        rep.scratch_kept = keep.is_some_and(|k| k.exists());
        // After the VMM: it holds tap0, and with it the namespace.
        if let Some(n) = self.net.take() {
            let (errs, record) = n.teardown_recorded();
            errors.extend(errs.into_iter().map(|e| format!("network: {e}")));
            rep.egress = record;
        }
        if let Some(l) = self.lease.take() {
            if let Err(e) = l.release() {
                errors.push(format!("release uid lease: {e}"));
            }
        }
        rep.teardown_errors = errors;
        rep.vmm_ended_by = ended_by;
        ctx.phase(Phase::TornDown);
        rep.phases = ctx.phases;
        rep.ended_ms = crate::store::now_ms();
        rep
    }
}

/// The serial console's last lines; a kernel panic line, the most useful
/// line of a crash, is kept even when the backtrace after it is long.
pub(crate) fn serial_tail(paths: &VmPaths) -> String {
    let tail = dough_vmm::process::log_tail(&paths.serial_log(), 20);
    let all = std::fs::read(paths.serial_log()).unwrap_or_default();
    let all = String::from_utf8_lossy(&all);
    match all.lines().find(|l| l.contains("Kernel panic")) {
        Some(p) if !tail.contains(p) => format!("{p}\n[...]\n{tail}"),
        _ => tail,
    }
}

pub(crate) fn vmm_exited(
    paths: &VmPaths,
    status: std::io::Result<std::process::ExitStatus>,
) -> RunError {
    let mut status = match status {
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    };
    let log = dough_vmm::process::log_tail(&paths.vmm_log(), 5);
    if !log.is_empty() {
        status = format!("{status}; vmm says: {log}");
    }
    RunError::VmmExited {
        status,
        serial_tail: serial_tail(paths),
    }
}

/// Whether the control protocol runs over a virtio-serial port instead of
/// vsock: in QEMU VMs that take part in snapshots (QEMU 7.2 cannot migrate
/// vhost-user-vsock). Firecracker snapshots its vsock device itself.
pub(crate) fn control_on_serial(backend: dough_vmm::Backend, snapshot: bool) -> bool {
    snapshot && backend == dough_vmm::Backend::Qemu
}

/// Scratch disk, vsock listener, VMM; then wait for the agent's Hello and
/// answer Welcome. `Ok(Err(signal))`: cancelled while booting.
async fn drive_boot(
    vmm: &dyn Vmm,
    vmspec: &VmSpec,
    spec: &TaskSpec,
    live: &mut Live,
    ctx: &mut Ctx<'_>,
    cancel: &mut std::pin::Pin<&mut impl Future<Output = i32>>,
) -> Result<Result<tokio::sync::mpsc::Receiver<Incoming>, i32>, RunError> {
    let paths = &vmspec.paths;
    dough_vmm::disk::create_scratch(&vmspec.scratch, spec.scratch_mib).await?;
    // The control port: QEMU listens, Dough connects once it started.
    let listener = if control_on_serial(vmm.backend(), vmspec.snapshot.is_some()) {
        None
    } else {
        Some(vsock::listen(
            &paths.vsock_uds(),
            dough_proto::CONTROL_PORT,
        )?)
    };
    let vm = live.vm.insert(vmm.start(vmspec).await?);
    ctx.phase(Phase::Spawned);
    let boot_deadline = tokio::time::Instant::now() + spec.boot_timeout;
    let boot_timeout = || RunError::BootTimeout {
        secs: spec.boot_timeout.as_secs(),
        serial_tail: serial_tail(paths),
    };

    // The agent dials in: that is the readiness signal.
    let connect = async {
        match &listener {
            Some(l) => l.accept().await.map(|(s, _)| s).map_err(|e| {
                RunError::Vmm(VmmError::Io {
                    path: paths.vsock_uds(),
                    source: e,
                })
            }),
            None => crate::snapshot::connect_port(&paths.agent_sock()).await,
        }
    };
    let stream = tokio::select! {
        r = connect => r?,
        st = vm.wait_vmm() => { ctx.phase(Phase::VmmExit); return Err(vmm_exited(paths, st)) }
        _ = tokio::time::sleep_until(boot_deadline) => return Err(boot_timeout()),
        sig = cancel.as_mut() => return Ok(Err(sig)),
    };
    drop(listener);
    let (r, w) = stream.into_split();
    let w = live.writer.insert(w);
    let mut rx = conn::spawn_reader(r);
    live.agent_ok = true;

    let hello = tokio::select! {
        m = rx.recv() => match m {
            Some(Incoming::Msg(GuestMsg::Hello(h))) => h,
            Some(Incoming::Msg(other)) => {
                live.agent_ok = false;
                return Err(RunError::AgentLost { reason: format!("expected Hello, got {other:?}"), serial_tail: serial_tail(paths) });
            }
            Some(Incoming::Failed(e)) => { live.agent_ok = false; return Err(RunError::Protocol(e)) }
            Some(Incoming::Closed) | None => { live.agent_ok = false; return Err(RunError::AgentLost { reason: "connection closed before Hello".into(), serial_tail: serial_tail(paths) }) }
        },
        st = vm.wait_vmm() => { ctx.phase(Phase::VmmExit); return Err(vmm_exited(paths, st)) }
        _ = tokio::time::sleep_until(boot_deadline) => return Err(boot_timeout()),
        sig = cancel.as_mut() => return Ok(Err(sig)),
    };
    welcome(w, &hello, paths).await?;
    live.hello = Some(hello);
    ctx.phase(Phase::Hello);
    Ok(Ok(rx))
}

/// Answer an agent's Hello: the protocol version both speak.
pub(crate) async fn welcome(
    w: &mut OwnedWriteHalf,
    hello: &Hello,
    paths: &VmPaths,
) -> Result<(), RunError> {
    let version = dough_proto::negotiate(dough_proto::supported_versions(), hello.versions)
        .map_err(RunError::Protocol)?;
    debug!(kernel = %hello.kernel, boot_ms = hello.boot_ms, version, "hello");
    conn::send(w, &HostMsg::Welcome { version })
        .await
        .map_err(|e| RunError::AgentLost {
            reason: format!("cannot send to the agent: {e}"),
            serial_tail: serial_tail(paths),
        })
}

/// Assign the task, then stream its output and watch heartbeats until it
/// ends (or times out, is cancelled, or the guest is lost).
async fn drive_task(
    paths: &VmPaths,
    spec: &TaskSpec,
    live: &mut Live,
    rx: &mut tokio::sync::mpsc::Receiver<Incoming>,
    ctx: &mut Ctx<'_>,
    work: &mut WorkOutput,
    mut cancel: std::pin::Pin<&mut impl Future<Output = i32>>,
) -> Result<Outcome, RunError> {
    let mut bundle = match &spec.bundle_path {
        Some(p) => Some(std::fs::File::create(p).map_err(|e| {
            RunError::Vmm(VmmError::Io {
                path: p.clone(),
                source: e,
            })
        })?),
        None => None,
    };
    let bundle_limit = spec.repo.as_ref().map_or(0, |r| r.max_bundle_bytes);
    let (Some(vm), Some(w)) = (live.vm.as_mut(), live.writer.as_mut()) else {
        return Err(RunError::AgentLost {
            reason: "the vm has no control connection".into(),
            serial_tail: serial_tail(paths),
        });
    };
    let assign = Assign {
        task_id: spec.task_id.clone(),
        command: spec.command.clone(),
        env: spec.env.clone(),
        root: spec.root,
        workdir: spec.workdir.clone(),
        repo: spec.repo.clone(),
        prompt: spec.prompt.clone(),
    };
    conn::send(w, &HostMsg::Assign(Box::new(assign)))
        .await
        .map_err(|e| RunError::AgentLost {
            reason: format!("cannot send to the agent: {e}"),
            serial_tail: serial_tail(paths),
        })?;
    ctx.phase(Phase::Assigned);

    let task_deadline = spec.timeout.map(|t| tokio::time::Instant::now() + t);
    let task_timeout = async {
        match task_deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(task_timeout);
    let mut last_seen = Instant::now();
    // Output read from the guest that the sink has no room for yet: while
    // it waits, nothing more is read.
    let mut pending: Option<(Stream, Vec<u8>)> = None;
    let sink = spec.output.clone();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    // Set once cancelled with a grace period: (signal, SIGKILL deadline,
    // whether SIGKILL went out).
    let mut cancelling: Option<(i32, Instant, bool)> = None;
    loop {
        tokio::select! {
            biased;
            permit = reserve(&sink), if pending.is_some() => {
                if let (Some(p), Some(out)) = (permit, pending.take()) {
                    p.send(out);
                }
                // The host was not reading: silence is not the guest's.
                last_seen = Instant::now();
            }
            m = rx.recv(), if pending.is_none() => {
                let msg = match m {
                    Some(Incoming::Msg(msg)) => msg,
                    Some(Incoming::Failed(e)) => { live.agent_ok = false; return Err(RunError::Protocol(e)) }
                    Some(Incoming::Closed) | None => {
                        live.agent_ok = false;
                        // Attribute a lost connection to the VMM if it died too.
                        if let Ok(st) = tokio::time::timeout(Duration::from_millis(500), vm.wait_vmm()).await {
                            ctx.phase(Phase::VmmExit);
                            return Err(vmm_exited(paths, st));
                        }
                        return Err(RunError::AgentLost { reason: "control connection closed mid-task".into(), serial_tail: serial_tail(paths) });
                    }
                };
                last_seen = Instant::now();
                match msg {
                    GuestMsg::Heartbeat { .. } => {}
                    GuestMsg::Started { pid } => { debug!(pid, "task started"); ctx.phase(Phase::Started) }
                    GuestMsg::Output { stream, data } if sink.is_some() => pending = Some((stream, data)),
                    GuestMsg::Output { stream, data } => (ctx.on_event)(Event::Output(stream, &data)),
                    GuestMsg::Exit { status, oom } => {
                        ctx.phase(Phase::Done);
                        if let Some((sig, _, _)) = cancelling {
                            return Ok(Outcome::Cancelled(sig));
                        }
                        return Ok(if oom { Outcome::OutOfMemory(status) } else { Outcome::Exited(status) });
                    }
                    GuestMsg::SpawnFailed { message } => { ctx.phase(Phase::Done); return Ok(Outcome::SpawnFailed(message)) }
                    GuestMsg::Log { message } => debug!(%message, "agent"),
                    GuestMsg::Cloned { commit } if spec.repo.is_some() => {
                        // Informational: the gate checks descent from the
                        // host's own base, not this claim.
                        debug!(%commit, "cloned");
                        ctx.phase(Phase::Cloned);
                    }
                    GuestMsg::CloneFailed { message } if spec.repo.is_some() => {
                        ctx.phase(Phase::Done);
                        return Ok(Outcome::CloneFailed(message));
                    }
                    GuestMsg::BundleData { data } => {
                        work.bundle_bytes += data.len() as u64;
                        if work.bundle_bytes > bundle_limit {
                            work.oversized = true;
                        } else if let Some(f) = bundle.as_mut() {
                            std::io::Write::write_all(f, &data).map_err(|e| RunError::Vmm(VmmError::Io {
                                path: spec.bundle_path.clone().unwrap_or_default(),
                                source: e,
                            }))?;
                        }
                    }
                    GuestMsg::Work(w) => work.report = Some(w),
                    m @ (GuestMsg::Cloned { .. } | GuestMsg::CloneFailed { .. } | GuestMsg::Quiesced | GuestMsg::Restored { .. }) => warn!(?m, "unexpected message ignored"),
                    GuestMsg::Hello(_) => warn!("second Hello ignored"),
                }
            }
            st = vm.wait_vmm() => { live.agent_ok = false; ctx.phase(Phase::VmmExit); return Err(vmm_exited(paths, st)) }
            _ = &mut task_timeout => {
                let _ = conn::send(w, &HostMsg::Signal { signo: libc_sigkill() }).await;
                ctx.phase(Phase::Done);
                return Ok(Outcome::TimedOut(spec.timeout.unwrap_or_default()));
            }
            sig = &mut cancel, if cancelling.is_none() => {
                let _ = conn::send(w, &HostMsg::Signal { signo: sig }).await;
                if spec.cancel_grace.is_zero() {
                    return Ok(Outcome::Cancelled(sig));
                }
                cancelling = Some((sig, Instant::now() + spec.cancel_grace, false));
            }
            _ = tick.tick() => {
                if let Some((sig, deadline, killed)) = cancelling {
                    if !killed && Instant::now() >= deadline {
                        let _ = conn::send(w, &HostMsg::Signal { signo: libc_sigkill() }).await;
                        cancelling = Some((sig, Instant::now() + Duration::from_secs(2), true));
                    } else if killed && Instant::now() >= deadline {
                        return Ok(Outcome::Cancelled(sig));
                    }
                }
                if pending.is_some() {
                    // Waiting on the sink, not on the guest.
                    last_seen = Instant::now();
                }
                if last_seen.elapsed() > spec.heartbeat_timeout {
                    live.agent_ok = false;
                    return Err(RunError::AgentLost {
                        reason: format!("no heartbeat for {} s", spec.heartbeat_timeout.as_secs()),
                        serial_tail: serial_tail(paths),
                    });
                }
            }
        }
    }
}

/// Room in the output sink (None: the sink is gone, and the output with
/// it).
async fn reserve(
    sink: &Option<OutputSink>,
) -> Option<tokio::sync::mpsc::Permit<'_, (Stream, Vec<u8>)>> {
    match sink {
        Some(s) => s.reserve().await.ok(),
        None => None,
    }
}

/// The `kvm` group, so a jailed VMM can open /dev/kvm.
fn kvm_gid() -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups
        .lines()
        .find(|l| l.starts_with("kvm:"))?
        .split(':')
        .nth(2)?
        .parse()
        .ok()
}

fn libc_sigkill() -> i32 {
    nix::sys::signal::Signal::SIGKILL as i32
}

/// Undo everything in `live` and delete the run directory. Never stops at
/// the first error. `keep`: move the scratch disk there first, if the VMM
/// exited by itself (the agent powered off after the task's `sync`; a
/// killed VMM may have left the disk half-written).
async fn teardown(
    live: &mut Live,
    rd: &RunDir,
    keep: Option<&std::path::Path>,
) -> (Vec<String>, &'static str) {
    let mut errors = Vec::new();
    let mut grace = Duration::ZERO;
    if let Some(w) = live.writer.as_mut() {
        if live.agent_ok {
            match tokio::time::timeout(
                Duration::from_millis(200),
                conn::send(w, &HostMsg::Shutdown),
            )
            .await
            {
                Ok(Ok(())) => grace = Duration::from_secs(1),
                Ok(Err(e)) => debug!("shutdown not delivered: {e}"),
                Err(_) => debug!("shutdown not delivered in time"),
            }
        }
    }
    live.writer = None;
    let mut ended_by = "never started";
    if let Some(mut vm) = live.vm.take() {
        let r = vm.stop(grace).await;
        ended_by = r.vmm_ended_by;
        errors.extend(r.errors);
    }
    if let Some(to) = keep {
        let scratch = VmPaths::new(rd.path.join("vm")).scratch();
        if ended_by != "exited" {
            errors.push(format!(
                "the vm did not power off by itself ({ended_by}): its disk is not kept"
            ));
        } else if let Err(e) = crate::snapshot::move_file(&scratch, to) {
            errors.push(format!("keep {}: {e}", scratch.display()));
        }
    }
    if let Err(e) = rd.remove() {
        errors.push(format!("remove {}: {e}", rd.path.display()));
    }
    for e in &errors {
        warn!("teardown: {e}");
    }
    (errors, ended_by)
}
