//! **Where a VM's network namespace is made, and unmade.**
//!
//! ```text
//! host namespace                      namespace dough-<vm>
//!   dh<vm> 10.213.S.1/30  <─veth─>   veth0 10.213.S.2/30 (default route)
//!   table inet dough:                 tap0  172.16.0.1/30  <─ VMM ─ guest eth0 172.16.0.2
//!     masquerade the pool out          table inet dough_vm: forward tap0→veth0 by the
//!     no dh*→dh*, no dh*→host            egress policy, snat guest→slot, input: DNS only
//!                                     DNS forwarder on 172.16.0.1:53 (a thread of Dough)
//! ```
//! Every VM has the same guest address; the slot (a /30 from the pool) is
//! what tells VMs apart outside their namespace. [`VmNet::setup`] builds it
//! all on one thread, with netlink (`rtnl`), the TUN ioctl (`tun`) and one
//! nftables batch (`nft`); [`VmNet::teardown`] removes it; [`gc`] removes
//! what a crashed owner left.
pub mod ct;
pub mod dns;
pub mod nft;
pub mod policy;
pub mod record;
pub mod rtnl;
pub mod tun;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use policy::{Cidr, Egress};
pub use record::{EgressRecord, EgressSummary};

/// The gateway as the guest sees it (tap0 in the VM's namespace).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);
/// The guest's own address (the same in every VM).
pub const GUEST: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 2);
pub const GUEST_PREFIX: u8 = 30;
/// The guest NIC's MAC address.
pub const GUEST_MAC: &str = "06:00:ac:10:00:02";
/// The TAP device in the VM's namespace.
pub const TAP: &str = "tap0";

/// How the VMM comes by tap0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapAttach {
    /// Dough keeps tap0's queue open ([`VmNet::tap`]) and hands the VMM the
    /// descriptor (QEMU's `-netdev tap,fd=`): a jailed VMM never opens
    /// /dev/net/tun.
    Fd,
    /// The VMM opens /dev/net/tun and attaches tap0 by name itself
    /// (Firecracker's `host_dev_name`). Dough holds no descriptor: a
    /// single-queue TAP takes one attached file, and a second `TUNSETIFF`
    /// fails with EBUSY.
    ByName,
}

/// tap0 as the VMM needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapSpec {
    /// The uid that may attach it without CAP_NET_ADMIN (a jailed VMM's).
    pub owner: Option<u32>,
    pub attach: TapAttach,
}

impl TapSpec {
    /// Root's VMM, descriptor handed over: what tests and benches use.
    pub const ROOT_FD: TapSpec = TapSpec {
        owner: None,
        attach: TapAttach::Fd,
    };
}
/// The namespace's end of the veth pair.
pub const VETH_NS: &str = "veth0";
/// Where named namespaces live (as `ip netns` keeps them).
pub const NETNS_DIR: &str = "/run/netns";
/// Named namespaces of Dough's VMs are called this plus the VM id.
pub const NETNS_PREFIX: &str = "dough-";

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Nft(#[from] nft::NftError),
    #[error("the slot pool {0} is exhausted (every /30 is in use)")]
    PoolExhausted(Cidr),
    #[error("{0}")]
    Config(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let mut what = what.into();
    move |source| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            what.push_str(" (needs root; --no-network runs a VM without a network)");
        }
        NetError::Io { what, source }
    }
}

/// Host-wide network settings.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// /30 slots for the veth pairs, one per VM. Must not overlap anything
    /// the host routes to.
    pub pool: Cidr,
    /// The resolver the DNS forwarders ask (from the host's namespace).
    pub dns_upstream: SocketAddr,
    /// Masquerade the pool behind the host's address (off when the pool is
    /// routed to this host by the network).
    pub host_nat: bool,
    /// Slot leases live in `<run_root>/slots` (tmpfs: namespaces and slots
    /// both end at reboot).
    pub run_root: PathBuf,
    /// Written into each slot lease: which Dough made it (its state dir).
    pub tag: String,
    /// Keep an egress record per VM ([`record`]); off: no log rules, no
    /// conntrack accounting, no listening sockets.
    pub record_egress: bool,
}

pub const DEFAULT_POOL: &str = "10.213.0.0/16";
/// Host-global runtime state (slot leases), on tmpfs like /run/netns.
pub const RUN_ROOT: &str = "/run/dough";

