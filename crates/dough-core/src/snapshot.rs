//! **Where a template VM is snapshotted and clones are restored from it**
//! (QEMU here; Firecracker's requests are in `dough_vmm::firecracker`).
//!
//! ```text
//! QEMU
//! template: boot (RAM in a file, control over virtio-serial) ─▶ Hello
//!   ─▶ Quiesce ─▶ Quiesced ─▶ QMP stop, migrate (x-ignore-shared) to a
//!   socket Dough copies into `state` ─▶ keep memory, state, scratch ─▶ VM gone
//! clone: copy the scratch disk ─▶ QEMU -incoming defer, the memory file
//!   mapped privately ─▶ migrate-incoming from `state` ─▶ paused ─▶ connect
//!   the control port ─▶ cont ─▶ Restore (entropy, clock, identity)
//!   ─▶ Restored (a random sample no other clone gave, the clock) ─▶ idle
//! Firecracker (jailed; cannot run on Dough's CI machines)
//! template: boot as any VM (vsock) ─▶ Hello ─▶ Quiesce ─▶ Quiesced
//!   ─▶ pause, snapshot/create into its chroot ─▶ keep memory, state, scratch
//! clone: copy the scratch disk ─▶ vsock listener ─▶ jailer, the template's
//!   files linked into the chroot ─▶ snapshot/load, resume (vsock reset)
//!   ─▶ the agent dials again: Hello ─▶ Welcome ─▶ Restore ─▶ Restored ─▶ idle
//! ```
//! Every clone of a template starts from the same RNG state, clock and
//! identity: nothing runs in it before Restored proved otherwise.
use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dough_proto::{GuestMsg, Hello, HostMsg, Restore};
use dough_vmm::{qmp, Backend, VmSpec, Vmm, VmmError};
use tokio::net::UnixStream;
use tracing::debug;

use crate::conn::{self, Incoming};
use crate::rundir::RunDir;
use crate::supervisor::{
    boot_idle_as, serial_tail, vmm_exited, BootedVm, Ctx, Live, Phase, RunError, SnapshotBoot,
    TaskSpec,
};
use crate::HostConfig;

/// A snapshotted VM that clones start from.
pub struct Template {
    pub id: String,
    dir: RunDir,
    /// Guest RAM at the snapshot (clones map it privately).
    pub memory: PathBuf,
    /// QEMU's device state (the migration stream without RAM).
    pub state: PathBuf,
    /// The scratch disk at the snapshot (each clone gets a copy).
    pub scratch: PathBuf,
    /// What the template's agent said at boot (clones do not say Hello).
    pub hello: Hello,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The digest of the image it booted (clones need the same files).
    pub image_digest: String,
    /// The VMM that made it: its clones run on the same.
    pub backend: Backend,
    /// How long the template took: boot, quiesce, snapshot.
    pub made_in: Duration,
    /// RNG samples its clones reported: none may repeat.
    samples: Mutex<HashSet<Vec<u8>>>,
}

impl Template {
    /// Delete the template's files (clones already running keep their
    /// private copy of what they mapped).
    pub fn remove(&self) -> std::io::Result<()> {
        self.dir.remove()
    }
}

fn io(what: &str, e: std::io::Error) -> RunError {
    RunError::Vmm(VmmError::Io {
        path: PathBuf::from(what),
        source: e,
    })
}

fn lost(reason: String, paths: &dough_vmm::VmPaths) -> RunError {
    RunError::AgentLost {
        reason,
        serial_tail: serial_tail(paths),
    }
}

