//! `dough serve`: the orchestrator daemon (HTTP API, durable queue,
//! scheduler). State: `<state dir>/dough.db` (SQLite, WAL), `api-token`
//! (0600, made on first start) and `api-url` (where clients find it).
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use dough_core::pool::{ImageName, PoolConfig, Shape};
use dough_core::service::{Limits, Service, ServiceConfig};
use dough_core::store::{PgStore, SqliteStore};

use crate::Cli;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// VMs at once (0: admit nothing, only queue).
    #[arg(long, value_name = "N")]
    pub max_vms: Option<u32>,
    /// vCPUs per host CPU the scheduler may hand out.
    #[arg(long, value_name = "X", default_value_t = 4.0)]
    pub overcommit: f64,
    /// Guest memory in total, MiB [default: host memory less 1 GiB].
    #[arg(long, value_name = "MIB")]
    pub memory_limit: Option<u64>,
    /// A guest silent this long is lost.
    #[arg(long, value_name = "SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_timeout: u64,
    /// Cancel: SIGTERM, this long, then SIGKILL.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub cancel_grace: u64,
    /// Stored output per task, MiB.
    #[arg(long, value_name = "MIB", default_value_t = 16)]
    pub output_limit: u64,
    /// Warm VMs to keep booted for tasks of the default shape (1 vCPU,
    /// 512 MiB); a task of that shape starts without booting. 0: no pool.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub pool_size: usize,
    /// A warm pool of another shape, [IMAGE:]VCPUSxMIB=N (e.g. 2x1024=2,
    /// or py:1x512=1 for VMs of image `py`); repeatable.
    #[arg(long = "pool", value_name = "SHAPE=N")]
    pub pools: Vec<String>,
    /// Refill pools with cold boots, not with clones of a snapshot template.
    #[arg(long)]
    pub no_pool_clones: bool,
    /// This daemon's name among nodes (`dough nodes`); default: the
    /// hostname.
    #[arg(long, env = "DOUGH_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Where tasks are kept: `sqlite` (dough.db in the state directory,
    /// one host) or a PostgreSQL address, postgres://USER@HOST/DB, that
    /// the nodes of a cluster share (docs/cluster.md).
    #[arg(
        long,
        env = "DOUGH_STORE",
        value_name = "URL",
        default_value = "sqlite"
    )]
    pub store: String,
    /// With `sslmode=require` in the store's address: the CA certificates
    /// (PEM) that verify the database's certificate [default: the
    /// system's].
    #[arg(long, env = "DOUGH_STORE_CA", value_name = "FILE")]
    pub store_ca: Option<std::path::PathBuf>,
    /// A node silent this long is declared dead by its peers (its booted
    /// tasks fail node_lost, the others are queued again); a node that
    /// cannot write its heartbeat for nearly as long stops its tasks.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..))]
    pub node_timeout: u64,
    /// Tasks end at once without a VM (for `dough bench cluster`).
    #[arg(long, hide = true)]
    pub dry_run: bool,
}

/// The task store `--store` names.
fn open_store(
    a: &ServeArgs,
    state_dir: &std::path::Path,
) -> anyhow::Result<Arc<dyn dough_core::store::Store>> {
    let s = a.store.as_str();
    if s == "sqlite" {
        return Ok(Arc::new(
            SqliteStore::open(&state_dir.join("dough.db")).context("open the task store")?,
        ));
    }
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        return Ok(Arc::new(
            PgStore::open(s, 8, a.store_ca.as_deref()).context("open the task store (--store)")?,
        ));
    }
    anyhow::bail!("--store: give `sqlite` or a postgres://USER@HOST/DB address")
}

