//! The durable record of tasks: what was asked, every state it went through,
//! its output (bounded), and every host resource its VM owns — written
//! before the resource is made, so a restarted daemon can reclaim it.
//!
//! [`Store`] is the interface. [`SqliteStore`] (`sqlite.rs`) is the
//! single-host default, one WAL-mode file in the state dir; [`PgStore`]
//! (`pg.rs`) is PostgreSQL, shared by the nodes of a cluster
//! (`dough serve --store postgres://…`).
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where a task is in its life. Terminal: succeeded, failed, cancelled,
/// timed_out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Queued,
    Provisioning,
    Booting,
    Running,
    Finalizing,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl State {
    pub const ALL: [State; 9] = [
        State::Queued,
        State::Provisioning,
        State::Booting,
        State::Running,
        State::Finalizing,
        State::Succeeded,
        State::Failed,
        State::Cancelled,
        State::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Provisioning => "provisioning",
            State::Booting => "booting",
            State::Running => "running",
            State::Finalizing => "finalizing",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
            State::TimedOut => "timed_out",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            State::Succeeded | State::Failed | State::Cancelled | State::TimedOut
        )
    }

    /// Legal transitions (a terminal state is final).
    pub fn can_go_to(self, to: State) -> bool {
        use State::*;
        if self.is_terminal() {
            return false;
        }
        match to {
            Queued => false,
            Provisioning => self == Queued,
            Booting => self == Provisioning,
            Running => self == Booting,
            Finalizing => matches!(self, Provisioning | Booting | Running),
            Succeeded => matches!(self, Running | Finalizing),
            Failed | Cancelled | TimedOut => true,
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a client asked for (`POST /v1/tasks`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    /// Required unless `agent` gives one.
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "one")]
    pub vcpus: u32,
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Higher runs first; equal priorities run in submission order.
    #[serde(default)]
    pub priority: i32,
    /// Run as root in the guest.
    #[serde(default)]
    pub root: bool,
    #[serde(default)]
    pub workdir: Option<String>,
    /// `open` (default), `none`, or `allowlist` with `allow_hosts`/`allow_cidrs`.
    #[serde(default)]
    pub egress: Option<String>,
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    #[serde(default)]
    pub allow_cidrs: Vec<String>,
    /// Clone this repository first; the work comes back as a branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<crate::repo::RepoRequest>,
    /// How to open the pull request (with `repo`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request: Option<crate::repo::PullRequestRequest>,
    /// Given to the task as the file `$DOUGH_PROMPT_FILE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Names of the daemon's environment variables passed to the task
    /// (values are never stored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_env: Vec<String>,
    /// The image to boot (`dough image ls`); absent: `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// An agent preset (`dough agents`): fills in the image, command,
    /// secrets, allowlist and resources the request leaves out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// With `agent`: the model API's address (the allowlist follows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_url: Option<String>,
}

fn one() -> u32 {
    1
}
/// `memory_mib` when a request does not say.
pub const DEFAULT_MEMORY_MIB: u32 = 512;

fn default_memory() -> u32 {
    DEFAULT_MEMORY_MIB
}

/// One state change, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub state: State,
    pub at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A task as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    pub state: State,
    /// Why it ended as it did (`exit_code`, `boot_timeout`, …).
    pub reason: Option<String>,
    /// A human-readable detail of the reason.
    pub detail: Option<String>,
    pub exit_code: Option<i32>,
    pub request: TaskRequest,
    pub created_ms: u64,
    pub vm_id: Option<String>,
    pub transitions: Vec<Transition>,
    pub output_bytes: u64,
    pub output_truncated: bool,
    /// Outcome of the VM's teardown ("ok" or the problems met).
    pub cleanup: Option<String>,
    /// A repository task's result: branch, commits, pull request.
    pub result: Option<crate::repo::Finalized>,
    /// The digest of the image the task's VM booted.
    pub image_digest: Option<String>,
    /// The node (`dough serve --node-name`) that took the task.
    pub node: Option<String>,
    /// How many times the task has been claimed ([`Store::claim`]): the
    /// fencing token of its current claim.
    #[serde(default)]
    pub epoch: u64,
}

