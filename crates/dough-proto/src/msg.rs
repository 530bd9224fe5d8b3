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
    /// The repository is cloned and the task's branch checked out at this
    /// commit (the host checks it is the base it asked for).
    Cloned { commit: String },
    /// The clone failed; the task was not started.
    CloneFailed { message: String },
    /// A chunk of the task's git bundle, in order; a [`Work`] report follows.
    BundleData {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// What the task left in the repository; sent before Exit.
    Work(Work),
    /// Answer to Quiesce: the root is ready, heartbeats are stopped and
    /// nothing more is written until Restore (the VM may be snapshotted).
    Quiesced,
    /// Answer to Restore, after reseeding: random bytes drawn from the
    /// reseeded generator (the host checks no two clones share them) and
    /// the guest's clock after it was set.
    Restored {
        #[serde(with = "serde_bytes")]
        sample: Vec<u8>,
        unix_nanos: u64,
    },
}

/// The guest's account of the task's changes. Untrusted: the host's gate
/// checks the bundle itself, never these claims alone.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Work {
    /// The branch is still at the base commit and nothing was uncommitted.
    NothingToDo,
    /// The bundle (base..branch) was sent as BundleData.
    Bundle {
        head: String,
        commits: u32,
        bytes: u64,
    },
    /// Committing or bundling failed (`stage`: "commit" or "bundle").
    Failed { stage: String, message: String },
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
    Assign(Box<Assign>),
    /// Send this signal to the task's whole process group.
    Signal { signo: i32 },
    /// Power off now.
    Shutdown,
    /// Get ready to be snapshotted (a template VM): see `GuestMsg::Quiesced`.
    Quiesce,
    /// This VM is a fresh clone of a snapshot: mix `entropy` into the
    /// kernel's RNG and reseed it, set the clock, take `vm_id`'s identity
    /// (hostname), resume heartbeats, answer `GuestMsg::Restored`.
    Restore(Restore),
}

/// What a restored clone must take on before it may run a task.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Restore {
    #[serde(with = "serde_bytes")]
    pub entropy: Vec<u8>,
    /// The host's wall clock (ns since the epoch) when sent.
    pub unix_nanos: u64,
    pub vm_id: String,
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
    /// Working directory; the task user's home when `None` (the clone
    /// when `repo` is set).
    pub workdir: Option<String>,
    /// Clone this repository before the task and send back its work.
    pub repo: Option<RepoWork>,
    /// Written to a file the task finds at `$DOUGH_PROMPT_FILE`.
    pub prompt: Option<String>,
}

/// The repository part of a task, as the agent needs it.
#[derive(Serialize, Deserialize, Clone, PartialEq, Default)]
pub struct RepoWork {
    pub url: String,
    /// The branch to clone, and the commit of it the host resolved.
    pub base_branch: String,
    pub base_commit: String,
    /// The branch the task's work goes on.
    pub branch: String,
    /// Where to clone, in the guest.
    pub dir: String,
    /// HTTP basic credential (user, password) for the clone only. Kept in
    /// the agent's memory, wiped after the clone; never in the task's reach.
    pub credential: Option<(String, String)>,
    pub author_name: String,
    pub author_email: String,
    pub commit_message: String,
    /// The agent gives up on a bundle larger than this (the host enforces
    /// its own limit as well).
    pub max_bundle_bytes: u64,
}

/// Hand-written so that a credential never reaches a log line.
impl std::fmt::Debug for RepoWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoWork")
            .field("url", &self.url)
            .field("base_branch", &self.base_branch)
            .field("base_commit", &self.base_commit)
            .field("branch", &self.branch)
            .field("dir", &self.dir)
            .field(
                "credential",
                &self.credential.as_ref().map(|_| "<redacted>"),
            )
            .field("max_bundle_bytes", &self.max_bundle_bytes)
            .finish_non_exhaustive()
    }
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
