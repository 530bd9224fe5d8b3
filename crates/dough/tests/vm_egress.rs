//! The egress record and the provenance statement with real VMs: `dough
//! serve` runs in a test-made "host" namespace whose uplink leads to a
//! test-made "internet" namespace (web servers on public and private
//! addresses, a DNS server); the record is taken from the VMs' namespaces'
//! conntrack and NFLOG and from Dough's DNS forwarder. Nothing here touches
//! the machine's own network.
mod common;
#[path = "../../dough-net/tests/world/mod.rs"]
mod world;

use std::process::Command;

use base64::Engine;
use common::server::Server;
use common::*;
use serde_json::{json, Value};
use world::*;

const CONNECTIONS: u32 = 10_000;

/// The guest of the first task: a named host reached, a private address
/// tried, then `CONNECTIONS` connections to as many ports (refused by the
/// server: each is a connection begun and reset at once).
fn open_script() -> String {
    format!(
        r#"
curl -sS -m 10 -o /dev/null -w 'web %{{http_code}}\n' http://{ALLOWED_NAME}/
curl -sS -m 5 -o /dev/null http://{private}/ 2>/dev/null; echo "private rc=$?"
n=0
for p in $(seq 20000 $((20000 + {CONNECTIONS} - 1))); do
  : 2>/dev/null 3<>/dev/tcp/{ALLOWED_WEB}/$p
  n=$((n + 1))
done
echo "tried $n"
"#,
        private = PRIVATE_SERVERS[0],
    )
}

const ALLOWLIST_SCRIPT: &str = r#"
curl -sS -m 10 -o /dev/null -w 'web %{http_code}\n' http://allowed.example/
getent hosts other.example >/dev/null; echo "other resolves: $?"
"#;

fn serve(h: &Harness, w: &World) -> Server {
    Server::start_in(
        h,
        Some(&w.host),
        &[("DOUGH_DNS", &DNS.to_string()), ("DOUGH_HOST_NAT", "0")],
        &[],
        None,
    )
}

fn record(s: &Server, id: &str) -> Value {
    let (st, v) = s.call("GET", &format!("/v1/tasks/{id}/egress"), None);
    assert_eq!(st, 200, "{v}");
    v
}

