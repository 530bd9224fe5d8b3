//! Tier 1 (root, real namespaces and nftables): tap0 as each VMM attaches
//! it, right after Dough's own network setup for that VMM
//! (`supervisor::setup_net`), in a "host" namespace the test makes and
//! deletes.
//!
//! Test double: a stand-in for Firecracker (no Firecracker binary can be
//! installed on CI, and this host's KVM does not boot a guest). It does
//! what Firecracker's `Tap::open_named` does with the device — open
//! `/dev/net/tun`, `TUNSETIFF` on `tap0` with `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`, then `TUNSETVNETHDRSZ` and `TUNSETOFFLOAD` — inside the
//! VM's namespace, as the VM's uid. The device node is opened before the
//! uid switch: the jailer gives the jail's uid a `/dev/net/tun` of its own,
//! while this host's is root's only; the kernel checks the TAP's owner at
//! `TUNSETIFF`, which runs as the VM's uid.
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use dough_core::supervisor::{setup_net, tap_attach};
use dough_core::HostConfig;
use dough_net::{Egress, TapAttach, VmNet};
use dough_vmm::{AccelChoice, Backend};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO, as Firecracker asks.
const OFFLOADS: libc::c_uint = 0x01 | 0x02 | 0x04 | 0x10;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// The stand-in: attach `tap0` in the namespace at `netns` as `uid`, as
/// Firecracker does. Err carries the errno of the step that failed.
fn firecracker_attaches(netns: &Path, uid: u32) -> std::io::Result<()> {
    let ns = std::fs::File::open(netns)?;
    let mut cmd = Command::new("/bin/true");
    // SAFETY: between fork and exec only raw syscalls on memory made before
    // the fork (no allocation); an error returns the errno to spawn().
    unsafe {
        cmd.pre_exec(move || {
            let err = || Err(std::io::Error::last_os_error());
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return err();
            }
            let fd = libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            );
            if fd < 0 {
                return err();
            }
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0
            {
                return err();
            }
            let mut req = IfReq {
                name: [0; libc::IFNAMSIZ],
                flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
                _pad: [0; 22],
            };
            req.name[..4].copy_from_slice(b"tap0");
            if libc::ioctl(fd, TUNSETIFF, &mut req) < 0 {
                return err();
            }
            let hdr: libc::c_int = 12;
            if libc::ioctl(fd, TUNSETVNETHDRSZ, &hdr) < 0
                || libc::ioctl(fd, TUNSETOFFLOAD, OFFLOADS as libc::c_ulong) < 0
            {
                return err();
            }
            Ok(())
        });
    }
    let status = cmd.status()?;
    assert!(status.success(), "/bin/true after the attach: {status}");
    Ok(())
}

/// A network namespace of the test's own, standing for the host; deleted on
/// drop.
struct HostNs(String);

impl HostNs {
    fn new() -> HostNs {
        let name = format!("dt-tap-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add (needs root and iproute2)");
        assert!(ok.success(), "ip netns add {name}");
        HostNs(name)
    }

    /// Run `f` on a thread inside this namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = PathBuf::from("/run/netns").join(&self.0);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).expect("open the host namespace");
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("thread in the host namespace")
    }
}

impl Drop for HostNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn host(state: &Path) -> HostConfig {
    let mut h = HostConfig::new(Some(state.to_path_buf()), None, AccelChoice::Auto);
    h.dns_upstream = Some("192.0.2.53:53".parse().unwrap());
    h
}

fn vm(hostns: &HostNs, h: &HostConfig, id: &str, backend: Backend, uid: u32) -> VmNet {
    let (h, id) = (h.clone(), id.to_string());
    hostns.run(move || setup_net(&h, &id, &Egress::None, backend, Some(uid)).expect("setup_net"))
}

fn teardown(hostns: &HostNs, net: VmNet) {
    let netns = net.netns.clone();
    let errors = hostns.run(move || net.teardown());
    assert!(errors.is_empty(), "teardown: {errors:?}");
    assert!(!netns.exists(), "{} left behind", netns.display());
}

#[test]
fn the_backends_get_tap0_the_way_they_attach_it() {
    assert_eq!(tap_attach(Backend::Firecracker), TapAttach::ByName);
    assert_eq!(tap_attach(Backend::Qemu), TapAttach::Fd);
}

/// Firecracker's VM: Dough holds no descriptor, tap0 is in the VM's
/// namespace and owned by the jail's uid, and the stand-in attaches it with
/// Firecracker's flags. The same stand-in is refused with EBUSY while Dough
/// holds tap0 open, as it did for every backend before (and still does for
/// QEMU, which inherits that descriptor), and with EPERM as another uid.
#[test]
fn firecracker_attaches_tap0_after_doughs_setup() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "tier-1 test: needs root (namespaces, TAP, nftables)"
    );
    let hostns = HostNs::new();
    let state = tempfile::tempdir().unwrap();
    let h = host(state.path());
    let pid = std::process::id() % 100_000;
    let uid = 3_100_000 + pid;

    let fc = vm(
        &hostns,
        &h,
        &format!("t{pid:05}fct"),
        Backend::Firecracker,
        uid,
    );
    assert!(fc.tap.is_none(), "dough holds tap0 open for firecracker");
    let e = firecracker_attaches(&fc.netns, uid + 1).expect_err("another uid attached tap0");
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "another uid: {e}");
    firecracker_attaches(&fc.netns, uid)
        .expect("firecracker's TUNSETIFF on tap0 as the jail's uid");
    // Again, as a restarted VMM would: nothing stays attached.
    firecracker_attaches(&fc.netns, uid).expect("second attach after the first closed");
    teardown(&hostns, fc);

    let qemu = vm(&hostns, &h, &format!("t{pid:05}qmt"), Backend::Qemu, uid);
    assert!(qemu.tap.is_some(), "qemu's descriptor is held for it");
    let e = firecracker_attaches(&qemu.netns, uid).expect_err("tap0 attached twice");
    assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "held tap0: {e}");
    teardown(&hostns, qemu);
}
