//! The guest side of snapshot clones: the virtio-serial control port (vsock
//! cannot be migrated by QEMU 7.2) and what a restored clone must do before
//! it runs a task — reseed the RNG, set the clock, take its own identity.
use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::Duration;

use dough_proto::{GuestMsg, Restore};

/// The port's name, as the host's `virtserialport,name=` gives it.
pub const PORT_NAME: &str = "dough.agent";

/// Open the control port: `/dev/vportNpM` whose
/// `/sys/class/virtio-ports/*/name` is [`PORT_NAME`]. Waits for the device
/// to appear (the host kills a VM that never says Hello).
pub fn open_port() -> File {
    let mut delay = Duration::from_millis(5);
    loop {
        match find_port().and_then(|dev| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&dev)
                .map_err(|e| format!("open {dev}: {e}"))
        }) {
            Ok(f) => return f,
            Err(e) => {
                crate::log(&format!("control port: {e}; retrying"));
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(200));
            }
        }
    }
}

fn find_port() -> Result<String, String> {
    let dir = std::fs::read_dir("/sys/class/virtio-ports")
        .map_err(|e| format!("/sys/class/virtio-ports: {e}"))?;
    for e in dir.flatten() {
        let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == PORT_NAME {
            return Ok(format!("/dev/{}", e.file_name().to_string_lossy()));
        }
    }
    Err(format!("no virtio port named {PORT_NAME}"))
}

// <linux/random.h>
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Everything a fresh clone does before it may run a task; the answer for
/// the host carries a sample drawn from the reseeded generator.
pub fn restore(r: &Restore) -> Result<GuestMsg, String> {
    reseed(&r.entropy)?;
    let ts = nix::sys::time::TimeSpec::new(
        (r.unix_nanos / 1_000_000_000) as i64,
        (r.unix_nanos % 1_000_000_000) as i64,
    );
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
        .map_err(|e| format!("set the clock: {e}"))?;
    if !r.vm_id.is_empty()
        && r.vm_id.len() <= 48
        && r.vm_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        let cfg = crate::cmdline::BootConfig {
            vm_id: r.vm_id.clone(),
            ..Default::default()
        };
        crate::init::set_identity(&cfg)?;
    }
    let mut sample = vec![0u8; 32];
    getrandom(&mut sample)?;
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME)
        .map_err(|e| format!("read the clock: {e}"))?;
    Ok(GuestMsg::Restored {
        sample,
        unix_nanos: now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64,
    })
}

/// Credit the host's bytes to the input pool and force the CRNG to reseed
/// from it: every clone starts from the same generator state, and only
/// this makes their futures differ.
fn reseed(entropy: &[u8]) -> Result<(), String> {
    if entropy.len() < 32 {
        return Err("restore carried too little entropy".into());
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("open /dev/urandom: {e}"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<u8> = Vec::with_capacity(8 + entropy.len());
    info.extend(((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend((entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    // Word-aligned for the kernel's __u32 buffer.
    info.resize(info.len().next_multiple_of(4), 0);
    // SAFETY: both ioctls take the documented argument (a rand_pool_info
    // of the length given in it; none).
    unsafe {
        if libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) < 0 {
            return Err(format!(
                "RNDADDENTROPY: {}",
                std::io::Error::last_os_error()
            ));
        }
        if libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) < 0 {
            return Err(format!(
                "RNDRESEEDCRNG: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    info.fill(0);
    Ok(())
}

fn getrandom(buf: &mut [u8]) -> Result<(), String> {
    // SAFETY: buf is valid for its length.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n as usize != buf.len() {
        return Err(format!("getrandom: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}
