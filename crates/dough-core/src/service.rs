//! **Where a task changes state** in the service: admission and scheduling,
//! one runner per admitted task (which drives the [`supervisor`]), cancel,
//! and recovery after a crash of the daemon.
//!
//! ```text
//! submit ─▶ queued ─(room)─▶ provisioning ─(VMM spawned)─▶ booting
//!   ─(task started)─▶ running ─(task ended)─▶ finalizing ─▶ succeeded | failed
//! any non-terminal ─▶ failed | cancelled | timed_out (with a reason)
//! ```
//! Every transition is written to the [`Store`] first, then broadcast to
//! subscribers (SSE). The VM's id and the resources it will own are recorded
//! before the supervisor creates them.
//!
//! [`supervisor`]: crate::supervisor
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dough_net::{Cidr, Egress};
use dough_proto::{ExitStatus, Stream};
use serde::Serialize;
use tokio::sync::{broadcast, oneshot, Notify};
use tracing::{info, warn};

use crate::pool::{ImageName, PoolConfig, PoolSettings, Pools, Shape};
use crate::store::{
    now_ms, Artifact, Claim, NodeCapacity, NodeRecord, NodeUse, Notice, State, Store, StoreError,
    TaskRecord, TaskRequest,
};
use crate::supervisor::{Event, Outcome, Phase, RunError, TaskSpec};
use crate::HostConfig;

/// What the host may hold at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Physical CPUs to schedule on.
    pub host_cpus: u32,
    /// vCPUs per physical CPU.
    pub overcommit: f64,
    /// Guest memory in total.
    pub memory_mib: u64,
    pub max_vms: u32,
}

impl Limits {
    /// This host: all CPUs with 4× overcommit, memory less 1 GiB, 32 VMs.
    pub fn for_host() -> Limits {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let mem = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| (kib / 1024).saturating_sub(1024))
            .unwrap_or(2048);
        Limits {
            host_cpus: cpus,
            overcommit: 4.0,
            memory_mib: mem,
            max_vms: 32,
        }
    }

    pub fn vcpu_capacity(&self) -> u32 {
        (self.host_cpus as f64 * self.overcommit).floor() as u32
    }
}

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub host: HostConfig,
    pub limits: Limits,
    pub heartbeat_timeout: Duration,
    pub boot_timeout: Duration,
    /// Cancel: SIGTERM, this long, then SIGKILL.
    pub cancel_grace: Duration,
    /// Stored output per task.
    pub output_cap: u64,
    /// Git and forge credentials (`DOUGH_GIT_TOKEN`, `DOUGH_FORGE_TOKEN`, …).
    pub creds: crate::repo::Credentials,
    /// The gate's rules for repository tasks.
    pub gate: crate::repo::GateConfig,
    /// Warm pools (see [`crate::pool`]); empty: every task boots its VM.
    pub pools: Vec<PoolConfig>,
    /// How often idle pooled VMs are checked.
    pub pool_check_every: Duration,
    /// Pools refill with snapshot clones (see [`crate::snapshot`]).
    pub pool_clones: bool,
    /// Tasks end at once, succeeded, without a VM (`dough serve
    /// --dry-run`, for `dough bench cluster`: the claims, states and
    /// store of real daemons, with no VM's cost).
    pub dry_run: bool,
    /// This daemon's name among nodes (`--node-name`; the hostname).
    pub node_name: String,
    /// A node silent this long is declared dead by its peers; a node that
    /// cannot reach the store for nearly as long stops its tasks
    /// ([`ServiceConfig::lease`]).
    pub node_timeout: Duration,
    /// Signs each finished task's provenance statement (None: no statement).
    pub signer: Option<Arc<crate::provenance::Signer>>,
}

impl ServiceConfig {
    pub fn new(host: HostConfig) -> ServiceConfig {
        ServiceConfig {
            host,
            limits: Limits::for_host(),
            heartbeat_timeout: Duration::from_secs(5),
            boot_timeout: Duration::from_secs(60),
            cancel_grace: Duration::from_secs(5),
            output_cap: 16 << 20,
            creds: crate::repo::Credentials::default(),
            gate: crate::repo::GateConfig::default(),
            pools: vec![],
            pool_check_every: Duration::from_millis(250),
            pool_clones: true,
            node_name: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into()),
            node_timeout: Duration::from_secs(10),
            dry_run: false,
            signer: None,
        }
    }

    /// How long this node keeps running its tasks without a heartbeat
    /// written: shorter than `node_timeout` (by 2 s, at most by half), so
    /// the node has stopped them before a peer can declare it dead.
    pub fn lease(&self) -> Duration {
        self.node_timeout
            .saturating_sub(Duration::from_secs(2))
            .max(self.node_timeout / 2)
    }
}

/// How long a task of a shape another node has a warm VM of is left to
/// that node (see `admit`).
const PREFER_WARM_MS: u64 = 3000;

/// Broadcast to subscribers of a task.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TaskEvent {
    State {
        state: State,
        at_ms: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
    },
    Output {
        stream: &'static str,
        /// Byte offset of this chunk in the task's output.
        offset: u64,
        data: String,
    },
}

impl TaskEvent {
    /// A task's current state, as an event.
    pub fn state_of(t: &TaskRecord) -> TaskEvent {
        TaskEvent::State {
            state: t.state,
            at_ms: t.transitions.last().map_or(t.created_ms, |x| x.at_ms),
            reason: t.reason.clone(),
            exit_code: t.exit_code,
        }
    }
}

/// Why a request was refused (the API maps these to 4xx).
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Impossible(String),
    #[error("no task {0}")]
    NotFound(String),
    #[error("task {0} is already {1}")]
    Finished(String, State),
    #[error("task {0} is {1}: only a finished task can be deleted (cancel it first)")]
    InFlight(String, State),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Counters for /metrics.
#[derive(Debug, Default, Clone)]
pub struct Usage {
    pub running_vms: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub submitted_total: u64,
    pub finished_total: u64,
    /// Room freed → next task provisioning, last samples (µs).
    pub sched_latency_us: Vec<u64>,
}

struct Inner {
    store: Arc<dyn Store>,
    cfg: ServiceConfig,
    usage: Mutex<Usage>,
    /// When room last freed up with tasks waiting.
    room_freed: Mutex<Option<Instant>>,
    wake: Notify,
    channels: Mutex<HashMap<String, broadcast::Sender<TaskEvent>>>,
    cancels: Mutex<HashMap<String, oneshot::Sender<i32>>>,
    stopping: std::sync::atomic::AtomicBool,
    pools: std::sync::OnceLock<Pools>,
    /// When this incarnation of the node started (ms since the epoch):
    /// renewed when the node finds it was declared dead.
    started_ms: std::sync::atomic::AtomicU64,
    /// Tasks this node gave up (its lease lapsed, or their claim was
    /// taken over), with why: they end `node_lost`.
    abandoned: Mutex<HashMap<String, String>>,
    /// The last heartbeat written.
    last_beat: Mutex<Instant>,
    /// A heartbeat is being written (the store may hang).
    beating: std::sync::atomic::AtomicBool,
    /// Drained (`dough node drain`): takes no new task.
    draining: std::sync::atomic::AtomicBool,
    /// Drains and resumes told by the store ([`Notice::Node`]) so far.
    drain_told: std::sync::atomic::AtomicU64,
    /// The VM of each task running here.
    vms: Mutex<HashMap<String, String>>,
    /// What this node's finished tasks did on the network, summed.
    egress: Mutex<EgressTotals>,
}

/// Egress records of this node's tasks, summed (the `dough_egress_*`
/// metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressTotals {
    /// Tasks with a record.
    pub tasks: u64,
    /// Connections let through.
    pub connections: u64,
    /// Packets refused.
    pub blocked: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub dns_answered: u64,
    pub dns_refused: u64,
    /// Connections, packets and questions counted past a record's bounds.
    pub overflow: u64,
    /// Kernel events lost (socket buffer overruns).
    pub lost_events: u64,
}

impl EgressTotals {
    pub fn add(&mut self, r: &dough_net::EgressRecord) {
        use dough_net::record::Verdict;
        self.tasks += 1;
        for f in &r.flows {
            match f.verdict {
                Verdict::Allowed => self.connections += f.count,
                Verdict::Blocked => self.blocked += f.count,
            }
            self.bytes_out += f.bytes_out;
            self.bytes_in += f.bytes_in;
        }
        for q in &r.dns {
            if q.allowed {
                self.dns_answered += q.count;
            } else {
                self.dns_refused += q.count;
            }
        }
        self.overflow += r.overflow.flows + r.overflow.dns;
        self.lost_events += r.lost_events;
    }
}

