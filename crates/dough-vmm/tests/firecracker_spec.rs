//! The Firecracker backend checked against Firecracker's published API spec
//! (`spec/firecracker-api-1.17.0-dev.yaml`, Swagger 2.0).
//!
//! No Firecracker binary can run on Dough's CI machines (their KVM is a PVM
//! nested hypervisor and no firecracker package is reachable), so:
//! * every request the backend plans, for every configuration it can
//!   produce, is validated against the spec: path, method, body schema,
//!   required fields, types, enums, bounds, and no unknown fields (which
//!   Firecracker itself rejects);
//! * the HTTP client's bytes are checked by a recording test double of the
//!   API socket (a Unix-socket HTTP server in this file), which also
//!   validates what it received against the spec.
use std::path::PathBuf;

use dough_vmm::firecracker::{call, ApiRequest, Firecracker};
use dough_vmm::{Accel, VmPaths, VmSpec};
use serde_json::Value;

struct Spec {
    paths: Value,
    defs: Value,
}

fn spec() -> Spec {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("spec/firecracker-api-1.17.0-dev.yaml");
    let y: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let j: Value = serde_json::to_value(y).unwrap();
    Spec {
        paths: j["paths"].clone(),
        defs: j["definitions"].clone(),
    }
}

impl Spec {
    fn check(&self, req: &ApiRequest) -> Result<(), String> {
        let template = self
            .paths
            .as_object()
            .unwrap()
            .keys()
            .find(|t| path_matches(t, &req.path))
            .ok_or_else(|| format!("unknown path {}", req.path))?;
        let op = &self.paths[template][req.method.to_lowercase()];
        if op.is_null() {
            return Err(format!("{} not allowed on {template}", req.method));
        }
        let params = op["parameters"].as_array().cloned().unwrap_or_default();
        let body = params.iter().find(|p| p["in"] == "body");
        match body {
            None if !req.body.is_null() => Err(format!("{template} takes no body")),
            None => Ok(()),
            Some(b) => self.validate(
                &req.body,
                &b["schema"],
                &format!("{} {}", req.method, req.path),
            ),
        }
    }

    fn validate(&self, v: &Value, schema: &Value, at: &str) -> Result<(), String> {
        if let Some(r) = schema["$ref"].as_str() {
            let name = r.trim_start_matches("#/definitions/");
            return self.validate(v, &self.defs[name], at);
        }
        let ty = schema["type"]
            .as_str()
            .unwrap_or(if schema["properties"].is_object() {
                "object"
            } else {
                ""
            });
        match ty {
            "object" => {
                let obj = v
                    .as_object()
                    .ok_or(format!("{at}: expected an object, got {v}"))?;
                for r in schema["required"].as_array().into_iter().flatten() {
                    let r = r.as_str().unwrap();
                    if !obj.contains_key(r) {
                        return Err(format!("{at}: required field `{r}` missing"));
                    }
                }
                let props = schema["properties"].as_object();
                for (k, val) in obj {
                    match props.and_then(|p| p.get(k)) {
                        Some(ps) => self.validate(val, ps, &format!("{at}.{k}"))?,
                        None if schema["additionalProperties"].is_object() => self.validate(
                            val,
                            &schema["additionalProperties"],
                            &format!("{at}.{k}"),
                        )?,
                        None => return Err(format!("{at}: unknown field `{k}`")),
                    }
                }
                Ok(())
            }
            "string" => {
                let s = v
                    .as_str()
                    .ok_or(format!("{at}: expected a string, got {v}"))?;
                if let Some(e) = schema["enum"].as_array() {
                    if !e.iter().any(|x| x.as_str() == Some(s)) {
                        return Err(format!("{at}: `{s}` not in {e:?}"));
                    }
                }
                Ok(())
            }
            "integer" => {
                let n = v
                    .as_i64()
                    .ok_or(format!("{at}: expected an integer, got {v}"))?;
                if let Some(min) = schema["minimum"].as_i64() {
                    if n < min {
                        return Err(format!("{at}: {n} < minimum {min}"));
                    }
                }
                if let Some(max) = schema["maximum"].as_i64() {
                    if n > max {
                        return Err(format!("{at}: {n} > maximum {max}"));
                    }
                }
                Ok(())
            }
            "boolean" => v
                .is_boolean()
                .then_some(())
                .ok_or(format!("{at}: expected a boolean, got {v}")),
            "array" => {
                let a = v.as_array().ok_or(format!("{at}: expected an array"))?;
                a.iter().enumerate().try_for_each(|(i, x)| {
                    self.validate(x, &schema["items"], &format!("{at}[{i}]"))
                })
            }
            other => Err(format!(
                "{at}: schema type `{other}` not handled by this validator"
            )),
        }
    }
}

