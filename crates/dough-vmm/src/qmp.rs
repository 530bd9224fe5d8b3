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

/// A QMP session: commands and their answers, events skipped.
pub struct Session {
    r: BufReader<tokio::net::unix::OwnedReadHalf>,
    w: tokio::net::unix::OwnedWriteHalf,
}

impl Session {
    /// Connect (retrying until `limit` while QEMU creates the socket) and
    /// negotiate capabilities.
    pub async fn connect(sock: &Path, limit: Duration) -> Result<Session, VmmError> {
        let deadline = tokio::time::Instant::now() + limit;
        let s = loop {
            match UnixStream::connect(sock).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(VmmError::Qmp(format!("connect {}: {e}", sock.display())))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        };
        let (r, w) = s.into_split();
        let mut s = Session {
            r: BufReader::new(r),
            w,
        };
        let mut line = String::new();
        s.r.read_line(&mut line)
            .await
            .map_err(|e| VmmError::Qmp(format!("greeting: {e}")))?;
        if !line.contains("QMP") {
            return Err(VmmError::Qmp(format!("unexpected greeting {line:?}")));
        }
        s.execute("qmp_capabilities", serde_json::json!({})).await?;
        Ok(s)
    }

    /// Run `cmd` with `args`; its `return` value, or its error as text.
    pub async fn execute(
        &mut self,
        cmd: &str,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, VmmError> {
        let req = serde_json::json!({"execute": cmd, "arguments": args});
        self.w
            .write_all(format!("{req}\n").as_bytes())
            .await
            .map_err(|e| VmmError::Qmp(format!("{cmd}: {e}")))?;
        loop {
            let mut line = String::new();
            if self
                .r
                .read_line(&mut line)
                .await
                .map_err(|e| VmmError::Qmp(format!("{cmd}: {e}")))?
                == 0
            {
                return Err(VmmError::Qmp(format!("{cmd}: QEMU closed the connection")));
            }
            let v: serde_json::Value = serde_json::from_str(&line)
                .map_err(|e| VmmError::Qmp(format!("{cmd}: bad reply {line:?}: {e}")))?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(VmmError::Qmp(format!("{cmd}: {e}")));
            }
            return Ok(v.get("return").cloned().unwrap_or(serde_json::Value::Null));
        }
    }

    /// Wait until `query-migrate` says `completed` (Err on `failed`).
    pub async fn wait_migration(&mut self, limit: Duration) -> Result<(), VmmError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let st = self.execute("query-migrate", serde_json::json!({})).await?;
            match st["status"].as_str().unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    return Err(VmmError::Qmp(format!("migration {}: {st}", st["status"])))
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(VmmError::Qmp(format!(
                    "migration not done within {limit:?}: {st}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Wait until the VM's run state is `state` (e.g. `paused` after an
    /// incoming migration).
    pub async fn wait_status(&mut self, state: &str, limit: Duration) -> Result<(), VmmError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let st = self.execute("query-status", serde_json::json!({})).await?;
            if st["status"] == state {
                return Ok(());
            }
            if st["status"] == "inmigrate" || st["status"] == "prelaunch" {
                let m = self.execute("query-migrate", serde_json::json!({})).await?;
                if m["status"] == "failed" {
                    return Err(VmmError::Qmp(format!("incoming migration failed: {m}")));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(VmmError::Qmp(format!(
                    "the vm is {} after {limit:?}, not {state}",
                    st["status"]
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// The migration capability every snapshot uses on both sides: guest RAM
/// is in a file and is not copied into the stream.
pub fn snapshot_capabilities() -> serde_json::Value {
    serde_json::json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})
}
