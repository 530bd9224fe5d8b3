//! The per-VM network against real namespaces and real nftables, with a
//! stand-in guest: a namespace whose `eth0` is a veth named `tap0` on the
//! VM's side (in place of the VMM's TAP; the VM's rules match `tap0` by
//! name). `crates/dough/tests/vm_net.rs` runs the matrix once with real VMs.
mod world;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use dough_net::record::Verdict;
use dough_net::{Egress, VmNet, GATEWAY};
use world::*;

fn web(a: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(a.into(), port)
}

fn setup(w: &World, cfg: &dough_net::NetConfig, id: &str, egress: Egress) -> VmNet {
    let cfg = cfg.clone();
    let id = id.to_string();
    in_ns(&w.host, move || {
        dough_net::prepare_host(&cfg).expect("prepare host");
        VmNet::setup(&cfg, &id, &egress, dough_net::TapSpec::ROOT_FD).expect("setup")
    })
}

/// Teardown, and the finished egress record.
fn teardown_recorded(w: &World, n: VmNet) -> dough_net::EgressRecord {
    let (errs, rec) = in_ns(&w.host, move || n.teardown_recorded());
    assert!(errs.is_empty(), "{errs:?}");
    rec.expect("recording is on")
}

/// The record's entry for `addr:port` with `verdict`.
fn flow(
    rec: &dough_net::EgressRecord,
    addr: Ipv4Addr,
    port: u16,
    verdict: Verdict,
) -> &dough_net::record::Flow {
    rec.flows
        .iter()
        .find(|f| f.addr == addr && f.port == Some(port) && f.verdict == verdict)
        .unwrap_or_else(|| panic!("no {verdict:?} flow to {addr}:{port} in {:#?}", rec.flows))
}

/// Blocked means rejected (docs/network.md): a TCP reset, so the connect
/// fails with ECONNREFUSED. A silent DROP would end in the 3 s timeout
/// instead, and fail this check whatever the machine's speed.
fn assert_blocked(g: &str, a: SocketAddr, what: &str) {
    let r = fetch(g, a);
    match r {
        Ok(body) => panic!("{what} ({a}) was reachable: {body:?}"),
        Err(e) => assert!(
            e.contains("(os error 111)"),
            "{what} ({a}) was not rejected (connection refused) but: {e}"
        ),
    }
}

fn test_id(tag: &str) -> String {
    format!("t{:05}{tag}", std::process::id() % 100000)
}

