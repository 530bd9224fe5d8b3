//! Start the task's process the way `posix_spawn` does: `clone(CLONE_VM |
//! CLONE_VFORK)`, so the agent's address space is never copied. Under an
//! emulated CPU (QEMU TCG) a `fork` costs ~15 ms of page-table copying and
//! copy-on-write faults before the `exec` throws it all away; this path
//! skips it (docs/boot.md, "Warm pools"). `posix_spawn` itself cannot
//! switch uid, hence this file.
//!
//! The child shares the agent's memory until it execs, so between clone and
//! exec it only makes raw system calls on data prepared beforehand: no
//! allocation, no locks, no glibc wrapper with process-wide side effects
//! (glibc's `setuid` would signal every thread of the *agent*).
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

/// What to start.
pub struct Spec<'a> {
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    pub cwd: &'a str,
    /// (uid, gid) to switch to (supplementary groups cleared); None: stay root.
    pub ids: Option<(u32, u32)>,
}

/// A started process: its pid (also its session and process group) and
/// the read ends of its stdout and stderr.
pub struct Spawned {
    pub pid: i32,
    pub stdout: File,
    pub stderr: File,
}

/// Everything the child reads, made before the clone.
struct ChildArgs {
    candidates: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    cwd: CString,
    ids: Option<(u32, u32)>,
    stdin: i32,
    stdout: i32,
    stderr: i32,
    /// Write end of the error pipe (close-on-exec): the child writes the
    /// step that failed and errno, then exits 127.
    err: i32,
}

/// Steps the child reports a failure of.
const STEP_SESSION: u32 = 1;
const STEP_IDS: u32 = 2;
const STEP_CWD: u32 = 3;
const STEP_STDIO: u32 = 4;
const STEP_EXEC: u32 = 5;

fn cstring(s: impl AsRef<OsStr>) -> io::Result<CString> {
    CString::new(s.as_ref().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in an argument"))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((r, w))
}

/// Where `program` may be: itself when it names a path, else each `PATH`
/// entry (the child's own `PATH`, as execvp would).
fn candidates(program: &str, env: &[(String, String)]) -> io::Result<Vec<CString>> {
    if program.contains('/') {
        return Ok(vec![cstring(program)?]);
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or(crate::task::PATH, |(_, v)| v.as_str());
    path.split(':')
        .map(|d| if d.is_empty() { "." } else { d })
        .map(|d| cstring(format!("{d}/{program}")))
        .collect()
}

/// Start `spec`. The child is in a new session, with an empty signal mask,
/// stdin `/dev/null`, stdout and stderr pipes. Returns once it has exec'd
/// (or failed to: the error names the step, like std's `Command`).
///
/// The caller holds the reaper's lock (see `task::Reaper::spawn`), so
/// the reaper cannot collect the child before its pid is registered.
pub fn spawn(spec: &Spec) -> io::Result<Spawned> {
    let program = spec
        .argv
        .first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    let argv: Vec<CString> = spec.argv.iter().map(cstring).collect::<io::Result<_>>()?;
    let envs: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| cstring(format!("{k}={v}")))
        .collect::<io::Result<_>>()?;
    let stdin: OwnedFd = File::open("/dev/null")?.into();
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (fail_r, fail_w) = pipe()?;
    let mut args = ChildArgs {
        candidates: candidates(program, spec.env)?,
        argv: argv
            .iter()
            .map(|a| a.as_ptr())
            .chain([std::ptr::null()])
            .collect(),
        envp: envs
            .iter()
            .map(|e| e.as_ptr())
            .chain([std::ptr::null()])
            .collect(),
        cwd: cstring(spec.cwd)?,
        ids: spec.ids,
        stdin: stdin.as_raw_fd(),
        stdout: out_w.as_raw_fd(),
        stderr: err_w.as_raw_fd(),
        err: fail_w.as_raw_fd(),
    };
    // The child's stack; the parent is suspended until the child execs or
    // exits (CLONE_VFORK), so it outlives every use.
    let mut stack = vec![0u8; 64 * 1024];
    // SAFETY: the stack top is within `stack` and 16-byte aligned (x86_64
    // ABI); `args` and everything it points to live until clone returns,
    // which with CLONE_VFORK is after the child's exec or exit. Every
    // signal is blocked around the clone so no handler of the agent runs on
    // the child's stack; the child unblocks them just before exec.
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(stack.len()) as usize & !15;
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let pid = libc::clone(
            child,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &mut args as *mut ChildArgs as *mut libc::c_void,
        );
        let e = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if pid < 0 {
            return Err(e);
        }
        pid
    };
    drop(stack);
    drop((stdin, out_w, err_w, fail_w));
    // The child has exec'd (the error pipe closed with it) or written why not.
    let mut report = [0u8; 8];
    let mut fail = File::from(fail_r);
    let n = io::Read::read(&mut fail, &mut report).unwrap_or(0);
    if n == 8 {
        let step = u32::from_ne_bytes(report[..4].try_into().unwrap_or_default());
        let errno = i32::from_ne_bytes(report[4..].try_into().unwrap_or_default());
        // The child exited 127; the reaper collects it (nobody waits).
        let e = io::Error::from_raw_os_error(errno);
        return Err(match step {
            STEP_EXEC => e,
            STEP_CWD => io::Error::new(e.kind(), format!("working directory {}: {e}", spec.cwd)),
            STEP_IDS => io::Error::new(e.kind(), format!("switching to the task user: {e}")),
            STEP_SESSION => io::Error::new(e.kind(), format!("setsid: {e}")),
            _ => io::Error::new(e.kind(), format!("setting up stdio: {e}")),
        });
    }
    Ok(Spawned {
        pid,
        stdout: File::from(out_r),
        stderr: File::from(err_r),
    })
}