fn flows<'a>(rec: &'a Value, pred: impl Fn(&Value) -> bool + 'a) -> Vec<&'a Value> {
    rec["flows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| pred(f))
        .collect()
}

/// `dough verify FILE` with the daemon's keys: (exit code, stdout+stderr).
fn verify(h: &Harness, s: &Server, file: &std::path::Path) -> (i32, String) {
    let mut c: Command = h.cmd();
    c.env("DOUGH_URL", &s.url).env("DOUGH_TOKEN", &s.token);
    enter_netns(&mut c, s.netns.as_deref().unwrap());
    let out = c.arg("verify").arg(file).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

#[test]
fn a_tasks_network_is_recorded_bounded_signed_and_kept() {
    let h = Harness::new();
    let w = World::new("e");
    let s = serve(&h, &w);
    let open = s.submit(json!({"command": ["bash", "-c", open_script()], "timeout_secs": 600}));
    let allow = s.submit(json!({
        "command": ["bash", "-c", ALLOWLIST_SCRIPT],
        "allow_hosts": [ALLOWED_NAME],
    }));
    for id in [&open, &allow] {
        let t = s.wait_state(
            id,
            |st| matches!(st, "succeeded" | "failed" | "cancelled" | "timed_out"),
            std::time::Duration::from_secs(900),
        );
        assert_eq!(t["state"], "succeeded", "{t}\n{}", s.logs(id));
    }
    let out = s.logs(&open);
    assert!(out.contains("web 200\n"), "{out}");
    assert!(out.contains("private rc=7\n"), "{out}");
    assert!(out.contains(&format!("tried {CONNECTIONS}\n")), "{out}");

    // The open task: the named host reached with its bytes, the private
    // address blocked by its rule, and the 10 000 connections within the
    // bound, the rest counted.
    let rec = record(&s, &open);
    assert_eq!(rec["policy"], "open");
    let web = flows(&rec, |f| {
        f["addr"] == ALLOWED_WEB.to_string() && f["port"] == 80 && f["verdict"] == "allowed"
    });
    assert_eq!(web.len(), 1, "{:#}", rec["flows"][0]);
    assert_eq!(web[0]["name"], ALLOWED_NAME);
    assert_eq!(web[0]["count"], 1);
    assert!(web[0]["bytes_out"].as_u64().unwrap() > 100, "{}", web[0]);
    assert!(web[0]["bytes_in"].as_u64().unwrap() > 100, "{}", web[0]);
    let private = flows(&rec, |f| f["addr"] == PRIVATE_SERVERS[0].to_string());
    assert_eq!(private.len(), 1, "{private:?}");
    assert_eq!(
        (
            &private[0]["verdict"],
            &private[0]["rule"],
            &private[0]["port"]
        ),
        (&json!("blocked"), &json!("private4"), &json!(80))
    );
    let dns = rec["dns"].as_array().unwrap();
    let asked = dns
        .iter()
        .find(|q| q["name"] == ALLOWED_NAME && q["type"] == "A")
        .unwrap_or_else(|| panic!("{dns:?}"));
    assert_eq!(asked["answers"], json!([ALLOWED_WEB.to_string()]));
    let kept = rec["flows"].as_array().unwrap().len();
    assert_eq!(kept, dough_net::record::MAX_FLOWS, "the record is full");
    let ranged: u64 = flows(&rec, |f| {
        f["port"].as_u64().is_some_and(|p| p >= 20000) && f["addr"] == ALLOWED_WEB.to_string()
    })
    .iter()
    .map(|f| f["count"].as_u64().unwrap())
    .sum();
    assert_eq!(rec["lost_events"], 0, "the socket kept up");
    assert_eq!(
        ranged + rec["overflow"]["flows"].as_u64().unwrap(),
        CONNECTIONS as u64,
        "every connection itemised or counted"
    );
    let size = rec.to_string().len();
    eprintln!(
        "record of a task with {CONNECTIONS} connections: {size} bytes, {kept} destinations kept"
    );
    assert!(size < 512 << 10, "{size} bytes");

    // The allowlist task: the allowed name's answer, the refused name.
    let rec2 = record(&s, &allow);
    assert_eq!(rec2["policy"], "allowlist");
    let dns = rec2["dns"].as_array().unwrap();
    assert!(dns.iter().any(|q| q["name"] == ALLOWED_NAME
        && q["allowed"] == true
        && q["answers"] == json!([ALLOWED_WEB.to_string()])));
    assert!(
        dns.iter()
            .any(|q| q["name"] == "other.example" && q["allowed"] == false),
        "{dns:?}"
    );

    // The CLI shows it.
    let mut c: Command = h.cmd();
    c.env("DOUGH_URL", &s.url).env("DOUGH_TOKEN", &s.token);
    enter_netns(&mut c, &w.host);
    let shown = c.args(["egress", &allow]).output().unwrap();
    let so = text(&shown.stdout);
    assert!(shown.status.success(), "{so}{}", text(&shown.stderr));
    assert!(so.contains("reached 1 host, 1 DNS name refused"), "{so}");
    assert!(so.contains("other.example"), "{so}");

    // Metrics: the records summed.
    let m = s.text("/metrics");
    let metric = |name: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in\n{m}"))
            .parse()
            .unwrap()
    };
    assert_eq!(metric("dough_egress_records_total"), 2);
    assert!(
        metric("dough_egress_connections_total{verdict=\"allowed\"}")
            + metric("dough_egress_overflow_total")
            >= CONNECTIONS as u64
    );
    assert!(metric("dough_egress_connections_total{verdict=\"blocked\"}") >= 1);
    assert!(metric("dough_egress_dns_questions_total{verdict=\"refused\"}") >= 1);

    // Provenance: the statement verifies; one changed byte and it does not.
    let (st, env) = s.call("GET", &format!("/v1/tasks/{allow}/provenance"), None);
    assert_eq!(st, 200, "{env}");
    let b64 = base64::engine::general_purpose::STANDARD;
    let statement: Value =
        serde_json::from_slice(&b64.decode(env["payload"].as_str().unwrap()).unwrap()).unwrap();
    let pred = &statement["predicate"];
    assert_eq!(
        pred["runDetails"]["metadata"]["invocationId"],
        allow.as_str()
    );
    assert_eq!(
        pred["buildDefinition"]["externalParameters"]["egressPolicy"]["hosts"],
        json!([ALLOWED_NAME])
    );
    let logs = s.logs(&allow);
    assert_eq!(
        statement["subject"][0]["digest"]["sha256"],
        dough_core::provenance::sha256_hex(logs.as_bytes()),
        "the subject is the task's output"
    );
    let image = s.task(&allow)["image_digest"].clone();
    let deps = pred["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .unwrap();
    assert_eq!(deps[0]["digest"]["sha256"], image, "{deps:?}");
    assert!(deps.iter().any(|d| d["name"] == "kernel"), "{deps:?}");
    let file = h.state.path().join("allow.json");
    std::fs::write(&file, env.to_string()).unwrap();
    let (code, said) = verify(&h, &s, &file);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains(&format!("verified: task {allow}")), "{said}");
    let forged = statement
        .to_string()
        .replace("allowed.example", "allowed.exampl3");
    assert_ne!(forged, statement.to_string());
    let mut env2 = env.clone();
    env2["payload"] = json!(b64.encode(forged));
    std::fs::write(&file, env2.to_string()).unwrap();
    let (code, said) = verify(&h, &s, &file);
    assert_eq!(code, 1, "{said}");
    assert!(said.contains("NOT VERIFIED"), "{said}");

    // A restart keeps records, statements and the key.
    let keys = s.call("GET", "/v1/keys", None).1;
    s.stop();
    let s = serve(&h, &w);
    assert_eq!(record(&s, &open), rec);
    assert_eq!(s.call("GET", "/v1/keys", None).1, keys);
    std::fs::write(&file, env.to_string()).unwrap();
    assert_eq!(verify(&h, &s, &file).0, 0);

    // Deleted with its task.
    let (st, v) = s.call("DELETE", &format!("/v1/tasks/{open}?purge=true"), None);
    assert_eq!(st, 204, "{v}");
    let (st, v) = s.call("GET", &format!("/v1/tasks/{open}/egress"), None);
    assert_eq!((st, &v["error"]["code"]), (404, &json!("no_such_task")));
    assert_eq!(record(&s, &allow), rec2, "the other task keeps its record");
    s.stop();
    h.assert_clean();
}