impl NetConfig {
    /// Defaults: pool 10.213.0.0/16, the first IPv4 nameserver of
    /// /etc/resolv.conf, host NAT on, /run/dough.
    pub fn from_host() -> Result<NetConfig, NetError> {
        Ok(NetConfig {
            pool: DEFAULT_POOL.parse().expect("default pool"),
            dns_upstream: resolv_conf_upstream(Path::new("/etc/resolv.conf"))?,
            host_nat: true,
            run_root: PathBuf::from(RUN_ROOT),
            tag: String::new(),
            record_egress: true,
        })
    }

    pub fn slots_dir(&self) -> PathBuf {
        slots_in(&self.run_root)
    }

    /// Number of /30 slots in the pool.
    pub fn slot_count(&self) -> u32 {
        if self.pool.len > 30 {
            0
        } else {
            1u32 << (30 - self.pool.len)
        }
    }

    /// The lease file of slot `n`: named by the slot's network address, so
    /// Doughs with different pools never collide.
    pub fn slot_lease(&self, n: u32) -> PathBuf {
        let net = Ipv4Addr::from(u32::from(self.pool.network()) + n * 4);
        self.slots_dir().join(net.to_string())
    }

    /// (host end, namespace end) of slot `n`.
    pub fn slot_addrs(&self, n: u32) -> (Ipv4Addr, Ipv4Addr) {
        let base = u32::from(self.pool.network()) + n * 4;
        (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
    }
}

fn slots_in(run_root: &Path) -> PathBuf {
    run_root.join("slots")
}

/// The first IPv4 `nameserver` of a resolv.conf, port 53.
pub fn resolv_conf_upstream(path: &Path) -> Result<SocketAddr, NetError> {
    let text = std::fs::read_to_string(path).map_err(io(format!("read {}", path.display())))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .map(|a| SocketAddr::new(IpAddr::V4(a), 53))
        .next()
        .ok_or_else(|| {
            NetError::Config(format!(
                "no IPv4 nameserver in {}; give one with --dns",
                path.display()
            ))
        })
}

/// Kernel command line for the guest agent to configure eth0; `resolver`:
/// the gateway's DNS forwarder goes into its resolv.conf (a VM whose policy
/// may change at claim gets it even while its policy is `none`).
pub fn guest_kernel_args(resolver: bool) -> Vec<String> {
    let mut v = vec![
        format!("dough.ip={GUEST}/{GUEST_PREFIX}"),
        format!("dough.gw={GATEWAY}"),
    ];
    if resolver {
        v.push(format!("dough.dns={GATEWAY}"));
    }
    v
}

/// The process that owns a resource, with its start time so a recycled PID
/// is not mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    pub start: u64,
}

impl Owner {
    pub fn me() -> Owner {
        let pid = std::process::id();
        Owner {
            pid,
            start: proc_start_time(pid).unwrap_or(0),
        }
    }

    pub fn alive(&self) -> bool {
        proc_start_time(self.pid).is_some_and(|t| t == self.start)
    }
}

/// Field 22 of /proc/PID/stat (start time in clock ticks since boot).
pub fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields resume after ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A slot lease: `<slots>/<slot network address>`, created O_EXCL before the namespace exists,
/// removed only once the namespace is gone.
#[derive(Debug, Serialize, Deserialize)]
pub struct SlotRecord {
    pub vm_id: String,
    pub owner: Owner,
    /// Which Dough made it ([`NetConfig::tag`]).
    #[serde(default)]
    pub tag: String,
}

/// Lease the first free slot. A slot whose host-end address is still on a
/// link (`busy`: a torn-down VM's veth the kernel has not destroyed yet) is
/// skipped even when its lease is gone.
fn lease_slot(cfg: &NetConfig, vm_id: &str, busy: &[Ipv4Addr]) -> Result<u32, NetError> {
    use std::io::Write;
    let dir = cfg.slots_dir();
    std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    let rec = serde_json::to_vec(&SlotRecord {
        vm_id: vm_id.into(),
        owner: Owner::me(),
        tag: cfg.tag.clone(),
    })
    .expect("record serializes");
    for n in 0..cfg.slot_count() {
        if busy.contains(&cfg.slot_addrs(n).0) {
            continue;
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(cfg.slot_lease(n))
        {
            Ok(mut f) => {
                f.write_all(&rec)
                    .map_err(io(format!("write slot lease {n}")))?;
                return Ok(n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io(format!("lease slot {n}"))(e)),
        }
    }
    Err(NetError::PoolExhausted(cfg.pool))
}

/// The slot leases in `dir` (`NetConfig::slots_dir`), with their records.
pub fn slot_leases(dir: &Path) -> Vec<(PathBuf, Option<SlotRecord>)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| {
            e.file_name().to_str()?.parse::<Ipv4Addr>().ok()?;
            let rec = std::fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            Some((e.path(), rec))
        })
        .collect()
}

