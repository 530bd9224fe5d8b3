//! A running VM's processes and their orderly, idempotent stop.
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::{io_err, qmp, Backend, VmPaths, VmmError};

/// Spawn a helper or VMM process: own process group (a terminal's Ctrl-C
/// goes to Dough, which then tears down in order), killed if Dough dies
/// (PR_SET_PDEATHSIG), output to `log`.
pub fn spawn(what: &str, cmd: Command, log: &std::path::Path) -> Result<Child, VmmError> {
    spawn_split(what, cmd, log, log)
}

/// As [`spawn`], with stdout and stderr to different files (appending when
/// both are the same file).
pub fn spawn_split(
    what: &str,
    cmd: Command,
    stdout: &std::path::Path,
    stderr: &std::path::Path,
) -> Result<Child, VmmError> {
    let open = |p: &std::path::Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(io_err(p))
    };
    let out = open(stdout)?;
    let err = open(stderr)?;
    spawn_with(what, cmd, Some(out), err)
}

fn spawn_with(
    what: &str,
    mut cmd: Command,
    out: Option<std::fs::File>,
    err: std::fs::File,
) -> Result<Child, VmmError> {
    if let Some(out) = out {
        cmd.stdout(out);
    }
    cmd.stdin(Stdio::null())
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|source| VmmError::Spawn {
        what: what.into(),
        source,
    })
}

/// Make `cmd` join the network namespace `ns` (a namespace file) between
/// fork and exec. Register before hooks that drop privileges (`Jail::apply`):
/// setns needs CAP_SYS_ADMIN.
pub fn enter_netns(cmd: &mut Command, ns: &std::path::Path) -> Result<(), VmmError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(ns).map_err(io_err(ns))?;
    // SAFETY: setns is a raw syscall on an fd opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Let the child keep descriptor `fd` (same number) across exec.
pub fn inherit_fd(cmd: &mut Command, fd: i32) {
    // SAFETY: fcntl on a descriptor number; async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Largest size of a VM's console log. A guest can write to its console
/// without end; past this size the file starts over (with a marker), so it
/// stays bounded and always holds the latest output.
pub const CONSOLE_LOG_CAP: u64 = 4 << 20;

/// As [`spawn_split`], but stdout (the guest console for QEMU's stdio
/// chardev and for Firecracker) goes through a pipe into `console`, kept
/// under `cap` bytes by a task of Dough's.
pub fn spawn_console(
    what: &str,
    mut cmd: Command,
    console: &std::path::Path,
    cap: u64,
    stderr: &std::path::Path,
) -> Result<(Child, Option<ConsoleCopy>), VmmError> {
    cmd.stdout(Stdio::piped());
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(stderr)
        .map_err(io_err(stderr))?;
    let mut child = spawn_with(what, cmd, None, err)?;
    let copy = match child.stdout.take() {
        Some(out) => {
            let file = std::fs::File::create(console).map_err(io_err(console))?;
            Some(tokio::spawn(capped_copy(
                out,
                tokio::fs::File::from_std(file),
                cap,
            )))
        }
        None => None,
    };
    Ok((child, copy))
}

/// Largest size of Firecracker's log and metrics files.
pub const FC_LOG_CAP: u64 = 1 << 20;

/// Make a named pipe at `fifo` (owned by `owner`, if given) and drain it
/// into `out`, kept under `cap` bytes. The reader holds the pipe open for
/// writing too, so it never sees end-of-file; abort the task when done.
pub fn fifo_log(
    fifo: &std::path::Path,
    out: &std::path::Path,
    cap: u64,
    owner: Option<(u32, u32)>,
) -> Result<ConsoleCopy, VmmError> {
    let _ = std::fs::remove_file(fifo);
    nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).map_err(|e| {
        VmmError::Io {
            path: fifo.into(),
            source: e.into(),
        }
    })?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(fifo, Some(uid), Some(gid)).map_err(io_err(fifo))?;
    }
    let rx = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(fifo)
        .map_err(io_err(fifo))?;
    let file = std::fs::File::create(out).map_err(io_err(out))?;
    Ok(tokio::spawn(capped_copy(
        rx,
        tokio::fs::File::from_std(file),
        cap,
    )))
}