/// A `dough serve` as the store knows it: what it can hold, what it holds,
/// and when it last said so (every second while it runs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    /// `up` while it runs, `draining` when asked to finish its tasks and
    /// take no new ones, `stopped` after a clean shutdown, `dead` once a
    /// peer found it silent for `--node-timeout`.
    pub state: String,
    pub started_ms: u64,
    pub heartbeat_ms: u64,
    pub capacity: NodeCapacity,
    #[serde(rename = "use")]
    pub usage: NodeUse,
}

/// A node declared dead, and what became of its tasks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reaped {
    pub node: String,
    pub failed: Vec<String>,
    pub requeued: Vec<String>,
}

/// The `detail` of a task failed with `node_lost`.
pub fn node_lost_detail(node: &str, by: &str, timeout_ms: u64) -> String {
    format!(
        "node {node} was silent for more than {} s; {by} declared it dead (the node stops the task's VM itself and writes nothing more)",
        timeout_ms.div_ceil(1000)
    )
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeCapacity {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub vms: u32,
    /// Warm pools, as `[IMAGE:]VCPUSxMIB=SIZE`.
    pub pools: Vec<String>,
    /// Images it can boot.
    pub images: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeUse {
    pub vms: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Warm-pool shapes (`[IMAGE:]VCPUSxMIB`) with an idle VM now: a task
    /// of that shape is left to this node for a moment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub idle: Vec<String>,
}

#[doc(hidden)]
pub mod checks;
mod pg;
mod sqlite;
pub use pg::{PgStore, SCHEMA_VERSION as PG_SCHEMA_VERSION};
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("store (postgres): {}", chain(.0))]
    Pg(#[from] postgres::Error),
    /// No connection to the database could be had in time.
    #[error("store (postgres): {0}")]
    Pool(#[from] r2d2::Error),
    /// The database's schema is one this build cannot use.
    #[error("{0}")]
    Schema(String),
    #[error("no task {0}")]
    NotFound(String),
    #[error("task {id} cannot go from {from} to {to}")]
    BadTransition { id: String, from: State, to: State },
    /// The task's claim has moved on (its node was declared dead): the
    /// writer no longer owns it.
    #[error("task {id} is no longer this node's (claim {epoch} was taken over)")]
    Fenced { id: String, epoch: u64 },
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("task {id} is {state}: only a finished task can be deleted (cancel it first)")]
    InFlight { id: String, state: State },
}

/// Documents kept per task besides its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Artifact {
    /// The egress record (`dough_net::EgressRecord`, JSON).
    Egress,
    /// The signed provenance statement (a DSSE envelope, JSON).
    Provenance,
}

impl Artifact {
    pub fn as_str(self) -> &'static str {
        match self {
            Artifact::Egress => "egress",
            Artifact::Provenance => "provenance",
        }
    }
}

/// An error and its causes, `: `-joined (the driver's own message is
/// often only the outermost, "error performing TLS handshake").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cause = c.source();
    }
    s
}

impl StoreError {
    /// The file system under the store is full (SQLite turns ENOSPC from
    /// a write into SQLITE_FULL).
    pub fn is_full(&self) -> bool {
        match self {
            StoreError::Db(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::DiskFull
            }
            StoreError::Pg(e) => e.code() == Some(&postgres::error::SqlState::DISK_FULL),
            _ => false,
        }
    }

    /// The database could not be written or reached now; the same call
    /// may succeed later (not a refusal, such as a bad transition).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Db(_) | StoreError::Pg(_) | StoreError::Pool(_)
        )
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Output of a task, as stored.
#[derive(Debug, Clone, Default)]
pub struct Logs {
    /// (stream: 1 stdout, 2 stderr; bytes), in order.
    pub chunks: Vec<(u8, Vec<u8>)>,
    pub truncated: bool,
}

/// One task a node asks for in [`Store::claim_many`]: to run in VM
/// `vm_id`, which will own the host `resources` (kind, name).
#[derive(Clone, Debug)]
pub struct Claim {
    pub id: String,
    pub vm_id: String,
    pub resources: Vec<(String, String)>,
}

/// What a shared store tells its nodes ([`Store::listen`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// A task was queued (submitted, or re-queued from a dead node).
    Queued,
    /// A cancel was asked for a task that node `0` runs.
    Cancel(String),
    /// Node `0` was drained or taken back by another: its state is now
    /// `1` (`draining`, `up`).
    Node(String, String),
}

