//! The durable record of tasks: what was asked, every state it went through,
//! its output (bounded), and every host resource its VM owns — written
//! before the resource is made, so a restarted daemon can reclaim it.
//!
//! [`Store`] is the interface (a Postgres store can follow for many hosts);
//! [`SqliteStore`] is the default, one WAL-mode file in the state dir.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
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
}

/// A `dough serve` as the store knows it: what it can hold, what it holds,
/// and when it last said so (every second while it runs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    /// `up` while it runs, `stopped` after a clean shutdown.
    pub state: String,
    pub started_ms: u64,
    pub heartbeat_ms: u64,
    pub capacity: NodeCapacity,
    #[serde(rename = "use")]
    pub usage: NodeUse,
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
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("no task {0}")]
    NotFound(String),
    #[error("task {id} cannot go from {from} to {to}")]
    BadTransition { id: String, from: State, to: State },
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// The file system under the store is full (SQLite turns ENOSPC from
    /// a write into SQLITE_FULL).
    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::Db(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::DiskFull)
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

pub trait Store: Send + Sync {
    /// Record a new queued task.
    fn insert(&self, id: &str, req: &TaskRequest) -> Result<TaskRecord>;
    fn get(&self, id: &str) -> Result<TaskRecord>;
    /// Newest first, at most `limit`, optionally only in `state`.
    fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<TaskRecord>>;
    /// The first `limit` queued tasks in run order (priority, then
    /// submission).
    fn queued(&self, limit: usize) -> Result<Vec<TaskRecord>>;
    /// Tasks neither queued nor terminal (a VM may exist for them).
    fn in_flight(&self) -> Result<Vec<TaskRecord>>;
    /// Move to `to` (checked against [`State::can_go_to`]); `reason`,
    /// `detail` and `exit_code` are kept when given.
    fn transition(
        &self,
        id: &str,
        to: State,
        reason: Option<&str>,
        detail: Option<&str>,
        exit_code: Option<i32>,
    ) -> Result<TaskRecord>;
    /// Append output, keeping at most `cap` bytes per task; past that the
    /// task is marked truncated. Returns whether the chunk was kept.
    fn append_output(&self, id: &str, stream: u8, data: &[u8], cap: u64) -> Result<bool>;
    fn logs(&self, id: &str) -> Result<Logs>;
    /// Stored output from byte `from` on, about `max` bytes of it (whole
    /// chunks; the first cut to start at `from`): (stream, the offset of
    /// its first byte, bytes), in order. Empty: nothing stored there yet.
    fn output_from(&self, id: &str, from: u64, max: usize) -> Result<Vec<(u8, u64, Vec<u8>)>>;
    /// Record a host resource of the task's VM before it is made.
    fn add_resource(&self, id: &str, kind: &str, name: &str) -> Result<()>;
    fn resources(&self, id: &str) -> Result<Vec<(String, String)>>;
    fn clear_resources(&self, id: &str, cleanup: &str) -> Result<()>;
    /// The VM the task runs in, and the node that runs it.
    fn set_vm(&self, id: &str, vm_id: &str, node: &str) -> Result<()>;
    /// Record a repository task's result (before its final transition).
    fn set_result(&self, id: &str, result: &crate::repo::Finalized) -> Result<()>;
    /// Record the digest of the image the task's VM booted.
    fn set_image_digest(&self, id: &str, digest: &str) -> Result<()>;
    /// Back to the queue (recovery of a task whose VM never booted).
    fn requeue(&self, id: &str) -> Result<()>;
    /// Task counts per state.
    fn counts(&self) -> Result<BTreeMap<State, u64>>;
    /// Record a node's state (insert or replace, by name).
    fn node_beat(&self, node: &NodeRecord) -> Result<()>;
    /// Every node on record, by name.
    fn nodes(&self) -> Result<Vec<NodeRecord>>;
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

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// SQLite in WAL mode; one connection behind a mutex (each call is short).
pub struct SqliteStore {
    db: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    reason TEXT,
    detail TEXT,
    exit_code INTEGER,
    request TEXT NOT NULL,
    priority INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    vm_id TEXT,
    output_bytes INTEGER NOT NULL DEFAULT 0,
    output_truncated INTEGER NOT NULL DEFAULT 0,
    cleanup TEXT,
    result TEXT
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state, priority, seq);
CREATE TABLE IF NOT EXISTS transitions (
    task_id TEXT NOT NULL,
    state TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS transitions_task ON transitions(task_id);
CREATE TABLE IF NOT EXISTS output (
    task_id TEXT NOT NULL,
    stream INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS output_task ON output(task_id);
CREATE TABLE IF NOT EXISTS resources (
    task_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS resources_task ON resources(task_id);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
";

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.pragma_update(None, "foreign_keys", "ON")?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        db.execute_batch(SCHEMA)?;
        // Stores made before repository tasks lack `result`.
        let has_result: bool = db
            .prepare("SELECT 1 FROM pragma_table_info('tasks') WHERE name = 'result'")?
            .exists([])?;
        if !has_result {
            db.execute_batch("ALTER TABLE tasks ADD COLUMN result TEXT")?;
        }
        // … and before named images, `image_digest`.
        let has_image: bool = db
            .prepare("SELECT 1 FROM pragma_table_info('tasks') WHERE name = 'image_digest'")?
            .exists([])?;
        if !has_image {
            db.execute_batch("ALTER TABLE tasks ADD COLUMN image_digest TEXT")?;
        }
        // … and before nodes, `node`.
        let has_node: bool = db
            .prepare("SELECT 1 FROM pragma_table_info('tasks') WHERE name = 'node'")?
            .exists([])?;
        if !has_node {
            db.execute_batch("ALTER TABLE tasks ADD COLUMN node TEXT")?;
        }
        Ok(SqliteStore { db: Mutex::new(db) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn row_to_record(db: &Connection, row: &rusqlite::Row<'_>) -> Result<TaskRecord> {
        let id: String = row.get("id")?;
        let state: String = row.get("state")?;
        let request: String = row.get("request")?;
        let mut st = db.prepare_cached(
            "SELECT state, at_ms, reason FROM transitions WHERE task_id = ?1 ORDER BY rowid",
        )?;
        let transitions = st
            .query_map([&id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<String>>(2)?,
                ))
            })?
            .map(|r| {
                let (s, at, reason) = r?;
                Ok(Transition {
                    state: State::parse(&s).ok_or_else(|| StoreError::Corrupt(s.clone()))?,
                    at_ms: at as u64,
                    reason,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TaskRecord {
            state: State::parse(&state).ok_or_else(|| StoreError::Corrupt(state.clone()))?,
            reason: row.get("reason")?,
            detail: row.get("detail")?,
            exit_code: row.get("exit_code")?,
            request: serde_json::from_str(&request)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            created_ms: row.get::<_, i64>("created_ms")? as u64,
            vm_id: row.get("vm_id")?,
            transitions,
            output_bytes: row.get::<_, i64>("output_bytes")? as u64,
            output_truncated: row.get::<_, i64>("output_truncated")? != 0,
            cleanup: row.get("cleanup")?,
            result: row
                .get::<_, Option<String>>("result")?
                .map(|r| serde_json::from_str(&r).map_err(|e| StoreError::Corrupt(e.to_string())))
                .transpose()?,
            image_digest: row.get("image_digest")?,
            node: row.get("node")?,
            id,
        })
    }

    fn query(&self, sql: &str, p: &[&dyn rusqlite::ToSql]) -> Result<Vec<TaskRecord>> {
        let db = self.conn();
        let mut st = db.prepare_cached(sql)?;
        let mut rows = st.query(p)?;
        let mut out = vec![];
        while let Some(row) = rows.next()? {
            out.push(Self::row_to_record(&db, row)?);
        }
        Ok(out)
    }
}

impl Store for SqliteStore {
    fn insert(&self, id: &str, req: &TaskRequest) -> Result<TaskRecord> {
        let now = now_ms() as i64;
        {
            let mut db = self.conn();
            let tx = db.transaction()?;
            tx.execute(
                "INSERT INTO tasks (id, state, request, priority, created_ms) VALUES (?1, 'queued', ?2, ?3, ?4)",
                params![id, serde_json::to_string(req).expect("request serializes"), req.priority, now],
            )?;
            tx.execute(
                "INSERT INTO transitions (task_id, state, at_ms) VALUES (?1, 'queued', ?2)",
                params![id, now],
            )?;
            tx.commit()?;
        }
        self.get(id)
    }

    fn get(&self, id: &str) -> Result<TaskRecord> {
        self.query("SELECT * FROM tasks WHERE id = ?1", &[&id])?
            .pop()
            .ok_or_else(|| StoreError::NotFound(id.into()))
    }

    fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<TaskRecord>> {
        let limit = limit as i64;
        match state {
            Some(s) => self.query(
                "SELECT * FROM tasks WHERE state = ?1 ORDER BY seq DESC LIMIT ?2",
                &[&s.as_str(), &limit],
            ),
            None => self.query("SELECT * FROM tasks ORDER BY seq DESC LIMIT ?1", &[&limit]),
        }
    }

    fn queued(&self, limit: usize) -> Result<Vec<TaskRecord>> {
        self.query(
            "SELECT * FROM tasks WHERE state = 'queued' ORDER BY priority DESC, seq ASC LIMIT ?1",
            &[&(limit as i64)],
        )
    }

    fn in_flight(&self) -> Result<Vec<TaskRecord>> {
        self.query(
            "SELECT * FROM tasks WHERE state IN ('provisioning', 'booting', 'running', 'finalizing') ORDER BY seq",
            &[],
        )
    }

    fn transition(
        &self,
        id: &str,
        to: State,
        reason: Option<&str>,
        detail: Option<&str>,
        exit_code: Option<i32>,
    ) -> Result<TaskRecord> {
        {
            let mut db = self.conn();
            let tx = db.transaction()?;
            let from: Option<String> = tx
                .query_row("SELECT state FROM tasks WHERE id = ?1", [id], |r| r.get(0))
                .optional()?;
            let from = from.ok_or_else(|| StoreError::NotFound(id.into()))?;
            let from = State::parse(&from).ok_or(StoreError::Corrupt(from))?;
            if !from.can_go_to(to) {
                return Err(StoreError::BadTransition {
                    id: id.into(),
                    from,
                    to,
                });
            }
            tx.execute(
                "UPDATE tasks SET state = ?2, reason = COALESCE(?3, reason), detail = COALESCE(?4, detail), exit_code = COALESCE(?5, exit_code) WHERE id = ?1",
                params![id, to.as_str(), reason, detail, exit_code],
            )?;
            tx.execute(
                "INSERT INTO transitions (task_id, state, at_ms, reason) VALUES (?1, ?2, ?3, ?4)",
                params![id, to.as_str(), now_ms() as i64, reason],
            )?;
            tx.commit()?;
        }
        self.get(id)
    }

    fn append_output(&self, id: &str, stream: u8, data: &[u8], cap: u64) -> Result<bool> {
        let mut db = self.conn();
        let tx = db.transaction()?;
        let (bytes, truncated): (i64, i64) = tx.query_row(
            "SELECT output_bytes, output_truncated FROM tasks WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if truncated != 0 {
            return Ok(false);
        }
        let room = cap.saturating_sub(bytes as u64) as usize;
        let keep = &data[..data.len().min(room)];
        if !keep.is_empty() {
            tx.execute(
                "INSERT INTO output (task_id, stream, data) VALUES (?1, ?2, ?3)",
                params![id, stream, keep],
            )?;
        }
        let cut = keep.len() < data.len();
        tx.execute(
            "UPDATE tasks SET output_bytes = output_bytes + ?2, output_truncated = ?3 WHERE id = ?1",
            params![id, keep.len() as i64, cut as i64],
        )?;
        tx.commit()?;
        Ok(!cut)
    }

    fn logs(&self, id: &str) -> Result<Logs> {
        let t = self.get(id)?;
        let db = self.conn();
        let mut st =
            db.prepare_cached("SELECT stream, data FROM output WHERE task_id = ?1 ORDER BY rowid")?;
        let chunks = st
            .query_map([id], |r| Ok((r.get::<_, u8>(0)?, r.get::<_, Vec<u8>>(1)?)))?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Logs {
            chunks,
            truncated: t.output_truncated,
        })
    }

    fn output_from(&self, id: &str, from: u64, max: usize) -> Result<Vec<(u8, u64, Vec<u8>)>> {
        self.get(id)?;
        let db = self.conn();
        // Lengths first (no data read), to find the chunks that hold the
        // range; then only those chunks' bytes.
        let mut st = db.prepare_cached(
            "SELECT rowid, stream, length(data) FROM output WHERE task_id = ?1 ORDER BY rowid",
        )?;
        let rows = st
            .query_map([id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, u8>(1)?,
                    r.get::<_, i64>(2)? as u64,
                ))
            })?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut want = vec![];
        let (mut at, mut taken) = (0u64, 0usize);
        for (rowid, stream, len) in rows {
            let end = at + len;
            if end > from && taken < max {
                want.push((rowid, stream, at));
                taken += (end - at.max(from)) as usize;
            }
            at = end;
        }
        let mut get = db.prepare_cached("SELECT data FROM output WHERE rowid = ?1")?;
        let mut out = vec![];
        for (rowid, stream, at) in want {
            let data: Vec<u8> = get.query_row([rowid], |r| r.get(0))?;
            let skip = from.saturating_sub(at) as usize;
            out.push((
                stream,
                at + skip as u64,
                data[skip.min(data.len())..].to_vec(),
            ));
        }
        Ok(out)
    }

    fn add_resource(&self, id: &str, kind: &str, name: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO resources (task_id, kind, name) VALUES (?1, ?2, ?3)",
            params![id, kind, name],
        )?;
        Ok(())
    }

    fn resources(&self, id: &str) -> Result<Vec<(String, String)>> {
        let db = self.conn();
        let mut st = db
            .prepare_cached("SELECT kind, name FROM resources WHERE task_id = ?1 ORDER BY rowid")?;
        let v = st
            .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(v)
    }

    fn clear_resources(&self, id: &str, cleanup: &str) -> Result<()> {
        let mut db = self.conn();
        let tx = db.transaction()?;
        tx.execute("DELETE FROM resources WHERE task_id = ?1", [id])?;
        tx.execute(
            "UPDATE tasks SET cleanup = ?2 WHERE id = ?1",
            params![id, cleanup],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn set_result(&self, id: &str, result: &crate::repo::Finalized) -> Result<()> {
        let text = serde_json::to_string(result).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let n = self.conn().execute(
            "UPDATE tasks SET result = ?2 WHERE id = ?1",
            params![id, text],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(id.into()));
        }
        Ok(())
    }

    fn set_image_digest(&self, id: &str, digest: &str) -> Result<()> {
        let n = self.conn().execute(
            "UPDATE tasks SET image_digest = ?2 WHERE id = ?1",
            params![id, digest],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(id.into()));
        }
        Ok(())
    }

    fn set_vm(&self, id: &str, vm_id: &str, node: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE tasks SET vm_id = ?2, node = ?3 WHERE id = ?1",
            params![id, vm_id, node],
        )?;
        Ok(())
    }

    fn node_beat(&self, node: &NodeRecord) -> Result<()> {
        let rec = serde_json::to_string(node).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.conn().execute(
            "INSERT INTO nodes (name, record) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET record = excluded.record",
            params![node.name, rec],
        )?;
        Ok(())
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>> {
        let db = self.conn();
        let mut st = db.prepare_cached("SELECT record FROM nodes ORDER BY name")?;
        let rows = st
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        rows.iter()
            .map(|r| serde_json::from_str(r).map_err(|e| StoreError::Corrupt(e.to_string())))
            .collect()
    }

    fn requeue(&self, id: &str) -> Result<()> {
        let mut db = self.conn();
        let tx = db.transaction()?;
        tx.execute(
            "UPDATE tasks SET state = 'queued', vm_id = NULL WHERE id = ?1",
            [id],
        )?;
        tx.execute(
            "INSERT INTO transitions (task_id, state, at_ms, reason) VALUES (?1, 'queued', ?2, 'orchestrator_restart')",
            params![id, now_ms() as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn counts(&self) -> Result<BTreeMap<State, u64>> {
        let db = self.conn();
        let mut st = db.prepare_cached("SELECT state, COUNT(*) FROM tasks GROUP BY state")?;
        let mut m: BTreeMap<State, u64> = State::ALL.iter().map(|s| (*s, 0)).collect();
        for r in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
            let (s, n) = r?;
            if let Some(s) = State::parse(&s) {
                m.insert(s, n as u64);
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> TaskRequest {
        serde_json::from_str(r#"{"command": ["true"]}"#).unwrap()
    }

    #[test]
    fn a_task_walks_its_states_and_survives_reopening() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dough.db");
        {
            let s = SqliteStore::open(&p).unwrap();
            let t = s.insert("t1", &req()).unwrap();
            assert_eq!(t.state, State::Queued);
            assert_eq!((t.request.vcpus, t.request.memory_mib), (1, 512));
            s.transition("t1", State::Provisioning, None, None, None)
                .unwrap();
            s.add_resource("t1", "vm", "abc").unwrap();
            s.transition("t1", State::Booting, None, None, None)
                .unwrap();
            // Illegal moves are refused and change nothing.
            assert!(matches!(
                s.transition("t1", State::Queued, None, None, None),
                Err(StoreError::BadTransition { .. })
            ));
            assert!(matches!(
                s.transition("nope", State::Failed, None, None, None),
                Err(StoreError::NotFound(_))
            ));
        }
        let s = SqliteStore::open(&p).unwrap();
        let t = s.get("t1").unwrap();
        assert_eq!(t.state, State::Booting);
        assert_eq!(
            t.transitions.iter().map(|x| x.state).collect::<Vec<_>>(),
            [State::Queued, State::Provisioning, State::Booting]
        );
        assert_eq!(s.in_flight().unwrap().len(), 1);
        assert_eq!(
            s.resources("t1").unwrap(),
            [("vm".to_string(), "abc".to_string())]
        );
        let t = s
            .transition(
                "t1",
                State::Failed,
                Some("orchestrator_restart"),
                None,
                None,
            )
            .unwrap();
        assert!(t.state.is_terminal());
        assert!(s
            .transition("t1", State::Succeeded, None, None, None)
            .is_err());
        assert_eq!(t.reason.as_deref(), Some("orchestrator_restart"));
    }

    #[test]
    fn output_from_returns_the_range_with_streams_and_offsets() {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&d.path().join("db")).unwrap();
        s.insert("t", &req()).unwrap();
        s.append_output("t", 1, b"hello ", 100).unwrap();
        s.append_output("t", 2, b"err ", 100).unwrap();
        s.append_output("t", 1, b"world", 100).unwrap();
        let all = s.output_from("t", 0, 1 << 20).unwrap();
        assert_eq!(
            all,
            [
                (1, 0, b"hello ".to_vec()),
                (2, 6, b"err ".to_vec()),
                (1, 10, b"world".to_vec())
            ]
        );
        // From inside a chunk, and a limit that stops after the chunk
        // that reaches it.
        assert_eq!(s.output_from("t", 8, 2).unwrap(), [(2, 8, b"r ".to_vec())]);
        assert_eq!(
            s.output_from("t", 3, 4).unwrap(),
            [(1, 3, b"lo ".to_vec()), (2, 6, b"err ".to_vec())]
        );
        assert!(s.output_from("t", 15, 10).unwrap().is_empty());
        assert!(s.output_from("nope", 0, 10).is_err());
    }

    #[test]
    fn output_is_bounded_and_truncation_marked() {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&d.path().join("db")).unwrap();
        s.insert("t", &req()).unwrap();
        assert!(s.append_output("t", 1, b"hello ", 10).unwrap());
        assert!(!s.append_output("t", 2, b"world!", 10).unwrap());
        assert!(!s.append_output("t", 1, b"more", 10).unwrap());
        let l = s.logs("t").unwrap();
        assert!(l.truncated);
        let all: Vec<u8> = l.chunks.iter().flat_map(|(_, d)| d.clone()).collect();
        assert_eq!(all, b"hello worl");
        assert_eq!(l.chunks[1].0, 2);
    }

    #[test]
    fn queue_order_is_priority_then_submission() {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&d.path().join("db")).unwrap();
        let mut hi = req();
        hi.priority = 5;
        s.insert("a", &req()).unwrap();
        s.insert("b", &hi).unwrap();
        s.insert("c", &req()).unwrap();
        let q: Vec<String> = s.queued(100).unwrap().into_iter().map(|t| t.id).collect();
        assert_eq!(q, ["b", "a", "c"]);
        assert_eq!(s.counts().unwrap()[&State::Queued], 3);
    }
}