/// The task copying a VMM's console into its log.
pub type ConsoleCopy = tokio::task::JoinHandle<std::io::Result<u64>>;

/// Copy `r` into `w`, starting `w` over whenever it would pass `cap`.
pub async fn capped_copy<R, W>(mut r: R, mut w: W, cap: u64) -> std::io::Result<u64>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + tokio::io::AsyncSeek + Unpin + SetLen,
{
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
    const MARK: &[u8] = b"[dough: earlier console output dropped]\n";
    let mut buf = vec![0u8; 16 * 1024];
    let (mut size, mut total) = (0u64, 0u64);
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.flush().await?;
            return Ok(total);
        }
        total += n as u64;
        let mut chunk = &buf[..n];
        if size + n as u64 > cap {
            w.flush().await?;
            w.set_len_async(0).await?;
            w.seek(std::io::SeekFrom::Start(0)).await?;
            w.write_all(MARK).await?;
            size = MARK.len() as u64;
            // Keep the newest bytes of a chunk too big for what is left.
            let room = cap.saturating_sub(size) as usize;
            chunk = &chunk[chunk.len().saturating_sub(room)..];
        }
        w.write_all(chunk).await?;
        size += chunk.len() as u64;
    }
}

/// Truncation for [`capped_copy`]'s writer.
pub trait SetLen {
    fn set_len_async(
        &mut self,
        len: u64,
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

impl SetLen for tokio::fs::File {
    async fn set_len_async(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len).await
    }
}

/// Last `n` lines of a log file (for error messages).
pub fn log_tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().rev().take(n).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// How to ask a VMM to stop before killing it.
#[derive(Debug, Clone)]
pub enum Control {
    /// QEMU's QMP socket: `quit`.
    Qmp(PathBuf),
    /// Firecracker's API socket: `SendCtrlAltDel`.
    FirecrackerApi(PathBuf),
}

/// The VMM process: our child, or (jailed Firecracker, started by the
/// jailer in a new PID namespace) a process we watch through a pidfd.
#[derive(Debug)]
pub enum VmmHandle {
    Child(Child),
    Pid {
        pid: i32,
        fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
        exited: bool,
    },
}

impl VmmHandle {
    /// Watch `pid` (not our child) through a pidfd.
    pub fn watch(pid: i32) -> std::io::Result<VmmHandle> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd owned by nobody else.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        // SAFETY: the AsyncFd owns `fd`, which stays open (and the same
        // description) for the AsyncFd's whole life.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }?;
        Ok(VmmHandle::Pid {
            pid,
            fd,
            exited: false,
        })
    }

    pub fn id(&self) -> Option<u32> {
        match self {
            VmmHandle::Child(c) => c.id(),
            VmmHandle::Pid { pid, exited, .. } => (!*exited).then_some(*pid as u32),
        }
    }

    /// Wait for exit. A watched pid reports a plain success status (its real
    /// status belongs to its own parent).
    pub async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        match self {
            VmmHandle::Child(c) => c.wait().await,
            VmmHandle::Pid { fd, exited, .. } => {
                if !*exited {
                    let mut g = fd.readable().await?;
                    g.retain_ready();
                    *exited = true;
                }
                Ok(std::process::ExitStatus::from_raw(0))
            }
        }
    }

    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        match self {
            VmmHandle::Child(c) => c.try_wait().ok().flatten(),
            VmmHandle::Pid { pid, exited, .. } => {
                if !*exited
                    && nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), None).is_err()
                {
                    *exited = true;
                }
                exited.then(|| std::process::ExitStatus::from_raw(0))
            }
        }
    }

    async fn kill(&mut self) -> std::io::Result<()> {
        match self {
            VmmHandle::Child(c) => kill_wait(c).await,
            VmmHandle::Pid { pid, .. } => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                self.wait().await.map(|_| ())
            }
        }
    }
}

