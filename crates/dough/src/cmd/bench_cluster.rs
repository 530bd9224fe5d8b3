//! `dough bench cluster`: nodes of real `dough serve` daemons on one
//! PostgreSQL store (a cluster of the bench's own: Debian's `postgresql`,
//! `initdb` in a temporary directory, run as the `postgres` user):
//! * submit rate and claim rate with 1, 3 and 20 nodes — the nodes run with
//!   `--dry-run` (a claimed task walks its states and ends at once, no VM),
//!   so what is measured is the coordination: claims, states, the store;
//!   every task is checked to have been claimed exactly once;
//! * the time from `kill -9` of a node running a task (a real VM) to that
//!   task settled `node_lost` by a peer, at the default `--node-timeout`;
//! * scheduler latency (room freed → next task provisioning) of one node
//!   on PostgreSQL against the single host's SQLite, in the same run.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

use super::bench_serve::{metric, Daemon};

#[derive(Args, Debug)]
pub struct ClusterBenchArgs {
    /// Tasks per rate measurement.
    #[arg(long, default_value_t = 2000)]
    pub tasks: u32,
    /// Node counts to measure the rates with.
    #[arg(long, value_delimiter = ',', default_value = "1,3,20")]
    pub nodes: Vec<u32>,
    /// Nodes killed for the death measurement (one task each, real VMs).
    #[arg(long, default_value_t = 3)]
    pub deaths: u32,
    /// Tasks through one node for the scheduler latency (samples: this - 1).
    #[arg(long, default_value_t = 300)]
    pub queue: u32,
    /// Tasks each rate node holds at once (a big host's VMs).
    #[arg(long, default_value_t = 64)]
    pub room: u32,
}

/// A PostgreSQL server of the bench's own, stopped when dropped.
struct Pg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

fn run_ok(c: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = c.output().with_context(|| what.to_string())?;
    if !out.status.success() {
        bail!(
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Pg {
    fn start() -> anyhow::Result<Pg> {
        let mut majors: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
            .context("no PostgreSQL server under /usr/lib/postgresql: apt-get install postgresql")?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        majors.sort();
        let Some(m) = majors.pop() else {
            bail!("no PostgreSQL server under /usr/lib/postgresql: apt-get install postgresql")
        };
        let bin = PathBuf::from(format!("/usr/lib/postgresql/{m}/bin"));
        let dir = tempfile::Builder::new()
            .prefix("dough-bench-pg")
            .tempdir_in("/tmp")?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data)?;
        run_ok(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path()),
            "chown",
        )?;
        let as_pg = |prog: &str| {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin.join(prog));
            c
        };
        run_ok(
            as_pg("initdb")
                .args(["--auth=trust", "--username=postgres", "--no-sync", "-D"])
                .arg(&data),
            "initdb",
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        run_ok(
            as_pg("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.path().join("log"))
                .arg("-o")
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=400",
                    dir.path().display()
                ))
                .args(["-w", "start"]),
            "pg_ctl start",
        )?;
        Ok(Pg { dir, bin, port })
    }

    /// A new database's address.
    fn db(&self, name: &str) -> anyhow::Result<String> {
        run_ok(
            Command::new("psql")
                .args(["-X", "-q", "-h", "127.0.0.1", "-p"])
                .arg(self.port.to_string())
                .args(["-U", "postgres", "-d", "postgres", "-c"])
                .arg(format!("CREATE DATABASE {name}")),
            "create a database",
        )?;
        Ok(format!(
            "postgres://postgres@127.0.0.1:{}/{name}",
            self.port
        ))
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// Node `name` of the cluster on `store`, in `dir`, with `token`.
fn node(dir: &Path, store: &str, name: &str, token: &str, more: &[&str]) -> anyhow::Result<Daemon> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("api-token"), token)?;
    let mut args = vec!["--store", store, "--node-name", name];
    args.extend_from_slice(more);
    Daemon::start_logged(dir, &args, Some(&dir.join("serve.log")))
}

fn call(d: &Daemon, a: &ureq::Agent, method: &str, path: &str) -> anyhow::Result<Value> {
    Ok(a.request(method, &format!("{}{path}", d.url))
        .set("Authorization", &format!("Bearer {}", d.token))
        .call()?
        .into_json()?)
}

