//! PID 1 duties: mount the early filesystems, load kernel modules, assemble
//! the root (read-only base + overlay on the scratch disk), switch into it,
//! set the hostname, bring up loopback, power off.
use std::ffi::CString;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use nix::unistd::{chdir, chroot, sethostname};

use crate::cmdline::BootConfig;

/// Where the initramfs lists the modules to load, in order (one file name a
/// line, relative to `/lib/dough/modules/`): `modules.early` holds what the
/// vsock dial needs, `modules.late` the rest (disks, overlay, network).
/// Absent or empty for a kernel with the drivers built in.
pub const MODULES_EARLY: &str = "/lib/dough/modules.early";
pub const MODULES_LATE: &str = "/lib/dough/modules.late";
const MODULE_DIR: &str = "/lib/dough/modules";
/// The kernel release the modules belong to.
const MODULES_RELEASE: &str = "/lib/dough/modules.release";

type Result<T> = std::result::Result<T, String>;

fn mnt(src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) -> Result<()> {
    let _ = fs::create_dir_all(target);
    mount(Some(src), target, Some(fstype), flags, data)
        .map_err(|e| format!("mount {src} on {target} ({fstype}): {e}"))
}

/// proc, sys and dev, in the initramfs or on the read-only rootfs.
pub fn early_mounts() -> Result<()> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mnt("proc", "/proc", "proc", nodev, None)?;
    mnt("sysfs", "/sys", "sysfs", nodev, None)?;
    let dev = mnt(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    );
    // Booted from the rootfs, the kernel may have mounted it already.
    if dev.is_err() && !std::path::Path::new("/dev/null").exists() {
        return dev;
    }
    Ok(())
}

/// Load the modules listed in `list`, in order. A module that is already
/// present (built in, or loaded) is fine.
pub fn load_modules(list: &str) -> Result<usize> {
    let Ok(order) = fs::read_to_string(list) else {
        return Ok(0);
    };
    // The modules are built for one kernel release; another kernel (the
    // minimal one, drivers built in) needs none of them.
    if let Ok(release) = fs::read_to_string(MODULES_RELEASE) {
        let running = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        if release.trim() != running {
            return Ok(0);
        }
    }
    let params = CString::default();
    let mut n = 0;
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = Path::new(MODULE_DIR).join(name);
        let f = fs::File::open(&path).map_err(|e| format!("open module {name}: {e}"))?;
        match nix::kmod::finit_module(&f, &params, nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) => n += 1,
            Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(format!("load module {name}: {e}")),
        }
    }
    Ok(n)
}