pub trait Store: Send + Sync {
    /// Record a new queued task.
    fn insert(&self, id: &str, req: &TaskRequest) -> Result<TaskRecord>;
    fn get(&self, id: &str) -> Result<TaskRecord>;
    /// Newest first, at most `limit`, optionally only in `state`.
    fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<TaskRecord>>;
    /// The first `limit` queued tasks in run order (priority, then
    /// submission). Their `transitions` may hold only the first (the
    /// PostgreSQL store does not read them on this hot path; a claim's
    /// answer has the whole history).
    fn queued(&self, limit: usize) -> Result<Vec<TaskRecord>>;
    /// Tasks neither queued nor terminal (a VM may exist for them).
    fn in_flight(&self) -> Result<Vec<TaskRecord>>;
    /// Move to `to` (checked against [`State::can_go_to`]); `reason`,
    /// `detail` and `exit_code` are kept when given. With `fence`, only
    /// while the task's claim is still that epoch (else [`StoreError::Fenced`]).
    fn transition(
        &self,
        id: &str,
        fence: Option<u64>,
        to: State,
        reason: Option<&str>,
        detail: Option<&str>,
        exit_code: Option<i32>,
    ) -> Result<TaskRecord>;
    /// Append output, keeping at most `cap` bytes per task; past that the
    /// task is marked truncated. Returns whether the chunk was kept.
    /// With `fence`, only while the claim is still that epoch.
    fn append_output(
        &self,
        id: &str,
        fence: Option<u64>,
        stream: u8,
        data: &[u8],
        cap: u64,
    ) -> Result<bool>;
    fn logs(&self, id: &str) -> Result<Logs>;
    /// Stored output from byte `from` on, about `max` bytes of it (whole
    /// chunks; the first cut to start at `from`): (stream, the offset of
    /// its first byte, bytes), in order. Empty: nothing stored there yet.
    fn output_from(&self, id: &str, from: u64, max: usize) -> Result<Vec<(u8, u64, Vec<u8>)>>;
    fn resources(&self, id: &str) -> Result<Vec<(String, String)>>;
    /// The task's resources are gone (`cleanup`: how that went). With
    /// `fence`, only while the claim is still that epoch.
    fn clear_resources(&self, id: &str, fence: Option<u64>, cleanup: &str) -> Result<()>;
    /// Take queued task `id` for `node` to run in VM `vm_id`: queued →
    /// provisioning and the epoch one up, with the host `resources`
    /// (kind, name) its VM will own on record, in one step only one node
    /// can win. `None`: the task is no longer queued (another node took
    /// it, or it was cancelled), or `node` is drained or dead.
    fn claim(
        &self,
        id: &str,
        node: &str,
        vm_id: &str,
        resources: &[(&str, &str)],
    ) -> Result<Option<TaskRecord>>;
    /// [`Store::claim`] of each of `claims` for `node`, in their order:
    /// the tasks won (a task another node holds or took, or no longer
    /// queued, is passed over). PostgreSQL takes them all in one
    /// statement; the default claims them one by one.
    fn claim_many(&self, node: &str, claims: &[Claim]) -> Result<Vec<TaskRecord>> {
        let mut won = vec![];
        for c in claims {
            let res: Vec<(&str, &str)> = c
                .resources
                .iter()
                .map(|(k, n)| (k.as_str(), n.as_str()))
                .collect();
            if let Some(t) = self.claim(&c.id, node, &c.vm_id, &res)? {
                won.push(t);
            }
        }
        Ok(won)
    }
    /// Claim from the head of the queue for `node`: the first `look`
    /// queued tasks (in run order) that no other node is claiming at this
    /// moment go to `pick`, which answers the claims it makes of them, in
    /// order; those still queued are claimed ([`Store::claim_many`]), in
    /// one step on PostgreSQL (the rows looked at stay locked until the
    /// claim is done, so nodes looking at once see different tasks).
    fn claim_next(
        &self,
        node: &str,
        look: usize,
        pick: &mut (dyn FnMut(&[TaskRecord]) -> Vec<Claim> + Send),
    ) -> Result<Vec<TaskRecord>> {
        let queue = self.queued(look)?;
        let claims = pick(&queue);
        self.claim_many(node, &claims)
    }
    /// Tell `on` what happens in the store as it happens ([`Notice`]),
    /// from a thread of the store's own, until `on` answers `false`
    /// (`on(None)`, about every second, only asks that). Notices can be
    /// missed while the line to the store is down: callers poll as well,
    /// less often. A store no other process writes (SQLite) tells nothing.
    fn listen(&self, on: Box<dyn FnMut(Option<Notice>) -> bool + Send>) -> Result<()> {
        drop(on);
        Ok(())
    }
    /// Record a repository task's result (before its final transition).
    /// With `fence`, only while the claim is still that epoch.
    fn set_result(
        &self,
        id: &str,
        fence: Option<u64>,
        result: &crate::repo::Finalized,
    ) -> Result<()>;
    /// Record the digest of the image the task's VM booted.
    /// With `fence`, only while the claim is still that epoch.
    fn set_image_digest(&self, id: &str, fence: Option<u64>, digest: &str) -> Result<()>;
    /// Keep a document of the task's ([`Artifact`]), replacing one of the
    /// same kind. With `fence`, only while the claim is still that epoch.
    fn put_artifact(&self, id: &str, fence: Option<u64>, kind: Artifact, body: &str) -> Result<()>;
    /// A document of the task's; None when it has none of that kind.
    fn artifact(&self, id: &str, kind: Artifact) -> Result<Option<String>>;
    /// Remove a finished task with everything kept for it (transitions,
    /// output, result, artifacts). A task not finished is refused
    /// ([`StoreError::InFlight`]).
    fn delete(&self, id: &str) -> Result<()>;
    /// Back to the queue (recovery of a task whose VM never booted).
    fn requeue(&self, id: &str) -> Result<()>;
    /// Task counts per state.
    fn counts(&self) -> Result<BTreeMap<State, u64>>;
    /// Record a node's state and its heartbeat (the store's clock: now),
    /// insert or replace by name, and answer the state on record: `up`
    /// stays `draining` while this incarnation is being drained. `None`,
    /// and nothing written: this incarnation of the node (its
    /// `started_ms`) was declared dead.
    fn node_beat(&self, node: &NodeRecord) -> Result<Option<String>>;
    /// Drain node `name` (`up` → `draining`: it finishes its tasks and
    /// takes no new ones), or with `drain` false take it back (`draining`
    /// → `up`). The node as it is then; `None`: no such node.
    fn drain_node(&self, name: &str, drain: bool) -> Result<Option<NodeRecord>>;
    /// Whether other daemons (the nodes of a cluster) share this store:
    /// then a task's events come from the store, not from this process.
    fn is_shared(&self) -> bool {
        false
    }
    /// Hold node name `name` while this store is open. `false`: a live
    /// process holds it (a second daemon under the same name would take
    /// the first one's tasks for its own). SQLite: always held (its state
    /// directory is locked by the daemon already).
    fn hold_node_name(&self, name: &str) -> Result<bool> {
        let _ = name;
        Ok(true)
    }
    /// Every node on record, by name.
    fn nodes(&self) -> Result<Vec<NodeRecord>>;
    /// Ask the node that runs task `id` to cancel it (a cancel received
    /// by another node of the cluster).
    fn request_cancel(&self, id: &str) -> Result<()>;
    /// Tasks in flight on `node` whose cancel was asked for.
    fn cancel_requests(&self, node: &str) -> Result<Vec<String>>;
    /// Declare dead each node other than `by` that is not stopped or dead
    /// and has not beaten for `timeout_ms`: the tasks it had booted fail
    /// (`node_lost`), the ones it had only claimed go back to the queue,
    /// each under a new epoch, so the dead node can write none of them.
    fn reap_dead_nodes(&self, by: &str, timeout_ms: u64) -> Result<Vec<Reaped>>;
}

impl PartialOrd for State {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for State {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (*self as u8).cmp(&(*other as u8))
    }
}

/// `Fenced` unless `fence` (when given) is the task's current `epoch`.
fn check_fence(id: &str, fence: Option<u64>, epoch: i64) -> Result<()> {
    match fence {
        Some(f) if f != epoch as u64 => Err(StoreError::Fenced {
            id: id.into(),
            epoch: f,
        }),
        _ => Ok(()),
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every store check, on SQLite (PostgreSQL runs the same checks in
    /// `crates/dough/tests/store_pg.rs`, against a real server).
    #[test]
    fn sqlite_passes_the_store_checks() {
        let d = tempfile::tempdir().unwrap();
        checks::all(&|name: &str| -> Box<dyn Store> {
            Box::new(SqliteStore::open(&d.path().join(name)).unwrap())
        });
    }
}
