//! Many `dough serve` nodes on one PostgreSQL store: real daemons, each
//! in a network namespace of its own with its own state directory and slot
//! pool, linked to a hub namespace where a real PostgreSQL server (Debian's,
//! a cluster of the test's own) runs; real VMs; real nftables for the cut
//! (a table in the node's namespace). Nothing of this machine's own network
//! is touched: the test calls each node's API inside its namespace.
mod common;
mod gitserver;
#[path = "../../dough-net/tests/world/mod.rs"]
mod world;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::pg::Postgres;
use common::server::Server;
use common::*;
use serde_json::{json, Value};

/// `--node-timeout` of the tests' nodes (their lease: 4 s).
const NODE_TIMEOUT: u64 = 6;

/// The hub and the nodes' namespaces, made before the database (which
/// listens on the hub's end of their links).
fn nets(n: usize) -> (Hub, Vec<LinkedNs>) {
    let hub = Hub::new();
    let nets = (0..n).map(|_| LinkedNs::new(&hub)).collect();
    (hub, nets)
}

/// The database's addresses: loopback, and this end of each link.
fn db_addrs(nets: &[LinkedNs]) -> Vec<&str> {
    std::iter::once("127.0.0.1")
        .chain(nets.iter().map(|n| n.outer.as_str()))
        .collect()
}

struct Node {
    server: Option<Server>,
    h: Harness,
    name: String,
    args: Vec<String>,
    log: PathBuf,
    /// Its namespace, and the slot pool of its VMs.
    netns: String,
    pool: String,
    /// More of its environment (credentials).
    envs: Vec<(String, String)>,
}

impl Drop for Node {
    /// The daemon goes before its namespace.
    fn drop(&mut self) {
        self.server.take();
    }
}

impl Node {
    /// Node `name` in namespace `net`, on database `db` of `pg` (reached
    /// through its link), holding up to `max_vms` VMs, with the cluster's
    /// API token.
    fn start(
        name: &str,
        net: &LinkedNs,
        pg: &Postgres,
        db: &str,
        max_vms: u32,
        token: &str,
    ) -> Node {
        Self::new(name, net, pg, db, max_vms, token, &[]).started()
    }

    /// As [`Node::start`], with `more` arguments, not started yet.
    fn new(
        name: &str,
        net: &LinkedNs,
        pg: &Postgres,
        db: &str,
        max_vms: u32,
        token: &str,
        more: &[&str],
    ) -> Node {
        let h = Harness::new();
        std::fs::write(h.state.path().join("api-token"), token).unwrap();
        let log = h.state.path().join("serve.log");
        let store = pg.url_via(db, &net.outer);
        Node {
            name: name.into(),
            envs: vec![],
            netns: net.name.clone(),
            pool: format!("10.214.{}.0/24", net.k),
            args: [
                "--store",
                &store,
                "--node-name",
                name,
                "--node-timeout",
                &NODE_TIMEOUT.to_string(),
                "--max-vms",
                &max_vms.to_string(),
                "--cancel-grace",
                "2",
            ]
            .map(String::from)
            .into_iter()
            .chain(more.iter().map(|a| a.to_string()))
            .collect(),
            log,
            h,
            server: None,
        }
    }

    fn started(mut self) -> Node {
        self.restart();
        self
    }