/// The pools asked for, checked against the limits they count against.
fn pool_configs(a: &ServeArgs, limits: &Limits) -> anyhow::Result<Vec<PoolConfig>> {
    let mut pools = vec![];
    if a.pool_size > 0 {
        pools.push(PoolConfig {
            shape: Shape {
                vcpus: 1,
                memory_mib: 512,
                image: ImageName::default_image(),
            },
            size: a.pool_size,
        });
    }
    for p in &a.pools {
        let (shape, n) = p.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("--pool '{p}': give [IMAGE:]SHAPE=N, like 2x1024=2 or py:1x512=1")
        })?;
        let shape: Shape = shape.parse().map_err(|e| anyhow::anyhow!("--pool: {e}"))?;
        let size: usize = n
            .parse()
            .map_err(|_| anyhow::anyhow!("--pool '{p}': N must be a whole number"))?;
        if pools.iter().any(|q: &PoolConfig| q.shape == shape) {
            anyhow::bail!("--pool '{p}': a pool of shape {shape} is already given");
        }
        if size > 0 {
            pools.push(PoolConfig { shape, size });
        }
    }
    let vms: usize = pools.iter().map(|p| p.size).sum();
    let vcpus: u64 = pools
        .iter()
        .map(|p| p.size as u64 * p.shape.vcpus as u64)
        .sum();
    let mem: u64 = pools
        .iter()
        .map(|p| p.size as u64 * p.shape.memory_mib as u64)
        .sum();
    if vms > limits.max_vms as usize
        || vcpus > limits.vcpu_capacity() as u64
        || mem > limits.memory_mib
    {
        anyhow::bail!(
            "the warm pools ({vms} VMs, {vcpus} vCPUs, {mem} MiB) do not fit the limits ({} VMs, {} vCPUs, {} MiB); pooled VMs count against them",
            limits.max_vms,
            limits.vcpu_capacity(),
            limits.memory_mib
        );
    }
    Ok(pools)
}

fn token_file(dir: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join("api-token");
    if let Ok(t) = std::fs::read_to_string(&p) {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_string());
        }
    }
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .context("read /dev/urandom")?;
    let t: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&p)
        .with_context(|| format!("create {}", p.display()))?;
    f.write_all(t.as_bytes())?;
    Ok(t)
}

