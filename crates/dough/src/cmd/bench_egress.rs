//! `dough bench egress`: what the egress record costs a guest. Real VMs
//! open connections and download from a server, with the record on and off,
//! alternating in the same run; then one task opens 10 000 connections and
//! the size of its record is reported.
//!
//! Under TCG two runs of the same kind differ by far more than the record
//! could cost, so the host's own cost is also measured without a VM: a
//! *stand-in guest* (a namespace whose `eth0` is a veth named `tap0` in the
//! VM's namespace, as in `dough-net`'s isolation tests) opens connections at
//! native speed through the same namespace, rules and record — a worst case,
//! since nothing else takes time.
//!
//! Everything runs in namespaces the bench makes and deletes: a stand-in
//! host (where the VMs' namespaces hang off, with Dough's host table) and a
//! stand-in internet (the server), linked by a veth. The machine's own
//! network is not touched.
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use dough_core::{run_task, Event, Outcome, TaskSpec};
use dough_net::Egress;
use dough_proto::Stream;

use super::bench_net::sh;
use crate::Cli;

#[derive(Args, Debug)]
pub struct EgressBenchArgs {
    /// Runs with the record on, and as many with it off: in pairs, which
    /// of the two goes first alternating (an odd N is rounded up: the first
    /// run of a pair tends to be slower, and each mode must go first as
    /// often).
    #[arg(short, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub n: u32,
    /// Connections per run.
    #[arg(long, default_value_t = 2000)]
    pub connections: u32,
    /// MiB downloaded per run.
    #[arg(long, default_value_t = 64)]
    pub mib: u32,
    /// Only the stand-in guest's rounds (no VM: seconds, not minutes).
    #[arg(long)]
    pub stand_in_only: bool,
}

const HOST_NS: &str = "db-egress-host";
const INET_NS: &str = "db-egress-inet";
const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// Accepts and closes.
const CONNECT_PORT: u16 = 9000;
/// Sends `--mib` MiB and closes.
const BULK_PORT: u16 = 9001;

/// The two namespaces, deleted when dropped.
struct Topology;

impl Topology {
    fn make() -> anyhow::Result<Topology> {
        let _ = Topology::remove();
        sh(&["ip", "netns", "add", HOST_NS])?;
        let t = Topology;
        sh(&["ip", "netns", "add", INET_NS])?;
        for ns in [HOST_NS, INET_NS] {
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        sh(&[
            "ip", "-n", HOST_NS, "link", "add", "up0", "type", "veth", "peer", "name", "down0",
            "netns", INET_NS,
        ])?;
        sh(&[
            "ip",
            "-n",
            HOST_NS,
            "addr",
            "add",
            &format!("{HOST_ADDR}/24"),
            "dev",
            "up0",
        ])?;
        sh(&[
            "ip",
            "-n",
            INET_NS,
            "addr",
            "add",
            &format!("{SERVER}/24"),
            "dev",
            "down0",
        ])?;
        sh(&["ip", "-n", HOST_NS, "link", "set", "up0", "up"])?;
        sh(&["ip", "-n", INET_NS, "link", "set", "down0", "up"])?;
        sh(&[
            "ip",
            "-n",
            HOST_NS,
            "route",
            "add",
            "default",
            "via",
            &SERVER.to_string(),
        ])?;
        Ok(t)
    }

    fn remove() -> anyhow::Result<()> {
        let a = sh(&["ip", "netns", "del", HOST_NS]);
        let b = sh(&["ip", "netns", "del", INET_NS]);
        a.and(b)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = Topology::remove();
    }
}

fn enter(ns: &str) -> anyhow::Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
    Ok(())
}