pub fn netns_path(vm_id: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(format!("{NETNS_PREFIX}{vm_id}"))
}

pub fn host_veth(vm_id: &str) -> String {
    format!("{}{vm_id}", policy::VETH_PREFIX)
}

/// Make /run/netns a shared mount of its own, as `ip netns` does, so a
/// namespace mounted there is seen (and unmounted) in every mount namespace.
fn ensure_netns_dir() -> Result<(), NetError> {
    use nix::mount::{mount, MsFlags};
    std::fs::create_dir_all(NETNS_DIR).map_err(io(format!("create {NETNS_DIR}")))?;
    let shared = || {
        mount(
            None::<&str>,
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => {
            mount(
                Some(NETNS_DIR),
                NETNS_DIR,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| io(format!("bind {NETNS_DIR}"))(e.into()))?;
            shared().map_err(|e| io(format!("share {NETNS_DIR}"))(e.into()))
        }
        Err(e) => Err(io(format!("share {NETNS_DIR}"))(e.into())),
    }
}

fn write_sysctl(path: &str, value: &str) -> Result<(), NetError> {
    std::fs::write(path, value).map_err(io(format!("write {path}")))
}

/// A lock on `<run_root>/host.lock` (shared: making the host table; exclusive:
/// gc deciding to delete it), so gc never deletes the table under a VM that
/// has leased its slot.
fn host_lock(run_root: &Path, exclusive: bool) -> Result<std::fs::File, NetError> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(run_root).map_err(io(format!("create {}", run_root.display())))?;
    let p = run_root.join("host.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(io(format!("open {}", p.display())))?;
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    // SAFETY: flock on an open descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
        return Err(io(format!("lock {}", p.display()))(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(f)
}

/// Make the host namespace (the calling thread's) ready for VMs: Dough's
/// own `inet dough` table, replaced atomically, and IPv4 forwarding on.
/// Touches no other table. Call after [`VmNet::setup`] (whose slot lease
/// keeps `gc` from deleting the table) and before the VM's first packet.
pub fn prepare_host(cfg: &NetConfig) -> Result<(), NetError> {
    if cfg.slot_count() == 0 {
        return Err(NetError::Config(format!(
            "slot pool {} is too small (needs at least a /30)",
            cfg.pool
        )));
    }
    let _lock = host_lock(&cfg.run_root, false)?;
    let mut n = nft::Nft::new()?;
    n.run(&policy::host_ruleset(cfg.pool, cfg.host_nat))?;
    let fwd = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(fwd)
        .map(|s| s.trim() != "1")
        .unwrap_or(true)
    {
        write_sysctl(fwd, "1")?;
    }
    Ok(())
}

/// A VM's network, live.
pub struct VmNet {
    pub vm_id: String,
    pub slot: u32,
    /// The slot address the guest's traffic leaves the namespace with.
    pub slot_addr: Ipv4Addr,
    pub netns: PathBuf,
    /// tap0, attached: for a VMM that takes the device as a descriptor
    /// ([`TapAttach::Fd`]); None with [`TapAttach::ByName`].
    pub tap: Option<std::fs::File>,
    stop: Option<OwnedFd>,
    dns: Option<JoinHandle<()>>,
    lease: PathBuf,
    /// The egress policy in force (shared with the DNS forwarder).
    policy: Option<Arc<Mutex<dns::Policy>>>,
    /// What the VM's ruleset is built from besides the policy.
    host_addrs: Vec<Ipv4Addr>,
    pool: Cidr,
    record: bool,
    /// The egress record as teardown left it.
    ended: Option<EgressRecord>,
}

struct Built {
    slot_addr: Ipv4Addr,
    tap: Option<std::fs::File>,
    policy: Arc<Mutex<dns::Policy>>,
}

impl VmNet {
    /// Build the VM's namespace: tap0 (owned by `tap.owner` so an
    /// unprivileged VMM can attach, and held open or not as `tap.attach`
    /// says), the veth pair, addresses and routes,
    /// the egress policy as one nftables batch, and the DNS forwarder.
    /// On error everything made so far is removed again.
    pub fn setup(
        cfg: &NetConfig,
        vm_id: &str,
        egress: &Egress,
        tap: TapSpec,
    ) -> Result<VmNet, NetError> {
        if vm_id.is_empty()
            || vm_id.len() > 13
            || !vm_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(NetError::Config(format!(
                "vm id '{vm_id}' cannot name a veth (1-13 of [a-z0-9-])"
            )));
        }
        let mut host = rtnl::Rtnl::open().map_err(io("netlink socket (host)"))?;
        let host_addrs: Vec<Ipv4Addr> = host
            .addresses()
            .map_err(io("list host addresses"))?
            .into_iter()
            .filter_map(|a| match a {
                IpAddr::V4(v) => Some(v),
                IpAddr::V6(_) => None,
            })
            .collect();
        ensure_netns_dir()?;
        let slot = lease_slot(cfg, vm_id, &host_addrs)?;
        let mut net = VmNet {
            vm_id: vm_id.into(),
            slot,
            slot_addr: cfg.slot_addrs(slot).1,
            netns: netns_path(vm_id),
            tap: None,
            stop: None,
            dns: None,
            lease: cfg.slot_lease(slot),
            policy: None,
            host_addrs: host_addrs.clone(),
            pool: cfg.pool,
            record: cfg.record_egress,
            ended: None,
        };
        let (stop_r, stop_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| io("pipe")(e.into()))?;
        net.stop = Some(stop_w);
        let (tx, rx) = mpsc::channel::<Result<Built, NetError>>();
        let cfg2 = cfg.clone();
        let id = vm_id.to_string();
        let eg = egress.clone();
        let th = std::thread::Builder::new()
            .name(format!("net-{vm_id}"))
            // It builds the namespace, then forwards DNS: little stack.
            .stack_size(256 << 10)
            .spawn(
                move || match build(&cfg2, host, &host_addrs, &id, slot, &eg, tap) {
                    Ok((built, (down, up, sources))) => {
                        let policy = built.policy.clone();
                        let _ = tx.send(Ok(built));
                        dns::serve(down, up, cfg2.dns_upstream, policy, stop_r, sources);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                },
            )
            .map_err(io("spawn the network thread"))?;
        net.dns = Some(th);
        match rx.recv() {
            Ok(Ok(b)) => {
                net.slot_addr = b.slot_addr;
                net.tap = b.tap;
                net.policy = Some(b.policy);
                Ok(net)
            }
            Ok(Err(e)) => {
                let _ = net.teardown_inner();
                Err(e)
            }
            Err(_) => {
                let _ = net.teardown_inner();
                Err(NetError::Config("the network thread died".into()))
            }
        }
    }

    /// Replace the VM's egress policy: its nftables table in one atomic
    /// transaction (the old table and every address the forwarder had
    /// allowed go; there is no moment with neither ruleset) and the
    /// forwarder's name policy with it. A pooled VM boots with `none` and
    /// gets its task's policy here, at claim; its egress record starts
    /// over with it.
    pub fn set_egress(&self, egress: &Egress) -> Result<(), NetError> {
        let Some(policy) = &self.policy else {
            return Err(NetError::Config("the network is not set up".into()));
        };
        let mut p = dns::lock(policy);
        let batch = format!(
            "add table inet {t}\ndelete table inet {t}\n{rules}",
            t = policy::VM_TABLE,
            rules = policy::vm_ruleset(
                egress,
                self.slot_addr,
                &self.host_addrs,
                self.pool,
                self.record
            )
        );
        p.nft.run(&batch)?;
        p.egress = egress.clone();
        if let Some(r) = p.record.as_mut() {
            r.reset(egress.name(), record::now_ms());
        }
        Ok(())
    }

    /// The egress record so far (None: recording is off, or the network is
    /// gone). After [`VmNet::teardown_recorded`] it is complete.
    pub fn egress_record(&self) -> Option<EgressRecord> {
        let p = self.policy.as_ref()?;
        dns::lock(p).record.as_ref().map(|r| r.snapshot())
    }

    /// [`VmNet::teardown`], and the finished egress record: the flows the
    /// kernel still tracked are read in before the namespace goes.
    pub fn teardown_recorded(mut self) -> (Vec<String>, Option<EgressRecord>) {
        let errors = self.teardown_inner();
        (errors, self.ended.take())
    }

    /// Remove the namespace (and with it tap0 and the VM's rules), the host
    /// veth and the slot lease. Keeps going past errors and returns them.
    pub fn teardown(mut self) -> Vec<String> {
        self.teardown_inner()
    }

    fn teardown_inner(&mut self) -> Vec<String> {
        let mut errors = vec![];
        // The forwarder's sockets, its nft context and the tap hold the
        // namespace.
        drop(self.tap.take());
        let policy = self.policy.take();
        drop(self.stop.take());
        if let Some(th) = self.dns.take() {
            let _ = th.join();
        }
        // The forwarder has read what was left of the kernel's events.
        if let Some(p) = policy {
            if let Some(r) = dns::lock(&p).record.as_mut() {
                self.ended = Some(r.finish(record::now_ms()));
            }
        }
        // Unmounting drops the last reference: the kernel then destroys the
        // namespace with tap0, both veth ends and the VM's rules, in the
        // background (deleting the veth here would wait ~30 ms for RCU).
        // Until it is gone its host-end address marks the slot as busy.
        if let Err(e) = remove_netns(&self.netns) {
            // The lease stays: gc retries once this process is gone.
            errors.push(e);
            return errors;
        }
        let lease = self.lease.clone();
        if let Err(e) = std::fs::remove_file(&lease) {
            if e.kind() != std::io::ErrorKind::NotFound {
                errors.push(format!("release slot {}: {e}", self.slot));
            }
        }
        errors
    }
}

impl Drop for VmNet {
    fn drop(&mut self) {
        if self.dns.is_some() || self.stop.is_some() {
            let _ = self.teardown_inner();
        }
    }
}

fn remove_netns(path: &Path) -> Result<(), String> {
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(format!("unmount {}: {e}", path.display())),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("remove {}: {e}", path.display())),
    }
}

/// The forwarder's sockets: on the gateway, and upstream in the host's
/// namespace; and the kernel's sources of the egress record.
type DnsParts = (UdpSocket, UdpSocket, Option<ct::Sources>);

/// Runs on the VM's network thread: starts in the host namespace, ends in
/// the VM's.
fn build(
    cfg: &NetConfig,
    mut host: rtnl::Rtnl,
    host_addrs: &[Ipv4Addr],
    vm_id: &str,
    slot: u32,
    egress: &Egress,
    tap_spec: TapSpec,
) -> Result<(Built, DnsParts), NetError> {
    use nix::sched::{unshare, CloneFlags};
    let (host_end, ns_end) = cfg.slot_addrs(slot);
    // `host` (netlink) and the upstream DNS socket were opened in the host
    // namespace and stay there after this thread leaves it. The forwarder
    // runs whatever the policy (with `none` it refuses every name), so a
    // later `set_egress` needs nothing new.
    let up = UdpSocket::bind("0.0.0.0:0").map_err(io("dns upstream socket"))?;

    // The namespace: this thread moves into a new one, which is then named.
    let path = netns_path(vm_id);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io(format!("create {}", path.display())))?;
    unshare(CloneFlags::CLONE_NEWNET).map_err(|e| io("unshare the network namespace")(e.into()))?;
    nix::mount::mount(
        Some("/proc/thread-self/ns/net"),
        &path,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| io(format!("mount {}", path.display()))(e.into()))?;
    let ns_fd =
        std::fs::File::open("/proc/thread-self/ns/net").map_err(io("open the namespace"))?;
    // No IPv6 in the namespace: the guest gets no v6 path anywhere.
    write_sysctl("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1")?;
    write_sysctl("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1")?;
    write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;

    let veth = host_veth(vm_id);
    host.add_veth(&veth, vm_id, VETH_NS, ns_fd.as_raw_fd())
        .map_err(io(format!("create veth {veth}")))?;
    let hidx = host.index(&veth).map_err(io("find the host veth"))?;
    host.add_addr(hidx, host_end, 30)
        .map_err(io(format!("address {host_end} on {veth}")))?;
    host.set_up(hidx).map_err(io(format!("bring {veth} up")))?;

    let mut ns = rtnl::Rtnl::open().map_err(io("netlink socket (vm namespace)"))?;
    let lo = ns.index("lo").map_err(io("find lo"))?;
    ns.set_up(lo).map_err(io("bring lo up"))?;
    let tap =
        tun::create_persistent_tap(TAP, tap_spec.owner).map_err(io(format!("create {TAP}")))?;
    tun::set_mac(TAP, tun::GATEWAY_MAC).map_err(io("set tap0's address"))?;
    let tidx = ns.index(TAP).map_err(io("find tap0"))?;
    ns.add_addr(tidx, GATEWAY, GUEST_PREFIX)
        .map_err(io("address tap0"))?;
    ns.set_up(tidx).map_err(io("bring tap0 up"))?;
    // Persistent: tap0 stays when its descriptor closes, for the VMM to
    // attach by name.
    let tap = match tap_spec.attach {
        TapAttach::Fd => Some(tap),
        TapAttach::ByName => None,
    };
    let vidx = ns.index(VETH_NS).map_err(io("find veth0"))?;
    ns.add_addr(vidx, ns_end, 30).map_err(io("address veth0"))?;
    ns.set_up(vidx).map_err(io("bring veth0 up"))?;
    ns.add_default_route(host_end)
        .map_err(io("default route"))?;

    let mut nft = nft::Nft::new()?;
    nft.run(&policy::vm_ruleset(
        egress,
        ns_end,
        host_addrs,
        cfg.pool,
        cfg.record_egress,
    ))?;
    // After the ruleset (which brings conntrack into the namespace), before
    // the guest's first packet.
    let sources = if cfg.record_egress {
        Some(ct::Sources::open(GUEST, GATEWAY).map_err(io("egress record (conntrack, nflog)"))?)
    } else {
        None
    };

    let down = UdpSocket::bind(SocketAddr::new(GATEWAY.into(), 53))
        .map_err(io("dns listener on the gateway"))?;
    let policy = Arc::new(Mutex::new(dns::Policy {
        egress: egress.clone(),
        nft,
        record: cfg
            .record_egress
            .then(|| record::Recorder::new(egress.name(), record::now_ms())),
    }));
    Ok((
        Built {
            slot_addr: ns_end,
            tap,
            policy,
        },
        (down, up, sources),
    ))
}

