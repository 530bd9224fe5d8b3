//! `dough bench faults --tasks N --seed S`: tasks through a real daemon
//! while faults land on them, then a leak audit. Each task gets one fault
//! from a plan made from the seed (the same seed, the same plan): the host
//! kills or stops its VMM or its vsock backend, the daemon is killed and
//! restarted, the guest panics, runs out of memory or disk, floods its
//! output, the host's state directory fills up (the bench's state
//! directory is a tmpfs of its own), or the task is cancelled while
//! queued, booting or running. Every
//! task must end in the state and reason the docs promise; afterwards
//! nothing of any VM may remain and the daemon must not have panicked or
//! kept descriptors. Exit 0 only if all of that holds.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

use super::bench_serve::Daemon;

#[derive(Args, Debug)]
pub struct FaultsArgs {
    /// Tasks to run (each with one fault). The first ones go through every
    /// kind of fault once, in an order drawn from the seed.
    #[arg(long, default_value_t = 24)]
    pub tasks: u32,
    /// Seed of the plan: which fault each task gets and when it lands.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    None,
    KillVmm,
    KillVsockBackend,
    StopVmm,
    KillDaemon,
    GuestPanic,
    GuestOom,
    GuestDiskFull,
    OutputFlood,
    StateDirFull,
    CancelQueued,
    CancelBooting,
    CancelRunning,
}

const ALL: [Fault; 13] = [
    Fault::None,
    Fault::KillVmm,
    Fault::KillVsockBackend,
    Fault::StopVmm,
    Fault::KillDaemon,
    Fault::GuestPanic,
    Fault::GuestOom,
    Fault::GuestDiskFull,
    Fault::OutputFlood,
    Fault::StateDirFull,
    Fault::CancelQueued,
    Fault::CancelBooting,
    Fault::CancelRunning,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::KillVmm => "kill -9 VMM",
            Fault::KillVsockBackend => "kill vhost-device-vsock",
            Fault::StopVmm => "SIGSTOP VMM",
            Fault::KillDaemon => "kill -9 daemon, restart",
            Fault::GuestPanic => "guest kernel panic",
            Fault::GuestOom => "guest OOM",
            Fault::GuestDiskFull => "guest disk full",
            Fault::OutputFlood => "output flood",
            Fault::StateDirFull => "host state dir full",
            Fault::CancelQueued => "cancel while queued",
            Fault::CancelBooting => "cancel while booting",
            Fault::CancelRunning => "cancel while running",
        }
    }

    /// The terminal (state, reasons) the docs promise; more than one
    /// reason where the kernel decides which the host sees first.
    fn expected(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Fault::None | Fault::OutputFlood => ("succeeded", &["exit_code"]),
            Fault::KillVmm | Fault::GuestPanic => ("failed", &["vmm_exited"]),
            // The backend's end closes the guest's connection; QEMU may
            // notice the lost vhost-user device first and exit.
            Fault::KillVsockBackend => ("failed", &["agent_lost", "vmm_exited", "heartbeat_lost"]),
            Fault::StopVmm => ("failed", &["heartbeat_lost"]),
            Fault::KillDaemon => ("failed", &["orchestrator_restart"]),
            Fault::GuestOom => ("failed", &["oom"]),
            Fault::GuestDiskFull => ("failed", &["exit_code"]),
            Fault::StateDirFull => ("failed", &["state_full"]),
            Fault::CancelQueued | Fault::CancelBooting | Fault::CancelRunning => {
                ("cancelled", &["cancelled"])
            }
        }
    }

    fn request(self) -> Value {
        let sh = |s: &str| json!(["sh", "-c", s]);
        match self {
            Fault::None => json!({"command": ["echo", "ok"]}),
            Fault::GuestPanic => {
                json!({"command": sh("echo started; echo c > /proc/sysrq-trigger; sleep 600"), "root": true})
            }
            Fault::GuestOom => {
                json!({"command": sh("echo started; head -c 100M /dev/zero > /dev/shm/fill; exec dd if=/dev/zero of=/dev/null bs=150M count=1"), "memory_mib": 256})
            }
            // fallocate fills the scratch disk without writing it.
            Fault::GuestDiskFull => {
                json!({"command": sh("echo started; i=0; while fallocate -l 256M /tmp/fill$i 2>/dev/null; do i=$((i+1)); done; echo more > /tmp/more")})
            }
            Fault::OutputFlood => {
                json!({"command": sh("echo started; head -c 40000000 /dev/zero | tr '\\0' x")})
            }
            // New blocks of the scratch disk need room in the state dir:
            // once the host has filled it the guest's write fails (the
            // guest has 4 GiB of its own, far more than it writes before
            // the fill). Then output the daemon cannot store.
            Fault::StateDirFull => {
                json!({"command": sh("echo started; i=0; while head -c 1048576 /dev/urandom > /tmp/f$i && sync /tmp/f$i; do i=$((i+1)); done; echo the scratch disk failed after $i MiB; head -c 40000000 /dev/zero | tr '\\0' x; exit 1")})
            }
            _ => json!({"command": sh("echo started; exec sleep 600")}),
        }
    }
}