/// One started VM.
#[derive(Debug)]
pub struct VmProcess {
    pub backend: Backend,
    pub paths: VmPaths,
    pub control: Control,
    pub vmm: VmmHandle,
    /// Helpers stopped after the VMM (vhost-device-vsock for QEMU).
    pub helpers: Vec<(String, Child)>,
    /// The jail the processes run in, destroyed once they are gone.
    pub jail: Option<crate::jail::Jail>,
    /// Copies the console into `serial.log`; done soon after the VMM exits.
    pub console: Option<ConsoleCopy>,
    /// Other log drains (Firecracker's logger and metrics), aborted at stop.
    pub drains: Vec<ConsoleCopy>,
}

/// What happened during a stop; errors are collected, never fatal midway.
#[derive(Debug, Default)]
pub struct StopReport {
    /// How the VMM ended: "exited", "qmp quit", "killed".
    pub vmm_ended_by: &'static str,
    pub errors: Vec<String>,
}

impl VmProcess {
    /// Wait for the VMM to exit on its own, and for its last console
    /// output to reach `serial.log` (error messages quote its tail).
    /// Cancel-safe.
    pub async fn wait_vmm(&mut self) -> std::io::Result<std::process::ExitStatus> {
        let status = self.vmm.wait().await?;
        if let Some(copy) = self.console.as_mut() {
            if tokio::time::timeout(Duration::from_secs(1), copy)
                .await
                .is_ok()
            {
                self.console = None;
            }
        }
        Ok(status)
    }

    /// Stop everything: wait `grace` for the VMM to exit by itself (the
    /// guest was asked to power off), then QMP `quit` (QEMU) or
    /// `SendCtrlAltDel` (Firecracker), then SIGKILL; then the helpers
    /// (SIGTERM, then SIGKILL). Safe to call more than once.
    pub async fn stop(&mut self, grace: Duration) -> StopReport {
        let mut r = StopReport {
            vmm_ended_by: "exited",
            ..StopReport::default()
        };
        if !wait_vmm_for(&mut self.vmm, grace).await {
            let limit = Duration::from_millis(300);
            let asked = match &self.control {
                Control::Qmp(sock) => {
                    r.vmm_ended_by = "qmp quit";
                    qmp::quit(sock, limit).await
                }
                Control::FirecrackerApi(sock) => {
                    r.vmm_ended_by = "ctrl-alt-del";
                    crate::firecracker::call(
                        sock,
                        &crate::firecracker::Firecracker::ctrl_alt_del(),
                        limit,
                    )
                    .await
                }
            };
            if let Err(e) = asked {
                r.errors.push(format!("graceful stop: {e}"));
            }
            if !wait_vmm_for(&mut self.vmm, Duration::from_millis(500)).await {
                r.vmm_ended_by = "killed";
                if let Err(e) = self.vmm.kill().await {
                    r.errors.push(format!("kill vmm: {e}"));
                }
            }
        }
        for (name, child) in &mut self.helpers {
            if child.try_wait().ok().flatten().is_some() {
                continue;
            }
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if !wait_for(child, Duration::from_millis(200)).await {
                if let Err(e) = kill_wait(child).await {
                    r.errors.push(format!("kill {name}: {e}"));
                }
            }
        }
        for d in self.drains.drain(..) {
            d.abort();
        }
        if let Some(jail) = self.jail.take() {
            r.errors.extend(jail.destroy());
        }
        r
    }
}

async fn wait_vmm_for(vmm: &mut VmmHandle, limit: Duration) -> bool {
    if vmm.try_wait().is_some() {
        return true;
    }
    if limit.is_zero() {
        return false;
    }
    tokio::time::timeout(limit, vmm.wait()).await.is_ok()
}

