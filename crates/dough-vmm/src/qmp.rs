//! The few QMP commands Dough needs, over QEMU's Unix socket.
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::VmmError;

/// Connect, negotiate capabilities, send `quit`. QEMU exits ~5 ms later.
pub async fn quit(sock: &Path, limit: Duration) -> Result<(), VmmError> {
    tokio::time::timeout(limit, async {
        let s = UnixStream::connect(sock)
            .await
            .map_err(|e| VmmError::Qmp(format!("connect {}: {e}", sock.display())))?;
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        let mut line = String::new();
        r.read_line(&mut line)
            .await
            .map_err(|e| VmmError::Qmp(format!("greeting: {e}")))?;
        if !line.contains("QMP") {
            return Err(VmmError::Qmp(format!("unexpected greeting {line:?}")));
        }
        for cmd in ["qmp_capabilities", "quit"] {
            w.write_all(format!("{{\"execute\":\"{cmd}\"}}\n").as_bytes())
                .await
                .map_err(|e| VmmError::Qmp(format!("{cmd}: {e}")))?;
            line.clear();
            // A reply, or EOF once QEMU quits.
            let _ = r.read_line(&mut line).await;
            if line.contains("\"error\"") {
                return Err(VmmError::Qmp(format!("{cmd}: {}", line.trim())));
            }
        }
        Ok(())
    })
    .await
    .map_err(|_| VmmError::Qmp(format!("no answer within {limit:?}")))?
}
