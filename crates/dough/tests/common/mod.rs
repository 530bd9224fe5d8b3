//! Shared harness for tests that run the real `dough` binary.
//!
//! Each test gets its own state directory (so its run directories and
//! processes can be told apart) and shares the guest image built by
//! `scripts/setup.sh` (`DOUGH_IMAGE_DIR`, else `$DOUGH_STATE_DIR/images/default`,
//! else `/var/lib/dough/images/default`). A missing image fails the test loudly.
#![allow(dead_code)]

pub mod pg;
pub mod server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Harness {
    pub state: tempfile::TempDir,
}

pub fn image_dir() -> PathBuf {
    let state = std::env::var_os("DOUGH_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/dough"));
    let dir = std::env::var_os("DOUGH_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| state.join("images/default"));
    assert!(
        dir.join("manifest.json").exists(),
        "guest image missing at {}: run scripts/setup.sh (tier-2 tests need a real image)",
        dir.display()
    );
    dir
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    pub fn new() -> Harness {
        image_dir();
        Harness {
            state: tempfile::Builder::new()
                .prefix("dough-t")
                .tempdir_in("/tmp")
                .unwrap(),
        }
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_dough"));
        c.env("DOUGH_STATE_DIR", self.state.path())
            .env("DOUGH_IMAGE_DIR", image_dir())
            .env_remove("DOUGH_LOG")
            .stdin(Stdio::null());
        c
    }

    /// `dough run ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().arg("run").args(args).output().unwrap()
    }

    /// Start `dough run -- sh -c 'echo ready; sleep 60'` and return once the
    /// task is running in its VM (its first line has arrived).
    pub fn spawn_running_task(&self) -> std::process::Child {
        use std::io::{BufRead, BufReader};
        let mut child = self
            .cmd()
            .args(["run", "--", "sh", "-c", "echo ready; sleep 60"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "ready\n", "the task is running");
        child
    }

    pub fn runs_dir(&self) -> PathBuf {
        self.state.path().join("vms")
    }

    /// Nothing of this test's VMs may remain: no run directory (so no
    /// socket, scratch disk or log), no process naming the state dir, no uid
    /// lease, no jail root, no repository work directory.
    pub fn assert_clean(&self) {
        // Processes get a moment to be reaped by the kernel after SIGKILL.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let procs = processes_mentioning(self.state.path());
            if procs.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "leftover processes: {procs:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let left: Vec<_> = std::fs::read_dir(self.runs_dir())
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "leftover run directories: {left:?}");
        // Network: no slot lease made by this state dir, so no namespace
        // (leases go last, once their namespace is gone).
        let tag = self.state.path().display().to_string();
        let left: Vec<String> = dough_net::slot_leases(std::path::Path::new("/run/dough/slots"))
            .into_iter()
            .filter_map(|(n, rec)| rec.filter(|r| r.tag == tag).map(|r| (n, r)))
            .map(|(n, r)| {
                format!(
                    "slot {} of vm {} (netns exists: {})",
                    n.display(),
                    r.vm_id,
                    dough_net::netns_path(&r.vm_id).exists()
                )
            })
            .collect();
        assert!(left.is_empty(), "leftover network: {left:?}");
        for d in ["uids", "jails", "work", "templates"] {
            let left: Vec<_> = std::fs::read_dir(self.state.path().join(d))
                .map(|rd| rd.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "leftover {d}: {left:?}");
        }
    }
}

/// (pid, cmdline) of every process whose command line mentions `dir`.
pub fn processes_mentioning(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.to_string_lossy().to_string();
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| p != me)
        .filter_map(|p| {
            let c = std::fs::read(format!("/proc/{p}/cmdline")).ok()?;
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            // Exclude zombies being reaped and the dough CLI itself (its args
            // do not name the state dir; it is found through env).
            (c.contains(&needle)).then_some((p, c))
        })
        .collect()
}

/// PIDs of QEMU processes of this harness's VMs.
pub fn qemu_pids(h: &Harness) -> Vec<u32> {
    processes_mentioning(h.state.path())
        .into_iter()
        .filter(|(_, c)| c.starts_with("qemu-system") || c.contains("/qemu-system"))
        .map(|(p, _)| p)
        .collect()
}

/// Send `sig` to `pid` (a process this test started or its VM's QEMU).
pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
}

