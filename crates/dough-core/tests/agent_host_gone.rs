//! Tier 2 (real VM): the agent powers the VM off by itself when the host
//! side of the control connection goes away — no QMP, no kill.
use std::path::PathBuf;
use std::time::Duration;

use dough_image::Image;
use dough_vmm::{vsock, AccelChoice, BackendChoice, HostFacts, VmPaths, VmSpec};

fn image_dir() -> PathBuf {
    let state = std::env::var_os("DOUGH_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/dough"));
    std::env::var_os("DOUGH_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| state.join("images/default"))
}

#[tokio::test]
async fn agent_powers_off_when_the_host_goes_away() {
    let image = Image::load(&image_dir()).expect("guest image (run scripts/setup.sh)");
    let tmp = tempfile::Builder::new()
        .prefix("dough-t")
        .tempdir_in("/tmp")
        .unwrap();
    let paths = VmPaths::new(tmp.path().join("vm"));
    std::fs::create_dir(&paths.run_dir).unwrap();
    dough_vmm::disk::create_scratch(&paths.scratch(), 256)
        .await
        .unwrap();
    let listener = vsock::listen(&paths.vsock_uds(), dough_proto::CONTROL_PORT).unwrap();
    let facts = HostFacts::probe();
    let sel = dough_vmm::select(&facts, BackendChoice::Qemu, AccelChoice::Auto).unwrap();
    let (kernel, kind) = image
        .kernel_for(Default::default(), sel.accel == dough_vmm::Accel::Tcg)
        .unwrap();
    let spec = VmSpec {
        id: "hostgone0001".into(),
        paths: paths.clone(),
        kernel,
        acpi: kind.needs_acpi(),
        initramfs: Some(image.initramfs.clone()),
        rootfs: image.rootfs.clone(),
        scratch: paths.scratch(),
        vcpus: 1,
        memory_mib: 256,
        accel: sel.accel,
        kernel_args: vec![format!("dough.port={}", dough_proto::CONTROL_PORT)],
        tap: None,
        netns: None,
        mac: String::new(),
        tap_fd: None,
        guest_cid: 3,
        guest_port: dough_proto::CONTROL_PORT,
        jail: None,
        snapshot: None,
    };
    let mut vm = sel.vmm.start(&spec).await.unwrap();
    let (mut stream, _) = tokio::time::timeout(Duration::from_secs(60), listener.accept())
        .await
        .expect("agent dialed in")
        .unwrap();
    let hello = dough_core::conn::read_frame(&mut stream)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        dough_proto::decode::<dough_proto::GuestMsg>(&hello).unwrap(),
        dough_proto::GuestMsg::Hello(_)
    ));
    drop(stream);
    let status = tokio::time::timeout(Duration::from_secs(10), vm.wait_vmm())
        .await
        .expect("the VM powered itself off within 10 s")
        .unwrap();
    assert!(status.success(), "{status}");
    let report = vm.stop(Duration::ZERO).await;
    assert_eq!(report.vmm_ended_by, "exited");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}
