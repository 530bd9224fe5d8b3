//! `dough-agent`: PID 1 inside every Dough microVM.
//!
//! Boot: mount proc/sys/dev, load modules, assemble the root (read-only base
//! under an overlay on the scratch disk), set the hostname, dial the host over vsock
//! (CID 2, [`dough_proto::CONTROL_PORT`]) and say Hello. Then: take one
//! Assign, run it, stream output, heartbeat every second, report Exit, and
//! power off on Shutdown or when the host goes away.
mod cmdline;
mod init;
mod repo;
mod snapshot;
mod spawn;
mod task;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dough_proto::{GuestMsg, Hello, HostMsg, MAX_FRAME};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};

fn log(msg: &str) {
    // PID 1's stderr is /dev/console: the serial log on the host.
    eprintln!("dough-agent: {msg}");
}

fn fatal(msg: &str) -> ! {
    log(&format!("fatal: {msg}"));
    init::power_off()
}

fn main() {
    if std::process::id() != 1 {
        eprintln!(
            "dough-agent {}: this is the init of a Dough guest and runs only as PID 1 inside a VM",
            env!("CARGO_PKG_VERSION")
        );
        std::process::exit(2);
    }
    std::panic::set_hook(Box::new(|info| fatal(&format!("panic: {info}"))));
    task::Reaper::block_sigchld();

    if let Err(e) = init::early_mounts() {
        fatal(&e);
    }
    let cfg = cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    if cfg.bench_poweroff {
        init::power_off();
    }
    // Only what the vsock dial needs first; the root filesystem is put
    // together on another thread while Hello goes out. A task waits for it.
    match init::load_modules(init::MODULES_EARLY) {
        Ok(n) => log(&format!("{n} vsock modules at {} ms", boot_ms())),
        Err(e) => fatal(&e),
    }
    let root = RootReady::default();
    {
        let root = root.clone();
        let cfg = cfg.clone();
        std::thread::spawn(move || {
            let res = init::load_modules(init::MODULES_LATE)
                .and_then(|_| init::switch_root(&cfg))
                .map(|()| {
                    if let Err(e) = init::set_identity(&cfg) {
                        log(&e);
                    }
                    if let Err(e) = init::loopback_up() {
                        log(&e);
                    }
                    if let Some(net) = &cfg.net {
                        match init::network_up(net) {
                            Ok(()) => log(&format!("eth0 {}/{} up", net.addr, net.prefix)),
                            Err(e) => log(&format!("network: {e}")),
                        }
                    } else {
                        // No NIC: no resolver either (not the image builder's).
                        let _ = std::fs::write("/etc/resolv.conf", "");
                    }
                    log(&format!("root ready at {} ms", boot_ms()));
                });
            root.set(res);
        });
    }
    let reaper = task::Reaper::default();
    {
        let r = reaper.clone();
        std::thread::spawn(move || r.run());
    }
    // Set once the page cache is warm (at once without `dough.warm`).
    let warmed = RootReady::default();
    if cfg.warm {
        let (r, root, warmed) = (reaper.clone(), root.clone(), warmed.clone());
        std::thread::spawn(move || {
            if root.wait().is_ok() {
                task::prewarm(&r);
                log(&format!("page cache warmed at {} ms", boot_ms()));
            }
            warmed.set(Ok(()));
        });
    } else {
        warmed.set(Ok(()));
    }
    let connect = || {
        if cfg.serial {
            snapshot::open_port()
        } else {
            dial(cfg.port)
        }
    };
    let mut conn = connect();
    log(&format!("connected to the host at {} ms", boot_ms()));
    // Firecracker resets every vsock connection when it restores a
    // snapshot: a quiesced VM that loses its connection dials again and
    // says Hello on the new one (docs/protocol.md). Any other loss ends it.
    while let Served::ResetWhileQuiesced = serve(conn, cfg.serial, &reaper, &root, &warmed) {
        log("control connection reset while quiesced (a snapshot restore): connecting again");
        conn = connect();
    }
    init::power_off();
}