/// The server's two ports, on threads in the internet namespace.
fn serve(mib: u32) -> anyhow::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    std::thread::spawn(move || {
        let listen = || -> anyhow::Result<(TcpListener, TcpListener)> {
            enter(INET_NS)?;
            Ok((
                TcpListener::bind(SocketAddr::new(SERVER.into(), CONNECT_PORT))?,
                TcpListener::bind(SocketAddr::new(SERVER.into(), BULK_PORT))?,
            ))
        };
        let (conn, bulk) = match listen().and_then(|(c, b)| {
            // A deeper accept queue than std's 128: the guests connect
            // faster than this thread accepts when it is not scheduled for
            // a moment, and an overflow costs a connection a one-second
            // retransmission.
            for l in [&c, &b] {
                // SAFETY: listen(2) again on a listening socket we own
                // only changes its backlog.
                if unsafe { libc::listen(l.as_raw_fd(), 4096) } != 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
            }
            Ok((c, b))
        }) {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let _ = tx.send(Ok(()));
        std::thread::spawn(move || {
            let chunk = vec![0x5au8; 1 << 20];
            for s in bulk.incoming().flatten() {
                let chunk = chunk.clone();
                std::thread::spawn(move || {
                    let mut s = s;
                    for _ in 0..mib {
                        if s.write_all(&chunk).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        for s in conn.incoming().flatten() {
            let mut s = s;
            let _ = s.read(&mut [0u8; 1]);
        }
    });
    rx.recv().context("the server thread")?
}

fn script(connections: u32, mib: u32) -> String {
    format!(
        r#"
t0=$(date +%s%N)
for i in $(seq 1 {connections}); do exec 3<>/dev/tcp/{SERVER}/{CONNECT_PORT}; exec 3>&-; done
t1=$(date +%s%N)
n=$(cat < /dev/tcp/{SERVER}/{BULK_PORT} | wc -c)
t2=$(date +%s%N)
echo "connect_us $(( (t1 - t0) / 1000 ))"
echo "bulk_us $(( (t2 - t1) / 1000 )) bytes $n"
[ "$n" = "{bytes}" ]
"#,
        bytes = mib as u64 * (1 << 20)
    )
}

/// Connections per batch of a stand-in round, and batches per guest.
const STAND_IN_BATCH: u32 = 500;
const STAND_IN_BATCHES: u32 = 10;
/// A connection taking this long waited for a retransmission: something
/// dropped a packet (the round says how many did).
const STALLED: Duration = Duration::from_millis(200);

/// A stand-in guest: the namespace `ns`, whose eth0 is a veth named tap0
/// in the VM's namespace `vmns` (in place of the TAP a VM would use).
fn stand_in_guest(vmns: &str, ns: &str) -> anyhow::Result<()> {
    let _ = sh(&["ip", "netns", "del", ns]);
    sh(&["ip", "netns", "add", ns])?;
    sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
    sh(&["ip", "-n", vmns, "link", "del", "tap0"])?;
    sh(&[
        "ip", "-n", vmns, "link", "add", "tap0", "type", "veth", "peer", "name", "eth0", "netns",
        ns,
    ])?;
    sh(&[
        "ip",
        "-n",
        vmns,
        "addr",
        "add",
        "172.16.0.1/30",
        "dev",
        "tap0",
    ])?;
    sh(&["ip", "-n", vmns, "link", "set", "tap0", "up"])?;
    sh(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        "172.16.0.2/30",
        "dev",
        "eth0",
    ])?;
    sh(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
    sh(&[
        "ip",
        "-n",
        ns,
        "route",
        "add",
        "default",
        "via",
        "172.16.0.1",
    ])?;
    Ok(())
}

/// What a connecting thread did with one batch: its time, and how many of
/// its connections stalled.
type Batch = anyhow::Result<(Duration, u32)>;

/// A thread in the namespace `ns` that, for each count it is sent, opens
/// and closes that many connections to the server and answers with the
/// time they took. It ends when its sender is dropped.
fn connector(
    ns: String,
) -> (
    std::sync::mpsc::Sender<u32>,
    std::sync::mpsc::Receiver<Batch>,
) {
    let (go, work) = std::sync::mpsc::channel::<u32>();
    let (done, took) = std::sync::mpsc::channel::<Batch>();
    std::thread::spawn(move || {
        if let Err(e) = enter(&ns) {
            let _ = done.send(Err(e));
            return;
        }
        let to = SocketAddr::new(SERVER.into(), CONNECT_PORT);
        for n in work {
            let batch = (|| {
                let mut stalled = 0;
                let t0 = std::time::Instant::now();
                for _ in 0..n {
                    let t = std::time::Instant::now();
                    drop(std::net::TcpStream::connect(to)?);
                    if t.elapsed() > STALLED {
                        stalled += 1;
                    }
                }
                Ok((t0.elapsed(), stalled))
            })();
            if done.send(batch).is_err() {
                return;
            }
        }
    });
    (go, took)
}

/// One stand-in round measures both modes side by side: two VM networks
/// at once, one recording and one not, each with a stand-in guest; the two
/// guests take turns, a batch of connections each (which goes first
/// alternating), so both meet the machine in the same state — on two
/// cores its speed drifts by a quarter between one round and the next.
struct Round {
    on: Duration,
    off: Duration,
    stalled: u32,
    /// Connections in the record.
    seen: u64,
}

fn stand_in_round(base: &dough_net::NetConfig, round: u32) -> anyhow::Result<Round> {
    let mut nets = vec![];
    let mut turns = vec![];
    let mut made = || -> anyhow::Result<()> {
        for record in [true, false] {
            let mut cfg = base.clone();
            cfg.record_egress = record;
            let mode = if record { "on" } else { "off" };
            let id = format!("dbeg{round}{mode}");
            let ns = format!("db-egress-g{mode}");
            let net =
                dough_net::VmNet::setup(&cfg, &id, &Egress::Open, dough_net::TapSpec::ROOT_FD)?;
            nets.push((id.clone(), ns.clone(), net));
            dough_net::prepare_host(&cfg)?;
            stand_in_guest(&format!("dough-{id}"), &ns)?;
            turns.push(connector(ns));
        }
        Ok(())
    };
    let made = made();
    let timed = made.and_then(|()| {
        let (mut on, mut off, mut stalled) = (Duration::ZERO, Duration::ZERO, 0);
        for b in 0..STAND_IN_BATCHES {
            for g in [b % 2, 1 - b % 2] {
                let (go, took) = &turns[g as usize];
                go.send(STAND_IN_BATCH)?;
                let (d, s) = took.recv().context("a connecting thread ended")??;
                *if g == 0 { &mut on } else { &mut off } += d;
                stalled += s;
            }
        }
        Ok((on, off, stalled))
    });
    drop(turns);
    let mut record = None;
    let mut errs = vec![];
    for (id, ns, net) in nets {
        let (e, rec) = net.teardown_recorded();
        errs.extend(e);
        record = record.or(rec);
        let _ = sh(&["ip", "netns", "del", &ns]);
        // The kernel destroys the namespace in the background: the next
        // round starts once its devices are gone, not while it works on them.
        let t = std::time::Instant::now();
        while !dough_net::leftovers(&id).is_empty() && t.elapsed() < dough_net::NETNS_CLEANUP {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if !errs.is_empty() {
        bail!("teardown: {errs:?}");
    }
    let (on, off, stalled) = timed?;
    // What is measured is a record that works: the connections are in it.
    // Not always exactly: the server resets a few connections now and then,
    // the guest may reuse such a port at once, and the kernel can track a
    // retried connection twice; more than 1 % off is a broken record.
    let record = record.context("the recording network has no record")?;
    let seen: u64 = record
        .flows
        .iter()
        .filter(|f| f.addr == SERVER && f.port == Some(CONNECT_PORT))
        .map(|f| f.count)
        .sum();
    let n = STAND_IN_CONNECTIONS as u64;
    if seen.abs_diff(n) * 100 > n || record.lost_events != 0 {
        bail!(
            "the record holds {seen} of the {n} connections ({} events lost)",
            record.lost_events
        );
    }
    Ok(Round {
        on,
        off,
        stalled,
        seen,
    })
}

/// The stand-in rounds, summed up.
struct StandIn {
    /// Medians of the rates, connections/s.
    on: f64,
    off: f64,
    /// The median of the rounds' on/off ratios of rates.
    ratio: f64,
    stalled: u32,
    /// Connections in the records, and opened.
    seen: u64,
    opened: u64,
}

impl StandIn {
    fn of(rounds: &[Round]) -> StandIn {
        let rate = |d: Duration| STAND_IN_CONNECTIONS as f64 / d.as_secs_f64().max(1e-9);
        let med = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            match v.len() {
                0 => f64::NAN,
                n if n % 2 == 1 => v[n / 2],
                n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
            }
        };
        StandIn {
            on: med(rounds.iter().map(|r| rate(r.on)).collect()),
            off: med(rounds.iter().map(|r| rate(r.off)).collect()),
            ratio: med(rounds
                .iter()
                .map(|r| r.off.as_secs_f64() / r.on.as_secs_f64().max(1e-9))
                .collect()),
            stalled: rounds.iter().map(|r| r.stalled).sum(),
            seen: rounds.iter().map(|r| r.seen).sum(),
            opened: rounds.len() as u64 * STAND_IN_CONNECTIONS as u64,
        }
    }

    fn row(&self) {
        println!(
            "| stand-in guest (no VM), connections/s | {:.0} | {:.0} | {:.3} (median of the rounds' ratios) |",
            self.off, self.on, self.ratio
        );
    }

    /// What to know besides the ratio.
    fn notes(&self) -> String {
        let mut s = format!(
            "\nthe stand-in records hold {} connections of {} opened",
            self.seen, self.opened
        );
        if self.stalled > 0 {
            s += &format!(
                "\n{} stand-in connections stalled (waited for a retransmission): those rounds measure a dropped packet, not the record",
                self.stalled
            );
        }
        s
    }
}

/// Connections per stand-in guest and round.
const STAND_IN_CONNECTIONS: u32 = STAND_IN_BATCH * STAND_IN_BATCHES;

const WIDE: &str = r#"
for p in $(seq 20000 29999); do : 2>/dev/null 3<>/dev/tcp/203.0.113.2/$p; done
true
"#;

struct Sample {
    connect: Duration,
    bulk: Duration,
}

async fn one(
    host: &dough_core::HostConfig,
    command: &str,
) -> anyhow::Result<(String, Option<dough_net::EgressRecord>)> {
    let spec = TaskSpec {
        command: vec!["bash".into(), "-c".into(), command.into()],
        network: Some(Egress::Open),
        timeout: Some(Duration::from_secs(900)),
        ..TaskSpec::default()
    };
    let mut out = Vec::new();
    let rep = run_task(
        host,
        &spec,
        &mut |e| {
            if let Event::Output(Stream::Stdout, d) = e {
                out.extend_from_slice(d);
            }
        },
        std::future::pending(),
    )
    .await;
    let out = String::from_utf8_lossy(&out).into_owned();
    match &rep.result {
        Ok(Outcome::Exited(s)) if s.shell_code() == 0 => Ok((out, rep.egress)),
        Ok(o) => bail!("the guest's run ended {o:?}: {out}"),
        Err(e) => bail!("{e}"),
    }
}

fn field(out: &str, key: &str) -> anyhow::Result<Duration> {
    let us: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {key} in the guest's output: {out}"))?;
    Ok(Duration::from_micros(us))
}

pub async fn run(cli: &Cli, a: &EgressBenchArgs) -> anyhow::Result<u8> {
    let base = super::host_config(
        cli,
        dough_vmm::AccelChoice::Auto,
        dough_vmm::BackendChoice::Auto,
    )
    .with_net_env()
    .map_err(anyhow::Error::msg)?;
    let _topo = Topology::make()?;
    serve(a.mib)?;
    let (n, conns, mib) = (a.n + a.n % 2, a.connections, a.mib);
    let vms = !a.stand_in_only;
    // The VMs run from a thread of their own in the stand-in host: it and
    // every thread it starts (a VM's network thread among them) live there.
    let res = std::thread::spawn(move || -> anyhow::Result<_> {
        enter(HOST_NS)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut on = vec![];
            let mut off = vec![];
            let mut wide = None;
            if vms {
                eprintln!("a warm-up run, not counted");
                one(&base, &script(conns, mib)).await?;
            }
            for i in (0..n).filter(|_| vms) {
                for record in [i % 2 == 0, i % 2 != 0] {
                    let mut host = base.clone();
                    host.record_egress = record;
                    eprintln!(
                        "run {}/{n}, record {}",
                        i + 1,
                        if record { "on" } else { "off" }
                    );
                    let (out, rec) = one(&host, &script(conns, mib)).await?;
                    if record != rec.is_some() {
                        bail!("record {record} but the run's record is {rec:?}");
                    }
                    let s = Sample {
                        connect: field(&out, "connect_us ")?,
                        bulk: field(&out, "bulk_us ")?,
                    };
                    eprintln!(
                        "  connections {:.0}/s, download {:.1} MiB/s",
                        conns as f64 / s.connect.as_secs_f64().max(1e-9),
                        mib as f64 / s.bulk.as_secs_f64().max(1e-9)
                    );
                    if record { &mut on } else { &mut off }.push(s);
                }
            }
            if vms {
                eprintln!("one task opening 10 000 connections, record on");
                let mut host = base.clone();
                host.record_egress = true;
                let (_, rec) = one(&host, WIDE).await?;
                wide = Some(rec.context("the wide run has no record")?);
            }
            // The stand-in guests, both modes in each round.
            let mut rounds = vec![];
            let cfg = base.net_config()?;
            for i in 0..n {
                let r = stand_in_round(&cfg, i)?;
                eprintln!(
                    "stand-in round {}/{n}: record on {:.0} connections/s, off {:.0}/s, on/off {:.3}{}",
                    i + 1,
                    STAND_IN_CONNECTIONS as f64 / r.on.as_secs_f64(),
                    STAND_IN_CONNECTIONS as f64 / r.off.as_secs_f64(),
                    r.off.as_secs_f64() / r.on.as_secs_f64(),
                    if r.stalled > 0 {
                        format!(" ({} connections stalled)", r.stalled)
                    } else {
                        String::new()
                    }
                );
                rounds.push(r);
            }
            Ok((on, off, wide, rounds))
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the bench thread panicked"))??;
    let (on, off, wide, rounds) = res;
    let stand_in = StandIn::of(&rounds);
    if !vms {
        println!("## Egress record cost, stand-in guests only ({n} rounds, each {STAND_IN_CONNECTIONS} connections per mode, interleaved; medians)\n");
        println!("| | record off (baseline) | record on | on / off |");
        println!("|---|---:|---:|---:|");
        stand_in.row();
        println!(
            "\nslowdown: {:+.1} % (target: at most 5 % slower){}",
            (1.0 / stand_in.ratio - 1.0) * 100.0,
            stand_in.notes()
        );
        return Ok(0);
    }
    let med =
        |v: &[Sample], f: fn(&Sample) -> Duration| super::bench::median(v.iter().map(f).collect());
    let rate = |d: Duration| conns as f64 / d.as_secs_f64().max(1e-9);
    let tput = |d: Duration| mib as f64 / d.as_secs_f64().max(1e-9);
    let (con_on, con_off) = (med(&on, |s| s.connect), med(&off, |s| s.connect));
    let (bulk_on, bulk_off) = (med(&on, |s| s.bulk), med(&off, |s| s.bulk));
    println!(
        "## Egress record cost ({n} runs each way, interleaved; {conns} connections and {mib} MiB per run; medians)\n"
    );
    println!("| | record off (baseline) | record on | on / off |");
    println!("|---|---:|---:|---:|");
    println!(
        "| connections/s | {:.0} | {:.0} | {:.3} |",
        rate(con_off),
        rate(con_on),
        rate(con_on) / rate(con_off)
    );
    println!(
        "| download MiB/s | {:.1} | {:.1} | {:.3} |",
        tput(bulk_off),
        tput(bulk_on),
        tput(bulk_on) / tput(bulk_off)
    );
    stand_in.row();
    let wide = wide.context("no wide run")?;
    let json = serde_json::to_string(&wide)?;
    let itemised: u64 = wide.flows.iter().map(|f| f.count).sum();
    println!();
    println!(
        "slowdown: connections {:+.1} %, download {:+.1} %, stand-in connections {:+.1} % (target: at most 5 % slower)",
        (con_on.as_secs_f64() / con_off.as_secs_f64() - 1.0) * 100.0,
        (bulk_on.as_secs_f64() / bulk_off.as_secs_f64() - 1.0) * 100.0,
        (1.0 / stand_in.ratio - 1.0) * 100.0,
    );
    println!("{}", stand_in.notes().trim_start());
    println!(
        "a task opening 10 000 connections: record {} KiB of JSON, {} destinations kept, {} connections itemised, {} counted past the bound, {} events lost",
        json.len() >> 10,
        wide.flows.len(),
        itemised,
        wide.overflow.flows,
        wide.lost_events
    );
    Ok(0)
}