/// A process's peak resident memory (VmHWM), KiB; None once it is gone.
#[allow(dead_code)]
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// A KiB figure of a process's /proc status (`key` with its colon,
/// "VmRSS:"); None once it is gone.
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Wait until `f` is true or panic after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `cmd` runs in the named network namespace `ns` (entered between fork
/// and exec).
pub fn enter_netns(cmd: &mut Command, ns: &str) {
    use std::os::unix::process::CommandExt;
    let f = std::fs::File::open(Path::new("/run/netns").join(ns)).unwrap();
    // SAFETY: setns is a raw syscall on a descriptor opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            use std::os::fd::AsRawFd;
            if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Run `f` on a thread inside the named network namespace `ns` (None:
/// here, on this thread).
pub fn within_netns<T: Send>(ns: Option<&str>, f: impl FnOnce() -> T + Send) -> T {
    let Some(ns) = ns else { return f() };
    let path = Path::new("/run/netns").join(ns);
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd = std::fs::File::open(&path).unwrap();
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new named network namespace `name` (one a killed run left is
/// replaced), its loopback up.
fn netns_add(name: &str) {
    netns_del(name);
    ip(&["netns", "add", name]);
    ip(&["-n", name, "link", "set", "lo", "up"]);
}

fn netns_del(name: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
}

/// A network namespace of the test's own that the others link to (where
/// a test's database and servers run; nothing of this machine's own
/// network is touched). Deleted on drop.
pub struct Hub {
    pub name: String,
}

impl Hub {
    pub fn new() -> Hub {
        static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("dt-hub{}-{k}", std::process::id());
        netns_add(&name);
        Hub { name }
    }

    /// Give the hub address `addr` (on its loopback).
    pub fn add_addr(&self, addr: &str) {
        ip(&[
            "-n",
            &self.name,
            "addr",
            "add",
            &format!("{addr}/32"),
            "dev",
            "lo",
        ]);
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        netns_del(&self.name);
    }
}

/// A network namespace of the test's own, linked to a [`Hub`] by a veth
/// pair: `outer` (the hub's end) and `inner` (the namespace's `eth0`) a /30
/// apart; its default route leads to the hub. Deleted, with its link, on
/// drop.
pub struct LinkedNs {
    pub name: String,
    pub outer: String,
    pub inner: String,
    /// Its number among this process's linked namespaces.
    pub k: u8,
}

impl LinkedNs {
    /// The `k`th namespace of this test process (addresses 10.252.0.4k+1
    /// and +2: each hub is a network of its own).
    pub fn new(hub: &Hub) -> LinkedNs {
        static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        assert!(k < 63, "too many namespaces for one /24");
        let name = format!("dt-ln{}-{k}", std::process::id());
        let link = format!("l{k}");
        let (outer, inner) = (
            format!("10.252.0.{}", 4 * u32::from(k) + 1),
            format!("10.252.0.{}", 4 * u32::from(k) + 2),
        );
        let ns = LinkedNs {
            name,
            outer,
            inner,
            k,
        };
        let (n, h) = (ns.name.as_str(), hub.name.as_str());
        netns_add(n);
        ip(&[
            "-n", h, "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", n,
        ]);
        ip(&[
            "-n",
            h,
            "addr",
            "add",
            &format!("{}/30", ns.outer),
            "dev",
            &link,
        ]);
        ip(&["-n", h, "link", "set", &link, "up"]);
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{}/30", ns.inner),
            "dev",
            "eth0",
        ]);
        ip(&["-n", n, "link", "set", "eth0", "up"]);
        ip(&["-n", n, "route", "add", "default", "via", &ns.outer]);
        ns
    }
    /// `nft -f -` of `script` in this namespace.
    pub fn nft(&self, script: &str) {
        use std::io::Write;
        let mut c = Command::new("nft");
        c.args(["-f", "-"]).stdin(Stdio::piped());
        enter_netns(&mut c, &self.name);
        let mut c = c.spawn().unwrap();
        c.stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(
            c.wait().unwrap().success(),
            "nft in {}: {script}",
            self.name
        );
    }
}

impl Drop for LinkedNs {
    /// The veth pair goes with the namespace.
    fn drop(&mut self) {
        netns_del(&self.name);
    }
}
