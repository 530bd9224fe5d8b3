//! The repository around a task: clone before it, commit and bundle after.
//!
//! Every git command runs as the user the task runs as (so nothing in the
//! repository the task could have planted — hooks, `core.fsmonitor`, … —
//! runs with more privilege than the task had), with hooks off, no system or
//! global config, no prompts.
//!
//! The read credential reaches git through a pipe: a credential helper reads
//! it from an inherited descriptor. It is never in an environment, argv or
//! file, and the agent wipes its own copies once the clone is done — before
//! any task code starts.
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::SyncSender;

use dough_proto::{GuestMsg, RepoWork, Work};

use crate::task::{Reaper, TaskUser};

/// Bundle chunks stay well inside one frame.
const BUNDLE_CHUNK: usize = 256 * 1024;
/// The descriptor the credential helper reads.
const CRED_FD: i32 = 3;
/// `get` prints what the pipe holds; `store` and `erase` are ignored.
const CRED_HELPER: &str = "!f() { test \"$1\" = get && cat <&3; }; f";

/// A git command as `user` in `dir`, with a clean environment.
fn git(user: &TaskUser, dir: &str, args: &[&str]) -> Command {
    let mut c = Command::new("git");
    c.args(args)
        .env_clear()
        .env("PATH", crate::task::PATH)
        .env("HOME", user.home)
        .env("LANG", "C.UTF-8")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_COUNT", "1")
        .env("GIT_CONFIG_KEY_0", "core.hooksPath")
        .env("GIT_CONFIG_VALUE_0", "/dev/null")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some((uid, gid)) = user.ids {
        c.uid(uid).gid(gid);
    }
    c
}

/// Collect a child's stderr on a thread (so a full pipe never blocks it).
fn collect_stderr(child: &mut std::process::Child) -> std::thread::JoinHandle<String> {
    let mut err = child.stderr.take();
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    })
}

/// Run to completion; `Ok(stdout)` on exit 0, else git's last stderr line.
fn output(reaper: &Reaper, mut cmd: Command, what: &str) -> Result<String, String> {
    let (mut child, status) = reaper
        .spawn_command(&mut cmd)
        .map_err(|e| format!("{what}: cannot run git: {e}"))?;
    let errt = collect_stderr(&mut child);
    let mut out = String::new();
    if let Some(o) = child.stdout.as_mut() {
        let _ = o.read_to_string(&mut out);
    }
    drop(child);
    let st = status.recv().unwrap_or(dough_proto::ExitStatus::Code(255));
    let err = errt.join().unwrap_or_default();
    if st == dough_proto::ExitStatus::Code(0) {
        Ok(out)
    } else {
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message")
            .trim()
            .to_string();
        Err(format!("{what}: {last}"))
    }
}

/// Clone `r.url` at `r.base_branch` into `r.dir` and put the task's branch
/// at `r.base_commit`. Wipes the credential, whatever happens.
pub fn clone(reaper: &Reaper, user: &TaskUser, r: &mut RepoWork) -> Result<String, String> {
    let res = clone_inner(reaper, user, r);
    if let Some((u, p)) = r.credential.take() {
        wipe(u);
        wipe(p);
    }
    res
}

fn clone_inner(reaper: &Reaper, user: &TaskUser, r: &RepoWork) -> Result<String, String> {
    let parent = std::path::Path::new(&r.dir)
        .parent()
        .and_then(|p| p.to_str())
        .unwrap_or("/")
        .to_string();
    std::fs::create_dir_all(&parent).map_err(|e| format!("create {parent}: {e}"))?;
    if let Some((uid, gid)) = user.ids {
        let _ = std::os::unix::fs::chown(&parent, Some(uid), Some(gid));
    }
    let mut cmd = git(
        user,
        &parent,
        &[
            "clone",
            "--quiet",
            "--no-tags",
            "--single-branch",
            "--branch",
            &r.base_branch,
            "--",
            &r.url,
            &r.dir,
        ],
    );
    // Kept alive until the clone ends; the helper reads it through fd 3.
    let _cred_pipe: Option<OwnedFd> = match &r.credential {
        None => None,
        Some((u, p)) => {
            let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| format!("pipe: {e}"))?;
            let mut buf = format!("username={u}\npassword={p}\n").into_bytes();
            let res = std::fs::File::from(wr).write_all(&buf);
            buf.fill(0);
            res.map_err(|e| format!("credential pipe: {e}"))?;
            cmd.env("GIT_CONFIG_COUNT", "2")
                .env("GIT_CONFIG_KEY_1", "credential.helper")
                .env("GIT_CONFIG_VALUE_1", CRED_HELPER);
            let fd = rd.as_raw_fd();
            // SAFETY: dup2 is async-signal-safe; it runs between fork and
            // exec, and the copy it makes (fd 3) does not close on exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::dup2(fd, CRED_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            Some(rd)
        }
    };
    output(reaper, cmd, "git clone")?;
    output(
        reaper,
        git(
            user,
            &r.dir,
            &["checkout", "--quiet", "-b", &r.branch, &r.base_commit],
        ),
        &format!("check out the base commit {}", r.base_commit),
    )?;
    let head = output(
        reaper,
        git(user, &r.dir, &["rev-parse", "HEAD"]),
        "git rev-parse",
    )?;
    Ok(head.trim().to_string())
}

