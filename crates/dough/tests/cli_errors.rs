//! Tier 0/1: bad input and missing pieces give clear errors and create
//! nothing (no VM is booted by these tests).
mod common;

use common::*;

#[test]
fn unknown_flag_is_a_usage_error() {
    let h = Harness::new();
    let out = h
        .cmd()
        .args(["run", "--frobnicate", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--frobnicate"));
    assert!(!h.runs_dir().exists());
}

#[test]
fn run_without_a_command_is_a_usage_error() {
    let h = Harness::new();
    let out = h.cmd().args(["run"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("<CMD>"), "{}", text(&out.stderr));
}

#[test]
fn bad_resources_and_env_are_rejected_before_anything_starts() {
    let h = Harness::new();
    for (args, needle) in [
        (vec!["--vcpus", "0"], "--vcpus"),
        (vec!["--memory", "16"], "--memory"),
        (vec!["--env", "NOEQUALS"], "is not K=V"),
        (vec!["--env", "=v"], "name must be non-empty"),
        (vec!["--accel", "hvf"], "unknown accelerator"),
        (vec!["--timeout", "0"], "--timeout"),
    ] {
        let mut full = args.clone();
        full.extend(["--", "true"]);
        let out = h.cmd().arg("run").args(&full).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            text(&out.stderr).contains(needle),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    assert!(!h.runs_dir().exists());
}

#[test]
fn bad_network_flags_are_rejected_before_anything_starts() {
    let h = Harness::new();
    for (args, env, needle) in [
        (
            vec!["--egress", "none", "--allow-host", "a.com"],
            None,
            "cannot be combined",
        ),
        (vec!["--egress", "allowlist"], None, "needs at least one"),
        (vec!["--egress", "closed"], None, "invalid value 'closed'"),
        (vec!["--allow-cidr", "10.0.0.0/40"], None, "prefix length"),
        (
            vec!["--allow-cidr", "github.com"],
            None,
            "not an IPv4 address",
        ),
        (vec!["--allow-host", "bad name!"], None, "is not a DNS name"),
        (
            vec!["--no-network", "--egress", "none"],
            None,
            "cannot be used with",
        ),
        (vec!["--dns", "resolver"], None, "is not an IP address"),
        (
            vec![],
            Some(("DOUGH_SLOT_POOL", "10.0.0.0/x")),
            "DOUGH_SLOT_POOL",
        ),
        (
            vec![],
            Some(("DOUGH_SLOT_POOL", "10.213.0.0/31")),
            "too small",
        ),
        (vec![], Some(("DOUGH_DNS", "x")), "DOUGH_DNS"),
    ] {
        let mut full = args.clone();
        full.extend(["--", "true"]);
        let mut c = h.cmd();
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        let out = c.arg("run").args(&full).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?} {env:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains(needle),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    assert!(!h.runs_dir().exists());
}

/// Repository flags are checked before anything is contacted or started.
#[test]
fn bad_repository_flags_are_rejected_before_anything_starts() {
    let h = Harness::new();
    let repo = "https://git.example/o/r";
    for (args, env, needle) in [
        (
            vec!["--repo", "ssh://git.example/o/r"],
            None,
            "only https://",
        ),
        (
            vec!["--repo", "https://me:pw@git.example/o/r"],
            None,
            "carries credentials",
        ),
        (
            vec!["--repo", "https://git.example/"],
            None,
            "names no repository",
        ),
        (
            vec!["--repo", repo, "--branch", "a..b"],
            None,
            "not a valid git branch",
        ),
        (vec!["--repo", repo, "--base=-x"], None, "base branch"),
        (
            vec!["--repo", repo, "--commit-author", "nobody"],
            None,
            "expected `Name <email>`",
        ),
        (
            vec!["--repo", repo, "--no-network"],
            None,
            "needs the VM's network",
        ),
        (
            vec!["--repo", repo, "--egress", "none"],
            None,
            "needs the VM's network",
        ),
        (vec!["--branch", "x"], None, "--repo <URL>"),
        (vec!["--pr-title", "x"], None, "--repo <URL>"),
        (
            vec!["--repo", repo, "--forge", "gitlab"],
            None,
            "invalid value 'gitlab'",
        ),
        (
            vec!["--repo", repo, "--forge-api", "ftp://x"],
            None,
            "not an http(s) URL",
        ),
        (
            vec!["--secret-env", "DOUGH_TEST_SURELY_UNSET_1"],
            None,
            "is not set in this environment",
        ),
        (
            vec!["--secret-env", "DOUGH_GIT_TOKEN"],
            Some(("DOUGH_GIT_TOKEN", "t")),
            "never go to a task",
        ),
        (
            vec!["--prompt-file", "/nonexistent/prompt.md"],
            None,
            "--prompt-file /nonexistent/prompt.md",
        ),
        (
            vec!["--prompt", "a", "--prompt-file", "/etc/hostname"],
            None,
            "cannot be used with",
        ),
        (
            vec!["--repo", repo],
            Some(("DOUGH_MAX_BUNDLE_MIB", "0")),
            "DOUGH_MAX_BUNDLE_MIB",
        ),
    ] {
        let mut full = args.clone();
        full.extend(["--", "true"]);
        let mut c = h.cmd();
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        let out = c.arg("run").args(&full).output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert!(!h.runs_dir().exists());
    assert!(!h.state.path().join("work").exists());
}

/// A full slot pool fails at set-up time with the reason, and leaves
/// nothing. The pool is one slot (a /30 no other test uses), held by a
/// lease of this test process.
#[test]
fn exhausted_slot_pool_fails_cleanly() {
    let h = Harness::new();
    let lease = std::path::Path::new("/run/dough/slots/10.213.255.252");
    std::fs::create_dir_all(lease.parent().unwrap()).unwrap();
    let me = dough_net::Owner::me();
    std::fs::write(
        lease,
        serde_json::json!({"vm_id": "heldbytest", "owner": me, "tag": "cli_errors"}).to_string(),
    )
    .unwrap();
    let out = h
        .cmd()
        .env("DOUGH_SLOT_POOL", "10.213.255.252/30")
        .args(["run", "--", "true"])
        .output()
        .unwrap();
    std::fs::remove_file(lease).unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(
        err.contains("slot pool 10.213.255.252/30 is exhausted"),
        "{err}"
    );
    h.assert_clean();
}

#[test]
fn missing_image_says_to_build_it() {
    let h = Harness::new();
    let out = h
        .cmd()
        .env("DOUGH_IMAGE_DIR", h.state.path().join("no-image"))
        .args(["run", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("run `dough image build`"),
        "{}",
        text(&out.stderr)
    );
    assert!(!h.runs_dir().exists(), "nothing created");
}

#[test]
fn missing_vmm_tools_are_named_with_a_hint() {
    let h = Harness::new();
    for (var, tool) in [
        ("DOUGH_QEMU_SYSTEM_X86_64", "qemu-system-x86_64"),
        ("DOUGH_VHOST_DEVICE_VSOCK", "vhost-device-vsock"),
    ] {
        let out = h
            .cmd()
            .env(var, "/nonexistent/tool")
            .args(["run", "--", "true"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(125));
        let err = text(&out.stderr);
        assert!(err.contains(&format!("`{tool}` not found")), "{err}");
        assert!(err.contains("scripts/setup.sh"), "{err}");
    }
    assert!(!h.runs_dir().exists());
}

#[test]
fn kvm_on_a_host_without_usable_kvm_is_refused_with_the_reason() {
    let facts = dough_vmm::HostFacts::probe();
    let h = Harness::new();
    let out = h
        .cmd()
        .args(["run", "--accel", "kvm", "--", "true"])
        .output()
        .unwrap();
    if let Some(why) = facts.kvm_problem() {
        assert_eq!(out.status.code(), Some(125));
        let err = text(&out.stderr);
        assert!(
            err.contains("KVM was requested but is not usable here") && err.contains(&why),
            "{err}"
        );
        assert!(!h.runs_dir().exists());
    } else {
        assert_eq!(
            out.status.code(),
            Some(0),
            "kvm usable here: the run must work"
        );
    }
}

#[test]
fn firecracker_without_kvm_or_binary_is_refused_clearly() {
    let facts = dough_vmm::HostFacts::probe();
    let h = Harness::new();
    let out = h
        .cmd()
        .args(["run", "--backend", "firecracker", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    match facts.kvm_problem() {
        Some(why) => assert!(
            err.contains("firecracker needs KVM") && err.contains(&why),
            "{err}"
        ),
        None => assert!(err.contains("`firecracker` not found"), "{err}"),
    }
    assert!(!h.runs_dir().exists());
    let out = h
        .cmd()
        .args(["run", "--backend", "xen", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unknown backend `xen`"));
}

#[test]
fn doctor_explains_the_choice() {
    let h = Harness::new();
    let out = h.cmd().arg("doctor").output().unwrap();
    let s = text(&out.stdout);
    assert!(s.contains("auto → "), "{s}");
    assert!(s.contains("firecracker: "), "{s}");
    if dough_vmm::HostFacts::probe().kvm_problem().is_some() {
        assert!(
            s.contains("auto → qemu with tcg: qemu, because KVM is not usable"),
            "{s}"
        );
    }
    assert!(s.contains("kvm: "), "{s}");
    // The image section names the image this harness uses.
    assert!(s.lines().any(|l| l == "image"), "{s}");
    assert!(
        s.lines().any(|l| l.trim_start().starts_with("built: ")
            && l.contains(&image_dir().display().to_string())),
        "{s}"
    );
    assert_eq!(out.status.code(), Some(0), "this machine is set up: {s}");
}

/// `dough serve` refuses warm pools it cannot parse or that do not fit the
/// limits they count against, before it listens or boots anything.
#[test]
fn bad_pool_settings_stop_serve_before_it_starts() {
    let h = Harness::new();
    for (args, needle) in [
        (vec!["--pool", "2"], "give [IMAGE:]SHAPE=N"),
        (vec!["--pool", "2x1024"], "give [IMAGE:]SHAPE=N"),
        (vec!["--pool", "0x512=1"], "at least 1 vCPU"),
        (vec!["--pool", "axb=1"], "VCPUSxMEMORY_MIB"),
        (vec!["--pool", "1x512=x"], "whole number"),
        (vec!["--pool", "Bad/Img:1x512=1"], "image name"),
        (
            vec!["--pool-size", "1", "--pool", "1x512=2"],
            "already given",
        ),
        (
            vec!["--pool-size", "3", "--max-vms", "2"],
            "do not fit the limits",
        ),
        (
            vec!["--pool", "1x4096=2", "--memory-limit", "4096"],
            "do not fit the limits",
        ),
    ] {
        let out = h
            .cmd()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{args:?}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!h.state.path().join("api-url").exists(), "{args:?}");
    }
    assert!(!h.runs_dir().exists());
}
