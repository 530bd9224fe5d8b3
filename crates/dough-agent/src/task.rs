//! Running the task: spawn as the task user in its own session, stream its
//! stdout and stderr, and collect its exit status from the PID-1 reaper.
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::process::Command;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dough_proto::{Assign, ExitStatus, GuestMsg, Stream, MAX_OUTPUT_CHUNK};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// The unprivileged task user made by the image build.
pub const TASK_UID: u32 = 1000;
pub const TASK_GID: u32 = 1000;
pub const TASK_HOME: &str = "/home/dough";
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// PID 1 reaps every process; the task's own status is routed to whoever
/// waits for it. Spawning holds the same lock, so the reaper can never take
/// the status of a child `Command::spawn` is still waiting on.
#[derive(Clone, Default)]
pub struct Reaper {
    inner: Arc<Mutex<ReaperState>>,
}

#[derive(Default)]
struct ReaperState {
    watched: HashMap<i32, SyncSender<ExitStatus>>,
}

impl Reaper {
    /// Block SIGCHLD in the calling thread; call before any other thread is
    /// started so every thread inherits the mask and only the reaper takes it.
    pub fn block_sigchld() {
        let mut set = SigSet::empty();
        set.add(Signal::SIGCHLD);
        let _ = set.thread_block();
    }

    /// The reaper loop, on its own thread.
    pub fn run(self) {
        let mut set = SigSet::empty();
        set.add(Signal::SIGCHLD);
        loop {
            let _ = set.wait();
            let mut st = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(pid, code)) => st.deliver(pid, ExitStatus::Code(code)),
                    Ok(WaitStatus::Signaled(pid, sig, _)) => {
                        st.deliver(pid, ExitStatus::Signal(sig as i32))
                    }
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
    }

    /// Start `spec` under the reaper's lock and register for its exit
    /// status.
    pub fn spawn(
        &self,
        spec: &crate::spawn::Spec,
    ) -> std::io::Result<(crate::spawn::Spawned, Receiver<ExitStatus>)> {
        let mut st = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let child = crate::spawn::spawn(spec)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        st.watched.insert(child.pid, tx);
        Ok((child, rx))
    }

    /// `spawn` for std's `Command` (git and the other helpers around a
    /// task, where a fork's cost does not matter).
    pub fn spawn_command(
        &self,
        cmd: &mut Command,
    ) -> std::io::Result<(std::process::Child, Receiver<ExitStatus>)> {
        let mut st = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let child = cmd.spawn()?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        st.watched.insert(child.id() as i32, tx);
        Ok((child, rx))
    }
}

impl ReaperState {
    fn deliver(&mut self, pid: Pid, status: ExitStatus) {
        if let Some(tx) = self.watched.remove(&pid.as_raw()) {
            let _ = tx.try_send(status);
        }
    }
}

/// Who the task (and the git commands around it) runs as.
pub struct TaskUser {
    /// (uid, gid) to switch to; None: stay root.
    pub ids: Option<(u32, u32)>,
    pub home: &'static str,
    pub name: &'static str,
}

impl TaskUser {
    pub fn of(a: &Assign) -> TaskUser {
        if a.root {
            TaskUser {
                ids: None,
                home: "/root",
                name: "root",
            }
        } else {
            TaskUser {
                ids: Some((TASK_UID, TASK_GID)),
                home: TASK_HOME,
                name: "dough",
            }
        }
    }
}

/// Run what nearly every task's first exec touches (the shells, the C
/// library, coreutils), so a warm-pool VM's task starts from the page cache
/// instead of the disk. As a task starts: named commands found down PATH
/// (each miss a lookup the dentry cache then holds), from the task user's
/// home. Measured under TCG: starting from `/` with absolute paths left a
/// clone pool's claim at 23-55 ms, this at 13-21 ms (as cold-booted VMs),
/// and a template warmed this way restores into a clone whose first task
/// starts ~20 ms sooner. Idle time only; failures are ignored.
pub fn prewarm(reaper: &Reaper) {
    let env = [("PATH".to_string(), PATH.to_string())];
    for argv in [
        &["sh", "-c", "/usr/bin/true"][..],
        &["bash", "-c", "true"][..],
    ] {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let spec = crate::spawn::Spec {
            argv: &argv,
            env: &env,
            cwd: TASK_HOME,
            ids: Some((TASK_UID, TASK_GID)),
        };
        if let Ok((child, rx)) = reaper.spawn(&spec) {
            drop((child.stdout, child.stderr));
            let _ = rx.recv_timeout(std::time::Duration::from_secs(10));
        }
    }
}