/// Boot a template of `spec`'s shape (egress `none`, page cache warmed),
/// snapshot it and tear the VM down; its files stay until
/// [`Template::remove`].
pub async fn make_template(host: &HostConfig, spec: &TaskSpec) -> Result<Template, RunError> {
    let t0 = Instant::now();
    let image = match &spec.image {
        Some(i) => i.clone(),
        None => dough_image::Image::load(&host.image_dir)?,
    };
    let sel = dough_vmm::select(&host.facts, host.backend, host.accel)?;
    let backend = sel.vmm.backend();
    let (_, kind) = image.kernel_for(host.kernel, sel.accel == dough_vmm::Accel::Tcg)?;
    // QEMU's control port needs virtio-console built in (Debian's kernel
    // has it as a module the initramfs does not load).
    if backend == Backend::Qemu && kind != dough_image::KernelKind::Minimal {
        return Err(RunError::Vmm(VmmError::Spec(
            "snapshot templates need Dough's minimal kernel (--kernel minimal)".into(),
        )));
    }
    if backend == Backend::Firecracker && !host.confine {
        return Err(RunError::Vmm(VmmError::Spec(
            "Firecracker snapshot templates run jailed (each clone's chroot gives the template's drive paths to its own files), and confinement is off".into(),
        )));
    }
    let id = crate::new_id();
    let dir = RunDir::create(&host.templates_dir(), &id).map_err(RunError::RunDir)?;
    // The template's VM has the template's id (its clones' kernel command
    // line names it).
    let spec = TaskSpec {
        vm_id: Some(id.clone()),
        ..spec.clone()
    };
    let mut vm = match boot_idle_as(host, &spec, Some(SnapshotBoot::Template)).await {
        Ok(vm) => vm,
        Err(e) => {
            let _ = dir.remove();
            return Err(e);
        }
    };
    let files = snapshot_into(&mut vm, &dir.path, backend).await;
    let hello = vm.parts.live.hello.clone();
    for e in vm.discard().await {
        debug!(error = %e, "template vm teardown");
    }
    match (files, hello) {
        (Ok((memory, state, scratch)), Some(hello)) => {
            let t = Template {
                id,
                dir,
                memory,
                state,
                scratch,
                hello,
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                image_digest: image.manifest.digest.clone(),
                backend,
                made_in: t0.elapsed(),
                samples: Mutex::new(HashSet::new()),
            };
            debug!(template = %t.id, ms = t.made_in.as_millis() as u64, "template ready");
            Ok(t)
        }
        (Err(e), _) => {
            let _ = dir.remove();
            Err(e)
        }
        (Ok(_), None) => {
            let _ = dir.remove();
            Err(RunError::AgentLost {
                reason: "the template never said Hello".into(),
                serial_tail: String::new(),
            })
        }
    }
}

/// Quiesce the agent, save the VM into `dir` (`state`, `memory`) and keep
/// a copy of the scratch disk beside them.
async fn snapshot_into(
    vm: &mut BootedVm,
    dir: &Path,
    backend: Backend,
) -> Result<(PathBuf, PathBuf, PathBuf), RunError> {
    let paths = vm.paths.clone();
    let w = vm
        .parts
        .live
        .writer
        .as_mut()
        .ok_or_else(|| lost("no control connection".into(), &paths))?;
    conn::send(w, &HostMsg::Quiesce)
        .await
        .map_err(|e| lost(format!("cannot send Quiesce: {e}"), &paths))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, vm.rx.recv()).await {
            Ok(Some(Incoming::Msg(GuestMsg::Quiesced))) => break,
            Ok(Some(Incoming::Msg(GuestMsg::Heartbeat { .. } | GuestMsg::Log { .. }))) => {}
            Ok(other) => return Err(lost(format!("expected Quiesced, got {other:?}"), &paths)),
            Err(_) => return Err(lost("no Quiesced within 60 s".into(), &paths)),
        }
    }
    let (memory, state) = (dir.join("memory"), dir.join("state"));
    match backend {
        Backend::Qemu => qemu_save(&paths, &state, &memory).await?,
        Backend::Firecracker => {
            let api = match vm.parts.live.vm.as_ref().map(|p| &p.control) {
                Some(dough_vmm::Control::FirecrackerApi(s)) => s.clone(),
                _ => return Err(lost("no Firecracker API socket".into(), &paths)),
            };
            let files = dough_vmm::firecracker::snapshot_template(&api).await?;
            move_file(&files.state, &state).map_err(|e| io("state", e))?;
            move_file(&files.memory, &memory).map_err(|e| io("memory", e))?;
            give_to_template_group(&state, 0o640)?;
            give_to_template_group(&memory, 0o640)?;
        }
    }
    let scratch = dir.join("scratch.ext4");
    sparse_copy(&paths.scratch(), &scratch).map_err(|e| io("scratch", e))?;
    Ok((memory, state, scratch))
}

