//! The network isolation matrix with real VMs: Dough runs inside a test-made
//! "host" namespace whose uplink leads to a test-made "internet" namespace
//! (servers on public, private and metadata addresses, a DNS server in a
//! private range). Nothing here touches the machine's own network.
mod common;
#[path = "../../dough-net/tests/world/mod.rs"]
mod world;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use world::*;

/// `cmd` runs in namespace `ns` (the test's "host").
fn in_host(mut cmd: Command, ns: &str) -> Command {
    in_netns(&mut cmd, ns);
    // No host NAT: the internet routes the pool back and sees slot addresses.
    cmd.env("DOUGH_DNS", DNS.to_string())
        .env("DOUGH_HOST_NAT", "0");
    cmd
}

fn leases_of(h: &Harness) -> Vec<(std::path::PathBuf, dough_net::SlotRecord)> {
    let tag = h.state.path().display().to_string();
    dough_net::slot_leases(std::path::Path::new("/run/dough/slots"))
        .into_iter()
        .filter_map(|(n, r)| r.filter(|r| r.tag == tag).map(|r| (n, r)))
        .collect()
}

const MATRIX: &str = r#"
echo "links: $(ls /sys/class/net | tr '\n' ' ')"
echo "seen: $(curl -sS -m 5 http://198.51.100.10/)"
echo "dns: $(getent hosts allowed.example | cut -d' ' -f1)"
ip -6 route get 2001:db8::1 >/dev/null 2>&1; echo "v6 route: $?"
echo "v6 addresses: $(ip -6 -o addr show scope global | wc -l)"
for t in $TARGETS; do
  curl -sS -m 3 -o /dev/null "http://$t/" 2>/dev/null
  echo "target $t rc=$?"
done
"#;

const ALLOWLIST: &str = r#"
echo "allowed: $(curl -sS -m 5 http://allowed.example/)"
getent hosts other.example >/dev/null; echo "other resolves: $?"
echo "198.51.100.11 other.example" >> /etc/hosts
curl -sS -m 3 -o /dev/null http://other.example/ 2>/dev/null; echo "other via /etc/hosts: $?"
"#;