    fn restart(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let mut envs = vec![("DOUGH_SLOT_POOL", self.pool.as_str())];
        envs.extend(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.server = Some(Server::start_in(
            &self.h,
            Some(&self.netns),
            &envs,
            &args,
            Some(&self.log),
        ));
    }

    fn s(&self) -> &Server {
        self.server.as_ref().expect("running")
    }

    fn kill9(&mut self) {
        let mut s = self.server.take().expect("running");
        s.child.kill().unwrap();
        s.child.wait().unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn token() -> String {
    format!("cluster-test-token-{}", std::process::id())
}

/// The nodes as the API lists them: name → state.
fn node_states(s: &Server) -> Vec<(String, String)> {
    let (st, v) = s.call("GET", "/v1/nodes", None);
    assert_eq!(st, 200, "{v}");
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_string(),
                n["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn state_of(nodes: &[(String, String)], name: &str) -> String {
    nodes
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, s)| s.clone())
        .unwrap_or_default()
}

/// The task's states, in order.
fn states(t: &Value) -> Vec<String> {
    t["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["state"].as_str().unwrap().to_string())
        .collect()
}

/// Wait until the task's stored output holds `what`.
fn wait_output(s: &Server, id: &str, what: &str) {
    let t0 = Instant::now();
    while !s.logs(id).contains(what) {
        let t = s.task(id);
        assert!(
            t0.elapsed() < Duration::from_secs(120)
                && !matches!(
                    t["state"].as_str(),
                    Some("succeeded" | "failed" | "cancelled" | "timed_out")
                ),
            "task {id} never printed {what:?}: {t}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn tasks_spread_over_the_nodes_within_their_capacity_and_any_node_serves_them() {
    let (hub, net) = nets(3);
    let pg = Postgres::start_in(&hub, &db_addrs(&net));
    let token = token();
    let n1 = Node::start("n1", &net[0], &pg, "spread", 1, &token);
    let n2 = Node::start("n2", &net[1], &pg, "spread", 1, &token);
    // Queue-only: it takes no task, and serves every one; its own limits
    // (256 MiB) are not what a task is checked against, the cluster's are.
    let n3 = Node::new(
        "n3",
        &net[2],
        &pg,
        "spread",
        0,
        &token,
        &["--memory-limit", "256"],
    )
    .started();
    let front = n3.s();
    // What no node can ever run is refused; an image no node has too.
    let (st, v) = front.call(
        "POST",
        "/v1/tasks",
        Some(&json!({"command": ["true"], "vcpus": 64}).to_string()),
    );
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (422, Some("impossible")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no node of the cluster"),
        "{v}"
    );
    let (st, v) = front.call(
        "POST",
        "/v1/tasks",
        Some(&json!({"command": ["true"], "image": "nope"}).to_string()),
    );
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("invalid")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("they have: default"),
        "{v}"
    );
    let ids: Vec<String> = (0..4)
        .map(|i| {
            front.submit(json!({
                "command": ["sh", "-c", "echo hi-$N; sleep 3"],
                "env": {"N": i.to_string()},
                "egress": "none",
            }))
        })
        .collect();
    // Followed from the start through a node that does not run it.
    let events = front.event_lines(&ids[0], "?offset=0");
    let mut used: Vec<(String, u64, u64)> = vec![];
    for (i, id) in ids.iter().enumerate() {
        let t = front.wait_terminal(id);
        assert_eq!(t["state"], "succeeded", "{t}");
        assert_eq!(front.logs(id), format!("hi-{i}\n"));
        // Claimed once.
        assert_eq!(
            states(&t),
            [
                "queued",
                "provisioning",
                "booting",
                "running",
                "finalizing",
                "succeeded"
            ],
            "{t}"
        );
        let node = t["node"].as_str().unwrap().to_string();
        let at = |k: usize| t["transitions"][k]["at_ms"].as_u64().unwrap();
        used.push((node, at(1), at(5)));
    }
    let mut names: Vec<&str> = used.iter().map(|u| u.0.as_str()).collect();
    names.sort();
    names.dedup();
    // n3 holds no VM; each task of 3 s or more keeps its node full, so the
    // other node takes the next.
    assert_eq!(names, ["n1", "n2"], "{used:?}");
    // Within capacity: one VM at a time per node, so a node's tasks never
    // overlap (claim to end).
    for a in &used {
        for b in &used {
            if a != b && a.0 == b.0 {
                assert!(a.2 <= b.1 || b.2 <= a.1, "overlap on {}: {used:?}", a.0);
            }
        }
    }
    let ev: Vec<Value> = events
        .join()
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str(l.strip_prefix("data: ").unwrap()).unwrap())
        .collect();
    // From the state it had when the stream began (it may have been
    // claimed already: nodes are told of a task at once), every
    // transition after, in order, to the end (at least 3 s after).
    let seen: Vec<&str> = ev.iter().filter_map(|e| e["state"].as_str()).collect();
    let all = [
        "queued",
        "provisioning",
        "booting",
        "running",
        "finalizing",
        "succeeded",
    ];
    assert!(
        all.ends_with(&seen) && seen.len() >= 2,
        "{seen:?} is not how the task went on: {ev:?}"
    );
    let out: String = ev
        .iter()
        .filter(|e| e["type"] == "output")
        .map(|e| e["data"].as_str().unwrap())
        .collect();
    assert_eq!(out, "hi-0\n");
    // Every node sees every node, up.
    for n in [&n1, &n2, &n3] {
        let st = node_states(n.s());
        assert_eq!(
            st,
            [("n1", "up"), ("n2", "up"), ("n3", "up")].map(|(a, b)| (a.to_string(), b.to_string())),
            "as {} sees them",
            n.name
        );
    }
    // Metrics per node, from any node: n2 holds one VM slot, n3 none.
    let m = front.text("/metrics");
    for line in [
        "dough_node_up{node=\"n1\",state=\"up\"} 1",
        "dough_node_vms_capacity{node=\"n2\"} 1",
        "dough_node_vms_capacity{node=\"n3\"} 0",
        "dough_tasks{state=\"succeeded\"} 4",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} not in:\n{m}");
    }
    // A second daemon under a live node's name is refused (started next
    // to n3, in its namespace).
    let dup = Harness::new();
    let mut c = dup.cmd();
    enter_netns(&mut c, &net[2].name);
    let out = c
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            &pg.url_via("spread", &net[2].outer),
            "--node-name",
            "n1",
        ])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("holds the node name \"n1\""),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_killed_node_is_declared_dead_its_task_ends_node_lost_and_cancels_cross_nodes() {
    let (hub, net) = nets(3);
    let pg = Postgres::start_in(&hub, &db_addrs(&net));
    let token = token();
    let mut n1 = Node::start("n1", &net[0], &pg, "kill", 1, &token);
    let mut n2 = Node::start("n2", &net[1], &pg, "kill", 1, &token);
    let n3 = Node::start("n3", &net[2], &pg, "kill", 0, &token);
    let front = n3.s();
    let a = front.submit(
        json!({"command": ["sh", "-c", "echo a-started; exec sleep 600"], "egress": "none"}),
    );
    wait_output(front, &a, "a-started");
    let owner = front.task(&a)["node"].as_str().unwrap().to_string();
    let b = front.submit(
        json!({"command": ["sh", "-c", "echo b-started; exec sleep 600"], "egress": "none"}),
    );
    wait_output(front, &b, "b-started");
    let other = front.task(&b)["node"].as_str().unwrap().to_string();
    assert_ne!(owner, other, "one VM per node");

    // A cancel through a node that does not run the task reaches its owner.
    let t0 = Instant::now();
    let (st, v) = front.call("DELETE", &format!("/v1/tasks/{b}"), None);
    assert_eq!(st, 202, "{v}");
    let t = front.wait_terminal(&b);
    assert_eq!(t["state"], "cancelled", "{t}");
    eprintln!("cancel through another node: {:?}", t0.elapsed());

    // kill -9 of the owner of a: a peer declares it dead after the
    // timeout, and a fails node_lost.
    let (victim, survivor) = if owner == "n1" {
        (&mut n1, &mut n2)
    } else {
        (&mut n2, &mut n1)
    };
    let t0 = Instant::now();
    victim.kill9();
    let t = front.wait_state(&a, |s| s == "failed", Duration::from_secs(120));
    let settled = t0.elapsed();
    assert_eq!(t["reason"], "node_lost", "{t}");
    assert!(
        t["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("node {owner} ")),
        "{t}"
    );
    assert!(
        settled >= Duration::from_secs(NODE_TIMEOUT - 1),
        "declared dead before its timeout: {settled:?}"
    );
    eprintln!("kill -9 to node_lost: {settled:?} (timeout {NODE_TIMEOUT} s)");
    assert_eq!(
        states(&t),
        ["queued", "provisioning", "booting", "running", "failed"],
        "ran once: {t}"
    );
    assert_eq!(state_of(&node_states(front), &owner), "dead");
    let (st, v) = front.call("POST", &format!("/v1/nodes/{owner}/drain"), None);
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("node_state")),
        "{v}"
    );
    // New work goes to the node left.
    let c = front.submit(json!({"command": ["echo", "c"], "egress": "none"}));
    let t = front.wait_terminal(&c);
    assert_eq!(
        (t["state"].as_str(), t["node"].as_str()),
        (Some("succeeded"), Some(survivor.name.as_str())),
        "{t}"
    );

