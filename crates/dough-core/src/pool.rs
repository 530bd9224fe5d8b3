//! **Where warm VMs wait for tasks.** A pool per shape (image × vCPUs ×
//! memory) keeps N VMs booted to Hello, idle, with egress `none`.
//! A task of that shape claims one (the supervisor then applies the task's
//! egress policy in one nftables transaction and sends Assign), and the pool
//! boots a replacement in the background.
//!
//! ```text
//! boot (supervisor::boot_idle) ─▶ idle ─(claim)─▶ the task's VM
//!                                   └─(heartbeat lost / VMM gone)─▶ discarded, replaced
//! shutdown: stop refilling ─▶ discard every idle VM ─▶ wait for boots in flight
//! ```
//! Every VM has the same guest address behind its own namespace, so pooled
//! VMs are interchangeable. Idle and booting VMs count against the host's
//! limits (the service asks [`Pools::reserved`]); a pool refills only while
//! there is room and no task is waiting for it.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::snapshot::{clone_vm, make_template, Template};
use crate::supervisor::{boot_idle, BootedVm, TaskSpec};
use crate::HostConfig;

/// An image's name, held inline (names are at most 63 bytes:
/// [`dough_image::valid_name`]) so a [`Shape`] stays `Copy`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageName {
    len: u8,
    bytes: [u8; 63],
}

impl ImageName {
    pub fn new(name: &str) -> Result<ImageName, String> {
        dough_image::valid_name(name).map_err(|e| e.to_string())?;
        let mut bytes = [0u8; 63];
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        Ok(ImageName {
            len: name.len() as u8,
            bytes,
        })
    }

    /// The image a task without `image` boots.
    pub fn default_image() -> ImageName {
        ImageName::new(dough_image::DEFAULT_IMAGE).expect("a valid name")
    }

    /// A task's image (`None`: the default).
    pub fn of(image: Option<&str>) -> Result<ImageName, String> {
        ImageName::new(image.unwrap_or(dough_image::DEFAULT_IMAGE))
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or_default()
    }

    pub fn is_default(&self) -> bool {
        self.as_str() == dough_image::DEFAULT_IMAGE
    }
}

impl Default for ImageName {
    fn default() -> Self {
        Self::default_image()
    }
}

impl std::fmt::Debug for ImageName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl std::fmt::Display for ImageName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ImageName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The shape of a pool's VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Shape {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub image: ImageName,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.image.is_default() {
            write!(f, "{}x{}", self.vcpus, self.memory_mib)
        } else {
            write!(f, "{}:{}x{}", self.image, self.vcpus, self.memory_mib)
        }
    }
}

impl std::str::FromStr for Shape {
    type Err = String;
    /// `[IMAGE:]VCPUSxMIB`, e.g. `2x1024` or `py:2x1024`.
    fn from_str(s: &str) -> Result<Shape, String> {
        let bad = || {
            format!("'{s}' is not a pool shape: give [IMAGE:]VCPUSxMEMORY_MIB, like 2x1024 or py:2x1024")
        };
        let (image, s) = match s.split_once(':') {
            Some((i, rest)) => (
                ImageName::new(i).map_err(|e| format!("pool shape: {e}"))?,
                rest,
            ),
            None => (ImageName::default_image(), s),
        };
        let (v, m) = s.split_once(['x', 'X']).ok_or_else(bad)?;
        let vcpus: u32 = v.trim().parse().map_err(|_| bad())?;
        let memory_mib: u32 = m.trim().parse().map_err(|_| bad())?;
        if vcpus == 0 || memory_mib < 64 {
            return Err(format!(
                "pool shape '{s}': at least 1 vCPU and 64 MiB of memory"
            ));
        }
        Ok(Shape {
            vcpus,
            memory_mib,
            image,
        })
    }
}

/// One pool's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    pub shape: Shape,
    /// Idle VMs to keep (0: none, the pool only reports).
    pub size: usize,
}

