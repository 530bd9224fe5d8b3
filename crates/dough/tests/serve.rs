//! `dough serve` as users meet it: the real daemon binary, real HTTP, the
//! real SQLite store, real VMs where the behaviour needs one.
mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::server::Server;
use common::*;
use serde_json::{json, Value};

/// (token: None none, Some("") the right one; method; path; body; status;
/// error code; a phrase of the message)
type Case<'a> = (
    Option<&'a str>,
    &'a str,
    &'a str,
    Option<&'a str>,
    u16,
    &'a str,
    &'a str,
);

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[test]
fn bad_requests_get_a_4xx_and_a_json_error_naming_the_problem() {
    let h = Harness::new();
    let s = Server::start(&h, &["--max-vms", "0", "--memory-limit", "4096"]);
    let big = format!(r#"{{"command": ["{}"]}}"#, "x".repeat(100 * 1024));
    // One vCPU more than this host's capacity (its CPUs × the default
    // overcommit of 4): impossible on a 2-core and on a 64-core host alike.
    let cpus = std::thread::available_parallelism().unwrap().get();
    let too_many = format!(r#"{{"command":["true"],"vcpus":{}}}"#, cpus * 4 + 1);
    let cases: Vec<Case> = vec![
        (
            None,
            "POST",
            "/v1/tasks",
            Some(r#"{"command":["true"]}"#),
            401,
            "unauthorized",
            "Bearer",
        ),
        (
            Some("wrong"),
            "GET",
            "/v1/tasks",
            None,
            401,
            "unauthorized",
            "wrong token",
        ),
        (None, "GET", "/metrics", None, 401, "unauthorized", ""),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"command": ["#),
            400,
            "bad_json",
            "EOF",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"command":["true"],"cpus":2}"#),
            400,
            "bad_json",
            "unknown field `cpus`",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"command":"true"}"#),
            400,
            "bad_json",
            "invalid type",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            // `command` may come from an agent preset; without one it
            // must be there.
            Some(r#"{"env":{}}"#),
            400,
            "invalid",
            "command: must name a program",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"command":[]}"#),
            400,
            "invalid",
            "command",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"command":["true"],"vcpus":0}"#),
            400,
            "invalid",
            "vcpus",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"command":["true"],"vcpus":-1}"#),
            400,
            "bad_json",
            "invalid value",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"command":["true"],"memory_mib":100}"#),
            400,
            "invalid",
            "memory_mib",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(&too_many),
            422,
            "impossible",
            "exceeds",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"command":["true"],"memory_mib":8192}"#),
            422,
            "impossible",
            "memory_mib",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"command":["true"],"timeout_secs":0}"#),
            400,
            "invalid",
            "timeout_secs",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"command":["true"],"egress":"none","allow_hosts":["a.com"]}"#),
            400,
            "invalid",
            "cannot be combined",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"command":["true"],"repo":{"url":"https://u:pw@g.example/o/r"}}"#),
            400,
            "invalid",
            "carries credentials",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"command":["true"],"repo":{"url":"https://g.example/o/r","branch":"a..b"}}"#),
            400,
            "invalid",
            "not a valid git branch name",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"command":["true"],"egress":"none","repo":{"url":"https://g.example/o/r"}}"#),
            400,
            "invalid",
            "needs the VM's network",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"command":["true"],"pull_request":{"title":"t"}}"#),
            400,
            "invalid",
            "needs a repo",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"command":["true"],"repo":{"url":"https://g.example/o/r","token":"x"}}"#),
            400,
            "bad_json",
            "unknown field `token`",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"command":["true"],"secret_env":["DOUGH_NOT_SET_ANYWHERE_42"]}"#),
            400,
            "invalid",
            "Dough's own settings",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"command":["true"],"secret_env":["NOT_SET_ANYWHERE_42"]}"#),
            400,
            "invalid",
            "not set in the daemon's environment",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"agent":"no-such-agent"}"#),
            400,
            "invalid",
            "aider, claude-code, codex",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"command":["true"],"model_url":"http://198.51.100.7/"}"#),
            400,
            "invalid",
            "needs an agent",
        ),
        // A preset fills in its secret: refused at submit while the daemon
        // does not have it.
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"agent":"codex"}"#),
            400,
            "invalid",
            "OPENAI_API_KEY is not set",
        ),
        // An image the daemon does not have is refused now, not when the
        // task would run; the answer names the images it has.
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"command":["true"],"image":"no-such-image"}"#),
            400,
            "invalid",
            "it has: default",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(r#"{"command":["true"],"image":"../default"}"#),
            400,
            "invalid",
            "image name",
        ),
        (
            Some(""),
            "POST",
            "/v1/tasks",
            Some(&big),
            413,
            "too_large",
            "larger than",
        ),
        (
            Some(""),
            "GET",
            "/v1/tasks/nope",
            None,
            404,
            "no_such_task",
            "nope",
        ),
        (
            Some(""),
            "DELETE",
            "/v1/tasks/nope",
            None,
            404,
            "no_such_task",
            "nope",
        ),
        (
            Some(""),
            "GET",
            "/v1/tasks/nope/logs",
            None,
            404,
            "no_such_task",
            "nope",
        ),
        (
            Some(""),
            "GET",
            "/v1/tasks/nope/events",
            None,
            404,
            "no_such_task",
            "nope",
        ),
        (
            Some(""),
            "GET",
            "/v1/tasks?state=bogus",
            None,
            400,
            "bad_query",
            "bogus",
        ),
        (
            Some(""),
            "GET",
            "/v1/tasks?limit=abc",
            None,
            400,
            "bad_query",
            "limit",
        ),
        (
            Some(""),
            "GET",
            "/v2/things",
            None,
            404,
            "not_found",
            "route",
        ),
        (
            Some(""),
            "PUT",
            "/v1/tasks",
            Some("{}"),
            405,
            "method_not_allowed",
            "",
        ),
    ];
    for (tok, method, path, body, status, want_code, needle) in cases {
        let tok = tok.map(|t| if t.is_empty() { s.token.as_str() } else { t });
        let (st, v) = s.call_as(tok, method, path, body);
        assert_eq!(st, status, "{method} {path} {body:?}: {v}");
        assert_eq!(code(&v), want_code, "{method} {path}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(
            msg.contains(needle),
            "{method} {path}: '{msg}' lacks '{needle}'"
        );
    }
    // Healthz needs no token; a good task is accepted and waits (max-vms 0).
    assert_eq!(s.call_as(None, "GET", "/healthz", None).0, 200);
    let id = s.submit(json!({"command": ["true"], "labels": {"team": "a"}}));
    assert_eq!(s.task(&id)["state"], "queued");
    let (st, v) = s.call("DELETE", &format!("/v1/tasks/{id}"), None);
    assert_eq!((st, v["state"].as_str()), (202, Some("cancelled")), "{v}");
    let (st, v) = s.call("DELETE", &format!("/v1/tasks/{id}"), None);
    assert_eq!((st, code(&v)), (409, "finished"), "{v}");
    let (_, l) = s.call("GET", "/v1/tasks?state=cancelled", None);
    assert_eq!(l["tasks"][0]["id"], id.as_str());
    assert_eq!(l["tasks"][0]["request"]["labels"]["team"], "a");
    // The CLI finds the daemon through DOUGH_URL / DOUGH_TOKEN as well.
    let elsewhere = tempfile::tempdir().unwrap();
    let ls = |token: &str| {
        h.cmd()
            .env("DOUGH_STATE_DIR", elsewhere.path())
            .env("DOUGH_URL", &s.url)
            .env("DOUGH_TOKEN", token)
            .args(["ls", "--state", "cancelled"])
            .output()
            .unwrap()
    };
    let ok = ls(&s.token);
    assert!(
        ok.status.success() && text(&ok.stdout).contains(&id),
        "{}",
        text(&ok.stderr)
    );
    let bad = ls("nope");
    assert!(
        !bad.status.success() && text(&bad.stderr).contains("401"),
        "{}",
        text(&bad.stderr)
    );
    let none = h
        .cmd()
        .env("DOUGH_STATE_DIR", elsewhere.path())
        .arg("ls")
        .output()
        .unwrap();
    assert!(
        text(&none.stderr).contains("is `dough serve` running?"),
        "{}",
        text(&none.stderr)
    );
    s.stop();
}