    // The dead node restarts under its name: its VM is gone (it died with
    // its daemon), and it is up again; a stays as the peer left it.
    assert!(qemu_pids(&victim.h).is_empty());
    let before = front.task(&a);
    victim.restart();
    wait_until("the restarted node up", Duration::from_secs(30), || {
        state_of(&node_states(front), &owner) == "up"
    });
    assert_eq!(front.task(&a), before);
}

/// A table of the test's own in a node's namespace that drops its
/// traffic to and from the database (this end of its link, `port`): the
/// node is cut off from it. Deleted on drop (the heal).
struct Cut<'a>(&'a LinkedNs);

impl<'a> Cut<'a> {
    fn new(net: &'a LinkedNs, port: u16) -> Cut<'a> {
        let addr = &net.outer;
        net.nft(&format!(
            "table inet dough_test_cut {{
                chain out {{
                    type filter hook output priority 0; policy accept;
                    ip daddr {addr} tcp dport {port} drop
                }}
                chain inp {{
                    type filter hook input priority 0; policy accept;
                    ip saddr {addr} tcp sport {port} drop
                }}
            }}"
        ));
        Cut(net)
    }
}

impl Drop for Cut<'_> {
    fn drop(&mut self) {
        self.0.nft("delete table inet dough_test_cut");
    }
}