async fn wait_for(child: &mut Child, limit: Duration) -> bool {
    if child.try_wait().ok().flatten().is_some() {
        return true;
    }
    if limit.is_zero() {
        return false;
    }
    tokio::time::timeout(limit, child.wait()).await.is_ok()
}

async fn kill_wait(child: &mut Child) -> std::io::Result<()> {
    match child.kill().await {
        Ok(()) => Ok(()),
        // Already reaped.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
        Err(e) => Err(e),
    }
}

/// Wait until `path` exists, failing early if `child` exits.
pub async fn wait_for_socket(
    what: &str,
    child: &mut Child,
    path: &std::path::Path,
    log: &std::path::Path,
    limit: Duration,
) -> Result<(), VmmError> {
    let start = std::time::Instant::now();
    loop {
        if path.exists() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(VmmError::EarlyExit {
                what: what.into(),
                status: status.to_string(),
                log_tail: log_tail(log, 10),
            });
        }
        if start.elapsed() > limit {
            return Err(VmmError::SocketTimeout {
                what: what.into(),
                path: PathBuf::from(path),
                secs: limit.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest flooding its console: the log stays under the cap, starts
    /// over with a marker, and ends with the latest output.
    #[tokio::test]
    async fn console_log_stays_bounded_and_keeps_the_tail() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("serial.log");
        let mut input = Vec::new();
        for i in 0..20_000 {
            input.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        let file = tokio::fs::File::create(&path).await.unwrap();
        let total = capped_copy(&input[..], file, 4096).await.unwrap();
        assert_eq!(total, input.len() as u64);
        let log = std::fs::read_to_string(&path).unwrap();
        assert!(log.len() as u64 <= 4096, "{}", log.len());
        assert!(log.starts_with("[dough: earlier console output dropped]"));
        assert!(log.ends_with("line 19999\n"), "{}", &log[log.len() - 40..]);
        let small = d.path().join("small.log");
        let f = tokio::fs::File::create(&small).await.unwrap();
        capped_copy(&b"boot ok\n"[..], f, 4096).await.unwrap();
        assert_eq!(std::fs::read_to_string(&small).unwrap(), "boot ok\n");
    }

    /// Firecracker's logger writing into the named pipe: the file Dough
    /// drains it into stays capped.
    #[tokio::test]
    async fn fifo_log_is_drained_into_a_capped_file() {
        let d = tempfile::tempdir().unwrap();
        let (fifo, out) = (d.path().join("log.fifo"), d.path().join("log"));
        let drain = fifo_log(&fifo, &out, 1000, None).unwrap();
        let fifo2 = fifo.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut w = std::fs::OpenOptions::new().write(true).open(fifo2).unwrap();
            for i in 0..500 {
                writeln!(w, "warning {i}").unwrap();
            }
        })
        .await
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            if text.ends_with("warning 499\n") {
                assert!(text.len() <= 1000, "{}", text.len());
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not drained: {text:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drain.abort();
    }

    /// A pidfd-watched process is seen to exit (as a jailed Firecracker in
    /// its own PID namespace is), and killing it works.
    #[tokio::test]
    async fn watched_pid_exit_and_kill() {
        // It exits when its stdin closes: an event the test makes, so it
        // is alive at the first look however slow the machine is.
        let mut short = std::process::Command::new("sh")
            .args(["-c", "read x"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut h = VmmHandle::watch(short.id() as i32).unwrap();
        assert!(h.try_wait().is_none());
        drop(short.stdin.take());
        tokio::time::timeout(Duration::from_secs(30), h.wait())
            .await
            .unwrap()
            .unwrap();
        short.wait().unwrap();
        let mut long = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut h = VmmHandle::watch(long.id() as i32).unwrap();
        tokio::time::timeout(Duration::from_secs(5), h.kill())
            .await
            .unwrap()
            .unwrap();
        assert!(!long.wait().unwrap().success());
    }
}