fn path_matches(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(a, b)| a == b || (a.starts_with('{') && a.ends_with('}') && !b.is_empty()))
}

/// Every configuration the backend can produce.
fn configurations() -> Vec<VmSpec> {
    let mut out = vec![];
    for vcpus in [1, 2, 32] {
        for memory_mib in [128, 512, 8192] {
            for initrd in [true, false] {
                for tap in [None, Some("tap0".to_string())] {
                    out.push(VmSpec {
                        id: "0123456789ab".into(),
                        paths: VmPaths::new("/var/lib/dough/vms/0123456789ab"),
                        kernel: "/var/lib/dough/images/default/vmlinux".into(),
                        acpi: true,
                        initramfs: initrd
                            .then(|| "/var/lib/dough/images/default/initramfs.cpio".into()),
                        rootfs: "/var/lib/dough/images/default/rootfs.ext4".into(),
                        scratch: "/var/lib/dough/vms/0123456789ab/scratch.ext4".into(),
                        // An image with build-step layers, or none.
                        layers: if tap.is_some() {
                            vec![
                                "/var/lib/dough/images/.layers/k1.ext4".into(),
                                "/var/lib/dough/images/.layers/k2.ext4".into(),
                            ]
                        } else {
                            vec![]
                        },
                        vcpus,
                        memory_mib,
                        accel: Accel::Kvm,
                        kernel_args: vec!["dough.port=1024".into()],
                        tap: tap.clone(),
                        netns: tap.as_ref().map(|_| "/run/netns/dough-0123456789ab".into()),
                        mac: "06:00:ac:10:00:02".into(),
                        tap_fd: None,
                        guest_cid: 3,
                        guest_port: 1024,
                        jail: None,
                        snapshot: None,
                    });
                }
            }
        }
    }
    out
}

#[test]
fn every_planned_request_conforms_to_the_spec() {
    let spec = spec();
    let mut checked = 0;
    for cfg in configurations() {
        Firecracker::check_spec(&cfg).unwrap();
        let plan = Firecracker::plan(&cfg);
        assert_eq!(
            plan.last().unwrap().body["action_type"],
            "InstanceStart",
            "start comes last"
        );
        // The base, the scratch disk, then each layer read-only, in order
        // (the guest finds layer i at /dev/vd(c+i)).
        let drives: Vec<_> = plan
            .iter()
            .filter(|r| r.path.starts_with("/drives/"))
            .collect();
        assert_eq!(drives.len(), 2 + cfg.layers.len());
        for (i, layer) in cfg.layers.iter().enumerate() {
            let d = &drives[2 + i].body;
            assert_eq!(d["path_on_host"], layer.to_str().unwrap());
            assert_eq!(d["is_read_only"], true);
        }
        for req in plan.iter().chain([&Firecracker::ctrl_alt_del()]) {
            spec.check(req).unwrap_or_else(|e| panic!("{e}\n{req:?}"));
            checked += 1;
        }
        let paths: Vec<&str> = plan.iter().map(|r| r.path.as_str()).collect();
        assert!(
            paths.contains(&"/vsock")
                && paths.contains(&"/drives/base")
                && paths.contains(&"/machine-config")
        );
        assert_eq!(
            paths.contains(&"/network-interfaces/eth0"),
            cfg.tap.is_some()
        );
        if let Some(net) = plan.iter().find(|r| r.path == "/network-interfaces/eth0") {
            assert_eq!(net.body["host_dev_name"], "tap0");
            assert_eq!(net.body["guest_mac"], "06:00:ac:10:00:02");
        }
        let boot = plan.iter().find(|r| r.path == "/boot-source").unwrap();
        assert_eq!(
            boot.body.get("initrd_path").is_some(),
            cfg.initramfs.is_some()
        );
    }
    assert!(checked > 200, "{checked}");
}

