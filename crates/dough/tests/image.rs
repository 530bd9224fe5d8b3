//! Tier 1: `dough image build` on the image `scripts/setup.sh` built. With
//! unchanged inputs every part is skipped and the manifest stays the same.
mod common;

use common::*;

#[test]
fn unchanged_rebuild_is_skipped_and_the_manifest_kept() {
    let h = Harness::new();
    let manifest = image_dir().join("manifest.json");
    let before = std::fs::read(&manifest).unwrap();
    let out = h.cmd().args(["image", "build"]).output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    for part in [
        "[1/3] kernel",
        "[2/3] initramfs",
        "[2b] minimal kernel",
        "[3/3] rootfs",
        "[3b] agent in the rootfs",
    ] {
        let line = err
            .lines()
            .find(|l| l.contains(part))
            .unwrap_or_else(|| panic!("{part}: {err}"));
        assert!(
            line.ends_with("unchanged, skipped"),
            "{line}\n(is the image stale? run scripts/setup.sh)"
        );
    }
    assert_eq!(std::fs::read(&manifest).unwrap(), before);
    let show = h.cmd().args(["image", "show"]).output().unwrap();
    let m: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(m["kernel"]["sha256"].as_str().unwrap().len(), 64);
    assert!(m["kernel_version"]
        .as_str()
        .unwrap()
        .contains("cloud-amd64"));
    assert_eq!(m["kernel_minimal"]["sha256"].as_str().unwrap().len(), 64);
    // The agent the minimal kernel starts from the rootfs (no initramfs).
    assert_eq!(m["rootfs_agent"].as_str().unwrap().len(), 64, "{m}");
    assert!(m["kernel_minimal"]["source"]
        .as_str()
        .unwrap()
        .contains("linux-source-6.1"));
    assert!(m["kernel_minimal_version"]
        .as_str()
        .unwrap()
        .starts_with("6.1."));
    // Built for this host: without usable KVM (this PVM machine) the
    // kernel drops the return thunks only an affected hardware CPU needs.
    let target = m["kernel_minimal_target"].as_str().unwrap();
    let source = m["kernel_minimal"]["source"].as_str().unwrap();
    assert_eq!(target == "tcg", source.contains("tcg.fragment"), "{m}");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(target, "tcg", "{m}");
    }
    // Both kernels without a symbol table (QEMU would load it at every
    // start), still bootable ELF files with their PVH note.
    for k in ["vmlinux", "vmlinux-minimal"] {
        let path = image_dir().join(k);
        let out = std::process::Command::new("readelf")
            .args(["-SWn"])
            .arg(&path)
            .output()
            .unwrap();
        let sections = text(&out.stdout);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(!sections.contains(".symtab"), "{k} keeps its symbols");
        assert!(sections.contains(".text"), "{k}: {sections}");
        // The PVH entry point QEMU's microvm boots through: the Xen note
        // of type 18 (XEN_ELFNOTE_PHYS32_ENTRY), not just any Xen note.
        assert!(
            sections
                .lines()
                .any(|l| l.trim_start().starts_with("Xen") && l.contains("(0x00000012)")),
            "{k} lost its PVH entry note: {sections}"
        );
        // A `tcg` kernel is compiled without return thunks: no sites for
        // the boot to patch.
        if k == "vmlinux-minimal" {
            assert_eq!(
                sections.contains(".return_sites"),
                target == "kvm",
                "{k} built for {target}"
            );
        }
    }
}

#[test]
fn a_dynamic_agent_is_refused_with_a_hint() {
    let h = Harness::new();
    let out = h
        .cmd()
        .env("DOUGH_IMAGE_DIR", h.state.path().join("img"))
        .args([
            "image",
            "build",
            "--guest-agent",
            env!("CARGO_BIN_EXE_dough"),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(
        err.contains("dynamically linked") && err.contains("scripts/build-agent.sh"),
        "{err}"
    );
}