/// Report `step` and errno on the error pipe and exit 127 (child only).
unsafe fn fail(err: i32, step: u32) -> ! {
    let errno = *libc::__errno_location();
    let mut report = [0u8; 8];
    report[..4].copy_from_slice(&step.to_ne_bytes());
    report[4..].copy_from_slice(&errno.to_ne_bytes());
    libc::syscall(libc::SYS_write, err, report.as_ptr(), 8usize);
    libc::_exit(127)
}

/// The child, between clone and exec: raw system calls only.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's ChildArgs, alive while the parent is
    // suspended; every call below is a system call on prepared data.
    unsafe {
        let a = &*(arg as *const ChildArgs);
        let fail = |step: u32| fail(a.err, step);
        // Handlers the agent installed (Rust's SIGSEGV/SIGBUS) and the
        // ignored SIGPIPE go back to their defaults; exec keeps an ignore.
        // The kernel's sigaction: handler, flags, restorer, mask.
        let dfl: [u64; 4] = [0; 4];
        for sig in [libc::SIGPIPE, libc::SIGSEGV, libc::SIGBUS] {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                dfl.as_ptr(),
                std::ptr::null::<u64>(),
                8usize,
            );
        }
        if libc::syscall(libc::SYS_setsid) < 0 {
            fail(STEP_SESSION);
        }
        if let Some((uid, gid)) = a.ids {
            if libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) < 0
                || libc::syscall(libc::SYS_setgid, gid) < 0
                || libc::syscall(libc::SYS_setuid, uid) < 0
            {
                fail(STEP_IDS);
            }
        }
        if libc::syscall(libc::SYS_chdir, a.cwd.as_ptr()) < 0 {
            fail(STEP_CWD);
        }
        for (from, to) in [(a.stdin, 0), (a.stdout, 1), (a.stderr, 2)] {
            if libc::syscall(libc::SYS_dup2, from, to) < 0 {
                fail(STEP_STDIO);
            }
        }
        let empty: u64 = 0;
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty as *const u64,
            std::ptr::null::<u64>(),
            8usize,
        );
        // Like execvp: go on past a directory without the file; report the
        // first other error, else "not found".
        let mut first_other = 0;
        for c in &a.candidates {
            libc::syscall(
                libc::SYS_execve,
                c.as_ptr(),
                a.argv.as_ptr(),
                a.envp.as_ptr(),
            );
            let errno = *libc::__errno_location();
            match errno {
                libc::ENOENT | libc::ENOTDIR => {}
                e if first_other == 0 => first_other = e,
                _ => {}
            }
        }
        if first_other != 0 {
            *libc::__errno_location() = first_other;
        }
        fail(STEP_EXEC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_candidates_follow_the_childs_path() {
        let env = vec![("PATH".to_string(), "/a:/b".to_string())];
        let c = candidates("git", &env).unwrap();
        assert_eq!(
            c,
            vec![cstring("/a/git").unwrap(), cstring("/b/git").unwrap()]
        );
        assert_eq!(
            candidates("./x", &env).unwrap(),
            vec![cstring("./x").unwrap()]
        );
        assert_eq!(candidates("sh", &[]).unwrap().len(), 6, "the default PATH");
    }

    /// Runs on the host as the test's user: no uid switch.
    #[test]
    fn spawns_with_env_cwd_session_and_pipes() {
        let argv: Vec<String> = ["sh", "-c", "echo $FOO; pwd; echo err >&2; ps -o sid= -p $$"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let env = vec![
            ("PATH".to_string(), "/usr/bin:/bin".to_string()),
            ("FOO".to_string(), "bar".to_string()),
        ];
        let s = spawn(&Spec {
            argv: &argv,
            env: &env,
            cwd: "/tmp",
            ids: None,
        })
        .unwrap();
        let mut out = String::new();
        let mut err = String::new();
        io::Read::read_to_string(&mut { s.stdout }, &mut out).unwrap();
        io::Read::read_to_string(&mut { s.stderr }, &mut err).unwrap();
        let st = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(s.pid), None).unwrap();
        assert_eq!(
            st,
            nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(s.pid), 0)
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "bar");
        assert_eq!(lines[1], "/tmp");
        assert_eq!(lines[2].trim(), s.pid.to_string(), "its own session");
        assert_eq!(err, "err\n");
    }

    /// The uid switch. Needs root, as CI and every VM test do: run as
    /// another user it fails, rather than passing without checking.
    #[test]
    fn switches_user_and_drops_groups() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test switches uid: run the suite as root (scripts/test.sh does)"
        );
        let argv: Vec<String> = ["sh", "-c", "id -u; id -g; id -G"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let env = vec![("PATH".to_string(), "/usr/bin:/bin".to_string())];
        let s = spawn(&Spec {
            argv: &argv,
            env: &env,
            cwd: "/",
            ids: Some((65534, 65534)),
        })
        .unwrap();
        let mut out = String::new();
        io::Read::read_to_string(&mut { s.stdout }, &mut out).unwrap();
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(s.pid), None);
        assert_eq!(out, "65534\n65534\n65534\n");
    }

    /// Spawn `argv` in `cwd` expecting an error.
    fn fails(argv: &str, cwd: &str) -> io::Error {
        let argv = vec![argv.to_string()];
        let spec = Spec {
            argv: &argv,
            env: &[],
            cwd,
            ids: None,
        };
        spawn(&spec).err().unwrap()
    }

    #[test]
    fn reports_what_failed() {
        let e = fails("no-such-program-anywhere", "/");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let e = fails("true", "/no/such/dir");
        assert!(
            e.to_string().contains("working directory /no/such/dir"),
            "{e}"
        );
        // A file that is not executable: not "not found".
        let plain = std::env::temp_dir().join(format!("dough-spawn-test-{}", std::process::id()));
        std::fs::write(&plain, "not a program").unwrap();
        let e = fails(&plain.display().to_string(), "/");
        let _ = std::fs::remove_file(&plain);
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
    }
}