/// The snapshot requests (pause, create; load with resume on a fresh
/// process) conform to the spec: the load names exactly one memory source,
/// a private file mapping, and the clone's own vsock socket.
#[test]
fn snapshot_and_restore_requests_conform_to_the_spec() {
    let spec = spec();
    let files = dough_vmm::firecracker::SnapshotFiles {
        state: "/t/tpl/vm.state".into(),
        memory: "/t/tpl/vm.mem".into(),
    };
    let snap = Firecracker::snapshot_plan(&files);
    assert_eq!(
        snap.iter()
            .map(|r| (r.method, r.path.as_str()))
            .collect::<Vec<_>>(),
        [("PATCH", "/vm"), ("PUT", "/snapshot/create")]
    );
    assert_eq!(snap[0].body["state"], "Paused");
    assert_eq!(snap[1].body["snapshot_type"], "Full");
    for cfg in configurations() {
        let load = Firecracker::restore_plan(&files, &cfg);
        for req in snap.iter().chain(&load) {
            spec.check(req).unwrap_or_else(|e| panic!("{e}\n{req:?}"));
        }
        let b = &load[0].body;
        assert_eq!(load[0].path, "/snapshot/load");
        assert_eq!(b["resume_vm"], true);
        assert_eq!(b["mem_backend"]["backend_type"], "File");
        assert!(
            b.get("mem_file_path").is_none(),
            "exactly one memory source"
        );
        assert_eq!(
            b["vsock_override"]["uds_path"],
            cfg.paths.vsock_uds().display().to_string()
        );
    }
    // A misspelled field in a load would be caught.
    let mut bad = Firecracker::restore_plan(&files, &configurations()[0]);
    bad[0].body["resume"] = serde_json::json!(true);
    assert!(spec.check(&bad[0]).is_err());
}

#[test]
fn odd_vcpu_counts_are_refused_as_firecracker_would() {
    let mut cfg = configurations().remove(0);
    cfg.vcpus = 3;
    assert!(Firecracker::check_spec(&cfg)
        .unwrap_err()
        .to_string()
        .contains("1 or an even number"));
    cfg.vcpus = 34;
    assert!(Firecracker::check_spec(&cfg).is_err());
}

/// The validator itself must catch what a broken backend would send.
#[test]
fn validator_rejects_misspelled_missing_mistyped_and_unknown() {
    let spec = spec();
    let good = Firecracker::plan(&configurations()[0]);
    let mc = good
        .iter()
        .find(|r| r.path == "/machine-config")
        .unwrap()
        .clone();

    let mut misspelled = mc.clone();
    let v = misspelled
        .body
        .as_object_mut()
        .unwrap()
        .remove("vcpu_count")
        .unwrap();
    misspelled.body["vcpu_cout"] = v;
    let e = spec.check(&misspelled).unwrap_err();
    assert!(e.contains("vcpu_count") || e.contains("vcpu_cout"), "{e}");

    let mut missing = good
        .iter()
        .find(|r| r.path == "/boot-source")
        .unwrap()
        .clone();
    missing
        .body
        .as_object_mut()
        .unwrap()
        .remove("kernel_image_path");
    assert!(spec
        .check(&missing)
        .unwrap_err()
        .contains("required field `kernel_image_path`"));

    let mut mistyped = mc.clone();
    mistyped.body["mem_size_mib"] = Value::String("512".into());
    assert!(spec
        .check(&mistyped)
        .unwrap_err()
        .contains("expected an integer"));

    let mut too_many = mc.clone();
    too_many.body["vcpu_count"] = 64.into();
    assert!(spec.check(&too_many).unwrap_err().contains("maximum"));

    let mut bad_enum = good.last().unwrap().clone();
    bad_enum.body["action_type"] = "Reboot".into();
    assert!(spec.check(&bad_enum).unwrap_err().contains("not in"));

    let mut unknown_path = mc.clone();
    unknown_path.path = "/machine-configuration".into();
    assert!(spec
        .check(&unknown_path)
        .unwrap_err()
        .contains("unknown path"));

    let mut wrong_method = mc;
    wrong_method.method = "POST";
    assert!(spec
        .check(&wrong_method)
        .unwrap_err()
        .contains("not allowed"));
}

