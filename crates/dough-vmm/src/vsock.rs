//! Host side of Firecracker-style hybrid vsock (also what
//! `vhost-device-vsock --uds-path` serves for QEMU).
//!
//! * guest → host (CID 2, port P): the VMM connects to the Unix socket
//!   `<uds>_P`, on which the host listens;
//! * host → guest port P: connect to `<uds>`, write `CONNECT P\n`, read
//!   `OK <host port>\n`, then the stream is the guest's connection (Dough
//!   does not use this direction: the agent always dials out).
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

use crate::VmmError;

/// The listener path for guest-initiated connections to `port`.
pub fn guest_listener_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = uds.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Listen for the guest's connections to host port `port`. Create before
/// the VM starts so the agent's first dial is answered.
pub fn listen(uds: &Path, port: u32) -> Result<UnixListener, VmmError> {
    let path = guest_listener_path(uds, port);
    let _ = std::fs::remove_file(&path);
    UnixListener::bind(&path).map_err(crate::io_err(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_path_appends_port() {
        assert_eq!(
            guest_listener_path(Path::new("/r/vsock.sock"), 1024),
            PathBuf::from("/r/vsock.sock_1024")
        );
    }
}
