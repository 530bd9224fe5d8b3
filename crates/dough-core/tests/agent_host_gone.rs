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

/// A VM of the image's default kernel with only vsock (no network), its
/// control listener, and the temporary directory that holds them.
async fn boot(
    id: &str,
) -> (
    dough_vmm::VmProcess,
    tokio::net::UnixListener,
    tempfile::TempDir,
) {
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
        id: id.into(),
        paths: paths.clone(),
        kernel,
        acpi: kind.needs_acpi(),
        initramfs: Some(image.initramfs.clone()),
        rootfs: image.rootfs.clone(),
        scratch: paths.scratch(),
        layers: vec![],
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
    let vm = sel.vmm.start(&spec).await.unwrap();
    (vm, listener, tmp)
}

async fn next_msg(stream: &mut tokio::net::UnixStream) -> dough_proto::GuestMsg {
    loop {
        let f = tokio::time::timeout(
            Duration::from_secs(30),
            dough_core::conn::read_frame(stream),
        )
        .await
        .expect("a message within 30 s")
        .unwrap()
        .expect("the connection open");
        match dough_proto::decode::<dough_proto::GuestMsg>(&f).unwrap() {
            dough_proto::GuestMsg::Heartbeat { .. } | dough_proto::GuestMsg::Log { .. } => {}
            m => return m,
        }
    }
}

#[tokio::test]
async fn agent_powers_off_when_the_host_goes_away() {
    let (mut vm, listener, _tmp) = boot("hostgone0001").await;
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

/// Firecracker resets every vsock connection when it restores a snapshot.
/// A quiesced agent that loses its connection must dial again, say Hello,
/// and take Restore and a task on the new connection (a VM that was not
/// quiesced powers off instead: the test above). Here the reset is the host
/// closing the connection after Quiesced; the transport is the same
/// vhost-user-vsock a Firecracker guest's vsock speaks.
#[tokio::test]
async fn a_quiesced_agent_dials_again_after_its_connection_resets() {
    use dough_proto::{GuestMsg, HostMsg};
    let (mut vm, listener, _tmp) = boot("redial000001").await;
    let accept = || async {
        tokio::time::timeout(Duration::from_secs(60), listener.accept())
            .await
            .expect("agent dialed in")
            .unwrap()
            .0
    };
    let mut stream = accept().await;
    assert!(matches!(next_msg(&mut stream).await, GuestMsg::Hello(_)));
    dough_core::conn::send(&mut stream, &HostMsg::Quiesce)
        .await
        .unwrap();
    assert!(matches!(next_msg(&mut stream).await, GuestMsg::Quiesced));
    drop(stream);

    let mut stream = accept().await;
    assert!(
        matches!(next_msg(&mut stream).await, GuestMsg::Hello(_)),
        "a Hello on the new connection"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let restore = HostMsg::Restore(dough_proto::Restore {
        entropy: vec![7u8; 64],
        unix_nanos: now,
        vm_id: "redial000002".into(),
    });
    dough_core::conn::send(&mut stream, &restore).await.unwrap();
    match next_msg(&mut stream).await {
        GuestMsg::Restored { sample, .. } => assert_eq!(sample.len(), 32),
        m => panic!("expected Restored, got {m:?}"),
    }
    let assign = HostMsg::Assign(Box::new(dough_proto::Assign {
        task_id: "t".into(),
        command: vec!["hostname".into()],
        ..Default::default()
    }));
    dough_core::conn::send(&mut stream, &assign).await.unwrap();
    assert!(matches!(
        next_msg(&mut stream).await,
        GuestMsg::Started { .. }
    ));
    match next_msg(&mut stream).await {
        GuestMsg::Output { data, .. } => assert_eq!(data, b"dough-redial000002\n"),
        m => panic!("expected the task's output, got {m:?}"),
    }
    assert!(matches!(
        next_msg(&mut stream).await,
        GuestMsg::Exit {
            status: dough_proto::ExitStatus::Code(0),
            ..
        }
    ));
    dough_core::conn::send(&mut stream, &HostMsg::Shutdown)
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), vm.wait_vmm())
        .await
        .expect("the VM powered off after Shutdown")
        .unwrap();
    assert!(status.success(), "{status}");
    let report = vm.stop(Duration::ZERO).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}