/// QEMU: migrate the device state (no RAM: `x-ignore-shared`) into
/// `state`, and keep the VM's RAM file as the template's `memory`.
async fn qemu_save(
    paths: &dough_vmm::VmPaths,
    state: &Path,
    memory: &Path,
) -> Result<(), RunError> {
    let qerr = |e: VmmError| RunError::Vmm(e);
    let mut q = qmp::Session::connect(&paths.qmp(), Duration::from_secs(5))
        .await
        .map_err(qerr)?;
    q.execute("migrate-set-capabilities", qmp::snapshot_capabilities())
        .await
        .map_err(qerr)?;
    q.execute(
        "migrate-set-parameters",
        serde_json::json!({"max-bandwidth": 8u64 << 30}),
    )
    .await
    .map_err(qerr)?;
    let sock = paths.migrate_sock();
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock).map_err(|e| io("migrate.sock", e))?;
    // Inside the VM's own directory (mode 0700, the jailed VMM's): only
    // its VMM can reach the socket.
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .map_err(|e| io("migrate.sock", e))?;
    q.execute("stop", serde_json::json!({}))
        .await
        .map_err(qerr)?;
    q.execute(
        "migrate",
        serde_json::json!({"uri": format!("unix:{}", sock.display())}),
    )
    .await
    .map_err(qerr)?;
    let (mut stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .map_err(|_| lost("the VMM never sent its migration stream".into(), paths))?
        .map_err(|e| io("migrate.sock", e))?;
    let mut out = tokio::fs::File::create(state)
        .await
        .map_err(|e| io("state", e))?;
    tokio::io::copy(&mut stream, &mut out)
        .await
        .map_err(|e| io("state", e))?;
    q.wait_migration(Duration::from_secs(30))
        .await
        .map_err(qerr)?;
    // RAM: the template VM's file, shared with its clones' VMMs through
    // the template group (QEMU opens it read-write, maps it privately).
    move_file(&paths.run_dir.join("memory"), memory).map_err(|e| io("memory", e))?;
    give_to_template_group(memory, 0o660)
}

/// Root's, readable by clones' VMMs through the template group.
fn give_to_template_group(p: &Path, mode: u32) -> Result<(), RunError> {
    std::os::unix::fs::chown(p, Some(0), Some(dough_vmm::TEMPLATE_GID))
        .map_err(|e| io(&p.display().to_string(), e))?;
    std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(|e| io(&p.display().to_string(), e))
}

/// Rename, or copy and remove across file systems.
pub(crate) fn move_file(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => {
            std::fs::copy(from, to)?;
            std::fs::remove_file(from)
        }
        Err(e) => Err(e),
    }
}

/// A clone of `tpl`, restored, reseeded and idle (egress `none`, like a
/// pooled VM). `spec` gives the timeouts and the VM id (a fresh one when
/// None); the shape is the template's.
pub async fn clone_vm(
    host: &HostConfig,
    tpl: &Template,
    spec: &TaskSpec,
) -> Result<BootedVm, RunError> {
    // A clone resumes the template's guest with its page cache: its drives
    // must be the very files the template booted.
    let digest = match &spec.image {
        Some(i) => i.manifest.digest.clone(),
        None => dough_image::Image::load(&host.image_dir)?.manifest.digest,
    };
    if digest != tpl.image_digest {
        return Err(RunError::Vmm(VmmError::Spec(format!(
            "template {} was made from image {}; the image is now {} (rebuilt)",
            tpl.id,
            &tpl.image_digest[..12.min(tpl.image_digest.len())],
            &digest[..12.min(digest.len())]
        ))));
    }
    let state = std::fs::File::open(&tpl.state).map_err(|e| io("state", e))?;
    let spec = TaskSpec {
        vcpus: tpl.vcpus,
        memory_mib: tpl.memory_mib,
        ..spec.clone()
    };
    let clone = SnapshotBoot::Clone {
        template: tpl,
        state,
    };
    boot_idle_as(host, &spec, Some(clone)).await
}

