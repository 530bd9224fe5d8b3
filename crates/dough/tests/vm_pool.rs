//! Warm pools with real VMs: `dough serve --pool-size 1` in a test-made
//! "host" namespace whose uplink leads to a test-made "internet" namespace
//! (as in vm_net.rs). Tasks claim pooled VMs, get their own egress policy at
//! claim, the pool refills and replaces a VM killed while idle, and shutdown
//! leaves nothing. Nothing here touches the machine's own network.
mod common;
#[path = "../../dough-net/tests/world/mod.rs"]
mod world;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use world::*;

struct Daemon {
    child: Child,
    url: String,
    token: String,
}

impl Daemon {
    fn start(h: &Harness, ns: &str, args: &[&str]) -> Daemon {
        let mut cmd: Command = h.cmd();
        in_netns(&mut cmd, ns);
        let child = cmd
            .env("DOUGH_DNS", DNS.to_string())
            .env("DOUGH_HOST_NAT", "0")
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url_file = h.state.path().join("api-url");
        wait_until("the daemon to listen", Duration::from_secs(20), || {
            url_file.exists()
        });
        Daemon {
            child,
            url: std::fs::read_to_string(url_file)
                .unwrap()
                .trim()
                .to_string(),
            token: std::fs::read_to_string(h.state.path().join("api-token"))
                .unwrap()
                .trim()
                .to_string(),
        }
    }

    /// The daemon listens inside the test's host namespace: reach it from
    /// a thread that joined it.
    fn call(&self, ns: &str, method: &str, path: &str, body: Option<Value>) -> Value {
        let (url, token) = (format!("{}{path}", self.url), self.token.clone());
        let method = method.to_string();
        in_ns(ns, move || {
            let r = ureq::request(&method, &url).set("Authorization", &format!("Bearer {token}"));
            let resp = match body {
                Some(b) => r.send_json(b),
                None => r.call(),
            };
            let resp = match resp {
                Ok(r) | Err(ureq::Error::Status(_, r)) => r,
                Err(e) => panic!("{method} {url}: {e}"),
            };
            let text = resp.into_string().unwrap();
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        })
    }

    /// SIGTERM; serve must exit 0 (after tearing down every pooled VM).
    fn shutdown(mut self) {
        signal(self.child.id(), nix::sys::signal::Signal::SIGTERM);
        let st = self.child.wait().unwrap();
        assert!(st.success(), "serve exited with {st}");
    }

    fn pool(&self, ns: &str) -> Value {
        self.call(ns, "GET", "/v1/pools", None)["pools"][0].clone()
    }

