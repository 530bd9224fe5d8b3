//! The PostgreSQL store against a real server (Debian's `postgresql`, a
//! cluster of the test's own): the same checks SQLite passes, and the
//! schema's versioning.
mod common;

use common::pg::Postgres;
use std::time::Duration;

use dough_core::store::{Notice, PgStore, Store};

#[test]
fn postgres_passes_the_store_checks() {
    let pg = Postgres::start();
    dough_core::store::checks::all(&|name: &str| -> Box<dyn Store> {
        Box::new(PgStore::open(&pg.url(name), 4, None).unwrap())
    });
}

#[test]
fn the_schema_is_versioned_and_a_newer_one_is_refused() {
    let pg = Postgres::start();
    let url = pg.url("schema");
    let s = PgStore::open(&url, 2, None).unwrap();
    let v = s.schema_version().unwrap();
    assert_eq!(v, dough_core::store::PG_SCHEMA_VERSION);
    assert!(v >= 1);
    drop(s);
    // Opening again migrates nothing (one row per version).
    PgStore::open(&url, 2, None).unwrap();
    assert_eq!(
        pg.psql("schema", "SELECT count(*) FROM dough_schema")
            .trim(),
        v.to_string()
    );
    // A newer dough migrated the database: this one refuses it, and says
    // what to do.
    pg.psql(
        "schema",
        &format!(
            "INSERT INTO dough_schema (version, applied_ms, dough) VALUES ({}, 0, '99.0.0')",
            v + 1
        ),
    );
    let e = PgStore::open(&url, 2, None)
        .err()
        .expect("a newer schema is refused");
    let m = e.to_string();
    assert!(
        m.contains(&format!("schema is version {}", v + 1)) && m.contains("newer"),
        "{m}"
    );
}

#[test]
fn an_unreachable_or_malformed_store_is_a_clear_error() {
    let e = PgStore::open("postgres://postgres@127.0.0.1:1/x", 1, None)
        .err()
        .expect("nothing listens on port 1");
    assert!(e.to_string().contains("postgres"), "{e}");
    let e = PgStore::open("not a url at all", 1, None).err().unwrap();
    assert!(
        e.to_string().contains("not a PostgreSQL connection string"),
        "{e}"
    );
}

#[test]
fn a_node_name_is_held_by_one_live_process() {
    let pg = Postgres::start();
    let url = pg.url("names");
    let a = PgStore::open(&url, 1, None).unwrap();
    let b = PgStore::open(&url, 1, None).unwrap();
    assert!(a.hold_node_name("n1").unwrap());
    assert!(a.hold_node_name("n1").unwrap(), "held again by its holder");
    assert!(!b.hold_node_name("n1").unwrap());
    assert!(b.hold_node_name("n2").unwrap());
    // The holder gone (its session closed), the name is free.
    drop(a);
    common::wait_until("the name freed", std::time::Duration::from_secs(10), || {
        b.hold_node_name("n1").unwrap()
    });
}