#[test]
fn open_egress_reaches_the_internet_and_nothing_private() {
    let mut w = World::new("o");
    let cfg = w.config(false);
    let (ida, idb) = (test_id("oa"), test_id("ob"));
    let a = setup(&w, &cfg, &ida, Egress::Open);
    let b = setup(&w, &cfg, &idb, Egress::Open);
    let ga = w.stand_in_guest(&ida);
    let _gb = w.stand_in_guest(&idb);

    // DNS through the gateway, to an upstream in a private range.
    assert_eq!(resolve(&ga, GATEWAY, ALLOWED_NAME), Ok(vec![ALLOWED_WEB]));
    // Out through NAT: the server sees the slot address, not the guest's.
    let seen = fetch(&ga, web(ALLOWED_WEB, WEB_PORT)).expect("internet reachable");
    assert_eq!(seen, a.slot_addr.to_string());
    assert_ne!(a.slot_addr, b.slot_addr);

    // Each blocked target really serves: checked from the host namespace.
    let (host_end_a, _) = cfg.slot_addrs(a.slot);
    let (host_end_b, _) = cfg.slot_addrs(b.slot);
    for p in PRIVATE_SERVERS.iter().chain([&METADATA]) {
        assert!(
            fetch(&w.host, web(*p, WEB_PORT)).is_ok(),
            "control: {p} serves"
        );
    }
    assert!(
        fetch(&w.inet, web(HOST_UPLINK, HOST_PORT)).is_ok(),
        "control: host service"
    );

    assert_blocked(
        &ga,
        web(HOST_UPLINK, HOST_PORT),
        "the host's uplink address",
    );
    assert_blocked(
        &ga,
        web(host_end_a, HOST_PORT),
        "the host's end of the veth",
    );
    // A service bound to exactly that address, not only to 0.0.0.0.
    let bound = std::net::SocketAddr::new(host_end_a.into(), 8082);
    w.serve_tcp(&w.host.clone(), bound);
    assert!(fetch(&w.host, bound).is_ok(), "control: veth-bound service");
    assert_blocked(&ga, bound, "a service bound to the host's veth end");
    assert_blocked(&ga, web(host_end_b, HOST_PORT), "another VM's host veth");
    assert_blocked(&ga, web(b.slot_addr, WEB_PORT), "another VM's slot address");
    assert_blocked(&ga, web(GATEWAY, HOST_PORT), "the gateway");
    assert_blocked(&ga, web(METADATA, WEB_PORT), "the metadata service");
    for p in PRIVATE_SERVERS {
        assert_blocked(&ga, web(*p, WEB_PORT), "a private range");
    }

    // The egress record, from the kernel and the forwarder: the web
    // server reached (its bytes both ways, the name it was resolved from),
    // each refusal with its rule, the DNS question with its answer.
    let b_slot = b.slot_addr;
    let b_rec = teardown_recorded(&w, b);
    assert!(b_rec.flows.is_empty(), "b sent nothing: {b_rec:?}");
    let rec = teardown_recorded(&w, a);
    assert_eq!(rec.policy, "open");
    let web_flow = flow(&rec, ALLOWED_WEB, WEB_PORT, Verdict::Allowed);
    assert_eq!(web_flow.name.as_deref(), Some(ALLOWED_NAME));
    assert_eq!(web_flow.proto, "tcp");
    // A handshake, a request line, the answer (the peer's address), FINs.
    assert!(web_flow.bytes_out >= 3 * 40, "{web_flow:?}");
    assert!(web_flow.bytes_in >= 3 * 40 + 8, "{web_flow:?}");
    assert!(web_flow.first_ms <= web_flow.last_ms && web_flow.first_ms >= rec.started_ms);
    for (addr, port, rule) in [
        (PRIVATE_SERVERS[0], WEB_PORT, "private4"),
        (METADATA, WEB_PORT, "deny4"),
        (HOST_UPLINK, HOST_PORT, "deny4"),
        (b_slot, WEB_PORT, "deny4"),
    ] {
        let f = flow(&rec, addr, port, Verdict::Blocked);
        assert_eq!(f.rule.as_deref(), Some(rule), "{f:?}");
        assert_eq!((f.bytes_out, f.bytes_in), (0, 0));
    }
    assert!(
        rec.flows
            .iter()
            .all(|f| f.verdict == Verdict::Blocked || f.addr == ALLOWED_WEB),
        "only the web server was reached: {:#?}",
        rec.flows
    );
    // The gateway refuses in its input chain (no flow through it).
    assert_eq!(
        flow(&rec, GATEWAY, HOST_PORT, Verdict::Blocked)
            .rule
            .as_deref(),
        Some("gateway")
    );
    let q = rec
        .dns
        .iter()
        .find(|q| q.name == ALLOWED_NAME)
        .expect("dns question");
    assert_eq!((q.qtype.as_str(), q.allowed), ("A", true));
    assert_eq!(q.answers, vec![ALLOWED_WEB]);
    assert_eq!((rec.overflow.flows, rec.lost_events), (0, 0));
    assert!(rec.ended_ms.is_some());
    for id in [&ida, &idb] {
        assert_gone(&w, id);
        let leased = dough_net::slot_leases(&cfg.slots_dir())
            .into_iter()
            .any(|(_, r)| r.is_some_and(|r| &r.vm_id == id));
        assert!(!leased, "the slot of {id} is still leased");
    }
}