#[test]
fn a_node_cut_off_from_the_database_stops_its_vms_and_writes_nothing_stale() {
    let (hub, net) = nets(2);
    let pg = Postgres::start_in(&hub, &db_addrs(&net));
    let token = token();
    // n1 is cut off (a table in its namespace); n2 holds no VM.
    let n1 = Node::start("n1", &net[0], &pg, "cut", 1, &token);
    let n2 = Node::start("n2", &net[1], &pg, "cut", 0, &token);
    let front = n2.s();
    let a = front.submit(json!({
        // Silent after its first lines: only the lease can stop it (a
        // task whose output cannot be stored is stopped for that).
        "command": ["sh", "-c", "echo line 1; echo line 2; echo line 3; exec sleep 600"],
        "egress": "none",
    }));
    wait_output(front, &a, "line 3\n");
    assert_eq!(front.task(&a)["node"], "n1");
    assert!(!qemu_pids(&n1.h).is_empty());

    let cut = Cut::new(&net[0], pg.port);
    let t0 = Instant::now();
    // n1 cannot write its heartbeat: once its lease lapses it stops its VM.
    wait_until("n1's VM stopped", Duration::from_secs(60), || {
        qemu_pids(&n1.h).is_empty()
    });
    eprintln!("cut to VM stopped: {:?}", t0.elapsed());
    // n2 declares n1 dead, and the task node_lost.
    let t = front.wait_state(&a, |s| s == "failed", Duration::from_secs(120));
    assert_eq!(t["reason"], "node_lost", "{t}");
    assert!(
        t["detail"]
            .as_str()
            .unwrap()
            .contains("n2 declared it dead"),
        "{t}"
    );
    eprintln!("cut to node_lost: {:?}", t0.elapsed());
    let before = front.task(&a);
    assert_eq!(state_of(&node_states(front), "n1"), "dead");

    // Healed: n1 finds it was declared dead, writes nothing for the task
    // (its late end is refused by the fence), and rejoins.
    drop(cut);
    wait_until(
        "n1's end of the task fenced",
        Duration::from_secs(60),
        || n1.log().contains("is no longer this node's"),
    );
    wait_until("n1 up again", Duration::from_secs(30), || {
        state_of(&node_states(front), "n1") == "up"
    });
    assert_eq!(front.task(&a), before, "nothing stale written");
    // And it takes work again.
    let b = front.submit(json!({"command": ["echo", "b"], "egress": "none"}));
    let t = front.wait_terminal(&b);
    assert_eq!(
        (t["state"].as_str(), t["node"].as_str()),
        (Some("succeeded"), Some("n1")),
        "{t}"
    );
}