/// Connect to a VM's virtio-serial control port (QEMU listens on it once
/// it runs).
pub(crate) async fn connect_port(path: &Path) -> Result<UnixStream, RunError> {
    let t = Instant::now();
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(e) if t.elapsed() > Duration::from_secs(10) => {
                return Err(RunError::Vmm(VmmError::Io {
                    path: path.to_path_buf(),
                    source: e,
                }))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

/// The clone's side of [`crate::supervisor::boot_vm`]: restore, connect,
/// resume, re-identify.
pub(crate) async fn drive_restore(
    vmm: &dyn Vmm,
    vmspec: &VmSpec,
    spec: &TaskSpec,
    tpl: &Template,
    live: &mut Live,
    ctx: &mut Ctx<'_>,
) -> Result<Result<tokio::sync::mpsc::Receiver<Incoming>, i32>, RunError> {
    let paths = &vmspec.paths;
    let Some(dough_vmm::SnapshotRole::Clone { state_fd, .. }) = &vmspec.snapshot else {
        return Err(lost("not a clone".into(), paths));
    };
    if vmm.backend() != tpl.backend {
        return Err(RunError::Vmm(VmmError::Spec(format!(
            "template {} was made with {}; this host now selects {}",
            tpl.id,
            tpl.backend,
            vmm.backend()
        ))));
    }
    let t0 = Instant::now();
    sparse_copy(&tpl.scratch, &vmspec.scratch).map_err(|e| io("scratch", e))?;
    debug!(
        us = t0.elapsed().as_micros() as u64,
        "restore: scratch copied"
    );
    // Firecracker: the clone's agent dials in again once the restore has
    // reset its vsock connection.
    let listener = match tpl.backend {
        Backend::Firecracker => Some(dough_vmm::vsock::listen(
            &paths.vsock_uds(),
            dough_proto::CONTROL_PORT,
        )?),
        Backend::Qemu => None,
    };
    let vm = live.vm.insert(vmm.start(vmspec).await?);
    debug!(us = t0.elapsed().as_micros() as u64, "restore: vmm spawned");
    ctx.phase(Phase::Spawned);
    let restore = async {
        match &listener {
            // Loaded and resumed by start() (snapshot/load, resume_vm).
            Some(l) => l
                .accept()
                .await
                .map(|(s, _)| s)
                .map_err(|e| io("vsock listener", e)),
            None => qemu_restore(paths, *state_fd, t0).await,
        }
    };
    let deadline = tokio::time::Instant::now() + spec.boot_timeout;
    let timeout = || RunError::BootTimeout {
        secs: spec.boot_timeout.as_secs(),
        serial_tail: serial_tail(paths),
    };
    let stream = tokio::select! {
        r = restore => r?,
        st = vm.wait_vmm() => { ctx.phase(Phase::VmmExit); return Err(vmm_exited(paths, st)) }
        _ = tokio::time::sleep_until(deadline) => return Err(timeout()),
    };
    drop(listener);
    let (r, w) = stream.into_split();
    let w = live.writer.insert(w);
    let mut rx = conn::spawn_reader(r);
    live.agent_ok = true;
    live.hello = Some(tpl.hello.clone());
    if tpl.backend == Backend::Firecracker {
        // A new connection: Hello and Welcome as at boot.
        let hello = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Incoming::Msg(GuestMsg::Hello(h)))) => h,
            Ok(other) => return Err(lost(format!("expected Hello, got {other:?}"), paths)),
            Err(_) => return Err(timeout()),
        };
        crate::supervisor::welcome(w, &hello, paths).await?;
    }

    let mut entropy = vec![0u8; 64];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut entropy))
        .map_err(|e| io("/dev/urandom", e))?;
    let now_ns = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    };
    let msg = HostMsg::Restore(Restore {
        entropy,
        unix_nanos: now_ns(),
        vm_id: vmspec.id.clone(),
    });
    conn::send(w, &msg)
        .await
        .map_err(|e| lost(format!("cannot send Restore: {e}"), paths))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (sample, guest_ns) = loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Incoming::Msg(GuestMsg::Restored { sample, unix_nanos }))) => {
                break (sample, unix_nanos)
            }
            Ok(Some(Incoming::Msg(GuestMsg::Heartbeat { .. }))) => {}
            Ok(Some(Incoming::Msg(GuestMsg::Log { message }))) => {
                return Err(lost(
                    format!("restore failed in the guest: {message}"),
                    paths,
                ))
            }
            Ok(other) => return Err(lost(format!("expected Restored, got {other:?}"), paths)),
            Err(_) => return Err(lost("no Restored within 10 s".into(), paths)),
        }
    };
    // The host's read-back: a fresh sample, and the clock it set.
    check_restored(&tpl.samples, sample, guest_ns, now_ns()).map_err(|m| lost(m, paths))?;
    debug!(
        us = t0.elapsed().as_micros() as u64,
        "restore: reseeded, re-identified"
    );
    ctx.phase(Phase::Hello);
    Ok(Ok(rx))
}

