//! Tier 2 (real VMs, a real daemon): `dough bench faults` in small. Each
//! kind of fault once, in an order drawn from the seed — the VMM killed and
//! stopped, the vsock backend killed, the daemon killed and restarted, a
//! guest kernel panic, OOM and full disk, an output flood, the host's
//! state directory full, cancels while
//! queued, booting and running — then the leak audit (processes, network
//! namespaces and veths, slot and uid leases, cgroups, run dirs, jails,
//! mounts, templates, the daemon's descriptors and panics).
mod common;

use common::*;

#[test]
fn every_fault_ends_as_documented_and_leaves_nothing() {
    let h = Harness::new();
    let out = h
        .cmd()
        .args(["bench", "faults", "--tasks", "13", "--seed", "5"])
        .output()
        .unwrap();
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{so}\n{se}");
    assert!(
        so.contains("ok: every end as documented, nothing left"),
        "{so}"
    );
    // Every kind of fault ran once, as documented.
    let rows: Vec<&str> = so
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("daemon "))
        .collect();
    assert_eq!(rows.len(), 13, "{so}");
    for r in rows {
        let cols: Vec<&str> = r.split_whitespace().collect();
        let n = cols.iter().position(|c| c.parse::<u32>().is_ok()).unwrap();
        assert_eq!((cols[n], cols[n + 1]), ("1", "1"), "{r}");
    }
    assert!(
        so.contains("leaks: 0\n") && so.contains("daemon panics: 0\n"),
        "{so}"
    );
}