/// Settings shared by every pool.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub boot_timeout: Duration,
    /// An idle VM silent this long is replaced.
    pub heartbeat_timeout: Duration,
    /// How often idle VMs are checked.
    pub check_every: Duration,
    /// Refill with clones of a snapshot template (one per pool) instead of
    /// cold boots, and clone for tasks that find the pool empty. A pool
    /// whose template or clone fails goes back to cold boots.
    pub clones: bool,
}

/// A pool as `dough ls --pools` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PoolStatus {
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub size: usize,
    pub idle: usize,
    pub booting: usize,
    /// Since start: VMs handed to tasks, VMs replaced because they were
    /// lost while idle, boots that failed.
    pub claimed: u64,
    pub replaced: u64,
    pub boot_failures: u64,
    /// How the pool refills: "clone" (of `template`) or "cold boot".
    pub refill: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub vms: Vec<IdleVm>,
}

/// An idle VM in a pool.
#[derive(Debug, Clone, Serialize)]
pub struct IdleVm {
    pub vm_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmm_pid: Option<u32>,
    pub idle_ms: u64,
}

struct Pool {
    cfg: PoolConfig,
    idle: VecDeque<BootedVm>,
    booting: usize,
    claimed: u64,
    replaced: u64,
    boot_failures: u64,
    /// Consecutive failed boots: refilling backs off.
    failing: u32,
    retry_at: Option<Instant>,
    last_error: Option<String>,
    template: TemplateState,
}

enum TemplateState {
    /// Not wanted (clones off) or given up on: cold boots.
    Off,
    /// To be made by the next maintenance pass.
    Wanted,
    Making,
    Ready(Arc<Template>),
}

impl Pool {
    /// Take out the idle VMs that are lost (see [`BootedVm::check`]),
    /// counted as replaced; the pool refills behind them.
    fn sweep(&mut self, heartbeat_timeout: Duration) -> Vec<BootedVm> {
        let mut lost = vec![];
        let mut keep = VecDeque::with_capacity(self.idle.len());
        while let Some(mut vm) = self.idle.pop_front() {
            match vm.check(heartbeat_timeout) {
                Ok(()) => keep.push_back(vm),
                Err(e) => {
                    warn!(vm_id = vm.vm_id(), error = %e, "pooled vm lost; replacing it");
                    self.replaced += 1;
                    self.last_error = Some(format!("idle vm {} lost: {e}", vm.vm_id()));
                    lost.push(vm);
                }
            }
        }
        self.idle = keep;
        lost
    }
}

/// Tear `vms` down in the background.
pub(crate) fn discard_later(vms: Vec<BootedVm>) {
    for vm in vms {
        tokio::task::spawn_local(async move {
            vm.discard().await;
        });
    }
}

/// Whether one more VM of a shape fits on the host now (asked before each
/// refill boot).
pub type RoomFn = dyn Fn(Shape) -> bool + Send + Sync;

struct Inner {
    host: HostConfig,
    settings: PoolSettings,
    pools: Mutex<Vec<Pool>>,
    room: Box<RoomFn>,
    stopping: AtomicBool,
    wake: Notify,
}

/// The warm pools. Cheap to clone; their work runs on the current
/// `LocalSet`.
#[derive(Clone)]
pub struct Pools {
    inner: Arc<Inner>,
}