/// What [`gc`] reclaimed.
#[derive(Debug, Default)]
pub struct NetGc {
    pub removed_netns: Vec<String>,
    pub removed_veths: Vec<String>,
    pub released_slots: Vec<String>,
    /// The host's `inet dough` table, removed when no VM is left.
    pub removed_host_table: bool,
    pub kept_live: Vec<String>,
    pub errors: Vec<String>,
}

/// Remove every `dough-*` namespace, `dh*` veth (in the calling thread's
/// namespace) and slot lease whose owning process is gone. A namespace
/// without a lease is an orphan (leases are written before namespaces).
pub fn gc(run_root: &Path) -> NetGc {
    let mut r = NetGc::default();
    let slots = slots_in(run_root);
    let leases = slot_leases(&slots);
    let live: std::collections::HashSet<String> = leases
        .iter()
        .filter_map(|(_, rec)| rec.as_ref())
        .filter(|rec| rec.owner.alive())
        .map(|rec| rec.vm_id.clone())
        .collect();
    if let Ok(rd) = std::fs::read_dir(NETNS_DIR) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(vm) = name.strip_prefix(NETNS_PREFIX) else {
                continue;
            };
            if live.contains(vm) {
                r.kept_live.push(vm.to_string());
                continue;
            }
            match remove_netns(&e.path()) {
                Ok(()) => r.removed_netns.push(name),
                Err(err) => r.errors.push(err),
            }
        }
    }
    if let Ok(mut rt) = rtnl::Rtnl::open() {
        for (idx, name, alias) in rt.links().unwrap_or_default() {
            // Only links that name themselves Dough's: `dh<vm>` with alias <vm>.
            let Some(vm) = name.strip_prefix(policy::VETH_PREFIX) else {
                continue;
            };
            if alias.as_deref() != Some(vm) || live.contains(vm) {
                continue;
            }
            match rt.del_link(idx) {
                Ok(()) => r.removed_veths.push(name),
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
                Err(e) => r.errors.push(format!("delete {name}: {e}")),
            }
        }
    }
    for (path, rec) in leases {
        if rec.as_ref().is_some_and(|rec| live.contains(&rec.vm_id)) {
            continue;
        }
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        match std::fs::remove_file(&path) {
            Ok(()) => r.released_slots.push(format!("{name}/30")),
            Err(e) => r.errors.push(format!("release slot {name}: {e}")),
        }
    }
    // No VM left at all: Dough's host table goes too (the next VM puts it
    // back after leasing its slot).
    let lock = host_lock(run_root, true);
    if lock.is_ok() && slot_leases(&slots).is_empty() {
        if let Ok(mut n) = nft::Nft::new() {
            if n.run(&format!("list table inet {}", policy::HOST_TABLE))
                .is_ok()
            {
                match n.run(&format!("delete table inet {}", policy::HOST_TABLE)) {
                    Ok(_) => r.removed_host_table = true,
                    Err(e) => r.errors.push(format!("delete host table: {e}")),
                }
            }
        }
    }
    r
}