/// The service. Cheap to clone.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

/// What recovery did at start.
#[derive(Debug, Default)]
pub struct Recovery {
    pub failed: Vec<String>,
    pub requeued: Vec<String>,
    pub reclaimed: Vec<String>,
}

impl Service {
    /// Recover from a previous daemon's crash, then start scheduling. Must
    /// run inside a `tokio::task::LocalSet` (runners drive VMs on it).
    pub fn start(
        cfg: ServiceConfig,
        store: Arc<dyn Store>,
    ) -> Result<(Service, Recovery), StoreError> {
        let svc = Service {
            inner: Arc::new(Inner {
                store,
                cfg,
                usage: Mutex::new(Usage::default()),
                room_freed: Mutex::new(None),
                wake: Notify::new(),
                channels: Mutex::new(HashMap::new()),
                cancels: Mutex::new(HashMap::new()),
                stopping: std::sync::atomic::AtomicBool::new(false),
                pools: std::sync::OnceLock::new(),
                started_ms: now_ms().into(),
                abandoned: Mutex::new(HashMap::new()),
                last_beat: Mutex::new(Instant::now()),
                beating: false.into(),
                draining: false.into(),
                drain_told: 0.into(),
                vms: Mutex::new(HashMap::new()),
                egress: Mutex::default(),
            }),
        };
        let rec = svc.recover()?;
        if !svc.inner.cfg.pools.is_empty() {
            let cfg = &svc.inner.cfg;
            let weak = Arc::downgrade(&svc.inner);
            let pools = Pools::start(
                cfg.host.clone(),
                PoolSettings {
                    boot_timeout: cfg.boot_timeout,
                    heartbeat_timeout: cfg.heartbeat_timeout,
                    check_every: cfg.pool_check_every,
                    clones: cfg.pool_clones,
                },
                &cfg.pools,
                Box::new(move |shape| {
                    weak.upgrade()
                        .is_some_and(|inner| Service { inner }.room_for_pool(shape))
                }),
            );
            let _ = svc.inner.pools.set(pools);
        }
        if svc.beat("up")?.is_none() {
            // Only a dead incarnation with this very start time: a clock
            // step back. Come up as a new one.
            svc.inner.started_ms.store(now_ms() + 1, SeqCst);
            svc.beat("up")?;
        }
        let s = svc.clone();
        tokio::task::spawn_local(async move { s.schedule_loop().await });
        let s = svc.clone();
        tokio::task::spawn_local(async move { s.heartbeat_loop().await });
        if svc.inner.store.is_shared() {
            // The lease is watched from a thread of its own: it must act
            // even while the runtime waits on a store that hangs.
            let weak = Arc::downgrade(&svc.inner);
            std::thread::Builder::new()
                .name("dough-lease".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_millis(250));
                    let Some(inner) = weak.upgrade() else { return };
                    let s = Service { inner };
                    if s.inner.stopping.load(SeqCst) {
                        return;
                    }
                    s.check_lease();
                })
                .map_err(|e| StoreError::Corrupt(format!("start the lease thread: {e}")))?;
        }
        // A task queued on any node wakes this one's scheduler; a cancel
        // asked through another node, and this node's drain or resume,
        // reach it at once (the heartbeat round reads all three every
        // second too, for notices lost while the store's line was down).
        let weak = Arc::downgrade(&svc.inner);
        svc.inner.store.listen(Box::new(move |notice| {
            let Some(inner) = weak.upgrade() else {
                return false;
            };
            let s = Service { inner };
            match notice {
                Some(Notice::Queued) => s.inner.wake.notify_one(),
                Some(Notice::Cancel(node)) if node == s.inner.cfg.node_name => {
                    s.take_cancel_requests()
                }
                Some(Notice::Node(node, state)) if node == s.inner.cfg.node_name => {
                    // Drained or taken back: at once (a heartbeat that read
                    // the state before this does not have the last word).
                    s.inner.drain_told.fetch_add(1, SeqCst);
                    let draining = state == "draining";
                    if s.inner.draining.swap(draining, SeqCst) != draining {
                        info!(draining, "this node's drain changed");
                    }
                    s.inner.wake.notify_one();
                }
                _ => {}
            }
            !s.inner.stopping.load(SeqCst)
        }))?;
        // Tasks queued before this start (or re-queued just now) may run.
        svc.inner.wake.notify_one();
        Ok((svc, rec))
    }

    /// This node as the store records it: capacity, use, `state`, now.
    pub fn node_record(&self, state: &str) -> NodeRecord {
        let cfg = &self.inner.cfg;
        let u = self.usage();
        NodeRecord {
            name: cfg.node_name.clone(),
            state: state.into(),
            started_ms: self.inner.started_ms.load(SeqCst),
            heartbeat_ms: now_ms(),
            capacity: NodeCapacity {
                vcpus: cfg.limits.vcpu_capacity(),
                memory_mib: cfg.limits.memory_mib,
                vms: cfg.limits.max_vms,
                pools: cfg
                    .pools
                    .iter()
                    .map(|p| format!("{}={}", p.shape, p.size))
                    .collect(),
                images: self.images().iter().map(|i| i.name().to_string()).collect(),
            },
            usage: NodeUse {
                vms: u.running_vms,
                vcpus: u.vcpus,
                memory_mib: u.memory_mib,
                idle: self
                    .pools()
                    .map(|p| p.status())
                    .unwrap_or_default()
                    .iter()
                    .filter(|p| p.idle > 0)
                    .filter_map(|p| {
                        Some(
                            Shape {
                                vcpus: p.vcpus,
                                memory_mib: p.memory_mib,
                                image: ImageName::of(Some(&p.image)).ok()?,
                            }
                            .to_string(),
                        )
                    })
                    .collect(),
            },
        }
    }

    /// Record this node's state and use now; the state on record
    /// (`draining` once drained). `None`: this incarnation was declared
    /// dead by a peer (nothing written).
    pub fn beat(&self, state: &str) -> Result<Option<String>, StoreError> {
        self.inner.store.node_beat(&self.node_record(state))
    }

    /// Every second while the daemon admits work: the node's heartbeat,
    /// with its use; the lease check; a peer silent for `node_timeout`
    /// declared dead; cancels asked of this node by others.
    ///
    /// The store's calls run off the runtime's threads (listing the images
    /// reads their manifests; a store cut off may hang), one round at a
    /// time (the lease is watched from a thread of its own).
    async fn heartbeat_loop(self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.inner.stopping.load(SeqCst) {
                return;
            }
            if self.inner.beating.swap(true, SeqCst) {
                continue;
            }
            let s = self.clone();
            tokio::task::spawn_blocking(move || {
                s.tick();
                s.inner.beating.store(false, SeqCst);
            });
        }
    }

    /// Write this node's heartbeat, and take what the store answers: its
    /// drain, or that it was declared dead (blocking: the store is
    /// written; from the heartbeat round, one at a time).
    fn beat_now(&self) {
        let told = self.inner.drain_told.load(SeqCst);
        match self.beat("up") {
            Ok(Some(state)) => {
                *self.inner.last_beat.lock().unwrap() = Instant::now();
                let draining = state == "draining";
                // (A drain told meanwhile is newer than what this read.)
                if self.inner.drain_told.load(SeqCst) == told
                    && self.inner.draining.swap(draining, SeqCst) != draining
                {
                    info!(draining, "this node's drain changed");
                }
            }
            Ok(None) => {
                // Declared dead while alive (cut off from the store, or
                // stalled): its tasks are settled by the peer already.
                // Stop them, writing nothing, and come back as a new
                // incarnation.
                warn!(
                    node = %self.inner.cfg.node_name,
                    "this node was declared dead by a peer; stopping its tasks and rejoining"
                );
                self.abandon_all("this node was declared dead by a peer", false);
                self.inner.started_ms.store(now_ms(), SeqCst);
            }
            Err(e) => warn!(error = %e, "node heartbeat"),
        }
    }

    /// Cancel the tasks of this node whose cancel was asked through
    /// another node (blocking: the store is read).
    fn take_cancel_requests(&self) {
        match self.inner.store.cancel_requests(&self.inner.cfg.node_name) {
            Ok(ids) => {
                for id in ids {
                    if let Some(tx) = self.inner.cancels.lock().unwrap().remove(&id) {
                        info!(task = %id, "cancel asked through another node");
                        let _ = tx.send(nix::sys::signal::Signal::SIGTERM as i32);
                    }
                }
            }
            Err(e) => warn!(error = %e, "read cancel requests"),
        }
    }

    /// One round of [`Service::heartbeat_loop`], on a blocking thread:
    /// the heartbeat, cancels asked by peers (they are told at once as
    /// well: [`Store::listen`]), the reaping of dead peers.
    fn tick(&self) {
        let st = &self.inner.store;
        let shared = st.is_shared();
        if shared {
            self.take_cancel_requests();
        }
        self.beat_now();
        if !shared {
            return;
        }
        let timeout = self.inner.cfg.node_timeout.as_millis() as u64;
        match st.reap_dead_nodes(&self.inner.cfg.node_name, timeout) {
            Ok(reaped) => {
                for r in reaped {
                    warn!(
                        node = %r.node,
                        failed = ?r.failed,
                        requeued = ?r.requeued,
                        "declared a silent node dead"
                    );
                }
                self.inner.wake.notify_one();
            }
            Err(e) => warn!(error = %e, "reap dead nodes"),
        }
    }

    /// No heartbeat written for the lease: peers may declare this node
    /// dead at any moment, so its tasks stop now. (Watched only on a
    /// shared store: a single host's store that stalls has no peer to take
    /// over, and its tasks wait for it.)
    fn check_lease(&self) {
        let silent = self.inner.last_beat.lock().unwrap().elapsed();
        if silent > self.inner.cfg.lease() && !self.inner.cancels.lock().unwrap().is_empty() {
            warn!(
                silent_ms = silent.as_millis() as u64,
                "no heartbeat written for the lease; stopping this node's tasks"
            );
            let why = format!(
                "node {} could not reach the store for {} s and stopped the task",
                self.inner.cfg.node_name,
                silent.as_secs()
            );
            // The VMs' processes killed here, at once, not when the
            // runtime gets to it (it may be waiting on the store).
            self.abandon_all(&why, true);
        }
    }

    /// Stop every task of this node (SIGKILL), each to end `node_lost`
    /// with `why` — if its claim is still this node's. With `kill_vms`,
    /// their VMs' processes are killed from this thread too; the runners
    /// tear the rest down.
    fn abandon_all(&self, why: &str, kill_vms: bool) {
        let ids: Vec<String> = self.inner.cancels.lock().unwrap().keys().cloned().collect();
        for id in ids {
            self.abandon(&id, why);
            let vm = self.inner.vms.lock().unwrap().get(&id).cloned();
            if let Some(vm) = vm.filter(|_| kill_vms) {
                for pid in crate::rundir::processes_using(&self.inner.cfg.host.runs_dir().join(vm))
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }

    /// Stop task `id` (SIGKILL) to end `node_lost` with `why`.
    fn abandon(&self, id: &str, why: &str) {
        self.inner
            .abandoned
            .lock()
            .unwrap()
            .insert(id.to_string(), why.to_string());
        if let Some(tx) = self.inner.cancels.lock().unwrap().remove(id) {
            let _ = tx.send(nix::sys::signal::Signal::SIGKILL as i32);
        }
    }

    /// The warm pools, when configured.
    pub fn pools(&self) -> Option<&Pools> {
        self.inner.pools.get()
    }

    /// Whether a pool may boot one more VM of `shape`: no task is waiting
    /// and the host's limits hold it next to the tasks' VMs and every other
    /// pooled VM.
    fn room_for_pool(&self, shape: Shape) -> bool {
        if self.inner.stopping.load(SeqCst) || self.inner.draining.load(SeqCst) {
            return false;
        }
        if !matches!(self.inner.store.queued(1), Ok(q) if q.is_empty()) {
            return false;
        }
        let (rv, rm, rn) = self.pools().map_or((0, 0, 0), |p| p.reserved());
        let lim = self.inner.cfg.limits;
        let u = self.inner.usage.lock().unwrap();
        u.running_vms + rn < lim.max_vms
            && u.vcpus + rv + shape.vcpus <= lim.vcpu_capacity()
            && u.memory_mib + rm + shape.memory_mib as u64 <= lim.memory_mib
    }

    /// What this node's finished tasks did on the network, summed.
    pub fn egress_totals(&self) -> EgressTotals {
        self.inner.egress.lock().unwrap().clone()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.inner.cfg
    }

    pub fn usage(&self) -> Usage {
        self.inner.usage.lock().unwrap().clone()
    }

    /// Scheduler latency samples (µs), oldest first.
    pub fn sched_latency_us(&self) -> Vec<u64> {
        self.inner.usage.lock().unwrap().sched_latency_us.clone()
    }

    /// Tasks the previous daemon left in flight: their VMs' processes,
    /// namespaces, sockets and disks are reclaimed (by owner record: the old
    /// daemon is dead), then they fail with `orchestrator_restart`; tasks
    /// that never got to boot go back to the queue.
    fn recover(&self) -> Result<Recovery, StoreError> {
        let st = &self.inner.store;
        let mut r = Recovery::default();
        // Only this node's: in a cluster the others' tasks are theirs.
        let in_flight = self.in_flight_here()?;
        // Always: a dead daemon's pooled VMs belong to no task.
        let gc = crate::rundir::gc_host(&self.inner.cfg.host);
        r.reclaimed
            .extend(gc.removed.iter().map(|v| format!("vm {v}")));
        r.reclaimed
            .extend(gc.net.removed_netns.iter().map(|n| format!("netns {n}")));
        for e in &gc.errors {
            warn!(error = %e, "recovery: reclaim");
        }
        for t in in_flight {
            let cleanup = if gc.errors.is_empty() {
                "reclaimed after restart".to_string()
            } else {
                format!(
                    "reclaimed after restart, with errors: {}",
                    gc.errors.join("; ")
                )
            };
            st.clear_resources(&t.id, Some(t.epoch), &cleanup)?;
            if t.state == State::Provisioning {
                st.requeue(&t.id)?;
                r.requeued.push(t.id);
            } else {
                st.transition(
                    &t.id,
                    Some(t.epoch),
                    State::Failed,
                    Some("orchestrator_restart"),
                    Some("the daemon stopped while the task ran; its VM was reclaimed"),
                    None,
                )?;
                r.failed.push(t.id);
            }
        }
        info!(?r, "recovered");
        Ok(r)
    }

    /// Whether `t` was taken by this node: on a store of its own (SQLite)
    /// every task is; on a shared one, those it claimed.
    pub fn is_mine(&self, t: &TaskRecord) -> bool {
        !self.inner.store.is_shared()
            || !matches!(t.node.as_deref(), Some(n) if n != self.inner.cfg.node_name)
    }

    /// This node's tasks in flight.
    pub fn in_flight_here(&self) -> Result<Vec<TaskRecord>, StoreError> {
        Ok(self
            .inner
            .store
            .in_flight()?
            .into_iter()
            .filter(|t| self.is_mine(t))
            .collect())
    }

    /// Check and queue a task.
    pub fn submit(&self, req: TaskRequest) -> Result<TaskRecord, SubmitError> {
        let req = match &req.agent {
            Some(name) => {
                let (p, _) = crate::agents::find(&self.inner.cfg.host.state_dir, name)
                    .map_err(|e| SubmitError::Invalid(format!("agent: {e}")))?;
                with_agent(req, &p).map_err(SubmitError::Invalid)?
            }
            None if req.model_url.is_some() => {
                return Err(SubmitError::Invalid("model_url: needs an agent".into()))
            }
            None => req,
        };
        if self.inner.store.is_shared() {
            // In a cluster: what some node can run, not this one.
            match validate(&req, &self.inner.cfg.limits) {
                Err(SubmitError::Impossible(_)) => {}
                r => r?,
            }
            self.fits_some_node(&req)?;
        } else {
            validate(&req, &self.inner.cfg.limits)?;
            // The image must be here now, not only when the task runs.
            self.image_of(&req).map_err(SubmitError::Invalid)?;
        }
        let id = crate::new_id();
        let t = self.inner.store.insert(&id, &req)?;
        self.inner.usage.lock().unwrap().submitted_total += 1;
        self.inner.wake.notify_one();
        Ok(t)
    }

    /// In a cluster: some node on record (not dead) has the image `req`
    /// boots (else 400) and could ever hold it (else 422); the task then
    /// waits for room there.
    fn fits_some_node(&self, req: &TaskRequest) -> Result<(), SubmitError> {
        let image = req.image.as_deref().unwrap_or(dough_image::DEFAULT_IMAGE);
        dough_image::valid_name(image).map_err(|e| SubmitError::Invalid(format!("image: {e}")))?;
        let nodes: Vec<NodeRecord> = self
            .inner
            .store
            .nodes()?
            .into_iter()
            .filter(|n| n.state != "dead" && n.capacity.vms > 0)
            .collect();
        let with_image: Vec<&NodeRecord> = nodes
            .iter()
            .filter(|n| n.capacity.images.iter().any(|i| i == image))
            .collect();
        if with_image.is_empty() {
            let mut have: Vec<&str> = nodes
                .iter()
                .flat_map(|n| n.capacity.images.iter().map(String::as_str))
                .collect();
            have.sort();
            have.dedup();
            return Err(SubmitError::Invalid(format!(
                "image: no node of the cluster has image {image:?}; they have: {}",
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            )));
        }
        if with_image.iter().any(|n| {
            req.vcpus <= n.capacity.vcpus && req.memory_mib as u64 <= n.capacity.memory_mib
        }) {
            return Ok(());
        }
        let (v, m) = with_image.iter().fold((0, 0), |(v, m), n| {
            (v.max(n.capacity.vcpus), m.max(n.capacity.memory_mib))
        });
        Err(SubmitError::Impossible(format!(
            "no node of the cluster can ever run {} vCPUs with {} MiB of image {image:?} (the largest: {v} vCPUs, {m} MiB)",
            req.vcpus, req.memory_mib
        )))
    }

    /// The image `req` boots, loaded; the error says which images there are.
    pub fn image_of(&self, req: &TaskRequest) -> Result<dough_image::Image, String> {
        let host = &self.inner.cfg.host;
        let name = req.image.as_deref().unwrap_or(dough_image::DEFAULT_IMAGE);
        dough_image::valid_name(name).map_err(|e| format!("image: {e}"))?;
        let dir = if name == dough_image::DEFAULT_IMAGE {
            host.image_dir.clone()
        } else {
            dough_image::Image::named(&host.state_dir, name)
        };
        dough_image::Image::load(&dir).map_err(|e| {
            let have: Vec<String> = self.images().into_iter().map(|i| i.name()).collect();
            format!(
                "image: {name:?} is not usable on this daemon ({e}); it has: {}",
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            )
        })
    }

    /// The images this daemon can boot: `default` (its `--image-dir`) and
    /// the named images of its state directory.
    pub fn images(&self) -> Vec<dough_image::Image> {
        let host = &self.inner.cfg.host;
        let mut v: Vec<dough_image::Image> = dough_image::Image::load(&host.image_dir)
            .into_iter()
            .collect();
        v.extend(
            crate::imagebuild::list(&host.state_dir)
                .into_iter()
                .flatten()
                .filter(|i| i.name() != dough_image::DEFAULT_IMAGE),
        );
        v
    }

    /// A document kept for task `id` (its egress record, its provenance
    /// statement); None when it has none of that kind (yet).
    pub fn artifact(&self, id: &str, kind: Artifact) -> Result<Option<String>, SubmitError> {
        self.inner.store.artifact(id, kind).map_err(|e| match e {
            StoreError::NotFound(id) => SubmitError::NotFound(id),
            e => SubmitError::Store(e),
        })
    }

    /// Forget a finished task: its record, output, result and documents.
    pub fn delete(&self, id: &str) -> Result<(), SubmitError> {
        self.inner.store.delete(id).map_err(|e| match e {
            StoreError::NotFound(id) => SubmitError::NotFound(id),
            StoreError::InFlight { id, state } => SubmitError::InFlight(id, state),
            e => SubmitError::Store(e),
        })?;
        self.inner.channels.lock().unwrap().remove(id);
        Ok(())
    }

    /// The keys this node signs provenance statements with.
    pub fn public_keys(&self) -> Vec<crate::provenance::PublicKey> {
        self.inner.cfg.signer.iter().map(|s| s.public()).collect()
    }

    /// Cancel: a queued task ends at once; a running one gets SIGTERM, then
    /// SIGKILL after the grace period, then its VM is torn down.
    pub fn cancel(&self, id: &str) -> Result<TaskRecord, SubmitError> {
        let t = self.get(id)?;
        if t.state.is_terminal() {
            return Err(SubmitError::Finished(id.into(), t.state));
        }
        if let Some(tx) = self.inner.cancels.lock().unwrap().remove(id) {
            let _ = tx.send(nix::sys::signal::Signal::SIGTERM as i32);
            return self.get(id);
        }
        if t.state == State::Queued {
            match self.inner.store.transition(
                id,
                None,
                State::Cancelled,
                Some("cancelled"),
                Some("cancelled while queued"),
                None,
            ) {
                Ok(t) => {
                    self.publish_state(&t);
                    return Ok(t);
                }
                // Claimed in between: cancelled as a running task.
                Err(StoreError::BadTransition { .. }) => return self.cancel(id),
                Err(e) => return Err(e.into()),
            }
        }
        if !self.is_mine(&t) {
            // Another node's: it picks the request up within 250 ms.
            self.inner.store.request_cancel(id)?;
            return self.get(id);
        }
        // Being admitted right now: the runner picks the cancel up.
        self.get(id)
    }

    pub fn get(&self, id: &str) -> Result<TaskRecord, SubmitError> {
        self.inner.store.get(id).map_err(|e| match e {
            StoreError::NotFound(id) => SubmitError::NotFound(id),
            e => SubmitError::Store(e),
        })
    }

    /// Live events of a task (from now on).
    pub fn subscribe(&self, id: &str) -> broadcast::Receiver<TaskEvent> {
        self.inner
            .channels
            .lock()
            .unwrap()
            .entry(id.to_string())
            .or_insert_with(|| broadcast::channel(16).0)
            .subscribe()
    }

    /// Forget `id`'s channel if nobody listens (after a subscription to an
    /// unknown or finished task), so such requests leave nothing behind.
    pub fn release(&self, id: &str) {
        let mut ch = self.inner.channels.lock().unwrap();
        if ch.get(id).is_some_and(|tx| tx.receiver_count() == 0) {
            ch.remove(id);
        }
    }

    fn publish(&self, id: &str, ev: TaskEvent) {
        let ch = self.inner.channels.lock().unwrap();
        if let Some(tx) = ch.get(id) {
            let _ = tx.send(ev);
        }
    }

    fn publish_state(&self, t: &TaskRecord) {
        self.publish(&t.id, TaskEvent::state_of(t));
        if t.state.is_terminal() {
            // Subscribers see the final event, then the channel closes.
            self.inner.channels.lock().unwrap().remove(&t.id);
        }
    }

    /// A runner's transition, under its claim (`fence`): a claim taken
    /// over stops the task.
    fn transition(
        &self,
        id: &str,
        fence: u64,
        to: State,
        reason: Option<&str>,
        detail: Option<&str>,
        code: Option<i32>,
    ) {
        match self
            .inner
            .store
            .transition(id, Some(fence), to, reason, detail, code)
        {
            Ok(t) => self.publish_state(&t),
            Err(e @ StoreError::Fenced { .. }) => {
                warn!(task = id, error = %e, "stopping the task");
                self.abandon(id, &e.to_string());
            }
            Err(e) => warn!(task = id, error = %e, "transition"),
        }
    }

    /// Stop admitting; runners finish on their own.
    pub fn stop_admitting(&self) {
        self.inner
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Tear down every pooled VM (after [`Service::stop_admitting`]).
    pub async fn shutdown_pools(&self) -> Vec<String> {
        match self.pools() {
            Some(p) => p.shutdown().await,
            None => vec![],
        }
    }

    async fn schedule_loop(self) {
        loop {
            self.inner.wake.notified().await;
            if self
                .inner
                .stopping
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                continue;
            }
            if let Err(e) = self.admit().await {
                warn!(error = %e, "scheduler");
            }
        }
    }

    /// Start queued tasks, in order, while they fit. The head of the queue
    /// is never overtaken by a smaller task behind it.
    async fn admit(&self) -> Result<(), StoreError> {
        if self.inner.draining.load(SeqCst) {
            return Ok(());
        }
        let lim = self.inner.cfg.limits;
        // Only as many as could start: the queue may be long.
        let room = {
            let u = self.inner.usage.lock().unwrap();
            lim.max_vms.saturating_sub(u.running_vms) as usize
        };
        if room == 0 {
            return Ok(());
        }
        // In a cluster a task this node can never run (bigger than its
        // capacity, or an image it lacks) is another node's to take: it is
        // passed over, and the queue looked further into.
        let shared = self.inner.store.is_shared();
        let look = if shared { room + 16 } else { room };
        // The store's calls off the runtime's threads: a store that hangs
        // (a database cut off) must not stop the node's other work. The
        // head of the queue (the tasks no other node is claiming right
        // now) is read and claimed in one step: `pick` chooses, in order,
        // holding room for each (and a warm VM where one fits).
        type Ask = (TaskRecord, String, Option<crate::BootedVm>);
        let svc = self.clone();
        let picked = tokio::task::spawn_blocking(move || {
            let st = svc.inner.store.clone();
            let mut asks: Vec<Ask> = vec![];
            let mut lost_vms = vec![];
            let won = st.claim_next(&svc.inner.cfg.node_name, look, &mut |queue| {
                let (asks_, lost_) = svc.pick(queue, room, shared);
                asks = asks_;
                lost_vms = lost_;
                asks.iter().map(|(t, vm, _)| svc.claim_of(t, vm)).collect()
            });
            (won, asks, lost_vms)
        })
        .await;
        let (claimed, asks, lost_vms) = match picked {
            Ok(p) => p,
            Err(e) => return Err(StoreError::Corrupt(e.to_string())),
        };
        crate::pool::discard_later(lost_vms);
        let (mut won, failed) = match claimed {
            Ok(won) => (
                won.into_iter()
                    .map(|t| (t.id.clone(), t))
                    .collect::<HashMap<_, _>>(),
                None,
            ),
            Err(e) => (HashMap::new(), Some(e)),
        };
        let (asked, mut lost) = (asks.len(), 0);
        for (t, vm_id, warm) in asks {
            let Some(t) = won.remove(&t.id) else {
                // Another node took it, or it was cancelled, or this node
                // is drained: nothing was started, the room is given back.
                let mut u = self.inner.usage.lock().unwrap();
                u.running_vms = u.running_vms.saturating_sub(1);
                u.vcpus = u.vcpus.saturating_sub(t.request.vcpus);
                u.memory_mib = u.memory_mib.saturating_sub(t.request.memory_mib as u64);
                drop(u);
                tokio::task::spawn_local(discard(warm));
                lost += 1;
                continue;
            };
            self.inner
                .vms
                .lock()
                .unwrap()
                .insert(t.id.clone(), vm_id.clone());
            self.publish_state(&t);
            if let Some(freed) = self.inner.room_freed.lock().unwrap().take() {
                let mut u = self.inner.usage.lock().unwrap();
                if u.sched_latency_us.len() >= 10_000 {
                    u.sched_latency_us.remove(0);
                }
                u.sched_latency_us.push(freed.elapsed().as_micros() as u64);
            }
            let (tx, rx) = oneshot::channel();
            self.inner.cancels.lock().unwrap().insert(t.id.clone(), tx);
            let s = self.clone();
            tokio::task::spawn_local(async move { s.run(t, vm_id, warm, rx).await });
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if shared && asked > lost && asked < room {
            // It took some and has room left: the head it was shown may
            // have been short (tasks other nodes held at that moment, and
            // have left since), so it looks again until a look takes none.
            self.inner.wake.notify_one();
        } else if lost > 0 {
            // Some were not won (cancelled meanwhile, or this node drained
            // or declared dead): look again, further down the queue; when
            // none was won, after a pause, so a drained node does not
            // spin.
            let s = self.clone();
            tokio::task::spawn_local(async move {
                if lost == asked {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                s.inner.wake.notify_one();
            });
        }
        Ok(())
    }

    /// What this node takes of `queue` (the head, in run order): each task
    /// it can hold now, its room held (by a warm VM of its shape when it
    /// has one), with the VM it will run in; at most `room`. The head
    /// waits for room: nothing behind it overtakes. In a cluster (`shared`)
    /// a task this node can never run (bigger than its capacity, or an
    /// image it lacks) is passed over for another node, and so is one that
    /// fits another node's idle warm VM, for [`PREFER_WARM_MS`]. Also: warm
    /// VMs the pools found lost meanwhile, to discard. (Blocking: a peer's
    /// record may be read; runs on the store's thread, not the runtime's.)
    #[allow(clippy::type_complexity)]
    fn pick(
        &self,
        queue: &[TaskRecord],
        room: usize,
        shared: bool,
    ) -> (
        Vec<(TaskRecord, String, Option<crate::BootedVm>)>,
        Vec<crate::BootedVm>,
    ) {
        let lim = self.inner.cfg.limits;
        let (mut peers_idle, mut images) = (HashSet::new(), HashSet::new());
        if shared && !queue.is_empty() {
            // Shapes another live node has a warm VM of.
            match self.inner.store.nodes() {
                Ok(nodes) => {
                    peers_idle = nodes
                        .into_iter()
                        .filter(|n| n.name != self.inner.cfg.node_name && n.state == "up")
                        .flat_map(|n| n.usage.idle)
                        .collect()
                }
                Err(e) => warn!(error = %e, "read the nodes"),
            }
            // The images this node can boot (their manifests read once a
            // pass, not once a task).
            images = self.images().iter().map(|i| i.name()).collect();
        }
        let (mut asks, mut lost) = (vec![], vec![]);
        for t in queue {
            if asks.len() == room {
                break;
            }
            let (v, m) = (t.request.vcpus, t.request.memory_mib as u64);
            let image = t
                .request
                .image
                .as_deref()
                .unwrap_or(dough_image::DEFAULT_IMAGE);
            if shared && (v > lim.vcpu_capacity() || m > lim.memory_mib || !images.contains(image))
            {
                continue;
            }
            // A warm VM of the task's shape (image, vCPUs, memory): its
            // room is already counted.
            let shape = ImageName::of(t.request.image.as_deref())
                .ok()
                .map(|image| Shape {
                    vcpus: v,
                    memory_mib: m as u32,
                    image,
                });
            let warm = match (self.pools(), &shape) {
                (Some(p), Some(shape)) => {
                    let (got, gone) = p.take(*shape);
                    lost.extend(gone);
                    got
                }
                _ => None,
            };
            // No warm VM of its shape here but one on another node: that
            // node takes it (it starts without a boot) — unless it has not
            // for PREFER_WARM_MS, then anyone may.
            if warm.is_none()
                && !peers_idle.is_empty()
                && shape.is_some_and(|s| peers_idle.contains(&s.to_string()))
                && now_ms().saturating_sub(t.created_ms) < PREFER_WARM_MS
            {
                continue;
            }
            {
                let (rv, rm, rn) = self.pools().map_or((0, 0, 0), |p| p.reserved());
                let mut u = self.inner.usage.lock().unwrap();
                if warm.is_none()
                    && (u.running_vms + rn >= lim.max_vms
                        || u.vcpus + rv + v > lim.vcpu_capacity()
                        || u.memory_mib + rm + m > lim.memory_mib)
                {
                    break;
                }
                u.running_vms += 1;
                u.vcpus += v;
                u.memory_mib += m;
            }
            let vm_id = warm
                .as_ref()
                .map_or_else(crate::new_id, |vm| vm.vm_id().to_string());
            asks.push((t.clone(), vm_id, warm));
        }
        (asks, lost)
    }

    /// The claim of task `t` for VM `vm`: intent before action, the
    /// resources named by the VM id on record before anything exists.
    fn claim_of(&self, t: &TaskRecord, vm: &str) -> Claim {
        let run_dir = self.inner.cfg.host.runs_dir().join(vm);
        Claim {
            id: t.id.clone(),
            vm_id: vm.to_string(),
            resources: vec![
                ("vm".into(), vm.to_string()),
                ("run_dir".into(), run_dir.display().to_string()),
                (
                    "netns".into(),
                    dough_net::netns_path(vm).display().to_string(),
                ),
            ],
        }
    }

    /// Run one admitted task: in `warm` (a VM claimed from a pool) when
    /// given, else in a VM booted for it.
    async fn run(
        self,
        t: TaskRecord,
        vm_id: String,
        warm: Option<crate::BootedVm>,
        cancel: oneshot::Receiver<i32>,
    ) {
        let cfg = &self.inner.cfg;
        let r = &t.request;
        if cfg.dry_run {
            discard(warm).await;
            // Each state written off the runtime's thread, awaited: as a
            // runner awaits its VM between states, so the node's other
            // work (admission) goes on meanwhile.
            for to in [State::Booting, State::Running, State::Finalizing] {
                let (s, id, epoch) = (self.clone(), t.id.clone(), t.epoch);
                let _ = tokio::task::spawn_blocking(move || {
                    s.transition(&id, epoch, to, None, None, None)
                })
                .await;
            }
            drop(cancel);
            let detail = "no VM: the daemon runs with --dry-run";
            self.finish(&t, State::Succeeded, "dry_run", detail, Some(0), "ok");
            return;
        }
        let network = match egress_of(r) {
            Ok(e) => Some(e),
            Err(e) => {
                discard(warm).await;
                self.finish(&t, State::Failed, "invalid", &e, None, "ok");
                return;
            }
        };
        let mut env: Vec<(String, String)> =
            r.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for name in &r.secret_env {
            match std::env::var(name) {
                Ok(v) => env.push((name.clone(), v)),
                Err(_) => {
                    let m = format!("secret_env: {name} is not set in the daemon's environment");
                    discard(warm).await;
                    self.finish(&t, State::Failed, "invalid", &m, None, "ok");
                    return;
                }
            }
        }
        let image = match self.image_of(r) {
            Ok(i) => i,
            Err(e) => {
                discard(warm).await;
                self.finish(&t, State::Failed, "image", &e, None, "ok");
                return;
            }
        };
        // The provenance statement's facts known before the run.
        let attest = cfg.signer.clone().map(|signer| {
            let eg = network.clone().unwrap_or_default();
            let (hosts, cidrs) = match &eg {
                Egress::Allow { hosts, cidrs } => (
                    hosts.clone(),
                    cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                ),
                _ => (vec![], vec![]),
            };
            crate::provenance::Attestor {
                signer,
                facts: crate::provenance::Facts {
                    task_id: t.id.clone(),
                    node: cfg.node_name.clone(),
                    dough_version: env!("CARGO_PKG_VERSION").into(),
                    image_name: image.name(),
                    image_digest: image.manifest.digest.clone(),
                    command: r.command.clone(),
                    prompt_sha256: r
                        .prompt
                        .as_ref()
                        .map(|p| crate::provenance::sha256_hex(p.as_bytes())),
                    egress_policy: serde_json::json!({
                        "mode": eg.name(), "hosts": hosts, "cidrs": cidrs,
                    }),
                    ..Default::default()
                },
            }
        });
        // Output goes through a bounded queue to a thread of its own that
        // stores and publishes it: the store's writes never block the
        // runtime, and a slow store slows the guest (the supervisor stops
        // reading while the queue is full, and does not count that time as
        // the guest's silence) instead of failing the task.
        //
        // Output that cannot be stored (the state directory's disk full)
        // stops the task, as a cancel does, and it ends failed/state_full:
        // a run whose output is lost must not pass for a complete one.
        let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<(Stream, Vec<u8>)>(8);
        let offset = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let store_failed: Arc<Mutex<Option<StoreError>>> = Arc::default();
        let epoch = t.epoch;
        let record = {
            let (me, id, offset) = (self.clone(), t.id.clone(), offset.clone());
            let store_failed = store_failed.clone();
            move |stream: Stream, data: &[u8]| {
                let (n, name) = match stream {
                    Stream::Stdout => (1, "stdout"),
                    Stream::Stderr => (2, "stderr"),
                };
                let mut failed = store_failed.lock().unwrap();
                if failed.is_none() {
                    if let Err(e) = me.inner.store.append_output(
                        &id,
                        Some(epoch),
                        n,
                        data,
                        me.inner.cfg.output_cap,
                    ) {
                        warn!(task = %id, error = %e, "store output; stopping the task");
                        *failed = Some(e);
                        if let Some(tx) = me.inner.cancels.lock().unwrap().remove(&id) {
                            let _ = tx.send(nix::sys::signal::Signal::SIGTERM as i32);
                        }
                    }
                }
                drop(failed);
                let at = offset.fetch_add(data.len() as u64, std::sync::atomic::Ordering::SeqCst);
                me.publish(
                    &id,
                    TaskEvent::Output {
                        stream: name,
                        offset: at,
                        data: String::from_utf8_lossy(data).into_owned(),
                    },
                );
            }
        };
        let writer = {
            let record = record.clone();
            tokio::task::spawn_blocking(move || {
                while let Some((stream, data)) = out_rx.blocking_recv() {
                    record(stream, &data);
                }
            })
        };
        let spec = TaskSpec {
            output: Some(out_tx),
            image: Some(image),
            task_id: t.id.clone(),
            command: r.command.clone(),
            env,
            prompt: r.prompt.clone(),
            root: r.root,
            workdir: r.workdir.clone(),
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
            timeout: r.timeout_secs.map(Duration::from_secs),
            boot_timeout: cfg.boot_timeout,
            heartbeat_timeout: cfg.heartbeat_timeout,
            network,
            vm_id: Some(vm_id),
            cancel_grace: cfg.cancel_grace,
            ..TaskSpec::default()
        };
        let id = t.id.clone();
        let me = self.clone();
        let mut on_event = move |ev: Event<'_>| match ev {
            Event::Phase(Phase::Spawned, _) => {
                me.transition(&id, epoch, State::Booting, None, None, None)
            }
            Event::Phase(Phase::Started, _) => {
                me.transition(&id, epoch, State::Running, None, None, None)
            }
            Event::Phase(Phase::Done, _) => {
                me.transition(&id, epoch, State::Finalizing, None, None, None)
            }
            Event::Phase(..) => {}
            Event::Progress(p) => tracing::debug!(task = %id, "{p}"),
            // Only without a sink (the spec above has one).
            Event::Output(stream, data) => record(stream, data),
        };
        // A dropped sender means the task is never cancelled.
        let cancelled = async move {
            match cancel.await {
                Ok(sig) => sig,
                Err(_) => std::future::pending().await,
            }
        };
        // The pool is empty: a clone of its template instead of a boot.
        let shape = ImageName::of(r.image.as_deref()).ok().map(|image| Shape {
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
            image,
        });
        let template = shape.and_then(|shape| self.pools()?.template(shape));
        let warm = match (warm, template) {
            (Some(vm), _) => {
                // Booted already: claimed from a pool.
                self.transition(&t.id, epoch, State::Booting, None, None, None);
                Some(vm)
            }
            (None, Some(tpl)) => {
                self.transition(&t.id, epoch, State::Booting, None, None, None);
                // The clone takes the VM id on record.
                match crate::snapshot::clone_vm(&cfg.host, &tpl, &spec).await {
                    Ok(vm) => Some(vm),
                    Err(e) => {
                        warn!(task = %t.id, error = %e, "snapshot clone failed; booting instead");
                        if let (Some(p), Some(shape)) = (self.pools(), shape) {
                            p.template_failed(shape, &e.to_string());
                        }
                        None
                    }
                }
            }
            (None, None) => None,
        };

        let (rep, work) = match &r.repo {
            None => {
                let rep =
                    crate::run_task_in(&cfg.host, &spec, warm, &mut on_event, cancelled).await;
                drop(spec);
                (rep, None)
            }
            Some(repo) => {
                let mut gate = cfg.gate.clone();
                let pr = r.pull_request.clone().unwrap_or_default();
                gate.allow_protected |= pr.allow_protected;
                if self.inner.store.is_shared() {
                    // No push or pull request from a node that lost the
                    // claim: its lease lapsed, or a peer took the task over.
                    let (me, id) = (self.clone(), t.id.clone());
                    gate.claim = crate::repo::ClaimCheck::new(move || {
                        if me.inner.last_beat.lock().unwrap().elapsed() > me.inner.cfg.lease() {
                            return Err("this node's lease lapsed (no heartbeat written)".into());
                        }
                        match me.inner.store.get(&id) {
                            Ok(t) if t.epoch == epoch && !t.state.is_terminal() => Ok(()),
                            Ok(_) => Err("the task's claim was taken over".into()),
                            Err(e) => Err(format!("the task's claim cannot be checked: {e}")),
                        }
                    });
                }
                let run = crate::repo::run(
                    &cfg.host,
                    spec,
                    repo,
                    &pr,
                    &cfg.creds,
                    &gate,
                    warm,
                    &mut on_event,
                    cancelled,
                    attest.clone(),
                )
                .await;
                match run.split() {
                    Ok(parts) => parts,
                    Err(e) => {
                        let _ = writer.await;
                        self.finish(&t, State::Failed, &e.reason(), &error_chain(&e), None, "ok");
                        return;
                    }
                }
            }
        };
        // Every byte the guest sent is stored before the task's end is.
        drop(on_event);
        if let Err(e) = writer.await {
            warn!(task = %t.id, error = %e, "output writer");
        }
        if let Some(img) = &rep.image {
            if let Err(e) = self
                .inner
                .store
                .set_image_digest(&t.id, Some(epoch), &img.digest)
            {
                warn!(task = %t.id, error = %e, "store image digest");
            }
        }
        let cleanup = if rep.teardown_errors.is_empty() {
            "ok".to_string()
        } else {
            rep.teardown_errors.join("; ")
        };
        if let Some(rec) = &rep.egress {
            self.inner.egress.lock().unwrap().add(rec);
            let body = serde_json::to_string(rec).expect("a record serializes");
            if let Err(e) =
                self.inner
                    .store
                    .put_artifact(&t.id, Some(epoch), Artifact::Egress, &body)
            {
                warn!(task = %t.id, error = %e, "store the egress record");
            }
        }
        // Signed before the pull request (its body has the digest), or not yet.
        let mut signed = None;
        let mut repo_facts = None;
        let work_failed = match work {
            Some(Ok(mut fin)) => {
                signed = fin.provenance.take();
                repo_facts = Some(crate::provenance::RepoFacts {
                    url: r.repo.as_ref().map(|x| x.url.clone()).unwrap_or_default(),
                    base_branch: fin.base.clone(),
                    base_commit: fin.base_commit.clone(),
                    branch: fin.branch.clone(),
                    commits: fin.commits.iter().map(|c| c.sha.clone()).collect(),
                    bundle_sha256: None,
                });
                if let Err(e) = self.inner.store.set_result(&t.id, Some(epoch), &fin) {
                    warn!(task = %t.id, error = %e, "store result");
                }
                None
            }
            Some(Err(e)) => Some(e),
            None => None,
        };
        // The run's facts (a snapshot clone reports no image: the one its
        // task asked for stays, without a kernel named).
        let mut attest = attest;
        if let Some(a) = attest.as_mut() {
            a.ran(&rep);
        }
        let store_failed = store_failed.lock().unwrap().take();
        let abandoned = self.inner.abandoned.lock().unwrap().remove(&t.id);
        let (state, reason, detail, code) = match rep.result {
            _ if abandoned.is_some() => (
                State::Failed,
                "node_lost".into(),
                abandoned.expect("checked"),
                None,
            ),
            _ if store_failed.is_some() => {
                let e = store_failed.expect("checked");
                (
                    State::Failed,
                    if e.is_full() {
                        "state_full"
                    } else {
                        "store_error"
                    }
                    .into(),
                    format!("the task's output could not be stored, so it was stopped: {e}"),
                    None,
                )
            }
            _ if work_failed.is_some() => {
                let e = work_failed.expect("checked");
                let code = match rep.result {
                    Ok(Outcome::Exited(st)) => Some(st.shell_code()),
                    _ => None,
                };
                (State::Failed, e.reason(), error_chain(&e), code)
            }
            Ok(Outcome::CloneFailed(m)) => (State::Failed, "clone_failed".into(), m, None),
            Ok(Outcome::Exited(st)) => {
                let code = st.shell_code();
                let ok = matches!(st, ExitStatus::Code(0));
                (
                    if ok { State::Succeeded } else { State::Failed },
                    "exit_code".into(),
                    format!("the command exited with {code}"),
                    Some(code),
                )
            }
            Ok(Outcome::OutOfMemory(st)) => (
                State::Failed,
                "oom".into(),
                format!("the guest ran out of memory ({} MiB)", r.memory_mib),
                Some(st.shell_code()),
            ),
            Ok(Outcome::SpawnFailed(m)) => (State::Failed, "spawn_failed".into(), m, Some(127)),
            Ok(Outcome::TimedOut(d)) => (
                State::TimedOut,
                "timeout".into(),
                format!("killed after {} s", d.as_secs()),
                None,
            ),
            Ok(Outcome::Cancelled(_)) => (
                State::Cancelled,
                "cancelled".into(),
                "cancelled by request".into(),
                None,
            ),
            Err(e) => {
                let reason = match &e {
                    RunError::BootTimeout { .. } => "boot_timeout",
                    RunError::AgentLost { reason, .. } if reason.starts_with("no heartbeat") => {
                        "heartbeat_lost"
                    }
                    RunError::AgentLost { .. } => "agent_lost",
                    RunError::VmmExited { .. } => "vmm_exited",
                    RunError::Protocol(_) => "protocol_error",
                    RunError::Net(_) => "network_setup",
                    RunError::Image(_) => "image",
                    _ => "vmm_error",
                };
                (State::Failed, reason.into(), error_chain(&e), None)
            }
        };
        // The provenance statement, signed, kept with the task.
        // Not for a task this node gave up: its claim is gone.
        if let Some(mut a) = attest.filter(|_| reason != "node_lost") {
            let envelope = match signed {
                Some(env) => env,
                None => {
                    a.facts.repo = repo_facts;
                    a.facts.outcome = serde_json::json!({
                        "state": state.as_str(), "reason": reason, "exit_code": code,
                    });
                    let (store, id) = (self.inner.store.clone(), t.id.clone());
                    // The stored output as `GET /logs` gives it, a page at
                    // a time (never the whole output in memory).
                    a.facts.output_sha256 = tokio::task::spawn_blocking(move || {
                        let mut h = <sha2::Sha256 as sha2::Digest>::new();
                        let mut from = 0u64;
                        loop {
                            let page = store.output_from(&id, from, 256 << 10).ok()?;
                            if page.is_empty() {
                                break;
                            }
                            for (_, at, data) in page {
                                from = at + data.len() as u64;
                                sha2::Digest::update(&mut h, &data);
                            }
                        }
                        Some(hex::encode(sha2::Digest::finalize(h)))
                    })
                    .await
                    .ok()
                    .flatten();
                    a.sign()
                }
            };
            let body = serde_json::to_string(&envelope).expect("an envelope serializes");
            if let Err(e) =
                self.inner
                    .store
                    .put_artifact(&t.id, Some(epoch), Artifact::Provenance, &body)
            {
                warn!(task = %t.id, error = %e, "store the provenance statement");
            }
        }
        self.finish(&t, state, &reason, &detail, code, &cleanup);
    }

    fn finish(
        &self,
        t: &TaskRecord,
        state: State,
        reason: &str,
        detail: &str,
        code: Option<i32>,
        cleanup: &str,
    ) {
        self.inner.cancels.lock().unwrap().remove(&t.id);
        self.inner.vms.lock().unwrap().remove(&t.id);
        // (Given up after its runner looked: nothing is left to stop.)
        self.inner.abandoned.lock().unwrap().remove(&t.id);
        self.settle(&t.id, t.epoch, state, reason, detail, code, cleanup);
        {
            let mut u = self.inner.usage.lock().unwrap();
            u.running_vms = u.running_vms.saturating_sub(1);
            u.vcpus = u.vcpus.saturating_sub(t.request.vcpus);
            u.memory_mib = u.memory_mib.saturating_sub(t.request.memory_mib as u64);
            u.finished_total += 1;
        }
        *self.inner.room_freed.lock().unwrap() = Some(Instant::now());
        self.inner.wake.notify_one();
        if let Some(p) = self.pools() {
            p.nudge();
        }
    }
}

impl Service {
    /// Record a task's end (its resources released, its final state),
    /// under its claim (`epoch`). While the store cannot be written (the
    /// state directory's disk full, the database unreachable) this is
    /// tried again every second: the end is late, never lost. A restart
    /// in between ends the task as orchestrator_restart; a claim taken
    /// over in between (this node declared dead) writes nothing.
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &self,
        id: &str,
        epoch: u64,
        state: State,
        reason: &str,
        detail: &str,
        code: Option<i32>,
        cleanup: &str,
    ) {
        let task = id.to_string();
        let (id, reason, detail, cleanup) = (
            id.to_string(),
            reason.to_string(),
            detail.to_string(),
            cleanup.to_string(),
        );
        let attempt = move |s: &Service| -> Result<TaskRecord, StoreError> {
            s.inner.store.clear_resources(&id, Some(epoch), &cleanup)?;
            s.inner
                .store
                .transition(&id, Some(epoch), state, Some(&reason), Some(&detail), code)
        };
        let who = task.clone();
        let done = move |s: &Service, r: Result<TaskRecord, StoreError>| -> bool {
            match r {
                Ok(t) => {
                    s.publish_state(&t);
                    true
                }
                Err(e) if e.is_transient() => false,
                Err(e) => {
                    warn!(task = %who, error = %e, "record a task's end");
                    // Its end as the store has it (a peer's node_lost).
                    if let StoreError::Fenced { id, .. } = &e {
                        if let Ok(t) = s.inner.store.get(id) {
                            s.publish_state(&t);
                        }
                    }
                    true
                }
            }
        };
        if done(self, attempt(self)) {
            return;
        }
        warn!(task = %task, "record a task's end: the store cannot be written; trying again every second");
        let s = self.clone();
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let (s2, attempt) = (s.clone(), attempt.clone());
                let r = tokio::task::spawn_blocking(move || attempt(&s2))
                    .await
                    .unwrap_or_else(|e| Err(StoreError::Corrupt(e.to_string())));
                if done(&s, r) {
                    info!(task = %task, "recorded a task's end");
                    break;
                }
            }
        });
    }
}