impl Pools {
    /// Start keeping `configs` filled. Must run inside a
    /// `tokio::task::LocalSet`.
    pub fn start(
        host: HostConfig,
        settings: PoolSettings,
        configs: &[PoolConfig],
        room: Box<RoomFn>,
    ) -> Pools {
        let pools = configs
            .iter()
            .map(|c| Pool {
                cfg: *c,
                idle: VecDeque::new(),
                booting: 0,
                claimed: 0,
                replaced: 0,
                boot_failures: 0,
                failing: 0,
                retry_at: None,
                last_error: None,
                template: if settings.clones {
                    TemplateState::Wanted
                } else {
                    TemplateState::Off
                },
            })
            .collect();
        let p = Pools {
            inner: Arc::new(Inner {
                host,
                settings,
                pools: Mutex::new(pools),
                room,
                stopping: AtomicBool::new(false),
                wake: Notify::new(),
            }),
        };
        let me = p.clone();
        tokio::task::spawn_local(async move { me.maintain().await });
        p
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Pool>> {
        self.inner.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle VM of this shape, if one is ready; the pool refills behind
    /// it. A VM found lost is discarded (and replaced) and the next tried.
    pub fn claim(&self, shape: Shape) -> Option<BootedVm> {
        let (got, lost) = self.take(shape);
        discard_later(lost);
        got
    }

    /// As [`Pools::claim`], from any thread: the VMs found lost on the way
    /// are the caller's to discard ([`discard_later`], on the runtime).
    pub fn take(&self, shape: Shape) -> (Option<BootedVm>, Vec<BootedVm>) {
        if self.inner.stopping.load(Ordering::SeqCst) {
            return (None, vec![]);
        }
        let (got, lost) = {
            let mut pools = self.lock();
            let Some(pool) = pools.iter_mut().find(|p| p.cfg.shape == shape) else {
                return (None, vec![]);
            };
            let lost = pool.sweep(self.inner.settings.heartbeat_timeout);
            let got = pool.idle.pop_front();
            pool.claimed += got.is_some() as u64;
            (got, lost)
        };
        self.inner.wake.notify_one();
        (got, lost)
    }

    /// vCPUs, memory (MiB) and VMs held by idle and booting pooled VMs.
    pub fn reserved(&self) -> (u32, u64, u32) {
        let pools = self.lock();
        pools.iter().fold((0, 0, 0), |(v, m, n), p| {
            let making = matches!(p.template, TemplateState::Making) as usize;
            let k = (p.idle.len() + p.booting + making) as u32;
            (
                v + k * p.cfg.shape.vcpus,
                m + k as u64 * p.cfg.shape.memory_mib as u64,
                n + k,
            )
        })
    }

    /// Refill now (e.g. room freed up).
    pub fn nudge(&self) {
        self.inner.wake.notify_one();
    }

    pub fn status(&self) -> Vec<PoolStatus> {
        let pools = self.lock();
        pools
            .iter()
            .map(|p| PoolStatus {
                image: p.cfg.shape.image.to_string(),
                vcpus: p.cfg.shape.vcpus,
                memory_mib: p.cfg.shape.memory_mib,
                size: p.cfg.size,
                idle: p.idle.len(),
                booting: p.booting,
                claimed: p.claimed,
                replaced: p.replaced,
                boot_failures: p.boot_failures,
                refill: match &p.template {
                    TemplateState::Ready(_) => "clone",
                    _ => "cold boot",
                },
                template: match &p.template {
                    TemplateState::Ready(t) => Some(t.id.clone()),
                    _ => None,
                },
                last_error: p.last_error.clone(),
                vms: p
                    .idle
                    .iter()
                    .map(|vm| IdleVm {
                        vm_id: vm.vm_id().to_string(),
                        vmm_pid: vm.vmm_pid(),
                        idle_ms: vm.booted_at().elapsed().as_millis() as u64,
                    })
                    .collect(),
            })
            .collect()
    }

    /// Stop refilling, tear down every idle VM and wait for boots in flight
    /// (each is torn down as it finishes). Returns teardown problems.
    pub async fn shutdown(&self) -> Vec<String> {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
        let idle: Vec<BootedVm> = {
            let mut pools = self.lock();
            pools.iter_mut().flat_map(|p| p.idle.drain(..)).collect()
        };
        let mut errors = vec![];
        for vm in idle {
            let id = vm.vm_id().to_string();
            errors.extend(vm.discard().await.into_iter().map(|e| format!("{id}: {e}")));
        }
        let deadline = Instant::now() + self.inner.settings.boot_timeout + Duration::from_secs(10);
        while self
            .lock()
            .iter()
            .any(|p| p.booting > 0 || matches!(p.template, TemplateState::Making))
        {
            if Instant::now() > deadline {
                errors.push("pooled vms still booting at shutdown".into());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let templates: Vec<Arc<Template>> = self
            .lock()
            .iter_mut()
            .filter_map(
                |p| match std::mem::replace(&mut p.template, TemplateState::Off) {
                    TemplateState::Ready(t) => Some(t),
                    _ => None,
                },
            )
            .collect();
        for t in templates {
            if let Err(e) = t.remove() {
                errors.push(format!("template {}: {e}", t.id));
            }
        }
        errors
    }

    /// The template of `shape`'s pool, if it has one: a task that finds the
    /// pool empty is started on a clone of it.
    pub fn template(&self, shape: Shape) -> Option<Arc<Template>> {
        if self.inner.stopping.load(Ordering::SeqCst) {
            return None;
        }
        let pools = self.lock();
        match &pools.iter().find(|p| p.cfg.shape == shape)?.template {
            TemplateState::Ready(t) => Some(t.clone()),
            _ => None,
        }
    }

    /// A clone of `shape`'s template failed: give the template up (its
    /// files go) and cold-boot from now on.
    pub fn template_failed(&self, shape: Shape, why: &str) {
        let gone = {
            let mut pools = self.lock();
            let Some(p) = pools.iter_mut().find(|p| p.cfg.shape == shape) else {
                return;
            };
            p.last_error = Some(format!(
                "snapshot clone failed, refilling with cold boots: {why}"
            ));
            match std::mem::replace(&mut p.template, TemplateState::Off) {
                TemplateState::Ready(t) => Some(t),
                _ => None,
            }
        };
        if let Some(t) = gone {
            warn!(template = %t.id, "giving up on the template: {why}");
            let _ = t.remove();
        }
    }

    /// Make the templates pools want (one at a time per pool).
    fn make_templates(&self) {
        let wanted: Vec<Shape> = {
            let mut pools = self.lock();
            pools
                .iter_mut()
                .filter(|p| p.cfg.size > 0 && matches!(p.template, TemplateState::Wanted))
                .map(|p| {
                    p.template = TemplateState::Making;
                    p.cfg.shape
                })
                .collect()
        };
        for shape in wanted {
            let me = self.clone();
            tokio::task::spawn_local(async move {
                let made = match me.spec(shape) {
                    Ok(spec) => make_template(&me.inner.host, &spec).await,
                    Err(e) => Err(e),
                };
                let mut pools = me.lock();
                let Some(p) = pools.iter_mut().find(|p| p.cfg.shape == shape) else {
                    return;
                };
                match made {
                    Ok(t) if me.inner.stopping.load(Ordering::SeqCst) => {
                        let _ = t.remove();
                        p.template = TemplateState::Off;
                    }
                    Ok(t) => {
                        debug!(template = %t.id, ?shape, "pool template ready");
                        p.template = TemplateState::Ready(Arc::new(t));
                    }
                    Err(e) => {
                        warn!(error = %e, "pool template failed; cold boots instead");
                        p.last_error = Some(format!(
                            "snapshot template failed, refilling with cold boots: {e}"
                        ));
                        p.template = TemplateState::Off;
                    }
                }
                drop(pools);
                me.inner.wake.notify_one();
            });
        }
    }

    /// What a pooled VM of `shape` boots: its image (loaded now, so a
    /// rebuilt image is what the next refill boots).
    fn spec(&self, shape: Shape) -> Result<TaskSpec, crate::supervisor::RunError> {
        let s = &self.inner.settings;
        let image = if shape.image.is_default() {
            None
        } else {
            Some(dough_image::Image::load(&dough_image::Image::named(
                &self.inner.host.state_dir,
                shape.image.as_str(),
            ))?)
        };
        Ok(TaskSpec {
            vcpus: shape.vcpus,
            memory_mib: shape.memory_mib,
            boot_timeout: s.boot_timeout,
            heartbeat_timeout: s.heartbeat_timeout,
            image,
            ..TaskSpec::default()
        })
    }

    /// Check idle VMs and refill, until shutdown.
    async fn maintain(self) {
        let every = self.inner.settings.check_every;
        loop {
            tokio::select! {
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(every) => {}
            }
            if self.inner.stopping.load(Ordering::SeqCst) {
                return;
            }
            self.check_idle();
            self.make_templates();
            self.refill();
        }
    }

    /// Replace idle VMs that missed heartbeats or whose VMM is gone.
    fn check_idle(&self) {
        let hb = self.inner.settings.heartbeat_timeout;
        let lost: Vec<BootedVm> = self.lock().iter_mut().flat_map(|p| p.sweep(hb)).collect();
        discard_later(lost);
    }

    /// Start boots for pools below their size, while the host has room.
    fn refill(&self) {
        let needs = |p: &Pool, now: Instant| {
            p.idle.len() + p.booting < p.cfg.size
                && p.retry_at.is_none_or(|t| now >= t)
                && !matches!(p.template, TemplateState::Wanted | TemplateState::Making)
        };
        loop {
            let Some(shape) = self
                .lock()
                .iter()
                .find(|p| needs(p, Instant::now()))
                .map(|p| p.cfg.shape)
            else {
                return;
            };
            // Asked without the pools' lock: the answer counts them.
            if !(self.inner.room)(shape) {
                return;
            }
            {
                let mut pools = self.lock();
                match pools
                    .iter_mut()
                    .find(|p| p.cfg.shape == shape && needs(p, Instant::now()))
                {
                    Some(p) => p.booting += 1,
                    None => continue,
                }
            }
            let me = self.clone();
            tokio::task::spawn_local(async move { me.boot_one(shape).await });
        }
    }

    async fn boot_one(self, shape: Shape) {
        let t = Instant::now();
        let res = match (self.spec(shape), self.template(shape)) {
            (Err(e), _) => Err(e),
            (Ok(spec), Some(tpl)) => {
                let r = clone_vm(&self.inner.host, &tpl, &spec).await;
                if let Err(e) = &r {
                    self.template_failed(shape, &e.to_string());
                }
                r
            }
            (Ok(spec), None) => boot_idle(&self.inner.host, &spec).await,
        };
        let mut discard = None;
        {
            let mut pools = self.lock();
            let Some(p) = pools.iter_mut().find(|p| p.cfg.shape == shape) else {
                return;
            };
            match res {
                // Still counted as booting until it is gone: shutdown waits.
                Ok(vm) if self.inner.stopping.load(Ordering::SeqCst) => discard = Some(vm),
                Ok(vm) => {
                    p.booting -= 1;
                    debug!(
                        vm_id = vm.vm_id(),
                        ms = t.elapsed().as_millis() as u64,
                        "pooled vm ready"
                    );
                    p.failing = 0;
                    p.retry_at = None;
                    p.idle.push_back(vm);
                }
                Err(e) => {
                    p.booting -= 1;
                    p.boot_failures += 1;
                    p.failing += 1;
                    // 1 s, 2 s, 4 s … at most 32 s between tries.
                    let backoff = Duration::from_secs(1 << p.failing.min(6).saturating_sub(1));
                    p.retry_at = Some(Instant::now() + backoff);
                    p.last_error = Some(format!("boot failed: {e}"));
                    warn!(error = %e, retry_in_s = backoff.as_secs(), "pooled vm failed to boot");
                }
            }
        }
        if let Some(vm) = discard {
            vm.discard().await;
            if let Some(p) = self.lock().iter_mut().find(|p| p.cfg.shape == shape) {
                p.booting -= 1;
            }
        }
        if !self.inner.stopping.load(Ordering::SeqCst) {
            debug!(?shape, "pool refill step done");
            self.inner.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_or_say_what_is_wrong() {
        let py = "py:1x256".parse::<Shape>().unwrap();
        assert_eq!(py.image.as_str(), "py");
        assert_eq!((py.vcpus, py.memory_mib), (1, 256));
        assert_eq!(py.to_string(), "py:1x256");
        assert!("Bad/Name:1x256"
            .parse::<Shape>()
            .unwrap_err()
            .contains("image name"));
        assert_eq!(
            "2x1024".parse::<Shape>(),
            Ok(Shape {
                vcpus: 2,
                memory_mib: 1024,
                image: ImageName::default_image(),
            })
        );
        assert!("2"
            .parse::<Shape>()
            .unwrap_err()
            .contains("VCPUSxMEMORY_MIB"));
        assert!("0x512".parse::<Shape>().unwrap_err().contains("at least"));
        assert!("1x32".parse::<Shape>().unwrap_err().contains("at least"));
        assert!("ax512".parse::<Shape>().is_err());
    }
}