fn wipe(s: String) {
    let mut b = s.into_bytes();
    b.fill(0);
    std::hint::black_box(&b);
}

/// After the task: commit what it left, bundle base..branch and stream it to
/// the host. Returns the report to send (the bundle itself is sent here).
pub fn finish(reaper: &Reaper, user: &TaskUser, r: &RepoWork, out: &SyncSender<GuestMsg>) -> Work {
    match finish_inner(reaper, user, r, out) {
        Ok(w) => w,
        Err((stage, message)) => Work::Failed {
            stage: stage.into(),
            message,
        },
    }
}

fn finish_inner(
    reaper: &Reaper,
    user: &TaskUser,
    r: &RepoWork,
    out: &SyncSender<GuestMsg>,
) -> Result<Work, (&'static str, String)> {
    let commit = |e| ("commit", e);
    let run = |args: &[&str], what: &str| output(reaper, git(user, &r.dir, args), what);
    if !std::path::Path::new(&r.dir).join(".git").exists() {
        return Err(commit(format!("{} is no longer a git repository", r.dir)));
    }
    run(&["add", "--all"], "git add").map_err(commit)?;
    let staged = run(&["diff", "--cached", "--name-only"], "git diff").map_err(commit)?;
    if !staged.trim().is_empty() {
        let mut c = git(
            user,
            &r.dir,
            &[
                "commit",
                "--quiet",
                "--no-verify",
                "--no-gpg-sign",
                "-m",
                &r.commit_message,
            ],
        );
        for who in ["AUTHOR", "COMMITTER"] {
            c.env(format!("GIT_{who}_NAME"), &r.author_name)
                .env(format!("GIT_{who}_EMAIL"), &r.author_email);
        }
        output(reaper, c, "git commit").map_err(commit)?;
    }
    let head = run(&["rev-parse", "--verify", "HEAD^{commit}"], "git rev-parse")
        .map_err(commit)?
        .trim()
        .to_string();
    if head == r.base_commit {
        return Ok(Work::NothingToDo);
    }
    let branch_ref = format!("refs/heads/{}", r.branch);
    run(&["update-ref", &branch_ref, &head], "git update-ref").map_err(commit)?;
    let commits: u32 = run(
        &["rev-list", "--count", &format!("{}..{head}", r.base_commit)],
        "git rev-list",
    )
    .map_err(commit)?
    .trim()
    .parse()
    .unwrap_or(0);
    let bytes = send_bundle(reaper, user, r, &branch_ref, out).map_err(|e| ("bundle", e))?;
    Ok(Work::Bundle {
        head,
        commits,
        bytes,
    })
}

/// `git bundle create - <branch> ^<base>`, streamed as BundleData.
fn send_bundle(
    reaper: &Reaper,
    user: &TaskUser,
    r: &RepoWork,
    branch_ref: &str,
    out: &SyncSender<GuestMsg>,
) -> Result<u64, String> {
    let not_base = format!("^{}", r.base_commit);
    let mut cmd = git(
        user,
        &r.dir,
        &["bundle", "create", "--quiet", "-", branch_ref, &not_base],
    );
    let (mut child, status) = reaper
        .spawn_command(&mut cmd)
        .map_err(|e| format!("cannot run git bundle: {e}"))?;
    let errt = collect_stderr(&mut child);
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let mut total = 0u64;
    let mut buf = vec![0u8; BUNDLE_CHUNK];
    let mut too_big = false;
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read the bundle: {e}")),
        };
        total += n as u64;
        if total > r.max_bundle_bytes {
            too_big = true;
            let _ = child.kill();
            break;
        }
        if out
            .send(GuestMsg::BundleData {
                data: buf[..n].to_vec(),
            })
            .is_err()
        {
            return Err("the host went away".into());
        }
    }
    drop(stdout);
    let st = status.recv().unwrap_or(dough_proto::ExitStatus::Code(255));
    let err = errt.join().unwrap_or_default();
    if too_big {
        return Err(format!(
            "the bundle is larger than the limit of {} bytes",
            r.max_bundle_bytes
        ));
    }
    if st != dough_proto::ExitStatus::Code(0) {
        return Err(format!("git bundle: {}", err.trim()));
    }
    Ok(total)
}