/// The most a clone's clock may differ from the host's after Restore.
const MAX_CLONE_SKEW_NS: u64 = 5_000_000_000;

/// Accept a clone's `Restored` only with a fresh 32-byte RNG sample (none
/// of the template's clones gave it before: a repeat means the clone was
/// not reseeded) and a clock within [`MAX_CLONE_SKEW_NS`] of the host's.
fn check_restored(
    samples: &Mutex<HashSet<Vec<u8>>>,
    sample: Vec<u8>,
    guest_ns: u64,
    host_ns: u64,
) -> Result<(), String> {
    if sample.len() != 32 || sample.iter().all(|b| *b == 0) {
        return Err(format!("bad RNG sample from the clone: {sample:?}"));
    }
    if !samples
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(sample)
    {
        return Err("the clone's RNG sample repeats another clone's: it was not reseeded".into());
    }
    let skew = (guest_ns as i128 - host_ns as i128).unsigned_abs();
    if skew > MAX_CLONE_SKEW_NS as u128 {
        return Err(format!("the clone's clock is {} ms off", skew / 1_000_000));
    }
    Ok(())
}

/// QEMU: load the device state into a paused VM, connect its control
/// port, run it.
async fn qemu_restore(
    paths: &dough_vmm::VmPaths,
    state_fd: i32,
    t0: Instant,
) -> Result<UnixStream, RunError> {
    let qerr = |e: VmmError| RunError::Vmm(e);
    let mut q = qmp::Session::connect(&paths.qmp(), Duration::from_secs(10))
        .await
        .map_err(qerr)?;
    debug!(
        us = t0.elapsed().as_micros() as u64,
        "restore: qmp connected"
    );
    q.execute("migrate-set-capabilities", qmp::snapshot_capabilities())
        .await
        .map_err(qerr)?;
    q.execute(
        "migrate-incoming",
        serde_json::json!({"uri": format!("fd:{state_fd}")}),
    )
    .await
    .map_err(qerr)?;
    q.wait_status("paused", Duration::from_secs(30))
        .await
        .map_err(qerr)?;
    debug!(
        us = t0.elapsed().as_micros() as u64,
        "restore: state loaded"
    );
    // Connected before the guest runs: its port sees a host at once.
    let stream = connect_port(&paths.agent_sock()).await?;
    q.execute("cont", serde_json::json!({}))
        .await
        .map_err(qerr)?;
    debug!(us = t0.elapsed().as_micros() as u64, "restore: running");
    Ok(stream)
}