/// Tear down a claimed VM its task will not use.
async fn discard(vm: Option<crate::BootedVm>) {
    if let Some(vm) = vm {
        for e in vm.discard().await {
            warn!(error = %e, "discard a claimed vm");
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

fn egress_of(r: &TaskRequest) -> Result<Egress, String> {
    let cidrs = r
        .allow_cidrs
        .iter()
        .map(|c| c.parse::<Cidr>())
        .collect::<Result<Vec<_>, _>>()?;
    Egress::from_flags(r.egress.as_deref(), r.allow_hosts.clone(), cidrs)
}

/// `r` with what its agent preset gives and `r` leaves out: the image, the
/// command, variables (the model API's address among them), secrets, the
/// allowlist (when `r` sets no egress), and resources left at their
/// defaults.
pub fn with_agent(mut r: TaskRequest, p: &crate::agents::Preset) -> Result<TaskRequest, String> {
    let crate::agents::TaskNetwork { env, hosts, cidrs } = p
        .task_network(r.model_url.as_deref())
        .map_err(|e| format!("agent: {e}"))?;
    r.image.get_or_insert_with(|| p.image.name.clone());
    if r.command.is_empty() {
        r.command = p.task.command.clone();
    }
    for (k, v) in env {
        r.env.entry(k).or_insert(v);
    }
    for s in &p.task.secret_env {
        if !r.secret_env.contains(s) {
            r.secret_env.push(s.clone());
        }
    }
    if r.egress.is_none() && r.allow_hosts.is_empty() && r.allow_cidrs.is_empty() {
        r.egress = Some("allowlist".into());
        r.allow_hosts = hosts;
        r.allow_cidrs = cidrs.iter().map(|c| c.to_string()).collect();
    }
    if r.vcpus == one() {
        r.vcpus = p.task.vcpus.unwrap_or(r.vcpus);
    }
    if r.memory_mib == crate::store::DEFAULT_MEMORY_MIB {
        r.memory_mib = p.task.memory_mib.unwrap_or(r.memory_mib);
    }
    r.timeout_secs = r.timeout_secs.or(p.task.timeout_secs);
    Ok(r)
}

fn one() -> u32 {
    1
}

/// Everything wrong with a request, before it is queued.
pub fn validate(r: &TaskRequest, lim: &Limits) -> Result<(), SubmitError> {
    let bad = |m: String| Err(SubmitError::Invalid(m));
    if r.command.is_empty() || r.command[0].is_empty() {
        return bad("command: must name a program (a non-empty array of strings)".into());
    }
    if r.command.iter().any(|a| a.contains('\0')) {
        return bad("command: arguments may not contain NUL".into());
    }
    for (k, v) in &r.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return bad(format!("env: '{k}' is not a valid variable name"));
        }
    }
    if !(1..=64).contains(&r.vcpus) {
        return bad(format!("vcpus: must be 1..=64, not {}", r.vcpus));
    }
    if !(128..=262_144).contains(&r.memory_mib) {
        return bad(format!(
            "memory_mib: must be 128..=262144, not {}",
            r.memory_mib
        ));
    }
    if r.timeout_secs == Some(0) {
        return bad("timeout_secs: must be at least 1".into());
    }
    if let Err(e) = egress_of(r) {
        return bad(format!("egress: {e}"));
    }
    if r.repo.is_some() && r.egress.as_deref() == Some("none") {
        return bad(
            "repo: needs the VM's network (the guest clones over it); egress `none` has none"
                .into(),
        );
    }
    match (&r.repo, &r.pull_request) {
        (Some(repo), _) => {
            if let Err(e) = crate::repo::validate(repo) {
                return bad(format!("repo: {e}"));
            }
        }
        (None, Some(_)) => return bad("pull_request: needs a repo".into()),
        (None, None) => {}
    }
    if let Some(Err(e)) = r
        .pull_request
        .as_ref()
        .map(crate::repo::validate_pull_request)
    {
        return bad(format!("pull_request: {e}"));
    }
    for name in &r.secret_env {
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return bad(format!("secret_env: {name:?} is not a variable name"));
        }
        if name.starts_with("DOUGH_") {
            return bad(format!(
                "secret_env: {name} is one of Dough's own settings and never goes to a task"
            ));
        }
        if std::env::var_os(name).is_none() {
            return bad(format!(
                "secret_env: {name} is not set in the daemon's environment"
            ));
        }
    }
    if r.vcpus > lim.vcpu_capacity() {
        return Err(SubmitError::Impossible(format!(
            "vcpus: {} exceeds what this host can ever run ({})",
            r.vcpus,
            lim.vcpu_capacity()
        )));
    }
    if r.memory_mib as u64 > lim.memory_mib {
        return Err(SubmitError::Impossible(format!(
            "memory_mib: {} exceeds what this host can ever give ({})",
            r.memory_mib, lim.memory_mib
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    fn req() -> TaskRequest {
        serde_json::from_str(r#"{"command": ["true"]}"#).unwrap()
    }

    /// A preset fills in what the request leaves out, and only that.
    #[test]
    fn an_agent_fills_in_what_the_request_leaves_out() {
        let (p, _) =
            crate::agents::find(std::path::Path::new("/nonexistent"), "claude-code").unwrap();
        let bare: TaskRequest = serde_json::from_str(
            r#"{"agent": "claude-code", "model_url": "http://198.51.100.7:8080"}"#,
        )
        .unwrap();
        let r = with_agent(bare, &p).unwrap();
        assert_eq!(r.image.as_deref(), Some("agent-claude-code"));
        assert_eq!(r.command, p.task.command);
        assert_eq!(r.secret_env, ["ANTHROPIC_API_KEY"]);
        assert_eq!(r.env["ANTHROPIC_BASE_URL"], "http://198.51.100.7:8080");
        assert_eq!(r.egress.as_deref(), Some("allowlist"));
        assert_eq!(r.allow_cidrs, ["198.51.100.7/32"]);
        assert_eq!(
            (r.vcpus, r.memory_mib, r.timeout_secs),
            (2, 2048, Some(1800))
        );
        let mine: TaskRequest = serde_json::from_str(
            r#"{"agent": "claude-code", "command": ["my-claude"], "image": "mine", "vcpus": 4,
                "memory_mib": 1024, "egress": "open", "env": {"ANTHROPIC_BASE_URL": "http://x"}}"#,
        )
        .unwrap();
        let r = with_agent(mine, &p).unwrap();
        assert_eq!(r.command, ["my-claude"]);
        assert_eq!(r.image.as_deref(), Some("mine"));
        assert_eq!((r.vcpus, r.memory_mib), (4, 1024));
        assert_eq!(r.egress.as_deref(), Some("open"));
        assert!(r.allow_hosts.is_empty());
        assert_eq!(r.env["ANTHROPIC_BASE_URL"], "http://x");
    }

    /// Recovery without VMs: what the store says was in flight is failed
    /// or re-queued, and nothing new starts while admission is closed.
    #[test]
    fn recovery_fails_booted_tasks_and_requeues_unbooted_ones() {
        let d = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&d.path().join("db")).unwrap());
        store.insert("prov", &req()).unwrap();
        store
            .transition("prov", None, State::Provisioning, None, None, None)
            .unwrap();
        store.insert("boot", &req()).unwrap();
        store
            .claim("boot", "n", "0123456789ab", &[("vm", "0123456789ab")])
            .unwrap()
            .unwrap();
        store
            .transition("boot", None, State::Booting, None, None, None)
            .unwrap();
        store.insert("wait", &req()).unwrap();
        let mut cfg = ServiceConfig::new(HostConfig::new(
            Some(d.path().to_path_buf()),
            None,
            Default::default(),
        ));
        cfg.limits.max_vms = 0;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        let rec = local.block_on(&rt, async { Service::start(cfg, store.clone()).unwrap().1 });
        assert_eq!(rec.requeued, ["prov"]);
        assert_eq!(rec.failed, ["boot"]);
        let b = store.get("boot").unwrap();
        assert_eq!(
            (b.state, b.reason.as_deref()),
            (State::Failed, Some("orchestrator_restart"))
        );
        assert!(store.resources("boot").unwrap().is_empty());
        assert_eq!(store.get("prov").unwrap().state, State::Queued);
        assert_eq!(store.queued(100).unwrap().len(), 2);
    }

    #[test]
    fn validation_names_the_field() {
        let lim = Limits {
            host_cpus: 2,
            overcommit: 2.0,
            memory_mib: 4096,
            max_vms: 4,
        };
        let mut r = req();
        assert!(validate(&r, &lim).is_ok());
        r.vcpus = 5;
        assert!(
            matches!(validate(&r, &lim), Err(SubmitError::Impossible(m)) if m.contains("vcpus"))
        );
        r.vcpus = 1;
        r.env.insert("A=B".into(), "x".into());
        assert!(matches!(validate(&r, &lim), Err(SubmitError::Invalid(m)) if m.contains("env")));
    }
}
