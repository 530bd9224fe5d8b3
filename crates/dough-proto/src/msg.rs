//! The messages. Every field the guest sends is untrusted: the host bounds
//! sizes through the frame limit and validates meaning where it acts on it.
use serde::{Deserialize, Serialize};

/// An inclusive range of protocol versions.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionRange {
    pub min: u16,
    pub max: u16,
}

impl std::fmt::Display for VersionRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..={}", self.min, self.max)
    }
}

/// Messages from the guest agent to the host.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum GuestMsg {
    /// First message on every connection.
    Hello(Hello),
    /// Sent every [`crate::HEARTBEAT_INTERVAL_MS`]; `seq` counts from 0.
    Heartbeat { seq: u64 },
    /// The task's process exists (after Assign).
    Started { pid: u32 },
    /// A chunk of the task's output, in order per stream.
    Output {
        stream: Stream,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The task ended; sent after all of its output. `oom`: the guest's
    /// OOM killer killed a process while the task ran.
    Exit { status: ExitStatus, oom: bool },
    /// The task could not be started (no such command, bad user, ...).
    SpawnFailed { message: String },
    /// A diagnostic from the agent itself (not task output).
    Log { message: String },
}

/// Identity and timing the agent reports at boot.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Hello {
    pub versions: VersionRange,
    pub agent_version: String,
    /// `uname -r` of the guest kernel.
    pub kernel: String,
    /// Guest uptime (CLOCK_BOOTTIME) when Hello was sent, in milliseconds.
    pub boot_ms: u64,
}

/// Messages from the host to the guest agent.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum HostMsg {
    /// The version agreed for this connection.
    Welcome { version: u16 },
    /// Run this task.
    Assign(Assign),
    /// Send this signal to the task's whole process group.
    Signal { signo: i32 },
    /// Power off now.
    Shutdown,
}

/// What to run and how.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Assign {
    pub task_id: String,
    /// argv; `command[0]` is looked up in the guest's PATH.
    pub command: Vec<String>,
    /// Extra environment, applied over the agent's clean base environment.
    pub env: Vec<(String, String)>,
    /// Run as root instead of the unprivileged task user.
    pub root: bool,
    /// Working directory; the task user's home when `None`.
    pub workdir: Option<String>,
}

/// Which output stream a chunk belongs to.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How the task ended.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Normal exit with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// The shell convention: the code, or 128 + signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}