#[test]
fn a_drained_node_finishes_its_tasks_and_takes_no_new_ones() {
    let (hub, net) = nets(2);
    let pg = Postgres::start_in(&hub, &db_addrs(&net));
    let token = token();
    let n1 = Node::start("n1", &net[0], &pg, "drain", 1, &token);
    let n2 = Node::start("n2", &net[1], &pg, "drain", 1, &token);
    let front = n1.s();
    // x, short, on one node; y, longer, on the other.
    let x = front.submit(json!({"command": ["sh", "-c", "echo x; sleep 2"], "egress": "none"}));
    wait_output(front, &x, "x\n");
    let y = front.submit(json!({"command": ["sh", "-c", "echo y; sleep 10"], "egress": "none"}));
    wait_output(front, &y, "y\n");
    let drained = front.task(&x)["node"].as_str().unwrap().to_string();
    let other = front.task(&y)["node"].as_str().unwrap().to_string();
    assert_ne!(drained, other);
    // Drained through the CLI, against either node's API (from the
    // namespace it listens in).
    let mut cli = n2.h.cmd();
    enter_netns(&mut cli, &net[0].name);
    let out = cli
        .args(["node", "drain", &drained])
        .env("DOUGH_URL", &front.url)
        .env("DOUGH_TOKEN", &token)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("{drained} draining")),
        "{}",
        text(&out.stdout)
    );
    // z is queued while x still runs: x finishes on the drained node (which
    // is then free long before y ends), yet z waits for the other node.
    let z = front.submit(json!({"command": ["echo", "z"], "egress": "none"}));
    let t = front.wait_terminal(&x);
    assert_eq!(t["state"], "succeeded", "{t}");
    let t = front.wait_terminal(&z);
    assert_eq!(
        (t["state"].as_str(), t["node"].as_str()),
        (Some("succeeded"), Some(other.as_str())),
        "{t}"
    );
    let t = front.wait_terminal(&y);
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(state_of(&node_states(front), &drained), "draining");
    // Draining again changes nothing; an unknown node is a clear error.
    let (st, v) = front.call("POST", &format!("/v1/nodes/{drained}/drain"), None);
    assert_eq!((st, v["state"].as_str()), (200, Some("draining")), "{v}");
    let (st, v) = front.call("POST", "/v1/nodes/nope/drain", None);
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("node_not_found")),
        "{v}"
    );
    // Taken back, it runs tasks again.
    let (st, v) = front.call("DELETE", &format!("/v1/nodes/{drained}/drain"), None);
    assert_eq!((st, v["state"].as_str()), (200, Some("up")), "{v}");
    let w = front.submit(json!({"command": ["sh", "-c", "echo w; sleep 5"], "egress": "none"}));
    wait_output(front, &w, "w\n");
    let v = front.submit(json!({"command": ["echo", "v"], "egress": "none"}));
    let tv = front.wait_terminal(&v);
    let tw = front.wait_terminal(&w);
    let mut used = [tv["node"].as_str().unwrap(), tw["node"].as_str().unwrap()];
    used.sort();
    assert_eq!(used, ["n1", "n2"], "{tv} {tw}");
}

#[test]
fn a_task_that_fits_a_warm_vm_goes_to_the_node_that_has_it() {
    let (hub, net) = nets(2);
    let pg = Postgres::start_in(&hub, &db_addrs(&net));
    let token = token();
    // a keeps one warm VM of the default shape (cold boots: no template
    // to make); b has none, and is the node the tasks are submitted to.
    // a's memory holds its warm VM and one more of 512 MiB, not 768.
    let a = Node::new(
        "a",
        &net[0],
        &pg,
        "warm",
        2,
        &token,
        &[
            "--pool-size",
            "1",
            "--no-pool-clones",
            "--memory-limit",
            "1024",
        ],
    )
    .started();
    let b = Node::start("b", &net[1], &pg, "warm", 1, &token);
    let front = b.s();
    wait_until("a's warm VM idle", Duration::from_secs(120), || {
        a.s().call("GET", "/v1/pools", None).1["pools"][0]["idle"] == 1
    });
    wait_until("a's idle VM on record", Duration::from_secs(30), || {
        let (_, v) = front.call("GET", "/v1/nodes", None);
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == "a" && n["use"]["idle"] == json!(["1x512"]))
    });
    // Submitted to b, which could run it (it has room) but has no warm VM.
    let id = front.submit(json!({"command": ["echo", "warm"], "egress": "none"}));
    let t = front.wait_terminal(&id);
    assert_eq!(
        (t["state"].as_str(), t["node"].as_str()),
        (Some("succeeded"), Some("a")),
        "{t}"
    );
    assert_eq!(front.logs(&id), "warm\n");
    assert_eq!(
        a.s().call("GET", "/v1/pools", None).1["pools"][0]["claimed"],
        1
    );
    // A shape nobody keeps warm (and a has no room for): b runs it.
    let id =
        front.submit(json!({"command": ["echo", "cold"], "memory_mib": 768, "egress": "none"}));
    let t = front.wait_terminal(&id);
    assert_eq!(
        (t["state"].as_str(), t["node"].as_str()),
        (Some("succeeded"), Some("b")),
        "{t}"
    );
}