/// Test double of Firecracker's API socket: parses each of the `expect`
/// HTTP requests, records it, answers 204 — or 400 with a fault message for
/// `/vsock` — and returns them (no idle cutoff: it ends after a count, not a
/// time, so a slow client is not cut off).
async fn fake_api(
    sock: PathBuf,
    fail_vsock: bool,
    expect: usize,
) -> tokio::task::JoinHandle<Vec<ApiRequest>> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    tokio::spawn(async move {
        let mut got = vec![];
        while got.len() < expect {
            let (s, _) = listener.accept().await.unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            let mut parts = line.split_whitespace();
            let method = match parts.next().unwrap() {
                "PUT" => "PUT",
                "PATCH" => "PATCH",
                "GET" => "GET",
                m => panic!("method {m}"),
            };
            let path = parts.next().unwrap().to_string();
            assert_eq!(parts.next(), Some("HTTP/1.1"));
            let mut len = 0;
            loop {
                let mut h = String::new();
                r.read_line(&mut h).await.unwrap();
                if h == "\r\n" {
                    break;
                }
                let (k, v) = h.split_once(':').unwrap();
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap();
                }
                if k.eq_ignore_ascii_case("content-type") {
                    assert_eq!(v.trim(), "application/json");
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).await.unwrap();
            let body: Value = serde_json::from_slice(&body).unwrap();
            let fail = fail_vsock && path == "/vsock";
            got.push(ApiRequest { method, path, body });
            let reply = if fail {
                let b = r#"{"fault_message":"Invalid guest CID"}"#;
                format!("HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len())
            } else {
                "HTTP/1.1 204 No Content\r\n\r\n".to_string()
            };
            r.into_inner().write_all(reply.as_bytes()).await.unwrap();
        }
        got
    })
}

/// What the double served; a missing request fails (after a minute)
/// rather than hanging the suite.
async fn served(server: tokio::task::JoinHandle<Vec<ApiRequest>>) -> Vec<ApiRequest> {
    tokio::time::timeout(std::time::Duration::from_secs(60), server)
        .await
        .expect("the client sent fewer requests than expected")
        .unwrap()
}

#[tokio::test]
async fn the_client_sends_exactly_the_plan_and_reports_api_errors() {
    let spec = spec();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let cfg = configurations().pop().unwrap();
    let plan = Firecracker::plan(&cfg);
    let server = fake_api(sock.clone(), false, plan.len()).await;
    for req in &plan {
        call(&sock, req, std::time::Duration::from_secs(2))
            .await
            .unwrap();
    }
    let got = served(server).await;
    assert_eq!(got, plan, "the server received the plan, byte-faithfully");
    for r in &got {
        spec.check(r).unwrap();
    }

    let sock2 = dir.path().join("api2.sock");
    let server = fake_api(sock2.clone(), true, 1).await;
    let vsock = plan.iter().find(|r| r.path == "/vsock").unwrap();
    let err = call(&sock2, vsock, std::time::Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("HTTP 400: Invalid guest CID"),
        "{err}"
    );
    assert_eq!(served(server).await.len(), 1);
}

