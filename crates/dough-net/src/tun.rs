//! The TAP device, made with the TUN ioctls: persistent (it outlives the
//! file descriptor that made it, until its namespace goes) and owned by the
//! VM's uid so a VMM without capabilities may attach to it.
use std::io;
use std::os::fd::AsRawFd;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Create TAP `name` in the calling thread's network namespace; returns the
/// attached file descriptor (a VMM can be handed it instead of opening
/// /dev/net/tun itself, which its uid may not be allowed to).
pub fn create_persistent_tap(name: &str, owner: Option<u32>) -> io::Result<std::fs::File> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "name too long"));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    let fd = f.as_raw_fd();
    // SAFETY: the ioctls take an ifreq (TUNSETIFF) or an integer argument.
    unsafe {
        if libc::ioctl(fd, TUNSETIFF, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some(uid) = owner {
            if libc::ioctl(fd, TUNSETOWNER, uid as libc::c_ulong) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if libc::ioctl(fd, TUNSETPERSIST, 1 as libc::c_ulong) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(f)
}

/// The gateway side of every VM's TAP gets this MAC address (locally
/// administered): a snapshot clone's guest may hold the template's ARP
/// entry for the gateway, and it stays right in every namespace.
pub const GATEWAY_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x01];

/// Set `name`'s MAC address (SIOCSIFHWADDR) in the calling thread's
/// namespace; the link must be down.
pub fn set_mac(name: &str, mac: [u8; 6]) -> io::Result<()> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "name too long"));
    }
    // SAFETY: socket() has no memory arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket() and is owned here.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: all-zero ifreq and sockaddr are valid; the name and address
    // are copied in.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    let mut addr: libc::sockaddr = unsafe { std::mem::zeroed() };
    addr.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in addr.sa_data.iter_mut().zip(mac) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_hwaddr = addr;
    // SAFETY: SIOCSIFHWADDR takes a pointer to an ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFHWADDR, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