/// No pull request twice, end to end: a repository task (real VM, a real
/// git smart-HTTP server and a forge stand-in on a "public" address of the
/// hub) whose node is cut off from the database while it pushes (the
/// server's hook holds the push). The peer declares the node dead and the
/// task `node_lost`; once the push is let through, the node finds its claim
/// lost before the pull request and opens none; the task never runs again.
/// A second task, on a node that stays, opens exactly one.
#[test]
fn a_node_cut_off_while_pushing_opens_no_pull_request_and_the_task_runs_once() {
    use gitserver::{ForgeDouble, GitServer, GIT_USER};
    let (hub, net) = nets(2);
    let git_addr = "198.51.100.20";
    hub.add_addr(git_addr);
    let git_token = format!("git-token-{}", std::process::id());
    let git = GitServer::start(&hub.name, 8000, &git_token);
    let forge = ForgeDouble::start(&hub.name, format!("{git_addr}:8080").parse().unwrap());
    git.make_repo("r", &[("README.md", "# r\n")]);
    // The push waits in the server's hook until the test lets it through.
    let (held, release) = (git.dir.path().join("held"), git.dir.path().join("release"));
    {
        use std::os::unix::fs::PermissionsExt;
        let hook = git.repo_path("r").join("hooks/pre-receive");
        std::fs::create_dir_all(hook.parent().unwrap()).unwrap();
        std::fs::write(
            &hook,
            format!(
                "#!/bin/sh\ncat >/dev/null\ntouch {}\nwhile [ ! -e {} ]; do sleep 0.1; done\n",
                held.display(),
                release.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let pg = Postgres::start_in(&hub, &db_addrs(&net));
    let token = token();
    let creds = [
        ("DOUGH_GIT_USER", GIT_USER.to_string()),
        ("DOUGH_GIT_TOKEN", git_token.clone()),
        ("DOUGH_FORGE_TOKEN", "forge-token".to_string()),
        ("DOUGH_DNS", format!("{git_addr}:53")),
    ];
    let with_creds = |mut n: Node| {
        n.envs = creds
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        n.started()
    };
    let n1 = with_creds(Node::new("n1", &net[0], &pg, "pr", 1, &token, &[]));
    let n2 = with_creds(Node::new("n2", &net[1], &pg, "pr", 0, &token, &[]));
    let front = n2.s();
    let task = |file: &str| {
        json!({
            "command": ["sh", "-c", format!("echo work > {file}")],
            "repo": {"url": format!("http://{git_addr}:8000/git/r.git")},
            "pull_request": {"forge": "gitea", "api": format!("http://{git_addr}:8080/api/v1")},
        })
    };
    let a = front.submit(task("a.txt"));
    wait_until(
        "a's push held by the server",
        Duration::from_secs(120),
        || held.exists(),
    );
    assert_eq!(front.task(&a)["node"], "n1");

    // Cut off while pushing: declared dead, the task node_lost.
    let cut = Cut::new(&net[0], pg.port);
    let t = front.wait_state(&a, |s| s == "failed", Duration::from_secs(120));
    assert_eq!(t["reason"], "node_lost", "{t}");
    // The push goes through now; then the claim check before the pull
    // request finds the claim lost.
    std::fs::write(&release, "").unwrap();
    wait_until("a's branch pushed", Duration::from_secs(60), || {
        git.branches("r")
            .iter()
            .any(|(b, _)| *b == format!("dough/{a}"))
    });
    let before = front.task(&a);
    drop(cut);
    wait_until(
        "n1's end of the task fenced",
        Duration::from_secs(60),
        || n1.log().contains("is no longer this node's"),
    );
    assert!(
        forge.taken().is_empty(),
        "a pull request was opened: {:?}",
        forge.taken()
    );
    assert_eq!(front.task(&a), before, "nothing stale written");
    assert_eq!(
        states(&before),
        [
            "queued",
            "provisioning",
            "booting",
            "running",
            "finalizing",
            "failed"
        ],
        "ran once: {before}"
    );

    // Healed, n1 rejoins; a task that ends there opens exactly one.
    wait_until("n1 up again", Duration::from_secs(30), || {
        state_of(&node_states(front), "n1") == "up"
    });
    let b = front.submit(task("b.txt"));
    let t = front.wait_terminal(&b);
    assert_eq!(t["state"], "succeeded", "{t}");
    let prs = forge.taken();
    assert_eq!(prs.len(), 1, "{prs:?}");
    assert_eq!(prs[0].body["head"], format!("dough/{b}"), "{prs:?}");
    assert!(t["result"]["pr_url"].as_str().is_some(), "{t}");
}