fn done_count(d: &Daemon, a: &ureq::Agent) -> anyhow::Result<u64> {
    let m = d.get(a, "/metrics")?.into_string()?;
    Ok(["succeeded", "failed", "cancelled", "timed_out"]
        .iter()
        .filter_map(|s| metric(&m, &format!("dough_tasks{{state=\"{s}\"}}")))
        .sum::<f64>() as u64)
}

/// POST `n` tasks through `d` from 4 clients: the time it took.
fn submit(d: &Daemon, n: u32) -> anyhow::Result<Duration> {
    let clients = 4;
    let t = Instant::now();
    let hs: Vec<_> = (0..clients)
        .map(|c| {
            let (url, token) = (d.url.clone(), d.token.clone());
            let count = n / clients + u32::from(c < n % clients);
            std::thread::spawn(move || -> anyhow::Result<()> {
                let ag = Daemon::agent();
                for _ in 0..count {
                    ag.post(&format!("{url}/v1/tasks"))
                        .set("Authorization", &format!("Bearer {token}"))
                        .send_json(json!({"command": ["true"]}))?;
                }
                Ok(())
            })
        })
        .collect();
    for h in hs {
        h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    Ok(t.elapsed())
}

struct Rates {
    nodes: u32,
    submit: f64,
    claim: f64,
    done: f64,
    spread: (u64, u64),
}

/// Submit and claim rates with `n` dry-run nodes.
fn rates(
    pg: &Pg,
    base: &Path,
    n: u32,
    tasks: u32,
    room: u32,
    token: &str,
) -> anyhow::Result<Rates> {
    let store = pg.db(&format!("rates{n}"))?;
    let ag = Daemon::agent();
    // Room for `room` tasks of the default shape (1 vCPU, 512 MiB) each.
    let (vms, overcommit, memory) = (
        room.to_string(),
        (f64::from(room) / host_cpus()).ceil().to_string(),
        (u64::from(room) * 512).to_string(),
    );
    let nodes: Vec<Daemon> = (0..n)
        .map(|i| {
            node(
                &base.join(format!("r{n}-{i}")),
                &store,
                &format!("n{i}"),
                token,
                &[
                    "--dry-run",
                    "--max-vms",
                    &vms,
                    "--overcommit",
                    &overcommit,
                    "--memory-limit",
                    &memory,
                ],
            )
        })
        .collect::<anyhow::Result<_>>()?;
    // Drained while the queue fills, so the two rates are apart.
    for i in 0..n {
        call(&nodes[0], &ag, "POST", &format!("/v1/nodes/n{i}/drain"))?;
    }
    let took = submit(&nodes[0], tasks)?;
    let t = Instant::now();
    // Taken back all at once (each through its own API), so the claims
    // measured are the nodes' racing for the queue, not the resumes' turn.
    std::thread::scope(|sc| {
        let hs: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(i, d)| {
                sc.spawn(move || {
                    call(
                        d,
                        &Daemon::agent(),
                        "DELETE",
                        &format!("/v1/nodes/n{i}/drain"),
                    )
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a resume panicked"))?)
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    while done_count(&nodes[0], &ag)? < tasks as u64 {
        if t.elapsed() > Duration::from_secs(600) {
            bail!("{n} nodes: the tasks did not all end in 10 min");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Exactly once: every task claimed once (epoch 1), and walked its
    // states once.
    let list = call(&nodes[0], &ag, "GET", &format!("/v1/tasks?limit={tasks}"))?;
    let list = list["tasks"].as_array().cloned().unwrap_or_default();
    let mut per_node = std::collections::BTreeMap::<String, u64>::new();
    // The claims' own times (from the store's records, not the clients').
    let (mut first, mut last, mut end) = (u64::MAX, 0u64, 0u64);
    let mut claims = vec![];
    let mut node_first = std::collections::BTreeMap::<String, (u64, u64)>::new();
    for t in &list {
        for x in t["transitions"].as_array().into_iter().flatten() {
            let at = x["at_ms"].as_u64().unwrap_or(0);
            match x["state"].as_str() {
                Some("provisioning") => {
                    first = first.min(at);
                    last = last.max(at);
                    claims.push(at);
                    let e = node_first
                        .entry(t["node"].as_str().unwrap_or("?").to_string())
                        .or_insert((u64::MAX, 0u64));
                    e.0 = e.0.min(at);
                    e.1 = e.1.max(at);
                }
                Some("succeeded") => end = end.max(at),
                _ => {}
            }
        }
        let provisioning = t["transitions"].as_array().map_or(0, |v| {
            v.iter().filter(|x| x["state"] == "provisioning").count()
        });
        if t["state"] != "succeeded" || t["epoch"] != 1 || provisioning != 1 {
            bail!("a task not run exactly once: {t}");
        }
        *per_node
            .entry(t["node"].as_str().unwrap_or("?").into())
            .or_default() += 1;
    }
    claims.sort();
    if let Some(&c0) = claims.first() {
        let at = |q: f64| claims[((claims.len() - 1) as f64 * q) as usize] - c0;
        eprintln!(
            "dough bench cluster: {n} nodes: claims after the first: 25% {} ms, 50% {} ms, 90% {} ms, all {} ms",
            at(0.25),
            at(0.5),
            at(0.9),
            at(1.0)
        );
    }
    if std::env::var_os("DOUGH_BENCH_NODES").is_some() {
        for (name, (a, b)) in &node_first {
            eprintln!(
                "  {name}: first claim +{} ms, last +{} ms",
                a - first,
                b - first
            );
        }
    }
    if list.len() != tasks as usize {
        bail!("{} tasks listed, {tasks} submitted", list.len());
    }
    for d in nodes {
        d.stop();
    }
    let span = |to: u64| (to.saturating_sub(first).max(1)) as f64 / 1000.0;
    Ok(Rates {
        nodes: n,
        submit: tasks as f64 / took.as_secs_f64(),
        claim: (tasks - 1) as f64 / span(last),
        done: tasks as f64 / span(end),
        spread: (
            per_node.values().copied().min().unwrap_or(0),
            per_node.values().copied().max().unwrap_or(0),
        ),
    })
}

fn host_cpus() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

/// Scheduler latency p50 and p99 (ms) of one dry-run node with one slot
/// on `store` (None: its own SQLite).
fn sched(base: &Path, store: Option<&str>, queue: u32, token: &str) -> anyhow::Result<(f64, f64)> {
    let dir = base.join(if store.is_some() {
        "sched-pg"
    } else {
        "sched-sqlite"
    });
    let mut more = vec!["--dry-run", "--max-vms", "1"];
    if let Some(s) = store {
        more.extend(["--store", s]);
    }
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("api-token"), token)?;
    let d = Daemon::start_logged(&dir, &more, Some(&dir.join("serve.log")))?;
    let ag = Daemon::agent();
    submit(&d, queue)?;
    let t = Instant::now();
    while done_count(&d, &ag)? < queue as u64 {
        if t.elapsed() > Duration::from_secs(600) {
            bail!("the queue did not drain in 10 min");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = d.get(&ag, "/metrics")?.into_string()?;
    let p50 = metric(&m, "dough_scheduler_latency_seconds{quantile=\"0.5\"}").unwrap_or(0.0);
    let p99 = metric(&m, "dough_scheduler_latency_seconds{quantile=\"0.99\"}").unwrap_or(0.0);
    d.stop();
    Ok((p50 * 1000.0, p99 * 1000.0))
}

/// `kill -9` of a node running a task (a real VM) → the task settled
/// `node_lost` by the peer, each of `deaths` times.
fn deaths(pg: &Pg, base: &Path, deaths: u32, token: &str) -> anyhow::Result<Vec<Duration>> {
    let store = pg.db("deaths")?;
    let ag = Daemon::agent();
    let peer = node(
        &base.join("peer"),
        &store,
        "peer",
        token,
        &["--max-vms", "0"],
    )?;
    let mut out = vec![];
    for i in 0..deaths {
        let victim = node(
            &base.join("victim"),
            &store,
            "victim",
            token,
            &["--max-vms", "1"],
        )?;
        let id = peer.post(
            &ag,
            &json!({"command": ["sh", "-c", "echo up; exec sleep 600"], "egress": "none"}),
        )?;
        let t = Instant::now();
        while call(&peer, &ag, "GET", &format!("/v1/tasks/{id}"))?["state"] != "running" {
            if t.elapsed() > Duration::from_secs(120) {
                bail!("death {i}: the task did not start");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut child = victim.child;
        child.kill()?;
        let killed = Instant::now();
        child.wait()?;
        loop {
            let t = call(&peer, &ag, "GET", &format!("/v1/tasks/{id}"))?;
            if t["state"] == "failed" {
                if t["reason"] != "node_lost" {
                    bail!("death {i}: the task ended {t}");
                }
                break;
            }
            if killed.elapsed() > Duration::from_secs(120) {
                bail!("death {i}: the task was not settled in 2 min: {t}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        out.push(killed.elapsed());
    }
    peer.stop();
    let _ = std::fs::remove_dir_all(base.join("victim"));
    Ok(out)
}

pub fn run(a: &ClusterBenchArgs) -> anyhow::Result<u8> {
    let base = std::env::temp_dir().join(format!("dough-bench-cluster-{}", std::process::id()));
    let token = format!("bench-cluster-{}", std::process::id());
    eprintln!("dough bench cluster: starting PostgreSQL");
    let pg = Pg::start()?;
    let result = (|| -> anyhow::Result<()> {
        let mut rows = vec![];
        for &n in &a.nodes {
            eprintln!("dough bench cluster: {} tasks, {n} nodes", a.tasks);
            rows.push(rates(&pg, &base, n.max(1), a.tasks, a.room, &token)?);
        }
        eprintln!("dough bench cluster: scheduler latency, SQLite and PostgreSQL");
        let lite = sched(&base, None, a.queue, &token)?;
        let store = pg.db("sched")?;
        let post = sched(&base, Some(&store), a.queue, &token)?;
        eprintln!("dough bench cluster: {} node deaths", a.deaths);
        let dead = deaths(&pg, &base, a.deaths, &token)?;

        println!("## dough bench cluster — one run");
        println!();
        println!("Rates: `--dry-run` nodes (real daemons; a claimed task walks its states");
        println!(
            "and ends without a VM), each with room for {} tasks at once; {} tasks,",
            a.room, a.tasks
        );
        println!("4 clients; every task checked to have been claimed exactly once. Claims");
        println!("are placement (queued → provisioning): where the burst is bigger than the");
        println!("cluster's room, they follow the ends.");
        println!();
        println!(
            "| nodes | submit | claims | claimed → ended | tasks per node (min–max) | target |"
        );
        println!("|---|---|---|---|---|---|");
        for r in &rows {
            println!(
                "| {} | {:.0}/s | **{:.0}/s** | {:.0}/s | {}–{} | {} |",
                r.nodes,
                r.submit,
                r.claim,
                r.done,
                r.spread.0,
                r.spread.1,
                if r.nodes >= 20 {
                    "claims ≥ 1000/s"
                } else {
                    ""
                }
            );
        }
        let d = super::bench::median(dead.clone());
        let mut sorted = dead.clone();
        sorted.sort();
        println!();
        println!(
            "| measure | result | target |\n|---|---|---|\n| `kill -9` of a node → its task `node_lost` ({} deaths, `--node-timeout` 10 s) | p50 **{:.1} s** (min {:.1}, max {:.1}) | ≤ 12 s p50 |",
            dead.len(),
            d.as_secs_f64(),
            sorted.first().map_or(0.0, |x| x.as_secs_f64()),
            sorted.last().map_or(0.0, |x| x.as_secs_f64()),
        );
        println!(
            "| scheduler latency, one node, `--max-vms 1`, {} tasks: SQLite | p50 {:.2} ms, p99 {:.2} ms | baseline |",
            a.queue, lite.0, lite.1
        );
        println!(
            "| the same on PostgreSQL | p50 **{:.2} ms**, p99 {:.2} ms | **{:.1}×** SQLite's p50 |",
            post.0,
            post.1,
            if lite.0 > 0.0 { post.0 / lite.0 } else { 0.0 }
        );
        Ok(())
    })();
    drop(pg);
    let _ = std::fs::remove_dir_all(&base);
    result?;
    Ok(0)
}