/// The jail a confined VM of `cfg` gets (uid and gid 900123).
fn jail_for(cfg: &VmSpec) -> dough_vmm::jail::JailSpec {
    dough_vmm::jail::JailSpec {
        uid: 900_123,
        gid: 900_123,
        groups: vec![],
        root: "/var/lib/dough/jails/0123456789ab".into(),
        limits: dough_vmm::cgroup::limits_for(cfg.vcpus, cfg.memory_mib, false),
    }
}

/// The jailer invocation follows the jailer's documented flags, and the API
/// plan of a jailed VM uses only paths inside its chroot, every one of them
/// a file that is linked in (no host path reaches the jailed Firecracker).
#[test]
fn jailed_plan_uses_only_in_jail_paths_and_documented_jailer_flags() {
    let spec_doc = spec();
    let fc = Firecracker {
        binary: "/usr/local/bin/firecracker".into(),
    };
    for cfg in configurations() {
        let js = jail_for(&cfg);
        for version in [1, 2] {
            let plan = fc.jailer_plan(
                &cfg,
                &js,
                version,
                Some(std::path::Path::new("/run/netns/dough-x")),
            );
            let a = plan.args.join(" ");
            for flag in [
                "--id 0123456789ab",
                "--exec-file /usr/local/bin/firecracker",
                "--uid 900123",
                "--gid 900123",
                "--chroot-base-dir /var/lib/dough/jails/0123456789ab",
                &format!("--cgroup-version {version}"),
                "--parent-cgroup dough",
                "--netns /run/netns/dough-x",
                "--new-pid-ns",
            ] {
                assert!(a.contains(flag), "{flag} missing in {a}");
            }
            assert!(a.ends_with("-- --api-sock /run/firecracker.socket"), "{a}");
            let mem = if version == 2 {
                "memory.max="
            } else {
                "memory.limit_in_bytes="
            };
            assert!(
                a.contains(&format!("--cgroup {mem}{}", js.limits.memory_bytes)),
                "{a}"
            );
            assert!(a.contains("--cgroup pids.max="), "{a}");
            assert_eq!(
                plan.chroot,
                PathBuf::from("/var/lib/dough/jails/0123456789ab/firecracker/0123456789ab/root")
            );
            assert_eq!(plan.api_sock, plan.chroot.join("run/firecracker.socket"));
            let linked: Vec<String> = plan.links.iter().map(|(_, n)| format!("/{n}")).collect();
            for req in Firecracker::plan(&plan.inner) {
                spec_doc
                    .check(&req)
                    .unwrap_or_else(|e| panic!("{e}\n{req:?}"));
                for key in ["kernel_image_path", "initrd_path", "path_on_host"] {
                    if let Some(p) = req.body.get(key).and_then(|v| v.as_str()) {
                        assert!(
                            linked.contains(&p.to_string()),
                            "{p} is not linked into the jail"
                        );
                    }
                }
                let body = req.body.to_string();
                assert!(
                    !body.contains("/var/lib/dough"),
                    "host path in a jailed request: {body}"
                );
            }
            assert!(
                linked.contains(&format!("/vsock.sock_{}", cfg.guest_port)),
                "guest listener linked"
            );
        }
    }
}