    /// The pool's idle VM once there is one: (vm id, VMM pid).
    fn wait_idle(&self, ns: &str, not: &[String]) -> (String, u32) {
        let t0 = Instant::now();
        loop {
            let p = self.pool(ns);
            if let Some(vm) = p["vms"].as_array().and_then(|v| v.first()) {
                let id = vm["vm_id"].as_str().unwrap().to_string();
                if !not.contains(&id) {
                    return (id, vm["vmm_pid"].as_u64().unwrap() as u32);
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "no idle pooled vm: {p}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn run(&self, ns: &str, body: Value) -> (Value, String) {
        let id = self.call(ns, "POST", "/v1/tasks", Some(body))["id"]
            .as_str()
            .expect("task id")
            .to_string();
        let t0 = Instant::now();
        loop {
            let t = self.call(ns, "GET", &format!("/v1/tasks/{id}"), None);
            if matches!(
                t["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled" | "timed_out")
            ) {
                let logs = match self.call(ns, "GET", &format!("/v1/tasks/{id}/logs"), None) {
                    Value::String(s) => s,
                    v => v.to_string(),
                };
                return (t, logs);
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "task stuck: {t}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `dough ARGS` (a client command) from inside namespace `ns`.
fn cli(h: &Harness, ns: &str, args: &[&str]) -> String {
    let mut cmd: Command = h.cmd();
    in_netns(&mut cmd, ns);
    let out = cmd.args(args).output().unwrap();
    assert!(
        out.status.success(),
        "dough {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn states(t: &Value) -> Vec<String> {
    t["transitions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x["state"].as_str().map(str::to_string))
        .collect()
}

/// What a task prints about its guest: the VM id its kernel booted as (in a
/// clone: the template's, its command line is restored memory), 16 random
/// bytes, and the guest's clock.
const IDENT: &str = "echo boot=$(tr ' ' '\\n' </proc/cmdline | sed -n 's/^dough.vm=//p'); echo rand=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \\n'); echo time=$(date +%s)";

fn field<'a>(logs: &'a str, key: &str) -> &'a str {
    logs.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {logs}"))
}

/// The guest's clock (`time=`, read while its task ran) lies between the
/// host's times of the task's `provisioning` (the claim) and `finalizing`
/// transitions, to
/// the second: a clone whose clock was not set would be off by however
/// long its template waited. Bracketing by the task's own transitions
/// holds however slow the machine is.
fn assert_clock_set(t: &Value, logs: &str) {
    let guest: u64 = field(logs, "time").parse().unwrap();
    let at = |state: &str| {
        t["transitions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["state"] == state)
            .and_then(|x| x["at_ms"].as_u64())
            .unwrap_or_else(|| panic!("no {state} transition: {t}"))
    };
    let (from, to) = (at("provisioning") / 1000, at("finalizing").div_ceil(1000));
    assert!(
        from <= guest + 1 && guest <= to + 1,
        "clone clock {guest}, the task ran from {from} to {to} (host)"
    );
}

/// One pool of one VM refilled with snapshot clones, through three tasks
/// with different egress policies (each on a clone, each replaced after
/// its claim), an idle clone whose VMM is killed (detected and replaced),
/// two tasks at once (the second finds the pool empty and gets a clone of
/// the template), and a shutdown that must tear down every pooled VM and
/// the template.
#[test]
fn clones_take_each_tasks_policy_and_identity_are_replaced_and_torn_down() {
    let h = Harness::new();
    let w = World::new("p");
    let ns = w.host.clone();
    let d = Daemon::start(&h, &ns, &["--pool-size", "1"]);
    let p = d.pool(&ns);
    assert_eq!(
        (
            p["vcpus"].as_u64(),
            p["memory_mib"].as_u64(),
            p["size"].as_u64()
        ),
        (Some(1), Some(512), Some(1)),
        "{p}"
    );

    // Open egress: the task runs on the pooled clone, under the clone's own
    // hostname, and reaches the internet from its own slot address.
    let (a, _) = d.wait_idle(&ns, &[]);
    let p = d.pool(&ns);
    assert_eq!(p["refill"], "clone", "{p}");
    let template = p["template"].as_str().expect("a template").to_string();
    let ls = cli(&h, &ns, &["ls", "--pools"]);
    let row = ls.lines().nth(1).unwrap_or_default();
    assert!(
        row.split_whitespace().collect::<Vec<_>>()[..3] == ["default", "1", "512"]
            && row.contains("clone")
            && row.contains(&a),
        "{ls}"
    );
    assert!(h.state.path().join("templates").join(&template).exists());
    // The idle VM's slot: its lease is named by the slot's network; the
    // namespace's end (network + 2) is the address the internet sees.
    let slot = dough_net::slot_leases(std::path::Path::new("/run/dough/slots"))
        .into_iter()
        .find(|(_, r)| r.as_ref().is_some_and(|r| r.vm_id == a))
        .and_then(|(p, _)| p.file_name()?.to_str()?.parse::<std::net::Ipv4Addr>().ok())
        .unwrap_or_else(|| panic!("no slot lease for the idle vm {a}"));
    let ns_end = std::net::Ipv4Addr::from(u32::from(slot) + 2).to_string();
    let (t, logs) = d.run(
        &ns,
        json!({"command": ["sh", "-c", format!("echo host=$(hostname); echo etc=$(cat /etc/hostname) names=$(grep -c dough- /etc/hosts) at=$(getent hosts $(hostname) | cut -d' ' -f1); {IDENT}; curl -sS -m 5 http://198.51.100.10/; exit 3")]}),
    );
    assert_eq!(
        t["vm_id"],
        a.as_str(),
        "the task did not run on the idle vm: {t}"
    );
    assert_eq!(t["exit_code"], 3, "{t}\n{logs}");
    assert!(logs.contains(&format!("host=dough-{a}")), "{logs}");
    // The template's name is gone from the files too (rewritten in place).
    assert!(
        logs.contains(&format!("etc=dough-{a} names=1 at=127.0.1.1")),
        "{logs}"
    );
    assert!(
        logs.lines().any(|l| l == ns_end),
        "the web server did not see the vm's slot address {ns_end}: {logs}"
    );
    assert_eq!(
        states(&t),
        [
            "queued",
            "provisioning",
            "booting",
            "running",
            "finalizing",
            "failed"
        ],
        "{t}"
    );
    let (boot_a, rand_a) = (
        field(&logs, "boot").to_string(),
        field(&logs, "rand").to_string(),
    );
    assert_eq!(
        boot_a, template,
        "the task's vm did not boot as the template"
    );
    assert_clock_set(&t, &logs);

    // Replaced after the claim (another clone: same boot, other random
    // bytes); the next task gets an allowlist: the forwarder now answers
    // only the allowed name, and only its address passes.
    let (b, _) = d.wait_idle(&ns, std::slice::from_ref(&a));
    let (t, logs) = d.run(
        &ns,
        json!({"command": ["sh", "-c", format!("{IDENT}; curl -sS -m 5 http://allowed.example/ && echo allowed-ok; getent hosts other.example >/dev/null; echo other-resolves=$?; curl -sS -m 3 -o /dev/null http://198.51.100.11/; echo other-ip=$?")],
               "allow_hosts": ["allowed.example"]}),
    );
    assert_eq!(t["vm_id"], b.as_str(), "{t}");
    assert_eq!(t["state"], "succeeded", "{t}\n{logs}");
    assert!(logs.contains("allowed-ok"), "{logs}");
    assert!(logs.contains("other-resolves=2"), "{logs}");
    assert!(!logs.contains("other-ip=0"), "{logs}");
    assert_eq!(
        field(&logs, "boot"),
        boot_a,
        "both are clones of one template"
    );
    assert_ne!(
        field(&logs, "rand"),
        rand_a,
        "two clones drew the same random bytes"
    );
    assert_clock_set(&t, &logs);

    // And `none`: nothing gets out, not even to the address the previous
    // policy allowed.
    let (c, _) = d.wait_idle(&ns, &[a.clone(), b.clone()]);
    let (t, logs) = d.run(
        &ns,
        json!({"command": ["sh", "-c", "curl -sS -m 3 -o /dev/null http://198.51.100.10/; echo open-ip=$?"],
               "egress": "none"}),
    );
    assert_eq!(t["vm_id"], c.as_str(), "{t}");
    assert!(
        logs.contains("open-ip=") && !logs.contains("open-ip=0"),
        "{logs}"
    );

    // An idle VM whose VMM dies is detected and replaced.
    let (e, pid) = d.wait_idle(&ns, &[a.clone(), b.clone(), c.clone()]);
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    let (f, _) = d.wait_idle(&ns, &[a, b, c, e.clone()]);
    let p = d.pool(&ns);
    assert_eq!(p["replaced"], 1, "{p}");
    assert_eq!(p["claimed"], 3, "{p}");
    assert!(p["last_error"].as_str().unwrap_or("").contains(&e), "{p}");
    assert!(dough_net::netns_path(&f).exists());

    // Two tasks at once: one claims the idle clone, the other finds the
    // pool empty and runs on a fresh clone of the template.
    let ids: Vec<String> = (0..2)
        .map(|_| {
            d.call(
                &ns,
                "POST",
                "/v1/tasks",
                Some(json!({"command": ["sh", "-c", IDENT]})),
            )["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let mut vms = vec![];
    for id in &ids {
        let t0 = Instant::now();
        let t = loop {
            let t = d.call(&ns, "GET", &format!("/v1/tasks/{id}"), None);
            if t["state"] == "succeeded" || t["state"] == "failed" {
                break t;
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "{t}");
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(t["state"], "succeeded", "{t}");
        let logs = match d.call(&ns, "GET", &format!("/v1/tasks/{id}/logs"), None) {
            Value::String(s) => s,
            v => v.to_string(),
        };
        assert_eq!(
            field(&logs, "boot"),
            boot_a,
            "not a clone of the template: {logs}"
        );
        vms.push(t["vm_id"].as_str().unwrap().to_string());
    }
    assert!(vms.contains(&f), "{vms:?}");
    assert_ne!(vms[0], vms[1]);

    // Shutdown tears down the idle VM and the template: nothing is left.
    d.shutdown();
    assert!(!h.state.path().join("templates").join(&template).exists());
    h.assert_clean();
}

/// With `--no-pool-clones` the pool refills with cold boots: a task still
/// claims an idle VM, and each VM is a boot of its own.
#[test]
fn a_pool_without_clones_refills_with_cold_boots() {
    let h = Harness::new();
    let w = World::new("q");
    let ns = w.host.clone();
    let d = Daemon::start(&h, &ns, &["--pool-size", "1", "--no-pool-clones"]);
    let (a, _) = d.wait_idle(&ns, &[]);
    let p = d.pool(&ns);
    assert_eq!(p["refill"], "cold boot", "{p}");
    assert!(p.get("template").is_none(), "{p}");
    let (t, logs) = d.run(&ns, json!({"command": ["sh", "-c", IDENT]}));
    assert_eq!(t["vm_id"], a.as_str(), "{t}");
    let boot_a = field(&logs, "boot").to_string();
    let (b, _) = d.wait_idle(&ns, std::slice::from_ref(&a));
    let (t, logs) = d.run(&ns, json!({"command": ["sh", "-c", IDENT]}));
    assert_eq!(t["vm_id"], b.as_str(), "{t}");
    assert_eq!(field(&logs, "boot"), b, "a cold boot boots as itself");
    assert_ne!(b, boot_a);
    d.shutdown();
    assert!(std::fs::read_dir(h.state.path().join("templates"))
        .map_or(true, |mut r| r.next().is_none()));
    h.assert_clean();
}

/// A pool whose template cannot be made (Debian's kernel has no built-in
/// virtio console) says why and refills with cold boots; with `--max-vms
/// 1` the idle VM takes the only room: while a task runs on it the pool
/// does not refill, a second task waits queued, runs when the first ends
/// (before the pool refills: tasks first), and only then the pool refills.
#[test]
fn a_failed_template_falls_back_to_cold_boots_and_the_pool_yields_to_queued_tasks() {
    let h = Harness::new();
    let w = World::new("r");
    let ns = w.host.clone();
    let d = Daemon::start(
        &h,
        &ns,
        &["--kernel", "debian", "--pool-size", "1", "--max-vms", "1"],
    );
    let (a, _) = d.wait_idle(&ns, &[]);
    let p = d.pool(&ns);
    assert_eq!(p["refill"], "cold boot", "{p}");
    let err = p["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("snapshot template failed") && err.contains("minimal kernel"),
        "{p}"
    );

    let first = d.call(
        &ns,
        "POST",
        "/v1/tasks",
        Some(json!({"command": ["sh", "-c", "sleep 4; echo one"]})),
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_until("the first task to run", Duration::from_secs(30), || {
        d.call(&ns, "GET", &format!("/v1/tasks/{first}"), None)["state"] == "running"
    });
    // Its VM holds the only room: the pool cannot refill meanwhile.
    let p = d.pool(&ns);
    assert_eq!(
        (p["idle"].as_u64(), p["booting"].as_u64()),
        (Some(0), Some(0)),
        "{p}"
    );
    let (t, logs) = d.run(&ns, json!({"command": ["sh", "-c", "echo two"]}));
    assert_eq!(t["state"], "succeeded", "{t} {logs}");
    assert_eq!(logs.trim(), "two");
    let second_vm = t["vm_id"].as_str().unwrap().to_string();
    assert_ne!(second_vm, a, "the claimed VM serves one task only");
    let t1 = d.call(&ns, "GET", &format!("/v1/tasks/{first}"), None);
    assert_eq!(t1["state"], "succeeded", "{t1}");
    assert_eq!(
        t1["vm_id"],
        a.as_str(),
        "the first task claimed the idle VM"
    );
    // The second, submitted while the first held the only room, waited
    // queued until the first had ended.
    let at = |t: &Value, s: &str| {
        t["transitions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["state"] == s)
            .and_then(|x| x["at_ms"].as_u64())
            .unwrap_or_else(|| panic!("no {s} in {t}"))
    };
    assert!(at(&t, "provisioning") >= at(&t1, "succeeded"), "{t}\n{t1}");
    // Then the pool refills; the second task was not served by it (one
    // claim in all).
    d.wait_idle(&ns, std::slice::from_ref(&a));
    let p = d.pool(&ns);
    assert_eq!(p["claimed"], 1, "only the first task claimed: {p}");
    d.shutdown();
    h.assert_clean();
}

/// A pool per image (`--pool IMAGE:SHAPE=N`): its template and clones boot
/// the named image, a task naming that image and shape claims the pooled
/// VM and sees the image's file, a task of the same shape on the default
/// image does not take it; a pool naming an image that does not exist
/// stops the daemon before it listens.
#[test]
fn a_pool_per_image_serves_that_images_tasks_only() {
    let h = Harness::new();
    let out = h
        .cmd()
        .args([
            "image",
            "build",
            "pimg",
            "--no-host-cas",
            "--egress",
            "none",
            "--run",
            "echo pooled > /etc/pool-image",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = h
        .cmd()
        .args(["serve", "--listen", "127.0.0.1:0", "--pool", "nope:1x512=1"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--pool nope:1x512: no image \"nope\" here"),
        "{}",
        text(&out.stderr)
    );
    assert!(!h.state.path().join("api-url").exists());

    let w = World::new("i");
    let ns = w.host.clone();
    let d = Daemon::start(&h, &ns, &["--pool", "pimg:1x512=1"]);
    let (idle, _) = d.wait_idle(&ns, &[]);
    let p = d.pool(&ns);
    assert_eq!(p["image"], "pimg", "{p}");
    assert_eq!(p["refill"], "clone", "{p}");
    let cmd = "cat /etc/pool-image 2>/dev/null || echo no-file";
    let (t, logs) = d.run(
        &ns,
        json!({"command": ["sh", "-c", cmd], "image": "pimg", "vcpus": 1, "memory_mib": 512}),
    );
    assert_eq!(t["state"], "succeeded", "{t} {logs}");
    assert_eq!(t["vm_id"], idle.as_str(), "the pooled vm: {t}");
    assert_eq!(logs.trim(), "pooled", "{t}");
    let (t, logs) = d.run(
        &ns,
        json!({"command": ["sh", "-c", cmd], "vcpus": 1, "memory_mib": 512}),
    );
    assert_eq!(t["state"], "succeeded", "{t} {logs}");
    assert_eq!(logs.trim(), "no-file", "the default image: {t}");
    let claimed = d.pool(&ns)["claimed"].as_u64();
    assert_eq!(claimed, Some(1), "the default-image task took no pooled vm");
    d.shutdown();
    assert!(std::fs::read_dir(h.state.path().join("templates"))
        .map_or(true, |mut r| r.next().is_none()));
    h.assert_clean();
}
