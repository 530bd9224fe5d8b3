//! The single-host store: one SQLite file (WAL mode) in the state dir.
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use super::*;

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
CREATE TABLE IF NOT EXISTS artifacts (
    task_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (task_id, kind)
);
";

/// In `tx`: task `id` exists (else NotFound) and, with `fence`, its claim
/// is still that epoch (else Fenced).
fn fenced(tx: &rusqlite::Transaction<'_>, id: &str, fence: Option<u64>) -> Result<()> {
    let epoch: i64 = tx
        .query_row("SELECT epoch FROM tasks WHERE id = ?1", [id], |r| r.get(0))
        .optional()?
        .ok_or_else(|| StoreError::NotFound(id.into()))?;
    check_fence(id, fence, epoch)
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.pragma_update(None, "foreign_keys", "ON")?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        db.execute_batch(SCHEMA)?;
        // Columns added since the first stores: before repository tasks
        // (`result`), named images, nodes, claims, cancels across nodes.
        for (column, ddl) in [
            ("result", "result TEXT"),
            ("image_digest", "image_digest TEXT"),
            ("node", "node TEXT"),
            ("epoch", "epoch INTEGER NOT NULL DEFAULT 0"),
            (
                "cancel_requested",
                "cancel_requested INTEGER NOT NULL DEFAULT 0",
            ),
        ] {
            let has: bool = db
                .prepare("SELECT 1 FROM pragma_table_info('tasks') WHERE name = ?1")?
                .exists([column])?;
            if !has {
                db.execute_batch(&format!("ALTER TABLE tasks ADD COLUMN {ddl}"))?;
            }
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
            epoch: row.get::<_, i64>("epoch")? as u64,
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
        fence: Option<u64>,
        to: State,
        reason: Option<&str>,
        detail: Option<&str>,
        exit_code: Option<i32>,
    ) -> Result<TaskRecord> {
        {
            let mut db = self.conn();
            let tx = db.transaction()?;
            let from: Option<(String, i64)> = tx
                .query_row("SELECT state, epoch FROM tasks WHERE id = ?1", [id], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?;
            let (from, epoch) = from.ok_or_else(|| StoreError::NotFound(id.into()))?;
            check_fence(id, fence, epoch)?;
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

    fn append_output(
        &self,
        id: &str,
        fence: Option<u64>,
        stream: u8,
        data: &[u8],
        cap: u64,
    ) -> Result<bool> {
        let mut db = self.conn();
        let tx = db.transaction()?;
        let (bytes, truncated, epoch): (i64, i64, i64) = tx
            .query_row(
                "SELECT output_bytes, output_truncated, epoch FROM tasks WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(id.into()))?;
        check_fence(id, fence, epoch)?;
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

    fn resources(&self, id: &str) -> Result<Vec<(String, String)>> {
        let db = self.conn();
        let mut st = db
            .prepare_cached("SELECT kind, name FROM resources WHERE task_id = ?1 ORDER BY rowid")?;
        let v = st
            .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(v)
    }

    fn clear_resources(&self, id: &str, fence: Option<u64>, cleanup: &str) -> Result<()> {
        let mut db = self.conn();
        let tx = db.transaction()?;
        fenced(&tx, id, fence)?;
        tx.execute("DELETE FROM resources WHERE task_id = ?1", [id])?;
        tx.execute(
            "UPDATE tasks SET cleanup = ?2 WHERE id = ?1",
            params![id, cleanup],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn set_result(
        &self,
        id: &str,
        fence: Option<u64>,
        result: &crate::repo::Finalized,
    ) -> Result<()> {
        let text = serde_json::to_string(result).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut db = self.conn();
        let tx = db.transaction()?;
        fenced(&tx, id, fence)?;
        tx.execute(
            "UPDATE tasks SET result = ?2 WHERE id = ?1",
            params![id, text],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn put_artifact(&self, id: &str, fence: Option<u64>, kind: Artifact, body: &str) -> Result<()> {
        let mut db = self.conn();
        let tx = db.transaction()?;
        fenced(&tx, id, fence)?;
        tx.execute(
            "INSERT OR REPLACE INTO artifacts (task_id, kind, body) VALUES (?1, ?2, ?3)",
            params![id, kind.as_str(), body],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn artifact(&self, id: &str, kind: Artifact) -> Result<Option<String>> {
        self.get(id)?;
        let db = self.conn();
        Ok(db
            .query_row(
                "SELECT body FROM artifacts WHERE task_id = ?1 AND kind = ?2",
                params![id, kind.as_str()],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn delete(&self, id: &str) -> Result<()> {
        let mut db = self.conn();
        let tx = db.transaction()?;
        let state: String = tx
            .query_row("SELECT state FROM tasks WHERE id = ?1", [id], |r| r.get(0))
            .optional()?
            .ok_or_else(|| StoreError::NotFound(id.into()))?;
        let state = State::parse(&state).ok_or_else(|| StoreError::Corrupt(state.clone()))?;
        if !state.is_terminal() {
            return Err(StoreError::InFlight {
                id: id.into(),
                state,
            });
        }
        for table in ["transitions", "output", "resources", "artifacts"] {
            tx.execute(&format!("DELETE FROM {table} WHERE task_id = ?1"), [id])?;
        }
        tx.execute("DELETE FROM tasks WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    fn set_image_digest(&self, id: &str, fence: Option<u64>, digest: &str) -> Result<()> {
        let mut db = self.conn();
        let tx = db.transaction()?;
        fenced(&tx, id, fence)?;
        tx.execute(
            "UPDATE tasks SET image_digest = ?2 WHERE id = ?1",
            params![id, digest],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn claim(
        &self,
        id: &str,
        node: &str,
        vm_id: &str,
        resources: &[(&str, &str)],
    ) -> Result<Option<TaskRecord>> {
        {
            let mut db = self.conn();
            let tx = db.transaction()?;
            // Not by a node drained or declared dead.
            let n = tx.execute(
                "UPDATE tasks SET state = 'provisioning', node = ?2, vm_id = ?3, epoch = epoch + 1
                 WHERE id = ?1 AND state = 'queued' AND NOT EXISTS (
                    SELECT 1 FROM nodes WHERE name = ?2
                    AND json_extract(record, '$.state') IN ('draining', 'dead'))",
                params![id, node, vm_id],
            )?;
            if n == 0 {
                return Ok(None);
            }
            tx.execute(
                "INSERT INTO transitions (task_id, state, at_ms) VALUES (?1, 'provisioning', ?2)",
                params![id, now_ms() as i64],
            )?;
            for (kind, name) in resources {
                tx.execute(
                    "INSERT INTO resources (task_id, kind, name) VALUES (?1, ?2, ?3)",
                    params![id, kind, name],
                )?;
            }
            tx.commit()?;
        }
        self.get(id).map(Some)
    }

    fn node_beat(&self, node: &NodeRecord) -> Result<Option<String>> {
        let mut node = node.clone();
        node.heartbeat_ms = now_ms();
        let mut db = self.conn();
        let tx = db.transaction()?;
        let old: Option<String> = tx
            .query_row(
                "SELECT record FROM nodes WHERE name = ?1",
                [&node.name],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(old) = old {
            let old: NodeRecord =
                serde_json::from_str(&old).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if old.started_ms == node.started_ms {
                if old.state == "dead" {
                    return Ok(None);
                }
                if old.state == "draining" && node.state == "up" {
                    node.state = "draining".into();
                }
            }
        }
        let rec = serde_json::to_string(&node).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        tx.execute(
            "INSERT INTO nodes (name, record) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET record = excluded.record",
            params![node.name, rec],
        )?;
        tx.commit()?;
        Ok(Some(node.state))
    }

    fn drain_node(&self, name: &str, drain: bool) -> Result<Option<NodeRecord>> {
        let mut db = self.conn();
        let tx = db.transaction()?;
        let old: Option<String> = tx
            .query_row("SELECT record FROM nodes WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(old) = old else { return Ok(None) };
        let mut n: NodeRecord =
            serde_json::from_str(&old).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let (from, to) = if drain {
            ("up", "draining")
        } else {
            ("draining", "up")
        };
        if n.state == from {
            n.state = to.into();
            tx.execute(
                "UPDATE nodes SET record = ?2 WHERE name = ?1",
                params![name, serde_json::to_string(&n).expect("serializes")],
            )?;
            tx.commit()?;
        }
        Ok(Some(n))
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

    fn request_cancel(&self, id: &str) -> Result<()> {
        let n = self
            .conn()
            .execute("UPDATE tasks SET cancel_requested = 1 WHERE id = ?1", [id])?;
        if n == 0 {
            return Err(StoreError::NotFound(id.into()));
        }
        Ok(())
    }

    fn cancel_requests(&self, node: &str) -> Result<Vec<String>> {
        let db = self.conn();
        let mut st = db.prepare_cached(
            "SELECT id FROM tasks WHERE node = ?1 AND cancel_requested != 0 AND state IN ('provisioning', 'booting', 'running', 'finalizing')",
        )?;
        let v = st
            .query_map([node], |r| r.get(0))?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(v)
    }

    fn reap_dead_nodes(&self, by: &str, timeout_ms: u64) -> Result<Vec<Reaped>> {
        let now = now_ms();
        let mut db = self.conn();
        let tx = db.transaction()?;
        let mut nodes: Vec<NodeRecord> = {
            let mut st = tx.prepare("SELECT record FROM nodes ORDER BY name")?;
            let rows = st
                .query_map([], |r| r.get::<_, String>(0))?
                .collect::<std::result::Result<Vec<_>, _>>()?;
            rows.iter()
                .map(|r| serde_json::from_str(r).map_err(|e| StoreError::Corrupt(e.to_string())))
                .collect::<Result<_>>()?
        };
        let mut out = vec![];
        for n in nodes.iter_mut().filter(|n| {
            n.name != by
                && !matches!(n.state.as_str(), "stopped" | "dead")
                && n.heartbeat_ms + timeout_ms < now
        }) {
            n.state = "dead".into();
            tx.execute(
                "UPDATE nodes SET record = ?2 WHERE name = ?1",
                params![n.name, serde_json::to_string(&n).expect("serializes")],
            )?;
            let mut r = Reaped {
                node: n.name.clone(),
                ..Reaped::default()
            };
            let tasks: Vec<(String, String)> = {
                let mut st = tx.prepare(
                    "SELECT id, state FROM tasks WHERE node = ?1 AND state IN ('provisioning', 'booting', 'running', 'finalizing') ORDER BY seq",
                )?;
                let v = st
                    .query_map([&n.name], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                v
            };
            for (id, state) in tasks {
                if state == "provisioning" {
                    tx.execute(
                        "UPDATE tasks SET state = 'queued', vm_id = NULL, node = NULL, epoch = epoch + 1 WHERE id = ?1",
                        [&id],
                    )?;
                    tx.execute(
                        "INSERT INTO transitions (task_id, state, at_ms, reason) VALUES (?1, 'queued', ?2, 'node_lost')",
                        params![id, now as i64],
                    )?;
                    r.requeued.push(id);
                } else {
                    tx.execute(
                        "UPDATE tasks SET state = 'failed', reason = 'node_lost', detail = ?2, epoch = epoch + 1 WHERE id = ?1",
                        params![id, node_lost_detail(&n.name, by, timeout_ms)],
                    )?;
                    tx.execute(
                        "INSERT INTO transitions (task_id, state, at_ms, reason) VALUES (?1, 'failed', ?2, 'node_lost')",
                        params![id, now as i64],
                    )?;
                    r.failed.push(id);
                }
            }
            out.push(r);
        }
        tx.commit()?;
        Ok(out)
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
