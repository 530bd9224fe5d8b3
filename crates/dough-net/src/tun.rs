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
