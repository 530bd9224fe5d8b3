//! PostgreSQL: the store the nodes of a cluster share
//! (`dough serve --store postgres://…`).
//!
//! The schema is versioned (`dough_schema`) and migrated on open, under an
//! advisory lock so nodes starting together migrate once; a database whose
//! schema is newer than this build knows is refused.
//!
//! Connections come from an r2d2 pool. The `postgres` client drives its
//! socket on a runtime of its own, which cannot run on a thread that is
//! already driving the daemon's runtime; so each call runs on a short
//! scoped thread (tens of µs, small next to a round trip to the database)
//! and the caller waits for it, as it waits for SQLite's disk.
use std::time::Duration;

use postgres::{Client, GenericClient, NoTls};
use r2d2_postgres::PostgresConnectionManager;

use super::*;

/// `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[V1, V2, V3];

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// The database's clock, in ms since the epoch.
const DB_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

const V1: &str = "
CREATE TABLE tasks (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    reason TEXT,
    detail TEXT,
    exit_code INTEGER,
    request TEXT NOT NULL,
    priority INTEGER NOT NULL,
    created_ms BIGINT NOT NULL,
    vm_id TEXT,
    output_bytes BIGINT NOT NULL DEFAULT 0,
    output_truncated BOOLEAN NOT NULL DEFAULT false,
    cleanup TEXT,
    result TEXT,
    image_digest TEXT,
    node TEXT,
    epoch BIGINT NOT NULL DEFAULT 0,
    cancel_requested BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX tasks_node ON tasks (node) WHERE state IN ('provisioning', 'booting', 'running', 'finalizing');
CREATE INDEX tasks_queue ON tasks (priority DESC, seq) WHERE state = 'queued';
CREATE INDEX tasks_state ON tasks (state);
CREATE TABLE transitions (
    seq BIGSERIAL PRIMARY KEY,
    task_id TEXT NOT NULL,
    state TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    reason TEXT
);
CREATE INDEX transitions_task ON transitions (task_id, seq);
CREATE TABLE output (
    task_id TEXT NOT NULL,
    off BIGINT NOT NULL,
    stream SMALLINT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (task_id, off)
);
CREATE TABLE resources (
    seq BIGSERIAL PRIMARY KEY,
    task_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL
);
CREATE INDEX resources_task ON resources (task_id, seq);
CREATE TABLE nodes (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    started_ms BIGINT NOT NULL,
    -- The database's clock: nodes' clocks may disagree.
    heartbeat_ms BIGINT NOT NULL,
    record TEXT NOT NULL
);
";

/// Nodes are told, not left to poll: a cancel asked for a task in flight
/// notifies `dough_cancel` with the owner's name (at commit). Queued tasks
/// are told by [`Notifier`], outside the transactions that queue them.
const V2: &str = "
CREATE FUNCTION dough_notify_cancel() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('dough_cancel', NEW.node);
    RETURN NULL;
END $$;
CREATE TRIGGER tasks_cancel AFTER UPDATE OF cancel_requested ON tasks
    FOR EACH ROW WHEN (NEW.cancel_requested AND NEW.node IS NOT NULL)
    EXECUTE FUNCTION dough_notify_cancel();
";

/// Documents kept per task: the egress record, the provenance statement.
const V3: &str = "
CREATE TABLE artifacts (
    task_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (task_id, kind)
);
";

/// How often, at most, a node tells the others that tasks were queued.
const NOTIFY_EVERY: Duration = Duration::from_millis(20);

/// What [`Notifier`] has to tell.
#[derive(Default)]
struct Pending {
    /// Something was queued since the last `NOTIFY dough_queue`.
    queued: bool,
    /// `dough_node` payloads ("name state").
    nodes: Vec<String>,
    closed: bool,
}

/// Tells the nodes what changed (`NOTIFY dough_queue`, at most once per
/// [`NOTIFY_EVERY`]; `dough_node`), from a thread and a connection of its
/// own, not from the transactions that make the changes: a NOTIFY takes a
/// database-wide lock at commit and holds it through the commit's disk
/// flush, so every submission would wait on the others' flushes in turn
/// (measured: submits fell from about 390/s to 87–250/s with a trigger on
/// each insert). Its own session commits without waiting for the flush
/// (`synchronous_commit = off`): a notice lost in a database crash is
/// made up for by the nodes' polling.
struct Notifier {
    pending: std::sync::Mutex<Pending>,
    cv: std::sync::Condvar,
}

impl Notifier {
    fn start(config: postgres::Config, tls: Tls) -> Result<std::sync::Arc<Notifier>> {
        let n = std::sync::Arc::new(Notifier {
            pending: std::sync::Mutex::new(Pending::default()),
            cv: std::sync::Condvar::new(),
        });
        let me = n.clone();
        std::thread::Builder::new()
            .name("dough-notify".into())
            .spawn(move || {
                let mut conn: Option<Client> = None;
                loop {
                    let (queued, nodes) = {
                        let mut p = me.pending.lock().unwrap();
                        while !p.queued && p.nodes.is_empty() && !p.closed {
                            p = me.cv.wait(p).unwrap();
                        }
                        if p.closed {
                            return;
                        }
                        (std::mem::take(&mut p.queued), std::mem::take(&mut p.nodes))
                    };
                    let told = (|| -> Result<()> {
                        if conn.is_none() {
                            let mut c = tls.connect(&config)?;
                            c.batch_execute("SET synchronous_commit TO off")?;
                            conn = Some(c);
                        }
                        let c = conn.as_mut().expect("connected");
                        let mut tx = c.transaction()?;
                        if queued {
                            tx.batch_execute("NOTIFY dough_queue")?;
                        }
                        for n in &nodes {
                            tx.execute("SELECT pg_notify('dough_node', $1)", &[n])?;
                        }
                        tx.commit()?;
                        Ok(())
                    })();
                    if let Err(e) = told {
                        // Told later (nodes also look every second).
                        tracing::debug!(error = %e, "notify the nodes");
                        conn = None;
                        let mut p = me.pending.lock().unwrap();
                        p.queued |= queued;
                        p.nodes.extend(nodes);
                        drop(p);
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    std::thread::sleep(NOTIFY_EVERY);
                }
            })
            .map_err(|e| StoreError::Corrupt(format!("start the store's notifier: {e}")))?;
        Ok(n)
    }

    /// Tasks were queued: tell the nodes soon.
    fn queued(&self) {
        self.pending.lock().unwrap().queued = true;
        self.cv.notify_one();
    }

    /// Node `name` is now in `state`: tell it.
    fn node(&self, name: &str, state: &str) {
        self.pending
            .lock()
            .unwrap()
            .nodes
            .push(format!("{name} {state}"));
        self.cv.notify_one();
    }

    fn close(&self) {
        self.pending.lock().unwrap().closed = true;
        self.cv.notify_one();
    }
}

/// How connections are made: plain, or TLS verified by rustls
/// (`sslmode=require`).
#[derive(Clone)]
enum Tls {
    Plain,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

enum Pool {
    Plain(r2d2::Pool<PostgresConnectionManager<NoTls>>),
    Rustls(r2d2::Pool<PostgresConnectionManager<tokio_postgres_rustls::MakeRustlsConnect>>),
}

impl Tls {
    /// TLS when the address asks for it (`sslmode=require`): the server's
    /// certificate is verified against the certificates of `ca` (a PEM
    /// file) when given, else the system's roots
    /// (`/etc/ssl/certs/ca-certificates.crt`).
    fn of(config: &postgres::Config, ca: Option<&std::path::Path>) -> Result<Tls> {
        if config.get_ssl_mode() != postgres::config::SslMode::Require {
            return Ok(Tls::Plain);
        }
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let file = ca.unwrap_or(std::path::Path::new("/etc/ssl/certs/ca-certificates.crt"));
        let bad = |e: String| {
            StoreError::Schema(format!(
                "the store's CA certificates ({}): {e}",
                file.display()
            ))
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(file).map_err(|e| bad(e.to_string()))? {
            roots
                .add(c.map_err(|e| bad(e.to_string()))?)
                .map_err(|e| bad(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(bad("no certificate in it".into()));
        }
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Tls::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(
            tls,
        )))
    }

    fn connect(&self, config: &postgres::Config) -> Result<Client> {
        Ok(match self {
            Tls::Plain => config.connect(NoTls)?,
            Tls::Rustls(t) => config.connect(t.clone())?,
        })
    }

    fn pool(&self, config: &postgres::Config, connections: u32) -> Pool {
        fn b<M: r2d2::ManageConnection>(connections: u32) -> r2d2::Builder<M> {
            r2d2::Pool::builder()
                .max_size(connections.max(1))
                .min_idle(Some(0))
                .connection_timeout(Duration::from_secs(10))
                .error_handler(Box::new(r2d2::NopErrorHandler))
        }
        match self {
            Tls::Plain => Pool::Plain(
                b(connections)
                    .build_unchecked(PostgresConnectionManager::new(config.clone(), NoTls)),
            ),
            Tls::Rustls(t) => Pool::Rustls(
                b(connections)
                    .build_unchecked(PostgresConnectionManager::new(config.clone(), t.clone())),
            ),
        }
    }
}

pub struct PgStore {
    /// Taken only by `Drop`.
    pool: Option<Pool>,
    config: postgres::Config,
    tls: Tls,
    /// The session that holds this node's name (an advisory lock, freed
    /// by the server when the process dies).
    name_lock: std::sync::Mutex<Option<Client>>,
    notifier: std::sync::Arc<Notifier>,
}

impl Drop for PgStore {
    /// Clients own runtimes, which must not be dropped on a thread that
    /// drives the daemon's runtime: they go on a thread of their own.
    fn drop(&mut self) {
        self.notifier.close();
        let pool = self.pool.take();
        let lock = self.name_lock.lock().map(|mut l| l.take()).ok().flatten();
        let _ = std::thread::spawn(move || drop((pool, lock))).join();
    }
}

impl PgStore {
    /// Connect (a pool of up to `connections`; TLS with `sslmode=require`,
    /// the server verified against `ca` or the system's roots), then bring
    /// the schema up to [`SCHEMA_VERSION`].
    pub fn open(url: &str, connections: u32, ca: Option<&std::path::Path>) -> Result<PgStore> {
        let mut config: postgres::Config = url.parse().map_err(|e| {
            StoreError::Schema(format!(
                "the store's address is not a PostgreSQL connection string: {e}"
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config.application_name("dough");
        // A database that went silent is noticed in seconds, not after the
        // kernel's two hours.
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(2))
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3)
            .tcp_user_timeout(Duration::from_secs(5));
        // One connection first, for the migration: a database that cannot
        // be reached is an error now, with its cause (the pool would retry
        // until its timeout).
        let tls = Tls::of(&config, ca)?;
        std::thread::scope(|s| {
            s.spawn(|| migrate(&mut tls.connect(&config)?))
                .join()
                .unwrap_or_else(|_| Err(StoreError::Corrupt("the store's thread panicked".into())))
        })?;
        let pool = tls.pool(&config, connections);
        let notifier = Notifier::start(config.clone(), tls.clone())?;
        Ok(PgStore {
            pool: Some(pool),
            config,
            tls,
            name_lock: std::sync::Mutex::new(None),
            notifier,
        })
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<i32> {
        self.with(|c| {
            Ok(
                c.query_one("SELECT COALESCE(MAX(version), 0) FROM dough_schema", &[])?
                    .get(0),
            )
        })
    }

    /// Run `f` with a pooled connection, on a thread of its own (see the
    /// module's doc), and wait for it.
    fn with<R: Send>(&self, f: impl FnOnce(&mut Client) -> Result<R> + Send) -> Result<R> {
        std::thread::scope(|s| {
            s.spawn(|| match self.pool.as_ref().expect("taken only by drop") {
                Pool::Plain(p) => f(&mut *p.get()?),
                Pool::Rustls(p) => f(&mut *p.get()?),
            })
            .join()
            .unwrap_or_else(|_| Err(StoreError::Corrupt("the store's thread panicked".into())))
        })
    }
}

fn migrate(c: &mut Client) -> Result<()> {
    let mut tx = c.transaction()?;
    // One node migrates at a time; the others then find it done.
    tx.query("SELECT pg_advisory_xact_lock(7446870711)", &[])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS dough_schema (
            version INTEGER PRIMARY KEY,
            applied_ms BIGINT NOT NULL,
            dough TEXT NOT NULL
        )",
    )?;
    let have: i32 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM dough_schema", &[])?
        .get(0);
    if have > SCHEMA_VERSION {
        return Err(StoreError::Schema(format!(
            "the database's schema is version {have}, newer than this dough {} knows (version {SCHEMA_VERSION}): \
             a newer dough has migrated it; run that release on this node too",
            env!("CARGO_PKG_VERSION")
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(have as usize) {
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO dough_schema (version, applied_ms, dough) VALUES ($1, $2, $3)",
            &[
                &(i as i32 + 1),
                &(now_ms() as i64),
                &env!("CARGO_PKG_VERSION"),
            ],
        )?;
    }
    tx.commit()?;
    Ok(())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// Tasks from `sql` (selecting `*` from `tasks`), with their transitions.
fn records<C: GenericClient>(
    c: &mut C,
    sql: &str,
    p: &[&(dyn postgres::types::ToSql + Sync)],
) -> Result<Vec<TaskRecord>> {
    let rows = c.query(sql, p)?;
    if rows.is_empty() {
        return Ok(vec![]);
    }
    let ids: Vec<String> = rows.iter().map(|r| r.get("id")).collect();
    let mut transitions: BTreeMap<String, Vec<Transition>> = BTreeMap::new();
    for r in c.query(
        "SELECT task_id, state, at_ms, reason FROM transitions WHERE task_id = ANY($1) ORDER BY seq",
        &[&ids],
    )? {
        let s: String = r.get(1);
        transitions
            .entry(r.get(0))
            .or_default()
            .push(Transition {
                state: State::parse(&s).ok_or_else(|| corrupt(&s))?,
                at_ms: r.get::<_, i64>(2) as u64,
                reason: r.get(3),
            });
    }
    rows.iter()
        .map(|row| {
            let t = transitions
                .remove(row.get::<_, &str>("id"))
                .unwrap_or_default();
            row_record(row, t)
        })
        .collect()
}

/// A task from a row of `tasks` and its transitions.
fn row_record(row: &postgres::Row, transitions: Vec<Transition>) -> Result<TaskRecord> {
    let state: String = row.get("state");
    Ok(TaskRecord {
        state: State::parse(&state).ok_or_else(|| corrupt(&state))?,
        reason: row.get("reason"),
        detail: row.get("detail"),
        exit_code: row.get("exit_code"),
        request: serde_json::from_str(row.get("request")).map_err(corrupt)?,
        created_ms: row.get::<_, i64>("created_ms") as u64,
        vm_id: row.get("vm_id"),
        transitions,
        output_bytes: row.get::<_, i64>("output_bytes") as u64,
        output_truncated: row.get("output_truncated"),
        cleanup: row.get("cleanup"),
        result: row
            .get::<_, Option<&str>>("result")
            .map(|r| serde_json::from_str(r).map_err(corrupt))
            .transpose()?,
        image_digest: row.get("image_digest"),
        node: row.get("node"),
        epoch: row.get::<_, i64>("epoch") as u64,
        id: row.get("id"),
    })
}

/// The transitions of the task, before this statement, as JSON text
/// (`trs`): one round trip gives a changed task and its history.
const TRANSITIONS_JSON: &str =
    "COALESCE((SELECT json_agg(json_build_array(t.state, t.at_ms, t.reason) ORDER BY t.seq)
      FROM transitions t WHERE t.task_id = upd.id)::text, '[]') AS trs";

/// A task changed by a statement that selected `upd.*` and
/// [`TRANSITIONS_JSON`], with the transition it added.
fn changed_record(row: &postgres::Row, added: Transition) -> Result<TaskRecord> {
    let mut t = whole_record(row)?;
    t.transitions.push(added);
    Ok(t)
}

/// A task from a row that selected `upd.*` and [`TRANSITIONS_JSON`]: its
/// state and history read in one statement (one snapshot), so the two
/// agree even while the task moves on.
fn whole_record(row: &postgres::Row) -> Result<TaskRecord> {
    let trs: Vec<(String, i64, Option<String>)> =
        serde_json::from_str(row.get("trs")).map_err(corrupt)?;
    let transitions = trs
        .into_iter()
        .map(|(s, at, reason)| {
            Ok(Transition {
                state: State::parse(&s).ok_or_else(|| corrupt(&s))?,
                at_ms: at as u64,
                reason,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    row_record(row, transitions)
}

fn get_one<C: GenericClient>(c: &mut C, id: &str) -> Result<TaskRecord> {
    // One statement: a task followed while it runs (events on a cluster)
    // must not show a state older than its last transition.
    let row = c
        .query_opt(
            &format!("SELECT upd.*, {TRANSITIONS_JSON} FROM tasks upd WHERE upd.id = $1"),
            &[&id],
        )?
        .ok_or_else(|| StoreError::NotFound(id.into()))?;
    whole_record(&row)
}

/// In `tx`, with the task's row locked: task `id` exists (else NotFound)
/// and, with `fence`, its claim is still that epoch (else Fenced).
fn fenced(tx: &mut postgres::Transaction<'_>, id: &str, fence: Option<u64>) -> Result<()> {
    let epoch: i64 = tx
        .query_opt("SELECT epoch FROM tasks WHERE id = $1 FOR UPDATE", &[&id])?
        .ok_or_else(|| StoreError::NotFound(id.into()))?
        .get(0);
    check_fence(id, fence, epoch)
}

/// [`Store::claim_many`] on `c` (and [`Store::claim`], a list of one): one
/// statement, refused for a node drained or declared dead (rows another
/// node holds are skipped, not waited for); the tasks won, in the order
/// asked.
fn claim_rows<C: GenericClient>(
    c: &mut C,
    node: &str,
    claims: &[Claim],
) -> Result<Vec<TaskRecord>> {
    if claims.is_empty() {
        return Ok(vec![]);
    }
    let at = now_ms() as i64;
    let ids: Vec<&str> = claims.iter().map(|c| c.id.as_str()).collect();
    let vms: Vec<&str> = claims.iter().map(|c| c.vm_id.as_str()).collect();
    let (mut of, mut kinds, mut names) = (vec![], vec![], vec![]);
    for c in claims {
        for (k, n) in &c.resources {
            of.push(c.id.as_str());
            kinds.push(k.as_str());
            names.push(n.as_str());
        }
    }
    let mut won = {
        c.query(
            &format!(
                "WITH want AS (
                    SELECT * FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS w(id, vm_id, n)
                ), pick AS (
                    SELECT tasks.id, want.vm_id FROM tasks JOIN want ON tasks.id = want.id
                    WHERE tasks.state = 'queued' AND NOT EXISTS (
                        SELECT 1 FROM nodes WHERE name = $1 AND state IN ('draining', 'dead'))
                    ORDER BY want.n
                    FOR UPDATE OF tasks SKIP LOCKED
                ), upd AS (
                    UPDATE tasks SET state = 'provisioning', node = $1, vm_id = pick.vm_id,
                        epoch = epoch + 1
                    FROM pick WHERE tasks.id = pick.id
                    RETURNING tasks.*
                ), ins AS (
                    INSERT INTO transitions (task_id, state, at_ms)
                    SELECT id, 'provisioning', $4 FROM upd
                ), res AS (
                    INSERT INTO resources (task_id, kind, name)
                    SELECT upd.id, r.kind, r.name FROM upd
                    JOIN unnest($5::text[], $6::text[], $7::text[]) WITH ORDINALITY
                        AS r(task_id, kind, name, n) ON r.task_id = upd.id
                    ORDER BY r.n
                )
                SELECT upd.*, {TRANSITIONS_JSON} FROM upd"
            ),
            &[&node, &ids, &vms, &at, &of, &kinds, &names],
        )?
        .iter()
        .map(|row| {
            changed_record(
                row,
                Transition {
                    state: State::Provisioning,
                    at_ms: at as u64,
                    reason: None,
                },
            )
        })
        .collect::<Result<Vec<_>>>()?
    };
    won.sort_by_key(|t| ids.iter().position(|i| *i == t.id));
    Ok(won)
}

/// A queued task's row: its history is its one `queued` transition (not
/// read on this hot path).
fn queued_record(row: &postgres::Row) -> Result<TaskRecord> {
    let created: i64 = row.get("created_ms");
    row_record(
        row,
        vec![Transition {
            state: State::Queued,
            at_ms: created as u64,
            reason: None,
        }],
    )
}

/// Fails with NotFound when no row was changed.
fn changed(n: u64, id: &str) -> Result<()> {
    if n == 0 {
        return Err(StoreError::NotFound(id.into()));
    }
    Ok(())
}

impl Store for PgStore {
    fn insert(&self, id: &str, req: &TaskRequest) -> Result<TaskRecord> {
        let request = serde_json::to_string(req).expect("request serializes");
        self.with(|c| {
            let now = now_ms() as i64;
            let mut tx = c.transaction()?;
            tx.execute(
                "INSERT INTO tasks (id, state, request, priority, created_ms) VALUES ($1, 'queued', $2, $3, $4)",
                &[&id, &request, &req.priority, &now],
            )?;
            tx.execute(
                "INSERT INTO transitions (task_id, state, at_ms) VALUES ($1, 'queued', $2)",
                &[&id, &now],
            )?;
            let t = get_one(&mut tx, id)?;
            tx.commit()?;
            Ok(t)
        })
        .inspect(|_| self.notifier.queued())
    }

    fn get(&self, id: &str) -> Result<TaskRecord> {
        self.with(|c| get_one(c, id))
    }

    fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<TaskRecord>> {
        let limit = limit.min(i64::MAX as usize) as i64;
        self.with(|c| match state {
            Some(s) => records(
                c,
                "SELECT * FROM tasks WHERE state = $1 ORDER BY seq DESC LIMIT $2",
                &[&s.as_str(), &limit],
            ),
            None => records(
                c,
                "SELECT * FROM tasks ORDER BY seq DESC LIMIT $1",
                &[&limit],
            ),
        })
    }

    fn queued(&self, limit: usize) -> Result<Vec<TaskRecord>> {
        let limit = limit.min(i64::MAX as usize) as i64;
        // Every node reads the queue every second: the rows only (a queued
        // task's history is its one `queued` transition, not read).
        self.with(|c| {
            c.query(
                "SELECT * FROM tasks WHERE state = 'queued' ORDER BY priority DESC, seq ASC LIMIT $1",
                &[&limit],
            )?
            .iter()
            .map(queued_record)
            .collect()
        })
    }

    fn in_flight(&self) -> Result<Vec<TaskRecord>> {
        self.with(|c| {
            records(
                c,
                "SELECT * FROM tasks WHERE state IN ('provisioning', 'booting', 'running', 'finalizing') ORDER BY seq",
                &[],
            )
        })
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
        // One statement (one round trip): the update, checked against the
        // states it may come from and the fence, and its transition.
        let from: Vec<&str> = State::ALL
            .iter()
            .filter(|s| s.can_go_to(to))
            .map(|s| s.as_str())
            .collect();
        let at = now_ms() as i64;
        let fence = fence.map(|f| f as i64);
        self.with(|c| {
            let row = c.query_opt(
                &format!(
                    "WITH upd AS (
                        UPDATE tasks SET state = $2, reason = COALESCE($3, reason),
                            detail = COALESCE($4, detail), exit_code = COALESCE($5, exit_code)
                        WHERE id = $1 AND state = ANY($6) AND ($7::bigint IS NULL OR epoch = $7)
                        RETURNING *
                    ), ins AS (
                        INSERT INTO transitions (task_id, state, at_ms, reason)
                        SELECT id, $2, $8, $3 FROM upd
                    )
                    SELECT upd.*, {TRANSITIONS_JSON} FROM upd"
                ),
                &[
                    &id,
                    &to.as_str(),
                    &reason,
                    &detail,
                    &exit_code,
                    &from,
                    &fence,
                    &at,
                ],
            )?;
            if let Some(row) = row {
                return changed_record(
                    &row,
                    Transition {
                        state: to,
                        at_ms: at as u64,
                        reason: reason.map(String::from),
                    },
                );
            }
            // Nothing changed: say why.
            let row = c
                .query_opt("SELECT state, epoch FROM tasks WHERE id = $1", &[&id])?
                .ok_or_else(|| StoreError::NotFound(id.into()))?;
            let (now, epoch): (String, i64) = (row.get(0), row.get(1));
            check_fence(id, fence.map(|f| f as u64), epoch)?;
            Err(StoreError::BadTransition {
                id: id.into(),
                from: State::parse(&now).ok_or_else(|| corrupt(&now))?,
                to,
            })
        })
    }

    fn append_output(
        &self,
        id: &str,
        fence: Option<u64>,
        stream: u8,
        data: &[u8],
        cap: u64,
    ) -> Result<bool> {
        self.with(|c| {
            let mut tx = c.transaction()?;
            let row = tx
                .query_opt(
                    "SELECT output_bytes, output_truncated, epoch FROM tasks WHERE id = $1 FOR UPDATE",
                    &[&id],
                )?
                .ok_or_else(|| StoreError::NotFound(id.into()))?;
            let (bytes, truncated): (i64, bool) = (row.get(0), row.get(1));
            check_fence(id, fence, row.get(2))?;
            if truncated {
                return Ok(false);
            }
            let room = cap.saturating_sub(bytes as u64) as usize;
            let keep = &data[..data.len().min(room)];
            if !keep.is_empty() {
                tx.execute(
                    "INSERT INTO output (task_id, off, stream, data) VALUES ($1, $2, $3, $4)",
                    &[&id, &bytes, &(stream as i16), &keep],
                )?;
            }
            let cut = keep.len() < data.len();
            tx.execute(
                "UPDATE tasks SET output_bytes = output_bytes + $2, output_truncated = $3 WHERE id = $1",
                &[&id, &(keep.len() as i64), &cut],
            )?;
            tx.commit()?;
            Ok(!cut)
        })
    }

    fn logs(&self, id: &str) -> Result<Logs> {
        self.with(|c| {
            let truncated: bool = c
                .query_opt("SELECT output_truncated FROM tasks WHERE id = $1", &[&id])?
                .ok_or_else(|| StoreError::NotFound(id.into()))?
                .get(0);
            let chunks = c
                .query(
                    "SELECT stream, data FROM output WHERE task_id = $1 ORDER BY off",
                    &[&id],
                )?
                .iter()
                .map(|r| (r.get::<_, i16>(0) as u8, r.get::<_, Vec<u8>>(1)))
                .collect();
            Ok(Logs { chunks, truncated })
        })
    }

    fn output_from(&self, id: &str, from: u64, max: usize) -> Result<Vec<(u8, u64, Vec<u8>)>> {
        let from = from.min(i64::MAX as u64) as i64;
        self.with(|c| {
            c.query_opt("SELECT 1 FROM tasks WHERE id = $1", &[&id])?
                .ok_or_else(|| StoreError::NotFound(id.into()))?;
            let mut out = vec![];
            let mut taken = 0usize;
            let mut cursor = from;
            // The chunk that holds `from`, cut to start there …
            if let Some(r) = c.query_opt(
                "SELECT off, stream, data FROM output WHERE task_id = $1 AND off <= $2 ORDER BY off DESC LIMIT 1",
                &[&id, &from],
            )? {
                let (off, data): (i64, Vec<u8>) = (r.get(0), r.get(2));
                let end = off + data.len() as i64;
                if end > from {
                    let skip = (from - off) as usize;
                    taken += data.len() - skip;
                    out.push((r.get::<_, i16>(1) as u8, from as u64, data[skip..].to_vec()));
                    cursor = end;
                }
            }
            // … then whole chunks, a page at a time, until about `max`.
            'pages: while taken < max {
                let rows = c.query(
                    "SELECT off, stream, data FROM output WHERE task_id = $1 AND off >= $2 ORDER BY off LIMIT 32",
                    &[&id, &cursor],
                )?;
                if rows.is_empty() {
                    break;
                }
                for r in rows {
                    if taken >= max {
                        break 'pages;
                    }
                    let (off, data): (i64, Vec<u8>) = (r.get(0), r.get(2));
                    taken += data.len();
                    cursor = off + data.len() as i64;
                    out.push((r.get::<_, i16>(1) as u8, off as u64, data));
                }
            }
            Ok(out)
        })
    }

    fn resources(&self, id: &str) -> Result<Vec<(String, String)>> {
        self.with(|c| {
            Ok(c.query(
                "SELECT kind, name FROM resources WHERE task_id = $1 ORDER BY seq",
                &[&id],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
        })
    }

    fn clear_resources(&self, id: &str, fence: Option<u64>, cleanup: &str) -> Result<()> {
        self.with(|c| {
            let mut tx = c.transaction()?;
            fenced(&mut tx, id, fence)?;
            tx.execute("DELETE FROM resources WHERE task_id = $1", &[&id])?;
            tx.execute(
                "UPDATE tasks SET cleanup = $2 WHERE id = $1",
                &[&id, &cleanup],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn claim(
        &self,
        id: &str,
        node: &str,
        vm_id: &str,
        resources: &[(&str, &str)],
    ) -> Result<Option<TaskRecord>> {
        let claim = Claim {
            id: id.into(),
            vm_id: vm_id.into(),
            resources: resources
                .iter()
                .map(|(k, n)| (k.to_string(), n.to_string()))
                .collect(),
        };
        Ok(self.with(|c| claim_rows(c, node, &[claim]))?.pop())
    }

    fn claim_many(&self, node: &str, claims: &[Claim]) -> Result<Vec<TaskRecord>> {
        self.with(|c| claim_rows(c, node, claims))
    }

    fn claim_next(
        &self,
        node: &str,
        look: usize,
        pick: &mut (dyn FnMut(&[TaskRecord]) -> Vec<Claim> + Send),
    ) -> Result<Vec<TaskRecord>> {
        let look = look.min(i64::MAX as usize) as i64;
        let (won, left) = self.with(|c| {
            let mut tx = c.transaction()?;
            // The head, less what other nodes are claiming now; locked
            // until this claim is done, so they look past it meanwhile.
            let queue = tx
                .query(
                    "SELECT * FROM tasks WHERE state = 'queued' ORDER BY priority DESC, seq ASC
                     LIMIT $1 FOR UPDATE SKIP LOCKED",
                    &[&look],
                )?
                .iter()
                .map(queued_record)
                .collect::<Result<Vec<_>>>()?;
            let claims = pick(&queue);
            let won = claim_rows(&mut tx, node, &claims)?;
            tx.commit()?;
            Ok((won, queue.len() > claims.len()))
        })?;
        // Tasks other nodes skipped while this one held them, and it left:
        // they are told to look again. (Only when it took some: nodes
        // that pass a task over do not wake each other for ever.)
        if left && !won.is_empty() {
            self.notifier.queued();
        }
        Ok(won)
    }

    fn listen(&self, mut on: Box<dyn FnMut(Option<Notice>) -> bool + Send>) -> Result<()> {
        use postgres::fallible_iterator::FallibleIterator;
        let (config, tls) = (self.config.clone(), self.tls.clone());
        // A connection of its own (a pooled one would be given back, and
        // its LISTEN with it). Lost, it is made again every second.
        std::thread::Builder::new()
            .name("dough-listen".into())
            .spawn(move || loop {
                // Ok: `on` said to stop; Err: the line was lost.
                let heard = (|| -> Result<()> {
                    let mut c = tls.connect(&config)?;
                    c.batch_execute("LISTEN dough_queue; LISTEN dough_cancel; LISTEN dough_node")?;
                    loop {
                        if !on(None) {
                            return Ok(());
                        }
                        let mut n = c.notifications();
                        let mut it = n.timeout_iter(Duration::from_secs(1));
                        while let Some(x) = it.next()? {
                            let notice = match x.channel() {
                                "dough_cancel" => Notice::Cancel(x.payload().to_string()),
                                "dough_node" => {
                                    let (name, state) =
                                        x.payload().rsplit_once(' ').unwrap_or((x.payload(), ""));
                                    Notice::Node(name.to_string(), state.to_string())
                                }
                                _ => Notice::Queued,
                            };
                            if !on(Some(notice)) {
                                return Ok(());
                            }
                        }
                        drop(it);
                        drop(n);
                        if c.is_closed() {
                            return Err(StoreError::Corrupt("the connection closed".into()));
                        }
                    }
                })();
                match heard {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::debug!(error = %e, "the store's notifications: listening again in 1 s");
                        std::thread::sleep(Duration::from_secs(1));
                        if !on(None) {
                            return;
                        }
                    }
                }
            })
            .map_err(|e| StoreError::Corrupt(format!("start the store's listener: {e}")))?;
        Ok(())
    }

    fn set_result(
        &self,
        id: &str,
        fence: Option<u64>,
        result: &crate::repo::Finalized,
    ) -> Result<()> {
        let text = serde_json::to_string(result).map_err(corrupt)?;
        self.with(|c| {
            let mut tx = c.transaction()?;
            fenced(&mut tx, id, fence)?;
            tx.execute("UPDATE tasks SET result = $2 WHERE id = $1", &[&id, &text])?;
            tx.commit()?;
            Ok(())
        })
    }

    fn put_artifact(&self, id: &str, fence: Option<u64>, kind: Artifact, body: &str) -> Result<()> {
        self.with(|c| {
            let mut tx = c.transaction()?;
            fenced(&mut tx, id, fence)?;
            tx.execute(
                "INSERT INTO artifacts (task_id, kind, body) VALUES ($1, $2, $3)
                 ON CONFLICT (task_id, kind) DO UPDATE SET body = EXCLUDED.body",
                &[&id, &kind.as_str(), &body],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn artifact(&self, id: &str, kind: Artifact) -> Result<Option<String>> {
        self.with(|c| {
            let row = c.query_opt(
                "SELECT t.id, a.body FROM tasks t
                 LEFT JOIN artifacts a ON a.task_id = t.id AND a.kind = $2
                 WHERE t.id = $1",
                &[&id, &kind.as_str()],
            )?;
            match row {
                None => Err(StoreError::NotFound(id.into())),
                Some(r) => Ok(r.get::<_, Option<String>>(1)),
            }
        })
    }

    fn delete(&self, id: &str) -> Result<()> {
        self.with(|c| {
            let mut tx = c.transaction()?;
            let row = tx.query_opt("SELECT state FROM tasks WHERE id = $1 FOR UPDATE", &[&id])?;
            let Some(row) = row else {
                return Err(StoreError::NotFound(id.into()));
            };
            let s: String = row.get(0);
            let state = State::parse(&s).ok_or_else(|| StoreError::Corrupt(s.clone()))?;
            if !state.is_terminal() {
                return Err(StoreError::InFlight {
                    id: id.into(),
                    state,
                });
            }
            for table in ["transitions", "output", "resources", "artifacts"] {
                tx.execute(&format!("DELETE FROM {table} WHERE task_id = $1"), &[&id])?;
            }
            tx.execute("DELETE FROM tasks WHERE id = $1", &[&id])?;
            tx.commit()?;
            Ok(())
        })
    }

    fn set_image_digest(&self, id: &str, fence: Option<u64>, digest: &str) -> Result<()> {
        self.with(|c| {
            let mut tx = c.transaction()?;
            fenced(&mut tx, id, fence)?;
            tx.execute(
                "UPDATE tasks SET image_digest = $2 WHERE id = $1",
                &[&id, &digest],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn requeue(&self, id: &str) -> Result<()> {
        self.with(|c| {
            let mut tx = c.transaction()?;
            tx.execute(
                "UPDATE tasks SET state = 'queued', vm_id = NULL WHERE id = $1",
                &[&id],
            )?;
            tx.execute(
                "INSERT INTO transitions (task_id, state, at_ms, reason) VALUES ($1, 'queued', $2, 'orchestrator_restart')",
                &[&id, &(now_ms() as i64)],
            )?;
            tx.commit()?;
            Ok(())
        })
        .inspect(|_| self.notifier.queued())
    }

    fn counts(&self) -> Result<BTreeMap<State, u64>> {
        self.with(|c| {
            let mut m: BTreeMap<State, u64> = State::ALL.iter().map(|s| (*s, 0)).collect();
            for r in c.query("SELECT state, COUNT(*) FROM tasks GROUP BY state", &[])? {
                if let Some(s) = State::parse(r.get(0)) {
                    m.insert(s, r.get::<_, i64>(1) as u64);
                }
            }
            Ok(m)
        })
    }

    fn node_beat(&self, node: &NodeRecord) -> Result<Option<String>> {
        let rec = serde_json::to_string(node).map_err(corrupt)?;
        self.with(|c| {
            // Not over the record of this very incarnation declared dead;
            // a drain of this incarnation holds.
            let row = c.query_opt(
                &format!(
                    "INSERT INTO nodes (name, state, started_ms, heartbeat_ms, record)
                     VALUES ($1, $2, $3, {DB_NOW_MS}, $4)
                     ON CONFLICT (name) DO UPDATE SET
                        state = CASE WHEN nodes.state = 'draining' AND excluded.state = 'up'
                                      AND nodes.started_ms = excluded.started_ms
                                 THEN 'draining' ELSE excluded.state END,
                        started_ms = excluded.started_ms, heartbeat_ms = excluded.heartbeat_ms,
                        record = excluded.record
                     WHERE NOT (nodes.state = 'dead' AND nodes.started_ms = excluded.started_ms)
                     RETURNING state"
                ),
                &[&node.name, &node.state, &(node.started_ms as i64), &rec],
            )?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn drain_node(&self, name: &str, drain: bool) -> Result<Option<NodeRecord>> {
        let (from, to) = if drain {
            ("up", "draining")
        } else {
            ("draining", "up")
        };
        self.with(|c| {
            let n = c.execute(
                "UPDATE nodes SET state = $3 WHERE name = $1 AND state = $2",
                &[&name, &from, &to],
            )?;
            if n > 0 {
                // The node hears of it at once, not at its next heartbeat.
                self.notifier.node(name, to);
            }
            let row = c.query_opt(
                "SELECT record, state, heartbeat_ms FROM nodes WHERE name = $1",
                &[&name],
            )?;
            row.map(|r| {
                let mut n: NodeRecord = serde_json::from_str(r.get(0)).map_err(corrupt)?;
                n.state = r.get(1);
                n.heartbeat_ms = r.get::<_, i64>(2) as u64;
                Ok(n)
            })
            .transpose()
        })
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn hold_node_name(&self, name: &str) -> Result<bool> {
        let mut held = self.name_lock.lock().unwrap_or_else(|p| p.into_inner());
        let slot: &mut Option<Client> = &mut held;
        std::thread::scope(|s| {
            s.spawn(|| {
                if slot.is_none() {
                    *slot = Some(self.tls.connect(&self.config)?);
                }
                let c = slot.as_mut().expect("just made");
                Ok(c.query_one(
                    "SELECT pg_try_advisory_lock(hashtextextended('dough node ' || $1, 0))",
                    &[&name],
                )?
                .get(0))
            })
            .join()
            .unwrap_or_else(|_| Err(StoreError::Corrupt("the store's thread panicked".into())))
        })
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>> {
        self.with(|c| {
            c.query(
                "SELECT record, state, heartbeat_ms FROM nodes ORDER BY name",
                &[],
            )?
            .iter()
            .map(|r| {
                let mut n: NodeRecord = serde_json::from_str(r.get(0)).map_err(corrupt)?;
                n.state = r.get(1);
                n.heartbeat_ms = r.get::<_, i64>(2) as u64;
                Ok(n)
            })
            .collect()
        })
    }

    fn request_cancel(&self, id: &str) -> Result<()> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE tasks SET cancel_requested = true WHERE id = $1",
                &[&id],
            )?;
            changed(n, id)
        })
    }

    fn cancel_requests(&self, node: &str) -> Result<Vec<String>> {
        self.with(|c| {
            Ok(c.query(
                "SELECT id FROM tasks WHERE node = $1 AND cancel_requested
                 AND state IN ('provisioning', 'booting', 'running', 'finalizing')",
                &[&node],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
        })
    }

    fn reap_dead_nodes(&self, by: &str, timeout_ms: u64) -> Result<Vec<Reaped>> {
        self.with(|c| {
            let mut tx = c.transaction()?;
            // Locked, so two peers do not both reap one node; a node being
            // reaped by another is skipped.
            let dead: Vec<String> = tx
                .query(
                    &format!(
                        "UPDATE nodes SET state = 'dead' WHERE name IN (
                            SELECT name FROM nodes WHERE name <> $1
                            AND state NOT IN ('stopped', 'dead')
                            AND heartbeat_ms < {DB_NOW_MS} - $2
                            FOR UPDATE SKIP LOCKED)
                         RETURNING name"
                    ),
                    &[&by, &(timeout_ms as i64)],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut out = vec![];
            for node in dead {
                let now = now_ms() as i64;
                let requeued: Vec<String> = tx
                    .query(
                        "UPDATE tasks SET state = 'queued', vm_id = NULL, node = NULL, epoch = epoch + 1
                         WHERE node = $1 AND state = 'provisioning' RETURNING id",
                        &[&node],
                    )?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let failed: Vec<String> = tx
                    .query(
                        "UPDATE tasks SET state = 'failed', reason = 'node_lost', detail = $2, epoch = epoch + 1
                         WHERE node = $1 AND state IN ('booting', 'running', 'finalizing') RETURNING id",
                        &[&node, &node_lost_detail(&node, by, timeout_ms)],
                    )?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                tx.execute(
                    "INSERT INTO transitions (task_id, state, at_ms, reason)
                     SELECT id, 'queued', $2, 'node_lost' FROM unnest($1::text[]) AS id",
                    &[&requeued, &now],
                )?;
                tx.execute(
                    "INSERT INTO transitions (task_id, state, at_ms, reason)
                     SELECT id, 'failed', $2, 'node_lost' FROM unnest($1::text[]) AS id",
                    &[&failed, &now],
                )?;
                out.push(Reaped {
                    node,
                    failed,
                    requeued,
                });
            }
            tx.commit()?;
            Ok(out)
        })
        .inspect(|out| {
            if out.iter().any(|r| !r.requeued.is_empty()) {
                self.notifier.queued();
            }
        })
    }
}