/// How a control connection ended.
enum Served {
    /// Shutdown, or the host went away: power off.
    Done,
    /// Lost while quiesced for a snapshot (vsock only): dial again.
    ResetWhileQuiesced,
}

/// Set once by the root-assembly thread; waited on before a task starts.
#[derive(Clone, Default)]
struct RootReady(Arc<(Mutex<Option<RootResult>>, std::sync::Condvar)>);

type RootResult = Result<(), String>;

impl RootReady {
    fn set(&self, r: RootResult) {
        let (m, cv) = &*self.0;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        cv.notify_all();
    }

    fn wait(&self) -> RootResult {
        let (m, cv) = &*self.0;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        while g.is_none() {
            g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.clone().unwrap_or(Ok(()))
    }
}

/// Dial the host until it answers; the host listens before the VM starts, so
/// the first try normally succeeds. The host kills a VM that never dials.
fn dial(port: u32) -> File {
    let mut delay = Duration::from_millis(10);
    loop {
        match try_dial(port) {
            Ok(fd) => return File::from(fd),
            Err(e) => {
                log(&format!("dial host vsock port {port}: {e}; retrying"));
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(500));
            }
        }
    }
}

fn try_dial(port: u32) -> nix::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &VsockAddr::new(dough_proto::HOST_CID, port),
    )?;
    Ok(fd)
}

fn boot_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// Speak the protocol on `conn` until Shutdown or the host goes away.
/// `serial`: `conn` is the virtio-serial port, which reads end-of-file
/// while no host is connected (e.g. between a snapshot and its restore):
/// wait for one instead of powering off.
fn serve(
    conn: File,
    serial: bool,
    reaper: &task::Reaper,
    root: &RootReady,
    warmed: &RootReady,
) -> Served {
    let Ok(mut writer) = conn.try_clone() else {
        fatal("cannot clone the control connection");
    };
    let mut reader = conn;
    // One writer thread owns the socket's write side; everyone else queues.
    let (tx, rx) = sync_channel::<GuestMsg>(64);
    std::thread::spawn(move || {
        for msg in rx {
            if dough_proto::write_frame(&mut writer, &msg).is_err() {
                break;
            }
        }
    });
    let hello = GuestMsg::Hello(Hello {
        versions: dough_proto::supported_versions(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        boot_ms: boot_ms(),
    });
    if tx.send(hello).is_err() {
        return Served::Done;
    }
    // Heartbeats stop while the VM is quiesced for a snapshot; the lock
    // orders the pause against a heartbeat being queued. `ended` stops this
    // connection's heartbeat thread, so its writer thread ends too.
    let paused: Arc<Mutex<bool>> = Arc::default();
    let ended = Arc::new(AtomicBool::new(false));
    let _stop = StopOnDrop(ended.clone());
    start_heartbeat(tx.clone(), paused.clone(), ended);

    let pgid: Arc<Mutex<Option<i32>>> = Arc::default();
    // The task's thread and what it needs wait from the moment the root is
    // ready, so an Assign starts the process at once (task::Standby).
    let (assign_tx, assign_rx) = sync_channel::<Box<dough_proto::Assign>>(1);
    {
        let (r, tx, pg, root) = (reaper.clone(), tx.clone(), pgid.clone(), root.clone());
        std::thread::spawn(move || {
            let root = root.wait();
            let standby = task::Standby::start(&tx);
            let Ok(a) = assign_rx.recv() else { return };
            match root {
                Ok(()) => task::run(&r, *a, tx, pg, standby),
                Err(e) => {
                    log(&format!("root filesystem failed: {e}"));
                    let _ = tx.send(GuestMsg::SpawnFailed {
                        message: format!("the guest's root filesystem failed: {e}"),
                    });
                }
            }
        });
    }
    // Read by a clone's warm-up, which gives way to a task.
    let assigned = Arc::new(AtomicBool::new(false));
    let restored_tx = after_restore(reaper.clone(), assigned.clone());
    loop {
        let frame = match dough_proto::read_frame(&mut reader, MAX_FRAME) {
            Ok(Some(f)) => f,
            Ok(None) if serial => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Ok(None) | Err(_) if *paused.lock().unwrap_or_else(|p| p.into_inner()) => {
                return Served::ResetWhileQuiesced;
            }
            Ok(None) => {
                log("host closed the control connection; powering off");
                return Served::Done;
            }
            Err(e) => {
                log(&format!("control connection failed: {e}; powering off"));
                return Served::Done;
            }
        };
        let mut frame = frame;
        let decoded = dough_proto::decode::<HostMsg>(&frame);
        // An Assign may carry a credential: leave no copy in freed memory.
        frame.fill(0);
        let msg = match decoded {
            Ok(m) => m,
            Err(e) => {
                log(&format!("bad message from host: {e}"));
                continue;
            }
        };
        match msg {
            HostMsg::Welcome { version } => log(&format!("protocol version {version}")),
            HostMsg::Assign(a) if !assigned.load(Ordering::Relaxed) => {
                assigned.store(true, Ordering::Relaxed);
                let _ = assign_tx.send(a);
            }
            HostMsg::Assign(_) => {
                let _ = tx.send(GuestMsg::Log {
                    message: "a task was already assigned to this VM; ignored".into(),
                });
            }
            HostMsg::Signal { signo } => {
                let target = *pgid.lock().unwrap_or_else(|p| p.into_inner());
                if let (Some(pg), Ok(sig)) = (target, nix::sys::signal::Signal::try_from(signo)) {
                    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pg), sig);
                }
            }
            HostMsg::Shutdown => return Served::Done,
            HostMsg::Quiesce => {
                // The snapshot must hold a finished root and a warm cache.
                let _ = root.wait();
                let _ = warmed.wait();
                let mut p = paused.lock().unwrap_or_else(|p| p.into_inner());
                *p = true;
                let _ = tx.send(GuestMsg::Quiesced);
                log("quiesced for a snapshot");
            }
            HostMsg::Restore(r) => {
                let reply = snapshot::restore(&r);
                *paused.lock().unwrap_or_else(|p| p.into_inner()) = false;
                match reply {
                    Ok(m) => {
                        let _ = tx.send(m);
                        let _ = restored_tx.try_send(());
                    }
                    Err(e) => {
                        log(&format!("restore: {e}"));
                        let _ = tx.send(GuestMsg::Log {
                            message: format!("restore failed: {e}"),
                        });
                    }
                }
            }
        }
    }
}