pub async fn run(cli: &Cli, a: &ServeArgs) -> anyhow::Result<u8> {
    // One malloc arena for all threads: each VM's network thread would
    // otherwise keep an arena of its own (hundreds of KiB resident) for
    // the daemon's whole life.
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let host = super::host_config_net(cli, Default::default(), Default::default())?;
    std::fs::create_dir_all(&host.state_dir)
        .with_context(|| format!("create {}", host.state_dir.display()))?;
    if !a.overcommit.is_finite() || a.overcommit <= 0.0 {
        anyhow::bail!("--overcommit must be a positive number");
    }
    let mut limits = Limits::for_host();
    limits.overcommit = a.overcommit;
    if let Some(m) = a.max_vms {
        limits.max_vms = m;
    }
    if let Some(m) = a.memory_limit {
        limits.memory_mib = m;
    }
    // Refused here, before anything listens or boots.
    let pools = pool_configs(a, &limits)?;
    for p in &pools {
        let dir = if p.shape.image.is_default() {
            host.image_dir.clone()
        } else {
            dough_image::Image::named(&host.state_dir, p.shape.image.as_str())
        };
        match dough_image::Image::load(&dir) {
            Err(dough_image::ImageError::NotBuilt(_)) if !p.shape.image.is_default() => {
                anyhow::bail!(
                    "--pool {}: no image {:?} here (dough image ls; dough image build {} …)",
                    p.shape,
                    p.shape.image.as_str(),
                    p.shape.image
                )
            }
            Err(e) => anyhow::bail!("--pool {}: {e}", p.shape),
            Ok(_) => {}
        }
    }
    // One daemon per state dir: recovery must never touch a live daemon's tasks.
    let lock_path = host.state_dir.join("serve.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("open {}", lock_path.display()))?;
    let lock = match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err(_) => anyhow::bail!(
            "another `dough serve` is running on {} (it holds {})",
            host.state_dir.display(),
            lock_path.display()
        ),
    };
    crate::http::raise_fd_limit();
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("listen on {}", a.listen))?;
    let token = token_file(&host.state_dir)?;
    if let Err(e) = dough_image::Image::load(&host.image_dir) {
        eprintln!("dough serve: warning: {e}; tasks for the default image are refused (400) until it exists");
    }
    let store = open_store(a, &host.state_dir)?;
    let mut cfg = ServiceConfig::new(host.clone());
    cfg.limits = limits;
    cfg.heartbeat_timeout = Duration::from_secs(a.heartbeat_timeout);
    cfg.cancel_grace = Duration::from_secs(a.cancel_grace);
    cfg.output_cap = a.output_limit << 20;
    // Host credentials: from the daemon's environment, never from a task.
    cfg.creds = dough_core::repo::Credentials::from_env();
    cfg.gate = dough_core::repo::GateConfig::from_env().map_err(anyhow::Error::msg)?;
    cfg.pools = pools;
    if let Some(n) = &a.node_name {
        if n.is_empty() || n.len() > 64 || n.chars().any(|c| c.is_whitespace() || c.is_control()) {
            anyhow::bail!("--node-name {n:?}: give 1 to 64 characters, no spaces");
        }
        cfg.node_name = n.clone();
    }
    cfg.pool_clones = !a.no_pool_clones;
    cfg.node_timeout = Duration::from_secs(a.node_timeout);
    cfg.dry_run = a.dry_run;
    // The node's signing key for provenance statements (made on first start).
    let key = dough_core::provenance::Signer::path_in(&host.state_dir);
    cfg.signer = Some(std::sync::Arc::new(
        dough_core::provenance::Signer::load_or_create(&key)
            .with_context(|| format!("the provenance signing key {}", key.display()))?,
    ));
    // Two live daemons under one name would take each other's tasks for
    // their own.
    let name = cfg.node_name.clone();
    let held = tokio::task::spawn_blocking({
        let (store, name) = (store.clone(), name.clone());
        move || store.hold_node_name(&name)
    })
    .await?
    .context("hold the node's name in the store")?;
    if !held {
        anyhow::bail!(
            "a live `dough serve` holds the node name {name:?} in this store: give this one another --node-name"
        );
    }

    let local = tokio::task::LocalSet::new();
    local
        .run_until(async move {
            let (svc, rec) = Service::start(cfg, store).context("recover the task store")?;
            for id in &rec.failed {
                eprintln!("dough serve: task {id} failed (orchestrator_restart); its VM was reclaimed");
            }
            for id in &rec.requeued {
                eprintln!("dough serve: task {id} re-queued (it had not booted)");
            }
            let addr = listener.local_addr()?;
            std::fs::write(host.state_dir.join("api-url"), format!("http://{addr}\n"))?;
            eprintln!(
                "dough serve: listening on http://{addr} (token in {}; {} VMs, {} vCPUs, {} MiB at most)",
                host.state_dir.join("api-token").display(),
                limits.max_vms,
                limits.vcpu_capacity(),
                limits.memory_mib
            );
            let images: Vec<String> = svc
                .images()
                .iter()
                .map(|i| format!("{} ({})", i.name(), &i.manifest.digest[..12.min(i.manifest.digest.len())]))
                .collect();
            eprintln!(
                "dough serve: images: {}",
                if images.is_empty() {
                    "none (dough image build)".to_string()
                } else {
                    images.join(", ")
                }
            );
            for p in &svc.config().pools {
                eprintln!(
                    "dough serve: warm pool of {} VMs ({} vCPU, {} MiB, image {}) filling",
                    p.size, p.shape.vcpus, p.shape.memory_mib, p.shape.image
                );
            }
            let app = crate::api::router(crate::api::Api {
                svc: svc.clone(),
                token: Arc::new(token),
            });
            // Not a graceful HTTP shutdown: event streams never end by
            // themselves. The tasks are what must end cleanly.
            tokio::select! {
                r = crate::http::serve(listener, app) => r?,
                _ = super::run::interrupted() => {}
            }
            // Shutting down: nothing new starts; running tasks are cancelled
            // and their VMs torn down before we exit.
            eprintln!("dough serve: shutting down; cancelling running tasks");
            svc.stop_admitting();
            for t in svc.in_flight_here()? {
                let _ = svc.cancel(&t.id);
            }
            let deadline = tokio::time::Instant::now() + svc.config().cancel_grace + Duration::from_secs(30);
            while !svc.in_flight_here()?.is_empty() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if svc.pools().is_some() {
                eprintln!("dough serve: tearing down the warm pools");
                for e in svc.shutdown_pools().await {
                    eprintln!("dough serve: pool teardown: {e}");
                }
            }
            if let Err(e) = svc.beat("stopped") {
                eprintln!("dough serve: record this node stopped: {e}");
            }
            drop(lock);
            Ok::<u8, anyhow::Error>(0)
        })
        .await
}