/// Copy a sparse file, its holes kept (a scratch disk is 4 GiB of mostly
/// holes).
pub fn sparse_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    let src = std::fs::File::open(from)?;
    let len = src.metadata()?.len() as i64;
    let dst = std::fs::File::create(to)?;
    dst.set_len(len as u64)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0i64;
    while off < len {
        let data = match lseek(src.as_raw_fd(), off, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(src.as_raw_fd(), data, Whence::SeekHole)?;
        let mut p = data;
        while p < hole {
            let n = ((hole - p) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], p as u64)?;
            dst.write_all_at(&buf[..n], p as u64)?;
            p += n as i64;
        }
        off = hole;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of what a clone may report after Restore (docs/service.md):
    /// a repeated sample (not reseeded), a clock more than 5 s off either
    /// way, an empty or zero sample — each refused; the rest accepted. No
    /// real clone can be made to repeat its sample or skew its clock, so the
    /// host's decision is tested here, on the function the restore calls.
    #[test]
    fn a_clone_is_accepted_only_with_a_fresh_sample_and_its_clock_set() {
        let samples = Mutex::new(HashSet::new());
        let host = 1_800_000_000_000_000_000u64;
        let s = |b: u8| vec![b; 32];
        let table: &[(Vec<u8>, u64, Result<(), &str>)] = &[
            (s(1), host, Ok(())),
            (s(2), host + 4_999_000_000, Ok(())),
            (s(3), host - 4_999_000_000, Ok(())),
            (s(1), host, Err("repeats another clone's")),
            (s(4), host + 5_001_000_000, Err("clock is 5001 ms off")),
            (s(5), host - 60_000_000_000, Err("clock is 60000 ms off")),
            (vec![0; 32], host, Err("bad RNG sample")),
            (vec![7; 16], host, Err("bad RNG sample")),
        ];
        for (sample, guest, want) in table {
            let got = check_restored(&samples, sample.clone(), *guest, host);
            match (want, &got) {
                (Ok(()), Ok(())) => {}
                (Err(w), Err(e)) => assert!(e.contains(w), "{sample:?}: {e}"),
                _ => panic!("{sample:?} at {guest}: want {want:?}, got {got:?}"),
            }
        }
    }

    /// A Firecracker template's files move from its jail to the template
    /// directory; across file systems (here /dev/shm, a tmpfs, to the
    /// test's directory) by copy and remove.
    #[test]
    fn move_file_crosses_file_systems() {
        let d = tempfile::tempdir().unwrap();
        let to = d.path().join("memory");
        // /dev/shm is a tmpfs on every Linux host Dough runs on (and in
        // CI): without it this test would prove nothing, so it fails.
        let shm = tempfile::tempdir_in("/dev/shm").expect("a tmpfs at /dev/shm");
        let from = shm.path().join("snapshot.mem");
        std::fs::write(&from, b"guest memory").unwrap();
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (
            std::fs::metadata(shm.path()).unwrap().dev(),
            std::fs::metadata(d.path()).unwrap().dev(),
        );
        move_file(&from, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"guest memory");
        assert!(!from.exists());
        assert_ne!(a, b, "the test needs two file systems");
        // Within one: a rename.
        let again = d.path().join("memory2");
        move_file(&to, &again).unwrap();
        assert!(again.exists() && !to.exists());
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let f = std::fs::File::create(&a).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"middle", 32 << 20).unwrap();
        drop(f);
        sparse_copy(&a, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&b).unwrap().blocks();
        assert!(
            blocks * 512 < 1 << 20,
            "the copy is not sparse: {blocks} blocks"
        );
    }
}