/// splitmix64: a small generator, so the plan depends on the seed alone.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// (fault, delay before it lands once the task runs) for each task.
fn plan(tasks: u32, seed: u64) -> Vec<(Fault, Duration)> {
    let mut r = Rng(seed);
    let mut order = ALL.to_vec();
    for i in (1..order.len()).rev() {
        order.swap(i, r.below(i as u64 + 1) as usize);
    }
    (0..tasks as usize)
        .map(|i| {
            let f = if i < order.len() {
                order[i]
            } else {
                ALL[r.below(ALL.len() as u64) as usize]
            };
            (f, Duration::from_millis(r.below(2000)))
        })
        .collect()
}

/// (pid, command line) of every process whose command line mentions
/// `needle`.
fn processes_mentioning(needle: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let mut v = vec![];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if pid != me && cmd.contains(needle) {
            v.push((pid, cmd));
        }
    }
    v
}

/// PIDs of processes whose command line mentions `needle` and whose
/// program name contains `prog`.
fn pids_of(prog: &str, needle: &str) -> Vec<i32> {
    processes_mentioning(needle)
        .into_iter()
        .filter(|(_, cmd)| cmd.split(' ').next().unwrap_or("").contains(prog))
        .map(|(p, _)| p)
        .collect()
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

struct Bench {
    dir: PathBuf,
    log: PathBuf,
    d: Daemon,
    a: ureq::Agent,
}

const TERMINAL: [&str; 4] = ["succeeded", "failed", "cancelled", "timed_out"];

impl Bench {
    fn daemon_args() -> [&'static str; 4] {
        ["--max-vms", "1", "--output-limit", "16"]
    }

    fn task(&self, id: &str) -> anyhow::Result<Value> {
        Ok(self
            .d
            .get(&self.a, &format!("/v1/tasks/{id}"))?
            .into_json()?)
    }

    fn wait(&self, id: &str, states: &[&str], limit: Duration) -> anyhow::Result<Value> {
        let t = Instant::now();
        loop {
            let v = self.task(id)?;
            let st = v["state"].as_str().unwrap_or("");
            if states.contains(&st) || TERMINAL.contains(&st) {
                return Ok(v);
            }
            if t.elapsed() > limit {
                bail!("task {id} stayed {st} for {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Until every warm pool is full and nothing boots.
    fn wait_pools_full(&self) -> anyhow::Result<()> {
        let t = Instant::now();
        loop {
            let v: Value = self.d.get(&self.a, "/v1/pools")?.into_json()?;
            let full = v["pools"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|p| p["idle"] == p["size"] && p["booting"] == 0);
            if full {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(300) {
                bail!("the pools did not fill: {v}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Until the task's first output line: the command runs.
    fn wait_started(&self, id: &str) -> anyhow::Result<()> {
        let t = Instant::now();
        loop {
            let logs = self
                .d
                .get(&self.a, &format!("/v1/tasks/{id}/logs"))?
                .into_string()?;
            if logs.contains("started") {
                return Ok(());
            }
            let st = self.task(id)?["state"].as_str().unwrap_or("").to_string();
            if TERMINAL.contains(&st.as_str()) {
                bail!("task {id} ended ({st}) before it started");
            }
            if t.elapsed() > Duration::from_secs(300) {
                bail!("task {id} did not start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn cancel(&self, id: &str) -> anyhow::Result<()> {
        self.a
            .delete(&format!("{}/v1/tasks/{id}", self.d.url))
            .set("Authorization", &format!("Bearer {}", self.d.token))
            .call()
            .map(|_| ())
            .or_else(|e| match e {
                // Already over: the outcome will say how.
                ureq::Error::Status(409, _) => Ok(()),
                e => Err(e.into()),
            })
    }

    /// SIGTERM to the daemon (it tears its VMs down first), then the leak
    /// audit of `vms`: (leftovers, panics in the daemon's log).
    fn stop_and_audit(mut self, vms: &[String]) -> (Vec<String>, usize) {
        signal(self.d.child.id() as i32, nix::sys::signal::Signal::SIGTERM);
        let _ = self.d.child.wait();
        let left = audit(&self.dir, vms);
        let panics = std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("panicked")
            .count();
        (left, panics)
    }

    /// Run one task with its fault; its final record.
    fn one(&mut self, f: Fault, delay: Duration) -> anyhow::Result<Value> {
        let id = self.d.post(&self.a, &f.request())?;
        let vm = |b: &Bench| -> anyhow::Result<String> {
            Ok(b.task(&id)?["vm_id"].as_str().unwrap_or("").to_string())
        };
        match f {
            Fault::CancelQueued => {
                // One VM at a time: a task behind a running one (this
                // fault's own `sleep`) waits.
                self.wait(&id, &["running"], Duration::from_secs(300))?;
                let queued = self.d.post(&self.a, &Fault::None.request())?;
                std::thread::sleep(delay);
                let st = self.task(&queued)?["state"].clone();
                if st != "queued" {
                    bail!("the task behind a running one is {st}, not queued");
                }
                self.cancel(&queued)?;
                let t = self.wait(&queued, &[], Duration::from_secs(300))?;
                self.cancel(&id)?;
                self.wait(&id, &[], Duration::from_secs(300))?;
                return Ok(t);
            }
            Fault::CancelBooting => {
                // As soon as it is seen booting (or, on a fast host, already
                // past it: the poll is not guaranteed to catch the window).
                self.wait(&id, &["booting", "running"], Duration::from_secs(300))?;
                self.cancel(&id)?;
            }
            Fault::None | Fault::OutputFlood => {}
            Fault::StateDirFull => {
                // As soon as it runs (the guest writes until the host is
                // full); the ballast goes once the VM is gone, and the
                // daemon records the task's end when it finds room.
                self.wait_started(&id)?;
                let ballast = fill(&self.dir)?;
                let needle = format!("vms/{}", vm(self)?);
                let t = Instant::now();
                while !pids_of("qemu-system", &needle).is_empty()
                    || !pids_of("firecracker", &needle).is_empty()
                {
                    if t.elapsed() > Duration::from_secs(300) {
                        bail!("the VM outlived its full state dir by 300 s");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                std::fs::remove_file(&ballast)?;
            }
            Fault::GuestPanic | Fault::GuestOom | Fault::GuestDiskFull => {}
            _ => {
                self.wait_started(&id)?;
                std::thread::sleep(delay);
                let needle = format!("vms/{}", vm(self)?);
                match f {
                    Fault::KillVmm => pids_of("qemu-system", &needle)
                        .into_iter()
                        .chain(pids_of("firecracker", &needle))
                        .for_each(|p| signal(p, nix::sys::signal::Signal::SIGKILL)),
                    Fault::KillVsockBackend => pids_of("vhost-device-vsock", &needle)
                        .into_iter()
                        .for_each(|p| signal(p, nix::sys::signal::Signal::SIGKILL)),
                    Fault::StopVmm => pids_of("qemu-system", &needle)
                        .into_iter()
                        .chain(pids_of("firecracker", &needle))
                        .for_each(|p| signal(p, nix::sys::signal::Signal::SIGSTOP)),
                    Fault::KillDaemon => {
                        signal(self.d.child.id() as i32, nix::sys::signal::Signal::SIGKILL);
                        let _ = self.d.child.wait();
                        self.d =
                            Daemon::start_logged(&self.dir, &Self::daemon_args(), Some(&self.log))?;
                    }
                    Fault::CancelRunning => self.cancel(&id)?,
                    _ => {}
                }
            }
        }
        self.wait(&id, &[], Duration::from_secs(600))
    }
}

/// Fill the file system of `dir` to the last byte: a ballast file, whose
/// path is returned.
fn fill(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    let path = dir.join("ballast");
    let f = std::fs::File::create(&path)?;
    // Halving chunks: what statvfs reports free is not always all
    // allocatable in one piece.
    let st = nix::sys::statvfs::statvfs(dir)?;
    let (mut len, mut chunk) = (0i64, (st.blocks_available() * st.fragment_size()) as i64);
    while chunk >= 4096 {
        if nix::fcntl::posix_fallocate(f.as_raw_fd(), len, chunk).is_ok() {
            len += chunk;
        } else {
            chunk /= 2;
        }
    }
    Ok(path)
}

/// What of the bench's VMs is left on the host: one line per leftover.
fn audit(dir: &Path, vms: &[String]) -> Vec<String> {
    let mut left = vec![];
    let tag = dir.display().to_string();
    for (pid, cmd) in processes_mentioning(&tag) {
        left.push(format!("process {pid}: {cmd}"));
    }
    for (lease, rec) in dough_net::slot_leases(Path::new("/run/dough/slots")) {
        if rec.is_some_and(|r| r.tag == tag) {
            left.push(format!("slot lease {}", lease.display()));
        }
    }
    let layout = dough_vmm::cgroup::Layout::detect().ok();
    for vm in vms {
        left.extend(dough_net::leftovers(vm));
        if let Some(l) = &layout {
            for d in dough_vmm::cgroup::Cgroup::dirs_for(l, vm) {
                if d.exists() {
                    left.push(format!("cgroup {}", d.display()));
                }
            }
        }
    }
    for sub in ["vms", "uids", "jails", "work", "templates"] {
        for e in std::fs::read_dir(dir.join(sub))
            .into_iter()
            .flatten()
            .flatten()
        {
            left.push(format!("{sub}/{}", e.file_name().to_string_lossy()));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // Not the bench's own tmpfs at `dir`.
    let own = |l: &str| l.split(' ').nth(4) == Some(tag.as_str());
    for m in mounts.lines().filter(|l| l.contains(&tag) && !own(l)) {
        left.push(format!("mount {m}"));
    }
    left
}

pub fn run(a: &FaultsArgs) -> anyhow::Result<u8> {
    if a.tasks == 0 {
        bail!("--tasks must be at least 1");
    }
    let plan = plan(a.tasks, a.seed);
    let dir = std::env::temp_dir().join(format!("dough-bench-faults-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // A file system of its own, so that it can be filled.
    nix::mount::mount(
        Some("tmpfs"),
        &dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some("size=2g,mode=0755"),
    )
    .context("mount a tmpfs for the state dir")?;
    let log = dir.with_extension("log");
    let _ = std::fs::remove_file(&log);
    eprintln!(
        "plan (seed {}): {}",
        a.seed,
        plan.iter()
            .map(|(f, d)| format!("{}@{}ms", f.name(), d.as_millis()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let d = Daemon::start_logged(&dir, &Bench::daemon_args(), Some(&log))
        .context("start the daemon")?;
    let mut b = Bench {
        dir: dir.clone(),
        log: log.clone(),
        d,
        a: Daemon::agent(),
    };
    // fault -> (count, as expected, what happened otherwise, ends seen)
    #[allow(clippy::type_complexity)]
    let mut table: std::collections::BTreeMap<Fault, (u32, u32, Vec<String>, Vec<String>)> =
        Default::default();
    let mut vms = vec![];
    let mut fd_base: Option<(u32, usize)> = None;
    for (i, (f, delay)) in plan.iter().enumerate() {
        eprintln!("task {}/{}: {}", i + 1, plan.len(), f.name());
        let t = match b.one(*f, *delay) {
            Ok(t) => t,
            Err(e) => {
                // The daemon tears its VMs down before it exits.
                signal(b.d.child.id() as i32, nix::sys::signal::Signal::SIGTERM);
                let _ = b.d.child.wait();
                return Err(e.context(format!(
                    "task {} ({}); state dir {}, daemon log {}",
                    i + 1,
                    f.name(),
                    dir.display(),
                    log.display()
                )));
            }
        };
        let (st, rs) = f.expected();
        let (got_st, got_r) = (
            t["state"].as_str().unwrap_or("?"),
            t["reason"].as_str().unwrap_or("?"),
        );
        let ok = got_st == st && rs.contains(&got_r);
        let row = table.entry(*f).or_default();
        row.0 += 1;
        if ok {
            row.1 += 1;
            let seen = format!("{got_st}/{got_r}");
            if !row.3.contains(&seen) {
                row.3.push(seen);
            }
        } else {
            row.2.push(format!(
                "{got_st}/{got_r} ({})",
                t["detail"].as_str().unwrap_or("")
            ));
        }
        if let Some(vm) = t["vm_id"].as_str() {
            vms.push(vm.to_string());
        }
        // The daemon's descriptors, from its first finished task on (a
        // restart starts the count again).
        let pid = b.d.child.id();
        match fd_base {
            Some((p, _)) if p == pid => {}
            _ => fd_base = Some((pid, fds(pid))),
        }
    }
    let fd_end = fds(b.d.child.id());
    let (_, fd_start) = fd_base.unwrap_or((0, fd_end));
    let (left, panics) = b.stop_and_audit(&vms);

    println!(
        "{:<26} {:>5} {:>8}  {:<48} otherwise",
        "fault", "count", "as docs", "expected (seen)"
    );
    let mut wrong = 0;
    for (f, (n, ok, other, seen)) in &table {
        let (st, rs) = f.expected();
        println!(
            "{:<26} {:>5} {:>8}  {:<48} {}",
            f.name(),
            n,
            ok,
            format!("{st}/{} ({})", rs.join("|"), seen.join(", ")),
            if other.is_empty() {
                "-".to_string()
            } else {
                other.join("; ")
            }
        );
        wrong += n - ok;
    }
    println!("daemon descriptors: {fd_start} after its first task, {fd_end} at the end");
    println!("daemon panics: {panics}");
    println!("leaks: {}", left.len());
    for l in &left {
        println!("  {l}");
    }
    let fd_leak = fd_end > fd_start + 4;
    if wrong == 0 && left.is_empty() && panics == 0 && !fd_leak {
        let _ = nix::mount::umount(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&log);
        println!("ok: every end as documented, nothing left");
        Ok(0)
    } else {
        println!(
            "FAILED: {wrong} unexpected ends, {} leaks, {panics} panics{} (state dir {}, a tmpfs: umount it when done; daemon log {})",
            left.len(),
            if fd_leak { ", descriptors grew" } else { "" },
            dir.display(),
            log.display()
        );
        Ok(1)
    }
}

#[derive(Args, Debug)]
pub struct SoakArgs {
    /// Short tasks to run through the daemon.
    #[arg(long, default_value_t = 1000)]
    pub tasks: u32,
    /// Warm pool size (1 vCPU, 512 MiB) and VMs at once.
    #[arg(long, default_value_t = 2)]
    pub pool: u32,
}

/// `dough bench soak`: many short tasks through a daemon with a warm pool;
/// every one must succeed, the daemon's RSS and descriptors are reported
/// first and last, and the leak audit must find nothing.
pub fn soak(a: &SoakArgs) -> anyhow::Result<u8> {
    let dir = std::env::temp_dir().join(format!("dough-bench-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let log = dir.with_extension("log");
    let pool = format!("{}", a.pool);
    let max = format!("{}", a.pool.max(1) * 2);
    let d = Daemon::start_logged(&dir, &["--pool-size", &pool, "--max-vms", &max], Some(&log))?;
    let ag = Daemon::agent();
    let b = Bench {
        dir: dir.clone(),
        log: log.clone(),
        d,
        a: ag,
    };
    let pid = b.d.child.id();
    let (mut first, mut ok, mut failed, mut vms) = (None, 0u32, vec![], vec![]);
    let t0 = Instant::now();
    // Two in flight at a time: one claims while the other finishes.
    let mut inflight: std::collections::VecDeque<String> = Default::default();
    let mut submitted = 0;
    while submitted < a.tasks || !inflight.is_empty() {
        while submitted < a.tasks && inflight.len() < a.pool.max(1) as usize {
            inflight.push_back(b.d.post(&b.a, &json!({"command": ["true"]}))?);
            submitted += 1;
        }
        let id = inflight.pop_front().expect("one in flight");
        let t = b.wait(&id, &[], Duration::from_secs(600))?;
        if t["state"] == "succeeded" {
            ok += 1;
        } else {
            failed.push(format!("{id}: {}/{}", t["state"], t["reason"]));
        }
        if let Some(vm) = t["vm_id"].as_str() {
            vms.push(vm.to_string());
        }
        if first.is_none() {
            b.wait_pools_full()?;
            first = Some((b.d.rss_kib(), fds(pid)));
        }
        let done = ok as usize + failed.len();
        if done.is_multiple_of(100) {
            eprintln!(
                "{done}/{}: RSS {} KiB, {} descriptors, {:.1} tasks/s",
                a.tasks,
                b.d.rss_kib(),
                fds(pid),
                done as f64 / t0.elapsed().as_secs_f64()
            );
        }
    }
    // Compared at the same point: every pool full and idle (a VM booting
    // holds descriptors of its own).
    b.wait_pools_full()?;
    let last = (b.d.rss_kib(), fds(pid));
    let (rss0, fd0) = first.unwrap_or(last);
    let (left, panics) = b.stop_and_audit(&vms);
    println!(
        "{} tasks in {:.0} s: {ok} succeeded, {} not",
        a.tasks,
        t0.elapsed().as_secs_f64(),
        failed.len()
    );
    println!(
        "daemon RSS: {rss0} KiB after the first task, {} KiB after the last",
        last.0
    );
    println!(
        "daemon descriptors: {fd0} after the first task, {} after the last",
        last.1
    );
    println!("daemon panics: {panics}");
    println!("leaks: {}", left.len());
    for l in left.iter().chain(failed.iter()) {
        println!("  {l}");
    }
    if failed.is_empty() && left.is_empty() && panics == 0 && last.1 <= fd0 + 4 {
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&log);
        println!("ok");
        Ok(0)
    } else {
        println!(
            "FAILED (state dir {}, daemon log {})",
            dir.display(),
            log.display()
        );
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_plan_and_every_fault_comes_first() {
        let a = plan(30, 7);
        assert_eq!(a, plan(30, 7));
        assert_ne!(a, plan(30, 8));
        let mut first: Vec<Fault> = a[..ALL.len()].iter().map(|(f, _)| *f).collect();
        first.sort();
        assert_eq!(first, ALL.to_vec());
        assert!(a.iter().all(|(_, d)| *d < Duration::from_secs(2)));
    }
}