/// What a restored clone does once it has answered the Restore, on a thread
/// made beforehand: between the answer and the Assign that follows within
/// milliseconds, the vCPU belongs to the host's round trip, and under TCG
/// a console line or a new thread costs milliseconds of it.
fn after_restore(reaper: task::Reaper, assigned: Arc<AtomicBool>) -> SyncSender<()> {
    let (tx, rx) = sync_channel::<()>(1);
    std::thread::spawn(move || {
        for () in rx {
            // Emulated (TCG) CPUs translate guest code afresh after a
            // restore: start a process once while the clone idles, so its
            // task's start is not the first. A clone made for a waiting
            // task gets its Assign within milliseconds: then the warm-up
            // would only compete with the task for the vCPU, so it waits a
            // moment and gives way.
            std::thread::sleep(Duration::from_millis(200));
            log("restored: reseeded, clock set, identity taken");
            if !assigned.load(Ordering::Relaxed) {
                task::prewarm(&reaper);
            }
        }
    });
    tx
}

/// Sets the flag when dropped (the end of `serve`, however it returns).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn start_heartbeat(tx: SyncSender<GuestMsg>, paused: Arc<Mutex<bool>>, ended: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut seq = 0;
        loop {
            std::thread::sleep(Duration::from_millis(dough_proto::HEARTBEAT_INTERVAL_MS));
            if ended.load(Ordering::Relaxed) {
                return;
            }
            let p = paused.lock().unwrap_or_else(|p| p.into_inner());
            if *p {
                continue;
            }
            if tx.send(GuestMsg::Heartbeat { seq }).is_err() {
                return;
            }
            drop(p);
            seq += 1;
        }
    });
}