/// What of a VM's network exists now (for checks that nothing leaked). The
/// veth may take a moment to go after teardown (see [`NETNS_CLEANUP`]).
pub fn leftovers(vm_id: &str) -> Vec<String> {
    let mut v = vec![];
    if netns_path(vm_id).exists() {
        v.push(netns_path(vm_id).display().to_string());
    }
    if let Ok(mut rt) = rtnl::Rtnl::open() {
        if rt.index(&host_veth(vm_id)).is_ok() {
            v.push(format!("link {}", host_veth(vm_id)));
        }
    }
    v
}

/// How long a check waits for a namespace's devices to vanish after it is
/// unmounted. The kernel destroys namespaces asynchronously, on a shared
/// work queue: usually within milliseconds, later on a loaded host, so this
/// is a bound for "it goes by itself", not an expected time.
pub const NETNS_CLEANUP: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(root: &Path) -> NetConfig {
        NetConfig {
            pool: "10.213.0.0/29".parse().unwrap(),
            dns_upstream: "127.0.0.1:53".parse().unwrap(),
            host_nat: true,
            run_root: root.to_path_buf(),
            tag: "unit".into(),
            record_egress: false,
        }
    }

    #[test]
    fn slots_are_exclusive_skip_busy_addresses_and_run_out_clearly() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        assert_eq!(c.slot_count(), 2);
        assert_eq!(
            c.slot_addrs(1),
            (Ipv4Addr::new(10, 213, 0, 5), Ipv4Addr::new(10, 213, 0, 6))
        );
        // Slot 0's host end is still on a dying veth: slot 1 is taken.
        assert_eq!(lease_slot(&c, "a", &[c.slot_addrs(0).0]).unwrap(), 1);
        assert_eq!(lease_slot(&c, "b", &[]).unwrap(), 0);
        assert!(matches!(
            lease_slot(&c, "c", &[]),
            Err(NetError::PoolExhausted(_))
        ));
        assert!(c.slot_lease(1).ends_with("10.213.0.4"));
        let recs = slot_leases(&c.slots_dir());
        assert_eq!(recs.len(), 2);
        assert!(recs.iter().all(|(_, r)| r
            .as_ref()
            .is_some_and(|r| r.owner == Owner::me() && r.tag == "unit")));
    }

    #[test]
    fn resolv_conf_gives_the_first_ipv4_nameserver() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("resolv.conf");
        std::fs::write(
            &p,
            "# x\nnameserver fe80::1\nnameserver 10.255.255.53\nnameserver 1.1.1.1\n",
        )
        .unwrap();
        assert_eq!(
            resolv_conf_upstream(&p).unwrap(),
            "10.255.255.53:53".parse().unwrap()
        );
        std::fs::write(&p, "search example\n").unwrap();
        assert!(resolv_conf_upstream(&p)
            .unwrap_err()
            .to_string()
            .contains("--dns"));
    }
}