#[test]
fn the_openapi_document_matches_the_served_routes() {
    let h = Harness::new();
    let s = Server::start(&h, &["--max-vms", "0", "--node-name", "t1"]);
    let (st, doc) = s.call("GET", "/openapi.json", None);
    assert_eq!(st, 200);
    assert_eq!(doc["openapi"], "3.0.3");
    let paths = doc["paths"].as_object().unwrap();
    let id = s.submit(json!({"command": ["true"]}));
    let mut documented = 0;
    for (path, ops) in paths {
        // (A node's drain: POST drains it, then DELETE takes it back.)
        let concrete = path.replace("{id}", &id).replace("{name}", "t1");
        for method in ["get", "post", "delete", "put", "patch"] {
            let body = (method == "post").then_some(r#"{"command":["true"]}"#);
            let m = method.to_uppercase();
            let st = if concrete.ends_with("/events") && method == "get" {
                // A stream: only the status line is read.
                let r = s
                    .agent
                    .get(&format!("{}{concrete}", s.url))
                    .set("Authorization", &format!("Bearer {}", s.token))
                    .call()
                    .unwrap();
                r.status()
            } else {
                s.call(&m, &concrete, body).0
            };
            if ops.get(method).is_some() {
                documented += 1;
                // A queued task has no egress record or statement yet: a
                // 404 that says so, not a missing route.
                if let Some(kind) = ["egress", "provenance"]
                    .into_iter()
                    .find(|k| path.ends_with(&format!("/{k}")))
                {
                    let (st, v) = s.call(&m, &concrete, None);
                    assert_eq!(
                        (st, v["error"]["code"].as_str()),
                        (404, Some(format!("no_{kind}").as_str())),
                        "{m} {path}: {v}"
                    );
                    continue;
                }
                assert!(st < 400, "{m} {path} is documented but answers {st}");
            } else {
                assert_eq!(st, 405, "{m} {path} is not documented but answers {st}");
            }
        }
    }
    assert_eq!(documented, 17, "{doc}");
    // Without pools the pool list is empty, not an error.
    assert_eq!(s.call("GET", "/v1/pools", None).1, json!({"pools": []}));
    // Routes outside the document do not exist.
    for p in ["/v1", "/v1/task", "/v1/tasks/x/y", "/api/v1/tasks"] {
        assert_eq!(s.call("GET", p, None).0, 404, "{p}");
    }
    s.stop();
}

/// A and B never end on their own (the test cancels them), so "C waits
/// while both slots are held" and "logs -f followed A live" are checked
/// against events, not against how fast the machine runs `sleep`.
#[test]
fn tasks_run_up_to_the_limit_and_the_rest_wait_their_turn() {
    let h = Harness::new();
    let s = Server::start(&h, &["--max-vms", "2", "--node-name", "node-a"]);
    let a = s.submit(json!({"command": ["sh", "-c", "echo out; echo err >&2; exec sleep 600"]}));
    // B through the CLI client (it finds the daemon through the state dir).
    let out = h
        .cmd()
        .args([
            "submit",
            "-e",
            "X=y",
            "-l",
            "via=cli",
            "--",
            "sh",
            "-c",
            "echo b=$X; exec sleep 600",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let b = text(&out.stdout).trim().to_string();
    assert_eq!(b.len(), 12, "an id: {b}");
    let c = s.submit(json!({"command": ["sh", "-c", "echo c=$X; exit 3"], "env": {"X": "z"}}));
    s.wait_state(&a, |st| st == "running", Duration::from_secs(60));
    // `dough logs -f` follows A live: its output arrives while A still runs.
    let mut follow = h
        .cmd()
        .args(["logs", "-f", &a])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut fout = BufReader::new(follow.stdout.take().unwrap());
    let mut line = String::new();
    fout.read_line(&mut line).unwrap();
    assert_eq!(line, "out\n", "stdout followed");
    assert_eq!(
        s.task(&a)["state"],
        "running",
        "followed live, not after the end"
    );
    // While A and B hold both slots, C waits.
    s.wait_state(&b, |st| st == "running", Duration::from_secs(60));
    assert_eq!(s.task(&c)["state"], "queued");
    // The node's heartbeat carries its use; each task names its node.
    wait_until(
        "the node's heartbeat to count 2 VMs",
        Duration::from_secs(30),
        || s.call("GET", "/v1/nodes", None).1["nodes"][0]["use"]["vms"] == 2,
    );
    assert_eq!(s.task(&a)["node"], "node-a");
    assert_eq!(s.task(&b)["node"], "node-a");
    // B has said its line before it is cancelled (`running` comes when its
    // process exists, not when it has printed).
    wait_until("B's output", Duration::from_secs(60), || {
        s.logs(&b) == "b=y\n"
    });
    // B's end makes room for C.
    let o = h.cmd().args(["cancel", &b]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (tb, tc) = (s.wait_terminal(&b), s.wait_terminal(&c));
    assert_eq!(tb["state"], "cancelled", "{tb}");
    assert_eq!(
        (
            tc["state"].as_str(),
            tc["reason"].as_str(),
            tc["exit_code"].as_i64()
        ),
        (Some("failed"), Some("exit_code"), Some(3)),
        "{tc}"
    );
    assert_eq!(s.task(&a)["state"], "running");
    let (st, _) = s.call("DELETE", &format!("/v1/tasks/{a}"), None);
    assert_eq!(st, 202);
    let ta = s.wait_terminal(&a);
    assert_eq!(ta["state"], "cancelled", "{ta}");
    assert!(s.logs(&a).contains("out\n") && s.logs(&a).contains("err\n"));
    let f = follow.wait_with_output().unwrap();
    assert!(f.status.success(), "{}", text(&f.stderr));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut fout, &mut rest).unwrap();
    assert_eq!(rest, "", "stdout after the end");
    assert!(text(&f.stderr).contains("err\n"), "{}", text(&f.stderr));
    assert!(
        text(&f.stderr).contains(&format!("task {a} cancelled (cancelled)")),
        "{}",
        text(&f.stderr)
    );
    let ls = h.cmd().arg("ls").output().unwrap();
    let ls = text(&ls.stdout);
    for (id, st) in [(&a, "cancelled"), (&b, "cancelled"), (&c, "failed")] {
        assert!(
            ls.lines()
                .any(|l| l.starts_with(id.as_str()) && l.contains(st)),
            "{ls}"
        );
    }
    let o = h.cmd().args(["logs", &b]).output().unwrap();
    assert_eq!(text(&o.stdout), "b=y\n");
    let o = h.cmd().args(["show", &b]).output().unwrap();
    let shown: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(shown["request"]["labels"]["via"], "cli");
    // A finished task cannot be cancelled.
    let o = h.cmd().args(["cancel", &c]).output().unwrap();
    assert!(
        !o.status.success() && text(&o.stderr).contains("409"),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(s.logs(&c), "c=z\n");
    // C started only after B had finished.
    let at = |t: &Value, state: &str| {
        t["transitions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["state"] == state)
            .unwrap()["at_ms"]
            .as_u64()
            .unwrap()
    };
    assert!(
        at(&tc, "provisioning") >= at(&tb, "finalizing"),
        "{tc}\n{tb}"
    );
    let states: Vec<&str> = tc["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        [
            "queued",
            "provisioning",
            "booting",
            "running",
            "finalizing",
            "failed"
        ]
    );
    assert_eq!(tc["cleanup"], "ok");
    let (_, m) = s.call("GET", "/metrics", None);
    let m = m.as_str().unwrap().to_string();
    // Whole lines: `_count 1` must not pass on `_count 12`.
    for want in [
        "dough_tasks{state=\"cancelled\"} 2",
        "dough_tasks{state=\"failed\"} 1",
        "dough_vms_running 0",
        "dough_scheduler_latency_seconds_count 1",
    ] {
        assert!(m.lines().any(|l| l == want), "{want}:\n{m}");
    }
    s.stop();
    h.assert_clean();
}

/// The output events of `GET /v1/tasks/{id}/events?offset=N`, joined.
fn replayed_output(s: &Server, id: &str, offset: u64) -> (u64, String) {
    let r = s
        .agent
        .get(&format!("{}/v1/tasks/{id}/events?offset={offset}", s.url))
        .set("Authorization", &format!("Bearer {}", s.token))
        .call()
        .unwrap();
    let (mut first, mut data, mut event) = (None, String::new(), String::new());
    for line in BufReader::new(r.into_reader()).lines() {
        let line = line.unwrap();
        if let Some(e) = line.strip_prefix("event: ") {
            event = e.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            let v: Value = serde_json::from_str(d).unwrap();
            if event == "output" {
                let off = v["offset"].as_u64().unwrap();
                first.get_or_insert(off);
                assert_eq!(off, offset + data.len() as u64, "in order, no gap");
                data.push_str(v["data"].as_str().unwrap());
            }
        }
    }
    (first.unwrap_or(offset), data)
}

/// Slow readers slow nobody down and lose nothing (issue 18): while a task
/// writes 63 MB (the daemon's stored-output limit raised to hold it), a client reads its event stream one byte a second and a
/// `dough logs -f` is not read at all until the task has ended. The task
/// succeeds; the paused follower then prints the whole output, intact and
/// in order (caught up from the store, not sent `lagged`); the store has
/// it; `?offset=` replays from any byte; other requests are answered
/// meanwhile; and the daemon's memory grows by far less than the output.
#[test]
fn slow_readers_neither_fail_a_task_nor_lose_its_output() {
    use std::io::{Read, Write};
    let h = Harness::new();
    let s = Server::start(&h, &["--output-limit", "80"]);
    let pid = s.child.id();
    let base = status_kib(pid, "VmRSS:").unwrap();
    const N: u32 = 8_000_000;
    let id = s.submit(json!({"command": ["seq", "1", N.to_string()]}));
    let addr = s.url.trim_start_matches("http://").to_string();
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        slow,
        "GET /v1/tasks/{id}/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\r\n",
        s.token
    )
    .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let slow = std::thread::spawn(move || {
        let (mut b, mut got) = ([0u8; 1], 0u64);
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            match slow.read(&mut b) {
                Ok(1) => got += 1,
                _ => break,
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        got
    });
    let follow = h
        .cmd()
        .args(["logs", "-f", &id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = s.wait_state(
        &id,
        |st| matches!(st, "succeeded" | "failed" | "cancelled" | "timed_out"),
        Duration::from_secs(900),
    );
    let peak = status_kib(pid, "VmHWM:").unwrap();
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(s.call("GET", "/healthz", None).0, 200);
    let mut expected = String::with_capacity(64 << 20);
    for i in 1..=N {
        expected.push_str(&i.to_string());
        expected.push('\n');
    }
    assert!(expected.len() > 60_000_000);
    let f = follow.wait_with_output().unwrap();
    assert!(f.status.success(), "{}", text(&f.stderr));
    assert_eq!(f.stdout.len(), expected.len(), "{}", text(&f.stderr));
    assert!(
        f.stdout == expected.as_bytes(),
        "the follower's output differs"
    );
    assert!(
        text(&f.stderr).contains(&format!("task {id} succeeded")),
        "{}",
        text(&f.stderr)
    );
    let mut stored = vec![];
    s.agent
        .get(&format!("{}/v1/tasks/{id}/logs", s.url))
        .set("Authorization", &format!("Bearer {}", s.token))
        .call()
        .unwrap()
        .into_reader()
        .read_to_end(&mut stored)
        .unwrap();
    assert!(stored == expected.as_bytes(), "the stored output differs");
    let k = 57_654_321;
    let (first, tail) = replayed_output(&s, &id, k);
    assert_eq!(first, k);
    assert!(
        tail == expected[k as usize..],
        "the replay from {k} differs"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let got = slow.join().unwrap();
    assert!(got >= 1, "the slow client read nothing");
    eprintln!(
        "daemon RSS {base} KiB at start, peak {peak} KiB; output {} KiB",
        expected.len() >> 10
    );
    // Holding the output for its slow readers would take over 60 MB; the
    // queues (the task's 8 chunks, 16 broadcast events, 8 per client, a
    // 256 KiB replay page) and the store's cache take a few.
    assert!(
        peak.saturating_sub(base) < 24 << 10,
        "the daemon grew by {} KiB for {} KiB of output",
        peak - base,
        expected.len() >> 10
    );
    s.stop();
    h.assert_clean();
}

/// Raw HTTP: send `req` on a new connection; the status of the answer
/// (None: closed without one).
fn raw_status(addr: &str, req: &[u8]) -> Option<u16> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let _ = c.write_all(req);
    let mut head = [0u8; 12];
    let mut got = 0;
    while got < head.len() {
        match c.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    std::str::from_utf8(&head[..got])
        .ok()?
        .strip_prefix("HTTP/1.1 ")?
        .get(..3)?
        .parse()
        .ok()
}

/// Abusive clients (issue 18) get a 4xx or a closed connection, never a 5xx
/// or a crash, and never keep others from being served: 1000 connections at
/// once each get their answer; 50 slow-header clients are cut off after
/// the header timeout while a normal request is answered; a 1 MiB header
/// gets 431; JSON nested 20000 deep gets 400; the daemon's memory stays
/// bounded throughout.
#[test]
fn abusive_clients_get_4xx_and_never_starve_others() {
    use std::io::{Read, Write};
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    assert!(
        hard >= 4096,
        "this test needs 4096 descriptors, the limit is {hard}"
    );
    let h = Harness::new();
    let s = Server::start(&h, &["--max-vms", "0"]);
    let pid = s.child.id();
    let base = status_kib(pid, "VmRSS:").unwrap();
    let addr = s.url.trim_start_matches("http://").to_string();
    let get = format!(
        "GET /v1/tasks?limit=1 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        s.token
    );

    // 50 slow-header clients: one byte a second, for as long as they can.
    let slow: Vec<_> = (0..50)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(&addr).unwrap();
            let req = get.clone().into_bytes();
            std::thread::spawn(move || {
                let t = Instant::now();
                for b in req.iter().take(req.len() - 2) {
                    if c.write_all(&[*b]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
                // Cut off: the server closed the connection (EOF or reset),
                // with no 2xx and no 5xx.
                c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let mut b = [0u8; 64];
                let n = c.read(&mut b).unwrap_or(0);
                (t.elapsed(), String::from_utf8_lossy(&b[..n]).to_string())
            })
        })
        .collect();
    // Meanwhile, others are answered.
    assert_eq!(raw_status(&addr, get.as_bytes()), Some(200));

    // 1000 connections at once, each with its request, then the answers.
    let mut conns: Vec<std::net::TcpStream> = (0..1000)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    for c in conns.iter_mut() {
        c.write_all(get.as_bytes()).unwrap();
    }
    let mut peak = 0;
    for (i, c) in conns.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut head = [0u8; 12];
        c.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200", "connection {i}");
        peak = peak.max(status_kib(pid, "VmRSS:").unwrap());
    }
    drop(conns);

    // A 1 MiB header: 431, not a 5xx.
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let st = raw_status(&addr, huge.as_bytes());
    assert!(st.is_none_or(|c| c == 431), "a huge header got {st:?}");
    // Deeply nested JSON: 400 bad_json.
    for body in [
        format!("{}{}", "[".repeat(20000), "]".repeat(20000)),
        format!(
            "{{\"command\": {}1{}}}",
            "{\"a\":".repeat(5000),
            "}".repeat(5000)
        ),
    ] {
        let (st, v) = s.call("POST", "/v1/tasks", Some(&body));
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (400, Some("bad_json")),
            "{v}"
        );
    }

    for t in slow {
        let (took, answer) = t.join().unwrap();
        assert!(
            !answer.starts_with("HTTP/1.1 2") && !answer.starts_with("HTTP/1.1 5"),
            "a slow client got {answer:?}"
        );
        assert!(
            took < Duration::from_secs(60),
            "a slow client was served for {took:?}"
        );
    }
    assert_eq!(raw_status(&addr, get.as_bytes()), Some(200));
    eprintln!("daemon RSS {base} KiB at start, {peak} KiB at most with 1000 connections");
    assert!(
        peak.saturating_sub(base) < 64 << 10,
        "1000 connections took {} KiB",
        peak - base
    );
    s.stop();
    h.assert_clean();
}

/// Property test of `POST /v1/tasks` against one daemon (proptest's
/// strategies, a deterministic runner): 400 bodies built from the
/// request's own field names with values of every JSON type (and an
/// unknown name) each get 201 or a 4xx with an error code, never a 5xx,
/// and the daemon answers afterwards (`--max-vms 0`: nothing boots).
#[test]
fn fuzzed_task_bodies_get_201_or_4xx_never_5xx() {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let h = Harness::new();
    let s = Server::start(&h, &["--max-vms", "0"]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        "\\PC{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("sh"),
            Just("echo"),
            Just("open"),
            Just("none"),
            Just("allowlist"),
            Just("10.0.0.0/8"),
            Just("x.example"),
            Just("http://198.51.100.1/r.git")
        ]
        .prop_map(|s| json!(s)),
    ];
    let value = leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    let keys = [
        "command",
        "env",
        "vcpus",
        "memory_mib",
        "timeout_secs",
        "labels",
        "priority",
        "root",
        "workdir",
        "egress",
        "allow_hosts",
        "allow_cidrs",
        "repo",
        "pull_request",
        "prompt",
        "secret_env",
        "image",
        "nope",
    ];
    // Plausible values too, so that many bodies pass and the checks
    // behind the first ones are reached.
    let value = prop_oneof![
        value,
        (0u64..70).prop_map(|n| json!(n)),
        proptest::collection::vec("[a-z0-9 .=/-]{0,10}", 0..3).prop_map(|v| json!(v)),
        proptest::collection::btree_map("[A-Z_]{1,6}", "[a-z]{0,4}", 0..3).prop_map(|m| json!(m)),
    ];
    let command = prop_oneof![
        3 => proptest::collection::vec("[a-z0-9 -]{1,8}", 1..4).prop_map(|v| json!(v)),
        1 => value.clone(),
    ];
    let body = (
        command,
        proptest::collection::btree_map(proptest::sample::select(keys.to_vec()), value, 0..4),
    )
        .prop_map(|(c, m)| {
            let mut o: serde_json::Map<String, Value> =
                m.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            o.entry("command").or_insert(c);
            Value::Object(o)
        });
    let mut runner = TestRunner::deterministic();
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..400 {
        let b = body.new_tree(&mut runner).unwrap().current();
        let (st, v) = s.call("POST", "/v1/tasks", Some(&b.to_string()));
        assert!(st == 201 || (400..500).contains(&st), "{st} for {b}: {v}");
        if st != 201 {
            assert!(v["error"]["code"].is_string(), "{st} for {b}: {v}");
        }
        *counts.entry(st).or_insert(0) += 1;
    }
    eprintln!("answers: {counts:?}");
    assert!(
        counts.get(&201).copied().unwrap_or(0) >= 20 && counts.len() >= 3,
        "too few kinds of answer to have reached the checks: {counts:?}"
    );
    assert_eq!(s.call("GET", "/healthz", None).0, 200);
    s.stop();
    h.assert_clean();
}

/// Reads a task's event stream on a thread; returns the event lines.

#[test]
fn cancel_timeout_and_a_frozen_vm_end_in_the_right_state() {
    let h = Harness::new();
    let s = Server::start(
        &h,
        &[
            "--max-vms",
            "3",
            "--heartbeat-timeout",
            "3",
            "--cancel-grace",
            "2",
        ],
    );
    let x = s.submit(json!({"command": ["sh", "-c", "trap 'echo got TERM; exit 143' TERM; echo started; while :; do sleep 0.2; done"]}));
    let y = s.submit(json!({"command": ["sleep", "60"], "timeout_secs": 2}));
    let z = s.submit(json!({"command": ["sleep", "60"]}));
    let events = s.event_lines(&x, "");
    s.wait_state(&x, |st| st == "running", Duration::from_secs(60));
    wait_until("x's first output", Duration::from_secs(20), || {
        s.logs(&x).contains("started")
    });
    let (st, _) = s.call("DELETE", &format!("/v1/tasks/{x}"), None);
    assert_eq!(st, 202);
    let tz = s.wait_state(&z, |st| st == "running", Duration::from_secs(60));
    // Freeze z's VM: its heartbeats stop.
    let vm = tz["vm_id"].as_str().unwrap();
    let run_dir = h.runs_dir().join(vm);
    let qemu: Vec<u32> = processes_mentioning(&run_dir)
        .into_iter()
        .filter(|(_, c)| c.contains("qemu-system"))
        .map(|(p, _)| p)
        .collect();
    assert_eq!(qemu.len(), 1, "z's QEMU");
    signal(qemu[0], nix::sys::signal::Signal::SIGSTOP);

    let tx = s.wait_terminal(&x);
    assert_eq!(
        (tx["state"].as_str(), tx["reason"].as_str()),
        (Some("cancelled"), Some("cancelled")),
        "{tx}"
    );
    assert!(
        s.logs(&x).contains("got TERM"),
        "SIGTERM first: {}",
        s.logs(&x)
    );
    let ty = s.wait_terminal(&y);
    assert_eq!(
        (ty["state"].as_str(), ty["reason"].as_str()),
        (Some("timed_out"), Some("timeout")),
        "{ty}"
    );
    let tz = s.wait_terminal(&z);
    assert_eq!(
        (tz["state"].as_str(), tz["reason"].as_str()),
        (Some("failed"), Some("heartbeat_lost")),
        "{tz}"
    );
    for t in [&tx, &ty] {
        assert_eq!(t["cleanup"], "ok", "{t}");
    }
    // The frozen VM cannot answer QMP: the record says the graceful stop
    // failed (it was then killed; assert_clean below checks it is gone).
    assert!(
        tz["cleanup"]
            .as_str()
            .is_some_and(|c| c.starts_with("graceful stop: ")),
        "{tz}"
    );
    // The event stream showed the states as they happened, ending terminal.
    let ev = events.join().unwrap();
    let states: Vec<String> = ev
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(&l[6..]).ok())
        .filter(|v| v["type"] == "state")
        .map(|v| v["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        states.last().map(|s| s.as_str()),
        Some("cancelled"),
        "{ev:?}"
    );
    assert!(states.contains(&"running".to_string()), "{ev:?}");
    assert!(
        ev.iter()
            .any(|l| l.contains("\"type\":\"output\"") && l.contains("started")),
        "{ev:?}"
    );
    s.stop();
    h.assert_clean();
}

/// One daemon per state dir (a second is refused before it listens, and the
/// first goes on serving); SIGTERM cancels the running task and tears its
/// VM down before the daemon exits 0, the queued task stays queued, and the
/// next daemon (the lock now free) runs it.
#[test]
fn sigterm_cancels_running_tasks_and_one_daemon_holds_the_state_dir() {
    let h = Harness::new();
    let mut s = Server::start(&h, &["--max-vms", "1"]);
    let second = h
        .cmd()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(125), "{}", text(&second.stderr));
    assert!(
        text(&second.stderr).contains("another `dough serve` is running on"),
        "{}",
        text(&second.stderr)
    );
    let a = s.submit(json!({"command": ["sh", "-c", "echo started; exec sleep 600"]}));
    let b = s.submit(json!({"command": ["echo", "after restart"]}));
    s.wait_state(&a, |st| st == "running", Duration::from_secs(60));
    wait_until("A's output", Duration::from_secs(60), || {
        s.logs(&a).contains("started")
    });
    assert_eq!(s.task(&b)["state"], "queued");
    signal(s.child.id(), nix::sys::signal::Signal::SIGTERM);
    let st = s.child.wait().unwrap();
    assert!(st.success(), "serve exits 0 after SIGTERM: {st}");
    drop(s);
    // Its VM went before it exited: nothing of it is left.
    h.assert_clean();

    let s = Server::start(&h, &["--max-vms", "1"]);
    let ta = s.task(&a);
    assert_eq!(
        (
            ta["state"].as_str(),
            ta["reason"].as_str(),
            ta["cleanup"].as_str()
        ),
        (Some("cancelled"), Some("cancelled"), Some("ok")),
        "{ta}"
    );
    let tb = s.wait_terminal(&b);
    assert_eq!(tb["state"], "succeeded", "{tb}");
    assert_eq!(s.logs(&b), "after restart\n");
    s.stop();
    h.assert_clean();
}

#[test]
fn a_killed_daemon_is_recovered_on_restart() {
    let h = Harness::new();
    let mut s = Server::start(&h, &["--max-vms", "2"]);
    let a = s.submit(json!({"command": ["sleep", "60"]}));
    let b = s.submit(json!({"command": ["sleep", "60"]}));
    let c = s.submit(json!({"command": ["echo", "after restart"]}));
    s.wait_state(&a, |st| st == "running", Duration::from_secs(60));
    s.wait_state(&b, |st| st == "running", Duration::from_secs(60));
    assert_eq!(s.task(&c)["state"], "queued");
    signal(s.child.id(), nix::sys::signal::Signal::SIGKILL);
    s.child.wait().unwrap();
    drop(s);

    let s = Server::start(&h, &["--max-vms", "2"]);
    for id in [&a, &b] {
        let t = s.task(id);
        assert_eq!(
            (t["state"].as_str(), t["reason"].as_str()),
            (Some("failed"), Some("orchestrator_restart")),
            "{t}"
        );
        assert!(
            t["cleanup"].as_str().unwrap().starts_with("reclaimed"),
            "{t}"
        );
    }
    let tc = s.wait_terminal(&c);
    assert_eq!(tc["state"], "succeeded", "{tc}");
    assert_eq!(s.logs(&c), "after restart\n");
    // Only the new daemon remains: no VM process, run dir, namespace or lease
    // of the old one.
    s.stop();
    h.assert_clean();
}

/// A tmpfs of its own over a directory; unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn over(dir: &std::path::Path, size: &str) -> Tmpfs {
        nix::mount::mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size},mode=0700").as_str()),
        )
        .unwrap();
        Tmpfs(dir.to_path_buf())
    }

    /// Fill it to the last page with a ballast file; its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::os::fd::AsRawFd;
        let path = self.0.join("ballast");
        let f = std::fs::File::create(&path).unwrap();
        let st = nix::sys::statvfs::statvfs(&self.0).unwrap();
        let (mut len, mut chunk) = (0i64, (st.blocks_available() * st.fragment_size()) as i64);
        while chunk >= 4096 {
            if nix::fcntl::posix_fallocate(f.as_raw_fd(), len, chunk).is_ok() {
                len += chunk;
            } else {
                chunk /= 2;
            }
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The daemon's state directory full (a tmpfs of its own, filled by a
/// ballast file): submissions get 507 `state_full` with a message that
/// says what to do — never another 5xx, never a panic — while reads go on
/// being answered; once there is room, submissions are accepted again.
/// (SQLite writes into its log's spare room first, so the refusal comes
/// after some submissions: the test submits until it sees one.)
#[test]
fn a_full_state_dir_refuses_submissions_with_507_until_there_is_room() {
    let h = Harness::new();
    let fs = Tmpfs::over(h.state.path(), "64m");
    let s = Server::start(&h, &["--max-vms", "0"]);
    let body = json!({"command": ["echo", "hi"]}).to_string();
    let first = s.submit(json!({"command": ["true"]}));
    let ballast = fs.fill();
    let mut refused = None;
    for i in 0..5000 {
        let (st, v) = s.call("POST", "/v1/tasks", Some(&body));
        match st {
            201 => continue,
            507 => {
                refused = Some((i, v));
                break;
            }
            _ => panic!("submission {i} with the state dir full: {st} {v}"),
        }
    }
    let (n, v) = refused.expect("5000 submissions accepted with the state dir full");
    eprintln!("refused after {n} accepted: {v}");
    assert_eq!(code(&v), "state_full", "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("state directory is full"), "{msg}");
    // Reads are answered.
    assert_eq!(s.task(&first)["state"], "queued");
    let (st, _) = s.call("GET", "/v1/tasks", None);
    assert_eq!(st, 200);
    // Room again: accepted.
    std::fs::remove_file(ballast).unwrap();
    let again = s.submit(json!({"command": ["true"]}));
    assert_eq!(s.task(&again)["state"], "queued");
    s.stop();
}

/// The state directory on an ext4 file system of its own (a loop device),
/// frozen (`fsfreeze`, FIFREEZE) and thawed on demand; thawed and
/// unmounted when dropped.
struct Freezable {
    dir: std::path::PathBuf,
    _image: tempfile::NamedTempFile,
}

impl Freezable {
    fn over(dir: &std::path::Path) -> Freezable {
        let image = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
        image.as_file().set_len(2 << 30).unwrap();
        let run = |args: &[&str]| {
            let o = std::process::Command::new(args[0])
                .args(&args[1..])
                .output()
                .unwrap();
            assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
        };
        let img = image.path().to_str().unwrap();
        run(&["mkfs.ext4", "-q", "-F", img]);
        run(&["mount", "-o", "loop", img, dir.to_str().unwrap()]);
        Freezable {
            dir: dir.to_path_buf(),
            _image: image,
        }
    }

    fn freeze(&self, on: bool) {
        let o = std::process::Command::new("fsfreeze")
            .arg(if on { "-f" } else { "-u" })
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(o.status.success() || !on, "fsfreeze: {}", text(&o.stderr));
    }
}

impl Drop for Freezable {
    fn drop(&mut self) {
        self.freeze(false);
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
    }
}

/// A store that stalls does not fail a task (issue 18): the daemon's state
/// directory — its SQLite store, and the run directories — is frozen for
/// 20 s (4 heartbeat limits) while a task prints, as a slow or
/// snapshotting disk would stall it. Every write to it blocks, the
/// store's output writes first; the guest is slowed (its output queue
/// fills, the host stops reading) and its silence meanwhile is not held
/// against it. After the thaw the task succeeds with every line stored in
/// order. The test sends the daemon nothing while frozen (its reads wait
/// for the store too). The task prints for at least 20 s of its own time,
/// so the freeze lands while it prints.
#[test]
fn a_stalled_store_slows_the_guest_and_fails_nothing() {
    let h = Harness::new();
    let fs = Freezable::over(h.state.path());
    let s = Server::start(&h, &[]);
    let pid = s.child.id();
    let script = "echo first; i=0; while [ $i -lt 200 ]; do seq $((i*1000+1)) $((i*1000+1000)); i=$((i+1)); sleep 0.1; done";
    let id = s.submit(json!({"command": ["sh", "-c", script]}));
    wait_until("the first line", Duration::from_secs(120), || {
        s.logs(&id).starts_with("first\n")
    });
    fs.freeze(true);
    std::thread::sleep(Duration::from_secs(20));
    fs.freeze(false);
    let t = s.wait_state(
        &id,
        |st| matches!(st, "succeeded" | "failed" | "cancelled" | "timed_out"),
        Duration::from_secs(300),
    );
    assert_eq!(t["state"], "succeeded", "{t}");
    let want: String = std::iter::once("first".to_string())
        .chain((1..=200_000).map(|n| n.to_string()))
        .map(|l| l + "\n")
        .collect();
    let got = s.logs(&id);
    assert!(got == want, "{} bytes stored of {}", got.len(), want.len());
    eprintln!("daemon peak RSS {} KiB", status_kib(pid, "VmHWM:").unwrap());
    s.stop();
    drop(fs);
}

/// A daemon is a node: `GET /v1/nodes` and `dough nodes` show its name,
/// state, capacity (from its flags), use and a heartbeat that advances
/// every second; after a clean stop it is recorded `stopped`, and the next
/// daemon on the same store appears beside it. A bad `--node-name` is
/// refused before anything starts.
#[test]
fn nodes_show_capacity_use_and_a_live_heartbeat() {
    let h = Harness::new();
    let bad = h
        .cmd()
        .args(["serve", "--listen", "127.0.0.1:0", "--node-name", "a b"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(125), "{}", text(&bad.stderr));
    assert!(text(&bad.stderr).contains("--node-name \"a b\": give 1 to 64 characters, no spaces"));
    let s = Server::start(
        &h,
        &[
            "--max-vms",
            "3",
            "--node-name",
            "n1",
            "--memory-limit",
            "4096",
        ],
    );
    let (st, v) = s.call("GET", "/v1/nodes", None);
    assert_eq!(st, 200, "{v}");
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{v}");
    let n = &nodes[0];
    assert_eq!(n["name"], "n1");
    assert_eq!(n["state"], "up");
    assert_eq!(n["capacity"]["vms"], 3);
    assert_eq!(n["capacity"]["memory_mib"], 4096);
    assert!(
        n["capacity"]["images"]
            .as_array()
            .unwrap()
            .contains(&json!("default")),
        "{n}"
    );
    assert_eq!(n["use"]["vms"], 0);
    let first = n["heartbeat_ms"].as_u64().unwrap();
    assert!(first <= v["now_ms"].as_u64().unwrap());
    wait_until("a second heartbeat", Duration::from_secs(30), || {
        s.call("GET", "/v1/nodes", None).1["nodes"][0]["heartbeat_ms"]
            .as_u64()
            .unwrap()
            > first
    });
    let out = h.cmd().arg("nodes").output().unwrap();
    let so = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut lines = so.lines();
    let head: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        head,
        [
            "NODE",
            "STATE",
            "VMS",
            "VCPUS",
            "MEM_MIB",
            "HEARTBEAT",
            "POOLS",
            "IMAGES"
        ]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..3], ["n1", "up", "0/3"], "{so}");
    assert_eq!(row[4], "0/4096", "{so}");
    s.stop();
    let s2 = Server::start(&h, &["--max-vms", "0", "--node-name", "n2"]);
    let v = s2.call("GET", "/v1/nodes", None).1;
    let states: Vec<(String, String)> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().into(),
                n["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("n1".to_string(), "stopped".to_string()),
            ("n2".into(), "up".into())
        ]
    );
    s2.stop();
}