fn wait_for(path: &str, limit: Duration) -> Result<()> {
    let start = Instant::now();
    while !Path::new(path).exists() {
        if start.elapsed() > limit {
            return Err(format!("{path} did not appear within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Mount the base read-only, the scratch disk read-write, join them with an
/// overlay and make that the root. The initramfs stays underneath, unseen.
pub fn switch_root(cfg: &BootConfig) -> Result<()> {
    // Booted without an initramfs, "/" is the read-only rootfs itself:
    // the mount points below go on a tmpfs.
    if root_is_disk()? {
        mnt(
            "tmpfs",
            "/mnt",
            "tmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        )?;
    }
    wait_for(&cfg.root_dev, Duration::from_secs(10))?;
    wait_for(&cfg.scratch_dev, Duration::from_secs(10))?;
    mnt(
        &cfg.root_dev,
        "/mnt/base",
        "ext4",
        MsFlags::MS_RDONLY,
        Some("noload"),
    )?;
    mnt(
        &cfg.scratch_dev,
        "/mnt/scratch",
        "ext4",
        MsFlags::MS_NOATIME,
        cfg.discard.then_some("discard"),
    )?;
    for d in ["/mnt/scratch/upper", "/mnt/scratch/work"] {
        fs::create_dir_all(d).map_err(|e| format!("mkdir {d}: {e}"))?;
    }
    // An image's layers: each the scratch disk a build step left, its
    // `upper/` (whiteouts and opaque directories as overlayfs wrote them)
    // stacked over the base, the newest on top.
    let mut lower = String::from("/mnt/base");
    for (i, dev) in cfg.layers.iter().enumerate() {
        wait_for(dev, Duration::from_secs(10))?;
        let at = format!("/mnt/layer{i}");
        mnt(dev, &at, "ext4", MsFlags::MS_RDONLY, Some("noload"))?;
        lower = format!("{at}/upper:{lower}");
    }
    mnt(
        "overlay",
        "/mnt/newroot",
        "overlay",
        MsFlags::empty(),
        Some(&format!(
            "lowerdir={lower},upperdir=/mnt/scratch/upper,workdir=/mnt/scratch/work"
        )),
    )?;
    for d in ["proc", "sys", "dev"] {
        let target = format!("/mnt/newroot/{d}");
        let _ = fs::create_dir_all(&target);
        mount(
            Some(format!("/{d}").as_str()),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|e| format!("move /{d}: {e}"))?;
    }
    chdir("/mnt/newroot").map_err(|e| format!("chdir /mnt/newroot: {e}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("move new root onto /: {e}"))?;
    chroot(".").map_err(|e| format!("chroot: {e}"))?;
    chdir("/").map_err(|e| format!("chdir /: {e}"))?;

    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mnt(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0620,ptmxmode=0666"),
    )?;
    mnt("tmpfs", "/dev/shm", "tmpfs", nodev, Some("mode=1777"))?;
    mnt("tmpfs", "/run", "tmpfs", nodev, Some("mode=0755"))?;
    let _ = std::os::unix::fs::symlink("/proc/self/fd", "/dev/fd");
    Ok(())
}

/// Whether "/" is the rootfs disk (ext4) rather than the initramfs.
fn root_is_disk() -> Result<bool> {
    let st = nix::sys::statfs::statfs("/").map_err(|e| format!("statfs /: {e}"))?;
    Ok(st.filesystem_type() == nix::sys::statfs::EXT4_SUPER_MAGIC)
}

/// Hostname `dough-<vm id>`, also in /etc/hostname and /etc/hosts so tools
/// that look it up find it.
pub fn set_identity(cfg: &BootConfig) -> Result<()> {
    let name = format!("dough-{}", cfg.vm_id);
    sethostname(&name).map_err(|e| format!("sethostname: {e}"))?;
    let _ = rewrite("/etc/hostname", format!("{name}\n").as_bytes());
    let hosts = format!("127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost\n");
    let _ = rewrite("/etc/hosts", hosts.as_bytes());
    Ok(())
}

/// Replace a small file's content in place: write over it, and cut it only
/// when it shrank. A restored clone renames itself on the overlay's ext4
/// upper layer, and under TCG truncating first (`fs::write`) cost ~30 ms of
/// journal code translated afresh; the names are all one length, so a
/// clone's rewrite is an overwrite of the same blocks.
fn rewrite(path: &str, content: &[u8]) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let old = f.metadata()?.len();
    std::io::Write::write_all(&mut f, content)?;
    if old > content.len() as u64 {
        f.set_len(content.len() as u64)?;
    }
    Ok(())
}

/// Bring `lo` up (SIOCSIFFLAGS), so tasks can use localhost.
pub fn loopback_up() -> Result<()> {
    let sock = inet_socket()?;
    link_up(&sock, "lo")
}

fn inet_socket() -> Result<std::os::fd::OwnedFd> {
    nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is a plain C struct for which all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s as libc::c_char;
    }
    req
}

fn sockaddr_in(ip: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; this is how the
    // ioctls take an IPv4 address.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl<T>(
    sock: &std::os::fd::OwnedFd,
    req: libc::c_ulong,
    arg: &mut T,
    what: &str,
) -> Result<()> {
    // SAFETY: `arg` is the struct the request takes (ifreq or rtentry), valid
    // for the kernel to read and write.
    if unsafe { libc::ioctl(sock.as_raw_fd(), req, arg as *mut T) } < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn link_up(sock: &std::os::fd::OwnedFd, name: &str) -> Result<()> {
    let mut req = ifreq(name);
    ioctl(
        sock,
        libc::SIOCGIFFLAGS,
        &mut req,
        &format!("SIOCGIFFLAGS {name}"),
    )?;
    // SAFETY: the union member ifru_flags is the one SIOCGIFFLAGS filled.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(
        sock,
        libc::SIOCSIFFLAGS,
        &mut req,
        &format!("SIOCSIFFLAGS {name}"),
    )
}

/// eth0 as the host laid it out: address, up, default route via the
/// gateway, and the gateway (Dough's DNS forwarder) as the resolver.
pub fn network_up(net: &crate::cmdline::GuestNet) -> Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq("eth0");
    req.ifr_ifru.ifru_addr = sockaddr_in(net.addr);
    ioctl(&sock, libc::SIOCSIFADDR, &mut req, "SIOCSIFADDR eth0")?;
    let mask = if net.prefix == 0 {
        0
    } else {
        u32::MAX << (32 - net.prefix)
    };
    let mut req = ifreq("eth0");
    req.ifr_ifru.ifru_netmask = sockaddr_in(std::net::Ipv4Addr::from(mask));
    ioctl(&sock, libc::SIOCSIFNETMASK, &mut req, "SIOCSIFNETMASK eth0")?;
    link_up(&sock, "eth0")?;
    // SAFETY: rtentry is a plain C struct for which all-zero is valid.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(std::net::Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_in(std::net::Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_in(net.gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    ioctl(&sock, libc::SIOCADDRT, &mut rt, "SIOCADDRT default")?;
    let resolv = match net.dns {
        Some(d) => format!("nameserver {d}\n"),
        None => String::new(),
    };
    fs::write("/etc/resolv.conf", resolv).map_err(|e| format!("/etc/resolv.conf: {e}"))
}

/// End the VM. The VMM runs with reboot treated as exit (QEMU `-no-reboot`,
/// Firecracker always), so a reset is the fastest way out. The scratch disk
/// is discarded by the host, so nothing is synced.
pub fn power_off() -> ! {
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Only reached if reboot failed; PID 1 must never return.
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

#[cfg(test)]
mod tests {
    use super::rewrite;

    /// A clone's identity overwrites files the template wrote: longer,
    /// shorter and same-length content must each leave exactly the new
    /// bytes, and the file is made when missing.
    #[test]
    fn rewrite_leaves_exactly_the_new_content() {
        let dir = std::env::temp_dir().join(format!("dough-rewrite-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("hosts");
        let path = p.to_str().unwrap();
        for content in [
            "made\n",
            "a much longer first line\nand a second\n",
            "short\n",
            "SHORT\n",
        ] {
            rewrite(path, content.as_bytes()).unwrap();
            assert_eq!(std::fs::read_to_string(&p).unwrap(), content);
        }
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&p).unwrap());
        rewrite(path, b"SHORT\n").unwrap();
        // In place: the same inode (no new file, no rename).
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&p).unwrap()),
            ino
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