/// The namespace is gone at once; its veth within the kernel's cleanup time.
fn assert_gone(w: &World, id: &str) {
    assert!(
        !dough_net::netns_path(id).exists(),
        "namespace of {id} remains"
    );
    let t = Instant::now();
    loop {
        let id2 = id.to_string();
        let left = in_ns(&w.host, move || dough_net::leftovers(&id2));
        if left.is_empty() {
            return;
        }
        assert!(
            t.elapsed() < dough_net::NETNS_CLEANUP,
            "left behind: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn allowlist_passes_only_what_the_forwarder_answered() {
    let mut w = World::new("a");
    // Host NAT on: the internet sees the host's uplink address.
    let cfg = w.config(true);
    let id = test_id("al");
    let egress = Egress::Allow {
        hosts: vec![ALLOWED_NAME.into()],
        cidrs: vec![],
    };
    let n = setup(&w, &cfg, &id, egress);
    let g = w.stand_in_guest(&id);
    // Before resolving, even the allowed server's address is closed.
    assert_blocked(
        &g,
        web(ALLOWED_WEB, WEB_PORT),
        "an address not yet answered",
    );
    assert_eq!(resolve(&g, GATEWAY, ALLOWED_NAME), Ok(vec![ALLOWED_WEB]));
    assert_eq!(
        fetch(&g, web(ALLOWED_WEB, WEB_PORT)).as_deref(),
        Ok(HOST_UPLINK.to_string().as_str())
    );
    // The other name on the same server: refused by DNS, and its address
    // stays closed even when the guest knows it (its own /etc/hosts).
    assert_eq!(resolve(&g, GATEWAY, OTHER_NAME), Err("REFUSED".into()));
    assert_blocked(&g, web(OTHER_WEB, WEB_PORT), "a name not on the allowlist");
    // Recorded: the allowed answer, the refused name, the refusals.
    let live = n.egress_record().expect("recording");
    assert!(live.ended_ms.is_none());
    let rec = teardown_recorded(&w, n);
    assert_eq!(rec.policy, "allowlist");
    let refused = rec
        .dns
        .iter()
        .find(|q| q.name == OTHER_NAME)
        .expect("refused name");
    assert!(!refused.allowed && refused.answers.is_empty());
    let asked = rec
        .dns
        .iter()
        .find(|q| q.name == ALLOWED_NAME)
        .expect("allowed name");
    assert_eq!(
        (asked.allowed, asked.answers.clone()),
        (true, vec![ALLOWED_WEB])
    );
    assert_eq!(
        flow(&rec, OTHER_WEB, WEB_PORT, Verdict::Blocked)
            .rule
            .as_deref(),
        Some("allowlist")
    );
    // The same address: blocked before the answer, allowed after it.
    assert_eq!(
        flow(&rec, ALLOWED_WEB, WEB_PORT, Verdict::Blocked)
            .rule
            .as_deref(),
        Some("allowlist")
    );
    assert!(flow(&rec, ALLOWED_WEB, WEB_PORT, Verdict::Allowed).bytes_in > 0);
}

#[test]
fn egress_none_blocks_even_dns() {
    let mut w = World::new("n");
    let cfg = w.config(true);
    let id = test_id("no");
    let n = setup(&w, &cfg, &id, Egress::None);
    let g = w.stand_in_guest(&id);
    assert_blocked(&g, web(ALLOWED_WEB, WEB_PORT), "the internet");
    assert!(resolve(&g, GATEWAY, ALLOWED_NAME).is_err());
    let rec = teardown_recorded(&w, n);
    assert_eq!(
        flow(&rec, ALLOWED_WEB, WEB_PORT, Verdict::Blocked)
            .rule
            .as_deref(),
        Some("none")
    );
}

#[test]
fn gc_reclaims_the_network_of_a_dead_owner() {
    let w = World::new("g");
    let cfg = w.config(true);
    let id = test_id("gc");
    let n = setup(&w, &cfg, &id, Egress::Open);
    let slot = n.slot;
    // The owner "dies": its lease names a process that is gone, and the
    // VmNet is leaked instead of torn down.
    let lease = cfg.slot_lease(slot);
    let dead = serde_json::json!({"vm_id": id, "owner": {"pid": 999_999_999u32, "start": 1}});
    std::fs::write(&lease, dead.to_string()).unwrap();
    std::mem::forget(n);
    let id2 = id.clone();
    assert!(!in_ns(&w.host, move || dough_net::leftovers(&id2)).is_empty());

    let cfg2 = cfg.clone();
    let r = in_ns(&w.host, move || dough_net::gc(&cfg2.run_root));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(r.removed_netns.contains(&format!("dough-{id}")), "{r:?}");
    let name = format!("{}/30", lease.file_name().unwrap().to_string_lossy());
    assert!(r.released_slots.contains(&name), "{r:?}");
    assert!(!lease.exists());
    assert_gone(&w, &id);
}
