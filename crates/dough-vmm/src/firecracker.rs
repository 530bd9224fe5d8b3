//! Firecracker backend: spawn `firecracker --api-sock`, configure it over
//! its HTTP API on that Unix socket, `InstanceStart`.
//!
//! Every request the backend sends comes from [`Firecracker::plan`], a pure
//! function; `tests/firecracker_spec.rs` checks each planned request, for
//! every configuration the backend produces, against Firecracker's own API
//! spec (`spec/`), and checks the bytes the HTTP client writes for them.
//! No Firecracker binary runs on Dough's CI machines (no usable KVM); see
//! docs/firecracker.md for running it on a KVM host.
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::Command;

use crate::jail::{Jail, JailSpec};
use crate::process::{
    fifo_log, spawn_console, wait_for_socket, ConsoleCopy, Control, VmProcess, VmmHandle,
    CONSOLE_LOG_CAP, FC_LOG_CAP,
};
use crate::{tools, Backend, BoxFuture, VmSpec, Vmm, VmmError};

/// Versions this backend is written and checked against.
pub const SUPPORTED_VERSIONS: &str = "1.8 – 1.17 (API spec 1.17.0-dev checked in tests)";

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    pub boot_args: String,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: String,
    pub is_root_device: bool,
    pub is_read_only: bool,
    pub cache_type: &'static str,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct MachineConfig {
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
    pub smt: bool,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    pub guest_mac: String,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Vsock {
    pub guest_cid: u32,
    pub uds_path: String,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Logger {
    pub log_path: String,
    pub level: &'static str,
    pub show_level: bool,
    pub show_log_origin: bool,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Metrics {
    pub metrics_path: String,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Action {
    pub action_type: &'static str,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct VmState {
    pub state: &'static str,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct SnapshotCreate {
    pub snapshot_path: String,
    pub mem_file_path: String,
    pub snapshot_type: &'static str,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct MemBackend {
    pub backend_type: &'static str,
    pub backend_path: String,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct UdsOverride {
    pub uds_path: String,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct SnapshotLoad {
    pub snapshot_path: String,
    pub mem_backend: MemBackend,
    pub resume_vm: bool,
    /// Each clone has its own vsock socket (the template's is gone).
    pub vsock_override: UdsOverride,
    /// kvmclock advanced by the wall time since the snapshot.
    pub clock_realtime: bool,
}

/// Where a Firecracker snapshot lives: the VM state and its guest memory.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotFiles {
    pub state: PathBuf,
    pub memory: PathBuf,
}

impl SnapshotFiles {
    /// Where a jailed template writes its snapshot, as Firecracker sees it
    /// (`run/` in the chroot is the one directory its uid owns).
    pub fn in_template_chroot() -> SnapshotFiles {
        SnapshotFiles {
            state: "/run/snapshot.state".into(),
            memory: "/run/snapshot.mem".into(),
        }
    }

    /// Where a jailed clone finds its template's files, as Firecracker
    /// sees them (hard links into the chroot).
    pub fn in_clone_chroot() -> SnapshotFiles {
        SnapshotFiles {
            state: "/snapshot.state".into(),
            memory: "/snapshot.mem".into(),
        }
    }
}

/// One API request: method, path, JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    pub method: &'static str,
    pub path: String,
    pub body: serde_json::Value,
}

impl ApiRequest {
    fn put<T: Serialize>(path: impl Into<String>, body: &T) -> ApiRequest {
        ApiRequest {
            method: "PUT",
            path: path.into(),
            body: serde_json::to_value(body).expect("api bodies serialize"),
        }
    }

    fn patch<T: Serialize>(path: impl Into<String>, body: &T) -> ApiRequest {
        ApiRequest {
            method: "PATCH",
            ..ApiRequest::put(path, body)
        }
    }

    /// The HTTP/1.1 request bytes.
    pub fn to_http(&self) -> Vec<u8> {
        let body = self.body.to_string();
        format!(
            "{} {} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
            self.method,
            self.path,
            body.len(),
            body
        )
        .into_bytes()
    }
}

/// The Firecracker backend with the binary it found.
#[derive(Debug, Clone)]
pub struct Firecracker {
    pub binary: PathBuf,
}

pub fn api_socket(spec: &VmSpec) -> PathBuf {
    spec.paths.run_dir.join("firecracker.sock")
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

impl Firecracker {
    pub fn locate() -> Result<Firecracker, VmmError> {
        tools::find(tools::FIRECRACKER)
            .map(|binary| Firecracker { binary })
            .ok_or_else(|| VmmError::MissingTool {
                tool: tools::FIRECRACKER.into(),
                hint: tools::hint(tools::FIRECRACKER).into(),
            })
    }

    /// What Firecracker accepts beyond the schema: 1 or an even number of
    /// vCPUs, at most 32.
    pub fn check_spec(spec: &VmSpec) -> Result<(), VmmError> {
        spec.validate()?;
        if spec.snapshot.is_some() && spec.jail.is_none() {
            // Firecracker restores drives and sockets at the paths the
            // snapshot names: only per-VM chroots give every clone its own
            // files at the template's paths.
            return Err(VmmError::Spec(
                "Firecracker snapshot templates and clones run jailed (each clone's chroot gives the template's drive paths to its own files); run as root with confinement on".into(),
            ));
        }
        if spec.vcpus > 32 || (spec.vcpus > 1 && spec.vcpus % 2 == 1) {
            return Err(VmmError::Spec(format!(
                "firecracker takes 1 or an even number of vcpus up to 32, not {}",
                spec.vcpus
            )));
        }
        Ok(())
    }

    /// Firecracker's recommended guest arguments plus Dough's.
    pub fn kernel_cmdline(spec: &VmSpec) -> String {
        let mut args: Vec<String> = [
            "console=ttyS0",
            "reboot=k",
            "panic=1",
            "pci=off",
            "quiet",
            "cryptomgr.notests",
        ]
        .map(String::from)
        .to_vec();
        args.push(format!("dough.vm={}", spec.id));
        args.extend(spec.kernel_args.iter().cloned());
        args.join(" ")
    }

    /// Every request, in order, that starts `spec`: a clone loads its
    /// template's snapshot, any other VM is configured and booted.
    pub fn start_plan(spec: &VmSpec) -> Vec<ApiRequest> {
        match &spec.snapshot {
            Some(crate::SnapshotRole::Clone { .. }) => Self::clone_plan(spec),
            _ => Self::plan(spec),
        }
    }

    /// Logger and metrics: the only things Firecracker takes before a
    /// snapshot load, and the first of a boot.
    fn log_requests(spec: &VmSpec) -> Vec<ApiRequest> {
        let p = &spec.paths;
        vec![
            ApiRequest::put(
                "/logger",
                &Logger {
                    log_path: s(&p.fc_log_fifo()),
                    level: "Warning",
                    show_level: true,
                    show_log_origin: false,
                },
            ),
            ApiRequest::put(
                "/metrics",
                &Metrics {
                    metrics_path: s(&p.fc_metrics_fifo()),
                },
            ),
        ]
    }

    /// Every request, in order, that configures and boots `spec`.
    pub fn plan(spec: &VmSpec) -> Vec<ApiRequest> {
        let mut r = Self::log_requests(spec);
        r.extend([
            ApiRequest::put(
                "/machine-config",
                &MachineConfig {
                    vcpu_count: spec.vcpus,
                    mem_size_mib: spec.memory_mib,
                    smt: false,
                },
            ),
            ApiRequest::put(
                "/boot-source",
                &BootSource {
                    kernel_image_path: s(&spec.kernel),
                    initrd_path: spec.initramfs.as_deref().map(s),
                    boot_args: Self::kernel_cmdline(spec),
                },
            ),
            ApiRequest::put(
                "/drives/base",
                &Drive {
                    drive_id: "base".into(),
                    path_on_host: s(&spec.rootfs),
                    is_root_device: false,
                    is_read_only: true,
                    cache_type: "Unsafe",
                },
            ),
            ApiRequest::put(
                "/drives/scratch",
                &Drive {
                    drive_id: "scratch".into(),
                    path_on_host: s(&spec.scratch),
                    is_root_device: false,
                    is_read_only: false,
                    cache_type: "Unsafe",
                },
            ),
        ]);
        for (i, layer) in spec.layers.iter().enumerate() {
            r.push(ApiRequest::put(
                format!("/drives/layer{i}"),
                &Drive {
                    drive_id: format!("layer{i}"),
                    path_on_host: s(layer),
                    is_root_device: false,
                    is_read_only: true,
                    cache_type: "Unsafe",
                },
            ));
        }
        if let Some(tap) = &spec.tap {
            r.push(ApiRequest::put(
                "/network-interfaces/eth0",
                &NetworkInterface {
                    iface_id: "eth0".into(),
                    host_dev_name: tap.clone(),
                    guest_mac: spec.mac.clone(),
                },
            ));
        }
        r.push(ApiRequest::put(
            "/vsock",
            &Vsock {
                guest_cid: spec.guest_cid,
                uds_path: s(&spec.paths.vsock_uds()),
            },
        ));
        r.push(ApiRequest::put(
            "/actions",
            &Action {
                action_type: "InstanceStart",
            },
        ));
        r
    }

    /// Snapshot a running template VM: pause it, then write a full
    /// snapshot (state and guest memory). The template is stopped after.
    pub fn snapshot_plan(files: &SnapshotFiles) -> Vec<ApiRequest> {
        vec![
            ApiRequest::patch("/vm", &VmState { state: "Paused" }),
            ApiRequest::put(
                "/snapshot/create",
                &SnapshotCreate {
                    snapshot_path: s(&files.state),
                    mem_file_path: s(&files.memory),
                    snapshot_type: "Full",
                },
            ),
        ]
    }

    /// Start a clone: on a fresh Firecracker process (only logger and
    /// metrics configured before), load the template's snapshot with its
    /// memory file mapped privately (`File` backend: copy-on-write, the
    /// template's file is never written), this VM's own vsock socket, and
    /// resume at once. The TAP keeps its name (`tap0` in the clone's own
    /// namespace), so no network override is needed.
    pub fn restore_plan(files: &SnapshotFiles, spec: &VmSpec) -> Vec<ApiRequest> {
        vec![ApiRequest::put(
            "/snapshot/load",
            &SnapshotLoad {
                snapshot_path: s(&files.state),
                mem_backend: MemBackend {
                    backend_type: "File",
                    backend_path: s(&files.memory),
                },
                resume_vm: true,
                vsock_override: UdsOverride {
                    uds_path: s(&spec.paths.vsock_uds()),
                },
                clock_realtime: true,
            },
        )]
    }

    /// Start a clone (a jailed Firecracker, `spec` as seen inside its
    /// chroot): logger and metrics, then the load of the template's files,
    /// which the chroot holds under fixed names ([`Self::jailer_plan`]).
    pub fn clone_plan(spec: &VmSpec) -> Vec<ApiRequest> {
        let mut r = Self::log_requests(spec);
        r.extend(Self::restore_plan(&SnapshotFiles::in_clone_chroot(), spec));
        r
    }

    /// The graceful-stop request (x86: the guest sees Ctrl-Alt-Del).
    pub fn ctrl_alt_del() -> ApiRequest {
        ApiRequest::put(
            "/actions",
            &Action {
                action_type: "SendCtrlAltDel",
            },
        )
    }
}

/// How one VM is started through Firecracker's `jailer`.
#[derive(Debug, Clone)]
pub struct JailerPlan {
    /// The jailer's arguments.
    pub args: Vec<String>,
    /// `<base>/firecracker/<id>/root`: the jailed Firecracker's `/`.
    pub chroot: PathBuf,
    /// (file on the host, name inside the chroot): hard-linked (or copied)
    /// in before the jailer runs. Only this VM's files are in its jail.
    pub links: Vec<(PathBuf, String)>,
    /// The VM as Firecracker sees it from inside the chroot; its API plan
    /// uses only in-jail paths.
    pub inner: VmSpec,
    /// The API socket as seen from the host.
    pub api_sock: PathBuf,
    /// Where the jailer writes Firecracker's PID (new PID namespace).
    pub pid_file: PathBuf,
}

/// Name of the binary inside the jail (the jailer requires "firecracker"
/// in it and names the chroot and pid file after it).
const JAILED_EXEC: &str = "firecracker";

impl Firecracker {
    /// The jailer invocation and chroot layout for `spec` under `js`.
    /// `cgroup_version` is 1 or 2 (see [`crate::cgroup::Layout`]); `netns`
    /// is the VM's network namespace handle, when it has one.
    pub fn jailer_plan(
        &self,
        spec: &VmSpec,
        js: &JailSpec,
        cgroup_version: u32,
        netns: Option<&Path>,
    ) -> JailerPlan {
        let base = &js.root;
        let chroot = base.join(JAILED_EXEC).join(&spec.id).join("root");
        let mut links = vec![
            (spec.kernel.clone(), "vmlinux".to_string()),
            (spec.rootfs.clone(), "rootfs.ext4".to_string()),
            (spec.scratch.clone(), "scratch.ext4".to_string()),
            (
                crate::vsock::guest_listener_path(&spec.paths.vsock_uds(), spec.guest_port),
                format!("vsock.sock_{}", spec.guest_port),
            ),
        ];
        let mut inner = spec.clone();
        inner.paths = crate::VmPaths::new("/");
        inner.kernel = "/vmlinux".into();
        inner.rootfs = "/rootfs.ext4".into();
        inner.scratch = "/scratch.ext4".into();
        inner.jail = None;
        for (i, layer) in spec.layers.iter().enumerate() {
            links.push((layer.clone(), format!("layer{i}.ext4")));
        }
        inner.layers = (0..spec.layers.len())
            .map(|i| PathBuf::from(format!("/layer{i}.ext4")))
            .collect();
        if spec.initramfs.is_some() {
            links.push((
                spec.initramfs.clone().unwrap_or_default(),
                "initramfs.cpio".into(),
            ));
            inner.initramfs = Some("/initramfs.cpio".into());
        }
        // A clone: its template's files under the names clone_plan loads.
        // Firecracker maps the memory file privately and never writes it;
        // the file is the template group's (read-only), so the clone's
        // Firecracker runs with that group.
        let mut gid = js.gid;
        if let Some(crate::SnapshotRole::Clone { memory, state, .. }) = &spec.snapshot {
            let f = SnapshotFiles::in_clone_chroot();
            let name = |p: &Path| p.to_string_lossy().trim_start_matches('/').to_string();
            links.push((state.clone(), name(&f.state)));
            links.push((memory.clone(), name(&f.memory)));
            gid = crate::TEMPLATE_GID;
        }
        let l = js.limits;
        let cgroups: Vec<String> = if cgroup_version == 2 {
            vec![
                format!(
                    "cpu.max={} {}",
                    l.cpu_quota_us,
                    crate::cgroup::CPU_PERIOD_US
                ),
                format!("memory.max={}", l.memory_bytes),
                format!("pids.max={}", l.pids),
            ]
        } else {
            vec![
                format!("cpu.cfs_period_us={}", crate::cgroup::CPU_PERIOD_US),
                format!("cpu.cfs_quota_us={}", l.cpu_quota_us),
                format!("memory.limit_in_bytes={}", l.memory_bytes),
                format!("pids.max={}", l.pids),
            ]
        };
        let mut args: Vec<String> = vec![
            "--id".into(),
            spec.id.clone(),
            "--exec-file".into(),
            s(&self.binary),
            "--uid".into(),
            js.uid.to_string(),
            "--gid".into(),
            gid.to_string(),
            "--chroot-base-dir".into(),
            s(base),
            "--cgroup-version".into(),
            cgroup_version.to_string(),
            "--parent-cgroup".into(),
            "dough".into(),
        ];
        for c in cgroups {
            args.push("--cgroup".into());
            args.push(c);
        }
        if let Some(ns) = netns {
            args.push("--netns".into());
            args.push(s(ns));
        }
        args.push("--new-pid-ns".into());
        args.extend([
            "--".into(),
            "--api-sock".into(),
            "/run/firecracker.socket".into(),
        ]);
        JailerPlan {
            api_sock: chroot.join("run/firecracker.socket"),
            pid_file: chroot.join(format!("{JAILED_EXEC}.pid")),
            args,
            chroot,
            links,
            inner,
        }
    }

    /// Lay out the chroot: this VM's files hard-linked in (copied across
    /// file systems), log files, ownership for the VM's uid.
    fn prepare_chroot(plan: &JailerPlan, js: &JailSpec) -> Result<(), VmmError> {
        let c = &plan.chroot;
        std::fs::create_dir_all(c.join("run")).map_err(crate::io_err(c))?;
        for (src, name) in &plan.links {
            let dst = c.join(name);
            if std::fs::hard_link(src, &dst).is_err() {
                std::fs::copy(src, &dst).map_err(crate::io_err(&dst))?;
            }
        }
        let owned: Vec<PathBuf> = ["run", "scratch.ext4"]
            .iter()
            .map(|n| c.join(n))
            .chain([c.join(format!("vsock.sock_{}", plan.inner.guest_port))])
            .collect();
        crate::jail::hand_over(&owned, js.uid, js.gid)
    }

    /// Firecracker's logger and metrics go to named pipes that Dough drains
    /// into capped files in the run directory. `fifo_dir` is where
    /// Firecracker sees `/` (the chroot) or the run directory.
    fn log_drains(
        paths: &crate::VmPaths,
        fifos: (PathBuf, PathBuf),
        owner: Option<(u32, u32)>,
    ) -> Result<Vec<ConsoleCopy>, VmmError> {
        let log = fifo_log(&fifos.0, &paths.fc_log(), FC_LOG_CAP, owner)?;
        match fifo_log(&fifos.1, &paths.fc_metrics(), FC_LOG_CAP, owner) {
            Ok(m) => Ok(vec![log, m]),
            Err(e) => {
                log.abort();
                Err(e)
            }
        }
    }

    /// Start through the jailer: Firecracker runs chrooted, as the VM's uid,
    /// in the VM's cgroup and a new PID namespace.
    async fn start_jailed(
        &self,
        spec: &VmSpec,
        js: &JailSpec,
        jailer: &Path,
    ) -> Result<VmProcess, VmmError> {
        let layout = crate::cgroup::Layout::detect().map_err(VmmError::Confine)?;
        let plan = self.jailer_plan(spec, js, layout.version(), spec.netns.as_deref());
        let cleanup = Jail::adopt(
            js.clone(),
            crate::cgroup::Cgroup {
                dirs: crate::cgroup::Cgroup::dirs_for(&layout, &spec.id),
            },
        );
        let mut drains = vec![];
        let res = async {
            Self::prepare_chroot(&plan, js)?;
            let inner = &plan.inner.paths;
            let in_chroot = |p: PathBuf| plan.chroot.join(p.strip_prefix("/").unwrap_or(&p));
            drains = Self::log_drains(
                &spec.paths,
                (
                    in_chroot(inner.fc_log_fifo()),
                    in_chroot(inner.fc_metrics_fifo()),
                ),
                Some((js.uid, js.gid)),
            )?;
            let mut cmd = Command::new(jailer);
            cmd.args(&plan.args);
            let p = &spec.paths;
            // The jailer keeps fds 0-2: the guest console still reaches serial.log.
            let (mut j, console) = spawn_console(
                "jailer",
                cmd,
                &p.serial_log(),
                CONSOLE_LOG_CAP,
                &p.vmm_log(),
            )?;
            wait_for_socket(
                "jailer",
                &mut j,
                &plan.pid_file,
                &p.vmm_log(),
                Duration::from_secs(5),
            )
            .await
            .or_else(|e| {
                if plan.pid_file.exists() {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
            let pid: i32 = std::fs::read_to_string(&plan.pid_file)
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .ok_or_else(|| {
                    VmmError::Confine(format!("no pid in {}", plan.pid_file.display()))
                })?;
            let mut vmm = VmmHandle::watch(pid)
                .map_err(|e| VmmError::Confine(format!("watch firecracker {pid}: {e}")))?;
            let start = std::time::Instant::now();
            while !plan.api_sock.exists() {
                if vmm.try_wait().is_some() || start.elapsed() > Duration::from_secs(5) {
                    return Err(VmmError::SocketTimeout {
                        what: "jailed firecracker".into(),
                        path: plan.api_sock.clone(),
                        secs: 5,
                    });
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            for req in Self::start_plan(&plan.inner) {
                call(&plan.api_sock, &req, Duration::from_secs(5)).await?;
            }
            Ok((vmm, j, console))
        }
        .await;
        match res {
            Ok((vmm, jailer_child, console)) => Ok(VmProcess {
                backend: Backend::Firecracker,
                paths: spec.paths.clone(),
                control: Control::FirecrackerApi(plan.api_sock.clone()),
                vmm,
                helpers: vec![("jailer".into(), jailer_child)],
                jail: Some(cleanup),
                console,
                drains,
            }),
            Err(e) => {
                for d in drains {
                    d.abort();
                }
                // Kill whatever the jailer started (it is in the VM's cgroup).
                for d in &cleanup.cgroup.dirs {
                    let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                cleanup.destroy();
                Err(e)
            }
        }
    }
}

/// Snapshot a jailed template VM whose guest is quiesced: pause it and
/// write its state and memory into `run/` of its chroot (`api_sock` is
/// `<chroot>/run/firecracker.socket`). Returns where the files are on the
/// host; the VM stays paused for the caller to tear down.
pub async fn snapshot_template(api_sock: &Path) -> Result<SnapshotFiles, VmmError> {
    let run = api_sock
        .parent()
        .ok_or_else(|| VmmError::Spec(format!("no directory around {}", api_sock.display())))?;
    let inside = SnapshotFiles::in_template_chroot();
    // Writing the guest memory out takes a while for large VMs.
    for req in Firecracker::snapshot_plan(&inside) {
        call(api_sock, &req, Duration::from_secs(120)).await?;
    }
    let on_host = |p: &Path| run.join(p.file_name().unwrap_or_default());
    Ok(SnapshotFiles {
        state: on_host(&inside.state),
        memory: on_host(&inside.memory),
    })
}

/// Send one request on a fresh connection; Ok on 2xx, else the error
/// Firecracker gave (`fault_message`).
pub async fn call(sock: &Path, req: &ApiRequest, limit: Duration) -> Result<(), VmmError> {
    let fail = |m: String| VmmError::Api(format!("{} {}: {m}", req.method, req.path));
    tokio::time::timeout(limit, async {
        let mut st = UnixStream::connect(sock)
            .await
            .map_err(|e| fail(format!("connect {}: {e}", sock.display())))?;
        st.write_all(&req.to_http())
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut r = BufReader::new(st);
        let mut status = String::new();
        r.read_line(&mut status)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let code: u16 = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| fail(format!("bad status line {status:?}")))?;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).await.map_err(|e| fail(e.to_string()))? == 0 || h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; len.min(64 * 1024)];
        r.read_exact(&mut body)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if (200..300).contains(&code) {
            return Ok(());
        }
        let msg = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["fault_message"].as_str().map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        Err(fail(format!("HTTP {code}: {msg}")))
    })
    .await
    .map_err(|_| fail(format!("no answer within {limit:?}")))?
}

impl Vmm for Firecracker {
    fn backend(&self) -> Backend {
        Backend::Firecracker
    }

    fn start<'a>(&'a self, spec: &'a VmSpec) -> BoxFuture<'a, Result<VmProcess, VmmError>> {
        Box::pin(async move {
            Self::check_spec(spec)?;
            if let Some(js) = &spec.jail {
                let jailer = tools::find(tools::JAILER).ok_or_else(|| VmmError::MissingTool {
                    tool: tools::JAILER.into(),
                    hint: tools::hint(tools::JAILER).into(),
                })?;
                return self.start_jailed(spec, js, &jailer).await;
            }
            let p = &spec.paths;
            let sock = api_socket(spec);
            let drains = Self::log_drains(p, (p.fc_log_fifo(), p.fc_metrics_fifo()), None)?;
            let mut cmd = Command::new(&self.binary);
            cmd.arg("--api-sock").arg(&sock).arg("--id").arg(&spec.id);
            if let Some(ns) = &spec.netns {
                crate::process::enter_netns(&mut cmd, ns)?;
            }
            // The guest console (ttyS0) is Firecracker's stdout.
            let (mut vmm, console) = spawn_console(
                "firecracker",
                cmd,
                &p.serial_log(),
                CONSOLE_LOG_CAP,
                &p.vmm_log(),
            )?;
            if let Err(e) = wait_for_socket(
                "firecracker",
                &mut vmm,
                &sock,
                &p.vmm_log(),
                Duration::from_secs(5),
            )
            .await
            {
                let _ = vmm.kill().await;
                return Err(e);
            }
            for req in Self::start_plan(spec) {
                if let Err(e) = call(&sock, &req, Duration::from_secs(5)).await {
                    let _ = vmm.kill().await;
                    return Err(e);
                }
            }
            Ok(VmProcess {
                backend: Backend::Firecracker,
                paths: p.clone(),
                control: Control::FirecrackerApi(sock),
                vmm: VmmHandle::Child(vmm),
                helpers: vec![],
                jail: None,
                console,
                drains,
            })
        })
    }
}