#[test]
fn real_vms_reach_the_internet_and_nothing_else() {
    let h = Harness::new();
    let w = World::new("v");
    let cfg = w.config(false);

    // VM B: another VM running alongside.
    let mut b = in_host(h.cmd(), &w.host);
    b.args(["run", "--", "sh", "-c", "echo ready; sleep 120"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut b = b.spawn().unwrap();
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(b.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "ready\n");
    }
    let leases = leases_of(&h);
    assert_eq!(leases.len(), 1, "{leases:?}");
    let b_rec = &leases[0].1;
    let b_slot = (0..cfg.slot_count())
        .find(|n| cfg.slot_lease(*n) == leases[0].0)
        .expect("B's lease is a slot of the pool");
    let (b_host, b_ns) = cfg.slot_addrs(b_slot);

    // Control: each target of the matrix really serves.
    for p in PRIVATE_SERVERS.iter().chain([&METADATA]) {
        assert!(fetch(&w.host, std::net::SocketAddr::new((*p).into(), WEB_PORT)).is_ok());
    }
    assert!(fetch(
        &w.inet,
        std::net::SocketAddr::new(HOST_UPLINK.into(), HOST_PORT)
    )
    .is_ok());

    let mut targets = vec![
        format!("{HOST_UPLINK}:{HOST_PORT}"),
        format!("{b_ns}:{WEB_PORT}"),
        format!("{b_host}:{HOST_PORT}"),
        format!("{METADATA}:{WEB_PORT}"),
        format!("172.16.0.1:{HOST_PORT}"),
    ];
    // The host's end of the first slots' veths (this VM's own among them).
    for n in 0..4 {
        targets.push(format!("{}:{HOST_PORT}", cfg.slot_addrs(n).0));
    }
    targets.extend(PRIVATE_SERVERS.iter().map(|p| format!("{p}:{WEB_PORT}")));
    let out = in_host(h.cmd(), &w.host)
        .args([
            "run",
            "--network-summary",
            "--env",
            &format!("TARGETS={}", targets.join(" ")),
        ])
        .args(["--", "bash", "-c", MATRIX])
        .output()
        .unwrap();
    let so = text(&out.stdout);
    assert!(out.status.success(), "{so}\n{}", text(&out.stderr));
    assert!(so.contains("links: eth0 lo \n"), "{so}");
    // The internet sees the VM's slot address, never the guest's.
    let seen: std::net::Ipv4Addr = so
        .lines()
        .find_map(|l| l.strip_prefix("seen: "))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no address seen: {so}"));
    assert!(cfg.pool.contains(seen) && seen != b_ns, "{seen}");
    assert_eq!(u32::from(seen) % 4, 2, "a slot's namespace end: {seen}");
    assert!(so.contains(&format!("dns: {ALLOWED_WEB}\n")), "{so}");
    // No IPv6: no route anywhere and no global address in the guest ...
    assert!(so.contains("v6 addresses: 0\n"), "{so}");
    let v6 = so
        .lines()
        .find_map(|l| l.strip_prefix("v6 route: "))
        .unwrap_or_else(|| panic!("no v6 line: {so}"));
    assert_ne!(v6, "0", "the guest has a v6 route: {so}");
    // ... and v6 disabled in the VM's namespace (B's, still running).
    let b_ns = dough_net::netns_path(&b_rec.vm_id)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    let disabled = in_ns(&b_ns, || {
        ["all", "default"].map(|c| {
            std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{c}/disable_ipv6"))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|e| format!("unreadable: {e}"))
        })
    });
    assert_eq!(disabled, ["1", "1"], "IPv6 in B's namespace");
    for t in &targets {
        let line = so
            .lines()
            .find(|l| l.starts_with(&format!("target {t} ")))
            .unwrap_or_else(|| panic!("no result for {t}: {so}"));
        let rc: i32 = line
            .split("rc=")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        // curl's 7 is "could not connect": the reset of a REJECT. A silent
        // DROP would end in -m 3's timeout, 28, however fast the machine.
        assert_eq!(rc, 7, "{t} was not rejected: {line}");
    }
    // `dough run` ends with what the host saw: one host reached (the web
    // server), every target blocked.
    let distinct: std::collections::BTreeSet<&String> = targets.iter().collect();
    let se = text(&out.stderr);
    let summary = se
        .lines()
        .find_map(|l| l.strip_prefix("dough: network: "))
        .unwrap_or_else(|| panic!("no network summary: {se}"));
    assert!(
        summary.starts_with(&format!("reached 1 host, {} blocked: ", distinct.len())),
        "{summary}"
    );

    // Allowlist mode in a third VM.
    let out = in_host(h.cmd(), &w.host)
        .args([
            "run",
            "--network-summary",
            "--root",
            "--allow-host",
            ALLOWED_NAME,
        ])
        .args(["--", "bash", "-c", ALLOWLIST])
        .output()
        .unwrap();
    let so = text(&out.stdout);
    assert!(out.status.success(), "{so}\n{}", text(&out.stderr));
    assert!(so.contains("allowed: 10.213."), "{so}");
    assert!(so.contains("other resolves: 2\n"), "{so}");
    let via_hosts = so
        .lines()
        .find_map(|l| l.strip_prefix("other via /etc/hosts: "))
        .unwrap_or_else(|| panic!("no /etc/hosts attempt: {so}"));
    assert_eq!(via_hosts, "7", "rejected, not timed out: {so}");
    let se = text(&out.stderr);
    assert!(
        se.contains(
            "dough: network: reached 1 host, 1 blocked: 198.51.100.11:80, 1 DNS name refused\n"
        ),
        "{se}"
    );

    // kill -9 of B's `dough run`: its network stays until `dough gc`.
    signal(b.id(), nix::sys::signal::Signal::SIGKILL);
    b.wait().unwrap();
    let b_vm = b_rec.vm_id.clone();
    assert!(
        dough_net::netns_path(&b_vm).exists(),
        "B's namespace outlives its owner"
    );
    // So does its cgroup (the jail's limits), until gc.
    let layout = dough_vmm::cgroup::Layout::detect().expect("a cgroup layout");
    let cgroups = dough_vmm::cgroup::Cgroup::dirs_for(&layout, &b_vm);
    assert!(
        cgroups.iter().any(|d| d.exists()),
        "B's cgroup outlives its owner: {cgroups:?}"
    );
    let gc = in_host(h.cmd(), &w.host).arg("gc").output().unwrap();
    let gco = text(&gc.stdout);
    assert!(gc.status.success(), "{gco}\n{}", text(&gc.stderr));
    assert!(
        gco.contains(&format!("removed network namespace dough-{b_vm}")),
        "{gco}"
    );
    let left: Vec<_> = cgroups.iter().filter(|d| d.exists()).collect();
    assert!(left.is_empty(), "gc left B's cgroups: {left:?}\n{gco}");
    assert!(
        cgroups
            .iter()
            .any(|d| gco.contains(&format!("removed cgroup {}", d.display()))),
        "{gco}"
    );
    wait_until("B's veth to go", Duration::from_secs(5), || {
        let id = b_vm.clone();
        in_ns(&w.host, move || dough_net::leftovers(&id)).is_empty()
    });
    h.assert_clean();
}