/// Where the prompt goes (`$DOUGH_PROMPT_FILE`), under the user's home.
const PROMPT_FILE: &str = ".dough/prompt";

/// The task's environment: a clean one, then the task's own variables.
pub fn task_env(a: &Assign) -> Vec<(String, String)> {
    let u = TaskUser::of(a);
    let mut env: Vec<(String, String)> = [
        ("PATH", PATH),
        ("HOME", u.home),
        ("USER", u.name),
        ("LOGNAME", u.name),
        ("SHELL", "/bin/bash"),
        ("LANG", "C.UTF-8"),
        ("DOUGH_TASK_ID", &a.task_id),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in &a.env {
        env.retain(|(old, _)| old != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

/// Write the prompt where the task user can read it; returns its path.
fn write_prompt(user: &TaskUser, prompt: &str) -> Result<String, String> {
    let path = std::path::Path::new(user.home).join(PROMPT_FILE);
    let dir = path.parent().unwrap_or(std::path::Path::new("/"));
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    std::fs::write(&path, prompt).map_err(|e| format!("write {}: {e}", path.display()))?;
    if let Some((uid, gid)) = user.ids {
        for p in [dir, path.as_path()] {
            std::os::unix::fs::chown(p, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", p.display()))?;
        }
    }
    Ok(path.display().to_string())
}

/// What is made ready while the VM is idle, because under an emulated CPU
/// each costs milliseconds the task's start should not wait for: the two
/// threads that stream the task's stdout and stderr as Output messages
/// (~ms per thread) and the kernel's OOM-kill count the task's is compared
/// with (reading /proc/vmstat: ~3.5 ms under TCG).
pub struct Standby {
    pumps: Vec<(SyncSender<File>, std::thread::JoinHandle<()>)>,
    oom_before: u64,
}

impl Standby {
    pub fn start(out: &SyncSender<GuestMsg>) -> Standby {
        let pumps = [Stream::Stdout, Stream::Stderr]
            .into_iter()
            .map(|stream| {
                let (give, take) = std::sync::mpsc::sync_channel::<File>(1);
                let out = out.clone();
                let h = std::thread::spawn(move || {
                    let Ok(mut r) = take.recv() else { return };
                    let mut buf = vec![0u8; MAX_OUTPUT_CHUNK];
                    loop {
                        match r.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                let msg = GuestMsg::Output {
                                    stream,
                                    data: buf[..n].to_vec(),
                                };
                                if out.send(msg).is_err() {
                                    break;
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(_) => break,
                        }
                    }
                });
                (give, h)
            })
            .collect();
        Standby {
            pumps,
            oom_before: oom_kills(),
        }
    }

    /// Hand the pipes over; the handles finish at end of file.
    fn attach(self, stdout: File, stderr: File) -> Vec<std::thread::JoinHandle<()>> {
        self.pumps
            .into_iter()
            .zip([stdout, stderr])
            .map(|((give, h), r)| {
                let _ = give.send(r);
                h
            })
            .collect()
    }
}

/// Run the task to completion, sending Started, Output and Exit to `out`;
/// with a repository, clone before (Cloned or CloneFailed) and send the
/// work after (BundleData, Work) when the task exited with a code.
pub fn run(
    reaper: &Reaper,
    mut a: Assign,
    out: SyncSender<GuestMsg>,
    pgid: Arc<Mutex<Option<i32>>>,
    standby: Standby,
) {
    let user = TaskUser::of(&a);
    let repo = a.repo.take().map(|mut r| {
        let res = crate::repo::clone(reaper, &user, &mut r);
        (r, res)
    });
    let repo = match repo {
        None => None,
        Some((_, Err(message))) => {
            let _ = out.send(GuestMsg::CloneFailed { message });
            return;
        }
        Some((r, Ok(commit))) => {
            let _ = out.send(GuestMsg::Cloned { commit });
            a.env.push(("DOUGH_REPO_DIR".into(), r.dir.clone()));
            a.env.push(("DOUGH_BRANCH".into(), r.branch.clone()));
            a.env
                .push(("DOUGH_BASE_COMMIT".into(), r.base_commit.clone()));
            if a.workdir.is_none() {
                a.workdir = Some(r.dir.clone());
            }
            Some(r)
        }
    };
    if let Some(p) = a.prompt.take() {
        match write_prompt(&user, &p) {
            Ok(path) => a.env.push(("DOUGH_PROMPT_FILE".into(), path)),
            Err(message) => {
                let _ = out.send(GuestMsg::SpawnFailed {
                    message: format!("cannot write the prompt: {message}"),
                });
                return;
            }
        }
    }
    let Some((status, oom)) = run_command(reaper, &a, &out, pgid, standby) else {
        return;
    };
    // Also after a failure: the host says what the task left (and pushes
    // it only when asked).
    if let (Some(r), ExitStatus::Code(_)) = (&repo, status) {
        let work = crate::repo::finish(reaper, &user, r, &out);
        let _ = out.send(GuestMsg::Work(work));
    }
    let _ = out.send(GuestMsg::Exit { status, oom });
}

/// Spawn the command, stream its output, wait for it. None: it could not
/// be started (SpawnFailed was sent).
fn run_command(
    reaper: &Reaper,
    a: &Assign,
    out: &SyncSender<GuestMsg>,
    pgid: Arc<Mutex<Option<i32>>>,
    standby: Standby,
) -> Option<(ExitStatus, bool)> {
    if a.command.is_empty() {
        let _ = out.send(GuestMsg::SpawnFailed {
            message: "empty command".into(),
        });
        return None;
    }
    if let Some(dir) = &a.workdir {
        if !std::path::Path::new(dir).is_dir() {
            let _ = out.send(GuestMsg::SpawnFailed {
                message: format!("working directory {dir} does not exist in the guest"),
            });
            return None;
        }
    }
    let u = TaskUser::of(a);
    let env = task_env(a);
    let spec = crate::spawn::Spec {
        argv: &a.command,
        env: &env,
        cwd: a.workdir.as_deref().unwrap_or(u.home),
        ids: u.ids,
    };
    let oom_before = standby.oom_before;
    let (child, status_rx) = match reaper.spawn(&spec) {
        Ok(c) => c,
        Err(e) => {
            let message = match e.kind() {
                std::io::ErrorKind::NotFound => {
                    format!("{}: command not found in the guest", a.command[0])
                }
                _ => format!("cannot start {}: {e}", a.command[0]),
            };
            let _ = out.send(GuestMsg::SpawnFailed { message });
            return None;
        }
    };
    let pid = child.pid as u32;
    *pgid.lock().unwrap_or_else(|p| p.into_inner()) = Some(pid as i32);
    let _ = out.send(GuestMsg::Started { pid });
    let readers = standby.attach(child.stdout, child.stderr);

    let status = status_rx.recv().unwrap_or(ExitStatus::Code(255));
    // Output pipes may be held open by the task's background children; give
    // them a moment, then end the whole group so every byte written so far
    // is flushed and the readers finish.
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while readers.iter().any(|r| !r.is_finished()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if readers.iter().any(|r| !r.is_finished()) {
        let _ = nix::sys::signal::killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    for r in readers {
        let _ = r.join();
    }
    *pgid.lock().unwrap_or_else(|p| p.into_inner()) = None;
    let oom = oom_kills() > oom_before;
    Some((status, oom))
}

/// The kernel's count of OOM kills (`oom_kill` in /proc/vmstat).
fn oom_kills() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}