/// Nodes are told, not left to poll (LISTEN/NOTIFY): a task queued or
/// re-queued, a cancel asked (with the owner's name), a node drained or
/// taken back — and a claim tells nothing. A listener whose connection is
/// cut listens again.
#[test]
fn nodes_are_told_of_queued_tasks_and_cancels() {
    let pg = Postgres::start();
    let s = PgStore::open(&pg.url("notify"), 2, None).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    s.listen(Box::new(move |n| match n {
        Some(n) => tx.send(n).is_ok(),
        None => true,
    }))
    .unwrap();
    let listener = || {
        pg.psql(
            "notify",
            "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
        )
        .trim()
        .to_string()
    };
    common::wait_until("listening", Duration::from_secs(20), || {
        !listener().is_empty()
    });
    let next = || rx.recv_timeout(Duration::from_secs(20)).expect("a notice");
    let req = serde_json::from_str(r#"{"command": ["true"]}"#).unwrap();
    s.insert("t1", &req).unwrap();
    assert_eq!(next(), Notice::Queued);
    // The claim tells nothing: the next notice is the cancel's.
    s.claim("t1", "n1", "vm", &[]).unwrap().unwrap();
    s.request_cancel("t1").unwrap();
    assert_eq!(next(), Notice::Cancel("n1".into()));
    s.requeue("t1").unwrap();
    assert_eq!(next(), Notice::Queued);
    // A node drained or taken back is told (its heartbeat alone would
    // take up to a second); asking again changes nothing and tells
    // nothing: the next notice is the taking back.
    s.node_beat(&dough_core::store::checks::node("n1", "up", 1))
        .unwrap();
    s.drain_node("n1", true).unwrap();
    assert_eq!(next(), Notice::Node("n1".into(), "draining".into()));
    s.drain_node("n1", true).unwrap();
    s.drain_node("n1", false).unwrap();
    assert_eq!(next(), Notice::Node("n1".into(), "up".into()));
    s.insert("t3", &req).unwrap();
    assert_eq!(next(), Notice::Queued);
    // Its session ended by the server: it listens again, and is told.
    let first = listener();
    pg.psql(
        "notify",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
    );
    common::wait_until("listening again", Duration::from_secs(20), || {
        let now = listener();
        !now.is_empty() && now != first
    });
    s.insert("t2", &req).unwrap();
    assert_eq!(next(), Notice::Queued);
}

/// Two nodes looking at the queue at once see different tasks: the head
/// one node is picking from stays locked until its claim is done, and the
/// other is shown the tasks after it (so nodes do not race for the same
/// head and lose).
#[test]
fn nodes_looking_at_once_see_different_tasks() {
    let pg = Postgres::start();
    let url = pg.url("look");
    let (a, b) = (
        PgStore::open(&url, 2, None).unwrap(),
        PgStore::open(&url, 2, None).unwrap(),
    );
    let req = serde_json::from_str(r#"{"command": ["true"]}"#).unwrap();
    for i in 0..10 {
        a.insert(&format!("t{i}"), &req).unwrap();
    }
    let ask = |t: &dough_core::store::TaskRecord| dough_core::store::Claim {
        id: t.id.clone(),
        vm_id: "vm".into(),
        resources: vec![],
    };
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let a_ = &a;
    std::thread::scope(|sc| {
        let first = sc.spawn(move || {
            a_.claim_next("na", 4, &mut move |q| {
                seen_tx
                    .send(q.iter().map(|t| t.id.clone()).collect::<Vec<_>>())
                    .unwrap();
                go_rx.recv().unwrap();
                q.iter().map(ask).collect()
            })
            .unwrap()
        });
        // a is picking (its head locked): b is shown what comes after.
        let a_saw = seen_rx.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(a_saw, ["t0", "t1", "t2", "t3"]);
        let mut b_saw = vec![];
        let b_won = b
            .claim_next("nb", 4, &mut |q| {
                b_saw = q.iter().map(|t| t.id.clone()).collect();
                q.iter().map(ask).collect()
            })
            .unwrap();
        assert_eq!(b_saw, ["t4", "t5", "t6", "t7"]);
        assert_eq!(b_won.len(), 4);
        go_tx.send(()).unwrap();
        let a_won = first.join().unwrap();
        assert_eq!(
            a_won.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
            ["t0", "t1", "t2", "t3"]
        );
    });
    for i in 0..8 {
        let t = a.get(&format!("t{i}")).unwrap();
        assert_eq!(t.epoch, 1, "{t:?}");
        assert_eq!(t.node.as_deref(), Some(if i < 4 { "na" } else { "nb" }));
    }
}

/// `sslmode=require`: the connection is TLS, the server's certificate
/// verified against the CA given; a server the roots do not vouch for is
/// refused.
#[test]
fn tls_to_the_database_is_verified() {
    let pg = Postgres::start_tls();
    let ca = pg.ca.clone().unwrap();
    let url = format!("{}?sslmode=require", pg.url("tls"));
    let s = PgStore::open(&url, 2, Some(&ca)).unwrap();
    assert!(s.hold_node_name("tls-node").unwrap());
    // The server sees the store's sessions encrypted, and none in clear.
    let sessions = pg.psql(
        "postgres",
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'dough'",
    );
    assert!(sessions.lines().any(|l| l == "t"), "{sessions}");
    assert!(!sessions.lines().any(|l| l == "f"), "{sessions}");
    drop(s);
    // The system's roots do not know the test's CA.
    let e = PgStore::open(&url, 1, None)
        .err()
        .expect("an unknown CA is refused");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    // A CA file with no certificate in it: a clear error before connecting.
    let empty = tempfile::NamedTempFile::new().unwrap();
    let e = PgStore::open(&url, 1, Some(empty.path())).err().unwrap();
    assert!(e.to_string().contains("no certificate"), "{e}");
    // Without sslmode=require the connection stays plain.
    let plain = PgStore::open(&pg.url("tls"), 1, None).unwrap();
    assert!(plain.hold_node_name("plain-node").unwrap());
    let sessions = pg.psql(
        "postgres",
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'dough'",
    );
    assert!(sessions.lines().any(|l| l == "f"), "{sessions}");
}

/// `dough serve` with a store it cannot use stops before it listens, and
/// says why.
#[test]
fn dough_serve_refuses_a_store_it_cannot_use() {
    let h = common::Harness::new();
    for (store, says) in [
        (
            "mysql://db/x",
            "--store: give `sqlite` or a postgres://USER@HOST/DB address",
        ),
        (
            "postgres://postgres@127.0.0.1:1/x",
            "open the task store (--store)",
        ),
    ] {
        let out = h
            .cmd()
            .args(["serve", "--listen", "127.0.0.1:0", "--store", store])
            .output()
            .unwrap();
        let err = common::text(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{store}: {err}");
        assert!(err.contains(says), "{store}: {err}");
        assert!(
            !h.state.path().join("api-url").exists(),
            "{store}: it listened"
        );
    }
}
