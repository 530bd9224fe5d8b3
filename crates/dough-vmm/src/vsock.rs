//! Host side of Firecracker-style hybrid vsock (also what
//! `vhost-device-vsock --uds-path` serves for QEMU).
//!
//! * guest → host (CID 2, port P): the VMM connects to the Unix socket
//!   `<uds>_P`, on which the host listens;
//! * host → guest port P: connect to `<uds>`, write `CONNECT P\n`, read
//!   `OK <host port>\n`, then the stream is the guest's connection.
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

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

/// Open a host-initiated connection to guest port `port`.
pub async fn connect(
    uds: &Path,
    port: u32,
    limit: Duration,
) -> Result<BufReader<UnixStream>, VmmError> {
    tokio::time::timeout(limit, async {
        let mut s = UnixStream::connect(uds).await.map_err(crate::io_err(uds))?;
        s.write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(crate::io_err(uds))?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).await.map_err(crate::io_err(uds))?;
        if !line.starts_with("OK ") {
            return Err(VmmError::Io {
                path: uds.into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    format!("guest port {port} refused: {line:?}"),
                ),
            });
        }
        Ok(r)
    })
    .await
    .map_err(|_| VmmError::Io {
        path: uds.into(),
        source: std::io::Error::new(std::io::ErrorKind::TimedOut, "vsock connect timed out"),
    })?
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