/// Snapshot clones on Firecracker: only jailed (Firecracker reopens drives
/// at the paths the snapshot names; each clone's chroot gives those paths
/// to its own files). A jailed clone's plan is logger, metrics and a load
/// of files linked into its chroot — the template's state and memory, the
/// memory read through the template group — with every request valid
/// against the spec and no host path in any of them. A jailed template
/// boots exactly as any VM does.
#[test]
fn jailed_clones_load_their_templates_files_from_their_chroot() {
    use dough_vmm::SnapshotRole;
    let spec_doc = spec();
    let fc = Firecracker {
        binary: "/usr/local/bin/firecracker".into(),
    };
    let tpl = PathBuf::from("/var/lib/dough/templates/aaaaaaaaaaaa");
    for mut cfg in configurations() {
        let js = jail_for(&cfg);
        let boot = Firecracker::plan(&cfg);

        cfg.snapshot = Some(SnapshotRole::Template {
            memory: "/var/lib/dough/vms/0123456789ab/memory".into(),
        });
        let e = Firecracker::check_spec(&cfg).unwrap_err().to_string();
        assert!(e.contains("jailed"), "{e}");
        cfg.jail = Some(js.clone());
        Firecracker::check_spec(&cfg).unwrap();
        let plan = fc.jailer_plan(&cfg, &js, 2, None);
        assert!(plan.args.join(" ").contains("--gid 900123"));
        let mut expect = boot.clone();
        let inner = Firecracker::plan(&plan.inner);
        expect.truncate(inner.len());
        assert_eq!(
            Firecracker::start_plan(&plan.inner)
                .iter()
                .map(|r| r.path.as_str())
                .collect::<Vec<_>>(),
            expect.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(),
            "a template boots as any VM"
        );

        cfg.snapshot = Some(SnapshotRole::Clone {
            memory: tpl.join("memory"),
            state: tpl.join("state"),
            state_fd: 9,
        });
        cfg.jail = None;
        assert!(Firecracker::check_spec(&cfg).is_err());
        cfg.jail = Some(js.clone());
        Firecracker::check_spec(&cfg).unwrap();
        let plan = fc.jailer_plan(&cfg, &js, 2, None);
        let a = plan.args.join(" ");
        assert!(
            a.contains(&format!("--gid {}", dough_vmm::TEMPLATE_GID)),
            "{a}"
        );
        let start = Firecracker::start_plan(&plan.inner);
        assert_eq!(
            start.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(),
            ["/logger", "/metrics", "/snapshot/load"]
        );
        for req in &start {
            spec_doc
                .check(req)
                .unwrap_or_else(|e| panic!("{e}\n{req:?}"));
            let body = req.body.to_string();
            assert!(!body.contains("/var/lib/dough"), "host path: {body}");
        }
        let load = &start[2].body;
        let linked = |name: &str| {
            plan.links
                .iter()
                .find(|(_, n)| format!("/{n}") == name)
                .map(|(src, _)| src.clone())
        };
        assert_eq!(
            linked(load["snapshot_path"].as_str().unwrap()),
            Some(tpl.join("state"))
        );
        assert_eq!(
            linked(load["mem_backend"]["backend_path"].as_str().unwrap()),
            Some(tpl.join("memory"))
        );
        assert_eq!(load["resume_vm"], true);
        // The drives the snapshot names (as the template saw them in its
        // chroot) are this clone's own, linked in under the same names.
        assert_eq!(linked("/scratch.ext4"), Some(cfg.scratch.clone()));
        assert_eq!(linked("/rootfs.ext4"), Some(cfg.rootfs.clone()));
    }
}

/// Snapshotting a template: pause, then a full snapshot into `run/` of its
/// chroot (the directory the jailed uid owns), over the API socket (test
/// double, validated against the spec); the host paths returned are where
/// those files land.
#[tokio::test]
async fn a_template_is_paused_and_snapshotted_into_its_chroot_run_dir() {
    let spec = spec();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("firecracker.socket");
    let server = fake_api(sock.clone(), false, 2).await;
    let files = dough_vmm::firecracker::snapshot_template(&sock)
        .await
        .unwrap();
    let got = served(server).await;
    assert_eq!(
        got.iter()
            .map(|r| (r.method, r.path.as_str()))
            .collect::<Vec<_>>(),
        [("PATCH", "/vm"), ("PUT", "/snapshot/create")]
    );
    for r in &got {
        spec.check(r).unwrap();
    }
    assert_eq!(got[1].body["snapshot_path"], "/run/snapshot.state");
    assert_eq!(got[1].body["mem_file_path"], "/run/snapshot.mem");
    assert_eq!(files.state, dir.path().join("snapshot.state"));
    assert_eq!(files.memory, dir.path().join("snapshot.mem"));
}
